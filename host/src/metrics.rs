//! Counters of everything the host does, rendered as Prometheus text on /metrics.
//!
//! Counters and gauges are plain atomics and a labelled map; the latency and age histograms
//! are [`BulkHistogram`]s in a `prometheus-client` registry, encoded by that crate.

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
/// and reason) live in a map; histograms in a `prometheus-client` registry.
#[derive(Default)]
pub struct MetricsInner {
    pub histograms: Histograms,
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

    /// The unhealthy components with their reasons.
    pub fn health_map(&self) -> BTreeMap<String, String> {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
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
        self.histograms.render_into(&mut out);
        out
    }

    /// Every labelled series of `name`: (labels as rendered, value).
    pub fn labelled_series(&self, name: &str) -> Vec<(String, f64)> {
        self.labelled
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| n == name)
                    .map(|((_, labels), v)| (labels.clone(), *v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The lanes' counters, by plugin.
    pub fn lanes(&self) -> Vec<(String, Arc<LaneMetrics>)> {
        self.lanes
            .lock()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Upper bounds (seconds) of the call and batch-delivery latency histograms.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds (seconds) of the event-age histogram: sub-second freshness up to an hour behind.
pub const AGE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A histogram that takes many observations of one value at once (the events of a batch,
/// all taken at the same moment), lock-free: a few atomic adds per batch, none per event.
/// Clones share their counts.
#[derive(Clone, Debug)]
pub struct BulkHistogram(Arc<BulkInner>);

#[derive(Debug)]
struct BulkInner {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is +Inf.
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    /// f64 bits.
    sum: AtomicU64,
}

/// What a histogram held at one moment: per-bucket counts (not cumulative, +Inf last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl HistogramSnapshot {
    /// The observations made between `earlier` and this snapshot.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            counts,
            count: self.count.saturating_sub(earlier.count),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// The `q` quantile, interpolated linearly inside its bucket (Prometheus's
    /// `histogram_quantile`); None without observations. Past the last bound: the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            if *c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let Some(&upper) = self.bounds.get(i) else {
                    return self.bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let within = (rank - seen as f64) / *c as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            seen += c;
        }
        self.bounds.last().copied()
    }
}

impl BulkHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        BulkHistogram(Arc::new(BulkInner {
            bounds,
            counts,
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, value: f64) {
        self.observe_n(value, 1);
    }

    /// `n` observations of `value`.
    pub fn observe_n(&self, value: f64, n: u64) {
        if n == 0 || !value.is_finite() {
            return;
        }
        let inner = &self.0;
        let i = inner.bounds.partition_point(|b| *b < value);
        inner.counts[i].fetch_add(n, Ordering::Relaxed);
        inner.count.fetch_add(n, Ordering::Relaxed);
        let add = value * n as f64;
        let _ = inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + add).to_bits())
            });
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let inner = &self.0;
        HistogramSnapshot {
            bounds: inner.bounds,
            counts: inner
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            count: inner.count.load(Ordering::Relaxed),
            sum: f64::from_bits(inner.sum.load(Ordering::Relaxed)),
        }
    }
}

