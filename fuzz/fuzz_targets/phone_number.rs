//! Any bytes: the phone-number, region, business-id, message-id and
//! decision-id parsers never panic, accept exactly their documented forms,
//! and a phone number never prints more than its last two digits (checks
//! in `custodian::fuzzing::phone_number`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custodian::fuzzing::phone_number(data);
});
