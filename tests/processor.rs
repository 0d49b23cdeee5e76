//! The processor end to end, through the simulated network with faults on.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::{BillingStatement, Category, IntegrityReport, StatisticsConfig};
use custodian::keys::{LocalKeyProvider, SecretKey};
use custodian::processor::{
    DeliveryConfig, Host, MAX_CONTENT_LEN, MAX_IDEMPOTENCY_KEY_LEN, Outbound, Policies, Processor,
    ProcessorError, StatusChange,
};
use custodian::retention::HoldError;
use custodian::signal::{Ciphertext, IdentityPolicy, PreKeyBundle, PublishedKeys, SignalConfig};
use custodian::store::{FailureReason, HoldScope, MemoryStore, PeerId, Status, Storage};
use custodian::testing::{ConsumerDevice, Faults, Leg, SimBusiness, SimNetwork};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::transport::{
    BusinessSink, InboundMessage, Outgoing, Principal, SinkError, StaticAuthorizer, StatusUpdate,
    Transport, TransportError,
};
use custodian::visibility::{
    AuditError, AuditSink, Change, DataClass, Decision, HoldAction, HoldEvent, MemoryAuditSink,
    Party, Revision, Verdict, VisibilityPolicy,
};

const T0: u64 = 1_767_225_600_000;

struct Deployment {
    clock: ManualClock,
    store: Arc<dyn Storage>,
    network: Arc<SimNetwork>,
    business: Arc<SimBusiness>,
    audit: Arc<MemoryAuditSink>,
    processor: Processor,
    transport: Principal,
    operator: Principal,
    owners: BTreeMap<BusinessId, Principal>,
}

impl Deployment {
    fn new(businesses: &[u64], network_faults: Faults, sink_faults: Faults, seed: u64) -> Self {
        let store = Arc::new(MemoryStore::new());
        Self::on(store, businesses, network_faults, sink_faults, seed)
    }

    /// A deployment over `store`.
    fn on(
        store: Arc<dyn Storage>,
        businesses: &[u64],
        network_faults: Faults,
        sink_faults: Faults,
        seed: u64,
    ) -> Self {
        let identity = IdentityPolicy::default();
        Self::on_with(
            store,
            businesses,
            network_faults,
            sink_faults,
            seed,
            identity,
        )
    }

    /// A deployment over `store`, taking changed identity keys by `identity`.
    fn on_with(
        store: Arc<dyn Storage>,
        businesses: &[u64],
        network_faults: Faults,
        sink_faults: Faults,
        seed: u64,
        identity: IdentityPolicy,
    ) -> Self {
        let sink = |business: Arc<SimBusiness>| -> Arc<dyn BusinessSink> { business };
        Self::on_with_sink(
            store,
            businesses,
            network_faults,
            sink_faults,
            seed,
            identity,
            sink,
        )
    }

    /// [`on_with`](Self::on_with), the endpoint the processor hands to made
    /// by `sink` from the simulated business.
    fn on_with_sink(
        store: Arc<dyn Storage>,
        businesses: &[u64],
        network_faults: Faults,
        sink_faults: Faults,
        seed: u64,
        identity: IdentityPolicy,
        sink: impl FnOnce(Arc<SimBusiness>) -> Arc<dyn BusinessSink>,
    ) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let network = Arc::new(SimNetwork::new(clock.clone(), network_faults, seed).unwrap());
        let business = SimBusiness::new(clock.clone(), sink_faults, seed + 1).unwrap();
        let audit = Arc::new(MemoryAuditSink::new());
        let transport = Principal::new("transport");
        let operator = Principal::new("operator");
        let mut authorizer = StaticAuthorizer::new().operator(&operator);
        let mut owners = BTreeMap::new();
        for &b in businesses {
            let b = BusinessId::new(b).unwrap();
            let owner = Principal::new(&format!("owner-of-{b}"));
            authorizer = authorizer.grant(&owner, b).carrier(&transport, b);
            owners.insert(b, owner);
        }
        let host = Host {
            storage: store.clone(),
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: network.clone(),
            business: sink(business.clone()),
            authorizer: Arc::new(authorizer),
            clock: Arc::new(clock.clone()),
            audit: audit.clone(),
        };
        let policies = Policies {
            delivery: DeliveryConfig {
                retry_base: Duration::from_secs(2),
                retry_max: Duration::from_secs(60),
                receipt_timeout: Duration::from_secs(120),
                batch: 10_000,
            },
            signal: SignalConfig {
                identity_policy: identity,
                ..SignalConfig::default()
            },
            ..Policies::default()
        };
        let processor = Processor::new(host, policies).unwrap();
        Self {
            clock,
            store,
            network,
            business,
            audit,
            processor,
            transport,
            operator,
            owners,
        }
    }

    /// Business 7, in memory, under `IdentityPolicy::Refuse`.
    fn refusing_new_identities() -> Self {
        let store = Arc::new(MemoryStore::new());
        let refuse = IdentityPolicy::Refuse;
        Self::on_with(store, &[7], Faults::none(), Faults::none(), 9, refuse)
    }

    /// `b` approves the identity key `to`'s `device` has on the network
    /// (its owner confirmed it), which changes the device's record.
    async fn approve_network_key(&self, b: BusinessId, to: &PhoneNumber, device: u32) {
        let key = self.network.identity(to, device).await.unwrap();
        let approved = self
            .processor
            .trust_new_identity(self.owner(b), b, to, device, key);
        assert!(approved.await.unwrap());
    }

    fn owner(&self, b: BusinessId) -> &Principal {
        &self.owners[&b]
    }

    /// `to`, with one device, has `b`'s welcome, delivered.
    async fn welcomed(&self, b: BusinessId, to: &PhoneNumber) {
        self.network.add_consumer(to, 1).await;
        let welcome = self.send(b, to.clone(), b"welcome").await;
        self.run(Duration::from_secs(300), Duration::from_secs(60))
            .await;
        let status = self.processor.message_status(self.owner(b), b, welcome);
        assert_eq!(status.await.unwrap(), (Status::Delivered, None));
    }

    /// [`welcomed`](Self::welcomed), and `to` answers: the business's
    /// session is acknowledged, its next messages no longer carry what
    /// would start the session again.
    async fn in_conversation(&self, b: BusinessId, to: &PhoneNumber) {
        self.welcomed(b, to).await;
        self.network
            .consumer_sends(to, 0, b, b"thanks")
            .await
            .unwrap();
        self.run(Duration::from_secs(120), Duration::from_secs(60))
            .await;
    }

    /// Business 7 and consumer 1 [in conversation](Self::in_conversation),
    /// the consumer's devices lose their sessions, and the business sends
    /// it a message: the business, and the message's id.
    async fn sent_on_lost_sessions(&self) -> (BusinessId, MessageId) {
        let b = BusinessId::new(7).unwrap();
        self.publish_all().await;
        self.in_conversation(b, &number(1)).await;
        self.network.lose_sessions(&number(1)).await;
        (b, self.send(b, number(1), b"your order shipped").await)
    }

    /// Consumer 1's device 0 has `b`'s message `id`, and `b` reads it as
    /// delivered.
    async fn assert_delivered(&self, b: BusinessId, id: MessageId) {
        assert!(self.network.received(&number(1)).await[&0].contains_key(&id));
        let status = self.processor.message_status(self.owner(b), b, id).await;
        assert_eq!(status.unwrap(), (Status::Delivered, None));
    }

    /// `b` sends `content` to `to` (a service message); its id.
    async fn send(&self, b: BusinessId, to: PhoneNumber, content: &[u8]) -> MessageId {
        let message = Outbound {
            to,
            content: content.to_vec().into(),
            category: Category::Service,
        };
        self.processor
            .send(self.owner(b), b, message)
            .await
            .unwrap()
    }

    /// Every business publishes its keys, again while the network refuses
    /// or loses them, as a host would.
    async fn publish_all(&self) {
        for (&b, owner) in &self.owners {
            let mut tries = 0;
            while let Err(e) = self.processor.publish_keys(owner, b).await {
                tries += 1;
                assert!(tries < 100, "the network never took the keys: {e}");
            }
        }
    }

    /// Run the world for `span`, in steps of `step`: pump the network, retry what is due.
    async fn run(&self, span: Duration, step: Duration) {
        let mut elapsed = Duration::ZERO;
        while elapsed < span {
            self.network.pump(&self.processor, &self.transport).await;
            self.processor.retransmit_due(&self.operator).await.unwrap();
            self.clock.advance(step);
            elapsed += step;
        }
    }
}

fn number(i: usize) -> PhoneNumber {
    format!("+4477009{i:05}").parse().unwrap()
}

#[tokio::test]
async fn every_message_arrives_exactly_once_or_fails_with_a_reason_despite_faults() {
    let start = Timestamp::from_millis(T0);
    let network_faults = Faults::moderate().with_outage(
        start.saturating_add(Duration::from_secs(300)),
        Duration::from_secs(600),
    );
    // The business endpoint loses requests and replies, duplicates,
    // refuses, and is down for a quarter of an hour. (Not delays: what it
    // shows must keep the order the processor sent statuses in, which the
    // test checks never goes backwards.)
    let sink_faults = Faults {
        fail: 0.1,
        drop: 0.1,
        duplicate: 0.1,
        delay: 0.0,
        ..Faults::moderate()
    }
    .with_outage(
        start.saturating_add(Duration::from_secs(900)),
        Duration::from_secs(900),
    );
    let d = Deployment::new(&[101, 202], network_faults, sink_faults, 42);
    let businesses: Vec<BusinessId> = d.owners.keys().copied().collect();
    let consumers = 24;
    for i in 0..consumers {
        d.network.add_consumer(&number(i), 1 + (i % 3) as u32).await;
    }
    // A number nobody has: its messages must fail with a reason.
    let nobody = number(999);
    d.publish_all().await;

    let mut sent_by_consumers: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut sent_by_businesses: Vec<(BusinessId, MessageId, PhoneNumber, Vec<u8>)> = Vec::new();
    for round in 0..3 {
        for i in 0..consumers {
            let b = businesses[(i + round) % 2];
            let device = (i + round) as u32 % (1 + (i % 3) as u32);
            let text = format!("consumer {i} round {round} to {b}").into_bytes();
            d.network
                .consumer_sends(&number(i), device, b, &text)
                .await
                .unwrap();
            sent_by_consumers.insert(text);
        }
        for i in (0..consumers).step_by(2) {
            let b = businesses[i % 2];
            let text = format!("business {b} to consumer {i} round {round}").into_bytes();
            let outbound = Outbound {
                to: number(i),
                content: text.clone().into(),
                category: Category::Utility,
            };
            let id = d.processor.send(d.owner(b), b, outbound).await.unwrap();
            sent_by_businesses.push((b, id, number(i), text));
        }
        d.run(Duration::from_secs(120), Duration::from_secs(10))
            .await;
    }
    let to_nobody = d
        .processor
        .send(
            d.owner(businesses[0]),
            businesses[0],
            Outbound {
                to: nobody.clone(),
                content: b"hello?".to_vec().into(),
                category: Category::Marketing,
            },
        )
        .await
        .unwrap();
    // Long enough for every outage to end and every retry to land: three
    // hours a step of 30 s, then two days 10 minutes a step, since a
    // message whose reports keep getting lost is sent again ever later
    // (about 5 sends in the first three hours, each losing a device's copy
    // or report one time in ten; with at least 12 by the end, a message
    // losing every one is out of reach, about 5e-11 a run).
    d.run(Duration::from_secs(3 * 3600), Duration::from_secs(30))
        .await;
    d.run(Duration::from_secs(2 * 86_400), Duration::from_secs(600))
        .await;

    // Every consumer message reached the business, and the processor handed
    // each over exactly once: other copies the business saw are the fault
    // injector's (duplicates, replies lost on the way back).
    let handed: BTreeSet<Vec<u8>> = d
        .business
        .contents()
        .into_iter()
        .map(|(_, _, c)| c)
        .collect();
    let missing: Vec<String> = sent_by_consumers
        .difference(&handed)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "never reached the business: {missing:?}"
    );
    assert_eq!(handed, sent_by_consumers);
    assert_eq!(
        d.business.contents().len(),
        sent_by_consumers.len(),
        "a consumer message was handed over under two ids"
    );
    let copies = d.business.copies();
    let once = |c: &custodian::testing::Copies| c.handed == 1 && c.after_taken == 0;
    assert!(
        copies.values().all(once),
        "handed over more than once: {:?}",
        copies.iter().filter(|(_, c)| !once(c)).collect::<Vec<_>>()
    );
    assert!(
        copies.values().any(|c| c.injected + c.reply_lost > 0),
        "the business faults never struck: the check above proves nothing"
    );

    // Every business message reached every device of its recipient, with
    // its content, and was reported delivered. Copies beyond the first
    // are retransmissions made before the delivery report came back (the
    // devices drop them by id): none was sent after it.
    let statuses = d.business.statuses();
    for (b, id, to, text) in &sent_by_businesses {
        let received = d.network.received(to).await;
        for device in d.network.devices_of(to).await {
            assert!(
                received.get(&device).is_some_and(|r| r.contains_key(id)),
                "{id} never reached device {device}"
            );
            let contents = d.network.contents(to, device).await;
            let first: Vec<_> = contents.iter().filter(|(_, m, _)| m == id).collect();
            assert_eq!(first.len(), 1);
            assert_eq!(&first[0].2, text);
            assert_eq!(first[0].0, *b);
        }
        let seen = &statuses[id];
        assert!(
            seen.iter().any(|(s, _)| *s == Status::Delivered),
            "{id}: {seen:?}"
        );
        let (status, _) = d
            .processor
            .message_status(d.owner(*b), *b, *id)
            .await
            .unwrap();
        assert!(status >= Status::Delivered);
    }
    assert_eq!(d.network.resent_after_delivery().await, 0);
    // The message to nobody failed, with its reason.
    assert_eq!(
        statuses[&to_nobody].last(),
        Some(&(
            Status::Failed,
            Some(custodian::store::FailureReason::NoDevices)
        ))
    );
    // Statuses never went backwards.
    for (id, seen) in &statuses {
        let ranks: Vec<Status> = seen
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s != Status::Failed)
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{id}: {seen:?}");
    }

    // The audit trail holds no release the policy forbids, and every copy
    // of a message the business was handed came through a release of its
    // content and one of its sender's number: one decision per handover.
    let policy = VisibilityPolicy::default();
    let events = d.audit.events();
    assert!(events.len() > 100);
    for e in &events {
        if e.verdict == Verdict::Allow {
            assert!(policy.allows(e.party, e.class, e.purpose), "{e:?}");
            assert!(
                !(e.class == DataClass::MessageContent
                    && matches!(e.party, Party::Transport | Party::RestOfCompany))
            );
        }
    }
    let released_to_business = |class: DataClass| {
        events
            .iter()
            .filter(|e| {
                e.verdict == Verdict::Allow && e.party == Party::Business && e.class == class
            })
            .count()
    };
    let handovers: usize = d
        .business
        .fault_stats()
        .get(&custodian::testing::Leg::Deliver)
        .map_or(0, |s| s.events as usize);
    assert_eq!(released_to_business(DataClass::MessageContent), handovers);
    assert_eq!(
        released_to_business(DataClass::ConsumerPhoneNumber),
        handovers
    );

    // Past retention: nothing readable, no phone number, no Signal state.
    d.clock.advance(Duration::from_secs(31 * 24 * 3600));
    let report = d.processor.sweep(&d.operator).await.unwrap();
    assert!(report.complete && report.messages_deleted > 0 && report.peers_deleted > 0);
    let census = d.processor.census(&d.operator).await.unwrap();
    assert_eq!((census.messages, census.peers, census.phones), (0, 0, 0));
    for (b, id, _, _) in &sent_by_businesses {
        assert!(matches!(
            d.processor.message_status(d.owner(*b), *b, *id).await,
            Err(ProcessorError::NotFound)
        ));
    }
}

#[tokio::test]
async fn statuses_never_go_backwards_and_duplicates_are_ignored() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 1);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 1).await;
    let id = d.send(b, number(1), b"x").await;
    // The network reports statuses; the business reads them.
    let p = &d.transport;
    assert_eq!(
        d.processor
            .status_update(p, b, id, Status::Read)
            .await
            .unwrap(),
        StatusChange::Applied
    );
    assert_eq!(
        d.processor
            .status_update(p, b, id, Status::Delivered)
            .await
            .unwrap(),
        StatusChange::Ignored
    );
    assert_eq!(
        d.processor
            .status_update(p, b, id, Status::Read)
            .await
            .unwrap(),
        StatusChange::Ignored
    );
    assert!(matches!(
        d.processor.status_update(p, b, id, Status::Failed).await,
        Err(ProcessorError::Invalid(_))
    ));
    assert_eq!(
        d.processor
            .message_status(d.owner(b), b, id)
            .await
            .unwrap()
            .0,
        Status::Read
    );
    let seen: Vec<Status> = d.business.statuses()[&id].iter().map(|(s, _)| *s).collect();
    assert_eq!(seen, [Status::Sent, Status::Read]);
}

