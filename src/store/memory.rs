//! The in-memory backend: for tests, examples and hosts that persist nothing.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Batch, BillingCount, BillingTake, Census, Delivery, Direction, ExpiredMessage, Hold, HoldScope,
    KeyStore, MessageRecord, Op, PeerId, Storage, StoreError, StoredBilling, TakeId, WriterId,
};
use crate::ids::{BusinessId, MessageId, PhoneHash, Region};
use crate::integrity::Category;
use crate::keys::{Epoch, KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::time::Timestamp;
use foldhash::fast::RandomState;

/// Everything in process memory, behind one mutex. Each method holds the lock
/// for its whole effect, which makes every method atomic. Its `Debug` shows
/// the region and counts only: no consumer's hash, no sealed record.
pub struct MemoryStore {
    region: Region,
    inner: Mutex<Inner>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MemoryStore");
        d.field("region", &self.region);
        // Not waiting: a caller holding the lock may be the one printing.
        if let Ok(inner) = self.inner.try_lock() {
            let messages: usize = inner.messages.values().map(HashMap::len).sum();
            d.field("messages", &messages)
                .field("peers", &inner.peers.len())
                .field("keys", &inner.keys.len())
                .field("holds", &inner.holds.len());
        }
        d.finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::in_region(Region::LOCAL)
    }
}

#[derive(Default)]
struct Inner {
    rings: HashMap<BusinessId, KekRing, RandomState>,
    keys: BTreeMap<KeyId, KeyEntry>,
    /// Epoch keys by end, then owner: the sweep's index.
    epochs: BTreeSet<(Timestamp, BusinessId)>,
    peers: BTreeMap<(BusinessId, PeerId), Vec<u8>>,
    /// Per business, by id: hashed, as ids are random and a tree would
    /// miss the cache at every level; boxed, so growth moves pointers.
    messages: HashMap<BusinessId, HashMap<MessageId, Box<MessageRecord>, RandomState>, RandomState>,
    /// Messages sent again on request ([`Op::PutResentMessage`]): the id
    /// each is stored under, by the id its header gives.
    known_as: HashMap<(BusinessId, MessageId), MessageId, RandomState>,
    /// The same, the other way: a header's id by the id stored under.
    headers: HashMap<(BusinessId, MessageId), MessageId, RandomState>,
    by_expiry: BTreeSet<(Timestamp, BusinessId, MessageId)>,
    by_due: BTreeSet<(Timestamp, BusinessId, MessageId)>,
    /// The messages of each consumer, for the questions asked by phone.
    by_phone: HashMap<(BusinessId, PhoneHash), PhoneIds, RandomState>,
    holds: BTreeMap<(HoldScope, String), Hold>,
    billing: BTreeMap<BusinessId, Billing>,
    /// The store's writer (see [`Storage::take_over`]).
    writer: Option<WriterId>,
}

/// The ids of one consumer's messages (present while it has any),
/// appended as they are stored and not removed one by one: a deleted
/// message's id stays until the list is twice as long as the messages
/// left, when it keeps only theirs. So storing a message costs a push, not
/// a hashed insert into a set that keeps growing; every reader checks each
/// id against the messages (and their consumer).
#[derive(Debug, Default)]
struct PhoneIds {
    ids: Vec<MessageId>,
    /// The consumer's stored messages.
    live: usize,
}

/// One business's billing ledger.
#[derive(Debug, Default)]
struct Billing {
    /// Each count, by take (`None` first), period and category.
    counts: BTreeMap<(Option<TakeId>, Timestamp, Timestamp, Category), u64>,
    /// The takes, oldest first.
    takes: Vec<BillingTake>,
}

impl Billing {
    fn take(&mut self, id: TakeId, closed_by: Timestamp, at: Timestamp) {
        if self.takes.iter().any(|t| t.id == id) {
            return;
        }
        let closed: Vec<_> = self
            .counts
            .iter()
            .take_while(|((take, ..), _)| take.is_none())
            .filter(|((_, _, end, _), _)| *end <= closed_by)
            .map(|(&key, &count)| (key, count))
            .collect();
        if closed.is_empty() {
            return;
        }
        for ((_, start, end, category), count) in closed {
            self.counts.remove(&(None, start, end, category));
            self.counts.insert((Some(id), start, end, category), count);
        }
        self.takes.push(BillingTake { id, at });
    }

