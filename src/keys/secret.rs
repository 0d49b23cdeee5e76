//! Secret key types. Each zeroizes on drop and prints as `..` in `Debug`.
//! Those that outlive a call live in a `Box`, so that moving one leaves no
//! copy behind; a record's [`Dek`], derived for one seal or open and
//! dropped at its end, is kept inline to spare an allocation per record,
//! so a move the compiler does not elide can leave a copy in a stack slot
//! that later calls overwrite. Key bytes are
//! copied straight into their box; a key schedule (AES, HMAC, HKDF) is built
//! by its library and then boxed, and the compiler may leave a copy of it in
//! the stack frame that built it, which nothing can wipe without `unsafe`
//! (see `zeroize`'s documentation on stack copies).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::Epoch;
use crate::aead::{Cipher, KEY_LEN};
use crate::ids::{BusinessId, MessageId};
use crate::rng::OsRng;

/// 256 bits of secret key material, as a [`KeyProvider`](super::KeyProvider)
/// sees it. Hosts implementing a provider read it with
/// [`expose_secret`](Self::expose_secret) to hand it to their KMS, and build
/// one from their KMS's answer with [`from_bytes`](Self::from_bytes).
///
/// It is wiped on drop only: it has no public `zeroize`, which would leave a
/// wiped key, all zeros, in use as a root or KEK.
#[derive(Clone)]
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKey {}

impl SecretKey {
    /// Length in bytes.
    pub const LEN: usize = KEY_LEN;

    /// Fresh key material from the operating system's generator.
    pub fn generate() -> Self {
        Self::generate_from(&mut OsRng)
    }

    /// Fresh key material from `rng`.
    pub fn generate_from<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut key = Box::new([0u8; KEY_LEN]);
        rng.fill_bytes(&mut key[..]);
        Self(key)
    }

    /// Take ownership of key bytes (the caller's copy is zeroized).
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let mut key = Box::new([0u8; KEY_LEN]);
        key.copy_from_slice(&bytes[..]);
        bytes.zeroize();
        Self(key)
    }

    /// Copy key bytes from a slice of exactly [`SecretKey::LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut key = Box::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        Some(Self(key))
    }

    /// The key bytes. Every call site handles a secret: keep the borrow short
    /// and never log it.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// A business's key-encryption key, unwrapped and ready: it wraps and unwraps
/// epoch keys. Only the key schedule is kept; the raw bytes are dropped.
pub(crate) struct Kek {
    pub(crate) version: u32,
    pub(crate) cipher: Cipher,
}

impl Kek {
    pub(crate) fn new(version: u32, key: &SecretKey) -> Self {
        Self {
            version,
            cipher: Cipher::new(key.expose_secret()),
        }
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek {{ version: {}, key: .. }}", self.version)
    }
}

/// Domain separation for everything derived from an epoch key.
const DEK_LABEL: &[u8; 16] = b"custodian/v1/dek";
const COMMIT_LABEL: &[u8; 19] = b"custodian/v1/commit";

/// The key of one expiry epoch of one business. Every record expiring in the
/// epoch is sealed under a key derived from it; destroying it makes all of
/// them unreadable at once.
///
/// The 256-bit random key is used directly as an HKDF pseudo-random key
/// (RFC 5869 §3.3: a uniformly random key needs no extract step), and the
/// keyed HMAC state is kept so each derivation costs one expand.
///
/// A key knows whose and which epoch's it is, so sealing with it cannot put
/// a record under the wrong key.
#[derive(Clone)]
pub struct EpochKey {
    business: BusinessId,
    epoch: Epoch,
    prk: Box<Hkdf<Sha256>>,
    /// Set, for every copy of a key loaded, when its epoch is destroyed:
    /// a copy a caller holds then seals no more.
    destroyed: Arc<AtomicBool>,
}

impl EpochKey {
    pub(crate) fn new(business: BusinessId, epoch: Epoch, key: &SecretKey) -> Self {
        let prk = key.expose_secret();
        // from_prk accepts any key at least as long as the hash (ours: 32 of
        // 32 bytes); the extracting fallback only keeps this total.
        let hkdf = Hkdf::<Sha256>::from_prk(prk).unwrap_or_else(|_| Hkdf::new(None, prk));
        Self {
            business,
            epoch,
            prk: Box::new(hkdf),
            destroyed: Arc::default(),
        }
    }

    /// Its epoch was destroyed, or its destruction failed or was dropped
    /// (it may have landed, its answer lost): nothing more may be sealed
    /// under this copy. The key manager, which reads the store again, gives
    /// a live key anew.
    pub(crate) fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::Release);
    }

    /// Whether [`mark_destroyed`](Self::mark_destroyed) was called on it.
    pub(crate) fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// The business whose key this is.
    pub fn business(&self) -> BusinessId {
        self.business
    }

    /// The epoch whose key this is.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Derive the data-encryption key of record `id` under suite `suite`.
    pub(crate) fn dek(&self, suite: u8, id: &MessageId) -> Dek {
        let mut info = [0u8; DEK_LABEL.len() + 1 + MessageId::LEN];
        info[..DEK_LABEL.len()].copy_from_slice(DEK_LABEL);
        info[DEK_LABEL.len()] = suite;
        info[DEK_LABEL.len() + 1..].copy_from_slice(id.as_bytes());
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        // 32 bytes is far below HKDF's 255 * 32 limit, so expand cannot fail.
        let _ = self.prk.expand(&info, &mut key[..]);
        Dek(key)
    }
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKey")
            .field("business", &self.business)
            .field("epoch", &self.epoch)
            .field("key", &format_args!(".."))
            .finish()
    }
}

/// A record's data-encryption key. Derived, used once, never stored; kept
/// inline, not boxed (see the module's doc).
pub(crate) struct Dek(Zeroizing<[u8; KEY_LEN]>);

impl Dek {
    /// The key-commitment value: SHA-256 over a label and the key. Checked
    /// before decryption so a ciphertext opens under exactly one key.
    pub(crate) fn commitment(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(COMMIT_LABEL);
        h.update(&self.0[..]);
        h.finalize().into()
    }

    pub(crate) fn cipher(&self) -> Cipher {
        Cipher::new(&self.0)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(..)")
    }
}
