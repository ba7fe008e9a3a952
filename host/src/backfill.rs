//! Backfill: events of a time range read from PostgreSQL, through the same enrichment and
//! plugins as the live stream (all of them, or those named with `--plugin`). It commits no
//! Kafka offsets, so it never moves a lane's position. Sinks are idempotent by event_id, so a backfill over a range
//! the stream already delivered, or a second run, changes nothing.
//!
//! Rows are streamed in id order (one query, the primary key index), so memory holds one
//! batch at a time; after each delivered batch the last id is checkpointed to a state file,
//! from which `--resume` continues.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{pin_mut, StreamExt};
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tracing::info;

use crate::app::App;
use crate::batch::{Origin, PendingBatch};
use crate::decode::{parse_timestamp, RawEvent};
use crate::enrich::enrich_batch;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("--start `{0}`: {1}")]
    BadStart(String, String),
    #[error("--end `{0}`: {1}")]
    BadEnd(String, String),
    #[error("the range is empty or reversed: --start {start} is not before --end {end}")]
    Reversed { start: String, end: String },
    #[error("backfill needs PostgreSQL: set postgres.url in the config or FANOUT__POSTGRES__URL")]
    NoPostgres,
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(tokio_postgres::Error),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// A validated [start, end) range in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl TimeRange {
    /// ISO 8601, with or without zone (no zone = UTC). Checked before any work is done.
    pub fn parse(start: &str, end: &str) -> Result<Self, BackfillError> {
        let to_dt = |micros: i64| DateTime::<Utc>::from_timestamp_micros(micros);
        let s = parse_timestamp(start).ok().and_then(to_dt).ok_or_else(|| {
            BackfillError::BadStart(start.into(), "not an ISO 8601 timestamp".into())
        })?;
        let e = parse_timestamp(end)
            .ok()
            .and_then(to_dt)
            .ok_or_else(|| BackfillError::BadEnd(end.into(), "not an ISO 8601 timestamp".into()))?;
        if s >= e {
            return Err(BackfillError::Reversed {
                start: s.to_rfc3339(),
                end: e.to_rfc3339(),
            });
        }
        Ok(TimeRange { start: s, end: e })
    }
}

pub struct BackfillOptions {
    pub range: TimeRange,
    pub content_ids: Vec<i64>,
    pub state_file: PathBuf,
    pub resume: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct BackfillSummary {
    pub read: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
}

impl std::fmt::Display for BackfillSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backfill done: read={} delivered={} dead_lettered={}",
            self.read, self.delivered, self.dead_lettered
        )
    }
}

/// The source name a backfilled record carries in batch ids and dead letters.
const SOURCE: &str = "postgres:engagement_events";

