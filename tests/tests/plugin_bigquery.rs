//! The bigquery plugin (plugins/dist/bigquery.wasm) against the stack's BigQuery emulator
//! (`scripts/stack`, local-bigquery on port 59050), driven in-process through the host's plugin
//! loader or as a real host: values and NULLs as SPEC 4/5A say, one row per event_id under
//! replays (also after the emulator forgot its insertIds), a row BigQuery refuses dead-lettered
//! with BigQuery's reason, and the emulator going down and coming back (an instance of its own).
//! Each test has its own dataset.
//!
//! Throughput: `cargo test -p fanout-tests --test plugin_bigquery -- --ignored --nocapture`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanout::plugin::{WitEvent, WriteOutcome};
use fanout_tests::*;
use serde_json::{json, Map, Value};

/// 2026-01-08 14:21:52 UTC, the SPEC example's event time.
const SPEC_TS: i64 = 1_767_882_112_000_000;
const WAIT: Duration = Duration::from_secs(60);

/// `key` from the environment, else from `.stack/env`.
fn env_var(key: &str) -> Option<String> {
    if let Some(v) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
        return Some(v);
    }
    let dir = std::env::var("STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".stack"));
    let text = std::fs::read_to_string(dir.join("env")).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// The stack and its BigQuery emulator, or None (skip) when the stack is not configured.
fn setup() -> Option<(Stack, Bq)> {
    let stack = Stack::get()?;
    let Some(url) = env_var("BIGQUERY_URL") else {
        if std::env::var("FANOUT_REQUIRE_STACK").as_deref() == Ok("1") {
            panic!(
                "BIGQUERY_URL missing: run `scripts/stack up` (it starts the emulator; it needs \
                 a Python >= 3.13, see its log and docs/stack.md)"
            );
        }
        eprintln!("SKIPPED: no BigQuery emulator (BIGQUERY_URL); run scripts/stack up");
        return None;
    };
    let project = env_var("BIGQUERY_PROJECT").unwrap_or_else(|| "fanout-local".into());
    Some((stack, Bq { url, project }))
}

/// A BigQuery REST endpoint, queried by the test itself.
#[derive(Clone)]
struct Bq {
    url: String,
    project: String,
}

impl Bq {
    fn api(&self, path: &str) -> String {
        format!(
            "{}/bigquery/v2/projects/{}{path}",
            self.url.trim_end_matches('/'),
            self.project
        )
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = reqwest::Client::new()
            .post(self.api(path))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("bigquery {path}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "bigquery {path}: {status} {v}");
        v
    }

    /// Rows of a GoogleSQL query, each as {column: value} (values as BigQuery sends them:
    /// strings, or null).
    async fn rows(&self, sql: &str) -> Vec<Map<String, Value>> {
        let v = self
            .post("/queries", json!({"query": sql, "useLegacySql": false}))
            .await;
        assert_eq!(v["jobComplete"], true, "{v}");
        let names: Vec<String> = v["schema"]["fields"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|c| c["name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        v["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                names
                    .iter()
                    .zip(r["f"].as_array().cloned().unwrap_or_default())
                    .map(|(n, c)| (n.clone(), c["v"].clone()))
                    .collect()
            })
            .collect()
    }

    /// The single value of a one-row, one-column query.
    async fn scalar(&self, sql: &str) -> Value {
        let rows = self.rows(sql).await;
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0].values().next().cloned().unwrap_or(Value::Null)
    }

    async fn create_dataset(&self, dataset: &str) {
        self.post(
            "/datasets",
            json!({"datasetReference": {"projectId": self.project, "datasetId": dataset}}),
        )
        .await;
    }

    async fn drop_dataset(&self, dataset: &str) {
        let _ = reqwest::Client::new()
            .delete(self.api(&format!("/datasets/{dataset}?deleteContents=true")))
            .send()
            .await;
    }
}

/// Drops the test's dataset at the end (also on failure).
struct DropDataset(Bq, String);
impl Drop for DropDataset {
    fn drop(&mut self) {
        let (bq, ds) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(bq.drop_dataset(&ds));
            Some(())
        })
        .join();
    }
}

/// The plugin's `[[plugins]]` entry writing to `dataset` of the emulator at `url`.
fn plugin_toml(name: &str, url: &str, project: &str, dataset: &str, extra: &str) -> String {
    let url = url.trim_end_matches('/');
    format!(
        r#"
[[plugins]]
name = "{name}"
path = "{}"
call_timeout_ms = 60000
[plugins.grants]
http = {{ url_prefixes = ["{url}/"] }}
[plugins.config]
url = "{url}"
project = "{project}"
dataset = "{dataset}"
token = "emulator-accepts-any-token"
{extra}
"#,
        plugin_wasm("bigquery").display()
    )
}

