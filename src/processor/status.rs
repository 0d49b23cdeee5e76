//! Statuses: delivery reports from the transport, which only move a
//! message forward, and the settled statuses reported to businesses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use foldhash::fast::RandomState;
use tracing::{Instrument, debug, debug_span, warn};

use super::claims::{Accepted, acceptance_token};
use super::outbound::Started;
use super::payload::{OutboundBody, StoredBody};
use super::records::Stored;
use super::{MAX_STATUS_RACES, Processor, ProcessorError};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::integrity::Category;
use crate::signal::{PreKeyBundle, SignalError, StorageFailure};
use crate::store::{
    Batch, Delivery, Direction, FailureReason, MessageRecord, Op, PeerId, Status, StoreError,
};
use crate::time::Timestamp;
use crate::transport::{Principal, StatusUpdate, TransportError};
use crate::visibility::{DataClass, Labelled, Party, Purpose};

/// Every device pending: an attempt on a message with this
/// [`Delivery::pending_devices`] sends to every device listed (those
/// sharing the last bit included).
const ALL_DEVICES: u64 = u64::MAX;

/// Whether a status update or a retry receipt changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// The message moved to the new status (a retry receipt: the message
    /// was made due, or sent, for the device over a new session, started
    /// for it, or by a receipt for another message within the receipt
    /// timeout).
    Applied,
    /// Nothing changed: the update was stale or out of order (it would go
    /// backwards), or the retry receipt was a copy, for a message failed
    /// or past its retention, or its bundle was refused.
    Ignored,
}

/// Receipts ignored, by message and device, each until when.
type Ignored = HashMap<(BusinessId, MessageId, u32), Timestamp, RandomState>;

/// Receipts ignored until their device is let in again, by whose device
/// (its phone hash) they were.
type Waiting = Mutex<HashMap<(BusinessId, MessageId, u32), PhoneHash, RandomState>>;

/// Retry receipts acted on lately. By message and device, each with the
/// time until which another receipt of that device for that message is
/// ignored: for as long as a copy of one may follow it (the receipt
/// timeout), or, if its bundle was refused (another identity key), for the
/// message's life or until the business approves the device's new key,
/// since every bundle fetched before would cost the device a one-time
/// prekey and be refused again. And by device, when a receipt last
/// started it a new session: a receipt for another message sent on the old
/// one within the receipt timeout makes that message due on the new
/// session, fetching no bundle. In memory (a receipt after a restart is
/// acted on again). What no longer counts is dropped at every change and
/// every sweep ([`expire`](Self::expire)), and what is kept for a
/// message's life goes with the message ([`cap`](Self::cap)): the device
/// keys hold phone hashes, which outlive no retention.
pub(super) struct Receipts {
    window: Duration,
    ignore: Mutex<Ignored>,
    /// Of the receipts ignored, those whose bundle had another identity
    /// key, by whose device they were: an approval of that device's new
    /// key lets them in again. Locked after `ignore`.
    refused: Waiting,
    /// Of the receipts ignored, those whose new session would have made
    /// their device's record too large, by whose device they were: a
    /// message received from that device (which may use up the keys its
    /// record keeps for skipped messages) lets them in again. Locked after
    /// `ignore`.
    oversized: Waiting,
    /// The devices a receipt started a new session with lately. Locked
    /// after `ignore`, or alone.
    restarted: Mutex<HashMap<(BusinessId, PeerId), Restarted, RandomState>>,
}

/// A session a receipt started with a device.
#[derive(Debug, Clone)]
struct Restarted {
    /// When it was started: messages made before went over the session it
    /// replaced.
    at: Timestamp,
    /// When it no longer counts as started lately.
    until: Timestamp,
    /// The messages it is held for past the window, each until its expiry
    /// (see [`Receipts::hold_restart`]): `until` is the latest.
    held_for: Vec<(MessageId, Timestamp)>,
}

