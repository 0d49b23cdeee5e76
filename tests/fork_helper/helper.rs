//! Draws randomness, forks, and has parent and child each make a business's
//! keys and seal a record: `tests/fork.rs` builds it as a crate of its own
//! (with `libc`) and compares what they sealed.
//! Usage: `custodian-fork-helper <out>`; writes `<out>.parent` and
//! `<out>.child`.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use custodian::envelope::{self, Kind, Label};
use custodian::ids::{BusinessId, MessageId};
use custodian::keys::{Epoch, EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::store::MemoryStore;
use custodian::time::Timestamp;

/// Every future here is ready at once (an in-memory store).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn main() {
    let out = std::env::args().nth(1).expect("an output path");
    let now = Timestamp::from_millis(1_767_225_600_000);
    let keys = KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        Arc::new(MemoryStore::new()),
    );
    let expiry = now.saturating_add(Duration::from_secs(1800));
    let epoch = Epoch::containing(expiry, EpochLength::DEFAULT).expect("an epoch");
    // Randomness drawn before the fork, as a parent process would.
    let _ = MessageId::random();
    // SAFETY: single-threaded here; the child only computes, writes a file
    // and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    let (business, plaintext): (u64, &[u8]) = if pid == 0 {
        (2, b"child: transfer 900 to Bob  ")
    } else {
        (1, b"parent: my PIN code is 4321 ")
    };
    let business = BusinessId::new(business).expect("a business");
    let key = ready(keys.epoch_key_for_seal(business, epoch, now)).expect("an epoch key");
    let label = Label {
        kind: Kind::InboundMessage,
        business,
        id: MessageId::random(),
        expiry,
        region: "eu".parse().expect("a region"),
    };
    let sealed = envelope::seal(&key, &label, plaintext, now).expect("sealed");
    if pid == 0 {
        std::fs::write(format!("{out}.child"), &sealed).expect("written");
        // SAFETY: leaves the child without running the parent's exit work.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child failed"
    );
    std::fs::write(format!("{out}.parent"), &sealed).expect("written");
}
