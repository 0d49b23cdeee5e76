//! Hooks for fuzz targets and fixture-driven tests, built only with
//! `--cfg fuzzing` (which `cargo fuzz` sets) or in the crate's own tests.
//!
//! They reach the pure envelope layer with known epoch keys, so a fuzzer can
//! drive parsing and opening without a key store, and they hold the checks
//! of the targets ([`envelope_parse`], [`envelope_open`], [`phone_number`],
//! [`policy_file`], [`signal_message`], [`peer_record`], [`payload`],
//! [`kek_ring`]), so `cargo test` replays those corpora through the very
//! code the fuzzers run. Nothing here exists in a normal build.

#![allow(
    clippy::panic,
    reason = "a fuzz check reports a broken property by panicking"
)]

use sha2::{Digest, Sha256};

use crate::envelope::{self, Envelope, EnvelopeError, Header, Label, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber, Region};
use crate::keys::{Epoch, EpochKey, KekRing, SecretKey};
use crate::processor::{device_payload, parse_device_payload, reencode_inbound, reencode_outbound};
use crate::retention::{CEILING, RetentionPolicy};
use crate::signal::{Ciphertext, MessageKind, Parsed, SignalError, decode_peer_record};
use crate::store::{Direction, PeerId};
use crate::time::Timestamp;
use crate::visibility::{HardRule, VisibilityPolicy};

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
}

/// Fuzz check for the identifier parsers, on any bytes: [`PhoneNumber`]
/// accepts exactly strict E.164 (`+`, 7 to 15 digits, no leading zero) and
/// never prints more than its last two digits; [`Region`] accepts exactly
/// its documented names (2 to 15 bytes of `a-z`, `0-9` and `-`, with no
/// `-` first or last); [`BusinessId`] accepts exactly the decimal numbers
/// 1 to 2^64 - 1 without a sign or leading zero, and [`MessageId`] exactly
/// 32 lowercase hexadecimal digits, each printing and serialising back to
/// the text it parsed. Returns which parsers accepted the bytes.
pub fn phone_number(data: &[u8]) -> IdParses {
    let mut parses = IdParses {
        region: region(data),
        ..IdParses::default()
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return parses;
    };
    parses.business_id = business_id(text);
    parses.message_id = message_id(text);
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

/// The consumer device every [`signal_message`] and [`peer_record`] check uses.
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
/// same bytes parse to the same id again), one that names its sender
/// (another consumer or business gets another; another device of the
/// consumer, the transport's word, the same), and a first-contact
/// message has the id of the message it embeds, sent on its own. Returns
/// which kinds the bytes parsed as.
pub fn signal_message(data: &[u8]) -> SignalParses {
    let business = fixture_business();
    let peer = fixture_peer();
    let mut parses = SignalParses::default();
    for kind in [MessageKind::FirstContact, MessageKind::FollowUp] {
        let message = Ciphertext {
            kind,
            bytes: data.to_vec(),
        };
        let parse =
            |message: &Ciphertext, business, peer| match Parsed::new(message, business, peer) {
                Ok(parsed) => Some(parsed),
                Err(SignalError::InvalidMessage(_)) => None,
                Err(e) => panic!("a malformed message must be InvalidMessage, not {e:?}"),
            };
        let Some(parsed) = parse(&message, business, peer) else {
            continue;
        };
        let id = parsed.id();
        let id_of = |message: &Ciphertext, business, peer| {
            parse(message, business, peer)
                .map(|p| p.id())
                .unwrap_or_else(|| panic!("{kind:?} parsed once, then not"))
        };
        assert_eq!(id_of(&message, business, peer), id, "the id is not stable");
        let other_device = PeerId {
            device: peer.device ^ 1,
            ..peer
        };
        let other_phone = PeerId {
            phone: PhoneHash::from_bytes([0x71; PhoneHash::LEN]),
            ..peer
        };
        let other_business = BusinessId::new(business.get() + 1).unwrap_or(business);
        // The device is the transport's word: a replay claiming another
        // device of the consumer is the same message.
        assert_eq!(
            id_of(&message, business, other_device),
            id,
            "another device, another id"
        );
        assert_ne!(
            id_of(&message, business, other_phone),
            id,
            "another consumer, same id"
        );
        assert_ne!(
            id_of(&message, other_business, peer),
            id,
            "another business, same id"
        );
        match (kind, parsed.embedded()) {
            (MessageKind::FirstContact, Some(inner)) => {
                assert_eq!(
                    id_of(&inner, business, peer),
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
    if let Ok((next, version)) = ring.add_version(vec![0xaa], t) {
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
}
