//! Reads: a small pool of read-only connections, and the queries.
//!
//! Under write-ahead logging a reader sees the last committed transaction
//! and is not blocked by the writer, nor blocks it (but for a write its
//! caller gave up on: see `SqliteStore::reads`). Each read is one
//! statement, or one read transaction when it takes several, so a read never
//! sees half of a batch. Reads run on the calling task's thread: they are
//! indexed lookups and bounded scans, not worth a thread hop each.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, Row, params};

use super::codec::{
    self, Cols, Db, business_sql, key_id_sql, message_columns, time_sql, u64_to_sql,
};
use super::open_files::Named;
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::integrity::Category;
use crate::keys::{Epoch, KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::store::{
    BillingCount, BillingTake, Census, Hold, HoldScope, MessageRecord, PeerId, StoreError,
    StoredBilling, TakeId,
};
use crate::time::Timestamp;

/// Statements each connection keeps prepared.
const STATEMENT_CACHE: usize = 48;

/// How long a pooled reader reads without looking whether the store's
/// path still names its file (see [`Named`]): a look is a system call,
/// dearer than a read. On the file it opened, a pooled reader reads what
/// the store wrote, replaced or not; the file put at the path, written by
/// another, shares its log's name.
const RECHECK: Duration = Duration::from_secs(1);

/// Read-only connections, opened on demand, up to `keep` kept for reuse.
pub(super) struct Readers {
    file: Named,
    busy_timeout: Duration,
    keep: usize,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(file: Named, busy_timeout: Duration, keep: usize) -> Self {
        Self {
            file,
            busy_timeout,
            keep,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Open a read-only connection to the database, refused once its path
    /// names another file (see [`Named`]): checked once the connection is
    /// open, before it reads anything (its log included).
    pub(super) fn open(&self) -> Result<Connection, StoreError> {
        let conn = open_read_only(self.file.path(), self.busy_timeout).db()?;
        self.file.check()?;
        Ok(conn)
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        // The guarded Vec is only pushed and popped: always consistent.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on a pooled connection. The lock is held only to take and
    /// return a connection, never while `f` runs.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle().pop();
        let mut conn = match pooled {
            Some(c) => match self.file.check_lately(RECHECK) {
                Ok(()) => c,
                Err(e) => {
                    self.idle().clear();
                    return Err(e);
                }
            },
            None => self.open()?,
        };
        let out = f(&mut conn);
        // A connection left inside a transaction (an error mid-read) is dropped.
        if conn.is_autocommit() {
            let mut idle = self.idle();
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        out
    }
}

/// A read-only connection to the database at `path`.
pub(super) fn open_read_only(
    path: &std::path::Path,
    busy: Duration,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    // Sorts and temporary tables (a census's `UNION` of phone hashes, say)
    // stay in memory, never in a file outside the store, as the writer's do.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Collect every row of a query through `decode`.
fn collect<T>(
    rows: &mut rusqlite::Rows<'_>,
    mut decode: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    while let Some(row) = rows.next().db()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

pub(super) fn ring(conn: &Connection, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT revision, ring FROM kek_rings WHERE business = ?1")
        .db()?;
    let mut rows = stmt.query([business_sql(business)]).db()?;
    let Some(row) = rows.next().db()? else {
        return Ok(None);
    };
    let c = Cols::new(row, "kek_rings");
    let revision = c.u64(0, "revision")?;
    let ring: KekRing = serde_json::from_slice(c.blob(1, "ring")?)
        .map_err(|_| codec::corrupt("kek_rings.ring", "not a valid KEK ring"))?;
    if ring.business() != business || ring.revision() != revision {
        return Err(codec::corrupt(
            "kek_rings.ring",
            "the ring does not match its row's business and revision",
        ));
    }
    Ok(Some(ring))
}

pub(super) fn key(conn: &Connection, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
    let (business, kind, key) = key_id_sql(id);
    let mut stmt = conn
        .prepare_cached(
            "SELECT kek_version, blob, destroyed_at FROM wrapped_keys
             WHERE business = ?1 AND kind = ?2 AND id = ?3",
        )
        .db()?;
    let mut rows = stmt.query(params![business, kind, key]).db()?;
    match rows.next().db()? {
        None => Ok(None),
        Some(row) => entry(&Cols::new(row, "wrapped_keys"), *id, 0).map(Some),
    }
}

/// A `kek_version, blob, destroyed_at` triple from column `at` on.
fn entry(c: &Cols<'_, '_>, id: KeyId, at: usize) -> Result<KeyEntry, StoreError> {
    let version = c.opt_int(at, "kek_version")?;
    let blob = c.opt_blob(at + 1, "blob")?;
    let destroyed = c.opt_time(at + 2, "destroyed_at")?;
    match (version, blob, destroyed) {
        (Some(v), Some(blob), None) => Ok(KeyEntry::Wrapped(WrappedKey {
            id,
            kek_version: u32::try_from(v)
                .map_err(|_| codec::corrupt("wrapped_keys.kek_version", "out of range"))?,
            blob: blob.to_vec(),
        })),
        (None, None, Some(at)) => Ok(KeyEntry::Destroyed { at }),
        _ => Err(codec::corrupt(
            "wrapped_keys",
            "an entry is neither a live key nor a tombstone",
        )),
    }
}

/// A live key from `kind, id, kek_version, blob, destroyed_at` of `business`.
fn live_key(row: &Row<'_>, business: BusinessId) -> Result<WrappedKey, StoreError> {
    let c = Cols::new(row, "wrapped_keys");
    let id = KeyId {
        business,
        kind: c.key_kind(0, "kind")?,
        id: c.u64(1, "id")?,
    };
    match entry(&c, id, 2)? {
        KeyEntry::Wrapped(w) => Ok(w),
        KeyEntry::Destroyed { .. } => Err(codec::corrupt(
            "wrapped_keys",
            "a tombstone where a live key was selected",
        )),
    }
}

/// Up to `limit` live keys of `business` wrapped below `version`, after
/// `after`, skipping (and counting in `damaged`) a row that does not
/// decode, as [`keys_of_kind`] does: one damaged key must not stop the
/// rewrap of every other. (It stays, and keeps the floor from rising
/// past its version until an operator mends or removes it.)
pub(super) fn keys_wrapped_below(
    conn: &Connection,
    business: BusinessId,
    version: u32,
    after: Option<KeyId>,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<WrappedKey>, StoreError> {
    // Kinds are codes from 1: (0, anything) is below every key.
    let (kind, id) = match after {
        Some(a) if a.business > business => return Ok(Vec::new()),
        Some(a) if a.business == business => (i64::from(a.kind.code()), u64_to_sql(a.id)),
        _ => (0, i64::MIN),
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT kind, id, kek_version, blob, destroyed_at FROM wrapped_keys
             WHERE business = ?1 AND (kind, id) > (?2, ?3)
               AND blob IS NOT NULL AND kek_version < ?4
             ORDER BY kind, id",
        )
        .db()?;
    let mut rows = stmt
        .query(params![business_sql(business), kind, id, version])
        .db()?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next().db()? else { break };
        let key = live_key(row, business);
        out.extend(codec::skip_damaged(key, "wrapped_keys", None, damaged)?);
    }
    Ok(out)
}

pub(super) fn count_wrapped_under(
    conn: &Connection,
    business: BusinessId,
    version: u32,
) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM wrapped_keys
             WHERE business = ?1 AND blob IS NOT NULL AND kek_version = ?2",
        )
        .db()?
        .query_row(params![business_sql(business), version], |r| r.get(0))
        .db()?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Up to `limit` live keys of `business` of `kind` with ids above `after`,
/// skipping (and counting in `damaged`) a row that does not decode: one
/// damaged prekey must not stop a business's key upkeep. No `LIMIT`, as
/// for [`ENDED_EPOCH_KEYS`]: skipped rows do not count against it.
pub(super) fn keys_of_kind(
    conn: &Connection,
    business: BusinessId,
    kind: KeyKind,
    after: Option<u64>,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<WrappedKey>, StoreError> {
    let from = match after {
        None => 0,
        Some(u64::MAX) => return Ok(Vec::new()),
        Some(a) => a + 1,
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT kind, id, kek_version, blob, destroyed_at FROM wrapped_keys
             WHERE business = ?1 AND kind = ?2 AND id >= ?3 AND blob IS NOT NULL
             ORDER BY id",
        )
        .db()?;
    let mut rows = stmt
        .query(params![
            business_sql(business),
            kind.code(),
            u64_to_sql(from)
        ])
        .db()?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next().db()? else { break };
        out.extend(codec::skip_damaged(
            live_key(row, business),
            "wrapped_keys",
            None,
            damaged,
        )?);
    }
    Ok(out)
}

/// The epoch keys (live or tombstones) that ended at or before `?1`,
/// oldest first. No `LIMIT`: rows that do not decode are skipped, and do not
/// count against it (as for [`DUE`]), so that however many of them come
/// first, every page holds the well-formed keys after them.
pub(super) const ENDED_EPOCH_KEYS: &str = "SELECT business, id FROM wrapped_keys
     WHERE kind = 1 AND id <= ?1 ORDER BY id, business";

/// Up to `limit` ended epoch keys, skipping (and counting in `damaged`) an
/// entry whose business or id does not decode: it names no key that could
/// be destroyed, and must not stop the destruction of every other. It is
/// kept, and found again by every page (`wrapped_keys` has no rowid to log).
pub(super) fn ended_epoch_keys(
    conn: &Connection,
    now: Timestamp,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<KeyId>, StoreError> {
    let mut stmt = conn.prepare_cached(ENDED_EPOCH_KEYS).db()?;
    let mut rows = stmt.query([time_sql(now)]).db()?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next().db()? else { break };
        let c = Cols::new(row, "wrapped_keys");
        let id = c.business(0, "business").and_then(|business| {
            Ok(KeyId {
                business,
                kind: KeyKind::Epoch,
                id: c.u64(1, "id")?,
            })
        });
        out.extend(codec::skip_damaged(id, "wrapped_keys", None, damaged)?);
    }
    Ok(out)
}

pub(super) fn peer(
    conn: &Connection,
    business: BusinessId,
    peer: PeerId,
) -> Result<Option<Vec<u8>>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT sealed FROM peers WHERE business = ?1 AND phone = ?2 AND device = ?3",
        )
        .db()?;
    let mut rows = stmt
        .query(params![
            business_sql(business),
            &peer.phone.as_bytes()[..],
            peer.device
        ])
        .db()?;
    match rows.next().db()? {
        None => Ok(None),
        Some(row) => Ok(Some(Cols::new(row, "peers").blob(0, "sealed")?.to_vec())),
    }
}

/// Device ids of `phone`, ascending.
pub(super) fn peer_devices(
    conn: &Connection,
    business: BusinessId,
    phone: PhoneHash,
) -> Result<Vec<u32>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT device FROM peers WHERE business = ?1 AND phone = ?2 ORDER BY device",
        )
        .db()?;
    let mut rows = stmt
        .query(params![business_sql(business), &phone.as_bytes()[..]])
        .db()?;
    collect(&mut rows, |r| Cols::new(r, "peers").u32(0, "device"))
}

pub(super) fn has_live_message(
    conn: &Connection,
    business: BusinessId,
    phone: PhoneHash,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages
                            WHERE business = ?1 AND phone = ?2 AND expiry > ?3)",
        )
        .db()?;
    stmt.query_row(
        params![business_sql(business), &phone.as_bytes()[..], time_sql(now)],
        |r| r.get::<_, bool>(0),
    )
    .db()
}

