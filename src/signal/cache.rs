//! Decoded peer state kept in memory, and when a reload may be trusted.
//!
//! Sending is write-behind: the library leases sending counters in batches
//! of 64, and a session need only be persisted before a ciphertext whose
//! counter lies past the persisted lease (or when its retention epoch moves).
//! A snapshot reloaded by the process that wrote it is trusted as current;
//! any other reload fast-forwards the sending chain past the lease, so a
//! counter is never issued twice. The cache keeps that sound: if it ever has
//! to drop a peer with unpersisted sends, it changes the process incarnation,
//! so every older snapshot becomes untrusted. State taken out for an
//! operation is held with a [`Taken`], which does the same if the state is
//! never put back: an error, or the operation's future dropped at an await.
//!
//! The cache is bounded twice: by a count of peers, and by bytes, each peer
//! counting the length of its last encoding plus [`PEER_OVERHEAD`]. A
//! device can grow its record to [`SignalConfig::max_record_len`]; the byte
//! bound keeps many such devices from holding that much memory each.
//!
//! Receiving is write-behind too, for the plain case: a follow-up message
//! that is the next on a receiving chain of the session in use, within 32
//! counters of where that chain was last persisted, stores only the message.
//! Two things make a snapshot that lost such receives (a crash, or a peer
//! dropped from the cache) safe to reload:
//!
//! - An inbound message's id is derived from its Signal header (the
//!   sender's ratchet key and counter), and a message is stored once. A
//!   replay that the outdated snapshot decrypts again fails to store, and is
//!   answered as the duplicate it is.
//! - Once the replayed messages' retention ends, their ids no longer guard.
//!   So a reloaded snapshot is unsure of the 32 counters past each receiving
//!   chain's index ([`Unsure`](super::peer::Unsure)). When a later message
//!   skips over unsure counters, the keys of those with a stored message are
//!   dropped rather than kept for late arrivals, and the snapshot is
//!   persisted. Every persist settles the counters still unsure on every
//!   chain the same way (the chain moved past the last with a stored
//!   message), as the new snapshot may outlive those messages. A receive
//!   is written behind only if the stored snapshot expires no later than
//!   its message (and at most an hour sooner), so no snapshot outlives the
//!   messages that settle it (unless a business's retention is shortened
//!   meanwhile, which deletes messages early).
//!
//! A stored snapshot past its own expiry still gives its trusted key until
//! the end of its epoch, while its consumer has a message: the expiry it
//! had in memory (raised by sends and receives written behind, never past
//! the epoch) may have been later, and a device's trusted key must outlive
//! its messages. Not its session: the messages that would settle its
//! unsure counters may be swept by then, and a replay of one would
//! decrypt again.

use std::sync::{Mutex, MutexGuard};

use foldhash::fast::RandomState;
use hashlink::LruCache;
use rand::Rng;

use super::SignalConfig;
use super::peer::Peer;
use crate::ids::BusinessId;
use crate::rng::OsRng;
use crate::store::PeerId;

type Key = (BusinessId, PeerId);

/// What a cached peer counts for besides its encoding: the decoded
/// structures, its record key's schedule, its address.
pub(super) const PEER_OVERHEAD: usize = 1024;

/// The bytes a cached peer counts for. Stable while it is cached: state
/// in the cache is not changed.
fn weight(peer: &Peer) -> usize {
    peer.encoded_len.saturating_add(PEER_OVERHEAD)
}

pub(super) struct PeerCache {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Boxed: a peer's state moves in and out on every operation.
    peers: LruCache<Key, Box<Peer>, RandomState>,
    /// The sum of the cached peers' [`weight`]s, at most `budget`.
    bytes: usize,
    budget: usize,
    incarnation: [u8; 16],
    /// Bumped by [`PeerCache::clear`]; state loaded in an older
    /// generation is never put back.
    generation: u64,
    /// The key manager's [`early_destructions`] when last seen: when it has
    /// moved, an epoch key was destroyed early, and every peer is forgotten
    /// (its session may have been opened, and its record key derived,
    /// under that key).
    ///
    /// [`early_destructions`]: crate::keys::KeyManager::early_destructions
    shreds: u64,
}

impl Inner {
    /// See [`PeerCache::clear`].
    fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        let dirty = self.peers.iter().any(|(_, p)| p.dirty);
        self.peers.clear();
        self.bytes = 0;
        if dirty {
            self.incarnation = fresh_incarnation();
        }
    }
}

fn fresh_incarnation() -> [u8; 16] {
    let mut incarnation = [0u8; 16];
    OsRng.fill_bytes(&mut incarnation);
    incarnation
}

