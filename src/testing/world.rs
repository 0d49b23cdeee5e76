//! A whole simulated deployment in one value: the processor over the
//! simulated network and business endpoint, with a manual clock, an
//! in-memory audit trail and a principal for each role.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::ids::BusinessId;
use crate::keys::{LocalKeyProvider, SecretKey};
use crate::processor::{Host, Policies, Processor, ProcessorError};
use crate::store::{MemoryStore, Storage};
use crate::time::{ManualClock, Timestamp};
use crate::transport::{Principal, StaticAuthorizer};
use crate::visibility::MemoryAuditSink;

use super::{Faults, InvalidFaults, PumpReport, SimBusiness, SimNetwork};

/// A processor over a [`SimNetwork`] and a [`SimBusiness`], made by
/// [`World::builder`].
///
/// Its keys come from a [`LocalKeyProvider`] under a fresh root, its audit
/// trail is a [`MemoryAuditSink`], and a [`StaticAuthorizer`] knows three
/// roles: [`owner`](Self::owner) acts for one business each,
/// [`carrier`](Self::carrier) for the transport of every business, and
/// [`operator`](Self::operator) for the processor.
///
/// The [module documentation](super) drives one.
#[derive(Debug)]
pub struct World {
    /// The time every component reads; only the harness moves it.
    pub clock: ManualClock,
    /// The messaging network, the processor's transport.
    pub network: Arc<SimNetwork>,
    /// The businesses' endpoint, the processor's business sink.
    pub business: Arc<SimBusiness>,
    /// Every release decision and administrative change.
    pub audit: Arc<MemoryAuditSink>,
    /// The processor under test.
    pub processor: Processor,
    /// Acts for the transport of every business: give it to
    /// [`SimNetwork::pump`].
    pub carrier: Principal,
    /// The processor's operator: retransmissions, sweeps, policies.
    pub operator: Principal,
    owners: BTreeMap<BusinessId, Principal>,
}

impl World {
    /// A builder with no business, no faults, seed 0, an empty
    /// [`MemoryStore`], [`Policies::default`] and a clock at 2026-01-01.
    pub fn builder() -> WorldBuilder {
        WorldBuilder {
            businesses: Vec::new(),
            network_faults: Faults::none(),
            business_faults: Faults::none(),
            seed: 0,
            start: Timestamp::from_millis(1_767_225_600_000),
            storage: None,
            policies: Policies::default(),
        }
    }

    /// The principal acting for `business`: `None` for a business the
    /// builder was not given.
    pub fn owner(&self, business: BusinessId) -> Option<&Principal> {
        self.owners.get(&business)
    }

    /// Publishes every business's keys, trying each up to `tries` times
    /// (the network refuses and loses calls as its faults say); the last
    /// error if one never succeeds.
    pub async fn publish_keys(&self, tries: u32) -> Result<(), ProcessorError> {
        for (&business, owner) in &self.owners {
            let mut left = tries;
            loop {
                match self.processor.publish_keys(owner, business).await {
                    Ok(()) => break,
                    Err(e) if left <= 1 => return Err(e),
                    Err(_) => left -= 1,
                }
            }
        }
        Ok(())
    }

    /// One turn of the loop the [module documentation](super) describes:
    /// [`pump`](SimNetwork::pump) everything due, run
    /// [`retransmit_due`](Processor::retransmit_due), then advance the
    /// clock by `step`, whatever the retransmission returned. What the
    /// pump did, or the retransmission's error.
    pub async fn turn(&self, step: Duration) -> Result<PumpReport, ProcessorError> {
        let report = self.network.pump(&self.processor, &self.carrier).await;
        let retransmitted = self.processor.retransmit_due(&self.operator).await;
        self.clock.advance(step);
        retransmitted.map(|_| report)
    }

    /// Whether the world has settled: nothing in flight on the network and
    /// no copy held back by the business endpoint's delays.
    pub async fn settled(&self) -> bool {
        self.network.in_flight().await == 0 && self.business.held_back() == 0
    }
}

/// How a [`World`] is made: see [`World::builder`] for the defaults.
#[must_use = "a builder does nothing until `build` is called"]
pub struct WorldBuilder {
    businesses: Vec<BusinessId>,
    network_faults: Faults,
    business_faults: Faults,
    seed: u64,
    start: Timestamp,
    storage: Option<Arc<dyn Storage>>,
    policies: Policies,
}

impl WorldBuilder {
    /// Adds `business`, with an owner of its own (named
    /// `owner-of-<business>`) that the carrier serves.
    pub fn business(mut self, business: BusinessId) -> Self {
        self.businesses.push(business);
        self
    }

    /// The network's faults (every [`Leg`](super::Leg) of it).
    pub fn network_faults(mut self, faults: Faults) -> Self {
        self.network_faults = faults;
        self
    }

    /// The business endpoint's faults.
    pub fn business_faults(mut self, faults: Faults) -> Self {
        self.business_faults = faults;
        self
    }

