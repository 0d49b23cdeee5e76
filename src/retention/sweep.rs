//! The sweep: deletes what retention no longer allows, in bounded,
//! resumable steps.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::gate::HoldGate;
use super::{CEILING, RetentionPolicy};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::keys::{Epoch, KeyError, KeyManager};
use crate::store::{
    Batch, Delivery, Direction, ExpiredMessage, HoldScope, MessageRecord, Op, PeerId, Status,
    Storage, StoreError,
};
use crate::time::Timestamp;

/// How long after its expiry a message is kept while its business cannot be
/// told how it ended (that it failed as expired, or a status report still
/// pending): one day. The content is unreadable from the expiry on (its
/// epoch key is destroyed); only the row waits, so that a business endpoint
/// down for a while still learns of every failure. Past the grace the sweep
/// deletes it anyway, counts it in [`SweepReport::failures_unreported`] and
/// logs it: retention's ceiling outranks the report. A legal hold suspends
/// the grace: what it keeps is still to be told, and is asked about at
/// every sweep.
pub const REPORT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Told when a message expires before it was delivered, so it never fails
/// silently. The processor tells the business; a host running retention on
/// its own can log or count. It is called during the sweep: a sweep it
/// starts is refused as [`SweepError::InProgress`].
#[async_trait]
pub trait ExpiryNotifier: Send + Sync {
    /// `message` expired undelivered: tell whoever is waiting.
    async fn expired_undelivered(&self, message: &MessageRecord) -> Notice;

    /// The sweep gave up telling how `message` ended, past
    /// [`REPORT_GRACE`]: an open one it failed unreported (its status
    /// `Failed` here), or a settled one it deleted with a report still
    /// pending. Called once the write giving up landed (by the next sweep,
    /// should this one fail or be dropped before it sees that write end),
    /// each message once (as [`SweepReport::failures_unreported`] counts
    /// it); nothing is asked of anyone. The processor counts the failures in its
    /// statistics, which count a failure when its business is told.
    fn gave_up(&self, message: &ExpiredMessage) {
        let _ = message;
    }
}

/// What came of telling that a message expired undelivered
/// ([`ExpiryNotifier::expired_undelivered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Whoever is waiting was told: the message is marked failed.
    Told,
    /// They could not be told (the business refused, or was unreachable):
    /// the message stays open, and its business is asked again at the next
    /// sweep, until [`REPORT_GRACE`] has passed; then it is failed
    /// unreported.
    Untold,
    /// An attempt to deliver it is under way: the sweep leaves it to that
    /// attempt (or the next sweep), even past the grace, for one grace
    /// more. Busy then, the attempt has stalled (a call no one times out):
    /// the message is failed unreported, as one whose business could not
    /// be told. Its business counts as reachable.
    Busy,
    /// It settled, or went, since the sweep listed it: nothing to tell.
    Settled,
}

/// A message the sweep gives up telling of, and the delivery state its
/// own write leaves it in: found so after that write, the write landed;
/// found otherwise, another settled it (the retransmission loop, telling
/// its business, which counted it).
#[derive(Debug, Clone, Copy)]
pub(super) struct GivenUp {
    message: ExpiredMessage,
    left: Delivery,
}

/// What came of dropping a message's report ([`Sweep::drop_report`]).
enum Dropped {
    /// The message is settled, at this status, with no report pending.
    Settled(Status),
    /// The message is open, as read: failing it is what leaves nothing
    /// pending.
    Open(Delivery),
    /// Its business was told meanwhile that it ended so (by the
    /// retransmission loop, say, which counted it).
    Told(Status),
    /// The message is gone, or its report is still pending (rewritten
    /// meanwhile: its deletion counts it).
    No,
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SweepReport {
    /// Open messages that expired, marked failed (reported, or given up
    /// on past [`REPORT_GRACE`]).
    pub failed_expired: u64,
    /// Messages whose business could not be told how they ended within
    /// [`REPORT_GRACE`] (each is also logged): open ones failed unreported
    /// (counted in `failed_expired` too), and settled ones deleted with a
    /// report still pending (counted in `messages_deleted` too). Each
    /// counts once: one failed unreported has its report dropped, so its
    /// deletion, in this sweep or a later one, does not count it again.
    pub failures_unreported: u64,
    /// Messages deleted.
    pub messages_deleted: u64,
    /// Signal peer records (sessions and trusted identities) deleted.
    pub peers_deleted: u64,
    /// Consumers whose Signal state was deleted: no message needs them.
    pub consumers_forgotten: u64,
    /// Epoch keys destroyed (ended epochs, and tombstones of early ones).
    pub epoch_keys_destroyed: u64,
    /// Store operations performed.
    pub steps: u64,
    /// Whether the sweep ran to the end (false if it stopped at its step budget).
    pub complete: bool,
    /// Time taken.
    pub elapsed: Duration,
}

/// Why a sweep stopped early with an error. What it did before is kept:
/// running it again continues.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key hierarchy failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Another sweep of the same retention is under way (one at a time: two
    /// would report the same expired messages); nothing was done. A sweep
    /// started from inside one (its [`ExpiryNotifier`], or the business a
    /// processor tells) gets this, where waiting would never end.
    #[error("another sweep is under way")]
    InProgress,
}

