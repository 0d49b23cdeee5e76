//! Fault injection for the simulated network and business endpoint: what
//! can go wrong on each [`Leg`], decided by a pure function of a seed, the
//! leg, and the number of the event on that leg.
//!
//! Every event on a leg (a call, a message setting off, a report setting
//! off) takes the next number on that leg, 0, 1, 2, ..., and meets the
//! [`Fate`] that [`Faults::fate`]`(seed, leg, n)` gives it. Nothing else
//! goes in: not the clock, not the message, not what happened on other
//! legs. So the same seed and the same sequence of events on a leg give
//! the same faults, in the same places, on every run and every platform
//! (the generator is SplitMix64, written out here, so a dependency update
//! cannot change a schedule). Outages are the one fault decided by time:
//! a call made during an outage is refused whatever its fate.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::time::Timestamp;

/// What can go wrong on a link, each with a probability from 0 to 1.
///
/// Which faults apply depends on the [`Leg`]:
///
/// | leg | `fail` / outages | `drop` | `duplicate` | `delay` |
/// |---|---|---|---|---|
/// | [`Leg::Call`] | refused as unavailable | - | - | - |
/// | [`Leg::Upload`] | refused as unavailable | the request or its answer is lost: the processor gets an unavailable error, and the network has what it sent if only the answer was lost | - | - |
/// | [`Leg::Inbound`] | - | the attempt or its acknowledgement is lost; the network delivers again after its timeout | delivered twice | arrives late |
/// | [`Leg::ToDevice`] | - | lost for good | delivered twice | arrives late |
/// | [`Leg::Receipt`] | - | lost for good | reported twice | arrives late |
/// | [`Leg::Deliver`], [`Leg::Status`] | refused as unavailable | the request or its reply is lost: the processor gets a timeout error | the business receives it twice | shows in the record late |
///
/// The draws are independent: `drop` is the share of events not refused
/// that are lost, `duplicate` the share of those not lost that arrive
/// twice, `delay` the share of copies that arrive late (by a uniform delay
/// from 1 ms up to `max_delay`, in whole milliseconds, so later ones
/// overtake them).
///
/// One `Faults` covers every leg of the component it is given to (a
/// [`SimNetwork`](super::SimNetwork) or a [`SimBusiness`](super::SimBusiness)):
/// there is no setting per leg. The simulated components refuse a `Faults`
/// that [`validate`](Self::validate) refuses.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// A message is lost.
    pub drop: f64,
    /// A message arrives twice.
    pub duplicate: f64,
    /// A copy is held back by a random delay up to `max_delay`, so later
    /// ones overtake it.
    pub delay: f64,
    /// The longest delay, at least a millisecond if `delay` is above 0.
    pub max_delay: Duration,
    /// A call fails outright as unavailable.
    pub fail: f64,
    /// Periods `[from, to)`, each `from` before its `to`, during which
    /// every call on a leg that refuses calls (see the table) fails as
    /// unavailable, and the network moves nothing.
    pub outages: Vec<(Timestamp, Timestamp)>,
}

