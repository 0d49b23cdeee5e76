//! Retention and residency, enforced at read time, by sweep and by
//! crypto-shredding.
//!
//! The promises:
//!
//! - **Nothing is readable after its retention period**: 30 days at most
//!   ([`CEILING`], which no configuration can raise), shorter where the
//!   business sets it, per class of message. [`evaluate()`] decides for reads
//!   (an expired message is refused whether or not the sweep has run); the
//!   sealed expiry stops the [`Vault`](crate::vault::Vault) from opening it;
//!   and the key of its expiry epoch is destroyed when the epoch ends, which
//!   makes it unreadable in every copy of the store.
//! - **A consumer's phone number and Signal state are gone once no stored
//!   message refers to them**: the number lives only inside sealed messages,
//!   and the [sweep](Retention::sweep) deletes a consumer's sessions and
//!   trusted identities as soon as their last message is deleted.
//! - **Content at rest stays in the region the business chose**:
//!   [`check_residency`] refuses a store in another region (the processor
//!   checks it on every receive and send), the region is sealed into every
//!   envelope, and a SQLite store records its region and refuses to be
//!   opened as another's. The processor keeps no content in memory beyond
//!   the call that handles it: between attempts everything waits sealed in
//!   the store. A host that takes content out of its region (a cache, an
//!   opt-in service) holds it as [`InUse`], which wipes it once the
//!   in-use TTL ([`RetentionPolicy::in_use_ttl`], default 60 minutes) has
//!   passed, or when it is dropped.
//!
//! Legal holds ([`Retention::place_hold`]) are explicit and audited. While
//! one stands, what it covers is neither deleted nor shredded (it is still
//! not readable through normal reads); releasing it lets the next sweep
//! catch up.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use custodian::retention::{RetentionPolicy, PolicyError};
//!
//! let policy = RetentionPolicy::from_toml(r#"
//!     retention = "30d"
//!     [business.1001]
//!     outbound = "7d"
//! "#)?;
//! assert_eq!(policy.periods(custodian::ids::BusinessId::new(1001).unwrap()).outbound,
//!            Duration::from_secs(7 * 86_400));
//!
//! let too_long = RetentionPolicy::from_toml("[business.1001]\nretention = \"31d\"");
//! assert_eq!(too_long.unwrap_err().field, "business.1001.retention");
//! # Ok::<(), PolicyError>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::ids::{BusinessId, PhoneHash, Region};
use crate::keys::{Epoch, KeyError, KeyManager};
use crate::store::{Hold, HoldScope, MessageRecord, Op, Storage, StoreError};
use crate::time::Timestamp;
use crate::visibility::{AuditError, AuditSink, Change, HoldAction, HoldEvent};

mod evaluate;
mod gate;
mod policy;
mod residency;
mod sweep;

use gate::HoldGate;

pub use evaluate::{Decision, PurgeReason, RecordFacts, effective_expiry, evaluate};
pub use policy::{
    BusinessFile, BusinessRetention, CEILING, DEFAULT_IN_USE_TTL, Periods, PolicyError, PolicyFile,
    RetentionPolicy, format_duration, parse_duration,
};
pub use residency::{InUse, ResidencyError, check_residency};
pub use sweep::{ExpiryNotifier, Notice, REPORT_GRACE, SweepError, SweepReport};

/// Why a retention policy was not put in force. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyChangeError {
    /// The policy lengthens a period while the one in force is not yet
    /// applied to every stored message: run a sweep first (see
    /// [`Retention::set_policy`]).
    #[error(
        "a longer retention period is refused until a sweep has applied the policy in force \
         to the stored messages"
    )]
    Unapplied,
    /// The audit trail could not record the change.
    #[error("the policy change could not be audited: {0}")]
    Audit(#[from] AuditError),
}

