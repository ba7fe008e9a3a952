//! redis-topn: the Redis real-time layer of SPEC 5B.
//!
//! Keys (all behind the configurable `key_prefix`, "" by default):
//! - `content:last:{content_id}`  string, SPEC-4 JSON of the newest event by event time, TTL 1 h
//! - `content:count:{content_id}` integer, events of that content, no TTL
//! - `top:content:bucket:{YYYYMMDDHHMM}` ZSET content_id -> events in that UTC minute (event time),
//!   expiring 15 min after the end of its minute (EXPIREAT, so an old bucket does not live 15 min)
//! - `top:content:10m` ZSET, ZUNIONSTORE of the last 10 minute buckets up to the current
//!   wall-clock minute, rebuilt after every batch, TTL 120 s
//! - `fanout:once:marks`, `fanout:once:backfilled:{n}`: the bookkeeping of the SDK's
//!   exactly-once primitive ([`fanout_sdk::exactly_once`]): a hash with one field per Kafka
//!   partition and bitmaps of backfilled ids; its size does not grow with the events
//!
//! One batch = one pipeline: the `EVAL` of the exactly-once primitive applying `INCR` of the
//! count and `ZINCRBY` + `EXPIREAT` of the bucket for each event not applied before, the
//! `EVAL` of [`LAST_SCRIPT`] (compare-and-set of `content:last`, idempotent by itself), then
//! ZUNIONSTORE and EXPIRE of the 10-minute key. A replayed event changes no count, score or
//! last event. Events without content_id touch no key (there is nothing to count them under).
//!
//! Migration from the per-event markers of the previous version (`fanout:seen:{event_id}`,
//! TTL 24 h): while `honour_seen_markers` is on (the default), an event whose old marker
//! still exists counts as applied, so an upgrade replays nothing twice. Turn it off (and drop
//! `fanout:seen:` from the grant) 24 h after the upgrade; a later version drops the check.

use std::collections::BTreeMap;

use fanout_sdk::exactly_once::RedisOnce;
use fanout_sdk::redis::Commands;
use fanout_sdk::time::{minute_key, minute_start_secs, MICROS_PER_MINUTE, MICROS_PER_SECOND};
use fanout_sdk::{
    describe, event_json_string, export_sink, format_event_ts, Batch, Event, Host, Level, Sink,
    WriteOutcome,
};
use serde::Deserialize;

/// Replaces `content:last:{id}` when the event is newer. KEYS: one `content:last` key per
/// content. ARGV[1] = TTL s, then 3 values per key: event_ts (`YYYY-MM-DD HH:MM:SS`),
/// event_id, SPEC-4 JSON. Returns how many keys it replaced.
///
/// Newer = (event_ts, event_id) above the stored event's, read back from the stored JSON, so
/// late or out-of-order events (and replays) never overwrite a newer one: idempotent without
/// bookkeeping. The TTL is refreshed when the key is replaced.
pub const LAST_SCRIPT: &str = r#"
local ttl = tonumber(ARGV[1])
local replaced = 0
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 3
  local event_ts, event_id = ARGV[a], tonumber(ARGV[a + 1])
  local newer = true
  local old = redis.call('GET', KEYS[i])
  if old then
    local ok, prev = pcall(cjson.decode, old)
    if ok and type(prev) == 'table' and type(prev['event_ts']) == 'string' then
      local pts = prev['event_ts']
      local pid = tonumber(prev['event_id']) or -1
      newer = (pts < event_ts) or (pts == event_ts and pid < event_id)
    end
  end
  if newer then
    redis.call('SET', KEYS[i], ARGV[a + 2], 'EX', ttl)
    replaced = replaced + 1
  end
end
return replaced
"#;

