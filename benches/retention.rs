//! Retention, beside bare baselines measured in the same run.
//!
//! - `evaluate`: one read-time decision ([`evaluate`]) under a policy with
//!   100 business overrides and two legal holds in force.
//! - `sweep_1M/{memory,sqlite}`: [`Retention::sweep`] of 1,000,000 expired,
//!   settled messages (256 B sealed) of 50,000 consumers with one Signal
//!   peer record each, spread over 720 hourly epochs (30 days): every
//!   message deleted, every consumer forgotten, every epoch key destroyed.
//!   Baseline (`sqlite/bare_delete`): one `DELETE FROM messages WHERE
//!   expiry <= ?` on an identical copy of the same file, with the same
//!   pragmas as the store's writer (write-ahead log, `synchronous = FULL`,
//!   32 MiB cache); peers and keys untouched; then the log checkpointed and
//!   truncated, as the sweep ends (each sample prints both parts);
//!   `sqlite/bare_delete_zeroing` the same with `secure_delete = ON` and a
//!   `VACUUM` before the truncate, as the store keeps deleted phone hashes
//!   out of the file (what a deletion frees is overwritten with zeros; the
//!   rewrite clears the stale copies page rebalancing leaves). `sqlite/custodian` sweeps in the default steps (65,536
//!   messages), `sqlite/custodian_batch_262144` in steps of 262,144. Every
//!   sample starts from a fresh copy of one template file (or, in memory, a
//!   freshly filled store); only the sweep is timed.
//! - `shred/{messages}`: destroying the 720 ended epoch keys (the crypto-
//!   shred that makes every copy of their messages unreadable) in a SQLite
//!   store holding 100,000 and then 1,000,000 messages sealed under them:
//!   the cost follows the number of epochs, not of messages.
//!
//! Run: `cargo bench --bench retention` (`-- sweep`, `-- shred` or
//! `-- evaluate` for one part).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::cell::OnceCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::keys::{Epoch, EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::retention::{
    BusinessRetention, ExpiryNotifier, Notice, Periods, RecordFacts, Retention, RetentionPolicy,
    evaluate,
};
use custodian::store::{
    Batch, Delivery, Direction, HoldScope, MemoryStore, MessageRecord, Op, PeerId, SqliteConfig,
    SqliteStore, Status, Storage,
};
use custodian::time::Timestamp;
use custodian::visibility::MemoryAuditSink;
use rusqlite::Connection;

const T0: u64 = 1_767_225_600_000;
const HOUR: u64 = 3_600_000;
const ROWS: u64 = 1_000_000;
const PHONES: u64 = 50_000;
const SEALED: usize = 256;
/// 30 days of hourly epochs.
const EPOCHS: u64 = 720;
/// When everything has expired and every epoch has ended.
const NOW: u64 = T0 + (EPOCHS + 1) * HOUR;
const ROOT: [u8; 32] = [0x42; 32];

fn business() -> BusinessId {
    BusinessId::new(7).unwrap()
}

fn message_id(n: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    MessageId::from_bytes(b)
}

fn phone(n: u64) -> PhoneHash {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.wrapping_mul(0xbf58_476d_1ce4_e5b9).to_be_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    PhoneHash::from_bytes(b)
}

/// The epoch whose key seals a message expiring at `expiry`.
fn epoch_of(expiry: u64) -> Epoch {
    Epoch::containing(Timestamp::from_millis(expiry), EpochLength::DEFAULT).unwrap()
}

/// Message `n` of `rows`: delivered (settled), its consumer one of
/// [`PHONES`] (interleaved, so each consumer's messages span the range), its
/// expiry spread evenly over the [`EPOCHS`] after `T0`.
fn record(n: u64, rows: u64) -> MessageRecord {
    let expiry = T0 + n * (EPOCHS * HOUR / rows);
    MessageRecord {
        business: business(),
        id: message_id(n),
        direction: Direction::Inbound,
        phone: phone(n % PHONES),
        created: Timestamp::from_millis(T0),
        expiry: Timestamp::from_millis(expiry),
        epoch: epoch_of(expiry),
        delivery: Delivery {
            status: Status::Delivered,
            failure: None,
            attempts: 1,
            next_attempt: None,
            pending_devices: 0,
            overdue_at: None,
            told: None,
            accepted_by: 0,
        },
        sealed: vec![(n % 251) as u8; SEALED],
    }
}

fn keys(store: Arc<dyn Storage>) -> Arc<KeyManager> {
    Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(
            &mut ROOT.clone(),
        ))),
        store,
    ))
}

