//! The Signal protocol with consumers' devices, on behalf of each business.
//!
//! The promise: the crate speaks the wire format WhatsApp clients speak
//! (through `wacore-libsignal`), holds each business's Signal keys, and
//! nothing it stores reveals a private key; a message that fails to decrypt
//! changes nothing.
//!
//! - **Business keys.** Each business (one business phone number) has an
//!   identity key pair and registration id, created on first use; signed
//!   prekeys rotated on a schedule (default 7 days), the previous ones kept
//!   for a grace period (default 30 days) so first messages in flight still
//!   decrypt; a pool of one-time prekeys, replenished when the network has
//!   fewer than a low-water mark left to hand out, and bounded. All private
//!   keys are wrapped under the business's KEK.
//! - **Peers.** One record per consumer device, keyed by the consumer's
//!   [`PhoneHash`] and device id (the library never sees a phone number):
//!   the session and the device's trusted identity, sealed in an envelope
//!   whose expiry is the latest expiry of any message exchanged with it, so
//!   the state is shredded with the last message that needs it.
//! - **Atomicity.** Every operation stages the library's writes and commits
//!   them as one [`Batch`] only if it succeeds, consumed one-time prekey
//!   deletion included. Tampered, replayed or undecryptable input leaves
//!   sessions, prekeys and identities exactly as they were.
//! - **Serialisation.** Operations on one device address are serialised, so
//!   concurrent callers cannot fork a ratchet; different addresses proceed
//!   concurrently.
//! - **Identity changes** (a consumer reinstalling) follow an
//!   [`IdentityPolicy`] when the device presents its new key in its own
//!   message: refuse, or accept and report (the default). A prekey bundle
//!   never replaces a trusted key, under either policy.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use custodian::ids::BusinessId;
//! use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
//! use custodian::signal::{SignalConfig, Sessions};
//! use custodian::store::MemoryStore;
//! use custodian::time::SystemClock;
//! use custodian::vault::Vault;
//!
//! let store = Arc::new(MemoryStore::new());
//! let keys = KeyManager::new(Arc::new(LocalKeyProvider::new(&SecretKey::generate())), store.clone());
//! let vault = Arc::new(Vault::new(Arc::new(keys), Arc::new(SystemClock), EpochLength::DEFAULT));
//! let sessions = Sessions::new(vault, store, SignalConfig::default())?;
//!
//! // What the host publishes through its transport, for consumers to reach the business.
//! let published = sessions.publish(BusinessId::new(7).unwrap()).await?;
//! assert_eq!(published.one_time_prekeys.len(), 100);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wacore_libsignal::protocol::{
    CiphertextMessage, GenericSignedPreKey, IdentityKey, PreKeySignalMessage, PublicKey,
    SignalMessage, SignalProtocolError,
};

