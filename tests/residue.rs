//! What the crate leaves in memory it gives back: a consumer's number, a
//! message's content and the keys above the records (the root's, each
//! KEK) must not be in any heap block the processor frees, nor in what a
//! secret type frees when dropped. A block freed with them in it keeps
//! them until the allocator hands it out again, for a core dump, a swap
//! file or a read past a buffer's end to find.
//!
//! The test binary's allocator looks into every block given back (and the
//! one every reallocation leaves): for the number and the content while a
//! [`watch`] is on, for the keys the test has learnt ([`learn`]) always.
//! It wipes every block given back, so that what it finds was written by
//! a live owner, not left by an earlier one. The tests take turns (one
//! lock), so a watch sees only the blocks of the code it watches. Stale
//! bytes on the stack reach the heap too, when a large value built there
//! (a future, before it is boxed) is moved into a block: so a key left in
//! a dead stack frame can be found as well, though only where it is
//! carried over.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    unsafe_code,
    reason = "tests assert by panicking; the watching allocator is unsafe by nature"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use zeroize::{Zeroize, Zeroizing};

use custodian::ids::{BusinessId, PhoneNumber};
use custodian::integrity::Category;
use custodian::keys::{KekContext, KeyProvider, LocalKeyProvider, ProviderError, SecretKey};
use custodian::processor::{Host, Inbound, Outbound, Policies, Processor};
use custodian::store::{MemoryStore, Status, Storage};
use custodian::testing::{ConsumerDevice, RecordingTransport};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::transport::{
    BusinessSink, InboundMessage, Principal, SinkError, StaticAuthorizer, StatusUpdate,
};
use custodian::visibility::MemoryAuditSink;

/// The consumer's number, as its digits appear in any copy of it.
const NUMBER: &str = "+4915799912345";
const DIGITS: &[u8] = b"4915799912345";
/// What the consumer and the business write (each message embeds it).
const SENTINEL: &[u8] = b"residue-sentinel:7f3a9c41e2";

/// The allocator: the system's, looking into each block it is given back.
struct Watcher;

#[global_allocator]
static ALLOCATOR: Watcher = Watcher;

/// Whether freed blocks are looked into for [`DIGITS`] and [`SENTINEL`]:
/// only while the crate's code runs (see [`watch`]), as the test's own
/// copies of them come and go.
static WATCHING: AtomicBool = AtomicBool::new(false);
static FREED_DIGITS: AtomicUsize = AtomicUsize::new(0);
static FREED_SENTINEL: AtomicUsize = AtomicUsize::new(0);

/// Secret keys the test has learnt (see [`learn`]): every block freed
/// after, watched or not, is looked into for them.
static KEYS: [[AtomicU8; 32]; 4] = [const { [const { AtomicU8::new(0) }; 32] }; 4];
static KEYS_LEARNT: AtomicUsize = AtomicUsize::new(0);
static FREED_KEYS: AtomicUsize = AtomicUsize::new(0);

/// Look for `key` in every block freed from now on, until the next test.
fn learn(key: &[u8; 32]) {
    let slot = KEYS_LEARNT.load(Ordering::Acquire);
    assert!(slot < KEYS.len(), "more keys than the test looks for");
    for (cell, byte) in KEYS[slot].iter().zip(key) {
        cell.store(*byte, Ordering::Relaxed);
    }
    KEYS_LEARNT.store(slot + 1, Ordering::Release);
}

fn contains(block: &[u8], needle: &[u8]) -> bool {
    block.windows(needle.len()).any(|w| w == needle)
}

