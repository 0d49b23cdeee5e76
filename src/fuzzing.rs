//! Hooks for fuzz targets and fixture-driven tests, built only with
//! `--cfg fuzzing` (which `cargo fuzz` sets) or in the crate's own tests.
//!
//! They reach the pure envelope layer with known epoch keys, so a fuzzer can
//! drive parsing and opening without a key store, and they hold the checks
//! of the targets ([`envelope_parse`], [`envelope_open`], [`phone_number`],
//! [`policy_file`], [`signal_message`], [`prekey_bundle`], [`peer_record`],
//! [`payload`], [`kek_ring`], [`key_records`], [`message_row`],
//! [`audit_line`]), so `cargo test` replays those corpora through the very
//! code the fuzzers run. Nothing here exists in a normal build.

#![allow(
    clippy::panic,
    reason = "a fuzz check reports a broken property by panicking"
)]

use std::future::Future;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wacore_libsignal::protocol::{PrivateKey, PublicKey};

use crate::envelope::{self, Envelope, EnvelopeError, Header, Label, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber, Region};
use crate::keys::{
    Epoch, EpochKey, EpochLength, Kek, KekCheck, KekContext, KekRing, KeyError, KeyId, KeyKind,
    KeyManager, LocalKeyProvider, ProviderError, SecretKey, WrappedKey,
};
use crate::processor::{device_payload, parse_device_payload, reencode_inbound, reencode_outbound};
use crate::retention::{CEILING, RetentionPolicy};
use crate::signal::{
    Ciphertext, DeviceIdentity, MessageKind, ONE_TIME_PREKEY, Parsed, PreKeyBundle, PublicPreKey,
    Sessions, SignalConfig, SignalError, SignedPublicPreKey, StorageFailure, decode_identity,
    decode_one_time_prekey, decode_peer_record, decode_signed_prekey, encode_identity,
};
use crate::store::{Direction, MemoryStore, PeerId, Storage};
use crate::time::{ManualClock, Timestamp};
use crate::vault::Vault;
use crate::visibility::{
    AuditSink, DecisionId, FlushPolicy, HardRule, JsonLinesSink, TrailEntry, TrailError,
    VisibilityPolicy, read_trail,
};

/// The fixture key of `business`'s `epoch`: SHA-256 over a label, the
/// business id and the epoch's end. The named corpus is sealed under these.
pub fn fixture_epoch_key(business: BusinessId, epoch: Epoch) -> EpochKey {
    EpochKey::new(business, epoch, &fixture_epoch_secret(business, epoch))
}

/// The bytes of [`fixture_epoch_key`], for installing into a key store.
pub fn fixture_epoch_secret(business: BusinessId, epoch: Epoch) -> SecretKey {
    let mut h = Sha256::new();
    h.update(b"custodian/fixture/epoch-key");
    h.update(business.get().to_be_bytes());
    h.update(epoch.end().as_millis().to_be_bytes());
    let mut bytes: [u8; 32] = h.finalize().into();
    SecretKey::from_bytes(&mut bytes)
}

/// Seal with a caller-chosen nonce (never do this outside fixtures).
pub fn seal_with_nonce(
    key: &EpochKey,
    label: &Label,
    nonce: &[u8; 12],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    envelope::seal_with_nonce(key, label, nonce, plaintext)
}

/// Open a parsed envelope with `key`; `None` on any authentication failure.
pub fn open_with_key(envelope: &Envelope<'_>, key: &EpochKey) -> Option<Vec<u8>> {
    envelope.open(key).ok()
}

/// Fuzz check for parsing envelopes, on any bytes: parsing never panics,
/// and an envelope that parses is canonical: its header, written again
/// from the parsed fields as sealing writes it, is exactly the header bytes
/// read, and with the ciphertext after it, exactly the input. So no header
/// byte is skipped or read loosely (a reserved value ignored, a region in
/// two spellings), and no two inputs parse to one envelope. Returns the
/// parsed header, or why the bytes are not an envelope.
pub fn envelope_parse(data: &[u8]) -> Result<Header, EnvelopeError> {
    let envelope = Envelope::parse(data)?;
    let header = envelope.reencode_header();
    assert_eq!(
        hex::encode(&header),
        hex::encode(envelope.header_bytes()),
        "the header read is not what its parsed fields encode to"
    );
    assert_eq!(
        [&header[..], envelope.ciphertext()].concat(),
        data,
        "the header and ciphertext are not the whole input"
    );
    Ok(*envelope.header())
}

/// What opening some bytes as an envelope gave (see [`envelope_open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The bytes are not an envelope: [`Envelope::parse`] refused them.
    Malformed,
    /// They parse, but do not open under the fixture key of their own
    /// business and epoch.
    Refused,
    /// They opened, and seal again to exactly themselves.
    Opened,
}

/// Fuzz check for opening envelopes, on any bytes: opening with the fixture
/// key of the envelope's own business and epoch never panics, and a
/// successful open re-seals (same key, same nonce) to exactly the input, so
/// no altered envelope can open to a plaintext. Returns how far it got.
pub fn envelope_open(data: &[u8]) -> Opening {
    let Ok(envelope) = Envelope::parse(data) else {
        return Opening::Malformed;
    };
    let header = envelope.header();
    let key = fixture_epoch_key(header.label().business, header.epoch());
    let Some(plaintext) = open_with_key(&envelope, &key) else {
        return Opening::Refused;
    };
    let resealed = seal_with_nonce(&key, header.label(), header.nonce(), &plaintext)
        .unwrap_or_else(|e| panic!("an envelope that opened cannot be sealed again: {e}"));
    assert_eq!(
        resealed, data,
        "an opened envelope must be exactly what sealing makes"
    );
    Opening::Opened
}

/// Which identifier parsers accepted some bytes (see [`phone_number`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdParses {
    /// [`PhoneNumber`]'s `FromStr`.
    pub phone_number: bool,
    /// [`Region::from_bytes`].
    pub region: bool,
    /// [`BusinessId`]'s `FromStr`.
    pub business_id: bool,
    /// [`MessageId`]'s `FromStr`.
    pub message_id: bool,
    /// [`DecisionId`]'s `FromStr` (the audit trail's decision ids).
    pub decision_id: bool,
    /// [`DeviceIdentity::from_bytes`] (a key a business approves), on
    /// exactly 33 bytes.
    pub device_identity: bool,
}

/// Fuzz check for the identifier parsers, on any bytes: [`PhoneNumber`]
/// accepts exactly strict E.164 (`+`, 7 to 15 digits, no leading zero) and
/// never prints more than its last two digits; [`Region`] accepts exactly
/// its documented names (2 to 15 bytes of `a-z`, `0-9` and `-`, with no
/// `-` first or last); [`BusinessId`] accepts exactly the decimal numbers
/// 1 to 2^64 - 1 without a sign or leading zero, [`MessageId`] exactly
/// 32 lowercase hexadecimal digits, and [`DecisionId`] exactly two runs of
/// 16 joined by `-`, each printing and serialising back to the text it
/// parsed; [`DeviceIdentity`] accepts exactly a Curve25519 key (type byte
/// `05`) in its canonical encoding that is not of small order, gives back
/// its bytes and prints none. Returns which parsers accepted the bytes.
pub fn phone_number(data: &[u8]) -> IdParses {
    let mut parses = IdParses {
        region: region(data),
        device_identity: device_identity(data),
        ..IdParses::default()
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return parses;
    };
    parses.business_id = business_id(text);
    parses.message_id = message_id(text);
    parses.decision_id = decision_id(text);
    let Ok(number) = text.parse::<PhoneNumber>() else {
        return parses;
    };
    let digits = number.digits();
    assert_eq!(number.expose(), text, "a number is the text it parsed");
    assert!((PhoneNumber::MIN_DIGITS..=PhoneNumber::MAX_DIGITS).contains(&digits.len()));
    assert!(digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'));
    let hidden = &digits[..digits.len() - 2];
    for shown in [number.to_string(), format!("{number:?}")] {
        assert!(
            !shown.contains(hidden),
            "{shown} shows a redacted digit run"
        );
    }
    parses.phone_number = true;
    parses
}

/// The [`DeviceIdentity`] part of [`phone_number`]: whether `data` is one.
fn device_identity(data: &[u8]) -> bool {
    let Ok(bytes) = <[u8; 33]>::try_from(data) else {
        return false;
    };
    // The documented rule, spelled out apart from the Signal layer's: the
    // u-coordinate, little-endian, below 2^255 - 19, and an agreement with
    // it (under any key of ours) other than zeros, which a point of small
    // order gives.
    let prime_le: [u8; 32] = {
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        p
    };
    let below_prime = bytes[1..].iter().rev().lt(prime_le.iter().rev());
    let contributes = || {
        let ours = PrivateKey::deserialize(&[0x42; 32]).unwrap_or_else(|e| panic!("{e}"));
        PublicKey::deserialize(&bytes)
            .ok()
            .and_then(|theirs| ours.calculate_agreement(&theirs).ok())
            .is_some_and(|agreed| agreed != [0; 32])
    };
    let expected = bytes[0] == 0x05 && below_prime && contributes();
    let parsed = DeviceIdentity::from_bytes(&bytes);
    assert_eq!(parsed.is_some(), expected, "identity {bytes:02x?}");
    let Some(identity) = parsed else { return false };
    assert_eq!(
        identity.to_bytes(),
        bytes,
        "an identity is the bytes it parsed"
    );
    assert_eq!(format!("{identity:?}"), "DeviceIdentity(..)");
    true
}

/// The [`Region`] part of [`phone_number`]: whether `name` is one.
fn region(name: &[u8]) -> bool {
    // The documented rule, spelled out apart from `Region`'s own constants.
    let expected = (2..=15).contains(&name.len())
        && name
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !name.starts_with(b"-")
        && !name.ends_with(b"-");
    let parsed = Region::from_bytes(name);
    assert_eq!(
        parsed.is_ok(),
        expected,
        "region \"{}\"",
        name.escape_ascii()
    );
    let Ok(region) = parsed else { return false };
    assert_eq!(region.as_bytes(), name, "a region is the name it parsed");
    assert_eq!(
        region.to_string().as_bytes(),
        name,
        "a region prints as it parsed"
    );
    let json = serde_json::to_string(&region).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        json.as_bytes(),
        [b"\"", name, b"\""].concat(),
        "a region serialises as its name"
    );
    assert_eq!(serde_json::from_str::<Region>(&json).ok(), Some(region));
    true
}

/// The [`BusinessId`] half of [`phone_number`]: whether `text` is one.
fn business_id(text: &str) -> bool {
    // At most 20 digits without a leading zero: u128 holds it exactly.
    let expected = !text.is_empty()
        && text.len() <= 20
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0')
        && text
            .parse::<u128>()
            .is_ok_and(|n| n <= u128::from(u64::MAX));
    let parsed = text.parse::<BusinessId>();
    assert_eq!(parsed.is_ok(), expected, "business id {text:?}");
    let Ok(id) = parsed else { return false };
    assert_eq!(id.to_string(), text, "a business id prints as it parsed");
    assert_eq!(BusinessId::new(id.get()), Some(id));
    let json = serde_json::to_string(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json, text, "a business id serialises as its number");
    assert_eq!(serde_json::from_str::<BusinessId>(&json).ok(), Some(id));
    true
}

