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
//! - [`RecordingTransport`]: a transport that accepts every send and keeps
//!   it, for harnesses and benchmarks that hand ciphertexts to devices
//!   themselves.
//! - [`Faults`]: loss, duplication, delay (so reordering), failures and
//!   outages, decided by a seeded pure function ([`Faults::fate`]). Each
//!   of the two components takes one `Faults`, which covers every [`Leg`]
//!   of it: there is no setting per leg (the table on [`Faults`] says
//!   which faults apply to which leg). Time is a [`ManualClock`](crate::time::ManualClock)
//!   the harness advances; delays and outages are in its time.
//! - [`World`]: all of it put together, a processor over a `SimNetwork`
//!   and a `SimBusiness` with a manual clock, an in-memory audit trail and a
//!   principal for each role, whose [`turn`](World::turn) runs one step of
//!   the loop below.
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
//! # Driving the world
//!
//! Nothing moves by itself. The harness publishes each business's keys
//! ([`Processor::publish_keys`](crate::processor::Processor::publish_keys))
//! before its consumers write to it, and again before the one-time
//! prekeys run out ([`SimNetwork::one_time_prekeys_left`]): the network
//! reports that count to the processor, which refills the pool by it.
//! Then it runs a loop of three steps:
//!
//! 1. [`SimNetwork::pump`] moves everything due.
//! 2. [`Processor::retransmit_due`](crate::processor::Processor::retransmit_due)
//!    is the harness's job too. The network redelivers a consumer's
//!    message until the processor acknowledges it, but it never sends a
//!    business's ciphertext again, and the processor retries only when
//!    asked. Without this step, a lost ciphertext never arrives and a
//!    handover the business refused is never made again.
//! 3. The harness advances the [`ManualClock`](crate::time::ManualClock).
//!    Steps of about [`REDELIVERY`] suit the network; the processor's
//!    retries follow its [`DeliveryConfig`](crate::processor::DeliveryConfig),
//!    whose receipt timeout decides when a lost ciphertext is sent again.
//!
//! Before asserting, let the world settle: run past every outage, every
//! delay and the retries they cause. A copy the business took late shows
//! in [`SimBusiness::messages`] and [`SimBusiness::contents`] only once
//! the clock has passed its delay: check [`SimBusiness::held_back`] is 0
//! first. Other points to keep in mind:
//!
//! - During a network outage, [`pump`](SimNetwork::pump) moves nothing
//!   and the network refuses every call the processor makes, key
//!   publication and the integrity and billing exports included. Those
//!   also meet `fail` and `drop` ([`Leg::Upload`]), and the processor
//!   does not retry them by itself: like a host's timer, the harness
//!   publishes and exports again until a call succeeds. The business
//!   endpoint has outages of its own, in its own [`Faults`].
//! - The processor's refusals are not lost messages: a consumer message
//!   or delivery report the processor refuses for good (an error that
//!   [`is_permanent`](crate::processor::ProcessorError::is_permanent): a
//!   malformed or forged message, say) is dropped and counted in
//!   [`PumpReport::refused`]; one refused otherwise (the wrong principal
//!   given to [`pump`](SimNetwork::pump), say) is delivered again. Either
//!   way [`PumpReport::last_error`] says why.
//! - A device counts the copies of each message it decrypted
//!   ([`SimNetwork::received`]): those beyond the first are the
//!   processor's retransmissions, and any that differ from the first
//!   are counted in [`SimNetwork::altered_copies`]. A copy of one
//!   ciphertext that the network duplicated fails to decrypt and is
//!   counted nowhere, so device-side duplicates are not reported, however
//!   late it comes; nor is it asked for again when the first copy could
//!   not be decrypted either (that one was counted, and asked for). A copy that comes after its conversation turned more
//!   often than a device keeps chains for cannot be decrypted by any
//!   Signal client: it is asked for again, and counted in
//!   [`SimNetwork::late`], not in [`SimNetwork::undecryptable`].
//! - The network reports delivery under the id it carried a ciphertext
//!   under, as a real one must; a payload naming another id is counted
//!   in [`SimNetwork::mislabelled`].
//! - [`SimNetwork::add_consumer`] with 0 devices adds a consumer with no
//!   device: it cannot send, and the processor's messages to it fail as
//!   to a number nobody has.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//!
//! use custodian::ids::{BusinessId, PhoneNumber};
//! use custodian::integrity::Category;
//! use custodian::processor::{DeliveryConfig, Outbound, Policies};
//! use custodian::store::Status;
//! use custodian::testing::{Faults, REDELIVERY, World};
//!
//! // A lost ciphertext is sent again two minutes after it was sent (then
//! // 4, 8, 16… minutes after, while no delivery report comes).
//! let delivery = DeliveryConfig {
//!     receipt_timeout: Duration::from_secs(120),
//!     ..DeliveryConfig::default()
//! };
//! let b = BusinessId::new(7).ok_or("zero")?;
//! let world = World::builder()
//!     .business(b)
//!     .network_faults(Faults::moderate())
//!     .business_faults(Faults::moderate())
//!     .seed(1)
//!     .policies(Policies { delivery, ..Policies::default() })
//!     .build()?;
//! let owner = world.owner(b).ok_or("no owner")?;
//!
//! // Keys first (the network may refuse or lose them, as any call: each
//! // business's is tried up to 10 times), then traffic both ways.
//! world.publish_keys(10).await?;
//! let alice: PhoneNumber = "+447700900001".parse()?;
//! world.network.add_consumer(&alice, 2).await;
//! world.network.consumer_sends(&alice, 1, b, b"hello").await?;
//! let reply = Outbound {
//!     to: alice.clone(),
//!     content: b"hi back".to_vec().into(),
//!     category: Category::Service,
//! };
//! let id = world.processor.send(owner, b, reply).await?;
//!
//! // An hour of the loop: pump, retransmit, advance the clock.
//! for _ in 0..120 {
//!     world.turn(REDELIVERY).await?;
//! }
//!
//! // Settled: nothing moving, no copy held back.
//! assert!(world.settled().await);
//! // The business has the consumer's message, handed over exactly once.
//! assert_eq!(world.business.messages().into_values().collect::<Vec<_>>(), [1]);
//! assert_eq!(world.business.contents()[0].2, b"hello");
//! // Each of Alice's devices has the reply, and it was reported delivered.
//! let received = world.network.received(&alice).await;
//! for device in world.network.devices_of(&alice).await {
//!     assert!(received[&device].contains_key(&id));
//! }
//! assert_eq!(world.processor.message_status(owner, b, id).await?.0, Status::Delivered);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! The kit's pieces can be used on their own:
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
//! // Without faults every message to a device arrives, once.
//! let none = Faults::none();
//! assert!((0..1000).all(|n| none.fate(7, Leg::ToDevice, n).copies() == 1));
//!
//! // Moderate faults lose about 5% of them and duplicate about 5%; the
//! // seed fixes which, so a failing run replays from its seed.
//! let moderate = Faults::moderate();
//! let copies = |seed| -> Vec<u32> {
//!     (0..1000).map(|n| moderate.fate(seed, Leg::ToDevice, n).copies()).collect()
//! };
//! let run = copies(7);
//! let lost = run.iter().filter(|&&c| c == 0).count();
//! let doubled = run.iter().filter(|&&c| c == 2).count();
//! assert!((20..=100).contains(&lost) && (20..=100).contains(&doubled));
//! assert_eq!(run, copies(7));
//! assert_ne!(run, copies(8));
//! # });
//! ```

mod business;
mod device;
mod faults;
mod join;
mod network;
mod recording;
mod world;

pub use business::{Cause, Copies, SimBusiness, StatusCopy};
pub use device::{ConsumerDevice, DeviceError};
pub use faults::{Decision, Fate, Faults, InvalidFaults, Leg, LegStats};
pub use join::join_all;
pub use network::{PumpReport, REDELIVERY, SimNetwork};
pub use recording::RecordingTransport;
pub use world::{World, WorldBuilder, WorldError};
