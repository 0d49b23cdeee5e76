//! How values are laid out in SQLite, and how SQLite's failures become
//! [`StoreError`]s.
//!
//! SQLite integers are signed 64-bit; most of ours (business ids,
//! timestamps, key ids) are unsigned 64-bit and must keep their order, since
//! the queries page and sort by them. Each is stored *biased*: `v XOR 2^63`,
//! read as signed. That maps `0` to `i64::MIN` and `u64::MAX` to `i64::MAX`,
//! so SQLite's signed order is exactly the unsigned order, and no value can
//! fail to fit. Small integers (codes, versions, device ids, attempts) are
//! stored as they are. Ids and phone hashes are 16-byte blobs, compared as
//! bytes, which is their `Ord`.
//!
//! Decoding is total: a value of the wrong type, an unknown code or a blob of
//! the wrong length is [`StoreError::Corrupt`] naming the column, never a
//! panic. Error messages name tables and columns, never a stored value
//! (a blob's length at most).

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::types::ValueRef;
use rusqlite::{ErrorCode, Row};

use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::keys::{Epoch, KeyId, KeyKind};
use crate::store::{
    Delivery, Direction, ExpiredMessage, FailureReason, MessageRecord, PeerId, Status, StoreError,
};
use crate::time::Timestamp;

const BIAS: u64 = 1 << 63;

/// An unsigned value as stored: biased so that signed order is unsigned order.
pub(super) const fn u64_to_sql(v: u64) -> i64 {
    (v ^ BIAS) as i64
}

/// The unsigned value of a stored (biased) integer.
pub(super) const fn u64_from_sql(v: i64) -> u64 {
    (v as u64) ^ BIAS
}

pub(super) fn business_sql(b: BusinessId) -> i64 {
    u64_to_sql(b.get())
}

pub(super) fn time_sql(t: Timestamp) -> i64 {
    u64_to_sql(t.as_millis())
}

/// A `LIMIT` for SQL: every `usize` limit is honoured (SQLite's limit is `i64`).
pub(super) fn limit_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The error for a stored value that this crate cannot have written.
pub(super) fn corrupt(column: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {what}"))
}

/// A SQLite failure as a [`StoreError`]. Damage is `Corrupt`, everything
/// else `Backend`; the message is SQLite's, which names objects, never values.
pub(super) fn store_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            StoreError::Corrupt(format!("SQLite: {e}"))
        }
        E::InvalidColumnType(..)
        | E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..) => StoreError::Corrupt(format!("SQLite value: {e}")),
        _ => StoreError::Backend(format!("SQLite: {e}")),
    }
}

/// Decode rows until `limit` of them decoded, skipping every row that does
/// not: a listing only chooses what to work on next, and one damaged row
/// must not stop the work on all the others. The query's last column must be
/// the row's `rowid`. Each skipped row is counted in `damaged` and logged by
/// table, rowid and the column that failed (never a stored value); it stays
/// in the database for an operator. A failure of SQLite itself, rather than
/// of a value, still fails the listing.
pub(super) fn decodable<T>(
    rows: &mut rusqlite::Rows<'_>,
    limit: usize,
    table: &str,
    damaged: &AtomicU64,
    mut decode: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<(i64, T)>, StoreError> {
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next().db()? else { break };
        let rowid: i64 = row
            .get(row.as_ref().column_count().saturating_sub(1))
            .db()?;
        if let Some(value) = skip_damaged(decode(row), table, Some(rowid), damaged)? {
            out.push((rowid, value));
        }
    }
    Ok(out)
}

/// A decoded value; `None` for a row that does not decode, counted in
/// `damaged` and logged as [`decodable`] does (by `rowid` where the table
/// has one); any other failure as it was.
pub(super) fn skip_damaged<T>(
    decoded: Result<T, StoreError>,
    table: &str,
    rowid: Option<i64>,
    damaged: &AtomicU64,
) -> Result<Option<T>, StoreError> {
    match decoded {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::Corrupt(what)) => {
            damaged.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                table,
                rowid,
                error = %what,
                "a stored row does not decode: skipped, and kept for an operator"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `?` for SQLite results inside the backend: `.db()?` maps the error
/// through [`store_error`]. (A `From` impl would put rusqlite in the crate's
/// public API.)
pub(super) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(store_error)
    }
}

