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
use custodian::visibility::{AuditSink, MemoryAuditSink};
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

/// One business (`id`, its owner also its carrier) and another's carrier
/// (`other`, of `other_id`), on a store that outlives each processor.
struct World {
    clock: ManualClock,
    store: Arc<MemoryStore>,
    provider: Arc<LocalKeyProvider>,
    business: Arc<SimBusiness>,
    network: Arc<RecordingTransport>,
    owner: Principal,
    other: Principal,
    operator: Principal,
    id: BusinessId,
    other_id: BusinessId,
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
            other: Principal::new("other-carrier"),
            operator: Principal::new("operator"),
            id: BusinessId::new(5).unwrap(),
            other_id: BusinessId::new(6).unwrap(),
        }
    }

    fn processor(&self) -> Processor {
        self.processor_with(Arc::new(MemoryAuditSink::new()))
    }

    fn processor_with(&self, audit: Arc<dyn AuditSink>) -> Processor {
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
                        .grant(&self.other, self.other_id)
                        .carrier(&self.other, self.other_id)
                        .operator(&self.operator),
                ),
                clock: Arc::new(self.clock.clone()),
                audit,
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

/// Messages sent again on request, stored under the id asked for (a
/// review's tests): a replay of their bytes is refused across restarts and
/// the sweeps that clear the session cache, as any other message's is.
mod resent {
    use std::time::Duration;

    use custodian::ids::{MessageId, PhoneNumber};
    use custodian::integrity::Category;
    use custodian::processor::{Inbound, Outbound, Processor, ProcessorError, Receipt};
    use custodian::signal::Ciphertext;
    use custodian::store::Storage;
    use custodian::testing::ConsumerDevice;

    use super::{World, consumer};

    const DAY: Duration = Duration::from_secs(86_400);

    fn inbound(message: &Ciphertext, resend_of: Option<MessageId>) -> Inbound {
        Inbound {
            resend_of,
            ..super::inbound(message)
        }
    }

    /// A processor with published keys, a device with a session whose first
    /// message was delivered and which read an answer from the business: its
    /// next messages are plain follow-ups on a new receiving chain.
    async fn conversation(world: &World) -> (Processor, ConsumerDevice) {
        let processor = world.processor();
        processor
            .publish_keys(&world.owner, world.id)
            .await
            .unwrap();
        let device = conversation_on(world, &processor).await;
        (processor, device)
    }

    /// As [`conversation`], on `processor` (keys published already).
    async fn conversation_on(world: &World, processor: &Processor) -> ConsumerDevice {
        let (b, owner) = (world.id, &world.owner);
        let mut device = ConsumerDevice::new(0);
        let bundle = world.network.published().unwrap();
        device
            .start_session(b, &bundle.bundle(Some(0)))
            .await
            .unwrap();
        let (_, r) = writes(world, processor, &mut device, b"hello", None).await;
        assert!(r.delivered && !r.duplicate, "{r:?}");
        let answer = Outbound {
            to: consumer(),
            content: b"noted".to_vec().into(),
            category: Category::Service,
        };
        processor.send(owner, b, answer).await.unwrap();
        for message in world.network.take_sent().remove(&consumer()).unwrap() {
            device.decrypt(b, &message).await.unwrap();
        }
        device
    }

    /// A message received as sent again on request (`Inbound::resend_of`)
    /// is stored under the id asked for, and known by its header's: a
    /// replay of its bytes after a restart, named by its header, is found
    /// stored and refused, whatever the restarted session remembers of it.
    /// (Before it was known by its header's id, a step written behind was
    /// lost with the cache, the restart found no message under that id,
    /// kept the counter's key, and the replay reached the business a second
    /// time.)
    #[tokio::test]
    async fn a_resent_message_written_behind_is_not_taken_for_new_after_a_restart() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let (processor, mut device) = conversation(&world).await;
        // The first message on the new chain persists the session (and opens
        // the window receives may be written behind in).
        let (_, r) = writes(&world, &processor, &mut device, b"m1", None).await;
        assert!(r.delivered && !r.duplicate, "{r:?}");
        // The device sends a message again on request (the processor asked for
        // it under `asked`): next on its chain, it is written behind.
        let asked = MessageId::from_bytes([0x42; 16]);
        let (m2, r) = writes(
            &world,
            &processor,
            &mut device,
            b"m2, sent again",
            Some(asked),
        )
        .await;
        assert!(r.delivered && !r.duplicate && r.id == asked, "{r:?}");

        // Control: before a restart, a replay of m2's bytes is no new message.
        let before = processor.receive(owner, b, inbound(&m2, None)).await;
        assert!(
            !before.as_ref().is_ok_and(|r| !r.duplicate),
            "control: {before:?}"
        );

