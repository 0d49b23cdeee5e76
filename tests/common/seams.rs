//! The deployment the host-seam tests share: a processor over the
//! in-memory store (or another a test gives it) whose every host seam
//! (store, key provider, network, business) suspends around each call, so
//! that every `.await` of the processor is a real suspension point a test
//! can cut, fail or interleave.
//! Around the paused store and key provider, a [`HostFaults`] control makes
//! a chosen call fail (or every call from it on, an outage) as a host's
//! database or KMS does.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use custodian::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber, Region};
use custodian::integrity::{BillingStatement, Category, IntegrityReport, StatisticsConfig};
use custodian::keys::{
    Epoch, EpochLength, KekContext, KekRing, KeyEntry, KeyId, KeyKind, KeyManager, KeyProvider,
    LocalKeyProvider, ProviderError, SecretKey, WrappedKey,
};
use custodian::processor::{
    DeliveryConfig, Host, Inbound, Outbound, Policies, Processor, ProcessorError,
};
use custodian::retention::RetentionPolicy;
use custodian::signal::{
    Ciphertext, PreKeyBundle, PublishedKeys, Sessions, SignalConfig, SignalError,
};
use custodian::store::{
    Batch, Census, Direction, ExpiredMessage, Hold, HoldScope, KeyStore, MemoryStore,
    MessageRecord, PeerId, Status, Storage, StoreError, StoredBilling,
};
use custodian::testing::{ConsumerDevice, Faults, SimBusiness, SimNetwork};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::transport::{
    BusinessSink, InboundMessage, Outgoing, Principal, SinkError, StaticAuthorizer, StatusUpdate,
    Transport, TransportError,
};
use custodian::vault::Vault;
use custodian::visibility::{HoldAction, MemoryAuditSink};

pub(crate) const T0: u64 = 1_767_225_600_000;
pub(crate) const BUSINESS: u64 = 4242;

/// Pending once (waking itself at once): a suspension point.
pub(crate) struct Pause(bool);

impl Future for Pause {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

pub(crate) fn pause() -> Pause {
    Pause(false)
}

/// `call`, suspending before and after it: a store's write may land after
/// its caller stopped waiting.
pub(crate) async fn paused<T>(call: impl Future<Output = T>) -> T {
    pause().await;
    let output = call.await;
    pause().await;
    output
}

/// Polls `future` at most `polls` times: its output, or `None` if it was
/// dropped unfinished.
pub(crate) async fn poll_at_most<F: Future>(future: F, polls: usize) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        for _ in 0..polls {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
        }
        Poll::Ready(None)
    })
    .await
}

/// The simulated network, every call suspending first; it keeps the keys
/// last published, for consumers the test drives by hand, and serves
/// theirs.
pub(crate) struct PausedNetwork {
    pub(crate) network: Arc<SimNetwork>,
    pub(crate) published: Mutex<Option<PublishedKeys>>,
    /// Bundles served in place of the network's, by device (of a
    /// hand-driven consumer device).
    pub(crate) served: Mutex<BTreeMap<u32, PreKeyBundle>>,
    /// Bundles fetched, served or not.
    pub(crate) fetched: AtomicUsize,
    /// Devices left out of every device list (not linked yet).
    pub(crate) unlinked: Mutex<BTreeSet<u32>>,
    /// Devices whose bundle requests fail: `true` refused for good, `false`
    /// unavailable for now.
    pub(crate) bundle_fails: Mutex<BTreeMap<u32, bool>>,
    /// The ids the processor asked messages for again under.
    pub(crate) asked: Mutex<Vec<MessageId>>,
    /// How many of the next requests to send a message again fail as
    /// unavailable.
    pub(crate) resends_unavailable: AtomicUsize,
    /// How many of the next requests to send a message again the network
    /// takes, answering that it timed out (the answer lost).
    pub(crate) resend_answers_lost: AtomicUsize,
}

impl PausedNetwork {
    /// `network`, every call suspending first, nothing served or failed.
    pub(crate) fn new(network: Arc<SimNetwork>) -> Self {
        Self {
            network,
            published: Mutex::new(None),
            served: Mutex::default(),
            fetched: AtomicUsize::new(0),
            unlinked: Mutex::default(),
            bundle_fails: Mutex::default(),
            asked: Mutex::default(),
            resends_unavailable: AtomicUsize::new(0),
            resend_answers_lost: AtomicUsize::new(0),
        }
    }

