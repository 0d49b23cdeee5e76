//! Stored messages and their delivery state.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::keys::Epoch;
use crate::time::Timestamp;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From a consumer to the business.
    Inbound = 1,
    /// From the business to a consumer.
    Outbound = 2,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Self; 2] = [Self::Inbound, Self::Outbound];

    /// The stored code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The direction with this stored code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Inbound),
            2 => Some(Self::Outbound),
            _ => None,
        }
    }
}

/// Where a message is in its delivery. Statuses only move forward along
/// `Queued → Sent → Delivered → Read`; `Failed` ends a message that was never
/// delivered. An inbound message is `Queued` until the business has it, then
/// `Delivered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored, not yet handed on.
    Queued = 0,
    /// Handed to the transport (outbound).
    Sent = 1,
    /// Reached the recipient (the consumer's device, or the business).
    Delivered = 2,
    /// Read by the consumer (outbound).
    Read = 3,
    /// Will never be delivered; see the failure reason.
    Failed = 4,
}

impl Status {
    /// The stored code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The status with this stored code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Queued),
            1 => Some(Self::Sent),
            2 => Some(Self::Delivered),
            3 => Some(Self::Read),
            4 => Some(Self::Failed),
            _ => None,
        }
    }

    /// Whether moving from `self` to `next` is forward. A status never goes
    /// back, and a message that was delivered can no longer fail.
    pub fn may_become(self, next: Self) -> bool {
        match (self, next) {
            (Self::Failed, _) | (Self::Read, _) => false,
            (Self::Queued | Self::Sent, Self::Failed) => true,
            (_, Self::Failed) => false,
            (from, to) => to > from,
        }
    }

    /// Whether the message still needs work (delivery or retransmission).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Queued | Self::Sent)
    }
}

/// Why a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    /// Its retention ended before it could be delivered: it can no longer be
    /// retransmitted and is deleted.
    Expired = 1,
    /// The consumer has no device to deliver to.
    NoDevices = 2,
    /// The transport refused it permanently, or (an outbound message) the
    /// visibility policy in force would not release the consumer's number
    /// to the transport.
    Refused = 3,
    /// No session could be established with any of the consumer's devices
    /// tried (or, for a device, kept: its record grew past the size limit
    /// in force, [`SignalConfig::max_record_len`](crate::signal::SignalConfig::max_record_len)).
    /// On a retry, those are the devices the first attempt left
    /// pending: one the transport refused then is not remembered, so a
    /// message refused for one device and without a session for the rest
    /// fails as `Refused` if one attempt found both out, `NoSession` if it
    /// took two.
    NoSession = 4,
    /// Its stored record can never be opened again: damaged, its key gone,
    /// or not the envelope sealed for it.
    Unreadable = 5,
    /// The transport listed more than [`MAX_DEVICES`](crate::processor::MAX_DEVICES)
    /// devices for the consumer: none was sent to.
    TooManyDevices = 6,
}

impl FailureReason {
    /// The stored code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The reason with this stored code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Expired),
            2 => Some(Self::NoDevices),
            3 => Some(Self::Refused),
            4 => Some(Self::NoSession),
            5 => Some(Self::Unreadable),
            6 => Some(Self::TooManyDevices),
            _ => None,
        }
    }
}

/// A message's delivery bookkeeping: everything about it that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The status.
    pub status: Status,
    /// Why it failed, when `status` is `Failed`.
    pub failure: Option<FailureReason>,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due; `None` when no attempt is scheduled.
    /// An open message (queued or sent) always has one: that is how its
    /// retransmission, and its failure at expiry, can never be forgotten.
    pub next_attempt: Option<Timestamp>,
    /// The recipient's devices the message must still be sent to (left by a
    /// partial failure, or asked for again by a retry receipt): bit `d` for
    /// device `d` (devices 63 and above share bit 63, set while any of them
    /// needs the message: all of them are sent it again). On a message sent
    /// or settled, zero means none outstanding. On one still queued (no
    /// device has it), the devices to try: those the last attempt could
    /// not reach and every device it did not try (linked since, say), not
    /// those it gave up on (nor bit 63 once all the devices sharing it
    /// were: a device 63 or above linked since is not tried); zero, every
    /// device.
    #[serde(default)]
    pub pending_devices: u64,
    /// On a sent message with devices pending: when it is next sent again
    /// to every device, its delivery report overdue (see
    /// [`DeliveryConfig::receipt_timeout`](crate::processor::DeliveryConfig::receipt_timeout)),
    /// whatever the retries of the pending devices meet meanwhile. With
    /// none pending, [`next_attempt`](Self::next_attempt) is that time;
    /// on a message not sent, this is not read. Set by every write that
    /// leaves a sent message's devices pending; `None` on one stored
    /// before this field existed, until its next attempt sets it.
    #[serde(default)]
    pub overdue_at: Option<Timestamp>,
    /// Which write billed an outbound message (counting it taken: billed
    /// once): a random token, never zero, of that write. Zero while the
    /// message is queued; for one that failed from queued, or an inbound
    /// one; for one a delivery report moved on without billing it (its
    /// body, which holds its category, unreadable then: the record of the
    /// send decided on it while queued, which knows the category, bills
    /// it); and for one stored before this field existed (billed then).
    /// Every later write keeps it, so whoever made that write, its answer
    /// lost, can tell later whether it landed, whatever was written over
    /// it since.
    #[serde(default)]
    pub accepted_by: u64,
    /// The settled status (delivered or read) its business was told ahead
    /// of the report owed on it: a delivery report is told at once while
    /// devices of the recipient are still being sent the message, and the
    /// report that comes due once none is left, its status still this one,
    /// is not made again (see [`told_already`](Self::told_already)). `None`
    /// otherwise, and on a message stored before this field existed.
    /// Every later write keeps it: a status that moves on is told anew.
    #[serde(default)]
    pub told: Option<Status>,
}

