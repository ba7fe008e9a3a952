//! Batches: raw events accumulate with the offsets they came from; a cut batch is enriched
//! (one content lookup for what the table lacks) into the WIT batch every plugin receives.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{EnrichConfig, MissingContentPolicy};
use crate::content::ContentTable;
use crate::deadletter::{DeadLetter, Stage};
use crate::decode::RawEvent;
use crate::enrich::{enrich, EnrichedEvent};
use crate::metrics::Metrics;
use crate::plugin::{SourceRange, WitBatch, WitEvent};

/// Where a record came from, kept so that it can be dead-lettered with its original bytes.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// A batch being filled.
#[derive(Default)]
pub struct PendingBatch {
    events: Vec<(RawEvent, Origin)>,
    dead_letters: Vec<DeadLetter>,
    /// (topic, partition) -> (first, last) offset seen, skipped messages included: committing
    /// past a batch must also move past the updates and tombstones it skipped.
    offsets: BTreeMap<(String, i32), (i64, i64)>,
    started: Option<Instant>,
}

impl PendingBatch {
    pub fn record_offset(&mut self, topic: &str, partition: i32, offset: i64) {
        self.started.get_or_insert_with(Instant::now);
        self.offsets
            .entry((topic.to_string(), partition))
            .and_modify(|(first, last)| {
                *first = (*first).min(offset);
                *last = (*last).max(offset);
            })
            .or_insert((offset, offset));
    }

    pub fn push_event(&mut self, event: RawEvent, origin: Origin) {
        self.events.push((event, origin));
    }

    pub fn push_dead_letter(&mut self, letter: DeadLetter) {
        self.dead_letters.push(letter);
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// True when nothing at all was consumed into it.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.events.is_empty() && self.dead_letters.is_empty()
    }

    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Enriches the batch. Content ids the table lacks are looked up once for the batch
    /// (and waited for up to `missing_content_wait_ms`); what is still unknown follows the
    /// configured policy.
    pub async fn prepare(
        self,
        content: &ContentTable,
        cfg: &EnrichConfig,
        metrics: &Metrics,
    ) -> ReadyBatch {
        let ids: Vec<i64> = self
            .events
            .iter()
            .filter_map(|(e, _)| e.content_id)
            .filter(|id| content.get(*id).is_none())
            .collect();
        let still_missing = if ids.is_empty() {
            Vec::new()
        } else {
            content
                .resolve_missing(
                    &ids,
                    std::time::Duration::from_millis(cfg.missing_content_wait_ms),
                )
                .await
        };
        let mut dead_letters = self.dead_letters;
        let mut enriched = Vec::with_capacity(self.events.len());
        let mut origins = HashMap::with_capacity(self.events.len());
        for (raw, origin) in self.events {
            let row = raw.content_id.and_then(|id| content.get(id));
            if row.is_none() {
                metrics.events_missing_content.inc();
                let unknown = raw.content_id.is_some_and(|id| still_missing.contains(&id));
                if unknown && cfg.missing_content == MissingContentPolicy::DeadLetter {
                    dead_letters.push(DeadLetter {
                        stage: Stage::Enrich,
                        plugin: None,
                        reason: format!(
                            "content_id {:?} is not in the content table",
                            raw.content_id
                        ),
                        origin,
                    });
                    continue;
                }
            }
            let event = enrich(&raw, row.as_ref());
            metrics.events_enriched.inc();
            origins.insert(event.event_id, origin);
            enriched.push(event);
        }
        let sources: Vec<SourceRange> = self
            .offsets
            .iter()
            .map(|((topic, partition), (first, last))| SourceRange {
                topic: topic.clone(),
                partition: *partition,
                first_offset: *first,
                last_offset: *last,
            })
            .collect();
        let id = batch_id(&sources);
        ReadyBatch {
            wit: Arc::new(WitBatch {
                id,
                events: enriched.iter().map(to_wit).collect(),
                sources,
            }),
            origins,
            dead_letters,
            offsets: self
                .offsets
                .into_iter()
                .map(|(k, (_, last))| (k, last))
                .collect(),
        }
    }
}

/// "topic/partition:first-last,..." is stable for a replay of the same offsets.
fn batch_id(sources: &[SourceRange]) -> String {
    sources
        .iter()
        .map(|s| {
            format!(
                "{}/{}:{}-{}",
                s.topic, s.partition, s.first_offset, s.last_offset
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// An enriched batch, ready for the plugins.
pub struct ReadyBatch {
    pub wit: Arc<WitBatch>,
    /// event_id -> where it came from, to dead-letter rejected events with their bytes.
    pub origins: HashMap<i64, Origin>,
    /// Records that cannot reach any plugin (undecodable, unknown content under dead-letter).
    pub dead_letters: Vec<DeadLetter>,
    /// (topic, partition) -> last offset in the batch.
    pub offsets: BTreeMap<(String, i32), i64>,
}

pub fn to_wit(e: &EnrichedEvent) -> WitEvent {
    WitEvent {
        event_id: e.event_id,
        content_id: e.content_id,
        user_id: e.user_id,
        event_type: e.event_type.clone(),
        event_ts_micros: e.event_ts_micros,
        duration_ms: e.duration_ms,
        device: e.device.clone(),
        content_type: e.content_type.clone(),
        length_seconds: e.length_seconds,
        engagement_seconds: e.engagement_seconds,
        engagement_pct: e.engagement_pct,
    }
}
