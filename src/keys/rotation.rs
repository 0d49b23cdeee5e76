//! KEK rings in the store and in memory: each business's ring created on
//! first use, its KEKs unwrapped on demand, and its rotation (add, promote,
//! rewrap, raise the decrypt floor, retire), every update compared against
//! the stored revision.

use std::sync::{Arc, RwLockWriteGuard};

use super::{
    Cache, Kek, KekCheck, KekContext, KekRing, KeyError, KeyManager, PAGE, SecretKey, WrappedKey,
};
use crate::ids::BusinessId;
use crate::store::StoreError;
use crate::time::Timestamp;

/// How many times a ring update is retried when it races another.
const RING_RETRIES: usize = 16;

impl KeyManager {
    /// The KEK ring of `business`, created with version 1 on first use.
    /// Refused as [`KeyError::CorruptRing`] while keys of the business are
    /// stored with no ring: they are wrapped under a ring that went
    /// missing, and a fresh one would make every one of them unreadable for
    /// good, where putting the lost ring back could still save them.
    pub async fn ring(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        match self.ring_if_any(business).await? {
            Some(ring) => Ok(ring),
            None => self.create_ring(business).await,
        }
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

    /// The stored ring of `business`, which must exist (it was created
    /// before): read afresh for a compare-and-swap, and corrupt if gone.
    async fn existing_ring(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        self.load_ring(business)
            .await?
            .ok_or(KeyError::CorruptRing { business })
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

    /// Cache `ring`, just written, with `kek` (a version it adds) if given,
    /// unless a ring was forgotten since `forgets` (see
    /// [`unless_forgotten`](Self::unless_forgotten)). Then the business's
    /// ring is dropped from memory instead: the one cached is older than
    /// the one written (the forgotten ring may be another business's).
    fn cache_written(&self, ring: &KekRing, kek: Option<Kek>, forgets: u64) -> KekRing {
        let business = ring.business();
        let Some(mut cache) = self.unless_forgotten(forgets) else {
            self.write().drop_ring(business);
            return ring.clone();
        };
        if let Some(kek) = kek {
            cache.keks.insert((business, kek.version), Arc::new(kek));
        }
        cache.cache_ring(business, ring.clone())
    }

    /// [`unwrap_secret`](Self::unwrap_secret) of a key a listing gave,
    /// refused as [`KeyError::Unwrap`] also where the ring the store holds
    /// now cannot unwrap with its KEK version (below the floor, or not in
    /// the ring: retired, or never added): no ring will again, as a floor
    /// only rises, a retired version never returns, and a version is in
    /// the stored ring before any key is wrapped under it. (The ring in
    /// memory may be behind the store's: its refusal alone says nothing of
    /// the key.)
    pub(crate) async fn unwrap_listed(
        &self,
        wrapped: &WrappedKey,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        match self.unwrap_secret(wrapped.id, wrapped).await {
            Err(e @ (KeyError::BelowFloor { .. } | KeyError::UnknownVersion { .. })) => {
                let ring = self.existing_ring(wrapped.id.business).await?;
                match ring.usable(wrapped.kek_version) {
                    Ok(_) => Err(e),
                    Err(_) => Err(KeyError::Unwrap(wrapped.id)),
                }
            }
            unwrapped => unwrapped,
        }
    }

    /// The ring that must exist because a key wrapped under it does. Used
    /// wherever a stored key is unwrapped, so that opening never writes: a
    /// missing ring is reported, not replaced by a fresh one that could not
    /// unwrap the key anyway.
    pub(super) async fn ring_of_stored_key(
        &self,
        business: BusinessId,
    ) -> Result<KekRing, KeyError> {
        self.stored_ring(business)
            .await?
            .ok_or(KeyError::CorruptRing { business })
    }

    /// Create `business`'s ring, with version 1: it has none, and no key
    /// (see [`ring_if_any`](Self::ring_if_any)).
    async fn create_ring(&self, business: BusinessId) -> Result<KekRing, KeyError> {
        match self
            .create_ring_as(business, |ring| Ok((ring, None)))
            .await?
        {
            Some(ring) => Ok(ring),
            // Another caller created it first: use theirs.
            None => self
                .stored_ring(business)
                .await?
                .ok_or(KeyError::Contention),
        }
    }

    /// Create `business`'s ring, version 1, as `change` makes it (with the
    /// KEK version it adds, if any), in the one write that creates it: an
    /// operation on a business with no ring that fails leaves it with
    /// none. `None` if another caller created one first.
    async fn create_ring_as<F>(
        &self,
        business: BusinessId,
        change: F,
    ) -> Result<Option<KekRing>, KeyError>
    where
        F: FnOnce(KekRing) -> Result<(KekRing, Option<Kek>), KeyError>,
    {
        let (key, wrapped, check) = self.new_kek(business, 1).await?;
        // The creation time of version 1 is informational; no clock is needed.
        let first = KekRing::new(business, wrapped, check, Timestamp::UNIX_EPOCH);
        let (ring, added) = change(first)?;
        let forgets = self.forgets();
        match self.store.put_ring(&ring, None).await {
            Ok(()) => {
                let first = ring.usable(1).is_ok().then(|| Kek::new(1, &key));
                self.cache_written(&ring, first, forgets);
                Ok(Some(self.cache_written(&ring, added, forgets)))
            }
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The ring of a business that may have none: `None` if it has no ring
    /// and no key, [`KeyError::CorruptRing`] if keys are stored under a
    /// ring that is missing.
    async fn ring_if_any(&self, business: BusinessId) -> Result<Option<KekRing>, KeyError> {
        if let Some(ring) = self.stored_ring(business).await? {
            return Ok(Some(ring));
        }
        let keys = self.store.keys_wrapped_below(business, u32::MAX, None, 1);
        if keys.await?.is_empty() {
            return Ok(None);
        }
        // Unless another caller created the ring, and a key, meanwhile.
        self.stored_ring(business)
            .await?
            .map(Some)
            .ok_or(KeyError::CorruptRing { business })
    }

    /// A new KEK, version `version` of `business`: generated, wrapped by the
    /// provider, with its check value. The blob is unwrapped once before
    /// anything is wrapped under the key: a provider whose blob does not
    /// give the key back (a truncated answer, say) is refused now, not
    /// found out after a restart, when every key under it would be lost.
    async fn new_kek(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<(SecretKey, Vec<u8>, KekCheck), KeyError> {
        let context = KekContext { business, version };
        let key = SecretKey::generate();
        let wrapped = self.provider.wrap(&context, &key).await?;
        let check = KekCheck::of(&key, &context);
        let back = self.provider.unwrap(&context, &wrapped).await?;
        if KekCheck::of(&back, &context) != check {
            return Err(KeyError::KekMismatch { business, version });
        }
        Ok((key, wrapped, check))
    }

    /// Apply `change` to the stored ring, retrying if another update races it.
    async fn update_ring<F>(&self, business: BusinessId, change: F) -> Result<KekRing, KeyError>
    where
        F: Fn(&KekRing) -> Result<KekRing, KeyError>,
    {
        if self.ring_if_any(business).await?.is_none() {
            // A change a new ring would refuse fails before the provider is
            // asked for its first KEK; one it allows is made in the write
            // that creates the ring.
            change(&KekRing::new(
                business,
                Vec::new(),
                KekCheck::UNUSED,
                Timestamp::UNIX_EPOCH,
            ))?;
            let created = self.create_ring_as(business, |first| Ok((change(&first)?, None)));
            if let Some(ring) = created.await? {
                return Ok(ring);
            }
        }
        for _ in 0..RING_RETRIES {
            let current = self.existing_ring(business).await?;
            let next = change(&current)?;
            if self.swap_ring(&current, &next, None).await? {
                return Ok(next);
            }
        }
        Err(KeyError::Contention)
    }

    /// Store `next` in place of `current` (compared by revision) and cache
    /// it, with `kek` (a version it adds) if given; `false` if another
    /// update stored first. If the store fails the write, it may have taken
    /// it with its answer lost: the business's ring is forgotten in memory
    /// (see [`Cache::forget_ring`]).
    async fn swap_ring(
        &self,
        current: &KekRing,
        next: &KekRing,
        kek: Option<Kek>,
    ) -> Result<bool, KeyError> {
        let forgets = self.forgets();
        let unanswered = Unanswered {
            keys: self,
            business: next.business(),
        };
        let written = self.store.put_ring(next, Some(current.revision())).await;
        match written {
            Ok(()) => {
                unanswered.answered();
                self.cache_written(next, kek, forgets);
                Ok(true)
            }
            Err(StoreError::Conflict) => {
                unanswered.answered();
                Ok(false)
            }
            // Perhaps taken, its answer lost: `unanswered` forgets the ring.
            Err(e) => Err(e.into()),
        }
    }

    /// The unwrapped KEK `version` of `ring`'s business, if it may unwrap.
    pub(super) async fn kek(&self, ring: &KekRing, version: u32) -> Result<Arc<Kek>, KeyError> {
        let business = ring.business();
        let stored = ring.usable(version)?;
        if let Some(kek) = self.read().keks.get(&(business, version)) {
            return Ok(kek.clone());
        }
        let context = KekContext { business, version };
        let key = self.provider.unwrap(&context, &stored.wrapped).await?;
        // The wrong key, cached, would wrap new keys that no one could
        // unwrap again.
        if stored
            .check
            .is_some_and(|check| KekCheck::of(&key, &context) != check)
        {
            return Err(KeyError::KekMismatch { business, version });
        }
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
        // A business with no ring yet: its first ring is written with the
        // version added (2, after the ring's first), so that a call that
        // fails leaves it with none.
        let mut prepared = None;
        if self.ring_if_any(business).await?.is_none() {
            let (key, wrapped, check) = self.new_kek(business, 2).await?;
            let created = self.create_ring_as(business, |first| {
                let (next, version) = first.add_version(wrapped.clone(), check, now)?;
                Ok((next, Some(Kek::new(version, &key))))
            });
            if created.await?.is_some() {
                return Ok(2);
            }
            prepared = Some((key, wrapped, check));
        }
        for _ in 0..RING_RETRIES {
            let current = self.existing_ring(business).await?;
            let version = current.next_version();
            let (key, wrapped, check) = match prepared.take() {
                Some(prepared) if version == 2 => prepared,
                _ => self.new_kek(business, version).await?,
            };
            let (next, version) = current.add_version(wrapped, check, now)?;
            if self
                .swap_ring(&current, &next, Some(Kek::new(version, &key)))
                .await?
            {
                return Ok(version);
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
    /// the primary, without touching any content. Returns how many were
    /// rewrapped. A stored key that does not unwrap, or names a version the
    /// ring cannot unwrap with (a damaged row), is left as it is and the
    /// others are rewrapped all the same; then the first such is reported
    /// ([`KeyError::Unwrap`], [`KeyError::BelowFloor`],
    /// [`KeyError::UnknownVersion`]), to be dealt with before the floor can
    /// pass its version. (A row that does not decode at all, which the
    /// store's listing skips, is not reported here; it keeps the floor
    /// down all the same: [`raise_decrypt_floor`](Self::raise_decrypt_floor)
    /// refuses with [`KeyError::NeedsRewrap`] while any row of a version
    /// below it is stored.) A business with no ring and no key has nothing to
    /// rewrap, and is given no ring; keys stored under a ring that is
    /// missing are [`KeyError::CorruptRing`].
    pub async fn rewrap(&self, business: BusinessId) -> Result<u64, KeyError> {
        let _wrapping = self.wrapping(business).read_arc().await;
        let Some(ring) = self.ring_if_any(business).await? else {
            return Ok(0);
        };
        let primary = self.kek(&ring, ring.primary()).await?;
        let mut after = None;
        let mut done = 0;
        let mut damaged = None;
        loop {
            let page = self
                .store
                .keys_wrapped_below(business, primary.version, after, PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for old in page {
                // A row that names a version the ring has no usable KEK of,
                // or that does not unwrap, is damaged: left, and reported.
                let secret = self
                    .kek(&ring, old.kek_version)
                    .await
                    .and_then(|kek| old.open(&kek));
                let secret = match secret {
                    Ok(secret) => secret,
                    Err(
                        e @ (KeyError::Unwrap(_)
                        | KeyError::BelowFloor { .. }
                        | KeyError::UnknownVersion { .. }),
                    ) => {
                        damaged.get_or_insert(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let new = WrappedKey::seal(old.id, &primary, &secret)?;
                if self.store.rewrap_key(new, old.kek_version).await? {
                    done += 1;
                }
            }
        }
        damaged.map_or(Ok(done), Err)
    }

    /// Raise `business`'s decrypt floor to `version`: older versions may no
    /// longer unwrap. Refused while any key is still wrapped below it. A
    /// business with no ring and no key is given no ring: what its first
    /// ring would refuse is refused, and the rest is so already (its floor
    /// starts at its first version). Keys stored under a ring that is
    /// missing are [`KeyError::CorruptRing`].
    pub async fn raise_decrypt_floor(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<(), KeyError> {
        let _wrapping = self.wrapping(business).write_arc().await;
        // What the ring refuses (a floor above the primary, say) is refused
        // as such: rewrapping, which wraps under the primary, cannot help.
        let Some(ring) = self.ring_if_any(business).await? else {
            KekRing::new(
                business,
                Vec::new(),
                KekCheck::UNUSED,
                Timestamp::UNIX_EPOCH,
            )
            .raise_floor(version)?;
            return Ok(());
        };
        ring.raise_floor(version)?;
        let mut left = !self
            .store
            .keys_wrapped_below(business, version, None, 1)
            .await?
            .is_empty();
        // A row the listing skips, one that does not decode, still holds
        // its version down: each version's count says so (mended, it
        // would unwrap again only while its version is at the floor).
        for below in ring.versions().iter().map(|v| v.version) {
            if left || below >= version {
                break;
            }
            left = self.store.count_wrapped_under(business, below).await? > 0;
        }
        if left {
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
        let _wrapping = self.wrapping(business).write_arc().await;
        let forgets = self.forgets();
        if let Some(ring) = self.load_ring(business).await? {
            // Versions are numbered from 1: there never was a version 0.
            if (1..ring.floor().min(ring.next_version())).contains(&version)
                && ring.get(version).is_none()
            {
                let mut cache = self.write();
                cache.keks.remove(&(business, version));
                if cache.ring_forgets == forgets {
                    cache.cache_ring(business, ring);
                }
                return Ok(());
            }
            // What the ring refuses (a version at or above the floor) is
            // refused as such, before its keys are counted: no rewrap can
            // take keys off the primary.
            ring.retire(version)?;
        }
        let keys = self.store.count_wrapped_under(business, version).await?;
        if keys > 0 {
            return Err(KeyError::VersionInUse { version, keys });
        }
        self.update_ring(business, |r| r.retire(version)).await?;
        self.write().keks.remove(&(business, version));
        Ok(())
    }
}

/// A ring update on its way to the store: dropped unanswered (the store
/// failed it, or the caller stopped waiting, and the write may land all the
/// same), it forgets the business's ring (see `Cache::forget_ring`).
struct Unanswered<'k> {
    keys: &'k KeyManager,
    business: BusinessId,
}

impl Unanswered<'_> {
    /// The store answered: nothing to forget.
    fn answered(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.keys.write().forget_ring(self.business);
    }
}