impl Receipts {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            window,
            ignore: Mutex::default(),
            refused: Mutex::default(),
            oversized: Mutex::default(),
            restarted: Mutex::default(),
        }
    }

    /// Forget what no longer counts at `now`.
    pub(super) fn expire(&self, now: Timestamp) {
        self.forget_past(&mut lock(&self.ignore), now);
    }

    /// Forget what no longer counts at `now`, `ignore` being this one's,
    /// locked: the receipts it ignores no longer, with the phone hashes of
    /// their devices, and the sessions no longer started lately.
    fn forget_past(&self, ignore: &mut Ignored, now: Timestamp) {
        ignore.retain(|_, until| now < *until);
        lock(&self.refused).retain(|key, _| ignore.contains_key(key));
        lock(&self.oversized).retain(|key, _| ignore.contains_key(key));
        lock(&self.restarted).retain(|_, r| now < r.until);
    }

    /// `peer`'s new identity key was approved: its receipts ignored for a
    /// bundle with that key count again, and no session it was started
    /// lately stands (the approval replaced it).
    pub(super) fn approved(&self, business: BusinessId, peer: PeerId) {
        self.let_in(&self.refused, business, peer);
        lock(&self.restarted).remove(&(business, peer));
    }

    /// A message from `peer` was received: its receipts ignored because
    /// its record was too large count again.
    pub(super) fn heard_from(&self, business: BusinessId, peer: PeerId) {
        if !lock(&self.oversized).is_empty() {
            self.let_in(&self.oversized, business, peer);
        }
    }

    /// The receipts of `peer` that `waiting` (`refused` or `oversized`)
    /// holds ignored count again.
    fn let_in(&self, waiting: &Waiting, business: BusinessId, peer: PeerId) {
        let mut ignore = lock(&self.ignore);
        lock(waiting).retain(|&(b, id, device), phone| {
            let theirs = b == business && device == peer.device && *phone == peer.phone;
            if theirs {
                ignore.remove(&(b, id, device));
            }
            !theirs
        });
    }

    /// Hear from `peer` (as [`heard_from`](Self::heard_from)), and approve
    /// it too if `approve` (as [`approved`](Self::approved)), when the
    /// guard is dropped, unless [`cancel`](Heard::cancel)led: a receive's
    /// write that may have landed lets the device's receipts in however
    /// its call ends.
    pub(super) fn hear_on_drop(
        &self,
        business: BusinessId,
        peer: PeerId,
        approve: bool,
    ) -> Heard<'_> {
        Heard {
            receipts: self,
            business,
            peer,
            approve,
        }
    }

    /// Note a receipt of `device` for `id` taken up at `now`, unless one is
    /// ignored then: copies are ignored for the window, or as [`Noted`]
    /// settles it.
    fn take(
        &self,
        business: BusinessId,
        id: MessageId,
        device: u32,
        now: Timestamp,
    ) -> Option<Noted<'_>> {
        let mut ignore = lock(&self.ignore);
        let key = (business, id, device);
        if ignore.get(&key).is_some_and(|&until| now < until) {
            return None;
        }
        self.forget_past(&mut ignore, now);
        ignore.insert(key, now.saturating_add(self.window));
        Some(Noted {
            receipts: self,
            key: Some(key),
        })
    }

    /// Whether a receipt started `peer` a new session within the window
    /// after a message made at `created` (which went over the session it
    /// replaced; one made in the same millisecond is taken to have).
    fn restarted_lately(
        &self,
        business: BusinessId,
        peer: PeerId,
        now: Timestamp,
        created: Timestamp,
    ) -> bool {
        lock(&self.restarted)
            .get(&(business, peer))
            .is_some_and(|r| now < r.until && created <= r.at)
    }

    /// A receipt started `peer` a new session at `now` (`sent` is `None`),
    /// or message `sent` went over the one it started: it counts as started
    /// lately for the window from now, and for as long as it is held for
    /// another message.
    fn restart(&self, business: BusinessId, peer: PeerId, now: Timestamp, sent: Option<MessageId>) {
        let mut restarted = lock(&self.restarted);
        restarted.retain(|_, r| now < r.until);
        let r = restarted.entry((business, peer)).or_insert(Restarted {
            at: now,
            until: now,
            held_for: Vec::new(),
        });
        if sent.is_none() {
            r.at = now;
        }
        r.held_for
            .retain(|&(id, until)| Some(id) != sent && now < until);
        let held = r.held_for.iter().map(|&(_, until)| until).max();
        r.until = held.unwrap_or(now).max(now.saturating_add(self.window));
    }

    /// [`restart`](Self::restart) `peer` at `now` (a new session), and hold
    /// it for settled message `held_for` until its expiry (as
    /// [`hold_restart`](Self::hold_restart)), when the guard is dropped
    /// once `committing` (the session's write began), unless
    /// [`cancel`](Restarting::cancel)led.
    fn restart_on_drop<'a>(
        &'a self,
        committing: &'a AtomicBool,
        business: BusinessId,
        peer: PeerId,
        now: Timestamp,
        held_for: Option<(MessageId, Timestamp)>,
    ) -> Restarting<'a> {
        Restarting {
            receipts: self,
            committing,
            business,
            peer,
            now,
            held_for,
        }
    }

    /// Message `id`, which a receipt asked for, is to be sent to `peer` at
    /// `now` over the session the receipt started: the session counts as
    /// started lately until `until` (the message's expiry) or until the
    /// message goes over it ([`restart`](Self::restart) with it), so that
    /// the receipt, handed in again because the send failed or its call
    /// was dropped, fetches no other bundle (each costs the device a
    /// one-time prekey).
    fn hold_restart(
        &self,
        id: (BusinessId, MessageId),
        peer: PeerId,
        now: Timestamp,
        until: Timestamp,
    ) {
        let (business, mut restarted) = (id.0, lock(&self.restarted));
        let held = restarted.entry((business, peer)).or_insert(Restarted {
            at: now,
            until: now,
            held_for: Vec::new(),
        });
        held.held_for.retain(|&(m, _)| m != id.1);
        held.held_for.push((id.1, until));
        held.until = held.until.max(until);
    }

    /// The messages something is kept for at `now`: a receipt ignored, or
    /// a session held.
    pub(super) fn kept_for_messages(&self, now: Timestamp) -> Vec<(BusinessId, MessageId)> {
        let mut kept: Vec<_> = lock(&self.ignore)
            .iter()
            .filter(|&(_, &until)| now < until)
            .map(|(&(business, id, _), _)| (business, id))
            .collect();
        let restarted = lock(&self.restarted);
        for (&(business, _), r) in restarted.iter() {
            kept.extend(r.held_for.iter().map(|&(id, _)| (business, id)));
        }
        kept.sort_unstable();
        kept.dedup();
        kept
    }

    /// Nothing is kept for a message past its stored expiry (`expiries`:
    /// `None` if it is gone), which a shortened retention may have brought
    /// forward: its receipts ignored are ignored no longer, and a session
    /// held for it is held for the other messages it is held for alone (or
    /// counts as started lately for the window alone).
    pub(super) fn cap(
        &self,
        expiries: &HashMap<(BusinessId, MessageId), Option<Timestamp>, RandomState>,
        now: Timestamp,
    ) {
        let ends = |business, id| expiries.get(&(business, id)).map(|e| e.unwrap_or(now));
        let mut ignore = lock(&self.ignore);
        for (&(business, id, _), until) in ignore.iter_mut() {
            if let Some(end) = ends(business, id) {
                *until = (*until).min(end);
            }
        }
        for (&(business, _), r) in lock(&self.restarted).iter_mut() {
            if r.held_for.is_empty() {
                continue;
            }
            for (id, until) in &mut r.held_for {
                if let Some(end) = ends(business, *id) {
                    *until = (*until).min(end);
                }
            }
            r.held_for.retain(|&(_, until)| now < until);
            let held = r.held_for.iter().map(|&(_, until)| until).max();
            let lately = r.at.saturating_add(self.window);
            r.until = r.until.min(held.unwrap_or(lately).max(lately));
        }
        self.forget_past(&mut ignore, now);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new session for a device, its write under way (see
/// [`Receipts::restart_on_drop`]).
struct Restarting<'a> {
    receipts: &'a Receipts,
    /// Set as the session's write begins: until then, nothing to note.
    committing: &'a AtomicBool,
    business: BusinessId,
    peer: PeerId,
    now: Timestamp,
    /// The settled message to be sent over it, and its expiry.
    held_for: Option<(MessageId, Timestamp)>,
}

impl Restarting<'_> {
    /// Note nothing: the session was not written.
    fn cancel(self) {
        std::mem::forget(self);
    }
}