/// Fill `store` with `rows` messages, a peer per consumer, and the key of
/// every epoch they are sealed under.
async fn fill(store: Arc<dyn Storage>, rows: u64) {
    let keys = keys(store.clone());
    for e in 0..EPOCHS {
        keys.epoch_key_for_seal(
            business(),
            epoch_of(T0 + e * HOUR),
            Timestamp::from_millis(T0),
        )
        .await
        .unwrap();
    }
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        let mut batch = Batch::new();
        for &n in chunk {
            batch.push(Op::PutMessage(Box::new(record(n, rows))));
            if n < PHONES {
                batch.push(Op::PutPeer {
                    business: business(),
                    peer: PeerId {
                        phone: phone(n),
                        device: 0,
                    },
                    sealed: vec![0x55; 500],
                });
            }
        }
        store.commit(batch).await.unwrap();
    }
}

/// Every expired message is settled, so there is nothing to tell.
struct Unneeded;

#[async_trait]
impl ExpiryNotifier for Unneeded {
    async fn expired_undelivered(&self, _: &MessageRecord) -> Notice {
        unreachable!("every message in the benchmark is settled")
    }
}

/// Time one full sweep of `store`, checking it did all the work.
/// Sweep everything in `store` in steps of `batch` (the default if none).
async fn timed_sweep(store: Arc<dyn Storage>, batch: Option<usize>) -> Duration {
    let retention = Retention::new(
        store.clone(),
        keys(store),
        RetentionPolicy::default(),
        Arc::new(MemoryAuditSink::new()),
    );
    let retention = match batch {
        Some(batch) => retention.with_batch(batch),
        None => retention,
    };
    let start = Instant::now();
    let report = retention
        .sweep(Timestamp::from_millis(NOW), &Unneeded)
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert!(report.complete);
    assert_eq!(
        (
            report.messages_deleted,
            report.consumers_forgotten,
            report.epoch_keys_destroyed
        ),
        (ROWS, PHONES, EPOCHS)
    );
    elapsed
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// A SQLite template of `rows` messages, checkpointed into one file.
fn template(rt: &tokio::runtime::Runtime, dir: &Path, rows: u64) -> PathBuf {
    let path = dir.join(format!("template-{rows}.db"));
    let start = Instant::now();
    rt.block_on(async {
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        fill(Arc::new(store), rows).await;
    });
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    drop(conn);
    eprintln!(
        "template: {rows} messages, {PHONES} peers, {EPOCHS} epoch keys, {} MB, built in {:.1} s",
        std::fs::metadata(&path).unwrap().len() >> 20,
        start.elapsed().as_secs_f64()
    );
    path
}

/// A fresh copy of `template` at `run`, with no log files beside it.
fn fresh_copy(template: &Path, run: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = run.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    std::fs::copy(template, run).unwrap();
}

fn open(run: &Path) -> Arc<dyn Storage> {
    Arc::new(SqliteStore::open(run, SqliteConfig::default()).unwrap())
}

/// The baseline: the same rows deleted by one bare statement, then the log
/// checkpointed and truncated, as every complete sweep ends (so that no
/// deleted page lingers in it); the parts are printed. With `secure`, as
/// the store keeps deleted phone hashes out of the file: the statement
/// zeroes what it frees (`secure_delete = ON`), and the file is rewritten
/// (`VACUUM`, which clears the stale copies page rebalancing leaves)
/// before the log is truncated.
fn bare_delete(template: &Path, run: &Path, secure: bool) -> Duration {
    fresh_copy(template, run);
    let conn = Connection::open(run).unwrap();
    let secure_delete = if secure { "ON" } else { "OFF" };
    conn.pragma_update(None, "secure_delete", secure_delete)
        .unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
    conn.pragma_update(None, "cache_size", -32_768).unwrap();
    conn.pragma_update(None, "journal_size_limit", 64 << 20)
        .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)
        .unwrap();
    let now = (NOW ^ (1 << 63)) as i64; // the store's order-preserving bias
    let start = Instant::now();
    let deleted = conn
        .execute("DELETE FROM messages WHERE expiry <= ?1", [now])
        .unwrap();
    let delete = start.elapsed();
    assert_eq!(deleted as u64, ROWS);
    let start = Instant::now();
    if secure {
        conn.execute_batch("VACUUM").unwrap();
    }
    let vacuum = start.elapsed();
    let start = Instant::now();
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    let truncate = start.elapsed();
    eprintln!(
        "bare (secure_delete {secure_delete}): DELETE {:.2} s ({:.0} rows/s), VACUUM {:.2} s, then log truncate {:.2} s",
        delete.as_secs_f64(),
        ROWS as f64 / delete.as_secs_f64(),
        vacuum.as_secs_f64(),
        truncate.as_secs_f64()
    );
    delete + vacuum + truncate
}

