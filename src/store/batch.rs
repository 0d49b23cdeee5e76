//! Atomic write batches: what one successful operation changes.

use std::fmt;

use rand::Rng;
use smallvec::SmallVec;

use super::{Delivery, Hold, HoldScope, MessageRecord, TakeId};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::integrity::Category;
use crate::keys::KeyId;
use crate::rng::OsRng;
use crate::time::Timestamp;

/// One consumer device, as Signal state is keyed: the consumer's phone hash
/// and the device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId {
    /// The consumer.
    pub phone: PhoneHash,
    /// The device (0 is the consumer's primary device).
    pub device: u32,
}

/// One write. The enum is exhaustive on purpose: a backend that does not
/// handle a new kind of write fails to compile rather than dropping it.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Store the sealed record of a peer (insert or replace).
    PutPeer {
        /// The business.
        business: BusinessId,
        /// The peer.
        peer: PeerId,
        /// The sealed record.
        sealed: Vec<u8>,
    },
    /// Delete a peer's record.
    DeletePeer {
        /// The business.
        business: BusinessId,
        /// The peer.
        peer: PeerId,
    },
    /// Delete a peer's record unless a message of its consumer expires
    /// after `now`, or a stored legal hold covers the consumer: the
    /// retention sweep's delete, which must not race a message that
    /// arrived since it looked, nor a hold stored since (by another
    /// process on the store). A hold row whose scope does not decode
    /// counts as covering its whole business.
    DeleteIdlePeer {
        /// The business.
        business: BusinessId,
        /// The peer.
        peer: PeerId,
        /// The sweep's time.
        now: Timestamp,
    },
    /// Delete a live wrapped key (a consumed one-time prekey). If no live
    /// key is stored under the id, the whole batch fails with
    /// [`StoreError::Conflict`](super::StoreError::Conflict): a one-time
    /// prekey is consumed once.
    ConsumeKey(KeyId),
    /// Store a new message. If one with its id is stored already, the
    /// whole batch fails with [`StoreError::Conflict`](super::StoreError::Conflict):
    /// a stored message is never replaced, so an id is a guard against
    /// storing the same message twice.
    PutMessage(Box<MessageRecord>),
    /// Store a new message under two ids: a consumer's message sent again
    /// on request, stored under the id it was asked for (`record.id`) and
    /// known by the id its own header gives (`header`), so that a copy of
    /// it handed in without the request named is a copy too; or one far
    /// into its chain, stored under its own id and known by the one it
    /// would be asked for again under, so that the message sent again is
    /// a copy of it. If a message
    /// stored under, or known by, either id exists, the whole batch fails
    /// with [`StoreError::Conflict`](super::StoreError::Conflict); a
    /// [`PutMessage`](Op::PutMessage) under an id some message is known by
    /// fails the same way. Reading either id gives the message
    /// ([`Storage::message`](super::Storage::message)); deleting it deletes
    /// both.
    PutResentMessage {
        /// The message, under the id it was asked for.
        record: Box<MessageRecord>,
        /// The id its header gives.
        header: MessageId,
    },
    /// Change a stored message's delivery bookkeeping, if it is still
    /// exactly `expected` (every field: status, failure, attempts, next
    /// attempt, pending devices). If it is not, or the message is gone, the
    /// whole batch fails with [`StoreError::Conflict`](super::StoreError::Conflict):
    /// reread it and decide again. A compare-and-swap of the whole value, so
    /// that concurrent writers never move a status backwards, nor undo one
    /// another's devices left to retry.
    UpdateDelivery {
        /// The business.
        business: BusinessId,
        /// The message.
        id: MessageId,
        /// The bookkeeping the change was decided on.
        expected: Delivery,
        /// The new bookkeeping.
        delivery: Delivery,
    },
    /// Mark a message failed because its retention ended, if it is still
    /// open (queued or sent); otherwise no effect. Nothing stays pending:
    /// its delivery becomes [`Delivery::failed_expired`].
    FailExpired {
        /// The business.
        business: BusinessId,
        /// The message.
        id: MessageId,
    },
    /// Delete a message.
    DeleteMessage {
        /// The business.
        business: BusinessId,
        /// The message.
        id: MessageId,
    },
    /// Place a legal hold (no effect if the same scope is already held for
    /// the same reference).
    PutHold(Hold),
    /// Release the legal hold on `scope` for `reference` (other cases
    /// holding the same scope stand).
    DeleteHold {
        /// What it covers.
        scope: HoldScope,
        /// The case it serves.
        reference: String,
    },
    /// Count one billable message of `business` in the period from `start`
    /// to `end`, of `category`, among the counts no take holds yet. Over a
    /// stored count that is not an integer (damaged: what it counted is
    /// lost, and reads of the business's billing fail as
    /// [`StoreError::Corrupt`](super::StoreError::Corrupt) until an operator
    /// restores it) the bill is left out, logged, and the rest of the batch
    /// applies: a damaged count stops no message's bookkeeping.
    Bill {
        /// The business.
        business: BusinessId,
        /// The first instant of the period.
        start: Timestamp,
        /// The first instant after it.
        end: Timestamp,
        /// The category.
        category: Category,
    },
    /// Move every count of `business` that no take holds and whose period
    /// ended at or before `closed_by` into a new take `id`, made `at`. If
    /// there is no such count, no take is made; if `business` has a take
    /// `id` already, nothing happens.
    TakeBilling {
        /// The business.
        business: BusinessId,
        /// The take's id.
        id: TakeId,
        /// Periods ending at or before this instant are taken.
        closed_by: Timestamp,
        /// When the take is made.
        at: Timestamp,
    },
    /// Forget take `id` of `business` and its counts: billing's system of
    /// record has them. No effect if there is no such take.
    SettleBilling {
        /// The business.
        business: BusinessId,
        /// The take.
        id: TakeId,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PutPeer {
                business,
                peer,
                sealed,
            } => f
                .debug_struct("PutPeer")
                .field("business", business)
                .field("peer", peer)
                .field("sealed_len", &sealed.len())
                .finish(),
            Self::DeletePeer { business, peer } => f
                .debug_struct("DeletePeer")
                .field("business", business)
                .field("peer", peer)
                .finish(),
            Self::DeleteIdlePeer {
                business,
                peer,
                now,
            } => f
                .debug_struct("DeleteIdlePeer")
                .field("business", business)
                .field("peer", peer)
                .field("now", now)
                .finish(),
            Self::ConsumeKey(id) => f.debug_tuple("ConsumeKey").field(id).finish(),
            Self::PutMessage(m) => f.debug_tuple("PutMessage").field(m).finish(),
            Self::PutResentMessage { record, header } => f
                .debug_struct("PutResentMessage")
                .field("record", record)
                .field("header", header)
                .finish(),
            Self::UpdateDelivery {
                business,
                id,
                expected,
                delivery,
            } => f
                .debug_struct("UpdateDelivery")
                .field("business", business)
                .field("id", id)
                .field("expected", expected)
                .field("delivery", delivery)
                .finish(),
            Self::FailExpired { business, id } => f
                .debug_struct("FailExpired")
                .field("business", business)
                .field("id", id)
                .finish(),
            Self::DeleteMessage { business, id } => f
                .debug_struct("DeleteMessage")
                .field("business", business)
                .field("id", id)
                .finish(),
            Self::PutHold(h) => f.debug_tuple("PutHold").field(h).finish(),
            Self::DeleteHold { scope, reference } => f
                .debug_struct("DeleteHold")
                .field("scope", scope)
                .field("reference", reference)
                .finish(),
            Self::Bill {
                business,
                start,
                end,
                category,
            } => f
                .debug_struct("Bill")
                .field("business", business)
                .field("start", start)
                .field("end", end)
                .field("category", category)
                .finish(),
            Self::TakeBilling {
                business,
                id,
                closed_by,
                at,
            } => f
                .debug_struct("TakeBilling")
                .field("business", business)
                .field("id", id)
                .field("closed_by", closed_by)
                .field("at", at)
                .finish(),
            Self::SettleBilling { business, id } => f
                .debug_struct("SettleBilling")
                .field("business", business)
                .field("id", id)
                .finish(),
        }
    }
}

