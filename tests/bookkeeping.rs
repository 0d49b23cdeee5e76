//! Delivery bookkeeping when reports race the processor's own writes: a
//! delivery report that beats a send's bookkeeping, a slow report to the
//! business while a device waits for a retry, and a message whose key was
//! shredded early while it was due.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::{BillingStatement, Category, IntegrityReport};
use custodian::keys::{LocalKeyProvider, SecretKey};
use custodian::processor::{DeliveryConfig, Host, Outbound, Policies, Processor};
use custodian::signal::{Ciphertext, PreKeyBundle, PublishedKeys};
use custodian::store::{Batch, Delivery, FailureReason, MemoryStore, Op, Status, Storage};
use custodian::testing::{Faults, SimBusiness, SimNetwork};
use custodian::time::{ManualClock, Timestamp};
use custodian::transport::{
    BusinessSink, InboundMessage, Outgoing, Principal, SinkError, StaticAuthorizer, StatusUpdate,
    Transport, TransportError,
};
use custodian::visibility::MemoryAuditSink;
use tokio::sync::Notify;

/// What a retry receipt got.
type ReceiptOutcome =
    Result<custodian::processor::StatusChange, custodian::processor::ProcessorError>;

const T0: u64 = 1_767_225_600_000;

/// What [`Racing`] does besides forwarding to the simulated network.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Race {
    #[default]
    None,
    /// The device's delivery report reaches the processor from inside
    /// `send`, before the send's own bookkeeping (a host may call back in).
    ReportInsideSend,
    /// The network takes the message but its reply is lost.
    LoseReply,
    /// Device 1's send starts a delivery report for the message (device 0
    /// has it) and fails transiently once that report is in the business's
    /// webhook.
    ReportWhileDevice1Fails,
    /// The network lists every device twice.
    ListTwice,
    /// The network lists this many devices, ids from 0.
    ListMany(u32),
    /// The network answers every bundle request with device 0's bundle.
    BundleOfDevice0,
    /// The network answers every bundle request with the business's own.
    OwnBundle,
    /// The network refuses every send for good.
    RefuseSends,
    /// The network refuses device 0's bundle for good, and device 1's send
    /// fails for now; every send after that is refused for good.
    NoBundle0Device1FailsThenRefused,
    /// The device list call brings in the delivery report of this message,
    /// then fails transiently.
    ReportThenNoDeviceList(MessageId),
    /// Device 0's delivery report reaches the processor from inside its
    /// `send`; device 1's send then fails transiently.
    ReportInsideSendThenDevice1Fails,
    /// The network lists devices 63 and 64 only (which share the last
    /// pending bit), and device 63's first send fails transiently.
    HighDevices63FailsOnce,
    /// The network lists devices 63 and 64 only.
    HighDevices,
    /// The network takes a billing statement, and its answer is lost.
    LoseBillingReply,
    /// The stored message is damaged (its body unreadable) once the
    /// network took it, and its delivery report then reaches the processor
    /// from inside its `send`.
    DamageThenReportInsideSend,
    /// The device list call brings in the delivery report of this message,
    /// then lists the devices.
    ReportInsideDeviceList(MessageId),
    /// The network lists device 0 only, and its send fails for now.
    Only0Fails,
    /// The network lists devices 1 and 2 (device 0 unlinked, two new ones
    /// linked); a send to device 2 never answers.
    Lists12Device2Hangs,
    /// The network lists devices 1 and 2.
    Lists12,
    /// Device 1 is handed a ciphertext it cannot decrypt (as on a session
    /// it lost): it asks for the message again with a retry receipt.
    GarbleDevice1,
    /// As `GarbleDevice1`, and device 1's retry receipt reaches the
    /// processor from inside that send (once the network took it), before
    /// the attempt's own bookkeeping.
    GarbleDevice1ThenReceipt,
    /// A bundle request waits a turn of the scheduler (a network round
    /// trip) before it is answered; each is counted in `bundles`.
    YieldInBundle,
}

/// The simulated network, with one [`Race`] switched on.
struct Racing {
    network: Arc<SimNetwork>,
    processor: OnceLock<Weak<Processor>>,
    transport: Principal,
    race: Mutex<Race>,
    in_webhook: Arc<Notify>,
    report: Mutex<Option<tokio::task::JoinHandle<()>>>,
    published: Mutex<Option<PublishedKeys>>,
    /// Every billing statement handed over, as handed over.
    billing: Mutex<Vec<BillingStatement>>,
    /// The deployment's store.
    store: Arc<MemoryStore>,
    /// A send is hanging (see [`Race::Lists12Device2Hangs`]).
    hanging: std::sync::atomic::AtomicBool,
    /// Bundles fetched under [`Race::YieldInBundle`].
    bundles: std::sync::atomic::AtomicU64,
}

impl Racing {
    fn processor(&self) -> Arc<Processor> {
        self.processor.get().unwrap().upgrade().unwrap()
    }
}

#[async_trait]
impl Transport for Racing {
    async fn devices(&self, b: BusinessId, c: &PhoneNumber) -> Result<Vec<u32>, TransportError> {
        let race = *self.race.lock().unwrap();
        match race {
            Race::ListTwice => {
                let devices = self.network.devices(b, c).await?;
                Ok(devices.iter().chain(&devices).copied().collect())
            }
            Race::ListMany(n) => Ok((0..n).collect()),
            Race::HighDevices63FailsOnce | Race::HighDevices => Ok(vec![63, 64]),
            Race::Only0Fails => Ok(vec![0]),
            Race::Lists12Device2Hangs | Race::Lists12 => Ok(vec![1, 2]),
            Race::ReportThenNoDeviceList(id) => {
                *self.race.lock().unwrap() = Race::None;
                self.processor()
                    .status_update(&self.transport, b, id, Status::Delivered)
                    .await
                    .unwrap();
                Err(TransportError::Unavailable("timed out".into()))
            }
            Race::ReportInsideDeviceList(id) => {
                *self.race.lock().unwrap() = Race::None;
                self.processor()
                    .status_update(&self.transport, b, id, Status::Delivered)
                    .await
                    .unwrap();
                self.network.devices(b, c).await
            }
            _ => self.network.devices(b, c).await,
        }
    }

    async fn fetch_bundle(
        &self,
        b: BusinessId,
        c: &PhoneNumber,
        device: u32,
    ) -> Result<PreKeyBundle, TransportError> {
        let race = *self.race.lock().unwrap();
        match race {
            Race::BundleOfDevice0 => self.network.fetch_bundle(b, c, 0).await,
            Race::NoBundle0Device1FailsThenRefused if device == 0 => {
                Err(TransportError::Refused("no bundle".into()))
            }
            Race::YieldInBundle => {
                self.bundles
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                self.network.fetch_bundle(b, c, device).await
            }
            Race::OwnBundle => Ok(self
                .published
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .bundle(Some(0))),
            _ => self.network.fetch_bundle(b, c, device).await,
        }
    }

