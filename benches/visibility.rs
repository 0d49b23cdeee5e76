//! Policy decisions and releases.
//!
//! - `decision/one_cell`: [`VisibilityPolicy::allows`] for one cell;
//! - `decision/all_cells`: all 168 cells (throughput: decisions per second);
//! - `release/*`: [`Gate::release`] of a small value, with the in-memory
//!   audit sink (bounded ring): allowed, denied, and allowed with the system
//!   clock; and allowed with the JSON-lines sink (buffered, into
//!   `io::sink()`: the cost of encoding the event).
//!
//! Target: a release with the in-memory sink under 200 ns. The comparison
//! with Cedar over the same table lives in `bench-cedar/` (cedar-policy is
//! too heavy for this crate's dev-dependencies).
//!
//! Run: `cargo bench --bench visibility`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custodian::ids::BusinessId;
use custodian::time::{ManualClock, SystemClock, Timestamp};
use custodian::visibility::{
    DataClass, FlushPolicy, Gate, JsonLinesSink, Labelled, MemoryAuditSink, Party, Purpose,
    VisibilityPolicy,
};

fn decisions(c: &mut Criterion) {
    let policy = VisibilityPolicy::published();
    let mut cells = Vec::new();
    for &party in Party::ALL {
        for &class in DataClass::ALL {
            for &purpose in Purpose::ALL {
                cells.push((party, class, purpose));
            }
        }
    }

    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_cell", |b| {
        b.iter(|| {
            black_box(&policy).allows(
                black_box(Party::Transport),
                black_box(DataClass::ConsumerPhoneNumber),
                black_box(Purpose::Delivery),
            )
        })
    });
    g.throughput(Throughput::Elements(cells.len() as u64));
    g.bench_function("all_cells", |b| {
        b.iter(|| {
            let policy = black_box(&policy);
            black_box(&cells)
                .iter()
                .filter(|&&(p, c, u)| policy.allows(p, c, u))
                .count()
        })
    });
    g.finish();
}

fn releases(c: &mut Criterion) {
    let business = BusinessId::new(42).unwrap();
    let manual = Arc::new(ManualClock::new(Timestamp::from_millis(1_767_225_600_000)));
    let memory = Gate::new(
        VisibilityPolicy::published(),
        Arc::new(MemoryAuditSink::bounded(4096)),
        manual.clone(),
    );
    let system = Gate::new(
        VisibilityPolicy::published(),
        Arc::new(MemoryAuditSink::bounded(4096)),
        Arc::new(SystemClock),
    );
    let lines = Gate::new(
        VisibilityPolicy::published(),
        Arc::new(JsonLinesSink::new(std::io::sink(), FlushPolicy::BUFFERED)),
        manual,
    );
    let phone =
        || Labelled::of_business(DataClass::ConsumerPhoneNumber, business, 447_700_900_123u64);

    let mut g = c.benchmark_group("release");
    g.throughput(Throughput::Elements(1));
    g.bench_function("allowed_memory_sink", |b| {
        b.iter(|| {
            memory
                .release(black_box(phone()), Party::Transport, Purpose::Delivery)
                .is_ok()
        })
    });
    g.bench_function("denied_memory_sink", |b| {
        b.iter(|| {
            memory
                .release(black_box(phone()), Party::RestOfCompany, Purpose::Analytics)
                .is_ok()
        })
    });
    g.bench_function("allowed_memory_sink_system_clock", |b| {
        b.iter(|| {
            system
                .release(black_box(phone()), Party::Transport, Purpose::Delivery)
                .is_ok()
        })
    });
    g.bench_function("allowed_json_lines_buffered", |b| {
        b.iter(|| {
            lines
                .release(black_box(phone()), Party::Transport, Purpose::Delivery)
                .is_ok()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = decisions, releases
}
criterion_main!(benches);
