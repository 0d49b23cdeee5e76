//! Atomic write batches: what one successful operation changes.

use std::time::Duration;

use super::{Delivery, Direction, Hold, HoldScope, MessageRecord};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::keys::KeyId;

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
    /// Delete a wrapped key outright (a consumed one-time prekey).
    DeleteKey(KeyId),
    /// Store a message (insert or replace).
    PutMessage(Box<MessageRecord>),
    /// Change a stored message's delivery bookkeeping (no effect if it is gone).
    UpdateDelivery {
        /// The business.
        business: BusinessId,
        /// The message.
        id: MessageId,
        /// The new bookkeeping.
        delivery: Delivery,
    },
    /// Delete a message.
    DeleteMessage {
        /// The business.
        business: BusinessId,
        /// The message.
        id: MessageId,
    },
    /// Shorten retention retroactively: every stored message of `business`
    /// in `direction` whose expiry is later than its creation plus `period`
    /// expires then instead. Never makes an expiry later. Applied when a
    /// business's retention is shortened, so that the sweep deletes what
    /// reads already refuse.
    CapExpiry {
        /// The business.
        business: BusinessId,
        /// Which class of its messages.
        direction: Direction,
        /// The retention period now in force.
        period: Duration,
    },
    /// Place (or replace) a legal hold.
    PutHold(Hold),
    /// Release a legal hold.
    DeleteHold(HoldScope),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
            Self::DeleteKey(id) => f.debug_tuple("DeleteKey").field(id).finish(),
            Self::PutMessage(m) => f.debug_tuple("PutMessage").field(m).finish(),
            Self::UpdateDelivery {
                business,
                id,
                delivery,
            } => f
                .debug_struct("UpdateDelivery")
                .field("business", business)
                .field("id", id)
                .field("delivery", delivery)
                .finish(),
            Self::DeleteMessage { business, id } => f
                .debug_struct("DeleteMessage")
                .field("business", business)
                .field("id", id)
                .finish(),
            Self::CapExpiry {
                business,
                direction,
                period,
            } => f
                .debug_struct("CapExpiry")
                .field("business", business)
                .field("direction", direction)
                .field("period", period)
                .finish(),
            Self::PutHold(h) => f.debug_tuple("PutHold").field(h).finish(),
            Self::DeleteHold(s) => f.debug_tuple("DeleteHold").field(s).finish(),
        }
    }
}

/// Writes that take effect together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
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

    /// Add every write of `other` after this batch's.
    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }

    /// The writes, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Take the writes.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}
