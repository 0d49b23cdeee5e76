//! The at-rest envelope: how one record is sealed, byte by byte.
//!
//! Every record the crate stores (a message, a Signal session) is one
//! envelope: a header naming whose it is, what it is, until when it may be
//! read, where it may live and under which key it is sealed, then the
//! AES-256-GCM ciphertext. The whole header is the AEAD's associated data, so
//! no byte of it can be changed without the envelope failing to open.
//!
//! # Format, version 1
//!
//! All integers are big-endian. `r` is the region's length.
//!
//! | offset | length | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | magic | `43 53 54 44` (`"CSTD"`) |
//! | 4 | 1 | version | `01` |
//! | 5 | 1 | suite | `01`: DEK by HKDF-SHA256, commitment by SHA-256, AES-256-GCM |
//! | 6 | 1 | kind | [`Kind`]: `01` inbound message, `02` outbound message, `03` Signal session |
//! | 7 | 8 | business | [`BusinessId`], not zero |
//! | 15 | 16 | id | the record's [`MessageId`] |
//! | 31 | 8 | epoch | ms since the Unix epoch at which the epoch key is destroyed ([`Epoch`]) |
//! | 39 | 8 | expiry | ms since the Unix epoch after which the record may not be read; `epoch − 24 h ≤ expiry < epoch` (the longest epoch is a day) |
//! | 47 | 1 | region length `r` | 2 to 15 |
//! | 48 | `r` | region | [`Region`]: `a-z`, `0-9`, inner `-` |
//! | 48 + r | 12 | nonce | random |
//! | 60 + r | 32 | commitment | `SHA-256("custodian/v1/commit" ‖ DEK)` |
//! | 92 + r | 4 | ciphertext length `n` | 16 to [`MAX_CIPHERTEXT_LEN`], tag included |
//! | 96 + r | `n` | ciphertext ‖ tag | AES-256-GCM(DEK, nonce, AAD = bytes `0 .. 96 + r`) |
//!
//! `DEK = HKDF-SHA256-Expand(epoch key, "custodian/v1/dek" ‖ suite ‖ id, 32)`.
//! The envelope adds `112 + r` bytes to its plaintext: 114 with a two-letter
//! region, never more than 127.
//!
//! The header names no KEK id or version, unlike the design's first
//! sketch: a record is sealed under its business's epoch key (named by the
//! business and the epoch), which a KEK only wraps. A KEK rotation rewraps
//! the epoch keys and leaves every envelope as it is; binding the version
//! into each record would mean rewriting every record on every rotation.
//!
//! # Parsing
//!
//! [`Envelope::parse`] is total: any input gives an envelope or one precise
//! [`EnvelopeError`], never a panic, and it allocates nothing (the envelope
//! borrows its input). Unknown versions, suites and kinds, out-of-range
//! lengths, an expiry outside its epoch and trailing bytes are all errors,
//! so every valid envelope has exactly one encoding and
//! `Envelope::parse(b)?.to_bytes() == b`. The parsed envelope keeps the header
//! bytes it read, and opening authenticates exactly those.
//!
//! ```
//! use custodian::envelope::{Envelope, EnvelopeError, Field};
//!
//! assert_eq!(Envelope::parse(b"CSTD"), Err(EnvelopeError::Truncated(Field::Version)));
//! assert_eq!(Envelope::parse(b"JUNK"), Err(EnvelopeError::BadMagic));
//! ```

use std::fmt;

use subtle::ConstantTimeEq;

use crate::aead::{Cipher, NONCE_LEN, TAG_LEN};
use crate::ids::{BusinessId, MessageId, Region};
use rand::Rng;
use zeroize::Zeroizing;

use crate::keys::{Epoch, EpochKey, EpochLength, KeyError};
use crate::retention::CEILING;
use crate::rng::OsRng;
use crate::time::Timestamp;
use crate::vault::CLOCK_TOLERANCE;

