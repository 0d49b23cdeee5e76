//! Any bytes as the values of a stored message row of the SQLite backend:
//! decoding never panics, a row decodes to the one record written as exactly
//! its values or is refused naming a column, and the sweep's selection
//! refuses exactly the rows a read refuses (checks in
//! `custodian::fuzzing::message_row`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custodian::fuzzing::message_row(data);
});
