//! device-counter: the exactly-once example of docs/plugin-authoring.md.
//!
//! Per event, `HINCRBY {key_prefix}{device} {event_type} 1`: how many events of each type
//! every device produced. `HINCRBY` is not idempotent, so the increments go through the SDK's
//! exactly-once primitive: a replayed batch (crash, rebalance, retry) or a backfill over the
//! live range counts nothing twice. Its bookkeeping lives under `once_key_prefix`.

use fanout_sdk::exactly_once::RedisOnce;
use fanout_sdk::redis::Cmd;
use fanout_sdk::{describe, export_sink, Batch, Host, Sink, WasmHost, WriteOutcome};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Counts: `{key_prefix}{device}`, a hash of event type -> events.
    pub key_prefix: String,
    /// The primitive's bookkeeping (granted too, one per plugin).
    pub once_key_prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            key_prefix: "devcount:".into(),
            once_key_prefix: "devcount-once:".into(),
        }
    }
}

pub struct DeviceCounter {
    cfg: Config,
}

impl Sink for DeviceCounter {
    fn init(config: fanout_sdk::serde_json::Value) -> Result<Self, String> {
        let cfg = fanout_sdk::serde_json::from_value(config).map_err(|e| e.to_string())?;
        Ok(DeviceCounter { cfg })
    }

    fn write(&mut self, batch: &Batch) -> WriteOutcome {
        self.write_with(&WasmHost, batch)
    }
}

impl DeviceCounter {
    pub fn write_with(&self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let mut once = RedisOnce::new(&self.cfg.once_key_prefix);
        for e in batch.events.iter() {
            let key = format!("{}{}", self.cfg.key_prefix, e.device().unwrap_or("unknown"));
            let field = e.event_type().unwrap_or("unknown");
            once.event(
                &e,
                vec![Cmd::new("HINCRBY")
                    .arg(key)
                    .arg(field)
                    .arg(1i64)
                    .into_command()],
            );
        }
        match once.apply(host) {
            Ok(applied) => {
                host.counter_add("events_counted", applied.applied() as u64);
                host.counter_add("events_skipped", applied.skipped() as u64);
                WriteOutcome::Accepted
            }
            Err(e) => WriteOutcome::RetryLater(describe(&e)),
        }
    }
}

export_sink!(DeviceCounter);

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_sdk::testing::{batch, event, MockHost};

    #[test]
    fn a_replayed_batch_counts_once() {
        let host = MockHost::new();
        let sink = DeviceCounter {
            cfg: Config::default(),
        };
        let mut events = vec![event(1, Some(7), 0), event(2, Some(7), 0)];
        events[0].device = Some("ios".into());
        events[0].event_type = Some("play".into());
        let b = batch(events);

        assert_eq!(sink.write_with(&host, &b), WriteOutcome::Accepted);
        assert_eq!(sink.write_with(&host, &b), WriteOutcome::Accepted); // the replay

        assert_eq!(
            host.redis_once_commands(),
            vec![
                vec!["HINCRBY", "devcount:ios", "play", "1"],
                vec!["HINCRBY", "devcount:unknown", "unknown", "1"],
            ]
        );
        assert_eq!(host.counter("events_counted"), 2);
        assert_eq!(host.counter("events_skipped"), 2);
    }
}