#[tokio::test]
async fn a_redelivered_inbound_message_reaches_the_business_once() {
    let faults = Faults {
        duplicate: 1.0,
        ..Faults::none()
    };
    let d = Deployment::new(&[7], faults, Faults::none(), 3);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 1).await;
    d.publish_all().await;
    for i in 0..5 {
        d.network
            .consumer_sends(&number(1), 0, b, format!("m{i}").as_bytes())
            .await
            .unwrap();
    }
    let report = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(report.to_processor, 10, "every message arrived twice");
    assert_eq!(report.acknowledged, 10, "duplicates are acknowledged too");
    let messages = d.business.messages();
    assert_eq!(messages.len(), 5);
    assert!(messages.values().all(|&copies| copies == 1));
}

/// A receive creates no key, whatever it is given: a business's keys come
/// with its first `publish_keys`, before which no consumer could have
/// written to it. Malformed bytes, and a well-formed first message written
/// to another business's bundle, are refused, and leave the business
/// without a key ring (so without any key) or session.
#[tokio::test]
async fn a_receive_creates_no_key() {
    use custodian::keys::KeyId;
    use custodian::signal::{Ciphertext, MessageKind, SignalError};
    use custodian::store::KeyStore;
    let w = Restartable::new();
    let processor = w.start();

    let elsewhere = Restartable::new();
    elsewhere
        .start()
        .publish_keys(&elsewhere.owner, elsewhere.b)
        .await
        .unwrap();
    let mut device = custodian::testing::ConsumerDevice::new(0);
    let bundle = elsewhere.network.published().unwrap().bundle(Some(0));
    device.start_session(elsewhere.b, &bundle).await.unwrap();
    let first = device.encrypt(elsewhere.b, b"hello").await.unwrap();
    assert_eq!(first.kind, MessageKind::FirstContact);
    let garbage = |kind| Ciphertext {
        kind,
        bytes: vec![0x33; 40],
    };
    for message in [
        first,
        garbage(MessageKind::FirstContact),
        garbage(MessageKind::FollowUp),
    ] {
        let refused = processor
            .receive(&w.owner, w.b, Restartable::inbound(message))
            .await;
        assert!(
            matches!(
                refused,
                Err(ProcessorError::Signal(SignalError::InvalidMessage(_)))
            ),
            "{refused:?}"
        );
    }
    assert!(w.store.ring(w.b).await.unwrap().is_none());
    assert_eq!(w.store.census().await.unwrap().peers, 0);

    // Once it published, it has the index key, and messages reach it.
    drop(processor);
    let (_processor, _device) = w.converse().await;
    assert_eq!(w.business.messages().len(), 1);
    let phone_key = KeyId::phone_index(w.b);
    assert!(w.store.key(&phone_key).await.unwrap().is_some());
}

#[tokio::test]
async fn expired_undelivered_messages_are_reported_failed() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 5);
    let b = BusinessId::new(7).unwrap();
    // The consumer exists but the network is down for the whole retention.
    d.network.add_consumer(&number(1), 1).await;
    let down = Faults::none().with_outage(
        Timestamp::from_millis(T0),
        Duration::from_secs(40 * 24 * 3600),
    );
    let d2 = Deployment::new(&[7], down, Faults::none(), 6);
    d2.network.add_consumer(&number(1), 1).await;
    let id = d2.send(b, number(1), b"never").await;
    d2.run(Duration::from_secs(600), Duration::from_secs(60))
        .await;
    assert_eq!(
        d2.processor
            .message_status(d2.owner(b), b, id)
            .await
            .unwrap()
            .0,
        Status::Queued
    );
    d2.clock.advance(Duration::from_secs(30 * 24 * 3600));
    let report = d2.processor.sweep(&d2.operator).await.unwrap();
    assert_eq!(report.failed_expired, 1);
    assert_eq!(
        d2.business.statuses()[&id].last(),
        Some(&(
            Status::Failed,
            Some(custodian::store::FailureReason::Expired)
        ))
    );
    assert_eq!(d2.processor.census(&d2.operator).await.unwrap().messages, 0);
    drop(d);
}

/// The integrity monitor forgets a consumer when its business's retention
/// does: two days after its message to a consumer, a business keeping
/// messages for a day has the consumer forgotten by the sweep, in the store
/// and in the monitor, so its next message to it is to a new recipient.
/// Before, the monitor kept the consumer (8 bytes of its phone hash) for
/// the 30-day ceiling, and counted it as returning.
#[tokio::test]
async fn the_integrity_monitor_forgets_a_consumer_with_its_business_retention() {
    use custodian::retention::{BusinessRetention, Periods, RetentionPolicy};

    const DAY: Duration = Duration::from_secs(24 * 3600);
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 7);
    let b = BusinessId::new(7).unwrap();
    let one_day = BusinessRetention {
        periods: Periods::both(DAY),
        region: None,
    };
    let retention = RetentionPolicy::default().with_business(b, one_day);
    d.processor
        .set_retention_policy(&d.operator, retention.unwrap())
        .unwrap();
    d.publish_all().await;
    d.welcomed(b, &number(1)).await;
    // Two days on, past the business's retention: the sweep forgets the
    // consumer.
    d.clock.advance(2 * DAY);
    d.processor.sweep(&d.operator).await.unwrap();
    let census = d.store.census().await.unwrap();
    assert_eq!((census.messages, census.phones, census.peers), (0, 0, 0));

    d.send(b, number(1), b"day three").await;
    d.processor.export_integrity(&d.operator).await.unwrap();
    let report = d.network.integrity_reports().await.pop().unwrap();
    assert_eq!(
        (report.current.sent, report.current.new_recipients),
        (1, 1),
        "{:?}",
        report.current
    );
}

/// An audit trail that runs `hook` once, on a thread of its own, after
/// recording the first release for analytics: the work of another task
/// while `Processor::statistics` is between its releases.
struct Meanwhile {
    kept: MemoryAuditSink,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl AuditSink for Meanwhile {
    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        self.kept.record(decision)?;
        if decision.purpose == custodian::visibility::Purpose::Analytics {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                std::thread::spawn(hook).join().unwrap();
            }
        }
        Ok(())
    }
    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        self.kept.record_hold(event)
    }
    fn record_change(&self, event: &Change) -> Result<(), AuditError> {
        self.kept.record_change(event)
    }
}

/// The default policies, with statistics buckets released from two
/// consumers.
fn statistics_of_two() -> Policies {
    let mut statistics = StatisticsConfig::default();
    statistics.k = 2;
    Policies {
        statistics,
        ..Policies::default()
    }
}

/// `Processor::statistics` removes only the reports it released: a
/// business first counted while it releases the others' (with a message in
/// a period already closed) keeps its report for the next call. Before,
/// the call removed every closed period it then found, that business's
/// included, unreleased.
#[tokio::test]
async fn statistics_removes_only_the_reports_it_released() {
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let network = Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap());
    let (b7, b8) = (BusinessId::new(7).unwrap(), BusinessId::new(8).unwrap());
    let (owner, operator) = (Principal::new("owner"), Principal::new("operator"));
    let cell: Arc<OnceLock<Weak<Processor>>> = Arc::default();
    let message = |to: usize| Outbound {
        to: number(to),
        content: b"hello".to_vec().into(),
        category: Category::Service,
    };
    // Business 8's first messages (to two consumers: k is 2), sent back
    // on the first day.
    let hook = {
        let (cell, clock, owner) = (cell.clone(), clock.clone(), owner.clone());
        move || {
            let processor = cell.get().and_then(Weak::upgrade).unwrap();
            let now = clock.now();
            clock.set(Timestamp::from_millis(T0));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for to in [3, 4] {
                runtime
                    .block_on(processor.send(&owner, b8, message(to)))
                    .unwrap();
            }
            clock.set(now);
        }
    };
    let audit = Arc::new(Meanwhile {
        kept: MemoryAuditSink::new(),
        hook: Mutex::new(Some(Box::new(hook))),
    });
    let host = Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: network.clone(),
        business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
        authorizer: Arc::new(
            StaticAuthorizer::new()
                .grant(&owner, b7)
                .grant(&owner, b8)
                .operator(&operator),
        ),
        clock: Arc::new(clock.clone()),
        audit,
    };
    let processor = Arc::new(Processor::new(host, statistics_of_two()).unwrap());
    cell.set(Arc::downgrade(&processor)).unwrap();
    for to in 1..=4 {
        network.add_consumer(&number(to), 1).await;
    }
    for to in [1, 2] {
        processor.send(&owner, b7, message(to)).await.unwrap();
    }
    clock.advance(Duration::from_secs(25 * 3600));

    let businesses = |reports: Vec<custodian::integrity::StatisticsReport>| -> Vec<BusinessId> {
        reports.iter().map(|r| r.business).collect()
    };
    let first = processor.statistics(&operator).await.unwrap();
    assert_eq!(businesses(first), [b7]);
    let second = processor.statistics(&operator).await.unwrap();
    assert_eq!(businesses(second), [b8], "business 8's report was dropped");
}

/// Two operators' `statistics` calls that overlap (one's release still
/// being recorded while the other runs) release each closed period once.
/// Before, both read the periods before either took them, and the day's
/// counts reached the rest of the company twice.
#[test]
fn overlapping_statistics_calls_release_each_period_once() {
    use std::sync::mpsc;

    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (entered, was_entered) = mpsc::channel();
    let (go, wait) = mpsc::channel::<()>();
    let hook = move || {
        entered.send(()).unwrap();
        wait.recv().unwrap();
    };
    let audit = Arc::new(Meanwhile {
        kept: MemoryAuditSink::new(),
        hook: Mutex::new(Some(Box::new(hook))),
    });
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let network = Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap());
    let b = BusinessId::new(7).unwrap();
    let (owner, operator) = (Principal::new("owner"), Principal::new("operator"));
    let host = Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: network.clone(),
        business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
        authorizer: Arc::new(StaticAuthorizer::new().grant(&owner, b).operator(&operator)),
        clock: Arc::new(clock.clone()),
        audit,
    };
    let processor = Arc::new(Processor::new(host, statistics_of_two()).unwrap());
    runtime().block_on(async {
        for to in [1, 2] {
            network.add_consumer(&number(to), 1).await;
            let message = Outbound {
                to: number(to),
                content: b"hello".to_vec().into(),
                category: Category::Service,
            };
            processor.send(&owner, b, message).await.unwrap();
        }
    });
    clock.advance(Duration::from_secs(25 * 3600));

    let call = || {
        let (processor, operator) = (processor.clone(), operator.clone());
        std::thread::spawn(move || runtime().block_on(processor.statistics(&operator)))
    };
    let first = call();
    was_entered.recv().unwrap();
    let second = call();
    // Time for the second to release, were it let through.
    std::thread::sleep(Duration::from_millis(200));
    go.send(()).unwrap();
    let released: Vec<_> = [first, second]
        .into_iter()
        .flat_map(|call| call.join().unwrap().unwrap())
        .map(|r| (r.business, r.period))
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
}

/// A message that expired open, first swept past its report's grace with
/// its business's endpoint down, is failed unreported and deleted in the
/// same sweep: it counts once in `failures_unreported`. Before, the
/// stage that failed it counted it, and the stage that deleted it (its
/// failure report left pending) counted it again.
#[tokio::test]
async fn a_message_failed_unreported_and_deleted_in_one_sweep_counts_once() {
    let b = BusinessId::new(7).unwrap();
    let down = || {
        let start = Timestamp::from_millis(T0);
        Faults::none().with_outage(start, Duration::from_secs(60 * 24 * 3600))
    };
    let d = Deployment::new(&[7], down(), down(), 5);
    d.network.add_consumer(&number(1), 1).await;
    let id = d.send(b, number(1), b"never").await;
    let (status, _) = d.processor.message_status(d.owner(b), b, id).await.unwrap();
    assert_eq!(status, Status::Queued);
    // No sweep ran until a day and an hour past its retention.
    d.clock.advance(Duration::from_secs(31 * 24 * 3600 + 3600));
    let report = d.processor.sweep(&d.operator).await.unwrap();
    assert!(report.complete, "{report:?}");
    assert_eq!(
        (
            report.failed_expired,
            report.messages_deleted,
            report.failures_unreported
        ),
        (1, 1, 1),
        "{report:?}"
    );
}

/// A stored message whose record cannot be opened (damaged bytes) or is
/// not its own (another message's envelope under its id) is failed as
/// unreadable and its business told; it holds up nothing behind it, and
/// nothing is sent under an id its envelope does not carry.
#[tokio::test]
async fn an_unreadable_stored_message_fails_with_a_reason_and_blocks_nothing() {
    use custodian::store::{Batch, Delivery, Direction, FailureReason, MessageRecord, Op};

    let down = Faults::none().with_outage(Timestamp::from_millis(T0), Duration::from_secs(600));
    let d = Deployment::new(&[7], down, Faults::none(), 8);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 2).await;
    let good = d.send(b, number(1), b"still goes").await;
    let stored = d.store.message(b, good).await.unwrap().unwrap();
    let bad = |byte: u8, direction, sealed: Vec<u8>| MessageRecord {
        id: MessageId::from_bytes([byte; 16]),
        direction,
        // Due before the good one, so that it comes first in every pass.
        delivery: Delivery::queued(Timestamp::from_millis(T0 - 1)),
        sealed,
        ..stored.clone()
    };
    let damaged_out = bad(0xd1, Direction::Outbound, b"not an envelope".to_vec());
    let damaged_in = bad(0xd2, Direction::Inbound, stored.sealed[..40].to_vec());
    let misplaced = bad(0xd3, Direction::Outbound, stored.sealed.clone());
    let bad_ids = [damaged_out.id, damaged_in.id, misplaced.id];
    let mut batch = Batch::new();
    for record in [damaged_out, damaged_in, misplaced] {
        batch.push(Op::PutMessage(Box::new(record)));
    }
    d.store.commit(batch).await.unwrap();

    // Every pass succeeds, through the outage and after it.
    d.run(Duration::from_secs(900), Duration::from_secs(60))
        .await;
    for id in bad_ids {
        assert_eq!(
            d.processor.message_status(d.owner(b), b, id).await.unwrap(),
            (Status::Failed, Some(FailureReason::Unreadable))
        );
        assert_eq!(
            d.business.statuses()[&id].last(),
            Some(&(Status::Failed, Some(FailureReason::Unreadable)))
        );
    }
    let received = d.network.received(&number(1)).await;
    assert_eq!(received.len(), 2, "both devices");
    for messages in received.values() {
        assert!(messages.contains_key(&good));
        assert!(bad_ids.iter().all(|id| !messages.contains_key(id)));
    }
}

/// A stored message whose row was edited to name another consumer (its
/// phone hash, by which that consumer's Signal state is found) is failed
/// as unreadable: an outbound one is not sent under the other consumer's
/// session, an inbound one is not handed to the business as theirs.
#[tokio::test]
async fn a_message_row_naming_another_consumer_is_unreadable() {
    use custodian::store::{Batch, Direction, FailureReason, Op};

    // The consumer's message arrives before the transport goes down; the
    // business is down from the start.
    let down = Duration::from_secs(600);
    let transport = Faults::none().with_outage(Timestamp::from_millis(T0 + 1_000), down);
    let sink = Faults::none().with_outage(Timestamp::from_millis(T0), down);
    let d = Deployment::new(&[7], transport, sink, 10);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.network.add_consumer(&number(1), 1).await;
    d.network.add_consumer(&number(2), 1).await;
    d.network
        .consumer_sends(&number(2), 0, b, b"from the other consumer")
        .await
        .unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    d.clock.advance(Duration::from_secs(1));
    let outbound = d.send(b, number(1), b"for consumer 1").await;
    let other = d.send(b, number(2), b"for consumer 2").await;
    let due = d
        .store
        .due_messages(Timestamp::from_millis(T0 + 3_600_000), 10)
        .await
        .unwrap();
    let inbound = due
        .iter()
        .find(|m| m.direction == Direction::Inbound)
        .unwrap()
        .clone();
    let to_one = d.store.message(b, outbound).await.unwrap().unwrap();
    let (one, two) = (to_one.phone, inbound.phone);
    assert_ne!(one, two);
    let mut batch = Batch::new();
    for (record, phone) in [(to_one, two), (inbound.clone(), one)] {
        batch.push(Op::DeleteMessage {
            business: b,
            id: record.id,
        });
        batch.push(Op::PutMessage(Box::new(custodian::store::MessageRecord {
            phone,
            ..record
        })));
    }
    d.store.commit(batch).await.unwrap();

    d.run(Duration::from_secs(900), Duration::from_secs(60))
        .await;
    for id in [outbound, inbound.id] {
        assert_eq!(
            d.processor.message_status(d.owner(b), b, id).await.unwrap(),
            (Status::Failed, Some(FailureReason::Unreadable))
        );
        assert_eq!(
            d.business.statuses()[&id].last(),
            Some(&(Status::Failed, Some(FailureReason::Unreadable)))
        );
    }
    assert!(!d.business.messages().contains_key(&inbound.id));
    for n in [1, 2] {
        for messages in d.network.received(&number(n)).await.values() {
            assert!(!messages.contains_key(&outbound));
        }
    }
    // The untouched message went out as usual.
    let received = d.network.received(&number(2)).await;
    assert!(
        received.get(&0).is_some_and(|m| m.contains_key(&other)),
        "{received:?}"
    );
}