/// A message by the id it is stored under, then by the one it is known by
/// too (see `Op::PutResentMessage`): two statements, each on an index, the
/// second asked only on a miss.
pub(super) const MESSAGE: [&str; 2] = [
    concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE business = ?1 AND id = ?2"
    ),
    concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE business = ?1 AND header_id = ?2"
    ),
];

pub(super) fn message(
    conn: &Connection,
    business: BusinessId,
    id: MessageId,
) -> Result<Option<MessageRecord>, StoreError> {
    for sql in MESSAGE {
        let mut stmt = conn.prepare_cached(sql).db()?;
        let mut rows = stmt
            .query(params![business_sql(business), &id.as_bytes()[..]])
            .db()?;
        if let Some(row) = rows.next().db()? {
            return codec::message(row).map(Some);
        }
    }
    Ok(None)
}

/// The messages due at or before `?1`, earliest first. No `LIMIT`: rows
/// that do not decode are skipped, and do not count against it.
pub(super) const DUE: &str = concat!(
    "SELECT ",
    message_columns!(),
    ", rowid FROM messages
     WHERE next_attempt IS NOT NULL AND next_attempt <= ?1
     ORDER BY next_attempt, business, id"
);

/// The messages expired at or before `?1` while open, in `(expiry,
/// business, id)` order, from the start and after `(?2, ?3, ?4)`.
/// `status IN (0, 1)` (queued, sent) is the condition of the partial index
/// `messages_open`: the sweep finds the few open messages without walking
/// every expired one, and pages by seeking past the last one. No `LIMIT`,
/// as for [`DUE`].
pub(super) const EXPIRED_OPEN: (&str, &str) = (
    concat!(
        "SELECT ",
        message_columns!(),
        ", rowid FROM messages
         WHERE expiry <= ?1 AND status IN (0, 1)
         ORDER BY expiry, business, id"
    ),
    concat!(
        "SELECT ",
        message_columns!(),
        ", rowid FROM messages
         WHERE expiry <= ?1 AND status IN (0, 1) AND (expiry, business, id) > (?2, ?3, ?4)
         ORDER BY expiry, business, id"
    ),
);

