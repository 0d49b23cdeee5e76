//! The visibility policy through the public API: the published table cell by
//! cell, the hard rules against every loadable policy, policy files, labelled
//! values and the audit trail.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use custodian::ids::BusinessId;
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::visibility::{
    Change, DataClass, Decision, DenyReason, FlushPolicy, Gate, HardRule, JsonLinesSink, Labelled,
    MemoryAuditSink, Party, PolicyError, Purpose, Revision, System, Verdict, VisibilityPolicy,
};
use proptest::prelude::*;

const Y: bool = true;
const N: bool = false;

/// Columns of `PUBLISHED`, in this order.
const COLUMNS: [Purpose; 7] = [
    Purpose::Delivery,
    Purpose::Retransmission,
    Purpose::Integrity,
    Purpose::Billing,
    Purpose::Analytics,
    Purpose::Advertising,
    Purpose::OptInService,
];

/// The published table (the module docs), every cell written out:
/// delivery, retransmission, integrity, billing, analytics, advertising, opt-in service.
#[rustfmt::skip]
const PUBLISHED: [(Party, DataClass, [bool; 7]); 24] = {
    use DataClass::*;
    use Party::*;
    [
        //                                        del ret int bil ana adv opt
        (Processor,     MessageContent,            [Y,  Y,  N,  N,  N,  N,  N]),
        (Processor,     ConsumerPhoneNumber,       [Y,  Y,  N,  N,  N,  N,  N]),
        (Processor,     NonIdentifiableStatistics, [N,  N,  N,  N,  Y,  N,  N]),
        (Processor,     IntegritySignals,          [N,  N,  N,  N,  N,  N,  N]),
        (Processor,     BusinessInformation,       [Y,  Y,  Y,  Y,  N,  N,  N]),
        (Processor,     Billing,                   [N,  N,  N,  Y,  N,  N,  N]),

        (Business,      MessageContent,            [Y,  N,  N,  N,  N,  N,  N]),
        (Business,      ConsumerPhoneNumber,       [Y,  N,  N,  N,  N,  N,  N]),
        (Business,      NonIdentifiableStatistics, [N,  N,  N,  N,  Y,  N,  N]),
        (Business,      IntegritySignals,          [N,  N,  N,  N,  N,  N,  N]),
        (Business,      BusinessInformation,       [Y,  N,  N,  Y,  N,  N,  N]),
        (Business,      Billing,                   [N,  N,  N,  Y,  N,  N,  N]),

        (Transport,     MessageContent,            [N,  N,  N,  N,  N,  N,  N]),
        (Transport,     ConsumerPhoneNumber,       [Y,  Y,  Y,  N,  N,  N,  N]),
        (Transport,     NonIdentifiableStatistics, [N,  N,  N,  N,  Y,  N,  N]),
        (Transport,     IntegritySignals,          [N,  N,  Y,  N,  N,  N,  N]),
        (Transport,     BusinessInformation,       [Y,  Y,  Y,  Y,  N,  N,  N]),
        (Transport,     Billing,                   [N,  N,  N,  Y,  N,  N,  N]),

        (RestOfCompany, MessageContent,            [N,  N,  N,  N,  N,  N,  N]),
        (RestOfCompany, ConsumerPhoneNumber,       [N,  N,  N,  N,  N,  N,  N]),
        (RestOfCompany, NonIdentifiableStatistics, [N,  N,  N,  N,  Y,  N,  N]),
        (RestOfCompany, IntegritySignals,          [N,  N,  N,  N,  N,  N,  N]),
        (RestOfCompany, BusinessInformation,       [N,  N,  N,  Y,  Y,  N,  N]),
        (RestOfCompany, Billing,                   [N,  N,  N,  Y,  N,  N,  N]),
    ]
};