    /// Bundles fetched so far.
    pub(crate) fn bundles_fetched(&self) -> usize {
        self.fetched.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Transport for PausedNetwork {
    async fn devices(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
    ) -> Result<Vec<u32>, TransportError> {
        pause().await;
        let mut devices = self.network.devices(business, consumer).await?;
        let unlinked = self.unlinked.lock().unwrap();
        devices.retain(|d| !unlinked.contains(d));
        Ok(devices)
    }
    async fn fetch_bundle(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
    ) -> Result<PreKeyBundle, TransportError> {
        pause().await;
        self.fetched.fetch_add(1, Ordering::SeqCst);
        match self.bundle_fails.lock().unwrap().get(&device) {
            Some(true) => return Err(TransportError::Refused("no bundle".into())),
            Some(false) => return Err(TransportError::Unavailable("timed out".into())),
            None => {}
        }
        let served = self.served.lock().unwrap().get(&device).cloned();
        match served {
            Some(bundle) => Ok(bundle),
            None => self.network.fetch_bundle(business, consumer, device).await,
        }
    }
    async fn send(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        message: &Outgoing,
    ) -> Result<(), TransportError> {
        pause().await;
        self.network.send(business, consumer, device, message).await
    }
    async fn ask_resend(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        id: MessageId,
        message: &Ciphertext,
    ) -> Result<(), TransportError> {
        pause().await;
        self.asked.lock().unwrap().push(id);
        let once = |count: &AtomicUsize| {
            let fewer = |n: usize| n.checked_sub(1);
            count
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fewer)
                .is_ok()
        };
        let timed_out = || Err(TransportError::Unavailable("timed out".into()));
        if once(&self.resends_unavailable) {
            return timed_out();
        }
        self.network
            .ask_resend(business, consumer, device, id, message)
            .await?;
        if once(&self.resend_answers_lost) {
            return timed_out();
        }
        Ok(())
    }
    async fn publish_keys(
        &self,
        business: BusinessId,
        keys: &PublishedKeys,
    ) -> Result<(), TransportError> {
        pause().await;
        self.network.publish_keys(business, keys).await?;
        *self.published.lock().unwrap() = Some(keys.clone());
        Ok(())
    }
    async fn one_time_prekey_count(
        &self,
        business: BusinessId,
    ) -> Result<Option<usize>, TransportError> {
        pause().await;
        self.network.one_time_prekey_count(business).await
    }
    async fn integrity_signals(&self, report: &IntegrityReport) -> Result<(), TransportError> {
        pause().await;
        self.network.integrity_signals(report).await
    }
    async fn billing(&self, statement: &BillingStatement) -> Result<(), TransportError> {
        pause().await;
        self.network.billing(statement).await
    }
}

/// The simulated business, every call suspending first.
pub(crate) struct PausedBusiness(pub(crate) Arc<SimBusiness>);

#[async_trait]
impl BusinessSink for PausedBusiness {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        pause().await;
        self.0.deliver(message).await
    }
    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        pause().await;
        self.0.status(update).await
    }
}

/// Which host seams a [`HostFaults`] plan fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seams {
    /// The store (its `KeyStore` and `Storage` calls).
    Store,
    /// The key provider.
    Provider,
    /// Both, counted together.
    Both,
}

impl Seams {
    fn includes(self, seam: Seam) -> bool {
        matches!(
            (self, seam),
            (Self::Both, _) | (Self::Store, Seam::Store) | (Self::Provider, Seam::Provider)
        )
    }
}

/// One host seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seam {
    Store,
    Provider,
}

/// When an injected failure strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strike {
    /// Before the inner call: nothing was applied.
    Before,
    /// After the inner call: a write landed, and its answer was lost (a
    /// networked database's reply, say). A read's answer is lost.
    After,
}

/// What [`HostFaults`] is told to do: fail the `at`-th call (counted from
/// when it was told) of `seams`, or every call from it on if `outage`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) at: usize,
    pub(crate) seams: Seams,
    pub(crate) strike: Strike,
    pub(crate) outage: bool,
}

/// The failure control the store and key provider of a [`Deployment`]
/// share: every call of theirs asks it whether to fail.
#[derive(Default)]
pub(crate) struct HostFaults {
    state: Mutex<FaultState>,
    /// Reads of a message still to answer that there is none.
    missed_reads: Mutex<usize>,
    /// The region the store declares in place of its own, if any.
    region: Mutex<Option<Region>>,
    /// What to write right after the next read of a message.
    after_read: Mutex<Option<AfterRead>>,
    /// What to write right before the next deletion of a kind.
    before_deletion: Mutex<Option<(Deletion, Batch)>>,
}

/// A deletion the retention sweep decides on the legal holds it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deletion {
    /// A commit deleting a consumer's Signal record (`Op::DeleteIdlePeer`).
    IdlePeer,
    /// `KeyStore::delete_epoch_keys`.
    EpochKeys,
}

/// Another writer's write, made right after a read of a message: what it
/// makes of the message read (nothing, if `None`).
pub(crate) type AfterRead = Box<dyn FnOnce(&MessageRecord) -> Option<Batch> + Send>;

#[derive(Default)]
struct FaultState {
    plan: Option<Plan>,
    /// Calls of the planned seams since the plan was set, by name.
    calls: Vec<&'static str>,
    /// The calls failed, by name, and how.
    failed: Vec<(&'static str, Strike)>,
}

impl HostFaults {
    /// Fail call `plan.at` of `plan.seams` from now on (counting from 1);
    /// forgets what failed before.
    pub(crate) fn set(&self, plan: Plan) {
        *self.state.lock().unwrap() = FaultState {
            plan: Some(plan),
            ..FaultState::default()
        };
    }

    /// Fail only the `n`-th call of `seams` from now on.
    pub(crate) fn fail_at(&self, n: usize, seams: Seams, strike: Strike) {
        self.set(Plan {
            at: n,
            seams,
            strike,
            outage: false,
        });
    }

    /// Fail every call of `seams` from the `n`-th on, until [`lift`](Self::lift).
    pub(crate) fn outage_from(&self, n: usize, seams: Seams) {
        self.set(Plan {
            at: n,
            seams,
            strike: Strike::Before,
            outage: true,
        });
    }

    /// Answer the next `n` reads of a message that there is none, as a
    /// replica behind a write that landed does (or a write still landing
    /// when the read is made).
    pub(crate) fn miss_message_reads(&self, n: usize) {
        *self.missed_reads.lock().unwrap() = n;
    }