        // The processor restarts; the conversation goes on.
        drop(processor);
        let processor = world.processor();
        let (_, r) = writes(&world, &processor, &mut device, b"m3", None).await;
        assert!(r.delivered && !r.duplicate, "{r:?}");

        // The network replays m2's bytes.
        let replay = processor.receive(owner, b, inbound(&m2, None)).await;
        let texts: Vec<String> = world
            .business
            .contents()
            .into_iter()
            .map(|(_, _, c)| String::from_utf8_lossy(&c).into_owned())
            .collect();
        let twice = texts.iter().filter(|t| *t == "m2, sent again").count();
        assert!(
            twice == 1 && !replay.as_ref().is_ok_and(|r| !r.duplicate),
            "a replay of a resent message was taken for new after a restart and handed over again: \
             {replay:?}; business has {texts:?}"
        );
    }

    /// A first message that used no one-time prekey, sent again on request
    /// over a session started from a bundle without one, handed in again
    /// without the request named, as another consumer's or another
    /// device's: a duplicate of the message stored under the id asked for,
    /// which the business has, and no session is started for the sender
    /// named. (Stored only under the id asked for, it decrypted as new in
    /// a fresh session and reached the business a second time.)
    #[tokio::test]
    async fn a_resent_first_message_replayed_as_anyone_elses_is_a_duplicate() {
        let others: [(PhoneNumber, u32); 2] =
            [("+447700900124".parse().unwrap(), 0), (consumer(), 7)];
        for (from, device) in others {
            let world = World::new();
            let (b, owner) = (world.id, &world.owner);
            let processor = world.processor();
            processor.publish_keys(owner, b).await.unwrap();
            let mut handset = ConsumerDevice::new(0);
            let bundle = world.network.published().unwrap().bundle(None);
            handset.start_session(b, &bundle).await.unwrap();
            let asked = MessageId::from_bytes([0x45; 16]);
            let (resent, r) =
                writes(&world, &processor, &mut handset, b"pay 100", Some(asked)).await;
            assert!(r.delivered && !r.duplicate && r.id == asked, "{r:?}");

            let replay = Inbound {
                from: from.clone(),
                device,
                ..inbound(&resent, None)
            };
            let replayed = processor.receive(owner, b, replay).await.unwrap();
            assert!(
                replayed.duplicate && replayed.delivered && replayed.id == asked,
                "{from:?}/{device}: {replayed:?}"
            );
            assert_eq!(world.business.messages().len(), 1, "{from:?}/{device}");
            assert_eq!(
                processor.census(&world.operator).await.unwrap().peers,
                1,
                "{from:?}/{device}"
            );
        }
    }

    /// The same with the replay carrying the very same `resend_of` (an
    /// exact replay by the network), once the sweep deleted the stored copy
    /// and the session lives on: refused, as a plain message's is.
    #[tokio::test]
    async fn an_exact_replay_of_a_resent_message_after_restart_and_sweep_is_refused() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let (processor, mut device) = conversation(&world).await;
        writes(&world, &processor, &mut device, b"m1", None).await;
        let asked = MessageId::from_bytes([0x43; 16]);
        let (m2, r) = writes(
            &world,
            &processor,
            &mut device,
            b"m2, sent again",
            Some(asked),
        )
        .await;
        assert!(r.delivered, "{r:?}");
        drop(processor);
        let processor = world.processor();
        writes(&world, &processor, &mut device, b"m3", None).await;
        // Twenty days on the consumer writes again (its session lives on);
        // eleven more, and the sweep deletes the first messages.
        world.clock.advance(20 * DAY);
        writes(&world, &processor, &mut device, b"m4", None).await;
        world.clock.advance(11 * DAY);
        processor.sweep(&world.operator).await.unwrap();
        assert!(
            world.store.message(b, asked).await.unwrap().is_none(),
            "swept"
        );

        let replay = processor.receive(owner, b, inbound(&m2, Some(asked))).await;
        let copies = world.business.messages();
        assert!(
            !replay.as_ref().is_ok_and(|r| r.delivered || !r.duplicate)
                && copies.values().all(|&c| c == 1),
            "an exact replay of a resent message reached the business again: {replay:?} ({copies:?})"
        );
    }

    /// A carrier of another business receiving a message for this one is
    /// refused, and nothing changes (the message is then received by the
    /// right carrier, once).
    #[tokio::test]
    async fn a_receive_by_another_businesss_carrier_is_refused_and_changes_nothing() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let processor = world.processor();
        processor.publish_keys(owner, b).await.unwrap();
        let mut device = ConsumerDevice::new(0);
        let bundle = world.network.published().unwrap();
        device
            .start_session(b, &bundle.bundle(Some(0)))
            .await
            .unwrap();
        let first = device.encrypt(b, b"hello").await.unwrap();
        let refused = processor
            .receive(&world.other, b, inbound(&first, None))
            .await;
        assert!(
            matches!(refused, Err(ProcessorError::Unauthorized { .. })),
            "{refused:?}"
        );
        assert!(world.business.messages().is_empty());
        let r = processor
            .receive(owner, b, inbound(&first, None))
            .await
            .unwrap();
        assert!(r.delivered && !r.duplicate, "{r:?}");
    }

    /// The control: the same conversation with the message received as a
    /// plain one (no `resend_of`); its exact replay after the restart and
    /// the sweep is refused.
    #[tokio::test]
    async fn an_exact_replay_of_a_plain_message_after_restart_and_sweep_is_refused() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let (processor, mut device) = conversation(&world).await;
        writes(&world, &processor, &mut device, b"m1", None).await;
        let (m2, r) = writes(&world, &processor, &mut device, b"m2", None).await;
        assert!(r.delivered, "{r:?}");
        drop(processor);
        let processor = world.processor();
        writes(&world, &processor, &mut device, b"m3", None).await;
        world.clock.advance(20 * DAY);
        writes(&world, &processor, &mut device, b"m4", None).await;
        world.clock.advance(11 * DAY);
        processor.sweep(&world.operator).await.unwrap();
        assert!(
            world.store.message(b, r.id).await.unwrap().is_none(),
            "swept"
        );
        let replay = processor.receive(owner, b, inbound(&m2, None)).await;
        assert!(
            !replay.as_ref().is_ok_and(|r| r.delivered || !r.duplicate),
            "{replay:?}"
        );
        assert!(world.business.messages().values().all(|&c| c == 1));
    }

    /// With no restart at all: a routine sweep that deletes another
    /// consumer's expired Signal state clears the whole session cache, and
    /// the resent message's session step comes back from the stored copy,
    /// its key used: the network's replay of its bytes is refused.
    #[tokio::test]
    async fn a_resent_message_is_refused_again_after_a_routine_sweep_of_another_consumer() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let processor = world.processor();
        processor.publish_keys(owner, b).await.unwrap();
        // Another consumer writes once, at the start, and never again.
        writes_once(&world, &processor).await;

        // Twenty days later, our consumer's conversation (the same processor
        // throughout: no restart).
        world.clock.advance(20 * DAY);
        let mut device = conversation_on(&world, &processor).await;
        writes(&world, &processor, &mut device, b"m1", None).await;
        let asked = MessageId::from_bytes([0x44; 16]);
        let (m2, r) = writes(
            &world,
            &processor,
            &mut device,
            b"m2, sent again",
            Some(asked),
        )
        .await;
        assert!(r.delivered && !r.duplicate, "{r:?}");

        // Eleven days on, the daily sweep deletes the other consumer's data.
        world.clock.advance(11 * DAY);
        let swept = processor.sweep(&world.operator).await.unwrap();
        assert!(swept.messages_deleted >= 1, "{swept:?}");
        writes(&world, &processor, &mut device, b"m3", None).await;

        let replay = processor.receive(owner, b, inbound(&m2, None)).await;
        let copies = world
            .business
            .contents()
            .iter()
            .filter(|(_, _, c)| c == b"m2, sent again")
            .count();
        assert!(
            copies == 1 && !replay.as_ref().is_ok_and(|r| !r.duplicate),
            "a replay of a resent message was handed over again after a sweep: {replay:?} \
             ({copies} copies)"
        );
    }

    /// `device` writes `text` (sent again on request for `resend_of`, if
    /// given), and `processor` receives it: the message and its receipt.
    async fn writes(
        world: &World,
        processor: &Processor,
        device: &mut ConsumerDevice,
        text: &[u8],
        resend_of: Option<MessageId>,
    ) -> (Ciphertext, Receipt) {
        let message = device.encrypt(world.id, text).await.unwrap();
        let receipt = processor
            .receive(&world.owner, world.id, inbound(&message, resend_of))
            .await
            .unwrap();
        (message, receipt)
    }

    /// Another consumer writes once to `world`'s business: its Signal
    /// state expires with that message, and the sweep that deletes it
    /// clears the session cache.
    async fn writes_once(world: &World, processor: &Processor) {
        let mut gone = ConsumerDevice::new(0);
        let bundle = world.network.published().unwrap();
        gone.start_session(world.id, &bundle.bundle(Some(1)))
            .await
            .unwrap();
        let once = gone.encrypt(world.id, b"once").await.unwrap();
        let someone: PhoneNumber = "+447700900999".parse().unwrap();
        let inbound = Inbound {
            from: someone,
            ..inbound(&once, None)
        };
        let r = processor.receive(&world.owner, world.id, inbound).await;
        assert!(r.unwrap().delivered);
    }

    fn copies(world: &World, text: &[u8]) -> usize {
        world
            .business
            .contents()
            .iter()
            .filter(|(_, _, c)| c == text)
            .count()
    }

    /// The other order: a copy of the bytes sent again comes first without
    /// the request named (stored under its header's id, its session step
    /// written behind), then the message as sent again, after a restart
    /// lost that step. Its header's id is looked up first: the copy stored
    /// is the message, and it is a duplicate. (The outdated session
    /// decrypted it again, under the id asked for, and the business got it
    /// a second time.)
    #[tokio::test]
    async fn a_plain_copy_then_the_resend_of_its_bytes_across_a_restart_is_a_duplicate() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let (processor, mut device) = conversation(&world).await;
        let (_, r) = writes(&world, &processor, &mut device, b"m1", None).await;
        assert!(r.delivered && !r.duplicate, "{r:?}");
        // The device sends m2 again on request (asked for under `asked`); the
        // network replays its bytes plain, ahead of the genuine delivery.
        let asked = MessageId::from_bytes([0x51; 16]);
        let (m2, r) = writes(&world, &processor, &mut device, b"m2, sent again", None).await;
        assert!(r.delivered && !r.duplicate, "{r:?}");
        assert_eq!(copies(&world, b"m2, sent again"), 1);

        // The processor restarts (or a sweep clears the session cache).
        drop(processor);
        let processor = world.processor();

        // The genuine resend arrives.
        let genuine = processor.receive(owner, b, inbound(&m2, Some(asked))).await;
        let n = copies(&world, b"m2, sent again");
        assert!(
            n == 1 && !genuine.as_ref().is_ok_and(|r| !r.duplicate),
            "the same message reached the business {n} times after a restart: {genuine:?}"
        );
    }

    /// The same with no restart: a routine sweep that deletes another
    /// consumer's expired Signal state clears the session cache, which
    /// loses the plain copy's step just as a restart does.
    #[tokio::test]
    async fn a_plain_copy_then_the_resend_across_a_routine_sweep_is_a_duplicate() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let processor = world.processor();
        processor.publish_keys(owner, b).await.unwrap();
        // Another consumer writes once, at the start, and never again.
        writes_once(&world, &processor).await;
        world
            .clock
            .advance(std::time::Duration::from_secs(20 * 86_400));

        // Our consumer's conversation, on the same processor.
        let mut device = conversation_on(&world, &processor).await;
        writes(&world, &processor, &mut device, b"m1", None).await;
        let asked = MessageId::from_bytes([0x53; 16]);
        let (m2, plain) = writes(&world, &processor, &mut device, b"m2, sent again", None).await;
        assert!(plain.delivered && !plain.duplicate, "{plain:?}");

        // Eleven days on, the daily sweep deletes the other consumer's data.
        world
            .clock
            .advance(std::time::Duration::from_secs(11 * 86_400));
        let swept = processor.sweep(&world.operator).await.unwrap();
        assert!(swept.messages_deleted >= 1, "{swept:?}");

        let genuine = processor.receive(owner, b, inbound(&m2, Some(asked))).await;
        let n = copies(&world, b"m2, sent again");
        assert!(
            n == 1 && !genuine.as_ref().is_ok_and(|r| !r.duplicate),
            "the same message reached the business {n} times after a sweep: {genuine:?}"
        );
    }

    /// The same two deliveries with the session in memory: the message as
    /// sent again is answered from the copy stored under its header's id,
    /// which the business has (it was answered from the id asked for, not
    /// stored: not delivered).
    #[tokio::test]
    async fn a_resend_of_bytes_received_plain_is_answered_as_delivered() {
        let world = World::new();
        let (b, owner) = (world.id, &world.owner);
        let (processor, mut device) = conversation(&world).await;
        writes(&world, &processor, &mut device, b"m1", None).await;
        let asked = MessageId::from_bytes([0x52; 16]);
        let (m2, plain) = writes(&world, &processor, &mut device, b"m2, sent again", None).await;
        assert!(plain.delivered && !plain.duplicate, "{plain:?}");
        let genuine = processor
            .receive(owner, b, inbound(&m2, Some(asked)))
            .await
            .unwrap();
        // Handed over once.
        assert_eq!(copies(&world, b"m2, sent again"), 1, "{genuine:?}");
        assert!(
            genuine.duplicate && genuine.delivered,
            "the business has the message, stored, but the duplicate's receipt says not delivered: {genuine:?}"
        );
    }
}
