//! The host's configuration: one TOML file, then `FANOUT__SECTION__KEY` environment overrides.
//!
//! Every error names the key that is wrong and what was expected, so an operator can fix the
//! file without reading the source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub enrich: EnrichConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub services: ServicesConfig,
    #[serde(default)]
    pub http: HttpServerConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default, rename = "plugins")]
    pub plugins: Vec<PluginConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. "127.0.0.1:9092".
    pub brokers: String,
    /// Each plugin's lane commits in its own group, `<group_id>.<plugin name>`. The group
    /// itself is only read: a lane without positions of its own starts from the ones a host
    /// before lanes committed there, so an upgrade replays and skips nothing.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    #[serde(default = "default_events_topic")]
    pub events_topic: String,
    /// Debezium's topic of the content table; empty disables following it.
    #[serde(default = "default_content_topic")]
    pub content_topic: String,
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// A busy lane commits its delivered offsets at most this often (every commit is a write
    /// on the broker); an idle or stopping lane commits at once. A crash replays at most this
    /// much, which the sinks' idempotency absorbs.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Treat snapshot reads (`op: "r"`) as inserts.
    #[serde(default)]
    pub include_snapshot_reads: bool,
    /// Bytes of messages kept decoded, over all partitions, for the lanes behind the first
    /// ([`crate::lane::decoded`]); 0 turns sharing off (every lane decodes on its own).
    #[serde(default = "default_shared_decode_bytes")]
    pub shared_decode_bytes: usize,
    /// Extra librdkafka properties (security.protocol, sasl.*, ...), passed through as is.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// The consumer group of a plugin's lane.
    pub fn lane_group(&self, plugin: &str) -> String {
        format!("{}.{plugin}", self.group_id)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Used to load the content table at start, to resolve content the topic has not shown
    /// yet, and by `backfill`. Empty: content comes from the topic only.
    #[serde(default)]
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingContentPolicy {
    /// Deliver with NULL content fields (SPEC default).
    Deliver,
    /// Send the event to the dead-letter topic.
    DeadLetter,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    #[serde(default = "default_missing_content")]
    pub missing_content: MissingContentPolicy,
    /// How long a batch may wait for content that is not known yet before the policy applies.
    #[serde(default)]
    pub missing_content_wait_ms: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            missing_content: default_missing_content(),
            missing_content_wait_ms: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is cut when it holds this many events...
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// ...or when its first message is this old.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_events: default_max_events(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

impl BatchConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// Where the host's capabilities connect. Plugins never see these URLs; they see grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    #[serde(default)]
    pub redis_url: String,
    #[serde(default)]
    pub clickhouse_url: String,
    #[serde(default)]
    pub clickhouse_user: String,
    #[serde(default)]
    pub clickhouse_password: String,
    /// Who makes the Redis ACL users plugins connect as (`redis_url` is the admin connection).
    #[serde(default)]
    pub redis_users: RedisUsers,
}

/// `services.redis_users`: Redis enforces every plugin's grant as an ACL user of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedisUsers {
    /// The host runs `ACL SETUSER` for each plugin at its first Redis call, from its grant.
    #[default]
    Host,
    /// The operator manages the users; each grant names its `user` and `password`.
    Provided,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpServerConfig {
    /// Address of /metrics, /healthz and the console (`/`). Empty disables the server.
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

/// The operations console at `/` on `http.listen` (see docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// How often the console samples rates, ages, lag and the top content; it keeps
    /// `history_minutes` of samples in memory, so a fresh page shows the recent past.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    #[serde(default = "default_history_minutes")]
    pub history_minutes: u64,
    /// The host's own read-only Redis access for the top-content view: a URL with an ACL user
    /// that may only read the top keys (`scripts/stack` makes `fanout-console`). Never the
    /// admin `services.redis_url`. Empty: the view says it is not configured.
    #[serde(default)]
    pub redis_url: String,
    /// The sorted set of the top content (redis-topn's `top:content:10m`, after its prefix).
    #[serde(default = "default_top_key")]
    pub top_key: String,
    #[serde(default = "default_top_n")]
    pub top_n: usize,
    /// The most recent dead letters listed (read from the dead-letter topic).
    #[serde(default = "default_dead_letters_shown")]
    pub dead_letters_shown: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            sample_interval_ms: default_sample_interval_ms(),
            history_minutes: default_history_minutes(),
            redis_url: String::new(),
            top_key: default_top_key(),
            top_n: default_top_n(),
            dead_letters_shown: default_dead_letters_shown(),
        }
    }
}

fn default_sample_interval_ms() -> u64 {
    5_000
}
fn default_history_minutes() -> u64 {
    15
}
fn default_top_key() -> String {
    "top:content:10m".into()
}
fn default_top_n() -> usize {
    10
}
fn default_dead_letters_shown() -> usize {
    50
}

