//! A simulated messaging network: consumers with real Signal devices, a
//! [`Transport`] for the processor, a [`BusinessSink`] for the businesses,
//! and fault injection on both, all deterministic under a seed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::device::ConsumerDevice;
use crate::ids::{BusinessId, MessageId, PhoneNumber};
use crate::integrity::{BillingStatement, IntegrityReport};
use crate::processor::{Inbound, Processor, ProcessorError, parse_device_payload};
use crate::signal::{PreKeyBundle, PublishedKeys};
use crate::store::{FailureReason, Status};
use crate::time::{Clock, ManualClock, Timestamp};
use crate::transport::{
    BusinessSink, InboundMessage, Outgoing, Principal, SinkError, StatusUpdate, Transport,
    TransportError,
};

/// What can go wrong on a link, each with a probability from 0 to 1.
///
/// The network stores and forwards what it accepted: a dropped attempt is
/// retried by the network itself (it costs time, not the message), while a
/// failed call or an outage is refused to the caller, who must retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// A message is lost (the sender is told it went).
    pub drop: f64,
    /// A message arrives twice.
    pub duplicate: f64,
    /// A message is held back by a random delay up to `max_delay`, so later
    /// ones overtake it.
    pub delay: f64,
    /// The longest delay.
    pub max_delay: Duration,
    /// A call fails outright as unavailable.
    pub fail: f64,
    /// Periods during which every call fails as unavailable.
    pub outages: Vec<(Timestamp, Timestamp)>,
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

    /// Add an outage from `start` for `length`.
    pub fn with_outage(mut self, start: Timestamp, length: Duration) -> Self {
        self.outages.push((start, start.saturating_add(length)));
        self
    }

    fn in_outage(&self, now: Timestamp) -> bool {
        self.outages
            .iter()
            .any(|&(from, to)| from <= now && now < to)
    }
}

/// Deterministic fault decisions for one link.
struct Link {
    faults: Faults,
    rng: StdRng,
}

impl Link {
    fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    /// Whether a call fails as unavailable now.
    fn fails(&mut self, now: Timestamp) -> bool {
        let p = self.faults.fail;
        self.faults.in_outage(now) || self.chance(p)
    }

    /// When copies of a message the network accepted now arrive. The network
    /// stores and forwards, as a messaging server does: a dropped attempt is
    /// delivered again after [`REDELIVERY`], never lost.
    fn forwarded(&mut self, now: Timestamp) -> Vec<Timestamp> {
        let mut arrivals = self.arrivals(now);
        if arrivals.is_empty() {
            arrivals.push(now.saturating_add(REDELIVERY));
        }
        arrivals
    }

    /// When copies of a message sent now arrive: none if dropped, two if duplicated.
    fn arrivals(&mut self, now: Timestamp) -> Vec<Timestamp> {
        let (drop, duplicate, delay, max) = (
            self.faults.drop,
            self.faults.duplicate,
            self.faults.delay,
            self.faults.max_delay,
        );
        if self.chance(drop) {
            return Vec::new();
        }
        let copies = if self.chance(duplicate) { 2 } else { 1 };
        (0..copies)
            .map(|_| {
                if self.chance(delay) && !max.is_zero() {
                    let ms = self.rng.random_range(0..=max.as_millis() as u64);
                    now.saturating_add(Duration::from_millis(ms))
                } else {
                    now
                }
            })
            .collect()
    }
}

struct InFlight<T> {
    at: Timestamp,
    seq: u64,
    item: T,
}

struct ToProcessor {
    business: BusinessId,
    inbound: Inbound,
}

struct ToDevice {
    business: BusinessId,
    number: String,
    device: u32,
    message: Outgoing,
}

struct Receipt {
    business: BusinessId,
    id: MessageId,
    status: Status,
}

struct Consumer {
    devices: BTreeMap<u32, ConsumerDevice>,
    /// Per device, each business message id received and how many copies.
    received: BTreeMap<u32, BTreeMap<MessageId, u32>>,
    /// Contents received, per device, first copy only.
    contents: BTreeMap<u32, Vec<(BusinessId, MessageId, Vec<u8>)>>,
}

