//! The simulated messaging network: consumers with real Signal devices and
//! a [`Transport`] for the processor, with seeded faults on every leg.
//!
//! The legs, and what a fault does on each (see [`Faults`]):
//!
//! - **Consumer → processor** ([`Leg::Inbound`]): the network stores and
//!   forwards, as a messaging server does. It keeps a consumer's message
//!   until the processor acknowledges it ([`Processor::receive`] returns
//!   `Ok`), delivering it again every [`REDELIVERY`] until then; a lost
//!   attempt (or a lost acknowledgement, so the processor sees the message
//!   twice) costs time, never the message. The processor could not recover
//!   a message it never saw; the network has to. It keeps one entry per
//!   message: copies a duplicate fault made are not messages of their
//!   own, so however many copies go unheard, one attempt is scheduled.
//! - **Processor → network** ([`Leg::Call`]): `devices`, `fetch_bundle`,
//!   `send` and `one_time_prekey_count` are refused as unavailable
//!   (`fail`, outages); the processor retries them.
//! - **Processor → network, to keep** ([`Leg::Upload`]): `publish_keys`,
//!   `integrity_signals` and `billing` are refused as unavailable (`fail`,
//!   outages), or lost (`drop`): the request, or only its answer, so the
//!   network has the keys, report or statement while the processor is
//!   told the call failed. The processor does not retry these by itself:
//!   the harness publishes keys and exports again, as a host's timer
//!   would.
//! - **Network → device** ([`Leg::ToDevice`]): a ciphertext the network
//!   accepted may be lost for good, duplicated or delayed.
//! - **Device → processor** ([`Leg::Receipt`]): each device's delivery
//!   report, or retry receipt (a business message it does not have and
//!   cannot decrypt, see [`Processor::retry_receipt`]), may be lost for
//!   good, duplicated or delayed. The network tells
//!   the processor a message is delivered once every device of the consumer
//!   has reported it, so a loss on either of these two legs leaves the
//!   message unreported and the processor's retransmission (after its
//!   receipt timeout) is what gets it to every device.
//!
//! During an outage every call is refused and nothing in flight moves.
//!
//! A message, delivery report or retry receipt the processor refuses for
//! good (an error that [`is_permanent`](ProcessorError::is_permanent)) is
//! dropped, as a real network drops it, and counted in
//! [`PumpReport::refused`]; one
//! refused otherwise (the wrong principal given to `pump`, a new identity
//! not yet approved) is delivered again, and [`PumpReport::last_error`]
//! says why.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use wacore_libsignal::protocol::consts::MAX_RECEIVER_CHAINS;
use wacore_libsignal::protocol::{PreKeySignalMessage, SignalMessage};

use super::device::ConsumerDevice;
use super::faults::{Decision, Faults, Injector, InvalidFaults, Leg, LegStats};
use super::join_all;
use crate::ids::{BusinessId, MessageId, PhoneNumber};
use crate::integrity::{BillingStatement, IntegrityReport};
use crate::processor::{Inbound, Processor, ProcessorError, StatusChange, parse_device_payload};
use crate::signal::{Ciphertext, DeviceIdentity, MessageKind, PreKeyBundle, PublishedKeys};
use crate::store::Status;
use crate::time::{Clock, ManualClock, Timestamp};
use crate::transport::{Outgoing, Principal, Transport, TransportError};

/// How long the network waits for the processor's acknowledgement of a
/// consumer's message before delivering it again, and before repeating a
/// delivery report the processor failed to take.
pub const REDELIVERY: Duration = Duration::from_secs(30);

struct InFlight<T> {
    at: Timestamp,
    seq: u64,
    item: T,
}

/// A consumer's message on its way to the processor.
#[derive(Clone)]
struct ToProcessor {
    /// Which message this is a copy or attempt of (see [`Net::unacked`]).
    message: u64,
    business: BusinessId,
    inbound: Inbound,
    hop: Hop,
}

/// A consumer's message as its device wrote it.
struct Written {
    business: BusinessId,
    number: String,
    device: u32,
    /// The ciphertext the device sent.
    ciphertext: Vec<u8>,
    content: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// The network (re)starts delivering: the attempt's fate is decided
    /// when it is due.
    Attempt,
    /// A copy reaches the processor. `reply_lost`: its acknowledgement
    /// never reaches the network, which will deliver it again.
    Arrive { reply_lost: bool },
}

struct ToDevice {
    business: BusinessId,
    number: String,
    device: u32,
    message: Outgoing,
    /// Whether its chain was current when the network took it (see
    /// [`Decrypted::sent`]).
    current: bool,
}

/// A device's ask for a message again (see `Net::asked`).
#[derive(Debug, Default)]
struct Asked {
    /// Its receipts with the processor now.
    calls: u32,
    /// The processor took one up: its answer is owed.
    applied: bool,
}

/// A retry receipt on its way to the processor: `device` could not decrypt
/// business message `id` (it has no session, or another one: the consumer
/// reinstalled) and asks for it again.
#[derive(Clone, Copy)]
struct Retry {
    business: BusinessId,
    id: MessageId,
    device: u32,
}

/// A delivery report on its way to the processor: from one device
/// (`device`: `Some`), or the network repeating a report the processor
/// failed to take (`None`).
struct Receipt {
    business: BusinessId,
    id: MessageId,
    number: String,
    device: Option<u32>,
}

struct Consumer {
    devices: BTreeMap<u32, ConsumerDevice>,
    /// Per device, each business message id received and how many copies.
    received: BTreeMap<u32, BTreeMap<MessageId, u32>>,
    /// Contents received, per device, first copy only.
    contents: BTreeMap<u32, Vec<(BusinessId, MessageId, Vec<u8>)>>,
    /// Per device and business, what it decrypted.
    decrypted: BTreeMap<(u32, BusinessId), Decrypted>,
}

/// What a device decrypted from one business, and what the network took
/// for it: enough to say why it could not decrypt a copy.
#[derive(Default)]
struct Decrypted {
    /// Digests of the ciphertexts it decrypted, or could not decrypt.
    copies: HashSet<[u8; 32]>,
    /// The business's sending chains (its ratchet keys) it decrypted
    /// messages on, in the order it first did.
    chains: Vec<Vec<u8>>,
    /// The sending chains the network took copies for it on, in the order
    /// it first did.
    sent: Vec<Vec<u8>>,
}