#[test]
fn published_policy_equals_the_published_table_cell_by_cell() {
    // The table above covers every (party, class) exactly once...
    let rows: HashSet<(Party, DataClass)> = PUBLISHED.iter().map(|(p, c, _)| (*p, *c)).collect();
    assert_eq!(rows.len(), Party::ALL.len() * DataClass::ALL.len());
    assert_eq!(COLUMNS.len(), Purpose::ALL.len());
    assert_eq!(HashSet::from(COLUMNS).len(), Purpose::ALL.len());

    // ...and the default policy agrees with it on all 168 cells.
    let policy = VisibilityPolicy::default();
    assert_eq!(policy, VisibilityPolicy::published());
    assert_eq!(policy.revision(), Revision::PUBLISHED);
    let mut checked = 0;
    for (party, class, row) in PUBLISHED {
        for (purpose, expected) in COLUMNS.into_iter().zip(row) {
            assert_eq!(
                policy.allows(party, class, purpose),
                expected,
                "({party}, {class}, {purpose})"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 168);
}

#[test]
fn system_of_record_of_each_class_is_the_published_one() {
    let p = VisibilityPolicy::published();
    let expected = [
        (DataClass::MessageContent, System::Processor),
        (DataClass::ConsumerPhoneNumber, System::Processor),
        (DataClass::NonIdentifiableStatistics, System::Processor),
        (DataClass::IntegritySignals, System::TransportClient),
        (DataClass::BusinessInformation, System::BusinessManager),
        (DataClass::Billing, System::Transport),
    ];
    assert_eq!(expected.len(), DataClass::ALL.len());
    for (class, system) in expected {
        assert_eq!(p.system_of_record(class), system, "{class}");
    }
}

fn hard_rules_hold(policy: &VisibilityPolicy) -> Result<(), String> {
    for &party in Party::ALL {
        for &class in DataClass::ALL {
            for &purpose in Purpose::ALL {
                let allowed = policy.allows(party, class, purpose);
                let content_out = class == DataClass::MessageContent
                    && matches!(party, Party::Transport | Party::RestOfCompany);
                let advertising = purpose == Purpose::Advertising;
                let opt_in_outside = purpose == Purpose::OptInService && party != Party::Processor;
                if allowed && (content_out || advertising || opt_in_outside) {
                    return Err(format!("({party}, {class}, {purpose}) is allowed"));
                }
            }
        }
    }
    Ok(())
}

/// Writes entries as a TOML policy file, independently of the crate's writer.
fn toml_file(revision: u64, entries: &[(String, String, Vec<String>)]) -> String {
    let mut s = format!("revision = {revision}\n");
    for (party, class, purposes) in entries {
        let list: Vec<String> = purposes.iter().map(|p| format!("\"{p}\"")).collect();
        s += &format!(
            "\n[[allow]]\nparty = \"{party}\"\nclass = \"{class}\"\npurposes = [{}]\n",
            list.join(", ")
        );
    }
    s
}

/// Writes entries as a JSON policy file with serde_json.
fn json_file(revision: u64, entries: &[(String, String, Vec<String>)]) -> String {
    let allow: Vec<_> = entries
        .iter()
        .map(|(party, class, purposes)| {
            serde_json::json!({"party": party, "class": class, "purposes": purposes})
        })
        .collect();
    serde_json::json!({"revision": revision, "allow": allow}).to_string()
}

fn any_party() -> impl Strategy<Value = Party> {
    proptest::sample::select(Party::ALL)
}
fn any_class() -> impl Strategy<Value = DataClass> {
    proptest::sample::select(DataClass::ALL)
}
fn any_purpose() -> impl Strategy<Value = Purpose> {
    proptest::sample::select(Purpose::ALL)
}

/// Allow lists a user could write: one entry per (party, class), any purposes.
fn any_allow_list() -> impl Strategy<Value = BTreeMap<(Party, DataClass), Vec<Purpose>>> {
    proptest::collection::btree_map(
        (any_party(), any_class()),
        proptest::collection::vec(any_purpose(), 1..=7).prop_map(|mut v| {
            let mut seen = HashSet::new();
            v.retain(|p| seen.insert(*p));
            v
        }),
        0..=24,
    )
}

fn as_names(
    list: &BTreeMap<(Party, DataClass), Vec<Purpose>>,
) -> Vec<(String, String, Vec<String>)> {
    list.iter()
        .map(|((party, class), purposes)| {
            (
                party.to_string(),
                class.to_string(),
                purposes.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

/// Names a file could hold: valid, misspelt, or made up.
fn any_name(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(valid).prop_map(str::to_owned),
        1 => "[a-z_]{0,12}",
        1 => proptest::sample::select(valid).prop_map(|s| s.to_uppercase()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every policy a user can load keeps the hard rules; a file that reaches
    /// for a forbidden cell is refused with an error naming that cell.
    #[test]
    fn no_loadable_policy_breaks_a_hard_rule(revision in 1u64..=1_000_000, list in any_allow_list()) {
        let entries = as_names(&list);
        let forbidden: HashSet<(Party, DataClass, Purpose)> = list
            .iter()
            .flat_map(|(&(party, class), purposes)| purposes.iter().map(move |&p| (party, class, p)))
            .filter(|&(party, class, purpose)| HardRule::breaking(party, class, purpose).is_some())
            .collect();

        for loaded in [
            VisibilityPolicy::from_toml(&toml_file(revision, &entries)),
            VisibilityPolicy::from_json(&json_file(revision, &entries)),
        ] {
            match loaded {
                Ok(policy) => {
                    prop_assert!(forbidden.is_empty(), "loaded despite {forbidden:?}");
                    prop_assert_eq!(hard_rules_hold(&policy), Ok(()));
                    prop_assert_eq!(policy.revision().get(), revision);
                    // Default deny: exactly the listed cells are allowed.
                    for &party in Party::ALL {
                        for &class in DataClass::ALL {
                            for &purpose in Purpose::ALL {
                                let listed = list
                                    .get(&(party, class))
                                    .is_some_and(|ps| ps.contains(&purpose));
                                prop_assert_eq!(policy.allows(party, class, purpose), listed);
                            }
                        }
                    }
                }
                Err(PolicyError::HardRule { field, violation }) => {
                    let cell = (violation.party, violation.class, violation.purpose);
                    prop_assert!(forbidden.contains(&cell), "{cell:?} not forbidden");
                    let message = PolicyError::HardRule { field: field.clone(), violation }.to_string();
                    let named = format!("({}, {}, {})", cell.0, cell.1, cell.2);
                    prop_assert!(message.contains(&named), "{message}");
                    prop_assert!(field.starts_with("allow["), "{field}");
                }
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }

    /// Arbitrary files (unknown names, duplicates, empty lists) never panic
    /// the loader, never yield a policy breaking a hard rule, and every
    /// refusal names where the problem is.
    #[test]
    fn arbitrary_policy_files_never_loosen_a_hard_rule(
        revision in 0u64..4,
        raw in proptest::collection::vec(
            (
                any_name(Party::NAMES),
                any_name(DataClass::NAMES),
                proptest::collection::vec(any_name(Purpose::NAMES), 0..5),
            ),
            0..12,
        ),
    ) {
        for loaded in [
            VisibilityPolicy::from_toml(&toml_file(revision, &raw)),
            VisibilityPolicy::from_json(&json_file(revision, &raw)),
        ] {
            match loaded {
                Ok(policy) => prop_assert_eq!(hard_rules_hold(&policy), Ok(())),
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(m.starts_with("allow[") || m.starts_with("revision"), "{m}");
                }
            }
        }
    }

    /// Any policy round-trips through its TOML and its JSON file.
    #[test]
    fn policy_files_round_trip(revision in 1u64..=Revision::MAX.get(), list in any_allow_list()) {
        let mut b = VisibilityPolicy::builder(revision).unwrap();
        for (&(party, class), purposes) in &list {
            for &purpose in purposes {
                let _ = b.allow(party, class, purpose); // forbidden cells are refused
            }
        }
        let policy = b.build();
        prop_assert_eq!(VisibilityPolicy::from_toml(&policy.to_toml()).unwrap(), policy);
        prop_assert_eq!(VisibilityPolicy::from_json(&policy.to_json()).unwrap(), policy);
        prop_assert_eq!(policy.to_file().compile().unwrap(), policy);
    }
}

#[test]
fn the_published_table_round_trips_once_given_a_revision() {
    let policy = VisibilityPolicy::published().to_builder(2).unwrap().build();
    let toml = policy.to_toml();
    assert!(toml.contains("revision = 2\n"), "{toml}");
    assert!(toml.contains(
        "[[allow]]\nparty = \"transport\"\nclass = \"consumer_phone_number\"\npurposes = [\"delivery\", \"retransmission\", \"integrity\"]\n"
    ), "{toml}");
    assert_eq!(VisibilityPolicy::from_toml(&toml).unwrap(), policy);
    assert_eq!(
        VisibilityPolicy::from_json(&policy.to_json()).unwrap(),
        policy
    );
    let json: serde_json::Value = serde_json::from_str(&policy.to_json()).unwrap();
    assert_eq!(json["revision"], 2);
    assert_eq!(json["allow"].as_array().unwrap().len(), 18);
}

#[test]
fn bad_policy_files_name_the_field_or_the_cell() {
    let entry = |party: &str, class: &str, purposes: &str| {
        format!("[[allow]]\nparty = \"{party}\"\nclass = \"{class}\"\npurposes = {purposes}\n")
    };
    let good = entry("processor", "billing", "[\"billing\"]");
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "revision = 2\n{}",
                entry("transprt", "billing", "[\"billing\"]")
            ),
            "allow[0].party: unknown party \"transprt\"",
        ),
        (
            format!(
                "revision = 2\n{good}{}",
                entry("transport", "bills", "[\"billing\"]")
            ),
            "allow[1].class: unknown class \"bills\"",
        ),
        (
            format!(
                "revision = 2\n{}",
                entry(
                    "transport",
                    "billing",
                    "[\"billing\", \"integrity\", \"ads\"]"
                )
            ),
            "allow[0].purposes[2]: unknown purpose \"ads\"",
        ),
        (
            format!(
                "revision = 2\n{}",
                entry("rest_of_company", "message_content", "[\"analytics\"]")
            ),
            "allow[0].purposes[0]: (rest_of_company, message_content, analytics) is forbidden by a hard rule",
        ),
        (
            format!(
                "revision = 2\n{good}{}",
                entry("transport", "message_content", "[\"delivery\"]")
            ),
            "allow[1].purposes[0]: (transport, message_content, delivery)",
        ),
        (
            format!(
                "revision = 2\n{}",
                entry("processor", "billing", "[\"billing\", \"advertising\"]")
            ),
            "allow[0].purposes[1]: (processor, billing, advertising) is forbidden by a hard rule: nothing is released for advertising",
        ),
        (
            format!(
                "revision = 2\n{}",
                entry("business", "message_content", "[\"opt_in_service\"]")
            ),
            "(business, message_content, opt_in_service) is forbidden by a hard rule: only the processor",
        ),
        (
            format!("revision = 2\n{good}{good}"),
            "allow[1]: a second entry for (processor, billing); the first is allow[0]",
        ),
        (
            format!(
                "revision = 2\n{}",
                entry("processor", "billing", "[\"billing\", \"billing\"]")
            ),
            "allow[0].purposes[1]: billing is listed twice",
        ),
        (
            format!("revision = 2\n{}", entry("processor", "billing", "[]")),
            "allow[0].purposes: an entry must list at least one purpose",
        ),
        (
            format!("revision = 0\n{good}"),
            "revision: a policy's revision must be 1",
        ),
        (format!("revison = 2\n{good}"), "unknown field `revison`"),
        (
            format!("revision = 2\n{}", entry("processor", "billing", "\"billing\"")),
            "allow[0].purposes: TOML parse error at line 5",
        ),
        (good.clone(), "missing field `revision`"),
        (
            "revision = 2\n[[allow]]\nparty = \"processor\"\nclass = \"billing\"\npurposes = [\"billing\"]\nwhy = \"x\"\n"
                .to_owned(),
            "unknown field `why`",
        ),
        (format!("revision = -1\n{good}"), "revision"),
    ];
    for (text, expected) in &cases {
        let err = VisibilityPolicy::from_toml(text).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "TOML {text:?}\n  gave {err:?}\n  expected {expected:?}"
        );
    }

    let json_cases = [
        (
            r#"{"revision": 2, "allow": [{"party": "nobody", "class": "billing", "purposes": ["billing"]}]}"#,
            "allow[0].party: unknown party \"nobody\"",
        ),
        (
            r#"{"revision": 2, "allow": [{"party": "transport", "class": "message_content", "purposes": ["retransmission"]}]}"#,
            "(transport, message_content, retransmission)",
        ),
        (
            r#"{"revision": 2, "allow": [], "extra": 1}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"revision": 2, "allow": [{"party": "transport", "class": "billing"}]}"#,
            "allow[0]: missing field `purposes`",
        ),
        (
            r#"{"revision": 2, "allow": [{"party": "transport", "class": "billing", "purposes": "billing"}]}"#,
            "allow[0].purposes: invalid type: string \"billing\", expected a sequence at line 1",
        ),
        (r#"{"revision": "2"}"#, "revision: invalid type"),
        (r#"{"revision": 2"#, "JSON policy file"),
    ];
    for (text, expected) in json_cases {
        let err = VisibilityPolicy::from_json(text).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "JSON {text}\n  gave {err:?}\n  expected {expected:?}"
        );
    }
}

/// A policy file nesting arrays or inline tables very deep is refused with
/// an error, never a stack overflow: the parsers bound their depth.
#[test]
fn deeply_nested_policy_files_are_refused_not_crashed() {
    // On a thread of the default test stack, 2 MiB.
    let refused = |parse: fn(&str) -> bool, text: String| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse(&text))
            .unwrap()
            .join()
            .expect("the parser panicked")
    };
    let toml = |t: &str| VisibilityPolicy::from_toml(t).is_err();
    let json = |t: &str| VisibilityPolicy::from_json(t).is_err();
    for depth in [1_000, 100_000] {
        let (open, close) = ("[".repeat(depth), "]".repeat(depth));
        assert!(
            refused(toml, format!("revision = 1\nx = {open}{close}\n")),
            "{depth}"
        );
        assert!(
            refused(json, format!("{{\"revision\":1,\"x\":{open}{close}}}")),
            "{depth}"
        );
        let (open, close) = ("{a=".repeat(depth), "}".repeat(depth));
        assert!(
            refused(toml, format!("revision = 1\nx = {open}1{close}\n")),
            "{depth}"
        );
    }
}

/// A policy built in code cannot carry [`Revision::PUBLISHED`] (0), nor a
/// revision beyond [`Revision::MAX`]: the trail names revision 0 for the
/// published table only. Before, `builder` and `to_builder` took any
/// `Revision`, and `Revision::PUBLISHED` is a public constant: a deployment
/// that loosened the published table "keeping its revision" had every
/// decision of its gate audited as the published table's, releases the
/// published table denies included.
#[test]
fn a_policy_built_in_code_cannot_claim_the_published_revision() {
    let published = VisibilityPolicy::published();
    for revision in [Revision::PUBLISHED.get(), Revision::MAX.get() + 1, u64::MAX] {
        assert!(matches!(
            published.to_builder(revision),
            Err(PolicyError::Revision { revision: r }) if r == revision
        ));
        assert!(matches!(
            VisibilityPolicy::builder(revision),
            Err(PolicyError::Revision { revision: r }) if r == revision
        ));
    }
    assert_eq!(
        VisibilityPolicy::builder(0).unwrap_err().to_string(),
        "revision: a policy's revision must be 1 to 9223372036854775807 (0 is the published table), not 0"
    );
    let max = published.to_builder(Revision::MAX.get()).unwrap().build();
    assert_eq!(max.revision(), Revision::MAX);
}

#[test]
fn load_reads_toml_and_json_by_extension() {
    let policy = VisibilityPolicy::published().to_builder(5).unwrap().build();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("policy.toml");
    std::fs::write(&toml, policy.to_toml()).unwrap();
    assert_eq!(VisibilityPolicy::load(&toml).unwrap(), policy);
    let json = dir.path().join("policy.JSON");
    std::fs::write(&json, policy.to_json()).unwrap();
    assert_eq!(VisibilityPolicy::load(&json).unwrap(), policy);

    let yaml = dir.path().join("policy.yaml");
    std::fs::write(&yaml, "revision: 5").unwrap();
    assert!(matches!(
        VisibilityPolicy::load(&yaml),
        Err(PolicyError::UnknownFormat { .. })
    ));
    let missing = dir.path().join("missing.toml");
    assert!(matches!(
        VisibilityPolicy::load(&missing),
        Err(PolicyError::Io { .. })
    ));
}

const START: u64 = 1_767_225_600_000;

struct Harness {
    gate: Gate,
    audit: Arc<MemoryAuditSink>,
    clock: ManualClock,
}

fn harness(policy: VisibilityPolicy) -> Harness {
    let audit = Arc::new(MemoryAuditSink::new());
    let clock = ManualClock::new(Timestamp::from_millis(START));
    let gate = Gate::new(policy, audit.clone(), Arc::new(clock.clone()));
    Harness { gate, audit, clock }
}

/// A distinctive secret per class, so a leak of any of them shows.
fn secret(class: DataClass, i: usize) -> String {
    format!("SECRET-{class}-{i}-7f3a9c")
}

#[test]
fn every_release_is_audited_once_and_no_event_holds_the_value() {
    let h = harness(VisibilityPolicy::published());
    let business = BusinessId::new(77).unwrap();
    let mut decisions: Vec<Decision> = Vec::new();
    let mut secrets = Vec::new();
    let mut i = 0;
    for &class in DataClass::ALL {
        for &party in Party::ALL {
            for &purpose in Purpose::ALL {
                i += 1;
                let value = secret(class, i);
                secrets.push(value.clone());
                let labelled = if i % 2 == 0 {
                    Labelled::of_business(class, business, value.clone())
                } else {
                    Labelled::new(class, value.clone())
                };
                assert!(!format!("{labelled:?}").contains(&value));
                h.clock.advance(Duration::from_millis(3));
                let expected = VisibilityPolicy::published().allows(party, class, purpose);
                let decision = match h.gate.release(labelled, party, purpose) {
                    Ok(released) => {
                        assert!(expected, "({party}, {class}, {purpose}) released");
                        assert_eq!(released.value(), &value);
                        assert!(!format!("{released:?}").contains(&value));
                        *released.decision()
                    }
                    Err(denied) => {
                        assert!(!expected, "({party}, {class}, {purpose}) denied");
                        assert_eq!(denied.reason(), DenyReason::Policy);
                        assert!(!format!("{denied:?} {denied}").contains(&value));
                        let decision = *denied.decision();
                        // Denied values come back still labelled, and still opaque.
                        let back = denied.into_labelled();
                        assert_eq!(back.class(), class);
                        decision
                    }
                };
                assert_eq!(decision.party, party);
                assert_eq!(decision.class, class);
                assert_eq!(decision.purpose, purpose);
                assert_eq!(decision.is_allowed(), expected);
                assert_eq!(
                    decision.verdict,
                    if expected {
                        Verdict::Allow
                    } else {
                        Verdict::Deny
                    }
                );
                assert_eq!(decision.revision, Revision::PUBLISHED);
                assert_eq!(decision.at, h.clock.now());
                assert_eq!(decision.business, (i % 2 == 0).then_some(business));
                decisions.push(decision);
            }
        }
    }

    // Exactly one event per release, in order, equal to what the caller got.
    let events = h.audit.events();
    assert_eq!(events.len(), 168);
    assert_eq!(events, decisions);
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len(), "decision ids repeat");
    assert_eq!(
        events.iter().filter(|e| e.is_allowed()).count(),
        count_allowed()
    );

    // No event, serialized, holds any value.
    let serialized = serde_json::to_string(&events).unwrap();
    for s in &secrets {
        assert!(
            !serialized.contains(s.as_str()),
            "{s} leaked into the audit trail"
        );
    }
    assert!(!serialized.contains("7f3a9c"));
}

/// Allowed cells of the published table, counted from the spelled-out table.
fn count_allowed() -> usize {
    PUBLISHED
        .iter()
        .map(|(_, _, row)| row.iter().filter(|b| **b).count())
        .sum()
}

#[test]
fn json_lines_sink_appends_one_parseable_line_per_decision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let business = BusinessId::new(5).unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(START)));
    let mut released = Vec::new();
    for round in 0..2 {
        // Reopening appends: the trail survives restarts.
        let sink = Arc::new(JsonLinesSink::open(&path).unwrap());
        let gate = Gate::new(VisibilityPolicy::published(), sink.clone(), clock.clone());
        for (party, purpose) in [
            (Party::Transport, Purpose::Delivery),
            (Party::RestOfCompany, Purpose::Delivery),
            (Party::Business, Purpose::Advertising),
        ] {
            let phone = Labelled::of_business(
                DataClass::ConsumerPhoneNumber,
                business,
                format!("+44770090012{round}"),
            );
            let d = match gate.release(phone, party, purpose) {
                Ok(r) => *r.decision(),
                Err(d) => *d.decision(),
            };
            released.push(d);
        }
        sink.flush().unwrap();
    }

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    for (line, expected) in lines.iter().zip(&released) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["id"], expected.id.to_string());
        assert_eq!(value["business"], 5);
        assert_eq!(value["class"], "consumer_phone_number");
        let parsed: Decision = serde_json::from_str(line).unwrap();
        assert_eq!(&parsed, expected);
        assert!(!line.contains("+4477009001"), "{line}");
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"verdict\":\"allow\""))
            .count(),
        2
    );
}

