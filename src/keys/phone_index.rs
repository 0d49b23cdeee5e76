//! The phone-number index: each business's HMAC key, behind the hashes
//! that stand for consumers' numbers and the ids of keyed sends.

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{KeyError, KeyId, KeyManager, SecretKey};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};

/// The keyed hash behind a business's phone-number index.
pub(super) struct PhoneIndexKey(Hmac<Sha256>);

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

impl KeyManager {
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
    /// cached already: the one stored, as this is); the key cached. Refused
    /// unless [`SecretKey::LEN`] bytes, as an epoch key is: HMAC would take
    /// a key of any length, a short one open to brute force.
    fn cache_phone_index_key(
        &self,
        id: KeyId,
        secret: &[u8],
    ) -> Result<Arc<PhoneIndexKey>, KeyError> {
        if secret.len() != SecretKey::LEN {
            return Err(KeyError::Unwrap(id));
        }
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
}
