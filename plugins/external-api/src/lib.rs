//! external-api: POSTs enriched events to an HTTP API the team does not control (SPEC 5C).
//!
//! - `mode = "per-event"` (default): one `POST {url}` per event, body = the SPEC-4 JSON
//!   object, header `Idempotency-Key: event-<event_id>`. Failures are per event, so
//!   best-effort dead-letters exactly the events that failed.
//! - `mode = "batch"`: one POST per batch, body = JSON array of the records,
//!   `Idempotency-Key: batch-<16 hex>` (FNV-1a of the sorted, distinct event ids: the same
//!   events give the same key on every replay).
//!
//! Retries: connection errors and timeouts (`failed`), 408, 425, 429 and 5xx, up to
//! `max_retries` times after the first attempt, sleeping
//! `min(max_backoff, base * 2^n)` with "equal jitter" (half fixed, half random from a
//! xorshift PRNG seeded by the event id), or `Retry-After` seconds when the answer has it
//! (capped by `max_backoff_ms`). Other statuses (400, 404, 422, ...) are final: the event is
//! rejected (dead-lettered) under both policies, since no retry can fix it. A batch never
//! spends more than `batch_budget_ms` sleeping and sending: past that no new attempt starts.
//!
//! After the retries: `fail-fast` answers `retry-later` for the whole batch (the host retries
//! it and the stream waits; events already delivered are resent with the same idempotency
//! key); `best-effort` answers `rejected` with the reason of each undelivered event (the host
//! dead-letters them and goes on).

use fanout_sdk::http::{header, json_post_request, Response};
use fanout_sdk::{
    describe, event_json_string, export_sink, Batch, CapabilityError, EnrichedEvent, Host, Level,
    Rejection, Sink, WasmHost, WriteOutcome,
};
use serde::Deserialize;

/// What happens when an event still fails after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The whole batch is retried later; the stream waits.
    FailFast,
    /// The event is dead-lettered; the stream goes on.
    BestEffort,
}

/// One request per event, or one per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    PerEvent,
    Batch,
}

/// `[plugins.config]` of the plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub url: String,
    pub mode: Mode,
    pub policy: Policy,
    pub max_retries: u32,
    pub base_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub timeout_ms: u32,
    /// Time one batch may spend on attempts and sleeps before giving up on what is left.
    pub batch_budget_ms: u64,
    /// Extra headers sent with every request (e.g. an API key).
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: "http://127.0.0.1:58080/events".into(),
            mode: Mode::PerEvent,
            policy: Policy::FailFast,
            max_retries: 5,
            base_backoff_ms: 200,
            max_backoff_ms: 10_000,
            timeout_ms: 5_000,
            batch_budget_ms: 120_000,
            headers: Default::default(),
        }
    }
}

impl Config {
    pub fn from_json(config: serde_json::Value) -> Result<Self, String> {
        let cfg: Config =
            serde_json::from_value(config).map_err(|e| format!("external-api config: {e}"))?;
        if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
            return Err(format!(
                "external-api config: url {:?} is not http(s)",
                cfg.url
            ));
        }
        if cfg.max_backoff_ms < cfg.base_backoff_ms {
            return Err("external-api config: max_backoff_ms < base_backoff_ms".into());
        }
        Ok(cfg)
    }
}