/// One sweep in progress.
pub(super) struct Sweep<'a> {
    pub(super) storage: &'a dyn Storage,
    /// A policy whose shortened periods are yet to be applied to the
    /// messages already stored, and where an earlier sweep's pass stopped.
    pub(super) shorten: Option<(&'a Arc<RetentionPolicy>, Option<Resume>)>,
    /// Where passes stop, kept current as this one goes: a sweep dropped
    /// in its pass (a host timing it out) leaves where it got to.
    pub(super) pass: &'a Mutex<Pass>,
    pub(super) keys: &'a KeyManager,
    /// Held by every step that deletes or shreds (see [`Sweep::held`]).
    pub(super) hold_gate: &'a HoldGate,
    pub(super) notifier: &'a dyn ExpiryNotifier,
    pub(super) now: Timestamp,
    pub(super) batch: usize,
    pub(super) max_steps: u64,
    pub(super) report: SweepReport,
    /// Businesses that could not be told of a message in this sweep.
    pub(super) unreachable: BTreeSet<BusinessId>,
    /// Pages of expiries the policy stage capped in this sweep.
    pub(super) capped: u64,
    /// Expired messages the fail stage asked their business about, or
    /// found settled (or gone) since it listed them: any may have settled
    /// meanwhile, failed by no one it counts, and be deletable now.
    pub(super) asked: u64,
    /// Businesses whose endpoint a sweep was waiting on when it was
    /// dropped, kept across sweeps until one answers.
    pub(super) hung: &'a Mutex<BTreeSet<BusinessId>>,
    /// Messages a sweep gave up telling of whose writes it did not see
    /// end (see [`Sweep::unsure`]), kept across sweeps.
    pub(super) unsure: &'a Mutex<Vec<GivenUp>>,
    /// The stage the next sweep starts with (see [`Sweep::run`]), kept
    /// current as this one goes: a sweep dropped in a stage leaves it too.
    pub(super) next_stage: &'a AtomicUsize,
    /// The stages that ran to their end since the store was last
    /// scrubbed, one bit each by index, kept across sweeps.
    pub(super) since_scrub: &'a AtomicU8,
    /// What this sweep had deleted and destroyed when it last scrubbed.
    pub(super) scrubbed_after: Option<u64>,
    /// A message of each business whose endpoint never answered, asked
    /// once the sweep's work is done (see [`Sweep::probe`]).
    pub(super) probes: Vec<Probe>,
}

/// A business's probe (see [`Sweep::probe`]).
pub(super) struct Probe {
    message: MessageRecord,
    /// Past the grace: failed in its turn.
    failed: bool,
    /// And counted unreported then.
    counted: bool,
}

/// Where a pass applying a shortened policy stopped (its step budget spent):
/// the next sweep goes on from there, so sweeps in slices smaller than the
/// pass still finish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resume {
    business: BusinessId,
    direction: Direction,
    after: Option<MessageId>,
}

/// A stage of the sweep (see [`Sweep::run`]).
#[derive(Clone, Copy)]
enum Stage {
    /// Destroy ended epochs' keys.
    Keys,
    /// Apply a shortened policy to the messages stored.
    Shorten,
    /// Delete expired settled messages, before businesses are told of
    /// expired open ones (which waits on their endpoints).
    DeleteSettled,
    /// Fail expired open messages, telling their businesses.
    FailOpen,
    /// Delete those, now settled.
    DeleteFailed,
    /// Forget consumers left without a message.
    Forget,
}

/// The stages in order; a sweep names where the next starts by index.
const STAGES: [Stage; 6] = [
    Stage::Keys,
    Stage::Shorten,
    Stage::DeleteSettled,
    Stage::FailOpen,
    Stage::DeleteFailed,
    Stage::Forget,
];

/// The stages that delete or destroy (by bit of their index): once each
/// has run to its end since the store was last scrubbed, it is scrubbed.
const DELETING: u8 = {
    let (mut bits, mut index) = (0, 0);
    while index < STAGES.len() {
        let stage = STAGES[index];
        if matches!(
            stage,
            Stage::Keys | Stage::DeleteSettled | Stage::DeleteFailed | Stage::Forget
        ) {
            bits |= 1 << index;
        }
        index += 1;
    }
    bits
};

/// The index of the stage after `index`'s, in the next sweep's order.
fn after_stage(index: usize) -> usize {
    (index + 1) % STAGES.len()
}

/// The policy last applied to the stored messages' expiries, and where its
/// pass stopped (`None`: every expiry reflects it).
pub(super) type Pass = Option<(Arc<RetentionPolicy>, Option<Resume>)>;

