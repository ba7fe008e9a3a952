//! Plugin metrics, exported by the host on /metrics as
//! `fanout_plugin_counter_total{plugin="<plugin>",name="<name>"}` (counters) and
//! `fanout_plugin_gauge{plugin="<plugin>",name="<name>"}` (gauges), `plugin` being the name of
//! the plugin's `[[plugins]]` entry. Call them through [`Host::counter_add`](crate::Host::counter_add)
//! and [`Host::gauge_set`](crate::Host::gauge_set). No-ops in a native build.

/// The longest metric name the host records.
pub const MAX_NAME_LEN: usize = 64;

/// The most metric names one plugin may use (each is a series on /metrics).
pub const MAX_NAMES: usize = 100;

/// Whether the host records a metric of this name: `[a-z_][a-z0-9_]*`, at most
/// [`MAX_NAME_LEN`] bytes (the host's `valid_metric_name`, host/src/metrics.rs). Other names
/// are dropped and counted in `fanout_plugin_metrics_refused_total{plugin,reason}`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Adds `value` to the counter `name`.
pub(crate) fn counter_add(name: &str, value: u64) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::fanout::sink::metrics::counter_add(name, value)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (name, value);
    }
}

/// Sets the gauge `name` to `value`.
pub(crate) fn gauge_set(name: &str, value: f64) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::fanout::sink::metrics::gauge_set(name, value)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_hosts_rule() {
        for ok in ["rows_inserted", "_x9", "events"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "9x", "Rows", "rows-inserted", "a b", "x\"}"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&"a".repeat(64)));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
