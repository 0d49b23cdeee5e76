//! The test-support kit (feature `testing`), for harnesses that drive the
//! crate the way a messaging network would.
//!
//! - [`ConsumerDevice`]: a consumer's device, a real Signal client with its
//!   own identity, prekeys and sessions, that talks to businesses through
//!   the crate.
//! - [`SimNetwork`]: the messaging network, a [`Transport`](crate::transport::Transport)
//!   for the processor, holding consumers with several devices each; consumers
//!   send with [`SimNetwork::consumer_sends`], and [`SimNetwork::pump`] moves
//!   everything due (inbound messages, messages to devices, delivery reports).
//! - [`SimBusiness`]: the businesses' endpoint, a
//!   [`BusinessSink`](crate::transport::BusinessSink) that records what it is handed.
//! - [`Faults`]: loss, duplication, delay (so reordering), failures and
//!   outages on each link, decided by a seeded generator: the same seed
//!   replays the same run. Time is a [`ManualClock`](crate::time::ManualClock)
//!   the harness advances.
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
mod network;

pub use device::{ConsumerDevice, DeviceError};
pub use network::{Faults, PumpReport, SimBusiness, SimNetwork, join_all};