/// The [`DecisionId`] part of [`phone_number`]: whether `text` is one.
fn decision_id(text: &str) -> bool {
    let hex = |half: &str| {
        half.len() == 16 && half.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let expected =
        text.len() == 33 && text.as_bytes()[16] == b'-' && hex(&text[..16]) && hex(&text[17..]);
    let parsed = text.parse::<DecisionId>();
    assert_eq!(parsed.is_ok(), expected, "decision id {text:?}");
    let Ok(id) = parsed else { return false };
    assert_eq!(id.to_string(), text, "a decision id prints as it parsed");
    let json = serde_json::to_string(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        json,
        format!("\"{text}\""),
        "a decision id serialises as its text"
    );
    assert_eq!(serde_json::from_str::<DecisionId>(&json).ok(), Some(id));
    true
}

/// The [`MessageId`] half of [`phone_number`]: whether `text` is one.
fn message_id(text: &str) -> bool {
    let expected = text.len() == 2 * MessageId::LEN
        && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let parsed = text.parse::<MessageId>();
    assert_eq!(parsed.is_ok(), expected, "message id {text:?}");
    let Ok(id) = parsed else { return false };
    assert_eq!(id.to_string(), text, "a message id prints as it parsed");
    assert_eq!(MessageId::from_bytes(*id.as_bytes()), id);
    let json = serde_json::to_string(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        json,
        format!("\"{text}\""),
        "a message id serialises as its text"
    );
    assert_eq!(serde_json::from_str::<MessageId>(&json).ok(), Some(id));
    true
}

/// Fuzz check for reading the audit trail, on any bytes as one line:
/// reading never panics, and an entry read is one a [`JsonLinesSink`]
/// writes back as a line that reads as the same entry, alone and as a
/// trail. Every cut of that line, ended as the sink ends a line a failure
/// cut (` <cut>`), is unreadable (even cut just before its `\n`), and so are
/// the bytes given so ended: a reader skipping unreadable lines never takes
/// a cut line for an entry. Returns what the bytes read as.
pub fn audit_line(data: &[u8]) -> Result<TrailEntry, TrailError> {
    let cut_short = |line: &[u8]| {
        let cut = [line, b" <cut>\n"].concat();
        match TrailEntry::from_line(&cut) {
            Err(TrailError::Unreadable { what, .. }) => {
                assert_eq!(what, "a line cut short", "{}", cut.escape_ascii());
            }
            other => panic!("a cut line read as {other:?}: {}", cut.escape_ascii()),
        }
    };
    cut_short(data);
    let entry = TrailEntry::from_line(data)?;
    let sink = JsonLinesSink::new(Vec::new(), FlushPolicy::EveryEvent);
    let written = match &entry {
        TrailEntry::Decision(decision) => sink.record(decision),
        TrailEntry::Hold(event) => sink.record_hold(event),
        TrailEntry::Change(change) => sink.record_change(change),
    };
    written.unwrap_or_else(|e| panic!("an entry read does not write: {e}"));
    let line = sink
        .into_inner()
        .unwrap_or_else(|e| panic!("an entry read does not write: {e}"));
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(line.last(), Some(&b'\n'), "a line written without its end");
    let again = TrailEntry::from_line(&line)
        .unwrap_or_else(|e| panic!("a written entry does not read: {e}"));
    assert_eq!(again, entry, "an entry written reads as another");
    let trail: Vec<_> = read_trail(&line[..]).map(|e| e.ok()).collect();
    assert_eq!(trail, [Some(entry.clone())], "the line as a trail");
    // Without its `\n`, the trail's last line is cut (its record refused).
    let unended: Vec<_> = read_trail(&line[..line.len() - 1]).collect();
    assert!(
        matches!(
            unended[..],
            [Err(TrailError::Unreadable {
                line: 1,
                what: "a line cut short",
                ..
            })]
        ),
        "a last line without its end read as {unended:?}"
    );
    for end in 0..line.len() {
        cut_short(&line[..end]);
    }
    Ok(entry)
}

/// The length of a prekey bundle in the layout [`prekey_bundle`] reads,
/// without its one-time prekey.
pub const BUNDLE_LEN: usize = 4 + 4 + 33 + 4 + 33 + 64;

/// The length of a one-time prekey in that layout: its id and key.
pub const ONE_TIME_LEN: usize = 4 + 33;

/// A prekey bundle from bytes: the registration id, the device id, the
/// identity key, the signed prekey's id, key and signature, and, if
/// [`ONE_TIME_LEN`] more bytes follow, a one-time prekey's id and key
/// (ids big-endian); bytes missing are zeros, bytes after are ignored.
pub fn bundle_from_bytes(data: &[u8]) -> PreKeyBundle {
    let mut bytes = [0; BUNDLE_LEN + ONE_TIME_LEN];
    let n = data.len().min(bytes.len());
    bytes[..n].copy_from_slice(&data[..n]);
    let field = |at: usize, len: usize| &bytes[at..at + len];
    let id = |at| {
        let mut id = [0; 4];
        id.copy_from_slice(field(at, 4));
        u32::from_be_bytes(id)
    };
    let key = |at| {
        let mut key = [0; 33];
        key.copy_from_slice(field(at, 33));
        key
    };
    let mut signature = [0; 64];
    signature.copy_from_slice(field(78, 64));
    PreKeyBundle {
        registration_id: id(0),
        device_id: id(4),
        identity_key: key(8),
        signed_prekey: SignedPublicPreKey {
            id: id(41),
            public_key: key(45),
            signature,
        },
        one_time_prekey: (data.len() >= BUNDLE_LEN + ONE_TIME_LEN).then(|| PublicPreKey {
            id: id(BUNDLE_LEN),
            public_key: key(BUNDLE_LEN + 4),
        }),
    }
}

/// The bytes of `bundle` in the layout [`bundle_from_bytes`] reads.
pub fn bundle_bytes(bundle: &PreKeyBundle) -> Vec<u8> {
    let mut out = Vec::with_capacity(BUNDLE_LEN + ONE_TIME_LEN);
    out.extend_from_slice(&bundle.registration_id.to_be_bytes());
    out.extend_from_slice(&bundle.device_id.to_be_bytes());
    out.extend_from_slice(&bundle.identity_key);
    out.extend_from_slice(&bundle.signed_prekey.id.to_be_bytes());
    out.extend_from_slice(&bundle.signed_prekey.public_key);
    out.extend_from_slice(&bundle.signed_prekey.signature);
    if let Some(one_time) = &bundle.one_time_prekey {
        out.extend_from_slice(&one_time.id.to_be_bytes());
        out.extend_from_slice(&one_time.public_key);
    }
    out
}

/// The device a [`prekey_bundle`] check has a session with before it
/// starts another from the bundle: its bundle, with its first one-time
/// prekey if `one_time`. Its keys are fixed; its signature is drawn anew.
pub fn fixture_device_bundle(one_time: bool) -> PreKeyBundle {
    let private = |byte| match PrivateKey::deserialize(&[byte; 32]) {
        Ok(key) => key,
        Err(e) => unreachable!("a fixed private key: {e}"),
    };
    let public = |byte| {
        let mut key = [0; 33];
        let public = private(byte).public_key().map(|k| k.serialize());
        key.copy_from_slice(&public.unwrap_or_else(|e| unreachable!("{e}")));
        key
    };
    let signed = public(0x22);
    let signature = private(0x21)
        .calculate_signature(&signed, &mut crate::rng::OsRng)
        .unwrap_or_else(|e| panic!("signing a fixed key: {e}"));
    PreKeyBundle {
        registration_id: 77,
        device_id: fixture_peer().device,
        identity_key: public(0x21),
        signed_prekey: SignedPublicPreKey {
            id: 5,
            public_key: signed,
            signature,
        },
        one_time_prekey: one_time.then(|| PublicPreKey {
            id: 9,
            public_key: public(0x23),
        }),
    }
}

/// Poll `future` once: everything the check awaits (an in-memory store, a
/// local key provider, uncontended locks) is ready at once.
fn ready<F: Future>(future: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("an in-memory operation waited"),
    }
}

/// Fuzz check for a consumer device's prekey bundle as the transport hands
/// it over, on any bytes (in [`bundle_from_bytes`]'s layout): a business
/// with a session with the device ([`fixture_device_bundle`]) starts
/// another from the bundle. It never panics; it is taken exactly when the
/// bundle is the device's, its keys usable (as [`DeviceIdentity::from_bytes`]
/// has them), its signature good and its identity the one trusted for the
/// device (a bundle the network serves never replaces that, see
/// [`IdentityPolicy`](crate::signal::IdentityPolicy)). Any other is refused, as
/// [`SignalError::UntrustedIdentity`] if another identity is all that is
/// wrong, as [`SignalError::BadBundle`] otherwise, and changes nothing
/// stored. A session started encrypts its first message as a first-contact
/// one.
pub fn prekey_bundle(data: &[u8]) -> Result<(), SignalError> {
    let bundle = bundle_from_bytes(data);
    let usable = |key: &[u8; 33]| DeviceIdentity::from_bytes(key).is_some();
    let signed = PublicKey::deserialize(&bundle.identity_key).is_ok_and(|identity| {
        identity.verify_signature(
            &bundle.signed_prekey.public_key,
            &bundle.signed_prekey.signature,
        )
    });
    let sound = bundle.device_id == fixture_peer().device
        && usable(&bundle.identity_key)
        && usable(&bundle.signed_prekey.public_key)
        && bundle
            .one_time_prekey
            .as_ref()
            .is_none_or(|k| usable(&k.public_key))
        && signed;
    let trusted = bundle.identity_key == fixture_device_bundle(false).identity_key;

    let (sessions, store) = bundle_world();
    let (business, peer) = (fixture_business(), fixture_peer());
    let expiry = Timestamp::from_millis(1_767_225_600_000 + 86_400_000);
    let stored = || {
        ready(store.peer(business, peer))
            .unwrap_or_else(|e| panic!("reading the memory store: {e}"))
    };
    let before = stored();
    let result = ready(sessions.start_session(business, peer, &bundle, expiry));
    let after = stored();
    match &result {
        Ok(()) => {
            assert!(sound && trusted, "a bundle taken: {bundle:?}");
            assert_ne!(after, before, "a session started, nothing stored");
            let first = ready(sessions.encrypt(business, peer, b"hello", expiry))
                .unwrap_or_else(|e| panic!("a session started does not encrypt: {e}"));
            assert_eq!(first.kind, MessageKind::FirstContact);
        }
        Err(e) => {
            assert_eq!(
                after, before,
                "a refused bundle ({e}) changed what is stored"
            );
            match e {
                SignalError::BadBundle(_) => {
                    assert!(!sound, "a sound bundle refused as {e}: {bundle:?}");
                }
                SignalError::UntrustedIdentity { .. } => {
                    assert!(sound && !trusted, "refused as untrusted: {bundle:?}");
                }
                other => panic!("a bundle refused as {other:?}"),
            }
        }
    }
    result
}

/// A business with a session with [`fixture_peer`] from
/// [`fixture_device_bundle`]: its sessions and its store.
fn bundle_world() -> (Sessions, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let keys = Arc::new(KeyManager::new(Arc::new(fixture_provider()), store.clone()));
    let vault = Arc::new(Vault::new(keys, Arc::new(clock), EpochLength::DEFAULT));
    let sessions = Sessions::new(vault, store.clone(), SignalConfig::default())
        .unwrap_or_else(|e| panic!("the default configuration: {e}"));
    let business = fixture_business();
    ready(sessions.publish(business))
        .unwrap_or_else(|e| panic!("publishing the business's keys: {e}"));
    let expiry = Timestamp::from_millis(1_767_225_600_000 + 86_400_000);
    ready(sessions.start_session(
        business,
        fixture_peer(),
        &fixture_device_bundle(true),
        expiry,
    ))
    .unwrap_or_else(|e| panic!("the fixture device's bundle: {e}"));
    (sessions, store)
}

/// Which loaders accepted a policy file (see [`policy_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyLoads {
    /// [`VisibilityPolicy::from_toml`].
    pub visibility_toml: bool,
    /// [`VisibilityPolicy::from_json`].
    pub visibility_json: bool,
    /// [`RetentionPolicy::from_toml`].
    pub retention_toml: bool,
    /// [`RetentionPolicy::from_json`].
    pub retention_json: bool,
}

/// Fuzz check for the policy-file parsers, on any bytes: whatever a
/// visibility or retention loader accepts keeps the hard rules (no cell a
/// [`HardRule`] forbids; no period past [`CEILING`]) and survives a write
/// and reload unchanged. Returns which loaders accepted the bytes.
pub fn policy_file(data: &[u8]) -> PolicyLoads {
    let Ok(text) = std::str::from_utf8(data) else {
        return PolicyLoads::default();
    };
    let visibility = |policy: Result<VisibilityPolicy, _>| {
        let Ok(policy) = policy else { return false };
        for (party, class, purpose) in policy.allowed_cells() {
            if let Some(rule) = HardRule::breaking(party, class, purpose) {
                panic!("loaded policy allows {party:?}/{class:?}/{purpose:?} against {rule}");
            }
        }
        assert!(VisibilityPolicy::from_toml(&policy.to_toml()).is_ok_and(|p| p == policy));
        assert!(VisibilityPolicy::from_json(&policy.to_json()).is_ok_and(|p| p == policy));
        true
    };
    let retention = |policy: Result<RetentionPolicy, _>| {
        let Ok(policy) = policy else { return false };
        let mut periods = vec![policy.default_periods()];
        periods.extend(policy.businesses().map(|(b, _)| policy.periods(b)));
        for p in periods {
            for d in Direction::ALL {
                assert!(p.of(d) <= CEILING, "a loaded period exceeds the ceiling");
            }
        }
        assert!(policy.in_use_ttl() <= CEILING);
        assert_eq!(policy.to_file().validate().as_ref(), Ok(&policy));
        true
    };
    PolicyLoads {
        visibility_toml: visibility(VisibilityPolicy::from_toml(text)),
        visibility_json: visibility(VisibilityPolicy::from_json(text)),
        retention_toml: retention(RetentionPolicy::from_toml(text)),
        retention_json: retention(RetentionPolicy::from_json(text)),
    }
}

/// Which of `accepted` hold, as corpus file names spell it: their names
/// joined by `+`, or `none`.
fn spell(accepted: &[(bool, &str)]) -> String {
    let names: Vec<&str> = accepted
        .iter()
        .filter_map(|&(ok, name)| ok.then_some(name))
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("+")
    }
}

