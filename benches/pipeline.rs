//! The processor end to end, beside the sum of its bare parts measured in
//! the same run, on the in-memory store and on SQLite.
//!
//! Shapes, each with 256 consumers (one device each, real Signal clients)
//! whose conversations with one business are already established, driven
//! concurrently on one runtime thread (the SQLite writer has its own), each
//! conversation yielding after each message so that they interleave. A
//! gateway at 20,000 messages a second has thousands of conversations in
//! flight; 256 is still few, and what group commit can share a
//! transaction among depends on it:
//!
//! - `inbound_burst`: consumers send 200-byte messages in a row (no ratchet
//!   turn); [`Processor::receive`] decrypts, seals and stores each in one
//!   commit with the session's advance, releases it to the business, and
//!   records it delivered.
//! - `inbound_alternating`: a reply between every two messages, so each
//!   inbound message turns the ratchet (X25519-bound); only the receiving is
//!   timed.
//! - `outbound_alternating`: each consumer answers between two messages of
//!   the business, so each [`Processor::send`] turns the ratchet; only the
//!   sending is timed.
//! - `outbound_burst`: [`Processor::send`] of 200-byte messages: sealed and
//!   stored, encrypted, handed to the transport, bookkeeping stored.
//!
//! Bare parts (`parts_memory/…`, `parts_sqlite/…`), each alone, measured
//! right after that backend's pipeline while its rig is still alive (the
//! bare Signal parts allocate on every call, and run markedly faster in
//! the smaller heap of a process without it):
//!
//! - Signal decrypt and encrypt between the test kit's devices (bare
//!   `wacore-libsignal`, in-memory stores), one in the business's place
//!   with a session with each of 256 consumers, taken in turn as the
//!   shapes take them: in one direction, and alternating in rounds (each
//!   conversation turns its ratchet once a round, and the timed side takes
//!   all 256 in a row, as the pipeline's alternating shapes do);
//! - HKDF-SHA256 expand of a record key;
//! - AES-256-GCM key schedule and seal of a stored record's size;
//! - for SQLite, bare rusqlite inserts of the message rows the pipeline
//!   writes (and a peer row per 32), with the store's pragmas, in the same
//!   batching: as many to a transaction as the SQLite pipeline's group
//!   commit put in one in an inbound burst
//!   ([`SqliteStore::group_commits`], counted while its CPU is measured).
//!
//! After criterion's report, a summary prints each shape's throughput as a
//! share of its parts' (1 / the sum of their times), and the CPU each
//! inbound message of the burst cost (all threads, over the same receives
//! criterion timed).
//!
//! Criterion measures the pipeline and its parts minutes apart, and this
//! machine's speed drifts over minutes by more than the gaps measured. So
//! after criterion's groups, each backend's rig is also compared **in
//! pairs**: a chunk of a shape through the pipeline (eight rounds of a
//! burst, one of an alternating shape), and its bare parts on as many
//! messages right after it (or right before: the order swaps every pair),
//! in the same process state. The summary prints the median share of the
//! pairs and its quartiles beside the share of criterion's means.
//!
//! Run: `cargo bench --bench pipeline` (the summary needs every part; a
//! filtered run prints what it can; `PIPELINE_BACKENDS=memory` or `sqlite`
//! sets up one backend only; `PIPELINE_PAIRS=n` sets the pairs per shape,
//! 15 by default, and 0 skips them, for profiling; `PIPELINE_SHAPES`, a
//! comma-separated list of shape names, pairs only those).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use criterion::{Criterion, Throughput};
use custodian::ids::{BusinessId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::LocalKeyProvider;
use custodian::keys::SecretKey;
use custodian::processor::{Host, Inbound, Outbound, Policies, Processor};
use custodian::signal::SignalConfig;
use custodian::store::{MemoryStore, PeerId, SqliteConfig, SqliteStore, Storage};
use custodian::testing::{ConsumerDevice, RecordingTransport, join_all};
use custodian::time::SystemClock;
use custodian::transport::{
    BusinessSink, InboundMessage, Principal, SinkError, StaticAuthorizer, StatusUpdate,
};
use custodian::visibility::{AuditError, AuditSink, Change, Decision, HoldEvent};
use hkdf::Hkdf;
use rusqlite::{Connection, params};
use sha2::Sha256;
use tokio::sync::Mutex as AsyncMutex;

const CONSUMERS: usize = 256;
const CONTENT: [u8; 200] = [0x5a; 200];

/// The pipeline's four shapes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    InboundBurst,
    InboundAlternating,
    OutboundAlternating,
    OutboundBurst,
}

