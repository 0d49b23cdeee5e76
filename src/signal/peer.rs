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
//! | 16 | the device's consumer: the phone hash the record is stored under |
//! | 4 | the device id, big-endian |
//! | 1 | flags: bit 0 identity present, bit 1 session present; others zero |
//! | 1 | version `02` |
//!
//! The envelope binds the record to its business, but not to the row it is
//! stored in: the device named inside is checked against the row on every
//! load, so a store that copies one consumer's record over another's cannot
//! make the processor encrypt to the second under the first's session.

use wacore_libsignal::protocol::{
    DeviceId, IdentityKey, ProtocolAddress, PublicKey, SessionRecord, SessionState,
};

use zeroize::Zeroizing;

use crate::envelope::{RecordKey, SEAL_ROOM};
use crate::ids::PhoneHash;
use crate::store::PeerId;
use crate::time::Timestamp;

const VERSION: u8 = 2;
const HAS_IDENTITY: u8 = 1;
const HAS_SESSION: u8 = 2;
const IDENTITY_LEN: usize = 33;
/// The device's address: its phone hash and device id.
const DEVICE_LEN: usize = PhoneHash::LEN + 4;
/// Spare room an encoding leaves after the record: the trailer, and what
/// sealing adds in place.
const ROOM: usize = IDENTITY_LEN + DEVICE_LEN + 2 + SEAL_ROOM;
/// What a record may grow by between two encodings without a copy.
const GROWTH: usize = 256;
/// How many counters of a receiving chain past its persisted index a
/// receive may consume without persisting the session (see the cache module).
pub(super) const RECEIVE_WINDOW: u32 = 32;

/// Why a stored peer record could not be read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CorruptPeer(pub(super) &'static str);

/// A peer's state in memory: what was last committed, plus the record key
/// it is re-sealed under.
pub(super) struct Peer {
    /// The device, as its record is stored under.
    pub(super) id: PeerId,
    /// The library's name for the peer: the same for every consumer (see
    /// [`address`]), so the library's logs name no one.
    pub(super) address: ProtocolAddress,
    pub(super) session: Option<SessionRecord>,
    pub(super) identity: Option<IdentityKey>,
    /// The expiry of the sealed record: the latest expiry of any message
    /// exchanged with this device, so the state lives exactly as long as the
    /// messages that need it.
    pub(super) expiry: Timestamp,
    /// Boxed: the state moves in and out of the cache, its key schedule must not.
    pub(super) key: Option<Box<RecordKey>>,
    /// The key manager's count of epoch keys destroyed early when `key` was
    /// made: once it moves, `key` is not used again (its epoch may be the
    /// one destroyed, while an operation held the state), and the epoch's
    /// key is asked for anew.
    pub(super) key_shreds: u64,
    /// Sends since the last persist (write-behind; see the cache module).
    pub(super) dirty: bool,
    /// The cache generation it was loaded in: state loaded before the
    /// cache was cleared (a sweep deleted stored state) is not put back.
    pub(super) generation: u64,
    /// The length of the last encoding: the next one reserves for it.
    pub(super) encoded_len: usize,
    /// The expiry the stored copy was sealed with.
    pub(super) sealed_expiry: Timestamp,
    /// Receives may advance this receiving chain without persisting the
    /// session, up to (not including) this counter. Kept in memory only.
    pub(super) behind: Option<(PublicKey, u32)>,
    /// Counters of the receiving chains as loaded that receives written
    /// behind may have consumed before the state that knew it was lost.
    pub(super) unsure: Vec<Unsure>,
}

/// Counters `next..end` of one receiving chain, which a receive written
/// behind may have consumed: a stored message says which did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unsure {
    pub(super) chain: PublicKey,
    pub(super) next: u32,
    pub(super) end: u32,
}

