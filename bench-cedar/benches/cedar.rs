//! custodian's compiled visibility table beside the same table as Cedar
//! policies (`visibility.cedar`), in one run.
//!
//! - `ours/one_cell`, `cedar/one_cell`: one decision (transport, consumer
//!   phone number, delivery), inputs prepared beforehand;
//! - `ours/all_cells`, `cedar/all_cells`: all 168 cells (4 parties x 6
//!   classes x 7 purposes); throughput is decisions per second.
//!
//! Before timing, every cell is checked to decide the same in both.
//! Target: ours at least 100x faster per decision.
//!
//! Run: `CARGO_TARGET_DIR=/work/main/target/bench-cedar cargo bench`
//! from `bench-cedar/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark: a failure should stop it loudly"
)]

use std::hint::black_box;
use std::time::Duration;

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custodian::visibility::{DataClass, Party, Purpose, VisibilityPolicy};

const POLICIES: &str = include_str!("../visibility.cedar");

fn uid(kind: &str, name: &str) -> EntityUid {
    format!("{kind}::\"{name}\"").parse().expect("entity uid")
}

fn request(party: Party, class: DataClass, purpose: Purpose) -> Request {
    Request::new(
        uid("Party", party.as_str()),
        uid("Action", purpose.as_str()),
        uid("DataClass", class.as_str()),
        Context::empty(),
        None,
    )
    .expect("request")
}

fn cells() -> Vec<(Party, DataClass, Purpose)> {
    let mut cells = Vec::new();
    for &party in Party::ALL {
        for &class in DataClass::ALL {
            for &purpose in Purpose::ALL {
                cells.push((party, class, purpose));
            }
        }
    }
    cells
}

fn compare(c: &mut Criterion) {
    let ours = VisibilityPolicy::published();
    let policies: PolicySet = POLICIES.parse().expect("visibility.cedar parses");
    let authorizer = Authorizer::new();
    let entities = Entities::empty();
    let cells = cells();
    let requests: Vec<Request> = cells.iter().map(|&(p, c, u)| request(p, c, u)).collect();

    // Same table: every cell decides alike.
    for (&(party, class, purpose), req) in cells.iter().zip(&requests) {
        let cedar = authorizer.is_authorized(req, &policies, &entities).decision() == Decision::Allow;
        assert_eq!(
            ours.allows(party, class, purpose),
            cedar,
            "({party}, {class}, {purpose}) differs"
        );
    }
    eprintln!("cedar and custodian agree on all {} cells", cells.len());

    let one = (Party::Transport, DataClass::ConsumerPhoneNumber, Purpose::Delivery);
    let one_req = request(one.0, one.1, one.2);

    let mut g = c.benchmark_group("decision/one_cell");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ours", |b| {
        b.iter(|| black_box(&ours).allows(black_box(one.0), black_box(one.1), black_box(one.2)))
    });
    g.bench_function("cedar", |b| {
        b.iter(|| {
            authorizer
                .is_authorized(black_box(&one_req), &policies, &entities)
                .decision()
                == Decision::Allow
        })
    });
    g.finish();

    let mut g = c.benchmark_group("decision/all_cells");
    g.throughput(Throughput::Elements(cells.len() as u64));
    g.bench_function("ours", |b| {
        b.iter(|| {
            let policy = black_box(&ours);
            black_box(&cells)
                .iter()
                .filter(|&&(p, c, u)| policy.allows(p, c, u))
                .count()
        })
    });
    g.bench_function("cedar", |b| {
        b.iter(|| {
            black_box(&requests)
                .iter()
                .filter(|r| authorizer.is_authorized(r, &policies, &entities).decision() == Decision::Allow)
                .count()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = compare
}
criterion_main!(benches);
