//! Integrity signals, billing records and non-identifiable statistics: what
//! the processor learns about a business's messaging, with no message content
//! and no phone number in clear, and released only through the visibility
//! policy.
//!
//! Two collectors, each `Send + Sync`, each fed by the processor as
//! messages flow, each exporting [`Labelled`] values that only
//! [`Gate::release`](crate::visibility::Gate::release) can open; and the
//! billing ledger, which the store keeps (in the same writes that record a
//! message sent, so that a count is made once and survives a stop), and
//! the processor releases:
//!
//! | kept by | what it keeps | export | class | released by the published table to |
//! |---|---|---|---|---|
//! | [`IntegrityMonitor`] | per business and window: messages sent and received, unique and new recipients, spam reports, blocks; anomalies | [`IntegrityReport`] | [`IntegritySignals`] | transport (integrity) only |
//! | the store ([`StoredBilling`]) | per business and period: billable messages by [`Category`] | [`BillingStatement`] | [`Billing`] | transport, business, rest of company, processor (billing) |
//! | [`StatisticsCollector`] | per business and period: messages by direction and status, delivery-latency histogram | [`StatisticsReport`] | [`NonIdentifiableStatistics`] | rest of company, transport, business, processor (analytics) |
//!
//! Consumers appear only as [`PhoneHash`]es (keyed hashes the key hierarchy
//! computes), used in memory to count distinct consumers; no export holds
//! one.
//!
//! # Rules
//!
//! - **Time** is always given ([`Timestamp`]): windows and periods are
//!   fixed-length and aligned to the Unix epoch; nothing here reads a clock.
//! - **Memory is bounded** per business: windows roll, histories keep a
//!   configured number of windows, and the set of recipients a business has
//!   reached is capped ([`IntegrityConfig::max_tracked_recipients`]; what
//!   happens at the cap is documented there). Each collector holds one entry
//!   per business it has seen; `forget` removes one.
//! - **Anomalies** ([`AnomalyKind`]): a window whose new recipients exceed
//!   [`IntegrityConfig::fan_out_ratio`] times the business's own baseline
//!   (an exponentially weighted moving average of new recipients over its
//!   past windows) and [`IntegrityConfig::min_new_recipients`]; before the
//!   baseline has [`IntegrityConfig::warmup_windows`] windows, a fixed
//!   [`IntegrityConfig::cold_start_new_recipients`]; and spam reports plus
//!   blocks reaching [`IntegrityConfig::spam_rate`] of the messages sent in
//!   the window and the one before. Flagged windows do not feed the
//!   baseline, so an abuser cannot raise its own bar; nor can windows whose
//!   counts the recipient bound may have inflated raise it.
//!   An anomaly is raised the moment the open window crosses the threshold.
//! - **k-suppression**: a statistics bucket with fewer than
//!   [`StatisticsConfig::k`] distinct consumers is left out of the export
//!   (indistinguishable from an empty one), and so is any count it could be
//!   recovered from by subtraction; only closed periods are exported, and a closed period
//!   never changes, so two exports cannot be subtracted to single anyone out.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use custodian::ids::{BusinessId, PhoneHash};
//! use custodian::integrity::{IntegrityConfig, IntegrityMonitor};
//! use custodian::time::{ManualClock, Timestamp};
//! use custodian::visibility::{Gate, MemoryAuditSink, Party, Purpose, VisibilityPolicy};
//!
//! let monitor = IntegrityMonitor::new(IntegrityConfig::default())?;
//! let business = BusinessId::new(42).unwrap();
//! let now = Timestamp::from_millis(1_767_225_600_000);
//! for i in 0..3u8 {
//!     monitor.record_sent(business, PhoneHash::from_bytes([i; 16]), now);
//! }
//! let report = monitor.export(business, now);
//!
//! let gate = Gate::new(
//!     VisibilityPolicy::published(),
//!     Arc::new(MemoryAuditSink::new()),
//!     Arc::new(ManualClock::new(now)),
//! );
//! // The business does not see the signals about itself...
//! let report = gate.release(report, Party::Business, Purpose::Integrity).unwrap_err();
//! // ...the transport does.
//! let report = gate
//!     .release(report.into_labelled(), Party::Transport, Purpose::Integrity)
//!     .unwrap()
//!     .into_value();
//! assert_eq!(report.current.sent, 3);
//! assert_eq!(report.current.new_recipients, 3);
//! # Ok::<(), custodian::integrity::ConfigError>(())
//! ```
//!
//! [`Labelled`]: crate::visibility::Labelled
//! [`IntegritySignals`]: crate::visibility::DataClass::IntegritySignals
//! [`Billing`]: crate::visibility::DataClass::Billing
//! [`NonIdentifiableStatistics`]: crate::visibility::DataClass::NonIdentifiableStatistics
//! [`PhoneHash`]: crate::ids::PhoneHash
//! [`StoredBilling`]: crate::store::StoredBilling

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};

