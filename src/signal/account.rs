//! A business's own Signal keys: identity, signed prekeys, one-time prekeys.
//!
//! Every private key is stored wrapped under the business's KEK
//! ([`KeyKind::SignalIdentity`], [`KeyKind::SignalSignedPreKey`],
//! [`KeyKind::SignalPreKey`]), so KEK rotation rewraps them like any other key.

use std::collections::BTreeSet;
use std::fmt;

use rand::RngExt;
use wacore_libsignal::protocol::{
    GenericSignedPreKey, IdentityKeyPair, KeyPair, PreKeyRecord, SignedPreKeyRecord,
    Timestamp as SignalTimestamp,
};

use super::rng::ThreadCsprng;
use super::{PublicPreKey, SignalError, SignedPublicPreKey};
use crate::ids::BusinessId;
use crate::keys::{KeyId, KeyKind, KeyManager};
use crate::time::Timestamp;

/// Largest prekey id: the wire carries 24 bits.
pub(super) const MAX_PREKEY_ID: u32 = 0x00FF_FFFF;
/// Registration ids are 14 bits; zero is not used.
const MAX_REGISTRATION_ID: u32 = 0x3FFF;
/// Page size when listing prekeys.
const PAGE: usize = 512;

/// A business's identity and live signed prekeys, unwrapped.
pub(super) struct Account {
    pub(super) identity: IdentityKeyPair,
    pub(super) registration_id: u32,
    /// Oldest first; the last is current.
    pub(super) signed: Vec<SignedPreKeyRecord>,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("registration_id", &self.registration_id)
            .field("signed_prekeys", &self.signed.len())
            .finish_non_exhaustive()
    }
}

fn key_id(business: BusinessId, kind: KeyKind, id: u64) -> KeyId {
    KeyId { business, kind, id }
}

fn corrupt(what: &'static str) -> SignalError {
    SignalError::Storage(super::StorageFailure::Corrupt(what))
}

impl Account {
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
                let pair = zeroize::Zeroizing::new(
                    IdentityKeyPair::generate(&mut ThreadCsprng)
                        .serialize()
                        .into_vec(),
                );
                let mut fresh = zeroize::Zeroizing::new(Vec::with_capacity(4 + pair.len()));
                let registration_id = ThreadCsprng.random_range(1..=MAX_REGISTRATION_ID);
                fresh.extend_from_slice(&registration_id.to_be_bytes());
                fresh.extend_from_slice(&pair);
                keys.store_secret(id, &fresh).await?
            }
        };
        let (registration_id, identity) = stored
            .split_at_checked(4)
            .ok_or(corrupt("identity record"))?;
        let registration_id = u32::from_be_bytes(
            registration_id
                .try_into()
                .map_err(|_| corrupt("identity record"))?,
        );
        let identity =
            IdentityKeyPair::try_from(identity).map_err(|_| corrupt("identity key pair"))?;
        let mut account = Self {
            identity,
            registration_id,
            signed: load_signed(keys, business).await?,
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

    /// Generate, sign and store a new signed prekey; it becomes current.
    pub(super) async fn add_signed_prekey(
        &mut self,
        keys: &KeyManager,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<(), SignalError> {
        let taken: BTreeSet<u32> = self
            .signed
            .iter()
            .filter_map(|r| r.id().ok().map(u32::from))
            .collect();
        let id = free_ids(&taken, 1)
            .first()
            .copied()
            .ok_or(corrupt("no free signed prekey id"))?;
        let pair = KeyPair::generate(&mut ThreadCsprng);
        let signature = self
            .identity
            .private_key()
            .calculate_signature(&pair.public_key.serialize(), &mut ThreadCsprng)
            .map_err(|_| corrupt("signing failed"))?;
        let record = SignedPreKeyRecord::new(
            id.into(),
            SignalTimestamp::from_epoch_millis(now.as_millis()),
            &pair,
            &signature,
        );
        let bytes =
            zeroize::Zeroizing::new(record.serialize().map_err(|_| corrupt("signed prekey"))?);
        keys.store_secret(
            key_id(business, KeyKind::SignalSignedPreKey, u64::from(id)),
            &bytes,
        )
        .await?;
        self.signed.push(record);
        Ok(())
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

/// The live signed prekeys of `business`, oldest first.
async fn load_signed(
    keys: &KeyManager,
    business: BusinessId,
) -> Result<Vec<SignedPreKeyRecord>, SignalError> {
    let mut records = Vec::new();
    let mut after = None;
    loop {
        let page = keys
            .store()
            .keys_of_kind(business, KeyKind::SignalSignedPreKey, after, PAGE)
            .await
            .map_err(|e| {
                SignalError::Storage(super::StorageFailure::Store(std::sync::Arc::new(e)))
            })?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.id);
        for wrapped in &page {
            let bytes = keys.unwrap_secret(wrapped).await?;
            records.push(
                SignedPreKeyRecord::deserialize(&bytes).map_err(|_| corrupt("signed prekey"))?,
            );
        }
    }
    records.sort_by_key(|r| r.timestamp().map(|t| t.epoch_millis()).unwrap_or(0));
    Ok(records)
}

/// The one-time prekeys of `business`: ids and public keys.
pub(super) async fn one_time_prekeys(
    keys: &KeyManager,
    business: BusinessId,
) -> Result<Vec<PublicPreKey>, SignalError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = keys
            .store()
            .keys_of_kind(business, KeyKind::SignalPreKey, after, PAGE)
            .await
            .map_err(|e| {
                SignalError::Storage(super::StorageFailure::Store(std::sync::Arc::new(e)))
            })?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.id);
        for wrapped in &page {
            let bytes = keys.unwrap_secret(wrapped).await?;
            let record = PreKeyRecord::deserialize(&bytes).map_err(|_| corrupt("prekey"))?;
            out.push(PublicPreKey {
                id: record.id().map_err(|_| corrupt("prekey"))?.into(),
                public_key: record
                    .public_key()
                    .map_err(|_| corrupt("prekey"))?
                    .serialize(),
            });
        }
    }
    Ok(out)
}

/// Generate and store `count` one-time prekeys with ids not in `taken`.
pub(super) async fn add_one_time_prekeys(
    keys: &KeyManager,
    business: BusinessId,
    taken: &BTreeSet<u32>,
    count: usize,
) -> Result<usize, SignalError> {
    let ids = free_ids(taken, count);
    for &id in &ids {
        let record = PreKeyRecord::new(id.into(), &KeyPair::generate(&mut ThreadCsprng));
        let bytes = zeroize::Zeroizing::new(record.serialize().map_err(|_| corrupt("prekey"))?);
        keys.store_secret(
            key_id(business, KeyKind::SignalPreKey, u64::from(id)),
            &bytes,
        )
        .await?;
    }
    Ok(ids.len())
}

/// `count` ids in `1..=MAX_PREKEY_ID` not in `taken`: consecutive from a
/// random start, wrapping, so fresh ids rarely repeat ids used before.
fn free_ids(taken: &BTreeSet<u32>, count: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(count);
    let mut id = ThreadCsprng.random_range(1..=MAX_PREKEY_ID);
    let mut tried = 0;
    while ids.len() < count && tried < MAX_PREKEY_ID {
        if !taken.contains(&id) {
            ids.push(id);
        }
        id = if id == MAX_PREKEY_ID { 1 } else { id + 1 };
        tried += 1;
    }
    ids
}