/// `[plugins.config]` of the plugin. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Put in front of every key (the grant's key prefix must cover it).
    pub key_prefix: String,
    /// The exactly-once bookkeeping: `{key_prefix}{once_key_prefix}marks` and
    /// `...backfilled:{n}`.
    pub once_key_prefix: String,
    /// How long the backfill bitmaps are kept after their last write.
    pub backfill_ttl_seconds: u64,
    /// Markers of the previous version: `{key_prefix}{seen_key_prefix}{event_id}`.
    pub seen_key_prefix: String,
    /// Treat an existing old marker as applied (migration; turn off once they expired).
    pub honour_seen_markers: bool,
    /// Read and ignored: the TTL of the previous version's markers (kept so that configs of
    /// that version still load).
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
    /// Events per exactly-once script (one round trip each; a batch of at most this many
    /// events is one round trip).
    pub events_per_script: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            key_prefix: String::new(),
            once_key_prefix: "fanout:once:".into(),
            backfill_ttl_seconds: fanout_sdk::exactly_once::DEFAULT_BACKFILL_TTL_SECONDS,
            seen_key_prefix: "fanout:seen:".into(),
            honour_seen_markers: true,
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
    /// The checks parsing cannot make.
    pub fn validated(self) -> Result<Self, String> {
        if self.window_minutes == 0 || self.events_per_script == 0 {
            return Err("config: window_minutes and events_per_script must be > 0".into());
        }
        if self.backfill_ttl_seconds == 0 || self.last_ttl_seconds == 0 || self.top_ttl_seconds == 0
        {
            return Err("config: TTLs must be > 0".into());
        }
        Ok(self)
    }

    pub fn seen_key(&self, event_id: i64) -> String {
        format!("{}{}{}", self.key_prefix, self.seen_key_prefix, event_id)
    }

    /// The exactly-once scope: `{key_prefix}{once_key_prefix}`.
    pub fn once_scope(&self) -> String {
        format!("{}{}", self.key_prefix, self.once_key_prefix)
    }

    /// A fresh exactly-once call with this config's scope, TTL and migration.
    pub fn once(&self) -> RedisOnce {
        let once =
            RedisOnce::new(self.once_scope()).backfill_ttl_seconds(self.backfill_ttl_seconds);
        if self.honour_seen_markers {
            once.legacy_markers(format!("{}{}", self.key_prefix, self.seen_key_prefix))
        } else {
            once
        }
    }

    /// `{key_prefix}content:count:{content_id}`.
    pub fn count_key(&self, content_id: i64) -> ContentKey<'_> {
        ContentKey {
            prefix: &self.key_prefix,
            kind: "count",
            content_id,
        }
    }

    /// `{key_prefix}content:last:{content_id}`.
    pub fn last_key(&self, content_id: i64) -> ContentKey<'_> {
        ContentKey {
            prefix: &self.key_prefix,
            kind: "last",
            content_id,
        }
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

/// `{prefix}content:{kind}:{content_id}`: formatted straight into a Redis argument
/// (`format_args!("{key}")`), or `to_string()`.
#[derive(Debug, Clone, Copy)]
pub struct ContentKey<'a> {
    prefix: &'a str,
    kind: &'static str,
    content_id: i64,
}

impl std::fmt::Display for ContentKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}content:{}:{}",
            self.prefix, self.kind, self.content_id
        )
    }
}

/// Writes the per-event commands of one batch. The keys repeat within a batch, so they are
/// made once where they can be: the bucket key and its expiry once per distinct minute (a
/// batch spans a few), the count key in a reused buffer (no `core::fmt` per event).
pub struct EventCommands<'c> {
    cfg: &'c Config,
    now_micros: i64,
    /// `{key_prefix}content:count:`, then the content id of the last key written.
    count_key: Vec<u8>,
    count_prefix: usize,
    /// (minute since the epoch, bucket key, expire-at) of recent minutes, newest last.
    minutes: Vec<(i64, Vec<u8>, i64)>,
}

/// Distinct minutes remembered per batch (a longer run of them starts again).
const MINUTES_KEPT: usize = 16;

impl<'c> EventCommands<'c> {
    pub fn new(cfg: &'c Config, now_micros: i64) -> Self {
        let mut count_key = Vec::with_capacity(cfg.key_prefix.len() + 40);
        count_key.extend_from_slice(cfg.key_prefix.as_bytes());
        count_key.extend_from_slice(b"content:count:");
        EventCommands {
            cfg,
            now_micros,
            count_prefix: count_key.len(),
            count_key,
            minutes: Vec::new(),
        }
    }

    /// Adds the commands that apply one event (with content `content_id`) exactly once: `INCR`
    /// of its count, and `ZINCRBY` + `EXPIREAT` of its minute bucket unless that would already
    /// be expired.
    pub fn add(&mut self, commands: &mut Commands, e: &Event<'_>, content_id: i64) {
        self.count_key.truncate(self.count_prefix);
        self.count_key
            .extend_from_slice(itoa::Buffer::new().format(content_id).as_bytes());
        commands.cmd("INCR").arg(&self.count_key[..]);
        let (bucket, expire_at) = self.bucket(e.event_ts_micros());
        if expire_at > 0 {
            commands
                .cmd("ZINCRBY")
                .arg(bucket)
                .arg(1)
                .arg(content_id)
                .cmd("EXPIREAT")
                .arg(bucket)
                .arg(expire_at);
        }
    }

