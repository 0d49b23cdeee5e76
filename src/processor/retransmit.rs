//! Retransmission: messages whose next attempt is due are handed over or
//! sent again, and settled statuses and failures reported.

use std::collections::HashSet;

use tracing::{Instrument, debug, debug_span, warn};

use super::endpoint::MissedSent;
use super::inbound::{Attempt, InboundParts};
use super::payload::StoredBody;
use super::records::Stored;
use super::{Processor, ProcessorError, due_by};
use crate::ids::BusinessId;
use crate::retention::RecordFacts;
use crate::store::{Delivery, Direction, FailureReason, MessageRecord, Status};
use crate::time::Timestamp;
use crate::transport::Principal;
use crate::visibility::Purpose;

/// What [`Processor::retransmit_due`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetransmitReport {
    /// Due messages looked at.
    pub due: u64,
    /// Inbound messages handed to the business.
    pub delivered_to_business: u64,
    /// Outbound messages the transport took for at least one device.
    pub sent: u64,
    /// Failures reported to businesses.
    pub failures_reported: u64,
    /// Messages rescheduled after a transient failure.
    pub rescheduled: u64,
    /// Messages left as they were after an error (the store or the key
    /// provider failing): what was left undone is owed to them, or they
    /// are still due, and the next pass takes them up again. Each is logged.
    pub errors: u64,
}

impl RetransmitReport {
    /// Count `other`'s work in this one.
    fn add(&mut self, other: &Self) {
        self.due += other.due;
        self.delivered_to_business += other.delivered_to_business;
        self.sent += other.sent;
        self.failures_reported += other.failures_reported;
        self.rescheduled += other.rescheduled;
        self.errors += other.errors;
    }
}

/// Whether working on due message `m`, readable under its retention, may
/// send it through the transport: an open one is tried again on its
/// devices (every one, if it has none pending: its attempts could not
/// list them, or its report is overdue), a settled one on those it has
/// pending; a failed one, or one past its retention (failed as expired,
/// or its report made), only has its report due.
fn needs_transport(m: &MessageRecord, readable: bool) -> bool {
    let d = &m.delivery;
    readable
        && m.direction == Direction::Outbound
        && (d.status.is_open() || (d.status != Status::Failed && d.pending_devices != 0))
}

impl Processor {
    /// Fail `record`, whose stored content cannot be had, for `reason`
    /// (unreadable: it cannot be opened or decoded; expired: its envelope
    /// says so, whatever its row says): it can never be delivered, and its
    /// business is told why. One reported delivered or read already, with
    /// devices left to retry, keeps its status (a status never goes
    /// backwards): those devices are given up and its business told the
    /// status it has. Returns whether the business was told a failure.
    async fn fail_undeliverable(
        &self,
        record: &MessageRecord,
        reason: FailureReason,
    ) -> Result<bool, ProcessorError> {
        let (business, id, current) = (record.business, record.id, record.delivery);
        if !current.status.may_become(Status::Failed) {
            warn!(%business, %id, ?reason, "a delivered message cannot be had: its devices left to retry are given up");
            self.report_status(business, id, record.phone, record.direction, current)
                .await?;
            return Ok(false);
        }
        warn!(%business, %id, ?reason, "a stored message cannot be had: failed");
        let failed = Attempt::Fail(reason);
        let next = self.after_attempt(&current, failed, self.clock.now());
        if !self.write_delivery(business, id, current, next).await? {
            return Ok(false);
        }
        self.report_status(business, id, record.phone, record.direction, next)
            .await
    }

    /// Mark `record`, still open, failed as expired undelivered, and tell
    /// its business. Marked first, conditionally: a delivery report that
    /// settled it meanwhile stands (and it is not told failed), and one
    /// that comes while the business is told finds it failed and is
    /// ignored, so no status is told after its failure. If the business
    /// cannot be told now, the report is due again after a backoff (it
    /// never blocks the messages behind it). Returns whether the business
    /// was told.
    pub(super) async fn fail_expired(
        &self,
        record: &MessageRecord,
    ) -> Result<bool, ProcessorError> {
        let (business, id, current) = (record.business, record.id, record.delivery);
        let expired = Attempt::Fail(FailureReason::Expired);
        let failed = self.after_attempt(&current, expired, self.clock.now());
        if !self.write_delivery(business, id, current, failed).await? {
            return Ok(false);
        }
        let told = self
            .report_status(business, id, record.phone, record.direction, failed)
            .await?;
        if told {
            debug!(%business, %id, "expired undelivered; reported failed");
        }
        Ok(told)
    }