/// Why a device could not decrypt a copy.
#[derive(Debug, PartialEq)]
enum Undecryptable {
    /// It decrypted that very ciphertext before: a copy the network made.
    Copy,
    /// It was made on a chain the device has dropped since: it keeps the
    /// last [`MAX_RECEIVER_CHAINS`] it took, as every Signal client does.
    /// The chain was among the last as many the business sent on when the
    /// network took the copy: the network's delay made it late.
    Late,
    /// Anything else.
    Other,
}

impl Decrypted {
    /// The network takes `ciphertext` for the device: whether its chain is
    /// among the last [`MAX_RECEIVER_CHAINS`] the business sent it on.
    fn sent(&mut self, ciphertext: &Ciphertext) -> bool {
        let Some(key) = sending_chain(ciphertext) else {
            return false;
        };
        let at = match self.sent.iter().position(|k| *k == key) {
            Some(at) => at,
            None => {
                self.sent.push(key);
                self.sent.len() - 1
            }
        };
        self.sent.len() - at <= MAX_RECEIVER_CHAINS
    }

    /// The device decrypted `ciphertext`.
    fn took(&mut self, ciphertext: &Ciphertext) {
        self.copies.insert(Sha256::digest(&ciphertext.bytes).into());
        if let Some(key) = sending_chain(ciphertext)
            && !self.chains.contains(&key)
        {
            self.chains.push(key);
        }
    }

    /// The device could not decrypt `ciphertext`: a copy of it is a copy.
    fn failed(&mut self, ciphertext: &Ciphertext) {
        self.copies.insert(Sha256::digest(&ciphertext.bytes).into());
    }

    /// Why the device could not decrypt `ciphertext`, whose chain was
    /// `current` when the network took it (see [`sent`](Self::sent)): a
    /// copy of one it decrypted or could not decrypt before is a copy,
    /// whatever else it could be.
    fn why(&self, ciphertext: &Ciphertext, current: bool) -> Undecryptable {
        if self
            .copies
            .contains(&<[u8; 32]>::from(Sha256::digest(&ciphertext.bytes)))
        {
            return Undecryptable::Copy;
        }
        let dropped = sending_chain(ciphertext).is_some_and(|key| {
            self.chains
                .iter()
                .position(|k| *k == key)
                .is_some_and(|at| self.chains.len() - at > MAX_RECEIVER_CHAINS)
        });
        if current && dropped {
            Undecryptable::Late
        } else {
            Undecryptable::Other
        }
    }
}

/// The sending chain (its ratchet key, serialized) `ciphertext` was made
/// on, if it parses.
fn sending_chain(ciphertext: &Ciphertext) -> Option<Vec<u8>> {
    let bytes = ciphertext.bytes.as_slice();
    let key = match ciphertext.kind {
        MessageKind::FirstContact => *PreKeySignalMessage::try_from(bytes)
            .ok()?
            .message()
            .sender_ratchet_key(),
        MessageKind::FollowUp => *SignalMessage::try_from(bytes).ok()?.sender_ratchet_key(),
    };
    Some(key.serialize().to_vec())
}

/// A one-time prekey the network handed out: its id and public key.
type HandedOut = (u32, [u8; 33]);

struct Net {
    consumers: BTreeMap<String, Consumer>,
    /// Each business's last published keys, and the one-time prekeys
    /// handed out (id and public key) since the first: each goes to one
    /// device only, whatever is published again.
    published: BTreeMap<BusinessId, (PublishedKeys, BTreeSet<HandedOut>)>,
    to_processor: Vec<InFlight<ToProcessor>>,
    /// Consumer messages the processor has not acknowledged, by number,
    /// with whether a delivery attempt is scheduled. One per message, as
    /// a server keeps one entry per message it stores: a copy heard by
    /// the processor removes it, and however many copies go unheard, the
    /// message has one attempt scheduled at a time.
    unacked: BTreeMap<u64, bool>,
    /// What each of those messages carries, for its device to encrypt it
    /// again when the processor asks (see [`SimNetwork::resends_asked`]).
    unacked_content: BTreeMap<u64, Written>,
    /// Requests the processor made to send a message again.
    resends_asked: u64,
    /// The number the next consumer message takes.
    next_message: u64,
    to_devices: Vec<InFlight<ToDevice>>,
    receipts: Vec<InFlight<Receipt>>,
    retries: Vec<InFlight<Retry>>,
    /// Devices that reported each outbound message delivered.
    reported_by: BTreeMap<(BusinessId, MessageId), BTreeSet<u32>>,
    /// Messages whose delivery report the processor took.
    reported: BTreeSet<(BusinessId, MessageId)>,
    /// Per message, the devices the network accepted a send of it for (a
    /// later send refused does not take the copy back).
    accepted: BTreeSet<(BusinessId, MessageId, u32)>,
    /// Sends to a device the network had already accepted the message
    /// for, made after the processor took the message's delivery report
    /// (and not asked for by the device's retry receipt), refused or not.
    resent_after_report: u64,
    /// Copies a device decrypted whose payload names another message id
    /// than the one the network carried.
    mislabelled: u64,
    /// Copies a device could not decrypt (see
    /// [`SimNetwork::undecryptable`]).
    undecryptable: u64,
    /// Copies that reached a device after its conversation turned past the
    /// chain they were sent on (see [`SimNetwork::late`]).
    late: u64,
    /// Copies of a message beyond a device's first whose content or
    /// sending business differ from the first's.
    altered_copies: u64,
    /// Messages a device asked for again, per device: a retry receipt of
    /// its is with the processor, or the processor took one up
    /// ([`StatusChange::Applied`]), and no send was accepted since.
    asked: BTreeMap<(BusinessId, MessageId, u32), Asked>,
    /// The outbound messages sent to each number: a reinstall forgets what
    /// the old devices reported, took and asked for.
    recipients: BTreeMap<String, BTreeSet<(BusinessId, MessageId)>>,
    seq: u64,
    faults: Injector,
    integrity: Vec<IntegrityReport>,
    billing: Vec<BillingStatement>,
}

impl Net {
    fn push<T>(queue: &mut Vec<InFlight<T>>, seq: &mut u64, at: Timestamp, item: T) {
        *seq += 1;
        queue.push(InFlight {
            at,
            seq: *seq,
            item,
        });
    }