/// Why [`Faults::validate`] refused a setting: one that would silently
/// inject less than it says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidFaults {
    /// A probability is not in `[0, 1]` (or is NaN).
    #[error("{field} is {value}: a probability is from 0 to 1")]
    Probability {
        /// The field: `drop`, `duplicate`, `delay` or `fail`.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `delay` is above 0 but `max_delay` is under a millisecond, so every
    /// delay drawn would be 0.
    #[error(
        "delay is {delay} but max_delay is {max_delay:?}: delays are whole milliseconds up to \
         max_delay, so none would be late"
    )]
    NoDelay {
        /// The share of copies to delay.
        delay: f64,
        /// The longest delay.
        max_delay: Duration,
    },
    /// An outage does not start before it ends, so it never happens.
    #[error("outage {index} runs from {from:?} to {to:?}: it must start before it ends")]
    EmptyOutage {
        /// Its place in `outages`.
        index: usize,
        /// Its start.
        from: Timestamp,
        /// Its end.
        to: Timestamp,
    },
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            delay: 0.0,
            max_delay: Duration::ZERO,
            fail: 0.0,
            outages: Vec::new(),
        }
    }

    /// A bad day: 5% lost, 5% duplicated, 20% delayed up to a minute, 5% of
    /// calls failing.
    pub fn moderate() -> Self {
        Self {
            drop: 0.05,
            duplicate: 0.05,
            delay: 0.2,
            max_delay: Duration::from_secs(60),
            fail: 0.05,
            outages: Vec::new(),
        }
    }

    /// Add an outage from `start` for `length`. The clock reads whole
    /// milliseconds, so the outage ends at the first reading not before
    /// `start + length` (a part of a millisecond counts as a whole one),
    /// or at [`Timestamp::MAX`] if there is none: that last reading is in
    /// no outage.
    pub fn with_outage(mut self, start: Timestamp, length: Duration) -> Self {
        let whole = Duration::from_millis(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
        let part = if length > whole {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        let end = start.saturating_add(whole).saturating_add(part);
        self.outages.push((start, end));
        self
    }

    /// Refuse a setting that would inject less than it says: a probability
    /// outside `[0, 1]` or NaN, a `delay` above 0 with a `max_delay` under
    /// a millisecond, an outage that does not start before it ends.
    /// [`SimNetwork::new`](super::SimNetwork::new) and
    /// [`SimBusiness::new`](super::SimBusiness::new) run it.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        for (field, value) in [
            ("drop", self.drop),
            ("duplicate", self.duplicate),
            ("delay", self.delay),
            ("fail", self.fail),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(InvalidFaults::Probability { field, value });
            }
        }
        if self.delay > 0.0 && self.max_delay < Duration::from_millis(1) {
            return Err(InvalidFaults::NoDelay {
                delay: self.delay,
                max_delay: self.max_delay,
            });
        }
        match self.outages.iter().position(|(from, to)| from >= to) {
            Some(index) => {
                let (from, to) = self.outages[index];
                Err(InvalidFaults::EmptyOutage { index, from, to })
            }
            None => Ok(()),
        }
    }

    /// Whether `now` falls in one of the outages.
    pub fn in_outage(&self, now: Timestamp) -> bool {
        self.outages
            .iter()
            .any(|&(from, to)| from <= now && now < to)
    }

    /// The fate of event number `n` on `leg` under `seed`: a pure function
    /// of its arguments and these probabilities. Faults that do not apply
    /// to `leg` (see the table on [`Faults`]) are never set.
    pub fn fate(&self, seed: u64, leg: Leg, n: u64) -> Fate {
        let mut rng = SplitMix64::for_event(seed, leg, n);
        // Always the same number of draws, in the same order, whatever
        // they decide: the fate of one field never shifts another's.
        let failed = rng.chance(self.fail);
        let dropped = rng.chance(self.drop);
        let reply_lost = rng.chance(0.5);
        let duplicated = rng.chance(self.duplicate);
        let mut delays = [Duration::ZERO; 2];
        for delay in &mut delays {
            let late = rng.chance(self.delay);
            // From 1 ms: a copy delayed by none would not be late.
            let ms = rng.below(duration_ms(self.max_delay)).saturating_add(1);
            if late {
                *delay = Duration::from_millis(ms);
            }
        }

        let failed = leg.refusable() && failed;
        let carries = leg != Leg::Call && !failed;
        let dropped = carries && dropped;
        let reply_lost = dropped && leg != Leg::ToDevice && leg != Leg::Receipt && reply_lost;
        // An upload is one call: it is not duplicated or delayed.
        let travels = carries && leg != Leg::Upload;
        let duplicated = travels && !dropped && duplicated;
        // A copy travels if the event was not lost, or if only its reply was.
        let first_travels = travels && (!dropped || reply_lost);
        if !first_travels {
            delays[0] = Duration::ZERO;
        }
        if !duplicated {
            delays[1] = Duration::ZERO;
        }
        Fate {
            leg,
            failed,
            dropped,
            reply_lost,
            duplicated,
            delays,
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where a fault is decided. Each leg numbers its own events: the faults
/// met on one leg never depend on how many events happened on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// A call from the processor to the network (`devices`, `fetch_bundle`,
    /// `send`, `ask_resend`, `one_time_prekey_count`): refused or not.
    Call,
    /// The processor handing the network something to keep
    /// (`publish_keys`, `integrity_signals`, `billing`): refused, or lost
    /// (the request, or only its answer, so the network has it while the
    /// processor is told the call failed).
    Upload,
    /// One attempt of the network to deliver a consumer's message to the
    /// processor.
    Inbound,
    /// A business message (a Signal ciphertext) on its way to one device.
    ToDevice,
    /// A device's delivery report or retry receipt on its way back.
    Receipt,
    /// The processor handing an inbound message to the business.
    Deliver,
    /// The processor reporting a status to the business.
    Status,
}

impl Leg {
    /// Every leg, in order.
    pub const ALL: [Leg; 7] = [
        Leg::Call,
        Leg::Upload,
        Leg::Inbound,
        Leg::ToDevice,
        Leg::Receipt,
        Leg::Deliver,
        Leg::Status,
    ];

    /// Fixed for good: a leg's stream of fates is drawn from it.
    fn index(self) -> usize {
        match self {
            Leg::Call => 0,
            Leg::Inbound => 1,
            Leg::ToDevice => 2,
            Leg::Receipt => 3,
            Leg::Deliver => 4,
            Leg::Status => 5,
            Leg::Upload => 6,
        }
    }

    /// Whether calls on the leg can be refused (`fail`, outages).
    fn refusable(self) -> bool {
        matches!(self, Leg::Call | Leg::Upload | Leg::Deliver | Leg::Status)
    }
}

/// What happens to one event. Fields that do not apply to its leg are
/// `false` or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fate {
    /// The leg the event is on.
    pub leg: Leg,
    /// The call is refused as unavailable.
    pub failed: bool,
    /// The message is lost (on a request–reply leg: the request, or only
    /// its reply, see `reply_lost`).
    pub dropped: bool,
    /// Of a dropped exchange on [`Leg::Inbound`], [`Leg::Upload`],
    /// [`Leg::Deliver`] or [`Leg::Status`]: the request arrived and only the reply was lost,
    /// so the receiver has it while the sender believes it failed (one
    /// dropped exchange in two).
    pub reply_lost: bool,
    /// A second copy arrives.
    pub duplicated: bool,
    /// How late the copy, and the duplicate, arrive.
    pub delays: [Duration; 2],
}