/// How far the policy stage got.
pub(super) enum Shortened {
    /// Every stored message's expiry reflects the policy.
    Done,
    /// Stopped by the step budget, here.
    At(Resume),
    /// Failed: the next sweep starts the pass again.
    Failed,
}

/// The holds in force, read under the hold gate, with the gate: no hold
/// can be placed or released until the step holding it is done.
struct Held<'g> {
    scopes: Vec<HoldScope>,
    _gate: async_lock::MutexGuard<'g, ()>,
}

impl Held<'_> {
    fn covers(&self, business: BusinessId, phone: PhoneHash) -> bool {
        self.scopes.iter().any(|h| h.covers(business, phone))
    }
}

impl<'a> Sweep<'a> {
    /// Count a step; `false` once the budget is spent.
    fn step(&mut self) -> bool {
        if self.report.steps >= self.max_steps {
            return false;
        }
        self.report.steps += 1;
        true
    }

    /// Counts what this sweep changed that a later stage may have to act
    /// on: expiries capped, messages failed, asked about (or settled
    /// meanwhile) or deleted, peers deleted.
    fn changes(&self) -> u64 {
        let r = &self.report;
        self.capped + self.asked + r.failed_expired + r.messages_deleted + r.peers_deleted
    }

    /// Counts what this sweep deleted or destroyed.
    fn deleted(&self) -> u64 {
        let r = &self.report;
        r.messages_deleted + r.peers_deleted + r.epoch_keys_destroyed
    }

    /// Messages that expired at or before this are deleted even if their
    /// business is still to be told something.
    fn abandon_before(&self) -> Timestamp {
        self.now.saturating_sub(REPORT_GRACE)
    }