    async fn send(
        &self,
        b: BusinessId,
        c: &PhoneNumber,
        device: u32,
        m: &Outgoing,
    ) -> Result<(), TransportError> {
        let race = *self.race.lock().unwrap();
        if race == Race::ReportWhileDevice1Fails && device == 1 {
            *self.race.lock().unwrap() = Race::None;
            let (processor, transport, id) = (self.processor(), self.transport.clone(), m.id);
            let report = tokio::spawn(async move {
                processor
                    .status_update(&transport, b, id, Status::Delivered)
                    .await
                    .unwrap();
            });
            *self.report.lock().unwrap() = Some(report);
            // Until the report is in the business's webhook, or done
            // without telling it.
            loop {
                if self.report.lock().unwrap().as_ref().unwrap().is_finished() {
                    break;
                }
                tokio::select! {
                    () = self.in_webhook.notified() => break,
                    () = tokio::task::yield_now() => {}
                }
            }
            return Err(TransportError::Unavailable("transient".into()));
        }
        if race == Race::HighDevices63FailsOnce && device == 63 {
            *self.race.lock().unwrap() = Race::HighDevices;
            return Err(TransportError::Unavailable("transient".into()));
        }
        if race == Race::ReportInsideSendThenDevice1Fails && device == 1 {
            *self.race.lock().unwrap() = Race::None;
            return Err(TransportError::Unavailable("transient".into()));
        }
        if race == Race::NoBundle0Device1FailsThenRefused && device == 1 {
            *self.race.lock().unwrap() = Race::RefuseSends;
            return Err(TransportError::Unavailable("transient".into()));
        }
        if race == Race::RefuseSends {
            return Err(TransportError::Refused("blocked".into()));
        }
        if race == Race::Only0Fails && device == 0 {
            return Err(TransportError::Unavailable("transient".into()));
        }
        if race == Race::Lists12Device2Hangs && device == 2 {
            self.hanging
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if matches!(race, Race::GarbleDevice1 | Race::GarbleDevice1ThenReceipt) && device == 1 {
            let garbled = Outgoing {
                id: m.id,
                ciphertext: custodian::signal::Ciphertext {
                    kind: custodian::signal::MessageKind::FollowUp,
                    bytes: vec![0x33; 60],
                },
            };
            self.network.send(b, c, device, &garbled).await?;
            if race == Race::GarbleDevice1ThenReceipt {
                // Refused for now: the attempt's record would overwrite it.
                let receipt = self
                    .processor()
                    .retry_receipt(&self.transport, b, m.id, 1)
                    .await;
                assert!(
                    matches!(
                        receipt,
                        Err(custodian::processor::ProcessorError::AttemptUnderWay)
                    ),
                    "{receipt:?}"
                );
            }
            return Ok(());
        }
        self.network.send(b, c, device, m).await?;
        match race {
            Race::LoseReply => Err(TransportError::Unavailable("reply lost".into())),
            Race::DamageThenReportInsideSend => {
                let mut damaged = self.store.message(b, m.id).await.unwrap().unwrap();
                damaged.sealed = b"damaged".to_vec();
                let mut batch = Batch::new();
                batch.push(Op::DeleteMessage {
                    business: b,
                    id: m.id,
                });
                batch.push(Op::PutMessage(Box::new(damaged)));
                self.store.commit(batch).await.unwrap();
                self.processor()
                    .status_update(&self.transport, b, m.id, Status::Delivered)
                    .await
                    .unwrap();
                Ok(())
            }
            Race::ReportInsideSend | Race::ReportInsideSendThenDevice1Fails => {
                self.processor()
                    .status_update(&self.transport, b, m.id, Status::Delivered)
                    .await
                    .unwrap();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn ask_resend(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        id: MessageId,
        message: &Ciphertext,
    ) -> Result<(), TransportError> {
        self.network
            .ask_resend(business, consumer, device, id, message)
            .await
    }
    async fn publish_keys(&self, b: BusinessId, k: &PublishedKeys) -> Result<(), TransportError> {
        *self.published.lock().unwrap() = Some(k.clone());
        self.network.publish_keys(b, k).await
    }

    async fn one_time_prekey_count(
        &self,
        business: BusinessId,
    ) -> Result<Option<usize>, TransportError> {
        self.network.one_time_prekey_count(business).await
    }

    async fn integrity_signals(&self, r: &IntegrityReport) -> Result<(), TransportError> {
        self.network.integrity_signals(r).await
    }

    async fn billing(&self, s: &BillingStatement) -> Result<(), TransportError> {
        self.billing.lock().unwrap().push(s.clone());
        self.network.billing(s).await?;
        if *self.race.lock().unwrap() == Race::LoseBillingReply {
            return Err(TransportError::Unavailable("reply lost".into()));
        }
        Ok(())
    }
}

/// A business endpoint whose first `Delivered` report waits, once armed,
/// until it is let go (a slow webhook).
struct SlowWebhook {
    business: Arc<SimBusiness>,
    armed: Mutex<bool>,
    entered: Arc<Notify>,
    go: Notify,
}

#[async_trait]
impl BusinessSink for SlowWebhook {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        self.business.deliver(message).await
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        let armed = update.status == Status::Delivered
            && std::mem::replace(&mut *self.armed.lock().unwrap(), false);
        if armed {
            self.entered.notify_one();
            self.go.notified().await;
        }
        self.business.status(update).await
    }
}

struct Deployment {
    clock: ManualClock,
    store: Arc<MemoryStore>,
    key_provider: Arc<LocalKeyProvider>,
    authorizer: Arc<StaticAuthorizer>,
    racing: Arc<Racing>,
    webhook: Arc<SlowWebhook>,
    processor: Arc<Processor>,
    transport: Principal,
    operator: Principal,
    owner: Principal,
}

/// A processor over these seams.
fn start(
    clock: &ManualClock,
    store: &Arc<MemoryStore>,
    key_provider: &Arc<LocalKeyProvider>,
    authorizer: &Arc<StaticAuthorizer>,
    racing: &Arc<Racing>,
    webhook: &Arc<SlowWebhook>,
) -> Arc<Processor> {
    let host = Host {
        storage: store.clone(),
        key_provider: key_provider.clone(),
        transport: racing.clone(),
        business: webhook.clone(),
        authorizer: authorizer.clone(),
        clock: Arc::new(clock.clone()),
        audit: Arc::new(MemoryAuditSink::new()),
    };
    let policies = Policies {
        delivery: DeliveryConfig {
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            receipt_timeout: Duration::from_secs(120),
            batch: 10_000,
        },
        ..Policies::default()
    };
    Arc::new(Processor::new(host, policies).unwrap())
}

impl Deployment {
    /// A deployment whose consumer 1 has 65 devices (those from 63 up share
    /// one pending bit), its business's keys published, `race` on.
    async fn with_65_devices(race: Race) -> (Self, BusinessId) {
        let d = Self::new(Faults::none());
        let b = business(1);
        d.racing.network.add_consumer(&number(1), 65).await;
        d.processor.publish_keys(&d.owner, b).await.unwrap();
        d.race(race);
        (d, b)
    }

    /// A deployment with no faults, business 1's keys published, and
    /// consumer 1 with `devices` devices; and business 1.
    /// Hand in device 0's retry receipts for `ids` at once, each
    /// yielding while it fetches a bundle: how many bundles were fetched,
    /// and what each receipt got.
    async fn receipts_at_once(
        &self,
        b: BusinessId,
        [one, two]: [MessageId; 2],
    ) -> (u64, ReceiptOutcome, ReceiptOutcome) {
        self.race(Race::YieldInBundle);
        let (first, second) = tokio::join!(
            self.processor.retry_receipt(&self.transport, b, one, 0),
            self.processor.retry_receipt(&self.transport, b, two, 0),
        );
        self.race(Race::None);
        let fetched = self
            .racing
            .bundles
            .load(std::sync::atomic::Ordering::SeqCst);
        (fetched, first, second)
    }

    /// Hand in `device`'s retry receipt for `id`, which must start it a
    /// new session.
    async fn receipt_applied(&self, b: BusinessId, id: MessageId, device: u32) {
        let receipt = self.processor.retry_receipt(&self.transport, b, id, device);
        assert_eq!(
            receipt.await.unwrap(),
            custodian::processor::StatusChange::Applied
        );
    }

    async fn ready(devices: u32) -> (Self, BusinessId) {
        let d = Self::new(Faults::none());
        let b = business(1);
        d.racing.network.add_consumer(&number(1), devices).await;
        d.processor.publish_keys(&d.owner, b).await.unwrap();
        (d, b)
    }

    fn new(network_faults: Faults) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let store = Arc::new(MemoryStore::new());
        let transport = Principal::new("transport");
        let operator = Principal::new("operator");
        let owner = Principal::new("owner");
        let mut authorizer = StaticAuthorizer::new().operator(&operator);
        for b in [1, 2] {
            let b = BusinessId::new(b).unwrap();
            authorizer = authorizer.grant(&owner, b).carrier(&transport, b);
        }
        let in_webhook = Arc::new(Notify::new());
        let racing = Arc::new(Racing {
            network: Arc::new(SimNetwork::new(clock.clone(), network_faults, 1).unwrap()),
            processor: OnceLock::new(),
            transport: transport.clone(),
            race: Mutex::new(Race::None),
            in_webhook: in_webhook.clone(),
            report: Mutex::new(None),
            published: Mutex::new(None),
            billing: Mutex::new(Vec::new()),
            store: store.clone(),
            hanging: std::sync::atomic::AtomicBool::new(false),
            bundles: std::sync::atomic::AtomicU64::new(0),
        });
        let webhook = Arc::new(SlowWebhook {
            business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
            armed: Mutex::new(false),
            entered: in_webhook,
            go: Notify::new(),
        });
        let key_provider = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
        let authorizer = Arc::new(authorizer);
        let processor = start(
            &clock,
            &store,
            &key_provider,
            &authorizer,
            &racing,
            &webhook,
        );
        racing.processor.set(Arc::downgrade(&processor)).unwrap();
        Self {
            clock,
            store,
            key_provider,
            authorizer,
            racing,
            webhook,
            processor,
            transport,
            operator,
            owner,
        }
    }

    /// The processor started next over the deployment's store and seams,
    /// as after a stop (it takes the store over).
    fn restart(&self) -> Arc<Processor> {
        start(
            &self.clock,
            &self.store,
            &self.key_provider,
            &self.authorizer,
            &self.racing,
            &self.webhook,
        )
    }

    fn race(&self, race: Race) {
        *self.racing.race.lock().unwrap() = race;
    }

    async fn send(&self, b: BusinessId, to: usize) -> MessageId {
        let message = Outbound {
            to: number(to),
            content: b"hello".to_vec().into(),
            category: Category::Service,
        };
        self.processor.send(&self.owner, b, message).await.unwrap()
    }

    /// Messages billed to `b` so far.
    async fn billed(&self, b: BusinessId) -> u64 {
        let statement = self
            .processor
            .billing_statement(&self.owner, b)
            .await
            .unwrap();
        statement.records.iter().map(|r| r.messages.total()).sum()
    }

    /// A message of `b` to a consumer with two devices, reported delivered
    /// by device 0 from inside its send while device 1's send fails for
    /// now: delivered, device 1 waiting for a retry, the business told so
    /// (by the send's record: the report came while it held the message).
    async fn delivered_with_device_1_waiting(&self, b: BusinessId) -> MessageId {
        self.racing.network.add_consumer(&number(1), 2).await;
        self.processor.publish_keys(&self.owner, b).await.unwrap();
        self.race(Race::ReportInsideSendThenDevice1Fails);
        let id = self.send(b, 1).await;
        let waiting = self.store.message(b, id).await.unwrap().unwrap().delivery;
        assert_eq!(waiting.status, Status::Delivered);
        assert_eq!(waiting.pending_devices, 0b10, "device 1 waits for a retry");
        assert_eq!(waiting.told, Some(Status::Delivered));
        let told = self.webhook.business.statuses();
        assert_eq!(
            told.get(&id).map(Vec::as_slice),
            Some(&[(Status::Delivered, None)][..]),
            "told ahead of device 1"
        );
        id
    }

    /// Deliver what is in flight and retry what is due, `rounds` times.
    async fn settle(&self, rounds: usize) {
        for _ in 0..rounds {
            self.racing
                .network
                .pump(&self.processor, &self.transport)
                .await;
            self.clock.advance(Duration::from_secs(30));
            self.processor.retransmit_due(&self.operator).await.unwrap();
        }
    }
}

fn number(i: usize) -> PhoneNumber {
    format!("+4477009{i:05}").parse().unwrap()
}

fn business(n: u64) -> BusinessId {
    BusinessId::new(n).unwrap()
}

/// A delivery report that reaches the processor before the send's own
/// bookkeeping moves the message on from queued: the message is still
/// billed, once, and ends delivered.
#[tokio::test]
async fn a_report_that_beats_the_sends_bookkeeping_still_bills_once() {
    let (d, b) = Deployment::ready(1).await;
    d.send(b, 1).await;
    assert_eq!(d.billed(b).await, 1);

    d.race(Race::ReportInsideSend);
    let id = d.send(b, 1).await;
    let (status, _) = d.processor.message_status(&d.owner, b, id).await.unwrap();
    assert_eq!(status, Status::Delivered);
    assert_eq!(d.billed(b).await, 2);
    d.race(Race::None);
    d.settle(5).await;
    assert_eq!(d.billed(b).await, 2, "billed once, whoever moved it on");
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Delivered, None)],
        "told once"
    );
}

