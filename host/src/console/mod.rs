//! The operations console at `/`: a page that people keep open, fed by `/api/console`.
//!
//! The host samples its own metrics every `console.sample_interval_ms` into a ring buffer of
//! `console.history_minutes` (rates in and per plugin, event age p50/p99 from the histograms'
//! deltas, lag), so a page opened now shows the recent past at once. Beside the history it
//! serves the plugins as they run (file, sha256, WIT export, grants, policy, limits,
//! restarts), health with reasons, failures and dead letters by reason, the most recent dead
//! letters with their headers (read from the dead-letter topic, read-only), and the top
//! content read from Redis with the console's own read-only ACL user. Charts are drawn by
//! uPlot, vendored in `host/assets/uplot` and served from the binary: nothing is loaded from
//! outside the machine.

mod page;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{ConsoleConfig, KafkaConfig};
use crate::content::ContentTable;
use crate::lane::delivery::PluginSlot;
use crate::metrics::{HistogramSnapshot, Metrics};

pub use page::router;

/// Everything the console reads; cheap to clone (shared state).
#[derive(Clone)]
pub struct Console {
    pub metrics: Metrics,
    pub config: ConsoleConfig,
    pub kafka: KafkaConfig,
    pub content: ContentTable,
    /// The lanes' plugin slots: the version each lane runs now (swaps included). Set once
    /// the lanes exist.
    slots: Arc<std::sync::RwLock<BTreeMap<String, Arc<PluginSlot>>>>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    samples: VecDeque<Sample>,
    /// The counters and histograms at the previous sample, to turn them into rates.
    previous: Option<Totals>,
    top: TopContent,
    dead_letters: DeadLetters,
    /// When the console's data was last asked for: the dead-letter topic is only read while
    /// someone looks (each read is a Kafka client and a few broker round trips).
    viewed: Option<std::time::Instant>,
}

/// How long after the last look the console keeps reading the dead-letter topic.
const VIEWED_FOR: Duration = Duration::from_secs(120);

/// One point of the history.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    /// Unix seconds.
    t: f64,
    /// Messages read from the events topic per second (by the fastest lane: every lane reads
    /// the whole topic).
    in_rate: Option<f64>,
    plugins: BTreeMap<String, PluginSample>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct PluginSample {
    /// Events the plugin took per second.
    rate: Option<f64>,
    age_p50: Option<f64>,
    age_p99: Option<f64>,
    lag_messages: Option<f64>,
    lag_seconds: Option<f64>,
}

