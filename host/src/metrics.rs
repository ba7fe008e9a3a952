//! Counters of everything the host does, rendered as Prometheus text on /metrics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The hot-path counters of one lane (one plugin's consumer), exported with `plugin="<name>"`.
#[derive(Default)]
pub struct LaneMetrics {
    pub messages_consumed: Counter,
    pub events_decoded: Counter,
    pub events_enriched: Counter,
    pub events_missing_content: Counter,
    pub batches_delivered: Counter,
    pub commits: Counter,
}

impl LaneMetrics {
    fn series(&self) -> [(&'static str, &Counter); 6] {
        [
            ("fanout_messages_consumed_total", &self.messages_consumed),
            ("fanout_events_decoded_total", &self.events_decoded),
            ("fanout_events_enriched_total", &self.events_enriched),
            (
                "fanout_events_missing_content_total",
                &self.events_missing_content,
            ),
            ("fanout_batches_delivered_total", &self.batches_delivered),
            ("fanout_commits_total", &self.commits),
        ]
    }
}

/// Hot-path counters are plain atomics (per lane, or host-wide); labelled series (per plugin
/// and reason) live in a map.
#[derive(Default)]
pub struct MetricsInner {
    pub content_updates: Counter,
    pub content_decode_errors: Counter,
    lanes: Mutex<BTreeMap<String, Arc<LaneMetrics>>>,
    labelled: Mutex<BTreeMap<(String, String), f64>>,
    health: Mutex<BTreeMap<String, String>>,
}

#[derive(Clone, Default)]
pub struct Metrics(Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;
    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

impl Metrics {
    /// The counters of lane `plugin`, created on first use.
    pub fn lane(&self, plugin: &str) -> Arc<LaneMetrics> {
        match self.lanes.lock() {
            Ok(mut lanes) => lanes.entry(plugin.to_string()).or_default().clone(),
            // A poisoned map only loses the export, never the caller's work.
            Err(_) => Arc::new(LaneMetrics::default()),
        }
    }

    /// Adds to a labelled counter, e.g. `("fanout_messages_skipped_total", "reason=\"update\"")`.
    pub fn add_labelled(&self, name: &str, labels: &str, value: f64) {
        if let Ok(mut m) = self.labelled.lock() {
            *m.entry((name.to_string(), labels.to_string()))
                .or_insert(0.0) += value;
        }
    }

    pub fn set_labelled(&self, name: &str, labels: &str, value: f64) {
        if let Ok(mut m) = self.labelled.lock() {
            m.insert((name.to_string(), labels.to_string()), value);
        }
    }

    /// The sum of a labelled series over all its labels.
    pub fn sum_labelled(&self, name: &str) -> f64 {
        self.labelled
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| n == name)
                    .map(|(_, v)| v)
                    .sum()
            })
            .unwrap_or(0.0)
    }

    pub fn labelled(&self, name: &str, labels: &str) -> f64 {
        self.labelled
            .lock()
            .ok()
            .and_then(|m| m.get(&(name.to_string(), labels.to_string())).copied())
            .unwrap_or(0.0)
    }

    /// Marks a component unhealthy with a reason (None = healthy again).
    pub fn set_unhealthy(&self, component: &str, reason: Option<String>) {
        if let Ok(mut h) = self.health.lock() {
            match reason {
                Some(r) => {
                    h.insert(component.to_string(), r);
                }
                None => {
                    h.remove(component);
                }
            }
        }
    }

    /// Reasons the host is not healthy; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        self.health
            .lock()
            .map(|h| h.iter().map(|(k, v)| format!("{k}: {v}")).collect())
            .unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(lanes) = self.lanes.lock() {
            let names = LaneMetrics::default().series().map(|(name, _)| name);
            for (i, name) in names.iter().enumerate() {
                let _ = writeln!(out, "# TYPE {name} counter");
                for (plugin, lane) in lanes.iter() {
                    let value = lane.series()[i].1.get();
                    let _ = writeln!(out, "{name}{{{}}} {value}", label("plugin", plugin));
                }
            }
        }
        let plain = [
            ("fanout_content_updates_total", &self.content_updates),
            (
                "fanout_content_decode_errors_total",
                &self.content_decode_errors,
            ),
        ];
        for (name, c) in plain {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", c.get());
        }
        if let Ok(m) = self.labelled.lock() {
            let mut last = "";
            for ((name, labels), v) in m.iter() {
                if name != last {
                    let kind = if name.ends_with("_total") {
                        "counter"
                    } else {
                        "gauge"
                    };
                    let _ = writeln!(out, "# TYPE {name} {kind}");
                    last = name;
                }
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
        let healthy = if self.problems().is_empty() { 1 } else { 0 };
        let _ = writeln!(out, "# TYPE fanout_healthy gauge\nfanout_healthy {healthy}");
        out
    }
}

/// A Prometheus label value, escaped.
pub fn label(key: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{key}=\"{escaped}\"")
}