impl Shape {
    const ALL: [Shape; 4] = [
        Shape::InboundBurst,
        Shape::InboundAlternating,
        Shape::OutboundAlternating,
        Shape::OutboundBurst,
    ];

    fn name(self) -> &'static str {
        match self {
            Shape::InboundBurst => "inbound_burst",
            Shape::InboundAlternating => "inbound_alternating",
            Shape::OutboundAlternating => "outbound_alternating",
            Shape::OutboundBurst => "outbound_burst",
        }
    }

    /// The bare Signal part of the shape; its other parts are the same
    /// for all four (HKDF, AES-GCM, and on SQLite the insert).
    fn signal_part(self) -> &'static str {
        match self {
            Shape::InboundBurst => "signal_decrypt",
            Shape::InboundAlternating => "signal_decrypt_alternating",
            Shape::OutboundAlternating => "signal_encrypt_alternating",
            Shape::OutboundBurst => "signal_encrypt",
        }
    }

    /// Messages in one pair of the paired comparison: a few rounds of a
    /// burst (so that each conversation takes several in a row), one
    /// round of an alternating shape.
    fn chunk(self) -> u64 {
        match self {
            Shape::InboundBurst | Shape::OutboundBurst => 8 * CONSUMERS as u64,
            Shape::InboundAlternating | Shape::OutboundAlternating => CONSUMERS as u64,
        }
    }
}

/// `elapsed` for `done` messages, scaled to `iters`.
fn per_iters(elapsed: Duration, iters: u64, done: u64) -> Duration {
    elapsed.mul_f64(iters as f64 / done as f64)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn number(i: usize) -> PhoneNumber {
    format!("+4477009{i:05}").parse().unwrap()
}

// ---------------------------------------------------------------------------
// The host around the processor: the kit's transport that only records, a
// business that takes everything, an audit trail that counts.

struct Business;

#[async_trait]
impl BusinessSink for Business {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        black_box(message);
        Ok(())
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        black_box(update);
        Ok(())
    }
}

struct Audit;

impl AuditSink for Audit {
    fn record(&self, verdict: &Decision) -> Result<(), AuditError> {
        black_box(verdict);
        Ok(())
    }

    fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
        black_box(event);
        Ok(())
    }

    fn record_change(&self, event: &Change) -> Result<(), AuditError> {
        black_box(event);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The rig: a processor, one business, 256 consumers in conversation with it.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Memory,
    Sqlite,
}

struct Consumer {
    number: PhoneNumber,
    device: AsyncMutex<ConsumerDevice>,
}

struct Rig {
    processor: Processor,
    storage: Arc<dyn Storage>,
    sqlite: Option<Arc<SqliteStore>>,
    network: Arc<RecordingTransport>,
    principal: Principal,
    business: BusinessId,
    consumers: Vec<Consumer>,
    _dir: Option<tempfile::TempDir>,
}