/// A processor writing to a store: random, one per processor, drawn from
/// the operating system's generator (two processors forked from one parent
/// draw different ids; see
/// [`Storage::take_over`](super::Storage::take_over)). Not a secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriterId([u8; 16]);

impl WriterId {
    /// A fresh random writer id.
    pub fn random() -> Self {
        let mut id = [0; 16];
        OsRng.fill_bytes(&mut id);
        Self(id)
    }

    /// The id with these bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriterId({})", hex::encode(self.0))
    }
}

/// Writes that take effect together or not at all.
///
/// Most batches are one write (a message stored, a delivery marked): that
/// one is held inline, so building and committing it allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: SmallVec<[Op; 1]>,
    /// The writer it is fenced by, if any (see [`Batch::fenced`]).
    writer: Option<WriterId>,
}

impl From<Op> for Batch {
    /// The batch of `op` alone.
    fn from(op: Op) -> Self {
        let mut batch = Self::new();
        batch.push(op);
        batch
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a write.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Add every write of `other` after this batch's (and its fence, if
    /// this batch has none).
    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
        self.writer = self.writer.or(other.writer);
    }

    /// Fence the batch by `writer`: it commits only while `writer` is the
    /// store's writer; otherwise it fails whole with
    /// [`StoreError::Superseded`](super::StoreError::Superseded) (see
    /// [`Storage::take_over`](super::Storage::take_over)).
    pub fn fenced(&mut self, writer: WriterId) {
        self.writer = Some(writer);
    }