use crate::envelope::{Kind, Label, RecordKey, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::integrity::ConfigError;
use crate::keys::{KeyError, KeyId, KeyKind};
use crate::retention::CEILING;
use crate::store::{Batch, Op, PeerId, Storage, StoreError, WriterId};
use crate::time::Timestamp;
use crate::vault::{OpenError, Vault};

mod account;
mod cache;
mod decrypt;
mod encrypt;
mod logs;
mod peer;
mod stores;
#[cfg(all(test, feature = "testing"))]
mod tests;

use crate::lock::{Keyed, PerKey};
use account::Account;
#[cfg(any(test, fuzzing))]
pub(crate) use account::{
    ONE_TIME_PREKEY, decode_identity, decode_one_time_prekey, decode_signed_prekey, encode_identity,
};
use cache::{PeerCache, Taken};
pub use logs::{LIBRARY_LOG_TARGET, library_logs_exposed};
#[cfg(any(test, fuzzing))]
pub(crate) use peer::ADDRESS_NAME;
use peer::Peer;
#[cfg(any(test, fuzzing))]
pub(crate) use peer::decode_peer_record;
use stores::{IdentityOverlay, PreKeysInUse, SessionOverlay};
use zeroize::Zeroizing;

/// What a storage-side failure was.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageFailure {
    /// The store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The key hierarchy failed.
    #[error(transparent)]
    Key(KeyError),
    /// Sealing the peer record failed.
    #[error(transparent)]
    Seal(SealError),
    /// A stored record failed to open for a reason other than its expiry or
    /// shredding (which simply mean the state is gone).
    #[error(transparent)]
    Open(OpenError),
    /// A stored record did not decode.
    #[error("stored Signal state is corrupt: {0}")]
    Corrupt(&'static str),
}

/// Why a Signal operation failed. Every variant is something a host can act
/// on; none carries a phone number or key material.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// The device's identity key changed and the [`IdentityPolicy`] refuses
    /// it, or a bundle brings another key than the one trusted for the
    /// device (never taken from a bundle).
    #[error("the device's identity key changed and is not trusted")]
    UntrustedIdentity {
        /// The key the device (or its bundle) presented: the one to
        /// approve, once its security code is confirmed, through
        /// [`Processor::trust_new_identity`](crate::processor::Processor::trust_new_identity).
        presented: DeviceIdentity,
    },
    /// No session with the device: start one from its prekey bundle.
    #[error("no session with this device")]
    NoSession,
    /// The message was already decrypted (a replay or a duplicate delivery).
    #[error("duplicate message")]
    DuplicateMessage,
    /// The message is malformed, forged, or for keys this business does not hold.
    #[error("invalid message: {0}")]
    InvalidMessage(&'static str),
    /// A first-contact message names a prekey this business does not hold
    /// (`"one-time prekey"`: used, or never made; `"signed prekey"`: past
    /// its grace, or never made): its device is to start a new session
    /// from the business's published keys.
    #[error("unknown {0}")]
    UnknownPreKey(&'static str),
    /// No session this business holds with the device decrypts the
    /// message (`"MAC verification failed"`: one derived its key, and the
    /// MAC failed; `"decryption failed"`; `"message from too far into the
    /// future"`: more counters past its chain's last than the library
    /// derives keys for, the messages between lost, or a chain of a
    /// session the business no longer holds): the device writes on a
    /// state the business does not have (restored from a backup, set up
    /// again from a prekey it kept), or the message was altered on the
    /// way. What WhatsApp clients answer with a retry receipt.
    #[error("undecryptable message: {0}")]
    Undecryptable(&'static str),
    /// A prekey bundle is malformed or its signature does not verify.
    #[error("invalid prekey bundle: {0}")]
    BadBundle(&'static str),
    /// The device's record would grow past
    /// [`SignalConfig::max_record_len`]; nothing was changed.
    #[error("the device's record would grow to {len} bytes, more than the {max} allowed")]
    RecordTooLarge {
        /// The length it would have had.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Storage, the key hierarchy or sealing failed; nothing was changed.
    #[error("storage failure: {0}")]
    Storage(StorageFailure),
}

impl SignalError {
    /// Whether the message was made on a session, or with prekeys, this
    /// business does not hold ([`NoSession`](Self::NoSession),
    /// [`UnknownPreKey`](Self::UnknownPreKey),
    /// [`Undecryptable`](Self::Undecryptable)): the session the device
    /// writes on ended with retention here, say. The device could make it
    /// again over a new session, from the business's published keys.
    pub fn needs_new_session(&self) -> bool {
        matches!(
            self,
            Self::NoSession | Self::UnknownPreKey(_) | Self::Undecryptable(_)
        )
    }

    /// Whether the device's stored record can never be read: damaged, or
    /// not this device's. A key store or provider failing as the record is
    /// opened is no sign of that: it may pass; nor is another stored row
    /// (the store's writer, say) found damaged.
    pub(crate) fn record_unreadable(&self) -> bool {
        match self {
            Self::Storage(StorageFailure::Corrupt(_)) => true,
            Self::Storage(StorageFailure::Open(e)) => !matches!(e, OpenError::Key(_)),
            _ => false,
        }
    }
}

impl From<KeyError> for SignalError {
    fn from(e: KeyError) -> Self {
        Self::Storage(StorageFailure::Key(e))
    }
}

impl From<StoreError> for SignalError {
    fn from(e: StoreError) -> Self {
        Self::Storage(StorageFailure::Store(Arc::new(e)))
    }
}

impl From<SealError> for SignalError {
    fn from(e: SealError) -> Self {
        Self::Storage(StorageFailure::Seal(e))
    }
}

/// What to do when a device presents an identity key other than the one
/// trusted for it (the consumer reinstalled, or someone impersonates them).
///
/// The trusted key is kept with the device's session, and goes with it:
/// once retention (or an early shred) has deleted the session, the next
/// key the device presents is trusted on first use, under either policy.
///
/// The policy decides on a key a device presents in its own first-contact
/// message. A bundle, which the network serves, never replaces a trusted
/// key, under either policy: [`Sessions::start_session`] refuses one with
/// another key as [`SignalError::UntrustedIdentity`], so the network cannot
/// swap in a key of its choosing unreported. Under
/// [`AcceptAndReport`](Self::AcceptAndReport) the new key is taken from the
/// device's own first-contact message, and reported; under
/// [`Refuse`](Self::Refuse), only once the business approves that very key
/// (the [`DeviceIdentity`] the refusal names) through
/// [`Processor::trust_new_identity`](crate::processor::Processor::trust_new_identity):
/// the device's own message or a bundle with that key is then taken, and any
/// other key is still refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityPolicy {
    /// Refuse: the message fails with [`SignalError::UntrustedIdentity`] and
    /// nothing changes.
    Refuse,
    /// Accept the new key and report it (a "security code changed" notice):
    /// [`Decrypted::identity_changed`] is set.
    #[default]
    AcceptAndReport,
}

/// A consumer device's public identity key, in the 33-byte encoding a
/// bundle carries (type byte `05`): the key a refusal
/// ([`SignalError::UntrustedIdentity`]) names, and the one a business
/// approves through
/// [`Processor::trust_new_identity`](crate::processor::Processor::trust_new_identity)
/// once the consumer confirmed its security code. It identifies the
/// device, so its `Debug` shows none of it.
///
/// ```
/// use custodian::signal::DeviceIdentity;
///
/// let mut key = [0u8; 33];
/// key[0] = 0x05;
/// key[1] = 9;
/// let identity = DeviceIdentity::from_bytes(&key).expect("a Curve25519 key");
/// assert_eq!(identity.to_bytes(), key);
/// assert_eq!(format!("{identity:?}"), "DeviceIdentity(..)");
/// // Another type byte, a key in another than its canonical encoding, or
/// // one of small order (here zero), is no identity key.
/// key[0] = 0x06;
/// assert!(DeviceIdentity::from_bytes(&key).is_none());
/// let mut zero = [0u8; 33];
/// zero[0] = 0x05;
/// assert!(DeviceIdentity::from_bytes(&zero).is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceIdentity([u8; 33]);

impl DeviceIdentity {
    /// The key encoded as `bytes`; `None` unless a Curve25519 public key in
    /// its canonical encoding, not of small order (see [`Sessions::decrypt`]).
    pub fn from_bytes(bytes: &[u8; 33]) -> Option<Self> {
        let key = PublicKey::deserialize(bytes).ok()?;
        usable(&key).then_some(Self(*bytes))
    }

    /// The 33-byte encoding.
    pub fn to_bytes(&self) -> [u8; 33] {
        self.0
    }

    /// The library's key. Valid by construction.
    fn key(&self) -> Option<IdentityKey> {
        IdentityKey::decode(&self.0).ok()
    }

    pub(crate) fn of(key: &IdentityKey) -> Self {
        Self(key.serialize())
    }
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceIdentity(..)")
    }
}

/// How the Signal side behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalConfig {
    /// How often the signed prekey is replaced (default 7 days; more than
    /// zero).
    pub signed_prekey_rotation: Duration,
    /// How long a replaced signed prekey still decrypts first messages
    /// (default 30 days; at most the retention [`CEILING`]: longer would
    /// keep a private key past the time any message is kept). Past it, a
    /// first message on that key is refused whether or not
    /// [`Sessions::maintain`] has deleted it yet. Rotation and grace count
    /// from the times the keys were made, by the processor's clock: a clock
    /// stepped far ahead while a key was rotated keeps the key it replaced,
    /// and leaves the new one unrotated, until the clock reaches that time.
    /// A first message is judged by the business's keys as its decrypt
    /// found them when it began: one that began before a rotation and
    /// waited longer than the grace (on a device's lock, or a key provider)
    /// can still be taken on the key replaced; with no grace, a wait of any
    /// length.
    pub signed_prekey_grace: Duration,
    /// One-time prekeys kept available (default 100; at least 1).
    pub prekey_pool: usize,
    /// Replenish the pool when fewer than this remain (default 20; at
    /// least 1, at most [`prekey_pool`](Self::prekey_pool): at 0 the pool
    /// would never be refilled, and every first message would come without
    /// a one-time prekey).
    pub prekey_low_water: usize,
    /// The most one-time prekeys kept, those handed out whose first message
    /// has not come included (default 1,000; at least
    /// [`prekey_pool`](Self::prekey_pool), at most [`MAX_PREKEY_LIMIT`]).
    /// Past it the oldest are deleted: a first message made from one of
    /// those fails as an unknown prekey.
    pub prekey_limit: usize,
    /// What to do with a changed identity key (default accept and report).
    pub identity_policy: IdentityPolicy,
    /// Peers kept decoded in memory (least recently used evicted; default 65,536).
    pub peer_cache: usize,
    /// The bytes peers kept in memory may count for (least recently used
    /// evicted; default 256 MiB). Each counts its record's stored length
    /// plus 1 KiB; decoded, a record takes more than its stored length. A
    /// peer larger than this is not kept in memory.
    pub peer_cache_bytes: usize,
    /// The largest a device's stored record may grow, in bytes (default 4
    /// MiB). The Signal library bounds a session's skipped message keys and
    /// archived sessions, but a device that skips the most it may on every
    /// chain of 40 sessions grows its record to tens of MB, re-sealed on
    /// every persist. An operation that would store more fails with
    /// [`SignalError::RecordTooLarge`] and changes nothing. A full session
    /// measures about 1.3 MB; an ordinary one a few KB. At least
    /// [`MIN_RECORD_LEN`], and at most the most a sealed record holds
    /// ([`MAX_PLAINTEXT_LEN`](crate::envelope::MAX_PLAINTEXT_LEN), 64 MiB).
    pub max_record_len: usize,
    /// Let [`Processor::new`](crate::processor::Processor::new) start even
    /// though the host's `log` logger would keep the Signal library's
    /// records that carry key material (default `false`; see
    /// [`library_logs_exposed`]). Only for a logger whose output is as
    /// protected as the keys themselves.
    pub allow_library_logs: bool,
}

/// The most one-time prekeys [`SignalConfig::prekey_limit`] may keep:
/// 100,000 per business, well inside the 2^24 prekey ids (each id is held
/// out of use while a first message may still name it).
pub const MAX_PREKEY_LIMIT: usize = 100_000;

/// The least [`SignalConfig::max_record_len`] accepted: 64 KiB. A fresh
/// session's record measures about 510 bytes; a device with the most
/// archived sessions the Signal library keeps (40, plus the current one),
/// each having carried a message both ways, about 17 KB. A smaller limit
/// would refuse, for good, devices that did nothing unusual; 64 KiB leaves
/// room for each session's other receiving chains and some skipped keys.
pub const MIN_RECORD_LEN: usize = 64 << 10;

impl SignalConfig {
    /// Checks every field against its documented range. The error names
    /// the field and the rule it breaks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, rule| Err(ConfigError { field, rule });
        // Times are kept in whole milliseconds: a shorter period is zero,
        // and every `maintain` would rotate.
        if self.signed_prekey_rotation < Duration::from_millis(1) {
            return bad("signed_prekey_rotation", "must be at least a millisecond");
        }
        if self.signed_prekey_grace > CEILING {
            return bad(
                "signed_prekey_grace",
                "must be at most 30 days, the retention ceiling",
            );
        }
        if self.prekey_pool == 0 {
            return bad("prekey_pool", "must be at least 1");
        }
        if self.prekey_low_water == 0 || self.prekey_low_water > self.prekey_pool {
            return bad("prekey_low_water", "must be from 1 to prekey_pool");
        }
        if self.prekey_limit < self.prekey_pool {
            return bad("prekey_limit", "must be at least prekey_pool");
        }
        if self.prekey_limit > MAX_PREKEY_LIMIT {
            return bad("prekey_limit", "must be at most 100,000");
        }
        if self.max_record_len < MIN_RECORD_LEN {
            return bad(
                "max_record_len",
                "must be at least 64 KiB, what a device with the most archived sessions needs",
            );
        }
        // Past it, a record would fail to seal, as a storage failure the
        // transport retries for ever, not as `RecordTooLarge`.
        if self.max_record_len > crate::envelope::MAX_PLAINTEXT_LEN {
            return bad(
                "max_record_len",
                "must be at most 64 MiB, the most a sealed record holds",
            );
        }
        Ok(())
    }
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            signed_prekey_rotation: Duration::from_secs(7 * 24 * 3600),
            signed_prekey_grace: Duration::from_secs(30 * 24 * 3600),
            prekey_pool: 100,
            prekey_low_water: 20,
            prekey_limit: 1000,
            identity_policy: IdentityPolicy::AcceptAndReport,
            peer_cache: 65_536,
            peer_cache_bytes: 256 << 20,
            max_record_len: 4 << 20,
            allow_library_logs: false,
        }
    }
}

