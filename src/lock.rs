//! Serialisation per key: one lock per key while in use, or one lock of
//! its own per key, kept.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, PoisonError};

use async_lock::{Mutex, MutexGuardArc};
use foldhash::fast::RandomState;

/// One async mutex per key while anyone holds or waits for it: two
/// operations on one key never overlap, operations on different keys never
/// share a mutex (so an operation that hangs holding one, on a call out to
/// a host, holds up no other key's), and memory grows with the keys in use,
/// not with every key ever used: an entry goes when its last holder or
/// waiter does (a waiter dropped included).
pub(crate) struct Keyed<K> {
    locks: std::sync::Mutex<InUse<K>>,
}

/// The keys in use, and mutexes no one uses kept for the next keys (a
/// mutex made for every operation costs it an allocation).
struct InUse<K> {
    /// Each key in use: how many hold or wait for its mutex, and the mutex.
    users: HashMap<K, (usize, Arc<Mutex<()>>), RandomState>,
    spare: Vec<Arc<Mutex<()>>>,
}

/// Mutexes kept for reuse, at most.
const SPARE: usize = 64;

impl<K> Default for Keyed<K> {
    fn default() -> Self {
        Self {
            locks: std::sync::Mutex::new(InUse {
                users: HashMap::default(),
                spare: Vec::new(),
            }),
        }
    }
}

/// A mutex of [`Keyed`] held: let go when dropped.
pub(crate) struct KeyedGuard<'a, K: Hash + Eq + Copy> {
    // Released before the entry is let go (fields drop in order).
    _guard: MutexGuardArc<()>,
    _user: User<'a, K>,
}

/// A holder or waiter of a key's mutex, counted in its entry.
struct User<'a, K: Hash + Eq + Copy> {
    keyed: &'a Keyed<K>,
    key: K,
}

impl<K: Hash + Eq + Copy> Drop for User<'_, K> {
    fn drop(&mut self) {
        let mut locks = self.keyed.map();
        let InUse { users, spare } = &mut *locks;
        if let Some((count, _)) = users.get_mut(&self.key) {
            *count -= 1;
            if *count == 0
                && let Some((_, mutex)) = users.remove(&self.key)
                // No one else has it (a waiter's future dropped after
                // its count may still): free, and unlocked.
                && Arc::strong_count(&mutex) == 1
                && spare.len() < SPARE
            {
                spare.push(mutex);
            }
        }
    }
}

impl<K: Hash + Eq + Copy> Keyed<K> {
    // Each critical section is a few map operations: a poisoned lock is safe.
    fn map(&self) -> std::sync::MutexGuard<'_, InUse<K>> {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait for, then hold, the mutex of `key`.
    pub(crate) async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        let (user, mutex) = {
            let mut locks = self.map();
            let InUse { users, spare } = &mut *locks;
            let (users, mutex) = users
                .entry(key)
                .or_insert_with(|| (0, spare.pop().unwrap_or_default()));
            *users += 1;
            (User { keyed: self, key }, mutex.clone())
        };
        KeyedGuard {
            _guard: mutex.lock_arc().await,
            _user: user,
        }
    }

    /// Hold the mutexes of all `keys` at once. They are taken in key order,
    /// each once, so two callers can never wait on each other in a cycle.
    pub(crate) async fn lock_all(&self, keys: impl IntoIterator<Item = K>) -> Vec<KeyedGuard<'_, K>>
    where
        K: Ord,
    {
        let mut keys: Vec<K> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut guards = Vec::with_capacity(keys.len());
        for key in keys {
            guards.push(self.lock(key).await);
        }
        guards
    }

    /// How many keys have an entry (held or waited for).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.map().users.len()
    }
}

impl<K> std::fmt::Debug for Keyed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyed")
    }
}

/// One lock per key, made on first use and kept (a few bytes each): no key
/// shares its lock, so an operation that hangs while holding one (a call
/// out to a host) holds up no other key's. For keys there are few of, such
/// as businesses.
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// One key's operations wait for each other, other keys' do not, and an
    /// entry goes with its last holder or waiter, a waiter dropped
    /// unserved included: memory follows the keys in use.
    #[test]
    fn keyed_locks_serialise_one_key_and_go_with_their_last_user() {
        let keyed = Keyed::<u32>::default();
        let Poll::Ready(held) = poll_once(pin!(keyed.lock(1))) else {
            panic!("a free key waited");
        };
        let mut waiter = Box::pin(keyed.lock(1));
        assert!(
            poll_once(waiter.as_mut()).is_pending(),
            "one key, two holders"
        );
        assert!(
            poll_once(pin!(keyed.lock(2))).is_ready(),
            "another key waited"
        );
        assert_eq!(keyed.entries(), 1, "key 2's entry outlived its guard");
        drop(waiter);
        assert_eq!(keyed.entries(), 1);
        drop(held);
        assert_eq!(keyed.entries(), 0, "an entry outlived its users");
        let all = pin!(keyed.lock_all([3, 1, 3]));
        let Poll::Ready(guards) = poll_once(all) else {
            panic!("free keys waited");
        };
        assert_eq!((guards.len(), keyed.entries()), (2, 2));
        drop(guards);
        assert_eq!(keyed.entries(), 0);
    }
}
