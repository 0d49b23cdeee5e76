//! The recipients a business has reached, in bounded memory.
//!
//! Two generations of a map from recipient to the last window the business
//! messaged it. A lookup checks both and moves a hit into the current
//! generation; when the current generation is full it becomes the previous
//! one and the old previous one is dropped. So memory never exceeds the
//! bound, a recipient touched in the last `bound / 2` distinct recipients is
//! always remembered, and one not touched for longer may be forgotten and
//! counted as new again: over-counting, never under-counting, new recipients.
//! A recipient neither messaged nor heard from since a given instant can
//! be forgotten outright ([`RecipientTracker::forget_before`]), or from
//! then on read as never seen and dropped within the hour
//! ([`RecipientTracker::age`]): the monitor keeps no consumer longer than
//! its business's retention.

use std::collections::HashMap;

use foldhash::fast::RandomState;

/// Marks a consumer the business heard from but never messaged.
const NEVER_SENT: u64 = u64::MAX;

/// How far [`RecipientTracker::age`] lets its cutoff move between the
/// passes that drop what is past it (milliseconds): an hour.
const AGE_STEP: u64 = 3_600_000;

/// What a send to a recipient was, for this window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Never seen (or forgotten at the bound).
    New,
    /// Seen before, first message to it in this window.
    Returning,
    /// Already messaged in this window.
    Repeat,
}

/// What is kept per recipient: the last window the business messaged it
/// ([`NEVER_SENT`] if only heard from), and when (in Unix milliseconds)
/// the last contact of any kind was.
#[derive(Debug, Clone, Copy)]
struct Seen {
    sent: u64,
    contact: u64,
}

#[derive(Debug)]
pub(super) struct RecipientTracker {
    current: HashMap<u64, Seen, RandomState>,
    previous: HashMap<u64, Seen, RandomState>,
    generation: usize,
    /// The latest contact (Unix milliseconds) of any recipient forgotten
    /// at the bound, if one was.
    last_rotation: Option<u64>,
    /// Recipients whose last contact is older read as never seen.
    cutoff: u64,
    /// The cutoff of the last pass that dropped them.
    dropped_before: u64,
}

impl RecipientTracker {
    /// A tracker holding at most `bound` recipients (at least 2).
    pub(super) fn new(bound: usize) -> Self {
        Self {
            current: HashMap::default(),
            previous: HashMap::default(),
            generation: (bound / 2).max(1),
            last_rotation: None,
            cutoff: 0,
            dropped_before: 0,
        }
    }

    /// The latest contact of any recipient forgotten at the bound (a
    /// generation dropped whole), if one was: none of them had a contact
    /// after it. Older than the retention cutoff, it says that all of
    /// them were past the ceiling (not yet dropped by an hourly pass), so
    /// forgotten anyway.
    pub(super) fn last_rotation(&self) -> Option<u64> {
        self.last_rotation
    }

    /// A message sent to `key` in `window`, at `at` (Unix milliseconds).
    pub(super) fn sent(&mut self, key: u64, window: u64, at: u64) -> Reach {
        let cutoff = self.cutoff;
        let last = match self.current.get_mut(&key) {
            Some(seen) => {
                // Sent to in this window already: a contact stamped before
                // the cutoff (late, or the cutoff moved by a clock that
                // stood ahead) reads as never seen, and every message of
                // the window counted the consumer new again.
                let known = seen.contact >= cutoff || seen.sent == window;
                seen.contact = seen.contact.max(at);
                let last = std::mem::replace(&mut seen.sent, window);
                known.then_some(last)
            }
            None => {
                let last = self.previous.remove(&key).filter(|s| s.contact >= cutoff);
                let contact = last.map_or(at, |s| s.contact.max(at));
                self.insert(
                    key,
                    Seen {
                        sent: window,
                        contact,
                    },
                );
                last.map(|s| s.sent)
            }
        };
        match last {
            None => Reach::New,
            Some(w) if w == window => Reach::Repeat,
            Some(_) => Reach::Returning,
        }
    }

    /// A message received from `key` at `at` (Unix milliseconds), in
    /// `window`: the consumer is known from now on, so replying to it is
    /// not fan-out.
    pub(super) fn heard_from(&mut self, key: u64, window: u64, at: u64) {
        let cutoff = self.cutoff;
        if let Some(seen) = self.current.get_mut(&key) {
            // Forgotten, as `sent` reads it, unless sent to in this window
            // (whose sends then count it once, until the hourly drop of
            // those without contact since the cutoff forgets it: counted
            // again then, an over-count).
            if seen.contact < cutoff && seen.sent != window {
                seen.sent = NEVER_SENT;
            }
            seen.contact = seen.contact.max(at);
            return;
        }
        let last = self.previous.remove(&key).filter(|s| s.contact >= cutoff);
        self.insert(
            key,
            Seen {
                sent: last.map_or(NEVER_SENT, |s| s.sent),
                contact: last.map_or(at, |s| s.contact.max(at)),
            },
        );
    }

    /// Forget every recipient with no contact at `cutoff` (Unix
    /// milliseconds) or later.
    pub(super) fn forget_before(&mut self, cutoff: u64) {
        self.cutoff = self.cutoff.max(cutoff);
        self.drop_before(self.cutoff);
    }

    /// Drop every recipient with no contact at `before` or later.
    fn drop_before(&mut self, before: u64) {
        self.current.retain(|_, s| s.contact >= before);
        self.previous.retain(|_, s| s.contact >= before);
        self.dropped_before = self.dropped_before.max(before);
    }

