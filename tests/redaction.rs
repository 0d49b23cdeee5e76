//! What the crate's own `tracing` events and spans record, and what its
//! types print: no consumer (number, keyed hash or a prefix of one) and no
//! content. (tests/logs.rs watches the `log` facade, which the crate's
//! `tracing` events never reach: `tracing` is built without its `log`
//! feature.)
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custodian::ids::{BusinessId, PhoneNumber};
use custodian::integrity::Category;
use custodian::processor::{DeliveryConfig, Outbound, Policies};
use custodian::store::{HoldScope, MemoryStore, PeerId, Storage};
use custodian::testing::{ConsumerDevice, Faults, World};
use custodian::time::Timestamp;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const T0: u64 = 1_767_225_600_000;

/// A `tracing` subscriber that keeps every event and every span's fields,
/// at every level, as text: what any host subscriber could be handed.
#[derive(Default)]
struct Capture {
    lines: Mutex<Vec<String>>,
    next: AtomicU64,
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl Capture {
    fn keep(&self, kind: &str, meta: &Metadata<'_>, visit: impl FnOnce(&mut Fields<'_>)) {
        let mut line = format!("{kind} {} {} {}:", meta.level(), meta.target(), meta.name());
        visit(&mut Fields(&mut line));
        self.lines.lock().unwrap().push(line);
    }
}

/// The subscriber handed to `tracing`: the capture, shared with the test.
struct Sub(Arc<Capture>);

