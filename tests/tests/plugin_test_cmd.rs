//! `fanout plugin test` on the default plugins (no services needed): each one runs against
//! generated or file events with the in-memory Redis, HTTP and ClickHouse, and what it did is
//! asserted from the JSON report (rows, keys, scripts' commands, request bodies); a replay
//! applies nothing twice where the plugin is exactly-once; a trap, a rejection, a
//! retry-later, an HTTP failure and (with --grants) a refused call exit non-zero.

use std::collections::BTreeMap;
use std::process::Command;

use fanout_tests::*;
use serde_json::Value;

/// Runs `fanout plugin test <wasm> --json <args>`: (exit code, report).
fn plugin_test(wasm: &str, args: &[&str]) -> (i32, Value) {
    let out = Command::new(host_binary())
        .args(["plugin", "test"])
        .arg(plugin_wasm(wasm))
        .arg("--json")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fanout plugin test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn steps(report: &Value) -> &Vec<Value> {
    report["steps"].as_array().expect("steps")
}

/// The batch steps (not init), first delivery or replays.
fn batches(report: &Value, replay: bool) -> Vec<&Value> {
    steps(report)
        .iter()
        .filter(|s| s["name"] != "init")
        .filter(|s| s["name"].as_str().unwrap_or("").ends_with("(replay)") == replay)
        .collect()
}

fn effects<'a>(steps: &[&'a Value], kind: &str) -> Vec<&'a Value> {
    steps
        .iter()
        .flat_map(|s| s["effects"].as_array().expect("effects"))
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Commands the plugin's scripts ran, per command name.
fn script_calls(steps: &[&Value]) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut out: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for e in effects(steps, "redis") {
        let per_command = e["script_calls"].as_array().expect("script_calls");
        for c in per_command
            .iter()
            .flat_map(|c| c.as_array().expect("calls"))
        {
            let args: Vec<String> = c
                .as_array()
                .expect("command")
                .iter()
                .map(|a| a.as_str().unwrap_or("").to_string())
                .collect();
            out.entry(args[0].to_ascii_uppercase())
                .or_default()
                .push(args);
        }
    }
    out
}

