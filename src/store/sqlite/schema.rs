//! The file: how a custodian database is recognised, created and migrated.
//!
//! A custodian database is a SQLite file whose `application_id` is
//! [`APPLICATION_ID`] and whose `user_version` is its schema version. Opening
//! checks, before anything writes to the file:
//!
//! 1. the header (read with plain file I/O): SQLite's magic, our application
//!    id, a schema version this build knows, and a file as long as the header
//!    says it is (when no write-ahead log could account for the difference);
//! 2. the schema (through a read-only connection): exactly the tables and
//!    indexes that [`MIGRATIONS`] create for that version, with their
//!    columns (name, declared type, `NOT NULL`, default, primary key) and
//!    index keys (columns, order, collation, uniqueness, and the predicate
//!    of a partial index).
//!
//! Anything else is refused with a [`SqliteOpenError`] and left byte for byte
//! as it was (but for a rollback journal a crash left hot beside a file
//! whose header passed step 1: it is rolled back before step 2, as any
//! SQLite connection would, so the file is checked as its last whole
//! transaction left it). Only then is the file opened for writing and migrated forward,
//! one step per version, each step in one transaction with its new
//! `user_version`.
//!
//! A new database is built under a temporary name and linked into place
//! complete, so a crash while creating one never leaves an empty or
//! half-initialised file under the real name.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::open_files::OpenFile;
use super::{SqliteOpenError, codec};

/// The `application_id` of a custodian database: "CUST" in ASCII.
pub(super) const APPLICATION_ID: u32 = 0x4355_5354;

/// One forward step of the schema.
pub(super) struct Migration {
    /// The schema version this step produces (the one before is `version - 1`).
    pub(super) version: u32,
    /// The statements, run in one transaction.
    pub(super) sql: &'static str,
}

/// Every schema version, oldest first. Version 0 is an empty custodian
/// database (application id set, no tables). Append only: a released step
/// never changes.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: V1,
    },
    Migration {
        version: 2,
        sql: V2,
    },
    Migration {
        version: 3,
        sql: V3,
    },
    Migration {
        version: 4,
        sql: V4,
    },
    Migration {
        version: 5,
        sql: V5,
    },
    Migration {
        version: 6,
        sql: V6,
    },
    Migration {
        version: 7,
        sql: V7,
    },
];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: u32 = 7;

/// Version 1. Unsigned 64-bit values are biased (see `codec`); `kind`,
/// `direction`, `status` and `failure` are the types' one-byte codes.
const V1: &str = "
CREATE TABLE kek_rings (
    business INTEGER PRIMARY KEY,
    revision INTEGER NOT NULL,
    ring     BLOB NOT NULL
);
CREATE TABLE wrapped_keys (
    business     INTEGER NOT NULL,
    kind         INTEGER NOT NULL,
    id           INTEGER NOT NULL,
    kek_version  INTEGER,
    blob         BLOB,
    destroyed_at INTEGER,
    PRIMARY KEY (business, kind, id)
) WITHOUT ROWID;
CREATE INDEX wrapped_keys_epoch_end ON wrapped_keys (id, business) WHERE kind = 1;
CREATE TABLE peers (
    business INTEGER NOT NULL,
    phone    BLOB NOT NULL,
    device   INTEGER NOT NULL,
    sealed   BLOB NOT NULL,
    UNIQUE (business, phone, device)
);
CREATE TABLE messages (
    business     INTEGER NOT NULL,
    id           BLOB NOT NULL,
    direction    INTEGER NOT NULL,
    phone        BLOB NOT NULL,
    created      INTEGER NOT NULL,
    expiry       INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,
    status       INTEGER NOT NULL,
    failure      INTEGER,
    attempts     INTEGER NOT NULL,
    next_attempt INTEGER,
    pending_devices INTEGER NOT NULL,
    sealed       BLOB NOT NULL,
    UNIQUE (business, id)
);
CREATE INDEX messages_expiry ON messages (expiry, business, id);
CREATE INDEX messages_due ON messages (next_attempt, business, id) WHERE next_attempt IS NOT NULL;
CREATE INDEX messages_phone ON messages (business, phone, expiry);
CREATE INDEX messages_open ON messages (expiry, business, id) WHERE status IN (0, 1);
CREATE TABLE holds (
    kind      INTEGER NOT NULL,
    business  INTEGER NOT NULL,
    phone     BLOB NOT NULL,
    reference TEXT NOT NULL,
    placed    INTEGER NOT NULL,
    PRIMARY KEY (kind, business, phone)
) WITHOUT ROWID;
";

