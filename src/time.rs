//! Time: timestamps and the clock the crate reads them from.
//!
//! Retention is a promise about time, so the crate never reads the system
//! clock directly: every component takes a [`Clock`]. Production uses
//! [`SystemClock`]; tests use [`ManualClock`] and move it forward by hand.
//!
//! ```
//! use std::time::Duration;
//! use custodian::time::{Clock, ManualClock, Timestamp};
//!
//! let clock = ManualClock::new(Timestamp::from_millis(1_000));
//! clock.advance(Duration::from_secs(30 * 24 * 3600));
//! assert_eq!(clock.now(), Timestamp::from_millis(1_000 + 30 * 24 * 3600 * 1000));
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// An instant, in whole milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const UNIX_EPOCH: Self = Self(0);
    /// The latest representable instant.
    pub const MAX: Self = Self(u64::MAX);

    /// The instant `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, or `None` past [`Timestamp::MAX`].
    pub fn checked_add(self, d: Duration) -> Option<Self> {
        let ms = u64::try_from(d.as_millis()).ok()?;
        self.0.checked_add(ms).map(Self)
    }

    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Self {
        self.checked_add(d).unwrap_or(Self::MAX)
    }

    /// `self - d`, saturating at the Unix epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_sub(ms))
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}ms)", self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Where the crate reads the current time. Hosts may supply their own
/// (a cluster time service, say); it must never go backwards by much, since
/// expiry is decided against it.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A clock set before 1970 reads as the epoch: expiry errs towards "expired".
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp(ms)
    }
}

/// A clock that moves only when told to. Clones share one time, so a test
/// can hand a clone to the crate and advance it from outside.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<Manual>);

#[derive(Debug, Default)]
struct Manual {
    /// The time it reads, in milliseconds.
    millis: AtomicU64,
    /// What advances added under a whole millisecond, in nanoseconds (below
    /// 1,000,000): carried into `millis` as it fills.
    nanos: AtomicU32,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(Manual {
            millis: AtomicU64::new(start.0),
            nanos: AtomicU32::new(0),
        }))
    }

    /// Move the clock forward by `d` (saturating). It reads whole
    /// milliseconds; what `d` has under a millisecond is kept, and counts
    /// once the steps add up to one (ten steps of 500 µs move it 5 ms).
    pub fn advance(&self, d: Duration) {
        const MILLI: u32 = 1_000_000;
        let mut carry = 0;
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .0
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                let sum = n + d.subsec_nanos() % MILLI;
                carry = u64::from(sum >= MILLI);
                Some(sum % MILLI)
            });
        let ms = u64::try_from(d.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(carry);
        let _ = self
            .0
            .millis
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ms))
            });
    }

    /// Set the clock to `t` (which may be earlier: tests of clock skew need
    /// it), dropping what advances left under a millisecond.
    pub fn set(&self, t: Timestamp) {
        self.0.nanos.store(0, Ordering::SeqCst);
        self.0.millis.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.millis.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps under a millisecond add up: ten of 500 µs move the clock
    /// 5 ms, and 1.5 ms steps lose nothing. (Each call dropped what was
    /// under a millisecond, so the ten steps moved it by 0.)
    #[test]
    fn manual_clock_keeps_sub_millisecond_steps() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        for _ in 0..10 {
            clock.advance(Duration::from_micros(500));
        }
        assert_eq!(clock.now(), Timestamp::from_millis(1_005));
        for _ in 0..4 {
            clock.advance(Duration::from_micros(1_500));
        }
        assert_eq!(clock.now(), Timestamp::from_millis(1_011));
        clock.set(Timestamp::from_millis(2_000));
        clock.advance(Duration::from_micros(999));
        assert_eq!(clock.now(), Timestamp::from_millis(2_000));
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new(Timestamp::from_millis(5));
        let b = a.clone();
        a.advance(Duration::from_millis(10));
        assert_eq!(b.now(), Timestamp::from_millis(15));
        b.set(Timestamp::from_millis(1));
        assert_eq!(a.now(), Timestamp::from_millis(1));
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp::from_millis(10);
        assert_eq!(Timestamp::MAX.checked_add(Duration::from_millis(1)), None);
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(
            t.saturating_sub(Duration::from_secs(1)),
            Timestamp::UNIX_EPOCH
        );
        assert_eq!(
            t.saturating_duration_since(Timestamp::from_millis(20)),
            Duration::ZERO
        );
        let clock = ManualClock::new(Timestamp::MAX);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Timestamp::MAX);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Timestamp::from_millis(1_577_836_800_000));
    }
}
