//! The main job: a gateway built on the processor, run against a simulated
//! network with faults on.
//!
//! A few businesses and thousands of consumers (each with one to three
//! devices, each device a real Signal client) exchange messages both ways
//! through the processor; the network loses, duplicates, delays and refuses
//! messages and has an outage, and so does the businesses' endpoint. The run
//! checks that every message arrived exactly once (or failed with a reason),
//! prints throughput and latency percentiles, then moves the clock past
//! retention, sweeps, and shows that nothing is readable and no phone number
//! remains. It ends with a summary of the audit trail.
//!
//! ```sh
//! cargo run --release --example gateway -- --help
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::processor::{DeliveryConfig, Host, Outbound, Policies, Processor};
use custodian::store::{MemoryStore, MessageRecord, SqliteConfig, SqliteStore, Status, Storage};
use custodian::testing::{Faults, SimBusiness, SimNetwork, join_all};
use custodian::time::{Clock, ManualClock, SystemClock, Timestamp};
use custodian::transport::{Principal, StaticAuthorizer};
use custodian::vault::Vault;
use custodian::visibility::{MemoryAuditSink, Verdict};

struct Options {
    businesses: u64,
    consumers: usize,
    messages: usize,
    faults: String,
    store: Option<PathBuf>,
    memory: bool,
    seed: u64,
}

const USAGE: &str = "usage: gateway [--businesses N] [--consumers N] [--messages N]
               [--faults none|moderate|heavy] [--store PATH | --memory] [--seed N]

  --businesses N   businesses (default 3)
  --consumers N    consumers, each with 1-3 devices (default 2000)
  --messages N     messages each consumer sends, and each receives (default 2)
  --faults KIND    network and business-endpoint faults (default moderate)
  --store PATH     the SQLite store file (default: a temporary file)
  --memory         keep everything in memory instead
  --seed N         seed for consumers' choices and faults (default 7)";

fn options() -> Result<Options, String> {
    let mut o = Options {
        businesses: 3,
        consumers: 2000,
        messages: 2,
        faults: "moderate".into(),
        store: None,
        memory: false,
        seed: 7,
    };
    let mut args = std::env::args().skip(1);
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
            "--faults" => o.faults = value()?,
            "--store" => o.store = Some(PathBuf::from(value()?)),
            "--memory" => o.memory = true,
            "--seed" => o.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n\n{USAGE}")),
        }
    }
    if o.businesses == 0 || o.consumers == 0 {
        return Err("need at least one business and one consumer".into());
    }
    Ok(o)
}

