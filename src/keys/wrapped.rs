//! Keys at rest: wrapped under a KEK version, never in clear.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;
use super::epoch::Epoch;
use super::secret::Kek;
use crate::aead::NONCE_LEN;
use crate::ids::BusinessId;
use crate::rng::OsRng;
use crate::time::Timestamp;

/// What a wrapped key is for. Stored as its one-byte code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
#[non_exhaustive]
pub enum KeyKind {
    /// An expiry epoch's key; the id is the epoch's end in milliseconds.
    Epoch = 1,
    /// A business's Signal identity key pair and registration id; id 0.
    SignalIdentity = 2,
    /// A Signal signed prekey; the id is the prekey id.
    SignalSignedPreKey = 3,
    /// A Signal one-time prekey; the id is the prekey id.
    SignalPreKey = 4,
    /// The key of a business's phone-number index (HMAC); id 0.
    PhoneIndex = 5,
}

impl KeyKind {
    /// Every kind, in code order.
    pub const ALL: &'static [Self] = &[
        Self::Epoch,
        Self::SignalIdentity,
        Self::SignalSignedPreKey,
        Self::SignalPreKey,
        Self::PhoneIndex,
    ];

    /// The stored code.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for KeyKind {
    type Error = KeyError;

    fn try_from(code: u8) -> Result<Self, KeyError> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.code() == code)
            .ok_or(KeyError::UnknownKeyKind(code))
    }
}

impl From<KeyKind> for u8 {
    fn from(k: KeyKind) -> u8 {
        k.code()
    }
}

/// Names one wrapped key: whose, what for, which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId {
    /// The business that owns the key.
    pub business: BusinessId,
    /// What the key is for.
    pub kind: KeyKind,
    /// Which one, within the business and kind.
    pub id: u64,
}

impl KeyId {
    /// The id of `business`'s key for `epoch`.
    pub fn epoch(business: BusinessId, epoch: Epoch) -> Self {
        Self {
            business,
            kind: KeyKind::Epoch,
            id: epoch.end().as_millis(),
        }
    }

    /// The id of `business`'s phone index key.
    pub fn phone_index(business: BusinessId) -> Self {
        Self {
            business,
            kind: KeyKind::PhoneIndex,
            id: 0,
        }
    }

    /// The associated data binding a wrapped key to its name and KEK version,
    /// so a blob moved to another row, or relabelled, fails to unwrap.
    fn aad(&self, kek_version: u32) -> [u8; 38] {
        let mut aad = [0u8; 38];
        aad[..17].copy_from_slice(b"custodian/v1/wrap");
        aad[17..25].copy_from_slice(&self.business.get().to_be_bytes());
        aad[25] = self.kind.code();
        aad[26..34].copy_from_slice(&self.id.to_be_bytes());
        aad[34..].copy_from_slice(&kek_version.to_be_bytes());
        aad
    }
}

/// A key wrapped under one KEK version: AES-256-GCM, `blob` = nonce ‖
/// ciphertext ‖ tag, with the key's [`KeyId`] and KEK version as associated data.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The key's name.
    pub id: KeyId,
    /// The KEK version it is wrapped under.
    pub kek_version: u32,
    /// Nonce, ciphertext and tag.
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("id", &self.id)
            .field("kek_version", &self.kek_version)
            .field("blob_len", &self.blob.len())
            .finish()
    }
}

impl WrappedKey {
    /// Wrap `secret` as `id` under `kek`.
    pub(crate) fn seal(id: KeyId, kek: &Kek, secret: &[u8]) -> Result<Self, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        Self::seal_with(id, kek, &nonce, secret)
    }

    /// Wrap with a caller-chosen nonce (never do this outside fixtures):
    /// the fuzz checks' way to re-make a blob that opened.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn seal_with_nonce(
        id: KeyId,
        kek: &Kek,
        nonce: &[u8; NONCE_LEN],
        secret: &[u8],
    ) -> Result<Self, KeyError> {
        Self::seal_with(id, kek, nonce, secret)
    }

    /// [`seal`](Self::seal) under `nonce`.
    fn seal_with(
        id: KeyId,
        kek: &Kek,
        nonce: &[u8; NONCE_LEN],
        secret: &[u8],
    ) -> Result<Self, KeyError> {
        let mut blob = Vec::with_capacity(NONCE_LEN + secret.len() + crate::aead::TAG_LEN);
        blob.extend_from_slice(nonce);
        kek.cipher
            .seal_into(nonce, &id.aad(kek.version), secret, &mut blob)
            .map_err(|_| KeyError::Unwrap(id))?;
        Ok(Self {
            id,
            kek_version: kek.version,
            blob,
        })
    }

    /// Unwrap with `kek`, which must be the version named in the record.
    pub(crate) fn open(&self, kek: &Kek) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let fail = KeyError::Unwrap(self.id);
        if kek.version != self.kek_version || self.blob.len() < NONCE_LEN {
            return Err(fail);
        }
        let (nonce, sealed) = self.blob.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| fail.clone())?;
        kek.cipher
            .open(nonce, &self.id.aad(self.kek_version), sealed)
            .map(Zeroizing::new)
            .map_err(|_| fail)
    }
}

/// What a store holds under a [`KeyId`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyEntry {
    /// The key, wrapped.
    Wrapped(WrappedKey),
    /// The key was destroyed at this instant; its bytes are gone. Kept so a
    /// destroyed key is reported as such and never silently re-created.
    Destroyed {
        /// When it was destroyed.
        at: Timestamp,
    },
}
