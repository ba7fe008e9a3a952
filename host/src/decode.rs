//! Decoding Debezium change events (JSON converter, with or without the schema wrapper).
//!
//! Only what the pipeline needs is read; unknown columns are ignored so that a column added to
//! the source table does not break the stream.
//!
//! This runs for every message of every lane, so nothing is built that is not used: visitors
//! read the message into borrowed column values (no `serde_json::Value`), and the `schema`
//! wrapper, most of a wrapped message and the same in every message of a table version, is
//! read once per distinct text and afterwards only compared.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Number, Value};

/// An engagement_events row as it arrived, before enrichment.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub id: i64,
    pub content_id: Option<i64>,
    pub user_id: Option<i64>,
    pub event_type: Option<String>,
    /// UTC microseconds since the epoch.
    pub event_ts_micros: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    /// When the row was committed in the source database (Debezium `source.ts_ms`, ms since
    /// the epoch) when the envelope says; the lane falls back to the Kafka record's time.
    /// What an event's age is measured from.
    pub source_ts_ms: Option<i64>,
}

/// A content row, the dimension events are enriched with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContentRow {
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
}

/// What one message of the events topic means for the pipeline.
#[derive(Debug, PartialEq)]
pub enum EventMessage {
    Insert(RawEvent),
    Skip(SkipReason),
}

/// What one message of the content topic means for the content table.
#[derive(Debug, PartialEq)]
pub enum ContentMessage {
    Upsert(i64, ContentRow),
    Delete(i64),
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Update,
    Delete,
    Tombstone,
    SnapshotRead,
    Truncate,
    Message,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Update => "update",
            SkipReason::Delete => "delete",
            SkipReason::Tombstone => "tombstone",
            SkipReason::SnapshotRead => "snapshot_read",
            SkipReason::Truncate => "truncate",
            SkipReason::Message => "message",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a Debezium envelope: {0}")]
    NotEnvelope(&'static str),
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("missing required column `{0}`")]
    Missing(&'static str),
    #[error("column `{column}`: {message}")]
    BadColumn {
        column: &'static str,
        message: String,
    },
}

/// How a timestamp column is encoded: Debezium picks it from the column type and the
/// connector's time.precision.mode; the schema wrapper names it, a bare payload does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeUnit {
    Millis,
    Micros,
    Nanos,
    /// No schema: guess from the magnitude.
    Unknown,
}

/// The column whose unit the schema wrapper is read for.
const EVENT_TS: &str = "event_ts";

/// Decodes one message value of the engagement_events topic. `None` is a tombstone.
pub fn decode_event(
    bytes: Option<&[u8]>,
    include_snapshot_reads: bool,
) -> Result<EventMessage, DecodeError> {
    let Some(bytes) = bytes else {
        return Ok(EventMessage::Skip(SkipReason::Tombstone));
    };
    let mut msg = Message::default();
    let Some((payload, ts_unit)) = envelope(bytes, true, &mut msg)? else {
        return Ok(EventMessage::Skip(SkipReason::Tombstone));
    };
    match op(payload)? {
        "c" => {}
        "r" if include_snapshot_reads => {}
        "r" => return Ok(EventMessage::Skip(SkipReason::SnapshotRead)),
        "u" => return Ok(EventMessage::Skip(SkipReason::Update)),
        "d" => return Ok(EventMessage::Skip(SkipReason::Delete)),
        "t" => return Ok(EventMessage::Skip(SkipReason::Truncate)),
        "m" => return Ok(EventMessage::Skip(SkipReason::Message)),
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    }
    let after = payload
        .after
        .as_mut()
        .ok_or(DecodeError::NotEnvelope("insert without `after`"))?;
    Ok(EventMessage::Insert(RawEvent {
        id: int(after, C::Id)?.ok_or(DecodeError::Missing("id"))?,
        content_id: int(after, C::ContentId)?,
        user_id: int(after, C::UserId)?,
        event_type: text(after, C::EventType)?,
        event_ts_micros: timestamp(after, C::EventTs, ts_unit)?
            .ok_or(DecodeError::Missing("event_ts"))?,
        duration_ms: int32(after, C::DurationMs)?,
        device: text(after, C::Device)?,
        source_ts_ms: payload.source_ts_ms,
    }))
}

/// Decodes one message value of the content topic.
pub fn decode_content(bytes: Option<&[u8]>) -> Result<ContentMessage, DecodeError> {
    let Some(bytes) = bytes else {
        return Ok(ContentMessage::Ignore);
    };
    let mut msg = Message::default();
    let Some((payload, _)) = envelope(bytes, false, &mut msg)? else {
        return Ok(ContentMessage::Ignore);
    };
    match op(payload)? {
        "c" | "r" | "u" => {
            let after = payload
                .after
                .as_mut()
                .ok_or(DecodeError::NotEnvelope("change without `after`"))?;
            let id = int(after, C::ContentId)?.ok_or(DecodeError::Missing("content_id"))?;
            Ok(ContentMessage::Upsert(
                id,
                ContentRow {
                    content_type: text(after, C::ContentType)?,
                    length_seconds: int32(after, C::LengthSeconds)?,
                },
            ))
        }
        "d" => {
            let before = payload
                .before
                .as_ref()
                .ok_or(DecodeError::NotEnvelope("delete without `before`"))?;
            let id = int(before, C::ContentId)?.ok_or(DecodeError::Missing("content_id"))?;
            Ok(ContentMessage::Delete(id))
        }
        "t" | "m" => Ok(ContentMessage::Ignore),
        other => Err(DecodeError::UnknownOp(other.to_string())),
    }
}

fn op<'p>(payload: &'p Payload<'_>) -> Result<&'p str, DecodeError> {
    match &payload.op {
        Col::Str(s) => Ok(s),
        _ => Err(DecodeError::NotEnvelope("no `op` field")),
    }
}

// ---- Reading a message -------------------------------------------------------------------
//
// The message is read in one pass by the visitors below into what the pipeline needs: `op`,
// the columns of `after`/`before` it knows (strings borrowed from the message), and, from the
// schema wrapper, only the unit of `event_ts`. Everything else is consumed by `Skip`, which
// validates like `serde_json::Value` does, so exactly the messages that were invalid JSON
// before still are. No semantic error is raised while reading: the checks come afterwards,
// in the order they always had.

/// The columns the host reads (both tables); any other column is skipped.
#[derive(Clone, Copy)]
enum C {
    Id,
    ContentId,
    UserId,
    EventType,
    EventTs,
    DurationMs,
    Device,
    ContentType,
    LengthSeconds,
}

impl C {
    const NAMES: [&'static str; 9] = [
        "id",
        "content_id",
        "user_id",
        "event_type",
        "event_ts",
        "duration_ms",
        "device",
        "content_type",
        "length_seconds",
    ];

    fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A column value as the converter wrote it (absent reads as `Null`). Non-scalars are kept as
/// a `Value` only to name them in an error.
#[derive(Debug, Default)]
enum Col<'a> {
    #[default]
    Null,
    Num(Number),
    /// Borrowed from the message unless it held escapes.
    Str(Cow<'a, str>),
    Other(Value),
}

/// The known columns of a row object (`after` or `before`).
#[derive(Debug, Default)]
struct Row<'a>([Col<'a>; C::NAMES.len()]);