struct Net {
    consumers: BTreeMap<String, Consumer>,
    published: BTreeMap<BusinessId, (PublishedKeys, usize)>,
    to_processor: Vec<InFlight<ToProcessor>>,
    to_devices: Vec<InFlight<ToDevice>>,
    receipts: Vec<InFlight<Receipt>>,
    seq: u64,
    next_transport_id: u64,
    link: Link,
    integrity: Vec<IntegrityReport>,
    billing: Vec<BillingStatement>,
}

/// What one [`SimNetwork::pump`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PumpReport {
    /// Consumer messages handed to the processor (including duplicates).
    pub to_processor: u64,
    /// Of those, acknowledged by the processor.
    pub acknowledged: u64,
    /// Business messages handed to devices.
    pub to_devices: u64,
    /// Delivery reports handed to the processor.
    pub receipts: u64,
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

/// Drive `futures` concurrently to completion; outputs in order. Needs no
/// runtime (the kit depends on none); polls every unfinished future on each
/// wake-up, so keep batches to tens or hundreds.
pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// How long the network waits before delivering an unacknowledged message again.
const REDELIVERY: Duration = Duration::from_secs(30);

fn unavailable() -> TransportError {
    TransportError::Unavailable("simulated network fault".into())
}

fn take_due<T>(queue: &mut Vec<InFlight<T>>, now: Timestamp) -> Vec<InFlight<T>> {
    let (mut due, rest): (Vec<_>, Vec<_>) =
        std::mem::take(queue).into_iter().partition(|f| f.at <= now);
    *queue = rest;
    due.sort_by_key(|f| (f.at, f.seq));
    due
}

impl SimNetwork {
    /// A network with `faults` on every link, deterministic under `seed`,
    /// reading time from `clock`.
    pub fn new(clock: ManualClock, faults: Faults, seed: u64) -> Self {
        Self {
            net: async_lock::Mutex::new(Net {
                consumers: BTreeMap::new(),
                published: BTreeMap::new(),
                to_processor: Vec::new(),
                to_devices: Vec::new(),
                receipts: Vec::new(),
                seq: 0,
                next_transport_id: 1,
                link: Link::new(faults, seed),
                integrity: Vec::new(),
                billing: Vec::new(),
            }),
            clock,
        }
    }

    /// Add a consumer with `devices` devices (ids 0..devices).
    pub async fn add_consumer(&self, number: &PhoneNumber, devices: u32) {
        let mut net = self.net.lock().await;
        net.consumers.insert(
            number.expose().to_owned(),
            Consumer {
                devices: (0..devices.max(1))
                    .map(|d| (d, ConsumerDevice::new(d)))
                    .collect(),
                received: BTreeMap::new(),
                contents: BTreeMap::new(),
            },
        );
    }

    /// A consumer's device sends `content` to `business`, starting a session
    /// from the business's published keys if it has none. The message is now
    /// in flight to the processor.
    pub async fn consumer_sends(
        &self,
        number: &PhoneNumber,
        device: u32,
        business: BusinessId,
        content: &[u8],
    ) -> Result<(), String> {
        let now = self.clock.now();
        let mut net = self.net.lock().await;
        let net = &mut *net;
        let bundle: PreKeyBundle = {
            let (keys, next) = net
                .published
                .get_mut(&business)
                .ok_or("the business has published no keys")?;
            let index = (*next < keys.one_time_prekeys.len()).then_some(*next);
            *next += 1;
            keys.bundle(index)
        };
        let consumer = net
            .consumers
            .get_mut(number.expose())
            .ok_or("no such consumer")?;
        let handset = consumer.devices.get_mut(&device).ok_or("no such device")?;
        if !handset.has_session(business) {
            handset
                .start_session(business, &bundle)
                .await
                .map_err(|e| e.to_string())?;
        }
        let message = handset
            .encrypt(business, content)
            .await
            .map_err(|e| e.to_string())?;
        let transport_id = net.next_transport_id.to_be_bytes().to_vec();
        net.next_transport_id += 1;
        for at in net.link.forwarded(now) {
            net.seq += 1;
            let seq = net.seq;
            net.to_processor.push(InFlight {
                at,
                seq,
                item: ToProcessor {
                    business,
                    inbound: Inbound {
                        from: number.clone(),
                        device,
                        transport_id: transport_id.clone(),
                        message: message.clone(),
                    },
                },
            });
        }
        Ok(())
    }

