//! The key hierarchy: retention enforced by cryptography.
//!
//! ```text
//! KeyProvider                 the host's root of trust (KMS/HSM), or LocalKeyProvider
//!  └ KEK(business, version)   256-bit, versioned, wrapped by the provider
//!     └ EpochKey(business, epoch)   random 256-bit, wrapped by the primary KEK
//!        └ DEK(record) = HKDF-SHA256-Expand(EpochKey, "custodian/v1/dek" ‖ suite ‖ record id)
//! ```
//!
//! Every record is sealed under a key derived from the key of the epoch in
//! which it expires. When the epoch ends its key is destroyed, and with it
//! every record of the epoch in the store. A backup of the store taken
//! before keeps the wrapped key, readable for as long as the provider
//! unwraps the KEK version that wrapped it (see [`KekContext`]). KEKs
//! rotate without touching content: add a version, promote it, [rewrap] the
//! epoch keys, raise the decrypt floor, retire the old version.
//!
//! The [`KeyManager`] keeps unwrapped keys in memory so that sealing costs no
//! I/O once an epoch's key is loaded. It assumes it is the only writer of its
//! [`KeyStore`]'s keys (one manager per store), which keeps its cache exact.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use custodian::ids::BusinessId;
//! use custodian::keys::{Epoch, EpochLength, KeyError, KeyManager, LocalKeyProvider, SecretKey};
//! use custodian::store::MemoryStore;
//! use custodian::time::Timestamp;
//!
//! let provider = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
//! let keys = KeyManager::new(provider, Arc::new(MemoryStore::new()));
//! let business = BusinessId::new(42).unwrap();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//!
//! let v2 = keys.add_kek_version(business, now).await?;
//! keys.promote_kek_version(business, v2).await?;
//! assert_eq!(keys.ring(business).await?.primary(), v2);
//!
//! let epoch = Epoch::containing(now, EpochLength::DEFAULT).unwrap();
//! keys.epoch_key_for_seal(business, epoch, now).await?;
//! keys.destroy_epoch_unchecked(business, epoch, now).await?;
//! assert!(matches!(
//!     keys.epoch_key(business, epoch).await,
//!     Err(KeyError::EpochDestroyed { .. })
//! ));
//! # Ok::<(), custodian::keys::KeyError>(())
//! # }).unwrap();
//! ```
//!
//! [rewrap]: KeyManager::rewrap

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::Zeroizing;

use crate::ids::BusinessId;
use crate::lock::PerKey;
use crate::store::{KeyStore, StoreError};

mod epoch;
mod epoch_keys;
mod phone_index;
mod provider;
mod ring;
mod rotation;
mod secret;
mod wrapped;

pub use epoch::{Epoch, EpochLength};
use phone_index::PhoneIndexKey;
pub use provider::{KekCheck, KekContext, KeyProvider, LocalKeyProvider, ProviderError};
pub use ring::{KekRing, KekVersion};
pub(crate) use secret::Kek;
pub use secret::{EpochKey, SecretKey};
pub use wrapped::{KeyEntry, KeyId, KeyKind, WrappedKey};