/// Why a legal hold could not be placed or released. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HoldError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit trail could not record the change, so it was undone.
    #[error("the hold change could not be audited: {0}")]
    Audit(#[from] AuditError),
    /// A legal hold covers a record sealed under the epoch key an early
    /// shred would destroy (a message, or a consumer's Signal record):
    /// nothing was destroyed.
    #[error("a legal hold covers a record of that epoch")]
    Held,
    /// A legal hold covers the consumer whose state the call would forget:
    /// nothing was forgotten.
    #[error("a legal hold covers the consumer")]
    ConsumerHeld,
    /// The key hierarchy failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The epochs whose keys a legal hold on `scope` keeps from shredding:
/// those of the messages it covers, and those its consumers' Signal records
/// are sealed under (each sealed with the latest expiry of any message
/// exchanged with the device, which may be one deleted since).
async fn held_epochs(
    storage: &dyn Storage,
    scope: HoldScope,
) -> Result<BTreeSet<Epoch>, StoreError> {
    let (business, phone) = (scope.business(), scope.phone());
    let mut epochs: BTreeSet<Epoch> = storage
        .message_epochs(business, phone)
        .await?
        .into_iter()
        .collect();
    epochs.extend(storage.peer_epochs(business, phone).await?);
    Ok(epochs)
}

/// Messages a sweep handles per store operation. Each step is one
/// transaction: in SQLite, smaller steps rewrite the same index pages more
/// often (sweeping 1M expired messages, with consumer and key clean-up,
/// against one bare `DELETE` of them: 79% of its rate in steps of 65,536,
/// 93% in steps of 262,144; `benches/retention.rs`), larger ones hold the
/// writer longer (about 1 s per step of 65,536 on the reference machine,
/// 3.4 s per step of 262,144). The default favours the latency of the
/// message traffic the writer also serves; a host that sweeps a backlog
/// off-peak can raise it with [`Retention::with_batch`].
const DEFAULT_BATCH: usize = 65_536;

/// A new message admitted under the retention policy in force (see
/// [`Retention::admit`]): give it its expiry by [`policy`](Self::policy),
/// and drop the admission once the write storing it was made, whatever came
/// of that write (stored; failed, perhaps with its answer lost; or the
/// caller's future dropped at the commit, which may land all the same).
///
/// Dropped, it tells retention that the message may be stored: if a policy
/// was put in force since, a sweep applying it may have passed before the
/// message landed, and the next sweep applies it again, so no message keeps
/// an expiry the policy no longer allows. Dropping an admission whose
/// message was never written costs that sweep a pass over the expiries,
/// nothing more. While it lives, a policy lengthening a period is refused
/// once another has changed a period (see [`Retention::set_policy`]).
#[must_use = "drop the admission once the message's storing write was made"]
pub struct Admission<'a> {
    retention: &'a Retention,
    policy: Arc<RetentionPolicy>,
    generation: u64,
    /// Held by every admission under the same periods: once a change
    /// replaced them, an admission under them is alive while it is.
    _admitted: Arc<()>,
}

