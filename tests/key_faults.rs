//! The key hierarchy under faults (a review's regression guards): KEK
//! rotation, epoch keys, holds and shredding, seeded at random, with the
//! key store and the provider failing (before a write, or with its answer
//! lost), callers dropped at awaits, and restarts, over memory and SQLite.
//! No key is lost, none outlives its epoch, none serves after it is
//! destroyed.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use custodian::envelope::{Envelope, Kind, Label};
use custodian::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use custodian::keys::{
    Epoch, EpochLength, KekContext, KekRing, KeyEntry, KeyId, KeyKind, KeyManager, KeyProvider,
    LocalKeyProvider, ProviderError, SecretKey, WrappedKey,
};
use custodian::store::{HoldScope, KeyStore, MemoryStore, StoreError};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::Vault;

const HOUR: Duration = Duration::from_secs(3600);
const T0: u64 = 1_767_225_600_000;

fn business(id: u64) -> BusinessId {
    BusinessId::new(id).unwrap()
}

/// A tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Returns `Pending` once (waking itself), then `Ready`: a point where a
/// caller may stop polling, as a host's timeout would.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

fn pause() -> YieldOnce {
    YieldOnce(false)
}

/// How a flaky call goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// Fails before doing anything.
    Before,
    /// Does it, then answers with an error (the answer lost).
    AnswerLost,
}

/// A key store over `MemoryStore` that yields at every call (so that a
/// caller may be dropped there) and, when on, fails some calls.
struct FlakyStore {
    inner: Arc<dyn KeyStore>,
    on: AtomicBool,
    seed: AtomicU64,
}

impl FlakyStore {
    fn new(seed: u64, inner: Arc<dyn KeyStore>) -> Self {
        Self {
            inner,
            on: AtomicBool::new(false),
            seed: AtomicU64::new(seed | 1),
        }
    }

    fn fault(&self, write: bool) -> Fault {
        if !self.on.load(Ordering::SeqCst) {
            return Fault::None;
        }
        let mut x = self.seed.load(Ordering::SeqCst);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::SeqCst);
        match x % 10 {
            0 => Fault::Before,
            1 if write => Fault::AnswerLost,
            _ => Fault::None,
        }
    }

    async fn write<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        pause().await;
        let fault = self.fault(true);
        if fault == Fault::Before {
            return Err(StoreError::Backend("injected failure".into()));
        }
        let out = op.await;
        pause().await;
        if fault == Fault::AnswerLost {
            return Err(StoreError::Backend("answer lost".into()));
        }
        out
    }

    async fn read<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        pause().await;
        if self.fault(false) == Fault::Before {
            return Err(StoreError::Backend("injected read failure".into()));
        }
        op.await
    }
}

#[async_trait]
impl KeyStore for FlakyStore {
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
        self.read(self.inner.ring(business)).await
    }
    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError> {
        self.write(self.inner.put_ring(ring, expected)).await
    }
    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
        self.read(self.inner.key(id)).await
    }
    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError> {
        self.write(self.inner.insert_key(key)).await
    }
    async fn rewrap_key(&self, key: WrappedKey, expected_version: u32) -> Result<bool, StoreError> {
        self.write(self.inner.rewrap_key(key, expected_version))
            .await
    }
    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError> {
        self.write(self.inner.destroy_key(id, at)).await
    }
    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError> {
        self.write(self.inner.delete_keys(ids)).await
    }
    async fn delete_keys_as_read(&self, keys: &[WrappedKey]) -> Result<u64, StoreError> {
        self.write(self.inner.delete_keys_as_read(keys)).await
    }
    async fn delete_epoch_keys(
        &self,
        ids: &[KeyId],
        seen: &[HoldScope],
    ) -> Result<u64, StoreError> {
        self.write(self.inner.delete_epoch_keys(ids, seen)).await
    }
    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        self.read(
            self.inner
                .keys_wrapped_below(business, version, after, limit),
        )
        .await
    }
    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError> {
        self.read(self.inner.count_wrapped_under(business, version))
            .await
    }
    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        self.read(self.inner.keys_of_kind(business, kind, after, limit))
            .await
    }
    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError> {
        self.read(self.inner.ended_epoch_keys(now, limit)).await
    }
}