    /// Start one delivery attempt of a consumer's message at `now`.
    fn launch_inbound(
        &mut self,
        message: u64,
        business: BusinessId,
        inbound: Inbound,
        now: Timestamp,
    ) {
        let fate = self.faults.decide(Leg::Inbound, now).fate;
        let item = |hop| ToProcessor {
            message,
            business,
            inbound: inbound.clone(),
            hop,
        };
        if fate.dropped && !fate.reply_lost {
            // Lost on the way: no acknowledgement comes, so the network tries again.
            self.redeliver(item(Hop::Attempt), now);
            return;
        }
        let first = item(Hop::Arrive {
            reply_lost: fate.reply_lost,
        });
        Self::push(
            &mut self.to_processor,
            &mut self.seq,
            now.saturating_add(fate.delays[0]),
            first,
        );
        if fate.duplicated {
            let second = item(Hop::Arrive { reply_lost: false });
            Self::push(
                &mut self.to_processor,
                &mut self.seq,
                now.saturating_add(fate.delays[1]),
                second,
            );
        }
        // No acknowledgement can come before a copy arrives: delayed past
        // the redelivery, the attempt is raced by the next.
        if fate.delays[0] >= REDELIVERY && (!fate.duplicated || fate.delays[1] >= REDELIVERY) {
            self.redeliver(item(Hop::Attempt), now);
        }
    }

    /// Schedule the next attempt at delivering `item`'s message, after
    /// [`REDELIVERY`], unless it was acknowledged or one is scheduled.
    fn redeliver(&mut self, item: ToProcessor, now: Timestamp) {
        let Some(scheduled) = self.unacked.get_mut(&item.message) else {
            return;
        };
        if std::mem::replace(scheduled, true) {
            return;
        }
        let retry = ToProcessor {
            hop: Hop::Attempt,
            ..item
        };
        Self::push(
            &mut self.to_processor,
            &mut self.seq,
            now.saturating_add(REDELIVERY),
            retry,
        );
    }

    /// Copies of an event that survived its fate, as arrival times.
    fn arrivals(decision: Decision, now: Timestamp) -> Vec<Timestamp> {
        let copies = decision.fate.copies() as usize;
        decision.fate.delays[..copies]
            .iter()
            .map(|d| now.saturating_add(*d))
            .collect()
    }

    fn one_time_prekeys_left(&self, business: BusinessId) -> usize {
        self.published
            .get(&business)
            .map_or(0, |(keys, handed_out)| {
                keys.one_time_prekeys
                    .iter()
                    .filter(|k| !handed_out.contains(&(k.id, k.public_key)))
                    .count()
            })
    }

    /// Decide an upload at `now`: whether what it carries reaches the
    /// network, and what the processor is told.
    fn upload(&mut self, now: Timestamp) -> (bool, Result<(), TransportError>) {
        let decision = self.faults.decide(Leg::Upload, now);
        let answer = if decision.refused() {
            Err(unavailable(decision))
        } else if decision.fate.reply_lost {
            Err(TransportError::Unavailable(
                "simulated timeout: the answer was lost".into(),
            ))
        } else if decision.fate.dropped {
            Err(TransportError::Unavailable(
                "simulated timeout: the request was lost".into(),
            ))
        } else {
            Ok(())
        };
        (decision.copies() > 0, answer)
    }

    /// `number`'s device writes `content` to `business`, starting a
    /// session from the business's published keys if it has none, or if it
    /// sends again, on request, the message `resend_of` names: it then
    /// starts a new one. Starting one takes the next one-time prekey while
    /// any is left. The message is then in flight to the processor.
    #[allow(clippy::too_many_arguments, reason = "the network's own helper")]
    async fn write(
        &mut self,
        number: &PhoneNumber,
        device: u32,
        business: BusinessId,
        content: &[u8],
        resend_of: Option<MessageId>,
        now: Timestamp,
    ) -> Result<(), String> {
        let consumer = self
            .consumers
            .get_mut(number.expose())
            .ok_or("no such consumer")?;
        let handset = consumer.devices.get_mut(&device).ok_or("no such device")?;
        if resend_of.is_some() || !handset.has_session(business) {
            let (keys, handed_out) = self
                .published
                .get_mut(&business)
                .ok_or("the business has published no keys")?;
            // The device fetches a bundle, and the server hands out each
            // one-time prekey once, in order, while any is left.
            let index = keys
                .one_time_prekeys
                .iter()
                .position(|k| !handed_out.contains(&(k.id, k.public_key)));
            if let Some(key) = index.and_then(|i| keys.one_time_prekeys.get(i)) {
                handed_out.insert((key.id, key.public_key));
            }
            let bundle: PreKeyBundle = keys.bundle(index);
            handset
                .start_session(business, &bundle)
                .await
                .map_err(|e| e.to_string())?;
        }
        let ciphertext = handset
            .encrypt(business, content)
            .await
            .map_err(|e| e.to_string())?;
        let message = self.next_message;
        self.next_message += 1;
        self.unacked.insert(message, false);
        let written = Written {
            business,
            number: number.expose().to_owned(),
            device,
            ciphertext: ciphertext.bytes.clone(),
            content: content.to_vec(),
        };
        self.unacked_content.insert(message, written);
        let inbound = Inbound {
            from: number.clone(),
            device,
            message: ciphertext,
            resend_of,
        };
        self.launch_inbound(message, business, inbound, now);
        Ok(())
    }

    fn in_flight(&self) -> u64 {
        (self.to_processor.len() + self.to_devices.len() + self.receipts.len() + self.retries.len())
            as u64
    }
}

/// What one [`SimNetwork::pump`] did.
#[derive(Debug, Clone, Default)]
pub struct PumpReport {
    /// Consumer messages handed to the processor (including duplicates).
    pub to_processor: u64,
    /// Of those, acknowledged by the processor.
    pub acknowledged: u64,
    /// Business messages handed to devices.
    pub to_devices: u64,
    /// Delivery reports handed to the processor.
    pub receipts: u64,
    /// Retry receipts handed to the processor: a device could not decrypt
    /// a business message it did not have (see
    /// [`Processor::retry_receipt`]). None are made while the processor and
    /// every device keep their sessions: only devices that lost theirs
    /// ([`lose_sessions`](SimNetwork::lose_sessions)) or were reinstalled
    /// (the consumer added again) send them, and those a copy reached too
    /// late to decrypt ([`SimNetwork::late`]).
    pub retry_receipts: u64,
    /// Deliveries of consumer messages, delivery reports and retry receipts
    /// the processor
    /// refused for good (an error that
    /// [`is_permanent`](ProcessorError::is_permanent)): the network drops
    /// what they carried, and delivers it again never. Counted per
    /// delivery: a copy the network duplicated, or delivered again because
    /// the answer was lost, counts again.
    pub refused: u64,
    /// The last error the processor answered a consumer message, a
    /// delivery report or a retry receipt with, refused for good or not,
    /// as text.
    pub last_error: Option<String>,
    /// Items still in flight afterwards.
    pub in_flight: u64,
    /// Wall-clock time of each [`Processor::receive`] call.
    pub receive_latencies: Vec<Duration>,
}

