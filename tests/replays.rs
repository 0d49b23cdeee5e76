//! Random conversations with restarts: every message a device sends reaches
//! the business exactly once, however late, out of order or replayed it
//! arrives, and whatever the processor lost in a restart (receives are
//! written behind; see the `signal` module).
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::sync::Arc;
use std::time::Duration;

use custodian::ids::{BusinessId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::{LocalKeyProvider, SecretKey};
use custodian::processor::{Host, Inbound, Outbound, Policies, Processor};
use custodian::signal::{Ciphertext, MessageKind};
use custodian::store::MemoryStore;
use custodian::testing::{ConsumerDevice, Faults, RecordingTransport, SimBusiness};
use custodian::time::{ManualClock, Timestamp};
use custodian::transport::{Principal, StaticAuthorizer};
use custodian::visibility::MemoryAuditSink;
use proptest::prelude::*;
use wacore_libsignal::protocol::{PreKeySignalMessage, SignalMessage};

const T0: u64 = 1_767_225_600_000;

#[derive(Debug, Clone)]
enum Step {
    /// The device writes a message; it is in flight until delivered.
    Write,
    /// The transport delivers one message in flight (any of them).
    Deliver(usize),
    /// The transport delivers an earlier message again, as it was or with
    /// a key in it re-encoded (see [`reencoded`]).
    Replay(usize, bool),
    /// The business writes to the device, which reads it: the device's
    /// next messages start a new receiving chain.
    Answer,
    /// The processor restarts: what it kept in memory is lost.
    Restart,
    /// Time passes.
    Wait(u64),
    /// Twenty days pass and the sweep runs (deleting what arrived more than
    /// 30 days ago); the device writes a message that is delivered at once,
    /// so its session lives on.
    Age,
    /// Retention ends for everything so far, and the sweep runs; the device
    /// starts a new session (its messages in flight are lost with the old).
    Expire,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => Just(Step::Write),
        5 => any::<usize>().prop_map(Step::Deliver),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(i, re)| Step::Replay(i, re)),
        1 => Just(Step::Answer),
        2 => Just(Step::Restart),
        1 => (1u64..7200).prop_map(Step::Wait),
        2 => Just(Step::Age),
        1 => Just(Step::Expire),
    ]
}

struct World {
    clock: ManualClock,
    store: Arc<MemoryStore>,
    provider: Arc<LocalKeyProvider>,
    business: Arc<SimBusiness>,
    network: Arc<RecordingTransport>,
    owner: Principal,
    operator: Principal,
    id: BusinessId,
}

impl World {
    fn new() -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        Self {
            business: SimBusiness::new(clock.clone(), Faults::none(), 1).unwrap(),
            clock,
            store: Arc::new(MemoryStore::new()),
            provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            network: Arc::new(RecordingTransport::new()),
            owner: Principal::new("owner"),
            operator: Principal::new("operator"),
            id: BusinessId::new(5).unwrap(),
        }
    }

    fn processor(&self) -> Processor {
        Processor::new(
            Host {
                storage: self.store.clone(),
                key_provider: self.provider.clone(),
                transport: self.network.clone(),
                business: self.business.clone(),
                authorizer: Arc::new(
                    StaticAuthorizer::new()
                        .grant(&self.owner, self.id)
                        .carrier(&self.owner, self.id)
                        .operator(&self.operator),
                ),
                clock: Arc::new(self.clock.clone()),
                audit: Arc::new(MemoryAuditSink::new()),
            },
            Policies::default(),
        )
        .unwrap()
    }
}

fn consumer() -> PhoneNumber {
    "+447700900123".parse().unwrap()
}

fn inbound(message: &Ciphertext) -> Inbound {
    Inbound {
        resend_of: None,
        from: consumer(),
        device: 0,
        message: message.clone(),
    }
}

