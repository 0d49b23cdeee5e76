//! Per-address serialisation without per-address bookkeeping.

use std::hash::{BuildHasher, Hash};

use async_lock::{Mutex, MutexGuard};
use foldhash::fast::RandomState;

/// A fixed set of async mutexes; a key always maps to the same one. Two
/// operations on one key therefore never overlap, while operations on
/// different keys share a mutex only when their keys collide (1 in
/// [`Stripes::COUNT`]). Memory is constant however many keys there are.
pub(crate) struct Stripes {
    locks: Box<[Mutex<()>]>,
    hasher: RandomState,
}

impl Stripes {
    /// Number of mutexes.
    pub(crate) const COUNT: usize = 1024;

    pub(crate) fn new() -> Self {
        Self {
            locks: (0..Self::COUNT).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::default(),
        }
    }

    fn index(&self, key: impl Hash) -> usize {
        // The remainder is below COUNT, so the cast is lossless.
        (self.hasher.hash_one(key) % Self::COUNT as u64) as usize
    }

    /// Wait for, then hold, the mutex of `key`.
    pub(crate) async fn lock(&self, key: impl Hash) -> MutexGuard<'_, ()> {
        self.locks[self.index(key)].lock().await
    }

    /// Hold the mutexes of all `keys` at once. They are taken in index order,
    /// each once, so two callers can never wait on each other in a cycle.
    pub(crate) async fn lock_all<K: Hash>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut indices: Vec<usize> = keys.into_iter().map(|k| self.index(k)).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for i in indices {
            guards.push(self.locks[i].lock().await);
        }
        guards
    }
}

impl std::fmt::Debug for Stripes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stripes({})", self.locks.len())
    }
}
