//! Messages decoded once for every lane.
//!
//! Each lane consumes the events topic in its own group, so with N plugins every message
//! arrives N times. The first lane to see a message decodes it and keeps the result, with the
//! message's key and payload, in a window of the most recent offsets of its partition; the
//! others take it from there. Lanes at the head of the stream read the same offsets within
//! moments of each other; lanes catching up on a backlog drift apart at their sinks' paces, so
//! the windows hold as many bytes as `kafka.shared_decode_bytes` allows, over all partitions.
//! A lane that fell behind its partition's window decodes on its own, as every lane did
//! before, so a slow sink never holds memory or work back for the others.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use rustc_hash::FxHashMap;

use crate::decode::{decode_event, DecodeError, EventMessage};

/// One decoded message: what it means, and the bytes a dead letter carries.
#[derive(Debug)]
pub struct DecodedMessage {
    pub outcome: Result<EventMessage, DecodeError>,
    pub key: Option<Arc<[u8]>>,
    pub payload: Option<Arc<[u8]>>,
    /// The Kafka record's timestamp (ms), to tell this message from another at its offset.
    pub timestamp_ms: Option<i64>,
}

/// What a kept message is counted as beyond its key and payload: the decoded event, the
/// allocations' headers, the window's slot.
const ENTRY_OVERHEAD_BYTES: usize = 256;

impl DecodedMessage {
    /// The bytes it holds, as counted against the windows' budget.
    fn weight(&self) -> usize {
        self.key.as_deref().map_or(0, <[u8]>::len)
            + self.payload.as_deref().map_or(0, <[u8]>::len)
            + ENTRY_OVERHEAD_BYTES
    }

