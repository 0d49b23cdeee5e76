//! Any bytes: opening with the fixture key of the envelope's own business and
//! epoch never panics, and a successful open re-seals (same key, same nonce)
//! to exactly the input, so no altered envelope can open to a plaintext
//! (checks in `custodian::fuzzing::envelope_open`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custodian::fuzzing::envelope_open(data);
});
