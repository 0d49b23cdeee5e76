//! Any bytes as a visibility or retention policy file (TOML and JSON): the
//! loaders never panic, and whatever loads keeps the hard rules and survives
//! a write and reload (checks in `custodian::fuzzing::policy_file`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custodian::fuzzing::policy_file(data);
});
