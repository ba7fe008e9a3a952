//! Decoding Debezium change events (JSON converter, with or without the schema wrapper).
//!
//! Only what the pipeline needs is read; unknown columns are ignored so that a column added to
//! the source table does not break the stream.

use serde_json::{Map, Value};

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
            let id = int(before, "content_id")?.ok_or(DecodeError::Missing("content_id"))?;
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
        Some("io.debezium.time.Timestamp") | Some("org.apache.kafka.connect.data.Timestamp") => {
            TimeUnit::Millis
        }
        _ => TimeUnit::Unknown,
    }
}

fn int(row: &Map<String, Value>, column: &'static str) -> Result<Option<i64>, DecodeError> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| DecodeError::BadColumn {
            column,
            message: format!("{n} is not a 64-bit integer"),
        }),
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

fn int32(row: &Map<String, Value>, column: &'static str) -> Result<Option<i32>, DecodeError> {
    int(row, column)?
        .map(|v| {
            i32::try_from(v).map_err(|_| DecodeError::BadColumn {
                column,
                message: format!("{v} does not fit a 32-bit integer"),
            })
        })
        .transpose()
}

fn text(row: &Map<String, Value>, column: &'static str) -> Result<Option<String>, DecodeError> {
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