pub async fn run(
    app: &App,
    opts: &BackfillOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<BackfillSummary, BackfillError> {
    let url = &app.config.postgres.url;
    if url.is_empty() {
        return Err(BackfillError::NoPostgres);
    }
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(BackfillError::Connect)?;
    tokio::spawn(connection);

    let after_id = if opts.resume {
        read_state(&opts.state_file)?
    } else {
        0
    };
    let filter = "event_ts >= $1 AND event_ts < $2 AND id > $3 AND (cardinality($4::bigint[]) = 0 OR content_id = ANY($4))";
    let count_sql = format!("SELECT count(*) FROM engagement_events WHERE {filter}");
    let select_sql = format!(
        "SELECT id, content_id, user_id, event_type, \
         (extract(epoch FROM event_ts) * 1000000)::bigint, duration_ms, device \
         FROM engagement_events WHERE {filter} ORDER BY id"
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [
        &opts.range.start,
        &opts.range.end,
        &after_id,
        &opts.content_ids,
    ];
    let total: i64 = client.query_one(&count_sql, &params).await?.get(0);
    info!(total, after_id, start = %opts.range.start, end = %opts.range.end, "backfill starting");

    let dead_before = app.metrics.sum_labelled("fanout_dead_lettered_total");
    let mut progress = Progress::new(total.max(0) as u64);
    let mut summary = BackfillSummary::default();
    let rows = client
        .query_raw(select_sql.as_str(), params.iter().copied())
        .await?;
    pin_mut!(rows);
    let max_events = app.config.batch.max_events;
    let deliveries: Vec<_> = app.plugins.iter().map(|p| app.delivery(p)).collect();
    let counters = app.metrics.lane("backfill");
    let mut pending = PendingBatch::default();
    let mut last_id = after_id;
    loop {
        let next = rows.next().await.transpose()?;
        if let Some(row) = &next {
            let event = RawEvent {
                id: row.try_get(0)?,
                content_id: row.try_get(1)?,
                user_id: row.try_get(2)?,
                event_type: row.try_get(3)?,
                event_ts_micros: row.try_get(4)?,
                duration_ms: row.try_get(5)?,
                device: row.try_get(6)?,
                // Rows read back long after their commit: no age to measure.
                source_ts_ms: None,
            };
            pending.record_offset(SOURCE, 0, event.id);
            let origin = Origin {
                topic: SOURCE.into(),
                partition: 0,
                offset: event.id,
                key: Some(format!("{{\"id\":{}}}", event.id).into_bytes().into()),
                payload: Some(row_json(&event).into_bytes().into()),
            };
            last_id = event.id;
            pending.push_event(event, origin);
            summary.read += 1;
        }
        let done = next.is_none();
        if pending.event_count() >= max_events || (done && !pending.is_empty()) {
            let batch = enrich_batch(
                std::mem::take(&mut pending),
                &app.content,
                &app.config.enrich,
                &counters,
                None,
            )
            .await;
            let n = batch.plugin_batch.len() as u64;
            // Every plugin takes the batch before the checkpoint moves past it.
            let runs = deliveries.iter().map(|d| d.deliver(&batch, &shutdown));
            for result in futures::future::join_all(runs).await {
                result.map_err(|e| {
                    BackfillError::Interrupted(format!("{e}; resume with --resume"))
                })?;
            }
            summary.delivered += n;
            write_state(&opts.state_file, last_id)?;
            progress.update(summary.read);
        }
        if done {
            break;
        }
        if *shutdown.borrow() {
            return Err(BackfillError::Interrupted(format!(
                "stopped after id {last_id}; resume with --resume"
            )));
        }
    }
    progress.finish(summary.read);
    summary.dead_lettered =
        (app.metrics.sum_labelled("fanout_dead_lettered_total") - dead_before) as u64;
    summary.delivered = summary.delivered.saturating_sub(summary.dead_lettered);
    // A finished backfill leaves no checkpoint behind: a later run starts from the beginning.
    let _ = std::fs::remove_file(&opts.state_file);
    Ok(summary)
}

/// The row as JSON: the original bytes of a backfilled record, for the dead-letter topic.
fn row_json(e: &RawEvent) -> String {
    serde_json::json!({
        "id": e.id, "content_id": e.content_id, "user_id": e.user_id, "event_type": e.event_type,
        "event_ts_micros": e.event_ts_micros, "duration_ms": e.duration_ms, "device": e.device,
    })
    .to_string()
}

/// The default checkpoint file of a range: one per range and filter, in the working dir.
pub fn default_state_file(range: &TimeRange, content_ids: &[i64]) -> PathBuf {
    let ids = content_ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("-");
    let name = format!(
        ".fanout-backfill-{}-{}{}{}.state",
        range.start.format("%Y%m%dT%H%M%S"),
        range.end.format("%Y%m%dT%H%M%S"),
        if ids.is_empty() { "" } else { "-" },
        ids
    );
    PathBuf::from(name)
}

fn read_state(path: &Path) -> Result<i64, BackfillError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map_err(|_| BackfillError::State {
            path: path.into(),
            message: format!("`{}` is not a last id", s.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(BackfillError::State {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

fn write_state(path: &Path, last_id: i64) -> Result<(), BackfillError> {
    // Write-then-rename: a kill mid-write never leaves a torn checkpoint.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, last_id.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| BackfillError::State {
            path: path.into(),
            message: e.to_string(),
        })
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    total: u64,
    started: Instant,
    last_print: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            started: Instant::now(),
            last_print: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64) {
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        if self.last_print.elapsed() < every {
            return;
        }
        self.last_print = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            self.total.saturating_sub(done) as f64 / rate
        } else {
            0.0
        };
        let pct = if self.total > 0 {
            done as f64 * 100.0 / self.total as f64
        } else {
            100.0
        };
        if self.tty {
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64) as usize;
            let bar = format!(
                "{}{}",
                "#".repeat(filled.min(width)),
                "-".repeat(width - filled.min(width))
            );
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r[{bar}] {done}/{} {pct:5.1}% {rate:.0} rows/s ETA {eta:.0}s ",
                self.total
            );
            let _ = err.flush();
        } else {
            info!(
                done,
                total = self.total,
                rate = rate as u64,
                eta_s = eta as u64,
                "backfill progress"
            );
        }
    }

    fn finish(&mut self, done: u64) {
        if self.tty {
            self.last_print = Instant::now() - Duration::from_secs(10);
            self.update(done);
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_validated_before_work() {
        let r = TimeRange::parse("2026-01-08T09:00:00", "2026-01-08T10:00:00Z").unwrap();
        assert_eq!(r.start.to_rfc3339(), "2026-01-08T09:00:00+00:00");
        assert!(matches!(
            TimeRange::parse("2026-01-08T10:00:00", "2026-01-08T09:00:00"),
            Err(BackfillError::Reversed { .. })
        ));
        assert!(matches!(
            TimeRange::parse("2026-01-08T10:00:00", "2026-01-08T10:00:00"),
            Err(BackfillError::Reversed { .. })
        ));
        assert!(matches!(
            TimeRange::parse("soon", "2026-01-08T09:00:00"),
            Err(BackfillError::BadStart(..))
        ));
        assert!(matches!(
            TimeRange::parse("2026-01-08T09:00:00", "2026-13-08"),
            Err(BackfillError::BadEnd(..))
        ));
    }
}
