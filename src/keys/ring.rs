//! A business's ring of KEK versions and its lifecycle rules.
//!
//! Rotation follows the two-step pattern key services use for fleets:
//! [`add`](KekRing::add_version) a version (every node can then unwrap with
//! it), later [`promote`](KekRing::promote) it to primary (new keys are wrapped
//! under it), [rewrap](super::KeyManager::rewrap) older keys, raise the
//! [decrypt floor](KekRing::raise_floor) past the old version so nothing may
//! use it, then [`retire`](KekRing::retire) it, destroying its wrapped bytes.
//! The rules are pure functions of the ring, so they are tested without I/O.

use serde::{Deserialize, Serialize};

use super::{KekCheck, KeyError};
use crate::ids::BusinessId;
use crate::time::Timestamp;

/// One version of a business's KEK, as stored: wrapped by the provider.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekVersion {
    /// Version number, from 1, never reused.
    pub version: u32,
    /// The provider's blob.
    pub wrapped: Vec<u8>,
    /// The KEK's check value: what the provider unwraps must match it.
    /// `None` for a version stored before check values existed, whose
    /// unwrapped key is taken as the provider gives it (rotating adds a
    /// version that has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<KekCheck>,
    /// When the version was added.
    pub created: Timestamp,
}

impl std::fmt::Debug for KekVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekVersion")
            .field("version", &self.version)
            .field("wrapped_len", &self.wrapped.len())
            .field("created", &self.created)
            .finish()
    }
}

/// The KEK versions of one business: which exist, which wraps new keys
/// (primary) and the lowest that may still unwrap (floor).
///
/// Invariants, checked on every construction: versions are ascending and
/// unique; the primary exists; `floor <= primary`; every version below the
/// floor that still exists may be retired, and none at or above it may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RingParts", into = "RingParts")]
pub struct KekRing {
    business: BusinessId,
    versions: Vec<KekVersion>,
    next_version: u32,
    primary: u32,
    floor: u32,
    revision: u64,
}

/// The serialised shape; converted back through the invariant checks.
#[derive(Serialize, Deserialize)]
struct RingParts {
    business: BusinessId,
    versions: Vec<KekVersion>,
    next_version: u32,
    primary: u32,
    floor: u32,
    revision: u64,
}

impl TryFrom<RingParts> for KekRing {
    type Error = KeyError;

    fn try_from(p: RingParts) -> Result<Self, KeyError> {
        let ring = Self {
            business: p.business,
            versions: p.versions,
            next_version: p.next_version,
            primary: p.primary,
            floor: p.floor,
            revision: p.revision,
        };
        ring.check()?;
        Ok(ring)
    }
}

impl From<KekRing> for RingParts {
    fn from(r: KekRing) -> Self {
        Self {
            business: r.business,
            versions: r.versions,
            next_version: r.next_version,
            primary: r.primary,
            floor: r.floor,
            revision: r.revision,
        }
    }
}

impl KekRing {
    /// A new ring whose version 1 (primary, floor) is `wrapped`, the KEK
    /// whose check value is `check`.
    pub fn new(business: BusinessId, wrapped: Vec<u8>, check: KekCheck, now: Timestamp) -> Self {
        Self {
            business,
            versions: vec![KekVersion {
                version: 1,
                wrapped,
                check: Some(check),
                created: now,
            }],
            next_version: 2,
            primary: 1,
            floor: 1,
            revision: 0,
        }
    }

    fn check(&self) -> Result<(), KeyError> {
        let ascending = self
            .versions
            .windows(2)
            .all(|w| w[0].version < w[1].version);
        let bounded = self
            .versions
            .iter()
            .all(|v| v.version >= 1 && v.version < self.next_version);
        if !ascending
            || !bounded
            || self.floor == 0
            || self.floor > self.primary
            || self.get(self.primary).is_none()
        {
            return Err(KeyError::CorruptRing {
                business: self.business,
            });
        }
        Ok(())
    }

    /// The business this ring belongs to.
    pub fn business(&self) -> BusinessId {
        self.business
    }

    /// Versions not yet retired, ascending.
    pub fn versions(&self) -> &[KekVersion] {
        &self.versions
    }

    /// The version new keys are wrapped under.
    pub fn primary(&self) -> u32 {
        self.primary
    }

    /// The lowest version allowed to unwrap.
    pub fn floor(&self) -> u32 {
        self.floor
    }

    /// The version the next [`add_version`](Self::add_version) will create.
    pub fn next_version(&self) -> u32 {
        self.next_version
    }

    /// Bumped by every change; stores compare it to refuse lost updates.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The stored version `version`, if it exists and is not retired.
    pub fn get(&self, version: u32) -> Option<&KekVersion> {
        self.versions
            .binary_search_by_key(&version, |v| v.version)
            .ok()
            .map(|i| &self.versions[i])
    }

