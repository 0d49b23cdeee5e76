//! What the Signal library writes to the host's `log` logger: records
//! that carry key material (see [`library_logs_exposed`]). The library
//! addresses every consumer by the same name (see the peer module), so its
//! records name no one.

use log::{Level, Metadata};

/// The `log` target prefix of every record the Signal library writes: a
/// host's filter must turn it off (see [`library_logs_exposed`]).
pub const LIBRARY_LOG_TARGET: &str = "wacore_libsignal";

/// The targets of the records that carry key material, and their levels:
/// the expected MAC (warn), the MAC key's first bytes and the identity
/// keys (error). Filters match targets by prefix, so a filter that turns
/// [`LIBRARY_LOG_TARGET`] off turns these off.
const SECRET_RECORDS: [(&str, Level); 3] = [
    ("wacore_libsignal::protocol::protocol", Level::Warn),
    ("wacore_libsignal::protocol::session_cipher", Level::Error),
    ("wacore_libsignal::protocol::session_cipher", Level::Warn),
];

/// Whether the host's `log` logger, as set now, would keep a record of the
/// Signal library that carries key material. `false` when no logger is
/// set, or its filter turns the library's target ([`LIBRARY_LOG_TARGET`])
/// off.
///
/// `wacore-libsignal` logs through the `log` facade. When a message fails
/// its MAC check it logs, at warn level, the MAC it expected: the correct
/// MAC of the bytes it was given, computed under the message's secret key,
/// so whoever can both hand the processor a message and read those logs
/// can forge a consumer's message (alter one, submit it, read the MAC,
/// submit it again with that MAC). At error level it logs the first 4
/// bytes of the MAC key and both parties' identity keys.
/// [`Processor::new`](crate::processor::Processor::new) refuses to start
/// while this is `true`, unless
/// [`SignalConfig::allow_library_logs`](super::SignalConfig::allow_library_logs)
/// says otherwise. Turn the target off: `RUST_LOG=info,wacore_libsignal=off`
/// with `env_logger`, or the directive `wacore_libsignal=off` in a
/// `tracing-subscriber` filter that bridges `log` records. The question is
/// asked when the processor starts: install the logger first.
pub fn library_logs_exposed() -> bool {
    let logger = log::logger();
    SECRET_RECORDS.iter().any(|&(target, level)| {
        level <= log::STATIC_MAX_LEVEL
            && level <= log::max_level()
            && logger.enabled(&Metadata::builder().level(level).target(target).build())
    })
}