/// The simulated network. Consumers and their devices live here; the
/// processor talks to it as its [`Transport`]; [`pump`](Self::pump) moves
/// everything that is due.
pub struct SimNetwork {
    net: async_lock::Mutex<Net>,
    clock: ManualClock,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork").finish_non_exhaustive()
    }
}

/// Deliveries to the processor the network keeps in flight at once.
const CONCURRENCY: usize = 64;

fn unavailable(decision: Decision) -> TransportError {
    TransportError::Unavailable(if decision.outage {
        "simulated outage".into()
    } else {
        "simulated network fault".into()
    })
}

fn take_due<T>(queue: &mut Vec<InFlight<T>>, now: Timestamp) -> Vec<InFlight<T>> {
    let (mut due, rest): (Vec<_>, Vec<_>) =
        std::mem::take(queue).into_iter().partition(|f| f.at <= now);
    *queue = rest;
    due.sort_by_key(|f| (f.at, f.seq));
    due
}

impl SimNetwork {
    /// A network with `faults` on each of its legs, deterministic under `seed`
    /// (see [`Faults::fate`]), reading time from `clock`; refused if
    /// [`Faults::validate`] refuses `faults`.
    pub fn new(clock: ManualClock, faults: Faults, seed: u64) -> Result<Self, InvalidFaults> {
        faults.validate()?;
        Ok(Self {
            net: async_lock::Mutex::new(Net {
                consumers: BTreeMap::new(),
                published: BTreeMap::new(),
                to_processor: Vec::new(),
                unacked: BTreeMap::new(),
                unacked_content: BTreeMap::new(),
                resends_asked: 0,
                next_message: 0,
                to_devices: Vec::new(),
                receipts: Vec::new(),
                retries: Vec::new(),
                reported_by: BTreeMap::new(),
                reported: BTreeSet::new(),
                accepted: BTreeSet::new(),
                resent_after_report: 0,
                mislabelled: 0,
                undecryptable: 0,
                late: 0,
                altered_copies: 0,
                asked: BTreeMap::new(),
                recipients: BTreeMap::new(),
                seq: 0,
                faults: Injector::new(faults, seed),
                integrity: Vec::new(),
                billing: Vec::new(),
            }),
            clock,
        })
    }

    /// Add a consumer with `devices` devices (ids 0..devices). With 0,
    /// the consumer has no device: it sends nothing, and the processor
    /// finds no device to send to, as for a number nobody has.
    ///
    /// Adding a number again reinstalls it: new devices, with new keys
    /// and no sessions, and what the old ones received
    /// ([`received`](Self::received), [`contents`](Self::contents)),
    /// reported delivered and asked for again is forgotten (a message is
    /// reported to the processor once every new device has reported it).
    /// The network-wide counts
    /// ([`resent_after_delivery`](Self::resent_after_delivery),
    /// [`mislabelled`](Self::mislabelled),
    /// [`altered_copies`](Self::altered_copies)) keep theirs. A copy still
    /// on its way to an old device reaches the new device with its id,
    /// which cannot decrypt it ([`undecryptable`](Self::undecryptable)).
    pub async fn add_consumer(&self, number: &PhoneNumber, devices: u32) {
        let mut net = self.net.lock().await;
        let net = &mut *net;
        // What the old devices reported, took and asked for, counted or
        // still on its way, is theirs.
        let sent_to = net.recipients.remove(number.expose()).unwrap_or_default();
        let theirs = |b: BusinessId, id: MessageId| sent_to.contains(&(b, id));
        net.reported_by.retain(|&(b, id), _| !theirs(b, id));
        net.accepted.retain(|&(b, id, _)| !theirs(b, id));
        net.asked.retain(|&(b, id, _), _| !theirs(b, id));
        net.receipts.retain(|f| f.item.number != number.expose());
        net.retries.retain(|f| !theirs(f.item.business, f.item.id));
        // The new devices have none of the old ones' messages to send again.
        net.unacked_content
            .retain(|_, w| w.number != number.expose());
        net.consumers.insert(
            number.expose().to_owned(),
            Consumer {
                devices: (0..devices).map(|d| (d, ConsumerDevice::new(d))).collect(),
                received: BTreeMap::new(),
                contents: BTreeMap::new(),
                decrypted: BTreeMap::new(),
            },
        );
    }

    /// Every device of `number` loses its sessions, keeping its keys (see
    /// [`ConsumerDevice::lose_sessions`]). To reinstall instead (new keys),
    /// add the consumer again.
    pub async fn lose_sessions(&self, number: &PhoneNumber) {
        let mut net = self.net.lock().await;
        if let Some(consumer) = net.consumers.get_mut(number.expose()) {
            consumer
                .devices
                .values_mut()
                .for_each(ConsumerDevice::lose_sessions);
            // Their chains went with them; what they had, they still have.
            for decrypted in consumer.decrypted.values_mut() {
                decrypted.chains.clear();
            }
        }
    }

    /// A consumer's device sends `content` to `business`, starting a session
    /// from the business's published keys if it has none. Starting one
    /// takes the next one-time prekey while any is left (see
    /// [`one_time_prekeys_left`](Self::one_time_prekeys_left)); later
    /// messages take none. The message is now in flight to the processor
    /// (one event on [`Leg::Inbound`]).
    pub async fn consumer_sends(
        &self,
        number: &PhoneNumber,
        device: u32,
        business: BusinessId,
        content: &[u8],
    ) -> Result<(), String> {
        let now = self.clock.now();
        let mut net = self.net.lock().await;
        net.write(number, device, business, content, None, now)
            .await
    }

