//! The events `fanout plugin test` delivers: JSON lines of enriched events (SPEC section 4,
//! what `fanout_sdk::event_json` writes), or generated ones; cut into batches positioned on a
//! made-up Kafka partition, as a lane would hand them over.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use crate::plugin::{EventPosition, PluginBatch, SourceRange, WitBatch, WitEvent};

/// The topic the batches claim to come from (partition 0, offsets from 0 in file order).
pub const TOPIC: &str = "plugin-test";

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{0} has no events")]
    Empty(String),
}

/// One line of the events file. `event_id` is required; `event_ts` is `YYYY-MM-DD HH:MM:SS`
/// (UTC, as SPEC 4 prints it), RFC 3339, or `event_ts_micros` is given instead;
/// `engagement_seconds` and `engagement_pct` are derived from `duration_ms` and
/// `length_seconds` as the host derives them when absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    event_id: i64,
    #[serde(default)]
    content_id: Option<i64>,
    #[serde(default)]
    user_id: Option<i64>,
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    event_ts: Option<String>,
    #[serde(default)]
    event_ts_micros: Option<i64>,
    #[serde(default)]
    duration_ms: Option<i32>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    length_seconds: Option<i32>,
    #[serde(default)]
    engagement_seconds: Option<f64>,
    #[serde(default)]
    engagement_pct: Option<f64>,
}

fn parse_ts(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f") {
        return Ok(t.and_utc().timestamp_micros());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|_| {
            format!("event_ts `{text}` is neither `YYYY-MM-DD HH:MM:SS` (UTC) nor RFC 3339")
        })
}

fn event_of(line: Line) -> Result<WitEvent, String> {
    let event_ts_micros = match (&line.event_ts, line.event_ts_micros) {
        (Some(t), _) => parse_ts(t)?,
        (None, Some(m)) => m,
        (None, None) => return Err("needs event_ts (or event_ts_micros)".into()),
    };
    let derived = |given: Option<f64>, f: fn(i32, i32) -> Option<f64>| {
        given.or(match (line.duration_ms, line.length_seconds) {
            (Some(d), Some(l)) => f(d, l),
            _ => None,
        })
    };
    Ok(WitEvent {
        event_id: line.event_id,
        content_id: line.content_id,
        user_id: line.user_id,
        event_type: line.event_type.clone(),
        event_ts_micros,
        duration_ms: line.duration_ms,
        device: line.device.clone(),
        content_type: line.content_type.clone(),
        length_seconds: line.length_seconds,
        engagement_seconds: derived(line.engagement_seconds, |d, _| Some(f64::from(d) / 1000.0)),
        engagement_pct: derived(line.engagement_pct, crate::enrich::engagement_pct),
    })
}

/// Reads a JSON-lines file of enriched events (blank lines and lines starting with `#` are
/// skipped).
pub fn read(path: &Path) -> Result<Vec<WitEvent>, EventsError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| EventsError::Read {
        path: name.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| EventsError::Read {
            path: name.clone(),
            source,
        })?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = |message: String| EventsError::Line {
            path: name.clone(),
            line: i + 1,
            message,
        };
        let parsed: Line = serde_json::from_str(trimmed).map_err(|e| bad(e.to_string()))?;
        out.push(event_of(parsed).map_err(bad)?);
    }
    if out.is_empty() {
        return Err(EventsError::Empty(name));
    }
    Ok(out)
}

/// `n` varied events: ids from 1, 20 contents of three types (one unknown: no content
/// fields), four event types and devices, some with a NULL duration, one event per second
/// up to `end_micros` (the last one then).
pub fn generate(n: usize, end_micros: i64) -> Vec<WitEvent> {
    const TYPES: [&str; 4] = ["play", "pause", "finish", "click"];
    const DEVICES: [&str; 4] = ["web", "ios", "android", "tv"];
    const CONTENT_TYPES: [&str; 3] = ["video", "podcast", "newsletter"];
    let start = end_micros - (n as i64 - 1).max(0) * 1_000_000;
    (0..n)
        .map(|i| {
            let id = i as i64 + 1;
            let content = (i * 7 % 20) as i64 + 1;
            let known = content != 20;
            let length = known.then_some(60 + (content as i32) * 30);
            let duration = (i % 9 != 0).then_some(((i * 1_337) % 300_000) as i32);
            event_of(Line {
                event_id: id,
                content_id: Some(content),
                user_id: Some(1_000 + (i * 13 % 97) as i64),
                event_type: Some(TYPES[i % TYPES.len()].into()),
                event_ts: None,
                event_ts_micros: Some(start + i as i64 * 1_000_000),
                duration_ms: duration,
                device: Some(DEVICES[i % DEVICES.len()].into()),
                content_type: known.then(|| CONTENT_TYPES[content as usize % 3].into()),
                length_seconds: length,
                engagement_seconds: None,
                engagement_pct: None,
            })
            .unwrap_or_else(|_| unreachable_event(id))
        })
        .collect()
}

/// Never used: a generated line always has a time.
fn unreachable_event(id: i64) -> WitEvent {
    WitEvent {
        event_id: id,
        content_id: None,
        user_id: None,
        event_type: None,
        event_ts_micros: 0,
        duration_ms: None,
        device: None,
        content_type: None,
        length_seconds: None,
        engagement_seconds: None,
        engagement_pct: None,
    }
}

/// Cuts `events` into batches of at most `size`, each event at its index as offset of
/// partition 0 of [`TOPIC`].
pub fn batches(events: Vec<WitEvent>, size: usize) -> Vec<PluginBatch> {
    let size = size.max(1);
    let mut out = Vec::new();
    let mut offset = 0i64;
    let mut rest = events.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<WitEvent> = rest.by_ref().take(size).collect();
        let first = offset;
        let last = offset + chunk.len() as i64 - 1;
        offset = last + 1;
        let positions: Vec<_> = (first..=last)
            .map(|o| {
                Some(EventPosition {
                    source: 0,
                    offset: o,
                })
            })
            .collect();
        let wit = WitBatch {
            id: format!("{TOPIC}/0:{first}-{last}"),
            events: chunk,
            sources: vec![SourceRange {
                topic: TOPIC.into(),
                partition: 0,
                first_offset: first,
                last_offset: last,
            }],
        };
        out.push(PluginBatch::new(&wit, &positions));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_in_the_spec_shape_and_derived_fields() {
        let line: Line = serde_json::from_str(
            r#"{"event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play",
                "event_ts": "2026-01-08 14:21:52", "duration_ms": 7000, "device": "web",
                "content_type": "video", "length_seconds": 300}"#,
        )
        .unwrap();
        let e = event_of(line).unwrap();
        assert_eq!(e.engagement_seconds, Some(7.0));
        assert_eq!(e.engagement_pct, Some(0.02));
        assert_eq!(e.event_ts_micros, 1_767_882_112_000_000);
        let b = batches(generate(1_001, 1_767_880_800_000_000), 500);
        assert_eq!(
            b[2].wit().unwrap().events[0].event_ts_micros,
            1_767_880_800_000_000
        );
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].id(), "plugin-test/0:1000-1000");
        let first = b[1].events().unwrap();
        let at = first.get(0).and_then(|e| e.position());
        assert_eq!(
            at.map(|p| (p.topic, p.partition, p.offset)),
            Some((TOPIC, 0, 500))
        );
    }
}