    fn settle(&mut self, id: TakeId) {
        self.takes.retain(|t| t.id != id);
        self.counts.retain(|(take, ..), _| *take != Some(id));
    }

    fn stored(&self) -> StoredBilling {
        StoredBilling {
            counts: self
                .counts
                .iter()
                .map(|(&(take, start, end, category), &count)| BillingCount {
                    take,
                    start,
                    end,
                    category,
                    count,
                })
                .collect(),
            takes: self.takes.clone(),
        }
    }
}

/// What the indexes hold for one stored message.
struct IndexEntries {
    business: BusinessId,
    id: MessageId,
    expiry: Timestamp,
    phone: PhoneHash,
    due: Option<Timestamp>,
}

impl IndexEntries {
    fn of(m: &MessageRecord) -> Self {
        Self {
            business: m.business,
            id: m.id,
            expiry: m.expiry,
            phone: m.phone,
            due: m.delivery.next_attempt,
        }
    }
}

impl MemoryStore {
    /// An empty store in [`Region::LOCAL`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that declares `region`.
    pub fn in_region(region: Region) -> Self {
        Self {
            region,
            inner: Mutex::default(),
        }
    }

    /// Every stored byte string (wrapped KEKs, wrapped keys, sealed peers),
    /// for tests that search the store for secrets.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> Vec<Vec<u8>> {
        let inner = self.lock();
        let rings = inner
            .rings
            .values()
            .flat_map(|r| r.versions().iter().map(|v| v.wrapped.clone()));
        let keys = inner.keys.values().filter_map(|e| match e {
            KeyEntry::Wrapped(w) => Some(w.blob.clone()),
            KeyEntry::Destroyed { .. } => None,
        });
        rings
            .chain(keys)
            .chain(inner.peers.values().cloned())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under the lock panics (a batch is applied only once every
        // condition of it was checked, and applying it cannot fail), so a
        // panic elsewhere cannot leave the maps half-updated: recover the
        // guard.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// Apply `op` if its condition holds (a message put is new, a delivery
    /// updated has its expected status, a key consumed is live); whether it
    /// held. Nothing changes when it does not.
    fn apply(&mut self, op: Op) -> bool {
        match op {
            Op::PutPeer {
                business,
                peer,
                sealed,
            } => {
                self.peers.insert((business, peer), sealed);
            }
            Op::DeletePeer { business, peer } => {
                self.peers.remove(&(business, peer));
            }
            Op::DeleteIdlePeer {
                business,
                peer,
                now,
            } => {
                if !self.has_live_message(business, peer.phone, now)
                    && !self
                        .holds
                        .keys()
                        .any(|(scope, _)| scope.covers(business, peer.phone))
                {
                    self.peers.remove(&(business, peer));
                }
            }
            Op::ConsumeKey(id) => {
                if !self.is_live(&id) {
                    return false;
                }
                self.delete_key(&id);
            }
            Op::PutMessage(m) => return self.put_message(m, None),
            Op::PutResentMessage { record, header } => {
                return self.put_message(record, Some(header));
            }
            Op::UpdateDelivery {
                business,
                id,
                expected,
                delivery,
            } => {
                let m = self
                    .messages
                    .get_mut(&business)
                    .and_then(|m| m.get_mut(&id));
                let Some(m) = m.filter(|m| m.delivery == expected) else {
                    return false;
                };
                if let Some(due) = m.delivery.next_attempt {
                    self.by_due.remove(&(due, business, id));
                }
                if let Some(due) = delivery.next_attempt {
                    self.by_due.insert((due, business, id));
                }
                m.delivery = delivery;
            }
            Op::FailExpired { business, id } => {
                let m = self
                    .messages
                    .get_mut(&business)
                    .and_then(|m| m.get_mut(&id));
                if let Some(m) = m.filter(|m| m.delivery.status.is_open()) {
                    if let Some(due) = m.delivery.next_attempt {
                        self.by_due.remove(&(due, business, id));
                    }
                    m.delivery = m.delivery.failed_expired();
                }
            }
            Op::DeleteMessage { business, id } => {
                if let Some(of_business) = self.messages.get_mut(&business) {
                    let old = of_business.remove(&id);
                    if of_business.is_empty() {
                        self.messages.remove(&business);
                    }
                    if let Some(old) = old {
                        self.unindex(&IndexEntries::of(&old));
                    }
                }
            }
            Op::PutHold(hold) => {
                self.holds
                    .entry((hold.scope, hold.reference.clone()))
                    .or_insert(hold);
            }
            Op::DeleteHold { scope, reference } => {
                self.holds.remove(&(scope, reference));
            }
            Op::Bill {
                business,
                start,
                end,
                category,
            } => {
                let billing = self.billing.entry(business).or_default();
                let count = billing
                    .counts
                    .entry((None, start, end, category))
                    .or_default();
                *count = count.saturating_add(1);
            }
            Op::TakeBilling {
                business,
                id,
                closed_by,
                at,
            } => {
                if let Some(billing) = self.billing.get_mut(&business) {
                    billing.take(id, closed_by, at);
                }
            }
            Op::SettleBilling { business, id } => {
                if let Some(billing) = self.billing.get_mut(&business) {
                    billing.settle(id);
                    if billing.counts.is_empty() && billing.takes.is_empty() {
                        self.billing.remove(&business);
                    }
                }
            }
        }
        true
    }

    /// Whether every condition of `ops` holds, each checked where it stands
    /// in the batch (after the writes before it), before anything is applied.
    fn conditions_hold(&self, ops: &[Op]) -> bool {
        let conditional = |op: &Op| {
            matches!(
                op,
                Op::ConsumeKey(_)
                    | Op::UpdateDelivery { .. }
                    | Op::PutMessage(_)
                    | Op::PutResentMessage { .. }
            )
        };
        if !ops.iter().any(conditional) {
            return true;
        }
        // Each message's bookkeeping as the ops before have left it (`None`:
        // absent). Batches are a few operations: a list beats a map here.
        type Seen = Vec<((BusinessId, MessageId), Option<Delivery>)>;
        let mut seen: Seen = Vec::new();
        let mut consumed: Vec<KeyId> = Vec::new();
        let current = |seen: &Seen, key: (BusinessId, MessageId)| {
            seen.iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| *s)
                .unwrap_or_else(|| self.record(key.0, key.1).map(|m| m.delivery))
        };
        // The headers' ids whose mapping the batch changed: to the id stored
        // under, or `None` (forgotten with a message deleted).
        type Headers = Vec<((BusinessId, MessageId), Option<MessageId>)>;
        let mut headers: Headers = Vec::new();
        // The id header `key` names now, if any.
        let named = |headers: &Headers, key: (BusinessId, MessageId)| match headers
            .iter()
            .rev()
            .find(|(h, _)| *h == key)
        {
            Some(&(_, id)) => id,
            None => self.known_as.get(&key).copied(),
        };
        let known = |headers: &Headers, key| named(headers, key).is_some();
        for op in ops {
            match op {
                Op::ConsumeKey(id) => {
                    if !self.is_live(id) || consumed.contains(id) {
                        return false;
                    }
                    consumed.push(*id);
                }
                Op::UpdateDelivery {
                    business,
                    id,
                    expected,
                    delivery,
                } => {
                    if current(&seen, (*business, *id)) != Some(*expected) {
                        return false;
                    }
                    seen.push(((*business, *id), Some(*delivery)));
                }
                Op::PutMessage(m) => {
                    if current(&seen, (m.business, m.id)).is_some()
                        || known(&headers, (m.business, m.id))
                    {
                        return false;
                    }
                    seen.push(((m.business, m.id), Some(m.delivery)));
                }
                Op::PutResentMessage { record: m, header } => {
                    let (id, header) = ((m.business, m.id), (m.business, *header));
                    if [id, header]
                        .iter()
                        .any(|&k| current(&seen, k).is_some() || known(&headers, k))
                    {
                        return false;
                    }
                    seen.push((id, Some(m.delivery)));
                    headers.push((header, Some(m.id)));
                }
                Op::FailExpired { business, id } => {
                    if let Some(d) = current(&seen, (*business, *id))
                        && d.status.is_open()
                    {
                        seen.push(((*business, *id), Some(d.failed_expired())));
                    }
                }
                Op::DeleteMessage { business, id } => {
                    // The header that names the message stored under `id`
                    // now, forgotten with it.
                    let header = headers
                        .iter()
                        .filter(|(h, of)| h.0 == *business && *of == Some(*id))
                        .map(|&(h, _)| h)
                        .chain(self.headers.get(&(*business, *id)).map(|&h| (*business, h)))
                        .find(|&h| named(&headers, h) == Some(*id));
                    if let Some(header) = header {
                        headers.push((header, None));
                    }
                    seen.push(((*business, *id), None));
                }
                _ => {}
            }
        }
        true
    }

