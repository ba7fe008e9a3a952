//! bigquery: the analytics sink of SPEC 5A on BigQuery, through the HTTP capability only.
//!
//! Creates the dataset and `{dataset}.{table}` (default `engagement.events_enriched`, the
//! ClickHouse plugin's columns, TIMESTAMP `event_ts`) when `create_table` is on, and streams
//! each batch with `tabledata.insertAll`, `insertId` = event_id, `skipInvalidRows`.
//!
//! One row per event_id, also under replays (docs/plugins.md "bigquery"):
//! 1. duplicates inside a batch are dropped (the last copy wins);
//! 2. ids already in the table are looked up first (`jobs.query`
//!    `SELECT DISTINCT event_id ... WHERE event_id IN (...)`) and not inserted again: this holds
//!    for replays at any distance, after BigQuery has forgotten the insertIds;
//! 3. `insertId` covers what the lookup cannot see: a retry inside one call (a timeout whose
//!    request did land) and a replay seconds after the insert, within BigQuery's best-effort
//!    dedup window (at least a minute).
//!
//! Per row: rows BigQuery refuses (`insertErrors` with reason `invalid`, ...) are rejected to
//! the dead-letter topic with BigQuery's reason, the others are stored, under both policies.
//! Requests answered 429/5xx/408 or not answered are retried with exponential backoff (equal
//! jitter, `Retry-After` honoured) within `batch_budget_ms`; then `fail-fast` answers
//! `retry-later` (the stream waits), `best-effort` rejects what is left, with the reason.
//! 401/403/404 and a missing grant always answer `retry-later`: no event is at fault.

pub mod api;

use std::collections::HashSet;

use api::{Answer, Target};
use fanout_sdk::http::{Request, Response, MAX_IN_FLIGHT};
use fanout_sdk::{describe, export_sink, Batch, Event, Host, Level, Rejection, Sink, WriteOutcome};
use serde::Deserialize;

/// What happens to rows that still fail after their retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The whole batch is retried later; the stream waits.
    FailFast,
    /// The rows are dead-lettered; the stream goes on.
    BestEffort,
}

/// `[plugins.config]` of the plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// API root: `https://bigquery.googleapis.com`, or the emulator's `http://127.0.0.1:59050`.
    pub url: String,
    pub project: String,
    pub dataset: String,
    pub table: String,
    /// Location of a dataset the plugin creates (`US`, `EU`, ...); empty = BigQuery's default.
    pub location: String,
    /// Create the dataset and table if missing (off when the schema is managed elsewhere).
    pub create_table: bool,
    /// Look up which event ids the table already has before inserting.
    pub skip_existing: bool,
    /// Event ids per lookup query.
    pub lookup_chunk: usize,
    /// Rows per insertAll request (BigQuery recommends about 500).
    pub rows_per_request: usize,
    /// insertAll requests of one batch in flight at once (1..=256).
    pub concurrency: u32,
    /// OAuth 2 access token, sent as `Authorization: Bearer ...`; empty: none (the emulator).
    pub token: String,
    pub policy: Policy,
    pub max_retries: u32,
    pub base_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Per request.
    pub timeout_ms: u32,
    /// Time one batch may spend on attempts and waits. Keep it (plus `timeout_ms`) below the
    /// host's `call_timeout_ms`, and below a minute so retries stay inside the insertId window.
    pub batch_budget_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: "https://bigquery.googleapis.com".into(),
            project: String::new(),
            dataset: "engagement".into(),
            table: "events_enriched".into(),
            location: String::new(),
            create_table: true,
            skip_existing: true,
            lookup_chunk: 5_000,
            rows_per_request: 500,
            concurrency: 4,
            token: String::new(),
            policy: Policy::FailFast,
            max_retries: 5,
            base_backoff_ms: 200,
            max_backoff_ms: 10_000,
            timeout_ms: 10_000,
            batch_budget_ms: 40_000,
        }
    }
}

fn valid_name(name: &str, extra: &[char]) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
}

impl Config {
    /// The config read from JSON and [`Config::validated`] (for tests and tools; the host's
    /// config arrives parsed through [`Sink::Config`]).
    pub fn from_json(config: serde_json::Value) -> Result<Self, String> {
        let cfg: Config =
            serde_json::from_value(config).map_err(|e| format!("bigquery config: {e}"))?;
        cfg.validated()
    }

