//! Any bytes: opening with the fixture key of the envelope's own business and
//! epoch never panics, and a successful open re-seals (same key, same nonce)
//! to exactly the input, so no altered envelope can open to a plaintext.
#![no_main]

use custodian::envelope::Envelope;
use custodian::fuzzing::{fixture_epoch_key, open_with_key, seal_with_nonce};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else { return };
    let header = envelope.header();
    let key = fixture_epoch_key(header.label().business, header.epoch());
    if let Some(plaintext) = open_with_key(&envelope, &key) {
        let resealed = seal_with_nonce(&key, header.label(), header.nonce(), &plaintext)
            .expect("an envelope that opened can be sealed again");
        assert_eq!(resealed, data, "an opened envelope must be exactly what sealing makes");
    }
});
