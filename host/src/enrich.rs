//! Enrichment: an engagement event joined with its content row, exactly per SPEC section 4,
//! and a cut batch enriched as a whole (one content lookup for what the table lacks).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::{batch_id, PendingBatch, ReadyBatch};
use crate::config::{EnrichConfig, MissingContentPolicy};
use crate::content::ContentTable;
use crate::deadletter::{DeadLetter, Stage};
use crate::decode::{ContentRow, RawEvent};
use crate::metrics::LaneMetrics;
use crate::plugin::{EventPosition, PluginBatch, SourceRange, WitBatch};

/// The one enriched event type: the WIT record every plugin receives.
pub use crate::plugin::WitEvent as EnrichedEvent;

/// Joins one event with its content row (`None` when the content is unknown).
pub fn enrich(event: &RawEvent, content: Option<&ContentRow>) -> EnrichedEvent {
    let length_seconds = content.and_then(|c| c.length_seconds);
    EnrichedEvent {
        event_id: event.id,
        content_id: event.content_id,
        user_id: event.user_id,
        event_type: event.event_type.clone(),
        event_ts_micros: event.event_ts_micros,
        duration_ms: event.duration_ms,
        device: event.device.clone(),
        content_type: content.and_then(|c| c.content_type.clone()),
        length_seconds,
        // SPEC: NULL duration or NULL length makes both derived fields NULL.
        engagement_seconds: match (event.duration_ms, length_seconds) {
            (Some(d), Some(_)) => Some(f64::from(d) / 1000.0),
            _ => None,
        },
        engagement_pct: match (event.duration_ms, length_seconds) {
            (Some(d), Some(l)) => engagement_pct(d, l),
            _ => None,
        },
    }
}