/// Cumulative values at one sample.
struct Totals {
    t: f64,
    consumed: BTreeMap<String, u64>,
    delivered: BTreeMap<String, f64>,
    ages: BTreeMap<String, HistogramSnapshot>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TopContent {
    pub key: String,
    pub configured: bool,
    pub error: Option<String>,
    /// Unix seconds of the read.
    pub at: Option<f64>,
    pub items: Vec<TopItem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopItem {
    pub rank: usize,
    pub content_id: String,
    pub score: f64,
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct DeadLetters {
    topic: String,
    error: Option<String>,
    at: Option<f64>,
    letters: Vec<crate::dlq::Letter>,
}

/// How often the dead-letter topic's tail is read again (each read is a few broker round trips).
const DEAD_LETTER_REFRESH: Duration = Duration::from_secs(10);

fn now_secs() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

impl Console {
    pub fn new(
        metrics: Metrics,
        config: ConsoleConfig,
        kafka: KafkaConfig,
        content: ContentTable,
    ) -> Console {
        Console {
            metrics,
            config,
            kafka,
            content,
            slots: Arc::default(),
            state: Arc::default(),
        }
    }

    pub fn set_slots(&self, slots: BTreeMap<String, Arc<PluginSlot>>) {
        if let Ok(mut s) = self.slots.write() {
            *s = slots;
        }
    }

    fn capacity(&self) -> usize {
        let total_ms = self.config.history_minutes.saturating_mul(60_000);
        (total_ms / self.config.sample_interval_ms.max(1)).clamp(2, 100_000) as usize
    }

    /// Samples until shutdown: metrics and the top content every interval, the dead-letter
    /// topic's tail every [`DEAD_LETTER_REFRESH`] while the console is being looked at.
    pub fn spawn(self, mut shutdown: watch::Receiver<bool>) {
        tokio::spawn(async move {
            let redis = self.top_reader().await;
            let interval = Duration::from_millis(self.config.sample_interval_ms);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_letters: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tick.tick() => {}
                }
                self.sample();
                if let Some(top) = self.read_top(redis.as_ref()).await {
                    if let Ok(mut s) = self.state.lock() {
                        s.top = top;
                    }
                }
                let viewed = self
                    .state
                    .lock()
                    .ok()
                    .and_then(|s| s.viewed)
                    .is_some_and(|t| t.elapsed() < VIEWED_FOR);
                if viewed && last_letters.is_none_or(|t| t.elapsed() >= DEAD_LETTER_REFRESH) {
                    last_letters = Some(tokio::time::Instant::now());
                    self.refresh_dead_letters().await;
                }
            }
        });
    }

    /// One point of history from the metrics as they are now.
    fn sample(&self) {
        let t = now_secs();
        let lanes = self.metrics.lanes();
        let consumed: BTreeMap<String, u64> = lanes
            .iter()
            .map(|(name, c)| (name.clone(), c.messages_consumed.get()))
            .collect();
        let delivered: BTreeMap<String, f64> = lanes
            .iter()
            .map(|(name, _)| {
                let v = self.metrics.labelled(
                    "fanout_events_delivered_total",
                    &crate::metrics::label("plugin", name),
                );
                (name.clone(), v)
            })
            .collect();
        let ages: BTreeMap<String, HistogramSnapshot> = self
            .metrics
            .histograms
            .all()
            .into_iter()
            .map(|(name, h)| (name, h.event_age.snapshot()))
            .collect();
        let lag = |name: &str, plugin: &str| {
            let labels = crate::metrics::label("plugin", plugin);
            self.metrics
                .labelled_series(name)
                .into_iter()
                .find(|(l, _)| *l == labels)
                .map(|(_, v)| v)
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let mut sample = Sample {
            t,
            in_rate: None,
            plugins: BTreeMap::new(),
        };
        if let Some(prev) = &state.previous {
            let dt = (t - prev.t).max(0.001);
            let rate = |now: f64, before: f64| ((now - before).max(0.0)) / dt;
            sample.in_rate = consumed
                .iter()
                .map(|(name, v)| {
                    rate(
                        *v as f64,
                        prev.consumed.get(name).copied().unwrap_or(0) as f64,
                    )
                })
                .reduce(f64::max);
            for (name, _) in &lanes {
                let age = match (ages.get(name), prev.ages.get(name)) {
                    (Some(now), Some(before)) => now.since(before),
                    (Some(now), None) => now.clone(),
                    _ => HistogramSnapshot::default(),
                };
                sample.plugins.insert(
                    name.clone(),
                    PluginSample {
                        rate: Some(rate(
                            delivered.get(name).copied().unwrap_or(0.0),
                            prev.delivered.get(name).copied().unwrap_or(0.0),
                        )),
                        age_p50: age.quantile(0.5),
                        age_p99: age.quantile(0.99),
                        lag_messages: lag("fanout_lane_lag_messages", name),
                        lag_seconds: lag("fanout_lane_lag_seconds", name),
                    },
                );
            }
        }
        state.previous = Some(Totals {
            t,
            consumed,
            delivered,
            ages,
        });
        // The first sample only sets the baseline of the rates.
        if !sample.plugins.is_empty() {
            state.samples.push_back(sample);
        }
        let cap = self.capacity();
        while state.samples.len() > cap {
            state.samples.pop_front();
        }
    }

    async fn top_reader(&self) -> Option<redis::aio::MultiplexedConnection> {
        if self.config.redis_url.is_empty() {
            return None;
        }
        let client = match redis::Client::open(self.config.redis_url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "console: console.redis_url is not a Redis URL; no top content");
                return None;
            }
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "console: cannot connect to Redis with console.redis_url; no top content");
                None
            }
        }
    }

    /// The top content: `ZREVRANGE top_key 0 n-1 WITHSCORES`, the only command the console's
    /// Redis user needs.
    async fn read_top(
        &self,
        conn: Option<&redis::aio::MultiplexedConnection>,
    ) -> Option<TopContent> {
        let mut top = TopContent {
            key: self.config.top_key.clone(),
            configured: !self.config.redis_url.is_empty(),
            ..Default::default()
        };
        let Some(conn) = conn else {
            if top.configured {
                top.error = Some("cannot connect with console.redis_url (see the log)".into());
            }
            return Some(top);
        };
        let mut conn = conn.clone();
        let n = self.config.top_n.max(1) as isize;
        let read: redis::RedisResult<Vec<(String, f64)>> = redis::cmd("ZREVRANGE")
            .arg(&self.config.top_key)
            .arg(0)
            .arg(n - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await;
        top.at = Some(now_secs());
        match read {
            Ok(items) => {
                top.items = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, (id, score))| {
                        let row = id.parse::<i64>().ok().and_then(|id| self.content.get(id));
                        TopItem {
                            rank: i + 1,
                            content_id: id,
                            score,
                            content_type: row.as_ref().and_then(|r| r.content_type.clone()),
                            length_seconds: row.and_then(|r| r.length_seconds),
                        }
                    })
                    .collect()
            }
            Err(e) => top.error = Some(e.to_string()),
        }
        Some(top)
    }

    async fn refresh_dead_letters(&self) {
        let (kafka, topic) = (self.kafka.clone(), self.kafka.dead_letter_topic.clone());
        let tail = self.config.dead_letters_shown as i64;
        let read = tokio::task::spawn_blocking(move || {
            crate::dlq::read(&kafka, &topic, Some(tail), Duration::from_secs(10))
        })
        .await;
        let mut letters = DeadLetters {
            topic: self.kafka.dead_letter_topic.clone(),
            at: Some(now_secs()),
            ..Default::default()
        };
        match read {
            Ok(Ok(mut read)) => {
                read.reverse();
                read.truncate(self.config.dead_letters_shown);
                letters.letters = read;
            }
            Ok(Err(crate::dlq::DlqError::NoTopic(_))) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "console: cannot read the dead-letter topic");
                letters.error = Some(e.to_string());
            }
            Err(e) => letters.error = Some(e.to_string()),
        }
        if let Ok(mut s) = self.state.lock() {
            s.dead_letters = letters;
        }
    }

    /// Everything the page shows, as JSON.
    pub fn snapshot(&self) -> Value {
        let (history, top, dead_letters) = match self.state.lock() {
            Ok(mut s) => {
                s.viewed = Some(std::time::Instant::now());
                (
                    history_json(&s.samples),
                    serde_json::to_value(&s.top).unwrap_or(Value::Null),
                    serde_json::to_value(&s.dead_letters).unwrap_or(Value::Null),
                )
            }
            Err(_) => (Value::Null, Value::Null, Value::Null),
        };
        let health = self.metrics.health_map();
        let failures = series_json(&self.metrics, "fanout_plugin_failures_total");
        let by_reason = series_json(&self.metrics, "fanout_dead_letters_total");
        let restarts = series_json(&self.metrics, "fanout_plugin_restarts_total");
        let slots = self.slots.read().map(|s| s.clone()).unwrap_or_default();
        let plugins: Vec<Value> = slots
            .iter()
            .map(|(name, slot)| {
                let plugin = slot.current().plugin.clone();
                let cfg = &plugin.config;
                let problems: Vec<String> = health
                    .iter()
                    .filter(|(k, _)| {
                        *k == &format!("plugin {name}") || *k == &format!("lane {name} stalled")
                    })
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                let of = |series: &[Value]| -> f64 {
                    series
                        .iter()
                        .filter(|s| s["labels"]["plugin"] == json!(name))
                        .filter_map(|s| s["value"].as_f64())
                        .fold(0.0, |a, b| a + b)
                };
                json!({
                    "name": name,
                    "path": cfg.path.display().to_string(),
                    "sha256": plugin.sha256,
                    "wit": plugin.wit_export,
                    "failure_policy": match cfg.failure_policy {
                        crate::config::FailurePolicy::FailFast => "fail-fast",
                        crate::config::FailurePolicy::BestEffort => "best-effort",
                    },
                    "max_retries": cfg.max_retries,
                    "limits": {
                        "memory_mb": cfg.memory_mb,
                        "fuel_per_call": cfg.fuel_per_call,
                        "call_timeout_ms": cfg.call_timeout_ms,
                    },
                    "grants": grants_json(&cfg.grants),
                    "restarts": of(&restarts),
                    "failures": of(&failures),
                    "dead_letters": of(&by_reason),
                    "healthy": problems.is_empty(),
                    "problems": problems,
                    "delivered": self.metrics.labelled(
                        "fanout_events_delivered_total",
                        &crate::metrics::label("plugin", name),
                    ),
                    "lag_messages": self.metrics.labelled(
                        "fanout_lane_lag_messages",
                        &crate::metrics::label("plugin", name),
                    ),
                    "lag_seconds": self.metrics.labelled(
                        "fanout_lane_lag_seconds",
                        &crate::metrics::label("plugin", name),
                    ),
                })
            })
            .collect();
        json!({
            "now": now_secs(),
            "sample_interval_ms": self.config.sample_interval_ms,
            "history_minutes": self.config.history_minutes,
            "health": {
                "ok": health.is_empty(),
                "problems": health.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
                "notes": self.metrics.notes(),
            },
            "history": history,
            "plugins": plugins,
            "failures": failures,
            "dead_letters_by_reason": by_reason,
            "dead_letters": dead_letters,
            "top": top,
        })
    }
}

