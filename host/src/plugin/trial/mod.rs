//! `fanout plugin test`: runs a plugin, loaded as `fanout run` loads it (same loader, limits,
//! worker thread and capability code), against events from a file or generated ones, with
//! in-memory stand-ins for Redis, HTTP and ClickHouse that record every command, request and
//! row. Prints, per batch, what the plugin did and how it answered; fails on a trap, a
//! rejection, a retry-later, a refused `init`, or (with `--grants`) a call its grant refuses.
//!
//! The stand-ins plug in behind the capability implementations
//! ([`super::capabilities::FakeServices`]): the WIT glue, the argument caps and, with
//! `--grants`, the grant checks (`grants.rs`, `clickhouse_sql.rs`) are the host's own.

pub mod clickhouse;
pub mod events;
pub mod redis;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::bindings::fanout::sink::errors::CapabilityError;
use super::bindings::fanout::sink::{http, log, redis as wit_redis};
use super::capabilities::{FakeServices, Services};
use super::{Plugin, PluginBatch, PluginError, WriteOutcome};
use crate::config::{Config, PluginConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Select(String),
    #[error("plugin config: {0}")]
    PluginConfig(String),
    #[error(transparent)]
    Events(#[from] events::EventsError),
    #[error("cannot start the plugin: {0}")]
    Engine(PluginError),
    #[error("the loader thread failed: {0}")]
    Join(String),
}

/// Where the events come from.
#[derive(Debug, Clone)]
pub enum EventSource {
    File(PathBuf),
    Generate(usize),
}

/// Which configuration the plugin gets.
#[derive(Debug, Clone)]
pub enum PluginSetup {
    /// The `[[plugins]]` entry of a host config (its config table, grants and limits).
    Config { path: PathBuf, name: Option<String> },
    /// The `config` table as JSON; no grants; default limits.
    Json(String),
}

#[derive(Debug, Clone)]
pub struct TrialOptions {
    pub file: PathBuf,
    pub events: EventSource,
    pub setup: PluginSetup,
    /// Hold calls to the entry's grants, as `fanout run` does.
    pub grants: bool,
    pub batch_size: Option<usize>,
    /// The status every HTTP request is answered with.
    pub http_status: u16,
    /// Deliver every batch a second time after the last one, as after a crash.
    pub replay: bool,
}

/// One thing the plugin did, as the stand-ins saw it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    Redis {
        commands: Vec<Vec<String>>,
        /// Per command: what it ran as a script (`redis.call`, `redis.pcall`), in order;
        /// empty for other commands.
        script_calls: Vec<Vec<Vec<String>>>,
        atomic: bool,
        /// The replies, as text; None when the pipeline failed.
        replies: Option<Vec<String>>,
        error: Option<String>,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: String,
        status: u16,
    },
    ClickhouseExecute {
        sql: String,
        answer: Option<String>,
        error: Option<String>,
    },
    ClickhouseInsert {
        database: String,
        table: String,
        rows: Vec<String>,
        error: Option<String>,
    },
    /// Refused by the grant checks (`--grants`): nothing reached a stand-in.
    Denied { call: String, reason: String },
    Log {
        level: String,
        stream: String,
        line: String,
    },
    Metric {
        name: String,
        value: f64,
        gauge: bool,
    },
}

/// How a step (init or a batch) ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// `init` succeeded.
    Ready,
    Accepted,
    RetryLater {
        reason: String,
    },
    Rejected {
        rejections: Vec<(i64, String)>,
    },
    /// A trap, a timeout, out of fuel or memory, a refused `init`.
    Failed {
        kind: String,
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `init`, or the batch id (with ` (replay)` on a replay).
    pub name: String,
    pub events: usize,
    pub millis: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub effects: Vec<Effect>,
}

