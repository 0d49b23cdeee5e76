//! What the crate stores reveals no private key; damaged stored state is
//! reported, never taken for none.

use std::sync::Arc;

use wacore_libsignal::protocol::PreKeyRecord;

use super::*;
use crate::ids::PhoneNumber;
use crate::keys::tests::spellings;
use crate::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use crate::store::MemoryStore;
use crate::testing::ConsumerDevice;
use crate::time::ManualClock;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_private_key_or_session_secret_is_stored_in_clear() {
    let (sessions, keys, store, business, expiry) = fixture().await;

    let published = sessions.publish(business).await.unwrap();
    let (mut phone, peer) = consumer(&keys, business, &published).await;
    let number: PhoneNumber = NUMBER.parse().unwrap();
    round_trips(&sessions, &mut phone, business, peer, expiry).await;

    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let account = sessions.account(business).await.unwrap();
    secrets.push(account.identity.private_key().serialize().to_vec());
    for signed in &account.signed {
        secrets.push(signed.private_key().unwrap().serialize().to_vec());
    }
    for prekey in &published.one_time_prekeys {
        let id = KeyId {
            business,
            kind: KeyKind::SignalPreKey,
            id: u64::from(prekey.id),
        };
        if let Some(bytes) = keys.load_secret(id).await.unwrap() {
            secrets.push(
                PreKeyRecord::deserialize(&bytes)
                    .unwrap()
                    .private_key()
                    .unwrap()
                    .serialize()
                    .to_vec(),
            );
        }
    }
    assert!(secrets.len() > 50);
    // The live session record: any 16-byte window of it would be a leak of
    // its root, chain or message keys.
    let session = sessions
        .cache
        .take(&(business, peer), sessions.shreds())
        .and_then(|p| p.session)
        .unwrap();
    let mut record = Vec::new();
    session.serialize_into_for_store(&mut record, &[0; 16]);

    let stored = store.dump();
    assert!(stored.len() > 50);
    for blob in &stored {
        for secret in &secrets {
            assert!(!contains(blob, secret), "a private key is stored in clear");
        }
        for window in record
            .chunks(16)
            .filter(|w| w.len() == 16 && w.iter().any(|&b| b != 0))
        {
            assert!(!contains(blob, window), "session state is stored in clear");
        }
        assert!(
            !contains(blob, number.expose().as_bytes()),
            "a phone number is stored in clear"
        );
    }
}

/// The holders of a business's Signal keys and of a device's session (the
/// sessions, the account, a cached peer, a decrypted message, the keys
/// published, a ciphertext) print no byte of a private key, of the
/// session's root, chain or ratchet keys, or of the plaintext.
#[tokio::test]
async fn signal_state_holders_print_no_secret() {
    let (sessions, keys, _, business, expiry) = fixture().await;
    let published = sessions.publish(business).await.unwrap();
    let (mut phone, peer) = consumer(&keys, business, &published).await;
    let first = phone.encrypt(business, b"hello").await.unwrap();
    let decrypted = sessions
        .decrypt(business, peer, &first, expiry)
        .await
        .unwrap();
    round_trips(&sessions, &mut phone, business, peer, expiry).await;

    let account = sessions.account(business).await.unwrap();
    let mut secrets = vec![account.identity.private_key().serialize().to_vec()];
    for signed in &account.signed {
        secrets.push(signed.private_key().unwrap().serialize().to_vec());
    }
    let cached = sessions
        .cache
        .take(&(business, peer), sessions.shreds())
        .unwrap();
    let state = cached.session.as_ref().unwrap().session_state().unwrap();
    secrets.push(state.root_key().unwrap().key().to_vec());
    secrets.push(state.get_sender_chain_key().unwrap().key().to_vec());
    let ratchet = state.sender_ratchet_private_key().unwrap();
    secrets.push(ratchet.serialize().to_vec());
    secrets.push(b"hello".to_vec());

    let printed =
        format!("{sessions:?} {account:?} {cached:?} {decrypted:?} {published:?} {first:?}");
    for spelling in secrets.iter().flat_map(|s| spellings(s)) {
        assert!(!printed.contains(&spelling), "prints {spelling}: {printed}");
    }
}

/// Three turns of a conversation: the consumer writes, the business
/// decrypts and answers, the consumer decrypts (a ratchet step each way).
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn round_trips(
    sessions: &Sessions,
    phone: &mut ConsumerDevice,
    business: BusinessId,
    peer: PeerId,
    expiry: Timestamp,
) {
    for i in 0..3 {
        let m = phone
            .encrypt(business, format!("in {i}").as_bytes())
            .await
            .unwrap();
        sessions.decrypt(business, peer, &m, expiry).await.unwrap();
        let out = sessions
            .encrypt(business, peer, b"out", expiry)
            .await
            .unwrap();
        phone.decrypt(business, &out).await.unwrap();
    }
}