#[test]
fn buffered_json_lines_sink_writes_everything_by_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffered.jsonl");
    let sink = Arc::new(JsonLinesSink::open_with(&path, FlushPolicy::BUFFERED).unwrap());
    let h = harness(VisibilityPolicy::published());
    let gate = Gate::new(
        VisibilityPolicy::published(),
        sink.clone(),
        Arc::new(h.clock.clone()),
    );
    for i in 0..100u64 {
        let stats = Labelled::new(DataClass::NonIdentifiableStatistics, i);
        gate.release(stats, Party::RestOfCompany, Purpose::Analytics)
            .unwrap();
    }
    sink.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 100);
}

#[test]
fn decision_ids_are_unique_across_threads_and_gates() {
    let h = harness(VisibilityPolicy::published());
    let other = Gate::new(
        VisibilityPolicy::published(),
        h.audit.clone(),
        Arc::new(h.clock.clone()),
    );
    std::thread::scope(|s| {
        for t in 0..4 {
            let gate = if t % 2 == 0 { &h.gate } else { &other };
            s.spawn(move || {
                for i in 0..500u64 {
                    let v = Labelled::new(DataClass::Billing, i);
                    gate.release(v, Party::Transport, Purpose::Billing).unwrap();
                }
            });
        }
    });
    let events = h.audit.events();
    assert_eq!(events.len(), 2_000);
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 2_000);
    let instances: HashSet<_> = events.iter().map(|e| e.id.instance()).collect();
    assert_eq!(instances.len(), 2);
}

