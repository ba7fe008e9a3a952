//! `fanout dlq replay --plugin NAME`: the chosen dead letters of a plugin delivered to it again,
//! through the path live batches take (decode, enrichment with the content table, the
//! plugin's grants, limits and failure policy, dead letters for what it rejects again).
//!
//! Idempotent: every letter delivered is recorded in a ledger (a JSON-lines file, one line per
//! letter: dead-letter topic, partition, offset, plugin), written after its batch is durably
//! taken; a letter already in the ledger is never delivered again. A crash between a delivery
//! and its ledger line replays that batch once more, which the sinks' idempotency absorbs
//! (the batch id and event ids are the original ones).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{read, DlqError, Filter, Letter};
use crate::app::App;
use crate::batch::{Origin, PendingBatch};
use crate::decode::{decode_event, EventMessage};
use crate::enrich::enrich_batch;

pub struct ReplayOptions {
    pub plugin: String,
    /// Further conditions; its `plugin` is replaced by [`ReplayOptions::plugin`].
    pub filter: Filter,
    pub ledger: PathBuf,
    /// List what would be replayed, deliver nothing.
    pub dry_run: bool,
}

/// The default ledger: `fanout-dlq-replayed.jsonl` next to the config file.
pub fn default_ledger(config: &Path) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new(""))
        .join("fanout-dlq-replayed.jsonl")
}

/// One line of the ledger.
#[derive(Debug, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub dlq_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub plugin: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub event_id: i64,
    /// RFC 3339, when its batch was taken.
    pub replayed_at: String,
}

type LedgerKey = (String, i32, i64, String);

fn read_ledger(path: &Path) -> Result<BTreeSet<LedgerKey>, DlqError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => {
            return Err(DlqError::Ledger {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    let mut done = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LedgerEntry>(line) {
            Ok(e) => {
                done.insert((e.dlq_topic, e.partition, e.offset, e.plugin));
            }
            // A line torn by a crash mid-write: its batch is replayed again, which the sinks
            // absorb.
            Err(e) => {
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "replay ledger: ignoring a torn line");
            }
        }
    }
    Ok(done)
}

