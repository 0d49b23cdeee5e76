//! Non-identifiable statistics: per business and period, k-suppressed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, Grid, PAST_CEILING, PerBusiness, Period, UP_TO_THE_CEILING, hash_key, lock,
};
use crate::ids::{BusinessId, PhoneHash};
use crate::retention::{CEILING, RetentionPolicy};
use crate::time::Timestamp;
use crate::visibility::{DataClass, Labelled};

pub use crate::store::Direction;

/// `direction`'s row in a per-direction table.
const fn lane(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

/// A status a message reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Outbound: handed to the transport. Inbound: received from it.
    Sent,
    /// Delivered to the recipient (the consumer's device, or the business).
    Delivered,
    /// Read by the recipient.
    Read,
    /// Could not be delivered before it expired.
    Failed,
}

impl Status {
    /// Every status.
    pub const ALL: &'static [Self] = &[Self::Sent, Self::Delivered, Self::Read, Self::Failed];
}

/// Upper bounds (inclusive, milliseconds) of the delivery-latency buckets;
/// one more bucket holds everything above the last.
pub const LATENCY_BOUNDS_MS: [u64; 6] = [1_000, 5_000, 30_000, 60_000, 300_000, 3_600_000];
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Most consumers a bucket must count before it is released.
const MAX_K: usize = 1_000;

/// Settings of the [`StatisticsCollector`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatisticsConfig {
    /// Length of a statistics period, whole seconds from 1 second to the
    /// retention [`CEILING`] (30 days): an open period remembers up to `k`
    /// consumers per bucket, so a longer one would keep them past the
    /// ceiling. Default: one day (UTC).
    pub period: Duration,
    /// A bucket is released only if at least `k` distinct consumers
    /// contributed to it; 2 to 1,000. Default 10.
    pub k: usize,
    /// Periods kept per business, at least 1; past it the oldest is
    /// dropped unreleased. Default 31.
    pub retained_periods: usize,
}

impl Default for StatisticsConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(24 * 3600),
            k: 10,
            retained_periods: 31,
        }
    }
}

/// A released message count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MessageCount {
    /// The direction.
    pub direction: Direction,
    /// The status.
    pub status: Status,
    /// Messages.
    pub messages: u64,
}

/// A released delivery-latency bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LatencyCount {
    /// Latencies above this (exclusive, ms); 0 for the first bucket.
    pub above_ms: u64,
    /// Latencies up to this (inclusive, ms); `None` for the last bucket.
    pub up_to_ms: Option<u64>,
    /// Messages.
    pub messages: u64,
}

/// One business's statistics for one closed period, k-suppressed.
///
/// Buckets with fewer than `k` distinct consumers are absent, exactly like
/// empty ones, and so is a count a suppressed bucket could be recovered
/// from by subtraction. Two sums tie the counts: the latency buckets add up
/// to the outbound `delivered` count, and in each direction `sent` is about
/// `delivered` plus `failed` (outbound, the latency buckets plus `failed`).
/// If any latency bucket is suppressed, outbound `delivered` is withheld;
/// `sent` is released only if the counts withheld from its sum come from
/// at least `k` consumers together; and a `sent` withheld whose parts are
/// all released takes `failed` with it. Outbound `sent` is public all the
/// same (each message sent is billed, in periods as long), so when the
/// outbound counts withheld come from fewer than `k` consumers, the whole
/// outbound row is withheld: `sent`, `delivered`, `failed` and every
/// latency bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatisticsReport {
    /// The business.
    pub business: BusinessId,
    /// The period (closed).
    pub period: Period,
    /// The suppression threshold applied.
    pub k: usize,
    /// Message counts by direction and status.
    pub messages: Vec<MessageCount>,
    /// Outbound delivery latency histogram: from when the processor
    /// accepted (stored) each message to the first report that a device
    /// has it, time queued included.
    pub delivery_latency: Vec<LatencyCount>,
}

