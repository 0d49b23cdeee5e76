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
//! - **Statuses** ([`Processor::status_update`]) only move forward.
//! - **Tenant isolation**: every entry point names the acting [`Principal`]
//!   and asks the [`Authorizer`]; a principal acting for one business can
//!   neither read, send as, nor learn anything about another, and
//!   maintenance is for operators only. Each business's data is also sealed
//!   under its own keys.
//! - **Concurrency**: operations on one consumer device are serialised (the
//!   Signal layer); one attempt at a time is made per message (a claim the
//!   retransmission loop skips), and every change of a message's delivery
//!   state is a compare-and-swap on its status, so concurrent reports never
//!   move it backwards. No lock is held while the host's transport or
//!   business is called: a host may call back into the processor from
//!   there. Everything else runs concurrently.
//! - **Cancellation**: every future may be dropped at any point and the
//!   call made again (see [`Processor`]).
//!
//! Each entry point runs in a `tracing` span named for it; spans and events
//! carry business ids, message ids and device ids, never content or
//! numbers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use foldhash::fast::RandomState;
use tracing::{Instrument, debug, debug_span, info, warn};
use zeroize::Zeroizing;

use crate::envelope::{Kind, Label, MAX_PLAINTEXT_LEN, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use crate::integrity::{
    BillingConfig, BillingLedger, BillingStatement, Category, IntegrityConfig, IntegrityMonitor,
    StatisticsCollector, StatisticsConfig, StatisticsReport,
};
use crate::keys::{KeyError, KeyManager, KeyProvider};
use crate::retention::{
    Admission, ExpiryNotifier, HoldError, ResidencyError, Retention, RetentionPolicy, SweepError,
    SweepReport, check_residency,
};
use crate::signal::{Ciphertext, Sessions, SignalConfig, SignalError, Unbound};
use crate::store::{
    Batch, Census, Delivery, Direction, FailureReason, Hold, HoldScope, MessageRecord, Op, PeerId,
    Status, Storage, StoreError,
};
use crate::time::{Clock, Timestamp};
use crate::transport::{
    Authorizer, BusinessSink, InboundMessage, Outgoing, Principal, StatusUpdate, Transport,
    TransportError,
};
use crate::vault::{OpenError, Vault};
use crate::visibility::{
    AuditSink, DataClass, DenyReason, Gate, Labelled, Party, PolicyError, Purpose, VisibilityPolicy,
};

mod payload;

use payload::{InboundBody, OutboundBody, StoredBody};
pub use payload::{device_payload, parse_device_payload};
#[cfg(any(test, fuzzing))]
pub(crate) use payload::{reencode_inbound, reencode_outbound};

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
    /// The visibility policy refused to release a value for this.
    #[error("the visibility policy does not allow this release")]
    Denied,
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
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// Where every release decision and legal-hold change is recorded.
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
    /// sent again.
    pub receipt_timeout: Duration,
    /// Messages handled per [`Processor::retransmit_due`] call.
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
    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.min(20);
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

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

/// A consumer's message as the transport delivers it.
#[derive(Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The sender.
    pub from: PhoneNumber,
    /// The sender's device.
    pub device: u32,
    /// The Signal message.
    pub message: Ciphertext,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("from", &self.from)
            .field("device", &self.device)
            .field("message", &self.message)
            .finish()
    }
}

/// What [`Processor::receive`] did; return it only after acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message's id, derived from its Signal header: the same for every
    /// redelivery or replay of it, whatever the transport calls it.
    pub id: MessageId,
    /// It was a duplicate of a message already received: nothing was done.
    pub duplicate: bool,
    /// It was handed to the business already (else it is queued for retry).
    pub delivered: bool,
}

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

/// The envelope kind of a message record in `direction`.
fn message_kind(direction: Direction) -> Kind {
    match direction {
        Direction::Inbound => Kind::InboundMessage,
        Direction::Outbound => Kind::OutboundMessage,
    }
}

/// What a stored message's record holds, as far as it can be handed on.
enum Stored<T> {
    /// Its content.
    Content(T),
    /// It expired since it was found readable.
    Expired,
    /// Nothing, ever: damaged, its key gone, or another record's envelope.
    Unreadable,
}

/// What [`Processor::retransmit_due`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetransmitReport {
    /// Due messages looked at.
    pub due: u64,
    /// Inbound messages handed to the business.
    pub delivered_to_business: u64,
    /// Outbound messages handed to the transport.
    pub sent: u64,
    /// Failures reported to businesses.
    pub failures_reported: u64,
    /// Messages rescheduled after a transient failure.
    pub rescheduled: u64,
}

/// Whether a status update changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// The message moved to the new status.
    Applied,
    /// The update was stale or out of order (it would go backwards): ignored.
    Ignored,
}

/// The processor core: one per deployment, shared by every task.
///
/// Every future it returns is cancellation safe: a host may drop one at any
/// point (a `timeout`, a `select!`) and call again. Nothing stays locked or
/// claimed; a write the store may or may not have taken is conditional, and
/// one that records what the business was told is made again, if need be,
/// before the message is next taken up, so a dropped call never has a
/// message handed over or a status told twice, nor a message sent unbilled.
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
    billing: BillingLedger,
    delivery: DeliveryConfig,
    claims: Claims,
}

/// Messages an attempt is under way for. Not a lock: nobody waits for a
/// claim. The retransmission loop and the sweep's expiry reports skip a
/// claimed message (its attempt is running, and will leave it due again if
/// it must be), so one attempt at a time is made per message without
/// holding anything while the host is called.
///
/// With them, what calls dropped (or failed by the store) before the store
/// answered owe each message (see [`Owing`]): the writes that record what a
/// business was told (a message handed over, a status reported), and the
/// bookkeeping of attempts that reached devices. Whoever next takes the
/// message up makes them first, so a cancelled call never has the business
/// told twice, nor a device sent a message it has.
#[derive(Default)]
struct Claims {
    claimed: Mutex<HashSet<(BusinessId, MessageId), RandomState>>,
    /// In the order they were left owed.
    owed: Mutex<HashMap<(BusinessId, MessageId), VecDeque<Owed>, RandomState>>,
}

/// A claim on one message, given up when dropped.
struct Claim<'a> {
    claims: &'a Claims,
    key: (BusinessId, MessageId),
}

impl Claims {
    /// Claim `id`, unless an attempt is under way for it.
    fn claim(&self, business: BusinessId, id: MessageId) -> Option<Claim<'_>> {
        let key = (business, id);
        self.claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key)
            // Lazily: a claim built and dropped here would give up the
            // holder's claim, under the lock its drop takes again.
            .then(|| Claim { claims: self, key })
    }

    /// Leave `owed` owed to `key`, after (or, if `first`, before) what is
    /// owed it already.
    fn owe(&self, key: (BusinessId, MessageId), owed: Owed, first: bool) {
        let mut all = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        let list = all.entry(key).or_default();
        if first {
            list.push_front(owed);
        } else {
            list.push_back(owed);
        }
    }

    /// The first of what is owed to `key`, taken.
    fn take_owed(&self, key: (BusinessId, MessageId)) -> Option<Owed> {
        let mut all = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        let list = all.get_mut(&key)?;
        let first = list.pop_front();
        if list.is_empty() {
            all.remove(&key);
        }
        first
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Drops every peer's Signal state cached in memory when dropped, unless
/// disarmed: after a sweep that deleted stored state, or may have.
struct ClearSessions<'a>(Option<&'a Sessions>);