/// Sessions over an in-memory store, for business 9, and an expiry a day on.
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn fixture() -> (
    Sessions,
    Arc<KeyManager>,
    Arc<MemoryStore>,
    BusinessId,
    Timestamp,
) {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let keys = Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
        store.clone(),
    ));
    let vault = Arc::new(Vault::new(
        keys.clone(),
        Arc::new(clock.clone()),
        EpochLength::DEFAULT,
    ));
    let sessions = Sessions::new(vault, store.clone(), SignalConfig::default()).unwrap();
    let expiry = Timestamp::from_millis(1_767_225_600_000 + 86_400_000);
    (sessions, keys, store, BusinessId::new(9).unwrap(), expiry)
}

/// The consumer of [`consumer`].
const NUMBER: &str = "+447700900123";

/// A consumer's device with a session started from `published` (its first
/// one-time prekey), and the address the business knows it by.
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn consumer(
    keys: &KeyManager,
    business: BusinessId,
    published: &PublishedKeys,
) -> (ConsumerDevice, PeerId) {
    let mut phone = ConsumerDevice::new(0);
    phone
        .start_session(business, &published.bundle(Some(0)))
        .await
        .unwrap();
    let number: PhoneNumber = NUMBER.parse().unwrap();
    let peer = PeerId {
        phone: keys.phone_hash(business, &number).await.unwrap(),
        device: 0,
    };
    (phone, peer)
}

/// `first` from `peer`, decrypted and staged, nothing committed.
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn staged<'s>(
    sessions: &'s Sessions,
    business: BusinessId,
    peer: PeerId,
    first: &Ciphertext,
    expiry: Timestamp,
) -> super::decrypt::StagedDecrypt<'s> {
    let parsed = Parsed::new(first, business).unwrap();
    sessions
        .decrypt_staged(business, peer, &parsed, expiry)
        .await
        .unwrap()
}

/// What `future` gives if it completes in one poll.
fn in_one_poll<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// The first messages of devices of `numbers`, each starting its session
/// from `bundle` (its text its number), with their peers.
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn first_contacts<const N: usize>(
    keys: &KeyManager,
    business: BusinessId,
    bundle: &PreKeyBundle,
    numbers: [&str; N],
) -> (Vec<PeerId>, Vec<Ciphertext>) {
    let mut peers = Vec::new();
    let mut firsts = Vec::new();
    for n in numbers {
        let mut device = ConsumerDevice::new(0);
        device.start_session(business, bundle).await.unwrap();
        firsts.push(device.encrypt(business, n.as_bytes()).await.unwrap());
        let number: PhoneNumber = n.parse().unwrap();
        peers.push(PeerId {
            phone: keys.phone_hash(business, &number).await.unwrap(),
            device: 0,
        });
    }
    (peers, firsts)
}

/// Two devices (two consumers) start sessions from the same published
/// bundle, so their first messages name the same one-time prekey, and both
/// decrypt before either commits: only the first commit may use it. The
/// second is refused as one on a key gone already is (its device is asked
/// for it again over a new session).
#[tokio::test]
async fn a_one_time_prekey_decrypts_one_first_message_even_when_two_race() {
    let (sessions, keys, _, business, expiry) = fixture().await;
    let bundle = sessions.publish(business).await.unwrap().bundle(Some(0));
    let (peers, firsts) =
        first_contacts(&keys, business, &bundle, ["+447700900301", "+447700900302"]).await;
    let a = staged(&sessions, business, peers[0], &firsts[0], expiry).await;
    // The in-memory store never makes a task wait, so staging completes in
    // one poll unless the two addresses share a lock stripe (1 in 1,024):
    // then they are serialised and cannot race at all.
    let second = Parsed::new(&firsts[1], business).unwrap();
    let Some(b) = in_one_poll(sessions.decrypt_staged(business, peers[1], &second, expiry)) else {
        return;
    };
    let b = b.unwrap();
    assert_eq!(*a.decrypted().plaintext, b"+447700900301");
    assert!(a.decrypted().first_contact);
    a.commit(Batch::new()).await.unwrap();
    let refused = b.commit(Batch::new()).await;
    assert!(
        matches!(refused, Err(SignalError::UnknownPreKey("one-time prekey"))),
        "{refused:?}"
    );
    // The loser's state was not stored: it has no session.
    assert!(!sessions.has_session(business, peers[1]).await.unwrap());
    assert!(sessions.has_session(business, peers[0]).await.unwrap());
}

