//! The main job: a gateway built on the processor, run against a simulated
//! network with faults on.
//!
//! A few businesses and thousands of consumers (each with one to three
//! devices, each device a real Signal client) exchange messages both ways
//! through the processor; the network loses, duplicates, delays and refuses
//! messages and has an outage, and so does the businesses' endpoint. The
//! run prints throughput and latency percentiles, then moves the clock past
//! retention, sweeps, and shows that nothing is readable and no phone number
//! remains, and ends with a summary of the audit trail.
//!
//! It exits non-zero, saying which, if a promise was broken: a consumer
//! message not handed to its business exactly once or handed over under
//! another sender or with other content, a business message missing on a
//! device, altered on any copy there, carried under another id than its
//! own, or sent again after it was reported delivered, a message without a final
//! delivered status or not billed exactly once, a release in the audit
//! trail the visibility policy forbids (or a handover without its
//! releases), or, after the sweep, any
//! message, consumer or Signal record left in the store, any sealed copy
//! still readable (or refused for any reason but its destroyed epoch key),
//! any consumer's phone hash or message's sealed bytes left in the store's
//! files, any phone number in clear there. Before the sweep it shows the
//! copies open and the scan finds the hashes and sealed bytes, so that
//! their absence afterwards is retention's doing.
//!
//! ```sh
//! cargo run --release --example gateway -- --help
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::processor::{
    DeliveryConfig, Host, MAX_RECEIPT_WAIT, Outbound, Policies, Processor, ProcessorError,
};
use custodian::store::{
    FailureReason, MemoryStore, MessageRecord, SqliteConfig, SqliteStore, Status, Storage,
};
use custodian::testing::{Cause, Copies, Faults, Leg, LegStats, SimBusiness, SimNetwork, join_all};
use custodian::time::{Clock, ManualClock, SystemClock, Timestamp};
use custodian::transport::{Principal, StaticAuthorizer, TransportError};
use custodian::vault::{OpenError, Vault};
use custodian::visibility::{
    DataClass, MemoryAuditSink, Party, Purpose, Verdict, VisibilityPolicy,
};

struct Options {
    businesses: u64,
    consumers: usize,
    messages: usize,
    faults: String,
    store: Option<PathBuf>,
    root_key: Option<PathBuf>,
    memory: bool,
    seed: u64,
}

const USAGE: &str = "usage: gateway [--businesses N] [--consumers N] [--messages N]
               [--faults none|moderate|heavy] [--seed N]
               [--store PATH [--root-key FILE] | --memory]

  --businesses N    businesses (default 3; at most 10000, and no more than
                    --consumers: each business needs a consumer to write to)
  --consumers N     consumers, each with 1-3 devices (default 2000; at most
                    100000)
  --messages N      messages each consumer sends, and each receives (default 2;
                    --consumers times --messages at most 1000000)
  --faults KIND     network and business-endpoint faults (default moderate):
                      none      no faults
                      moderate  5% lost, 5% duplicated, 20% delayed up to 60 s,
                                5% of calls refused, and a 5-minute outage,
                                on the network and on the businesses' endpoint
                      heavy     20% lost, 20% duplicated, 50% delayed, 20% (network)
                                and 30% (businesses) of calls refused, the outages
  --seed N          seed of the fault schedule (default 7)
  --store PATH      the SQLite store file (default: a file in a temporary
                    directory, removed at exit). The store's keys are wrapped
                    under the root key: to open an existing file again, pass
                    the --root-key of the run that made it.
  --root-key FILE   the 32-byte root key; created (mode 0600) if missing
                    (default: a fresh key, forgotten at exit)
  --memory          keep everything in memory instead of SQLite
  -h, --help        this text";

/// The most businesses a run takes (`--businesses`).
const MAX_BUSINESSES: u64 = 10_000;

/// The most messages a run sends each way (`--consumers` × `--messages`).
const MAX_MESSAGES: usize = 1_000_000;

/// The fault levels `--faults` takes (see [`faults`]).
const FAULT_LEVELS: [&str; 3] = ["none", "moderate", "heavy"];

/// Business `n` (from 1) of the run is `BusinessId` `FIRST_BUSINESS + n`.
const FIRST_BUSINESS: u64 = 1000;

enum Parsed {
    Run(Options),
    Help,
}

/// The options in `args` (the program's name left out).
fn options(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut o = Options {
        businesses: 3,
        consumers: 2000,
        messages: 2,
        faults: "moderate".into(),
        store: None,
        root_key: None,
        memory: false,
        seed: 7,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--businesses" => {
                o.businesses = value()?.parse().map_err(|e| format!("--businesses: {e}"))?
            }
            "--consumers" => {
                o.consumers = value()?.parse().map_err(|e| format!("--consumers: {e}"))?
            }
            "--messages" => {
                o.messages = value()?.parse().map_err(|e| format!("--messages: {e}"))?
            }
            "--faults" => {
                o.faults = value()?;
                if !FAULT_LEVELS.contains(&o.faults.as_str()) {
                    return Err(format!(
                        "--faults: unknown level {} (one of {})",
                        o.faults,
                        FAULT_LEVELS.join(", ")
                    ));
                }
            }
            "--store" => o.store = Some(PathBuf::from(value()?)),
            "--root-key" => o.root_key = Some(PathBuf::from(value()?)),
            "--memory" => o.memory = true,
            "--seed" => o.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--help" | "-h" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.businesses == 0 || o.consumers == 0 || o.messages == 0 {
        return Err("need at least one business, one consumer and one message".into());
    }
    if o.consumers > 100_000 {
        return Err("--consumers: at most 100000 (numbers come from one range)".into());
    }
    if o.consumers
        .checked_mul(o.messages)
        .is_none_or(|n| n > MAX_MESSAGES)
    {
        return Err(format!(
            "--consumers times --messages: at most {MAX_MESSAGES} (messages each way)"
        ));
    }
    if o.businesses > MAX_BUSINESSES {
        return Err(format!(
            "--businesses: at most {MAX_BUSINESSES} (each publishes its keys before any traffic)"
        ));
    }
    if o.businesses > o.consumers as u64 {
        return Err(format!(
            "--businesses: at most --consumers ({}): a business with no consumer gets no traffic",
            o.consumers
        ));
    }
    if o.memory && o.store.is_some() {
        return Err("--store and --memory exclude each other".into());
    }
    if o.root_key.is_some() && o.store.is_none() {
        return Err("--root-key needs --store: it keeps the key of a store that is kept".into());
    }
    Ok(Parsed::Run(o))
}

fn faults(kind: &str, start: Timestamp) -> Result<(Faults, Faults), String> {
    // The network is down from 2 to 7 minutes in; the businesses' endpoint
    // from 30 s to 5.5 minutes in, while retries and statuses are due.
    let network_outage = |f: Faults| {
        f.with_outage(
            start.saturating_add(Duration::from_secs(120)),
            Duration::from_secs(300),
        )
    };
    let sink_outage = |f: Faults| {
        f.with_outage(
            start.saturating_add(Duration::from_secs(30)),
            Duration::from_secs(300),
        )
    };
    let heavy = Faults {
        drop: 0.2,
        duplicate: 0.2,
        delay: 0.5,
        fail: 0.2,
        ..Faults::moderate()
    };
    Ok(match kind {
        "none" => (Faults::none(), Faults::none()),
        "moderate" => (
            network_outage(Faults::moderate()),
            sink_outage(Faults::moderate()),
        ),
        "heavy" => (
            network_outage(heavy.clone()),
            sink_outage(Faults { fail: 0.3, ..heavy }),
        ),
        other => return Err(format!("unknown fault level {other}")),
    })
}

