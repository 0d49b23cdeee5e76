//! Retention, legal holds and the sweep across stores (a review's
//! regression guards): tenant isolation of holds and shreds, clock steps,
//! one-step slices, and a seeded differential run of the memory store
//! against SQLite with an oracle of the retention promises
//! (`REVIEW_SEEDS`, `REVIEW_FIRST` and `REVIEW_BACK=1`, clock steps back and
//! early shreds, widen it).
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    dead_code,
    unused_imports,
    reason = "tests assert by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use custodian::envelope::{Envelope, Kind, Label};
use custodian::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber, Region};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::retention::{
    Admission, BusinessRetention, CEILING, Decision, ExpiryNotifier, HoldError, InUse, Notice,
    Periods, PolicyChangeError, PolicyFile, PurgeReason, REPORT_GRACE, RecordFacts, Retention,
    RetentionPolicy, check_residency, evaluate,
};
use custodian::store::{
    Batch, Delivery, Direction, FailureReason, HoldScope, MemoryStore, MessageRecord, Op, PeerId,
    Status, Storage,
};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::{OpenError, Vault};
use custodian::visibility::{
    AuditError, AuditSink, Change, HoldAction, HoldEvent, MemoryAuditSink,
};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const T0: u64 = 1_767_225_600_000;

fn business(id: u64) -> BusinessId {
    BusinessId::new(id).unwrap()
}

fn kept_for(b: BusinessId, period: Duration) -> RetentionPolicy {
    RetentionPolicy::default()
        .with_business(
            b,
            BusinessRetention {
                periods: Periods::both(period),
                region: None,
            },
        )
        .unwrap()
}

// ---- harness copied from tests/retention.rs --------------------------------
/// Records every expired-undelivered report; can be told to fail.
#[derive(Default)]
struct Notices {
    told: Mutex<Vec<MessageId>>,
    refuse: AtomicBool,
}

#[async_trait]
impl ExpiryNotifier for Notices {
    async fn expired_undelivered(&self, message: &MessageRecord) -> Notice {
        if self.refuse.load(Ordering::SeqCst) {
            return Notice::Untold;
        }
        self.told.lock().unwrap().push(message.id);
        Notice::Told
    }
}

/// The storage backends the crate has: every promise is checked on each.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    #[cfg(feature = "sqlite")]
    Sqlite,
}

impl Backend {
    const ALL: &[Self] = &[
        Self::Memory,
        #[cfg(feature = "sqlite")]
        Self::Sqlite,
    ];

    /// A fresh store, and the directory of its file if it has one.
    fn fresh(self) -> (Arc<dyn Storage>, Option<tempfile::TempDir>) {
        match self {
            Self::Memory => (Arc::new(MemoryStore::new()), None),
            #[cfg(feature = "sqlite")]
            Self::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = custodian::store::SqliteStore::open(
                    dir.path().join("store.db"),
                    custodian::store::SqliteConfig::default(),
                )
                .unwrap();
                (Arc::new(store), Some(dir))
            }
        }
    }
}

struct World {
    store: Arc<dyn Storage>,
    /// Where a durable store's file lives, kept for the world's lifetime.
    _dir: Option<tempfile::TempDir>,
    clock: ManualClock,
    keys: Arc<KeyManager>,
    vault: Vault,
    retention: Retention,
    audit: Arc<MemoryAuditSink>,
    root: [u8; 32],
    next: AtomicU64,
}

#[derive(Clone)]
struct Stored {
    record: MessageRecord,
    plaintext: Vec<u8>,
}

impl World {
    /// A world over the in-memory store.
    fn new(batch: usize) -> Self {
        Self::over(Arc::new(MemoryStore::new()), None, batch)
    }

    /// A world over a SQLite store in a fresh file.
    #[cfg(feature = "sqlite")]
    fn sqlite(batch: usize) -> Self {
        Self::on(Backend::Sqlite, batch)
    }

    /// A world over a fresh store of `backend`.
    fn on(backend: Backend, batch: usize) -> Self {
        let (store, dir) = backend.fresh();
        Self::over(store, dir, batch)
    }

