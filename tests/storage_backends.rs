//! The SQLite backend against the memory backend: the same calls give the
//! same answers and leave the same readable state, edge values included.
#![cfg(feature = "sqlite")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::sync::Arc;
use std::time::Duration;

use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::integrity::Category;
use custodian::keys::{Epoch, KeyId, KeyKind, WrappedKey};
use custodian::store::{
    Batch, Delivery, Direction, FailureReason, Hold, HoldScope, MemoryStore, MessageRecord, Op,
    PeerId, SqliteConfig, SqliteStore, Status, Storage, StoreError, TakeId, WriterId,
};
use custodian::time::Timestamp;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Pools of values, edges included.

const TIMES: [u64; 7] = [0, 1, 1_000, 1_001, 2_000, u64::MAX - 1, u64::MAX];
const BUSINESSES: [u64; 3] = [1, 2, u64::MAX];
const DEVICES: [u32; 3] = [0, 1, u32::MAX];
const STATUSES: [Status; 5] = [
    Status::Queued,
    Status::Sent,
    Status::Delivered,
    Status::Read,
    Status::Failed,
];

fn t(i: usize) -> Timestamp {
    Timestamp::from_millis(TIMES[i % TIMES.len()])
}

fn b(i: usize) -> BusinessId {
    BusinessId::new(BUSINESSES[i % BUSINESSES.len()]).unwrap()
}

fn mid(i: usize) -> MessageId {
    MessageId::from_bytes(match i % 4 {
        0 => [0; 16],
        1 => [1; 16],
        2 => [0x80; 16],
        _ => [0xff; 16],
    })
}

fn ph(i: usize) -> PhoneHash {
    PhoneHash::from_bytes(match i % 3 {
        0 => [0; 16],
        1 => [0x7f; 16],
        _ => [0xff; 16],
    })
}

fn peer(p: usize, d: usize) -> PeerId {
    PeerId {
        phone: ph(p),
        device: DEVICES[d % DEVICES.len()],
    }
}

fn kid(bi: usize, k: usize) -> KeyId {
    // Epoch keys named by ends in the time pool, and one-time prekeys.
    let (kind, id) = match k % 5 {
        0 => (KeyKind::Epoch, 0),
        1 => (KeyKind::Epoch, 1_000),
        2 => (KeyKind::Epoch, u64::MAX),
        3 => (KeyKind::SignalPreKey, 0),
        _ => (KeyKind::SignalPreKey, u64::MAX),
    };
    KeyId {
        business: b(bi),
        kind,
        id,
    }
}

fn wkey(bi: usize, k: usize, version: u32) -> WrappedKey {
    WrappedKey {
        id: kid(bi, k),
        kek_version: version,
        blob: vec![k as u8 ^ version as u8; if version == 2 { 0 } else { 40 + k }],
    }
}

fn scope(kind: bool, bi: usize, p: usize) -> HoldScope {
    if kind {
        HoldScope::Consumer(b(bi), ph(p))
    } else {
        HoldScope::Business(b(bi))
    }
}

// ---------------------------------------------------------------------------
// Random writes and calls.

#[derive(Debug, Clone)]
enum W {
    PutPeer(usize, usize, usize, u8),
    DeletePeer(usize, usize, usize),
    DeleteIdlePeer(usize, usize, usize, usize),
    PutMessage {
        bi: usize,
        id: usize,
        p: usize,
        created: usize,
        expiry: usize,
        epoch: usize,
        outbound: bool,
        status: usize,
        next: Option<usize>,
        pending: u64,
        accepted: u64,
        sealed_len: usize,
    },
    /// Update from the stored value (or a made-up one when `stale`).
    Update {
        bi: usize,
        id: usize,
        stale: bool,
        status: usize,
        next: Option<usize>,
        attempts: u32,
        pending: u64,
        accepted: u64,
    },
    FailExpired(usize, usize),
    DeleteMessage(usize, usize),
    PutHold(bool, usize, usize, u8, usize),
    DeleteHold(bool, usize, usize, u8),
    Consume(usize, usize),
    Bill(usize, usize, usize, usize),
    Take(usize, u64, usize, usize),
    Settle(usize, u64),
}