/// The network hands the newest one-time prekey (id X, key K1) to two
/// devices: the first's first message is staged, the second's commits
/// (consuming X), and the pool is refilled by the network's count, which
/// makes ids again after the newest left. The staged message is then
/// refused, and any new key under X stays stored. Before, the refill made
/// X again with a new key K2, and the staged commit's `ConsumeKey(X)`
/// deleted K2 unused and stored a session made with K1, its second.
#[tokio::test]
async fn a_one_time_prekey_id_made_again_while_a_first_message_is_staged_is_not_used_twice() {
    let (sessions, keys, _, business, expiry) = fixture().await;
    let published = sessions.publish(business).await.unwrap();
    let bundle = published.bundle(Some(published.one_time_prekeys.len() - 1));
    let x = bundle.one_time_prekey.unwrap();
    let (peers, firsts) =
        first_contacts(&keys, business, &bundle, ["+447700900501", "+447700900502"]).await;
    let staged = staged(&sessions, business, peers[0], &firsts[0], expiry).await;
    // Staging completes in one poll unless the two addresses share a lock
    // stripe (1 in 1,024): then they cannot race at all.
    let second = Parsed::new(&firsts[1], business).unwrap();
    let Some(committed) = in_one_poll(async {
        let staged = sessions.decrypt_staged(business, peers[1], &second, expiry);
        staged.await.unwrap().commit(Batch::new()).await
    }) else {
        return;
    };
    assert_eq!(*committed.unwrap().plaintext, b"+447700900502");

    sessions.maintain(business, Some(0)).await.unwrap();
    let refilled = sessions.publish(business).await.unwrap().one_time_prekeys;
    let again = refilled.iter().find(|k| k.id == x.id).copied();
    assert!(again.is_none_or(|k| k.public_key != x.public_key));

    let late = staged.commit(Batch::new()).await;
    assert!(
        matches!(late, Err(SignalError::UnknownPreKey("one-time prekey"))),
        "{late:?}"
    );
    let stored = sessions.publish(business).await.unwrap().one_time_prekeys;
    assert!(again.is_none_or(|k| stored.contains(&k)), "deleted unused");
    assert!(!sessions.has_session(business, peers[0]).await.unwrap());
}

/// An instance superseded on its store (another took it over) while a
/// first message is staged: the commit fails as `Superseded` and consumes
/// nothing, as the one-time prekey's `ConsumeKey` is in the fenced batch
/// that stores the session.
#[tokio::test]
async fn a_superseded_instances_staged_first_message_consumes_no_prekey() {
    let (sessions, keys, store, business, expiry) = fixture().await;
    let published = sessions.publish(business).await.unwrap();
    let (mut phone, peer) = consumer(&keys, business, &published).await;
    let first = phone.encrypt(business, b"hello").await.unwrap();
    let parsed = Parsed::new(&first, business).unwrap();
    let staged = sessions
        .decrypt_staged(business, peer, &parsed, expiry)
        .await
        .unwrap();
    store.take_over(WriterId::random()).await.unwrap();
    let got = staged.commit(Batch::new()).await;
    assert!(
        matches!(&got, Err(SignalError::Storage(StorageFailure::Store(e)))
            if matches!(**e, StoreError::Superseded)),
        "{got:?}"
    );
    let prekey = KeyId {
        business,
        kind: KeyKind::SignalPreKey,
        id: u64::from(published.one_time_prekeys[0].id),
    };
    assert!(keys.load_secret(prekey).await.unwrap().is_some());
    assert_eq!(store.peer(business, peer).await.unwrap(), None);
}

/// Until the business replies, every message of the consumer is a
/// first-contact message repeating the session's setup; only the first one
/// established the session.
#[tokio::test]
async fn only_the_message_that_starts_a_session_is_first_contact() {
    let (sessions, keys, _, business, expiry) = fixture().await;
    let bundle = sessions.publish(business).await.unwrap().bundle(Some(0));
    let mut device = ConsumerDevice::new(0);
    device.start_session(business, &bundle).await.unwrap();
    let number: PhoneNumber = "+447700900303".parse().unwrap();
    let peer = PeerId {
        phone: keys.phone_hash(business, &number).await.unwrap(),
        device: 0,
    };
    let first = device.encrypt(business, b"one").await.unwrap();
    let second = device.encrypt(business, b"two").await.unwrap();
    assert_eq!(second.kind, MessageKind::FirstContact);
    let d1 = sessions
        .decrypt(business, peer, &first, expiry)
        .await
        .unwrap();
    let d2 = sessions
        .decrypt(business, peer, &second, expiry)
        .await
        .unwrap();
    assert!(d1.first_contact);
    assert!(!d2.first_contact);
}

/// A stored peer record whose header was damaged (an expiry or an epoch no
/// seal writes) is reported corrupt: not taken for no session, after which
/// a new identity at the address would pass as first contact and the
/// record be overwritten.
#[tokio::test]
async fn a_damaged_peer_record_header_is_corrupt_not_absent() {
    for (at, value) in [(39usize, 1u64), (31, u64::MAX)] {
        let (sessions, keys, store, business, expiry) = fixture().await;
        let published = sessions.publish(business).await.unwrap();
        let (mut phone, peer) = consumer(&keys, business, &published).await;
        let first = phone.encrypt(business, b"hello").await.unwrap();
        sessions
            .decrypt(business, peer, &first, expiry)
            .await
            .unwrap();

        let mut sealed = store.peer(business, peer).await.unwrap().unwrap();
        sealed[at..at + 8].copy_from_slice(&value.to_be_bytes());
        let mut batch = Batch::new();
        batch.push(Op::PutPeer {
            business,
            peer,
            sealed: sealed.clone(),
        });
        store.commit(batch).await.unwrap();
        sessions.clear_cache();

        let has = sessions.has_session(business, peer).await;
        assert!(
            matches!(
                has,
                Err(SignalError::Storage(StorageFailure::Open(
                    OpenError::Malformed(_)
                )))
            ),
            "byte {at}: {has:?}"
        );
        let bundle = sessions.publish(business).await.unwrap().bundle(Some(1));
        let mut impostor = ConsumerDevice::new(0);
        impostor.start_session(business, &bundle).await.unwrap();
        let m = impostor.encrypt(business, b"new identity").await.unwrap();
        assert!(sessions.decrypt(business, peer, &m, expiry).await.is_err());
        assert_eq!(store.peer(business, peer).await.unwrap(), Some(sealed));
    }
}