pub(super) fn due_messages(
    conn: &Connection,
    now: Timestamp,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<MessageRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(DUE).db()?;
    let mut rows = stmt.query(params![time_sql(now)]).db()?;
    messages(&mut rows, limit, damaged)
}

pub(super) fn expired_open_messages(
    conn: &Connection,
    now: Timestamp,
    after: Option<(Timestamp, BusinessId, MessageId)>,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<MessageRecord>, StoreError> {
    let (first, next) = EXPIRED_OPEN;
    let now = time_sql(now);
    let mut stmt = conn
        .prepare_cached(if after.is_some() { next } else { first })
        .db()?;
    let mut rows = match after {
        None => stmt.query(params![now]),
        Some((t, b, id)) => stmt.query(params![
            now,
            time_sql(t),
            business_sql(b),
            &id.as_bytes()[..]
        ]),
    }
    .db()?;
    messages(&mut rows, limit, damaged)
}

/// Up to `limit` message rows selected with [`message_columns!`] and `rowid`,
/// skipping those that do not decode.
fn messages(
    rows: &mut rusqlite::Rows<'_>,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<MessageRecord>, StoreError> {
    let decoded = codec::decodable(rows, limit, "messages", damaged, codec::message)?;
    Ok(decoded.into_iter().map(|(_, m)| m).collect())
}

/// The businesses with messages, skipping (and counting in `damaged`) a
/// `business` that does not decode: such a row belongs to no business, and
/// must not stop the listing of the others. Paging seeks past the stored
/// value itself, whatever its type (SQLite orders every value), so a
/// damaged one is passed over once.
pub(super) fn message_businesses(
    conn: &mut Connection,
    damaged: &AtomicU64,
) -> Result<Vec<BusinessId>, StoreError> {
    // One index seek per business, however many messages each has, all in
    // one read transaction: the list is of one state.
    let tx = conn.transaction().db()?;
    let mut out = Vec::new();
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT business FROM messages WHERE business > ?1 ORDER BY business LIMIT 1",
            )
            .db()?;
        let mut after = Value::Integer(i64::MIN);
        loop {
            let mut rows = stmt.query([&after]).db()?;
            let Some(row) = rows.next().db()? else {
                break;
            };
            let business = Cols::new(row, "messages").business(0, "business");
            out.extend(codec::skip_damaged(business, "messages", None, damaged)?);
            after = row.get(0).db()?;
        }
    }
    tx.finish().db()?;
    Ok(out)
}

