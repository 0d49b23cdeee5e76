//! Crash safety of the whole inbound pipeline on SQLite: a gateway killed
//! with SIGKILL at any moment loses no message it acknowledged.
//!
//! The test re-runs its own binary as a child (selected by an environment
//! variable). The child is a gateway: a [`Processor`] on a SQLite file,
//! with a root key the parent also knows, receiving the messages of a few
//! consumers (real Signal clients) and printing `ack <id> <number> <text>`
//! for each message as soon as [`Processor::receive`] returns, which is
//! when a gateway acknowledges the transport. The parent kills it at
//! seeded random points, then opens the file itself and checks that every
//! acknowledged message is stored, opens under the key hierarchy to exactly
//! the text sent, and was committed with its sender's Signal state; that
//! the store holds no more than was sent. A gateway started on the file
//! then receives each of the run's acknowledged messages again, as a
//! replaying transport would send them: none reaches the business a second
//! time, though the session state the kill left behind lacks the receives
//! it had not persisted yet (the business answers each consumer once, so
//! their later messages are written behind). Then the gateway is started
//! again on the same file (from its stored business keys) to go on.
#![cfg(unix)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

mod common;

use common::{KillPlan, Rng, run_and_kill};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::processor::{Host, Inbound, Outbound, Policies, Processor};
use custodian::signal::{Ciphertext, MessageKind};
use custodian::store::{Direction, PeerId, SqliteConfig, SqliteStore, Status, Storage};
use custodian::testing::{ConsumerDevice, RecordingTransport};
use custodian::time::{ManualClock, Timestamp};
use custodian::transport::{
    BusinessSink, InboundMessage, Principal, SinkError, StaticAuthorizer, StatusUpdate,
};
use custodian::vault::Vault;
use custodian::visibility::MemoryAuditSink;

const CHILD_DB: &str = "CUSTODIAN_CRASH_PIPELINE_DB";
const CHILD_RUN: &str = "CUSTODIAN_CRASH_PIPELINE_RUN";
const MIN_KILLS: u32 = 20;
const CONSUMERS: u32 = 3;
/// The child stops by itself after this many messages per consumer.
const MAX_SEQ: u32 = 100_000;
const T0: u64 = 1_767_225_600_000;
const ROOT: [u8; 32] = [0x5c; 32];
/// Sometimes while it starts (opening the file, publishing keys), else after
/// some acknowledgements, plus a random delay.
const KILL_PLAN: KillPlan = KillPlan {
    at_once_one_in: 4,
    max_acks: 40,
    max_delay: Duration::from_micros(20_000),
    patience: Duration::from_secs(60),
};

fn business() -> BusinessId {
    BusinessId::new(77).unwrap()
}

fn number(run: u32, consumer: u32) -> PhoneNumber {
    format!("+4477009{run:03}{consumer:02}").parse().unwrap()
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_millis(T0))
}

fn key_provider() -> Arc<LocalKeyProvider> {
    Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(
        &mut ROOT.clone(),
    )))
}

/// A business that counts what it is handed.
#[derive(Default)]
struct Business(std::sync::atomic::AtomicUsize);