/// Collects per-business statistics and exports them k-suppressed, labelled
/// [`DataClass::NonIdentifiableStatistics`].
///
/// Only closed periods are exported, and exporting seals them: an event
/// timestamped in a sealed period counts in the first unsealed one, so a
/// released number never changes and two exports cannot be subtracted to
/// isolate a few consumers.
#[derive(Debug)]
pub struct StatisticsCollector {
    config: StatisticsConfig,
    grid: Grid,
    businesses: PerBusiness<BusinessStats>,
}

#[derive(Debug, Default)]
struct BusinessStats {
    periods: BTreeMap<u64, PeriodStats>,
    /// Periods below this index are sealed.
    sealed_below: u64,
}

#[derive(Debug, Default)]
struct PeriodStats {
    messages: [[Bucket; 4]; 2],
    latency: [Bucket; LATENCY_BUCKETS],
    /// What the period's report withholds, decided when its consumers
    /// were forgotten: a total withheld unless the parts missing from it
    /// come from `k` consumers together can be judged only while they are
    /// known, and the period is sealed by then, so its report stays what
    /// it was.
    decided: Option<Withheld>,
}

/// What a period's report withholds (see [`withheld`]).
#[derive(Debug, Clone, Copy)]
struct Withheld {
    /// Per direction and status, the message counts.
    messages: [[bool; Status::ALL.len()]; 2],
    /// Every latency bucket.
    latency: bool,
}

/// A count, and the distinct consumers behind it, remembered up to k.
#[derive(Debug, Default)]
struct Bucket {
    messages: u64,
    /// Sorted; at most k entries: knowing "at least k" is all that is needed.
    consumers: Vec<u64>,
    /// The consumers were forgotten at the retention ceiling, and there
    /// were at least k of them.
    enough: bool,
}

impl Bucket {
    fn add(&mut self, consumer: u64, k: usize) {
        self.messages = self.messages.saturating_add(1);
        if self.consumers.len() < k
            && let Err(at) = self.consumers.binary_search(&consumer)
        {
            self.consumers.insert(at, consumer);
        }
    }

    fn releasable(&self, k: usize) -> bool {
        self.enough || self.consumers.len() >= k
    }

    /// Forget the consumers, keeping whether they were enough.
    fn forget_consumers(&mut self, k: usize) {
        self.enough = self.releasable(k);
        self.consumers = Vec::new();
    }

    fn suppressed(&self, k: usize) -> bool {
        self.messages > 0 && !self.releasable(k)
    }
}