impl Drop for ClearSessions<'_> {
    fn drop(&mut self) {
        if let Some(sessions) = self.0 {
            sessions.clear_cache();
        }
    }
}

/// What a call dropped halfway, or failed by the store, owes a message.
#[derive(Clone)]
enum Owed {
    /// A write recording what a business or the transport was told about
    /// the message, and what follows it.
    Write { op: Op, accepted: Option<Accepted> },
    /// An attempt's bookkeeping: what it reached, recorded on the stored
    /// state whatever a delivery report wrote meanwhile, as the attempt
    /// would have recorded it.
    Attempt(AttemptMade),
}

/// What an attempt on an outbound message reached, to be recorded on its
/// stored delivery state (see [`Processor::record_attempt`]).
#[derive(Clone, Copy)]
struct AttemptMade {
    /// The stored state the record is made on: the one the attempt was
    /// decided on, then whatever a write made meanwhile left.
    on: Delivery,
    phone: PhoneHash,
    category: Category,
    outcome: DeviceOutcome,
    at: Timestamp,
}

/// An outbound message moved on from queued by a send's bookkeeping, or by
/// a delivery report that came first: what follows that write once it is
/// known to have landed.
#[derive(Clone, Copy)]
struct Accepted {
    phone: PhoneHash,
    category: Category,
    at: Timestamp,
    /// The delivery state the write stores: sent after a send's
    /// bookkeeping, delivered or read after a report (told that instead).
    next: Delivery,
}

/// A write under way (see [`Owed`]), until the store answers it. Dropped
/// before that (its caller's future dropped at the commit, or the store
/// failing it), it leaves the write owed: the store may or may not have it
/// (a SQLite commit lands even if no one waits for it; a networked store's
/// answer may be lost), and a conditional write made twice changes nothing
/// the second time.
struct Owing<'a> {
    claims: &'a Claims,
    key: (BusinessId, MessageId),
    owed: Option<Owed>,
    /// Owed before whatever else is: a payment that did not finish keeps
    /// its place.
    first: bool,
}

impl<'a> Owing<'a> {
    fn new(claims: &'a Claims, key: (BusinessId, MessageId), owed: Owed, first: bool) -> Self {
        Self {
            claims,
            key,
            owed: Some(owed),
            first,
        }
    }
}

impl Drop for Owing<'_> {
    fn drop(&mut self) {
        if let Some(owed) = self.owed.take() {
            self.claims.owe(self.key, owed, self.first);
        }
    }
}

/// The devices an attempt on an outbound message has settled so far: sent
/// to, or given up on for good (no session can be had, the network refused
/// it). The rest of `listed` still need the message.
#[derive(Default)]
struct Reached {
    listed: u64,
    settled: u64,
    sent: u32,
}

impl Reached {
    /// The devices that still need the message.
    fn pending(&self) -> u64 {
        self.listed & !self.settled
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
        };
        p.claims
            .owe((record.business, record.id), Owed::Attempt(made), false);
    }
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owed = self
            .claims
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Processor")
            .field("region", &self.storage.region())
            .field("delivery", &self.delivery)
            .field("messages_owed", &owed)
            .finish_non_exhaustive()
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

/// The outcome of one attempt to hand an inbound message to its business.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    Done,
    Retry,
    Fail(FailureReason),
}

/// The outcome of one attempt to send an outbound message to devices.
#[derive(Debug, Clone, Copy)]
enum DeviceOutcome {
    /// Sent to `sent` devices; the `pending` ones failed for now.
    Reached { sent: u32, pending: u64 },
    /// The device list could not be had: try again later.
    Unreachable,
    /// No device can be reached, for this reason.
    Fail(FailureReason),
}

/// An inbound message's parts before they are released to its business.
struct InboundParts {
    id: MessageId,
    from: PhoneNumber,
    device: u32,
    content: Zeroizing<Vec<u8>>,
    received: Timestamp,
    identity_changed: bool,
}

/// The most devices a consumer may have: a longer list from the transport
/// (distinct ids) fails the message as [`FailureReason::TooManyDevices`]
/// rather than costing a bundle fetch, a stored session and a send for
/// each. WhatsApp gives a consumer a phone and a few linked devices.
pub const MAX_DEVICES: usize = 64;

/// The longest idempotency key [`Processor::send_idempotent`] takes, in
/// bytes: room for any UUID or request id in text.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// How often a compare-and-swap of a message's delivery state is retried:
/// each lost race means its status moved forward, which it can do at most
/// four times.
const MAX_STATUS_RACES: usize = 8;

impl Processor {
    /// A processor over `host`'s seams, under `policies`.
    pub fn new(host: Host, policies: Policies) -> Result<Self, ProcessorError> {
        let config = |e: crate::integrity::ConfigError| ProcessorError::Config(e.to_string());
        let keys = Arc::new(KeyManager::new(host.key_provider, host.storage.clone()));
        let vault = Arc::new(Vault::new(
            keys.clone(),
            host.clock.clone(),
            policies.retention.epoch_length(),
        ));
        Ok(Self {
            sessions: Sessions::new(vault.clone(), host.storage.clone(), policies.signal),
            retention: Retention::new(
                host.storage.clone(),
                keys.clone(),
                policies.retention,
                host.audit.clone(),
            ),
            gate: Gate::new(policies.visibility, host.audit, host.clock.clone()),
            integrity: IntegrityMonitor::new(policies.integrity).map_err(config)?,
            statistics: StatisticsCollector::new(policies.statistics).map_err(config)?,
            billing: BillingLedger::new(policies.billing).map_err(config)?,
            storage: host.storage,
            keys,
            vault,
            transport: host.transport,
            sink: host.business,
            authorizer: host.authorizer,
            clock: host.clock,
            delivery: policies.delivery,
            claims: Claims::default(),
        })
    }

    fn authorize(&self, principal: &Principal, business: BusinessId) -> Result<(), ProcessorError> {
        if self.authorizer.may_act_for(principal, business) {
            Ok(())
        } else {
            warn!(principal = %principal, "refused: not authorised for the business");
            Err(ProcessorError::Unauthorized {
                principal: principal.clone(),
            })
        }
    }

    fn authorize_operator(&self, principal: &Principal) -> Result<(), ProcessorError> {
        if self.authorizer.may_operate(principal) {
            Ok(())
        } else {
            warn!(principal = %principal, "refused: not an operator");
            Err(ProcessorError::Unauthorized {
                principal: principal.clone(),
            })
        }
    }

