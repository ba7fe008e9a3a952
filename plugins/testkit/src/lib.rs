//! testkit: a plugin for the host's own integration tests. It records what it receives in
//! Redis (so a test can read exactly which events reached a plugin), and misbehaves on
//! request: traps, loops forever, allocates without bound, asks for capabilities it was not
//! granted, rejects events, or asks for retries. Not a sink to deploy.
//!
//! Config: { "key": "<redis list receiving one JSON event per delivered event>",
//!           "mode": "record" | "noop" | "read-all" | "cap-redis" | "cap-http" | "cap-clickhouse" | "trap" | "loop" | "oom" | "ungranted" | "reject-odd" | "retry-first"
//!                   | "clickhouse-sql" | "redis-hostile",
//!                   | "wasi-sleep" | "http-loop" | "log-flood" | "init-sleep" (time attacks),
//!           "hold_mb": N (time attacks: MiB the instance holds), "url": "<http-loop target>",
//!           "outside": "<key>" (for redis-hostile: a key outside its prefix it tries to reach),
//!           output attacks (sandbox_outputs.rs): "http-probe" ("requests": [{"url", "method",
//!                   "headers": [[k, v]], "timeout_ms"}], one JSON report each to `key`),
//!                   "huge-reason" (2 MiB reasons with newlines), "foreign-rejection" (an id not in
//!                   the batch), "log-forge", "stderr-flood" (64 MiB), "metric-flood" (20,000 names),
//!           "retries": N (for retry-first: how many calls answer retry-later first),
//!           "statements": ["<sql>", ...], "inserts": [["<db>", "<table>"], ...] (for clickhouse-sql:
//!           each sent through the ClickHouse capability; one JSON report per attempt is pushed
//!           to `key`: {"sql" | "insert": ..., "ok": body | null, "error": "<capability error>" | null}) }

use fanout_sdk::serde_json::{self, Value};
use fanout_sdk::{event_json_string, export_sink, Batch, Host, Rejection, Sink, WriteOutcome};

pub struct Testkit {
    key: String,
    mode: String,
    retries_left: u64,
    statements: Vec<String>,
    inserts: Vec<(String, String)>,
    /// For redis-hostile: a key outside the plugin's prefix that it tries to reach.
    outside: String,
    /// For the time attacks: the URL `http-loop` posts to.
    url: String,
    /// For the time attacks: MiB filled before misbehaving (an instance left alive shows in RSS).
    hold: Vec<u8>,
    /// The whole config, for the output attacks (http-probe's `requests`).
    raw: Value,
}

/// The attempts of the redis-hostile mode: (name, command).
fn redis_hostile_attempts(outside: &str) -> Vec<(&'static str, Vec<&str>)> {
    vec![
        // The host cannot see which keys a script computes: Redis (the ACL user) must refuse.
        (
            "script-set-outside",
            vec![
                "EVAL",
                "return redis.call('SET', ARGV[1], 'hostile')",
                "0",
                outside,
            ],
        ),
        (
            "script-del-outside",
            vec!["EVAL", "return redis.call('DEL', ARGV[1])", "0", outside],
        ),
        (
            "script-flushall",
            vec!["EVAL", "return redis.call('FLUSHALL')", "0"],
        ),
        (
            "script-config-set",
            vec![
                "EVAL",
                "return redis.call('CONFIG', 'SET', 'maxmemory', '1')",
                "0",
            ],
        ),
        (
            "script-keys",
            vec!["EVAL", "return redis.call('KEYS', '*')", "0"],
        ),
        (
            "script-acl",
            vec![
                "EVAL",
                "return redis.call('ACL', 'SETUSER', 'evil', 'on', 'nopass', '+@all', '~*')",
                "0",
            ],
        ),
        // The host's own check refuses these before Redis sees them.
        (
            "declared-key-outside",
            vec!["EVAL", "return 1", "1", outside],
        ),
        ("flushall", vec!["FLUSHALL"]),
        ("config-set", vec!["CONFIG", "SET", "maxmemory", "1"]),
        // A 9 MB reply: past the grant's max_reply_bytes (8 MiB by default).
        (
            "big-reply",
            vec!["EVAL", "return string.rep('x', 9000000)", "0"],
        ),
        // Blocks Redis for everyone until killed.
        ("busy-script", vec!["EVAL", "while true do end", "0"]),
    ]
}