    /// The writer the batch is fenced by, if any: a backend checks it
    /// before anything else.
    pub fn writer(&self) -> Option<WriterId> {
        self.writer
    }

    /// The writes, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Take the writes.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops.into_vec()
    }

    /// Take the write out if the batch is exactly one; otherwise leave the
    /// batch as it is.
    pub(crate) fn take_single(&mut self) -> Option<Op> {
        if self.ops.len() == 1 {
            self.ops.pop()
        } else {
            None
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delete(id: u8) -> Op {
        Op::DeleteMessage {
            business: BusinessId::new(1).unwrap(),
            id: MessageId::from_bytes([id; 16]),
        }
    }

    /// The writes a batch built of `pushes` then appended `appended`.
    fn built(pushes: &[u8], appended: &[u8]) -> Batch {
        let mut batch = Batch::new();
        pushes.iter().for_each(|&i| batch.push(delete(i)));
        let mut other = Batch::new();
        appended.iter().for_each(|&i| other.push(delete(i)));
        batch.append(other);
        batch
    }

    #[test]
    fn a_batch_keeps_its_writes_in_order_however_it_was_built() {
        for n in 0..4u8 {
            for split in 0..=n {
                let ids: Vec<u8> = (0..n).collect();
                let batch = built(&ids[..split as usize], &ids[split as usize..]);
                let expected: Vec<Op> = ids.iter().map(|&i| delete(i)).collect();
                assert_eq!(batch.ops(), expected.as_slice());
                assert_eq!(batch.is_empty(), n == 0);
                assert_eq!(batch.clone().into_ops(), expected);
                // Equal by their writes, whichever way they were built.
                assert_eq!(batch, built(&ids, &[]));
                let mut rest = batch;
                match rest.take_single() {
                    Some(op) => assert_eq!((n, op), (1, delete(0))),
                    None => {
                        assert_ne!(n, 1);
                        assert_eq!(rest.into_ops(), expected);
                    }
                }
            }
        }
    }
}
