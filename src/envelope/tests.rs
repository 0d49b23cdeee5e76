//! Format tests: known-answer vectors, the named corpus, and properties.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::fuzzing::{envelope_parse, fixture_epoch_key, fixture_epoch_secret, seal_with_nonce};
use crate::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use crate::store::MemoryStore;
use crate::time::ManualClock;
use crate::vault::{OpenError, Vault};

const HOUR: u64 = 3_600_000;
/// 2026-01-01T00:00:00Z: "now" for every fixture.
const T0: u64 = 1_767_225_600_000;
const B: u64 = 4242;
const OTHER_B: u64 = 4343;
/// An epoch whose key the fixture destroys.
const DESTROYED_EPOCH: u64 = T0 + 48 * HOUR;
/// An epoch for which the fixture has no key.
const UNKNOWN_EPOCH: u64 = T0 + 100 * HOUR;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn business(id: u64) -> BusinessId {
    BusinessId::new(id).unwrap()
}

fn label(kind: Kind, b: u64, id: u8, expiry: u64, region: &str) -> Label {
    Label {
        kind,
        business: business(b),
        id: MessageId::from_bytes([id; 16]),
        expiry: Timestamp::from_millis(expiry),
        region: region.parse().unwrap(),
    }
}

/// Seal under the fixture key of the label's business and the given epoch.
fn fixture_seal(label: &Label, epoch: u64, nonce: u8, plaintext: &[u8]) -> Vec<u8> {
    let epoch = Epoch::ending_at(Timestamp::from_millis(epoch));
    let key = fixture_epoch_key(label.business, epoch);
    seal_with_nonce(&key, label, &[nonce; 12], plaintext).unwrap()
}

/// Offset and length of every field, for region length `r` and ciphertext length `n`.
fn layout(r: usize, n: usize) -> [(Field, usize, usize); 14] {
    [
        (Field::Magic, 0, 4),
        (Field::Version, 4, 1),
        (Field::Suite, 5, 1),
        (Field::Kind, 6, 1),
        (Field::Business, 7, 8),
        (Field::Id, 15, 16),
        (Field::Epoch, 31, 8),
        (Field::Expiry, 39, 8),
        (Field::RegionLength, 47, 1),
        (Field::Region, 48, r),
        (Field::Nonce, 48 + r, 12),
        (Field::Commitment, 60 + r, 32),
        (Field::CiphertextLength, 92 + r, 4),
        (Field::Ciphertext, 96 + r, n),
    ]
}