impl Admission<'_> {
    /// The policy in force when the message arrived.
    pub fn policy(&self) -> &RetentionPolicy {
        &self.policy
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        // Before the token goes (it is a field: dropped after this).
        if self.retention.generation.load(Ordering::SeqCst) != self.generation {
            self.retention.stale.store(true, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for Admission<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("policy", &self.policy)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The policy in force, and the token every admission under its periods
/// holds.
struct InForce {
    policy: Arc<RetentionPolicy>,
    admitted: Arc<()>,
}

/// Retention over one store: the policy in force, legal holds, the sweep.
pub struct Retention {
    storage: Arc<dyn Storage>,
    keys: Arc<KeyManager>,
    audit: Arc<dyn AuditSink>,
    policy: RwLock<InForce>,
    /// The tokens of the periods replaced while admissions under them may
    /// be alive (see [`Admission`]).
    replaced: Mutex<Vec<Weak<()>>>,
    /// The policy last applied to the stored messages' expiries, and where
    /// its pass stopped for the next sweep to go on from (`None`: every
    /// expiry reflects it). `None` until a sweep has applied one: stores
    /// outlive processes.
    pass: Mutex<sweep::Pass>,
    /// The stage the next sweep starts with (after the keys', which run
    /// first out of turn but in slices of one step: see `Sweep::run`): the
    /// one after the stage where the last sweep's step budget stopped it
    /// (or that stage itself, if the budget left it no step), or after the
    /// one it was dropped in.
    next_stage: AtomicUsize,
    /// The stages that ran to their end since the store was last scrubbed,
    /// one bit each (see `Sweep::run`): once every stage that deletes has,
    /// the store is scrubbed, whether or not one sweep ran them all.
    since_scrub: AtomicU8,
    /// Counts the policy changes that changed a period, each made under
    /// the policy's write lock: the policy an [`Admission`] was given.
    generation: AtomicU64,
    /// A message given its expiry under a policy replaced before it was
    /// stored may have been stored behind a sweep applying the new one:
    /// the next sweep applies the policy in force again.
    stale: AtomicBool,
    batch: usize,
    /// One sweep at a time: two would report the same expired messages.
    /// Taken without waiting: a sweep started from inside one would wait
    /// for itself.
    sweeping: async_lock::Mutex<()>,
    /// Taken by every hold change and by every sweep step that deletes or
    /// shreds, which reads the holds afresh under it: a hold placed while
    /// a sweep runs is honoured from the sweep's next step on.
    hold_gate: HoldGate,
    /// Businesses whose endpoint a sweep was waiting on when it was dropped
    /// (see `Sweep::fail_expired_open`), until one answers.
    hung: Mutex<BTreeSet<BusinessId>>,
    /// Messages a sweep gave up telling of whose writes it did not see
    /// end (see `Sweep::unsure`).
    unsure: Mutex<Vec<sweep::GivenUp>>,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("policy", &self.policy())
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Retention {
    /// Retention of the records in `storage`, whose epoch keys `keys`
    /// manages, under `policy`; legal-hold changes are written to `audit`.
    pub fn new(
        storage: Arc<dyn Storage>,
        keys: Arc<KeyManager>,
        policy: RetentionPolicy,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            storage,
            keys,
            audit,
            policy: RwLock::new(InForce {
                policy: Arc::new(policy),
                admitted: Arc::new(()),
            }),
            replaced: Mutex::new(Vec::new()),
            pass: Mutex::new(None),
            next_stage: AtomicUsize::new(0),
            since_scrub: AtomicU8::new(0),
            generation: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            batch: DEFAULT_BATCH,
            sweeping: async_lock::Mutex::new(()),
            hold_gate: HoldGate::new(),
            hung: Mutex::new(BTreeSet::new()),
            unsure: Mutex::new(Vec::new()),
        }
    }

    /// Handle `batch` messages per store operation in sweeps (at least one;
    /// default 65,536). Larger batches sweep a backlog faster; smaller ones
    /// keep each step, which holds the store's writer, short.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<RetentionPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .policy
            .clone()
    }

    /// Put `policy` in force, for `principal` (who asked, as the audit
    /// trail names them), at `now`. Shorter periods apply at once to reads
    /// of messages already stored; the next sweep shortens their stored
    /// expiry too, and deletes them (and forgets their consumers) once it
    /// passes. Recorded in the audit trail first ([`Change::Retention`]): a
    /// policy the trail cannot record is not put in force.
    ///
    /// A policy that lengthens any period is refused
    /// ([`PolicyChangeError::Unapplied`]) until a sweep has applied the one
    /// in force to every stored message (its policy stage done, in one
    /// sweep or over slices, after the last message admitted under an
    /// earlier policy was stored; a process just started has applied none
    /// yet). Lengthened sooner, a period would give back what a shortening
    /// ended: the messages it made unreadable, not yet capped in the store,
    /// would be readable again. So a shortening is undone by sweeping
    /// first: what it ended stays ended, in the store, and the longer
    /// period applies to messages stored from then on. A policy with the
    /// same periods (another region, say) keeps what the last pass applied.
    ///
    /// The policy in force lives in this instance, not in the store: a
    /// shortening no sweep has applied yet is lost with the process, and a
    /// process started with a longer policy reads by that one. Sweep after
    /// shortening (a [`sweep`](Self::sweep) caps the stored expiries for
    /// good), and start a process with the policy last put in force.
    pub fn set_policy(
        &self,
        policy: RetentionPolicy,
        principal: &str,
        now: Timestamp,
    ) -> Result<(), PolicyChangeError> {
        let mut current = self.policy.write().unwrap_or_else(|p| p.into_inner());
        let longer = policy.lengthens(&current.policy);
        if longer && !self.applied(&current.policy) {
            return Err(PolicyChangeError::Unapplied);
        }
        self.audit.record_change(&Change::Retention {
            at: now,
            principal: principal.to_owned(),
            digest: policy.digest(),
        })?;
        let policy = Arc::new(policy);
        if longer || current.policy.lengthens(&policy) {
            self.generation.fetch_add(1, Ordering::SeqCst);
            let replaced = std::mem::replace(&mut current.admitted, Arc::new(()));
            let mut tokens = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
            tokens.retain(|t| t.strong_count() > 0);
            tokens.push(Arc::downgrade(&replaced));
        } else {
            // The same periods (a region or a TTL changed): what a pass
            // applied of the old policy, it applied of this one.
            let mut pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((applied, _)) = pass.as_mut()
                && Arc::ptr_eq(applied, &current.policy)
            {
                *applied = policy.clone();
            }
        }
        current.policy = policy;
        Ok(())
    }

    /// Whether every stored message's expiry reflects `policy`: a sweep's
    /// pass applied it, no message was stored since under a policy
    /// replaced before it, and none admitted under one is being stored.
    fn applied(&self, policy: &Arc<RetentionPolicy>) -> bool {
        let pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
        let done = matches!(pass.as_ref(), Some((p, None)) if Arc::ptr_eq(p, policy));
        let mut tokens = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|t| t.strong_count() > 0);
        // Synchronises with the last admission's drop, whose `stale` is
        // then seen.
        fence(Ordering::Acquire);
        done && tokens.is_empty() && !self.stale.load(Ordering::SeqCst)
    }

    /// Admit a new message under the policy in force, to give it its expiry
    /// by; drop the admission once the write storing the message was made
    /// (see [`Admission`]).
    pub fn admit(&self) -> Admission<'_> {
        let current = self.policy.read().unwrap_or_else(|p| p.into_inner());
        Admission {
            retention: self,
            policy: current.policy.clone(),
            generation: self.generation.load(Ordering::SeqCst),
            _admitted: current.admitted.clone(),
        }
    }

    /// Refuse to store content of `business` in a store outside its region.
    pub fn check_residency(
        &self,
        business: BusinessId,
        store: Region,
    ) -> Result<(), ResidencyError> {
        check_residency(business, self.policy().region(business), store)
    }

    /// Whether `message` may still be read at `now`: before its expiry
    /// under the policy in force (a shortened period applies before the
    /// sweep caps the stored expiry). The same answer as
    /// [`decide`](Self::decide)'s [`Decision::readable`], without reading
    /// the holds, which only matter once a message is past it.
    pub fn readable(&self, message: &MessageRecord, now: Timestamp) -> bool {
        self.readable_facts(&RecordFacts::from(message), now)
    }

    /// [`readable`](Self::readable), from the facts retention looks at.
    pub fn readable_facts(&self, facts: &RecordFacts, now: Timestamp) -> bool {
        now < self.expiry(facts)
    }

    /// When `record` stops being readable under the policy in force.
    fn expiry(&self, record: &RecordFacts) -> Timestamp {
        effective_expiry(record, &self.policy())
    }

    /// What retention says about `message` at `now`: the check every read
    /// makes before opening it. Past its expiry, the holds are read from
    /// the store, so that a hold another process stored is seen.
    pub async fn decide(
        &self,
        message: &MessageRecord,
        now: Timestamp,
    ) -> Result<Decision, StoreError> {
        let facts = RecordFacts::from(message);
        let expiry = self.expiry(&facts);
        let holds = if now < expiry {
            Vec::new()
        } else {
            self.hold_gate.scopes(&*self.storage).await?
        };
        Ok(evaluate::decide_at(&facts, expiry, now, &holds))
    }

    /// Sweep everything retention no longer allows at `now`: report open
    /// messages that expired to `notifier` and mark them failed, delete
    /// expired messages and the Signal state of consumers left without a
    /// live message, destroy the keys of ended epochs. Nothing a legal hold
    /// covers is touched. Idempotent; if interrupted, the next sweep finishes.
    /// One at a time: while one is under way, another is refused as
    /// [`SweepError::InProgress`] (it would only repeat its work).
    pub async fn sweep(
        &self,
        now: Timestamp,
        notifier: &dyn ExpiryNotifier,
    ) -> Result<SweepReport, SweepError> {
        self.sweep_steps(now, notifier, u64::MAX).await
    }

    /// A sweep that stops after `max_steps` store operations; its report says
    /// whether it finished. For hosts that sweep in slices, and for tests
    /// that interrupt it. Each slice destroys ended epochs' keys first (one
    /// step), then takes the other stages in turn from the one after the
    /// stage where the last slice's budget stopped it (or that stage, if
    /// the budget left it no step; or after the stage the last sweep was
    /// dropped in), and goes on applying a shortened policy from
    /// where the last one stopped: slices of a few steps take every stage
    /// in turn, however busy the store, and a stage that never returns (a
    /// business endpoint that does not answer, the sweep timed out) keeps
    /// no other from its turn. Slices of one step take the keys' stage in
    /// its turn too, one stage a slice, so that every stage gets a step;
    /// they never complete, as even a sweep with nothing to do takes two
    /// steps. The store is scrubbed ([`Storage::scrub`]) once every stage
    /// that deletes (the keys', the two deleting messages, the one
    /// forgetting consumers) has run to its end since it last was, in
    /// one slice or several: slices too small to complete, and sweeps
    /// dropped each time in the same stage, scrub it all the same.
    pub async fn sweep_steps(
        &self,
        now: Timestamp,
        notifier: &dyn ExpiryNotifier,
        max_steps: u64,
    ) -> Result<SweepReport, SweepError> {
        let Some(_sweeping) = self.sweeping.try_lock() else {
            return Err(SweepError::InProgress);
        };
        let policy = self.policy();
        // Taken before the stage that applies the policy: a message stored
        // late from here on marks the next sweep's. A message stored late
        // may lie anywhere, behind where a pass stopped included: the pass
        // starts again.
        let shorten = {
            let mut pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
            if self.stale.swap(false, Ordering::SeqCst) {
                *pass = None;
            }
            match pass.as_ref().filter(|(p, _)| Arc::ptr_eq(p, &policy)) {
                // Every expiry reflects the policy in force.
                Some((_, None)) => None,
                // A pass a sweep's step budget stopped goes on there.
                Some(&(_, Some(at))) => Some(Some(at)),
                None => Some(None),
            }
        };
        let (report, shortened) = sweep::Sweep {
            storage: &*self.storage,
            shorten: shorten.map(|resume| (&policy, resume)),
            pass: &self.pass,
            keys: &self.keys,
            hold_gate: &self.hold_gate,
            notifier,
            now,
            batch: self.batch,
            max_steps,
            report: SweepReport::default(),
            unreachable: BTreeSet::new(),
            capped: 0,
            asked: 0,
            hung: &self.hung,
            unsure: &self.unsure,
            next_stage: &self.next_stage,
            since_scrub: &self.since_scrub,
            scrubbed_after: None,
            probes: Vec::new(),
        }
        .run()
        .await;
        let stopped = match shortened {
            sweep::Shortened::Done => None,
            sweep::Shortened::At(at) => Some(at),
            sweep::Shortened::Failed => return report,
        };
        *self.pass.lock().unwrap_or_else(|p| p.into_inner()) = Some((policy, stopped));
        report
    }

    /// Destroy `business`'s key of `epoch` before the epoch ends, for
    /// `principal` (who asked, as the audit trail names them) and the case
    /// or request `reference` (a business leaving, a breach): every
    /// record sealed under it becomes unreadable at once in the store (a
    /// backup taken before keeps the wrapped key; see [`crate::keys`]).
    /// Refused as [`HoldError::Held`] while a legal hold covers a record
    /// sealed under it: a message, or a consumer's
    /// Signal record (sealed under the epoch of the latest expiry of any
    /// message exchanged with the device, which may be deleted already).
    /// Recorded in the audit trail before the key is destroyed (nothing is
    /// destroyed if it cannot be); a destroy that fails after it can be
    /// made again. Returns whether this call destroyed a live key (not so
    /// when made again after a call whose destroy landed, its answer lost
    /// or its future dropped). Either way the store is then scrubbed
    /// ([`Storage::scrub`]), so that the wrapped key's bytes leave its
    /// files too, whichever call destroyed it (a failed scrub is logged,
    /// and made by a later sweep).
    ///
    /// [`KeyManager::destroy_epoch_unchecked`] does the same without the
    /// hold check or the record: this is the call for operators. A message
    /// stored into that epoch while the shred runs is shredded with it
    /// (storing does not wait for the hold gate), held or not.
    ///
    /// Nothing more can be sealed into the epoch until it ends, even one
    /// with no key yet (which returns `false`): a message or Signal record
    /// that would expire in it is refused ([`KeyError::EpochDestroyed`]).
    /// So shredding the epoch new records expire in (the current time plus
    /// a retention period) stops the business for up to one epoch length:
    /// its sends fail, and consumers' messages are refused, unacknowledged,
    /// until their expiries pass the epoch (the transport delivers them
    /// again; nothing is lost). A shred is for a breach or a business
    /// leaving.
    ///
    /// [`KeyError::EpochDestroyed`]: crate::keys::KeyError::EpochDestroyed
    pub async fn shred_epoch(
        &self,
        principal: &str,
        business: BusinessId,
        epoch: Epoch,
        reference: &str,
        now: Timestamp,
    ) -> Result<bool, HoldError> {
        // Under the gate: no hold is placed between the check and the
        // destroy.
        let gate = self.hold_gate.lock(&*self.storage).await?;
        for scope in self.storage.held_scopes().await? {
            if scope.business() == business
                && held_epochs(&*self.storage, scope).await?.contains(&epoch)
            {
                return Err(HoldError::Held);
            }
        }
        self.audit.record_change(&Change::Shred {
            at: now,
            principal: principal.to_owned(),
            business,
            epoch_end: epoch.end(),
            reference: reference.to_owned(),
        })?;
        let destroyed = self
            .keys
            .destroy_epoch_unchecked(business, epoch, now)
            .await?;
        drop(gate);
        if let Err(e) = self.storage.scrub().await {
            tracing::warn!(%business, error = %e, "the store could not be scrubbed after a shred: a later sweep scrubs it");
        }
        Ok(destroyed)
    }

    /// The hold gate, once no legal hold is found to cover `phone` of
    /// `business` (else [`HoldError::ConsumerHeld`]): held while state
    /// about the consumer is forgotten, so that no hold is placed between
    /// the check and the forgetting. The gate is every business's: make
    /// no host call under it that one business's trouble could hang.
    pub(crate) async fn unheld(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<async_lock::MutexGuard<'_, ()>, HoldError> {
        let gate = self.hold_gate.lock(&*self.storage).await?;
        if self
            .storage
            .held_scopes()
            .await?
            .iter()
            .any(|scope| scope.covers(business, phone))
        {
            return Err(HoldError::ConsumerHeld);
        }
        Ok(gate)
    }

    /// The legal holds in force.
    pub async fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        let _gate = self.hold_gate.lock(&*self.storage).await?;
        self.storage.holds().await
    }

    /// Place a legal hold on `scope` for `principal` (who asked, as the
    /// audit trail names them) and the case `reference`. Audited first: if
    /// the audit trail cannot record it, the hold is not placed. Placing a
    /// hold that stands already (same scope, same case) changes nothing. A
    /// sweep in progress honours it from its next step on.
    /// A hold on one consumer writes the consumer's keyed phone hash to the
    /// audit trail, where it stays after the hold is released and the
    /// consumer's data is deleted (see [`HoldEvent`]).
    /// If the store fails the write, no hold stands: the audit trail says
    /// it was undone, and the store is made to agree (the write may have
    /// landed) at once, or, should the store fail that too, before the
    /// holds are next read (a process stopped before then leaves the store
    /// as it last answered: ask again). If the trail cannot record
    /// the undo either, the hold stands, as the trail says: a failed hold
    /// change errs on keeping the hold.
    pub async fn place_hold(
        &self,
        principal: &str,
        scope: HoldScope,
        reference: &str,
        now: Timestamp,
    ) -> Result<(), HoldError> {
        let _gate = self.hold_gate.lock(&*self.storage).await?;
        // This hold alone: another's damage stops no hold on anyone.
        if self.storage.hold(scope, reference).await?.is_some() {
            return Ok(());
        }
        let event = HoldEvent {
            at: now,
            principal: principal.to_owned(),
            action: HoldAction::Placed,
            scope,
            reference: reference.to_owned(),
        };
        self.audit.record_hold(&event)?;
        let put = Op::PutHold(Hold {
            scope,
            reference: reference.to_owned(),
            placed: now,
        });
        if let Err(e) = self.hold_gate.write(&*self.storage, put.clone()).await {
            // The audit says placed; put the record straight (no hold
            // stands), and the store with it: the write may have landed.
            let undone = self.audit.record_hold(&HoldEvent {
                action: HoldAction::Released,
                ..event
            });
            let straight = match undone {
                Ok(()) => Op::DeleteHold {
                    scope,
                    reference: reference.to_owned(),
                },
                Err(_) => put,
            };
            self.put_straight(straight).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Release the legal hold on `scope` for the case `reference`, for
    /// `principal` (who asked, as the audit trail names them); holds of
    /// other cases on the same scope stand. Audited first: if the audit
    /// trail cannot record it, the hold stays; so it does if the store
    /// fails the write (audited as undone, and the store made to agree at
    /// once, or, should the store fail that too, before the holds are next
    /// read), even if the trail cannot record the undo: a failed hold
    /// change errs on keeping the hold, whatever may be deleted under it.
    /// Returns whether such a hold was in force.
    pub async fn release_hold(
        &self,
        principal: &str,
        scope: HoldScope,
        reference: &str,
        now: Timestamp,
    ) -> Result<bool, HoldError> {
        let _gate = self.hold_gate.lock(&*self.storage).await?;
        let Some(held) = self.storage.hold(scope, reference).await? else {
            return Ok(false);
        };
        let event = HoldEvent {
            at: now,
            principal: principal.to_owned(),
            action: HoldAction::Released,
            scope,
            reference: reference.to_owned(),
        };
        self.audit.record_hold(&event)?;
        let delete = Op::DeleteHold {
            scope,
            reference: reference.to_owned(),
        };
        if let Err(e) = self.hold_gate.write(&*self.storage, delete).await {
            // The audit says released; put the record straight (the hold
            // stands), and the store with it: the write may have landed.
            // Kept even if the trail cannot say so: deletion is for good.
            let _ = self.audit.record_hold(&HoldEvent {
                action: HoldAction::Placed,
                ..event
            });
            self.put_straight(Op::PutHold(held)).await;
            return Err(e.into());
        }
        Ok(true)
    }

    /// Make the store agree with the audit trail after a hold change the
    /// store failed (it may have landed, its answer lost): `op` is written
    /// at once, so that a process stopped right after keeps what the trail
    /// says, and stays owed (made before the holds are next read) if the
    /// store fails it again. The caller holds the gate.
    async fn put_straight(&self, op: Op) {
        let _owed_if_failed = self.hold_gate.pay(&*self.storage, op).await;
    }
}
