//! redis-topn: the Redis real-time layer of SPEC 5B.
//!
//! Keys (all behind the configurable `key_prefix`, "" by default):
//! - `content:last:{content_id}`  string, SPEC-4 JSON of the newest event by event time, TTL 1 h
//! - `content:count:{content_id}` integer, events of that content, no TTL
//! - `top:content:bucket:{YYYYMMDDHHMM}` ZSET content_id -> events in that UTC minute (event time),
//!   expiring 15 min after the end of its minute (EXPIREAT, so an old bucket does not live 15 min)
//! - `top:content:10m` ZSET, ZUNIONSTORE of the last 10 minute buckets up to the current
//!   wall-clock minute, rebuilt after every batch, TTL 120 s
//! - `fanout:seen:{event_id}` the idempotency marker (SET NX, TTL `seen_ttl_seconds`)
//!
//! One batch = one pipeline: an EVAL of [`SCRIPT`] per chunk of events, then ZUNIONSTORE and
//! EXPIRE of the 10-minute key. The script marks each event as seen and applies its effects only
//! if it was new, atomically, so a replayed event changes no count, score or last event.
//! Events without content_id touch no key (there is nothing to count them under).

use fanout_sdk::redis::{Cmd, Command, Reply};
use fanout_sdk::time::{minute_key, minute_start_secs, MICROS_PER_MINUTE, MICROS_PER_SECOND};
use fanout_sdk::{
    describe, event_json_string, export_sink, format_event_ts, Batch, Event, Host, Level, Sink,
    WasmHost, WriteOutcome,
};
use serde::Deserialize;

/// Applies a chunk of events. KEYS has 4 keys per event: seen, count, bucket, last.
/// ARGV[1] = seen TTL s, ARGV[2] = last TTL s, then 5 values per event:
/// content_id, event_id, event_ts ("YYYY-MM-DD HH:MM:SS"), bucket EXPIREAT (0 = bucket
/// already expired: skip it), SPEC-4 JSON. Returns {new events, replayed events}.
///
/// `content:last` is replaced only by an event that is newer by (event_ts, event_id) than
/// the stored one, read back from the stored JSON, so late or out-of-order events never
/// overwrite a newer one. Runs atomically: the seen marker and the effects land together.
pub const SCRIPT: &str = r#"
local seen_ttl = tonumber(ARGV[1])
local last_ttl = tonumber(ARGV[2])
local n = #KEYS / 4
local fresh, replayed = 0, 0
for i = 0, n - 1 do
  local k = i * 4
  local a = 3 + i * 5
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', seen_ttl) then
    fresh = fresh + 1
    local content_id = ARGV[a]
    local event_id = tonumber(ARGV[a + 1])
    local event_ts = ARGV[a + 2]
    local expire_at = tonumber(ARGV[a + 3])
    redis.call('INCR', KEYS[k + 2])
    if expire_at > 0 then
      redis.call('ZINCRBY', KEYS[k + 3], 1, content_id)
      redis.call('EXPIREAT', KEYS[k + 3], expire_at)
    end
    local newer = true
    local old = redis.call('GET', KEYS[k + 4])
    if old then
      local ok, prev = pcall(cjson.decode, old)
      if ok and type(prev) == 'table' and type(prev['event_ts']) == 'string' then
        local pts = prev['event_ts']
        local pid = tonumber(prev['event_id']) or -1
        newer = (pts < event_ts) or (pts == event_ts and pid < event_id)
      end
    end
    if newer then
      redis.call('SET', KEYS[k + 4], ARGV[a + 4], 'EX', last_ttl)
    end
  else
    replayed = replayed + 1
  end
end
return {fresh, replayed}
"#;

