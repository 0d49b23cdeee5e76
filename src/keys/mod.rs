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
//! every record of the epoch, in the store and in every backup of it. KEKs
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
//! use custodian::keys::{Epoch, EpochLength, KeyManager, LocalKeyProvider, SecretKey};
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
//! keys.destroy_epoch(business, epoch, now).await?;
//! assert!(keys.epoch_key(business, epoch).await.is_err());
//! # Ok::<(), custodian::keys::KeyError>(())
//! # }).unwrap();
//! ```
//!
//! [rewrap]: KeyManager::rewrap

use std::collections::{BTreeSet, HashMap};

use foldhash::fast::RandomState;
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use crate::store::{KeyStore, StoreError};
use crate::time::Timestamp;

mod epoch;
mod provider;
mod ring;
mod secret;
mod wrapped;

pub use epoch::{Epoch, EpochLength};
pub use provider::{KekContext, KeyProvider, LocalKeyProvider, ProviderError};
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
    /// All 2^32 - 1 version numbers are used.
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
    /// No key was ever made for this epoch (or it was swept after ending).
    #[error("business {business} has no key for {epoch}")]
    UnknownEpoch {
        /// The business.
        business: BusinessId,
        /// The epoch.
        epoch: Epoch,
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

/// How many times a ring update is retried when it races another.
const RING_RETRIES: usize = 16;
/// How many times loading an epoch key is retried when destroys race it.
const LOAD_RETRIES: usize = 16;
/// Page size for rewrap and the end-of-epoch sweep.
const PAGE: usize = 256;

/// What loading an epoch key may do when the store has none.
#[derive(Clone, Copy)]
enum Load {
    /// Opening: a missing key is an error; nothing is written.
    Existing,
    /// Sealing: create the key (random, wrapped under the primary KEK).
    CreateIfAbsent,
}

/// Manages every business's KEK ring and epoch keys over a provider and a store.
pub struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn KeyStore>,
    cache: RwLock<Cache>,
    /// Shared by everything that wraps a key under the primary KEK and
    /// stores it (creating a key, rewrapping); exclusive for raising the
    /// decrypt floor and retiring a version. The floor is checked against
    /// the stored keys and then raised: no key may be wrapped in between
    /// under a version the new floor leaves behind, where nothing could
    /// unwrap it again.
    wrapping: async_lock::RwLock<()>,
}

/// The keyed hash behind a business's phone-number index.
struct PhoneIndexKey(Hmac<Sha256>);