/// The named corpus: (file name, bytes, expected result of opening it for
/// business `B` at `T0`).
fn corpus() -> Vec<(String, Vec<u8>, String)> {
    let expiry = T0 + 24 * HOUR + 30 * 60_000;
    let epoch = T0 + 25 * HOUR;
    let base_label = label(Kind::InboundMessage, B, 1, expiry, "eu");
    let base = fixture_seal(
        &base_label,
        epoch,
        0x10,
        b"hello from a consumer, sealed at rest",
    );
    let other = fixture_seal(
        &label(Kind::InboundMessage, B, 2, expiry, "eu"),
        epoch,
        0x20,
        b"another message of equal length!!!!!!",
    );
    assert_eq!(base.len(), other.len());
    let r = 2;
    let header_len = 96 + r;

    let mut c: Vec<(String, Vec<u8>, String)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, expected: &str| {
        c.push((name.to_owned(), bytes, expected.to_owned()))
    };
    let patched = |at: usize, bytes: &[u8]| {
        let mut v = base.clone();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    };

    add("valid-inbound-eu", base.clone(), "ok");
    add(
        "valid-outbound-long-region",
        fixture_seal(
            &label(Kind::OutboundMessage, B, 3, expiry, "me-central-1abc"),
            epoch,
            0x30,
            b"order #1234 shipped",
        ),
        "ok",
    );
    add(
        "valid-session-empty",
        fixture_seal(
            &label(Kind::SignalSession, B, 4, expiry, "in-south"),
            epoch,
            0x40,
            b"",
        ),
        "ok",
    );

    add("truncated-empty", vec![], "Malformed(Truncated(Magic))");
    // Cut each field in half (a one-byte field: just before it).
    for (field, at, len) in layout(r, base.len() - header_len) {
        let cut = at + len / 2;
        let name = format!("truncated-{}", format!("{field:?}").to_lowercase());
        add(
            &name,
            base[..cut].to_vec(),
            &format!("Malformed(Truncated({field:?}))"),
        );
    }
    let mut trailing = base.clone();
    trailing.push(0);
    add("trailing-byte", trailing, "Malformed(TrailingBytes(1))");
    add("bad-magic", patched(0, b"CSTE"), "Malformed(BadMagic)");
    add(
        "unknown-version-2",
        patched(4, &[2]),
        "Malformed(UnsupportedVersion(2))",
    );
    add(
        "unknown-version-0",
        patched(4, &[0]),
        "Malformed(UnsupportedVersion(0))",
    );
    add(
        "unknown-suite",
        patched(5, &[2]),
        "Malformed(UnknownSuite(2))",
    );
    add(
        "unknown-kind-0",
        patched(6, &[0]),
        "Malformed(UnknownKind(0))",
    );
    add(
        "unknown-kind-ff",
        patched(6, &[0xff]),
        "Malformed(UnknownKind(255))",
    );
    add(
        "zero-business",
        patched(7, &[0; 8]),
        "Malformed(ZeroBusiness)",
    );
    add(
        "region-length-1",
        patched(47, &[1]),
        "Malformed(RegionLength(1))",
    );
    add(
        "region-length-oversized",
        patched(47, &[16]),
        "Malformed(RegionLength(16))",
    );
    add(
        "region-uppercase",
        patched(48, b"EU"),
        "Malformed(BadRegion)",
    );
    add(
        "region-leading-hyphen",
        patched(48, b"-u"),
        "Malformed(BadRegion)",
    );
    add(
        "region-trailing-hyphen",
        patched(48, b"e-"),
        "Malformed(BadRegion)",
    );
    add(
        "region-non-ascii",
        patched(48, &[b'e', 0xe9]),
        "Malformed(BadRegion)",
    );
    add(
        "expiry-at-epoch-end",
        patched(39, &epoch.to_be_bytes()),
        "Malformed(ExpiryNotBeforeEpoch)",
    );
    add(
        "expiry-before-epoch-start",
        patched(39, &(epoch - 86_400_001).to_be_bytes()),
        "Malformed(ExpiryBeforeEpoch)",
    );
    // The bounds of the expiry's window, both in it: they parse, and the
    // edited header fails to authenticate.
    add(
        "expiry-at-earliest-epoch-start",
        patched(39, &(epoch - 86_400_000).to_be_bytes()),
        "Decrypt",
    );
    add(
        "expiry-just-before-epoch-end",
        patched(39, &(epoch - 1).to_be_bytes()),
        "Decrypt",
    );
    // An epoch that ends at 0 leaves no expiry before it.
    let mut epoch_zero = patched(31, &0u64.to_be_bytes());
    epoch_zero[39..47].copy_from_slice(&0u64.to_be_bytes());
    add("epoch-zero", epoch_zero, "Malformed(ExpiryNotBeforeEpoch)");
    add(
        "ciphertext-length-below-tag",
        patched(92 + r, &15u32.to_be_bytes()),
        "Malformed(CiphertextLength(15))",
    );
    add(
        "ciphertext-length-oversized",
        patched(92 + r, &u32::MAX.to_be_bytes()),
        "Malformed(CiphertextLength(4294967295))",
    );
    // The longest ciphertext there may be (64 MiB and the tag), on a short
    // input; one byte more.
    let max = u32::try_from(MAX_CIPHERTEXT_LEN).unwrap();
    add(
        "ciphertext-length-max",
        patched(92 + r, &max.to_be_bytes()),
        "Malformed(Truncated(Ciphertext))",
    );
    add(
        "ciphertext-length-max-plus-one",
        patched(92 + r, &(max + 1).to_be_bytes()),
        "Malformed(CiphertextLength(67108881))",
    );
    // The shortest ciphertext there may be (the tag alone), a byte short.
    let tag = u32::try_from(TAG_LEN).unwrap();
    let mut tag_only = patched(92 + r, &tag.to_be_bytes());
    tag_only.truncate(header_len + TAG_LEN - 1);
    add(
        "ciphertext-length-tag-truncated",
        tag_only,
        "Malformed(Truncated(Ciphertext))",
    );
    let n = u32::try_from(base.len() - header_len).unwrap();
    add(
        "ciphertext-length-past-input",
        patched(92 + r, &(n + 1).to_be_bytes()),
        "Malformed(Truncated(Ciphertext))",
    );
    add(
        "ciphertext-length-short-of-input",
        patched(92 + r, &(n - 1).to_be_bytes()),
        "Malformed(TrailingBytes(1))",
    );

    let flip = |at: usize| {
        let mut v = base.clone();
        v[at] ^= 0x01;
        v
    };
    add("flipped-tag", flip(base.len() - 1), "Decrypt");
    add("flipped-ciphertext", flip(header_len), "Decrypt");
    add("flipped-nonce", flip(48 + r), "Decrypt");
    add("flipped-commitment", flip(60 + r), "Decrypt");
    add("flipped-id", flip(15), "Decrypt");
    add(
        "flipped-kind",
        patched(6, &[Kind::OutboundMessage as u8]),
        "Decrypt",
    );
    add("flipped-region", patched(48, b"us"), "Decrypt");
    add(
        "flipped-expiry",
        patched(39, &(expiry - 1).to_be_bytes()),
        "Decrypt",
    );
    let mut swapped = base[..header_len].to_vec();
    swapped.extend_from_slice(&other[header_len..]);
    add("swapped-header", swapped, "Decrypt");
    add(
        "wrong-business",
        fixture_seal(
            &label(Kind::InboundMessage, OTHER_B, 5, expiry, "eu"),
            epoch,
            0x50,
            b"not yours",
        ),
        "WrongBusiness",
    );
    add(
        "expired",
        fixture_seal(
            &label(Kind::InboundMessage, B, 6, T0 - 1, "eu"),
            T0,
            0x60,
            b"too late",
        ),
        "Expired",
    );
    add(
        "destroyed-epoch",
        fixture_seal(
            &label(Kind::InboundMessage, B, 7, DESTROYED_EPOCH - 1, "eu"),
            DESTROYED_EPOCH,
            0x70,
            b"shredded",
        ),
        "EpochDestroyed",
    );
    add(
        "unknown-epoch",
        fixture_seal(
            &label(Kind::InboundMessage, B, 8, UNKNOWN_EPOCH - 1, "eu"),
            UNKNOWN_EPOCH,
            0x80,
            b"no key",
        ),
        "UnknownEpoch",
    );
    c
}

