//! The durable embedded backend: everything in one SQLite file, and a write
//! acknowledged only once it is committed.
//!
//! See [`SqliteStore`] for the promises and the layout: `schema` recognises,
//! creates and migrates the file; `writer` runs every write on one thread
//! with group commit; `writes` and `reads` are the statements; `codec` lays
//! values out and maps SQLite's errors.

mod codec;
#[cfg(any(test, fuzzing))]
pub(crate) use codec::checks::COLUMNS as MESSAGE_COLUMNS;
#[cfg(any(test, fuzzing))]
pub(crate) use codec::checks::message_row as check_message_row;
mod open_files;
mod reads;
mod schema;
mod writer;
mod writes;

#[cfg(test)]
mod tests;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};

use self::open_files::OpenFile;
use self::reads::Readers;
use self::writer::Writer;
use super::{
    Batch, Census, Direction, ExpiredMessage, Hold, HoldScope, KeyStore, MessageRecord, PeerId,
    Storage, StoreError, StoredBilling, WriterId,
};
use crate::ids::{BusinessId, MessageId, PhoneHash, Region};
use crate::keys::{Epoch, KekRing, KeyEntry, KeyId, KeyKind, WrappedKey};
use crate::time::Timestamp;

/// What an acknowledged write survives.
///
/// Either way the database stays consistent: a crash at any moment loses at
/// most whole transactions, never part of one, and never corrupts the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Survives a power loss or an operating-system crash: every commit
    /// waits for the log to reach the disk (`synchronous = FULL`). The default.
    #[default]
    Full,
    /// Survives a crash of the process; an operating-system crash or a power
    /// loss may undo the last commits before the next checkpoint
    /// (`synchronous = NORMAL`). Commits do not wait for the disk.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// How a [`SqliteStore`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// The region the file is kept in; records are sealed for it (default
    /// [`Region::LOCAL`]).
    pub region: Region,
    /// What an acknowledged write survives (default [`Durability::Full`]).
    pub durability: Durability,
    /// How long a statement waits for a lock held by another process before
    /// failing (default 5 s). Within one process one thread writes, and
    /// readers do not wait for it, but while a write whose caller stopped
    /// waiting is queued (see the store's promises).
    /// At most [`MAX_BUSY_TIMEOUT`](Self::MAX_BUSY_TIMEOUT): a longer one is
    /// refused at open.
    pub busy_timeout: Duration,
    /// Read-only connections kept open between reads (default 4). Reads
    /// never wait for one: a read that finds none idle opens another.
    pub readers: usize,
    /// Most writes committed in one transaction (default 256): bounds the
    /// latency a write adds to the others in its group.
    pub max_group: NonZeroUsize,
    /// Whether [`scrub`](Storage::scrub) (made by the sweep once its
    /// deleting stages have run)
    /// rewrites the file with `VACUUM` (default `true`), the only way to
    /// clear the stale copies of rows that SQLite's page rebalancing leaves
    /// in live pages (see the store's promises). It costs about 0.6 s per
    /// 115 MB of live data (measured: 0.66 to 0.80 s for a 150 MB file),
    /// during which writes wait, and memory for a whole copy of the live
    /// data while it runs (the copy is kept in memory, never in a file
    /// outside the store). A host with a file so large that this matters
    /// turns it off and calls [`SqliteStore::vacuum`] on its own schedule:
    /// until then, stale copies of deleted rows (phone hashes, destroyed
    /// keys) may stay in the file. The scrub's other steps run either way.
    pub vacuum_on_scrub: bool,
}

impl SqliteConfig {
    /// The longest [`busy_timeout`](Self::busy_timeout) SQLite takes
    /// (`i32::MAX` milliseconds, about 24.8 days).
    pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            region: Region::LOCAL,
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(5),
            readers: 4,
            max_group: NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
            vacuum_on_scrub: true,
        }
    }
}

