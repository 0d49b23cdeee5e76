//! The compiled table: one purpose bitmask per (party, class), default deny,
//! hard rules checked on every way in.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{DataClass, Party, PolicyError, Purpose, System};

const PARTIES: usize = Party::ALL.len();
const CLASSES: usize = DataClass::ALL.len();
const CELLS: usize = PARTIES * CLASSES;
// Every purpose is one bit of a `u8`.
const _: () = assert!(Purpose::ALL.len() <= 8);

/// The table index of a (party, class) pair.
const fn cell(party: Party, class: DataClass) -> usize {
    party as usize * CLASSES + class as usize
}

/// A set of purposes: one bit per [`Purpose`].
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Purposes(u8);

impl Purposes {
    /// No purpose.
    pub const NONE: Self = Self(0);

    /// The set of these purposes.
    pub const fn of(purposes: &[Purpose]) -> Self {
        let mut bits = 0u8;
        let mut i = 0;
        while i < purposes.len() {
            bits |= 1 << purposes[i] as u8;
            i += 1;
        }
        Self(bits)
    }

    /// Whether `purpose` is in the set.
    #[inline]
    pub const fn contains(self, purpose: Purpose) -> bool {
        self.0 & (1 << purpose as u8) != 0
    }

    /// The set with `purpose` added.
    pub const fn with(self, purpose: Purpose) -> Self {
        Self(self.0 | 1 << purpose as u8)
    }

    /// The set with `purpose` removed.
    pub const fn without(self, purpose: Purpose) -> Self {
        Self(self.0 & !(1 << purpose as u8))
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// How many purposes the set holds.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The purposes in the set, in [`Purpose::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Purpose> {
        Purpose::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }

    const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
}

impl fmt::Debug for Purposes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A rule that no policy can loosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HardRule {
    /// Message content never reaches the transport or the rest of the
    /// company, for any purpose.
    ContentStaysWithProcessorAndBusiness,
    /// Nothing is released for advertising.
    NoAdvertising,
    /// Only the processor runs opt-in services; each release for one also
    /// needs the business's opt-in.
    OptInServicesOnlyInProcessor,
    /// Consumer phone numbers never reach the rest of the company, for any
    /// purpose.
    NumbersStayOutOfTheRestOfTheCompany,
    /// Integrity signals never reach the rest of the company, for any
    /// purpose: they are collected for the transport's client system.
    IntegritySignalsStayOutOfTheRestOfTheCompany,
}

impl HardRule {
    /// Every hard rule, in the order they are checked.
    pub const ALL: &'static [Self] = &[
        Self::ContentStaysWithProcessorAndBusiness,
        Self::NoAdvertising,
        Self::OptInServicesOnlyInProcessor,
        Self::NumbersStayOutOfTheRestOfTheCompany,
        Self::IntegritySignalsStayOutOfTheRestOfTheCompany,
    ];

    /// Whether this rule forbids the cell.
    pub const fn forbids(self, party: Party, class: DataClass, purpose: Purpose) -> bool {
        match self {
            Self::ContentStaysWithProcessorAndBusiness => {
                matches!(class, DataClass::MessageContent)
                    && matches!(party, Party::Transport | Party::RestOfCompany)
            }
            Self::NoAdvertising => matches!(purpose, Purpose::Advertising),
            Self::OptInServicesOnlyInProcessor => {
                matches!(purpose, Purpose::OptInService) && !matches!(party, Party::Processor)
            }
            Self::NumbersStayOutOfTheRestOfTheCompany => {
                matches!(class, DataClass::ConsumerPhoneNumber)
                    && matches!(party, Party::RestOfCompany)
            }
            Self::IntegritySignalsStayOutOfTheRestOfTheCompany => {
                matches!(class, DataClass::IntegritySignals)
                    && matches!(party, Party::RestOfCompany)
            }
        }
    }

    /// The first rule (in [`HardRule::ALL`] order) that forbids the cell, if any.
    pub const fn breaking(party: Party, class: DataClass, purpose: Purpose) -> Option<Self> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i].forbids(party, class, purpose) {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

impl fmt::Display for HardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ContentStaysWithProcessorAndBusiness => {
                "message content never reaches the transport or the rest of the company"
            }
            Self::NoAdvertising => "nothing is released for advertising",
            Self::OptInServicesOnlyInProcessor => {
                "only the processor may be allowed opt-in services"
            }
            Self::NumbersStayOutOfTheRestOfTheCompany => {
                "consumer phone numbers never reach the rest of the company"
            }
            Self::IntegritySignalsStayOutOfTheRestOfTheCompany => {
                "integrity signals never reach the rest of the company"
            }
        })
    }
}