/// The two kinds of Signal message on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A first message that also establishes a session (`pkmsg`).
    FirstContact,
    /// A message in an established session (`msg`).
    FollowUp,
}

/// A Signal message as the transport carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext {
    /// Which kind of message the bytes are.
    pub kind: MessageKind,
    /// The serialized message.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ciphertext")
            .field("kind", &self.kind)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// A consumer's message, parsed for [`Sessions::decrypt_staged`]; its
/// header names it. Parsing needs no key, so malformed bytes are refused
/// before anything (the business's phone-hash key among them) is created.
pub(crate) struct Parsed {
    message: CiphertextMessage,
    /// The sender's ratchet key: the receiving chain the message is on.
    chain: PublicKey,
    counter: u32,
    /// The id of the message (see [`Parsed::id`]).
    id: MessageId,
    /// The id its header gives: [`Parsed::id`] unless it was
    /// [`resent_as`](Parsed::resent_as) another.
    header: MessageId,
}

impl Parsed {
    /// Parse `message` to `business`; nothing is decrypted yet. A message
    /// carrying a public key whose coordinate is not canonical is refused:
    /// X25519 ignores a key's top bit (and reduces it modulo the field's
    /// prime), so such a key is another's bytes for the same key, and a
    /// first-contact message's base key, outside the message's MAC, could
    /// be re-encoded so that the library no longer recognises a replay of
    /// it. No client encodes a key so. What the library reads past a key's
    /// 33 bytes, or in the low bits of a first-contact message's version
    /// byte, it ignores, as libsignal does: those copies carry the same
    /// keys, so the message's id and the replay check (which work on the
    /// keys, not their bytes) take them for the message they copy.
    pub(crate) fn new(message: &Ciphertext, business: BusinessId) -> Result<Self, SignalError> {
        let parsed = match message.kind {
            MessageKind::FirstContact => PreKeySignalMessage::try_from(message.bytes.as_slice())
                .map(CiphertextMessage::PreKeySignalMessage),
            MessageKind::FollowUp => SignalMessage::try_from(message.bytes.as_slice())
                .map(CiphertextMessage::SignalMessage),
        }
        .map_err(|e| protocol_error(e, None, None))?;
        let inner = match &parsed {
            CiphertextMessage::PreKeySignalMessage(m) => {
                check_key(m.base_key())?;
                check_key(m.identity_key().public_key())?;
                m.message()
            }
            CiphertextMessage::SignalMessage(m) => m,
            _ => return Err(SignalError::InvalidMessage("malformed message")),
        };
        let (chain, counter) = (*inner.sender_ratchet_key(), inner.counter());
        check_key(&chain)?;
        let id = message_id(business, &chain, counter);
        Ok(Self {
            id,
            header: id,
            message: parsed,
            chain,
            counter,
        })
    }

    /// The id of this message: every redelivery and every replay of it has
    /// the same, whatever consumer and device the transport says it comes
    /// from, and no other message has (a ratchet key is fresh for each
    /// chain).
    pub(crate) fn id(&self) -> MessageId {
        self.id
    }

    /// This message, received under `id`: a device's message sent again
    /// on request carries the id of the one asked for, so that however
    /// often it is sent again, it is received once.
    pub(crate) fn resent_as(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// The id its header gives, if it is received under another (sent
    /// again on request): a copy of its bytes received plain is stored
    /// under that one.
    pub(crate) fn header_id(&self) -> Option<MessageId> {
        (self.header != self.id).then_some(self.header)
    }

    /// Whether it is more counters into its chain than the library derives
    /// keys for at once: an earlier copy may have been refused as too far
    /// ahead, and asked for again (see [`resend_id`]).
    pub(crate) fn far_into_its_chain(&self) -> bool {
        usize::try_from(self.counter)
            .is_ok_and(|counter| counter > wacore_libsignal::protocol::consts::MAX_FORWARD_JUMPS)
    }

    /// A first-contact message's embedded message, as the transport would
    /// carry it on its own: the same message, so it parses to the same id.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn embedded(&self) -> Option<Ciphertext> {
        match &self.message {
            CiphertextMessage::PreKeySignalMessage(m) => Some(Ciphertext {
                kind: MessageKind::FollowUp,
                bytes: m.message().serialized().to_vec(),
            }),
            _ => None,
        }
    }
}

/// A stored session the library cannot work with.
fn corrupt_session<E>(_: E) -> SignalError {
    SignalError::Storage(StorageFailure::Corrupt("session structure"))
}

/// Whether `a` and `b` are the same public key. A plain comparison:
/// public keys are no secret, and the library's own `==` is constant-time,
/// which costs an optimisation barrier a byte on every message.
fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.serialize() == b.serialize()
}

/// Refuse a message's `key` unless [`usable`], naming why.
fn check_key(key: &PublicKey) -> Result<(), SignalError> {
    if !canonical(key) {
        return Err(SignalError::InvalidMessage(
            "a key is not canonically encoded",
        ));
    }
    if small_order(key) {
        return Err(SignalError::InvalidMessage("a key is of small order"));
    }
    Ok(())
}

/// Whether `key` may stand for a party: in its [`canonical`] encoding, and
/// not of [`small_order`].
pub(super) fn usable(key: &PublicKey) -> bool {
    canonical(key) && !small_order(key)
}

/// Whether `key` is in its canonical encoding: a Curve25519 key (the only
/// type the library decodes) whose u-coordinate is below the field's prime
/// 2^255 - 19, its top bit clear.
fn canonical(key: &PublicKey) -> bool {
    match key.public_key_bytes() {
        [low, middle @ .., top] if middle.len() == 30 => {
            *top < 0x7f || (*top == 0x7f && (middle.iter().any(|&b| b != 0xff) || *low < 0xed))
        }
        _ => false,
    }
}

