//! The SQLite backend, beside bare rusqlite doing the same work in the same run.
//!
//! - `commit/{durability}`: inbound-shaped batches (a `PutMessage` with a
//!   1 KiB sealed envelope and a `PutPeer` of 500 B) committed by 1, 8 and
//!   64 concurrent tasks through [`SqliteStore::commit`] (group commit), for
//!   each [`Durability`]. Throughput is in batches (2 rows each).
//!   Baseline `bare`: one thread, one rusqlite connection with the same
//!   pragmas, the same upserts, in transactions of as many batches as there
//!   are tasks (what a perfect group commit would get).
//! - `sweep_1M`: 1,000,000 expired, settled messages (256 B sealed) of
//!   50,000 consumers (one peer each), removed as the retention sweep does:
//!   `delete_expired`, then `peers_without_live_messages` for the consumers
//!   of what was deleted and a batch of `DeletePeer`s; in one call
//!   (`custodian_one_call`) and in chunks of 100,000 (`custodian/chunks_of_100k`).
//!   Baselines on an identical copy of the same file (peers untouched): one
//!   `DELETE FROM messages WHERE expiry <= ?` (`bare_delete`), and the same
//!   in chunks, `DELETE … WHERE rowid IN (SELECT … LIMIT 100000)`
//!   (`bare_delete/chunks_of_100k`): committing in chunks costs any SQLite
//!   writer, since each commit rewrites the index pages it touched. Every
//!   sample starts from a fresh copy of one template file; only the deletion
//!   is timed.
//!
//! Run: `cargo bench --bench storage` (`-- commit` or `-- sweep` for one part).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::keys::Epoch;
use custodian::store::{
    Batch, Delivery, Direction, Durability, MessageRecord, Op, PeerId, SqliteConfig, SqliteStore,
    Status, Storage,
};
use custodian::time::Timestamp;
use rusqlite::{Connection, params};

const T0: u64 = 1_767_225_600_000;
const SEALED: usize = 1024;
const PEER: usize = 500;
const TASKS: [u64; 3] = [1, 8, 64];

const SWEEP_ROWS: u64 = 1_000_000;
const SWEEP_PHONES: u64 = 50_000;
const SWEEP_CHUNK: usize = 100_000;
const SWEEP_SEALED: usize = 256;

/// How the store lays out unsigned values (order-preserving bias).
fn biased(v: u64) -> i64 {
    (v ^ (1 << 63)) as i64
}

fn business() -> BusinessId {
    BusinessId::new(7).unwrap()
}

fn message_id(n: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b[8..].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    MessageId::from_bytes(b)
}

fn phone(n: u64) -> PhoneHash {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.wrapping_mul(0xbf58_476d_1ce4_e5b9).to_be_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    PhoneHash::from_bytes(b)
}

fn record(n: u64, phone_n: u64, expiry: u64, status: Status, sealed: usize) -> MessageRecord {
    let delivery = if status == Status::Queued {
        Delivery::queued(Timestamp::from_millis(T0))
    } else {
        Delivery {
            status,
            failure: None,
            attempts: 1,
            next_attempt: None,
            pending_devices: 0,
        }
    };
    MessageRecord {
        business: business(),
        id: message_id(n),
        direction: Direction::Inbound,
        phone: phone(phone_n),
        created: Timestamp::from_millis(T0),
        expiry: Timestamp::from_millis(expiry),
        epoch: Epoch::ending_at(Timestamp::from_millis(
            expiry / 3_600_000 * 3_600_000 + 3_600_000,
        )),
        delivery,
        sealed: vec![(n % 251) as u8; sealed],
    }
}