    /// Make `record`'s next attempt, which could not be made at `now`, due
    /// again after a backoff, its state otherwise unchanged.
    async fn postpone(&self, record: &MessageRecord, now: Timestamp) -> Result<(), ProcessorError> {
        let d = record.delivery;
        let later = Delivery {
            attempts: d.attempts.saturating_add(1),
            next_attempt: Some(now.saturating_add(self.delivery.backoff(d.attempts))),
            ..d
        };
        let later = due_by(later, record.expiry, now);
        self.write_delivery(record.business, record.id, d, later)
            .await?;
        Ok(())
    }

    /// Lease the attempt due on `record` before it is made: its next
    /// attempt is put off by a backoff, in a conditional write fenced as
    /// every write of this processor is. So a processor superseded on its
    /// store makes no call out for a due message once another has taken
    /// the store over (its lease is refused), and the newer one leaves an
    /// attempt the older one leased before the take-over to it until the
    /// lease ends. The attempt's own write replaces the lease; one dropped
    /// or failed midway leaves it, as a failed attempt's backoff. Returns
    /// the record as leased, or `None` if it changed meanwhile (what
    /// changed it decides what is due).
    pub(super) async fn lease(
        &self,
        mut record: MessageRecord,
        now: Timestamp,
    ) -> Result<Option<MessageRecord>, ProcessorError> {
        let d = record.delivery;
        let leased = Delivery {
            next_attempt: Some(now.saturating_add(self.delivery.backoff(d.attempts))),
            ..d
        };
        let leased = due_by(leased, record.expiry, now);
        if !self
            .write_delivery(record.business, record.id, d, leased)
            .await?
        {
            return Ok(None);
        }
        record.delivery = leased;
        Ok(Some(record))
    }

    /// Work through messages whose next attempt is due: hand inbound ones to
    /// the business, send outbound ones again, report settled statuses and
    /// failures (a message past its retention fails as expired). Operators
    /// only. Run it periodically.
    ///
    /// A pass works on up to [`DeliveryConfig::batch`](super::DeliveryConfig::batch)
    /// messages, earliest due first, the messages of businesses whose
    /// endpoints left a call unanswered after the others' in each listing:
    /// what they would carry to the business is put off without a call,
    /// and only those sent through the transport count against the batch,
    /// so however many are due, they keep none of the others out of the
    /// pass. Last, it probes every such endpoint due a probe at once, each
    /// with one of its due messages (set aside: it takes no other's place),
    /// or else with the latest `Sent` report it missed (if that message is
    /// still sent): a probe that hangs until the host's timeout holds up
    /// nothing else of the pass. Once one answers, that report is made too,
    /// and the business's messages are taken up as usual from the next
    /// pass.
    ///
    /// A host error on one message (the store or the key provider failing)
    /// is logged and counted in [`RetransmitReport::errors`], and the pass
    /// goes on with the rest. An error is returned only if the due messages
    /// cannot be listed.
    pub async fn retransmit_due(
        &self,
        principal: &Principal,
    ) -> Result<RetransmitReport, ProcessorError> {
        self.authorize_operator(principal)?;
        self.retransmit_due_in()
            .instrument(debug_span!("retransmit_due"))
            .await
    }

