//! Expiry epochs: the unit of crypto-shredding.

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// The length of an expiry epoch: between one second and one day.
///
/// Shorter epochs shred closer to each record's expiry and cost more keys;
/// the default, one hour, keeps at most 722 live keys per business under the
/// 30-day ceiling (30 days and the vault's minute of clock tolerance span
/// parts of 722 hours).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct EpochLength(NonZeroU64);

impl EpochLength {
    /// One hour.
    pub const DEFAULT: Self = Self(NonZeroU64::MIN.saturating_add(3_600_000 - 1));
    /// Shortest allowed: one second.
    pub const MIN: Duration = Duration::from_secs(1);
    /// Longest allowed: one day.
    pub const MAX: Duration = Duration::from_secs(24 * 3600);

    /// An epoch length of `d`, if it is within [`MIN`](Self::MIN)..=[`MAX`](Self::MAX)
    /// and a whole number of milliseconds.
    pub fn new(d: Duration) -> Option<Self> {
        if d < Self::MIN || d > Self::MAX || !d.subsec_nanos().is_multiple_of(1_000_000) {
            return None;
        }
        u64::try_from(d.as_millis())
            .ok()
            .and_then(NonZeroU64::new)
            .map(Self)
    }

    /// The length as a duration.
    pub fn as_duration(self) -> Duration {
        Duration::from_millis(self.0.get())
    }

    fn millis(self) -> u64 {
        self.0.get()
    }
}

impl Default for EpochLength {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Debug for EpochLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochLength({:?})", self.as_duration())
    }
}

impl TryFrom<u64> for EpochLength {
    type Error = String;

    fn try_from(millis: u64) -> Result<Self, String> {
        Self::new(Duration::from_millis(millis))
            .ok_or_else(|| format!("epoch length must be 1000..=86400000 ms, got {millis}"))
    }
}

impl From<EpochLength> for u64 {
    fn from(l: EpochLength) -> u64 {
        l.millis()
    }
}

/// An expiry epoch of one business, named by its end: the instant at which
/// its key is destroyed. Records expiring at `t` belong to the epoch that
/// ends at the first multiple of the epoch length after `t`, so every record
/// expires strictly before its key is destroyed.
///
/// Naming epochs by their end keeps identities stable when a business changes
/// its epoch length: epochs of different lengths that end together share a
/// key and are shredded together.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(Timestamp);

impl Epoch {
    /// The epoch that holds records expiring at `expiry`, or `None` if it
    /// would end past [`Timestamp::MAX`].
    pub fn containing(expiry: Timestamp, length: EpochLength) -> Option<Self> {
        let len = length.millis();
        let start = expiry.as_millis() / len * len;
        start
            .checked_add(len)
            .map(|end| Self(Timestamp::from_millis(end)))
    }

    /// The epoch ending at `end`.
    pub const fn ending_at(end: Timestamp) -> Self {
        Self(end)
    }

    /// When the epoch ends and its key is destroyed.
    pub const fn end(self) -> Timestamp {
        self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch(ends {})", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch ending {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epoch_length_bounds() {
        assert_eq!(
            EpochLength::DEFAULT.as_duration(),
            Duration::from_secs(3600)
        );
        assert!(EpochLength::new(Duration::from_millis(999)).is_none());
        assert!(EpochLength::new(Duration::from_secs(86_401)).is_none());
        assert!(EpochLength::new(Duration::from_micros(1_000_500)).is_none());
        assert!(EpochLength::new(Duration::from_secs(60)).is_some());
        assert!(serde_json::from_str::<EpochLength>("0").is_err());
        assert_eq!(
            serde_json::from_str::<EpochLength>("3600000").unwrap(),
            EpochLength::DEFAULT
        );
    }

    #[test]
    fn a_record_expiring_on_a_boundary_belongs_to_the_next_epoch() {
        let len = EpochLength::new(Duration::from_secs(10)).unwrap();
        let e = Epoch::containing(Timestamp::from_millis(20_000), len).unwrap();
        assert_eq!(e.end(), Timestamp::from_millis(30_000));
        assert_eq!(Epoch::containing(Timestamp::MAX, len), None);
    }

    proptest! {
        #[test]
        fn every_record_expires_within_one_length_before_its_epoch_ends(
            expiry in 0u64..u64::MAX / 2,
            secs in 1u64..=86_400,
        ) {
            let len = EpochLength::new(Duration::from_secs(secs)).unwrap();
            let end = Epoch::containing(Timestamp::from_millis(expiry), len).unwrap().end().as_millis();
            prop_assert!(expiry < end);
            prop_assert!(end - expiry <= secs * 1000);
            prop_assert_eq!(end % (secs * 1000), 0);
        }
    }
}
