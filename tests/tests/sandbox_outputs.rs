//! Hostile plugins against the real host and stack (issue 9, "HTTP" and "what plugins hand
//! back"): one plugin per attack class beside a good plugin. Each test asserts that the
//! outcome is classified, that nothing outside the grant is reached (an "outside" HTTP server
//! receives nothing), that the host's memory stays near its baseline, and that the good
//! plugin keeps delivering with its commits moving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fanout_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(90);

fn envelope(id: i64) -> Vec<u8> {
    event_envelope(id, 1, "2026-01-08T14:21:52Z")
}

/// Resident memory of a process, in MiB (/proc/<pid>/status VmRSS).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Samples a process's RSS every 10 ms until dropped: the peak of a window (VmHWM would
/// include start-up, when plugins are compiled).
struct RssPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    peak: Arc<std::sync::Mutex<f64>>,
}

impl RssPeak {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = Arc::new(std::sync::Mutex::new(rss_mib(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let now = rss_mib(pid);
                if let Ok(mut max) = p.lock() {
                    *max = max.max(now);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssPeak { stop, peak }
    }

    fn peak(&self) -> f64 {
        self.peak.lock().map(|p| *p).unwrap_or(0.0)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A minimal HTTP/1.1 server on loopback: `answer(path)` gives the response head and how many
/// body bytes to stream after it (the connection is closed after each response). Counts
/// the requests it received.
struct RawServer {
    base: String,
    requests: Arc<AtomicUsize>,
}

impl RawServer {
    async fn start(answer: impl Fn(&str) -> (String, usize) + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (resp_head, body_len) = answer(&path);
                    if sock.write_all(resp_head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 << 10];
                    let mut left = body_len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if sock.write_all(&chunk[..n]).await.is_err() {
                            return; // the client stopped reading: what a cap looks like
                        }
                        left -= n;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        RawServer { base, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The JSON reports a testkit plugin pushed to `key`.
async fn reports(r: &redis::aio::MultiplexedConnection, key: &str) -> Vec<serde_json::Value> {
    recorded(r, key)
        .await
        .into_iter()
        .filter(|v| v.get("url").is_some())
        .collect()
}

/// Waits until lane `plugin` commits again after `before` commits.
async fn commits_move(host: &HostProc, plugin: &str, before: f64) -> f64 {
    let series = format!("fanout_commits_total{{plugin=\"{plugin}\"}}");
    eventually(WAIT, &format!("{plugin} commits again"), || async {
        let now = host.metric(&series).await;
        (now > before).then_some(now)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn http_redirects_headers_paths_and_huge_bodies_are_contained() {
    let Some(stack) = Stack::get() else { return };
    // Anything reaching this server escaped the grant.
    let outside = RawServer::start(|_| {
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno".into(),
            0,
        )
    })
    .await;
    let outside_base = outside.base.clone();
    const HUGE: usize = 400 << 20;
    let granted = RawServer::start(move |path| match path {
        "/api/out" => (
            format!(
                "HTTP/1.1 302 Found\r\nLocation: {outside_base}/secret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            0,
        ),
        "/api/up" => (
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: /api/../secret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            0,
        ),
        // 400 MiB without a Content-Length: only reading it tells the size.
        "/api/huge" => ("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(), HUGE),
        _ => (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".into(),
            0,
        ),
    })
    .await;
    let events = unique("events");
    create_topic(&stack, &events, 1).await;
    let key = unique("probe");
    let good = unique("good");
    let g = &granted.base;
    let o = &outside.base;
    let requests = serde_json::json!([
        {"url": format!("{g}/api/out")},
        {"url": format!("{g}/api/up")},
        {"url": format!("{g}/api/huge"), "timeout_ms": 300_000},
        {"url": format!("{g}/api/../secret")},
        {"url": format!("{g}/api/%2e%2e/secret")},
        {"url": format!("{g}/api/..%2fsecret")},
        {"url": format!("{g}/apix")},
        {"url": format!("{o}/api/x")},
        {"url": format!("{g}/api/ok"), "headers": [["Host", "outside.example"]]},
        {"url": format!("{g}/api/ok"), "headers": [["Transfer-Encoding", "chunked"]]},
        {"url": format!("{g}/api/ok"), "timeout_ms": 300_000},
    ]);
    let cfg = ConfigBuilder::new(&stack, &events, "", "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .plugin_raw(&format!(
            r#"
[[plugins]]
name = "prober"
path = "{path}"
failure_policy = "fail-fast"
call_timeout_ms = 20000
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
http = {{ url_prefixes = ["{g}/api/"] }}
[plugins.config]
key = "{key}"
mode = "http-probe"
requests = {requests}
"#,
            path = plugin_wasm("testkit").display(),
            requests = toml_json(&requests),
        ));
    let mut host = HostProc::start("sandbox-http", &cfg.render(), &cfg.metrics_addr);
    eventually(WAIT, "the host serves /metrics", || async {
        (!host.metrics().await.is_empty()).then_some(())
    })
    .await;
    let pid = host.proc.child.id();
    let baseline = rss_mib(pid);
    let sampler = RssPeak::start(pid);
    produce(&stack, &events, None, Some(&envelope(1))).await;
    let r = redis(&stack).await;
    let got = eventually(WAIT, "the prober's reports", || async {
        let v = reports(&r, &key).await;
        (v.len() >= 11).then_some(v)
    })
    .await;
    let outcome = |i: usize| got[i]["error"].as_str().unwrap_or("").to_string();
    // The redirects out of the grant (elsewhere, and up out of /api/) are refused.
    assert!(
        outcome(0).contains("NotGranted") && outcome(0).contains("redirect"),
        "{}",
        got[0]
    );
    assert!(outcome(1).contains("NotGranted"), "{}", got[1]);
    // 400 MiB against the default max_response_bytes (8 MiB): refused while reading.
    assert!(outcome(2).contains("max_response_bytes"), "{}", got[2]);
    // Paths leaving the prefix, a prefix that is not a segment, another origin.
    for (i, report) in got.iter().enumerate().take(8).skip(3) {
        assert!(outcome(i).contains("NotGranted"), "{report}");
    }
    // Framing and routing headers are the host's.
    assert!(
        outcome(8).contains("NotGranted") && outcome(8).contains("host"),
        "{}",
        got[8]
    );
    assert!(outcome(9).contains("NotGranted"), "{}", got[9]);
    assert_eq!(
        got[10]["status"], 200,
        "the granted request itself works: {}",
        got[10]
    );
    assert_eq!(outside.requests(), 0, "nothing reached the outside server");
    let (after, peak) = (rss_mib(pid), sampler.peak());
    eprintln!("host RSS: baseline {baseline:.0} MiB, peak {peak:.0} MiB, after {after:.0} MiB");
    assert!(
        peak < baseline + 120.0,
        "a 400 MiB body must not be buffered: baseline {baseline:.0} MiB, peak {peak:.0} MiB"
    );
    assert!(
        after < baseline + 100.0,
        "RSS back near the baseline: {after:.0} MiB"
    );
    // The good plugin keeps delivering beside it, commits moving.
    let before = host.metric("fanout_commits_total{plugin=\"good\"}").await;
    produce(&stack, &events, None, Some(&envelope(2))).await;
    commits_move(&host, "good", before).await;
    eventually(WAIT, "the good plugin got both events", || async {
        (recorded(&r, &good).await.len() >= 2).then_some(())
    })
    .await;
    assert_eq!(outside.requests(), 0, "nothing reached the outside server");
    assert!(host.proc.is_running());
}

/// `value` as a TOML inline value (JSON arrays/objects of strings and numbers map directly,
/// except that TOML inline tables use `=`).
fn toml_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_json).collect::<Vec<_>>().join(", ")
        ),
        serde_json::Value::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(k, v)| format!("{k} = {}", toml_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_and_foreign_rejections_cannot_stop_commits() {
    let Some(stack) = Stack::get() else { return };
    let events = unique("events");
    create_topic(&stack, &events, 1).await;
    let good = unique("good");
    let cfg = ConfigBuilder::new(&stack, &events, "", "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .testkit("huger", "huge-reason", &unique("huge"), "fail-fast", 1)
        .testkit(
            "foreign",
            "foreign-rejection",
            &unique("foreign"),
            "best-effort",
            1,
        );
    // A small message.max.bytes: the letter of a big event cannot carry its bytes.
    let toml = cfg.render().replace(
        "properties = {",
        "properties = { \"message.max.bytes\" = \"16384\",",
    );
    let host = HostProc::start("sandbox-reject", &toml, &cfg.metrics_addr);
    produce(&stack, &events, None, Some(&envelope(1))).await;
    // 30 KB of a column the decoder ignores: a dead letter with it would exceed 16 KiB.
    let mut big: serde_json::Value =
        serde_json::from_slice(&envelope(2)).expect("envelope is JSON");
    big["after"]["padding"] = serde_json::Value::String("p".repeat(30_000));
    produce(&stack, &events, None, Some(big.to_string().as_bytes())).await;
    // huge-reason rejects both events with 2 MiB reasons: dead-lettered, then committed.
    for lane in ["huger", "good", "foreign"] {
        commits_move(&host, lane, 0.0).await;
    }
    let letters = read_topic(&stack, &cfg.dead_letter_topic, 4, WAIT);
    let mine = |p: &str| -> Vec<&Record> {
        letters
            .iter()
            .filter(|l| l.header("fanout.plugin") == Some(p))
            .collect()
    };
    let huge = mine("huger");
    assert_eq!(huge.len(), 2, "{letters:?}");
    for l in &huge {
        let reason = l.header("fanout.reason").unwrap_or("");
        assert!(reason.len() < 1200, "reason cut: {} bytes", reason.len());
        assert!(
            !reason.contains('\n') && reason.contains("\\n2026"),
            "escaped: {reason:.200}"
        );
    }
    assert!(
        huge.iter().any(|l| l.payload.is_none()
            && l.header("fanout.payload.omitted")
                .is_some_and(|h| h.contains("message.max.bytes"))),
        "the big event's letter leaves its payload out: {huge:?}"
    );
    assert!(
        huge.iter()
            .any(|l| l.payload.is_some() && l.header("fanout.payload.omitted").is_none()),
        "the small event's letter keeps its bytes"
    );
    // foreign names an id the batch never had: a failed write, then best-effort gives up
    // and dead-letters the batch's real events (never a letter for the made-up id).
    let foreign = mine("foreign");
    assert!(!foreign.is_empty(), "{letters:?}");
    assert!(foreign
        .iter()
        .all(|l| l.header("fanout.source.offset") != Some("-1")));
    assert!(foreign.iter().all(|l| l
        .header("fanout.reason")
        .is_some_and(|r| r.contains("not in batch"))));
    let m = host.metrics().await;
    assert!(
        metric_value(
            &m,
            "fanout_plugin_failures_total{plugin=\"foreign\",kind=\"invalid_outcome\"}"
        ) >= 1.0,
        "{m}"
    );
    // Every lane keeps moving after.
    let before = host.metric("fanout_commits_total{plugin=\"good\"}").await;
    let huger_before = host.metric("fanout_commits_total{plugin=\"huger\"}").await;
    produce(&stack, &events, None, Some(&envelope(3))).await;
    commits_move(&host, "good", before).await;
    commits_move(&host, "huger", huger_before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_logs_stdio_floods_and_metric_floods_are_contained() {
    let Some(stack) = Stack::get() else { return };
    let events = unique("events");
    create_topic(&stack, &events, 1).await;
    let good = unique("good");
    let forger = unique("forger");
    let flooder = unique("flooder");
    let counter = unique("counter");
    let cfg = ConfigBuilder::new(&stack, &events, "", "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .testkit("forger", "log-forge", &forger, "fail-fast", 3)
        .testkit("flooder", "stderr-flood", &flooder, "fail-fast", 3)
        .testkit("counter", "metric-flood", &counter, "fail-fast", 3);
    let mut host = HostProc::start("sandbox-logs", &cfg.render(), &cfg.metrics_addr);
    eventually(WAIT, "the host serves /metrics", || async {
        (!host.metrics().await.is_empty()).then_some(())
    })
    .await;
    let pid = host.proc.child.id();
    let baseline = rss_mib(pid);
    let sampler = RssPeak::start(pid);
    produce(&stack, &events, None, Some(&envelope(1))).await;
    let r = redis(&stack).await;
    // Each misbehaves and then records the event: all four deliver and commit.
    for (lane, key) in [
        ("good", &good),
        ("forger", &forger),
        ("flooder", &flooder),
        ("counter", &counter),
    ] {
        eventually(WAIT, &format!("{lane} delivered"), || async {
            (!recorded(&r, key).await.is_empty()).then_some(())
        })
        .await;
        commits_move(&host, lane, 0.0).await;
    }
    let log = host.proc.log_text();
    // No forged line: the plugin's newlines are escaped inside its own line.
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line reached the host log"
    );
    assert!(
        log.contains("FORGED"),
        "the plugin's line is logged, escaped"
    );
    // Every line carrying it is the host's, naming the plugin: a log call keeps its text on
    // one line (newline escaped), stdout/stderr become one attributed host line per line.
    for line in log.lines().filter(|l| l.contains("FORGED")) {
        assert!(line.contains("plugin=\"forger\""), "{line}");
        assert!(
            line.contains("\\n2026") || line.contains("stream=\"std"),
            "{line}"
        );
    }
    // The 1 MiB log line and the 64 MiB stderr flood cost the log a bounded amount.
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 6 * 1024, "longest host log line: {longest} bytes");
    assert!(
        log.len() < 8 << 20,
        "host log: {} bytes after a 64 MiB flood",
        log.len()
    );
    assert!(
        log.contains("end of flood") || log.contains("log budget"),
        "stderr is captured into the log"
    );
    let m = host.metrics().await;
    let dropped = metric_value(
        &m,
        "fanout_plugin_log_dropped_bytes_total{plugin=\"flooder\"}",
    );
    eprintln!(
        "stderr flood: host log {} bytes, {dropped} plugin bytes dropped",
        log.len()
    );
    assert!(
        dropped > 32.0 * 1024.0 * 1024.0,
        "the budget dropped the flood: {dropped}"
    );
    let series = m
        .lines()
        .filter(|l| {
            l.starts_with("fanout_plugin_counter_total{") && l.contains("plugin=\"counter\"")
        })
        .count();
    assert!(series <= 100, "{series} series of one plugin");
    assert!(m.len() < 256 << 10, "/metrics is {} bytes", m.len());
    assert!(
        metric_value(
            &m,
            "fanout_plugin_metrics_refused_total{plugin=\"counter\",reason=\"too_many_names\"}"
        ) >= 19_900.0,
        "refusals are counted"
    );
    assert!(
        metric_value(
            &m,
            "fanout_plugin_metrics_refused_total{plugin=\"counter\",reason=\"invalid_name\"}"
        ) >= 2.0
    );
    let (after, peak) = (rss_mib(pid), sampler.peak());
    eprintln!("host RSS: baseline {baseline:.0} MiB, peak {peak:.0} MiB, after {after:.0} MiB");
    assert!(
        peak < baseline + 150.0,
        "baseline {baseline:.0} MiB, peak {peak:.0} MiB"
    );
    // The good lane keeps moving.
    let before = host.metric("fanout_commits_total{plugin=\"good\"}").await;
    produce(&stack, &events, None, Some(&envelope(2))).await;
    commits_move(&host, "good", before).await;
    assert!(host.proc.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_results_are_capped_per_grant() {
    let Some(stack) = Stack::get() else { return };
    const DB: &str = "fanout_sandbox";
    clickhouse_query(&stack, &format!("CREATE DATABASE IF NOT EXISTS {DB}")).await;
    let table = format!("{DB}.{}", unique("big"));
    clickhouse_query(
        &stack,
        &format!("CREATE TABLE {table} (event_id Int64) ENGINE = Memory"),
    )
    .await;
    // 100,000 rows: about 590 KB of TabSeparated, against a 4 KiB cap.
    clickhouse_query(
        &stack,
        &format!("INSERT INTO {table} SELECT number FROM system.numbers LIMIT 100000"),
    )
    .await;
    let key = unique("chcap");
    let toml = format!(
        r#"
[[plugins]]
name = "reader"
path = "{path}"
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
clickhouse = {{ databases = ["{DB}"], max_result_bytes = 4096 }}
[plugins.config]
key = "{key}"
mode = "clickhouse-sql"
statements = ["SELECT event_id FROM {table}", "SELECT count() FROM {table}"]
"#,
        path = plugin_wasm("testkit").display(),
    );
    let plugin = LoadedPlugin::load_as(&stack, &toml, &stack.clickhouse_host).await;
    let out = plugin
        .write("t/0:0-0", &[wit_event(1, Some(1), now_micros())])
        .await;
    assert!(
        matches!(out, fanout::plugin::WriteOutcome::Accepted),
        "{out:?}"
    );
    let r = redis(&stack).await;
    let reports = recorded(&r, &key).await;
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_result_bytes")),
        "{}",
        reports[0]
    );
    assert_eq!(reports[1]["ok"], "100000\n", "a small result passes");
    clickhouse_query(&stack, &format!("DROP TABLE {table}")).await;
}
