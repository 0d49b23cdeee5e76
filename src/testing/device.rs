//! A consumer's device: a real Signal client (wacore-libsignal, in-memory
//! stores) that talks to businesses through the processor.

use std::collections::HashMap;

use async_trait::async_trait;
use rand::RngExt;
use wacore_libsignal::protocol::{
    CiphertextMessage, CiphertextMessageType, DeviceId, Direction, GenericSignedPreKey,
    IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair,
    PreKeyBundle as LibBundle, PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore,
    ProtocolAddress, PublicKey, SessionRecord, SessionStore, SignalMessage, SignalProtocolError,
    SignedPreKeyId, SignedPreKeyRecord, SignedPreKeyStore, Timestamp, UsePQRatchet,
    message_decrypt, message_encrypt, process_prekey_bundle,
};

use crate::ids::BusinessId;
use crate::rng::OsRng;
use crate::signal::{
    BUSINESS_DEVICE_ID, Ciphertext, DeviceIdentity, MessageKind, PreKeyBundle, PublicPreKey,
    SignedPublicPreKey,
};

type Result<T> = std::result::Result<T, SignalProtocolError>;

/// Why a device operation failed: the library's own error, as a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device: {message}")]
pub struct DeviceError {
    message: String,
    duplicate: bool,
}

impl DeviceError {
    /// The library's error, as a string.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the library refused a message as one it decrypted already
    /// (a copy of the same ciphertext): what a real client drops silently,
    /// where it asks again for any other message it cannot decrypt. Only
    /// on a sending chain the device still keeps (the last
    /// `MAX_RECEIVER_CHAINS`, 5): a copy from an older one fails as any
    /// message it cannot decrypt.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

impl From<SignalProtocolError> for DeviceError {
    fn from(e: SignalProtocolError) -> Self {
        Self {
            duplicate: matches!(e, SignalProtocolError::DuplicatedMessage(..)),
            message: e.to_string(),
        }
    }
}

#[derive(Default)]
struct Sessions(HashMap<ProtocolAddress, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> Result<Option<SessionRecord>> {
        Ok(self.0.get(address).cloned())
    }
    async fn has_session(&self, address: &ProtocolAddress) -> Result<bool> {
        Ok(self.0.contains_key(address))
    }
    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: SessionRecord,
    ) -> Result<()> {
        self.0.insert(address.clone(), record);
        Ok(())
    }
}

struct Identities {
    own: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<ProtocolAddress, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> Result<IdentityKeyPair> {
        Ok(self.own.clone())
    }
    async fn get_local_registration_id(&self) -> Result<u32> {
        Ok(self.registration_id)
    }
    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> Result<IdentityChange> {
        let changed = self
            .known
            .insert(address.clone(), *identity)
            .is_some_and(|old| old != *identity);
        Ok(if changed {
            IdentityChange::ReplacedExisting
        } else {
            IdentityChange::NewOrUnchanged
        })
    }
    async fn is_trusted_identity(
        &self,
        _: &ProtocolAddress,
        _: &IdentityKey,
        _: Direction,
    ) -> Result<bool> {
        // A consumer's client trusts on first use and accepts changes (with a notice).
        Ok(true)
    }
    async fn get_identity(&self, address: &ProtocolAddress) -> Result<Option<IdentityKey>> {
        Ok(self.known.get(address).copied())
    }
}

#[derive(Default)]
struct PreKeys(HashMap<u32, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> Result<PreKeyRecord> {
        self.0
            .get(&u32::from(id))
            .cloned()
            .ok_or(SignalProtocolError::InvalidPreKeyId)
    }
    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> Result<()> {
        self.0.insert(id.into(), record.clone());
        Ok(())
    }
    async fn remove_pre_key(&mut self, id: PreKeyId) -> Result<()> {
        self.0.remove(&u32::from(id));
        Ok(())
    }
}

struct SignedPreKeys(SignedPreKeyRecord);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> Result<SignedPreKeyRecord> {
        if self.0.id()? == id {
            Ok(self.0.clone())
        } else {
            Err(SignalProtocolError::InvalidSignedPreKeyId)
        }
    }
    async fn save_signed_pre_key(
        &mut self,
        _: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> Result<()> {
        self.0 = record.clone();
        Ok(())
    }
}

/// One consumer device: its own identity, prekeys and sessions with
/// businesses, all in memory. It speaks to businesses at device
/// [`BUSINESS_DEVICE_ID`] of an address named after the business id.
pub struct ConsumerDevice {
    device_id: u32,
    sessions: Sessions,
    identities: Identities,
    prekeys: PreKeys,
    signed: SignedPreKeys,
    next_prekey: u32,
}

impl std::fmt::Debug for ConsumerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerDevice")
            .field("device_id", &self.device_id)
            .field("sessions", &self.sessions.0.len())
            .finish_non_exhaustive()
    }
}

fn business_address(business: BusinessId) -> ProtocolAddress {
    ProtocolAddress::new(&business.to_string(), DeviceId::from(BUSINESS_DEVICE_ID))
}

impl ConsumerDevice {
    /// A freshly installed device with id `device_id` (0 is a primary phone).
    pub fn new(device_id: u32) -> Self {
        let mut rng = OsRng;
        let own = IdentityKeyPair::generate(&mut rng);
        let pair = KeyPair::generate(&mut rng);
        let signature = own
            .private_key()
            .calculate_signature(&pair.public_key.serialize(), &mut rng)
            .unwrap_or([0; 64]);
        let signed =
            SignedPreKeyRecord::new(1.into(), Timestamp::from_epoch_millis(0), &pair, &signature);
        Self {
            device_id,
            sessions: Sessions::default(),
            identities: Identities {
                own,
                registration_id: OsRng.random_range(1..0x3FFF),
                known: HashMap::new(),
            },
            prekeys: PreKeys::default(),
            signed: SignedPreKeys(signed),
            next_prekey: 1,
        }
    }

