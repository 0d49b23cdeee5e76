//! Outbound: sessions started from a device's prekey bundle, and messages
//! encrypted for one device or several.

use std::sync::atomic::{AtomicBool, Ordering};

use wacore_libsignal::protocol::{
    CiphertextMessageType, DeviceId, IdentityKey, PreKeyBundle as LibBundle, PublicKey,
    SignalProtocolError, UsePQRatchet, message_encrypt, process_prekey_bundle,
};

use super::{Ciphertext, MessageKind, PreKeyBundle, Sessions, SignalError, protocol_error, usable};
use crate::ids::{BusinessId, PhoneHash};
use crate::rng::OsRng;
use crate::store::{Batch, PeerId};
use crate::time::Timestamp;

impl Sessions {
    /// Encrypt `plaintext` for `peer`, which must have a session; the peer's
    /// state is kept until at least `expiry` (the message's own expiry).
    ///
    /// Sending is write-behind within the library's counter lease: the
    /// session is committed before a ciphertext is returned whenever its
    /// counter lies past the persisted lease (every 64 messages) or its
    /// retention epoch moves, and at the next decrypt. A crash can lose only
    /// sends the lease covers, and a reload after one skips past the lease,
    /// so no counter, and so no message key, is ever used twice.
    pub async fn encrypt(
        &self,
        business: BusinessId,
        peer: PeerId,
        plaintext: &[u8],
        expiry: Timestamp,
    ) -> Result<Ciphertext, SignalError> {
        let account = self.account(business).await?;
        let _guard = self.address_locks.lock((business, peer)).await;
        let (mut state, taken) = self.load_peer(business, peer).await?;
        if !state.has_live_session() {
            taken.put(state);
            return Err(SignalError::NoSession);
        }
        let (mut sessions, mut identities) = self.overlays(account, &mut state);
        let message = match message_encrypt(
            plaintext,
            &state.address,
            &mut sessions,
            &mut identities,
        )
        .await
        {
            Ok(message) => message,
            Err(e) => {
                Self::restore((state, taken), sessions, &identities);
                return Err(protocol_error(e, None, identities.refused()));
            }
        };
        state.session = sessions.into_record();
        state.identity = identities.peer;
        let kind = match message.message_type() {
            CiphertextMessageType::PreKey => MessageKind::FirstContact,
            _ => MessageKind::FollowUp,
        };
        let bytes = message.serialize().to_vec();
        let pending = state
            .session
            .as_ref()
            .is_some_and(|s| s.has_pending_reservation());
        let epoch_moves =
            state.key.as_ref().map(|k| k.epoch()) != self.vault.epoch_of(state.expiry.max(expiry));
        if pending || epoch_moves || identities.written {
            self.commit_peer(business, peer, (state, taken), expiry, Batch::new())
                .await?;
        } else {
            state.expiry = state.expiry.max(expiry);
            state.dirty = true;
            taken.put(state);
        }
        Ok(Ciphertext { kind, bytes })
    }

