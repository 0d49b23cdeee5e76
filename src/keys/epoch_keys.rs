//! Epoch keys: created under the primary KEK for sealing, loaded for
//! opening, and destroyed when their epoch ends (or early), in the store
//! and in memory.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{
    Epoch, EpochKey, EpochLength, KeyEntry, KeyError, KeyId, KeyManager, PAGE, SecretKey,
    WrappedKey,
};
use crate::ids::BusinessId;
use crate::retention::CEILING;
use crate::store::HoldScope;
use crate::time::Timestamp;
use crate::vault::CLOCK_TOLERANCE;

/// How many times loading an epoch key is retried when destroys race it.
const LOAD_RETRIES: usize = 16;

/// What loading an epoch key is for.
#[derive(Clone, Copy)]
enum Load {
    /// Opening: a missing key is an error; nothing is written.
    Existing,
    /// Sealing at `now`: create the key (random, wrapped under the primary
    /// KEK) if the store has none, unless the epoch starts past the
    /// retention ceiling from `now`.
    Seal { now: Timestamp },
}

/// Forgets the cached epoch keys it names when dropped, however the call
/// destroying them ends: no destroyed key may outlive its stored copy in
/// memory, and a destruction whose future was dropped may land all the
/// same (a SQLite commit does). Forgetting a key the store still has costs
/// only a reload.
struct ForgetEpochs<'a, F: Fn(&(BusinessId, Epoch)) -> bool> {
    keys: &'a KeyManager,
    doomed: F,
    /// An early destruction: bumps [`KeyManager::early_destructions`] too.
    early: bool,
}

impl<F: Fn(&(BusinessId, Epoch)) -> bool> ForgetEpochs<'_, F> {
    fn now(&self) {
        let mut cache = self.keys.write();
        // Loads under way read the store again (see `Cache::epoch_destructions`).
        cache.epoch_destructions = cache.epoch_destructions.wrapping_add(1);
        cache.epochs.retain(|key, loaded| {
            let doomed = (self.doomed)(key);
            if doomed {
                // A copy a caller holds (to seal a batch) seals no more.
                loaded.mark_destroyed();
            }
            !doomed
        });
        if self.early {
            // After the key left the store and this cache: whoever notes
            // the new count and then loads reads the destruction.
            self.keys
                .early_destructions
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }
}

impl<F: Fn(&(BusinessId, Epoch)) -> bool> Drop for ForgetEpochs<'_, F> {
    fn drop(&mut self) {
        self.now();
    }
}

