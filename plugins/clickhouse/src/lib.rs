//! clickhouse: the analytics sink of SPEC 5A.
//!
//! Creates `{database}.{table}` (default `engagement.events_enriched`) if missing and inserts
//! each batch as one `JSONEachRow` request of SPEC-4 records.
//!
//! One row per event_id, also under replays:
//! 1. duplicates inside a batch are dropped (the last copy wins);
//! 2. ids already in the table are looked up (`SELECT event_id ... WHERE event_id IN (...)`,
//!    served by the primary key) and not inserted again, so the plain query form
//!    `SELECT content_id, avg(engagement_pct) FROM engagement.events_enriched GROUP BY content_id`
//!    sees no duplicate after a replay of a batch that had been inserted;
//! 3. the table is a `ReplacingMergeTree` ordered by event_id, so duplicates that race past the
//!    lookup (two writers at once) are merged away, and `... FINAL` dedups at query time.

use fanout_sdk::clickhouse::quote_ident;
use fanout_sdk::{
    describe, event_json_string, export_sink, Batch, CapabilityError, Host, Level, Sink,
    WriteOutcome,
};
use rustc_hash::FxHashSet;
use serde::Deserialize;

/// `[plugins.config]` of the plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: String,
    pub table: String,
    /// Run CREATE DATABASE / CREATE TABLE IF NOT EXISTS (off when the schema is managed
    /// elsewhere).
    pub create_table: bool,
    /// Look up which event ids the table already has before inserting.
    pub skip_existing: bool,
    /// Event ids per lookup query (bounds the query's size under max_query_size).
    pub lookup_chunk: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: "engagement".into(),
            table: "events_enriched".into(),
            create_table: true,
            skip_existing: true,
            lookup_chunk: 5_000,
        }
    }
}

impl Config {
    /// The checks parsing cannot make.
    pub fn validated(self) -> Result<Self, String> {
        for (what, name) in [("database", &self.database), ("table", &self.table)] {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(format!(
                    "config: {what}: {name:?} must be letters, digits and _"
                ));
            }
        }
        if self.lookup_chunk == 0 {
            return Err("config: lookup_chunk must be > 0".into());
        }
        Ok(self)
    }

    /// `` `database`.`table` ``
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.table)
        )
    }

    /// The DDL, in order. Accepted by ClickHouse 18.16 and current releases, and by the host's
    /// statement check (sqlparser): ORDER BY before PARTITION BY, which ClickHouse takes in any
    /// order and stores as the same table.
    pub fn ddl(&self) -> Vec<String> {
        vec![
            format!(
                "CREATE DATABASE IF NOT EXISTS {}",
                quote_ident(&self.database)
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\n\
                 \x20   event_id Int64,\n\
                 \x20   content_id Nullable(Int64),\n\
                 \x20   user_id Nullable(Int64),\n\
                 \x20   event_type Nullable(String),\n\
                 \x20   event_ts DateTime('UTC'),\n\
                 \x20   duration_ms Nullable(Int32),\n\
                 \x20   device Nullable(String),\n\
                 \x20   content_type Nullable(String),\n\
                 \x20   length_seconds Nullable(Int32),\n\
                 \x20   engagement_seconds Nullable(Float64),\n\
                 \x20   engagement_pct Nullable(Float64)\n\
                 ) ENGINE = ReplacingMergeTree() ORDER BY event_id PARTITION BY toYYYYMM(event_ts)",
                self.qualified()
            ),
        ]
    }

    /// The query listing which of `ids` the table already has.
    pub fn lookup_sql(&self, ids: &[i64]) -> String {
        let mut sql = String::with_capacity(128 + ids.len() * 12);
        sql.push_str("SELECT DISTINCT event_id FROM ");
        sql.push_str(&self.qualified());
        sql.push_str(" WHERE event_id IN (");
        let mut digits = itoa::Buffer::new();
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(digits.format(*id));
        }
        sql.push_str(") FORMAT TabSeparated");
        sql
    }
}