    /// Move everything due, unless the network is in an outage: consumer
    /// messages to the processor (acting as `principal`; one not
    /// acknowledged is delivered again after [`REDELIVERY`]), business
    /// messages to devices (each decrypts, deduplicates by message id and
    /// reports delivery), delivery reports to the processor. What the
    /// processor retries is no part of it: the harness calls
    /// [`Processor::retransmit_due`] (see [the loop](super#driving-the-world)).
    pub async fn pump(&self, processor: &Processor, principal: &Principal) -> PumpReport {
        let now = self.clock.now();
        let mut report = PumpReport::default();
        let inbound = {
            let mut net = self.net.lock().await;
            if net.faults.faults().in_outage(now) {
                report.in_flight = net.in_flight();
                return report;
            }
            let (attempts, mut arrivals): (Vec<_>, Vec<_>) = take_due(&mut net.to_processor, now)
                .into_iter()
                .partition(|f| f.item.hop == Hop::Attempt);
            for flight in attempts {
                let ToProcessor {
                    message,
                    business,
                    inbound,
                    ..
                } = flight.item;
                // Acknowledged since (by a copy that was on its way): nothing to do.
                if let Some(scheduled) = net.unacked.get_mut(&message) {
                    *scheduled = false;
                    net.launch_inbound(message, business, inbound, now);
                }
            }
            arrivals.extend(take_due(&mut net.to_processor, now));
            arrivals.sort_by_key(|f| (f.at, f.seq));
            arrivals
        };
        // Like a real network, many deliveries are in flight at once.
        for chunk in inbound.chunks(CONCURRENCY) {
            let calls = chunk.iter().map(|flight| async move {
                let started = std::time::Instant::now();
                let result = processor
                    .receive(principal, flight.item.business, flight.item.inbound.clone())
                    .await;
                (result, started.elapsed())
            });
            let results = join_all(calls.collect()).await;
            let mut net = self.net.lock().await;
            let net = &mut *net;
            for ((result, took), flight) in results.into_iter().zip(chunk) {
                report.to_processor += 1;
                report.receive_latencies.push(took);
                let acked = result.is_ok();
                let refused = result.as_ref().is_err_and(ProcessorError::is_permanent);
                if let Err(e) = result {
                    report.last_error = Some(e.to_string());
                }
                let heard = flight.item.hop == (Hop::Arrive { reply_lost: false });
                if acked {
                    report.acknowledged += 1;
                }
                if refused {
                    report.refused += 1;
                }
                if heard && (acked || refused) {
                    net.unacked.remove(&flight.item.message);
                    net.unacked_content.remove(&flight.item.message);
                } else {
                    // No acknowledgement reached the network: it delivers again later.
                    net.redeliver(flight.item.clone(), now);
                }
            }
        }
        let outbound = take_due(&mut self.net.lock().await.to_devices, now);
        for flight in outbound {
            let ToDevice {
                business,
                number,
                device,
                message,
                current,
            } = flight.item;
            let mut net = self.net.lock().await;
            let net = &mut *net;
            let Some(consumer) = net.consumers.get_mut(&number) else {
                continue;
            };
            let Some(handset) = consumer.devices.get_mut(&device) else {
                continue;
            };
            let decrypted = consumer.decrypted.entry((device, business)).or_default();
            // Counted once a device is there to take it: a copy to a
            // device id the consumer no longer has (a reinstall with
            // fewer devices) reaches nobody. (One with the id, reinstalled,
            // takes it, and cannot decrypt it: undecryptable.)
            report.to_devices += 1;
            // A copy of a ciphertext it already decrypted, or could not
            // (an injected duplicate), is dropped: Signal refuses it as a
            // duplicate, or as undecryptable, and the device asked for the
            // message once already. Anything else it cannot decrypt it
            // asks for again, as a real client, which cannot read the
            // message's id before decrypting, does.
            let plaintext = match handset.decrypt(business, &message.ciphertext).await {
                Ok(plaintext) => {
                    decrypted.took(&message.ciphertext);
                    plaintext
                }
                // Signal's refusal of a duplicate included: other bytes
                // under a message key used already are a key used twice.
                Err(_) => {
                    let why = decrypted.why(&message.ciphertext, current);
                    decrypted.failed(&message.ciphertext);
                    match why {
                        Undecryptable::Copy => continue,
                        Undecryptable::Late => net.late += 1,
                        Undecryptable::Other => net.undecryptable += 1,
                    }
                    let decision = net.faults.decide(Leg::Receipt, now);
                    for at in Net::arrivals(decision, now) {
                        let retry = Retry {
                            business,
                            id: message.id,
                            device,
                        };
                        Net::push(&mut net.retries, &mut net.seq, at, retry);
                    }
                    continue;
                }
            };
            let Some((id, content)) = parse_device_payload(&plaintext) else {
                continue;
            };
            if id != message.id {
                net.mislabelled += 1;
            }
            let copies = consumer
                .received
                .entry(device)
                .or_default()
                .entry(id)
                .or_insert(0);
            *copies += 1;
            let contents = consumer.contents.entry(device).or_default();
            if *copies == 1 {
                contents.push((business, id, content.to_vec()));
            } else if !contents
                .iter()
                .any(|(b, got, c)| *got == id && *b == business && c == content)
            {
                net.altered_copies += 1;
            }
            // Reported under the id the network carried: it cannot read
            // the one inside.
            let decision = net.faults.decide(Leg::Receipt, now);
            for at in Net::arrivals(decision, now) {
                let receipt = Receipt {
                    business,
                    id: message.id,
                    number: number.clone(),
                    device: Some(device),
                };
                Net::push(&mut net.receipts, &mut net.seq, at, receipt);
            }
        }
        // Reports that complete a message (every device has it) go to the processor.
        let calls: Vec<(BusinessId, MessageId, String)> = {
            let mut net = self.net.lock().await;
            let net = &mut *net;
            let mut calls = Vec::new();
            for flight in take_due(&mut net.receipts, now) {
                let Receipt {
                    business,
                    id,
                    number,
                    device,
                } = flight.item;
                let complete = match device {
                    None => true,
                    Some(device) => {
                        let by = net.reported_by.entry((business, id)).or_default();
                        by.insert(device);
                        net.consumers
                            .get(&number)
                            .is_some_and(|c| c.devices.keys().all(|d| by.contains(d)))
                    }
                };
                if complete {
                    calls.push((business, id, number));
                }
            }
            calls
        };
        for chunk in calls.chunks(CONCURRENCY) {
            let updates = chunk.iter().map(|(business, id, _)| {
                processor.status_update(principal, *business, *id, Status::Delivered)
            });
            let results = join_all(updates.collect()).await;
            let mut net = self.net.lock().await;
            let net = &mut *net;
            for (result, (business, id, number)) in results.into_iter().zip(chunk) {
                report.receipts += 1;
                match result {
                    Ok(_) => {
                        net.reported.insert((*business, *id));
                    }
                    Err(e) if e.is_permanent() => {
                        report.refused += 1;
                        report.last_error = Some(e.to_string());
                    }
                    Err(e) => {
                        report.last_error = Some(e.to_string());
                        let retry = Receipt {
                            business: *business,
                            id: *id,
                            number: number.clone(),
                            device: None,
                        };
                        Net::push(
                            &mut net.receipts,
                            &mut net.seq,
                            now.saturating_add(REDELIVERY),
                            retry,
                        );
                    }
                }
            }
        }
        let retries = {
            let mut net = self.net.lock().await;
            let retries = take_due(&mut net.retries, now);
            // A device has asked while its receipt is with the processor
            // (one lost on the way asked nothing), marked before the call
            // so that the sends answering it are not counted as resends.
            for flight in &retries {
                let Retry {
                    business,
                    id,
                    device,
                } = flight.item;
                net.asked.entry((business, id, device)).or_default().calls += 1;
            }
            retries
        };
        for chunk in retries.chunks(CONCURRENCY) {
            let calls = chunk.iter().map(|flight| {
                let Retry {
                    business,
                    id,
                    device,
                } = flight.item;
                processor.retry_receipt(principal, business, id, device)
            });
            let results = join_all(calls.collect()).await;
            let mut net = self.net.lock().await;
            let net = &mut *net;
            for (result, flight) in results.into_iter().zip(chunk) {
                report.retry_receipts += 1;
                let Retry {
                    business,
                    id,
                    device,
                } = flight.item;
                // The receipt is back from the processor: the device still
                // asks if the processor took it up (its answer not sent
                // yet), or another of its receipts is with it. One refused
                // or ignored asked for nothing it will be sent.
                if let Entry::Occupied(mut asked) = net.asked.entry((business, id, device)) {
                    let mark = asked.get_mut();
                    mark.calls = mark.calls.saturating_sub(1);
                    mark.applied |= matches!(result, Ok(StatusChange::Applied));
                    if mark.calls == 0 && !mark.applied {
                        asked.remove();
                    }
                }
                match result {
                    Ok(_) => {}
                    Err(e) if e.is_permanent() => {
                        report.refused += 1;
                        report.last_error = Some(e.to_string());
                    }
                    Err(e) => {
                        report.last_error = Some(e.to_string());
                        Net::push(
                            &mut net.retries,
                            &mut net.seq,
                            now.saturating_add(REDELIVERY),
                            flight.item,
                        );
                    }
                }
            }
        }
        report.in_flight = self.net.lock().await.in_flight();
        report
    }

