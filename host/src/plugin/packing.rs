//! What a lane hands a plugin: the enriched batch and each event's Kafka position, and its
//! packed form (`fanout:sink/packed-sink`, docs/wit.md) for plugins that take one buffer.

use fanout_sdk::packed::{EventFields, PackedWriter, Position};

use super::{PackedBatch, WitBatch};

/// Where one event of a batch sits in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    /// Index into the batch's `sources` (its topic and partition).
    pub source: u32,
    pub offset: i64,
}

/// A batch for any plugin: records-world plugins get `wit`, packed ones its packed form.
#[derive(Debug, Clone)]
pub struct PluginBatch {
    pub wit: WitBatch,
    /// One per event of `wit.events`, in order; none for backfilled events (read from
    /// PostgreSQL, not Kafka). Empty means none for every event.
    pub positions: Vec<Option<EventPosition>>,
}

impl PluginBatch {
    /// A batch whose events have no Kafka position.
    pub fn unpositioned(wit: WitBatch) -> Self {
        PluginBatch {
            wit,
            positions: Vec::new(),
        }
    }
}

/// The batch in the packed encoding, version 1.
pub fn packed(batch: &PluginBatch) -> PackedBatch {
    let wit = &batch.wit;
    let mut w = PackedWriter::with_capacity(wit.events.len());
    for (i, e) in wit.events.iter().enumerate() {
        let position = batch.positions.get(i).copied().flatten().and_then(|p| {
            let source = wit.sources.get(p.source as usize)?;
            Some(Position {
                topic: &source.topic,
                partition: source.partition,
                offset: p.offset,
            })
        });
        w.push(&EventFields {
            event_id: e.event_id,
            content_id: e.content_id,
            user_id: e.user_id,
            event_type: e.event_type.as_deref(),
            event_ts_micros: e.event_ts_micros,
            duration_ms: e.duration_ms,
            device: e.device.as_deref(),
            content_type: e.content_type.as_deref(),
            length_seconds: e.length_seconds,
            engagement_seconds: e.engagement_seconds,
            engagement_pct: e.engagement_pct,
            position,
        });
    }
    PackedBatch {
        id: wit.id.clone(),
        sources: wit.sources.clone(),
        events: w.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{SourceRange, WitEvent};
    use fanout_sdk::packed::PackedEvents;

    fn event(id: i64, device: Option<&str>) -> WitEvent {
        WitEvent {
            event_id: id,
            content_id: Some(id * 10),
            user_id: None,
            event_type: Some("play".into()),
            event_ts_micros: 1_767_882_112_000_000 + id,
            duration_ms: Some(7000),
            device: device.map(str::to_owned),
            content_type: None,
            length_seconds: Some(0),
            engagement_seconds: Some(7.0),
            engagement_pct: None,
        }
    }

    #[test]
    fn packed_events_read_back_as_sent_with_positions() {
        let batch = PluginBatch {
            wit: WitBatch {
                id: "events/0:5-9,events/2:1-1".into(),
                events: vec![event(1, Some("web")), event(2, None), event(3, Some("ios"))],
                sources: vec![
                    SourceRange {
                        topic: "events".into(),
                        partition: 0,
                        first_offset: 5,
                        last_offset: 9,
                    },
                    SourceRange {
                        topic: "events".into(),
                        partition: 2,
                        first_offset: 1,
                        last_offset: 1,
                    },
                ],
            },
            positions: vec![
                Some(EventPosition {
                    source: 0,
                    offset: 5,
                }),
                Some(EventPosition {
                    source: 1,
                    offset: 1,
                }),
                None,
            ],
        };
        let p = packed(&batch);
        assert_eq!(p.id, batch.wit.id);
        assert_eq!(p.sources.len(), 2);
        assert_eq!((p.sources[1].partition, p.sources[1].last_offset), (2, 1));
        let read = PackedEvents::new(p.events).unwrap();
        assert_eq!(read.len(), 3);
        for (got, sent) in read.iter().zip(&batch.wit.events) {
            assert_eq!(got.event_id(), sent.event_id);
            assert_eq!(got.content_id(), sent.content_id);
            assert_eq!(got.user_id(), None);
            assert_eq!(got.event_type(), Some("play"));
            assert_eq!(got.device(), sent.device.as_deref());
            assert_eq!(got.length_seconds(), Some(0));
            assert_eq!(got.engagement_pct(), None);
            assert_eq!(got.event_ts_micros(), sent.event_ts_micros);
        }
        let positions: Vec<_> = read
            .iter()
            .map(|e| {
                e.position()
                    .map(|p| (p.topic.to_owned(), p.partition, p.offset))
            })
            .collect();
        assert_eq!(
            positions,
            vec![
                Some(("events".to_owned(), 0, 5)),
                Some(("events".to_owned(), 2, 1)),
                None
            ]
        );
    }
}
