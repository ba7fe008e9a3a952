//! Messages decoded once for every lane.
//!
//! Each lane consumes the events topic in its own group, so with N plugins every message
//! arrives N times. Lanes at the head of the stream read the same offsets within moments of
//! each other: the first lane to see a message decodes it and keeps the result, with the
//! message's key and payload, in a window of the most recent offsets of its partition; the
//! others take it from there. A lane that fell behind the window decodes on its own, as every
//! lane did before, so a slow sink never holds memory or work back for the others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use crate::decode::{decode_event, DecodeError, EventMessage};

/// One decoded message: what it means, and the bytes a dead letter carries.
#[derive(Debug)]
pub struct DecodedMessage {
    pub outcome: Result<EventMessage, DecodeError>,
    pub key: Option<Arc<[u8]>>,
    pub payload: Option<Arc<[u8]>>,
}

impl DecodedMessage {
    fn decode(m: &BorrowedMessage<'_>, include_snapshot_reads: bool) -> Self {
        DecodedMessage {
            outcome: decode_event(m.payload(), include_snapshot_reads),
            key: m.key().map(Arc::from),
            payload: m.payload().map(Arc::from),
        }
    }

    /// The same message: guards against a topic deleted and created again under the host,
    /// whose offsets start over with other messages.
    fn is(&self, m: &BorrowedMessage<'_>) -> bool {
        self.payload.as_deref() == m.payload() && self.key.as_deref() == m.key()
    }
}

/// The most recent decoded offsets of one partition: `entries[i]` is offset `first + i`
/// (`None` for an offset not seen, e.g. a transaction marker).
#[derive(Default)]
struct Window {
    first: i64,
    entries: VecDeque<Option<Arc<DecodedMessage>>>,
}

impl Window {
    fn get(&self, offset: i64) -> Option<&Arc<DecodedMessage>> {
        let i = usize::try_from(offset.checked_sub(self.first)?).ok()?;
        self.entries.get(i)?.as_ref()
    }

    /// Keeps `decoded` at `offset` when it extends the window forward; an offset behind the
    /// window (a lane catching up) is not kept.
    fn put(&mut self, offset: i64, decoded: &Arc<DecodedMessage>, capacity: usize) {
        let end = self.first + self.entries.len() as i64;
        if self.entries.is_empty() || offset >= end + capacity as i64 {
            // The first offset, or a jump far ahead: start the window over.
            self.first = offset;
            self.entries.clear();
        } else if offset < self.first {
            return;
        } else if offset < end {
            let i = (offset - self.first) as usize;
            self.entries[i].get_or_insert_with(|| Arc::clone(decoded));
            return;
        } else {
            for _ in end..offset {
                self.entries.push_back(None);
            }
        }
        self.entries.push_back(Some(Arc::clone(decoded)));
        while self.entries.len() > capacity {
            self.entries.pop_front();
            self.first += 1;
        }
    }
}

/// The windows of every partition of the events topic, shared by the host's lanes.
pub struct DecodedMessages {
    topic: Arc<str>,
    include_snapshot_reads: bool,
    capacity: usize,
    partitions: Mutex<HashMap<i32, Window>>,
    /// Messages decoded, and messages taken already decoded from the window.
    decoded: AtomicU64,
    shared: AtomicU64,
}

impl DecodedMessages {
    /// `capacity`: offsets kept per partition (0 turns sharing off: every lane decodes).
    pub fn new(topic: &str, include_snapshot_reads: bool, capacity: usize) -> Self {
        DecodedMessages {
            topic: Arc::from(topic),
            include_snapshot_reads,
            capacity,
            partitions: Mutex::new(HashMap::new()),
            decoded: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// The topic's name, shared by every origin that records it.
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// (messages decoded, messages shared from the window) since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.decoded.load(Ordering::Relaxed),
            self.shared.load(Ordering::Relaxed),
        )
    }

    /// The message decoded, by this lane or an earlier one.
    pub fn get(&self, m: &BorrowedMessage<'_>) -> Arc<DecodedMessage> {
        if self.capacity == 0 || m.topic() != &*self.topic {
            self.decoded.fetch_add(1, Ordering::Relaxed);
            return Arc::new(DecodedMessage::decode(m, self.include_snapshot_reads));
        }
        let (partition, offset) = (m.partition(), m.offset());
        if let Ok(partitions) = self.partitions.lock() {
            if let Some(hit) = partitions.get(&partition).and_then(|w| w.get(offset)) {
                if hit.is(m) {
                    self.shared.fetch_add(1, Ordering::Relaxed);
                    return Arc::clone(hit);
                }
            }
        }
        // Decoded outside the lock: the other lanes keep going meanwhile.
        self.decoded.fetch_add(1, Ordering::Relaxed);
        let decoded = Arc::new(DecodedMessage::decode(m, self.include_snapshot_reads));
        if let Ok(mut partitions) = self.partitions.lock() {
            partitions
                .entry(partition)
                .or_default()
                .put(offset, &decoded, self.capacity);
        }
        decoded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(tag: u8) -> Arc<DecodedMessage> {
        Arc::new(DecodedMessage {
            outcome: Err(DecodeError::NotEnvelope("test")),
            key: None,
            payload: Some(Arc::from(vec![tag])),
        })
    }

    fn tag(w: &Window, offset: i64) -> Option<u8> {
        w.get(offset)
            .and_then(|d| d.payload.as_deref().map(|p| p[0]))
    }

    #[test]
    fn a_window_keeps_the_most_recent_offsets_only() {
        let mut w = Window::default();
        for o in 10..20 {
            w.put(o, &decoded(o as u8), 4);
        }
        assert_eq!(tag(&w, 15), None, "fell out of the window");
        assert_eq!(tag(&w, 16), Some(16));
        assert_eq!(tag(&w, 19), Some(19));
        assert_eq!(tag(&w, 20), None, "not seen yet");
        assert_eq!(w.entries.len(), 4);
    }

    #[test]
    fn gaps_and_late_offsets_do_not_shift_the_window() {
        let mut w = Window::default();
        w.put(5, &decoded(5), 8);
        w.put(7, &decoded(7), 8); // 6 is a gap (a transaction marker)
        assert_eq!(tag(&w, 6), None);
        assert_eq!(tag(&w, 7), Some(7));
        w.put(6, &decoded(6), 8); // seen late, still inside the window
        assert_eq!(tag(&w, 6), Some(6));
        w.put(3, &decoded(3), 8); // behind the window: not kept
        assert_eq!(tag(&w, 3), None);
        assert_eq!(tag(&w, 5), Some(5));
    }

    #[test]
    fn a_jump_far_ahead_starts_the_window_over() {
        let mut w = Window::default();
        w.put(1, &decoded(1), 4);
        w.put(100, &decoded(100), 4);
        assert_eq!(tag(&w, 1), None);
        assert_eq!(tag(&w, 100), Some(100));
        assert_eq!(w.entries.len(), 1);
    }
}