    /// Business message ids each device of `number` decrypted, with how
    /// many copies (device id → message id → copies). The id is the one
    /// inside the payload, what the device reads; the network reports
    /// delivery under the one it carried ([`Outgoing::id`]), and counts
    /// copies where the two differ in [`mislabelled`](Self::mislabelled).
    /// Copies beyond the first are the processor's retransmissions (a
    /// device drops them by id, and [`altered_copies`](Self::altered_copies)
    /// counts those that differ from the first); a duplicate the network
    /// made of one ciphertext fails to decrypt and is not counted. Nor is
    /// a retransmission of the very bytes sent before, which the device
    /// cannot tell from such a duplicate: a processor resending stored
    /// ciphertexts (this crate's encrypts each copy afresh) would have its
    /// copies beyond the first counted here as none.
    pub async fn received(&self, number: &PhoneNumber) -> BTreeMap<u32, BTreeMap<MessageId, u32>> {
        let net = self.net.lock().await;
        net.consumers
            .get(number.expose())
            .map(|c| c.received.clone())
            .unwrap_or_default()
    }

    /// The contents a device of `number` received, with the business that
    /// sent each (first copies, in order: later ones that differ are
    /// counted in [`altered_copies`](Self::altered_copies)).
    pub async fn contents(
        &self,
        number: &PhoneNumber,
        device: u32,
    ) -> Vec<(BusinessId, MessageId, Vec<u8>)> {
        let net = self.net.lock().await;
        net.consumers
            .get(number.expose())
            .and_then(|c| c.contents.get(&device).cloned())
            .unwrap_or_default()
    }

    /// Every integrity report the processor exported to the network (one
    /// exported again, its answer lost, is here each time it arrived).
    pub async fn integrity_reports(&self) -> Vec<IntegrityReport> {
        self.net.lock().await.integrity.clone()
    }

    /// Every billing statement the processor exported to the network, each
    /// once (one handed over again under its id is not counted again).
    pub async fn billing_statements(&self) -> Vec<BillingStatement> {
        self.net.lock().await.billing.clone()
    }

    /// One-time prekeys of `business`'s last published keys that no
    /// device has taken yet (0 if it published none). Without one, a
    /// device starts its session from the signed prekey alone, the weaker
    /// path: a harness that starts many sessions publishes again
    /// ([`Processor::publish_keys`]) before they run out.
    pub async fn one_time_prekeys_left(&self, business: BusinessId) -> usize {
        self.net.lock().await.one_time_prekeys_left(business)
    }

    /// One-time prekeys of `business` the network has handed out, each to
    /// the one device that started a session from it.
    pub async fn one_time_prekeys_handed_out(&self, business: BusinessId) -> usize {
        self.net
            .lock()
            .await
            .published
            .get(&business)
            .map_or(0, |(_, handed_out)| handed_out.len())
    }