/// `[plugins.config]` of the plugin. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Put in front of every key (the grant's key prefix must cover it).
    pub key_prefix: String,
    /// Idempotency markers: `{key_prefix}{seen_key_prefix}{event_id}`.
    pub seen_key_prefix: String,
    /// How long an event id is remembered; replays older than this count again.
    pub seen_ttl_seconds: u64,
    /// TTL of `content:last:*`.
    pub last_ttl_seconds: u64,
    /// Buckets expire this long after the end of their minute.
    pub bucket_ttl_seconds: u64,
    /// TTL of `top:content:10m`.
    pub top_ttl_seconds: u64,
    /// Minute buckets merged into the top key (10 for `top:content:10m`).
    pub window_minutes: u32,
    /// Name of the merged key, after the prefix.
    pub top_key: String,
    /// Events per EVAL (bounds the script's argument list).
    pub events_per_script: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            key_prefix: String::new(),
            seen_key_prefix: "fanout:seen:".into(),
            seen_ttl_seconds: 86_400,
            last_ttl_seconds: 3_600,
            bucket_ttl_seconds: 900,
            top_ttl_seconds: 120,
            window_minutes: 10,
            top_key: "top:content:10m".into(),
            events_per_script: 500,
        }
    }
}

impl Config {
    pub fn from_json(config: serde_json::Value) -> Result<Self, String> {
        let cfg: Config =
            serde_json::from_value(config).map_err(|e| format!("redis-topn config: {e}"))?;
        if cfg.window_minutes == 0 || cfg.events_per_script == 0 {
            return Err(
                "redis-topn config: window_minutes and events_per_script must be > 0".into(),
            );
        }
        if cfg.seen_ttl_seconds == 0 || cfg.last_ttl_seconds == 0 || cfg.top_ttl_seconds == 0 {
            return Err("redis-topn config: TTLs must be > 0".into());
        }
        Ok(cfg)
    }

    pub fn seen_key(&self, event_id: i64) -> String {
        format!("{}{}{}", self.key_prefix, self.seen_key_prefix, event_id)
    }

    pub fn count_key(&self, content_id: i64) -> String {
        format!("{}content:count:{}", self.key_prefix, content_id)
    }

    pub fn last_key(&self, content_id: i64) -> String {
        format!("{}content:last:{}", self.key_prefix, content_id)
    }

    /// `top:content:bucket:{YYYYMMDDHHMM}` of the UTC minute containing `micros`.
    pub fn bucket_key(&self, micros: i64) -> String {
        format!(
            "{}top:content:bucket:{}",
            self.key_prefix,
            minute_key(micros)
        )
    }

    pub fn top_key(&self) -> String {
        format!("{}{}", self.key_prefix, self.top_key)
    }

    /// The bucket keys of the window ending with the wall-clock minute of `now_micros`,
    /// oldest first: with 10 minutes at 14:21:xx, the buckets 14:12 ... 14:21.
    pub fn window_bucket_keys(&self, now_micros: i64) -> Vec<String> {
        let minutes = i64::from(self.window_minutes);
        (0..minutes)
            .rev()
            .map(|back| self.bucket_key(now_micros.saturating_sub(back * MICROS_PER_MINUTE)))
            .collect()
    }

    /// Unix second at which the bucket of an event expires: `bucket_ttl_seconds` after the
    /// end of its minute. 0 when that moment has passed at `now_micros` (skip the bucket:
    /// the event is too old to matter for any window, and a new key would only linger).
    pub fn bucket_expire_at(&self, event_micros: i64, now_micros: i64) -> i64 {
        let ttl = i64::try_from(self.bucket_ttl_seconds).unwrap_or(i64::MAX);
        let at = minute_start_secs(event_micros)
            .saturating_add(60)
            .saturating_add(ttl);
        if at <= now_micros.div_euclid(MICROS_PER_SECOND) {
            0
        } else {
            at
        }
    }
}

