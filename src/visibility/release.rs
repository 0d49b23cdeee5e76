//! Labelled values and the gate that releases them.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use foldhash::fast::RandomState;
use rand::RngExt;

use super::audit::{AuditError, AuditSink, Change, Decision, DecisionId, DenyReason, Verdict};
use super::file::PolicyError;
use super::table::{Revision, VisibilityPolicy};
use super::{DataClass, Party, Purpose};
use crate::ids::BusinessId;
use crate::rng::OsRng;
use crate::time::Clock;

/// A value with its data class, and the business it belongs to if any.
///
/// The value is reachable only through [`Gate::release`]: there is no
/// public field, no `Deref`, no accessor, and `Debug` prints the label and
/// `..`, never the value. It has no `PartialEq` either, which would let a
/// caller test guesses against the value.
#[derive(Clone)]
pub struct Labelled<T> {
    class: DataClass,
    business: Option<BusinessId>,
    value: T,
}

impl<T> Labelled<T> {
    /// `value`, labelled `class`, belonging to no business.
    pub const fn new(class: DataClass, value: T) -> Self {
        Self {
            class,
            business: None,
            value,
        }
    }

    /// `value`, labelled `class`, belonging to `business`.
    pub const fn of_business(class: DataClass, business: BusinessId, value: T) -> Self {
        Self {
            class,
            business: Some(business),
            value,
        }
    }

    /// The value's data class.
    pub const fn class(&self) -> DataClass {
        self.class
    }

    /// The business the value belongs to, if any.
    pub const fn business(&self) -> Option<BusinessId> {
        self.business
    }
}

impl<T> fmt::Debug for Labelled<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Labelled")
            .field("class", &self.class)
            .field("business", &self.business)
            .finish_non_exhaustive()
    }
}

/// A value the gate handed over, with the decision that allowed it.
pub struct Released<T> {
    value: T,
    decision: Decision,
}

impl<T> Released<T> {
    /// The value.
    pub const fn value(&self) -> &T {
        &self.value
    }

    /// The value, taken out.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The decision that allowed it (as audited).
    pub const fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The value and the decision.
    pub fn into_parts(self) -> (T, Decision) {
        (self.value, self.decision)
    }
}

impl<T> fmt::Debug for Released<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Released to someone, not to whoever reads the logs.
        f.debug_struct("Released")
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

/// A release the gate refused: the decision, and the value, still labelled.
pub struct Denied<T> {
    labelled: Labelled<T>,
    decision: Decision,
    audit_error: Option<AuditError>,
}

impl<T> Denied<T> {
    /// The decision that denied it (as audited, unless [`Denied::audit_error`] says otherwise).
    pub const fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Why it was denied.
    pub fn reason(&self) -> DenyReason {
        self.decision.reason.unwrap_or(DenyReason::Policy)
    }

    /// The audit sink's error, if the decision could not be recorded.
    pub const fn audit_error(&self) -> Option<&AuditError> {
        self.audit_error.as_ref()
    }

    /// The value, still labelled (to release it to someone else).
    pub fn into_labelled(self) -> Labelled<T> {
        self.labelled
    }
}

impl<T> fmt::Debug for Denied<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Denied")
            .field("decision", &self.decision)
            .field("audit_error", &self.audit_error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for Denied<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        write!(
            f,
            "release of {} to {} for {} denied ({:?}; decision {}, policy revision {})",
            d.class,
            d.party,
            d.purpose,
            self.reason(),
            d.id,
            d.revision
        )?;
        if let Some(e) = &self.audit_error {
            write!(f, "; audit: {e}")?;
        }
        Ok(())
    }
}

impl<T> std::error::Error for Denied<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.audit_error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Why `policy` (and, for an opt-in service, `opted_in`) denies `value`'s
/// cell to `party` for `purpose`, if it does.
fn refusal<T>(
    policy: &VisibilityPolicy,
    opted_in: Option<&HashSet<BusinessId, RandomState>>,
    value: &Labelled<T>,
    party: Party,
    purpose: Purpose,
) -> Option<DenyReason> {
    if !policy.allows(party, value.class, purpose) {
        Some(DenyReason::Policy)
    } else if let Some(opted_in) = opted_in
        && !value.business.is_some_and(|b| opted_in.contains(&b))
    {
        Some(DenyReason::NotOptedIn)
    } else {
        None
    }
}

