//! The storage conformance suite: every backend keeps the documented
//! semantics of [`KeyStore`] and [`Storage`], the same way.
//!
//! Each test body below is written once, against `&Backend`, and
//! [`conformance!`] instantiates it for every backend: [`MemoryStore`]
//! always, [`SqliteStore`] (on a fresh file in a temporary directory) with
//! the `sqlite` feature. A backend passes when its answers equal those the
//! trait documents, which the in-memory store defines by construction.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::integrity::Category;
use custodian::keys::{
    Epoch, KekCheck, KekContext, KekRing, KeyEntry, KeyId, KeyKind, SecretKey, WrappedKey,
};
use custodian::store::{
    Batch, BillingCount, BillingTake, Census, Delivery, Direction, ExpiredMessage, FailureReason,
    Hold, HoldScope, MemoryStore, MessageRecord, Op, PeerId, Status, Storage, StoreError,
    StoredBilling, TakeId,
};
#[cfg(feature = "sqlite")]
use custodian::store::{Durability, SqliteConfig, SqliteStore};
use custodian::time::Timestamp;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Backends

/// A store under test, and what the suite needs to know about its backend.
struct Backend {
    store: Arc<dyn Storage>,
    /// A write this backend refuses, failing its batch.
    unappliable: fn() -> Op,
    #[cfg(feature = "sqlite")]
    sqlite: Option<(tempfile::TempDir, SqliteConfig)>,
}

impl Backend {
    fn memory() -> Self {
        Self {
            store: Arc::new(MemoryStore::new()),
            unappliable: consume_a_missing_key,
            #[cfg(feature = "sqlite")]
            sqlite: None,
        }
    }

    #[cfg(feature = "sqlite")]
    fn sqlite() -> Self {
        Self::sqlite_with(SqliteConfig::default())
    }

    #[cfg(feature = "sqlite")]
    fn sqlite_with(config: SqliteConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db"), config.clone()).unwrap();
        Self {
            store: Arc::new(store),
            unappliable: too_big_for_sqlite,
            sqlite: Some((dir, config)),
        }
    }

    /// Close the store and open it again (the memory store has nothing to
    /// close: it stays as it is). The caller must hold no other handle.
    async fn reopen(&mut self) {
        #[cfg(feature = "sqlite")]
        if let Some((dir, config)) = &self.sqlite {
            assert_eq!(Arc::strong_count(&self.store), 1, "a handle is still open");
            // Replacing the handle drops (closes) the old store first.
            self.store = Arc::new(MemoryStore::new());
            self.store =
                Arc::new(SqliteStore::open(dir.path().join("store.db"), config.clone()).unwrap());
        }
    }
}

/// Every store refuses to consume a key it does not hold (`Conflict`): the
/// one write the memory store refuses.
fn consume_a_missing_key() -> Op {
    Op::ConsumeKey(KeyId {
        business: business(1),
        kind: KeyKind::SignalPreKey,
        id: 999,
    })
}

/// SQLite refuses any value over its length limit (10^9 bytes) with
/// `SQLITE_TOOBIG`. The zeroed allocation is lazily mapped: it costs no memory.
#[cfg(feature = "sqlite")]
fn too_big_for_sqlite() -> Op {
    Op::PutPeer {
        business: business(1),
        peer: peer(999, 0),
        sealed: vec![0; 1_000_000_001],
    }
}

/// Instantiate every listed test body for every backend.
macro_rules! conformance {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod memory {
            $(
                $(#[$attr])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut backend = super::Backend::memory();
                    super::$name(&mut backend).await;
                }
            )*
        }

        #[cfg(feature = "sqlite")]
        mod sqlite {
            $(
                $(#[$attr])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut backend = super::Backend::sqlite();
                    super::$name(&mut backend).await;
                }
            )*
        }
    };
}

conformance!(
    kek_ring_put_is_compare_and_swap,
    concurrent_ring_writers_exactly_one_wins_each_revision,
    insert_key_keeps_the_first_writer_and_returns_it,
    concurrent_inserts_of_one_key_all_see_the_same_winner,
    rewrap_replaces_only_a_live_key_under_the_expected_version,
    destroy_key_leaves_a_tombstone_that_blocks_reinsertion,
    delete_keys_removes_keys_and_tombstones_and_counts_them,
    delete_epoch_keys_spares_the_businesses_of_holds_not_seen,
    a_peer_is_not_deleted_as_idle_under_a_stored_hold,
    keys_wrapped_below_pages_in_key_order_within_the_business,
    count_wrapped_under_counts_live_keys_of_exactly_that_version,
    keys_of_kind_pages_by_id_and_skips_tombstones,
    ended_epoch_keys_are_oldest_first_with_tombstones_and_limited,
    peers_are_replaced_deleted_and_listed_by_device,
    messages_are_stored_once_and_delivery_updates_only_touch_stored_ones,
    a_message_sent_again_is_known_by_its_headers_id_too,
    due_messages_are_earliest_first_and_follow_updates,
    expired_open_messages_are_the_open_ones_earliest_first,
    delete_expired_spares_held_pending_and_live_messages,
    delete_expired_also_spares_what_a_stored_hold_covers,
    message_epochs_are_distinct_sorted_and_filtered_by_phone,
    peer_epochs_are_read_from_the_sealed_headers_and_fail_on_one_that_does_not_parse,
    message_businesses_lists_each_business_once_in_order,
    cap_expiry_shortens_only_later_expiries_of_one_business_and_direction,
    a_peer_is_deleted_as_idle_only_while_its_consumer_has_no_live_message,
    orphan_peers_pages_through_every_idle_peer_in_key_order,
    a_live_message_is_one_of_the_consumer_expiring_later,
    a_consumer_whose_messages_are_deleted_has_none_left,
    holds_are_placed_replaced_released_in_scope_order,
    census_counts_what_is_stored,
    extreme_values_round_trip_and_keep_their_order,
    a_batch_is_all_or_nothing,
    a_fenced_batch_commits_only_for_the_stores_writer,
    a_failing_batch_fails_alone_among_concurrent_ones,
    readers_never_observe_half_a_batch,
    many_tasks_commit_concurrently_and_every_record_is_kept,
    the_retention_sweep_runs_over_the_store,
    billing_is_counted_taken_and_settled_as_documented,
    #[cfg(feature = "testing")]
    vault_and_signal_sessions_run_over_the_store,
);

// ---------------------------------------------------------------------------
// Fixtures

const T0: u64 = 1_767_225_600_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

fn take(n: u64) -> TakeId {
    TakeId::new(n).unwrap()
}

/// A billable message of business `b` on `day` (days from `T0`).
fn bill(b: u64, day: u64, category: Category) -> Op {
    Op::Bill {
        business: business(b),
        start: t(T0 + day * DAY),
        end: t(T0 + (day + 1) * DAY),
        category,
    }
}

/// A stored count.
fn count(take_id: Option<u64>, day: u64, category: Category, count: u64) -> BillingCount {
    BillingCount {
        take: take_id.map(take),
        start: t(T0 + day * DAY),
        end: t(T0 + (day + 1) * DAY),
        category,
        count,
    }
}

