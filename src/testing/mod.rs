//! The test-support kit (feature `testing`), for harnesses that drive the
//! crate the way a messaging network would.
//!
//! - [`ConsumerDevice`]: a consumer's device, a real Signal client with its
//!   own identity, prekeys and sessions, that talks to businesses through
//!   the crate.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use custodian::testing::ConsumerDevice;
//!
//! let mut phone = ConsumerDevice::new(0);
//! let bundle = phone.bundle(true);
//! assert_eq!(bundle.device_id, 0);
//! assert!(bundle.one_time_prekey.is_some());
//! # });
//! ```

mod device;

pub use device::{ConsumerDevice, DeviceError};