    /// Checks what parsing cannot: URL scheme, names that go into URLs and SQL, sizes.
    pub fn validated(self) -> Result<Self, String> {
        let cfg = self;
        if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
            return Err(format!("bigquery config: url {:?} is not http(s)", cfg.url));
        }
        // Project ids: letters, digits, '-' (and a 'domain:' prefix); datasets and tables:
        // letters, digits, '_'. Checked so they can go into URLs and SQL unquoted.
        if !valid_name(&cfg.project, &['-', '.', ':']) {
            return Err(format!(
                "bigquery config: project {:?} must be set (letters, digits, - . :)",
                cfg.project
            ));
        }
        for (what, name) in [("dataset", &cfg.dataset), ("table", &cfg.table)] {
            if !valid_name(name, &[]) {
                return Err(format!(
                    "bigquery config: {what} {name:?} must be letters, digits and _"
                ));
            }
        }
        if !cfg.location.is_empty() && !valid_name(&cfg.location, &['-']) {
            return Err(format!("bigquery config: location {:?}", cfg.location));
        }
        if cfg.lookup_chunk == 0 || cfg.rows_per_request == 0 {
            return Err("bigquery config: lookup_chunk and rows_per_request must be > 0".into());
        }
        if !(1..=MAX_IN_FLIGHT).contains(&cfg.concurrency) {
            return Err(format!(
                "bigquery config: concurrency {} is not in 1..={MAX_IN_FLIGHT}",
                cfg.concurrency
            ));
        }
        if cfg.max_backoff_ms < cfg.base_backoff_ms {
            return Err("bigquery config: max_backoff_ms < base_backoff_ms".into());
        }
        Ok(cfg)
    }

    pub fn target(&self) -> Target {
        Target {
            base: self.url.trim_end_matches('/').to_string(),
            project: self.project.clone(),
            dataset: self.dataset.clone(),
            table: self.table.clone(),
            location: Some(self.location.clone()).filter(|l| !l.is_empty()),
            token: self.token.clone(),
            timeout_ms: self.timeout_ms,
        }
    }
}

/// Milliseconds to wait before retry number `retry` (0 = the first): `Retry-After` when given
/// (capped), else `min(max, base * 2^retry)` with equal jitter (half fixed, half random).
pub fn backoff_ms(retry: u32, cfg: &Config, retry_after_secs: Option<u64>, seed: &mut u64) -> u64 {
    if let Some(secs) = retry_after_secs {
        return secs.saturating_mul(1000).min(cfg.max_backoff_ms);
    }
    let exp = cfg
        .base_backoff_ms
        .saturating_mul(1u64.checked_shl(retry.min(62)).unwrap_or(u64::MAX))
        .min(cfg.max_backoff_ms);
    // xorshift64: enough for jitter.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let half = exp / 2;
    half + *seed % (exp - half + 1)
}

/// Why a step gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Out of retries or budget on a retriable failure.
    Exhausted(String),
    /// 401/403/404/not granted: retry-later under both policies.
    Setup(String),
    /// The request was refused as invalid.
    Invalid(String),
}

/// The plugin.
pub struct BigQuerySink {
    cfg: Config,
    target: Target,
    /// The dataset and table were created (or found) by this instance.
    schema_ready: bool,
}

impl BigQuerySink {
    pub fn new(cfg: Config) -> Self {
        let target = cfg.target();
        let schema_ready = !cfg.create_table;
        BigQuerySink {
            cfg,
            target,
            schema_ready,
        }
    }

    /// Sends one request with the retry schedule, within `deadline`.
    fn send(
        &self,
        host: &impl Host,
        request: &Request,
        deadline: i64,
        seed: &mut u64,
    ) -> Result<Response, Failure> {
        let mut retry = 0u32;
        loop {
            let answer = host.http_send(request);
            let (reason, retry_after) = match api::classify(&answer) {
                Answer::Ok | Answer::AlreadyExists => {
                    return answer.map_err(|e| Failure::Setup(describe(&e)))
                }
                Answer::Setup(m) => return Err(Failure::Setup(m)),
                Answer::Invalid(m) => return Err(Failure::Invalid(m)),
                Answer::Retriable {
                    reason,
                    retry_after_secs,
                } => (reason, retry_after_secs),
            };
            if retry >= self.cfg.max_retries {
                return Err(Failure::Exhausted(format!(
                    "{reason} (after {} attempts)",
                    retry + 1
                )));
            }
            let wait = backoff_ms(retry, &self.cfg, retry_after, seed);
            if !self.can_wait(host, wait, deadline) {
                return Err(Failure::Exhausted(format!(
                    "{reason} (after {} attempts; batch retry budget of {} ms spent)",
                    retry + 1,
                    self.cfg.batch_budget_ms
                )));
            }
            host.counter_add("retries", 1);
            host.sleep_ms(wait);
            retry += 1;
        }
    }