fn faults(kind: &str, start: Timestamp) -> Result<(Faults, Faults), String> {
    let outage = |f: Faults| {
        f.with_outage(
            start.saturating_add(Duration::from_secs(120)),
            Duration::from_secs(300),
        )
    };
    Ok(match kind {
        "none" => (Faults::none(), Faults::none()),
        "moderate" => (
            outage(Faults::moderate()),
            outage(Faults {
                fail: 0.05,
                ..Faults::none()
            }),
        ),
        "heavy" => (
            outage(Faults {
                drop: 0.2,
                duplicate: 0.2,
                delay: 0.5,
                fail: 0.2,
                ..Faults::moderate()
            }),
            outage(Faults {
                fail: 0.3,
                ..Faults::none()
            }),
        ),
        other => return Err(format!("unknown fault level {other}")),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report_latencies(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {name:<22} n={:<6} p50 {:>7.1} µs   p90 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.90).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
    );
}

fn number(i: usize) -> PhoneNumber {
    // Valid E.164: a UK mobile range reserved for drama, plenty of room.
    format!("+4477009{i:05}")
        .parse()
        .unwrap_or_else(|_| unreachable!("well-formed number"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = match options() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(options).await {
        eprintln!("gateway failed: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Options) -> Result<(), Box<dyn std::error::Error>> {
    let start = SystemClock.now();
    let clock = ManualClock::new(start);
    let (network_faults, sink_faults) = faults(&o.faults, start)?;
    let root = SecretKey::generate();
    let temporary = (!o.memory && o.store.is_none())
        .then(|| std::env::temp_dir().join(format!("custodian-gateway-{}.db", std::process::id())));
    let (storage, store_name): (Arc<dyn Storage>, String) =
        match o.store.clone().or_else(|| temporary.clone()) {
            Some(path) if !o.memory => {
                let store = SqliteStore::open(&path, SqliteConfig::default())?;
                (Arc::new(store), format!("SQLite at {}", path.display()))
            }
            _ => (Arc::new(MemoryStore::new()), "memory".into()),
        };
    let network = Arc::new(SimNetwork::new(clock.clone(), network_faults, o.seed));
    let sink = SimBusiness::new(clock.clone(), sink_faults, o.seed + 1);
    let audit = Arc::new(MemoryAuditSink::new());
    let transport = Principal::new("transport");
    let operator = Principal::new("operator");
    let businesses: Vec<BusinessId> = (1..=o.businesses)
        .filter_map(|b| BusinessId::new(1000 + b))
        .collect();
    let mut authorizer = StaticAuthorizer::new().operator(&operator);
    let mut owners = BTreeMap::new();
    for &b in &businesses {
        let owner = Principal::new(&format!("business-{b}"));
        authorizer = authorizer.grant(&owner, b).grant(&transport, b);
        owners.insert(b, owner);
    }
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
            delivery: DeliveryConfig {
                retry_base: Duration::from_secs(2),
                retry_max: Duration::from_secs(60),
                receipt_timeout: Duration::from_secs(300),
                batch: 4096,
            },
            ..Policies::default()
        },
    )?;

    println!(
        "custodian gateway: {} businesses, {} consumers, {} messages each way per consumer",
        businesses.len(),
        o.consumers,
        o.messages
    );
    println!("store: {store_name}; faults: {}", o.faults);
    let devices_total: u32 = (0..o.consumers).map(|i| 1 + (i % 3) as u32).sum();
    for i in 0..o.consumers {
        network.add_consumer(&number(i), 1 + (i % 3) as u32).await;
    }
    for (&b, owner) in &owners {
        processor.publish_keys(owner, b).await?;
    }
    println!(
        "{} consumer devices registered; businesses published their keys\n",
        devices_total
    );

    // Traffic: every consumer writes, every consumer is written to.
    let total_in = o.consumers * o.messages;
    let total_out = o.consumers * o.messages;
    let wall = Instant::now();
    let mut send_latency = Vec::with_capacity(total_out);
    let mut receive_latency = Vec::with_capacity(total_in);
    let mut sent: Vec<(BusinessId, MessageId, usize)> = Vec::with_capacity(total_out);
    let mut step = 0u64;
    let mut next_report = total_out / 10;
    for round in 0..o.messages {
        let consumers: Vec<usize> = (0..o.consumers).collect();
        for chunk in consumers.chunks(64) {
            for &i in chunk {
                let b = businesses[(i + round) % businesses.len()];
                let device = (i as u32 + round as u32) % (1 + (i % 3) as u32);
                let text = format!("consumer {i} message {round}: where is my order?");
                network
                    .consumer_sends(&number(i), device, b, text.as_bytes())
                    .await?;
            }
            // Businesses send concurrently, as a gateway's API handlers would.
            let sends = chunk.iter().map(|&i| {
                let b = businesses[(i + round + 1) % businesses.len()];
                let owner = &owners[&b];
                let processor = &processor;
                async move {
                    let reply = Outbound {
                        to: number(i),
                        content: format!("business {b} to consumer {i}, update {round}: shipped")
                            .into_bytes(),
                        category: Category::Utility,
                    };
                    let t = Instant::now();
                    let id = processor.send(owner, b, reply).await;
                    (b, i, id, t.elapsed())
                }
            });
            for (b, i, id, took) in join_all(sends.collect()).await {
                send_latency.push(took);
                sent.push((b, id?, i));
            }
            let pumped = network.pump(&processor, &transport).await;
            receive_latency.extend(pumped.receive_latencies);
            if sent.len() >= next_report {
                next_report += total_out / 10;
                println!(
                    "  {:>3}% sent: {:>6} inbound handled, {:>6} outbound stored, {:>5} in flight",
                    sent.len() * 100 / total_out,
                    receive_latency.len(),
                    sent.len(),
                    pumped.in_flight
                );
            }
        }
    }
    // Let the network drain, retries land and outages pass (simulated time).
    let mut settled = false;
    while step < 2000 {
        step += 1;
        let pumped = network.pump(&processor, &transport).await;
        receive_latency.extend(pumped.receive_latencies);
        processor.retransmit_due(&operator).await?;
        clock.advance(Duration::from_secs(10));
        let delivered_all = sink.contents().len() == total_in;
        let statuses = sink.statuses();
        let settled_out = sent.iter().all(|(_, id, _)| {
            statuses.get(id).is_some_and(|s| {
                s.iter()
                    .any(|(st, _)| matches!(st, Status::Delivered | Status::Read | Status::Failed))
            })
        });
        if delivered_all && settled_out && pumped.in_flight == 0 {
            settled = true;
            break;
        }
    }
    let elapsed = wall.elapsed();
    let handled = receive_latency.len() + send_latency.len();
    println!(
        "\ntraffic settled: {} (after {} simulated seconds, {:.2} s of wall time)",
        if settled { "yes" } else { "NO" },
        step * 10,
        elapsed.as_secs_f64()
    );
    println!(
        "throughput: {:.0} processor operations/s ({} receives incl. redeliveries, {} sends)",
        handled as f64 / elapsed.as_secs_f64(),
        receive_latency.len(),
        send_latency.len()
    );
    report_latencies("receive (inbound)", receive_latency);
    report_latencies("send (outbound)", send_latency);

    // Check: exactly once, or failed with a reason.
    let inbound = sink.messages();
    let duplicates_kept_out = inbound.values().filter(|&&c| c > 1).count();
    println!(
        "\ninbound: {} of {} messages handed to businesses, {} of them more than once",
        sink.contents().len(),
        total_in,
        duplicates_kept_out
    );
    let statuses = sink.statuses();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut missing_copies = 0;
    for (_, id, i) in &sent {
        let last = statuses.get(id).and_then(|s| {
            s.iter()
                .map(|(st, reason)| (*st, *reason))
                .max_by_key(|(st, _)| *st)
        });
        *by_status.entry(format!("{last:?}")).or_default() += 1;
        let received = network.received(&number(*i)).await;
        for device in network.devices_of(&number(*i)).await {
            if !received.get(&device).is_some_and(|r| r.contains_key(id)) {
                missing_copies += 1;
            }
        }
    }
    println!("outbound: final statuses {by_status:?}; device copies missing: {missing_copies}");

    // Retention: past 30 days nothing is readable and no number remains.
    let census = processor.census(&operator).await?;
    println!(
        "\nstore before retention: {} messages, {} Signal peer records, {} consumers, {} epoch keys",
        census.messages, census.peers, census.phones, census.epoch_keys
    );
    let mut samples: Vec<MessageRecord> = Vec::new();
    for (b, id, _) in sent.iter().take(5) {
        if let Some(record) = storage.message(*b, *id).await? {
            samples.push(record);
        }
    }
    clock.advance(Duration::from_secs(31 * 24 * 3600));
    let sweep = processor.sweep(&operator).await?;
    println!(
        "advanced 31 days and swept in {:.2} s: {} messages deleted, {} peer records and {} consumers forgotten, {} epoch keys destroyed",
        sweep.elapsed.as_secs_f64(),
        sweep.messages_deleted,
        sweep.peers_deleted,
        sweep.consumers_forgotten,
        sweep.epoch_keys_destroyed
    );
    let census = processor.census(&operator).await?;
    println!(
        "store after retention: {} messages, {} Signal peer records, {} consumers, {} epoch keys",
        census.messages, census.peers, census.phones, census.epoch_keys
    );
    // Even copies of the sealed bytes (a backup) stay unreadable, with the
    // root key in hand and the clock set back: their epoch keys are gone.
    let restored = Vault::new(
        Arc::new(KeyManager::new(
            Arc::new(LocalKeyProvider::new(&root)),
            storage.clone(),
        )),
        Arc::new(ManualClock::new(start)),
        EpochLength::DEFAULT,
    );
    let mut unreadable = 0;
    for record in &samples {
        if restored
            .open(&record.sealed, record.business)
            .await
            .is_err()
        {
            unreadable += 1;
        }
    }
    println!(
        "{unreadable} of {} sealed messages copied before the sweep open with the root key and an old clock: {}",
        samples.len(),
        samples.len() - unreadable
    );

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
    if let Some(path) = temporary {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
    if !settled
        || missing_copies > 0
        || sink.contents().len() != total_in
        || unreadable != samples.len()
    {
        return Err("a promise was broken: see above".into());
    }
    Ok(())
}
