//! Any bytes as a consumer device's prekey bundle from the network: starting
//! a session from it never panics, is taken exactly when the bundle is
//! sound and its identity trusted, and a refused bundle changes nothing
//! stored (checks in `custodian::fuzzing::prekey_bundle`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::prekey_bundle(data);
});
