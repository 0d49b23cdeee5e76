//! Calls to the businesses' endpoints, and the endpoints that left one
//! unanswered.
//!
//! A call dropped while it waits on a business's endpoint (a host timing
//! out a receive or a retransmission pass) marks that endpoint hung. For a
//! while the business is not called again: what would have been handed or
//! reported to it waits, as if its endpoint had refused it. The while is
//! [`DeliveryConfig::retry_base`](super::DeliveryConfig::retry_base),
//! doubled with every probe it leaves unanswered, at most
//! [`retry_max`](super::DeliveryConfig::retry_max). Then one call probes
//! it, and no other is made until the probe is answered or dropped; any
//! answer clears the mark. Only the retransmission loop probes, last in a
//! pass, on one message of the business it sets aside for it
//! ([`HungEndpoints::arm`]), or else by the latest `Sent` report the
//! endpoint missed: a call a host's caller waits on (a send's `Sent`
//! report, a carrier's status update, a receive's hand-over) is not made
//! to a hung endpoint, and what it would have carried is left to the loop
//! (a `Sent` report, best effort, is made only if it is the latest). A
//! retransmission pass takes up the messages of hung businesses after
//! every other's. Without this, a pass over the due messages would stop at
//! the first message of a hung business on every run, and no other
//! business's would be handed over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;

use super::Processor;
use crate::ids::{BusinessId, MessageId};
use crate::store::MessageRecord;
use crate::time::Timestamp;

/// Businesses whose endpoint left a call unanswered.
#[derive(Default)]
pub(super) struct HungEndpoints {
    hung: Mutex<HashMap<BusinessId, Hung, RandomState>>,
    /// Whether any is (or may be): with none, a call takes no lock. Set
    /// under the lock with the first, cleared with the last.
    any: AtomicBool,
    /// The latest message whose `Sent` report each business's endpoint
    /// missed while hung, with when its send was recorded: kept once it
    /// answers, to be made then.
    missed_sent: Mutex<HashMap<BusinessId, (MessageId, Timestamp), RandomState>>,
}

/// An endpoint that left calls unanswered.
#[derive(Clone, Copy)]
struct Hung {
    /// When it was last called: the dropped call, or a probe since.
    since: Timestamp,
    /// How many calls in a row it left unanswered: the first, and each
    /// probe since (calls already under way when it was marked count not).
    dropped: u32,
    /// Whether a probe is under way.
    probing: bool,
    /// The message the retransmission loop probes with: the only one a
    /// call about may probe.
    armed: Option<MessageId>,
}

impl HungEndpoints {
    fn lock(&self) -> MutexGuard<'_, HashMap<BusinessId, Hung, RandomState>> {
        self.hung.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any endpoint may be hung.
    fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether `business`'s endpoint left a call unanswered, and has not
    /// answered since.
    pub(super) fn contains(&self, business: BusinessId) -> bool {
        self.any() && self.lock().contains_key(&business)
    }

    /// Put the messages of hung businesses last in `due`, the order
    /// otherwise kept: a call that hangs holds up no other business's.
    pub(super) fn last(&self, due: &mut [MessageRecord]) {
        if self.any() {
            due.sort_by_cached_key(|m| self.contains(m.business));
        }
    }

    /// `business`'s endpoint answered.
    fn clear(&self, business: BusinessId) {
        if self.any() {
            let mut hung = self.lock();
            hung.remove(&business);
            if hung.is_empty() {
                self.any.store(false, Ordering::Release);
            }
        }
    }

    /// `business`'s endpoint left a call unanswered, at `since`: a probe,
    /// or a call made before it was marked.
    fn mark(&self, business: BusinessId, since: Timestamp, probe: bool) {
        let mut hung = self.lock();
        match hung.get_mut(&business) {
            Some(h) if probe => {
                h.dropped = h.dropped.saturating_add(1);
                h.since = since;
                h.probing = false;
            }
            // Under way when the endpoint was marked: that mark counts it.
            Some(_) => {}
            None => {
                let first = Hung {
                    since,
                    dropped: 1,
                    probing: false,
                    armed: None,
                };
                hung.insert(business, first);
            }
        }
        self.any.store(true, Ordering::Release);
    }

    /// The retransmission loop probes `business`'s endpoint, if hung, with
    /// message `id`: a call about `id` may probe it (and none about another
    /// message) until the guard is dropped.
    pub(super) fn arm(&self, business: BusinessId, id: MessageId) -> Armed<'_> {
        if self.any()
            && let Some(h) = self.lock().get_mut(&business)
        {
            h.armed = Some(id);
        }
        Armed {
            hung: self,
            business,
            id,
        }
    }

    fn missed(&self) -> MutexGuard<'_, HashMap<BusinessId, (MessageId, Timestamp), RandomState>> {
        self.missed_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `business`'s endpoint, hung, was not told that message `id` is sent
    /// (its send recorded at `at`).
    fn missed_sent(&self, business: BusinessId, id: MessageId, at: Timestamp) {
        self.missed().insert(business, (id, at));
    }

    /// The latest message whose `Sent` report `business`'s endpoint missed
    /// while hung, no longer remembered, but for the guard: dropped before
    /// it is [`told`](MissedSent::told), it is remembered again (unless a
    /// later one was missed meanwhile).
    pub(super) fn take_missed_sent(&self, business: BusinessId) -> Option<MissedSent<'_>> {
        let (id, at) = self.missed().remove(&business)?;
        Some(MissedSent {
            hung: self,
            business,
            id,
            at,
            kept: true,
        })
    }

    /// A probe of `business`'s endpoint was not made after all: it is as
    /// it was before, last called at `since`.
    fn unprobe(&self, business: BusinessId, since: Timestamp) {
        if let Some(h) = self.lock().get_mut(&business) {
            h.probing = false;
            h.since = since;
        }
    }
}

