//! Decisions racing changes: a release being decided while a policy is put
//! in force or a business opts out, and legal-hold changes that fail
//! half-way; and the two releases of an inbound hand-over, decided
//! together.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

#[path = "common/seams.rs"]
mod seams;

use custodian::ids::BusinessId;
use custodian::keys::{KeyManager, LocalKeyProvider, SecretKey};
use custodian::retention::{Retention, RetentionPolicy};
use custodian::store::{HoldScope, MemoryStore};
use custodian::time::{ManualClock, Timestamp};
use custodian::visibility::{
    AuditError, AuditSink, Change, DataClass, Decision, Gate, HoldEvent, Labelled, MemoryAuditSink,
    Party, Purpose, VisibilityPolicy,
};

/// An audit sink that records in memory and, when armed, holds the next
/// decision's `record` call until the test lets it go (a slow disk, a
/// sink that hands off to a queue and waits).
struct PausingSink {
    inner: MemoryAuditSink,
    armed: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    /// Decisions and changes, in the order the trail got them.
    order: Mutex<Vec<String>>,
}

impl PausingSink {
    /// Arms the sink: returns (entered, go): `entered` fires when a decision
    /// reaches `record`; sending on `go` lets it finish.
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = channel();
        let (go_tx, go_rx) = channel();
        *self.armed.lock().unwrap() = Some((entered_tx, go_rx));
        (entered_rx, go_tx)
    }
}

impl AuditSink for PausingSink {
    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        let armed = self.armed.lock().unwrap().take();
        if let Some((entered, go)) = armed {
            entered.send(()).unwrap();
            go.recv().unwrap();
        }
        self.order
            .lock()
            .unwrap()
            .push(format!("{:?} {:?}", decision.verdict, decision.purpose));
        self.inner.record(decision)
    }

    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        self.inner.record_hold(event)
    }

    fn record_change(&self, change: &Change) -> Result<(), AuditError> {
        self.order.lock().unwrap().push("change".to_owned());
        self.inner.record_change(change)
    }
}

/// Wait up to 200 ms for `thread` to finish: whether it did.
fn finishes<T>(thread: &std::thread::ScopedJoinHandle<'_, T>) -> bool {
    for _ in 0..20 {
        if thread.is_finished() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

fn pausing_gate(policy: VisibilityPolicy) -> (Arc<PausingSink>, Gate) {
    let sink = Arc::new(PausingSink {
        inner: MemoryAuditSink::new(),
        armed: Mutex::new(None),
        order: Mutex::new(Vec::new()),
    });
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_000)));
    let gate = Gate::new(policy, sink.clone(), clock);
    (sink, gate)
}

/// A business's opt-out, made while a release of its content to an opt-in
/// service is being recorded, waits for that decision: the trail has the
/// release, then the opt-out, and nothing is released for the service
/// after it. (The opt-out was recorded and returned while the release,
/// checked before it, went on and handed the content over after it.)
#[test]
fn an_opt_out_waits_for_a_release_being_decided() {
    let business = BusinessId::new(9).unwrap();
    let mut b = VisibilityPolicy::published().to_builder(2).unwrap();
    b.allow(
        Party::Processor,
        DataClass::MessageContent,
        Purpose::OptInService,
    )
    .unwrap();
    let (sink, gate) = pausing_gate(b.build());
    gate.set_opted_in(business, true, "owner").unwrap();

    let (entered, go) = sink.arm();
    std::thread::scope(|s| {
        let releasing = s.spawn(|| {
            gate.release(
                Labelled::of_business(DataClass::MessageContent, business, "secret text"),
                Party::Processor,
                Purpose::OptInService,
            )
            .is_ok()
        });
        // The release has made its checks and is recording its decision.
        entered.recv().unwrap();
        // The business opts out meanwhile: the change waits for the decision.
        let opting_out = s.spawn(|| gate.set_opted_in(business, false, "owner"));
        assert!(
            !finishes(&opting_out),
            "the opt-out was recorded while a release it governs was being decided"
        );
        go.send(()).unwrap();
        assert!(releasing.join().unwrap());
        opting_out.join().unwrap().unwrap();
        assert_eq!(
            *sink.order.lock().unwrap(),
            ["change", "Allow OptInService", "change"],
            "the trail: opt-in, the release, then the opt-out"
        );
        // After the opt-out, nothing more goes to the service.
        assert!(
            gate.release(
                Labelled::of_business(DataClass::MessageContent, business, "later"),
                Party::Processor,
                Purpose::OptInService,
            )
            .is_err()
        );
    });
}

