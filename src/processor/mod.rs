//! The processor: inbound and outbound pipelines over the host's storage,
//! transport and business, with retention and visibility enforced on every
//! path.
//!
//! - **Inbound** ([`Processor::receive`]): a consumer's Signal message is
//!   decrypted, handed to the business (content and number released through
//!   the visibility policy), and sealed and stored, as delivered or queued
//!   for another attempt, in the same commit as the session's advance. Only
//!   then does `receive` return: acknowledge the transport after it, and a
//!   crash can never lose a message the transport let go of. A redelivered
//!   message is recognised (Signal refuses it as a duplicate) and not handed
//!   over twice.
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
//!   Signal layer), operations on one message too; everything else runs
//!   concurrently.
//!
//! Logs (`tracing`) carry business ids, message ids and phone-hash
//! prefixes, never content or numbers.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::envelope::{Kind, Label, MAX_PLAINTEXT_LEN, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use crate::integrity::{
    BillingConfig, BillingLedger, BillingStatement, Category, IntegrityConfig, IntegrityMonitor,
    IntegrityReport, StatisticsCollector, StatisticsConfig, StatisticsReport,
};
use crate::keys::{KeyError, KeyManager, KeyProvider};
use crate::lock::Stripes;
use crate::retention::{
    ExpiryNotifier, HoldError, ResidencyError, Retention, RetentionPolicy, SweepError, SweepReport,
};
use crate::signal::{Ciphertext, Sessions, SignalConfig, SignalError};
use crate::store::{
    Batch, Census, Delivery, Direction, FailureReason, HoldScope, MessageRecord, Op, PeerId,
    Status, Storage, StoreError,
};
use crate::time::{Clock, Timestamp};
use crate::transport::{
    Authorizer, BusinessSink, InboundMessage, Outgoing, Principal, StatusUpdate, Transport,
    TransportError,
};
use crate::vault::{OpenError, Vault};
use crate::visibility::{AuditSink, DataClass, Gate, Labelled, Party, Purpose, VisibilityPolicy};

mod payload;

