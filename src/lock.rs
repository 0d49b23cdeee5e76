//! Serialisation per key: striped, without per-key bookkeeping, or one
//! lock of its own per key.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, PoisonError};

use async_lock::{Mutex, MutexGuardArc};
use foldhash::fast::RandomState;

/// A fixed set of async mutexes; a key always maps to the same one. Two
/// operations on one key therefore never overlap, while operations on
/// different keys share a mutex only when their keys collide (1 in
/// [`Stripes::COUNT`]). Memory is constant however many keys there are
/// (4 KiB). An operation that hangs holding one holds up the keys that
/// collide with its own: keep one set per tenant (see [`PerKey`]).
pub(crate) struct Stripes {
    locks: Box<[Arc<Mutex<()>>]>,
    hasher: RandomState,
}

impl Stripes {
    /// Number of mutexes.
    pub(crate) const COUNT: usize = 256;

    fn index(&self, key: impl Hash) -> usize {
        // The remainder is below COUNT, so the cast is lossless.
        (self.hasher.hash_one(key) % Self::COUNT as u64) as usize
    }

    /// Wait for, then hold, the mutex of `key`.
    pub(crate) async fn lock(&self, key: impl Hash) -> MutexGuardArc<()> {
        self.locks[self.index(key)].lock_arc().await
    }

    /// Hold the mutexes of all `keys` at once. They are taken in index order,
    /// each once, so two callers can never wait on each other in a cycle.
    pub(crate) async fn lock_all<K: Hash>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Vec<MutexGuardArc<()>> {
        let mut indices: Vec<usize> = keys.into_iter().map(|k| self.index(k)).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for i in indices {
            guards.push(self.locks[i].lock_arc().await);
        }
        guards
    }
}

impl Default for Stripes {
    fn default() -> Self {
        Self {
            locks: (0..Self::COUNT).map(|_| Arc::new(Mutex::new(()))).collect(),
            hasher: RandomState::default(),
        }
    }
}

impl std::fmt::Debug for Stripes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stripes({})", self.locks.len())
    }
}

/// One lock per key, made on first use and kept (a few bytes each): unlike
/// [`Stripes`], no key shares its lock, so an operation that hangs while
/// holding one (a call out to a host) holds up no other key's. For keys
/// there are few of, such as businesses.
pub(crate) struct PerKey<K, L> {
    locks: std::sync::Mutex<HashMap<K, Arc<L>, RandomState>>,
}

impl<K, L> Default for PerKey<K, L> {
    fn default() -> Self {
        Self {
            locks: std::sync::Mutex::default(),
        }
    }
}

impl<K: Hash + Eq, L: Default> PerKey<K, L> {
    /// The lock of `key`.
    pub(crate) fn get(&self, key: K) -> Arc<L> {
        // Each critical section is one map operation: a poisoned lock is safe.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(key).or_default().clone()
    }
}