impl Subscriber for Sub {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.0.keep("span", span.metadata(), |f| span.record(f));
        Id::from_u64(self.0.next.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = String::from("span-record:");
        values.record(&mut Fields(&mut line));
        self.0.lines.lock().unwrap().push(line);
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        self.0.keep("event", event.metadata(), |f| event.record(f));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

fn business() -> BusinessId {
    BusinessId::new(7).unwrap()
}

fn number(i: usize) -> PhoneNumber {
    format!("+4477009{i:05}").parse().unwrap()
}

fn world(network_faults: Faults, sink_faults: Faults) -> World {
    world_on(Arc::new(MemoryStore::new()), network_faults, sink_faults)
}

fn world_on(store: Arc<MemoryStore>, network_faults: Faults, sink_faults: Faults) -> World {
    let policies = Policies {
        delivery: DeliveryConfig {
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            receipt_timeout: Duration::from_secs(120),
            batch: 10_000,
        },
        ..Policies::default()
    };
    World::builder()
        .business(business())
        .network_faults(network_faults)
        .business_faults(sink_faults)
        .seed(11)
        .start(Timestamp::from_millis(T0))
        .storage(store)
        .policies(policies)
        .build()
        .unwrap()
}

/// Every spelling of a consumer a log line must not carry: the number's
/// last six digits (long enough not to turn up in a random hex id), the
/// keyed hash in full or by a 4-byte prefix (its `Debug` once printed one).
fn consumer_needles(number: &PhoneNumber, hash: &[u8; 16]) -> Vec<String> {
    let digits = number.digits();
    vec![
        digits[digits.len() - 6..].to_owned(),
        hex::encode(hash),
        hex::encode(&hash[..4]),
    ]
}

/// The crate's own `tracing` output over a whole lifetime (publish, sends
/// and receives through a lossy, failing network and business endpoint,
/// retransmission, a legal hold, an identity approval, a sweep past
/// retention) names no consumer (number, hash or hash prefix) and carries
/// no content, on the error paths the faults reach too.
#[tokio::test]
async fn tracing_events_and_spans_name_no_consumer_and_carry_no_content() {
    let capture = Arc::new(Capture::default());
    let _guard = tracing::subscriber::set_default(Sub(capture.clone()));
    let faults = Faults {
        drop: 0.2,
        duplicate: 0.2,
        delay: 0.2,
        max_delay: Duration::from_secs(30),
        fail: 0.3,
        outages: Vec::new(),
    };
    let w = world(faults.clone(), faults);
    for _ in 0..50 {
        if w.processor
            .publish_keys(w.owner(business()).unwrap(), business())
            .await
            .is_ok()
        {
            break;
        }
    }
    let consumers = 4;
    for i in 0..consumers {
        w.network.add_consumer(&number(i), 2).await;
    }
    let mut contents = Vec::new();
    for round in 0..3 {
        for i in 0..consumers {
            let text = format!("secret-content-{i}-{round}-Zq");
            let _ = w
                .network
                .consumer_sends(&number(i), 0, business(), text.as_bytes())
                .await;
            contents.push(text);
            let text = format!("reply-content-{i}-{round}-Qz");
            let _ = w
                .processor
                .send(
                    w.owner(business()).unwrap(),
                    business(),
                    Outbound {
                        to: number(i),
                        content: text.as_bytes().to_vec().into(),
                        category: Category::Utility,
                    },
                )
                .await;
            contents.push(text);
        }
        for _ in 0..20 {
            w.network.pump(&w.processor, &w.carrier).await;
            let _ = w.processor.retransmit_due(&w.operator).await;
            w.clock.advance(Duration::from_secs(10));
        }
    }
    let keys = w.processor.keys(&w.operator).unwrap();
    let mut needles = Vec::new();
    for i in 0..consumers {
        let hash = keys.phone_hash(business(), &number(i)).await.unwrap();
        needles.extend(consumer_needles(&number(i), hash.as_bytes()));
    }
    let held = keys.phone_hash(business(), &number(0)).await.unwrap();
    let scope = HoldScope::Consumer(business(), held);
    w.processor
        .place_hold(&w.operator, scope, "case-1")
        .await
        .unwrap();
    let _ = w
        .processor
        .trust_new_identity(
            w.owner(business()).unwrap(),
            business(),
            &number(0),
            0,
            ConsumerDevice::new(0).identity(),
        )
        .await;
    let _ = w
        .processor
        .trust_new_identity(
            w.owner(business()).unwrap(),
            business(),
            &number(1),
            1,
            ConsumerDevice::new(1).identity(),
        )
        .await;
    w.processor
        .release_hold(&w.operator, scope, "case-1")
        .await
        .unwrap();
    // A reinstalled consumer: its old session is gone, retry receipts come.
    w.network.add_consumer(&number(2), 2).await;
    for _ in 0..20 {
        w.network.pump(&w.processor, &w.carrier).await;
        let _ = w.processor.retransmit_due(&w.operator).await;
        w.clock.advance(Duration::from_secs(30));
    }
    w.clock.advance(Duration::from_secs(32 * 24 * 3600));
    let _ = w.processor.sweep(&w.operator).await;
    let _ = w.processor.sweep(&w.operator).await;
    drop(_guard);

    let lines = std::mem::take(&mut *capture.lines.lock().unwrap());
    assert!(
        lines.iter().any(|l| l.contains(" error=")),
        "the faults reached no error path: {lines:#?}"
    );
    for line in &lines {
        for needle in &needles {
            assert!(!line.contains(needle.as_str()), "{needle} in: {line}");
        }
        for content in &contents {
            assert!(!line.contains(content.as_str()), "content in: {line}");
        }
        assert!(!line.contains("-Zq") && !line.contains("-Qz"), "{line}");
    }
}

/// `MemoryStore`'s `Debug` shows counts, as every other holder of such
/// state does: a host that logs its storage handle puts no consumer in its
/// logs. Before, it was derived and dumped the whole store: every consumer
/// by the 4-byte prefix of its keyed phone hash, which the business's index
/// key turns back into a number or a handful of candidates, and every
/// sealed Signal record byte for byte, where no retention sweep reaches.
#[tokio::test]
async fn memory_store_debug_shows_counts_not_consumers() {
    let store = Arc::new(MemoryStore::new());
    let w = world_on(store.clone(), Faults::none(), Faults::none());
    w.processor
        .publish_keys(w.owner(business()).unwrap(), business())
        .await
        .unwrap();
    w.network.add_consumer(&number(1), 1).await;
    w.network
        .consumer_sends(&number(1), 0, business(), b"hello")
        .await
        .unwrap();
    w.network.pump(&w.processor, &w.carrier).await;
    let keys = w.processor.keys(&w.operator).unwrap();
    let hash = keys.phone_hash(business(), &number(1)).await.unwrap();
    let peer = PeerId {
        phone: hash,
        device: 0,
    };
    let sealed = store.peer(business(), peer).await.unwrap().unwrap();
    let tail = format!("{:?}", &sealed[sealed.len() - 8..]);
    let tail = tail.trim_start_matches('[').trim_end_matches(']');

    let printed = format!("{store:?}");
    let prefix = hex::encode(&hash.as_bytes()[..4]);
    let mut leaks = Vec::new();
    if printed.contains(&prefix) {
        leaks.push(format!("the consumer's hash prefix {prefix}"));
    }
    if printed.contains(tail) {
        leaks.push("the sealed Signal record, byte for byte".to_owned());
    }
    assert!(
        leaks.is_empty(),
        "MemoryStore's Debug ({} bytes) prints {leaks:?}",
        printed.len()
    );
    assert!(printed.contains("messages: 1"), "{printed}");
    // A phone hash prints no byte of itself either (before, the prefix).
    assert_eq!(format!("{hash:?}"), "PhoneHash(..)");
    assert!(!format!("{peer:?}").contains(&prefix), "{peer:?}");
}
