//! testkit: a plugin for the host's own integration tests. It records what it receives in
//! Redis (so a test can read exactly which events reached a plugin), and misbehaves on
//! request: traps, loops forever, allocates without bound, asks for capabilities it was not
//! granted, rejects events, or asks for retries. Not a sink to deploy.
//!
//! Config: { "key": "<redis list receiving one JSON event per delivered event>",
//!           "mode": "record" | "noop" | "trap" | "loop" | "oom" | "ungranted" | "reject-odd" | "retry-first"
//!                   | "clickhouse-sql" | "redis-hostile",
//!           "outside": "<key>" (for redis-hostile: a key outside its prefix it tries to reach),
//!           "retries": N (for retry-first: how many calls answer retry-later first),
//!           "statements": ["<sql>", ...], "inserts": [["<db>", "<table>"], ...] (for clickhouse-sql:
//!           each sent through the ClickHouse capability; one JSON report per attempt is pushed
//!           to `key`: {"sql" | "insert": ..., "ok": body | null, "error": "<capability error>" | null}) }

use fanout_sdk::redis::command;
use fanout_sdk::serde_json::{self, Value};
use fanout_sdk::{
    event_json_string, export_sink, Batch, Host, Rejection, Sink, WasmHost, WriteOutcome,
};

pub struct Testkit {
    key: String,
    mode: String,
    retries_left: u64,
    statements: Vec<String>,
    inserts: Vec<(String, String)>,
    /// For redis-hostile: a key outside the plugin's prefix that it tries to reach.
    outside: String,
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
        // Blocks Redis for everyone until killed.
        ("busy-script", vec!["EVAL", "while true do end", "0"]),
    ]
}

impl Sink for Testkit {
    fn init(config: Value) -> Result<Self, String> {
        let text = |k: &str, default: &str| {
            config
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        Ok(Testkit {
            key: text("key", "testkit:received"),
            mode: text("mode", "record"),
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
        })
    }

    fn write(&mut self, batch: &Batch) -> WriteOutcome {
        let host = WasmHost;
        match self.mode.as_str() {
            "trap" => panic!("testkit: asked to trap"),
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
                let http = fanout_sdk::http::post_json_on(
                    &host,
                    "http://127.0.0.1:1/forbidden",
                    "{}",
                    &[],
                    1000,
                );
                let redis = host.redis_pipeline(&[command(&["SET", "outside:prefix", "1"])], false);
                let report = serde_json::json!({
                    "http": format!("{:?}", http.err()),
                    "redis": format!("{:?}", redis.err()),
                });
                self.push(&host, &[report.to_string()])
            }
            "reject-odd" => {
                let (odd, even): (Vec<_>, Vec<_>) =
                    batch.events.iter().partition(|e| e.event_id % 2 != 0);
                let rows: Vec<String> = even.iter().map(|e| event_json_string(e)).collect();
                match self.push(&host, &rows) {
                    WriteOutcome::Accepted => WriteOutcome::Rejected(
                        odd.iter()
                            .map(|e| Rejection {
                                event_id: e.event_id,
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
                self.push(&host, &reports)
            }
            // A hostile plugin granted scripts: every way out of its key prefix it can try, one
            // JSON report per attempt pushed to `key` (sandbox_redis.rs reads them).
            "redis-hostile" => {
                let reports: Vec<String> = redis_hostile_attempts(&self.outside)
                    .into_iter()
                    .map(|(name, cmd)| {
                        let started = host.now_micros();
                        let r = host.redis_pipeline(&[command(&cmd)], false);
                        let ms = (host.now_micros() - started) / 1000;
                        let (ok, error) = match r {
                            Ok(replies) => (Value::String(format!("{replies:?}")), Value::Null),
                            Err(e) => (Value::Null, Value::String(format!("{e:?}"))),
                        };
                        serde_json::json!({"attempt": name, "ok": ok, "error": error, "ms": ms})
                            .to_string()
                    })
                    .collect();
                self.push(&host, &reports)
            }
            // Takes the batch and does nothing: the cost of the Wasm boundary alone.
            "noop" => WriteOutcome::Accepted,
            "retry-first" if self.retries_left > 0 => {
                self.retries_left -= 1;
                WriteOutcome::RetryLater("testkit: asked to retry".into())
            }
            _ => {
                let rows: Vec<String> = batch.events.iter().map(event_json_string).collect();
                self.push(&host, &rows)
            }
        }
    }
}

impl Testkit {
    fn push(&self, host: &impl Host, rows: &[String]) -> WriteOutcome {
        if rows.is_empty() {
            return WriteOutcome::Accepted;
        }
        let mut args: Vec<&str> = vec!["RPUSH", self.key.as_str()];
        args.extend(rows.iter().map(String::as_str));
        match host.redis_pipeline(&[command(&args)], false) {
            Ok(_) => WriteOutcome::Accepted,
            Err(e) => WriteOutcome::RetryLater(format!("redis: {e:?}")),
        }
    }
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