mod codec;
#[cfg(test)]
mod tests;

use codec::Reader;

/// The four bytes every envelope starts with.
pub const MAGIC: [u8; 4] = *b"CSTD";
/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Length of the key-commitment value.
pub const COMMITMENT_LEN: usize = 32;
/// Largest plaintext a v1 envelope holds: 64 MiB.
pub const MAX_PLAINTEXT_LEN: usize = 64 << 20;
/// Largest ciphertext length field accepted: the largest plaintext plus its tag.
pub const MAX_CIPHERTEXT_LEN: usize = MAX_PLAINTEXT_LEN + TAG_LEN;
/// Header length before the region.
const FIXED_HEAD: usize = 48;
/// Header length after the region.
const FIXED_TAIL: usize = NONCE_LEN + COMMITMENT_LEN + 4;
/// Longest possible header.
pub const MAX_HEADER_LEN: usize = FIXED_HEAD + Region::MAX_LEN + FIXED_TAIL;

/// The most sealing adds to a plaintext (header and tag): a buffer with this
/// much spare room is sealed in place by `RecordKey::seal_owned`.
pub(crate) const SEAL_ROOM: usize = MAX_HEADER_LEN + TAG_LEN;

/// The cryptographic suite of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// DEK by HKDF-SHA256-Expand from the epoch key, key commitment by
    /// SHA-256 of the DEK, AES-256-GCM with a 96-bit random nonce.
    V1 = 1,
}

/// What an envelope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A message a consumer sent to the business.
    InboundMessage = 1,
    /// A message the business sends to a consumer.
    OutboundMessage = 2,
    /// A Signal session with one consumer device.
    SignalSession = 3,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: &'static [Self] = &[
        Self::InboundMessage,
        Self::OutboundMessage,
        Self::SignalSession,
    ];

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u8 == code)
    }
}

/// The header field a truncated input ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant is the field of the same name in the format table
pub enum Field {
    Magic,
    Version,
    Suite,
    Kind,
    Business,
    Id,
    Epoch,
    Expiry,
    RegionLength,
    Region,
    Nonce,
    Commitment,
    CiphertextLength,
    Ciphertext,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why bytes are not a well-formed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The input ended inside this field.
    #[error("envelope truncated in field {0}")]
    Truncated(Field),
    /// The input does not start with [`MAGIC`].
    #[error("not an envelope: bad magic")]
    BadMagic,
    /// A format version this crate does not read.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// A suite this crate does not know.
    #[error("unknown suite {0}")]
    UnknownSuite(u8),
    /// A kind this crate does not know.
    #[error("unknown kind {0}")]
    UnknownKind(u8),
    /// Business id zero.
    #[error("business id is zero")]
    ZeroBusiness,
    /// The region length is outside 2..=15.
    #[error("region length {0} is outside 2..=15")]
    RegionLength(u8),
    /// The region has characters outside `a-z`, `0-9`, inner `-`.
    #[error("region name is malformed")]
    BadRegion,
    /// The expiry is not before the epoch's end: the key would die first.
    #[error("expiry is not before the end of its epoch")]
    ExpiryNotBeforeEpoch,
    /// The expiry is before the earliest start of its epoch (its end less
    /// the longest epoch, a day): no seal writes that, so the header is
    /// damaged.
    #[error("expiry is before the earliest start of its epoch")]
    ExpiryBeforeEpoch,
    /// The ciphertext length is below the tag length or above the maximum.
    #[error("ciphertext length {0} is outside 16..={MAX_CIPHERTEXT_LEN}")]
    CiphertextLength(u32),
    /// Bytes follow the ciphertext.
    #[error("{0} bytes after the end of the envelope")]
    TrailingBytes(usize),
}

