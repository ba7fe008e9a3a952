//! Backfill: `fanout backfill` reads a time range from PostgreSQL and delivers it through the
//! same enrichment and plugins as the live stream; it is idempotent with itself and the
//! stream, and refuses bad input before doing any work.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use fanout_tests::*;
use serde_json::Value;

/// Inserts events at fixed past times; returns the ids inside [09:00, 10:00).
async fn seed_history(db: &Database) -> (BTreeSet<i64>, BTreeSet<i64>) {
    let pg = db.client().await;
    let mut inside = BTreeSet::new();
    let mut outside = BTreeSet::new();
    let rows = [
        ("2026-01-08 08:59:59+00", 1, Some(7000)),
        ("2026-01-08 09:00:00+00", 1, Some(7000)),
        ("2026-01-08 09:15:00+00", 2, None),
        ("2026-01-08 09:30:00+00", 4, Some(1000)),
        ("2026-01-08 09:45:00+00", 5, Some(1000)),
        ("2026-01-08 09:59:59.999+00", 15, Some(1000)),
        ("2026-01-08 10:00:00+00", 3, Some(1000)),
        ("2026-01-08 11:00:00+01", 3, Some(1000)), // = 10:00 UTC: outside
    ];
    for (ts, content, duration) in rows {
        let id: i64 = pg
            .query_one(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) VALUES ($1, 1, 'play', $2::text::timestamptz, $3, 'web') RETURNING id",
                &[&(content as i64), &ts, &duration],
            )
            .await
            .expect("insert")
            .get(0);
        let t = ts.trim_end_matches("+00").trim_end_matches("+01");
        if ts.ends_with("+00") && ("2026-01-08 09:00:00".."2026-01-08 10:00:00").contains(&t) {
            inside.insert(id);
        } else {
            outside.insert(id);
        }
    }
    (inside, outside)
}

fn backfill(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let state = std::env::temp_dir().join(unique("backfill-state"));
    let out = Command::new(host_binary())
        .arg("backfill")
        .arg("--config")
        .arg(config)
        .arg("--state-file")
        .arg(&state)
        .args(args)
        .output()
        .expect("run backfill");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(cfg: &ConfigBuilder, name: &str) -> std::path::PathBuf {
    let path = repo_root()
        .join("target/test-logs")
        .join(format!("{}.toml", unique(name)));
    let _ = std::fs::create_dir_all(path.parent().expect("dir"));
    std::fs::write(&path, cfg.render()).expect("config");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_delivers_the_range_once_with_the_live_enrichment() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let (inside, outside) = seed_history(&db).await;
    let key = unique("bf");
    let cfg = ConfigBuilder::new(&stack, &unique("unused"), "", &db.url).testkit(
        "rec",
        "record",
        &key,
        "fail-fast",
        2,
    );
    let config = write_config(&cfg, "backfill");

    let (code, stdout, stderr) = backfill(
        &config,
        &[
            "--start",
            "2026-01-08T09:00:00",
            "--end",
            "2026-01-08T10:00:00",
        ],
    );
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("backfill done: read=5 delivered=5 dead_lettered=0"),
        "{stdout}"
    );
    let r = redis(&stack).await;
    let got = recorded(&r, &key).await;
    let ids: BTreeSet<i64> = got.iter().filter_map(|e| e["event_id"].as_i64()).collect();
    assert_eq!(ids, inside);
    assert!(ids.is_disjoint(&outside));
    // The same enrichment as the live path.
    let e = got
        .iter()
        .find(|e| e["event_ts"] == "2026-01-08 09:00:00")
        .expect("09:00 event");
    assert_eq!(e["content_type"], "video");
    assert_eq!(e["engagement_pct"], 0.02);
    assert_eq!(e["engagement_seconds"], 7.0);
    let zero = got
        .iter()
        .find(|e| e["content_id"] == 5)
        .expect("content 5");
    assert!(zero["engagement_pct"].is_null());
    let eighth = got
        .iter()
        .find(|e| e["content_id"] == 15)
        .expect("content 15");
    assert_eq!(eighth["engagement_pct"], 0.13);

    // A content filter.
    let (code, stdout, _) = backfill(
        &config,
        &[
            "--start",
            "2026-01-08T09:00:00Z",
            "--end",
            "2026-01-08T10:00:00Z",
            "--content-id",
            "4",
        ],
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("read=1 "), "{stdout}");
}

