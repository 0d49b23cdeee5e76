//! A business's own Signal keys: identity, signed prekeys, one-time prekeys.
//!
//! Every private key is stored wrapped under the business's KEK
//! ([`KeyKind::SignalIdentity`], [`KeyKind::SignalSignedPreKey`],
//! [`KeyKind::SignalPreKey`]), so KEK rotation rewraps them like any other key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rand::RngExt;
use wacore_libsignal::protocol::{
    GenericSignedPreKey, IdentityKey, IdentityKeyPair, KeyPair, PreKeyRecord, SignedPreKeyRecord,
    Timestamp as SignalTimestamp,
};

use super::{PublicPreKey, SignalError, SignedPublicPreKey, StorageFailure};
use crate::ids::BusinessId;
use crate::keys::{KeyError, KeyId, KeyKind, KeyManager, WrappedKey};
use crate::rng::OsRng;
use crate::time::Timestamp;

/// Largest prekey id: the wire carries 24 bits.
pub(super) const MAX_PREKEY_ID: u32 = 0x00FF_FFFF;
/// Registration ids are 14 bits; zero is not used.
const MAX_REGISTRATION_ID: u32 = 0x3FFF;
/// Page size when listing prekeys.
const PAGE: usize = 512;
/// Ids tried in a row, making a prekey, past ones taken by damaged rows
/// the listing skipped.
const DAMAGED_ID_RETRIES: usize = 16;

/// A business's identity and live signed prekeys, unwrapped.
pub(super) struct Account {
    pub(super) identity: IdentityKeyPair,
    pub(super) registration_id: u32,
    /// Oldest first; the last is current.
    pub(super) signed: Vec<SignedPreKeyRecord>,
    /// Stored signed prekeys that are damaged (see [`is_damaged`]): never
    /// used, their ids never made again.
    pub(super) damaged_signed: Vec<WrappedKey>,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("registration_id", &self.registration_id)
            .field("signed_prekeys", &self.signed.len())
            .field("damaged_signed_prekeys", &self.damaged_signed.len())
            .finish_non_exhaustive()
    }
}

fn key_id(business: BusinessId, kind: KeyKind, id: u64) -> KeyId {
    KeyId { business, kind, id }
}

fn corrupt(what: &'static str) -> SignalError {
    SignalError::Storage(StorageFailure::Corrupt(what))
}

/// Whether `e`, from unwrapping and decoding one stored key (or storing a
/// key where one is stored), says that the key itself is damaged: it does
/// not unwrap, or its record does not decode or is unsound. Not a failure
/// of anything other keys share (the store, the provider, the KEK ring):
/// the upkeep deletes a key for this. Such a key can never be used: it is
/// skipped, and one prekey is no reason to stop a business. (Its identity
/// is: that is refused whole.)
pub(super) fn is_damaged(e: &SignalError) -> bool {
    matches!(
        e,
        SignalError::Storage(StorageFailure::Corrupt(_) | StorageFailure::Key(KeyError::Unwrap(_)))
    )
}

/// Log a damaged prekey of `business` (its id only: nothing of it is read).
fn log_damaged(business: BusinessId, kind: &'static str, id: u64, e: &SignalError) {
    tracing::warn!(
        business = business.get(),
        kind,
        id,
        error = %e,
        "a stored prekey is damaged: never published nor used"
    );
}