/// The business every [`signal_message`] and [`peer_record`] check uses.
fn fixture_business() -> BusinessId {
    match BusinessId::new(4242) {
        Some(business) => business,
        None => unreachable!("4242 is not zero"),
    }
}

/// The consumer device every [`peer_record`] check uses.
pub fn fixture_peer() -> PeerId {
    PeerId {
        phone: PhoneHash::from_bytes([0x70; PhoneHash::LEN]),
        device: 1,
    }
}

/// Which kinds a transport message parsed as (see [`signal_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SignalParses {
    /// As a first-contact message (`pkmsg`, a `PreKeySignalMessage`).
    pub first_contact: bool,
    /// As a follow-up message (`msg`, a `SignalMessage`).
    pub follow_up: bool,
}

impl SignalParses {
    /// As the corpus names it: `first-contact`, `follow-up`, both joined by
    /// `+`, or `none`.
    pub fn spelled(&self) -> String {
        spell(&[
            (self.first_contact, "first-contact"),
            (self.follow_up, "follow-up"),
        ])
    }
}

/// Fuzz check for the transport's inbound parser, on any bytes as either
/// kind of Signal message: parsing never panics; a refusal is
/// [`SignalError::InvalidMessage`]; accepted input gets a stable id (the
/// same bytes parse to the same id again), another for another business
/// (whoever the transport says sent it, the id is the same: the parse does
/// not take the sender), and a first-contact message has the id of the
/// message it embeds, sent on its own. Returns which kinds the bytes
/// parsed as.
pub fn signal_message(data: &[u8]) -> SignalParses {
    let business = fixture_business();
    let mut parses = SignalParses::default();
    for kind in [MessageKind::FirstContact, MessageKind::FollowUp] {
        let message = Ciphertext {
            kind,
            bytes: data.to_vec(),
        };
        let parse = |message: &Ciphertext, business| match Parsed::new(message, business) {
            Ok(parsed) => Some(parsed),
            Err(SignalError::InvalidMessage(_)) => None,
            Err(e) => panic!("a malformed message must be InvalidMessage, not {e:?}"),
        };
        let Some(parsed) = parse(&message, business) else {
            continue;
        };
        let id = parsed.id();
        let id_of = |message: &Ciphertext, business| {
            parse(message, business)
                .map(|p| p.id())
                .unwrap_or_else(|| panic!("{kind:?} parsed once, then not"))
        };
        assert_eq!(id_of(&message, business), id, "the id is not stable");
        let other_business = BusinessId::new(business.get() + 1).unwrap_or(business);
        assert_ne!(
            id_of(&message, other_business),
            id,
            "another business, same id"
        );
        match (kind, parsed.embedded()) {
            (MessageKind::FirstContact, Some(inner)) => {
                assert_eq!(
                    id_of(&inner, business),
                    id,
                    "a first-contact message and the message it embeds have different ids"
                );
                parses.first_contact = true;
            }
            (MessageKind::FollowUp, None) => parses.follow_up = true,
            (kind, inner) => panic!("{kind:?} parsed with embedded message {inner:?}"),
        }
    }
    parses
}

/// The incarnation [`peer_record`] decodes under; the corpus's records with
/// a session are encoded under it, so their reload is trusted.
pub const PEER_INCARNATION: [u8; 16] = [0x5a; 16];

/// What a stored peer record held (see [`peer_record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerShape {
    /// A Signal session.
    pub session: bool,
    /// The consumer's trusted identity key.
    pub identity: bool,
}

/// A [`peer_record`] outcome as the corpus names it: what the record held
/// (`session+identity`, `session`, `identity`, or `empty`), or the reason it
/// was refused with hyphens for spaces (`bad-session`).
pub fn spell_peer_record(outcome: Result<PeerShape, &str>) -> String {
    match outcome {
        Ok(PeerShape {
            session: false,
            identity: false,
        }) => "empty".to_owned(),
        Ok(shape) => spell(&[(shape.session, "session"), (shape.identity, "identity")]),
        Err(reason) => reason.replace(' ', "-"),
    }
}

/// Fuzz check for the stored Signal state of a consumer device (the sealed
/// peer record, once opened), on any bytes: decoding never panics, and
/// refuses with a reason. The session part is the library's protobuf, which
/// is not canonical (field order, unknown fields, varint widths), so what
/// decodes re-encodes to a normal form that encoding keeps
/// (`encode∘decode` is idempotent, with the same session, identity and
/// unsure receiving chains); a record without a session is canonical and
/// re-encodes to exactly the input. A decoded peer is clean, at the fixture
/// device's address, with the expiry it was loaded with. Returns what the
/// record held, or why it was refused.
pub fn peer_record(data: &[u8]) -> Result<PeerShape, &'static str> {
    let peer = fixture_peer();
    let expiry = Timestamp::from_millis(1_767_225_600_000);
    let first = decode_peer_record(peer, data, &PEER_INCARNATION, expiry)?;
    assert!(!first.encoding.is_empty());
    assert_eq!(first.encoded_len, data.len());
    assert_eq!(first.expiries, (expiry, expiry));
    assert!(first.clean, "a decoded peer is dirty or keyed");
    assert_eq!(
        first.address,
        (crate::signal::ADDRESS_NAME.to_owned(), peer.device),
        "the library address names the consumer"
    );
    let second = decode_peer_record(peer, &first.encoding, &PEER_INCARNATION, expiry)
        .unwrap_or_else(|e| panic!("a re-encoded record does not decode: {e}"));
    assert_eq!(
        second.encoding, first.encoding,
        "encode∘decode is not idempotent"
    );
    assert_eq!(
        (second.has_session, second.identity, &second.unsure),
        (first.has_session, first.identity, &first.unsure),
        "a re-encoded record decodes to another peer"
    );
    if !first.has_session {
        assert_eq!(
            first.encoding, data,
            "a record without a session is not canonical"
        );
    }
    Ok(PeerShape {
        session: first.has_session,
        identity: first.identity.is_some(),
    })
}

/// Which stored-body decoders accepted some bytes (see [`payload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadDecodes {
    /// The sealed body of an inbound message.
    pub inbound: bool,
    /// The sealed body of an outbound message.
    pub outbound: bool,
}

impl PayloadDecodes {
    /// As the corpus names it: `inbound`, `outbound`, both joined by `+`, or
    /// `none`.
    pub fn spelled(&self) -> String {
        spell(&[(self.inbound, "inbound"), (self.outbound, "outbound")])
    }
}

/// Fuzz check for the processor's stored message bodies and the payload a
/// device receives, on any bytes: the inbound and outbound body decoders
/// never panic, refuse with a reason, and what they accept (a strict E.164
/// number included) encodes back to exactly the input; any payload of at
/// least a message id splits into id and content that join back to it.
/// Returns which body decoders accepted the bytes.
pub fn payload(data: &[u8]) -> PayloadDecodes {
    let decodes = |kind: &str, result: Result<Vec<u8>, &'static str>| match result {
        Ok(encoding) => {
            assert_eq!(
                encoding, data,
                "a decoded {kind} body encodes to other bytes"
            );
            true
        }
        Err(reason) => {
            assert!(!reason.is_empty(), "a refused {kind} body has no reason");
            false
        }
    };
    match parse_device_payload(data) {
        Some((id, content)) => assert_eq!(device_payload(id, content), data),
        None => assert!(data.len() < MessageId::LEN, "a device payload is refused"),
    }
    PayloadDecodes {
        inbound: decodes("inbound", reencode_inbound(data)),
        outbound: decodes("outbound", reencode_outbound(data)),
    }
}

/// Fuzz check for a stored KEK ring (the JSON a store keeps it as), on any
/// bytes: decoding never panics, and a ring that decodes keeps the ring's
/// invariants (versions ascending and below the next version, the primary
/// among them, the floor from 1 to the primary; a version below the floor
/// may not unwrap), serialises to a ring equal to it, and every lifecycle
/// step on it (adding a version; promoting, raising the floor to or
/// retiring each version that matters) refuses or yields, one revision on,
/// a ring that keeps them, whose floor did not go down and whose versions
/// were all there before (or are the one added). Returns `ring`, or why the
/// bytes were refused: `not-json`, or `corrupt` (JSON, but no valid ring).
pub fn kek_ring(data: &[u8]) -> &'static str {
    let ring = match serde_json::from_slice::<KekRing>(data) {
        Ok(ring) => ring,
        Err(e) if e.is_data() => return "corrupt",
        Err(_) => return "not-json",
    };
    assert_ring(&ring);
    let json = serde_json::to_vec(&ring).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        serde_json::from_slice::<KekRing>(&json).ok().as_ref(),
        Some(&ring),
        "a decoded ring does not survive a write and reload"
    );
    let after = |next: &KekRing, added: Option<u32>| {
        assert_ring(next);
        assert_eq!(
            next.revision(),
            ring.revision() + 1,
            "a step skipped a revision"
        );
        assert_eq!(next.business(), ring.business());
        assert!(next.floor() >= ring.floor(), "the floor went down");
        assert!(next.next_version() >= ring.next_version());
        for v in next.versions() {
            let before = ring.get(v.version);
            assert!(
                before == Some(v) || Some(v.version) == added,
                "version {} appeared or changed",
                v.version
            );
        }
    };
    let t = Timestamp::from_millis(1);
    if let Ok((next, version)) = ring.add_version(vec![0xaa], KekCheck::UNUSED, t) {
        assert_eq!(version, ring.next_version(), "a version number was reused");
        after(&next, Some(version));
    }
    let mut versions: Vec<u32> = vec![0, 1, u32::MAX, ring.primary(), ring.floor()];
    versions.push(ring.next_version());
    for v in ring.versions() {
        versions.extend([
            v.version.saturating_sub(1),
            v.version,
            v.version.saturating_add(1),
        ]);
    }
    for v in versions {
        for next in [ring.promote(v), ring.raise_floor(v), ring.retire(v)]
            .into_iter()
            .flatten()
        {
            after(&next, None);
        }
    }
    "ring"
}

/// `ring` keeps a ring's invariants, as its accessors show them.
fn assert_ring(ring: &KekRing) {
    let versions = ring.versions();
    assert!(
        versions.windows(2).all(|w| w[0].version < w[1].version),
        "versions out of order"
    );
    assert!(
        versions
            .iter()
            .all(|v| v.version >= 1 && v.version < ring.next_version()),
        "a version at or past the next"
    );
    assert!(ring.get(ring.primary()).is_some(), "no primary version");
    assert!(
        (1..=ring.primary()).contains(&ring.floor()),
        "the floor is 0 or above the primary"
    );
    for v in [
        0,
        ring.floor().saturating_sub(1),
        ring.floor(),
        ring.primary(),
    ] {
        let usable = v >= ring.floor() && ring.get(v).is_some();
        assert_eq!(ring.usable(v).is_ok(), usable, "version {v}");
    }
}

/// Which stored key record [`key_records`] reads an input as: its first
/// byte, the tag, chooses; the rest is the record. Any other first byte (or
/// none) is no record, and nothing is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRecord {
    /// `00`: the business's identity record (registration id, then the
    /// library's identity key pair), as an account load reads it.
    Identity = 0,
    /// `01`: a signed prekey record stored as prekey [`KEY_RECORD_PREKEY_ID`],
    /// as an account load reads it.
    SignedPreKey = 1,
    /// `02`: a one-time prekey record stored as prekey
    /// [`KEY_RECORD_PREKEY_ID`], as a first message and publishing read it.
    OneTimePreKey = 2,
    /// `03`: a [`LocalKeyProvider`] blob, unwrapped by the fixture provider
    /// ([`fixture_provider`]) under [`fixture_kek_context`].
    ProviderBlob = 3,
    /// `04`: the blob of a [`WrappedKey`] named [`fixture_key_id`], under
    /// KEK version [`FIXTURE_KEK_VERSION`] ([`fixture_kek`]).
    WrappedKey = 4,
}

impl KeyRecord {
    /// Every kind, in tag order.
    pub const ALL: [Self; 5] = [
        Self::Identity,
        Self::SignedPreKey,
        Self::OneTimePreKey,
        Self::ProviderBlob,
        Self::WrappedKey,
    ];

    /// The first input byte that chooses it.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// As the corpus names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::SignedPreKey => "signed-prekey",
            Self::OneTimePreKey => "one-time-prekey",
            Self::ProviderBlob => "provider-blob",
            Self::WrappedKey => "wrapped-key",
        }
    }
}

/// The prekey id the [`key_records`] prekey records are read back as.
pub const KEY_RECORD_PREKEY_ID: u32 = 7;

