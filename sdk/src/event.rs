//! The enriched event as JSON, exactly in the shape of SPEC section 4.

use serde::Serialize;

use crate::Event;

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

/// The SPEC-4 JSON of an event as compact text, fields in SPEC order.
pub fn event_json_string(e: Event<'_>) -> String {
    serde_json::to_string(&EventRecord::new(e)).unwrap_or_else(|_| String::from("null"))
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
}