    fn over(store: Arc<dyn Storage>, dir: Option<tempfile::TempDir>, batch: usize) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let root = [0x33; 32];
        let keys = Arc::new(KeyManager::new(
            Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(
                &mut root.clone(),
            ))),
            store.clone(),
        ));
        let vault = Vault::new(keys.clone(), Arc::new(clock.clone()), EpochLength::DEFAULT);
        let audit = Arc::new(MemoryAuditSink::new());
        let retention = Retention::new(
            store.clone(),
            keys.clone(),
            RetentionPolicy::default(),
            audit.clone(),
        )
        .with_batch(batch);
        Self {
            store,
            _dir: dir,
            clock,
            keys,
            vault,
            retention,
            audit,
            root,
            next: AtomicU64::new(1),
        }
    }

    /// An operator places a legal hold on `scope` for `case`, now.
    async fn hold(&self, scope: HoldScope, case: &str) {
        let now = self.now();
        self.retention
            .place_hold("operator", scope, case, now)
            .await
            .unwrap();
    }

    /// The operator releases it.
    async fn release(&self, scope: HoldScope, case: &str) {
        let now = self.now();
        self.retention
            .release_hold("operator", scope, case, now)
            .await
            .unwrap();
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    async fn phone(&self, b: BusinessId, n: u32) -> PhoneHash {
        let number: PhoneNumber = format!("+44770090{n:04}").parse().unwrap();
        self.keys.phone_hash(b, &number).await.unwrap()
    }

    /// Store a message (and touch its consumer's Signal state) as the
    /// processor would: sealed, with the policy's expiry, in one commit.
    async fn store(
        &self,
        b: BusinessId,
        consumer: u32,
        direction: Direction,
        open: bool,
    ) -> Stored {
        self.store_admitted(self.retention.admit(), b, consumer, direction, open)
            .await
    }

    /// As [`store`](Self::store), with the expiry of a policy admitted
    /// earlier (the message arrived then, and is stored only now).
    async fn store_admitted(
        &self,
        admission: Admission<'_>,
        b: BusinessId,
        consumer: u32,
        direction: Direction,
        open: bool,
    ) -> Stored {
        self.try_store_admitted(admission, b, consumer, direction, open)
            .await
            .unwrap()
    }

    async fn try_store(
        &self,
        b: BusinessId,
        consumer: u32,
        direction: Direction,
        open: bool,
    ) -> Option<Stored> {
        self.try_store_admitted(self.retention.admit(), b, consumer, direction, open)
            .await
    }

    async fn try_store_admitted(
        &self,
        admission: Admission<'_>,
        b: BusinessId,
        consumer: u32,
        direction: Direction,
        open: bool,
    ) -> Option<Stored> {
        let phone = self.phone(b, consumer).await;
        let now = self.now();
        let expiry = admission.policy().expiry(b, direction, now);
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let label = Label {
            kind: match direction {
                Direction::Inbound => Kind::InboundMessage,
                Direction::Outbound => Kind::OutboundMessage,
            },
            business: b,
            id: MessageId::random(),
            expiry,
            region: Region::LOCAL,
        };
        let plaintext = format!("message {n}").into_bytes();
        let sealed = self.vault.seal(&label, &plaintext).await.ok()?;
        let delivery = if open {
            Delivery::queued(now)
        } else {
            Delivery {
                status: Status::Delivered,
                failure: None,
                attempts: 1,
                next_attempt: None,
                pending_devices: 0,
                accepted_by: 0,
            }
        };
        let record = MessageRecord {
            business: b,
            id: label.id,
            direction,
            phone,
            created: now,
            expiry,
            epoch: self.vault.epoch_of(expiry).unwrap(),
            delivery,
            sealed,
        };
        let peer = self.peer_sealed(b, phone, expiry).await?;
        let mut batch = Batch::new();
        batch.push(Op::PutMessage(Box::new(record.clone())));
        batch.push(Op::PutPeer {
            business: b,
            peer: PeerId { phone, device: 0 },
            sealed: peer,
        });
        self.store.commit(batch).await.unwrap();
        drop(admission);
        Some(Stored { record, plaintext })
    }

    /// The consumer's Signal record after a message expiring at `expiry`,
    /// sealed as the Signal layer seals it: with the latest expiry of any
    /// message exchanged with the device (which may be a message deleted
    /// since, its period shortened).
    async fn peer_sealed(
        &self,
        b: BusinessId,
        phone: PhoneHash,
        expiry: Timestamp,
    ) -> Option<Vec<u8>> {
        let stored = self
            .store
            .peer(b, PeerId { phone, device: 0 })
            .await
            .unwrap();
        let before = stored
            .as_ref()
            .map(|s| Envelope::parse(s).unwrap().header().label().expiry);
        // As the Signal layer: only a raise is resealed (a clock stepped
        // back keeps the record as it was).
        if let (Some(s), Some(b)) = (stored, before)
            && b >= expiry
        {
            return Some(s);
        }
        let label = Label {
            kind: Kind::SignalSession,
            business: b,
            id: MessageId::random(),
            expiry: before.map_or(expiry, |e| e.max(expiry)),
            region: Region::LOCAL,
        };
        self.vault.seal(&label, b"session state").await.ok()
    }

    /// The read path: retention decides, then the vault opens.
    async fn read(&self, m: &MessageRecord) -> Option<Vec<u8>> {
        let stored = self.store.message(m.business, m.id).await.unwrap()?;
        if !self
            .retention
            .decide(&stored, self.now())
            .await
            .unwrap()
            .readable()
        {
            return None;
        }
        Some(
            self.vault
                .open(&stored.sealed, m.business)
                .await
                .ok()?
                .plaintext
                .to_vec(),
        )
    }
}