/// The canonical encodings of the Curve25519 points of small order, on the
/// curve or its twist: u = 0, 1 and p - 1, and the two of order 8 (the list
/// libsodium refuses, less the encodings `canonical` refuses already).
const SMALL_ORDER: [[u8; 32]; 5] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Whether `key` is a point of small order: a Diffie-Hellman with it gives
/// zero, which anyone can compute, so it proves no one holds its private
/// half. No client makes one; an intruder could, as an identity anyone
/// could then speak for.
fn small_order(key: &PublicKey) -> bool {
    let bytes = key.public_key_bytes();
    // The five differ in their first byte, which rules out almost every
    // key on every message without a comparison of the rest.
    match bytes.first() {
        Some(&first) => SMALL_ORDER
            .iter()
            .any(|point| point[0] == first && point.as_slice() == bytes),
        None => false,
    }
}

/// The id of message `counter` of receiving chain `chain` to `business`.
///
/// Not of its sender: the consumer and the device are the transport's
/// word, and a first-contact message that used no one-time prekey
/// decrypts in a new session under any number and device it is replayed
/// as. Named by its chain and counter, it is the duplicate it is whoever
/// it claims to come from (the ratchet key is fresh for each chain, so no
/// two devices share one).
fn message_id(business: BusinessId, chain: &PublicKey, counter: u32) -> MessageId {
    let mut h = Sha256::new();
    h.update(b"custodian/v4/inbound-id");
    h.update(business.get().to_be_bytes());
    h.update(chain.serialize());
    h.update(counter.to_be_bytes());
    let digest = h.finalize();
    let mut id = [0u8; MessageId::LEN];
    id.copy_from_slice(&digest[..MessageId::LEN]);
    MessageId::from_bytes(id)
}

/// The id a consumer's message that could not be decrypted is asked for
/// again under ([`Inbound::resend_of`](crate::processor::Inbound::resend_of)):
/// derived from all its bytes, never from its header alone (a header that
/// failed its check is anyone's to write, and would name another
/// message), in a space of its own. Every copy of those bytes has it.
pub(crate) fn resend_id(business: BusinessId, message: &Ciphertext) -> MessageId {
    let mut h = Sha256::new();
    h.update(b"custodian/v4/resend-id");
    h.update(business.get().to_be_bytes());
    h.update([u8::from(message.kind == MessageKind::FirstContact)]);
    h.update(&message.bytes);
    let digest = h.finalize();
    let mut id = [0u8; MessageId::LEN];
    id.copy_from_slice(&digest[..MessageId::LEN]);
    MessageId::from_bytes(id)
}

/// A decrypted message.
#[derive(Clone, PartialEq, Eq)]
pub struct Decrypted {
    /// The plaintext; wiped from memory when dropped.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The device presented a new identity key and the policy accepted it:
    /// tell the business (a "security code changed" notice).
    pub identity_changed: bool,
    /// The message was a first-contact message that established a new
    /// session (the device had none, or started over), not one that
    /// repeated the setup of the session in use.
    pub first_contact: bool,
}

impl fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypted")
            .field("len", &self.plaintext.len())
            .field("identity_changed", &self.identity_changed)
            .field("first_contact", &self.first_contact)
            .finish()
    }
}

/// A one-time prekey, public half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicPreKey {
    /// Its id (24 bits).
    pub id: u32,
    /// The 33-byte public key (type byte `05`).
    pub public_key: [u8; 33],
}

/// A signed prekey, public half, with the identity key's signature over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedPublicPreKey {
    /// Its id (24 bits).
    pub id: u32,
    /// The 33-byte public key.
    pub public_key: [u8; 33],
    /// XEdDSA signature by the identity key over `public_key`.
    pub signature: [u8; 64],
}

/// What one device publishes so others can start a session with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreKeyBundle {
    /// The device's registration id.
    pub registration_id: u32,
    /// The device id.
    pub device_id: u32,
    /// The 33-byte identity key.
    pub identity_key: [u8; 33],
    /// The signed prekey.
    pub signed_prekey: SignedPublicPreKey,
    /// A one-time prekey, if any were left.
    pub one_time_prekey: Option<PublicPreKey>,
}

/// Everything a business publishes through the transport: its identity,
/// current signed prekey and every one-time prekey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKeys {
    /// The business's registration id.
    pub registration_id: u32,
    /// The device id the business uses.
    pub device_id: u32,
    /// The 33-byte identity key.
    pub identity_key: [u8; 33],
    /// The current signed prekey.
    pub signed_prekey: SignedPublicPreKey,
    /// Every one-time prekey held, oldest first: those the network handed
    /// out before, whose first messages may not have come yet, included.
    pub one_time_prekeys: Vec<PublicPreKey>,
}

impl PublishedKeys {
    /// The bundle a consumer fetches: with the `index`-th one-time prekey, or
    /// none.
    pub fn bundle(&self, index: Option<usize>) -> PreKeyBundle {
        PreKeyBundle {
            registration_id: self.registration_id,
            device_id: self.device_id,
            identity_key: self.identity_key,
            signed_prekey: self.signed_prekey,
            one_time_prekey: index.and_then(|i| self.one_time_prekeys.get(i).copied()),
        }
    }
}

/// What [`Sessions::maintain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Maintenance {
    /// A new signed prekey was made current.
    pub rotated: bool,
    /// Signed prekeys past their grace period, deleted.
    pub signed_retired: usize,
    /// One-time prekeys added: stored by this upkeep (where another
    /// instance on the store made a key under the same id first, the key
    /// stored is that one, counted by its upkeep).
    pub prekeys_added: usize,
    /// One-time prekeys deleted, oldest first, to keep the number stored
    /// within [`SignalConfig::prekey_limit`].
    pub prekeys_retired: usize,
    /// Stored prekeys, signed or one-time, that do not unwrap (under a KEK
    /// version the store's ring can no longer use, too) or decode, are
    /// unsound, or are stored under an id no refill makes: never published
    /// nor used, each logged with its id when found, and deleted if still
    /// stored as found. (A SQLite row that does not decode at all is
    /// skipped by the store's listing, and stays for an operator.)
    pub damaged_deleted: usize,
    /// One-time prekeys the network can hand out afterwards, once published,
    /// by its count (without one, every key held). Keys a first message's
    /// refill stored since the last publication, which the publication
    /// takes there too, may be left out, some or all.
    pub prekeys_available: usize,
}

/// The device id a business presents.
pub const BUSINESS_DEVICE_ID: u32 = 0;

/// The businesses' accounts in memory.
type Accounts = HashMap<BusinessId, Arc<Account>, foldhash::fast::RandomState>;

/// A business's account in memory while maintenance makes the next one:
/// forgotten when dropped (maintenance failed or was dropped) unless
/// [`replace`](Self::replace)d.
struct StaleAccount<'a> {
    accounts: &'a RwLock<Accounts>,
    business: BusinessId,
    replaced: bool,
}

impl StaleAccount<'_> {
    /// Forget it now: it may hold as current a signed prekey about to be
    /// deleted (with no grace, one retired the moment it is replaced).
    fn forget(&self) {
        let mut accounts = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        accounts.remove(&self.business);
    }

    fn replace(mut self, account: Account) {
        self.replaced = true;
        let mut accounts = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        accounts.insert(self.business, Arc::new(account));
    }
}

impl Drop for StaleAccount<'_> {
    fn drop(&mut self) {
        if !self.replaced {
            self.forget();
        }
    }
}

/// Signal sessions with consumers' devices, on behalf of many businesses.
pub struct Sessions {
    vault: Arc<Vault>,
    store: Arc<dyn Storage>,
    config: SignalConfig,
    accounts: RwLock<Accounts>,
    cache: PeerCache,
    /// Serialises each device's operations, a lock of its own per device
    /// in use: an operation hung on a call out for one device (its
    /// business's key provider, say) holds up no other device's.
    address_locks: Keyed<(BusinessId, PeerId)>,
    /// Serialises a business's account loads and upkeep.
    business_locks: PerKey<BusinessId, async_lock::Mutex<()>>,
    /// One-time prekeys loaded by operations not yet done with them.
    prekeys_in_use: PreKeysInUse,
    /// Per business, the ids of the one-time prekeys found damaged since
    /// the network took its last publication (it may hold them: see
    /// [`Sessions::published`]), each with what became of its id since.
    damaged_unpublished: Mutex<HashMap<BusinessId, BTreeMap<u32, Remade>>>,
    /// This instance's claim to write the store (see
    /// [`Storage::take_over`]), taken before it first reads a peer's state.
    writer: WriterId,
    took_over: async_lock::OnceCell<()>,
}