/// A policy put in force while a release it forbids is being recorded
/// waits for that decision (made under the policy before): the trail has
/// the release, then the new policy, and nothing it forbids after it. (The
/// new policy was recorded and returned first, and the release then
/// handed the content over.)
#[test]
fn a_policy_put_in_force_waits_for_a_release_being_decided() {
    let business = BusinessId::new(9).unwrap();
    let v2 = VisibilityPolicy::published().to_builder(2).unwrap().build();
    let (sink, gate) = pausing_gate(v2);

    let (entered, go) = sink.arm();
    std::thread::scope(|s| {
        let releasing = s.spawn(|| {
            gate.release(
                Labelled::of_business(DataClass::MessageContent, business, "secret text"),
                Party::Business,
                Purpose::Delivery,
            )
            .is_ok()
        });
        entered.recv().unwrap();
        // Deny-all, revision 3, put in force meanwhile: it waits for the
        // decision made under revision 2.
        let replacing = s.spawn(|| {
            let v3 = VisibilityPolicy::builder(3).unwrap().build();
            gate.replace_policy(v3, "operator")
        });
        assert!(
            !finishes(&replacing),
            "a policy was put in force while a release it governs was being decided"
        );
        go.send(()).unwrap();
        assert!(releasing.join().unwrap());
        replacing.join().unwrap().unwrap();
        assert_eq!(*sink.order.lock().unwrap(), ["Allow Delivery", "change"]);
        assert!(
            gate.release(
                Labelled::of_business(DataClass::MessageContent, business, "later"),
                Party::Business,
                Purpose::Delivery,
            )
            .is_err()
        );
    });
}

/// An audit sink whose `record_hold` calls fail once `allowed` of them
/// have been recorded (a disk that fills between two events).
struct HoldsFailAfter {
    inner: MemoryAuditSink,
    allowed: Mutex<Option<usize>>,
}

impl AuditSink for HoldsFailAfter {
    fn record(&self, decision: &Decision) -> Result<(), AuditError> {
        self.inner.record(decision)
    }

    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        let mut allowed = self.allowed.lock().unwrap();
        match allowed.as_mut() {
            Some(0) => return Err(AuditError::OutOfService),
            Some(n) => *n -= 1,
            None => {}
        }
        self.inner.record_hold(event)
    }

    fn record_change(&self, change: &Change) -> Result<(), AuditError> {
        self.inner.record_change(change)
    }
}

/// Retention over a store whose calls can be failed (`faults`) and an
/// audit trail whose hold events can be failed (`audit.allowed`).
fn failing_holds() -> (Arc<seams::HostFaults>, Arc<HoldsFailAfter>, Retention) {
    let faults = Arc::new(seams::HostFaults::default());
    let store = Arc::new(seams::FailingStore::paused(
        Arc::new(MemoryStore::new()),
        faults.clone(),
    ));
    let keys = Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        store.clone(),
    ));
    let audit = Arc::new(HoldsFailAfter {
        inner: MemoryAuditSink::new(),
        allowed: Mutex::new(None),
    });
    let retention = Retention::new(store, keys, RetentionPolicy::default(), audit.clone());
    (faults, audit, retention)
}

/// A hold whose store write fails, and whose undo the audit trail cannot
/// record, stands, as the trail says (it says placed): a failed hold change
/// errs on keeping the hold. (The docs said no hold stands.)
#[test]
fn a_failed_hold_placing_whose_undo_is_unaudited_keeps_the_hold() {
    use seams::{Seams, Strike};
    seams::runtime().block_on(async {
        let (faults, audit, retention) = failing_holds();
        let now = Timestamp::from_millis(seams::T0);
        // Count the store calls of one place_hold (which succeeds).
        faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
        let other = HoldScope::Business(BusinessId::new(8).unwrap());
        retention
            .place_hold("operator", other, "count", now)
            .await
            .unwrap();
        let calls = faults.calls();
        let commit = calls.iter().position(|c| *c == "commit").unwrap() + 1;
        // The same call again: its store write fails (nothing applied), and
        // the audit takes the `placed` event but not the undo.
        let scope = HoldScope::Business(BusinessId::new(7).unwrap());
        faults.fail_at(commit, Seams::Store, Strike::Before);
        *audit.allowed.lock().unwrap() = Some(1);
        let placed = retention.place_hold("operator", scope, "case-1", now).await;
        assert!(placed.is_err(), "{placed:?}");
        faults.lift();
        let holds = retention.holds().await.unwrap();
        assert!(
            holds.iter().any(|h| h.scope == scope),
            "the hold is gone though the trail says placed: {holds:?}; audit: {:?}",
            audit.inner.hold_events()
        );
    });
}