/// A store that copies one consumer's peer record over another's row cannot
/// make the processor use the first consumer's session for the second: the
/// copy is corrupt, nothing is encrypted under it, and nothing changes.
#[tokio::test]
async fn a_peer_record_copied_to_another_device_is_refused() {
    let (sessions, keys, store, business, expiry) = fixture().await;
    let published = sessions.publish(business).await.unwrap();
    let (mut phone, peer) = consumer(&keys, business, &published).await;
    let first = phone.encrypt(business, b"hello").await.unwrap();
    sessions
        .decrypt(business, peer, &first, expiry)
        .await
        .unwrap();
    let sealed = store.peer(business, peer).await.unwrap().unwrap();
    let other_number: PhoneNumber = "+447700900404".parse().unwrap();
    let other_phone = keys.phone_hash(business, &other_number).await.unwrap();
    for other in [
        PeerId { device: 1, ..peer },
        PeerId {
            phone: other_phone,
            ..peer
        },
    ] {
        let mut batch = Batch::new();
        batch.push(Op::PutPeer {
            business,
            peer: other,
            sealed: sealed.clone(),
        });
        store.commit(batch).await.unwrap();
        let sent = sessions
            .encrypt(business, other, b"for the other", expiry)
            .await;
        assert!(
            matches!(
                sent,
                Err(SignalError::Storage(StorageFailure::Corrupt(
                    "record of another device"
                )))
            ),
            "{other:?}: {sent:?}"
        );
        assert_eq!(
            store.peer(business, other).await.unwrap(),
            Some(sealed.clone())
        );
    }
    // The original row still opens and its session still works.
    let reply = sessions
        .encrypt(business, peer, b"reply", expiry)
        .await
        .unwrap();
    phone.decrypt(business, &reply).await.unwrap();
}