/// A `Sent` report a hung endpoint missed, taken to be made: remembered
/// again when dropped, unless told.
pub(super) struct MissedSent<'a> {
    hung: &'a HungEndpoints,
    business: BusinessId,
    id: MessageId,
    at: Timestamp,
    /// Remembered again when dropped.
    kept: bool,
}

impl MissedSent<'_> {
    /// The message whose report it is.
    pub(super) fn id(&self) -> MessageId {
        self.id
    }

    /// When its send was recorded: the report's time.
    pub(super) fn at(&self) -> Timestamp {
        self.at
    }

    /// Made (answered), or no longer to be made: not remembered again.
    pub(super) fn told(mut self) {
        self.kept = false;
    }
}

impl Drop for MissedSent<'_> {
    fn drop(&mut self) {
        if self.kept {
            let missed = (self.id, self.at);
            self.hung.missed().entry(self.business).or_insert(missed);
        }
    }
}

/// A message the retransmission loop probes a hung endpoint with, until
/// dropped.
pub(super) struct Armed<'a> {
    hung: &'a HungEndpoints,
    business: BusinessId,
    id: MessageId,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.hung.lock().get_mut(&self.business)
            && h.armed == Some(self.id)
        {
            h.armed = None;
        }
    }
}

/// A call to a business's endpoint under way. Dropped before
/// [`answered`](Self::answered) or [`not_made`](Self::not_made), it marks
/// the endpoint hung.
pub(super) struct Calling<'a> {
    processor: &'a Processor,
    business: BusinessId,
    /// If it probes a hung endpoint, when that was last called before.
    probe: Option<Timestamp>,
}

impl Calling<'_> {
    /// The endpoint answered (whatever it said): it is not hung.
    pub(super) fn answered(self) {
        self.processor.hung.clear(self.business);
        std::mem::forget(self);
    }

    /// The call was not made after all (the policy refused what it would
    /// have carried): nothing is learnt of the endpoint.
    pub(super) fn not_made(self) {
        if let Some(since) = self.probe {
            self.processor.hung.unprobe(self.business, since);
        }
        std::mem::forget(self);
    }
}

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        let since = self.processor.clock.now();
        let probe = self.probe.is_some();
        self.processor.hung.mark(self.business, since, probe);
    }
}

impl Processor {
    /// Whether `business`'s endpoint is hung and to be probed now: no probe
    /// under way, and the while since its last call passed.
    pub(super) fn probe_due(&self, business: BusinessId) -> bool {
        if !self.hung.any() {
            return false;
        }
        let now = self.clock.now();
        self.hung
            .lock()
            .get(&business)
            .is_some_and(|h| !h.probing && self.waited(h, now))
    }

    /// Whether the while before `h` is probed again has passed at `now`.
    fn waited(&self, h: &Hung, now: Timestamp) -> bool {
        let wait = self.delivery.backoff(h.dropped.saturating_sub(1));
        now >= h.since.saturating_add(wait)
    }

    /// The businesses the retransmission loop is to call last in its
    /// pass: those whose hung endpoints are due a probe, and those whose
    /// endpoints answer again, not yet told the latest `Sent` report they
    /// missed while hung.
    pub(super) fn to_probe(&self) -> Vec<BusinessId> {
        let mut businesses: Vec<BusinessId> = if self.hung.any() {
            let hung: Vec<BusinessId> = self.hung.lock().keys().copied().collect();
            hung.into_iter().filter(|&b| self.probe_due(b)).collect()
        } else {
            Vec::new()
        };
        let missed: Vec<BusinessId> = self.hung.missed().keys().copied().collect();
        for business in missed {
            if !self.hung.contains(business) && !businesses.contains(&business) {
                businesses.push(business);
            }
        }
        businesses
    }

    /// Note that `business`'s endpoint was not told message `id` is sent
    /// (its send recorded at `at`) because it is hung: the loop makes that
    /// report later, as a probe if need be.
    pub(super) fn missed_sent(&self, business: BusinessId, id: MessageId, at: Timestamp) {
        self.hung.missed_sent(business, id, at);
    }

    /// A call to `business`'s endpoint about message `id`, to be made now;
    /// `None` if its endpoint is hung and not to be asked (see the module
    /// docs): the retransmission loop is not working on `id`, a probe is
    /// under way, or the while since its last call has not passed.
    /// Otherwise a call to a hung endpoint is its probe.
    pub(super) fn call_business(&self, business: BusinessId, id: MessageId) -> Option<Calling<'_>> {
        let mut probe = None;
        if self.hung.any() {
            let now = self.clock.now();
            let mut hung = self.hung.lock();
            if let Some(h) = hung.get_mut(&business) {
                if h.armed != Some(id) || h.probing || !self.waited(h, now) {
                    return None;
                }
                probe = Some(std::mem::replace(&mut h.since, now));
                h.probing = true;
            }
        }
        Some(Calling {
            processor: self,
            business,
            probe,
        })
    }

    /// Make `call` to `business`'s endpoint about message `id`, unless it
    /// is not to be asked now ([`call_business`](Self::call_business)): its
    /// answer, or `None`.
    pub(super) async fn ask_business<T>(
        &self,
        business: BusinessId,
        id: MessageId,
        call: impl Future<Output = T>,
    ) -> Option<T> {
        let calling = self.call_business(business, id)?;
        let answer = call.await;
        calling.answered();
        Some(answer)
    }
}