/// The one place where labelled values are released.
///
/// Holds the policy in force, the audit sink, the clock, the decision-id
/// counter and the set of businesses that opted in to opt-in services.
/// `Send + Sync`: share it (`Arc<Gate>`) between every task that sends data
/// out.
pub struct Gate {
    policy: RwLock<VisibilityPolicy>,
    sink: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    instance: u64,
    sequence: AtomicU64,
    opted_in: RwLock<HashSet<BusinessId, RandomState>>,
}

impl Gate {
    /// A gate deciding by `policy`, recording to `sink`, reading time from `clock`.
    /// Its decision-id instance is drawn at random.
    pub fn new(policy: VisibilityPolicy, sink: Arc<dyn AuditSink>, clock: Arc<dyn Clock>) -> Self {
        Self::with_instance(policy, sink, clock, OsRng.random())
    }

    /// As [`Gate::new`], with a chosen decision-id instance (for reproducible
    /// tests; two gates with one instance repeat each other's ids).
    pub fn with_instance(
        policy: VisibilityPolicy,
        sink: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        instance: u64,
    ) -> Self {
        Self {
            policy: RwLock::new(policy),
            sink,
            clock,
            instance,
            sequence: AtomicU64::new(0),
            opted_in: RwLock::new(HashSet::default()),
        }
    }

    /// Release `value` to `party` for `purpose`, if the policy allows it.
    ///
    /// One decision is recorded either way. On success the value comes out
    /// with the decision; on denial it comes back, still labelled. If the
    /// sink fails to record an allowed release, the release is denied
    /// ([`DenyReason::AuditFailed`]), and the gate tries to record that.
    pub fn release<T>(
        &self,
        value: Labelled<T>,
        party: Party,
        purpose: Purpose,
    ) -> Result<Released<T>, Denied<T>> {
        // Both read locks are held until the decision is recorded: a policy
        // put in force, or an opt-out, is recorded before this decision and
        // decides it, or after it, and the value is out by then.
        let policy = self.policy.read().unwrap_or_else(PoisonError::into_inner);
        let opted_in = self.opted_in_for(purpose);
        self.release_under(&policy, opted_in.as_deref(), value, party, purpose)
    }

    /// Release two values to `party` for `purpose`, both or neither (a
    /// message's content and its sender's number, which are of no use to
    /// the business apart): both cells are decided by one policy before
    /// either is released, and a pair the policy refuses records the
    /// refused cell's `Deny` and no `Allow`. The reason of the denial is
    /// returned. Should the audit trail fail to record the second `Allow`,
    /// the first stands recorded for a release the caller then does not
    /// make (see [`Verdict::Allow`]).
    pub(crate) fn release_both<A, B>(
        &self,
        first: Labelled<A>,
        second: Labelled<B>,
        party: Party,
        purpose: Purpose,
    ) -> Result<(Released<A>, Released<B>), DenyReason> {
        let policy = self.policy.read().unwrap_or_else(PoisonError::into_inner);
        let opted_in = self.opted_in_for(purpose);
        let opted_in = opted_in.as_deref();
        let reasons = (
            refusal(&policy, opted_in, &first, party, purpose),
            refusal(&policy, opted_in, &second, party, purpose),
        );
        if let (None, Some(reason)) = reasons {
            // Only the refused cell's decision is recorded.
            let denied = self.record(&policy, second, party, purpose, Some(reason));
            return Err(denied.err().map_or(reason, |d| d.reason()));
        }
        let first = self
            .record(&policy, first, party, purpose, reasons.0)
            .map_err(|d| d.reason())?;
        let second = self
            .record(&policy, second, party, purpose, reasons.1)
            .map_err(|d| d.reason())?;
        Ok((first, second))
    }

