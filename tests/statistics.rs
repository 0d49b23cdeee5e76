//! Integrity signals and statistics against plain models (a review's
//! property tests), and what a sweep leaves of a closed period's report.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use custodian::ids::{BusinessId, PhoneHash};
use custodian::integrity::{
    Direction, IntegrityConfig, IntegrityMonitor, IntegrityReport, StatisticsCollector,
    StatisticsConfig, StatisticsReport, Status,
};
use custodian::retention::RetentionPolicy;
use custodian::time::{ManualClock, Timestamp};
use custodian::visibility::{Gate, MemoryAuditSink, Party, Purpose, VisibilityPolicy};
use proptest::prelude::*;

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;
const START: u64 = 20_000 * DAY;

fn consumer(i: u64) -> PhoneHash {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&z.to_le_bytes());
    b[8..].copy_from_slice(&i.to_le_bytes());
    PhoneHash::from_bytes(b)
}

fn gate(now: Timestamp) -> Gate {
    Gate::new(
        VisibilityPolicy::published(),
        Arc::new(MemoryAuditSink::new()),
        Arc::new(ManualClock::new(now)),
    )
}

fn signals(m: &IntegrityMonitor, b: BusinessId, now: Timestamp) -> IntegrityReport {
    gate(now)
        .release(m.export(b, now), Party::Transport, Purpose::Integrity)
        .unwrap()
        .into_value()
}

#[derive(Debug, Clone)]
enum Ev {
    Sent(u64, u64),
    Received(u64, u64),
    Spam(u64, u64),
    Block(u64, u64),
    Export(u64),
    Expire(u64),
}

#[derive(Debug, Default, Clone, PartialEq)]
struct W {
    sent: u64,
    received: u64,
    unique: u64,
    new: u64,
    spam: u64,
    blocks: u64,
}