impl Watcher {
    /// Count what `block` holds of what the test looks for.
    ///
    /// # Safety
    /// `ptr` is a live block of `layout` from this allocator.
    unsafe fn look(ptr: *mut u8, layout: Layout) {
        let watching = WATCHING.load(Ordering::Relaxed);
        let learnt = KEYS_LEARNT.load(Ordering::Acquire);
        if !watching && learnt == 0 {
            return;
        }
        let mut keys = [[0u8; 32]; 4];
        for (key, cells) in keys.iter_mut().zip(&KEYS).take(learnt) {
            for (byte, cell) in key.iter_mut().zip(cells) {
                *byte = cell.load(Ordering::Relaxed);
            }
        }
        // The block is read a chunk at a time, each chunk starting with
        // the last bytes of the one before (so a needle across two is
        // found), by volatile reads: it may hold bytes never written (a
        // vector's spare capacity), which the compiler must not reason
        // about.
        // One less than the longest needle (a key).
        const KEEP: usize = 31;
        let mut chunk = [0u8; 4096];
        let (mut at, mut filled) = (0, 0);
        let (mut digits, mut sentinel, mut key) = (false, false, false);
        while at < layout.size() {
            let take = (chunk.len() - filled).min(layout.size() - at);
            for (i, byte) in chunk[filled..filled + take].iter_mut().enumerate() {
                // SAFETY: `at + i < layout.size()`, inside the live block.
                *byte = unsafe { std::ptr::read_volatile(ptr.add(at + i)) };
            }
            at += take;
            filled += take;
            let seen = &chunk[..filled];
            digits |= watching && contains(seen, DIGITS);
            sentinel |= watching && contains(seen, SENTINEL);
            key |= keys[..learnt].iter().any(|k| contains(seen, k));
            let carried = filled.min(KEEP);
            chunk.copy_within(filled - carried..filled, 0);
            filled = carried;
        }
        // What this frame copied must not outlive it: a large value built
        // on the stack later (a future, before it is boxed) carries the
        // stale bytes beneath it into the heap, for the next look to find.
        keys.zeroize();
        chunk.zeroize();
        for (found, count) in [
            (digits, &FREED_DIGITS),
            (sentinel, &FREED_SENTINEL),
            (key, &FREED_KEYS),
        ] {
            if found {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; `look` only reads
// a block before it is given back.
unsafe impl GlobalAlloc for Watcher {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    // Every block is wiped as it is given back, watched or not: a block
    // handed out again must not bring along what an unwatched owner left
    // in it (the test's own copies), for a watch to find in its new
    // owner's spare capacity.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller gives back a live block of `layout`.
        unsafe {
            Self::look(ptr, layout);
            // Volatile: a plain write just before a free is a dead store,
            // which an optimised build drops.
            for i in 0..layout.size() {
                std::ptr::write_volatile(ptr.add(i), 0);
            }
            System.dealloc(ptr, layout);
        }
    }

    // A reallocation is always a new block, the old one looked into and
    // freed: a block the system would have grown or shrunk in place may
    // move another time, and a shrink in place gives back its tail as is.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's layout and size make a valid layout (the
        // `GlobalAlloc::realloc` contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded; a null block is returned as the failure it is.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and at least this long.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// One watch at a time: the tests of this file take turns.
static TURN: Mutex<()> = Mutex::new(());

/// Wait for this test's turn; it starts with no key learnt.
fn turn() -> MutexGuard<'static, ()> {
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    forget_keys();
    turn
}

/// Look for no key until one is learnt again, and count afresh.
fn forget_keys() {
    KEYS_LEARNT.store(0, Ordering::Release);
    FREED_KEYS.store(0, Ordering::Relaxed);
}

/// What a watch saw: freed blocks holding the digits, the sentinel.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    digits: usize,
    sentinel: usize,
}

/// Run `f` with the watch on.
fn watch<T>(f: impl FnOnce() -> T) -> (T, Seen) {
    FREED_DIGITS.store(0, Ordering::Relaxed);
    FREED_SENTINEL.store(0, Ordering::Relaxed);
    WATCHING.store(true, Ordering::SeqCst);
    let out = f();
    WATCHING.store(false, Ordering::SeqCst);
    let seen = Seen {
        digits: FREED_DIGITS.load(Ordering::Relaxed),
        sentinel: FREED_SENTINEL.load(Ordering::Relaxed),
    };
    (out, seen)
}

const NOTHING: Seen = Seen {
    digits: 0,
    sentinel: 0,
};

/// The watch finds what a plain `String`, `Vec` and `Box` leave, so a
/// clean run below means something.
#[test]
fn the_watch_sees_a_plain_copy_freed() {
    let _turn = turn();
    let key = *b"a-key-the-test-looks-for:0123456";
    learn(&key);
    let ((), seen) = watch(|| {
        drop(String::from(NUMBER));
        drop(SENTINEL.to_vec());
        let mut grown = SENTINEL.to_vec();
        grown.reserve(4096);
        std::hint::black_box(&grown);
        grown.fill(0);
        drop(Box::new(key));
    });
    assert_eq!(
        seen,
        Seen {
            digits: 1,
            sentinel: 2,
        },
        "a String, a Vec, and the block a Vec grew out of"
    );
    assert_eq!(FREED_KEYS.load(Ordering::Relaxed), 1, "a boxed key");
}

/// A secret key wipes itself when dropped.
#[test]
fn a_dropped_secret_key_leaves_nothing() {
    let _turn = turn();
    let mut bytes = *b"a-key-the-test-looks-for:0123456";
    learn(&bytes);
    let key = SecretKey::from_bytes(&mut bytes);
    assert_eq!(bytes, [0; 32], "the caller's copy is wiped");
    drop(key);
    let key = SecretKey::from_slice(b"another-key-it-looks-for:0123456").unwrap();
    learn(key.expose_secret());
    drop(key);
    assert_eq!(FREED_KEYS.load(Ordering::Relaxed), 0);
}

/// A phone number wipes its digits when dropped, its clones too.
#[test]
fn a_dropped_phone_number_leaves_no_digits() {
    let _turn = turn();
    let ((), seen) = watch(|| {
        let number: PhoneNumber = NUMBER.parse().unwrap();
        let copy = number.clone();
        drop(number);
        drop(copy);
    });
    assert_eq!(seen, NOTHING);
}

/// A business endpoint that keeps what it is handed in wiped memory, and
/// refuses a delivery while told to.
#[derive(Default)]
struct Endpoint {
    contents: Mutex<Vec<Zeroizing<Vec<u8>>>>,
    statuses: Mutex<Vec<Status>>,
    refusing: AtomicBool,
}

#[async_trait]
impl BusinessSink for Endpoint {
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError> {
        if self.refusing.load(Ordering::Relaxed) {
            return Err(SinkError("down".into()));
        }
        let copy = Zeroizing::new(message.content.to_vec());
        self.contents.lock().unwrap().push(copy);
        Ok(())
    }

    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError> {
        self.statuses.lock().unwrap().push(update.status);
        Ok(())
    }
}

/// The local provider, learning each KEK it is handed to wrap.
struct Learning(LocalKeyProvider);

#[async_trait]
impl KeyProvider for Learning {
    async fn wrap(&self, context: &KekContext, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        learn(key.expose_secret());
        self.0.wrap(context, key).await
    }

    async fn unwrap(
        &self,
        context: &KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, ProviderError> {
        self.0.unwrap(context, wrapped).await
    }
}

struct World {
    clock: ManualClock,
    transport: Arc<RecordingTransport>,
    endpoint: Arc<Endpoint>,
    processor: Processor,
    carrier: Principal,
    operator: Principal,
    b: BusinessId,
}

impl World {
    /// A processor over `storage`, its root key and KEK learnt.
    async fn new(storage: Arc<dyn Storage>) -> Self {
        let mut root = *b"root-key-the-test-looks-for:0123";
        learn(&root);
        let root = SecretKey::from_bytes(&mut root);
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let transport = Arc::new(RecordingTransport::new());
        let endpoint = Arc::new(Endpoint::default());
        let carrier = Principal::new("carrier");
        let operator = Principal::new("operator");
        let b = BusinessId::new(5).unwrap();
        let processor = Processor::new(
            Host {
                storage,
                key_provider: Arc::new(Learning(LocalKeyProvider::new(&root))),
                transport: transport.clone(),
                business: endpoint.clone(),
                authorizer: Arc::new(
                    StaticAuthorizer::new()
                        .grant(&carrier, b)
                        .carrier(&carrier, b)
                        .operator(&operator),
                ),
                clock: Arc::new(clock.clone()),
                audit: Arc::new(MemoryAuditSink::new()),
            },
            Policies::default(),
        )
        .unwrap();
        processor.publish_keys(&carrier, b).await.unwrap();
        Self {
            clock,
            transport,
            endpoint,
            processor,
            carrier,
            operator,
            b,
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A message content holding the sentinel, `len` bytes long.
fn content(len: usize) -> Vec<u8> {
    let mut content = SENTINEL.to_vec();
    content.resize(len.max(SENTINEL.len()), b'.');
    content
}

/// A consumer writes three times (the business's endpoint down for the
/// first and the third, the first handed in again by the consumer's
/// transport, both delivered by the retry loop), the business answers,
/// the answer's receipt times out and it goes again, the device reports
/// it read, and retention ends: no step frees a block holding the number
/// or the content, at any of several lengths (a cipher's padding, a
/// buffer's growth).
#[test]
fn the_processor_frees_no_number_and_no_content() {
    let _turn = turn();
    let rt = runtime();
    for len in [SENTINEL.len(), 100, 1000, 20_000] {
        run(&rt, Arc::new(MemoryStore::new()), len);
    }
}

/// The same over the SQLite store.
#[cfg(feature = "sqlite")]
#[test]
fn the_processor_over_sqlite_frees_no_number_and_no_content() {
    use custodian::store::{SqliteConfig, SqliteStore};
    let _turn = turn();
    let rt = runtime();
    for len in [SENTINEL.len(), 20_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db"), SqliteConfig::default());
        run(&rt, Arc::new(store.unwrap()), len);
    }
}

/// The flow of the two tests above over `storage`, with `len` bytes of
/// content, with a KEK rotation in the middle; then the processor is
/// dropped, and no block it freed, at any point, held its root key or
/// either of the business's KEKs.
fn run(rt: &tokio::runtime::Runtime, storage: Arc<dyn Storage>, len: usize) {
    forget_keys();
    let w = rt.block_on(World::new(storage));
    let number: PhoneNumber = NUMBER.parse().unwrap();
    let mut device = ConsumerDevice::new(0);
    let bundle = w.transport.published().unwrap();
    rt.block_on(device.start_session(w.b, &bundle.bundle(Some(0))))
        .unwrap();
    let mut messages = Vec::new();
    for _ in 0..3 {
        messages.push(rt.block_on(device.encrypt(w.b, &content(len))).unwrap());
    }
    let receive = |i: usize, refusing: bool| {
        let inbound = Inbound {
            resend_of: None,
            from: number.clone(),
            device: 0,
            message: messages[i].clone(),
        };
        w.endpoint.refusing.store(refusing, Ordering::Relaxed);
        let (receipt, seen) = watch(|| rt.block_on(w.processor.receive(&w.carrier, w.b, inbound)));
        assert_eq!(seen, NOTHING, "receiving message {i} of {len} bytes");
        receipt.unwrap()
    };

    // The first and the third wait, stored, for the business's
    // endpoint; the consumer's transport hands the first in again.
    assert!(!receive(0, true).delivered);
    assert!(receive(1, false).delivered);
    assert!(receive(0, false).duplicate);
    assert!(!receive(2, true).delivered);
    w.endpoint.refusing.store(false, Ordering::Relaxed);
    w.clock.advance(Duration::from_secs(60));
    let (report, seen) = watch(|| rt.block_on(w.processor.retransmit_due(&w.operator)));
    assert_eq!(report.unwrap().delivered_to_business, 2);
    assert_eq!(seen, NOTHING, "delivering {len} bytes again");
    assert_eq!(w.endpoint.contents.lock().unwrap().len(), 3);

    // The business's KEK rotates: a second version, made primary, every
    // epoch key wrapped under it.
    let keys = w.processor.keys(&w.operator).unwrap();
    let (rotated, seen) = watch(|| {
        rt.block_on(async {
            let version = keys.add_kek_version(w.b, w.clock.now()).await?;
            keys.promote_kek_version(w.b, version).await?;
            keys.rewrap(w.b).await
        })
    });
    assert!(rotated.unwrap() > 0, "epoch keys rewrapped");
    assert_eq!(seen, NOTHING, "a rotation");

    let outbound = Outbound {
        to: number.clone(),
        content: Zeroizing::new(content(len)),
        category: Category::Service,
    };
    let (id, seen) = watch(|| rt.block_on(w.processor.send(&w.carrier, w.b, outbound)));
    let id = id.unwrap();
    assert_eq!(seen, NOTHING, "sending {len} bytes");
    // No receipt within the hour: the reply goes again.
    w.clock.advance(Duration::from_secs(3601));
    let (report, seen) = watch(|| rt.block_on(w.processor.retransmit_due(&w.operator)));
    assert_eq!(report.unwrap().sent, 1);
    assert_eq!(seen, NOTHING, "sending {len} bytes again");

    let sent = w.transport.take_sent();
    assert_eq!(sent[&number].len(), 2);
    for copy in &sent[&number] {
        let got = rt.block_on(device.decrypt(w.b, copy)).unwrap();
        assert!(got.ends_with(&content(len)), "the device got the reply");
    }

    let (change, seen) =
        watch(|| rt.block_on(w.processor.status_update(&w.carrier, w.b, id, Status::Read)));
    change.unwrap();
    assert_eq!(seen, NOTHING, "a read report");
    assert!(w.endpoint.statuses.lock().unwrap().contains(&Status::Read));

    w.clock.advance(Duration::from_secs(31 * 24 * 3600));
    let (swept, seen) = watch(|| rt.block_on(w.processor.sweep(&w.operator)));
    swept.unwrap();
    assert_eq!(seen, NOTHING, "the sweep past retention");

    let ((), seen) = watch(|| drop(w));
    assert_eq!(seen, NOTHING, "the processor dropped");
    assert_eq!(
        KEYS_LEARNT.load(Ordering::Acquire),
        3,
        "the root and two KEKs"
    );
    assert_eq!(
        FREED_KEYS.load(Ordering::Relaxed),
        0,
        "keys left in freed blocks"
    );
}