async fn load(stack: &Stack, bq: &Bq, dataset: &str, extra: &str) -> LoadedPlugin {
    LoadedPlugin::load(
        stack,
        &plugin_toml("bq", &bq.url, &bq.project, dataset, extra),
    )
    .await
}

fn ev(
    id: i64,
    content: Option<i64>,
    duration_ms: Option<i32>,
    length: Option<i32>,
    pct: Option<f64>,
) -> WitEvent {
    let mut e = wit_event(id, content, SPEC_TS + id * 1_000_000);
    e.duration_ms = duration_ms;
    e.engagement_seconds = duration_ms.map(|d| f64::from(d) / 1000.0);
    e.length_seconds = length;
    e.engagement_pct = pct;
    e
}

const SELECT_ALL: &str = "SELECT event_id, content_id, user_id, event_type, \
    FORMAT_TIMESTAMP('%Y-%m-%d %H:%M:%S', event_ts) AS event_ts, duration_ms, device, \
    content_type, length_seconds, engagement_seconds, engagement_pct";

#[tokio::test(flavor = "multi_thread")]
async fn rows_hold_spec_values_and_nulls() {
    let Some((stack, bq)) = setup() else { return };
    let ds = unique("bq");
    let _cleanup = DropDataset(bq.clone(), ds.clone());
    let plugin = load(&stack, &bq, &ds, "").await;

    let mut spec = wit_event(16, Some(1), SPEC_TS);
    spec.event_ts_micros += 250_000; // a fraction of a second is dropped, not rounded up
    let mut unknown = ev(17, Some(424_242), Some(5000), None, None);
    unknown.content_type = None;
    let no_duration = ev(18, Some(1), None, Some(300), None);
    let zero_length = ev(19, Some(5), Some(5000), Some(0), None);
    let mut no_content = ev(20, None, Some(1000), None, None);
    no_content.content_type = None;
    no_content.device = None;
    no_content.user_id = None;
    no_content.event_type = None;
    let batch = vec![spec, unknown, no_duration, zero_length, no_content];
    let out = plugin.write("t/0:0-4", &batch).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    assert_eq!(plugin.counter("rows_inserted"), 5.0);

    let rows = bq
        .rows(&format!(
            "{SELECT_ALL} FROM {ds}.events_enriched ORDER BY event_id"
        ))
        .await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    // The SPEC example row (BigQuery's REST API sends every value as a string).
    assert_eq!(
        Value::Object(rows[0].clone()),
        json!({"event_id": "16", "content_id": "1", "user_id": "999", "event_type": "play",
               "event_ts": "2026-01-08 14:21:52", "duration_ms": "7000", "device": "web",
               "content_type": "video", "length_seconds": "300", "engagement_seconds": "7.0",
               "engagement_pct": "0.02"}),
        "the SPEC example row"
    );
    // Unknown content: content fields and pct are NULL, the event is still stored.
    assert_eq!(rows[1]["content_id"], "424242");
    assert!(rows[1]["content_type"].is_null() && rows[1]["length_seconds"].is_null());
    assert!(rows[1]["engagement_pct"].is_null());
    assert_eq!(rows[1]["engagement_seconds"], "5.0");
    // NULL duration: seconds and pct NULL.
    assert!(
        rows[2]["duration_ms"].is_null()
            && rows[2]["engagement_seconds"].is_null()
            && rows[2]["engagement_pct"].is_null(),
        "{:?}",
        rows[2]
    );
    // length 0: pct NULL, not inf.
    assert_eq!(rows[3]["length_seconds"], "0");
    assert!(rows[3]["engagement_pct"].is_null(), "{:?}", rows[3]);
    // Every nullable column really holds NULL (not '' or 0).
    for c in [
        "content_id",
        "user_id",
        "event_type",
        "device",
        "content_type",
        "length_seconds",
        "engagement_pct",
    ] {
        assert!(rows[4][c].is_null(), "{c}: {:?}", rows[4]);
    }
    let nulls = bq
        .rows(&format!(
            "SELECT COUNTIF(engagement_pct IS NULL) AS a, COUNTIF(content_id IS NULL) AS b, \
             COUNTIF(content_type IS NULL) AS c FROM {ds}.events_enriched"
        ))
        .await;
    assert_eq!(
        Value::Object(nulls[0].clone()),
        json!({"a": "4", "b": "1", "c": "2"})
    );
    // The table the plugin created: 11 columns, TIMESTAMP event time.
    let table: Value = reqwest::get(bq.api(&format!("/datasets/{ds}/tables/events_enriched")))
        .await
        .expect("tables.get")
        .json()
        .await
        .expect("table json");
    let fields = table["schema"]["fields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(fields.len(), 11, "{table}");
    assert_eq!(fields[4]["name"], "event_ts");
    assert_eq!(fields[4]["type"], "TIMESTAMP");
    assert_eq!(fields[10]["mode"], "NULLABLE");
}

#[tokio::test(flavor = "multi_thread")]
async fn replays_leave_one_row_per_event_and_spec_query_averages() {
    let Some((stack, bq)) = setup() else { return };
    let ds = unique("bq");
    let _cleanup = DropDataset(bq.clone(), ds.clone());
    let plugin = load(&stack, &bq, &ds, "").await;

    // content 1: 0.02, 0.5, NULL -> avg 0.26; content 3: 0.13, 0.25 -> 0.19; content 9: NULL only.
    let first = vec![
        ev(1, Some(1), Some(6000), Some(300), Some(0.02)),
        ev(2, Some(1), Some(150_000), Some(300), Some(0.5)),
        ev(3, Some(1), None, Some(300), None),
        ev(4, Some(3), Some(15_600), Some(120), Some(0.13)),
    ];
    for _ in 0..2 {
        // The batch, then its replay after a crash.
        let out = plugin.write("t/0:0-3", &first).await;
        assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    }
    let second = vec![
        ev(3, Some(1), None, Some(300), None),
        ev(4, Some(3), Some(15_600), Some(120), Some(0.13)),
        ev(5, Some(3), Some(30_000), Some(120), Some(0.25)),
        ev(5, Some(3), Some(30_000), Some(120), Some(0.25)),
        ev(6, Some(9), None, None, None),
    ];
    let out = plugin.write("t/0:2-6", &second).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    assert_eq!(plugin.counter("rows_inserted"), 6.0);
    assert_eq!(plugin.counter("rows_skipped_duplicate"), 6.0);

    let counts = bq
        .rows(&format!(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS ids FROM {ds}.events_enriched"
        ))
        .await;
    assert_eq!(
        Value::Object(counts[0].clone()),
        json!({"n": "6", "ids": "6"})
    );

    // The SPEC's query, in its documented form.
    let rows = bq
        .rows(&format!(
            "SELECT content_id, avg(engagement_pct) AS avg FROM {ds}.events_enriched GROUP BY content_id"
        ))
        .await;
    let avg: BTreeMap<String, Value> = rows
        .iter()
        .map(|r| {
            (
                r["content_id"].as_str().unwrap_or("?").to_string(),
                r["avg"].clone(),
            )
        })
        .collect();
    assert_eq!(avg.len(), 3, "{rows:?}");
    let close = |v: &Value, want: f64| {
        v.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|x| (x - want).abs() < 1e-9)
    };
    assert!(close(&avg["1"], 0.26), "content 1: {}", avg["1"]);
    assert!(close(&avg["3"], 0.19), "content 3: {}", avg["3"]);
    assert!(avg["9"].is_null(), "all-NULL content: {}", avg["9"]);

    // A fresh instance (the host restarted) replays the first batch: still nothing new.
    let again = load(&stack, &bq, &ds, "").await;
    let out = again.write("t/0:0-3", &first).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    assert_eq!(again.counter("rows_inserted"), 0.0);
    assert_eq!(again.counter("rows_skipped_duplicate"), 4.0);
    let n = bq
        .scalar(&format!("SELECT COUNT(*) FROM {ds}.events_enriched"))
        .await;
    assert_eq!(n, "6");
}

