//! The packed batch encoding (version 1, magic `FPB1`): how the events of a `packed-batch`
//! travel from the host to a plugin in one byte buffer, and how the SDK reads them in place.
//!
//! Why: handing a `list<enriched-event>` across the component boundary costs a record, up to
//! three string allocations and their frees per event inside the plugin; one buffer costs one
//! copy. The host writes this format (it uses [`PackedWriter`]), plugins read it with
//! [`PackedEvents`]; docs/wit.md describes it byte by byte for other languages.
//!
//! Layout, little-endian:
//! - header, 16 bytes: magic `FPB1`, event count (u32), row size (u32, 88 in version 1),
//!   string count (u32);
//! - `count` rows of `row size` bytes (a reader steps by the row size it is given, so fields
//!   appended in a later version are skipped by older readers);
//! - the string index: `string count` pairs (offset u32, length u32) into the string bytes;
//! - the string bytes (UTF-8). Repeated values (event types, devices, content types, the
//!   topic) are stored once per batch.
//!
//! A row (version 1):
//!
//! | offset | field | type |
//! |---|---|---|
//! | 0 | event_id | i64 |
//! | 8 | content_id | i64 (flag bit 0) |
//! | 16 | user_id | i64 (bit 1) |
//! | 24 | event_ts_micros | i64 |
//! | 32 | engagement_seconds | f64 (bit 4) |
//! | 40 | engagement_pct | f64 (bit 5) |
//! | 48 | Kafka offset | i64 (bit 6) |
//! | 56 | Kafka partition | i32 (bit 6) |
//! | 60 | duration_ms | i32 (bit 2) |
//! | 64 | length_seconds | i32 (bit 3) |
//! | 68 | event_type | u32 string index, `u32::MAX` = none |
//! | 72 | device | u32 string index |
//! | 76 | content_type | u32 string index |
//! | 80 | Kafka topic | u32 string index (bit 6) |
//! | 84 | flags | u32: which optional numbers are present |

use std::fmt;

/// First four bytes of a version-1 buffer.
pub const MAGIC: [u8; 4] = *b"FPB1";
/// Bytes of the header.
pub const HEADER_BYTES: usize = 16;
/// Bytes of one row in version 1.
pub const ROW_BYTES: usize = 88;
/// Row offsets of the string fields.
pub(crate) const EVENT_TYPE_AT: usize = 68;
pub(crate) const DEVICE_AT: usize = 72;
pub(crate) const CONTENT_TYPE_AT: usize = 76;
/// String index meaning "none".
const NO_STRING: u32 = u32::MAX;

const F_CONTENT_ID: u32 = 1;
const F_USER_ID: u32 = 1 << 1;
const F_DURATION_MS: u32 = 1 << 2;
const F_LENGTH_SECONDS: u32 = 1 << 3;
const F_ENGAGEMENT_SECONDS: u32 = 1 << 4;
const F_ENGAGEMENT_PCT: u32 = 1 << 5;
const F_POSITION: u32 = 1 << 6;

/// Where an event sits in Kafka: the key of a per-partition high-water mark. Backfilled
/// events (read from PostgreSQL) have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The fields of one enriched event, borrowed: what [`PackedWriter::push`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EventFields<'a> {
    pub event_id: i64,
    pub content_id: Option<i64>,
    pub user_id: Option<i64>,
    pub event_type: Option<&'a str>,
    pub event_ts_micros: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub length_seconds: Option<i32>,
    pub engagement_seconds: Option<f64>,
    pub engagement_pct: Option<f64>,
    pub position: Option<Position<'a>>,
}

/// Builds a version-1 buffer, one event at a time.
#[derive(Debug, Default)]
pub struct PackedWriter {
    rows: Vec<u8>,
    count: u32,
    /// Distinct strings in first-seen order. A batch has a handful, so a linear scan beats
    /// hashing.
    strings: Vec<String>,
    /// Per string column (event type, device, content type, topic): the indexes of the
    /// strings seen in it, the last one interned first. A value is searched among its own
    /// column's few values only (each comparison of equal lengths is a `memcmp` call).
    columns: [Vec<u32>; 4],
}

