//! The write operations, each run by the writer thread inside a transaction
//! (see [`writer`](super::writer)); none commits on its own.

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::types::Null;
use rusqlite::{Connection, OptionalExtension, params};

use super::codec::{
    self, Db, business_sql, key_id_sql, limit_sql, store_error, time_sql, u64_to_sql,
};
use super::reads;
use std::time::Duration;

use crate::ids::{BusinessId, MessageId};
use crate::keys::{KekRing, KeyEntry, KeyId, WrappedKey};
use crate::store::{
    Batch, Direction, ExpiredMessage, FailureReason, HoldScope, MessageRecord, Op, Status,
    StoreError, WriterId,
};
use crate::time::Timestamp;

/// A hold scope as stored: kind (1 business, 2 consumer), business, phone
/// (empty for a whole business).
pub(super) fn scope_sql(scope: &HoldScope) -> (i64, i64, &[u8]) {
    match scope {
        HoldScope::Business(b) => (1, business_sql(*b), &[]),
        HoldScope::Consumer(b, p) => (2, business_sql(*b), p.as_bytes()),
    }
}

/// The name of the store's writer in `store_meta` (see
/// `Storage::take_over`), its id in hex.
const META_WRITER: &str = "writer";

/// Apply every operation of `batch`, in order. Its fence is the writer
/// thread's to check (see `Writer::write_fenced`).
pub(super) fn apply_batch(conn: &Connection, batch: &Batch) -> Result<(), StoreError> {
    batch.ops().iter().try_for_each(|op| apply(conn, op))
}

/// The store's writer, if one took it over.
pub(super) fn writer(conn: &Connection) -> Result<Option<WriterId>, StoreError> {
    let stored: Option<String> = conn
        .prepare_cached("SELECT value FROM store_meta WHERE name = ?1")
        .db()?
        .query_row([META_WRITER], |row| row.get(0))
        .optional()
        .db()?;
    stored
        .map(|hex| {
            let mut id = [0u8; 16];
            hex::decode_to_slice(hex, &mut id)
                .map_err(|_| codec::corrupt("store_meta", "the writer is not 16 bytes in hex"))?;
            Ok(WriterId::from_bytes(id))
        })
        .transpose()
}

/// Make `writer` the store's writer.
pub(super) fn take_over(conn: &Connection, writer: WriterId) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO store_meta (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .db()?
    .execute([META_WRITER, hex::encode(writer.as_bytes()).as_str()])
    .db()?;
    Ok(())
}