    fn decode(m: &BorrowedMessage<'_>, include_snapshot_reads: bool) -> Self {
        DecodedMessage {
            outcome: decode_event(m.payload(), include_snapshot_reads),
            key: m.key().map(Arc::from),
            payload: m.payload().map(Arc::from),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The same message: guards against a topic deleted and created again under the host,
    /// whose offsets start over with other messages. Key, timestamp and payload length tell
    /// them apart without reading the payload (comparing every byte was 2% of the host's CPU,
    /// and its tail 1%: cache misses on both copies).
    fn is(&self, m: &BorrowedMessage<'_>) -> bool {
        self.is_like(
            m.key(),
            m.timestamp().to_millis(),
            m.payload().map(<[u8]>::len),
        )
    }

    fn is_like(
        &self,
        key: Option<&[u8]>,
        timestamp_ms: Option<i64>,
        payload_len: Option<usize>,
    ) -> bool {
        self.key.as_deref() == key
            && self.timestamp_ms == timestamp_ms
            && self.payload.as_deref().map(<[u8]>::len) == payload_len
    }
}

/// The most recent decoded offsets of one partition: `entries[i]` is offset `first + i`
/// (`None` for an offset not seen, e.g. a transaction marker).
#[derive(Default)]
struct Window {
    first: i64,
    entries: VecDeque<Option<Arc<DecodedMessage>>>,
}

/// Offsets a window skips over (transaction markers, compacted records) before it starts over.
const MAX_GAP: i64 = 4096;

impl Window {
    fn get(&self, offset: i64) -> Option<&Arc<DecodedMessage>> {
        let i = usize::try_from(offset.checked_sub(self.first)?).ok()?;
        self.entries.get(i)?.as_ref()
    }

    /// Keeps `decoded` at `offset` when it extends the window forward; an offset behind the
    /// window (a lane catching up) is not kept. Returns the bytes added (its weight, or 0)
    /// and the bytes dropped (a window started over).
    fn put(&mut self, offset: i64, decoded: &Arc<DecodedMessage>) -> (usize, usize) {
        let end = self.first + self.entries.len() as i64;
        let mut dropped = 0;
        if self.entries.is_empty() || offset > end + MAX_GAP {
            // The first offset, or a jump far ahead: start the window over.
            dropped = self.entries.drain(..).flatten().map(|d| d.weight()).sum();
            self.first = offset;
        } else if offset < self.first {
            return (0, 0);
        } else if offset < end {
            let i = (offset - self.first) as usize;
            if self.entries[i].is_some() {
                return (0, 0);
            }
            self.entries[i] = Some(Arc::clone(decoded));
            return (decoded.weight(), 0);
        } else {
            for _ in end..offset {
                self.entries.push_back(None);
            }
        }
        self.entries.push_back(Some(Arc::clone(decoded)));
        (decoded.weight(), dropped)
    }

    /// Drops the oldest offset; the bytes it held.
    fn pop_oldest(&mut self) -> usize {
        match self.entries.pop_front() {
            Some(entry) => {
                self.first += 1;
                entry.map_or(0, |d| d.weight())
            }
            None => 0,
        }
    }
}

/// The windows of every partition and the bytes they hold.
#[derive(Default)]
struct Windows {
    partitions: FxHashMap<i32, Window>,
    bytes: usize,
}

impl Windows {
    /// Keeps `decoded` in its partition's window, then drops that window's oldest while the
    /// windows hold more than `budget` bytes (partitions read at the same pace keep about the
    /// same share).
    fn keep(&mut self, partition: i32, offset: i64, decoded: &Arc<DecodedMessage>, budget: usize) {
        let window = self.partitions.entry(partition).or_default();
        let (added, dropped) = window.put(offset, decoded);
        self.bytes = (self.bytes + added).saturating_sub(dropped);
        while self.bytes > budget && !window.entries.is_empty() {
            self.bytes = self.bytes.saturating_sub(window.pop_oldest());
        }
    }
}

/// The windows of every partition of the events topic, shared by the host's lanes.
pub struct DecodedMessages {
    topic: Arc<str>,
    include_snapshot_reads: bool,
    /// What the windows may hold together (key, payload and [`ENTRY_OVERHEAD_BYTES`] per
    /// message).
    budget_bytes: usize,
    windows: Mutex<Windows>,
    /// Messages decoded, and messages taken already decoded from the window.
    decoded: AtomicU64,
    shared: AtomicU64,
}

impl DecodedMessages {
    /// `budget_bytes`: what the windows hold together (0 turns sharing off: every lane
    /// decodes).
    pub fn new(topic: &str, include_snapshot_reads: bool, budget_bytes: usize) -> Self {
        DecodedMessages {
            topic: Arc::from(topic),
            include_snapshot_reads,
            budget_bytes,
            windows: Mutex::new(Windows::default()),
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

    /// The message decoded, by this lane or an earlier one; `events_topic`: it is from
    /// [`DecodedMessages::topic`] (only those are shared).
    pub fn get(&self, m: &BorrowedMessage<'_>, events_topic: bool) -> Arc<DecodedMessage> {
        if self.budget_bytes == 0 || !events_topic {
            self.decoded.fetch_add(1, Ordering::Relaxed);
            return Arc::new(DecodedMessage::decode(m, self.include_snapshot_reads));
        }
        let (partition, offset) = (m.partition(), m.offset());
        if let Ok(windows) = self.windows.lock() {
            if let Some(hit) = windows
                .partitions
                .get(&partition)
                .and_then(|w| w.get(offset))
            {
                if hit.is(m) {
                    self.shared.fetch_add(1, Ordering::Relaxed);
                    return Arc::clone(hit);
                }
            }
        }
        // Decoded outside the lock: the other lanes keep going meanwhile.
        self.decoded.fetch_add(1, Ordering::Relaxed);
        let decoded = Arc::new(DecodedMessage::decode(m, self.include_snapshot_reads));
        if let Ok(mut windows) = self.windows.lock() {
            windows.keep(partition, offset, &decoded, self.budget_bytes);
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
            timestamp_ms: None,
        })
    }

    /// What one test message weighs.
    const W: usize = 1 + ENTRY_OVERHEAD_BYTES;

    fn tag(w: &Window, offset: i64) -> Option<u8> {
        w.get(offset)
            .and_then(|d| d.payload.as_deref().map(|p| p[0]))
    }

    #[test]
    fn a_window_keeps_offsets_in_order_and_drops_the_oldest_first() {
        let mut w = Window::default();
        for o in 10..20 {
            assert_eq!(w.put(o, &decoded(o as u8)), (W, 0));
        }
        assert_eq!(tag(&w, 10), Some(10));
        assert_eq!(w.pop_oldest(), W);
        assert_eq!(tag(&w, 10), None, "dropped");
        assert_eq!(tag(&w, 11), Some(11));
        assert_eq!(tag(&w, 19), Some(19));
        assert_eq!(tag(&w, 20), None, "not seen yet");
        assert_eq!(w.entries.len(), 9);
    }

    #[test]
    fn gaps_and_late_offsets_do_not_shift_the_window() {
        let mut w = Window::default();
        w.put(5, &decoded(5));
        w.put(7, &decoded(7)); // 6 is a gap (a transaction marker)
        assert_eq!(tag(&w, 6), None);
        assert_eq!(tag(&w, 7), Some(7));
        assert_eq!(
            w.put(6, &decoded(6)),
            (W, 0),
            "seen late, still inside the window"
        );
        assert_eq!(tag(&w, 6), Some(6));
        assert_eq!(w.put(6, &decoded(9)), (0, 0), "kept once");
        assert_eq!(w.put(3, &decoded(3)), (0, 0), "behind the window: not kept");
        assert_eq!(tag(&w, 3), None);
        assert_eq!(tag(&w, 5), Some(5));
    }

    #[test]
    fn the_windows_hold_no_more_than_the_budget() {
        let mut ws = Windows::default();
        // Room for 10 messages over two partitions read at the same pace.
        for o in 0..100 {
            for p in 0..2 {
                ws.keep(p, o, &decoded(o as u8), 10 * W);
                assert!(ws.bytes <= 10 * W, "{} bytes", ws.bytes);
            }
        }
        let held = |ws: &Windows, p: i32| ws.partitions[&p].entries.len();
        assert_eq!(ws.bytes, 10 * W);
        assert_eq!((held(&ws, 0), held(&ws, 1)), (5, 5));
        assert_eq!(tag(&ws.partitions[&0], 99), Some(99), "the newest stay");
        assert_eq!(tag(&ws.partitions[&1], 94), None, "the oldest went");
    }

    #[test]
    fn another_message_at_a_kept_offset_is_told_apart() {
        let kept = DecodedMessage {
            outcome: Err(DecodeError::NotEnvelope("test")),
            key: Some(Arc::from(&b"k"[..])),
            payload: Some(Arc::from(vec![b'x'; 500])),
            timestamp_ms: Some(1_000),
        };
        let key = Some(&b"k"[..]);
        assert!(kept.is_like(key, Some(1_000), Some(500)));
        assert!(!kept.is_like(Some(b"j"), Some(1_000), Some(500)), "key");
        assert!(!kept.is_like(None, Some(1_000), Some(500)), "no key");
        assert!(!kept.is_like(key, Some(1_001), Some(500)), "timestamp");
        assert!(!kept.is_like(key, Some(1_000), Some(499)), "length");
        assert!(!kept.is_like(key, Some(1_000), None), "tombstone");
    }

    #[test]
    fn a_jump_far_ahead_starts_the_window_over() {
        let mut w = Window::default();
        w.put(1, &decoded(1));
        w.put(2, &decoded(2));
        assert_eq!(w.put(100_000, &decoded(100)), (W, 2 * W));
        assert_eq!(tag(&w, 1), None);
        assert_eq!(tag(&w, 100_000), Some(100));
        assert_eq!(w.entries.len(), 1);
    }
}
