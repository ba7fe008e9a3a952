//! Delivery: one batch to one plugin under that plugin's failure policy, with the batch's
//! dead letters. `deliver` returns Ok only when the plugin has durably taken the batch (or,
//! under best-effort, given up and dead-lettered its events) and every dead letter is
//! acknowledged by Kafka: the condition for the lane to commit past the batch.
//!
//! Retries depend on what failed: a plugin that cannot be instantiated or initialised is not
//! the batch's fault, so it is retried at the capped backoff under every policy and never
//! dead-letters the batch; a failed write (trap, timeout, retry-later) counts towards
//! `max_retries`, after which best-effort dead-letters and fail-fast keeps trying.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::batch::{Origin, ReadyBatch};
use crate::config::FailurePolicy;
use crate::deadletter::{DeadLetter, DeadLetterQueue, Stage};
use crate::metrics::{label, Metrics};
use crate::plugin::{Plugin, WriteOutcome};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("shut down while plugin `{0}` had not taken the batch")]
    Interrupted(String),
    #[error("dead-letter topic unreachable: {0}")]
    DeadLetter(String),
}

/// Hands batches to one plugin.
pub struct Delivery {
    pub plugin: Arc<Plugin>,
    pub dead_letters: Arc<DeadLetterQueue>,
    pub metrics: Metrics,
    /// Which version of the lane's plugin this is: 0 as started, +1 per swap (a reload).
    pub generation: u64,
    /// When the lane's plugin last took a batch, and which version did: shared by every
    /// version of the lane, so the first batch of a new version measures the swap gap.
    pub taken: Arc<TakenClock>,
}

/// The version that last took a batch of a lane, and when.
#[derive(Default)]
pub struct TakenClock(std::sync::Mutex<Option<(u64, Instant)>>);

impl TakenClock {
    /// Records a batch taken by `generation` now; when the previous batch was taken by an
    /// older version, returns the time between the two (the swap gap).
    pub fn record(&self, generation: u64) -> Option<Duration> {
        let now = Instant::now();
        let mut last = self.0.lock().ok()?;
        let previous = last.replace((generation, now));
        match previous {
            Some((older, at)) if older < generation => Some(now.duration_since(at)),
            _ => None,
        }
    }
}

/// The lane's current plugin version. The lane takes it once per batch, so a swap lands
/// between two batches: the batch in flight ends on the version it was handed to, the next
/// one goes to the new version, and commits go on in the same order on the same group.
pub struct PluginSlot {
    current: std::sync::RwLock<Arc<Delivery>>,
}

impl PluginSlot {
    pub fn new(delivery: Arc<Delivery>) -> Arc<PluginSlot> {
        Arc::new(PluginSlot {
            current: std::sync::RwLock::new(delivery),
        })
    }