    /// Right after the next read of a message, commit what `write` makes
    /// of it: another writer landing between a caller's read and its
    /// conditional write.
    pub(crate) fn after_next_message_read(&self, write: AfterRead) {
        *self.after_read.lock().unwrap() = Some(write);
    }

    /// Right before the next `deletion`, commit `write`: another process's
    /// write (a legal hold, say) landing between the sweep's read of the
    /// holds and the deletion it decided on them.
    pub(crate) fn before_next(&self, deletion: Deletion, write: Batch) {
        *self.before_deletion.lock().unwrap() = Some((deletion, write));
    }

    /// The store declares `region` from now on, as one whose rows were
    /// copied from a store elsewhere does.
    pub(crate) fn declare_region(&self, region: Region) {
        *self.region.lock().unwrap() = Some(region);
    }

    /// Whether this read of a message is to miss it.
    fn misses_message(&self) -> bool {
        let mut left = self.missed_reads.lock().unwrap();
        let miss = *left > 0;
        *left = left.saturating_sub(1);
        miss
    }

    /// Fail nothing more; the calls failed so far (name and strike).
    pub(crate) fn lift(&self) -> Vec<(&'static str, Strike)> {
        let mut state = self.state.lock().unwrap();
        state.plan = None;
        state.failed.clone()
    }

    /// The calls failed so far.
    pub(crate) fn failed(&self) -> Vec<(&'static str, Strike)> {
        self.state.lock().unwrap().failed.clone()
    }

    /// The calls of the planned seams since the plan was set, by name.
    pub(crate) fn calls(&self) -> Vec<&'static str> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Whether `call` of `seam` is to fail, and how.
    fn strike(&self, seam: Seam, call: &'static str) -> Option<Strike> {
        let mut state = self.state.lock().unwrap();
        let plan = state.plan?;
        if !plan.seams.includes(seam) {
            return None;
        }
        state.calls.push(call);
        let hit = if plan.outage {
            state.calls.len() >= plan.at
        } else {
            state.calls.len() == plan.at
        };
        hit.then(|| {
            state.failed.push((call, plan.strike));
            plan.strike
        })
    }

    /// Run `inner` (the call `call` of the store), suspending before and
    /// after it, unless it is to fail.
    async fn store<T>(
        &self,
        call: &'static str,
        inner: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let failure = || StoreError::Backend(format!("injected failure of {call}"));
        match self.strike(Seam::Store, call) {
            None => paused(inner).await,
            Some(Strike::Before) => Err(failure()),
            Some(Strike::After) => {
                let _lost = paused(inner).await;
                Err(failure())
            }
        }
    }

    /// Run `inner` (the call `call` of the key provider), suspending before
    /// and after it, unless it is to fail.
    async fn provider<T>(
        &self,
        call: &'static str,
        inner: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let failure = || ProviderError::Unavailable(format!("injected failure of {call}"));
        match self.strike(Seam::Provider, call) {
            None => paused(inner).await,
            Some(Strike::Before) => Err(failure()),
            Some(Strike::After) => {
                let _lost = paused(inner).await;
                Err(failure())
            }
        }
    }
}

/// A store whose every call suspends before and after it (a SQLite commit
/// lands even when its caller stopped waiting), and fails as its
/// [`HostFaults`] says (by default, never).
pub(crate) struct FailingStore {
    pub(crate) inner: Arc<dyn Storage>,
    pub(crate) faults: Arc<HostFaults>,
}

impl FailingStore {
    /// The paused `store`, failing as `faults` says.
    pub(crate) fn paused(store: Arc<dyn Storage>, faults: Arc<HostFaults>) -> Self {
        Self {
            inner: store,
            faults,
        }
    }

    /// Commit what [`HostFaults::before_next`] set for `deletion`, if it did.
    async fn before(&self, deletion: Deletion) {
        let write = {
            let mut before = self.faults.before_deletion.lock().unwrap();
            match before.take() {
                Some((d, write)) if d == deletion => Some(write),
                other => {
                    *before = other;
                    None
                }
            }
        };
        if let Some(write) = write {
            self.inner.commit(write).await.unwrap();
        }
    }
}

#[async_trait]
impl KeyStore for FailingStore {
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
        self.faults.store("ring", self.inner.ring(business)).await
    }
    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError> {
        let call = self.inner.put_ring(ring, expected);
        self.faults.store("put_ring", call).await
    }
    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
        self.faults.store("key", self.inner.key(id)).await
    }
    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError> {
        self.faults
            .store("insert_key", self.inner.insert_key(key))
            .await
    }
    async fn rewrap_key(&self, key: WrappedKey, expected: u32) -> Result<bool, StoreError> {
        let call = self.inner.rewrap_key(key, expected);
        self.faults.store("rewrap_key", call).await
    }
    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError> {
        let call = self.inner.destroy_key(id, at);
        self.faults.store("destroy_key", call).await
    }
    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError> {
        self.faults
            .store("delete_keys", self.inner.delete_keys(ids))
            .await
    }
    async fn delete_keys_as_read(&self, keys: &[WrappedKey]) -> Result<u64, StoreError> {
        self.faults
            .store("delete_keys_as_read", self.inner.delete_keys_as_read(keys))
            .await
    }
    async fn delete_epoch_keys(
        &self,
        ids: &[KeyId],
        seen: &[HoldScope],
    ) -> Result<u64, StoreError> {
        self.before(Deletion::EpochKeys).await;
        let call = self.inner.delete_epoch_keys(ids, seen);
        self.faults.store("delete_epoch_keys", call).await
    }
    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let call = self
            .inner
            .keys_wrapped_below(business, version, after, limit);
        self.faults.store("keys_wrapped_below", call).await
    }
    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError> {
        let call = self.inner.count_wrapped_under(business, version);
        self.faults.store("count_wrapped_under", call).await
    }
    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let call = self.inner.keys_of_kind(business, kind, after, limit);
        self.faults.store("keys_of_kind", call).await
    }
    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError> {
        let call = self.inner.ended_epoch_keys(now, limit);
        self.faults.store("ended_epoch_keys", call).await
    }
}

