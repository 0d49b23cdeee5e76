//! The businesses' endpoint: a [`BusinessSink`] that records what it is
//! handed, with seeded faults, the way a business's webhook behaves.
//!
//! A call returning `Ok` means the business took the message or status.
//! What each fault does (see [`Faults`]):
//!
//! - `fail`, outages: the call is refused; the business has nothing.
//! - `drop`: the call times out, so the processor gets an error and retries
//!   later. Half the time the request was lost (the business has nothing);
//!   half the time only the reply was (the business has it, and will have it
//!   again when the processor retries): [`Cause::ReplyLost`].
//! - `duplicate`: the business receives it twice (a proxy retried, say):
//!   the second copy is [`Cause::Injected`].
//! - `delay`: the business took it, but it shows in the record only later,
//!   so later deliveries overtake it (the business's own queue is slow).
//!
//! The record keeps every copy with its cause, so a harness tells copies
//! the fault injector made from copies the processor made. What "exactly
//! once" is about is the processor handing a message over again after a
//! handover returned `Ok`: the record counts each such handover when it
//! is made, whatever became of it (taken, refused, request or reply
//! lost), as [`Copies::after_taken`]; [`SimBusiness::messages`] gives 1
//! for a message handed over exactly once. A handover naming another
//! sender or carrying other content than the message's first is counted
//! too, in [`SimBusiness::altered_handovers`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::faults::{Decision, Faults, Injector, InvalidFaults, Leg, LegStats};
use crate::ids::{BusinessId, MessageId, PhoneNumber};
use crate::store::{FailureReason, Status};
use crate::time::{Clock, ManualClock, Timestamp};
use crate::transport::{BusinessSink, InboundMessage, SinkError, StatusUpdate};

/// Why a copy reached the simulated business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The processor handed it over and was told the business took it.
    Handed,
    /// The processor handed it over, the business took it, and the reply
    /// was lost: the processor was told it failed (and will retry).
    ReplyLost,
    /// A duplicate the fault injector made of a handover.
    Injected,
}

/// The copies of one inbound message the business received, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copies {
    /// Handovers the processor was told succeeded: exactly one per message
    /// when the processor delivers exactly once.
    pub handed: u32,
    /// Handovers whose reply was lost.
    pub reply_lost: u32,
    /// Duplicates the fault injector made.
    pub injected: u32,
    /// Handovers made after one returned `Ok`, whatever their outcome
    /// (those that returned `Ok` are in `handed` too): none when the
    /// processor delivers exactly once. Counted when the call is made, so
    /// a repeat shows though the business has no copy of it.
    pub after_taken: u32,
}

impl Copies {
    /// Every copy the business received (a repeat refused or lost on the
    /// way, counted in `after_taken` only, is no copy).
    pub fn total(&self) -> u32 {
        self.handed + self.reply_lost + self.injected
    }

    fn count(&mut self, cause: Cause) {
        match cause {
            Cause::Handed => self.handed += 1,
            Cause::ReplyLost => self.reply_lost += 1,
            Cause::Injected => self.injected += 1,
        }
    }
}

enum Item {
    Message {
        business: BusinessId,
        id: MessageId,
        from: PhoneNumber,
        device: u32,
        content: Vec<u8>,
    },
    Status {
        business: BusinessId,
        id: MessageId,
        status: Status,
        failure: Option<FailureReason>,
    },
}

/// A copy of a status the business took: which business it was told to,
/// about which message, and why it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusCopy {
    /// The business the processor told.
    pub business: BusinessId,
    /// The message it is about.
    pub id: MessageId,
    /// The status.
    pub status: Status,
    /// Why it failed, for [`Status::Failed`].
    pub failure: Option<FailureReason>,
    /// Why the copy is there.
    pub cause: Cause,
    /// When the processor told it, as a count of the copies the business
    /// took: a copy told later has a larger number, whatever delays made
    /// of the order they show in (an injected duplicate has one of its own,
    /// after its original's).
    pub told: u64,
}

/// What a handover of a message carries besides its id: the business,
/// the sender (number and device) and the content.
type Handover = (BusinessId, PhoneNumber, u32, Vec<u8>);

/// A copy the business took, shown in the record from `visible`.
struct Arrival {
    visible: Timestamp,
    seq: u64,
    cause: Cause,
    item: Item,
}