#[derive(Debug, Clone)]
enum Act {
    Commit(Vec<W>, Option<u8>),
    TakeOver(u8),
    DeleteExpired {
        now: usize,
        abandon: usize,
        holds: Vec<(bool, usize, usize)>,
        limit: usize,
    },
    /// A whole pass of `cap_expiry` (until it returns `None`).
    Cap {
        bi: usize,
        outbound: bool,
        period_ms: u64,
        limit: usize,
    },
    InsertKey(usize, usize, u32),
    DestroyKey(usize, usize, usize),
    DeleteKeys(Vec<(usize, usize)>),
    /// Delete keys if stored as the key of (business, key, version) is.
    DeleteKeysAsRead(Vec<(usize, usize, u32)>),
    Rewrap(usize, usize, u32, u32),
}

fn w() -> impl Strategy<Value = W> {
    let bi = 0..3usize;
    let id = 0..4usize;
    let p = 0..3usize;
    let d = 0..3usize;
    let ti = 0..TIMES.len();
    let bits = prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 63)];
    prop_oneof![
        2 => (bi.clone(), p.clone(), d.clone(), any::<u8>())
            .prop_map(|(a, b, c, s)| W::PutPeer(a, b, c, s)),
        1 => (bi.clone(), p.clone(), d.clone()).prop_map(|(a, b, c)| W::DeletePeer(a, b, c)),
        1 => (bi.clone(), p.clone(), d.clone(), ti.clone())
            .prop_map(|(a, b, c, n)| W::DeleteIdlePeer(a, b, c, n)),
        4 => (
            (bi.clone(), id.clone(), p.clone(), ti.clone(), ti.clone(), ti.clone()),
            (any::<bool>(), 0..5usize, proptest::option::of(ti.clone()), bits.clone(), bits.clone(), 0..3usize),
        )
            .prop_map(|((bi, id, p, created, expiry, epoch), (outbound, status, next, pending, accepted, sealed_len))| {
                W::PutMessage { bi, id, p, created, expiry, epoch, outbound, status, next, pending, accepted, sealed_len }
            }),
        4 => (
            bi.clone(), id.clone(), prop::bool::weighted(0.2), 0..5usize,
            proptest::option::of(ti.clone()),
            prop_oneof![Just(0u32), Just(1), Just(u32::MAX)], bits.clone(), bits,
        )
            .prop_map(|(bi, id, stale, status, next, attempts, pending, accepted)| W::Update {
                bi, id, stale, status, next, attempts, pending, accepted
            }),
        1 => (bi.clone(), id.clone()).prop_map(|(a, b)| W::FailExpired(a, b)),
        1 => (bi.clone(), id.clone()).prop_map(|(a, b)| W::DeleteMessage(a, b)),
        1 => (any::<bool>(), bi.clone(), p.clone(), 0..2u8, ti.clone())
            .prop_map(|(k, a, b, r, at)| W::PutHold(k, a, b, r, at)),
        1 => (any::<bool>(), bi.clone(), p.clone(), 0..2u8)
            .prop_map(|(k, a, b, r)| W::DeleteHold(k, a, b, r)),
        1 => (bi.clone(), 0..5usize).prop_map(|(a, k)| W::Consume(a, k)),
        2 => (bi.clone(), ti.clone(), ti.clone(), 0..4usize)
            .prop_map(|(a, s, e, c)| W::Bill(a, s, e, c)),
        1 => (bi.clone(), prop_oneof![Just(1u64), Just(2), Just(u64::MAX)], ti.clone(), ti.clone())
            .prop_map(|(a, id, c, at)| W::Take(a, id, c, at)),
        1 => (bi, prop_oneof![Just(1u64), Just(2), Just(u64::MAX)]).prop_map(|(a, id)| W::Settle(a, id)),
    ]
}

