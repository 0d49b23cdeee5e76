//! Billing records: billable messages per business, category and period.
//!
//! The ledger itself is kept by the store (see
//! [`StoredBilling`](crate::store::StoredBilling)), so that a message is
//! counted in the same atomic write that records it sent, and survives a
//! stop; this module names periods and builds statements from it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Grid, Period, UP_TO_A_YEAR};
use crate::ids::BusinessId;
use crate::store::{StoredBilling, TakeId};
use crate::time::Timestamp;

/// What a billable message is for (the categories messaging networks price by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Promotions, offers, announcements.
    Marketing,
    /// Follow-ups to a consumer's action or request (an order update, say).
    Utility,
    /// One-time codes and other authentication.
    Authentication,
    /// Replies within a conversation the consumer started.
    Service,
}

impl Category {
    /// Every category.
    pub const ALL: &'static [Self] = &[
        Self::Marketing,
        Self::Utility,
        Self::Authentication,
        Self::Service,
    ];

    /// The category's stored code, in the categories' order.
    #[cfg(feature = "sqlite")]
    pub(crate) const fn code(self) -> u8 {
        match self {
            Self::Marketing => 1,
            Self::Utility => 2,
            Self::Authentication => 3,
            Self::Service => 4,
        }
    }

    /// The category with this stored code.
    #[cfg(feature = "sqlite")]
    pub(crate) const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Marketing),
            2 => Some(Self::Utility),
            3 => Some(Self::Authentication),
            4 => Some(Self::Service),
            _ => None,
        }
    }
}

/// Billable messages per category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CategoryCounts {
    /// Marketing messages.
    pub marketing: u64,
    /// Utility messages.
    pub utility: u64,
    /// Authentication messages.
    pub authentication: u64,
    /// Service messages.
    pub service: u64,
}

impl CategoryCounts {
    /// The count of `category`.
    pub const fn get(&self, category: Category) -> u64 {
        match category {
            Category::Marketing => self.marketing,
            Category::Utility => self.utility,
            Category::Authentication => self.authentication,
            Category::Service => self.service,
        }
    }

    /// All categories together.
    pub const fn total(&self) -> u64 {
        self.marketing
            .saturating_add(self.utility)
            .saturating_add(self.authentication)
            .saturating_add(self.service)
    }

    fn add(&mut self, category: Category, n: u64) {
        let c = match category {
            Category::Marketing => &mut self.marketing,
            Category::Utility => &mut self.utility,
            Category::Authentication => &mut self.authentication,
            Category::Service => &mut self.service,
        };
        *c = c.saturating_add(n);
    }
}

/// One business's billable messages in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BillingRecord {
    /// The period.
    pub period: Period,
    /// Billable messages by category.
    pub messages: CategoryCounts,
}

/// A business's billing records, as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BillingStatement {
    /// Names one take of closed periods (random). A take whose hand-over
    /// failed, perhaps after billing's system of record applied it (its
    /// answer lost), or was cut short by a crash, is handed over again as
    /// it was, under the same id: count each id once. Statements that are
    /// not takes (a business's view of its periods) have id 0.
    pub id: u64,
    /// The business.
    pub business: BusinessId,
    /// When the statement was made.
    pub generated_at: Timestamp,
    /// Records, oldest period first.
    pub records: Vec<BillingRecord>,
}

/// Settings of billing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BillingConfig {
    /// Length of a billing period, whole seconds from 1 second to 366
    /// days. Default: one day (UTC). Counts are stored with their period's
    /// bounds, so a processor started with another length leaves the
    /// counts made before in the periods they were made in.
    pub period: Duration,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(24 * 3600),
        }
    }
}

impl BillingConfig {
    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        BillingPeriods::new(self).map(drop)
    }
}

/// The billing periods of a [`BillingConfig`]: fixed-length, aligned to the
/// Unix epoch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BillingPeriods(Grid);

impl BillingPeriods {
    /// The periods of `config`; refused if its period is out of range.
    pub(crate) fn new(config: &BillingConfig) -> Result<Self, ConfigError> {
        Grid::new(config.period, "period", UP_TO_A_YEAR).map(Self)
    }

    /// The period holding `at`.
    pub(crate) fn of(self, at: Timestamp) -> Period {
        self.0.period(self.0.index(at))
    }
}

/// What `stored` (a business's billing ledger as its store keeps it) says
/// of `business` at `now`: every count, its takes not yet settled included
/// (`take` `None`, a statement with id 0), or those of take `take`.
pub(crate) fn statement(
    business: BusinessId,
    now: Timestamp,
    stored: &StoredBilling,
    take: Option<TakeId>,
) -> BillingStatement {
    let mut periods: BTreeMap<Period, CategoryCounts> = BTreeMap::new();
    for count in stored
        .counts
        .iter()
        .filter(|c| take.is_none() || c.take == take)
    {
        periods
            .entry(Period {
                start: count.start,
                end: count.end,
            })
            .or_default()
            .add(count.category, count.count);
    }
    BillingStatement {
        id: take.map_or(0, TakeId::get),
        business,
        generated_at: now,
        records: periods
            .into_iter()
            .map(|(period, messages)| BillingRecord { period, messages })
            .collect(),
    }
}
