//! Seal and open, beside bare AES-256-GCM in the same run.
//!
//! - `seal`: [`envelope::seal`] with an epoch key fetched once: HKDF, commitment,
//!   header, AES-256-GCM under the derived key: the cryptographic cost of a seal;
//! - `vault_seal` / `vault_open`: through the [`Vault`], adding the key lookup,
//!   the clock and (open) the parse and expiry checks.
//!
//! Baselines (aes-gcm 0.11, the crate the vault uses), each authenticating
//! the envelope's own header bytes as associated data, as the envelope does,
//! so GHASH covers the same input on both sides:
//! - `bare_fixed_key`: seal/open under one key set up once;
//! - `bare_new_key_seal`: key schedule + seal, the least a per-message key costs.
//!
//! Run: `cargo bench --bench envelope`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use custodian::envelope::{self, Envelope, Kind, Label};
use custodian::ids::{BusinessId, MessageId};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::store::MemoryStore;
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::Vault;

const SIZES: [(usize, &str); 4] = [
    (200, "200B"),
    (1024, "1KiB"),
    (16 * 1024, "16KiB"),
    (1 << 20, "1MiB"),
];

/// Drive a future that never waits (the in-memory store, warm caches).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory operations complete at once"),
    }
}

fn setup() -> (Vault, Label) {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let keys = KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        Arc::new(MemoryStore::new()),
    );
    let vault = Vault::new(
        Arc::new(keys),
        Arc::new(clock.clone()),
        EpochLength::DEFAULT,
    );
    let label = Label {
        kind: Kind::InboundMessage,
        business: BusinessId::new(1).unwrap(),
        id: MessageId::random(),
        expiry: clock
            .now()
            .saturating_add(Duration::from_secs(30 * 24 * 3600)),
        region: "eu".parse().unwrap(),
    };
    (vault, label)
}

fn envelope(c: &mut Criterion) {
    let (vault, label) = setup();
    let epoch = vault.epoch_of(label.expiry).unwrap();
    let now = vault.clock().now();
    let epoch_key = ready(vault.keys().epoch_key_for_seal(label.business, epoch, now)).unwrap();
    let key = [7u8; 32];
    let cipher = Aes256Gcm::new(&key.into());
    let nonce = Nonce::from([3u8; 12]);

    for (size, name) in SIZES {
        let plaintext = vec![0x42u8; size];
        let sealed = ready(vault.seal(&label, &plaintext)).unwrap();
        let aad = Envelope::parse(&sealed).unwrap().header_bytes().to_vec();
        let payload = || Payload {
            msg: &plaintext[..],
            aad: &aad[..],
        };
        let bare_sealed = cipher.encrypt(&nonce, payload()).unwrap();
        if size == 200 {
            eprintln!("envelope overhead at 200 B: {} bytes", sealed.len() - size);
        }

        let mut g = c.benchmark_group(format!("envelope/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        if size >= 1 << 20 {
            g.sample_size(20);
        }
        g.bench_function(BenchmarkId::new("seal", name), |b| {
            b.iter(|| {
                envelope::seal(&epoch_key, black_box(&label), black_box(&plaintext), now).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("vault_seal", name), |b| {
            b.iter(|| ready(vault.seal(black_box(&label), black_box(&plaintext))).unwrap())
        });
        g.bench_function(BenchmarkId::new("vault_open", name), |b| {
            b.iter(|| ready(vault.open(black_box(&sealed), label.business)).unwrap())
        });
        g.bench_function(BenchmarkId::new("bare_fixed_key_seal", name), |b| {
            b.iter(|| {
                cipher
                    .encrypt(black_box(&nonce), black_box(payload()))
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("bare_fixed_key_open", name), |b| {
            b.iter(|| {
                cipher
                    .decrypt(
                        black_box(&nonce),
                        black_box(Payload {
                            msg: &bare_sealed[..],
                            aad: &aad[..],
                        }),
                    )
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("bare_new_key_seal", name), |b| {
            b.iter(|| {
                Aes256Gcm::new(black_box(&key).into())
                    .encrypt(black_box(&nonce), black_box(payload()))
                    .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = envelope
}
criterion_main!(benches);
