//! A sink plugin of the `sink-plugin` world, where every event crosses the boundary as a
//! record (the only world before 0.1.2). The host keeps serving it; this plugin proves it
//! (tests/tests/plugin_dropin.rs) and is the records baseline of the boundary benchmark.
//!
//! Config: `{"mode": "noop" | "read-all" | "record", "key": "<redis key>"}`:
//! - `noop` takes the batch and does nothing;
//! - `read-all` reads every field of every event (what any real sink does at least once);
//! - `record` adds `event_id:content_type:engagement_pct` of each event to the Redis set `key`.

use std::cell::RefCell;

wit_bindgen::generate!({
    world: "sink-plugin",
    path: "../../wit",
});

use exports::fanout::sink::sink::Guest;
use fanout::sink::redis;
use fanout::sink::types::{Batch, WriteOutcome};

struct Config {
    mode: String,
    key: String,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

struct CompatRecords;

impl Guest for CompatRecords {
    fn init(config: String) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let text = |k: &str| v.get(k).and_then(|m| m.as_str()).unwrap_or("").to_string();
        let mode = match text("mode").as_str() {
            "" => "noop".to_string(),
            m @ ("noop" | "read-all" | "record") => m.to_string(),
            other => return Err(format!("unknown mode {other:?}")),
        };
        CONFIG.with(|c| {
            *c.borrow_mut() = Some(Config {
                mode,
                key: text("key"),
            })
        });
        Ok(())
    }

    fn write(batch: Batch) -> WriteOutcome {
        CONFIG.with(|c| {
            let c = c.borrow();
            let Some(cfg) = c.as_ref() else {
                return WriteOutcome::RetryLater("not initialised".into());
            };
            match cfg.mode.as_str() {
                "read-all" => {
                    let mut sum = 0i64;
                    for e in &batch.events {
                        sum = sum
                            .wrapping_add(e.event_id)
                            .wrapping_add(e.content_id.unwrap_or(0))
                            .wrapping_add(e.user_id.unwrap_or(0))
                            .wrapping_add(e.event_ts_micros)
                            .wrapping_add(e.duration_ms.unwrap_or(0).into())
                            .wrapping_add(e.length_seconds.unwrap_or(0).into())
                            .wrapping_add(e.event_type.as_ref().map_or(0, |s| s.len() as i64))
                            .wrapping_add(e.device.as_ref().map_or(0, |s| s.len() as i64))
                            .wrapping_add(e.content_type.as_ref().map_or(0, |s| s.len() as i64))
                            .wrapping_add(e.engagement_seconds.unwrap_or(0.0) as i64)
                            .wrapping_add(e.engagement_pct.unwrap_or(0.0) as i64);
                    }
                    std::hint::black_box(sum);
                    WriteOutcome::Accepted
                }
                "record" => {
                    let mut cmd: Vec<Vec<u8>> = vec![b"SADD".to_vec(), cfg.key.as_bytes().to_vec()];
                    for e in &batch.events {
                        cmd.push(
                            format!(
                                "{}:{}:{}",
                                e.event_id,
                                e.content_type.as_deref().unwrap_or("-"),
                                e.engagement_pct
                                    .map_or("-".to_string(), |p| format!("{p:.2}"))
                            )
                            .into_bytes(),
                        );
                    }
                    if batch.events.is_empty() {
                        return WriteOutcome::Accepted;
                    }
                    match redis::pipeline(&[cmd], false) {
                        Ok(_) => WriteOutcome::Accepted,
                        Err(e) => WriteOutcome::RetryLater(format!("{e:?}")),
                    }
                }
                _ => WriteOutcome::Accepted,
            }
        })
    }
}

export!(CompatRecords);
