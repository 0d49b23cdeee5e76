//! The in-memory backend: for tests, examples and hosts that persist nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{KeyStore, StoreError};
use crate::ids::BusinessId;
use crate::keys::{KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::time::Timestamp;

/// Everything in process memory, behind one mutex. Each method holds the lock
/// for its whole effect, which makes every method atomic.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rings: HashMap<BusinessId, KekRing>,
    keys: BTreeMap<KeyId, KeyEntry>,
    /// Epoch keys by end, then owner: the sweep's index.
    epochs: BTreeSet<(Timestamp, BusinessId)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a single map operation, so a panic
        // elsewhere cannot leave the maps half-updated: recover the guard.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn epoch_index(id: &KeyId) -> Option<(Timestamp, BusinessId)> {
    (id.kind == KeyKind::Epoch).then_some((Timestamp::from_millis(id.id), id.business))
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
        Ok(self.lock().rings.get(&business).cloned())
    }

    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let stored = inner.rings.get(&ring.business()).map(KekRing::revision);
        if stored != expected {
            return Err(StoreError::Conflict);
        }
        inner.rings.insert(ring.business(), ring.clone());
        Ok(())
    }

    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
        Ok(self.lock().keys.get(id).cloned())
    }

    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError> {
        let mut inner = self.lock();
        let id = key.id;
        if let Some(existing) = inner.keys.get(&id) {
            return Ok(existing.clone());
        }
        let entry = KeyEntry::Wrapped(key);
        inner.keys.insert(id, entry.clone());
        if let Some(ix) = epoch_index(&id) {
            inner.epochs.insert(ix);
        }
        Ok(entry)
    }

    async fn rewrap_key(&self, key: WrappedKey, expected_version: u32) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.keys.get_mut(&key.id) {
            Some(KeyEntry::Wrapped(stored)) if stored.kek_version == expected_version => {
                *stored = key;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let was_live = matches!(inner.keys.get(id), Some(KeyEntry::Wrapped(_)));
        inner.keys.insert(*id, KeyEntry::Destroyed { at });
        if let Some(ix) = epoch_index(id) {
            inner.epochs.insert(ix);
        }
        Ok(was_live)
    }

    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let mut n = 0;
        for id in ids {
            if inner.keys.remove(id).is_some() {
                n += 1;
            }
            if let Some(ix) = epoch_index(id) {
                inner.epochs.remove(&ix);
            }
        }
        Ok(n)
    }

    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .keys
            .range((start, Bound::Unbounded))
            .skip_while(|(id, _)| id.business < business)
            .take_while(|(id, _)| id.business == business)
            .filter_map(|(_, e)| match e {
                KeyEntry::Wrapped(w) if w.kek_version < version => Some(w.clone()),
                _ => None,
            })
            .take(limit)
            .collect())
    }

    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError> {
        let inner = self.lock();
        let n = inner
            .keys
            .iter()
            .filter(|(id, e)| {
                id.business == business
                    && matches!(e, KeyEntry::Wrapped(w) if w.kek_version == version)
            })
            .count();
        Ok(n as u64)
    }

    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .epochs
            .iter()
            .take_while(|(end, _)| *end <= now)
            .take(limit)
            .map(|&(end, business)| KeyId {
                business,
                kind: KeyKind::Epoch,
                id: end.as_millis(),
            })
            .collect())
    }
}
