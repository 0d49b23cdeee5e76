//! The processor: inbound and outbound pipelines over the host's storage,
//! transport and business, with retention and visibility enforced on every
//! path.
//!
//! - **Keys** ([`Processor::publish_keys`]): a business's Signal keys and
//!   phone index are created when it first publishes, and its prekeys
//!   restocked each time after (a send creates what it needs too). A
//!   receive creates none: a message for a business that never published
//!   is refused.
//! - **Inbound** ([`Processor::receive`]): a consumer's Signal message is
//!   decrypted, sealed and stored in the same commit as the session's
//!   advance, then handed to the business (content and number released
//!   through the visibility policy) and marked delivered, or left due for
//!   another attempt. `receive` returns after that: acknowledge the
//!   transport then, and a crash can never lose a message the transport let
//!   go of (one stored but not yet handed over is handed over by
//!   [`Processor::retransmit_due`]). A redelivered message is recognised
//!   and not handed over twice.
//! - **Outbound** ([`Processor::send`]): the message is sealed and stored
//!   first, then encrypted for each of the consumer's devices (a session is
//!   started from the device's bundle when there is none) and handed to the
//!   transport. Until the transport reports it delivered, it is sent again
//!   ([`Processor::retransmit_due`]) from the stored envelope; when its
//!   retention ends it fails with an expired status, never silently.
//! - **Statuses** ([`Processor::status_update`]) only move forward. A
//!   device that could not decrypt a message (it lost its session) asks
//!   for it again ([`Processor::retry_receipt`]) and gets it over a new
//!   session from its bundle, whose identity key must be the one trusted.
//! - **Tenant isolation**: every entry point names the acting [`Principal`]
//!   and asks the [`Authorizer`]; a principal acting for one business can
//!   neither read, send as, nor learn anything about another, and
//!   maintenance is for operators only. Each business's data is also sealed
//!   under its own keys.
//! - **Concurrency**: operations on one consumer device are serialised (the
//!   Signal layer); one attempt at a time is made per message (a claim the
//!   retransmission loop skips), and every change of a message's delivery
//!   state is a compare-and-swap of the whole state (status, attempts,
//!   devices pending, billing token), so concurrent reports never move it
//!   backwards, nor undo a device left to retry. No lock is held while the host's transport or
//!   business is called: a host may call back into the processor from
//!   there. Everything else runs concurrently.
//! - **Cancellation**: every future may be dropped at any point and the
//!   call made again (see [`Processor`]).
//!
//! Each entry point runs in a `tracing` span named for it; spans and events
//! carry business ids, message ids and device ids, never content or
//! numbers.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::envelope::SealError;
use crate::ids::{BusinessId, MessageId};
use crate::integrity::{
    BillingConfig, BillingPeriods, IntegrityConfig, IntegrityMonitor, StatisticsCollector,
    StatisticsConfig,
};
use crate::keys::{KeyError, KeyManager, KeyProvider};
use crate::lock::PerKey;
use crate::retention::{
    Admission, HoldError, PolicyChangeError, ResidencyError, Retention, RetentionPolicy,
    SweepError, check_residency,
};
use crate::signal::{Sessions, SignalConfig, SignalError};
use crate::store::{Batch, Delivery, Direction, Op, Storage, StoreError};
use crate::time::{Clock, Timestamp};
use crate::transport::{Authorizer, BusinessSink, Principal, Transport, TransportError};
use crate::vault::{OpenError, Vault};
use crate::visibility::{
    AuditError, AuditSink, Change, Denied, Gate, PolicyError, VisibilityPolicy,
};

mod claims;
mod endpoint;
mod inbound;
mod keys;
mod outbound;
mod payload;
mod records;
mod reports;
mod retention;
mod retransmit;
mod status;
mod visibility;

use claims::Claims;
pub use inbound::{Inbound, Receipt};
pub use outbound::{MAX_CONTENT_LEN, MAX_DEVICES, MAX_IDEMPOTENCY_KEY_LEN, Outbound};
pub use payload::{device_payload, parse_device_payload};
#[cfg(any(test, fuzzing))]
pub(crate) use payload::{reencode_inbound, reencode_outbound};
pub use retransmit::RetransmitReport;
pub use status::StatusChange;