/// The in-memory Redis at the end: key -> (type, value text).
fn redis_keys(report: &Value) -> BTreeMap<String, (String, String)> {
    report["redis"]
        .as_array()
        .expect("redis")
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap_or("").to_string(),
                (
                    k["type"].as_str().unwrap_or("").to_string(),
                    k["value"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

fn all_accepted(report: &Value) {
    for s in steps(report) {
        let outcome = s["outcome"].as_str().unwrap_or("");
        assert!(
            outcome == "ready" || outcome == "accepted",
            "{}: {s:#}",
            s["name"]
        );
    }
    assert_eq!(report["ok"], true);
}

#[test]
fn clickhouse_stores_one_row_per_event_and_a_replay_none() {
    let (code, report) = plugin_test(
        "clickhouse",
        &[
            "--generate",
            "1200",
            "--batch-size",
            "500",
            "--replay",
            "--plugin-config",
            r#"{"database": "engagement", "table": "events_enriched"}"#,
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    all_accepted(&report);
    let first = batches(&report, false);
    assert_eq!(first.len(), 3);
    let rows: usize = effects(&first, "clickhouse_insert")
        .iter()
        .map(|e| e["rows"].as_array().expect("rows").len())
        .sum();
    assert_eq!(rows, 1200, "one row per event");
    let init = vec![&steps(&report)[0]];
    let ddl: Vec<String> = effects(&init, "clickhouse_execute")
        .iter()
        .map(|e| e["sql"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        ddl.iter().any(|s| s.contains("CREATE TABLE")),
        "schema made at init: {ddl:?}"
    );
    // The lookups see the rows recorded: a replay inserts nothing.
    let replay = batches(&report, true);
    assert_eq!(replay.len(), 3);
    assert!(
        effects(&replay, "clickhouse_insert").is_empty(),
        "a replay inserted rows"
    );
    assert_eq!(report["clickhouse"][0]["rows"], 1200);
    // The rows are SPEC-4 JSON of the events.
    let row: Value = serde_json::from_str(
        effects(&first, "clickhouse_insert")[0]["rows"][0]
            .as_str()
            .expect("row"),
    )
    .expect("row JSON");
    assert_eq!(row["event_id"], 1);
    assert_eq!(row["event_ts"].as_str().map(str::len), Some(19), "{row}");
}

#[test]
fn redis_topn_counts_every_event_once_through_its_scripts() {
    let (code, report) = plugin_test(
        "redis_topn",
        &[
            "--generate",
            "300",
            "--batch-size",
            "100",
            "--replay",
            "--plugin-config",
            r#"{"key_prefix": "t:"}"#,
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    all_accepted(&report);
    let first = batches(&report, false);
    let calls = script_calls(&first);
    let zincr = calls.get("ZINCRBY").expect("ZINCRBY in the script");
    assert_eq!(zincr.len(), 300, "one ZINCRBY per event");
    assert!(
        zincr
            .iter()
            .all(|c| c[1].starts_with("t:top:content:bucket:20")),
        "bucket keys of the events' minutes: {:?}",
        &zincr[..3]
    );
    assert_eq!(calls.get("INCR").map_or(0, Vec::len), 300);
    // The replay applies nothing: the exactly-once marks hold.
    let replay_calls = script_calls(&batches(&report, true));
    assert!(
        !replay_calls.contains_key("ZINCRBY") && !replay_calls.contains_key("INCR"),
        "{:?}",
        replay_calls.keys()
    );
    let keys = redis_keys(&report);
    let counted: i64 = keys
        .iter()
        .filter(|(k, _)| k.starts_with("t:content:count:"))
        .map(|(_, (_, v))| v.trim_matches('"').parse::<i64>().expect("count"))
        .sum();
    assert_eq!(counted, 300, "content:count over all contents");
    // The generated events end now: their minute buckets and the 10-minute union are live.
    assert_eq!(keys["t:top:content:10m"].0, "zset");
    assert!(keys.keys().any(|k| k.starts_with("t:top:content:bucket:")));
    assert_eq!(
        keys.keys()
            .filter(|k| k.starts_with("t:content:last:"))
            .count(),
        20,
        "the newest event of each of the 20 contents"
    );
    assert!(
        keys.contains_key("t:fanout:once:marks"),
        "{:?}",
        keys.keys()
    );
}

#[test]
fn external_api_posts_each_event_and_fails_on_http_errors() {
    let config = r#"{"url": "http://api.test/events", "mode": "per-event", "max_retries": 0}"#;
    let (code, report) = plugin_test(
        "external_api",
        &["--generate", "120", "--plugin-config", config],
    );
    assert_eq!(code, 0, "{report:#}");
    all_accepted(&report);
    let http = effects(&batches(&report, false), "http");
    assert_eq!(http.len(), 120, "one POST per event");
    let mut ids: Vec<i64> = http
        .iter()
        .map(|r| {
            assert_eq!(r["method"], "POST");
            assert_eq!(r["url"], "http://api.test/events");
            let body: Value =
                serde_json::from_str(r["body"].as_str().expect("body")).expect("JSON body");
            body["event_id"].as_i64().expect("event_id")
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=120).collect::<Vec<_>>());
    // Every request answered 503: the plugin gives the events up (or asks to retry): exit 1.
    let (code, report) = plugin_test(
        "external_api",
        &[
            "--generate",
            "10",
            "--http-status",
            "503",
            "--plugin-config",
            config,
        ],
    );
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    let outcome = batches(&report, false)[0]["outcome"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        outcome == "rejected" || outcome == "retry_later",
        "{outcome}"
    );
}

/// HINCRBY per event through RedisOnce: the counts (`dc:devcount:{device}` hashes) sum to the
/// events, a replay adds none.
fn assert_device_counts(wasm: &str, config: &str) {
    let (code, report) = plugin_test(
        wasm,
        &[
            "--generate",
            "400",
            "--batch-size",
            "150",
            "--replay",
            "--plugin-config",
            config,
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    all_accepted(&report);
    let calls = script_calls(&batches(&report, false));
    assert_eq!(
        calls.get("HINCRBY").map_or(0, Vec::len),
        400,
        "{:?}",
        calls.keys()
    );
    assert!(!script_calls(&batches(&report, true)).contains_key("HINCRBY"));
    let keys = redis_keys(&report);
    let devices: Vec<&String> = keys
        .keys()
        .filter(|k| k.starts_with("dc:devcount:"))
        .collect();
    assert_eq!(devices.len(), 4, "web, ios, android, tv: {devices:?}");
    let total: i64 = keys
        .iter()
        .filter(|(k, _)| k.starts_with("dc:devcount:"))
        .flat_map(|(_, (_, v))| {
            v.split(", ")
                .filter_map(|kv| kv.rsplit_once(": "))
                .map(|(_, n)| {
                    n.trim_matches(|c| c == '"' || c == '}')
                        .parse::<i64>()
                        .expect("count")
                })
                .collect::<Vec<_>>()
        })
        .sum();
    assert_eq!(total, 400);
}

#[test]
fn device_counter_counts_each_event_once() {
    assert_device_counts(
        "device_counter",
        r#"{"key_prefix": "dc:devcount:", "once_key_prefix": "dc:once:"}"#,
    );
}

#[test]
fn the_python_device_counter_counts_each_event_once() {
    if !repo_root()
        .join("plugins/dist/python_device_counter.wasm")
        .exists()
    {
        assert!(
            std::env::var_os("FANOUT_REQUIRE_STACK").is_none(),
            "python_device_counter.wasm missing: run scripts/build-python-plugins"
        );
        eprintln!("python_device_counter.wasm not built: skipped");
        return;
    }
    assert_device_counts("python_device_counter", r#"{"key_prefix": "dc:"}"#);
}

#[test]
fn the_template_logs_and_counts_its_batches() {
    let (code, report) = plugin_test("template", &["--generate", "50", "--batch-size", "20"]);
    assert_eq!(code, 0, "{report:#}");
    all_accepted(&report);
    let first = batches(&report, false);
    assert_eq!(first.len(), 3);
    let logs = effects(&first, "log");
    assert!(
        logs.iter().any(|l| l["line"]
            .as_str()
            .unwrap_or("")
            .contains("plugin-test/0:0-19")),
        "{logs:?}"
    );
    assert!(!effects(&first, "metric").is_empty(), "metrics recorded");
}

#[test]
fn events_from_a_file_in_the_spec_shape() {
    let dir = repo_root().join("target/test-logs");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(format!("{}.jsonl", unique("plugin-test-events")));
    std::fs::write(
        &path,
        concat!(
            "# the SPEC's example, and one without content\n",
            r#"{"event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play", "event_ts": "2026-01-08 14:21:52", "duration_ms": 7000, "device": "web", "content_type": "video", "length_seconds": 300}"#,
            "\n",
            r#"{"event_id": 17, "content_id": 5, "event_ts": "2026-01-08T14:22:00Z"}"#,
            "\n"
        ),
    )
    .expect("write events");
    let (code, report) = plugin_test(
        "clickhouse",
        &[
            "--events",
            path.to_str().expect("path"),
            "--plugin-config",
            r#"{"database": "d", "table": "t"}"#,
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    let inserts = effects(&batches(&report, false), "clickhouse_insert");
    let row: Value =
        serde_json::from_str(inserts[0]["rows"][0].as_str().expect("row")).expect("JSON");
    assert_eq!(
        row,
        serde_json::json!({"event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play",
            "event_ts": "2026-01-08 14:21:52", "duration_ms": 7000, "device": "web",
            "content_type": "video", "length_seconds": 300, "engagement_seconds": 7.0,
            "engagement_pct": 0.02})
    );
    let _ = std::fs::remove_file(&path);
    // A bad line is a clear error naming it.
    std::fs::write(&path, "{\"event_id\": \"x\"}\n").expect("write");
    let out = Command::new(host_binary())
        .args(["plugin", "test"])
        .arg(plugin_wasm("clickhouse"))
        .arg("--events")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_trap_a_rejection_and_a_retry_later_exit_non_zero() {
    for (mode, outcome) in [
        ("trap", "failed"),
        ("reject-odd", "rejected"),
        ("retry-first", "retry_later"),
    ] {
        let config = format!(r#"{{"key": "tk:list", "mode": "{mode}", "retries": 1}}"#);
        let (code, report) =
            plugin_test("testkit", &["--generate", "10", "--plugin-config", &config]);
        assert_eq!(code, 1, "{mode}: {report:#}");
        assert_eq!(report["ok"], false);
        let first = &batches(&report, false)[0];
        assert_eq!(first["outcome"], outcome, "{mode}: {first:#}");
        if mode == "trap" {
            assert_eq!(first["kind"], "trap");
        }
        if mode == "reject-odd" {
            assert_eq!(first["rejections"].as_array().map(Vec::len), Some(5));
        }
    }
    let (code, report) = plugin_test(
        "testkit",
        &[
            "--generate",
            "10",
            "--plugin-config",
            r#"{"key": "tk:list", "mode": "record"}"#,
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        redis_keys(&report)["tk:list"].0,
        "list",
        "record mode pushes to its list"
    );
}

#[test]
fn grants_are_checked_as_the_host_checks_them() {
    let dir = repo_root().join("target/test-logs");
    std::fs::create_dir_all(&dir).expect("dir");
    let config_path = dir.join(format!("{}.toml", unique("plugin-test-grants")));
    // redis-topn granted only its counters' prefix: its other keys are refused.
    std::fs::write(
        &config_path,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:1"

[batch]
max_events = 50

# Never connected to: plugin test answers from memory.
[services]
redis_url = "redis://127.0.0.1:1/"

[[plugins]]
name = "topn"
path = "{}"
[plugins.grants]
redis = {{ key_prefixes = ["g:content:"], allow_scripts = true }}
[plugins.config]
key_prefix = "g:"
"#,
            plugin_wasm("redis_topn").display()
        ),
    )
    .expect("config");
    let config = config_path.to_str().expect("path");
    let (code, report) = plugin_test(
        "redis_topn",
        &["--generate", "60", "--config", config, "--grants"],
    );
    assert_eq!(code, 1, "{report:#}");
    let denied = effects(&batches(&report, false), "denied");
    assert!(!denied.is_empty(), "{report:#}");
    assert!(
        denied[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("not granted"),
        "{denied:?}"
    );
    assert_eq!(
        batches(&report, false).len(),
        2,
        "batch.max_events of the config"
    );
    assert!(
        report["redis"].as_array().expect("redis").is_empty(),
        "nothing reached Redis"
    );
    // Without --grants the same entry runs: its config, no checks.
    let (code, report) = plugin_test("redis_topn", &["--generate", "60", "--config", config]);
    assert_eq!(code, 0, "{report:#}");
    assert!(redis_keys(&report).contains_key("g:fanout:once:marks"));
    let _ = std::fs::remove_file(&config_path);
}

/// `FANOUT_WORKER_THREADS` sizes the host's async runtime: one worker runs the plugin's calls
/// (capability calls block on that runtime from the plugin's thread); a value that is not a
/// positive integer stops the host at start with a message naming it.
#[test]
fn the_worker_threads_setting_is_honoured_and_checked() {
    let run = |threads: &str| {
        Command::new(host_binary())
            .args(["plugin", "test"])
            .arg(plugin_wasm("clickhouse"))
            .args(["--generate", "50"])
            .env("RUST_LOG", "warn")
            .env("FANOUT_WORKER_THREADS", threads)
            .output()
            .expect("run fanout plugin test")
    };
    let one = run("1");
    assert!(
        one.status.success(),
        "one worker: {}",
        String::from_utf8_lossy(&one.stderr)
    );
    for bad in ["0", "two"] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("FANOUT_WORKER_THREADS must be a positive integer"),
            "{bad}: {stderr}"
        );
    }
}
