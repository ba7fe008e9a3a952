//! fanout: a WebAssembly-plugin sink host for Debezium change streams.
//!
//! The live path reads top to bottom: [`pipeline`] consumes, [`decode`]s, collects a
//! [`batch`], [`enrich`]es it from the [`content`] table, [`fanout`]s it to every
//! [`plugin`], and commits. [`backfill`] feeds the same enrichment and fan-out from
//! PostgreSQL.

pub mod app;
pub mod backfill;
pub mod batch;
pub mod config;
pub mod content;
pub mod deadletter;
pub mod decode;
pub mod enrich;
pub mod fanout;
pub mod metrics;
pub mod pipeline;
pub mod plugin;
pub mod serve;
pub mod shutdown;