/// Why a SQLite database could not be opened. Whatever the reason, a file
/// that is refused is left exactly as it was, but for a rollback journal a
/// crash left hot beside a custodian database's file, which is rolled back
/// first (see [`SqliteStore`]'s promises for the files beside it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteOpenError {
    /// The file could not be read or created.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file exists and is empty. A database this crate creates is never
    /// left empty, so this is not one of ours (or one that was truncated to
    /// nothing); it is not initialised over.
    #[error("{} is an empty file, not a custodian database", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a SQLite database at all.
    #[error("{} is not a SQLite database", path.display())]
    NotSqlite {
        /// The file.
        path: PathBuf,
    },
    /// A SQLite database, of another application.
    #[error(
        "{} is a SQLite database of another application (application_id {found:#010x}; a custodian database has {:#010x})",
        path.display(),
        schema::APPLICATION_ID
    )]
    ForeignApplication {
        /// The file.
        path: PathBuf,
        /// The application id it carries.
        found: u32,
    },
    /// A custodian database written by a newer version of this crate.
    #[error(
        "{} has schema version {found}, newer than version {supported}, the newest this build of custodian knows: upgrade custodian to open it",
        path.display()
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A custodian database whose tables or indexes are not those of its
    /// schema version.
    #[error("{} does not have the schema of a version {version} custodian database: {detail}", path.display())]
    UnexpectedSchema {
        /// The file.
        path: PathBuf,
        /// The schema version it claims.
        version: u32,
        /// What differs.
        detail: String,
    },
    /// The file is shorter than its header says.
    #[error("{} is truncated: its header describes {expected} bytes, the file has {actual}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The length the header describes.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// A custodian database of another region: records sealed here would
    /// claim a region other than the one the data lives in.
    #[error("{} is the store of region {stored}, not of region {configured}", path.display())]
    RegionMismatch {
        /// The file.
        path: PathBuf,
        /// The region the file was created for.
        stored: String,
        /// The region it was opened as.
        configured: Region,
    },
    /// There is no file, but the log of one is beside its path (left by a
    /// crash, the file since deleted or moved away): a database made there
    /// would take that log's pages as its own, bringing back what the old
    /// file held, or damaging the new one. Nothing was created: move the
    /// log away too (or put the file back) and open again.
    #[error(
        "{} does not exist, but {} beside it is the log of a database that was there: move it away, or put the database back",
        path.display(),
        log.display()
    )]
    OrphanedLog {
        /// The missing file.
        path: PathBuf,
        /// The log beside it.
        log: PathBuf,
    },
    /// SQLite found the file damaged.
    #[error("{} is damaged: {message}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's description.
        message: String,
    },
    /// The configured [`busy_timeout`](SqliteConfig::busy_timeout) is longer
    /// than SQLite can wait ([`SqliteConfig::MAX_BUSY_TIMEOUT`]). Nothing was
    /// opened or created.
    #[error(
        "cannot open {}: a busy timeout of {requested:?} is longer than SQLite's longest, {:?}",
        path.display(),
        SqliteConfig::MAX_BUSY_TIMEOUT
    )]
    BusyTimeoutTooLong {
        /// The file.
        path: PathBuf,
        /// The configured timeout.
        requested: Duration,
    },
    /// The file has another name (a hard link) besides the one opened and
    /// any a creation under way gave it. SQLite names a database's log
    /// after the name it was opened by, so processes opening one file by
    /// two names write two logs, see none of each other's writes, and the
    /// fence between them ([`Storage::take_over`]) does not hold: an older
    /// processor would go on persisting sessions (two messages under one
    /// message key). Nothing was opened: remove the other names.
    #[error(
        "{} has {links} names (hard links): SQLite would keep a log for each; remove the others",
        path.display()
    )]
    MultipleLinks {
        /// The file.
        path: PathBuf,
        /// How many names the file has.
        links: u64,
    },
    /// SQLite failed otherwise (locked, out of space, ...).
    #[error("SQLite failed on {}: {message}", path.display())]
    Backend {
        /// The file.
        path: PathBuf,
        /// SQLite's description.
        message: String,
    },
}