use payload::{InboundBody, OutboundBody};
pub use payload::{device_payload, parse_device_payload};

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
    /// No such message (never stored, or deleted at the end of its retention).
    #[error("no such message")]
    NotFound,
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
    /// The transport's id for this delivery (stable across redeliveries).
    pub transport_id: Vec<u8>,
    /// The Signal message.
    pub message: Ciphertext,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("from", &self.from)
            .field("device", &self.device)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// What [`Processor::receive`] did; return it only after acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message's id (the same for every redelivery of it).
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
    /// The content.
    pub content: Vec<u8>,
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
    message_locks: Stripes,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("region", &self.storage.region())
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// The id of an inbound message: a hash of the business, the sender's phone
/// hash and the transport's id, so every redelivery gets the same id.
fn inbound_id(business: BusinessId, phone: PhoneHash, transport_id: &[u8]) -> MessageId {
    let mut h = Sha256::new();
    h.update(b"custodian/v1/inbound-id");
    h.update(business.get().to_be_bytes());
    h.update(phone.as_bytes());
    h.update(transport_id);
    let digest = h.finalize();
    let mut id = [0u8; MessageId::LEN];
    id.copy_from_slice(&digest[..MessageId::LEN]);
    MessageId::from_bytes(id)
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
enum Attempt {
    Done,
    Retry,
    Fail(FailureReason),
}

/// The outcome of one attempt to send an outbound message to devices.
enum DeviceOutcome {
    /// Sent to `sent` devices; the `pending` ones failed for now.
    Reached { sent: u32, pending: u64 },
    /// The device list could not be had: try again later.
    Unreachable,
    /// No device can be reached, for this reason.
    Fail(FailureReason),
}

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
            message_locks: Stripes::new(),
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

    /// The retention policy in force, and the legal holds.
    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// The key manager, for KEK rotation and shredding (host administration).
    pub fn keys(&self) -> &KeyManager {
        &self.keys
    }

    /// The visibility gate (its policy, opt-ins).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    fn open_label(&self, record: &MessageRecord) -> Label {
        Label {
            kind: match record.direction {
                Direction::Inbound => Kind::InboundMessage,
                Direction::Outbound => Kind::OutboundMessage,
            },
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
        delivery: Delivery,
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
            delivery,
            sealed: Vec::new(),
        };
        let label = self.open_label(&record);
        record.sealed = self.vault.seal(&label, body).await?;
        Ok(record)
    }

    /// Receive a consumer's message for `business` from the transport.
    /// Returns once the message is durably stored (and, if the business
    /// took it, handed over): acknowledge the transport then. On an error,
    /// do not acknowledge: the transport's redelivery is handled.
    pub async fn receive(
        &self,
        principal: &Principal,
        business: BusinessId,
        inbound: Inbound,
    ) -> Result<Receipt, ProcessorError> {
        self.authorize(principal, business)?;
        self.retention
            .check_residency(business, self.storage.region())?;
        let now = self.clock.now();
        let phone = self.keys.phone_hash(business, &inbound.from).await?;
        let id = inbound_id(business, phone, &inbound.transport_id);
        let expiry = self
            .retention
            .policy()
            .expiry(business, Direction::Inbound, now);
        let peer = PeerId {
            phone,
            device: inbound.device,
        };
        let staged = match self
            .sessions
            .decrypt_staged(business, peer, &inbound.message, expiry)
            .await
        {
            Ok(staged) => staged,
            Err(SignalError::DuplicateMessage) => {
                debug!(%business, %id, "duplicate inbound message");
                return Ok(Receipt {
                    id,
                    duplicate: true,
                    delivered: false,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let decrypted = staged.decrypted();
        let message = InboundMessage {
            business,
            id,
            from: inbound.from,
            device: inbound.device,
            content: decrypted.plaintext.clone(),
            received: now,
            identity_changed: decrypted.identity_changed,
        };
        // Hand over first, then store as delivered (or queued) in the same
        // commit as the session: one write per message. A crash in between
        // means no acknowledgement, a redelivery, and the same id again.
        let attempt = self.hand_to_business(&message).await;
        let body = InboundBody {
            from: message.from,
            device: message.device,
            identity_changed: message.identity_changed,
            content: message.content,
        }
        .encode();
        let delivered = matches!(attempt, Attempt::Done);
        let delivery = self.after_attempt(&Delivery::queued(now), attempt, now);
        let record = self
            .seal_record(
                business,
                id,
                Direction::Inbound,
                phone,
                now,
                expiry,
                delivery,
                &body,
            )
            .await?;
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(record)));
        staged.commit(batch).await?;
        self.integrity.record_received(business, phone, now);
        self.statistics.record_message(
            business,
            phone,
            Direction::Inbound,
            crate::integrity::Status::Sent,
            now,
        );
        if delivered {
            self.statistics.record_message(
                business,
                phone,
                Direction::Inbound,
                crate::integrity::Status::Delivered,
                now,
            );
        }
        debug!(%business, %id, delivered, "inbound message stored");
        Ok(Receipt {
            id,
            duplicate: false,
            delivered,
        })
    }

    /// Release an inbound message's content and sender to its business and
    /// hand it over.
    async fn hand_to_business(&self, message: &InboundMessage) -> Attempt {
        let business = message.business;
        let released = self
            .gate
            .release(
                Labelled::of_business(DataClass::MessageContent, business, ()),
                Party::Business,
                Purpose::Delivery,
            )
            .and_then(|_| {
                self.gate.release(
                    Labelled::of_business(DataClass::ConsumerPhoneNumber, business, ()),
                    Party::Business,
                    Purpose::Delivery,
                )
            });
        if released.is_err() {
            warn!(%business, id = %message.id, "visibility policy refused delivery to the business");
            return Attempt::Fail(FailureReason::Refused);
        }
        match self.sink.deliver(message).await {
            Ok(()) => Attempt::Done,
            Err(e) => {
                debug!(%business, id = %message.id, error = %e, "business unavailable; will retry");
                Attempt::Retry
            }
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
    /// delivery continues (and is retried) from there.
    pub async fn send(
        &self,
        principal: &Principal,
        business: BusinessId,
        outbound: Outbound,
    ) -> Result<MessageId, ProcessorError> {
        self.authorize(principal, business)?;
        self.retention
            .check_residency(business, self.storage.region())?;
        if outbound.content.len() > MAX_PLAINTEXT_LEN - 64 {
            return Err(ProcessorError::Invalid("content too large"));
        }
        let now = self.clock.now();
        let phone = self.keys.phone_hash(business, &outbound.to).await?;
        let id = MessageId::random();
        let expiry = self
            .retention
            .policy()
            .expiry(business, Direction::Outbound, now);
        let body = OutboundBody {
            to: outbound.to,
            category: outbound.category,
            content: outbound.content,
        };
        let record = self
            .seal_record(
                business,
                id,
                Direction::Outbound,
                phone,
                now,
                expiry,
                Delivery::queued(now),
                &body.encode(),
            )
            .await?;
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(record.clone())));
        self.storage.commit(batch).await?;
        self.billing.record(business, body.category, now);
        self.integrity.record_sent(business, phone, now);
        debug!(%business, %id, "outbound message stored");
        let _guard = self.message_locks.lock((business, id)).await;
        self.attempt_outbound(&record, &body).await?;
        Ok(id)
    }

    /// Encrypt and send an outbound message to the devices of its recipient
    /// that still need it (all of them, unless an earlier attempt left some
    /// pending); record the outcome. The caller holds the message's lock.
    async fn attempt_outbound(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
    ) -> Result<(), ProcessorError> {
        let (business, id) = (record.business, record.id);
        let current = record.delivery;
        let only = (current.pending_devices != 0).then_some(current.pending_devices);
        let outcome = self.send_to_devices(record, body, only).await;
        let now = self.clock.now();
        let attempts = current.attempts.saturating_add(1);
        let retry = Some(now.saturating_add(self.delivery.backoff(current.attempts)));
        let delivery = match outcome {
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
            DeviceOutcome::Fail(_) => self.settle_after_send(current, attempts, 0, now),
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
                    self.settle_after_send(next, attempts, 0, now)
                }
            }
        };
        let mut batch = Batch::new();
        batch.push(Op::UpdateDelivery {
            business,
            id,
            delivery,
        });
        self.storage.commit(batch).await?;
        if current.status == Status::Queued && delivery.status == Status::Sent {
            self.statistics.record_message(
                business,
                record.phone,
                Direction::Outbound,
                crate::integrity::Status::Sent,
                now,
            );
            self.notify(StatusUpdate {
                business,
                id,
                status: Status::Sent,
                failure: None,
                at: now,
            })
            .await;
        }
        if !delivery.status.is_open()
            && delivery.next_attempt.is_some()
            && delivery.pending_devices == 0
        {
            let mut settled = record.clone();
            settled.delivery = delivery;
            self.report_status(&settled).await?;
        }
        Ok(())
    }

    /// Bookkeeping once every device that can be reached has the message:
    /// an open message waits for its delivery report (and is sent again if
    /// none comes); a delivered one has its status reported.
    fn settle_after_send(
        &self,
        current: Delivery,
        attempts: u32,
        pending: u64,
        now: Timestamp,
    ) -> Delivery {
        let next_attempt = if current.status.is_open() {
            Some(now.saturating_add(self.delivery.receipt_timeout))
        } else {
            Some(now)
        };
        Delivery {
            attempts,
            next_attempt,
            pending_devices: pending,
            ..current
        }
    }

    async fn send_to_devices(
        &self,
        record: &MessageRecord,
        body: &OutboundBody,
        only: Option<u64>,
    ) -> DeviceOutcome {
        let business = record.business;
        let released = self.gate.release(
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, body.to.clone()),
            Party::Transport,
            Purpose::Delivery,
        );
        let Ok(number) = released else {
            warn!(%business, id = %record.id, "visibility policy refused the number to the transport");
            return DeviceOutcome::Fail(FailureReason::Refused);
        };
        let number = number.value();
        let devices = match self.transport.devices(business, number).await {
            Ok(devices) if devices.is_empty() => {
                return DeviceOutcome::Fail(FailureReason::NoDevices);
            }
            Ok(devices) => devices,
            Err(TransportError::Refused(_)) => return DeviceOutcome::Fail(FailureReason::Refused),
            Err(_) => return DeviceOutcome::Unreachable,
        };
        let payload = device_payload(record.id, &body.content);
        let (mut sent, mut pending) = (0u32, 0u64);
        for device in devices {
            let bit = Delivery::device_bit(device);
            if only.is_some_and(|mask| mask & bit == 0) {
                continue;
            }
            let peer = PeerId {
                phone: record.phone,
                device,
            };
            match self
                .ensure_session(business, peer, number, record.expiry)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(()) => {
                    pending |= bit;
                    continue;
                }
            }
            let ciphertext = match self
                .sessions
                .encrypt(business, peer, &payload, record.expiry)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    debug!(%business, id = %record.id, device, error = %e, "encrypt failed");
                    pending |= bit;
                    continue;
                }
            };
            let message = Outgoing {
                id: record.id,
                ciphertext,
            };
            match self
                .transport
                .send(business, number, device, &message)
                .await
            {
                Ok(()) => sent += 1,
                Err(TransportError::Refused(_)) => {}
                Err(_) => pending |= bit,
            }
        }
        if sent == 0 && pending == 0 && only.is_none() {
            return DeviceOutcome::Fail(FailureReason::NoSession);
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

    /// Report a status to the business, best effort (statuses other than
    /// settled statuses are reported reliably, see `report_status`).
    async fn notify(&self, update: StatusUpdate) {
        if let Err(e) = self.sink.status(&update).await {
            debug!(business = %update.business, id = %update.id, error = %e, "status not delivered");
        }
    }

    /// Tell the business the settled status of `record` (delivered, read or
    /// failed); once told, nothing is pending. If it cannot be told, the
    /// report is due again after a backoff: a business always learns how its
    /// message ended.
    async fn report_status(&self, record: &MessageRecord) -> Result<bool, ProcessorError> {
        let update = StatusUpdate {
            business: record.business,
            id: record.id,
            status: record.delivery.status,
            failure: record.delivery.failure,
            at: self.clock.now(),
        };
        let told = self.sink.status(&update).await.is_ok();
        let next_attempt = if told {
            None
        } else {
            Some(
                update
                    .at
                    .saturating_add(self.delivery.backoff(record.delivery.attempts)),
            )
        };
        let mut batch = Batch::new();
        batch.push(Op::UpdateDelivery {
            business: record.business,
            id: record.id,
            delivery: Delivery {
                next_attempt,
                attempts: record.delivery.attempts.saturating_add(u32::from(!told)),
                ..record.delivery
            },
        });
        self.storage.commit(batch).await?;
        if told && update.status == Status::Failed {
            self.statistics.record_message(
                record.business,
                record.phone,
                record.direction,
                crate::integrity::Status::Failed,
                update.at,
            );
        }
        Ok(told)
    }

    /// A delivery report from the transport for an outbound message:
    /// `Delivered` or `Read`. Reports that would move the status backwards
    /// (late, duplicated or out of order) are ignored.
    pub async fn status_update(
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
        let _guard = self.message_locks.lock((business, id)).await;
        let record = self
            .storage
            .message(business, id)
            .await?
            .ok_or(ProcessorError::NotFound)?;
        if record.direction != Direction::Outbound || !record.delivery.status.may_become(status) {
            return Ok(StatusChange::Ignored);
        }
        let now = self.clock.now();
        // Settled, with the report to the business pending until it is told,
        // unless devices still wait for a retry: the report follows that.
        let mut settled = record.clone();
        let pending = record.delivery.pending_devices;
        settled.delivery = Delivery {
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
        let mut batch = Batch::new();
        batch.push(Op::UpdateDelivery {
            business,
            id,
            delivery: settled.delivery,
        });
        self.storage.commit(batch).await?;
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
        if pending == 0 {
            self.report_status(&settled).await?;
        }
        Ok(StatusChange::Applied)
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

    /// Work through messages whose next attempt is due: hand inbound ones to
    /// the business, send outbound ones again, report failures. Operators
    /// only. Run it periodically.
    pub async fn retransmit_due(
        &self,
        principal: &Principal,
    ) -> Result<RetransmitReport, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let mut report = RetransmitReport::default();
        for due in self.storage.due_messages(now, self.delivery.batch).await? {
            report.due += 1;
            let _guard = self.message_locks.lock((due.business, due.id)).await;
            // Look again under the lock: a status may have arrived meanwhile.
            let Some(record) = self.storage.message(due.business, due.id).await? else {
                continue;
            };
            if record.delivery.next_attempt.is_none_or(|t| t > now) {
                continue;
            }
            let resend = record.direction == Direction::Outbound
                && record.delivery.status != Status::Failed
                && record.delivery.pending_devices != 0;
            if !record.delivery.status.is_open() && !resend {
                if self.report_status(&record).await? && record.delivery.status == Status::Failed {
                    report.failures_reported += 1;
                }
                continue;
            }
            // Past retention: not readable; the sweep reports it failed.
            if !self.retention.decide(&record, now).await?.readable() {
                continue;
            }
            let opened = self.vault.open(&record.sealed, record.business).await?;
            match record.direction {
                Direction::Inbound => {
                    let body = InboundBody::decode(&opened.plaintext)
                        .map_err(|e| ProcessorError::Store(StoreError::Corrupt(e.0.to_owned())))?;
                    let message = InboundMessage {
                        business: record.business,
                        id: record.id,
                        from: body.from,
                        device: body.device,
                        content: body.content,
                        received: record.created,
                        identity_changed: body.identity_changed,
                    };
                    let attempt = self.hand_to_business(&message).await;
                    let done = matches!(attempt, Attempt::Done);
                    let delivery = self.after_attempt(&record.delivery, attempt, now);
                    let mut batch = Batch::new();
                    batch.push(Op::UpdateDelivery {
                        business: record.business,
                        id: record.id,
                        delivery,
                    });
                    self.storage.commit(batch).await?;
                    if done {
                        report.delivered_to_business += 1;
                        self.statistics.record_message(
                            record.business,
                            record.phone,
                            Direction::Inbound,
                            crate::integrity::Status::Delivered,
                            now,
                        );
                    } else if delivery.status == Status::Failed {
                        let mut failed = record.clone();
                        failed.delivery = delivery;
                        self.report_status(&failed).await?;
                    } else {
                        report.rescheduled += 1;
                    }
                }
                Direction::Outbound => {
                    let body = OutboundBody::decode(&opened.plaintext)
                        .map_err(|e| ProcessorError::Store(StoreError::Corrupt(e.0.to_owned())))?;
                    self.attempt_outbound(&record, &body).await?;
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
    /// retention no longer allows is deleted or shredded.
    pub async fn sweep(&self, principal: &Principal) -> Result<SweepReport, ProcessorError> {
        self.authorize_operator(principal)?;
        let notifier = FailureNotifier { processor: self };
        Ok(self.retention.sweep(self.clock.now(), &notifier).await?)
    }

    /// Place a legal hold (operators only).
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

    /// Release a legal hold (operators only).
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

    /// Keep `business`'s Signal prekeys healthy and publish them through the
    /// transport.
    pub async fn publish_keys(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.sessions.maintain(business).await?;
        let keys = self.sessions.publish(business).await?;
        self.transport
            .publish_keys(business, &keys)
            .await
            .map_err(|e| ProcessorError::Config(format!("publishing keys: {e}")))
    }

    /// `business`'s integrity signals, released to the transport for
    /// integrity (the only party the policy allows).
    pub async fn integrity_report(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<IntegrityReport, ProcessorError> {
        self.authorize(principal, business)?;
        let report = self.integrity.export(business, self.clock.now());
        self.gate
            .release(report, Party::Transport, Purpose::Integrity)
            .map(|r| r.into_value())
            .map_err(|_| ProcessorError::Denied)
    }

    /// `business`'s billing statement, released to the business.
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

    /// Closed periods of non-identifiable statistics, small buckets
    /// suppressed, released to the rest of the company for analytics
    /// (operators only).
    pub async fn statistics(
        &self,
        principal: &Principal,
    ) -> Result<Vec<StatisticsReport>, ProcessorError> {
        self.authorize_operator(principal)?;
        self.statistics
            .take_closed(self.clock.now())
            .into_iter()
            .map(|report| {
                self.gate
                    .release(report, Party::RestOfCompany, Purpose::Analytics)
                    .map(|r| r.into_value())
                    .map_err(|_| ProcessorError::Denied)
            })
            .collect()
    }

    /// How much the store holds (operators only).
    pub async fn census(&self, principal: &Principal) -> Result<Census, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.storage.census().await?)
    }
}

/// Reports expired undelivered messages to their businesses for the sweep.
struct FailureNotifier<'a> {
    processor: &'a Processor,
}

#[async_trait::async_trait]
impl ExpiryNotifier for FailureNotifier<'_> {
    async fn expired_undelivered(&self, message: &MessageRecord) -> bool {
        let update = StatusUpdate {
            business: message.business,
            id: message.id,
            status: Status::Failed,
            failure: Some(FailureReason::Expired),
            at: self.processor.clock.now(),
        };
        let told = self.processor.sink.status(&update).await.is_ok();
        if told {
            self.processor.statistics.record_message(
                message.business,
                message.phone,
                message.direction,
                crate::integrity::Status::Failed,
                update.at,
            );
        }
        told
    }
}
