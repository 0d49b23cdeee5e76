//! The billing ledger as a store keeps it: counts of billable messages per
//! business, period and category, and the takes of closed periods on their
//! way to billing's system of record.
//!
//! A message is counted in the batch of the conditional delivery update
//! that records it taken by the transport and sets its
//! [`Delivery::accepted_by`](super::Delivery::accepted_by)
//! ([`Op::Bill`](super::Op::Bill) beside that update), so a count is as
//! durable as the message's state and made exactly once. An export
//! moves closed periods into a take ([`Op::TakeBilling`](super::Op::TakeBilling)),
//! hands the take over, and forgets it once billing has it
//! ([`Op::SettleBilling`](super::Op::SettleBilling)): a take that a failure
//! or a crash left in the store is handed over again, as it is and under
//! its id, which billing counts once.

use std::num::NonZeroU64;

use crate::integrity::Category;
use crate::time::Timestamp;

/// Names one take of a business's billing: random, never zero.
pub type TakeId = NonZeroU64;

/// Billable messages of one business counted in one period and category,
/// as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillingCount {
    /// The take holding the count; `None` while no take has it.
    pub take: Option<TakeId>,
    /// The first instant of the period.
    pub start: Timestamp,
    /// The first instant after the period.
    pub end: Timestamp,
    /// The category.
    pub category: Category,
    /// How many messages (never zero).
    pub count: u64,
}

/// A take of closed periods not yet known to be in billing's system of
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BillingTake {
    /// The take.
    pub id: TakeId,
    /// When it was made.
    pub at: Timestamp,
}

/// What a store holds of one business's billing (see
/// [`Storage::billing`](super::Storage::billing)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredBilling {
    /// Every count, in `(take, start, end, category)` order: those no take
    /// has first.
    pub counts: Vec<BillingCount>,
    /// The takes not yet settled, oldest first.
    pub takes: Vec<BillingTake>,
}