/// Enriches a cut batch. Content ids the table lacks are looked up once for the batch (and
/// waited for up to `missing_content_wait_ms`); what is still unknown follows the configured
/// policy: delivered with NULL content fields, or dead-lettered (naming `lane`, the plugin
/// whose lane enriched it; none for a backfill, which enriches once for all plugins).
pub async fn enrich_batch(
    pending: PendingBatch,
    content: &ContentTable,
    cfg: &EnrichConfig,
    counters: &LaneMetrics,
    lane: Option<&str>,
) -> ReadyBatch {
    let (events, mut dead_letters, offsets) = pending.into_parts();
    let ids: Vec<i64> = events
        .iter()
        .filter_map(|(e, _)| e.content_id)
        .filter(|id| content.get(*id).is_none())
        .collect();
    let still_missing = if ids.is_empty() {
        Vec::new()
    } else {
        content
            .resolve_missing(&ids, Duration::from_millis(cfg.missing_content_wait_ms))
            .await
    };
    let sources: Vec<SourceRange> = offsets
        .iter()
        .map(|((topic, partition), (first, last))| SourceRange {
            topic: topic.clone(),
            partition: *partition,
            first_offset: *first,
            last_offset: *last,
        })
        .collect();
    // A backfill's origins name PostgreSQL pages, not Kafka positions.
    let positioned = lane.is_some();
    let mut enriched = Vec::with_capacity(events.len());
    let mut positions = Vec::with_capacity(if positioned { events.len() } else { 0 });
    let mut origins = HashMap::with_capacity(events.len());
    for (raw, origin) in events {
        let row = raw.content_id.and_then(|id| content.get(id));
        if row.is_none() {
            counters.events_missing_content.inc();
            let unknown = raw.content_id.is_some_and(|id| still_missing.contains(&id));
            if unknown && cfg.missing_content == MissingContentPolicy::DeadLetter {
                dead_letters.push(DeadLetter {
                    stage: Stage::Enrich,
                    plugin: lane.map(str::to_string),
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
        counters.events_enriched.inc();
        if positioned {
            let source = sources
                .iter()
                .position(|s| s.partition == origin.partition && s.topic == origin.topic);
            positions.push(source.map(|i| EventPosition {
                source: i as u32,
                offset: origin.offset,
            }));
        }
        origins.insert(event.event_id, origin);
        enriched.push(event);
    }
    ReadyBatch {
        plugin_batch: Arc::new(PluginBatch {
            wit: WitBatch {
                id: batch_id(&sources),
                events: enriched,
                sources,
            },
            positions,
        }),
        origins,
        dead_letters,
        offsets: offsets
            .into_iter()
            .map(|(k, (_, last))| (k, last))
            .collect(),
    }
}

/// round(duration_ms / 1000 / length_seconds, 2), half away from zero, on integers:
/// the percentage in hundredths is duration_ms / (10 * length_seconds). Dividing the rounded
/// integer by 100 gives the f64 nearest to the decimal, which prints exactly with two decimals.
/// A zero length has no percentage.
pub fn engagement_pct(duration_ms: i32, length_seconds: i32) -> Option<f64> {
    if length_seconds == 0 {
        return None;
    }
    let numerator = i64::from(duration_ms);
    let denominator = 10 * i64::from(length_seconds);
    let negative = (numerator < 0) != (denominator < 0);
    let (n, d) = (numerator.unsigned_abs(), denominator.unsigned_abs());
    let hundredths = (2 * n + d) / (2 * d);
    let hundredths = if negative {
        -(hundredths as i64)
    } else {
        hundredths as i64
    };
    Some(hundredths as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(duration_ms: Option<i32>) -> RawEvent {
        RawEvent {
            id: 16,
            content_id: Some(1),
            user_id: Some(999),
            event_type: Some("play".into()),
            event_ts_micros: 1_767_882_112_000_000,
            duration_ms,
            device: Some("web".into()),
        }
    }

    fn content(length: Option<i32>) -> ContentRow {
        ContentRow {
            content_type: Some("video".into()),
            length_seconds: length,
        }
    }

    /// (duration_ms, length_seconds, content known, engagement_seconds, engagement_pct)
    type Case = (Option<i32>, Option<i32>, bool, Option<f64>, Option<f64>);
    const CASES: &[Case] = &[
        // SPEC's example record.
        (Some(7000), Some(300), true, Some(7.0), Some(0.02)),
        // Half away from zero: 0.125 -> 0.13 (banker's rounding would give 0.12).
        (Some(1250), Some(10), true, Some(1.25), Some(0.13)),
        (Some(1150), Some(10), true, Some(1.15), Some(0.12)),
        (Some(1149), Some(10), true, Some(1.149), Some(0.11)),
        (Some(300_000), Some(300), true, Some(300.0), Some(1.0)),
        // Longer than the content: over 100 %.
        (Some(450_000), Some(300), true, Some(450.0), Some(1.5)),
        (Some(-1250), Some(10), true, Some(-1.25), Some(-0.13)),
        (Some(0), Some(300), true, Some(0.0), Some(0.0)),
        // NULL duration: both NULL.
        (None, Some(300), true, None, None),
        // NULL length: both NULL.
        (Some(7000), None, true, None, None),
        // Zero length: seconds known, no percentage, no infinity.
        (Some(7000), Some(0), true, Some(7.0), None),
        // Unknown content: content fields and derived fields NULL.
        (Some(7000), None, false, None, None),
    ];

    #[test]
    fn spec_section_4_rules() {
        for &(duration, length, known, seconds, pct) in CASES {
            let row = content(length);
            let out = enrich(&event(duration), known.then_some(&row));
            assert_eq!(
                out.engagement_seconds, seconds,
                "seconds for {duration:?}/{length:?}/{known}"
            );
            assert_eq!(
                out.engagement_pct, pct,
                "pct for {duration:?}/{length:?}/{known}"
            );
            assert_eq!(out.content_type.is_some(), known);
            assert_eq!(out.event_id, 16);
            assert_eq!(out.device.as_deref(), Some("web"));
        }
    }

    #[test]
    fn two_decimal_printing_is_exact() {
        // Every hundredth from 0.00 to 10.00 prints as itself.
        for h in 0..=1000 {
            let pct = engagement_pct(h * 10, 1).unwrap();
            assert_eq!(format!("{pct:.2}"), format!("{}.{:02}", h / 100, h % 100));
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert!(engagement_pct(i32::MAX, 1).is_some());
        assert!(engagement_pct(i32::MIN, -1).is_some());
    }
}