/// Why a record could not be sealed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The plaintext is longer than [`MAX_PLAINTEXT_LEN`].
    #[error("plaintext of {0} bytes exceeds the envelope maximum")]
    TooLarge(usize),
    /// The key belongs to another business than the label names.
    #[error("the epoch key belongs to another business")]
    WrongKey,
    /// The label's expiry is not within one maximum epoch length before the
    /// key's epoch ends: the key would be destroyed before the record
    /// expires, or long after.
    #[error("expiry {expiry} does not fall in {epoch}")]
    ExpiryOutsideEpoch {
        /// The label's expiry.
        expiry: Timestamp,
        /// The key's epoch.
        epoch: Epoch,
    },
    /// The expiry is not in the future.
    #[error("expiry {expiry} is not after now ({now})")]
    ExpiryNotInFuture {
        /// The expiry asked for.
        expiry: Timestamp,
        /// The clock's reading.
        now: Timestamp,
    },
    /// The expiry is further from now than the retention ceiling
    /// ([`CEILING`]) allows.
    #[error("expiry {expiry} is more than the 30-day retention ceiling after now ({now})")]
    ExpiryBeyondCeiling {
        /// The expiry asked for.
        expiry: Timestamp,
        /// The clock's reading.
        now: Timestamp,
    },
    /// The expiry is so far away that no epoch can hold it.
    #[error("expiry {0} is beyond the last representable epoch")]
    ExpiryOutOfRange(Timestamp),
    /// A record's key has sealed as many times as one key may (2^24): a
    /// record sealed again that often needs a fresh key.
    #[error("the record key has sealed as many times as it may")]
    KeySpent,
    /// The label names another record than the record key was derived for.
    #[error("the label names another record than the record key's")]
    WrongRecord,
    /// The epoch key could not be had (destroyed epoch, provider or store failure).
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The authenticated facts about a record that its owner chooses: sealed into
/// the header, checked on every open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label {
    /// What the record is.
    pub kind: Kind,
    /// Whose it is.
    pub business: BusinessId,
    /// Its id (a message's id; a fresh id for other records).
    pub id: MessageId,
    /// When it stops being readable.
    pub expiry: Timestamp,
    /// Where it may be stored.
    pub region: Region,
}

/// A parsed header. Read-only: headers are made only by sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    suite: Suite,
    label: Label,
    epoch: Epoch,
    nonce: [u8; NONCE_LEN],
    commitment: [u8; COMMITMENT_LEN],
}

impl Header {
    /// The suite.
    pub fn suite(&self) -> Suite {
        self.suite
    }
    /// The label: kind, business, id, expiry, region.
    pub fn label(&self) -> &Label {
        &self.label
    }
    /// The epoch whose key seals the record.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// The AEAD nonce.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }
    /// The key-commitment value.
    pub fn commitment(&self) -> &[u8; COMMITMENT_LEN] {
        &self.commitment
    }
}

/// A parsed envelope, borrowing the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    header: Header,
    header_bytes: &'a [u8],
    ciphertext: &'a [u8],
}

/// The envelope failed to open: wrong key, or any byte altered. One opaque
/// error, so a caller learns nothing about which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecryptError;