/// The root key from `path`, created (readable by its owner only) if missing.
fn root_key(path: &Path) -> Result<SecretKey, String> {
    let shown = path.display();
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = zeroize::Zeroizing::new(bytes);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .map_err(|e| format!("{shown}: {e}"))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    eprintln!("warning: {shown} is readable by others (mode {mode:o})");
                }
            }
            SecretKey::from_slice(&bytes).ok_or_else(|| {
                format!(
                    "{shown}: a root key file holds exactly {} bytes",
                    SecretKey::LEN
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            let key = SecretKey::generate();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(path).map_err(|e| format!("{shown}: {e}"))?;
            file.write_all(key.expose_secret())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("{shown}: {e}"))?;
            println!("created root key {shown}");
            Ok(key)
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// What consumers wrote, and the Signal sessions they started doing so.
#[derive(Default)]
struct Writes {
    /// Each message, with the business it was written to, and who wrote it
    /// (consumer, device).
    messages: BTreeMap<(BusinessId, Vec<u8>), (usize, u32)>,
    /// (consumer, device, business) with a session: the device wrote to
    /// the business, or decrypted a message from it.
    sessions: BTreeSet<(usize, u32, BusinessId)>,
    /// Sessions the consumers' devices started (their first contacts).
    started: usize,
}

impl Writes {
    /// Consumer `i`'s `device` writes `text` to `b`.
    async fn write(
        &mut self,
        network: &SimNetwork,
        i: usize,
        device: u32,
        b: BusinessId,
        text: String,
    ) -> Result<(), String> {
        if self.sessions.insert((i, device, b)) {
            let heard = network.contents(&number(i), device).await;
            if !heard.iter().any(|(from, _, _)| *from == b) {
                self.started += 1;
            }
        }
        network
            .consumer_sends(&number(i), device, b, text.as_bytes())
            .await?;
        self.messages.insert((b, text.into_bytes()), (i, device));
        Ok(())
    }
}

/// Latency samples of the processor's calls (see the traffic loop).
#[derive(Default)]
struct Latencies {
    /// Calls made with nothing else in flight.
    receive_alone: Vec<Duration>,
    send_alone: Vec<Duration>,
    /// Calls made with others at once on this thread.
    receive_loaded: Vec<Duration>,
    send_loaded: Vec<Duration>,
}

impl Latencies {
    fn receives(&self) -> usize {
        self.receive_alone.len() + self.receive_loaded.len()
    }

    fn report(self, batch: usize, alone_every: usize) {
        let line = |name: &str, mut samples: Vec<Duration>| {
            samples.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "  {name:<18} n={:<6} p50 {:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms   max {:>8.3} ms",
                samples.len(),
                ms(percentile(&samples, 0.50)),
                ms(percentile(&samples, 0.90)),
                ms(percentile(&samples, 0.99)),
                ms(samples.last().copied().unwrap_or_default()),
            );
        };
        println!(
            "latency of one processor call with nothing else in flight \
             (every {alone_every}th batch of consumers, driven one at a time):"
        );
        line("receive (inbound)", self.receive_alone);
        line("send (outbound)", self.send_alone);
        println!(
            "latency under load, up to {batch} calls at once on this one thread \
             (each figure includes the other calls' work):"
        );
        line("receive (inbound)", self.receive_loaded);
        line("send (outbound)", self.send_loaded);
    }
}

fn report_faults(name: &str, stats: &BTreeMap<Leg, LegStats>) {
    let describe = |leg: Leg, s: &LegStats| match leg {
        Leg::Call => format!(
            "{} calls to the network: {} refused ({} in the outage)",
            s.events,
            s.failed + s.outage,
            s.outage
        ),
        Leg::Upload => format!(
            "{} key publications and exports: {} refused ({} in the outage), {} lost ({} of them only the answer)",
            s.events,
            s.failed + s.outage,
            s.outage,
            s.dropped,
            s.replies_lost
        ),
        Leg::Inbound => format!(
            "{} deliveries to the processor: {} lost ({} of them only the ack), {} duplicated, {} late",
            s.events, s.dropped, s.replies_lost, s.duplicated, s.delayed
        ),
        Leg::ToDevice => format!(
            "{} ciphertexts to devices: {} lost, {} duplicated, {} late",
            s.events, s.dropped, s.duplicated, s.delayed
        ),
        Leg::Receipt => format!(
            "{} device delivery reports and retry receipts: {} lost, {} duplicated, {} late",
            s.events, s.dropped, s.duplicated, s.delayed
        ),
        Leg::Deliver | Leg::Status => format!(
            "{} {}: {} refused ({} in the outage), {} timed out ({} after the business took it), {} duplicated, {} late",
            s.events,
            if leg == Leg::Deliver {
                "messages handed to businesses"
            } else {
                "statuses reported to businesses"
            },
            s.failed + s.outage,
            s.outage,
            s.dropped,
            s.replies_lost,
            s.duplicated,
            s.delayed
        ),
    };
    for (leg, s) in stats {
        println!("  {name:<9} {}", describe(*leg, s));
    }
}

/// What the withheld-content control saw: for how long, the decisions
/// the policy denied, and the calls to a business endpoint meanwhile.
struct Control {
    window: Duration,
    denied: usize,
    handovers: u64,
    /// Retry receipts the processor took meanwhile.
    retry_receipts: u64,
    /// Consumer messages the network handed the processor meanwhile.
    receives: u64,
}

/// The control run between the traffic and the drain: the operator puts
/// in force a policy withholding message content from businesses, consumer
/// 0 writes to `b` (recorded in `writes`), and the network and the
/// retransmission loop run `step` at a time until the policy has denied a
/// release (of that message, or of one due meanwhile; at most 180 steps,
/// as the network may lose the message again and again); then the
/// published table is back in force.
#[allow(clippy::too_many_arguments)]
async fn withheld_control(
    processor: &Processor,
    network: &SimNetwork,
    transport: &Principal,
    operator: &Principal,
    sink: &SimBusiness,
    audit: &MemoryAuditSink,
    clock: &ManualClock,
    writes: &mut Writes,
    b: BusinessId,
    step: Duration,
) -> Result<Control, Box<dyn std::error::Error>> {
    let published = VisibilityPolicy::default();
    let withheld = published
        .to_builder(1)?
        .deny(
            Party::Business,
            DataClass::MessageContent,
            Purpose::Delivery,
        )
        .build();
    processor.set_visibility_policy(operator, withheld)?;
    let (decisions, calls) = (audit.events().len(), sink.fault_stats());
    let text = "consumer 0, while content is withheld: where is my order?".to_owned();
    writes.write(network, 0, 0, b, text).await?;
    let (mut window, mut denied, mut retry_receipts, mut receives) = (Duration::ZERO, 0, 0, 0);
    while denied == 0 && window < 180 * step {
        let pumped = network.pump(processor, transport).await;
        retry_receipts += pumped.retry_receipts;
        receives += pumped.to_processor;
        processor.retransmit_due(operator).await?;
        clock.advance(step);
        window += step;
        denied = audit.events()[decisions..]
            .iter()
            .filter(|e| !e.is_allowed())
            .count();
    }
    processor.set_visibility_policy(operator, published.to_builder(2)?.build())?;
    let deliver =
        |stats: &BTreeMap<Leg, LegStats>| stats.get(&Leg::Deliver).map_or(0, |s| s.events);
    Ok(Control {
        window,
        denied,
        handovers: deliver(&sink.fault_stats()) - deliver(&calls),
        retry_receipts,
        receives,
    })
}

/// Per outbound message, the last settled status (delivered, read or
/// failed) the business took with the processor told so.
fn final_statuses(sink: &SimBusiness) -> BTreeMap<MessageId, (Status, Option<FailureReason>)> {
    let mut told: BTreeMap<MessageId, (u64, Status, Option<FailureReason>)> = BTreeMap::new();
    for copy in sink.status_log() {
        let settled = matches!(
            copy.status,
            Status::Delivered | Status::Read | Status::Failed
        );
        if copy.cause == Cause::Handed
            && settled
            && told.get(&copy.id).is_none_or(|(at, ..)| *at < copy.told)
        {
            told.insert(copy.id, (copy.told, copy.status, copy.failure));
        }
    }
    told.into_iter()
        .map(|(id, (_, status, failure))| (id, (status, failure)))
        .collect()
}

/// The messages whose statuses, in the order the processor told them
/// (whatever delays made of the order they showed in), went back: one
/// below another told before it, or a failure after a delivery.
fn statuses_gone_back(sink: &SimBusiness) -> usize {
    let mut log = sink.status_log();
    log.retain(|copy| copy.cause != Cause::Injected);
    log.sort_by_key(|copy| copy.told);
    let mut furthest: BTreeMap<MessageId, Status> = BTreeMap::new();
    let mut back = BTreeSet::new();
    for copy in log {
        let before = furthest.entry(copy.id).or_insert(copy.status);
        let delivered = matches!(*before, Status::Delivered | Status::Read);
        if copy.status < *before || (copy.status == Status::Failed && delivered) {
            back.insert(copy.id);
        }
        *before = (*before).max(copy.status);
    }
    back.len()
}

/// What business `b` writes to consumer `i` in `round`.
fn update(b: BusinessId, i: usize, round: usize) -> Vec<u8> {
    format!("business {b} to consumer {i}, update {round}: shipped").into_bytes()
}

/// Device copies of business messages, among those each consumer's
/// devices decrypted (`received`, by consumer, then device, then id), that
/// were not sent to that consumer (`sent`: business, id, consumer, round).
fn misdelivered(
    sent: &[(BusinessId, MessageId, usize, usize)],
    received: &BTreeMap<usize, BTreeMap<u32, BTreeMap<MessageId, u32>>>,
) -> usize {
    let mut sent_to: BTreeMap<usize, BTreeSet<MessageId>> = BTreeMap::new();
    for &(_, id, i, _) in sent {
        sent_to.entry(i).or_default().insert(id);
    }
    received
        .iter()
        .flat_map(|(i, devices)| devices.values().map(move |ids| (i, ids)))
        .map(|(i, ids)| {
            let theirs = sent_to.get(i);
            ids.keys()
                .filter(|id| !theirs.is_some_and(|t| t.contains(id)))
                .count()
        })
        .sum()
}

fn number(i: usize) -> PhoneNumber {
    // Valid E.164: a UK mobile range reserved for drama, plenty of room.
    format!("+4477009{i:05}")
        .parse()
        .unwrap_or_else(|_| unreachable!("well-formed number"))
}

/// The releases the run's flows make, as the published table allows them
/// (README, "Visibility"): a consumer's message and number handed to its
/// business, numbers to the network for sending and retransmission, and
/// bills to the network.
const RELEASES: [(DataClass, Party, Purpose); 5] = [
    (
        DataClass::MessageContent,
        Party::Business,
        Purpose::Delivery,
    ),
    (
        DataClass::ConsumerPhoneNumber,
        Party::Business,
        Purpose::Delivery,
    ),
    (
        DataClass::ConsumerPhoneNumber,
        Party::Transport,
        Purpose::Delivery,
    ),
    (
        DataClass::ConsumerPhoneNumber,
        Party::Transport,
        Purpose::Retransmission,
    ),
    (DataClass::Billing, Party::Transport, Purpose::Billing),
];

/// The digits every simulated number starts with, as they would appear in
/// clear in a file.
const NUMBER_PREFIX: &[u8] = b"4477009";

/// What retention has to remove from the store's files, as stored: each
/// consumer's keyed phone hash (per business: what messages, Signal
/// records and the phone index are keyed by) and, for each stored message,
/// the last 16 bytes of its sealed envelope (its authentication tag).
struct Traces {
    /// Pattern → (is a phone hash, its index among those of its kind).
    patterns: foldhash::HashMap<u128, (bool, usize)>,
    phones: usize,
    sealed: usize,
}

impl Traces {
    const LEN: usize = 16;

    fn new(records: &[MessageRecord]) -> Self {
        let mut patterns = foldhash::HashMap::default();
        let mut phones = 0;
        for record in records {
            let key = u128::from_le_bytes(*record.phone.as_bytes());
            patterns.entry(key).or_insert_with(|| {
                phones += 1;
                (true, phones - 1)
            });
        }
        let mut sealed = 0;
        for record in records {
            let Some(tail) = record.sealed.last_chunk::<{ Self::LEN }>() else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) =
                patterns.entry(u128::from_le_bytes(*tail))
            {
                e.insert((false, sealed));
                sealed += 1;
            }
        }
        Self {
            patterns,
            phones,
            sealed,
        }
    }
}