    /// Store `m`, known by `header` too if given, unless a message is
    /// stored under or known by either id; whether it was stored.
    fn put_message(&mut self, m: Box<MessageRecord>, header: Option<MessageId>) -> bool {
        let business = m.business;
        let taken = |inner: &Self, id| {
            inner.known_as.contains_key(&(business, id))
                || (Some(id) == header && inner.record(business, id).is_some())
        };
        if taken(self, m.id) || header.is_some_and(|h| taken(self, h)) {
            return false;
        }
        let entries = IndexEntries::of(&m);
        match self.messages.entry(business).or_default().entry(m.id) {
            Entry::Occupied(_) => return false,
            Entry::Vacant(vacant) => vacant.insert(m),
        };
        self.index(&entries);
        if let Some(header) = header {
            self.known_as.insert((business, header), entries.id);
            self.headers.insert((business, entries.id), header);
        }
        true
    }

    fn cap_expiry(&mut self, business: BusinessId, direction: Direction, period: Duration) {
        let Self {
            messages,
            by_expiry,
            ..
        } = self;
        for m in messages
            .get_mut(&business)
            .into_iter()
            .flat_map(|m| m.values_mut())
            .filter(|m| m.direction == direction)
        {
            let cap = m.created.saturating_add(period);
            if m.expiry > cap {
                by_expiry.remove(&(m.expiry, m.business, m.id));
                by_expiry.insert((cap, m.business, m.id));
                m.expiry = cap;
            }
        }
    }

