//! The enriched event as JSON, exactly in the shape of SPEC section 4.

use serde::Serialize;

use crate::{packed, Event};

/// The JSON record of one enriched event. Field order is the SPEC's; absent values are
/// `null` (never omitted); `event_ts` is `YYYY-MM-DD HH:MM:SS` UTC, whole seconds.
///
/// Why whole seconds: the SPEC's example has none, ClickHouse's `DateTime` (also on 18.16)
/// takes none, and every sink then agrees on the same string. Plugins that need the exact
/// time use `Event::event_ts_micros`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord<'a> {
    pub event_id: i64,
    pub content_id: Option<i64>,
    pub user_id: Option<i64>,
    pub event_type: Option<&'a str>,
    pub event_ts: String,
    pub duration_ms: Option<i32>,
    pub device: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub length_seconds: Option<i32>,
    /// Serialised as a JSON number with the shortest exact form (`7.0`, `0.5`): a non-finite
    /// value (which the host never sends) becomes `null`.
    pub engagement_seconds: Option<f64>,
    /// Already rounded to two decimals by the host; printed as the shortest form that reads
    /// back to the same double (`0.02`, `0.13`, `1.0`), so two-decimal printing is exact.
    pub engagement_pct: Option<f64>,
}

impl<'a> EventRecord<'a> {
    pub fn new(e: Event<'a>) -> Self {
        EventRecord {
            event_id: e.event_id(),
            content_id: e.content_id(),
            user_id: e.user_id(),
            event_type: e.event_type(),
            event_ts: crate::time::format_datetime(e.event_ts_micros()),
            duration_ms: e.duration_ms(),
            device: e.device(),
            content_type: e.content_type(),
            length_seconds: e.length_seconds(),
            engagement_seconds: e.engagement_seconds().filter(|v| v.is_finite()),
            engagement_pct: e.engagement_pct().filter(|v| v.is_finite()),
        }
    }
}

/// The SPEC-4 JSON of an event as a [`serde_json::Value`].
pub fn event_json(e: Event<'_>) -> serde_json::Value {
    // Serialising plain fields into a Value cannot fail.
    serde_json::to_value(EventRecord::new(e)).unwrap_or(serde_json::Value::Null)
}

/// The SPEC-4 JSON of an event as compact text, fields in SPEC order: the bytes
/// `serde_json::to_string(&EventRecord::new(e))` gives.
pub fn event_json_string(e: Event<'_>) -> String {
    let mut out = String::with_capacity(JSON_CAPACITY);
    write_event_json(e, &mut out);
    out
}

/// Room for a typical record (about 250 bytes): one allocation per row.
const JSON_CAPACITY: usize = 320;

/// [`event_json_string`] appended to `out` (a JSON array or a request body built in one
/// buffer). Written field by field rather than through a serde `Serializer`: this runs once per
/// event in every default plugin. Numbers and strings come out exactly as serde_json writes
/// them (the tests compare the two).
pub fn write_event_json(e: Event<'_>, out: &mut String) {
    out.push_str("{\"event_id\":");
    push_int(out, e.event_id());
    out.push_str(",\"content_id\":");
    push_opt_int(out, e.content_id());
    out.push_str(",\"user_id\":");
    push_opt_int(out, e.user_id());
    out.push_str(",\"event_type\":");
    push_opt_json(out, e.json_str_at(packed::EVENT_TYPE_AT));
    out.push_str(",\"event_ts\":\"");
    crate::time::write_datetime(e.event_ts_micros(), out);
    out.push_str("\",\"duration_ms\":");
    push_opt_int(out, e.duration_ms().map(i64::from));
    out.push_str(",\"device\":");
    push_opt_json(out, e.json_str_at(packed::DEVICE_AT));
    out.push_str(",\"content_type\":");
    push_opt_json(out, e.json_str_at(packed::CONTENT_TYPE_AT));
    out.push_str(",\"length_seconds\":");
    push_opt_int(out, e.length_seconds().map(i64::from));
    out.push_str(",\"engagement_seconds\":");
    push_opt_f64(out, e.engagement_seconds());
    out.push_str(",\"engagement_pct\":");
    push_opt_f64(out, e.engagement_pct());
    out.push('}');
}

fn push_int(out: &mut String, v: i64) {
    out.push_str(itoa::Buffer::new().format(v));
}

fn push_opt_int(out: &mut String, v: Option<i64>) {
    match v {
        Some(v) => push_int(out, v),
        None => out.push_str("null"),
    }
}

/// A float as serde_json writes it (shortest exact form, `7.0`, by zmij); a non-finite one
/// (never sent by the host) as `null`, like [`EventRecord`].
fn push_opt_f64(out: &mut String, v: Option<f64>) {
    match v.filter(|v| v.is_finite()) {
        // What serde_json's formatter calls (the tests hold the two to the same bytes).
        Some(v) => out.push_str(zmij::Buffer::new().format_finite(v)),
        None => out.push_str("null"),
    }
}

/// A string already quoted and escaped (once per batch, by [`crate::PackedEvents`]), or `null`.
fn push_opt_json(out: &mut String, v: Option<&str>) {
    out.push_str(v.unwrap_or("null"));
}