/// What became of a damaged one-time prekey's id since it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remade {
    /// Nothing: the network may hold the damaged key under it.
    Not,
    /// A refill made a sound key under it, not listed for publication yet.
    Since,
    /// ... and a publication listed it.
    Listed,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("config", &self.config)
            .field("cached_peers", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The library's refusal of a counter more than [`MAX_FORWARD_JUMPS`]
/// past its chain's last (its own words).
///
/// [`MAX_FORWARD_JUMPS`]: wacore_libsignal::protocol::consts::MAX_FORWARD_JUMPS
pub(super) const TOO_FAR: &str = "message from too far into the future";

/// Translate a library error; `failure` is a storage error an overlay saw,
/// `refused` the identity key the identity overlay refused.
fn protocol_error(
    e: SignalProtocolError,
    failure: Option<SignalError>,
    refused: Option<DeviceIdentity>,
) -> SignalError {
    use SignalProtocolError as P;
    if let Some(failure) = failure {
        return failure;
    }
    match e {
        P::DuplicatedMessage(..) => SignalError::DuplicateMessage,
        // The library refuses an identity only when the overlay does.
        P::UntrustedIdentity(_) => match refused {
            Some(presented) => SignalError::UntrustedIdentity { presented },
            None => SignalError::Storage(StorageFailure::Corrupt("Signal state")),
        },
        P::SessionNotFound(_) | P::NoSenderKeyState(_) => SignalError::NoSession,
        P::BadMac(_) => SignalError::Undecryptable("MAC verification failed"),
        P::InvalidPreKeyId => SignalError::UnknownPreKey("one-time prekey"),
        P::InvalidSignedPreKeyId => SignalError::UnknownPreKey("signed prekey"),
        P::SignatureValidationFailed => {
            SignalError::InvalidMessage("signature verification failed")
        }
        P::InvalidRegistrationId(..) => SignalError::InvalidMessage("invalid registration id"),
        P::LegacyCiphertextVersion(_)
        | P::UnrecognizedCiphertextVersion(_)
        | P::UnrecognizedMessageVersion(_) => {
            SignalError::InvalidMessage("unsupported message version")
        }
        P::InvalidSessionStructure(_) => corrupt_session(()),
        P::InvalidState(..) | P::BackendError(..) => {
            SignalError::Storage(StorageFailure::Corrupt("Signal state"))
        }
        // The library's own words: "message from too far into the future"
        // (more counters ahead than it derives keys for), "decryption
        // failed"; fixed texts, which carry no key or content.
        P::InvalidMessage(_, why @ ("decryption failed" | TOO_FAR)) => {
            SignalError::Undecryptable(why)
        }
        P::InvalidMessage(_, why) => SignalError::InvalidMessage(why),
        _ => SignalError::InvalidMessage("malformed message"),
    }
}

impl Sessions {
    /// Signal sessions sealed by `vault` and stored in `store`, which must be
    /// the store the vault's key manager uses (batches span both).
    ///
    /// Refused if `config` is invalid (see [`SignalConfig::validate`]).
    pub fn new(
        vault: Arc<Vault>,
        store: Arc<dyn Storage>,
        config: SignalConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            vault,
            store,
            cache: PeerCache::new(&config),
            config,
            accounts: RwLock::default(),
            address_locks: Keyed::default(),
            business_locks: PerKey::default(),
            prekeys_in_use: PreKeysInUse::default(),
            damaged_unpublished: Mutex::default(),
            writer: WriterId::random(),
            took_over: async_lock::OnceCell::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SignalConfig {
        &self.config
    }

    fn now(&self) -> Timestamp {
        self.vault.clock().now()
    }

    /// The business's account, loaded (or created) once and cached.
    async fn account(&self, business: BusinessId) -> Result<Arc<Account>, SignalError> {
        match self.cached_account(business) {
            Some(account) => Ok(account),
            // Boxed: every message awaits this, and only the first loads.
            None => Box::pin(self.load_account(business, true))
                .await?
                .ok_or(SignalError::Storage(StorageFailure::Corrupt(
                    "Signal identity",
                ))),
        }
    }

    /// The account of `business`, if it has one: a message cannot be for
    /// keys a business does not hold, nor make it any.
    async fn existing_account(&self, business: BusinessId) -> Result<Arc<Account>, SignalError> {
        match self.cached_account(business) {
            Some(account) => Ok(account),
            None => Box::pin(self.load_account(business, false)).await?.ok_or(
                SignalError::InvalidMessage("the business has published no keys"),
            ),
        }
    }

    fn cached_account(&self, business: BusinessId) -> Option<Arc<Account>> {
        self.accounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&business)
            .cloned()
    }

    async fn load_account(
        &self,
        business: BusinessId,
        create: bool,
    ) -> Result<Option<Arc<Account>>, SignalError> {
        let lock = self.business_locks.get(business);
        let _guard = lock.lock().await;
        if let Some(account) = self.cached_account(business) {
            return Ok(Some(account));
        }
        let (keys, now) = (self.vault.keys(), self.now());
        let account = if create {
            Account::load_or_create(keys, business, now).await?
        } else {
            let Some(account) = Account::load(keys, business, now).await? else {
                return Ok(None);
            };
            account
        };
        let account = Arc::new(account);
        let mut accounts = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        accounts.insert(business, account.clone());
        Ok(Some(account))
    }

    /// The network took `keys`, [`publish`](Self::publish)ed for
    /// `business`: the damaged one-time prekeys found before they were
    /// listed (not among them, or made again under their ids by a refill
    /// before a listing) no longer count against what it has left (see
    /// [`maintain`](Self::maintain)). Call it once the transport took them,
    /// not before: the network keeps its old keys otherwise.
    pub fn published(&self, business: BusinessId, keys: &PublishedKeys) {
        let listed: BTreeSet<u32> = keys.one_time_prekeys.iter().map(|k| k.id).collect();
        let mut unpublished = self
            .damaged_unpublished
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(ids) = unpublished.get_mut(&business) {
            ids.retain(|id, remade| listed.contains(id) && *remade != Remade::Listed);
            if ids.is_empty() {
                unpublished.remove(&business);
            }
        }
    }

    /// The keys `business` publishes through the transport (created on
    /// first use). Once the transport took them, say so
    /// ([`published`](Self::published)).
    pub async fn publish(&self, business: BusinessId) -> Result<PublishedKeys, SignalError> {
        let (mut one_time_prekeys, _) =
            account::one_time_prekeys(self.vault.keys(), business).await?;
        if one_time_prekeys.len() < self.config.prekey_low_water {
            self.maintain(business, None).await?;
            (one_time_prekeys, _) = account::one_time_prekeys(self.vault.keys(), business).await?;
        }
        // Made again before this listing: the network holds the sound key
        // under its id once it takes it.
        if let Some(ids) = self
            .damaged_unpublished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&business)
        {
            for key in &one_time_prekeys {
                if let Some(r @ Remade::Since) = ids.get_mut(&key.id) {
                    *r = Remade::Listed;
                }
            }
        }
        let account = self.account(business).await?;
        Ok(PublishedKeys {
            registration_id: account.registration_id,
            device_id: BUSINESS_DEVICE_ID,
            identity_key: account.identity.identity_key().serialize(),
            signed_prekey: account.signed_public()?,
            one_time_prekeys,
        })
    }

    /// Keep `business`'s prekeys healthy: rotate the signed prekey when due,
    /// delete replaced ones past their grace period, refill the one-time pool
    /// below its low-water mark, and keep at most
    /// [`prekey_limit`](SignalConfig::prekey_limit) one-time prekeys,
    /// deleting the oldest. Run it periodically; publish afterwards if
    /// anything changed.
    ///
    /// `left` is how many of the one-time prekeys last published the network
    /// has yet to hand out, if it says
    /// ([`Transport::one_time_prekey_count`](crate::transport::Transport::one_time_prekey_count)).
    /// Without it every one-time prekey stored counts as available, those
    /// handed out whose first message has not come yet included, and the
    /// pool refills late. The one-time prekeys this instance found damaged
    /// since the network took its last [`publish`](Self::publish)ed keys
    /// ([`published`](Self::published)) are taken off it: the network may
    /// hold them, and the pool refills early rather than late. (Remembered
    /// in memory: those another instance found, or this one before a
    /// restart, are not taken off.)
    pub async fn maintain(
        &self,
        business: BusinessId,
        left: Option<usize>,
    ) -> Result<Maintenance, SignalError> {
        let lock = self.business_locks.get(business);
        let _guard = lock.lock().await;
        // The account in memory serves the business's consumers meanwhile
        // (its identity never changes, and a signed prekey past its grace
        // is refused where it is used). Should this not complete (an
        // error, a dropped future), it is forgotten: the next use reloads
        // what the store kept.
        let stale = StaleAccount {
            accounts: &self.accounts,
            business,
            replaced: false,
        };
        let keys = self.vault.keys();
        let now = self.now();
        let mut account = Account::load_or_create(keys, business, now).await?;
        let mut report = Maintenance::default();

        let current = account::made_at(account.current_signed()?);
        if now >= current.saturating_add(self.config.signed_prekey_rotation) {
            account.add_signed_prekey(keys, business, now).await?;
            report.rotated = true;
        }
        // A signed prekey stays usable for the grace period after the next
        // one replaced it.
        let grace = self.config.signed_prekey_grace;
        let mut retired = Vec::new();
        for (i, record) in account.signed.iter().enumerate() {
            if account.past_grace(i, now, grace) {
                let id = record
                    .id()
                    .map(u32::from)
                    .map_err(|_| SignalError::Storage(StorageFailure::Corrupt("signed prekey")))?;
                retired.push(KeyId {
                    business,
                    kind: KeyKind::SignalSignedPreKey,
                    id: u64::from(id),
                });
            }
        }
        if !retired.is_empty() {
            let retired_ids: BTreeSet<u64> = retired.iter().map(|k| k.id).collect();
            // The account serving meanwhile refuses a retired key where it
            // is used, unless it holds it as current (with no grace, one
            // replaced just now): then it goes first.
            let current = self.cached_account(business);
            if current.is_some_and(|a| {
                a.current_signed()
                    .ok()
                    .and_then(|r| r.id().ok())
                    .is_some_and(|i| retired_ids.contains(&u64::from(u32::from(i))))
            }) {
                stale.forget();
            }
            keys.store().delete_keys(&retired).await?;
            report.signed_retired = retired.len();
            account.signed.retain(|r| {
                r.id()
                    .is_ok_and(|i| !retired_ids.contains(&u64::from(u32::from(i))))
            });
        }

        // Damaged prekeys can never be used: they go (each was logged),
        // each if it is still as it was read (another instance may have
        // deleted it and made a sound key under its id since).
        let (pool, mut damaged) = account::one_time_prekeys(keys, business).await?;
        // Those the network may hold: under ids a refill makes.
        let damaged_ids: BTreeSet<u32> = damaged.iter().filter_map(account::refill_id).collect();
        damaged.append(&mut account.damaged_signed);
        if !damaged.is_empty() {
            let gone = keys.store().delete_keys_as_read(&damaged).await?;
            report.damaged_deleted = usize::try_from(gone).unwrap_or(usize::MAX);
        }
        let stored: Vec<u32> = pool.iter().map(|k| k.id).collect();
        // What the network can still hand out: the keys it has not handed
        // out, if it says, and never more than the store holds. Keys a
        // first message's refill stored since the last publication count
        // for nothing here, though the publication after this upkeep takes
        // them there: the pool may be filled past its size (never past the
        // limit). Counting them would leave a host that publishes only when
        // the upkeep changed something with a network run dry. Nor do the
        // damaged keys the network may hold (damaged at rest since they
        // were published: a first message naming one fails), those found
        // since it took the last publication, by this upkeep or one
        // before (a first message's refill, say): all are taken off,
        // though it may have handed some out, so the pool refills early
        // rather than late.
        let damaged_out = {
            let mut unpublished = self
                .damaged_unpublished
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let ids = unpublished.entry(business).or_default();
            ids.extend(damaged_ids.iter().map(|&id| (id, Remade::Not)));
            ids.len()
        };
        let available = left.map_or(stored.len(), |left| {
            left.saturating_sub(damaged_out).min(stored.len())
        });
        // The ids staged first messages loaded (read after the listing).
        let held = self.prekeys_in_use.ids(business);
        // Keys stored under new ids, whoever made them.
        let mut written = 0;
        if available < self.config.prekey_low_water {
            // Nor an id a staged first message loaded, consumed since by
            // another: its commit would consume the new key made under it.
            let taken: BTreeSet<u32> = stored.iter().copied().collect();
            let wanted = self.config.prekey_pool.saturating_sub(available);
            let added = account::add_one_time_prekeys(keys, business, &taken, &held, wanted);
            let (ids, ours) = added.await?;
            // Made again under a damaged key's id: the network holds the
            // damaged key under it until it takes a publication.
            let mut unpublished = self
                .damaged_unpublished
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(damaged) = unpublished.get_mut(&business) {
                for id in &ids {
                    damaged.entry(*id).and_modify(|r| *r = Remade::Since);
                }
            }
            (written, report.prekeys_added) = (ids.len(), ours);
        }
        // Keys handed out whose first message never came would pile up:
        // past the limit the oldest go, never one added just now, nor one a
        // first message under way had loaded when the holds were read (its
        // commit would find it gone; one loading its key after that, as it
        // goes, has its device asked for the message again).
        let excess = (stored.len() + written).saturating_sub(self.config.prekey_limit);
        let retired: Vec<(usize, u32)> = stored
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, id)| !held.contains(id))
            .take(excess)
            .collect();
        let oldest: Vec<u32> = retired.iter().map(|&(_, id)| id).collect();
        if !oldest.is_empty() {
            account::delete_one_time_prekeys(keys, business, &oldest).await?;
        }
        report.prekeys_retired = oldest.len();
        // The network hands out the oldest first: of those stored, the
        // newest `available` are not handed out yet. A held key kept in
        // place of an older one is handed out (a first message carries
        // it), and a younger one goes instead.
        let handed_out = stored.len() - available;
        let unused_retired = retired.iter().filter(|&&(i, _)| i >= handed_out).count();
        report.prekeys_available = available + written - unused_retired;
        stale.replace(account);
        Ok(report)
    }

    /// The key manager's count of epoch keys destroyed early: state in
    /// memory from before it moved is not used (see [`PeerCache::take`]).
    fn shreds(&self) -> u64 {
        self.vault.keys().early_destructions()
    }

    /// The committed state of `peer`, out of the cache until it is put back:
    /// from memory, or opened from the store. State that has expired or
    /// been shredded is no state, early shredding included: state in memory
    /// is forgotten once an epoch key is destroyed early. The caller holds
    /// the address lock.
    async fn load_peer(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<(Box<Peer>, Taken<'_>), SignalError> {
        if let Some(cached) = self.cache.take(&(business, peer), self.shreds()) {
            if cached.expiry > self.now() {
                let taken = self.cache.taken((business, peer), cached.dirty);
                return Ok((cached, taken));
            }
            // Its retention is over: the stored copy decides, as below.
            self.cache.discard(cached.dirty);
        }
        // Read before the store: a clear that runs after this makes the
        // state read below stale, and it is not put back.
        let generation = self.cache.generation();
        let taken = self.cache.taken((business, peer), false);
        // A state read before this instance took the store over could be
        // older than what another instance persisted since.
        self.take_over().await?;
        let stored = match self.store.peer(business, peer).await {
            Ok(stored) => stored,
            // The row itself is damaged: a record that can never be read,
            // as one that does not open is (see `record_unreadable`; the
            // store's other rows failing so are not the record's).
            Err(StoreError::Corrupt(what)) => {
                tracing::warn!(
                    business = business.get(),
                    device = peer.device,
                    what,
                    "a stored Signal record is damaged"
                );
                return Err(SignalError::Storage(StorageFailure::Corrupt(
                    "stored Signal record",
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let Some(sealed) = stored else {
            let empty = Peer {
                generation,
                ..Peer::empty(peer)
            };
            return Ok((Box::new(empty), taken));
        };
        // Whether it is opened past its expiry, by the rule below.
        let mut lapsed = false;
        let opened = match self.vault.open(&sealed, business).await {
            // Sends and receives written behind raise the expiry in memory
            // only, within the record's epoch: a copy sealed with an older
            // one may be all that is left of a device whose messages live
            // on. Taken for no state, it would let a new key in on first
            // use. So its trusted key is kept until its epoch ends, while
            // its consumer has a message (the rule the sweep keeps Signal
            // state by); see below for its session.
            Err(e @ OpenError::Expired { .. }) => {
                let now = self.now();
                if self
                    .store
                    .has_live_message(business, peer.phone, now)
                    .await?
                {
                    lapsed = true;
                    self.vault.open_in_epoch(&sealed, business).await
                } else {
                    Err(e)
                }
            }
            opened => opened,
        };
        let loaded = match opened {
            Ok(opened)
                if opened.label().kind == Kind::SignalSession
                    && opened.label().region == self.store.region() =>
            {
                let expiry = opened.label().expiry;
                let epoch_end = opened.header.epoch().end();
                let plaintext = opened.plaintext;
                let loaded = Peer::decode(peer, &plaintext, &self.cache.incarnation(), expiry)
                    .map_err(|e| SignalError::Storage(StorageFailure::Corrupt(e.0)))?;
                if !lapsed {
                    loaded
                } else {
                    // Opened past its expiry (see above): its trusted key
                    // only, until its epoch ends (in memory too) or a new
                    // session renews it. Not its session: the messages that
                    // settle the counters receives written behind consumed
                    // may be swept, and a replay of one would decrypt again.
                    Peer {
                        identity: loaded.identity,
                        expiry: epoch_end,
                        sealed_expiry: expiry,
                        encoded_len: loaded.encoded_len,
                        ..Peer::empty(peer)
                    }
                }
            }
            Ok(_) => {
                return Err(SignalError::Storage(StorageFailure::Corrupt(
                    "peer record of another kind or region",
                )));
            }
            Err(
                OpenError::Expired { .. } | OpenError::EpochDestroyed | OpenError::UnknownEpoch,
            ) => Peer::empty(peer),
            Err(e) => return Err(SignalError::Storage(StorageFailure::Open(e))),
        };
        let loaded = Peer {
            generation,
            ..loaded
        };
        Ok((Box::new(loaded), taken))
    }

    /// The library's view of `state` for one operation.
    fn overlays(
        &self,
        account: Arc<Account>,
        state: &mut Peer,
    ) -> (SessionOverlay, IdentityOverlay) {
        (
            SessionOverlay::new(state.session.take()),
            IdentityOverlay {
                account,
                policy: self.config.identity_policy,
                peer: state.identity,
                written: false,
                replaced: false,
                refused: Mutex::new(None),
            },
        )
    }

    /// After a failed operation: keep the committed state unless the library
    /// wrote over it, in which case it is reloaded from the store next time.
    fn restore(
        (mut state, taken): (Box<Peer>, Taken<'_>),
        sessions: SessionOverlay,
        identities: &IdentityOverlay,
    ) {
        if !sessions.disturbed() && !identities.written {
            state.session = sessions.into_record();
            taken.put(state);
        }
    }

    /// Seal `state` (its expiry raised to at least `expiry`) and commit it
    /// with `batch`; only then does it become the cached state.
    async fn commit_peer(
        &self,
        business: BusinessId,
        peer: PeerId,
        (mut state, taken): (Box<Peer>, Taken<'_>),
        expiry: Timestamp,
        batch: Batch,
    ) -> Result<(), SignalError> {
        state.expiry = state.expiry.max(expiry);
        // On an error (or a drop at an await) the store keeps the old state,
        // and `taken` forgets any sends that only lived in memory safely.
        self.settle_left_unsure(business, &mut state).await?;
        self.seal_and_commit(business, peer, &mut state, batch)
            .await?;
        // The snapshot now covers every counter sent: nothing is pending.
        if let Some(session) = state.session.as_mut() {
            session.clear_pending_reservation();
        }
        state.dirty = false;
        state.sealed_expiry = state.expiry;
        taken.put(state);
        Ok(())
    }

    /// The epoch a record expiring at `expiry`, stored sealed to expire at
    /// `sealed_expiry`, is sealed in. Only a raise of the stored copy's
    /// expiry is held to the ceiling: one admitted before stays admitted
    /// when the clock steps back.
    fn epoch_for_seal(
        &self,
        expiry: Timestamp,
        sealed_expiry: Timestamp,
    ) -> Result<crate::keys::Epoch, SignalError> {
        let now = self.now();
        Ok(if expiry > sealed_expiry {
            self.vault.epoch_to_seal(expiry, now)?
        } else {
            self.vault.epoch_to_reseal(expiry, now)?
        })
    }

    async fn seal_and_commit(
        &self,
        business: BusinessId,
        peer: PeerId,
        state: &mut Peer,
        mut batch: Batch,
    ) -> Result<(), SignalError> {
        let now = self.now();
        let epoch = self.epoch_for_seal(state.expiry, state.sealed_expiry)?;
        let mut plaintext = Zeroizing::new(state.encode(&self.cache.incarnation()));
        let max = self.config.max_record_len;
        if plaintext.len() > max {
            return Err(SignalError::RecordTooLarge {
                len: plaintext.len(),
                max,
            });
        }
        // Read before the epoch's key is: see `Peer::key_shreds`.
        let shreds = self.shreds();
        let key = match state.key.take() {
            Some(key) if key.epoch() == epoch && !key.is_spent() && state.key_shreds == shreds => {
                key
            }
            _ => {
                // Boxed: a new record key is rare (a new peer, epoch or
                // key, or an epoch shredded).
                let epoch_key =
                    Box::pin(self.vault.keys().epoch_key_for_seal(business, epoch, now)).await?;
                state.key_shreds = shreds;
                Box::new(RecordKey::new(&epoch_key, MessageId::random()))
            }
        };
        let label = Label {
            kind: Kind::SignalSession,
            business,
            id: key.id(),
            expiry: state.expiry,
            region: self.store.region(),
        };
        let sealed = state
            .key
            .insert(key)
            .seal_owned(&label, std::mem::take(&mut *plaintext))?;
        batch.push(Op::PutPeer {
            business,
            peer,
            sealed,
        });
        self.commit(batch).await?;
        Ok(())
    }

    /// Refill the one-time prekey pool if fewer than the low-water mark of
    /// its keys are sound (a damaged key among those read counts as
    /// none: the upkeep deletes it, and refills if need be).
    async fn replenish_if_low(&self, business: BusinessId) -> Result<(), SignalError> {
        let keys = self.vault.keys();
        let wanted = self.config.prekey_low_water;
        if !account::holds_sound_one_time(keys, business, wanted).await? {
            self.maintain(business, None).await?;
        }
        Ok(())
    }

    /// Whether `peer` has a live session with `business`.
    pub async fn has_session(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<bool, SignalError> {
        let _guard = self.address_locks.lock((business, peer)).await;
        let (state, taken) = self.load_peer(business, peer).await?;
        let has = state.has_live_session();
        taken.put(state);
        Ok(has)
    }

    /// The devices of `phone` with stored state under `business`.
    pub async fn devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, SignalError> {
        Ok(self.store.peer_devices(business, phone).await?)
    }

    /// Take the store over (once, see [`Storage::take_over`]): from then
    /// on, another instance's writes of Signal state fail, and it stops.
    /// Done before the first session is read, and by the processor's first
    /// [`publish_keys`](crate::processor::Processor::publish_keys).
    pub(crate) async fn take_over(&self) -> Result<WriterId, StoreError> {
        if self.took_over.get().is_none() {
            self.took_over
                .get_or_try_init(|| self.store.take_over(self.writer))
                .await?;
        }
        Ok(self.writer)
    }

    /// Commit `batch` fenced by this instance: it fails whole as
    /// [`StoreError::Superseded`] once another instance has taken the store
    /// over, so that no session this one holds is persisted over the newer
    /// instance's (which would reissue its sending counters).
    pub(crate) async fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        batch.fenced(self.take_over().await?);
        self.store.commit(batch).await
    }

    /// Drop every peer's state held in memory, so that the next operation
    /// on each reads the store. Call it after deleting Signal state behind
    /// this instance's back: the [`Processor`](crate::processor::Processor)
    /// does after every sweep that deleted peers. Sends not yet persisted
    /// (see [`encrypt`](Self::encrypt)) are forgotten safely: no counter is
    /// reused.
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// Trust `identity` for one device, in place of its session and any
    /// key trusted for it: how a host approves an identity change (the
    /// consumer confirmed the new security code). The device's next
    /// first-contact message with that key, or a bundle with it, starts a
    /// session; a bundle with any other key is refused, and so is a message
    /// under [`IdentityPolicy::Refuse`] (under
    /// [`AcceptAndReport`](IdentityPolicy::AcceptAndReport) it is taken and
    /// reported, as any change is). A record that cannot be read (damaged,
    /// or not this device's) is replaced: the approval needs nothing of
    /// it; a key store or provider failing as it is read fails the
    /// approval, which changes nothing. The record lives at least until `expiry`, or until a sweep finds
    /// its consumer with no live message. Returns whether anything changed:
    /// `false` if the key was trusted already (the session is kept), or the
    /// device has no state (it never wrote, or retention deleted its state:
    /// its next key is trusted on first use).
    pub async fn trust_identity(
        &self,
        business: BusinessId,
        peer: PeerId,
        identity: DeviceIdentity,
        expiry: Timestamp,
    ) -> Result<bool, SignalError> {
        let unless = || async { Ok::<(), std::convert::Infallible>(()) };
        match self
            .trust_identity_unless(business, peer, identity, expiry, unless)
            .await?
        {
            Ok(changed) => Ok(changed),
            Err(never) => match never {},
        }
    }

    /// [`trust_identity`](Self::trust_identity), unless `unless` refuses
    /// it: awaited under the device's lock once the record is read, before
    /// anything is written, its answer kept until the write is made (a
    /// guard, say), its error (an `Ok(Err(_))`) refusing the approval with
    /// nothing written; it is asked whether or not the approval would change
    /// anything. The device's lock is taken first, and under what `unless`
    /// takes only the store's write is made: the record is read, and the
    /// key it is sealed under had, before.
    pub(crate) async fn trust_identity_unless<G, E, Fut>(
        &self,
        business: BusinessId,
        peer: PeerId,
        identity: DeviceIdentity,
        expiry: Timestamp,
        unless: impl FnOnce() -> Fut,
    ) -> Result<Result<bool, E>, SignalError>
    where
        Fut: Future<Output = Result<G, E>>,
    {
        let key = identity
            .key()
            .ok_or(SignalError::Storage(StorageFailure::Corrupt(
                "identity key",
            )))?;
        let _guard = self.address_locks.lock((business, peer)).await;
        let loaded = self.load_peer(business, peer).await;
        // Unreadable for good: damaged, or not this device's. A key store
        // or provider failing as the record is opened is no sign of that.
        let unreadable = loaded
            .as_ref()
            .err()
            .is_some_and(SignalError::record_unreadable);
        let (mut state, taken) = match loaded {
            Ok(loaded) => loaded,
            // Written over: the approval needs nothing of it.
            Err(_) if unreadable => {
                let empty = Peer {
                    generation: self.cache.generation(),
                    ..Peer::empty(peer)
                };
                (Box::new(empty), self.cache.taken((business, peer), false))
            }
            Err(e) => return Err(e),
        };
        let trusted = state
            .identity
            .is_some_and(|known| same_key(known.public_key(), key.public_key()));
        let stateless = !unreadable && state.session.is_none() && state.identity.is_none();
        let changes = !trusted && !stateless;
        if changes {
            // The key the write will seal under, had now: no call to the
            // key provider is made under what `unless` takes.
            let sealed = state.expiry.max(expiry);
            let epoch = self.epoch_for_seal(sealed, state.sealed_expiry)?;
            Box::pin(
                self.vault
                    .keys()
                    .epoch_key_for_seal(business, epoch, self.now()),
            )
            .await?;
        }
        // Refused: nothing written, the state read kept (a record that
        // could not be read is read again by the device's next operation).
        let _kept = match unless().await {
            Ok(kept) => kept,
            Err(e) => {
                if !unreadable {
                    taken.put(state);
                }
                return Ok(Err(e));
            }
        };
        if !changes {
            taken.put(state);
            return Ok(Ok(false));
        }
        // A fresh record: nothing of the session the old key set up is
        // kept (nor its counters left unsure: the device starts over).
        let approved = Peer {
            identity: Some(key),
            expiry: state.expiry,
            sealed_expiry: state.sealed_expiry,
            key: state.key.take(),
            key_shreds: state.key_shreds,
            generation: state.generation,
            ..Peer::empty(peer)
        };
        self.commit_peer(
            business,
            peer,
            (Box::new(approved), taken),
            expiry,
            Batch::new(),
        )
        .await?;
        Ok(Ok(true))
    }

    /// Delete every device's state for `phone` under `business` (sessions
    /// and trusted identities), in one commit: those it finds under their
    /// locks, so a device's first message decrypted while it takes them is
    /// forgotten too. Returns how many devices had state.
    ///
    /// It honours no legal hold, as the key manager's `_unchecked`
    /// destructions do not: check that none covers the consumer
    /// ([`Retention::holds`](crate::retention::Retention::holds)) before
    /// calling it. The processor never calls it; its sweep deletes a
    /// consumer's state only in a write the store refuses while a hold
    /// covers them.
    pub async fn forget(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<usize, SignalError> {
        let mut locked: Vec<u32> = self.store.peer_devices(business, phone).await?;
        // Read again under the locks: a device whose first message was
        // decrypted meanwhile is forgotten too, its lock taken with the
        // others'. The devices only grow, so this ends.
        let (_guards, devices) = loop {
            let guards = self
                .address_locks
                .lock_all(
                    locked
                        .iter()
                        .map(|&device| (business, PeerId { phone, device })),
                )
                .await;
            let devices = self.store.peer_devices(business, phone).await?;
            let added: Vec<u32> = devices
                .iter()
                .filter(|d| !locked.contains(d))
                .copied()
                .collect();
            if added.is_empty() {
                break (guards, devices);
            }
            drop(guards);
            locked.extend(added);
        };
        let peers: Vec<PeerId> = devices
            .iter()
            .map(|&device| PeerId { phone, device })
            .collect();
        // Out of memory before the deletion, which may land even if this
        // future is dropped while it waits for it.
        let shreds = self.shreds();
        let taken: Vec<Taken<'_>> = peers
            .iter()
            .map(|&peer| self.cache.take_to_delete((business, peer), shreds))
            .collect();
        let mut batch = Batch::new();
        for &peer in &peers {
            batch.push(Op::DeletePeer { business, peer });
        }
        self.commit(batch).await?;
        taken.into_iter().for_each(Taken::deleted);
        Ok(peers.len())
    }
}
