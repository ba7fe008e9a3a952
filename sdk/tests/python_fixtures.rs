//! Fixtures for the Python SDK's tests (sdk/python/tests): a packed buffer written by the Rust
//! writer, the Rust SDK's SPEC-4 JSON of each of its events, and the exactly-once EVAL the
//! Rust SDK sends for them. The Python tests read them back and compare byte for byte; this test
//! keeps them current (`FANOUT_WRITE_FIXTURES=1 cargo test -p fanout-sdk --test python_fixtures`
//! rewrites them after a deliberate change).

use std::path::PathBuf;

use fanout_sdk::exactly_once::RedisOnce;
use fanout_sdk::packed::{EventFields, PackedEvents, PackedWriter, Position};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tests/fixtures")
}

fn buffer() -> Vec<u8> {
    let mut w = PackedWriter::default();
    let pos = |offset| {
        Some(Position {
            topic: "dbserver1.public.engagement_events",
            partition: 3,
            offset,
        })
    };
    w.push(&EventFields {
        event_id: 16,
        content_id: Some(1),
        user_id: Some(999),
        event_type: Some("play"),
        event_ts_micros: 1_767_882_112_000_000,
        duration_ms: Some(7000),
        device: Some("web"),
        content_type: Some("video"),
        length_seconds: Some(300),
        engagement_seconds: Some(7.0),
        engagement_pct: Some(0.02),
        position: pos(41),
    });
    w.push(&EventFields {
        event_id: 17,
        event_ts_micros: 1_767_882_112_123_456,
        position: pos(42),
        ..Default::default()
    });
    w.push(&EventFields {
        event_id: -5,
        content_id: Some(-1),
        user_id: Some(i64::MAX),
        event_type: Some("pause"),
        event_ts_micros: -1,
        duration_ms: Some(-3),
        device: Some("télé \"quoted\"\n"),
        content_type: Some("video"),
        length_seconds: Some(0),
        engagement_seconds: Some(0.125),
        engagement_pct: Some(2.57),
        position: None,
    });
    w.push(&EventFields {
        event_id: 70_000,
        event_type: Some("play"),
        event_ts_micros: 1_709_251_199_000_000,
        device: Some("web"),
        engagement_pct: Some(1.0),
        engagement_seconds: Some(123456.789),
        position: pos(43),
        ..Default::default()
    });
    w.finish()
}

fn expected() -> Vec<(&'static str, Vec<u8>)> {
    let buf = buffer();
    let events = PackedEvents::new(buf.clone()).expect("valid");
    let mut json = String::new();
    let mut once = RedisOnce::new("pydc:once:");
    for e in events.iter() {
        json.push_str(&fanout_sdk::event_json_string(e));
        json.push('\n');
        let key = format!("pydc:devcount:{}", e.device().unwrap_or("unknown"));
        once.event(&e)
            .cmd("HINCRBY")
            .arg(key)
            .arg(e.event_type().unwrap_or("unknown"))
            .arg(1);
    }
    let eval = once.eval_command().expect("eval");
    // One argument per line, hex-encoded.
    let eval_hex: String = eval
        .iter()
        .map(|a| a.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
        .collect();
    vec![
        ("rust_packed_v1.bin", buf),
        ("rust_event_json.txt", json.into_bytes()),
        ("rust_once_eval.hex", eval_hex.into_bytes()),
    ]
}

#[test]
fn python_sdk_fixtures_are_current() {
    let write = std::env::var_os("FANOUT_WRITE_FIXTURES").is_some();
    for (name, bytes) in expected() {
        let path = dir().join(name);
        if write {
            std::fs::create_dir_all(dir()).expect("mkdir");
            std::fs::write(&path, &bytes).expect("write fixture");
            continue;
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(
            have == bytes,
            "{} is stale: FANOUT_WRITE_FIXTURES=1 cargo test -p fanout-sdk --test python_fixtures",
            path.display()
        );
    }
}
