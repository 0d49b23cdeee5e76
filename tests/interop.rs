//! Interoperability with an independent Signal implementation: the npm
//! package `libsignal` 6.0.0, which WhatsApp Web clients use, running in
//! Node.js as a consumer's device (interop/peer.js). Everything goes over the
//! real wire format; nothing is mocked.
//!
//! Needs Node.js and `npm ci --prefix interop` (the `interop` feature, which
//! `cargo test --all-features` enables; `.ci/run` installs both).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use custodian::ids::{BusinessId, PhoneNumber};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::signal::{
    BUSINESS_DEVICE_ID, Ciphertext, MessageKind, PreKeyBundle, PublicPreKey, PublishedKeys,
    Sessions, SignalConfig, SignalError, SignedPublicPreKey,
};
use custodian::store::{MemoryStore, PeerId, Storage};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::Vault;

/// The JavaScript consumer device, driven line by line over stdin/stdout.
struct JsPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl JsPeer {
    fn spawn() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(
            root.join("interop/node_modules/libsignal").is_dir(),
            "the JavaScript peer is not installed: run `npm ci --prefix interop`"
        );
        let mut child = Command::new("node")
            .arg(root.join("interop/peer.js"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut peer = Self {
            child,
            stdin,
            stdout,
            next_id: 0,
        };
        peer.ok("init", json!({ "preKeys": 5 }));
        peer
    }

    /// Send one request; return the response (ok or not).
    fn call(&mut self, cmd: &str, mut args: Value) -> Value {
        self.next_id += 1;
        args["id"] = json!(self.next_id);
        args["cmd"] = json!(cmd);
        writeln!(self.stdin, "{args}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let response: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(response["id"], json!(self.next_id));
        response
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let response = self.call(cmd, args);
        assert_eq!(response["ok"], json!(true), "{cmd} failed: {response}");
        response
    }

    fn start_session(&mut self, business: BusinessId, bundle: &PreKeyBundle) {
        let one_time = bundle
            .one_time_prekey
            .map(|k| json!({ "keyId": k.id, "publicKey": B64.encode(k.public_key) }));
        self.ok(
            "initOutgoing",
            json!({
                "name": business.to_string(),
                "deviceId": BUSINESS_DEVICE_ID,
                "bundle": {
                    "registrationId": bundle.registration_id,
                    "identityKey": B64.encode(bundle.identity_key),
                    "signedPreKey": {
                        "keyId": bundle.signed_prekey.id,
                        "publicKey": B64.encode(bundle.signed_prekey.public_key),
                        "signature": B64.encode(bundle.signed_prekey.signature),
                    },
                    "preKey": one_time,
                },
            }),
        );
    }

    fn encrypt(&mut self, business: BusinessId, plaintext: &[u8]) -> Ciphertext {
        let r = self.ok(
            "encrypt",
            json!({ "name": business.to_string(), "deviceId": BUSINESS_DEVICE_ID, "plaintext": B64.encode(plaintext) }),
        );
        Ciphertext {
            kind: match r["type"].as_u64() {
                Some(3) => MessageKind::FirstContact,
                Some(1) => MessageKind::FollowUp,
                other => panic!("unknown message type {other:?}"),
            },
            bytes: B64.decode(r["body"].as_str().unwrap()).unwrap(),
        }
    }

    fn decrypt(&mut self, business: BusinessId, message: &Ciphertext) -> Result<Vec<u8>, String> {
        let kind = match message.kind {
            MessageKind::FirstContact => 3,
            MessageKind::FollowUp => 1,
        };
        let r = self.call(
            "decrypt",
            json!({
                "name": business.to_string(),
                "deviceId": BUSINESS_DEVICE_ID,
                "type": kind,
                "body": B64.encode(&message.bytes),
            }),
        );
        match r["ok"].as_bool() {
            Some(true) => Ok(B64.decode(r["plaintext"].as_str().unwrap()).unwrap()),
            _ => Err(format!("{}: {}", r["kind"], r["error"])),
        }
    }

    fn bundle(&mut self) -> PreKeyBundle {
        let r = self.ok("bundle", json!({}));
        let bytes = |v: &Value| B64.decode(v.as_str().unwrap()).unwrap();
        let key33 = |v: &Value| -> [u8; 33] { bytes(v).try_into().unwrap() };
        PreKeyBundle {
            registration_id: u32::try_from(r["registrationId"].as_u64().unwrap()).unwrap(),
            device_id: 0,
            identity_key: key33(&r["identityKey"]),
            signed_prekey: SignedPublicPreKey {
                id: u32::try_from(r["signedPreKey"]["keyId"].as_u64().unwrap()).unwrap(),
                public_key: key33(&r["signedPreKey"]["publicKey"]),
                signature: bytes(&r["signedPreKey"]["signature"]).try_into().unwrap(),
            },
            one_time_prekey: r["preKey"].as_object().map(|k| PublicPreKey {
                id: u32::try_from(k["keyId"].as_u64().unwrap()).unwrap(),
                public_key: key33(&k["publicKey"]),
            }),
        }
    }
}

impl Drop for JsPeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, r#"{{"id":0,"cmd":"exit"}}"#);
        let _ = self.child.wait();
    }
}