/// What opening gave, spelled as the manifest spells it.
fn describe(result: &Result<crate::vault::Opened, OpenError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(OpenError::Malformed(e)) => format!("Malformed({e:?})"),
        Err(OpenError::Expired { .. }) => "Expired".into(),
        Err(e) => {
            let debug = format!("{e:?}");
            debug
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or_default()
                .to_owned()
        }
    }
}

/// A vault holding the fixture keys: every epoch a corpus file names, for
/// both businesses, except the unknown one; the destroyed one is destroyed.
async fn fixture_vault() -> Vault {
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let keys = KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(&mut [7; 32]))),
        Arc::new(MemoryStore::new()),
    );
    for b in [B, OTHER_B] {
        for e in [T0, T0 + 25 * HOUR, DESTROYED_EPOCH] {
            let epoch = Epoch::ending_at(Timestamp::from_millis(e));
            keys.install_epoch_key(
                business(b),
                epoch,
                &fixture_epoch_secret(business(b), epoch),
            )
            .await
            .unwrap();
        }
    }
    let destroyed = Epoch::ending_at(Timestamp::from_millis(DESTROYED_EPOCH));
    keys.destroy_epoch_unchecked(business(B), destroyed, Timestamp::from_millis(T0))
        .await
        .unwrap();
    Vault::new(Arc::new(keys), Arc::new(clock), EpochLength::DEFAULT)
}

