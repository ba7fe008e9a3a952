//! Host metrics, exported by the host as `fanout_plugin_counter_total{plugin,name}`
//! (counters) and `fanout_plugin_gauge{plugin,name}` (gauges).
//! No-ops in a native build.

/// Adds `value` to the counter `name`.
pub fn counter_add(name: &str, value: u64) {
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
pub fn gauge_set(name: &str, value: f64) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::fanout::sink::metrics::gauge_set(name, value)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (name, value);
    }
}
