//! Signal operations through [`Sessions`] beside bare `wacore-libsignal`
//! with in-memory stores, in the same run. The bare side is two of the test
//! kit's consumer devices, which are exactly that.
//!
//! Ours seals and commits the session (to a [`MemoryStore`]) after every
//! decrypt, and after an encrypt whenever the sending counter passes the
//! persisted lease (every 64 messages) or the retention epoch moves; between
//! those, sends are write-behind (see [`Sessions::encrypt`]: a crash loses no
//! counter). That is the state a restart resumes from.
//!
//! - `establish`: a session from a bundle, plus the first (prekey) message
//!   decrypted by the other side;
//! - `encrypt_200B` / `decrypt_200B`: steady state in one direction;
//! - `turn_200B`: alternating turns, every message turns the ratchet; one
//!   turn is the business's side of a reply and a message back (its encrypt
//!   and its decrypt, both timed; the consumer's side is not).
//!
//! Run: `cargo bench --bench signal --features testing`.
#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use custodian::ids::{BusinessId, PhoneNumber};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::signal::{Sessions, SignalConfig};
use custodian::store::{MemoryStore, PeerId};
use custodian::testing::ConsumerDevice;
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::Vault;

const MESSAGE: [u8; 200] = [0x5a; 200];

struct Ours {
    runtime: tokio::runtime::Runtime,
    keys: Arc<KeyManager>,
    sessions: Sessions,
    business: BusinessId,
    expiry: Timestamp,
    next_number: u64,
}

impl Ours {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let keys = Arc::new(KeyManager::new(
            Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            store.clone(),
        ));
        let vault = Arc::new(Vault::new(
            keys.clone(),
            Arc::new(clock.clone()),
            EpochLength::DEFAULT,
        ));
        let config = SignalConfig {
            prekey_pool: 2_000,
            prekey_limit: 2_000,
            prekey_low_water: 1,
            ..SignalConfig::default()
        };
        let expiry = clock
            .now()
            .saturating_add(Duration::from_secs(30 * 24 * 3600));
        Self {
            runtime,
            keys,
            sessions: Sessions::new(vault, store, config).unwrap(),
            business: BusinessId::new(1).unwrap(),
            expiry,
            next_number: 0,
        }
    }

    fn new_peer(&mut self) -> PeerId {
        self.next_number += 1;
        let number: PhoneNumber = format!("+1415{:07}", self.next_number).parse().unwrap();
        let phone = self
            .runtime
            .block_on(self.keys.phone_hash(self.business, &number))
            .unwrap();
        PeerId { phone, device: 0 }
    }

    /// A consumer device in session with the business (after one exchange).
    fn connected(&mut self) -> (ConsumerDevice, PeerId) {
        let peer = self.new_peer();
        let mut device = ConsumerDevice::new(0);
        let rt = &self.runtime;
        let published = rt.block_on(self.sessions.publish(self.business)).unwrap();
        rt.block_on(device.start_session(self.business, &published.bundle(Some(0))))
            .unwrap();
        let first = rt.block_on(device.encrypt(self.business, b"hi")).unwrap();
        rt.block_on(
            self.sessions
                .decrypt(self.business, peer, &first, self.expiry),
        )
        .unwrap();
        let reply = rt
            .block_on(
                self.sessions
                    .encrypt(self.business, peer, b"hello", self.expiry),
            )
            .unwrap();
        rt.block_on(device.decrypt(self.business, &reply)).unwrap();
        (device, peer)
    }
}

/// Two bare devices in session: `a` plays the business, `b` the consumer.
/// Each names the other by a business id (an address label, nothing more).
struct Bare {
    runtime: tokio::runtime::Runtime,
    a: ConsumerDevice,
    b: ConsumerDevice,
}

const A: BusinessId = match BusinessId::new(1) {
    Some(id) => id,
    None => unreachable!(),
};
const B: BusinessId = match BusinessId::new(2) {
    Some(id) => id,
    None => unreachable!(),
};

impl Bare {
    fn connected() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut a = ConsumerDevice::new(0);
        let mut b = ConsumerDevice::new(0);
        runtime.block_on(async {
            b.start_session(A, &a.bundle(true)).await.unwrap();
            let first = b.encrypt(A, b"hi").await.unwrap();
            a.decrypt(B, &first).await.unwrap();
            let reply = a.encrypt(B, b"hello").await.unwrap();
            b.decrypt(A, &reply).await.unwrap();
        });
        Self { runtime, a, b }
    }
}