impl<'a> Envelope<'a> {
    /// Parse `bytes` as exactly one envelope. Total: never panics, allocates nothing.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader::new(bytes);
        if r.array::<4>(Field::Magic)? != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        match r.u8(Field::Version)? {
            VERSION => {}
            v => return Err(EnvelopeError::UnsupportedVersion(v)),
        }
        let suite = match r.u8(Field::Suite)? {
            1 => Suite::V1,
            s => return Err(EnvelopeError::UnknownSuite(s)),
        };
        let kind = r.u8(Field::Kind)?;
        let kind = Kind::from_code(kind).ok_or(EnvelopeError::UnknownKind(kind))?;
        let business =
            BusinessId::new(r.u64(Field::Business)?).ok_or(EnvelopeError::ZeroBusiness)?;
        let id = MessageId::from_bytes(r.array(Field::Id)?);
        let epoch = Epoch::ending_at(Timestamp::from_millis(r.u64(Field::Epoch)?));
        let expiry = Timestamp::from_millis(r.u64(Field::Expiry)?);
        let region_len = r.u8(Field::RegionLength)?;
        if !(Region::MIN_LEN..=Region::MAX_LEN).contains(&usize::from(region_len)) {
            return Err(EnvelopeError::RegionLength(region_len));
        }
        let region = Region::from_bytes(r.take(usize::from(region_len), Field::Region)?)
            .map_err(|_| EnvelopeError::BadRegion)?;
        let nonce = r.array(Field::Nonce)?;
        let commitment = r.array(Field::Commitment)?;
        let ct_len = r.u32(Field::CiphertextLength)?;
        if expiry >= epoch.end() {
            return Err(EnvelopeError::ExpiryNotBeforeEpoch);
        }
        if expiry < epoch.end().saturating_sub(EpochLength::MAX) {
            return Err(EnvelopeError::ExpiryBeforeEpoch);
        }
        let n = usize::try_from(ct_len).map_err(|_| EnvelopeError::CiphertextLength(ct_len))?;
        if !(TAG_LEN..=MAX_CIPHERTEXT_LEN).contains(&n) {
            return Err(EnvelopeError::CiphertextLength(ct_len));
        }
        let header_bytes = r.consumed();
        let ciphertext = r.take(n, Field::Ciphertext)?;
        r.finish()?;
        Ok(Self {
            header: Header {
                suite,
                label: Label {
                    kind,
                    business,
                    id,
                    expiry,
                    region,
                },
                epoch,
                nonce,
                commitment,
            },
            header_bytes,
            ciphertext,
        })
    }

    /// The envelope's bytes: exactly the bytes it was parsed from.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.header_bytes, self.ciphertext].concat()
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header bytes as read: the associated data that opening authenticates.
    pub fn header_bytes(&self) -> &'a [u8] {
        self.header_bytes
    }

    /// Ciphertext then tag.
    pub fn ciphertext(&self) -> &'a [u8] {
        self.ciphertext
    }

    /// The header written again from the parsed fields, as sealing writes
    /// it (for the fuzz checks, `crate::fuzzing::envelope_parse`): equal to
    /// [`header_bytes`](Self::header_bytes) exactly when the parser read
    /// every header byte into a field and accepted one spelling of it.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn reencode_header(&self) -> Vec<u8> {
        let Header {
            suite,
            label,
            epoch,
            nonce,
            commitment,
        } = &self.header;
        // `HeaderBytes` writes suite 1; a second suite must be written here too.
        match suite {
            Suite::V1 => {}
        }
        // Parsing took at least the tag.
        let plaintext_len = self.ciphertext.len().saturating_sub(TAG_LEN);
        HeaderBytes::new(label, *epoch, nonce, commitment, plaintext_len)
            .as_slice()
            .to_vec()
    }

    /// Check the key commitment, then authenticate and decrypt under `key`,
    /// which must be the key of this envelope's business and epoch.
    pub(crate) fn open(&self, key: &EpochKey) -> Result<Vec<u8>, DecryptError> {
        if key.business() != self.header.label.business || key.epoch() != self.header.epoch {
            return Err(DecryptError);
        }
        let dek = key.dek(self.header.suite as u8, &self.header.label.id);
        if !bool::from(dek.commitment().ct_eq(&self.header.commitment)) {
            return Err(DecryptError);
        }
        dek.cipher()
            .open(&self.header.nonce, self.header_bytes, self.ciphertext)
            .map_err(|_| DecryptError)
    }
}