fn bench_evaluate(c: &mut Criterion) {
    let mut policy = RetentionPolicy::default();
    for b in 1..=100 {
        let periods = Periods {
            inbound: Duration::from_secs(86_400 * (b % 30 + 1)),
            outbound: Duration::from_secs(86_400 * 7),
        };
        policy = policy
            .with_business(
                BusinessId::new(b).unwrap(),
                BusinessRetention {
                    periods,
                    region: None,
                },
            )
            .unwrap();
    }
    let holds = [
        HoldScope::Business(BusinessId::new(1_000).unwrap()),
        HoldScope::Consumer(business(), phone(1)),
    ];
    let facts: Vec<RecordFacts> = (0..1024)
        .map(|n| {
            let mut r = record(n, 1024);
            r.business = BusinessId::new(n % 150 + 1).unwrap();
            RecordFacts::from(&r)
        })
        .collect();
    let now = Timestamp::from_millis(T0 + 10 * 24 * HOUR);
    let mut i = 0;
    c.bench_function("evaluate", |b| {
        b.iter(|| {
            i = (i + 1) % facts.len();
            black_box(evaluate(black_box(&facts[i]), now, &policy, &holds))
        })
    });
}

/// Template files, each built the first time a selected benchmark needs it.
struct Templates {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    built: [(u64, OnceCell<PathBuf>); 2],
}

impl Templates {
    fn new() -> Self {
        Self {
            rt: runtime(),
            dir: tempfile::tempdir().unwrap(),
            built: [(ROWS / 10, OnceCell::new()), (ROWS, OnceCell::new())],
        }
    }

    fn of(&self, rows: u64) -> &Path {
        let (_, cell) = self.built.iter().find(|(r, _)| *r == rows).unwrap();
        cell.get_or_init(|| template(&self.rt, self.dir.path(), rows))
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run.db")
    }
}

fn bench_sweep(c: &mut Criterion, t: &Templates) {
    let rt = &t.rt;
    let run = t.run();

    let mut g = c.benchmark_group("sweep_1M");
    g.throughput(Throughput::Elements(ROWS))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for (name, secure) in [
        ("sqlite/bare_delete", false),
        ("sqlite/bare_delete_zeroing", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| bare_delete(t.of(ROWS), &run, secure))
                    .sum()
            })
        });
    }
    for (name, batch) in [
        ("sqlite/custodian", None),
        ("sqlite/custodian_batch_262144", Some(262_144)),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        fresh_copy(t.of(ROWS), &run);
                        rt.block_on(timed_sweep(open(&run), batch))
                    })
                    .sum()
            })
        });
    }
    g.bench_function("memory/custodian", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    rt.block_on(async {
                        let store: Arc<dyn Storage> = Arc::new(MemoryStore::new());
                        fill(store.clone(), ROWS).await;
                        timed_sweep(store, None).await
                    })
                })
                .sum()
        })
    });
    g.finish();
}

fn bench_shred(c: &mut Criterion, t: &Templates) {
    let (rt, run) = (&t.rt, t.run());
    let mut g = c.benchmark_group("shred");
    g.throughput(Throughput::Elements(EPOCHS))
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for rows in [ROWS / 10, ROWS] {
        g.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        fresh_copy(t.of(rows), &run);
                        // Written out first: the copy's write-back must not
                        // land in the timed part.
                        std::fs::File::open(&run).unwrap().sync_all().unwrap();
                        let store = open(&run);
                        rt.block_on(async {
                            let keys = keys(store.clone());
                            let start = Instant::now();
                            let destroyed = keys
                                .destroy_ended_epochs_unchecked(Timestamp::from_millis(NOW))
                                .await
                                .unwrap();
                            let elapsed = start.elapsed();
                            assert_eq!(destroyed, EPOCHS);
                            assert_eq!(store.census().await.unwrap().messages, rows);
                            elapsed
                        })
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

fn bench_stores(c: &mut Criterion) {
    let templates = Templates::new();
    bench_sweep(c, &templates);
    bench_shred(c, &templates);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_evaluate, bench_stores
}
criterion_main!(benches);