impl From<SqliteOpenError> for StoreError {
    fn from(e: SqliteOpenError) -> Self {
        match e {
            SqliteOpenError::Io { .. }
            | SqliteOpenError::Backend { .. }
            | SqliteOpenError::BusyTimeoutTooLong { .. }
            | SqliteOpenError::NewerSchema { .. }
            | SqliteOpenError::RegionMismatch { .. }
            | SqliteOpenError::OrphanedLog { .. }
            | SqliteOpenError::MultipleLinks { .. } => Self::Backend(e.to_string()),
            _ => Self::Corrupt(e.to_string()),
        }
    }
}

/// Statements the writer keeps prepared.
const WRITER_STATEMENTS: usize = 64;
/// The writer's page cache, in KiB (SQLite's default is 2 MiB).
const WRITER_CACHE_KIB: i64 = 32 * 1024;
/// The log is truncated back to this size after a checkpoint that emptied it.
const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// Log pages (4 KiB each: 64 MiB) after which a commit checkpoints them
/// into the file (SQLite's default is 1,000). Each checkpoint writes every
/// page changed since the last, once, however often it changed, and syncs
/// the file: rarer checkpoints write and sync far less under the scattered
/// index updates of message traffic. Measured on the inbound pipeline
/// (`benches/pipeline.rs`, one run each): 43.6 µs per inbound message
/// against 58.6 µs at 1,000, and 38 µs of CPU against 48. The cost is a log of up to 64 MiB
/// (read back on recovery) holding older page images until it is reused.
const WAL_CHECKPOINT_PAGES: i64 = 16_384;