    /// The holds in force now, and the gate that keeps them so for a step.
    async fn held(&self) -> Result<Held<'a>, SweepError> {
        let gate = self.hold_gate.lock(self.storage).await?;
        let scopes = self.storage.held_scopes().await?.into_iter().collect();
        Ok(Held {
            scopes,
            _gate: gate,
        })
    }

    /// Run every stage to the end, or until the step budget is spent.
    /// Each stage is idempotent, so a sweep stopped anywhere (by the budget,
    /// an error, a drop or a crash) is finished by the next one. Returns
    /// the report (or the first error) and how far applying the policy's
    /// shortened periods got.
    ///
    /// Ended epochs' keys are destroyed first: it takes one step and needs
    /// nothing from the other stages, so neither a small step budget nor a
    /// business endpoint that does not answer (stage 2 tells businesses of
    /// expired messages) keeps anything readable past its epoch. Expired
    /// settled messages are deleted before stage 2 too, and again after it.
    ///
    /// The stages run from where the last sweep stopped to the last, then
    /// all of them in order. Where it stopped: after the stage that spent
    /// its budget, or at the stage the budget left no step for, or after
    /// the stage it was dropped in (a host timing out a sweep whose
    /// business endpoint never answers). So no stage can keep the others
    /// from their turn: not one that takes every slice's budget (deletes
    /// that cannot keep pace), nor one that never returns. The keys' stage
    /// runs first (and once), wherever the others start, except with a
    /// budget of one step: there it takes its turn like the others, or no
    /// other stage would ever get a step.
    ///
    /// A stage that fails does not stop the later ones: a record that
    /// cannot be read (damaged, say) must not keep everything else past
    /// its retention. The first error is returned once every stage has
    /// run. (Once the budget is spent, each later stage stops at its first
    /// step.)
    pub(super) async fn run(mut self) -> (Result<SweepReport, SweepError>, Shortened) {
        let started = Instant::now();
        let mut failed = None;
        let mut done = |stage: Result<bool, SweepError>| {
            stage.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "a sweep stage failed; the later stages still run");
                failed.get_or_insert(e);
                false
            })
        };
        let mut shortened = Shortened::Done;
        // When each stage last ran to its end, by the count of changes
        // then: run again (in the second round) only if something changed
        // since, so that a slice can finish with no step to spare.
        let mut finished: [Option<u64>; STAGES.len()] = [None; STAGES.len()];
        // The same, for the two delete stages' one work: one that ran to its
        // end with nothing changed since leaves the other nothing to do.
        let mut deleted_all = None;
        let mut next = None;
        // The stages from `first` on, then all of them in order: a sweep
        // that can run to the end still has every stage after the ones it
        // depends on (failed messages are deleted after they are failed).
        let first = self.next_stage.load(Ordering::SeqCst);
        let from = if first == 0 {
            STAGES.len()
        } else {
            first.min(STAGES.len())
        };
        // The keys' stage (index 0) first, out of turn, but in slices of
        // one step: there it takes its turn.
        let keys_first = self.max_steps > 1;
        let turns = (from..STAGES.len())
            .chain(0..STAGES.len())
            .filter(|&index| !keys_first || index != 0);
        for index in keys_first.then_some(0).into_iter().chain(turns) {
            let (Some(&stage), Some(finished)) = (STAGES.get(index), finished.get_mut(index))
            else {
                continue;
            };
            let deletes = matches!(stage, Stage::DeleteSettled | Stage::DeleteFailed);
            if *finished == Some(self.changes()) {
                continue;
            }
            if deletes && deleted_all == Some(self.changes()) {
                *finished = deleted_all;
                self.scrub_once_deleted(index).await;
                continue;
            }
            // Run out of turn, the keys' stage leaves the turn where it is.
            if next.is_none() && !(keys_first && index == 0) {
                self.next_stage.store(after_stage(index), Ordering::SeqCst);
            }
            let steps = self.report.steps;
            let ended = match stage {
                Stage::Keys => done(self.destroy_ended_epochs().await),
                Stage::Shorten => match self.shorten_expiries().await {
                    Ok(None) => true,
                    Ok(Some(resume)) => {
                        shortened = Shortened::At(resume);
                        false
                    }
                    Err(e) => {
                        shortened = Shortened::Failed;
                        done(Err(e))
                    }
                },
                Stage::DeleteSettled | Stage::DeleteFailed => done(self.delete_expired().await),
                Stage::FailOpen => done(self.fail_expired_open().await),
                Stage::Forget => done(self.delete_orphan_peers().await),
            };
            *finished = ended.then(|| self.changes());
            if deletes && ended {
                deleted_all = *finished;
            }
            if ended {
                self.scrub_once_deleted(index).await;
            }
            // The first stage the budget stopped, in this sweep's order:
            // the next sweep starts after it if it had steps, else with it.
            if !ended && self.report.steps >= self.max_steps {
                let ran = self.report.steps > steps;
                next = next.or(Some(if ran { after_stage(index) } else { index }));
            }
        }
        self.next_stage.store(next.unwrap_or(0), Ordering::SeqCst);
        self.report.complete = failed.is_none() && finished.iter().all(Option::is_some);
        // A complete sweep leaves nothing it deleted in the store's files:
        // one that scrubbed before its last deletions scrubs again.
        if self.report.complete && self.scrubbed_after != Some(self.deleted()) {
            self.scrub().await;
        }
        // Last, as a probe may never return: a sweep dropped waiting has
        // done everything else.
        let before = self.changes();
        if let Err(e) = self.probe().await {
            failed.get_or_insert(e);
        }
        // A probe told fails its message, which nothing keeps then: a
        // complete sweep deletes it (and scrubs), as its stages would have.
        if self.report.complete && self.changes() != before {
            match self.delete_expired().await {
                Ok(true) if self.scrubbed_after != Some(self.deleted()) => self.scrub().await,
                Ok(true) => {}
                Ok(false) => self.report.complete = false,
                Err(e) => {
                    self.report.complete = false;
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return (Err(e), shortened);
        }
        self.report.elapsed = started.elapsed();
        (Ok(self.report), shortened)
    }

    /// Stage `index` ran to its end: once every stage that deletes has since
    /// the store was last scrubbed (in this sweep or earlier ones), what
    /// they deleted, which may live on in the store's own files, is
    /// scrubbed from them. A store that cannot scrub now is asked again
    /// when the next such stage ends.
    async fn scrub_once_deleted(&mut self, index: usize) {
        let Some(bit) = u32::try_from(index).ok().and_then(|i| 1u8.checked_shl(i)) else {
            return;
        };
        let ended = self.since_scrub.fetch_or(bit, Ordering::SeqCst) | bit;
        if bit & DELETING == 0 || ended & DELETING != DELETING {
            return;
        }
        self.scrub().await;
    }

    async fn scrub(&mut self) {
        match self.storage.scrub().await {
            Ok(()) => {
                self.since_scrub.store(0, Ordering::SeqCst);
                self.scrubbed_after = Some(self.deleted());
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store could not scrub deleted records yet");
            }
        }
    }

    /// Stage 1 (after a policy change): cap the expiry of stored messages
    /// at their creation plus the period now in force, wherever that is
    /// shorter, a page of one business at a time, from where the last
    /// sweep's pass stopped. Reads already refuse them; this lets the later
    /// stages delete them, and forget their consumers, on time. Returns
    /// where it stopped, or `None` once the pass is done.
    async fn shorten_expiries(&mut self) -> Result<Option<Resume>, SweepError> {
        let Some((policy, resume)) = self.shorten else {
            return Ok(None);
        };
        for business in self.storage.message_businesses().await? {
            if resume.is_some_and(|r| business < r.business) {
                continue;
            }
            for direction in Direction::ALL {
                let resumed = resume.filter(|r| r.business == business);
                if resumed.is_some_and(|r| direction < r.direction) {
                    continue;
                }
                let period = policy.period(business, direction);
                if period >= CEILING {
                    continue;
                }
                let mut after = resumed
                    .filter(|r| r.direction == direction)
                    .and_then(|r| r.after);
                loop {
                    if !self.step() {
                        let at = Resume {
                            business,
                            direction,
                            after,
                        };
                        // A later turn of this sweep at the stage (its
                        // budget spent, it takes no step) goes on from here,
                        // not from where the sweep began.
                        self.shorten = Some((policy, Some(at)));
                        return Ok(Some(at));
                    }
                    // A sweep dropped from here on goes on from here.
                    let here = Resume {
                        business,
                        direction,
                        after,
                    };
                    *self.pass.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((Arc::clone(policy), Some(here)));
                    after = self
                        .storage
                        .cap_expiry(business, direction, period, after, self.batch)
                        .await?;
                    self.capped += 1;
                    if after.is_none() {
                        break;
                    }
                }
            }
        }
        // Every expiry reflects the policy: a sweep dropped from here on
        // leaves none to apply.
        *self.pass.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Arc::clone(policy), None));
        self.shorten = None;
        Ok(None)
    }

    /// Stage 2: every message that expired undelivered is reported, then
    /// marked failed (and so becomes deletable). One not reported yet (its
    /// business unreachable) stays open for the next sweep, and this one
    /// pages past it, until [`REPORT_GRACE`] has passed: then it is failed
    /// unreported. A business that could not be told is not asked again
    /// in the same sweep, except of messages past the grace.
    ///
    /// A business whose endpoint never answered (a sweep was dropped
    /// waiting on it, a host timing it out) is asked of no message in its
    /// turn until it answers: its messages past the grace are failed
    /// unreported, the others stay open. Asked in turn, it would hold up
    /// every message after it, every sweep, and no other business's would
    /// ever be failed and deleted. Its first message is its probe, asked
    /// once the sweep's work is done ([`Sweep::probe`]): an answer ends its
    /// mark.
    async fn fail_expired_open(&mut self) -> Result<bool, SweepError> {
        self.settle_unsure().await?;
        let mut after = None;
        loop {
            let open = self
                .storage
                .expired_open_messages(self.now, after, self.batch)
                .await?;
            let Some(last) = open.last() else {
                return Ok(true);
            };
            after = Some((last.expiry, last.business, last.id));
            // Take the step before telling anyone, so a sweep stopped by its
            // budget never reports a message it then fails to mark. (A crash
            // between telling and marking reports it again next time: at
            // least once, never silently.)
            if !self.step() {
                return Ok(false);
            }
            // A hold suspends the grace: what it keeps stays to be told.
            // Read once a hold change owed is written, as every read of the
            // holds that decides on them is.
            let holds = self.hold_gate.scopes(self.storage).await?;
            let mut batch = Batch::new();
            // Those the batch fails unreported, told of once it lands.
            let mut gave_up = Vec::new();
            for m in open {
                // A business that could not be told once is not asked again
                // in this sweep (an endpoint that times out would cost a
                // timeout per message) about messages the next sweep can
                // still tell it of; those past the grace are asked all the
                // same, their last chance (a refusal may have been of one
                // message). A business whose endpoint never answered is
                // asked of none in its turn (asked, it would hold up every
                // message after it, every sweep): its messages past the
                // grace are failed unreported, the others stay open, and
                // its first is its probe, asked once the sweep's work is
                // done (see `probe`).
                let kept = holds.iter().any(|h| h.covers(m.business, m.phone));
                let last_chance = m.expiry <= self.abandon_before() && !kept;
                let hung = self.is_hung(m.business);
                // Its probe: its first message still open when asked (one
                // past the grace is failed and deleted by then, and a
                // notifier that finds it gone asks no one), else its first.
                let earlier = self
                    .probes
                    .iter()
                    .position(|p| p.message.business == m.business);
                let probe = hung
                    && earlier.is_none_or(|i| {
                        !last_chance && self.probes.get(i).is_some_and(|p| p.failed)
                    });
                if probe {
                    let next = Probe {
                        message: m.clone(),
                        failed: last_chance,
                        counted: false,
                    };
                    match earlier.and_then(|i| self.probes.get_mut(i)) {
                        Some(p) => *p = next,
                        None => self.probes.push(next),
                    }
                }
                if hung && !last_chance {
                    continue;
                }
                let ask = !hung && (last_chance || !self.unreachable.contains(&m.business));
                let notice = if ask {
                    // What is decided already lands before the wait: a sweep
                    // dropped in it loses none of it.
                    self.commit_failures(std::mem::take(&mut batch), &mut gave_up)
                        .await?;
                    // However it answers, the message may have settled
                    // meanwhile (delivered, say): deletable now.
                    self.asked += 1;
                    self.tell(&m).await
                } else {
                    Notice::Untold
                };
                // Under way a whole grace past the last chance, an attempt
                // has stalled: it would keep the message for as long.
                let stalled = m.expiry.saturating_add(REPORT_GRACE) <= self.abandon_before();
                let told = match notice {
                    Notice::Told => true,
                    // Given up on, the attempt under way would find it
                    // deleted when it ends: its business told nothing of a
                    // message it may have delivered.
                    Notice::Settled => continue,
                    Notice::Busy if !(last_chance && stalled) => continue,
                    Notice::Busy => {
                        tracing::warn!(
                            business = %m.business,
                            id = %m.id,
                            "an attempt on an expired message is still under way a day past the grace"
                        );
                        false
                    }
                    Notice::Untold => {
                        // Refused (not merely not asked, its endpoint
                        // hung: its probe stays to be made).
                        if ask {
                            self.unreachable.insert(m.business);
                        }
                        if !last_chance {
                            continue;
                        }
                        false
                    }
                };
                // Past the grace, its business is given up on (unless a hold
                // placed since the holds were read keeps the message: its
                // report then stays due).
                if !told {
                    if self.held().await?.covers(m.business, m.phone) {
                        // Left open, not failed: failed, it would be
                        // listed by no later sweep, and never told. Its
                        // probe, if it is one, fails it once told.
                        if let Some(p) = self.probes.last_mut().filter(|_| probe) {
                            p.failed = false;
                        }
                        continue;
                    }
                    // Told to the notifier once nothing is pending: a
                    // message settled already (failed by the notifier,
                    // say) once its report is dropped; an open one once
                    // the batch fails it.
                    let message = ExpiredMessage {
                        report_pending: false,
                        ..ExpiredMessage::from(&m)
                    };
                    let status = match self.drop_report(&m, message).await? {
                        // Its business was told how it ended meanwhile:
                        // nothing is given up here. A failure (the
                        // notifier's, told since) counts as one.
                        Dropped::Told(Status::Failed) => {
                            self.report.failed_expired += 1;
                            continue;
                        }
                        // Told it was delivered (or read), gone, or its
                        // report still due (its deletion counts it):
                        // nothing to count here.
                        Dropped::Told(_) | Dropped::No => {
                            self.asked += 1;
                            continue;
                        }
                        // Settled since it was listed, its report now
                        // dropped: a failure (the notifier's) counts as
                        // one, a delivery as none.
                        Dropped::Settled(status) => {
                            self.notifier.gave_up(&ExpiredMessage { status, ..message });
                            status
                        }
                        Dropped::Open(d) => {
                            let left = d.failed_expired();
                            let given_up = GivenUp { message, left };
                            self.unsure(given_up, true);
                            gave_up.push(given_up);
                            Status::Failed
                        }
                    };
                    tracing::warn!(
                        business = %m.business,
                        id = %m.id,
                        ?status,
                        "expired; its business could not be told how it ended within the grace"
                    );
                    self.report.failures_unreported += 1;
                    // Uncounted, should its probe be told after all.
                    if let Some(p) = self.probes.last_mut().filter(|_| probe) {
                        p.counted = true;
                    }
                    if status != Status::Failed {
                        self.asked += 1;
                        continue;
                    }
                }
                // Conditional: a message settled meanwhile stays settled.
                batch.push(Op::FailExpired {
                    business: m.business,
                    id: m.id,
                });
                self.report.failed_expired += 1;
            }
            self.commit_failures(batch, &mut gave_up).await?;
        }
    }

    /// Commit `batch` (if anything is in it), then tell the notifier of
    /// those of `gave_up`, the messages it fails unreported, that it failed
    /// (a failing write is conditional). Should the commit fail, or the
    /// sweep be dropped waiting, they stay unsure (see `unsure`).
    async fn commit_failures(
        &self,
        batch: Batch,
        gave_up: &mut Vec<GivenUp>,
    ) -> Result<(), SweepError> {
        if !batch.is_empty() {
            self.storage.commit(batch).await?;
        }
        for given_up in std::mem::take(gave_up) {
            self.settle(given_up).await?;
        }
        Ok(())
    }

    /// Note `given_up` as unsure (`true`: from before its write starts),
    /// or no longer (`false`: once settled). One that stays unsure (the
    /// sweep failed, or was dropped, waiting on a write that may have
    /// landed) is settled by the next sweep
    /// ([`settle_unsure`](Self::settle_unsure)): found failed with nothing
    /// pending, it would be listed no more, and its failure would be
    /// counted nowhere.
    fn unsure(&self, given_up: GivenUp, unsure: bool) {
        let m = given_up.message;
        let mut all = self.unsure.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|u| (u.message.business, u.message.id) != (m.business, m.id));
        if unsure {
            all.push(given_up);
        }
    }

    /// Tell the notifier of `given_up` if the sweep's write left it as it
    /// is (see [`GivenUp`]), and note it settled.
    async fn settle(&self, given_up: GivenUp) -> Result<(), SweepError> {
        let m = given_up.message;
        let now = self.storage.message(m.business, m.id).await?;
        if now.is_some_and(|now| now.delivery == given_up.left) {
            let status = given_up.left.status;
            self.notifier.gave_up(&ExpiredMessage { status, ..m });
        }
        self.unsure(given_up, false);
        Ok(())
    }

    /// Settle each message an earlier sweep gave up telling of without
    /// seeing its write end ([`settle`](Self::settle)). Run before the
    /// stages that list or delete them: a read that fails fails the sweep
    /// (deleted meanwhile, the message would be counted nowhere), unless
    /// the row is damaged, when the message is given up on, uncounted
    /// (a damaged row would hold up every sweep).
    async fn settle_unsure(&self) -> Result<(), SweepError> {
        let unsure = self
            .unsure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for given_up in unsure {
            match self.settle(given_up).await {
                Err(SweepError::Store(StoreError::Corrupt(e))) => {
                    let m = given_up.message;
                    tracing::warn!(business = %m.business, id = %m.id, error = %e, "whether a failure given up was counted is unknown: its row is damaged");
                    self.unsure(given_up, false);
                }
                settled => settled?,
            }
        }
        Ok(())
    }

    /// Ask each business whose endpoint never answered of its probe (its
    /// first expired open message within the grace or kept by a hold, else
    /// its first), once the sweep's work is done: an
    /// answer ends its mark, so that it is asked in its turn again, and a
    /// sweep dropped waiting has held up nothing. A probe within the grace
    /// (or kept by a hold) that is told is marked failed (a step
    /// permitting; else it is told again). One past the grace was failed,
    /// counted and logged in its turn (and is deleted by now): told after
    /// all, it is uncounted. A probe whose notifier reached no one (an
    /// attempt under way, or its message settled or gone) leaves the
    /// business marked.
    async fn probe(&mut self) -> Result<(), SweepError> {
        for p in std::mem::take(&mut self.probes) {
            let m = &p.message;
            if !self.is_hung(m.business) || self.unreachable.contains(&m.business) {
                continue;
            }
            let answer = self.tell(m).await;
            match (p.failed, answer) {
                // Its endpoint was not reached (an attempt under way, or
                // the message settled or gone): still marked.
                (_, Notice::Busy | Notice::Settled) => {
                    let mut hung = self.hung.lock().unwrap_or_else(PoisonError::into_inner);
                    hung.insert(m.business);
                }
                (true, Notice::Told) if p.counted => {
                    self.report.failures_unreported =
                        self.report.failures_unreported.saturating_sub(1);
                    tracing::info!(business = %m.business, id = %m.id, "its business was told after all");
                }
                (false, Notice::Told) if self.step() => {
                    let op = Op::FailExpired {
                        business: m.business,
                        id: m.id,
                    };
                    self.storage.commit(op.into()).await?;
                    self.report.failed_expired += 1;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Give up telling `m`'s business how it ended (its failure counted
    /// unreported, no hold keeping it): a report the notifier left pending
    /// when the business refused it is dropped, so that neither the
    /// retransmission loop asks again nor the deletion, in this sweep or a
    /// later one, counts it again. A message the retransmission loop keeps
    /// rewriting meanwhile may keep its report (and be counted again, as
    /// its deletion finds it pending).
    async fn drop_report(
        &self,
        m: &MessageRecord,
        message: ExpiredMessage,
    ) -> Result<Dropped, SweepError> {
        // Conditional: a message the retransmission loop rewrote meanwhile
        // (its report refused again) is read again, a few times.
        for _ in 0..3 {
            let Some(now) = self.storage.message(m.business, m.id).await? else {
                return Ok(Dropped::No);
            };
            let d = now.delivery;
            if d.status.is_open() {
                return Ok(Dropped::Open(d));
            }
            // Nothing pending: its business was told meanwhile (which
            // counted it), by the retransmission loop, say, or told its
            // status while devices were still being sent it.
            if d.next_attempt.is_none() || d.told_already() {
                return Ok(Dropped::Told(d.status));
            }
            // Giving up counts as an attempt: what the write leaves is
            // then told from what telling the business would (which
            // leaves the attempts as they were, see `report_status`).
            let left = Delivery {
                next_attempt: None,
                attempts: d.attempts.saturating_add(1),
                ..d
            };
            let op = Op::UpdateDelivery {
                business: m.business,
                id: m.id,
                expected: d,
                delivery: left,
            };
            // Unsure until the write is seen to end (see `unsure`).
            let given_up = GivenUp {
                message: ExpiredMessage {
                    status: d.status,
                    ..message
                },
                left,
            };
            self.unsure(given_up, true);
            match self.storage.commit(op.into()).await {
                Ok(()) => {
                    self.unsure(given_up, false);
                    return Ok(Dropped::Settled(d.status));
                }
                Err(StoreError::Conflict) => self.unsure(given_up, false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Dropped::No)
    }

    /// Whether `business`'s endpoint never answered a sweep.
    fn is_hung(&self, business: BusinessId) -> bool {
        self.hung
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&business)
    }

    /// Tell `m`'s business that `m` expired undelivered. Until its endpoint
    /// answers, the business counts as hung: a sweep dropped meanwhile
    /// leaves it so for the next.
    async fn tell(&self, m: &MessageRecord) -> Notice {
        let set = |hung: bool| {
            let mut all = self.hung.lock().unwrap_or_else(PoisonError::into_inner);
            if hung {
                all.insert(m.business);
            } else {
                all.remove(&m.business);
            }
        };
        set(true);
        let told = self.notifier.expired_undelivered(m).await;
        set(false);
        told
    }

    /// Stage 3: delete expired, settled, unheld messages: those whose
    /// business is still to be told something (a report pending) only past
    /// [`REPORT_GRACE`], each counted in
    /// [`SweepReport::failures_unreported`] and logged (stage 2 dropped
    /// the report of each it counted). Their consumers'
    /// Signal state goes in stage 4, in one pass over the peers: a step's
    /// messages span most consumers (they are taken in expiry order), so
    /// checking those consumers after every step would check most of them
    /// again and again.
    async fn delete_expired(&mut self) -> Result<bool, SweepError> {
        self.settle_unsure().await?;
        loop {
            if !self.step() {
                return Ok(false);
            }
            let held = self.held().await?;
            let deleted = self
                .storage
                .delete_expired(self.now, self.abandon_before(), &held.scopes, self.batch)
                .await?;
            if deleted.is_empty() {
                return Ok(true);
            }
            self.report.messages_deleted += deleted.len() as u64;
            let unreported = deleted.iter().filter(|m| m.report_pending);
            for m in unreported {
                tracing::warn!(
                    business = %m.business,
                    id = %m.id,
                    "deleted past the grace; its business could not be told how it ended"
                );
                self.report.failures_unreported += 1;
                self.notifier.gave_up(m);
            }
        }
    }

    /// Stage 4: a full scan for Signal state no live message needs: the
    /// consumers whose last messages stage 3 deleted (in this sweep or in
    /// one interrupted before), and any left by other means. Each peer is
    /// deleted only if its consumer still has no live message (one may have
    /// arrived since the page was listed: that peer stays, though the
    /// report counts it).
    async fn delete_orphan_peers(&mut self) -> Result<bool, SweepError> {
        let mut after = None;
        // Pages are in key order, so one consumer's devices are adjacent.
        let mut last_consumer = None;
        loop {
            let orphans = self
                .storage
                .orphan_peers(self.now, after, self.batch)
                .await?;
            let Some(&last) = orphans.last() else {
                return Ok(true);
            };
            after = Some(last);
            let held = self.held().await?;
            let peers: Vec<(BusinessId, PeerId)> = orphans
                .into_iter()
                .filter(|(b, p)| !held.covers(*b, p.phone))
                .collect();
            if peers.is_empty() {
                continue;
            }
            if !self.step() {
                return Ok(false);
            }
            let mut batch = Batch::new();
            for &(business, peer) in &peers {
                batch.push(Op::DeleteIdlePeer {
                    business,
                    peer,
                    now: self.now,
                });
            }
            self.storage.commit(batch).await?;
            self.report.peers_deleted += peers.len() as u64;
            for (business, peer) in peers {
                if last_consumer.replace((business, peer.phone)) != Some((business, peer.phone)) {
                    self.report.consumers_forgotten += 1;
                }
            }
        }
    }

    /// Stage 0: destroy the keys of ended epochs, except those still
    /// sealing a record under a legal hold (a message, or a Signal record).
    /// Unfinished if a hold stored since the holds were read spared any.
    ///
    /// If the epochs of a held business's records cannot be read (a
    /// damaged record: [`StoreError::Corrupt`]), which keys the hold needs
    /// is unknown: every ended epoch key of that business is kept (and the
    /// failure logged), and the other businesses' keys are destroyed as
    /// usual. Any other failure fails the stage, destroying nothing.
    async fn destroy_ended_epochs(&mut self) -> Result<bool, SweepError> {
        if !self.step() {
            return Ok(false);
        }
        let held = self.held().await?;
        let mut keep: BTreeSet<(BusinessId, Epoch)> = BTreeSet::new();
        // Businesses all of whose ended epoch keys are kept.
        let mut keep_all: BTreeSet<BusinessId> = BTreeSet::new();
        for hold in &held.scopes {
            let business = hold.business();
            match super::held_epochs(self.storage, *hold).await {
                Ok(epochs) => keep.extend(epochs.into_iter().map(|e| (business, e))),
                Err(StoreError::Corrupt(what)) => {
                    tracing::warn!(
                        %business,
                        error = %what,
                        "a held business's record epochs do not decode: all its ended epoch keys are kept"
                    );
                    keep_all.insert(business);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let (destroyed, spared) = self
            .keys
            .destroy_ended_epochs_except(
                self.now,
                |business, epoch| keep_all.contains(&business) || keep.contains(&(business, epoch)),
                Some(&held.scopes),
            )
            .await?;
        self.report.epoch_keys_destroyed += destroyed;
        // Spared for a hold stored since the holds were read: the stage is
        // unfinished (the sweep incomplete), and its next turn reads it.
        Ok(!spared)
    }
}