#[async_trait]
impl Storage for FailingStore {
    fn region(&self) -> Region {
        let declared = *self.faults.region.lock().unwrap();
        declared.unwrap_or_else(|| self.inner.region())
    }
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch
            .ops()
            .iter()
            .any(|op| matches!(op, custodian::store::Op::DeleteIdlePeer { .. }))
        {
            self.before(Deletion::IdlePeer).await;
        }
        self.faults.store("commit", self.inner.commit(batch)).await
    }
    async fn take_over(&self, writer: custodian::store::WriterId) -> Result<(), StoreError> {
        let call = self.inner.take_over(writer);
        self.faults.store("take_over", call).await
    }
    async fn peer(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.faults
            .store("peer", self.inner.peer(business, peer))
            .await
    }
    async fn peer_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, StoreError> {
        let call = self.inner.peer_devices(business, phone);
        self.faults.store("peer_devices", call).await
    }
    async fn has_live_message(
        &self,
        business: BusinessId,
        phone: PhoneHash,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let call = self.inner.has_live_message(business, phone, now);
        self.faults.store("has_live_message", call).await
    }
    async fn message(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let read = self
            .faults
            .store("message", self.inner.message(business, id))
            .await;
        if self.faults.misses_message() {
            return read.map(|_| None);
        }
        if let Ok(Some(m)) = &read {
            let write = self.faults.after_read.lock().unwrap().take();
            if let Some(batch) = write.and_then(|write| write(m)) {
                self.inner.commit(batch).await?;
            }
        }
        read
    }
    async fn due_messages(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let call = self.inner.due_messages(now, limit);
        self.faults.store("due_messages", call).await
    }
    async fn expired_open_messages(
        &self,
        now: Timestamp,
        after: Option<(Timestamp, BusinessId, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let call = self.inner.expired_open_messages(now, after, limit);
        self.faults.store("expired_open_messages", call).await
    }
    async fn cap_expiry(
        &self,
        business: BusinessId,
        direction: Direction,
        period: Duration,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Option<MessageId>, StoreError> {
        let call = self
            .inner
            .cap_expiry(business, direction, period, after, limit);
        self.faults.store("cap_expiry", call).await
    }
    async fn delete_expired(
        &self,
        now: Timestamp,
        abandon_before: Timestamp,
        holds: &[HoldScope],
        limit: usize,
    ) -> Result<Vec<ExpiredMessage>, StoreError> {
        let call = self.inner.delete_expired(now, abandon_before, holds, limit);
        self.faults.store("delete_expired", call).await
    }
    async fn message_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        let call = self.inner.message_businesses();
        self.faults.store("message_businesses", call).await
    }
    async fn message_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        let call = self.inner.message_epochs(business, phone);
        self.faults.store("message_epochs", call).await
    }
    async fn peer_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        let call = self.inner.peer_epochs(business, phone);
        self.faults.store("peer_epochs", call).await
    }
    async fn orphan_peers(
        &self,
        now: Timestamp,
        after: Option<(BusinessId, PeerId)>,
        limit: usize,
    ) -> Result<Vec<(BusinessId, PeerId)>, StoreError> {
        let call = self.inner.orphan_peers(now, after, limit);
        self.faults.store("orphan_peers", call).await
    }
    async fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        self.faults.store("holds", self.inner.holds()).await
    }
    async fn census(&self) -> Result<Census, StoreError> {
        self.faults.store("census", self.inner.census()).await
    }
    async fn billing(&self, business: BusinessId) -> Result<StoredBilling, StoreError> {
        let call = self.inner.billing(business);
        self.faults.store("billing", call).await
    }
    async fn billing_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        let call = self.inner.billing_businesses();
        self.faults.store("billing_businesses", call).await
    }
    async fn scrub(&self) -> Result<(), StoreError> {
        self.faults.store("scrub", self.inner.scrub()).await
    }
}

/// A key provider whose every call suspends before and after it, and fails
/// as its [`HostFaults`] says (by default, never).
pub(crate) struct FailingProvider {
    pub(crate) inner: Arc<dyn KeyProvider>,
    pub(crate) faults: Arc<HostFaults>,
}

#[async_trait]
impl KeyProvider for FailingProvider {
    async fn wrap(&self, context: &KekContext, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        self.faults
            .provider("wrap", self.inner.wrap(context, key))
            .await
    }
    async fn unwrap(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError> {
        self.faults
            .provider("unwrap", self.inner.unwrap(context, wrapped))
            .await
    }
}

/// The host seams of a [`Deployment`], kept to build its processor again.
pub(crate) struct HostSeams {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) provider: Arc<dyn KeyProvider>,
    pub(crate) transport: Arc<PausedNetwork>,
    pub(crate) business: Arc<PausedBusiness>,
    pub(crate) authorizer: Arc<StaticAuthorizer>,
    pub(crate) audit: Arc<MemoryAuditSink>,
    pub(crate) signal: SignalConfig,
}