fn signal(c: &mut Criterion) {
    let mut g = c.benchmark_group("signal");

    // Session establishment: bundle → session → first message decrypted.
    let mut ours = Ours::new();
    g.bench_function(BenchmarkId::new("establish", "ours"), |bn| {
        bn.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let peer = ours.new_peer();
                let mut device = ConsumerDevice::new(0);
                let rt = &ours.runtime;
                let bundle = rt
                    .block_on(ours.sessions.publish(ours.business))
                    .unwrap()
                    .bundle(Some(0));
                let start = Instant::now();
                rt.block_on(device.start_session(ours.business, &bundle))
                    .unwrap();
                let first = rt
                    .block_on(device.encrypt(ours.business, &MESSAGE))
                    .unwrap();
                rt.block_on(
                    ours.sessions
                        .decrypt(ours.business, peer, &first, ours.expiry),
                )
                .unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("establish", "bare"), |bn| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        bn.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut a = ConsumerDevice::new(0);
                let mut b = ConsumerDevice::new(0);
                let bundle = a.bundle(true);
                let start = Instant::now();
                runtime.block_on(async {
                    b.start_session(A, &bundle).await.unwrap();
                    let first = b.encrypt(A, &MESSAGE).await.unwrap();
                    a.decrypt(B, &first).await.unwrap();
                });
                total += start.elapsed();
            }
            total
        })
    });

    // One direction, steady state: the business sends.
    let (_device, peer) = ours.connected();
    g.bench_function(BenchmarkId::new("encrypt_200B", "ours"), |bn| {
        bn.iter(|| {
            ours.runtime
                .block_on(ours.sessions.encrypt(
                    ours.business,
                    peer,
                    black_box(&MESSAGE),
                    ours.expiry,
                ))
                .unwrap()
        })
    });
    let mut bare = Bare::connected();
    g.bench_function(BenchmarkId::new("encrypt_200B", "bare"), |bn| {
        bn.iter(|| {
            bare.runtime
                .block_on(bare.a.encrypt(B, black_box(&MESSAGE)))
                .unwrap()
        })
    });

    // One direction, steady state: the business receives.
    let (mut device, peer) = ours.connected();
    g.bench_function(BenchmarkId::new("decrypt_200B", "ours"), |bn| {
        bn.iter_custom(|iters| {
            let rt = &ours.runtime;
            let batch: Vec<_> = (0..iters)
                .map(|_| {
                    rt.block_on(device.encrypt(ours.business, &MESSAGE))
                        .unwrap()
                })
                .collect();
            let start = Instant::now();
            for m in &batch {
                rt.block_on(ours.sessions.decrypt(ours.business, peer, m, ours.expiry))
                    .unwrap();
            }
            start.elapsed()
        })
    });
    let mut bare = Bare::connected();
    g.bench_function(BenchmarkId::new("decrypt_200B", "bare"), |bn| {
        bn.iter_custom(|iters| {
            let batch: Vec<_> = (0..iters)
                .map(|_| bare.runtime.block_on(bare.b.encrypt(A, &MESSAGE)).unwrap())
                .collect();
            let start = Instant::now();
            for m in &batch {
                bare.runtime.block_on(bare.a.decrypt(B, m)).unwrap();
            }
            start.elapsed()
        })
    });

    // Alternating turns: every message turns the ratchet. Timed: the
    // business's encrypt of a reply and decrypt of the consumer's answer.
    let (mut device, peer) = ours.connected();
    g.bench_function(BenchmarkId::new("turn_200B", "ours"), |bn| {
        bn.iter_custom(|iters| {
            let rt = &ours.runtime;
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let out = rt
                    .block_on(
                        ours.sessions
                            .encrypt(ours.business, peer, &MESSAGE, ours.expiry),
                    )
                    .unwrap();
                total += start.elapsed();
                rt.block_on(device.decrypt(ours.business, &out)).unwrap();
                let back = rt
                    .block_on(device.encrypt(ours.business, &MESSAGE))
                    .unwrap();
                let start = Instant::now();
                rt.block_on(
                    ours.sessions
                        .decrypt(ours.business, peer, &back, ours.expiry),
                )
                .unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    let mut bare = Bare::connected();
    g.bench_function(BenchmarkId::new("turn_200B", "bare"), |bn| {
        bn.iter_custom(|iters| {
            let rt = &bare.runtime;
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let out = rt.block_on(bare.a.encrypt(B, &MESSAGE)).unwrap();
                total += start.elapsed();
                rt.block_on(bare.b.decrypt(A, &out)).unwrap();
                let back = rt.block_on(bare.b.encrypt(A, &MESSAGE)).unwrap();
                let start = Instant::now();
                rt.block_on(bare.a.decrypt(B, &back)).unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = signal
}
criterion_main!(benches);