impl Drop for Restarting<'_> {
    fn drop(&mut self) {
        if !self.committing.load(Ordering::Relaxed) {
            return;
        }
        self.receipts
            .restart(self.business, self.peer, self.now, None);
        if let Some((id, until)) = self.held_for {
            self.receipts
                .hold_restart((self.business, id), self.peer, self.now, until);
        }
    }
}

/// A message heard from a device, its write under way (see
/// [`Receipts::hear_on_drop`]).
pub(super) struct Heard<'a> {
    receipts: &'a Receipts,
    business: BusinessId,
    peer: PeerId,
    approve: bool,
}

impl Heard<'_> {
    /// Hear nothing: the message was not stored.
    pub(super) fn cancel(self) {
        std::mem::forget(self);
    }
}

impl Drop for Heard<'_> {
    fn drop(&mut self) {
        if self.approve {
            self.receipts.approved(self.business, self.peer);
        }
        self.receipts.heard_from(self.business, self.peer);
    }
}

/// A receipt noted as taken up: forgotten when dropped (it failed, or its
/// call was dropped: the network hands it in again) unless kept.
struct Noted<'a> {
    receipts: &'a Receipts,
    key: Option<(BusinessId, MessageId, u32)>,
}

impl Noted<'_> {
    /// Copies are ignored for the window.
    fn keep(mut self) {
        self.key = None;
    }

    /// Every receipt of the device for the message is ignored until `until`.
    fn keep_until(mut self, until: Timestamp) {
        if let Some(key) = self.key.take() {
            lock(&self.receipts.ignore).insert(key, until);
        }
    }

    /// Every receipt of the device of `phone` for the message is ignored
    /// until `until`, or until a message from it is received.
    fn oversized_until(self, until: Timestamp, phone: PhoneHash) {
        let waiting = &self.receipts.oversized;
        self.wait_in(waiting, until, phone);
    }

    /// Every receipt of the device of `phone` for the message is ignored
    /// until `until`, or until its new identity key is approved.
    fn refused_until(self, until: Timestamp, phone: PhoneHash) {
        let waiting = &self.receipts.refused;
        self.wait_in(waiting, until, phone);
    }

    /// Ignored until `until`, or until `waiting` lets the device of `phone`
    /// in again.
    fn wait_in(mut self, waiting: &Waiting, until: Timestamp, phone: PhoneHash) {
        if let Some(key) = self.key.take() {
            let mut ignore = lock(&self.receipts.ignore);
            ignore.insert(key, until);
            lock(waiting).insert(key, phone);
        }
    }
}

impl Drop for Noted<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&self.receipts.ignore).remove(&key);
        }
    }
}

/// The devices that still need a message once a device has it (a
/// delivery report or a retry receipt says one did): those its recorded
/// attempts left pending. On one still queued, no record says any device
/// took it: an attempt reached one unrecorded (a crash, a send dropped
/// before its bookkeeping, the transport's answer lost). Its last recorded
/// attempt left the devices to try (those it could not reach and every one
/// it did not list, see `send_to_devices`), which any later attempt took
/// its devices from; with no attempt recorded, that is every device. One
/// given up on (a bad bundle) is not among them: asked for its bundle
/// again, it would cost the device a one-time prekey to be given up on
/// again. A device that has the message drops the copy by its id.
fn still_pending(d: &Delivery) -> u64 {
    if d.status == Status::Queued && d.pending_devices == 0 {
        ALL_DEVICES
    } else {
        d.pending_devices
    }
}

fn stats_status(status: Status) -> crate::integrity::Status {
    match status {
        Status::Queued | Status::Sent => crate::integrity::Status::Sent,
        Status::Delivered => crate::integrity::Status::Delivered,
        Status::Read => crate::integrity::Status::Read,
        Status::Failed => crate::integrity::Status::Failed,
    }
}

impl Processor {
    /// The category of outbound `record`, from its sealed body; `None` if
    /// the body cannot be read.
    async fn category_of(
        &self,
        record: &MessageRecord,
    ) -> Result<Option<Category>, ProcessorError> {
        Ok(match self.open_message(record).await? {
            Stored::Content(plaintext) => OutboundBody::decode(&plaintext).ok().map(|b| b.category),
            Stored::Expired | Stored::Unreadable => None,
        })
    }

    /// Report a status to the business, best effort (settled statuses are
    /// reported reliably, see `report_status`). Returns whether its
    /// endpoint was asked (and answered, whatever it said): not if it is
    /// hung (see [`call_business`](Self::call_business)).
    pub(super) async fn notify(&self, update: &StatusUpdate) -> bool {
        let told = self.ask_business(update.business, update.id, self.sink.status(update));
        let Some(told) = told.await else {
            debug!(business = %update.business, id = %update.id, "business endpoint hung; status not told");
            return false;
        };
        if let Err(e) = told {
            debug!(business = %update.business, id = %update.id, error = %e, "status not delivered");
        }
        true
    }

