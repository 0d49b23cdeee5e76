//! Outbound: a business's message sealed and stored first, then encrypted
//! for each of its recipient's devices and handed to the transport, with
//! each attempt's outcome recorded on the stored delivery state.

use std::collections::HashSet;
use std::sync::Mutex;

use foldhash::fast::RandomState;
use tracing::{Instrument, debug, debug_span, warn};
use zeroize::Zeroizing;

use super::claims::{Accepted, AttemptMade, Owed, Owing, acceptance_token};
use super::payload::{OutboundBody, StoredBody, device_payload};
use super::records::Stored;
use super::{MAX_STATUS_RACES, Processor, ProcessorError, due_by};
use crate::envelope::{Envelope, MAX_PLAINTEXT_LEN};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use crate::integrity::Category;
use crate::signal::SignalError;
use crate::store::{
    Batch, Delivery, Direction, FailureReason, MessageRecord, Op, PeerId, Status, StoreError,
};
use crate::time::Timestamp;
use crate::transport::{Outgoing, Principal, StatusUpdate, TransportError};
use crate::visibility::{DataClass, Denied, Gate, Labelled, Party, Purpose, Revision};

/// A business's message to a consumer.
#[derive(Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The recipient.
    pub to: PhoneNumber,
    /// The content; wiped from memory when dropped.
    pub content: Zeroizing<Vec<u8>>,
    /// The billing category.
    pub category: Category,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("to", &self.to)
            .field("content_len", &self.content.len())
            .field("category", &self.category)
            .finish()
    }
}

/// The devices an attempt on an outbound message has settled so far: sent
/// to, or given up on for good (no session can be had, the network refused
/// it). The rest of `listed` still need the message.
#[derive(Default)]
struct Reached {
    listed: u64,
    settled: u64,
    /// Devices listed that share the last bit (63 and above) and are not
    /// settled: the bit stays pending while any of them needs the message.
    shared_unsettled: u32,
    sent: u32,
}

/// The bit devices 63 and above share in [`Delivery::pending_devices`].
const SHARED_BIT: u64 = Delivery::device_bit(63);

impl Reached {
    /// The devices of pending bits `bits` are listed for this attempt.
    fn list(&mut self, bits: impl Iterator<Item = u64>) {
        for bit in bits {
            self.listed |= bit;
            self.shared_unsettled += u32::from(bit == SHARED_BIT);
        }
    }

    /// A device, of pending bit `bit`, is settled.
    fn settle(&mut self, bit: u64) {
        if bit == SHARED_BIT {
            self.shared_unsettled = self.shared_unsettled.saturating_sub(1);
        } else {
            self.settled |= bit;
        }
    }

    /// The devices that still need the message (all of those sharing the
    /// last bit while any of them does: one that has it may get it again,
    /// which its payload's message id lets it recognise, but none is left
    /// without it).
    fn pending(&self) -> u64 {
        let shared = if self.shared_unsettled > 0 {
            SHARED_BIT
        } else {
            0
        };
        (self.listed & !self.settled & !SHARED_BIT) | (self.listed & shared)
    }
}

/// An attempt sending a message to its recipient's devices. Dropped before
/// it is done (its caller's future dropped at an await) after it reached a
/// device, it leaves what it reached owed ([`Owed::Attempt`]), to be
/// recorded as a finished attempt would have: the next attempt sends to
/// the devices left, and a device that has the message does not get it
/// again.
struct Sending<'a> {
    processor: &'a Processor,
    record: &'a MessageRecord,
    category: Category,
    reached: Reached,
    /// Whether it sends to every device, the message's report overdue.
    overdue: bool,
    /// Set once the attempt's outcome is in hand, to be recorded.
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        let reached = &self.reached;
        if self.done || reached.sent == 0 {
            return;
        }
        let (p, record) = (self.processor, self.record);
        let made = AttemptMade {
            on: record.delivery,
            phone: record.phone,
            category: self.category,
            outcome: DeviceOutcome::Reached {
                sent: reached.sent,
                pending: reached.pending(),
            },
            at: p.clock.now(),
            created: record.created,
            expiry: record.expiry,
            token: acceptance_token(),
            from_queued: record.delivery.status == Status::Queued,
            overdue: self.overdue,
        };
        p.claims
            .owe((record.business, record.id), Owed::Attempt(made), false);
    }
}

/// The outcome of one attempt to send an outbound message to devices.
#[derive(Debug, Clone, Copy)]
pub(super) enum DeviceOutcome {
    /// Sent to `sent` devices; the `pending` ones failed for now.
    Reached { sent: u32, pending: u64 },
    /// The device list could not be had: try again later.
    Unreachable,
    /// No device can be reached, for this reason.
    Fail(FailureReason),
}

/// The most devices a consumer may have: a longer list from the transport
/// (distinct ids) fails the message as [`FailureReason::TooManyDevices`]
/// rather than costing a bundle fetch, a stored session and a send for
/// each. WhatsApp gives a consumer a phone and a few linked devices.
pub const MAX_DEVICES: usize = 64;

