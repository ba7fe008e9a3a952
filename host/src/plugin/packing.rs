//! What a lane hands a plugin: the enriched batch with each event's Kafka position, in the
//! packed form (`fanout:sink/packed-sink`, docs/wit.md), and as WIT records for plugins that
//! take a list of records.

use fanout_sdk::packed::{EventFields, PackedError, PackedEvents, PackedWriter, Position};

use super::{PackedBatch, SourceRange, WitBatch, WitEvent};

/// Where one event of a batch sits in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    /// Index into the batch's `sources` (its topic and partition).
    pub source: u32,
    pub offset: i64,
}

/// A batch for any plugin, held in the packed encoding (version 1) that packed-sink plugins
/// take as is: a lane enriches straight into it, so no event record is built per event and
/// per lane. Records-world plugins (built before 0.1.2) get [`PluginBatch::wit`], read back
/// from the buffer for their call only.
#[derive(Debug, Clone)]
pub struct PluginBatch {
    packed: PackedBatch,
    len: usize,
}

impl PluginBatch {
    /// A batch from events already packed (by [`PackedWriter::push`], positions included).
    pub fn from_packed(id: String, sources: Vec<SourceRange>, events: PackedWriter) -> Self {
        PluginBatch {
            len: events.len(),
            packed: PackedBatch {
                id,
                sources,
                events: events.finish(),
            },
        }
    }

    /// Packs WIT records; `positions` has one entry per event, in order (where one is missing,
    /// the event has no Kafka position).
    pub fn new(wit: &WitBatch, positions: &[Option<EventPosition>]) -> Self {
        let mut w = PackedWriter::with_capacity(wit.events.len());
        for (i, e) in wit.events.iter().enumerate() {
            let position = positions.get(i).copied().flatten().and_then(|p| {
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
        Self::from_packed(wit.id.clone(), wit.sources.clone(), w)
    }

    /// A batch whose events have no Kafka position.
    pub fn unpositioned(wit: WitBatch) -> Self {
        Self::new(&wit, &[])
    }

    /// "topic/partition:first-last,...": stable for a replay of the same offsets.
    pub fn id(&self) -> &str {
        &self.packed.id
    }

    pub fn sources(&self) -> &[SourceRange] {
        &self.packed.sources
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What a packed-sink plugin's `write` takes.
    pub fn packed(&self) -> &PackedBatch {
        &self.packed
    }

    /// The events, read from a copy of the buffer (for what is rare: a rejection, a
    /// records-world plugin, a test).
    pub fn events(&self) -> Result<PackedEvents, PackedError> {
        PackedEvents::new(self.packed.events.clone())
    }

    /// The batch as WIT records, for a records-world plugin.
    pub fn wit(&self) -> Result<WitBatch, PackedError> {
        let events = self
            .events()?
            .iter()
            .map(|e| WitEvent {
                event_id: e.event_id(),
                content_id: e.content_id(),
                user_id: e.user_id(),
                event_type: e.event_type().map(str::to_owned),
                event_ts_micros: e.event_ts_micros(),
                duration_ms: e.duration_ms(),
                device: e.device().map(str::to_owned),
                content_type: e.content_type().map(str::to_owned),
                length_seconds: e.length_seconds(),
                engagement_seconds: e.engagement_seconds(),
                engagement_pct: e.engagement_pct(),
            })
            .collect();
        Ok(WitBatch {
            id: self.packed.id.clone(),
            events,
            sources: self.packed.sources.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{SourceRange, WitEvent};

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
        let wit = WitBatch {
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
        };
        let positions = [
            Some(EventPosition {
                source: 0,
                offset: 5,
            }),
            Some(EventPosition {
                source: 1,
                offset: 1,
            }),
            None,
        ];
        let batch = PluginBatch::new(&wit, &positions);
        assert_eq!((batch.len(), batch.id()), (3, wit.id.as_str()));
        // The bindings' records have no PartialEq: compared field by field through Debug.
        assert_eq!(
            format!("{:?}", batch.wit().unwrap()),
            format!("{wit:?}"),
            "records read back exactly"
        );
        let p = batch.packed();
        assert_eq!(p.sources.len(), 2);
        assert_eq!((p.sources[1].partition, p.sources[1].last_offset), (2, 1));
        let read = batch.events().unwrap();
        assert_eq!(read.len(), 3);
        for (got, sent) in read.iter().zip(&wit.events) {
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