/// The network took the message but its reply was lost; the device's
/// report then arrives, and the retransmission after it finds the message
/// delivered. Billed once.
#[tokio::test]
async fn a_send_whose_reply_was_lost_is_billed_once_when_its_report_comes() {
    let (d, b) = Deployment::ready(1).await;
    d.race(Race::LoseReply);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    let (status, _) = d.processor.message_status(&d.owner, b, id).await.unwrap();
    assert_eq!(status, Status::Queued);
    d.settle(5).await;
    let (status, _) = d.processor.message_status(&d.owner, b, id).await.unwrap();
    assert!(matches!(status, Status::Delivered | Status::Read));
    assert_eq!(d.billed(b).await, 1);
}

/// Device 0's report comes while device 1's send fails and is left to
/// retry, and the business's webhook is slow: the send's record tells it
/// the report ahead of device 1, and the report's own write, made while
/// the send held the message, never undoes the retry. Device 1 gets the
/// message; the business is told delivered once.
#[tokio::test]
async fn a_slow_report_never_undoes_a_device_left_to_retry() {
    let (d, b) = Deployment::ready(2).await;
    *d.webhook.armed.lock().unwrap() = true;
    d.race(Race::ReportWhileDevice1Fails);
    let let_go = async {
        d.webhook.entered.notified().await;
        d.webhook.go.notify_one();
    };
    let (id, ()) = tokio::join!(d.send(b, 1), let_go);
    let waiting = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(waiting.status, Status::Delivered);
    assert_eq!(waiting.pending_devices, 0b10, "device 1 waits for a retry");
    assert_eq!(waiting.told, Some(Status::Delivered));
    let report = d.racing.report.lock().unwrap().take().unwrap();
    report.await.unwrap();
    let after = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(after, waiting, "the report's write lost to the newer state");
    d.settle(10).await;
    let received = d.racing.network.received(&number(1)).await;
    for device in [0, 1] {
        assert_eq!(received[&device].get(&id), Some(&1), "device {device}");
    }
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Delivered, None)],
        "told delivered once"
    );
}

