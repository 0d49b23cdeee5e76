//! One consumer device's Signal state, as sealed at rest.
//!
//! The sealed plaintext (envelope kind `SignalSession`) is read from its end,
//! so the session record, which the library serialises into an empty
//! buffer, is written first without a copy:
//!
//! | length | field |
//! |---|---|
//! | rest | the session record in the library's store form, if flagged |
//! | 33 | the consumer's trusted identity key, if flagged |
//! | 1 | flags: bit 0 identity present, bit 1 session present; others zero |
//! | 1 | version `01` |

use wacore_libsignal::protocol::{DeviceId, IdentityKey, ProtocolAddress, SessionRecord};

use crate::envelope::RecordKey;
use crate::store::PeerId;
use crate::time::Timestamp;

const VERSION: u8 = 1;
const HAS_IDENTITY: u8 = 1;
const HAS_SESSION: u8 = 2;
const IDENTITY_LEN: usize = 33;

/// Why a stored peer record could not be read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CorruptPeer(pub(super) &'static str);

/// A peer's state in memory: what was last committed, plus the record key
/// it is re-sealed under.
pub(super) struct Peer {
    /// The library's name for the peer: the phone hash in hex, never the number.
    pub(super) address: ProtocolAddress,
    pub(super) session: Option<SessionRecord>,
    pub(super) identity: Option<IdentityKey>,
    /// The expiry of the sealed record: the latest expiry of any message
    /// exchanged with this device, so the state lives exactly as long as the
    /// messages that need it.
    pub(super) expiry: Timestamp,
    /// Boxed: the state moves in and out of the cache, its key schedule must not.
    pub(super) key: Option<Box<RecordKey>>,
    /// Sends since the last persist (write-behind; see the cache module).
    pub(super) dirty: bool,
    /// The cache generation it was loaded in: state loaded before the
    /// cache was cleared (a sweep deleted stored state) is not put back.
    pub(super) generation: u64,
}

/// The library address of a peer.
fn address(peer: PeerId) -> ProtocolAddress {
    ProtocolAddress::new(
        &hex::encode(peer.phone.as_bytes()),
        DeviceId::from(peer.device),
    )
}

impl Peer {
    pub(super) fn empty(peer: PeerId) -> Self {
        Self {
            address: address(peer),
            session: None,
            identity: None,
            expiry: Timestamp::UNIX_EPOCH,
            key: None,
            dirty: false,
            generation: 0,
        }
    }

    /// Encode for sealing; `incarnation` marks the session snapshot as this
    /// process's, so reloading it here does not skip sending counters.
    pub(super) fn encode(&self, incarnation: &[u8; 16]) -> Vec<u8> {
        // Room for a typical record, the trailer, and the envelope header and
        // tag that sealing adds in place (the record reserves more if it must).
        let mut out = Vec::with_capacity(1024);
        let mut flags = 0;
        if let Some(session) = &self.session {
            // Clears `out` first, which is why the trailer follows it.
            session.serialize_into_for_store(&mut out, incarnation);
            flags |= HAS_SESSION;
        }
        if let Some(identity) = &self.identity {
            out.extend_from_slice(&identity.serialize());
            flags |= HAS_IDENTITY;
        }
        out.extend_from_slice(&[flags, VERSION]);
        out
    }

    /// Decode a sealed plaintext.
    pub(super) fn decode(
        peer: PeerId,
        bytes: &[u8],
        incarnation: &[u8; 16],
        expiry: Timestamp,
    ) -> Result<Self, CorruptPeer> {
        let (&version, rest) = bytes.split_last().ok_or(CorruptPeer("empty record"))?;
        if version != VERSION {
            return Err(CorruptPeer("unknown record version"));
        }
        let (&flags, mut rest) = rest.split_last().ok_or(CorruptPeer("truncated flags"))?;
        if flags & !(HAS_IDENTITY | HAS_SESSION) != 0 {
            return Err(CorruptPeer("unknown flags"));
        }
        let identity = if flags & HAS_IDENTITY != 0 {
            let split = rest
                .len()
                .checked_sub(IDENTITY_LEN)
                .ok_or(CorruptPeer("truncated identity"))?;
            let (head, key) = rest.split_at(split);
            rest = head;
            Some(IdentityKey::decode(key).map_err(|_| CorruptPeer("bad identity key"))?)
        } else {
            None
        };
        let session = if flags & HAS_SESSION != 0 {
            Some(
                SessionRecord::deserialize_for_store(rest, incarnation)
                    .map_err(|_| CorruptPeer("bad session"))?,
            )
        } else if rest.is_empty() {
            None
        } else {
            return Err(CorruptPeer("bytes before the trailer"));
        };
        Ok(Self {
            address: address(peer),
            session,
            identity,
            expiry,
            key: None,
            dirty: false,
            generation: 0,
        })
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("has_session", &self.session.is_some())
            .field("has_identity", &self.identity.is_some())
            .field("expiry", &self.expiry)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}