pub(super) fn message_epochs(
    conn: &Connection,
    business: BusinessId,
    phone: Option<PhoneHash>,
) -> Result<Vec<Epoch>, StoreError> {
    let decode = |r: &Row<'_>| {
        Cols::new(r, "messages")
            .time(0, "epoch")
            .map(Epoch::ending_at)
    };
    match phone {
        None => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT DISTINCT epoch FROM messages WHERE business = ?1 ORDER BY epoch",
                )
                .db()?;
            let mut rows = stmt.query([business_sql(business)]).db()?;
            collect(&mut rows, decode)
        }
        Some(p) => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT DISTINCT epoch FROM messages
                     WHERE business = ?1 AND phone = ?2 ORDER BY epoch",
                )
                .db()?;
            let mut rows = stmt
                .query(params![business_sql(business), &p.as_bytes()[..]])
                .db()?;
            collect(&mut rows, decode)
        }
    }
}

/// The epochs the peer records of `business` (only `phone`'s, if given)
/// are sealed under, read from each record's envelope header.
pub(super) fn peer_epochs(
    conn: &Connection,
    business: BusinessId,
    phone: Option<PhoneHash>,
) -> Result<Vec<Epoch>, StoreError> {
    let mut stmt;
    let mut rows = match phone {
        None => {
            stmt = conn
                .prepare_cached("SELECT sealed FROM peers WHERE business = ?1")
                .db()?;
            stmt.query([business_sql(business)]).db()?
        }
        Some(p) => {
            stmt = conn
                .prepare_cached("SELECT sealed FROM peers WHERE business = ?1 AND phone = ?2")
                .db()?;
            stmt.query(params![business_sql(business), &p.as_bytes()[..]])
                .db()?
        }
    };
    let mut epochs = std::collections::BTreeSet::new();
    while let Some(row) = rows.next().db()? {
        epochs.insert(crate::store::peer_epoch(
            Cols::new(row, "peers").blob(0, "sealed")?,
        )?);
    }
    Ok(epochs.into_iter().collect())
}

