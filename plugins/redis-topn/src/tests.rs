use super::*;
use fanout_sdk::redis::Command;
use fanout_sdk::testing::{batch, event, Call, MockHost};
use fanout_sdk::CapabilityError;

/// 2026-01-08T14:21:52Z
const T: i64 = 1_767_882_112 * MICROS_PER_SECOND;

/// The config of `json` as the host passes it, through `init`'s checks.
fn config(json: serde_json::Value) -> Result<Config, String> {
    fanout_sdk::config::parse::<Config>(&json.to_string())?.validated()
}

fn cfg() -> Config {
    config(serde_json::json!({})).unwrap()
}

fn sink(cfg: Config) -> RedisTopN {
    RedisTopN::init(cfg, &MockHost::new()).unwrap()
}

#[test]
fn config_defaults_and_validation() {
    let c = cfg();
    assert_eq!(c, Config::default());
    assert_eq!(c.seen_key(16), "fanout:seen:16");
    let c = config(serde_json::json!({"key_prefix": "t1:"})).unwrap();
    assert_eq!(c.count_key(1).to_string(), "t1:content:count:1");
    assert_eq!(c.top_key(), "t1:top:content:10m");
    let e = config(serde_json::json!({"key_prefx": "x"})).unwrap_err();
    assert!(e.contains("unknown field `key_prefx`"), "{e}");
    let e = config(serde_json::json!({"window_minutes": "ten"})).unwrap_err();
    assert!(e.starts_with("config: window_minutes: invalid type"), "{e}");
    assert!(config(serde_json::json!({"window_minutes": 0})).is_err());
    assert!(RedisTopN::init(
        Config {
            top_ttl_seconds: 0,
            ..cfg()
        },
        &MockHost::new()
    )
    .is_err());
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
    assert_eq!(c.last_key(1).to_string(), "content:last:1");
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
fn event_commands_count_and_bucket() {
    let c = cfg();
    let b = batch(vec![
        event(16, Some(1), T),
        event(17, Some(1), T - 20 * MICROS_PER_MINUTE),
    ]);
    let mut keys = EventCommands::new(&c, T);
    let mut text = |e: Event<'_>| -> Vec<Vec<String>> {
        let mut cmds = Commands::new();
        keys.add(&mut cmds, &e, 1);
        cmds.as_slice()
            .iter()
            .map(|c: &Command| {
                c.iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        text(b.events.get(0).unwrap()),
        vec![
            vec!["INCR".to_string(), "content:count:1".into()],
            vec![
                "ZINCRBY".into(),
                "top:content:bucket:202601081421".into(),
                "1".into(),
                "1".into()
            ],
            vec![
                "EXPIREAT".into(),
                "top:content:bucket:202601081421".into(),
                (1_767_882_060 + 960).to_string()
            ],
        ]
    );
    // 20 minutes old: counted, no bucket.
    assert_eq!(
        text(b.events.get(1).unwrap()),
        vec![vec!["INCR".to_string(), "content:count:1".into()]]
    );
}

/// The keys made once per minute and in the reused buffer are the ones `format!` makes, over
/// events that go back and forth across many minutes, contents and a key prefix.
#[test]
fn event_commands_match_formatted_keys_over_many_minutes() {
    let mut c = cfg();
    c.key_prefix = "p:".into();
    let evs: Vec<_> = (0..400i64)
        .map(|i| {
            let back = (i * 7919) % (40 * MICROS_PER_MINUTE / MICROS_PER_SECOND);
            event(i, Some(i % 23 - 3), T - back * MICROS_PER_SECOND)
        })
        .collect();
    let b = batch(evs);
    let mut keys = EventCommands::new(&c, T);
    let mut got = Commands::new();
    let mut want: Vec<Vec<String>> = Vec::new();
    for e in b.events.iter() {
        let content = e.content_id().unwrap();
        keys.add(&mut got, &e, content);
        want.push(vec!["INCR".into(), format!("p:content:count:{content}")]);
        let at = c.bucket_expire_at(e.event_ts_micros(), T);
        if at > 0 {
            let bucket = format!("p:top:content:bucket:{}", minute_key(e.event_ts_micros()));
            want.push(vec![
                "ZINCRBY".into(),
                bucket.clone(),
                "1".into(),
                content.to_string(),
            ]);
            want.push(vec!["EXPIREAT".into(), bucket, at.to_string()]);
        }
    }
    let got: Vec<Vec<String>> = got
        .as_slice()
        .iter()
        .map(|c| {
            c.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect();
    assert!(
        want.len() > 600 && want.len() < 1200,
        "some events have buckets, some not"
    );
    assert_eq!(got, want);
}

#[test]
fn last_command_sends_the_newest_event_of_each_content() {
    let c = cfg();
    let mut newest = event(2, Some(7), T);
    newest.event_type = Some("play".into());
    let b = batch(vec![
        event(1, Some(7), T),
        newest,
        event(3, Some(7), T - MICROS_PER_MINUTE),
        event(4, Some(8), T),
    ]);
    let events: Vec<_> = b
        .events
        .iter()
        .map(|e| (e, e.content_id().unwrap()))
        .collect();
    let mut cmds = Commands::new();
    last_command(&c, &mut cmds, &events);
    assert_eq!(cmds.len(), 1);
    let text: Vec<String> = cmds.as_slice()[0]
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(
        &text[..5],
        ["EVAL", LAST_SCRIPT, "2", "content:last:7", "content:last:8"]
    );
    assert_eq!(text[5], "3600");
    assert_eq!(&text[6..8], ["2026-01-08 14:21:52", "2"]);
    let json: serde_json::Value = serde_json::from_str(&text[8]).unwrap();
    assert_eq!(
        (json["event_id"].clone(), json["event_type"].clone()),
        (2.into(), "play".into())
    );
    assert_eq!(text[10], "4");
    assert_eq!(text.len(), 12);
    let mut none = Commands::new();
    last_command(&c, &mut none, &[]);
    assert!(none.is_empty());
}

fn once_outcomes(host: &MockHost) -> Vec<Vec<(i64, fanout_sdk::Outcome)>> {
    host.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::RedisOnce { outcomes, .. } => Some(outcomes),
            _ => None,
        })
        .collect()
}

#[test]
fn a_replayed_batch_counts_nothing_twice_and_the_pipeline_is_one_round_trip() {
    let host = MockHost::at(T);
    let mut sink = sink(cfg());
    let b = batch(vec![
        event(1, Some(1), T),
        event(2, None, T),
        event(3, Some(2), T),
        event(4, Some(1), T),
    ]);
    assert!(matches!(sink.write(&host, &b), WriteOutcome::Accepted));
    assert!(matches!(sink.write(&host, &b), WriteOutcome::Accepted));
    assert_eq!(host.counter("events_new"), 3);
    assert_eq!(host.counter("events_replayed"), 3);
    assert_eq!(host.counter("events_without_content_id"), 2);
    let incrs: Vec<_> = host
        .redis_once_commands()
        .into_iter()
        .filter(|c| c[0] == "INCR")
        .map(|c| c[1].clone())
        .collect();
    assert_eq!(
        incrs,
        ["content:count:1", "content:count:2", "content:count:1"],
        "once each"
    );
    assert_eq!(host.once_mark("fanout:once:", "test", 0), Some(4));
    // Per batch: one exactly-once call with content:last and the window in its pipeline.
    let calls = host.service_calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    match &calls[1] {
        Call::Redis {
            commands,
            atomic: false,
        } => {
            assert_eq!(commands.len(), 3);
            assert_eq!(
                (commands[0][0].as_str(), commands[0][1].as_str()),
                ("EVAL", LAST_SCRIPT)
            );
            assert_eq!(commands[1][..3], ["ZUNIONSTORE", "top:content:10m", "10"]);
            assert_eq!(commands[1].len(), 13);
            assert_eq!(commands[2], ["EXPIRE", "top:content:10m", "120"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn chunks_are_round_trips_and_the_window_goes_last() {
    let c = config(serde_json::json!({"events_per_script": 2})).unwrap();
    let host = MockHost::at(T);
    let b = batch((1..=5).map(|id| event(id, Some(1), T)).collect());
    assert!(matches!(sink(c).write(&host, &b), WriteOutcome::Accepted));
    let sizes: Vec<usize> = once_outcomes(&host).iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1]);
    let plain = host
        .service_calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Redis { .. }))
        .count();
    assert_eq!(
        plain, 1,
        "content:last and the window once, with the last chunk"
    );
    // A batch without content ids still rebuilds the window.
    let host = MockHost::at(T);
    let b = batch(vec![event(9, None, T)]);
    assert!(matches!(
        sink(cfg()).write(&host, &b),
        WriteOutcome::Accepted
    ));
    assert!(
        matches!(&host.service_calls()[1], Call::Redis { commands, .. } if commands[0][0] == "ZUNIONSTORE")
    );
}

#[test]
fn old_seen_markers_count_as_applied_until_turned_off() {
    let host = MockHost::at(T);
    host.insert_key("fanout:seen:2");
    let b = batch(vec![event(1, Some(1), T), event(2, Some(1), T)]);
    assert!(matches!(
        sink(cfg()).write(&host, &b),
        WriteOutcome::Accepted
    ));
    assert_eq!(host.counter("events_new"), 1);
    assert_eq!(host.counter("events_replayed"), 1);
    let off =
        config(serde_json::json!({"honour_seen_markers": false, "key_prefix": "p:"})).unwrap();
    assert!(off.once().legacy_marker_key(2).is_none());
    assert_eq!(
        cfg().once().legacy_marker_key(2).as_deref(),
        Some("fanout:seen:2")
    );
    assert_eq!(off.once().marks_key(), "p:fanout:once:marks");
}

#[test]
fn backfilled_events_over_the_live_range_count_nothing_twice() {
    let host = MockHost::at(T);
    let mut sink = sink(cfg());
    let evs: Vec<_> = (1..=6).map(|id| event(id, Some(1), T)).collect();
    // Live from event 4 on.
    assert!(matches!(
        sink.write(&host, &batch(evs[3..].to_vec())),
        WriteOutcome::Accepted
    ));
    let backfill = fanout_sdk::testing::batch_at(evs.iter().map(|e| (e, None)));
    for _ in 0..2 {
        assert!(matches!(
            sink.write(&host, &backfill),
            WriteOutcome::Accepted
        ));
    }
    let incrs = host
        .redis_once_commands()
        .iter()
        .filter(|c| c[0] == "INCR")
        .count();
    assert_eq!(incrs, 6, "each of the 6 events counted once");
}

#[test]
fn write_retries_later_on_failure() {
    let mut sink = sink(cfg());
    let b = batch(vec![event(1, Some(1), T)]);
    let host = MockHost::at(T);
    host.push_redis(Err(CapabilityError::Failed("connection refused".into())));
    match sink.write(&host, &b) {
        WriteOutcome::RetryLater(reason) => assert!(reason.contains("connection refused")),
        other => panic!("{other:?}"),
    }
    // Nothing was applied: the retry applies it.
    assert!(matches!(sink.write(&host, &b), WriteOutcome::Accepted));
    assert_eq!(host.counter("events_new"), 1);
}