/// The identity key the [`key_records`] signed prekeys must be signed by:
/// the public half of the private key of 32 bytes `0x11`.
pub fn key_record_identity() -> wacore_libsignal::protocol::IdentityKey {
    let private = wacore_libsignal::protocol::PrivateKey::deserialize(&[0x11; 32])
        .unwrap_or_else(|e| panic!("{e}"));
    wacore_libsignal::protocol::IdentityKey::new(
        private.public_key().unwrap_or_else(|e| panic!("{e}")),
    )
}

/// The KEK version the [`key_records`] wrapped keys are read under.
pub const FIXTURE_KEK_VERSION: u32 = 3;

/// The name of the [`key_records`] wrapped keys.
pub fn fixture_key_id() -> KeyId {
    KeyId {
        business: fixture_business(),
        kind: KeyKind::SignalPreKey,
        id: u64::from(KEY_RECORD_PREKEY_ID),
    }
}

/// The KEK (version [`FIXTURE_KEK_VERSION`]) the [`key_records`] wrapped
/// keys are opened with.
pub(crate) fn fixture_kek() -> Kek {
    Kek::new(
        FIXTURE_KEK_VERSION,
        &SecretKey::from_bytes(&mut [0x4b; SecretKey::LEN]),
    )
}

/// The provider the [`key_records`] provider blobs are unwrapped by.
pub fn fixture_provider() -> LocalKeyProvider {
    LocalKeyProvider::new(&SecretKey::from_bytes(&mut [0x52; SecretKey::LEN]))
}

/// The context the [`key_records`] provider blobs are unwrapped under.
pub fn fixture_kek_context() -> KekContext {
    KekContext {
        business: fixture_business(),
        version: FIXTURE_KEK_VERSION,
    }
}

/// A [`key_records`] outcome as the corpus names it: `no-record`, or the
/// record's [name](KeyRecord::name) and then `ok` or the refusal with
/// hyphens for spaces (`identity-key-pair`, `unwrap`):
/// `signed-prekey-ok`, `identity-refused-identity-record`.
pub fn spell_key_record(outcome: Option<(KeyRecord, Result<(), &str>)>) -> String {
    match outcome {
        None => "no-record".to_owned(),
        Some((kind, Ok(()))) => format!("{}-ok", kind.name()),
        Some((kind, Err(reason))) => {
            format!("{}-refused-{}", kind.name(), reason.replace(' ', "-"))
        }
    }
}

/// Fuzz check for the business's stored key state, on any bytes: the first
/// byte chooses the decoder ([`KeyRecord`]), which reads the rest. No
/// decoder panics, and each refuses only with the error it promises:
///
/// - the identity record: corrupt `identity record` exactly when it is
///   shorter than a registration id or the id is outside `1..=0x3FFF`, else
///   corrupt `identity key pair`;
/// - the signed and one-time prekey records: corrupt `signed prekey` and
///   `one-time prekey`;
/// - a provider blob: [`ProviderError::Unwrap`]; a wrapped key's blob:
///   [`KeyError::Unwrap`] naming the key.
///
/// What decodes is sound (a registration id in range; the prekey id asked
/// for; a public key that is the private key's; a signed prekey's
/// signature by [`key_record_identity`]) and
/// encodes back: the two blobs, which are canonical, to exactly the input
/// (sealed again with the nonce they carry). The identity and prekey
/// records are the library's protobufs, which are not canonical (field
/// order, varint widths, repeated fields, trailing bytes after a public
/// key, a prekey's public key in the older 33-byte form, an unclamped
/// private key): they re-encode to a normal form that decodes to the same
/// keys, ids, timestamp and signature and encodes to itself. Returns which
/// record the bytes were read as, and whether it decoded or the refusal's
/// reason.
pub fn key_records(data: &[u8]) -> Option<(KeyRecord, Result<(), &'static str>)> {
    let (&tag, record) = data.split_first()?;
    let kind = *KeyRecord::ALL.iter().find(|k| k.tag() == tag)?;
    let outcome = match kind {
        KeyRecord::Identity => identity_record(record),
        KeyRecord::SignedPreKey => signed_prekey_record(record),
        KeyRecord::OneTimePreKey => one_time_prekey_record(record),
        KeyRecord::ProviderBlob => provider_blob(record),
        KeyRecord::WrappedKey => wrapped_key_blob(record),
    };
    Some((kind, outcome))
}

/// The reason of a corrupt-state refusal, which must be one of `allowed`.
fn corrupt_reason(e: SignalError, allowed: &[&'static str]) -> &'static str {
    match e {
        SignalError::Storage(StorageFailure::Corrupt(reason)) if allowed.contains(&reason) => {
            reason
        }
        e => panic!("a damaged key record must be corrupt {allowed:?}, not {e:?}"),
    }
}

/// The [`KeyRecord::Identity`] part of [`key_records`].
fn identity_record(record: &[u8]) -> Result<(), &'static str> {
    let (registration_id, pair) = match decode_identity(record) {
        Ok(decoded) => decoded,
        Err(e) => {
            let reason = corrupt_reason(e, &["identity record", "identity key pair"]);
            // The documented split, spelled out apart from the decoder.
            let id_bad = record
                .first_chunk::<4>()
                .is_none_or(|id| !(1..=0x3FFF).contains(&u32::from_be_bytes(*id)));
            let expected = if id_bad {
                "identity record"
            } else {
                "identity key pair"
            };
            assert_eq!(
                reason, expected,
                "an identity record refused for the wrong reason"
            );
            return Err(reason);
        }
    };
    assert_eq!(&record[..4], registration_id.to_be_bytes());
    assert!((1..=0x3FFF).contains(&registration_id));
    assert!(
        pair.private_key().public_key().ok().as_ref() == Some(pair.public_key()),
        "an identity pair whose halves do not match decoded"
    );
    let encoding = encode_identity(registration_id, &pair);
    let (again_id, again) = decode_identity(&encoding)
        .unwrap_or_else(|e| panic!("a re-encoded identity record does not decode: {e}"));
    assert_eq!(again_id, registration_id);
    assert_eq!(again.public_key(), pair.public_key());
    assert_eq!(
        again.private_key().serialize(),
        pair.private_key().serialize()
    );
    assert_eq!(
        *encode_identity(again_id, &again),
        *encoding,
        "encode∘decode of an identity record is not idempotent"
    );
    Ok(())
}

/// The fields of a decoded prekey record, to compare two decodings:
/// id, timestamp, public and private key, signature.
type PreKeyFields = (u32, Option<u64>, Vec<u8>, [u8; 32], Option<Vec<u8>>);

/// A decoded prekey's key pair, which must be sound: its public key is its
/// private key's. Serialised: public, private.
fn halves(
    pair: Result<
        wacore_libsignal::protocol::KeyPair,
        wacore_libsignal::protocol::SignalProtocolError,
    >,
) -> (Vec<u8>, [u8; 32]) {
    let pair = pair.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        pair.private_key
            .public_key()
            .is_ok_and(|public| public == pair.public_key),
        "a prekey whose public key is not its private key's decoded"
    );
    (
        pair.public_key.serialize().to_vec(),
        *pair.private_key.serialize(),
    )
}

/// The [`KeyRecord::SignedPreKey`] part of [`key_records`].
fn signed_prekey_record(record: &[u8]) -> Result<(), &'static str> {
    use wacore_libsignal::protocol::GenericSignedPreKey;

    let id = u64::from(KEY_RECORD_PREKEY_ID);
    let identity = key_record_identity();
    let fields = |r: &wacore_libsignal::protocol::SignedPreKeyRecord| -> PreKeyFields {
        let (public, private) = halves(r.key_pair());
        (
            r.id().map(u32::from).unwrap_or_else(|e| panic!("{e}")),
            r.timestamp().ok().map(|t| t.epoch_millis()),
            public,
            private,
            r.signature().ok(),
        )
    };
    let decoded = decode_signed_prekey(record, id, &identity)
        .map_err(|e| corrupt_reason(e, &["signed prekey"]))?;
    let got = fields(&decoded);
    assert_eq!(
        got.0, KEY_RECORD_PREKEY_ID,
        "a signed prekey with another id decoded"
    );
    assert!(
        got.1.is_some(),
        "a signed prekey without a timestamp decoded"
    );
    assert!(
        got.4.as_ref().is_some_and(|s| s.len() == 64),
        "a bad signature decoded"
    );
    re_encoded(
        "signed prekey",
        &decoded,
        |r| r.serialize(),
        |b| decode_signed_prekey(b, id, &identity),
        fields,
    );
    Ok(())
}

/// The [`KeyRecord::OneTimePreKey`] part of [`key_records`].
fn one_time_prekey_record(record: &[u8]) -> Result<(), &'static str> {
    let fields = |r: &wacore_libsignal::protocol::PreKeyRecord| -> PreKeyFields {
        let (public, private) = halves(r.key_pair());
        (
            r.id().map(u32::from).unwrap_or_else(|e| panic!("{e}")),
            None,
            public,
            private,
            None,
        )
    };
    let decoded = decode_one_time_prekey(record, KEY_RECORD_PREKEY_ID)
        .map_err(|e| corrupt_reason(e, &[ONE_TIME_PREKEY]))?;
    let got = fields(&decoded);
    assert_eq!(
        got.0, KEY_RECORD_PREKEY_ID,
        "a one-time prekey with another id decoded"
    );
    re_encoded(
        "one-time prekey",
        &decoded,
        |r| r.serialize(),
        |b| decode_one_time_prekey(b, KEY_RECORD_PREKEY_ID),
        fields,
    );
    Ok(())
}

/// That `decoded`, a `what` record, re-encodes to bytes that decode to the
/// same fields and re-encode to themselves.
fn re_encoded<R, E: std::fmt::Display, F: PartialEq + std::fmt::Debug>(
    what: &str,
    decoded: &R,
    serialize: impl Fn(&R) -> Result<Vec<u8>, wacore_libsignal::protocol::SignalProtocolError>,
    decode: impl Fn(&[u8]) -> Result<R, E>,
    fields: impl Fn(&R) -> F,
) {
    let encoding = serialize(decoded).unwrap_or_else(|e| panic!("{e}"));
    let again =
        decode(&encoding).unwrap_or_else(|e| panic!("a re-encoded {what} does not decode: {e}"));
    assert_eq!(
        fields(&again),
        fields(decoded),
        "a re-encoded {what} decodes to another"
    );
    assert_eq!(
        serialize(&again).ok(),
        Some(encoding),
        "encode∘decode of a {what} is not idempotent"
    );
}

/// The [`KeyRecord::ProviderBlob`] part of [`key_records`].
fn provider_blob(blob: &[u8]) -> Result<(), &'static str> {
    let provider = fixture_provider();
    let context = fixture_kek_context();
    let key = match provider.unwrap_blob(&context, blob) {
        Ok(key) => key,
        Err(ProviderError::Unwrap) => return Err("unwrap"),
        Err(e) => panic!("a bad provider blob must be Unwrap, not {e:?}"),
    };
    let nonce: &[u8; 12] = blob
        .get(1..13)
        .and_then(|n| n.try_into().ok())
        .unwrap_or_else(|| panic!("a {}-byte blob unwrapped", blob.len()));
    let again = provider
        .wrap_with_nonce(nonce, &context, &key)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again, blob,
        "an unwrapped provider blob wraps to other bytes"
    );
    Ok(())
}

/// The [`KeyRecord::WrappedKey`] part of [`key_records`].
fn wrapped_key_blob(blob: &[u8]) -> Result<(), &'static str> {
    let kek = fixture_kek();
    let id = fixture_key_id();
    let wrapped = WrappedKey {
        id,
        kek_version: FIXTURE_KEK_VERSION,
        blob: blob.to_vec(),
    };
    let secret = match wrapped.open(&kek) {
        Ok(secret) => secret,
        Err(KeyError::Unwrap(named)) if named == id => return Err("unwrap"),
        Err(e) => panic!("a bad wrapped key must be Unwrap naming it, not {e:?}"),
    };
    let nonce: &[u8; 12] = blob
        .get(..12)
        .and_then(|n| n.try_into().ok())
        .unwrap_or_else(|| panic!("a {}-byte blob opened", blob.len()));
    let again =
        WrappedKey::seal_with_nonce(id, &kek, nonce, &secret).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, wrapped, "an opened wrapped key seals to other bytes");
    Ok(())
}

/// Fuzz check for stored message rows of the SQLite backend, on any bytes
/// read as the values of a row's columns (see [`row_values`]): decoding
/// never panics; a row decodes to the one record written as exactly its
/// values, or is refused as corrupt naming a column and quoting no stored
/// value; and the sweep's selection, which reads only the type of the
/// sealed body, refuses exactly the rows a read refuses (one it listed
/// that a read refuses would be deleted unread). Returns `row`, or the
/// column a refusal names.
#[cfg(feature = "sqlite")]
pub fn message_row(data: &[u8]) -> &'static str {
    match crate::store::check_message_row(&row_values(data)) {
        Ok(()) => "row",
        Err(column) => column,
    }
}