/// A business's epoch shredded early while one of its messages is due: the
/// message fails as unreadable, and another business's message due behind
/// it is sent in the same pass.
#[tokio::test]
async fn an_early_shred_fails_its_message_and_holds_up_no_other_business() {
    let outage = Faults::none().with_outage(Timestamp::from_millis(T0), Duration::from_secs(60));
    let d = Deployment::new(outage);
    let (b1, b2) = (business(1), business(2));
    d.racing.network.add_consumer(&number(1), 1).await;
    d.racing.network.add_consumer(&number(2), 1).await;
    let m1 = d.send(b1, 1).await;
    d.clock.advance(Duration::from_secs(1));
    let m2 = d.send(b2, 2).await;
    d.clock.advance(Duration::from_secs(120));
    d.processor.publish_keys(&d.owner, b1).await.unwrap();
    d.processor.publish_keys(&d.owner, b2).await.unwrap();
    let epoch = d.store.message(b1, m1).await.unwrap().unwrap().epoch;
    assert!(
        d.processor
            .shred_epoch(&d.operator, b1, epoch, "case")
            .await
            .unwrap()
    );

    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(report.failures_reported, 1);
    assert_eq!(
        d.processor.message_status(&d.owner, b1, m1).await.unwrap(),
        (Status::Failed, Some(FailureReason::Unreadable))
    );
    let (status, _) = d.processor.message_status(&d.owner, b2, m2).await.unwrap();
    assert_eq!(status, Status::Sent);
}

/// A message reported delivered while device 1 waits for a retry, whose
/// epoch is then shredded early: device 1 can no longer get it, but the
/// message stays delivered (a status never goes backwards) and its business
/// is told delivered, once, not failed.
#[tokio::test]
async fn an_early_shred_never_fails_a_message_reported_delivered() {
    let d = Deployment::new(Faults::none());
    let b = business(1);
    let id = d.delivered_with_device_1_waiting(b).await;
    let epoch = d.store.message(b, id).await.unwrap().unwrap().epoch;
    assert!(
        d.processor
            .shred_epoch(&d.operator, b, epoch, "case")
            .await
            .unwrap()
    );

    d.settle(3).await;
    assert_eq!(
        d.processor.message_status(&d.owner, b, id).await.unwrap(),
        (Status::Delivered, None)
    );
    let settled = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(settled.pending_devices, 0, "device 1 is given up");
    assert_eq!(settled.next_attempt, None, "nothing more is due");
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Delivered, None)],
        "told delivered once"
    );
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(received[&0].get(&id), Some(&1));
    assert_eq!(received.get(&1).and_then(|r| r.get(&id)), None);
}

/// Devices 63 and above share one pending bit: device 63 failing for now
/// while device 64 takes the message leaves the bit pending, so device 63
/// is sent the message again (device 64 may get it again, which its
/// payload's id lets it recognise).
#[tokio::test]
async fn a_device_sharing_the_last_pending_bit_is_not_left_without_the_message() {
    let (d, b) = Deployment::with_65_devices(Race::HighDevices63FailsOnce).await;
    let id = d.send(b, 1).await;
    let waiting = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(waiting.pending_devices, Delivery::device_bit(63));
    d.settle(2).await;
    let received = d.racing.network.received(&number(1)).await;
    for device in [63, 64] {
        assert!(received[&device].contains_key(&id), "device {device}");
    }
}

/// A billing statement the network took, whose answer was lost, is handed
/// over again as it was, under the same id, before anything newer, even by
/// the processor started next over the same store: billing is kept in the
/// store, not in the processor, the counts no take holds yet included. The
/// network, counting each id once, bills each message once; the next
/// period's message follows in a statement of its own.
#[tokio::test]
async fn a_billing_statement_whose_answer_was_lost_is_handed_over_again_as_it_was() {
    let (d, b) = Deployment::ready(1).await;
    d.send(b, 1).await;
    d.send(b, 1).await;
    d.clock.advance(Duration::from_secs(24 * 3600));
    d.race(Race::LoseBillingReply);
    assert!(d.processor.export_billing(&d.operator).await.is_err());
    d.race(Race::None);
    d.send(b, 1).await;

    let next = d.restart();
    let statement = next.billing_statement(&d.owner, b).await.unwrap();
    let billed: Vec<u64> = statement
        .records
        .iter()
        .map(|r| r.messages.service)
        .collect();
    assert_eq!(billed, [2, 1], "both days, the one taken and the open one");
    assert_eq!(next.export_billing(&d.operator).await.unwrap(), 1);
    let handed = d.racing.billing.lock().unwrap().clone();
    assert_eq!(handed.len(), 2);
    assert_eq!(handed[0], handed[1], "the same take, under the same id");

    d.clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(next.export_billing(&d.operator).await.unwrap(), 1);
    let recorded = d.racing.network.billing_statements().await;
    assert_eq!(recorded.len(), 2);
    assert_ne!(recorded[0].id, recorded[1].id);
    let billed: Vec<u64> = recorded
        .iter()
        .map(|s| s.records.iter().map(|r| r.messages.total()).sum())
        .collect();
    assert_eq!(billed, [2, 1]);
    assert_eq!(next.export_billing(&d.operator).await.unwrap(), 0);
    assert!(d.store.billing_businesses().await.unwrap().is_empty());
}