/// A [`Storage`] (and [`KeyStore`]) in one SQLite file: the durable default
/// for embedded use.
///
/// # Promises
///
/// - **Acknowledged means committed.** [`commit`](Storage::commit) and every
///   key write return `Ok` only after the transaction holding them committed,
///   as durable as the configured [`Durability`] (by default, across power
///   loss). A batch is one transaction, or part of one: all of it or none.
/// - **Group commit.** All writes go through one writer thread, which commits
///   whatever is queued together in one transaction; concurrent writers share
///   its cost. A write that fails is retried alone so it fails alone.
/// - **Reads do not wait for writes**, with one exception. The file is in
///   write-ahead-log mode; reads use their own read-only connections and see
///   the last commit. The exception: a write whose caller stopped waiting
///   (a host's timeout) is still applied, and while one is queued, a read
///   first waits for every write queued before it to land or fail, so that
///   no read begun after the drop misses it (see [`Storage::commit`]).
///   Normally that is the time of a group commit; if another process holds
///   the file's write lock, it is until the lock is released or the
///   [`busy_timeout`](SqliteConfig::busy_timeout) fails the queued writes.
/// - **Foreign files are left alone.** Opening refuses, with a
///   [`SqliteOpenError`] and without writing a byte, anything that is not a
///   custodian database of a known schema version, and creates nothing
///   beside a file it refuses (but where a crash left a log without its
///   index, or a rollback journal: then the check, read-only, may create
///   the log's files; a journal a crash left hot beside a file whose
///   header is a custodian database's is rolled back first, as SQLite
///   would on any connection, so the file is checked as its last whole
///   transaction left it; a foreign file's journal is never rolled back).
///   Older versions are migrated forward.
/// - **No panics on bad data.** A stored value this crate could not have
///   written is [`StoreError::Corrupt`].
/// - **Deleted bytes leave the files, at the next scrub.** The writer runs
///   with SQLite's `secure_delete` on: whatever a write frees (a deleted
///   message, peer or key, an index entry an update replaced) is
///   overwritten with zeros, in its page and in pages put on the freelist.
///   That is not all: when SQLite compacts or rebalances a b-tree page it
///   leaves the old bytes of the rows it moved in the page's free space,
///   and such a stale copy stays once the row is deleted. So
///   [`scrub`](Storage::scrub), which the sweep makes once every stage
///   that deletes has run to its end since the last one,
///   deletes the samples of any `sqlite_stat3`/`sqlite_stat4` table (index
///   keys a host's `ANALYZE` took, phone hashes among them; `sqlite_stat1`
///   holds counts only), rewrites the file with `VACUUM` (every live page
///   rebuilt from its live rows), then empties the write-ahead log of the
///   older page images. After a scrub that emptied the log no deleted
///   phone hash or destroyed key stays in the files. The `VACUUM` runs on
///   the writer thread between two transactions (writes wait; about 0.6 s
///   per 115 MB of live data), its temporary copy in memory (memory the
///   size of the live data while it runs). With
///   [`vacuum_on_scrub`](SqliteConfig::vacuum_on_scrub) off, stale copies
///   stay until the host calls [`vacuum`](SqliteStore::vacuum).
///
/// Reads are short and run on the caller's thread; writes never block the
/// caller's thread (they await a reply from the writer), and need no async
/// runtime. Dropping the store finishes the queued writes, then closes the
/// file. A write whose caller stopped waiting still completes.
///
/// # Layout
///
/// Tables `kek_rings` (one JSON ring per business), `wrapped_keys` (live keys
/// and tombstones; an index of epoch keys by end), `peers`, `messages`
/// (indexed by expiry, by next attempt where one is due, and by consumer),
/// `holds`, `billing` (billed counts by business, take, period and
/// category), `billing_takes` (takes not yet settled) and `store_meta` (the
/// region and the writer that took the store over). The file's
/// `application_id` marks it as custodian's, its `user_version` is the
/// schema version.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use custodian::store::{SqliteConfig, SqliteStore, Storage};
///
/// let dir = tempfile::tempdir()?;
/// let store = SqliteStore::open(dir.path().join("custodian.db"), SqliteConfig::default())?;
/// assert_eq!(store.census().await?.messages, 0);
/// # Ok(())
/// # }
/// ```
pub struct SqliteStore {
    region: Region,
    path: PathBuf,
    busy_timeout: Duration,
    vacuum_on_scrub: bool,
    readers: Readers,
    /// Rows the listings skipped because they do not decode.
    damaged: Arc<AtomicU64>,
    // Dropped after the readers: queued writes finish before the file
    // closes.
    writer: Writer,
    /// The store's hold on its file's descriptor: let go after every
    /// connection closed (see `open_files`).
    _file: OpenFile,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("region", &self.region)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open the custodian database at `path`, creating it if nothing is
    /// there, migrating it if its schema is older than this build's. Once
    /// the file exists the path is made absolute (see [`path`](Self::path)).
    /// A file it creates is readable and writable by its owner alone (mode
    /// `0600` on Unix), and so are its logs.
    pub fn open(path: impl AsRef<Path>, config: SqliteConfig) -> Result<Self, SqliteOpenError> {
        let path = path.as_ref();
        // SQLite takes the timeout in `i32` milliseconds (rusqlite panics on
        // a longer one): refused before anything is opened or created.
        if config.busy_timeout > SqliteConfig::MAX_BUSY_TIMEOUT {
            return Err(SqliteOpenError::BusyTimeoutTooLong {
                path: path.to_owned(),
                requested: config.busy_timeout,
            });
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(SqliteOpenError::NotSqlite {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => schema::create(path)?,
            Err(source) => {
                return Err(SqliteOpenError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        // Later connections (readers, the store's scrub) open the file by
        // name: the same file whatever the process's working directory.
        let path = &std::fs::canonicalize(path).map_err(|source| SqliteOpenError::Io {
            path: path.to_owned(),
            source,
        })?;
        schema::single_name(path)?;
        // Everything that can refuse the file runs before anything may write
        // it. Its header is read through the descriptor kept for it while a
        // store has it open (see `open_files`).
        let file = OpenFile::hold(path).map_err(|source| SqliteOpenError::Io {
            path: path.to_owned(),
            source,
        })?;
        let logless = schema::inspect_header(path, &file)?;
        {
            let conn = if logless {
                open_checker(path, config.busy_timeout)
            } else {
                open_read_only_recovered(path, config.busy_timeout)
            }
            .map_err(|e| open_error(path, e))?;
            let version = schema::verify(path, &conn)?;
            let stored = schema::stored_region(&conn, version).map_err(|e| open_error(path, e))?;
            if let Some(stored) = stored.filter(|r| *r != config.region.as_str()) {
                return Err(SqliteOpenError::RegionMismatch {
                    path: path.to_owned(),
                    stored,
                    configured: config.region,
                });
            }
        }
        let mut conn = open_writer(path, &config).map_err(|e| open_error(path, e))?;
        // In the file's own journal mode: a migration that meets damage is
        // rolled back, and the file left as it was. Then the log.
        schema::migrate(path, &mut conn)?;
        use_write_ahead_log(&conn).map_err(|e| open_error(path, e))?;
        let stored = schema::record_region(&conn, config.region.as_str())
            .map_err(|e| open_error(path, e))?;
        if stored != config.region.as_str() {
            return Err(SqliteOpenError::RegionMismatch {
                path: path.to_owned(),
                stored,
                configured: config.region,
            });
        }
        conn.execute_batch(writes::CREATE_HELD)
            .map_err(|e| open_error(path, e))?;
        // One look at the path for all: a replacement the writer finds
        // stops the readers too.
        let named = file.named(path);
        let writer =
            Writer::start(conn, named.clone(), config.max_group.get()).map_err(|source| {
                SqliteOpenError::Io {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok(Self {
            region: config.region,
            path: path.to_owned(),
            busy_timeout: config.busy_timeout,
            vacuum_on_scrub: config.vacuum_on_scrub,
            readers: Readers::new(named, config.busy_timeout, config.readers),
            damaged: Arc::default(),
            writer,
            _file: file,
        })
    }

    /// The database file: the path given to [`open`](Self::open) made
    /// absolute, with symbolic links resolved, so that the store keeps
    /// using the same file if the process changes its working directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Do what [`scrub`](Storage::scrub) does with
    /// [`vacuum_on_scrub`](SqliteConfig::vacuum_on_scrub) on, whatever the
    /// configuration: rewrite the file with `VACUUM`, then empty the log.
    /// For a host that turned the scrub's `VACUUM` off, on its own
    /// schedule. Writes wait while it runs (about 0.6 s per 115 MB of live
    /// data), and it needs memory for a copy of the live data; reads do
    /// not wait for it (but for the exception in the store's promises). If
    /// a reader holds the log, the log is emptied at the next scrub (that
    /// is logged).
    pub async fn vacuum(&self) -> Result<(), StoreError> {
        self.clean(true).await
    }

    /// Clear statistics samples, rewrite the file if `vacuum`, and empty the
    /// log: on the writer thread between two transactions, so that the
    /// store's own writes cannot starve it of the write lock.
    async fn clean(&self, vacuum: bool) -> Result<(), StoreError> {
        let busy = self.busy_timeout;
        let emptied = self
            .writer
            .alone(move |c| clean(c, vacuum, busy).map_err(codec::store_error))
            .await?;
        if !emptied {
            tracing::warn!("a reader held the SQLite log; it is emptied at the next sweep");
        }
        Ok(())
    }
}

/// How well group commit is grouping: see [`SqliteStore::group_commits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupCommits {
    /// Write transactions committed since the store was opened.
    pub transactions: u64,
    /// Writes ([`commit`](Storage::commit)s and key writes) they held.
    pub writes: u64,
}

impl SqliteStore {
    /// The read connections, once every write whose caller stopped waiting
    /// for it before this call has landed or failed: a commit dropped by its
    /// caller is still applied by the writer thread, and a read that began
    /// after the drop must not miss it (see [`Storage::commit`]).
    async fn reads(&self) -> &Readers {
        self.writer.settled().await;
        &self.readers
    }

    /// The transactions the writer committed since the store was opened,
    /// and the writes they held: writes per transaction is how many
    /// concurrent writes share each transaction's sync. Failed writes are
    /// not counted.
    pub fn group_commits(&self) -> GroupCommits {
        self.writer.committed()
    }

    /// How many times, since the store was opened, a listing skipped a row
    /// that does not decode (a damaged or foreign value). Each skip is also
    /// logged with the row's table and rowid and the column that failed.
    ///
    /// Listings that only choose what to work on next (messages due,
    /// expired messages to fail or delete, Signal records to forget, ended
    /// epoch keys to destroy, businesses whose expiries to cap, a
    /// business's Signal prekeys to publish or retire) skip such a
    /// row rather than fail, so that one damaged row cannot stop the
    /// retransmission or the sweep of every other. The row stays in the
    /// file for an operator; it is never deleted by the sweep, and it is
    /// counted again each time a listing passes it. Reads of one record,
    /// and reads that guard a deletion (holds, a held business's epochs),
    /// fail with [`StoreError::Corrupt`] instead; the sweep reads only
    /// what a hold covers (see [`Storage::delete_expired`]).
    pub fn damaged_rows_skipped(&self) -> u64 {
        self.damaged.load(Ordering::Relaxed)
    }
}

fn open_error(path: &Path, e: rusqlite::Error) -> SqliteOpenError {
    let message = e.to_string();
    match codec::store_error(e) {
        StoreError::Corrupt(_) => SqliteOpenError::Corrupt {
            path: path.to_owned(),
            message,
        },
        _ => SqliteOpenError::Backend {
            path: path.to_owned(),
            message,
        },
    }
}

/// The connection that checks a file with no log beside it, before the
/// file may be written. A read-only connection would create the log and its
/// index, and leave them when it closes; this one (its statements kept to
/// reads by `query_only`) deletes them when it closes, as the file's last
/// connection does (a log with nothing in it is checkpointed without
/// writing the file), unless another connection still has the file open.
fn open_checker(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// Rows a write's listing skipped, added to the store's count when the
/// work is let go: by its last run alone.
struct SkippedOnDrop {
    last: AtomicU64,
    into: Arc<AtomicU64>,
}

impl Drop for SkippedOnDrop {
    fn drop(&mut self) {
        self.into.fetch_add(*self.last.get_mut(), Ordering::Relaxed);
    }
}

/// A read-only connection to `path`, whose header is a custodian
/// database's. A rollback journal that a crash left hot beside it (the
/// crash cut a transaction short: a migration, the switch to the log)
/// cannot be rolled back read-only, and SQLite refuses every read
/// (`SQLITE_READONLY_ROLLBACK`): it is rolled back first by a connection
/// that may write, as any connection would, and the file is then as its
/// last whole transaction left it.
fn open_read_only_recovered(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = reads::open_read_only(path, busy)?;
    match conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)) {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_READONLY_ROLLBACK =>
        {
            drop(conn);
            let recovering = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            recovering.busy_timeout(busy)?;
            recovering.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
            drop(recovering);
            reads::open_read_only(path, busy)
        }
        _ => Ok(conn),
    }
}

/// Put the writer's connection in write-ahead logging (a write to the
/// file's header, once).
fn use_write_ahead_log(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "cannot use write-ahead logging here (journal mode stays {mode})"
            )),
        ));
    }
    Ok(())
}

/// The one read-write connection, configured for the writer thread but
/// for its journal mode (see [`use_write_ahead_log`]).
fn open_writer(path: &Path, config: &SqliteConfig) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(config.busy_timeout)?;
    conn.pragma_update(None, "synchronous", config.durability.pragma())?;
    // Every write zeroes what it frees (see `SqliteStore`'s promises).
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    Ok(conn)
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn ring(&self, business: BusinessId) -> Result<Option<KekRing>, StoreError> {
        self.reads().await.with(|c| reads::ring(c, business))
    }