/// A stored message whose row was edited to say it is readable longer
/// than its sealed envelope does (its expiry and creation moved later):
/// the envelope, which opens as expired, is believed. The message fails
/// as expired and its business is told, on the first pass that finds it
/// due, rather than staying queued and due for ever.
#[tokio::test]
async fn a_message_row_whose_expiry_was_edited_later_fails_as_expired() {
    use custodian::store::{Batch, FailureReason, MessageRecord, Op};

    // The network is down past the message's retention.
    let down = Faults::none().with_outage(
        Timestamp::from_millis(T0),
        Duration::from_secs(40 * 24 * 3600),
    );
    let d = Deployment::new(&[7], down, Faults::none(), 11);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 1).await;
    let id = d.send(b, number(1), b"never").await;
    d.clock.advance(Duration::from_secs(31 * 24 * 3600));
    let now = d.clock.now();
    let stored = d.store.message(b, id).await.unwrap().unwrap();
    assert_eq!(stored.delivery.status, Status::Queued);
    let mut batch = Batch::new();
    batch.push(Op::DeleteMessage { business: b, id });
    batch.push(Op::PutMessage(Box::new(MessageRecord {
        created: now,
        expiry: now.saturating_add(Duration::from_secs(24 * 3600)),
        ..stored
    })));
    d.store.commit(batch).await.unwrap();

    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(report.failures_reported, 1);
    assert_eq!(
        d.processor.message_status(d.owner(b), b, id).await.unwrap(),
        (Status::Failed, Some(FailureReason::Expired))
    );
    assert_eq!(
        d.business.statuses()[&id],
        [(Status::Failed, Some(FailureReason::Expired))]
    );
    // Nothing is due any more.
    d.clock.advance(Duration::from_secs(3600));
    let report = d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(report.due, 0);
}

/// A principal of business A tries every entry point on business B (and
/// every operator entry point): each is refused, and nothing changes.
#[tokio::test]
async fn no_principal_reaches_another_tenant() {
    let d = Deployment::new(&[1, 2], Faults::none(), Faults::none(), 9);
    let (a, b) = (BusinessId::new(1).unwrap(), BusinessId::new(2).unwrap());
    d.network.add_consumer(&number(1), 1).await;
    d.publish_all().await;
    d.network
        .consumer_sends(&number(1), 0, b, b"for B")
        .await
        .unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    let b_message = d.send(b, number(1), b"from B").await;
    d.network.pump(&d.processor, &d.transport).await;

    let before = (
        d.store.census().await.unwrap(),
        d.business.messages(),
        d.business.statuses(),
        d.processor
            .message_status(d.owner(b), b, b_message)
            .await
            .unwrap(),
        d.audit.events().len(),
    );
    let intruder = d.owner(a).clone();
    let unauthorized = |r: Result<(), ProcessorError>| {
        assert!(
            matches!(r, Err(ProcessorError::Unauthorized { .. })),
            "{r:?}"
        )
    };

    let spoof = || Outbound {
        to: number(1),
        content: b"spoof".to_vec().into(),
        category: Category::Service,
    };
    unauthorized(d.processor.send(&intruder, b, spoof()).await.map(drop));
    unauthorized(
        d.processor
            .send_idempotent(&intruder, b, b"order-1", spoof())
            .await
            .map(drop),
    );
    let inbound = custodian::processor::Inbound {
        resend_of: None,
        from: number(1),
        device: 0,
        message: custodian::signal::Ciphertext {
            kind: custodian::signal::MessageKind::FollowUp,
            bytes: vec![0x33; 40],
        },
    };
    unauthorized(d.processor.receive(&intruder, b, inbound).await.map(drop));
    unauthorized(
        d.processor
            .status_update(&intruder, b, b_message, Status::Read)
            .await
            .map(drop),
    );
    unauthorized(
        d.processor
            .retry_receipt(&intruder, b, b_message, 0)
            .await
            .map(drop),
    );
    unauthorized(
        d.processor
            .message_status(&intruder, b, b_message)
            .await
            .map(drop),
    );
    unauthorized(d.processor.publish_keys(&intruder, b).await);
    unauthorized(d.processor.billing_statement(&intruder, b).await.map(drop));
    unauthorized(
        d.processor
            .trust_new_identity(
                &intruder,
                b,
                &number(1),
                0,
                ConsumerDevice::new(0).identity(),
            )
            .await
            .map(drop),
    );
    unauthorized(d.processor.report_spam(&intruder, b, &number(1)).await);
    unauthorized(d.processor.report_block(&intruder, b, &number(1)).await);
    unauthorized(d.processor.opt_in(&intruder, b));
    unauthorized(d.processor.opt_out(&intruder, b));
    // Integrity signals go to the transport only, exported by operators;
    // key administration and policies are for operators too.
    unauthorized(d.processor.export_integrity(&intruder).await.map(drop));
    unauthorized(d.processor.export_billing(&intruder).await.map(drop));
    unauthorized(d.processor.keys(&intruder).map(drop));
    let epoch =
        custodian::keys::Epoch::containing(d.clock.now(), custodian::keys::EpochLength::DEFAULT)
            .unwrap();
    unauthorized(
        d.processor
            .shred_epoch(&intruder, b, epoch, "case")
            .await
            .map(drop),
    );
    unauthorized(d.processor.retention_policy(&intruder).map(drop));
    assert!(d.processor.retention_policy(&d.operator).is_ok());
    unauthorized(
        d.processor
            .set_retention_policy(&intruder, custodian::retention::RetentionPolicy::default()),
    );
    // The epoch length is the processor's: another is refused, naming it.
    let other_epochs = custodian::retention::RetentionPolicy::default()
        .with_epoch_length(custodian::keys::EpochLength::new(Duration::from_secs(600)).unwrap());
    assert!(matches!(
        d.processor.set_retention_policy(&d.operator, other_epochs),
        Err(ProcessorError::Config(why)) if why.contains("epoch length")
    ));
    unauthorized(
        d.processor
            .set_visibility_policy(&intruder, VisibilityPolicy::default()),
    );
    // Reading the visibility policy names its principal too (before, it
    // took none, though every other entry point does).
    unauthorized(d.processor.visibility_policy(&intruder).map(drop));
    assert_eq!(
        d.processor.visibility_policy(&d.operator).unwrap(),
        VisibilityPolicy::default()
    );
    // Maintenance is for operators: a business cannot sweep, retransmit, hold or count.
    unauthorized(d.processor.sweep(&intruder).await.map(drop));
    unauthorized(d.processor.retransmit_due(&intruder).await.map(drop));
    unauthorized(d.processor.census(&intruder).await.map(drop));
    unauthorized(d.processor.holds(&intruder).await.map(drop));
    unauthorized(d.processor.statistics(&intruder).await.map(drop));
    unauthorized(
        d.processor
            .place_hold(&intruder, HoldScope::Business(b), "x")
            .await,
    );
    unauthorized(
        d.processor
            .release_hold(&intruder, HoldScope::Business(b), "x")
            .await
            .map(drop),
    );
    // Asking about a message id of B in A's name reveals nothing either.
    assert!(matches!(
        d.processor.message_status(&intruder, a, b_message).await,
        Err(ProcessorError::NotFound)
    ));

    let after = (
        d.store.census().await.unwrap(),
        d.business.messages(),
        d.business.statuses(),
        d.processor
            .message_status(d.owner(b), b, b_message)
            .await
            .unwrap(),
        d.audit.events().len(),
    );
    assert_eq!(before, after, "a refused call changed something");
    // And B's own principal still works.
    assert_eq!(
        d.processor
            .message_status(d.owner(b), b, b_message)
            .await
            .unwrap(),
        before.3
    );
    let _ = d.clock.now();
}

/// A send named by an idempotency key is stored and sent once, however
/// often the business calls again with that key (before or after it is
/// delivered); the key cannot be used for another message, and the same
/// key names unrelated messages in two businesses.
#[tokio::test]
async fn an_idempotent_send_reaches_the_consumer_once_however_often_it_is_made() {
    let d = Deployment::new(&[7, 8], Faults::none(), Faults::none(), 21);
    let (a, b) = (BusinessId::new(7).unwrap(), BusinessId::new(8).unwrap());
    d.publish_all().await;
    d.network.add_consumer(&number(1), 2).await;
    d.network.add_consumer(&number(2), 1).await;
    let outbound = |to: usize, content: &[u8], category| Outbound {
        to: number(to),
        content: content.to_vec().into(),
        category,
    };
    let send = async |business, key: &'static [u8], message| {
        d.processor
            .send_idempotent(d.owner(business), business, key, message)
            .await
    };
    let order = || outbound(1, b"your order shipped", Category::Utility);

    let id = send(a, b"order-1", order()).await.unwrap();
    // Again before the consumer's devices took it, and after.
    assert_eq!(send(a, b"order-1", order()).await.unwrap(), id);
    d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(send(a, b"order-1", order()).await.unwrap(), id);
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;

    // The key is the message's: another content, recipient or category
    // under it is refused, and sends nothing.
    for other in [
        outbound(1, b"your order was lost", Category::Utility),
        outbound(2, b"your order shipped", Category::Utility),
        outbound(1, b"your order shipped", Category::Marketing),
    ] {
        let refused = send(a, b"order-1", other).await;
        assert!(
            matches!(refused, Err(ProcessorError::Invalid(_))),
            "{refused:?}"
        );
    }
    // Content longer than a send takes is refused before anything is
    // stored, keyed or not.
    let too_long = || outbound(1, &vec![b'x'; MAX_CONTENT_LEN + 1], Category::Utility);
    let refused = send(a, b"order-2", too_long()).await;
    assert!(
        matches!(refused, Err(ProcessorError::Invalid(_))),
        "{refused:?}"
    );
    let refused = d.processor.send(d.owner(a), a, too_long()).await;
    assert!(
        matches!(refused, Err(ProcessorError::Invalid(_))),
        "{refused:?}"
    );
    assert_eq!(d.store.census().await.unwrap().messages, 1);
    for key in [&b""[..], &[b'k'; MAX_IDEMPOTENCY_KEY_LEN + 1][..]] {
        let refused = d
            .processor
            .send_idempotent(d.owner(a), a, key, order())
            .await;
        assert!(
            matches!(refused, Err(ProcessorError::Invalid(_))),
            "{refused:?}"
        );
    }
    let longest = [b'k'; MAX_IDEMPOTENCY_KEY_LEN];
    let other = d
        .processor
        .send_idempotent(d.owner(a), a, &longest, order())
        .await
        .unwrap();
    // The same key in another business is another message.
    let in_b = send(b, b"order-1", order()).await.unwrap();
    assert!(in_b != id && other != id);
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;

    let received = d.network.received(&number(1)).await;
    assert_eq!(received.len(), 2, "both devices");
    for messages in received.values() {
        let want = BTreeMap::from([(id, 1), (other, 1), (in_b, 1)]);
        assert_eq!(*messages, want);
    }
    assert!(d.network.received(&number(2)).await.is_empty());
    assert_eq!(d.store.census().await.unwrap().messages, 3);
    assert_eq!(
        d.processor.message_status(d.owner(a), a, id).await.unwrap(),
        (Status::Delivered, None)
    );
    let told_sent = d.business.statuses()[&id]
        .iter()
        .filter(|(s, _)| *s == Status::Sent)
        .count();
    assert_eq!(told_sent, 1);
}

/// A business whose webhook answers every message at once, by calling the
/// processor from inside `deliver` (a bot): nothing the processor holds
/// while it hands a message over may stand in the way of that reply.
struct EchoBot {
    processor: std::sync::Mutex<std::sync::Weak<Processor>>,
    owner: Principal,
    replies: std::sync::Mutex<Vec<MessageId>>,
}

#[async_trait::async_trait]
impl custodian::transport::BusinessSink for EchoBot {
    async fn deliver(
        &self,
        message: &custodian::transport::InboundMessage,
    ) -> Result<(), custodian::transport::SinkError> {
        let processor = self.processor.lock().unwrap().upgrade().unwrap();
        let reply = Outbound {
            to: message.from.clone(),
            content: [b"re: ".as_slice(), &message.content].concat().into(),
            category: Category::Service,
        };
        let id = processor
            .send(&self.owner, message.business, reply)
            .await
            .unwrap();
        self.replies.lock().unwrap().push(id);
        Ok(())
    }

    async fn status(
        &self,
        _: &custodian::transport::StatusUpdate,
    ) -> Result<(), custodian::transport::SinkError> {
        Ok(())
    }
}

#[test]
fn a_business_may_reply_from_inside_its_webhook() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let clock = ManualClock::new(Timestamp::from_millis(T0));
            let network = Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 11).unwrap());
            let b = BusinessId::new(5).unwrap();
            let owner = Principal::new("owner");
            let bot = Arc::new(EchoBot {
                processor: std::sync::Mutex::new(std::sync::Weak::new()),
                owner: owner.clone(),
                replies: std::sync::Mutex::new(Vec::new()),
            });
            let host = Host {
                storage: Arc::new(MemoryStore::new()),
                key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
                transport: network.clone(),
                business: bot.clone(),
                authorizer: Arc::new(StaticAuthorizer::new().grant(&owner, b).carrier(&owner, b)),
                clock: Arc::new(clock.clone()),
                audit: Arc::new(MemoryAuditSink::new()),
            };
            let processor = Arc::new(Processor::new(host, Policies::default()).unwrap());
            *bot.processor.lock().unwrap() = Arc::downgrade(&processor);
            processor.publish_keys(&owner, b).await.unwrap();
            network.add_consumer(&number(1), 2).await;
            for i in 0..3 {
                network
                    .consumer_sends(&number(1), 0, b, format!("hi {i}").as_bytes())
                    .await
                    .unwrap();
            }
            network.pump(&processor, &owner).await;
            network.pump(&processor, &owner).await;
            let replies = bot.replies.lock().unwrap().clone();
            assert_eq!(replies.len(), 3);
            for device in [0, 1] {
                let got = network.contents(&number(1), device).await;
                let texts: BTreeSet<Vec<u8>> = got.into_iter().map(|(_, _, c)| c).collect();
                let expected: BTreeSet<Vec<u8>> =
                    (0..3).map(|i| format!("re: hi {i}").into_bytes()).collect();
                assert_eq!(texts, expected, "device {device}");
            }
        });
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the reply from inside the webhook deadlocked the processor")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the scenario failed: see its panic above")
        }
    }
}

/// A business whose webhook, told a status, runs the retention sweep (a
/// host that sweeps on any failure, say), and keeps what came of it.
struct SweepingWebhook {
    processor: std::sync::Mutex<std::sync::Weak<Processor>>,
    operator: Principal,
    sweeps: std::sync::Mutex<Vec<Result<(), ProcessorError>>>,
}

#[async_trait::async_trait]
impl custodian::transport::BusinessSink for SweepingWebhook {
    async fn deliver(
        &self,
        _: &custodian::transport::InboundMessage,
    ) -> Result<(), custodian::transport::SinkError> {
        Ok(())
    }

    async fn status(
        &self,
        _: &custodian::transport::StatusUpdate,
    ) -> Result<(), custodian::transport::SinkError> {
        let processor = self.processor.lock().unwrap().upgrade().unwrap();
        let swept = processor.sweep(&self.operator).await.map(|_| ());
        self.sweeps.lock().unwrap().push(swept);
        Ok(())
    }
}