fn act() -> impl Strategy<Value = Act> {
    let ti = 0..TIMES.len();
    prop_oneof![
        8 => (proptest::collection::vec(w(), 0..5), proptest::option::of(0..2u8))
            .prop_map(|(ws, f)| Act::Commit(ws, f)),
        1 => (0..2u8).prop_map(Act::TakeOver),
        2 => (ti.clone(), ti.clone(), proptest::collection::vec((any::<bool>(), 0..3usize, 0..3usize), 0..2), prop_oneof![0..4usize, Just(usize::MAX)])
            .prop_map(|(now, abandon, holds, limit)| Act::DeleteExpired { now, abandon, holds, limit }),
        1 => (0..3usize, any::<bool>(), prop_oneof![Just(0u64), Just(1), Just(999), Just(1_000), Just(u64::MAX / 2 - 1), Just(1 << 63), Just(u64::MAX - 1), Just(u64::MAX)], prop_oneof![0..3usize, Just(usize::MAX)])
            .prop_map(|(bi, outbound, period_ms, limit)| Act::Cap { bi, outbound, period_ms, limit }),
        2 => (0..3usize, 0..5usize, prop_oneof![1..4u32, Just(0), Just(u32::MAX)]).prop_map(|(a, k, v)| Act::InsertKey(a, k, v)),
        1 => (0..3usize, 0..5usize, ti).prop_map(|(a, k, at)| Act::DestroyKey(a, k, at)),
        1 => proptest::collection::vec((0..3usize, 0..5usize), 0..3).prop_map(Act::DeleteKeys),
        1 => proptest::collection::vec((0..3usize, 0..5usize, 1..4u32), 0..3).prop_map(Act::DeleteKeysAsRead),
        1 => (0..3usize, 0..5usize, 1..4u32, 1..5u32).prop_map(|(a, k, e, v)| Act::Rewrap(a, k, e, v)),
    ]
}

fn writer(n: u8) -> WriterId {
    WriterId::from_bytes([n + 1; 16])
}

/// The op for `w`, reading stored bookkeeping from `reference`.
async fn op(w: &W, reference: &dyn Storage) -> Op {
    match *w {
        W::PutPeer(bi, p, d, s) => Op::PutPeer {
            business: b(bi),
            peer: peer(p, d),
            sealed: vec![s; usize::from(s % 3)],
        },
        W::DeletePeer(bi, p, d) => Op::DeletePeer {
            business: b(bi),
            peer: peer(p, d),
        },
        W::DeleteIdlePeer(bi, p, d, now) => Op::DeleteIdlePeer {
            business: b(bi),
            peer: peer(p, d),
            now: t(now),
        },
        W::PutMessage {
            bi,
            id,
            p,
            created,
            expiry,
            epoch,
            outbound,
            status,
            next,
            pending,
            accepted,
            sealed_len,
        } => {
            let status = STATUSES[status];
            Op::PutMessage(Box::new(MessageRecord {
                business: b(bi),
                id: mid(id),
                direction: if outbound {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                },
                phone: ph(p),
                created: t(created),
                expiry: t(expiry),
                epoch: Epoch::ending_at(t(epoch)),
                delivery: Delivery {
                    status,
                    failure: (status == Status::Failed).then_some(FailureReason::Refused),
                    attempts: 2,
                    next_attempt: next.map(t),
                    pending_devices: pending,
                    overdue_at: None,
                    told: None,
                    accepted_by: accepted,
                },
                sealed: vec![7; sealed_len * 5],
            }))
        }
        W::Update {
            bi,
            id,
            stale,
            status,
            next,
            attempts,
            pending,
            accepted,
        } => {
            let stored = reference
                .message(b(bi), mid(id))
                .await
                .unwrap()
                .map(|m| m.delivery);
            let expected = match stored {
                Some(d) if !stale => d,
                _ => Delivery::queued(t(0)),
            };
            let status = STATUSES[status];
            Op::UpdateDelivery {
                business: b(bi),
                id: mid(id),
                expected,
                delivery: Delivery {
                    status,
                    failure: (status == Status::Failed).then_some(FailureReason::NoSession),
                    attempts,
                    next_attempt: next.map(t),
                    pending_devices: pending,
                    overdue_at: None,
                    told: None,
                    accepted_by: accepted,
                },
            }
        }
        W::FailExpired(bi, id) => Op::FailExpired {
            business: b(bi),
            id: mid(id),
        },
        W::DeleteMessage(bi, id) => Op::DeleteMessage {
            business: b(bi),
            id: mid(id),
        },
        W::PutHold(k, bi, p, r, at) => Op::PutHold(Hold {
            scope: scope(k, bi, p),
            reference: format!("case-{r}"),
            placed: t(at),
        }),
        W::DeleteHold(k, bi, p, r) => Op::DeleteHold {
            scope: scope(k, bi, p),
            reference: format!("case-{r}"),
        },
        W::Consume(bi, k) => Op::ConsumeKey(kid(bi, k)),
        W::Bill(bi, s, e, c) => Op::Bill {
            business: b(bi),
            start: t(s),
            end: t(e),
            category: Category::ALL[c],
        },
        W::Take(bi, id, closed, at) => Op::TakeBilling {
            business: b(bi),
            id: TakeId::new(id).unwrap(),
            closed_by: t(closed),
            at: t(at),
        },
        W::Settle(bi, id) => Op::SettleBilling {
            business: b(bi),
            id: TakeId::new(id).unwrap(),
        },
    }
}