use crate::ids::{BusinessId, PhoneHash};
use crate::retention::CEILING;
use crate::time::Timestamp;

mod billing;
mod recipients;
mod signals;
mod stats;

pub use billing::{BillingConfig, BillingRecord, BillingStatement, Category, CategoryCounts};
pub(crate) use billing::{BillingPeriods, statement as billing_statement};
pub use signals::{
    Anomaly, AnomalyKind, IntegrityConfig, IntegrityMonitor, IntegrityReport, WindowSignals,
};
pub use stats::{
    Direction, LATENCY_BOUNDS_MS, LatencyCount, MessageCount, StatisticsCollector,
    StatisticsConfig, StatisticsReport, Status,
};

/// A configuration value out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field, such as `window`.
    pub field: &'static str,
    /// The rule it breaks.
    pub rule: &'static str,
}

/// A time period: `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Period {
    /// The first instant in the period.
    pub start: Timestamp,
    /// The first instant after it.
    pub end: Timestamp,
}

impl Period {
    /// Whether `t` is in the period.
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && t < self.end
    }
}

/// Shortest window or period accepted.
const MIN_PERIOD: Duration = Duration::from_secs(1);

/// The lengths a [`Grid`] accepts: whole seconds from [`MIN_PERIOD`] to
/// `max`; `rule` says so.
#[derive(Debug, Clone, Copy)]
struct Lengths {
    max: Duration,
    rule: &'static str,
}

/// Billing periods, which remember no consumer: up to a leap year.
const UP_TO_A_YEAR: Lengths = Lengths {
    max: Duration::from_secs(366 * 24 * 3600),
    rule: "must be whole seconds, from 1 second to 366 days",
};

/// Statistics periods and integrity windows, which remember consumers for
/// as long: up to the retention ceiling.
const UP_TO_THE_CEILING: Lengths = Lengths {
    max: CEILING,
    rule: "must be whole seconds, from 1 second to 30 days",
};
/// Why a statistics period longer than the retention ceiling is refused:
/// it remembers consumers (64 bits of their phone hashes) for as long as
/// it is open. Billing periods remember none and may be as long as
/// [`UP_TO_A_YEAR`] says.
const PAST_CEILING: &str =
    "must be at most 30 days, the retention ceiling: it keeps the consumers it saw until it ends";
/// Why an integrity window longer than the retention ceiling is refused.
const WINDOW_PAST_CEILING: &str = "must be at most 30 days, the retention ceiling: a consumer is \
     remembered for that long after its last contact";

/// Fixed-length periods aligned to the Unix epoch.
#[derive(Debug, Clone, Copy)]
struct Grid {
    len_ms: u64,
}

impl Grid {
    fn new(length: Duration, field: &'static str, lengths: Lengths) -> Result<Self, ConfigError> {
        if !(MIN_PERIOD..=lengths.max).contains(&length) || length.subsec_nanos() != 0 {
            return Err(ConfigError {
                field,
                rule: lengths.rule,
            });
        }
        // In range: at most 366 days of milliseconds.
        Ok(Self {
            len_ms: length.as_millis() as u64,
        })
    }