/// The longest content [`Processor::send`] takes, in bytes: what an
/// envelope seals (`envelope::MAX_PLAINTEXT_LEN`, 64 MiB), less room for
/// the stored body's header and recipient. Longer content is refused as
/// [`ProcessorError::Invalid`] before anything is stored.
pub const MAX_CONTENT_LEN: usize = MAX_PLAINTEXT_LEN - 64;

/// The longest idempotency key [`Processor::send_idempotent`] takes, in
/// bytes: room for any UUID or request id in text.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

impl Processor {
    /// Send a business's message: sealed and stored first, then sent to
    /// every device of the recipient. Returns its id once it is stored;
    /// delivery continues (and is retried) from there, whatever the first
    /// attempt met. A store that fails the write storing it is asked
    /// whether the write landed (its answer may have been lost): if so, the
    /// message is accepted. An error means the message was not stored,
    /// unless the store could not answer that question either: a message
    /// stored then is sent and reported like any other (its id is in its
    /// status reports). Content longer than [`MAX_CONTENT_LEN`] is refused
    /// as [`ProcessorError::Invalid`].
    ///
    /// The business's own retries (after a timeout, a crash, or this
    /// error) send the message again: [`send_idempotent`](Self::send_idempotent)
    /// makes them safe.
    pub async fn send(
        &self,
        principal: &Principal,
        business: BusinessId,
        outbound: Outbound,
    ) -> Result<MessageId, ProcessorError> {
        let span = debug_span!("send", %business);
        self.send_in(principal, business, outbound, None)
            .instrument(span)
            .await
    }

    /// [`send`](Self::send), named by `key`, a value the business chooses
    /// once per message (a UUID, say; 1 to [`MAX_IDEMPOTENCY_KEY_LEN`]
    /// bytes): however often it is called again with the same key, after
    /// whatever failure or crash on either side, the consumer gets the
    /// message once.
    ///
    /// The message's id is derived from the key, under a secret of the
    /// business. A call whose message is stored already returns its id and
    /// sends nothing (delivery carries on from where it was, or, if the call
    /// that stored it stopped before its first attempt, starts now); one whose
    /// content, recipient or category differs from the stored message's is
    /// refused as [`ProcessorError::Invalid`], unless the stored content can
    /// no longer be read (past its retention): then the recipient alone is
    /// compared. A call while another with the same key has not stored its
    /// message yet is refused as [`ProcessorError::SendUnderWay`]. A key is
    /// remembered as long as its message is stored: used again after the
    /// sweep deleted it, it sends a message again under the same id, which
    /// a device that has the first drops as a copy (and reports
    /// delivered). So a retry made after retention still reaches the
    /// consumer once; but a key used again for another message never
    /// reaches a device that kept the first. Never reuse a key.
    pub async fn send_idempotent(
        &self,
        principal: &Principal,
        business: BusinessId,
        key: &[u8],
        outbound: Outbound,
    ) -> Result<MessageId, ProcessorError> {
        let span = debug_span!("send", %business, idempotent = true);
        self.send_in(principal, business, outbound, Some(key))
            .instrument(span)
            .await
    }