impl Rig {
    async fn new(backend: Backend) -> Self {
        let (storage, sqlite, dir): (Arc<dyn Storage>, _, _) = match backend {
            Backend::Memory => (Arc::new(MemoryStore::new()), None, None),
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(
                    SqliteStore::open(dir.path().join("pipeline.db"), SqliteConfig::default())
                        .unwrap(),
                );
                (store.clone(), Some(store), Some(dir))
            }
        };
        let network = Arc::new(RecordingTransport::new());
        let principal = Principal::new("gateway");
        let business = BusinessId::new(1001).unwrap();
        let host = Host {
            storage: storage.clone(),
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: network.clone(),
            business: Arc::new(Business),
            authorizer: Arc::new(
                StaticAuthorizer::new()
                    .grant(&principal, business)
                    .carrier(&principal, business)
                    .operator(&principal),
            ),
            // Real time: expiries and due times advance as they would in
            // production, so the stores' time-ordered indexes grow at their
            // end (a frozen clock would scatter every insert by message id).
            clock: Arc::new(SystemClock),
            audit: Arc::new(Audit),
        };
        let policies = Policies {
            signal: SignalConfig {
                prekey_pool: CONSUMERS + 16,
                prekey_low_water: 1,
                ..SignalConfig::default()
            },
            ..Policies::default()
        };
        let processor = Processor::new(host, policies).unwrap();
        processor.publish_keys(&principal, business).await.unwrap();
        let keys = network.published().unwrap();
        let rig = Self {
            processor,
            storage,
            sqlite,
            network,
            principal,
            business,
            consumers: (0..CONSUMERS)
                .map(|i| Consumer {
                    number: number(i),
                    device: AsyncMutex::new(ConsumerDevice::new(0)),
                })
                .collect(),
            _dir: dir,
        };
        // First contact, and a reply so that each consumer's next message
        // is an ordinary one.
        for (i, c) in rig.consumers.iter().enumerate() {
            c.device
                .lock()
                .await
                .start_session(business, &keys.bundle(Some(i)))
                .await
                .unwrap();
        }
        rig.inbound_round().await;
        rig.outbound_round().await;
        rig.consumers_read().await;
        rig
    }

    /// The write transactions SQLite committed so far (none in memory).
    fn transactions(&self) -> u64 {
        self.sqlite
            .as_ref()
            .map_or(0, |s| s.group_commits().transactions)
    }

    /// Consumer `c` writes a message to the business.
    async fn write(&self, c: &Consumer) -> Inbound {
        let message = c
            .device
            .lock()
            .await
            .encrypt(self.business, &CONTENT)
            .await
            .unwrap();
        Inbound {
            resend_of: None,
            from: c.number.clone(),
            device: 0,
            message,
        }
    }

    /// Every consumer sends one message and the processor receives them all.
    async fn inbound_round(&self) {
        let round = self.write_round().await;
        self.receive_all(vec![round]).await;
    }

    /// Every consumer writes one message to the business.
    async fn write_round(&self) -> Vec<Inbound> {
        let mut round = Vec::with_capacity(CONSUMERS);
        for c in &self.consumers {
            round.push(self.write(c).await);
        }
        round
    }

    /// Receive `per_consumer[round][consumer]`, the consumers concurrently,
    /// each one's messages in order. Each lane yields after each message,
    /// so that the conversations interleave as a gateway's do (and as the
    /// bare parts take them): on memory, nothing else makes a lane wait,
    /// and it would take all its messages in a row, its state in the
    /// nearest cache.
    async fn receive_all(&self, rounds: Vec<Vec<Inbound>>) -> Duration {
        let mut lanes: Vec<Vec<Inbound>> = (0..CONSUMERS).map(|_| Vec::new()).collect();
        for round in rounds {
            for (lane, inbound) in lanes.iter_mut().zip(round) {
                lane.push(inbound);
            }
        }
        let start = Instant::now();
        join_all(
            lanes
                .into_iter()
                .map(|lane| async move {
                    for inbound in lane {
                        let receipt = self
                            .processor
                            .receive(&self.principal, self.business, inbound)
                            .await
                            .unwrap();
                        assert!(receipt.delivered && !receipt.duplicate);
                        tokio::task::yield_now().await;
                    }
                })
                .collect(),
        )
        .await;
        start.elapsed()
    }

    /// The business sends one message to every consumer.
    async fn outbound_round(&self) -> Duration {
        self.send_all(1).await
    }

    /// The business sends `per_consumer` messages to every consumer, the
    /// consumers concurrently (interleaved as in [`Rig::receive_all`]).
    async fn send_all(&self, per_consumer: u64) -> Duration {
        let start = Instant::now();
        join_all(
            self.consumers
                .iter()
                .map(|c| async move {
                    for _ in 0..per_consumer {
                        let outbound = Outbound {
                            to: c.number.clone(),
                            content: CONTENT.to_vec().into(),
                            category: Category::Service,
                        };
                        self.processor
                            .send(&self.principal, self.business, outbound)
                            .await
                            .unwrap();
                        tokio::task::yield_now().await;
                    }
                })
                .collect(),
        )
        .await;
        start.elapsed()
    }

    /// Every consumer reads what the business sent it.
    async fn consumers_read(&self) {
        let sent = self.network.take_sent();
        for c in &self.consumers {
            let mut device = c.device.lock().await;
            for message in sent.get(&c.number).into_iter().flatten() {
                device.decrypt(self.business, message).await.unwrap();
            }
        }
    }

    /// `rounds` rounds of `shape` (each a message per consumer): the time
    /// of the processor's part alone.
    async fn run(&self, shape: Shape, rounds: u64, cpu: &mut Cpu) -> Duration {
        match shape {
            Shape::InboundBurst => self.inbound_burst(rounds, cpu).await,
            Shape::InboundAlternating => self.inbound_alternating(rounds).await,
            Shape::OutboundAlternating => self.outbound_alternating(rounds).await,
            Shape::OutboundBurst => self.outbound_burst(rounds).await,
        }
    }

    /// The inbound burst shape, `rounds` messages from each consumer: the
    /// time the processor took to receive them (the consumers' writing is
    /// not timed). Adds the CPU and transactions of the receiving to `cpu`.
    async fn inbound_burst(&self, rounds: u64, cpu: &mut Cpu) -> Duration {
        let mut written = Vec::new();
        for _ in 0..rounds {
            written.push(self.write_round().await);
        }
        let (before, transactions) = (process_cpu(), self.transactions());
        let elapsed = self.receive_all(written).await;
        cpu.cpu += process_cpu() - before;
        cpu.wall += elapsed;
        cpu.messages += rounds * CONSUMERS as u64;
        cpu.transactions += self.transactions() - transactions;
        elapsed
    }

    /// The inbound alternating shape, `rounds` rounds: the business writes
    /// to every consumer, each replies, and only the receiving is timed.
    async fn inbound_alternating(&self, rounds: u64) -> Duration {
        let mut elapsed = Duration::ZERO;
        for _ in 0..rounds {
            self.outbound_round().await;
            self.consumers_read().await;
            let round = self.write_round().await;
            elapsed += self.receive_all(vec![round]).await;
        }
        elapsed
    }

    /// The outbound alternating shape, `rounds` rounds: each consumer
    /// answers first, so the business's next send turns the ratchet; only
    /// the sending is timed.
    async fn outbound_alternating(&self, rounds: u64) -> Duration {
        let mut elapsed = Duration::ZERO;
        for _ in 0..rounds {
            self.inbound_round().await;
            elapsed += self.outbound_round().await;
            self.consumers_read().await;
        }
        elapsed
    }

    /// The outbound burst shape, `per_consumer` messages to each consumer.
    async fn outbound_burst(&self, per_consumer: u64) -> Duration {
        let elapsed = self.send_all(per_consumer).await;
        self.consumers_read().await;
        elapsed
    }

    /// Sizes of what one inbound message stores: its record's plaintext
    /// (before the envelope), its sealed record, and its consumer's sealed
    /// peer record.
    async fn stored_sizes(&self) -> Sizes {
        let c = &self.consumers[0];
        let inbound = self.write(c).await;
        let receipt = self
            .processor
            .receive(&self.principal, self.business, inbound)
            .await
            .unwrap();
        let message = self
            .storage
            .message(self.business, receipt.id)
            .await
            .unwrap()
            .unwrap();
        let phone = self
            .processor
            .keys(&self.principal)
            .unwrap()
            .phone_hash(self.business, &c.number)
            .await
            .unwrap();
        let peer = self
            .storage
            .peer(self.business, PeerId { phone, device: 0 })
            .await
            .unwrap()
            .unwrap();
        // Format v1 adds 112 bytes and the region's name.
        let overhead = 112 + self.storage.region().as_str().len();
        Sizes {
            plaintext: message.sealed.len() - overhead,
            message: message.sealed.len(),
            peer: peer.len(),
        }
    }
}