/// One EVAL of [`SCRIPT`] for `events` (all with a content_id).
pub fn eval_command(cfg: &Config, events: &[(Event<'_>, i64)], now_micros: i64) -> Command {
    let mut keys = Vec::with_capacity(events.len() * 4);
    let mut argv = Vec::with_capacity(2 + events.len() * 5);
    argv.push(cfg.seen_ttl_seconds.to_string());
    argv.push(cfg.last_ttl_seconds.to_string());
    for (e, content_id) in events {
        keys.push(cfg.seen_key(e.event_id()));
        keys.push(cfg.count_key(*content_id));
        keys.push(cfg.bucket_key(e.event_ts_micros()));
        keys.push(cfg.last_key(*content_id));
        argv.push(content_id.to_string());
        argv.push(e.event_id().to_string());
        argv.push(format_event_ts(*e));
        argv.push(
            cfg.bucket_expire_at(e.event_ts_micros(), now_micros)
                .to_string(),
        );
        argv.push(event_json_string(*e));
    }
    let mut cmd = Cmd::new("EVAL").arg(SCRIPT).arg(keys.len());
    for k in keys {
        cmd = cmd.arg(k);
    }
    for a in argv {
        cmd = cmd.arg(a);
    }
    cmd.into_command()
}

/// The whole pipeline of a batch: EVALs, then the rebuild of the window key.
/// Returns the commands and the number of EVALs at their head.
pub fn batch_commands(cfg: &Config, batch: &Batch, now_micros: i64) -> (Vec<Command>, usize) {
    let with_content: Vec<(Event<'_>, i64)> = batch
        .events
        .iter()
        .filter_map(|e| e.content_id().map(|c| (e, c)))
        .collect();
    let mut commands: Vec<Command> = with_content
        .chunks(cfg.events_per_script)
        .map(|chunk| eval_command(cfg, chunk, now_micros))
        .collect();
    let evals = commands.len();
    let buckets = cfg.window_bucket_keys(now_micros);
    let mut union = Cmd::new("ZUNIONSTORE")
        .arg(cfg.top_key())
        .arg(buckets.len());
    for b in buckets {
        union = union.arg(b);
    }
    commands.push(union.into_command());
    commands.push(
        Cmd::new("EXPIRE")
            .arg(cfg.top_key())
            .arg(cfg.top_ttl_seconds)
            .into_command(),
    );
    (commands, evals)
}

/// The plugin.
pub struct RedisTopN {
    cfg: Config,
}

impl RedisTopN {
    pub fn new(cfg: Config) -> Self {
        RedisTopN { cfg }
    }

    /// Writes one batch through `host`.
    pub fn write_with(&self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let now = host.now_micros();
        let (commands, evals) = batch_commands(&self.cfg, batch, now);
        let replies = match host.redis_pipeline(&commands, false) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("redis pipeline of batch {}: {}", batch.id, describe(&e));
                host.log(Level::Warn, &reason);
                return WriteOutcome::RetryLater(reason);
            }
        };
        if replies.len() != commands.len() {
            return WriteOutcome::RetryLater(format!(
                "redis pipeline of batch {}: {} replies for {} commands",
                batch.id,
                replies.len(),
                commands.len()
            ));
        }
        let (mut fresh, mut replayed) = (0u64, 0u64);
        for reply in replies.iter().take(evals) {
            match reply {
                Reply::Array(_) => {
                    let counts = fanout_sdk::redis::reply_ints(reply);
                    fresh += counts.first().copied().unwrap_or(0).max(0) as u64;
                    replayed += counts.get(1).copied().unwrap_or(0).max(0) as u64;
                }
                other => {
                    return WriteOutcome::RetryLater(format!(
                        "redis EVAL of batch {} answered {other:?}",
                        batch.id
                    ))
                }
            }
        }
        let skipped = batch
            .events
            .iter()
            .filter(|e| e.content_id().is_none())
            .count() as u64;
        host.counter_add("events_new", fresh);
        host.counter_add("events_replayed", replayed);
        host.counter_add("events_without_content_id", skipped);
        host.log(
            Level::Debug,
            &format!(
                "batch {}: {fresh} new, {replayed} replayed, {skipped} without content_id",
                batch.id
            ),
        );
        WriteOutcome::Accepted
    }
}

impl Sink for RedisTopN {
    fn init(config: serde_json::Value) -> Result<Self, String> {
        Ok(RedisTopN::new(Config::from_json(config)?))
    }

    fn write(&mut self, batch: &Batch) -> WriteOutcome {
        self.write_with(&WasmHost, batch)
    }
}

export_sink!(RedisTopN);

#[cfg(test)]
mod tests;

#[cfg(test)]
mod live_tests;
