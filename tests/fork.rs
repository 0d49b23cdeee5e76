//! Randomness across a fork: a parent that drew randomness forks, and
//! parent and child each make a business's keys and seal a record
//! (`tests/fork_helper/helper.rs`, built as a crate of its own: forking
//! takes `unsafe`, which this crate forbids). They draw nothing alike: not
//! the keys, the record ids, nor the nonces. Drawn from a generator kept
//! in the process, they drew the same: the same epoch key for two
//! businesses, and the same nonce under it, so the two ciphertexts gave
//! away each other's plaintext. (Review of the cryptographic core.) Nor
//! do they draw what a processor draws for itself, its store writer id and
//! its gate's decision-id instance, after the parent drew from rand's
//! `ThreadRng`: drawn from it, they were the same, so the take-over that
//! fences an older processor's writes out of a store did not tell the two
//! workers apart. (Review of the randomness.)
#![cfg(unix)]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::path::PathBuf;
use std::process::Command;

use custodian::envelope::Envelope;

/// Build and run the helper (`tests/fork_helper/helper.rs`, made a crate
/// of its own in the test's scratch directory, built offline with this
/// crate's lock file); what parent and child drew, parent first.
fn across_a_fork() -> [Side; 2] {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fork_helper");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let toml = format!(
        "[package]\nname = \"custodian-fork-helper\"\nversion = \"0.0.0\"\n\
         edition = \"2024\"\npublish = false\n\n[dependencies]\n\
         custodian = {{ path = {:?} }}\nhex = \"0.4\"\nlibc = \"0.2\"\n\
         rand = \"0.10\"\n\n[workspace]\n",
        manifest.display().to_string()
    );
    let files = [
        ("Cargo.toml", toml.into_bytes()),
        (
            "Cargo.lock",
            std::fs::read(manifest.join("Cargo.lock")).unwrap(),
        ),
        (
            "src/main.rs",
            std::fs::read(manifest.join("tests/fork_helper/helper.rs")).unwrap(),
        ),
    ];
    // Written only if changed: an unchanged helper is not built again.
    for (name, bytes) in files {
        if std::fs::read(dir.join(name)).ok() != Some(bytes.clone()) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    // Its own files: other runs may share the directory.
    let out = dir.join(format!("sealed-{}", std::process::id()));
    // Nothing an earlier run left is read.
    for side in ["parent", "child", "parent.ids", "child.ids"] {
        let _ = std::fs::remove_file(format!("{}.{side}", out.display()));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--")
        .arg(&out)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .status()
        .unwrap();
    assert!(status.success(), "the fork helper failed to build or run");
    let read = |side: &str| {
        let path = format!("{}.{side}", out.display());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        bytes
    };
    ["parent", "child"].map(|side| Side {
        sealed: read(side),
        ids: String::from_utf8(read(&format!("{side}.ids"))).unwrap(),
    })
}

/// What one side of the fork drew.
struct Side {
    /// A record it sealed under a business's new epoch key.
    sealed: Vec<u8>,
    /// Its processor's writer id and gate instance, a line each.
    ids: String,
}

#[test]
fn parent_and_child_of_a_fork_draw_nothing_alike() {
    let [parent, child] = across_a_fork();
    let (p, c) = (
        Envelope::parse(&parent.sealed).unwrap(),
        Envelope::parse(&child.sealed).unwrap(),
    );
    let (p, c) = (p.header(), c.header());
    assert_ne!(p.label().business, c.label().business);
    assert_ne!(p.label().id, c.label().id, "the same record id");
    assert_ne!(p.nonce(), c.nonce(), "the same nonce");
    // The commitment binds the record's key, made from the epoch key and
    // the record id: checked apart from the ids, with the ids the same.
    assert_ne!(p.commitment(), c.commitment(), "the same record key");
}

#[test]
fn processors_built_on_both_sides_of_a_fork_tell_themselves_apart() {
    let [parent, child] = across_a_fork();
    let ids = |side: &Side| -> Vec<String> { side.ids.lines().map(str::to_owned).collect() };
    let (p, c) = (ids(&parent), ids(&child));
    assert_eq!((p.len(), c.len()), (2, 2), "{p:?} {c:?}");
    assert_ne!(p[0], c[0], "the same store writer id");
    assert_ne!(p[1], c[1], "the same gate instance");
}
