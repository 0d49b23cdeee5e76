//! The SQLite backend, beside bare rusqlite doing the same work in the same run.
//!
//! - `commit/{durability}`: inbound-shaped batches (a `PutMessage` with a
//!   1 KiB sealed envelope and a `PutPeer` of 500 B) committed by 1, 8 and
//!   64 concurrent tasks through [`SqliteStore::commit`] (group commit), for
//!   each [`Durability`]. Throughput is in batches (2 rows each).
//!   Baseline `bare`: one thread, one rusqlite connection with the same
//!   pragmas, the same upserts, in transactions of as many batches as there
//!   are tasks (what a perfect group commit would get).
//!
//! The sweep's deletion is measured through the retention sweep itself, in
//! `benches/retention.rs`.
//!
//! Run: `cargo bench --bench storage`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
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
            overdue_at: None,
            told: None,
            accepted_by: 0,
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
    conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
    conn.pragma_update(None, "journal_size_limit", 64 << 20)
        .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)
        .unwrap();
    conn
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (business, id, direction, phone, created,
        expiry, epoch, status, failure, attempts, next_attempt, pending_devices, sealed)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
    ON CONFLICT (business, id) DO UPDATE SET
        direction = excluded.direction, phone = excluded.phone,
        created = excluded.created, expiry = excluded.expiry,
        epoch = excluded.epoch, status = excluded.status,
        failure = excluded.failure, attempts = excluded.attempts,
        next_attempt = excluded.next_attempt,
        pending_devices = excluded.pending_devices, sealed = excluded.sealed";
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
            biased(m.delivery.pending_devices),
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = commit
}
criterion_main!(benches);