fn append_ledger(path: &Path, entries: &[LedgerEntry]) -> Result<(), DlqError> {
    let err = |e: std::io::Error| DlqError::Ledger {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    // After a torn line (a crash mid-write), start on a line of our own.
    let torn = std::fs::read(path)
        .map(|b| b.last().is_some_and(|c| *c != b'\n'))
        .unwrap_or(false);
    let mut text = if torn {
        "\n".to_string()
    } else {
        String::new()
    };
    for e in entries {
        let line = serde_json::to_string(e).map_err(|e| DlqError::Ledger {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

#[derive(Debug, Default, Serialize)]
pub struct ReplaySummary {
    /// Letters of the plugin matching the filters.
    pub matched: usize,
    /// Of those, already in the ledger: not delivered again.
    pub already_replayed: usize,
    /// Delivered to the plugin now (and recorded in the ledger).
    pub replayed: usize,
    /// Of the replayed events, rejected again by the plugin (new dead letters).
    pub dead_lettered_again: u64,
    /// Letters that cannot be replayed: no payload, not an insert event, still undecodable.
    /// Not recorded: a later replay reports them again.
    pub unreplayable: Vec<(String, String)>,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay done: matched={} already_replayed={} replayed={} dead_lettered_again={} unreplayable={}",
            self.matched,
            self.already_replayed,
            self.replayed,
            self.dead_lettered_again,
            self.unreplayable.len()
        )?;
        for (id, why) in &self.unreplayable {
            write!(f, "\n  not replayable: {id}: {why}")?;
        }
        Ok(())
    }
}

/// Replays the chosen letters of `opts.plugin` (the app is started with that plugin only).
pub async fn run(
    app: &App,
    opts: &ReplayOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<ReplaySummary, DlqError> {
    let plugin = app
        .plugins
        .iter()
        .find(|p| p.name() == opts.plugin)
        .ok_or_else(|| DlqError::Replay(format!("no plugin `{}` in the config", opts.plugin)))?
        .clone();
    let topic = app.config.kafka.dead_letter_topic.clone();
    let kafka = app.config.kafka.clone();
    let letters = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || read(&kafka, &topic, None, Duration::from_secs(120)))
            .await
            .map_err(|e| DlqError::Replay(e.to_string()))??
    };
    let mut filter = opts.filter.clone();
    filter.plugin = Some(opts.plugin.clone());
    let chosen: Vec<Letter> = letters.into_iter().filter(|l| filter.matches(l)).collect();
    let done = read_ledger(&opts.ledger)?;
    let mut summary = ReplaySummary {
        matched: chosen.len(),
        ..Default::default()
    };
    let mut todo = Vec::new();
    for letter in chosen {
        let key = (
            topic.clone(),
            letter.partition,
            letter.offset,
            opts.plugin.clone(),
        );
        if done.contains(&key) {
            summary.already_replayed += 1;
            continue;
        }
        match decode_event(letter.payload.as_deref(), true) {
            Ok(EventMessage::Insert(event)) => todo.push((letter, event)),
            Ok(EventMessage::Skip(reason)) => summary
                .unreplayable
                .push((letter.id(), format!("not an insert ({})", reason.as_str()))),
            Err(e) => summary.unreplayable.push((
                letter.id(),
                match &letter.payload {
                    None => "the letter carries no payload".to_string(),
                    Some(_) => format!("still undecodable: {e}"),
                },
            )),
        }
    }
    if opts.dry_run {
        for (letter, event) in &todo {
            println!(
                "would replay {} (event {}, from {}/{}@{}): {}",
                letter.id(),
                event.id,
                letter.source_topic,
                letter.source_partition,
                letter.source_offset,
                letter.reason
            );
        }
        return Ok(summary);
    }
    let delivery = app.delivery(&plugin);
    let counters = app.metrics.lane(&opts.plugin);
    let dead_before = app.metrics.sum_labelled("fanout_dead_lettered_total");
    let max_events = app.config.lane_batch(&plugin.config).max_events;
    for chunk in todo.chunks(max_events.max(1)) {
        if *shutdown.borrow() {
            return Err(DlqError::Replay(format!(
                "stopped after {} letters; run again to replay the rest",
                summary.replayed
            )));
        }
        let mut pending = PendingBatch::default();
        for (letter, event) in chunk {
            // The original coordinates: the batch id and a new dead letter name the source.
            pending.record_offset(
                &letter.source_topic,
                letter.source_partition,
                letter.source_offset,
            );
            pending.push_event(
                event.clone(),
                Origin {
                    topic: letter.source_topic.as_str().into(),
                    partition: letter.source_partition,
                    offset: letter.source_offset,
                    key: letter.key.as_deref().map(std::sync::Arc::from),
                    payload: letter.payload.as_deref().map(std::sync::Arc::from),
                },
            );
        }
        let batch = enrich_batch(
            pending,
            &app.content,
            &app.config.enrich,
            &counters,
            Some(&opts.plugin),
        )
        .await;
        delivery
            .deliver(&batch, &shutdown)
            .await
            .map_err(|e| DlqError::Replay(format!("{e}; run again to replay the rest")))?;
        let now = chrono::Utc::now().to_rfc3339();
        let entries: Vec<LedgerEntry> = chunk
            .iter()
            .map(|(l, e)| LedgerEntry {
                dlq_topic: topic.clone(),
                partition: l.partition,
                offset: l.offset,
                plugin: opts.plugin.clone(),
                source_topic: l.source_topic.clone(),
                source_partition: l.source_partition,
                source_offset: l.source_offset,
                event_id: e.id,
                replayed_at: now.clone(),
            })
            .collect();
        append_ledger(&opts.ledger, &entries)?;
        summary.replayed += chunk.len();
    }
    summary.dead_lettered_again =
        (app.metrics.sum_labelled("fanout_dead_lettered_total") - dead_before) as u64;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_round_trips_and_tolerates_a_torn_last_line() {
        let dir = std::env::temp_dir().join(format!("fanout-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.jsonl");
        let _ = std::fs::remove_file(&path);
        assert!(read_ledger(&path).unwrap().is_empty());
        let entry = |offset| LedgerEntry {
            dlq_topic: "dlq".into(),
            partition: 0,
            offset,
            plugin: "p".into(),
            source_topic: "t".into(),
            source_partition: 1,
            source_offset: 9,
            event_id: 3,
            replayed_at: "2026-01-01T00:00:00Z".into(),
        };
        append_ledger(&path, &[entry(1), entry(2)]).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"dlq_topic\":\"dl").unwrap();
        let done = read_ledger(&path).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.contains(&("dlq".into(), 0, 2, "p".into())));
        append_ledger(&path, &[entry(3)]).unwrap();
        let done = read_ledger(&path).unwrap();
        assert_eq!(done.len(), 3, "a line appended after a torn one is read");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