/// A JSON string with serde_json's escapes: `\"`, `\\`, `\b \t \n \f \r`, other control
/// characters as `\u00xx` (lowercase hex); everything else as it is.
pub(crate) fn push_json_str(out: &mut String, v: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0C => "\\f",
            b'\r' => "\\r",
            0x00..=0x1F => "",
            _ => continue,
        };
        // `i` is an ASCII byte: a char boundary.
        out.push_str(&v[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&v[start..]);
    out.push('"');
}

/// `event_ts` of an event as the enriched record prints it.
pub fn format_event_ts(e: Event<'_>) -> String {
    crate::time::format_datetime(e.event_ts_micros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch, event};
    use crate::EnrichedEvent;

    fn json_string(e: EnrichedEvent) -> String {
        let b = batch(vec![e]);
        let s = event_json_string(b.events.get(0).unwrap());
        s
    }

    fn json(e: EnrichedEvent) -> serde_json::Value {
        let b = batch(vec![e]);
        let v = event_json(b.events.get(0).unwrap());
        v
    }

    #[test]
    fn spec_example_exactly() {
        let mut e = event(16, Some(1), 1_767_882_112_000_000);
        e.user_id = Some(999);
        e.event_type = Some("play".into());
        e.duration_ms = Some(7000);
        e.device = Some("web".into());
        e.content_type = Some("video".into());
        e.length_seconds = Some(300);
        e.engagement_seconds = Some(7.0);
        e.engagement_pct = Some(0.02);
        let expected = r#"{"event_id":16,"content_id":1,"user_id":999,"event_type":"play","event_ts":"2026-01-08 14:21:52","duration_ms":7000,"device":"web","content_type":"video","length_seconds":300,"engagement_seconds":7.0,"engagement_pct":0.02}"#;
        assert_eq!(json_string(e.clone()), expected);
        let parsed: serde_json::Value = serde_json::from_str(expected).unwrap();
        assert_eq!(json(e), parsed);
    }

    #[test]
    fn nulls_are_present_as_null() {
        let e = event(17, None, 1_767_882_112_123_456);
        let v = json(e);
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 11);
        for key in [
            "content_id",
            "user_id",
            "event_type",
            "duration_ms",
            "device",
            "content_type",
            "length_seconds",
            "engagement_seconds",
            "engagement_pct",
        ] {
            assert_eq!(obj[key], serde_json::Value::Null, "{key}");
        }
        // Fractional seconds are dropped.
        assert_eq!(obj["event_ts"], "2026-01-08 14:21:52");
    }

    #[test]
    fn rounded_pct_prints_two_decimals_exactly() {
        let mut e = event(1, Some(1), 0);
        for (pct, text) in [(0.13, "0.13"), (1.0, "1.0"), (0.1, "0.1"), (2.57, "2.57")] {
            e.engagement_pct = Some(pct);
            let s = json_string(e.clone());
            assert!(s.contains(&format!("\"engagement_pct\":{text}")), "{s}");
        }
        e.engagement_pct = Some(f64::NAN);
        assert!(json_string(e).contains("\"engagement_pct\":null"));
    }

    /// The hand-written record is byte for byte what serde_json makes of [`EventRecord`]:
    /// every control character, quotes, backslashes, non-ASCII text, extreme and odd numbers.
    #[test]
    fn the_direct_writer_matches_serde_json() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}z", b as char)).collect();
        texts.extend(
            [
                "",
                "\"\\",
                "é ü \u{2028} \u{10FFFF} 漢字",
                "\u{7f}\u{80}",
                "plain",
            ]
            .map(String::from),
        );
        let floats = [
            0.0,
            -0.0,
            1.0,
            0.02,
            0.1,
            2.57,
            7.0,
            1e21,
            1e-7,
            123456789.125,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            -3.5,
            f64::INFINITY,
            f64::NAN,
        ];
        let mut evs = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let mut e = event(
                i as i64 - 3,
                (i % 3 != 0).then_some(i as i64 * 7919),
                i as i64 * 1_000_003 - 50_000_000,
            );
            e.user_id = (i % 4 != 0).then_some(-(i as i64));
            e.event_type = Some(t.clone());
            e.device = (i % 2 == 0).then(|| t.clone());
            e.content_type = (i % 5 != 0).then(|| format!("{t}{t}"));
            e.duration_ms = (i % 3 != 1).then_some(i as i32 * 1337 - 9);
            e.length_seconds = (i % 6 != 1).then_some(if i == 7 { i32::MIN } else { i as i32 });
            e.engagement_seconds = (i % 7 != 2).then_some(floats[i % floats.len()]);
            e.engagement_pct = Some(floats[(i * 5) % floats.len()]);
            evs.push(e);
        }
        let mut extreme = event(i64::MIN, Some(i64::MAX), i64::MIN / 4);
        extreme.duration_ms = Some(i32::MAX);
        evs.push(extreme);
        let b = batch(evs);
        for e in b.events.iter() {
            let want = serde_json::to_string(&EventRecord::new(e)).unwrap();
            assert_eq!(event_json_string(e), want);
        }
    }
}