/// A Debezium insert envelope with `content_id` as given (null allowed).
fn envelope(id: i64, content_id: Option<i64>) -> Vec<u8> {
    let content = content_id.map_or("null".to_string(), |c| c.to_string());
    format!(
        r#"{{"before":null,"after":{{"id":{id},"content_id":{content},"user_id":7,"event_type":"play","event_ts":"2026-01-08T14:21:52Z","duration_ms":7000,"device":"web"}},"source":{{}},"op":"c","ts_ms":1}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_bigquery_refuses_is_dead_lettered_with_its_reason() {
    let Some((stack, bq)) = setup() else { return };
    let ds = unique("bq");
    let _cleanup = DropDataset(bq.clone(), ds.clone());
    // The schema is managed elsewhere (create_table = false) and says content_id is REQUIRED:
    // BigQuery refuses the rows of events without content, and stores the others.
    bq.create_dataset(&ds).await;
    let mut fields: Vec<Value> = [
        ("event_id", "INT64", "REQUIRED"),
        ("content_id", "INT64", "REQUIRED"),
        ("user_id", "INT64", "NULLABLE"),
        ("event_type", "STRING", "NULLABLE"),
        ("event_ts", "TIMESTAMP", "REQUIRED"),
    ]
    .iter()
    .map(|(n, t, m)| json!({"name": n, "type": t, "mode": m}))
    .collect();
    for (n, t) in [
        ("duration_ms", "INT64"),
        ("device", "STRING"),
        ("content_type", "STRING"),
        ("length_seconds", "INT64"),
        ("engagement_seconds", "FLOAT64"),
        ("engagement_pct", "FLOAT64"),
    ] {
        fields.push(json!({"name": n, "type": t, "mode": "NULLABLE"}));
    }
    bq.post(
        &format!("/datasets/{ds}/tables"),
        json!({"tableReference": {"projectId": bq.project, "datasetId": ds,
                                  "tableId": "events_enriched"},
               "schema": {"fields": fields}}),
    )
    .await;

    let events_topic = unique("events");
    let content_topic = unique("content");
    create_topic(&stack, &events_topic, 1).await;
    create_topic(&stack, &content_topic, 1).await;
    let cfg =
        ConfigBuilder::new(&stack, &events_topic, &content_topic, "").plugin_raw(&plugin_toml(
            "bq",
            &bq.url,
            &bq.project,
            &ds,
            "create_table = false\npolicy = \"fail-fast\"",
        ));
    let host = HostProc::start("bq-deadletter", &cfg.render(), &cfg.metrics_addr);
    for (id, content) in [(1, Some(1)), (2, None), (3, Some(2))] {
        produce(&stack, &events_topic, None, Some(&envelope(id, content))).await;
    }
    let letters = read_topic(&stack, &cfg.dead_letter_topic, 1, WAIT);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0].header("fanout.reason").unwrap_or("");
    assert!(
        reason.contains("insertAll refused the row")
            && reason.contains("Missing required field: content_id"),
        "{reason}"
    );
    assert_eq!(letters[0].header("fanout.plugin"), Some("bq"));
    assert!(
        letters[0].payload.as_deref().is_some_and(
            |p| p.starts_with(b"{\"before\"") && p.windows(7).any(|w| w == b"\"id\":2,")
        ),
        "the original message of event 2 is kept"
    );
    eventually(WAIT, "committed past the refused row", || async {
        (host.metric("fanout_commits_total{plugin=\"bq\"}").await >= 1.0).then_some(())
    })
    .await;
    let ids = bq
        .rows(&format!(
            "SELECT event_id FROM {ds}.events_enriched ORDER BY event_id"
        ))
        .await;
    let ids: Vec<&str> = ids.iter().filter_map(|r| r["event_id"].as_str()).collect();
    assert_eq!(ids, ["1", "3"]);
    assert_eq!(
        host.metric("fanout_plugin_counter_total{plugin=\"bq\",name=\"rows_dead_lettered\"}")
            .await,
        1.0
    );
}

