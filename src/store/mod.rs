//! Where state lives: the storage traits a host implements, and the backends
//! that ship with the crate.
//!
//! Stores hold no content, phone number or key in clear: keys are wrapped,
//! records sealed, numbers keyed hashes; what stays in clear is index and
//! bookkeeping fields, KEK rings (their versions wrapped), holds and billing
//! counts. Each trait method is atomic on its own; methods that must
//! not lose a race (creating a key, rewrapping one, changing a KEK ring) take
//! the value they expect to replace and refuse with [`StoreError::Conflict`]
//! or report the winner, so concurrent callers never overwrite each other.

use async_trait::async_trait;

use crate::ids::{BusinessId, MessageId, PhoneHash, Region};
use crate::keys::{Epoch, KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::time::Timestamp;

mod batch;
mod billing;
mod hold;
mod memory;
mod message;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use batch::{Batch, Op, PeerId, WriterId};
pub use billing::{BillingCount, BillingTake, StoredBilling, TakeId};
pub use hold::{Hold, HoldScope};
pub use memory::MemoryStore;
pub use message::{
    Census, Delivery, Direction, ExpiredMessage, FailureReason, MessageRecord, Status,
};
#[cfg(all(feature = "sqlite", any(test, fuzzing)))]
pub(crate) use sqlite::MESSAGE_COLUMNS;
#[cfg(all(feature = "sqlite", any(test, fuzzing)))]
pub(crate) use sqlite::check_message_row;
#[cfg(feature = "sqlite")]
pub use sqlite::{Durability, GroupCommits, SqliteConfig, SqliteOpenError, SqliteStore};

/// A storage failure. Its text is logged as given: a backend keeps
/// content, phone numbers and phone hashes out of it (a database's own
/// error may quote the key values it refused).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A compare-and-swap lost: the stored value changed since it was read.
    /// Reload and retry.
    #[error("concurrent update: the stored value changed since it was read")]
    Conflict,
    /// The stored data is not what this crate wrote (damaged or foreign).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, connection, ...).
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// A fenced batch ([`Batch::fenced`]) named a writer that is not the
    /// store's: another processor has taken over ([`Storage::take_over`]).
    /// Nothing was written; this processor must stop writing.
    #[error("another processor has taken over the store")]
    Superseded,
}

/// The epoch a stored Signal peer record is sealed under, from its
/// envelope's header: what [`Storage::peer_epochs`] reads in every backend.
pub(crate) fn peer_epoch(sealed: &[u8]) -> Result<Epoch, StoreError> {
    crate::envelope::Envelope::parse(sealed)
        .map(|e| e.header().epoch())
        .map_err(|e| StoreError::Corrupt(format!("peers.sealed: not an envelope: {e}")))
}

