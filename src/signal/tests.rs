//! What the crate stores reveals no private key.

use std::sync::Arc;

use wacore_libsignal::protocol::PreKeyRecord;

use super::*;
use crate::ids::PhoneNumber;
use crate::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use crate::store::MemoryStore;
use crate::testing::ConsumerDevice;
use crate::time::ManualClock;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_private_key_or_session_secret_is_stored_in_clear() {
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
    let sessions = Sessions::new(vault, store.clone(), SignalConfig::default());
    let business = BusinessId::new(9).unwrap();
    let expiry = Timestamp::from_millis(1_767_225_600_000 + 86_400_000);

    let published = sessions.publish(business).await.unwrap();
    let mut phone = ConsumerDevice::new(0);
    phone
        .start_session(business, &published.bundle(Some(0)))
        .await
        .unwrap();
    let number: PhoneNumber = "+447700900123".parse().unwrap();
    let peer = PeerId {
        phone: keys.phone_hash(business, &number).await.unwrap(),
        device: 0,
    };
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
        .take(&(business, peer))
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