/// An emulator of the test's own (scripts/bigquery_emulator.py), on its own port and data dir,
/// so the test can stop it and start it again without touching the stack's.
struct OwnEmulator {
    child: Option<std::process::Child>,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
}

impl OwnEmulator {
    fn new() -> OwnEmulator {
        let addr = free_addr();
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port");
        let dir = std::env::temp_dir().join(unique("bq-emulator"));
        std::fs::create_dir_all(&dir).expect("emulator dir");
        let log = dir.join("emulator.log");
        OwnEmulator {
            child: None,
            port,
            dir,
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) {
        let python = env_var("BIGQUERY_PYTHON").unwrap_or_else(|| {
            repo_root()
                .join(".stack/venv-bq/bin/python")
                .display()
                .to_string()
        });
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("emulator log");
        let child = Command::new(python)
            .arg(repo_root().join("scripts/bigquery_emulator.py"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--extension-dir")
            .arg(self.dir.join("extensions"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start scripts/bigquery_emulator.py");
        self.child = Some(child);
        let probe = format!("{}/bigquery/v2/projects/fanout-local/datasets", self.url());
        let started = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(&probe).await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "emulator exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "emulator did not answer in 120 s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL: a crash, and BigQuery's insertId memory goes with it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnEmulator {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn emulator_down_then_back_fail_fast_waits_best_effort_dead_letters() {
    let Some((stack, bq)) = setup() else { return };
    let mut emu = OwnEmulator::new();
    emu.start().await;
    let own = Bq {
        url: emu.url(),
        project: bq.project.clone(),
    };
    let ds = unique("bq");
    let retry = "max_retries = 1\nbase_backoff_ms = 50\nmax_backoff_ms = 100\ntimeout_ms = 15000\nbatch_budget_ms = 30000";
    let fail_fast = LoadedPlugin::load(
        &stack,
        &plugin_toml("bqff", &own.url, &own.project, &ds, retry),
    )
    .await;
    let best_effort = LoadedPlugin::load(
        &stack,
        &plugin_toml(
            "bqbe",
            &own.url,
            &own.project,
            &ds,
            &format!("{retry}\npolicy = \"best-effort\""),
        ),
    )
    .await;
    let first: Vec<WitEvent> = (1..=3)
        .map(|i| ev(i, Some(1), Some(6000), Some(300), Some(0.02)))
        .collect();
    let out = fail_fast.write("t/0:0-2", &first).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");

    emu.kill();
    let second: Vec<WitEvent> = (4..=5)
        .map(|i| ev(i, Some(1), Some(6000), Some(300), Some(0.02)))
        .collect();
    let out = fail_fast.write("t/0:3-4", &second).await;
    assert!(
        matches!(&out, WriteOutcome::RetryLater(m) if m.contains("no response")),
        "fail-fast waits: {out:?}"
    );
    let out = best_effort
        .write("t/0:5-5", &[ev(6, Some(1), None, None, None)])
        .await;
    match &out {
        WriteOutcome::Rejected(r) => {
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].event_id, 6);
            assert!(r[0].reason.contains("no response"), "{}", r[0].reason);
        }
        other => panic!("best-effort dead-letters: {other:?}"),
    }
    assert!(best_effort.counter("rows_dead_lettered") >= 1.0);

    // Back, on the same data, with its insertId memory gone: the host's retry of the waiting
    // batch goes through, and a replay of the first batch inserts nothing (the lookup).
    emu.start().await;
    let out = fail_fast.write("t/0:3-4", &second).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    let out = fail_fast.write("t/0:0-2", &first).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    assert_eq!(fail_fast.counter("rows_inserted"), 5.0);
    assert!(fail_fast.counter("rows_skipped_duplicate") >= 3.0);
    let counts = own
        .rows(&format!(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS ids FROM {ds}.events_enriched"
        ))
        .await;
    assert_eq!(
        Value::Object(counts[0].clone()),
        json!({"n": "5", "ids": "5"})
    );
}

/// The plugin's events/s into the stack's emulator: 20,000 events in batches of 500 through
/// the host's loader (lookup + insertAll per batch). Prints the figure; asserts only that every
/// row arrived once.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: cargo test -p fanout-tests --test plugin_bigquery -- --ignored --nocapture"]
async fn bigquery_events_per_second() {
    let Some((stack, bq)) = setup() else { return };
    let ds = unique("bqbench");
    let _cleanup = DropDataset(bq.clone(), ds.clone());
    let plugin = load(&stack, &bq, &ds, "").await;
    let (total, per_batch) = (20_000i64, 500i64);
    // Warm-up: creates the table.
    let out = plugin
        .write("warm", &[ev(0, Some(1), None, None, None)])
        .await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    let started = Instant::now();
    for b in 0..total / per_batch {
        let events: Vec<WitEvent> = (1..=per_batch)
            .map(|i| {
                let id = b * per_batch + i;
                ev(id, Some(id % 24), Some(6000), Some(300), Some(0.02))
            })
            .collect();
        let out = plugin.write(&format!("bench/{b}"), &events).await;
        assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "bigquery plugin -> emulator: {total} events in {secs:.1} s = {:.0} events/s \
         (batches of {per_batch}: one lookup query + one insertAll each)",
        total as f64 / secs
    );
    let n = bq
        .scalar(&format!(
            "SELECT COUNT(DISTINCT event_id) FROM {ds}.events_enriched"
        ))
        .await;
    assert_eq!(n, (total + 1).to_string());
}