/// Where a lane starts when neither its own consumer group nor the host's pre-lane group
/// (`kafka.group_id`) has a committed position: librdkafka's `auto.offset.reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPosition {
    /// The oldest retained message (sinks dedupe by event_id, so a replay is harmless).
    Earliest,
    /// Only messages produced after the lane first joins.
    Latest,
}

impl StartPosition {
    pub fn as_offset_reset(self) -> &'static str {
        match self {
            StartPosition::Earliest => "earliest",
            StartPosition::Latest => "latest",
        }
    }
}

/// Compiled plugins on disk (see `plugin/cache.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory of compiled components; relative to the config file; `""` compiles at
    /// every start. Default: `$XDG_CACHE_HOME/fanout` or `~/.cache/fanout`.
    #[serde(default = "default_cache_dir")]
    pub dir: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: default_cache_dir(),
        }
    }
}

fn default_cache_dir() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    var("XDG_CACHE_HOME")
        .map(|d| format!("{d}/fanout"))
        .or_else(|| var("HOME").map(|h| format!("{h}/.cache/fanout")))
        .unwrap_or_default()
}

/// How lag is measured and when a standstill makes the host unhealthy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often every lane's committed offsets are compared with the high watermarks.
    #[serde(default = "default_lag_interval_ms")]
    pub lag_interval_ms: u64,
    /// A partition with lag whose committed offset has not moved for this long is a stall.
    #[serde(default = "default_stall_after_ms")]
    pub stall_after_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            lag_interval_ms: default_lag_interval_ms(),
            stall_after_ms: default_stall_after_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Retry the batch forever (capped backoff): the stream waits, nothing is committed past it.
    FailFast,
    /// After `max_retries`, dead-letter the batch's events for this plugin and go on.
    BestEffort,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "default_failure_policy")]
    pub failure_policy: FailurePolicy,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Wasm instructions one call may execute (fuel): a deterministic CPU budget on top of
    /// `call_timeout_ms`, which bounds every call anyway. Unset: no fuel metering, which
    /// makes plugin code up to about 2.5x faster (BENCHMARKS.md). Metering is a property of
    /// the compiled code, so when one plugin sets it every plugin of the host is metered (the
    /// others with an unlimited budget).
    #[serde(default)]
    pub fuel_per_call: Option<u64>,
    /// Linear memory the plugin may grow to.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall-clock bound of one call, capability calls and sleeps included.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Where this plugin's lane starts without a committed position (see [`StartPosition`]).
    #[serde(default = "default_start")]
    pub start: StartPosition,
    /// This lane's batch cadence; the top-level `[batch]` when absent.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    #[serde(default)]
    pub grants: Grants,
    /// Where compiled components are cached: `[cache] dir`, filled in by [`Config::load`].
    #[serde(skip)]
    pub compile_cache: Option<PathBuf>,
    /// Passed to the plugin's `init` as JSON.
    #[serde(default = "empty_table")]
    pub config: toml::Value,
}

