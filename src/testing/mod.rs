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
//!   [`BusinessSink`](crate::transport::BusinessSink) that records what it is
//!   handed, and why each copy came ([`Cause`]).
//! - [`RecordingTransport`]: a transport that accepts everything and keeps
//!   it, for harnesses and benchmarks that hand ciphertexts to devices
//!   themselves.
//! - [`Faults`]: loss, duplication, delay (so reordering), failures and
//!   outages on each [`Leg`] of both, decided by a seeded pure function
//!   ([`Faults::fate`]). Time is a [`ManualClock`](crate::time::ManualClock)
//!   the harness advances; delays and outages are in its time.
//!
//! # What a seed reproduces
//!
//! The **fault schedule** is a pure function of the seed and the order of
//! events: event `n` on leg `L` meets [`Faults::fate`]`(seed, L, n)`, on
//! every run and platform, whatever happens on other legs, and whatever the
//! wall clock says. Outages depend only on the manual clock. The
//! [`fault_log`](SimNetwork::fault_log)s and
//! [`fault_stats`](SimNetwork::fault_stats) of two runs making the same
//! events in the same order are equal.
//!
//! What a seed does **not** reproduce:
//!
//! - Message ids. The processor draws outbound ids from the operating
//!   system's generator, and derives inbound ids from a keyed hash under a
//!   random business key; both differ from run to run. Compare runs by
//!   counts and fault logs, not by ids.
//! - Keys and ciphertexts: devices and the processor generate Signal
//!   identities, prekeys and ratchet keys from the operating system's
//!   generator, as real clients must; storage keys likewise.
//! - Which message meets which fate, unless the events come in the same
//!   order. The harness controls the order of its own calls, but the
//!   processor's calls into the network and the business follow its own
//!   order: retransmissions due at the same instant go in the order of
//!   their (random) ids, and concurrent calls (a harness sending with
//!   [`join_all`], a store that completes on another thread) may finish
//!   in any order. The schedule is the same; the messages it lands on may
//!   not be.
//! - Wall-clock latencies.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use custodian::testing::{ConsumerDevice, Faults, Leg};
//!
//! let mut phone = ConsumerDevice::new(0);
//! let bundle = phone.bundle(true);
//! assert_eq!(bundle.device_id, 0);
//! assert!(bundle.one_time_prekey.is_some());
//!
//! // The fault schedule is a pure function of the seed.
//! let faults = Faults::moderate();
//! assert_eq!(faults.fate(7, Leg::ToDevice, 3), faults.fate(7, Leg::ToDevice, 3));
//! # });
//! ```

mod business;
mod device;
mod faults;
mod join;
mod network;
mod recording;

pub use business::{Cause, Copies, SimBusiness};
pub use device::{ConsumerDevice, DeviceError};
pub use faults::{Decision, Fate, Faults, Leg, LegStats};
pub use join::join_all;
pub use network::{PumpReport, REDELIVERY, SimNetwork};
pub use recording::RecordingTransport;