    /// From now on, every recipient with no contact at `cutoff` or later
    /// reads as never seen; they are dropped hour by hour (a pass costs a
    /// look at every recipient): once the cutoff enters an hour of the
    /// Unix epoch past the last pass, those with no contact since that
    /// hour began. So what the tracker holds, and where it reaches its
    /// bound, depends on the hours its events fall in, not on which event
    /// (an export, say) came first in an hour. Whether this made a pass.
    pub(super) fn age(&mut self, cutoff: u64) -> bool {
        self.cutoff = self.cutoff.max(cutoff);
        let hour = self.cutoff - self.cutoff % AGE_STEP;
        if hour <= self.dropped_before {
            return false;
        }
        self.drop_before(hour);
        true
    }

    fn insert(&mut self, key: u64, seen: Seen) {
        if self.current.len() >= self.generation {
            let dropped = std::mem::replace(&mut self.previous, std::mem::take(&mut self.current));
            if let Some(last) = dropped.values().map(|s| s.contact).max() {
                self.last_rotation = Some(self.last_rotation.map_or(last, |r| r.max(last)));
            }
        }
        self.current.insert(key, seen);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_new_returning_and_repeat() {
        let mut t = RecipientTracker::new(100);
        assert_eq!(t.sent(1, 0, 0), Reach::New);
        assert_eq!(t.sent(1, 0, 0), Reach::Repeat);
        assert_eq!(t.sent(1, 1, 1), Reach::Returning);
        t.heard_from(2, 1, 1);
        assert_eq!(t.sent(2, 1, 1), Reach::Returning);
        assert_eq!(t.sent(2, 1, 1), Reach::Repeat);
    }

    #[test]
    fn recipients_without_contact_since_an_instant_are_forgotten() {
        let mut t = RecipientTracker::new(100);
        t.sent(1, 0, 0);
        t.heard_from(2, 3, 3);
        t.sent(3, 2, 2);
        t.heard_from(3, 5, 5);
        t.forget_before(3);
        assert_eq!(t.len(), 2);
        assert_eq!(t.sent(1, 6, 6), Reach::New, "1 was last seen at 0");
        assert_eq!(t.sent(2, 6, 6), Reach::Returning);
        assert_eq!(t.sent(3, 6, 6), Reach::Returning);
    }

    /// Aged, a recipient past the cutoff reads as never seen at once, and
    /// is dropped once the cutoff moved an hour past the last drop.
    #[test]
    fn aged_recipients_read_as_never_seen_and_are_dropped_within_the_hour() {
        let mut t = RecipientTracker::new(100);
        t.sent(1, 0, 10);
        t.sent(2, 0, 10);
        t.heard_from(3, 0, 10);
        t.sent(4, 0, 10);
        assert!(!t.age(11), "no pass within the hour");
        assert_eq!(t.len(), 4);
        assert_eq!(t.sent(1, 1, 20), Reach::New);
        t.heard_from(2, 1, 20);
        assert_eq!(
            t.sent(2, 1, 20),
            Reach::Returning,
            "heard from, not messaged"
        );
        assert_eq!(t.sent(2, 1, 20), Reach::Repeat);
        assert_eq!(t.sent(3, 1, 20), Reach::New);
        assert!(t.age(AGE_STEP + 11));
        assert_eq!(t.len(), 0, "every last contact is before the cutoff");
    }

    #[test]
    fn at_the_bound_old_recipients_are_forgotten_and_count_as_new() {
        let mut t = RecipientTracker::new(4); // generations of 2
        for k in 0..3 {
            assert_eq!(t.sent(k, 0, 0), Reach::New);
        }
        // 0 and 1 moved to the previous generation; still remembered.
        assert_eq!(t.sent(0, 1, 1), Reach::Returning);
        for k in 10..14 {
            t.sent(k, 1, 1);
        }
        // 1 was not touched for two generations: forgotten.
        assert_eq!(t.sent(1, 2, 2), Reach::New);
        assert!(t.last_rotation().is_some());
    }

    proptest! {
        #[test]
        fn memory_never_exceeds_the_bound_and_new_is_never_undercounted(
            bound in 2usize..64,
            keys in proptest::collection::vec((0u64..200, 0u64..5), 0..500),
        ) {
            let mut t = RecipientTracker::new(bound);
            let mut ever = std::collections::HashSet::new();
            let mut keys = keys;
            keys.sort_by_key(|k| k.1); // windows move forward
            for (key, window) in keys {
                let reach = t.sent(key, window, window);
                if ever.insert(key) {
                    prop_assert_eq!(reach, Reach::New);
                }
                prop_assert!(t.len() <= bound.max(2));
            }
        }

        #[test]
        fn below_the_bound_counts_are_exact(keys in proptest::collection::vec((0u64..50, 0u64..5), 0..300)) {
            let mut t = RecipientTracker::new(1000);
            let mut last = std::collections::HashMap::new();
            let mut keys = keys;
            keys.sort_by_key(|k| k.1);
            for (key, window) in keys {
                let expected = match last.insert(key, window) {
                    None => Reach::New,
                    Some(w) if w == window => Reach::Repeat,
                    Some(_) => Reach::Returning,
                };
                prop_assert_eq!(t.sent(key, window, window), expected);
            }
        }
    }
}