#[test]
fn a_new_policy_revision_decides_and_is_named_in_the_audit() {
    let h = harness(VisibilityPolicy::published());
    let text = r#"
        revision = 3
        [[allow]]
        party = "transport"
        class = "billing"
        purposes = ["billing"]
    "#;
    h.gate
        .replace_policy(VisibilityPolicy::from_toml(text).unwrap(), "operator")
        .unwrap();
    let stats = Labelled::new(DataClass::NonIdentifiableStatistics, 1u8);
    let denied = h
        .gate
        .release(stats, Party::RestOfCompany, Purpose::Analytics)
        .unwrap_err();
    assert_eq!(denied.decision().revision, Revision::new(3).unwrap());
    let bill = Labelled::new(DataClass::Billing, 1u8);
    assert!(
        h.gate
            .release(bill, Party::Transport, Purpose::Billing)
            .is_ok()
    );
    assert!(
        h.gate
            .replace_policy(VisibilityPolicy::published(), "operator")
            .is_err()
    );
    assert!(h.audit.events().iter().all(|e| e.revision.get() == 3));
    // The change is in the trail, once: the stale one was refused.
    assert!(matches!(
        &h.audit.changes()[..],
        [Change::Policy { principal, revision, .. }]
            if principal == "operator" && revision.get() == 3
    ));
}