fn apply(conn: &Connection, op: &Op) -> Result<(), StoreError> {
    let done = match op {
        Op::PutPeer {
            business,
            peer,
            sealed,
        } => conn
            .prepare_cached(
                "INSERT INTO peers (business, phone, device, sealed) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (business, phone, device) DO UPDATE SET sealed = excluded.sealed",
            )
            .db()?
            .execute(params![
                business_sql(*business),
                &peer.phone.as_bytes()[..],
                peer.device,
                sealed
            ]),
        Op::DeletePeer { business, peer } => conn
            .prepare_cached("DELETE FROM peers WHERE business = ?1 AND phone = ?2 AND device = ?3")
            .db()?
            .execute(params![
                business_sql(*business),
                &peer.phone.as_bytes()[..],
                peer.device
            ]),
        Op::DeleteIdlePeer {
            business,
            peer,
            now,
        } => conn
            .prepare_cached(
                "DELETE FROM peers WHERE business = ?1 AND phone = ?2 AND device = ?3
                   AND NOT EXISTS (SELECT 1 FROM messages AS m
                       WHERE m.business = ?1 AND m.phone = ?2 AND m.expiry > ?4)
                   AND NOT EXISTS (SELECT 1 FROM holds AS h WHERE h.business = ?1
                       AND (h.kind IS NOT 2 OR h.phone = ?2
                            OR typeof(h.phone) IS NOT 'blob' OR length(h.phone) IS NOT 16))",
            )
            .db()?
            .execute(params![
                business_sql(*business),
                &peer.phone.as_bytes()[..],
                peer.device,
                time_sql(*now)
            ]),
        Op::ConsumeKey(id) => {
            let (business, kind, key) = key_id_sql(id);
            let n = conn
                .prepare_cached(
                    "DELETE FROM wrapped_keys
                     WHERE business = ?1 AND kind = ?2 AND id = ?3 AND blob IS NOT NULL",
                )
                .db()?
                .execute(params![business, kind, key])
                .db()?;
            // Fails the batch: the key was consumed (or never existed).
            return if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Conflict)
            };
        }
        Op::PutMessage(m) => return insert_message(conn, m, None),
        Op::PutResentMessage { record, header } => {
            return insert_message(conn, record, Some(*header));
        }
        Op::UpdateDelivery {
            business,
            id,
            expected,
            delivery,
        } => {
            let n = conn
                .prepare_cached(
                    "UPDATE messages SET status = ?3, failure = ?4, attempts = ?5,
                         next_attempt = ?6, pending_devices = ?7, accepted_by = ?13,
                         overdue_at = ?15, told = ?17
                     WHERE business = ?1 AND id = ?2 AND status = ?8 AND failure IS ?9
                         AND attempts = ?10 AND next_attempt IS ?11 AND pending_devices = ?12
                         AND accepted_by = ?14 AND overdue_at IS ?16 AND told IS ?18",
                )
                .db()?
                .execute(params![
                    business_sql(*business),
                    &id.as_bytes()[..],
                    delivery.status.code(),
                    delivery.failure.map(|f| f.code()),
                    delivery.attempts,
                    delivery.next_attempt.map(time_sql),
                    u64_to_sql(delivery.pending_devices),
                    expected.status.code(),
                    expected.failure.map(|f| f.code()),
                    expected.attempts,
                    expected.next_attempt.map(time_sql),
                    u64_to_sql(expected.pending_devices),
                    u64_to_sql(delivery.accepted_by),
                    u64_to_sql(expected.accepted_by),
                    delivery.overdue_at.map(time_sql),
                    expected.overdue_at.map(time_sql),
                    delivery.told.map(Status::code),
                    expected.told.map(Status::code),
                ])
                .db()?;
            // Fails the batch: the status moved on, or the message is gone.
            return if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Conflict)
            };
        }
        Op::FailExpired { business, id } => conn
            .prepare_cached(
                "UPDATE messages SET status = ?3, failure = ?4, next_attempt = NULL,
                     pending_devices = ?5, overdue_at = NULL
                 WHERE business = ?1 AND id = ?2 AND status IN (0, 1)",
            )
            .db()?
            .execute(params![
                business_sql(*business),
                &id.as_bytes()[..],
                Status::Failed.code(),
                FailureReason::Expired.code(),
                u64_to_sql(0),
            ]),
        Op::DeleteMessage { business, id } => conn
            .prepare_cached("DELETE FROM messages WHERE business = ?1 AND id = ?2")
            .db()?
            .execute(params![business_sql(*business), &id.as_bytes()[..]]),
        Op::PutHold(hold) => {
            let (kind, business, phone) = scope_sql(&hold.scope);
            conn.prepare_cached(
                "INSERT INTO holds (kind, business, phone, reference, placed)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .db()?
            .execute(params![
                kind,
                business,
                phone,
                hold.reference,
                time_sql(hold.placed)
            ])
        }
        Op::DeleteHold { scope, reference } => {
            let (kind, business, phone) = scope_sql(scope);
            conn.prepare_cached(
                "DELETE FROM holds
                 WHERE kind = ?1 AND business = ?2 AND phone = ?3 AND reference = ?4",
            )
            .db()?
            .execute(params![kind, business, phone, reference])
        }
        Op::Bill {
            business,
            start,
            end,
            category,
        } => {
            let counted = conn
                .prepare_cached(
                    "INSERT INTO billing (business, take_id, period_start, period_end, category, count)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (business, take_id, period_start, period_end, category)
                     DO UPDATE SET count = count + (count < ?7)
                     WHERE typeof(count) = 'integer'",
                )
                .db()?
                .execute(params![
                    business_sql(*business),
                    u64_to_sql(0),
                    time_sql(*start),
                    time_sql(*end),
                    category.code(),
                    u64_to_sql(1),
                    i64::MAX,
                ])
                .db()?;
            // Nothing updated: the stored count is not an integer, and what
            // it counted is lost already. Refusing the batch would stall
            // every send and report of the business in that category for
            // the rest of the period, and restore nothing: the message goes
            // unbilled, logged, and the count is for an operator to restore
            // (the billing read refuses it until then).
            if counted == 0 {
                tracing::warn!(
                    %business,
                    ?category,
                    "a stored billing count is damaged: a message is left out of it"
                );
            }
            Ok(counted)
        }
        Op::TakeBilling {
            business,
            id,
            closed_by,
            at,
        } => {
            let (business, id) = (business_sql(*business), u64_to_sql(id.get()));
            let taken = conn
                .prepare_cached("SELECT 1 FROM billing_takes WHERE business = ?1 AND id = ?2")
                .db()?
                .exists(params![business, id])
                .db()?;
            if taken {
                return Ok(());
            }
            let moved = conn
                .prepare_cached(
                    "UPDATE billing SET take_id = ?2
                     WHERE business = ?1 AND take_id = ?3 AND period_end <= ?4",
                )
                .db()?
                .execute(params![business, id, u64_to_sql(0), time_sql(*closed_by)])
                .db()?;
            if moved == 0 {
                return Ok(());
            }
            conn.prepare_cached("INSERT INTO billing_takes (business, id, at) VALUES (?1, ?2, ?3)")
                .db()?
                .execute(params![business, id, time_sql(*at)])
        }
        Op::SettleBilling { business, id } => {
            let (business, id) = (business_sql(*business), u64_to_sql(id.get()));
            conn.prepare_cached("DELETE FROM billing WHERE business = ?1 AND take_id = ?2")
                .db()?
                .execute(params![business, id])
                .db()?;
            conn.prepare_cached("DELETE FROM billing_takes WHERE business = ?1 AND id = ?2")
                .db()?
                .execute(params![business, id])
        }
    };
    done.map(drop).map_err(store_error)
}