/// What the business has, as far as the record shows at a given time.
struct Record {
    faults: Injector,
    /// Taken, not yet shown (delayed).
    held: Vec<Arrival>,
    seq: u64,
    /// Per message, its copies; an entry whose copies are all held back
    /// (`total() == 0`) is not shown.
    copies: BTreeMap<MessageId, Copies>,
    /// Messages a handover of which returned `Ok`.
    taken: BTreeSet<MessageId>,
    /// What the first handover of each message carried.
    first_handover: BTreeMap<MessageId, Handover>,
    /// Handovers that carried other than the first of their message.
    altered: u64,
    /// Handovers made per business, whatever their outcome.
    handovers: BTreeMap<BusinessId, u64>,
    contents: Vec<(BusinessId, MessageId, Vec<u8>)>,
    /// The sender of each message's first copy.
    senders: BTreeMap<MessageId, (PhoneNumber, u32)>,
    statuses: BTreeMap<MessageId, Vec<(Status, Option<FailureReason>)>>,
    status_log: Vec<StatusCopy>,
}

impl Record {
    fn hold(&mut self, visible: Timestamp, cause: Cause, item: Item) {
        self.seq += 1;
        self.held.push(Arrival {
            visible,
            seq: self.seq,
            cause,
            item,
        });
    }

    /// Show everything due by `now`, in the order it became visible.
    fn settle(&mut self, now: Timestamp) {
        if self.held.iter().all(|a| a.visible > now) {
            return;
        }
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|a| a.visible <= now);
        self.held = rest;
        due.sort_by_key(|a| (a.visible, a.seq));
        for arrival in due {
            match arrival.item {
                Item::Message {
                    business,
                    id,
                    from,
                    device,
                    content,
                } => {
                    let copies = self.copies.entry(id).or_default();
                    let first = copies.total() == 0;
                    copies.count(arrival.cause);
                    if first {
                        self.contents.push((business, id, content));
                        self.senders.insert(id, (from, device));
                    }
                }
                Item::Status {
                    business,
                    id,
                    status,
                    failure,
                } => {
                    if arrival.cause != Cause::Injected {
                        self.statuses.entry(id).or_default().push((status, failure));
                    }
                    self.status_log.push(StatusCopy {
                        business,
                        id,
                        status,
                        failure,
                        cause: arrival.cause,
                        told: arrival.seq,
                    });
                }
            }
        }
    }

    /// A handover of `id` is made: a repeat if one returned `Ok` before,
    /// altered if it carries other than the first.
    fn handover(
        &mut self,
        id: MessageId,
        now: Timestamp,
        handover: Handover,
    ) -> Result<(), SinkError> {
        if self.taken.contains(&id) {
            self.copies.entry(id).or_default().after_taken += 1;
        }
        let first = self
            .first_handover
            .entry(id)
            .or_insert_with(|| handover.clone());
        if *first != handover {
            self.altered += 1;
        }
        let (business, from, device, content) = handover;
        *self.handovers.entry(business).or_default() += 1;
        let item = || Item::Message {
            business,
            id,
            from: from.clone(),
            device,
            content: content.clone(),
        };
        let result = self.take(Leg::Deliver, now, item);
        if result.is_ok() {
            self.taken.insert(id);
        }
        result
    }

    /// Copies shown, with their repeats.
    fn shown(&self) -> impl Iterator<Item = (&MessageId, &Copies)> {
        self.copies.iter().filter(|(_, c)| c.total() > 0)
    }

    /// Decide the fate of a call on `leg` at `now`, and keep what the
    /// business took.
    fn take(&mut self, leg: Leg, now: Timestamp, item: impl Fn() -> Item) -> Result<(), SinkError> {
        let decision = self.faults.decide(leg, now);
        let result = self.apply(decision, now, &item);
        self.settle(now);
        result
    }

    fn apply(
        &mut self,
        decision: Decision,
        now: Timestamp,
        item: &impl Fn() -> Item,
    ) -> Result<(), SinkError> {
        let fate = decision.fate;
        if decision.outage {
            return Err(SinkError("simulated outage".into()));
        }
        if fate.failed {
            return Err(SinkError("simulated failure".into()));
        }
        if fate.dropped {
            if fate.reply_lost {
                self.hold(now.saturating_add(fate.delays[0]), Cause::ReplyLost, item());
                return Err(SinkError("simulated timeout: the reply was lost".into()));
            }
            return Err(SinkError("simulated timeout: the request was lost".into()));
        }
        self.hold(now.saturating_add(fate.delays[0]), Cause::Handed, item());
        if fate.duplicated {
            self.hold(now.saturating_add(fate.delays[1]), Cause::Injected, item());
        }
        Ok(())
    }
}

/// The businesses' endpoint: records what it is handed, with faults on
/// [`Leg::Deliver`] and [`Leg::Status`].
pub struct SimBusiness {
    record: Mutex<Record>,
    clock: ManualClock,
}