/// A sweep tells a business its message expired undelivered, and the
/// business's webhook runs a sweep from inside: that sweep is refused as
/// under way, where it would wait for the sweep it is inside of forever.
#[test]
fn a_sweep_from_inside_the_business_told_by_a_sweep_is_refused_not_waited_for() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let start = Timestamp::from_millis(T0);
        let down = Faults::none().with_outage(start, Duration::from_secs(40 * 86_400));
        let network = Arc::new(SimNetwork::new(clock.clone(), down, 12).unwrap());
        let b = BusinessId::new(5).unwrap();
        let (owner, operator) = (Principal::new("owner"), Principal::new("operator"));
        let webhook = Arc::new(SweepingWebhook {
            processor: std::sync::Mutex::new(std::sync::Weak::new()),
            operator: operator.clone(),
            sweeps: std::sync::Mutex::new(Vec::new()),
        });
        let host = Host {
            storage: Arc::new(MemoryStore::new()),
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: network.clone(),
            business: webhook.clone(),
            authorizer: Arc::new(
                StaticAuthorizer::new()
                    .grant(&owner, b)
                    .carrier(&owner, b)
                    .operator(&operator),
            ),
            clock: Arc::new(clock.clone()),
            audit: Arc::new(MemoryAuditSink::new()),
        };
        let processor = Arc::new(Processor::new(host, Policies::default()).unwrap());
        *webhook.processor.lock().unwrap() = Arc::downgrade(&processor);
        network.add_consumer(&number(1), 1).await;
        let message = Outbound {
            to: number(1),
            content: b"never delivered".to_vec().into(),
            category: Category::Utility,
        };
        let id = processor.send(&owner, b, message).await.unwrap();
        clock.advance(Duration::from_secs(31 * 86_400));
        // Everything here is in memory: the sweep finishes in one poll,
        // unless it waits for itself.
        let sweep = processor.sweep(&operator);
        let mut sweep = std::pin::pin!(sweep);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(swept) = sweep.as_mut().poll(&mut cx) else {
            panic!("the sweep waits for the sweep its business started");
        };
        let swept = swept.unwrap();
        assert_eq!((swept.failed_expired, swept.failures_unreported), (1, 0));
        let sweeps = std::mem::take(&mut *webhook.sweeps.lock().unwrap());
        assert!(
            matches!(
                sweeps.as_slice(),
                [Err(ProcessorError::Sweep(
                    custodian::retention::SweepError::InProgress
                ))]
            ),
            "{sweeps:?}"
        );
        // Told, it was deleted with everything else expired.
        assert!(matches!(
            processor.message_status(&owner, b, id).await,
            Err(ProcessorError::NotFound)
        ));
    });
}

/// One consumer device and a processor over a store, keys and network that
/// outlive it: each [`Restartable::start`] is a fresh process.
struct Restartable {
    clock: ManualClock,
    store: Arc<MemoryStore>,
    provider: Arc<LocalKeyProvider>,
    business: Arc<SimBusiness>,
    network: Arc<custodian::testing::RecordingTransport>,
    owner: Principal,
    operator: Principal,
    b: BusinessId,
}

impl Restartable {
    fn new() -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        Self {
            business: SimBusiness::new(clock.clone(), Faults::none(), 1).unwrap(),
            clock,
            store: Arc::new(MemoryStore::new()),
            provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            network: Arc::new(custodian::testing::RecordingTransport::new()),
            owner: Principal::new("owner"),
            operator: Principal::new("operator"),
            b: BusinessId::new(3).unwrap(),
        }
    }

    fn start(&self) -> Processor {
        let authorizer = StaticAuthorizer::new()
            .grant(&self.owner, self.b)
            .carrier(&self.owner, self.b)
            .operator(&self.operator);
        Processor::new(
            Host {
                storage: self.store.clone(),
                key_provider: self.provider.clone(),
                transport: self.network.clone(),
                business: self.business.clone(),
                authorizer: Arc::new(authorizer),
                clock: Arc::new(self.clock.clone()),
                audit: Arc::new(MemoryAuditSink::new()),
            },
            Policies::default(),
        )
        .unwrap()
    }

    /// `message` from the consumer's device.
    fn inbound(message: custodian::signal::Ciphertext) -> custodian::processor::Inbound {
        custodian::processor::Inbound {
            resend_of: None,
            from: number(7),
            device: 0,
            message,
        }
    }

    /// The business answers: its reply, decrypted by `device`, which moves
    /// the device's next messages to a new chain.
    async fn reply(&self, processor: &Processor, device: &mut custodian::testing::ConsumerDevice) {
        let reply = Outbound {
            to: number(7),
            content: b"hi".to_vec().into(),
            category: Category::Service,
        };
        processor.send(&self.owner, self.b, reply).await.unwrap();
        for message in self.network.take_sent().remove(&number(7)).unwrap() {
            device.decrypt(self.b, &message).await.unwrap();
        }
    }

    /// Seven messages from `device`, on one chain (all but the first
    /// written behind), each delivered once: their ids and ciphertexts.
    async fn seven(
        &self,
        processor: &Processor,
        device: &mut custodian::testing::ConsumerDevice,
    ) -> Vec<(MessageId, custodian::signal::Ciphertext)> {
        let mut sent = Vec::new();
        for i in 0..7 {
            let message = device
                .encrypt(self.b, format!("m{i}").as_bytes())
                .await
                .unwrap();
            let receipt = processor
                .receive(&self.owner, self.b, Self::inbound(message.clone()))
                .await
                .unwrap();
            assert!(receipt.delivered && !receipt.duplicate);
            sent.push((receipt.id, message));
        }
        sent
    }

    /// A first processor, and a device with a session answered by it: the
    /// device's next messages follow up on the session.
    async fn converse(&self) -> (Processor, custodian::testing::ConsumerDevice) {
        let processor = self.start();
        processor.publish_keys(&self.owner, self.b).await.unwrap();
        let mut device = custodian::testing::ConsumerDevice::new(0);
        device
            .start_session(self.b, &self.network.published().unwrap().bundle(Some(0)))
            .await
            .unwrap();
        let first = device.encrypt(self.b, b"hello").await.unwrap();
        processor
            .receive(&self.owner, self.b, Self::inbound(first))
            .await
            .unwrap();
        self.reply(&processor, &mut device).await;
        (processor, device)
    }
}

/// A restart loses what the processor kept in memory, including session
/// advances written behind; a replay of a message received before it is
/// still refused, and stays refused once the stored message is gone.
#[tokio::test]
async fn a_replay_after_a_restart_is_refused_even_once_its_copy_is_gone() {
    use custodian::store::{Batch, Op};

    let w = Restartable::new();
    let (owner, b, inbound) = (&w.owner, w.b, Restartable::inbound);
    let (before, mut device) = w.converse().await;
    let sent = w.seven(&before, &mut device).await;
    drop(before);

    let after = w.start();
    for (id, message) in &sent {
        let receipt = after.receive(owner, b, inbound(message.clone())).await;
        assert!(
            receipt.as_ref().is_ok_and(|r| r.duplicate && r.id == *id),
            "a replay after a restart was not refused as one: {receipt:?}"
        );
    }
    // The device goes on: its next message decrypts, past the keys the
    // replays used.
    let next = device.encrypt(b, b"m7").await.unwrap();
    let receipt = after.receive(owner, b, inbound(next)).await.unwrap();
    assert!(receipt.delivered && !receipt.duplicate);

    // Their retention over, the replayed messages are gone; a replay must
    // still not decrypt, now or after another restart.
    let mut gone = Batch::new();
    for (id, _) in &sent {
        gone.push(Op::DeleteMessage {
            business: b,
            id: *id,
        });
    }
    w.store.commit(gone).await.unwrap();
    for (processor, label) in [
        (&after, "without their copies"),
        (&w.start(), "restarted again"),
    ] {
        for (_, message) in &sent {
            let receipt = processor.receive(owner, b, inbound(message.clone())).await;
            assert!(
                !receipt.as_ref().is_ok_and(|r| r.delivered),
                "{label}: a replay was delivered again"
            );
        }
    }
    let messages = w.business.messages();
    assert_eq!(messages.len(), 9);
    assert!(messages.values().all(|&copies| copies == 1), "{messages:?}");
}

/// A row of a SQLite store that no longer decodes (here a copy of a due
/// message with its phone hash cut short, due before every other) stops
/// neither retransmission nor the sweep: every pass succeeds, the good
/// message reaches both devices once the transport is back, and the sweep
/// deletes everything else, the consumer's Signal state among it, which
/// the processor then keeps no copy of either. The damaged row stays for
/// an operator.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_row_that_does_not_decode_blocks_neither_retransmission_nor_the_sweep() {
    use custodian::retention::RetentionPolicy;
    use custodian::store::{SqliteConfig, SqliteStore};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Arc::new(SqliteStore::open(&path, SqliteConfig::default()).unwrap());
    let down = Faults::none().with_outage(Timestamp::from_millis(T0), Duration::from_secs(600));
    let d = Deployment::on(store.clone(), &[7], down, Faults::none(), 9);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 2).await;
    let good = d.send(b, number(1), b"still goes").await;
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "INSERT INTO messages (business, id, direction, phone, created, expiry, epoch,
                 status, failure, attempts, next_attempt, pending_devices, sealed)
             SELECT business, X'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee', direction, X'0707', created,
                 expiry, epoch, status, failure, attempts, next_attempt - 1, pending_devices,
                 sealed FROM messages LIMIT 1",
        )
        .unwrap();

    d.run(Duration::from_secs(900), Duration::from_secs(60))
        .await;
    let received = d.network.received(&number(1)).await;
    assert_eq!(received.len(), 2, "both devices");
    assert!(received.values().all(|m| m.contains_key(&good)));
    assert!(store.damaged_rows_skipped() > 0);

    let shorter = RetentionPolicy::from_toml("[business.7]\nretention = \"1d\"\n").unwrap();
    d.processor
        .set_retention_policy(&d.operator, shorter)
        .unwrap();
    d.clock.advance(Duration::from_secs(2 * 24 * 3600));
    let swept = d.processor.sweep(&d.operator).await.unwrap();
    assert!(swept.complete, "{swept:?}");
    let census = d.store.census().await.unwrap();
    assert_eq!(
        (census.messages, census.peers),
        (1, 0),
        "all but the damaged row"
    );

    // The consumer still has its session; the processor must not. (The
    // business publishes its keys now the network is back.)
    d.publish_all().await;
    d.network
        .consumer_sends(&number(1), 0, b, b"after retention")
        .await
        .unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    assert!(
        d.business.messages().is_empty(),
        "decrypted from a forgotten session"
    );
}

/// A second processor on the same store (another process, say) takes it
/// over: the first can no longer write, so it never persists a session over
/// the second's and reissues the sending counters the second uses (two
/// messages under one message key). Its sends fail as superseded, and the
/// consumer's device decrypts every message it gets, none a repeat.
#[tokio::test]
async fn a_processor_superseded_by_another_on_its_store_stops_writing() {
    use custodian::store::StoreError;

    let w = Restartable::new();
    let (owner, b) = (&w.owner, w.b);
    let (first, mut device) = w.converse().await;
    let outbound = |text: String| Outbound {
        to: number(7),
        content: text.into_bytes().into(),
        category: Category::Service,
    };
    for i in 0..3 {
        first
            .send(owner, b, outbound(format!("first {i}")))
            .await
            .unwrap();
    }
    let second = w.start();
    second
        .send(owner, b, outbound("second".into()))
        .await
        .unwrap();
    // Past the sending counters the first leased before the second took
    // over: it would have to lease more.
    for i in 3..80 {
        let sent = first.send(owner, b, outbound(format!("first {i}"))).await;
        assert!(
            matches!(sent, Err(ProcessorError::Store(StoreError::Superseded))),
            "{i}: {sent:?}"
        );
    }
    second
        .send(owner, b, outbound("second again".into()))
        .await
        .unwrap();
    let mut texts = Vec::new();
    for message in w.network.take_sent().remove(&number(7)).unwrap() {
        let plaintext = device.decrypt(b, &message).await.unwrap();
        let (_, content) = custodian::processor::parse_device_payload(&plaintext).unwrap();
        texts.push(String::from_utf8(content.to_vec()).unwrap());
    }
    texts.sort();
    assert_eq!(
        texts,
        ["first 0", "first 1", "first 2", "second", "second again"]
    );
}

/// A processor that has only published its keys has taken the store over:
/// a newer one started after it supersedes it for good, and the older
/// one's first session write fails. (It took the store over only at its
/// first session, and took it back from the newer one, whose writes all
/// failed as superseded from then on; a review's test.)
#[tokio::test]
async fn a_processor_that_only_published_keys_is_superseded_by_a_newer_one() {
    let w = Restartable::new();
    let (owner, b) = (&w.owner, w.b);
    let older = w.start();
    older.publish_keys(owner, b).await.unwrap();
    let newer = w.start();
    let mut device = custodian::testing::ConsumerDevice::new(0);
    device
        .start_session(b, &w.network.published().unwrap().bundle(Some(0)))
        .await
        .unwrap();
    let mut writes = async |text: &[u8]| {
        let message = device.encrypt(b, text).await.unwrap();
        Restartable::inbound(message)
    };
    let first = writes(b"to the newer").await;
    assert!(newer.receive(owner, b, first).await.unwrap().delivered);
    let second = writes(b"to the older").await;
    // Refused by the store's fence (through the Signal layer's write).
    let refused = older.receive(owner, b, second.clone()).await;
    assert!(format!("{refused:?}").contains("Superseded"), "{refused:?}");
    assert!(newer.receive(owner, b, second).await.unwrap().delivered);
}

/// A processor superseded on its store makes no call out for a message
/// its retransmission pass finds due: the attempt is leased in a fenced
/// write first, which is refused. Unleased, the older processor handed the
/// message to the business before its write was refused, and the newer
/// one, finding it still due, handed it over again: the business got it
/// twice.
#[tokio::test]
async fn a_superseded_processors_retransmission_makes_no_call_out() {
    let mut w = Restartable::new();
    let outage_start = Timestamp::from_millis(T0 + 60_000);
    let outage = Faults::none().with_outage(outage_start, Duration::from_secs(60));
    w.business = SimBusiness::new(w.clock.clone(), outage, 1).unwrap();
    let (owner, operator, b) = (&w.owner, &w.operator, w.b);
    let (first, mut device) = w.converse().await;

    // Received while the business is down: stored, due for another attempt.
    w.clock.set(outage_start);
    let message = device.encrypt(b, b"while down").await.unwrap();
    let receipt = first
        .receive(owner, b, Restartable::inbound(message))
        .await
        .unwrap();
    assert!(!receipt.delivered && !receipt.duplicate, "{receipt:?}");

    // Another processor takes the store over.
    let second = w.start();
    let hello = Outbound {
        to: number(7),
        content: b"from the second".to_vec().into(),
        category: Category::Service,
    };
    second.send(owner, b, hello).await.unwrap();

    // Every message is due (the outbound ones for want of a delivery
    // report): the older processor's pass makes none of their attempts.
    w.clock.advance(Duration::from_secs(3600));
    w.network.take_sent();
    let older = first.retransmit_due(operator).await.unwrap();
    assert!(older.due >= 2 && older.errors == older.due, "{older:?}");
    assert!(
        !w.business.messages().contains_key(&receipt.id),
        "the superseded processor handed the message over"
    );
    assert!(w.network.take_sent().is_empty(), "it sent");
    let newer = second.retransmit_due(operator).await.unwrap();
    assert_eq!(newer.delivered_to_business, 1, "{newer:?}");
    assert_eq!(w.business.messages().get(&receipt.id), Some(&1));
}

/// An open message is never due after its retention ends: sent again
/// late in its life, it would wait hours for its report (as long as it
/// has lived, up to six), so its next attempt is brought forward to its
/// expiry, where the retransmission loop fails it as expired and tells the
/// business, with no sweep needed.
#[tokio::test]
async fn a_message_sent_again_late_in_its_life_fails_at_its_expiry() {
    let w = Restartable::new();
    let (owner, operator, b) = (&w.owner, &w.operator, w.b);
    let (processor, _device) = w.converse().await;
    let hello = Outbound {
        to: number(7),
        content: b"unanswered".to_vec().into(),
        category: Category::Service,
    };
    let id = processor.send(owner, b, hello).await.unwrap();
    let expiry = w.store.message(b, id).await.unwrap().unwrap().expiry;

    // An hour before its expiry, its report long overdue: sent again.
    w.clock
        .set(expiry.saturating_sub(Duration::from_secs(3600)));
    let pass = processor.retransmit_due(operator).await.unwrap();
    assert!(pass.sent >= 1, "{pass:?}");
    let d = w.store.message(b, id).await.unwrap().unwrap().delivery;
    assert_eq!((d.status, d.next_attempt), (Status::Sent, Some(expiry)));

    w.clock.set(expiry.saturating_add(Duration::from_secs(1)));
    processor.retransmit_due(operator).await.unwrap();
    let told = w.business.statuses();
    assert_eq!(
        told[&id].last(),
        Some(&(Status::Failed, Some(FailureReason::Expired)))
    );
}