/// The peer records after `(?1, ?2, ?3)` in key order whose consumer has
/// no message expiring after `?4`, with the type of `sealed` (see
/// [`codec::orphan_peer`]). No `LIMIT`, as for [`DUE`].
pub(super) const ORPHAN_PEERS: &str = "SELECT business, phone, device, typeof(sealed), rowid
     FROM peers AS p
     WHERE (business, phone, device) > (?1, ?2, ?3)
       AND NOT EXISTS (SELECT 1 FROM messages AS m
                       WHERE m.business = p.business AND m.phone = p.phone
                         AND m.expiry > ?4)
     ORDER BY business, phone, device";

pub(super) fn orphan_peers(
    conn: &Connection,
    now: Timestamp,
    after: Option<(BusinessId, PeerId)>,
    limit: usize,
    damaged: &AtomicU64,
) -> Result<Vec<(BusinessId, PeerId)>, StoreError> {
    // Business ids start at 1, so (business 0, …) is below every peer.
    let (business, phone, device) = match after {
        Some((b, p)) => (
            business_sql(b),
            p.phone.as_bytes().to_vec(),
            i64::from(p.device),
        ),
        None => (codec::u64_to_sql(0), Vec::new(), -1),
    };
    let mut stmt = conn.prepare_cached(ORPHAN_PEERS).db()?;
    let mut rows = stmt
        .query(params![business, phone, device, time_sql(now)])
        .db()?;
    let decoded = codec::decodable(&mut rows, limit, "peers", damaged, codec::orphan_peer)?;
    Ok(decoded.into_iter().map(|(_, p)| p).collect())
}

pub(super) fn holds(conn: &Connection) -> Result<Vec<Hold>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT kind, business, phone, reference, placed FROM holds
             ORDER BY kind, business, phone, reference",
        )
        .db()?;
    let mut rows = stmt.query([]).db()?;
    collect(&mut rows, |r| {
        let c = Cols::new(r, "holds");
        let business = c.business(1, "business")?;
        let scope = match c.int(0, "kind")? {
            1 if c.blob(2, "phone")?.is_empty() => HoldScope::Business(business),
            2 => HoldScope::Consumer(business, c.phone(2, "phone")?),
            _ => return Err(codec::corrupt("holds", "not a valid hold scope")),
        };
        Ok(Hold {
            scope,
            reference: c.text(3, "reference")?,
            placed: c.time(4, "placed")?,
        })
    })
}

/// The hold on `scope` for the case `reference`, read alone: another
/// hold's damage does not fail it.
pub(super) fn hold(
    conn: &Connection,
    scope: HoldScope,
    reference: &str,
) -> Result<Option<Hold>, StoreError> {
    let (kind, business, phone) = super::writes::scope_sql(&scope);
    let mut stmt = conn
        .prepare_cached(
            "SELECT placed FROM holds
             WHERE kind = ?1 AND business = ?2 AND phone = ?3 AND reference = ?4",
        )
        .db()?;
    let mut rows = stmt.query(params![kind, business, phone, reference]).db()?;
    let Some(row) = rows.next().db()? else {
        return Ok(None);
    };
    Ok(Some(Hold {
        scope,
        reference: reference.to_owned(),
        placed: Cols::new(row, "holds").time(0, "placed")?,
    }))
}