impl PackedWriter {
    pub fn with_capacity(events: usize) -> Self {
        PackedWriter {
            rows: Vec::with_capacity(events * ROW_BYTES),
            count: 0,
            strings: Vec::new(),
            columns: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn intern(&mut self, column: usize, s: Option<&str>) -> u32 {
        let Some(s) = s else { return NO_STRING };
        let seen = &mut self.columns[column];
        let strings = &self.strings;
        if let Some(at) = seen.iter().position(|&i| strings[i as usize] == s) {
            let i = seen[at];
            // Most recent first: runs of one value cost one comparison.
            seen[..=at].rotate_right(1);
            return i;
        }
        // A value first seen in another column is shared, not stored twice.
        let i = match self.strings.iter().position(|k| k == s) {
            Some(i) => i as u32,
            None => {
                self.strings.push(s.to_owned());
                (self.strings.len() - 1) as u32
            }
        };
        self.columns[column].insert(0, i);
        i
    }

    pub fn push(&mut self, e: &EventFields<'_>) {
        let mut flags = 0u32;
        let mut flag = |present: bool, bit: u32| {
            if present {
                flags |= bit;
            }
        };
        flag(e.content_id.is_some(), F_CONTENT_ID);
        flag(e.user_id.is_some(), F_USER_ID);
        flag(e.duration_ms.is_some(), F_DURATION_MS);
        flag(e.length_seconds.is_some(), F_LENGTH_SECONDS);
        flag(e.engagement_seconds.is_some(), F_ENGAGEMENT_SECONDS);
        flag(e.engagement_pct.is_some(), F_ENGAGEMENT_PCT);
        flag(e.position.is_some(), F_POSITION);
        let event_type = self.intern(0, e.event_type);
        let device = self.intern(1, e.device);
        let content_type = self.intern(2, e.content_type);
        let topic = self.intern(3, e.position.map(|p| p.topic));
        let (partition, offset) = e.position.map_or((0, 0), |p| (p.partition, p.offset));
        let r = &mut self.rows;
        r.extend_from_slice(&e.event_id.to_le_bytes());
        r.extend_from_slice(&e.content_id.unwrap_or(0).to_le_bytes());
        r.extend_from_slice(&e.user_id.unwrap_or(0).to_le_bytes());
        r.extend_from_slice(&e.event_ts_micros.to_le_bytes());
        r.extend_from_slice(&e.engagement_seconds.unwrap_or(0.0).to_le_bytes());
        r.extend_from_slice(&e.engagement_pct.unwrap_or(0.0).to_le_bytes());
        r.extend_from_slice(&offset.to_le_bytes());
        r.extend_from_slice(&partition.to_le_bytes());
        r.extend_from_slice(&e.duration_ms.unwrap_or(0).to_le_bytes());
        r.extend_from_slice(&e.length_seconds.unwrap_or(0).to_le_bytes());
        r.extend_from_slice(&event_type.to_le_bytes());
        r.extend_from_slice(&device.to_le_bytes());
        r.extend_from_slice(&content_type.to_le_bytes());
        r.extend_from_slice(&topic.to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        self.count += 1;
    }

    /// The finished buffer.
    pub fn finish(self) -> Vec<u8> {
        let text: usize = self.strings.iter().map(String::len).sum();
        let mut out =
            Vec::with_capacity(HEADER_BYTES + self.rows.len() + self.strings.len() * 8 + text);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(ROW_BYTES as u32).to_le_bytes());
        out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.rows);
        let mut at = 0u32;
        for s in &self.strings {
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            at += s.len() as u32;
        }
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
        }
        out
    }
}

/// Why a buffer is not a valid packed batch (a host bug or a foreign producer, never data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedError(String);

impl fmt::Display for PackedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid packed batch: {}", self.0)
    }
}

impl std::error::Error for PackedError {}

/// A validated version-1 buffer, read in place.
#[derive(Clone, PartialEq)]
pub struct PackedEvents {
    buf: Vec<u8>,
    count: usize,
    row_bytes: usize,
    /// The batch's distinct strings (a handful), validated and copied once so that reading
    /// one is free.
    strings: Vec<String>,
    /// The same strings as quoted, escaped JSON: the SPEC-4 record of every event repeats
    /// them, so they are escaped once per batch.
    json_strings: Vec<String>,
}