impl KeyManager {
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
    /// epoch has ended or its key was destroyed, and, with nothing stored,
    /// for an epoch that starts past the retention [`CEILING`] (and
    /// [`CLOCK_TOLERANCE`]) from `now`: one ending more than that and the
    /// longest [`EpochLength`] from `now`, whose key could seal only records
    /// kept past the ceiling. A key stored is used however far ahead its
    /// epoch ends: it was made within the ceiling, and a clock stepped back
    /// since changes nothing it seals.
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
        self.load_epoch_key(business, epoch, Load::Seal { now })
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
                (None, Load::Seal { now }) => {
                    // A key seals records expiring at most the longest
                    // epoch length before its epoch ends (see
                    // `envelope::seal`).
                    let horizon = CEILING + CLOCK_TOLERANCE + EpochLength::MAX;
                    if epoch.end() > now.saturating_add(horizon) {
                        return Err(KeyError::EpochBeyondCeiling { epoch, now });
                    }
                    let _wrapping = self.wrapping(business).read_arc().await;
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
                KeyEntry::Wrapped(w) if w.id == id => w,
                // Another key's blob in this key's row (moved there): it
                // would unwrap, as that key.
                KeyEntry::Wrapped(_) => return Err(KeyError::Unwrap(id)),
                KeyEntry::Destroyed { .. } => {
                    return Err(KeyError::EpochDestroyed { business, epoch });
                }
            };
            let ring = self.ring_of_stored_key(business).await?;
            let kek = match self.kek(&ring, wrapped.kek_version).await {
                Ok(kek) => kek,
                // Read before a rotation rewrapped it and moved the floor
                // past its version: read the store again.
                Err(KeyError::BelowFloor { .. } | KeyError::UnknownVersion { .. })
                    if self.store.key(&id).await?.is_some_and(|again| {
                        matches!(again, KeyEntry::Wrapped(w) if w.kek_version != wrapped.kek_version)
                    }) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
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
    /// sealed into it. Signal sessions over this manager drop the state they
    /// hold in memory on their next operation, and a copy of the key a
    /// caller holds seals no more. Returns whether a live key was
    /// destroyed.
    ///
    /// It takes effect in this key manager (and so in the processor that
    /// owns it) at once. Another key manager over the same store, in
    /// another process still running on it, keeps a copy it loaded until
    /// it restarts: it can still open the epoch's records, and seal new
    /// ones no one can open. Stop it before shredding (a processor taken
    /// over already writes nothing).
    ///
    /// Unchecked: legal holds are not consulted and nothing is audited.
    /// Operators shred through
    /// [`Retention::shred_epoch`](crate::retention::Retention::shred_epoch)
    /// (or `Processor::shred_epoch`), which do both.
    pub async fn destroy_epoch_unchecked(
        &self,
        business: BusinessId,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<bool, KeyError> {
        let _forget = ForgetEpochs {
            keys: self,
            doomed: |key: &(BusinessId, Epoch)| *key == (business, epoch),
            early: true,
        };
        Ok(self
            .store
            .destroy_key(&KeyId::epoch(business, epoch), now)
            .await?)
    }

    /// Destroy the keys of every epoch that ended at or before `now` (and
    /// drop the tombstones of epochs destroyed early). Returns how many
    /// entries were removed.
    ///
    /// Unchecked: legal holds are not consulted (the key of an epoch a hold
    /// still needs goes too), nothing is audited, and a `now` ahead of the
    /// clock destroys live epochs early. Operators destroy ended epochs
    /// through the retention sweep
    /// ([`Retention::sweep`](crate::retention::Retention::sweep), or
    /// `Processor::sweep`), which keeps the keys a hold needs.
    pub async fn destroy_ended_epochs_unchecked(&self, now: Timestamp) -> Result<u64, KeyError> {
        let (removed, _) = self
            .destroy_ended_epochs_except(now, |_, _| false, None)
            .await?;
        Ok(removed)
    }

    /// [`destroy_ended_epochs_unchecked`](Self::destroy_ended_epochs_unchecked),
    /// sparing the epochs `keep` says of (those the legal holds `seen` still
    /// need) and, with holds `seen`, every key of a business that a hold
    /// stored since covers ([`KeyStore::delete_epoch_keys`]): those wait
    /// for the holds to be read again, and the other businesses' keys go.
    /// Returns how many entries were removed, and whether any was spared
    /// so.
    ///
    /// [`KeyStore::delete_epoch_keys`]: crate::store::KeyStore::delete_epoch_keys
    pub(crate) async fn destroy_ended_epochs_except(
        &self,
        now: Timestamp,
        keep: impl Fn(BusinessId, Epoch) -> bool,
        seen: Option<&[HoldScope]>,
    ) -> Result<(u64, bool), KeyError> {
        let forget = ForgetEpochs {
            keys: self,
            doomed: |(b, epoch): &(BusinessId, Epoch)| epoch.end() <= now && !keep(*b, *epoch),
            early: false,
        };
        let mut removed = 0;
        // The ids of pages the store did not delete in full: those it
        // spared come back on every page.
        let mut spared: BTreeSet<KeyId> = BTreeSet::new();
        // Kept and spared entries come back on every page: a page of
        // nothing else is asked for again, twice as long.
        let mut page = PAGE;
        loop {
            let ended = self.store.ended_epoch_keys(now, page).await?;
            let full = ended.len() >= page;
            let doomed: Vec<KeyId> = ended
                .into_iter()
                .filter(|id| {
                    !spared.contains(id)
                        && !keep(id.business, Epoch::ending_at(Timestamp::from_millis(id.id)))
                })
                .collect();
            if doomed.is_empty() {
                if full {
                    page = page.saturating_mul(2);
                    continue;
                }
                return Ok((removed, !spared.is_empty()));
            }
            let deleted = match seen {
                Some(seen) => self.store.delete_epoch_keys(&doomed, seen).await?,
                None => self.store.delete_keys(&doomed).await?,
            };
            removed += deleted;
            forget.now();
            if seen.is_some() && deleted < doomed.len() as u64 {
                spared.extend(doomed);
            }
        }
    }
}