    /// The device id.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The device's identity key: what its owner confirms (the security
    /// code) before a business approves it through
    /// [`Processor::trust_new_identity`](crate::processor::Processor::trust_new_identity).
    pub fn identity(&self) -> DeviceIdentity {
        DeviceIdentity::of(self.identities.own.identity_key())
    }

    /// A prekey bundle for a business to start a session with this device,
    /// with a fresh one-time prekey (or none when `with_one_time` is false).
    pub fn bundle(&mut self, with_one_time: bool) -> PreKeyBundle {
        let one_time_prekey = with_one_time.then(|| {
            let id = self.next_prekey;
            self.next_prekey += 1;
            let record = PreKeyRecord::new(id.into(), &KeyPair::generate(&mut OsRng));
            let public_key = record
                .public_key()
                .map(|k| k.serialize())
                .unwrap_or([0; 33]);
            self.prekeys.0.insert(id, record);
            PublicPreKey { id, public_key }
        });
        let signed = &self.signed.0;
        PreKeyBundle {
            registration_id: self.identities.registration_id,
            device_id: self.device_id,
            identity_key: self.identity().to_bytes(),
            signed_prekey: SignedPublicPreKey {
                id: signed.id().map(u32::from).unwrap_or(0),
                public_key: signed
                    .public_key()
                    .map(|k| k.serialize())
                    .unwrap_or([0; 33]),
                signature: signed
                    .signature()
                    .ok()
                    .and_then(|s| s.try_into().ok())
                    .unwrap_or([0; 64]),
            },
            one_time_prekey,
        }
    }

    /// Start a session with `business` from the bundle it published. Like a
    /// real client, this verifies the bundle's signature.
    pub async fn start_session(
        &mut self,
        business: BusinessId,
        bundle: &PreKeyBundle,
    ) -> std::result::Result<(), DeviceError> {
        let key = |b: &[u8]| {
            PublicKey::deserialize(b).map_err(|e| DeviceError {
                message: e.to_string(),
                duplicate: false,
            })
        };
        let one_time = match bundle.one_time_prekey {
            Some(k) => Some((k.id.into(), key(&k.public_key)?)),
            None => None,
        };
        let lib = LibBundle::new(
            bundle.registration_id,
            DeviceId::from(bundle.device_id),
            one_time,
            bundle.signed_prekey.id.into(),
            key(&bundle.signed_prekey.public_key)?,
            bundle.signed_prekey.signature.to_vec(),
            IdentityKey::new(key(&bundle.identity_key)?),
        )?;
        process_prekey_bundle(
            &business_address(business),
            &mut self.sessions,
            &mut self.identities,
            &lib,
            &mut crate::rng::OsRng,
            UsePQRatchet::No,
        )
        .await?;
        Ok(())
    }

    /// Encrypt for `business` (a session must exist).
    pub async fn encrypt(
        &mut self,
        business: BusinessId,
        plaintext: &[u8],
    ) -> std::result::Result<Ciphertext, DeviceError> {
        let message = message_encrypt(
            plaintext,
            &business_address(business),
            &mut self.sessions,
            &mut self.identities,
        )
        .await?;
        let kind = match message.message_type() {
            CiphertextMessageType::PreKey => MessageKind::FirstContact,
            _ => MessageKind::FollowUp,
        };
        Ok(Ciphertext {
            kind,
            bytes: message.serialize().to_vec(),
        })
    }

    /// Decrypt a message from `business`.
    pub async fn decrypt(
        &mut self,
        business: BusinessId,
        message: &Ciphertext,
    ) -> std::result::Result<Vec<u8>, DeviceError> {
        let parsed = match message.kind {
            MessageKind::FirstContact => CiphertextMessage::PreKeySignalMessage(
                PreKeySignalMessage::try_from(message.bytes.as_slice())?,
            ),
            MessageKind::FollowUp => {
                CiphertextMessage::SignalMessage(SignalMessage::try_from(message.bytes.as_slice())?)
            }
        };
        let result = message_decrypt(
            &parsed,
            &business_address(business),
            &mut self.sessions,
            &mut self.identities,
            &mut self.prekeys,
            &self.signed,
            &mut crate::rng::OsRng,
            UsePQRatchet::No,
        )
        .await?;
        // Used once, as a client does: the library leaves deleting it to
        // its caller. Kept, it would set up again a session the device
        // lost, in a state its peer has ratcheted past.
        if let Some(id) = result.consumed_prekey_id {
            self.prekeys.0.remove(&u32::from(id));
        }
        Ok(result.plaintext)
    }

    /// Lose every session, keeping the device's own keys (a phone restored
    /// from a backup that had none): what it is sent on a lost session it
    /// cannot decrypt, and asks for again.
    pub fn lose_sessions(&mut self) {
        self.sessions.0.clear();
    }

    /// Whether the device has a session with `business`.
    pub fn has_session(&self, business: BusinessId) -> bool {
        self.sessions.0.contains_key(&business_address(business))
    }

    /// The business identity key this device trusts, if any.
    pub fn trusted_business_identity(&self, business: BusinessId) -> Option<[u8; 33]> {
        self.identities
            .known
            .get(&business_address(business))
            .map(|k| k.serialize())
    }
}