impl PhoneIndexKey {
    /// `number`'s HMAC, truncated to a [`PhoneHash`].
    fn hash(&self, number: &PhoneNumber) -> PhoneHash {
        let mut mac = self.0.clone();
        mac.update(number.expose().as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut hash = [0u8; PhoneHash::LEN];
        hash.copy_from_slice(&digest[..PhoneHash::LEN]);
        PhoneHash::from_bytes(hash)
    }

    /// The message id of the send that `key` names. The input starts with
    /// a zero byte, which no phone number (always `+` first) does, so no
    /// send key and number hash alike.
    fn send_id(&self, key: &[u8]) -> MessageId {
        let mut mac = self.0.clone();
        mac.update(b"\0custodian send key\0");
        mac.update(key);
        let digest = mac.finalize().into_bytes();
        let mut id = [0u8; MessageId::LEN];
        id.copy_from_slice(&digest[..MessageId::LEN]);
        MessageId::from_bytes(id)
    }
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
        self.rings.remove(&business);
        self.keks.retain(|(b, _), _| *b != business);
        self.ring_forgets += 1;
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
            wrapping: async_lock::RwLock::new(()),
        }
    }

    // The cache holds only derived state: after a panic elsewhere it is still
    // a subset of the store, so a poisoned lock is safe to recover.
    fn read(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The KEK ring of `business`, created with version 1 on first use.
    pub async fn ring(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        if let Some(ring) = self.stored_ring(business).await? {
            return Ok(ring);
        }
        self.create_ring(business).await
    }

    /// The ring the store holds for `business`, which must be `business`'s:
    /// KEKs are unwrapped in the context of the ring's business, so a ring
    /// stored under another business's id (misfiled, or copied there) would
    /// have this business's keys wrapped under, and its ring updates applied
    /// to, that business's KEKs.
    async fn load_ring(&self, business: BusinessId) -> Result<Option<KekRing>, KeyError> {
        match self.store.ring(business).await? {
            Some(ring) if ring.business() != business => Err(KeyError::CorruptRing { business }),
            ring => Ok(ring),
        }
    }

    /// The KEK ring of `business` if one exists; never creates one.
    async fn stored_ring(&self, business: BusinessId) -> Result<Option<KekRing>, KeyError> {
        let forgets = {
            let cache = self.read();
            if let Some(ring) = cache.rings.get(&business) {
                return Ok(Some(ring.clone()));
            }
            cache.ring_forgets
        };
        let Some(ring) = self.load_ring(business).await? else {
            return Ok(None);
        };
        Ok(Some(match self.unless_forgotten(forgets) {
            Some(mut cache) => cache.cache_ring(business, ring),
            None => ring,
        }))
    }

    /// How many rings were forgotten so far (see [`Cache::forget_ring`]):
    /// noted before a ring is read from or written to the store.
    fn forgets(&self) -> u64 {
        self.read().ring_forgets
    }

    /// The cache, to keep a ring (and its KEKs) read from or written to the
    /// store when `forgets` rings had been forgotten; `None` if one was
    /// forgotten since: the store may hold a newer ring, from the update
    /// whose outcome is unknown, and what was read or written then serves
    /// the call at hand only.
    fn unless_forgotten(&self, forgets: u64) -> Option<RwLockWriteGuard<'_, Cache>> {
        let cache = self.write();
        (cache.ring_forgets == forgets).then_some(cache)
    }

    /// The ring that must exist because a key wrapped under it does. Used
    /// wherever a stored key is unwrapped, so that opening never writes: a
    /// missing ring is reported, not replaced by a fresh one that could not
    /// unwrap the key anyway.
    async fn ring_of_stored_key(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        self.stored_ring(business)
            .await?
            .ok_or(KeyError::CorruptRing { business })
    }

    async fn create_ring(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        let key = SecretKey::generate();
        let wrapped = self
            .provider
            .wrap(
                &KekContext {
                    business,
                    version: 1,
                },
                &key,
            )
            .await?;
        // The creation time of version 1 is informational; no clock is needed.
        let ring = KekRing::new(business, wrapped, Timestamp::UNIX_EPOCH);
        let forgets = self.forgets();
        match self.store.put_ring(&ring, None).await {
            Ok(()) => {
                let Some(mut cache) = self.unless_forgotten(forgets) else {
                    return Ok(ring);
                };
                cache
                    .keks
                    .insert((business, 1), Arc::new(Kek::new(1, &key)));
                Ok(cache.cache_ring(business, ring))
            }
            // Another caller created it first: use theirs.
            Err(StoreError::Conflict) => self
                .stored_ring(business)
                .await?
                .ok_or(KeyError::Contention),
            Err(e) => Err(e.into()),
        }
    }

    /// Apply `change` to the stored ring, retrying if another update races it.
    async fn update_ring<F>(&self, business: BusinessId, change: F) -> Result<KekRing, KeyError>
    where
        F: Fn(&KekRing) -> Result<KekRing, KeyError>,
    {
        if self.stored_ring(business).await?.is_none() {
            // A change a new ring would refuse fails before one is created:
            // a failed operation changes nothing.
            change(&KekRing::new(business, Vec::new(), Timestamp::UNIX_EPOCH))?;
            self.ring(business).await?;
        }
        for _ in 0..RING_RETRIES {
            let current = self
                .load_ring(business)
                .await?
                .ok_or(KeyError::CorruptRing { business })?;
            let next = change(&current)?;
            let forgets = self.forgets();
            match self.store.put_ring(&next, Some(current.revision())).await {
                Ok(()) => {
                    if let Some(mut cache) = self.unless_forgotten(forgets) {
                        cache.cache_ring(business, next.clone());
                    }
                    return Ok(next);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => {
                    self.write().forget_ring(business);
                    return Err(e.into());
                }
            }
        }
        Err(KeyError::Contention)
    }

    /// The unwrapped KEK `version` of `ring`'s business, if it may unwrap.
    async fn kek(&self, ring: &KekRing, version: u32) -> Result<Arc<Kek>, KeyError> {
        let business = ring.business();
        let stored = ring.usable(version)?;
        if let Some(kek) = self.read().keks.get(&(business, version)) {
            return Ok(kek.clone());
        }
        let key = self
            .provider
            .unwrap(&KekContext { business, version }, &stored.wrapped)
            .await?;
        let kek = Arc::new(Kek::new(version, &key));
        // The ring may have moved on while the provider answered: a version
        // put below the floor or retired meanwhile serves this one call (it
        // was usable when asked for) but is not kept in memory; nor is one
        // whose ring was forgotten meanwhile (see `Cache::forget_ring`).
        let mut cache = self.write();
        if cache
            .rings
            .get(&business)
            .is_some_and(|current| current.usable(version).is_ok())
        {
            cache.keks.insert((business, version), kek.clone());
        }
        Ok(kek)
    }

    /// Add a new KEK version to `business`'s ring, not yet primary, so every
    /// node can unwrap with it before it is promoted. Returns the version.
    pub async fn add_kek_version(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<u32, KeyError> {
        self.ring(business).await?;
        for _ in 0..RING_RETRIES {
            let current = self
                .load_ring(business)
                .await?
                .ok_or(KeyError::CorruptRing { business })?;
            let version = current.next_version();
            let key = SecretKey::generate();
            let wrapped = self
                .provider
                .wrap(&KekContext { business, version }, &key)
                .await?;
            let (next, version) = current.add_version(wrapped, now)?;
            let forgets = self.forgets();
            match self.store.put_ring(&next, Some(current.revision())).await {
                Ok(()) => {
                    if let Some(mut cache) = self.unless_forgotten(forgets) {
                        cache.cache_ring(business, next);
                        let kek = Arc::new(Kek::new(version, &key));
                        cache.keks.insert((business, version), kek);
                    }
                    return Ok(version);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => {
                    self.write().forget_ring(business);
                    return Err(e.into());
                }
            }
        }
        Err(KeyError::Contention)
    }

    /// Make `version` the primary: new keys are wrapped under it from now on.
    pub async fn promote_kek_version(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<(), KeyError> {
        self.update_ring(business, |r| r.promote(version))
            .await
            .map(drop)
    }

    /// Rewrap every key of `business` still wrapped under a version older than
    /// the primary, without touching any content. Returns how many were rewrapped.
    pub async fn rewrap(&self, business: BusinessId) -> Result<u64, KeyError> {
        let _wrapping = self.wrapping.read().await;
        let ring = self.ring(business).await?;
        let primary = self.kek(&ring, ring.primary()).await?;
        let mut after = None;
        let mut done = 0;
        loop {
            let page = self
                .store
                .keys_wrapped_below(business, primary.version, after, PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for old in page {
                let kek = self.kek(&ring, old.kek_version).await?;
                let secret = old.open(&kek)?;
                let new = WrappedKey::seal(old.id, &primary, &secret)?;
                if self.store.rewrap_key(new, old.kek_version).await? {
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Raise `business`'s decrypt floor to `version`: older versions may no
    /// longer unwrap. Refused while any key is still wrapped below it.
    pub async fn raise_decrypt_floor(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<(), KeyError> {
        let _wrapping = self.wrapping.write().await;
        if !self
            .store
            .keys_wrapped_below(business, version, None, 1)
            .await?
            .is_empty()
        {
            return Err(KeyError::NeedsRewrap { floor: version });
        }
        self.update_ring(business, |r| r.raise_floor(version))
            .await?;
        self.write()
            .keks
            .retain(|(b, v), _| *b != business || *v >= version);
        Ok(())
    }

    /// Retire `version`: destroy its wrapped bytes for good. Only versions
    /// below the floor, wrapping no key, may be retired. Retiring a version
    /// retired already changes nothing (a retirement whose answer the store
    /// lost is made again this way), and the version is forgotten in memory.
    pub async fn retire_kek_version(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<(), KeyError> {
        let _wrapping = self.wrapping.write().await;
        let forgets = self.forgets();
        if let Some(ring) = self.load_ring(business).await?
            && version < ring.floor()
            && version < ring.next_version()
            && ring.get(version).is_none()
        {
            let mut cache = self.write();
            cache.keks.remove(&(business, version));
            if cache.ring_forgets == forgets {
                cache.cache_ring(business, ring);
            }
            return Ok(());
        }
        let keys = self.store.count_wrapped_under(business, version).await?;
        if keys > 0 {
            return Err(KeyError::VersionInUse { version, keys });
        }
        self.update_ring(business, |r| r.retire(version)).await?;
        self.write().keks.remove(&(business, version));
        Ok(())
    }

    /// The key of `business`'s `epoch` if it is loaded already: the hot path
    /// of sealing and opening, with no I/O and no future to build.
    pub(crate) fn cached_epoch_key(
        &self,
        business: BusinessId,
        epoch: Epoch,
    ) -> Option<Arc<EpochKey>> {
        self.read().epochs.get(&(business, epoch)).cloned()
    }

    /// Run `f` with the loaded key of `business`'s `epoch`, if it is loaded,
    /// under the cache's read lock: no reference count to bump on the hot path.
    pub(crate) fn with_cached_epoch_key<T>(
        &self,
        business: BusinessId,
        epoch: Epoch,
        f: impl FnOnce(&EpochKey) -> T,
    ) -> Option<T> {
        self.read().epochs.get(&(business, epoch)).map(|key| f(key))
    }

    /// The key of `business`'s `epoch` for sealing, created (random, wrapped
    /// under the primary KEK) if the epoch has none yet. Refused once the
    /// epoch has ended or its key was destroyed.
    pub async fn epoch_key_for_seal(
        &self,
        business: BusinessId,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<Arc<EpochKey>, KeyError> {
        if epoch.end() <= now {
            return Err(KeyError::EpochEnded { epoch });
        }
        if let Some(key) = self.cached_epoch_key(business, epoch) {
            return Ok(key);
        }
        self.load_epoch_key(business, epoch, Load::CreateIfAbsent)
            .await
    }

    /// The key of `business`'s `epoch`, for opening. Never writes: a missing
    /// key or ring is an error, not something to create.
    pub async fn epoch_key(
        &self,
        business: BusinessId,
        epoch: Epoch,
    ) -> Result<Arc<EpochKey>, KeyError> {
        if let Some(key) = self.cached_epoch_key(business, epoch) {
            return Ok(key);
        }
        self.load_epoch_key(business, epoch, Load::Existing).await
    }

    /// Read, unwrap and cache the key of `business`'s `epoch`.
    async fn load_epoch_key(
        &self,
        business: BusinessId,
        epoch: Epoch,
        load: Load,
    ) -> Result<Arc<EpochKey>, KeyError> {
        let id = KeyId::epoch(business, epoch);
        for _ in 0..LOAD_RETRIES {
            // Noted before the store is read: see `Cache::epoch_destructions`.
            let destructions = self.read().epoch_destructions;
            let entry = match (self.store.key(&id).await?, load) {
                (Some(entry), _) => entry,
                (None, Load::Existing) => return Err(KeyError::UnknownEpoch { business, epoch }),
                (None, Load::CreateIfAbsent) => {
                    let _wrapping = self.wrapping.read().await;
                    let ring = self.ring(business).await?;
                    let kek = self.kek(&ring, ring.primary()).await?;
                    let secret = SecretKey::generate();
                    let wrapped = WrappedKey::seal(id, &kek, secret.expose_secret())?;
                    // Whatever is stored afterwards (ours, a concurrent
                    // sealer's, or a tombstone) is what we use.
                    self.store.insert_key(wrapped).await?
                }
            };
            let wrapped = match entry {
                KeyEntry::Wrapped(w) => w,
                KeyEntry::Destroyed { .. } => {
                    return Err(KeyError::EpochDestroyed { business, epoch });
                }
            };
            let ring = self.ring_of_stored_key(business).await?;
            let kek = self.kek(&ring, wrapped.kek_version).await?;
            let secret = wrapped.open(&kek)?;
            let secret = SecretKey::from_slice(&secret).ok_or(KeyError::Unwrap(wrapped.id))?;
            let key = Arc::new(EpochKey::new(business, epoch, &secret));
            let mut cache = self.write();
            if cache.epoch_destructions != destructions {
                // Keys were destroyed while this one loaded, maybe this very
                // one: read the store again rather than revive it.
                continue;
            }
            // A concurrent loader may have won; either copy is the same key.
            return Ok(cache.epochs.entry((business, epoch)).or_insert(key).clone());
        }
        Err(KeyError::Contention)
    }

    /// Wrap `secret` as `id` under `id.business`'s primary KEK and store it
    /// unless something is stored under `id` already. Returns the secret that
    /// is stored afterwards: ours, or a concurrent writer's.
    pub(crate) async fn store_secret(
        &self,
        id: KeyId,
        secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let wrapping = self.wrapping.read().await;
        let ring = self.ring(id.business).await?;
        let kek = self.kek(&ring, ring.primary()).await?;
        let wrapped = WrappedKey::seal(id, &kek, secret)?;
        let stored = self.store.insert_key(wrapped.clone()).await?;
        drop(wrapping);
        match stored {
            KeyEntry::Wrapped(stored) if stored == wrapped => Ok(Zeroizing::new(secret.to_vec())),
            KeyEntry::Wrapped(stored) => self.unwrap_secret(&stored).await,
            KeyEntry::Destroyed { .. } => Err(KeyError::Unwrap(id)),
        }
    }

    /// The secret stored as `id`, if any.
    pub(crate) async fn load_secret(
        &self,
        id: KeyId,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        match self.store.key(&id).await? {
            Some(KeyEntry::Wrapped(w)) => self.unwrap_secret(&w).await.map(Some),
            Some(KeyEntry::Destroyed { .. }) | None => Ok(None),
        }
    }

    /// Unwrap a stored key (its KEK version must be at or above the floor).
    pub(crate) async fn unwrap_secret(
        &self,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let ring = self.ring_of_stored_key(wrapped.id.business).await?;
        let kek = self.kek(&ring, wrapped.kek_version).await?;
        wrapped.open(&kek)
    }

    /// The key store, for callers that list wrapped keys.
    pub(crate) fn store(&self) -> &dyn KeyStore {
        &*self.store
    }

    /// `number` as `business`'s phone-number index knows it: HMAC-SHA256
    /// under the business's index key (created on first use), truncated to
    /// 128 bits. Stable for a business, unrelated across businesses.
    pub async fn phone_hash(
        &self,
        business: BusinessId,
        number: &PhoneNumber,
    ) -> Result<PhoneHash, KeyError> {
        match self.cached_phone_hash(business, number) {
            Some(hash) => Ok(hash),
            // Boxed: every message awaits this, and only the first creates.
            None => Ok(Box::pin(self.create_phone_index_key(business))
                .await?
                .hash(number)),
        }
    }

    /// The id of `business`'s message sent under the host's idempotency
    /// `key` (see `Processor::send_idempotent`): HMAC-SHA256 under the
    /// business's index key, with its own domain, truncated to 128 bits.
    /// Stable for a business and key, unrelated across businesses, and
    /// unpredictable to anyone without the index key.
    pub async fn send_id(&self, business: BusinessId, key: &[u8]) -> Result<MessageId, KeyError> {
        let cached = self.read().phone_index.get(&business).cloned();
        let index = match cached {
            Some(index) => index,
            None => Box::pin(self.create_phone_index_key(business)).await?,
        };
        Ok(index.send_id(key))
    }

    /// `number` as `business`'s phone-number index knows it, if the business
    /// has an index key: unlike [`phone_hash`](Self::phone_hash), this
    /// never creates one. `None` means no consumer of the business was ever
    /// indexed (nor its keys published through the processor).
    pub async fn known_phone_hash(
        &self,
        business: BusinessId,
        number: &PhoneNumber,
    ) -> Result<Option<PhoneHash>, KeyError> {
        match self.cached_phone_hash(business, number) {
            Some(hash) => Ok(Some(hash)),
            // Boxed, as in `phone_hash`: taken once per business and process.
            None => Ok(Box::pin(self.load_phone_index_key(business))
                .await?
                .map(|key| key.hash(number))),
        }
    }

    /// `number` hashed under `business`'s cached index key, if cached. A
    /// plain function, under the cache's read lock: the hash's working
    /// state stays on the stack, out of the caller's future.
    fn cached_phone_hash(&self, business: BusinessId, number: &PhoneNumber) -> Option<PhoneHash> {
        self.read()
            .phone_index
            .get(&business)
            .map(|k| k.hash(number))
    }

    /// Make sure `business` has a phone index key (created if missing).
    pub async fn ensure_phone_index(&self, business: BusinessId) -> Result<(), KeyError> {
        if !self.read().phone_index.contains_key(&business) {
            self.create_phone_index_key(business).await?;
        }
        Ok(())
    }

    /// `business`'s stored phone index key, if any, now cached.
    async fn load_phone_index_key(
        &self,
        business: BusinessId,
    ) -> Result<Option<Arc<PhoneIndexKey>>, KeyError> {
        let id = KeyId::phone_index(business);
        let Some(secret) = self.load_secret(id).await? else {
            return Ok(None);
        };
        Ok(Some(self.cache_phone_index_key(id, &secret)?))
    }

    /// Cache `secret` as `business`'s phone index key (unless a key is
    /// cached already: the one stored, as this is); the key cached.
    fn cache_phone_index_key(
        &self,
        id: KeyId,
        secret: &[u8],
    ) -> Result<Arc<PhoneIndexKey>, KeyError> {
        let mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(secret).map_err(|_| KeyError::Unwrap(id))?;
        Ok(self
            .write()
            .phone_index
            .entry(id.business)
            .or_insert_with(|| Arc::new(PhoneIndexKey(mac)))
            .clone())
    }

    /// Create (or, if another task did first, take) `business`'s phone index key.
    async fn create_phone_index_key(
        &self,
        business: BusinessId,
    ) -> Result<Arc<PhoneIndexKey>, KeyError> {
        let id = KeyId::phone_index(business);
        let fresh = SecretKey::generate();
        let secret = self.store_secret(id, fresh.expose_secret()).await?;
        self.cache_phone_index_key(id, &secret)
    }

    /// Store `secret` as the key of `business`'s `epoch` (wrapped under the
    /// primary KEK), for fixtures that need known epoch keys.
    #[cfg(test)]
    pub(crate) async fn install_epoch_key(
        &self,
        business: BusinessId,
        epoch: Epoch,
        secret: &SecretKey,
    ) -> Result<(), KeyError> {
        let ring = self.ring(business).await?;
        let kek = self.kek(&ring, ring.primary()).await?;
        let wrapped =
            WrappedKey::seal(KeyId::epoch(business, epoch), &kek, secret.expose_secret())?;
        match self.store.insert_key(wrapped).await? {
            KeyEntry::Wrapped(w) if w.kek_version == kek.version => Ok(()),
            _ => Err(KeyError::Contention),
        }
    }

    /// Destroy the key of `business`'s `epoch` now, before the epoch ends:
    /// every record of the epoch becomes unreadable and nothing more can be
    /// sealed into it. Returns whether a live key was destroyed.
    pub async fn destroy_epoch(
        &self,
        business: BusinessId,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<bool, KeyError> {
        let _forget = ForgetEpochs {
            keys: self,
            doomed: |key: &(BusinessId, Epoch)| *key == (business, epoch),
        };
        Ok(self
            .store
            .destroy_key(&KeyId::epoch(business, epoch), now)
            .await?)
    }

    /// Destroy the keys of every epoch that ended at or before `now` (and
    /// drop the tombstones of epochs destroyed early). Returns how many
    /// entries were removed.
    pub async fn destroy_ended_epochs(&self, now: Timestamp) -> Result<u64, KeyError> {
        self.destroy_ended_epochs_except(now, &BTreeSet::new())
            .await
    }

    /// [`destroy_ended_epochs`](Self::destroy_ended_epochs), sparing the
    /// epochs in `keep` (those a legal hold still needs).
    pub async fn destroy_ended_epochs_except(
        &self,
        now: Timestamp,
        keep: &BTreeSet<(BusinessId, Epoch)>,
    ) -> Result<u64, KeyError> {
        let forget = ForgetEpochs {
            keys: self,
            doomed: |(b, epoch): &(BusinessId, Epoch)| {
                epoch.end() <= now && !keep.contains(&(*b, *epoch))
            },
        };
        let mut removed = 0;
        loop {
            // Spared entries come back on every page; asking for that many
            // more guarantees progress.
            let ended = self.store.ended_epoch_keys(now, PAGE + keep.len()).await?;
            let doomed: Vec<KeyId> = ended
                .into_iter()
                .filter(|id| {
                    !keep.contains(&(id.business, Epoch::ending_at(Timestamp::from_millis(id.id))))
                })
                .collect();
            if doomed.is_empty() {
                return Ok(removed);
            }
            removed += self.store.delete_keys(&doomed).await?;
            forget.now();
        }
    }
}

/// Forgets the cached epoch keys it names when dropped, however the call
/// destroying them ends: no destroyed key may outlive its stored copy in
/// memory, and a destruction whose future was dropped may land all the
/// same (a SQLite commit does). Forgetting a key the store still has costs
/// only a reload.
struct ForgetEpochs<'a, F: Fn(&(BusinessId, Epoch)) -> bool> {
    keys: &'a KeyManager,
    doomed: F,
}

impl<F: Fn(&(BusinessId, Epoch)) -> bool> ForgetEpochs<'_, F> {
    fn now(&self) {
        let mut cache = self.keys.write();
        // Loads under way read the store again (see `Cache::epoch_destructions`).
        cache.epoch_destructions = cache.epoch_destructions.wrapping_add(1);
        cache.epochs.retain(|key, _| !(self.doomed)(key));
    }
}

impl<F: Fn(&(BusinessId, Epoch)) -> bool> Drop for ForgetEpochs<'_, F> {
    fn drop(&mut self) {
        self.now();
    }
}

#[cfg(test)]
mod tests {
    use hkdf::Hkdf;
    use sha2::Digest;

    use super::*;
    use crate::envelope::RecordKey;
    use crate::ids::MessageId;

    #[test]
    fn hash_states_behind_hmac_and_hkdf_wipe_themselves_on_drop() {
        // `Hmac<Sha256>` (the phone index, the HKDF in every `EpochKey` and in
        // `LocalKeyProvider`) holds two SHA-256 cores keyed with the secret;
        // sha2 wipes a core on drop only with its `zeroize` feature on.
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<sha2::block_api::Sha256VarCore>();
        zeroizes_on_drop::<Sha256>();
    }

    /// Decimal-list and hex spellings of every 4-byte window of `secret`.
    fn spellings(secret: &[u8]) -> Vec<String> {
        let list = |w: &[u8], f: fn(&u8) -> String| w.iter().map(f).collect::<Vec<_>>().join(", ");
        secret
            .windows(4)
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
}