/// Why a processor operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    /// The principal may not act for this business (or run maintenance).
    /// Nothing was done, and nothing about the business was revealed.
    #[error("{principal} is not allowed to do this")]
    Unauthorized {
        /// Who asked.
        principal: Principal,
    },
    /// The business's content may not be stored in this store's region.
    #[error(transparent)]
    Residency(#[from] ResidencyError),
    /// The Signal layer refused or failed.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// A stored message could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The key hierarchy failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The retention sweep failed.
    #[error(transparent)]
    Sweep(#[from] SweepError),
    /// A legal hold could not be changed.
    #[error(transparent)]
    Hold(#[from] HoldError),
    /// A retention policy was not put in force (see
    /// [`set_retention_policy`](Processor::set_retention_policy)).
    #[error(transparent)]
    RetentionPolicy(#[from] PolicyChangeError),
    /// The visibility policy refused to release a value for this.
    #[error("the visibility policy does not allow this release")]
    Denied,
    /// The audit trail could not record a change or a release, so it was
    /// not made.
    #[error("the change could not be audited: {0}")]
    Audit(#[from] AuditError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A visibility policy was refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No such message (never stored, or deleted at the end of its retention).
    #[error("no such message")]
    NotFound,
    /// Another call is sending under this idempotency key, and has not
    /// stored its message yet: retry once it has answered.
    #[error("a send under this idempotency key is under way")]
    SendUnderWay,
    /// An attempt to send the message is under way: hand the retry receipt
    /// in again once it has ended (its bookkeeping would overwrite what
    /// the receipt asks for).
    #[error("an attempt on this message is under way")]
    AttemptUnderWay,
    /// The message was made on a session, or with prekeys, the business
    /// does not hold ([`SignalError::needs_new_session`]: retention ended
    /// them, say), and its device was asked ([`Transport::ask_resend`]) to
    /// send it again over a new session: acknowledge and drop this copy.
    #[error("the message's session is gone here; its device was asked to send it again")]
    ResendAsked,
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A release refused: by the policy ([`ProcessorError::Denied`]), or
/// because the audit trail could not record the decision, whatever it was
/// ([`ProcessorError::Audit`]): an operator looks at the trail, not the
/// policy, and nothing is decided on a decision the trail does not show.
impl<T> From<Denied<T>> for ProcessorError {
    fn from(denied: Denied<T>) -> Self {
        match denied.audit_error() {
            Some(e) => Self::Audit(e.clone()),
            None => Self::Denied,
        }
    }
}

impl ProcessorError {
    /// Whether the request itself is refused, so that making it again
    /// unchanged cannot succeed: a malformed, forged or undecryptable
    /// message, one too large to store, an invalid request or setting. A
    /// transport can acknowledge and drop a message whose `receive` failed
    /// so, rather than redeliver it for ever. Failures of the host's seams
    /// (store, keys, transport) are not permanent, nor is a refusal that
    /// another call can lift: an identity key the policy refuses until
    /// [`trust_new_identity`](Processor::trust_new_identity) approves it,
    /// an authorizer or a policy that may change, a device's Signal record
    /// grown past its limit ([`SignalError::RecordTooLarge`]: the keys it
    /// keeps for messages skipped go as those messages arrive).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Signal(e) => matches!(
                e,
                SignalError::InvalidMessage(_)
                    | SignalError::UnknownPreKey(_)
                    | SignalError::Undecryptable(_)
                    | SignalError::NoSession
                    | SignalError::BadBundle(_)
            ),
            Self::ResendAsked => true,
            Self::Seal(e) => matches!(e, SealError::TooLarge(_)),
            Self::Invalid(_) | Self::Config(_) | Self::NotFound => true,
            _ => false,
        }
    }
}

/// What the host plugs in.
pub struct Host {
    /// Where everything is stored.
    pub storage: Arc<dyn Storage>,
    /// The root of trust that wraps each business's KEKs.
    pub key_provider: Arc<dyn KeyProvider>,
    /// The messaging network.
    pub transport: Arc<dyn Transport>,
    /// The businesses' endpoint.
    pub business: Arc<dyn BusinessSink>,
    /// Who may act for whom.
    pub authorizer: Arc<dyn Authorizer>,
    /// The time.
    pub clock: Arc<dyn Clock>,
    /// Where every release decision, legal-hold change and administrative
    /// change (the policies a processor starts with included) is recorded.
    pub audit: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

/// How deliveries are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Wait before the first retry; doubled with every further attempt.
    pub retry_base: Duration,
    /// Longest wait between attempts.
    pub retry_max: Duration,
    /// How long a sent message waits for its delivery report before it is
    /// sent again to every device. Unanswered, it waits longer each time:
    /// after its first send, this long; after each resend, as long as the
    /// message has lived by then (so the wait doubles with each unanswered
    /// resend: resent at 1, 2, 4, 8… times this after its first send), at
    /// least this and at most [`MAX_RECEIPT_WAIT`] (or this, if longer).
    /// A device that could not be sent the message for now is retried on
    /// its own after `retry_base`, doubling to `retry_max`, and these
    /// resends to every device are made all the same; once the last such
    /// device has it, the message waits at least this for its report.
    /// A consumer whose phone stays off is sent a message some
    /// `log2(MAX_RECEIPT_WAIT / receipt_timeout)` times in its first six
    /// hours or so, then every six hours until it expires (some 120 times
    /// over 30 days with the defaults, where a fixed wait of an hour sent
    /// it 720).
    pub receipt_timeout: Duration,
    /// Messages handled per [`Processor::retransmit_due`] call (a hung
    /// business's that need only a call to it are put off besides).
    pub batch: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
            receipt_timeout: Duration::from_secs(3600),
            batch: 512,
        }
    }
}