#[test]
fn opt_in_services_need_a_policy_cell_and_the_business_consent() {
    let business = BusinessId::new(12).unwrap();
    let other = BusinessId::new(13).unwrap();
    let text = VisibilityPolicy::published().to_builder(2).unwrap().build().to_toml()
        .replace(
            "class = \"message_content\"\npurposes = [\"delivery\", \"retransmission\"]",
            "class = \"message_content\"\npurposes = [\"delivery\", \"retransmission\", \"opt_in_service\"]",
        );
    let policy = VisibilityPolicy::from_toml(&text).unwrap();
    assert!(policy.allows(
        Party::Processor,
        DataClass::MessageContent,
        Purpose::OptInService
    ));
    let h = harness(policy);
    h.gate.set_opted_in(business, true, "owner").unwrap();
    assert!(matches!(
        &h.audit.changes()[..],
        [Change::OptIn { business: b, enabled: true, .. }] if *b == business
    ));
    let msg = |b| Labelled::of_business(DataClass::MessageContent, b, "help me".to_owned());
    assert!(
        h.gate
            .release(msg(business), Party::Processor, Purpose::OptInService)
            .is_ok()
    );
    let denied = h
        .gate
        .release(msg(other), Party::Processor, Purpose::OptInService)
        .unwrap_err();
    assert_eq!(denied.reason(), DenyReason::NotOptedIn);
    assert_eq!(h.audit.events()[1].reason, Some(DenyReason::NotOptedIn));
}