/// The same for a received message whose business cannot be reached: a
/// hand-over failing a second before its expiry leaves it due at its
/// expiry, not a backoff later.
#[tokio::test]
async fn a_hand_over_failing_just_before_expiry_leaves_it_due_at_expiry() {
    let mut w = Restartable::new();
    let down =
        Faults::none().with_outage(Timestamp::from_millis(T0), Duration::from_secs(40 * 86_400));
    w.business = SimBusiness::new(w.clock.clone(), down, 1).unwrap();
    let (processor, mut device) = w.converse().await;
    let message = device.encrypt(w.b, b"unheard").await.unwrap();
    let receipt = processor
        .receive(&w.owner, w.b, Restartable::inbound(message))
        .await
        .unwrap();
    assert!(!receipt.delivered);
    let expiry = w
        .store
        .message(w.b, receipt.id)
        .await
        .unwrap()
        .unwrap()
        .expiry;

    w.clock.set(expiry.saturating_sub(Duration::from_secs(1)));
    processor.retransmit_due(&w.operator).await.unwrap();
    let d = w
        .store
        .message(w.b, receipt.id)
        .await
        .unwrap()
        .unwrap()
        .delivery;
    assert!(d.attempts >= 2, "{d:?}");
    assert_eq!(d.next_attempt, Some(expiry), "{d:?}");
}

/// A first-contact message that used no one-time prekey decrypts in a new
/// session under any device id: replayed as another device of its
/// consumer, it is the duplicate it is, with the first copy's id (its
/// receipt saying the business has it), and the business gets it once.
#[tokio::test]
async fn a_first_message_replayed_as_another_device_is_a_duplicate() {
    let w = Restartable::new();
    let (owner, b, inbound) = (&w.owner, w.b, Restartable::inbound);
    let processor = w.start();
    processor.publish_keys(owner, b).await.unwrap();
    let mut device = custodian::testing::ConsumerDevice::new(0);
    device
        .start_session(b, &w.network.published().unwrap().bundle(None))
        .await
        .unwrap();
    let first = device.encrypt(b, b"hello").await.unwrap();
    let receipt = processor
        .receive(owner, b, inbound(first.clone()))
        .await
        .unwrap();
    assert!(receipt.delivered && !receipt.duplicate);
    let replay = custodian::processor::Inbound {
        device: 7,
        ..inbound(first)
    };
    let again = processor.receive(owner, b, replay).await.unwrap();
    assert!(
        again.duplicate && again.delivered && again.id == receipt.id,
        "{again:?}"
    );
    let messages = w.business.messages();
    assert_eq!(messages.len(), 1);
    assert!(messages.values().all(|&copies| copies == 1), "{messages:?}");
}

/// Receives written behind on one receiving chain are lost in a restart,
/// and the consumer moves on to a new chain without sending on the old one
/// again: the stored session, persisted by the messages that follow on the
/// new chain, still takes the old chain's lost counters for new. Once the
/// messages on them are deleted at the end of their retention (the session
/// lives on, kept by newer messages), a replay of one must still not reach
/// the business a second time.
#[tokio::test]
async fn a_replay_on_a_chain_left_behind_by_a_restart_is_refused_after_its_copy_expires() {
    replay_on_a_chain_left_behind(true, Then::NewChain).await;
}

/// The same without a restart: a tampered message, which anyone on the
/// transport can send, makes the processor drop the session it holds in
/// memory, receives written behind included.
#[tokio::test]
async fn a_replay_on_a_chain_left_behind_by_a_tampered_message_is_refused_after_its_copy_expires() {
    replay_on_a_chain_left_behind(false, Then::NewChain).await;
}

/// The same, but the consumer then starts a new session (a reinstall, say):
/// the session whose counters the processor is unsure of is archived, not
/// current, when it is next persisted, and its lost counters must be
/// settled there all the same. Else a replay decrypts under the archived
/// session once the messages guarding it are gone.
#[tokio::test]
async fn a_replay_on_a_session_left_behind_by_a_restart_is_refused_after_its_copy_expires() {
    replay_on_a_chain_left_behind(true, Then::NewSession).await;
}

/// The same after a tampered message.
#[tokio::test]
async fn a_replay_on_a_session_left_behind_by_a_tampered_message_is_refused_after_its_copy_expires()
{
    replay_on_a_chain_left_behind(false, Then::NewSession).await;
}

/// What the consumer does once the receives written behind are lost.
#[derive(Clone, Copy)]
enum Then {
    /// Takes the business's reply: its next messages are on a new chain.
    NewChain,
    /// Starts a new session from the business's bundle.
    NewSession,
}

/// Lose the receives written behind on a chain (by a restart, or else by a
/// tampered message), move on to a new chain or session, let the first
/// messages expire, replay them.
async fn replay_on_a_chain_left_behind(restart: bool, then: Then) {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let w = Restartable::new();
    let (owner, b, inbound) = (&w.owner, w.b, Restartable::inbound);
    let (before, mut device) = w.converse().await;
    let old_chain: Vec<_> = w
        .seven(&before, &mut device)
        .await
        .into_iter()
        .map(|(_, message)| message)
        .collect();
    let after = if restart {
        drop(before);
        w.start()
    } else {
        let mut tampered = old_chain[6].clone();
        let mid = tampered.bytes.len() / 2;
        tampered.bytes[mid] ^= 1;
        assert!(before.receive(owner, b, inbound(tampered)).await.is_err());
        before
    };
    // The business answers, and the device's next messages are on a new
    // chain; the conversation goes on 20 days later, so the session
    // outlives the first messages, which the sweep deletes after their 30
    // days.
    match then {
        Then::NewChain => w.reply(&after, &mut device).await,
        Then::NewSession => device
            .start_session(b, &w.network.published().unwrap().bundle(Some(1)))
            .await
            .unwrap(),
    }
    for (wait, text) in [(Duration::ZERO, "moved on"), (20 * DAY, "still here")] {
        w.clock.advance(wait);
        let message = device.encrypt(b, text.as_bytes()).await.unwrap();
        let receipt = after.receive(owner, b, inbound(message)).await.unwrap();
        assert!(receipt.delivered, "{text}");
    }
    w.clock.advance(11 * DAY);
    after.sweep(&w.operator).await.unwrap();

    for (processor, label) in [(&after, "after the sweep"), (&w.start(), "restarted again")] {
        for message in &old_chain {
            let receipt = processor.receive(owner, b, inbound(message.clone())).await;
            assert!(
                !receipt.as_ref().is_ok_and(|r| r.delivered),
                "{label}: a replay was delivered again"
            );
        }
    }
    let messages = w.business.messages();
    assert!(messages.values().all(|&copies| copies == 1), "{messages:?}");
}

/// Consumers whose first messages are still on their way hold one-time
/// prekeys the network handed out: the business's key maintenance refills
/// the pool by what the network has left, so later consumers still get
/// one, and every first message still decrypts.
#[tokio::test]
async fn the_prekey_pool_refills_while_first_messages_are_on_their_way() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 11);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    let pool = d.network.one_time_prekeys_left(b).await;
    let consumers = pool * 3;
    for i in 0..consumers {
        d.network.add_consumer(&number(i), 1).await;
        d.network
            .consumer_sends(&number(i), 0, b, format!("first from {i}").as_bytes())
            .await
            .unwrap();
        // The host's maintenance timer, while nothing has arrived yet.
        if i % 10 == 9 {
            d.publish_all().await;
        }
    }
    assert_eq!(
        d.network.one_time_prekeys_handed_out(b).await,
        consumers,
        "every session started with a one-time prekey"
    );
    d.network.pump(&d.processor, &d.transport).await;
    let messages = d.business.messages();
    assert_eq!(messages.len(), consumers, "every first message decrypted");
    assert!(messages.values().all(|&copies| copies == 1));
}

/// A host with no faults, no one authorised and `audit` as its trail, at
/// `T0`: for checks of what `Processor::new` accepts.
fn plain_host(audit: Arc<dyn AuditSink>) -> Host {
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap()),
        business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
        authorizer: Arc::new(StaticAuthorizer::new()),
        clock: Arc::new(clock),
        audit,
    }
}

/// Delivery settings under which retries would stop, or spin, are refused
/// when the processor is built, naming the setting: a wait under a
/// millisecond among them, which times in whole milliseconds make zero.
/// (One was let in, and a message was resent at every pass with no time
/// passing.)
#[test]
fn delivery_settings_that_would_stop_or_spin_retries_are_refused() {
    let host = || plain_host(Arc::new(MemoryAuditSink::new()));
    let ok = DeliveryConfig::default();
    assert!(Processor::new(host(), Policies::default()).is_ok());
    for (bad, field) in [
        (
            DeliveryConfig {
                batch: 0,
                ..ok.clone()
            },
            "batch",
        ),
        (
            DeliveryConfig {
                retry_base: Duration::ZERO,
                ..ok.clone()
            },
            "retry_base",
        ),
        (
            DeliveryConfig {
                retry_max: ok.retry_base / 2,
                ..ok.clone()
            },
            "retry_max",
        ),
        (
            DeliveryConfig {
                receipt_timeout: Duration::ZERO,
                ..ok.clone()
            },
            "receipt_timeout",
        ),
        (
            DeliveryConfig {
                retry_base: Duration::from_micros(999),
                ..ok.clone()
            },
            "retry_base",
        ),
        (
            DeliveryConfig {
                receipt_timeout: Duration::from_nanos(1),
                ..ok.clone()
            },
            "receipt_timeout",
        ),
    ] {
        let policies = Policies {
            delivery: bad,
            ..Policies::default()
        };
        match Processor::new(host(), policies) {
            Err(ProcessorError::Config(why)) => assert!(why.contains(field), "{why}"),
            other => panic!("{field}: {other:?}"),
        }
    }
}

/// A period or window out of range is refused naming it by its place in
/// `Policies`, with the range that place accepts: statistics periods and
/// integrity windows up to 30 days (they remember consumers for as long),
/// billing periods up to 366 days. (Each said "period: must be … from 1
/// second to 366 days": the three could not be told apart, and a host that
/// followed the message with 60 days was refused again: review of
/// integrity and billing.)
#[test]
fn periods_out_of_range_are_refused_naming_the_setting_and_its_range() {
    let refusal = |policies: Policies| match Processor::new(
        plain_host(Arc::new(MemoryAuditSink::new())),
        policies,
    ) {
        Err(ProcessorError::Config(why)) => why,
        other => panic!("{other:?}"),
    };
    let to_30_days = "must be whole seconds, from 1 second to 30 days";
    for bad in [Duration::ZERO, Duration::from_millis(1_500)] {
        let mut policies = Policies::default();
        policies.statistics.period = bad;
        assert_eq!(
            refusal(policies),
            format!("statistics.period: {to_30_days}")
        );
        let mut policies = Policies::default();
        policies.integrity.window = bad;
        assert_eq!(refusal(policies), format!("integrity.window: {to_30_days}"));
        let mut policies = Policies::default();
        policies.billing.period = bad;
        assert_eq!(
            refusal(policies),
            "billing.period: must be whole seconds, from 1 second to 366 days"
        );
    }
    let mut policies = Policies::default();
    policies.billing.period = Duration::from_secs(60 * 24 * 3600);
    assert!(Processor::new(plain_host(Arc::new(MemoryAuditSink::new())), policies).is_ok());
}

/// Signal settings that would refuse every session, or waste or starve
/// the prekeys, are refused when the processor is built, naming the
/// setting. Before, `SignalConfig` was never checked: with
/// `max_record_len: 0` the processor started, and every consumer's first
/// message then failed for good as `RecordTooLarge` and was dropped.
#[test]
fn signal_settings_that_would_refuse_every_session_are_refused_at_start() {
    let host = || plain_host(Arc::new(MemoryAuditSink::new()));
    let ok = SignalConfig::default();
    for (bad, field) in [
        (
            SignalConfig {
                max_record_len: 0,
                ..ok.clone()
            },
            "max_record_len",
        ),
        (
            SignalConfig {
                max_record_len: custodian::signal::MIN_RECORD_LEN - 1,
                ..ok.clone()
            },
            "max_record_len",
        ),
        // A record past what a sealed record holds would fail to seal, a
        // storage failure retried for ever (review).
        (
            SignalConfig {
                max_record_len: custodian::envelope::MAX_PLAINTEXT_LEN + 1,
                ..ok.clone()
            },
            "max_record_len",
        ),
        (
            SignalConfig {
                signed_prekey_rotation: Duration::ZERO,
                ..ok.clone()
            },
            "signed_prekey_rotation",
        ),
        // Under a millisecond is zero to times in whole milliseconds:
        // every `maintain` rotated (review).
        (
            SignalConfig {
                signed_prekey_rotation: Duration::from_micros(999),
                ..ok.clone()
            },
            "signed_prekey_rotation",
        ),
        (
            SignalConfig {
                prekey_pool: 0,
                ..ok.clone()
            },
            "prekey_pool",
        ),
        (
            SignalConfig {
                prekey_limit: ok.prekey_pool - 1,
                ..ok.clone()
            },
            "prekey_limit",
        ),
        // Never refilled: every first message without a one-time prekey.
        (
            SignalConfig {
                prekey_low_water: 0,
                ..ok.clone()
            },
            "prekey_low_water",
        ),
        (
            SignalConfig {
                prekey_low_water: ok.prekey_pool + 1,
                ..ok.clone()
            },
            "prekey_low_water",
        ),
        // Past the 24-bit ids (and, at `usize::MAX`, a panic in `publish`).
        (
            SignalConfig {
                prekey_pool: usize::MAX,
                prekey_limit: usize::MAX,
                ..ok.clone()
            },
            "prekey_limit",
        ),
        (
            SignalConfig {
                prekey_limit: custodian::signal::MAX_PREKEY_LIMIT + 1,
                ..ok.clone()
            },
            "prekey_limit",
        ),
        (
            SignalConfig {
                signed_prekey_grace: custodian::retention::CEILING + Duration::from_secs(1),
                ..ok.clone()
            },
            "signed_prekey_grace",
        ),
    ] {
        assert!(bad.validate().is_err(), "{field}");
        let policies = Policies {
            signal: bad,
            ..Policies::default()
        };
        match Processor::new(host(), policies) {
            Err(ProcessorError::Config(why)) => assert!(why.contains(field), "{why}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    // The bounds themselves are accepted.
    let edge = SignalConfig {
        max_record_len: custodian::signal::MIN_RECORD_LEN,
        prekey_pool: 1,
        prekey_low_water: 1,
        prekey_limit: 1,
        signed_prekey_grace: custodian::retention::CEILING,
        ..ok
    };
    let policies = Policies {
        signal: edge,
        ..Policies::default()
    };
    assert!(Processor::new(host(), policies).is_ok());
    let most = SignalConfig {
        prekey_limit: custodian::signal::MAX_PREKEY_LIMIT,
        ..SignalConfig::default()
    };
    assert!(most.validate().is_ok());
}

/// The policies a processor starts with are in the audit trail before it
/// runs, named by revision and digest (so a restart under an older or
/// another table shows); a trail that cannot record them stops the start,
/// and a processor that does not start records none.
#[test]
fn the_policies_a_processor_starts_with_are_audited() {
    struct Refusing;
    impl AuditSink for Refusing {
        fn record(&self, _: &Decision) -> Result<(), AuditError> {
            Ok(())
        }
        fn record_hold(&self, _: &HoldEvent) -> Result<(), AuditError> {
            Ok(())
        }
        fn record_change(&self, _: &Change) -> Result<(), AuditError> {
            Err(AuditError::OutOfService)
        }
    }
    let audit = Arc::new(MemoryAuditSink::new());
    let older = VisibilityPolicy::published().to_builder(2).unwrap().build();
    let policies = Policies {
        visibility: older,
        ..Policies::default()
    };
    Processor::new(plain_host(audit.clone()), policies).unwrap();
    assert_eq!(
        audit.changes(),
        [Change::Start {
            at: Timestamp::from_millis(T0),
            revision: Revision::new(2).unwrap(),
            visibility: older.digest(),
            retention: Policies::default().retention.digest(),
        }]
    );
    assert_ne!(older.digest(), VisibilityPolicy::published().digest());

    match Processor::new(plain_host(Arc::new(Refusing)), Policies::default()) {
        Err(ProcessorError::Audit(AuditError::OutOfService)) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }

    // A processor that does not start leaves no start in the trail.
    let audit = Arc::new(MemoryAuditSink::new());
    let mut billing = custodian::integrity::BillingConfig::default();
    billing.period = Duration::from_millis(1_500);
    let invalid = Policies {
        billing,
        ..Policies::default()
    };
    match Processor::new(plain_host(audit.clone()), invalid) {
        Err(ProcessorError::Config(_)) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(audit.changes(), []);
}

/// The business and the network carrying its messages are different roles:
/// the business cannot hand in a consumer's message or a delivery or abuse
/// report (a forged sender, a forged delivery), and the network cannot send
/// as the business, read for it or configure it. Each refusal changes
/// nothing.
#[tokio::test]
async fn the_business_and_its_carrier_cannot_act_in_each_others_role() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 5);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.network.add_consumer(&number(1), 1).await;
    let sent = d.send(b, number(1), b"hello").await;
    let owner = d.owner(b).clone();
    let carrier = d.transport.clone();
    let before = (
        d.store.census().await.unwrap(),
        d.business.messages(),
        d.business.statuses(),
    );
    let unauthorized = |r: Result<(), ProcessorError>| {
        assert!(
            matches!(r, Err(ProcessorError::Unauthorized { .. })),
            "{r:?}"
        )
    };

    // The business, acting as the network (refused before the message is
    // even parsed).
    let forged = custodian::processor::Inbound {
        resend_of: None,
        from: number(2),
        device: 9,
        message: custodian::signal::Ciphertext {
            kind: custodian::signal::MessageKind::FirstContact,
            bytes: vec![0x33; 80],
        },
    };
    unauthorized(d.processor.receive(&owner, b, forged).await.map(drop));
    unauthorized(
        d.processor
            .status_update(&owner, b, sent, Status::Read)
            .await
            .map(drop),
    );
    unauthorized(
        d.processor
            .retry_receipt(&owner, b, sent, 0)
            .await
            .map(drop),
    );
    unauthorized(d.processor.report_spam(&owner, b, &number(1)).await);
    unauthorized(d.processor.report_block(&owner, b, &number(1)).await);

    // The network, acting as the business.
    let spoof = || Outbound {
        to: number(1),
        content: b"spoof".to_vec().into(),
        category: Category::Marketing,
    };
    unauthorized(d.processor.send(&carrier, b, spoof()).await.map(drop));
    unauthorized(
        d.processor
            .send_idempotent(&carrier, b, b"k", spoof())
            .await
            .map(drop),
    );
    unauthorized(
        d.processor
            .message_status(&carrier, b, sent)
            .await
            .map(drop),
    );
    unauthorized(d.processor.billing_statement(&carrier, b).await.map(drop));
    unauthorized(d.processor.publish_keys(&carrier, b).await);
    unauthorized(
        d.processor
            .trust_new_identity(
                &carrier,
                b,
                &number(1),
                0,
                ConsumerDevice::new(0).identity(),
            )
            .await
            .map(drop),
    );
    unauthorized(d.processor.opt_in(&carrier, b));
    unauthorized(d.processor.opt_out(&carrier, b));

    let after = (
        d.store.census().await.unwrap(),
        d.business.messages(),
        d.business.statuses(),
    );
    assert_eq!(before, after);
    // Each in its own role still gets through.
    assert!(d.processor.message_status(&owner, b, sent).await.is_ok());
    assert!(
        d.processor
            .report_spam(&carrier, b, &number(1))
            .await
            .is_ok()
    );
}

/// A message that can never be received is refused as permanent, so the
/// transport can drop it; a message that can be is not refused at all.
#[tokio::test]
async fn a_message_that_can_never_be_received_is_refused_as_permanent() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 6);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    let inbound = |kind, bytes: Vec<u8>| custodian::processor::Inbound {
        resend_of: None,
        from: number(1),
        device: 0,
        message: custodian::signal::Ciphertext { kind, bytes },
    };
    use custodian::signal::MessageKind::{FirstContact, FollowUp};
    for refused in [
        inbound(FirstContact, vec![0x33; 80]),
        inbound(FollowUp, vec![0x33; 80]),
        inbound(FollowUp, Vec::new()),
    ] {
        let e = d
            .processor
            .receive(&d.transport, b, refused)
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
    }
    assert_eq!(d.store.census().await.unwrap().messages, 0);
}