/// Why a key operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The ring has no such version (never added, or retired).
    #[error("business {business} has no KEK version {version}")]
    UnknownVersion {
        /// The business.
        business: BusinessId,
        /// The version asked for.
        version: u32,
    },
    /// The version is below the decrypt floor and may not unwrap.
    #[error("KEK version {version} is below the decrypt floor {floor}")]
    BelowFloor {
        /// The version asked for.
        version: u32,
        /// The ring's floor.
        floor: u32,
    },
    /// The decrypt floor only goes up.
    #[error("the decrypt floor is {floor}; it cannot be lowered to {requested}")]
    FloorLowering {
        /// The current floor.
        floor: u32,
        /// The floor asked for.
        requested: u32,
    },
    /// The decrypt floor cannot pass the primary version.
    #[error("the decrypt floor cannot pass the primary version {primary} (asked {requested})")]
    FloorAbovePrimary {
        /// The primary version.
        primary: u32,
        /// The floor asked for.
        requested: u32,
    },
    /// Keys are still wrapped below the floor asked for: rewrap first.
    #[error("keys are still wrapped under versions below {floor}: rewrap before raising the floor")]
    NeedsRewrap {
        /// The floor asked for.
        floor: u32,
    },
    /// Only versions below the floor may be retired.
    #[error("KEK version {version} is at or above the decrypt floor {floor}; it cannot be retired")]
    RetireAtOrAboveFloor {
        /// The version asked for.
        version: u32,
        /// The ring's floor.
        floor: u32,
    },
    /// The version still wraps keys.
    #[error("KEK version {version} still wraps {keys} keys")]
    VersionInUse {
        /// The version asked for.
        version: u32,
        /// How many keys it wraps.
        keys: u64,
    },
    /// All the version numbers a ring can give (1 to 2^32 - 2) are used.
    #[error("KEK version numbers are exhausted")]
    VersionsExhausted,
    /// A stored ring breaks the ring invariants or cannot advance its
    /// revision, or keys are stored under a ring that is missing.
    #[error("stored KEK ring of business {business} is corrupt")]
    CorruptRing {
        /// The business.
        business: BusinessId,
    },
    /// A stored key kind this version does not know.
    #[error("unknown key kind {0}")]
    UnknownKeyKind(u8),
    /// A wrapped key failed to unwrap: altered, moved or foreign bytes.
    #[error("wrapped key {0:?} does not unwrap")]
    Unwrap(KeyId),
    /// The epoch's key was destroyed: its records are unreadable for good.
    #[error("the key of business {business}'s {epoch} was destroyed")]
    EpochDestroyed {
        /// The business.
        business: BusinessId,
        /// The epoch.
        epoch: Epoch,
    },
    /// The epoch has ended: nothing can be sealed into it.
    #[error("{epoch} has ended")]
    EpochEnded {
        /// The epoch.
        epoch: Epoch,
    },
    /// The epoch starts past the retention ceiling: every record its key
    /// could seal would expire more than
    /// [`CEILING`](crate::retention::CEILING) (give or take
    /// [`CLOCK_TOLERANCE`](crate::vault::CLOCK_TOLERANCE)) from now, so no
    /// key is made for it.
    #[error("{epoch} starts past the retention ceiling from {now}")]
    EpochBeyondCeiling {
        /// The epoch.
        epoch: Epoch,
        /// The time the key was asked for at.
        now: crate::time::Timestamp,
    },
    /// No key was ever made for this epoch (or it was swept after ending).
    #[error("business {business} has no key for {epoch}")]
    UnknownEpoch {
        /// The business.
        business: BusinessId,
        /// The epoch.
        epoch: Epoch,
    },
    /// The key provider answered with a KEK whose check value is not the
    /// one the ring stores (a provider answering for another key, or a
    /// damaged reply), or the blob it just wrapped did not unwrap to the
    /// key it was given. Nothing was wrapped under that key, nor kept.
    #[error(
        "the key provider's KEK version {version} of business {business} fails its check value"
    )]
    KekMismatch {
        /// The business.
        business: BusinessId,
        /// The KEK version.
        version: u32,
    },
    /// Concurrent administrators kept changing the ring; try again.
    #[error("the KEK ring kept changing under concurrent updates")]
    Contention,
    /// The key provider failed.
    #[error(transparent)]
    Provider(Arc<ProviderError>),
    /// The key store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
}

impl From<ProviderError> for KeyError {
    fn from(e: ProviderError) -> Self {
        Self::Provider(Arc::new(e))
    }
}

impl From<StoreError> for KeyError {
    fn from(e: StoreError) -> Self {
        Self::Store(Arc::new(e))
    }
}

/// Page size for rewrap and the end-of-epoch sweep.
const PAGE: usize = 256;

/// Manages every business's KEK ring and epoch keys over a provider and a store.
pub struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn KeyStore>,
    cache: RwLock<Cache>,
    /// One lock per business, shared by everything that wraps a key of it
    /// under the primary KEK and stores it (creating a key, rewrapping);
    /// exclusive for raising its decrypt floor and retiring a version. The
    /// floor is checked against the stored keys and then raised: no key may
    /// be wrapped in between under a version the new floor leaves behind,
    /// where nothing could unwrap it again. Per business, as what it guards
    /// is: a provider call that hangs for one business, held under its
    /// lock, stalls no other's keys.
    wrapping: PerKey<BusinessId, async_lock::RwLock<()>>,
    /// Bumped after every early destruction of an epoch key (see
    /// [`KeyManager::early_destructions`]), once the store and this cache
    /// are rid of the key.
    early_destructions: AtomicU64,
}

