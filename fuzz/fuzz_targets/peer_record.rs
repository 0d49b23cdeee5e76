//! Any bytes as an opened peer record (a device's stored Signal session and
//! trusted identity): decoding never panics, and what decodes re-encodes to
//! a normal form encoding keeps, exactly the input when there is no session
//! (checks in `custodian::fuzzing::peer_record`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::peer_record(data);
});
