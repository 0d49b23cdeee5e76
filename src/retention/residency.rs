//! Residency ("local storage"): content at rest only in the region a
//! business chose; content in use elsewhere only for a bounded time.

use std::fmt;

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

/// Content held in memory outside its region, readable only until `until`.
/// After that [`get`](Self::get) refuses and the value is dropped: the sealed
/// copy in the business's own region is the one to go back to.
pub struct InUse<T> {
    value: Option<T>,
    until: Timestamp,
}

impl<T> InUse<T> {
    /// Hold `value` until `until`.
    pub fn new(value: T, until: Timestamp) -> Self {
        Self {
            value: Some(value),
            until,
        }
    }

    /// The value, if its time is not up at `now`; dropped for good once it is.
    pub fn get(&mut self, now: Timestamp) -> Option<&T> {
        if now >= self.until {
            self.value = None;
        }
        self.value.as_ref()
    }

    /// When the value stops being usable.
    pub fn until(&self) -> Timestamp {
        self.until
    }
}

impl<T> fmt::Debug for InUse<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InUse")
            .field("held", &self.value.is_some())
            .field("until", &self.until)
            .finish()
    }
}
