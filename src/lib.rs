#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), warn(clippy::print_stdout, clippy::print_stderr))]

mod aead;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod store;
pub mod time;
pub mod vault;

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