impl PeerCache {
    pub(super) fn new(config: &SignalConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                peers: LruCache::with_hasher(config.peer_cache.max(1), RandomState::default()),
                bytes: 0,
                budget: config.peer_cache_bytes,
                incarnation: fresh_incarnation(),
                generation: 0,
                shreds: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is one map operation; recover after a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The incarnation snapshots are written and trusted under.
    pub(super) fn incarnation(&self) -> [u8; 16] {
        self.lock().incarnation
    }

    /// Take a peer's state out (the caller holds the peer's address lock).
    /// `shreds` is the key manager's
    /// [`early_destructions`](crate::keys::KeyManager::early_destructions),
    /// read before: if it has moved past the count last seen, every peer is
    /// forgotten first, as by [`clear`](Self::clear).
    pub(super) fn take(&self, key: &Key, shreds: u64) -> Option<Box<Peer>> {
        let mut inner = self.lock();
        if inner.shreds < shreds {
            inner.shreds = shreds;
            inner.clear();
        }
        let peer = inner.peers.remove(key)?;
        inner.bytes = inner.bytes.saturating_sub(weight(&peer));
        Some(peer)
    }

    /// Hold `key`'s state, `dirty` as taken out, for one operation.
    pub(super) fn taken(&self, key: Key, dirty: bool) -> Taken<'_> {
        Taken {
            cache: self,
            key,
            dirty: Some(dirty),
        }
    }

    /// The generation state loaded from the store now belongs to. Read it
    /// before reading the store.
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Put a peer's state back, evicting the least recently used peers
    /// while either bound is exceeded. State of an older generation, or
    /// larger than the whole byte budget, is discarded instead.
    fn put(&self, key: Key, peer: Box<Peer>) {
        let mut inner = self.lock();
        let weight = weight(&peer);
        if peer.generation != inner.generation || weight > inner.budget {
            if peer.dirty {
                inner.incarnation = fresh_incarnation();
            }
            return;
        }
        if let Some(old) = inner.peers.remove(&key) {
            inner.bytes = inner.bytes.saturating_sub(self::weight(&old));
        }
        while inner.peers.len() >= inner.peers.capacity()
            || inner.bytes.saturating_add(weight) > inner.budget
        {
            let Some((_, evicted)) = inner.peers.remove_lru() else {
                break;
            };
            inner.bytes = inner.bytes.saturating_sub(self::weight(&evicted));
            if evicted.dirty {
                // Its unpersisted sends are forgotten: no snapshot may be trusted now.
                inner.incarnation = fresh_incarnation();
            }
        }
        inner.bytes = inner.bytes.saturating_add(weight);
        inner.peers.insert(key, peer);
    }

    /// A peer's state will not be put back: if it held unpersisted sends
    /// (`dirty`), no snapshot may be trusted any more.
    pub(super) fn discard(&self, dirty: bool) {
        if dirty {
            self.lock().incarnation = fresh_incarnation();
        }
    }

    /// Forget every peer: stored state was deleted behind the cache's back
    /// (a retention sweep). State taken out before is not put back.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// Take `key`'s state out to delete it from the store: it is not in
    /// memory to be written back, whenever the deletion lands. Hold the
    /// guard until the deletion is committed, then call
    /// [`Taken::deleted`].
    pub(super) fn take_to_delete(&self, key: Key, shreds: u64) -> Taken<'_> {
        let dirty = self.take(&key, shreds).is_some_and(|peer| peer.dirty);
        self.taken(key, dirty)
    }

    pub(super) fn len(&self) -> usize {
        self.lock().peers.len()
    }
}

/// A peer's state is out of the cache for one operation: [`put`](Self::put)
/// it back when the operation is done with it. Dropped instead (the
/// operation failed, or its future was dropped at an await), it forgets the
/// state: the store keeps the last committed copy, and if the state as
/// taken held unpersisted sends, no older snapshot is trusted any more, so
/// a reload never issues their sending counters again.
#[must_use = "dropping it forgets the peer's state"]
pub(super) struct Taken<'c> {
    cache: &'c PeerCache,
    key: Key,
    /// Whether the state as taken had unpersisted sends; `None` once put back.
    dirty: Option<bool>,
}

impl Taken<'_> {
    /// Put the state back (see [`PeerCache::put`]). A device with no state
    /// (none stored, or a message from it refused before it had any) is
    /// not kept: it would save no read, and its key names a consumer, whom
    /// nothing forgets but eviction.
    pub(super) fn put(mut self, peer: Box<Peer>) {
        self.dirty = None;
        if peer.session.is_none() && peer.identity.is_none() && !peer.dirty {
            return;
        }
        self.cache.put(self.key, peer);
    }

    /// The store deleted the state: no snapshot of it is left to distrust.
    pub(super) fn deleted(mut self) {
        self.dirty = None;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(dirty) = self.dirty {
            self.cache.discard(dirty);
        }
    }
}

#[cfg(test)]
mod tests {
    use wacore_libsignal::protocol::IdentityKeyPair;

    use super::*;
    use crate::ids::PhoneHash;
    use crate::rng::OsRng;

    const B: usize = 10 * PEER_OVERHEAD;

    fn key(n: u8) -> Key {
        let business = BusinessId::new(1).unwrap_or_else(|| unreachable!());
        let phone = PhoneHash::from_bytes([n; 16]);
        (business, PeerId { phone, device: 0 })
    }