/// The processor side: sessions over a store that outlives restarts.
struct Processor {
    store: Arc<MemoryStore>,
    clock: ManualClock,
    keys: Arc<KeyManager>,
    sessions: Sessions,
    business: BusinessId,
}

impl Processor {
    fn new() -> Self {
        let store = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let (keys, sessions) = Self::open(&store, &clock);
        Self {
            store,
            clock,
            keys,
            sessions,
            business: BusinessId::new(4242).unwrap(),
        }
    }

    fn open(store: &Arc<MemoryStore>, clock: &ManualClock) -> (Arc<KeyManager>, Sessions) {
        let provider = Arc::new(LocalKeyProvider::new(&SecretKey::from_bytes(
            &mut [0x17; 32],
        )));
        let keys = Arc::new(KeyManager::new(provider, store.clone()));
        let vault = Arc::new(Vault::new(
            keys.clone(),
            Arc::new(clock.clone()),
            EpochLength::DEFAULT,
        ));
        (
            keys,
            Sessions::new(vault, store.clone(), SignalConfig::default()).unwrap(),
        )
    }

    fn restart(&mut self) {
        (self.keys, self.sessions) = Self::open(&self.store, &self.clock);
    }

    fn expiry(&self) -> Timestamp {
        self.clock
            .now()
            .saturating_add(Duration::from_secs(30 * 24 * 3600))
    }

    async fn peer(&self, number: &str) -> PeerId {
        let number: PhoneNumber = number.parse().unwrap();
        PeerId {
            phone: self.keys.phone_hash(self.business, &number).await.unwrap(),
            device: 0,
        }
    }

    async fn published(&self) -> PublishedKeys {
        self.sessions.publish(self.business).await.unwrap()
    }

    async fn decrypt(&self, peer: PeerId, message: &Ciphertext) -> Result<Vec<u8>, SignalError> {
        self.sessions
            .decrypt(self.business, peer, message, self.expiry())
            .await
            .map(|d| d.plaintext.to_vec())
    }

    async fn encrypt(&self, peer: PeerId, plaintext: &[u8]) -> Ciphertext {
        self.sessions
            .encrypt(self.business, peer, plaintext, self.expiry())
            .await
            .unwrap()
    }
}

/// First contact from the JavaScript device, then `turns` turns each way.
async fn converse(p: &Processor, js: &mut JsPeer, peer: PeerId, turns: usize) {
    for turn in 0..turns {
        let text = format!("consumer → business, turn {turn}");
        let m = js.encrypt(p.business, text.as_bytes());
        assert_eq!(p.decrypt(peer, &m).await.unwrap(), text.as_bytes());
        let text = format!("business → consumer, turn {turn} ✓");
        let m = p.encrypt(peer, text.as_bytes()).await;
        assert_eq!(js.decrypt(p.business, &m).unwrap(), text.as_bytes());
    }
}

#[tokio::test]
async fn first_contact_from_the_js_client_then_fifty_turns_each_way() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    let published = p.published().await;
    js.start_session(p.business, &published.bundle(Some(0)));
    let peer = p.peer("+447700900201").await;

    let first = js.encrypt(p.business, b"hello, business");
    assert_eq!(first.kind, MessageKind::FirstContact);
    let decrypted = p
        .sessions
        .decrypt(p.business, peer, &first, p.expiry())
        .await
        .unwrap();
    assert!(decrypted.first_contact);
    assert_eq!(*decrypted.plaintext, b"hello, business");

    converse(&p, &mut js, peer, 50).await;
    // The one-time prekey the client used is gone from the business's pool.
    let now = p.published().await;
    let used = published.one_time_prekeys[0].id;
    assert!(now.one_time_prekeys.iter().all(|k| k.id != used));
}

#[tokio::test]
async fn first_contact_without_a_one_time_prekey() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    js.start_session(p.business, &p.published().await.bundle(None));
    let peer = p.peer("+447700900202").await;
    converse(&p, &mut js, peer, 3).await;
}