    /// Tell `business` the status of its message `id` in `stored`, at
    /// `at`: whether its endpoint took it (not if it is hung, see
    /// [`call_business`](Self::call_business)).
    async fn tell_status(
        &self,
        business: BusinessId,
        id: MessageId,
        stored: Delivery,
        at: Timestamp,
    ) -> bool {
        let update = StatusUpdate {
            business,
            id,
            status: stored.status,
            failure: stored.failure,
            at,
        };
        match self
            .ask_business(business, id, self.sink.status(&update))
            .await
        {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                debug!(%business, %id, error = %e, "status not told");
                false
            }
            None => false,
        }
    }

    /// Tell the business the status (delivered or read) of one of its
    /// messages whose devices are still being sent it, `stored` under its
    /// claim, and record that it was told ([`Delivery::told`]), so that the
    /// report owed once no device is left is not made again, with the
    /// devices' next attempt due at `retry`. Should the business not take
    /// it, the message stays due as it was (the next attempt on those
    /// devices tells it again); should the record fail or this future be
    /// dropped, the record is owed, as every record of what the business
    /// was told is (see `commit_told`).
    pub(super) async fn tell_ahead(
        &self,
        business: BusinessId,
        id: MessageId,
        stored: Delivery,
        retry: Option<Timestamp>,
    ) -> Result<(), ProcessorError> {
        if !self
            .tell_status(business, id, stored, self.clock.now())
            .await
        {
            return Ok(());
        }
        let told = Op::UpdateDelivery {
            business,
            id,
            expected: stored,
            delivery: Delivery {
                told: Some(stored.status),
                next_attempt: retry,
                ..stored
            },
        };
        self.commit_told(business, id, told.into(), None, || {})
            .await?;
        Ok(())
    }

    /// Tell the business the settled status (delivered, read or failed) of
    /// one of its messages, whose stored bookkeeping is `stored`; once
    /// told, nothing is pending (devices not reached by then are not sent
    /// to any more). If it cannot be told, the report is due again after a
    /// backoff: a business always learns how its message ended. Returns
    /// whether it was told.
    pub(super) async fn report_status(
        &self,
        business: BusinessId,
        id: MessageId,
        phone: PhoneHash,
        direction: Direction,
        stored: Delivery,
    ) -> Result<bool, ProcessorError> {
        let at = self.clock.now();
        // Told already, while devices were still being sent it: the
        // report is settled without another call.
        let told = stored.told_already() || self.tell_status(business, id, stored, at).await;
        let next_attempt = if told {
            None
        } else {
            Some(at.saturating_add(self.delivery.backoff(stored.attempts)))
        };
        let next = Delivery {
            next_attempt,
            attempts: stored.attempts.saturating_add(u32::from(!told)),
            pending_devices: 0,
            ..stored
        };
        // If it changed meanwhile (a newer status, a device left to retry),
        // what changed it decides what is reported next.
        let written = if told {
            let reported = Op::UpdateDelivery {
                business,
                id,
                expected: stored,
                delivery: next,
            };
            // A failure told is counted once: not when the told write lost
            // a race (what changed the message reports it, and counts), but
            // when it failed or the call was dropped (it is owed, and lands
            // before the message is taken up again).
            let count = || {
                if stored.status == Status::Failed {
                    self.statistics.record_message(
                        business,
                        phone,
                        direction,
                        crate::integrity::Status::Failed,
                        at,
                    );
                }
            };
            self.commit_told(business, id, reported.into(), None, count)
                .await
        } else {
            self.write_delivery(business, id, stored, next).await
        };
        written?;
        Ok(told)
    }

    /// A delivery report from the transport for an outbound message:
    /// `Delivered` or `Read`. Reports that would move the status backwards
    /// (late, duplicated or out of order), and reports for a message past
    /// its retention (which fails as expired), are ignored.
    ///
    /// A report speaks for one device of the recipient: the message takes
    /// the status, and devices an attempt has not reached are still sent
    /// it. Its business is told the status once: at once if a recorded
    /// attempt left those devices (a device failing for now holds back no
    /// report of a message the consumer has; should this call not tell it,
    /// another holding the message or the business refusing, the message
    /// is due at once, and the retransmission loop tells it with an attempt
    /// on those devices, or, should the business's endpoint refuse that
    /// too or be hung, with the devices' next attempts, at most
    /// [`retry_max`](crate::processor::DeliveryConfig::retry_max) apart), and
    /// otherwise once none is left. Those are the
    /// devices a recorded attempt left to retry or, on a message still
    /// queued (no record says a device took it: the process stopped, or
    /// the send was dropped, before its bookkeeping), every device: a
    /// device that has the message already drops the copy by its id.
    ///
    /// A report whose write loses a race to the message's other writes
    /// (attempts, receipts, other reports) more than a few times in a row
    /// is refused as a passing [`StoreError::Conflict`]: hand it in again.
    ///
    /// [`StoreError::Conflict`]: crate::store::StoreError::Conflict
    pub async fn status_update(
        &self,
        principal: &Principal,
        business: BusinessId,
        id: MessageId,
        status: Status,
    ) -> Result<StatusChange, ProcessorError> {
        let span = debug_span!("status_update", %business, %id, ?status);
        self.status_update_in(principal, business, id, status)
            .instrument(span)
            .await
    }

    async fn status_update_in(
        &self,
        principal: &Principal,
        business: BusinessId,
        id: MessageId,
        status: Status,
    ) -> Result<StatusChange, ProcessorError> {
        self.authorize_carrier(principal, business)?;
        if !matches!(status, Status::Delivered | Status::Read) {
            return Err(ProcessorError::Invalid(
                "the transport reports delivered or read",
            ));
        }
        // A send dropped halfway may owe the message its move on from
        // queued: made first, it is billed and told sent by that move, and
        // this report goes on from there. Made under the message's claim,
        // as every owed write is: unclaimed, an attempt could take the
        // message up meanwhile, find nothing owed and make the same move
        // (billed and told twice). If an attempt holds the claim, it made
        // the write when it took the message up.
        drop(self.take_up(business, id).await?);
        for _ in 0..MAX_STATUS_RACES {
            let record = self
                .storage
                .message(business, id)
                .await?
                .ok_or(ProcessorError::NotFound)?;
            let now = self.clock.now();
            if record.direction != Direction::Outbound
                || !record.delivery.status.may_become(status)
                || !self.retention.readable(&record, now)
            {
                return Ok(StatusChange::Ignored);
            }
            // Reported before the send's own bookkeeping moved it on from
            // queued: this write does, and counts it taken (billable, sent).
            // Its category is read before anything changes.
            let queued_as = if record.delivery.status == Status::Queued {
                Some(self.category_of(&record).await?)
            } else {
                None
            };
            // Settled, with the report to the business due now until it is
            // told: by this call if it can, else by the retransmission loop
            // (an attempt on the devices still pending tells it, if any).
            // Not so on a message no record says a device took (every
            // device pending): its attempt, under way or owed, records its
            // outcome over this and reports.
            let pending = still_pending(&record.delivery);
            let ahead = record.delivery.pending_devices != 0;
            let settled = Delivery {
                status,
                failure: None,
                attempts: record.delivery.attempts,
                next_attempt: if pending != 0 && !ahead {
                    record.delivery.next_attempt.or(Some(now))
                } else {
                    Some(now)
                },
                pending_devices: pending,
                // Settled: no resend to every device is due.
                overdue_at: None,
                // Moving it on from queued and billing it, this write is
                // known by a token of its own; later writes keep the one
                // there. Unbilled (its category unreadable), it leaves zero:
                // the send's own record bills it.
                accepted_by: if matches!(queued_as, Some(Some(_))) {
                    acceptance_token()
                } else {
                    record.delivery.accepted_by
                },
                told: record.delivery.told,
            };
            let op = Op::UpdateDelivery {
                business,
                id,
                expected: record.delivery,
                delivery: settled,
            };
            // Moving it on from queued bills it, in the same write, and
            // counts it taken. Should the store fail the write, it is owed
            // with what follows it: it may have landed (its answer lost),
            // and the report handed in again is then ignored.
            let mut batch = Batch::from(op);
            let mut accepted = None;
            if let Some(Some(category)) = queued_as {
                batch.push(self.bill(business, category, now));
                accepted = Some(Accepted {
                    phone: record.phone,
                    at: now,
                    next: settled,
                });
            }
            // Counted unless the write lost a race: a write the store
            // failed, or a call dropped, is owed, and lands before the
            // message is taken up again (as a failure told is counted, see
            // `report_status`).
            let count = || {
                if record.delivery.status < Status::Delivered {
                    self.statistics.record_delivery(
                        business,
                        record.phone,
                        now.saturating_duration_since(record.created),
                        now,
                    );
                }
                if status == Status::Read {
                    self.statistics.record_message(
                        business,
                        record.phone,
                        Direction::Outbound,
                        stats_status(status),
                        now,
                    );
                }
            };
            let written = self.commit_told(business, id, batch, accepted, count).await;
            if matches!(written, Ok(false)) {
                // Another report won the race: decide again on what it left.
                continue;
            }
            written?;
            self.claims.note_report(business, id);
            match queued_as {
                Some(Some(_)) => self.accepted(business, record.phone, now),
                Some(None) => {
                    warn!(%business, %id, "a message reported delivered is left for its send's record to bill: its body is unreadable");
                }
                None => {}
            }
            // Told under the message's claim, as it stands (an attempt
            // that ended while this write was landing may have told it
            // already). With devices a recorded attempt left to retry, the
            // status is told ahead of them, not once the last of them has
            // the message (a device failing for days would hold the report
            // back as long). Not so on a message no record says a device
            // took: an attempt under way (a report that came from inside
            // the transport's `send`, say) leaves the report to it, as only
            // its bookkeeping knows whether devices still wait for the
            // message; should it miss this write, the retransmission loop
            // reports it.
            if (ahead || pending == 0)
                && let Some(_claim) = self.take_up(business, id).await?
                && self
                    .storage
                    .message(business, id)
                    .await?
                    .is_some_and(|m| m.delivery == settled)
            {
                if ahead {
                    let retry = record.delivery.next_attempt;
                    self.tell_ahead(business, id, settled, retry).await?;
                } else {
                    self.report_status(business, id, record.phone, Direction::Outbound, settled)
                        .await?;
                }
            }
            return Ok(StatusChange::Applied);
        }
        Err(StoreError::Conflict.into())
    }

    /// A retry receipt from the transport: `device` of the recipient of
    /// outbound message `id` could not decrypt it (it lost its session, or
    /// its consumer reinstalled) and asks for it again.
    ///
    /// The device's bundle is fetched and a new session started from it in
    /// place of the one it lost (kept archived); a message still open is
    /// due for the device at once, in the same write, so nothing changes
    /// unless both land. A message delivered or read (another device
    /// reported it) is sent to the device once more, nothing told the
    /// business (its status stays); should that send fail for now, the
    /// receipt is refused with the transport's error, its new session
    /// kept, and the network hands it in again: each copy goes over that
    /// session, fetching no other bundle, until the message goes out or
    /// expires (a receipt for a message past its retention is ignored; a
    /// restarted processor, which forgets the session was the receipt's,
    /// fetches one more). A receipt for another message
    /// sent on the old session (made before the new one was started),
    /// within the receipt timeout of the new session, fetches no bundle:
    /// the message goes over the new one. One for a message made since
    /// (the device lost the new session too) fetches one. (Not so for a
    /// message made before but first sent to the device after, a
    /// retransmission: should the device lose the new session within the
    /// window and another device have reported the message, the copy goes
    /// over the lost session, and the device does not get it.) A
    /// receipt while an attempt on the message is under way is refused for
    /// now as [`ProcessorError::AttemptUnderWay`] (the attempt's record
    /// would overwrite it), and so is one while a send or another receipt
    /// is starting a session with the device (one bundle between them):
    /// the network hands it in again. A bundle
    /// never replaces the identity key trusted for a device (see
    /// [`IdentityPolicy`](crate::signal::IdentityPolicy)): a reinstalled
    /// device's new key, or one the network swapped in, is refused, and
    /// the device's receipts for the message are ignored for its life (each
    /// bundle fetched costs the device a one-time prekey). Under
    /// `AcceptAndReport` that device gets its messages once it writes (its
    /// new key taken, and reported to the business); under `Refuse`, once
    /// its business approves that key
    /// ([`trust_new_identity`](Self::trust_new_identity)).
    /// Until then it is sent each retransmission on its old session.
    /// Ignored too: a copy of a receipt acted on within the receipt timeout
    /// (a network duplicate: acting again would replace a working session,
    /// send the message again after its report, and cost the device another
    /// one-time prekey), a receipt for a message failed, unreadable or
    /// past its retention, one whose bundle the visibility policy does not
    /// release the consumer's number to the transport to fetch (the
    /// denial audited; one that cannot be audited is refused, and the
    /// network hands it in again), and every receipt of a device whose record the
    /// new session would make larger than
    /// [`SignalConfig::max_record_len`](crate::signal::SignalConfig::max_record_len),
    /// until a message from the device is received (which may use up the
    /// keys it keeps for skipped messages), or whose stored record cannot
    /// be read, for the message's life (a bundle fetched for each copy
    /// would drain its one-time prekeys; a send gives such a device up).
    pub async fn retry_receipt(
        &self,
        principal: &Principal,
        business: BusinessId,
        id: MessageId,
        device: u32,
    ) -> Result<StatusChange, ProcessorError> {
        let span = debug_span!("retry_receipt", %business, %id, device);
        self.retry_receipt_in(principal, business, id, device)
            .instrument(span)
            .await
    }

    /// Keep nothing of retry receipts for a message past its stored
    /// expiry (which a sweep may have brought forward, for a shortened
    /// retention), nor once it is gone: receipts ignored for a message's
    /// life hold its consumer's phone hash. A message that cannot be read
    /// now is looked at again at the next sweep.
    pub(super) async fn forget_receipts_of_deleted(&self, now: Timestamp) {
        let mut expiries = HashMap::default();
        for (business, id) in self.receipts.kept_for_messages(now) {
            if let Ok(record) = self.storage.message(business, id).await {
                expiries.insert((business, id), record.map(|r| r.expiry));
            }
        }
        self.receipts.cap(&expiries, now);
    }

    async fn retry_receipt_in(
        &self,
        principal: &Principal,
        business: BusinessId,
        id: MessageId,
        device: u32,
    ) -> Result<StatusChange, ProcessorError> {
        self.authorize_carrier(principal, business)?;
        // Under the message's claim (what a dropped call owes it written
        // first): an attempt's bookkeeping would overwrite what this asks.
        let Some(_claim) = self.take_up(business, id).await? else {
            return Err(ProcessorError::AttemptUnderWay);
        };
        let now = self.clock.now();
        let Some(noted) = self.receipts.take(business, id, device, now) else {
            return Ok(StatusChange::Ignored);
        };
        let record = self
            .storage
            .message(business, id)
            .await?
            .ok_or(ProcessorError::NotFound)?;
        if record.direction != Direction::Outbound
            || record.delivery.status == Status::Failed
            || !self.retention.readable(&record, now)
        {
            return Ok(StatusChange::Ignored);
        }
        let peer = PeerId {
            phone: record.phone,
            device,
        };
        let Stored::Content(StoredBody::Outbound(body)) = self.due_body(&record).await? else {
            return Ok(StatusChange::Ignored);
        };
        // One start per device at a time: receipts for two messages of one
        // lost session fetch one bundle between them (one refused for now
        // is handed in again, and finds the session the other started),
        // and none starts a session while a send is starting one. Let go
        // once the session is written, before any copy is sent: a send to
        // a device with no session takes it too.
        let Some(starting) = self.starting.begin(business, peer) else {
            return Err(ProcessorError::AttemptUnderWay);
        };
        // Sent on the session a receipt replaced lately: due on the new one.
        if self
            .receipts
            .restarted_lately(business, peer, now, record.created)
        {
            return self
                .start_on_receipt(record, &body, peer, None, now, noted, starting)
                .await;
        }
        // The bundle costs the device a one-time prekey: a copy of this
        // receipt costs it no other, unless this one fails or is dropped
        // (the network hands it in again, and `noted` is forgotten). A
        // processor superseded on its store fetches none (it could not
        // store the session). (Looked at first: the number is released
        // just before the call that uses it, under the policy in force then.)
        self.still_the_writer().await?;
        let number = match self.gate.release(
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, body.to.clone()),
            Party::Transport,
            Purpose::Retransmission,
        ) {
            Ok(released) => released.into_value(),
            Err(denied) => {
                return match ProcessorError::from(denied) {
                    // The policy does not release the number to the
                    // network: ignored. A decision that could not be
                    // audited is refused, and the network hands it in again.
                    ProcessorError::Denied => Ok(StatusChange::Ignored),
                    audit => Err(audit),
                };
            }
        };
        let bundle = match self.transport.fetch_bundle(business, &number, device).await {
            Ok(bundle) => bundle,
            Err(TransportError::Refused(_)) => return Ok(StatusChange::Ignored),
            Err(e) => return Err(e.into()),
        };
        self.start_on_receipt(record, &body, peer, Some(&bundle), now, noted, starting)
            .await
    }

    /// Settled `record` was sent to `device` once more, for its retry
    /// receipt: a retry left pending for the device is not made again
    /// (unless the device shares its bit with others, from 63 up). If no
    /// device is left, what was due is the report. Should the write fail
    /// or lose a race, the retry is made, a copy the device drops by id.
    async fn answered(&self, record: &MessageRecord, device: u32, now: Timestamp) {
        let d = record.delivery;
        let bit = Delivery::device_bit(device);
        if device >= 63 || d.pending_devices & bit == 0 {
            return;
        }
        let pending = d.pending_devices & !bit;
        let next = if pending == 0 {
            self.settle_after_send(d, d.attempts, now, now)
        } else {
            Delivery {
                pending_devices: pending,
                ..d
            }
        };
        let op = Op::UpdateDelivery {
            business: record.business,
            id: record.id,
            expected: d,
            delivery: next,
        };
        if let Err(e) = self.commit_op(op).await {
            debug!(error = %e, "a device answered on its retry receipt is left pending");
        }
    }

    /// For a retry receipt of message `record` (`noted`, its content
    /// `body`): start a new session with `peer` from `bundle` (none: one was
    /// started lately), making the message due for it at once if it is
    /// open, in the same write, or sending it to the device once more if it
    /// is settled (see [`retry_receipt`](Self::retry_receipt)).
    #[allow(clippy::too_many_arguments)]
    async fn start_on_receipt(
        &self,
        mut record: MessageRecord,
        body: &OutboundBody,
        peer: PeerId,
        bundle: Option<&PreKeyBundle>,
        now: Timestamp,
        noted: Noted<'_>,
        starting: Started<'_>,
    ) -> Result<StatusChange, ProcessorError> {
        let (business, id, device) = (record.business, record.id, peer.device);
        let mut starting = Some(starting);
        for _ in 0..MAX_STATUS_RACES {
            let d = record.delivery;
            let mut batch = Batch::new();
            if d.status.is_open() {
                let pending = still_pending(&d) | Delivery::device_bit(device);
                let due = Delivery {
                    pending_devices: pending,
                    next_attempt: Some(now),
                    // Sent, its resend to every device stays due when it
                    // was: its next attempt, if no device was pending.
                    overdue_at: match (d.status, d.pending_devices) {
                        (Status::Sent, 0) => d.next_attempt,
                        (Status::Sent, _) => d.overdue_at,
                        _ => None,
                    },
                    ..d
                };
                if due != d {
                    batch.push(Op::UpdateDelivery {
                        business,
                        id,
                        expected: d,
                        delivery: due,
                    });
                }
            }
            let written = match bundle {
                Some(bundle) => {
                    // Noted as started, and held for a settled message
                    // until it goes over it, however the call ends once the
                    // write began, unless it is known not to have landed:
                    // dropped or failed, it may have, and a receipt sent on
                    // the old session (this one's copy, another message's)
                    // would fetch another bundle and replace it (should it
                    // not have, such a message goes over the old session,
                    // and its device asks again). A refused bundle ends the
                    // call before the write: nothing to cancel.
                    let held_for = (!d.status.is_open()).then_some((id, record.expiry));
                    let committing = AtomicBool::new(false);
                    let started =
                        self.receipts
                            .restart_on_drop(&committing, business, peer, now, held_for);
                    match self
                        .sessions
                        .start_session_with(
                            business,
                            peer,
                            bundle,
                            record.expiry,
                            batch,
                            &committing,
                        )
                        .await
                    {
                        Ok(()) => {
                            drop(started);
                            debug!("a new session was started on a retry receipt");
                            true
                        }
                        Err(SignalError::Storage(StorageFailure::Store(e)))
                            if matches!(*e, StoreError::Conflict) =>
                        {
                            started.cancel();
                            false
                        }
                        Err(SignalError::UntrustedIdentity { .. }) => {
                            noted.refused_until(record.expiry, record.phone);
                            warn!(%business, device, "a retry receipt's bundle has another identity key: not taken from a bundle");
                            return Ok(StatusChange::Ignored);
                        }
                        Err(SignalError::BadBundle(why)) => {
                            noted.keep_until(record.expiry);
                            warn!(%business, device, why, "refused a retry receipt's bad prekey bundle");
                            return Ok(StatusChange::Ignored);
                        }
                        // The device's record, its lost session archived, is
                        // over the limit: so is every copy's until a message
                        // from the device uses up the keys it keeps for
                        // skipped ones. Not fetched again for each copy.
                        Err(SignalError::RecordTooLarge { len, max }) => {
                            started.cancel();
                            noted.oversized_until(record.expiry, record.phone);
                            warn!(%business, device, len, max, "a retry receipt's session would make its device's record too large: ignored until the device writes");
                            return Ok(StatusChange::Ignored);
                        }
                        // The device's stored record cannot be read (damaged,
                        // not this device's, failing its authentication): no
                        // copy can start a session either (an operator's
                        // matter).
                        Err(e) if e.record_unreadable() => {
                            started.cancel();
                            noted.keep_until(record.expiry);
                            warn!(%business, device, error = %e, "a retry receipt's device has a damaged record: ignored");
                            return Ok(StatusChange::Ignored);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                // Written even if empty: fenced, it stops a processor
                // superseded on its store from sending the copy.
                None => self.commit_batch(batch).await?,
            };
            if written {
                drop(starting.take());
                // Another device reported it: no retry is due to make for
                // it, so the receipt is refused for now if the device
                // cannot be sent it now (`noted` forgotten: the network
                // hands it in again, and its copy goes over the session
                // started now).
                if !d.status.is_open() {
                    // Held for the message until it goes out, whether the
                    // send fails or the call is dropped while it waits:
                    // the receipt, handed in again, goes over this session.
                    self.receipts
                        .hold_restart((business, id), peer, now, record.expiry);
                    match self.resend_to_device(&record, body, device).await {
                        Ok(sent) => {
                            // Let go for the message (held for others, it
                            // stays held for them), before anything else
                            // can drop the call.
                            self.receipts.restart(business, peer, now, Some(id));
                            if sent {
                                self.answered(&record, device, now).await;
                            } else {
                                debug!(
                                    "a settled message cannot be sent to a retry receipt's device"
                                );
                            }
                        }
                        Err(e) => {
                            debug!(error = %e, "a settled message could not be sent to a retry receipt's device now");
                            return Err(e.into());
                        }
                    }
                }
                noted.keep();
                return Ok(StatusChange::Applied);
            }
            // A report or an attempt moved the message on: again on what
            // it left.
            record = match self.storage.message(business, id).await? {
                Some(r) if r.delivery.status != Status::Failed => r,
                _ => {
                    noted.keep();
                    return Ok(StatusChange::Ignored);
                }
            };
        }
        Err(StoreError::Conflict.into())
    }

    /// The status of one of `business`'s messages.
    pub async fn message_status(
        &self,
        principal: &Principal,
        business: BusinessId,
        id: MessageId,
    ) -> Result<(Status, Option<FailureReason>), ProcessorError> {
        self.authorize(principal, business)?;
        let record = self
            .storage
            .message(business, id)
            .await?
            .ok_or(ProcessorError::NotFound)?;
        Ok((record.delivery.status, record.delivery.failure))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PeerId;
    use crate::time::Timestamp;

    const DAY: u64 = 24 * 3600 * 1000;
    /// The receipt timeout of every test's memory.
    const WINDOW: Duration = Duration::from_secs(3600);
    /// The consumer of every test.
    const PHONE: PhoneHash = PhoneHash::from_bytes([0xA5; 16]);

    /// Receipt memory with the test window, and the business it serves.
    fn receipts() -> (Receipts, BusinessId) {
        (Receipts::new(WINDOW), BusinessId::new(7).unwrap())
    }

    /// The retry-receipt memory keeps no consumer's phone hash (in
    /// `PeerId`) past its window: each change drops what no longer counts,
    /// as each sweep does (`Receipts::expire`). (Entries were dropped only
    /// past 1,024 of them: a consumer whose device once asked for a message
    /// again was remembered for as long as the processor ran.)
    #[test]
    fn a_receipt_restart_forgets_the_consumer_past_its_window() {
        let (receipts, business) = receipts();
        let consumer = PeerId {
            phone: PHONE,
            device: 1,
        };
        receipts.restart(business, consumer, Timestamp::from_millis(DAY), None);
        // Forty days on, the receipt memory is used again for others.
        let later = Timestamp::from_millis(41 * DAY);
        for i in 0..10u8 {
            let other = PeerId {
                phone: PhoneHash::from_bytes([i; 16]),
                device: 0,
            };
            receipts.restart(business, other, later, None);
            assert!(!receipts.restarted_lately(business, consumer, later, Timestamp::UNIX_EPOCH));
        }
        let kept = receipts
            .restarted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .any(|(_, peer)| peer.phone == consumer.phone);
        assert!(
            !kept,
            "a consumer's phone hash is still held 40 days after its last retry receipt"
        );
    }

    /// A receipt ignored for a refused bundle, or for a session too large,
    /// holds its consumer's phone hash no longer than the receipt is
    /// ignored, nor a session a receipt started longer than it counts as
    /// started lately: the next receipt taken up after that drops it,
    /// sweep or no sweep. (It stayed until the next sweep: for a session
    /// too large, or started, a second and third look found, after the
    /// first fix too.)
    #[test]
    fn an_ignored_receipt_forgets_its_consumer_with_its_window() {
        let (receipts, business) = receipts();
        let phone = PHONE;
        let take = |device| {
            let now = Timestamp::from_millis(DAY);
            receipts.take(business, MessageId::random(), device, now)
        };
        let until = Timestamp::from_millis(3 * DAY);
        take(1).unwrap().refused_until(until, phone);
        take(2).unwrap().oversized_until(until, phone);
        for waiting in [&receipts.refused, &receipts.oversized] {
            assert!(lock(waiting).values().any(|p| *p == phone));
        }
        // A session a receipt started with its device, too.
        let device = PeerId { phone, device: 3 };
        receipts.restart(business, device, Timestamp::from_millis(DAY), None);
        // After the message's life, another consumer's receipt comes.
        let later = Timestamp::from_millis(41 * DAY);
        receipts
            .take(business, MessageId::random(), 0, later)
            .unwrap()
            .keep();
        for waiting in [&receipts.refused, &receipts.oversized] {
            assert!(lock(waiting).is_empty());
        }
        assert!(lock(&receipts.restarted).is_empty());
    }

    /// What receipts keep for a message's life (a receipt ignored for a
    /// refused bundle or a session too large, a session held for the
    /// message) goes with the message's stored expiry, which a shortened
    /// retention brings forward, and with the message once it is gone; kept
    /// for another message, it stays. (It stayed until the expiry the
    /// message had when the receipt came: a consumer's phone hash outlived
    /// its messages by up to their old retention.)
    #[test]
    fn what_receipts_keep_for_a_message_goes_with_it() {
        let (receipts, business) = receipts();
        let phone = PHONE;
        let (shortened, gone, other) = (
            MessageId::random(),
            MessageId::random(),
            MessageId::random(),
        );
        let now = Timestamp::from_millis(DAY);
        let old_expiry = Timestamp::from_millis(31 * DAY);
        let take = |id, device| receipts.take(business, id, device, now).unwrap();
        take(shortened, 1).refused_until(old_expiry, phone);
        take(gone, 2).oversized_until(old_expiry, phone);
        take(other, 3).keep_until(old_expiry);
        let held = PeerId { phone, device: 4 };
        receipts.restart(business, held, now, None);
        receipts.hold_restart((business, gone), held, now, old_expiry);
        // Another device's session is held for two messages.
        let both = PeerId { phone, device: 5 };
        let other_expiry = Timestamp::from_millis(20 * DAY);
        receipts.restart(business, both, now, None);
        receipts.hold_restart((business, gone), both, now, old_expiry);
        receipts.hold_restart((business, other), both, now, other_expiry);
        let mut kept = receipts.kept_for_messages(now);
        kept.sort_unstable();
        let mut expected = vec![(business, shortened), (business, gone), (business, other)];
        expected.sort_unstable();
        assert_eq!(kept, expected);

        // A sweep two days on: one message's retention was shortened to
        // three days, another is gone; the third stands.
        let sweep = Timestamp::from_millis(3 * DAY);
        let expiries: HashMap<_, _, RandomState> = [
            ((business, shortened), Some(Timestamp::from_millis(4 * DAY))),
            ((business, gone), None),
            ((business, other), Some(old_expiry)),
        ]
        .into_iter()
        .collect();
        receipts.cap(&expiries, sweep);
        assert!(lock(&receipts.oversized).is_empty());
        // The session held for the message gone alone is let go; the one
        // held for the other message too stays held for it.
        let restarted = lock(&receipts.restarted).clone();
        assert_eq!(restarted.keys().collect::<Vec<_>>(), [&(business, both)]);
        assert_eq!(restarted[&(business, both)].until, other_expiry);
        assert_eq!(lock(&receipts.refused).len(), 1);
        let ignored = |id| lock(&receipts.ignore).get(&(business, id, 1)).copied();
        assert_eq!(ignored(shortened), Some(Timestamp::from_millis(4 * DAY)));
        let other_until = lock(&receipts.ignore).get(&(business, other, 3)).copied();
        assert_eq!(other_until, Some(old_expiry));
        // At the shortened expiry, the next change drops it.
        receipts.expire(Timestamp::from_millis(4 * DAY));
        assert!(lock(&receipts.refused).is_empty());
        assert_eq!(receipts.kept_for_messages(sweep), vec![(business, other)]);
    }

    /// A session held for two messages is let go for the one that went
    /// over it alone: it stays held for the other, as long as that one
    /// lives. (Any message going over it let it go for all. A review found
    /// it.)
    #[test]
    fn a_session_held_for_two_messages_stays_held_for_the_one_not_sent() {
        let (receipts, business) = receipts();
        let peer = PeerId {
            phone: PHONE,
            device: 1,
        };
        let at = |ms: u64| Timestamp::from_millis(DAY + ms);
        let (m1, m2) = (MessageId::random(), MessageId::random());
        let made = Timestamp::from_millis(DAY / 2);
        receipts.restart(business, peer, at(0), None);
        receipts.hold_restart(
            (business, m1),
            peer,
            at(1),
            Timestamp::from_millis(10 * DAY),
        );
        receipts.hold_restart(
            (business, m2),
            peer,
            at(2),
            Timestamp::from_millis(20 * DAY),
        );
        receipts.restart(business, peer, at(3), Some(m1));
        // Past the window, the session is still held for m2.
        let past = Timestamp::from_millis(15 * DAY);
        assert!(receipts.restarted_lately(business, peer, past, made));
        // Once m2 went over it too, it counts for the window alone.
        receipts.restart(business, peer, past, Some(m2));
        let later = past.saturating_add(WINDOW);
        assert!(!receipts.restarted_lately(business, peer, later, made));
    }
}