fn business(n: u64) -> BusinessId {
    BusinessId::new(n).unwrap()
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// Message ids in numeric order are in byte order too.
fn mid(n: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b[8..].copy_from_slice(&(!n).to_le_bytes());
    MessageId::from_bytes(b)
}

fn phone(n: u64) -> PhoneHash {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b[15] = 0x5a;
    PhoneHash::from_bytes(b)
}

fn peer(phone_n: u64, device: u32) -> PeerId {
    PeerId {
        phone: phone(phone_n),
        device,
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn key(b: u64, kind: KeyKind, id: u64, version: u32) -> WrappedKey {
    WrappedKey {
        id: KeyId {
            business: business(b),
            kind,
            id,
        },
        kek_version: version,
        blob: bytes(id ^ (u64::from(version) << 40) ^ b, 60),
    }
}

fn epoch_key(b: u64, end: u64) -> WrappedKey {
    key(b, KeyKind::Epoch, end, 1)
}

fn ids(keys: &[WrappedKey]) -> Vec<KeyId> {
    keys.iter().map(|k| k.id).collect()
}

struct M {
    business: u64,
    id: u64,
    phone: u64,
    expiry: u64,
    next: Option<u64>,
    status: Status,
    direction: Direction,
}

impl M {
    fn new(business: u64, id: u64, phone: u64, expiry: u64) -> Self {
        Self {
            business,
            id,
            phone,
            expiry,
            next: None,
            status: Status::Delivered,
            direction: Direction::Inbound,
        }
    }

    fn due(mut self, at: u64) -> Self {
        self.next = Some(at);
        self
    }

    fn status(mut self, s: Status) -> Self {
        self.status = s;
        self
    }

    fn outbound(mut self) -> Self {
        self.direction = Direction::Outbound;
        self
    }

    fn record(&self) -> MessageRecord {
        MessageRecord {
            business: business(self.business),
            id: mid(self.id),
            direction: self.direction,
            phone: phone(self.phone),
            created: t(self.expiry.saturating_sub(30 * 24 * HOUR)),
            expiry: t(self.expiry),
            epoch: Epoch::ending_at(t(self.expiry.saturating_add(HOUR) / HOUR * HOUR)),
            delivery: Delivery {
                status: self.status,
                failure: (self.status == Status::Failed).then_some(FailureReason::Refused),
                attempts: 3,
                next_attempt: self.next.map(t),
                pending_devices: 0,
                overdue_at: None,
                told: None,
                accepted_by: 0,
            },
            sealed: bytes(
                self.id ^ (self.business << 32),
                100 + (self.id % 50) as usize,
            ),
        }
    }
}

fn put(m: &M) -> Op {
    Op::PutMessage(Box::new(m.record()))
}

fn put_peer(b: u64, p: PeerId, seed: u64) -> Op {
    Op::PutPeer {
        business: business(b),
        peer: p,
        sealed: bytes(seed, 80),
    }
}

/// A Signal peer record as sealed (envelope kind `03`), its header naming
/// the epoch ending at `epoch_end`: the store reads only the header, so the
/// ciphertext is any bytes.
fn sealed_peer(b: u64, epoch_end: u64, seed: u64) -> Vec<u8> {
    let mut out = b"CSTD\x01\x01\x03".to_vec();
    out.extend_from_slice(&b.to_be_bytes());
    out.extend_from_slice(&bytes(seed, 16));
    out.extend_from_slice(&epoch_end.to_be_bytes());
    out.extend_from_slice(&(epoch_end - 1).to_be_bytes());
    out.extend_from_slice(b"\x02eu");
    out.extend_from_slice(&bytes(seed ^ 1, 12 + 32));
    out.extend_from_slice(&32u32.to_be_bytes());
    out.extend_from_slice(&bytes(seed ^ 2, 32));
    out
}

fn batch(ops: impl IntoIterator<Item = Op>) -> Batch {
    let mut batch = Batch::new();
    for op in ops {
        batch.push(op);
    }
    batch
}

/// The stored bookkeeping of message `id` of business `b`.
async fn stored(s: &dyn Storage, b: u64, id: u64) -> Delivery {
    s.message(business(b), mid(id))
        .await
        .unwrap()
        .unwrap()
        .delivery
}

async fn commit(s: &dyn Storage, ops: impl IntoIterator<Item = Op>) {
    s.commit(batch(ops)).await.unwrap();
}

fn msg_keys(ms: &[MessageRecord]) -> Vec<(BusinessId, MessageId)> {
    ms.iter().map(|m| (m.business, m.id)).collect()
}

fn key_of(b: u64, id: u64) -> (BusinessId, MessageId) {
    (business(b), mid(id))
}

// ---------------------------------------------------------------------------
// Keys

/// The check value of a KEK made of `version`'s byte (the store keeps it as
/// given).
fn check(business: BusinessId, version: u32) -> KekCheck {
    let mut key = [u8::try_from(version).unwrap(); 32];
    KekCheck::of(
        &SecretKey::from_bytes(&mut key),
        &KekContext { business, version },
    )
}

async fn kek_ring_put_is_compare_and_swap(backend: &mut Backend) {
    let s = &*backend.store;
    let b = business(7);
    let r0 = KekRing::new(b, bytes(1, 48), check(b, 1), t(T0));
    assert_eq!(s.ring(b).await.unwrap(), None);
    assert!(matches!(
        s.put_ring(&r0, Some(0)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.ring(b).await.unwrap(),
        None,
        "a lost CAS stored something"
    );
    s.put_ring(&r0, None).await.unwrap();
    assert_eq!(s.ring(b).await.unwrap(), Some(r0.clone()));
    assert!(matches!(
        s.put_ring(&r0, None).await,
        Err(StoreError::Conflict)
    ));

    let (r1, _) = r0
        .add_version(bytes(2, 48), check(b, 2), t(T0 + 1))
        .unwrap();
    assert!(matches!(
        s.put_ring(&r1, Some(1)).await,
        Err(StoreError::Conflict)
    ));
    s.put_ring(&r1, Some(0)).await.unwrap();
    assert_eq!(s.ring(b).await.unwrap(), Some(r1.clone()));
    let r2 = r1.promote(2).unwrap();
    assert!(matches!(
        s.put_ring(&r2, Some(0)).await,
        Err(StoreError::Conflict)
    ));
    s.put_ring(&r2, Some(1)).await.unwrap();
    assert_eq!(s.ring(b).await.unwrap(), Some(r2));
    assert_eq!(s.ring(business(8)).await.unwrap(), None);
}

async fn concurrent_ring_writers_exactly_one_wins_each_revision(backend: &mut Backend) {
    let b = business(3);
    let r0 = KekRing::new(b, bytes(3, 48), check(b, 1), t(T0));
    backend.store.put_ring(&r0, None).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let s = backend.store.clone();
        let r0 = r0.clone();
        tasks.push(tokio::spawn(async move {
            let (next, _) = r0
                .add_version(bytes(100 + i, 48), check(b, 2), t(T0 + i))
                .unwrap();
            (s.put_ring(&next, Some(0)).await, next)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (Ok(()), ring) => winners.push(ring),
            (Err(StoreError::Conflict), _) => {}
            (Err(e), _) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins revision 0");
    assert_eq!(
        backend.store.ring(b).await.unwrap().as_ref(),
        winners.first()
    );
}

async fn insert_key_keeps_the_first_writer_and_returns_it(backend: &mut Backend) {
    let s = &*backend.store;
    let first = key(1, KeyKind::SignalPreKey, 7, 1);
    let mut second = first.clone();
    second.blob = bytes(999, 60);
    second.kek_version = 2;
    assert_eq!(s.key(&first.id).await.unwrap(), None);
    assert_eq!(
        s.insert_key(first.clone()).await.unwrap(),
        KeyEntry::Wrapped(first.clone())
    );
    assert_eq!(
        s.insert_key(second).await.unwrap(),
        KeyEntry::Wrapped(first.clone()),
        "the winner is returned, not the loser"
    );
    assert_eq!(
        s.key(&first.id).await.unwrap(),
        Some(KeyEntry::Wrapped(first.clone()))
    );
    // Neighbours are distinct keys.
    for other in [
        key(2, KeyKind::SignalPreKey, 7, 1),
        key(1, KeyKind::SignalSignedPreKey, 7, 1),
        key(1, KeyKind::SignalPreKey, 8, 1),
    ] {
        assert_eq!(s.key(&other.id).await.unwrap(), None);
        assert_eq!(
            s.insert_key(other.clone()).await.unwrap(),
            KeyEntry::Wrapped(other)
        );
    }
}

async fn concurrent_inserts_of_one_key_all_see_the_same_winner(backend: &mut Backend) {
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let s = backend.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = key(4, KeyKind::PhoneIndex, 0, 1);
            k.blob = bytes(i, 40);
            s.insert_key(k).await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let stored = backend
        .store
        .key(&key(4, KeyKind::PhoneIndex, 0, 1).id)
        .await
        .unwrap()
        .unwrap();
    assert!(answers.iter().all(|a| *a == stored), "{answers:?}");
}

async fn rewrap_replaces_only_a_live_key_under_the_expected_version(backend: &mut Backend) {
    let s = &*backend.store;
    let v1 = key(1, KeyKind::Epoch, T0, 1);
    s.insert_key(v1.clone()).await.unwrap();
    let v2 = key(1, KeyKind::Epoch, T0, 2);
    assert!(!s.rewrap_key(v2.clone(), 2).await.unwrap());
    assert_eq!(
        s.key(&v1.id).await.unwrap(),
        Some(KeyEntry::Wrapped(v1.clone()))
    );
    assert!(s.rewrap_key(v2.clone(), 1).await.unwrap());
    assert_eq!(
        s.key(&v1.id).await.unwrap(),
        Some(KeyEntry::Wrapped(v2.clone()))
    );
    let v3 = key(1, KeyKind::Epoch, T0, 3);
    assert!(
        !s.rewrap_key(v3.clone(), 1).await.unwrap(),
        "a stale rewrap must lose"
    );
    assert_eq!(s.key(&v1.id).await.unwrap(), Some(KeyEntry::Wrapped(v2)));

    // A missing key is not created; a tombstone is not revived.
    let missing = key(1, KeyKind::Epoch, T0 + HOUR, 2);
    assert!(!s.rewrap_key(missing.clone(), 1).await.unwrap());
    assert_eq!(s.key(&missing.id).await.unwrap(), None);
    s.destroy_key(&v1.id, t(T0)).await.unwrap();
    assert!(!s.rewrap_key(v3, 2).await.unwrap());
    assert_eq!(
        s.key(&v1.id).await.unwrap(),
        Some(KeyEntry::Destroyed { at: t(T0) })
    );
}

async fn destroy_key_leaves_a_tombstone_that_blocks_reinsertion(backend: &mut Backend) {
    let s = &*backend.store;
    let k = key(2, KeyKind::SignalSignedPreKey, 5, 1);
    s.insert_key(k.clone()).await.unwrap();
    assert!(s.destroy_key(&k.id, t(T0)).await.unwrap());
    assert_eq!(
        s.key(&k.id).await.unwrap(),
        Some(KeyEntry::Destroyed { at: t(T0) })
    );
    assert_eq!(
        s.insert_key(k.clone()).await.unwrap(),
        KeyEntry::Destroyed { at: t(T0) },
        "a destroyed key is never silently re-created"
    );
    assert!(!s.destroy_key(&k.id, t(T0 + 5)).await.unwrap());
    assert!(matches!(
        s.key(&k.id).await.unwrap(),
        Some(KeyEntry::Destroyed { .. })
    ));
    // Destroying a key that never existed still leaves a tombstone.
    let never = key(2, KeyKind::SignalSignedPreKey, 6, 1);
    assert!(!s.destroy_key(&never.id, t(T0 + 9)).await.unwrap());
    assert_eq!(
        s.key(&never.id).await.unwrap(),
        Some(KeyEntry::Destroyed { at: t(T0 + 9) })
    );
    // Tombstones are not live keys.
    assert!(
        s.keys_of_kind(business(2), KeyKind::SignalSignedPreKey, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.count_wrapped_under(business(2), 1).await.unwrap(), 0);
    assert!(
        s.keys_wrapped_below(business(2), 9, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn delete_keys_removes_keys_and_tombstones_and_counts_them(backend: &mut Backend) {
    let s = &*backend.store;
    let live = epoch_key(3, T0);
    let dead = epoch_key(3, T0 + HOUR);
    let absent = epoch_key(3, T0 + 2 * HOUR);
    s.insert_key(live.clone()).await.unwrap();
    s.insert_key(dead.clone()).await.unwrap();
    s.destroy_key(&dead.id, t(T0)).await.unwrap();
    assert_eq!(
        s.ended_epoch_keys(t(T0 + 9 * HOUR), 10).await.unwrap(),
        vec![live.id, dead.id]
    );
    assert_eq!(
        s.delete_keys(&[live.id, dead.id, absent.id]).await.unwrap(),
        2
    );
    assert_eq!(s.key(&live.id).await.unwrap(), None);
    assert_eq!(s.key(&dead.id).await.unwrap(), None);
    assert!(
        s.ended_epoch_keys(t(T0 + 9 * HOUR), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.delete_keys(&[]).await.unwrap(), 0);
    // Deleted outright, the id is free again.
    assert_eq!(
        s.insert_key(dead.clone()).await.unwrap(),
        KeyEntry::Wrapped(dead)
    );
    // A consumed prekey deleted through a batch, once: consuming it again
    // fails the whole batch, which changes nothing.
    let prekey = key(3, KeyKind::SignalPreKey, 11, 1);
    s.insert_key(prekey.clone()).await.unwrap();
    commit(s, [Op::ConsumeKey(prekey.id)]).await;
    assert_eq!(s.key(&prekey.id).await.unwrap(), None);
    let mut again = Batch::new();
    again.push(put_peer(3, peer(3, 0), 1));
    again.push(Op::ConsumeKey(prekey.id));
    assert!(matches!(s.commit(again).await, Err(StoreError::Conflict)));
    assert_eq!(s.peer(business(3), peer(3, 0)).await.unwrap(), None);
    // A tombstone is not a live key either.
    let destroyed = key(3, KeyKind::SignalPreKey, 12, 1);
    s.insert_key(destroyed.clone()).await.unwrap();
    s.destroy_key(&destroyed.id, t(T0)).await.unwrap();
    let mut batch = Batch::new();
    batch.push(Op::ConsumeKey(destroyed.id));
    assert!(matches!(s.commit(batch).await, Err(StoreError::Conflict)));
}

async fn keys_wrapped_below_pages_in_key_order_within_the_business(backend: &mut Backend) {
    let s = &*backend.store;
    let b = 5;
    let mut expected = Vec::new();
    for (kind, id, version) in [
        (KeyKind::Epoch, T0, 1),
        (KeyKind::Epoch, T0 + HOUR, 3),
        (KeyKind::Epoch, u64::MAX, 2),
        (KeyKind::SignalIdentity, 0, 1),
        (KeyKind::SignalPreKey, 1, 2),
        (KeyKind::SignalPreKey, 2, 3),
        (KeyKind::SignalPreKey, 1 << 63, 1),
        (KeyKind::PhoneIndex, 0, 2),
    ] {
        let k = key(b, kind, id, version);
        s.insert_key(k.clone()).await.unwrap();
        if version < 3 {
            expected.push(k);
        }
    }
    let dead = key(b, KeyKind::SignalPreKey, 5, 1);
    s.insert_key(dead.clone()).await.unwrap();
    s.destroy_key(&dead.id, t(T0)).await.unwrap();
    for other in [4, 6] {
        s.insert_key(key(other, KeyKind::Epoch, T0, 1))
            .await
            .unwrap();
    }
    expected.sort_by_key(|k| k.id);

    let mut pages = Vec::new();
    let mut after = None;
    for round in 0.. {
        assert!(round < 100, "paging never ends");
        let page = s
            .keys_wrapped_below(business(b), 3, after, 2)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        pages.extend(page);
    }
    assert_eq!(ids(&pages), ids(&expected));
    assert_eq!(pages, expected, "the wrapped bytes come back as stored");

    // A cursor from an earlier business starts at the beginning; one from a
    // later business is past the end.
    let from_before = KeyId {
        business: business(4),
        kind: KeyKind::PhoneIndex,
        id: u64::MAX,
    };
    assert_eq!(
        ids(&s
            .keys_wrapped_below(business(b), 3, Some(from_before), 100)
            .await
            .unwrap()),
        ids(&expected)
    );
    let from_after = KeyId {
        business: business(6),
        kind: KeyKind::Epoch,
        id: 0,
    };
    assert!(
        s.keys_wrapped_below(business(b), 3, Some(from_after), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.keys_wrapped_below(business(b), 1, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.keys_wrapped_below(business(b), 3, None, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn count_wrapped_under_counts_live_keys_of_exactly_that_version(backend: &mut Backend) {
    let s = &*backend.store;
    for (b, id, version) in [(1, 1, 1), (1, 2, 2), (1, 3, 2), (1, 4, 2), (2, 1, 2)] {
        s.insert_key(key(b, KeyKind::SignalPreKey, id, version))
            .await
            .unwrap();
    }
    s.destroy_key(&key(1, KeyKind::SignalPreKey, 4, 2).id, t(T0))
        .await
        .unwrap();
    assert_eq!(s.count_wrapped_under(business(1), 2).await.unwrap(), 2);
    assert_eq!(s.count_wrapped_under(business(1), 1).await.unwrap(), 1);
    assert_eq!(s.count_wrapped_under(business(1), 3).await.unwrap(), 0);
    assert_eq!(s.count_wrapped_under(business(2), 2).await.unwrap(), 1);
    assert_eq!(s.count_wrapped_under(business(3), 2).await.unwrap(), 0);
}

async fn keys_of_kind_pages_by_id_and_skips_tombstones(backend: &mut Backend) {
    let s = &*backend.store;
    let kind = KeyKind::SignalPreKey;
    let mut expected = Vec::new();
    for id in [0, 1, 2, 40, 1 << 63, u64::MAX - 1, u64::MAX] {
        let k = key(9, kind, id, 1);
        s.insert_key(k.clone()).await.unwrap();
        expected.push(k);
    }
    let dead = key(9, kind, 3, 1);
    s.insert_key(dead.clone()).await.unwrap();
    s.destroy_key(&dead.id, t(T0)).await.unwrap();
    // Other kinds and businesses around it.
    for k in [
        key(9, KeyKind::SignalSignedPreKey, 1, 1),
        key(9, KeyKind::SignalIdentity, 0, 1),
        key(8, kind, 5, 1),
        key(10, kind, 5, 1),
    ] {
        s.insert_key(k).await.unwrap();
    }
    let mut pages = Vec::new();
    let mut after = None;
    for round in 0.. {
        assert!(round < 100, "paging never ends");
        let page = s.keys_of_kind(business(9), kind, after, 3).await.unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(last.id.id);
        pages.extend(page);
    }
    assert_eq!(pages, expected);
    assert_eq!(
        ids(&s.keys_of_kind(business(9), kind, Some(2), 2).await.unwrap()),
        ids(&expected[3..5])
    );
    assert!(
        s.keys_of_kind(business(9), kind, Some(u64::MAX), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.keys_of_kind(business(9), kind, None, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn ended_epoch_keys_are_oldest_first_with_tombstones_and_limited(backend: &mut Backend) {
    let s = &*backend.store;
    // (business, end): inserted out of order, one end shared by two businesses.
    let ends = [
        (3, T0 + 2 * HOUR),
        (1, T0 + HOUR),
        (2, T0 + HOUR),
        (1, T0),
        (4, T0 + 5 * HOUR),
    ];
    for (b, end) in ends {
        s.insert_key(epoch_key(b, end)).await.unwrap();
    }
    s.destroy_key(&epoch_key(1, T0).id, t(T0)).await.unwrap();
    // A tombstone for a key never stored is listed too, and other kinds never are.
    s.destroy_key(&epoch_key(5, T0 + 2 * HOUR).id, t(T0))
        .await
        .unwrap();
    s.insert_key(key(1, KeyKind::SignalPreKey, T0 - 1, 1))
        .await
        .unwrap();

    let id = |b, end| epoch_key(b, end).id;
    let all = vec![
        id(1, T0),
        id(1, T0 + HOUR),
        id(2, T0 + HOUR),
        id(3, T0 + 2 * HOUR),
        id(5, T0 + 2 * HOUR),
    ];
    assert_eq!(
        s.ended_epoch_keys(t(T0 + 2 * HOUR), 100).await.unwrap(),
        all,
        "ended at or before now, by end then business"
    );
    assert_eq!(
        s.ended_epoch_keys(t(T0 + 2 * HOUR), 3).await.unwrap(),
        all[..3]
    );
    assert_eq!(
        s.ended_epoch_keys(t(T0 + HOUR - 1), 100).await.unwrap(),
        all[..1]
    );
    assert!(s.ended_epoch_keys(t(T0 - 1), 100).await.unwrap().is_empty());
    assert!(
        s.ended_epoch_keys(t(T0 + 9 * HOUR), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------
// Peers and messages

/// A batch fenced by a writer commits only while that writer is the
/// store's (the last to take it over), whole or not at all; unfenced
/// batches commit whoever the writer is; the writer outlives a reopen.
async fn a_fenced_batch_commits_only_for_the_stores_writer(backend: &mut Backend) {
    use custodian::store::WriterId;

    let (a, b) = (
        WriterId::from_bytes([0xa; 16]),
        WriterId::from_bytes([0xb; 16]),
    );
    let fenced = |writer: WriterId, ops: Vec<Op>| {
        let mut batch = batch(ops);
        batch.fenced(writer);
        batch
    };
    let superseded = |result: Result<(), StoreError>| matches!(result, Err(StoreError::Superseded));
    let s = &*backend.store;
    // No writer yet: the batch's is not the store's.
    assert!(superseded(
        s.commit(fenced(a, vec![put_peer(1, peer(1, 0), 1)])).await
    ));
    assert_eq!(s.peer(business(1), peer(1, 0)).await.unwrap(), None);
    assert!(superseded(s.commit(fenced(a, vec![])).await));

    s.take_over(a).await.unwrap();
    s.commit(fenced(a, vec![])).await.unwrap();
    let two = vec![put_peer(1, peer(1, 0), 1), put_peer(1, peer(1, 1), 2)];
    s.commit(fenced(a, two)).await.unwrap();
    commit(s, [put_peer(1, peer(2, 0), 3)]).await;

    s.take_over(b).await.unwrap();
    s.take_over(b).await.unwrap();
    assert!(superseded(
        s.commit(fenced(a, vec![put_peer(1, peer(1, 0), 9)])).await
    ));
    let two = vec![put_peer(1, peer(1, 1), 9), put_peer(1, peer(3, 0), 9)];
    assert!(superseded(s.commit(fenced(a, two)).await));
    // An empty batch asks only whether its writer is still the store's.
    assert!(superseded(s.commit(fenced(a, vec![])).await));
    s.commit(fenced(b, vec![])).await.unwrap();
    assert_eq!(
        s.peer(business(1), peer(1, 0)).await.unwrap(),
        Some(bytes(1, 80))
    );
    assert_eq!(
        s.peer(business(1), peer(1, 1)).await.unwrap(),
        Some(bytes(2, 80))
    );
    assert_eq!(s.peer(business(1), peer(3, 0)).await.unwrap(), None);
    s.commit(fenced(b, vec![put_peer(1, peer(1, 0), 4)]))
        .await
        .unwrap();
    commit(s, [put_peer(1, peer(2, 0), 5)]).await;

    backend.reopen().await;
    let s = &*backend.store;
    assert!(superseded(
        s.commit(fenced(a, vec![put_peer(1, peer(1, 0), 9)])).await
    ));
    s.commit(fenced(b, vec![put_peer(1, peer(1, 0), 6)]))
        .await
        .unwrap();
    assert_eq!(
        s.peer(business(1), peer(1, 0)).await.unwrap(),
        Some(bytes(6, 80))
    );
}

async fn peers_are_replaced_deleted_and_listed_by_device(backend: &mut Backend) {
    let s = &*backend.store;
    commit(
        s,
        [
            put_peer(1, peer(1, 3), 1),
            put_peer(1, peer(1, 0), 2),
            put_peer(1, peer(1, 1), 3),
            put_peer(1, peer(2, 0), 4),
            put_peer(2, peer(1, 5), 5),
        ],
    )
    .await;
    assert_eq!(
        s.peer_devices(business(1), phone(1)).await.unwrap(),
        [0, 1, 3]
    );
    assert_eq!(s.peer_devices(business(1), phone(2)).await.unwrap(), [0]);
    assert_eq!(s.peer_devices(business(2), phone(1)).await.unwrap(), [5]);
    assert!(
        s.peer_devices(business(1), phone(3))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.peer(business(1), peer(1, 1)).await.unwrap(),
        Some(bytes(3, 80))
    );
    commit(s, [put_peer(1, peer(1, 1), 33)]).await;
    assert_eq!(
        s.peer(business(1), peer(1, 1)).await.unwrap(),
        Some(bytes(33, 80))
    );
    commit(
        s,
        [
            Op::DeletePeer {
                business: business(1),
                peer: peer(1, 0),
            },
            Op::DeletePeer {
                business: business(1),
                peer: peer(9, 9),
            },
        ],
    )
    .await;
    assert_eq!(s.peer(business(1), peer(1, 0)).await.unwrap(), None);
    assert_eq!(s.peer_devices(business(1), phone(1)).await.unwrap(), [1, 3]);
    assert_eq!(s.peer(business(2), peer(1, 1)).await.unwrap(), None);
    // Later ops of a batch see earlier ones: put then delete leaves nothing.
    commit(
        s,
        [
            put_peer(3, peer(1, 0), 1),
            Op::DeletePeer {
                business: business(3),
                peer: peer(1, 0),
            },
            put_peer(3, peer(2, 0), 1),
        ],
    )
    .await;
    assert_eq!(s.peer(business(3), peer(1, 0)).await.unwrap(), None);
    assert!(s.peer(business(3), peer(2, 0)).await.unwrap().is_some());
}

async fn messages_are_stored_once_and_delivery_updates_only_touch_stored_ones(
    backend: &mut Backend,
) {
    let s = &*backend.store;
    let first = M::new(1, 1, 1, T0 + HOUR).due(T0).status(Status::Queued);
    commit(s, [put(&first)]).await;
    assert_eq!(
        s.message(business(1), mid(1)).await.unwrap(),
        Some(first.record())
    );
    assert_eq!(s.message(business(2), mid(1)).await.unwrap(), None);

    // A second message under a stored id (a replay) fails the whole batch
    // and changes nothing, in the store or in a batch of its own.
    let mut second = M::new(1, 1, 2, T0 + 5 * HOUR).outbound().due(T0 + 3 * HOUR);
    second.status = Status::Sent;
    for replay in [
        batch([put(&second)]),
        batch([put(&M::new(1, 9, 1, T0)), put(&second)]),
        batch([put(&M::new(1, 9, 1, T0)), put(&M::new(1, 9, 2, T0))]),
    ] {
        assert!(matches!(s.commit(replay).await, Err(StoreError::Conflict)));
        assert_eq!(s.message(business(1), mid(9)).await.unwrap(), None);
        assert_eq!(
            s.message(business(1), mid(1)).await.unwrap(),
            Some(first.record())
        );
        assert_eq!(
            msg_keys(&s.due_messages(t(T0), 10).await.unwrap()),
            [key_of(1, 1)]
        );
    }

    // Deleted, an id may be stored again, indexes included: the old expiry
    // and due time are gone.
    commit(
        s,
        [
            Op::DeleteMessage {
                business: business(1),
                id: mid(1),
            },
            put(&second),
        ],
    )
    .await;
    assert_eq!(
        s.message(business(1), mid(1)).await.unwrap(),
        Some(second.record())
    );
    assert!(s.due_messages(t(T0 + HOUR), 10).await.unwrap().is_empty());
    assert!(
        s.expired_open_messages(t(T0 + 2 * HOUR), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.message_epochs(business(1), Some(phone(1))).await.unwrap(),
        []
    );

    let delivery = Delivery {
        status: Status::Failed,
        failure: Some(FailureReason::NoSession),
        attempts: 7,
        next_attempt: None,
        pending_devices: 0,
        overdue_at: None,
        told: None,
        accepted_by: 0x8000_0000_0000_0001,
    };
    let update = |id, expected| Op::UpdateDelivery {
        business: business(1),
        id: mid(id),
        expected,
        delivery,
    };
    // A compare-and-swap on the whole bookkeeping: a stale expectation (in
    // any field), or a missing message, fails the whole batch and changes
    // nothing.
    let stored = second.record().delivery;
    let stale_status = Delivery {
        status: Status::Queued,
        ..stored
    };
    let stale_devices = Delivery {
        pending_devices: stored.pending_devices ^ 0b10,
        ..stored
    };
    let stale_attempts = Delivery {
        attempts: stored.attempts + 1,
        ..stored
    };
    let stale_due = Delivery {
        next_attempt: Some(t(T0 + 12_345)),
        ..stored
    };
    let stale_token = Delivery {
        accepted_by: stored.accepted_by ^ 0x8000_0000_0000_0001,
        ..stored
    };
    for stale in [
        vec![update(1, stale_status)],
        vec![update(1, stale_devices)],
        vec![update(1, stale_attempts)],
        vec![update(1, stale_due)],
        vec![update(1, stale_token)],
        vec![update(2, stored)],
        vec![update(1, stale_status), put(&M::new(1, 9, 1, T0))],
        vec![put(&M::new(1, 9, 1, T0)), update(2, stored)],
    ] {
        assert!(matches!(
            s.commit(batch(stale)).await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(s.message(business(1), mid(9)).await.unwrap(), None);
        assert_eq!(
            s.message(business(1), mid(2)).await.unwrap(),
            None,
            "an update of a missing message creates nothing"
        );
    }
    commit(s, [update(1, stored)]).await;
    let mut expected = second.record();
    expected.delivery = delivery;
    assert_eq!(
        s.message(business(1), mid(1)).await.unwrap(),
        Some(expected.clone())
    );
    // Expired and still open: failed as expired; settled: left alone.
    let open = M::new(1, 8, 1, T0 + HOUR).due(T0).status(Status::Sent);
    commit(s, [put(&open)]).await;
    commit(
        s,
        [
            Op::FailExpired {
                business: business(1),
                id: mid(8),
            },
            Op::FailExpired {
                business: business(1),
                id: mid(1),
            },
            Op::FailExpired {
                business: business(1),
                id: mid(77),
            },
        ],
    )
    .await;
    let mut failed = open.record();
    failed.delivery = Delivery {
        status: Status::Failed,
        failure: Some(FailureReason::Expired),
        next_attempt: None,
        pending_devices: 0,
        ..failed.delivery
    };
    assert_eq!(s.message(business(1), mid(8)).await.unwrap(), Some(failed));
    assert_eq!(
        s.message(business(1), mid(1)).await.unwrap(),
        Some(expected)
    );
    commit(
        s,
        [Op::DeleteMessage {
            business: business(1),
            id: mid(8),
        }],
    )
    .await;
    assert!(s.due_messages(t(u64::MAX), 10).await.unwrap().is_empty());

    commit(
        s,
        [
            Op::DeleteMessage {
                business: business(1),
                id: mid(1),
            },
            Op::DeleteMessage {
                business: business(1),
                id: mid(3),
            },
        ],
    )
    .await;
    assert_eq!(s.message(business(1), mid(1)).await.unwrap(), None);
    assert_eq!(s.census().await.unwrap().messages, 0);
}

fn put_resent(m: &M, header: u64) -> Op {
    Op::PutResentMessage {
        record: Box::new(m.record()),
        header: mid(header),
    }
}

/// A message stored under one id and known by another: either id reads it
/// (its record has the one it is stored under), neither can be stored or
/// made known again while it is stored, within a batch or across batches,
/// across a reopen; deleted, by its own write or by the sweep, it frees
/// both ids.
async fn a_message_sent_again_is_known_by_its_headers_id_too(backend: &mut Backend) {
    let resent = M::new(1, 1, 1, T0 + HOUR);
    commit(backend.store.as_ref(), [put_resent(&resent, 2)]).await;
    backend.reopen().await;
    let s = &*backend.store;
    for id in [1, 2] {
        assert_eq!(
            s.message(business(1), mid(id)).await.unwrap(),
            Some(resent.record()),
            "read by id {id}"
        );
        assert_eq!(s.message(business(2), mid(id)).await.unwrap(), None);
    }

    // Taken, either id, whichever way it would be stored, alone or after
    // writes that would land: nothing changes.
    let other = M::new(1, 3, 2, T0 + 2 * HOUR);
    for refused in [
        batch([put(&M::new(1, 2, 2, T0))]),
        batch([put_resent(&other, 1)]),
        batch([put_resent(&other, 2)]),
        batch([put_resent(&M::new(1, 2, 2, T0), 4)]),
        batch([put_resent(&M::new(1, 1, 2, T0), 4)]),
        batch([put(&M::new(1, 9, 1, T0)), put(&M::new(1, 2, 2, T0))]),
        batch([put_resent(&other, 4), put(&M::new(1, 4, 2, T0))]),
        batch([put_resent(&other, 4), put_resent(&M::new(1, 5, 2, T0), 3)]),
        // Its header given to another, then the id it named deleted again
        // (a no-op): the header is still taken.
        batch([
            Op::DeleteMessage {
                business: business(1),
                id: mid(1),
            },
            put_resent(&other, 2),
            Op::DeleteMessage {
                business: business(1),
                id: mid(1),
            },
            put(&M::new(1, 2, 2, T0)),
        ]),
    ] {
        assert!(
            matches!(s.commit(refused.clone()).await, Err(StoreError::Conflict)),
            "{refused:?}"
        );
        for id in [3, 4, 5, 9] {
            assert_eq!(s.message(business(1), mid(id)).await.unwrap(), None);
        }
        assert_eq!(
            s.message(business(1), mid(2)).await.unwrap(),
            Some(resent.record())
        );
    }
    // The same ids in another business are free.
    commit(
        s,
        [
            put(&M::new(2, 2, 1, T0 + HOUR)),
            put_resent(&M::new(2, 9, 1, T0 + HOUR), 1),
        ],
    )
    .await;
    assert_eq!(
        s.message(business(2), mid(1)).await.unwrap().map(|m| m.id),
        Some(mid(9))
    );

    // Deleted in a batch, its ids are free again in the same batch.
    let again = M::new(1, 2, 3, T0 + 2 * HOUR);
    commit(
        s,
        [
            Op::DeleteMessage {
                business: business(1),
                id: mid(1),
            },
            put(&again),
            put_resent(&other, 1),
        ],
    )
    .await;
    assert_eq!(
        s.message(business(1), mid(2)).await.unwrap(),
        Some(again.record())
    );
    assert_eq!(
        s.message(business(1), mid(1)).await.unwrap(),
        Some(other.record())
    );

    // Swept, it frees both.
    let swept = s
        .delete_expired(t(T0 + 3 * HOUR), t(T0), &[], 100)
        .await
        .unwrap();
    assert_eq!(swept.len(), 4, "{swept:?}");
    for b in [1, 2] {
        for id in [1, 2, 3, 9] {
            assert_eq!(s.message(business(b), mid(id)).await.unwrap(), None);
        }
    }
    commit(
        s,
        [
            put(&M::new(1, 1, 1, T0 + HOUR)),
            put(&M::new(2, 1, 1, T0 + HOUR)),
        ],
    )
    .await;
}

async fn due_messages_are_earliest_first_and_follow_updates(backend: &mut Backend) {
    let s = &*backend.store;
    let ms = [
        M::new(2, 1, 1, T0 + 9 * HOUR).due(T0 + 20),
        M::new(1, 2, 1, T0 + 9 * HOUR).due(T0 + 10),
        M::new(2, 3, 2, T0 + 9 * HOUR).due(T0 + 10),
        M::new(1, 4, 2, T0 + 9 * HOUR).due(T0 + 10),
        M::new(1, 5, 3, T0 + 9 * HOUR).due(T0 + 30),
        M::new(1, 6, 3, T0 + 9 * HOUR),
    ];
    commit(s, ms.iter().map(put)).await;
    let due = s.due_messages(t(T0 + 20), 100).await.unwrap();
    assert_eq!(
        msg_keys(&due),
        [key_of(1, 2), key_of(1, 4), key_of(2, 3), key_of(2, 1)],
        "by due time, then business, then id"
    );
    assert_eq!(due[0], ms[1].record(), "whole records come back");
    assert_eq!(
        msg_keys(&s.due_messages(t(T0 + 20), 2).await.unwrap()),
        [key_of(1, 2), key_of(1, 4)]
    );
    assert!(s.due_messages(t(T0 + 9), 100).await.unwrap().is_empty());
    assert!(s.due_messages(t(T0 + 20), 0).await.unwrap().is_empty());

    // Rescheduled later, and unscheduled: the index follows.
    let later = Delivery {
        status: Status::Sent,
        failure: None,
        attempts: 1,
        next_attempt: Some(t(T0 + 25)),
        pending_devices: 0b101,
        overdue_at: Some(t(T0 + 120)),
        told: None,
        accepted_by: 0,
    };
    let done = Delivery {
        status: Status::Delivered,
        failure: None,
        attempts: 1,
        next_attempt: None,
        pending_devices: 0,
        overdue_at: None,
        told: None,
        accepted_by: 0,
    };
    commit(
        s,
        [
            Op::UpdateDelivery {
                business: business(1),
                id: mid(2),
                expected: stored(s, 1, 2).await,
                delivery: later,
            },
            Op::UpdateDelivery {
                business: business(2),
                id: mid(3),
                expected: stored(s, 2, 3).await,
                delivery: done,
            },
        ],
    )
    .await;
    assert_eq!(
        msg_keys(&s.due_messages(t(T0 + 100), 100).await.unwrap()),
        [key_of(1, 4), key_of(2, 1), key_of(1, 2), key_of(1, 5)]
    );
    // The state reads back whole, and a write expecting another time for
    // the resend to every device loses, changing nothing.
    assert_eq!(stored(s, 1, 2).await, later);
    let mut lost = Batch::new();
    lost.push(Op::UpdateDelivery {
        business: business(1),
        id: mid(2),
        expected: Delivery {
            overdue_at: None,
            ..later
        },
        delivery: done,
    });
    assert!(matches!(s.commit(lost).await, Err(StoreError::Conflict)));
    assert_eq!(stored(s, 1, 2).await, later);
    // Delivered with a device still pending, its business told ahead:
    // that reads back whole too, and a write expecting it untold loses.
    let told = Delivery {
        status: Status::Delivered,
        pending_devices: 0b100,
        overdue_at: None,
        told: Some(Status::Delivered),
        ..later
    };
    commit(
        s,
        [Op::UpdateDelivery {
            business: business(1),
            id: mid(2),
            expected: later,
            delivery: told,
        }],
    )
    .await;
    assert_eq!(stored(s, 1, 2).await, told);
    let mut lost = Batch::new();
    lost.push(Op::UpdateDelivery {
        business: business(1),
        id: mid(2),
        expected: Delivery { told: None, ..told },
        delivery: done,
    });
    assert!(matches!(s.commit(lost).await, Err(StoreError::Conflict)));
    assert_eq!(stored(s, 1, 2).await, told);
}

async fn expired_open_messages_are_the_open_ones_earliest_first(backend: &mut Backend) {
    let s = &*backend.store;
    let ms = [
        M::new(1, 1, 1, T0 + 30).status(Status::Queued),
        M::new(1, 2, 1, T0 + 10).status(Status::Sent).due(T0),
        M::new(2, 3, 1, T0 + 10).status(Status::Queued),
        M::new(1, 4, 1, T0 + 5).status(Status::Delivered),
        M::new(1, 5, 1, T0 + 5).status(Status::Read),
        M::new(1, 6, 1, T0 + 5).status(Status::Failed),
        M::new(1, 7, 1, T0 + 31).status(Status::Queued),
    ];
    commit(s, ms.iter().map(put)).await;
    let open = s
        .expired_open_messages(t(T0 + 30), None, 100)
        .await
        .unwrap();
    assert_eq!(
        msg_keys(&open),
        [key_of(1, 2), key_of(2, 3), key_of(1, 1)],
        "open (queued or sent), expired at or before now, by expiry"
    );
    assert_eq!(open[0], ms[1].record());
    assert_eq!(
        msg_keys(&s.expired_open_messages(t(T0 + 30), None, 1).await.unwrap()),
        [key_of(1, 2)],
        "the limit counts open messages only"
    );
    assert!(
        s.expired_open_messages(t(T0 + 9), None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // Paging: after a message, the ones after it in (expiry, business, id)
    // order, whether or not the message is still there.
    let after = |m: &MessageRecord| Some((m.expiry, m.business, m.id));
    assert_eq!(
        msg_keys(
            &s.expired_open_messages(t(T0 + 30), after(&open[0]), 100)
                .await
                .unwrap()
        ),
        [key_of(2, 3), key_of(1, 1)]
    );
    assert_eq!(
        msg_keys(
            &s.expired_open_messages(t(T0 + 30), after(&open[1]), 1)
                .await
                .unwrap()
        ),
        [key_of(1, 1)]
    );
    assert!(
        s.expired_open_messages(t(T0 + 30), after(&open[2]), 100)
            .await
            .unwrap()
            .is_empty()
    );
    let gone = M::new(1, 0, 1, T0 + 10).record();
    assert_eq!(
        msg_keys(
            &s.expired_open_messages(t(T0 + 30), after(&gone), 100)
                .await
                .unwrap()
        ),
        [key_of(1, 2), key_of(2, 3), key_of(1, 1)]
    );
}

async fn delete_expired_spares_held_pending_and_live_messages(backend: &mut Backend) {
    let s = &*backend.store;
    let now = T0 + 100;
    let ms = [
        M::new(1, 1, 1, T0 + 50).status(Status::Queued).outbound(),
        M::new(1, 2, 1, T0 + 10),
        M::new(2, 3, 2, T0 + 10),
        M::new(1, 4, 1, T0 + 20).status(Status::Sent).due(T0 + 200),
        M::new(1, 5, 1, now + 1),
        M::new(3, 6, 1, T0 + 1),
        M::new(1, 7, 3, T0 + 1),
        M::new(1, 8, 3, now),
        M::new(1, 9, 1, T0 + 50).status(Status::Failed).outbound(),
        // Settled, its status report to the business still pending.
        M::new(1, 10, 1, T0 + 30)
            .status(Status::Read)
            .outbound()
            .due(T0 + 60),
    ];
    commit(s, ms.iter().map(put)).await;
    let holds = [
        HoldScope::Business(business(3)),
        HoldScope::Consumer(business(1), phone(3)),
    ];
    let first = s.delete_expired(t(now), t(T0), &holds, 2).await.unwrap();
    assert_eq!(
        first,
        [
            ExpiredMessage::from(&ms[1].record()),
            ExpiredMessage::from(&ms[2].record())
        ],
        "earliest first, held ones skipped without using up the limit"
    );
    let rest = s.delete_expired(t(now), t(T0), &holds, 100).await.unwrap();
    assert_eq!(
        rest,
        [ExpiredMessage::from(&ms[8].record())],
        "an open message is never deleted, even with no attempt scheduled"
    );
    assert_eq!(rest[0].direction, Direction::Outbound);
    assert!(
        s.delete_expired(t(now), t(T0), &holds, 100)
            .await
            .unwrap()
            .is_empty()
    );
    for (b, id) in [(1, 2), (2, 3), (1, 9)] {
        assert_eq!(s.message(business(b), mid(id)).await.unwrap(), None);
    }
    // Open, pending, live and held messages are all still there.
    for (b, id) in [(1, 1), (1, 4), (1, 5), (3, 6), (1, 7), (1, 8)] {
        assert!(s.message(business(b), mid(id)).await.unwrap().is_some());
    }
    // The holds released: the held ones go, earliest first; the pending one stays.
    let released = s.delete_expired(t(now), t(T0), &[], 100).await.unwrap();
    assert_eq!(
        released
            .iter()
            .map(|m| (m.business, m.id))
            .collect::<Vec<_>>(),
        [key_of(1, 7), key_of(3, 6), key_of(1, 8)]
    );
    assert!(s.message(business(1), mid(4)).await.unwrap().is_some());
    assert!(
        s.delete_expired(t(now), t(T0), &[], 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.census().await.unwrap().messages, 4);
    // A pending report is given up once the message expired at or before
    // `abandon_before`; an open message stays open whatever.
    assert!(
        s.delete_expired(t(now), t(T0 + 29), &[], 100)
            .await
            .unwrap()
            .is_empty()
    );
    let abandoned = s
        .delete_expired(t(now), t(T0 + 30), &[], 100)
        .await
        .unwrap();
    assert_eq!(abandoned, [ExpiredMessage::from(&ms[9].record())]);
    assert!(
        abandoned[0].report_pending,
        "deleted with its report still pending"
    );
    assert!(!released.iter().any(|m| m.report_pending));
    assert_eq!(s.census().await.unwrap().messages, 3);
}

async fn peer_epochs_are_read_from_the_sealed_headers_and_fail_on_one_that_does_not_parse(
    backend: &mut Backend,
) {
    let s = &*backend.store;
    let end = |h: u64| T0 + h * HOUR;
    let sealed = |b: u64, p: PeerId, h: u64| Op::PutPeer {
        business: business(b),
        peer: p,
        sealed: sealed_peer(b, end(h), h ^ (b << 8) ^ p.phone.as_bytes()[7] as u64),
    };
    commit(
        s,
        [
            sealed(1, peer(1, 0), 5),
            sealed(1, peer(1, 1), 2),
            sealed(1, peer(2, 0), 2),
            sealed(1, peer(3, 0), 9),
            sealed(2, peer(1, 0), 7),
        ],
    )
    .await;
    let epochs = |hs: &[u64]| {
        hs.iter()
            .map(|&h| Epoch::ending_at(t(end(h))))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s.peer_epochs(business(1), None).await.unwrap(),
        epochs(&[2, 5, 9])
    );
    assert_eq!(
        s.peer_epochs(business(1), Some(phone(1))).await.unwrap(),
        epochs(&[2, 5])
    );
    assert_eq!(
        s.peer_epochs(business(2), None).await.unwrap(),
        epochs(&[7])
    );
    assert!(
        s.peer_epochs(business(1), Some(phone(4)))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.peer_epochs(business(3), None).await.unwrap().is_empty());
    // A record whose header does not parse fails every read that includes
    // it: which epoch a hold must keep for it is unknown.
    commit(s, [put_peer(1, peer(4, 0), 7)]).await;
    for phone in [None, Some(phone(4))] {
        assert!(
            matches!(
                s.peer_epochs(business(1), phone).await,
                Err(StoreError::Corrupt(_))
            ),
            "{phone:?}"
        );
    }
    assert_eq!(
        s.peer_epochs(business(1), Some(phone(1))).await.unwrap(),
        epochs(&[2, 5])
    );
}

async fn message_businesses_lists_each_business_once_in_order(backend: &mut Backend) {
    let s = &*backend.store;
    assert!(s.message_businesses().await.unwrap().is_empty());
    commit(
        s,
        [
            put(&M::new(3, 1, 1, T0)),
            put(&M::new(1, 2, 1, T0)),
            put(&M::new(u64::MAX, 3, 1, T0)),
            put(&M::new(2, 4, 1, T0)),
            put(&M::new(1, 5, 2, T0)),
            put(&M::new(2, 6, 2, T0)),
            put_peer(9, peer(1, 0), 1),
        ],
    )
    .await;
    let all: Vec<BusinessId> = [1, 2, 3, u64::MAX].into_iter().map(business).collect();
    assert_eq!(
        s.message_businesses().await.unwrap(),
        all,
        "peers alone do not count"
    );
    commit(
        s,
        [4, 6].map(|id| Op::DeleteMessage {
            business: business(2),
            id: mid(id),
        }),
    )
    .await;
    let rest: Vec<BusinessId> = [1, 3, u64::MAX].into_iter().map(business).collect();
    assert_eq!(s.message_businesses().await.unwrap(), rest);
}

async fn cap_expiry_shortens_only_later_expiries_of_one_business_and_direction(
    backend: &mut Backend,
) {
    let s = &*backend.store;
    const DAY: u64 = 24 * HOUR;
    let with_created = |m: M, created: u64| {
        let mut r = m.record();
        r.created = t(created);
        r
    };
    // `M` records are created 30 days before they expire.
    let records = [
        M::new(1, 1, 1, T0 + 30 * DAY).record(),
        M::new(1, 2, 1, T0 + 30 * DAY).outbound().record(),
        M::new(2, 3, 1, T0 + 30 * DAY).record(),
        M::new(1, 4, 2, T0 + 35 * DAY).record(),
        // Already shorter than the cap: never made later.
        with_created(M::new(1, 5, 1, T0 + 2 * DAY), T0),
        // Creation plus the period passes the end of time: the cap
        // saturates there, and changes nothing.
        with_created(M::new(1, 6, 3, u64::MAX), u64::MAX - HOUR),
        // Near the end of time, but the cap still fits.
        M::new(1, 7, 3, u64::MAX).record(),
        // The lowest id there is: on the first page too.
        MessageRecord {
            id: MessageId::from_bytes([0; 16]),
            ..M::new(1, 8, 1, T0 + 30 * DAY).record()
        },
    ];
    commit(
        s,
        records.iter().cloned().map(|r| Op::PutMessage(Box::new(r))),
    )
    .await;
    // In pages of two ids; a backend may do more per call, never less.
    let cap = async |days: u64| {
        let mut after = None;
        for _ in 0..100 {
            after = s
                .cap_expiry(
                    business(1),
                    Direction::Inbound,
                    std::time::Duration::from_millis(days * DAY),
                    after,
                    2,
                )
                .await
                .unwrap();
            if after.is_none() {
                return;
            }
        }
        panic!("cap_expiry never finished");
    };
    cap(7).await;

    let capped: BTreeMap<u64, u64> = [
        (0, T0 + 7 * DAY),
        (1, T0 + 7 * DAY),
        (4, T0 + 12 * DAY),
        (7, u64::MAX - 23 * DAY),
    ]
    .into();
    let check = async || {
        for r in &records {
            let stored = s.message(r.business, r.id).await.unwrap().unwrap();
            let n = u64::from_be_bytes(r.id.as_bytes()[..8].try_into().unwrap());
            let mut expected = r.clone();
            if let Some(&e) = capped.get(&n).filter(|_| r.business == business(1)) {
                expected.expiry = t(e);
            }
            assert_eq!(stored, expected, "message {n}");
        }
    };
    check().await;
    // Idempotent, and a longer period makes nothing later.
    cap(7).await;
    cap(20).await;
    check().await;

    // The expiry index follows: the sweep's queries see the new expiries.
    let gone = s
        .delete_expired(t(T0 + 7 * DAY), t(T0 + 7 * DAY), &[], 100)
        .await
        .unwrap();
    assert_eq!(
        gone.iter().map(|m| (m.business, m.id)).collect::<Vec<_>>(),
        [
            key_of(1, 5),
            (business(1), MessageId::from_bytes([0; 16])),
            key_of(1, 1)
        ]
    );
    let gone = s
        .delete_expired(t(T0 + 12 * DAY), t(T0 + 12 * DAY), &[], 100)
        .await
        .unwrap();
    assert_eq!(
        gone.iter().map(|m| (m.business, m.id)).collect::<Vec<_>>(),
        [key_of(1, 4)]
    );
}

/// A hold stored but not among those passed (placed, say, by another
/// process after the caller read the holds) is honoured all the same: the
/// delete checks the stored holds in the step that deletes.
async fn delete_expired_also_spares_what_a_stored_hold_covers(backend: &mut Backend) {
    let s = &*backend.store;
    let now = T0 + 100;
    let ms = [
        M::new(1, 1, 1, T0 + 10),
        M::new(1, 2, 2, T0 + 20),
        M::new(2, 3, 1, T0 + 30),
        M::new(3, 4, 1, T0 + 40),
    ];
    commit(s, ms.iter().map(put)).await;
    let holds = [
        HoldScope::Consumer(business(1), phone(2)),
        HoldScope::Business(business(2)),
    ];
    commit(
        s,
        holds.map(|scope| {
            Op::PutHold(Hold {
                scope,
                reference: "case".into(),
                placed: t(T0),
            })
        }),
    )
    .await;
    let gone = s.delete_expired(t(now), t(T0), &[], 100).await.unwrap();
    assert_eq!(
        gone,
        [
            ExpiredMessage::from(&ms[0].record()),
            ExpiredMessage::from(&ms[3].record())
        ]
    );
    assert_eq!(s.census().await.unwrap().messages, 2);
    // Released, the held ones go.
    commit(
        s,
        holds.map(|scope| Op::DeleteHold {
            scope,
            reference: "case".into(),
        }),
    )
    .await;
    let gone = s.delete_expired(t(now), t(T0), &[], 100).await.unwrap();
    assert_eq!(
        gone,
        [
            ExpiredMessage::from(&ms[1].record()),
            ExpiredMessage::from(&ms[2].record())
        ]
    );
}

async fn message_epochs_are_distinct_sorted_and_filtered_by_phone(backend: &mut Backend) {
    let s = &*backend.store;
    commit(
        s,
        [
            put(&M::new(1, 1, 1, T0 + 5 * HOUR)),
            put(&M::new(1, 2, 2, T0 + HOUR + 5)),
            put(&M::new(1, 3, 1, T0 + HOUR + 7)),
            put(&M::new(1, 4, 1, T0 + 5 * HOUR + 1)),
            put(&M::new(2, 5, 1, T0 + 9 * HOUR)),
        ],
    )
    .await;
    let epoch = |expiry: u64| M::new(1, 0, 0, expiry).record().epoch;
    assert_eq!(
        s.message_epochs(business(1), None).await.unwrap(),
        [epoch(T0 + HOUR + 5), epoch(T0 + 5 * HOUR)]
    );
    assert_eq!(
        s.message_epochs(business(1), Some(phone(2))).await.unwrap(),
        [epoch(T0 + HOUR + 5)]
    );
    assert_eq!(
        s.message_epochs(business(1), Some(phone(1))).await.unwrap(),
        [epoch(T0 + HOUR + 5), epoch(T0 + 5 * HOUR)]
    );
    assert!(
        s.message_epochs(business(3), None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_peer_is_deleted_as_idle_only_while_its_consumer_has_no_live_message(
    backend: &mut Backend,
) {
    let s = &*backend.store;
    let now = T0 + 100;
    commit(
        s,
        [
            // phone 1: a live message; phone 2: only expired ones (one
            // expiring exactly now); phone 3: none; phone 4: no peers.
            put(&M::new(1, 1, 1, now + 1)),
            put(&M::new(1, 2, 1, now - 50)),
            put(&M::new(1, 3, 2, now)),
            put(&M::new(1, 4, 2, now - 1)),
            put(&M::new(1, 5, 4, now - 1)),
            // The same phone hash under another business is someone else.
            put(&M::new(2, 6, 3, now + 1)),
            put_peer(1, peer(1, 0), 1),
            put_peer(1, peer(2, 2), 2),
            put_peer(1, peer(2, 0), 3),
            put_peer(1, peer(3, 1), 4),
            put_peer(2, peer(2, 0), 5),
        ],
    )
    .await;
    let idle = |p| Op::DeleteIdlePeer {
        business: business(1),
        peer: p,
        now: t(now),
    };
    // Only expired messages (one expiring exactly now): idle.
    commit(s, [idle(peer(2, 2))]).await;
    assert_eq!(s.peer_devices(business(1), phone(2)).await.unwrap(), [0]);
    // The check runs in the delete's own commit: a consumer whose message
    // arrived since the sweep listed it keeps its state; one with a live
    // message too; one with no message at all goes.
    commit(
        s,
        [
            put(&M::new(1, 7, 2, now + 5)),
            idle(peer(2, 0)),
            idle(peer(1, 0)),
            idle(peer(3, 1)),
        ],
    )
    .await;
    assert_eq!(s.peer_devices(business(1), phone(2)).await.unwrap(), [0]);
    assert_eq!(s.peer_devices(business(1), phone(1)).await.unwrap(), [0]);
    assert!(
        s.peer_devices(business(1), phone(3))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.peer_devices(business(2), phone(2)).await.unwrap(),
        [0],
        "another business's consumer is untouched"
    );
}

/// A stored hold keeps a consumer's Signal record from the sweep's
/// deletion, whether it covers the consumer or its whole business, read in
/// the deletion's own commit: a hold another process stored since the
/// sweep read the holds counts. (The deletion checked only for a live
/// message.)
async fn a_peer_is_not_deleted_as_idle_under_a_stored_hold(backend: &mut Backend) {
    let s = &*backend.store;
    let now = T0 + 100;
    commit(
        s,
        [
            put_peer(1, peer(1, 0), 1),
            put_peer(1, peer(2, 0), 2),
            put_peer(2, peer(1, 0), 3),
            put_peer(3, peer(1, 0), 4),
        ],
    )
    .await;
    let hold = |scope| {
        Op::PutHold(Hold {
            scope,
            reference: "case-1".to_owned(),
            placed: t(now),
        })
    };
    let idle = |b, p| Op::DeleteIdlePeer {
        business: business(b),
        peer: p,
        now: t(now),
    };
    commit(
        s,
        [
            hold(HoldScope::Consumer(business(1), phone(1))),
            hold(HoldScope::Business(business(2))),
        ],
    )
    .await;
    commit(
        s,
        [
            idle(1, peer(1, 0)),
            idle(1, peer(2, 0)),
            idle(2, peer(1, 0)),
            idle(3, peer(1, 0)),
        ],
    )
    .await;
    assert_eq!(s.peer_devices(business(1), phone(1)).await.unwrap(), [0]);
    assert!(
        s.peer_devices(business(1), phone(2))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.peer_devices(business(2), phone(1)).await.unwrap(), [0]);
    assert!(
        s.peer_devices(business(3), phone(1))
            .await
            .unwrap()
            .is_empty()
    );
}

/// `delete_epoch_keys` deletes as `delete_keys` does, but spares every
/// key of a business that a stored hold the caller has not seen covers,
/// the holds read in the deletion's own step; holds the caller saw (it
/// chose the keys by them) spare nothing more.
async fn delete_epoch_keys_spares_the_businesses_of_holds_not_seen(backend: &mut Backend) {
    let s = &*backend.store;
    let keys: Vec<WrappedKey> = [1, 2, 3]
        .into_iter()
        .flat_map(|b| [epoch_key(b, T0), epoch_key(b, T0 + HOUR)])
        .collect();
    for k in &keys {
        s.insert_key(k.clone()).await.unwrap();
    }
    let seen = HoldScope::Consumer(business(1), phone(1));
    let unseen = HoldScope::Consumer(business(2), phone(1));
    for scope in [seen, unseen] {
        s.commit(Batch::from(Op::PutHold(Hold {
            scope,
            reference: "case-1".to_owned(),
            placed: t(T0),
        })))
        .await
        .unwrap();
    }
    assert_eq!(s.delete_epoch_keys(&ids(&keys), &[seen]).await.unwrap(), 4);
    let left: Vec<KeyId> = s.ended_epoch_keys(t(T0 + 9 * HOUR), 10).await.unwrap();
    assert_eq!(left, ids(&keys[2..4]), "business 2's keys are spared");
    // Once seen, the hold spares nothing the caller did not keep.
    assert_eq!(
        s.delete_epoch_keys(&left, &[seen, unseen]).await.unwrap(),
        2
    );
    assert!(
        s.ended_epoch_keys(t(T0 + 9 * HOUR), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_live_message_is_one_of_the_consumer_expiring_later(backend: &mut Backend) {
    let s = &*backend.store;
    let expiry = T0 + DAY;
    commit(
        s,
        [
            put(&M::new(1, 1, 1, expiry)),
            put(&M::new(1, 2, 1, expiry - HOUR)),
        ],
    )
    .await;
    let live = |b, p, now| s.has_live_message(business(b), phone(p), t(now));
    assert!(live(1, 1, expiry - 1).await.unwrap());
    assert!(
        !live(1, 1, expiry).await.unwrap(),
        "at its expiry, it is over"
    );
    assert!(!live(1, 2, T0).await.unwrap(), "another consumer");
    assert!(!live(2, 1, T0).await.unwrap(), "another business");
}

async fn orphan_peers_pages_through_every_idle_peer_in_key_order(backend: &mut Backend) {
    let s = &*backend.store;
    let now = T0 + 100;
    let mut ops = vec![
        put(&M::new(2, 1, 1, now + 1)),
        put(&M::new(1, 2, 2, now + 1)),
        put(&M::new(1, 3, 3, now - 1)),
    ];
    let mut expected = Vec::new();
    for b in [3u64, 1, 2, u64::MAX] {
        for p in [3u64, 1, 2] {
            for device in [2, 0, u32::MAX] {
                ops.push(put_peer(b, peer(p, device), b ^ p));
                let live = (b == 2 && p == 1) || (b == 1 && p == 2);
                if !live {
                    expected.push((business(b), peer(p, device)));
                }
            }
        }
    }
    commit(s, ops).await;
    expected.sort();
    let mut found = Vec::new();
    let mut after = None;
    for round in 0.. {
        assert!(round < 100, "paging never ends");
        let page = s.orphan_peers(t(now), after, 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(*last);
        found.extend(page);
    }
    assert_eq!(found, expected);
    assert!(s.orphan_peers(t(now), None, 0).await.unwrap().is_empty());
    assert_eq!(
        s.orphan_peers(t(now), Some(expected[5]), 2).await.unwrap(),
        expected[6..8]
    );
}

async fn holds_are_placed_replaced_released_in_scope_order(backend: &mut Backend) {
    let s = &*backend.store;
    let hold = |scope, reference: &str, placed| Hold {
        scope,
        reference: reference.to_owned(),
        placed: t(placed),
    };
    let a = hold(HoldScope::Consumer(business(2), phone(1)), "case-1", T0);
    let b = hold(HoldScope::Business(business(3)), "case-2", T0 + 1);
    let c = hold(HoldScope::Business(business(1)), "case-3 ünïcode", T0 + 2);
    let d = hold(HoldScope::Consumer(business(1), phone(2)), "", T0 + 3);
    assert!(s.holds().await.unwrap().is_empty());
    commit(
        s,
        [a.clone(), b.clone(), c.clone(), d.clone()].map(Op::PutHold),
    )
    .await;
    assert_eq!(
        s.holds().await.unwrap(),
        [c.clone(), b.clone(), d.clone(), a.clone()]
    );
    let release = |h: &Hold| Op::DeleteHold {
        scope: h.scope,
        reference: h.reference.clone(),
    };
    // A second case on the same scope is a hold of its own; the same case
    // placed again keeps the first placement.
    let a2 = hold(a.scope, "case-1 amended", T0 + 9);
    let again = hold(a.scope, "case-1", T0 + 10);
    commit(
        s,
        [Op::PutHold(a2.clone()), Op::PutHold(again), release(&b)],
    )
    .await;
    commit(
        s,
        [
            release(&hold(HoldScope::Business(business(9)), "case-2", T0)),
            release(&hold(c.scope, "another case", T0)),
        ],
    )
    .await;
    assert_eq!(
        s.holds().await.unwrap(),
        [c.clone(), d.clone(), a.clone(), a2.clone()]
    );
    commit(s, [release(&a)]).await;
    assert_eq!(s.holds().await.unwrap(), [c, d, a2]);
}

async fn a_consumer_whose_messages_are_deleted_has_none_left(backend: &mut Backend) {
    let s = &*backend.store;
    let now = T0 + 100;
    let delete = |id| Op::DeleteMessage {
        business: business(1),
        id: mid(id),
    };
    let orphans = async || s.orphan_peers(t(now), None, 10).await.unwrap();
    let phones = async || s.census().await.unwrap().phones;
    // Consumer 1 has three live messages, consumer 2 one; neither has a peer
    // yet, so the census counts phones by their messages alone.
    commit(
        s,
        [
            put(&M::new(1, 1, 1, now + HOUR)),
            put(&M::new(1, 2, 1, now + HOUR)),
            put(&M::new(1, 3, 1, now + HOUR)),
            put(&M::new(1, 4, 2, now + HOUR)),
        ],
    )
    .await;
    assert_eq!(phones().await, 2);
    // Deleted one at a time: the consumer keeps counting while any is left.
    for (id, left) in [(1, 2), (3, 2), (2, 1)] {
        commit(s, [delete(id)]).await;
        assert_eq!(phones().await, left, "after deleting message {id}");
    }
    // A deleted id stored again is the consumer's again, once.
    commit(s, [put(&M::new(1, 1, 1, now + HOUR))]).await;
    assert_eq!(phones().await, 2);
    commit(s, [put_peer(1, peer(1, 0), 1)]).await;
    assert!(orphans().await.is_empty(), "consumer 1 has a live message");
    commit(s, [delete(1)]).await;
    assert_eq!(orphans().await, [(business(1), peer(1, 0))]);
    commit(
        s,
        [Op::DeleteIdlePeer {
            business: business(1),
            peer: peer(1, 0),
            now: t(now),
        }],
    )
    .await;
    assert!(
        s.peer_devices(business(1), phone(1))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(phones().await, 1);
}

async fn census_counts_what_is_stored(backend: &mut Backend) {
    let s = &*backend.store;
    assert_eq!(s.census().await.unwrap(), Census::default());
    commit(
        s,
        [
            put(&M::new(1, 1, 1, T0)),
            put(&M::new(1, 2, 1, T0)),
            put(&M::new(1, 3, 2, T0)),
            put(&M::new(2, 4, 1, T0)),
            put_peer(1, peer(1, 0), 1),
            put_peer(1, peer(1, 1), 1),
            put_peer(1, peer(3, 0), 1),
        ],
    )
    .await;
    s.insert_key(epoch_key(1, T0)).await.unwrap();
    s.insert_key(epoch_key(1, T0 + HOUR)).await.unwrap();
    s.insert_key(epoch_key(2, T0)).await.unwrap();
    s.destroy_key(&epoch_key(2, T0).id, t(T0)).await.unwrap();
    s.insert_key(key(1, KeyKind::SignalPreKey, 1, 1))
        .await
        .unwrap();
    assert_eq!(
        s.census().await.unwrap(),
        Census {
            messages: 4,
            peers: 3,
            // (1,1) (1,2) (2,1) (1,3)
            phones: 4,
            epoch_keys: 2,
        }
    );
    // Consumer 3 of business 1 reaches business 2 too: it counts twice,
    // once per business, its peer records alone counted.
    commit(s, [put_peer(2, peer(3, 0), 2)]).await;
    let c = s.census().await.unwrap();
    assert_eq!((c.peers, c.phones), (4, 5), "{c:?}");
}

async fn extreme_values_round_trip_and_keep_their_order(backend: &mut Backend) {
    let s = &*backend.store;
    let max = u64::MAX;
    let big = MessageRecord {
        business: business(max),
        id: MessageId::from_bytes([0xff; 16]),
        direction: Direction::Outbound,
        phone: PhoneHash::from_bytes([0xff; 16]),
        created: t(0),
        expiry: Timestamp::MAX,
        epoch: Epoch::ending_at(Timestamp::MAX),
        delivery: Delivery {
            status: Status::Sent,
            failure: None,
            attempts: u32::MAX,
            next_attempt: Some(t(1 << 63)),
            pending_devices: u64::MAX,
            overdue_at: None,
            told: None,
            accepted_by: u64::MAX,
        },
        sealed: Vec::new(),
    };
    let small = MessageRecord {
        business: business(1),
        id: MessageId::from_bytes([0; 16]),
        phone: PhoneHash::from_bytes([0; 16]),
        expiry: t(0),
        epoch: Epoch::ending_at(t(0)),
        delivery: Delivery {
            next_attempt: Some(t(0)),
            accepted_by: 0,
            ..big.delivery
        },
        ..big.clone()
    };
    let mid_value = MessageRecord {
        business: business((1 << 63) - 1),
        id: MessageId::from_bytes([0x80; 16]),
        expiry: t((1 << 63) - 1),
        delivery: Delivery {
            next_attempt: Some(t((1 << 63) - 1)),
            ..big.delivery
        },
        ..big.clone()
    };
    commit(
        s,
        [
            Op::PutMessage(Box::new(big.clone())),
            Op::PutMessage(Box::new(small.clone())),
            Op::PutMessage(Box::new(mid_value.clone())),
            put_peer(
                max,
                PeerId {
                    phone: PhoneHash::from_bytes([0xff; 16]),
                    device: u32::MAX,
                },
                1,
            ),
        ],
    )
    .await;
    assert_eq!(
        s.message(big.business, big.id).await.unwrap(),
        Some(big.clone())
    );
    assert_eq!(
        s.message(small.business, small.id).await.unwrap(),
        Some(small.clone())
    );
    assert_eq!(
        msg_keys(&s.due_messages(Timestamp::MAX, 10).await.unwrap()),
        [
            (small.business, small.id),
            (mid_value.business, mid_value.id),
            (big.business, big.id)
        ]
    );
    assert_eq!(
        msg_keys(
            &s.expired_open_messages(Timestamp::MAX, None, 10)
                .await
                .unwrap()
        ),
        [
            (small.business, small.id),
            (mid_value.business, mid_value.id),
            (big.business, big.id)
        ]
    );
    assert_eq!(
        s.message_epochs(big.business, None).await.unwrap(),
        [big.epoch]
    );
    assert_eq!(
        s.peer_devices(business(max), PhoneHash::from_bytes([0xff; 16]))
            .await
            .unwrap(),
        [u32::MAX]
    );

    let top = key(max, KeyKind::Epoch, max, u32::MAX);
    let low = key(max, KeyKind::Epoch, 0, 0);
    s.insert_key(top.clone()).await.unwrap();
    s.insert_key(low.clone()).await.unwrap();
    assert_eq!(
        s.key(&top.id).await.unwrap(),
        Some(KeyEntry::Wrapped(top.clone()))
    );
    assert_eq!(
        s.ended_epoch_keys(Timestamp::MAX, 10).await.unwrap(),
        [low.id, top.id]
    );
    assert_eq!(
        ids(&s
            .keys_of_kind(business(max), KeyKind::Epoch, None, 10)
            .await
            .unwrap()),
        [low.id, top.id]
    );
    s.destroy_key(&top.id, Timestamp::MAX).await.unwrap();
    assert_eq!(
        s.key(&top.id).await.unwrap(),
        Some(KeyEntry::Destroyed { at: Timestamp::MAX })
    );
    let ring = KekRing::new(
        business(max),
        Vec::new(),
        check(business(max), 1),
        Timestamp::MAX,
    );
    s.put_ring(&ring, None).await.unwrap();
    assert_eq!(s.ring(business(max)).await.unwrap(), Some(ring));
}

// ---------------------------------------------------------------------------
// Atomicity and concurrency

async fn a_batch_is_all_or_nothing(backend: &mut Backend) {
    let s = &*backend.store;
    commit(s, [put_peer(1, peer(1, 0), 1), put(&M::new(1, 1, 1, T0))]).await;
    let before = s.census().await.unwrap();

    // A batch takes effect as a whole: later ops see earlier ones.
    commit(
        s,
        [
            put(&M::new(1, 2, 1, T0)),
            Op::UpdateDelivery {
                business: business(1),
                id: mid(2),
                expected: M::new(1, 2, 1, T0).record().delivery,
                delivery: Delivery::queued(t(T0)),
            },
        ],
    )
    .await;
    assert_eq!(
        s.message(business(1), mid(2))
            .await
            .unwrap()
            .unwrap()
            .delivery,
        Delivery::queued(t(T0))
    );

    let unappliable = backend.unappliable;
    let failing = batch([
        put(&M::new(1, 3, 5, T0)),
        put_peer(1, peer(1, 0), 99),
        Op::DeleteMessage {
            business: business(1),
            id: mid(1),
        },
        Op::PutHold(Hold {
            scope: HoldScope::Business(business(1)),
            reference: "x".into(),
            placed: t(T0),
        }),
        unappliable(),
        put_peer(1, peer(2, 0), 98),
    ]);
    let err = s.commit(failing).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Backend(_) | StoreError::Conflict),
        "{err}"
    );
    // Nothing of it happened, before or after the failing op.
    assert_eq!(s.message(business(1), mid(3)).await.unwrap(), None);
    assert_eq!(
        s.peer(business(1), peer(1, 0)).await.unwrap(),
        Some(bytes(1, 80))
    );
    assert!(s.message(business(1), mid(1)).await.unwrap().is_some());
    assert!(s.holds().await.unwrap().is_empty());
    assert_eq!(s.peer(business(1), peer(2, 0)).await.unwrap(), None);
    assert_eq!(
        s.census().await.unwrap(),
        Census {
            messages: before.messages + 1,
            ..before
        }
    );
    // The store still works.
    commit(s, [put_peer(1, peer(2, 0), 98)]).await;
    assert!(s.peer(business(1), peer(2, 0)).await.unwrap().is_some());
}

async fn a_failing_batch_fails_alone_among_concurrent_ones(backend: &mut Backend) {
    let unappliable = backend.unappliable;
    // Good batches from many tasks, and bad ones among them: whichever
    // transactions they share, every good batch lands and every bad one fails.
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let s = backend.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..20u64 {
                let n = task * 100 + i;
                let bad = i % 7 == 3;
                let mut ops = vec![put(&M::new(1, n, n, T0)), put_peer(1, peer(n, 0), n)];
                if bad {
                    ops.insert(1, unappliable());
                }
                results.push((n, bad, s.commit(batch(ops)).await));
            }
            results
        }));
    }
    for task in tasks {
        for (n, bad, result) in task.await.unwrap() {
            let stored = backend.store.message(business(1), mid(n)).await.unwrap();
            let peer = backend.store.peer(business(1), peer(n, 0)).await.unwrap();
            if bad {
                assert!(result.is_err(), "batch {n} cannot be applied");
                assert!(stored.is_none() && peer.is_none(), "batch {n} half applied");
            } else {
                assert!(result.is_ok(), "batch {n}: {result:?}");
                assert_eq!(stored, Some(M::new(1, n, n, T0).record()));
                assert_eq!(peer, Some(bytes(n, 80)));
            }
        }
    }
}

async fn readers_never_observe_half_a_batch(backend: &mut Backend) {
    // Each batch stores one peer and three messages of a new consumer; nothing
    // is ever deleted. A reader that sees a batch's peer must see its
    // messages, and every census must count three messages per peer.
    const WRITERS: u64 = 4;
    const BATCHES: u64 = 60;
    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..2u64 {
        let s = backend.store.clone();
        let done = done.clone();
        let checks = checks.clone();
        readers.push(tokio::spawn(async move {
            let mut n = r;
            // At least a few rounds even if the writers finish first.
            let mut rounds = 0;
            while !done.load(Ordering::Acquire) || rounds < 5 {
                rounds += 1;
                let c = s.census().await.unwrap();
                assert_eq!(c.messages, 3 * c.peers, "census saw half a batch: {c:?}");
                assert_eq!(c.phones, c.peers, "{c:?}");
                n = (n * 7 + 3) % (WRITERS * BATCHES);
                if s.peer(business(1), peer(n, 0)).await.unwrap().is_some() {
                    for j in 0..3 {
                        assert!(
                            s.message(business(1), mid(n * 3 + j))
                                .await
                                .unwrap()
                                .is_some(),
                            "batch {n}: peer visible, message {j} not"
                        );
                    }
                }
                checks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let s = backend.store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..BATCHES {
                let n = i * WRITERS + w;
                let mut ops = vec![put_peer(1, peer(n, 0), n)];
                ops.extend((0..3).map(|j| put(&M::new(1, n * 3 + j, n, T0 + HOUR))));
                s.commit(batch(ops)).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        r.await.unwrap();
    }
    assert!(checks.load(Ordering::Relaxed) >= 10);
    let c = backend.store.census().await.unwrap();
    assert_eq!(
        (c.peers, c.messages),
        (WRITERS * BATCHES, 3 * WRITERS * BATCHES)
    );
}

async fn many_tasks_commit_concurrently_and_every_record_is_kept(backend: &mut Backend) {
    const TASKS: u64 = 32;
    const COMMITS: u64 = 200;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let s = backend.store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..COMMITS {
                let n = task * COMMITS + i;
                s.commit(batch([
                    put(&M::new(1 + task % 3, n, n, T0 + HOUR + n)),
                    put_peer(1 + task % 3, peer(n, 1), n),
                ]))
                .await
                .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let s = &*backend.store;
    let mut seen = BTreeMap::new();
    for task in 0..TASKS {
        for i in 0..COMMITS {
            let n = task * COMMITS + i;
            let b = 1 + task % 3;
            let expected = M::new(b, n, n, T0 + HOUR + n).record();
            assert_eq!(
                s.message(business(b), mid(n)).await.unwrap().as_ref(),
                Some(&expected),
                "message {n}"
            );
            assert_eq!(
                s.peer(business(b), peer(n, 1)).await.unwrap(),
                Some(bytes(n, 80)),
                "peer {n}"
            );
            *seen.entry(b).or_insert(0u64) += 1;
        }
    }
    let c = s.census().await.unwrap();
    assert_eq!((c.messages, c.peers), (TASKS * COMMITS, TASKS * COMMITS));
    assert_eq!(seen.values().sum::<u64>(), TASKS * COMMITS);
}

// ---------------------------------------------------------------------------
// The crate's own users, end to end

#[cfg(feature = "testing")]
async fn vault_and_signal_sessions_run_over_the_store(backend: &mut Backend) {
    use std::time::Duration;

    use custodian::envelope::{Kind, Label};
    use custodian::ids::PhoneNumber;
    use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
    use custodian::signal::{MessageKind, Sessions, SignalConfig};
    use custodian::testing::ConsumerDevice;
    use custodian::time::{Clock, ManualClock};
    use custodian::vault::Vault;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    let root = [0x42; 32];
    let clock = ManualClock::new(t(T0));
    let b = business(555);
    let number: PhoneNumber = "+447700900001".parse().unwrap();

    let open = |store: &Arc<dyn Storage>| {
        let provider = Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(
            &mut root.clone(),
        )));
        let keys = Arc::new(KeyManager::new(provider, store.clone()));
        let vault = Arc::new(Vault::new(
            keys.clone(),
            Arc::new(clock.clone()),
            EpochLength::DEFAULT,
        ));
        let sessions =
            Sessions::new(vault.clone(), store.clone(), SignalConfig::default()).unwrap();
        (keys, vault, sessions)
    };

    let (keys, vault, sessions) = open(&backend.store);
    let label = Label {
        kind: Kind::InboundMessage,
        business: b,
        id: MessageId::random(),
        expiry: clock.now().saturating_add(DAY),
        region: "eu".parse().unwrap(),
    };
    let sealed = vault.seal(&label, b"stored content").await.unwrap();
    assert_eq!(
        vault.open(&sealed, b).await.unwrap().plaintext.to_vec(),
        b"stored content"
    );

    let expiry = clock.now().saturating_add(30 * DAY);
    let mut device = ConsumerDevice::new(0);
    let published = sessions.publish(b).await.unwrap();
    device
        .start_session(b, &published.bundle(Some(0)))
        .await
        .unwrap();
    let peer = PeerId {
        phone: keys.phone_hash(b, &number).await.unwrap(),
        device: device.device_id(),
    };
    let first = device.encrypt(b, b"hello").await.unwrap();
    assert_eq!(first.kind, MessageKind::FirstContact);
    let got = sessions.decrypt(b, peer, &first, expiry).await.unwrap();
    assert_eq!(*got.plaintext, b"hello");
    for turn in 0..5 {
        let text = format!("business turn {turn}");
        let out = sessions
            .encrypt(b, peer, text.as_bytes(), expiry)
            .await
            .unwrap();
        assert_eq!(device.decrypt(b, &out).await.unwrap(), text.as_bytes());
        let text = format!("consumer turn {turn}");
        let back = device.encrypt(b, text.as_bytes()).await.unwrap();
        assert_eq!(
            sessions
                .decrypt(b, peer, &back, expiry)
                .await
                .unwrap()
                .plaintext
                .as_slice(),
            text.as_bytes()
        );
    }
    assert!(
        backend.store.peer(b, peer).await.unwrap().is_some(),
        "the session state is stored"
    );

    // A restart: new managers over the reopened store carry on the conversation.
    drop((keys, vault, sessions));
    backend.reopen().await;
    let (keys, vault, sessions) = open(&backend.store);
    assert_eq!(
        vault.open(&sealed, b).await.unwrap().plaintext.to_vec(),
        b"stored content"
    );
    assert_eq!(keys.phone_hash(b, &number).await.unwrap(), peer.phone);
    let back = device.encrypt(b, b"after restart").await.unwrap();
    assert_eq!(
        sessions
            .decrypt(b, peer, &back, expiry)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"after restart"
    );
    let out = sessions
        .encrypt(b, peer, b"welcome back", expiry)
        .await
        .unwrap();
    assert_eq!(device.decrypt(b, &out).await.unwrap(), b"welcome back");
}

/// Counts add up per business, period and category; a take moves the
/// periods ended by its time and no others, never an empty take, never
/// twice under one id; a count made later for a taken period waits for the
/// next take; settling forgets that take alone.
async fn billing_is_counted_taken_and_settled_as_documented(backend: &mut Backend) {
    let s = &*backend.store;
    assert_eq!(
        s.billing(business(1)).await.unwrap(),
        StoredBilling::default()
    );
    let take_by = |id: u64, day: u64| Op::TakeBilling {
        business: business(1),
        id: take(id),
        closed_by: t(T0 + day * DAY),
        at: t(T0 + day * DAY + id),
    };
    // Nothing closed by day 0's start: no take.
    commit(s, [bill(1, 0, Category::Marketing), take_by(1, 0)]).await;
    assert!(s.billing(business(1)).await.unwrap().takes.is_empty());
    commit(
        s,
        [
            bill(1, 0, Category::Marketing),
            bill(1, 0, Category::Service),
            bill(1, 1, Category::Utility),
            bill(2, 0, Category::Marketing),
        ],
    )
    .await;
    assert_eq!(
        s.billing_businesses().await.unwrap(),
        [business(1), business(2)]
    );
    // Day 0 closed by day 1's start; day 1 open.
    commit(s, [take_by(2, 1), bill(1, 0, Category::Marketing)]).await;
    // The same id again takes nothing more.
    commit(s, [take_by(2, 3)]).await;
    let stored = s.billing(business(1)).await.unwrap();
    assert_eq!(
        stored.counts,
        [
            count(None, 0, Category::Marketing, 1),
            count(None, 1, Category::Utility, 1),
            count(Some(2), 0, Category::Marketing, 2),
            count(Some(2), 0, Category::Service, 1),
        ]
    );
    assert_eq!(
        stored.takes,
        [BillingTake {
            id: take(2),
            at: t(T0 + DAY + 2)
        }]
    );
    // A second take, then the first settled: the second stays, in order.
    commit(s, [take_by(3, 2)]).await;
    let takes = |b: StoredBilling| b.takes.iter().map(|t| t.id.get()).collect::<Vec<_>>();
    assert_eq!(takes(s.billing(business(1)).await.unwrap()), [2, 3]);
    commit(
        s,
        [Op::SettleBilling {
            business: business(1),
            id: take(2),
        }],
    )
    .await;
    let stored = s.billing(business(1)).await.unwrap();
    assert_eq!(takes(stored.clone()), [3]);
    assert_eq!(
        stored.counts,
        [
            count(Some(3), 0, Category::Marketing, 1),
            count(Some(3), 1, Category::Utility, 1),
        ]
    );
    // Settling what is not there changes nothing; the other business's
    // counts were never touched.
    commit(
        s,
        [Op::SettleBilling {
            business: business(1),
            id: take(2),
        }],
    )
    .await;
    assert_eq!(s.billing(business(1)).await.unwrap(), stored);
    assert_eq!(
        s.billing(business(2)).await.unwrap().counts,
        [count(None, 0, Category::Marketing, 1)]
    );
    commit(
        s,
        [Op::SettleBilling {
            business: business(1),
            id: take(3),
        }],
    )
    .await;
    assert_eq!(
        s.billing(business(1)).await.unwrap(),
        StoredBilling::default()
    );
    assert_eq!(s.billing_businesses().await.unwrap(), [business(2)]);
}

// ---------------------------------------------------------------------------
// Durable backends only

#[cfg(feature = "sqlite")]
mod durable {
    use super::*;

    /// Everything the read methods return, for comparing two states.
    async fn snapshot(s: &dyn Storage) -> String {
        let mut out = String::new();
        for b in [1, 2] {
            out += &format!("{:?}\n", s.ring(business(b)).await.unwrap());
            for kind in KeyKind::ALL {
                out += &format!(
                    "{:?}\n",
                    s.keys_of_kind(business(b), *kind, None, 1000)
                        .await
                        .unwrap()
                );
            }
            out += &format!("{:?}\n", s.message_epochs(business(b), None).await.unwrap());
        }
        out += &format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
            s.key(&epoch_key(1, T0).id).await.unwrap(),
            s.ended_epoch_keys(Timestamp::MAX, 1000).await.unwrap(),
            s.due_messages(Timestamp::MAX, 1000).await.unwrap(),
            s.orphan_peers(Timestamp::MAX, None, 1000).await.unwrap(),
            s.holds().await.unwrap(),
            s.census().await.unwrap(),
        );
        out += &format!(
            "{:?}\n{:?}\n{:?}\n",
            s.billing_businesses().await.unwrap(),
            s.billing(business(1)).await.unwrap(),
            s.billing(business(2)).await.unwrap(),
        );
        for n in 0..20 {
            out += &format!(
                "{:?} {:?}\n",
                s.message(business(1), mid(n)).await.unwrap(),
                s.peer(business(1), peer(n, 0)).await.unwrap()
            );
        }
        out
    }

    async fn survives_reopen(mut backend: Backend) {
        let s = backend.store.clone();
        let ring = KekRing::new(business(1), bytes(5, 48), check(business(1), 1), t(T0));
        s.put_ring(&ring, None).await.unwrap();
        for n in 0..20 {
            s.insert_key(key(1, KeyKind::SignalPreKey, n, 1))
                .await
                .unwrap();
            commit(
                &*s,
                [
                    put(&M::new(1, n, n, T0 + n * HOUR).due(T0 + n)),
                    put_peer(1, peer(n, 0), n),
                ],
            )
            .await;
        }
        s.insert_key(epoch_key(1, T0)).await.unwrap();
        s.destroy_key(&epoch_key(1, T0).id, t(T0 + 1))
            .await
            .unwrap();
        commit(
            &*s,
            [Op::PutHold(Hold {
                scope: HoldScope::Consumer(business(1), phone(3)),
                reference: "case".into(),
                placed: t(T0),
            })],
        )
        .await;
        commit(
            &*s,
            [
                bill(2, 0, Category::Utility),
                bill(2, 1, Category::Marketing),
                Op::TakeBilling {
                    business: business(2),
                    id: take(7),
                    closed_by: t(T0 + DAY),
                    at: t(T0 + DAY),
                },
                bill(2, 0, Category::Service),
            ],
        )
        .await;
        assert_eq!(
            s.delete_expired(t(T0 + 2 * HOUR), Timestamp::UNIX_EPOCH, &[], 100)
                .await
                .unwrap()
                .len(),
            0
        );
        let before = snapshot(&*s).await;
        drop(s);
        backend.reopen().await;
        let after = snapshot(&*backend.store).await;
        assert_eq!(before, after);
        assert!(after.contains("Destroyed"), "{after}");
        assert!(after.contains("take: Some(7)"), "{after}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_committed_survives_closing_and_reopening() {
        survives_reopen(Backend::sqlite()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_committed_survives_reopening_with_normal_durability() {
        survives_reopen(Backend::sqlite_with(SqliteConfig {
            durability: Durability::Normal,
            ..SqliteConfig::default()
        }))
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_handles_on_one_file_see_each_others_commits() {
        let backend = Backend::sqlite();
        let (dir, config) = backend.sqlite.as_ref().unwrap();
        let other = SqliteStore::open(dir.path().join("store.db"), config.clone()).unwrap();
        commit(&*backend.store, [put(&M::new(1, 1, 1, T0))]).await;
        assert!(other.message(business(1), mid(1)).await.unwrap().is_some());
        commit(&other, [put_peer(1, peer(1, 0), 1)]).await;
        assert!(
            backend
                .store
                .peer(business(1), peer(1, 0))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn the_store_needs_no_async_runtime() {
        // Driven by a bare executor: writes wait on the writer thread's reply.
        let backend = Backend::sqlite();
        let s = backend.store.clone();
        let stored = block_on(async move {
            s.commit(batch([put(&M::new(1, 1, 1, T0))])).await.unwrap();
            s.message(business(1), mid(1)).await.unwrap()
        });
        assert_eq!(stored, Some(M::new(1, 1, 1, T0).record()));
    }

    /// A minimal executor: poll, park until woken.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}

/// The retention sweep over the backend: expired messages deleted, their
/// consumers' Signal state forgotten, ended epoch keys destroyed; live
/// messages, their consumers and held ones kept; and a second sweep finds
/// nothing left to do.
async fn the_retention_sweep_runs_over_the_store(backend: &mut Backend) {
    use custodian::keys::{KeyManager, LocalKeyProvider, SecretKey};
    use custodian::retention::{ExpiryNotifier, Notice, Retention, RetentionPolicy};
    use custodian::visibility::MemoryAuditSink;

    struct Told;
    #[async_trait::async_trait]
    impl ExpiryNotifier for Told {
        async fn expired_undelivered(&self, _: &MessageRecord) -> Notice {
            Notice::Told
        }
    }

    let s = backend.store.clone();
    let keys = Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        s.clone(),
    ));
    let retention = Retention::new(
        s.clone(),
        keys.clone(),
        RetentionPolicy::default(),
        Arc::new(MemoryAuditSink::new()),
    )
    .with_batch(3);
    let now = T0 + 10 * HOUR;
    // Consumer 1: expired only; consumer 2: one live message; consumer 3:
    // expired but held; consumer 4: expired and still open.
    let mut ops = vec![
        put(&M::new(1, 1, 1, now - HOUR)),
        put(&M::new(1, 2, 1, now - 2 * HOUR)),
        put(&M::new(1, 3, 2, now - HOUR)),
        put(&M::new(1, 4, 2, now + HOUR)),
        put(&M::new(1, 5, 3, now - HOUR)),
        put(&M::new(1, 6, 4, now - HOUR).status(Status::Sent).due(now)),
    ];
    // Each consumer's Signal record, sealed under the epoch of its latest
    // message's expiry (the sweep keeps the held one's key).
    for (phone_n, hours) in [(1, 10), (2, 12), (3, 10), (4, 10)] {
        ops.push(Op::PutPeer {
            business: business(1),
            peer: peer(phone_n, 0),
            sealed: sealed_peer(1, T0 + hours * HOUR, phone_n),
        });
    }
    commit(&*s, ops).await;
    // Ended, with nothing held in it; ended, holding the held message;
    // not ended yet.
    for hours in [2, 10, 12] {
        let epoch = Epoch::ending_at(t(T0 + hours * HOUR));
        keys.epoch_key_for_seal(business(1), epoch, t(T0))
            .await
            .unwrap();
    }
    retention
        .place_hold(
            "operator",
            HoldScope::Consumer(business(1), phone(3)),
            "case",
            t(now),
        )
        .await
        .unwrap();

    let report = retention.sweep(t(now), &Told).await.unwrap();
    assert!(report.complete);
    assert_eq!(report.failed_expired, 1);
    assert_eq!(report.messages_deleted, 4, "{report:?}");
    assert_eq!(report.consumers_forgotten, 2, "{report:?}");
    assert_eq!(report.epoch_keys_destroyed, 1, "{report:?}");
    let mut left = Vec::new();
    for n in 1..=6 {
        if s.message(business(1), mid(n)).await.unwrap().is_some() {
            left.push(n);
        }
    }
    assert_eq!(left, [4, 5], "the live and the held message stay");
    for (phone_n, kept) in [(1, false), (2, true), (3, true), (4, false)] {
        assert_eq!(
            s.peer(business(1), peer(phone_n, 0))
                .await
                .unwrap()
                .is_some(),
            kept,
            "consumer {phone_n}"
        );
    }
    for (hours, kept) in [(2, false), (10, true), (12, true)] {
        assert_eq!(
            keys.epoch_key(business(1), Epoch::ending_at(t(T0 + hours * HOUR)))
                .await
                .is_ok(),
            kept,
            "the epoch ending at hour {hours}"
        );
    }
    let again = retention.sweep(t(now), &Told).await.unwrap();
    assert_eq!(
        (
            again.failed_expired,
            again.messages_deleted,
            again.peers_deleted,
            again.epoch_keys_destroyed
        ),
        (0, 0, 0, 0)
    );
}

// ---------------------------------------------------------------------------
// Every backend answers a random run of batches as the memory store does

/// One write of a random run, over a small world (two businesses, four
/// message ids, two consumers, three one-time prekeys) so that writes
/// collide: replays, stale expectations, missing messages, keys consumed
/// twice.
#[derive(Debug, Clone)]
enum Write {
    Put {
        business: u64,
        id: u64,
        phone: u64,
        hours: u64,
        due: Option<u64>,
        status: Status,
    },
    Update {
        business: u64,
        id: u64,
        /// `None`: what is stored when the batch is committed (stale if
        /// an earlier write of the batch changed it); a status: that
        /// status with the rest as stored, stale unless it is the status
        /// stored.
        expected: Option<Status>,
        status: Status,
        due: Option<u64>,
    },
    FailExpired {
        business: u64,
        id: u64,
    },
    Delete {
        business: u64,
        id: u64,
    },
    Consume(u64),
    /// A billable message of `business` on `day`, of category `category`.
    Bill {
        business: u64,
        day: u64,
        category: usize,
    },
    /// Take `id` of `business`, of the days ended by day `closed_by`.
    Take {
        business: u64,
        id: u64,
        closed_by: u64,
    },
    /// Settle take `id` of `business`.
    Settle {
        business: u64,
        id: u64,
    },
}

const STATUSES: [Status; 5] = [
    Status::Queued,
    Status::Sent,
    Status::Delivered,
    Status::Read,
    Status::Failed,
];

fn prekey(n: u64) -> WrappedKey {
    key(1, KeyKind::SignalPreKey, n, 1)
}

impl Write {
    /// The write as an operation on `store` as it stands.
    async fn op(&self, store: &dyn Storage) -> Op {
        match *self {
            Self::Put {
                business,
                id,
                phone,
                hours,
                due,
                status,
            } => {
                let mut m = M::new(business, id, phone, T0 + hours * HOUR).status(status);
                m.next = due.map(|h| T0 + h * HOUR);
                put(&m)
            }
            Self::Update {
                business: b,
                id,
                expected,
                status,
                due,
            } => {
                let stored = store
                    .message(business(b), mid(id))
                    .await
                    .unwrap()
                    .map_or(Delivery::queued(t(T0)), |m| m.delivery);
                Op::UpdateDelivery {
                    business: business(b),
                    id: mid(id),
                    expected: match expected {
                        None => stored,
                        Some(status) => Delivery { status, ..stored },
                    },
                    delivery: Delivery {
                        status,
                        failure: (status == Status::Failed).then_some(FailureReason::Refused),
                        attempts: 1,
                        next_attempt: due.map(|h| t(T0 + h * HOUR)),
                        pending_devices: 0,
                        overdue_at: None,
                        told: None,
                        accepted_by: 0,
                    },
                }
            }
            Self::FailExpired { business: b, id } => Op::FailExpired {
                business: business(b),
                id: mid(id),
            },
            Self::Delete { business: b, id } => Op::DeleteMessage {
                business: business(b),
                id: mid(id),
            },
            Self::Consume(n) => Op::ConsumeKey(prekey(n).id),
            Self::Bill {
                business: b,
                day,
                category,
            } => Op::Bill {
                business: business(b),
                start: t(T0 + day * DAY),
                end: t(T0 + (day + 1) * DAY),
                category: Category::ALL[category],
            },
            Self::Take {
                business: b,
                id,
                closed_by,
            } => Op::TakeBilling {
                business: business(b),
                id: take(id),
                closed_by: t(T0 + closed_by * DAY),
                at: t(T0 + closed_by * DAY + id),
            },
            Self::Settle { business: b, id } => Op::SettleBilling {
                business: business(b),
                id: take(id),
            },
        }
    }
}

fn write() -> impl Strategy<Value = Write> {
    let at = (1..=2u64, 1..=4u64);
    let status = proptest::sample::select(STATUSES.to_vec());
    let due = proptest::option::of(0..6u64);
    prop_oneof![
        3 => (at.clone(), 1..=2u64, 1..48u64, due.clone(), status.clone()).prop_map(
            |((business, id), phone, hours, due, status)| Write::Put {
                business,
                id,
                phone,
                hours,
                due,
                status
            }
        ),
        3 => (at.clone(), proptest::option::of(status.clone()), status, due).prop_map(
            |((business, id), expected, status, due)| Write::Update {
                business,
                id,
                expected,
                status,
                due
            }
        ),
        1 => at.clone().prop_map(|(business, id)| Write::FailExpired { business, id }),
        1 => at.prop_map(|(business, id)| Write::Delete { business, id }),
        1 => (1..=3u64).prop_map(Write::Consume),
        2 => (1..=2u64, 0..4u64, 0..Category::ALL.len()).prop_map(|(business, day, category)| {
            Write::Bill { business, day, category }
        }),
        1 => (1..=2u64, 1..=3u64, 0..5u64).prop_map(|(business, id, closed_by)| Write::Take {
            business,
            id,
            closed_by
        }),
        1 => (1..=2u64, 1..=3u64).prop_map(|(business, id)| Write::Settle { business, id }),
    ]
}

/// What a reader can learn of the small world.
#[derive(Debug, PartialEq)]
struct Seen {
    census: Census,
    due: Vec<(BusinessId, MessageId)>,
    expired_open: Vec<(BusinessId, MessageId)>,
    businesses: Vec<BusinessId>,
    /// Per business, then for no phone and each consumer.
    epochs: Vec<Vec<Epoch>>,
    messages: Vec<Option<MessageRecord>>,
    prekeys: Vec<Option<KeyEntry>>,
    billing: Vec<StoredBilling>,
    billing_businesses: Vec<BusinessId>,
}

async fn observe(s: &dyn Storage) -> Seen {
    let end = t(T0 + 100 * HOUR);
    let mut seen = Seen {
        census: s.census().await.unwrap(),
        due: msg_keys(&s.due_messages(end, 100).await.unwrap()),
        expired_open: msg_keys(&s.expired_open_messages(end, None, 100).await.unwrap()),
        businesses: s.message_businesses().await.unwrap(),
        epochs: Vec::new(),
        messages: Vec::new(),
        prekeys: Vec::new(),
        billing: Vec::new(),
        billing_businesses: s.billing_businesses().await.unwrap(),
    };
    for b in 1..=2 {
        seen.billing.push(s.billing(business(b)).await.unwrap());
        for p in [None, Some(phone(1)), Some(phone(2))] {
            seen.epochs
                .push(s.message_epochs(business(b), p).await.unwrap());
        }
        for id in 1..=4 {
            seen.messages
                .push(s.message(business(b), mid(id)).await.unwrap());
        }
    }
    for n in 1..=3 {
        seen.prekeys.push(s.key(&prekey(n).id).await.unwrap());
    }
    seen
}

/// Run `batches` on `store`; each commit's outcome, then what a reader sees.
/// `padded` adds a write that changes nothing to every batch, so that no
/// batch is of one operation.
async fn run(
    store: &dyn Storage,
    batches: &[Vec<Write>],
    padded: bool,
) -> (Vec<Result<(), String>>, Seen) {
    for n in 1..=3 {
        store.insert_key(prekey(n)).await.unwrap();
    }
    let mut outcomes = Vec::new();
    for writes in batches {
        let mut ops = Vec::with_capacity(writes.len() + 1);
        for write in writes {
            ops.push(write.op(store).await);
        }
        if padded {
            ops.push(Op::DeleteHold {
                scope: HoldScope::Business(business(1)),
                reference: "no such hold".into(),
            });
        }
        let outcome = store.commit(batch(ops)).await;
        outcomes.push(outcome.map_err(|e| format!("{e:?}")));
    }
    (outcomes, observe(store).await)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A batch of one write (checked as the memory store applies it) and
    /// the same write in a longer batch (checked whole first) succeed or
    /// conflict alike and leave the same state, on every backend.
    #[test]
    fn every_backend_runs_random_batches_as_the_memory_store_does(
        batches in proptest::collection::vec(proptest::collection::vec(write(), 1..=3), 1..16),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let expected = rt.block_on(run(&MemoryStore::new(), &batches, false));
        let padded = rt.block_on(run(&MemoryStore::new(), &batches, true));
        prop_assert_eq!(&padded, &expected, "memory, every batch checked whole");
        #[cfg(feature = "sqlite")]
        {
            let backend = Backend::sqlite();
            let sqlite = rt.block_on(run(&*backend.store, &batches, false));
            prop_assert_eq!(&sqlite, &expected, "sqlite");
        }
    }
}