#[async_trait]
impl BusinessSink for Business {
    async fn deliver(&self, _: &InboundMessage) -> Result<(), SinkError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn status(&self, _: &StatusUpdate) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The child: a gateway receiving messages until it is killed. A no-op in
/// an ordinary test run.
#[test]
fn crash_pipeline_child() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let run: u32 = std::env::var(CHILD_RUN).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let storage = Arc::new(SqliteStore::open(path, SqliteConfig::default()).unwrap());
        let network = Arc::new(RecordingTransport::new());
        let gateway = Principal::new("gateway");
        let host = Host {
            storage,
            key_provider: key_provider(),
            transport: network.clone(),
            business: Arc::new(Business::default()),
            authorizer: Arc::new(
                StaticAuthorizer::new()
                    .grant(&gateway, business())
                    .carrier(&gateway, business())
                    .operator(&gateway),
            ),
            clock: Arc::new(clock()),
            audit: Arc::new(MemoryAuditSink::new()),
        };
        let processor = Processor::new(host, Policies::default()).unwrap();
        processor.publish_keys(&gateway, business()).await.unwrap();
        let published = network.published().unwrap();
        let mut devices = Vec::new();
        for c in 0..CONSUMERS {
            let mut device = ConsumerDevice::new(0);
            device
                .start_session(business(), &published.bundle(Some(c as usize)))
                .await
                .unwrap();
            devices.push(device);
        }
        for seq in 0..MAX_SEQ {
            for (c, device) in devices.iter_mut().enumerate() {
                let text = format!("run {run} consumer {c} message {seq}");
                let message = device.encrypt(business(), text.as_bytes()).await.unwrap();
                let from = number(run, c as u32);
                let inbound = Inbound {
                    resend_of: None,
                    from: from.clone(),
                    device: 0,
                    message: message.clone(),
                };
                let receipt = processor
                    .receive(&gateway, business(), inbound)
                    .await
                    .unwrap();
                assert!(!receipt.duplicate);
                let kind = match message.kind {
                    MessageKind::FirstContact => 'f',
                    _ => 'u',
                };
                let ciphertext = hex::encode(&message.bytes);
                let mut out = std::io::stdout().lock();
                if writeln!(
                    out,
                    "ack {} {} {kind}{ciphertext} {text}",
                    receipt.id,
                    from.expose()
                )
                .and_then(|()| out.flush())
                .is_err()
                {
                    // The parent is gone.
                    std::process::exit(0);
                }
                if seq == 0 {
                    // An answer: the consumer's next messages follow up on
                    // the session, and are written behind.
                    let answer = Outbound {
                        to: from.clone(),
                        content: b"noted".to_vec().into(),
                        category: Category::Service,
                    };
                    processor.send(&gateway, business(), answer).await.unwrap();
                    let mut sent = network.take_sent();
                    for m in sent.remove(&from).unwrap_or_default() {
                        device.decrypt(business(), &m).await.unwrap();
                    }
                }
            }
        }
    });
}

/// One acknowledged message: its id, sender, ciphertext and text.
struct Acked {
    id: MessageId,
    from: PhoneNumber,
    message: Ciphertext,
    text: String,
}

/// An acknowledgement as the child prints it after `ack `.
fn parse(ack: &str) -> Option<Acked> {
    let (id, rest) = ack.split_once(' ')?;
    let (from, rest) = rest.split_once(' ')?;
    let (message, text) = rest.split_once(' ')?;
    let kind = match message.get(..1)? {
        "f" => MessageKind::FirstContact,
        "u" => MessageKind::FollowUp,
        _ => return None,
    };
    Some(Acked {
        id: id.parse().ok()?,
        from: from.parse().ok()?,
        message: Ciphertext {
            kind,
            bytes: hex::decode(message.get(1..)?).ok()?,
        },
        text: text.to_owned(),
    })
}