/// Event ids in a `TabSeparated` answer of [`Config::lookup_sql`].
pub fn parse_ids(body: &str) -> Result<FxHashSet<i64>, String> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<i64>()
                .map_err(|_| format!("unexpected line in lookup answer: {l:?}"))
        })
        .collect()
}

/// The plugin.
pub struct ClickHouseSink {
    cfg: Config,
    /// The DDL ran in this instance (it is idempotent; this only saves round trips).
    schema_ready: bool,
}

impl ClickHouseSink {
    pub fn new(cfg: Config) -> Self {
        let schema_ready = !cfg.create_table;
        ClickHouseSink { cfg, schema_ready }
    }

    /// Runs the DDL once per instance.
    pub fn ensure_schema(&mut self, host: &impl Host) -> Result<(), CapabilityError> {
        if self.schema_ready {
            return Ok(());
        }
        for sql in self.cfg.ddl() {
            host.clickhouse_execute(&sql)?;
        }
        self.schema_ready = true;
        host.log(
            Level::Info,
            &format!("table {} is ready", self.cfg.qualified()),
        );
        Ok(())
    }

    fn write_once(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        if let Err(e) = self.ensure_schema(host) {
            return WriteOutcome::RetryLater(format!(
                "clickhouse: creating {} failed: {}",
                self.cfg.qualified(),
                describe(&e)
            ));
        }
        let events = batch.events.unique_by_event_id();
        let mut existing = FxHashSet::default();
        if self.cfg.skip_existing && !events.is_empty() {
            let ids: Vec<i64> = events.iter().map(|e| e.event_id()).collect();
            for chunk in ids.chunks(self.cfg.lookup_chunk) {
                let found = host
                    .clickhouse_execute(&self.cfg.lookup_sql(chunk))
                    .map_err(|e| describe(&e))
                    .and_then(|body| parse_ids(&body));
                match found {
                    Ok(found) => existing.extend(found),
                    Err(e) => {
                        return WriteOutcome::RetryLater(format!(
                            "clickhouse: looking up existing event ids of batch {} failed: {e}",
                            batch.id
                        ))
                    }
                }
            }
        }
        let rows: Vec<String> = events
            .iter()
            .filter(|e| !existing.contains(&e.event_id()))
            .map(|e| event_json_string(*e))
            .collect();
        let skipped = (batch.events.len() - rows.len()) as u64;
        if !rows.is_empty() {
            if let Err(e) =
                host.clickhouse_insert_json_rows(&self.cfg.database, &self.cfg.table, &rows)
            {
                return WriteOutcome::RetryLater(format!(
                    "clickhouse: insert of {} rows of batch {} into {} failed: {}",
                    rows.len(),
                    batch.id,
                    self.cfg.qualified(),
                    describe(&e)
                ));
            }
        }
        host.counter_add("rows_inserted", rows.len() as u64);
        host.counter_add("rows_skipped_duplicate", skipped);
        WriteOutcome::Accepted
    }
}

impl Sink for ClickHouseSink {
    type Config = Config;

    fn init(cfg: Config, host: &impl Host) -> Result<Self, String> {
        let mut sink = ClickHouseSink::new(cfg.validated()?);
        match sink.ensure_schema(host) {
            Ok(()) => Ok(sink),
            // A missing grant will not fix itself: refuse to start.
            Err(CapabilityError::NotGranted(m)) => {
                Err(format!("clickhouse capability not granted: {m}"))
            }
            // ClickHouse may be down at start: try again on the first batch.
            Err(CapabilityError::Failed(m)) => {
                host.log(
                    Level::Warn,
                    &format!(
                        "clickhouse: schema not created yet ({m}); retrying on the first batch"
                    ),
                );
                Ok(sink)
            }
        }
    }

    /// After a failure the DDL runs again on the next attempt, so a table dropped (or a
    /// database recreated) under a running instance is created again instead of failing
    /// every retry of the batch forever.
    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let outcome = self.write_once(host, batch);
        if matches!(outcome, WriteOutcome::RetryLater(_)) {
            self.schema_ready = !self.cfg.create_table;
        }
        outcome
    }
}

export_sink!(ClickHouseSink);

#[cfg(test)]
mod tests;