    /// The opt-ins, read-locked, if `purpose` needs them.
    fn opted_in_for(
        &self,
        purpose: Purpose,
    ) -> Option<RwLockReadGuard<'_, HashSet<BusinessId, RandomState>>> {
        (purpose == Purpose::OptInService)
            .then(|| self.opted_in.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Decide and record the release of `value` under `policy` and, for an
    /// opt-in service, `opted_in`.
    fn release_under<T>(
        &self,
        policy: &VisibilityPolicy,
        opted_in: Option<&HashSet<BusinessId, RandomState>>,
        value: Labelled<T>,
        party: Party,
        purpose: Purpose,
    ) -> Result<Released<T>, Denied<T>> {
        let reason = refusal(policy, opted_in, &value, party, purpose);
        self.record(policy, value, party, purpose, reason)
    }

    /// Record the decision on `value` under `policy`: released unless
    /// `reason` refuses it, or the trail cannot record it.
    fn record<T>(
        &self,
        policy: &VisibilityPolicy,
        value: Labelled<T>,
        party: Party,
        purpose: Purpose,
        reason: Option<DenyReason>,
    ) -> Result<Released<T>, Denied<T>> {
        let mut decision = Decision {
            at: self.clock.now(),
            id: self.next_id(),
            revision: policy.revision(),
            party,
            class: value.class,
            purpose,
            verdict: if reason.is_none() {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            reason,
            business: value.business,
        };
        match (self.sink.record(&decision), reason) {
            (Ok(()), None) => Ok(Released {
                value: value.value,
                decision,
            }),
            (Ok(()), Some(_)) => Err(Denied {
                labelled: value,
                decision,
                audit_error: None,
            }),
            (Err(error), None) => {
                decision.verdict = Verdict::Deny;
                decision.reason = Some(DenyReason::AuditFailed);
                // Likely to fail too; the caller gets the first error either way.
                let _ = self.sink.record(&decision);
                Err(Denied {
                    labelled: value,
                    decision,
                    audit_error: Some(error),
                })
            }
            (Err(error), Some(_)) => Err(Denied {
                labelled: value,
                decision,
                audit_error: Some(error),
            }),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> VisibilityPolicy {
        *self.policy.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The revision of the policy in force: a value released under an
    /// older one is released again before it is used again (a decision
    /// decides a use, not every use after it).
    pub fn revision(&self) -> Revision {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .revision()
    }

    /// Put `policy` in force, for `principal` (who asked, as the audit
    /// trail names them). Its revision must be newer than the one in force,
    /// so an old policy cannot be put back by mistake or replay. Recorded in
    /// the audit trail first ([`Change::Policy`]); a policy the trail cannot
    /// record is not put in force ([`PolicyError::Unaudited`]).
    pub fn replace_policy(
        &self,
        policy: VisibilityPolicy,
        principal: &str,
    ) -> Result<(), PolicyError> {
        let mut current = self.policy.write().unwrap_or_else(PoisonError::into_inner);
        if policy.revision() <= current.revision() {
            return Err(PolicyError::StaleRevision {
                current: current.revision(),
                offered: policy.revision(),
            });
        }
        self.sink
            .record_change(&Change::Policy {
                at: self.clock.now(),
                principal: principal.to_owned(),
                revision: policy.revision(),
                digest: policy.digest(),
            })
            .map_err(PolicyError::Unaudited)?;
        *current = policy;
        Ok(())
    }

    /// Record that `business` enabled (`true`) or disabled opt-in services,
    /// for `principal`: once enabled, releases of its values for
    /// [`Purpose::OptInService`] are decided by the policy (which denies
    /// them unless a deployment's policy allows the processor the cell).
    /// Recorded in the audit trail first ([`Change::OptIn`]); a change the
    /// trail cannot record is not made. Kept in memory only: a host replays
    /// its businesses' choices when it builds the gate.
    pub fn set_opted_in(
        &self,
        business: BusinessId,
        enabled: bool,
        principal: &str,
    ) -> Result<(), AuditError> {
        let mut opted_in = self
            .opted_in
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.sink.record_change(&Change::OptIn {
            at: self.clock.now(),
            principal: principal.to_owned(),
            business,
            enabled,
        })?;
        if enabled {
            opted_in.insert(business);
        } else {
            opted_in.remove(&business);
        }
        Ok(())
    }

    /// Whether `business` has enabled opt-in services.
    pub fn has_opted_in(&self, business: BusinessId) -> bool {
        self.opted_in
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&business)
    }

    fn next_id(&self) -> DecisionId {
        // Relaxed: only uniqueness matters, and fetch_add gives it. Wraps
        // after 2^64 decisions, centuries at any real rate.
        let sequence = self
            .sequence
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        DecisionId::new(self.instance, sequence)
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("revision", &self.policy().revision())
            .field("instance", &format_args!("{:016x}", self.instance))
            .field("decisions", &self.sequence.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ManualClock, Timestamp};
    use crate::visibility::{MemoryAuditSink, Revision};

    fn gate(policy: VisibilityPolicy) -> (Gate, Arc<MemoryAuditSink>) {
        let sink = Arc::new(MemoryAuditSink::new());
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_000)));
        (
            Gate::with_instance(policy, sink.clone(), clock, 0x1234),
            sink,
        )
    }

    struct BrokenSink;
    impl AuditSink for BrokenSink {
        fn record(&self, _: &Decision) -> Result<(), AuditError> {
            Err(AuditError::OutOfService)
        }

        fn record_hold(&self, _: &crate::visibility::HoldEvent) -> Result<(), AuditError> {
            Err(AuditError::OutOfService)
        }

        fn record_change(&self, _: &crate::visibility::Change) -> Result<(), AuditError> {
            Err(AuditError::OutOfService)
        }
    }

    #[test]
    fn gate_and_sinks_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<Gate>();
        shared::<MemoryAuditSink>();
        shared::<crate::visibility::JsonLinesSink<std::fs::File>>();
        shared::<Labelled<String>>();
    }

    #[test]
    fn labelled_debug_never_prints_the_value() {
        let v = Labelled::new(DataClass::ConsumerPhoneNumber, "+447700900123");
        assert_eq!(
            format!("{v:?}"),
            "Labelled { class: ConsumerPhoneNumber, business: None, .. }"
        );
    }

    #[test]
    fn decision_ids_count_up_within_an_instance() {
        let (gate, _) = gate(VisibilityPolicy::published());
        let a = gate.release(
            Labelled::new(DataClass::Billing, 1),
            Party::Transport,
            Purpose::Billing,
        );
        let b = gate.release(
            Labelled::new(DataClass::Billing, 2),
            Party::Transport,
            Purpose::Billing,
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.decision().id, DecisionId::new(0x1234, 1));
        assert_eq!(b.decision().id, DecisionId::new(0x1234, 2));
        let c = gate
            .release(
                Labelled::new(DataClass::Billing, "secret-amount"),
                Party::Transport,
                Purpose::Billing,
            )
            .unwrap();
        assert!(!format!("{c:?}").contains("secret-amount"));
    }

    #[test]
    fn opt_in_service_needs_the_policy_cell_and_the_business_opt_in() {
        let business = BusinessId::new(9).unwrap();
        let mut b = VisibilityPolicy::published().to_builder(2).unwrap();
        b.allow(
            Party::Processor,
            DataClass::MessageContent,
            Purpose::OptInService,
        )
        .unwrap();
        let (gate, _) = gate(b.build());
        let text = || Labelled::of_business(DataClass::MessageContent, business, "hi");

        let denied = gate
            .release(text(), Party::Processor, Purpose::OptInService)
            .unwrap_err();
        assert_eq!(denied.reason(), DenyReason::NotOptedIn);

        gate.set_opted_in(business, true, "owner").unwrap();
        assert!(
            gate.release(text(), Party::Processor, Purpose::OptInService)
                .is_ok()
        );
        let unowned = Labelled::new(DataClass::MessageContent, "hi");
        assert!(
            gate.release(unowned, Party::Processor, Purpose::OptInService)
                .is_err()
        );

        gate.set_opted_in(business, false, "owner").unwrap();
        assert!(
            gate.release(text(), Party::Processor, Purpose::OptInService)
                .is_err()
        );
    }

    #[test]
    fn opt_in_alone_does_not_open_the_published_table() {
        let business = BusinessId::new(9).unwrap();
        let (gate, _) = gate(VisibilityPolicy::published());
        gate.set_opted_in(business, true, "owner").unwrap();
        let text = Labelled::of_business(DataClass::MessageContent, business, "hi");
        let denied = gate
            .release(text, Party::Processor, Purpose::OptInService)
            .unwrap_err();
        assert_eq!(denied.reason(), DenyReason::Policy);
    }

    #[test]
    fn changes_the_trail_cannot_record_are_not_made() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(0)));
        let gate = Gate::new(VisibilityPolicy::published(), Arc::new(BrokenSink), clock);
        let newer = VisibilityPolicy::builder(5).unwrap().build();
        assert!(matches!(
            gate.replace_policy(newer, "operator"),
            Err(PolicyError::Unaudited(_))
        ));
        assert_eq!(gate.policy(), VisibilityPolicy::published());
        let business = BusinessId::new(9).unwrap();
        assert!(gate.set_opted_in(business, true, "owner").is_err());
        assert!(!gate.has_opted_in(business));
    }

    #[test]
    fn a_release_that_cannot_be_audited_is_denied() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(0)));
        let gate = Gate::new(VisibilityPolicy::published(), Arc::new(BrokenSink), clock);
        let phone = Labelled::new(DataClass::ConsumerPhoneNumber, "+447700900123");
        let denied = gate
            .release(phone, Party::Transport, Purpose::Delivery)
            .unwrap_err();
        assert_eq!(denied.reason(), DenyReason::AuditFailed);
        assert!(denied.audit_error().is_some());
        assert!(std::error::Error::source(&denied).is_some());
    }

    #[test]
    fn policies_only_move_forward() {
        let (gate, sink) = gate(VisibilityPolicy::published());
        let v3 = VisibilityPolicy::builder(3).unwrap().build();
        gate.replace_policy(v3, "operator").unwrap();
        let v2 = VisibilityPolicy::published().to_builder(2).unwrap().build();
        assert!(matches!(
            gate.replace_policy(v2, "operator"),
            Err(PolicyError::StaleRevision { .. })
        ));
        assert!(matches!(
            gate.replace_policy(v3, "operator"),
            Err(PolicyError::StaleRevision { .. })
        ));
        // The deny-all revision 3 is in force and is what the audit names.
        let r = gate.release(
            Labelled::new(DataClass::Billing, 1),
            Party::Transport,
            Purpose::Billing,
        );
        assert!(r.is_err());
        assert_eq!(sink.events()[0].revision, Revision::new(3).unwrap());
    }

    proptest::proptest! {
        /// Two values released together come out both or neither, under
        /// any policy (any cells allowed, the opt-ins either way): both
        /// allowed records the two `Allow`s, in order; otherwise one `Deny`
        /// is recorded, of the first cell refused, with its reason, and no
        /// `Allow`.
        #[test]
        fn two_values_are_released_both_or_neither(
            cells in proptest::collection::vec(
                (
                    proptest::sample::select(Party::ALL),
                    proptest::sample::select(DataClass::ALL),
                    proptest::sample::select(Purpose::ALL),
                ),
                0..30,
            ),
            party in proptest::sample::select(Party::ALL),
            purpose in proptest::sample::select(Purpose::ALL),
            classes in (
                proptest::sample::select(DataClass::ALL),
                proptest::sample::select(DataClass::ALL),
            ),
            opted_in: bool,
        ) {
            let business = BusinessId::new(9).unwrap();
            let mut builder = VisibilityPolicy::builder(2).unwrap();
            for (party, class, purpose) in cells {
                // Cells the hard rules forbid stay denied.
                let _ = builder.allow(party, class, purpose);
            }
            let (gate, sink) = gate(builder.build());
            gate.set_opted_in(business, opted_in, "owner").unwrap();
            let before = sink.events().len();
            let policy = gate.policy();
            let refused = |class| {
                if !policy.allows(party, class, purpose) {
                    Some(DenyReason::Policy)
                } else if purpose == Purpose::OptInService && !opted_in {
                    Some(DenyReason::NotOptedIn)
                } else {
                    None
                }
            };
            let expected = refused(classes.0).map(|r| (classes.0, r))
                .or_else(|| refused(classes.1).map(|r| (classes.1, r)));
            let released = gate.release_both(
                Labelled::of_business(classes.0, business, "first"),
                Labelled::of_business(classes.1, business, 2_u8),
                party,
                purpose,
            );
            let recorded: Vec<_> = sink.events()[before..]
                .iter()
                .map(|d| (d.class, d.verdict, d.reason))
                .collect();
            match expected {
                None => {
                    let (first, second) = released.unwrap();
                    proptest::prop_assert_eq!((*first.value(), *second.value()), ("first", 2));
                    proptest::prop_assert_eq!(
                        recorded,
                        vec![
                            (classes.0, Verdict::Allow, None),
                            (classes.1, Verdict::Allow, None),
                        ]
                    );
                }
                Some((class, reason)) => {
                    proptest::prop_assert_eq!(released.err(), Some(reason));
                    proptest::prop_assert_eq!(
                        recorded,
                        vec![(class, Verdict::Deny, Some(reason))]
                    );
                }
            }
        }
    }
}