impl Unsure {
    /// The receiving chains of `state`, each unsure from its next counter
    /// over one window.
    fn of(state: &SessionState) -> Vec<Self> {
        state
            .all_receiver_chain_logging_info()
            .into_iter()
            .filter_map(|(key, index)| {
                let next = index?;
                Some(Self {
                    chain: PublicKey::deserialize(&key).ok()?,
                    next,
                    end: next.saturating_add(RECEIVE_WINDOW),
                })
            })
            .collect()
    }
}

/// The name of every peer's library address.
pub(crate) const ADDRESS_NAME: &str = "consumer";

/// The library address of a peer: the same name for every consumer. The
/// library writes the address into its log records (at warn and error
/// level, for a redelivered or a refused message) and its errors; the
/// store overlays each hold one peer's state and never read it, so it
/// names no one, where the phone hash would have linked log lines to the
/// consumer past their messages' retention.
fn address(peer: PeerId) -> ProtocolAddress {
    ProtocolAddress::new(ADDRESS_NAME, DeviceId::from(peer.device))
}

impl Peer {
    pub(super) fn empty(peer: PeerId) -> Self {
        Self {
            id: peer,
            address: address(peer),
            session: None,
            identity: None,
            expiry: Timestamp::UNIX_EPOCH,
            key: None,
            key_shreds: 0,
            dirty: false,
            generation: 0,
            encoded_len: 0,
            sealed_expiry: Timestamp::UNIX_EPOCH,
            behind: None,
            unsure: Vec::new(),
        }
    }

    /// Whether it holds a session that can send: a record with a current
    /// state that has a sending chain. A record without one (stored so, or
    /// left so by the library: an archived state a late message promoted
    /// loses its sending chain when the record's counter lease is too far
    /// ahead of it) is no session, so the next send starts one from the
    /// device's bundle instead of failing for ever.
    pub(super) fn has_live_session(&self) -> bool {
        self.session
            .as_ref()
            .and_then(|s| s.session_state())
            .is_some_and(|s| s.get_sender_chain_key().is_ok())
    }

    /// Encode for sealing; `incarnation` marks the session snapshot as this
    /// process's, so reloading it here does not skip sending counters. The
    /// buffer keeps room for the envelope, so sealing it makes no copy.
    pub(super) fn encode(&mut self, incarnation: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len.max(1024) + GROWTH + ROOM);
        let mut flags = 0;
        if let Some(session) = &self.session {
            // Clears `out` first (which is why the trailer follows it) and
            // reserves what it writes: a reallocation moves no bytes.
            session.serialize_into_for_store(&mut out, incarnation);
            flags |= HAS_SESSION;
        }
        if out.capacity() - out.len() < ROOM {
            // Grown past the reservation: move it, wiping the old buffer.
            let record = Zeroizing::new(out);
            out = Vec::with_capacity(record.len() + ROOM);
            out.extend_from_slice(&record);
        }
        if let Some(identity) = &self.identity {
            out.extend_from_slice(&identity.serialize());
            flags |= HAS_IDENTITY;
        }
        out.extend_from_slice(self.id.phone.as_bytes());
        out.extend_from_slice(&self.id.device.to_be_bytes());
        out.extend_from_slice(&[flags, VERSION]);
        self.encoded_len = out.len();
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
        let split = rest
            .len()
            .checked_sub(DEVICE_LEN)
            .ok_or(CorruptPeer("truncated device"))?;
        let (head, device) = rest.split_at(split);
        rest = head;
        let (phone, id) = device.split_at(PhoneHash::LEN);
        if phone != peer.phone.as_bytes() || id != peer.device.to_be_bytes() {
            return Err(CorruptPeer("record of another device"));
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
        let unsure = session
            .as_ref()
            .and_then(SessionRecord::session_state)
            .map(Unsure::of)
            .unwrap_or_default();
        Ok(Self {
            id: peer,
            address: address(peer),
            session,
            identity,
            expiry,
            key: None,
            key_shreds: 0,
            dirty: false,
            generation: 0,
            encoded_len: bytes.len(),
            sealed_expiry: expiry,
            behind: None,
            unsure,
        })
    }
}