impl Fate {
    /// How many copies of a message reach the other end: 0, 1 or 2. A
    /// [`Leg::Call`] carries no message, so none, refused or not; an
    /// [`Leg::Upload`] that reached the network is one. (An
    /// outage is no part of the fate: see [`Decision::copies`].)
    pub fn copies(&self) -> u32 {
        if self.leg == Leg::Call || self.failed || (self.dropped && !self.reply_lost) {
            0
        } else {
            1 + u32::from(self.duplicated)
        }
    }
}

/// One fault decision as it was applied: the event's leg and number, its
/// fate, and whether an outage refused it regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// The leg.
    pub leg: Leg,
    /// The event's number on that leg.
    pub n: u64,
    /// An outage refused the call (whatever its fate).
    pub outage: bool,
    /// Its fate, [`Faults::fate`]`(seed, leg, n)`.
    pub fate: Fate,
}

impl Decision {
    /// The call was refused: an outage, or a failure.
    pub fn refused(&self) -> bool {
        self.outage || self.fate.failed
    }

    /// How many copies reached the other end, as applied: none if an
    /// outage refused the event, otherwise its fate's
    /// [`copies`](Fate::copies). Summed over a leg's decisions, this is
    /// the leg's [`LegStats::copies`].
    pub fn copies(&self) -> u32 {
        if self.outage { 0 } else { self.fate.copies() }
    }
}

