//! Any bytes: parsing never panics, and whatever parses is canonical: its
//! header written again from the parsed fields, then its ciphertext, is
//! exactly the input (checks in `custodian::fuzzing::envelope_parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::envelope_parse(data);
});
