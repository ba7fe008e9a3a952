//! Fan-out: one batch to every plugin concurrently, each with its own failure policy, and the
//! batch's dead letters to the dead-letter topic. `deliver` returns only when every plugin has
//! durably taken the batch (or, under best-effort, given up and dead-lettered), which is the
//! condition for committing past it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, warn};

use crate::batch::ReadyBatch;
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

pub struct Fanout {
    pub plugins: Vec<Arc<Plugin>>,
    pub dead_letters: Arc<DeadLetterQueue>,
    pub metrics: Metrics,
}

impl Fanout {
    /// Delivers a batch everywhere; Err means nothing may be committed past it.
    pub async fn deliver(
        &self,
        batch: &ReadyBatch,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        if !batch.dead_letters.is_empty() {
            self.send_dead_letters(&batch.dead_letters, shutdown)
                .await?;
        }
        if batch.wit.events.is_empty() {
            return Ok(());
        }
        let runs = self
            .plugins
            .iter()
            .map(|p| self.deliver_to(p, batch, shutdown.clone()));
        let results = futures::future::join_all(runs).await;
        for r in results {
            r?;
        }
        self.metrics.batches_delivered.inc();
        Ok(())
    }

    async fn deliver_to(
        &self,
        plugin: &Arc<Plugin>,
        batch: &ReadyBatch,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), DeliveryError> {
        let cfg = &plugin.config;
        let plugin_label = label("plugin", plugin.name());
        let mut attempt: u32 = 0;
        loop {
            let failure = match plugin.write(batch.wit.clone()).await {
                Ok(WriteOutcome::Accepted) => {
                    self.delivered(plugin, batch.wit.events.len());
                    return Ok(());
                }
                Ok(WriteOutcome::Rejected(rejections)) => {
                    let letters: Vec<DeadLetter> = rejections
                        .iter()
                        .map(|r| self.letter(batch, r.event_id, plugin.name(), r.reason.clone()))
                        .collect();
                    self.send_dead_letters(&letters, &shutdown).await?;
                    self.delivered(plugin, batch.wit.events.len().saturating_sub(letters.len()));
                    return Ok(());
                }
                Ok(WriteOutcome::RetryLater(reason)) => {
                    self.metrics.add_labelled(
                        "fanout_plugin_failures_total",
                        &format!("{plugin_label},{}", label("kind", "retry_later")),
                        1.0,
                    );
                    reason
                }
                Err(e) => {
                    self.metrics.add_labelled(
                        "fanout_plugin_failures_total",
                        &format!("{plugin_label},{}", label("kind", e.kind())),
                        1.0,
                    );
                    e.to_string()
                }
            };
            attempt += 1;
            if attempt > cfg.max_retries && cfg.failure_policy == FailurePolicy::BestEffort {
                warn!(plugin = plugin.name(), batch = %batch.wit.id, reason = %failure,
                      "best-effort: giving up on the batch, dead-lettering its events");
                let letters: Vec<DeadLetter> = batch
                    .wit
                    .events
                    .iter()
                    .map(|e| {
                        self.letter(
                            batch,
                            e.event_id,
                            plugin.name(),
                            format!("gave up after {} attempts: {failure}", attempt),
                        )
                    })
                    .collect();
                self.send_dead_letters(&letters, &shutdown).await?;
                self.metrics
                    .set_unhealthy(&format!("plugin {}", plugin.name()), None);
                return Ok(());
            }
            if attempt > cfg.max_retries {
                // Fail-fast: the stream waits for this plugin; keep trying at the capped backoff.
                error!(plugin = plugin.name(), batch = %batch.wit.id, attempt, reason = %failure,
                       "fail-fast: plugin keeps failing; the stream waits and nothing is committed");
                self.metrics
                    .set_unhealthy(&format!("plugin {}", plugin.name()), Some(failure.clone()));
            } else {
                warn!(plugin = plugin.name(), batch = %batch.wit.id, attempt, reason = %failure, "plugin failed; retrying");
            }
            self.metrics
                .add_labelled("fanout_plugin_retries_total", &plugin_label, 1.0);
            let pause = backoff(cfg.retry_backoff_ms, cfg.max_backoff_ms, attempt);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|stop| *stop) => {
                    return Err(DeliveryError::Interrupted(plugin.name().to_string()));
                }
            }
        }
    }

    fn delivered(&self, plugin: &Plugin, n: usize) {
        self.metrics.add_labelled(
            "fanout_events_delivered_total",
            &label("plugin", plugin.name()),
            n as f64,
        );
        self.metrics
            .set_unhealthy(&format!("plugin {}", plugin.name()), None);
    }

    fn letter(
        &self,
        batch: &ReadyBatch,
        event_id: i64,
        plugin: &str,
        reason: String,
    ) -> DeadLetter {
        let origin =
            batch
                .origins
                .get(&event_id)
                .cloned()
                .unwrap_or_else(|| crate::batch::Origin {
                    topic: String::new(),
                    partition: -1,
                    offset: -1,
                    key: None,
                    payload: Some(format!("{{\"event_id\":{event_id}}}").into_bytes()),
                });
        DeadLetter {
            stage: Stage::Plugin,
            plugin: Some(plugin.to_string()),
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