async fn sweep(w: &World) -> custodian::retention::SweepReport {
    w.retention
        .sweep(w.now(), &Notices::default())
        .await
        .unwrap()
}

async fn gone(w: &World, m: &Stored) -> bool {
    w.store
        .message(m.record.business, m.record.id)
        .await
        .unwrap()
        .is_none()
}

async fn has_peer(w: &World, m: &Stored) -> bool {
    !w.store
        .peer_devices(m.record.business, m.record.phone)
        .await
        .unwrap()
        .is_empty()
}

/// Releasing a business-wide hold leaves a consumer hold of the same
/// business standing: that consumer's data is kept, the others' go.
#[tokio::test]
async fn guard_business_hold_release_leaves_a_consumer_hold_standing() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 2);
        let a = business(1);
        let held = w.store(a, 1, Direction::Inbound, false).await;
        let other = w.store(a, 2, Direction::Outbound, false).await;
        w.hold(HoldScope::Business(a), "biz").await;
        w.hold(HoldScope::Consumer(a, held.record.phone), "one")
            .await;
        w.clock.advance(CEILING + 2 * DAY);
        let r = sweep(&w).await;
        assert_eq!(r.messages_deleted, 0, "{backend:?}");
        w.release(HoldScope::Business(a), "biz").await;
        let r = sweep(&w).await;
        assert_eq!(r.messages_deleted, 1, "{backend:?}");
        assert!(gone(&w, &other).await);
        assert!(!has_peer(&w, &other).await, "{backend:?}");
        assert!(!gone(&w, &held).await);
        assert!(has_peer(&w, &held).await, "{backend:?}");
        assert!(w.keys.epoch_key(a, held.record.epoch).await.is_ok());
        w.release(HoldScope::Consumer(a, held.record.phone), "one")
            .await;
        sweep(&w).await;
        let c = w.store.census().await.unwrap();
        assert_eq!(
            (c.messages, c.peers, c.phones, c.epoch_keys),
            (0, 0, 0, 0),
            "{backend:?}"
        );
    }
}

/// A hold on one business does not refuse another business's shred of the
/// same epoch, nor does that shred touch the held business's key.
#[tokio::test]
async fn guard_a_hold_of_one_business_neither_blocks_nor_suffers_anothers_shred() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 8);
        let (a, b) = (business(1), business(2));
        let ma = w.store(a, 1, Direction::Inbound, false).await;
        let mb = w.store(b, 1, Direction::Inbound, false).await;
        assert_eq!(ma.record.epoch, mb.record.epoch);
        w.hold(HoldScope::Business(a), "case").await;
        let destroyed = w
            .retention
            .shred_epoch("op", b, mb.record.epoch, "leaving", w.now())
            .await
            .unwrap();
        assert!(destroyed, "{backend:?}");
        assert_eq!(
            w.read(&ma.record).await,
            Some(ma.plaintext.clone()),
            "{backend:?}"
        );
        assert_eq!(w.read(&mb.record).await, None, "{backend:?}");
        assert!(matches!(
            w.retention
                .shred_epoch("op", a, ma.record.epoch, "x", w.now())
                .await,
            Err(HoldError::Held)
        ));
    }
}