impl prometheus_client::metrics::TypedMetric for BulkHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for BulkHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        // The encoder takes per-bucket counts and makes them cumulative; f64::MAX is +Inf.
        let buckets: Vec<(f64, u64)> = s
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(s.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            s.sum, s.count, &buckets, None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

type PluginLabels = Vec<(String, String)>;
type HistogramFamily =
    prometheus_client::metrics::family::Family<PluginLabels, BulkHistogram, fn() -> BulkHistogram>;

/// The three histograms of one plugin.
#[derive(Clone)]
pub struct PluginTimings {
    /// One `write` call: the plugin's own time, from the call to its answer.
    pub call: BulkHistogram,
    /// One batch, from its hand-over to the plugin until it is durably taken (retries and the
    /// batch's dead letters included).
    pub delivery: BulkHistogram,
    /// Per event, when the plugin took it: now minus the event's source timestamp.
    pub event_age: BulkHistogram,
}

/// The histogram families, registered with `prometheus-client` (which renders them).
pub struct Histograms {
    registry: prometheus_client::registry::Registry,
    call: HistogramFamily,
    delivery: HistogramFamily,
    event_age: HistogramFamily,
    /// Handles by plugin: one lookup per batch, no label set built.
    by_plugin: Mutex<BTreeMap<String, PluginTimings>>,
}

fn latency_histogram() -> BulkHistogram {
    BulkHistogram::new(LATENCY_BUCKETS)
}

fn age_histogram() -> BulkHistogram {
    BulkHistogram::new(AGE_BUCKETS)
}

impl Default for Histograms {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let call = HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        let delivery = HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        let event_age = HistogramFamily::new_with_constructor(age_histogram as fn() -> _);
        registry.register(
            "fanout_plugin_call_seconds",
            "Duration of one write call of the plugin",
            call.clone(),
        );
        registry.register(
            "fanout_batch_delivery_seconds",
            "From a batch's hand-over to the plugin until it is durably taken, retries included",
            delivery.clone(),
        );
        registry.register(
            "fanout_event_age_seconds",
            "Age of each event when the plugin took it: now minus its source timestamp",
            event_age.clone(),
        );
        Histograms {
            registry,
            call,
            delivery,
            event_age,
            by_plugin: Mutex::default(),
        }
    }
}

impl Histograms {
    /// The histograms of `plugin`, created on first use.
    pub fn plugin(&self, plugin: &str) -> PluginTimings {
        let make = || {
            let labels = vec![("plugin".to_string(), plugin.to_string())];
            PluginTimings {
                call: self.call.get_or_create_owned(&labels),
                delivery: self.delivery.get_or_create_owned(&labels),
                event_age: self.event_age.get_or_create_owned(&labels),
            }
        };
        match self.by_plugin.lock() {
            Ok(mut m) => m.entry(plugin.to_string()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    /// The plugins that have histograms, with them.
    pub fn all(&self) -> Vec<(String, PluginTimings)> {
        self.by_plugin
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The families in the text format, without OpenMetrics' closing `# EOF` (the rest of
    /// /metrics follows the Prometheus 0.0.4 text format, which has none).
    fn render_into(&self, out: &mut String) {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_ok() {
            for line in text.lines().filter(|l| *l != "# EOF") {
                out.push_str(line);
                out.push('\n');
            }
        }
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

    #[test]
    fn bulk_histograms_render_and_give_quantiles() {
        let m = Metrics::default();
        let t = m.histograms.plugin("p");
        t.event_age.observe_n(0.3, 90);
        t.event_age.observe_n(20.0, 10);
        t.call.observe(0.002);
        let text = m.render();
        // Built with format!: a literal series name here would read as one more exported
        // metric to docs_match_code.
        let (age, call) = ("fanout_event_age_seconds", "fanout_plugin_call_seconds");
        assert!(text.contains(&format!("# TYPE {age} histogram")), "{text}");
        assert!(
            text.contains(&format!("{age}_bucket{{le=\"0.5\",plugin=\"p\"}} 90"))
                || text.contains(&format!("{age}_bucket{{plugin=\"p\",le=\"0.5\"}} 90")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{age}_count{{plugin=\"p\"}} 100")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{call}_count{{plugin=\"p\"}} 1")),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        let before = HistogramSnapshot {
            bounds: AGE_BUCKETS,
            counts: vec![0; AGE_BUCKETS.len() + 1],
            ..Default::default()
        };
        let s = t.event_age.snapshot().since(&before);
        let p50 = s.quantile(0.5).unwrap();
        assert!((0.25..=0.5).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((10.0..=30.0).contains(&p99), "{p99}");
        assert_eq!(s.since(&s).quantile(0.5), None);
    }
}