/// Whether a message is known by an id (see [`Op::PutResentMessage`]):
/// by `?2`, a plain message's id; by `?2` or `?3`, or stored under `?3`,
/// a message sent again and the id its header gives. Asked apart from the
/// insert, on the small index of ids known by a header (an `INSERT …
/// SELECT` reading the table it writes copies its row through a temporary
/// table first).
pub(super) const KNOWN: (&str, &str) = (
    "SELECT EXISTS (SELECT 1 FROM messages WHERE business = ?1 AND header_id = ?2)",
    "SELECT EXISTS (SELECT 1 FROM messages WHERE business = ?1 AND header_id IN (?2, ?3))
         OR EXISTS (SELECT 1 FROM messages WHERE business = ?1 AND id = ?3)",
);

/// Store message `m`, known by `header` too if given (see
/// [`Op::PutResentMessage`]). Fails the batch if a message is stored under,
/// or known by, either id.
fn insert_message(
    conn: &Connection,
    m: &MessageRecord,
    header: Option<MessageId>,
) -> Result<(), StoreError> {
    let (business, id) = (business_sql(m.business), &m.id.as_bytes()[..]);
    let header = header.as_ref().map(|h| &h.as_bytes()[..]);
    let known = match header {
        None => conn
            .prepare_cached(KNOWN.0)
            .db()?
            .query_row(params![business, id], |r| r.get::<_, bool>(0)),
        Some(header) => conn
            .prepare_cached(KNOWN.1)
            .db()?
            .query_row(params![business, id, header], |r| r.get::<_, bool>(0)),
    }
    .db()?;
    if known {
        return Err(StoreError::Conflict);
    }
    let n = conn
        .prepare_cached(
            "INSERT INTO messages (business, id, direction, phone, created, expiry,
                 epoch, status, failure, attempts, next_attempt, pending_devices, sealed,
                 accepted_by, header_id, overdue_at, told)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             ON CONFLICT DO NOTHING",
        )
        .db()?
        .execute(params![
            business,
            id,
            m.direction.code(),
            &m.phone.as_bytes()[..],
            time_sql(m.created),
            time_sql(m.expiry),
            time_sql(m.epoch.end()),
            m.delivery.status.code(),
            m.delivery.failure.map(|f| f.code()),
            m.delivery.attempts,
            m.delivery.next_attempt.map(time_sql),
            u64_to_sql(m.delivery.pending_devices),
            m.sealed,
            u64_to_sql(m.delivery.accepted_by),
            header,
            m.delivery.overdue_at.map(time_sql),
            m.delivery.told.map(Status::code),
        ])
        .db()?;
    // Fails the batch: a message with this id (or known by `header`) is
    // stored already.
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict)
    }
}