/// The columns of one row, decoded with the column names at hand for errors.
pub(super) struct Cols<'a, 'r> {
    row: &'a Row<'r>,
    table: &'static str,
}

impl<'a, 'r> Cols<'a, 'r> {
    pub(super) fn new(row: &'a Row<'r>, table: &'static str) -> Self {
        Self { row, table }
    }

    fn value(&self, idx: usize) -> Result<ValueRef<'a>, StoreError> {
        self.row.get_ref(idx).map_err(store_error)
    }

    fn wrong(&self, column: &str, expected: &str, found: ValueRef<'_>) -> StoreError {
        corrupt(
            &format!("{}.{column}", self.table),
            format_args!("expected {expected}, found {}", found.data_type()),
        )
    }

    fn bad(&self, column: &str, what: impl std::fmt::Display) -> StoreError {
        corrupt(&format!("{}.{column}", self.table), what)
    }

    pub(super) fn int(&self, idx: usize, column: &str) -> Result<i64, StoreError> {
        match self.value(idx)? {
            ValueRef::Integer(v) => Ok(v),
            other => Err(self.wrong(column, "an integer", other)),
        }
    }

    pub(super) fn opt_int(&self, idx: usize, column: &str) -> Result<Option<i64>, StoreError> {
        match self.value(idx)? {
            ValueRef::Null => Ok(None),
            ValueRef::Integer(v) => Ok(Some(v)),
            other => Err(self.wrong(column, "an integer or null", other)),
        }
    }

    pub(super) fn blob(&self, idx: usize, column: &str) -> Result<&'a [u8], StoreError> {
        match self.value(idx)? {
            ValueRef::Blob(b) => Ok(b),
            other => Err(self.wrong(column, "a blob", other)),
        }
    }

    pub(super) fn opt_blob(
        &self,
        idx: usize,
        column: &str,
    ) -> Result<Option<&'a [u8]>, StoreError> {
        match self.value(idx)? {
            ValueRef::Null => Ok(None),
            ValueRef::Blob(b) => Ok(Some(b)),
            other => Err(self.wrong(column, "a blob or null", other)),
        }
    }

    pub(super) fn text(&self, idx: usize, column: &str) -> Result<String, StoreError> {
        match self.value(idx)? {
            ValueRef::Text(t) => std::str::from_utf8(t)
                .map(str::to_owned)
                .map_err(|_| self.bad(column, "text is not UTF-8")),
            other => Err(self.wrong(column, "text", other)),
        }
    }

    pub(super) fn u64(&self, idx: usize, column: &str) -> Result<u64, StoreError> {
        self.int(idx, column).map(u64_from_sql)
    }

    pub(super) fn u32(&self, idx: usize, column: &str) -> Result<u32, StoreError> {
        let v = self.int(idx, column)?;
        u32::try_from(v)
            .map_err(|_| self.bad(column, "out of the range of a 32-bit unsigned integer"))
    }

    pub(super) fn time(&self, idx: usize, column: &str) -> Result<Timestamp, StoreError> {
        self.u64(idx, column).map(Timestamp::from_millis)
    }

    pub(super) fn opt_time(
        &self,
        idx: usize,
        column: &str,
    ) -> Result<Option<Timestamp>, StoreError> {
        Ok(self
            .opt_int(idx, column)?
            .map(|v| Timestamp::from_millis(u64_from_sql(v))))
    }

    pub(super) fn business(&self, idx: usize, column: &str) -> Result<BusinessId, StoreError> {
        BusinessId::new(self.u64(idx, column)?).ok_or_else(|| self.bad(column, "business id 0"))
    }

    pub(super) fn bytes16(&self, idx: usize, column: &str) -> Result<[u8; 16], StoreError> {
        let b = self.blob(idx, column)?;
        <[u8; 16]>::try_from(b)
            .map_err(|_| self.bad(column, format_args!("{} bytes, expected 16", b.len())))
    }

    pub(super) fn message_id(&self, idx: usize, column: &str) -> Result<MessageId, StoreError> {
        self.bytes16(idx, column).map(MessageId::from_bytes)
    }

    pub(super) fn phone(&self, idx: usize, column: &str) -> Result<PhoneHash, StoreError> {
        self.bytes16(idx, column).map(PhoneHash::from_bytes)
    }

    pub(super) fn key_kind(&self, idx: usize, column: &str) -> Result<KeyKind, StoreError> {
        let code = self.int(idx, column)?;
        u8::try_from(code)
            .ok()
            .and_then(|c| KeyKind::try_from(c).ok())
            .ok_or_else(|| self.bad(column, "an unknown key kind"))
    }

    fn code(&self, idx: usize, column: &str) -> Result<u8, StoreError> {
        let v = self.int(idx, column)?;
        u8::try_from(v).map_err(|_| self.bad(column, "an unknown code"))
    }

    pub(super) fn direction(&self, idx: usize, column: &str) -> Result<Direction, StoreError> {
        let c = self.code(idx, column)?;
        Direction::from_code(c).ok_or_else(|| self.bad(column, "an unknown code"))
    }

    pub(super) fn status(&self, idx: usize, column: &str) -> Result<Status, StoreError> {
        let c = self.code(idx, column)?;
        Status::from_code(c).ok_or_else(|| self.bad(column, "an unknown code"))
    }

    /// A one-byte code that may be null (a failure reason, a status told).
    pub(super) fn opt_code<T>(
        &self,
        idx: usize,
        column: &str,
        decode: fn(u8) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        match self.opt_int(idx, column)? {
            None => Ok(None),
            Some(v) => u8::try_from(v)
                .ok()
                .and_then(decode)
                .map(Some)
                .ok_or_else(|| self.bad(column, "an unknown code")),
        }
    }
}