/// Version 2: legal holds are keyed by scope *and* case reference, so two
/// cases holding the same scope are placed and released independently; the
/// store records the region it was created for, and refuses to be opened
/// as a store of another region.
const V2: &str = "
CREATE TABLE holds_v2 (
    kind      INTEGER NOT NULL,
    business  INTEGER NOT NULL,
    phone     BLOB NOT NULL,
    reference TEXT NOT NULL,
    placed    INTEGER NOT NULL,
    PRIMARY KEY (kind, business, phone, reference)
) WITHOUT ROWID;
INSERT INTO holds_v2 (kind, business, phone, reference, placed)
    SELECT kind, business, phone, reference, placed FROM holds;
DROP TABLE holds;
ALTER TABLE holds_v2 RENAME TO holds;
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// Version 3: a message's delivery bookkeeping records which write moved
/// it on from queued (`Delivery::accepted_by`, biased like every unsigned
/// 64-bit value: the default is zero biased). Rows stored before have
/// zero, a token no write makes.
const V3: &str = "
ALTER TABLE messages ADD COLUMN accepted_by INTEGER NOT NULL DEFAULT -9223372036854775808;
";

/// Version 4: the billing ledger (see `store::StoredBilling`). A count's
/// `take_id` is zero (biased) while no take holds it; `category` is the
/// category's one-byte code; `count` is biased. Takes keep the order they
/// were made in by their row id.
const V4: &str = "
CREATE TABLE billing (
    business     INTEGER NOT NULL,
    take_id      INTEGER NOT NULL,
    period_start INTEGER NOT NULL,
    period_end   INTEGER NOT NULL,
    category     INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    PRIMARY KEY (business, take_id, period_start, period_end, category)
) WITHOUT ROWID;
CREATE TABLE billing_takes (
    business INTEGER NOT NULL,
    id       INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    UNIQUE (business, id)
);
";

/// Version 5: a consumer's message sent again on request, stored under
/// the id it was asked for, is known by the id its own header gives too
/// (`header_id`; see `Op::PutResentMessage`). Rows stored before have
/// none.
const V5: &str = "
ALTER TABLE messages ADD COLUMN header_id BLOB;
CREATE UNIQUE INDEX messages_header ON messages (business, header_id)
    WHERE header_id IS NOT NULL;
";

/// Version 6: a sent message with devices pending records when it is next
/// sent again to every device (`Delivery::overdue_at`). Rows stored before
/// have none; the next attempt on one sets it.
const V6: &str = "
ALTER TABLE messages ADD COLUMN overdue_at INTEGER;
";

/// Version 7: the settled status a message's business was told ahead of
/// the report owed on it (`Delivery::told`, a status code). Rows stored
/// before have none: their report is made as it was.
const V7: &str = "
ALTER TABLE messages ADD COLUMN told INTEGER;
";

/// The name of the region in `store_meta` (schema version 2 and later).
const META_REGION: &str = "region";

/// The region recorded in the database, if its schema records one and it
/// has been set. Reads only.
pub(super) fn stored_region(
    conn: &Connection,
    version: u32,
) -> Result<Option<String>, rusqlite::Error> {
    if version < 2 {
        return Ok(None);
    }
    let mut stmt = conn.prepare("SELECT value FROM store_meta WHERE name = ?1")?;
    let mut rows = stmt.query([META_REGION])?;
    match rows.next()? {
        Some(row) => row.get(0).map(Some),
        None => Ok(None),
    }
}

/// Record `region` as the database's region, unless one is recorded
/// already (another process may have won the race since [`verify`]);
/// return the region recorded.
pub(super) fn record_region(conn: &Connection, region: &str) -> Result<String, rusqlite::Error> {
    conn.execute(
        "INSERT INTO store_meta (name, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        [META_REGION, region],
    )?;
    conn.query_row(
        "SELECT value FROM store_meta WHERE name = ?1",
        [META_REGION],
        |r| r.get(0),
    )
}