/// Seal `plaintext` as the record `label` describes, under `key`: the key of
/// the label's business for an epoch in which the label's expiry falls.
///
/// This is the whole cryptographic cost of sealing; a
/// [`Vault`](crate::vault::Vault) adds finding the key. Use it to seal many
/// records of one epoch with a key fetched once from
/// [`KeyManager::epoch_key_for_seal`](crate::keys::KeyManager::epoch_key_for_seal):
/// once its epoch is destroyed (shredded early, or ended and swept) by
/// that key manager, the key seals no more
/// ([`KeyError::EpochDestroyed`]); nor once a destruction of it failed,
/// which may have landed: fetch the key again, and the key manager says.
/// The label's expiry must fall in the key's epoch, be after `now` (the
/// caller's clock reading) and at most the retention [`CEILING`] (give or
/// take [`CLOCK_TOLERANCE`]) from it, as [`Vault::seal`](crate::vault::Vault::seal)
/// holds it: the key manager, which cannot know an epoch's length, makes
/// keys for epochs up to a day further.
pub fn seal(
    key: &EpochKey,
    label: &Label,
    plaintext: &[u8],
    now: Timestamp,
) -> Result<Vec<u8>, SealError> {
    check_expiry(label.expiry, now)?;
    seal_admitted(key, label, plaintext)
}

/// [`seal`] of a label whose expiry was checked already, by
/// [`check_expiry`] (as a vault's sealing does).
pub(crate) fn seal_admitted(
    key: &EpochKey,
    label: &Label,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    seal_with_nonce(key, label, &nonce, plaintext)
}

/// Whether a record expiring at `expiry` may be sealed at `now`: its expiry
/// in the future and at most the retention [`CEILING`] away (give or take
/// [`CLOCK_TOLERANCE`]). Nothing stays readable past the ceiling: no
/// configuration, and no caller, can raise it.
pub(crate) fn check_expiry(expiry: Timestamp, now: Timestamp) -> Result<(), SealError> {
    if expiry > now.saturating_add(CEILING + CLOCK_TOLERANCE) {
        return Err(SealError::ExpiryBeyondCeiling { expiry, now });
    }
    if expiry <= now {
        return Err(SealError::ExpiryNotInFuture { expiry, now });
    }
    Ok(())
}

/// [`seal`] with a caller-chosen nonce, which must never repeat for one key
/// and record id: for known-answer tests and fuzzers only.
pub(crate) fn seal_with_nonce(
    key: &EpochKey,
    label: &Label,
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if key.is_destroyed() {
        // A record sealed now could never be opened: it would be lost.
        return Err(SealError::Key(KeyError::EpochDestroyed {
            business: key.business(),
            epoch: key.epoch(),
        }));
    }
    check_seal(key.business(), key.epoch(), label, plaintext)?;
    let dek = key.dek(Suite::V1 as u8, &label.id);
    write_sealed(
        &dek.cipher(),
        &dek.commitment(),
        key.epoch(),
        label,
        nonce,
        plaintext,
    )
}

/// Whether a plaintext of `len` bytes may be sealed: at most
/// [`MAX_PLAINTEXT_LEN`].
pub(crate) fn check_len(len: usize) -> Result<(), SealError> {
    if len > MAX_PLAINTEXT_LEN {
        return Err(SealError::TooLarge(len));
    }
    Ok(())
}

/// The checks every seal makes before any cryptography.
fn check_seal(
    business: BusinessId,
    epoch: Epoch,
    label: &Label,
    plaintext: &[u8],
) -> Result<(), SealError> {
    check_len(plaintext.len())?;
    if business != label.business {
        return Err(SealError::WrongKey);
    }
    if label.expiry >= epoch.end() || label.expiry < epoch.end().saturating_sub(EpochLength::MAX) {
        return Err(SealError::ExpiryOutsideEpoch {
            expiry: label.expiry,
            epoch,
        });
    }
    Ok(())
}