/// A clock stepped back after a sweep: messages stored then stay readable
/// until their own expiry, and a sweep at the earlier time deletes nothing.
#[tokio::test]
async fn guard_clock_stepped_back_after_a_sweep() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 4);
        let a = business(1);
        let first = w.store(a, 1, Direction::Inbound, false).await;
        w.clock.advance(CEILING + HOUR);
        sweep(&w).await;
        assert!(gone(&w, &first).await);
        // Back 20 days.
        w.clock
            .set(Timestamp::from_millis(T0).saturating_add(10 * DAY));
        let later = w.store(a, 1, Direction::Inbound, false).await;
        assert_eq!(w.read(&later.record).await, Some(later.plaintext.clone()));
        let r = sweep(&w).await;
        assert_eq!(r.messages_deleted, 0);
        assert_eq!(
            w.read(&later.record).await,
            Some(later.plaintext.clone()),
            "{backend:?}"
        );
        assert!(has_peer(&w, &later).await, "{backend:?}");
        // Forward to where the first sweep ran: still within its retention.
        w.clock
            .set(Timestamp::from_millis(T0).saturating_add(CEILING + 2 * HOUR));
        sweep(&w).await;
        assert_eq!(
            w.read(&later.record).await,
            Some(later.plaintext.clone()),
            "{backend:?}"
        );
    }
}

/// Shortening one business's retention touches no other business.
#[tokio::test]
async fn guard_shortening_one_business_leaves_others() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 1);
        let (a, b) = (business(1), business(2));
        let ma = w.store(a, 1, Direction::Inbound, false).await;
        let mb = w.store(b, 1, Direction::Inbound, false).await;
        let ma2 = w.store(a, 2, Direction::Outbound, false).await;
        w.retention
            .set_policy(kept_for(a, 7 * DAY), "op", w.now())
            .unwrap();
        w.clock.advance(8 * DAY);
        for _ in 0..20 {
            w.retention
                .sweep_steps(w.now(), &Notices::default(), 2)
                .await
                .unwrap();
        }
        assert!(gone(&w, &ma).await && gone(&w, &ma2).await, "{backend:?}");
        assert!(
            !has_peer(&w, &ma).await && !has_peer(&w, &ma2).await,
            "{backend:?}"
        );
        assert_eq!(
            w.read(&mb.record).await,
            Some(mb.plaintext.clone()),
            "{backend:?}"
        );
        assert!(has_peer(&w, &mb).await);
    }
}

/// One number, two businesses: a hold on it in one business keeps nothing
/// of the other's.
#[tokio::test]
async fn guard_a_consumer_hold_is_its_business_alone() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 4);
        let (a, b) = (business(1), business(2));
        let ma = w.store(a, 7, Direction::Inbound, false).await;
        let mb = w.store(b, 7, Direction::Inbound, false).await;
        w.hold(HoldScope::Consumer(a, ma.record.phone), "c").await;
        // A hold naming business b with a's hash of the number.
        w.hold(HoldScope::Consumer(b, ma.record.phone), "c").await;
        w.clock.advance(CEILING + 2 * DAY);
        sweep(&w).await;
        assert!(!gone(&w, &ma).await);
        assert!(gone(&w, &mb).await, "{backend:?}");
        assert!(!has_peer(&w, &mb).await, "{backend:?}");
        assert!(
            w.keys.epoch_key(b, mb.record.epoch).await.is_err(),
            "{backend:?}"
        );
    }
}