impl DeliveryConfig {
    /// Whether these settings keep retrying: a zero batch would hand
    /// nothing due to [`Processor::retransmit_due`], a zero wait would
    /// retry on every pass. Times are kept in whole milliseconds, so a
    /// wait under one is zero. The error names the setting.
    pub fn validate(&self) -> Result<(), ProcessorError> {
        let invalid = |what: &str| Err(ProcessorError::Config(format!("delivery: {what}")));
        const MILLISECOND: Duration = Duration::from_millis(1);
        if self.batch == 0 {
            return invalid("batch must be at least 1");
        }
        if self.retry_base < MILLISECOND {
            return invalid("retry_base must be at least a millisecond");
        }
        if self.retry_max < self.retry_base {
            return invalid("retry_max must be at least retry_base");
        }
        if self.receipt_timeout < MILLISECOND {
            return invalid("receipt_timeout must be at least a millisecond");
        }
        Ok(())
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.min(20);
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }

    /// How long a message sent again at `age` (since it was stored) waits
    /// for its delivery report (see [`receipt_timeout`](Self::receipt_timeout)).
    fn receipt_wait(&self, age: Duration) -> Duration {
        age.min(MAX_RECEIPT_WAIT).max(self.receipt_timeout)
    }
}

/// The longest a message sent again waits for its delivery report before
/// it is sent once more (unless [`DeliveryConfig::receipt_timeout`] is
/// longer): six hours, so that a message whose reports were lost still
/// arrives within hours, not days.
pub const MAX_RECEIPT_WAIT: Duration = Duration::from_secs(6 * 3600);

/// Every policy and setting, with the published defaults.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// Retention, residency and the epoch length.
    pub retention: RetentionPolicy,
    /// Who may see what.
    pub visibility: VisibilityPolicy,
    /// Signal prekeys and identity changes.
    pub signal: SignalConfig,
    /// Integrity signals and the anomaly detector.
    pub integrity: IntegrityConfig,
    /// Non-identifiable statistics.
    pub statistics: StatisticsConfig,
    /// Billing.
    pub billing: BillingConfig,
    /// Retries.
    pub delivery: DeliveryConfig,
}