/// A delivery report that finds its message's body unreadable (damaged,
/// or its epoch shredded early, once the send read it) cannot bill it: its
/// category is in the body. The send's own record of what the transport
/// took, which knows the category, bills it, once.
#[tokio::test]
async fn a_message_its_report_could_not_bill_is_billed_by_its_send() {
    let (d, b) = Deployment::ready(1).await;
    d.race(Race::DamageThenReportInsideSend);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    let stored = d.store.message(b, id).await.unwrap().unwrap();
    assert_eq!(stored.delivery.status, Status::Delivered);
    assert_ne!(stored.delivery.accepted_by, 0, "billed");
    assert_eq!(d.billed(b).await, 1);
    d.settle(2).await;
    assert_eq!(d.billed(b).await, 1, "once");
}

/// A network that lists a device twice: the device is sent the message
/// once.
#[tokio::test]
async fn a_device_listed_twice_is_sent_the_message_once() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::ListTwice);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    d.settle(1).await;
    let received = d.racing.network.received(&number(1)).await;
    for device in [0, 1] {
        assert_eq!(received[&device].get(&id), Some(&1), "device {device}");
    }
}

/// A network that lists more devices than a consumer may have: the message
/// fails as such, and not one bundle is fetched nor session stored for it.
/// At the limit, the devices the consumer has get it.
#[tokio::test]
async fn a_list_of_more_devices_than_a_consumer_may_have_fails_the_message() {
    use custodian::processor::MAX_DEVICES;
    let limit = u32::try_from(MAX_DEVICES).unwrap();
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::ListMany(limit + 1));
    let refused = d.send(b, 1).await;
    assert_eq!(
        d.processor
            .message_status(&d.owner, b, refused)
            .await
            .unwrap(),
        (Status::Failed, Some(FailureReason::TooManyDevices))
    );
    assert_eq!(d.store.census().await.unwrap().peers, 0);

    d.race(Race::ListMany(limit));
    let id = d.send(b, 1).await;
    d.race(Race::None);
    d.settle(5).await;
    let received = d.racing.network.received(&number(1)).await;
    for device in [0, 1] {
        assert_eq!(received[&device].get(&id), Some(&1), "device {device}");
    }
    assert!(received.values().all(|got| !got.contains_key(&refused)));
}

/// A network that answers device 1's bundle request with device 0's
/// bundle: no session is started from it, and device 1 gets the message
/// once the network answers right.
#[tokio::test]
async fn a_bundle_of_another_device_is_refused_and_the_device_still_gets_the_message() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::BundleOfDevice0);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    d.settle(10).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(received[&1].get(&id), Some(&1), "device 1");
    let (status, _) = d.processor.message_status(&d.owner, b, id).await.unwrap();
    assert_eq!(status, Status::Delivered);
}

/// A network that hands the business its own bundle for a consumer's
/// device: no session is started from it (the message fails, having
/// reached no one), and the next message reaches the device once the
/// network answers right.
#[tokio::test]
async fn the_business_own_bundle_is_refused_for_a_consumer_device() {
    let (d, b) = Deployment::ready(1).await;
    d.race(Race::OwnBundle);
    let first = d.send(b, 1).await;
    d.race(Race::None);
    assert_eq!(
        d.processor
            .message_status(&d.owner, b, first)
            .await
            .unwrap(),
        (Status::Failed, Some(FailureReason::NoSession))
    );
    let second = d.send(b, 1).await;
    d.settle(5).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(received[&0].get(&second), Some(&1));
}

/// A network that refuses every send for good: the message fails as
/// refused, not for want of a session.
#[tokio::test]
async fn a_message_every_device_refuses_fails_as_refused() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::RefuseSends);
    let id = d.send(b, 1).await;
    assert_eq!(
        d.processor.message_status(&d.owner, b, id).await.unwrap(),
        (Status::Failed, Some(FailureReason::Refused))
    );
    d.settle(3).await;
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Failed, Some(FailureReason::Refused))]
    );
}

/// No device of two takes a message: device 0's bundle is refused for
/// good, device 1's send fails for now, and its retry is refused for good.
/// The message fails as refused on that retry, not after waiting the
/// receipt timeout for a report no device can send.
#[tokio::test]
async fn a_retry_that_reaches_no_device_fails_a_message_no_device_has_at_once() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::NoBundle0Device1FailsThenRefused);
    let id = d.send(b, 1).await;
    let waiting = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(waiting.status, Status::Queued);
    assert_eq!(
        waiting.pending_devices & 0b11,
        0b10,
        "device 1 waits for a retry, not device 0, given up on"
    );
    d.clock.advance(Duration::from_secs(5));
    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!((report.failures_reported, report.rescheduled), (1, 0));
    assert_eq!(
        d.processor.message_status(&d.owner, b, id).await.unwrap(),
        (Status::Failed, Some(FailureReason::Refused))
    );
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Failed, Some(FailureReason::Refused))]
    );
    let received = d.racing.network.received(&number(1)).await;
    assert!(received.values().all(|got| !got.contains_key(&id)));
}

/// A delivery report that arrives while a retransmission asks for the
/// device list, which then fails: the business is told delivered once.
#[tokio::test]
async fn a_report_during_a_failed_device_list_call_is_told_once() {
    let (d, b) = Deployment::ready(1).await;
    let id = d.send(b, 1).await;
    // Device 0 gets it; its report is lost, so it is sent again after the
    // receipt timeout, when the report comes after all.
    d.race(Race::ReportThenNoDeviceList(id));
    d.clock.advance(Duration::from_secs(121));
    d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(*d.racing.race.lock().unwrap(), Race::None, "the race ran");
    d.clock.advance(Duration::from_secs(600));
    d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Sent, None), (Status::Delivered, None)]
    );
}

/// Device 0's delivery report reaches the processor from inside its send,
/// and device 1's send then fails for now: the business is not told
/// delivered while device 1 waits for the message, and is told once, after
/// device 1 has it.
#[tokio::test]
async fn a_report_from_inside_a_send_waits_for_the_devices_left_to_retry() {
    let d = Deployment::new(Faults::none());
    let b = business(1);
    let id = d.delivered_with_device_1_waiting(b).await;
    d.settle(10).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(received[&1].get(&id), Some(&1), "device 1");
    assert_eq!(
        d.webhook.business.statuses()[&id],
        [(Status::Delivered, None)],
        "told once"
    );
}