/// The columns of `messages` in the order [`message`] reads them (a macro,
/// so that queries can be `const`).
macro_rules! message_columns {
    () => {
        "business, id, direction, phone, created, expiry, \
         epoch, status, failure, attempts, next_attempt, pending_devices, sealed, \
         accepted_by, overdue_at, told"
    };
}
pub(super) use message_columns;

/// A message row selected with [`message_columns!`].
pub(super) fn message(row: &Row<'_>) -> Result<MessageRecord, StoreError> {
    let c = Cols::new(row, "messages");
    let mut m = unsealed(&c)?;
    m.sealed = c.blob(12, "sealed")?.to_vec();
    Ok(m)
}

/// The columns the sweep selects: those of [`message_columns!`], in its
/// order, with only the type of `sealed` (`typeof` reads no overflow page
/// of a long value).
macro_rules! swept_columns {
    () => {
        "business, id, direction, phone, created, expiry, \
         epoch, status, failure, attempts, next_attempt, pending_devices, typeof(sealed), \
         accepted_by, overdue_at, told"
    };
}
pub(super) use swept_columns;

/// A row selected with [`swept_columns!`]: what the sweep returns of a
/// message it deletes. Every column is decoded as [`message`] decodes it, so
/// that a row that `message` refuses is refused here too, and kept.
pub(super) fn expired(row: &Row<'_>) -> Result<ExpiredMessage, StoreError> {
    let c = Cols::new(row, "messages");
    let m = unsealed(&c)?;
    match c.text(12, "sealed")?.as_str() {
        "blob" => Ok(ExpiredMessage::from(&m)),
        other => Err(c.bad("sealed", format_args!("expected a blob, found {other}"))),
    }
}

/// Every column of [`message_columns!`] but `sealed`, left empty.
fn unsealed(c: &Cols<'_, '_>) -> Result<MessageRecord, StoreError> {
    Ok(MessageRecord {
        business: c.business(0, "business")?,
        id: c.message_id(1, "id")?,
        direction: c.direction(2, "direction")?,
        phone: c.phone(3, "phone")?,
        created: c.time(4, "created")?,
        expiry: c.time(5, "expiry")?,
        epoch: Epoch::ending_at(c.time(6, "epoch")?),
        delivery: Delivery {
            status: c.status(7, "status")?,
            failure: c.opt_code(8, "failure", FailureReason::from_code)?,
            attempts: c.u32(9, "attempts")?,
            next_attempt: c.opt_time(10, "next_attempt")?,
            pending_devices: c.u64(11, "pending_devices")?,
            overdue_at: c.opt_time(14, "overdue_at")?,
            accepted_by: c.u64(13, "accepted_by")?,
            told: c.opt_code(15, "told", Status::from_code)?,
        },
        sealed: Vec::new(),
    })
}