fn inbound(n: u64) -> Batch {
    let mut batch = Batch::new();
    batch.push(Op::PutMessage(Box::new(record(
        n,
        n,
        T0 + 30 * 86_400_000,
        Status::Queued,
        SEALED,
    ))));
    batch.push(Op::PutPeer {
        business: business(),
        peer: PeerId {
            phone: phone(n),
            device: 0,
        },
        sealed: vec![(n % 13) as u8; PEER],
    });
    batch
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

/// A file with the store's schema, opened bare with the writer's pragmas.
fn bare(path: &Path, durability: &str) -> Connection {
    if !path.exists() {
        drop(SqliteStore::open(path, SqliteConfig::default()).unwrap());
    }
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", durability).unwrap();
    conn.pragma_update(None, "cache_size", -32_768).unwrap();
    conn
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (business, id, direction, phone, created,
        expiry, epoch, status, failure, attempts, next_attempt, sealed)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
    ON CONFLICT (business, id) DO UPDATE SET
        direction = excluded.direction, phone = excluded.phone,
        created = excluded.created, expiry = excluded.expiry,
        epoch = excluded.epoch, status = excluded.status,
        failure = excluded.failure, attempts = excluded.attempts,
        next_attempt = excluded.next_attempt, sealed = excluded.sealed";
const INSERT_PEER: &str = "INSERT INTO peers (business, phone, device, sealed)
    VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (business, phone, device) DO UPDATE SET sealed = excluded.sealed";

fn bare_insert(conn: &Connection, m: &MessageRecord, peer_sealed: Option<&[u8]>) {
    conn.prepare_cached(INSERT_MESSAGE)
        .unwrap()
        .execute(params![
            biased(m.business.get()),
            &m.id.as_bytes()[..],
            m.direction.code(),
            &m.phone.as_bytes()[..],
            biased(m.created.as_millis()),
            biased(m.expiry.as_millis()),
            biased(m.epoch.end().as_millis()),
            m.delivery.status.code(),
            m.delivery.failure.map(|f| f.code()),
            m.delivery.attempts,
            m.delivery.next_attempt.map(|t| biased(t.as_millis())),
            m.sealed,
        ])
        .unwrap();
    if let Some(sealed) = peer_sealed {
        conn.prepare_cached(INSERT_PEER)
            .unwrap()
            .execute(params![
                biased(m.business.get()),
                &m.phone.as_bytes()[..],
                0,
                sealed
            ])
            .unwrap();
    }
}

fn commit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let next = Arc::new(AtomicU64::new(0));
    for (durability, name) in [(Durability::Full, "FULL"), (Durability::Normal, "NORMAL")] {
        let config = SqliteConfig {
            durability,
            ..SqliteConfig::default()
        };
        let store =
            Arc::new(SqliteStore::open(dir.path().join(format!("{name}.db")), config).unwrap());
        let conn = bare(&dir.path().join(format!("bare-{name}.db")), name);
        let mut g = c.benchmark_group(format!("commit/{name}"));
        g.throughput(Throughput::Elements(1)).sample_size(10);
        for tasks in TASKS {
            g.bench_function(BenchmarkId::new("custodian", tasks), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let handles: Vec<_> = (0..tasks)
                            .map(|t| {
                                let store = store.clone();
                                let next = next.clone();
                                let mine = iters / tasks + u64::from(t < iters % tasks);
                                tokio::spawn(async move {
                                    for _ in 0..mine {
                                        let n = next.fetch_add(1, Ordering::Relaxed);
                                        store.commit(inbound(n)).await.unwrap();
                                    }
                                })
                            })
                            .collect();
                        for h in handles {
                            h.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            });
            g.bench_function(BenchmarkId::new("bare", tasks), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    let mut left = iters;
                    while left > 0 {
                        let k = tasks.min(left);
                        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                        for _ in 0..k {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            let batch = inbound(n);
                            let (Op::PutMessage(m), Op::PutPeer { sealed, .. }) =
                                (&batch.ops()[0], &batch.ops()[1])
                            else {
                                unreachable!("inbound() is a message and a peer")
                            };
                            bare_insert(&conn, m, Some(sealed));
                        }
                        conn.execute_batch("COMMIT").unwrap();
                        left -= k;
                    }
                    start.elapsed()
                })
            });
        }
        g.finish();
    }
}