/// What a scan of the store's files found.
#[derive(Default)]
struct FileScan {
    bytes: u64,
    /// Simulated numbers in clear (never stored so: a leak guard).
    numbers_in_clear: usize,
    /// Occurrences of phone hashes, and how many distinct ones.
    phone_hits: usize,
    phones_found: usize,
    /// Occurrences of sealed-envelope tails, and of how many messages.
    sealed_hits: usize,
    sealed_found: usize,
}

/// Scan the files of the SQLite store at `path` (the database, its log
/// and shared memory) for simulated numbers in clear and for `traces`.
fn scan_store_files(path: &Path, traces: &Traces) -> Result<FileScan, std::io::Error> {
    let mut scan = FileScan::default();
    let mut phones = vec![false; traces.phones];
    let mut sealed = vec![false; traces.sealed];
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let data = match std::fs::read(&file) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        scan.bytes += data.len() as u64;
        scan.numbers_in_clear += data
            .windows(NUMBER_PREFIX.len())
            .filter(|w| *w == NUMBER_PREFIX)
            .count();
        for window in data.array_windows::<{ Traces::LEN }>() {
            match traces.patterns.get(&u128::from_le_bytes(*window)) {
                Some(&(true, i)) => {
                    scan.phone_hits += 1;
                    phones[i] = true;
                }
                Some(&(false, i)) => {
                    scan.sealed_hits += 1;
                    sealed[i] = true;
                }
                None => {}
            }
        }
    }
    scan.phones_found = phones.iter().filter(|&&f| f).count();
    scan.sealed_found = sealed.iter().filter(|&&f| f).count();
    Ok(scan)
}

/// Keep every business's Signal prekeys stocked and published, as a
/// host's maintenance timer would (`publish_keys` refills the one-time
/// pool below its low-water mark, rotates the signed prekey when due).
/// The network refuses or loses a publication now and then, as any call:
/// the timer publishes again at its next tick, so that is counted (the
/// return value), not fatal.
async fn maintain_keys(
    processor: &Processor,
    owners: &BTreeMap<BusinessId, Principal>,
) -> Result<usize, String> {
    let mut failed = 0;
    for (&b, owner) in owners {
        match processor.publish_keys(owner, b).await {
            Ok(()) => {}
            // Unavailable (refused now, or lost): the next tick tries
            // again. Refused for good is a broken run.
            Err(ProcessorError::Transport(TransportError::Unavailable(_))) => failed += 1,
            Err(e) => return Err(format!("publishing the keys of business {b}: {e}")),
        }
    }
    Ok(failed)
}

/// How many times billing is exported before the run gives up: the network
/// refuses or loses some calls.
const EXPORT_TRIES: usize = 100;

/// How many times a business's first publication is tried before the run
/// gives up: the network refuses or loses some calls, and a host starting
/// up tries again until its keys are out.
const FIRST_PUBLICATION_TRIES: usize = 100;

/// Consumer messages handed over again after the business took them, and
/// how many times in all: every repeat handover counts, whatever became
/// of it (taken, refused, lost), not only those the business took.
fn handed_again(copies: &BTreeMap<MessageId, Copies>) -> (usize, u32) {
    let again = copies.values().filter(|c| c.after_taken > 0).count();
    (again, copies.values().map(|c| c.after_taken).sum())
}

/// What refused to open a sealed copy, in a word.
fn open_error_kind(e: &OpenError) -> &'static str {
    match e {
        OpenError::Malformed(_) => "malformed",
        OpenError::WrongBusiness => "another business's",
        OpenError::Expired { .. } => "expired",
        OpenError::EpochDestroyed => "epoch key destroyed",
        OpenError::UnknownEpoch => "no key for its epoch",
        OpenError::Decrypt => "did not decrypt",
        OpenError::Key(_) => "key hierarchy failed",
        _ => "another error",
    }
}

// One worker beside this thread: the run is driven here (it spawns
// nothing), and the listener for signals on the worker, as the run over
// memory may not yield for seconds.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let options = match options(std::env::args().skip(1)) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // The temporary store, removed when the run ends, whether it succeeded
    // or not, or is interrupted.
    let temporary = if options.memory || options.store.is_some() {
        None
    } else {
        match tempfile::Builder::new()
            .prefix("custodian-gateway-")
            .tempdir()
        {
            Ok(dir) => Some(dir),
            Err(e) => {
                eprintln!("gateway failed: a temporary directory: {e}");
                std::process::exit(1);
            }
        }
    };
    // Listening before the run starts: a signal would otherwise end the
    // process and leave the store.
    let interrupted = interrupted();
    let removing = temporary.as_ref().map(|dir| dir.path().to_path_buf());
    tokio::spawn(async move {
        let (signal, code) = interrupted.await;
        let removed = match removing {
            Some(dir) => {
                _ = std::fs::remove_dir_all(dir);
                ": its temporary store is removed"
            }
            None => "",
        };
        eprintln!("gateway interrupted ({signal}){removed}");
        std::process::exit(code);
    });
    let ran = run(options, temporary.as_ref().map(|dir| dir.path())).await;
    drop(temporary);
    if let Err(e) = ran {
        eprintln!("gateway failed: {e}");
        std::process::exit(1);
    }
}

/// Listen, from now on, for an interrupt (Ctrl-C) or, on Unix, a
/// termination request: the future gives the signal's name, and the exit
/// code a shell gives it. It waits for ever for one it cannot listen for.
fn interrupted() -> impl Future<Output = (&'static str, i32)> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let recv = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = recv(interrupt.ok()) => ("SIGINT", 130),
                _ = recv(terminate.ok()) => ("SIGTERM", 143),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => ("SIGINT", 130),
            Err(_) => std::future::pending().await,
        }
    }
}

