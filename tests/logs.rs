//! What reaches a host's `log` logger: the Signal library's records carry
//! key material, so the processor will not start while the logger keeps
//! them, and with its target off nothing that is logged names a consumer
//! or carries a key. A process of its own: the logger is global.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::await_holding_lock,
    reason = "tests assert by panicking; they take the global logger in turn"
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use custodian::ids::{BusinessId, PhoneNumber};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::processor::{Host, Policies, Processor, ProcessorError};
use custodian::signal::{
    LIBRARY_LOG_TARGET, MessageKind, Sessions, SignalConfig, SignalError, library_logs_exposed,
};
use custodian::store::{MemoryStore, PeerId};
use custodian::testing::{ConsumerDevice, Faults, SimBusiness, SimNetwork};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::transport::StaticAuthorizer;
use custodian::vault::Vault;
use custodian::visibility::MemoryAuditSink;

const T0: u64 = 1_767_225_600_000;

/// A host's logger: keeps every record its filter lets through, as
/// `env_logger` or `tracing-subscriber`'s `log` bridge would.
struct Capture {
    /// Whether the filter turns the Signal library's target off.
    library_off: AtomicBool,
    records: Mutex<Vec<(String, String)>>,
}

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        !(self.library_off.load(Ordering::SeqCst)
            && metadata.target().starts_with(LIBRARY_LOG_TARGET))
    }

    fn log(&self, record: &log::Record<'_>) {
        // Every record, kept or not, to see what a filter would be given.
        self.records.lock().unwrap().push((
            record.target().to_owned(),
            format!("{} {}", record.level(), record.args()),
        ));
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture {
    library_off: AtomicBool::new(false),
    records: Mutex::new(Vec::new()),
};

/// The logger installed, its filter set; one test at a time.
fn logger(library_off: bool) -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    CAPTURE.library_off.store(library_off, Ordering::SeqCst);
    CAPTURE.records.lock().unwrap().clear();
    guard
}

fn host() -> Host {
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    Host {
        storage: Arc::new(MemoryStore::new()),
        key_provider: Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        transport: Arc::new(SimNetwork::new(clock.clone(), Faults::none(), 1).unwrap()),
        business: SimBusiness::new(clock.clone(), Faults::none(), 2).unwrap(),
        authorizer: Arc::new(StaticAuthorizer::new()),
        clock: Arc::new(clock),
        audit: Arc::new(MemoryAuditSink::new()),
    }
}

/// A logger that keeps the library's records stops the processor from
/// starting, with a message naming the target to turn off; turned off, or
/// the host's explicit word, it starts.
#[test]
fn the_processor_does_not_start_while_the_library_logs_are_kept() {
    let _logger = logger(false);
    assert!(library_logs_exposed());
    match Processor::new(host(), Policies::default()) {
        Err(ProcessorError::Config(why)) => assert!(why.contains(LIBRARY_LOG_TARGET), "{why}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Warn and above kept: still exposed (the forging MAC is a warning).
    log::set_max_level(log::LevelFilter::Warn);
    assert!(library_logs_exposed());
    // Errors only: the MAC key's bytes are logged at error level.
    log::set_max_level(log::LevelFilter::Error);
    assert!(library_logs_exposed());
    log::set_max_level(log::LevelFilter::Off);
    assert!(!library_logs_exposed());
    log::set_max_level(log::LevelFilter::Trace);

    let allowed = Policies {
        signal: SignalConfig {
            allow_library_logs: true,
            ..SignalConfig::default()
        },
        ..Policies::default()
    };
    assert!(Processor::new(host(), allowed).is_ok());

    CAPTURE.library_off.store(true, Ordering::SeqCst);
    assert!(!library_logs_exposed());
    assert!(Processor::new(host(), Policies::default()).is_ok());
}

/// With the library's target off, as the processor demands, no record a
/// host keeps carries key material or identifies a consumer, through a
/// tampered message (whose MAC the library logs) and a redelivery (whose
/// address it logs); and the library's own records name no consumer either.
#[tokio::test]
async fn with_the_library_target_off_no_kept_record_carries_a_key_or_a_consumer() {
    let _logger = logger(true);
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let keys = Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        store.clone(),
    ));
    let vault = Arc::new(Vault::new(
        keys.clone(),
        Arc::new(clock.clone()),
        EpochLength::DEFAULT,
    ));
    let sessions = Sessions::new(vault, store, SignalConfig::default()).unwrap();
    let business = BusinessId::new(555).unwrap();
    let expiry = clock.now().saturating_add(Duration::from_secs(24 * 3600));
    let number: PhoneNumber = "+447700900002".parse().unwrap();
    let peer = PeerId {
        phone: keys.phone_hash(business, &number).await.unwrap(),
        device: 0,
    };
    let mut phone = ConsumerDevice::new(0);
    let published = sessions.publish(business).await.unwrap();
    phone
        .start_session(business, &published.bundle(Some(0)))
        .await
        .unwrap();
    let first = phone.encrypt(business, b"hello").await.unwrap();
    sessions
        .decrypt(business, peer, &first, expiry)
        .await
        .unwrap();
    let reply = sessions
        .encrypt(business, peer, b"welcome", expiry)
        .await
        .unwrap();
    phone.decrypt(business, &reply).await.unwrap();

    let good = phone.encrypt(business, b"Pay 100 EUR now.").await.unwrap();
    assert_eq!(good.kind, MessageKind::FollowUp);
    let mut tampered = good.clone();
    let at = tampered.bytes.len() - 8 - 4;
    tampered.bytes[at] ^= 0x08;
    let refused = sessions.decrypt(business, peer, &tampered, expiry).await;
    assert!(
        matches!(
            refused,
            Err(SignalError::Undecryptable("MAC verification failed"))
        ),
        "{refused:?}"
    );
    sessions
        .decrypt(business, peer, &good, expiry)
        .await
        .unwrap();
    let redelivered = sessions.decrypt(business, peer, &good, expiry).await;
    assert!(redelivered.is_err());

    let records = std::mem::take(&mut *CAPTURE.records.lock().unwrap());
    let hash = hex::encode(peer.phone.as_bytes());
    let identity = hex::encode(&phone.identity().to_bytes()[1..]);
    let mut library_secrets = 0;
    for (target, text) in &records {
        assert!(!text.contains(&hash), "{target}: {text}");
        assert!(!text.contains("7700900002"), "{target}: {text}");
        let secret = text.contains("Mac") || text.contains(&identity);
        if target.starts_with(LIBRARY_LOG_TARGET) {
            library_secrets += usize::from(secret);
        } else {
            assert!(!secret, "a record the filter keeps: {target}: {text}");
        }
    }
    // The tampered message did reach the library's logging: the filter is
    // what kept its MAC out.
    assert!(library_secrets > 0, "{records:?}");
}