/// The `envelope_open` target's corpus, drawn from `corpus()`: each file
/// named by what `crate::fuzzing::envelope_open` must make of it (opening
/// under the fixture key of the envelope's own business and epoch, so the
/// vault's refusals of an expired record or another business's are opens
/// here).
fn open_corpus() -> Vec<(String, Vec<u8>)> {
    corpus()
        .into_iter()
        .filter_map(|(name, bytes, expected)| {
            let opening = match expected.as_str() {
                "ok" | "Expired" | "WrongBusiness" | "EpochDestroyed" | "UnknownEpoch" => "opened",
                "Decrypt" => "refused",
                _ if [
                    "truncated-empty",
                    "truncated-ciphertext",
                    "bad-magic",
                    "trailing-byte",
                    "ciphertext-length-past-input",
                    "expiry-at-epoch-end",
                ]
                .contains(&name.as_str()) =>
                {
                    "malformed"
                }
                _ => return None,
            };
            Some((format!("{opening}--{name}"), bytes))
        })
        .collect()
}

const CORPUS_DIR: &str = "fuzz/corpus/envelope_parse";
const OPEN_CORPUS_DIR: &str = "fuzz/corpus/envelope_open";
const MANIFEST: &str = "tests/data/envelope_corpus.txt";

/// A plaintext of the largest length is admitted; one byte more is
/// refused.
#[test]
fn the_largest_plaintext_is_admitted_and_one_byte_more_refused() {
    assert!(check_len(MAX_PLAINTEXT_LEN).is_ok());
    assert!(matches!(
        check_len(MAX_PLAINTEXT_LEN + 1),
        Err(SealError::TooLarge(n)) if n == MAX_PLAINTEXT_LEN + 1
    ));
    let l = label(Kind::InboundMessage, B, 1, T0 + HOUR, "eu");
    let key = fixture_epoch_key(
        l.business,
        Epoch::ending_at(Timestamp::from_millis(T0 + 2 * HOUR)),
    );
    let huge = vec![0; MAX_PLAINTEXT_LEN + 1];
    assert!(matches!(
        seal_with_nonce(&key, &l, &[0; 12], &huge),
        Err(SealError::TooLarge(n)) if n == MAX_PLAINTEXT_LEN + 1
    ));
}

/// Rewrite the corpus files and manifest from `corpus()`. Run by hand after
/// a deliberate change: `cargo test write_corpus -- --ignored`.
#[test]
#[ignore = "rewrites tests/data and fuzz/corpus; run by hand"]
fn write_corpus() {
    let dir = repo(CORPUS_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = String::from(
        "# The named envelope corpus: each file in fuzz/corpus/envelope_parse/ and the result of\n\
         # opening it for business 4242 at 2026-01-01T00:00:00Z with the fixture keys (see\n\
         # src/envelope/tests.rs). `ok` opens; anything else is the exact error.\n",
    );
    for (name, bytes, expected) in corpus() {
        std::fs::write(dir.join(&name), &bytes).unwrap();
        manifest.push_str(&format!("{name} {expected}\n"));
    }
    std::fs::write(repo(MANIFEST), manifest).unwrap();
    let dir = repo(OPEN_CORPUS_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in open_corpus() {
        std::fs::write(dir.join(&name), &bytes).unwrap();
    }
}

#[tokio::test]
async fn corpus_replays_with_the_manifests_exact_results() {
    let vault = fixture_vault().await;
    let manifest = std::fs::read_to_string(repo(MANIFEST)).unwrap();
    let entries: Vec<(&str, &str)> = manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once(' ').unwrap())
        .collect();
    let valid = entries.iter().filter(|(_, e)| *e == "ok").count();
    assert!(
        valid >= 3 && entries.len() - valid >= 20,
        "corpus too small"
    );
    for &(name, expected) in &entries {
        let bytes = std::fs::read(repo(CORPUS_DIR).join(name)).unwrap();
        // The fuzz target's check: what parses is canonical.
        let parsed = envelope_parse(&bytes);
        let result = vault.open(&bytes, business(B)).await;
        assert_eq!(describe(&result), expected, "{name}");
        match result {
            Err(OpenError::Malformed(e)) => assert_eq!(parsed, Err(e), "{name}"),
            _ => assert!(
                parsed.is_ok(),
                "{name}: opening parsed it, the check did not"
            ),
        }
    }
    // Files the manifest does not name (inputs a fuzzer saved, a committed
    // crash reproducer) have no expected result, but must not panic and
    // must pass the same check.
    let mut extra = 0;
    for file in std::fs::read_dir(repo(CORPUS_DIR)).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if entries.iter().any(|&(named, _)| named == name) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let parsed = envelope_parse(&bytes);
        if let Err(OpenError::Malformed(e)) = vault.open(&bytes, business(B)).await {
            assert_eq!(parsed, Err(e), "{name}");
        }
        extra += 1;
    }
    assert_eq!(
        entries.len() + extra,
        std::fs::read_dir(repo(CORPUS_DIR)).unwrap().count(),
        "a manifest entry is named twice"
    );
}