    /// [`Config::bucket_key`] and [`Config::bucket_expire_at`] of an event time.
    fn bucket(&mut self, micros: i64) -> (&[u8], i64) {
        let minute = micros.div_euclid(MICROS_PER_MINUTE);
        let found = self.minutes.iter().rposition(|(m, _, _)| *m == minute);
        let at = match found {
            Some(at) => at,
            None => {
                if self.minutes.len() >= MINUTES_KEPT {
                    self.minutes.clear();
                }
                let key = self.cfg.bucket_key(micros).into_bytes();
                let expire_at = self.cfg.bucket_expire_at(micros, self.now_micros);
                self.minutes.push((minute, key, expire_at));
                self.minutes.len() - 1
            }
        };
        let (_, key, expire_at) = &self.minutes[at];
        (key, *expire_at)
    }
}

/// Adds the `EVAL` of [`LAST_SCRIPT`] for the newest event of each content in `events`
/// (nothing when `events` is empty).
pub fn last_command(cfg: &Config, commands: &mut Commands, events: &[(Event<'_>, i64)]) {
    let mut newest: BTreeMap<i64, Event<'_>> = BTreeMap::new();
    for (e, c) in events {
        let slot = newest.entry(*c).or_insert(*e);
        if (e.event_ts_micros(), e.event_id()) > (slot.event_ts_micros(), slot.event_id()) {
            *slot = *e;
        }
    }
    if newest.is_empty() {
        return;
    }
    commands.cmd("EVAL").arg(LAST_SCRIPT).arg(newest.len());
    for c in newest.keys() {
        commands.arg(format_args!("{}", cfg.last_key(*c)));
    }
    commands.arg(cfg.last_ttl_seconds);
    for e in newest.values() {
        commands
            .arg(format_event_ts(*e))
            .arg(e.event_id())
            .arg(event_json_string(*e));
    }
}

/// Adds the commands after the exactly-once script: `content:last`, then the rebuild of the
/// window.
pub fn then_commands(
    cfg: &Config,
    commands: &mut Commands,
    events: &[(Event<'_>, i64)],
    now_micros: i64,
) {
    last_command(cfg, commands, events);
    let buckets = cfg.window_bucket_keys(now_micros);
    commands
        .cmd("ZUNIONSTORE")
        .arg(cfg.top_key())
        .arg(buckets.len())
        .args(buckets)
        .cmd("EXPIRE")
        .arg(cfg.top_key())
        .arg(cfg.top_ttl_seconds);
}

/// The plugin.
pub struct RedisTopN {
    cfg: Config,
}

impl RedisTopN {
    pub fn new(cfg: Config) -> Self {
        RedisTopN { cfg }
    }
}

impl Sink for RedisTopN {
    type Config = Config;

    fn init(cfg: Config, _host: &impl Host) -> Result<Self, String> {
        Ok(RedisTopN::new(cfg.validated()?))
    }

    /// One round trip per `events_per_script` events.
    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let now = host.now_micros();
        let with_content: Vec<(Event<'_>, i64)> = batch
            .events
            .iter()
            .filter_map(|e| e.content_id().map(|c| (e, c)))
            .collect();
        let chunks: Vec<&[(Event<'_>, i64)]> = if with_content.is_empty() {
            vec![&[]]
        } else {
            with_content.chunks(self.cfg.events_per_script).collect()
        };
        let (mut fresh, mut replayed) = (0u64, 0u64);
        let mut event_commands = EventCommands::new(&self.cfg, now);
        for (i, chunk) in chunks.iter().enumerate() {
            let mut once = self.cfg.once();
            for (e, c) in chunk.iter() {
                event_commands.add(once.event(e), e, *c);
            }
            // content:last and the window go with the last round trip, over the whole batch.
            if i + 1 == chunks.len() {
                then_commands(&self.cfg, once.then(), &with_content, now);
            }
            match once.apply(host) {
                Ok(applied) => {
                    fresh += applied.applied() as u64;
                    // Skipped: replays, backfill overlaps and producer re-sends (Resent).
                    replayed += applied.skipped() as u64;
                }
                Err(e) => {
                    let reason = format!("redis pipeline of batch {}: {}", batch.id, describe(&e));
                    host.log(Level::Warn, &reason);
                    // What was applied before is marked: the retry skips it.
                    host.counter_add("events_new", fresh);
                    host.counter_add("events_replayed", replayed);
                    return WriteOutcome::RetryLater(reason);
                }
            }
        }
        let skipped = (batch.events.len() - with_content.len()) as u64;
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

export_sink!(RedisTopN);

#[cfg(test)]
mod tests;

#[cfg(test)]
mod live_tests;