    async fn retransmit_due_in(&self) -> Result<RetransmitReport, ProcessorError> {
        let now = self.clock.now();
        let mut report = RetransmitReport::default();
        let batch = self.delivery.batch;
        // Messages worked on that count against the batch.
        let mut worked = 0;
        let mut seen = HashSet::new();
        // One due message of each hung business due a probe, set aside.
        let mut probes: Vec<MessageRecord> = Vec::new();
        'listings: loop {
            // What this pass left due (set aside, an error, an attempt
            // under way) comes first in a listing: listed besides the batch.
            let limit = batch.saturating_add(seen.len());
            let mut due = self.storage.due_messages(now, limit).await?;
            let full = due.len() == limit;
            self.hung.last(&mut due);
            let mut new = false;
            for due in due {
                if !seen.insert((due.business, due.id)) {
                    continue;
                }
                new = true;
                let hung = self.hung.contains(due.business);
                if hung
                    && self.probe_due(due.business)
                    && !probes.iter().any(|p| p.business == due.business)
                {
                    probes.push(due);
                    continue;
                }
                if worked >= batch {
                    break 'listings;
                }
                // A hung business's message that needs only a call to it is
                // put off, and counts not; one for the transport does.
                if !hung || needs_transport(&due, self.retention.readable(&due, now)) {
                    worked += 1;
                }
                self.work_on(&due, now, false, &mut report).await;
            }
            // A listing that hung businesses' messages filled may have left
            // others out: those worked on are put off, so the next listing
            // reaches further.
            if !(full && new) || worked >= batch {
                break;
            }
        }
        // Last, as any may not answer, and all at once, as one that hangs
        // holds up no other: a probe of each hung endpoint due one.
        let probing: Vec<_> = self
            .to_probe()
            .into_iter()
            .map(|business| {
                let with = probes
                    .iter()
                    .position(|p| p.business == business)
                    .map(|i| probes.swap_remove(i));
                self.probe(business, with, now)
            })
            .collect();
        for probed in futures_util::future::join_all(probing).await {
            report.add(&probed);
        }
        Ok(report)
    }

    /// Probe `business`'s endpoint, if hung: with its due message `with`,
    /// or else (if that made no call) with the latest `Sent` report the
    /// endpoint missed while hung, which is made too once it answers.
    async fn probe(
        &self,
        business: BusinessId,
        with: Option<MessageRecord>,
        now: Timestamp,
    ) -> RetransmitReport {
        let mut report = RetransmitReport::default();
        if let Some(due) = with {
            self.work_on(&due, now, true, &mut report).await;
        }
        // Not while a probe is under way, nor one unanswered: kept.
        let callable = !self.hung.contains(business) || self.probe_due(business);
        if callable && let Some(missed) = self.hung.take_missed_sent(business) {
            self.tell_missed_sent(business, missed).await;
        }
        report
    }

    /// [`retransmit_one`](Self::retransmit_one), an error logged and
    /// counted: one message's error (the store or the key provider
    /// failing) holds up none behind it. Whatever it left undone is owed,
    /// or still due: the next pass takes it up again.
    async fn work_on(
        &self,
        due: &MessageRecord,
        now: Timestamp,
        probe: bool,
        report: &mut RetransmitReport,
    ) {
        report.due += 1;
        if let Err(e) = self.retransmit_one(due, now, probe, report).await {
            warn!(business = %due.business, id = %due.id, error = %e, "a due message could not be worked on: left for the next pass");
            report.errors += 1;
        }
    }

    /// Make `missed`, a `Sent` report `business`'s endpoint missed while
    /// hung, if its message is still sent (a probe, if the endpoint is
    /// still hung). Kept for a later pass unless the call is answered or
    /// the message moved on (a call dropped unanswered may have landed, as
    /// any report's: the report is made again).
    async fn tell_missed_sent(&self, business: BusinessId, missed: MissedSent<'_>) {
        let id = missed.id();
        let claim = match self.take_up(business, id).await {
            Ok(Some(claim)) => claim,
            // An attempt is under way.
            Ok(None) => return,
            Err(e) => {
                warn!(%business, %id, error = %e, "a missed sent report could not be made");
                return;
            }
        };
        let _armed = self.hung.arm(business, id);
        match self.storage.message(business, id).await {
            Ok(Some(record)) if record.delivery.status == Status::Sent => {}
            Ok(_) => return missed.told(),
            Err(e) => {
                warn!(%business, %id, error = %e, "a missed sent report could not be made");
                return;
            }
        }
        // Kept in memory, not leased: a processor superseded on its store
        // makes it no more.
        if let Err(e) = self.still_the_writer().await {
            warn!(%business, %id, error = %e, "a missed sent report could not be made");
            return;
        }
        let update = super::outbound::sent_report(business, id, missed.at());
        if self.notify(&update).await {
            missed.told();
        }
        drop(claim);
    }

    /// Work on one message found due at `listed` (see
    /// [`retransmit_due`](Self::retransmit_due)), counting what was done in
    /// `report`; a call about it probes its business's endpoint if `probe`
    /// and the endpoint is hung. Its retention is checked at the time it is
    /// taken up: the pass may have spent hours on the messages before it (a
    /// slow business endpoint).
    async fn retransmit_one(
        &self,
        due: &MessageRecord,
        listed: Timestamp,
        probe: bool,
        report: &mut RetransmitReport,
    ) -> Result<(), ProcessorError> {
        // An attempt under way for it will leave it due again if it must be.
        let Some(_claim) = self.take_up(due.business, due.id).await? else {
            return Ok(());
        };
        // A call about it probes its business's endpoint, if hung.
        let _armed = probe.then(|| self.hung.arm(due.business, due.id));
        // Look again under the claim: a status may have arrived meanwhile.
        let Some(record) = self.storage.message(due.business, due.id).await? else {
            return Ok(());
        };
        let now = self.clock.now().max(listed);
        let d = record.delivery;
        if d.next_attempt.is_none_or(|t| t > now) {
            return Ok(());
        }
        let readable = self.retention.readable(&record, now);
        let resend = record.direction == Direction::Outbound
            && d.status != Status::Failed
            && d.pending_devices != 0
            && readable;
        let settled = !d.status.is_open() && !resend;
        if !settled && !readable {
            // Open, past retention: it can never be delivered now.
            if self.fail_expired(&record).await? {
                report.failures_reported += 1;
            } else {
                report.rescheduled += 1;
            }
            return Ok(());
        }
        let Some(record) = self.lease(record, now).await? else {
            return Ok(());
        };
        let d = record.delivery;
        if settled {
            // Settled: its report is what is due (devices past
            // retention are not sent to any more).
            if self
                .report_status(
                    record.business,
                    record.id,
                    record.phone,
                    record.direction,
                    d,
                )
                .await?
                && d.status == Status::Failed
            {
                report.failures_reported += 1;
            }
            return Ok(());
        }
        let body = match self.due_body(&record).await {
            Ok(Stored::Content(body)) => body,
            // Past its retention since the check, or its row's expiry is
            // not the one sealed in its envelope (an edited row): it can
            // never be delivered now.
            Ok(Stored::Expired) => {
                let reason = FailureReason::Expired;
                report.failures_reported +=
                    u64::from(self.fail_undeliverable(&record, reason).await?);
                return Ok(());
            }
            Ok(Stored::Unreadable) => {
                let reason = FailureReason::Unreadable;
                report.failures_reported +=
                    u64::from(self.fail_undeliverable(&record, reason).await?);
                return Ok(());
            }
            // Its key could not be had now (the provider or the store
            // unavailable, a ring to repair): it waits, the rest go on.
            Err(e) => {
                warn!(business = %record.business, id = %record.id, error = %e, "a due message's key is unavailable: postponed");
                self.postpone(&record, now).await?;
                report.rescheduled += 1;
                return Ok(());
            }
        };
        match body {
            StoredBody::Inbound(body) => {
                let facts = RecordFacts::from(&record);
                let parts = InboundParts {
                    id: record.id,
                    from: body.from,
                    device: body.device,
                    content: body.content,
                    identity_changed: body.identity_changed,
                    facts,
                };
                // Handing a message to its business is delivery, however
                // many attempts it takes.
                let attempt = self
                    .hand_to_business(record.business, parts, Purpose::Delivery)
                    .await;
                if self.settle_inbound(&facts, record.id, d, attempt).await? {
                    report.delivered_to_business += 1;
                } else {
                    report.rescheduled += 1;
                }
            }
            StoredBody::Outbound(body) => {
                // Sending it through the transport again is retransmission;
                // until a device has taken it (attempts that reached none:
                // the network or the audit trail down), it is delivery.
                let purpose = if d.status == Status::Queued {
                    Purpose::Delivery
                } else {
                    Purpose::Retransmission
                };
                if self.attempt_outbound(&record, &body, purpose).await? > 0 {
                    report.sent += 1;
                    return Ok(());
                }
                match self
                    .storage
                    .message(record.business, record.id)
                    .await?
                    .map(|m| m.delivery)
                {
                    // Failed by this attempt, and its business told.
                    Some(d) if d.status == Status::Failed && d.next_attempt.is_none() => {
                        report.failures_reported += 1;
                    }
                    // Left for another attempt.
                    Some(d) if d.next_attempt.is_some() && d.status != Status::Failed => {
                        report.rescheduled += 1;
                    }
                    // Settled meanwhile (a report), or deleted.
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