/// `--plugin` delivers to the named plugins only; an unknown name is refused before any work.
#[tokio::test(flavor = "multi_thread")]
async fn backfill_to_named_plugins_only() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let (inside, _) = seed_history(&db).await;
    let (chosen, other) = (unique("bf-chosen"), unique("bf-other"));
    let cfg = ConfigBuilder::new(&stack, &unique("unused"), "", &db.url)
        .testkit("chosen", "record", &chosen, "fail-fast", 2)
        .testkit("other", "record", &other, "fail-fast", 2);
    let config = write_config(&cfg, "backfill-plugin");
    let range = [
        "--start",
        "2026-01-08T09:00:00",
        "--end",
        "2026-01-08T10:00:00",
    ];

    let (code, stdout, stderr) = backfill(&config, &[&range[..], &["--plugin", "nope"]].concat());
    assert_ne!(code, 0);
    assert!(
        stderr.contains("no plugin named `nope`") && stderr.contains("chosen, other"),
        "{stderr}"
    );
    assert!(!stdout.contains("backfill done"), "{stdout}");

    let (code, stdout, stderr) = backfill(&config, &[&range[..], &["--plugin", "chosen"]].concat());
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("delivered=5"), "{stdout}");
    let r = redis(&stack).await;
    let ids: BTreeSet<i64> = recorded(&r, &chosen)
        .await
        .iter()
        .filter_map(|e| e["event_id"].as_i64())
        .collect();
    assert_eq!(ids, inside);
    assert!(
        recorded(&r, &other).await.is_empty(),
        "the other plugin got nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_twice_and_over_the_live_stream_changes_nothing() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let cdc = Cdc::start(&stack, &db);
    let prefix = format!("{}:", unique("bfr"));
    let cfg = ConfigBuilder::new(&stack, &cdc.events_topic(), &cdc.content_topic(), &db.url)
        .redis_topn(&prefix);
    let host = HostProc::start("bf-live", &cfg.render(), &cfg.metrics_addr);
    let pg = db.client().await;
    for i in 0..10 {
        db.insert_event(&pg, Some(3), i, "play", Some(1000), "web")
            .await;
    }
    let mut r = redis(&stack).await;
    let count_key = format!("{prefix}content:count:3");
    eventually(Duration::from_secs(60), "live stream counted 10", || {
        let mut c = r.clone();
        let k = count_key.clone();
        async move {
            let n: Option<i64> = redis::cmd("GET").arg(&k).query_async(&mut c).await.ok()?;
            (n == Some(10)).then_some(())
        }
    })
    .await;
    drop(host);
    drop(cdc);
    let config = write_config(&cfg, "bf-replay");
    let start = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let end = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    for run in 0..2 {
        let (code, stdout, stderr) = backfill(&config, &["--start", &start, "--end", &end]);
        assert_eq!(code, 0, "run {run}: {stdout} {stderr}");
        assert!(stdout.contains("read=10 "), "{stdout}");
        let n: i64 = redis::cmd("GET")
            .arg(&count_key)
            .query_async(&mut r)
            .await
            .expect("count");
        assert_eq!(
            n, 10,
            "backfill run {run} must not count events the stream counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_ranges_and_unreachable_postgres_fail_clearly() {
    let Some(stack) = Stack::get() else { return };
    let cfg = ConfigBuilder::new(
        &stack,
        &unique("unused"),
        "",
        "postgres://postgres@127.0.0.1:1/nothing",
    )
    .testkit("rec", "record", &unique("bad"), "fail-fast", 1);
    let config = write_config(&cfg, "bf-bad");
    let (code, _, err) = backfill(
        &config,
        &[
            "--start",
            "2026-01-08T10:00:00",
            "--end",
            "2026-01-08T09:00:00",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("reversed"), "{err}");
    let (code, _, err) = backfill(
        &config,
        &["--start", "yesterday", "--end", "2026-01-08T09:00:00"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--start `yesterday`"), "{err}");
    let (code, _, err) = backfill(
        &config,
        &[
            "--start",
            "2026-01-08T09:00:00",
            "--end",
            "2026-01-08T10:00:00",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("postgres"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_continues_after_the_checkpoint() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let (inside, _) = seed_history(&db).await;
    let key = unique("bf-resume");
    let cfg = ConfigBuilder::new(&stack, &unique("unused"), "", &db.url).testkit(
        "rec",
        "record",
        &key,
        "fail-fast",
        2,
    );
    let config = write_config(&cfg, "bf-resume");
    // A checkpoint as an interrupted run leaves it: the first two ids of the range are done.
    let done: Vec<i64> = inside.iter().copied().take(2).collect();
    let state = std::env::temp_dir().join(unique("resume-state"));
    std::fs::write(&state, done[1].to_string()).expect("state");
    let out = Command::new(host_binary())
        .args([
            "backfill",
            "--start",
            "2026-01-08T09:00:00",
            "--end",
            "2026-01-08T10:00:00",
            "--resume",
            "--config",
        ])
        .arg(&config)
        .arg("--state-file")
        .arg(&state)
        .output()
        .expect("backfill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("read=3 delivered=3"), "{stdout}");
    let ids: BTreeSet<i64> = recorded(&redis(&stack).await, &key)
        .await
        .iter()
        .filter_map(|e| e["event_id"].as_i64())
        .collect();
    let expected: BTreeSet<i64> = inside.iter().copied().skip(2).collect();
    assert_eq!(ids, expected, "only the events after the checkpoint");
    assert!(
        !state.exists(),
        "a finished backfill removes its checkpoint"
    );
}

/// What the three sinks hold: ClickHouse rows, Redis counts and last events, API bodies by key.
async fn sink_state(
    stack: &Stack,
    ch_db: &str,
    prefix: &str,
    ns: &str,
) -> (Vec<Value>, Vec<(String, String)>, BTreeMap<String, Value>) {
    let rows = clickhouse_rows(
        stack,
        &format!("SELECT * FROM {ch_db}.events_enriched ORDER BY event_id"),
    )
    .await;
    let mut r = redis(stack).await;
    let mut redis_state = Vec::new();
    for content in 1..=25 {
        for key in [
            format!("{prefix}content:count:{content}"),
            format!("{prefix}content:last:{content}"),
        ] {
            let v: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut r)
                .await
                .expect("redis get");
            if let Some(v) = v {
                redis_state.push((key.trim_start_matches(prefix).to_string(), v));
            }
        }
    }
    let api = mock_received(stack, ns)
        .await
        .into_iter()
        .filter_map(|req| {
            Some((
                req["idempotency_key"].as_str()?.to_string(),
                req["body"].clone(),
            ))
        })
        .collect();
    (rows, redis_state, api)
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_through_the_default_plugins_matches_the_live_stream() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let cdc = Cdc::start(&stack, &db);
    let (live_db, live_prefix, live_ns) = (
        unique("live"),
        format!("{}:", unique("live")),
        unique("live"),
    );
    let (bf_db, bf_prefix, bf_ns) = (unique("bf"), format!("{}:", unique("bf")), unique("bf"));
    for d in [&live_db, &bf_db] {
        clickhouse_query(&stack, &format!("CREATE DATABASE IF NOT EXISTS {d}")).await;
    }
    let live =
        ConfigBuilder::new(&stack, &cdc.events_topic(), &cdc.content_topic(), &db.url).plugin_raw(
            &plugin_toml::defaults(&stack, &live_db, &live_prefix, &live_ns, "per-event"),
        );
    let host = HostProc::start("bf-three-live", &live.render(), &live.metrics_addr);
    let pg = db.client().await;
    let mut ids = Vec::new();
    for (i, (content, duration)) in [
        (1, Some(7000)),
        (3, Some(1000)),
        (4, Some(5000)),
        (5, None),
        (15, Some(1000)),
        (424_242, Some(10)),
    ]
    .into_iter()
    .enumerate()
    {
        ids.push(
            db.insert_event(&pg, Some(content), i as i64, "play", duration, "web")
                .await,
        );
    }
    let n = ids.len();
    eventually(
        Duration::from_secs(60),
        "the live stream delivered to all three sinks",
        || async {
            let m = host.metrics().await;
            ["clickhouse", "redis-topn", "external-api"]
                .iter()
                .all(|p| {
                    metric_value(
                        &m,
                        &format!("fanout_events_delivered_total{{plugin=\"{p}\"}}"),
                    ) >= n as f64
                })
                .then_some(())
        },
    )
    .await;
    drop(host);
    drop(cdc);
    let live_state = sink_state(&stack, &live_db, &live_prefix, &live_ns).await;
    assert_eq!(live_state.0.len(), n);
    assert_eq!(live_state.2.len(), n);

    let start = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let end = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    // Backfill into fresh sinks: the same values as the live stream.
    let fresh = ConfigBuilder::new(&stack, &unique("unused"), "", &db.url).plugin_raw(
        &plugin_toml::defaults(&stack, &bf_db, &bf_prefix, &bf_ns, "per-event"),
    );
    let (code, out, err) = backfill(
        &write_config(&fresh, "bf-three"),
        &["--start", &start, "--end", &end],
    );
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.contains(&format!("read={n} delivered={n} dead_lettered=0")),
        "{out}"
    );
    let bf_state = sink_state(&stack, &bf_db, &bf_prefix, &bf_ns).await;
    assert_eq!(bf_state.0, live_state.0, "ClickHouse rows");
    assert_eq!(bf_state.1, live_state.1, "Redis counts and last events");
    assert_eq!(bf_state.2, live_state.2, "API bodies by idempotency key");

    // Backfill over the range the live stream covered, twice: nothing changes there.
    let over_live = ConfigBuilder::new(&stack, &unique("unused"), "", &db.url).plugin_raw(
        &plugin_toml::defaults(&stack, &live_db, &live_prefix, &live_ns, "per-event"),
    );
    let config = write_config(&over_live, "bf-three-over");
    for run in 0..2 {
        let (code, out, err) = backfill(&config, &["--start", &start, "--end", &end]);
        assert_eq!(code, 0, "run {run}: {out} {err}");
        let after = sink_state(&stack, &live_db, &live_prefix, &live_ns).await;
        assert_eq!(after.0, live_state.0, "run {run}: ClickHouse rows changed");
        assert_eq!(after.1, live_state.1, "run {run}: Redis changed");
        // The API may be called again, but only with keys and bodies it has seen.
        assert_eq!(after.2, live_state.2, "run {run}: API effects changed");
    }
}