impl std::fmt::Debug for SimBusiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBusiness").finish_non_exhaustive()
    }
}

impl SimBusiness {
    /// An endpoint with `faults` on both its legs, deterministic under
    /// `seed` (see [`Faults::fate`]), reading time from `clock`; refused if
    /// [`Faults::validate`] refuses `faults`.
    pub fn new(clock: ManualClock, faults: Faults, seed: u64) -> Result<Arc<Self>, InvalidFaults> {
        faults.validate()?;
        Ok(Arc::new(Self {
            record: Mutex::new(Record {
                faults: Injector::new(faults, seed),
                held: Vec::new(),
                seq: 0,
                copies: BTreeMap::new(),
                taken: BTreeSet::new(),
                first_handover: BTreeMap::new(),
                altered: 0,
                handovers: BTreeMap::new(),
                contents: Vec::new(),
                senders: BTreeMap::new(),
                statuses: BTreeMap::new(),
                status_log: Vec::new(),
            }),
            clock,
        }))
    }

    /// The record, with everything due by now shown.
    fn record(&self) -> MutexGuard<'_, Record> {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        record.settle(self.clock.now());
        record
    }

    /// Inbound message ids shown so far, with how many times the processor
    /// handed each over from the first handover that returned `Ok` on:
    /// that one (once shown, [`Copies::handed`]) and every one after it
    /// whatever its outcome ([`Copies::after_taken`]). A processor that
    /// delivers exactly once gives 1 for every id; 0 is an id whose
    /// handovers all failed, though the business has a copy (a lost reply).
    pub fn messages(&self) -> BTreeMap<MessageId, u32> {
        self.record()
            .shown()
            .map(|(id, c)| (*id, u32::from(c.handed > 0) + c.after_taken))
            .collect()
    }

    /// Every copy of each inbound message shown so far, by cause, with
    /// the repeats made of it.
    pub fn copies(&self) -> BTreeMap<MessageId, Copies> {
        self.record().shown().map(|(id, c)| (*id, *c)).collect()
    }

    /// Contents shown so far: the first copy of each message (what a
    /// business deduplicating by id keeps), in the order they showed.
    pub fn contents(&self) -> Vec<(BusinessId, MessageId, Vec<u8>)> {
        self.record().contents.clone()
    }

    /// The sender (number and device) of each message shown so far, as
    /// its first copy named them.
    pub fn senders(&self) -> BTreeMap<MessageId, (PhoneNumber, u32)> {
        self.record().senders.clone()
    }

    /// Handovers of a message that named another business or sender
    /// (number and device), or carried other content, than its first
    /// handover did, whatever their outcome (counted when the call is
    /// made): none when the processor hands each message over again as
    /// it first did. [`contents`](Self::contents) and
    /// [`senders`](Self::senders) show first copies only.
    pub fn altered_handovers(&self) -> u64 {
        self.record().altered
    }

    /// Handovers the processor made to each business, whatever their
    /// outcome (counted when the call is made; injected duplicates are
    /// none): each should come with a release of its content, audited
    /// under that business.
    pub fn handovers(&self) -> BTreeMap<BusinessId, u64> {
        self.record().handovers.clone()
    }

    /// Statuses shown so far per message, in the order they showed:
    /// everything the processor sent that the business took (including
    /// those whose reply was lost), without the injector's duplicates.
    pub fn statuses(&self) -> BTreeMap<MessageId, Vec<(Status, Option<FailureReason>)>> {
        self.record().statuses.clone()
    }

    /// Every status copy shown so far, in order, with the business it was
    /// told to and its cause.
    pub fn status_log(&self) -> Vec<StatusCopy> {
        self.record().status_log.clone()
    }

    /// Copies the business took that do not show yet (delayed).
    pub fn held_back(&self) -> usize {
        self.record().held.len()
    }

    /// The faults met so far, per leg (legs with no events left out).
    pub fn fault_stats(&self) -> BTreeMap<Leg, LegStats> {
        self.record().faults.stats()
    }

    /// Every fault decision so far, in the order made.
    pub fn fault_log(&self) -> Vec<Decision> {
        self.record().faults.log()
    }
}

#[async_trait]
impl BusinessSink for SimBusiness {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        let now = self.clock.now();
        let handover = (
            message.business,
            message.from.clone(),
            message.device,
            message.content.to_vec(),
        );
        self.record().handover(message.id, now, handover)
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        let now = self.clock.now();
        self.record().take(Leg::Status, now, || Item::Status {
            business: update.business,
            id: update.id,
            status: update.status,
            failure: update.failure,
        })
    }
}