/// What a plugin may reach. Absent = refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    pub redis: Option<RedisGrant>,
    pub http: Option<HttpGrant>,
    pub clickhouse: Option<ClickHouseGrant>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisGrant {
    /// Shorthand for a one-element `key_prefixes`.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Every key a command touches (in a script too: Redis checks it) starts with one of these.
    #[serde(default)]
    pub key_prefixes: Vec<String>,
    /// EVAL/EVALSHA. Redis holds scripts to the same keys and commands (ACL user).
    #[serde(default)]
    pub allow_scripts: bool,
    /// Commands allowed (scripts' `redis.call`s included); default: every data command the
    /// host knows (`plugin::grants::REDIS_DATA_COMMANDS`).
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// Bytes of all replies of one pipeline together (default 8 MiB).
    #[serde(default)]
    pub max_reply_bytes: Option<u64>,
    /// Bound of one pipeline (default 5000 ms); a script still running then is killed.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `services.redis_users = "provided"`: the operator's ACL user and its password.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Default of `grants.redis.max_reply_bytes`.
pub const DEFAULT_MAX_REDIS_REPLY_BYTES: u64 = 8 << 20;
/// Default of `grants.redis.timeout_ms`.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 5_000;

impl RedisGrant {
    /// `key_prefix` and `key_prefixes` together.
    pub fn prefixes(&self) -> Vec<&str> {
        self.key_prefix
            .iter()
            .chain(&self.key_prefixes)
            .map(String::as_str)
            .collect()
    }

    pub fn max_reply_bytes(&self) -> u64 {
        self.max_reply_bytes
            .unwrap_or(DEFAULT_MAX_REDIS_REPLY_BYTES)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    pub url_prefixes: Vec<String>,
    /// The largest response body one request may return, and all responses of one
    /// `send-all` together (default 8 MiB): the body is read in chunks and refused past it.
    #[serde(default)]
    pub max_response_bytes: Option<u64>,
}

/// Default of `grants.http.max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 << 20;

impl HttpGrant {
    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseGrant {
    pub databases: Vec<String>,
    /// The largest result `execute` may return (default 8 MiB); the query is cancelled past it.
    #[serde(default)]
    pub max_result_bytes: Option<u64>,
}

/// Default of `grants.clickhouse.max_result_bytes`.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 8 << 20;

impl ClickHouseGrant {
    pub fn max_result_bytes(&self) -> u64 {
        self.max_result_bytes.unwrap_or(DEFAULT_MAX_RESULT_BYTES)
    }
}

fn default_group_id() -> String {
    "fanout".into()
}
fn default_events_topic() -> String {
    "dbserver1.public.engagement_events".into()
}
fn default_content_topic() -> String {
    "dbserver1.public.content".into()
}
fn default_dead_letter_topic() -> String {
    "fanout.dead_letter".into()
}
fn default_missing_content() -> MissingContentPolicy {
    MissingContentPolicy::Deliver
}
fn default_max_events() -> usize {
    500
}
fn default_max_wait_ms() -> u64 {
    200
}
fn default_http_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
/// Lanes at the head of a live stream are within a batch or two of each other; catching up
/// on a backlog they drift apart, and 64 MiB keeps some 100,000 plain Debezium envelopes (a
/// lane's own librdkafka prefetch queue is 16 MiB).
fn default_shared_decode_bytes() -> usize {
    64 << 20
}
fn default_lag_interval_ms() -> u64 {
    5_000
}
fn default_stall_after_ms() -> u64 {
    60_000
}
fn default_start() -> StartPosition {
    StartPosition::Earliest
}
fn default_failure_policy() -> FailurePolicy {
    FailurePolicy::FailFast
}
fn default_max_retries() -> u32 {
    5
}
fn default_retry_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_memory_mb() -> u64 {
    128
}
fn default_call_timeout_ms() -> u64 {
    60_000
}
fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

const ENV_PREFIX: &str = "FANOUT__";

impl Config {
    /// The batch cadence of a plugin's lane: its own `batch` table, or the top-level one.
    pub fn lane_batch<'a>(&'a self, plugin: &'a PluginConfig) -> &'a BatchConfig {
        plugin.batch.as_ref().unwrap_or(&self.batch)
    }

    /// Reads the file, applies `FANOUT__A__B=value` overrides from `env`, validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml(&text, path, env)?;
        // Paths are relative to the config file, not to wherever the host was started.
        let base = path.parent().unwrap_or(Path::new(""));
        let cache = (!config.cache.dir.is_empty()).then(|| base.join(&config.cache.dir));
        for p in &mut config.plugins {
            if p.path.is_relative() {
                p.path = base.join(&p.path);
            }
            p.compile_cache = cache.clone();
        }
        Ok(config)
    }

    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        for (var, value) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                apply_override(&mut doc, &var, rest, &value)?;
            }
        }
        let config: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.to_string(),
            message: message.to_string(),
        };
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if self.batch.max_events == 0 {
            return Err(invalid("batch.max_events", "must be at least 1"));
        }
        if self.batch.max_wait_ms == 0 {
            return Err(invalid("batch.max_wait_ms", "must be at least 1"));
        }
        if self.console.sample_interval_ms == 0 || self.console.history_minutes == 0 {
            return Err(invalid(
                "console.sample_interval_ms/history_minutes",
                "must be at least 1",
            ));
        }
        if self.health.lag_interval_ms == 0 || self.health.stall_after_ms == 0 {
            return Err(invalid(
                "health.lag_interval_ms/stall_after_ms",
                "must be at least 1",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let key = |k: &str| format!("plugins[{i}].{k}");
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    &key("name"),
                    "must be non-empty: letters, digits, '-' or '_'",
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(invalid(
                    &key("name"),
                    &format!("`{}` is used twice", p.name),
                ));
            }
            if let Some(b) = &p.batch {
                if b.max_events == 0 || b.max_wait_ms == 0 {
                    return Err(invalid(
                        &key("batch.max_events/max_wait_ms"),
                        "must be at least 1",
                    ));
                }
            }
            if p.memory_mb == 0 || p.fuel_per_call == Some(0) || p.call_timeout_ms == 0 {
                return Err(invalid(
                    &key("memory_mb/fuel_per_call/call_timeout_ms"),
                    "must be positive",
                ));
            }
            if p.grants.redis.is_some() && self.services.redis_url.is_empty() {
                return Err(invalid(
                    "services.redis_url",
                    &format!(
                        "plugin `{}` is granted redis, but no redis_url is set",
                        p.name
                    ),
                ));
            }
            if let Some(g) = &p.grants.redis {
                crate::plugin::grants::check_redis_grant(g, self.services.redis_users)
                    .map_err(|why| invalid(&key("grants.redis"), &why))?;
            }
            if p.grants.clickhouse.is_some() && self.services.clickhouse_url.is_empty() {
                return Err(invalid(
                    "services.clickhouse_url",
                    &format!(
                        "plugin `{}` is granted clickhouse, but no clickhouse_url is set",
                        p.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `FANOUT__KAFKA__BROKERS=x` sets kafka.brokers; `FANOUT__PLUGINS__0__PATH=x` sets plugins[0].path.
/// Values parse as TOML scalars when they can (numbers, booleans), else as strings.
fn apply_override(
    doc: &mut toml::Table,
    var: &str,
    rest: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    let (last, path) = match parts.split_last() {
        Some((last, path)) if !last.is_empty() && path.iter().all(|p| !p.is_empty()) => {
            (last, path)
        }
        _ => {
            return Err(ConfigError::Env {
                var: var.to_string(),
                message: "empty path segment".into(),
            })
        }
    };
    set_path(doc, path, last, parse_scalar(value)).map_err(|message| ConfigError::Env {
        var: var.to_string(),
        message,
    })
}

fn set_path(
    table: &mut toml::Table,
    path: &[String],
    last: &str,
    value: toml::Value,
) -> Result<(), String> {
    let Some((head, tail)) = path.split_first() else {
        table.insert(last.to_string(), value);
        return Ok(());
    };
    let child = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(Default::default()));
    match child {
        toml::Value::Table(t) => set_path(t, tail, last, value),
        toml::Value::Array(items) => {
            // The next segment indexes the list: plugins__0__path.
            let (index, tail): (&str, &[String]) = match tail.split_first() {
                Some((i, rest)) => (i.as_str(), rest),
                None => (last, &[]),
            };
            let idx: usize = index
                .parse()
                .map_err(|_| format!("`{index}` must be an index into `{head}`"))?;
            let len = items.len();
            let slot = items
                .get_mut(idx)
                .ok_or_else(|| format!("index {idx} is past the {len} entries of `{head}`"))?;
            if tail.is_empty() && index == last {
                *slot = value;
                return Ok(());
            }
            match slot {
                toml::Value::Table(t) => set_path(t, tail, last, value),
                _ => Err(format!("`{head}[{idx}]` is not a table")),
            }
        }
        _ => Err(format!("`{head}` is not a table")),
    }
}

fn parse_scalar(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = value.parse::<f64>() {
        return toml::Value::Float(f);
    }
    match value {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[kafka]
brokers = "k:9092"
[services]
redis_url = "redis://r/"
[[plugins]]
name = "a"
path = "a.wasm"
[plugins.grants]
redis = { key_prefix = "a:" }
[plugins.config]
x = 1
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("t.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_and_env_overrides() {
        let c = load(
            BASE,
            &[
                ("FANOUT__BATCH__MAX_EVENTS", "7"),
                ("FANOUT__PLUGINS__0__FAILURE_POLICY", "best-effort"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.batch.max_events, 7);
        assert_eq!(c.batch.max_wait_ms, 200);
        assert_eq!(c.plugins[0].failure_policy, FailurePolicy::BestEffort);
        assert_eq!(c.kafka.events_topic, "dbserver1.public.engagement_events");
        assert_eq!(
            c.plugins[0].grants.redis.as_ref().map(|g| g.prefixes()),
            Some(vec!["a:"])
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(BASE, &[("FANOUT__BATCH__MAX_EVENTS", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch.max_events"), "{e}");
        let e = load(&BASE.replace("[kafka]", "[kafka]\nbrokerz = 1"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokerz"), "{e}");
        let e = load(&BASE.replace("redis_url = \"redis://r/\"", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("services.redis_url"), "{e}");
        let e = load(BASE, &[("FANOUT__PLUGINS__3__PATH", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FANOUT__PLUGINS__3__PATH") && e.contains("past"),
            "{e}"
        );
        let e = load(&BASE.replace("name = \"a\"", "name = \"a b\""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugins[0].name"), "{e}");
    }

    #[test]
    fn plugin_paths_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("fanout-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.toml");
        std::fs::write(&file, BASE).unwrap();
        let c = Config::load(&file, std::iter::empty()).unwrap();
        assert_eq!(c.plugins[0].path, dir.join("a.wasm"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