// ---------------------------------------------------------------------------
// The pipeline

fn bench_pipeline(c: &mut Criterion, backend: Backend) {
    let rt = runtime();
    let rig = rt.block_on(Rig::new(backend));
    let name = format!("{backend:?}").to_lowercase();
    let mut g = c.benchmark_group(format!("pipeline_{name}"));
    g.throughput(Throughput::Elements(1)).sample_size(20);

    // The CPU (all threads) and group commits of every timed burst, warm-up
    // included: the very receives criterion times.
    let mut cpu = Cpu::default();
    for shape in Shape::ALL {
        g.bench_function(shape.name(), |b| {
            b.iter_custom(|iters| {
                let rounds = iters.div_ceil(CONSUMERS as u64);
                let elapsed = rt.block_on(rig.run(shape, rounds, &mut cpu));
                per_iters(elapsed, iters, rounds * CONSUMERS as u64)
            })
        });
    }
    g.finish();

    // The bare parts, while the rig (and the heap it grew) is still alive:
    // the allocating bare Signal parts run markedly faster in the smaller
    // heap of a process without it, which the pipeline never meets.
    let sizes = rt.block_on(rig.stored_sizes());
    let mut bare = rt.block_on(Bare::new());
    // The bare inserts are batched as group commit batched these.
    let mut inserts = (backend == Backend::Sqlite).then(|| {
        let batch = cpu.messages_per_transaction().unwrap_or(CONSUMERS as f64);
        BareSqlite::new(sizes, batch.round().max(1.0) as u64)
    });
    bench_parts(c, &rt, &name, &mut bare, sizes, inserts.as_mut());
    let pairs = std::env::var("PIPELINE_PAIRS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(15);
    if pairs > 0 {
        let measured = rt.block_on(paired(&rig, &mut bare, sizes, inserts.as_mut(), pairs));
        PAIRED.lock().unwrap().insert(name.clone(), measured);
    }
    CPU.lock().unwrap().insert(name, cpu);
}

/// The CPU time (all threads) and wall time of the timed inbound bursts;
/// on SQLite, the write transactions they took.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    cpu: Duration,
    wall: Duration,
    messages: u64,
    transactions: u64,
}