/// An attempt to allow a cell that a [`HardRule`] forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("({party}, {class}, {purpose}) is forbidden by a hard rule: {rule}")]
#[non_exhaustive]
pub struct HardRuleViolation {
    /// The party of the offending cell.
    pub party: Party,
    /// The class of the offending cell.
    pub class: DataClass,
    /// The purpose of the offending cell.
    pub purpose: Purpose,
    /// The rule it breaks.
    pub rule: HardRule,
}

/// For each (party, class), the purposes the hard rules forbid.
const FORBIDDEN: [Purposes; CELLS] = {
    let mut t = [Purposes::NONE; CELLS];
    let mut p = 0;
    while p < PARTIES {
        let mut c = 0;
        while c < CLASSES {
            let mut u = 0;
            while u < Purpose::ALL.len() {
                let (party, class, purpose) = (Party::ALL[p], DataClass::ALL[c], Purpose::ALL[u]);
                if HardRule::breaking(party, class, purpose).is_some() {
                    t[cell(party, class)] = t[cell(party, class)].with(purpose);
                }
                u += 1;
            }
            c += 1;
        }
        p += 1;
    }
    t
};

/// A policy's revision: which version of the table decided.
///
/// Revision 0 is the published table compiled into the crate; a policy
/// loaded from a file or built in code has 1 to [`Revision::MAX`] (the
/// largest integer TOML can write, so every revision round-trips):
/// [`VisibilityPolicy::builder`], [`VisibilityPolicy::to_builder`] and
/// policy files refuse any other as [`PolicyError::Revision`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(u64);

impl Revision {
    /// The published table's revision.
    pub const PUBLISHED: Self = Self(0);
    /// The largest revision.
    pub const MAX: Self = Self(i64::MAX as u64);

    /// A deployment's revision: 1 to [`Revision::MAX`]; `None` otherwise.
    pub const fn new(revision: u64) -> Option<Self> {
        if revision >= 1 && revision <= Self::MAX.0 {
            Some(Self(revision))
        } else {
            None
        }
    }

    /// The revision number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revision({})", self.0)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Revision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Revision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n <= Self::MAX.0 {
            Ok(Self(n))
        } else {
            Err(serde::de::Error::custom(
                "revision is above 9223372036854775807",
            ))
        }
    }
}