/// Only an attempt decided on a queued message bills it: a sent message
/// with no token (as a row stored before tokens existed reads) is not
/// billed, counted or told sent again by its retransmission.
#[tokio::test]
async fn a_sent_message_with_no_token_is_not_billed_again_by_its_retransmission() {
    let (d, b) = Deployment::ready(1).await;
    let id = d.send(b, 1).await;
    assert_eq!(d.billed(b).await, 1);
    let stored = d.store.message(b, id).await.unwrap().unwrap();
    assert_eq!(stored.delivery.status, Status::Sent);
    let mut batch = Batch::new();
    batch.push(Op::UpdateDelivery {
        business: b,
        id,
        expected: stored.delivery,
        delivery: Delivery {
            accepted_by: 0,
            ..stored.delivery
        },
    });
    d.store.commit(batch).await.unwrap();
    let told = || {
        d.webhook
            .business
            .statuses()
            .get(&id)
            .cloned()
            .unwrap_or_default()
    };
    let before = told();
    // No receipt: the receipt timeout passes, and it is sent again.
    d.clock.advance(Duration::from_secs(121));
    d.processor.retransmit_due(&d.operator).await.unwrap();
    let stored = d.store.message(b, id).await.unwrap().unwrap();
    assert!(
        stored.delivery.attempts >= 2,
        "sent again: {:?}",
        stored.delivery
    );
    assert_eq!(d.billed(b).await, 1, "billed once");
    assert_eq!(told(), before, "told sent once");
}

/// A retransmission that hands nothing over (the network is down, so the
/// device list cannot be had) counts as rescheduled, not as sent (it
/// counted as sent: the message's status was).
#[tokio::test]
async fn a_retransmission_that_reaches_no_device_is_not_counted_sent() {
    let start = Timestamp::from_millis(T0);
    let outage = Faults::none().with_outage(
        start.saturating_add(Duration::from_secs(100)),
        Duration::from_secs(600),
    );
    let d = Deployment::new(outage);
    let b = business(1);
    d.racing.network.add_consumer(&number(1), 1).await;
    d.processor.publish_keys(&d.owner, b).await.unwrap();
    let id = d.send(b, 1).await;
    let sent = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(sent.status, Status::Sent);
    // The receipt timeout passes during the outage: the retransmission
    // cannot even list the devices.
    d.clock.advance(Duration::from_secs(121));
    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    let after = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(after.attempts, sent.attempts + 1, "an attempt was made");
    assert_eq!(
        (report.due, report.sent, report.rescheduled),
        (1, 0, 1),
        "nothing was handed to the transport: {report:?}"
    );
}

/// Nothing is sent again after a delivery report. A retransmission (the
/// receipt timeout passed) is under way when the message's delivery
/// report comes in from the network (from inside the transport's `send`
/// to device 0): device 1, whose earlier send the network had accepted,
/// is not sent the message again. (It was.)
#[tokio::test]
async fn no_device_is_sent_the_message_again_after_its_report_is_taken() {
    let (d, b) = Deployment::ready(2).await;
    let id = d.send(b, 1).await;
    let sent = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!((sent.status, sent.pending_devices), (Status::Sent, 0));
    // The network accepted both copies; the report is late, and the
    // receipt timeout passes: the retransmission starts, and the report
    // arrives while it sends to device 0.
    d.clock.advance(Duration::from_secs(121));
    d.race(Race::ReportInsideSend);
    d.processor.retransmit_due(&d.operator).await.unwrap();
    d.race(Race::None);
    d.settle(3).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(
        received[&1].get(&id),
        Some(&1),
        "device 1 was sent the message again after the processor took its delivery report"
    );
}

/// A report that comes in before a retransmission to every device has
/// sent to any (from inside the device list call) spares them all, and
/// the message stays delivered: sparing every device is not a failure to
/// reach one. (Every device was sent the message again after the report.)
#[tokio::test]
async fn a_report_before_a_retransmission_sends_to_any_device_spares_them_all() {
    let (d, b) = Deployment::ready(2).await;
    let id = d.send(b, 1).await;
    d.clock.advance(Duration::from_secs(121));
    d.race(Race::ReportInsideDeviceList(id));
    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    d.settle(3).await;
    let received = d.racing.network.received(&number(1)).await;
    for device in [0, 1] {
        assert_eq!(received[&device].get(&id), Some(&1), "device {device}");
    }
    let stored = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!((stored.status, stored.failure), (Status::Delivered, None));
    assert_eq!(
        (report.sent, report.failures_reported),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(
        d.webhook.business.statuses().get(&id).map(Vec::as_slice),
        Some(&[(Status::Sent, None), (Status::Delivered, None)][..])
    );
}

/// A retry of a message no device has yet, whose only pending device is
/// gone from the device list, is sent to every device listed now (devices
/// 1 and 2). The process stops (here: the attempt is cut off and a new
/// processor takes the store over, as after a crash) after device 1 took
/// the message and before device 2 did. Device 1's delivery report then
/// leaves every device pending, as on any message still queued (no record
/// says which devices have it): device 2 gets the message, and device 1 a
/// copy it drops by id. (The report kept only the stale pending bit of
/// device 0, no longer listed: device 2 was never sent the message, and
/// the business was told it was delivered.)
#[tokio::test]
async fn a_report_after_a_crashed_retry_to_a_new_device_list_leaves_no_device_out() {
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Waker};

    let d = Deployment::new(Faults::none());
    let b = business(1);
    d.racing.network.add_consumer(&number(1), 3).await;
    d.processor.publish_keys(&d.owner, b).await.unwrap();
    d.race(Race::Only0Fails);
    let id = d.send(b, 1).await;
    // Device 0 left to retry, and every device not tried.
    let waiting = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(
        (waiting.status, waiting.pending_devices),
        (Status::Queued, u64::MAX)
    );

    // The retry: device 0 is gone, devices 1 and 2 are listed; device 1
    // takes the message, and the process stops while device 2's send is
    // under way.
    d.race(Race::Lists12Device2Hangs);
    d.clock.advance(Duration::from_secs(5));
    {
        let retry = d.processor.retransmit_due(&d.operator);
        let mut retry = std::pin::pin!(retry);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..10_000 {
            if d.racing.hanging.load(Ordering::SeqCst) {
                break;
            }
            assert!(retry.as_mut().poll(&mut cx).is_pending());
            tokio::task::yield_now().await;
        }
        assert!(
            d.racing.hanging.load(Ordering::SeqCst),
            "device 2's send started"
        );
    }
    let next = d.restart();
    d.race(Race::Lists12);
    // Device 1 has it (the network took it), and reports it delivered.
    let received = d.racing.network.received(&number(1)).await;
    assert!(received.is_empty(), "nothing decrypted yet");
    assert_eq!(
        next.status_update(&d.transport, b, id, Status::Delivered)
            .await
            .unwrap(),
        custodian::processor::StatusChange::Applied
    );
    for _ in 0..10 {
        d.clock.advance(Duration::from_secs(30));
        next.retransmit_due(&d.operator).await.unwrap();
        d.racing.network.pump(&next, &d.transport).await;
    }
    let received = d.racing.network.received(&number(1)).await;
    assert!(received[&1].contains_key(&id), "device 1 has it");
    let told = d.webhook.business.statuses();
    assert_eq!(
        received.get(&2).and_then(|r| r.get(&id)),
        Some(&1),
        "device 2 never got the message; the business was told {:?}",
        told.get(&id)
    );
    assert_eq!(
        told.get(&id).map(Vec::as_slice),
        Some(&[(Status::Delivered, None)][..]),
        "the business is told once"
    );
}