/// Run the gateway as `o` says, its store in the directory `temporary` if
/// it keeps none.
async fn run(o: Options, temporary: Option<&Path>) -> Result<(), Box<dyn std::error::Error>> {
    let start = SystemClock.now();
    let clock = ManualClock::new(start);
    let (network_faults, sink_faults) = faults(&o.faults, start)?;
    let root = match &o.root_key {
        Some(path) => root_key(path)?,
        None => SecretKey::generate(),
    };
    let path = match (&o.store, temporary) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(dir)) => Some(dir.join("store.db")),
        (None, None) => None,
    };
    if let (Some(path), None) = (&o.store, &o.root_key)
        && std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
    {
        return Err(format!(
            "{} exists, and its keys are wrapped under the root key of the run that made it: \
             pass that run's --root-key FILE, or remove the file",
            path.display()
        )
        .into());
    }
    let (storage, store_name): (Arc<dyn Storage>, String) = match &path {
        Some(path) => {
            let store = SqliteStore::open(path, SqliteConfig::default())?;
            let name = if temporary.is_some() {
                format!("SQLite at {} (temporary)", path.display())
            } else {
                format!("SQLite at {}", path.display())
            };
            (Arc::new(store), name)
        }
        None => (Arc::new(MemoryStore::new()), "memory".into()),
    };
    let network = Arc::new(SimNetwork::new(clock.clone(), network_faults, o.seed)?);
    let sink = SimBusiness::new(clock.clone(), sink_faults, o.seed.wrapping_add(1))?;
    let audit = Arc::new(MemoryAuditSink::new());
    let transport = Principal::new("transport");
    let operator = Principal::new("operator");
    let businesses = (1..=o.businesses)
        .map(|b| {
            FIRST_BUSINESS
                .checked_add(b)
                .and_then(BusinessId::new)
                .ok_or_else(|| format!("business {b} has no id"))
        })
        .collect::<Result<Vec<BusinessId>, String>>()?;
    let mut authorizer = StaticAuthorizer::new().operator(&operator);
    let mut owners = BTreeMap::new();
    for &b in &businesses {
        let owner = Principal::new(&format!("business-{b}"));
        authorizer = authorizer.grant(&owner, b).carrier(&transport, b);
        owners.insert(b, owner);
    }
    let delivery = DeliveryConfig {
        retry_base: Duration::from_secs(2),
        retry_max: Duration::from_secs(60),
        receipt_timeout: Duration::from_secs(300),
        batch: 4096,
    };
    let (receipt_timeout, retry_max) = (delivery.receipt_timeout, delivery.retry_max);
    let processor = Processor::new(
        Host {
            storage: storage.clone(),
            key_provider: Arc::new(LocalKeyProvider::new(&root)),
            transport: network.clone(),
            business: sink.clone(),
            authorizer: Arc::new(authorizer),
            clock: Arc::new(clock.clone()),
            audit: audit.clone(),
        },
        Policies {
            delivery,
            ..Policies::default()
        },
    )?;
    // A kept store is empty between runs (each ends by sweeping everything
    // past retention): what a run cut short left would break the checks'
    // counts, and its messages were sent to devices of that run.
    if let Some(path) = &o.store {
        let left = processor.census(&operator).await?;
        let billed = storage.billing_businesses().await?.len();
        if left.messages > 0
            || left.phones > 0
            || left.peers > 0
            || left.epoch_keys > 0
            || billed > 0
        {
            return Err(format!(
                "{} holds {} messages, {} phone numbers, {} Signal records, {} epoch keys \
                 and the billing counts of {billed} businesses left by a run that did not \
                 finish (a finished run leaves none): remove the file, or pass another --store",
                path.display(),
                left.messages,
                left.phones,
                left.peers,
                left.epoch_keys
            )
            .into());
        }
    }

    println!(
        "custodian gateway: {} businesses, {} consumers, {} messages each way per consumer",
        businesses.len(),
        o.consumers,
        o.messages
    );
    println!(
        "store: {store_name}; faults: {}; seed {}; receipt timeout {} s",
        o.faults,
        o.seed,
        receipt_timeout.as_secs()
    );
    let devices_total: u32 = (0..o.consumers).map(|i| 1 + (i % 3) as u32).sum();
    for i in 0..o.consumers {
        network.add_consumer(&number(i), 1 + (i % 3) as u32).await;
    }
    let mut publications_failed = 0usize;
    // Retry receipts: a device could not decrypt a business message it did
    // not have. No consumer reinstalls here, so each is a session the
    // processor and a device disagree on.
    let mut retry_receipts = 0u64;
    for (&b, owner) in &owners {
        let mut tries = 0;
        loop {
            tries += 1;
            match processor.publish_keys(owner, b).await {
                Ok(()) => break,
                Err(ProcessorError::Transport(TransportError::Unavailable(_)))
                    if tries < FIRST_PUBLICATION_TRIES =>
                {
                    publications_failed += 1;
                }
                Err(e) => {
                    let hint = if o.store.is_some() {
                        " (is --root-key the key this store was made with?)"
                    } else {
                        ""
                    };
                    return Err(format!("publishing the keys of business {b}: {e}{hint}").into());
                }
            }
        }
    }
    println!(
        "{} consumer devices registered; businesses published their keys\n",
        devices_total
    );

    // Traffic: every consumer writes, every consumer is written to, in
    // batches of consumers. Latency is sampled two ways. Every
    // `ALONE_EVERY`th batch is driven one consumer at a time: each message
    // is received with nothing else in flight and each business's send is
    // made alone, so a figure is one processor call's own time, its store
    // writes included. The other batches make up to `BATCH` calls at once
    // on this one thread, as a loaded gateway would: a figure there runs
    // from the batch's start (a send) or the call's first poll (a receive,
    // timed by the simulated network) to the call's end, and includes the
    // other calls' work.
    const BATCH: usize = 64;
    const ALONE_EVERY: usize = 8;
    // Each consumer's messages, and the control's (see below).
    let total_in = o.consumers * o.messages + 1;
    let total_out = o.consumers * o.messages;
    let wall = Instant::now();
    let mut latency = Latencies::default();
    // Wall time spent in the batches of concurrent sends, and their calls.
    let (mut send_batches, mut send_batch_calls) = (Duration::ZERO, 0usize);
    let mut writes = Writes::default();
    // Each business message: its business, id, consumer and round.
    let mut sent: Vec<(BusinessId, MessageId, usize, usize)> = Vec::with_capacity(total_out);
    let mut next_report = total_out / 10;
    let (mut retried, mut answered_otherwise) = (0usize, 0usize);
    let mut batch = 0usize;
    for round in 0..o.messages {
        let consumers: Vec<usize> = (0..o.consumers).collect();
        for chunk in consumers.chunks(BATCH) {
            let alone = batch.is_multiple_of(ALONE_EVERY);
            batch += 1;
            let message = |i: usize| {
                let b = businesses[(i + round) % businesses.len()];
                let device = (i as u32 + round as u32) % (1 + (i % 3) as u32);
                (
                    b,
                    device,
                    format!("consumer {i} message {round}: where is my order?"),
                )
            };
            // Businesses send as a gateway's API handlers would, each
            // message named by an idempotency key. One request in eight is
            // made again by its business, as after a timeout: it must be
            // answered with the first id, and send nothing. Each call
            // returns when its first send ended.
            let send = |i: usize| {
                let b = businesses[(i + round + 1) % businesses.len()];
                let owner = &owners[&b];
                let processor = &processor;
                async move {
                    let key = format!("update/{i}/{round}");
                    let reply = || Outbound {
                        to: number(i),
                        content: update(b, i, round).into(),
                        category: Category::Utility,
                    };
                    let id = processor
                        .send_idempotent(owner, b, key.as_bytes(), reply())
                        .await;
                    let ended = Instant::now();
                    let again = if (i + round).is_multiple_of(8) {
                        Some(
                            processor
                                .send_idempotent(owner, b, key.as_bytes(), reply())
                                .await,
                        )
                    } else {
                        None
                    };
                    (b, i, id, again, ended)
                }
            };
            let mut results = Vec::with_capacity(chunk.len());
            let in_flight;
            if alone {
                for &i in chunk {
                    let (b, device, text) = message(i);
                    writes.write(&network, i, device, b, text).await?;
                    // Only this message is due (unless the network lost,
                    // delayed or duplicated it).
                    let pumped = network.pump(&processor, &transport).await;
                    retry_receipts += pumped.retry_receipts;
                    if pumped.receive_latencies.len() == 1 {
                        latency.receive_alone.extend(pumped.receive_latencies);
                    } else {
                        latency.receive_loaded.extend(pumped.receive_latencies);
                    }
                    let started = Instant::now();
                    let result = send(i).await;
                    latency.send_alone.push(result.4 - started);
                    results.push(result);
                }
                in_flight = network.in_flight().await;
            } else {
                for &i in chunk {
                    let (b, device, text) = message(i);
                    writes.write(&network, i, device, b, text).await?;
                }
                let started = Instant::now();
                results = join_all(chunk.iter().map(|&i| send(i)).collect()).await;
                send_batches += started.elapsed();
                send_batch_calls +=
                    results.len() + results.iter().filter(|r| r.3.is_some()).count();
                latency
                    .send_loaded
                    .extend(results.iter().map(|r| r.4 - started));
                let pumped = network.pump(&processor, &transport).await;
                retry_receipts += pumped.retry_receipts;
                latency.receive_loaded.extend(pumped.receive_latencies);
                in_flight = pumped.in_flight;
            }
            // The businesses' keys are kept stocked as a host's timer would.
            publications_failed += maintain_keys(&processor, &owners).await?;
            for (b, i, id, again, _) in results {
                let id = id?;
                if let Some(again) = again {
                    retried += 1;
                    if again? != id {
                        answered_otherwise += 1;
                    }
                }
                sent.push((b, id, i, round));
            }
            if sent.len() >= next_report {
                next_report += (total_out / 10).max(1);
                println!(
                    "  {:>3}% sent: {:>6} inbound handled, {:>6} outbound stored, {:>5} in flight",
                    sent.len() * 100 / total_out,
                    latency.receives(),
                    sent.len(),
                    in_flight
                );
            }
        }
    }

    // Let the network drain, retries and retransmissions land and outages
    // pass (simulated time), until every message has settled: 10 s a step
    // for the first hour, then a minute a step (a message whose delivery
    // reports keep getting lost waits ever longer before it is sent again).
    const STEP: Duration = Duration::from_secs(10);
    const LATER_STEP: Duration = Duration::from_secs(60);
    const MAX_DRAIN: Duration = Duration::from_secs(4 * 24 * 3600);

    // The control: the operator withholds message content from businesses
    // for a while, and a consumer writes. Nothing is handed to a business
    // meanwhile (every denial audited); once the published table is back,
    // the retransmission loop hands the message over with the rest.
    let control = withheld_control(
        &processor,
        &network,
        &transport,
        &operator,
        &sink,
        &audit,
        &clock,
        &mut writes,
        businesses[0],
        STEP,
    )
    .await?;
    retry_receipts += control.retry_receipts;
    println!(
        "\ncontrol: message content withheld from businesses for {} simulated seconds: {} release \
         decisions denied, {} handovers meanwhile",
        control.window.as_secs(),
        control.denied,
        control.handovers
    );
    let mut step = 0u64;
    let mut drained = Duration::ZERO;
    let mut settled = false;
    let mut retransmitted = 0u64;
    println!(
        "\ndraining (simulated time advances {} s a step for the first hour, then {} s):",
        STEP.as_secs(),
        LATER_STEP.as_secs()
    );
    while drained < MAX_DRAIN {
        step += 1;
        let pumped = network.pump(&processor, &transport).await;
        retry_receipts += pumped.retry_receipts;
        latency.receive_loaded.extend(pumped.receive_latencies);
        retransmitted += processor.retransmit_due(&operator).await?.sent;
        if drained.as_secs().is_multiple_of(60) {
            publications_failed += maintain_keys(&processor, &owners).await?;
        }
        let this_step = if drained < Duration::from_secs(3600) {
            STEP
        } else {
            LATER_STEP
        };
        clock.advance(this_step);
        drained += this_step;
        let handed = sink.messages().values().filter(|&&n| n >= 1).count();
        // Settled: the processor was told the business took the final
        // status. A copy whose reply was lost does not count: the processor
        // still has that report to make, and keeps the message until then.
        let told = final_statuses(&sink);
        let settled_out = sent
            .iter()
            .filter(|(_, id, _, _)| told.contains_key(id))
            .count();
        let held = sink.held_back();
        if handed >= total_in && settled_out == total_out && pumped.in_flight == 0 && held == 0 {
            settled = true;
            break;
        }
        if step.is_multiple_of(30) {
            println!(
                "  t+{:>5} s: inbound {handed}/{total_in} handed over, outbound {settled_out}/{total_out} settled, \
                 {} in flight, {held} held by businesses, {retransmitted} retransmissions",
                drained.as_secs(),
                pumped.in_flight,
            );
        }
    }
    let elapsed = wall.elapsed();
    println!(
        "\ntraffic settled: {} (after {} simulated seconds, {:.2} s of wall time; {} retransmissions)",
        if settled { "yes" } else { "NO" },
        drained.as_secs(),
        elapsed.as_secs_f64(),
        retransmitted
    );
    // Settled is what the world shows at one instant: the processor keeps
    // driving it past every timer it has (the longest wait for a delivery
    // report, and the longest backoff), so that a message handed over or
    // sent again late shows in the checks below.
    let quiet = receipt_timeout.max(MAX_RECEIPT_WAIT) + retry_max + LATER_STEP;
    let (handed_before, mut quiet_retransmitted) = (sink.fault_stats(), 0);
    let mut waited = Duration::ZERO;
    while waited < quiet {
        let pumped = network.pump(&processor, &transport).await;
        retry_receipts += pumped.retry_receipts;
        quiet_retransmitted += processor.retransmit_due(&operator).await?.sent;
        clock.advance(LATER_STEP);
        waited += LATER_STEP;
    }
    let calls = |stats: &BTreeMap<Leg, LegStats>, leg| stats.get(&leg).map_or(0, |s| s.events);
    let handed_after = sink.fault_stats();
    println!(
        "then {} simulated seconds more: {quiet_retransmitted} retransmissions, {} handovers and {} statuses to businesses",
        quiet.as_secs(),
        calls(&handed_after, Leg::Deliver) - calls(&handed_before, Leg::Deliver),
        calls(&handed_after, Leg::Status) - calls(&handed_before, Leg::Status),
    );
    println!("throughput:");
    println!(
        "  end to end       {:>6.0} messages/s: {total_in} in and {total_out} out ({} receives with redeliveries) \
         in {:.2} s of wall time,",
        (total_in + total_out) as f64 / elapsed.as_secs_f64(),
        latency.receives() as u64 + control.receives,
        elapsed.as_secs_f64(),
    );
    for line in [
        "which counts all this thread did besides the processor's calls: the simulated",
        "consumers' own Signal work (encrypting each message, decrypting each device copy),",
        "delivery reports, retransmissions and the simulation's bookkeeping",
    ] {
        println!("{:19}{line}", "");
    }
    if send_batch_calls > 0 {
        println!(
            "  processor sends  {:>6.0} calls/s: {send_batch_calls} send calls made up to {BATCH} at a time, \
             in the {:.2} s those batches took\n{:19}(the simulated network's side of their calls included)",
            send_batch_calls as f64 / send_batches.as_secs_f64(),
            send_batches.as_secs_f64(),
            ""
        );
    }
    latency.report(BATCH, ALONE_EVERY);
    println!("\nfaults injected:");
    report_faults("network", &network.fault_stats().await);
    report_faults("business", &sink.fault_stats());

    let mut broken: Vec<String> = Vec::new();
    if !settled {
        broken.push(format!(
            "traffic did not settle within {} simulated seconds",
            MAX_DRAIN.as_secs()
        ));
    }

    // Inbound: every consumer message handed to its business exactly once,
    // and to no other business. The business sees extra copies when a
    // reply was lost (the processor was told it failed and tried again) or
    // when the injector duplicated a delivery; a business drops those by
    // id. What the processor must never do is hand over again what the
    // business already took.
    let copies = sink.copies();
    let contents = sink.contents();
    let received: BTreeSet<(BusinessId, Vec<u8>)> =
        contents.iter().map(|(b, _, c)| (*b, c.clone())).collect();
    let never = writes
        .messages
        .keys()
        .filter(|m| !received.contains(*m))
        .count();
    let elsewhere = received
        .iter()
        .filter(|m| !writes.messages.contains_key(*m))
        .count();
    // Each message's sender, as the business was told it, against the
    // consumer and device that wrote it.
    let senders = sink.senders();
    let wrong_sender = contents
        .iter()
        .filter(|(b, id, content)| {
            let wrote = writes.messages.get(&(*b, content.clone()));
            match (wrote, senders.get(id)) {
                (Some(&(i, device)), Some((from, d))) => *from != number(i) || *d != device,
                (_, None) => true,
                (None, Some(_)) => false,
            }
        })
        .count();
    let (twice, repeats) = handed_again(&copies);
    let altered_handovers = sink.altered_handovers();
    let unacknowledged = copies.values().filter(|c| c.handed == 0).count();
    let (lost_replies, injected): (u32, u32) = copies
        .values()
        .fold((0, 0), |(r, i), c| (r + c.reply_lost, i + c.injected));
    println!(
        "\ninbound: {} of {} messages reached their business, under {} ids in all; \
         reached another business: {elsewhere}; handed over again after the business took them: \
         {twice} ({repeats} repeat handovers, taken or not); with another sender: {wrong_sender}; \
         handed over again with another sender or content: {altered_handovers}; \
         extra copies from lost replies: {lost_replies}, from injected duplicates: {injected}",
        writes.messages.len() - never,
        total_in,
        contents.len()
    );
    if never > 0 {
        broken.push(format!(
            "{never} consumer messages never reached their business"
        ));
    }
    if elsewhere > 0 {
        broken.push(format!(
            "{elsewhere} messages reached a business their consumer did not write to"
        ));
    }
    if wrong_sender > 0 {
        broken.push(format!(
            "{wrong_sender} consumer messages reached their business under another sender"
        ));
    }
    if altered_handovers > 0 {
        broken.push(format!(
            "{altered_handovers} handovers of a consumer message named another sender or carried \
             other content than its first"
        ));
    }
    if contents.len() != received.len() {
        broken.push(format!(
            "{} consumer messages reached their business under two ids",
            contents.len() - received.len()
        ));
    }
    if twice > 0 {
        broken.push(format!(
            "{twice} consumer messages were handed over again after the business took them \
             ({repeats} repeat handovers)"
        ));
    }
    if unacknowledged > 0 {
        broken.push(format!(
            "{unacknowledged} consumer messages were never handed over successfully"
        ));
    }

    // Outbound: every device of the recipient has each message, from its
    // business and as it was written, under its own id, every copy alike;
    // decrypted copies beyond the first are retransmissions made before
    // any delivery report came back (no device sent again after it, and
    // none asked with a retry receipt), and each message ended delivered.
    let told = final_statuses(&sink);
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let (mut missing_copies, mut extra_copies, mut not_delivered) = (0usize, 0u64, 0usize);
    let mut altered_copies = 0usize;
    for (b, id, i, round) in &sent {
        let last = told.get(id).copied();
        *by_status
            .entry(match last {
                Some((status, None)) => format!("{status:?}"),
                Some((status, Some(reason))) => format!("{status:?} ({reason:?})"),
                None => "none".into(),
            })
            .or_default() += 1;
        if !last.is_some_and(|(st, _)| matches!(st, Status::Delivered | Status::Read)) {
            not_delivered += 1;
        }
        let received = network.received(&number(*i)).await;
        let written = update(*b, *i, *round);
        for device in network.devices_of(&number(*i)).await {
            match received.get(&device).and_then(|r| r.get(id)) {
                Some(&n) => extra_copies += u64::from(n - 1),
                None => missing_copies += 1,
            }
            let decrypted = network.contents(&number(*i), device).await;
            if decrypted
                .iter()
                .any(|(from, got, content)| got == id && (from != b || *content != written))
            {
                altered_copies += 1;
            }
        }
    }
    // No device of any consumer has a business message sent to another.
    let mut by_consumer = BTreeMap::new();
    for i in 0..o.consumers {
        by_consumer.insert(i, network.received(&number(i)).await);
    }
    let misdelivered = misdelivered(&sent, &by_consumer);
    // Every status about a message went to the business that sent it.
    let sender: BTreeMap<MessageId, BusinessId> = sent.iter().map(|&(b, id, ..)| (id, b)).collect();
    let misaddressed = sink
        .status_log()
        .iter()
        .filter(|copy| sender.get(&copy.id) != Some(&copy.business))
        .count();
    let gone_back = statuses_gone_back(&sink);
    let after_delivery = network.resent_after_delivery().await;
    let altered_later = network.altered_copies().await;
    let mislabelled = network.mislabelled().await;
    // Counted by the devices, so that a retry receipt lost on its way
    // counts as well.
    let undecryptable = network.undecryptable().await;
    let late = network.late().await;
    println!(
        "outbound: final statuses {by_status:?}; device copies missing: {missing_copies}; \
         from another business or altered: {altered_copies}; \
         on a device of another consumer than the recipient: {misdelivered}; \
         statuses told to another business than the sender: {misaddressed}; \
         messages whose statuses went back: {gone_back}; \
         later copies unlike the first: {altered_later}; \
         under another id than their payload's: {mislabelled}; \
         retransmitted copies devices dropped by id: {extra_copies}; resent after delivery was reported: {after_delivery}; \
         copies a device could not decrypt: {undecryptable}, and too late to (its conversation had turned on): {late} \
         ({retry_receipts} retry receipts reached the processor)"
    );
    if undecryptable > 0 {
        broken.push(format!(
            "{undecryptable} copies of business messages a device could not decrypt"
        ));
    }
    if gone_back > 0 {
        broken.push(format!(
            "{gone_back} business messages whose statuses went back"
        ));
    }
    if altered_copies > 0 {
        broken.push(format!(
            "{altered_copies} device copies of business messages came from another business or \
             differ from what it sent"
        ));
    }
    if misdelivered > 0 {
        broken.push(format!(
            "{misdelivered} device copies of business messages reached a consumer they were not \
             sent to"
        ));
    }
    if misaddressed > 0 {
        broken.push(format!(
            "{misaddressed} statuses were told to another business than the message's sender"
        ));
    }
    if altered_later > 0 {
        broken.push(format!(
            "{altered_later} later device copies of business messages came from another business \
             or differ from the first"
        ));
    }
    if mislabelled > 0 {
        broken.push(format!(
            "{mislabelled} device copies of business messages were carried under another id than \
             their payload's"
        ));
    }
    if missing_copies > 0 {
        broken.push(format!(
            "{missing_copies} device copies of business messages missing"
        ));
    }
    if not_delivered > 0 {
        broken.push(format!(
            "{not_delivered} business messages did not end delivered"
        ));
    }
    if after_delivery > 0 {
        broken.push(format!(
            "{after_delivery} devices were sent a message again after it was reported delivered"
        ));
    }
    if o.faults == "none" && extra_copies > 0 {
        broken.push(format!(
            "{extra_copies} device copies beyond the first with no faults on"
        ));
    }
    println!(
        "idempotent sends made again by their business: {retried}; answered with another id: {answered_otherwise}"
    );
    if answered_otherwise > 0 {
        broken.push(format!(
            "{answered_otherwise} sends made again under their idempotency key were answered with another id"
        ));
    }

    // One-time prekeys: each the network handed out went to a session a
    // consumer started.
    let mut handed_out = 0;
    for &b in owners.keys() {
        handed_out += network.one_time_prekeys_handed_out(b).await;
    }
    println!(
        "one-time prekeys (published again after every batch and every simulated minute; \
         {publications_failed} publications refused or lost, made again at the next): \
         {handed_out} of the {} sessions consumers started took one",
        writes.started
    );

    // Retention: past 30 days nothing is readable, and nothing that
    // identifies a consumer is left in the store or its files.
    let census = processor.census(&operator).await?;
    if census.messages != (total_in + total_out) as u64 {
        broken.push(format!(
            "{} messages stored, not the {total_in} received and {total_out} sent",
            census.messages
        ));
    }
    println!(
        "\nstore before retention: {} messages, {} Signal peer records, {} consumer-business pairs, {} epoch keys",
        census.messages, census.peers, census.phones, census.epoch_keys
    );
    // Every stored message's sealed bytes, as a backup would hold them.
    let mut samples: Vec<MessageRecord> = Vec::new();
    let outbound = sent.iter().map(|&(b, id, _, _)| (b, id));
    let inbound = contents.iter().map(|&(b, id, _)| (b, id));
    for (b, id) in outbound.chain(inbound) {
        if let Some(record) = storage.message(b, id).await? {
            samples.push(record);
        }
    }
    if samples.is_empty() {
        broken.push("no sealed message was copied before the sweep to try".into());
    }
    // Whoever holds the copies, the root key and the store, with the clock
    // set back: a vault made afresh each time, so that no epoch key it
    // opened before the sweep is still in its memory after.
    let backup = || {
        Vault::new(
            Arc::new(KeyManager::new(
                Arc::new(LocalKeyProvider::new(&root)),
                storage.clone(),
            )),
            Arc::new(ManualClock::new(start)),
            EpochLength::DEFAULT,
        )
    };
    // Positive controls: before the sweep the copies open, and the scan
    // finds the consumers' phone hashes and the sealed bytes in the files.
    let vault = backup();
    let mut refused: BTreeMap<&str, usize> = BTreeMap::new();
    for record in &samples {
        if let Err(e) = vault.open(&record.sealed, record.business).await {
            *refused.entry(open_error_kind(&e)).or_default() += 1;
        }
    }
    let refused_before: usize = refused.values().sum();
    println!(
        "before the sweep: {} of {} sealed messages copied from the store open with the root key",
        samples.len() - refused_before,
        samples.len()
    );
    if refused_before > 0 {
        broken.push(format!(
            "{refused_before} sealed copies did not open before the sweep ({refused:?}): \
             their refusal after it would prove nothing"
        ));
    }
    let traces = Traces::new(&samples);
    let describe = |scan: &FileScan| {
        format!(
            "{} bytes; phone hashes {} times ({} of the {} consumers' hashes), \
             sealed bytes of {} of {} messages; phone numbers in clear: {}",
            scan.bytes,
            scan.phone_hits,
            scan.phones_found,
            traces.phones,
            scan.sealed_found,
            traces.sealed,
            scan.numbers_in_clear
        )
    };
    if let Some(path) = &path {
        let scan = scan_store_files(path, &traces)?;
        println!("before the sweep, store files: {}", describe(&scan));
        if scan.phone_hits == 0 || scan.sealed_found == 0 {
            broken.push(
                "before the sweep the scan found no phone hash or no sealed bytes in the store's \
                 files: finding none after it would prove nothing"
                    .into(),
            );
        }
    }

    clock.advance(Duration::from_secs(31 * 24 * 3600));
    let sweep = processor.sweep(&operator).await?;
    println!(
        "advanced 31 days and swept in {:.2} s: {} messages deleted, {} peer records and {} consumer-business pairs forgotten, {} epoch keys destroyed",
        sweep.elapsed.as_secs_f64(),
        sweep.messages_deleted,
        sweep.peers_deleted,
        sweep.consumers_forgotten,
        sweep.epoch_keys_destroyed
    );
    let census = processor.census(&operator).await?;
    println!(
        "store after retention: {} messages, {} Signal peer records, {} consumer-business pairs, {} epoch keys",
        census.messages, census.peers, census.phones, census.epoch_keys
    );
    if !sweep.complete {
        broken.push("the sweep stopped before the end".into());
    }
    if census.messages > 0 || census.phones > 0 || census.peers > 0 || census.epoch_keys > 0 {
        broken.push(format!(
            "after retention the store still holds {} messages, {} consumers, {} Signal peer records, {} epoch keys",
            census.messages, census.phones, census.peers, census.epoch_keys
        ));
    }
    let mut still_found = 0;
    for (b, id, _, _) in &sent {
        match processor.message_status(&owners[b], *b, *id).await {
            Err(ProcessorError::NotFound) => {}
            _ => still_found += 1,
        }
    }
    if still_found > 0 {
        broken.push(format!(
            "{still_found} business messages still found after retention"
        ));
    }
    // The same copies, now: each must be refused because its epoch key is
    // gone (or, were the clock not set back, because it expired). Any other
    // refusal is not retention's doing, and fails the run.
    let vault = backup();
    let (mut gone, mut still_open) = (BTreeMap::<&str, usize>::new(), 0usize);
    let mut otherwise: BTreeMap<&str, usize> = BTreeMap::new();
    for record in &samples {
        match vault.open(&record.sealed, record.business).await {
            Ok(_) => still_open += 1,
            Err(
                e @ (OpenError::EpochDestroyed
                | OpenError::UnknownEpoch
                | OpenError::Expired { .. }),
            ) => *gone.entry(open_error_kind(&e)).or_default() += 1,
            Err(e) => *otherwise.entry(open_error_kind(&e)).or_default() += 1,
        }
    }
    let why = gone
        .iter()
        .map(|(kind, n)| format!("{kind}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "after the sweep: {} of {} sealed copies refuse to open with the root key and an old clock{}",
        gone.values().sum::<usize>(),
        samples.len(),
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        }
    );
    if still_open > 0 {
        broken.push(format!(
            "{still_open} sealed copies still open after retention"
        ));
    }
    if !otherwise.is_empty() {
        broken.push(format!(
            "{} sealed copies were refused after the sweep for a reason other than a destroyed \
             epoch key: {otherwise:?}",
            otherwise.values().sum::<usize>()
        ));
    }
    match &path {
        Some(path) => {
            let scan = scan_store_files(path, &traces)?;
            println!("after the sweep, store files: {}", describe(&scan));
            if scan.phone_hits > 0 || scan.sealed_hits > 0 || scan.numbers_in_clear > 0 {
                broken.push(format!(
                    "after the sweep the store's files still hold {} phone hashes, the sealed \
                     bytes of {} messages and {} phone numbers in clear",
                    scan.phone_hits, scan.sealed_found, scan.numbers_in_clear
                ));
            }
        }
        None => println!("store files: none to scan (--memory)"),
    }

    // Billing: every business message was billed once, in the write that
    // recorded it sent, and the store kept the counts (with the sweep's
    // 31 days, every period is closed) until an export handed them over.
    // An export the network refused or lost is made again, as a host's
    // timer would; billing's system of record counts each take once.
    let mut exports_failed = 0usize;
    for _ in 0..EXPORT_TRIES {
        match processor.export_billing(&operator).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(ProcessorError::Transport(TransportError::Unavailable(_))) => exports_failed += 1,
            Err(e) => return Err(format!("exporting billing: {e}").into()),
        }
    }
    // Each business is billed for exactly the messages it sent.
    let statements = network.billing_statements().await;
    let mut billed: BTreeMap<BusinessId, (u64, u64)> = BTreeMap::new();
    for s in &statements {
        let messages: u64 = s.records.iter().map(|r| r.messages.total()).sum();
        billed.entry(s.business).or_default().0 += messages;
    }
    for &(b, ..) in &sent {
        billed.entry(b).or_default().1 += 1;
    }
    let total: u64 = billed.values().map(|&(n, _)| n).sum();
    println!(
        "billing: {total} messages billed to {} businesses in {} statements ({exports_failed} \
         exports refused or lost, made again)",
        billed.len(),
        statements.len()
    );
    for (b, (n, sent)) in billed {
        if n != sent {
            let line = format!("business {b}: {n} messages billed, not the {sent} it sent");
            println!("  {line}");
            broken.push(line);
        }
    }

    // The audit trail.
    let events = audit.events();
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        let verdict = if e.verdict == Verdict::Allow {
            "allowed"
        } else {
            "denied"
        };
        *summary
            .entry(format!(
                "{:?} → {:?} for {:?}: {verdict}",
                e.class, e.party, e.purpose
            ))
            .or_default() += 1;
    }
    println!("\naudit trail: {} release decisions", events.len());
    for (line, n) in summary {
        println!("  {n:>7}  {line}");
    }
    // No release but those the run's flows make under the published table
    // (written out here, not read from the policy the processor enforces,
    // so that the check tests its use), no denial but the control's, none
    // of a business's data but its own, and every copy of a message the
    // business was handed came through a release of its content and one
    // of its sender's number.
    let forbidden = events
        .iter()
        .filter(|e| e.is_allowed() && !RELEASES.contains(&(e.class, e.party, e.purpose)))
        .count();
    let denied = events.iter().filter(|e| !e.is_allowed()).count();
    let outsider = events
        .iter()
        .filter(|e| e.business.is_some_and(|b| !owners.contains_key(&b)))
        .count();
    let handed_to = sink.handovers();
    let handovers: u64 = handed_to.values().sum();
    let released_to = |class: DataClass, b: Option<BusinessId>| {
        events
            .iter()
            .filter(|e| e.is_allowed() && e.party == Party::Business && e.class == class)
            .filter(|e| b.is_none() || e.business == b)
            .count() as u64
    };
    let (contents_released, numbers_released) = (
        released_to(DataClass::MessageContent, None),
        released_to(DataClass::ConsumerPhoneNumber, None),
    );
    // Per business: its handovers, each with a release of its own data.
    let foreign = owners
        .keys()
        .filter(|&&b| {
            let handed = handed_to.get(&b).copied().unwrap_or(0);
            released_to(DataClass::MessageContent, Some(b)) != handed
                || released_to(DataClass::ConsumerPhoneNumber, Some(b)) != handed
        })
        .count();
    println!(
        "  outside the run's flows: {forbidden}; of a business not in the run: {outsider}; \
         businesses whose handovers and releases differ: {foreign}; {handovers} handovers to businesses, {contents_released} contents and \
         {numbers_released} numbers released to them"
    );
    if forbidden > 0 {
        broken.push(format!(
            "{forbidden} releases in the audit trail the run's flows do not make"
        ));
    }
    if control.denied == 0 || denied != control.denied {
        broken.push(format!(
            "{denied} denials in the audit trail, {} of them while the control withheld content \
             (it must deny at least one, and nothing else may be denied)",
            control.denied
        ));
    }
    if control.handovers > 0 {
        broken.push(format!(
            "{} handovers to businesses while message content was withheld",
            control.handovers
        ));
    }
    if outsider > 0 {
        broken.push(format!(
            "{outsider} release decisions in the audit trail for a business not in the run"
        ));
    }
    if foreign > 0 {
        broken.push(format!(
            "{foreign} businesses were handed other than the contents and numbers released \
             under their name"
        ));
    }
    if contents_released != handovers || numbers_released != handovers {
        broken.push(format!(
            "{handovers} messages handed to businesses, but the audit trail shows \
             {contents_released} releases of their content and {numbers_released} of their \
             senders' numbers"
        ));
    }

    if broken.is_empty() {
        println!("\nall promises kept");
        Ok(())
    } else {
        for promise in &broken {
            eprintln!("BROKEN: {promise}");
        }
        Err(format!("{} promises broken (see above)", broken.len()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn a_repeat_handover_counts_whether_or_not_the_business_took_it() {
        let id = |b| MessageId::from_bytes([b; 16]);
        let copies = |handed, reply_lost, injected, after_taken| Copies {
            handed,
            reply_lost,
            injected,
            after_taken,
        };
        let seen = BTreeMap::from([
            // Taken, then handed over again and refused (or lost).
            (id(1), copies(1, 0, 0, 1)),
            // Taken twice.
            (id(2), copies(2, 0, 0, 1)),
            // Taken, then again twice: its reply lost, then refused.
            (id(3), copies(1, 1, 0, 2)),
            // A lost reply before it was taken, and an injected copy: no repeat.
            (id(4), copies(1, 1, 1, 0)),
        ]);
        assert_eq!(handed_again(&seen), (3, 4));
    }

    /// A business message a device of another consumer than its recipient
    /// decrypted is counted, so a processor handing one business's content
    /// to a stranger fails the run; one on its recipient's devices is not.
    /// (Before, the checks looked only at each recipient's devices: review
    /// of the test kit.)
    #[test]
    fn a_business_message_on_another_consumers_device_is_counted() {
        let b = BusinessId::new(1).unwrap();
        let id = |n| MessageId::from_bytes([n; 16]);
        let sent = [(b, id(1), 1, 0), (b, id(2), 2, 0)];
        let on = |ids: &[MessageId]| ids.iter().map(|&i| (i, 1)).collect::<BTreeMap<_, _>>();
        let mut received = BTreeMap::from([
            (1, BTreeMap::from([(0, on(&[id(1)])), (1, on(&[id(1)]))])),
            (2, BTreeMap::from([(0, on(&[id(2)]))])),
            (3, BTreeMap::new()),
        ]);
        assert_eq!(misdelivered(&sent, &received), 0);
        // Consumer 2's second device and consumer 3 decrypted consumer 1's.
        received.get_mut(&2).unwrap().insert(1, on(&[id(1), id(2)]));
        received.get_mut(&3).unwrap().insert(0, on(&[id(1)]));
        assert_eq!(misdelivered(&sent, &received), 2);
    }

    /// The outbound checks read the statuses in the order the processor
    /// told them: the last one settled is the message's final status (not
    /// the furthest), and a message whose statuses went back (one below
    /// one told before it, or a failure after a delivery) is counted, so a
    /// processor breaking that promise fails the run.
    #[tokio::test]
    async fn statuses_are_judged_in_the_order_they_were_told() {
        use custodian::transport::{BusinessSink, StatusUpdate};
        let sink = SimBusiness::new(
            ManualClock::new(Timestamp::from_millis(0)),
            Faults::none(),
            1,
        )
        .unwrap();
        let id = |b| MessageId::from_bytes([b; 16]);
        let told = [
            (1, Status::Sent),
            (1, Status::Delivered),
            (1, Status::Read),
            (2, Status::Read),
            (2, Status::Delivered),
            (3, Status::Delivered),
            (3, Status::Failed),
            (4, Status::Sent),
            (4, Status::Failed),
            (5, Status::Sent),
            (5, Status::Read),
            (5, Status::Read),
        ];
        for (message, status) in told {
            let failure = (status == Status::Failed).then_some(FailureReason::Expired);
            let update = StatusUpdate {
                business: BusinessId::new(1).unwrap(),
                id: id(message),
                status,
                failure,
                at: Timestamp::from_millis(0),
            };
            sink.status(&update).await.unwrap();
        }
        let last = |m| final_statuses(&sink).get(&id(m)).map(|(s, _)| *s);
        assert_eq!(last(1), Some(Status::Read));
        assert_eq!(last(2), Some(Status::Delivered));
        assert_eq!(last(3), Some(Status::Failed));
        assert_eq!(last(4), Some(Status::Failed));
        assert_eq!(last(5), Some(Status::Read));
        assert_eq!(statuses_gone_back(&sink), 2);
    }

    /// `--root-key FILE` goes only with `--store PATH`, as the usage text
    /// says: with `--memory`, or with the temporary store, it is refused.
    /// (It was accepted, and the run read or created a key file that
    /// nothing was kept under.)
    #[test]
    fn root_key_without_a_kept_store_is_a_usage_error() {
        for flags in [
            &["--memory", "--root-key", "/nonexistent/k"][..],
            &["--root-key", "/nonexistent/k"][..],
        ] {
            assert!(options(args(flags)).is_err(), "{flags:?} was accepted");
        }
        assert!(options(args(&["--store", "/tmp/s.db", "--root-key", "/tmp/k"])).is_ok());
    }

    /// The main job at a small scale, on both stores, with faults on: it
    /// keeps every promise it checks (the control included: content
    /// withheld, then handed over).
    #[tokio::test(flavor = "current_thread")]
    async fn a_small_run_keeps_its_promises() {
        for memory in [true, false] {
            let mut flags = vec!["--consumers", "24", "--messages", "1", "--seed", "5"];
            flags.extend(["--faults", "moderate"]);
            if memory {
                flags.push("--memory");
            }
            let Ok(Parsed::Run(o)) = options(args(&flags)) else {
                panic!("{flags:?} refused")
            };
            let dir = tempfile::tempdir().unwrap();
            let temporary = (!memory).then_some(dir.path());
            let outcome = run(o, temporary).await;
            assert!(outcome.is_ok(), "memory {memory}: {outcome:?}");
        }
    }

    /// A kept store that a run cut short left rows in (a message; or only
    /// billing counts, cut after its sweep) is refused before any traffic,
    /// naming what it holds: those rows would break the checks' counts, and
    /// its messages went to devices of that run. (The next run reported
    /// broken promises the processor had kept.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_kept_store_a_run_left_unfinished_is_refused() {
        use custodian::ids::PhoneHash;
        use custodian::keys::Epoch;
        use custodian::store::{Batch, Delivery, Direction, Op};

        let now = SystemClock.now();
        let expiry = now.saturating_add(Duration::from_secs(3600));
        let b = BusinessId::new(FIRST_BUSINESS + 1).unwrap();
        let message = Op::PutMessage(Box::new(MessageRecord {
            business: b,
            id: MessageId::random(),
            direction: Direction::Outbound,
            phone: PhoneHash::from_bytes([7; 16]),
            created: now,
            expiry,
            epoch: Epoch::containing(expiry, EpochLength::DEFAULT).unwrap(),
            delivery: Delivery::queued(now),
            sealed: b"sealed".to_vec(),
        }));
        let billed = Op::Bill {
            business: b,
            start: now,
            end: expiry,
            category: Category::Utility,
        };
        for (left, named) in [(message, "holds 1 messages"), (billed, "of 1 businesses")] {
            let dir = tempfile::tempdir().unwrap();
            let (path, key) = (dir.path().join("kept.db"), dir.path().join("root.key"));
            let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
            store.commit(Batch::from(left)).await.unwrap();
            drop(store);
            let (path, key) = (path.to_string_lossy(), key.to_string_lossy());
            let flags = ["--store", &path, "--root-key", &key, "--consumers", "3"];
            let Ok(Parsed::Run(o)) = options(args(&flags)) else {
                panic!("{flags:?} refused")
            };
            let refused = run(o, None).await.map_err(|e| e.to_string());
            assert!(
                matches!(&refused, Err(e) if e.contains(named)
                    && e.contains("left by a run that did not finish")),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn too_many_messages_or_an_unknown_fault_level_is_a_usage_error() {
        let refused =
            |list: &[&str], what: &str| matches!(options(args(list)), Err(e) if e.contains(what));
        let most = ["--consumers", "100000", "--messages", "10"];
        assert!(matches!(options(args(&most)), Ok(Parsed::Run(_))));
        let over = ["--consumers", "100000", "--messages", "11"];
        assert!(refused(&over, "--consumers times --messages"));
        let huge = usize::MAX.to_string();
        assert!(refused(
            &["--messages", &huge],
            "--consumers times --messages"
        ));
        assert!(refused(
            &["--faults", "bogus"],
            "--faults: unknown level bogus"
        ));
        for level in FAULT_LEVELS {
            assert!(matches!(
                options(args(&["--faults", level])),
                Ok(Parsed::Run(o)) if o.faults == level
            ));
        }
    }

    /// A publication the network refuses for good (`TransportError::Refused`:
    /// retrying will not help) fails the run; only an unavailable network
    /// is tried again at the next tick.
    #[tokio::test(flavor = "current_thread")]
    async fn a_publication_refused_for_good_fails_the_run() {
        use async_trait::async_trait;
        use custodian::integrity::{BillingStatement, IntegrityReport};
        use custodian::signal::{Ciphertext, PreKeyBundle, PublishedKeys};
        use custodian::transport::{Outgoing, Transport};

        struct RefusesKeys(Arc<SimNetwork>);
        #[async_trait]
        impl Transport for RefusesKeys {
            async fn devices(
                &self,
                b: BusinessId,
                c: &PhoneNumber,
            ) -> Result<Vec<u32>, TransportError> {
                self.0.devices(b, c).await
            }
            async fn fetch_bundle(
                &self,
                b: BusinessId,
                c: &PhoneNumber,
                d: u32,
            ) -> Result<PreKeyBundle, TransportError> {
                self.0.fetch_bundle(b, c, d).await
            }
            async fn send(
                &self,
                b: BusinessId,
                c: &PhoneNumber,
                d: u32,
                m: &Outgoing,
            ) -> Result<(), TransportError> {
                self.0.send(b, c, d, m).await
            }
            async fn ask_resend(
                &self,
                business: BusinessId,
                consumer: &PhoneNumber,
                device: u32,
                id: MessageId,
                message: &Ciphertext,
            ) -> Result<(), TransportError> {
                self.0
                    .ask_resend(business, consumer, device, id, message)
                    .await
            }
            async fn publish_keys(
                &self,
                _: BusinessId,
                _: &PublishedKeys,
            ) -> Result<(), TransportError> {
                Err(TransportError::Refused("the business is blocked".into()))
            }
            async fn integrity_signals(&self, r: &IntegrityReport) -> Result<(), TransportError> {
                self.0.integrity_signals(r).await
            }
            async fn billing(&self, s: &BillingStatement) -> Result<(), TransportError> {
                self.0.billing(s).await
            }
        }

        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let network = Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap());
        let b = BusinessId::new(FIRST_BUSINESS + 1).unwrap();
        let owner = Principal::new("owner");
        let host = Host {
            storage: Arc::new(MemoryStore::new()),
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: Arc::new(RefusesKeys(network)),
            business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
            authorizer: Arc::new(StaticAuthorizer::new().grant(&owner, b)),
            clock: Arc::new(clock.clone()),
            audit: Arc::new(MemoryAuditSink::new()),
        };
        let processor = Processor::new(host, Policies::default()).unwrap();
        let owners = BTreeMap::from([(b, owner)]);
        let outcome = maintain_keys(&processor, &owners).await;
        assert!(
            outcome.is_err(),
            "a refusal for good was counted as retryable: {outcome:?}"
        );
    }
}