/// Length of SQLite's file header.
const HEADER_LEN: usize = 100;
const MAGIC: &[u8; 16] = b"SQLite format 3\0";

fn be32(h: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn sqlite_error(path: &Path, e: rusqlite::Error) -> SqliteOpenError {
    let message = e.to_string();
    match codec::store_error(e) {
        crate::store::StoreError::Corrupt(_) => SqliteOpenError::Corrupt {
            path: path.to_owned(),
            message,
        },
        _ => SqliteOpenError::Backend {
            path: path.to_owned(),
            message,
        },
    }
}

fn io_error(path: &Path, source: std::io::Error) -> SqliteOpenError {
    SqliteOpenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The path of the write-ahead log beside `path`.
fn wal_path(path: &Path) -> PathBuf {
    suffixed(path, "-wal")
}

/// The path of the log's index (shared memory) beside `path`.
fn shm_path(path: &Path) -> PathBuf {
    suffixed(path, "-shm")
}

/// `path` with `suffix` appended to its file name.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Check the header of the existing file at `path` (read with plain reads
/// through `file`, its descriptor): it must be a SQLite database of ours,
/// of a schema version we know, and not shorter than its header says.
/// Reads only. Whether the file is in write-ahead logging with neither a
/// log, its index nor a rollback journal beside it: then the file holds
/// all there is to read.
pub(super) fn inspect_header(path: &Path, file: &OpenFile) -> Result<bool, SqliteOpenError> {
    let mut header = [0u8; HEADER_LEN];
    let (len, got) = file
        .read_start(&mut header)
        .map_err(|e| io_error(path, e))?;
    if len == 0 {
        return Err(SqliteOpenError::Empty {
            path: path.to_owned(),
        });
    }
    if got < MAGIC.len() || header[..MAGIC.len()] != MAGIC[..] {
        return Err(SqliteOpenError::NotSqlite {
            path: path.to_owned(),
        });
    }
    if got < HEADER_LEN {
        return Err(SqliteOpenError::Corrupt {
            path: path.to_owned(),
            message: format!("the file ends inside its header ({got} of {HEADER_LEN} bytes)"),
        });
    }
    let application_id = be32(&header, 68);
    if application_id != APPLICATION_ID {
        return Err(SqliteOpenError::ForeignApplication {
            path: path.to_owned(),
            found: application_id,
        });
    }
    let version = be32(&header, 60);
    if version > SCHEMA_VERSION {
        return Err(SqliteOpenError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    // Page size: a power of two from 512 to 32768, or 1 meaning 65536.
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        _ => {
            return Err(SqliteOpenError::Corrupt {
                path: path.to_owned(),
                message: "invalid page size in the header".into(),
            });
        }
    };
    // The header's page count is valid only when its change counter matches
    // "version valid for"; with a non-empty log beside the file, the log may
    // hold pages the file does not have yet, so the length proves nothing;
    // nor with a rollback journal: a crash in a commit that grew the file
    // can leave page 1 (written first) counting pages not written yet,
    // which rolling the journal back undoes.
    let pages = u64::from(be32(&header, 28));
    let counted = pages != 0 && be32(&header, 24) == be32(&header, 92);
    let log = std::fs::metadata(wal_path(path)).ok();
    let journal = suffixed(path, "-journal");
    if counted
        && log.as_ref().is_none_or(|m| m.len() == 0)
        && !journal.exists()
        && len < pages.saturating_mul(page_size)
    {
        return Err(SqliteOpenError::Truncated {
            path: path.to_owned(),
            expected: pages.saturating_mul(page_size),
            actual: len,
        });
    }
    // File format versions 2 and 2: write-ahead logging. A rollback
    // journal beside it (a crash while the file turned to the log) would be
    // rolled back by a connection that may write: not logless then.
    let logging = header[18] == 2 && header[19] == 2;
    Ok(logging && log.is_none() && !shm_path(path).exists() && !journal.exists())
}

/// The schema objects a database of `version` has: (type, name, table).
type Objects = BTreeSet<(String, String, String)>;

/// Every schema object but the statistics tables a host's `ANALYZE`
/// makes, as SQLite makes them (`sqlite_stat3` by versions 3.8.2 to 3.29
/// built with it; `sqlite_stat2`, by versions before any that reads this
/// schema, cannot be made). Only those are left out: any other object
/// named like them (which SQLite reserves, so only a file edited under
/// `writable_schema` holds one) is compared, and refused, as every
/// object is. SQLite loads such an object all the same: a trigger named
/// so, copying each deleted message's phone hash or each destroyed key
/// into `sqlite_stat1` (which a scrub keeps), was let through.
fn objects(conn: &Connection) -> Result<Objects, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT type, name, tbl_name FROM sqlite_schema \
         WHERE (type, name, sql) NOT IN (VALUES \
           ('table', 'sqlite_stat1', 'CREATE TABLE sqlite_stat1(tbl,idx,stat)'), \
           ('table', 'sqlite_stat3', 'CREATE TABLE sqlite_stat3(tbl,idx,neq,nlt,ndlt,sample)'), \
           ('table', 'sqlite_stat4', 'CREATE TABLE sqlite_stat4(tbl,idx,neq,nlt,ndlt,sample)'))",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// The shape of each table and index (`"table messages"`, `"index
/// messages_expiry"`), as its list of features in order: a table's
/// columns, an index's keys, and what each is (`WITHOUT ROWID`, `UNIQUE`,
/// ...). SQLite's own tables are left out.
type Shapes = BTreeMap<String, Vec<String>>;

/// `t`, from `pragma_table_list`, is a table of the main schema, not one
/// of SQLite's own.
macro_rules! ours {
    () => {
        r"t.schema = 'main' AND t.type = 'table' AND t.name NOT LIKE 'sqlite\_%' ESCAPE '\'"
    };
}

fn shapes(conn: &Connection) -> Result<Shapes, rusqlite::Error> {
    let mut shapes = Shapes::new();
    let mut stmt = conn.prepare(concat!(
        "SELECT t.name, t.wr, t.strict FROM pragma_table_list AS t WHERE ",
        ours!()
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let table = shapes
            .entry(format!("table {}", r.get::<_, String>(0)?))
            .or_default();
        if r.get(1)? {
            table.push("WITHOUT ROWID".to_owned());
        }
        if r.get(2)? {
            table.push("STRICT".to_owned());
        }
    }
    let mut stmt = conn.prepare(concat!(
        "SELECT t.name, c.name, c.type, c.\"notnull\", c.dflt_value, c.pk, c.hidden
         FROM pragma_table_list AS t, pragma_table_xinfo(t.name, 'main') AS c WHERE ",
        ours!(),
        " ORDER BY t.name, c.cid"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let mut column = vec!["column".to_owned(), r.get(1)?];
        let declared: String = r.get(2)?;
        if !declared.is_empty() {
            column.push(declared);
        }
        if r.get(3)? {
            column.push("NOT NULL".to_owned());
        }
        if let Some(default) = r.get::<_, Option<String>>(4)? {
            column.push(format!("DEFAULT {default}"));
        }
        match r.get::<_, i64>(5)? {
            0 => {}
            n => column.push(format!("PRIMARY KEY #{n}")),
        }
        match r.get::<_, i64>(6)? {
            0 => {}
            n => column.push(format!("HIDDEN {n}")),
        }
        shapes
            .entry(format!("table {}", r.get::<_, String>(0)?))
            .or_default()
            .push(column.join(" "));
    }
    let mut stmt = conn.prepare(concat!(
        "SELECT l.name, l.\"unique\", l.origin, l.partial,
                x.seqno, x.cid, x.name, x.\"desc\", x.coll, x.\"key\",
                (SELECT s.sql FROM sqlite_schema AS s WHERE s.type = 'index' AND s.name = l.name)
         FROM pragma_table_list AS t, pragma_index_list(t.name, 'main') AS l,
              pragma_index_xinfo(l.name, 'main') AS x WHERE ",
        ours!(),
        " ORDER BY l.name, x.seqno"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let index = shapes
            .entry(format!("index {}", r.get::<_, String>(0)?))
            .or_default();
        // Once per index: where it comes from, and what kind it is.
        if r.get::<_, i64>(4)? == 0 {
            index.push(format!("origin {}", r.get::<_, String>(2)?));
            if r.get(1)? {
                index.push("UNIQUE".to_owned());
            }
            // No pragma describes the predicate: the statement that made
            // the index, kept verbatim, does.
            if r.get(3)? {
                index.push(match r.get::<_, Option<String>>(10)? {
                    Some(sql) => format!("PARTIAL, as {sql}"),
                    None => "PARTIAL".to_owned(),
                });
            }
        }
        // A key column, or one stored beside the keys (a rowid, say).
        let mut key = vec![if r.get(9)? { "key" } else { "stored" }.to_owned()];
        key.push(
            match (r.get::<_, i64>(5)?, r.get::<_, Option<String>>(6)?) {
                (_, Some(name)) => name,
                (-1, None) => "rowid".to_owned(),
                (_, None) => "an expression".to_owned(),
            },
        );
        if r.get(7)? {
            key.push("DESC".to_owned());
        }
        if let Some(collation) = r.get::<_, Option<String>>(8)?.filter(|c| c != "BINARY") {
            key.push(format!("COLLATE {collation}"));
        }
        index.push(key.join(" "));
    }
    Ok(shapes)
}

/// The statement that made each table (as the migrations, adding columns,
/// left it), its spacing aside: no pragma lists a table's constraints (a
/// `CHECK`, a conflict clause), and the statement does.
fn statements(conn: &Connection) -> Result<BTreeMap<String, String>, rusqlite::Error> {
    let mut stmt = conn.prepare(concat!(
        "SELECT t.name, s.sql FROM pragma_table_list AS t, sqlite_schema AS s
         WHERE s.type = 'table' AND s.name = t.name AND ",
        ours!()
    ))?;
    let mut rows = stmt.query([])?;
    let mut statements = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let sql: Option<String> = r.get(1)?;
        let words: Vec<&str> = sql.as_deref().unwrap_or("").split_whitespace().collect();
        statements.insert(r.get(0)?, words.join(" "));
    }
    Ok(statements)
}

/// How `found` differs from `expected`, object by object: the features
/// missing and unexpected, or the same in another order.
fn differences(found: &Shapes, expected: &Shapes) -> Vec<String> {
    let objects: BTreeSet<&String> = found.keys().chain(expected.keys()).collect();
    let mut out = Vec::new();
    for object in objects {
        let f = found.get(object).map_or(&[][..], Vec::as_slice);
        let e = expected.get(object).map_or(&[][..], Vec::as_slice);
        if f == e {
            continue;
        }
        let mut what: Vec<String> = e
            .iter()
            .filter(|x| !f.contains(x))
            .map(|x| format!("missing {x}"))
            .chain(
                f.iter()
                    .filter(|x| !e.contains(x))
                    .map(|x| format!("unexpected {x}")),
            )
            .collect();
        if what.is_empty() {
            what.push("the same columns or keys in another order".to_owned());
        }
        out.push(format!("{object}: {}", what.join(", ")));
    }
    out
}

/// An empty in-memory database with the schema [`MIGRATIONS`] create up to
/// `version`: what a database of that version must look like (the same
/// SQLite build names the automatic indexes the same way).
fn reference(version: u32) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_in_memory()?;
    for m in MIGRATIONS.iter().filter(|m| m.version <= version) {
        conn.execute_batch(m.sql)?;
    }
    Ok(conn)
}

fn pragma_u32(conn: &Connection, name: &str) -> Result<u32, rusqlite::Error> {
    // Both pragmas are 32-bit; application_id is signed in SQLite's API.
    conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0))
        .map(|v| v as u32)
}

/// Check, through a read-only connection, that the database is ours, of a
/// known version, with exactly the schema of that version: its tables and
/// indexes by name, then their columns and keys, then the statements that
/// made the tables (their constraints). Returns the version.
pub(super) fn verify(path: &Path, conn: &Connection) -> Result<u32, SqliteOpenError> {
    let err = |e| sqlite_error(path, e);
    let application_id = pragma_u32(conn, "application_id").map_err(err)?;
    if application_id != APPLICATION_ID {
        return Err(SqliteOpenError::ForeignApplication {
            path: path.to_owned(),
            found: application_id,
        });
    }
    let version = pragma_u32(conn, "user_version").map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(SqliteOpenError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let reference = reference(version).map_err(err)?;
    let found = objects(conn).map_err(err)?;
    let expected = objects(&reference).map_err(err)?;
    if found != expected {
        let unexpected: Vec<&str> = found.difference(&expected).map(|o| o.1.as_str()).collect();
        let missing: Vec<&str> = expected.difference(&found).map(|o| o.1.as_str()).collect();
        return Err(SqliteOpenError::UnexpectedSchema {
            path: path.to_owned(),
            version,
            detail: format!(
                "unexpected objects [{}], missing objects [{}]",
                unexpected.join(", "),
                missing.join(", ")
            ),
        });
    }
    let differences = differences(
        &shapes(conn).map_err(err)?,
        &shapes(&reference).map_err(err)?,
    );
    if !differences.is_empty() {
        return Err(SqliteOpenError::UnexpectedSchema {
            path: path.to_owned(),
            version,
            detail: differences.join("; "),
        });
    }
    let (found, expected) = (
        statements(conn).map_err(err)?,
        statements(&reference).map_err(err)?,
    );
    let other: Vec<&str> = found
        .iter()
        .filter(|&(table, sql)| expected.get(table) != Some(sql))
        .map(|(table, _)| table.as_str())
        .collect();
    if !other.is_empty() {
        return Err(SqliteOpenError::UnexpectedSchema {
            path: path.to_owned(),
            version,
            detail: format!(
                "tables [{}] have the columns and keys of this version, but other constraints",
                other.join(", ")
            ),
        });
    }
    Ok(version)
}

/// Bring the database to [`SCHEMA_VERSION`], every step in one
/// transaction: a step that fails (damage it meets) leaves the file as it
/// was, the steps before it undone too. The version is read again under
/// the write lock: another process may have migrated it since [`verify`].
pub(super) fn migrate(path: &Path, conn: &mut Connection) -> Result<(), SqliteOpenError> {
    let err = |e| sqlite_error(path, e);
    // Up to date: no need for the write lock.
    if pragma_u32(conn, "user_version").map_err(err)? == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let current = pragma_u32(&tx, "user_version").map_err(err)?;
    if current > SCHEMA_VERSION {
        return Err(SqliteOpenError::NewerSchema {
            path: path.to_owned(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for step in MIGRATIONS.iter().filter(|step| step.version > current) {
        tx.execute_batch(step.sql).map_err(err)?;
        tx.pragma_update(None, "user_version", step.version)
            .map_err(err)?;
    }
    tx.commit().map_err(err)
}

/// Create a new, fully migrated database at `path`, unless one appears there
/// first (then that one is opened as usual). Built under a temporary name in
/// the same directory and hard-linked into place: the link either puts a
/// complete database under `path` or fails because something is there.
/// The temporary name [`create`] builds the file at `path` under, before
/// linking it at `path`, begins with this (its path's, then this).
const CREATING: &str = ".creating-";

/// Refuses the file at `path` (canonical) if it has a name other than
/// `path` and the temporary names of creations of `path` (one under way
/// links the file there until it removes its own name; one that crashed
/// left it): opened by another name, its log would be another file
/// (see [`SqliteOpenError::MultipleLinks`]).
#[cfg(unix)]
pub(super) fn single_name(path: &Path) -> Result<(), SqliteOpenError> {
    use std::os::unix::fs::MetadataExt;

    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.nlink() <= 1 {
        return Ok(());
    }
    let mut prefix = path.file_name().unwrap_or_default().to_owned();
    prefix.push(CREATING);
    let prefix = prefix.as_encoded_bytes();
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut creating = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(path, e))? {
        let Ok(entry) = entry else { continue };
        if entry.file_name().as_encoded_bytes().starts_with(prefix)
            && let Ok(m) = std::fs::symlink_metadata(entry.path())
            && (m.dev(), m.ino()) == (meta.dev(), meta.ino())
        {
            creating += 1;
        }
    }
    // Counted again after the names: a creation may have removed its own
    // name meanwhile (and none makes one once the file is there).
    let links = std::fs::metadata(path)
        .map_err(|e| io_error(path, e))?
        .nlink();
    if links > 1 + creating {
        return Err(SqliteOpenError::MultipleLinks {
            path: path.to_owned(),
            links,
        });
    }
    Ok(())
}

/// Elsewhere, links are not counted.
#[cfg(not(unix))]
pub(super) fn single_name(_path: &Path) -> Result<(), SqliteOpenError> {
    Ok(())
}

pub(super) fn create(path: &Path) -> Result<(), SqliteOpenError> {
    // Unique to this process (its id, the time: a process that died
    // building may have had the id) and, within it, to this call: threads
    // reading the clock within one tick would build in one file otherwise.
    static CREATES: AtomicU64 = AtomicU64::new(0);
    let call = CREATES.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Absolute: SQLite reads a name beginning `file:` as a URI, and would
    // build somewhere else.
    let mut tmp = std::path::absolute(path)
        .map_err(|e| io_error(path, e))?
        .into_os_string();
    tmp.push(format!("{CREATING}{}-{nanos}-{call}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // Made here first, so that what the system refuses (a directory that
    // does not exist, no permission) is an I/O error naming `path`. Only
    // its owner may read it (SQLite gives its logs the file's mode): it
    // holds phone hashes, holds and, until a scrub, deleted rows.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(&tmp).map_err(|e| io_error(path, e))?;
    // Checked last thing before the file appears: a log left beside it
    // would be taken for its own.
    let built = build(&tmp, path).and_then(|()| orphaned_log(path));
    let linked = built.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error(path, e)),
    });
    // The temporary name goes whatever happened; its log and index are gone
    // with the connection that closed cleanly (or never existed).
    for leftover in [tmp.clone(), wal_path(&tmp), shm_path(&tmp)] {
        let _ = std::fs::remove_file(leftover);
    }
    linked?;
    sync_dir(path)
}

/// Refuses a log (write-ahead, or rollback journal) with anything in it
/// beside `path`, where no database is. (A database another process made
/// there meanwhile has its own log, written after the file appeared: the
/// file is looked for after the log, and the link then leaves it as it
/// is.)
fn orphaned_log(path: &Path) -> Result<(), SqliteOpenError> {
    for log in [wal_path(path), suffixed(path, "-journal")] {
        match std::fs::metadata(&log) {
            Ok(m) if m.len() > 0 => {
                if std::fs::symlink_metadata(path).is_ok() {
                    return Ok(());
                }
                return Err(SqliteOpenError::OrphanedLog {
                    path: path.to_owned(),
                    log,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&log, e)),
        }
    }
    Ok(())
}

/// Build the database for `path` in the file `tmp` (errors name `path`:
/// the caller never sees `tmp`).
fn build(tmp: &Path, path: &Path) -> Result<(), SqliteOpenError> {
    let err = |e| sqlite_error(path, e);
    let mut conn = Connection::open_with_flags(
        tmp,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    // The id is stored as SQLite's signed 32-bit value.
    conn.pragma_update(None, "application_id", APPLICATION_ID as i32)
        .map_err(err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SqliteOpenError::Backend {
            path: path.to_owned(),
            message: format!("cannot use write-ahead logging here (journal mode stays {mode})"),
        });
    }
    migrate(path, &mut conn)?;
    // Closing the last connection checkpoints the log into the file.
    conn.close().map_err(|(_, e)| err(e))?;
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, e))
}

/// Make a new directory entry durable (a no-op where directories cannot be
/// opened).
fn sync_dir(path: &Path) -> Result<(), SqliteOpenError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match File::open(dir) {
        Ok(d) => d.sync_all().or_else(|e| match e.kind() {
            // Some platforms refuse fsync on a directory handle.
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::PermissionDenied => Ok(()),
            _ => Err(io_error(dir, e)),
        }),
        Err(_) => Ok(()),
    }
}
