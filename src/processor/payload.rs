//! What the processor seals inside a stored message, and what it sends to a
//! consumer's device. Internal formats, versioned, parsed strictly.

use crate::ids::{MessageId, PhoneNumber};
use crate::integrity::Category;
use crate::store::Direction;
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const IDENTITY_CHANGED: u8 = 1;

/// A stored payload that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BadPayload(pub(super) &'static str);

/// The sealed body of an inbound message.
pub(super) struct InboundBody {
    pub(super) from: PhoneNumber,
    pub(super) device: u32,
    pub(super) identity_changed: bool,
    pub(super) content: Zeroizing<Vec<u8>>,
}

/// The sealed body of an outbound message.
pub(super) struct OutboundBody {
    pub(super) to: PhoneNumber,
    pub(super) category: Category,
    pub(super) content: Zeroizing<Vec<u8>>,
}

fn put_phone(out: &mut Vec<u8>, phone: &PhoneNumber) {
    let digits = phone.expose().as_bytes();
    // E.164: at most 16 bytes with the '+'.
    out.push(digits.len() as u8);
    out.extend_from_slice(digits);
}

fn take_phone(bytes: &[u8]) -> Result<(PhoneNumber, &[u8]), BadPayload> {
    let (&len, rest) = bytes.split_first().ok_or(BadPayload("truncated number"))?;
    let (number, rest) = rest
        .split_at_checked(usize::from(len))
        .ok_or(BadPayload("truncated number"))?;
    let number = std::str::from_utf8(number)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(BadPayload("bad number"))?;
    Ok((number, rest))
}

fn category_code(c: Category) -> u8 {
    Category::ALL
        .iter()
        .position(|k| *k == c)
        .map_or(0, |i| i as u8)
}

impl InboundBody {
    /// `01` ‖ flags ‖ device (u32 BE) ‖ number length ‖ number ‖ content.
    #[cfg(any(test, fuzzing))]
    pub(super) fn encode(&self) -> Vec<u8> {
        Self::encode_fields(
            &self.from,
            self.device,
            self.identity_changed,
            &self.content,
        )
    }

    /// The encoding of a body with these fields, without building one.
    pub(super) fn encode_fields(
        from: &PhoneNumber,
        device: u32,
        identity_changed: bool,
        content: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + content.len());
        out.push(VERSION);
        out.push(if identity_changed {
            IDENTITY_CHANGED
        } else {
            0
        });
        out.extend_from_slice(&device.to_be_bytes());
        put_phone(&mut out, from);
        out.extend_from_slice(content);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, BadPayload> {
        let [VERSION, flags, d0, d1, d2, d3, rest @ ..] = bytes else {
            return Err(BadPayload("bad inbound header"));
        };
        if flags & !IDENTITY_CHANGED != 0 {
            return Err(BadPayload("unknown flags"));
        }
        let (from, content) = take_phone(rest)?;
        Ok(Self {
            from,
            device: u32::from_be_bytes([*d0, *d1, *d2, *d3]),
            identity_changed: flags & IDENTITY_CHANGED != 0,
            content: Zeroizing::new(content.to_vec()),
        })
    }
}

impl OutboundBody {
    /// `01` ‖ category ‖ number length ‖ number ‖ content.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.content.len());
        out.push(VERSION);
        out.push(category_code(self.category));
        put_phone(&mut out, &self.to);
        out.extend_from_slice(&self.content);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, BadPayload> {
        let [VERSION, category, rest @ ..] = bytes else {
            return Err(BadPayload("bad outbound header"));
        };
        let category = *Category::ALL
            .get(usize::from(*category))
            .ok_or(BadPayload("unknown category"))?;
        let (to, content) = take_phone(rest)?;
        Ok(Self {
            to,
            category,
            content: Zeroizing::new(content.to_vec()),
        })
    }
}

