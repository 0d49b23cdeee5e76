//! Sealing and opening records under managed keys, with expiry enforced.
//!
//! A [`Vault`] ties the key hierarchy to the envelope and the clock: it seals
//! a record under the key of the epoch in which the record expires, and opens
//! a record only for the business that owns it, only before its expiry, and
//! only while its epoch key exists. Opening reads; it never changes stored state.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::{sync::Arc, time::Duration};
//! use custodian::envelope::{Kind, Label};
//! use custodian::ids::{BusinessId, MessageId};
//! use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
//! use custodian::store::{MemoryStore, Storage};
//! use custodian::time::{Clock, ManualClock, Timestamp};
//! use custodian::vault::{OpenError, Vault};
//!
//! let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
//! let store = Arc::new(MemoryStore::new());
//! let keys = KeyManager::new(
//!     Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
//!     store.clone(),
//! );
//! let vault = Vault::new(Arc::new(keys), Arc::new(clock.clone()), EpochLength::DEFAULT);
//!
//! let business = BusinessId::new(1).unwrap();
//! let label = Label {
//!     kind: Kind::InboundMessage,
//!     business,
//!     id: MessageId::random(),
//!     expiry: clock.now().saturating_add(Duration::from_secs(3600)),
//!     // The region of the store that keeps the record.
//!     region: store.region(),
//! };
//! let sealed = vault.seal(&label, b"hello").await?;
//! assert_eq!(*vault.open(&sealed, business).await?.plaintext, b"hello");
//!
//! clock.advance(Duration::from_secs(3600));
//! assert!(matches!(vault.open(&sealed, business).await, Err(OpenError::Expired { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::envelope::{self, Envelope, EnvelopeError, Header, Label};
use crate::ids::BusinessId;
use crate::keys::{Epoch, EpochKey, EpochLength, KeyError, KeyManager};
use crate::time::{Clock, Timestamp};

pub use crate::envelope::SealError;

/// How far past the retention [`CEILING`](crate::retention::CEILING) from now a sealed record's expiry
/// may be: one minute, so that a record the processor gave the full 30
/// days a moment ago is not refused because the clock stepped back since.
pub const CLOCK_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a record could not be opened. Each refusal a caller can act on has its
/// own variant; every cryptographic failure is the one opaque [`OpenError::Decrypt`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The bytes are not a well-formed envelope.
    #[error(transparent)]
    Malformed(#[from] EnvelopeError),
    /// The envelope belongs to another business.
    #[error("the record belongs to another business")]
    WrongBusiness,
    /// The record's retention has ended; it may not be read, swept or not.
    /// Reported once the record authenticated under its epoch key, so an
    /// altered expiry is [`Decrypt`](Self::Decrypt); where that key is gone,
    /// on the header's word (one out of reach for now is
    /// [`Key`](Self::Key)).
    #[error("the record expired at {expiry}")]
    Expired {
        /// When it expired.
        expiry: Timestamp,
    },
    /// The record's epoch key was destroyed: it is unreadable for good.
    #[error("the record's epoch key was destroyed")]
    EpochDestroyed,
    /// No key exists for the record's epoch.
    #[error("no key exists for the record's epoch")]
    UnknownEpoch,
    /// Authentication failed: wrong key or altered bytes. Deliberately opaque.
    #[error("decryption failed")]
    Decrypt,
    /// The key hierarchy failed (provider or store unavailable, corrupt key).
    #[error(transparent)]
    Key(KeyError),
}

impl From<KeyError> for OpenError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::EpochDestroyed { .. } => Self::EpochDestroyed,
            KeyError::UnknownEpoch { .. } => Self::UnknownEpoch,
            other => Self::Key(other),
        }
    }
}

/// An opened record. Its plaintext is wiped when dropped, and its `Debug`
/// shows the label and the plaintext's length, never the plaintext: for
/// some kinds (Signal sessions) that is key material, for the rest it is
/// message content.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated header.
    pub header: Header,
    /// The plaintext, wiped on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl Opened {
    /// The authenticated label.
    pub fn label(&self) -> &Label {
        self.header.label()
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("label", self.label())
            .field("plaintext_len", &self.plaintext.len())
            .finish_non_exhaustive()
    }
}

/// Seals and opens records under the keys a [`KeyManager`] manages.
pub struct Vault {
    keys: Arc<KeyManager>,
    clock: Arc<dyn Clock>,
    epoch_length: EpochLength,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("keys", &self.keys)
            .field("epoch_length", &self.epoch_length)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// A vault over `keys`, reading time from `clock`, grouping expiries into
    /// epochs of `epoch_length`.
    pub fn new(keys: Arc<KeyManager>, clock: Arc<dyn Clock>, epoch_length: EpochLength) -> Self {
        Self {
            keys,
            clock,
            epoch_length,
        }
    }

    /// The key manager, for rotation and shredding.
    pub fn keys(&self) -> &KeyManager {
        &self.keys
    }