impl HostSeams {
    fn processor(&self, clock: &ManualClock) -> Processor {
        let host = Host {
            storage: self.storage.clone(),
            key_provider: self.provider.clone(),
            transport: self.transport.clone(),
            business: self.business.clone(),
            authorizer: self.authorizer.clone(),
            clock: Arc::new(clock.clone()),
            audit: self.audit.clone(),
        };
        let policies = Policies {
            delivery: DeliveryConfig {
                retry_base: Duration::from_secs(2),
                retry_max: Duration::from_secs(60),
                receipt_timeout: Duration::from_secs(120),
                batch: 1_000,
            },
            signal: self.signal.clone(),
            // Small buckets are suppressed: two consumers make one.
            statistics: {
                let mut statistics = StatisticsConfig::default();
                statistics.k = 2;
                statistics
            },
            ..Policies::default()
        };
        Processor::new(host, policies).unwrap()
    }
}

/// The counts of `direction` messages at `status` in the `released`
/// statistics, one per report that has one.
pub(crate) fn counted_in(
    released: &[custodian::integrity::StatisticsReport],
    direction: custodian::integrity::Direction,
    status: custodian::integrity::Status,
) -> Vec<u64> {
    released
        .iter()
        .flat_map(|r| &r.messages)
        .filter(|m| m.direction == direction && m.status == status)
        .map(|m| m.messages)
        .collect()
}

pub(crate) struct Deployment {
    pub(crate) clock: ManualClock,
    /// The store under the faults (its calls never fail).
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) network: Arc<SimNetwork>,
    pub(crate) transport: Arc<PausedNetwork>,
    pub(crate) business: Arc<SimBusiness>,
    pub(crate) audit: Arc<MemoryAuditSink>,
    /// Fails the store's and the key provider's calls as a test plans.
    pub(crate) faults: Arc<HostFaults>,
    /// What the processor was built over, to build it again.
    pub(crate) seams: HostSeams,
    pub(crate) processor: Processor,
    pub(crate) b: BusinessId,
    pub(crate) owner: Principal,
    pub(crate) carrier: Principal,
    pub(crate) operator: Principal,
}

impl Deployment {
    /// A deployment with one business that has published its keys; the
    /// network and the business endpoint fail as `network` and `sink` say.
    pub(crate) async fn new(network: Faults, sink: Faults) -> Self {
        Self::with_signal(network, sink, SignalConfig::default()).await
    }

    /// A deployment as [`new`](Self::new) makes, whose Signal side runs
    /// under `signal` (a small prekey pool makes a test's many
    /// deployments cheap).
    pub(crate) async fn with_signal(network: Faults, sink: Faults, signal: SignalConfig) -> Self {
        let store = Arc::new(MemoryStore::new());
        Self::over(store, network, sink, signal).await
    }

    /// A deployment as [`with_signal`](Self::with_signal) makes, over
    /// `store` (a SQLite store, say) in place of the in-memory one.
    pub(crate) async fn over(
        store: Arc<dyn Storage>,
        network: Faults,
        sink: Faults,
        signal: SignalConfig,
    ) -> Self {
        // The business publishes its keys a millisecond before the start,
        // before any outage.
        let clock = ManualClock::new(Timestamp::from_millis(T0 - 1));
        let sim = Arc::new(SimNetwork::new(clock.clone(), network, 7).unwrap());
        let transport = Arc::new(PausedNetwork::new(sim.clone()));
        let business = SimBusiness::new(clock.clone(), sink, 8).unwrap();
        let audit = Arc::new(MemoryAuditSink::new());
        let faults = Arc::new(HostFaults::default());
        let b = BusinessId::new(BUSINESS).unwrap();
        let owner = Principal::new("owner");
        let carrier = Principal::new("transport");
        let operator = Principal::new("operator");
        let authorizer = StaticAuthorizer::new()
            .operator(&operator)
            .grant(&owner, b)
            .carrier(&carrier, b);
        let storage: Arc<dyn Storage> =
            Arc::new(FailingStore::paused(store.clone(), faults.clone()));
        let provider: Arc<dyn KeyProvider> = Arc::new(FailingProvider {
            inner: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            faults: faults.clone(),
        });
        let seams = HostSeams {
            storage,
            provider,
            transport: transport.clone(),
            business: Arc::new(PausedBusiness(business.clone())),
            authorizer: Arc::new(authorizer),
            audit: audit.clone(),
            signal,
        };
        let d = Self {
            processor: seams.processor(&clock),
            clock,
            store,
            network: sim,
            transport,
            business,
            audit,
            faults,
            seams,
            b,
            owner,
            carrier,
            operator,
        };
        d.processor.publish_keys(&d.owner, d.b).await.unwrap();
        d.clock.advance(Duration::from_millis(1));
        d
    }

    /// The process restarts: a new processor over the same host, with
    /// nothing in memory (no key unwrapped, no session loaded).
    pub(crate) fn restart(&mut self) {
        self.processor = self.seams.processor(&self.clock);
    }

    /// A consumer device (not on the simulated network) with a session
    /// with the business, from its published keys.
    pub(crate) async fn handset(&self) -> ConsumerDevice {
        let keys = self.transport.published.lock().unwrap().clone().unwrap();
        let mut device = ConsumerDevice::new(1);
        device
            .start_session(self.b, &keys.bundle(Some(0)))
            .await
            .unwrap();
        device
    }