/// The sealed body of a stored message of either direction.
pub(super) enum StoredBody {
    Inbound(InboundBody),
    Outbound(OutboundBody),
}

impl StoredBody {
    /// Decode the body of a message stored in `direction`.
    pub(super) fn decode(direction: Direction, bytes: &[u8]) -> Result<Self, BadPayload> {
        Ok(match direction {
            Direction::Inbound => Self::Inbound(InboundBody::decode(bytes)?),
            Direction::Outbound => Self::Outbound(OutboundBody::decode(bytes)?),
        })
    }

    /// The consumer the message is from or to.
    pub(super) fn consumer(&self) -> &PhoneNumber {
        match self {
            Self::Inbound(body) => &body.from,
            Self::Outbound(body) => &body.to,
        }
    }
}

/// Decode a stored inbound body and encode it again (for the fuzz checks,
/// `crate::fuzzing::payload`); the decoder's reason if it refuses.
#[cfg(any(test, fuzzing))]
pub(crate) fn reencode_inbound(bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
    InboundBody::decode(bytes)
        .map(|body| body.encode())
        .map_err(|e| e.0)
}

/// Decode a stored outbound body and encode it again (for the fuzz checks,
/// `crate::fuzzing::payload`); the decoder's reason if it refuses.
#[cfg(any(test, fuzzing))]
pub(crate) fn reencode_outbound(bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
    OutboundBody::decode(bytes)
        .map(|body| body.encode())
        .map_err(|e| e.0)
}

/// What a consumer's device receives from a business: the message id (so a
/// retransmitted copy is recognised) then the content.
pub fn device_payload(id: MessageId, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MessageId::LEN + content.len());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(content);
    out
}

/// Split what a device received from a business into id and content.
pub fn parse_device_payload(payload: &[u8]) -> Option<(MessageId, &[u8])> {
    let (id, content) = payload.split_at_checked(MessageId::LEN)?;
    Some((MessageId::from_bytes(id.try_into().ok()?), content))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The longest content a send takes, to the longest number E.164
    /// allows, still fits an envelope once encoded as a stored body.
    #[test]
    fn the_longest_content_to_the_longest_number_fits_an_envelope() {
        let body = OutboundBody {
            to: "+123456789012345".parse().unwrap(),
            category: Category::ALL[3],
            content: vec![0; super::super::MAX_CONTENT_LEN].into(),
        };
        let encoded = body.encode();
        assert!(encoded.len() <= crate::envelope::MAX_PLAINTEXT_LEN);
        assert_eq!(OutboundBody::decode(&encoded).unwrap().to, body.to);
    }

    proptest! {
        #[test]
        fn bodies_round_trip_and_garbage_never_panics(
            digits in "[1-9][0-9]{6,14}",
            device in any::<u32>(),
            flag in any::<bool>(),
            category in 0usize..4,
            content in prop::collection::vec(any::<u8>(), 0..64),
            garbage in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let number: PhoneNumber = format!("+{digits}").parse().unwrap();
            let inbound = InboundBody { from: number.clone(), device, identity_changed: flag, content: content.clone().into() };
            let back = InboundBody::decode(&inbound.encode()).unwrap();
            prop_assert_eq!((back.from, back.device, back.identity_changed, back.content.to_vec()), (number.clone(), device, flag, content.clone()));
            let outbound = OutboundBody { to: number.clone(), category: Category::ALL[category], content: content.clone().into() };
            let back = OutboundBody::decode(&outbound.encode()).unwrap();
            prop_assert_eq!((back.to, back.category, back.content.to_vec()), (number, Category::ALL[category], content.clone()));
            let _ = InboundBody::decode(&garbage);
            let _ = OutboundBody::decode(&garbage);
            let id = MessageId::from_bytes([7; 16]);
            let payload = device_payload(id, &content);
            prop_assert_eq!(parse_device_payload(&payload), Some((id, content.as_slice())));
        }
    }
}