#[test]
fn corpus_on_disk_is_what_the_generator_makes() {
    for (name, bytes, _) in corpus() {
        let on_disk = std::fs::read(repo(CORPUS_DIR).join(&name)).unwrap();
        assert_eq!(
            on_disk, bytes,
            "{name}: run `cargo test write_corpus -- --ignored`"
        );
    }
    for (name, bytes) in open_corpus() {
        let on_disk = std::fs::read(repo(OPEN_CORPUS_DIR).join(&name)).unwrap();
        assert_eq!(
            on_disk, bytes,
            "envelope_open/{name}: run `cargo test write_corpus -- --ignored`"
        );
    }
}

/// One known-answer vector from tests/data/envelope_kat.txt.
#[derive(Default)]
struct Kat {
    fields: std::collections::HashMap<String, String>,
}

impl Kat {
    fn hex(&self, k: &str) -> Vec<u8> {
        hex::decode(&self.fields[k]).unwrap()
    }
    fn num(&self, k: &str) -> u64 {
        self.fields[k].parse().unwrap()
    }
}

fn kats() -> Vec<Kat> {
    let text = std::fs::read_to_string(repo("tests/data/envelope_kat.txt")).unwrap();
    let mut out = vec![Kat::default()];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        match line.split_once(" = ") {
            Some((k, v)) => {
                out.last_mut()
                    .unwrap()
                    .fields
                    .insert(k.trim().to_owned(), v.trim().to_owned());
            }
            None if line.trim().is_empty() && !out.last().unwrap().fields.is_empty() => {
                out.push(Kat::default())
            }
            None => {}
        }
    }
    out.retain(|k| !k.fields.is_empty());
    out
}

#[test]
fn known_answer_vectors_freeze_format_v1() {
    let kats = kats();
    assert!(kats.len() >= 4);
    for kat in kats {
        let mut key: [u8; 32] = kat.hex("epoch_key").try_into().unwrap();
        let epoch = Epoch::ending_at(Timestamp::from_millis(kat.num("epoch")));
        let key = EpochKey::new(
            business(kat.num("business")),
            epoch,
            &SecretKey::from_bytes(&mut key),
        );
        let kind = Kind::from_code(u8::try_from(kat.num("kind")).unwrap()).unwrap();
        let label = Label {
            kind,
            business: business(kat.num("business")),
            id: MessageId::from_bytes(kat.hex("id").try_into().unwrap()),
            expiry: Timestamp::from_millis(kat.num("expiry")),
            region: kat.fields["region"].parse().unwrap(),
        };
        let nonce: [u8; 12] = kat.hex("nonce").try_into().unwrap();
        let plaintext = kat.hex("plaintext");
        let expected = kat.hex("envelope");
        let sealed = seal_with_nonce(&key, &label, &nonce, &plaintext).unwrap();
        assert_eq!(hex::encode(&sealed), hex::encode(&expected));
        let env = Envelope::parse(&expected).unwrap();
        assert_eq!(env.header().label(), &label);
        assert_eq!(env.header().epoch(), epoch);
        assert_eq!(env.open(&key).unwrap(), plaintext);
        assert_eq!(
            expected.len() - plaintext.len(),
            112 + label.region.as_bytes().len()
        );
    }
}