/// Counts of the faults met on one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LegStats {
    /// Events decided.
    pub events: u64,
    /// Calls refused by an outage.
    pub outage: u64,
    /// Calls refused by `fail` (outside outages).
    pub failed: u64,
    /// Messages lost (requests or replies).
    pub dropped: u64,
    /// Of those, replies lost after the request arrived.
    pub replies_lost: u64,
    /// Messages that arrived twice.
    pub duplicated: u64,
    /// Copies that reached the other end.
    pub copies: u64,
    /// Of those, copies that arrived late (a delay above zero).
    pub delayed: u64,
}

/// The fault decisions of one simulated component: per-leg counters, the
/// statistics and the log of every decision.
#[derive(Debug)]
pub(super) struct Injector {
    faults: Faults,
    seed: u64,
    next: [u64; Leg::ALL.len()],
    stats: [LegStats; Leg::ALL.len()],
    log: Vec<Decision>,
}

impl Injector {
    pub(super) fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            seed,
            next: [0; Leg::ALL.len()],
            stats: [LegStats::default(); Leg::ALL.len()],
            log: Vec::new(),
        }
    }

    pub(super) fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Decide the next event on `leg`, happening at `now`.
    pub(super) fn decide(&mut self, leg: Leg, now: Timestamp) -> Decision {
        let i = leg.index();
        let n = self.next[i];
        self.next[i] += 1;
        let fate = self.faults.fate(self.seed, leg, n);
        let outage = leg.refusable() && self.faults.in_outage(now);
        let decision = Decision {
            leg,
            n,
            outage,
            fate,
        };
        let stats = &mut self.stats[i];
        stats.events += 1;
        if outage {
            stats.outage += 1;
        } else {
            stats.failed += u64::from(fate.failed);
            stats.dropped += u64::from(fate.dropped);
            stats.replies_lost += u64::from(fate.reply_lost);
            stats.duplicated += u64::from(fate.duplicated);
            let copies = fate.copies();
            stats.copies += u64::from(copies);
            stats.delayed += fate.delays[..copies as usize]
                .iter()
                .filter(|d| !d.is_zero())
                .count() as u64;
        }
        self.log.push(decision);
        decision
    }

    pub(super) fn stats(&self) -> BTreeMap<Leg, LegStats> {
        Leg::ALL
            .iter()
            .map(|&leg| (leg, self.stats[leg.index()]))
            .filter(|(_, s)| s.events > 0)
            .collect()
    }

    pub(super) fn log(&self) -> Vec<Decision> {
        self.log.clone()
    }
}

/// SplitMix64 (Steele, Lea and Flood), one short stream per event: tiny,
/// fast, good enough for test statistics, and fixed here for good.
struct SplitMix64(u64);

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    fn for_event(seed: u64, leg: Leg, n: u64) -> Self {
        let stream = mix(mix(seed) ^ (leg.index() as u64 + 1).wrapping_mul(GOLDEN_GAMMA));
        Self(mix(stream ^ mix(n.wrapping_add(GOLDEN_GAMMA))))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, 1), 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to [0, 1]; NaN is 0). Draws once
    /// either way.
    fn chance(&mut self, p: f64) -> bool {
        let u = self.unit();
        u < p
    }

    /// Uniform in [0, bound) (0 if `bound` is 0). Draws once either way.
    fn below(&mut self, bound: u64) -> u64 {
        let x = self.next();
        if bound == 0 {
            0
        } else {
            // Multiply-shift: bias below 2^-64 per unit of bound, irrelevant here.
            ((u128::from(x) * u128::from(bound)) >> 64) as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_is_never_true_at_zero_and_always_true_at_one() {
        let mut rng = SplitMix64::for_event(1, Leg::Call, 0);
        for _ in 0..10_000 {
            assert!(!rng.chance(0.0));
            assert!(rng.chance(1.0));
            assert!(!rng.chance(f64::NAN));
        }
    }

    #[test]
    fn streams_of_neighbouring_events_do_not_overlap() {
        let draws = |n| {
            let mut rng = SplitMix64::for_event(7, Leg::ToDevice, n);
            (0..8).map(|_| rng.next()).collect::<Vec<_>>()
        };
        let (a, b) = (draws(0), draws(1));
        assert!(a.iter().all(|x| !b.contains(x)));
    }
}