/// The published table, as documented in the module docs.
const PUBLISHED: [Purposes; CELLS] = {
    use DataClass::*;
    use Party::{Business, Processor, RestOfCompany, Transport};
    use Purpose::{Analytics, Delivery, Integrity, Retransmission};
    let mut t = [Purposes::NONE; CELLS];

    t[cell(Processor, MessageContent)] = Purposes::of(&[Delivery, Retransmission]);
    t[cell(Processor, ConsumerPhoneNumber)] = Purposes::of(&[Delivery, Retransmission]);
    t[cell(Processor, NonIdentifiableStatistics)] = Purposes::of(&[Analytics]);
    t[cell(Processor, BusinessInformation)] =
        Purposes::of(&[Delivery, Retransmission, Integrity, Purpose::Billing]);
    t[cell(Processor, Billing)] = Purposes::of(&[Purpose::Billing]);

    t[cell(Business, MessageContent)] = Purposes::of(&[Delivery]);
    t[cell(Business, ConsumerPhoneNumber)] = Purposes::of(&[Delivery]);
    t[cell(Business, NonIdentifiableStatistics)] = Purposes::of(&[Analytics]);
    t[cell(Business, BusinessInformation)] = Purposes::of(&[Delivery, Purpose::Billing]);
    t[cell(Business, Billing)] = Purposes::of(&[Purpose::Billing]);

    t[cell(Transport, ConsumerPhoneNumber)] = Purposes::of(&[Delivery, Retransmission, Integrity]);
    t[cell(Transport, NonIdentifiableStatistics)] = Purposes::of(&[Analytics]);
    t[cell(Transport, IntegritySignals)] = Purposes::of(&[Integrity]);
    t[cell(Transport, BusinessInformation)] =
        Purposes::of(&[Delivery, Retransmission, Integrity, Purpose::Billing]);
    t[cell(Transport, Billing)] = Purposes::of(&[Purpose::Billing]);

    t[cell(RestOfCompany, NonIdentifiableStatistics)] = Purposes::of(&[Analytics]);
    t[cell(RestOfCompany, BusinessInformation)] = Purposes::of(&[Purpose::Billing, Analytics]);
    t[cell(RestOfCompany, Billing)] = Purposes::of(&[Purpose::Billing]);
    t
};

const fn respects_hard_rules(cells: &[Purposes; CELLS]) -> bool {
    let mut i = 0;
    while i < CELLS {
        if cells[i].intersects(FORBIDDEN[i]) {
            return false;
        }
        i += 1;
    }
    true
}

// The published table is checked against the hard rules when the crate compiles.
const _: () = assert!(respects_hard_rules(&PUBLISHED));

/// Which party may see which class of data for which purpose.
///
/// An exhaustive table over (party, class, purpose), default deny, held as
/// one purpose bitmask per (party, class): [`VisibilityPolicy::allows`] is an
/// index and a bit test. Every policy that exists respects the [`HardRule`]s:
/// each way to make one (the published table, [`PolicyBuilder`], policy
/// files) checks them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VisibilityPolicy {
    revision: Revision,
    cells: [Purposes; CELLS],
}

impl VisibilityPolicy {
    /// The published table (see the module docs), at [`Revision::PUBLISHED`].
    pub const fn published() -> Self {
        Self {
            revision: Revision::PUBLISHED,
            cells: PUBLISHED,
        }
    }

    /// A builder starting from deny-all, for a policy of `revision`: 1 to
    /// [`Revision::MAX`], refused as [`PolicyError::Revision`] otherwise (0
    /// is the published table's).
    pub const fn builder(revision: u64) -> Result<PolicyBuilder, PolicyError> {
        match Revision::new(revision) {
            Some(revision) => Ok(PolicyBuilder {
                revision,
                cells: [Purposes::NONE; CELLS],
            }),
            None => Err(PolicyError::Revision { revision }),
        }
    }

    /// A builder starting from this policy's table, for a policy of
    /// `revision` (to derive a deployment's policy from the published one,
    /// say): 1 to [`Revision::MAX`], refused as [`PolicyError::Revision`]
    /// otherwise (0 is the published table's, whatever this table is).
    pub const fn to_builder(&self, revision: u64) -> Result<PolicyBuilder, PolicyError> {
        match Revision::new(revision) {
            Some(revision) => Ok(PolicyBuilder {
                revision,
                cells: self.cells,
            }),
            None => Err(PolicyError::Revision { revision }),
        }
    }

    /// Whether `party` may see values of `class` for `purpose`.
    #[inline]
    pub const fn allows(&self, party: Party, class: DataClass, purpose: Purpose) -> bool {
        self.cells[cell(party, class)].contains(purpose)
    }

    /// The purposes for which `party` may see values of `class`.
    pub const fn purposes(&self, party: Party, class: DataClass) -> Purposes {
        self.cells[cell(party, class)]
    }

    /// The policy's revision.
    pub const fn revision(&self) -> Revision {
        self.revision
    }

