//! The retention decision for one record: pure, cheap, the same for reads
//! and for the sweep.

use super::policy::RetentionPolicy;
use crate::ids::{BusinessId, PhoneHash};
use crate::store::{Direction, HoldScope, MessageRecord};
use crate::time::Timestamp;

/// The facts about a stored record that retention looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFacts {
    /// The business it belongs to.
    pub business: BusinessId,
    /// The consumer it concerns.
    pub phone: PhoneHash,
    /// Which class of message it is.
    pub direction: Direction,
    /// When it was stored.
    pub created: Timestamp,
    /// The expiry sealed into it when it was stored.
    pub expiry: Timestamp,
}

impl From<&MessageRecord> for RecordFacts {
    fn from(m: &MessageRecord) -> Self {
        Self {
            business: m.business,
            phone: m.phone,
            direction: m.direction,
            created: m.created,
            expiry: m.expiry,
        }
    }
}

/// Why a record is to be purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeReason {
    /// Its sealed expiry has passed.
    Expired {
        /// When it expired.
        at: Timestamp,
    },
    /// Its business's retention was shortened since it was stored, and the
    /// shorter period has passed.
    RetentionShortened {
        /// When it expired under the current policy.
        at: Timestamp,
    },
}

/// What retention says about a record now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Readable and kept until the given instant.
    Keep {
        /// When it stops being readable.
        until: Timestamp,
    },
    /// Past its retention: not readable, to be deleted.
    Purge(PurgeReason),
    /// Past its retention, but a legal hold keeps it from deletion and
    /// shredding. It is still not readable through normal reads.
    Held {
        /// When it would otherwise have been purged.
        expired: Timestamp,
        /// The hold that keeps it.
        scope: HoldScope,
    },
}

impl Decision {
    /// Whether a normal read may return the record.
    pub fn readable(&self) -> bool {
        matches!(self, Self::Keep { .. })
    }
}

/// When `record` stops being readable under `policy`: its sealed expiry, or
/// earlier if its business's period was shortened after it was stored. No
/// configuration can make it later.
pub fn effective_expiry(record: &RecordFacts, policy: &RetentionPolicy) -> Timestamp {
    let current = record
        .created
        .saturating_add(policy.period(record.business, record.direction));
    record.expiry.min(current)
}

/// Decide about `record` at `now`, under `policy` and the `holds` in force.
pub fn evaluate(
    record: &RecordFacts,
    now: Timestamp,
    policy: &RetentionPolicy,
    holds: &[HoldScope],
) -> Decision {
    decide_at(record, effective_expiry(record, policy), now, holds)
}

/// Decide about `record`, which stops being readable at `expiry`, at `now`
/// and under the `holds` in force.
pub(super) fn decide_at(
    record: &RecordFacts,
    expiry: Timestamp,
    now: Timestamp,
    holds: &[HoldScope],
) -> Decision {
    if now < expiry {
        return Decision::Keep { until: expiry };
    }
    if let Some(scope) = holds
        .iter()
        .find(|h| h.covers(record.business, record.phone))
    {
        return Decision::Held {
            expired: expiry,
            scope: *scope,
        };
    }
    Decision::Purge(if expiry < record.expiry {
        PurgeReason::RetentionShortened { at: expiry }
    } else {
        PurgeReason::Expired { at: expiry }
    })
}