/// The history as columns (what uPlot takes): `t`, `in_rate`, and per plugin one array per
/// measure, `null` where the plugin had no value.
fn history_json(samples: &VecDeque<Sample>) -> Value {
    let t: Vec<f64> = samples.iter().map(|s| s.t).collect();
    let in_rate: Vec<Option<f64>> = samples.iter().map(|s| s.in_rate).collect();
    let names: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|s| s.plugins.keys()).collect();
    let mut plugins = serde_json::Map::new();
    for name in names {
        let column = |f: fn(&PluginSample) -> Option<f64>| -> Vec<Option<f64>> {
            samples
                .iter()
                .map(|s| s.plugins.get(name).and_then(f))
                .collect()
        };
        plugins.insert(
            name.clone(),
            json!({
                "rate": column(|p| p.rate),
                "age_p50": column(|p| p.age_p50),
                "age_p99": column(|p| p.age_p99),
                "lag_messages": column(|p| p.lag_messages),
                "lag_seconds": column(|p| p.lag_seconds),
            }),
        );
    }
    json!({ "t": t, "in_rate": in_rate, "plugins": plugins })
}

/// A labelled series as `[{labels: {k: v}, value}]`.
fn series_json(metrics: &Metrics, name: &str) -> Vec<Value> {
    metrics
        .labelled_series(name)
        .into_iter()
        .map(|(labels, value)| {
            let labels: serde_json::Map<String, Value> = parse_labels(&labels)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            json!({ "labels": labels, "value": value })
        })
        .collect()
}

