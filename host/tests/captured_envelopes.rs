//! Decoding envelopes captured from the real CDC producer of the stack (tests/fixtures/envelopes,
//! written by Debezium 3.6.3 through scripts/cdc_producer.py). No services needed.

use fanout::decode::{decode_content, decode_event, ContentMessage, EventMessage, SkipReason};
use serde_json::Value;

fn fixture(case: &str) -> (Option<Vec<u8>>, Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/envelopes")
        .join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("fixture JSON");
    let value = doc["value"].as_str().map(|s| s.as_bytes().to_vec());
    (value, doc)
}

/// The inserted row as Debezium wrote it, to compare the decoded fields with.
fn after(value: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(value).expect("value JSON");
    let payload = if v.get("payload").is_some() {
        v["payload"].clone()
    } else {
        v
    };
    payload["after"].clone()
}

#[test]
fn inserts_with_and_without_the_schema_wrapper() {
    for case in ["insert_with_schema", "insert_no_schema"] {
        let (value, _) = fixture(case);
        let value = value.expect("insert has a value");
        let row = after(&value);
        let EventMessage::Insert(ev) = decode_event(Some(&value), false).expect(case) else {
            panic!("{case}: not an insert")
        };
        assert_eq!(Some(ev.id), row["id"].as_i64(), "{case}");
        assert_eq!(ev.content_id, row["content_id"].as_i64(), "{case}");
        assert_eq!(ev.user_id, row["user_id"].as_i64(), "{case}");
        assert_eq!(
            ev.event_type.as_deref(),
            row["event_type"].as_str(),
            "{case}"
        );
        assert_eq!(ev.device.as_deref(), row["device"].as_str(), "{case}");
        assert_eq!(
            ev.duration_ms.map(i64::from),
            row["duration_ms"].as_i64(),
            "{case}"
        );
        let ts = row["event_ts"].as_str().expect("ZonedTimestamp string");
        assert_eq!(
            ev.event_ts_micros,
            fanout::decode::parse_timestamp(ts).expect("ts"),
            "{case}"
        );
        assert!(
            ev.event_ts_micros > 1_700_000_000_000_000,
            "{case}: micros since epoch"
        );
    }
}

#[test]
fn snapshot_update_delete_and_tombstone_are_skipped() {
    let cases = [
        ("snapshot_read", SkipReason::SnapshotRead),
        ("update", SkipReason::Update),
        ("delete", SkipReason::Delete),
        ("tombstone", SkipReason::Tombstone),
    ];
    for (case, reason) in cases {
        let (value, _) = fixture(case);
        assert_eq!(
            decode_event(value.as_deref(), false).expect(case),
            EventMessage::Skip(reason),
            "{case}"
        );
    }
    // Snapshot reads become inserts when the operator asks for them.
    let (value, _) = fixture("snapshot_read");
    assert!(matches!(
        decode_event(value.as_deref(), true),
        Ok(EventMessage::Insert(_))
    ));
}

#[test]
fn content_changes_from_the_content_topic() {
    for case in ["content_insert", "content_snapshot"] {
        let (value, _) = fixture(case);
        let value = value.expect("content change has a value");
        let row = after(&value);
        match decode_content(Some(&value)).expect(case) {
            ContentMessage::Upsert(id, c) => {
                assert_eq!(Some(id), row["content_id"].as_i64());
                assert_eq!(c.content_type.as_deref(), row["content_type"].as_str());
                assert_eq!(
                    c.length_seconds.map(i64::from),
                    row["length_seconds"].as_i64()
                );
            }
            other => panic!("{case}: {other:?}"),
        }
    }
}
