//! external-api: POSTs enriched events to an HTTP API the team does not control (SPEC 5C).
//!
//! - `mode = "per-event"` (default): one `POST {url}` per event, body = the SPEC-4 JSON
//!   object, header `Idempotency-Key: event-<event_id>`, up to `concurrency` requests in
//!   flight at once (the host's `http.send-all`), optionally paced to
//!   `max_requests_per_second`. Failures are per event, so best-effort dead-letters exactly
//!   the events that failed.
//! - `mode = "batch"`: one POST per batch, body = JSON array of the records,
//!   `Idempotency-Key: batch-<16 hex>` (FNV-1a of the sorted, distinct event ids: the same
//!   events give the same key on every replay).
//!
//! Retries belong to the plugin, inside one call: connection errors and timeouts (`failed`),
//! 408, 425, 429 and 5xx, up to `max_retries` times after the first attempt. Per-event mode
//! retries in waves: after a wave, only the events that failed retriably are sent again,
//! after the longest of their waits. The wait before retry n is `min(max_backoff, base * 2^n)`
//! with "equal jitter" (half fixed, half random from a xorshift PRNG seeded by the event id),
//! or `Retry-After` seconds when the answer has it (capped by `max_backoff_ms`). Other
//! statuses (400, 404, 422, ...) are final: the event is rejected (dead-lettered) under both
//! policies, since no retry can fix it. A call never spends more than `batch_budget_ms`
//! sleeping and sending: past that no new attempt starts (keep it below the host's
//! `call_timeout_ms`).
//!
//! After the retries: `fail-fast` answers `retry-later` for the whole batch (the host retries
//! it with its own backoff and the stream waits; events already delivered are resent with the
//! same idempotency key); `best-effort` answers `rejected` with the reason of each undelivered
//! event (the host dead-letters them and goes on, without retrying the call).

use std::cell::Cell;

use fanout_sdk::http::{header, json_post_request_owned, Request, Response, MAX_IN_FLIGHT};
use fanout_sdk::{
    describe, event_json_string, export_sink, write_event_json, Batch, CapabilityError, Event,
    Host, Level, Rejection, Sink, WriteOutcome,
};
use rustc_hash::FxHashSet;
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
    /// Keep it (plus `timeout_ms`) below the host's `call_timeout_ms`.
    pub batch_budget_ms: u64,
    /// Per-event mode: requests in flight at once (1..=256, the host's cap).
    pub concurrency: u32,
    /// Per-event mode: at most this many requests per second, retries included; 0 = no cap.
    pub max_requests_per_second: u32,
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
            batch_budget_ms: 40_000,
            concurrency: 32,
            max_requests_per_second: 0,
            headers: Default::default(),
        }
    }
}

impl Config {
    /// The checks parsing cannot make.
    pub fn validated(self) -> Result<Self, String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("config: url: {:?} is not http(s)", self.url));
        }
        if self.max_backoff_ms < self.base_backoff_ms {
            return Err("config: max_backoff_ms < base_backoff_ms".into());
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.concurrency) {
            return Err(format!(
                "config: concurrency: {} is not in 1..={MAX_IN_FLIGHT}",
                self.concurrency
            ));
        }
        Ok(self)
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
pub fn batch_key(events: &[Event<'_>]) -> String {
    // The SDK's idempotency key (same hash), under this plugin's historical `batch-` prefix.
    let key = fanout_sdk::http::idempotency_key(events.iter().map(|e| e.event_id()));
    format!("batch-{}", key.trim_start_matches("fanout-"))
}

/// The events of a batch with one copy per event id (the first), in order.
pub fn first_by_event_id<'b>(batch: &'b Batch) -> Vec<Event<'b>> {
    let mut seen = FxHashSet::with_capacity_and_hasher(batch.events.len(), Default::default());
    batch
        .events
        .iter()
        .filter(|e| seen.insert(e.event_id()))
        .collect()
}