#[tokio::test]
async fn out_of_order_delivery_both_ways() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    js.start_session(p.business, &p.published().await.bundle(Some(0)));
    let peer = p.peer("+447700900203").await;
    converse(&p, &mut js, peer, 1).await;

    let inbound: Vec<_> = (0..6)
        .map(|i| js.encrypt(p.business, format!("in {i}").as_bytes()))
        .collect();
    for i in [3, 0, 5, 1, 4, 2] {
        assert_eq!(
            p.decrypt(peer, &inbound[i]).await.unwrap(),
            format!("in {i}").as_bytes()
        );
    }
    let mut outbound = Vec::new();
    for i in 0..6 {
        outbound.push(p.encrypt(peer, format!("out {i}").as_bytes()).await);
    }
    for i in [4, 1, 0, 5, 2, 3] {
        assert_eq!(
            js.decrypt(p.business, &outbound[i]).unwrap(),
            format!("out {i}").as_bytes()
        );
    }
    converse(&p, &mut js, peer, 2).await;
}

#[tokio::test]
async fn tampered_and_replayed_messages_are_rejected_both_ways() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    js.start_session(p.business, &p.published().await.bundle(Some(0)));
    let peer = p.peer("+447700900204").await;
    converse(&p, &mut js, peer, 2).await;

    // Into the processor: a flipped MAC, a flipped body byte, then a replay.
    let good = js.encrypt(p.business, b"genuine inbound");
    let before = p.store.peer(p.business, peer).await.unwrap();
    for at in [good.bytes.len() - 1, good.bytes.len() / 2] {
        let mut bad = good.clone();
        bad.bytes[at] ^= 0x04;
        assert!(matches!(
            p.decrypt(peer, &bad).await,
            Err(SignalError::InvalidMessage(_) | SignalError::Undecryptable(_))
        ));
    }
    assert_eq!(
        p.store.peer(p.business, peer).await.unwrap(),
        before,
        "a rejected message changed state"
    );
    assert_eq!(p.decrypt(peer, &good).await.unwrap(), b"genuine inbound");
    assert!(matches!(
        p.decrypt(peer, &good).await,
        Err(SignalError::DuplicateMessage)
    ));

    // Into the JavaScript client: same treatment.
    let good = p.encrypt(peer, b"genuine outbound").await;
    let mut bad = good.clone();
    *bad.bytes.last_mut().unwrap() ^= 0x01;
    assert!(js.decrypt(p.business, &bad).is_err());
    assert_eq!(js.decrypt(p.business, &good).unwrap(), b"genuine outbound");
    assert!(
        js.decrypt(p.business, &good).is_err(),
        "the JS client accepted a replay"
    );

    converse(&p, &mut js, peer, 2).await;
}

#[tokio::test]
async fn business_initiated_session_with_the_js_client() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    let peer = p.peer("+447700900205").await;
    let bundle = js.bundle();
    assert!(bundle.one_time_prekey.is_some());
    p.sessions
        .start_session(p.business, peer, &bundle, p.expiry())
        .await
        .unwrap();
    let first = p.encrypt(peer, b"your order has shipped").await;
    assert_eq!(first.kind, MessageKind::FirstContact);
    assert_eq!(
        js.decrypt(p.business, &first).unwrap(),
        b"your order has shipped"
    );
    let reply = js.encrypt(p.business, b"thank you");
    assert_eq!(p.decrypt(peer, &reply).await.unwrap(), b"thank you");
    for turn in 0..10 {
        let m = p.encrypt(peer, format!("update {turn}").as_bytes()).await;
        assert_eq!(
            js.decrypt(p.business, &m).unwrap(),
            format!("update {turn}").as_bytes()
        );
        let m = js.encrypt(p.business, b"ok");
        assert_eq!(p.decrypt(peer, &m).await.unwrap(), b"ok");
    }
}

#[tokio::test]
async fn a_bad_bundle_from_the_network_is_refused() {
    let p = Processor::new();
    let mut js = JsPeer::spawn();
    let peer = p.peer("+447700900206").await;
    let mut bundle = js.bundle();
    bundle.signed_prekey.signature[0] ^= 1;
    assert!(matches!(
        p.sessions
            .start_session(p.business, peer, &bundle, p.expiry())
            .await,
        Err(SignalError::BadBundle(_))
    ));
    assert_eq!(p.store.peer(p.business, peer).await.unwrap(), None);
}

#[tokio::test]
async fn the_processor_restarts_mid_conversation_from_stored_state() {
    let mut p = Processor::new();
    let mut js = JsPeer::spawn();
    js.start_session(p.business, &p.published().await.bundle(Some(1)));
    let peer = p.peer("+447700900207").await;
    converse(&p, &mut js, peer, 5).await;

    // Messages in flight in both directions across the restart.
    let inbound = js.encrypt(p.business, b"sent while the processor was down");
    let outbound = p.encrypt(peer, b"sent just before the restart").await;
    p.restart();
    assert_eq!(
        js.decrypt(p.business, &outbound).unwrap(),
        b"sent just before the restart"
    );
    assert_eq!(
        p.decrypt(peer, &inbound).await.unwrap(),
        b"sent while the processor was down"
    );
    converse(&p, &mut js, peer, 10).await;
    p.restart();
    converse(&p, &mut js, peer, 5).await;
}