/// Whether `buckets` together count at least `k` distinct consumers.
fn enough_together(buckets: &[&Bucket], k: usize) -> bool {
    if buckets.iter().any(|b| b.releasable(k)) {
        return true;
    }
    let mut all: Vec<u64> = buckets
        .iter()
        .flat_map(|b| b.consumers.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all.len() >= k
}

/// What the report of period `p` withholds, besides the buckets too few
/// consumers make up.
fn withheld(p: &PeriodStats, k: usize) -> Withheld {
    // Released counts must not give away, by subtraction, what fewer
    // than k consumers make up. Two sums tie them: the latency buckets
    // add up to the outbound delivered count, and in each direction
    // sent is about delivered plus failed (outbound, the latency
    // buckets plus failed). A total is released only if the parts
    // withheld from its sum come from at least k consumers together;
    // a total withheld whose parts are all released takes failed with
    // it. The outbound sent count is public all the same: the business
    // is billed for each message sent, in periods as long, so what it
    // withholds gives nothing away only if its parts do not either:
    // when the parts withheld come from fewer than k consumers, the
    // whole outbound row is (its latency buckets, delivered, failed).
    let mut withheld = [[false; Status::ALL.len()]; 2];
    for direction in Direction::ALL {
        for &status in Status::ALL {
            withheld[lane(direction)][status as usize] =
                p.messages[lane(direction)][status as usize].suppressed(k);
        }
    }
    let hidden_latency: Vec<&Bucket> = p.latency.iter().filter(|b| b.suppressed(k)).collect();
    if !hidden_latency.is_empty() {
        withheld[lane(Direction::Outbound)][Status::Delivered as usize] = true;
    }
    let mut latency_withheld = false;
    for direction in Direction::ALL {
        let (counts, lane) = (&p.messages[lane(direction)], &mut withheld[lane(direction)]);
        let mut hidden: Vec<&Bucket> = Vec::new();
        if lane[Status::Failed as usize] {
            hidden.push(&counts[Status::Failed as usize]);
        }
        let delivered = &counts[Status::Delivered as usize];
        match direction {
            // Withheld for the latency buckets, delivered would give
            // their hidden sum away: those count, and delivered only
            // if it is itself too few.
            Direction::Outbound => {
                hidden.extend(&hidden_latency);
                if delivered.suppressed(k) {
                    hidden.push(delivered);
                }
            }
            Direction::Inbound if lane[Status::Delivered as usize] => hidden.push(delivered),
            Direction::Inbound => {}
        }
        if !hidden.is_empty() && !enough_together(&hidden, k) {
            lane[Status::Sent as usize] = true;
            if direction == Direction::Outbound {
                lane[Status::Delivered as usize] = true;
                lane[Status::Failed as usize] = true;
                latency_withheld = true;
            }
        }
        if lane[Status::Sent as usize] && hidden.is_empty() {
            lane[Status::Failed as usize] = true;
        }
    }
    Withheld {
        messages: withheld,
        latency: latency_withheld,
    }
}

fn latency_bucket(latency: Duration) -> usize {
    let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&bound| ms <= bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

impl StatisticsCollector {
    /// A collector with this configuration.
    pub fn new(config: StatisticsConfig) -> Result<Self, ConfigError> {
        if !(2..=MAX_K).contains(&config.k) {
            return Err(ConfigError {
                field: "k",
                rule: "must be from 2 to 1000",
            });
        }
        if config.period > CEILING {
            return Err(ConfigError {
                field: "period",
                rule: PAST_CEILING,
            });
        }
        if config.retained_periods == 0 {
            return Err(ConfigError {
                field: "retained_periods",
                rule: "must be at least 1",
            });
        }
        Ok(Self {
            grid: Grid::new(config.period, "period", UP_TO_THE_CEILING)?,
            config,
            businesses: PerBusiness::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StatisticsConfig {
        &self.config
    }

    /// A message between `business` and `consumer` reached `status` at `at`.
    pub fn record_message(
        &self,
        business: BusinessId,
        consumer: PhoneHash,
        direction: Direction,
        status: Status,
        at: Timestamp,
    ) {
        let consumer = hash_key(&consumer);
        self.update(business, at, |p, k| {
            p.messages[lane(direction)][status as usize].add(consumer, k);
        });
    }

    /// An outbound message to `consumer` was delivered `latency` after it
    /// was accepted (the processor measures from when it stored the
    /// message, so time queued in an outage counts); `at` is the delivery
    /// time. Also counts the message as outbound `delivered`, so call it
    /// instead of [`record_message`](Self::record_message) for a delivery.
    pub fn record_delivery(
        &self,
        business: BusinessId,
        consumer: PhoneHash,
        latency: Duration,
        at: Timestamp,
    ) {
        let consumer = hash_key(&consumer);
        self.update(business, at, |p, k| {
            p.messages[lane(Direction::Outbound)][Status::Delivered as usize].add(consumer, k);
            p.latency[latency_bucket(latency)].add(consumer, k);
        });
    }

    /// The reports of `business`'s periods that ended by `now`, oldest
    /// first, each labelled [`DataClass::NonIdentifiableStatistics`]. A
    /// period whose every bucket is suppressed has no report, as one with
    /// no message has none. The periods are sealed and kept: asking again
    /// gives the same reports.
    pub fn closed_reports(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Vec<Labelled<StatisticsReport>> {
        let open = self.grid.index(now);
        self.businesses
            .with(business, |s| {
                s.sealed_below = s.sealed_below.max(open);
                s.periods
                    .range(..open)
                    .filter_map(|(&i, p)| self.report(business, i, p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every business with statistics kept, in id order.
    pub fn businesses(&self) -> Vec<BusinessId> {
        self.businesses.all().into_iter().map(|(b, _)| b).collect()
    }

    /// The reports of every business's periods that ended by `now`, removed
    /// from the collector, in business then period order.
    pub fn take_closed(&self, now: Timestamp) -> Vec<Labelled<StatisticsReport>> {
        self.businesses()
            .into_iter()
            .flat_map(|business| self.take_closed_of(business, now))
            .collect()
    }

    /// The reports of `business`'s periods that ended by `now`, removed
    /// from the collector, oldest first: after
    /// [`closed_reports`](Self::closed_reports) with the same `now`,
    /// exactly the reports it gave (it sealed them).
    pub fn take_closed_of(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Vec<Labelled<StatisticsReport>> {
        let open = self.grid.index(now);
        self.businesses
            .with(business, |s| {
                s.sealed_below = s.sealed_below.max(open);
                let keep = s.periods.split_off(&open);
                let closed = std::mem::replace(&mut s.periods, keep);
                closed
                    .iter()
                    .filter_map(|(&i, p)| self.report(business, i, p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets, for every business, the consumers counted in every closed
    /// period that began at least the longest period `retention` keeps the
    /// business's messages (inbound or outbound) before `now` (so holds a
    /// contact that old), keeping its counts and which of its buckets may
    /// be released; such periods are sealed (a late event counts in the
    /// first period after them). The processor runs it on every sweep, with
    /// its retention policy, so no consumer outlives its business's
    /// retention here by more than a period (the open one's consumers are
    /// kept until it closes: forgetting them sooner would count a returning
    /// consumer twice towards the `k` a bucket needs to be released),
    /// whether or not the statistics are ever taken.
    pub fn expire(&self, now: Timestamp, retention: &RetentionPolicy) {
        let k = self.config.k;
        for (business, cell) in self.businesses.all() {
            let kept = retention.periods(business).longest().min(CEILING);
            let below = self
                .grid
                .index(now.saturating_sub(kept))
                .saturating_add(1)
                .min(self.grid.index(now));
            let mut s = lock(&cell);
            s.sealed_below = s.sealed_below.max(below);
            for (_, p) in s.periods.range_mut(..below) {
                if p.decided.is_none() {
                    p.decided = Some(withheld(p, k));
                }
                for bucket in p.messages.iter_mut().flatten().chain(&mut p.latency) {
                    bucket.forget_consumers(k);
                }
            }
        }
    }

    /// Drops everything kept about `business`; `true` if there was anything.
    pub fn forget(&self, business: BusinessId) -> bool {
        self.businesses.remove(business)
    }

    fn update(&self, business: BusinessId, at: Timestamp, f: impl FnOnce(&mut PeriodStats, usize)) {
        let (k, retained) = (self.config.k, self.config.retained_periods);
        let index = self.grid.index(at);
        self.businesses
            .update(business, BusinessStats::default, |s| {
                let index = index.max(s.sealed_below);
                f(s.periods.entry(index).or_default(), k);
                while s.periods.len() > retained {
                    s.periods.pop_first();
                }
            });
    }

    /// The report of `business`'s period `index`, if any count of it may
    /// be released: a period whose every bucket is suppressed has none,
    /// as one with no message has none (an empty report would say that
    /// the business had fewer than `k` consumers in it).
    fn report(
        &self,
        business: BusinessId,
        index: u64,
        p: &PeriodStats,
    ) -> Option<Labelled<StatisticsReport>> {
        let k = self.config.k;
        let withheld = p.decided.unwrap_or_else(|| withheld(p, k));
        let mut messages = Vec::new();
        for direction in Direction::ALL {
            for &status in Status::ALL {
                let bucket = &p.messages[lane(direction)][status as usize];
                if bucket.releasable(k) && !withheld.messages[lane(direction)][status as usize] {
                    messages.push(MessageCount {
                        direction,
                        status,
                        messages: bucket.messages,
                    });
                }
            }
        }
        let delivery_latency = p
            .latency
            .iter()
            .enumerate()
            .filter(|(_, b)| b.releasable(k) && !withheld.latency)
            .map(|(i, b)| LatencyCount {
                above_ms: if i == 0 { 0 } else { LATENCY_BOUNDS_MS[i - 1] },
                up_to_ms: LATENCY_BOUNDS_MS.get(i).copied(),
                messages: b.messages,
            })
            .collect::<Vec<_>>();
        if messages.is_empty() && delivery_latency.is_empty() {
            return None;
        }
        let report = StatisticsReport {
            business,
            period: self.grid.period(index),
            k,
            messages,
            delivery_latency,
        };
        Some(Labelled::of_business(
            DataClass::NonIdentifiableStatistics,
            business,
            report,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a report, released to the processor for analytics.
    fn released(report: Labelled<StatisticsReport>) -> StatisticsReport {
        let clock = crate::time::ManualClock::new(Timestamp::from_millis(0));
        crate::visibility::Gate::new(
            crate::visibility::VisibilityPolicy::published(),
            std::sync::Arc::new(crate::visibility::MemoryAuditSink::new()),
            std::sync::Arc::new(clock),
        )
        .release(
            report,
            crate::visibility::Party::Processor,
            crate::visibility::Purpose::Analytics,
        )
        .unwrap()
        .into_value()
    }

    /// A closed period's report is what it was after the sweep forgot its
    /// consumers: its withheld parts' consumers counted together before
    /// they were forgotten. (It was withheld after: with the consumers
    /// gone, the parts counted none together.)
    #[test]
    fn a_closed_periods_report_outlives_its_consumers() {
        let c = StatisticsCollector::new(StatisticsConfig::default()).unwrap();
        let b = BusinessId::new(9).unwrap();
        let day = 86_400_000;
        let t = Timestamp::from_millis(1_767_225_600_000 + 1_000);
        let consumer = |i: u8| PhoneHash::from_bytes([i; 16]);
        for i in 0..10 {
            c.record_message(b, consumer(i), Direction::Outbound, Status::Sent, t);
        }
        // Two latency buckets of 5 consumers each: each withheld, together
        // the k = 10 the total they add up to needs.
        for i in 0..10 {
            let latency = Duration::from_secs(if i < 5 { 1 } else { 7_200 });
            c.record_delivery(b, consumer(i), latency, t);
        }
        let now = t.saturating_add(Duration::from_millis(day));
        let reports = |c: &StatisticsCollector| {
            c.closed_reports(b, now)
                .into_iter()
                .map(released)
                .collect::<Vec<_>>()
        };
        let before = reports(&c);
        assert_eq!(before.len(), 1);
        // The sent total: its withheld parts (the latency buckets) come
        // from k consumers together.
        assert!(
            before[0].messages.iter().any(|m| m.status == Status::Sent),
            "{before:?}"
        );
        c.expire(
            t.saturating_add(Duration::from_millis(31 * day)),
            &RetentionPolicy::default(),
        );
        assert_eq!(consumers_kept(&c, b), 0);
        assert_eq!(reports(&c), before);
        let taken: Vec<_> = c.take_closed_of(b, now).into_iter().map(released).collect();
        assert_eq!(taken, before);
    }

    /// How many consumer entries `c` keeps for `b`, over every period and
    /// bucket.
    fn consumers_kept(c: &StatisticsCollector, b: BusinessId) -> usize {
        c.businesses
            .with(b, |s| {
                s.periods
                    .values()
                    .flat_map(|p| p.messages.iter().flatten().chain(&p.latency))
                    .map(|bucket| bucket.consumers.len())
                    .sum::<usize>()
            })
            .unwrap()
    }

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        assert_eq!(latency_bucket(Duration::ZERO), 0);
        assert_eq!(latency_bucket(Duration::from_millis(1_000)), 0);
        assert_eq!(latency_bucket(Duration::from_millis(1_001)), 1);
        assert_eq!(latency_bucket(Duration::from_secs(3_600)), 5);
        assert_eq!(latency_bucket(Duration::from_secs(3_601)), 6);
        assert_eq!(latency_bucket(Duration::MAX), 6);
    }

    #[test]
    fn bucket_counts_distinct_consumers_up_to_k() {
        let mut b = Bucket::default();
        for c in [5, 3, 5, 9, 3] {
            b.add(c, 3);
        }
        assert_eq!(b.messages, 5);
        assert!(b.releasable(3));
        assert!(!b.releasable(4));
        assert_eq!(b.consumers, [3, 5, 9]);
    }

    /// A business keeping its messages a day has its consumers forgotten
    /// once the period that counted them began a day ago; another business,
    /// on the default retention, keeps its own. Before, every business's
    /// consumers were kept for the 30-day ceiling.
    #[test]
    fn a_consumer_is_forgotten_with_its_business_retention() {
        use crate::retention::{BusinessRetention, Periods};

        let c = StatisticsCollector::new(StatisticsConfig::default()).unwrap();
        let (short, long) = (BusinessId::new(3).unwrap(), BusinessId::new(4).unwrap());
        let day: u64 = 24 * 3600 * 1000;
        let at = |ms| Timestamp::from_millis(100 * day + ms);
        for b in [short, long] {
            let consumer = PhoneHash::from_bytes([1; 16]);
            c.record_message(b, consumer, Direction::Inbound, Status::Sent, at(0));
        }
        let one_day = BusinessRetention {
            periods: Periods::both(Duration::from_secs(24 * 3600)),
            region: None,
        };
        let policy = RetentionPolicy::default()
            .with_business(short, one_day)
            .unwrap();
        let kept = |b| consumers_kept(&c, b);
        c.expire(at(day - 1), &policy);
        assert_eq!((kept(short), kept(long)), (1, 1));
        c.expire(at(day), &policy);
        assert_eq!((kept(short), kept(long)), (0, 1));
    }

    #[test]
    fn no_consumer_is_kept_past_the_retention_ceiling_and_counts_stay_releasable() {
        let c = StatisticsCollector::new(StatisticsConfig::default()).unwrap();
        let b = BusinessId::new(3).unwrap();
        let day: u64 = 24 * 3600 * 1000;
        let at = |ms| Timestamp::from_millis(100 * day + ms);
        let consumer = |i: u8| PhoneHash::from_bytes([i; 16]);
        for i in 0..10 {
            c.record_message(
                b,
                consumer(i),
                Direction::Inbound,
                Status::Sent,
                at(i.into()),
            );
        }
        for i in 0..9 {
            c.record_message(
                b,
                consumer(i),
                Direction::Inbound,
                Status::Read,
                at(i.into()),
            );
        }
        let kept = |c: &StatisticsCollector| consumers_kept(c, b);
        // The period began at day 100: its consumers are kept until day 130.
        let policy = RetentionPolicy::default();
        c.expire(at(30 * day - 1), &policy);
        assert_eq!(kept(&c), 19);
        c.expire(at(30 * day), &policy);
        assert_eq!(kept(&c), 0);
        // Late events count after the sealed period, not in it.
        for i in 42..52 {
            c.record_message(b, consumer(i), Direction::Inbound, Status::Read, at(5));
        }
        let reports: Vec<StatisticsReport> = c
            .take_closed(at(40 * day))
            .into_iter()
            .map(|r| {
                crate::visibility::Gate::new(
                    crate::visibility::VisibilityPolicy::published(),
                    std::sync::Arc::new(crate::visibility::MemoryAuditSink::new()),
                    std::sync::Arc::new(crate::time::ManualClock::new(at(40 * day))),
                )
                .release(
                    r,
                    crate::visibility::Party::Processor,
                    crate::visibility::Purpose::Analytics,
                )
                .unwrap()
                .into_value()
            })
            .collect();
        assert_eq!(reports.len(), 2);
        let counts = |r: &StatisticsReport| {
            r.messages
                .iter()
                .map(|m| (m.direction, m.status, m.messages))
                .collect::<Vec<_>>()
        };
        // Still released (10 consumers); the late events in a period of
        // their own.
        assert_eq!(
            counts(&reports[0]),
            [(Direction::Inbound, Status::Sent, 10)]
        );
        assert_eq!(
            counts(&reports[1]),
            [(Direction::Inbound, Status::Read, 10)]
        );
    }

    #[test]
    fn k_below_two_is_refused() {
        let c = StatisticsConfig {
            k: 1,
            ..Default::default()
        };
        assert_eq!(StatisticsCollector::new(c).unwrap_err().field, "k");
    }
}
