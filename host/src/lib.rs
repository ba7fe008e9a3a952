//! fanout: a WebAssembly-plugin sink host for Debezium change streams.
//!
//! The live path is one [`lane`] per plugin, each reading top to bottom: consume, [`decode`],
//! collect a [`batch`], [`enrich`] it from the [`content`] table, deliver it to its
//! [`plugin`], commit in its own consumer group. [`app`] assembles the host and starts the
//! lanes; [`backfill`] feeds the same enrichment and plugins from PostgreSQL; [`reload`] swaps
//! changed plugins into their lanes on SIGHUP.

pub mod app;
pub mod backfill;
pub mod batch;
pub mod config;
pub mod console;
pub mod content;
pub mod deadletter;
pub mod decode;
pub mod dlq;
pub mod enrich;
pub mod lane;
pub mod metrics;
pub mod plugin;
pub mod reload;
pub mod serve;
pub mod shutdown;