/// A row of [`ORPHAN_PEERS`](super::reads::ORPHAN_PEERS): `business,
/// phone, device` of `peers` and the type of `sealed`, so that a record the
/// peer read refuses is refused here too, and kept (listed, it would be
/// deleted).
pub(super) fn orphan_peer(row: &Row<'_>) -> Result<(BusinessId, PeerId), StoreError> {
    let c = Cols::new(row, "peers");
    let key = (
        c.business(0, "business")?,
        PeerId {
            phone: c.phone(1, "phone")?,
            device: c.u32(2, "device")?,
        },
    );
    match c.text(3, "sealed")?.as_str() {
        "blob" => Ok(key),
        other => Err(c.bad("sealed", format_args!("expected a blob, found {other}"))),
    }
}

/// The primary-key columns of a key, as bound: business, kind, id.
pub(super) fn key_id_sql(id: &KeyId) -> (i64, i64, i64) {
    (
        business_sql(id.business),
        i64::from(id.kind.code()),
        u64_to_sql(id.id),
    )
}

/// The checks on stored message rows that the fuzz target `message_row`
/// and the property tests share (see [`crate::fuzzing::message_row`]).
#[cfg(any(test, fuzzing))]
pub(crate) mod checks {
    #![allow(
        clippy::panic,
        reason = "a fuzz check reports a broken property by panicking"
    )]

    use rusqlite::types::Value;

    use super::*;

    /// The columns of [`message_columns!`], in order.
    pub(crate) const COLUMNS: [&str; 16] = [
        "business",
        "id",
        "direction",
        "phone",
        "created",
        "expiry",
        "epoch",
        "status",
        "failure",
        "attempts",
        "next_attempt",
        "pending_devices",
        "sealed",
        "accepted_by",
        "overdue_at",
        "told",
    ];

    /// The values of `m`'s row, as the insert writes them.
    fn row_of(m: &MessageRecord) -> Vec<Value> {
        let d = &m.delivery;
        vec![
            Value::Integer(business_sql(m.business)),
            Value::Blob(m.id.as_bytes().to_vec()),
            Value::Integer(m.direction.code().into()),
            Value::Blob(m.phone.as_bytes().to_vec()),
            Value::Integer(time_sql(m.created)),
            Value::Integer(time_sql(m.expiry)),
            Value::Integer(time_sql(m.epoch.end())),
            Value::Integer(d.status.code().into()),
            d.failure
                .map_or(Value::Null, |f| Value::Integer(f.code().into())),
            Value::Integer(d.attempts.into()),
            d.next_attempt
                .map_or(Value::Null, |t| Value::Integer(time_sql(t))),
            Value::Integer(u64_to_sql(d.pending_devices)),
            Value::Blob(m.sealed.clone()),
            Value::Integer(u64_to_sql(d.accepted_by)),
            d.overdue_at
                .map_or(Value::Null, |t| Value::Integer(time_sql(t))),
            d.told
                .map_or(Value::Null, |s| Value::Integer(s.code().into())),
        ]
    }

    /// Decode `values` (one per column of [`COLUMNS`]) as a message row is
    /// read, and as the sweep selects it (the type of `sealed` in its
    /// place). Decoding is total and exact: the row decodes to the one
    /// record written as exactly these values, or is refused as `Corrupt`,
    /// naming a column and quoting no stored value; the sweep's selection
    /// refuses exactly the rows a read refuses (a row it listed that a read
    /// refuses would be deleted unread) and agrees on the rest. Returns the
    /// column a refusal names.
    pub(crate) fn message_row(values: &[Value; COLUMNS.len()]) -> Result<(), &'static str> {
        let conn = rusqlite::Connection::open_in_memory()
            .unwrap_or_else(|e| panic!("an in-memory database: {e}"));
        let select = |sealed: &str| {
            let mut columns: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
            columns[12] = sealed.to_owned();
            format!("SELECT {}", columns.join(", "))
        };
        let read = conn
            .query_row(&select("?13"), rusqlite::params_from_iter(values), |row| {
                Ok(message(row))
            })
            .unwrap_or_else(|e| panic!("a row of bound values: {e}"));
        let swept = conn
            .query_row(
                &select("typeof(?13)"),
                rusqlite::params_from_iter(values),
                |row| Ok(expired(row)),
            )
            .unwrap_or_else(|e| panic!("a row of bound values: {e}"));
        match read {
            Ok(m) => {
                assert_eq!(
                    row_of(&m),
                    values,
                    "a row decodes to a record written otherwise"
                );
                assert_eq!(
                    swept.ok(),
                    Some(ExpiredMessage::from(&m)),
                    "the sweep reads a row otherwise"
                );
                Ok(())
            }
            Err(StoreError::Corrupt(what)) => {
                assert!(
                    !what.contains("SECRET"),
                    "a refusal quotes a stored value: {what}"
                );
                // Nor a stored integer (small ones could be a length).
                for v in values {
                    if let Value::Integer(i) = v
                        && i.unsigned_abs() >= 100
                    {
                        assert!(
                            !what.contains(&i.to_string()),
                            "a refusal quotes a stored integer: {what}"
                        );
                    }
                }
                assert!(
                    swept.is_err(),
                    "the sweep lists a row a read refuses: {what}"
                );
                let column = COLUMNS
                    .into_iter()
                    .find(|c| what.starts_with(&format!("messages.{c}: ")));
                Err(column.unwrap_or_else(|| panic!("a refusal names no column: {what}")))
            }
            Err(other) => panic!("a row is refused as other than corrupt: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rusqlite::types::Value;

    proptest! {
        #[test]
        fn biased_integers_round_trip_and_keep_unsigned_order(a: u64, b: u64) {
            prop_assert_eq!(u64_from_sql(u64_to_sql(a)), a);
            prop_assert_eq!(u64_to_sql(a).cmp(&u64_to_sql(b)), a.cmp(&b));
        }
    }

    /// Any value SQLite can hold, its text and blobs marked so that an
    /// error quoting one shows.
    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Real),
            ".{0,8}".prop_map(|t| Value::Text(format!("SECRET{t}"))),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|b| { Value::Blob([&b"SECRET"[..], &b].concat()) }),
        ]
    }

    /// A value for `column`: mostly one the crate writes, sometimes one of
    /// the column's type it never writes, sometimes anything.
    fn column_value(column: usize) -> BoxedStrategy<Value> {
        let int = |range: std::ops::Range<i64>| range.prop_map(Value::Integer).boxed();
        let any_int = || any::<i64>().prop_map(Value::Integer).boxed();
        let blob = |len: std::ops::Range<usize>| {
            proptest::collection::vec(any::<u8>(), len)
                .prop_map(Value::Blob)
                .boxed()
        };
        let or_null = |s: BoxedStrategy<Value>| prop_oneof![Just(Value::Null), s].boxed();
        let (written, unwritten) = match column {
            0 => (
                int(i64::MIN + 1..i64::MAX),
                Just(Value::Integer(i64::MIN)).boxed(),
            ),
            1 | 3 => (blob(16..17), blob(0..40)),
            2 => (int(1..3), int(-1..12)),
            7 => (int(0..5), int(-1..12)),
            8 => (or_null(int(1..7)), int(-1..20)),
            15 => (or_null(int(2..4)), or_null(int(-1..12))),
            9 => (int(0..1 << 32), any_int()),
            10 | 14 => (or_null(any_int()), or_null(any_int())),
            12 => (blob(0..40), any_value().boxed()),
            _ => (any_int(), any_int()),
        };
        prop_oneof![30 => written, 2 => unwritten, 1 => any_value()].boxed()
    }

    fn any_row() -> impl Strategy<Value = [Value; checks::COLUMNS.len()]> {
        std::array::from_fn(column_value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any values of a message row decode exactly or are refused
        /// naming a column, and the sweep's selection agrees (the checks of
        /// [`checks::message_row`], on rows mostly as written).
        #[test]
        fn message_rows_decode_exactly_or_are_refused_naming_a_column(values in any_row()) {
            let _ = checks::message_row(&values);
        }
    }

    #[test]
    fn biased_extremes_map_to_signed_extremes() {
        assert_eq!(u64_to_sql(0), i64::MIN);
        assert_eq!(u64_to_sql(u64::MAX), i64::MAX);
        assert_eq!(limit_sql(usize::MAX), i64::MAX);
    }
}