/// Open the file as a new gateway would and check every acknowledged
/// message; returns how many messages the store holds.
fn verify(path: &Path, acked: &[Acked], sent_at_most: usize) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store: Arc<dyn Storage> = Arc::new(
            SqliteStore::open(path, SqliteConfig::default())
                .unwrap_or_else(|e| panic!("the file does not reopen cleanly: {e}")),
        );
        let keys = Arc::new(KeyManager::new(key_provider(), store.clone()));
        let vault = Vault::new(keys.clone(), Arc::new(clock()), EpochLength::DEFAULT);
        for m in acked {
            let record = store
                .message(business(), m.id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged message {:?} was lost", m.text));
            let opened = vault
                .open(&record.sealed, business())
                .await
                .unwrap_or_else(|e| panic!("acknowledged message {:?} does not open: {e}", m.text));
            assert!(
                opened.plaintext.ends_with(m.text.as_bytes()),
                "message {:?} opened to other content",
                m.text
            );
            let phone = keys.phone_hash(business(), &m.from).await.unwrap();
            assert_eq!(record.phone, phone);
            assert!(
                store
                    .peer(business(), PeerId { phone, device: 0 })
                    .await
                    .unwrap()
                    .is_some(),
                "message {:?} is stored without its sender's session",
                m.text
            );
        }
        // Each answer the business sent is billed exactly when it is
        // recorded sent: in one write, which a kill cannot split.
        let open = store
            .expired_open_messages(Timestamp::MAX, None, usize::MAX)
            .await
            .unwrap();
        let sent = open
            .iter()
            .filter(|m| m.direction == Direction::Outbound && m.delivery.status != Status::Queued)
            .count() as u64;
        let billed: u64 = store
            .billing(business())
            .await
            .unwrap()
            .counts
            .iter()
            .map(|c| c.count)
            .sum();
        assert_eq!(billed, sent, "answers billed, and answers recorded sent");
        let stored = store.census().await.unwrap().messages;
        assert!(
            stored >= acked.len() as u64 && stored <= sent_at_most as u64,
            "{stored} messages stored; {} acknowledged, at most {sent_at_most} sent",
            acked.len()
        );
        stored
    })
}

/// Start a gateway on the file and receive every message of `replays`
/// again: none may reach the business.
fn replay(path: &Path, replays: &[Acked]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sink = Arc::new(Business::default());
        let gateway = Principal::new("gateway");
        let host = Host {
            storage: Arc::new(SqliteStore::open(path, SqliteConfig::default()).unwrap()),
            key_provider: key_provider(),
            transport: Arc::new(RecordingTransport::new()),
            business: sink.clone(),
            authorizer: Arc::new(
                StaticAuthorizer::new()
                    .grant(&gateway, business())
                    .carrier(&gateway, business()),
            ),
            clock: Arc::new(clock()),
            audit: Arc::new(MemoryAuditSink::new()),
        };
        let processor = Processor::new(host, Policies::default()).unwrap();
        for m in replays {
            let inbound = Inbound {
                resend_of: None,
                from: m.from.clone(),
                device: 0,
                message: m.message.clone(),
            };
            let receipt = processor.receive(&gateway, business(), inbound).await;
            assert!(
                receipt.as_ref().is_ok_and(|r| r.duplicate && r.id == m.id),
                "a replay of {:?} was not refused as one: {receipt:?}",
                m.text
            );
        }
        assert_eq!(sink.0.load(std::sync::atomic::Ordering::Relaxed), 0);
    });
}

#[test]
fn acknowledged_inbound_messages_survive_sigkill_of_the_gateway() {
    if std::env::var_os(CHILD_DB).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let mut rng = Rng(0x005e_ed0f_c4a5);
    let mut acked: Vec<Acked> = Vec::new();
    let mut in_flight_max = 0usize;
    let started = Instant::now();
    for run in 0..MIN_KILLS {
        let run_text = run.to_string();
        let env = [
            (CHILD_DB, path.as_os_str()),
            (CHILD_RUN, std::ffi::OsStr::new(&run_text)),
        ];
        let got = run_and_kill("crash_pipeline_child", &env, &KILL_PLAN, &mut rng)
            .into_iter()
            .map(|ack| parse(&ack).unwrap_or_else(|| panic!("a malformed acknowledgement: {ack}")));
        let before = acked.len();
        acked.extend(got);
        // The gateway receives one message at a time: at most one was
        // committed but not acknowledged when it died. It also stored an
        // answer to each consumer, at most.
        in_flight_max += 1 + CONSUMERS as usize;
        let stored = verify(&path, &acked, acked.len() + in_flight_max);
        assert!(stored >= acked.len() as u64);
        replay(&path, &acked[before..]);
    }
    eprintln!(
        "pipeline crash test: {MIN_KILLS} SIGKILLs in {:.1} s; {} acknowledged messages, \
         every one found, opened and matched after every kill",
        started.elapsed().as_secs_f64(),
        acked.len()
    );
    assert!(
        acked.len() > 50,
        "too few acknowledged messages to mean anything"
    );
}
