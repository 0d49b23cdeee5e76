//! Crash safety of the SQLite backend: a process killed with SIGKILL at any
//! moment loses no acknowledged batch and leaves no batch half applied.
//!
//! The test re-runs its own binary as a child (selected by an environment
//! variable, and `--exact` so that only the child's test runs). The child
//! commits batches from several tasks and prints each acknowledged batch on
//! stdout as soon as `commit` returns `Ok`. The parent reads those lines,
//! kills the child with SIGKILL at points chosen by a seeded generator,
//! reopens the file and checks, for every task, that the stored state is
//! exactly that of its acknowledged batches (or of those plus the one batch
//! that was in flight when the child died), then starts the child again to
//! carry on where the acknowledgements stopped.
#![cfg(unix)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

mod common;

use common::{KillPlan, Rng, run_and_kill};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::keys::Epoch;
use custodian::store::{
    Batch, Delivery, Direction, MessageRecord, Op, PeerId, SqliteConfig, SqliteStore, Status,
    Storage,
};
use custodian::time::Timestamp;

const CHILD_DB: &str = "CUSTODIAN_CRASH_CHILD_DB";
const CHILD_START: &str = "CUSTODIAN_CRASH_CHILD_START";
/// Tasks committing at once in the child (so batches share transactions).
const TASKS: usize = 4;
/// Kills at least, and the time after which no new round starts once
/// that many are done.
const MIN_KILLS: u32 = 24;
const BUDGET: Duration = Duration::from_secs(40);
/// The child stops by itself after this many batches per task (a parent
/// that died must not leave it running for ever).
const MAX_SEQ: u64 = 1_000_000;
const T0: u64 = 1_767_225_600_000;
/// Sometimes at once (while it opens the file), else after a random number
/// of acknowledgements, plus a random delay.
const KILL_PLAN: KillPlan = KillPlan {
    at_once_one_in: 5,
    max_acks: 80,
    max_delay: Duration::from_micros(3000),
    patience: Duration::from_secs(20),
};

fn business() -> BusinessId {
    BusinessId::new(42).unwrap()
}

/// The id of the message of batch `seq` of `task`.
fn id(task: usize, seq: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[0] = task as u8;
    b[1..9].copy_from_slice(&seq.to_be_bytes());
    b[15] = 0xc5;
    MessageId::from_bytes(b)
}

fn peer(task: usize, seq: u64) -> PeerId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8] = task as u8;
    PeerId {
        phone: PhoneHash::from_bytes(b),
        device: (seq % 3) as u32,
    }
}

