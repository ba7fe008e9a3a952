//! # fanout-sdk: write a sink plugin for the fanout host
//!
//! A sink plugin is a WebAssembly component of the world `fanout:sink/packed-sink-plugin@0.1.3`
//! (`wit/sink.wit`). The host calls `init` once with the plugin's JSON config, then `write`
//! for every enriched batch, its events packed in one buffer that [`Batch::events`] reads in
//! place ([`packed`]). This crate turns that into a small Rust trait:
//!
//! ```
//! use fanout_sdk::{export_sink, Batch, Host, Sink, WriteOutcome};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { key_prefix: String }
//!
//! struct Counter { prefix: String }
//!
//! impl Sink for Counter {
//!     type Config = Config;           // `[plugins.config]`, parsed before `init`
//!     fn init(config: Config, _host: &impl Host) -> Result<Self, String> {
//!         Ok(Counter { prefix: config.key_prefix })
//!     }
//!     fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
//!         let mut redis = host.redis();
//!         for e in batch.events.iter() {
//!             redis.cmd("SET").arg(format_args!("{}{}", self.prefix, e.event_id())).arg(1);
//!         }
//!         match redis.send() {
//!             Ok(_) => WriteOutcome::Accepted,
//!             Err(e) => WriteOutcome::RetryLater(fanout_sdk::describe(&e)),
//!         }
//!     }
//! }
//!
//! export_sink!(Counter);
//!
//! // A test calls the same `write` with a recorder.
//! let host = fanout_sdk::testing::MockHost::new();
//! let config = fanout_sdk::config::parse::<Config>(r#"{"key_prefix": "n:"}"#).unwrap();
//! let mut sink = Counter::init(config, &host).unwrap();
//! let b = fanout_sdk::testing::batch(vec![fanout_sdk::testing::event(1, None, 0)]);
//! assert_eq!(sink.write(&host, &b), WriteOutcome::Accepted);
//! ```
//!
//! Capabilities (Redis, HTTP, ClickHouse, logs, metrics) are the [`Host`] trait's methods;
//! `init` and `write` receive the host. [`WasmHost`] is the real one; [`testing::MockHost`]
//! records calls and plays back scripted replies, so plugin logic is unit-tested natively with
//! `cargo test` by calling `write` itself.

// Lets the generated bindings and the exported macros name this crate as `::fanout_sdk`
// both from inside the crate and from plugin crates.
extern crate self as fanout_sdk;

#[doc(hidden)]
pub use wit_bindgen;

pub use serde;
pub use serde_json;

/// Everything generated from `wit/sink.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "packed-sink-plugin",
        path: "../wit",
        // `export!` must be usable from the plugin crates, which know this crate only.
        pub_export_macro: true,
        default_bindings_module: "::fanout_sdk::bindings",
        runtime_path: "::fanout_sdk::wit_bindgen::rt",
        // Lets tests compare events, batches, outcomes and replies.
        additional_derives: [PartialEq],
    });
}

pub mod clickhouse;
pub mod config;
pub mod event;
pub mod exactly_once;
pub mod host;
pub mod http;
pub mod log;
pub mod metrics;
pub mod packed;
pub mod redis;
pub mod resp;
pub mod testing;
pub mod time;

#[doc(hidden)]
pub mod runtime;

pub use bindings::fanout::sink::errors::CapabilityError;
pub use bindings::fanout::sink::log::Level;
pub use bindings::fanout::sink::types::{EnrichedEvent, Rejection, SourceRange, WriteOutcome};
pub use config::NoConfig;
pub use event::{event_json, event_json_string, format_event_ts, write_event_json, EventRecord};
pub use exactly_once::{Applied, Outcome, RedisOnce};
pub use packed::{Event, EventFields, PackedEvents, Position};

/// One batch as a plugin sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Stable for a replay of the same offsets: `topic/partition:first-last,...`.
    pub id: String,
    /// The events, read in place: `batch.events.iter()`, `batch.events.len()`.
    pub events: PackedEvents,
    /// The offset ranges (or, for a backfill, the source table pages) the batch covers.
    pub sources: Vec<SourceRange>,
}

impl EnrichedEvent {
    /// The event's fields, borrowed, as [`packed::PackedWriter::push`] takes them.
    pub fn fields(&self) -> EventFields<'_> {
        EventFields {
            event_id: self.event_id,
            content_id: self.content_id,
            user_id: self.user_id,
            event_type: self.event_type.as_deref(),
            event_ts_micros: self.event_ts_micros,
            duration_ms: self.duration_ms,
            device: self.device.as_deref(),
            content_type: self.content_type.as_deref(),
            length_seconds: self.length_seconds,
            engagement_seconds: self.engagement_seconds,
            engagement_pct: self.engagement_pct,
            position: None,
        }
    }
}
pub use host::{describe, Host, WasmHost};

/// A sink plugin. One value lives inside the component instance from `init` to the end of the
/// instance, so it can keep state (connections are the host's business; caches, counters,
/// "schema created" flags are yours) across batches.
///
/// The host may recreate the instance (after a trap, or on restart) and call `init` again:
/// nothing in `self` is durable. Every write must be idempotent by `event_id`, because the
/// host replays batches after retries and crashes.
///
/// Both methods receive the host's capabilities: [`WasmHost`] in the component, a
/// [`testing::MockHost`] (or any [`Host`]) when a test calls them.
pub trait Sink: Sized + 'static {
    /// The `[plugins.config]` table of the host config, parsed from its JSON before `init`
    /// (an absent table is `{}`). A config that does not parse is refused with the path of
    /// the bad field (`config: window_minutes: invalid type: string "x", expected u32 ...`).
    /// `#[serde(deny_unknown_fields)]` turns a misspelt key into such an error;
    /// [`NoConfig`] takes no settings.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin from its parsed config. An `Err` is a configuration error: the host
    /// reports it and does not start the plugin. A service that is down is not one: try again
    /// on the first batch.
    fn init(config: Self::Config, host: &impl Host) -> Result<Self, String>;

    /// Takes one batch. Return:
    /// - [`WriteOutcome::Accepted`] when every event is durable,
    /// - [`WriteOutcome::RetryLater`] when some are not (the host retries the whole batch),
    /// - [`WriteOutcome::Rejected`] with the events that can never be written (they go to
    ///   the dead-letter topic; all others must be durable).
    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome;
}

/// Exports a [`Sink`] implementation as the component's `fanout:sink/packed-sink` interface.
///
/// Use once per plugin crate, at the top level: `fanout_sdk::export_sink!(MySink);`
#[macro_export]
macro_rules! export_sink {
    ($ty:ty) => {
        const _: () = {
            ::std::thread_local! {
                static __FANOUT_SINK_STATE: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            struct __FanoutSinkExport;

            impl $crate::bindings::exports::fanout::sink::packed_sink::Guest for __FanoutSinkExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::runtime::init::<$ty>(&__FANOUT_SINK_STATE, &config)
                }

                fn write(
                    batch: $crate::bindings::fanout::sink::types::PackedBatch,
                ) -> $crate::WriteOutcome {
                    $crate::runtime::write::<$ty>(&__FANOUT_SINK_STATE, batch)
                }
            }

    $crate::bindings::export!(__FanoutSinkExport with_types_in $crate::bindings);
        };
    };
}