    /// The clock the vault enforces expiry against.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The epoch that holds records expiring at `expiry`.
    pub fn epoch_of(&self, expiry: Timestamp) -> Option<Epoch> {
        Epoch::containing(expiry, self.epoch_length)
    }

    /// The epoch a record expiring at `expiry` is sealed in at `now`, if it
    /// may be sealed: its expiry in the future and at most the retention
    /// [`CEILING`] away (give or take [`CLOCK_TOLERANCE`]). Whoever seals
    /// records under the vault's keys, [`seal`](Self::seal) and the Signal
    /// sessions, asks it first.
    pub(crate) fn epoch_to_seal(
        &self,
        expiry: Timestamp,
        now: Timestamp,
    ) -> Result<Epoch, SealError> {
        envelope::check_expiry(expiry, now)?;
        self.epoch_of(expiry)
            .ok_or(SealError::ExpiryOutOfRange(expiry))
    }

    /// The epoch a record is sealed in again at `now`, with an expiry that
    /// [`epoch_to_seal`](Self::epoch_to_seal) admitted before: in the
    /// future, and not held to the ceiling again, which a clock stepped
    /// back since would have moved.
    pub(crate) fn epoch_to_reseal(
        &self,
        expiry: Timestamp,
        now: Timestamp,
    ) -> Result<Epoch, SealError> {
        if expiry <= now {
            return Err(SealError::ExpiryNotInFuture { expiry, now });
        }
        self.epoch_of(expiry)
            .ok_or(SealError::ExpiryOutOfRange(expiry))
    }

    /// Seal `plaintext` as the record `label` describes, under the key of the
    /// epoch in which it expires (created on first use). The expiry must be
    /// in the future and at most the retention [`CEILING`](crate::retention::CEILING) away (give or
    /// take [`CLOCK_TOLERANCE`]).
    pub async fn seal(&self, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        // Before the epoch's key is made: a refused seal changes nothing.
        envelope::check_len(plaintext.len())?;
        let now = self.clock.now();
        let epoch = self.epoch_to_seal(label.expiry, now)?;
        // `epoch_to_seal` checked the expiry.
        let seal = |key: &EpochKey| envelope::seal_admitted(key, label, plaintext);
        match self.keys.with_cached_epoch_key(label.business, epoch, seal) {
            Some(sealed) => sealed,
            // Once per epoch: boxed so the common path's future stays small.
            None => {
                seal(&*Box::pin(self.keys.epoch_key_for_seal(label.business, epoch, now)).await?)
            }
        }
    }

    /// Open `bytes` on behalf of `business`: refused if the record belongs to
    /// another business, has expired, or its epoch key is gone.
    pub async fn open(&self, bytes: &[u8], business: BusinessId) -> Result<Opened, OpenError> {
        self.open_until(bytes, business, false).await
    }

    /// [`open`](Self::open) a record past its expiry, until the end of the
    /// epoch it is sealed in: one whose expiry, raised by writes made in
    /// memory only, may lie later in that epoch than the sealed copy says
    /// (a Signal session written behind). Past the epoch, nothing opens.
    pub(crate) async fn open_in_epoch(
        &self,
        bytes: &[u8],
        business: BusinessId,
    ) -> Result<Opened, OpenError> {
        self.open_until(bytes, business, true).await
    }

    /// Open `bytes` until its expiry, or, `in_epoch`, its epoch's end.
    async fn open_until(
        &self,
        bytes: &[u8],
        business: BusinessId,
        in_epoch: bool,
    ) -> Result<Opened, OpenError> {
        let envelope = Envelope::parse(bytes)?;
        let header = *envelope.header();
        let label = header.label();
        if label.business != business {
            return Err(OpenError::WrongBusiness);
        }
        let until = if in_epoch {
            header.epoch().end()
        } else {
            label.expiry
        };
        // Authenticated before the expiry is believed: an altered header is
        // `Decrypt`, like any other altered byte. Only where the key is gone
        // can an expired record not be told from a forged one.
        let expired = || OpenError::Expired {
            expiry: label.expiry,
        };
        let open = |key: &EpochKey| envelope.open(key).map_err(|_| OpenError::Decrypt);
        let opened = match self
            .keys
            .with_cached_epoch_key(business, header.epoch(), open)
        {
            Some(opened) => opened,
            None => match Box::pin(self.keys.epoch_key(business, header.epoch())).await {
                Ok(key) => open(&key),
                // Gone (destroyed, or never made): past its expiry, on the
                // header's word. Unreachable for now (a provider or store
                // down) is no answer about the record.
                Err(KeyError::EpochDestroyed { .. } | KeyError::UnknownEpoch { .. })
                    if self.clock.now() >= until =>
                {
                    return Err(expired());
                }
                Err(e) => return Err(e.into()),
            },
        };
        let plaintext = Zeroizing::new(opened?);
        if self.clock.now() >= until {
            return Err(expired());
        }
        Ok(Opened { header, plaintext })
    }
}