/// Write real Signal messages and peer records, and damaged copies, into the
/// `signal_message` and `peer_record` fuzz corpora, each named by what its
/// check makes of it. Keys are fresh on every run, so the files are
/// committed bytes, not regenerated: the replay tests in `crate::fuzzing`
/// prove they still parse. Run by hand:
/// `cargo test --all-features --lib write_signal_corpora -- --ignored`.
#[tokio::test]
#[ignore = "rewrites fuzz/corpus; run by hand"]
async fn write_signal_corpora() {
    use crate::fuzzing::{
        PEER_INCARNATION, fixture_peer, peer_record, signal_message, spell_peer_record,
    };

    let (sessions, _, _, _, expiry) = fixture().await;
    let business = BusinessId::new(4242).unwrap();
    let peer = fixture_peer();
    let published = sessions.publish(business).await.unwrap();
    let mut phone = ConsumerDevice::new(peer.device);
    phone
        .start_session(business, &published.bundle(Some(0)))
        .await
        .unwrap();
    let mut real: Vec<(String, Vec<u8>)> = Vec::new();
    // Until the business replies, the device's messages set the session up.
    for i in 1..=2 {
        let m = phone
            .encrypt(business, format!("first message {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(m.kind, MessageKind::FirstContact);
        sessions.decrypt(business, peer, &m, expiry).await.unwrap();
        real.push((format!("first-contact--real-{i}"), m.bytes));
    }
    let reply = sessions
        .encrypt(business, peer, b"a reply from the business", expiry)
        .await
        .unwrap();
    phone.decrypt(business, &reply).await.unwrap();
    assert_eq!(reply.kind, MessageKind::FollowUp);
    real.push(("follow-up--real-business-reply".to_owned(), reply.bytes));
    for i in 1..=2 {
        let m = phone
            .encrypt(business, format!("follow-up {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(m.kind, MessageKind::FollowUp);
        sessions.decrypt(business, peer, &m, expiry).await.unwrap();
        real.push((format!("follow-up--real-{i}"), m.bytes));
    }

    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let damage = |files: &mut Vec<(String, Vec<u8>)>, base: &str, bytes: Vec<u8>, name: &str| {
        files.push((format!("{base}-{name}"), bytes));
    };
    for (name, bytes) in &real {
        let base = name.replace("--", "-");
        let flip = |at: usize| {
            let mut v = bytes.clone();
            v[at] ^= 0x01;
            v
        };
        let (version, middle, last) = (flip(0), flip(bytes.len() / 2), flip(bytes.len() - 1));
        damage(&mut files, &base, version, "flipped-version");
        damage(&mut files, &base, middle, "flipped-middle");
        damage(&mut files, &base, last, "flipped-last");
        damage(
            &mut files,
            &base,
            bytes[..bytes.len() / 2].to_vec(),
            "truncated-half",
        );
        damage(
            &mut files,
            &base,
            bytes[..bytes.len() - 1].to_vec(),
            "truncated-last",
        );
        let mut longer = bytes.clone();
        longer.push(0);
        damage(&mut files, &base, longer, "trailing-zero");
        // The same key, another encoding: the base key's top bit (outside
        // the MAC), or the ratchet key's.
        let key = match PreKeySignalMessage::try_from(bytes.as_slice()) {
            Ok(m) => m.base_key().serialize(),
            Err(_) => SignalMessage::try_from(bytes.as_slice())
                .unwrap()
                .sender_ratchet_key()
                .serialize(),
        };
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        let mut top = bytes.clone();
        top[at + 32] ^= 0x80;
        damage(&mut files, &base, top, "key-top-bit");
    }
    files.push(("empty".to_owned(), Vec::new()));
    files.push(("version-only".to_owned(), vec![0x33]));
    files.push(("garbage-ff".to_owned(), vec![0xff; 64]));
    files.push(("garbage-zero".to_owned(), vec![0; 64]));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/signal_message");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in &real {
        let expected = name.split_once("--").unwrap().0;
        assert_eq!(signal_message(bytes).spelled(), expected, "{name}");
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (name, bytes) in files {
        let outcome = signal_message(&bytes).spelled();
        std::fs::write(dir.join(format!("{outcome}--{name}")), bytes).unwrap();
    }

    // Peer records: the device's real one, and variants of it.
    let mut full = sessions
        .cache
        .take(&(business, peer), sessions.shreds())
        .unwrap();
    assert!(full.session.is_some() && full.identity.is_some());
    let with_both = full.encode(&PEER_INCARNATION);
    let identity = full.identity.take();
    let session_only = full.encode(&PEER_INCARNATION);
    let other_incarnation = {
        full.identity = identity;
        full.encode(&[0; 16])
    };
    full.session = None;
    let identity_only = full.encode(&PEER_INCARNATION);
    full.identity = None;
    let empty = full.encode(&PEER_INCARNATION);
    // The trailer of a record of the fixture device: its address, `flags`
    // and the version.
    let trailer = |flags: u8| {
        let mut t = peer.phone.as_bytes().to_vec();
        t.extend_from_slice(&peer.device.to_be_bytes());
        t.extend_from_slice(&[flags, 2]);
        t
    };
    let mut records: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "real-session-identity",
            with_both.clone(),
            Some("session+identity"),
        ),
        ("real-session", session_only, Some("session")),
        (
            "real-other-incarnation",
            other_incarnation,
            Some("session+identity"),
        ),
        ("real-identity", identity_only.clone(), Some("identity")),
        ("real-empty", empty, Some("empty")),
        ("empty-bytes", Vec::new(), Some("empty-record")),
        ("version-only", vec![2], Some("truncated-flags")),
        ("version-1", vec![0, 1], Some("unknown-record-version")),
        ("unknown-flag", vec![4, 2], Some("unknown-flags")),
        ("device-cut-short", vec![0, 0, 2], Some("truncated-device")),
        (
            "identity-flag-without-key",
            trailer(1),
            Some("truncated-identity"),
        ),
        ("session-flag-without-session", trailer(2), None),
    ];
    let mut elsewhere = Peer::empty(PeerId {
        device: peer.device + 1,
        ..peer
    });
    elsewhere.identity = identity;
    records.push((
        "another-device",
        elsewhere.encode(&PEER_INCARNATION),
        Some("record-of-another-device"),
    ));
    let mut before_trailer = identity_only.clone();
    before_trailer.insert(0, 0);
    records.push((
        "byte-before-identity",
        before_trailer,
        Some("bytes-before-the-trailer"),
    ));
    let mut bad_key = identity_only.clone();
    bad_key[0] = 0x06;
    records.push(("identity-bad-key-type", bad_key, Some("bad-identity-key")));
    let n = with_both.len();
    for (name, at) in [
        ("flipped-session-start", 0),
        ("flipped-session-middle", (n - 55) / 2),
    ] {
        let mut v = with_both.clone();
        v[at] ^= 0x01;
        records.push((name, v, None));
    }
    records.push((
        "truncated-session",
        with_both[(n - 55) / 2..].to_vec(),
        None,
    ));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/peer_record");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes, expected) in records {
        let outcome = spell_peer_record(peer_record(&bytes));
        if let Some(expected) = expected {
            assert_eq!(outcome, expected, "{name}");
        }
        std::fs::write(dir.join(format!("{outcome}--{name}")), bytes).unwrap();
    }
}

/// A stored one-time prekey whose record does not decode, or that the
/// library's decoder accepts but that has no usable key pair (no fields at
/// all; a private key of 31 bytes) or whose halves are of two pairs, is
/// the business's damaged state, not the consumer's malformed message:
/// reported as corrupt storage (which a transport retries), never as an
/// invalid message (which it may drop for good), and no session is
/// started. The library's decoder defers every field to its accessors, so
/// such a record used to get through the store and fail the first message
/// naming it.
#[tokio::test]
async fn a_stored_one_time_prekey_without_a_sound_key_pair_is_corrupt_state() {
    use wacore_libsignal::protocol::{KeyPair, PrivateKey};

    let private = PrivateKey::deserialize(&[0x33; 32]).unwrap();
    let other = PrivateKey::deserialize(&[0x44; 32]).unwrap();
    for name in [
        "not a record",
        "no fields",
        "31-byte private key",
        "halves of two pairs",
    ] {
        let (sessions, keys, store, business, expiry) = fixture().await;
        let published = sessions.publish(business).await.unwrap();
        let (mut phone, peer) = consumer(&keys, business, &published).await;
        let first = phone.encrypt(business, b"hello").await.unwrap();
        let prekey = published.one_time_prekeys[0].id;
        let id = KeyId {
            business,
            kind: KeyKind::SignalPreKey,
            id: u64::from(prekey),
        };
        let bytes = match name {
            "not a record" => b"\xff\xff\xff not a prekey record".to_vec(),
            "no fields" => Vec::new(),
            "31-byte private key" => {
                // id (field 1), then a 31-byte private key (field 3).
                let mut v = vec![0x08];
                let mut rest = prekey;
                while rest >= 0x80 {
                    v.push(u8::try_from(rest & 0x7f).unwrap() | 0x80);
                    rest >>= 7;
                }
                v.push(u8::try_from(rest).unwrap());
                v.extend([0x1a, 31]);
                v.extend([0x33; 31]);
                v
            }
            _ => PreKeyRecord::new(
                prekey.into(),
                &KeyPair::new(other.public_key().unwrap(), private.clone()),
            )
            .serialize()
            .unwrap(),
        };
        let deleted = crate::store::KeyStore::delete_keys(&*store, &[id]).await;
        assert_eq!(deleted.unwrap(), 1, "{name}");
        keys.store_secret(id, &bytes).await.unwrap();
        sessions.clear_cache();
        let got = sessions.decrypt(business, peer, &first, expiry).await;
        assert!(
            matches!(
                got,
                Err(SignalError::Storage(StorageFailure::Corrupt(
                    "one-time prekey"
                )))
            ),
            "{name}: reported as {got:?}"
        );
        assert!(
            !sessions.has_session(business, peer).await.unwrap(),
            "{name}"
        );
    }
}

/// A stored identity record with a registration id outside `1..=0x3FFF` or
/// whose public key is not its private key's is refused when the account
/// loads, as corrupt state naming the record; a signed prekey without a
/// private key, not signed by the identity or under an id out of range is
/// never used nor published. They used to load: the business published a
/// key it could not use.
#[tokio::test]
async fn stored_account_keys_that_decode_but_are_unsound_are_refused_on_load() {
    use wacore_libsignal::protocol::{
        GenericSignedPreKey, IdentityKey, IdentityKeyPair, KeyPair, PrivateKey, SignedPreKeyRecord,
        Timestamp as SignalTimestamp,
    };

    let private = PrivateKey::deserialize(&[0x11; 32]).unwrap();
    let pair = IdentityKeyPair::try_from(private.clone()).unwrap();
    let other = PrivateKey::deserialize(&[0x22; 32]).unwrap();
    let halves = IdentityKeyPair::new(IdentityKey::new(other.public_key().unwrap()), private);
    let prekey = KeyPair::new(other.public_key().unwrap(), other.clone());
    let signature = pair
        .private_key()
        .calculate_signature(&prekey.public_key.serialize(), &mut crate::rng::OsRng)
        .unwrap();
    let signed_with = |signature: &[u8]| {
        SignedPreKeyRecord::new(
            9.into(),
            SignalTimestamp::from_epoch_millis(1),
            &prekey,
            signature,
        )
        .serialize()
        .unwrap()
    };
    // The sound record with its private key (field 3) left out.
    let mut without_private = Vec::new();
    for (field, bytes) in [
        (2_u8, prekey.public_key.public_key_bytes().to_vec()),
        (4, signature.to_vec()),
    ] {
        without_private.extend([field << 3 | 2, u8::try_from(bytes.len()).unwrap()]);
        without_private.extend(bytes);
    }
    without_private.extend([0x08, 9, 0x29]);
    without_private.extend(1_u64.to_le_bytes());
    assert!(SignedPreKeyRecord::deserialize(&without_private).is_ok());
    // An unsound identity is refused whole: nothing can stand in for it.
    let identities: [(&str, Vec<u8>, &str); 3] = [
        (
            "registration id 0",
            account::encode_identity(0, &pair).to_vec(),
            "identity record",
        ),
        (
            "registration id past 14 bits",
            account::encode_identity(0x4000, &pair).to_vec(),
            "identity record",
        ),
        (
            "halves of two pairs",
            account::encode_identity(5, &halves).to_vec(),
            "identity key pair",
        ),
    ];
    for (name, identity, reason) in identities {
        let (sessions, keys, _, business, _) = fixture().await;
        let key = |kind, id| KeyId { business, kind, id };
        keys.store_secret(key(KeyKind::SignalIdentity, 0), &identity)
            .await
            .unwrap();
        // A sound signed prekey, so that only the identity is at fault.
        keys.store_secret(
            key(KeyKind::SignalSignedPreKey, 9),
            &signed_with(&signature),
        )
        .await
        .unwrap();
        let got = sessions.publish(business).await;
        assert!(
            matches!(
                &got,
                Err(SignalError::Storage(StorageFailure::Corrupt(r))) if *r == reason
            ),
            "{name}: {:?}",
            got.map(|_| "published")
        );
    }
    // An unsound signed prekey is never used nor published: the business
    // makes a new one, and its upkeep deletes the unsound one. So is one
    // stored under an id no rotation makes (whose age the ids could not
    // tell: the rotation's arithmetic on them overflowed).
    let above = u64::from(account::MAX_PREKEY_ID) + 1;
    let signed_cases: [(&str, u64, Vec<u8>); 3] = [
        ("signed prekey without a private key", 9, without_private),
        (
            "signed prekey not signed by the identity",
            9,
            signed_with(&[0x5a; 64]),
        ),
        ("signed prekey under an id out of range", above, {
            SignedPreKeyRecord::new(
                u32::try_from(above).unwrap().into(),
                SignalTimestamp::from_epoch_millis(1),
                &prekey,
                &signature,
            )
            .serialize()
            .unwrap()
        }),
    ];
    for (name, id, record) in signed_cases {
        let (sessions, keys, _, business, _) = fixture().await;
        let key = |kind, id| KeyId { business, kind, id };
        keys.store_secret(
            key(KeyKind::SignalIdentity, 0),
            &account::encode_identity(5, &pair),
        )
        .await
        .unwrap();
        keys.store_secret(key(KeyKind::SignalSignedPreKey, id), &record)
            .await
            .unwrap();
        let published = sessions.publish(business).await.unwrap();
        assert_ne!(u64::from(published.signed_prekey.id), id, "{name}");
        assert_ne!(
            published.signed_prekey.public_key,
            prekey.public_key.serialize().as_ref(),
            "{name}"
        );
        // The publication's upkeep (its pool was empty) deleted it.
        assert!(
            keys.load_secret(key(KeyKind::SignalSignedPreKey, id))
                .await
                .unwrap()
                .is_none()
        );
    }
    // The sound records load and publish.
    let (sessions, keys, _, business, _) = fixture().await;
    let key = |kind, id| KeyId { business, kind, id };
    let identity = account::encode_identity(5, &pair);
    keys.store_secret(key(KeyKind::SignalIdentity, 0), &identity)
        .await
        .unwrap();
    keys.store_secret(
        key(KeyKind::SignalSignedPreKey, 9),
        &signed_with(&signature),
    )
    .await
    .unwrap();
    sessions.publish(business).await.unwrap();
    // Replaced at once (its time stamp is long past), kept for its grace.
    assert!(
        keys.load_secret(key(KeyKind::SignalSignedPreKey, 9))
            .await
            .unwrap()
            .is_some()
    );
}

/// A stored record flagged as holding a session whose record has no current
/// state (the corpus's `session--session-flag-without-session`) is no
/// session: the next send starts one from the device's bundle and goes
/// through, instead of failing as `NoSession` for ever.
#[tokio::test]
async fn a_session_record_without_a_current_state_is_no_session() {
    let (sessions, _keys, store, business, expiry) = fixture().await;
    sessions.publish(business).await.unwrap();
    let peer = PeerId {
        phone: crate::ids::PhoneHash::from_bytes([0x70; 16]),
        device: 1,
    };
    let mut plaintext = vec![0x70; 16];
    plaintext.extend_from_slice(&1u32.to_be_bytes());
    plaintext.extend_from_slice(&[0x02, 0x02]);
    let label = crate::envelope::Label {
        kind: crate::envelope::Kind::SignalSession,
        business,
        id: MessageId::random(),
        expiry,
        region: crate::ids::Region::LOCAL,
    };
    let sealed = sessions.vault.seal(&label, &plaintext).await.unwrap();
    let mut batch = Batch::new();
    batch.push(Op::PutPeer {
        business,
        peer,
        sealed,
    });
    store.commit(batch).await.unwrap();
    sessions.clear_cache();

    assert!(!sessions.has_session(business, peer).await.unwrap());
    let mut device = ConsumerDevice::new(1);
    sessions
        .start_session(business, peer, &device.bundle(true), expiry)
        .await
        .unwrap();
    let sent = sessions
        .encrypt(business, peer, b"hi", expiry)
        .await
        .unwrap();
    assert_eq!(device.decrypt(business, &sent).await.unwrap(), b"hi");
}

/// Real session records, made once by real Signal session setup between a
/// business and a consumer device and serialised: after the device's first
/// message (a session with a one-time prekey pending), after the
/// business's reply, and after a few more messages each way.
#[allow(clippy::unwrap_used, reason = "a test fixture")]
fn real_sessions() -> &'static [Vec<u8>] {
    REAL_SESSIONS.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(make_real_sessions())
    })
}

