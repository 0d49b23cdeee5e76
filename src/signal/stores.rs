//! The library's store traits, over one operation's staged state.
//!
//! Each operation (decrypt, encrypt, start a session) builds these overlays
//! from the committed state, lets the library read and write them, and only
//! if the library succeeds turns what was written into one atomic [`Batch`](crate::store::Batch)
//! (crate::store::Batch). A failed operation leaves nothing behind: the
//! overlays are simply dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::fast::RandomState;
use wacore_libsignal::protocol::{
    Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore,
    PreKeyId, PreKeyRecord, PreKeyStore, ProtocolAddress, SessionRecord, SessionStore,
    SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord, SignedPreKeyStore,
};

use super::account::{Account, decode_one_time_prekey};
use super::{DeviceIdentity, IdentityPolicy, SignalError, same_key};
use crate::ids::BusinessId;
use crate::keys::{KeyId, KeyKind, KeyManager};
use crate::time::Timestamp;

type Result<T> = std::result::Result<T, SignalProtocolError>;

fn unsupported(what: &'static str) -> SignalProtocolError {
    SignalProtocolError::InvalidState(what, "not used by this crate's operations".to_owned())
}

/// The session with the one device an operation addresses.
///
/// Every library operation loads the session exactly once, mutates its copy
/// and stores it back on success, so the overlay hands the record over
/// instead of cloning it. A second load in one operation is refused (the
/// operation fails and nothing is committed), so a library that ever loaded
/// twice could not be handed a stale or empty record.
pub(super) struct SessionOverlay {
    record: Mutex<Option<SessionRecord>>,
    /// Whether the record was handed to the library.
    loaded: AtomicBool,
    /// Whether the library stored a new record.
    written: bool,
}

impl SessionOverlay {
    pub(super) fn new(record: Option<SessionRecord>) -> Self {
        Self {
            record: Mutex::new(record),
            loaded: AtomicBool::new(false),
            written: false,
        }
    }