/// Unwrapped keys in memory. Keys are business ids and epochs, which the
/// host and the clock choose, not consumers; foldhash (randomly seeded) keeps
/// the per-record lookup at a few nanoseconds.
#[derive(Default)]
struct Cache {
    rings: HashMap<BusinessId, KekRing, RandomState>,
    keks: HashMap<(BusinessId, u32), Arc<Kek>, RandomState>,
    epochs: HashMap<(BusinessId, Epoch), Arc<EpochKey>, RandomState>,
    phone_index: HashMap<BusinessId, Arc<PhoneIndexKey>, RandomState>,
    /// Bumped, under the write lock, whenever a business's ring is
    /// forgotten (see [`Cache::forget_ring`]). Whoever reads or writes a
    /// ring notes it first, and caches the ring (and its KEKs) only if it
    /// has not moved since, as for `epoch_destructions`: the store may hold
    /// a newer ring by then, from the update whose outcome is unknown.
    ring_forgets: u64,
    /// Bumped, under the write lock, after every destruction of epoch keys
    /// in the store. A loader notes it before reading a key from the store
    /// and caches the key only if it has not moved since: a key read just
    /// before a concurrent destroy must not be cached after the destroy
    /// emptied the cache, or the epoch would stay readable in memory.
    epoch_destructions: u64,
}

impl Cache {
    /// Cache `ring` as `business`'s unless a newer revision is cached
    /// already (a concurrent update that finished first); returns the ring
    /// cached afterwards. Revisions only go up, so an update that stored
    /// its ring first but caches it last never brings back an older ring:
    /// an older floor, a retired version.
    fn cache_ring(&mut self, business: BusinessId, ring: KekRing) -> KekRing {
        let cached = self.rings.entry(business).or_insert_with(|| ring.clone());
        if cached.revision() < ring.revision() {
            *cached = ring;
        }
        cached.clone()
    }

    /// Forget `business`'s ring and KEKs, after a ring update whose outcome
    /// is unknown (the store failed it, and may have taken it with its
    /// answer lost): the next use reads the ring the store holds, so this
    /// process never unwraps under a floor, or wraps under a primary, that
    /// the store has moved past.
    fn forget_ring(&mut self, business: BusinessId) {
        self.drop_ring(business);
        self.ring_forgets += 1;
    }

    /// Drop `business`'s ring and KEKs from memory: the next use reads the
    /// store.
    fn drop_ring(&mut self, business: BusinessId) {
        self.rings.remove(&business);
        self.keks.retain(|(b, _), _| *b != business);
    }
}