impl Cpu {
    /// Inbound messages per write transaction (each message is two writes:
    /// stored, then marked delivered), if they took any.
    fn messages_per_transaction(&self) -> Option<f64> {
        (self.transactions > 0).then(|| self.messages as f64 / self.transactions as f64)
    }
}

/// This process's CPU time so far, user and system, all threads.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // Linux reports in clock ticks of 1/100 s on every platform it runs on.
    Duration::from_millis(ticks * 10)
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    plaintext: usize,
    message: usize,
    peer: usize,
}

static CPU: Mutex<BTreeMap<String, Cpu>> = Mutex::new(BTreeMap::new());
/// Each shape's pairs, from [`paired`].
type Paired = Vec<(Shape, Vec<Pair>)>;
/// Per backend, each shape's pairs.
static PAIRED: Mutex<BTreeMap<String, Paired>> = Mutex::new(BTreeMap::new());

/// One pair of the paired comparison: the time per message of the
/// pipeline and of its bare parts.
#[derive(Debug, Clone, Copy)]
struct Pair {
    pipeline: Duration,
    parts: Duration,
}

impl Pair {
    /// The pipeline's throughput as a share of its parts'.
    fn share(&self) -> f64 {
        self.parts.as_secs_f64() / self.pipeline.as_secs_f64()
    }
}

/// Each shape's throughput as a share of its bare parts', `pairs` times:
/// a chunk of the pipeline beside its parts on as many messages, taken
/// right after it (or right before: the order swaps every pair). The
/// machine's speed drifts over a run by more than the gaps measured, and
/// criterion measures the pipeline and the parts minutes apart; within a
/// pair both sides meet the same machine. The bare Signal part runs its
/// chunk twice and is timed the second time, so that it meets caches as
/// warm as in its own criterion group, not as the pipeline left them.
/// `inserts`: the bare inserts, on SQLite.
async fn paired(
    rig: &Rig,
    bare: &mut Bare,
    sizes: Sizes,
    mut inserts: Option<&mut BareSqlite>,
    pairs: usize,
) -> Paired {
    let mut cpu = Cpu::default();
    let mut out = Vec::new();
    let wanted = std::env::var("PIPELINE_SHAPES").ok();
    let wanted = |shape: Shape| {
        wanted
            .as_deref()
            .is_none_or(|w| w.split(',').any(|s| s.trim() == shape.name()))
    };
    for shape in Shape::ALL.into_iter().filter(|&s| wanted(s)) {
        let n = shape.chunk();
        let mut measured = Vec::with_capacity(pairs);
        // One pair to warm up, not counted.
        for k in 0..=pairs {
            let mut parts = async || {
                let insert = inserts.as_mut().map_or(Duration::ZERO, |s| s.insert(n));
                // Timed the second time, as criterion times a part: on the
                // state its own previous round left in the caches.
                bare.signal(shape, n).await;
                bare.signal(shape, n).await
                    + hkdf_expand(n)
                    + aes_gcm_seal(n, sizes.plaintext)
                    + insert
            };
            let rounds = n / CONSUMERS as u64;
            let (pipeline, parts) = if k % 2 == 0 {
                let pipeline = rig.run(shape, rounds, &mut cpu).await;
                (pipeline, parts().await)
            } else {
                let parts = parts().await;
                (rig.run(shape, rounds, &mut cpu).await, parts)
            };
            if k > 0 {
                measured.push(Pair {
                    pipeline: pipeline / n as u32,
                    parts: parts / n as u32,
                });
            }
        }
        out.push((shape, measured));
    }
    out
}

// ---------------------------------------------------------------------------
// The bare parts

/// Which side of an alternating exchange [`Bare::alternating_rounds`] times.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// The business's decrypt of each consumer's reply.
    Decrypt,
    /// The business's encrypt of each answer.
    Encrypt,
}

/// The pipeline's conversations without the processor: a test-kit device
/// (bare wacore-libsignal, in-memory stores) for each of the `CONSUMERS`
/// consumers, and one in the business's place, holding a session with each
/// (it names consumer `i` as business `i + 1`). Each part takes the
/// consumers in turn, as the pipeline's shapes do: one conversation alone
/// would keep its state in the nearest cache, which no gateway enjoys.
struct Bare {
    consumers: Vec<ConsumerDevice>,
    business: ConsumerDevice,
    /// The consumer whose turn is next.
    turn: usize,
}