/// `message` with its base key (a first-contact message's, outside the
/// MAC) or its ratchet key re-encoded, its top bit set: the same X25519
/// key, other bytes.
fn reencoded(message: &Ciphertext) -> Ciphertext {
    let key = match message.kind {
        MessageKind::FirstContact => PreKeySignalMessage::try_from(message.bytes.as_slice())
            .unwrap()
            .base_key()
            .serialize(),
        MessageKind::FollowUp => SignalMessage::try_from(message.bytes.as_slice())
            .unwrap()
            .sender_ratchet_key()
            .serialize(),
    };
    let at = message
        .bytes
        .windows(key.len())
        .position(|w| w == key)
        .unwrap();
    let mut bytes = message.bytes.clone();
    bytes[at + 32] ^= 0x80;
    Ciphertext {
        kind: message.kind,
        bytes,
    }
}

/// Deliver a message not delivered before: the business gets it.
async fn deliver(processor: &Processor, owner: &Principal, b: BusinessId, message: &Ciphertext) {
    let receipt = processor.receive(owner, b, inbound(message)).await.unwrap();
    assert!(receipt.delivered && !receipt.duplicate, "{receipt:?}");
}

async fn run(steps: Vec<Step>) {
    let world = World::new();
    let (b, owner) = (world.id, &world.owner);
    let mut processor = world.processor();
    processor.publish_keys(owner, b).await.unwrap();
    let mut device = ConsumerDevice::new(0);
    let mut prekeys = 0..;
    let bundle = world.network.published().unwrap();
    let next = prekeys.next().unwrap();
    device
        .start_session(b, &bundle.bundle(Some(next)))
        .await
        .unwrap();
    let mut in_flight: Vec<Ciphertext> = Vec::new();
    let mut delivered: Vec<Ciphertext> = Vec::new();
    // Delivered, then deleted by the sweep.
    let mut expired: Vec<Ciphertext> = Vec::new();
    for step in steps {
        match step {
            Step::Write => {
                let n = expired.len() + delivered.len() + in_flight.len();
                let text = format!("message {n}");
                in_flight.push(device.encrypt(b, text.as_bytes()).await.unwrap());
            }
            Step::Deliver(i) if !in_flight.is_empty() => {
                let message = in_flight.remove(i % in_flight.len());
                deliver(&processor, owner, b, &message).await;
                delivered.push(message);
            }
            Step::Replay(i, re) if !delivered.is_empty() || !expired.is_empty() => {
                let earlier: Vec<&Ciphertext> = expired.iter().chain(&delivered).collect();
                let earlier = earlier[i % earlier.len()];
                let replay = inbound(&if re {
                    reencoded(earlier)
                } else {
                    earlier.clone()
                });
                // Refused, or a duplicate (its receipt saying whether the
                // business has the copy): never taken for new.
                let receipt = processor.receive(owner, b, replay).await;
                assert!(
                    !receipt.as_ref().is_ok_and(|r| !r.duplicate),
                    "a replay was taken for new: {receipt:?}"
                );
            }
            Step::Answer if !delivered.is_empty() => {
                let answer = Outbound {
                    to: consumer(),
                    content: b"noted".to_vec().into(),
                    category: Category::Service,
                };
                processor.send(owner, b, answer).await.unwrap();
                let mut sent = world.network.take_sent();
                for message in sent.remove(&consumer()).unwrap_or_default() {
                    device.decrypt(b, &message).await.unwrap();
                }
            }
            Step::Restart => processor = world.processor(),
            Step::Wait(seconds) => world.clock.advance(Duration::from_secs(seconds)),
            Step::Age => {
                world.clock.advance(Duration::from_secs(20 * 24 * 3600));
                processor.sweep(&world.operator).await.unwrap();
                let n = expired.len() + delivered.len() + in_flight.len();
                let text = format!("message {n}");
                let message = device.encrypt(b, text.as_bytes()).await.unwrap();
                deliver(&processor, owner, b, &message).await;
                delivered.push(message);
            }
            Step::Expire => {
                world.clock.advance(Duration::from_secs(31 * 24 * 3600));
                processor.sweep(&world.operator).await.unwrap();
                expired.append(&mut delivered);
                in_flight.clear();
                device = ConsumerDevice::new(0);
                let next = prekeys.next().unwrap();
                device
                    .start_session(b, &bundle.bundle(Some(next)))
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    let copies = world.business.messages();
    assert_eq!(copies.len(), expired.len() + delivered.len());
    assert!(copies.values().all(|&c| c == 1), "{copies:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_message_reaches_the_business_once_across_restarts(
        steps in prop::collection::vec(step(), 1..48)
    ) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}

/// A processor for `world`'s business, a consumer device that started its
/// session from a bundle without a one-time prekey, and its first message,
/// delivered.
async fn first_contact_without_a_one_time_prekey(
    world: &World,
) -> (Processor, ConsumerDevice, Ciphertext) {
    let (b, owner) = (world.id, &world.owner);
    let processor = world.processor();
    processor.publish_keys(owner, b).await.unwrap();
    let mut device = ConsumerDevice::new(0);
    let bundle = world.network.published().unwrap().bundle(None);
    device.start_session(b, &bundle).await.unwrap();
    let first = device.encrypt(b, b"pay 100 to Bob").await.unwrap();
    deliver(&processor, owner, b, &first).await;
    (processor, device, first)
}

/// A consumer's first message that used no one-time prekey (the network
/// served a bundle without one), handed in again as another consumer's,
/// is a duplicate while its copy is stored: nothing is delivered (its
/// receipt says the business has the message, the copy's), and no session
/// is started for the number. (It was decrypted afresh in a new
/// session for that number, named by it, and handed to the business a
/// second time, credited to someone who never wrote it.)
#[tokio::test]
async fn a_first_contact_replayed_as_another_consumer_is_a_duplicate() {
    let world = World::new();
    let (b, owner) = (world.id, &world.owner);
    let (processor, _, first) = first_contact_without_a_one_time_prekey(&world).await;

    let someone_else = Inbound {
        from: "+447700900124".parse().unwrap(),
        ..inbound(&first)
    };
    let replayed = processor.receive(owner, b, someone_else).await.unwrap();
    assert!(replayed.duplicate && replayed.delivered, "{replayed:?}");
    assert_eq!(world.business.messages().len(), 1);
    assert_eq!(processor.census(&world.operator).await.unwrap().peers, 1);
}

/// A first message that used no one-time prekey, replayed once its stored
/// copy is gone but while its session lives (the consumer wrote again),
/// is refused whether its base key comes as sent or re-encoded (top bit
/// set: the same X25519 key, outside the MAC). (The re-encoded one ran
/// X3DH again to the same secrets and reached the business a second
/// time: the library knows a replay by its base key's bytes.)
#[tokio::test]
async fn a_first_contact_replayed_with_its_base_key_reencoded_is_refused() {
    const DAY: Duration = Duration::from_secs(86_400);
    let world = World::new();
    let (b, owner) = (world.id, &world.owner);
    let (processor, mut device, first) = first_contact_without_a_one_time_prekey(&world).await;
    world.clock.advance(20 * DAY);
    let later = device.encrypt(b, b"thanks").await.unwrap();
    deliver(&processor, owner, b, &later).await;
    world.clock.advance(11 * DAY);
    let swept = processor.sweep(&world.operator).await.unwrap();
    assert_eq!(swept.messages_deleted, 1);

    for replay in [first.clone(), reencoded(&first)] {
        let receipt = processor.receive(owner, b, inbound(&replay)).await;
        assert!(
            !receipt.as_ref().is_ok_and(|r| r.delivered),
            "a replay reached the business again: {receipt:?}"
        );
    }
    assert_eq!(world.business.messages().len(), 2);
    // The session still works.
    let next = device.encrypt(b, b"one more").await.unwrap();
    deliver(&processor, owner, b, &next).await;
}
