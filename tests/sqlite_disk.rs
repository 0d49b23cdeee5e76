//! The SQLite store on a full disk: writes fail precisely and lose nothing
//! acknowledged, and a store that cannot be created is named in the error.
//!
//! Each test mounts a small tmpfs, which needs root (or `CAP_SYS_ADMIN`):
//! where mounting is refused, it says so on stderr and checks nothing.
#![cfg(all(target_os = "linux", feature = "sqlite"))]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::keys::Epoch;
use custodian::store::{
    Batch, Delivery, Direction, MessageRecord, Op, SqliteConfig, SqliteOpenError, SqliteStore,
    Status, Storage, StoreError,
};
use custodian::time::Timestamp;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn b() -> BusinessId {
    BusinessId::new(7).unwrap()
}

fn msg_id(i: u32) -> MessageId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    MessageId::from_bytes(id)
}

fn msg(i: u32, sealed_len: usize) -> MessageRecord {
    MessageRecord {
        business: b(),
        id: msg_id(i),
        direction: Direction::Inbound,
        phone: PhoneHash::from_bytes([0x5a; 16]),
        created: Timestamp::from_millis(1_000),
        expiry: Timestamp::from_millis(2_000_000),
        epoch: Epoch::ending_at(Timestamp::from_millis(2_000_000)),
        delivery: Delivery {
            status: Status::Delivered,
            failure: None,
            attempts: 1,
            next_attempt: None,
            pending_devices: 0,
            overdue_at: None,
            told: None,
            accepted_by: 0,
        },
        sealed: vec![(i % 251) as u8; sealed_len],
    }
}

fn put(i: u32, len: usize) -> Batch {
    Batch::from(Op::PutMessage(Box::new(msg(i, len))))
}

/// A small tmpfs, unmounted on drop; `None` where mounting is not allowed.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        mounted.then(|| Self(dir.path().to_owned(), dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the filesystem holding `dir`; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// A store that cannot be created (the disk is full) is named in the
/// error by the path given to `open`. Before, the error named the
/// temporary file it was being built in, which no longer existed.
#[test]
fn a_store_that_cannot_be_created_is_named_in_the_error() {
    let Some(fs) = Tmpfs::new("256k") else {
        eprintln!("cannot mount a tmpfs here: not checked");
        return;
    };
    let filler = fill(fs.path());
    let path = fs.path().join("store.db");
    let err = SqliteStore::open(&path, SqliteConfig::default()).unwrap_err();
    std::fs::remove_file(filler).unwrap();
    let named = match &err {
        SqliteOpenError::Backend { path, .. }
        | SqliteOpenError::Io { path, .. }
        | SqliteOpenError::Corrupt { path, .. } => path.clone(),
        other => panic!("unexpected error {other:?}"),
    };
    assert_eq!(named, path, "the error names another file: {err}");
}

/// A full disk under the writer thread: every commit that cannot land
/// fails with `StoreError::Backend`, none is half-applied or readable,
/// every acknowledged one stays readable (before and after a reopen), a
/// scrub on the full disk fails as an error, and once space is freed the
/// same store writes and scrubs again.
#[test]
fn a_full_disk_fails_writes_precisely_and_loses_nothing_acknowledged() {
    let Some(fs) = Tmpfs::new("4m") else {
        eprintln!("cannot mount a tmpfs here: not checked");
        return;
    };
    let path = fs.path().join("store.db");
    let rt = rt();
    let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        rt.block_on(store.commit(put(i, 1_000))).unwrap();
        acked.push(i);
    }
    let filler = fill(fs.path());
    let mut failed = Vec::new();
    for i in 20..120 {
        // Two messages per batch: a failure must take both or neither.
        let mut batch = put(i, 3_000);
        batch.push(Op::PutMessage(Box::new(msg(i + 10_000, 3_000))));
        match rt.block_on(store.commit(batch)) {
            Ok(()) => acked.push(i),
            Err(StoreError::Backend(_)) => failed.push(i),
            Err(e) => panic!("commit {i}: not a backend error: {e:?}"),
        }
    }
    assert!(!failed.is_empty(), "the disk never filled");
    let check = |store: &SqliteStore, acked: &[u32], when: &str| {
        for &i in acked {
            let m = rt.block_on(store.message(b(), msg_id(i))).unwrap();
            assert!(m.is_some(), "{when}: acknowledged {i} is gone");
        }
        for &i in &failed {
            for id in [i, i + 10_000] {
                let m = rt.block_on(store.message(b(), msg_id(id))).unwrap();
                assert!(m.is_none(), "{when}: failed batch {i} is readable ({id})");
            }
        }
    };
    check(&store, &acked, "on the full disk");
    assert!(rt.block_on(store.scrub()).is_err());
    std::fs::remove_file(&filler).unwrap();
    for i in 200..210 {
        rt.block_on(store.commit(put(i, 100))).unwrap();
        acked.push(i);
    }
    rt.block_on(store.scrub()).unwrap();
    check(&store, &acked, "once freed");
    drop(store);
    let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
    check(&store, &acked, "after a reopen");
}
