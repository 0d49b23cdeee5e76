//! Legal holds as stored.

use serde::{Deserialize, Serialize};

use crate::ids::{BusinessId, PhoneHash};
use crate::time::Timestamp;

/// What a legal hold covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldScope {
    /// Everything of one business.
    Business(BusinessId),
    /// Everything about one consumer of one business.
    Consumer(BusinessId, PhoneHash),
}

impl HoldScope {
    /// The business the hold concerns.
    pub fn business(&self) -> BusinessId {
        match *self {
            Self::Business(b) | Self::Consumer(b, _) => b,
        }
    }

    /// The consumer the hold concerns, if only one.
    pub fn phone(&self) -> Option<PhoneHash> {
        match *self {
            Self::Business(_) => None,
            Self::Consumer(_, p) => Some(p),
        }
    }

    /// Whether the hold covers data of `business` about `phone`.
    pub fn covers(&self, business: BusinessId, phone: PhoneHash) -> bool {
        match *self {
            Self::Business(b) => b == business,
            Self::Consumer(b, p) => b == business && p == phone,
        }
    }
}

/// A legal hold: while it stands, nothing it covers is deleted or shredded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// What it covers.
    pub scope: HoldScope,
    /// The case or order it serves (an operator's reference, not personal data).
    pub reference: String,
    /// When it was placed.
    pub placed: Timestamp,
}