// ---- retry receipts -------------------------------------------------------

/// A device that cannot decrypt a message (device 1: its session lost)
/// sends a retry receipt after the recipient's other device (device 0)
/// reported the message delivered (a report speaks for one device):
/// device 1 gets a new session, and the message once more over it. (The
/// message, delivered, was not sent again: device 1 never got it.)
#[tokio::test]
async fn a_retry_receipt_after_another_devices_report_gets_the_device_the_message() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::GarbleDevice1);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    let sent = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!((sent.status, sent.pending_devices), (Status::Sent, 0));
    // Device 0 has it: its report is taken first.
    assert_eq!(
        d.processor
            .status_update(&d.transport, b, id, Status::Delivered)
            .await
            .unwrap(),
        custodian::processor::StatusChange::Applied
    );
    // Device 1 cannot decrypt what it was handed, and asks again.
    let pumped = d.racing.network.pump(&d.processor, &d.transport).await;
    assert_eq!(pumped.retry_receipts, 1, "{pumped:?}");
    d.settle(20).await;
    let received = d.racing.network.received(&number(1)).await;
    assert!(received[&0].contains_key(&id), "device 0 has it");
    assert!(
        received.get(&1).is_some_and(|r| r.contains_key(&id)),
        "device 1 asked for the message again (retry receipt) and never got it: {received:?}, \
         stored {:?}",
        d.store.message(b, id).await.unwrap().unwrap().delivery
    );
}

/// Two copies of one retry receipt handed in at once (a network that
/// duplicates, delivering both concurrently) cost the device one bundle
/// (one of its one-time prekeys). (Both passed the copy check while the
/// first waited on the network for the bundle: two bundles, and the
/// session replaced twice.)
#[tokio::test]
async fn two_copies_of_a_retry_receipt_at_once_fetch_one_bundle() {
    let (d, b) = Deployment::ready(1).await;
    let id = d.send(b, 1).await;
    let sent = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(sent.status, Status::Sent);
    let (fetched, first, copy) = d.receipts_at_once(b, [id, id]).await;
    assert_eq!(
        fetched, 1,
        "two copies of one receipt fetched {fetched} bundles ({first:?}, {copy:?})"
    );
}

/// Two messages sent at once to a consumer the business has never written
/// to cost its device one bundle (one of its one-time prekeys), and both
/// reach it: the second goes at its next attempt, over the session the
/// first started. (Both sends found no session while the first waited on
/// the network for the bundle: two bundles, and the session started twice.)
#[tokio::test]
async fn two_first_sends_at_once_fetch_one_bundle() {
    use std::sync::atomic::Ordering;
    let (d, b) = Deployment::ready(1).await;
    d.race(Race::YieldInBundle);
    let (first, second) = tokio::join!(d.send(b, 1), d.send(b, 1));
    d.race(Race::None);
    let fetched = d.racing.bundles.load(Ordering::SeqCst);
    assert_eq!(fetched, 1, "two first sends fetched {fetched} bundles");
    d.settle(2).await;
    let received = d.racing.network.received(&number(1)).await;
    for id in [first, second] {
        assert!(received[&0].contains_key(&id), "{received:?}");
    }
}

/// Three messages sent on a session the device lost bring three retry
/// receipts: the first starts a new session from one bundle, and the other
/// two go over it, fetching none (each bundle costs the device a one-time
/// prekey, and would replace the session again). Every message reaches
/// the device. (Each receipt fetched a bundle and replaced the session.)
#[tokio::test]
async fn receipts_for_messages_sent_on_one_lost_session_fetch_one_bundle() {
    use std::sync::atomic::Ordering;
    let (d, b) = Deployment::ready(1).await;
    let ids = [d.send(b, 1).await, d.send(b, 1).await, d.send(b, 1).await];
    d.race(Race::YieldInBundle);
    for id in ids {
        d.receipt_applied(b, id, 0).await;
    }
    d.race(Race::None);
    assert_eq!(
        d.racing.bundles.load(Ordering::SeqCst),
        1,
        "bundles fetched"
    );
    d.settle(3).await;
    let received = d.racing.network.received(&number(1)).await;
    for id in ids {
        assert!(received[&0].contains_key(&id), "{received:?}");
    }
}

/// Device 1 cannot decrypt what it was sent (its session lost), and its
/// retry receipt reaches the processor while the send's attempt is still
/// under way (before its bookkeeping): it is refused for now
/// (`AttemptUnderWay`), and acted on when the network hands it in again.
/// Device 0's report then comes first; device 1 still gets the message.
/// (The receipt was acted on during the attempt, whose record, made over
/// it, wiped the device's due write; the network's copy of the receipt
/// was then ignored as a copy, and device 1 never got the message.)
#[tokio::test]
async fn a_retry_receipt_during_the_attempt_is_acted_on_after_it() {
    let (d, b) = Deployment::ready(2).await;
    d.race(Race::GarbleDevice1ThenReceipt);
    let id = d.send(b, 1).await;
    d.race(Race::None);
    // The network hands the receipt in again.
    d.receipt_applied(b, id, 1).await;
    let stored = d.store.message(b, id).await.unwrap().unwrap().delivery;
    // Device 0 has it: its report is taken (within the receipt timeout).
    d.processor
        .status_update(&d.transport, b, id, Status::Delivered)
        .await
        .unwrap();
    d.settle(20).await;
    let received = d.racing.network.received(&number(1)).await;
    assert!(received[&0].contains_key(&id), "device 0 has it");
    assert!(
        received.get(&1).is_some_and(|r| r.contains_key(&id)),
        "device 1's retry receipt was acted on during the attempt, yet device 1 never got the \
         message: {received:?}; after the attempt's record the message stood at {stored:?} \
         (device 1 not pending, next attempt at the receipt timeout)"
    );
}