impl Sink for Testkit {
    // Untyped on purpose: every mode reads its own settings, and `raw` keeps them all.
    type Config = Value;

    fn init(config: Value, _host: &impl Host) -> Result<Self, String> {
        let text = |k: &str, default: &str| {
            config
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let mode = text("mode", "record");
        let hold_mb = config.get("hold_mb").and_then(Value::as_u64).unwrap_or(0) as usize;
        let hold = vec![1u8; hold_mb << 20];
        // A plugin whose `init` never returns (sleeping in WASI, so fuel does not stop it).
        if mode == "init-sleep" {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        Ok(Testkit {
            key: text("key", "testkit:received"),
            url: text("url", ""),
            hold,
            mode,
            retries_left: config.get("retries").and_then(Value::as_u64).unwrap_or(0),
            statements: config
                .get("statements")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            inserts: config
                .get("inserts")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|pair| {
                            let db = pair.get(0)?.as_str()?;
                            let table = pair.get(1)?.as_str()?;
                            Some((db.to_string(), table.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            outside: text("outside", "outside:prefix"),
            raw: config.clone(),
        })
    }

    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        match self.mode.as_str() {
            "trap" => panic!("testkit: asked to trap"),
            // Time attacks: each must be stopped at the call's deadline, its instance dropped.
            "wasi-sleep" => {
                std::hint::black_box(&self.hold);
                std::thread::sleep(std::time::Duration::from_secs(3600));
                WriteOutcome::Accepted
            }
            "http-loop" => loop {
                // Keeps calling the capability whatever it answers: after the deadline no
                // request may leave any more.
                std::hint::black_box(&self.hold);
                let _ = fanout_sdk::http::post_json(host, &self.url, "{}", &[], 60_000);
            },
            "log-flood" => {
                let line = "x".repeat(8 << 20);
                loop {
                    host.log(fanout_sdk::Level::Info, &line);
                }
            }
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "ungranted" => {
                // Both must be refused: record the errors for the test to read.
                let http = fanout_sdk::http::post_json(
                    host,
                    "http://127.0.0.1:1/forbidden",
                    "{}",
                    &[],
                    1000,
                );
                let redis = host.redis().cmd("SET").arg("outside:prefix").arg(1).send();
                let report = serde_json::json!({
                    "http": format!("{:?}", http.err()),
                    "redis": format!("{:?}", redis.err()),
                });
                self.push(host, &[report.to_string()])
            }
            "reject-odd" => {
                let (odd, even): (Vec<_>, Vec<_>) =
                    batch.events.iter().partition(|e| e.event_id() % 2 != 0);
                let rows: Vec<String> = even.iter().map(|e| event_json_string(*e)).collect();
                match self.push(host, &rows) {
                    WriteOutcome::Accepted => WriteOutcome::Rejected(
                        odd.iter()
                            .map(|e| Rejection {
                                event_id: e.event_id(),
                                reason: "odd event ids are rejected".into(),
                            })
                            .collect(),
                    ),
                    other => other,
                }
            }
            // A hostile plugin: whatever SQL its config says, through the real capability.
            "clickhouse-sql" => {
                let mut reports = Vec::new();
                for sql in &self.statements {
                    let r = host.clickhouse_execute(sql);
                    reports.push(report("sql", serde_json::json!(sql), r));
                }
                for (db, table) in &self.inserts {
                    let row = serde_json::json!({"event_id": 1}).to_string();
                    let r = host
                        .clickhouse_insert_json_rows(db, table, &[row])
                        .map(|()| String::new());
                    reports.push(report("insert", serde_json::json!([db, table]), r));
                }
                self.push(host, &reports)
            }
            // A hostile plugin granted scripts: every way out of its key prefix it can try, one
            // JSON report per attempt pushed to `key` (sandbox_redis.rs reads them).
            "redis-hostile" => {
                let reports: Vec<String> = redis_hostile_attempts(&self.outside)
                    .into_iter()
                    .map(|(name, cmd)| {
                        let started = host.now_micros();
                        let mut p = host.redis();
                        if let Some((name, args)) = cmd.split_first() {
                            p.cmd(name).args(args.iter().copied());
                        }
                        let r = p.send();
                        let ms = (host.now_micros() - started) / 1000;
                        let (ok, error) = match r {
                            Ok(replies) => (Value::String(format!("{replies:?}")), Value::Null),
                            Err(e) => (Value::Null, Value::String(format!("{e:?}"))),
                        };
                        serde_json::json!({"attempt": name, "ok": ok, "error": error, "ms": ms})
                            .to_string()
                    })
                    .collect();
                self.push(host, &reports)
            }
            // Output attacks (sandbox_outputs.rs): what a plugin hands back to the host.
            "http-probe" => {
                let reports: Vec<String> = self
                    .raw
                    .get("requests")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|r| http_probe(host, r)).collect())
                    .unwrap_or_default();
                self.push(host, &reports)
            }
            "huge-reason" => WriteOutcome::Rejected(
                batch
                    .events
                    .iter()
                    .map(|e| Rejection {
                        event_id: e.event_id(),
                        reason: format!(
                            "huge\n2026-01-01T00:00:00.000000Z  INFO fanout: forged by testkit\u{1b}[31m{}",
                            "r".repeat(2 << 20)
                        ),
                    })
                    .collect(),
            ),
            "foreign-rejection" => {
                let rows: Vec<String> = batch.events.iter().map(event_json_string).collect();
                match self.push(host, &rows) {
                    WriteOutcome::Accepted => WriteOutcome::Rejected(vec![Rejection {
                        event_id: 1_000_000_000_000 + batch.events.len() as i64,
                        reason: "an event this batch never had".into(),
                    }]),
                    other => other,
                }
            }
            "log-forge" => {
                let forged = "2026-01-01T00:00:00.000000Z  INFO fanout: FORGED host line";
                host.log(fanout_sdk::Level::Warn, &format!("plugin line\n{forged}\r\u{1b}[2J"));
                host.log(fanout_sdk::Level::Info, &"L".repeat(1 << 20));
                eprintln!("stderr line\n{forged}");
                println!("stdout line\n{forged}");
                self.record(host, batch)
            }
            "stderr-flood" => {
                use std::io::Write;
                // 64 MiB of 64-byte lines: a million lines against the plugin's log budget.
                let mut chunk = vec![b'e'; 64 << 10];
                for line_end in chunk.iter_mut().skip(63).step_by(64) {
                    *line_end = b'\n';
                }
                let mut err = std::io::stderr();
                for _ in 0..1024 {
                    let _ = err.write_all(&chunk);
                }
                let _ = err.write_all(b"\nend of flood\n");
                let out = vec![b'o'; 1 << 20];
                let _ = std::io::stdout().write_all(&out);
                self.record(host, batch)
            }
            "metric-flood" => {
                for i in 0..20_000 {
                    host.counter_add(&format!("flood_{i}"), 1);
                }
                host.counter_add("Bad-Name\"} 1\nfanout_healthy", 1);
                host.gauge_set(&"g".repeat(10_000), 1.0);
                self.record(host, batch)
            }
            // Takes the batch and does nothing: the cost of the Wasm boundary alone.
            "noop" => WriteOutcome::Accepted,
            // Capability overhead (BENCHMARKS.md): the same work the bench does natively, with
            // nothing computed in the plugin beyond building the call.
            "cap-redis" => {
                let mut redis = host.redis();
                for e in batch.events.iter() {
                    redis
                        .cmd("SET")
                        .arg(format_args!("{}:{}", self.key, e.event_id()))
                        .arg("x");
                }
                match redis.send() {
                    Ok(_) => WriteOutcome::Accepted,
                    Err(e) => WriteOutcome::RetryLater(fanout_sdk::describe(&e)),
                }
            }
            "cap-http" => {
                let request = fanout_sdk::http::Request {
                    method: "POST".into(),
                    url: self.url.clone(),
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: self.raw["body"].as_str().unwrap_or("[]").as_bytes().to_vec(),
                    timeout_ms: 10_000,
                };
                match host.http_send(&request) {
                    Ok(r) if r.status < 300 => WriteOutcome::Accepted,
                    Ok(r) => WriteOutcome::RetryLater(format!("status {}", r.status)),
                    Err(e) => WriteOutcome::RetryLater(fanout_sdk::describe(&e)),
                }
            }
            "cap-clickhouse" => {
                let rows: Vec<String> = self.raw["rows"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                    .unwrap_or_default();
                let Some((db, table)) = self.inserts.first() else {
                    return WriteOutcome::RetryLater("cap-clickhouse needs inserts".into());
                };
                match host.clickhouse_insert_json_rows(db, table, &rows) {
                    Ok(()) => WriteOutcome::Accepted,
                    Err(e) => WriteOutcome::RetryLater(fanout_sdk::describe(&e)),
                }
            }
            // Reads every field of every event once: the boundary plus the cheapest real use.
            "read-all" => {
                let mut sum = 0i64;
                for e in batch.events.iter() {
                    sum = sum
                        .wrapping_add(e.event_id())
                        .wrapping_add(e.content_id().unwrap_or(0))
                        .wrapping_add(e.user_id().unwrap_or(0))
                        .wrapping_add(e.event_ts_micros())
                        .wrapping_add(e.duration_ms().unwrap_or(0).into())
                        .wrapping_add(e.length_seconds().unwrap_or(0).into())
                        .wrapping_add(e.event_type().map_or(0, |s| s.len() as i64))
                        .wrapping_add(e.device().map_or(0, |s| s.len() as i64))
                        .wrapping_add(e.content_type().map_or(0, |s| s.len() as i64))
                        .wrapping_add(e.engagement_seconds().unwrap_or(0.0) as i64)
                        .wrapping_add(e.engagement_pct().unwrap_or(0.0) as i64);
                }
                std::hint::black_box(sum);
                WriteOutcome::Accepted
            }
            "retry-first" if self.retries_left > 0 => {
                self.retries_left -= 1;
                WriteOutcome::RetryLater("testkit: asked to retry".into())
            }
            _ => {
                let rows: Vec<String> = batch.events.iter().map(event_json_string).collect();
                self.push(host, &rows)
            }
        }
    }
}

impl Testkit {
    /// Records every event of the batch (the default mode's work).
    fn record(&self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let rows: Vec<String> = batch.events.iter().map(event_json_string).collect();
        self.push(host, &rows)
    }

    fn push(&self, host: &impl Host, rows: &[String]) -> WriteOutcome {
        if rows.is_empty() {
            return WriteOutcome::Accepted;
        }
        let sent = host
            .redis()
            .cmd("RPUSH")
            .arg(&self.key)
            .args(rows.iter().map(String::as_str))
            .send();
        match sent {
            Ok(_) => WriteOutcome::Accepted,
            Err(e) => WriteOutcome::RetryLater(format!("redis: {e:?}")),
        }
    }
}

/// One request of the http-probe mode ({"url", "method", "headers": [[k, v]], "timeout_ms"}),
/// and its outcome as JSON: status and body length, or the capability error.
fn http_probe(host: &impl Host, r: &Value) -> String {
    let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let headers = r
        .get("headers")
        .and_then(Value::as_array)
        .map(|hs| {
            hs.iter()
                .filter_map(|h| {
                    Some((
                        h.get(0)?.as_str()?.to_string(),
                        h.get(1)?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let method = r.get("method").and_then(Value::as_str).unwrap_or("GET");
    let req = fanout_sdk::http::Request {
        method: method.into(),
        url: text("url"),
        headers,
        body: vec![],
        timeout_ms: r.get("timeout_ms").and_then(Value::as_u64).unwrap_or(5_000) as u32,
    };
    let (status, len, error) = match host.http_send(&req) {
        Ok(resp) => (
            Value::from(resp.status),
            Value::from(resp.body.len()),
            Value::Null,
        ),
        Err(e) => (Value::Null, Value::Null, Value::String(format!("{e:?}"))),
    };
    serde_json::json!({"url": req.url, "status": status, "body_len": len, "error": error})
        .to_string()
}

/// One attempt of the clickhouse-sql mode, as JSON.
fn report(
    what: &str,
    target: Value,
    result: Result<String, fanout_sdk::CapabilityError>,
) -> String {
    let (ok, error) = match result {
        Ok(body) => (Value::String(body), Value::Null),
        Err(e) => (Value::Null, Value::String(format!("{e:?}"))),
    };
    serde_json::json!({ what: target, "ok": ok, "error": error }).to_string()
}

export_sink!(Testkit);