/// What the stored holds cover, for the sweep: only their kind, business
/// and phone are read. A hold whose business decodes but whose kind or
/// phone does not is taken as a hold of the whole business (keeping data
/// is the safe side); one whose business does not decode fails the read.
pub(super) fn held_scopes(conn: &Connection) -> Result<Vec<HoldScope>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT kind, business, phone FROM holds")
        .db()?;
    let mut rows = stmt.query([]).db()?;
    collect(&mut rows, |r| {
        let c = Cols::new(r, "holds");
        let business = c.business(1, "business")?;
        Ok(match (c.int(0, "kind"), c.phone(2, "phone")) {
            (Ok(2), Ok(phone)) => HoldScope::Consumer(business, phone),
            (Ok(1), _) => HoldScope::Business(business),
            _ => {
                tracing::warn!(
                    %business,
                    "a stored hold's kind or phone does not decode: the sweep keeps the whole business"
                );
                HoldScope::Business(business)
            }
        })
    })
}

pub(super) fn billing(
    conn: &mut Connection,
    business: BusinessId,
) -> Result<StoredBilling, StoreError> {
    // One read transaction: counts and takes of one state.
    let tx = conn.transaction().db()?;
    let takes = {
        let mut stmt = tx
            .prepare_cached("SELECT id, at FROM billing_takes WHERE business = ?1 ORDER BY rowid")
            .db()?;
        let mut rows = stmt.query([business_sql(business)]).db()?;
        collect(&mut rows, |r| {
            let c = Cols::new(r, "billing_takes");
            Ok(BillingTake {
                id: TakeId::new(c.u64(0, "id")?)
                    .ok_or_else(|| codec::corrupt("billing_takes.id", "take id 0"))?,
                at: c.time(1, "at")?,
            })
        })?
    };
    let counts = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT take_id, period_start, period_end, category, count FROM billing
                 WHERE business = ?1 ORDER BY take_id, period_start, period_end, category",
            )
            .db()?;
        let mut rows = stmt.query([business_sql(business)]).db()?;
        collect(&mut rows, |r| {
            let c = Cols::new(r, "billing");
            let take = TakeId::new(c.u64(0, "take_id")?);
            if take.is_some_and(|id| !takes.iter().any(|t| t.id == id)) {
                return Err(codec::corrupt("billing.take_id", "a take not stored"));
            }
            let category = u8::try_from(c.int(3, "category")?)
                .ok()
                .and_then(Category::from_code)
                .ok_or_else(|| codec::corrupt("billing.category", "not a category code"))?;
            let count = c.u64(4, "count")?;
            if count == 0 {
                return Err(codec::corrupt("billing.count", "a count of 0"));
            }
            Ok(BillingCount {
                take,
                start: c.time(1, "period_start")?,
                end: c.time(2, "period_end")?,
                category,
                count,
            })
        })?
    };
    tx.finish().db()?;
    Ok(StoredBilling { counts, takes })
}

pub(super) fn billing_businesses(
    conn: &Connection,
    damaged: &AtomicU64,
) -> Result<Vec<BusinessId>, StoreError> {
    // One statement: the list is of one state.
    let mut stmt = conn
        .prepare_cached(
            "SELECT business FROM billing UNION SELECT business FROM billing_takes ORDER BY 1",
        )
        .db()?;
    let mut rows = stmt.query([]).db()?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().db()? {
        let business = Cols::new(row, "billing").business(0, "business");
        out.extend(codec::skip_damaged(business, "billing", None, damaged)?);
    }
    Ok(out)
}

pub(super) fn census(conn: &mut Connection) -> Result<Census, StoreError> {
    // One read transaction: the four counts describe one state.
    let tx = conn.transaction().db()?;
    let count = |sql: &str| -> Result<u64, StoreError> {
        let n: i64 = tx
            .prepare_cached(sql)
            .db()?
            .query_row([], |r| r.get(0))
            .db()?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let census = Census {
        messages: count("SELECT count(*) FROM messages")?,
        peers: count("SELECT count(*) FROM peers")?,
        phones: count(
            "SELECT count(*) FROM (SELECT business, phone FROM messages
                                   UNION SELECT business, phone FROM peers)",
        )?,
        epoch_keys: count("SELECT count(*) FROM wrapped_keys WHERE kind = 1 AND blob IS NOT NULL")?,
    };
    tx.finish().db()?;
    Ok(census)
}