/// The processor core: one per deployment, shared by every task.
///
/// One processor writes to a store at a time. It serialises each consumer
/// device's Signal state in memory and persists a session's sending
/// counters in leases (see the `signal` module); a processor started over
/// a store another one is using (in this process or another) takes the
/// store over ([`Storage::take_over`]) at its first
/// [`publish_keys`](Self::publish_keys) or before it reads any session,
/// whichever comes first (start it so: one built earlier whose first such
/// call comes after takes the store back), and
/// from then on every write of the older one fails as
/// [`StoreError::Superseded`]: it can no longer store a message nor
/// persist a session, so it never issues a sending counter the newer one
/// uses (two messages under one message key). Its retention sweeps still
/// run (they only delete what has expired). Stop it.
///
/// Every future it returns is cancellation safe: a host may drop one at any
/// point (a `timeout`, a `select!`) and call again. Nothing stays locked or
/// claimed; a write the store may or may not have taken is conditional, and
/// one that records what the business was told is made again, if need be,
/// before the message is next taken up, so a dropped call never has a
/// message handed over or a status told twice, nor a message sent unbilled:
/// a message is billed in the store, in the write that records it sent (or
/// delivered, if its report came first). A report that cannot read the
/// message's body (its epoch shredded early, or its record damaged), which
/// holds its category, leaves the bill to the send's own record; only if
/// no such record follows while the body is unreadable (a crash between
/// the transport taking the message and the processor recording it, or
/// the transport's answer lost) does the message go unbilled, which is
/// logged.
/// A dropped `receive` was not acknowledged: the transport's redelivery is
/// answered as usual. A dropped `send` may have stored the message, which is
/// then sent and reported like any other (its id is in its status reports).
///
/// A store or key provider that fails a call is treated alike: the write
/// that records what the business was told may have landed with its answer
/// lost, so it is owed as a dropped call's is, and the operation fails with
/// the host's error (but a `send` whose message is stored returns its id:
/// the retransmission loop goes on with it). A failed `receive` is not
/// acknowledged and its redelivery is answered as usual.
pub struct Processor {
    storage: Arc<dyn Storage>,
    keys: Arc<KeyManager>,
    vault: Arc<Vault>,
    sessions: Sessions,
    retention: Retention,
    gate: Gate,
    transport: Arc<dyn Transport>,
    sink: Arc<dyn BusinessSink>,
    authorizer: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    integrity: IntegrityMonitor,
    statistics: StatisticsCollector,
    /// Held by [`statistics`](Self::statistics) from reading the closed
    /// periods to taking them: two calls at once would both release the
    /// periods neither had taken yet.
    releasing_statistics: async_lock::Mutex<()>,
    /// Held by [`publish_keys`](Self::publish_keys) for its business, from
    /// the transport's count of keys left to the publication: two at once
    /// would both refill from the first count, the second retiring keys
    /// the first had just published. One lock per business, so that a
    /// transport call that hangs for one holds up no other's.
    publishing: PerKey<BusinessId, async_lock::Mutex<()>>,
    billing: BillingPeriods,
    delivery: DeliveryConfig,
    claims: Claims,
    /// Businesses whose endpoint left a call unanswered.
    hung: endpoint::HungEndpoints,
    receipts: status::Receipts,
    /// The devices a send is starting a session with.
    starting: outbound::Starting,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("region", &self.storage.region())
            .field("delivery", &self.delivery)
            .field("messages_owed", &self.claims.messages_owed())
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// How often a compare-and-swap of a message's delivery state is retried.
/// Each lost race means another write landed: its status moved forward
/// (at most four times), or an attempt or a retry receipt recorded itself
/// (each one write). Past that, the call answers [`StoreError::Conflict`],
/// a passing error: the network hands the report in again.
///
/// [`StoreError::Conflict`]: crate::store::StoreError::Conflict
const MAX_STATUS_RACES: usize = 8;

impl Processor {
    /// A processor over `host`'s seams, under `policies`.
    ///
    /// The policies it starts with are recorded in the audit trail first
    /// ([`Change::Start`]), and it does not start if the trail cannot
    /// record them ([`ProcessorError::Audit`]).
    ///
    /// Refused ([`ProcessorError::Config`]) if a policy is invalid, or if
    /// the host's `log` logger would keep the Signal library's records that
    /// carry key material: turn the target
    /// [`LIBRARY_LOG_TARGET`](crate::signal::LIBRARY_LOG_TARGET) off (see
    /// [`library_logs_exposed`](crate::signal::library_logs_exposed)).
    pub fn new(host: Host, policies: Policies) -> Result<Self, ProcessorError> {
        // Named by its place in `Policies`: `statistics.period`, say.
        let config = |section: &'static str| {
            move |e: crate::integrity::ConfigError| ProcessorError::Config(format!("{section}.{e}"))
        };
        policies.delivery.validate()?;
        policies.signal.validate().map_err(config("signal"))?;
        if !policies.signal.allow_library_logs && crate::signal::library_logs_exposed() {
            return Err(ProcessorError::Config(format!(
                "the host's logger keeps the Signal library's records, some of which carry \
                 key material (a message's MAC, part of its MAC key): turn the log target \
                 `{}` off",
                crate::signal::LIBRARY_LOG_TARGET
            )));
        }
        let integrity = IntegrityMonitor::new(policies.integrity).map_err(config("integrity"))?;
        let statistics =
            StatisticsCollector::new(policies.statistics).map_err(config("statistics"))?;
        let billing = BillingPeriods::new(&policies.billing).map_err(config("billing"))?;
        // Last, once nothing else can stop the start: the policies in force
        // from the start, which no change recorded.
        host.audit.record_change(&Change::Start {
            at: host.clock.now(),
            revision: policies.visibility.revision(),
            visibility: policies.visibility.digest(),
            retention: policies.retention.digest(),
        })?;
        let keys = Arc::new(KeyManager::new(host.key_provider, host.storage.clone()));
        let vault = Arc::new(Vault::new(
            keys.clone(),
            host.clock.clone(),
            policies.retention.epoch_length(),
        ));
        Ok(Self {
            sessions: Sessions::new(vault.clone(), host.storage.clone(), policies.signal)
                .map_err(config("signal"))?,
            retention: Retention::new(
                host.storage.clone(),
                keys.clone(),
                policies.retention,
                host.audit.clone(),
            ),
            gate: Gate::new(policies.visibility, host.audit, host.clock.clone()),
            integrity,
            statistics,
            releasing_statistics: async_lock::Mutex::new(()),
            publishing: PerKey::default(),
            billing,
            storage: host.storage,
            keys,
            vault,
            transport: host.transport,
            sink: host.business,
            authorizer: host.authorizer,
            clock: host.clock,
            receipts: status::Receipts::new(policies.delivery.receipt_timeout),
            starting: outbound::Starting::default(),
            delivery: policies.delivery,
            claims: Claims::default(),
            hung: endpoint::HungEndpoints::default(),
        })
    }