    /// Check that `version` may unwrap: it exists and is at or above the floor.
    pub fn usable(&self, version: u32) -> Result<&KekVersion, KeyError> {
        if version < self.floor {
            return Err(KeyError::BelowFloor {
                version,
                floor: self.floor,
            });
        }
        self.get(version).ok_or(KeyError::UnknownVersion {
            business: self.business,
            version,
        })
    }

    /// The ring with its revision advanced. A stored ring can carry any
    /// revision, including `u64::MAX`; one that cannot advance would let two
    /// updates share a revision, so it is reported as corrupt.
    fn bumped(mut self) -> Result<Self, KeyError> {
        self.revision = self.revision.checked_add(1).ok_or(KeyError::CorruptRing {
            business: self.business,
        })?;
        Ok(self)
    }

    /// Add a new version (not primary yet), the KEK wrapped as `wrapped`
    /// whose check value is `check`. Returns the ring and the version.
    pub fn add_version(
        &self,
        wrapped: Vec<u8>,
        check: KekCheck,
        now: Timestamp,
    ) -> Result<(Self, u32), KeyError> {
        let version = self.next_version;
        let mut next = self.clone();
        next.next_version = version.checked_add(1).ok_or(KeyError::VersionsExhausted)?;
        next.versions.push(KekVersion {
            version,
            wrapped,
            check: Some(check),
            created: now,
        });
        Ok((next.bumped()?, version))
    }

    /// Make `version` the primary. It must exist and be at or above the floor.
    pub fn promote(&self, version: u32) -> Result<Self, KeyError> {
        self.usable(version)?;
        let mut next = self.clone();
        next.primary = version;
        next.bumped()
    }

    /// Raise the decrypt floor to `version`. The floor never goes down (that
    /// would re-admit a version retired for cause) and never passes the primary.
    pub fn raise_floor(&self, version: u32) -> Result<Self, KeyError> {
        if version < self.floor {
            return Err(KeyError::FloorLowering {
                floor: self.floor,
                requested: version,
            });
        }
        if version > self.primary {
            return Err(KeyError::FloorAbovePrimary {
                primary: self.primary,
                requested: version,
            });
        }
        let mut next = self.clone();
        next.floor = version;
        next.bumped()
    }

    /// Retire `version`: its wrapped bytes are removed for good. Only versions
    /// below the floor may be retired (the caller also checks that no key is
    /// still wrapped under it).
    pub fn retire(&self, version: u32) -> Result<Self, KeyError> {
        if version >= self.floor {
            return Err(KeyError::RetireAtOrAboveFloor {
                version,
                floor: self.floor,
            });
        }
        let i = self
            .versions
            .binary_search_by_key(&version, |v| v.version)
            .map_err(|_| KeyError::UnknownVersion {
                business: self.business,
                version,
            })?;
        let mut next = self.clone();
        next.versions.remove(i);
        next.bumped()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ring() -> KekRing {
        KekRing::new(
            BusinessId::new(7).unwrap(),
            vec![1],
            KekCheck::UNUSED,
            Timestamp::from_millis(0),
        )
    }

    #[test]
    fn rotation_walks_add_promote_floor_retire() {
        let t = Timestamp::from_millis(1);
        let (r, v2) = ring().add_version(vec![2], KekCheck::UNUSED, t).unwrap();
        assert_eq!((v2, r.primary(), r.floor(), r.revision()), (2, 1, 1, 1));
        let r = r.promote(2).unwrap();
        assert!(matches!(
            r.retire(1),
            Err(KeyError::RetireAtOrAboveFloor { .. })
        ));
        let r = r.raise_floor(2).unwrap();
        assert!(matches!(
            r.usable(1),
            Err(KeyError::BelowFloor {
                version: 1,
                floor: 2
            })
        ));
        let r = r.retire(1).unwrap();
        assert_eq!(
            r.versions().iter().map(|v| v.version).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(r.revision(), 4);
        // Version numbers are never reused after a retirement.
        let (_, v3) = r.add_version(vec![3], KekCheck::UNUSED, t).unwrap();
        assert_eq!(v3, 3);
    }

    #[test]
    fn floor_never_lowers_nor_passes_primary() {
        let (r, _) = ring()
            .add_version(vec![2], KekCheck::UNUSED, Timestamp::from_millis(1))
            .unwrap();
        assert!(matches!(
            r.raise_floor(2),
            Err(KeyError::FloorAbovePrimary { .. })
        ));
        let r = r.promote(2).unwrap().raise_floor(2).unwrap();
        assert!(matches!(
            r.raise_floor(1),
            Err(KeyError::FloorLowering { .. })
        ));
        assert!(matches!(r.promote(1), Err(KeyError::BelowFloor { .. })));
        assert!(matches!(r.promote(9), Err(KeyError::UnknownVersion { .. })));
    }

    #[test]
    fn deserialising_a_ring_checks_its_invariants() {
        let good = serde_json::to_string(&ring()).unwrap();
        assert_eq!(serde_json::from_str::<KekRing>(&good).unwrap(), ring());
        let bad = good.replace("\"floor\":1", "\"floor\":2");
        assert!(serde_json::from_str::<KekRing>(&bad).is_err());
        let bad = good.replace("\"primary\":1", "\"primary\":5");
        assert!(serde_json::from_str::<KekRing>(&bad).is_err());
    }

    /// `r` as a store could hand it back: valid, at the last revision.
    fn at_last_revision(r: &KekRing) -> KekRing {
        let mut json = serde_json::to_value(r).unwrap();
        json["revision"] = u64::MAX.into();
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_ring_at_the_last_revision_is_refused_as_corrupt_not_overflowed() {
        let t = Timestamp::from_millis(1);
        let (two, _) = ring().add_version(vec![2], KekCheck::UNUSED, t).unwrap();
        let promoted = two.promote(2).unwrap();
        let floored = promoted.raise_floor(2).unwrap();
        let corrupt = |r: Result<KekRing, KeyError>| matches!(r, Err(KeyError::CorruptRing { .. }));
        assert_eq!(at_last_revision(&ring()).revision(), u64::MAX);
        assert!(corrupt(
            at_last_revision(&ring())
                .add_version(vec![2], KekCheck::UNUSED, t)
                .map(|(r, _)| r)
        ));
        assert!(corrupt(at_last_revision(&two).promote(2)));
        assert!(corrupt(at_last_revision(&promoted).raise_floor(2)));
        assert!(corrupt(at_last_revision(&floored).retire(1)));
    }

    /// A lifecycle step, at a version from a small range (so that steps
    /// meet the versions that exist).
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Add,
        Promote(u32),
        RaiseFloor(u32),
        Retire(u32),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Add),
            (0u32..8).prop_map(Step::Promote),
            (0u32..8).prop_map(Step::RaiseFloor),
            (0u32..8).prop_map(Step::Retire),
        ]
    }