/// A header, built on the stack.
struct HeaderBytes {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl HeaderBytes {
    /// The header of `label` sealed in `epoch` with `nonce` and `commitment`,
    /// for a plaintext of `plaintext_len` bytes (checked by [`check_seal`]).
    fn new(
        label: &Label,
        epoch: Epoch,
        nonce: &[u8; NONCE_LEN],
        commitment: &[u8; COMMITMENT_LEN],
        plaintext_len: usize,
    ) -> Self {
        let region = label.region.as_bytes();
        let r = region.len();
        // Bounded by MAX_CIPHERTEXT_LEN (checked), which fits in u32.
        let ct_len = (plaintext_len + TAG_LEN) as u32;
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4..7].copy_from_slice(&[VERSION, Suite::V1 as u8, label.kind as u8]);
        bytes[7..15].copy_from_slice(&label.business.get().to_be_bytes());
        bytes[15..31].copy_from_slice(label.id.as_bytes());
        bytes[31..39].copy_from_slice(&epoch.end().as_millis().to_be_bytes());
        bytes[39..47].copy_from_slice(&label.expiry.as_millis().to_be_bytes());
        // A region is at most 15 bytes.
        bytes[47] = r as u8;
        bytes[48..48 + r].copy_from_slice(region);
        bytes[48 + r..60 + r].copy_from_slice(nonce);
        bytes[60 + r..92 + r].copy_from_slice(commitment);
        bytes[92 + r..96 + r].copy_from_slice(&ct_len.to_be_bytes());
        Self {
            bytes,
            len: FIXED_HEAD + r + FIXED_TAIL,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Write header then ciphertext, the header authenticated as associated data.
/// The caller has run [`check_seal`].
fn write_sealed(
    cipher: &Cipher,
    commitment: &[u8; COMMITMENT_LEN],
    epoch: Epoch,
    label: &Label,
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let header = HeaderBytes::new(label, epoch, nonce, commitment, plaintext.len());
    let mut out = Vec::with_capacity(header.len + plaintext.len() + TAG_LEN);
    out.extend_from_slice(header.as_slice());
    cipher
        .seal_appending(nonce, plaintext, &mut out)
        .map_err(|_| SealError::TooLarge(plaintext.len()))?;
    Ok(out)
}

/// The key of one record within one epoch, derived once and kept, for a
/// record that is sealed again and again in place (a Signal session after
/// every message). Each seal draws a fresh random nonce; the key refuses to
/// seal more than [`RecordKey::MAX_SEALS`] times, far inside AES-GCM's bound
/// of 2^32 random nonces per key, so the holder derives a new record id.
pub(crate) struct RecordKey {
    business: BusinessId,
    epoch: Epoch,
    id: MessageId,
    cipher: Cipher,
    commitment: [u8; COMMITMENT_LEN],
    seals: u32,
}

impl RecordKey {
    /// Seals allowed under one record key.
    pub(crate) const MAX_SEALS: u32 = 1 << 24;

    /// The record key of record `id` under `key`.
    pub(crate) fn new(key: &EpochKey, id: MessageId) -> Self {
        let dek = key.dek(Suite::V1 as u8, &id);
        Self {
            business: key.business(),
            epoch: key.epoch(),
            id,
            cipher: dek.cipher(),
            commitment: dek.commitment(),
            seals: 0,
        }
    }

    /// The epoch the key belongs to.
    pub(crate) fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The record id the key belongs to.
    pub(crate) fn id(&self) -> MessageId {
        self.id
    }

    /// Whether the key may seal again.
    pub(crate) fn is_spent(&self) -> bool {
        self.seals >= Self::MAX_SEALS
    }

    /// Seal `plaintext` as `label`, which must name this key's record. The
    /// plaintext is wiped before this returns, on success and on refusal.
    ///
    /// If the plaintext's buffer has room for the header and tag, the
    /// envelope is written and encrypted there in place: no copy of the
    /// plaintext is made, so none is left to wipe. Otherwise it is written
    /// into one buffer allocated at its exact final size (growing the
    /// plaintext's own buffer could reallocate and free a copy unwiped).
    pub(crate) fn seal_owned(
        &mut self,
        label: &Label,
        plaintext: Vec<u8>,
    ) -> Result<Vec<u8>, SealError> {
        let mut plaintext = Zeroizing::new(plaintext);
        check_seal(self.business, self.epoch, label, &plaintext)?;
        if label.id != self.id {
            return Err(SealError::WrongRecord);
        }
        if self.is_spent() {
            return Err(SealError::KeySpent);
        }
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.seals += 1;
        let len = plaintext.len();
        let header = HeaderBytes::new(label, self.epoch, &nonce, &self.commitment, len);
        let sealed_len = header.len + len + TAG_LEN;
        let mut out = if plaintext.capacity() >= sealed_len {
            // Within capacity: neither the resize nor the tag reallocates.
            plaintext.resize(header.len + len, 0);
            plaintext.copy_within(..len, header.len);
            plaintext[..header.len].copy_from_slice(header.as_slice());
            plaintext
        } else {
            // Wrapped until encrypted, so a failure wipes the copy too.
            let mut out = Zeroizing::new(Vec::with_capacity(sealed_len));
            out.extend_from_slice(header.as_slice());
            out.extend_from_slice(&plaintext);
            out
        };
        self.cipher
            .seal_in_place(&nonce, header.len, &mut out)
            .map_err(|_| SealError::TooLarge(len))?;
        // Only ciphertext is left: take it out of the zeroizing wrapper.
        Ok(std::mem::take(&mut *out))
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("business", &self.business)
            .field("epoch", &self.epoch)
            .field("id", &self.id)
            .field("seals", &self.seals)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod record_key_tests {
    use super::*;
    use crate::fuzzing::fixture_epoch_key;

    #[test]
    fn record_key_seals_in_place_or_into_one_exact_allocation() {
        let business = BusinessId::new(7).unwrap();
        let end = Timestamp::from_millis(1_767_229_200_000);
        let key = fixture_epoch_key(business, Epoch::ending_at(end));
        let label = Label {
            kind: Kind::SignalSession,
            business,
            id: MessageId::from_bytes([9; 16]),
            expiry: end.saturating_sub(std::time::Duration::from_secs(1)),
            region: "eu".parse().unwrap(),
        };
        let mut record = RecordKey::new(&key, label.id);
        for len in [0, 1, 1000, 64 * 1024] {
            // A buffer with no spare room: growing it in place would move it.
            let plaintext = vec![0x5a; len];
            let sealed = record.seal_owned(&label, plaintext.clone()).unwrap();
            assert_eq!(sealed.capacity(), sealed.len(), "allocated once, exactly");
            // Byte for byte what `seal` writes (the format the KAT vectors pin).
            let nonce = *Envelope::parse(&sealed).unwrap().header().nonce();
            assert_eq!(
                seal_with_nonce(&key, &label, &nonce, &plaintext).unwrap(),
                sealed
            );

            // A buffer with room for the header and tag: sealed where it is.
            let mut roomy = Vec::with_capacity(len + SEAL_ROOM);
            roomy.extend_from_slice(&plaintext);
            let at = roomy.as_ptr();
            let sealed = record.seal_owned(&label, roomy).unwrap();
            assert_eq!(sealed.as_ptr(), at, "sealed in place");
            let nonce = *Envelope::parse(&sealed).unwrap().header().nonce();
            assert_eq!(
                seal_with_nonce(&key, &label, &nonce, &plaintext).unwrap(),
                sealed
            );
        }
        // Room to the byte is enough; a byte short, it is copied out.
        let exact = record.seal_owned(&label, vec![0x5a; 1000]).unwrap().len();
        for (capacity, in_place) in [(exact, true), (exact - 1, false)] {
            let mut plaintext = Vec::with_capacity(capacity);
            plaintext.extend_from_slice(&[0x5a; 1000]);
            let at = plaintext.as_ptr();
            let sealed = record.seal_owned(&label, plaintext).unwrap();
            assert_eq!(sealed.as_ptr() == at, in_place);
            assert_eq!(sealed.len(), exact);
        }
    }
}
