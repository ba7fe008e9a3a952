//! Batches: raw events accumulate with the offsets they came from until the batch is cut;
//! [`crate::enrich::enrich_batch`] turns a cut batch into the packed batch a plugin receives.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::deadletter::DeadLetter;
use crate::decode::{EventMessage, RawEvent};
use crate::lane::decoded::DecodedMessage;
use crate::plugin::{PluginBatch, SourceRange};

/// Where a record came from, kept so that it can be dead-lettered with its original bytes.
/// The bytes are shared: every lane holds the same message (see [`crate::lane::decoded`]).
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Arc<[u8]>>,
    pub payload: Option<Arc<[u8]>>,
}

/// An event in a batch, with what its dead letter would carry.
#[derive(Debug)]
pub enum PendingEvent {
    /// Consumed by a lane from the events topic: the message decoded once for every lane,
    /// read in place (nothing is copied per lane).
    Consumed {
        message: Arc<DecodedMessage>,
        partition: i32,
        offset: i64,
    },
    /// Made by the host: a backfilled row, a replayed dead letter. Boxed: a batch's events
    /// are moved twice per lane (into the batch, then into the delivered list), and the
    /// consumed ones, nearly all of them, are 24 bytes against this one's 180.
    Made(Box<(RawEvent, Origin)>),
}

/// A batch's events in order, and the topic its consumed ones came from.
#[derive(Debug, Default)]
pub struct PendingEvents {
    events: Vec<PendingEvent>,
    topic: Option<Arc<str>>,
}

impl PendingEvents {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn push(&mut self, event: PendingEvent) {
        self.events.push(event);
    }

    pub fn iter(&self) -> impl Iterator<Item = &PendingEvent> {
        self.events.iter()
    }

    /// The events, emptied out of a batch with the topic kept (for [`PendingEvents::origin`]).
    pub fn take(&mut self) -> Vec<PendingEvent> {
        std::mem::take(&mut self.events)
    }

    /// An empty list for the same topic.
    pub fn empty_like(&self) -> Self {
        PendingEvents {
            events: Vec::new(),
            topic: self.topic.clone(),
        }
    }

    /// Where the `index`th event came from, with its bytes (built for a dead letter only).
    pub fn origin(&self, index: usize) -> Option<Origin> {
        self.events.get(index).map(|e| e.origin(self.topic()))
    }

    /// The topic of the consumed events.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or("")
    }
}

impl PendingEvent {
    /// The event; None for a consumed message that is not an insert, which a lane never
    /// pushes.
    pub fn event(&self) -> Option<&RawEvent> {
        match self {
            PendingEvent::Consumed { message, .. } => match &message.outcome {
                Ok(EventMessage::Insert(event)) => Some(event),
                _ => None,
            },
            PendingEvent::Made(made) => Some(&made.0),
        }
    }

    /// (topic, partition, offset); `topic` is the consumed events' topic.
    pub fn position<'a>(&'a self, topic: &'a str) -> (&'a str, i32, i64) {
        match self {
            PendingEvent::Consumed {
                partition, offset, ..
            } => (topic, *partition, *offset),
            PendingEvent::Made(made) => (&made.1.topic, made.1.partition, made.1.offset),
        }
    }

    /// Where it came from, with its bytes; `topic` is the consumed events' topic.
    pub fn origin(&self, topic: &str) -> Origin {
        match self {
            PendingEvent::Consumed {
                message,
                partition,
                offset,
            } => Origin {
                topic: Arc::from(topic),
                partition: *partition,
                offset: *offset,
                key: message.key.clone(),
                payload: message.payload.clone(),
            },
            PendingEvent::Made(made) => made.1.clone(),
        }
    }
}

/// (topic, partition) -> (first, last) offset.
pub type OffsetRanges = BTreeMap<(String, i32), (i64, i64)>;

/// A batch being filled.
#[derive(Default)]
pub struct PendingBatch {
    events: PendingEvents,
    dead_letters: Vec<DeadLetter>,
    /// Every offset seen, skipped messages included: committing past a batch must also move
    /// past the updates and tombstones it skipped. By topic, then partition: found by `&str`,
    /// so recording a message's offset allocates nothing.
    offsets: BTreeMap<String, BTreeMap<i32, (i64, i64)>>,
    started: Option<Instant>,
    /// Source timestamp (ms since the epoch) of the oldest message in the batch: how far
    /// behind the lane is while this batch is not yet taken.
    oldest_ms: Option<i64>,
    /// When each event was committed in the source (ms), where known: the events' ages.
    committed_ms: Vec<i64>,
}