/// The id that ends a page of `cap_expiry`: the `?3 + 1`-th of business
/// `?1` after `?2`. Only a well-formed id ends a page (the next resumes
/// after it); a damaged one is inside a page, never the end of one, so it
/// cannot stop the paging.
pub(super) const CAP_PAGE_END: &str = "SELECT id FROM messages
     WHERE business = ?1 AND id > ?2 AND typeof(id) = 'blob' AND length(id) = 16
     ORDER BY id LIMIT 1 OFFSET ?3";

/// Cap the expiry of up to `limit` messages of `business` (in id order
/// after `after`) at their creation plus `period`, for those in `direction`
/// whose expiry is later. Returns the last id looked at, if there may be
/// more.
pub(super) fn cap_expiry(
    conn: &Connection,
    business: BusinessId,
    direction: Direction,
    period: Duration,
    after: Option<MessageId>,
    limit: usize,
) -> Result<Option<MessageId>, StoreError> {
    let business = business_sql(business);
    // From the start: the empty blob, which sorts before every id, the
    // all-zero one included.
    let after = after.map(|id| *id.as_bytes());
    let after: &[u8] = after.as_ref().map_or(&[], |id| &id[..]);
    // The page: `limit` ids of the business after `after`, by the
    // `(business, id)` unique index.
    let last: Option<Vec<u8>> = {
        let mut stmt = conn.prepare_cached(CAP_PAGE_END).db()?;
        let mut rows = stmt
            .query(params![business, after, limit_sql(limit.max(1) - 1)])
            .db()?;
        match rows.next().db()? {
            Some(row) => Some(row.get(0).db()?),
            None => None,
        }
    };
    // Stored times are biased (`t - 2^63`, see `codec`), so adding the
    // period to the stored value adds it to the time. The period is bound
    // as two integers (`low + high`, `high` 0 below 2^63 ms), which SQLite
    // adds in that order without overflow in the rows updated: those whose
    // creation plus the period does not pass the largest time (`created <=
    // bound`). The rest are left alone: their cap saturates there, which no
    // expiry exceeds, as it does for every row under a period of `u64::MAX`
    // ms or more. So is a row whose times are not integers (damaged):
    // rewritten, it would decode, and be swept.
    let millis = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    if millis < u64::MAX {
        let (low, high) = match i64::try_from(millis) {
            Ok(low) => (low, 0),
            // At most `u64::MAX - 1 - i64::MAX`, which is `i64::MAX`.
            Err(_) => ((millis - i64::MAX.unsigned_abs()).cast_signed(), i64::MAX),
        };
        let bound = i64::MAX - low - high;
        let upto: &[u8] = last.as_deref().unwrap_or(&[0xff; MessageId::LEN]);
        conn.prepare_cached(
            "UPDATE messages SET expiry = created + ?3 + ?7
             WHERE business = ?1 AND id > ?5 AND id <= ?6 AND direction = ?2
               AND created <= ?4 AND expiry > created + ?3 + ?7
               AND typeof(expiry) = 'integer' AND typeof(created) = 'integer'",
        )
        .db()?
        .execute(params![
            business,
            direction.code(),
            low,
            bound,
            after,
            upto,
            high
        ])
        .db()?;
    }
    last.map(|id| {
        <[u8; MessageId::LEN]>::try_from(id.as_slice())
            .map(MessageId::from_bytes)
            .map_err(|_| codec::corrupt("messages", "a message id is not 16 bytes"))
    })
    .transpose()
}

