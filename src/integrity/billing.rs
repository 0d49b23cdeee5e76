//! Billing records: billable messages per business, category and period.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Grid, PerBusiness, Period, lock};
use crate::ids::BusinessId;
use crate::time::Timestamp;
use crate::visibility::{DataClass, Labelled};

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
    /// answer lost), is handed over again as it was, under the same id:
    /// count each id once. Statements that are not takes (a business's view
    /// of its periods) have id 0.
    pub id: u64,
    /// The business.
    pub business: BusinessId,
    /// When the statement was made.
    pub generated_at: Timestamp,
    /// Records, oldest period first.
    pub records: Vec<BillingRecord>,
    /// Periods dropped at the retention bound before they were taken, since
    /// the ledger started (non-zero means take more often).
    pub dropped_periods: u64,
}

/// What a take removed from the ledger, kept aside when dropped unless
/// [`keep`](Undo::keep) says it was handed over, to be handed over again as
/// it is (same id, same counts) by the next take; it opens for no one. So
/// nothing is lost to a refused release, a failed audit trail, a failed
/// hand-over, or one abandoned halfway (its caller's future dropped), and
/// nothing is counted twice by a system of record that applied a
/// hand-over whose answer was lost.
#[must_use]
pub(crate) struct Undo<'a> {
    ledger: &'a BillingLedger,
    taken: Option<BillingStatement>,
}

impl Undo<'_> {
    /// The statement reached billing's system of record: nothing goes back.
    pub(crate) fn keep(mut self) {
        self.taken = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(statement) = self.taken.take() {
            let business = statement.business;
            self.ledger
                .businesses
                .update(business, Ledger::default, |l| l.unsent.push_back(statement));
        }
    }
}

/// Settings of the [`BillingLedger`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BillingConfig {
    /// Length of a billing period. Default: one day (UTC).
    pub period: Duration,
    /// Periods kept per business until taken, at least 1; past it the
    /// oldest is dropped and counted. Default 62.
    pub retained_periods: usize,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(24 * 3600),
            retained_periods: 62,
        }
    }
}

/// Counts billable messages per business, category and period.
///
/// Record each billable message once: the processor records a message when
/// the transport first accepts it, and never for a retransmission. Records
/// are released as [`DataClass::Billing`], and hold no content and no phone
/// number.
#[derive(Debug)]
pub struct BillingLedger {
    config: BillingConfig,
    grid: Grid,
    businesses: PerBusiness<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    periods: BTreeMap<u64, CategoryCounts>,
    dropped_periods: u64,
    /// Takes not known to have been handed over, oldest failure first: the
    /// next takes are these. Several takes may be in flight at once (two
    /// exports overlapping), and each that fails comes back here.
    unsent: VecDeque<BillingStatement>,
}

impl BillingLedger {
    /// A ledger with this configuration.
    pub fn new(config: BillingConfig) -> Result<Self, ConfigError> {
        if config.retained_periods == 0 {
            return Err(ConfigError {
                field: "retained_periods",
                rule: "must be at least 1",
            });
        }
        Ok(Self {
            grid: Grid::new(config.period, "period")?,
            config,
            businesses: PerBusiness::new(),
        })
    }

    /// One billable message of `category`, sent by `business` at `at`.
    pub fn record(&self, business: BusinessId, category: Category, at: Timestamp) {
        self.record_many(business, category, 1, at);
    }

    /// `count` billable messages of `category`, sent by `business` at `at`.
    pub fn record_many(&self, business: BusinessId, category: Category, count: u64, at: Timestamp) {
        let index = self.grid.index(at);
        let retained = self.config.retained_periods;
        self.businesses.update(business, Ledger::default, |l| {
            l.periods.entry(index).or_default().add(category, count);
            while l.periods.len() > retained {
                l.periods.pop_first();
                l.dropped_periods += 1;
            }
        });
    }

    /// Every period kept for `business` (the open one included, and a take
    /// not yet handed over), labelled [`DataClass::Billing`].
    pub fn statement(&self, business: BusinessId, now: Timestamp) -> Labelled<BillingStatement> {
        let statement = self
            .businesses
            .with(business, |l| {
                let mut periods = l.periods.clone();
                for record in l.unsent.iter().flat_map(|u| &u.records) {
                    let counts = periods
                        .entry(self.grid.index(record.period.start))
                        .or_default();
                    for &category in Category::ALL {
                        counts.add(category, record.messages.get(category));
                    }
                }
                self.statement_of(0, business, now, &periods, l.dropped_periods)
            })
            .unwrap_or_else(|| self.statement_of(0, business, now, &BTreeMap::new(), 0));
        Labelled::of_business(DataClass::Billing, business, statement)
    }

