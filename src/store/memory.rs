//! The in-memory backend: for tests, examples and hosts that persist nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Batch, KeyStore, Op, PeerId, SignalStore, StoreError};
use crate::ids::{BusinessId, PhoneHash, Region};
use crate::keys::{KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::time::Timestamp;

/// Everything in process memory, behind one mutex. Each method holds the lock
/// for its whole effect, which makes every method atomic.
#[derive(Debug)]
pub struct MemoryStore {
    region: Region,
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::in_region(Region::LOCAL)
    }
}

#[derive(Debug, Default)]
struct Inner {
    rings: HashMap<BusinessId, KekRing>,
    keys: BTreeMap<KeyId, KeyEntry>,
    /// Epoch keys by end, then owner: the sweep's index.
    epochs: BTreeSet<(Timestamp, BusinessId)>,
    peers: BTreeMap<(BusinessId, PeerId), Vec<u8>>,
}

impl MemoryStore {
    /// An empty store in [`Region::LOCAL`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that declares `region`.
    pub fn in_region(region: Region) -> Self {
        Self {
            region,
            inner: Mutex::default(),
        }
    }

    /// Every stored byte string (wrapped KEKs, wrapped keys, sealed peers),
    /// for tests that search the store for secrets.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> Vec<Vec<u8>> {
        let inner = self.lock();
        let rings = inner
            .rings
            .values()
            .flat_map(|r| r.versions().iter().map(|v| v.wrapped.clone()));
        let keys = inner.keys.values().filter_map(|e| match e {
            KeyEntry::Wrapped(w) => Some(w.blob.clone()),
            KeyEntry::Destroyed { .. } => None,
        });
        rings
            .chain(keys)
            .chain(inner.peers.values().cloned())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a single map operation, so a panic
        // elsewhere cannot leave the maps half-updated: recover the guard.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn delete_key(&mut self, id: &KeyId) -> bool {
        if let Some(ix) = epoch_index(id) {
            self.epochs.remove(&ix);
        }
        self.keys.remove(id).is_some()
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
        Ok(ids.iter().filter(|id| inner.delete_key(id)).count() as u64)
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

    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let inner = self.lock();
        let from = KeyId {
            business,
            kind,
            id: after.map_or(0, |a| a.saturating_add(1)),
        };
        if after == Some(u64::MAX) {
            return Ok(Vec::new());
        }
        Ok(inner
            .keys
            .range(from..)
            .take_while(|(id, _)| id.business == business && id.kind == kind)
            .filter_map(|(_, e)| match e {
                KeyEntry::Wrapped(w) => Some(w.clone()),
                KeyEntry::Destroyed { .. } => None,
            })
            .take(limit)
            .collect())
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

#[async_trait]
impl SignalStore for MemoryStore {
    fn region(&self) -> Region {
        self.region
    }

    async fn peer(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().peers.get(&(business, peer)).cloned())
    }

    async fn peer_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, StoreError> {
        let from = (business, PeerId { phone, device: 0 });
        Ok(self
            .lock()
            .peers
            .range(from..)
            .take_while(|((b, p), _)| *b == business && p.phone == phone)
            .map(|((_, p), _)| p.device)
            .collect())
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        // One lock for the whole batch: nothing can observe half of it, and
        // no operation can fail halfway.
        let mut inner = self.lock();
        for op in batch.into_ops() {
            match op {
                Op::PutPeer {
                    business,
                    peer,
                    sealed,
                } => {
                    inner.peers.insert((business, peer), sealed);
                }
                Op::DeletePeer { business, peer } => {
                    inner.peers.remove(&(business, peer));
                }
                Op::DeleteKey(id) => {
                    inner.delete_key(&id);
                }
            }
        }
        Ok(())
    }
}