    /// The rules, as a model: the versions that exist, the primary, the
    /// floor and the next version.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Model {
        versions: Vec<u32>,
        primary: u32,
        floor: u32,
        next: u32,
    }

    impl Model {
        /// `step` applied, if the rules allow it.
        fn apply(&self, step: Step) -> Option<Self> {
            let mut next = self.clone();
            let exists = |v: u32| self.versions.contains(&v);
            match step {
                Step::Add => {
                    next.versions.push(self.next);
                    next.next += 1;
                }
                Step::Promote(v) if v >= self.floor && exists(v) => next.primary = v,
                Step::RaiseFloor(v) if (self.floor..=self.primary).contains(&v) => next.floor = v,
                Step::Retire(v) if v < self.floor && exists(v) => {
                    next.versions.retain(|&x| x != v);
                }
                _ => return None,
            }
            Some(next)
        }

        fn of(ring: &KekRing) -> Self {
            Self {
                versions: ring.versions().iter().map(|v| v.version).collect(),
                primary: ring.primary(),
                floor: ring.floor(),
                next: ring.next_version(),
            }
        }
    }

    proptest! {
        /// Any sequence of steps is taken exactly when the rules allow it,
        /// one revision each; what is refused changes nothing; every ring
        /// reached keeps its invariants, lets exactly the versions from the
        /// floor up unwrap, never reuses a version number, and survives a
        /// write and reload (the store's JSON).
        #[test]
        fn the_ring_follows_its_rules_through_any_rotation(
            steps in proptest::collection::vec(step(), 0..40),
        ) {
            let t = Timestamp::from_millis(1);
            let mut r = ring();
            let mut model = Model::of(&r);
            let mut taken = 0;
            for step in steps {
                let next = match step {
                    Step::Add => r.add_version(vec![0xaa], KekCheck::UNUSED, t).map(|(next, v)| {
                        assert_eq!(v, model.next);
                        next
                    }),
                    Step::Promote(v) => r.promote(v),
                    Step::RaiseFloor(v) => r.raise_floor(v),
                    Step::Retire(v) => r.retire(v),
                };
                let allowed = model.apply(step);
                prop_assert_eq!(next.is_ok(), allowed.is_some(), "{:?} on {:?}", step, model);
                if let (Ok(next), Some(allowed)) = (next, allowed) {
                    r = next;
                    model = allowed;
                    taken += 1;
                }
                prop_assert_eq!(&Model::of(&r), &model);
                prop_assert_eq!(r.revision(), taken);
                prop_assert!(r.check().is_ok());
                for v in 0..model.next + 1 {
                    let usable = v >= model.floor && model.versions.contains(&v);
                    prop_assert_eq!(r.usable(v).is_ok(), usable, "version {}", v);
                }
                let json = serde_json::to_string(&r).unwrap();
                prop_assert_eq!(serde_json::from_str::<KekRing>(&json).unwrap(), r.clone());
            }
        }
    }
}