impl fmt::Debug for PackedEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(w)
}

impl PackedEvents {
    /// The events with one copy per event_id (the last one), in first-seen order: what a sink
    /// that keys rows by event id writes (a batch may hold a replayed copy).
    pub fn unique_by_event_id(&self) -> Vec<Event<'_>> {
        let mut index: rustc_hash::FxHashMap<i64, usize> =
            rustc_hash::FxHashMap::with_capacity_and_hasher(self.len(), Default::default());
        let mut out: Vec<Event<'_>> = Vec::with_capacity(self.len());
        for e in self.iter() {
            match index.get(&e.event_id()) {
                Some(&i) => out[i] = e,
                None => {
                    index.insert(e.event_id(), out.len());
                    out.push(e);
                }
            }
        }
        out
    }

    /// Checks the header, sizes, string table and every row's string indices, so that
    /// reading an event afterwards cannot fail.
    pub fn new(buf: Vec<u8>) -> Result<Self, PackedError> {
        let err = |m: &str| Err(PackedError(m.to_owned()));
        if buf.len() < HEADER_BYTES {
            return err("shorter than its header");
        }
        if buf[..4] != MAGIC {
            return err("bad magic (not FPB1)");
        }
        let count = u32_at(&buf, 4) as usize;
        let row_bytes = u32_at(&buf, 8) as usize;
        let string_count = u32_at(&buf, 12) as usize;
        if row_bytes < ROW_BYTES {
            return err("rows shorter than version 1's");
        }
        let rows_end = count
            .checked_mul(row_bytes)
            .and_then(|n| n.checked_add(HEADER_BYTES))
            .filter(|&n| n <= buf.len());
        let Some(rows_end) = rows_end else {
            return err("rows run past the end");
        };
        let text_start = string_count
            .checked_mul(8)
            .and_then(|n| n.checked_add(rows_end))
            .filter(|&n| n <= buf.len());
        let Some(text_start) = text_start else {
            return err("string index runs past the end");
        };
        let mut strings = Vec::with_capacity(string_count);
        for i in 0..string_count {
            let at = rows_end + i * 8;
            let start = text_start + u32_at(&buf, at) as usize;
            let end = start + u32_at(&buf, at + 4) as usize;
            match buf.get(start..end).map(std::str::from_utf8) {
                Some(Ok(s)) => strings.push(s.to_owned()),
                _ => return err("a string is out of bounds or not UTF-8"),
            }
        }
        for i in 0..count {
            let row = HEADER_BYTES + i * row_bytes;
            for field in [68, 72, 76, 80] {
                let idx = u32_at(&buf, row + field);
                if idx != NO_STRING && idx as usize >= string_count {
                    return err("a row names a string that does not exist");
                }
            }
            let flags = u32_at(&buf, row + 84);
            if flags & F_POSITION != 0 && u32_at(&buf, row + 80) == NO_STRING {
                return err("a position without a topic");
            }
        }
        let json_strings = strings
            .iter()
            .map(|s| {
                let mut quoted = String::with_capacity(s.len() + 2);
                crate::event::push_json_str(&mut quoted, s);
                quoted
            })
            .collect();
        Ok(PackedEvents {
            buf,
            count,
            row_bytes,
            strings,
            json_strings,
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The event at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Event<'_>> {
        (index < self.count).then(|| {
            let start = HEADER_BYTES + index * self.row_bytes;
            Event {
                row: &self.buf[start..start + ROW_BYTES],
                events: self,
            }
        })
    }

    pub fn iter(&self) -> Events<'_> {
        Events {
            events: self,
            next: 0,
        }
    }

    /// The buffer as it arrived.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    fn string(&self, index: u32) -> Option<&str> {
        self.strings.get(index as usize).map(String::as_str)
    }

    fn json_string(&self, index: u32) -> Option<&str> {
        self.json_strings.get(index as usize).map(String::as_str)
    }
}

impl<'a> IntoIterator for &'a PackedEvents {
    type Item = Event<'a>;
    type IntoIter = Events<'a>;
    fn into_iter(self) -> Events<'a> {
        self.iter()
    }
}