/// A held message capped by a shortening stays unreadable when the period
/// is lengthened again after the sweep.
#[tokio::test]
async fn guard_a_held_message_stays_ended_after_lengthening() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 4);
        let a = business(1);
        let m = w.store(a, 1, Direction::Inbound, false).await;
        w.hold(HoldScope::Business(a), "c").await;
        w.retention
            .set_policy(kept_for(a, DAY), "op", w.now())
            .unwrap();
        w.clock.advance(2 * DAY);
        sweep(&w).await;
        w.retention
            .set_policy(RetentionPolicy::default(), "op", w.now())
            .unwrap();
        assert!(!gone(&w, &m).await);
        assert_eq!(w.read(&m.record).await, None, "{backend:?}");
        let stored = w.store.message(a, m.record.id).await.unwrap().unwrap();
        assert!(!w.retention.readable(&stored, w.now()), "{backend:?}");
    }
}

// ---- differential: memory and SQLite, one random history -------------------

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    present: Vec<(u64, u32, u64, bool, bool)>,
    peers: Vec<(u64, u32)>,
    census: (u64, u64, u64, u64),
}

async fn observe(w: &World, labels: &BTreeMap<MessageId, (u64, u32, u64, Stored)>) -> Seen {
    let mut present = Vec::new();
    for (b, n, seq, m) in labels.values() {
        if let Some(stored) = w
            .store
            .message(m.record.business, m.record.id)
            .await
            .unwrap()
        {
            let readable = w.read(&m.record).await.is_some();
            let key = w
                .keys
                .epoch_key(stored.business, stored.epoch)
                .await
                .is_ok();
            present.push((*b, *n, *seq, readable, key));
        }
    }
    present.sort();
    let mut peers = Vec::new();
    for b in 1..=3u64 {
        for n in 1..=4u32 {
            let phone = w.phone(business(b), n).await;
            if !w
                .store
                .peer_devices(business(b), phone)
                .await
                .unwrap()
                .is_empty()
            {
                peers.push((b, n));
            }
        }
    }
    let c = w.store.census().await.unwrap();
    Seen {
        present,
        peers,
        census: (c.messages, c.peers, c.phones, c.epoch_keys),
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn guard_memory_and_sqlite_sweep_alike() {
    let seeds: u64 = std::env::var("REVIEW_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let first: u64 = std::env::var("REVIEW_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let back = std::env::var("REVIEW_BACK").is_ok();
    for seed in first..=seeds {
        let worlds = [World::new(3), World::sqlite(3)];
        let mut labels: [BTreeMap<MessageId, (u64, u32, u64, Stored)>; 2] =
            [BTreeMap::new(), BTreeMap::new()];
        let mut rng = Lcg(seed);
        let notices = [Notices::default(), Notices::default()];
        let mut log = Vec::new();
        let mut holds: BTreeSet<(u64, Option<u32>)> = BTreeSet::new();
        let mut policy: (u64, Duration) = (1, CEILING);
        let mut caps: [BTreeMap<MessageId, Timestamp>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut covered_before: [BTreeMap<MessageId, bool>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut protected: [BTreeMap<MessageId, bool>; 2] = [BTreeMap::new(), BTreeMap::new()];
        for step in 0..120u64 {
            let mut set_ok = [None, None];
            let mut shred: [Option<String>; 2] = [None, None];
            let mut stored_ok = [None, None];
            let op = rng.below(100);
            let b = 1 + rng.below(3);
            let n = 1 + rng.below(4) as u32;
            let x = rng.below(1000);
            log.push((step, op, b, n, x));
            for (i, w) in worlds.iter().enumerate() {
                match op {
                    0..=34 => {
                        let dir = if x.is_multiple_of(2) {
                            Direction::Inbound
                        } else {
                            Direction::Outbound
                        };
                        let m = w.try_store(business(b), n, dir, x.is_multiple_of(5)).await;
                        stored_ok[i] = Some(m.is_some());
                        if let Some(m) = m {
                            labels[i].insert(m.record.id, (b, n, step, m));
                        }
                    }
                    35..=44 => {
                        let scope = if x.is_multiple_of(3) {
                            HoldScope::Business(business(b))
                        } else {
                            HoldScope::Consumer(business(b), w.phone(business(b), n).await)
                        };
                        // Synchronised first: slices get differently far on each backend.
                        w.retention.sweep(w.now(), &notices[i]).await.unwrap();
                        w.hold(scope, "r").await;
                    }
                    45..=54 => {
                        let scope = if x.is_multiple_of(3) {
                            HoldScope::Business(business(b))
                        } else {
                            HoldScope::Consumer(business(b), w.phone(business(b), n).await)
                        };
                        w.release(scope, "r").await;
                    }
                    55..=59 if back => {
                        let now = w.now().as_millis();
                        w.clock.set(Timestamp::from_millis(
                            now.saturating_sub(3_600_000 * (1 + x % 300)).max(T0),
                        ));
                    }
                    60..=61 if back => {
                        // An early shred of the epoch of a message of b.
                        let mut of_b: Vec<_> = labels[i]
                            .values()
                            .filter(|l| l.0 == b)
                            .map(|l| (l.2, l.3.record.epoch))
                            .collect();
                        of_b.sort();
                        let epoch = of_b.get(x as usize % 7).map(|l| l.1);
                        if let Some(epoch) = epoch {
                            let r = w
                                .retention
                                .shred_epoch("op", business(b), epoch, "r", w.now())
                                .await;
                            shred[i] = Some(format!("{:?}", r.map_err(|e| e.to_string())));
                        }
                    }
                    55..=69 => w.clock.advance(Duration::from_secs(3600 * (1 + x % 200))),
                    73..=74 => {
                        notices[i]
                            .refuse
                            .store(x.is_multiple_of(2), Ordering::SeqCst);
                    }
                    70..=72 => {
                        let period = if x.is_multiple_of(4) {
                            CEILING
                        } else {
                            Duration::from_secs(86_400 * (1 + x % 20))
                        };
                        // A full sweep first: slices get differently far on each backend.
                        w.retention.sweep(w.now(), &notices[i]).await.unwrap();
                        let ok = w
                            .retention
                            .set_policy(kept_for(business(b), period), "op", w.now())
                            .is_ok();
                        set_ok[i] = Some(ok);
                        if ok && i == 1 {
                            policy = (b, period);
                        }
                    }
                    75..=89 => {
                        let _ = w
                            .retention
                            .sweep_steps(w.now(), &notices[i], 1 + x % 6)
                            .await
                            .unwrap();
                    }
                    _ => {
                        let _ = w.retention.sweep(w.now(), &notices[i]).await.unwrap();
                    }
                }
            }
            assert_eq!(
                set_ok[0], set_ok[1],
                "seed {seed} step {step}: set_policy differs"
            );
            assert_eq!(shred[0], shred[1], "seed {seed} step {step}: shred differs");
            assert_eq!(
                stored_ok[0], stored_ok[1],
                "seed {seed} step {step}: storing differs"
            );
            if set_ok[1] == Some(true) {
                for i in 0..2 {
                    for (id, (mb, _, _, m)) in &labels[i] {
                        let period = if *mb == policy.0 { policy.1 } else { CEILING };
                        let c = caps[i].get_mut(id).unwrap();
                        *c = (*c).min(m.record.created.saturating_add(period));
                    }
                }
            }
            for i in 0..2 {
                for (id, (mb, mn, _, m)) in &labels[i] {
                    caps[i].entry(*id).or_insert(m.record.expiry);
                    let covered = holds.contains(&(*mb, None)) || holds.contains(&(*mb, Some(*mn)));
                    let was = covered_before[i].insert(*id, covered).unwrap_or(false);
                    let now = worlds[i].now();
                    if !covered {
                        protected[i].insert(*id, false);
                    } else if !was {
                        protected[i].insert(*id, now < m.record.epoch.end());
                    }
                }
            }
            match op {
                35..=44 => {
                    holds.insert((b, (!x.is_multiple_of(3)).then_some(n)));
                }
                45..=54 => {
                    holds.remove(&(b, (!x.is_multiple_of(3)).then_some(n)));
                }
                _ => {}
            }
            // What reads see is the same whatever the sweeps' progress.
            let mut reads = [Vec::new(), Vec::new()];
            for i in 0..2 {
                for (b, n, seq, m) in labels[i].values() {
                    reads[i].push((*b, *n, *seq, worlds[i].read(&m.record).await.is_some()));
                }
                reads[i].sort();
            }
            assert_eq!(reads[0], reads[1], "seed {seed} step {step}: reads differ");
            if op >= 90 {
                let a = observe(&worlds[0], &labels[0]).await;
                let s = observe(&worlds[1], &labels[1]).await;
                assert_eq!(
                    a, s,
                    "seed {seed} step {step}: memory vs sqlite differ after a full sweep"
                );
                // The promises, after a complete sweep, on each backend.
                for i in 0..2 {
                    if back {
                        break;
                    }
                    let w = &worlds[i];
                    let now = w.now();
                    let held = |b: u64, n: u32| {
                        holds.contains(&(b, None)) || holds.contains(&(b, Some(n)))
                    };
                    let mut live: BTreeSet<(u64, u32)> = BTreeSet::new();
                    for (id, (b, n, seq, m)) in &labels[i] {
                        let ends = caps[i][id];
                        let stored = w
                            .store
                            .message(m.record.business, m.record.id)
                            .await
                            .unwrap();
                        if now < ends {
                            assert!(
                                stored.is_some(),
                                "seed {seed} step {step}: live message ({b},{n},{seq}) deleted; now {now:?} ends {ends:?} expiry {:?} created {:?} policy {policy:?} holds {holds:?}\nlog {log:?}",
                                m.record.expiry,
                                m.record.created
                            );
                            assert_eq!(
                                w.read(&m.record).await,
                                Some(m.plaintext.clone()),
                                "seed {seed} step {step} backend {i}: live message ({b},{n},{seq}) unreadable"
                            );
                            live.insert((*b, *n));
                        } else if held(*b, *n) {
                            if stored.is_some() && protected[i][id] {
                                assert!(
                                    w.keys
                                        .epoch_key(m.record.business, m.record.epoch)
                                        .await
                                        .is_ok(),
                                    "seed {seed} step {step} backend {i}: held ({b},{n},{seq}) lost its key"
                                );
                            }
                        } else {
                            let open = m.record.delivery.status.is_open();
                            let within = now < ends.saturating_add(REPORT_GRACE);
                            assert!(
                                stored.is_none() || (open && within),
                                "seed {seed} step {step} backend {i}: expired unheld ({b},{n},{seq}) kept: {:?}",
                                stored.map(|r| r.delivery)
                            );
                        }
                    }
                    for b in 1..=3u64 {
                        for n in 1..=4u32 {
                            let phone = w.phone(business(b), n).await;
                            let has = !w
                                .store
                                .peer_devices(business(b), phone)
                                .await
                                .unwrap()
                                .is_empty();
                            if has {
                                assert!(
                                    live.contains(&(b, n)) || held(b, n),
                                    "seed {seed} step {step} backend {i}: peer of ({b},{n}) kept with no live message and no hold"
                                );
                            }
                            if live.contains(&(b, n)) {
                                assert!(
                                    has,
                                    "seed {seed} step {step} backend {i}: peer of live ({b},{n}) deleted"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Slices of one step, many of them, leave nothing past retention: every
/// stage gets its turn, on both backends, holds released midway included.
#[tokio::test]
async fn guard_one_step_slices_clear_everything_eventually() {
    for &backend in Backend::ALL {
        let w = World::on(backend, 2);
        let mut all = Vec::new();
        for b in 1..=3 {
            for n in 1..=3 {
                all.push(w.store(business(b), n, Direction::Inbound, n == 2).await);
                all.push(w.store(business(b), n, Direction::Outbound, false).await);
            }
        }
        w.hold(HoldScope::Business(business(2)), "x").await;
        w.retention
            .set_policy(kept_for(business(3), DAY), "op", w.now())
            .unwrap();
        w.clock.advance(CEILING + 2 * DAY);
        let notices = Notices::default();
        for i in 0..300 {
            if i == 100 {
                w.release(HoldScope::Business(business(2)), "x").await;
            }
            w.retention.sweep_steps(w.now(), &notices, 1).await.unwrap();
        }
        let c = w.store.census().await.unwrap();
        assert_eq!(
            (c.messages, c.peers, c.phones, c.epoch_keys),
            (0, 0, 0, 0),
            "{backend:?}"
        );
    }
}

// ---- findings ----------------------------------------------------------------
