//! Template sink plugin: copy this folder to start your own.
//!
//!   cp -r plugins/template plugins/my-sink
//!   # rename the package in plugins/my-sink/Cargo.toml, add "my-sink" to plugins/Cargo.toml
//!   scripts/build-plugins            # -> plugins/dist/my_sink.wasm
//!
//! A plugin is one type that implements `fanout_sdk::Sink`, exported with `export_sink!`.
//! The host creates one instance per plugin, calls `init` once with the `[plugins.config]`
//! table (as JSON), then `write` for every batch, one batch at a time.

use fanout_sdk::serde_json;
use fanout_sdk::{export_sink, Batch, Host, Sink, WasmHost, WriteOutcome};

/// The plugin's state. It lives as long as the instance, so it can count, cache, or remember
/// that a schema was created. It is NOT durable: after a crash or a trap the host builds a
/// new instance and calls `init` again.
pub struct Template {
    /// Config value `label`: shows how to read config with a default.
    label: String,
    /// Batches seen by this instance (just to show state across batches).
    batches: u64,
}

impl Sink for Template {
    fn init(config: serde_json::Value) -> Result<Self, String> {
        // Config comes from `[plugins.config]` in the host config. Return Err for bad config:
        // the host refuses to start the plugin and shows the message.
        let label = match config.get("label") {
            None => "template".to_string(),
            Some(v) => v
                .as_str()
                .ok_or("config `label` must be a string")?
                .to_string(),
        };
        Ok(Template { label, batches: 0 })
    }

    fn write(&mut self, batch: &Batch) -> WriteOutcome {
        // Keep the logic in a function over `&impl Host`: the real host here, a recorder
        // (fanout_sdk::testing::MockHost) in unit tests.
        self.write_with(&WasmHost, batch)
    }
}

impl Template {
    fn write_with(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        self.batches += 1;
        // Logs go to the host's tracing output, tagged with the plugin name.
        host.log(
            fanout_sdk::Level::Info,
            &format!(
                "{}: batch {} with {} events (batch #{} of this instance)",
                self.label,
                batch.id,
                batch.events.len(),
                self.batches
            ),
        );
        // Metrics appear on the host's /metrics as fanout_plugin_counter_total{plugin,name}
        // (counters) and fanout_plugin_gauge{plugin,name} (gauges).
        host.counter_add("events", batch.events.len() as u64);
        host.counter_add("batches", 1);

        // A real sink writes here, idempotently by event_id (the host replays batches after
        // retries and crashes), e.g.:
        //   let row = fanout_sdk::event_json_string(event);        // SPEC-4 JSON of an event
        //   fanout_sdk::redis::pipeline_on(host, &[&["SET", &key, &row]], false)
        //   host.clickhouse_insert_json_rows("db", "table", &rows)
        //   fanout_sdk::http::post_json_on(host, url, &row, &[("Idempotency-Key", &key)], 5000)
        // and answers:
        //   Accepted            every event is durable
        //   RetryLater(reason)  a transient failure: the host retries the whole batch
        //   Rejected(list)      these events can never be written: dead-letter them
        WriteOutcome::Accepted
    }
}

// Exports `Template` as the component's `fanout:sink/sink` interface. Exactly once per crate.
export_sink!(Template);

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_sdk::testing::{batch, event, MockHost};

    #[test]
    fn counts_events() {
        let host = MockHost::new();
        let mut sink = Template::init(serde_json::json!({"label": "t"})).unwrap();
        let b = batch(vec![event(1, Some(1), 0), event(2, None, 0)]);
        assert!(matches!(sink.write_with(&host, &b), WriteOutcome::Accepted));
        assert_eq!(host.counter("events"), 2);
        assert_eq!(host.counter("batches"), 1);
        assert!(Template::init(serde_json::json!({"label": 3})).is_err());
    }
}
