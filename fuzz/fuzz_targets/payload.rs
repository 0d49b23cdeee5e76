//! Any bytes as a stored message body (inbound and outbound) and as a
//! device payload: the decoders never panic, and what they accept encodes
//! back to exactly the input (checks in `custodian::fuzzing::payload`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custodian::fuzzing::payload(data);
});