    async fn put_ring(&self, ring: &KekRing, expected: Option<u64>) -> Result<(), StoreError> {
        let ring = ring.clone();
        self.writer
            .write(move |c| writes::put_ring(c, &ring, expected))
            .await?
    }

    async fn key(&self, id: &KeyId) -> Result<Option<KeyEntry>, StoreError> {
        self.reads().await.with(|c| reads::key(c, id))
    }

    async fn insert_key(&self, key: WrappedKey) -> Result<KeyEntry, StoreError> {
        self.writer
            .write(move |c| writes::insert_key(c, &key))
            .await
    }

    async fn rewrap_key(&self, key: WrappedKey, expected_version: u32) -> Result<bool, StoreError> {
        self.writer
            .write(move |c| writes::rewrap_key(c, &key, expected_version))
            .await
    }

    async fn destroy_key(&self, id: &KeyId, at: Timestamp) -> Result<bool, StoreError> {
        let id = *id;
        self.writer
            .write(move |c| writes::destroy_key(c, &id, at))
            .await
    }

    async fn delete_keys(&self, ids: &[KeyId]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        self.writer
            .write(move |c| {
                let mut n = 0;
                for id in &ids {
                    n += u64::from(writes::delete_key(c, id)?);
                }
                Ok(n)
            })
            .await
    }