    /// The system of record of `class` (fixed by the design, the same in
    /// every policy).
    pub const fn system_of_record(&self, class: DataClass) -> System {
        class.system_of_record()
    }

    /// Every allowed cell, in table order (party, then class, then purpose).
    pub fn allowed_cells(&self) -> impl Iterator<Item = (Party, DataClass, Purpose)> + '_ {
        Party::ALL.iter().flat_map(move |&party| {
            DataClass::ALL.iter().flat_map(move |&class| {
                self.purposes(party, class)
                    .iter()
                    .map(move |purpose| (party, class, purpose))
            })
        })
    }
}

impl Default for VisibilityPolicy {
    /// The published table.
    fn default() -> Self {
        Self::published()
    }
}

impl fmt::Debug for VisibilityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Cells<'a>(&'a VisibilityPolicy);
        impl fmt::Debug for Cells<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut m = f.debug_map();
                for &party in Party::ALL {
                    for &class in DataClass::ALL {
                        let purposes = self.0.purposes(party, class);
                        if !purposes.is_empty() {
                            m.entry(&format_args!("({party}, {class})"), &purposes);
                        }
                    }
                }
                m.finish()
            }
        }
        f.debug_struct("VisibilityPolicy")
            .field("revision", &self.revision.0)
            .field("allow", &Cells(self))
            .finish()
    }
}

/// Builds a [`VisibilityPolicy`] cell by cell, refusing any cell a hard rule
/// forbids.
#[derive(Debug, Clone)]
pub struct PolicyBuilder {
    revision: Revision,
    cells: [Purposes; CELLS],
}

impl PolicyBuilder {
    /// Allow `party` to see `class` for `purpose`, unless a hard rule forbids it.
    pub fn allow(
        &mut self,
        party: Party,
        class: DataClass,
        purpose: Purpose,
    ) -> Result<&mut Self, HardRuleViolation> {
        if let Some(rule) = HardRule::breaking(party, class, purpose) {
            return Err(HardRuleViolation {
                party,
                class,
                purpose,
                rule,
            });
        }
        let c = &mut self.cells[cell(party, class)];
        *c = c.with(purpose);
        Ok(self)
    }

    /// Deny `party` the sight of `class` for `purpose` (always possible).
    pub fn deny(&mut self, party: Party, class: DataClass, purpose: Purpose) -> &mut Self {
        let c = &mut self.cells[cell(party, class)];
        *c = c.without(purpose);
        self
    }

