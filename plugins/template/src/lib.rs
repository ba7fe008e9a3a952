//! Template sink plugin: copy this folder to start your own.
//!
//!   cp -r plugins/template plugins/my-sink
//!   sed -i 's/^name = "template"/name = "my-sink"/' plugins/my-sink/Cargo.toml
//!   scripts/build-plugins            # -> plugins/dist/my_sink.wasm (every plugins/* crate)
//!
//! A plugin is one type that implements `fanout_sdk::Sink`, exported with `export_sink!`.
//! The host creates one instance per plugin, parses the `[plugins.config]` table into
//! `Sink::Config`, calls `init` once with it, then `write` for every batch, one at a time.

use fanout_sdk::serde::Deserialize;
use fanout_sdk::{export_sink, Batch, Host, Level, Sink, WriteOutcome};

/// `[plugins.config]` of the plugin. A key that is misspelt or of the wrong type stops the
/// plugin with an error naming it (`config: label: invalid type: integer ...`).
#[derive(Debug, Clone, Deserialize)]
// `crate = ...`: the SDK's serde, so this crate needs no serde dependency of its own.
#[serde(crate = "fanout_sdk::serde", default, deny_unknown_fields)]
pub struct Config {
    /// Shown in the log line of every batch.
    pub label: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            label: "template".into(),
        }
    }
}

/// The plugin's state. It lives as long as the instance, so it can count, cache, or remember
/// that a schema was created. It is NOT durable: after a crash or a trap the host builds a
/// new instance and calls `init` again.
pub struct Template {
    cfg: Config,
    /// Batches seen by this instance (just to show state across batches).
    batches: u64,
}

impl Sink for Template {
    type Config = Config;

    fn init(cfg: Config, _host: &impl Host) -> Result<Self, String> {
        // Return Err for a config the plugin cannot run with: the host refuses to start it
        // and shows the message. Do not call services here unless you must (they may be down).
        if cfg.label.is_empty() {
            return Err("config: label must not be empty".into());
        }
        Ok(Template { cfg, batches: 0 })
    }

    // `host` is the real host in the component and a recorder (fanout_sdk::testing::MockHost)
    // in unit tests, which call this same method.
    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        self.batches += 1;
        // Logs go to the host's tracing output, tagged with the plugin name.
        host.log(
            Level::Info,
            &format!(
                "{}: batch {} with {} events (batch #{} of this instance)",
                self.cfg.label,
                batch.id,
                batch.events.len(),
                self.batches
            ),
        );
        // Metrics appear on the host's /metrics as fanout_plugin_counter_total{plugin,name}
        // (counters) and fanout_plugin_gauge{plugin,name} (gauges); names are [a-z_][a-z0-9_]*.
        host.counter_add("events", batch.events.len() as u64);
        host.counter_add("batches", 1);

        // A real sink writes here, idempotently by event_id (the host replays batches after
        // retries and crashes), e.g.:
        //   let row = fanout_sdk::event_json_string(e);               // SPEC-4 JSON of an event
        //   host.redis().cmd("SET").arg(format_args!("my:{}", e.event_id())).arg(row).send()
        //   host.clickhouse_insert_json_rows("db", "table", &rows)
        //   fanout_sdk::http::post_json(host, url, &row, &[("Idempotency-Key", &key)], 5000)
        // and answers:
        //   Accepted            every event is durable
        //   RetryLater(reason)  a transient failure: the host retries the whole batch
        //   Rejected(list)      these events can never be written: dead-letter them
        WriteOutcome::Accepted
    }
}

// Exports `Template` as the component's `fanout:sink/packed-sink` interface. Once per crate.
export_sink!(Template);

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_sdk::testing::{batch, event, MockHost};

    #[test]
    fn counts_events() {
        let host = MockHost::new();
        let cfg = fanout_sdk::config::parse(r#"{"label": "t"}"#).unwrap();
        let mut sink = Template::init(cfg, &host).unwrap();
        let b = batch(vec![event(1, Some(1), 0), event(2, None, 0)]);
        assert_eq!(sink.write(&host, &b), WriteOutcome::Accepted);
        assert_eq!(host.counter("events"), 2);
        assert_eq!(host.counter("batches"), 1);
    }

    #[test]
    fn bad_config_is_refused_naming_the_field() {
        let e = fanout_sdk::config::parse::<Config>(r#"{"label": 3}"#).unwrap_err();
        assert!(e.starts_with("config: label: invalid type"), "{e}");
        let e = fanout_sdk::config::parse::<Config>(r#"{"lable": "x"}"#).unwrap_err();
        assert!(e.contains("unknown field `lable`"), "{e}");
        let empty = Config {
            label: String::new(),
        };
        assert!(Template::init(empty, &MockHost::new()).is_err());
    }
}