    /// The periods of `business` that ended by `now`, removed from the
    /// ledger (to hand them to the system of record), labelled
    /// [`DataClass::Billing`]. A message recorded later for a period
    /// already taken appears in a later take on its own: the counts of a
    /// period are the sum of its takes.
    pub fn take_closed(&self, business: BusinessId, now: Timestamp) -> Labelled<BillingStatement> {
        match self.take_closed_undoably(business, now) {
            Some((statement, undo)) => {
                undo.keep();
                statement
            }
            None => {
                let none = self.statement_of(0, business, now, &BTreeMap::new(), 0);
                Labelled::of_business(DataClass::Billing, business, none)
            }
        }
    }

    /// As [`take_closed`](Self::take_closed), with what keeps the take
    /// aside unless the statement is handed over (see [`Undo`]); the oldest
    /// take kept aside before, if any, is this take. `None` if there is
    /// nothing to take.
    pub(crate) fn take_closed_undoably(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Option<(Labelled<BillingStatement>, Undo<'_>)> {
        let open = self.grid.index(now);
        let statement = self.businesses.with(business, |l| {
            if let Some(unsent) = l.unsent.pop_front() {
                return Some(unsent);
            }
            let closed = l.periods.split_off(&open);
            let closed = std::mem::replace(&mut l.periods, closed);
            (!closed.is_empty()).then(|| {
                // Never 0, the id of statements that are not takes.
                let id = rand::random::<u64>().max(1);
                self.statement_of(id, business, now, &closed, l.dropped_periods)
            })
        })??;
        let undo = Undo {
            ledger: self,
            taken: Some(statement.clone()),
        };
        Some((
            Labelled::of_business(DataClass::Billing, business, statement),
            undo,
        ))
    }

    /// Put back what a [`take_closed`](Self::take_closed) took, when it
    /// could not be handed to the system of record: its counts are added to
    /// their periods again, to be taken next time.
    pub fn restore(&self, statement: &BillingStatement) {
        let retained = self.config.retained_periods;
        self.businesses
            .update(statement.business, Ledger::default, |l| {
                for record in &statement.records {
                    let counts = l
                        .periods
                        .entry(self.grid.index(record.period.start))
                        .or_default();
                    for &category in Category::ALL {
                        counts.add(category, record.messages.get(category));
                    }
                }
                while l.periods.len() > retained {
                    l.periods.pop_first();
                    l.dropped_periods += 1;
                }
            });
    }

    /// Drops everything kept about `business`; `true` if there was anything.
    pub fn forget(&self, business: BusinessId) -> bool {
        self.businesses.remove(business)
    }

    /// Every business with records (or a take not yet handed over), in id
    /// order.
    pub fn businesses(&self) -> Vec<BusinessId> {
        self.businesses
            .all()
            .into_iter()
            .filter(|(_, l)| {
                let l = lock(l);
                !l.periods.is_empty() || !l.unsent.is_empty()
            })
            .map(|(b, _)| b)
            .collect()
    }

    fn statement_of(
        &self,
        id: u64,
        business: BusinessId,
        now: Timestamp,
        periods: &BTreeMap<u64, CategoryCounts>,
        dropped_periods: u64,
    ) -> BillingStatement {
        BillingStatement {
            id,
            business,
            generated_at: now,
            records: periods
                .iter()
                .map(|(&i, &messages)| BillingRecord {
                    period: self.grid.period(i),
                    messages,
                })
                .collect(),
            dropped_periods,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::time::ManualClock;
    use crate::visibility::{Gate, MemoryAuditSink, Party, Purpose, VisibilityPolicy};

    const DAY_MS: u64 = 24 * 3600 * 1000;

    /// `statement`, released to billing's system of record.
    fn released(statement: Labelled<BillingStatement>) -> BillingStatement {
        let gate = Gate::new(
            VisibilityPolicy::published(),
            Arc::new(MemoryAuditSink::new()),
            Arc::new(ManualClock::new(Timestamp::from_millis(0))),
        );
        gate.release(statement, Party::Transport, Purpose::Billing)
            .unwrap()
            .into_value()
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A billable message, `ms` after the start of day `day`.
        Record(usize, u64, u64),
        /// An export at `day`, its hand-over still in flight.
        Export(u64),
        /// The hand-over in flight at this index (modulo their number)
        /// ends: kept (`true`) or failed, perhaps with its answer lost
        /// (`false`).
        HandedOver(usize, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..4usize, 0..8u64, 0..DAY_MS).prop_map(|(c, d, ms)| Step::Record(c, d, ms)),
            1 => (0..9u64).prop_map(Step::Export),
            1 => (any::<usize>(), any::<bool>()).prop_map(|(i, kept)| Step::HandedOver(i, kept)),
        ]
    }

    fn total(statement: &BillingStatement) -> u64 {
        statement.records.iter().map(|r| r.messages.total()).sum()
    }

    fn counted(statements: &BTreeMap<u64, BillingStatement>) -> u64 {
        statements
            .values()
            .flat_map(|s| &s.records)
            .map(|r| r.messages.total())
            .sum()
    }

    /// Two exports overlap across a period boundary and both hand-overs
    /// fail: both takes come back, the older first, and nothing is lost.
    #[test]
    fn overlapping_takes_that_both_fail_both_come_back() {
        let ledger = BillingLedger::new(BillingConfig::default()).unwrap();
        let business = BusinessId::new(1).unwrap();
        ledger.record(business, Category::Marketing, Timestamp::from_millis(10));
        let (a, undo_a) = ledger
            .take_closed_undoably(business, Timestamp::from_millis(DAY_MS))
            .unwrap();
        ledger.record(
            business,
            Category::Utility,
            Timestamp::from_millis(DAY_MS + 10),
        );
        let (b, undo_b) = ledger
            .take_closed_undoably(business, Timestamp::from_millis(2 * DAY_MS))
            .unwrap();
        drop(undo_a);
        drop(undo_b);
        let now = Timestamp::from_millis(2 * DAY_MS);
        assert_eq!(total(&released(ledger.statement(business, now))), 2);
        let (again, undo) = ledger.take_closed_undoably(business, now).unwrap();
        assert_eq!(released(again), released(a));
        undo.keep();
        let (again, undo) = ledger.take_closed_undoably(business, now).unwrap();
        assert_eq!(released(again), released(b));
        undo.keep();
        assert!(ledger.take_closed_undoably(business, now).is_none());
    }

    proptest! {
        /// Whatever becomes of each hand-over, and however many are in
        /// flight at once, a system of record that counts each statement id
        /// once counts every message once: a failed one is handed over
        /// again as it was, before anything newer, and nothing is lost
        /// (what is not handed over yet is still in the business's
        /// statement).
        #[test]
        fn every_message_is_billed_once_whatever_becomes_of_each_hand_over(
            steps in proptest::collection::vec(step(), 0..60),
        ) {
            let ledger = BillingLedger::new(BillingConfig::default()).unwrap();
            let business = BusinessId::new(1).unwrap();
            let mut recorded = 0u64;
            // What the system of record saw, by id.
            let mut seen: BTreeMap<u64, BillingStatement> = BTreeMap::new();
            // The hand-overs in flight, and the failed ones in the order
            // they failed: the model of the ledger's takes kept aside.
            let mut in_flight = Vec::new();
            let mut failed: VecDeque<BillingStatement> = VecDeque::new();
            for step in steps {
                match step {
                    Step::Record(c, day, ms) => {
                        let at = Timestamp::from_millis(day * DAY_MS + ms);
                        ledger.record(business, Category::ALL[c], at);
                        recorded += 1;
                    }
                    Step::Export(day) => {
                        let now = Timestamp::from_millis(day * DAY_MS);
                        let Some((statement, undo)) = ledger.take_closed_undoably(business, now)
                        else {
                            prop_assert!(failed.is_empty(), "a failed take was lost");
                            continue;
                        };
                        let statement = released(statement);
                        prop_assert!(statement.id != 0);
                        prop_assert!(!statement.records.is_empty());
                        if let Some(oldest) = failed.pop_front() {
                            prop_assert_eq!(&statement, &oldest, "handed over again as it was");
                        }
                        in_flight.push((statement, undo));
                    }
                    Step::HandedOver(i, kept) => {
                        if in_flight.is_empty() {
                            continue;
                        }
                        let (statement, undo) = in_flight.remove(i % in_flight.len());
                        // Whether kept or not, the system of record may have
                        // applied it (an answer lost).
                        seen.entry(statement.id).or_insert_with(|| statement.clone());
                        if kept {
                            undo.keep();
                        } else {
                            drop(undo);
                            failed.push_back(statement);
                        }
                    }
                }
            }
            // Hand-overs still in flight end unanswered (their futures dropped).
            for (statement, undo) in in_flight.drain(..) {
                drop(undo);
                failed.push_back(statement);
            }
            let now = Timestamp::from_millis(9 * DAY_MS);
            let pending = total(&released(ledger.statement(business, now)));
            let unsent: u64 = failed.iter().map(total).sum();
            let applied_of_unsent: u64 =
                failed.iter().filter(|s| seen.contains_key(&s.id)).map(total).sum();
            // Each failed take, applied or not: either the record or the
            // ledger has it, never both counted as new.
            prop_assert_eq!(counted(&seen) - applied_of_unsent + pending, recorded);
            prop_assert!(pending >= unsent);
        }
    }
}
