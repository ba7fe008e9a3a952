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
    /// Facts /healthz shows without making the host unhealthy (a refused plugin swap).
    notes: Mutex<BTreeMap<String, String>>,
    /// The metric names each plugin has used, and whether a refusal was already logged.
    plugin_names: Mutex<BTreeMap<String, (std::collections::BTreeSet<String>, bool)>>,
}

/// The most metric names one plugin may use: each is a series on /metrics.
pub const MAX_PLUGIN_METRIC_NAMES: usize = 100;
/// The longest plugin metric name.
pub const MAX_PLUGIN_METRIC_NAME_LEN: usize = 64;

/// Why a plugin's metric was not recorded; `first` is set on the plugin's first refusal.
#[derive(Debug)]
pub struct MetricRefusal {
    pub reason: String,
    pub first: bool,
}

/// `[a-z_][a-z0-9_]*`, at most `MAX_PLUGIN_METRIC_NAME_LEN` bytes.
pub fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_PLUGIN_METRIC_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
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

    /// Admits metric `name` of `plugin`: a valid name, and a known one or one of the first
    /// `MAX_PLUGIN_METRIC_NAMES`. Refusals are counted in
    /// `fanout_plugin_metrics_refused_total{plugin,reason}` (two reasons: bounded).
    pub fn plugin_metric_name(&self, plugin: &str, name: &str) -> Result<(), MetricRefusal> {
        let reason = if !valid_metric_name(name) {
            "invalid_name"
        } else {
            let Ok(mut all) = self.plugin_names.lock() else {
                return Ok(());
            };
            let (names, _) = all.entry(plugin.to_string()).or_default();
            if names.contains(name) {
                return Ok(());
            }
            if names.len() < MAX_PLUGIN_METRIC_NAMES {
                names.insert(name.to_string());
                return Ok(());
            }
            "too_many_names"
        };
        self.add_labelled(
            "fanout_plugin_metrics_refused_total",
            &format!("{},{}", label("plugin", plugin), label("reason", reason)),
            1.0,
        );
        let first = match self.plugin_names.lock() {
            Ok(mut all) => {
                let (_, logged) = all.entry(plugin.to_string()).or_default();
                !std::mem::replace(logged, true)
            }
            Err(_) => false,
        };
        let shown: String = name.chars().take(MAX_PLUGIN_METRIC_NAME_LEN).collect();
        Err(MetricRefusal {
            reason: format!(
                "{reason}: `{}` (names are [a-z_][a-z0-9_]*, at most {MAX_PLUGIN_METRIC_NAME_LEN} bytes, {MAX_PLUGIN_METRIC_NAMES} per plugin; further refusals are only counted)",
                shown.escape_default()
            ),
            first,
        })
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

    /// Sets (or clears, with None) a note /healthz shows under `note:` lines; notes never make
    /// the host unhealthy.
    pub fn set_note(&self, component: &str, note: Option<String>) {
        if let Ok(mut n) = self.notes.lock() {
            match note {
                Some(text) => {
                    n.insert(component.to_string(), text);
                }
                None => {
                    n.remove(component);
                }
            }
        }
    }

    /// The notes, one `<component>: <note>` each.
    pub fn notes(&self) -> Vec<String> {
        self.notes
            .lock()
            .map(|n| n.iter().map(|(k, v)| format!("{k}: {v}")).collect())
            .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_metric_names_are_validated_and_capped() {
        assert!(valid_metric_name("rows_inserted"));
        assert!(valid_metric_name("_x9"));
        for bad in [
            "",
            "9x",
            "Rows",
            "a-b",
            "a b",
            "a\nfanout_healthy 1",
            "x\"}",
        ] {
            assert!(!valid_metric_name(bad), "{bad:?}");
        }
        assert!(!valid_metric_name(&"a".repeat(65)));
        let m = Metrics::default();
        for i in 0..MAX_PLUGIN_METRIC_NAMES {
            assert!(m.plugin_metric_name("p", &format!("n{i}")).is_ok());
        }
        assert!(
            m.plugin_metric_name("p", "n0").is_ok(),
            "a known name stays"
        );
        let first = m.plugin_metric_name("p", "one_more").unwrap_err();
        assert!(first.first);
        let again = m.plugin_metric_name("p", "two_more").unwrap_err();
        assert!(!again.first, "logged once");
        assert!(m.plugin_metric_name("other", "n0").is_ok(), "per plugin");
        let refused = "fanout_plugin_metrics_refused_total";
        assert_eq!(
            m.labelled(refused, "plugin=\"p\",reason=\"too_many_names\""),
            2.0
        );
    }
}