impl Bare {
    async fn new() -> Self {
        let mut business = ConsumerDevice::new(1);
        let mut consumers = Vec::with_capacity(CONSUMERS);
        for i in 0..CONSUMERS {
            let mut consumer = ConsumerDevice::new(0);
            let bundle = business.bundle(true);
            consumer.start_session(name(i), &bundle).await.unwrap();
            let first = consumer.encrypt(name(i), &CONTENT).await.unwrap();
            business.decrypt(name(i), &first).await.unwrap();
            let reply = business.encrypt(name(i), &CONTENT).await.unwrap();
            consumer.decrypt(name(i), &reply).await.unwrap();
            consumers.push(consumer);
        }
        Self {
            consumers,
            business,
            turn: 0,
        }
    }

    /// The next consumer in turn, and the name the two devices know each
    /// other by.
    fn next(&mut self) -> (usize, BusinessId) {
        let i = self.turn;
        self.turn = (i + 1) % CONSUMERS;
        (i, name(i))
    }

    /// Enough rounds for `iters` messages: in each, the business writes to
    /// every consumer and every consumer replies, so each of its decrypts
    /// and encrypts turns a ratchet. Returns the time of `side` alone, per
    /// `iters` messages.
    async fn alternating_rounds(&mut self, iters: u64, side: Side) -> Duration {
        let rounds = iters.div_ceil(CONSUMERS as u64);
        let mut elapsed = Duration::ZERO;
        for _ in 0..rounds {
            let start = Instant::now();
            let mut answers = Vec::with_capacity(CONSUMERS);
            for i in 0..CONSUMERS {
                answers.push(self.business.encrypt(name(i), &CONTENT).await.unwrap());
            }
            if side == Side::Encrypt {
                elapsed += start.elapsed();
            }
            let mut replies = Vec::with_capacity(CONSUMERS);
            for (i, answer) in answers.iter().enumerate() {
                let consumer = &mut self.consumers[i];
                consumer.decrypt(name(i), answer).await.unwrap();
                replies.push(consumer.encrypt(name(i), &CONTENT).await.unwrap());
            }
            let start = Instant::now();
            for (i, reply) in replies.iter().enumerate() {
                black_box(self.business.decrypt(name(i), reply).await.unwrap());
            }
            if side == Side::Decrypt {
                elapsed += start.elapsed();
            }
        }
        per_iters(elapsed, iters, rounds * CONSUMERS as u64)
    }

    /// `n` messages of the Signal part of `shape`.
    async fn signal(&mut self, shape: Shape, n: u64) -> Duration {
        match shape {
            Shape::InboundBurst => self.decrypt(n).await,
            Shape::InboundAlternating => self.alternating_rounds(n, Side::Decrypt).await,
            Shape::OutboundAlternating => self.alternating_rounds(n, Side::Encrypt).await,
            Shape::OutboundBurst => self.encrypt(n).await,
        }
    }

    /// `n` decrypts in the business's place, the consumers in turn (their
    /// encrypting is not timed).
    async fn decrypt(&mut self, n: u64) -> Duration {
        let mut messages = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (i, name) = self.next();
            let m = self.consumers[i].encrypt(name, &CONTENT).await.unwrap();
            messages.push((name, m));
        }
        let start = Instant::now();
        for (name, m) in &messages {
            black_box(self.business.decrypt(*name, m).await.unwrap());
        }
        start.elapsed()
    }

    /// `n` encrypts in the business's place, the consumers in turn (their
    /// decrypting is not timed).
    async fn encrypt(&mut self, n: u64) -> Duration {
        let mut messages = Vec::with_capacity(n as usize);
        let start = Instant::now();
        for _ in 0..n {
            let (i, name) = self.next();
            messages.push((
                i,
                name,
                self.business.encrypt(name, &CONTENT).await.unwrap(),
            ));
        }
        let elapsed = start.elapsed();
        for (i, name, m) in &messages {
            self.consumers[*i].decrypt(*name, m).await.unwrap();
        }
        elapsed
    }
}

/// How the devices of [`Bare`] name conversation `i`.
fn name(i: usize) -> BusinessId {
    BusinessId::new(i as u64 + 1).unwrap()
}

