//! Decoded peer state kept in memory, and when a reload may be trusted.
//!
//! Sending is write-behind: the library leases sending counters in batches
//! of 64, and a session need only be persisted before a ciphertext whose
//! counter lies past the persisted lease (or when its retention epoch moves).
//! A snapshot reloaded by the process that wrote it is trusted as current;
//! any other reload fast-forwards the sending chain past the lease, so a
//! counter is never issued twice. The cache keeps that sound: if it ever has
//! to drop a peer with unpersisted sends, it changes the process incarnation,
//! so every older snapshot becomes untrusted.
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

use std::sync::{Mutex, MutexGuard};

use foldhash::fast::RandomState;
use hashlink::LruCache;
use rand::Rng;

use super::peer::Peer;
use super::rng::ThreadCsprng;
use crate::ids::BusinessId;
use crate::store::PeerId;

type Key = (BusinessId, PeerId);

pub(super) struct PeerCache {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Boxed: a peer's state moves in and out on every operation.
    peers: LruCache<Key, Box<Peer>, RandomState>,
    incarnation: [u8; 16],
    /// Bumped by [`PeerCache::clear`]; state loaded in an older
    /// generation is never put back.
    generation: u64,
}

fn fresh_incarnation() -> [u8; 16] {
    let mut incarnation = [0u8; 16];
    ThreadCsprng.fill_bytes(&mut incarnation);
    incarnation
}

impl PeerCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                peers: LruCache::with_hasher(capacity.max(1), RandomState::default()),
                incarnation: fresh_incarnation(),
                generation: 0,
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
    pub(super) fn take(&self, key: &Key) -> Option<Box<Peer>> {
        self.lock().peers.remove(key)
    }

    /// The generation state loaded from the store now belongs to. Read it
    /// before reading the store.
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Put a peer's state back, evicting the least recently used peer if full.
    /// State of an older generation is discarded instead.
    pub(super) fn put(&self, key: Key, peer: Box<Peer>) {
        let mut inner = self.lock();
        if peer.generation != inner.generation {
            if peer.dirty {
                inner.incarnation = fresh_incarnation();
            }
            return;
        }
        if inner.peers.len() >= inner.peers.capacity()
            && !inner.peers.contains_key(&key)
            && let Some((_, evicted)) = inner.peers.remove_lru()
            && evicted.dirty
        {
            // Its unpersisted sends are forgotten: no snapshot may be trusted now.
            inner.incarnation = fresh_incarnation();
        }
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
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        let dirty = inner.peers.iter().any(|(_, p)| p.dirty);
        inner.peers.clear();
        if dirty {
            inner.incarnation = fresh_incarnation();
        }
    }

    /// Forget a peer whose stored state was deleted.
    pub(super) fn remove(&self, key: &Key) {
        self.lock().peers.remove(key);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().peers.len()
    }
}