    async fn delete_keys_as_read(&self, keys: &[WrappedKey]) -> Result<u64, StoreError> {
        let keys = keys.to_vec();
        self.writer
            .write(move |c| {
                let mut n = 0;
                for key in &keys {
                    n += u64::from(writes::delete_key_as_read(c, key)?);
                }
                Ok(n)
            })
            .await
    }

    async fn delete_epoch_keys(
        &self,
        ids: &[KeyId],
        seen: &[HoldScope],
    ) -> Result<u64, StoreError> {
        let (ids, seen) = (ids.to_vec(), seen.to_vec());
        self.writer
            .write(move |c| {
                let unseen: Vec<BusinessId> = reads::held_scopes(c)?
                    .into_iter()
                    .filter(|scope| !seen.contains(scope))
                    .map(|scope| scope.business())
                    .collect();
                let mut n = 0;
                for id in ids.iter().filter(|id| !unseen.contains(&id.business)) {
                    n += u64::from(writes::delete_key(c, id)?);
                }
                Ok(n)
            })
            .await
    }

    async fn keys_wrapped_below(
        &self,
        business: BusinessId,
        version: u32,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::keys_wrapped_below(c, business, version, after, limit, &self.damaged))
    }

    async fn count_wrapped_under(
        &self,
        business: BusinessId,
        version: u32,
    ) -> Result<u64, StoreError> {
        self.reads()
            .await
            .with(|c| reads::count_wrapped_under(c, business, version))
    }

    async fn keys_of_kind(
        &self,
        business: BusinessId,
        kind: KeyKind,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<WrappedKey>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::keys_of_kind(c, business, kind, after, limit, &self.damaged))
    }

    async fn ended_epoch_keys(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyId>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::ended_epoch_keys(c, now, limit, &self.damaged))
    }
}