/// `n` HKDF-SHA256 expands of a record key.
fn hkdf_expand(n: u64) -> Duration {
    let (prk, info) = ([0x11u8; 32], [0x22u8; 96]);
    let start = Instant::now();
    for _ in 0..n {
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::from_prk(black_box(&prk))
            .unwrap()
            .expand(black_box(&info), &mut okm)
            .unwrap();
        black_box(okm);
    }
    start.elapsed()
}

/// `n` AES-256-GCM key schedules and seals of a `len`-byte record.
fn aes_gcm_seal(n: u64, len: usize) -> Duration {
    let (key, aad) = ([0x33u8; 32], [0x44u8; 98]);
    let mut buffer = vec![0x55u8; len];
    let start = Instant::now();
    for _ in 0..n {
        let cipher = Aes256Gcm::new(black_box(&key).into());
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::from([7; 12]),
                &aad,
                InOutBuf::from(buffer.as_mut_slice()),
            )
            .unwrap();
        black_box(tag);
    }
    start.elapsed()
}

/// Bare rusqlite inserts of the rows the SQLite pipeline writes, batched
/// as its group commit batched them.
struct BareSqlite {
    conn: Connection,
    /// Rows inserted so far.
    n: u64,
    /// Messages per transaction.
    batch: u64,
    sizes: Sizes,
    _dir: tempfile::TempDir,
}

impl BareSqlite {
    fn new(sizes: Sizes, batch: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            conn: bare_sqlite(&dir.path().join("bare.db")),
            n: 0,
            batch,
            sizes,
            _dir: dir,
        }
    }

    /// `n` messages inserted and committed.
    fn insert(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(self.batch);
            self.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            for _ in 0..k {
                self.n += 1;
                bare_insert(&self.conn, self.n, self.sizes.message, self.sizes.peer);
            }
            self.conn.execute_batch("COMMIT").unwrap();
            left -= k;
        }
        start.elapsed()
    }
}

/// The bare parts of backend `name`'s shapes, beside its rig.
fn bench_parts(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    bare: &mut Bare,
    sizes: Sizes,
    inserts: Option<&mut BareSqlite>,
) {
    let mut g = c.benchmark_group(format!("parts_{name}"));
    g.throughput(Throughput::Elements(1));
    for shape in Shape::ALL {
        g.bench_function(shape.signal_part(), |b| {
            b.iter_custom(|iters| rt.block_on(bare.signal(shape, iters)))
        });
    }
    g.bench_function("hkdf_expand", |b| b.iter_custom(hkdf_expand));
    g.bench_function("aes_gcm_seal", |b| {
        b.iter_custom(|iters| aes_gcm_seal(iters, sizes.plaintext))
    });
    if let Some(inserts) = inserts {
        g.bench_function("sqlite_insert", |b| {
            b.iter_custom(|iters| inserts.insert(iters))
        });
    }
    g.finish();
}

/// A file with the store's schema, opened bare with its writer's pragmas.
fn bare_sqlite(path: &Path) -> Connection {
    drop(SqliteStore::open(path, SqliteConfig::default()).unwrap());
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
    conn.pragma_update(None, "cache_size", -32_768).unwrap();
    conn.pragma_update(None, "journal_size_limit", 64 << 20)
        .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)
        .unwrap();
    conn
}

/// Insert message `n`, and every 32nd time upsert its consumer's peer
/// record (one of 256), as inbound messages in a burst write them (a
/// session is persisted once per 32 plain receives).
fn bare_insert(conn: &Connection, n: u64, message: usize, peer: usize) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    id[8..].copy_from_slice(&n.to_le_bytes());
    let phone = [(n % CONSUMERS as u64) as u8; 16];
    conn.prepare_cached(
        "INSERT INTO messages (business, id, direction, phone, created, expiry, epoch,
             status, failure, attempts, next_attempt, pending_devices, sealed)
         VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, 2, NULL, 1, NULL, 0, ?7)",
    )
    .unwrap()
    .execute(params![
        1001i64,
        &id[..],
        &phone[..],
        n as i64,
        n as i64 + 1,
        n as i64 + 2,
        vec![0x66u8; message]
    ])
    .unwrap();
    if !n.is_multiple_of(32) {
        return;
    }
    conn.prepare_cached(
        "INSERT INTO peers (business, phone, device, sealed) VALUES (?1, ?2, 0, ?3)
         ON CONFLICT (business, phone, device) DO UPDATE SET sealed = excluded.sealed",
    )
    .unwrap()
    .execute(params![1001i64, &phone[..], vec![0x77u8; peer]])
    .unwrap();
}

// ---------------------------------------------------------------------------
// The summary