/// Store `ring` if the stored revision is `expected`. The outer error fails
/// the transaction; the inner one is the caller's answer (a lost race).
pub(super) fn put_ring(
    conn: &Connection,
    ring: &KekRing,
    expected: Option<u64>,
) -> Result<Result<(), StoreError>, StoreError> {
    let business = business_sql(ring.business());
    let stored: Option<i64> = {
        let mut stmt = conn
            .prepare_cached("SELECT revision FROM kek_rings WHERE business = ?1")
            .db()?;
        let mut rows = stmt.query([business]).db()?;
        match rows.next().db()? {
            Some(row) => Some(codec::Cols::new(row, "kek_rings").int(0, "revision")?),
            None => None,
        }
    };
    if stored.map(codec::u64_from_sql) != expected {
        return Ok(Err(StoreError::Conflict));
    }
    let json = serde_json::to_vec(ring)
        .map_err(|e| StoreError::Backend(format!("cannot encode a KEK ring: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO kek_rings (business, revision, ring) VALUES (?1, ?2, ?3)
         ON CONFLICT (business) DO UPDATE SET
             revision = excluded.revision, ring = excluded.ring",
    )
    .db()?
    .execute(params![business, u64_to_sql(ring.revision()), json])
    .db()?;
    Ok(Ok(()))
}

/// Store `key` unless its id is taken; return what is stored afterwards.
pub(super) fn insert_key(conn: &Connection, key: &WrappedKey) -> Result<KeyEntry, StoreError> {
    let (business, kind, id) = key_id_sql(&key.id);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO wrapped_keys (business, kind, id, kek_version, blob, destroyed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL) ON CONFLICT DO NOTHING",
        )
        .db()?
        .execute(params![business, kind, id, key.kek_version, key.blob])
        .db()?;
    if inserted == 1 {
        return Ok(KeyEntry::Wrapped(key.clone()));
    }
    reads::key(conn, &key.id)?.ok_or_else(|| {
        StoreError::Backend("a key insert conflicted with an entry that is not there".into())
    })
}

/// Replace a live key's wrapping if it is wrapped under `expected_version`.
pub(super) fn rewrap_key(
    conn: &Connection,
    key: &WrappedKey,
    expected_version: u32,
) -> Result<bool, StoreError> {
    let (business, kind, id) = key_id_sql(&key.id);
    let changed = conn
        .prepare_cached(
            "UPDATE wrapped_keys SET kek_version = ?4, blob = ?5
             WHERE business = ?1 AND kind = ?2 AND id = ?3
               AND blob IS NOT NULL AND kek_version = ?6",
        )
        .db()?
        .execute(params![
            business,
            kind,
            id,
            key.kek_version,
            key.blob,
            expected_version
        ])
        .db()?;
    Ok(changed == 1)
}

/// Replace whatever is under `id` with a tombstone dated `at`; whether a
/// live key (wrapped bytes) was there. Nothing is decoded: a row that no
/// longer decodes loses its bytes all the same.
pub(super) fn destroy_key(
    conn: &Connection,
    id: &KeyId,
    at: Timestamp,
) -> Result<bool, StoreError> {
    let (business, kind, key) = key_id_sql(id);
    let was_live = conn
        .prepare_cached(
            "SELECT blob IS NOT NULL FROM wrapped_keys
             WHERE business = ?1 AND kind = ?2 AND id = ?3",
        )
        .db()?
        .query_row(params![business, kind, key], |row| row.get::<_, bool>(0))
        .optional()
        .db()?
        .unwrap_or(false);
    conn.prepare_cached(
        "INSERT INTO wrapped_keys (business, kind, id, kek_version, blob, destroyed_at)
         VALUES (?1, ?2, ?3, NULL, NULL, ?4)
         ON CONFLICT (business, kind, id) DO UPDATE SET
             kek_version = NULL, blob = NULL, destroyed_at = excluded.destroyed_at",
    )
    .db()?
    .execute(params![business, kind, key, time_sql(at)])
    .db()?;
    Ok(was_live)
}

/// Remove the entry under `id`; whether there was one.
pub(super) fn delete_key(conn: &Connection, id: &KeyId) -> Result<bool, StoreError> {
    let (business, kind, key) = key_id_sql(id);
    let n = conn
        .prepare_cached("DELETE FROM wrapped_keys WHERE business = ?1 AND kind = ?2 AND id = ?3")
        .db()?
        .execute(params![business, kind, key])
        .db()?;
    Ok(n == 1)
}

/// Delete `key` if it is stored exactly as given.
pub(super) fn delete_key_as_read(conn: &Connection, key: &WrappedKey) -> Result<bool, StoreError> {
    let (business, kind, id) = key_id_sql(&key.id);
    let n = conn
        .prepare_cached(
            "DELETE FROM wrapped_keys WHERE business = ?1 AND kind = ?2 AND id = ?3
               AND kek_version = ?4 AND blob = ?5 AND destroyed_at IS NULL",
        )
        .db()?
        .execute(params![business, kind, id, key.kek_version, key.blob])
        .db()?;
    Ok(n == 1)
}

/// The holds of one `delete_expired` call, in a table private to the writer
/// connection (SQLite's temporary schema: never in the database file).
pub(super) const CREATE_HELD: &str = "CREATE TEMP TABLE IF NOT EXISTS held (
    business INTEGER NOT NULL,
    phone    BLOB NOT NULL,
    PRIMARY KEY (business, phone)
) WITHOUT ROWID";