/// The events of a batch, in order.
#[derive(Clone)]
pub struct Events<'a> {
    events: &'a PackedEvents,
    next: usize,
}

impl<'a> Iterator for Events<'a> {
    type Item = Event<'a>;
    fn next(&mut self) -> Option<Event<'a>> {
        let e = self.events.get(self.next)?;
        self.next += 1;
        Some(e)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.events.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Events<'_> {}

/// One enriched event (SPEC section 4), read from the batch's buffer on access.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    row: &'a [u8],
    events: &'a PackedEvents,
}

impl PartialEq for Event<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fields().fmt(f)
    }
}

impl<'a> Event<'a> {
    fn flag(&self, bit: u32) -> bool {
        u32_at(self.row, 84) & bit != 0
    }
    fn i64_if(&self, at: usize, bit: u32) -> Option<i64> {
        self.flag(bit).then(|| i64_at(self.row, at))
    }
    fn i32_if(&self, at: usize, bit: u32) -> Option<i32> {
        self.flag(bit).then(|| i32_at(self.row, at))
    }
    fn f64_if(&self, at: usize, bit: u32) -> Option<f64> {
        self.flag(bit)
            .then(|| f64::from_bits(i64_at(self.row, at) as u64))
    }
    fn str_at(&self, at: usize) -> Option<&'a str> {
        match u32_at(self.row, at) {
            NO_STRING => None,
            i => self.events.string(i),
        }
    }

    /// The string field at `at` as quoted, escaped JSON (for [`crate::write_event_json`]).
    pub(crate) fn json_str_at(&self, at: usize) -> Option<&'a str> {
        match u32_at(self.row, at) {
            NO_STRING => None,
            i => self.events.json_string(i),
        }
    }

    /// engagement_events.id: the idempotency key of every sink.
    pub fn event_id(&self) -> i64 {
        i64_at(self.row, 0)
    }
    pub fn content_id(&self) -> Option<i64> {
        self.i64_if(8, F_CONTENT_ID)
    }
    pub fn user_id(&self) -> Option<i64> {
        self.i64_if(16, F_USER_ID)
    }
    pub fn event_type(&self) -> Option<&'a str> {
        self.str_at(EVENT_TYPE_AT)
    }
    /// Event time, UTC microseconds since the Unix epoch.
    pub fn event_ts_micros(&self) -> i64 {
        i64_at(self.row, 24)
    }
    pub fn duration_ms(&self) -> Option<i32> {
        self.i32_if(60, F_DURATION_MS)
    }
    pub fn device(&self) -> Option<&'a str> {
        self.str_at(DEVICE_AT)
    }
    /// From the content table; none when the content row is unknown.
    pub fn content_type(&self) -> Option<&'a str> {
        self.str_at(CONTENT_TYPE_AT)
    }
    pub fn length_seconds(&self) -> Option<i32> {
        self.i32_if(64, F_LENGTH_SECONDS)
    }
    /// duration_ms / 1000.0.
    pub fn engagement_seconds(&self) -> Option<f64> {
        self.f64_if(32, F_ENGAGEMENT_SECONDS)
    }
    /// Rounded half away from zero to two decimals by the host.
    pub fn engagement_pct(&self) -> Option<f64> {
        self.f64_if(40, F_ENGAGEMENT_PCT)
    }
    /// The event's Kafka position; none for backfilled events.
    pub fn position(&self) -> Option<Position<'a>> {
        if !self.flag(F_POSITION) {
            return None;
        }
        Some(Position {
            topic: self.str_at(80).unwrap_or_default(),
            partition: i32_at(self.row, 56),
            offset: i64_at(self.row, 48),
        })
    }

    /// Every field at once.
    pub fn fields(&self) -> EventFields<'a> {
        EventFields {
            event_id: self.event_id(),
            content_id: self.content_id(),
            user_id: self.user_id(),
            event_type: self.event_type(),
            event_ts_micros: self.event_ts_micros(),
            duration_ms: self.duration_ms(),
            device: self.device(),
            content_type: self.content_type(),
            length_seconds: self.length_seconds(),
            engagement_seconds: self.engagement_seconds(),
            engagement_pct: self.engagement_pct(),
            position: self.position(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(id: i64) -> EventFields<'static> {
        EventFields {
            event_id: id,
            content_id: Some(7),
            user_id: Some(-3),
            event_type: Some("play"),
            event_ts_micros: 1_767_882_112_000_001,
            duration_ms: Some(7000),
            device: Some("web"),
            content_type: Some("video"),
            length_seconds: Some(300),
            engagement_seconds: Some(7.0),
            engagement_pct: Some(0.02),
            position: Some(Position {
                topic: "events",
                partition: 3,
                offset: 1 << 40,
            }),
        }
    }

    #[test]
    fn round_trip_keeps_every_field_and_absence() {
        let mut w = PackedWriter::default();
        let sparse = EventFields {
            event_id: 2,
            event_ts_micros: -5,
            ..Default::default()
        };
        w.push(&full(1));
        w.push(&sparse);
        w.push(&full(3));
        let p = PackedEvents::new(w.finish()).unwrap();
        assert_eq!(p.len(), 3);
        let got: Vec<_> = p.iter().map(|e| e.fields()).collect();
        assert_eq!(got, vec![full(1), sparse, full(3)]);
        assert_eq!(p.get(1).unwrap().position(), None);
        assert!(p.get(3).is_none());
        // "play", "web", "video", "events": stored once for two events.
        assert_eq!(p.strings.len(), 4);
    }

    #[test]
    fn strings_vary_per_column_and_repeat_across_columns() {
        let values = ["web", "ios", "play", "video", "", "web"];
        let mut w = PackedWriter::default();
        let mut sent = Vec::new();
        for i in 0..60usize {
            let pick = |k: usize| Some(values[(i * k + i / 7) % values.len()]);
            let e = EventFields {
                event_id: i as i64,
                event_type: pick(1),
                device: pick(5),
                content_type: if i % 4 == 0 { None } else { pick(3) },
                ..Default::default()
            };
            w.push(&e);
            sent.push(e);
        }
        let p = PackedEvents::new(w.finish()).unwrap();
        for (got, e) in p.iter().zip(&sent) {
            assert_eq!(got.event_type(), e.event_type, "event {}", e.event_id);
            assert_eq!(got.device(), e.device, "event {}", e.event_id);
            assert_eq!(got.content_type(), e.content_type, "event {}", e.event_id);
        }
    }

    #[test]
    fn empty_batch() {
        let p = PackedEvents::new(PackedWriter::default().finish()).unwrap();
        assert!(p.is_empty());
        assert_eq!(p.iter().count(), 0);
    }

    #[test]
    fn longer_rows_from_a_newer_writer_are_read_by_stride() {
        let mut w = PackedWriter::default();
        w.push(&full(1));
        w.push(&full(2));
        let v1 = w.finish();
        // Re-pack with 8 extra bytes per row, as a later version appending a field would.
        let mut v2 = v1[..HEADER_BYTES].to_vec();
        v2[8..12].copy_from_slice(&((ROW_BYTES + 8) as u32).to_le_bytes());
        for i in 0..2 {
            let s = HEADER_BYTES + i * ROW_BYTES;
            v2.extend_from_slice(&v1[s..s + ROW_BYTES]);
            v2.extend_from_slice(&[0xAB; 8]);
        }
        v2.extend_from_slice(&v1[HEADER_BYTES + 2 * ROW_BYTES..]);
        let p = PackedEvents::new(v2).unwrap();
        assert_eq!(p.get(1).unwrap().fields(), full(2));
    }

    #[test]
    fn corrupt_buffers_are_refused_not_read() {
        let mut w = PackedWriter::default();
        w.push(&full(1));
        let good = w.finish();
        assert!(PackedEvents::new(good[..10].to_vec()).is_err());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(PackedEvents::new(bad).is_err());
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(PackedEvents::new(bad).is_err());
        let mut bad = good.clone();
        // event_type index 9 of 4 strings.
        bad[HEADER_BYTES + 68..HEADER_BYTES + 72].copy_from_slice(&9u32.to_le_bytes());
        assert!(PackedEvents::new(bad).is_err());
        let mut bad = good;
        let last = bad.len() - 1;
        bad[last] = 0xFF;
        assert!(PackedEvents::new(bad).is_err());
    }
}