    /// The record after the operation: what the library stored, or the
    /// untouched original if it never loaded it; `None` if it took the
    /// record and stored nothing back.
    pub(super) fn into_record(self) -> Option<SessionRecord> {
        self.record.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the committed record is no longer held here unchanged.
    pub(super) fn disturbed(&self) -> bool {
        self.written || self.loaded.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl SessionStore for SessionOverlay {
    async fn load_session(&self, _address: &ProtocolAddress) -> Result<Option<SessionRecord>> {
        if self.loaded.swap(true, Ordering::Relaxed) {
            return Err(SignalProtocolError::InvalidState(
                "load_session",
                "loaded twice in one operation".to_owned(),
            ));
        }
        Ok(self.record.lock().unwrap_or_else(|p| p.into_inner()).take())
    }

    async fn has_session(&self, _address: &ProtocolAddress) -> Result<bool> {
        let held = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        Ok(held || self.loaded.load(Ordering::Relaxed))
    }

    async fn store_session(
        &mut self,
        _address: &ProtocolAddress,
        record: SessionRecord,
    ) -> Result<()> {
        *self.record.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(record);
        self.written = true;
        Ok(())
    }
}

/// The business's identity, and the trusted identity of the one device.
pub(super) struct IdentityOverlay {
    pub(super) account: Arc<Account>,
    pub(super) policy: IdentityPolicy,
    pub(super) peer: Option<IdentityKey>,
    /// Whether the library saved an identity (new or replacing).
    pub(super) written: bool,
    /// Whether a saved identity replaced another trusted one. The library
    /// reports no change when a message decrypted under an archived session
    /// brings back that session's older identity; this does.
    pub(super) replaced: bool,
    /// The key the policy (or a bundle) was refused with, for the error.
    pub(super) refused: Mutex<Option<IdentityKey>>,
}

impl IdentityOverlay {
    /// The key last refused, if one was.
    pub(super) fn refused(&self) -> Option<DeviceIdentity> {
        let refused = *self.refused.lock().unwrap_or_else(|p| p.into_inner());
        Some(DeviceIdentity::of(&refused?))
    }

    fn refuse(&self, identity: &IdentityKey) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(*identity);
    }
}

#[async_trait]
impl IdentityKeyStore for IdentityOverlay {
    async fn get_identity_key_pair(&self) -> Result<IdentityKeyPair> {
        Ok(self.account.identity.clone())
    }

    async fn get_local_registration_id(&self) -> Result<u32> {
        Ok(self.account.registration_id)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> Result<IdentityChange> {
        let change = match self.peer {
            Some(known) if same_key(known.public_key(), identity.public_key()) => {
                return Ok(IdentityChange::NewOrUnchanged);
            }
            // The library saves an archived session's identity without
            // asking whether it is trusted: the policy decides here too.
            Some(_) if self.policy == IdentityPolicy::Refuse => {
                self.refuse(identity);
                return Err(SignalProtocolError::UntrustedIdentity(address.clone()));
            }
            Some(_) => IdentityChange::ReplacedExisting,
            None => IdentityChange::NewOrUnchanged,
        };
        self.peer = Some(*identity);
        self.written = true;
        self.replaced |= change == IdentityChange::ReplacedExisting;
        Ok(change)
    }

    /// A changed key is trusted only on receiving (a device's own message),
    /// and only under [`IdentityPolicy::AcceptAndReport`]: one on sending
    /// comes from a bundle the network served, which never replaces the
    /// key trusted for a device (see [`IdentityPolicy`]).
    async fn is_trusted_identity(
        &self,
        _address: &ProtocolAddress,
        identity: &IdentityKey,
        direction: Direction,
    ) -> Result<bool> {
        let trusted = match self.peer {
            None => true,
            Some(known) if same_key(known.public_key(), identity.public_key()) => true,
            Some(_) => {
                direction == Direction::Receiving && self.policy == IdentityPolicy::AcceptAndReport
            }
        };
        if !trusted {
            self.refuse(identity);
        }
        Ok(trusted)
    }

    async fn get_identity(&self, _address: &ProtocolAddress) -> Result<Option<IdentityKey>> {
        Ok(self.peer)
    }
}

/// The one-time prekey ids that operations have loaded and not yet
/// committed or given up, per business. A refill never makes one of them
/// again: ids are made again after the newest left, so once another
/// device's first message consumed a key, its id could come back with a
/// new key while a first message that loaded the old one is staged, whose
/// commit (`ConsumeKey`, by id) would then consume the new key and store a
/// session made with the old one, used twice.
///
/// The holds are this instance's alone. A newer instance that took the
/// store over cannot harm a first message this one staged: that commit,
/// its `ConsumeKey` in the fenced batch that stores the session, fails as
/// `StoreError::Superseded` and consumes nothing. The other way round is
/// not covered: a refill only inserts keys, unfenced, so a superseded
/// instance still refilling (`maintain`, through `publish_keys`) can make
/// again an id a newer one holds.
#[derive(Default)]
pub(super) struct PreKeysInUse(Mutex<HashMap<(BusinessId, u32), usize, RandomState>>);

impl PreKeysInUse {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(BusinessId, u32), usize, RandomState>> {
        // Each critical section is one map operation: a poisoned lock is safe.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note that an operation loads prekey `id` of `business` (before it
    /// reads the store), until the hold is dropped.
    pub(super) fn hold(&self, business: BusinessId, id: u32) -> PreKeyHold<'_> {
        *self.lock().entry((business, id)).or_default() += 1;
        PreKeyHold {
            in_use: self,
            key: (business, id),
        }
    }

    /// The ids of `business` held now. Read after listing the store: a
    /// key missing from the listing but loaded by a staged operation was
    /// held before it was loaded, so before it was consumed.
    pub(super) fn ids(&self, business: BusinessId) -> BTreeSet<u32> {
        self.lock()
            .keys()
            .filter(|(b, _)| *b == business)
            .map(|&(_, id)| id)
            .collect()
    }
}

/// A one-time prekey an operation loaded, held until it commits or gives up.
pub(super) struct PreKeyHold<'a> {
    in_use: &'a PreKeysInUse,
    key: (BusinessId, u32),
}

impl Drop for PreKeyHold<'_> {
    fn drop(&mut self) {
        let mut map = self.in_use.lock();
        if let Some(count) = map.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The business's one-time prekeys, read from the key store on demand.
pub(super) struct PreKeyOverlay<'a> {
    pub(super) keys: &'a KeyManager,
    pub(super) business: BusinessId,
    /// The prekey the library consumed, deleted with the operation's batch.
    pub(super) consumed: Option<u32>,
    /// A storage failure behind a `BackendError`, kept to report it precisely.
    pub(super) failure: Mutex<Option<SignalError>>,
    /// Where the prekey loaded is held while the operation lasts.
    pub(super) in_use: &'a PreKeysInUse,
    /// The hold on the prekey the library loaded, if any.
    pub(super) held: Mutex<Option<PreKeyHold<'a>>>,
}

impl<'a> PreKeyOverlay<'a> {
    /// The hold on the prekey loaded, to keep until the operation commits.
    pub(super) fn take_hold(&self) -> Option<PreKeyHold<'a>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Keeps `failure` to report it precisely, and gives the library an
    /// error that stops the operation.
    fn fail(&self, failure: SignalError) -> SignalProtocolError {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure);
        SignalProtocolError::InvalidState("prekey store", "unavailable".to_owned())
    }

    pub(super) fn take_failure(&self) -> Option<SignalError> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[async_trait]
impl PreKeyStore for PreKeyOverlay<'_> {
    async fn get_pre_key(&self, prekey_id: PreKeyId) -> Result<PreKeyRecord> {
        let id = KeyId {
            business: self.business,
            kind: KeyKind::SignalPreKey,
            id: u64::from(u32::from(prekey_id)),
        };
        // Held before the store is read (see `PreKeysInUse::ids`).
        let hold = self.in_use.hold(self.business, prekey_id.into());
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
        match self.keys.load_secret(id).await {
            // The business's own key is damaged, not the consumer's
            // message: say so, or the transport would drop the message as
            // permanently malformed.
            Ok(Some(bytes)) => decode_one_time_prekey(&bytes, prekey_id.into())
                .map_err(|failure| self.fail(failure)),
            Ok(None) => Err(SignalProtocolError::InvalidPreKeyId),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    async fn save_pre_key(&mut self, _id: PreKeyId, _record: &PreKeyRecord) -> Result<()> {
        Err(unsupported("save_pre_key"))
    }

    async fn remove_pre_key(&mut self, prekey_id: PreKeyId) -> Result<()> {
        self.consumed = Some(prekey_id.into());
        Ok(())
    }
}

/// The business's live signed prekeys: one replaced is usable for the
/// grace period after its successor was made, whether or not `maintain`
/// has deleted it yet.
pub(super) struct SignedPreKeyOverlay {
    pub(super) account: Arc<Account>,
    pub(super) now: Timestamp,
    pub(super) grace: Duration,
}

#[async_trait]
impl SignedPreKeyStore for SignedPreKeyOverlay {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> Result<SignedPreKeyRecord> {
        let signed = &self.account.signed;
        signed
            .iter()
            .position(|r| r.id().is_ok_and(|i| i == id))
            .filter(|&i| !self.account.past_grace(i, self.now, self.grace))
            .and_then(|i| signed.get(i).cloned())
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }

    async fn save_signed_pre_key(
        &mut self,
        _id: SignedPreKeyId,
        _record: &SignedPreKeyRecord,
    ) -> Result<()> {
        Err(unsupported("save_signed_pre_key"))
    }
}
