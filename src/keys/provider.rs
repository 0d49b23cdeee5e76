//! The root of trust: the host's KMS or HSM, behind [`KeyProvider`].

use std::fmt;

use async_trait::async_trait;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::secret::SecretKey;
use crate::aead::{Cipher, NONCE_LEN};
use crate::ids::BusinessId;
use crate::rng::OsRng;

/// What a wrapped KEK is bound to. A provider must refuse to unwrap under a
/// different context (AWS KMS calls this the encryption context), so a KEK
/// blob copied to another business or version is useless there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekContext {
    /// The business the KEK belongs to.
    pub business: BusinessId,
    /// The KEK's version in that business's ring.
    pub version: u32,
}

impl KekContext {
    /// Canonical bytes of the context, for use as associated data.
    pub fn to_bytes(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..16].copy_from_slice(b"custodian/v1/kek");
        out[16..24].copy_from_slice(&self.business.get().to_be_bytes());
        out[24..].copy_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// A KEK's check value, stored beside its wrapped bytes: the first 16
/// bytes of HMAC-SHA256, under the KEK, of a label and the KEK's context.
/// The key a provider unwraps (or just wrapped) is compared with it before
/// it is used, so a provider answering with the wrong key (a KMS answering
/// for another key, a damaged reply) is refused
/// ([`KeyError::KekMismatch`](super::KeyError::KekMismatch)) instead of
/// wrapping keys that nothing could unwrap again. It tells nothing of the
/// key: HMAC is a pseudorandom function of it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KekCheck([u8; 16]);

impl KekCheck {
    /// No key's check value: for a ring built only to ask its rules
    /// whether a change would be refused (and for tests of a ring's rules
    /// and storage), never stored by the key manager.
    pub(crate) const UNUSED: Self = Self([0; 16]);

    /// The check value of `key`, the KEK of `context`.
    pub fn of(key: &SecretKey, context: &KekContext) -> Self {
        // A 32-byte key: HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(b"custodian/v1/kek-check");
        mac.update(&context.to_bytes());
        let tag = mac.finalize().into_bytes();
        let mut check = [0u8; 16];
        check.copy_from_slice(&tag[..16]);
        Self(check)
    }
}

impl fmt::Debug for KekCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekCheck({})", hex::encode(self.0))
    }
}

/// Why a provider could not wrap or unwrap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The blob does not unwrap under this provider and context: wrong root,
    /// wrong context, or altered bytes. Deliberately says no more.
    #[error("wrapped key does not unwrap under this provider and context")]
    Unwrap,
    /// The provider could not be reached or refused the request; retrying may help.
    /// Its text is logged as given: keep key material out of it.
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
}

/// The host's root of trust. It wraps and unwraps each business's key-encryption
/// keys (KEKs); it never sees epoch keys or content. Implement it over a KMS or
/// HSM; [`LocalKeyProvider`] serves embedded use and tests.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Wrap `key` bound to `context`; the blob is stored as is and handed
    /// back to [`unwrap`](Self::unwrap).
    async fn wrap(&self, context: &KekContext, key: &SecretKey) -> Result<Vec<u8>, ProviderError>;

    /// Unwrap a blob made by [`wrap`](Self::wrap) under the same context.
    async fn unwrap(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError>;
}

/// A provider holding one 256-bit root secret in process memory.
///
/// Blob format (61 bytes): `0x01` ‖ nonce (12) ‖ AES-256-GCM ciphertext of
/// the KEK (32) ‖ tag (16), with [`KekContext::to_bytes`] as associated
/// data, under a wrapping key derived from the root by HKDF-SHA256.
pub struct LocalKeyProvider {
    cipher: Cipher,
}

const LOCAL_BLOB_VERSION: u8 = 1;
const LOCAL_BLOB_LEN: usize = 1 + NONCE_LEN + SecretKey::LEN + crate::aead::TAG_LEN;

impl LocalKeyProvider {
    /// A provider whose root secret is `root`.
    pub fn new(root: &SecretKey) -> Self {
        let mut wrapping = Zeroizing::new([0u8; SecretKey::LEN]);
        let hkdf = Hkdf::<Sha256>::new(Some(b"custodian/v1/local-provider"), root.expose_secret());
        // 32 bytes is within HKDF's output limit, so expand cannot fail.
        let _ = hkdf.expand(b"kek-wrap", &mut wrapping[..]);
        Self {
            cipher: Cipher::new(&wrapping),
        }
    }
}

impl fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalKeyProvider { root: .. }")
    }
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    async fn wrap(&self, context: &KekContext, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.wrap_with(&nonce, context, key)
    }

    async fn unwrap(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError> {
        self.unwrap_blob(context, wrapped)
    }
}

impl LocalKeyProvider {
    /// [`KeyProvider::wrap`] with a caller-chosen nonce.
    fn wrap_with(
        &self,
        nonce: &[u8; NONCE_LEN],
        context: &KekContext,
        key: &SecretKey,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut blob = Vec::with_capacity(LOCAL_BLOB_LEN);
        blob.push(LOCAL_BLOB_VERSION);
        blob.extend_from_slice(nonce);
        self.cipher
            .seal_into(nonce, &context.to_bytes(), key.expose_secret(), &mut blob)
            .map_err(|_| ProviderError::Unavailable("local wrap failed".into()))?;
        Ok(blob)
    }

    /// Wrap with a caller-chosen nonce (never do this outside fixtures):
    /// the fuzz checks' way to re-make a blob that unwrapped.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn wrap_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        context: &KekContext,
        key: &SecretKey,
    ) -> Result<Vec<u8>, ProviderError> {
        self.wrap_with(nonce, context, key)
    }

    /// [`KeyProvider::unwrap`], which never waits: refused as
    /// [`ProviderError::Unwrap`] unless the blob is exactly 61 bytes,
    /// starts with the version `0x01` and authenticates under `context`.
    pub(crate) fn unwrap_blob(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError> {
        if wrapped.len() != LOCAL_BLOB_LEN || wrapped[0] != LOCAL_BLOB_VERSION {
            return Err(ProviderError::Unwrap);
        }
        let (nonce, sealed) = wrapped[1..].split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| ProviderError::Unwrap)?;
        let key = Zeroizing::new(
            self.cipher
                .open(nonce, &context.to_bytes(), sealed)
                .map_err(|_| ProviderError::Unwrap)?,
        );
        SecretKey::from_slice(&key).ok_or(ProviderError::Unwrap)
    }
}