/// The fields of a Debezium payload the host reads.
#[derive(Debug, Default)]
struct Payload<'a> {
    op: Col<'a>,
    /// `None` unless an object.
    after: Option<Row<'a>>,
    before: Option<Row<'a>>,
    /// `source.ts_ms` when an integer.
    source_ts_ms: Option<i64>,
}

/// A message is read into these slots in place (a payload is some 600 bytes: moving it up
/// through the visitors' return values cost more than reading it).
#[derive(Default)]
struct Message<'a> {
    /// The top-level object's own fields: the payload without the wrapper.
    own: Payload<'a>,
    /// The fields of its `payload` object.
    wrapped: Payload<'a>,
}

/// A message as read (its payloads are in [`Message`]).
enum Top {
    Null,
    NotObject,
    Object {
        /// Present: the unit of `event_ts` it names (when asked for).
        schema: Option<TimeUnit>,
        payload: PayloadField,
    },
}

/// The value of a `payload` key.
enum PayloadField {
    Absent,
    Null,
    /// Read into [`Message::wrapped`].
    Object,
    Other,
}

/// Reads `bytes` into `msg`: the payload and the unit of `event_ts` (`Unknown` without a
/// schema or when `want_unit` is false); `None` for a tombstone.
fn envelope<'m, 'a>(
    bytes: &'a [u8],
    want_unit: bool,
    msg: &'m mut Message<'a>,
) -> Result<Option<(&'m mut Payload<'a>, TimeUnit)>, DecodeError> {
    if let Some((field, unit)) = wrapped_with_known_schema(bytes, &mut msg.wrapped) {
        let unit = if want_unit { unit } else { TimeUnit::Unknown };
        return match field {
            PayloadField::Object => Ok(Some((&mut msg.wrapped, unit))),
            PayloadField::Null => Ok(None),
            _ => Err(DecodeError::NotEnvelope("payload is not an object")),
        };
    }
    let top = read(
        bytes,
        Any(TopSeed {
            want_unit,
            msg: &mut *msg,
        }),
    )?;
    remember_schema(bytes);
    match top {
        Top::Null => Ok(None),
        Top::NotObject => Err(DecodeError::NotEnvelope("top level is not an object")),
        // The converter writes a null payload for tombstones when the schema wrapper is on.
        Top::Object {
            payload: PayloadField::Null,
            ..
        } => Ok(None),
        Top::Object {
            schema: Some(unit),
            payload: PayloadField::Object,
        } => Ok(Some((&mut msg.wrapped, unit))),
        Top::Object {
            schema: Some(_),
            payload: PayloadField::Other,
        } => Err(DecodeError::NotEnvelope("payload is not an object")),
        // Without the wrapper the top-level object is the payload.
        Top::Object { .. } => Ok(Some((&mut msg.own, TimeUnit::Unknown))),
    }
}

/// Reads all of `bytes` as one JSON value, as `serde_json::from_slice` does.
fn read<'a, S: DeserializeSeed<'a>>(bytes: &'a [u8], seed: S) -> Result<S::Value, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    seed.deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| DecodeError::NotJson(e.to_string()))
}

// ---- The schema wrapper, read once per distinct text -------------------------------------
//
// With schemas.enable=true every message starts with `{"schema":` and the same few KB of
// schema, identical for every message of a table version. Its text is kept once it has been
// read whole (per thread: decoding runs on the lanes' runtime threads), and a message that
// begins with a known text only has its payload read. Keyed by the text itself, not by the
// topic: equal texts name the same unit, and a changed schema is simply a new text.

const SCHEMA_PREFIX: &[u8] = br#"{"schema":"#;
const PAYLOAD_KEY: &[u8] = br#","payload":"#;
/// Distinct schema texts kept per thread (tables times their versions in flight).
const SCHEMA_CACHE_ENTRIES: usize = 8;
/// Longer schema texts are not kept.
const SCHEMA_CACHE_MAX_BYTES: usize = 1 << 20;

struct KnownSchema {
    text: Box<[u8]>,
    /// The unit it names for `event_ts`.
    unit: TimeUnit,
}

thread_local! {
    static SCHEMAS: RefCell<Vec<KnownSchema>> = const { RefCell::new(Vec::new()) };
}

/// `{"schema":<known text>,"payload":<P>}`: P read, the schema not. `None` (the full read
/// decides, and names any error exactly) for any other shape or when P does not read.
fn wrapped_with_known_schema<'a>(
    bytes: &'a [u8],
    out: &mut Payload<'a>,
) -> Option<(PayloadField, TimeUnit)> {
    let rest = bytes.strip_prefix(SCHEMA_PREFIX)?;
    let (len, unit) = SCHEMAS.with_borrow(|known| {
        known
            .iter()
            .find(|k| rest.starts_with(&k.text))
            .map(|k| (k.text.len(), k.unit))
    })?;
    let rest = rest[len..].strip_prefix(PAYLOAD_KEY)?;
    let end = rest.iter().rposition(|b| !is_json_whitespace(*b))?;
    if rest[end] != b'}' {
        return None;
    }
    // Read alone, P nests one level less deep than in the full read: with as many brackets
    // as serde_json's depth limit, let the full read decide.
    let p = &rest[..end];
    if openers(p) >= 128 {
        return None;
    }
    let field = read(p, Any(PayloadFieldSeed(out))).ok()?;
    Some((field, unit))
}

/// After a full read of a valid message: keeps its schema text, if it has the wrapper shape.
fn remember_schema(bytes: &[u8]) {
    let Some(rest) = bytes.strip_prefix(SCHEMA_PREFIX) else {
        return;
    };
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<IgnoredAny>();
    let Some(Ok(_)) = values.next() else { return };
    let text = &rest[..values.byte_offset()];
    if text.len() > SCHEMA_CACHE_MAX_BYTES || !rest[text.len()..].starts_with(PAYLOAD_KEY) {
        return;
    }
    // The text on its own: a repeated `schema` key must not lend this text its unit.
    let Ok(unit) = read(text, Any(SchemaSeed)) else {
        return;
    };
    SCHEMAS.with_borrow_mut(|known| {
        if known.iter().any(|k| *k.text == *text) {
            return;
        }
        known.truncate(SCHEMA_CACHE_ENTRIES - 1);
        known.insert(
            0,
            KnownSchema {
                text: text.into(),
                unit,
            },
        );
    });
}

/// How many `[` and `{` bytes `p` holds (`b | 0x20 == b'{'` is true of exactly those two),
/// counted in chunks whose sums fit a `u8`, which the compiler vectorizes.
fn openers(p: &[u8]) -> usize {
    p.chunks(255)
        .map(|c| {
            c.iter()
                .map(|&b| u8::from(b | 0x20 == b'{'))
                .fold(0u8, u8::wrapping_add) as usize
        })
        .sum()
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn unit_of_name(name: &str) -> TimeUnit {
    match name {
        "io.debezium.time.MicroTimestamp" => TimeUnit::Micros,
        "io.debezium.time.NanoTimestamp" => TimeUnit::Nanos,
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            TimeUnit::Millis
        }
        _ => TimeUnit::Unknown,
    }
}