/// What `delete_expired` may delete: expired at or before `?1`, settled
/// (not queued or sent), and with no attempt pending unless it expired at or
/// before `?4` (a report given up).
macro_rules! settled {
    () => {
        "expiry <= ?1 AND status NOT IN (0, 1) AND (next_attempt IS NULL OR expiry <= ?4)"
    };
}

/// ... and covered by no hold in `temp.held` (a business-wide hold has an
/// empty phone).
macro_rules! not_held {
    () => {
        " AND NOT EXISTS (SELECT 1 FROM temp.held AS h
             WHERE h.business = messages.business AND h.phone IN (X'', messages.phone))"
    };
}

macro_rules! select_doomed {
    ($filter:expr) => {
        concat!(
            "SELECT ",
            codec::swept_columns!(),
            ", rowid FROM messages WHERE ",
            $filter,
            " ORDER BY expiry, business, id"
        )
    };
}

/// With `?1` the last selected row's expiry (not `now`): exactly the rows
/// selected, by a range scan of the expiry index that ends where they end,
/// as a plain `DELETE` would.
macro_rules! delete_doomed {
    ($filter:expr) => {
        concat!(
            "DELETE FROM messages WHERE ",
            $filter,
            " AND (expiry, business, id) <= (?1, ?2, ?3)"
        )
    };
}

/// (select, delete) without and with the hold filter.
pub(super) const SWEEP: (&str, &str) = (select_doomed!(settled!()), delete_doomed!(settled!()));
pub(super) const SWEEP_HELD: (&str, &str) = (
    select_doomed!(concat!(settled!(), not_held!())),
    delete_doomed!(concat!(settled!(), not_held!())),
);