    pub(crate) async fn inbound(&self, device: &mut ConsumerDevice, content: &[u8]) -> Inbound {
        Inbound {
            resend_of: None,
            from: consumer(1),
            device: device.device_id(),
            message: device.encrypt(self.b, content).await.unwrap(),
        }
    }

    /// Consumer 1's device 1 wrote, and was sent a reply; then it was
    /// reinstalled (a new identity key), asked for the reply, and had its
    /// retry receipt refused for the new key (the bundles served for it
    /// are the new install's from now on). Returns the reply's id, the
    /// new install (with a session), and its message, written with the
    /// new key, not yet received.
    pub(crate) async fn reinstalled_and_refused(&self) -> (MessageId, ConsumerDevice, Inbound) {
        let mut old = self.handset().await;
        let hello = self.inbound(&mut old, b"hello").await;
        assert!(self.receive(hello).await.unwrap().delivered);
        self.network.add_consumer(&consumer(1), 2).await;
        let reply = Outbound {
            to: consumer(1),
            ..self.outbound(b"your order shipped")
        };
        let id = self.processor.send(&self.owner, self.b, reply).await;
        let id = id.unwrap();
        let keys = self.transport.published.lock().unwrap().clone().unwrap();
        let mut new = ConsumerDevice::new(old.device_id());
        self.serve_new_install(&mut new);
        let refused = self
            .processor
            .retry_receipt(&self.carrier, self.b, id, 1)
            .await;
        assert!(
            matches!(refused, Ok(custodian::processor::StatusChange::Ignored)),
            "{refused:?}"
        );
        new.start_session(self.b, &keys.bundle(Some(1)))
            .await
            .unwrap();
        let again = self.inbound(&mut new, b"reinstalled").await;
        (id, new, again)
    }

    /// Serve a fresh bundle of `new`, consumer 1's device 1 reinstalled.
    pub(crate) fn serve_new_install(&self, new: &mut ConsumerDevice) {
        let bundle = new.bundle(true);
        self.transport.served.lock().unwrap().insert(1, bundle);
    }

    /// The business's phone hash of consumer `i`.
    pub(crate) async fn phone_of(&self, i: u32) -> PhoneHash {
        let keys = self.processor.keys(&self.operator).unwrap();
        keys.phone_hash(self.b, &consumer(i)).await.unwrap()
    }

    pub(crate) async fn receive(
        &self,
        inbound: Inbound,
    ) -> Result<custodian::processor::Receipt, ProcessorError> {
        self.processor.receive(&self.carrier, self.b, inbound).await
    }

    pub(crate) fn outbound(&self, content: &[u8]) -> Outbound {
        Outbound {
            to: consumer(2),
            content: content.to_vec().into(),
            category: Category::Utility,
        }
    }

    /// Add consumer `i` with one device, and send it "out"; its id.
    pub(crate) async fn send_out_to(&self, i: u32) -> MessageId {
        self.network.add_consumer(&consumer(i), 1).await;
        let message = Outbound {
            to: consumer(i),
            ..self.outbound(b"out")
        };
        self.processor
            .send(&self.owner, self.b, message)
            .await
            .unwrap()
    }

    /// Assert that `id` is the one message stored, that each of the first
    /// `devices` devices of the consumer [`outbound`](Self::outbound) sends
    /// to has it once and nothing else, and that it is delivered and
    /// billed once.
    pub(crate) async fn assert_sent_once(
        &self,
        id: MessageId,
        devices: u32,
        case: std::fmt::Arguments<'_>,
    ) {
        assert_eq!(self.store.census().await.unwrap().messages, 1, "{case}");
        let received = self.network.received(&consumer(2)).await;
        for device in 0..devices {
            let got = &received[&device];
            assert_eq!(got, &BTreeMap::from([(id, 1)]), "{case}: device {device}");
        }
        self.assert_delivered_and_billed([id].iter(), 1, case).await;
    }

    /// The business's message, "hi", delivered to the consumer's one
    /// device, which answers (the business's session is acknowledged) and
    /// then loses its sessions; and the message sent next, "again", which
    /// the device cannot decrypt, and asks for again. Their ids.
    pub(crate) async fn sent_on_a_lost_session(&self) -> (MessageId, MessageId) {
        self.network.add_consumer(&consumer(2), 1).await;
        let first = self
            .processor
            .send(&self.owner, self.b, self.outbound(b"hi"))
            .await
            .unwrap();
        self.network
            .consumer_sends(&consumer(2), 0, self.b, b"thanks")
            .await
            .unwrap();
        self.settle(3).await;
        self.network.lose_sessions(&consumer(2)).await;
        let again = self
            .processor
            .send(&self.owner, self.b, self.outbound(b"again"))
            .await
            .unwrap();
        (first, again)
    }

    /// After the world settles a while, the consumer's device has `again`
    /// (see [`sent_on_a_lost_session`](Self::sent_on_a_lost_session)), and
    /// it and `first` are delivered and billed once.
    pub(crate) async fn assert_got_again(
        &self,
        first: MessageId,
        again: MessageId,
        case: std::fmt::Arguments<'_>,
    ) {
        self.settle(5).await;
        let received = self.network.received(&consumer(2)).await;
        assert!(received[&0].contains_key(&again), "{case}: {received:?}");
        self.assert_delivered_and_billed([first, again].iter(), 2, case)
            .await;
    }