/// A provider over `LocalKeyProvider` that yields at every call and, when
/// on, fails some.
struct FlakyProvider {
    inner: LocalKeyProvider,
    on: AtomicBool,
    seed: AtomicU64,
}

impl FlakyProvider {
    fn fails(&self) -> bool {
        if !self.on.load(Ordering::SeqCst) {
            return false;
        }
        let mut x = self.seed.load(Ordering::SeqCst);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::SeqCst);
        x.is_multiple_of(8)
    }
}

#[async_trait]
impl KeyProvider for FlakyProvider {
    async fn wrap(&self, context: &KekContext, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        pause().await;
        if self.fails() {
            return Err(ProviderError::Unavailable("injected".into()));
        }
        self.inner.wrap(context, key).await
    }
    async fn unwrap(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError> {
        pause().await;
        if self.fails() {
            return Err(ProviderError::Unavailable("injected".into()));
        }
        self.inner.unwrap(context, wrapped).await
    }
}

/// Poll `f` at most `polls` times with a waker that does nothing, then
/// drop it: `Some` if it finished.
fn run_for<F: Future>(f: F, polls: u32) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..polls {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return Some(out);
        }
    }
    None
}

/// Run `f` to its end.
fn run<F: Future>(f: F) -> F::Output {
    run_for(f, u32::MAX).unwrap()
}

struct Rig {
    storage: Arc<dyn custodian::store::Storage>,
    _dir: Option<tempfile::TempDir>,
    store: Arc<FlakyStore>,
    provider: Arc<FlakyProvider>,
    clock: ManualClock,
}

impl Rig {
    fn new(seed: u64) -> Self {
        Self::over(seed, Arc::new(MemoryStore::new()), None)
    }

    #[cfg(feature = "sqlite")]
    fn sqlite(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = custodian::store::SqliteStore::open(
            dir.path().join("keys.db"),
            custodian::store::SqliteConfig::default(),
        )
        .unwrap();
        Self::over(seed, Arc::new(store), Some(dir))
    }

    fn over(
        seed: u64,
        storage: Arc<dyn custodian::store::Storage>,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        let inner: Arc<dyn KeyStore> = storage.clone();
        Self {
            storage,
            _dir: dir,
            store: Arc::new(FlakyStore::new(seed, inner)),
            provider: Arc::new(FlakyProvider {
                inner: LocalKeyProvider::new(&SecretKey::from_bytes(&mut [0x42; 32])),
                on: AtomicBool::new(false),
                seed: AtomicU64::new(seed.wrapping_mul(31) | 1),
            }),
            clock: ManualClock::new(Timestamp::from_millis(T0)),
        }
    }

    fn faults(&self, on: bool) {
        self.store.on.store(on, Ordering::SeqCst);
        self.provider.on.store(on, Ordering::SeqCst);
    }

    fn vault(&self) -> Vault {
        let keys = KeyManager::new(self.provider.clone(), self.store.clone());
        Vault::new(
            Arc::new(keys),
            Arc::new(self.clock.clone()),
            EpochLength::DEFAULT,
        )
    }
}

fn label(b: BusinessId, expiry: Timestamp) -> Label {
    Label {
        kind: Kind::InboundMessage,
        business: b,
        id: MessageId::random(),
        expiry,
        region: "eu".parse().unwrap(),
    }
}

/// any interleaving of KEK rotation steps,
/// seals, phone hashes, early shreds and restarts, with the store and the
/// provider failing at random (failures before a write, and writes whose
/// answer is lost) and callers dropped at random awaits, never loses a
/// key: once the faults stop, after a restart, every record sealed (and
/// not shredded) opens, every phone hash is what it was, and a complete
/// rotation (add, promote, rewrap, raise the floor, retire every older
/// version) goes through and still opens everything.
#[test]
fn rotation_under_faults_and_cancellation_loses_no_key() {
    for seed in 1..=60u64 {
        rotation_under_faults(Rig::new(seed), seed);
    }
}

/// The same over a SQLite store: a write whose caller was dropped may land
/// later.
#[cfg(feature = "sqlite")]
#[test]
fn rotation_under_faults_and_cancellation_loses_no_key_sqlite() {
    for seed in 1..=12u64 {
        rotation_under_faults(Rig::sqlite(seed), seed);
    }
}

