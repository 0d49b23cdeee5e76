#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::print_stdout, clippy::print_stderr))]

mod aead;
pub mod envelope;
pub mod ids;
pub mod integrity;
pub mod keys;
mod lock;
pub mod processor;
pub mod retention;
mod rng;
pub mod signal;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod transport;
pub mod vault;
pub mod visibility;

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