    async fn send_in(
        &self,
        principal: &Principal,
        business: BusinessId,
        outbound: Outbound,
        key: Option<&[u8]>,
    ) -> Result<MessageId, ProcessorError> {
        self.authorize(principal, business)?;
        if outbound.content.len() > MAX_CONTENT_LEN {
            return Err(ProcessorError::Invalid("content too large"));
        }
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN) {
            return Err(ProcessorError::Invalid("idempotency key empty or too long"));
        }
        let now = self.clock.now();
        let (expiry, admitted) = self.admit(business, Direction::Outbound, now)?;
        let phone = self.keys.phone_hash(business, &outbound.to).await?;
        let body = OutboundBody {
            to: outbound.to,
            category: outbound.category,
            content: outbound.content,
        };
        // The claim keeps the retransmission loop off the message (due at
        // once) until this first attempt is done.
        let (id, _claim) = match key {
            // A fresh id: the claim is ours.
            None => {
                let id = MessageId::random();
                (id, self.claims.claim(business, id))
            }
            Some(key) => {
                let id = self.keys.send_id(business, key).await?;
                let claim = self.take_up(business, id).await?;
                if let Some(stored) = self.storage.message(business, id).await? {
                    self.resume_send(&stored, claim.is_some(), phone, &body, now)
                        .await?;
                    return Ok(id);
                }
                if claim.is_none() {
                    return Err(ProcessorError::SendUnderWay);
                }
                (id, claim)
            }
        };
        let mut record = self
            .seal_record(
                business,
                id,
                Direction::Outbound,
                phone,
                now,
                expiry,
                &Zeroizing::new(body.encode()),
            )
            .await?;
        let sealed = std::mem::take(&mut record.sealed);
        // The seal's random nonce tells this call's write from another's
        // under the same id, should the store answer with an error.
        let nonce = |sealed: &[u8]| Envelope::parse(sealed).ok().map(|e| *e.header().nonce());
        let ours = key.and_then(|_| nonce(&sealed));
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(MessageRecord {
            sealed,
            ..record.clone()
        })));
        // Owed for the integrity signals if this call stops from here on
        // before it counts: its write may have landed, and the message
        // would then be sent by the retransmission loop uncounted (a
        // business could dodge the fan-out detector by hanging up at once).
        let mut uncounted = Owing::new(
            &self.claims,
            (business, id),
            Owed::CountSent { phone, at: now },
            false,
        );
        let committed = self.sessions.commit(batch).await;
        drop(admitted);
        if let Err(e) = committed {
            // The write may have landed with its answer lost (a networked
            // store): if the store now has the message, it is accepted as
            // if the commit had answered. Refused, it would be sent twice,
            // once again by the business.
            let stored = match self.storage.message(business, id).await {
                Ok(Some(stored)) => stored,
                Ok(None) => {
                    uncounted.owed = None;
                    return Err(e.into());
                }
                // Unknown: still owed, made if the message is stored.
                Err(_) => return Err(e.into()),
            };
            uncounted.owed = None;
            warn!(%business, %id, error = %e, "the store failed the write storing the message, but has it: accepted");
            if key.is_some() {
                // Under a key, it may be another call's (one whose write
                // landed after this call looked, counted by that call):
                // checked and taken up as any message found under its key,
                // never sent as this one.
                if ours.is_some() && nonce(&stored.sealed) == ours {
                    self.integrity.record_sent(business, phone, now);
                }
                self.resume_send(&stored, true, phone, &body, now).await?;
                return Ok(id);
            }
        }
        uncounted.owed = None;
        self.integrity.record_sent(business, phone, now);
        debug!(%id, "outbound message stored");
        // Stored, the message is accepted: an error of its first attempt
        // (the store failing its bookkeeping) leaves it to the
        // retransmission loop, which makes the write owed first. Refused
        // now, it would be sent again by the business as well.
        if let Err(e) = self
            .attempt_outbound(&record, &body, Purpose::Delivery)
            .await
        {
            warn!(%business, %id, error = %e, "the first attempt failed; the message is due for another");
        }
        Ok(id)
    }

    /// Take up `stored`, the message found under a send's idempotency key,
    /// once checked to be this send's (see [`same_send`](Self::same_send)):
    /// if the call that stored it stopped before its first attempt, and
    /// this one holds its claim (`claimed`), the attempt is made now, as
    /// that call would have.
    async fn resume_send(
        &self,
        stored: &MessageRecord,
        claimed: bool,
        phone: PhoneHash,
        body: &OutboundBody,
        now: Timestamp,
    ) -> Result<(), ProcessorError> {
        let (business, id) = (stored.business, stored.id);
        let stored_body = self.same_send(stored, phone, body, now).await?;
        debug!(%id, "a send under a key used before: its message is stored");
        let d = stored.delivery;
        if claimed
            && let Some(stored_body) = stored_body
            && d.status == Status::Queued
            && d.attempts == 0
        {
            // Leased first, as the retransmission loop's attempts are: it
            // may have been due already, and another processor may have
            // taken the store over since it was stored.
            let attempt = async {
                match self.lease(stored.clone(), now).await? {
                    Some(leased) => {
                        self.attempt_outbound(&leased, &stored_body, Purpose::Delivery)
                            .await
                    }
                    None => Ok(0),
                }
            };
            if let Err(e) = attempt.await {
                warn!(%business, %id, error = %e, "the first attempt failed; the message is due for another");
            }
        }
        Ok(())
    }

    /// Check that `stored`, found under the id of a send's idempotency key,
    /// is the message of this send (`body`, to the consumer hashed to
    /// `phone`); if not, the key was used for another. Returns its body if
    /// retention lets it be read at `now` and it can be.
    async fn same_send(
        &self,
        stored: &MessageRecord,
        phone: PhoneHash,
        body: &OutboundBody,
        now: Timestamp,
    ) -> Result<Option<OutboundBody>, ProcessorError> {
        let other = || ProcessorError::Invalid("the idempotency key was used for another message");
        if stored.direction != Direction::Outbound || stored.phone != phone {
            return Err(other());
        }
        if !self.retention.readable(stored, now) {
            return Ok(None);
        }
        match self.due_body(stored).await? {
            Stored::Content(StoredBody::Outbound(stored_body)) => {
                let same = stored_body.to == body.to
                    && stored_body.category == body.category
                    && stored_body.content == body.content;
                if same {
                    Ok(Some(stored_body))
                } else {
                    Err(other())
                }
            }
            Stored::Content(StoredBody::Inbound(_)) => Err(other()),
            // Its content can no longer be compared: the recipient was.
            Stored::Expired | Stored::Unreadable => Ok(None),
        }
    }

    /// Encrypt and send an outbound message to the devices of its recipient
    /// that still need it (all of them, unless an earlier attempt left some
    /// pending); record the outcome. The caller holds the message's claim.
    /// Returns how many devices the transport took it for.
    pub(super) async fn attempt_outbound(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        purpose: Purpose,
    ) -> Result<u32, ProcessorError> {
        let (business, id) = (record.business, record.id);
        let decided_on = record.delivery;
        let overdue = decided_on.status == Status::Sent
            && (decided_on.pending_devices == 0
                || decided_on
                    .overdue_at
                    .is_some_and(|at| at <= self.clock.now()));
        let only =
            (decided_on.pending_devices != 0 && !overdue).then_some(decided_on.pending_devices);
        let mut sending = Sending {
            processor: self,
            record,
            category: body.category,
            reached: Reached::default(),
            overdue,
            done: false,
        };
        let outcome = self
            .send_to_devices(record, body, only, None, purpose, &mut sending.reached)
            .await;
        // Done: the outcome is recorded below (and owed if that fails).
        sending.done = true;
        let took = match outcome {
            DeviceOutcome::Reached { sent, .. } => sent,
            DeviceOutcome::Unreachable | DeviceOutcome::Fail(_) => 0,
        };
        let made = AttemptMade {
            on: decided_on,
            phone: record.phone,
            category: body.category,
            outcome,
            at: self.clock.now(),
            created: record.created,
            expiry: record.expiry,
            token: acceptance_token(),
            from_queued: decided_on.status == Status::Queued,
            overdue,
        };
        let Some(next) = self.record_attempt(business, id, made, false).await? else {
            // Deleted meanwhile: nothing left to record.
            return Ok(took);
        };
        // A settled status whose report is due is told now: this attempt's,
        // or one a delivery report wrote meanwhile and left to this attempt
        // (see `status_update`; the write above saw it, or failed and took
        // it in). One written after that write is told by the
        // retransmission loop.
        if !next.status.is_open() && next.next_attempt.is_some() && next.pending_devices == 0 {
            self.report_status(business, id, record.phone, Direction::Outbound, next)
                .await?;
        } else if matches!(next.status, Status::Delivered | Status::Read)
            && next.pending_devices != 0
            && !next.told_already()
        {
            // Devices still to be sent it: its business is told the status
            // ahead of them (a report that came while this attempt held
            // the message, or whose telling the business refused).
            self.tell_ahead(business, id, next, next.next_attempt)
                .await?;
        }
        Ok(took)
    }

    /// Record what an attempt on outbound message `id` reached on its
    /// stored delivery state, conditionally: a delivery report may have
    /// moved the status forward meanwhile, and the outcome is then recorded
    /// on what it left. The first record that the transport took a message
    /// (moving it on from queued, or recording on a report that moved it
    /// on unbilled) bills it and counts it taken, and, if it is sent, tells
    /// its business so. Should the store fail, or this
    /// future be dropped, before the record is made, it is owed, and made
    /// before the message is next taken up (`first`, before what else is
    /// owed: it is being paid). Returns the state recorded; `None` if the
    /// message is gone.
    pub(super) async fn record_attempt(
        &self,
        business: BusinessId,
        id: MessageId,
        mut made: AttemptMade,
        first: bool,
    ) -> Result<Option<Delivery>, ProcessorError> {
        let mut races = 0;
        loop {
            let current = made.on;
            let mut next =
                self.after_send(current, made.outcome, made.at, made.created, made.overdue);
            next = due_by(next, made.expiry, made.at);
            // The first record of what the transport took, of an attempt
            // decided on a queued message, bills it: moving it on from
            // queued, or after a delivery report that moved it on unbilled
            // (its body unreadable then; this attempt read it).
            let moves_on = current.accepted_by == 0
                && made.from_queued
                && matches!(next.status, Status::Sent | Status::Delivered | Status::Read);
            if moves_on {
                next.accepted_by = made.token;
            }
            let accepted = moves_on.then_some(Accepted {
                phone: made.phone,
                at: made.at,
                next,
            });
            let mut batch = Batch::from(Op::UpdateDelivery {
                business,
                id,
                expected: current,
                delivery: next,
            });
            if moves_on {
                batch.push(self.bill(business, made.category, made.at));
            }
            let mut owing = Owing::new(&self.claims, (business, id), Owed::Attempt(made), first);
            let written = self.commit_batch(batch).await?;
            if !written {
                races += 1;
                // A delivery report dropped after its write landed may owe
                // the message the move on from queued that this write lost
                // to: made (and counted) now, before this record is made
                // again on the state it left.
                self.pay_owed(business, id).await?;
            }
            // The state it left, if it landed.
            let landed = if written {
                Some(next)
            } else {
                match self.storage.message(business, id).await? {
                    // Deleted meanwhile: nothing left to record.
                    None => {
                        owing.owed = None;
                        return Ok(None);
                    }
                    // Made before, its answer lost (an owed record, paid),
                    // and perhaps written over since: a move on from
                    // queued is known by its token, which later writes keep.
                    Some(stored)
                        if stored.delivery == next
                            || accepted.is_some_and(|a| a.landed_in(&stored.delivery)) =>
                    {
                        Some(stored.delivery)
                    }
                    Some(stored) if races < MAX_STATUS_RACES => {
                        made.on = stored.delivery;
                        None
                    }
                    Some(_) => return Err(StoreError::Conflict.into()),
                }
            };
            owing.owed = None;
            if let Some(left) = landed {
                // Told sent only if nothing moved the message on since.
                if let Some(accepted) = accepted {
                    let accepted = Accepted {
                        next: left,
                        ..accepted
                    };
                    self.on_accepted(business, id, accepted).await;
                }
                return Ok(Some(next));
            }
        }
    }

    /// The write that bills a message of `business` of `category` taken by
    /// the transport at `at`: made in the batch of the conditional write
    /// that sets the message's [`Delivery::accepted_by`], so it is counted
    /// exactly once, and durably.
    pub(super) fn bill(&self, business: BusinessId, category: Category, at: Timestamp) -> Op {
        let period = self.billing.of(at);
        Op::Bill {
            business,
            start: period.start,
            end: period.end,
            category,
        }
    }

    /// Count an outbound message of `business` to `phone` as taken by the
    /// transport at `now`, in the statistics (its bill is written with the
    /// write). Called once, after whichever write bills it (a send's
    /// bookkeeping, or a delivery report that came first).
    pub(super) fn accepted(&self, business: BusinessId, phone: PhoneHash, now: Timestamp) {
        self.statistics.record_message(
            business,
            phone,
            Direction::Outbound,
            crate::integrity::Status::Sent,
            now,
        );
    }

    /// What follows a write billing message `id`: it is counted taken, and
    /// (after a send's bookkeeping that left it sent) its business told it
    /// is sent.
    pub(super) async fn on_accepted(
        &self,
        business: BusinessId,
        id: MessageId,
        accepted: Accepted,
    ) {
        self.accepted(business, accepted.phone, accepted.at);
        if accepted.next.status != Status::Sent {
            return;
        }
        let update = sent_report(business, id, accepted.at);
        // Missed by a hung endpoint: the retransmission loop makes it.
        if !self.notify(&update).await {
            self.missed_sent(business, id, accepted.at);
        }
    }

    /// The bookkeeping after sending to devices, for a message stored at
    /// `created` whose stored delivery state is `current`; `overdue`: the
    /// attempt was a sent message's resend to every device, its report
    /// overdue.
    fn after_send(
        &self,
        current: Delivery,
        outcome: DeviceOutcome,
        now: Timestamp,
        created: Timestamp,
        overdue: bool,
    ) -> Delivery {
        let attempts = current.attempts.saturating_add(1);
        let retry = now.saturating_add(self.delivery.backoff(current.attempts));
        // When it is next sent to every device, its report overdue (see
        // `DeliveryConfig::receipt_timeout`). Sent for the first time, the
        // receipt timeout on; sent again to every device, as long as it has
        // lived. A retry of pending devices alone keeps the time set before
        // while devices stay pending, and once none is, waits at least the
        // receipt timeout from their send.
        let fresh = now.saturating_add(if overdue {
            self.delivery
                .receipt_wait(now.saturating_duration_since(created))
        } else {
            self.delivery.receipt_timeout
        });
        let set = match current {
            Delivery {
                status: Status::Sent,
                overdue_at: Some(at),
                pending_devices,
                ..
            } if pending_devices != 0 => Some(at),
            _ => None,
        };
        let kept = set.filter(|_| !overdue);
        let once_settled = kept.map_or(fresh, |at| at.max(fresh));
        // A sent message left with devices pending retries them, and is
        // sent to every device when `resend` is due, whichever comes
        // first (after a backoff, if that resend is due already: it reached
        // no device).
        let pending_left = |next: Delivery, pending: u64, resend: Timestamp| {
            if next.status == Status::Sent && pending != 0 {
                Delivery {
                    attempts,
                    next_attempt: Some(if resend > now {
                        retry.min(resend)
                    } else {
                        retry
                    }),
                    pending_devices: pending,
                    overdue_at: Some(resend),
                    ..next
                }
            } else {
                Delivery {
                    attempts,
                    next_attempt: Some(retry),
                    pending_devices: pending,
                    overdue_at: None,
                    ..next
                }
            }
        };
        match outcome {
            // Settled meanwhile with no device left to send to: nothing to
            // try again, only its report (if not yet made) is due.
            DeviceOutcome::Unreachable
                if !current.status.is_open() && current.pending_devices == 0 =>
            {
                self.settle_after_send(current, attempts, now, once_settled)
            }
            // Nothing reachable now: try the same again later.
            DeviceOutcome::Unreachable => {
                pending_left(current, current.pending_devices, set.unwrap_or(fresh))
            }
            // Never reached anyone, and no one can be reached: failed.
            DeviceOutcome::Fail(reason) if current.status == Status::Queued => Delivery {
                status: Status::Failed,
                failure: Some(reason),
                attempts,
                next_attempt: Some(now),
                pending_devices: 0,
                overdue_at: None,
                ..current
            },
            // Some devices have it; the rest cannot be reached: stop trying them.
            DeviceOutcome::Fail(_) => self.settle_after_send(current, attempts, now, once_settled),
            DeviceOutcome::Reached { sent, pending } => {
                let mut next = current;
                if sent > 0 && current.status == Status::Queued {
                    next.status = Status::Sent;
                }
                if pending != 0 {
                    pending_left(next, pending, kept.unwrap_or(fresh))
                } else {
                    self.settle_after_send(next, attempts, now, once_settled)
                }
            }
        }
    }

    /// Bookkeeping once every device that can be reached has the message:
    /// an open message waits for its delivery report until `due` (and is
    /// sent again if none comes); a delivered one has its status reported,
    /// unless that was done meanwhile (nothing was due).
    pub(super) fn settle_after_send(
        &self,
        current: Delivery,
        attempts: u32,
        now: Timestamp,
        due: Timestamp,
    ) -> Delivery {
        let next_attempt = if current.status.is_open() {
            Some(due)
        } else {
            current.next_attempt.map(|_| now)
        };
        Delivery {
            attempts,
            next_attempt,
            pending_devices: 0,
            overdue_at: None,
            ..current
        }
    }

    /// Send `record`, settled (another device reported it), once more to
    /// `device` alone: a retry receipt's device, given a new session. No
    /// record is made of it. `Ok(true)`: the transport took it;
    /// `Ok(false)`: the device cannot be sent it (gone from the list, the
    /// network refused it, no session can be had); an error: it could not
    /// be sent now (the receipt is to be handed in again).
    pub(super) async fn resend_to_device(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        device: u32,
    ) -> Result<bool, TransportError> {
        let only = Some(Delivery::device_bit(device));
        let mut reached = Reached::default();
        let outcome = self
            .send_to_devices(
                record,
                body,
                only,
                Some(device),
                Purpose::Retransmission,
                &mut reached,
            )
            .await;
        match outcome {
            DeviceOutcome::Reached { sent, .. } if sent > 0 => Ok(true),
            DeviceOutcome::Reached { pending: 0, .. } | DeviceOutcome::Fail(_) => Ok(false),
            DeviceOutcome::Reached { .. } | DeviceOutcome::Unreachable => Err(
                TransportError::Unavailable("the device could not be sent the message now".into()),
            ),
        }
    }

    /// Send `record` to the devices of its recipient (those in `only`, if
    /// given, and of them `exact` alone, if given: devices from 63 up share
    /// one bit), noting in `reached` each device as it is settled for this
    /// attempt (see [`Sending`]).
    async fn send_to_devices(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        only: Option<u64>,
        exact: Option<u32>,
        purpose: Purpose,
        reached: &mut Reached,
    ) -> DeviceOutcome {
        let business = record.business;
        let mut number = match NumberOut::release(&self.gate, business, &body.to, purpose) {
            Ok(number) => number,
            // Not recorded, whatever the policy said: tried again.
            Err(denied) if denied.audit_error().is_some() => {
                return DeviceOutcome::Unreachable;
            }
            Err(_) => {
                warn!(%business, id = %record.id, "visibility policy refused the number to the transport");
                return DeviceOutcome::Fail(FailureReason::Refused);
            }
        };
        let devices = match self.transport.devices(business, &number.number).await {
            Ok(devices) if devices.is_empty() => {
                return DeviceOutcome::Fail(FailureReason::NoDevices);
            }
            Ok(mut devices) => {
                // Each device once, however often the network lists it.
                devices.sort_unstable();
                devices.dedup();
                if devices.len() > MAX_DEVICES {
                    warn!(%business, id = %record.id, devices = devices.len(), "the transport listed more devices than a consumer may have");
                    return DeviceOutcome::Fail(FailureReason::TooManyDevices);
                }
                devices
            }
            Err(TransportError::Refused(_)) => return DeviceOutcome::Fail(FailureReason::Refused),
            Err(_) => return DeviceOutcome::Unreachable,
        };
        // A message no device has yet is left, by its last attempt, the
        // devices to try next: those it could not reach and every one it
        // did not try (linked since, say), not those it gave up on (see
        // the end).
        let queued = record.delivery.status == Status::Queued;
        // The devices this attempt is for: all, or those left by the last.
        let wanted = devices
            .iter()
            .map(|&device| (device, Delivery::device_bit(device)))
            .filter(|&(device, bit)| {
                only.is_none_or(|mask| mask & bit != 0) && exact.is_none_or(|e| e == device)
            });
        // Sent again to every device, its report overdue: the devices had
        // it (as far as the record tells), so once a report says the
        // consumer has it, no more of them are sent it again, and none whose
        // copy fails now is left pending (a report would not drop it: it
        // would be sent the message after the report). They are all sent it
        // again with the next overdue resend, unless a report comes first;
        // if none took it now, the resend is made again after a backoff. (A
        // device linked since the message was sent never had it, but is
        // not told apart: with a report in first, it does not get it.)
        // Those its record left pending never had it: they are sent it
        // whatever a report says, and left pending if their copy fails.
        let again = !queued && only.is_none();
        let lacking = if again {
            record.delivery.pending_devices
        } else {
            u64::MAX
        };
        reached.list(
            wanted
                .clone()
                .map(|(_, bit)| bit)
                .filter(|bit| bit & lacking != 0),
        );
        let payload = Zeroizing::new(device_payload(record.id, &body.content));
        let (mut refused, mut missed) = (false, false);
        for (device, bit) in wanted {
            if again && bit & lacking == 0 && self.claims.reported(business, record.id) {
                reached.settle(bit);
                continue;
            }
            let peer = PeerId {
                phone: record.phone,
                device,
            };
            match self
                .ensure_session(business, peer, &mut number, record.expiry)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    reached.settle(bit);
                    continue;
                }
                // Pending: tried again later.
                Err(()) => {
                    missed = true;
                    continue;
                }
            }
            let ciphertext = match self
                .sessions
                .encrypt(business, peer, &payload, record.expiry)
                .await
            {
                Ok(c) => c,
                // Over the size limit in force, the device's record stays
                // so until the limit is raised or the messages it skipped
                // arrive: it is given up on, as one with no session is.
                Err(e @ SignalError::RecordTooLarge { .. }) => {
                    warn!(%business, id = %record.id, device, error = %e, "not sent to a device");
                    reached.settle(bit);
                    continue;
                }
                Err(e) => {
                    debug!(%business, id = %record.id, device, error = %e, "encrypt failed");
                    missed = true;
                    continue;
                }
            };
            let message = Outgoing {
                id: record.id,
                ciphertext,
            };
            // The policy changed while this attempt waited, and now keeps
            // the number from the network: the devices left wait for the
            // next attempt (which fails the message, if nothing reached it).
            let Some(number) = number.current() else {
                missed = true;
                break;
            };
            match self
                .transport
                .send(business, number, device, &message)
                .await
            {
                Ok(()) => {
                    reached.settle(bit);
                    reached.sent += 1;
                }
                Err(TransportError::Refused(_)) => {
                    refused = true;
                    reached.settle(bit);
                }
                Err(_) => missed = true,
            }
        }
        let (sent, pending) = (reached.sent, reached.pending());
        if again && sent == 0 && missed {
            return DeviceOutcome::Unreachable;
        }
        if sent == 0 && pending == 0 && (only.is_none() || queued) {
            // No device took it: the network refused some, and no session
            // could be had with the rest (on a retry of a message no
            // device has, the devices tried before were given up on so).
            return DeviceOutcome::Fail(if refused {
                FailureReason::Refused
            } else {
                FailureReason::NoSession
            });
        }
        // No device has it yet: every device this attempt did not try is
        // still to be tried (one it gave up on, for a bad bundle say, is
        // not: each bundle costs the device a one-time prekey; so neither is
        // the last bit once every device sharing it was given up on, at the
        // cost of one linked since that shares it).
        let pending = if queued && sent == 0 && exact.is_none() {
            pending | (only.unwrap_or(u64::MAX) & !reached.listed)
        } else {
            pending
        };
        DeviceOutcome::Reached { sent, pending }
    }

    /// Make sure `peer` has a session, starting one from its bundle if not.
    /// `Ok(false)`: the device cannot be reached (bad bundle, refused, its
    /// stored record unreadable for good); `Err(())`: try again later.
    async fn ensure_session(
        &self,
        business: BusinessId,
        peer: PeerId,
        number: &mut NumberOut<'_>,
        expiry: Timestamp,
    ) -> Result<bool, ()> {
        if let Some(reachable) = self.session_settles(business, peer).await? {
            return Ok(reachable);
        }
        // Each bundle costs the device a one-time prekey: while another send
        // is starting a session with it, this one leaves the device for
        // later, and goes over that session then. It does not wait: the
        // host may be calling back from that send's bundle request.
        let Some(_starting) = self.starting.begin(business, peer) else {
            return Err(());
        };
        if let Some(reachable) = self.session_settles(business, peer).await? {
            return Ok(reachable);
        }
        let number = number.current().ok_or(())?;
        let bundle = match self
            .transport
            .fetch_bundle(business, number, peer.device)
            .await
        {
            Ok(bundle) => bundle,
            Err(TransportError::Refused(_)) => return Ok(false),
            Err(_) => return Err(()),
        };
        match self
            .sessions
            .start_session(business, peer, &bundle, expiry)
            .await
        {
            Ok(_) => Ok(true),
            Err(SignalError::BadBundle(why)) => {
                warn!(%business, device = peer.device, why, "refused a bad prekey bundle");
                Ok(false)
            }
            // Another key than the one trusted, never taken from a bundle:
            // the device waits for its own message, or the business's trust.
            Err(SignalError::UntrustedIdentity { .. }) => Ok(false),
            Err(e @ SignalError::RecordTooLarge { .. }) => {
                warn!(%business, device = peer.device, error = %e, "no session started");
                Ok(false)
            }
            Err(_) => Err(()),
        }
    }

    /// Whether `peer`'s stored record settles its reachability:
    /// `Some(true)`, it has a session; `Some(false)`, the record can never
    /// be read (no attempt would read it: the device is given up on, as
    /// one whose record is over the size limit is, not tried again until
    /// the message expires); `None`, it has no session. `Err(())`: try
    /// again later.
    async fn session_settles(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<Option<bool>, ()> {
        match self.sessions.has_session(business, peer).await {
            Ok(true) => Ok(Some(true)),
            Ok(false) => Ok(None),
            Err(e) if e.record_unreadable() => {
                warn!(%business, device = peer.device, error = %e, "not sent to a device whose record is damaged");
                Ok(Some(false))
            }
            Err(_) => Err(()),
        }
    }
}