/// The values of a message row's columns that `data` spells, column by
/// column: a tag byte (0 null, 1 integer, 2 real, 3 text, 4 blob, by its
/// value modulo 5), then for an integer or a real 8 big-endian bytes (a
/// NaN is null: SQLite stores none), for
/// a text or a blob a length byte and as many bytes. Bytes the input runs
/// out of are zero for numbers and missing for the rest; columns past the
/// input are null. A text is marked `SECRET` first, so that a refusal
/// quoting it shows (the bytes read lossily as UTF-8 after it).
#[cfg(feature = "sqlite")]
fn row_values(data: &[u8]) -> [rusqlite::types::Value; crate::store::MESSAGE_COLUMNS.len()] {
    use rusqlite::types::Value;
    let mut rest = data;
    std::array::from_fn(|_| {
        let Some((&tag, after)) = rest.split_first() else {
            return Value::Null;
        };
        rest = after;
        let mut take = |n: usize| {
            let (taken, after) = rest.split_at(n.min(rest.len()));
            rest = after;
            taken
        };
        let mut number = || {
            let mut bytes = [0; 8];
            let taken = take(8);
            bytes[..taken.len()].copy_from_slice(taken);
            bytes
        };
        match tag % 5 {
            1 => Value::Integer(i64::from_be_bytes(number())),
            // SQLite stores no NaN: it binds one as null, which is what
            // a row read back holds.
            2 => match f64::from_be_bytes(number()) {
                nan if nan.is_nan() => Value::Null,
                real => Value::Real(real),
            },
            3 | 4 => {
                let len = take(1).first().copied().unwrap_or(0);
                let bytes = take(len.into());
                if tag % 5 == 3 {
                    Value::Text(format!("SECRET{}", String::from_utf8_lossy(bytes)))
                } else {
                    Value::Blob(bytes.to_vec())
                }
            }
            _ => Value::Null,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Every file of `target`'s corpus: the expectation its name gives
    /// (before `--`; none for inputs a fuzzer saved) and its bytes.
    fn corpus(target: &str) -> Vec<(String, Option<String>, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 10, "{target} corpus too small");
        files
            .into_iter()
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let expected = name.split_once("--").map(|(e, _)| e.to_owned());
                (name.clone(), expected, std::fs::read(&path).unwrap())
            })
            .collect()
    }

    proptest::proptest! {
        /// Any 33 bytes, as the business may pass them, and keys of the
        /// right type: [`DeviceIdentity::from_bytes`] keeps its rule (see
        /// [`phone_number`]), never panicking.
        #[test]
        fn device_identities_parse_by_the_documented_rule(
            mut bytes in proptest::array::uniform::<_, 33>(proptest::prelude::any::<u8>()),
            typed: bool,
        ) {
            if typed {
                bytes[0] = 0x05;
            }
            let accepted = device_identity(&bytes);
            proptest::prop_assert!(!accepted || bytes[0] == 0x05);
        }
    }

    #[test]
    fn phone_number_corpus_replays_with_the_expected_results() {
        for (name, expected, bytes) in corpus("phone_number") {
            let parses = phone_number(&bytes);
            let Some(expected) = expected else { continue };
            // `<parser>-ok` or `<parser>-bad`; a bare `ok`/`bad` is about
            // the phone-number parser.
            let (parser, verdict) = expected.rsplit_once('-').unwrap_or(("phone", &expected));
            let accepted = match parser {
                "phone" => parses.phone_number,
                "region" => parses.region,
                "business" => parses.business_id,
                "message" => parses.message_id,
                "decision" => parses.decision_id,
                "identity" => parses.device_identity,
                _ => panic!("{name}: unknown parser {parser}"),
            };
            assert!(matches!(verdict, "ok" | "bad"), "{name}: unknown verdict");
            assert_eq!(accepted, verdict == "ok", "{name}");
        }
    }

    /// Replay `target`'s corpus: what `outcome` makes of each file must be
    /// what its name expects.
    fn replay(target: &str, mut outcome: impl FnMut(&[u8]) -> String) {
        for (name, expected, bytes) in corpus(target) {
            let got = outcome(&bytes);
            if let Some(expected) = expected {
                assert_eq!(got, expected, "{name}");
            }
        }
    }

    #[test]
    fn envelope_open_corpus_replays_with_the_expected_results() {
        let mut opened = 0;
        replay("envelope_open", |bytes| {
            let opening = envelope_open(bytes);
            opened += usize::from(opening == Opening::Opened);
            format!("{opening:?}").to_lowercase()
        });
        assert!(opened >= 3, "too few envelopes that open");
    }

    #[test]
    fn signal_message_corpus_replays_with_the_expected_results() {
        let mut real = [0; 2];
        replay("signal_message", |bytes| {
            let parses = signal_message(bytes);
            real[0] += usize::from(parses.first_contact);
            real[1] += usize::from(parses.follow_up);
            parses.spelled()
        });
        assert!(real[0] >= 2 && real[1] >= 2, "too few real messages");
    }

    #[test]
    fn peer_record_corpus_replays_with_the_expected_results() {
        replay("peer_record", |bytes| spell_peer_record(peer_record(bytes)));
    }

    #[test]
    fn payload_corpus_replays_with_the_expected_results() {
        replay("payload", |bytes| payload(bytes).spelled());
    }

    #[test]
    fn kek_ring_corpus_replays_with_the_expected_results() {
        let mut rings = 0;
        replay("kek_ring", |bytes| {
            let outcome = kek_ring(bytes);
            rings += usize::from(outcome == "ring");
            outcome.to_owned()
        });
        assert!(rings >= 3, "too few rings that decode");
    }

    /// A protobuf field: `field` with `bytes` (length-delimited).
    fn pb(field: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![field << 3 | 2, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }

    /// A protobuf field: `field` with varint `value` (below 2^7).
    fn pb_small(field: u8, value: u8) -> Vec<u8> {
        assert!(value < 0x80);
        vec![field << 3, value]
    }

    /// A protobuf field: `field` with fixed64 `value`.
    fn pb_fixed64(field: u8, value: u64) -> Vec<u8> {
        let mut out = vec![field << 3 | 1];
        out.extend_from_slice(&value.to_le_bytes());
        out
    }

    /// The `key_records` corpus: each input with the name the generator
    /// gives it before the check's outcome, and the outcome it must have.
    /// Every key is fixed, so it is regenerated exactly.
    fn key_records_cases() -> Vec<(String, Vec<u8>, String)> {
        use rand::SeedableRng;
        use wacore_libsignal::protocol::{
            GenericSignedPreKey, IdentityKey, IdentityKeyPair, KeyPair, PreKeyRecord, PrivateKey,
            SignedPreKeyRecord, Timestamp as SignalTimestamp,
        };

        let private = |seed: u8| PrivateKey::deserialize(&[seed; 32]).unwrap();
        let pair = |seed: u8| {
            let private_key = private(seed);
            KeyPair::new(private_key.public_key().unwrap(), private_key)
        };
        let identity = IdentityKeyPair::from(pair(0x11));
        assert_eq!(*identity.identity_key(), key_record_identity());
        let other = pair(0x22);
        let prekey = pair(0x33);
        let id = KEY_RECORD_PREKEY_ID;
        let id8 = u8::try_from(id).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let signature = identity
            .private_key()
            .calculate_signature(&prekey.public_key.serialize(), &mut rng)
            .unwrap();
        let timestamp = 1_767_225_600_000;
        let signed = |pair: &KeyPair, id: u32| {
            SignedPreKeyRecord::new(
                id.into(),
                SignalTimestamp::from_epoch_millis(timestamp),
                pair,
                &signature,
            )
            .serialize()
            .unwrap()
        };
        let one_time =
            |pair: &KeyPair, id: u32| PreKeyRecord::new(id.into(), pair).serialize().unwrap();

        let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
        let mut add = |kind: KeyRecord, name: &str, record: Vec<u8>, outcome: &'static str| {
            let mut bytes = vec![kind.tag()];
            bytes.extend(record);
            cases.push((format!("{}-{name}", kind.name()), bytes, outcome));
        };
        // Damaged copies of a real record: its last byte cut, a zero byte
        // after it, a bit flipped in its middle and its last byte.
        let damaged = |record: &[u8]| {
            let flip = |at: usize| {
                let mut v = record.to_vec();
                v[at] ^= 0x01;
                v
            };
            let mut trailing = record.to_vec();
            trailing.push(0);
            [
                ("truncated-last", record[..record.len() - 1].to_vec()),
                ("trailing-zero", trailing),
                ("flipped-middle", flip(record.len() / 2)),
                ("flipped-last", flip(record.len() - 1)),
            ]
        };

        // The identity record.
        let ident = KeyRecord::Identity;
        let real = encode_identity(0x1234, &identity).to_vec();
        let (ok, bad_id, bad_pair) = (
            "identity-ok",
            "identity-refused-identity-record",
            "identity-refused-identity-key-pair",
        );
        add(ident, "real", real.clone(), ok);
        add(
            ident,
            "real-largest-registration-id",
            encode_identity(0x3FFF, &identity).to_vec(),
            ok,
        );
        add(
            ident,
            "registration-id-zero",
            encode_identity(0, &identity).to_vec(),
            bad_id,
        );
        add(
            ident,
            "registration-id-past-14-bits",
            encode_identity(0x4000, &identity).to_vec(),
            bad_id,
        );
        add(
            ident,
            "registration-id-all-ones",
            encode_identity(u32::MAX, &identity).to_vec(),
            bad_id,
        );
        add(ident, "empty", Vec::new(), bad_id);
        add(
            ident,
            "registration-id-cut-short",
            real[..3].to_vec(),
            bad_id,
        );
        add(ident, "registration-id-only", real[..4].to_vec(), bad_pair);
        for (name, bytes) in damaged(&real) {
            add(
                ident,
                name,
                bytes,
                match name {
                    "flipped-middle" | "flipped-last" => bad_pair,
                    _ => "",
                },
            );
        }
        let public = identity.identity_key().serialize().to_vec();
        let secret = identity.private_key().serialize().to_vec();
        let fields = |parts: &[Vec<u8>]| {
            let mut v = 0x1234_u32.to_be_bytes().to_vec();
            v.extend(parts.concat());
            v
        };
        add(
            ident,
            "fields-swapped",
            fields(&[pb(2, &secret), pb(1, &public)]),
            ok,
        );
        let mut longer_public = public.clone();
        longer_public.push(0);
        add(
            ident,
            "public-key-with-a-trailing-byte",
            fields(&[pb(1, &longer_public), pb(2, &secret)]),
            ok,
        );
        add(
            ident,
            "without-private-key",
            fields(&[pb(1, &public)]),
            bad_pair,
        );
        add(
            ident,
            "without-public-key",
            fields(&[pb(2, &secret)]),
            bad_pair,
        );
        add(
            ident,
            "private-key-31-bytes",
            fields(&[pb(1, &public), pb(2, &secret[..31])]),
            bad_pair,
        );
        add(
            ident,
            "public-key-without-type",
            fields(&[pb(1, &public[1..]), pb(2, &secret)]),
            bad_pair,
        );
        let other_public = IdentityKey::new(other.public_key).serialize().to_vec();
        add(
            ident,
            "halves-of-two-pairs",
            fields(&[pb(1, &other_public), pb(2, &secret)]),
            bad_pair,
        );

        // The signed prekey record.
        let spk = KeyRecord::SignedPreKey;
        let (ok, bad) = ("signed-prekey-ok", "signed-prekey-refused-signed-prekey");
        let real = signed(&prekey, id);
        add(spk, "real", real.clone(), ok);
        add(spk, "another-id", signed(&prekey, id + 1), bad);
        add(spk, "empty", Vec::new(), bad);
        add(spk, "garbage-ff", vec![0xff; 64], bad);
        for (name, bytes) in damaged(&real) {
            add(spk, name, bytes, "");
        }
        let public = prekey.public_key.public_key_bytes().to_vec();
        let tagged = prekey.public_key.serialize().to_vec();
        let secret = prekey.private_key.serialize().to_vec();
        let signed_fields = |public: &[u8], secret: &[u8], signature: &[u8], with_time: bool| {
            let mut v = [
                pb_small(1, id8),
                pb(2, public),
                pb(3, secret),
                pb(4, signature),
            ]
            .concat();
            if with_time {
                v.extend(pb_fixed64(5, timestamp));
            }
            v
        };
        add(
            spk,
            "as-written",
            signed_fields(&public, &secret, &signature, true),
            ok,
        );
        add(
            spk,
            "public-key-in-the-33-byte-form",
            signed_fields(&tagged, &secret, &signature, true),
            ok,
        );
        add(
            spk,
            "without-timestamp",
            signed_fields(&public, &secret, &signature, false),
            bad,
        );
        add(
            spk,
            "signature-63-bytes",
            signed_fields(&public, &secret, &signature[..63], true),
            bad,
        );
        let foreign = other
            .private_key
            .calculate_signature(&prekey.public_key.serialize(), &mut rng)
            .unwrap();
        add(
            spk,
            "signed-by-another-identity",
            signed_fields(&public, &secret, &foreign, true),
            bad,
        );
        let every_field = [
            pb_small(1, id8),
            pb(2, &public),
            pb(3, &secret),
            pb(4, &signature),
            pb_fixed64(5, timestamp),
        ];
        for (name, field) in [
            ("without-signature", 3),
            ("without-private-key", 2),
            ("without-id", 0),
        ] {
            let mut fields = every_field.to_vec();
            fields.remove(field);
            add(spk, name, fields.concat(), bad);
        }
        add(
            spk,
            "private-key-31-bytes",
            signed_fields(&public, &secret[..31], &signature, true),
            bad,
        );
        add(
            spk,
            "halves-of-two-pairs",
            signed_fields(
                other.public_key.public_key_bytes(),
                &secret,
                &signature,
                true,
            ),
            bad,
        );

        // The one-time prekey record.
        let otk = KeyRecord::OneTimePreKey;
        let (ok, bad) = (
            "one-time-prekey-ok",
            "one-time-prekey-refused-one-time-prekey",
        );
        let real = one_time(&prekey, id);
        add(otk, "real", real.clone(), ok);
        add(otk, "another-id", one_time(&prekey, id + 1), bad);
        add(otk, "empty", Vec::new(), bad);
        add(otk, "garbage-ff", vec![0xff; 64], bad);
        for (name, bytes) in damaged(&real) {
            add(otk, name, bytes, "");
        }
        add(
            otk,
            "as-written",
            [pb_small(1, id8), pb(2, &public), pb(3, &secret)].concat(),
            ok,
        );
        add(
            otk,
            "fields-reversed",
            [pb(3, &secret), pb(2, &public), pb_small(1, id8)].concat(),
            ok,
        );
        add(
            otk,
            "public-key-in-the-33-byte-form",
            [pb_small(1, id8), pb(2, &tagged), pb(3, &secret)].concat(),
            ok,
        );
        add(
            otk,
            "without-private-key",
            [pb_small(1, id8), pb(2, &public)].concat(),
            bad,
        );
        add(
            otk,
            "without-public-key",
            [pb_small(1, id8), pb(3, &secret)].concat(),
            bad,
        );
        add(
            otk,
            "without-id",
            [pb(2, &public), pb(3, &secret)].concat(),
            bad,
        );
        add(
            otk,
            "private-key-31-bytes",
            [pb_small(1, id8), pb(2, &public), pb(3, &secret[..31])].concat(),
            bad,
        );
        add(
            otk,
            "halves-of-two-pairs",
            [
                pb_small(1, id8),
                pb(2, other.public_key.public_key_bytes()),
                pb(3, &secret),
            ]
            .concat(),
            bad,
        );

        // The local provider's blob.
        let blob = KeyRecord::ProviderBlob;
        let (ok, bad) = ("provider-blob-ok", "provider-blob-refused-unwrap");
        let provider = fixture_provider();
        let context = fixture_kek_context();
        let kek = SecretKey::from_bytes(&mut [0x6b; SecretKey::LEN]);
        let real = provider
            .wrap_with_nonce(&[0x0c; 12], &context, &kek)
            .unwrap();
        add(blob, "real", real.clone(), ok);
        for (name, bytes) in damaged(&real) {
            add(blob, name, bytes, bad);
        }
        add(blob, "empty", Vec::new(), bad);
        add(blob, "version-only", vec![1], bad);
        let mut version_2 = real.clone();
        version_2[0] = 2;
        add(blob, "version-2", version_2, bad);
        let other_version = KekContext {
            version: FIXTURE_KEK_VERSION + 1,
            ..context
        };
        add(
            blob,
            "wrapped-for-another-version",
            provider
                .wrap_with_nonce(&[0x0c; 12], &other_version, &kek)
                .unwrap(),
            bad,
        );
        let foreign = LocalKeyProvider::new(&SecretKey::from_bytes(&mut [0x53; SecretKey::LEN]));
        add(
            blob,
            "another-root",
            foreign
                .wrap_with_nonce(&[0x0c; 12], &context, &kek)
                .unwrap(),
            bad,
        );

        // A wrapped key's blob.
        let wrapped = KeyRecord::WrappedKey;
        let (ok, bad) = ("wrapped-key-ok", "wrapped-key-refused-unwrap");
        let fixture = fixture_kek();
        let seal = |id: KeyId, kek: &Kek, secret: &[u8]| {
            WrappedKey::seal_with_nonce(id, kek, &[0x0d; 12], secret)
                .unwrap()
                .blob
        };
        let real = seal(fixture_key_id(), &fixture, &one_time(&prekey, id));
        add(wrapped, "real", real.clone(), ok);
        add(
            wrapped,
            "real-empty-secret",
            seal(fixture_key_id(), &fixture, &[]),
            ok,
        );
        for (name, bytes) in damaged(&real) {
            add(wrapped, name, bytes, bad);
        }
        add(wrapped, "empty", Vec::new(), bad);
        add(wrapped, "nonce-cut-short", real[..11].to_vec(), bad);
        add(wrapped, "nonce-only", real[..12].to_vec(), bad);
        add(wrapped, "tag-cut-short", real[..27].to_vec(), bad);
        let moved = KeyId {
            id: u64::from(id) + 1,
            ..fixture_key_id()
        };
        add(
            wrapped,
            "wrapped-as-another-key",
            seal(moved, &fixture, b"secret"),
            bad,
        );
        let newer = Kek::new(
            FIXTURE_KEK_VERSION + 1,
            &SecretKey::from_bytes(&mut [0x4b; SecretKey::LEN]),
        );
        add(
            wrapped,
            "wrapped-under-another-version",
            seal(fixture_key_id(), &newer, b"secret"),
            bad,
        );

        // No record.
        cases.push(("empty".to_owned(), Vec::new(), "no-record"));
        cases.push(("tag-5".to_owned(), vec![5, 0], "no-record"));
        cases.push(("tag-ff".to_owned(), vec![0xff; 8], "no-record"));

        cases
            .into_iter()
            .map(|(name, bytes, expected)| {
                let outcome = spell_key_record(key_records(&bytes));
                if !expected.is_empty() {
                    assert_eq!(outcome, expected, "{name}");
                }
                (format!("{outcome}--{name}"), bytes, outcome)
            })
            .collect()
    }

    /// Rewrite `target`'s generated corpus files (those named with `--`)
    /// as `cases`, the inputs a fuzzer saved left alone.
    fn write_corpus(target: &str, cases: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        if dir.exists() {
            for file in std::fs::read_dir(&dir).unwrap() {
                let path = file.unwrap().path();
                if path.file_name().unwrap().to_string_lossy().contains("--") {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in cases {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// `target`'s named files on disk are exactly `cases`: none missing,
    /// changed or left over (files without `--`, inputs a fuzzer saved,
    /// are the replay's alone). `writer` is the test that rewrites them.
    fn assert_corpus_is(
        target: &str,
        cases: impl IntoIterator<Item = (String, Vec<u8>)>,
        writer: &str,
    ) {
        let run = format!("run `cargo test --all-features --lib {writer} -- --ignored`");
        let on_disk: std::collections::BTreeMap<String, Vec<u8>> = corpus(target)
            .into_iter()
            .filter(|(_, expected, _)| expected.is_some())
            .map(|(name, _, bytes)| (name, bytes))
            .collect();
        let generated: std::collections::BTreeMap<String, Vec<u8>> = cases.into_iter().collect();
        assert_eq!(
            on_disk.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{run}"
        );
        for (name, bytes) in &generated {
            assert_eq!(on_disk[name], *bytes, "{name}: {run}");
        }
    }

    /// Rewrite the `key_records` corpus from [`key_records_cases`]. Run by
    /// hand after a deliberate change:
    /// `cargo test --all-features --lib write_key_records_corpus -- --ignored`.
    #[test]
    #[ignore = "rewrites fuzz/corpus; run by hand"]
    fn write_key_records_corpus() {
        let cases = key_records_cases().into_iter();
        write_corpus("key_records", cases.map(|(name, bytes, _)| (name, bytes)));
    }

    #[test]
    fn key_records_corpus_replays_with_the_expected_results() {
        let mut decoded = std::collections::BTreeMap::<String, usize>::new();
        let mut refused = std::collections::BTreeMap::<String, usize>::new();
        replay("key_records", |bytes| {
            let outcome = key_records(bytes);
            if let Some((kind, result)) = outcome {
                let counts = if result.is_ok() {
                    &mut decoded
                } else {
                    &mut refused
                };
                *counts.entry(kind.name().to_owned()).or_default() += 1;
            }
            spell_key_record(outcome)
        });
        for kind in KeyRecord::ALL {
            let (ok, bad) = (
                decoded.get(kind.name()).copied().unwrap_or(0),
                refused.get(kind.name()).copied().unwrap_or(0),
            );
            assert!(
                ok >= 1 && bad >= 8,
                "{}: {ok} that decode, {bad} refused",
                kind.name()
            );
        }
    }

    /// The named files on disk are exactly what [`key_records_cases`]
    /// makes.
    #[test]
    fn key_records_corpus_on_disk_is_what_the_generator_makes() {
        let cases = key_records_cases().into_iter();
        assert_corpus_is(
            "key_records",
            cases.map(|(name, bytes, _)| (name, bytes)),
            "write_key_records_corpus",
        );
    }

    /// The bytes [`row_values`] reads as `values` (a text read back marked).
    #[cfg(feature = "sqlite")]
    fn row_bytes(values: &[rusqlite::types::Value]) -> Vec<u8> {
        use rusqlite::types::Value;
        let mut bytes = Vec::new();
        for value in values {
            match value {
                Value::Null => bytes.push(0),
                Value::Integer(v) => bytes.extend([&[1][..], &v.to_be_bytes()].concat()),
                Value::Real(v) => bytes.extend([&[2][..], &v.to_be_bytes()].concat()),
                Value::Text(t) => {
                    bytes.extend([3, u8::try_from(t.len()).unwrap()]);
                    bytes.extend(t.as_bytes());
                }
                Value::Blob(b) => {
                    bytes.extend([4, u8::try_from(b.len()).unwrap()]);
                    bytes.extend(b);
                }
            }
        }
        bytes
    }

    /// The `message_row` corpus: rows as the store writes them, and each
    /// column given a value of another type, or of its type but one the
    /// store never writes; each input named by the check's outcome and
    /// what was done to the row.
    #[cfg(feature = "sqlite")]
    fn message_row_cases() -> Vec<(String, Vec<u8>)> {
        use rusqlite::types::Value::{self, Blob, Integer, Null, Real, Text};
        let column = |name: &str| {
            crate::store::MESSAGE_COLUMNS
                .iter()
                .position(|c| *c == name)
                .unwrap()
        };
        // An inbound message, delivered: as `PutMessage` writes it (biased
        // integers, codes, 16-byte ids).
        let inbound: Vec<Value> = vec![
            Integer(1 ^ i64::MIN),
            Blob(vec![7; 16]),
            Integer(1),
            Blob(vec![9; 16]),
            Integer(1_700_000_000_000 ^ i64::MIN),
            Integer(1_702_592_000_000 ^ i64::MIN),
            Integer(1_702_598_400_000 ^ i64::MIN),
            Integer(2),
            Null,
            Integer(1),
            Null,
            Integer(i64::MIN),
            Blob(b"sealed".to_vec()),
            Integer(i64::MIN),
            Null,
            Null,
        ];
        let with = |changes: &[(&str, Value)]| {
            let mut row = inbound.clone();
            for (name, value) in changes {
                row[column(name)] = value.clone();
            }
            row
        };
        let mut rows = vec![
            ("inbound-delivered".to_owned(), inbound.clone()),
            (
                "outbound-failed-report-pending".to_owned(),
                with(&[
                    ("direction", Integer(2)),
                    ("status", Integer(4)),
                    ("failure", Integer(4)),
                    ("attempts", Integer(7)),
                    ("next_attempt", Integer(1_700_000_060_000 ^ i64::MIN)),
                    ("pending_devices", Integer(5 ^ i64::MIN)),
                    ("accepted_by", Integer(0x1234 ^ i64::MIN)),
                ]),
            ),
            (
                "outbound-sent-devices-pending".to_owned(),
                with(&[
                    ("direction", Integer(2)),
                    ("status", Integer(1)),
                    ("attempts", Integer(3)),
                    ("next_attempt", Integer(1_700_000_008_000 ^ i64::MIN)),
                    ("pending_devices", Integer(2 ^ i64::MIN)),
                    ("accepted_by", Integer(0x1234 ^ i64::MIN)),
                    ("overdue_at", Integer(1_700_003_600_000 ^ i64::MIN)),
                ]),
            ),
            (
                "outbound-delivered-told-devices-pending".to_owned(),
                with(&[
                    ("direction", Integer(2)),
                    ("status", Integer(2)),
                    ("attempts", Integer(2)),
                    ("next_attempt", Integer(1_700_000_004_000 ^ i64::MIN)),
                    ("pending_devices", Integer(2 ^ i64::MIN)),
                    ("accepted_by", Integer(0x1234 ^ i64::MIN)),
                    ("told", Integer(2)),
                ]),
            ),
            (
                "extremes".to_owned(),
                with(&[
                    ("business", Integer(i64::MAX)),
                    ("created", Integer(i64::MIN)),
                    ("expiry", Integer(i64::MAX)),
                    ("attempts", Integer(u32::MAX.into())),
                    ("pending_devices", Integer(-1)),
                    ("sealed", Blob(Vec::new())),
                ]),
            ),
            ("empty".to_owned(), Vec::new()),
        ];
        let damaged: &[(&str, &str, Value)] = &[
            ("business", "zero", Integer(i64::MIN)),
            ("business", "text", Text(String::new())),
            ("id", "15-bytes", Blob(vec![7; 15])),
            ("id", "null", Null),
            ("direction", "code-0", Integer(0)),
            ("direction", "code-3", Integer(3)),
            ("phone", "17-bytes", Blob(vec![9; 17])),
            ("phone", "integer", Integer(9)),
            ("created", "real", Real(1.5)),
            ("expiry", "text", Text("soon".to_owned())),
            ("epoch", "null", Null),
            ("status", "code-5", Integer(5)),
            ("status", "negative", Integer(-1)),
            ("failure", "code-0", Integer(0)),
            ("failure", "code-7", Integer(7)),
            ("failure", "past-a-byte", Integer(257)),
            ("attempts", "negative", Integer(-1)),
            ("attempts", "past-u32", Integer(1 << 32)),
            ("next_attempt", "real", Real(0.0)),
            ("pending_devices", "blob", Blob(vec![0; 8])),
            ("sealed", "null", Null),
            ("sealed", "text", Text("body".to_owned())),
            ("sealed", "integer", Integer(0)),
            ("accepted_by", "null", Null),
            ("overdue_at", "text", Text("later".to_owned())),
            ("overdue_at", "real", Real(2.5)),
            ("told", "code-5", Integer(5)),
            ("told", "text", Text("delivered".to_owned())),
        ];
        for (name, what, value) in damaged {
            rows.push((format!("{name}-{what}"), with(&[(name, value.clone())])));
        }
        rows.push((
            "status-and-business-both".to_owned(),
            with(&[("status", Integer(9)), ("business", Null)]),
        ));
        // A NaN bound is stored as null (the fuzzer's first find: the
        // check compared the row read back with the NaN it was given).
        rows.push((
            "nan-stored-as-null".to_owned(),
            with(&[("failure", Real(f64::NAN))]),
        ));
        rows.into_iter()
            .map(|(name, row)| {
                let bytes = row_bytes(&row);
                (format!("{}--{name}", message_row(&bytes)), bytes)
            })
            .collect()
    }

    /// Rewrite the `message_row` corpus from [`message_row_cases`]. Run by
    /// hand after a deliberate change:
    /// `cargo test --all-features --lib write_message_row_corpus -- --ignored`.
    #[cfg(feature = "sqlite")]
    #[test]
    #[ignore = "rewrites fuzz/corpus; run by hand"]
    fn write_message_row_corpus() {
        write_corpus("message_row", message_row_cases());
    }

    /// The named `message_row` files are what [`message_row_cases`] makes,
    /// and each damaged row is refused for the column that was damaged (a
    /// row refused for another would test nothing).
    #[cfg(feature = "sqlite")]
    #[test]
    fn message_row_corpus_on_disk_is_what_the_generator_makes() {
        let cases = message_row_cases();
        for (name, _) in &cases {
            let (outcome, what) = name.split_once("--").unwrap();
            let intended = crate::store::MESSAGE_COLUMNS
                .iter()
                .find(|c| what.starts_with(&format!("{c}-")));
            match intended {
                Some(_) if what.ends_with("-both") => assert_eq!(outcome, "business", "{name}"),
                Some(column) => assert_eq!(outcome, *column, "{name}"),
                None if what == "empty" => assert_eq!(outcome, "business", "{name}"),
                None => assert_eq!(outcome, "row", "{name}"),
            }
        }
        assert_corpus_is("message_row", cases, "write_message_row_corpus");
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn message_row_corpus_replays_with_the_expected_results() {
        replay("message_row", |bytes| message_row(bytes).to_owned());
    }

    /// Each refused file in the policy corpus is refused for the reason it
    /// was written for, by the loader it was written for (a file refused
    /// earlier, by a slip, would test nothing): its named refusal is in
    /// that loader's error.
    #[test]
    fn policy_file_corpus_refusals_are_the_intended_ones() {
        use crate::retention::RetentionPolicy;
        let intended = [
            ("advertising.json", "visibility-json", "advertising"),
            ("bad-region.toml", "retention-toml", "business.1.region"),
            (
                "business-past-ceiling.json",
                "retention-json",
                "business.9.outbound",
            ),
            ("business-zero.toml", "retention-toml", "business.0"),
            (
                "content-to-transport.toml",
                "visibility-toml",
                "allow[0].purposes[0]",
            ),
            (
                "duplicate-business.json",
                "retention-json",
                "configured twice",
            ),
            ("duplicate-entry.toml", "visibility-toml", "allow[1]"),
            (
                "duplicate-purpose.toml",
                "visibility-toml",
                "allow[0].purposes[1]",
            ),
            (
                "in-use-ttl-past-ceiling.json",
                "retention-json",
                "in_use_ttl",
            ),
            ("no-purposes.json", "visibility-json", "allow[0].purposes"),
            ("not-utf8", "", ""),
            ("overflowing-duration.toml", "retention-toml", "too long"),
            ("retention-past-ceiling.toml", "retention-toml", "retention"),
            ("revision-0.json", "visibility-json", "revision"),
            ("revision-0.toml", "visibility-toml", "revision"),
            ("unknown-class.toml", "visibility-toml", "allow[0].class"),
            ("unknown-field.toml", "visibility-toml", "extra"),
            ("zero-epoch.toml", "retention-toml", "epoch"),
        ];
        let refused: Vec<_> = corpus("policy_file")
            .into_iter()
            .filter_map(|(name, _, bytes)| Some((name.strip_prefix("none--")?.to_owned(), bytes)))
            .collect();
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        let listed: Vec<&str> = intended.iter().map(|(n, ..)| *n).collect();
        assert_eq!(names, listed, "every refused file names its refusal here");
        for ((name, bytes), (_, loader, why)) in refused.iter().zip(intended) {
            let Ok(text) = std::str::from_utf8(bytes) else {
                assert_eq!(loader, "", "{name}");
                continue;
            };
            let error = match loader {
                "visibility-toml" => VisibilityPolicy::from_toml(text)
                    .err()
                    .map(|e| e.to_string()),
                "visibility-json" => VisibilityPolicy::from_json(text)
                    .err()
                    .map(|e| e.to_string()),
                "retention-toml" => RetentionPolicy::from_toml(text)
                    .err()
                    .map(|e| e.to_string()),
                "retention-json" => RetentionPolicy::from_json(text)
                    .err()
                    .map(|e| e.to_string()),
                other => panic!("{name}: no loader {other}"),
            };
            let error = error.unwrap_or_else(|| panic!("{name}: {loader} accepted it"));
            assert!(
                error.contains(why),
                "{name}: {loader} refused it for another reason: {error}"
            );
        }
    }

    #[test]
    fn policy_file_corpus_replays_with_the_expected_results() {
        replay("policy_file", |bytes| {
            let loads = policy_file(bytes);
            spell(&[
                (loads.visibility_toml, "visibility-toml"),
                (loads.visibility_json, "visibility-json"),
                (loads.retention_toml, "retention-toml"),
                (loads.retention_json, "retention-json"),
            ])
        });
    }

    /// What [`audit_line`] made of a line, as the corpus names it: the
    /// entry's kind, or `cut`, `shape` or `json` for why it is none.
    fn spell_audit_line(outcome: &Result<TrailEntry, TrailError>) -> String {
        match outcome {
            Ok(TrailEntry::Decision(_)) => "decision",
            Ok(TrailEntry::Hold(_)) => "hold",
            Ok(TrailEntry::Change(_)) => "change",
            Err(TrailError::Unreadable { what, .. }) => match *what {
                "a line cut short" => "cut",
                "not the shape of an entry" => "shape",
                "not a JSON object" => "json",
                other => panic!("an unreadable line of no known kind: {other}"),
            },
            Err(e) => panic!("{e}"),
        }
        .to_owned()
    }

    /// The `audit_line` corpus: lines a sink writes of every kind, old
    /// trails' lines, lines cut short, and lines that are no entry, each
    /// with its expected outcome.
    fn audit_line_cases() -> Vec<(String, Vec<u8>)> {
        use crate::store::HoldScope;
        use crate::visibility::{
            Change, DataClass, Decision, DenyReason, HoldAction, HoldEvent, Party, Purpose,
            Revision, Verdict,
        };

        let business = fixture_business();
        let at = Timestamp::from_millis(1_767_225_600_000);
        let decision = |verdict, reason, business| Decision {
            at,
            id: DecisionId::new(0x0123_4567_89ab_cdef, 42),
            revision: Revision::PUBLISHED,
            party: Party::Business,
            class: DataClass::ConsumerPhoneNumber,
            purpose: Purpose::Delivery,
            verdict,
            reason,
            business,
        };
        let hold = |action, scope| HoldEvent {
            at,
            principal: "operator".into(),
            action,
            scope,
            reference: "case \"7\" \u{e9}".into(),
        };
        let line = |entry: TrailEntry| {
            let sink = JsonLinesSink::new(Vec::new(), FlushPolicy::EveryEvent);
            match &entry {
                TrailEntry::Decision(d) => sink.record(d),
                TrailEntry::Hold(h) => sink.record_hold(h),
                TrailEntry::Change(c) => sink.record_change(c),
            }
            .unwrap();
            sink.into_inner().unwrap()
        };
        let allow = line(TrailEntry::Decision(decision(
            Verdict::Allow,
            None,
            Some(business),
        )));
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("decision--allow", allow.clone()),
            (
                "decision--deny-audit-failed",
                line(TrailEntry::Decision(decision(
                    Verdict::Deny,
                    Some(DenyReason::AuditFailed),
                    Some(business),
                ))),
            ),
            (
                "decision--of-no-business",
                line(TrailEntry::Decision(decision(
                    Verdict::Deny,
                    Some(DenyReason::NotOptedIn),
                    None,
                ))),
            ),
            (
                "hold--placed-on-a-consumer",
                line(TrailEntry::Hold(hold(
                    HoldAction::Placed,
                    HoldScope::Consumer(business, PhoneHash::from_bytes([0xa5; 16])),
                ))),
            ),
            (
                "hold--released-on-a-business",
                line(TrailEntry::Hold(hold(
                    HoldAction::Released,
                    HoldScope::Business(business),
                ))),
            ),
            (
                "change--shred",
                line(TrailEntry::Change(Change::Shred {
                    at,
                    principal: "operator".into(),
                    business,
                    epoch_end: at,
                    reference: "erasure request".into(),
                })),
            ),
            (
                "change--policy",
                line(TrailEntry::Change(Change::Policy {
                    at,
                    principal: "ops".into(),
                    revision: Revision::MAX,
                    digest: "00ff".into(),
                })),
            ),
            (
                "change--start",
                line(TrailEntry::Change(Change::Start {
                    at,
                    revision: Revision::PUBLISHED,
                    visibility: "ab".into(),
                    retention: "cd".into(),
                })),
            ),
            (
                "change--opt-in",
                line(TrailEntry::Change(Change::OptIn {
                    at,
                    principal: "business admin".into(),
                    business,
                    enabled: true,
                })),
            ),
            (
                "change--retention-without-its-end",
                br#"{"admin":{"change":"retention","at":1,"principal":"ops","digest":"ab"}}"#
                    .to_vec(),
            ),
            // Trails written before holds and shreds named who asked.
            (
                "hold--hold-of-an-old-trail",
                text(&line(TrailEntry::Hold(hold(
                    HoldAction::Placed,
                    HoldScope::Business(business),
                ))))
                .replace(r#""principal":"operator","#, "")
                .into_bytes(),
            ),
            (
                "change--shred-of-an-old-trail",
                format!(
                    r#"{{"admin":{{"change":"shred","at":5,"business":{business},"epoch_end":9,"reference":"r"}}}}"#
                )
                .into_bytes(),
            ),
            // Lines a failure cut, as the sink ends them.
            ("cut--cut-in-a-decision", [&allow[..40], b" <cut>\n"].concat()),
            (
                "cut--cut-before-its-newline",
                [&allow[..allow.len() - 1], b" <cut>\n"].concat(),
            ),
            ("cut--cut-on-a-whole-file", b" <cut>\n".to_vec()),
            (
                "cut--cut-in-a-tag",
                [&br#"{"hold":{"at":1"#[..], b" <cut>"].concat(),
            ),
            // No entry.
            (
                "shape--unknown-party",
                text(&allow)
                    .replace(r#""party":"business""#, r#""party":"stranger""#)
                    .into_bytes(),
            ),
            (
                "shape--without-a-verdict",
                text(&allow).replace(r#","verdict":"allow""#, "").into_bytes(),
            ),
            (
                "shape--a-field-twice",
                text(&allow).replacen("{", r#"{"at":1,"#, 1).into_bytes(),
            ),
            (
                "shape--bad-decision-id",
                text(&allow).replace("-000000000000002a", "-2a").into_bytes(),
            ),
            ("shape--unknown-tag", br#"{"hold":{},"admin":{}}"#.to_vec()),
            // Lines no sink writes.
            (
                "shape--a-field-no-decision-has",
                text(&allow)
                    .replace(r#""at":"#, r#""phone":"+447700900123","at":"#)
                    .into_bytes(),
            ),
            (
                "shape--allowed-with-a-reason",
                text(&allow)
                    .replace(r#""verdict":"allow""#, r#""verdict":"allow","reason":"policy""#)
                    .into_bytes(),
            ),
            (
                "shape--denied-without-a-reason",
                text(&allow)
                    .replace(r#""verdict":"allow""#, r#""verdict":"deny""#)
                    .into_bytes(),
            ),
            (
                "shape--a-field-no-hold-has",
                text(&line(TrailEntry::Hold(hold(
                    HoldAction::Placed,
                    HoldScope::Business(business),
                ))))
                .replace(r#""action":"#, r#""number":"+447700900123","action":"#)
                .into_bytes(),
            ),
            (
                "shape--a-field-no-change-has",
                br#"{"admin":{"change":"retention","at":1,"principal":"ops","digest":"ab","extra":1}}"#
                    .to_vec(),
            ),
            ("shape--empty-hold", br#"{"hold":{}}"#.to_vec()),
            (
                "shape--two-tags",
                text(&line(TrailEntry::Hold(hold(
                    HoldAction::Placed,
                    HoldScope::Business(business),
                ))))
                .replace("}}\n", r#"},"admin":{"change":"start"}}"#)
                .into_bytes(),
            ),
            ("json--empty", Vec::new()),
            ("json--not-json", b"release allowed\n".to_vec()),
            (
                "json--an-array",
                br#"[1,"0123456789abcdef-000000000000002a",0,"business","consumer_phone_number","delivery","allow",null,null]"#.to_vec(),
            ),
            ("json--after-its-end", [&allow[..allow.len() - 1], b"x\n"].concat()),
            ("json--not-utf-8", b"{\"at\":\xff}".to_vec()),
        ];
        cases.sort_by(|a, b| a.0.cmp(b.0));
        cases
            .into_iter()
            .map(|(name, bytes)| {
                let outcome = spell_audit_line(&audit_line(&bytes));
                assert_eq!(
                    name.split_once("--").map(|n| n.0),
                    Some(&*outcome),
                    "{name}"
                );
                (name.to_owned(), bytes)
            })
            .collect()
    }

    /// Rewrite the `audit_line` corpus from [`audit_line_cases`]:
    /// `cargo test --all-features --lib write_audit_line_corpus -- --ignored`.
    #[test]
    #[ignore = "rewrites fuzz/corpus; run by hand"]
    fn write_audit_line_corpus() {
        write_corpus("audit_line", audit_line_cases());
    }

    #[test]
    fn audit_line_corpus_on_disk_is_what_the_generator_makes() {
        assert_corpus_is("audit_line", audit_line_cases(), "write_audit_line_corpus");
    }

    proptest::proptest! {
        /// The corpus's lines changed at random (bytes overwritten, cut
        /// out, put in): [`audit_line`]'s checks hold on every one, so a
        /// plain `cargo test` fuzzes the reader a little beyond its corpus.
        #[test]
        fn audit_lines_changed_at_random_keep_the_checks(
            file: proptest::sample::Index,
            edits in proptest::collection::vec(
                (0u8..3, proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..6,
            ),
        ) {
            static LINES: std::sync::LazyLock<Vec<(String, Vec<u8>)>> =
                std::sync::LazyLock::new(audit_line_cases);
            let mut line = LINES[file.index(LINES.len())].1.clone();
            for (kind, at, byte) in edits {
                let at = at.index(line.len() + 1);
                match kind {
                    0 if at < line.len() => line[at] = byte,
                    1 if at < line.len() => {
                        line.remove(at);
                    }
                    _ => line.insert(at, byte),
                }
            }
            let _ = audit_line(&line);
        }
    }

    #[test]
    fn audit_line_corpus_replays_with_the_expected_results() {
        let mut kinds = std::collections::BTreeSet::new();
        replay("audit_line", |bytes| {
            let outcome = spell_audit_line(&audit_line(bytes));
            kinds.insert(outcome.clone());
            outcome
        });
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["change", "cut", "decision", "hold", "json", "shape"],
            "the corpus lacks an outcome"
        );
    }

    /// A [`prekey_bundle`] outcome as the corpus names it: `ok`,
    /// `untrusted`, or `bad-` and the reason.
    fn spell_bundle(outcome: &Result<(), SignalError>) -> String {
        match outcome {
            Ok(()) => "ok".to_owned(),
            Err(SignalError::UntrustedIdentity { .. }) => "untrusted".to_owned(),
            Err(SignalError::BadBundle(why)) => format!("bad-{}", why.replace([' ', '\''], "-")),
            Err(other) => panic!("{other:?}"),
        }
    }

    /// The `prekey_bundle` corpus: the fixture device's bundles, one with
    /// another identity, and one for each refusal.
    fn prekey_bundle_cases() -> Vec<(String, Vec<u8>)> {
        let known = fixture_device_bundle(true);
        let signed_by = |mut bundle: PreKeyBundle, byte: u8| {
            let key = PrivateKey::deserialize(&[byte; 32]).unwrap();
            bundle
                .identity_key
                .copy_from_slice(&key.public_key().unwrap().serialize());
            bundle.signed_prekey.signature = key
                .calculate_signature(&bundle.signed_prekey.public_key, &mut crate::rng::OsRng)
                .unwrap();
            bundle
        };
        let with = |change: &dyn Fn(&mut PreKeyBundle)| {
            let mut bundle = known;
            change(&mut bundle);
            bundle_bytes(&bundle)
        };
        // The field's prime, 2^255 - 19, little-endian: a u-coordinate no
        // key has, in the encoding the library would reduce.
        let mut prime = [0xff; 33];
        prime[0] = 0x05;
        prime[1] = 0xed;
        prime[32] = 0x7f;
        let mut zero = [0; 33];
        zero[0] = 0x05;
        let mut untyped = known.identity_key;
        untyped[0] = 0x06;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("ok--the-device", bundle_bytes(&known)),
            (
                "ok--the-device-without-a-one-time-prekey",
                bundle_bytes(&fixture_device_bundle(false)),
            ),
            (
                "ok--ids-at-their-largest",
                with(&|b| {
                    b.registration_id = u32::MAX;
                    b.signed_prekey.id = 0x00ff_ffff;
                    if let Some(k) = &mut b.one_time_prekey {
                        k.id = 0x00ff_ffff;
                    }
                }),
            ),
            (
                "untrusted--another-identity",
                bundle_bytes(&signed_by(known, 0x31)),
            ),
            (
                "bad-signed-prekey-signature-does-not-verify--a-bit-flipped",
                with(&|b| {
                    b.signed_prekey.signature[10] ^= 1;
                }),
            ),
            (
                "bad-signed-prekey-signature-does-not-verify--signed-by-another",
                {
                    let mut bundle = signed_by(known, 0x31);
                    bundle.identity_key = known.identity_key;
                    bundle_bytes(&bundle)
                },
            ),
            (
                "bad-signed-prekey-signature-does-not-verify--another-signed-prekey",
                with(&|b| {
                    b.signed_prekey.public_key = b.one_time_prekey.unwrap().public_key;
                }),
            ),
            (
                // The library asks whether an identity is trusted before it
                // checks the signature: such a bundle was taken for the
                // device presenting a new identity (`UntrustedIdentity`).
                "bad-signed-prekey-signature-does-not-verify--another-identity-unsigned",
                with(&|b| b.identity_key = signed_by(known, 0x31).identity_key),
            ),
            (
                "bad-the-bundle-is-another-device-s--device-2",
                with(&|b| b.device_id = 2),
            ),
            ("bad-the-bundle-is-another-device-s--empty", Vec::new()),
            (
                "bad-identity-key-is-not-a-valid-public-key--untyped",
                with(&|b| {
                    b.identity_key = untyped;
                }),
            ),
            (
                "bad-identity-key-is-not-a-valid-public-key--of-small-order",
                with(&|b| {
                    b.identity_key = zero;
                }),
            ),
            (
                "bad-identity-key-is-not-a-valid-public-key--not-reduced",
                with(&|b| {
                    b.identity_key = prime;
                }),
            ),
            (
                "bad-signed-prekey-is-not-a-valid-public-key--of-small-order",
                with(&|b| {
                    b.signed_prekey.public_key = zero;
                }),
            ),
            (
                "bad-one-time-prekey-is-not-a-valid-public-key--not-reduced",
                with(&|b| {
                    if let Some(k) = &mut b.one_time_prekey {
                        k.public_key = prime;
                    }
                }),
            ),
            ("bad-signed-prekey-is-not-a-valid-public-key--cut-short", {
                let mut bytes = bundle_bytes(&known);
                bytes[4..8].copy_from_slice(&known.device_id.to_be_bytes());
                bytes.truncate(20);
                bytes
            }),
        ];
        cases
            .into_iter()
            .map(|(name, bytes)| {
                let outcome = spell_bundle(&prekey_bundle(&bytes));
                assert_eq!(
                    name.split_once("--").map(|n| n.0),
                    Some(&*outcome),
                    "{name}"
                );
                (name.to_owned(), bytes)
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(48))]
        /// The corpus's bundles with bytes changed at random, mostly in the
        /// ids, where a change keeps the keys usable and the signature good:
        /// [`prekey_bundle`]'s checks hold on every one.
        #[test]
        fn bundles_changed_at_random_keep_the_checks(
            file: proptest::sample::Index,
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
                1..4,
            ),
        ) {
            static BUNDLES: std::sync::LazyLock<Vec<(String, Vec<u8>)>> =
                std::sync::LazyLock::new(prekey_bundle_cases);
            let mut bytes = BUNDLES[file.index(BUNDLES.len())].1.clone();
            for (at, byte, in_an_id) in edits {
                // The ids: the registration and device ids, the signed and
                // one-time prekeys' ids.
                let ids = [0, 1, 2, 3, 4, 5, 6, 7, 41, 42, 43, 44, 142, 143, 144, 145];
                let at = if in_an_id { ids[at.index(ids.len())] } else { at.index(BUNDLE_LEN + ONE_TIME_LEN) };
                if let Some(b) = bytes.get_mut(at) {
                    *b = byte;
                }
            }
            let _ = prekey_bundle(&bytes);
        }
    }

    /// Rewrite the `prekey_bundle` corpus from [`prekey_bundle_cases`]:
    /// `cargo test --all-features --lib write_prekey_bundle_corpus -- --ignored`.
    /// The signatures are drawn anew each time, so every rewrite changes the
    /// files that carry one.
    #[test]
    #[ignore = "rewrites fuzz/corpus; run by hand"]
    fn write_prekey_bundle_corpus() {
        write_corpus("prekey_bundle", prekey_bundle_cases());
    }

    #[test]
    fn prekey_bundle_corpus_replays_with_the_expected_results() {
        let mut outcomes = std::collections::BTreeSet::new();
        replay("prekey_bundle", |bytes| {
            let outcome = spell_bundle(&prekey_bundle(bytes));
            outcomes.insert(outcome.clone());
            outcome
        });
        assert!(outcomes.contains("ok") && outcomes.contains("untrusted"));
        assert!(outcomes.len() >= 6, "too few refusals: {outcomes:?}");
    }

    /// The generator's cases keep their outcomes (their signatures are
    /// drawn anew, so the files on disk are compared by name only).
    #[test]
    fn prekey_bundle_cases_keep_their_outcomes() {
        let on_disk: std::collections::BTreeSet<String> = corpus("prekey_bundle")
            .into_iter()
            .filter(|(_, expected, _)| expected.is_some())
            .map(|(name, _, _)| name)
            .collect();
        let generated: std::collections::BTreeSet<String> = prekey_bundle_cases()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            on_disk, generated,
            "run `cargo test --all-features --lib write_prekey_bundle_corpus -- --ignored`"
        );
    }
}