/// A record key refuses a label naming another record as `WrongRecord`
/// and, once it has sealed as often as one key may, refuses as
/// `KeySpent`. Before, both were `WrongKey`, documented as "the epoch key
/// belongs to another business".
#[test]
fn a_record_key_names_why_it_refuses() {
    let b = business(7);
    let end = Timestamp::from_millis(1_767_229_200_000);
    let key = fixture_epoch_key(b, Epoch::ending_at(end));
    let label = Label {
        kind: Kind::SignalSession,
        business: b,
        id: MessageId::from_bytes([9; 16]),
        expiry: end.saturating_sub(std::time::Duration::from_secs(1)),
        region: "eu".parse().unwrap(),
    };
    let mut record = RecordKey::new(&key, label.id);
    let other = Label {
        id: MessageId::from_bytes([8; 16]),
        ..label
    };
    let err = record.seal_owned(&other, b"state".to_vec()).unwrap_err();
    assert!(matches!(err, SealError::WrongRecord), "{err:?}");
    record.seal_owned(&label, b"state".to_vec()).unwrap();
    record.seals = RecordKey::MAX_SEALS;
    let err = record.seal_owned(&label, b"state".to_vec()).unwrap_err();
    assert!(matches!(err, SealError::KeySpent), "{err:?}");
}

fn arb_label() -> impl Strategy<Value = (Label, u64)> {
    (
        prop::sample::select(Kind::ALL),
        1u64..=u64::MAX,
        any::<[u8; 16]>(),
        0u64..(u64::MAX - 86_400_000),
        "[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?",
        1u64..=86_400_000,
    )
        .prop_filter_map("region", |(kind, b, id, expiry, region, gap)| {
            let label = Label {
                kind,
                business: BusinessId::new(b)?,
                id: MessageId::from_bytes(id),
                expiry: Timestamp::from_millis(expiry),
                region: region.parse().ok()?,
            };
            Some((label, expiry + gap))
        })
}

proptest! {
    #[test]
    fn parse_to_bytes_is_identity_on_sealed_envelopes(
        (label, epoch) in arb_label(),
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 12]>(),
        plaintext in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let epoch = Epoch::ending_at(Timestamp::from_millis(epoch));
        let key = EpochKey::new(label.business, epoch, &SecretKey::from_bytes(&mut key.clone()));
        let sealed = seal_with_nonce(&key, &label, &nonce, &plaintext).unwrap();
        prop_assert_eq!(envelope_parse(&sealed).map(|h| h.label), Ok(label));
        let env = Envelope::parse(&sealed).unwrap();
        prop_assert_eq!(env.to_bytes(), sealed.clone());
        prop_assert_eq!(env.header().label(), &label);
        prop_assert_eq!(env.open(&key).unwrap(), plaintext);
    }

    #[test]
    fn every_single_bit_flip_fails_and_never_yields_other_plaintext(
        (label, epoch) in arb_label(),
        key in any::<[u8; 32]>(),
        plaintext in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let epoch = Epoch::ending_at(Timestamp::from_millis(epoch));
        let key = EpochKey::new(label.business, epoch, &SecretKey::from_bytes(&mut key.clone()));
        let sealed = seal_with_nonce(&key, &label, &[9; 12], &plaintext).unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            if let Ok(env) = Envelope::parse(&flipped) {
                prop_assert!(env.open(&key).is_err(), "bit {} opened", bit);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_valid_parses_are_canonical(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        // Panics on a header that does not re-encode to its bytes.
        let _ = envelope_parse(&bytes);
    }

    #[test]
    fn mutated_valid_headers_never_panic_and_what_parses_is_canonical(
        (label, epoch) in arb_label(),
        edits in prop::collection::vec((0usize..140, any::<u8>()), 1..4),
        cut in 0usize..200,
    ) {
        let epoch = Epoch::ending_at(Timestamp::from_millis(epoch));
        let key = EpochKey::new(label.business, epoch, &SecretKey::from_bytes(&mut [1; 32]));
        let mut bytes = seal_with_nonce(&key, &label, &[3; 12], b"payload").unwrap();
        for (at, b) in edits {
            if let Some(x) = bytes.get_mut(at) { *x = b; }
        }
        bytes.truncate(cut);
        // Panics on a header that does not re-encode to its bytes.
        let _ = envelope_parse(&bytes);
    }
}