fn rotation_under_faults(rig: Rig, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut vault = rig.vault();
    let businesses = [business(1), business(2)];
    // (business, sealed, plaintext, maybe shredded)
    let mut records: Vec<(BusinessId, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut shredded: Vec<(BusinessId, Epoch)> = Vec::new();
    let mut hashes: BTreeMap<(u64, u32), PhoneHash> = BTreeMap::new();
    rig.faults(true);
    for step in 0..120 {
        let b = businesses[rng.below(2) as usize];
        let polls = if rng.below(4) == 0 {
            1 + rng.below(12) as u32
        } else {
            u32::MAX
        };
        let keys = vault.keys();
        match rng.below(9) {
            0 | 1 => {
                let expiry = rig
                    .clock
                    .now()
                    .saturating_add(HOUR * (1 + rng.below(48) as u32));
                let plaintext = format!("{seed}/{step}").into_bytes();
                if let Some(Ok(sealed)) = run_for(vault.seal(&label(b, expiry), &plaintext), polls)
                {
                    records.push((b, sealed, plaintext));
                }
            }
            2 => {
                let _ = run_for(keys.add_kek_version(b, rig.clock.now()), polls);
            }
            3 => {
                let v = 1 + rng.below(6) as u32;
                let _ = run_for(keys.promote_kek_version(b, v), polls);
            }
            4 => {
                let _ = run_for(keys.rewrap(b), polls);
            }
            5 => {
                let v = 1 + rng.below(6) as u32;
                let _ = run_for(keys.raise_decrypt_floor(b, v), polls);
            }
            6 => {
                let v = 1 + rng.below(6) as u32;
                let _ = run_for(keys.retire_kek_version(b, v), polls);
            }
            7 => {
                let n = rng.below(3) as u32;
                let number: PhoneNumber = format!("+4477009001{n:02}").parse().unwrap();
                if let Some(Ok(h)) = run_for(keys.phone_hash(b, &number), polls) {
                    let first = *hashes.entry((b.get(), n)).or_insert(h);
                    assert_eq!(first, h, "seed {seed} step {step}: phone hash changed");
                }
            }
            _ => {
                if rng.below(3) == 0 && !records.is_empty() {
                    let i = rng.below(records.len() as u64) as usize;
                    let (rb, sealed, _) = &records[i];
                    let epoch = Envelope::parse(sealed).unwrap().header().epoch();
                    // Whatever comes of it, it may have landed.
                    shredded.push((*rb, epoch));
                    let _ = run_for(
                        keys.destroy_epoch_unchecked(*rb, epoch, rig.clock.now()),
                        polls,
                    );
                } else {
                    vault = rig.vault();
                }
            }
        }
    }
    rig.faults(false);
    let check = |vault: &Vault, when: &str| {
        for (b, sealed, plaintext) in &records {
            let epoch = Envelope::parse(sealed).unwrap().header().epoch();
            if shredded.contains(&(*b, epoch)) {
                continue;
            }
            let opened = run(vault.open(sealed, *b));
            match opened {
                Ok(o) => assert_eq!(&*o.plaintext, plaintext),
                Err(e) => panic!("seed {seed} {when}: a record of {b} does not open: {e:?}"),
            }
        }
        for (&(b, n), h) in &hashes {
            let number: PhoneNumber = format!("+4477009001{n:02}").parse().unwrap();
            let got = run(vault.keys().known_phone_hash(business(b), &number)).unwrap();
            assert_eq!(got, Some(*h), "seed {seed} {when}: phone hash lost");
        }
    };
    check(&vault, "same process");
    let vault = rig.vault();
    check(&vault, "after a restart");
    // A complete rotation now goes through.
    for b in businesses {
        let keys = vault.keys();
        let v = run(keys.add_kek_version(b, rig.clock.now())).unwrap();
        run(keys.promote_kek_version(b, v)).unwrap();
        run(keys.rewrap(b)).unwrap_or_else(|e| panic!("seed {seed}: rewrap {b}: {e:?}"));
        run(keys.raise_decrypt_floor(b, v))
            .unwrap_or_else(|e| panic!("seed {seed}: floor {b}: {e:?}"));
        let ring = run(keys.ring(b)).unwrap();
        for old in ring.versions().iter().map(|x| x.version).filter(|&x| x < v) {
            run(keys.retire_kek_version(b, old))
                .unwrap_or_else(|e| panic!("seed {seed}: retire {old} of {b}: {e:?}"));
        }
    }
    check(&vault, "after a full rotation");
    let vault = rig.vault();
    check(&vault, "after a full rotation and a restart");
}

static RETIRED: AtomicU64 = AtomicU64::new(0);
static FLOORS: AtomicU64 = AtomicU64::new(0);

type Op<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// as above, with several operations of one
/// process interleaved at every store and provider call (in random
/// orders, some dropped midway), the faults on.
#[test]
fn interleaved_rotation_shreds_and_seals_lose_no_key() {
    for seed in 1..=80u64 {
        interleaved(Rig::new(seed), seed);
    }
    eprintln!(
        "floors raised {}, versions retired {}",
        FLOORS.load(Ordering::SeqCst),
        RETIRED.load(Ordering::SeqCst)
    );
}

/// The same over a SQLite store.
#[cfg(feature = "sqlite")]
#[test]
fn interleaved_rotation_shreds_and_seals_lose_no_key_sqlite() {
    for seed in 1..=12u64 {
        interleaved(Rig::sqlite(seed), seed);
    }
}

/// A record sealed: its business, its sealed bytes and its plaintext.
type Sealed = (BusinessId, Vec<u8>, Vec<u8>);

fn interleaved(rig: Rig, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
    let businesses = [business(1), business(2)];
    let records: Mutex<Vec<Sealed>> = Mutex::new(Vec::new());
    let shredded: Mutex<Vec<(BusinessId, Epoch)>> = Mutex::new(Vec::new());
    let hashes: Mutex<Vec<((u64, u32), PhoneHash)>> = Mutex::new(Vec::new());
    let faults = seed.is_multiple_of(2);
    for round in 0..25 {
        let vault = rig.vault();
        rig.faults(faults);
        let mut ops: Vec<Op<'_>> = Vec::new();
        for _ in 0..(2 + rng.below(5)) {
            let b = businesses[rng.below(2) as usize];
            let keys = vault.keys();
            let now = rig.clock.now();
            let op: Op<'_> = match rng.below(9) {
                0 | 1 => {
                    let expiry = now.saturating_add(HOUR * (1 + rng.below(6) as u32));
                    let plaintext = format!("{seed}/{round}/{}", rng.next()).into_bytes();
                    let (vault, records) = (&vault, &records);
                    Box::pin(async move {
                        if let Ok(sealed) = vault.seal(&label(b, expiry), &plaintext).await {
                            records.lock().unwrap().push((b, sealed, plaintext));
                        }
                    })
                }
                2 => Box::pin(async move {
                    let _ = keys.add_kek_version(b, now).await;
                }),
                3 => {
                    let v = 1 + rng.below(5) as u32;
                    Box::pin(async move {
                        let _ = keys.promote_kek_version(b, v).await;
                    })
                }
                4 => Box::pin(async move {
                    let _ = keys.rewrap(b).await;
                }),
                5 => {
                    let v = 1 + rng.below(5) as u32;
                    Box::pin(async move {
                        if keys.raise_decrypt_floor(b, v).await.is_ok() {
                            FLOORS.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                }
                6 => {
                    let v = 1 + rng.below(5) as u32;
                    Box::pin(async move {
                        if keys.retire_kek_version(b, v).await.is_ok() {
                            RETIRED.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                }
                7 => {
                    let n = rng.below(3) as u32;
                    let hashes = &hashes;
                    Box::pin(async move {
                        let number: PhoneNumber = format!("+4477009001{n:02}").parse().unwrap();
                        if let Ok(h) = keys.phone_hash(b, &number).await {
                            hashes.lock().unwrap().push(((b.get(), n), h));
                        }
                    })
                }
                _ => {
                    let epoch = Epoch::containing(
                        now.saturating_add(HOUR * (1 + rng.below(6) as u32)),
                        EpochLength::DEFAULT,
                    )
                    .unwrap();
                    shredded.lock().unwrap().push((b, epoch));
                    Box::pin(async move {
                        let _ = keys.destroy_epoch_unchecked(b, epoch, now).await;
                    })
                }
            };
            ops.push(op);
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut budget = 400;
        while !ops.is_empty() && budget > 0 {
            budget -= 1;
            let i = rng.below(ops.len() as u64) as usize;
            if rng.below(60) == 0 {
                // A caller gives up.
                drop(ops.swap_remove(i));
                continue;
            }
            if ops[i].as_mut().poll(&mut cx).is_ready() {
                drop(ops.swap_remove(i));
            }
        }
        drop(ops);
    }
    rig.faults(false);
    let records = records.into_inner().unwrap();
    let shredded = shredded.into_inner().unwrap();
    let hashes = hashes.into_inner().unwrap();
    let mut first: BTreeMap<(u64, u32), PhoneHash> = BTreeMap::new();
    for (k, h) in &hashes {
        let f = *first.entry(*k).or_insert(*h);
        assert_eq!(f, *h, "seed {seed}: phone hash changed");
    }
    let check = |vault: &Vault, when: &str| {
        for (b, sealed, plaintext) in &records {
            let epoch = Envelope::parse(sealed).unwrap().header().epoch();
            if shredded.contains(&(*b, epoch)) {
                continue;
            }
            match run(vault.open(sealed, *b)) {
                Ok(o) => assert_eq!(&*o.plaintext, plaintext),
                Err(e) => panic!("seed {seed} {when}: a record of {b} does not open: {e:?}"),
            }
        }
        for (&(b, n), h) in &first {
            let number: PhoneNumber = format!("+4477009001{n:02}").parse().unwrap();
            let got = run(vault.keys().known_phone_hash(business(b), &number)).unwrap();
            assert_eq!(got, Some(*h), "seed {seed} {when}: phone hash lost");
        }
    };
    let vault = rig.vault();
    check(&vault, "after a restart");
    for b in businesses {
        let keys = vault.keys();
        let v = run(keys.add_kek_version(b, rig.clock.now())).unwrap();
        run(keys.promote_kek_version(b, v)).unwrap();
        run(keys.rewrap(b)).unwrap_or_else(|e| panic!("seed {seed}: rewrap {b}: {e:?}"));
        run(keys.raise_decrypt_floor(b, v))
            .unwrap_or_else(|e| panic!("seed {seed}: floor {b}: {e:?}"));
        let ring = run(keys.ring(b)).unwrap();
        for old in ring.versions().iter().map(|x| x.version).filter(|&x| x < v) {
            run(keys.retire_kek_version(b, old))
                .unwrap_or_else(|e| panic!("seed {seed}: retire {old} of {b}: {e:?}"));
        }
    }
    check(&vault, "after a full rotation");
    check(&rig.vault(), "after a full rotation and a restart");
}

struct Told;

#[async_trait]
impl custodian::retention::ExpiryNotifier for Told {
    async fn expired_undelivered(
        &self,
        _message: &custodian::store::MessageRecord,
    ) -> custodian::retention::Notice {
        custodian::retention::Notice::Told
    }
}

/// retention over the key hierarchy, with the
/// key store failing at random (failures before a write, answers lost):
/// messages stored, holds placed and released, early shreds, sweeps,
/// the clock moving on, restarts. At every step: a held message's epoch
/// key is live (unless shredded before the hold); every unheld,
/// unexpired, unshredded message opens; after a complete sweep no ended
/// epoch's key is left but those a hold needs.
#[test]
fn retention_over_faulty_keys_keeps_what_holds_need_and_nothing_else() {
    for seed in 1..=40u64 {
        retention_fuzz(Rig::new(seed), seed);
    }
}

/// The same over a SQLite store.
#[cfg(feature = "sqlite")]
#[test]
fn retention_over_faulty_keys_keeps_what_holds_need_and_nothing_else_sqlite() {
    for seed in 1..=8u64 {
        retention_fuzz(Rig::sqlite(seed), seed);
    }
}

fn retention_fuzz(rig: Rig, seed: u64) {
    use custodian::retention::{Periods, Retention, RetentionPolicy};
    use custodian::store::{Batch, Delivery, Direction, MessageRecord, Op, PeerId, Status};
    use custodian::visibility::MemoryAuditSink;
    const DAY: Duration = Duration::from_secs(86_400);

    let storage = rig.storage.clone();
    let policy = RetentionPolicy::default()
        .with_default(Periods::both(2 * DAY))
        .unwrap();
    let audit = Arc::new(MemoryAuditSink::new());
    let make = || {
        let keys = Arc::new(KeyManager::new(rig.provider.clone(), rig.store.clone()));
        let vault = Vault::new(
            keys.clone(),
            Arc::new(rig.clock.clone()),
            EpochLength::DEFAULT,
        );
        let retention = Retention::new(storage.clone(), keys, policy.clone(), audit.clone());
        (vault, retention)
    };
    let (mut vault, mut retention) = make();
    let mut rng = Rng(seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
    let businesses = [business(1), business(2)];
    let mut messages: Vec<(MessageRecord, Vec<u8>)> = Vec::new();
    let mut holds: Vec<(HoldScope, String)> = Vec::new();
    let mut shredded: Vec<(BusinessId, Epoch)> = Vec::new();
    let mut phones: BTreeMap<(u64, u32), PhoneHash> = BTreeMap::new();
    for step in 0..80 {
        rig.faults(true);
        let b = businesses[rng.below(2) as usize];
        let n = rng.below(3) as u32;
        let now = rig.clock.now();
        match rng.below(10) {
            0..=3 => {
                let number: PhoneNumber = format!("+4477009002{n:02}").parse().unwrap();
                let Ok(phone) = run(vault.keys().phone_hash(b, &number)) else {
                    continue;
                };
                phones.insert((b.get(), n), phone);
                let expiry = now.saturating_add(HOUR * (1 + rng.below(40) as u32));
                let l = label(b, expiry);
                let plaintext = format!("{seed}/{step}").into_bytes();
                let Ok(sealed) = run(vault.seal(&l, &plaintext)) else {
                    continue;
                };
                let record = MessageRecord {
                    business: b,
                    id: l.id,
                    direction: Direction::Inbound,
                    phone,
                    created: now,
                    expiry,
                    epoch: vault.epoch_of(expiry).unwrap(),
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
                    sealed,
                };
                let peer = PeerId { phone, device: 0 };
                let before = run(storage.peer(b, peer))
                    .unwrap()
                    .map(|s| Envelope::parse(&s).unwrap().header().label().expiry);
                let mut pl = label(b, before.map_or(expiry, |e| e.max(expiry)));
                pl.kind = Kind::SignalSession;
                let Ok(peer_sealed) = run(vault.seal(&pl, b"session")) else {
                    continue;
                };
                let mut batch = Batch::new();
                batch.push(Op::PutMessage(Box::new(record.clone())));
                batch.push(Op::PutPeer {
                    business: b,
                    peer,
                    sealed: peer_sealed,
                });
                run(storage.commit(batch)).unwrap();
                messages.push((record, plaintext));
            }
            4 => {
                let scope = match phones.get(&(b.get(), n)) {
                    Some(p) if rng.below(2) == 0 => HoldScope::Consumer(b, *p),
                    _ => HoldScope::Business(b),
                };
                let case = format!("case {}", rng.below(2));
                if run(retention.place_hold("op", scope, &case, now)).is_ok()
                    && !holds.contains(&(scope, case.clone()))
                {
                    holds.push((scope, case));
                }
            }
            5 => {
                if !holds.is_empty() {
                    let i = rng.below(holds.len() as u64) as usize;
                    let (scope, case) = holds[i].clone();
                    if run(retention.release_hold("op", scope, &case, now)).is_ok() {
                        holds.remove(i);
                    }
                }
            }
            6 => {
                if !messages.is_empty() {
                    let i = rng.below(messages.len() as u64) as usize;
                    let (m, _) = &messages[i];
                    let (mb, me) = (m.business, m.epoch);
                    match run(retention.shred_epoch("op", mb, me, "ref", now)) {
                        Err(custodian::retention::HoldError::Held) => {}
                        _ => shredded.push((mb, me)),
                    }
                }
            }
            7 => {
                rig.clock
                    .advance(Duration::from_secs(60 * rng.below(12 * 60)));
            }
            8 => {
                let now = rig.clock.now();
                let swept = run(retention.sweep(now, &Told));
                rig.faults(false);
                if let Ok(report) = swept
                    && report.complete
                {
                    // Nothing ended is left but what a hold needs.
                    let left = run(storage.ended_epoch_keys(now, 100_000)).unwrap();
                    for id in left {
                        let epoch = Epoch::ending_at(Timestamp::from_millis(id.id));
                        let needed = holds.iter().any(|(scope, _)| {
                            scope.business() == id.business
                                && messages.iter().any(|(m, _)| {
                                    m.business == id.business
                                        && m.epoch == epoch
                                        && scope.covers(m.business, m.phone)
                                })
                        }) || holds.iter().any(|(scope, _)| {
                            scope.business() == id.business
                                && run(storage.peer_epochs(id.business, scope.phone()))
                                    .unwrap()
                                    .contains(&epoch)
                        });
                        assert!(
                            needed,
                            "seed {seed} step {step}: ended key {id:?} left after a complete sweep at {now:?}"
                        );
                    }
                }
            }
            _ => {
                (vault, retention) = make();
            }
        }
        rig.faults(false);
        let now = rig.clock.now();
        for (m, plaintext) in &messages {
            let Some(stored) = run(storage.message(m.business, m.id)).unwrap() else {
                continue;
            };
            let held = holds.iter().any(|(s, _)| s.covers(m.business, m.phone));
            let shred = shredded.contains(&(m.business, m.epoch));
            if held && !shred {
                let key = run(storage.key(&KeyId::epoch(m.business, m.epoch))).unwrap();
                assert!(
                    matches!(key, Some(KeyEntry::Wrapped(_))),
                    "seed {seed} step {step}: a held message's epoch key is gone: {key:?}"
                );
            }
            if !held && !shred && m.expiry > now {
                match run(vault.open(&stored.sealed, m.business)) {
                    Ok(o) => assert_eq!(&*o.plaintext, plaintext),
                    Err(e) => {
                        panic!("seed {seed} step {step}: a live message does not open: {e:?}")
                    }
                }
            }
            if m.expiry <= now {
                assert!(run(vault.open(&stored.sealed, m.business)).is_err());
            }
        }
    }
}

/// loads of epoch keys interleaved (at every
/// store and provider call, faults on) with the destruction of ended
/// epochs never leave an ended epoch's key loadable from memory once the
/// destruction returned `Ok`.
#[test]
fn no_ended_epoch_key_is_loadable_after_its_destruction_whatever_the_interleaving() {
    for seed in 1..=300u64 {
        ended_destruction(seed);
    }
}

fn ended_destruction(seed: u64) {
    let rig = Rig::new(seed);
    let mut rng = Rng(seed.wrapping_mul(0x94D0_49BB_1331_11EB) | 1);
    let vault = rig.vault();
    let businesses = [business(1), business(2)];
    let mut epochs = Vec::new();
    for h in 1..=6u32 {
        let expiry = rig.clock.now().saturating_add(HOUR * h);
        epochs.push(vault.epoch_of(expiry).unwrap());
        for b in businesses {
            run(vault.seal(&label(b, expiry), b"x")).unwrap();
        }
    }
    rig.clock.advance(HOUR * 3 + Duration::from_secs(1800));
    let now = rig.clock.now();
    let keys = vault.keys();
    rig.faults(seed.is_multiple_of(2));
    let destroyed = Mutex::new(None);
    let mut ops: Vec<Op<'_>> = Vec::new();
    for _ in 0..(2 + rng.below(6)) {
        let b = businesses[rng.below(2) as usize];
        let e = epochs[rng.below(epochs.len() as u64) as usize];
        ops.push(Box::pin(async move {
            let _ = keys.epoch_key(b, e).await;
        }));
    }
    let d = &destroyed;
    ops.push(Box::pin(async move {
        *d.lock().unwrap() = Some(keys.destroy_ended_epochs_unchecked(now).await.is_ok());
    }));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    while !ops.is_empty() {
        let i = rng.below(ops.len() as u64) as usize;
        if ops[i].as_mut().poll(&mut cx).is_ready() {
            drop(ops.swap_remove(i));
        }
    }
    drop(ops);
    rig.faults(false);
    if *destroyed.lock().unwrap() != Some(true) {
        return;
    }
    for b in businesses {
        for &e in epochs.iter().filter(|e| e.end() <= now) {
            let got = run(keys.epoch_key(b, e));
            assert!(
                got.is_err(),
                "seed {seed}: {b}'s key of ended {e:?} loads after its destruction"
            );
        }
    }
}

mod first_ring_races {
    //! Two first uses of a business with no ring racing each other (an addition, a promotion, a plain first use)
    //! end with one ring holding every version reported, each KEK cached
    //! being the stored one (a key sealed now opens after a restart).

    use std::sync::Arc;

    use async_trait::async_trait;
    use custodian::ids::{BusinessId, PhoneNumber};
    use custodian::keys::{
        KekContext, KeyManager, KeyProvider, LocalKeyProvider, ProviderError, SecretKey,
    };
    use custodian::store::{KeyStore, MemoryStore};
    use custodian::time::Timestamp;

    /// A local provider whose every call yields a few times first, so
    /// first uses interleave.
    struct Yielding(LocalKeyProvider, u64);

    impl Yielding {
        async fn pause(&self, salt: u64) {
            for _ in 0..(self.1.wrapping_mul(salt) % 5) {
                tokio::task::yield_now().await;
            }
        }
    }

    #[async_trait]
    impl KeyProvider for Yielding {
        async fn wrap(
            &self,
            context: &KekContext,
            key: &SecretKey,
        ) -> Result<Vec<u8>, ProviderError> {
            self.pause(u64::from(context.version) + 1).await;
            self.0.wrap(context, key).await
        }

        async fn unwrap(
            &self,
            context: &KekContext,
            wrapped: &[u8],
        ) -> Result<SecretKey, ProviderError> {
            self.pause(u64::from(context.version) + 7).await;
            self.0.unwrap(context, wrapped).await
        }
    }

    fn manager(store: &Arc<MemoryStore>, seed: u64) -> Arc<KeyManager> {
        let provider = Yielding(
            LocalKeyProvider::new(&SecretKey::from_bytes(&mut [0x5c; 32])),
            seed,
        );
        Arc::new(KeyManager::new(Arc::new(provider), store.clone()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_first_uses_end_with_one_ring_and_usable_keks() {
        let number: PhoneNumber = "+447700900123".parse().unwrap();
        for seed in 0..40u64 {
            let store = Arc::new(MemoryStore::new());
            let keys = manager(&store, seed);
            let b = BusinessId::new(100 + seed).unwrap();
            let (a1, a2, p, h) = {
                let (k1, k2, k3, k4) = (keys.clone(), keys.clone(), keys.clone(), keys.clone());
                let n = number.clone();
                let t = Timestamp::from_millis(1_767_225_600_000);
                let a1 = tokio::spawn(async move { k1.add_kek_version(b, t).await });
                let a2 = tokio::spawn(async move { k2.add_kek_version(b, t).await });
                let p = tokio::spawn(async move { k3.promote_kek_version(b, 1).await });
                let h = tokio::spawn(async move { k4.phone_hash(b, &n).await });
                (
                    a1.await.unwrap(),
                    a2.await.unwrap(),
                    p.await.unwrap(),
                    h.await.unwrap(),
                )
            };
            let (a1, a2) = (a1.unwrap(), a2.unwrap());
            p.unwrap();
            let hash = h.unwrap();
            assert_ne!(a1, a2, "seed {seed}: one version reported twice");
            let ring = store.ring(b).await.unwrap().unwrap();
            let versions: Vec<u32> = ring.versions().iter().map(|v| v.version).collect();
            assert_eq!(versions, [1, 2, 3], "seed {seed}");
            // Each added version wraps: promote it, seal under it, restart.
            keys.promote_kek_version(b, a1.max(a2)).await.unwrap();
            let other: PhoneNumber = "+447700900124".parse().unwrap();
            let later = keys.phone_hash(b, &other).await.unwrap();
            let restarted = manager(&store, seed + 1);
            assert_eq!(restarted.phone_hash(b, &number).await.unwrap(), hash);
            assert_eq!(restarted.phone_hash(b, &other).await.unwrap(), later);
        }
    }
}