    /// Put a one-day retention in force for the business.
    pub(crate) fn shorten_retention_to_a_day(&self) {
        let shorter = format!("[business.{BUSINESS}]\nretention = \"1d\"\n");
        let shorter = RetentionPolicy::from_toml(&shorter).unwrap();
        self.processor
            .set_retention_policy(&self.operator, shorter)
            .unwrap();
    }

    /// Run the world for `rounds` steps of a minute: the network moves,
    /// due messages are retried.
    pub(crate) async fn settle(&self, rounds: usize) {
        for _ in 0..rounds {
            self.network.pump(&self.processor, &self.carrier).await;
            self.processor.retransmit_due(&self.operator).await.unwrap();
            self.clock.advance(Duration::from_secs(60));
        }
    }

    /// The messages the integrity signals of the business count received,
    /// in every window (exported now; 0 if the business is not in the
    /// export, the monitor having counted nothing for it).
    pub(crate) async fn received_counted(&self) -> u64 {
        self.processor
            .export_integrity(&self.operator)
            .await
            .unwrap();
        let reports = self.network.integrity_reports().await;
        let report = reports.iter().rev().find(|r| r.business == self.b);
        report.map_or(0, |r| {
            r.history.iter().map(|w| w.received).sum::<u64>() + r.current.received
        })
    }

    /// Two days on, the statistics' counts of `direction` messages at
    /// `status`, one per period whose bucket was released.
    pub(crate) async fn statistics_counted(
        &self,
        direction: custodian::integrity::Direction,
        status: custodian::integrity::Status,
    ) -> Vec<u64> {
        self.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let released = self.processor.statistics(&self.operator).await.unwrap();
        counted_in(&released, direction, status)
    }

    /// First messages, "hello", from device 1 of consumers 1, 3 and 4, each
    /// on its own one-time prekey (0, 1, 2).
    pub(crate) async fn three_first_messages(&self) -> [Inbound; 3] {
        let keys = self.transport.published.lock().unwrap().clone().unwrap();
        let mut inbound = Vec::new();
        for (i, prekey) in [(1, 0), (3, 1), (4, 2)] {
            let mut handset = ConsumerDevice::new(1);
            let bundle = keys.bundle(Some(prekey));
            handset.start_session(self.b, &bundle).await.unwrap();
            inbound.push(Inbound {
                resend_of: None,
                from: consumer(i),
                device: 1,
                message: handset.encrypt(self.b, b"hello").await.unwrap(),
            });
        }
        <[Inbound; 3]>::try_from(inbound).unwrap()
    }

    /// Messages billed in the statements exported so far.
    pub(crate) async fn billed(&self) -> u64 {
        self.network
            .billing_statements()
            .await
            .iter()
            .flat_map(|s| &s.records)
            .map(|r| r.messages.get(Category::Utility))
            .sum()
    }

    /// How many copies of each content the business got, whatever the
    /// messages they came as.
    pub(crate) fn contents(&self) -> BTreeMap<Vec<u8>, u32> {
        let copies = self.business.copies();
        let mut contents = BTreeMap::new();
        for (_, id, content) in self.business.contents() {
            *contents.entry(content).or_default() += copies[&id].total();
        }
        contents
    }

    /// Each of the messages `ids` is delivered, and its business told so
    /// (see [`assert_told_sent_delivered`]); the `sent` messages of the
    /// business are billed, each once, in the statements exported two days
    /// on.
    pub(crate) async fn assert_delivered_and_billed<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a MessageId>,
        sent: u64,
        case: std::fmt::Arguments<'_>,
    ) {
        for id in ids {
            let status = self
                .processor
                .message_status(&self.owner, self.b, *id)
                .await
                .unwrap();
            assert_eq!(status, (Status::Delivered, None), "{case}");
            let told: Vec<Status> = self.business.statuses()[id].iter().map(|s| s.0).collect();
            assert_told_sent_delivered(&told, case);
        }
        self.clock.advance(Duration::from_secs(2 * 24 * 3600));
        self.processor.export_billing(&self.operator).await.unwrap();
        assert_eq!(self.billed().await, sent, "{case}: billed");
    }

    /// Every status the business was told, per message: each at most once,
    /// never going backwards.
    pub(crate) fn assert_statuses_told_once_forward(&self, n: usize) {
        for (id, told) in self.business.statuses() {
            for pair in told.windows(2) {
                assert!(
                    pair[0].0 < pair[1].0,
                    "cut {n}: message {id} was told {told:?}"
                );
            }
        }
    }
}

/// Told delivered once, after sent. (Sent is told best effort: a call
/// dropped or failed while telling it may leave it untold.)
pub(crate) fn assert_told_sent_delivered(told: &[Status], case: std::fmt::Arguments<'_>) {
    assert!(
        told == [Status::Sent, Status::Delivered] || told == [Status::Delivered],
        "{case}: told {told:?}"
    );
}

/// How many holds the audit trail says stand: those placed less those
/// released.
pub(crate) fn holds_audited(audit: &MemoryAuditSink) -> i32 {
    audit
        .hold_events()
        .iter()
        .fold(0, |held, e| match e.action {
            HoldAction::Placed => held + 1,
            HoldAction::Released => held - 1,
        })
}