    /// Move everything due: consumer messages to the processor (acting as
    /// `principal`; an unacknowledged one stays in flight and is redelivered
    /// later), business messages to devices (each decrypts, deduplicates by
    /// message id and reports delivery), delivery reports to the processor.
    pub async fn pump(&self, processor: &Processor, principal: &Principal) -> PumpReport {
        let now = self.clock.now();
        let mut report = PumpReport::default();
        let (inbound, outbound, receipts) = {
            let mut net = self.net.lock().await;
            (
                take_due(&mut net.to_processor, now),
                take_due(&mut net.to_devices, now),
                take_due(&mut net.receipts, now),
            )
        };
        // Like a real network, many deliveries are in flight at once.
        for chunk in inbound.chunks(CONCURRENCY) {
            let calls = chunk.iter().map(|flight| async move {
                let started = std::time::Instant::now();
                let acked = processor
                    .receive(principal, flight.item.business, flight.item.inbound.clone())
                    .await
                    .is_ok();
                (acked, started.elapsed())
            });
            for ((acked, took), flight) in join_all(calls.collect()).await.into_iter().zip(chunk) {
                report.to_processor += 1;
                report.receive_latencies.push(took);
                if acked {
                    report.acknowledged += 1;
                } else {
                    // Not acknowledged: the network delivers it again later.
                    let mut net = self.net.lock().await;
                    net.seq += 1;
                    let seq = net.seq;
                    net.to_processor.push(InFlight {
                        at: now.saturating_add(REDELIVERY),
                        seq,
                        item: ToProcessor {
                            business: flight.item.business,
                            inbound: flight.item.inbound.clone(),
                        },
                    });
                }
            }
        }
        for flight in outbound {
            report.to_devices += 1;
            let ToDevice {
                business,
                number,
                device,
                message,
            } = flight.item;
            let mut net = self.net.lock().await;
            let net = &mut *net;
            let Some(consumer) = net.consumers.get_mut(&number) else {
                continue;
            };
            let Some(handset) = consumer.devices.get_mut(&device) else {
                continue;
            };
            let Ok(plaintext) = handset.decrypt(business, &message.ciphertext).await else {
                continue;
            };
            let Some((id, content)) = parse_device_payload(&plaintext) else {
                continue;
            };
            let copies = consumer
                .received
                .entry(device)
                .or_default()
                .entry(id)
                .or_insert(0);
            *copies += 1;
            if *copies == 1 {
                consumer
                    .contents
                    .entry(device)
                    .or_default()
                    .push((business, id, content.to_vec()));
            }
            for at in net.link.forwarded(now) {
                net.seq += 1;
                let seq = net.seq;
                net.receipts.push(InFlight {
                    at,
                    seq,
                    item: Receipt {
                        business,
                        id,
                        status: Status::Delivered,
                    },
                });
            }
        }
        for chunk in receipts.chunks(CONCURRENCY) {
            let calls = chunk.iter().map(|flight| {
                let r = &flight.item;
                processor.status_update(principal, r.business, r.id, r.status)
            });
            for (result, flight) in join_all(calls.collect()).await.into_iter().zip(chunk) {
                report.receipts += 1;
                if matches!(result, Ok(_) | Err(ProcessorError::NotFound)) {
                    continue;
                }
                let mut net = self.net.lock().await;
                net.seq += 1;
                let seq = net.seq;
                let r = &flight.item;
                net.receipts.push(InFlight {
                    at: now.saturating_add(REDELIVERY),
                    seq,
                    item: Receipt {
                        business: r.business,
                        id: r.id,
                        status: r.status,
                    },
                });
            }
        }
        let net = self.net.lock().await;
        report.in_flight =
            (net.to_processor.len() + net.to_devices.len() + net.receipts.len()) as u64;
        report
    }

    /// Business message ids each device of `number` received, with how many
    /// copies arrived (device id → message id → copies).
    pub async fn received(&self, number: &PhoneNumber) -> BTreeMap<u32, BTreeMap<MessageId, u32>> {
        let net = self.net.lock().await;
        net.consumers
            .get(number.expose())
            .map(|c| c.received.clone())
            .unwrap_or_default()
    }

    /// The contents a device of `number` received (first copies, in order).
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

    /// Every integrity report the processor exported to the network.
    pub async fn integrity_reports(&self) -> Vec<IntegrityReport> {
        self.net.lock().await.integrity.clone()
    }

