use super::*;
use fanout_sdk::redis::Scalar;
use fanout_sdk::testing::{batch, event, Call, MockHost};
use fanout_sdk::CapabilityError;

/// 2026-01-08T14:21:52Z
const T: i64 = 1_767_882_112 * MICROS_PER_SECOND;

fn cfg() -> Config {
    Config::from_json(serde_json::json!({})).unwrap()
}

#[test]
fn config_defaults_and_validation() {
    let c = cfg();
    assert_eq!(c, Config::default());
    assert_eq!(c.seen_key(16), "fanout:seen:16");
    let c = Config::from_json(serde_json::json!({"key_prefix": "t1:"})).unwrap();
    assert_eq!(c.count_key(1), "t1:content:count:1");
    assert_eq!(c.top_key(), "t1:top:content:10m");
    assert!(Config::from_json(serde_json::json!({"key_prefx": "x"})).is_err());
    assert!(Config::from_json(serde_json::json!({"window_minutes": 0})).is_err());
}

#[test]
fn bucket_key_is_utc_minute_of_event_time() {
    let c = cfg();
    assert_eq!(c.bucket_key(T), "top:content:bucket:202601081421");
    assert_eq!(
        c.bucket_key(T + 7 * MICROS_PER_SECOND),
        "top:content:bucket:202601081421"
    );
    assert_eq!(
        c.bucket_key(T + 8 * MICROS_PER_SECOND),
        "top:content:bucket:202601081422"
    );
    assert_eq!(c.last_key(1), "content:last:1");
}

#[test]
fn window_is_last_ten_minutes_up_to_now() {
    let keys = cfg().window_bucket_keys(T);
    assert_eq!(keys.len(), 10);
    assert_eq!(keys[0], "top:content:bucket:202601081412");
    assert_eq!(keys[9], "top:content:bucket:202601081421");
    // Across midnight.
    let midnight = 1_767_830_400 * MICROS_PER_SECOND; // 2026-01-08T00:00:00Z
    let keys = cfg().window_bucket_keys(midnight + 30 * MICROS_PER_SECOND);
    assert_eq!(keys[0], "top:content:bucket:202601072351");
    assert_eq!(keys[9], "top:content:bucket:202601080000");
}

#[test]
fn bucket_expires_fifteen_minutes_after_its_minute() {
    let c = cfg();
    let minute_start = 1_767_882_060;
    assert_eq!(c.bucket_expire_at(T, T), minute_start + 60 + 900);
    // An event 20 minutes old: its bucket would already be gone: skip it.
    assert_eq!(c.bucket_expire_at(T - 20 * MICROS_PER_MINUTE, T), 0);
    // 15 minutes old: still 1..60 s to live.
    assert!(c.bucket_expire_at(T - 15 * MICROS_PER_MINUTE, T) > T / MICROS_PER_SECOND);
}

#[test]
fn eval_keys_and_argv() {
    let c = cfg();
    let mut e = event(16, Some(1), T);
    e.event_type = Some("play".into());
    let b = batch(vec![e]);
    let cmd = eval_command(&c, &[(b.events.get(0).unwrap(), 1)], T);
    let text: Vec<String> = cmd
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(text[0], "EVAL");
    assert_eq!(text[1], SCRIPT);
    assert_eq!(text[2], "4");
    assert_eq!(
        &text[3..7],
        &[
            "fanout:seen:16",
            "content:count:1",
            "top:content:bucket:202601081421",
            "content:last:1"
        ]
    );
    assert_eq!(&text[7..9], &["86400", "3600"]);
    assert_eq!(&text[9..12], &["1", "16", "2026-01-08 14:21:52"]);
    assert_eq!(text[12], (1_767_882_060 + 960).to_string());
    let json: serde_json::Value = serde_json::from_str(&text[13]).unwrap();
    assert_eq!(json["event_id"], 16);
    assert_eq!(json["event_type"], "play");
    assert_eq!(text.len(), 14);
}

#[test]
fn batch_pipeline_skips_events_without_content_and_chunks() {
    let c = Config::from_json(serde_json::json!({"events_per_script": 2})).unwrap();
    let b = batch(vec![
        event(1, Some(1), T),
        event(2, None, T),
        event(3, Some(2), T),
        event(4, Some(1), T),
    ]);
    let (cmds, evals) = batch_commands(&c, &b, T);
    assert_eq!(evals, 2);
    assert_eq!(cmds.len(), 4);
    assert_eq!(cmds[0][2], b"8".to_vec()); // two events, 4 keys each
    assert_eq!(cmds[1][2], b"4".to_vec());
    assert_eq!(cmds[2][0], b"ZUNIONSTORE".to_vec());
    assert_eq!(cmds[2][1], b"top:content:10m".to_vec());
    assert_eq!(cmds[2][2], b"10".to_vec());
    assert_eq!(cmds[2].len(), 13);
    assert_eq!(
        cmds[3],
        fanout_sdk::redis::command(&["EXPIRE", "top:content:10m", "120"])
    );
}

#[test]
fn write_accepts_and_counts() {
    let host = MockHost::at(T);
    host.push_redis(Ok(vec![
        Reply::Array(vec![Scalar::Integer(1), Scalar::Integer(1)]),
        Reply::Integer(1),
        Reply::Integer(1),
    ]));
    let sink = RedisTopN::new(cfg());
    let b = batch(vec![
        event(1, Some(1), T),
        event(1, Some(1), T),
        event(2, None, T),
    ]);
    assert!(matches!(sink.write_with(&host, &b), WriteOutcome::Accepted));
    assert_eq!(host.counter("events_new"), 1);
    assert_eq!(host.counter("events_replayed"), 1);
    assert_eq!(host.counter("events_without_content_id"), 1);
    let redis_calls: Vec<_> = host
        .service_calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Redis { atomic: false, .. }))
        .collect();
    assert_eq!(redis_calls.len(), 1, "one round trip per batch");
}

#[test]
fn write_retries_later_on_failure_or_odd_reply() {
    let sink = RedisTopN::new(cfg());
    let b = batch(vec![event(1, Some(1), T)]);
    let host = MockHost::at(T);
    host.push_redis(Err(CapabilityError::Failed("connection refused".into())));
    match sink.write_with(&host, &b) {
        WriteOutcome::RetryLater(reason) => assert!(reason.contains("connection refused")),
        other => panic!("{other:?}"),
    }
    // The mock's default reply is Nil per command: not what EVAL returns.
    let host = MockHost::at(T);
    assert!(matches!(
        sink.write_with(&host, &b),
        WriteOutcome::RetryLater(_)
    ));
}
