//! Any bytes as an inbound Signal message of either kind (`pkmsg`, `msg`):
//! the transport's parser never panics, refuses with `InvalidMessage`, and
//! gives accepted input a stable id that names its business (not its
//! sender, the transport's word), the same as the message a first contact
//! embeds (checks in
//! `custodian::fuzzing::signal_message`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custodian::fuzzing::signal_message(data);
});
