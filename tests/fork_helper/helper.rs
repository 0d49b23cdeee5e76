//! Draws randomness, forks, and has parent and child each make a business's
//! keys and seal a record, and draw what a processor built there would (its
//! writer id, its gate's decision-id instance): `tests/fork.rs` builds it
//! as a crate of its own (with `libc` and `rand`) and compares them.
//! Usage: `custodian-fork-helper <out>`; writes `<out>.parent` and
//! `<out>.child` (the sealed records), `<out>.parent.ids` and
//! `<out>.child.ids`.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use custodian::envelope::{self, Kind, Label};
use custodian::ids::{BusinessId, MessageId};
use custodian::keys::{Epoch, EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::store::{MemoryStore, WriterId};
use custodian::time::{SystemClock, Timestamp};
use custodian::visibility::{
    DataClass, Gate, Labelled, MemoryAuditSink, Party, Purpose, VisibilityPolicy,
};

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
    // Randomness drawn before the fork, as a parent process would: the
    // crate's, and rand's `ThreadRng`, which the fork copies.
    let _ = MessageId::random();
    let _: u64 = rand::random();
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
    let side = if pid == 0 { "child" } else { "parent" };
    std::fs::write(format!("{out}.{side}.ids"), ids()).expect("written");
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

/// What a processor built in this process draws for itself: its store
/// writer id, and its visibility gate's decision-id instance, one line
/// each.
fn ids() -> String {
    let gate = Gate::new(
        VisibilityPolicy::default(),
        Arc::new(MemoryAuditSink::new()),
        Arc::new(SystemClock),
    );
    let decision = match gate.release(
        Labelled::new(DataClass::NonIdentifiableStatistics, ()),
        Party::Business,
        Purpose::Analytics,
    ) {
        Ok(released) => released.decision().id,
        Err(denied) => denied.decision().id,
    };
    format!(
        "{}\n{:016x}\n",
        hex::encode(WriterId::random().as_bytes()),
        decision.instance()
    )
}