/// A business endpoint that takes `took` of the clock for every hand-over,
/// recording when each began; down while `up` is false.
struct SlowBusiness {
    clock: ManualClock,
    up: std::sync::atomic::AtomicBool,
    took: Duration,
    handed: std::sync::Mutex<Vec<(MessageId, Timestamp)>>,
}

#[async_trait::async_trait]
impl custodian::transport::BusinessSink for SlowBusiness {
    async fn deliver(
        &self,
        message: &custodian::transport::InboundMessage,
    ) -> Result<(), custodian::transport::SinkError> {
        if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(custodian::transport::SinkError("down".into()));
        }
        self.handed
            .lock()
            .unwrap()
            .push((message.id, self.clock.now()));
        self.clock.advance(self.took);
        Ok(())
    }

    async fn status(
        &self,
        _update: &custodian::transport::StatusUpdate,
    ) -> Result<(), custodian::transport::SinkError> {
        Ok(())
    }
}

/// `retransmit_due` decides whether each due message is still readable
/// when it takes the message up, not when the pass began: behind a slow
/// business endpoint, a message whose retention (shortened since it was
/// stored) ends during the pass is not handed over after its expiry. (The
/// pass's start time let it through, two hours late.)
#[tokio::test]
async fn a_due_message_is_not_handed_over_after_its_retention_ends() {
    use custodian::retention::RetentionPolicy;

    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let network = Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 5).unwrap());
    let sink = Arc::new(SlowBusiness {
        clock: clock.clone(),
        up: std::sync::atomic::AtomicBool::new(false),
        took: Duration::from_secs(2 * 3600),
        handed: std::sync::Mutex::new(Vec::new()),
    });
    let b = BusinessId::new(7).unwrap();
    let transport = Principal::new("transport");
    let operator = Principal::new("operator");
    let owner = Principal::new("owner");
    let authorizer = StaticAuthorizer::new()
        .operator(&operator)
        .grant(&owner, b)
        .carrier(&transport, b);
    let host = Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: network.clone(),
        business: sink.clone(),
        authorizer: Arc::new(authorizer),
        clock: Arc::new(clock.clone()),
        audit: Arc::new(MemoryAuditSink::new()),
    };
    let processor = Processor::new(host, Policies::default()).unwrap();
    processor.publish_keys(&owner, b).await.unwrap();
    network.add_consumer(&number(1), 1).await;
    network
        .consumer_sends(&number(1), 0, b, b"first")
        .await
        .unwrap();
    network
        .consumer_sends(&number(1), 0, b, b"second")
        .await
        .unwrap();
    network.pump(&processor, &transport).await;
    assert!(
        sink.handed.lock().unwrap().is_empty(),
        "the business is down"
    );

    // The business's retention is shortened to one day; its endpoint comes
    // back a minute before both messages' retention ends.
    let shorter = RetentionPolicy::from_toml("[business.7]\nretention = \"1d\"\n").unwrap();
    processor.set_retention_policy(&operator, shorter).unwrap();
    clock.advance(Duration::from_secs(24 * 3600 - 60));
    sink.up.store(true, std::sync::atomic::Ordering::SeqCst);
    processor.retransmit_due(&operator).await.unwrap();

    let expiry = Timestamp::from_millis(T0).saturating_add(Duration::from_secs(24 * 3600));
    let handed = sink.handed.lock().unwrap().clone();
    assert!(!handed.is_empty());
    for (id, at) in &handed {
        assert!(
            *at < expiry,
            "message {id} handed to the business at {at}, past its retention ({expiry})"
        );
    }
}

/// A device that lost its sessions (restored from a backup without them)
/// cannot decrypt the next message, sent on its old session, and its retry
/// receipt has the processor start a new one from its bundle, its identity
/// key the one trusted: the message goes again at once. (Nothing asked for
/// a new session: the business's messages reached no one, sent again every
/// receipt timeout for the whole retention period.)
#[tokio::test]
async fn a_device_that_lost_its_sessions_gets_the_message_again() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let (b, after) = d.sent_on_lost_sessions().await;
    let retried = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(retried.retry_receipts, 1, "{retried:?}");
    d.run(Duration::from_secs(60), Duration::from_secs(30))
        .await;
    d.assert_delivered(b, after).await;
    // And the next message goes over the new session, with no receipt.
    let next = d.send(b, number(1), b"it was delivered").await;
    let pumped = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(pumped.retry_receipts, 0);
    assert!(d.network.received(&number(1)).await[&0].contains_key(&next));
    assert_eq!(d.network.resent_after_delivery().await, 0);
}

/// A business endpoint that notes, for each inbound message handed over,
/// whether it said the device's identity key changed, then hands it on to
/// the simulated business.
struct NotingIdentity {
    inner: Arc<SimBusiness>,
    changed: std::sync::Mutex<Vec<(MessageId, bool)>>,
}

#[async_trait::async_trait]
impl BusinessSink for NotingIdentity {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        self.changed
            .lock()
            .unwrap()
            .push((message.id, message.identity_changed));
        self.inner.deliver(message).await
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        self.inner.status(update).await
    }
}

/// A consumer reinstalls (a new identity key on the same device). Its
/// retry receipt gets it no session from its bundle: a bundle, served by
/// the network, never replaces a trusted key, or the network could swap in
/// its own unreported. Once the consumer writes, its new key is taken
/// under the default policy and reported to the business, and the message
/// reaches the device over the new session. (The receipt's bundle was
/// taken, and nothing ever told the business the key changed.)
#[tokio::test]
async fn a_reinstalled_device_gets_its_messages_once_it_writes_and_the_change_is_reported() {
    let noted: Arc<std::sync::Mutex<Option<Arc<NotingIdentity>>>> = Arc::default();
    let slot = noted.clone();
    let d = Deployment::on_with_sink(
        Arc::new(MemoryStore::new()),
        &[7],
        Faults::none(),
        Faults::none(),
        9,
        IdentityPolicy::AcceptAndReport,
        move |business| {
            let sink = Arc::new(NotingIdentity {
                inner: business,
                changed: std::sync::Mutex::default(),
            });
            *slot.lock().unwrap() = Some(sink.clone());
            sink
        },
    );
    let sink = noted.lock().unwrap().clone().unwrap();
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.welcomed(b, &number(1)).await;
    // The consumer reinstalls: same number and device, a new identity key.
    d.network.add_consumer(&number(1), 1).await;
    let after = d.send(b, number(1), b"your order shipped").await;
    let pumped = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(pumped.retry_receipts, 1, "{pumped:?}");
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;
    let received = d.network.received(&number(1)).await;
    assert!(
        !received.get(&0).is_some_and(|r| r.contains_key(&after)),
        "sent on a key taken from a bundle"
    );
    // Its later receipts for the message (one per retransmission) fetch no
    // more bundles: each would cost the device a one-time prekey, and be
    // refused again.
    let calls = || async { d.network.fault_stats().await[&Leg::Call].events };
    let before_receipt = calls().await;
    assert_eq!(
        d.processor
            .retry_receipt(&d.transport, b, after, 0)
            .await
            .unwrap(),
        StatusChange::Ignored
    );
    assert_eq!(calls().await, before_receipt, "a bundle was fetched again");
    // The consumer writes: its new key is taken, and the business told.
    d.network
        .consumer_sends(&number(1), 0, b, b"new phone")
        .await
        .unwrap();
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;
    let changed = sink.changed.lock().unwrap().clone();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].1, "the business was not told the key changed");
    d.assert_delivered(b, after).await;
}

/// A copy of a retry receipt the network hands in (its receipts leg
/// duplicates and delays) after the message went again over the new
/// session is ignored: acting on it would replace that working session,
/// and leave the device pending, to be sent the message once more after
/// its delivery report. (It did both.)
#[tokio::test]
async fn a_copy_of_a_retry_receipt_is_ignored() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let (b, after) = d.sent_on_lost_sessions().await;
    let pumped = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(pumped.retry_receipts, 1, "{pumped:?}");
    assert_eq!(
        d.processor.retransmit_due(&d.operator).await.unwrap().sent,
        1
    );
    // The network's copy of the same retry receipt comes in late.
    assert_eq!(
        d.processor
            .retry_receipt(&d.transport, b, after, 0)
            .await
            .unwrap(),
        StatusChange::Ignored
    );
    let pumped = d.network.pump(&d.processor, &d.transport).await;
    assert_eq!(
        (pumped.receipts, pumped.retry_receipts),
        (1, 0),
        "{pumped:?}"
    );
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;
    assert_eq!(
        d.processor
            .message_status(d.owner(b), b, after)
            .await
            .unwrap(),
        (Status::Delivered, None)
    );
    assert_eq!(
        d.network.resent_after_delivery().await,
        0,
        "sent to the device again after its delivery report (copies it got: {:?})",
        d.network.received(&number(1)).await
    );
}

/// Under `IdentityPolicy::Refuse`, a retry receipt does not get a
/// reinstalled device's new identity trusted: the network cannot swap in
/// a key of its choosing by claiming a device could not decrypt. The
/// message reaches the device once its business trusts the new identity.
/// (A guard: under `Refuse` a bundle's new key was refused before too.)
#[tokio::test]
async fn a_retry_receipt_does_not_get_a_new_identity_trusted() {
    let d = Deployment::refusing_new_identities();
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.welcomed(b, &number(1)).await;
    d.network.add_consumer(&number(1), 1).await;
    let after = d.send(b, number(1), b"your order shipped").await;
    d.run(Duration::from_secs(600), Duration::from_secs(60))
        .await;
    let received = d.network.received(&number(1)).await;
    assert!(
        !received.get(&0).is_some_and(|r| r.contains_key(&after)),
        "sent to a new identity the policy refuses"
    );
    assert!(matches!(
        d.processor
            .message_status(d.owner(b), b, after)
            .await
            .unwrap(),
        (Status::Sent, None)
    ));
    // The consumer confirmed the new security code with the business.
    d.approve_network_key(b, &number(1), 0).await;
    // The message's next overdue resend (its waits for a report doubling:
    // sent again 2, 4 and 8 minutes after it was sent, then 16) goes over a
    // session from the newly trusted key.
    d.run(Duration::from_secs(600), Duration::from_secs(60))
        .await;
    d.assert_delivered(b, after).await;
}

/// A device's trusted key outlives a message received from it written
/// behind (its record's expiry raised in memory only), though a sweep
/// that deletes another consumer's state drops every cached one: the
/// stored copy, sealed with the older expiry, gives its trusted key until
/// its epoch ends. (It was taken for no state in the last stretch of the message's
/// life: a reinstalled device's new key went in on first use, under
/// `Refuse`, unreported.) (Review of Signal sessions.)
#[tokio::test]
async fn a_trusted_key_outlives_a_message_received_written_behind() {
    let d = Deployment::refusing_new_identities();
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.in_conversation(b, &number(2)).await;
    d.in_conversation(b, &number(1)).await;
    let keys = d.processor.keys(&d.operator).unwrap();
    let phone = keys.phone_hash(b, &number(1)).await.unwrap();
    let peer = PeerId { phone, device: 0 };
    let stored = d.store.peer(b, peer).await.unwrap();
    d.clock.advance(Duration::from_secs(60));
    let one = number(1);
    let again = d.network.consumer_sends(&one, 0, b, b"one more thing");
    again.await.unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    assert!(
        d.store.peer(b, peer).await.unwrap() == stored,
        "written behind"
    );
    // Past the stored copy's expiry (a minute before the last message's),
    // consumer 2's state is swept, and every cached one dropped with it.
    d.clock
        .advance(custodian::retention::CEILING - Duration::from_secs(30));
    let swept = d.processor.sweep(&d.operator).await.unwrap();
    assert!(swept.peers_deleted >= 1, "{swept:?}");
    // Consumer 1's device comes back with a new key: refused.
    d.network.add_consumer(&number(1), 1).await;
    let new_key = d.network.consumer_sends(&one, 0, b, b"new phone");
    new_key.await.unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    let texts: Vec<Vec<u8>> = d
        .business
        .contents()
        .into_iter()
        .map(|(_, _, c)| c)
        .collect();
    assert!(
        texts.contains(&b"one more thing".to_vec()) && !texts.contains(&b"new phone".to_vec()),
        "{texts:?}"
    );
}