/// A policy file saved with a byte-order mark (as some editors write
/// UTF-8) loads alike in both formats: the TOML reader skipped it, and the
/// JSON one refused it with an error naming nothing the operator could see.
#[test]
fn a_byte_order_mark_is_skipped_in_both_formats() {
    let toml = VisibilityPolicy::from_toml("\u{feff}revision = 2").unwrap();
    let json = VisibilityPolicy::from_json("\u{feff}{\"revision\": 2}").unwrap();
    assert_eq!(toml, json);
    assert_eq!(toml.revision().get(), 2);
}

/// What the processor releases, as the trail records it: the purpose of a
/// release, and a decision the trail could not record.
mod released_by_the_processor {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use custodian::ids::{BusinessId, MessageId, PhoneNumber};
    use custodian::integrity::Category;
    use custodian::keys::{LocalKeyProvider, SecretKey};
    use custodian::processor::{DeliveryConfig, Host, Outbound, Policies, Processor};
    use custodian::store::{MemoryStore, Status};
    use custodian::testing::{Faults, SimBusiness, SimNetwork};
    use custodian::time::{ManualClock, Timestamp};
    use custodian::transport::{Principal, StaticAuthorizer};
    use custodian::visibility::{
        AuditError, AuditSink, Change, DataClass, Decision, HoldEvent, MemoryAuditSink, Party,
        Purpose, Verdict, VisibilityPolicy,
    };

