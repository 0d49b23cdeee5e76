//! The database files this process has open: their descriptors, kept
//! while any store has the file open.
//!
//! On POSIX systems, closing any descriptor of a file releases every lock
//! the process holds on it, SQLite's included (SQLite's "rogue
//! `close(open(db))`"). A store whose locks went runs on: another
//! process's SQLite, finding the file unused, may checkpoint and delete
//! the write-ahead log under it (acknowledged writes lost), and the fence
//! between processors no longer holds (two logs). So a store reads its
//! file's header through a descriptor this registry keeps for that file
//! (by device and inode), opened by the first store on it, and every
//! descriptor of the file it opened is closed, under the registry's lock,
//! by the last, after that store's connections are closed. Elsewhere a descriptor's locks are its own, and each open
//! reads through its own.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::StoreError;

/// A store's hold on its file's descriptor, which closes when the last
/// hold on it is dropped.
pub(super) struct OpenFile {
    #[cfg(unix)]
    key: (u64, u64),
    #[cfg(not(unix))]
    file: File,
}

#[cfg(unix)]
mod registry {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    /// Each open file's descriptors (one, unless the path was switched
    /// between a look and an open: see `hold`) and the holds on them, by
    /// (device, inode).
    pub(super) type Open = BTreeMap<(u64, u64), (usize, Vec<File>)>;

    static OPEN: Mutex<Open> = Mutex::new(BTreeMap::new());

    /// The registry, whatever a thread that panicked holding it left (each
    /// change is one map operation, never half made).
    pub(super) fn lock() -> MutexGuard<'static, Open> {
        OPEN.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl OpenFile {
    /// A hold on the descriptor of the file at `path`: the one kept for a
    /// store in this process, or a new one.
    #[cfg(unix)]
    pub(super) fn hold(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;

        let mut open = registry::lock();
        let meta = std::fs::metadata(path)?;
        if let Some((holds, _)) = open.get_mut(&(meta.dev(), meta.ino())) {
            *holds += 1;
            return Ok(Self {
                key: (meta.dev(), meta.ino()),
            });
        }
        let file = File::open(path)?;
        keep(&mut open, file)
    }

    /// A hold on `file`, a descriptor of a file a store may have open.
    #[cfg(all(test, unix))]
    pub(super) fn keep(file: File) -> io::Result<Self> {
        keep(&mut registry::lock(), file)
    }

    /// A descriptor of the file at `path`, its own.
    #[cfg(not(unix))]
    pub(super) fn hold(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// The file's length, and as much of its start as it holds up to
    /// `buf`'s length read into `buf` (positioned reads: the descriptor's
    /// offset is not used).
    pub(super) fn read_start(&self, buf: &mut [u8]) -> io::Result<(u64, usize)> {
        #[cfg(unix)]
        {
            let open = registry::lock();
            match open.get(&self.key).and_then(|(_, files)| files.first()) {
                Some(file) => read_start(file, buf),
                None => Err(io::Error::other("the file's descriptor is not kept")),
            }
        }
        #[cfg(not(unix))]
        read_start(&self.file, buf)
    }
}

/// The file a store opened, and the path it opened it by: whether the path
/// still names that file. A file replaced under a running store (a backup
/// moved over it, say) or removed is no longer the store's to use: its
/// writes would land in a file no path reaches (acknowledged, then lost
/// when the process ends), and a connection opened by the path would read
/// another database, mixing the store's log, which is named by the path
/// too, with that file's pages. Clones share what their looks found.
#[derive(Debug, Clone)]
pub(super) struct Named {
    path: PathBuf,
    #[cfg(unix)]
    key: (u64, u64),
    seen: Arc<Seen>,
}

/// What the checks of a [`Named`] found.
#[derive(Debug)]
struct Seen {
    /// The path was last found naming another file, or none.
    gone: AtomicBool,
    /// When it was last found naming the file, in milliseconds from
    /// `since`.
    at: AtomicU64,
    since: Instant,
}

impl Named {
    /// The path the store opened the file by.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Fails unless the path still names the file (on Unix; elsewhere a
    /// file in use cannot be replaced or removed).
    pub(super) fn check(&self) -> Result<(), StoreError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;

            let named = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
            if named.as_ref().ok() != Some(&self.key) {
                self.seen.gone.store(true, Ordering::Release);
                return Err(self.gone(named.err()));
            }
        }
        let at = u64::try_from(self.seen.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.seen.at.store(at, Ordering::Relaxed);
        self.seen.gone.store(false, Ordering::Release);
        Ok(())
    }

    /// [`check`](Self::check), unless the path was last found naming the
    /// file, within `lately`: for work whose own result the file's
    /// replacement leaves whole (a pooled reader's, on the file it opened).
    pub(super) fn check_lately(&self, lately: Duration) -> Result<(), StoreError> {
        let at = Duration::from_millis(self.seen.at.load(Ordering::Relaxed));
        if self.seen.since.elapsed().saturating_sub(at) < lately
            && !self.seen.gone.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.check()
    }

    fn gone(&self, why: Option<io::Error>) -> StoreError {
        let why = why.map_or_else(|| "another file".into(), |e| e.to_string());
        StoreError::Backend(format!(
            "{} no longer names the database file the store opened ({why}): \
             the file was replaced or removed; stop the store",
            self.path.display()
        ))
    }
}

impl OpenFile {
    /// The file held, as named by `path`, the path it was opened by (just
    /// now: found naming it).
    pub(super) fn named(&self, path: &Path) -> Named {
        Named {
            path: path.to_owned(),
            #[cfg(unix)]
            key: self.key,
            seen: Arc::new(Seen {
                gone: AtomicBool::new(false),
                at: AtomicU64::new(0),
                since: Instant::now(),
            }),
        }
    }
}

/// A hold on the file `file` is a descriptor of, kept in `open`. The path
/// it was opened by may have been switched, between the look in the
/// registry and the open, to a file a store has open: the descriptor is
/// then kept with that file's, as closing it would drop the store's locks.
/// One that cannot be told is never closed.
#[cfg(unix)]
fn keep(open: &mut registry::Open, file: File) -> io::Result<OpenFile> {
    use std::os::unix::fs::MetadataExt;

    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(e) => {
            std::mem::forget(file);
            return Err(e);
        }
    };
    let key = (meta.dev(), meta.ino());
    let (holds, files) = open.entry(key).or_default();
    *holds += 1;
    files.push(file);
    Ok(OpenFile { key })
}

fn read_start(file: &File, buf: &mut [u8]) -> io::Result<(u64, usize)> {
    let len = file.metadata()?.len();
    let mut got = 0;
    while got < buf.len() {
        match read_at(file, &mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((len, got))
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

#[cfg(unix)]
impl Drop for OpenFile {
    fn drop(&mut self) {
        // Removed, and so closed, under the lock: a store opening the file
        // meanwhile either holds this descriptor or opens its own after.
        let mut open = registry::lock();
        if let Some((holds, _)) = open.get_mut(&self.key) {
            *holds -= 1;
            if *holds == 0 {
                open.remove(&self.key);
            }
        }
    }
}
