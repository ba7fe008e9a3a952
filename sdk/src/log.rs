//! Logging into the host's tracing output. Use the macros: `fanout_sdk::info!("{} rows", n)`.
//! In a native build (unit tests) lines go to stderr.

use crate::Level;

/// Writes one log line at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::fanout::sink::log::log(level, message)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        eprintln!("[{level:?}] {message}")
    }
}

/// Logs at trace level with `format!` arguments.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::log($crate::Level::Trace, &::std::format!($($arg)*)) };
}

/// Logs at debug level with `format!` arguments.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::Level::Debug, &::std::format!($($arg)*)) };
}

/// Logs at info level with `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::Level::Info, &::std::format!($($arg)*)) };
}

/// Logs at warn level with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}

/// Logs at error level with `format!` arguments.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log($crate::Level::Error, &::std::format!($($arg)*)) };
}
