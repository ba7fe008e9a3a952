//! Glue between the generated `Guest` trait and [`Sink`](crate::Sink): used by
//! [`export_sink!`](crate::export_sink) only.

use std::cell::RefCell;
use std::thread::LocalKey;

use crate::bindings::fanout::sink::types::PackedBatch;
use crate::{Batch, PackedEvents, Sink, WriteOutcome};

/// Parses the config and stores a fresh plugin value, replacing any previous one.
pub fn init<S: Sink>(
    state: &'static LocalKey<RefCell<Option<S>>>,
    config: &str,
) -> Result<(), String> {
    let config = parse_config(config)?;
    let sink = S::init(config)?;
    state.with(|cell| *cell.borrow_mut() = Some(sink));
    Ok(())
}

/// Checks the packed events once and hands the batch to the stored plugin value.
pub fn write<S: Sink>(
    state: &'static LocalKey<RefCell<Option<S>>>,
    batch: PackedBatch,
) -> WriteOutcome {
    let events = match PackedEvents::new(batch.events) {
        Ok(events) => events,
        // A host bug, never the data's fault: nothing is written, the host retries.
        Err(e) => return WriteOutcome::RetryLater(e.to_string()),
    };
    let batch = Batch {
        id: batch.id,
        events,
        sources: batch.sources,
    };
    state.with(|cell| match cell.borrow_mut().as_mut() {
        Some(sink) => sink.write(&batch),
        None => WriteOutcome::RetryLater(
            "plugin was not initialised: init was not called or failed".into(),
        ),
    })
}

/// The host passes the `[plugins.config]` table as JSON; blank means "no config".
pub fn parse_config(config: &str) -> Result<serde_json::Value, String> {
    if config.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_str(config).map_err(|e| format!("plugin config is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_config_is_empty_object() {
        assert_eq!(parse_config("  ").unwrap(), serde_json::json!({}));
        assert_eq!(
            parse_config(r#"{"a":1}"#).unwrap(),
            serde_json::json!({"a": 1})
        );
        assert!(parse_config("{").is_err());
    }
}