/// The sweep's template: 1M expired, settled messages of 50,000 consumers
/// with one peer each, written in one transaction.
fn sweep_template(dir: &Path) -> PathBuf {
    let path = dir.join("sweep-template.db");
    let conn = bare(&path, "OFF");
    let start = Instant::now();
    conn.execute_batch("BEGIN").unwrap();
    for n in 0..SWEEP_ROWS {
        // Interleaved consumers: each one's messages spread over the range.
        let m = record(n, n % SWEEP_PHONES, T0 + n, Status::Delivered, SWEEP_SEALED);
        bare_insert(&conn, &m, (n < SWEEP_PHONES).then_some(&[0x55; PEER][..]));
    }
    conn.execute_batch("COMMIT").unwrap();
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE").ok();
    drop(conn);
    eprintln!(
        "sweep template: {SWEEP_ROWS} messages, {SWEEP_PHONES} peers, {} MB, built in {:.1} s",
        std::fs::metadata(&path).unwrap().len() >> 20,
        start.elapsed().as_secs_f64()
    );
    path
}

/// A fresh copy of `template` at `run`, with no log files around it.
fn fresh_copy(template: &Path, run: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = run.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    std::fs::copy(template, run).unwrap();
}

/// Time one bare deletion of every expired message, on a fresh copy.
fn bare_sweep(template: &Path, run: &Path, now: Timestamp, chunk: Option<usize>) -> Duration {
    fresh_copy(template, run);
    let conn = bare(run, "FULL");
    let start = Instant::now();
    let deleted = match chunk {
        None => conn
            .execute(
                "DELETE FROM messages WHERE expiry <= ?1",
                [biased(now.as_millis())],
            )
            .unwrap(),
        Some(chunk) => {
            let mut deleted = 0;
            loop {
                let n = conn
                    .execute(
                        "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages
                         WHERE expiry <= ?1 ORDER BY expiry LIMIT ?2)",
                        params![biased(now.as_millis()), chunk as i64],
                    )
                    .unwrap();
                if n == 0 {
                    break deleted;
                }
                deleted += n;
            }
        }
    };
    let elapsed = start.elapsed();
    assert_eq!(deleted as u64, SWEEP_ROWS);
    elapsed
}

/// Time the sweep's deletion through the store, on a fresh copy: expired
/// messages in chunks of `chunk`, and the peers of consumers left idle.
fn store_sweep(
    rt: &tokio::runtime::Runtime,
    template: &Path,
    run: &Path,
    now: Timestamp,
    chunk: usize,
) -> Duration {
    fresh_copy(template, run);
    let store = SqliteStore::open(run, SqliteConfig::default()).unwrap();
    let (deleted, peers, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let (mut deleted, mut peers) = (0u64, 0u64);
        loop {
            let gone = store.delete_expired(now, &[], chunk).await.unwrap();
            if gone.is_empty() {
                break;
            }
            deleted += gone.len() as u64;
            let phones: Vec<(BusinessId, PhoneHash)> = gone
                .iter()
                .map(|m| (m.business, m.phone))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let idle = store
                .peers_without_live_messages(&phones, now)
                .await
                .unwrap();
            if !idle.is_empty() {
                peers += idle.len() as u64;
                let mut batch = Batch::new();
                for (business, peer) in idle {
                    batch.push(Op::DeletePeer { business, peer });
                }
                store.commit(batch).await.unwrap();
            }
        }
        (deleted, peers, start.elapsed())
    });
    assert_eq!((deleted, peers), (SWEEP_ROWS, SWEEP_PHONES));
    elapsed
}

fn sweep(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let template = sweep_template(dir.path());
    let run = dir.path().join("sweep-run.db");
    let now = Timestamp::from_millis(T0 + SWEEP_ROWS);

    let mut g = c.benchmark_group("sweep_1M");
    g.throughput(Throughput::Elements(SWEEP_ROWS))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("bare_delete", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| bare_sweep(&template, &run, now, None))
                .sum()
        })
    });
    g.bench_function("custodian_one_call", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| store_sweep(&rt, &template, &run, now, SWEEP_ROWS as usize))
                .sum()
        })
    });
    let chunk_name = format!("chunks_of_{}k", SWEEP_CHUNK / 1000);
    g.bench_function(BenchmarkId::new("bare_delete", &chunk_name), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| bare_sweep(&template, &run, now, Some(SWEEP_CHUNK)))
                .sum()
        })
    });
    g.bench_function(BenchmarkId::new("custodian", &chunk_name), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| store_sweep(&rt, &template, &run, now, SWEEP_CHUNK))
                .sum()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = commit, sweep
}
criterion_main!(benches);