    const START: u64 = 1_767_225_600_000;

    /// An audit sink whose decisions can be made to fail.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryAuditSink,
        down: AtomicBool,
    }

    impl AuditSink for Flaky {
        fn record(&self, decision: &Decision) -> Result<(), AuditError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(AuditError::OutOfService);
            }
            self.inner.record(decision)
        }
        fn record_hold(&self, event: &HoldEvent) -> Result<(), AuditError> {
            self.inner.record_hold(event)
        }
        fn record_change(&self, change: &Change) -> Result<(), AuditError> {
            self.inner.record_change(change)
        }
    }

    struct World {
        clock: ManualClock,
        network: Arc<SimNetwork>,
        audit: Arc<Flaky>,
        processor: Processor,
        owner: Principal,
        carrier: Principal,
        operator: Principal,
        b: BusinessId,
        to: PhoneNumber,
    }

    impl World {
        /// A business with keys published and a consumer of one device,
        /// under `visibility`, a millisecond before [`START`], over a
        /// network that fails as `network` says.
        async fn new(visibility: VisibilityPolicy, network: Faults) -> Self {
            let clock = ManualClock::new(Timestamp::from_millis(START - 1));
            let network = Arc::new(SimNetwork::new(clock.clone(), network, 3).unwrap());
            let audit = Arc::new(Flaky::default());
            let (owner, carrier, operator) = (
                Principal::new("owner"),
                Principal::new("carrier"),
                Principal::new("operator"),
            );
            let b = BusinessId::new(1).unwrap();
            let authorizer = StaticAuthorizer::new()
                .operator(&operator)
                .grant(&owner, b)
                .carrier(&carrier, b);
            let host = Host {
                storage: Arc::new(MemoryStore::new()),
                key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
                transport: network.clone(),
                business: SimBusiness::new(clock.clone(), Faults::none(), 4).unwrap(),
                authorizer: Arc::new(authorizer),
                clock: Arc::new(clock.clone()),
                audit: audit.clone(),
            };
            let policies = Policies {
                visibility,
                delivery: DeliveryConfig {
                    retry_max: Duration::from_secs(60),
                    ..DeliveryConfig::default()
                },
                ..Policies::default()
            };
            let processor = Processor::new(host, policies).unwrap();
            processor.publish_keys(&owner, b).await.unwrap();
            let to: PhoneNumber = "+447700900001".parse().unwrap();
            network.add_consumer(&to, 1).await;
            clock.advance(Duration::from_millis(1));
            Self {
                clock,
                network,
                audit,
                processor,
                owner,
                carrier,
                operator,
                b,
                to,
            }
        }

        async fn send(&self) -> MessageId {
            let outbound = Outbound {
                to: self.to.clone(),
                content: b"your order shipped".to_vec().into(),
                category: Category::Service,
            };
            self.processor
                .send(&self.owner, self.b, outbound)
                .await
                .unwrap()
        }

        async fn run(&self) {
            for _ in 0..20 {
                self.network.pump(&self.processor, &self.carrier).await;
                self.processor.retransmit_due(&self.operator).await.unwrap();
                self.clock.advance(Duration::from_secs(5));
            }
        }

        async fn status(&self, id: MessageId) -> Status {
            let status = self.processor.message_status(&self.owner, self.b, id);
            status.await.unwrap().0
        }

        /// The purposes the consumer's number was released to the
        /// transport for, in order, with their verdicts.
        fn number_releases(&self) -> Vec<(Purpose, Verdict)> {
            let events = self.audit.inner.events();
            events
                .iter()
                .filter(|d| {
                    d.class == DataClass::ConsumerPhoneNumber && d.party == Party::Transport
                })
                .map(|d| (d.purpose, d.verdict))
                .collect()
        }
    }

    /// The published table without the transport's number for
    /// retransmission.
    fn no_retransmission() -> VisibilityPolicy {
        let mut policy = VisibilityPolicy::published().to_builder(1).unwrap();
        policy.deny(
            Party::Transport,
            DataClass::ConsumerPhoneNumber,
            Purpose::Retransmission,
        );
        policy.build()
    }

    /// A message whose first attempts reached no device (the network down
    /// a moment, or the audit trail) is first transmitted for delivery, and
    /// audited so. The purpose went by the attempts made: its first
    /// transmission was a retransmission, the trail never showed its
    /// number released for delivery, and a policy without the
    /// retransmission cell failed it, never sent, as refused.
    #[tokio::test]
    async fn a_first_transmission_after_failed_attempts_is_for_delivery() {
        let start = Timestamp::from_millis(START);
        let down = Faults::none().with_outage(start, Duration::from_secs(30));
        for outage in ["network", "audit trail"] {
            let network = if outage == "network" {
                down.clone()
            } else {
                Faults::none()
            };
            let w = World::new(no_retransmission(), network).await;
            w.audit
                .down
                .store(outage == "audit trail", Ordering::SeqCst);
            let id = w.send().await;
            w.run().await;
            w.audit.down.store(false, Ordering::SeqCst);
            w.run().await;
            let releases = w.number_releases();
            assert_eq!(
                w.status(id).await,
                Status::Delivered,
                "{outage}: {releases:?}"
            );
            assert_eq!(
                releases.iter().find(|r| r.1 == Verdict::Allow),
                Some(&(Purpose::Delivery, Verdict::Allow)),
                "{outage}: {releases:?}"
            );
            let received = w.network.received(&w.to).await;
            assert!(received.values().any(|m| m.contains_key(&id)), "{outage}");
        }
    }

    /// A denial the trail could not record decides nothing: the message
    /// stays due, as when an allowed release cannot be recorded. It was
    /// failed as refused, and its business told so, on a decision the
    /// trail never showed.
    #[tokio::test]
    async fn an_unrecorded_denial_fails_nothing() {
        let mut policy = VisibilityPolicy::published().to_builder(1).unwrap();
        policy.deny(
            Party::Transport,
            DataClass::ConsumerPhoneNumber,
            Purpose::Delivery,
        );
        let w = World::new(policy.build(), Faults::none()).await;
        w.audit.down.store(true, Ordering::SeqCst);
        let id = w.send().await;
        w.run().await;
        assert!(w.audit.inner.events().is_empty());
        assert_eq!(w.status(id).await, Status::Queued);
        // Recorded, the denial stands.
        w.audit.down.store(false, Ordering::SeqCst);
        w.run().await;
        assert_eq!(w.status(id).await, Status::Failed);
        assert_eq!(
            w.number_releases().first(),
            Some(&(Purpose::Delivery, Verdict::Deny))
        );
    }
}