    /// The policy built so far.
    pub fn build(&self) -> VisibilityPolicy {
        VisibilityPolicy {
            revision: self.revision,
            cells: self.cells,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_cell() -> impl Strategy<Value = (Party, DataClass, Purpose)> {
        (
            proptest::sample::select(Party::ALL),
            proptest::sample::select(DataClass::ALL),
            proptest::sample::select(Purpose::ALL),
        )
    }

    #[test]
    fn published_table_keeps_the_hard_rules() {
        let p = VisibilityPolicy::published();
        for &party in Party::ALL {
            for &class in DataClass::ALL {
                for &purpose in Purpose::ALL {
                    if HardRule::breaking(party, class, purpose).is_some() {
                        assert!(
                            !p.allows(party, class, purpose),
                            "{party} {class} {purpose}"
                        );
                    }
                }
            }
        }
        assert_eq!(p.revision(), Revision::PUBLISHED);
        assert_eq!(p, VisibilityPolicy::default());
    }

    /// The check the published table passes when the crate compiles fails
    /// a table with any one forbidden cell allowed.
    #[test]
    fn the_compile_time_check_refuses_every_forbidden_cell() {
        let mut forbidden = 0;
        for &party in Party::ALL {
            for &class in DataClass::ALL {
                for &purpose in Purpose::ALL {
                    if HardRule::breaking(party, class, purpose).is_some() {
                        let mut cells = PUBLISHED;
                        cells[cell(party, class)] = cells[cell(party, class)].with(purpose);
                        assert!(!respects_hard_rules(&cells), "{party} {class} {purpose}");
                        forbidden += 1;
                    }
                }
            }
        }
        assert!(forbidden > 0);
        assert!(respects_hard_rules(&PUBLISHED));
    }

    #[test]
    fn builder_refuses_content_to_transport_and_advertising() {
        let mut b = VisibilityPolicy::builder(2).unwrap();
        let err = b
            .allow(
                Party::Transport,
                DataClass::MessageContent,
                Purpose::Integrity,
            )
            .unwrap_err();
        assert_eq!(err.rule, HardRule::ContentStaysWithProcessorAndBusiness);
        assert_eq!(
            err.to_string(),
            "(transport, message_content, integrity) is forbidden by a hard rule: \
             message content never reaches the transport or the rest of the company"
        );
        let err = b
            .allow(Party::Processor, DataClass::Billing, Purpose::Advertising)
            .unwrap_err();
        assert_eq!(err.rule, HardRule::NoAdvertising);
        let err = b
            .allow(
                Party::Business,
                DataClass::MessageContent,
                Purpose::OptInService,
            )
            .unwrap_err();
        assert_eq!(err.rule, HardRule::OptInServicesOnlyInProcessor);
        let err = b
            .allow(
                Party::RestOfCompany,
                DataClass::ConsumerPhoneNumber,
                Purpose::Analytics,
            )
            .unwrap_err();
        assert_eq!(err.rule, HardRule::NumbersStayOutOfTheRestOfTheCompany);
        for purpose in [Purpose::Integrity, Purpose::Analytics, Purpose::Billing] {
            let err = b
                .allow(Party::RestOfCompany, DataClass::IntegritySignals, purpose)
                .unwrap_err();
            assert_eq!(
                err.rule,
                HardRule::IntegritySignalsStayOutOfTheRestOfTheCompany
            );
        }
        assert_eq!(b.build(), VisibilityPolicy::builder(2).unwrap().build());
    }

    #[test]
    fn revision_bounds_are_what_toml_can_write() {
        assert_eq!(Revision::new(0), None);
        assert_eq!(Revision::new(1).map(Revision::get), Some(1));
        assert_eq!(Revision::new(i64::MAX as u64), Some(Revision::MAX));
        assert_eq!(Revision::new(i64::MAX as u64 + 1), None);
    }

    proptest! {
        #[test]
        fn builder_allows_exactly_what_it_was_last_told_unless_forbidden(
            from_published in any::<bool>(),
            steps in proptest::collection::vec((any::<bool>(), any_cell()), 0..40),
        ) {
            let mut b = if from_published {
                VisibilityPolicy::published().to_builder(7).unwrap()
            } else {
                VisibilityPolicy::builder(7).unwrap()
            };
            let mut expected: std::collections::HashSet<_> =
                b.build().allowed_cells().collect();
            for &(allow, (party, class, purpose)) in &steps {
                if allow {
                    let forbidden = HardRule::breaking(party, class, purpose).is_some();
                    prop_assert_eq!(b.allow(party, class, purpose).is_err(), forbidden);
                    if !forbidden {
                        expected.insert((party, class, purpose));
                    }
                } else {
                    b.deny(party, class, purpose);
                    expected.remove(&(party, class, purpose));
                }
            }
            let policy = b.build();
            for &party in Party::ALL {
                for &class in DataClass::ALL {
                    for &purpose in Purpose::ALL {
                        prop_assert_eq!(
                            policy.allows(party, class, purpose),
                            expected.contains(&(party, class, purpose))
                        );
                    }
                }
            }
            prop_assert_eq!(policy.allowed_cells().collect::<std::collections::HashSet<_>>(), expected);
        }

        #[test]
        fn purposes_set_matches_a_naive_set(ps in proptest::collection::vec(proptest::sample::select(Purpose::ALL), 0..10)) {
            let set = Purposes::of(&ps);
            for p in Purpose::ALL {
                prop_assert_eq!(set.contains(*p), ps.contains(p));
            }
            prop_assert_eq!(set.len(), set.iter().count());
        }
    }
}