fn ev() -> impl Strategy<Value = Ev> {
    let t = 0u64..(6 * HOUR);
    let c = 0u64..12;
    prop_oneof![
        4 => (c.clone(), t.clone()).prop_map(|(c, t)| Ev::Sent(c, t)),
        2 => (c.clone(), t.clone()).prop_map(|(c, t)| Ev::Received(c, t)),
        1 => (c.clone(), t.clone()).prop_map(|(c, t)| Ev::Spam(c, t)),
        1 => (c, t.clone()).prop_map(|(c, t)| Ev::Block(c, t)),
        1 => t.clone().prop_map(Ev::Export),
        1 => t.prop_map(Ev::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    /// the monitor's counts match a plain model
    /// (late events count in the open window; a consumer is new if never
    /// messaged nor heard from; spam/block once per consumer per window).
    #[test]
    fn integrity_counts_match_a_model(events in proptest::collection::vec(ev(), 1..60)) {
        let mut config = IntegrityConfig::default();
        config.window = Duration::from_secs(3600);
        let m = IntegrityMonitor::new(config).unwrap();
        let b = BusinessId::new(5).unwrap();
        let at = |t: u64| Timestamp::from_millis(START + t);
        let mut open: Option<u64> = None;
        let mut windows: BTreeMap<u64, W> = BTreeMap::new();
        // consumer -> last contact (sent or received), kept while known.
        let mut known: BTreeMap<u64, u64> = BTreeMap::new();
        let retention = 2 * HOUR;
        let policy = RetentionPolicy::default()
            .with_business(b, custodian::retention::BusinessRetention {
                periods: custodian::retention::Periods::both(Duration::from_millis(retention)),
                region: None,
            })
            .unwrap();
        let mut uniq: BTreeMap<u64, HashSet<u64>> = BTreeMap::new();
        let mut spam: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut blocks: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut last = 0;
        let mut cutoff = 0u64;
        for e in &events {
            let t = match *e { Ev::Sent(_, t) | Ev::Received(_, t) | Ev::Spam(_, t) | Ev::Block(_, t) | Ev::Export(t) | Ev::Expire(t) => t };
            last = last.max(t);
            // Events timestamped before the last retention cutoff are left
            // out (see the separate test of those).
            if !matches!(e, Ev::Expire(_) | Ev::Export(_)) && START + t < cutoff { continue; }
            let i = t / HOUR;
            let o = open.map_or(i, |o| o.max(i));
            match *e {
                Ev::Sent(c, t) => {
                    open = Some(o);
                    m.record_sent(b, consumer(c), at(t));
                    let w = windows.entry(o).or_default();
                    w.sent += 1;
                    if !known.contains_key(&c) { w.new += 1; }
                    if uniq.entry(o).or_default().insert(c) { w.unique += 1; }
                    let l = known.entry(c).or_insert(t); *l = (*l).max(t);
                }
                Ev::Received(c, t) => {
                    open = Some(o);
                    m.record_received(b, consumer(c), at(t));
                    windows.entry(o).or_default().received += 1;
                    let l = known.entry(c).or_insert(t); *l = (*l).max(t);
                }
                Ev::Spam(c, t) => {
                    open = Some(o);
                    m.record_spam_report(b, consumer(c), at(t));
                    if let std::collections::btree_map::Entry::Vacant(e) = spam.entry(o).or_default().entry(c) { e.insert(t); windows.entry(o).or_default().spam += 1; }
                }
                Ev::Block(c, t) => {
                    open = Some(o);
                    m.record_block(b, consumer(c), at(t));
                    if let std::collections::btree_map::Entry::Vacant(e) = blocks.entry(o).or_default().entry(c) { e.insert(t); windows.entry(o).or_default().blocks += 1; }
                }
                Ev::Export(t) => {
                    if open.is_some() { open = Some(o); }
                    drop(m.export(b, at(t)));
                }
                Ev::Expire(t) => {
                    if open.is_some() { open = Some(o); }
                    m.expire(at(t), &policy);
                    // kept: contact at or after t - retention + 1
                    let cut = (START + t).checked_sub(retention).map_or(0, |c| c + 1);
                    cutoff = cutoff.max(cut);
                    let gone: Vec<u64> = known.iter().filter(|(_, l)| START + **l < cut).map(|(c, _)| *c).collect();
                    known.retain(|_, l| START + *l >= cut);
                    // Documented: a consumer forgotten counts again if
                    // messaged again in the same window.
                    for u in uniq.values_mut() { for c in &gone { u.remove(c); } }
                    for m in spam.values_mut().chain(blocks.values_mut()) { m.retain(|_, r| START + *r >= cut); }
                }
            }
        }
        let Some(o) = open else { return Ok(()); };
        let _ = last; let now = at(o * HOUR);
        let r = signals(&m, b, now);
        let conv = |w: &custodian::integrity::WindowSignals| W {
            sent: w.sent, received: w.received, unique: w.unique_recipients,
            new: w.new_recipients, spam: w.spam_reports, blocks: w.blocks,
        };
        let mut got: Vec<(u64, W)> = r.history.iter().map(|w| ((w.period.start.as_millis() - START) / HOUR, conv(w))).collect();
        got.push(((r.current.period.start.as_millis() - START) / HOUR, conv(&r.current)));
        let want: Vec<(u64, W)> = windows.iter().filter(|(i, w)| **i == o || w.sent + w.received + w.spam + w.blocks > 0).map(|(i, w)| (*i, w.clone())).collect();
        let want = if want.last().is_some_and(|(i, _)| *i == o) { want } else { let mut v = want; v.push((o, W::default())); v };
        prop_assert_eq!(got, want);
    }
}

fn stats(c: &StatisticsCollector, b: BusinessId, now: Timestamp) -> Vec<StatisticsReport> {
    let g = gate(now);
    c.closed_reports(b, now)
        .into_iter()
        .map(|r| {
            g.release(r, Party::RestOfCompany, Purpose::Analytics)
                .unwrap()
                .into_value()
        })
        .collect()
}

/// A business keeping its messages a day, as long as a statistics period:
/// the sweep just after midnight forgets the consumers of the day that just
/// closed (`Processor::sweep` runs `StatisticsCollector::expire`), and the
/// export after it releases what it would have a minute before. (Totals
/// released because the parts withheld from them come from `k` consumers
/// together were withheld once those consumers were forgotten: such a
/// business never had them.)
#[test]
fn a_sweep_before_the_export_changes_nothing_it_releases() {
    use custodian::retention::{BusinessRetention, Periods};
    let b = BusinessId::new(9).unwrap();
    let build = || {
        let c = StatisticsCollector::new(StatisticsConfig::default()).unwrap();
        let t = Timestamp::from_millis(START + 1_000);
        for i in 0..10 {
            c.record_message(b, consumer(i), Direction::Outbound, Status::Sent, t);
        }
        for i in 0..5 {
            c.record_delivery(b, consumer(i), Duration::from_millis(500), t);
        }
        for i in 5..10 {
            c.record_delivery(b, consumer(i), Duration::from_secs(7_200), t);
        }
        c
    };
    let policy = RetentionPolicy::default()
        .with_business(
            b,
            BusinessRetention {
                periods: Periods::both(Duration::from_secs(24 * 3600)),
                region: None,
            },
        )
        .unwrap();
    let export_at = Timestamp::from_millis(START + DAY + 120_000);
    let unswept = stats(&build(), b, export_at);
    assert_eq!(unswept.len(), 1);
    let swept = build();
    swept.expire(Timestamp::from_millis(START + DAY + 60_000), &policy);
    assert_eq!(stats(&swept, b, export_at), unswept);
}

#[derive(Debug, Clone)]
enum Sev {
    Read(u64, bool, u64),
    Closed(u64),
    Take(u64),
    Expire(u64),
}

fn sev() -> impl Strategy<Value = Sev> {
    let t = 0u64..(8 * HOUR);
    prop_oneof![
        6 => (0u64..5, any::<bool>(), t.clone()).prop_map(|(c, d, t)| Sev::Read(c, d, t)),
        1 => t.clone().prop_map(Sev::Closed),
        1 => t.clone().prop_map(Sev::Take),
        1 => t.prop_map(Sev::Expire),
    ]
}

#[derive(Debug, Default, Clone)]
struct MB {
    messages: u64,
    consumers: HashSet<u64>,
    enough: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    /// periods, sealing, taking, retained
    /// periods and expiry of the statistics collector match a plain model,
    /// on buckets tied to no sum (read counts).
    #[test]
    fn statistics_periods_match_a_model(events in proptest::collection::vec(sev(), 1..60)) {
        let k = 2usize;
        let retained = 3usize;
        let mut config = StatisticsConfig::default();
        config.period = Duration::from_secs(3600);
        config.k = k;
        config.retained_periods = retained;
        let c = StatisticsCollector::new(config).unwrap();
        let b = BusinessId::new(5).unwrap();
        let at = |t: u64| Timestamp::from_millis(START + t);
        let retention = 2 * HOUR;
        let policy = RetentionPolicy::default()
            .with_business(b, custodian::retention::BusinessRetention {
                periods: custodian::retention::Periods::both(Duration::from_millis(retention)),
                region: None,
            })
            .unwrap();
        let mut periods: BTreeMap<u64, [MB; 2]> = BTreeMap::new();
        let mut sealed = 0u64;
        let mut seen = false;
        let reports = |periods: &BTreeMap<u64, [MB; 2]>, open: u64| -> Vec<(u64, Vec<(bool, u64)>)> {
            periods.range(..open).filter_map(|(i, p)| {
                let m: Vec<(bool, u64)> = p.iter().enumerate()
                    .filter(|(_, bk)| bk.messages > 0 && (bk.enough || bk.consumers.len() >= k))
                    .map(|(d, bk)| (d == 1, bk.messages)).collect();
                (!m.is_empty()).then_some((*i, m))
            }).collect()
        };
        let got = |rs: Vec<custodian::visibility::Labelled<StatisticsReport>>, now| -> Vec<(u64, Vec<(bool, u64)>)> {
            let g = gate(now);
            rs.into_iter().map(|r| {
                let r = g.release(r, Party::RestOfCompany, Purpose::Analytics).unwrap().into_value();
                ((r.period.start.as_millis() - START) / HOUR,
                 r.messages.iter().map(|m| (m.direction == Direction::Outbound, m.messages)).collect())
            }).collect()
        };
        for e in &events {
            match *e {
                Sev::Read(cn, out, t) => {
                    seen = true;
                    let dir = if out { Direction::Outbound } else { Direction::Inbound };
                    c.record_message(b, consumer(cn), dir, Status::Read, at(t));
                    let i = (t / HOUR).max(sealed);
                    let bk = &mut periods.entry(i).or_default()[usize::from(out)];
                    bk.messages += 1;
                    if bk.consumers.len() < k { bk.consumers.insert(cn); }
                    while periods.len() > retained { periods.pop_first(); }
                }
                Sev::Closed(t) => {
                    let open = t / HOUR;
                    let g = got(c.closed_reports(b, at(t)), at(t));
                    if seen { sealed = sealed.max(open); }
                    prop_assert_eq!(g, reports(&periods, open), "closed at {}", t);
                }
                Sev::Take(t) => {
                    let open = t / HOUR;
                    let g = got(c.take_closed_of(b, at(t)), at(t));
                    if seen { sealed = sealed.max(open); }
                    prop_assert_eq!(g, reports(&periods, open), "take at {}", t);
                    periods = periods.split_off(&open);
                }
                Sev::Expire(t) => {
                    c.expire(at(t), &policy);
                    if seen {
                        let now = START + t;
                        let below = ((now.saturating_sub(retention)) / HOUR + 1).min(now / HOUR).saturating_sub(START / HOUR);
                        sealed = sealed.max(below);
                        for (_, p) in periods.range_mut(..below) {
                            for bk in p.iter_mut() {
                                bk.enough = bk.enough || bk.consumers.len() >= k;
                                bk.consumers.clear();
                            }
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    /// in a period whose messages all settled in
    /// it (so the sums are exact), no suppressed bucket is the only unknown
    /// of a sum (latency buckets = outbound delivered; outbound sent =
    /// delivered + failed, sent known from billing; inbound sent =
    /// delivered + failed).
    #[test]
    fn no_suppressed_bucket_is_the_only_unknown_of_a_sum(
        out in proptest::collection::vec((0u64..7, proptest::option::of(0usize..7)), 0..25),
        inb in proptest::collection::vec((0u64..7, any::<bool>()), 0..25),
    ) {
        let k = 3;
        let mut config = StatisticsConfig::default();
        config.k = k;
        let c = StatisticsCollector::new(config).unwrap();
        let b = BusinessId::new(5).unwrap();
        let t = Timestamp::from_millis(START + 10);
        let lat_ms = [500u64, 2_000, 10_000, 40_000, 100_000, 1_000_000, 5_000_000];
        // Truth per bucket: (messages, distinct consumers).
        let mut truth: BTreeMap<&str, (u64, HashSet<u64>)> = BTreeMap::new();
        let mut add = |name: &'static str, cn: u64| { let e = truth.entry(name).or_default(); e.0 += 1; e.1.insert(cn); };
        const LAT: [&str; 7] = ["l0", "l1", "l2", "l3", "l4", "l5", "l6"];
        let mut billed = 0;
        for &(cn, fate) in &out {
            c.record_message(b, consumer(cn), Direction::Outbound, Status::Sent, t);
            billed += 1;
            add("os", cn);
            match fate {
                Some(l) => {
                    c.record_delivery(b, consumer(cn), Duration::from_millis(lat_ms[l]), t);
                    add("od", cn);
                    add(LAT[l], cn);
                }
                None => {
                    c.record_message(b, consumer(cn), Direction::Outbound, Status::Failed, t);
                    add("of", cn);
                }
            }
        }
        for &(cn, ok) in &inb {
            c.record_message(b, consumer(cn), Direction::Inbound, Status::Sent, t);
            add("is", cn);
            if ok {
                c.record_message(b, consumer(cn), Direction::Inbound, Status::Delivered, t);
                add("id", cn);
            } else {
                c.record_message(b, consumer(cn), Direction::Inbound, Status::Failed, t);
                add("if", cn);
            }
        }
        let now = Timestamp::from_millis(START + DAY);
        let reports = stats(&c, b, now);
        let mut known: BTreeMap<&str, u64> = BTreeMap::new();
        if let Some(r) = reports.first() {
            for m in &r.messages {
                let name = match (m.direction, m.status) {
                    (Direction::Outbound, Status::Sent) => "os",
                    (Direction::Outbound, Status::Delivered) => "od",
                    (Direction::Outbound, Status::Failed) => "of",
                    (Direction::Inbound, Status::Sent) => "is",
                    (Direction::Inbound, Status::Delivered) => "id",
                    (Direction::Inbound, Status::Failed) => "if",
                    _ => continue,
                };
                known.insert(name, m.messages);
            }
            for l in &r.delivery_latency {
                let idx = match l.up_to_ms { Some(u) => custodian::integrity::LATENCY_BOUNDS_MS.iter().position(|&x| x == u).unwrap(), None => 6 };
                known.insert(LAT[idx], l.messages);
            }
        }
        // Billing makes outbound sent known.
        known.insert("os", billed);
        let suppressed = |n: &str| truth.get(n).is_some_and(|(m, cs)| *m > 0 && cs.len() < k);
        let mut sums: Vec<Vec<&str>> = Vec::new();
        let mut e1: Vec<&str> = LAT.to_vec(); e1.push("od");
        let mut e2: Vec<&str> = LAT.to_vec(); e2.push("of"); e2.push("os");
        sums.push(e1); sums.push(e2); sums.push(vec!["os", "od", "of"]); sums.push(vec!["is", "id", "if"]);
        for s in &sums {
            let unknown: Vec<&&str> = s.iter().filter(|n| !known.contains_key(**n)).collect();
            if unknown.len() == 1 {
                prop_assert!(!suppressed(unknown[0]), "{} derivable from {:?}: known {:?}, truth {:?}", unknown[0], s, known, truth.iter().map(|(n, (m, cs))| (*n, *m, cs.len())).collect::<Vec<_>>());
            }
        }
    }
}