/// Delete and return up to `limit` expired, settled messages that no hold
/// covers, earliest first. Two statements in the writer's transaction: read
/// the first `limit` candidates in index order, then delete the index range
/// they span. (Cheaper than `DELETE … RETURNING`, which buffers every row,
/// and than deleting by a list of row ids.) A candidate that does not decode
/// (any column that [`codec::message`] would refuse) is skipped and kept
/// (see [`codec::decodable`]): the filters compare its stored columns, and
/// a damaged status, phone or business could slip past the check that it is
/// settled or past a hold. The selected rows are then deleted one by one
/// instead, so that the range does not take the damaged row with it.
///
/// The holds are those passed and those stored, read in this transaction:
/// a hold placed by another process since the caller read the holds is
/// honoured too. Returns, besides, how many candidates were skipped: the
/// caller counts them once the transaction's answer is in (a group commit
/// may run this again).
///
/// The holds' consumers (phone hashes) are in `temp.held` for the call
/// alone: emptied before it returns, and, should the transaction fail,
/// rolled back with it. (They stayed until a later call with holds: a
/// released consumer hold's hash, in the writer's memory.)
pub(super) fn delete_expired(
    conn: &Connection,
    now: Timestamp,
    abandon_before: Timestamp,
    holds: &[HoldScope],
    limit: usize,
) -> Result<(Vec<ExpiredMessage>, u64), StoreError> {
    if limit == 0 {
        return Ok((Vec::new(), 0));
    }
    let stored = reads::held_scopes(conn)?;
    let scopes: Vec<&HoldScope> = holds.iter().chain(&stored).collect();
    let deleted = delete_unheld(conn, now, abandon_before, &scopes, limit);
    if !scopes.is_empty() {
        conn.prepare_cached("DELETE FROM temp.held")
            .db()?
            .execute([])
            .db()?;
    }
    deleted
}

/// [`delete_expired`] under the holds `scopes`.
fn delete_unheld(
    conn: &Connection,
    now: Timestamp,
    abandon_before: Timestamp,
    scopes: &[&HoldScope],
    limit: usize,
) -> Result<(Vec<ExpiredMessage>, u64), StoreError> {
    if !scopes.is_empty() {
        let mut put = conn
            .prepare_cached("INSERT OR IGNORE INTO temp.held VALUES (?1, ?2)")
            .db()?;
        for scope in scopes {
            let (_, business, phone) = scope_sql(scope);
            put.execute(params![business, phone]).db()?;
        }
    }
    let (select, delete) = if scopes.is_empty() { SWEEP } else { SWEEP_HELD };
    let now = time_sql(now);
    let abandon = time_sql(abandon_before);
    let skipped = AtomicU64::new(0);
    let doomed = {
        let mut stmt = conn.prepare_cached(select).db()?;
        // `?2` and `?3` are the delete's; the select leaves them unused.
        let mut rows = stmt.query(params![now, Null, Null, abandon]).db()?;
        codec::decodable(&mut rows, limit, "messages", &skipped, codec::expired)?
    };
    let Some((_, last)) = doomed.last() else {
        return Ok((Vec::new(), skipped.into_inner()));
    };
    let deleted = if skipped.load(Ordering::Relaxed) == 0 {
        conn.prepare_cached(delete)
            .db()?
            .execute(params![
                time_sql(last.expiry),
                business_sql(last.business),
                &last.id.as_bytes()[..],
                abandon
            ])
            .db()?
    } else {
        let mut one = conn
            .prepare_cached("DELETE FROM messages WHERE rowid = ?1")
            .db()?;
        let mut deleted = 0;
        for (rowid, _) in &doomed {
            deleted += one.execute([rowid]).db()?;
        }
        deleted
    };
    if deleted != doomed.len() {
        // Impossible inside one transaction; refuse rather than report
        // deletions that did not happen.
        return Err(StoreError::Backend(format!(
            "the sweep selected {} messages but deleted {deleted}",
            doomed.len()
        )));
    }
    let deleted = doomed.into_iter().map(|(_, m)| m).collect();
    Ok((deleted, skipped.into_inner()))
}