#[async_trait]
impl Storage for SqliteStore {
    fn region(&self) -> Region {
        self.region
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        // An empty batch changes nothing, but a fenced one still answers
        // whether its writer is the store's: the fence is checked first.
        if batch.is_empty() && batch.writer().is_none() {
            return Ok(());
        }
        self.writer
            .write_fenced(batch.writer(), move |c| writes::apply_batch(c, &batch))
            .await
    }

    async fn take_over(&self, writer: WriterId) -> Result<(), StoreError> {
        self.writer
            .write(move |c| writes::take_over(c, writer))
            .await
    }

    async fn peer(
        &self,
        business: BusinessId,
        peer: PeerId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.reads().await.with(|c| reads::peer(c, business, peer))
    }

    async fn peer_devices(
        &self,
        business: BusinessId,
        phone: PhoneHash,
    ) -> Result<Vec<u32>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::peer_devices(c, business, phone))
    }

    async fn message(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        self.reads().await.with(|c| reads::message(c, business, id))
    }

    async fn due_messages(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::due_messages(c, now, limit, &self.damaged))
    }

    async fn expired_open_messages(
        &self,
        now: Timestamp,
        after: Option<(Timestamp, BusinessId, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::expired_open_messages(c, now, after, limit, &self.damaged))
    }

    async fn cap_expiry(
        &self,
        business: BusinessId,
        direction: Direction,
        period: Duration,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Option<MessageId>, StoreError> {
        self.writer
            .write(move |c| writes::cap_expiry(c, business, direction, period, after, limit))
            .await
    }

    async fn delete_expired(
        &self,
        now: Timestamp,
        abandon_before: Timestamp,
        holds: &[HoldScope],
        limit: usize,
    ) -> Result<Vec<ExpiredMessage>, StoreError> {
        let holds = holds.to_vec();
        // Counted from the listing's last run (a group commit may run it
        // again), once the writer lets the work go, whether or not this
        // call still waits for it.
        let skips = SkippedOnDrop {
            last: AtomicU64::new(0),
            into: Arc::clone(&self.damaged),
        };
        self.writer
            .write(move |c| {
                let (deleted, skipped) =
                    writes::delete_expired(c, now, abandon_before, &holds, limit)?;
                skips.last.store(skipped, Ordering::Relaxed);
                Ok(deleted)
            })
            .await
    }

    async fn message_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::message_businesses(c, &self.damaged))
    }

    async fn message_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::message_epochs(c, business, phone))
    }

    async fn peer_epochs(
        &self,
        business: BusinessId,
        phone: Option<PhoneHash>,
    ) -> Result<Vec<Epoch>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::peer_epochs(c, business, phone))
    }

    async fn has_live_message(
        &self,
        business: BusinessId,
        phone: PhoneHash,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.reads()
            .await
            .with(|c| reads::has_live_message(c, business, phone, now))
    }

    async fn orphan_peers(
        &self,
        now: Timestamp,
        after: Option<(BusinessId, PeerId)>,
        limit: usize,
    ) -> Result<Vec<(BusinessId, PeerId)>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::orphan_peers(c, now, after, limit, &self.damaged))
    }

    async fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        self.reads().await.with(|c| reads::holds(c))
    }

    async fn hold(&self, scope: HoldScope, reference: &str) -> Result<Option<Hold>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::hold(c, scope, reference))
    }

    async fn held_scopes(&self) -> Result<Vec<HoldScope>, StoreError> {
        self.reads().await.with(|c| reads::held_scopes(c))
    }

    async fn census(&self) -> Result<Census, StoreError> {
        self.reads().await.with(reads::census)
    }

    async fn billing(&self, business: BusinessId) -> Result<StoredBilling, StoreError> {
        self.reads().await.with(|c| reads::billing(c, business))
    }

    async fn billing_businesses(&self) -> Result<Vec<BusinessId>, StoreError> {
        self.reads()
            .await
            .with(|c| reads::billing_businesses(c, &self.damaged))
    }

    /// Delete the samples of any `sqlite_stat3` or `sqlite_stat4` table
    /// (index keys, phone hashes among them, that a host's `ANALYZE`
    /// sampled), rewrite the file with `VACUUM` unless
    /// [`vacuum_on_scrub`](SqliteConfig::vacuum_on_scrub) is off, then
    /// checkpoint the whole write-ahead log into the file and truncate the
    /// log to nothing: the log's older page images (deleted messages,
    /// destroyed keys) leave the disk's view of the files. It runs on the
    /// writer thread between two transactions; writes wait while it runs.
    /// If a reader still holds an older snapshot the log cannot be emptied;
    /// that is logged, and the next sweep tries again.
    async fn scrub(&self) -> Result<(), StoreError> {
        self.clean(self.vacuum_on_scrub).await
    }
}

/// Longest a scrub waits for readers to leave the log.
const SCRUB_WAIT: Duration = Duration::from_millis(250);

/// See [`SqliteStore::clean`]; whether the log is now empty. `busy` is the
/// writer's busy timeout, restored after the checkpoint's shorter wait.
fn clean(conn: &Connection, vacuum: bool, busy: Duration) -> rusqlite::Result<bool> {
    // `sqlite_stat1` holds counts only.
    for table in ["sqlite_stat3", "sqlite_stat4"] {
        let present = conn
            .prepare_cached("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1")?
            .exists([table])?;
        if present {
            conn.execute_batch(&format!("DELETE FROM {table}"))?;
        }
    }
    // Every live page rebuilt from its live cells: no stale copy of a row
    // that a rebalance left in a page's free space survives. Outside any
    // transaction; its temporary database in memory (`temp_store`, set
    // when the writer opened).
    if vacuum {
        conn.execute_batch("VACUUM")?;
    }
    // While it waits for readers the checkpoint holds off writes: a short
    // wait, so message traffic is not held up behind it.
    conn.busy_timeout(busy.min(SCRUB_WAIT))?;
    let blocked = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    conn.busy_timeout(busy)?;
    Ok(blocked? == 0)
}