static REAL_SESSIONS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();

/// Make [`real_sessions`].
#[allow(clippy::unwrap_used, reason = "a test fixture")]
async fn make_real_sessions() -> Vec<Vec<u8>> {
    let (sessions, keys, _, business, expiry) = fixture().await;
    let published = sessions.publish(business).await.unwrap();
    let (mut phone, peer) = consumer(&keys, business, &published).await;
    let snapshot = |sessions: &Sessions| {
        let taken = sessions
            .cache
            .take(&(business, peer), sessions.shreds())
            .unwrap();
        taken.session.as_ref().unwrap().serialize().unwrap()
    };
    let mut records = Vec::new();
    let m = phone.encrypt(business, b"first").await.unwrap();
    sessions.decrypt(business, peer, &m, expiry).await.unwrap();
    records.push(snapshot(&sessions));
    sessions.clear_cache();
    let reply = sessions
        .encrypt(business, peer, b"reply", expiry)
        .await
        .unwrap();
    phone.decrypt(business, &reply).await.unwrap();
    records.push(snapshot(&sessions));
    sessions.clear_cache();
    round_trips(&sessions, &mut phone, business, peer, expiry).await;
    records.push(snapshot(&sessions));
    records
}

proptest::proptest! {
    /// Any device's record, with or without a real session and a trusted
    /// identity key, decodes under its own device and incarnation to the
    /// same session bytes, identity and device, and under any other device
    /// (another consumer, another device id, or both) is refused as the
    /// record of another device.
    #[test]
    fn a_peer_record_round_trips_and_opens_only_for_its_device(
        phone in proptest::prelude::any::<[u8; 16]>(),
        device in proptest::prelude::any::<u32>(),
        session in proptest::option::of(0..3_usize),
        identity in proptest::option::of(proptest::prelude::any::<[u8; 32]>()),
        incarnation in proptest::prelude::any::<[u8; 16]>(),
        other_phone in proptest::prelude::any::<[u8; 16]>(),
        other_device in proptest::prelude::any::<u32>(),
        which in 0..3_u8,
    ) {
        use wacore_libsignal::protocol::{IdentityKey, PublicKey, SessionRecord};
        use super::peer::{CorruptPeer, Peer};

        let id = PeerId { phone: PhoneHash::from_bytes(phone), device };
        let identity = identity.map(|k| {
            IdentityKey::new(PublicKey::from_djb_public_key_bytes(&k).unwrap())
        });
        let mut peer = Peer::empty(id);
        peer.session = session.map(|i| SessionRecord::deserialize(&real_sessions()[i]).unwrap());
        peer.identity = identity;
        // The session as held, which is what must come back (a record read
        // without this process's incarnation, as here, has had its sending
        // chain moved past its lease already).
        let session_bytes = peer.session.as_ref().map(|s| s.serialize().unwrap());
        let bytes = peer.encode(&incarnation);
        let expiry = Timestamp::from_millis(5);

        let back = Peer::decode(id, &bytes, &incarnation, expiry).unwrap();
        proptest::prop_assert_eq!(
            back.session.as_ref().map(|s| s.serialize().unwrap()),
            session_bytes
        );
        proptest::prop_assert_eq!(back.identity, identity);
        proptest::prop_assert_eq!(back.id, id);
        proptest::prop_assert_eq!(back.address.name(), peer::ADDRESS_NAME);
        proptest::prop_assert_eq!(u32::from(back.address.device_id()), device);
        proptest::prop_assert_eq!(back.encoded_len, bytes.len());

        let other = match which {
            0 => PeerId { phone: PhoneHash::from_bytes(other_phone), ..id },
            1 => PeerId { device: other_device, ..id },
            _ => PeerId { phone: PhoneHash::from_bytes(other_phone), device: other_device },
        };
        proptest::prop_assume!(other != id);
        proptest::prop_assert_eq!(
            Peer::decode(other, &bytes, &incarnation, expiry).err(),
            Some(CorruptPeer("record of another device"))
        );
    }
}

/// A first message may name any one-time prekey id, in range or not; the
/// id it names is held while it is staged, and held ids only keep the
/// refill from making them again. Before, they were taken for ids the
/// business had made: one naming `u32::MAX` overflowed the refill's
/// arithmetic (a panic with overflow checks; in release, new ids off the
/// live arc, which the next retirement could take for the oldest).
#[tokio::test]
async fn a_held_prekey_id_out_of_range_does_not_upset_the_refill() {
    let (sessions, keys, _store, business, _expiry) = fixture().await;
    sessions.publish(business).await.unwrap();
    let _hold = sessions.prekeys_in_use.hold(business, u32::MAX);
    let report = sessions.maintain(business, Some(0)).await.unwrap();
    assert!(report.prekeys_added > 0);
    let (pool, damaged) = account::one_time_prekeys(&keys, business).await.unwrap();
    assert!(damaged.is_empty());
    assert!(
        pool.iter()
            .all(|k| (1..=account::MAX_PREKEY_ID).contains(&k.id))
    );
}
