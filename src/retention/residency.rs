//! Residency ("local storage"): content at rest only in the region a
//! business chose; content in use elsewhere only for a bounded time.

use std::fmt;

use zeroize::Zeroize;

use super::{RecordFacts, RetentionPolicy, effective_expiry};
use crate::ids::{BusinessId, Region};
use crate::time::Timestamp;

/// Content of a business was about to be stored outside its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("business {business} keeps its content in {pinned}; this store is in {store}")]
pub struct ResidencyError {
    /// The business.
    pub business: BusinessId,
    /// The region it chose.
    pub pinned: Region,
    /// The region of the store that would have received the content.
    pub store: Region,
}

/// Check that content of `business`, pinned to `pinned` (if anything), may be
/// stored in a store in `store`.
pub fn check_residency(
    business: BusinessId,
    pinned: Option<Region>,
    store: Region,
) -> Result<(), ResidencyError> {
    match pinned {
        Some(pinned) if pinned != store => Err(ResidencyError {
            business,
            pinned,
            store,
        }),
        _ => Ok(()),
    }
}

/// Content held in memory outside its region, readable for the policy's
/// in-use TTL ([`RetentionPolicy::in_use_ttl`]), and never past the end of
/// its record's retention under that policy. After that
/// [`get`](Self::get) refuses and the value is wiped: the sealed copy in
/// the business's own region is the one to go back to. The value is wiped
/// on drop too.
pub struct InUse<T: Zeroize> {
    value: Option<T>,
    until: Timestamp,
}

impl<T: Zeroize> InUse<T> {
    /// Hold `value`, taken out of its region at `now` from `record`, for
    /// `policy`'s in-use TTL or until the record's retention under `policy`
    /// ends ([`effective_expiry`]: its sealed expiry, or sooner if its
    /// period was shortened since), whichever comes first.
    pub fn new(value: T, now: Timestamp, record: &RecordFacts, policy: &RetentionPolicy) -> Self {
        let ends = effective_expiry(record, policy);
        Self {
            value: Some(value),
            until: now.saturating_add(policy.in_use_ttl()).min(ends),
        }
    }

    /// The value, if its time is not up at `now`; wiped for good once it is.
    pub fn get(&mut self, now: Timestamp) -> Option<&T> {
        if now >= self.until {
            self.wipe();
        }
        self.value.as_ref()
    }

    fn wipe(&mut self) {
        if let Some(mut value) = self.value.take() {
            value.zeroize();
        }
    }

    /// When the value stops being usable.
    pub fn until(&self) -> Timestamp {
        self.until
    }
}

impl<T: Zeroize> Drop for InUse<T> {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl<T: Zeroize> fmt::Debug for InUse<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InUse")
            .field("held", &self.value.is_some())
            .field("until", &self.until)
            .finish()
    }
}