/// When this run started: estimates saved before it are another run's.
static STARTED: Mutex<Option<std::time::SystemTime>> = Mutex::new(None);

/// Criterion's mean time per element of `id`, from the estimate this run
/// saved (`None` if it did not run it: a filtered run compares only what
/// it measured).
fn mean(id: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path: PathBuf = [target.as_str(), "criterion", id, "new", "estimates.json"]
        .iter()
        .collect();
    let saved = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if STARTED
        .lock()
        .unwrap()
        .is_none_or(|started| saved < started)
    {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// The quartiles of `values`.
fn quartiles(values: &[f64]) -> Option<[f64; 3]> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v.get(((v.len() - 1) as f64 * q).round() as usize).copied();
    Some([at(0.25)?, at(0.5)?, at(0.75)?])
}

fn summary() {
    println!("\nsummary (throughput as a share of the bare parts' = 1 / the sum of their times)");
    let paired = PAIRED.lock().unwrap().clone();
    for backend in ["memory", "sqlite"] {
        for shape in Shape::ALL {
            let mut names = vec![shape.signal_part(), "hkdf_expand", "aes_gcm_seal"];
            if backend == "sqlite" {
                names.push("sqlite_insert");
            }
            let parts: Option<f64> = names
                .iter()
                .map(|n| mean(&format!("parts_{backend}/{n}")))
                .sum();
            let ours = mean(&format!("pipeline_{backend}/{}", shape.name()));
            if let (Some(ours), Some(parts)) = (ours, parts) {
                println!(
                    "  {backend:6} {:20} {:8.0} msg/s = {:5.1}% of parts ({:8.0} msg/s: {}), criterion means",
                    shape.name(),
                    1e9 / ours,
                    100.0 * parts / ours,
                    1e9 / parts,
                    names.join(" + ")
                );
            }
            let pairs = paired
                .get(backend)
                .and_then(|p| p.iter().find(|(s, _)| *s == shape))
                .map(|(_, p)| p.as_slice())
                .unwrap_or_default();
            let shares: Vec<f64> = pairs.iter().map(Pair::share).collect();
            let pipeline: Vec<f64> = pairs.iter().map(|p| p.pipeline.as_secs_f64()).collect();
            let parts: Vec<f64> = pairs.iter().map(|p| p.parts.as_secs_f64()).collect();
            if let (Some([low, median, high]), Some([_, ours, _]), Some([_, bare, _])) =
                (quartiles(&shares), quartiles(&pipeline), quartiles(&parts))
            {
                println!(
                    "  {backend:6} {:20} {:5.1}% of parts, paired: median of {} pairs of {} messages (quartiles {:.1}–{:.1}%; medians {:.2} µs vs {:.2} µs)",
                    shape.name(),
                    100.0 * median,
                    shares.len(),
                    shape.chunk(),
                    100.0 * low,
                    100.0 * high,
                    ours * 1e6,
                    bare * 1e6
                );
            }
        }
        if let (Some(ours), Some(decrypt)) = (
            mean(&format!("pipeline_{backend}/inbound_alternating")),
            mean(&format!("parts_{backend}/signal_decrypt_alternating")),
        ) {
            println!(
                "  {backend:6} inbound_alternating = {:5.1}% of bare alternating Signal decrypt alone",
                100.0 * decrypt / ours
            );
        }
        if let Some(&c) = CPU.lock().unwrap().get(backend) {
            let (cpu, wall, n) = (c.cpu.as_secs_f64(), c.wall.as_secs_f64(), c.messages as f64);
            println!(
                "  {backend:6} inbound_burst CPU: {:.1} µs per message over all threads ({:.2} cores busy), {:.0} msg/s per core",
                cpu * 1e6 / n,
                cpu / wall,
                n / cpu
            );
            if let Some(per) = c.messages_per_transaction() {
                println!(
                    "  {backend:6} group commit: {per:.1} inbound messages per transaction (the bare inserts are batched as many)"
                );
            }
        }
    }
}

fn main() {
    *STARTED.lock().unwrap() = Some(std::time::SystemTime::now());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    // `PIPELINE_BACKENDS=memory` (or `sqlite`) sets up only that rig, for
    // profiling one backend.
    let backends = std::env::var("PIPELINE_BACKENDS").unwrap_or_else(|_| "memory,sqlite".into());
    for backend in [Backend::Memory, Backend::Sqlite] {
        if backends.contains(&format!("{backend:?}").to_lowercase()) {
            bench_pipeline(&mut c, backend);
        }
    }
    c.final_summary();
    summary();
}