    fn record(&self, business: BusinessId, id: MessageId) -> Option<&MessageRecord> {
        self.messages.get(&business)?.get(&id).map(|m| &**m)
    }

    /// The peer records of `business` (only `phone`'s, if given), in key
    /// order.
    fn peers_of(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> impl Iterator<Item = (&PeerId, &Vec<u8>)> {
        let from = PeerId {
            phone: phone.unwrap_or(PhoneHash::from_bytes([0; PhoneHash::LEN])),
            device: 0,
        };
        self.peers
            .range((business, from)..)
            .take_while(move |((b, p), _)| *b == business && phone.is_none_or(|ph| p.phone == ph))
            .map(|((_, p), sealed)| (p, sealed))
    }

    /// The messages of `business`, in no particular order.
    fn of_business(&self, business: BusinessId) -> impl Iterator<Item = &MessageRecord> {
        self.messages
            .get(&business)
            .into_iter()
            .flat_map(|m| m.values().map(|m| &**m))
    }

    fn index(&mut self, e: &IndexEntries) {
        self.by_expiry.insert((e.expiry, e.business, e.id));
        let phone = self.by_phone.entry((e.business, e.phone)).or_default();
        phone.ids.push(e.id);
        phone.live += 1;
        if let Some(due) = e.due {
            self.by_due.insert((due, e.business, e.id));
        }
    }

    fn unindex(&mut self, e: &IndexEntries) {
        self.by_expiry.remove(&(e.expiry, e.business, e.id));
        // Called once the message is gone from `messages`.
        let key = (e.business, e.phone);
        if let Some(phone) = self.by_phone.get_mut(&key) {
            phone.live = phone.live.saturating_sub(1);
            if phone.live == 0 {
                self.by_phone.remove(&key);
            } else if phone.ids.len() >= 2 * phone.live {
                let stored = self.messages.get(&e.business);
                phone
                    .ids
                    .retain(|id| stored.is_some_and(|m| m.contains_key(id)));
                // An id deleted and stored again was listed twice.
                phone.ids.sort_unstable();
                phone.ids.dedup();
            }
        }
        if let Some(due) = e.due {
            self.by_due.remove(&(due, e.business, e.id));
        }
        if !self.headers.is_empty()
            && let Some(header) = self.headers.remove(&(e.business, e.id))
        {
            self.known_as.remove(&(e.business, header));
        }
    }

    fn has_live_message(&self, business: BusinessId, phone: PhoneHash, now: Timestamp) -> bool {
        self.by_phone.get(&(business, phone)).is_some_and(|p| {
            p.ids
                .iter()
                .filter_map(|&id| self.record(business, id))
                .any(|m| m.phone == phone && m.expiry > now)
        })
    }

    /// Whether a wrapped key (not a tombstone) is stored under `id`.
    fn is_live(&self, id: &KeyId) -> bool {
        matches!(self.keys.get(id), Some(KeyEntry::Wrapped(_)))
    }

    fn delete_key(&mut self, id: &KeyId) -> bool {
        if let Some(ix) = epoch_index(id) {
            self.epochs.remove(&ix);
        }
        self.keys.remove(id).is_some()
    }
}

fn epoch_index(id: &KeyId) -> Option<(Timestamp, BusinessId)> {
    (id.kind == KeyKind::Epoch).then_some((Timestamp::from_millis(id.id), id.business))
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
        Ok(self.lock().rings.get(&business).cloned())
    }

    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let stored = inner.rings.get(&ring.business()).map(KekRing::revision);
        if stored != expected {
            return Err(StoreError::Conflict);
        }
        inner.rings.insert(ring.business(), ring.clone());
        Ok(())
    }

    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
        Ok(self.lock().keys.get(id).cloned())
    }

    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError> {
        let mut inner = self.lock();
        let id = key.id;
        if let Some(existing) = inner.keys.get(&id) {
            return Ok(existing.clone());
        }
        let entry = KeyEntry::Wrapped(key);
        inner.keys.insert(id, entry.clone());
        if let Some(ix) = epoch_index(&id) {
            inner.epochs.insert(ix);
        }
        Ok(entry)
    }

    async fn rewrap_key(&self, key: WrappedKey, expected_version: u32) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.keys.get_mut(&key.id) {
            Some(KeyEntry::Wrapped(stored)) if stored.kek_version == expected_version => {
                *stored = key;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let was_live = inner.is_live(id);
        inner.keys.insert(*id, KeyEntry::Destroyed { at });
        if let Some(ix) = epoch_index(id) {
            inner.epochs.insert(ix);
        }
        Ok(was_live)
    }

    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        Ok(ids.iter().filter(|id| inner.delete_key(id)).count() as u64)
    }

    async fn delete_keys_as_read(&self, keys: &[WrappedKey]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let unchanged = |inner: &Inner, key: &WrappedKey| matches!(inner.keys.get(&key.id), Some(KeyEntry::Wrapped(w)) if w == key);
        Ok(keys
            .iter()
            .filter(|key| unchanged(&inner, key) && inner.delete_key(&key.id))
            .count() as u64)
    }

    async fn delete_epoch_keys(
        &self,
        ids: &[KeyId],
        seen: &[HoldScope],
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let unseen: BTreeSet<BusinessId> = inner
            .holds
            .keys()
            .map(|(scope, _)| scope)
            .filter(|scope| !seen.contains(scope))
            .map(HoldScope::business)
            .collect();
        Ok(ids
            .iter()
            .filter(|id| !unseen.contains(&id.business))
            .filter(|id| inner.delete_key(id))
            .count() as u64)
    }

    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .keys
            .range((start, Bound::Unbounded))
            .skip_while(|(id, _)| id.business < business)
            .take_while(|(id, _)| id.business == business)
            .filter_map(|(_, e)| match e {
                KeyEntry::Wrapped(w) if w.kek_version < version => Some(w.clone()),
                _ => None,
            })
            .take(limit)
            .collect())
    }

    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError> {
        let inner = self.lock();
        let n = inner
            .keys
            .iter()
            .filter(|(id, e)| {
                id.business == business
                    && matches!(e, KeyEntry::Wrapped(w) if w.kek_version == version)
            })
            .count();
        Ok(n as u64)
    }

    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        let inner = self.lock();
        let from = KeyId {
            business,
            kind,
            id: after.map_or(0, |a| a.saturating_add(1)),
        };
        if after == Some(u64::MAX) {
            return Ok(Vec::new());
        }
        Ok(inner
            .keys
            .range(from..)
            .take_while(|(id, _)| id.business == business && id.kind == kind)
            .filter_map(|(_, e)| match e {
                KeyEntry::Wrapped(w) => Some(w.clone()),
                KeyEntry::Destroyed { .. } => None,
            })
            .take(limit)
            .collect())
    }

    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .epochs
            .iter()
            .take_while(|(end, _)| *end <= now)
            .take(limit)
            .map(|&(end, business)| KeyId {
                business,
                kind: KeyKind::Epoch,
                id: end.as_millis(),
            })
            .collect())
    }
}