    /// The version the next batch goes to.
    pub fn current(&self) -> Arc<Delivery> {
        match self.current.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `plugin` the version the next batch goes to; returns the replaced one's
    /// delivery (its plugin lives on until the batch in flight, if any, is done with it).
    pub fn swap(&self, plugin: Arc<Plugin>) -> Arc<Delivery> {
        let mut current = match self.current.write() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let next = Arc::new(Delivery {
            plugin,
            dead_letters: current.dead_letters.clone(),
            metrics: current.metrics.clone(),
            generation: current.generation + 1,
            taken: current.taken.clone(),
        });
        std::mem::replace(&mut *current, next)
    }
}

impl Delivery {
    /// Delivers a batch; Err means nothing may be committed past it.
    pub async fn deliver(
        &self,
        batch: &ReadyBatch,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        let started = Instant::now();
        if !batch.dead_letters.is_empty() {
            self.send_dead_letters(&batch.dead_letters, shutdown)
                .await?;
        }
        if batch.plugin_batch.is_empty() {
            return Ok(());
        }
        self.deliver_events(batch, shutdown.clone()).await?;
        self.timings()
            .delivery
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// This plugin's histograms (one map lookup per batch).
    pub fn timings(&self) -> crate::metrics::PluginTimings {
        self.metrics.histograms.plugin(self.plugin.name())
    }

    /// Records the age of a delivered batch's events, all taken now: now minus each one's
    /// commit time in the source (`committed_ms`). A few atomic adds per event.
    pub fn record_taken(&self, committed_ms: &[i64]) {
        let now = chrono::Utc::now().timestamp_millis();
        let ages = self.timings().event_age;
        for ms in committed_ms {
            ages.observe((now - ms).max(0) as f64 / 1000.0);
        }
    }

    fn health_key(&self) -> String {
        format!("plugin {}", self.plugin.name())
    }

    fn count_failure(&self, kind: &str) {
        self.metrics.add_labelled(
            "fanout_plugin_failures_total",
            &format!(
                "{},{}",
                label("plugin", self.plugin.name()),
                label("kind", kind)
            ),
            1.0,
        );
    }

    async fn deliver_events(
        &self,
        batch: &ReadyBatch,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        let plugin = &self.plugin;
        let cfg = &plugin.config;
        // Failed writes: they count towards max_retries.
        let mut attempt: u32 = 0;
        // Every pause so far, failed starts included: the backoff grows with it.
        let mut pauses: u32 = 0;
        let call_seconds = self.timings().call;
        loop {
            let call = Instant::now();
            let written = plugin.write(batch.plugin_batch.clone()).await;
            call_seconds.observe(call.elapsed().as_secs_f64());
            let failure = match written {
                Ok(WriteOutcome::Accepted) => {
                    self.delivered(batch.plugin_batch.len(), batch.plugin_batch.id());
                    return Ok(());
                }
                Ok(WriteOutcome::Rejected(rejections)) => {
                    match self.rejection_letters(batch, rejections) {
                        Ok(letters) => {
                            self.send_dead_letters(&letters, &shutdown).await?;
                            self.delivered(
                                batch.plugin_batch.len().saturating_sub(letters.len()),
                                batch.plugin_batch.id(),
                            );
                            return Ok(());
                        }
                        // Not an answer about this batch: a failed write (retried, then the
                        // failure policy), never a commit on the plugin's word.
                        Err(why) => {
                            self.count_failure("invalid_outcome");
                            attempt += 1;
                            why
                        }
                    }
                }
                Ok(WriteOutcome::RetryLater(reason)) => {
                    self.count_failure("retry_later");
                    attempt += 1;
                    clean(&reason)
                }
                Err(e) if e.is_setup() => {
                    // Not the batch's fault: never dead-letter it for this, under any policy.
                    self.count_failure(e.kind());
                    let reason = clean(&format!("cannot start: {e}"));
                    error!(plugin = plugin.name(), reason = %reason, "plugin cannot start; its lane waits");
                    self.metrics
                        .set_unhealthy(&self.health_key(), Some(reason.clone()));
                    self.pause(&mut pauses, &mut shutdown).await?;
                    continue;
                }
                Err(e) => {
                    self.count_failure(e.kind());
                    attempt += 1;
                    clean(&e.to_string())
                }
            };
            if attempt > cfg.max_retries && cfg.failure_policy == FailurePolicy::BestEffort {
                warn!(plugin = plugin.name(), batch = %batch.plugin_batch.id(), reason = %failure,
                      "best-effort: giving up on the batch, dead-lettering its events");
                let reason = format!("gave up after {attempt} attempts: {failure}");
                let letters: Vec<DeadLetter> = (0..batch.plugin_batch.len())
                    .map(|i| self.letter(batch, Some(i), i64::MIN, reason.clone()))
                    .collect();
                self.send_dead_letters(&letters, &shutdown).await?;
                self.metrics.set_unhealthy(&self.health_key(), None);
                return Ok(());
            }
            if attempt > cfg.max_retries {
                // Fail-fast: this lane waits for its plugin; keep trying at the capped backoff.
                error!(plugin = plugin.name(), batch = %batch.plugin_batch.id(), attempt, reason = %failure,
                       "fail-fast: plugin keeps failing; its lane waits and commits nothing");
                self.metrics
                    .set_unhealthy(&self.health_key(), Some(failure.clone()));
            } else {
                warn!(plugin = plugin.name(), batch = %batch.plugin_batch.id(), attempt, reason = %failure, "plugin failed; retrying");
            }
            self.metrics.add_labelled(
                "fanout_plugin_retries_total",
                &label("plugin", plugin.name()),
                1.0,
            );
            self.pause(&mut pauses, &mut shutdown).await?;
        }
    }

    /// Sleeps the backoff of the next pause (counted in `pauses`); Err when shutdown came
    /// first.
    async fn pause(
        &self,
        pauses: &mut u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        *pauses += 1;
        let cfg = &self.plugin.config;
        tokio::select! {
            _ = tokio::time::sleep(backoff(cfg.retry_backoff_ms, cfg.max_backoff_ms, *pauses)) => Ok(()),
            _ = shutdown.wait_for(|stop| *stop) => {
                Err(DeliveryError::Interrupted(self.plugin.name().to_string()))
            }
        }
    }

    fn delivered(&self, n: usize, batch_id: &str) {
        let plugin = self.plugin.name();
        self.metrics.add_labelled(
            "fanout_events_delivered_total",
            &label("plugin", plugin),
            n as f64,
        );
        // The batch id names the offsets: where `start` (earliest/latest) actually began.
        let first = !self.plugin.first_batch_taken();
        if first && self.generation == 0 {
            info!(lane = plugin, batch = %batch_id, events = n, "first batch delivered");
        }
        if let Some(gap) = self.taken.record(self.generation) {
            info!(lane = plugin, batch = %batch_id, events = n, sha256 = %self.plugin.sha256,
                  gap_ms = gap.as_secs_f64() * 1000.0,
                  "plugin swap: first batch taken by the new version; gap since the old version's last batch");
            self.metrics.set_labelled(
                "fanout_plugin_swap_gap_seconds",
                &label("plugin", plugin),
                gap.as_secs_f64(),
            );
        } else if first && self.generation > 0 {
            info!(lane = plugin, batch = %batch_id, events = n, sha256 = %self.plugin.sha256,
                  "plugin swap: first batch taken by the new version (the old one had taken none)");
        }
        self.metrics.set_unhealthy(&self.health_key(), None);
    }

    /// The dead letters of a `rejected` outcome, one per rejected event (a repeated id once);
    /// Err when it names an event that is not in the batch.
    fn rejection_letters(
        &self,
        batch: &ReadyBatch,
        rejections: Vec<crate::plugin::Rejection>,
    ) -> Result<Vec<DeadLetter>, String> {
        let events = batch
            .plugin_batch
            .events()
            .map_err(|e| format!("batch {} does not read back: {e}", batch.plugin_batch.id()))?;
        // event_id -> its first index in the batch.
        let mut in_batch = std::collections::HashMap::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            in_batch.entry(e.event_id()).or_insert(i);
        }
        let mut seen = std::collections::HashSet::new();
        let mut letters = Vec::new();
        for r in rejections {
            let Some(&index) = in_batch.get(&r.event_id) else {
                return Err(format!(
                    "the plugin rejected event {} which is not in batch {}",
                    r.event_id,
                    batch.plugin_batch.id()
                ));
            };
            if seen.insert(r.event_id) {
                letters.push(self.letter(batch, Some(index), r.event_id, clean(&r.reason)));
            }
        }
        Ok(letters)
    }