/// Deterministic bytes: a function of (tag, task, seq) only.
fn bytes(tag: u8, task: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut x = (seq << 8 | task as u64) ^ (u64::from(tag) << 56) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn record(task: usize, seq: u64) -> MessageRecord {
    let expiry = T0 + 30 * 86_400_000 + seq;
    MessageRecord {
        business: business(),
        id: id(task, seq),
        direction: if seq.is_multiple_of(2) {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        phone: peer(task, seq).phone,
        created: Timestamp::from_millis(T0 + seq),
        expiry: Timestamp::from_millis(expiry),
        epoch: Epoch::ending_at(Timestamp::from_millis(
            expiry / 3_600_000 * 3_600_000 + 3_600_000,
        )),
        delivery: Delivery::queued(Timestamp::from_millis(T0 + seq)),
        sealed: bytes(1, task, seq, 200 + (seq as usize * 37) % 900),
    }
}

fn delivered(seq: u64) -> Delivery {
    Delivery {
        status: Status::Delivered,
        failure: None,
        attempts: (seq % 1000) as u32,
        next_attempt: None,
        pending_devices: 0,
        overdue_at: None,
        told: None,
        accepted_by: 0,
    }
}

/// Batch `seq` of `task`: its message and the peer with it; every fifth
/// batch also marks the previous message delivered (a compare-and-swap
/// from its bookkeeping `previous`: queued, or delivered already when the batch
/// is committed again after a crash hid its acknowledgement), every seventh
/// deletes the message and peer of two batches back.
fn batch(task: usize, seq: u64, previous: Delivery) -> Batch {
    let mut b = Batch::new();
    b.push(Op::PutMessage(Box::new(record(task, seq))));
    b.push(Op::PutPeer {
        business: business(),
        peer: peer(task, seq),
        sealed: bytes(2, task, seq, 100 + (seq as usize * 13) % 400),
    });
    if seq % 5 == 4 {
        b.push(Op::UpdateDelivery {
            business: business(),
            id: id(task, seq - 1),
            expected: previous,
            delivery: delivered(seq),
        });
    }
    if seq % 7 == 6 {
        b.push(Op::DeleteMessage {
            business: business(),
            id: id(task, seq - 2),
        });
        b.push(Op::DeletePeer {
            business: business(),
            peer: peer(task, seq - 2),
        });
    }
    b
}

/// What a task's first `count` batches leave: messages and peers by seq.
type State = (BTreeMap<u64, MessageRecord>, BTreeMap<u64, Vec<u8>>);

fn model(task: usize, count: u64) -> State {
    let (mut messages, mut peers) = (BTreeMap::new(), BTreeMap::new());
    for seq in 0..count {
        for op in batch(task, seq, record(task, seq).delivery).into_ops() {
            match op {
                Op::PutMessage(m) => {
                    messages.insert(seq, *m);
                }
                Op::PutPeer { sealed, .. } => {
                    peers.insert(seq, sealed);
                }
                Op::UpdateDelivery { delivery, .. } => {
                    if let Some(m) = messages.get_mut(&(seq - 1)) {
                        m.delivery = delivery;
                    }
                }
                Op::DeleteMessage { .. } => {
                    messages.remove(&(seq - 2));
                }
                Op::DeletePeer { .. } => {
                    peers.remove(&(seq - 2));
                }
                other => panic!("unexpected op {other:?}"),
            }
        }
    }
    (messages, peers)
}

/// The child: commit batches from `TASKS` tasks, printing `ack TASK SEQ`
/// after each `Ok`, until killed. A no-op in an ordinary test run.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let starts: Vec<u64> = std::env::var(CHILD_START)
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(path, SqliteConfig::default()).unwrap());
        let mut tasks = Vec::new();
        for (task, start) in starts.into_iter().enumerate() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for seq in start..MAX_SEQ {
                    let previous = match seq.checked_sub(1) {
                        Some(p) => store.message(business(), id(task, p)).await.unwrap(),
                        None => None,
                    };
                    let previous = previous.map_or_else(
                        || record(task, seq.saturating_sub(1)).delivery,
                        |m| m.delivery,
                    );
                    // Committed before the last kill, but not acknowledged: a
                    // message is stored once, so the batch is not retried.
                    if store
                        .message(business(), id(task, seq))
                        .await
                        .unwrap()
                        .is_none()
                    {
                        store.commit(batch(task, seq, previous)).await.unwrap();
                    }
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "ack {task} {seq}")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        // The parent is gone.
                        std::process::exit(0);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Check the file after a kill: it opens, and each task's state is that of
/// its acknowledged batches, or of those and the next one. Returns how many
/// acknowledged messages were checked, and how many tasks' unacknowledged
/// batch in flight turned out committed (as it may).
fn verify(path: &Path, acked: &[Option<u64>]) -> (usize, usize) {
    let store = SqliteStore::open(path, SqliteConfig::default())
        .unwrap_or_else(|e| panic!("the file does not reopen cleanly: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (mut present, mut committed_unacked) = (0, 0);
    for (task, last) in acked.iter().enumerate() {
        let done = last.map_or(0, |a| a + 1);
        // Every seq that may hold something, and one past it that must not.
        let mut actual: State = Default::default();
        runtime.block_on(async {
            for seq in 0..=done + 1 {
                if let Some(m) = store.message(business(), id(task, seq)).await.unwrap() {
                    actual.0.insert(seq, m);
                }
                if let Some(p) = store.peer(business(), peer(task, seq)).await.unwrap() {
                    actual.1.insert(seq, p);
                }
            }
        });
        let acknowledged = model(task, done);
        let in_flight = model(task, done + 1);
        assert!(
            actual == acknowledged || actual == in_flight,
            "task {task}: after {done} acknowledged batches the store holds neither their \
             state nor that plus the batch in flight:\n  messages {:?}\n  peers {:?}",
            actual.0.keys().collect::<Vec<_>>(),
            actual.1.keys().collect::<Vec<_>>(),
        );
        present += acknowledged.0.len();
        committed_unacked += usize::from(actual != acknowledged);
    }
    (present, committed_unacked)
}

#[test]
fn acknowledged_batches_survive_sigkill() {
    if std::env::var_os(CHILD_DB).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut rng = Rng(0x00c0_ffee_d00d_2026);
    let mut acked: Vec<Option<u64>> = vec![None; TASKS];
    let started = Instant::now();
    let (mut kills, mut acks) = (0u32, 0u64);
    let (mut checked, mut unacked_committed) = (0usize, 0usize);
    while kills < MIN_KILLS || started.elapsed() < BUDGET / 4 {
        if kills >= MIN_KILLS && started.elapsed() > BUDGET {
            break;
        }
        let starts: Vec<String> = acked
            .iter()
            .map(|a| a.map_or(0, |a| a + 1).to_string())
            .collect();
        let starts = starts.join(",");
        let env = [
            (CHILD_DB, path.as_os_str()),
            (CHILD_START, std::ffi::OsStr::new(&starts)),
        ];
        let got = run_and_kill("crash_child", &env, &KILL_PLAN, &mut rng);
        kills += 1;
        for ack in got {
            let mut words = ack.split_whitespace();
            let task: usize = words.next().unwrap().parse().unwrap();
            let seq: u64 = words.next().unwrap().parse().unwrap();
            let expected = acked[task].map_or(0, |a| a + 1);
            assert_eq!(seq, expected, "task {task} acknowledged out of order");
            acked[task] = Some(seq);
            acks += 1;
        }
        let (present, in_flight) = verify(&path, &acked);
        checked += present;
        unacked_committed += in_flight;
    }
    let total: u64 = acked.iter().map(|a| a.map_or(0, |a| a + 1)).sum();
    eprintln!(
        "crash test: {kills} SIGKILLs in {:.1} s; {acks} batches acknowledged ({total} in all \
         tasks' sequences); {checked} acknowledged message checks byte for byte over all \
         rounds; {unacked_committed} times a task's unacknowledged batch in flight was found \
         committed whole",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= MIN_KILLS);
    assert!(acks > 100, "too few acknowledged batches to mean anything");
}