impl Step {
    fn failed(&self) -> bool {
        !matches!(self.outcome, Outcome::Ready | Outcome::Accepted)
            || self
                .effects
                .iter()
                .any(|e| matches!(e, Effect::Denied { .. }))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisKey {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub ttl_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableRows {
    pub database: String,
    pub table: String,
    pub rows: usize,
}

/// Everything `plugin test` saw; printed as text, or as JSON with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrialReport {
    pub plugin: String,
    pub file: String,
    pub grants_checked: bool,
    pub steps: Vec<Step>,
    /// The in-memory Redis at the end.
    pub redis: Vec<RedisKey>,
    /// Rows the in-memory ClickHouse holds at the end.
    pub clickhouse: Vec<TableRows>,
    pub ok: bool,
}

/// The stand-ins and what they recorded since the last [`Fakes::take`].
pub struct Fakes {
    grants: bool,
    http_status: u16,
    state: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    redis: redis::FakeRedis,
    clickhouse: clickhouse::FakeClickHouse,
    effects: Vec<Effect>,
}

impl Fakes {
    pub fn new(grants: bool, http_status: u16) -> Self {
        Fakes {
            grants,
            http_status,
            state: Mutex::new(Recorded::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-record: keep what is there.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The effects recorded since the last call.
    pub fn take(&self) -> Vec<Effect> {
        self.with(|s| std::mem::take(&mut s.effects))
    }

    fn state_dump(&self) -> (Vec<RedisKey>, Vec<TableRows>) {
        self.with(|s| {
            let keys = s
                .redis
                .dump()
                .into_iter()
                .map(|(key, kind, value, ttl_seconds)| RedisKey {
                    key,
                    kind,
                    value,
                    ttl_seconds,
                })
                .collect();
            let tables = s
                .clickhouse
                .counts()
                .into_iter()
                .map(|(database, table, rows)| TableRows {
                    database,
                    table,
                    rows,
                })
                .collect();
            (keys, tables)
        })
    }
}

fn lossy(a: &[u8]) -> String {
    String::from_utf8_lossy(a).into_owned()
}

fn to_scalar(v: redis::RedisValue) -> Result<wit_redis::Scalar, String> {
    use redis::RedisValue as V;
    use wit_redis::Scalar as S;
    Ok(match v {
        V::Nil => S::Nil,
        V::Int(i) => S::Integer(i),
        V::Bulk(b) => S::Data(b),
        V::Status(s) => S::Status(s),
        V::Error(e) => return Err(e),
        V::Array(_) => return Err("redis reply nested too deep for the capability".into()),
    })
}

/// As the host's capability converts Redis replies (an error anywhere fails the call).
fn to_reply(v: redis::RedisValue) -> Result<wit_redis::Reply, String> {
    use redis::RedisValue as V;
    use wit_redis::Reply as R;
    Ok(match v {
        V::Array(items) => R::Array(items.into_iter().map(to_scalar).collect::<Result<_, _>>()?),
        V::Nil => R::Nil,
        V::Int(i) => R::Integer(i),
        V::Bulk(b) => R::Data(b),
        V::Status(s) => R::Status(s),
        V::Error(e) => return Err(e),
    })
}

impl FakeServices for Fakes {
    fn checks_grants(&self) -> bool {
        self.grants
    }

    fn redis(
        &self,
        commands: &[wit_redis::Command],
        atomic: bool,
    ) -> Result<Vec<wit_redis::Reply>, CapabilityError> {
        self.with(|s| {
            // Every command runs, as in a pipeline; the first error reply fails the call.
            let mut replies = Vec::with_capacity(commands.len());
            let mut texts = Vec::with_capacity(commands.len());
            let mut error = None;
            let mut script_calls = Vec::with_capacity(commands.len());
            for c in commands {
                let v = s.redis.execute(c).unwrap_or_else(|e| e);
                script_calls.push(s.redis.take_script_calls());
                texts.push(v.text());
                match to_reply(v) {
                    Ok(r) => replies.push(r),
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            let text: Vec<Vec<String>> = commands
                .iter()
                .map(|c| c.iter().map(|a| lossy(a)).collect())
                .collect();
            s.effects.push(Effect::Redis {
                commands: text,
                script_calls,
                atomic,
                replies: error.is_none().then(|| texts.clone()),
                error: error.clone(),
            });
            match error {
                Some(e) => Err(CapabilityError::Failed(format!("redis: {e}"))),
                None => Ok(replies),
            }
        })
    }

    fn http(&self, request: &http::Request) -> Result<http::Response, CapabilityError> {
        self.with(|s| {
            s.effects.push(Effect::Http {
                method: request.method.clone(),
                url: request.url.clone(),
                headers: request.headers.clone(),
                body: lossy(&request.body),
                status: self.http_status,
            })
        });
        Ok(http::Response {
            status: self.http_status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{}".to_vec(),
        })
    }

    fn clickhouse_execute(&self, sql: &str) -> Result<String, CapabilityError> {
        self.with(|s| {
            let answer = s.clickhouse.execute(sql);
            s.effects.push(Effect::ClickhouseExecute {
                sql: sql.to_string(),
                answer: answer.as_ref().ok().cloned(),
                error: answer.as_ref().err().cloned(),
            });
            answer.map_err(|e| CapabilityError::Failed(format!("clickhouse: {e}")))
        })
    }

    fn clickhouse_insert(
        &self,
        database: &str,
        table: &str,
        rows: &[String],
    ) -> Result<(), CapabilityError> {
        self.with(|s| {
            let done = s.clickhouse.insert(database, table, rows);
            s.effects.push(Effect::ClickhouseInsert {
                database: database.to_string(),
                table: table.to_string(),
                rows: rows.to_vec(),
                error: done.as_ref().err().cloned(),
            });
            done.map_err(|e| CapabilityError::Failed(format!("clickhouse insert: {e}")))
        })
    }

    fn refused(&self, call: String, reason: &CapabilityError) {
        let reason = match reason {
            CapabilityError::NotGranted(m) => format!("not granted: {m}"),
            CapabilityError::Failed(m) => m.clone(),
        };
        self.with(|s| s.effects.push(Effect::Denied { call, reason }));
    }

    fn log(&self, level: log::Level, stream: &str, line: &str) {
        let level = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        }
        .to_string();
        self.with(|s| {
            s.effects.push(Effect::Log {
                level,
                stream: stream.to_string(),
                line: line.to_string(),
            })
        });
    }

    fn metric(&self, name: &str, value: f64, gauge: bool) {
        self.with(|s| {
            s.effects.push(Effect::Metric {
                name: name.to_string(),
                value,
                gauge,
            })
        });
    }
}

/// The plugin's `[[plugins]]` entry: from the host config, or made from `--plugin-config`.
fn plugin_config(opts: &TrialOptions) -> Result<PluginConfig, TrialError> {
    match &opts.setup {
        PluginSetup::Config { path, name } => {
            let config = Config::load(path, std::env::vars())?;
            let (_, pc) = super::check::select(&config.plugins, &opts.file, name.as_deref())
                .map_err(TrialError::Select)?;
            let mut pc = pc.clone();
            pc.path = opts.file.clone();
            Ok(pc)
        }
        PluginSetup::Json(json) => {
            let name = opts
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plugin".into());
            let config: toml::Value = serde_json::from_str(json)
                .map_err(|e| TrialError::PluginConfig(format!("not a JSON object: {e}")))?;
            if !config.is_table() {
                return Err(TrialError::PluginConfig("must be a JSON object".into()));
            }
            let mut entry = toml::Table::new();
            entry.insert("name".into(), toml::Value::String(name));
            entry.insert(
                "path".into(),
                toml::Value::String(opts.file.display().to_string()),
            );
            entry.insert("config".into(), config);
            let mut pc = toml::Value::Table(entry)
                .try_into::<PluginConfig>()
                .map_err(|e| TrialError::PluginConfig(e.to_string()))?;
            // The compile cache `fanout run` uses by default: a second run starts at once.
            let dir = crate::config::CacheConfig::default().dir;
            pc.compile_cache = (!dir.is_empty()).then(|| PathBuf::from(dir));
            Ok(pc)
        }
    }
}

fn outcome_of(result: Result<WriteOutcome, PluginError>) -> Outcome {
    match result {
        Ok(WriteOutcome::Accepted) => Outcome::Accepted,
        Ok(WriteOutcome::RetryLater(reason)) => Outcome::RetryLater { reason },
        Ok(WriteOutcome::Rejected(list)) => Outcome::Rejected {
            rejections: list.into_iter().map(|r| (r.event_id, r.reason)).collect(),
        },
        Err(e) => Outcome::Failed {
            kind: e.kind().to_string(),
            error: e.to_string(),
        },
    }
}

/// Runs the trial. Setup problems (bad config, unreadable events, no engine) are errors;
/// what the plugin does, failures included, is in the report.
pub async fn run(opts: &TrialOptions) -> Result<TrialReport, TrialError> {
    let pc = plugin_config(opts)?;
    let events = match &opts.events {
        EventSource::File(path) => events::read(path)?,
        // Up to the current second: time-bucketed sinks (redis-topn) keep what they write.
        EventSource::Generate(n) => {
            let now = chrono::Utc::now().timestamp() * 1_000_000;
            events::generate(*n, now)
        }
    };
    let batch_size = opts.batch_size.unwrap_or(500);
    let batches: Vec<Arc<PluginBatch>> = events::batches(events, batch_size)
        .into_iter()
        .map(Arc::new)
        .collect();
    let fakes = Arc::new(Fakes::new(opts.grants, opts.http_status));
    let engine = super::engine_for(std::slice::from_ref(&pc)).map_err(TrialError::Engine)?;
    let linker = super::linker(&engine).map_err(TrialError::Engine)?;
    let services = Arc::new(Services {
        runtime: tokio::runtime::Handle::current(),
        redis: None,
        http: reqwest::Client::new(),
        clickhouse: None,
        clickhouse_inserts: None,
        metrics: crate::metrics::Metrics::default(),
        fakes: Some(fakes.clone() as Arc<dyn FakeServices>),
    });
    let mut steps = Vec::new();
    let name = pc.name.clone();
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || Plugin::load(pc, &engine, linker, services))
        .await
        .map_err(|e| TrialError::Join(e.to_string()))?;
    let init_ms = started.elapsed().as_secs_f64() * 1000.0;
    let plugin = match loaded {
        Ok(p) => {
            steps.push(Step {
                name: "init".into(),
                events: 0,
                millis: init_ms,
                outcome: Outcome::Ready,
                effects: fakes.take(),
            });
            Some(p)
        }
        Err(e) => {
            steps.push(Step {
                name: "init".into(),
                events: 0,
                millis: init_ms,
                outcome: outcome_of(Err(e)),
                effects: fakes.take(),
            });
            None
        }
    };
    if let Some(plugin) = plugin {
        let rounds = if opts.replay { 2 } else { 1 };
        for round in 0..rounds {
            for b in &batches {
                let t = Instant::now();
                let result = plugin.write(b.clone()).await;
                let millis = t.elapsed().as_secs_f64() * 1000.0;
                steps.push(Step {
                    name: if round == 0 {
                        b.id().to_string()
                    } else {
                        format!("{} (replay)", b.id())
                    },
                    events: b.len(),
                    millis,
                    outcome: outcome_of(result),
                    effects: fakes.take(),
                });
            }
        }
    }
    let (redis, clickhouse) = fakes.state_dump();
    let ok = !steps.iter().any(Step::failed);
    Ok(TrialReport {
        plugin: name,
        file: opts.file.display().to_string(),
        grants_checked: opts.grants,
        steps,
        redis,
        clickhouse,
        ok,
    })
}

/// Cuts `s` to `max` characters on one line.
fn short(s: &str, max: usize) -> String {
    let one_line: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}... ({} chars)", s.chars().count())
    }
}

/// A script's body is long: show its first line and its EVALSHA name instead.
fn command_text(c: &[String]) -> String {
    let name = c
        .first()
        .map(|n| n.to_ascii_uppercase())
        .unwrap_or_default();
    if name == "EVAL" && c.len() > 2 {
        let script = &c[1];
        let numkeys: usize = c[2].parse().unwrap_or(0);
        let known = if script == fanout_sdk::exactly_once::SCRIPT {
            "the SDK's exactly-once script".to_string()
        } else {
            format!("script {}", &redis::sha1_hex(script.as_bytes())[..12])
        };
        return format!(
            "EVAL <{known}> {numkeys} keys, {} args",
            c.len().saturating_sub(3 + numkeys)
        );
    }
    short(&c.join(" "), 160)
}

impl Effect {
    fn line(&self) -> String {
        match self {
            Effect::Redis {
                commands,
                script_calls,
                atomic,
                replies,
                error,
            } => {
                let mut s = format!(
                    "redis {}pipeline of {}:",
                    if *atomic { "atomic " } else { "" },
                    commands.len()
                );
                const SHOWN: usize = 12;
                for (i, c) in commands.iter().enumerate() {
                    let reply = replies
                        .as_ref()
                        .and_then(|r| r.get(i))
                        .map(|r| format!(" -> {}", short(r, 80)))
                        .unwrap_or_default();
                    let _ = write!(s, "\n      {}{reply}", command_text(c));
                    let inner = script_calls.get(i).map_or(&[][..], Vec::as_slice);
                    for c in inner.iter().take(SHOWN) {
                        let _ = write!(s, "\n        in script: {}", command_text(c));
                    }
                    if inner.len() > SHOWN {
                        let _ = write!(
                            s,
                            "\n        in script: ... {} more commands (--json lists them all)",
                            inner.len() - SHOWN
                        );
                    }
                }
                if let Some(e) = error {
                    let _ = write!(s, "\n      FAILED: {e}");
                }
                s
            }
            Effect::Http {
                method,
                url,
                body,
                status,
                ..
            } => format!("http {method} {url} {} -> {status}", short(body, 120)),
            Effect::ClickhouseExecute { sql, answer, error } => match (answer, error) {
                (_, Some(e)) => format!("clickhouse {} -> FAILED: {e}", short(sql, 140)),
                (Some(a), _) => format!(
                    "clickhouse {} -> {} line(s)",
                    short(sql, 140),
                    a.lines().count()
                ),
                _ => format!("clickhouse {}", short(sql, 140)),
            },
            Effect::ClickhouseInsert {
                database,
                table,
                rows,
                error,
            } => {
                let first = rows
                    .first()
                    .map(|r| format!(", first {}", short(r, 120)))
                    .unwrap_or_default();
                let failed = error
                    .as_ref()
                    .map(|e| format!(" -> FAILED: {e}"))
                    .unwrap_or_default();
                format!(
                    "clickhouse insert into {database}.{table}: {} row(s){first}{failed}",
                    rows.len()
                )
            }
            Effect::Denied { call, reason } => format!("DENIED {} ({reason})", short(call, 140)),
            Effect::Log {
                level,
                stream,
                line,
            } => format!("{stream} {level}: {}", short(line, 200)),
            Effect::Metric { name, value, gauge } => {
                if *gauge {
                    format!("gauge {name} = {value}")
                } else {
                    format!("counter {name} += {value}")
                }
            }
        }
    }
}

impl TrialReport {
    /// The report as text; at most `max_effects` effects per step (None: all of them).
    pub fn render(&self, max_effects: Option<usize>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plugin test: {} ({}), grants {}",
            self.plugin,
            self.file,
            if self.grants_checked {
                "checked as `fanout run` checks them"
            } else {
                "not checked (--grants checks them)"
            }
        );
        for step in &self.steps {
            let outcome = match &step.outcome {
                Outcome::Ready => "ok".to_string(),
                Outcome::Accepted => "accepted".to_string(),
                Outcome::RetryLater { reason } => format!("RETRY-LATER: {reason}"),
                Outcome::Rejected { rejections } => {
                    let mut s = format!("REJECTED {} event(s)", rejections.len());
                    for (id, why) in rejections.iter().take(5) {
                        let _ = write!(s, "\n    event {id}: {}", short(why, 160));
                    }
                    if rejections.len() > 5 {
                        let _ = write!(s, "\n    ... {} more", rejections.len() - 5);
                    }
                    s
                }
                Outcome::Failed { kind, error } => format!("FAILED ({kind}): {error}"),
            };
            let events = if step.name == "init" {
                String::new()
            } else {
                format!(", {} events", step.events)
            };
            let _ = writeln!(
                out,
                "\n{}{events}, {:.1} ms: {outcome}",
                step.name, step.millis
            );
            let shown = max_effects.unwrap_or(usize::MAX);
            for e in step.effects.iter().take(shown) {
                let _ = writeln!(out, "  {}", e.line());
            }
            if step.effects.len() > shown {
                let _ = writeln!(
                    out,
                    "  ... {} more (--all prints every one)",
                    step.effects.len() - shown
                );
            }
            let summary = summarize(&step.effects);
            if !summary.is_empty() {
                let _ = writeln!(out, "  = {summary}");
            }
        }
        if !self.redis.is_empty() {
            let _ = writeln!(out, "\nredis at the end ({} keys):", self.redis.len());
            for k in self.redis.iter().take(max_effects.unwrap_or(usize::MAX)) {
                let ttl = k
                    .ttl_seconds
                    .map(|t| format!(" (ttl {t} s)"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  {} {}{ttl} {}", k.kind, k.key, short(&k.value, 160));
            }
        }
        if !self.clickhouse.is_empty() {
            let _ = writeln!(out, "\nclickhouse at the end:");
            for t in &self.clickhouse {
                let _ = writeln!(out, "  {}.{}: {} row(s)", t.database, t.table, t.rows);
            }
        }
        let failed = self.steps.iter().filter(|s| s.failed()).count();
        let batches = self.steps.iter().filter(|s| s.name != "init").count();
        let _ = writeln!(
            out,
            "\n{}: {batches} batch(es), {failed} step(s) with a trap, rejection, retry-later, failed init or denied call",
            if self.ok { "ok" } else { "FAILED" }
        );
        out
    }
}

/// Counts per kind of effect, e.g. "3 redis pipelines (12 commands), 1 insert (500 rows)".
fn summarize(effects: &[Effect]) -> String {
    let (mut pipes, mut cmds, mut http, mut execs, mut inserts, mut rows, mut denied, mut logs) =
        (0, 0, 0, 0, 0, 0, 0, 0);
    for e in effects {
        match e {
            Effect::Redis { commands, .. } => {
                pipes += 1;
                cmds += commands.len();
            }
            Effect::Http { .. } => http += 1,
            Effect::ClickhouseExecute { .. } => execs += 1,
            Effect::ClickhouseInsert { rows: r, .. } => {
                inserts += 1;
                rows += r.len();
            }
            Effect::Denied { .. } => denied += 1,
            Effect::Log { .. } => logs += 1,
            Effect::Metric { .. } => {}
        }
    }
    let mut parts = Vec::new();
    if pipes > 0 {
        parts.push(format!("{pipes} redis pipeline(s) ({cmds} commands)"));
    }
    if http > 0 {
        parts.push(format!("{http} http request(s)"));
    }
    if execs > 0 {
        parts.push(format!("{execs} clickhouse statement(s)"));
    }
    if inserts > 0 {
        parts.push(format!("{inserts} clickhouse insert(s) ({rows} rows)"));
    }
    if logs > 0 {
        parts.push(format!("{logs} log line(s)"));
    }
    if denied > 0 {
        parts.push(format!("{denied} DENIED"));
    }
    parts.join(", ")
}