    /// The key manager, for KEK rotation and early shredding (operators
    /// only: it spans every business).
    pub fn keys(&self, principal: &Principal) -> Result<&KeyManager, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(&self.keys)
    }

    /// The retention policy in force (operators only: it names every
    /// business with its own periods or region).
    pub fn retention_policy(
        &self,
        principal: &Principal,
    ) -> Result<Arc<RetentionPolicy>, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.retention.policy())
    }

    /// Put a retention policy in force (operators only). Shorter periods
    /// apply to reads at once, and to stored messages from the next sweep.
    pub fn set_retention_policy(
        &self,
        principal: &Principal,
        policy: RetentionPolicy,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        self.retention.set_policy(policy);
        info!(principal = %principal, "retention policy replaced");
        Ok(())
    }

    /// The visibility policy in force.
    pub fn visibility_policy(&self) -> VisibilityPolicy {
        self.gate.policy()
    }

    /// Put a visibility policy in force (operators only); one that would
    /// break a hard rule is refused.
    pub fn set_visibility_policy(
        &self,
        principal: &Principal,
        policy: VisibilityPolicy,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        self.gate.replace_policy(policy)?;
        info!(principal = %principal, "visibility policy replaced");
        Ok(())
    }

    /// `business` enables the opt-in services (an AI assistant, say) for its
    /// data; only a principal acting for it can.
    pub fn opt_in(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.gate.opt_in(business);
        info!(%business, principal = %principal, "opted in to opt-in services");
        Ok(())
    }

    /// `business` disables the opt-in services again.
    pub fn opt_out(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.gate.opt_out(business);
        info!(%business, principal = %principal, "opted out of opt-in services");
        Ok(())
    }

    fn open_label(&self, record: &MessageRecord) -> Label {
        Label {
            kind: message_kind(record.direction),
            business: record.business,
            id: record.id,
            expiry: record.expiry,
            region: self.storage.region(),
        }
    }

    /// Seal `body` as a new message record of `business`.
    #[allow(clippy::too_many_arguments)]
    async fn seal_record(
        &self,
        business: BusinessId,
        id: MessageId,
        direction: Direction,
        phone: PhoneHash,
        now: Timestamp,
        expiry: Timestamp,
        body: &[u8],
    ) -> Result<MessageRecord, ProcessorError> {
        let mut record = MessageRecord {
            business,
            id,
            direction,
            phone,
            created: now,
            expiry,
            epoch: self
                .vault
                .epoch_of(expiry)
                .ok_or(SealError::ExpiryOutOfRange(expiry))?,
            // Due at once: if the first attempt never happens (a crash), the
            // retransmission loop makes it.
            delivery: Delivery::queued(now),
            sealed: Vec::new(),
        };
        let label = self.open_label(&record);
        record.sealed = self.vault.seal(&label, body).await?;
        Ok(record)
    }

    /// The expiry of a `direction` message of `business` arriving at `now`,
    /// if residency lets this store keep its content (one read of the
    /// policy for both).
    fn admit(
        &self,
        business: BusinessId,
        direction: Direction,
        now: Timestamp,
    ) -> Result<(Timestamp, Admission), ProcessorError> {
        let admission = self.retention.admit();
        let policy = admission.policy();
        check_residency(business, policy.region(business), self.storage.region())?;
        Ok((policy.expiry(business, direction, now), admission))
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

    /// Commit the conditional write `op`; `false` if its condition failed.
    async fn commit_op(&self, op: Op) -> Result<bool, ProcessorError> {
        let mut batch = Batch::new();
        batch.push(op);
        match self.storage.commit(batch).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Commit `op`, which records what the business or the transport was
    /// just told about message `id` (and, if `accepted`, moves an outbound
    /// message on from queued); `false` if its condition failed (the
    /// message changed, or is gone). Should the store fail, or this future
    /// be dropped before it answers, the write is owed, and made, with what
    /// follows it, before the message is next taken up
    /// ([`pay_owed`](Self::pay_owed)): a failed write may have landed (a
    /// networked store's answer lost), or not, and either way what was told
    /// must not be told again.
    async fn commit_told(
        &self,
        business: BusinessId,
        id: MessageId,
        op: Op,
        accepted: Option<Accepted>,
    ) -> Result<bool, ProcessorError> {
        let owed = Owed::Write {
            op: op.clone(),
            accepted,
        };
        let mut owing = Owing::new(&self.claims, (business, id), owed, false);
        let written = self.commit_op(op).await;
        if written.is_ok() {
            owing.owed = None;
        }
        written
    }

    /// Make what calls dropped halfway (or failed by the store) owe
    /// message `id`, in the order they left it: the writes, and the
    /// attempts' bookkeeping ([`record_attempt`](Self::record_attempt)). A
    /// write that moved an outbound message on from queued, and landed now
    /// or before (unseen: the stored state is still the one it wrote), has
    /// the message counted taken and, if a send's bookkeeping moved it, its
    /// business told it is sent.
    async fn pay_owed(&self, business: BusinessId, id: MessageId) -> Result<(), ProcessorError> {
        while let Some(owed) = self.claims.take_owed((business, id)) {
            match owed {
                Owed::Write { op, accepted } => {
                    let again = Owed::Write {
                        op: op.clone(),
                        accepted,
                    };
                    let mut owing = Owing::new(&self.claims, (business, id), again, true);
                    let mut landed = self.commit_op(op).await?;
                    if let Some(accepted) = accepted
                        && !landed
                    {
                        landed = self
                            .storage
                            .message(business, id)
                            .await?
                            .is_some_and(|m| m.delivery == accepted.next);
                    }
                    owing.owed = None;
                    if let Some(accepted) = accepted.filter(|_| landed) {
                        self.on_accepted(business, id, accepted).await;
                    }
                }
                // Owed again, first, by `record_attempt` itself if it stops.
                // Boxed: it pays what is owed in turn when it loses a race.
                Owed::Attempt(made) => {
                    Box::pin(self.record_attempt(business, id, made, true)).await?;
                }
            }
        }
        Ok(())
    }

    /// Claim message `id` of `business` for an attempt, unless one is under
    /// way; first make the write an attempt dropped halfway owes it.
    async fn take_up(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<Claim<'_>>, ProcessorError> {
        let Some(claim) = self.claims.claim(business, id) else {
            return Ok(None);
        };
        self.pay_owed(business, id).await?;
        Ok(Some(claim))
    }

    /// Receive a consumer's message for `business` from the transport.
    /// Returns once the message is durably stored (and, if the business
    /// took it, handed over): acknowledge the transport then. On an error,
    /// do not acknowledge: the transport's redelivery is handled. A
    /// redelivery or a replay of a stored message, however it arrives, is
    /// answered as a duplicate and reaches the business no second time.
    /// A receive creates no key: a message for a business that has not
    /// published its keys ([`publish_keys`](Self::publish_keys)) is
    /// refused as [`SignalError::InvalidMessage`].
    pub async fn receive(
        &self,
        principal: &Principal,
        business: BusinessId,
        inbound: Inbound,
    ) -> Result<Receipt, ProcessorError> {
        let span = debug_span!("receive", %business, device = inbound.device);
        // Boxed: the caller's future (a host's task, or one of its many
        // lanes) carries a pointer instead of about 4 KiB of state, and
        // the block glibc hands back is the one the last message used,
        // still in the cache. Inline, a 256-lane burst ran about 3% slower
        // (a send measured the same either way, so it is not boxed).
        Box::pin(
            self.receive_in(principal, business, inbound)
                .instrument(span),
        )
        .await
    }

    async fn receive_in(
        &self,
        principal: &Principal,
        business: BusinessId,
        inbound: Inbound,
    ) -> Result<Receipt, ProcessorError> {
        self.authorize(principal, business)?;
        let now = self.clock.now();
        let (expiry, admission) = self.admit(business, Direction::Inbound, now)?;
        // Parsed first, and a receive creates no key: the business's keys
        // come with its first `publish_keys`, before which no consumer
        // could have written to it.
        let unbound = Unbound::parse(&inbound.message)?;
        let phone = self
            .keys
            .known_phone_hash(business, &inbound.from)
            .await?
            .ok_or(SignalError::InvalidMessage(
                "the business has published no keys",
            ))?;
        let peer = PeerId {
            phone,
            device: inbound.device,
        };
        let parsed = unbound.bind(business, peer);
        let id = parsed.id();
        let duplicate = Receipt {
            id,
            duplicate: true,
            delivered: false,
        };
        let staged = match self
            .sessions
            .decrypt_staged(business, peer, &parsed, expiry)
            .await
        {
            Ok(staged) => staged,
            Err(SignalError::DuplicateMessage) => {
                debug!(%id, "duplicate inbound message");
                return Ok(duplicate);
            }
            Err(e) => {
                // A redelivery that Signal no longer recognises as one (the
                // session moved on, or was reset): the message is stored.
                if self.storage.message(business, id).await?.is_some() {
                    debug!(%id, "redelivery of a stored message");
                    return Ok(duplicate);
                }
                return Err(e.into());
            }
        };
        let decrypted = staged.decrypted();
        let identity_changed = decrypted.identity_changed;
        let body = Zeroizing::new(InboundBody::encode_fields(
            &inbound.from,
            inbound.device,
            identity_changed,
            &decrypted.plaintext,
        ));
        let record = self
            .seal_record(business, id, Direction::Inbound, phone, now, expiry, &body)
            .await?;
        // A fresh record: nothing else can be attempting it.
        let claim = self.claims.claim(business, id);
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(record)));
        let decrypted = match staged.commit_stored(batch).await {
            Ok(decrypted) => decrypted,
            // A replay that a session outdated by a crash took for new.
            Err(SignalError::DuplicateMessage) => {
                debug!(%id, "replay of a stored message");
                return Ok(duplicate);
            }
            Err(e) => return Err(e.into()),
        };
        self.retention.stored(&admission);
        self.integrity.record_received(business, phone, now);
        self.statistics.record_message(
            business,
            phone,
            Direction::Inbound,
            crate::integrity::Status::Sent,
            now,
        );
        debug!(%id, "inbound message stored");
        let delivered = match claim {
            Some(_claim) => {
                let parts = InboundParts {
                    id,
                    from: inbound.from,
                    device: inbound.device,
                    content: decrypted.plaintext,
                    received: now,
                    identity_changed,
                };
                let attempt = self
                    .hand_to_business(business, parts, Purpose::Delivery)
                    .await;
                self.settle_inbound(business, id, phone, Delivery::queued(now), attempt)
                    .await?
            }
            None => false,
        };
        Ok(Receipt {
            id,
            duplicate: false,
            delivered,
        })
    }

    /// Release an inbound message's content and sender to its business for
    /// `purpose`, and hand it over.
    async fn hand_to_business(
        &self,
        business: BusinessId,
        parts: InboundParts,
        purpose: Purpose,
    ) -> Attempt {
        let refused = |reason: DenyReason| {
            warn!(%business, id = %parts.id, ?reason, "visibility policy refused delivery to the business");
            match reason {
                // The audit trail failed: the policy allows it, try again.
                DenyReason::AuditFailed => Attempt::Retry,
                _ => Attempt::Fail(FailureReason::Refused),
            }
        };
        let content = match self.gate.release(
            Labelled::of_business(DataClass::MessageContent, business, parts.content),
            Party::Business,
            purpose,
        ) {
            Ok(released) => released.into_value(),
            Err(denied) => return refused(denied.reason()),
        };
        let from = match self.gate.release(
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, parts.from),
            Party::Business,
            purpose,
        ) {
            Ok(released) => released.into_value(),
            Err(denied) => return refused(denied.reason()),
        };
        let message = InboundMessage {
            business,
            id: parts.id,
            from,
            device: parts.device,
            content,
            received: parts.received,
            identity_changed: parts.identity_changed,
        };
        match self.sink.deliver(&message).await {
            Ok(()) => Attempt::Done,
            Err(e) => {
                debug!(%business, id = %message.id, error = %e, "business unavailable; will retry");
                Attempt::Retry
            }
        }
    }

    /// Record the outcome of an attempt to hand over an inbound message
    /// whose delivery state was `current`; whether it was delivered. A
    /// message failed meanwhile (its retention ended) stays failed.
    async fn settle_inbound(
        &self,
        business: BusinessId,
        id: MessageId,
        phone: PhoneHash,
        current: Delivery,
        attempt: Attempt,
    ) -> Result<bool, ProcessorError> {
        let now = self.clock.now();
        let next = self.after_attempt(&current, attempt, now);
        let written = if let Attempt::Done = attempt {
            let delivered = Op::UpdateDelivery {
                business,
                id,
                expected: current,
                delivery: next,
            };
            self.commit_told(business, id, delivered, None).await?
        } else {
            self.write_delivery(business, id, current, next).await?
        };
        if !written {
            return Ok(false);
        }
        match attempt {
            Attempt::Done => {
                self.statistics.record_message(
                    business,
                    phone,
                    Direction::Inbound,
                    crate::integrity::Status::Delivered,
                    now,
                );
                Ok(true)
            }
            Attempt::Fail(_) => {
                // Boxed: rare, and its future would grow every receive's.
                Box::pin(self.report_status(business, id, phone, Direction::Inbound, next)).await?;
                Ok(false)
            }
            Attempt::Retry => Ok(false),
        }
    }

    /// The bookkeeping after an attempt made on a message in `current` state.
    fn after_attempt(&self, current: &Delivery, attempt: Attempt, now: Timestamp) -> Delivery {
        let attempts = current.attempts.saturating_add(1);
        match attempt {
            Attempt::Done => Delivery {
                status: Status::Delivered,
                failure: None,
                attempts,
                next_attempt: None,
                pending_devices: 0,
            },
            Attempt::Retry => Delivery {
                status: current.status,
                failure: None,
                attempts,
                next_attempt: Some(now.saturating_add(self.delivery.backoff(current.attempts))),
                pending_devices: current.pending_devices,
            },
            // Failed, and due at once: the failure is reported to the business.
            Attempt::Fail(reason) => Delivery {
                status: Status::Failed,
                failure: Some(reason),
                attempts,
                next_attempt: Some(now),
                pending_devices: 0,
            },
        }
    }

    /// Send a business's message: sealed and stored first, then sent to
    /// every device of the recipient. Returns its id once it is stored;
    /// delivery continues (and is retried) from there, whatever the first
    /// attempt met. A store that fails the write storing it is asked
    /// whether the write landed (its answer may have been lost): if so, the
    /// message is accepted. An error means the message was not stored,
    /// unless the store could not answer that question either: a message
    /// stored then is sent and reported like any other (its id is in its
    /// status reports).
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
    /// sweep deleted it, it sends a new message under the same id.
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
        if outbound.content.len() > MAX_PLAINTEXT_LEN - 64 {
            return Err(ProcessorError::Invalid("content too large"));
        }
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN) {
            return Err(ProcessorError::Invalid("idempotency key empty or too long"));
        }
        let now = self.clock.now();
        let (expiry, admission) = self.admit(business, Direction::Outbound, now)?;
        let phone = self.keys.phone_hash(business, &outbound.to).await?;
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
                    let body = self.same_send(&stored, phone, &outbound).await?;
                    debug!(%id, "a send under a key used before: its message is stored");
                    let d = stored.delivery;
                    // The call that stored it was cut short before its
                    // first attempt: made now, as that call would have.
                    if let (Some(_claim), Some(body)) = (claim, body)
                        && d.status == Status::Queued
                        && d.attempts == 0
                        && let Err(e) = self
                            .attempt_outbound(&stored, &body, Purpose::Delivery)
                            .await
                    {
                        warn!(%business, %id, error = %e, "the first attempt failed; the message is due for another");
                    }
                    return Ok(id);
                }
                if claim.is_none() {
                    return Err(ProcessorError::SendUnderWay);
                }
                (id, claim)
            }
        };
        let body = OutboundBody {
            to: outbound.to,
            category: outbound.category,
            content: outbound.content,
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
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(MessageRecord {
            sealed,
            ..record.clone()
        })));
        if let Err(e) = self.storage.commit(batch).await {
            // The write may have landed with its answer lost (a networked
            // store): if the store now has the message, under this fresh
            // id, it is accepted as if the commit had answered. Refused,
            // it would be sent twice, once again by the business.
            if !matches!(self.storage.message(business, id).await, Ok(Some(_))) {
                return Err(e.into());
            }
            warn!(%business, %id, error = %e, "the store failed the write storing the message, but has it: accepted");
        }
        self.retention.stored(&admission);
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

    /// Check that `stored`, found under the id of a send's idempotency key,
    /// is the message of this send (`outbound`, to the consumer hashed to
    /// `phone`); if not, the key was used for another. Returns its body if
    /// it can still be read.
    async fn same_send(
        &self,
        stored: &MessageRecord,
        phone: PhoneHash,
        outbound: &Outbound,
    ) -> Result<Option<OutboundBody>, ProcessorError> {
        let other = || ProcessorError::Invalid("the idempotency key was used for another message");
        if stored.direction != Direction::Outbound || stored.phone != phone {
            return Err(other());
        }
        match self.due_body(stored).await? {
            Stored::Content(StoredBody::Outbound(body)) => {
                let same = body.to == outbound.to
                    && body.category == outbound.category
                    && body.content == outbound.content;
                if same { Ok(Some(body)) } else { Err(other()) }
            }
            Stored::Content(StoredBody::Inbound(_)) => Err(other()),
            // Its content can no longer be compared: the recipient was.
            Stored::Expired | Stored::Unreadable => Ok(None),
        }
    }

    /// Encrypt and send an outbound message to the devices of its recipient
    /// that still need it (all of them, unless an earlier attempt left some
    /// pending); record the outcome. The caller holds the message's claim.
    async fn attempt_outbound(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        purpose: Purpose,
    ) -> Result<(), ProcessorError> {
        let (business, id) = (record.business, record.id);
        let decided_on = record.delivery;
        let only = (decided_on.pending_devices != 0).then_some(decided_on.pending_devices);
        let mut sending = Sending {
            processor: self,
            record,
            category: body.category,
            reached: Reached::default(),
            done: false,
        };
        let outcome = self
            .send_to_devices(record, body, only, purpose, &mut sending.reached)
            .await;
        // Done: the outcome is recorded below (and owed if that fails).
        sending.done = true;
        let made = AttemptMade {
            on: decided_on,
            phone: record.phone,
            category: body.category,
            outcome,
            at: self.clock.now(),
        };
        let Some(next) = self.record_attempt(business, id, made, false).await? else {
            // Deleted meanwhile: nothing left to record.
            return Ok(());
        };
        // A settled status whose report is due is told now: this attempt's,
        // or one a delivery report wrote meanwhile and left to this attempt
        // (see `status_update`; the write above saw it, or failed and took
        // it in). One written after that write is told by the
        // retransmission loop.
        if !next.status.is_open() && next.next_attempt.is_some() && next.pending_devices == 0 {
            self.report_status(business, id, record.phone, Direction::Outbound, next)
                .await?;
        }
        Ok(())
    }

    /// Record what an attempt on outbound message `id` reached on its
    /// stored delivery state, conditionally: a delivery report may have
    /// moved the status forward meanwhile, and the outcome is then recorded
    /// on what it left. Moving the message on from queued counts it taken
    /// and tells its business it is sent. Should the store fail, or this
    /// future be dropped, before the record is made, it is owed, and made
    /// before the message is next taken up (`first`, before what else is
    /// owed: it is being paid). Returns the state recorded; `None` if the
    /// message is gone.
    async fn record_attempt(
        &self,
        business: BusinessId,
        id: MessageId,
        mut made: AttemptMade,
        first: bool,
    ) -> Result<Option<Delivery>, ProcessorError> {
        let mut races = 0;
        loop {
            let current = made.on;
            let next = self.after_send(current, made.outcome, made.at);
            let accepted = (current.status == Status::Queued && next.status == Status::Sent)
                .then_some(Accepted {
                    phone: made.phone,
                    category: made.category,
                    at: made.at,
                    next,
                });
            let op = Op::UpdateDelivery {
                business,
                id,
                expected: current,
                delivery: next,
            };
            let mut owing = Owing::new(&self.claims, (business, id), Owed::Attempt(made), first);
            let written = self.commit_op(op).await?;
            if !written {
                races += 1;
                // A delivery report dropped after its write landed may owe
                // the message the move on from queued that this write lost
                // to: made now, while the stored state is still the one it
                // wrote, it is counted (rewritten below, it would be lost).
                self.pay_owed(business, id).await?;
            }
            let landed = written
                || match self.storage.message(business, id).await? {
                    // Deleted meanwhile: nothing left to record.
                    None => {
                        owing.owed = None;
                        return Ok(None);
                    }
                    // Made before, its answer lost (an owed record, paid).
                    Some(stored) if stored.delivery == next => true,
                    Some(stored) if races < MAX_STATUS_RACES => {
                        made.on = stored.delivery;
                        false
                    }
                    Some(_) => return Err(StoreError::Conflict.into()),
                };
            owing.owed = None;
            if landed {
                if let Some(accepted) = accepted {
                    self.on_accepted(business, id, accepted).await;
                }
                return Ok(Some(next));
            }
        }
    }

    /// Count an outbound message of `business` to `phone`, of `category`,
    /// as taken by the transport at `now`: billable, and sent. Called once,
    /// by whichever write first moves it on from queued (a send's
    /// bookkeeping, or a delivery report that came first).
    fn accepted(&self, business: BusinessId, phone: PhoneHash, category: Category, now: Timestamp) {
        self.billing.record(business, category, now);
        self.statistics.record_message(
            business,
            phone,
            Direction::Outbound,
            crate::integrity::Status::Sent,
            now,
        );
    }

    /// What follows a write moving message `id` on from queued: it is
    /// counted taken, and (after a send's bookkeeping) its business told it
    /// is sent.
    async fn on_accepted(&self, business: BusinessId, id: MessageId, accepted: Accepted) {
        self.accepted(business, accepted.phone, accepted.category, accepted.at);
        if accepted.next.status != Status::Sent {
            return;
        }
        self.notify(StatusUpdate {
            business,
            id,
            status: Status::Sent,
            failure: None,
            at: accepted.at,
        })
        .await;
    }

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

    /// The bookkeeping after sending to devices, for a message whose stored
    /// delivery state is `current`.
    fn after_send(&self, current: Delivery, outcome: DeviceOutcome, now: Timestamp) -> Delivery {
        let attempts = current.attempts.saturating_add(1);
        let retry = Some(now.saturating_add(self.delivery.backoff(current.attempts)));
        match outcome {
            // Settled meanwhile with no device left to send to: nothing to
            // try again, only its report (if not yet made) is due.
            DeviceOutcome::Unreachable
                if !current.status.is_open() && current.pending_devices == 0 =>
            {
                self.settle_after_send(current, attempts, now)
            }
            // Nothing reachable now: try the same again later.
            DeviceOutcome::Unreachable => Delivery {
                attempts,
                next_attempt: retry,
                ..current
            },
            // Never reached anyone, and no one can be reached: failed.
            DeviceOutcome::Fail(reason) if current.status == Status::Queued => Delivery {
                status: Status::Failed,
                failure: Some(reason),
                attempts,
                next_attempt: Some(now),
                pending_devices: 0,
            },
            // Some devices have it; the rest cannot be reached: stop trying them.
            DeviceOutcome::Fail(_) => self.settle_after_send(current, attempts, now),
            DeviceOutcome::Reached { sent, pending } => {
                let mut next = current;
                if sent > 0 && current.status == Status::Queued {
                    next.status = Status::Sent;
                }
                if pending != 0 {
                    Delivery {
                        attempts,
                        next_attempt: retry,
                        pending_devices: pending,
                        ..next
                    }
                } else {
                    self.settle_after_send(next, attempts, now)
                }
            }
        }
    }

    /// Bookkeeping once every device that can be reached has the message:
    /// an open message waits for its delivery report (and is sent again if
    /// none comes); a delivered one has its status reported, unless that
    /// was done meanwhile (nothing was due).
    fn settle_after_send(&self, current: Delivery, attempts: u32, now: Timestamp) -> Delivery {
        let next_attempt = if current.status.is_open() {
            Some(now.saturating_add(self.delivery.receipt_timeout))
        } else {
            current.next_attempt.map(|_| now)
        };
        Delivery {
            attempts,
            next_attempt,
            pending_devices: 0,
            ..current
        }
    }

    /// Send `record` to the devices of its recipient (those in `only`, if
    /// given), noting in `reached` each device as it is settled for this
    /// attempt (see [`Sending`]).
    async fn send_to_devices(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        only: Option<u64>,
        purpose: Purpose,
        reached: &mut Reached,
    ) -> DeviceOutcome {
        let business = record.business;
        let released = self.gate.release(
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, body.to.clone()),
            Party::Transport,
            purpose,
        );
        let number = match released {
            Ok(number) => number.into_value(),
            Err(denied) if denied.reason() == DenyReason::AuditFailed => {
                return DeviceOutcome::Unreachable;
            }
            Err(_) => {
                warn!(%business, id = %record.id, "visibility policy refused the number to the transport");
                return DeviceOutcome::Fail(FailureReason::Refused);
            }
        };
        let devices = match self.transport.devices(business, &number).await {
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
        // The devices this attempt is for: all, or those left by the last.
        let wanted = devices
            .iter()
            .map(|&device| (device, Delivery::device_bit(device)))
            .filter(|&(_, bit)| only.is_none_or(|mask| mask & bit != 0));
        reached.listed = wanted.clone().fold(0, |mask, (_, bit)| mask | bit);
        let payload = Zeroizing::new(device_payload(record.id, &body.content));
        let mut refused = false;
        for (device, bit) in wanted {
            let peer = PeerId {
                phone: record.phone,
                device,
            };
            match self
                .ensure_session(business, peer, &number, record.expiry)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    reached.settled |= bit;
                    continue;
                }
                // Pending: tried again later.
                Err(()) => continue,
            }
            let ciphertext = match self
                .sessions
                .encrypt(business, peer, &payload, record.expiry)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    debug!(%business, id = %record.id, device, error = %e, "encrypt failed");
                    continue;
                }
            };
            let message = Outgoing {
                id: record.id,
                ciphertext,
            };
            match self
                .transport
                .send(business, &number, device, &message)
                .await
            {
                Ok(()) => {
                    reached.settled |= bit;
                    reached.sent += 1;
                }
                Err(TransportError::Refused(_)) => {
                    refused = true;
                    reached.settled |= bit;
                }
                Err(_) => {}
            }
        }
        let (sent, pending) = (reached.sent, reached.pending());
        if sent == 0 && pending == 0 && only.is_none() {
            // No device took it: the network refused some, and no session
            // could be had with the rest.
            return DeviceOutcome::Fail(if refused {
                FailureReason::Refused
            } else {
                FailureReason::NoSession
            });
        }
        DeviceOutcome::Reached { sent, pending }
    }

    /// Make sure `peer` has a session, starting one from its bundle if not.
    /// `Ok(false)`: the device cannot be reached (bad bundle, refused);
    /// `Err(())`: try again later.
    async fn ensure_session(
        &self,
        business: BusinessId,
        peer: PeerId,
        number: &PhoneNumber,
        expiry: Timestamp,
    ) -> Result<bool, ()> {
        match self.sessions.has_session(business, peer).await {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            Err(_) => return Err(()),
        }
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
            Err(SignalError::UntrustedIdentity) => Ok(false),
            Err(_) => Err(()),
        }
    }

    /// Report a status to the business, best effort (settled statuses are
    /// reported reliably, see `report_status`).
    async fn notify(&self, update: StatusUpdate) {
        if let Err(e) = self.sink.status(&update).await {
            debug!(business = %update.business, id = %update.id, error = %e, "status not delivered");
        }
    }

    /// Tell the business the settled status (delivered, read or failed) of
    /// one of its messages, whose stored bookkeeping is `stored`; once
    /// told, nothing is pending (devices not reached by then are not sent
    /// to any more). If it cannot be told, the report is due again after a
    /// backoff: a business always learns how its message ended. Returns
    /// whether it was told.
    async fn report_status(
        &self,
        business: BusinessId,
        id: MessageId,
        phone: PhoneHash,
        direction: Direction,
        stored: Delivery,
    ) -> Result<bool, ProcessorError> {
        let update = StatusUpdate {
            business,
            id,
            status: stored.status,
            failure: stored.failure,
            at: self.clock.now(),
        };
        let told = self.sink.status(&update).await.is_ok();
        let next_attempt = if told {
            None
        } else {
            Some(
                update
                    .at
                    .saturating_add(self.delivery.backoff(stored.attempts)),
            )
        };
        let next = Delivery {
            next_attempt,
            attempts: stored.attempts.saturating_add(u32::from(!told)),
            pending_devices: 0,
            ..stored
        };
        // If it changed meanwhile (a newer status, a device left to retry),
        // what changed it decides what is reported next.
        if told {
            let reported = Op::UpdateDelivery {
                business,
                id,
                expected: stored,
                delivery: next,
            };
            self.commit_told(business, id, reported, None).await?;
        } else {
            self.write_delivery(business, id, stored, next).await?;
        }
        if told && update.status == Status::Failed {
            self.statistics.record_message(
                business,
                phone,
                direction,
                crate::integrity::Status::Failed,
                update.at,
            );
        }
        Ok(told)
    }

    /// A delivery report from the transport for an outbound message:
    /// `Delivered` or `Read`. Reports that would move the status backwards
    /// (late, duplicated or out of order), and reports for a message past
    /// its retention (which fails as expired), are ignored.
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
        self.authorize(principal, business)?;
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
                || now >= record.expiry
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
            // Settled, with the report to the business pending until it is
            // told, unless devices still wait for a retry: the report
            // follows that.
            let pending = record.delivery.pending_devices;
            let settled = Delivery {
                status,
                failure: None,
                attempts: record.delivery.attempts,
                next_attempt: if pending != 0 {
                    record.delivery.next_attempt
                } else {
                    Some(now)
                },
                pending_devices: pending,
            };
            let op = Op::UpdateDelivery {
                business,
                id,
                expected: record.delivery,
                delivery: settled,
            };
            // Moving it on from queued counts it taken: should the store
            // fail that write, it is owed with what follows it.
            let accepted = match queued_as {
                Some(Some(category)) => Some(Accepted {
                    phone: record.phone,
                    category,
                    at: now,
                    next: settled,
                }),
                _ => None,
            };
            let written = match accepted {
                Some(_) => self.commit_told(business, id, op, accepted).await?,
                None => self.commit_op(op).await?,
            };
            if !written {
                // Another report won the race: decide again on what it left.
                continue;
            }
            match queued_as {
                Some(Some(category)) => self.accepted(business, record.phone, category, now),
                Some(None) => {
                    warn!(%business, %id, "a message reported delivered cannot be billed: its body is unreadable");
                }
                None => {}
            }
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
            // An attempt under way (a report that came from inside the
            // transport's `send`, say) leaves the report to it: only its
            // bookkeeping knows whether devices still wait for the message.
            // Should it miss this write, the retransmission loop reports it.
            // Looked at again under the claim: an attempt that ended while
            // this write was landing may have reported it already.
            if pending == 0
                && let Some(_claim) = self.take_up(business, id).await?
                && self
                    .storage
                    .message(business, id)
                    .await?
                    .is_some_and(|m| m.delivery == settled)
            {
                self.report_status(business, id, record.phone, Direction::Outbound, settled)
                    .await?;
            }
            return Ok(StatusChange::Applied);
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

    /// The content sealed for the stored message `record`, if its envelope
    /// opens and is the one sealed for this very record (its business, id
    /// and direction), so that no damaged or misplaced row is handed on
    /// under another message's id. A failure that may pass (the key
    /// hierarchy unavailable) is an error.
    async fn open_message(
        &self,
        record: &MessageRecord,
    ) -> Result<Stored<Zeroizing<Vec<u8>>>, ProcessorError> {
        match self.vault.open(&record.sealed, record.business).await {
            Ok(opened) => {
                let label = opened.label();
                Ok(
                    if label.id == record.id && label.kind == message_kind(record.direction) {
                        Stored::Content(opened.plaintext)
                    } else {
                        debug!(business = %record.business, id = %record.id, "a stored message holds another record's envelope");
                        Stored::Unreadable
                    },
                )
            }
            Err(OpenError::Expired { .. }) => Ok(Stored::Expired),
            Err(OpenError::Key(e)) => Err(e.into()),
            Err(e) => {
                debug!(business = %record.business, id = %record.id, error = %e, "a stored message cannot be opened");
                Ok(Stored::Unreadable)
            }
        }
    }

    /// The body of due `record`: opened, decoded, and naming the consumer
    /// whose phone hash the row holds (the row's hash is what that
    /// consumer's Signal state is found by, so a row edited to another
    /// consumer's hash is unreadable, not sent under the other's session).
    async fn due_body(&self, record: &MessageRecord) -> Result<Stored<StoredBody>, ProcessorError> {
        let plaintext = match self.open_message(record).await? {
            Stored::Content(plaintext) => plaintext,
            Stored::Expired => return Ok(Stored::Expired),
            Stored::Unreadable => return Ok(Stored::Unreadable),
        };
        let Ok(body) = StoredBody::decode(record.direction, &plaintext) else {
            debug!(business = %record.business, id = %record.id, "a stored message's body does not decode");
            return Ok(Stored::Unreadable);
        };
        if self
            .keys
            .phone_hash(record.business, body.consumer())
            .await?
            != record.phone
        {
            debug!(business = %record.business, id = %record.id, "a stored message's row names another consumer");
            return Ok(Stored::Unreadable);
        }
        Ok(Stored::Content(body))
    }

    /// Fail `record`, whose stored content cannot be opened or decoded: it
    /// can never be delivered, and its business is told why. Returns
    /// whether the business was told.
    async fn fail_unreadable(&self, record: &MessageRecord) -> Result<bool, ProcessorError> {
        let (business, id, current) = (record.business, record.id, record.delivery);
        warn!(%business, %id, "a stored message is unreadable: failed");
        let failed = Attempt::Fail(FailureReason::Unreadable);
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
    async fn fail_expired(&self, record: &MessageRecord) -> Result<bool, ProcessorError> {
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
        self.write_delivery(record.business, record.id, d, later)
            .await?;
        Ok(())
    }

    /// Work through messages whose next attempt is due: hand inbound ones to
    /// the business, send outbound ones again, report settled statuses and
    /// failures (a message past its retention fails as expired). Operators
    /// only. Run it periodically.
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
        for due in self.storage.due_messages(now, self.delivery.batch).await? {
            report.due += 1;
            // An attempt under way for it will leave it due again if it must be.
            let Some(_claim) = self.take_up(due.business, due.id).await? else {
                continue;
            };
            // Look again under the claim: a status may have arrived meanwhile.
            let Some(record) = self.storage.message(due.business, due.id).await? else {
                continue;
            };
            let d = record.delivery;
            if d.next_attempt.is_none_or(|t| t > now) {
                continue;
            }
            let readable = self.retention.decide(&record, now).await?.readable();
            let resend = record.direction == Direction::Outbound
                && d.status != Status::Failed
                && d.pending_devices != 0
                && readable;
            if !d.status.is_open() && !resend {
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
                continue;
            }
            if !readable {
                // Open, past retention: it can never be delivered now.
                if self.fail_expired(&record).await? {
                    report.failures_reported += 1;
                } else {
                    report.rescheduled += 1;
                }
                continue;
            }
            let body = match self.due_body(&record).await {
                Ok(Stored::Content(body)) => body,
                // Past its retention since the check: the next pass fails it.
                Ok(Stored::Expired) => continue,
                Ok(Stored::Unreadable) => {
                    report.failures_reported += u64::from(self.fail_unreadable(&record).await?);
                    continue;
                }
                // Its key could not be had now (the provider or the store
                // unavailable, a ring to repair): it waits, the rest go on.
                Err(e) => {
                    warn!(business = %record.business, id = %record.id, error = %e, "a due message's key is unavailable: postponed");
                    self.postpone(&record, now).await?;
                    report.rescheduled += 1;
                    continue;
                }
            };
            match body {
                StoredBody::Inbound(body) => {
                    let parts = InboundParts {
                        id: record.id,
                        from: body.from,
                        device: body.device,
                        content: body.content,
                        received: record.created,
                        identity_changed: body.identity_changed,
                    };
                    // Handing a message to its business is delivery, however
                    // many attempts it takes.
                    let attempt = self
                        .hand_to_business(record.business, parts, Purpose::Delivery)
                        .await;
                    if self
                        .settle_inbound(record.business, record.id, record.phone, d, attempt)
                        .await?
                    {
                        report.delivered_to_business += 1;
                    } else {
                        report.rescheduled += 1;
                    }
                }
                StoredBody::Outbound(body) => {
                    // Sending it through the transport again is retransmission.
                    let purpose = if d.attempts == 0 {
                        Purpose::Delivery
                    } else {
                        Purpose::Retransmission
                    };
                    self.attempt_outbound(&record, &body, purpose).await?;
                    match self
                        .storage
                        .message(record.business, record.id)
                        .await?
                        .map(|m| m.delivery.status)
                    {
                        Some(Status::Sent | Status::Delivered | Status::Read) => report.sent += 1,
                        _ => report.rescheduled += 1,
                    }
                }
            }
        }
        Ok(report)
    }

    /// Run the retention sweep (operators only): expired undelivered
    /// messages are reported failed to their businesses, then everything
    /// retention no longer allows is deleted or shredded, no Signal state
    /// the sweep deleted stays in memory, and the integrity monitor and the
    /// statistics forget the consumers out of contact for the retention
    /// ceiling.
    pub async fn sweep(&self, principal: &Principal) -> Result<SweepReport, ProcessorError> {
        self.authorize_operator(principal)?;
        async {
            let notifier = FailureNotifier { processor: self };
            let now = self.clock.now();
            // No consumer outlives retention in the integrity monitor or
            // the statistics either, whether or not its business is still
            // active or its statistics are ever taken.
            self.integrity.expire(now);
            self.statistics.expire(now);
            // A sweep that failed, or whose future is dropped at an await,
            // may have deleted Signal state all the same: the cache is
            // dropped then too.
            let mut clear = ClearSessions(Some(&self.sessions));
            let swept = self.retention.sweep(now, &notifier).await;
            if swept.as_ref().is_ok_and(|report| report.peers_deleted == 0) {
                clear.0 = None;
            }
            drop(clear);
            self.forget_owed_of_deleted().await;
            Ok(swept?)
        }
        .instrument(debug_span!("sweep"))
        .await
    }

    /// Forget what is owed to messages the store no longer has: the sweep
    /// deleted them, and nothing will take them up again (a write that
    /// landed unanswered may have left a message with nothing due). Each is
    /// looked at under its claim, so no call is working on it meanwhile.
    async fn forget_owed_of_deleted(&self) {
        let keys: Vec<(BusinessId, MessageId)> = self
            .claims
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        for (business, id) in keys {
            let Some(_claim) = self.claims.claim(business, id) else {
                continue;
            };
            if let Ok(None) = self.storage.message(business, id).await {
                self.claims
                    .owed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(business, id));
            }
        }
    }

    /// Place a legal hold on `scope` for the case `reference` (operators
    /// only). Audited; a second case may hold the same scope.
    pub async fn place_hold(
        &self,
        principal: &Principal,
        scope: HoldScope,
        reference: &str,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self
            .retention
            .place_hold(scope, reference, self.clock.now())
            .await?)
    }

    /// Release the legal hold on `scope` for the case `reference`
    /// (operators only). Audited. Returns whether it was in force.
    pub async fn release_hold(
        &self,
        principal: &Principal,
        scope: HoldScope,
        reference: &str,
    ) -> Result<bool, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self
            .retention
            .release_hold(scope, reference, self.clock.now())
            .await?)
    }

    /// The legal holds in force (operators only): the holds the audit
    /// trail says stand, a hold change whose call was dropped included.
    pub async fn holds(&self, principal: &Principal) -> Result<Vec<Hold>, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.retention.holds().await?)
    }

    /// Keep `business`'s Signal prekeys healthy and publish them through the
    /// transport.
    pub async fn publish_keys(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        // Its phone index too: a receive creates no key.
        self.keys.ensure_phone_index(business).await?;
        self.sessions.maintain(business).await?;
        let keys = self.sessions.publish(business).await?;
        Ok(self.transport.publish_keys(business, &keys).await?)
    }

    /// Approve a changed identity key of one of `consumer`'s devices that
    /// the identity policy refused: the device's session and trusted
    /// identity are forgotten, and its next first-contact message starts a
    /// new session. Returns whether the device had state.
    pub async fn trust_new_identity(
        &self,
        principal: &Principal,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
    ) -> Result<bool, ProcessorError> {
        self.authorize(principal, business)?;
        let Some(phone) = self.keys.known_phone_hash(business, consumer).await? else {
            // No consumer of the business was ever indexed.
            return Ok(false);
        };
        let reset = self
            .sessions
            .reset_device(business, PeerId { phone, device })
            .await?;
        info!(%business, device, "a changed identity key was approved");
        Ok(reset)
    }

    /// A consumer reported `business` for spam (the transport tells the
    /// processor, acting for the business's number): an integrity signal.
    pub fn report_spam(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.integrity
            .record_spam_report(business, self.clock.now());
        Ok(())
    }

    /// A consumer blocked `business`: an integrity signal.
    pub fn report_block(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.integrity.record_block(business, self.clock.now());
        Ok(())
    }

    /// Hand every business's integrity signals to the transport, released
    /// for integrity (the only party and purpose the published table
    /// allows). Operators only; businesses never see them. Returns how many
    /// reports were handed over.
    pub async fn export_integrity(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let mut exported = 0;
        for report in self.integrity.export_all(self.clock.now()) {
            let report = self
                .gate
                .release(report, Party::Transport, Purpose::Integrity)
                .map_err(|_| ProcessorError::Denied)?;
            self.transport.integrity_signals(report.value()).await?;
            exported += 1;
        }
        Ok(exported)
    }

    /// `business`'s billing statement (every period kept, the open one
    /// included), released to the business.
    pub async fn billing_statement(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<BillingStatement, ProcessorError> {
        self.authorize(principal, business)?;
        let statement = self.billing.statement(business, self.clock.now());
        self.gate
            .release(statement, Party::Business, Purpose::Billing)
            .map(|r| r.into_value())
            .map_err(|_| ProcessorError::Denied)
    }

    /// Hand the closed billing periods of every business to the transport,
    /// billing's system of record, released for billing (operators only).
    /// What cannot be handed over stays for the next export. Returns how
    /// many statements were handed over.
    pub async fn export_billing(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let mut exported = 0;
        for business in self.billing.businesses() {
            // Put back unless handed over, however this call ends: refused,
            // the audit trail or the transport failing, or dropped halfway.
            let (statement, undo) = self.billing.take_closed_undoably(business, now);
            let released = self
                .gate
                .release(statement, Party::Transport, Purpose::Billing)
                .map_err(|_| ProcessorError::Denied)?
                .into_value();
            if released.records.is_empty() {
                continue;
            }
            self.transport.billing(&released).await?;
            undo.keep();
            exported += 1;
        }
        Ok(exported)
    }

    /// Closed periods of non-identifiable statistics, small buckets
    /// suppressed, released to the rest of the company for analytics
    /// (operators only). They are removed only once every one was released.
    pub async fn statistics(
        &self,
        principal: &Principal,
    ) -> Result<Vec<StatisticsReport>, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let mut released = Vec::new();
        for business in self.statistics.businesses() {
            for report in self.statistics.closed_reports(business, now) {
                let report = self
                    .gate
                    .release(report, Party::RestOfCompany, Purpose::Analytics)
                    .map_err(|_| ProcessorError::Denied)?;
                released.push(report.into_value());
            }
        }
        // Sealed by `closed_reports`: what it takes is what was released.
        drop(self.statistics.take_closed(now));
        Ok(released)
    }

    /// How much the store holds (operators only).
    pub async fn census(&self, principal: &Principal) -> Result<Census, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.storage.census().await?)
    }
}

/// Reports expired undelivered messages to their businesses for the sweep.
/// A message marked failed whose business could not be told is no longer
/// open: the retransmission loop tells it, as any other failure.
struct FailureNotifier<'a> {
    processor: &'a Processor,
}

#[async_trait::async_trait]
impl ExpiryNotifier for FailureNotifier<'_> {
    async fn expired_undelivered(&self, message: &MessageRecord) -> bool {
        let p = self.processor;
        // An attempt under way: it finds the message expired, or the next
        // sweep does.
        let claim = p.take_up(message.business, message.id).await;
        let Ok(Some(_claim)) = claim else {
            return false;
        };
        match p.storage.message(message.business, message.id).await {
            Ok(Some(record)) if record.delivery.status.is_open() => {
                p.fail_expired(&record).await.unwrap_or_else(|e| {
                    warn!(business = %record.business, id = %record.id, error = %e, "could not fail an expired message");
                    false
                })
            }
            _ => false,
        }
    }
}