impl PendingBatch {
    pub fn record_offset(&mut self, topic: &str, partition: i32, offset: i64) {
        self.started.get_or_insert_with(Instant::now);
        let partitions = match self.offsets.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.offsets.entry(topic.to_string()).or_default(),
        };
        partitions
            .entry(partition)
            .and_modify(|(first, last)| {
                *first = (*first).min(offset);
                *last = (*last).max(offset);
            })
            .or_insert((offset, offset));
    }

    /// Remembers a message's source timestamp (ms); the oldest one wins.
    pub fn record_timestamp(&mut self, millis: i64) {
        self.oldest_ms = Some(self.oldest_ms.map_or(millis, |t| t.min(millis)));
    }

    /// An event the host made (a backfilled row, a replayed dead letter).
    pub fn push_event(&mut self, event: RawEvent, origin: Origin) {
        if let Some(ms) = event.source_ts_ms {
            self.committed_ms.push(ms);
        }
        self.events
            .push(PendingEvent::Made(Box::new((event, origin))));
    }

    /// An insert a lane consumed from `topic` (the events topic), committed in the source at
    /// `committed_ms` where known.
    pub fn push_consumed(
        &mut self,
        topic: &Arc<str>,
        message: Arc<DecodedMessage>,
        partition: i32,
        offset: i64,
        committed_ms: Option<i64>,
    ) {
        if self.events.topic.is_none() {
            self.events.topic = Some(Arc::clone(topic));
        }
        if let Some(ms) = committed_ms {
            self.committed_ms.push(ms);
        }
        self.events.push(PendingEvent::Consumed {
            message,
            partition,
            offset,
        });
    }

    /// When the batch's events were committed in the source (ms since the epoch), for those
    /// whose time is known.
    pub fn take_committed_ms(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.committed_ms)
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

    pub fn oldest_ms(&self) -> Option<i64> {
        self.oldest_ms
    }

    /// The events, the dead letters, the offset ranges.
    pub fn into_parts(self) -> (PendingEvents, Vec<DeadLetter>, OffsetRanges) {
        let offsets = self
            .offsets
            .into_iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .into_iter()
                    .map(move |(partition, range)| ((topic.clone(), partition), range))
            })
            .collect();
        (self.events, self.dead_letters, offsets)
    }
}

/// "topic/partition:first-last,..." is stable for a replay of the same offsets.
pub fn batch_id(sources: &[SourceRange]) -> String {
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

/// An enriched batch, ready for a plugin.
pub struct ReadyBatch {
    pub plugin_batch: Arc<PluginBatch>,
    /// The batch's events as they were consumed, in the plugin batch's order: where a
    /// rejected event came from, with its bytes.
    pub events: PendingEvents,
    /// Records that cannot reach the plugin (undecodable, unknown content under dead-letter).
    pub dead_letters: Vec<DeadLetter>,
    /// (topic, partition) -> last offset in the batch.
    pub offsets: BTreeMap<(String, i32), i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumed_event_is_small() {
        assert!(std::mem::size_of::<PendingEvent>() <= 24);
    }

    #[test]
    fn offsets_are_ranges_per_topic_and_partition() {
        let mut batch = PendingBatch::default();
        assert!(batch.is_empty());
        for (topic, partition, offset) in [
            ("b", 0, 7),
            ("a", 1, 5),
            ("a", 0, 9),
            ("a", 1, 3),
            ("a", 1, 4),
            ("b", 0, 8),
        ] {
            batch.record_offset(topic, partition, offset);
        }
        assert!(!batch.is_empty());
        assert!(batch.started().is_some());
        let (events, letters, offsets) = batch.into_parts();
        assert!(events.is_empty() && letters.is_empty());
        let expected: OffsetRanges = [
            (("a".to_string(), 0), (9, 9)),
            (("a".to_string(), 1), (3, 5)),
            (("b".to_string(), 0), (7, 8)),
        ]
        .into_iter()
        .collect();
        assert_eq!(offsets, expected);
    }
}