    /// `principal` as the business.
    fn authorize(&self, principal: &Principal, business: BusinessId) -> Result<(), ProcessorError> {
        let ok = self.authorizer.may_act_for(principal, business);
        refuse_unless(ok, principal, "not authorised for the business")
    }

    /// `principal` as the network carrying the business's messages.
    fn authorize_carrier(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        let ok = self.authorizer.may_carry_for(principal, business);
        refuse_unless(ok, principal, "not a carrier for the business")
    }

    /// `principal` as an operator.
    fn authorize_operator(&self, principal: &Principal) -> Result<(), ProcessorError> {
        refuse_unless(
            self.authorizer.may_operate(principal),
            principal,
            "not an operator",
        )
    }

    /// The expiry of a `direction` message of `business` arriving at `now`,
    /// if residency lets this store keep its content (one read of the
    /// policy for both); and its admission, to drop once the message's
    /// storing write is made.
    fn admit(
        &self,
        business: BusinessId,
        direction: Direction,
        now: Timestamp,
    ) -> Result<(Timestamp, Admission<'_>), ProcessorError> {
        let admission = self.retention.admit();
        let policy = admission.policy();
        check_residency(business, policy.region(business), self.storage.region())?;
        let expiry = policy.expiry(business, direction, now);
        Ok((expiry, admission))
    }

    /// Change a message's delivery state if it is still `expected`; `false`
    /// if it changed (or the message is gone) meanwhile.
    async fn write_delivery(
        &self,
        business: BusinessId,
        id: MessageId,
        expected: Delivery,
        delivery: Delivery,
    ) -> Result<bool, ProcessorError> {
        self.commit_op(Op::UpdateDelivery {
            business,
            id,
            expected,
            delivery,
        })
        .await
    }

    /// Fail as [`StoreError::Superseded`] once another processor has taken
    /// the store over: an empty write, fenced as every write of this
    /// processor is, made before a call out that no write of its own
    /// precedes (so none starts after a take-over).
    async fn still_the_writer(&self) -> Result<(), ProcessorError> {
        Ok(self.sessions.commit(Batch::new()).await?)
    }

    /// Commit the conditional write `op`; `false` if its condition failed.
    async fn commit_op(&self, op: Op) -> Result<bool, ProcessorError> {
        self.commit_batch(op.into()).await
    }

    /// Commit the conditional writes of `batch`; `false` if a condition
    /// failed (and nothing was written).
    async fn commit_batch(&self, batch: Batch) -> Result<bool, ProcessorError> {
        match self.sessions.commit(batch).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// `next`, the delivery state of a message whose retention ends at
/// `expiry`, with its next attempt brought forward to `expiry` (or to
/// `now`, if that is later) while it is open: no attempt on an open message
/// is due after its retention ends, so the retransmission loop fails it as
/// expired when it ends, whatever attempt was under way then (a sweep
/// meanwhile leaves a message under way alone). A settled one's report
/// keeps its backoff, past its expiry too.
fn due_by(mut next: Delivery, expiry: Timestamp, now: Timestamp) -> Delivery {
    if next.status.is_open() {
        next.next_attempt = next.next_attempt.map(|t| t.min(expiry.max(now)));
    }
    next
}

/// `Ok` if `ok`; else a refusal of `principal`, logged with `why`.
fn refuse_unless(ok: bool, principal: &Principal, why: &str) -> Result<(), ProcessorError> {
    // An unnamed principal is refused whatever the authorizer says: the
    // audit trail names who asked, and reads a trail written before it
    // named anyone as the empty name.
    if ok && !principal.name().is_empty() {
        return Ok(());
    }
    let why = if principal.name().is_empty() {
        "an unnamed principal"
    } else {
        why
    };
    warn!(principal = %principal, "refused: {why}");
    Err(ProcessorError::Unauthorized {
        principal: principal.clone(),
    })
}