/// What [`Peer::decode`] made of a stored record, for the fuzz checks
/// (`crate::fuzzing::peer_record`).
#[cfg(any(test, fuzzing))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodedPeer {
    /// The decoded peer encoded again, under the same incarnation.
    pub(crate) encoding: Vec<u8>,
    /// Whether it holds a session.
    pub(crate) has_session: bool,
    /// The trusted identity key it holds, if any.
    pub(crate) identity: Option<[u8; IDENTITY_LEN]>,
    /// The receiving chains unsure after the load: (chain, next, end).
    pub(crate) unsure: Vec<([u8; IDENTITY_LEN], u32, u32)>,
    /// The library address's name and device id.
    pub(crate) address: (String, u32),
    /// The expiry and the sealed expiry it was given.
    pub(crate) expiries: (Timestamp, Timestamp),
    /// The encoded length it remembers (the length of what it was decoded from).
    pub(crate) encoded_len: usize,
    /// Whether it came out clean: not dirty, no record key, nothing written
    /// behind, generation 0.
    pub(crate) clean: bool,
}

/// Decode a stored record as a load does, then encode it again: the fuzz
/// checks' way in to [`Peer::decode`] and [`Peer::encode`].
#[cfg(any(test, fuzzing))]
pub(crate) fn decode_peer_record(
    peer: PeerId,
    bytes: &[u8],
    incarnation: &[u8; 16],
    expiry: Timestamp,
) -> Result<DecodedPeer, &'static str> {
    let mut decoded = Peer::decode(peer, bytes, incarnation, expiry).map_err(|e| e.0)?;
    let clean = !decoded.dirty
        && decoded.key.is_none()
        && decoded.behind.is_none()
        && decoded.generation == 0;
    let encoded_len = decoded.encoded_len;
    Ok(DecodedPeer {
        encoding: decoded.encode(incarnation),
        has_session: decoded.session.is_some(),
        identity: decoded.identity.map(|k| k.serialize()),
        unsure: decoded
            .unsure
            .iter()
            .map(|u| (u.chain.serialize(), u.next, u.end))
            .collect(),
        address: (
            decoded.address.name().to_owned(),
            u32::from(decoded.address.device_id()),
        ),
        expiries: (decoded.expiry, decoded.sealed_expiry),
        encoded_len,
        clean,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use wacore_libsignal::protocol::KeyPair;

    #[test]
    fn an_encoding_round_trips_and_leaves_room_to_seal_in_place() {
        let id = PeerId {
            phone: PhoneHash::from_bytes([7; 16]),
            device: 2,
        };
        let mut peer = Peer::empty(id);
        peer.identity = Some(IdentityKey::new(
            KeyPair::generate(&mut crate::rng::OsRng).public_key,
        ));
        let bytes = peer.encode(&[1; 16]);
        assert!(bytes.capacity() - bytes.len() >= SEAL_ROOM);
        assert_eq!(peer.encoded_len, bytes.len());
        let expiry = Timestamp::from_millis(5);
        let back = Peer::decode(id, &bytes, &[1; 16], expiry).unwrap();
        assert_eq!(back.identity, peer.identity);
        assert!(back.session.is_none());
        assert_eq!((back.expiry, back.encoded_len), (expiry, bytes.len()));
    }

    #[test]
    fn a_record_opens_only_for_the_device_it_was_written_for() {
        let id = PeerId {
            phone: PhoneHash::from_bytes([7; 16]),
            device: 2,
        };
        let bytes = Peer::empty(id).encode(&[1; 16]);
        let expiry = Timestamp::from_millis(5);
        assert!(Peer::decode(id, &bytes, &[1; 16], expiry).is_ok());
        for other in [
            PeerId { device: 3, ..id },
            PeerId {
                phone: PhoneHash::from_bytes([8; 16]),
                ..id
            },
        ] {
            assert_eq!(
                Peer::decode(other, &bytes, &[1; 16], expiry).err(),
                Some(CorruptPeer("record of another device"))
            );
        }
    }
}
