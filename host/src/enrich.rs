//! Enrichment: an engagement event joined with its content row, exactly per SPEC section 4,
//! and a cut batch enriched as a whole (one content lookup for what the table lacks).

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
    join(event.clone(), content)
}

/// [`enrich`], taking the event: its strings move into the enriched event, not copied.
fn join(event: RawEvent, content: Option<&ContentRow>) -> EnrichedEvent {
    let length_seconds = content.and_then(|c| c.length_seconds);
    EnrichedEvent {
        event_id: event.id,
        content_id: event.content_id,
        user_id: event.user_id,
        event_type: event.event_type,
        event_ts_micros: event.event_ts_micros,
        duration_ms: event.duration_ms,
        device: event.device,
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
    let ids: Vec<i64> = match content.rows() {
        Some(rows) => events
            .iter()
            .filter_map(|(e, _)| e.content_id)
            .filter(|id| !rows.contains_key(id))
            .collect(),
        None => events.iter().filter_map(|(e, _)| e.content_id).collect(),
    };
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
    let mut origins = Vec::with_capacity(events.len());
    let mut missing_content = 0;
    // One read lock for the batch (nothing is awaited below) and no row cloned per event.
    let rows = content.rows();
    // Events come in runs from one partition: the last source found is tried first.
    let mut last_source = 0;
    for (raw, origin) in events {
        let row = raw
            .content_id
            .and_then(|id| rows.as_ref().and_then(|rows| rows.get(&id)));
        if row.is_none() {
            missing_content += 1;
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
        let event = join(raw, row);
        if positioned {
            let is_origin =
                |s: &SourceRange| s.partition == origin.partition && *s.topic == *origin.topic;
            let source = if sources.get(last_source).is_some_and(is_origin) {
                Some(last_source)
            } else {
                sources.iter().position(is_origin)
            };
            last_source = source.unwrap_or(last_source);
            positions.push(source.map(|i| EventPosition {
                source: i as u32,
                offset: origin.offset,
            }));
        }
        origins.push(origin);
        enriched.push(event);
    }
    drop(rows);
    counters.events_missing_content.add(missing_content);
    counters.events_enriched.add(enriched.len() as u64);
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
            source_ts_ms: None,
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

    /// A batch from two partitions (offsets in runs and interleaved), with known, unknown and
    /// no content, under the dead-letter policy.
    #[test]
    fn a_batch_is_enriched_with_positions_and_counts() {
        use crate::batch::{Origin, PendingBatch};
        let table = ContentTable::default();
        table.upsert(1, content(Some(300)));
        let mut pending = PendingBatch::default();
        let topic = "events";
        let places = [(0, 10), (0, 11), (1, 5), (0, 12), (1, 6)];
        for (i, (partition, offset)) in places.into_iter().enumerate() {
            pending.record_offset(topic, partition, offset);
            let mut ev = event(Some(7000));
            ev.id = i as i64;
            ev.content_id = [Some(1), Some(1), Some(2), None, Some(1)][i];
            let origin = Origin {
                topic: topic.into(),
                partition,
                offset,
                key: None,
                payload: Some(vec![i as u8].into()),
            };
            pending.push_event(ev, origin);
        }
        let cfg = EnrichConfig {
            missing_content: MissingContentPolicy::DeadLetter,
            missing_content_wait_ms: 0,
        };
        let counters = LaneMetrics::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let ready = rt.block_on(enrich_batch(pending, &table, &cfg, &counters, Some("l")));
        let batch = &ready.plugin_batch;
        // Event 2 names unknown content: dead-lettered; event 3 names none: delivered.
        let ids: Vec<i64> = batch.wit.events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, [0, 1, 3, 4]);
        assert_eq!(batch.wit.events[0].content_type.as_deref(), Some("video"));
        assert_eq!(batch.wit.events[0].engagement_pct, Some(0.02));
        assert_eq!(batch.wit.events[2].content_type, None);
        assert_eq!(batch.wit.events[1].event_type.as_deref(), Some("play"));
        let positions: Vec<(u32, i64)> = batch
            .positions
            .iter()
            .map(|p| p.as_ref().map(|p| (p.source, p.offset)).unwrap())
            .collect();
        assert_eq!(positions, [(0, 10), (0, 11), (0, 12), (1, 6)]);
        assert_eq!(batch.wit.id, "events/0:10-12,events/1:5-6");
        assert_eq!(ready.dead_letters.len(), 1);
        assert_eq!(
            ready.dead_letters[0].origin.payload.as_deref(),
            Some(&[2u8][..])
        );
        assert_eq!(ready.origins[3].offset, 6);
        assert_eq!(counters.events_enriched.get(), 4);
        assert_eq!(counters.events_missing_content.get(), 2);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert!(engagement_pct(i32::MAX, 1).is_some());
        assert!(engagement_pct(i32::MIN, -1).is_some());
    }
}

/// Micro-benchmark of a lane's per-event work after decoding: batching and enrichment.
/// `cargo test --release -p fanout bench_ -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::batch::Origin;
    use crate::decode::bench::cpu_ns;
    use std::time::Instant;

    #[test]
    #[ignore = "benchmark: run with --release --ignored --nocapture"]
    fn bench_batch_enrich() {
        let doc: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/envelopes/insert_with_schema.json"
        ))
        .unwrap();
        let payload = doc["value"].as_str().unwrap().as_bytes().to_vec();
        let topic = "dbserver1.public.engagement_events";
        let content = ContentTable::default();
        for id in 0..50 {
            content.upsert(
                id,
                ContentRow {
                    content_type: Some("video".into()),
                    length_seconds: Some(300),
                },
            );
        }
        let events: Vec<RawEvent> = (0..500)
            .map(|i| RawEvent {
                id: i,
                content_id: Some(i % 50),
                user_id: Some(7),
                event_type: Some("play".into()),
                event_ts_micros: 1_767_882_112_000_000,
                duration_ms: Some(7000),
                device: Some("web".into()),
                source_ts_ms: None,
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (cfg, counters) = (EnrichConfig::default(), LaneMetrics::default());
        // Origins with the message's bytes, as the lane keeps them (freeing them is much of
        // the time, and noisy), and without, to see the batch's own work.
        for (shape, bytes) in [
            ("origins with payload", payload.len()),
            ("origins without", 0),
        ] {
            let mut best = f64::MAX;
            let wall = Instant::now();
            for _ in 0..10 {
                let (start, mut cpu, mut n) = (Instant::now(), 0, 0u64);
                while start.elapsed().as_millis() < 300 {
                    // What the lane hands over (decoded events, origins, from 4 partitions in
                    // runs) is made outside the measurement.
                    let made: Vec<(RawEvent, Origin)> = events
                        .iter()
                        .enumerate()
                        .map(|(i, ev)| {
                            let origin = Origin {
                                topic: topic.into(),
                                partition: (i / 125) as i32,
                                offset: i as i64,
                                key: Some(br#"{"id":1}"#.to_vec().into()),
                                payload: Some(payload[..bytes].to_vec().into()),
                            };
                            (ev.clone(), origin)
                        })
                        .collect();
                    let before = cpu_ns(wall);
                    let mut pending = crate::batch::PendingBatch::default();
                    for (ev, origin) in made {
                        pending.record_offset(topic, origin.partition, origin.offset);
                        pending.record_timestamp(1_767_882_112_000);
                        pending.push_event(ev, origin);
                    }
                    let ready = rt.block_on(enrich_batch(
                        pending,
                        &content,
                        &cfg,
                        &counters,
                        Some("lane"),
                    ));
                    drop(std::hint::black_box(ready));
                    cpu += cpu_ns(wall) - before;
                    n += events.len() as u64;
                }
                best = best.min(cpu as f64 / n as f64);
            }
            println!("batch + enrich + drop, {shape:20} {best:8.0} ns/event");
        }
    }
}