    /// The index of the period holding `t`.
    fn index(self, t: Timestamp) -> u64 {
        t.as_millis() / self.len_ms
    }

    /// The period with index `index`.
    fn period(self, index: u64) -> Period {
        let start = index.saturating_mul(self.len_ms);
        Period {
            start: Timestamp::from_millis(start),
            end: Timestamp::from_millis(start.saturating_add(self.len_ms)),
        }
    }
}

/// The 64 bits of a phone hash the collectors key on. The hash is a keyed
/// HMAC output, so any 64 of its bits are uniform: two consumers collide
/// with probability 2^-64 per pair.
fn hash_key(h: &PhoneHash) -> u64 {
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State here is counters updated in single steps; a panic elsewhere
    // while holding the lock leaves nothing half-done worth stopping for.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-business state: a map of businesses to their own lock, so tasks
/// working for different businesses do not wait on each other.
struct PerBusiness<S> {
    map: RwLock<HashMap<BusinessId, Arc<Mutex<S>>, RandomState>>,
}

impl<S> std::fmt::Debug for PerBusiness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("PerBusiness")
            .field("businesses", &n)
            .finish()
    }
}

impl<S> PerBusiness<S> {
    fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::default()),
        }
    }

    fn get(&self, business: BusinessId) -> Option<Arc<Mutex<S>>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&business)
            .cloned()
    }

    /// Run `f` on the business's state, creating it with `init` if needed.
    fn update<R>(
        &self,
        business: BusinessId,
        init: impl FnOnce() -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> R {
        let cell = match self.get(business) {
            Some(cell) => cell,
            None => self
                .map
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(business)
                .or_insert_with(|| Arc::new(Mutex::new(init())))
                .clone(),
        };
        f(&mut lock(&cell))
    }

    /// Run `f` on the business's state if it exists.
    fn with<R>(&self, business: BusinessId, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        self.get(business).map(|cell| f(&mut lock(&cell)))
    }

    /// Every business and its state, in id order.
    fn all(&self) -> Vec<(BusinessId, Arc<Mutex<S>>)> {
        let mut all: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(b, s)| (*b, s.clone()))
            .collect();
        all.sort_unstable_by_key(|(b, _)| *b);
        all
    }

    fn remove(&self, business: BusinessId) -> bool {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&business)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<IntegrityMonitor>();
        shared::<StatisticsCollector>();
    }

    #[test]
    fn grid_aligns_periods_to_the_epoch() {
        let g = Grid::new(Duration::from_secs(3600), "window", UP_TO_THE_CEILING).unwrap();
        let t = Timestamp::from_millis(3 * 3_600_000 + 5);
        assert_eq!(g.index(t), 3);
        let p = g.period(3);
        assert!(p.contains(t));
        assert_eq!(p.start, Timestamp::from_millis(3 * 3_600_000));
        assert_eq!(p.end, Timestamp::from_millis(4 * 3_600_000));
        assert!(!p.contains(p.end));
    }

    #[test]
    fn grid_refuses_degenerate_lengths() {
        for bad in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_millis(1_500),
            Duration::from_secs(367 * 24 * 3600),
        ] {
            let err = Grid::new(bad, "period", UP_TO_A_YEAR).unwrap_err();
            assert_eq!(err.to_string(), format!("period: {}", UP_TO_A_YEAR.rule));
        }
        let month = Duration::from_secs(31 * 24 * 3600);
        assert!(Grid::new(month, "period", UP_TO_A_YEAR).is_ok());
        let err = Grid::new(month, "window", UP_TO_THE_CEILING).unwrap_err();
        assert_eq!(
            err.to_string(),
            "window: must be whole seconds, from 1 second to 30 days"
        );
    }
}
