//! device-counter: the exactly-once example of docs/plugin-authoring.md.
//!
//! Per event, `HINCRBY {key_prefix}{device} {event_type} 1`: how many events of each type
//! every device produced. `HINCRBY` is not idempotent, so the increments go through the SDK's
//! exactly-once primitive: a replayed batch (crash, rebalance, retry) or a backfill over the
//! live range counts nothing twice. Its bookkeeping lives under `once_key_prefix`.

use fanout_sdk::exactly_once::RedisOnce;
use fanout_sdk::{describe, export_sink, Batch, Host, Sink, WriteOutcome};
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
    type Config = Config;

    fn init(cfg: Config, _host: &impl Host) -> Result<Self, String> {
        Ok(DeviceCounter { cfg })
    }

    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let mut once = RedisOnce::new(&self.cfg.once_key_prefix);
        for e in batch.events.iter() {
            let device = e.device().unwrap_or("unknown");
            let field = e.event_type().unwrap_or("unknown");
            once.event(&e)
                .cmd("HINCRBY")
                .arg(format_args!("{}{device}", self.cfg.key_prefix))
                .arg(field)
                .arg(1);
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
        let mut sink = DeviceCounter::init(Config::default(), &host).unwrap();
        let mut events = vec![event(1, Some(7), 0), event(2, Some(7), 0)];
        events[0].device = Some("ios".into());
        events[0].event_type = Some("play".into());
        let b = batch(events);

        assert_eq!(sink.write(&host, &b), WriteOutcome::Accepted);
        assert_eq!(sink.write(&host, &b), WriteOutcome::Accepted); // the replay

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