    /// The dead letter of the batch's `index`th event, with its original bytes; without them
    /// (no index), one naming `event_id`.
    fn letter(
        &self,
        batch: &ReadyBatch,
        index: Option<usize>,
        event_id: i64,
        reason: String,
    ) -> DeadLetter {
        let origin = index
            .and_then(|i| batch.events.origin(i))
            .unwrap_or_else(|| Origin {
                topic: Arc::from(""),
                partition: -1,
                offset: -1,
                key: None,
                payload: Some(format!("{{\"event_id\":{event_id}}}").into_bytes().into()),
            });
        DeadLetter {
            stage: Stage::Plugin,
            plugin: Some(self.plugin.name().to_string()),
            reason,
            origin,
        }
    }

    /// Dead letters must be durable before the batch is committed: retry until they are.
    async fn send_dead_letters(
        &self,
        letters: &[DeadLetter],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        let mut attempt = 0;
        loop {
            match self.dead_letters.send_all(letters).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    error!(error = %e, attempt, "dead-letter topic unreachable; retrying");
                    if *shutdown.borrow() {
                        return Err(DeliveryError::DeadLetter(e.to_string()));
                    }
                    tokio::time::sleep(backoff(500, 10_000, attempt)).await;
                }
            }
        }
    }
}

/// A plugin's text (reasons, errors) as the host logs and dead-letters it: bounded and with
/// control characters escaped, so it cannot forge log lines or swell letters.
fn clean(text: &str) -> String {
    crate::deadletter::escape_truncate(text, crate::deadletter::MAX_REASON_BYTES)
}

/// Exponential backoff with full jitter in [delay/2, delay].
pub fn backoff(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << attempt.min(20).saturating_sub(1));
    let capped = exp.min(max_ms).max(1);
    let jitter = jitter_fraction();
    Duration::from_millis(capped / 2 + (capped as f64 / 2.0 * jitter) as u64)
}

fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() % 10_000) as f64 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..30 {
            let d = backoff(200, 10_000, attempt).as_millis() as u64;
            let full = (200u64 << (attempt - 1).min(20)).min(10_000);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d} vs {full}"
            );
        }
    }
}