// ---- Visitors ----------------------------------------------------------------------------

/// What to make of a JSON value: objects and arrays go to `map`/`seq`, any other value (and,
/// by default, objects and arrays too, after being skipped) is `other`.
trait Shape<'de>: Sized {
    type Out;
    fn other(self) -> Self::Out;
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(self.other())
    }
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Out, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(self.other())
    }
    fn null(self) -> Self::Out {
        self.other()
    }
}

/// Reads any JSON value with a [`Shape`].
struct Any<S>(S);

impl<'de, S: Shape<'de>> DeserializeSeed<'de> for Any<S> {
    type Value = S::Out;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Out, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, S: Shape<'de>> Visitor<'de> for Any<S> {
    type Value = S::Out;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<S::Out, E> {
        Ok(self.0.null())
    }
    fn visit_bool<E>(self, _: bool) -> Result<S::Out, E> {
        Ok(self.0.other())
    }
    fn visit_i64<E>(self, _: i64) -> Result<S::Out, E> {
        Ok(self.0.other())
    }
    fn visit_u64<E>(self, _: u64) -> Result<S::Out, E> {
        Ok(self.0.other())
    }
    fn visit_f64<E>(self, _: f64) -> Result<S::Out, E> {
        Ok(self.0.other())
    }
    fn visit_str<E>(self, _: &str) -> Result<S::Out, E> {
        Ok(self.0.other())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<S::Out, A::Error> {
        self.0.map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<S::Out, A::Error> {
        self.0.seq(seq)
    }
}

/// Consumes any value, checked as `Value` would check it (numbers in range, UTF-8, escapes,
/// depth) but without building it. `IgnoredAny` checks less, and would turn messages that
/// were dead-lettered as invalid into events.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        d.deserialize_any(Any(SkipShape))
    }
}

struct SkipShape;

impl Shape<'_> for SkipShape {
    type Out = Skip;
    fn other(self) -> Skip {
        Skip
    }
}

/// A map key, as its index in `names` (`None`: a key the host does not read).
struct Key(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|k| *k == key))
    }
}

impl<'de> Deserialize<'de> for Col<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ColVisitor)
    }
}

struct ColVisitor;