/// A hold release whose store write fails keeps the hold, even when the
/// audit trail cannot record the undo: the call fails, and nothing under
/// the hold is deleted. (The store was made to agree with the trail, which
/// said released: the hold was gone, and the sweep deleted what it held.)
#[test]
fn a_failed_hold_release_keeps_the_hold_even_unaudited() {
    use seams::{Seams, Strike};
    seams::runtime().block_on(async {
        let (faults, audit, retention) = failing_holds();
        let now = Timestamp::from_millis(seams::T0);
        let other = HoldScope::Business(BusinessId::new(8).unwrap());
        let scope = HoldScope::Business(BusinessId::new(7).unwrap());
        retention
            .place_hold("operator", other, "count", now)
            .await
            .unwrap();
        retention
            .place_hold("operator", scope, "case-1", now)
            .await
            .unwrap();
        // Count the store calls of one release_hold (which succeeds).
        faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
        assert!(
            retention
                .release_hold("operator", other, "count", now)
                .await
                .unwrap()
        );
        let calls = faults.calls();
        let commit = calls.iter().position(|c| *c == "commit").unwrap() + 1;
        // The same call again: its store write fails (nothing applied), and
        // the audit takes the `released` event but not the undo.
        faults.fail_at(commit, Seams::Store, Strike::Before);
        *audit.allowed.lock().unwrap() = Some(1);
        let released = retention
            .release_hold("operator", scope, "case-1", now)
            .await;
        assert!(released.is_err(), "{released:?}");
        faults.lift();
        let holds = retention.holds().await.unwrap();
        assert!(
            holds.iter().any(|h| h.scope == scope),
            "the store failed the release's write (release_hold returned {released:?}), \
             yet the hold is gone: {holds:?}; audit: {:?}",
            audit.inner.hold_events()
        );
    });
}

/// A message's content and its sender's number go to the business
/// together or not at all: under a policy that withholds the number, the
/// trail records the number's denial and no release of the content.
/// Before, the content was released (an `Allow` recorded) before the
/// number was asked for, and each retry of the refused hand-over, for as
/// long as the policy stood, recorded another content release that never
/// happened.
#[tokio::test]
async fn a_hand_over_the_policy_refuses_for_the_number_records_no_content_release() {
    let d = seams::Deployment::new(Faults::none(), Faults::none()).await;
    // The operator withholds consumers' numbers from businesses.
    use custodian::testing::Faults;
    use custodian::visibility::{DataClass, Party, Purpose, Verdict, VisibilityPolicy};
    let policy = VisibilityPolicy::default()
        .to_builder(1)
        .unwrap()
        .deny(
            Party::Business,
            DataClass::ConsumerPhoneNumber,
            Purpose::Delivery,
        )
        .build();
    d.processor
        .set_visibility_policy(&d.operator, policy)
        .unwrap();
    let before = d.audit.events().len();

    let mut device = d.handset().await;
    let inbound = d.inbound(&mut device, b"secret").await;
    let receipt = d.receive(inbound).await.unwrap();
    assert!(!receipt.delivered, "{receipt:?}");
    assert!(d.business.messages().is_empty(), "nothing was handed over");

    let content_released: Vec<_> = d.audit.events()[before..]
        .iter()
        .filter(|e| {
            e.class == DataClass::MessageContent
                && e.party == Party::Business
                && e.verdict == Verdict::Allow
        })
        .copied()
        .collect();
    assert!(
        content_released.is_empty(),
        "the trail records the content released to the business, which never got it: \
         {content_released:?}"
    );
}

/// A policy put in force while a send's attempt waits on the network
/// decides the attempt's later calls: the operator withholds consumers'
/// numbers from the network once the first device's bundle is fetched,
/// and the number goes out for no call after (no send to that device, no
/// bundle for the second), the refusal recorded under the new table.
/// Before, the number released when the attempt began was used for every
/// device of the consumer, under the table the trail said was replaced.
/// (Review of the visibility policy.)
#[tokio::test]
async fn a_number_withheld_mid_attempt_goes_to_the_network_no_more() {
    use custodian::testing::Faults;
    use custodian::visibility::{Verdict, VisibilityPolicy};
    let d = seams::Deployment::new(Faults::none(), Faults::none()).await;
    d.network.add_consumer(&d.outbound(b"").to, 2).await;
    let mut withheld = Some(
        VisibilityPolicy::default()
            .to_builder(1)
            .unwrap()
            .deny(
                Party::Transport,
                DataClass::ConsumerPhoneNumber,
                Purpose::Delivery,
            )
            .build(),
    );
    let send = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"your order shipped"));
    let mut send = std::pin::pin!(send);
    std::future::poll_fn(|cx| {
        let polled = send.as_mut().poll(cx);
        if d.transport.bundles_fetched() == 1
            && let Some(policy) = withheld.take()
        {
            d.processor
                .set_visibility_policy(&d.operator, policy)
                .unwrap();
        }
        polled
    })
    .await
    .unwrap();
    assert!(withheld.is_none(), "the first device's bundle was fetched");
    assert_eq!(d.transport.bundles_fetched(), 1, "a bundle fetched after");
    let received = d.network.received(&d.outbound(b"").to).await;
    assert!(received.values().all(BTreeMap::is_empty), "{received:?}");
    let refused = d.audit.events().into_iter().any(|e| {
        e.revision.get() == 1
            && e.party == Party::Transport
            && e.class == DataClass::ConsumerPhoneNumber
            && e.verdict != Verdict::Allow
    });
    assert!(refused, "the refusal under the new table is recorded");
}