pub(crate) fn consumer(i: u32) -> PhoneNumber {
    format!("+4477009{i:05}").parse().unwrap()
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Keys and Signal sessions alone, over `storage` and `provider`, with a
/// small prekey pool (each prekey is a store call or two).
pub(crate) fn signal_stack(
    provider: Arc<dyn KeyProvider>,
    storage: Arc<dyn Storage>,
    clock: &ManualClock,
) -> (Arc<KeyManager>, Sessions) {
    let keys = Arc::new(KeyManager::new(provider, storage.clone()));
    let vault = Arc::new(Vault::new(
        keys.clone(),
        Arc::new(clock.clone()),
        EpochLength::DEFAULT,
    ));
    let config = SignalConfig {
        prekey_pool: 4,
        prekey_low_water: 2,
        ..SignalConfig::default()
    };
    (keys, Sessions::new(vault, storage, config).unwrap())
}

/// Signal sessions alone over the paused store, failing as `faults` says
/// (nothing fails until a test says so), for the state they keep in memory
/// between persists: a business with a session with one handset.
pub(crate) struct Signal {
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) faults: Arc<HostFaults>,
    pub(crate) sessions: Sessions,
    pub(crate) clock: ManualClock,
    pub(crate) b: BusinessId,
    pub(crate) peer: PeerId,
    pub(crate) handset: ConsumerDevice,
}

impl Signal {
    /// After the handset's first-contact message and `sends` messages of
    /// the business, which the store has not seen (sends are written
    /// behind within the library's counter lease).
    pub(crate) async fn new(sends: usize) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let store = Arc::new(MemoryStore::new());
        let faults = Arc::new(HostFaults::default());
        let failing: Arc<dyn Storage> =
            Arc::new(FailingStore::paused(store.clone(), faults.clone()));
        let provider: Arc<dyn KeyProvider> = Arc::new(FailingProvider {
            inner: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            faults: faults.clone(),
        });
        let (keys, sessions) = signal_stack(provider, failing, &clock);
        let b = BusinessId::new(BUSINESS).unwrap();
        let published = sessions.publish(b).await.unwrap();
        let mut handset = ConsumerDevice::new(1);
        handset
            .start_session(b, &published.bundle(Some(0)))
            .await
            .unwrap();
        let phone = keys.phone_hash(b, &consumer(1)).await.unwrap();
        let mut s = Self {
            store,
            faults,
            sessions,
            clock,
            b,
            peer: PeerId { phone, device: 1 },
            handset,
        };
        let first = s.handset.encrypt(b, b"hello").await.unwrap();
        s.sessions
            .decrypt(b, s.peer, &first, s.expiry())
            .await
            .unwrap();
        for i in 0..sends {
            s.send_and_read(format!("unpersisted {i}").as_bytes()).await;
        }
        s
    }

    pub(crate) fn expiry(&self) -> Timestamp {
        self.clock
            .now()
            .saturating_add(Duration::from_secs(30 * 24 * 3600))
    }

    pub(crate) fn encrypt(
        &self,
        content: &[u8],
    ) -> impl Future<Output = Result<Ciphertext, SignalError>> {
        self.sessions
            .encrypt(self.b, self.peer, content, self.expiry())
    }

    /// The business sends `content`; the handset must read it (it refuses
    /// a counter used before).
    pub(crate) async fn send_and_read(&mut self, content: &[u8]) {
        let out = self.encrypt(content).await.unwrap();
        assert_eq!(self.handset.decrypt(self.b, &out).await.unwrap(), content);
    }
}

/// A deployment whose devices' Signal records may grow to the smallest
/// limit, with consumer 1's device 0 driven by hand: 2,000 of its messages
/// made, the first received, and the business's reply to it sent.
pub(crate) async fn near_the_record_limit() -> (Deployment, ConsumerDevice, Vec<Inbound>, MessageId)
{
    let signal = SignalConfig {
        prekey_pool: 4,
        prekey_low_water: 2,
        max_record_len: custodian::signal::MIN_RECORD_LEN,
        ..SignalConfig::default()
    };
    let d = Deployment::with_signal(Faults::none(), Faults::none(), signal).await;
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut handset = ConsumerDevice::new(0);
    handset
        .start_session(d.b, &keys.bundle(Some(0)))
        .await
        .unwrap();
    let mut messages = Vec::new();
    for i in 0..2_000 {
        let message = handset.encrypt(d.b, format!("{i}").as_bytes()).await;
        messages.push(Inbound {
            resend_of: None,
            from: consumer(1),
            device: 0,
            message: message.unwrap(),
        });
    }
    assert!(d.receive(messages[0].clone()).await.unwrap().delivered);
    d.network.add_consumer(&consumer(1), 1).await;
    let reply = Outbound {
        to: consumer(1),
        ..d.outbound(b"reply")
    };
    let id = d.processor.send(&d.owner, d.b, reply).await.unwrap();
    (d, handset, messages, id)
}

/// Receive every other one of `messages` from the third on, until the
/// keys kept for those skipped would grow the record past its limit: the
/// skipped ones, and the index of the one refused.
pub(crate) async fn skip_to_the_limit(d: &Deployment, messages: &[Inbound]) -> (Vec<usize>, usize) {
    let (mut skipped, mut i) = (Vec::new(), 2);
    loop {
        match d.receive(messages[i].clone()).await {
            Ok(r) => assert!(r.delivered),
            Err(ProcessorError::Signal(SignalError::RecordTooLarge { .. })) => {
                return (skipped, i);
            }
            Err(e) => panic!("message {i}: {e:?}"),
        }
        skipped.push(i - 1);
        i += 2;
    }
}