/// The body of a batch request: the JSON array of the events' SPEC-4 records, written into one
/// buffer.
pub fn json_array(events: &[Event<'_>]) -> String {
    // About 250 bytes a record: one allocation for most batches.
    let mut body = String::with_capacity(2 + events.len() * 280);
    body.push('[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        write_event_json(*e, &mut body);
    }
    body.push(']');
    body
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

/// An event still to be delivered in per-event mode.
struct Pending {
    /// Position among the batch's distinct events: rejections keep the batch's order.
    index: usize,
    event_id: i64,
    request: Request,
    jitter: Jitter,
    /// Why the last attempt failed (empty before the first).
    reason: String,
}

/// The plugin.
pub struct ExternalApi {
    cfg: Config,
    /// Per-event pacing (`max_requests_per_second`): wall-clock micros before which the next
    /// request may not start. Kept across calls, so back-to-back batches share the rate.
    pace_next_micros: Cell<i64>,
}

impl ExternalApi {
    pub fn new(cfg: Config) -> Self {
        ExternalApi {
            cfg,
            pace_next_micros: Cell::new(i64::MIN),
        }
    }

    fn request(&self, body: String, key: &str) -> Request {
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(1 + self.cfg.headers.len());
        headers.push(("Idempotency-Key", key));
        headers.extend(
            self.cfg
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        json_post_request_owned(
            &self.cfg.url,
            body.into_bytes(),
            &headers,
            self.cfg.timeout_ms,
        )
    }

    /// Sends one request (body + idempotency key) with retries, within `deadline_micros`.
    pub fn deliver(
        &self,
        host: &impl Host,
        body: String,
        key: &str,
        seed: u64,
        deadline_micros: i64,
    ) -> Delivery {
        let mut jitter = Jitter::new(seed);
        let request = self.request(body, key);
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
    fn write_batch(&self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let budget = i64::try_from(self.cfg.batch_budget_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let deadline = host.now_micros().saturating_add(budget);
        // (event ids, reason) of what could not be delivered.
        let mut failed: Vec<(Vec<i64>, String)> = Vec::new();
        let mut delivered = 0u64;
        match self.cfg.mode {
            Mode::PerEvent => return self.write_per_event(host, batch, deadline),
            Mode::Batch => {
                let events = first_by_event_id(batch);
                if events.is_empty() {
                    return WriteOutcome::Accepted;
                }
                let body = json_array(&events);
                let key = batch_key(&events);
                let seed = events[0].event_id() as u64;
                match self.deliver(host, body, &key, seed, deadline) {
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
                            return self.fail_fast(host, batch, events[0].event_id(), &reason);
                        }
                        failed.push((events.iter().map(|e| e.event_id()).collect(), reason));
                    }
                }
            }
        }
        self.finish(host, batch, delivered, failed)
    }

    /// Per-event mode: every event in the first wave, `concurrency` requests in flight; then
    /// waves of only the events that failed retriably, after the longest of their backoffs,
    /// until they are delivered, out of retries, or out of budget.
    fn write_per_event(&self, host: &impl Host, batch: &Batch, deadline: i64) -> WriteOutcome {
        let mut pending: Vec<Pending> = first_by_event_id(batch)
            .into_iter()
            .enumerate()
            .map(|(index, e)| Pending {
                index,
                event_id: e.event_id(),
                request: self.request(event_json_string(e), &format!("event-{}", e.event_id())),
                jitter: Jitter::new(e.event_id() as u64),
                reason: String::new(),
            })
            .collect();
        let mut delivered = 0u64;
        // (position, event id, reason): final answers (4xx), rejected under both policies.
        let mut final_failures: Vec<(usize, i64, String)> = Vec::new();
        // Out of retries or budget: retry-later under fail-fast, rejected under best-effort.
        let mut gave_up: Vec<(usize, i64, String)> = Vec::new();
        let mut retry = 0u32;
        while !pending.is_empty() {
            let answers = self.send_wave(host, &mut pending, deadline);
            let mut again: Vec<Pending> = Vec::new();
            let mut wait = 0u64;
            let mut rest = pending.into_iter();
            // `answers` first: zip stops on it without taking an unanswered event from `rest`.
            for (answer, mut p) in answers.into_iter().zip(rest.by_ref()) {
                match classify(&answer) {
                    Attempt::Delivered => delivered += 1,
                    // A configuration problem: the host retries the call, nothing is lost.
                    Attempt::Final {
                        not_granted: true,
                        reason,
                    } => return WriteOutcome::RetryLater(format!("external-api: {reason}")),
                    Attempt::Final { reason, .. } => {
                        final_failures.push((p.index, p.event_id, reason))
                    }
                    Attempt::Retriable {
                        reason,
                        retry_after,
                    } => {
                        if retry >= self.cfg.max_retries {
                            let why = format!("{reason} (after {} attempts)", retry + 1);
                            gave_up.push((p.index, p.event_id, why));
                            continue;
                        }
                        // One wait for the whole wave: the longest any of its events needs,
                        // so each waits at least its own backoff or Retry-After.
                        wait = wait.max(backoff_ms(
                            retry,
                            self.cfg.base_backoff_ms,
                            self.cfg.max_backoff_ms,
                            retry_after,
                            &mut p.jitter,
                        ));
                        p.reason = reason;
                        again.push(p);
                    }
                }
            }
            // Not sent in this wave: the budget ran out while pacing.
            for p in rest {
                let why = self.budget_spent(&p, retry);
                gave_up.push((p.index, p.event_id, why));
            }
            if again.is_empty() {
                break;
            }
            let wait_micros = i64::try_from(wait).unwrap_or(i64::MAX).saturating_mul(1000);
            if host.now_micros().saturating_add(wait_micros) > deadline {
                for p in again {
                    let why = self.budget_spent(&p, retry + 1);
                    gave_up.push((p.index, p.event_id, why));
                }
                break;
            }
            host.counter_add("retries", again.len() as u64);
            host.sleep_ms(wait);
            retry += 1;
            pending = again;
        }
        if !gave_up.is_empty() && self.cfg.policy == Policy::FailFast {
            // The whole batch comes back: its events count as delivered once it is accepted.
            gave_up.sort_by_key(|g| g.0);
            let (_, event_id, reason) = &gave_up[0];
            let reason = match gave_up.len() {
                1 => reason.clone(),
                n => format!("{reason}; {} more events undelivered", n - 1),
            };
            return self.fail_fast(host, batch, *event_id, &reason);
        }
        let mut failed = final_failures;
        failed.extend(gave_up);
        failed.sort_by_key(|f| f.0);
        let failed = failed
            .into_iter()
            .map(|(_, id, reason)| (vec![id], reason))
            .collect();
        self.finish(host, batch, delivered, failed)
    }

    /// Why an event is given up for lack of budget, after `attempts` attempts.
    fn budget_spent(&self, p: &Pending, attempts: u32) -> String {
        if attempts == 0 {
            return format!(
                "not attempted: batch retry budget of {} ms spent",
                self.cfg.batch_budget_ms
            );
        }
        format!(
            "{} (after {attempts} attempts; batch retry budget of {} ms spent)",
            p.reason, self.cfg.batch_budget_ms
        )
    }

    /// Sends one wave. Answers a prefix of `pending`, all of it unless the budget ran out
    /// while pacing to `max_requests_per_second`.
    fn send_wave(
        &self,
        host: &impl Host,
        pending: &mut [Pending],
        deadline: i64,
    ) -> Vec<Result<Response, CapabilityError>> {
        // The requests move out for the call and back after it (a retry sends them again):
        // no copy of bodies and headers per wave.
        let requests: Vec<Request> = pending
            .iter_mut()
            .map(|p| std::mem::replace(&mut p.request, empty_request()))
            .collect();
        let answers = self.send_requests(host, &requests, deadline);
        for (p, r) in pending.iter_mut().zip(requests) {
            p.request = r;
        }
        answers
    }

    /// [`ExternalApi::send_wave`]'s calls: all at once, or paced.
    fn send_requests(
        &self,
        host: &impl Host,
        requests: &[Request],
        deadline: i64,
    ) -> Vec<Result<Response, CapabilityError>> {
        let rate = self.cfg.max_requests_per_second;
        if rate == 0 {
            return host.http_send_all(requests, self.cfg.concurrency);
        }
        // About ten slices a second, each started only when the rate allows it.
        let slice = (rate / 10).max(1) as usize;
        let mut answers = Vec::with_capacity(requests.len());
        for part in requests.chunks(slice) {
            let now = host.now_micros();
            let next = self.pace_next_micros.get();
            if next > deadline || now > deadline {
                break;
            }
            if next > now {
                host.sleep_ms(u64::try_from(next - now).unwrap_or(0).div_ceil(1000));
            }
            let start = host.now_micros().max(next);
            let spacing = (part.len() as i64).saturating_mul(1_000_000) / i64::from(rate);
            self.pace_next_micros.set(start.saturating_add(spacing));
            answers.extend(host.http_send_all(part, self.cfg.concurrency));
        }
        answers
    }

    /// The outcome of a call that is not given back: accepted, or rejected with `failed`.
    fn finish(
        &self,
        host: &impl Host,
        batch: &Batch,
        delivered: u64,
        failed: Vec<(Vec<i64>, String)>,
    ) -> WriteOutcome {
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

/// A placeholder while a request is lent to the host (allocates nothing).
fn empty_request() -> Request {
    Request {
        method: String::new(),
        url: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout_ms: 0,
    }
}

impl Sink for ExternalApi {
    type Config = Config;

    fn init(cfg: Config, _host: &impl Host) -> Result<Self, String> {
        Ok(ExternalApi::new(cfg.validated()?))
    }

    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        self.write_batch(host, batch)
    }
}

export_sink!(ExternalApi);

#[cfg(test)]
mod tests;
