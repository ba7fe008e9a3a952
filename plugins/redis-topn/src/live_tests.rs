//! The scripts against a real Redis: `FANOUT_TEST_REDIS=127.0.0.1:56379 cargo test
//! --manifest-path plugins/Cargo.toml -p redis-topn`. Skipped (passes) when the variable is
//! unset. Uses keys under a unique prefix and deletes them.

use super::*;
use fanout_sdk::redis::Reply;
use fanout_sdk::testing::{batch, batch_at, event, RedisServerHost};

#[test]
fn scripts_apply_once_keep_the_newest_last_event_and_bounded_bookkeeping() {
    let now = fanout_sdk::time::now_micros();
    let Some(host) = RedisServerHost::from_env(now) else {
        eprintln!("FANOUT_TEST_REDIS unset: skipped");
        return;
    };
    let prefix = format!("topn-test-{}-{}:", std::process::id(), now);
    let config = fanout_sdk::config::from_value(serde_json::json!({"key_prefix": prefix})).unwrap();
    let mut sink = RedisTopN::init(config, &host).unwrap();
    let k = |s: &str| format!("{prefix}{s}");
    // An event the previous version counted: its marker is honoured.
    host.cmd(&["SET", &k("fanout:seen:9"), "1", "EX", "60"]);

    let min = MICROS_PER_MINUTE;
    let mut newest = event(2, Some(7), now - min);
    newest.device = Some("ios".into());
    let b = batch(vec![
        event(1, Some(7), now - 2 * min),
        newest,
        event(3, Some(8), now),
        event(4, None, now),
        event(5, Some(7), now - 30 * min), // too old for a bucket, still counted
        event(9, Some(7), now),            // counted by the previous version
    ]);
    assert!(matches!(sink.write(&host, &b), WriteOutcome::Accepted));
    // Replay, a backfill of the same events, and an out-of-order older event arriving later.
    assert!(matches!(sink.write(&host, &b), WriteOutcome::Accepted));
    let evs: Vec<_> = (1..=5).map(|id| event(id, Some(7), now)).collect();
    let backfill = batch_at(evs.iter().map(|e| (e, None)));
    assert!(matches!(
        sink.write(&host, &backfill),
        WriteOutcome::Accepted
    ));
    // (offsets follow Kafka's order: after the first batch's)
    let late_event = event(6, Some(7), now - 3 * min);
    let late = batch_at([(
        &late_event,
        Some(fanout_sdk::Position {
            topic: "test",
            partition: 0,
            offset: 10,
        }),
    )]);
    assert!(matches!(sink.write(&host, &late), WriteOutcome::Accepted));

    assert_eq!(host.cmd(&["GET", &k("content:count:7")]).as_int(), Some(4));
    assert_eq!(host.cmd(&["GET", &k("content:count:8")]).as_int(), Some(1));
    let last = host
        .cmd(&["GET", &k("content:last:7")])
        .as_string()
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["event_id"], 9, "{last}");
    let last8 = host
        .cmd(&["GET", &k("content:last:8")])
        .as_string()
        .unwrap();
    assert!(last8.contains("\"event_id\":3"), "{last8}");
    let ttl = host.cmd(&["TTL", &k("content:last:7")]).as_int().unwrap();
    assert!(ttl > 3500 && ttl <= 3600, "{ttl}");
    let top = host
        .cmd(&["ZRANGE", &k("top:content:10m"), "0", "-1", "WITHSCORES"])
        .as_strings();
    assert_eq!(
        top,
        vec!["8", "1", "7", "3"],
        "content 7: 3 events in the window (1, 2, 6; 9 was the old version's)"
    );
    let ttl = host.cmd(&["TTL", &k("top:content:10m")]).as_int().unwrap();
    assert!(ttl > 100 && ttl <= 120, "{ttl}");
    let old_bucket = sink.cfg.bucket_key(now - 30 * min);
    assert_eq!(host.cmd(&["EXISTS", &old_bucket]), Reply::Integer(0));

    // Bookkeeping: one partition field and min_live_event_id; no marker per event.
    let marks = host.cmd(&["HGETALL", &k("fanout:once:marks")]).as_strings();
    assert_eq!(marks, vec!["test/0", "10", "min_live_event_id", "1"]);
    let seen = host
        .cmd(&["KEYS", &format!("{prefix}fanout:seen:*")])
        .as_strings();
    assert_eq!(seen, vec![k("fanout:seen:9")], "no new markers");

    host.delete_prefix(&prefix);
}

/// Debezium (at-least-once) re-sent an event after a broker restart at a new offset (partition
/// 3, offsets 1814 and 1815): the count goes up once, the re-send is counted as replayed.
#[test]
fn a_producer_resend_at_a_new_offset_counts_once() {
    let now = fanout_sdk::time::now_micros();
    let Some(host) = RedisServerHost::from_env(now) else {
        eprintln!("FANOUT_TEST_REDIS unset: skipped");
        return;
    };
    let prefix = format!("topn-resend-{}-{}:", std::process::id(), now);
    let config = fanout_sdk::config::from_value(serde_json::json!({"key_prefix": prefix})).unwrap();
    let mut sink = RedisTopN::init(config, &host).unwrap();
    let k = |s: &str| format!("{prefix}{s}");
    let e = event(7239, Some(42), now);
    let at = |offset| {
        batch_at([(
            &e,
            Some(fanout_sdk::Position {
                topic: "dbserver1.public.engagement_events",
                partition: 3,
                offset,
            }),
        )])
    };
    assert!(matches!(
        sink.write(&host, &at(1814)),
        WriteOutcome::Accepted
    ));
    assert!(matches!(
        sink.write(&host, &at(1815)),
        WriteOutcome::Accepted
    ));
    assert_eq!(host.cmd(&["GET", &k("content:count:42")]).as_int(), Some(1));
    let top = host
        .cmd(&["ZRANGE", &k("top:content:10m"), "0", "-1", "WITHSCORES"])
        .as_strings();
    assert_eq!(top, vec!["42", "1"]);
    let marks = host.cmd(&["HGETALL", &k("fanout:once:marks")]).as_strings();
    assert_eq!(
        marks,
        vec![
            "dbserver1.public.engagement_events/3",
            "1815",
            "min_live_event_id",
            "7239"
        ]
    );
    host.delete_prefix(&prefix);
}