    /// The seed of the fault schedules: the network's is `seed`, the
    /// business endpoint's `seed + 1` (wrapping).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Where the clock starts.
    pub fn start(mut self, start: Timestamp) -> Self {
        self.start = start;
        self
    }

    /// The store, instead of an empty [`MemoryStore`] (a SQLite file, or a
    /// store another world used, to restart over it).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// The processor's policies.
    pub fn policies(mut self, policies: Policies) -> Self {
        self.policies = policies;
        self
    }

    /// The world; refused if either component's faults are invalid, or if
    /// the processor refuses its policies or cannot record them.
    pub fn build(self) -> Result<World, WorldError> {
        let clock = ManualClock::new(self.start);
        let network = Arc::new(SimNetwork::new(
            clock.clone(),
            self.network_faults,
            self.seed,
        )?);
        let business = SimBusiness::new(
            clock.clone(),
            self.business_faults,
            self.seed.wrapping_add(1),
        )?;
        let audit = Arc::new(MemoryAuditSink::new());
        let carrier = Principal::new("carrier");
        let operator = Principal::new("operator");
        let mut authorizer = StaticAuthorizer::new().operator(&operator);
        let mut owners = BTreeMap::new();
        for business in self.businesses {
            let owner = Principal::new(&format!("owner-of-{business}"));
            authorizer = authorizer
                .grant(&owner, business)
                .carrier(&carrier, business);
            owners.insert(business, owner);
        }
        let host = Host {
            storage: self.storage.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            transport: network.clone(),
            business: business.clone(),
            authorizer: Arc::new(authorizer),
            clock: Arc::new(clock.clone()),
            audit: audit.clone(),
        };
        let processor = Processor::new(host, self.policies)?;
        Ok(World {
            clock,
            network,
            business,
            audit,
            processor,
            carrier,
            operator,
            owners,
        })
    }
}

impl std::fmt::Debug for WorldBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorldBuilder")
            .field("businesses", &self.businesses)
            .field("seed", &self.seed)
            .field("start", &self.start)
            .field("own_storage", &self.storage.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a [`World`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorldError {
    /// The network's or the business endpoint's faults.
    #[error(transparent)]
    Faults(#[from] InvalidFaults),
    /// The processor refused its policies, or the audit trail its start.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PhoneNumber;
    use crate::integrity::Category;
    use crate::processor::Outbound;
    use crate::testing::REDELIVERY;
    use crate::time::Clock;

    fn b(n: u64) -> BusinessId {
        BusinessId::new(n).unwrap()
    }

    #[test]
    fn each_business_has_its_own_owner_and_no_other() {
        let world = World::builder()
            .business(b(1))
            .business(b(2))
            .build()
            .unwrap();
        let (one, two) = (world.owner(b(1)).unwrap(), world.owner(b(2)).unwrap());
        assert_ne!(one, two);
        assert_eq!(world.owner(b(3)), None);
    }

    #[test]
    fn invalid_faults_are_refused_naming_them() {
        let faults = Faults {
            drop: 1.5,
            ..Faults::none()
        };
        let err = World::builder().network_faults(faults).build().unwrap_err();
        assert!(matches!(err, WorldError::Faults(_)), "{err:?}");
    }

    #[tokio::test]
    async fn an_owner_acts_for_its_business_alone() {
        let world = World::builder()
            .business(b(1))
            .business(b(2))
            .build()
            .unwrap();
        world.publish_keys(1).await.unwrap();
        let intruder = world.owner(b(2)).unwrap();
        let err = world
            .processor
            .publish_keys(intruder, b(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProcessorError::Unauthorized { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn turns_carry_messages_both_ways_until_settled() {
        let world = World::builder()
            .business(b(7))
            .network_faults(Faults::moderate())
            .business_faults(Faults::moderate())
            .seed(3)
            .build()
            .unwrap();
        world.publish_keys(10).await.unwrap();
        let alice: PhoneNumber = "+447700900001".parse().unwrap();
        world.network.add_consumer(&alice, 2).await;
        world
            .network
            .consumer_sends(&alice, 1, b(7), b"hello")
            .await
            .unwrap();
        let reply = Outbound {
            to: alice.clone(),
            content: b"hi".to_vec().into(),
            category: Category::Service,
        };
        let owner = world.owner(b(7)).unwrap();
        let id = world.processor.send(owner, b(7), reply).await.unwrap();
        let start = world.clock.now();
        let mut turns = 0;
        while turns == 0 || !world.settled().await {
            assert!(turns < 200, "never settled");
            world.turn(REDELIVERY).await.unwrap();
            turns += 1;
        }
        assert_eq!(world.clock.now(), start.saturating_add(REDELIVERY * turns));
        assert_eq!(
            world.business.messages().into_values().collect::<Vec<_>>(),
            [1]
        );
        let received = world.network.received(&alice).await;
        assert_eq!(received.len(), 2);
        assert!(received.values().all(|copies| copies.contains_key(&id)));
    }
}