#[async_trait]
impl Storage for MemoryStore {
    fn region(&self) -> Region {
        self.region
    }

    async fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        // One lock for the whole batch: nothing can observe half of it, and
        // no operation can fail halfway (the conditions that fail a batch
        // are all checked before anything is applied).
        let mut inner = self.lock();
        if let Some(writer) = batch.writer()
            && inner.writer != Some(writer)
        {
            return Err(StoreError::Superseded);
        }
        match batch.take_single() {
            // Most batches are one operation: checked as it is applied, with
            // one lookup.
            Some(op) => inner.apply(op).then_some(()).ok_or(StoreError::Conflict),
            None => {
                if !inner.conditions_hold(batch.ops()) {
                    return Err(StoreError::Conflict);
                }
                for op in batch.into_ops() {
                    let held = inner.apply(op);
                    debug_assert!(held, "conditions checked before applying");
                }
                Ok(())
            }
        }
    }

    async fn take_over(&self, writer: WriterId) -> Result<(), StoreError> {
        self.lock().writer = Some(writer);
        Ok(())
    }

    async fn peer(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().peers.get(&(business, peer)).cloned())
    }

    async fn peer_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, StoreError> {
        Ok(self
            .lock()
            .peers_of(business, Some(phone))
            .map(|(p, _)| p.device)
            .collect())
    }

    async fn message(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let inner = self.lock();
        let record = inner.record(business, id).or_else(|| {
            let stored = inner.known_as.get(&(business, id))?;
            inner.record(business, *stored)
        });
        Ok(record.cloned())
    }

    async fn due_messages(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .by_due
            .iter()
            .take_while(|(due, _, _)| *due <= now)
            .take(limit)
            .filter_map(|&(_, b, id)| inner.record(b, id).cloned())
            .collect())
    }

    async fn expired_open_messages(
        &self,
        now: Timestamp,
        after: Option<(Timestamp, BusinessId, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .by_expiry
            .range((start, Bound::Unbounded))
            .take_while(|(expiry, _, _)| *expiry <= now)
            .filter_map(|&(_, b, id)| inner.record(b, id))
            .filter(|m| m.delivery.status.is_open())
            .take(limit)
            .cloned()
            .collect())
    }

    async fn cap_expiry(
        &self,
        business: BusinessId,
        direction: Direction,
        period: Duration,
        _after: Option<MessageId>,
        _limit: usize,
    ) -> Result<Option<MessageId>, StoreError> {
        // In memory the whole business at once is one short critical section.
        self.lock().cap_expiry(business, direction, period);
        Ok(None)
    }

    async fn delete_expired(
        &self,
        now: Timestamp,
        abandon_before: Timestamp,
        holds: &[HoldScope],
        limit: usize,
    ) -> Result<Vec<ExpiredMessage>, StoreError> {
        let mut inner = self.lock();
        let doomed: Vec<ExpiredMessage> = inner
            .by_expiry
            .iter()
            .take_while(|(expiry, _, _)| *expiry <= now)
            .filter_map(|&(_, b, id)| inner.record(b, id))
            .filter(|m| !m.delivery.status.is_open())
            .filter(|m| m.delivery.next_attempt.is_none() || m.expiry <= abandon_before)
            .filter(|m| !holds.iter().any(|h| h.covers(m.business, m.phone)))
            .filter(|m| {
                !inner
                    .holds
                    .keys()
                    .any(|(h, _)| h.covers(m.business, m.phone))
            })
            .take(limit)
            .map(ExpiredMessage::from)
            .collect();
        for m in &doomed {
            inner.apply(Op::DeleteMessage {
                business: m.business,
                id: m.id,
            });
        }
        Ok(doomed)
    }

    async fn message_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        let mut out: Vec<BusinessId> = self.lock().messages.keys().copied().collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn message_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        let inner = self.lock();
        let epochs: BTreeSet<Epoch> = inner
            .of_business(business)
            .filter(|m| phone.is_none_or(|p| m.phone == p))
            .map(|m| m.epoch)
            .collect();
        Ok(epochs.into_iter().collect())
    }

    async fn peer_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        let epochs = self
            .lock()
            .peers_of(business, phone)
            .map(|(_, sealed)| super::peer_epoch(sealed))
            .collect::<Result<BTreeSet<Epoch>, StoreError>>()?;
        Ok(epochs.into_iter().collect())
    }

    async fn has_live_message(
        &self,
        business: BusinessId,
        phone: PhoneHash,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        Ok(self.lock().has_live_message(business, phone, now))
    }

    async fn orphan_peers(
        &self,
        now: Timestamp,
        after: Option<(BusinessId, PeerId)>,
        limit: usize,
    ) -> Result<Vec<(BusinessId, PeerId)>, StoreError> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .peers
            .range((start, Bound::Unbounded))
            .map(|(k, _)| *k)
            .filter(|(b, p)| !inner.has_live_message(*b, p.phone, now))
            .take(limit)
            .collect())
    }

    async fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        Ok(self.lock().holds.values().cloned().collect())
    }

    async fn census(&self) -> Result<Census, StoreError> {
        let inner = self.lock();
        let phones: BTreeSet<(BusinessId, PhoneHash)> = inner
            .by_phone
            .keys()
            .copied()
            .chain(inner.peers.keys().map(|(b, p)| (*b, p.phone)))
            .collect();
        let epoch_keys = inner
            .keys
            .iter()
            .filter(|(id, e)| id.kind == KeyKind::Epoch && matches!(e, KeyEntry::Wrapped(_)))
            .count();
        Ok(Census {
            messages: inner.messages.values().map(|m| m.len() as u64).sum(),
            peers: inner.peers.len() as u64,
            phones: phones.len() as u64,
            epoch_keys: epoch_keys as u64,
        })
    }

    async fn billing(&self, business: BusinessId) -> Result<StoredBilling, StoreError> {
        Ok(self
            .lock()
            .billing
            .get(&business)
            .map(Billing::stored)
            .unwrap_or_default())
    }

    async fn billing_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        Ok(self.lock().billing.keys().copied().collect())
    }
}