impl Account {
    /// Load the account of `business`, if it has an identity (its first
    /// signed prekey is made if it has none, as [`load_or_create`] does).
    ///
    /// [`load_or_create`]: Self::load_or_create
    pub(super) async fn load(
        keys: &KeyManager,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<Option<Self>, SignalError> {
        let id = key_id(business, KeyKind::SignalIdentity, 0);
        if keys.load_secret(id).await?.is_none() {
            return Ok(None);
        }
        Self::load_or_create(keys, business, now).await.map(Some)
    }

    /// Load the account of `business`, creating its identity and first
    /// signed prekey if it has none. Concurrent creators converge: the first
    /// stored identity wins.
    pub(super) async fn load_or_create(
        keys: &KeyManager,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<Self, SignalError> {
        let id = key_id(business, KeyKind::SignalIdentity, 0);
        let stored = match keys.load_secret(id).await? {
            Some(stored) => stored,
            None => {
                // Wiped whatever happens, the store failing included.
                let fresh = encode_identity(
                    OsRng.random_range(1..=MAX_REGISTRATION_ID),
                    &IdentityKeyPair::generate(&mut OsRng),
                );
                keys.store_secret(id, &fresh).await?
            }
        };
        let (registration_id, identity) = decode_identity(&stored)?;
        let (signed, damaged_signed) = load_signed(keys, business, identity.identity_key()).await?;
        let mut account = Self {
            identity,
            registration_id,
            signed,
            damaged_signed,
        };
        if account.signed.is_empty() {
            account.add_signed_prekey(keys, business, now).await?;
        }
        Ok(account)
    }

    /// The current signed prekey.
    pub(super) fn current_signed(&self) -> Result<&SignedPreKeyRecord, SignalError> {
        self.signed.last().ok_or(corrupt("no signed prekey"))
    }

    /// Whether the signed prekey at `i` (oldest first) is past its
    /// `grace`, at `now`: the grace runs from when the next one, which
    /// replaced it, was made. The current one never is.
    pub(super) fn past_grace(&self, i: usize, now: Timestamp, grace: Duration) -> bool {
        self.signed
            .get(i + 1)
            .is_some_and(|next| now >= made_at(next).saturating_add(grace))
    }

    /// Generate, sign and store a new signed prekey; it becomes current.
    pub(super) async fn add_signed_prekey(
        &mut self,
        keys: &KeyManager,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<(), SignalError> {
        let mut taken: BTreeSet<u32> = self
            .signed
            .iter()
            .filter_map(|r| r.id().ok().map(u32::from))
            .chain(
                self.damaged_signed
                    .iter()
                    .filter_map(|w| u32::try_from(w.id.id).ok()),
            )
            // Only ids a rotation makes say where the newest is.
            .filter(|id| (1..=MAX_PREKEY_ID).contains(id))
            .collect();
        // An id can be taken by a row the listing skipped (one that does
        // not decode): the store keeps it, and the next id is tried.
        for _ in 0..DAMAGED_ID_RETRIES {
            let id = next_ids(&taken, &BTreeSet::new(), 1)
                .first()
                .copied()
                .ok_or(corrupt("no free signed prekey id"))?;
            match self.store_signed_prekey(keys, business, id, now).await {
                // Kept: it does not decode, and the upkeep deletes only a
                // key found damaged as it was read.
                Err(e) if is_damaged(&e) => {
                    log_damaged(business, "signed", u64::from(id), &e);
                    taken.insert(id);
                }
                stored => {
                    self.signed.push(stored?);
                    return Ok(());
                }
            }
        }
        Err(corrupt("no free signed prekey id"))
    }

    /// Generate, sign and store a new signed prekey as `id`: the one stored.
    async fn store_signed_prekey(
        &self,
        keys: &KeyManager,
        business: BusinessId,
        id: u32,
        now: Timestamp,
    ) -> Result<SignedPreKeyRecord, SignalError> {
        let pair = KeyPair::generate(&mut OsRng);
        let signature = self
            .identity
            .private_key()
            .calculate_signature(&pair.public_key.serialize(), &mut OsRng)
            .map_err(|_| corrupt("signing failed"))?;
        let record = SignedPreKeyRecord::new(
            id.into(),
            SignalTimestamp::from_epoch_millis(now.as_millis()),
            &pair,
            &signature,
        );
        let bytes =
            zeroize::Zeroizing::new(record.serialize().map_err(|_| corrupt("signed prekey"))?);
        let stored = keys
            .store_secret(
                key_id(business, KeyKind::SignalSignedPreKey, u64::from(id)),
                &bytes,
            )
            .await?;
        // Another instance rotating at the same time may have stored its
        // own key under this id first: the store's is the one to publish
        // and decrypt with, as `load_or_create` does for the identity.
        if *stored == *bytes {
            Ok(record)
        } else {
            decode_signed_prekey(&stored, u64::from(id), self.identity.identity_key())
        }
    }

    /// The public half of the current signed prekey.
    pub(super) fn signed_public(&self) -> Result<SignedPublicPreKey, SignalError> {
        let record = self.current_signed()?;
        let public_key = record
            .public_key()
            .map_err(|_| corrupt("signed prekey"))?
            .serialize();
        let signature: [u8; 64] = record
            .signature()
            .map_err(|_| corrupt("signed prekey"))?
            .try_into()
            .map_err(|_| corrupt("signed prekey signature"))?;
        Ok(SignedPublicPreKey {
            id: record.id().map_err(|_| corrupt("signed prekey"))?.into(),
            public_key,
            signature,
        })
    }
}

/// Every stored key of `kind` of `business`, in id order.
async fn list(
    keys: &KeyManager,
    business: BusinessId,
    kind: KeyKind,
) -> Result<Vec<WrappedKey>, SignalError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = keys
            .store()
            .keys_of_kind(business, kind, after, PAGE)
            .await
            .map_err(|e| {
                SignalError::Storage(super::StorageFailure::Store(std::sync::Arc::new(e)))
            })?;
        let Some(last) = page.last() else { break };
        // Each key names itself: one of another business or kind in the
        // listing (a store that moved it) is not one of these.
        if page
            .iter()
            .any(|w| w.id.business != business || w.id.kind != kind)
        {
            return Err(corrupt("a key listed under another business or kind"));
        }
        after = Some(last.id.id);
        all.extend(page);
    }
    Ok(all)
}

/// When a signed prekey was made (its record's time stamp; the epoch if it
/// has none).
pub(super) fn made_at(record: &SignedPreKeyRecord) -> Timestamp {
    Timestamp::from_millis(record.timestamp().map_or(0, |t| t.epoch_millis()))
}

/// The live signed prekeys of `business`, signed by its `identity`, oldest
/// first, and those that are damaged ([`is_damaged`]: logged).
async fn load_signed(
    keys: &KeyManager,
    business: BusinessId,
    identity: &IdentityKey,
) -> Result<(Vec<SignedPreKeyRecord>, Vec<WrappedKey>), SignalError> {
    let (mut records, mut damaged) = (Vec::new(), Vec::new());
    for wrapped in list(keys, business, KeyKind::SignalSignedPreKey).await? {
        let id = wrapped.id.id;
        let record = match keys.unwrap_listed(&wrapped).await {
            Ok(bytes) => decode_signed_prekey(&bytes, id, identity),
            Err(e) => Err(e.into()),
        };
        match record {
            Ok(record) => records.push(record),
            Err(e) if is_damaged(&e) => {
                log_damaged(business, "signed", id, &e);
                damaged.push(wrapped);
            }
            Err(e) => return Err(e),
        }
    }
    records.sort_by_key(made_at);
    Ok((records, damaged))
}

/// The stored one-time prekeys of `business`, oldest first (see
/// [`oldest_first`]), with their ids; and those stored under an id no
/// refill makes (logged), which are none of the pool's.
async fn list_one_time(
    keys: &KeyManager,
    business: BusinessId,
) -> Result<(Vec<(u32, WrappedKey)>, Vec<WrappedKey>), SignalError> {
    let (mut stored, mut misfiled) = (BTreeMap::new(), Vec::new());
    for wrapped in list(keys, business, KeyKind::SignalPreKey).await? {
        match refill_id(&wrapped) {
            Some(id) => _ = stored.insert(id, wrapped),
            None => {
                log_damaged(business, "one-time", wrapped.id.id, &corrupt("prekey id"));
                misfiled.push(wrapped);
            }
        }
    }
    let pool = oldest_first(stored.keys().copied().collect())
        .into_iter()
        .filter_map(|id| stored.remove(&id).map(|w| (id, w)))
        .collect();
    Ok((pool, misfiled))
}

/// The one-time prekeys of `business`: the public halves of the sound
/// ones, oldest first, and those that are damaged ([`is_damaged`]: logged).
pub(super) async fn one_time_prekeys(
    keys: &KeyManager,
    business: BusinessId,
) -> Result<(Vec<PublicPreKey>, Vec<WrappedKey>), SignalError> {
    let (pool, mut damaged) = list_one_time(keys, business).await?;
    let mut sound = Vec::new();
    for (id, wrapped) in pool {
        match public_one_time(keys, id, &wrapped).await {
            Ok(public) => sound.push(public),
            Err(e) if is_damaged(&e) => {
                log_damaged(business, "one-time", u64::from(id), &e);
                damaged.push(wrapped);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((sound, damaged))
}

/// Whether `business` stores at least `wanted` one-time prekeys and the
/// first `wanted` listed are all sound: a damaged one among them (logged)
/// is left for the upkeep, which deletes it, as it would be published.
pub(super) async fn holds_sound_one_time(
    keys: &KeyManager,
    business: BusinessId,
    wanted: usize,
) -> Result<bool, SignalError> {
    let listed = keys
        .store()
        .keys_of_kind(business, KeyKind::SignalPreKey, None, wanted)
        .await?;
    if listed.len() < wanted {
        return Ok(false);
    }
    for wrapped in &listed {
        let public = match refill_id(wrapped) {
            Some(id) => public_one_time(keys, id, wrapped).await.map(drop),
            None => Err(corrupt("prekey id")),
        };
        match public {
            Ok(()) => {}
            Err(e) if is_damaged(&e) => {
                log_damaged(business, "one-time", wrapped.id.id, &e);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The id `wrapped` is stored under, if it is one a refill makes (in
/// `1..=MAX_PREKEY_ID`).
pub(super) fn refill_id(wrapped: &WrappedKey) -> Option<u32> {
    u32::try_from(wrapped.id.id)
        .ok()
        .filter(|id| (1..=MAX_PREKEY_ID).contains(id))
}

/// The public half of the one-time prekey `wrapped`, stored under `id`.
async fn public_one_time(
    keys: &KeyManager,
    id: u32,
    wrapped: &WrappedKey,
) -> Result<PublicPreKey, SignalError> {
    let bytes = keys.unwrap_listed(wrapped).await?;
    let record = decode_one_time_prekey(&bytes, id)?;
    let public = record.public_key().map_err(|_| corrupt(ONE_TIME_PREKEY))?;
    Ok(PublicPreKey {
        id,
        public_key: public.serialize(),
    })
}

/// Generate and store `count` one-time prekeys with ids not in `taken`,
/// following the newest of them (an id held by a damaged row is skipped).
/// Returns the ids written, and
/// how many of the keys under them are this call's: another instance
/// refilling the same store may have stored its own key under an id first,
/// and that key stays.
pub(super) async fn add_one_time_prekeys(
    keys: &KeyManager,
    business: BusinessId,
    taken: &BTreeSet<u32>,
    held: &BTreeSet<u32>,
    count: usize,
) -> Result<(Vec<u32>, usize), SignalError> {
    let (mut written, mut ours) = (Vec::new(), 0);
    for id in next_ids(taken, held, count) {
        let record = PreKeyRecord::new(id.into(), &KeyPair::generate(&mut OsRng));
        let bytes =
            zeroize::Zeroizing::new(record.serialize().map_err(|_| corrupt(ONE_TIME_PREKEY))?);
        let key = key_id(business, KeyKind::SignalPreKey, u64::from(id));
        match keys
            .store_secret(key, &bytes)
            .await
            .map_err(SignalError::from)
        {
            Ok(stored) => {
                written.push(id);
                ours += usize::from(*stored == *bytes);
            }
            // A row the listing skipped holds the id: it stays, and the
            // next upkeep refills what this one could not.
            Err(e) if is_damaged(&e) => log_damaged(business, "one-time", key.id, &e),
            Err(e) => return Err(e),
        }
    }
    Ok((written, ours))
}

/// Delete the one-time prekeys `ids` of `business`.
pub(super) async fn delete_one_time_prekeys(
    keys: &KeyManager,
    business: BusinessId,
    ids: &[u32],
) -> Result<(), SignalError> {
    let ids: Vec<KeyId> = ids
        .iter()
        .map(|&id| key_id(business, KeyKind::SignalPreKey, u64::from(id)))
        .collect();
    keys.store().delete_keys(&ids).await?;
    Ok(())
}

/// The stored identity record: the registration id (4 bytes, big-endian)
/// followed by the library's serialised identity key pair.
pub(crate) fn encode_identity(
    registration_id: u32,
    pair: &IdentityKeyPair,
) -> zeroize::Zeroizing<Vec<u8>> {
    let pair = zeroize::Zeroizing::new(pair.serialize().into_vec());
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(4 + pair.len()));
    out.extend_from_slice(&registration_id.to_be_bytes());
    out.extend_from_slice(&pair);
    out
}

/// Read back an identity record ([`encode_identity`]). Refused as corrupt
/// `identity record` when shorter than a registration id or when the id is
/// outside `1..=0x3FFF`, and as corrupt `identity key pair` when the pair
/// does not decode or its public key is not its private key's. The pair is
/// the library's protobuf, which is not canonical: what decodes re-encodes
/// to a normal form.
pub(crate) fn decode_identity(stored: &[u8]) -> Result<(u32, IdentityKeyPair), SignalError> {
    let (registration_id, identity) = stored
        .split_first_chunk::<4>()
        .ok_or(corrupt("identity record"))?;
    let registration_id = u32::from_be_bytes(*registration_id);
    if !(1..=MAX_REGISTRATION_ID).contains(&registration_id) {
        return Err(corrupt("identity record"));
    }
    let pair = IdentityKeyPair::try_from(identity).map_err(|_| corrupt("identity key pair"))?;
    if !pair
        .private_key()
        .public_key()
        .is_ok_and(|public| public == *pair.public_key())
    {
        return Err(corrupt("identity key pair"));
    }
    Ok((registration_id, pair))
}

/// The name of a damaged one-time prekey record in [`SignalError`]s.
pub(crate) const ONE_TIME_PREKEY: &str = "one-time prekey";

/// Read back the signed prekey record stored as prekey `id`. The library's
/// decoder accepts any protobuf and defers every field to its accessors, so
/// a record missing its key pair would load and fail only when a first
/// message named it, as a malformed message. Refused as corrupt `signed
/// prekey` unless it has the id it is stored under (in `1..=`[`MAX_PREKEY_ID`],
/// the ids [`next_ids`] makes), a timestamp, a key pair
/// whose public key is its private key's, and a signature of that public
/// key by `identity` (else the business would publish a bundle every
/// consumer refuses). Not canonical (a protobuf; a public key in the older
/// 33-byte form is read): what decodes re-encodes to a normal form.
pub(crate) fn decode_signed_prekey(
    bytes: &[u8],
    id: u64,
    identity: &IdentityKey,
) -> Result<SignedPreKeyRecord, SignalError> {
    let bad = || corrupt("signed prekey");
    let record = SignedPreKeyRecord::deserialize(bytes).map_err(|_| bad())?;
    let pair = record.key_pair().map_err(|_| bad())?;
    let sound = record.id().is_ok_and(|i| u64::from(u32::from(i)) == id)
        && (1..=u64::from(MAX_PREKEY_ID)).contains(&id)
        && record.timestamp().is_ok()
        && record.signature().is_ok_and(|s| {
            identity
                .public_key()
                .verify_signature(&pair.public_key.serialize(), &s)
        })
        && matching(&pair);
    sound.then_some(record).ok_or_else(bad)
}

/// Read back the one-time prekey record stored as prekey `id`. Refused as
/// corrupt [`ONE_TIME_PREKEY`] unless it has that id and a key pair whose
/// public key is its private key's: the library's decoder accepts any
/// protobuf, and a record without a usable key pair would otherwise fail
/// a first message naming it as malformed, not as the business's damaged
/// state. Not canonical, as [`decode_signed_prekey`].
pub(crate) fn decode_one_time_prekey(bytes: &[u8], id: u32) -> Result<PreKeyRecord, SignalError> {
    let bad = || corrupt(ONE_TIME_PREKEY);
    let record = PreKeyRecord::deserialize(bytes).map_err(|_| bad())?;
    let pair = record.key_pair().map_err(|_| bad())?;
    let sound = record.id().is_ok_and(|i| u32::from(i) == id) && matching(&pair);
    sound.then_some(record).ok_or_else(bad)
}

/// Whether `pair`'s public key is its private key's.
fn matching(pair: &KeyPair) -> bool {
    pair.private_key
        .public_key()
        .is_ok_and(|public| public == pair.public_key)
}

/// `ids` (in `1..=MAX_PREKEY_ID`) oldest first. [`next_ids`] hands ids out
/// consecutively after the newest, wrapping, so the live ones lie on an
/// arc of the id circle far shorter than the circle: the oldest is the one
/// after the widest gap between neighbours. A key outliving more than half
/// the id space of later ones (8 million) would be taken for a newer one.
pub(super) fn oldest_first(mut ids: Vec<u32>) -> Vec<u32> {
    ids.sort_unstable();
    ids.dedup();
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return ids;
    };
    // The gap from the last around to the first, then those between
    // neighbours: its length, and where the id after it is.
    let mut widest = (MAX_PREKEY_ID - last + first, 0);
    for (i, pair) in ids.windows(2).enumerate() {
        if let [a, b] = pair
            && b - a > widest.0
        {
            widest = (b - a, i + 1);
        }
    }
    ids.rotate_left(widest.1);
    ids
}

/// `count` ids in `1..=MAX_PREKEY_ID` in neither `taken` nor `held`:
/// consecutive after the newest of `taken` (see [`oldest_first`]),
/// wrapping, or from a random start if `taken` is empty. Nothing records
/// the ids made before, so the ids of the newest keys, once used up, are
/// made again, with new keys: a first message naming one is either that
/// key's, whose session exists, or one that fails to decrypt, as one
/// naming a deleted key does. One staged with the old key loaded would
/// consume the new one at its commit, which deletes by id: the refill
/// passes the ids such operations hold as `held` (see `PreKeysInUse`).
/// They only exclude: a first message names any id it likes, in range or
/// not, so they never say where the newest is.
pub(super) fn next_ids(taken: &BTreeSet<u32>, held: &BTreeSet<u32>, count: usize) -> Vec<u32> {
    let newest = oldest_first(taken.iter().copied().collect())
        .last()
        .copied();
    let mut id = match newest {
        Some(newest) => newest % MAX_PREKEY_ID + 1,
        None => OsRng.random_range(1..=MAX_PREKEY_ID),
    };
    let mut ids = Vec::with_capacity(count.min(MAX_PREKEY_ID as usize));
    let mut tried = 0;
    while ids.len() < count && tried < MAX_PREKEY_ID {
        if !taken.contains(&id) && !held.contains(&id) {
            ids.push(id);
        }
        id = id % MAX_PREKEY_ID + 1;
        tried += 1;
    }
    ids
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ids_wrap_past_the_largest_and_stay_in_age_order() {
        let taken = BTreeSet::from([MAX_PREKEY_ID - 1, MAX_PREKEY_ID]);
        assert_eq!(next_ids(&taken, &BTreeSet::new(), 3), vec![1, 2, 3]);
        // Held ids are skipped, never taken for the newest, in range or not.
        let held = BTreeSet::from([1, u32::MAX]);
        assert_eq!(next_ids(&taken, &held, 2), vec![2, 3]);
        assert_eq!(
            oldest_first(vec![3, MAX_PREKEY_ID, 1, MAX_PREKEY_ID - 1, 2]),
            vec![MAX_PREKEY_ID - 1, MAX_PREKEY_ID, 1, 2, 3]
        );
        assert_eq!(oldest_first(Vec::new()), Vec::<u32>::new());
        assert_eq!(oldest_first(vec![7]), vec![7]);
    }

    proptest! {
        /// However keys are added and used up, the ids left come back in
        /// the order they were made, and new ids are fresh and in range.
        #[test]
        fn ids_left_come_back_oldest_first(
            start in prop_oneof![1..=MAX_PREKEY_ID, MAX_PREKEY_ID - 64..=MAX_PREKEY_ID],
            rounds in proptest::collection::vec((1usize..40, any::<u64>(), any::<u64>()), 1..30),
        ) {
            // Ids live, in the order they were made.
            let mut live = vec![start];
            for (count, a, b) in rounds {
                let taken: BTreeSet<u32> = live.iter().copied().collect();
                let fresh = next_ids(&taken, &BTreeSet::new(), count);
                prop_assert_eq!(fresh.len(), count);
                for id in &fresh {
                    prop_assert!((1..=MAX_PREKEY_ID).contains(id));
                    prop_assert!(!taken.contains(id));
                }
                prop_assert_eq!(fresh.iter().collect::<BTreeSet<_>>().len(), count);
                live.extend(fresh);
                // A quarter of the keys are used up, any of them.
                let used = a & b;
                live = live
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| used & (1 << (i % 64)) == 0)
                    .map(|(_, id)| id)
                    .collect();
                prop_assert_eq!(oldest_first(live.clone()), live.clone());
            }
        }
    }
}