impl<'de> Visitor<'de> for ColVisitor {
    type Value = Col<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a column value")
    }
    fn visit_unit<E>(self) -> Result<Col<'de>, E> {
        Ok(Col::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Col<'de>, E> {
        Ok(Col::Other(Value::Bool(b)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Col<'de>, E> {
        Ok(Col::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Col<'de>, E> {
        Ok(Col::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Col<'de>, E> {
        // As `Value` reads it.
        Ok(Number::from_f64(v).map_or(Col::Null, Col::Num))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Col<'de>, E> {
        Ok(Col::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Col<'de>, E> {
        Ok(Col::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Col<'de>, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map)).map(Col::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Col<'de>, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Col::Other)
    }
}

/// The whole message.
struct TopSeed<'m, 'de> {
    want_unit: bool,
    msg: &'m mut Message<'de>,
}

const TOP_KEYS: &[&str] = &["schema", "payload", "op", "after", "before", "source"];

impl<'de> Shape<'de> for TopSeed<'_, 'de> {
    type Out = Top;
    fn other(self) -> Top {
        Top::NotObject
    }
    fn null(self) -> Top {
        Top::Null
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let (mut schema, mut payload) = (None, PayloadField::Absent);
        // A repeated key: the last one counts, as in a `Value`.
        while let Some(key) = map.next_key_seed(Key(TOP_KEYS))? {
            match key {
                Some(0) if self.want_unit => schema = Some(map.next_value_seed(Any(SchemaSeed))?),
                Some(0) => {
                    map.next_value::<Skip>()?;
                    schema = Some(TimeUnit::Unknown);
                }
                Some(1) => {
                    payload = map.next_value_seed(Any(PayloadFieldSeed(&mut self.msg.wrapped)))?
                }
                Some(i) => payload_entry(&mut map, &mut self.msg.own, i - 2)?,
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Top::Object { schema, payload })
    }
}

const PAYLOAD_KEYS: &[&str] = &["op", "after", "before", "source"];

/// The value of `key` (an index of `PAYLOAD_KEYS`) into `payload`.
fn payload_entry<'de, A: MapAccess<'de>>(
    map: &mut A,
    payload: &mut Payload<'de>,
    key: usize,
) -> Result<(), A::Error> {
    match key {
        0 => payload.op = map.next_value()?,
        1 => map.next_value_seed(Any(RowSeed(&mut payload.after)))?,
        2 => map.next_value_seed(Any(RowSeed(&mut payload.before)))?,
        _ => payload.source_ts_ms = map.next_value_seed(Any(SourceTsSeed))?,
    }
    Ok(())
}

/// `source` of a payload: its `ts_ms` when an integer; anything else is no time (the
/// metadata is informative, never a reason to refuse an event).
struct SourceTsSeed;

const SOURCE_KEYS: &[&str] = &["ts_ms"];

impl<'de> Shape<'de> for SourceTsSeed {
    type Out = Option<i64>;
    fn other(self) -> Option<i64> {
        None
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<i64>, A::Error> {
        let mut ts = None;
        while let Some(key) = map.next_key_seed(Key(SOURCE_KEYS))? {
            match key {
                Some(_) => {
                    ts = match map.next_value::<Col<'de>>()? {
                        Col::Num(n) => n.as_i64(),
                        _ => None,
                    }
                }
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(ts)
    }
}

/// The value of a `payload` key, read into the given slot.
struct PayloadFieldSeed<'m, 'de>(&'m mut Payload<'de>);

impl<'de> Shape<'de> for PayloadFieldSeed<'_, 'de> {
    type Out = PayloadField;
    fn other(self) -> PayloadField {
        PayloadField::Other
    }
    fn null(self) -> PayloadField {
        PayloadField::Null
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<PayloadField, A::Error> {
        // A repeated `payload` replaces the earlier one.
        *self.0 = Payload::default();
        while let Some(key) = map.next_key_seed(Key(PAYLOAD_KEYS))? {
            match key {
                Some(i) => payload_entry(&mut map, self.0, i)?,
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(PayloadField::Object)
    }
}

/// `after` or `before`, read into the slot: a row when an object, else `None`.
struct RowSeed<'m, 'de>(&'m mut Option<Row<'de>>);

impl<'de> Shape<'de> for RowSeed<'_, 'de> {
    type Out = ();
    fn other(self) {
        *self.0 = None;
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let row = self.0.insert(Row::default());
        while let Some(key) = map.next_key_seed(Key(&C::NAMES))? {
            match key {
                Some(i) => row.0[i] = map.next_value()?,
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(())
    }
}

// The schema: `fields` lists the envelope's fields; the one whose `field` is "after" lists the
// columns in its own `fields`; the first of those whose `field` is `event_ts` names the
// column's semantic type in `name`. Anything missing or of another type: `Unknown`.

/// The schema object.
struct SchemaSeed;

impl<'de> Shape<'de> for SchemaSeed {
    type Out = TimeUnit;
    fn other(self) -> TimeUnit {
        TimeUnit::Unknown
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<TimeUnit, A::Error> {
        let mut unit = TimeUnit::Unknown;
        while let Some(key) = map.next_key_seed(Key(&["fields"]))? {
            match key {
                Some(_) => {
                    unit = map.next_value_seed(Any(FieldsSeed {
                        level: Level::Envelope,
                    }))?
                }
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(unit)
    }
}

#[derive(Clone, Copy)]
enum Level {
    /// The envelope's fields: looking for "after".
    Envelope,
    /// The columns of "after": looking for `event_ts`.
    Columns,
}

/// A `fields` array: the unit found in its first element that matches.
struct FieldsSeed {
    level: Level,
}

impl<'de> Shape<'de> for FieldsSeed {
    type Out = TimeUnit;
    fn other(self) -> TimeUnit {
        TimeUnit::Unknown
    }
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TimeUnit, A::Error> {
        let mut found = None;
        while let Some(field) = seq.next_element_seed(Any(FieldSeed { level: self.level }))? {
            if let (None, Some(unit)) = (found, field) {
                found = Some(unit);
            }
        }
        Ok(found.unwrap_or(TimeUnit::Unknown))
    }
}

/// One element of a `fields` array: `Some(unit)` when it is the one looked for.
struct FieldSeed {
    level: Level,
}

impl<'de> Shape<'de> for FieldSeed {
    type Out = Option<TimeUnit>;
    fn other(self) -> Option<TimeUnit> {
        None
    }
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<TimeUnit>, A::Error> {
        let wanted = match self.level {
            Level::Envelope => "after",
            Level::Columns => EVENT_TS,
        };
        let (mut matches, mut unit) = (false, TimeUnit::Unknown);
        while let Some(key) = map.next_key_seed(Key(&["field", "fields", "name"]))? {
            match (key, self.level) {
                (Some(0), _) => matches = matches!(map.next_value()?, Col::Str(s) if s == wanted),
                (Some(1), Level::Envelope) => {
                    unit = map.next_value_seed(Any(FieldsSeed {
                        level: Level::Columns,
                    }))?
                }
                (Some(2), Level::Columns) => {
                    unit = match map.next_value()? {
                        Col::Str(s) => unit_of_name(&s),
                        _ => TimeUnit::Unknown,
                    }
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(matches.then_some(unit))
    }
}

// ---- Columns -----------------------------------------------------------------------------

/// A column value as a `Value`, for error messages.
fn shown(col: &Col<'_>) -> Value {
    match col {
        Col::Null => Value::Null,
        Col::Num(n) => Value::Number(n.clone()),
        Col::Str(s) => Value::String(s.to_string()),
        Col::Other(v) => v.clone(),
    }
}

fn int(row: &Row<'_>, c: C) -> Result<Option<i64>, DecodeError> {
    let column = c.name();
    match &row.0[c as usize] {
        Col::Null => Ok(None),
        Col::Num(n) => n.as_i64().map(Some).ok_or_else(|| DecodeError::BadColumn {
            column,
            message: format!("{n} is not a 64-bit integer"),
        }),
        Col::Str(s) => s.parse().map(Some).map_err(|_| DecodeError::BadColumn {
            column,
            message: format!("`{s}` is not an integer"),
        }),
        other => Err(DecodeError::BadColumn {
            column,
            message: format!("expected an integer, got {}", shown(other)),
        }),
    }
}

fn int32(row: &Row<'_>, c: C) -> Result<Option<i32>, DecodeError> {
    int(row, c)?
        .map(|v| {
            i32::try_from(v).map_err(|_| DecodeError::BadColumn {
                column: c.name(),
                message: format!("{v} does not fit a 32-bit integer"),
            })
        })
        .transpose()
}

/// Takes the text out of the row: the one allocation a string column costs.
fn text(row: &mut Row<'_>, c: C) -> Result<Option<String>, DecodeError> {
    match std::mem::take(&mut row.0[c as usize]) {
        Col::Null => Ok(None),
        Col::Str(s) => Ok(Some(s.into_owned())),
        other => Err(DecodeError::BadColumn {
            column: c.name(),
            message: format!("expected text, got {}", shown(&other)),
        }),
    }
}

fn timestamp(row: &Row<'_>, c: C, unit: TimeUnit) -> Result<Option<i64>, DecodeError> {
    let column = c.name();
    match &row.0[c as usize] {
        Col::Null => Ok(None),
        Col::Str(s) => parse_timestamp(s)
            .map(Some)
            .map_err(|message| DecodeError::BadColumn { column, message }),
        Col::Num(n) => {
            let v = n.as_i64().ok_or_else(|| DecodeError::BadColumn {
                column,
                message: format!("{n} is not an integer epoch"),
            })?;
            Ok(Some(epoch_to_micros(v, unit)))
        }
        other => Err(DecodeError::BadColumn {
            column,
            message: format!("expected a timestamp, got {}", shown(other)),
        }),
    }
}

fn epoch_to_micros(v: i64, unit: TimeUnit) -> i64 {
    let unit = match unit {
        TimeUnit::Unknown => {
            // Without a schema: nanos past ~1973 exceed 1e17, micros 1e14; millis stay below.
            let a = v.unsigned_abs();
            if a >= 100_000_000_000_000_000 {
                TimeUnit::Nanos
            } else if a >= 100_000_000_000_000 {
                TimeUnit::Micros
            } else {
                TimeUnit::Millis
            }
        }
        known => known,
    };
    match unit {
        TimeUnit::Millis => v.saturating_mul(1000),
        TimeUnit::Nanos => v / 1000,
        _ => v,
    }
}

/// ISO 8601 with or without zone; no zone means UTC. Also accepts a space instead of `T`.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    use chrono::{DateTime, NaiveDateTime};
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(dt.timestamp_micros());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Ok(dt.timestamp_micros());
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(dt.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(dt) = d.and_hms_opt(0, 0, 0) {
            return Ok(dt.and_utc().timestamp_micros());
        }
    }
    Err(format!("`{s}` is not an ISO 8601 timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare(op: &str, after: &str) -> Vec<u8> {
        format!(r#"{{"before":null,"after":{after},"source":{{}},"op":"{op}","ts_ms":1}}"#)
            .into_bytes()
    }

    const ROW: &str = r#"{"id":16,"content_id":1,"user_id":999,"event_type":"play","event_ts":"2026-01-08T14:21:52Z","duration_ms":7000,"device":"web","new_col":"x"}"#;

    #[test]
    fn insert_without_schema_wrapper() {
        let m = decode_event(Some(&bare("c", ROW)), false).unwrap();
        let EventMessage::Insert(ev) = m else {
            panic!("{m:?}")
        };
        assert_eq!(ev.id, 16);
        assert_eq!(ev.content_id, Some(1));
        assert_eq!(ev.duration_ms, Some(7000));
        assert_eq!(ev.event_ts_micros, 1_767_882_112_000_000);
    }

    #[test]
    fn skips_and_counts_non_inserts() {
        assert_eq!(
            decode_event(None, false).unwrap(),
            EventMessage::Skip(SkipReason::Tombstone)
        );
        assert_eq!(
            decode_event(Some(&bare("u", ROW)), false).unwrap(),
            EventMessage::Skip(SkipReason::Update)
        );
        assert_eq!(
            decode_event(Some(&bare("r", ROW)), false).unwrap(),
            EventMessage::Skip(SkipReason::SnapshotRead)
        );
        assert!(matches!(
            decode_event(Some(&bare("r", ROW)), true).unwrap(),
            EventMessage::Insert(_)
        ));
    }

    #[test]
    fn epoch_encodings() {
        for (ts, unit) in [
            ("1767882112000", "io.debezium.time.Timestamp"),
            ("1767882112000000", "io.debezium.time.MicroTimestamp"),
        ] {
            let msg = format!(
                r#"{{"schema":{{"fields":[{{"field":"after","fields":[{{"field":"event_ts","name":"{unit}"}}]}}]}},"payload":{{"op":"c","after":{{"id":1,"event_ts":{ts}}}}}}}"#
            );
            let EventMessage::Insert(ev) = decode_event(Some(msg.as_bytes()), false).unwrap()
            else {
                panic!()
            };
            assert_eq!(ev.event_ts_micros, 1_767_882_112_000_000, "{unit}");
        }
        assert_eq!(
            epoch_to_micros(1_767_882_112_000, TimeUnit::Unknown),
            1_767_882_112_000_000
        );
        assert_eq!(
            epoch_to_micros(1_767_882_112_000_000_000, TimeUnit::Unknown),
            1_767_882_112_000_000
        );
    }

    #[test]
    fn timestamps_without_zone_are_utc() {
        assert_eq!(
            parse_timestamp("2026-01-08T14:21:52").unwrap(),
            1_767_882_112_000_000
        );
        assert_eq!(
            parse_timestamp("2026-01-08 15:21:52+01:00").unwrap(),
            1_767_882_112_000_000
        );
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn malformed_is_an_error_with_reason() {
        assert!(matches!(
            decode_event(Some(b"{not json"), false),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            decode_event(
                Some(&bare(
                    "c",
                    r#"{"content_id":1,"event_ts":"2026-01-08T14:21:52Z"}"#
                )),
                false
            ),
            Err(DecodeError::Missing("id"))
        );
        assert!(matches!(
            decode_event(
                Some(&bare(
                    "c",
                    r#"{"id":1,"duration_ms":"x","event_ts":"2026-01-08T14:21:52Z"}"#
                )),
                false
            ),
            Err(DecodeError::BadColumn {
                column: "duration_ms",
                ..
            })
        ));
    }

    #[test]
    fn content_changes() {
        let m = decode_content(Some(&bare(
            "c",
            r#"{"content_id":5,"content_type":"video","length_seconds":null}"#,
        )))
        .unwrap();
        assert_eq!(
            m,
            ContentMessage::Upsert(
                5,
                ContentRow {
                    content_type: Some("video".into()),
                    length_seconds: None
                }
            )
        );
        let d = br#"{"before":{"content_id":5},"after":null,"op":"d"}"#;
        assert_eq!(decode_content(Some(d)).unwrap(), ContentMessage::Delete(5));
    }
}

/// Micro-benchmark of decoding, per message shape:
/// `cargo test --release -p fanout bench_ -- --ignored --nocapture`.
/// The new reader against the `Value`-based one it replaced, kept here as the reference: same
/// results, same errors (messages included), with and without the schema cache.
#[cfg(test)]
mod equivalence {
    use super::*;

    /// The decoder before the visitors, unchanged.
    #[allow(clippy::all)]
    mod reference {
        use super::super::*;
        use serde_json::{Map, Value};

        struct Envelope<'a> {
            payload: &'a Map<String, Value>,
            schema: Option<&'a Value>,
        }

        fn envelope(value: &Value) -> Result<Envelope<'_>, DecodeError> {
            let obj = value
                .as_object()
                .ok_or(DecodeError::NotEnvelope("top level is not an object"))?;
            // With schemas.enable=true the converter writes {"schema": ..., "payload": {...}}.
            if let (Some(schema), Some(payload)) = (obj.get("schema"), obj.get("payload")) {
                let payload = payload
                    .as_object()
                    .ok_or(DecodeError::NotEnvelope("payload is not an object"))?;
                return Ok(Envelope {
                    payload,
                    schema: Some(schema),
                });
            }
            Ok(Envelope {
                payload: obj,
                schema: None,
            })
        }

        fn parse(bytes: Option<&[u8]>) -> Result<Option<Value>, DecodeError> {
            let Some(bytes) = bytes else {
                return Ok(None);
            };
            let value: Value =
                serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
            // The converter writes a null payload for tombstones when the schema wrapper is on.
            if value.is_null() || value.get("payload").is_some_and(Value::is_null) {
                return Ok(None);
            }
            Ok(Some(value))
        }

        fn op(payload: &Map<String, Value>) -> Result<&str, DecodeError> {
            payload
                .get("op")
                .and_then(Value::as_str)
                .ok_or(DecodeError::NotEnvelope("no `op` field"))
        }

        /// Decodes one message value of the engagement_events topic. `None` is a tombstone.
        pub fn decode_event(
            bytes: Option<&[u8]>,
            include_snapshot_reads: bool,
        ) -> Result<EventMessage, DecodeError> {
            let Some(value) = parse(bytes)? else {
                return Ok(EventMessage::Skip(SkipReason::Tombstone));
            };
            let env = envelope(&value)?;
            match op(env.payload)? {
                "c" => {}
                "r" if include_snapshot_reads => {}
                "r" => return Ok(EventMessage::Skip(SkipReason::SnapshotRead)),
                "u" => return Ok(EventMessage::Skip(SkipReason::Update)),
                "d" => return Ok(EventMessage::Skip(SkipReason::Delete)),
                "t" => return Ok(EventMessage::Skip(SkipReason::Truncate)),
                "m" => return Ok(EventMessage::Skip(SkipReason::Message)),
                other => return Err(DecodeError::UnknownOp(other.to_string())),
            }
            let after = env
                .payload
                .get("after")
                .and_then(Value::as_object)
                .ok_or(DecodeError::NotEnvelope("insert without `after`"))?;
            let ts_unit = env
                .schema
                .map(|s| time_unit_of(s, "event_ts"))
                .unwrap_or(TimeUnit::Unknown);
            Ok(EventMessage::Insert(RawEvent {
                id: int(after, "id")?.ok_or(DecodeError::Missing("id"))?,
                content_id: int(after, "content_id")?,
                user_id: int(after, "user_id")?,
                event_type: text(after, "event_type")?,
                event_ts_micros: timestamp(after, "event_ts", ts_unit)?
                    .ok_or(DecodeError::Missing("event_ts"))?,
                duration_ms: int32(after, "duration_ms")?,
                device: text(after, "device")?,
                source_ts_ms: env
                    .payload
                    .get("source")
                    .and_then(|s| s.get("ts_ms"))
                    .and_then(Value::as_i64),
            }))
        }

        /// Decodes one message value of the content topic.
        pub fn decode_content(bytes: Option<&[u8]>) -> Result<ContentMessage, DecodeError> {
            let Some(value) = parse(bytes)? else {
                return Ok(ContentMessage::Ignore);
            };
            let env = envelope(&value)?;
            match op(env.payload)? {
                "c" | "r" | "u" => {
                    let after = env
                        .payload
                        .get("after")
                        .and_then(Value::as_object)
                        .ok_or(DecodeError::NotEnvelope("change without `after`"))?;
                    let id = int(after, "content_id")?.ok_or(DecodeError::Missing("content_id"))?;
                    Ok(ContentMessage::Upsert(
                        id,
                        ContentRow {
                            content_type: text(after, "content_type")?,
                            length_seconds: int32(after, "length_seconds")?,
                        },
                    ))
                }
                "d" => {
                    let before = env
                        .payload
                        .get("before")
                        .and_then(Value::as_object)
                        .ok_or(DecodeError::NotEnvelope("delete without `before`"))?;
                    let id =
                        int(before, "content_id")?.ok_or(DecodeError::Missing("content_id"))?;
                    Ok(ContentMessage::Delete(id))
                }
                "t" | "m" => Ok(ContentMessage::Ignore),
                other => Err(DecodeError::UnknownOp(other.to_string())),
            }
        }

        /// Finds the Debezium semantic type of a column of `after` in the schema wrapper.
        fn time_unit_of(schema: &Value, column: &str) -> TimeUnit {
            let after = schema
                .get("fields")
                .and_then(Value::as_array)
                .and_then(|fields| {
                    fields
                        .iter()
                        .find(|f| f.get("field").and_then(Value::as_str) == Some("after"))
                });
            let name = after
                .and_then(|a| a.get("fields"))
                .and_then(Value::as_array)
                .and_then(|fields| {
                    fields
                        .iter()
                        .find(|f| f.get("field").and_then(Value::as_str) == Some(column))
                })
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match name {
                Some("io.debezium.time.MicroTimestamp") => TimeUnit::Micros,
                Some("io.debezium.time.NanoTimestamp") => TimeUnit::Nanos,
                Some("io.debezium.time.Timestamp")
                | Some("org.apache.kafka.connect.data.Timestamp") => TimeUnit::Millis,
                _ => TimeUnit::Unknown,
            }
        }

        fn int(row: &Map<String, Value>, column: &'static str) -> Result<Option<i64>, DecodeError> {
            match row.get(column) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => {
                    n.as_i64().map(Some).ok_or_else(|| DecodeError::BadColumn {
                        column,
                        message: format!("{n} is not a 64-bit integer"),
                    })
                }
                Some(Value::String(s)) => s.parse().map(Some).map_err(|_| DecodeError::BadColumn {
                    column,
                    message: format!("`{s}` is not an integer"),
                }),
                Some(other) => Err(DecodeError::BadColumn {
                    column,
                    message: format!("expected an integer, got {other}"),
                }),
            }
        }

        fn int32(
            row: &Map<String, Value>,
            column: &'static str,
        ) -> Result<Option<i32>, DecodeError> {
            int(row, column)?
                .map(|v| {
                    i32::try_from(v).map_err(|_| DecodeError::BadColumn {
                        column,
                        message: format!("{v} does not fit a 32-bit integer"),
                    })
                })
                .transpose()
        }

        fn text(
            row: &Map<String, Value>,
            column: &'static str,
        ) -> Result<Option<String>, DecodeError> {
            match row.get(column) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(DecodeError::BadColumn {
                    column,
                    message: format!("expected text, got {other}"),
                }),
            }
        }

        fn timestamp(
            row: &Map<String, Value>,
            column: &'static str,
            unit: TimeUnit,
        ) -> Result<Option<i64>, DecodeError> {
            match row.get(column) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => parse_timestamp(s)
                    .map(Some)
                    .map_err(|message| DecodeError::BadColumn { column, message }),
                Some(Value::Number(n)) => {
                    let v = n.as_i64().ok_or_else(|| DecodeError::BadColumn {
                        column,
                        message: format!("{n} is not an integer epoch"),
                    })?;
                    Ok(Some(epoch_to_micros(v, unit)))
                }
                Some(other) => Err(DecodeError::BadColumn {
                    column,
                    message: format!("expected a timestamp, got {other}"),
                }),
            }
        }
    }

    fn fixture(text: &str) -> Vec<u8> {
        let doc: Value = serde_json::from_str(text).unwrap();
        doc["value"].as_str().unwrap_or("null").as_bytes().to_vec()
    }

    fn fixtures() -> Vec<Vec<u8>> {
        vec![
            fixture(include_str!(
                "../../tests/fixtures/envelopes/insert_with_schema.json"
            )),
            fixture(include_str!(
                "../../tests/fixtures/envelopes/insert_no_schema.json"
            )),
            fixture(include_str!(
                "../../tests/fixtures/envelopes/snapshot_read.json"
            )),
            fixture(include_str!("../../tests/fixtures/envelopes/update.json")),
            fixture(include_str!("../../tests/fixtures/envelopes/delete.json")),
            fixture(include_str!(
                "../../tests/fixtures/envelopes/content_insert.json"
            )),
            fixture(include_str!(
                "../../tests/fixtures/envelopes/content_snapshot.json"
            )),
        ]
    }

    /// Every decoding of `msg`, twice (the second time a known schema is only compared), equal
    /// to the reference's.
    fn same(msg: &[u8]) {
        let shown = String::from_utf8_lossy(msg);
        for _ in 0..2 {
            for snapshots in [false, true] {
                assert_eq!(
                    decode_event(Some(msg), snapshots),
                    reference::decode_event(Some(msg), snapshots),
                    "event, snapshots {snapshots}: {shown}"
                );
            }
            assert_eq!(
                decode_content(Some(msg)),
                reference::decode_content(Some(msg)),
                "content: {shown}"
            );
        }
    }

    const SCHEMA_MICROS: &str = r#"{"fields":[{"field":"before","fields":[{"field":"event_ts","name":"io.debezium.time.Timestamp"}]},{"fields":[{"field":"event_ts","name":"io.debezium.time.MicroTimestamp"}],"field":"after"}]}"#;
    const SCHEMA_MILLIS: &str = r#"{"fields":[{"field":"after","fields":[{"field":"id"},{"field":"event_ts","name":"io.debezium.time.Timestamp"},{"field":"event_ts","name":"io.debezium.time.NanoTimestamp"}]}]}"#;
    const PAYLOAD: &str = r#"{"before":null,"after":{"id":7,"content_id":3,"user_id":null,"event_type":"pl\u0061y","event_ts":1767882112000000,"duration_ms":7000,"device":"web","content_type":"video","length_seconds":30},"source":{"ts_ms":1,"sequence":"[\"1\",\"2\"]"},"op":"c"}"#;

    fn wrapped(schema: &str, payload: &str) -> String {
        format!(r#"{{"schema":{schema},"payload":{payload}}}"#)
    }

    #[test]
    fn captured_envelopes_decode_as_before() {
        for msg in fixtures() {
            same(&msg);
        }
    }

    #[test]
    fn every_truncation_and_corruption_fails_as_before() {
        let msgs = [
            fixture(include_str!(
                "../../tests/fixtures/envelopes/insert_with_schema.json"
            )),
            wrapped(SCHEMA_MICROS, PAYLOAD).into_bytes(),
        ];
        for msg in msgs {
            same(&msg);
            for cut in 0..msg.len() {
                same(&msg[..cut]);
            }
            for at in (0..msg.len()).step_by(7) {
                for b in [b'"', b'}', b',', b'x', 0xff] {
                    let mut bad = msg.clone();
                    bad[at] = b;
                    same(&bad);
                }
            }
        }
    }

    #[test]
    fn odd_envelopes_decode_as_before() {
        let row = r#"{"id":1,"event_ts":"2026-01-08T14:21:52Z","content_id":5,"content_type":"x"}"#;
        let payload =
            |op: &str, after: &str| format!(r#"{{"before":{after},"after":{after},"op":"{op}"}}"#);
        let mut cases: Vec<String> = vec![
            "null".into(),
            " null ".into(),
            "5".into(),
            "[1,{}]".into(),
            r#""text""#.into(),
            "{}".into(),
            r#"{"payload":null}"#.into(),
            r#"{"payload":null,"op":"c"}"#.into(),
            r#"{"schema":{},"payload":null}"#.into(),
            r#"{"schema":{},"payload":5}"#.into(),
            r#"{"schema":{},"payload":[]}"#.into(),
            r#"{"schema":null,"payload":{"op":"c","after":{"id":1,"event_ts":1767882112000}}}"#.into(),
            r#"{"payload":{"op":"c"},"op":"c","after":{"id":2,"event_ts":1767882112000}}"#.into(),
            r#"{"schema":{},"op":"c","after":{"id":2,"event_ts":1767882112000}}"#.into(),
            format!(r#"{{"payload":{},"schema":{SCHEMA_MICROS}}}"#, payload("c", row)),
            // Repeated keys: the last one counts.
            format!(r#"{{"schema":{SCHEMA_MICROS},"payload":{PAYLOAD},"schema":{SCHEMA_MILLIS}}}"#),
            format!(r#"{{"schema":{SCHEMA_MICROS},"payload":{PAYLOAD},"payload":{}}}"#, payload("u", row)),
            format!(r#"{{"schema":{SCHEMA_MICROS},"payload":{PAYLOAD},"extra":1}}"#),
            r#"{"op":"c","after":{"id":1,"id":2,"event_ts":"2026-01-08T14:21:52Z"},"after":{"id":3,"event_ts":1}}"#.into(),
            r#"{"op":"c","after":{"id":1,"event_ts":1},"after":5}"#.into(),
            // Whitespace where JSON allows it.
            format!("{{ \"schema\" : {SCHEMA_MICROS} , \"payload\" : {PAYLOAD} }}"),
            format!("{}\n\t ", wrapped(SCHEMA_MICROS, PAYLOAD)),
            format!("{}\u{c}", wrapped(SCHEMA_MICROS, PAYLOAD)),
            wrapped(SCHEMA_MICROS, &format!(" {PAYLOAD} ")),
            wrapped(SCHEMA_MICROS, "null"),
            wrapped(SCHEMA_MICROS, "\"x\""),
            wrapped(SCHEMA_MILLIS, PAYLOAD),
            wrapped(r#"{"fields":5}"#, PAYLOAD),
            wrapped(r#"{"fields":[{"field":"after","fields":{}}]}"#, PAYLOAD),
            wrapped(r#"{"fields":[{"field":"after","fields":[{"field":"event_ts","name":5}]}]}"#, PAYLOAD),
            wrapped(r#"[1]"#, PAYLOAD),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace("1767882112000000", "1767882112000000.5")),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace(r#""ts_ms":1"#, r#""ts_ms":1e400"#)),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace(r#""ts_ms":1"#, r#""ts_ms":"\ud800""#)),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace(r#""op":"c""#, r#""op":"x""#)),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace(r#""op":"c""#, r#""op":1"#)),
            wrapped(SCHEMA_MICROS, &PAYLOAD.replace(r#","op":"c""#, "")),
            format!("{}{}", "[".repeat(130), "]".repeat(130)),
            format!(r#"{{"op":"c","after":{{"id":1,"event_ts":1}},"x":{}{}}}"#, "[".repeat(126), "]".repeat(126)),
            format!(r#"{{"op":"c","after":{{"id":1,"event_ts":1}},"x":{}{}}}"#, "[".repeat(127), "]".repeat(127)),
            // Nested at the depth limit, once the schema is known: the payload is read alone.
            wrapped(SCHEMA_MICROS, &format!(r#"{{"op":"c","after":{{"id":1,"event_ts":1}},"x":{}{}}}"#, "[".repeat(126), "]".repeat(126))),
            wrapped(SCHEMA_MICROS, &format!(r#"{{"op":"c","after":{{"id":1,"event_ts":1}},"x":{}{}}}"#, "[".repeat(127), "]".repeat(127))),
        ];
        for op in ["c", "r", "u", "d", "t", "m", "x", ""] {
            cases.push(payload(op, row));
            cases.push(payload(op, "null"));
            cases.push(payload(op, "[]"));
        }
        for value in [
            "null",
            "1",
            "-1",
            "1.5",
            "1e3",
            "-0",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551616",
            "-9223372036854775809",
            "2147483648",
            "true",
            "false",
            r#""12""#,
            r#""-12""#,
            r#"" 12""#,
            r#""x""#,
            r#""""#,
            r#""2026-01-08""#,
            r#""2026-01-08T14:21:52+01:00""#,
            r#""\u0031""#,
            "[1]",
            r#"{"a":[1,{"b":null}]}"#,
        ] {
            for column in C::NAMES {
                let row = format!(
                    r#"{{"id":1,"content_id":2,"event_ts":"2026-01-08T14:21:52Z","{column}":{value}}}"#
                );
                cases.push(payload("c", &row));
                cases.push(payload("d", &row));
                cases.push(wrapped(SCHEMA_MICROS, &payload("c", &row)));
                cases.push(wrapped(SCHEMA_MILLIS, &payload("c", &row)));
            }
        }
        for case in cases {
            same(case.as_bytes());
        }
    }

    fn units() -> Vec<TimeUnit> {
        SCHEMAS.with_borrow(|known| known.iter().map(|k| k.unit).collect())
    }

    fn ts_of(msg: &str) -> i64 {
        match decode_event(Some(msg.as_bytes()), false) {
            Ok(EventMessage::Insert(ev)) => ev.event_ts_micros,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_known_schema_is_compared_not_read() {
        SCHEMAS.with_borrow_mut(Vec::clear);
        let micros = wrapped(SCHEMA_MICROS, PAYLOAD);
        assert_eq!(ts_of(&micros), 1_767_882_112_000_000);
        assert_eq!(units(), [TimeUnit::Micros]);
        assert_eq!(ts_of(&micros), 1_767_882_112_000_000);
        assert_eq!(units(), [TimeUnit::Micros], "kept once");
        // The kept unit is what a later message with that text gets: its schema is not read.
        SCHEMAS.with_borrow_mut(|known| known[0].unit = TimeUnit::Millis);
        assert_eq!(ts_of(&micros), 1_767_882_112_000_000_000);
        SCHEMAS.with_borrow_mut(Vec::clear);
        assert_eq!(ts_of(&micros), 1_767_882_112_000_000);
    }

    #[test]
    fn schema_texts_are_kept_apart_and_bounded() {
        SCHEMAS.with_borrow_mut(Vec::clear);
        let millis_payload = PAYLOAD.replace("1767882112000000", "1767882112000");
        for round in 0..3 {
            // A new table version is a new text; both stay known, each with its own unit.
            assert_eq!(
                ts_of(&wrapped(SCHEMA_MICROS, PAYLOAD)),
                1_767_882_112_000_000
            );
            assert_eq!(
                ts_of(&wrapped(SCHEMA_MILLIS, &millis_payload)),
                1_767_882_112_000_000
            );
            assert_eq!(units().len(), 2, "round {round}");
        }
        for i in 0..2 * SCHEMA_CACHE_ENTRIES {
            let schema =
                SCHEMA_MICROS.replace(r#"{"fields""#, &format!(r#"{{"version":{i},"fields""#));
            assert_eq!(ts_of(&wrapped(&schema, PAYLOAD)), 1_767_882_112_000_000);
        }
        assert_eq!(units().len(), SCHEMA_CACHE_ENTRIES);
        assert_eq!(
            ts_of(&wrapped(SCHEMA_MILLIS, &millis_payload)),
            1_767_882_112_000_000
        );
        // A schema repeated after the payload counts, as in a `Value`, for that message only.
        SCHEMAS.with_borrow_mut(Vec::clear);
        let twice = format!(
            r#"{{"schema":{SCHEMA_MICROS},"payload":{millis_payload},"schema":{SCHEMA_MILLIS}}}"#
        );
        assert_eq!(ts_of(&twice), 1_767_882_112_000_000);
        assert_eq!(units(), [TimeUnit::Micros]);
        assert_eq!(
            ts_of(&wrapped(SCHEMA_MICROS, PAYLOAD)),
            1_767_882_112_000_000
        );
    }
}

#[cfg(test)]
pub(crate) mod bench {
    use super::*;
    use std::time::Instant;

    /// The `value` of a captured envelope (tests/fixtures/envelopes).
    fn fixture(text: &str) -> String {
        let doc: Value = serde_json::from_str(text).unwrap();
        doc["value"].as_str().unwrap().to_string()
    }

    /// 256 messages of one shape, differing in id and content id as a stream's do.
    fn variants(msg: &str, id_at: &str) -> Vec<Vec<u8>> {
        assert!(msg.contains(id_at), "{id_at}");
        (0..256)
            .map(|i| {
                msg.replacen(
                    id_at,
                    &format!(r#""id":{},"content_id":{}"#, 1000 + i, i % 50),
                    1,
                )
                .into_bytes()
            })
            .collect()
    }

    /// CPU time of this thread (ns), so that a loaded machine does not count; wall time
    /// where /proc does not tell.
    pub(crate) fn cpu_ns(wall: Instant) -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| wall.elapsed().as_nanos() as u64)
    }

    /// Best of 5 rounds of ~0.3 s each, in CPU ns per message.
    fn measure(msgs: &[Vec<u8>], f: impl Fn(&[u8])) -> f64 {
        let mut best = f64::MAX;
        let wall = Instant::now();
        for _ in 0..5 {
            let start = Instant::now();
            let cpu = cpu_ns(wall);
            let mut n = 0u64;
            while start.elapsed().as_millis() < 300 {
                for m in msgs {
                    f(m);
                }
                n += msgs.len() as u64;
            }
            best = best.min((cpu_ns(wall) - cpu) as f64 / n as f64);
        }
        best
    }

    #[test]
    #[ignore = "benchmark: run with --release --ignored --nocapture"]
    fn bench_decode() {
        let with_schema = fixture(include_str!(
            "../../tests/fixtures/envelopes/insert_with_schema.json"
        ));
        let no_schema = fixture(include_str!(
            "../../tests/fixtures/envelopes/insert_no_schema.json"
        ));
        let update = fixture(include_str!("../../tests/fixtures/envelopes/update.json"));
        let content = fixture(include_str!(
            "../../tests/fixtures/envelopes/content_insert.json"
        ));
        // A `timestamp` column under time.precision.mode=adaptive_time_microseconds.
        let zoned = r#"{"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"default":"1970-01-01T00:00:00.000000Z","field":"event_ts"}"#;
        let micro = r#"{"type":"int64","optional":false,"name":"io.debezium.time.MicroTimestamp","version":1,"default":0,"field":"event_ts"}"#;
        let to_micros = |s: &str| {
            let iso = s
                .split(r#""event_ts":""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let micros = parse_timestamp(iso).unwrap();
            s.replace(
                &format!(r#""event_ts":"{iso}""#),
                &format!(r#""event_ts":{micros}"#),
            )
            .replace(zoned, micro)
        };
        let with_schema_micros = to_micros(&with_schema);
        let no_schema_micros = to_micros(&no_schema);
        assert!(with_schema_micros.contains("MicroTimestamp"));
        let cases = [
            (
                "insert, schema wrapper, ISO ts",
                &with_schema,
                r#""id":2,"content_id":1"#,
            ),
            (
                "insert, schema wrapper, epoch micros",
                &with_schema_micros,
                r#""id":2,"content_id":1"#,
            ),
            (
                "insert, no schema, ISO ts",
                &no_schema,
                r#""id":3,"content_id":5"#,
            ),
            (
                "insert, no schema, epoch micros",
                &no_schema_micros,
                r#""id":3,"content_id":5"#,
            ),
            (
                "update (skipped), schema wrapper",
                &update,
                r#""id":2,"content_id":1"#,
            ),
        ];
        for (name, msg, id_at) in cases {
            let msgs = variants(msg, id_at);
            for m in &msgs {
                let decoded = decode_event(Some(m), false).unwrap();
                if name.starts_with("insert") {
                    let EventMessage::Insert(ev) = decoded else {
                        panic!("{name}")
                    };
                    assert_eq!(
                        ev.event_ts_micros / 1_000_000,
                        1_795_635_195 + (name.contains("no schema") as i64) * 4,
                        "{name}"
                    );
                }
            }
            let ns = measure(&msgs, |m| {
                std::hint::black_box(decode_event(Some(std::hint::black_box(m)), false).ok());
            });
            println!("{name:40} {:5} B  {ns:8.0} ns/message", msgs[0].len());
        }
        let msgs = vec![content.into_bytes()];
        let ns = measure(&msgs, |m| {
            std::hint::black_box(decode_content(Some(std::hint::black_box(m))).ok());
        });
        println!(
            "{:40} {:5} B  {ns:8.0} ns/message",
            "content insert, schema wrapper",
            msgs[0].len()
        );
    }
}