/// `a="x",b="y\"z"` as rendered by [`crate::metrics::label`], back into pairs.
pub fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        out.push((key, value));
        rest = &rest[end.min(rest.len())..];
    }
    out
}

/// What a plugin may reach, without secrets (a provided Redis user's password is left out).
fn grants_json(g: &crate::config::Grants) -> Value {
    json!({
        "redis": g.redis.as_ref().map(|r| json!({
            "key_prefixes": r.prefixes(),
            "allow_scripts": r.allow_scripts,
            "commands": r.commands,
            "user": r.user,
        })),
        "http": g.http.as_ref().map(|h| json!({ "url_prefixes": h.url_prefixes })),
        "clickhouse": g.clickhouse.as_ref().map(|c| json!({ "databases": c.databases })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_back() {
        let text = format!(
            "{},{}",
            crate::metrics::label("plugin", "a\"b\\c"),
            crate::metrics::label("kind", "trap")
        );
        assert_eq!(
            parse_labels(&text),
            vec![
                ("plugin".to_string(), "a\"b\\c".to_string()),
                ("kind".to_string(), "trap".to_string())
            ]
        );
        assert!(parse_labels("").is_empty());
    }

    #[test]
    fn history_columns_align_plugins_that_appear_later() {
        let mut samples = VecDeque::new();
        let mut first = Sample {
            t: 1.0,
            in_rate: Some(5.0),
            plugins: BTreeMap::new(),
        };
        first.plugins.insert(
            "a".into(),
            PluginSample {
                rate: Some(1.0),
                ..Default::default()
            },
        );
        let mut second = first.clone();
        second.t = 2.0;
        second.plugins.insert(
            "b".into(),
            PluginSample {
                rate: Some(2.0),
                ..Default::default()
            },
        );
        samples.push_back(first);
        samples.push_back(second);
        let h = history_json(&samples);
        assert_eq!(h["t"], json!([1.0, 2.0]));
        assert_eq!(h["plugins"]["a"]["rate"], json!([1.0, 1.0]));
        assert_eq!(h["plugins"]["b"]["rate"], json!([null, 2.0]));
    }
}
