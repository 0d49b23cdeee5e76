//! Any bytes as a stored KEK ring: decoding never panics, and a ring that
//! decodes keeps the ring's invariants, survives a write and reload, and
//! keeps them through every lifecycle step (checks in
//! `custodian::fuzzing::kek_ring`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::kek_ring(data);
});
