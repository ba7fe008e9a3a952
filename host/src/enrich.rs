//! Enrichment: an engagement event joined with its content row, exactly per SPEC section 4.

use crate::decode::{ContentRow, RawEvent};

#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedEvent {
    pub event_id: i64,
    pub content_id: Option<i64>,
    pub user_id: Option<i64>,
    pub event_type: Option<String>,
    pub event_ts_micros: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
    pub engagement_seconds: Option<f64>,
    pub engagement_pct: Option<f64>,
}

/// Joins one event with its content row (`None` when the content is unknown).
pub fn enrich(event: &RawEvent, content: Option<&ContentRow>) -> EnrichedEvent {
    let length_seconds = content.and_then(|c| c.length_seconds);
    EnrichedEvent {
        event_id: event.id,
        content_id: event.content_id,
        user_id: event.user_id,
        event_type: event.event_type.clone(),
        event_ts_micros: event.event_ts_micros,
        duration_ms: event.duration_ms,
        device: event.device.clone(),
        content_type: content.and_then(|c| c.content_type.clone()),
        length_seconds,
        // SPEC: NULL duration or NULL length makes both derived fields NULL.
        engagement_seconds: match (event.duration_ms, length_seconds) {
            (Some(d), Some(_)) => Some(f64::from(d) / 1000.0),
            _ => None,
        },
        engagement_pct: match (event.duration_ms, length_seconds) {
            (Some(d), Some(l)) => engagement_pct(d, l),
            _ => None,
        },
    }
}

/// round(duration_ms / 1000 / length_seconds, 2), half away from zero, on integers:
/// the percentage in hundredths is duration_ms / (10 * length_seconds). Dividing the rounded
/// integer by 100 gives the f64 nearest to the decimal, which prints exactly with two decimals.
/// A zero length has no percentage.
pub fn engagement_pct(duration_ms: i32, length_seconds: i32) -> Option<f64> {
    if length_seconds == 0 {
        return None;
    }
    let numerator = i64::from(duration_ms);
    let denominator = 10 * i64::from(length_seconds);
    let negative = (numerator < 0) != (denominator < 0);
    let (n, d) = (numerator.unsigned_abs(), denominator.unsigned_abs());
    let hundredths = (2 * n + d) / (2 * d);
    let hundredths = if negative {
        -(hundredths as i64)
    } else {
        hundredths as i64
    };
    Some(hundredths as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(duration_ms: Option<i32>) -> RawEvent {
        RawEvent {
            id: 16,
            content_id: Some(1),
            user_id: Some(999),
            event_type: Some("play".into()),
            event_ts_micros: 1_767_882_112_000_000,
            duration_ms,
            device: Some("web".into()),
        }
    }

    fn content(length: Option<i32>) -> ContentRow {
        ContentRow {
            content_type: Some("video".into()),
            length_seconds: length,
        }
    }

    /// (duration_ms, length_seconds, content known, engagement_seconds, engagement_pct)
    type Case = (Option<i32>, Option<i32>, bool, Option<f64>, Option<f64>);
    const CASES: &[Case] = &[
        // SPEC's example record.
        (Some(7000), Some(300), true, Some(7.0), Some(0.02)),
        // Half away from zero: 0.125 -> 0.13 (banker's rounding would give 0.12).
        (Some(1250), Some(10), true, Some(1.25), Some(0.13)),
        (Some(1150), Some(10), true, Some(1.15), Some(0.12)),
        (Some(1149), Some(10), true, Some(1.149), Some(0.11)),
        (Some(300_000), Some(300), true, Some(300.0), Some(1.0)),
        // Longer than the content: over 100 %.
        (Some(450_000), Some(300), true, Some(450.0), Some(1.5)),
        (Some(-1250), Some(10), true, Some(-1.25), Some(-0.13)),
        (Some(0), Some(300), true, Some(0.0), Some(0.0)),
        // NULL duration: both NULL.
        (None, Some(300), true, None, None),
        // NULL length: both NULL.
        (Some(7000), None, true, None, None),
        // Zero length: seconds known, no percentage, no infinity.
        (Some(7000), Some(0), true, Some(7.0), None),
        // Unknown content: content fields and derived fields NULL.
        (Some(7000), None, false, None, None),
    ];

    #[test]
    fn spec_section_4_rules() {
        for &(duration, length, known, seconds, pct) in CASES {
            let row = content(length);
            let out = enrich(&event(duration), known.then_some(&row));
            assert_eq!(
                out.engagement_seconds, seconds,
                "seconds for {duration:?}/{length:?}/{known}"
            );
            assert_eq!(
                out.engagement_pct, pct,
                "pct for {duration:?}/{length:?}/{known}"
            );
            assert_eq!(out.content_type.is_some(), known);
            assert_eq!(out.event_id, 16);
            assert_eq!(out.device.as_deref(), Some("web"));
        }
    }

    #[test]
    fn two_decimal_printing_is_exact() {
        // Every hundredth from 0.00 to 10.00 prints as itself.
        for h in 0..=1000 {
            let pct = engagement_pct(h * 10, 1).unwrap();
            assert_eq!(format!("{pct:.2}"), format!("{}.{:02}", h / 100, h % 100));
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert!(engagement_pct(i32::MAX, 1).is_some());
        assert!(engagement_pct(i32::MIN, -1).is_some());
    }
}