/// A small, fast PRNG (xorshift64*), enough for jitter.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from an event id (or a batch key hash), mixed so that close ids diverge.
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Jitter((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Milliseconds to wait before retry number `retry` (0 = the first retry).
/// `Retry-After` (seconds) wins when present, capped by `max_ms`; otherwise
/// exponential `base_ms * 2^retry` capped by `max_ms`, with equal jitter: half of it
/// fixed, the other half random.
pub fn backoff_ms(
    retry: u32,
    base_ms: u64,
    max_ms: u64,
    retry_after_secs: Option<u64>,
    jitter: &mut Jitter,
) -> u64 {
    if let Some(secs) = retry_after_secs {
        return secs.saturating_mul(1000).min(max_ms);
    }
    let exp = base_ms
        .saturating_mul(1u64.checked_shl(retry.min(62)).unwrap_or(u64::MAX))
        .min(max_ms);
    let half = exp / 2;
    half + jitter.next_u64() % (exp - half + 1)
}

/// `Retry-After` as whole seconds (the HTTP-date form is ignored: exponential backoff then).
pub fn retry_after_secs(response: &Response) -> Option<u64> {
    header(response, "retry-after")?.trim().parse().ok()
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Worth retrying; `retry_after` from the answer if any.
    Retriable {
        reason: String,
        retry_after: Option<u64>,
    },
    /// No retry can help (4xx, or the capability is not granted).
    Final {
        reason: String,
        not_granted: bool,
    },
}

pub fn classify(result: &Result<Response, CapabilityError>) -> Attempt {
    match result {
        Ok(r) if (200..300).contains(&r.status) => Attempt::Delivered,
        Ok(r) if matches!(r.status, 408 | 425 | 429) || r.status >= 500 => Attempt::Retriable {
            reason: format!("HTTP {}{}", r.status, body_snippet(r)),
            retry_after: retry_after_secs(r),
        },
        Ok(r) => Attempt::Final {
            reason: format!("HTTP {} (not retriable){}", r.status, body_snippet(r)),
            not_granted: false,
        },
        Err(CapabilityError::Failed(m)) => Attempt::Retriable {
            reason: format!("no response: {m}"),
            retry_after: None,
        },
        Err(e @ CapabilityError::NotGranted(_)) => Attempt::Final {
            reason: describe(e),
            not_granted: true,
        },
    }
}

fn body_snippet(r: &Response) -> String {
    let text = String::from_utf8_lossy(&r.body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut: String = text.chars().take(200).collect();
    format!(": {cut}")
}

/// FNV-1a 64 of the sorted, distinct ids: the idempotency key of a batch request.
pub fn batch_key(events: &[&EnrichedEvent]) -> String {
    let mut ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("batch-{h:016x}")
}

/// The outcome of delivering one request with its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Failed {
        reason: String,
        final_answer: bool,
        not_granted: bool,
        /// Gave up because the batch's retry budget is spent: later events are not tried.
        out_of_budget: bool,
    },
}

/// The plugin.
pub struct ExternalApi {
    cfg: Config,
}

impl ExternalApi {
    pub fn new(cfg: Config) -> Self {
        ExternalApi { cfg }
    }

    /// Sends one request (body + idempotency key) with retries, within `deadline_micros`.
    pub fn deliver(
        &self,
        host: &impl Host,
        body: &str,
        key: &str,
        seed: u64,
        deadline_micros: i64,
    ) -> Delivery {
        let mut jitter = Jitter::new(seed);
        let mut headers: Vec<(&str, &str)> = vec![("Idempotency-Key", key)];
        headers.extend(
            self.cfg
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let request = json_post_request(&self.cfg.url, body, &headers, self.cfg.timeout_ms);
        let mut retry = 0u32;
        loop {
            let answer = host.http_send(&request);
            let (reason, retry_after) = match classify(&answer) {
                Attempt::Delivered => return Delivery::Delivered,
                Attempt::Final {
                    reason,
                    not_granted,
                } => {
                    return Delivery::Failed {
                        reason,
                        final_answer: true,
                        not_granted,
                        out_of_budget: false,
                    }
                }
                Attempt::Retriable {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            if retry >= self.cfg.max_retries {
                return Delivery::Failed {
                    reason: format!("{reason} (after {} attempts)", retry + 1),
                    final_answer: false,
                    not_granted: false,
                    out_of_budget: false,
                };
            }
            let wait = backoff_ms(
                retry,
                self.cfg.base_backoff_ms,
                self.cfg.max_backoff_ms,
                retry_after,
                &mut jitter,
            );
            let wait_micros = i64::try_from(wait).unwrap_or(i64::MAX).saturating_mul(1000);
            if host.now_micros().saturating_add(wait_micros) > deadline_micros {
                return Delivery::Failed {
                    reason: format!(
                        "{reason} (after {} attempts; batch retry budget of {} ms spent)",
                        retry + 1,
                        self.cfg.batch_budget_ms
                    ),
                    final_answer: false,
                    not_granted: false,
                    out_of_budget: true,
                };
            }
            host.counter_add("retries", 1);
            host.sleep_ms(wait);
            retry += 1;
        }
    }

    /// Writes one batch through `host`.
    pub fn write_with(&self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let budget = i64::try_from(self.cfg.batch_budget_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let deadline = host.now_micros().saturating_add(budget);
        // (event ids, reason) of what could not be delivered.
        let mut failed: Vec<(Vec<i64>, String)> = Vec::new();
        // Set once an event gave up for lack of budget: later events are not tried.
        let mut budget_spent = false;
        let mut delivered = 0u64;
        match self.cfg.mode {
            Mode::PerEvent => {
                let mut seen = std::collections::HashSet::new();
                for e in batch.events.iter().filter(|e| seen.insert(e.event_id)) {
                    if budget_spent || host.now_micros() > deadline {
                        failed.push((
                            vec![e.event_id],
                            format!(
                                "not attempted: batch retry budget of {} ms spent on earlier events",
                                self.cfg.batch_budget_ms
                            ),
                        ));
                        continue;
                    }
                    let key = format!("event-{}", e.event_id);
                    match self.deliver(
                        host,
                        &event_json_string(e),
                        &key,
                        e.event_id as u64,
                        deadline,
                    ) {
                        Delivery::Delivered => delivered += 1,
                        Delivery::Failed {
                            not_granted: true,
                            reason,
                            ..
                        } => return WriteOutcome::RetryLater(format!("external-api: {reason}")),
                        Delivery::Failed {
                            reason,
                            final_answer,
                            out_of_budget,
                            ..
                        } => {
                            if !final_answer && self.cfg.policy == Policy::FailFast {
                                return self.fail_fast(host, batch, e.event_id, &reason);
                            }
                            budget_spent |= out_of_budget;
                            failed.push((vec![e.event_id], reason));
                        }
                    }
                }
            }
            Mode::Batch => {
                let events: Vec<&EnrichedEvent> = {
                    let mut seen = std::collections::HashSet::new();
                    batch
                        .events
                        .iter()
                        .filter(|e| seen.insert(e.event_id))
                        .collect()
                };
                if events.is_empty() {
                    return WriteOutcome::Accepted;
                }
                let body = format!(
                    "[{}]",
                    events
                        .iter()
                        .map(|e| event_json_string(e))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let key = batch_key(&events);
                let seed = events[0].event_id as u64;
                match self.deliver(host, &body, &key, seed, deadline) {
                    Delivery::Delivered => delivered += events.len() as u64,
                    Delivery::Failed {
                        not_granted: true,
                        reason,
                        ..
                    } => return WriteOutcome::RetryLater(format!("external-api: {reason}")),
                    Delivery::Failed {
                        reason,
                        final_answer,
                        ..
                    } => {
                        if !final_answer && self.cfg.policy == Policy::FailFast {
                            return self.fail_fast(host, batch, events[0].event_id, &reason);
                        }
                        failed.push((events.iter().map(|e| e.event_id).collect(), reason));
                    }
                }
            }
        }
        host.counter_add("events_delivered", delivered);
        if failed.is_empty() {
            return WriteOutcome::Accepted;
        }
        let rejections: Vec<Rejection> = failed
            .into_iter()
            .flat_map(|(ids, reason)| {
                ids.into_iter().map(move |event_id| Rejection {
                    event_id,
                    reason: format!("POST {}: {reason}", self.cfg.url),
                })
            })
            .collect();
        host.counter_add("events_dead_lettered", rejections.len() as u64);
        host.log(
            Level::Warn,
            &format!(
                "batch {}: {} events delivered, {} dead-lettered (first: {})",
                batch.id,
                delivered,
                rejections.len(),
                rejections[0].reason
            ),
        );
        WriteOutcome::Rejected(rejections)
    }

    fn fail_fast(
        &self,
        host: &impl Host,
        batch: &Batch,
        event_id: i64,
        reason: &str,
    ) -> WriteOutcome {
        host.counter_add("batches_failed", 1);
        let msg = format!(
            "external-api: POST {} of event {event_id} in batch {}: {reason}",
            self.cfg.url, batch.id
        );
        host.log(Level::Warn, &msg);
        WriteOutcome::RetryLater(msg)
    }
}

impl Sink for ExternalApi {
    fn init(config: serde_json::Value) -> Result<Self, String> {
        Ok(ExternalApi::new(Config::from_json(config)?))
    }

    fn write(&mut self, batch: &Batch) -> WriteOutcome {
        self.write_with(&WasmHost, batch)
    }
}

export_sink!(ExternalApi);

#[cfg(test)]
mod tests;
