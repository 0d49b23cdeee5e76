//! Any bytes as a line of the audit trail: reading never panics, an entry
//! read writes back as a line that reads as the same entry, and every cut
//! of that line, ended as a sink ends it, is unreadable (checks in
//! `custodian::fuzzing::audit_line`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::audit_line(data);
});