/// A consumer's number released to the transport for one attempt's
/// calls, released again whenever the policy in force has changed since:
/// each of them goes out under the table in force as it starts, not under
/// the one in force when the attempt began (the attempt waits on the
/// network between them, for up to [`MAX_DEVICES`] devices).
struct NumberOut<'a> {
    gate: &'a Gate,
    business: BusinessId,
    purpose: Purpose,
    number: PhoneNumber,
    /// The revision that released it; `None` once a newer one refused it.
    revision: Option<Revision>,
}

impl<'a> NumberOut<'a> {
    /// Release `number` of `business`'s consumer to the transport.
    fn release(
        gate: &'a Gate,
        business: BusinessId,
        number: &PhoneNumber,
        purpose: Purpose,
    ) -> Result<Self, Denied<PhoneNumber>> {
        let released = gate.release(
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, number.clone()),
            Party::Transport,
            purpose,
        )?;
        let revision = Some(released.decision().revision);
        Ok(Self {
            gate,
            business,
            purpose,
            number: released.into_value(),
            revision,
        })
    }

    /// The number, if the policy in force releases it: released again
    /// (and the decision recorded) if the policy changed since it last
    /// was; `None` once a newer policy refused it (or its release could not
    /// be recorded).
    fn current(&mut self) -> Option<&PhoneNumber> {
        let decided = self.revision?;
        if self.gate.revision() != decided {
            self.revision = match Self::release(
                self.gate,
                self.business,
                &self.number,
                self.purpose,
            ) {
                Ok(again) => again.revision,
                Err(denied) => {
                    match denied.audit_error() {
                        Some(e) => {
                            warn!(business = %self.business, error = %e, "the audit trail could not record the number's release under a policy put in force mid-attempt");
                        }
                        None => {
                            warn!(business = %self.business, "visibility policy put in force mid-attempt refused the number to the transport");
                        }
                    }
                    None
                }
            };
        }
        self.revision.map(|_| &self.number)
    }
}