/// While a legal hold covers a consumer, approving a changed identity key
/// is refused and changes nothing (its Signal record is kept for the case);
/// once the hold is released, the approval goes through. (The record,
/// session and trusted identity were deleted under the hold.) A hold on the
/// whole business refuses it even before any consumer is indexed (the
/// business has no phone-index key yet, and the approval would change
/// nothing; it answered `Ok(false)` without asking the holds: review of
/// key management).
#[tokio::test]
async fn approving_a_new_identity_is_refused_while_a_hold_covers_the_consumer() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let b = BusinessId::new(7).unwrap();
    let key = ConsumerDevice::new(0).identity();
    let scope = HoldScope::Business(b);
    let consumer = number(1);
    let approve = || {
        d.processor
            .trust_new_identity(d.owner(b), b, &consumer, 0, key)
    };
    let held = |answer: &Result<bool, ProcessorError>| {
        matches!(answer, Err(ProcessorError::Hold(HoldError::ConsumerHeld)))
    };
    d.processor
        .place_hold(&d.operator, scope, "case-0")
        .await
        .unwrap();
    let refused = approve().await;
    assert!(held(&refused), "before any key: {refused:?}");
    d.processor
        .release_hold(&d.operator, scope, "case-0")
        .await
        .unwrap();
    assert!(matches!(approve().await, Ok(false)));
    d.publish_all().await;
    d.welcomed(b, &number(1)).await;
    let phone = d
        .processor
        .keys(&d.operator)
        .unwrap()
        .phone_hash(b, &number(1))
        .await
        .unwrap();
    let peer = PeerId { phone, device: 0 };
    let record = d.store.peer(b, peer).await.unwrap();
    assert!(record.is_some());
    d.processor
        .place_hold(&d.operator, scope, "case-1")
        .await
        .unwrap();
    let refused = approve().await;
    assert!(held(&refused), "{refused:?}");
    assert_eq!(d.store.peer(b, peer).await.unwrap(), record);
    d.processor
        .release_hold(&d.operator, scope, "case-1")
        .await
        .unwrap();
    assert!(approve().await.unwrap());
    assert_ne!(d.store.peer(b, peer).await.unwrap(), record);
}

/// Early shreds and legal holds name the operator who made them in the
/// audit trail, as every other administrative change does. Before,
/// `Change::Shred` and `HoldEvent` had no field for it (only the case
/// reference): the trail could not say who destroyed a business's
/// messages early or lifted the hold that kept them.
#[tokio::test]
async fn shreds_and_holds_name_the_operator_in_the_audit_trail() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let b = BusinessId::new(7).unwrap();
    let epoch =
        custodian::keys::Epoch::containing(d.clock.now(), custodian::keys::EpochLength::DEFAULT)
            .unwrap();
    let scope = HoldScope::Business(b);
    d.processor
        .place_hold(&d.operator, scope, "case-1")
        .await
        .unwrap();
    d.processor
        .release_hold(&d.operator, scope, "case-1")
        .await
        .unwrap();
    d.processor
        .shred_epoch(&d.operator, b, epoch, "request-9")
        .await
        .unwrap();

    let events = d.audit.hold_events();
    let holds: Vec<(HoldAction, &str)> = events
        .iter()
        .map(|e| (e.action, e.principal.as_str()))
        .collect();
    assert_eq!(
        holds,
        [
            (HoldAction::Placed, "operator"),
            (HoldAction::Released, "operator")
        ]
    );
    let shreds: Vec<String> = d
        .audit
        .changes()
        .into_iter()
        .filter_map(|c| match c {
            Change::Shred { principal, .. } => Some(principal),
            _ => None,
        })
        .collect();
    assert_eq!(shreds, ["operator"]);
}

/// A legal hold keeps the epoch keys of what it covers from every checked
/// call an operator has: an early shred is refused, and the sweep past the
/// epoch's end keeps the key. Only the key manager's unchecked calls,
/// named so, destroy it. Before, `Processor::keys` handed operators
/// `KeyManager::destroy_ended_epochs`, which under a harmless name
/// destroyed the keys a hold keeps (and live epochs, given a `now` ahead
/// of the clock), with nothing in the audit trail.
#[tokio::test]
async fn only_the_unchecked_key_manager_calls_destroy_a_held_epoch_key() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let b = BusinessId::new(7).unwrap();
    d.network.add_consumer(&number(1), 1).await;
    d.publish_all().await;
    let id = d.send(b, number(1), b"evidence").await;
    let epoch = d.store.message(b, id).await.unwrap().unwrap().epoch;
    d.processor
        .place_hold(&d.operator, HoldScope::Business(b), "litigation-42")
        .await
        .unwrap();
    let refused = d.processor.shred_epoch(&d.operator, b, epoch, "oops").await;
    assert!(
        matches!(refused, Err(ProcessorError::Hold(HoldError::Held))),
        "{refused:?}"
    );

    d.clock
        .set(Timestamp::from_millis(epoch.end().as_millis() + 3_600_000));
    d.processor.sweep(&d.operator).await.unwrap();
    let keys = d.processor.keys(&d.operator).unwrap();
    assert!(keys.epoch_key(b, epoch).await.is_ok(), "the sweep took it");
    assert!(
        keys.destroy_ended_epochs_unchecked(d.clock.now())
            .await
            .unwrap()
            >= 1
    );
    assert!(keys.epoch_key(b, epoch).await.is_err());
}

/// `future`'s output, or `None` if it has not finished after `limit` of
/// wall-clock time (a std thread keeps the time: no tokio timer here).
async fn within<F: std::future::Future>(limit: Duration, future: F) -> Option<F::Output> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = tx.send(());
    });
    tokio::select! {
        output = future => Some(output),
        _ = rx => None,
    }
}

/// The simulated network, scripted: the next bundle request may send the
/// consumer another message from inside the call (a host calling back
/// in), sends to chosen devices fail for now, chosen devices are not
/// listed yet (linked later), a delivery report may come in from inside a
/// chosen device's send, and every send the network took is logged.
struct Scripted {
    network: Arc<SimNetwork>,
    processor: OnceLock<Weak<Processor>>,
    owner: Principal,
    carrier: Principal,
    /// The next bundle request sends the consumer a message first.
    armed: AtomicBool,
    /// Sends to these devices fail (unavailable).
    failing: Mutex<BTreeSet<u32>>,
    /// Devices of the consumer not listed yet.
    unlinked: Mutex<BTreeSet<u32>>,
    /// Before sending to this device, the transport hands in this report
    /// for the message (once).
    report_in_send: Mutex<Option<(u32, Status)>>,
    /// Whether a delivery report came in (from a send, or by the test).
    reported: AtomicBool,
    /// Every send the network took: message, device, and whether after a
    /// delivery report.
    sends: Mutex<Vec<(MessageId, u32, bool)>>,
    /// Bundle requests made, per device (review).
    bundles: Mutex<BTreeMap<u32, u32>>,
    /// Sends to these devices never finish (review).
    stalled: Mutex<BTreeSet<u32>>,
    /// The count of one-time prekeys left of these businesses never comes.
    hung_counts: Mutex<BTreeSet<BusinessId>>,
}

#[async_trait::async_trait]
impl Transport for Scripted {
    async fn devices(&self, b: BusinessId, c: &PhoneNumber) -> Result<Vec<u32>, TransportError> {
        let mut devices = self.network.devices(b, c).await?;
        let unlinked = self.unlinked.lock().unwrap();
        devices.retain(|d| !unlinked.contains(d));
        Ok(devices)
    }
    async fn fetch_bundle(
        &self,
        b: BusinessId,
        c: &PhoneNumber,
        device: u32,
    ) -> Result<PreKeyBundle, TransportError> {
        *self.bundles.lock().unwrap().entry(device).or_insert(0) += 1;
        if self.armed.swap(false, Ordering::SeqCst) {
            let processor = self.processor.get().unwrap().upgrade().unwrap();
            let message = Outbound {
                to: c.clone(),
                content: b"from inside the bundle request".to_vec().into(),
                category: Category::Service,
            };
            processor.send(&self.owner, b, message).await.unwrap();
        }
        self.network.fetch_bundle(b, c, device).await
    }
    async fn send(
        &self,
        b: BusinessId,
        c: &PhoneNumber,
        device: u32,
        m: &Outgoing,
    ) -> Result<(), TransportError> {
        let report = {
            let mut cue = self.report_in_send.lock().unwrap();
            match *cue {
                Some((d, _)) if d == device => cue.take().map(|(_, status)| status),
                _ => None,
            }
        };
        if let Some(status) = report {
            let processor = self.processor.get().unwrap().upgrade().unwrap();
            let _ = processor
                .status_update(&self.carrier, b, m.id, status)
                .await;
            self.reported.store(true, Ordering::SeqCst);
        }
        if self.failing.lock().unwrap().contains(&device) {
            return Err(TransportError::Unavailable("scripted".into()));
        }
        if self.stalled.lock().unwrap().contains(&device) {
            std::future::pending::<()>().await;
        }
        let after = self.reported.load(Ordering::SeqCst);
        self.sends.lock().unwrap().push((m.id, device, after));
        self.network.send(b, c, device, m).await
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
        self.network.publish_keys(b, k).await
    }
    async fn one_time_prekey_count(&self, b: BusinessId) -> Result<Option<usize>, TransportError> {
        if self.hung_counts.lock().unwrap().contains(&b) {
            std::future::pending::<()>().await;
        }
        self.network.one_time_prekey_count(b).await
    }
    async fn integrity_signals(&self, r: &IntegrityReport) -> Result<(), TransportError> {
        self.network.integrity_signals(r).await
    }
    async fn billing(&self, s: &BillingStatement) -> Result<(), TransportError> {
        self.network.billing(s).await
    }
}

/// A processor over `store` sending through a [`Scripted`] network (a
/// receipt timeout of two minutes), its keys published, for consumer
/// `number(1)` with `devices` devices; the retransmission loop is run by
/// hand.
struct ScriptedDeployment {
    clock: ManualClock,
    transport: Arc<Scripted>,
    business: Arc<SimBusiness>,
    processor: Arc<Processor>,
    b: BusinessId,
    owner: Principal,
    operator: Principal,
}

impl ScriptedDeployment {
    async fn on(store: Arc<dyn Storage>, devices: u32) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let b = BusinessId::new(7).unwrap();
        let owner = Principal::new("owner");
        let carrier = Principal::new("transport");
        let operator = Principal::new("operator");
        let authorizer = StaticAuthorizer::new()
            .operator(&operator)
            .grant(&owner, b)
            .grant(&owner, BusinessId::new(8).unwrap())
            .carrier(&carrier, b);
        let transport = Arc::new(Scripted {
            network: Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 3).unwrap()),
            processor: OnceLock::new(),
            owner: owner.clone(),
            carrier,
            armed: AtomicBool::new(false),
            failing: Mutex::default(),
            unlinked: Mutex::default(),
            report_in_send: Mutex::default(),
            reported: AtomicBool::new(false),
            sends: Mutex::default(),
            bundles: Mutex::default(),
            stalled: Mutex::default(),
            hung_counts: Mutex::default(),
        });
        let business = SimBusiness::new(clock.clone(), Faults::none(), 4).unwrap();
        let host = Host {
            storage: store,
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: transport.clone(),
            business: business.clone(),
            authorizer: Arc::new(authorizer),
            clock: Arc::new(clock.clone()),
            audit: Arc::new(MemoryAuditSink::new()),
        };
        let policies = Policies {
            delivery: DeliveryConfig {
                retry_base: Duration::from_secs(2),
                retry_max: Duration::from_secs(60),
                receipt_timeout: Duration::from_secs(120),
                batch: 1_000,
            },
            ..Policies::default()
        };
        let processor = Arc::new(Processor::new(host, policies).unwrap());
        transport.processor.set(Arc::downgrade(&processor)).unwrap();
        transport.network.add_consumer(&number(1), devices).await;
        processor.publish_keys(&owner, b).await.unwrap();
        Self {
            clock,
            transport,
            business,
            processor,
            b,
            owner,
            operator,
        }
    }

    async fn new(devices: u32) -> Self {
        Self::on(Arc::new(MemoryStore::new()), devices).await
    }

    /// The business sends `content` to `number(1)`; its id.
    async fn send(&self, content: &[u8]) -> MessageId {
        let message = Outbound {
            to: number(1),
            content: content.to_vec().into(),
            category: Category::Utility,
        };
        self.processor
            .send(&self.owner, self.b, message)
            .await
            .unwrap()
    }

    /// The consumer's delivery report of `id` comes in (sends from now on
    /// are logged as made after it).
    async fn report_delivered(&self, id: MessageId) {
        let carrier = &self.transport.carrier;
        self.processor
            .status_update(carrier, self.b, id, Status::Delivered)
            .await
            .unwrap();
        self.transport.reported.store(true, Ordering::SeqCst);
    }

    /// `secs` on, the retransmission loop runs once.
    async fn retransmit_after(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
        self.processor.retransmit_due(&self.operator).await.unwrap();
    }

    /// Each minute for `minutes`, the retransmission loop runs (the
    /// network is not pumped).
    async fn retransmit_each_minute(&self, minutes: u64) {
        for _ in 0..minutes {
            self.retransmit_after(60).await;
        }
    }

    /// Every `step` seconds for `secs`, the network is pumped and the
    /// retransmission loop run.
    async fn run(&self, secs: u64, step: u64) {
        for _ in 0..secs / step {
            let carrier = &self.transport.carrier;
            self.transport.network.pump(&self.processor, carrier).await;
            self.retransmit_after(step).await;
        }
    }

    async fn status(&self, id: MessageId) -> (Status, Option<FailureReason>) {
        let status = self.processor.message_status(&self.owner, self.b, id);
        status.await.unwrap()
    }

    /// The statuses the business was told of `id`, in order.
    fn told(&self, id: MessageId) -> Vec<Status> {
        self.business
            .statuses()
            .get(&id)
            .map(|s| s.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default()
    }

    /// Sends of `id` the network took, per device: all of them, and those
    /// after a delivery report.
    fn sends(&self, id: MessageId) -> (BTreeMap<u32, u32>, BTreeMap<u32, u32>) {
        let (mut all, mut after_report) = (BTreeMap::new(), BTreeMap::new());
        for &(m, d, after) in self.transport.sends.lock().unwrap().iter() {
            if m == id {
                *all.entry(d).or_insert(0) += 1;
                if after {
                    *after_report.entry(d).or_insert(0) += 1;
                }
            }
        }
        (all, after_report)
    }
}

/// A transport that sends the consumer another message from inside a
/// bundle request (a host calling back in) does not hang the send: the
/// inner send leaves the device to a later attempt rather than wait for
/// the start under way. (The outer send held a lock on the device across
/// the request, and the inner one waited for it forever.)
#[tokio::test]
async fn a_send_from_inside_a_bundle_request_finishes() {
    let d = ScriptedDeployment::new(1).await;
    d.transport.armed.store(true, Ordering::SeqCst);
    let Some(_id) = within(Duration::from_secs(20), d.send(b"hello")).await else {
        panic!("a send whose transport calls back into the processor never finished");
    };
}

/// A message sent to both devices of its consumer gets no delivery report
/// within the receipt timeout and is sent again to every device: device
/// 0's copy fails for now, and device 1's send brings in the consumer's
/// delivery report. No device is sent the message again after the report
/// (a report says the consumer has it; device 1's copy, which brought it,
/// is the last), and the business is told sent, then delivered, with no
/// wait. (The resend left device 0 pending, as if it had
/// never had the message: it was sent a third copy after the report, and
/// the business's report waited for it.)
#[tokio::test]
async fn a_report_during_an_overdue_resend_has_no_device_sent_the_message_again() {
    report_during_an_overdue_resend(ScriptedDeployment::new(2).await).await;
}

/// [`a_report_during_an_overdue_resend_has_no_device_sent_the_message_again`],
/// on SQLite.
#[tokio::test]
async fn a_report_during_an_overdue_resend_has_no_device_sent_the_message_again_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let config = custodian::store::SqliteConfig::default();
    let store = custodian::store::SqliteStore::open(dir.path().join("store.db"), config).unwrap();
    report_during_an_overdue_resend(ScriptedDeployment::on(Arc::new(store), 2).await).await;
}