    /// Encrypt `plaintext` for every device of `phone` that has a session,
    /// one result per device, in device order.
    pub async fn encrypt_for_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
        plaintext: &[u8],
        expiry: Timestamp,
    ) -> Result<Vec<(u32, Result<Ciphertext, SignalError>)>, SignalError> {
        let mut out = Vec::new();
        for device in self.store.peer_devices(business, phone).await? {
            let peer = PeerId { phone, device };
            out.push((
                device,
                self.encrypt(business, peer, plaintext, expiry).await,
            ));
        }
        Ok(out)
    }

    /// Start a session with `peer` from its prekey bundle (fetched through
    /// the transport), in place of any it has (kept as an archived state,
    /// so that what the device sent on it still decrypts). The bundle's
    /// signature is verified, and it must be `peer`'s device's, not the
    /// business's own, with the identity key trusted for the device if one
    /// is (see [`IdentityPolicy`](super::IdentityPolicy)); a bad bundle is
    /// refused as [`SignalError::BadBundle`], one with another identity key
    /// as [`SignalError::UntrustedIdentity`], and changes nothing.
    pub async fn start_session(
        &self,
        business: BusinessId,
        peer: PeerId,
        bundle: &PreKeyBundle,
        expiry: Timestamp,
    ) -> Result<(), SignalError> {
        let committing = AtomicBool::new(false);
        self.start_session_with(business, peer, bundle, expiry, Batch::new(), &committing)
            .await
    }

    /// [`start_session`](Self::start_session), committing `extra` with the
    /// new session: both land, or neither (a conditional write of `extra`
    /// that fails fails the whole as [`StoreError::Conflict`]). `committing`
    /// is set as the commit begins: until then, however the call ends,
    /// nothing was written.
    ///
    /// [`StoreError::Conflict`]: crate::store::StoreError::Conflict
    pub(crate) async fn start_session_with(
        &self,
        business: BusinessId,
        peer: PeerId,
        bundle: &PreKeyBundle,
        expiry: Timestamp,
        extra: Batch,
        committing: &AtomicBool,
    ) -> Result<(), SignalError> {
        if bundle.device_id != peer.device {
            return Err(SignalError::BadBundle("the bundle is another device's"));
        }
        let lib_bundle = to_library_bundle(bundle)?;
        let account = self.account(business).await?;
        if bundle.identity_key == account.identity.identity_key().serialize() {
            return Err(SignalError::BadBundle("the bundle is the business's own"));
        }
        let _guard = self.address_locks.lock((business, peer)).await;
        let (mut state, taken) = self.load_peer(business, peer).await?;
        let (mut sessions, mut identities) = self.overlays(account, &mut state);
        let result = process_prekey_bundle(
            &state.address,
            &mut sessions,
            &mut identities,
            &lib_bundle,
            &mut OsRng,
            UsePQRatchet::No,
        )
        .await;
        if let Err(e) = result {
            Self::restore((state, taken), sessions, &identities);
            return Err(match e {
                SignalProtocolError::SignatureValidationFailed => {
                    SignalError::BadBundle("signed prekey signature does not verify")
                }
                // The library asks whether the identity is trusted before it
                // checks the signature: a bundle no key signed is bad, not a
                // device presenting a new identity for approval.
                SignalProtocolError::UntrustedIdentity(_) if !signed(bundle) => {
                    SignalError::BadBundle("signed prekey signature does not verify")
                }
                other => protocol_error(other, None, identities.refused()),
            });
        }
        state.session = sessions.into_record();
        state.identity = identities.peer;
        committing.store(true, Ordering::Relaxed);
        self.commit_peer(business, peer, (state, taken), expiry, extra)
            .await
    }
}

/// Whether `bundle`'s signed prekey bears its identity key's signature.
fn signed(bundle: &PreKeyBundle) -> bool {
    PublicKey::deserialize(&bundle.identity_key).is_ok_and(|identity| {
        identity.verify_signature(
            &bundle.signed_prekey.public_key,
            &bundle.signed_prekey.signature,
        )
    })
}

fn to_library_bundle(bundle: &PreKeyBundle) -> Result<LibBundle, SignalError> {
    let key = |bytes: &[u8], what| {
        // A key's other encodings are refused (see `usable`): the
        // business's own key so encoded would pass for another's. So is a
        // key of small order, which no one holds.
        PublicKey::deserialize(bytes)
            .ok()
            .filter(usable)
            .ok_or(SignalError::BadBundle(what))
    };
    let identity = IdentityKey::new(key(
        &bundle.identity_key,
        "identity key is not a valid public key",
    )?);
    let signed = key(
        &bundle.signed_prekey.public_key,
        "signed prekey is not a valid public key",
    )?;
    let one_time = match &bundle.one_time_prekey {
        Some(k) => Some((
            k.id.into(),
            key(&k.public_key, "one-time prekey is not a valid public key")?,
        )),
        None => None,
    };
    LibBundle::new(
        bundle.registration_id,
        DeviceId::from(bundle.device_id),
        one_time,
        bundle.signed_prekey.id.into(),
        signed,
        bundle.signed_prekey.signature.to_vec(),
        identity,
    )
    .map_err(|_| SignalError::BadBundle("malformed bundle"))
}
