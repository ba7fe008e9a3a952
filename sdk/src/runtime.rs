//! Glue between the generated `Guest` trait and [`Sink`](crate::Sink): used by
//! [`export_sink!`](crate::export_sink) only.

use std::cell::RefCell;
use std::thread::LocalKey;

use crate::bindings::fanout::sink::types::PackedBatch;
use crate::{Batch, PackedEvents, Sink, WasmHost, WriteOutcome};

/// Parses the config and stores a fresh plugin value, replacing any previous one.
pub fn init<S: Sink>(
    state: &'static LocalKey<RefCell<Option<S>>>,
    config: &str,
) -> Result<(), String> {
    let config = crate::config::parse::<S::Config>(config)?;
    let sink = S::init(config, &WasmHost)?;
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
        Some(sink) => sink.write(&WasmHost, &batch),
        None => WriteOutcome::RetryLater(
            "plugin was not initialised: init was not called or failed".into(),
        ),
    })
}