impl Delivery {
    /// What [`Op::FailExpired`](super::Op::FailExpired) makes of an open
    /// message's delivery state: failed as expired, with nothing due and
    /// no device pending.
    pub fn failed_expired(self) -> Self {
        Self {
            status: Status::Failed,
            failure: Some(FailureReason::Expired),
            next_attempt: None,
            pending_devices: 0,
            overdue_at: None,
            ..self
        }
    }

    /// Whether its business was told its status already (see
    /// [`told`](Self::told)): a report due on it has nothing to tell.
    pub fn told_already(&self) -> bool {
        self.told == Some(self.status)
    }

    /// The bit of device `device` in [`pending_devices`](Self::pending_devices).
    pub const fn device_bit(device: u32) -> u64 {
        1 << if device < 63 { device } else { 63 }
    }
}

impl Delivery {
    /// A fresh message: queued, due at `now`.
    pub fn queued(now: Timestamp) -> Self {
        Self {
            status: Status::Queued,
            failure: None,
            attempts: 0,
            next_attempt: Some(now),
            pending_devices: 0,
            overdue_at: None,
            accepted_by: 0,
            told: None,
        }
    }
}

/// A stored message: its index fields in clear, everything else sealed.
///
/// The sealed envelope holds the content and the consumer's phone number (an
/// outbound message must be sent again after a restart); the store sees only
/// the number's keyed hash.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// The business it belongs to.
    pub business: BusinessId,
    /// Its id (also the envelope's record id).
    pub id: MessageId,
    /// Which way it travels.
    pub direction: Direction,
    /// The consumer, as the phone index knows them.
    pub phone: PhoneHash,
    /// When it was stored.
    pub created: Timestamp,
    /// When its retention ends.
    pub expiry: Timestamp,
    /// The epoch whose key seals it.
    pub epoch: Epoch,
    /// Delivery bookkeeping.
    pub delivery: Delivery,
    /// The sealed envelope.
    pub sealed: Vec<u8>,
}

impl fmt::Debug for MessageRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRecord")
            .field("business", &self.business)
            .field("id", &self.id)
            .field("direction", &self.direction)
            .field("phone", &self.phone)
            .field("created", &self.created)
            .field("expiry", &self.expiry)
            .field("epoch", &self.epoch)
            .field("delivery", &self.delivery)
            .field("sealed_len", &self.sealed.len())
            .finish()
    }
}

/// A message the sweep deleted (always a settled one: open messages are
/// reported failed first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpiredMessage {
    /// The business.
    pub business: BusinessId,
    /// The message.
    pub id: MessageId,
    /// The consumer.
    pub phone: PhoneHash,
    /// Its expiry.
    pub expiry: Timestamp,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its direction.
    pub direction: Direction,
    /// Its status when deleted.
    pub status: Status,
    /// Whether its business was still to be told something of it (an
    /// attempt was due: its failure, or a status report): deleted past the
    /// sweep's grace all the same, and so never told.
    pub report_pending: bool,
}

impl From<&MessageRecord> for ExpiredMessage {
    fn from(m: &MessageRecord) -> Self {
        Self {
            business: m.business,
            id: m.id,
            phone: m.phone,
            expiry: m.expiry,
            epoch: m.epoch,
            direction: m.direction,
            status: m.delivery.status,
            report_pending: m.delivery.next_attempt.is_some() && !m.delivery.told_already(),
        }
    }
}

/// How much a store holds: for operators, tests and the gateway's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Census {
    /// Stored messages.
    pub messages: u64,
    /// Stored Signal peer records.
    pub peers: u64,
    /// Consumer–business pairs (distinct business and phone hash) with a
    /// message or a peer record. A consumer of two businesses counts twice:
    /// phone hashes are keyed per business, so no store can tell that two
    /// hashes are one consumer.
    pub phones: u64,
    /// Live epoch keys.
    pub epoch_keys: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_only_move_forward() {
        use Status::*;
        let all = [Queued, Sent, Delivered, Read, Failed];
        for from in all {
            for to in all {
                let expected = matches!(
                    (from, to),
                    (Queued, Sent | Delivered | Read | Failed)
                        | (Sent, Delivered | Read | Failed)
                        | (Delivered, Read)
                );
                assert_eq!(from.may_become(to), expected, "{from:?} -> {to:?}");
            }
            assert_eq!(Status::from_code(from.code()), Some(from));
        }
        assert_eq!(Status::from_code(9), None);
    }

    #[test]
    fn failure_reasons_round_trip_their_stored_codes() {
        use FailureReason::*;
        let all = [
            Expired,
            NoDevices,
            Refused,
            NoSession,
            Unreadable,
            TooManyDevices,
        ];
        for reason in all {
            assert_eq!(FailureReason::from_code(reason.code()), Some(reason));
        }
        let codes: Vec<u8> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6], "stored codes never change");
        assert_eq!(FailureReason::from_code(0), None);
        assert_eq!(FailureReason::from_code(7), None);
    }
}