    /// A peer (a trusted identity, no session) whose last encoding was
    /// `len` bytes.
    fn peer(n: u8, len: usize, dirty: bool) -> Box<Peer> {
        let identity = *IdentityKeyPair::generate(&mut OsRng).identity_key();
        Box::new(Peer {
            encoded_len: len,
            dirty,
            identity: Some(identity),
            ..Peer::empty(key(n).1)
        })
    }

    fn cache(count: usize, bytes: usize) -> PeerCache {
        PeerCache::new(&SignalConfig {
            peer_cache: count,
            peer_cache_bytes: bytes,
            ..SignalConfig::default()
        })
    }

    fn put(cache: &PeerCache, n: u8, len: usize, dirty: bool) {
        cache.taken(key(n), dirty).put(peer(n, len, dirty));
    }

    #[test]
    fn large_records_evict_the_least_recently_used_by_bytes() {
        let c = cache(100, B);
        for n in 0..4 {
            put(&c, n, 2 * PEER_OVERHEAD, false);
        }
        assert_eq!(c.len(), 3, "three peers of 3 KiB fit in 10 KiB");
        assert!(c.take(&key(0), 0).is_none(), "the oldest went");
        // A peer taken out no longer counts: two more fit after it.
        let one = c.take(&key(1), 0).unwrap_or_else(|| unreachable!());
        put(&c, 4, 2 * PEER_OVERHEAD, false);
        assert_eq!(c.len(), 3);
        c.taken(key(1), false).put(one);
        assert_eq!(c.len(), 3, "putting it back evicted the oldest again");
        assert!(c.take(&key(2), 0).is_none());
    }

    #[test]
    fn a_peer_larger_than_the_budget_is_not_kept() {
        let c = cache(100, B);
        put(&c, 0, PEER_OVERHEAD, false);
        let before = c.incarnation();
        put(&c, 1, B, false);
        assert_eq!(
            (c.len(), c.incarnation()),
            (1, before),
            "clean: just not kept"
        );
        put(&c, 2, B, true);
        assert_eq!(c.len(), 1);
        assert_ne!(
            c.incarnation(),
            before,
            "its unpersisted sends are forgotten"
        );
    }

    #[test]
    fn evicting_unpersisted_sends_makes_older_snapshots_untrusted() {
        let c = cache(2, usize::MAX);
        put(&c, 0, 0, true);
        put(&c, 1, 0, false);
        let before = c.incarnation();
        put(&c, 2, 0, false);
        assert_ne!(c.incarnation(), before, "a dirty peer was evicted");
        let before = c.incarnation();
        put(&c, 3, 0, false);
        assert_eq!(c.incarnation(), before, "a clean one changes nothing");
    }

    #[test]
    fn state_taken_and_dropped_is_forgotten_safely() {
        let c = cache(100, usize::MAX);
        let before = c.incarnation();
        drop(c.taken(key(0), false));
        assert_eq!(c.incarnation(), before, "nothing unpersisted was lost");
        drop(c.taken(key(0), true));
        assert_ne!(c.incarnation(), before, "unpersisted sends were lost");
        let before = c.incarnation();
        c.taken(key(0), true).put(peer(0, 0, true));
        assert_eq!((c.len(), c.incarnation()), (1, before), "put back: kept");
    }

    #[test]
    fn an_early_shred_forgets_every_peer_at_the_next_take() {
        let c = cache(100, usize::MAX);
        put(&c, 0, 0, false);
        put(&c, 1, 0, true);
        let (generation, before) = (c.generation(), c.incarnation());
        assert!(c.take(&key(0), 1).is_none(), "forgotten, not taken");
        assert_eq!(c.len(), 0);
        assert_eq!(c.generation(), generation + 1, "state out is not put back");
        assert_ne!(c.incarnation(), before, "unpersisted sends were lost");
        // Seen once, the count forgets nothing more.
        let fresh = |n| {
            Box::new(Peer {
                generation: generation + 1,
                ..*peer(n, 0, false)
            })
        };
        c.taken(key(2), false).put(fresh(2));
        assert!(c.take(&key(2), 1).is_some());
        c.taken(key(2), false).put(fresh(2));
        assert!(c.take(&key(2), 0).is_some(), "an older count is no news");
    }

    #[test]
    fn clear_forgets_every_peer_and_its_bytes() {
        let c = cache(100, B);
        for n in 0..3 {
            put(&c, n, 2 * PEER_OVERHEAD, false);
        }
        let generation = c.generation();
        c.clear();
        assert_eq!(c.len(), 0);
        // State loaded before the clear is not put back.
        c.taken(key(0), false).put(peer(0, 0, false));
        assert_eq!(c.len(), 0);
        let fresh = Box::new(Peer {
            generation: generation + 1,
            ..*peer(1, 2 * PEER_OVERHEAD, false)
        });
        c.taken(key(1), false).put(fresh);
        for n in 2..5 {
            let p = Box::new(Peer {
                generation: generation + 1,
                ..*peer(n, 2 * PEER_OVERHEAD, false)
            });
            c.taken(key(n), false).put(p);
        }
        assert_eq!(c.len(), 3, "the budget is whole again after the clear");
    }
}