fn err<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(StoreError::Conflict) => "Conflict".into(),
        Err(StoreError::Superseded) => "Superseded".into(),
        Err(StoreError::Corrupt(m)) => format!("Corrupt({m})"),
        Err(StoreError::Backend(m)) => format!("Backend({m})"),
        Err(e) => format!("{e:?}"),
    }
}

/// The batch of a commit, built from `reference` as it stands.
async fn prepare(a: &Act, reference: &dyn Storage) -> Option<Batch> {
    let Act::Commit(ws, fence) = a else {
        return None;
    };
    let mut batch = Batch::new();
    for w in ws {
        batch.push(op(w, reference).await);
    }
    if let Some(f) = fence {
        batch.fenced(writer(*f));
    }
    Some(batch)
}

/// Run `a` (its batch `prepared`) on `s`; its outcome as text.
async fn run_act(a: &Act, prepared: Option<Batch>, s: &dyn Storage) -> String {
    match a {
        Act::Commit(..) => err(s.commit(prepared.unwrap()).await),
        Act::TakeOver(n) => err(s.take_over(writer(*n)).await),
        Act::DeleteExpired {
            now,
            abandon,
            holds,
            limit,
        } => {
            let holds: Vec<HoldScope> = holds.iter().map(|&(k, bi, p)| scope(k, bi, p)).collect();
            err(s.delete_expired(t(*now), t(*abandon), &holds, *limit).await)
        }
        Act::Cap {
            bi,
            outbound,
            period_ms,
            limit,
        } => {
            let dir = if *outbound {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            let mut after = None;
            for _ in 0..20 {
                match s
                    .cap_expiry(
                        b(*bi),
                        dir,
                        Duration::from_millis(*period_ms),
                        after,
                        *limit,
                    )
                    .await
                {
                    Ok(None) => return "Ok".into(),
                    Ok(Some(next)) => after = Some(next),
                    Err(e) => return err::<()>(Err(e)),
                }
            }
            "did not finish".into()
        }
        Act::InsertKey(bi, k, v) => err(s.insert_key(wkey(*bi, *k, *v)).await),
        Act::DestroyKey(bi, k, at) => err(s.destroy_key(&kid(*bi, *k), t(*at)).await),
        Act::DeleteKeys(ks) => {
            let ids: Vec<KeyId> = ks.iter().map(|&(bi, k)| kid(bi, k)).collect();
            err(s.delete_keys(&ids).await)
        }
        Act::DeleteKeysAsRead(ks) => {
            let keys: Vec<WrappedKey> = ks.iter().map(|&(bi, k, v)| wkey(bi, k, v)).collect();
            err(s.delete_keys_as_read(&keys).await)
        }
        Act::Rewrap(bi, k, expected, v) => err(s.rewrap_key(wkey(*bi, *k, *v), *expected).await),
    }
}

/// Everything a reader can learn of the small world, as text lines.
async fn observe(s: &dyn Storage) -> Vec<String> {
    let mut out = Vec::new();
    out.push(format!("census {:?}", s.census().await.unwrap()));
    for ni in 0..TIMES.len() {
        let now = t(ni);
        for limit in [1usize, usize::MAX] {
            let due: Vec<_> = s
                .due_messages(now, limit)
                .await
                .unwrap()
                .iter()
                .map(|m| (m.business, m.id))
                .collect();
            out.push(format!("due {now:?} {limit} {due:?}"));
        }
        // Expired open, paged one at a time.
        let mut after = None;
        let mut paged = Vec::new();
        for _ in 0..40 {
            let page = s.expired_open_messages(now, after, 1).await.unwrap();
            let Some(m) = page.last() else { break };
            after = Some((m.expiry, m.business, m.id));
            paged.push((m.business, m.id));
        }
        out.push(format!("expired_open {now:?} {paged:?}"));
        let mut after = None;
        let mut orphans = Vec::new();
        for _ in 0..60 {
            let page = s.orphan_peers(now, after, 2).await.unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            orphans.extend(page);
        }
        out.push(format!("orphans {now:?} {orphans:?}"));
        for limit in [1usize, usize::MAX] {
            out.push(format!(
                "ended {now:?} {limit} {:?}",
                s.ended_epoch_keys(now, limit).await.unwrap()
            ));
        }
    }
    for (ti, bi, id) in [(0, 0, 0), (2, 0, 2), (6, 2, 3), (3, 1, 1), (6, 0, 0)] {
        let cursor = Some((t(ti), b(bi), mid(id)));
        let page: Vec<_> = s
            .expired_open_messages(t(6), cursor, 100)
            .await
            .unwrap()
            .iter()
            .map(|m| (m.business, m.id))
            .collect();
        out.push(format!("expired_open after {cursor:?} {page:?}"));
        let cursor = Some((b(bi), peer(id % 3, ti % 3)));
        out.push(format!(
            "orphans after {cursor:?} {:?}",
            s.orphan_peers(t(ti), cursor, 100).await.unwrap()
        ));
        let cursor = Some(kid(bi, id + ti));
        out.push(format!(
            "below after {cursor:?} {:?}",
            s.keys_wrapped_below(b(id % 3), 3, cursor, 100)
                .await
                .unwrap()
                .iter()
                .map(|k| k.id)
                .collect::<Vec<_>>()
        ));
    }
    out.push(format!(
        "businesses {:?}",
        s.message_businesses().await.unwrap()
    ));
    out.push(format!("holds {:?}", s.holds().await.unwrap()));
    out.push(format!(
        "billing_businesses {:?}",
        s.billing_businesses().await.unwrap()
    ));
    for bi in 0..BUSINESSES.len() {
        out.push(format!(
            "billing {bi} {:?}",
            s.billing(b(bi)).await.unwrap()
        ));
        out.push(format!(
            "epochs {bi} {:?}",
            s.message_epochs(b(bi), None).await.unwrap()
        ));
        // The peers stored here are no envelopes: the same refusal.
        out.push(format!(
            "peer epochs {bi} {:?}",
            s.peer_epochs(b(bi), None).await.map_err(|e| e.to_string())
        ));
        for p in 0..3 {
            out.push(format!(
                "epochs {bi} {p} {:?}",
                s.message_epochs(b(bi), Some(ph(p))).await.unwrap()
            ));
            out.push(format!(
                "peer epochs {bi} {p} {:?}",
                s.peer_epochs(b(bi), Some(ph(p)))
                    .await
                    .map_err(|e| e.to_string())
            ));
            out.push(format!(
                "devices {bi} {p} {:?}",
                s.peer_devices(b(bi), ph(p)).await.unwrap()
            ));
            for d in 0..3 {
                out.push(format!(
                    "peer {bi} {p} {d} {:?}",
                    s.peer(b(bi), peer(p, d)).await.unwrap()
                ));
            }
        }
        for id in 0..4 {
            out.push(format!(
                "message {bi} {id} {:?}",
                s.message(b(bi), mid(id)).await.unwrap()
            ));
            if let Some(m) = s.message(b(bi), mid(id)).await.unwrap() {
                out.push(format!("sealed {:?}", m.sealed));
            }
        }
        for k in 0..5 {
            out.push(format!(
                "key {bi} {k} {:?}",
                s.key(&kid(bi, k)).await.unwrap()
            ));
        }
        for v in [0, 1, 2, 3, 4, u32::MAX] {
            out.push(format!(
                "count_under {bi} {v} {:?}",
                s.count_wrapped_under(b(bi), v).await.unwrap()
            ));
            let mut after = None;
            let mut below = Vec::new();
            for _ in 0..20 {
                let page = s.keys_wrapped_below(b(bi), v, after, 1).await.unwrap();
                let Some(k) = page.last() else { break };
                after = Some(k.id);
                below.push(k.id);
            }
            out.push(format!("below {bi} {v} {below:?}"));
        }
        for kind in [KeyKind::Epoch, KeyKind::SignalPreKey] {
            let mut after = None;
            let mut of_kind = Vec::new();
            for _ in 0..20 {
                let page = s.keys_of_kind(b(bi), kind, after, 1).await.unwrap();
                let Some(k) = page.last() else { break };
                after = Some(k.id.id);
                of_kind.push(k.id);
            }
            out.push(format!("of_kind {bi} {kind:?} {of_kind:?}"));
        }
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("store.db"), SqliteConfig::default()).unwrap();
    (dir, store)
}

/// Drive both backends in lockstep; the first step where they differ.
async fn differ(acts: &[Act]) -> Result<(), String> {
    let memory = Arc::new(MemoryStore::new());
    let (_dir, sqlite) = sqlite();
    for (i, a) in acts.iter().enumerate() {
        let batch = prepare(a, &*memory).await;
        let m = run_act(a, batch.clone(), &*memory).await;
        let s = run_act(a, batch, &sqlite).await;
        if m != s {
            return Err(format!("step {i} {a:?}: memory {m} sqlite {s}"));
        }
        let (mo, so) = (observe(&*memory).await, observe(&sqlite).await);
        if let Some((x, y)) = mo.iter().zip(&so).find(|(x, y)| x != y) {
            return Err(format!("after step {i} {a:?}:\n memory {x}\n sqlite {y}"));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("BACKEND_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32)
    ))]

    /// Random sequences of batches, fenced batches, take-overs, sweeps, expiry caps and key
    /// writes, over pools of edge values (time 0 and `u64::MAX`, business
    /// `u64::MAX`, device `u32::MAX`, all-zero and all-ones ids, equal
    /// timestamps), give the same answers and the same observable state on
    /// the memory and the SQLite backend. `BACKEND_CASES` / `BACKEND_LEN`
    /// widen the search (4,000 cases of 12 steps and 800 of 40 passed).
    #[test]
    fn both_backends_agree_on_random_sequences(acts in proptest::collection::vec(act(), 1..std::env::var("BACKEND_LEN").ok().and_then(|c| c.parse().ok()).unwrap_or(12usize))) {
        let result = rt().block_on(differ(&acts));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

// ---------------------------------------------------------------------------
// Edges found by the comparison.

/// A delivered inbound message of business 1 created at `created`,
/// expiring at `expiry`.
fn plain_message(id: usize, created: u64, expiry: u64) -> MessageRecord {
    MessageRecord {
        business: b(0),
        id: mid(id),
        direction: Direction::Inbound,
        phone: ph(0),
        created: Timestamp::from_millis(created),
        expiry: Timestamp::from_millis(expiry),
        epoch: Epoch::ending_at(Timestamp::from_millis(expiry)),
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
        sealed: vec![1; 8],
    }
}

/// `Storage::cap_expiry` moves an expiry to creation plus the period, never
/// earlier, however long the period: both backends agree at periods of
/// 2^63 ms and more (which cap only expiries later still), and a period of
/// `u64::MAX` ms or more caps nothing. (SQLite clamped the period to
/// `i64::MAX` ms, so it moved an expiry of 2^63 ms, under a period of 2^63
/// ms, 1 ms earlier, and capped expiries under `Duration::MAX`.)
#[tokio::test]
async fn cap_expiry_adds_the_whole_of_a_period_past_2_63_ms() {
    let cases = [
        // (period, expiry, expiry once capped), created at 0.
        (Duration::from_millis(1 << 63), 1 << 63, 1 << 63),
        (Duration::from_millis(1 << 63), u64::MAX, 1 << 63),
        (Duration::from_millis(u64::MAX - 1), u64::MAX, u64::MAX - 1),
        (Duration::from_millis(u64::MAX), u64::MAX, u64::MAX),
        (Duration::MAX, u64::MAX, u64::MAX),
    ];
    for (period, expiry, capped) in cases {
        let message = plain_message(0, 0, expiry);
        let memory = MemoryStore::new();
        let (_dir, sqlite) = sqlite();
        for s in [&memory as &dyn Storage, &sqlite] {
            s.commit(Batch::from(Op::PutMessage(Box::new(message.clone()))))
                .await
                .unwrap();
            let mut after = None;
            while let Some(next) = s
                .cap_expiry(b(0), Direction::Inbound, period, after, 10)
                .await
                .unwrap()
            {
                after = Some(next);
            }
        }
        let in_memory = memory.message(b(0), mid(0)).await.unwrap().unwrap();
        let in_sqlite = sqlite.message(b(0), mid(0)).await.unwrap().unwrap();
        let capped = Timestamp::from_millis(capped);
        assert_eq!(in_memory.expiry, capped, "memory, {period:?} {expiry}");
        assert_eq!(in_sqlite.expiry, capped, "sqlite, {period:?} {expiry}");
    }
}

// ---------------------------------------------------------------------------
// The SQLite backend alone: the working directory (process-wide, so here
// rather than beside the unit tests, which must not see it change).

/// Whether `needle` occurs in the database file at `path` or its log.
fn files_contain(path: &std::path::Path, needle: &[u8]) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.to_owned(), std::path::PathBuf::from(wal)]
        .iter()
        .any(|p| {
            std::fs::read(p)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
}

/// In a working directory, restoring the one before when dropped (even if
/// the test panics). One test at a time: the directory is the process's.
struct Cwd(
    std::path::PathBuf,
    #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
);
impl Cwd {
    fn enter(dir: &std::path::Path) -> Self {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let one = ONE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cwd = Self(std::env::current_dir().unwrap(), one);
        std::env::set_current_dir(dir).unwrap();
        cwd
    }
}
impl Drop for Cwd {
    fn drop(&mut self) {
        let _ = std::env::set_current_dir(&self.0);
    }
}

/// A store opened with a relative path keeps using its file after the
/// process changes its working directory (a daemon's `chdir("/")`): fresh
/// read connections read it, and a scrub empties its log. Before, `open`
/// kept the path as given and every later connection resolved it again:
/// reads beyond the pooled connections opened another file or none, and
/// scrubs failed, leaving destroyed keys in the log.
#[test]
fn a_store_opened_by_a_relative_path_survives_a_change_of_directory() {
    use custodian::store::KeyStore;
    let epoch_key = |id: u64, blob: Vec<u8>| WrappedKey {
        id: KeyId {
            business: b(0),
            kind: KeyKind::Epoch,
            id,
        },
        kek_version: 1,
        blob,
    };
    let home = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let _cwd = Cwd::enter(home.path());
    // No pooled readers: every read opens a connection.
    let config = SqliteConfig {
        readers: 0,
        ..SqliteConfig::default()
    };
    let store = SqliteStore::open("custodian.db", config).unwrap();
    let absolute = home.path().canonicalize().unwrap().join("custodian.db");
    assert_eq!(store.path(), absolute);
    let secret: Vec<u8> = (0..48u8).map(|i| i ^ 0xa5).collect();
    rt().block_on(async {
        store
            .insert_key(epoch_key(1, secret.clone()))
            .await
            .unwrap();
        store.insert_key(epoch_key(2, vec![7; 48])).await.unwrap();
        store.delete_keys(&[epoch_key(1, vec![]).id]).await.unwrap();
    });
    assert!(
        files_contain(&absolute, &secret),
        "the test cannot see the log"
    );

    std::env::set_current_dir(elsewhere.path()).unwrap();
    let rt = rt();
    let read = rt.block_on(store.key(&epoch_key(2, vec![]).id));
    assert!(
        matches!(read, Ok(Some(_))),
        "a live key no longer reads: {read:?}"
    );
    let scrub = rt.block_on(store.scrub());
    assert!(scrub.is_ok(), "scrub failed after a chdir: {scrub:?}");
    assert!(
        !files_contain(&absolute, &secret),
        "the deleted key is still in the log after the scrub"
    );
    assert!(!elsewhere.path().join("custodian.db").exists());
}

/// A store created by a relative name beginning `file:` (a legal file
/// name) is created as named, and opens again. Before, SQLite read the
/// temporary name as a URI and built the database in another file, left
/// beside it; an empty file took the name, and every open refused it.
#[test]
fn a_store_named_file_colon_is_created_as_named() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = Cwd::enter(dir.path());
    let first = SqliteStore::open("file:store.db", SqliteConfig::default()).map(drop);
    let again = SqliteStore::open("file:store.db", SqliteConfig::default()).map(drop);
    drop(cwd);
    assert!(first.is_ok() && again.is_ok(), "{first:?} then {again:?}");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["file:store.db"], "left in the directory");
}

/// A new store and its logs are readable by their owner alone: they hold
/// phone hashes, holds and, until a scrub, deleted rows. Before, they took
/// the umask's mode (0644 as usual).
#[cfg(unix)]
#[test]
fn a_new_store_and_its_logs_are_its_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
    rt().block_on(
        store.commit(Batch::from(Op::PutMessage(Box::new(plain_message(
            0, 1_000, 2_000,
        ))))),
    )
    .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "store{suffix}: {mode:o}");
    }
}