/// A retry receipt from device 64 for a message another device reported
/// delivered gets device 64 alone the message, though every device from
/// 63 up shares one pending bit. Before, the resend asked for the devices
/// of that bit: device 63, which had the message and never asked, was sent
/// it again after the delivery report.
#[tokio::test]
async fn a_retry_receipt_of_a_high_device_gets_that_device_alone_the_message() {
    let (d, b) = Deployment::with_65_devices(Race::HighDevices).await;
    let id = d.send(b, 1).await;
    let sent = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!((sent.status, sent.pending_devices), (Status::Sent, 0));
    let pumped = d.racing.network.pump(&d.processor, &d.transport).await;
    d.processor
        .status_update(&d.transport, b, id, Status::Delivered)
        .await
        .unwrap();
    let after_report = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(after_report.status, Status::Delivered, "{pumped:?}");
    let before = d.racing.network.received(&number(1)).await;
    assert_eq!(before[&63].get(&id), Some(&1));
    // Device 64 lost its session and asks for the message again.
    d.processor
        .retry_receipt(&d.transport, b, id, 64)
        .await
        .unwrap();
    d.racing.network.pump(&d.processor, &d.transport).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(
        received[&63].get(&id),
        Some(&1),
        "device 63 was sent the message again after its delivery report, answering device 64's \
         retry receipt: {:?}",
        received.get(&63)
    );
}

/// Two messages sent on a session the device lost bring two retry
/// receipts, handed in at once: one bundle is fetched between them (the
/// other receipt is refused for now, and goes over the new session when
/// handed in again). Before, nothing was held per device until the new
/// session was committed: both fetched a bundle (two of the device's
/// one-time prekeys), and the second replaced the session the first had
/// just started.
#[tokio::test]
async fn receipts_for_two_messages_at_once_fetch_one_bundle() {
    let (d, b) = Deployment::ready(1).await;
    let (one, two) = (d.send(b, 1).await, d.send(b, 1).await);
    let (fetched, first, second) = d.receipts_at_once(b, [one, two]).await;
    assert_eq!(
        fetched, 1,
        "two receipts for messages of one lost session, at once, fetched {fetched} bundles \
         ({first:?}, {second:?})"
    );
}

/// A message reported delivered by device 0 while device 1 waits for a
/// retry: device 1's retry receipt gets it the message at once, and clears
/// its retry, so no device is sent the message again. Before, the receipt's
/// copy recorded nothing: device 1 stayed pending, and the retransmission
/// loop sent it the message once more, answering no receipt.
#[tokio::test]
async fn a_receipt_answered_on_a_delivered_message_clears_its_devices_retry() {
    let d = Deployment::new(Faults::none());
    let b = business(1);
    let id = d.delivered_with_device_1_waiting(b).await;
    d.racing.network.pump(&d.processor, &d.transport).await;
    d.receipt_applied(b, id, 1).await;
    let after_receipt = d.store.message(b, id).await.unwrap().unwrap().delivery;
    d.settle(5).await;
    let received = d.racing.network.received(&number(1)).await;
    assert_eq!(
        received.get(&1).and_then(|r| r.get(&id)),
        Some(&1),
        "device 1 was sent the message again after its retry receipt was answered (the message \
         delivered); after the receipt it stood at {after_receipt:?}"
    );
}

/// A retry receipt for a delivered message, made after the device's
/// session went (its identity approved anew), gets the device the message:
/// the receipt lets go of the device's start guard once its session is
/// written, and the copy starts the session it needs. Before, the receipt
/// held the guard through its copy, which asked for the same guard, so
/// every copy the network handed in was refused, for the message's life.
#[tokio::test]
async fn a_receipt_after_the_devices_session_went_gets_it_the_message() {
    let (d, b) = Deployment::ready(2).await;
    let one = d.send(b, 1).await;
    let two = d.send(b, 1).await;
    d.racing.network.pump(&d.processor, &d.transport).await;
    for id in [one, two] {
        let m = d.store.message(b, id).await.unwrap().unwrap().delivery;
        if m.status.is_open() {
            d.processor
                .status_update(&d.transport, b, id, Status::Delivered)
                .await
                .unwrap();
        }
        let m = d.store.message(b, id).await.unwrap().unwrap().delivery;
        assert_eq!(m.status, Status::Delivered, "{m:?}");
    }
    let copies =
        |r: &std::collections::BTreeMap<u32, std::collections::BTreeMap<MessageId, u32>>,
         id: MessageId| { r.get(&1).and_then(|m| m.get(&id)).copied().unwrap_or(0) };
    // Device 1 asks for `one` again: a new session from a bundle.
    d.receipt_applied(b, one, 1).await;
    // The consumer reinstalls, and the business approves device 1's new
    // identity: its session goes.
    d.racing.network.add_consumer(&number(1), 2).await;
    let key = d.racing.network.identity(&number(1), 1).await.unwrap();
    d.processor
        .trust_new_identity(&d.owner, b, &number(1), 1, key)
        .await
        .unwrap();
    d.racing.network.pump(&d.processor, &d.transport).await;
    let before = copies(&d.racing.network.received(&number(1)).await, two);
    // Device 1 asks for `two` too; the network hands the receipt in again
    // while it is refused.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let answer = d.processor.retry_receipt(&d.transport, b, two, 1).await;
        let ok = answer.is_ok();
        answers.push(format!("{answer:?}"));
        if ok {
            break;
        }
        d.clock.advance(Duration::from_secs(60));
    }
    d.racing.network.pump(&d.processor, &d.transport).await;
    let after = copies(&d.racing.network.received(&number(1)).await, two);
    assert!(
        after > before,
        "answers {answers:?}; device 1's copies of the message before {before}, after {after}"
    );
}

/// A retry receipt of device 64, answered on a delivered message, leaves
/// the retry pending for device 63, which shares its bit (every device
/// from 63 up does): device 63 still gets the message. An answer clears a
/// device's retry only where the bit is the device's alone.
#[tokio::test]
async fn an_answered_receipt_of_a_high_device_leaves_the_shared_retry_pending() {
    let (d, b) = Deployment::with_65_devices(Race::HighDevices63FailsOnce).await;
    let id = d.send(b, 1).await;
    d.processor
        .status_update(&d.transport, b, id, Status::Delivered)
        .await
        .unwrap();
    let waiting = d.store.message(b, id).await.unwrap().unwrap().delivery;
    let shared = Delivery::device_bit(63);
    assert_eq!(
        (waiting.status, waiting.pending_devices),
        (Status::Delivered, shared)
    );
    d.processor
        .retry_receipt(&d.transport, b, id, 64)
        .await
        .unwrap();
    let after = d.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!(after.pending_devices, shared, "{after:?}");
    d.settle(2).await;
    let received = d.racing.network.received(&number(1)).await;
    assert!(received[&63].contains_key(&id), "{:?}", received.get(&63));
}