    /// Every billing statement the processor exported to the network.
    pub async fn billing_statements(&self) -> Vec<BillingStatement> {
        self.net.lock().await.billing.clone()
    }

    /// The device ids of `number`.
    pub async fn devices_of(&self, number: &PhoneNumber) -> Vec<u32> {
        let net = self.net.lock().await;
        net.consumers
            .get(number.expose())
            .map(|c| c.devices.keys().copied().collect())
            .unwrap_or_default()
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
        if net.link.fails(self.clock.now()) {
            return Err(unavailable());
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
        if net.link.fails(self.clock.now()) {
            return Err(unavailable());
        }
        let handset = net
            .consumers
            .get_mut(consumer.expose())
            .and_then(|c| c.devices.get_mut(&device))
            .ok_or_else(|| TransportError::Refused("no such device".into()))?;
        Ok(handset.bundle(true))
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
        if net.link.fails(now) {
            return Err(unavailable());
        }
        if !net.consumers.contains_key(consumer.expose()) {
            return Err(TransportError::Refused("no such consumer".into()));
        }
        for at in net.link.forwarded(now) {
            net.seq += 1;
            let seq = net.seq;
            net.to_devices.push(InFlight {
                at,
                seq,
                item: ToDevice {
                    business,
                    number: consumer.expose().to_owned(),
                    device,
                    message: message.clone(),
                },
            });
        }
        Ok(())
    }

    async fn publish_keys(
        &self,
        business: BusinessId,
        keys: &PublishedKeys,
    ) -> Result<(), TransportError> {
        // Fresh keys: consumers take one-time prekeys from the new list.
        self.net
            .lock()
            .await
            .published
            .insert(business, (keys.clone(), 0));
        Ok(())
    }

    async fn integrity_signals(&self, report: &IntegrityReport) -> Result<(), TransportError> {
        self.net.lock().await.integrity.push(report.clone());
        Ok(())
    }

    async fn billing(&self, statement: &BillingStatement) -> Result<(), TransportError> {
        self.net.lock().await.billing.push(statement.clone());
        Ok(())
    }
}

/// What a simulated business received.
#[derive(Debug, Default)]
struct Inbox {
    /// Inbound message id → copies handed over.
    messages: BTreeMap<MessageId, u32>,
    /// Contents, first copy of each, in arrival order.
    contents: Vec<(BusinessId, MessageId, Vec<u8>)>,
    /// Statuses per outbound message, in arrival order.
    statuses: BTreeMap<MessageId, Vec<(Status, Option<FailureReason>)>>,
}

/// The businesses' endpoint: records what it is handed, with faults.
pub struct SimBusiness {
    inbox: Mutex<Inbox>,
    link: Mutex<Link>,
    clock: ManualClock,
}

impl std::fmt::Debug for SimBusiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBusiness").finish_non_exhaustive()
    }
}

impl SimBusiness {
    /// An endpoint failing with `faults.fail` probability and during
    /// `faults.outages`, deterministic under `seed`.
    pub fn new(clock: ManualClock, faults: Faults, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            inbox: Mutex::new(Inbox::default()),
            link: Mutex::new(Link::new(faults, seed)),
            clock,
        })
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fails(&self) -> bool {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fails(self.clock.now())
    }

    /// Inbound message ids handed over, with how many copies.
    pub fn messages(&self) -> BTreeMap<MessageId, u32> {
        self.inbox().messages.clone()
    }

    /// Contents handed over (first copies, in order).
    pub fn contents(&self) -> Vec<(BusinessId, MessageId, Vec<u8>)> {
        self.inbox().contents.clone()
    }

    /// Statuses reported per message.
    pub fn statuses(&self) -> BTreeMap<MessageId, Vec<(Status, Option<FailureReason>)>> {
        self.inbox().statuses.clone()
    }
}

#[async_trait]
impl BusinessSink for SimBusiness {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        if self.fails() {
            return Err(SinkError("simulated outage".into()));
        }
        let mut inbox = self.inbox();
        let copies = inbox.messages.entry(message.id).or_insert(0);
        *copies += 1;
        if *copies == 1 {
            inbox
                .contents
                .push((message.business, message.id, message.content.clone()));
        }
        Ok(())
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        if self.fails() {
            return Err(SinkError("simulated outage".into()));
        }
        self.inbox()
            .statuses
            .entry(update.id)
            .or_default()
            .push((update.status, update.failure));
        Ok(())
    }
}