    /// The device ids of `number`.
    pub async fn devices_of(&self, number: &PhoneNumber) -> Vec<u32> {
        let net = self.net.lock().await;
        net.consumers
            .get(number.expose())
            .map(|c| c.devices.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The identity key of `number`'s `device`, as its owner would confirm
    /// it (the security code) before a business approves it through
    /// [`Processor::trust_new_identity`].
    pub async fn identity(&self, number: &PhoneNumber, device: u32) -> Option<DeviceIdentity> {
        let net = self.net.lock().await;
        let device = net.consumers.get(number.expose())?.devices.get(&device)?;
        Some(device.identity())
    }

    /// Items in flight: consumer messages, ciphertexts, delivery reports and
    /// retry receipts.
    pub async fn in_flight(&self) -> u64 {
        self.net.lock().await.in_flight()
    }

    /// Sends of a message to a device the network had accepted a send of
    /// it for before (whatever sends were refused since), made after the
    /// processor took the message's delivery report (every device had it
    /// by then), unless the device asked for the message again since (a
    /// device that cannot decrypt a copy sends a retry receipt, and a send
    /// made while the processor has the receipt, or after it took it up,
    /// is not counted; one made while it is on its way, after it was lost,
    /// or after the processor refused or ignored it, is). Counted when the call is made,
    /// so a send the network refuses (an outage, `fail`) counts too.
    /// Messages are told apart by the id the send carries
    /// ([`Outgoing::id`]).
    ///
    /// A processor that honours delivery reports makes none: it may still
    /// retry a device every send to which was refused (it never had the
    /// message), or answer a device's retry receipt, but it does not
    /// start another round. The copy an answer to a retry receipt carries
    /// is counted in [`received`](Self::received), however long after the
    /// report it was sent. So with this at zero, a device's copies beyond
    /// the first were sent before the processor knew the message was
    /// delivered, or at the device's request; with no retry receipts
    /// ([`PumpReport::retry_receipts`]), all before.
    pub async fn resent_after_delivery(&self) -> u64 {
        self.net.lock().await.resent_after_report
    }

    /// Copies devices decrypted whose payload names another message id
    /// than the one the network carried them under ([`Outgoing::id`],
    /// which the network reports delivery under): none when the processor
    /// labels every ciphertext with the id of the message inside it.
    pub async fn mislabelled(&self) -> u64 {
        self.net.lock().await.mislabelled
    }

    /// Requests the processor made for a consumer's message again over a
    /// new session ([`Transport::ask_resend`]: no state the processor
    /// holds decrypts it, as when retention ended its session while the
    /// consumer was silent), whether or not the device still had it. A
    /// processor that keeps every session its consumers write on makes
    /// some all the same where the network delays a consumer's message
    /// past five turns of its conversation (Signal keeps the last five
    /// receiving chains: no client decrypts it then), or past the 2,000
    /// counters the library derives keys for; without delays, none.
    pub async fn resends_asked(&self) -> u64 {
        self.net.lock().await.resends_asked
    }

    /// Copies of business messages a device could not decrypt (other than
    /// the network's copies of a ciphertext it had already, decrypted or
    /// not, and those counted [`late`](Self::late)),
    /// each answered with a retry receipt, whether or not the receipt
    /// reached the processor ([`PumpReport::retry_receipts`] counts those
    /// that did): none while the processor and every device keep their
    /// sessions.
    pub async fn undecryptable(&self) -> u64 {
        self.net.lock().await.undecryptable
    }

    /// Copies of business messages that reached a device only after its
    /// conversation with the business turned (a reply each way) past the
    /// chain they were sent on, more often than a Signal client keeps
    /// chains for (`MAX_RECEIVER_CHAINS`, 5), though the chain was among
    /// the last five the business had sent the device on when the network
    /// took the copy: no Signal client can decrypt them, and each is asked
    /// for again with a retry receipt, as for those counted in
    /// [`undecryptable`](Self::undecryptable). A network's delays make
    /// them (a [`Faults`] delay longer than five turns of a conversation).
    /// A copy made on a chain the business had left five times over when
    /// the network took it (a sender's fault) is undecryptable, not late;
    /// so is one whose bytes differ from a message the device decrypted
    /// but that Signal refuses as a duplicate (a message key used twice).
    pub async fn late(&self) -> u64 {
        self.net.lock().await.late
    }

    /// Copies of a message a device decrypted beyond its first (counted in
    /// [`received`](Self::received)) whose content or sending business
    /// differ from the first copy's (in [`contents`](Self::contents)):
    /// none when the processor sends each message again as it first sent
    /// it.
    pub async fn altered_copies(&self) -> u64 {
        self.net.lock().await.altered_copies
    }

    /// The faults met so far, per leg (legs with no events left out).
    pub async fn fault_stats(&self) -> BTreeMap<Leg, LegStats> {
        self.net.lock().await.faults.stats()
    }

    /// Every fault decision so far, in the order made: the schedule a seed
    /// produced for this run's events.
    pub async fn fault_log(&self) -> Vec<Decision> {
        self.net.lock().await.faults.log()
    }
}

#[async_trait]
impl Transport for SimNetwork {
    async fn devices(
        &self,
        _business: BusinessId,
        consumer: &PhoneNumber,
    ) -> Result<Vec<u32>, TransportError> {
        let mut net = self.net.lock().await;
        let decision = net.faults.decide(Leg::Call, self.clock.now());
        if decision.refused() {
            return Err(unavailable(decision));
        }
        Ok(net
            .consumers
            .get(consumer.expose())
            .map(|c| c.devices.keys().copied().collect())
            .unwrap_or_default())
    }

    async fn fetch_bundle(
        &self,
        _business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
    ) -> Result<PreKeyBundle, TransportError> {
        let mut net = self.net.lock().await;
        let decision = net.faults.decide(Leg::Call, self.clock.now());
        if decision.refused() {
            return Err(unavailable(decision));
        }
        let handset = net
            .consumers
            .get_mut(consumer.expose())
            .and_then(|c| c.devices.get_mut(&device))
            .ok_or_else(|| TransportError::Refused("no such device".into()))?;
        Ok(handset.bundle(true))
    }

    /// The device, if it still has the message (the network has not had
    /// it acknowledged), starts a new session from the business's
    /// published keys and sends it again: a new message, in flight to the
    /// processor. A device that has it not ignores the request.
    async fn ask_resend(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        id: MessageId,
        message: &Ciphertext,
    ) -> Result<(), TransportError> {
        let now = self.clock.now();
        let mut net = self.net.lock().await;
        let decision = net.faults.decide(Leg::Call, now);
        if decision.refused() {
            return Err(unavailable(decision));
        }
        net.resends_asked += 1;
        let content = net.unacked_content.values().find(|w| {
            w.business == business
                && w.number == consumer.expose()
                && w.device == device
                && w.ciphertext == message.bytes
        });
        let Some(content) = content.map(|w| w.content.clone()) else {
            return Ok(());
        };
        let written = net
            .write(consumer, device, business, &content, Some(id), now)
            .await;
        // What the device cannot do (the business's keys gone from the
        // network), it does not: as a client, it shows the message unsent.
        let _ = written;
        Ok(())
    }

    async fn send(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        message: &Outgoing,
    ) -> Result<(), TransportError> {
        let now = self.clock.now();
        let mut net = self.net.lock().await;
        let net = &mut *net;
        let key = (business, message.id, device);
        // Counted when the call is made, whatever the network answers.
        if net.accepted.contains(&key)
            && !net.asked.contains_key(&key)
            && net.reported.contains(&(business, message.id))
        {
            net.resent_after_report += 1;
        }
        let decision = net.faults.decide(Leg::Call, now);
        if decision.refused() {
            return Err(unavailable(decision));
        }
        let Some(known) = net.consumers.get_mut(consumer.expose()) else {
            return Err(TransportError::Refused("no such consumer".into()));
        };
        if !known.devices.contains_key(&device) {
            return Err(TransportError::Refused("no such device".into()));
        }
        let decrypted = known.decrypted.entry((device, business)).or_default();
        let current = decrypted.sent(&message.ciphertext);
        net.accepted.insert(key);
        net.asked.remove(&key);
        net.recipients
            .entry(consumer.expose().to_owned())
            .or_default()
            .insert((business, message.id));
        let decision = net.faults.decide(Leg::ToDevice, now);
        for at in Net::arrivals(decision, now) {
            let copy = ToDevice {
                business,
                number: consumer.expose().to_owned(),
                device,
                message: message.clone(),
                current,
            };
            Net::push(&mut net.to_devices, &mut net.seq, at, copy);
        }
        Ok(())
    }

    async fn publish_keys(
        &self,
        business: BusinessId,
        keys: &PublishedKeys,
    ) -> Result<(), TransportError> {
        let mut net = self.net.lock().await;
        let (lands, answer) = net.upload(self.clock.now());
        if lands {
            // The new list replaces the old, but a one-time prekey handed
            // out before (its first message still on its way, say) is not
            // handed out again.
            match net.published.get_mut(&business) {
                Some((published, _)) => *published = keys.clone(),
                None => {
                    net.published
                        .insert(business, (keys.clone(), BTreeSet::new()));
                }
            }
        }
        answer
    }

    async fn one_time_prekey_count(
        &self,
        business: BusinessId,
    ) -> Result<Option<usize>, TransportError> {
        let mut net = self.net.lock().await;
        let decision = net.faults.decide(Leg::Call, self.clock.now());
        if decision.refused() {
            return Err(unavailable(decision));
        }
        Ok(Some(net.one_time_prekeys_left(business)))
    }

    async fn integrity_signals(&self, report: &IntegrityReport) -> Result<(), TransportError> {
        let mut net = self.net.lock().await;
        let (lands, answer) = net.upload(self.clock.now());
        if lands {
            net.integrity.push(report.clone());
        }
        answer
    }

    async fn billing(&self, statement: &BillingStatement) -> Result<(), TransportError> {
        let mut net = self.net.lock().await;
        let (lands, answer) = net.upload(self.clock.now());
        // Billing's system of record: a statement handed over again (its
        // answer lost) counts once.
        if lands && !net.billing.iter().any(|s| s.id == statement.id) {
            net.billing.push(statement.clone());
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{Ciphertext, MessageKind};

    /// A copy a device cannot decrypt is a copy of what it has if it
    /// decrypted those bytes before; late if the device dropped the chain
    /// it was made on (five newer ones taken since), which was among the
    /// last five the business sent it on when the network took the copy;
    /// anything else otherwise: one made on a chain the business had left
    /// five times over when sent (a sender's fault, whatever became of it
    /// on the way), on one the device still keeps, or on one it never took.
    #[tokio::test]
    async fn why_a_copy_does_not_decrypt() {
        // A device in the business's place, and a consumer's.
        let name = BusinessId::new(7).unwrap();
        let mut business = ConsumerDevice::new(1);
        let mut phone = ConsumerDevice::new(0);
        phone
            .start_session(name, &business.bundle(true))
            .await
            .unwrap();
        let first = phone.encrypt(name, b"hi").await.unwrap();
        business.decrypt(name, &first).await.unwrap();
        // Seven turns: the business's messages on a new chain each time
        // (one the device takes, one held back), and the consumer's reply.
        let (mut taken, mut held) = (Vec::new(), Vec::new());
        let mut record = Decrypted::default();
        let mut current = Vec::new();
        for _ in 0..7 {
            let message = business.encrypt(name, b"to you").await.unwrap();
            let back = business.encrypt(name, b"held back").await.unwrap();
            assert!(record.sent(&message));
            phone.decrypt(name, &message).await.unwrap();
            record.took(&message);
            // The held-back one, were it sent now: current.
            current.push(record.sent(&back));
            taken.push(message);
            held.push(back);
            let reply = phone.encrypt(name, b"to you too").await.unwrap();
            business.decrypt(name, &reply).await.unwrap();
        }
        assert!(current.iter().all(|&c| c));
        // Sent now, the first two chains' are five chains behind.
        let now: Vec<bool> = held.iter().map(|m| record.sent(m)).collect();
        assert_eq!(now, [false, false, true, true, true, true, true]);
        let unseen = business.encrypt(name, b"never taken").await.unwrap();
        for (copy, was_current, why) in [
            (&taken[0], true, Undecryptable::Copy),
            (&taken[0], false, Undecryptable::Copy),
            // Dropped by the device (the sixth and seventh chains came).
            (&held[0], true, Undecryptable::Late),
            (&held[1], true, Undecryptable::Late),
            (&held[0], false, Undecryptable::Other),
            // Kept by the device: whatever fails on it is not lateness.
            (&held[2], true, Undecryptable::Other),
            (&unseen, true, Undecryptable::Other),
        ] {
            assert_eq!(record.why(copy, was_current), why);
        }
        // One it could not decrypt before is a copy too.
        record.failed(&held[2]);
        assert_eq!(record.why(&held[2], true), Undecryptable::Copy);
    }

    /// A send to a device the network accepted the message for before is
    /// counted once the processor took the message's report, whatever
    /// sends of it were refused in between. (A refused send reset the
    /// device, so a processor that sent a device the message again after
    /// the report, its copy of an overdue resend having failed, went
    /// uncounted.)
    #[tokio::test]
    async fn a_send_after_the_report_counts_though_one_in_between_was_refused() {
        let t = |secs: u64| Timestamp::from_millis(1_767_225_600_000 + secs * 1000);
        let clock = ManualClock::new(t(0));
        let faults = Faults {
            outages: vec![(t(100), t(200))],
            ..Faults::none()
        };
        let network = SimNetwork::new(clock.clone(), faults, 1).unwrap();
        let number: PhoneNumber = "+447700900001".parse().unwrap();
        network.add_consumer(&number, 1).await;
        let business = BusinessId::new(7).unwrap();
        let message = Outgoing {
            id: MessageId::random(),
            ciphertext: Ciphertext {
                kind: MessageKind::FollowUp,
                bytes: vec![1, 2, 3],
            },
        };
        network.send(business, &number, 0, &message).await.unwrap();
        clock.advance(Duration::from_secs(150));
        assert!(network.send(business, &number, 0, &message).await.is_err());
        clock.advance(Duration::from_secs(100));
        network
            .net
            .lock()
            .await
            .reported
            .insert((business, message.id));
        network.send(business, &number, 0, &message).await.unwrap();
        assert_eq!(network.resent_after_delivery().await, 1);
    }
}