impl fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cache = self.read();
        f.debug_struct("KeyManager")
            .field("businesses", &cache.rings.len())
            .field("cached_keks", &cache.keks.len())
            .field("cached_epoch_keys", &cache.epochs.len())
            .field("cached_phone_index_keys", &cache.phone_index.len())
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// A manager over `provider` (the root of trust) and `store` (where wrapped keys live).
    pub fn new(provider: Arc<dyn KeyProvider>, store: Arc<dyn KeyStore>) -> Self {
        Self {
            provider,
            store,
            cache: RwLock::default(),
            wrapping: PerKey::default(),
            early_destructions: AtomicU64::new(0),
        }
    }

    /// The wrapping lock of `business` (see the `wrapping` field): one per
    /// business the process has wrapped a key of, a few bytes each.
    fn wrapping(&self, business: BusinessId) -> Arc<async_lock::RwLock<()>> {
        self.wrapping.get(business)
    }

    /// How many times an epoch key was destroyed early
    /// ([`destroy_epoch_unchecked`](Self::destroy_epoch_unchecked)), an attempt whose outcome
    /// is unknown included. Whoever keeps state opened or keys derived
    /// under an epoch key in memory (the Signal peer cache) notes it and
    /// drops that state when it has moved: the epoch may be gone. One
    /// atomic load, for the hot path; the end-of-epoch sweep does not move
    /// it, as nothing may be opened or sealed in an ended epoch anyway.
    pub(crate) fn early_destructions(&self) -> u64 {
        self.early_destructions.load(Ordering::Acquire)
    }

    // The cache holds only derived state: after a panic elsewhere it is still
    // a subset of the store, so a poisoned lock is safe to recover.
    fn read(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Wrap `secret` as `id` under `id.business`'s primary KEK and store it
    /// unless something is stored under `id` already. Returns the secret that
    /// is stored afterwards: ours, or a concurrent writer's.
    pub(crate) async fn store_secret(
        &self,
        id: KeyId,
        secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let wrapping = self.wrapping(id.business).read_arc().await;
        let ring = self.ring(id.business).await?;
        let kek = self.kek(&ring, ring.primary()).await?;
        let wrapped = WrappedKey::seal(id, &kek, secret)?;
        let stored = match self.store.insert_key(wrapped.clone()).await {
            // The entry already stored as `id` does not decode: damaged.
            Err(StoreError::Corrupt(_)) => Err(KeyError::Unwrap(id)),
            stored => stored.map_err(KeyError::from),
        };
        drop(wrapping);
        let stored = stored?;
        match stored {
            KeyEntry::Wrapped(stored) if stored == wrapped => Ok(Zeroizing::new(secret.to_vec())),
            KeyEntry::Wrapped(stored) => self.unwrap_secret(id, &stored).await,
            KeyEntry::Destroyed { .. } => Err(KeyError::Unwrap(id)),
        }
    }

    /// The secret stored as `id`, if any.
    pub(crate) async fn load_secret(
        &self,
        id: KeyId,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        match self.store.key(&id).await? {
            Some(KeyEntry::Wrapped(w)) => self.unwrap_secret(id, &w).await.map(Some),
            Some(KeyEntry::Destroyed { .. }) | None => Ok(None),
        }
    }

    /// Unwrap the key the store gave as `id` (its KEK version must be at or
    /// above the floor). Another key's blob, moved to `id`'s row, is
    /// refused: it would unwrap, as that key.
    pub(crate) async fn unwrap_secret(
        &self,
        id: KeyId,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if wrapped.id != id {
            return Err(KeyError::Unwrap(id));
        }
        let ring = self.ring_of_stored_key(wrapped.id.business).await?;
        match self.kek(&ring, wrapped.kek_version).await {
            Ok(kek) => wrapped.open(&kek),
            // Read before a rotation rewrapped it and moved the floor past
            // its version: the store has it under a newer one.
            Err(e @ (KeyError::BelowFloor { .. } | KeyError::UnknownVersion { .. })) => {
                match self.store.key(&id).await? {
                    Some(KeyEntry::Wrapped(again)) if again.kek_version != wrapped.kek_version => {
                        Box::pin(self.unwrap_secret(id, &again)).await
                    }
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The key store, for callers that list wrapped keys.
    pub(crate) fn store(&self) -> &dyn KeyStore {
        &*self.store
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use hkdf::Hkdf;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::envelope::RecordKey;
    use crate::ids::MessageId;
    use crate::time::Timestamp;

    #[test]
    fn hash_states_behind_hmac_and_hkdf_wipe_themselves_on_drop() {
        // `Hmac<Sha256>` (the phone index, the HKDF in every `EpochKey` and in
        // `LocalKeyProvider`) holds two SHA-256 cores keyed with the secret;
        // sha2 wipes a core on drop only with its `zeroize` feature on.
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<sha2::block_api::Sha256VarCore>();
        zeroizes_on_drop::<Sha256>();
    }

    /// Decimal-list and hex spellings of every 6-byte window of `secret`
    /// (the whole of a shorter one). Not 4: what the tests print runs to
    /// 20 KB of public keys, which 4-byte windows of random secrets met by
    /// chance about once in a few hundred runs.
    pub(crate) fn spellings(secret: &[u8]) -> Vec<String> {
        let list = |w: &[u8], f: fn(&u8) -> String| w.iter().map(f).collect::<Vec<_>>().join(", ");
        secret
            .windows(secret.len().clamp(1, 6))
            .flat_map(|w| {
                [
                    list(w, |b| b.to_string()),
                    list(w, |b| format!("{b:x}")),
                    hex::encode(w),
                    hex::encode_upper(w),
                ]
            })
            .collect()
    }

    /// The crate's own key holders print no byte of the keys they hold.
    #[test]
    fn kek_dek_and_record_key_print_redacted() {
        let kek_bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0x5A);
        let epoch_bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(71) ^ 0xC3);
        let business = BusinessId::new(9).unwrap();
        let epoch = Epoch::ending_at(Timestamp::from_millis(1_767_229_200_000));
        let id = MessageId::from_bytes([0x22; 16]);
        let kek = Kek::new(3, &SecretKey::from_bytes(&mut kek_bytes.clone()));
        let epoch_key = EpochKey::new(
            business,
            epoch,
            &SecretKey::from_bytes(&mut epoch_bytes.clone()),
        );
        let dek = epoch_key.dek(1, &id);
        let mut info = b"custodian/v1/dek".to_vec();
        info.push(1);
        info.extend_from_slice(id.as_bytes());
        let mut dek_bytes = [0u8; 32];
        Hkdf::<Sha256>::from_prk(&epoch_bytes)
            .unwrap()
            .expand(&info, &mut dek_bytes)
            .unwrap();
        // The commitment proves these are the bytes the `Dek` holds.
        let commitment: [u8; 32] = <Sha256 as Digest>::new()
            .chain_update(b"custodian/v1/commit")
            .chain_update(dek_bytes)
            .finalize()
            .into();
        assert_eq!(dek.commitment(), commitment);
        let record = RecordKey::new(&epoch_key, id);

        let printed = [
            (format!("{kek:?}"), "Kek { version: 3, key: .. }".to_owned()),
            (format!("{dek:?}"), "Dek(..)".to_owned()),
            (
                format!("{record:?}"),
                format!(
                    "RecordKey {{ business: {business:?}, epoch: {epoch:?}, id: {id:?}, seals: 0, .. }}"
                ),
            ),
        ];
        let needles: Vec<String> = [&kek_bytes, &epoch_bytes, &dek_bytes]
            .into_iter()
            .flat_map(|s| spellings(s))
            .collect();
        for (text, expected) in &printed {
            assert_eq!(text, expected);
            for needle in &needles {
                assert!(!text.contains(needle.as_str()), "{needle} in {text}");
            }
        }
    }

    /// A stored phone-index secret of other than [`SecretKey::LEN`] bytes is
    /// refused as unwrappable, as an epoch key is. Before, HMAC took a key
    /// of any length: a one-byte secret became the key behind every phone
    /// hash and send id of its business, open to brute force.
    #[tokio::test]
    async fn a_phone_index_key_of_the_wrong_length_is_refused() {
        let keys = KeyManager::new(
            Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(&mut [3; 32]))),
            Arc::new(crate::store::MemoryStore::new()),
        );
        let business = BusinessId::new(11).unwrap();
        let id = KeyId::phone_index(business);
        // Wrapped and stored as every key is, under the primary KEK.
        keys.store_secret(id, &[0x42]).await.unwrap();
        let number: crate::ids::PhoneNumber = "+447700900123".parse().unwrap();
        let got = keys.known_phone_hash(business, &number).await;
        assert!(
            matches!(got, Err(KeyError::Unwrap(named)) if named == id),
            "{got:?}"
        );
    }

    /// A `SecretKey` wipes itself on drop but offers no public `zeroize`: a
    /// wiped key, all zeros, would stay usable as a root or KEK. Before, it
    /// derived `Zeroize`.
    #[test]
    fn a_secret_key_wipes_itself_on_drop_but_cannot_be_wiped_while_in_use() {
        use crate::ids::tests::{NoZeroize, ZeroizeProbe};
        // The probe answers both ways here too.
        const { assert!(ZeroizeProbe::<Vec<u8>>::IMPLEMENTS) };
        const { assert!(!ZeroizeProbe::<SecretKey>::IMPLEMENTS) };
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<SecretKey>();
    }
}