    fn can_wait(&self, host: &impl Host, wait_ms: u64, deadline: i64) -> bool {
        let wait = i64::try_from(wait_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        host.now_micros().saturating_add(wait) <= deadline
    }

    /// Creates the dataset and the table (409 = already there) once per instance.
    fn ensure_schema(&mut self, host: &impl Host, deadline: i64) -> Result<(), Failure> {
        if self.schema_ready {
            return Ok(());
        }
        let mut seed = 0x5eed_u64;
        self.send(host, &self.target.create_dataset(), deadline, &mut seed)?;
        self.send(host, &self.target.create_table(), deadline, &mut seed)?;
        self.schema_ready = true;
        host.log(
            Level::Info,
            &format!("table {} is ready", self.target.qualified()),
        );
        Ok(())
    }

    /// The ids among `ids` the table already holds.
    fn lookup(
        &self,
        host: &impl Host,
        ids: &[i64],
        deadline: i64,
    ) -> Result<HashSet<i64>, Failure> {
        let mut found = HashSet::new();
        let mut seed = ids.first().copied().unwrap_or(1) as u64 | 1;
        let wait_ms = self.cfg.timeout_ms.saturating_sub(1000).max(1000);
        for chunk in ids.chunks(self.cfg.lookup_chunk) {
            let request = self.target.query(&self.target.lookup_sql(chunk), wait_ms);
            let mut answer = self.query_answer(host, &request, deadline, &mut seed)?;
            loop {
                found.extend(answer.ids().map_err(Failure::Invalid)?);
                let next = match (
                    &answer.job_reference,
                    answer.job_complete,
                    &answer.page_token,
                ) {
                    (Some(job), false, _) => self.target.query_results(job, None, wait_ms),
                    (Some(job), true, Some(token)) => {
                        self.target.query_results(job, Some(token), wait_ms)
                    }
                    (_, true, _) => break,
                    (None, false, _) => {
                        return Err(Failure::Invalid(
                            "query answer incomplete without a job reference".into(),
                        ))
                    }
                };
                if host.now_micros() > deadline {
                    return Err(Failure::Exhausted(format!(
                        "lookup query not done within the batch budget of {} ms",
                        self.cfg.batch_budget_ms
                    )));
                }
                answer = self.query_answer(host, &next, deadline, &mut seed)?;
            }
        }
        Ok(found)
    }

    fn query_answer(
        &self,
        host: &impl Host,
        request: &Request,
        deadline: i64,
        seed: &mut u64,
    ) -> Result<api::QueryAnswer, Failure> {
        let response = self.send(host, request, deadline, seed)?;
        api::QueryAnswer::parse(&response.body).map_err(Failure::Invalid)
    }

    /// Writes one batch through `host`. After a failure the dataset and table are created
    /// again on the next attempt (a table dropped under a running instance comes back).
    pub fn write_with(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let outcome = self.write_once(host, batch);
        if matches!(outcome, WriteOutcome::RetryLater(_)) {
            self.schema_ready = !self.cfg.create_table;
        }
        outcome
    }

    /// What a step's failure means for the batch: Err(retry-later), or Ok(the reason to reject
    /// the rows with). Only insertAll can call rows invalid: a refused create or lookup is a
    /// schema or setup problem, so `rows_invalid` is false there and it waits like a 404.
    fn give_up(
        &self,
        host: &impl Host,
        batch: &Batch,
        what: &str,
        f: Failure,
        rows_invalid: bool,
    ) -> Result<String, WriteOutcome> {
        let f = match f {
            Failure::Invalid(m) if !rows_invalid => Failure::Setup(m),
            f => f,
        };
        let reason = match f {
            Failure::Setup(m) => {
                host.counter_add("batches_failed", 1);
                let msg = format!("bigquery: {what} for batch {}: {m}", batch.id);
                host.log(Level::Warn, &msg);
                return Err(WriteOutcome::RetryLater(msg));
            }
            Failure::Exhausted(m) if self.cfg.policy == Policy::FailFast => {
                host.counter_add("batches_failed", 1);
                let msg = format!("bigquery: {what} for batch {}: {m}", batch.id);
                host.log(Level::Warn, &msg);
                return Err(WriteOutcome::RetryLater(msg));
            }
            Failure::Exhausted(m) | Failure::Invalid(m) => m,
        };
        Ok(format!("bigquery: {what}: {reason}"))
    }

    fn write_once(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        let budget = i64::try_from(self.cfg.batch_budget_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let deadline = host.now_micros().saturating_add(budget);
        let events = batch.events.unique_by_event_id();
        let mut rejections: Vec<Rejection> = Vec::new();
        let reject_all = |rejections: &mut Vec<Rejection>, events: &[Event<'_>], reason: &str| {
            rejections.extend(events.iter().map(|e| Rejection {
                event_id: e.event_id(),
                reason: reason.to_string(),
            }));
        };

        if let Err(f) = self.ensure_schema(host, deadline) {
            let what = format!("creating {}", self.target.qualified());
            match self.give_up(host, batch, &what, f, false) {
                Err(outcome) => return outcome,
                Ok(reason) => {
                    reject_all(&mut rejections, &events, &reason);
                    return self.finish(host, batch, 0, 0, rejections);
                }
            }
        }

        // Event times BigQuery's TIMESTAMP cannot hold: rejected here, with the reason.
        let (mut rows, out_of_range): (Vec<Event<'_>>, Vec<Event<'_>>) =
            events.into_iter().partition(|e| {
                (api::MIN_TIMESTAMP_MICROS..=api::MAX_TIMESTAMP_MICROS)
                    .contains(&e.event_ts_micros())
            });
        for e in &out_of_range {
            rejections.push(Rejection {
                event_id: e.event_id(),
                reason: format!(
                    "bigquery: event_ts {} us is outside BigQuery's TIMESTAMP range (0001-01-01 to 9999-12-31)",
                    e.event_ts_micros()
                ),
            });
        }

        let mut skipped = 0usize;
        if self.cfg.skip_existing && !rows.is_empty() {
            let ids: Vec<i64> = rows.iter().map(|e| e.event_id()).collect();
            match self.lookup(host, &ids, deadline) {
                Ok(existing) => {
                    let before = rows.len();
                    rows.retain(|e| !existing.contains(&e.event_id()));
                    skipped = before - rows.len();
                }
                Err(f) => {
                    match self.give_up(host, batch, "looking up stored event ids", f, false) {
                        Err(outcome) => return outcome,
                        Ok(reason) => {
                            reject_all(&mut rejections, &rows, &reason);
                            return self.finish(host, batch, 0, skipped, rejections);
                        }
                    }
                }
            }
        }

        match self.insert(host, &rows, deadline) {
            Ok((inserted, refused)) => {
                rejections.extend(refused);
                self.finish(host, batch, inserted, skipped, rejections)
            }
            Err((f, inserted, refused, left)) => {
                match self.give_up(host, batch, "insertAll", f, true) {
                    Err(outcome) => outcome,
                    Ok(reason) => {
                        rejections.extend(refused);
                        reject_all(&mut rejections, &left, &reason);
                        self.finish(host, batch, inserted, skipped, rejections)
                    }
                }
            }
        }
    }

    /// Streams `rows` in requests of `rows_per_request`, `concurrency` at a time, in waves:
    /// after a wave, only what failed retriably (whole requests, or single rows BigQuery
    /// reported as transient) is sent again, after the longest wait any of it needs.
    /// Ok: (rows stored, rows refused with BigQuery's reason). Err: the failure, what was
    /// stored and refused so far, and the rows still not stored.
    #[allow(clippy::type_complexity)]
    fn insert<'a>(
        &self,
        host: &impl Host,
        rows: &[Event<'a>],
        deadline: i64,
    ) -> Result<(usize, Vec<Rejection>), (Failure, usize, Vec<Rejection>, Vec<Event<'a>>)> {
        let mut inserted = 0usize;
        let mut refused: Vec<Rejection> = Vec::new();
        let mut pending: Vec<Vec<Event<'a>>> = rows
            .chunks(self.cfg.rows_per_request)
            .map(<[Event<'a>]>::to_vec)
            .collect();
        let mut seed = rows.first().map_or(1, |e| e.event_id() as u64) | 1;
        let mut retry = 0u32;
        while !pending.is_empty() {
            let requests: Vec<Request> =
                pending.iter().map(|c| self.target.insert_all(c)).collect();
            let answers = host.http_send_all(&requests, self.cfg.concurrency);
            let mut again: Vec<Event<'a>> = Vec::new();
            let mut last_reason = String::new();
            let mut retry_after: Option<u64> = None;
            let mut setup: Option<String> = None;
            for (chunk, answer) in pending.iter().zip(answers.iter()) {
                match api::classify(answer) {
                    Answer::Ok | Answer::AlreadyExists => {
                        let body = answer.as_ref().map(|r| r.body.as_slice()).unwrap_or(&[]);
                        let errors = match api::insert_errors(body) {
                            Ok(errors) => errors,
                            // An answer we cannot read: resend (insertId dedups what landed).
                            Err(m) => {
                                last_reason = m;
                                again.extend_from_slice(chunk);
                                continue;
                            }
                        };
                        for (i, e) in chunk.iter().enumerate() {
                            match errors.get(&i) {
                                None => inserted += 1,
                                Some(errs) if api::row_error_is_retriable(errs) => {
                                    last_reason = api::row_error_text(errs);
                                    again.push(*e);
                                }
                                Some(errs) => refused.push(Rejection {
                                    event_id: e.event_id(),
                                    reason: format!(
                                        "bigquery: insertAll refused the row: {}",
                                        api::row_error_text(errs)
                                    ),
                                }),
                            }
                        }
                    }
                    Answer::Retriable {
                        reason,
                        retry_after_secs,
                    } => {
                        last_reason = reason;
                        retry_after = retry_after.max(retry_after_secs);
                        again.extend_from_slice(chunk);
                    }
                    Answer::Setup(m) => {
                        setup = Some(m);
                        again.extend_from_slice(chunk);
                    }
                    Answer::Invalid(m) => refused.extend(chunk.iter().map(|e| Rejection {
                        event_id: e.event_id(),
                        reason: format!("bigquery: insertAll refused the request: {m}"),
                    })),
                }
            }
            if let Some(m) = setup {
                return Err((Failure::Setup(m), inserted, refused, again));
            }
            if again.is_empty() {
                break;
            }
            if retry >= self.cfg.max_retries {
                let m = format!("{last_reason} (after {} attempts)", retry + 1);
                return Err((Failure::Exhausted(m), inserted, refused, again));
            }
            let wait = backoff_ms(retry, &self.cfg, retry_after, &mut seed);
            if !self.can_wait(host, wait, deadline) {
                let m = format!(
                    "{last_reason} (after {} attempts; batch retry budget of {} ms spent)",
                    retry + 1,
                    self.cfg.batch_budget_ms
                );
                return Err((Failure::Exhausted(m), inserted, refused, again));
            }
            host.counter_add("retries", again.len() as u64);
            host.sleep_ms(wait);
            retry += 1;
            pending = again
                .chunks(self.cfg.rows_per_request)
                .map(<[Event<'a>]>::to_vec)
                .collect();
        }
        Ok((inserted, refused))
    }

    fn finish(
        &self,
        host: &impl Host,
        batch: &Batch,
        inserted: usize,
        skipped: usize,
        rejections: Vec<Rejection>,
    ) -> WriteOutcome {
        host.counter_add("rows_inserted", inserted as u64);
        host.counter_add("rows_skipped_duplicate", skipped as u64);
        if rejections.is_empty() {
            return WriteOutcome::Accepted;
        }
        host.counter_add("rows_dead_lettered", rejections.len() as u64);
        host.log(
            Level::Warn,
            &format!(
                "batch {}: {inserted} rows inserted, {} dead-lettered (first: {})",
                batch.id,
                rejections.len(),
                rejections[0].reason
            ),
        );
        WriteOutcome::Rejected(rejections)
    }
}

impl Sink for BigQuerySink {
    type Config = Config;

    fn init(cfg: Config, host: &impl Host) -> Result<Self, String> {
        let mut sink = BigQuerySink::new(cfg.validated()?);
        // One attempt each, no waiting: a BigQuery that is down does not hold up the start.
        let deadline = host.now_micros();
        match sink.ensure_schema(host, deadline) {
            Ok(()) => Ok(sink),
            Err(Failure::Setup(m)) if m.starts_with("not granted") => {
                // A missing grant will not fix itself: refuse to start.
                Err(format!("bigquery: http capability {m}"))
            }
            Err(Failure::Setup(m) | Failure::Exhausted(m) | Failure::Invalid(m)) => {
                // BigQuery may be down at start, or the token not valid yet: the first batch
                // tries again.
                host.log(
                    Level::Warn,
                    &format!("bigquery: schema not created yet ({m}); retrying on the first batch"),
                );
                Ok(sink)
            }
        }
    }

    fn write(&mut self, host: &impl Host, batch: &Batch) -> WriteOutcome {
        self.write_with(host, batch)
    }
}

export_sink!(BigQuerySink);

#[cfg(test)]
mod tests;