/// Where wrapped keys and KEK rings live.
///
/// Implementations must make each method atomic. Keys are never stored in
/// clear: everything passed here is already wrapped. A write whose future
/// is dropped lands before any read that begins after the drop, or never,
/// as [`Storage::commit`] says: a key destroyed by a call given up on must
/// not be read back, and cached, meanwhile.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// The KEK ring of `business`, if it has one.
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError>;

    /// Store `ring` if the stored ring's revision is `expected` (`None`: no
    /// ring stored yet); otherwise [`StoreError::Conflict`].
    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError>;

    /// The entry stored under `id`.
    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError>;

    /// Store `key` unless something is already stored under its id; return
    /// what is stored afterwards (ours, a concurrent winner, or a tombstone).
    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError>;

    /// Replace a live key's wrapping if it is still wrapped under
    /// `expected_version`. Returns whether it was replaced.
    async fn rewrap_key(&self, key: WrappedKey, expected_version: u32) -> Result<bool, StoreError>;

    /// Destroy the key under `id`: delete its wrapped bytes and keep a
    /// tombstone dated `at`. Returns whether a live key was destroyed.
    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError>;

    /// Remove entries (live or tombstones) outright. Returns how many existed.
    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError>;

    /// Remove each of `keys` that is stored exactly as given (live, under
    /// its KEK version, with its bytes), in one step with the check: one
    /// replaced since it was read (rewrapped, or deleted and made again
    /// under its id) stays. Returns how many were removed.
    async fn delete_keys_as_read(&self, keys: &[WrappedKey]) -> Result<u64, StoreError>;

    /// Remove ended epoch keys `ids` as [`delete_keys`](Self::delete_keys)
    /// does, except those of a business that a stored legal hold not among
    /// `seen` covers, the holds read in the same atomic step: the sweep
    /// destroys the keys the holds it read leave, and a hold stored since
    /// (by another process on the store) keeps its business's keys until
    /// the next sweep reads it. A hold row whose scope does not decode
    /// counts as covering its whole business. Returns how many existed.
    async fn delete_epoch_keys(&self, ids: &[KeyId], seen: &[HoldScope])
    -> Result<u64, StoreError>;

    /// Up to `limit` live keys of `business` wrapped under a version below
    /// `version`, in id order, after `after` (for resumable paging). An
    /// entry that does not decode is skipped, as by
    /// [`keys_of_kind`](Self::keys_of_kind): the rewrap of every other key
    /// goes on.
    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError>;

    /// How many live keys of `business` are wrapped under exactly `version`.
    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` live keys of `business` of `kind`, in id order, with ids
    /// above `after`. An entry that does not decode is skipped (the SQLite
    /// store counts it in `SqliteStore::damaged_rows_skipped`), not returned
    /// as an error: the listing chooses prekeys to publish and retire, and
    /// one damaged key must not stop that.
    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError>;

    /// Up to `limit` epoch-key entries (live or tombstones), of any business,
    /// whose epoch ended at or before `now`, oldest first.
    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError>;
}

/// Everything the processor stores beyond keys: Signal state (one sealed
/// record per consumer device), messages (sealed, with their index fields in
/// clear: business, id, direction, phone hash, expiry, epoch, delivery
/// bookkeeping), legal holds, and the billing ledger (see [`StoredBilling`]).
/// Writes come as [`Batch`]es that take effect together or not at all, key
/// deletions included, so a backend stores keys too.
///
/// A record the backend cannot decode (damaged, or not written by this
/// crate) fails a read of that record with [`StoreError::Corrupt`], as it
/// does the reads that guard a deletion ([`holds`](Self::holds),
/// [`message_epochs`](Self::message_epochs),
/// [`peer_epochs`](Self::peer_epochs)). The listings that only choose
/// what to work on next ([`due_messages`](Self::due_messages),
/// [`expired_open_messages`](Self::expired_open_messages),
/// [`delete_expired`](Self::delete_expired),
/// [`orphan_peers`](Self::orphan_peers),
/// [`message_businesses`](Self::message_businesses),
/// [`billing_businesses`](Self::billing_businesses)) skip it instead,
/// without counting it against their `limit`, and never delete it, and
/// [`cap_expiry`](Self::cap_expiry) pages past it: one damaged record must
/// not stop retransmission or the sweep for every other. The backend says
/// so in its log; it is left for an operator. Keys are the exception:
/// destroying one reads nothing of it, so
/// [`ended_epoch_keys`](KeyStore::ended_epoch_keys) lists every key whose
/// id decodes, and a damaged key is destroyed at its epoch's end like any
/// other (nothing stays readable past retention).
#[async_trait]
pub trait Storage: KeyStore {
    /// The region this store keeps data in; records are sealed for it.
    fn region(&self) -> Region;

    /// Apply every operation of `batch`, or none of them. Once this returns
    /// `Ok`, the batch is as durable as the backend promises. A commit whose
    /// future is dropped may still land (a `SqliteStore` hands the batch to
    /// its writer thread at the first poll): callers write conditionally,
    /// so that making an unanswered write again changes nothing. It must
    /// land before any read (of this store, this process) that begins once
    /// the future is dropped, or never: a read waits for such a write to
    /// land or fail. Otherwise the next operation reads the state before
    /// it, and its own write lands over it (a session started twice from
    /// one one-time prekey, a replay's key kept).
    async fn commit(&self, batch: Batch) -> Result<(), StoreError>;

    /// Make `writer` the store's writer: from this call's return on, a
    /// batch fenced by another writer ([`Batch::fenced`]) fails whole with
    /// [`StoreError::Superseded`]; batches fenced by `writer` commit as
    /// usual, as do unfenced ones. The check is part of the batch's
    /// commit, atomic with its writes. Taking over again as the same
    /// writer changes nothing.
    ///
    /// A processor takes over once, before it reads Signal state it may
    /// write back, and fences every write of that state: a processor
    /// superseded by a newer one (another process on the same store, say)
    /// can then never persist a Signal session over the newer one's, which
    /// would reissue sending counters it used (two messages under one
    /// message key).
    async fn take_over(&self, writer: WriterId) -> Result<(), StoreError>;

    /// The sealed record of `peer` under `business`.
    async fn peer(&self, business: BusinessId, peer: PeerId)
    -> Result<Option<Vec<u8>>, StoreError>;

    /// The device ids of `phone` with a stored record under `business`, ascending.
    async fn peer_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, StoreError>;

    /// Whether `phone` has a stored message of `business` expiring after
    /// `now`: its Signal state is needed (the rule [`orphan_peers`] keeps
    /// state by).
    ///
    /// [`orphan_peers`]: Storage::orphan_peers
    async fn has_live_message(
        &self,
        business: BusinessId,
        phone: PhoneHash,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// The stored message `id` of `business`: stored under `id`, or known
    /// by it (see [`Op::PutResentMessage`]; its record has the id it is
    /// stored under).
    async fn message(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StoreError>;

    /// Up to `limit` messages whose next attempt is due at or before `now`,
    /// earliest first.
    async fn due_messages(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError>;

    /// Up to `limit` messages that expired at or before `now` while still
    /// open (queued or sent, never delivered), in `(expiry, business, id)`
    /// order after `after` (for paging past messages left open): the
    /// processor marks them failed and tells the business before they are
    /// deleted.
    async fn expired_open_messages(
        &self,
        now: Timestamp,
        after: Option<(Timestamp, BusinessId, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError>;

    /// Shorten retention retroactively, for up to `limit` messages of
    /// `business` in id order after `after`: each message in `direction`
    /// whose expiry is later than its creation plus `period` expires then
    /// instead (never later). Returns the id to continue after, or `None`
    /// once every message of the business was looked at. Applied when a
    /// business's retention is shortened, so that the sweep deletes what
    /// reads already refuse; a backend may do more than `limit` at once.
    async fn cap_expiry(
        &self,
        business: BusinessId,
        direction: Direction,
        period: std::time::Duration,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Option<MessageId>, StoreError>;

    /// Atomically delete and return up to `limit` messages that expired at or
    /// before `now` and are settled (delivered, read or failed) and covered
    /// by none of `holds` and no hold stored, earliest first: those with
    /// nothing left to tell anyone (no attempt pending), and those that
    /// expired at or before `abandon_before` whatever is pending (a status
    /// report the business could not take for that long is given up). An
    /// open message is never deleted: it must be marked failed first. The
    /// stored holds are read in the same atomic step, so a hold stored since
    /// `holds` was read (by another process on the same store, say) is
    /// honoured too. Of a stored hold only what it covers is read: one whose
    /// business decodes but whose scope does not is taken as a hold of that
    /// whole business; one whose business does not decode fails the call
    /// with [`StoreError::Corrupt`].
    async fn delete_expired(
        &self,
        now: Timestamp,
        abandon_before: Timestamp,
        holds: &[HoldScope],
        limit: usize,
    ) -> Result<Vec<ExpiredMessage>, StoreError>;

    /// The businesses with at least one stored message, ascending.
    async fn message_businesses(&self) -> Result<Vec<BusinessId>, StoreError>;

    /// The distinct epochs of the stored messages of `business` (only those
    /// about `phone`, if given), ascending: with
    /// [`peer_epochs`](Self::peer_epochs), what a legal hold must keep from
    /// shredding.
    async fn message_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError>;

    /// The distinct epochs the stored Signal peer records of `business`
    /// (only `phone`'s, if given) are sealed under, ascending, as their
    /// envelopes' headers say: a record is sealed with the latest expiry of
    /// any message exchanged with its device, which may be a message deleted
    /// since (a shortened period), so a legal hold must keep these epochs
    /// too. A record whose header does not parse fails the read with
    /// [`StoreError::Corrupt`].
    async fn peer_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError>;

    /// Up to `limit` peer records, in key order after `after`, whose consumer
    /// has no message expiring after `now` (a full, resumable scan).
    async fn orphan_peers(
        &self,
        now: Timestamp,
        after: Option<(BusinessId, PeerId)>,
        limit: usize,
    ) -> Result<Vec<(BusinessId, PeerId)>, StoreError>;

    /// The legal holds in force.
    async fn holds(&self) -> Result<Vec<Hold>, StoreError>;

    /// The legal hold on `scope` for the case `reference`, if one is in
    /// force: what placing and releasing a hold read, so that a damaged
    /// hold of another scope or case stops neither. The default reads
    /// every hold; a backend that can be damaged looks up this one alone.
    async fn hold(&self, scope: HoldScope, reference: &str) -> Result<Option<Hold>, StoreError> {
        Ok(self
            .holds()
            .await?
            .into_iter()
            .find(|h| h.scope == scope && h.reference == reference))
    }

    /// What the legal holds in force cover: the scopes of
    /// [`holds`](Self::holds), for the checks that guard a deletion (the
    /// sweep, early shreds, forgetting a consumer). A backend that can read
    /// a damaged hold's business but not the rest of its scope answers the
    /// whole business (keeping data is the safe side), so that one damaged
    /// hold stops no other business's sweep; one whose business it cannot
    /// read fails the call.
    async fn held_scopes(&self) -> Result<Vec<HoldScope>, StoreError> {
        Ok(self.holds().await?.into_iter().map(|h| h.scope).collect())
    }

    /// How much the store holds.
    async fn census(&self) -> Result<Census, StoreError>;

    /// What is stored of `business`'s billing: its counts and its takes
    /// not yet settled, read in one atomic step.
    async fn billing(&self, business: BusinessId) -> Result<StoredBilling, StoreError>;

    /// The businesses with a stored billing count or take, ascending.
    async fn billing_businesses(&self) -> Result<Vec<BusinessId>, StoreError>;

    /// Remove what deleted records left behind in the backend's own files,
    /// where it keeps older versions of its pages (a write-ahead log, say)
    /// or stale copies of rows it moved: after this, the bytes of deleted
    /// messages and destroyed keys are gone from the files as well as from
    /// the records (for `SqliteStore`, see its promises for what a
    /// configuration may leave). The sweep calls it once every stage that
    /// deletes has run to its end since the last call, in one sweep or
    /// several (slices, sweeps dropped each time in the stage that tells
    /// businesses), and at the end of a complete sweep that deleted
    /// anything after, and logs a failure rather than failing: a backend
    /// that cannot do it now (a reader holds an old snapshot) is asked
    /// again when the next such stage ends. The
    /// default, for backends that keep no old versions, does nothing.
    async fn scrub(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
