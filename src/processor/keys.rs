//! Keys: the key manager for operators, and a business's Signal keys.

use tracing::info;

use super::{Processor, ProcessorError};
use crate::ids::{BusinessId, PhoneNumber};
use crate::keys::KeyManager;
use crate::retention::HoldError;
use crate::signal::DeviceIdentity;
use crate::store::{Direction, HoldScope, PeerId};
use crate::transport::Principal;

impl Processor {
    /// The key manager, for KEK rotation (operators only: it spans every
    /// business). Shred early through [`shred_epoch`](Self::shred_epoch),
    /// which honours legal holds and is audited, and destroy the keys of
    /// ended epochs through [`sweep`](Self::sweep), which keeps those a
    /// legal hold needs. The key manager's own `destroy_epoch_unchecked`
    /// and `destroy_ended_epochs_unchecked` honour no hold and record
    /// nothing.
    pub fn keys(&self, principal: &Principal) -> Result<&KeyManager, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(&self.keys)
    }

    /// Keep `business`'s Signal prekeys healthy and publish them through the
    /// transport. The one-time pool is refilled by the transport's count of
    /// keys left ([`Transport::one_time_prekey_count`]), or by the keys held
    /// if it gives none ([`Sessions::maintain`]). Publications of one
    /// business take turns. The first call takes the store over, if no
    /// session read did before (see [`Processor`]).
    ///
    /// [`Transport::one_time_prekey_count`]: crate::transport::Transport::one_time_prekey_count
    /// [`Sessions::maintain`]: crate::signal::Sessions::maintain
    pub async fn publish_keys(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        // A deployment's first call: the store is taken over now, so that
        // an instance started after this one supersedes it for good (taken
        // over only at its first session, one that has only published its
        // keys would take the store back from a newer one).
        self.sessions.take_over().await?;
        let publishing = self.publishing.get(business);
        let _publishing = publishing.lock().await;
        // Its phone index too: a receive creates no key.
        self.keys.ensure_phone_index(business).await?;
        let left = self.transport.one_time_prekey_count(business).await?;
        self.sessions.maintain(business, left).await?;
        let keys = self.sessions.publish(business).await?;
        self.transport.publish_keys(business, &keys).await?;
        self.sessions.published(business, &keys);
        Ok(())
    }

    /// Approve a changed identity key of one of `consumer`'s devices: the
    /// key a refusal named ([`SignalError::UntrustedIdentity`]), once the
    /// consumer confirmed its security code out of band. The device's
    /// session and any key trusted for it are replaced by `identity`: its
    /// own first-contact message with that key, or a bundle the transport
    /// serves with it, then starts a session, and its retry receipts
    /// ignored for a refused bundle count again. A bundle with any other
    /// key is refused, so the network cannot get its own key in first; so
    /// is a message with one under [`IdentityPolicy::Refuse`] (under
    /// `AcceptAndReport` it is taken and reported, as any change is).
    /// Refused as [`HoldError::ConsumerHeld`] while a legal hold covers the
    /// consumer (its state is kept for the case). Returns whether anything
    /// changed: `false` if that key was trusted already, or the device has
    /// no state (it never wrote, or retention deleted its state), whose
    /// next key is trusted on first use. The approval is kept as the
    /// device's state is, with the consumer's messages: a sweep that finds
    /// the consumer with none left deletes it, and the device's next key is
    /// then trusted on first use too.
    ///
    /// [`HoldError::ConsumerHeld`]: crate::retention::HoldError::ConsumerHeld
    /// [`SignalError::UntrustedIdentity`]: crate::signal::SignalError::UntrustedIdentity
    /// [`IdentityPolicy::Refuse`]: crate::signal::IdentityPolicy::Refuse
    pub async fn trust_new_identity(
        &self,
        principal: &Principal,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        identity: DeviceIdentity,
    ) -> Result<bool, ProcessorError> {
        self.authorize(principal, business)?;
        let Some(phone) = self.keys.known_phone_hash(business, consumer).await? else {
            // No consumer of the business was ever indexed: nothing to
            // change, but a hold on the whole business covers the consumer.
            let holds = self.retention.holds().await?;
            if holds
                .iter()
                .any(|h| h.scope == HoldScope::Business(business))
            {
                return Err(HoldError::ConsumerHeld.into());
            }
            return Ok(false);
        };
        // As long as a message the device sends now would keep it.
        let (expiry, _admitted) = self.admit(business, Direction::Inbound, self.clock.now())?;
        let peer = PeerId { phone, device };
        // The device's record is read, and the key it is sealed under had,
        // before the hold gate is taken, and written under it: a key
        // provider hung for this business holds up no other business's
        // holds or sweeps.
        let unheld = || self.retention.unheld(business, phone);
        let changed = self
            .sessions
            .trust_identity_unless(business, peer, identity, expiry, unheld)
            .await??;
        // Whether or not this call changed it (an approval asked again, its
        // first answer lost): the key is trusted now.
        self.receipts.approved(business, peer);
        if changed {
            info!(%business, device, "a changed identity key was approved");
        }
        Ok(changed)
    }
}