/// The devices a send or a retry receipt is starting a session with
/// (fetching a bundle), so that those for one device at once fetch one
/// bundle between them. Entries last as long as the start.
#[derive(Debug, Default)]
pub(super) struct Starting(Mutex<HashSet<(BusinessId, PeerId), RandomState>>);

impl Starting {
    /// Note that a send starts a session with `peer`, unless another is.
    pub(super) fn begin(&self, business: BusinessId, peer: PeerId) -> Option<Started<'_>> {
        let key = (business, peer);
        // The guard is gone before a `Started` can be, whose drop locks.
        let inserted = self.lock().insert(key);
        inserted.then(|| Started {
            starting: self,
            key,
        })
    }

    // Nothing is left half-changed under this lock: a poisoned one is safe.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(BusinessId, PeerId), RandomState>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A start under way; the device is free again when it is dropped.
pub(super) struct Started<'s> {
    starting: &'s Starting,
    key: (BusinessId, PeerId),
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        self.starting.lock().remove(&self.key);
    }
}

/// The report that message `id` of `business` is sent, at `at`.
pub(super) fn sent_report(business: BusinessId, id: MessageId, at: Timestamp) -> StatusUpdate {
    StatusUpdate {
        business,
        id,
        status: Status::Sent,
        failure: None,
        at,
    }
}