async fn report_during_an_overdue_resend(d: ScriptedDeployment) {
    let id = d.send(b"your order shipped").await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 1), (1, 1)]));
    d.transport.failing.lock().unwrap().insert(0);
    *d.transport.report_in_send.lock().unwrap() = Some((1, Status::Delivered));
    d.retransmit_after(121).await;
    assert!(d.transport.reported.load(Ordering::SeqCst));
    assert_eq!(d.status(id).await, (Status::Delivered, None));
    assert_eq!(d.told(id), vec![Status::Sent, Status::Delivered]);
    // The network is back; the world goes on a while.
    d.transport.failing.lock().unwrap().clear();
    d.retransmit_each_minute(5).await;
    // Device 1's send is the one that brought the report.
    assert_eq!(
        d.sends(id).1,
        BTreeMap::from([(1, 1)]),
        "a device was sent the message again after the consumer's delivery report"
    );
    assert_eq!(d.told(id), vec![Status::Sent, Status::Delivered]);
}

/// The same without the interleaving: the overdue resend's copy to device
/// 0 fails for now, and the consumer's late delivery report comes in just
/// after that attempt. No device is sent the message after the report.
/// (The resend left device 0 pending, as if it had never had the message,
/// and the report kept it so: it was sent the message once more after the
/// report.)
#[tokio::test]
async fn a_report_after_an_overdue_resend_missed_a_device_has_it_sent_no_more() {
    let d = ScriptedDeployment::new(2).await;
    let id = d.send(b"your order shipped").await;
    d.transport.failing.lock().unwrap().insert(0);
    d.retransmit_after(121).await;
    d.transport.failing.lock().unwrap().clear();
    d.report_delivered(id).await;
    d.retransmit_each_minute(5).await;
    assert_eq!(
        d.sends(id).1,
        BTreeMap::new(),
        "sent again after the consumer's delivery report"
    );
    assert_eq!(d.told(id), vec![Status::Sent, Status::Delivered]);
}

/// A message to a consumer whose phone stays off (the network takes it,
/// no delivery report comes) waits longer for its report each time it is
/// sent again: a day holds a dozen copies, not one per receipt timeout,
/// the first resend still at the receipt timeout and the rest at 4, 8, 16…
/// minutes after the send, then every six hours, the longest wait (see
/// `DeliveryConfig::receipt_timeout`). (It was
/// sent again every receipt timeout for as long as it lived: 720 copies a
/// day here, some 21,600 over 30 days.)
#[tokio::test]
async fn an_unreported_message_waits_ever_longer_for_its_report() {
    let d = ScriptedDeployment::new(1).await;
    let id = d.send(b"are you there?").await;
    // The network is never pumped: no report comes.
    let mut at = Vec::new();
    for minute in 1..=24 * 60 {
        d.retransmit_after(60).await;
        if d.sends(id).0[&0] > at.len() as u32 + 1 {
            at.push(minute);
        }
    }
    assert_eq!(
        at[..at.len().min(12)],
        [2, 4, 8, 16, 32, 64, 128, 256, 512, 872, 1232],
        "minutes after the send it was sent again (of {} resends in all)",
        at.len()
    );
}

/// A device that lost its session asks for a message again (a retry
/// receipt) after another device of its consumer reported the message
/// delivered, and the send to it on its new session fails for now: the
/// receipt is refused for now, the network hands it in again, and the
/// device gets the message, its business told delivered once. (The one send was best effort: it was
/// never retried, and the receipt, answered applied, was not handed in
/// again.)
#[tokio::test]
async fn a_settled_messages_send_for_a_retry_receipt_is_retried_until_it_goes_out() {
    let d = ScriptedDeployment::new(2).await;
    let net = d.transport.network.clone();
    d.send(b"hi").await;
    d.run(180, 60).await;
    // Both devices answer: the business's sessions with them are acknowledged.
    for device in [0, 1] {
        net.consumer_sends(&number(1), device, d.b, b"thanks")
            .await
            .unwrap();
    }
    d.run(180, 60).await;
    net.lose_sessions(&number(1)).await;
    // Device 0 reports the next message delivered (from inside the
    // transport's send), device 1 cannot decrypt it.
    *d.transport.report_in_send.lock().unwrap() = Some((0, Status::Delivered));
    let again = d.send(b"again").await;
    assert_eq!(d.status(again).await, (Status::Delivered, None));
    // The devices' retry receipts come in while sends to device 1 fail.
    d.transport.failing.lock().unwrap().insert(1);
    let pumped = net.pump(&d.processor, &d.transport.carrier).await;
    assert!(pumped.retry_receipts >= 1, "{pumped:?}");
    d.transport.failing.lock().unwrap().clear();
    // The network is fine from here on, for an hour.
    d.run(3600, 60).await;
    let received = net.received(&number(1)).await;
    assert!(
        received.get(&1).is_some_and(|got| got.contains_key(&again)),
        "device 1 never got the message its business was told delivered: {received:?}"
    );
    // The report came before the send's own record: delivered is all it
    // was told.
    assert_eq!(d.told(again), vec![Status::Delivered]);
}

/// A retry receipt on a message another device reported delivered, whose
/// send to the receipt's device keeps failing for now, is refused each
/// time the network hands it in, and fetches one bundle in all: its copies
/// go over the session the first started. (Each copy handed in after the
/// receipt timeout fetched a bundle, a one-time prekey of the device, and
/// replaced the session again.)
#[tokio::test]
async fn a_refused_retry_receipt_fetches_one_bundle_however_often_it_is_handed_in() {
    let d = ScriptedDeployment::new(2).await;
    let id = d.send(b"your order shipped").await;
    d.report_delivered(id).await;
    assert_eq!(d.status(id).await, (Status::Delivered, None));
    let carrier = &d.transport.carrier;
    // Device 1 lost its session and asks again; sends to it fail for now
    // (its phone is off), for a while. The network hands the receipt in
    // again every so often (here every receipt timeout and a second).
    d.transport.failing.lock().unwrap().insert(1);
    let before = d
        .transport
        .bundles
        .lock()
        .unwrap()
        .get(&1)
        .copied()
        .unwrap_or(0);
    let mut refused = 0;
    for _ in 0..10 {
        if d.processor
            .retry_receipt(carrier, d.b, id, 1)
            .await
            .is_err()
        {
            refused += 1;
        }
        d.clock.advance(Duration::from_secs(121));
    }
    let fetched = d
        .transport
        .bundles
        .lock()
        .unwrap()
        .get(&1)
        .copied()
        .unwrap_or(0)
        - before;
    assert_eq!(
        refused, 10,
        "the receipt is refused while the device cannot be sent to"
    );
    assert!(
        fetched <= 1,
        "one retry receipt, handed in again {refused} times, fetched {fetched} bundles \
         (one-time prekeys) of device 1"
    );
}

/// A message whose first send reaches one device at once and the other
/// only after an hour of retries is sent again to every device on the
/// receipt timeout's schedule meanwhile (after 2, 4, 8, 16 and 32
/// minutes: no report comes), and once every device has it waits at least
/// the receipt timeout for its report, then until that schedule's next
/// resend. (It waited as long as it had lived, an hour: every attempt on a
/// message no longer queued was taken for an overdue resend. Then the
/// device left pending held back every resend to the other: review.)
#[tokio::test]
async fn a_first_send_finished_by_retries_waits_the_receipt_timeout() {
    let d = ScriptedDeployment::new(2).await;
    d.transport.failing.lock().unwrap().insert(1);
    let id = d.send(b"your order shipped").await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 1)]));
    // Device 1 is retried for an hour (its sends failing), then reached.
    d.retransmit_each_minute(60).await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 6)]));
    d.transport.failing.lock().unwrap().clear();
    d.retransmit_after(60).await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 6), (1, 1)]));
    // No report comes: the receipt timeout (two minutes) is past at 63
    // minutes, the schedule's next resend due at 64.
    d.retransmit_each_minute(2).await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 6), (1, 1)]));
    d.retransmit_each_minute(1).await;
    assert_eq!(
        d.sends(id).0,
        BTreeMap::from([(0, 7), (1, 2)]),
        "the resend due 64 minutes after the first send"
    );
}

/// An overdue resend dropped after it reached device 0 but before device 1
/// (its caller gone, the send to device 1 never returning) leaves no
/// device pending: the consumer's report then has no device sent the
/// message again. (Device 1, which had it from the first send, was left
/// pending, and sent it again after the report.)
#[tokio::test]
async fn a_dropped_overdue_resend_has_no_device_sent_the_message_after_the_report() {
    let d = ScriptedDeployment::new(2).await;
    let id = d.send(b"your order shipped").await;
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 1), (1, 1)]));
    // The overdue resend reaches device 0, then hangs on device 1, and its
    // caller gives up on it.
    d.transport.stalled.lock().unwrap().insert(1);
    d.clock.advance(Duration::from_secs(121));
    let resend = d.processor.retransmit_due(&d.operator);
    assert!(within(Duration::from_secs(2), resend).await.is_none());
    d.transport.stalled.lock().unwrap().clear();
    assert_eq!(d.sends(id).0, BTreeMap::from([(0, 2), (1, 1)]));
    // The consumer's report comes in.
    d.report_delivered(id).await;
    d.retransmit_each_minute(5).await;
    assert_eq!(
        d.sends(id).1,
        BTreeMap::new(),
        "a device that had the message was sent it again after the consumer's report"
    );
}

/// Approving a key for a device with no Signal state (a consumer the
/// business never knew) changes nothing and answers `false`: the device's
/// first key is trusted on first use anyway. (It stored a record for the
/// consumer, its phone hash with no message, and answered `true`.)
#[tokio::test]
async fn approving_a_key_for_a_device_with_no_state_changes_nothing() {
    let d = Deployment::new(&[7], Faults::none(), Faults::none(), 9);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    let stranger = number(9);
    let approved = d
        .processor
        .trust_new_identity(
            d.owner(b),
            b,
            &stranger,
            0,
            ConsumerDevice::new(0).identity(),
        )
        .await
        .unwrap();
    assert!(!approved);
    let phone = d
        .processor
        .keys(&d.operator)
        .unwrap()
        .phone_hash(b, &stranger)
        .await
        .unwrap();
    assert!(d.store.peer_devices(b, phone).await.unwrap().is_empty());
}

/// A device whose retry receipt was ignored because the bundle had a new
/// key gets the message once that key is trusted: approved by the
/// business (under `IdentityPolicy::Refuse`), or taken from the device's
/// own message (under `AcceptAndReport`), either of which lets its
/// receipts in again. (They stayed ignored for the message's life, so a
/// delivered message, with no retransmission left, never reached the
/// reinstalled device; under `AcceptAndReport` until the review of Signal
/// sessions.)
#[tokio::test]
async fn a_new_key_once_trusted_lets_the_devices_retry_receipts_in_again() {
    for refuse in [true, false] {
        let d = if refuse {
            Deployment::refusing_new_identities()
        } else {
            Deployment::new(&[7], Faults::none(), Faults::none(), 9)
        };
        let b = BusinessId::new(7).unwrap();
        d.publish_all().await;
        d.network.add_consumer(&number(1), 1).await;
        let id = d.send(b, number(1), b"your order shipped").await;
        d.run(Duration::from_secs(300), Duration::from_secs(60))
            .await;
        d.assert_delivered(b, id).await;
        // The consumer reinstalls; its device asks for the message again,
        // and the bundle the network serves has the new key: refused.
        d.network.add_consumer(&number(1), 1).await;
        let refused = d.processor.retry_receipt(&d.transport, b, id, 0).await;
        assert!(matches!(refused, Ok(StatusChange::Ignored)), "{refused:?}");
        if refuse {
            d.approve_network_key(b, &number(1), 0).await;
        } else {
            let one = number(1);
            let hi = d.network.consumer_sends(&one, 0, b, b"hi again");
            hi.await.unwrap();
            d.network.pump(&d.processor, &d.transport).await;
        }
        d.clock.advance(Duration::from_secs(600));
        let again = d.processor.retry_receipt(&d.transport, b, id, 0).await;
        assert!(
            matches!(again, Ok(StatusChange::Applied)),
            "refuse {refuse}: {again:?}"
        );
        d.run(Duration::from_secs(60), Duration::from_secs(60))
            .await;
        d.assert_delivered(b, id).await;
    }
}

/// An unnamed principal is refused in every role, though the host's
/// authorizer grants it all three: the audit trail names who asked, and
/// reads a trail written before it named anyone as the empty name, so an
/// empty name would pass for none. Before, it was let in.
#[tokio::test]
async fn an_unnamed_principal_is_refused_in_every_role() {
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let b = BusinessId::new(7).unwrap();
    let unnamed = Principal::new("");
    let host = Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap()),
        business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
        authorizer: Arc::new(
            StaticAuthorizer::new()
                .grant(&unnamed, b)
                .carrier(&unnamed, b)
                .operator(&unnamed),
        ),
        clock: Arc::new(clock.clone()),
        audit: Arc::new(MemoryAuditSink::new()),
    };
    let processor = Processor::new(host, Policies::default()).unwrap();
    let refused = |r: Result<(), ProcessorError>| {
        assert!(
            matches!(&r, Err(ProcessorError::Unauthorized { principal }) if principal.name().is_empty()),
            "{r:?}"
        );
    };
    refused(processor.publish_keys(&unnamed, b).await);
    refused(processor.report_spam(&unnamed, b, &number(1)).await);
    refused(processor.sweep(&unnamed).await.map(drop));
    refused(processor.census(&unnamed).await.map(drop));
}

/// A period is lengthened only once a sweep has applied the policy in
/// force, so that it gives back nothing a shortening ended: a consumer's
/// message waiting for its business's endpoint (down), past a one-day
/// retention, is not handed over when the endpoint returns, and one
/// received after the lengthening is kept for the longer period.
#[tokio::test]
async fn content_a_shortened_retention_ended_is_not_handed_over_once_the_period_is_lengthened() {
    use custodian::retention::{PolicyChangeError, RetentionPolicy};

    const DAY: Duration = Duration::from_secs(24 * 3600);
    let down = Faults::none().with_outage(Timestamp::from_millis(T0), 3 * DAY);
    let d = Deployment::new(&[7], Faults::none(), down, 12);
    let b = BusinessId::new(7).unwrap();
    d.publish_all().await;
    d.network.add_consumer(&number(1), 1).await;
    d.network
        .consumer_sends(&number(1), 0, b, b"private")
        .await
        .unwrap();
    d.network.pump(&d.processor, &d.transport).await;
    let one_day = RetentionPolicy::from_toml("[business.7]\nretention = \"1d\"\n").unwrap();
    d.processor
        .set_retention_policy(&d.operator, one_day)
        .unwrap();
    d.clock.advance(2 * DAY);
    let lengthen = || {
        d.processor
            .set_retention_policy(&d.operator, RetentionPolicy::default())
    };
    let refused = lengthen();
    assert!(
        matches!(
            refused,
            Err(ProcessorError::RetentionPolicy(
                PolicyChangeError::Unapplied
            ))
        ),
        "{refused:?}"
    );
    assert!(d.processor.sweep(&d.operator).await.unwrap().complete);
    lengthen().unwrap();
    d.clock.advance(DAY + Duration::from_secs(60));
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;
    assert!(d.business.messages().is_empty(), "handed over");
    assert_eq!(d.processor.census(&d.operator).await.unwrap().messages, 0);
    // (The sweep forgot consumer 1's session: a new consumer writes.)
    d.network.add_consumer(&number(2), 1).await;
    d.network
        .consumer_sends(&number(2), 0, b, b"after")
        .await
        .unwrap();
    d.clock.advance(2 * DAY);
    d.run(Duration::from_secs(300), Duration::from_secs(60))
        .await;
    assert_eq!(d.business.messages().len(), 1);
}

/// A publication hung in a transport call (the count of keys left) holds
/// up no other business's, while the business's own next publication
/// waits its turn. (Publications took turns by a lock other businesses
/// shared by hash: a hung call held theirs up too.)
#[tokio::test]
async fn a_hung_publication_holds_up_no_other_business() {
    let d = ScriptedDeployment::new(1).await;
    d.transport.hung_counts.lock().unwrap().insert(d.b);
    let mut hung = Box::pin(d.processor.publish_keys(&d.owner, d.b));
    // Polled first: it takes its turn, and waits in the count.
    let first =
        std::future::poll_fn(|cx| std::task::Poll::Ready(hung.as_mut().poll(cx).is_pending()));
    assert!(first.await);
    let other = BusinessId::new(8).unwrap();
    let later = async {
        let other = d.processor.publish_keys(&d.owner, other).await;
        let again = within(
            Duration::from_millis(300),
            d.processor.publish_keys(&d.owner, d.b),
        );
        (other, again.await)
    };
    let (other, again) = tokio::select! {
        _ = &mut hung => panic!("the hung publication ended"),
        done = within(Duration::from_secs(30), later) => done.expect("held up"),
    };
    assert!(other.is_ok(), "{other:?}");
    assert!(again.is_none(), "the hung business published twice at once");
}
