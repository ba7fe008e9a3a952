//! The BigQuery REST API v2 as this plugin uses it: request bodies, answers, and which failures
//! a retry can fix.
//!
//! - `POST /bigquery/v2/projects/{p}/datasets` and `.../datasets/{d}/tables` (409 = exists),
//! - `POST .../tables/{t}/insertAll` (`tabledata.insertAll`, streaming rows with `insertId`),
//! - `POST /bigquery/v2/projects/{p}/queries` (`jobs.query`) and
//!   `GET .../queries/{jobId}` (`jobs.getQueryResults`, for slow queries and further pages).

use std::collections::HashMap;

use fanout_sdk::http::{header, Request, Response};
use fanout_sdk::{describe, event_json_string, CapabilityError, Event};
use serde::Deserialize;

/// The columns of `engagement.events_enriched` (the ClickHouse plugin's table) in BigQuery
/// types: (name, type, mode).
pub const COLUMNS: [(&str, &str, &str); 11] = [
    ("event_id", "INT64", "REQUIRED"),
    ("content_id", "INT64", "NULLABLE"),
    ("user_id", "INT64", "NULLABLE"),
    ("event_type", "STRING", "NULLABLE"),
    ("event_ts", "TIMESTAMP", "REQUIRED"),
    ("duration_ms", "INT64", "NULLABLE"),
    ("device", "STRING", "NULLABLE"),
    ("content_type", "STRING", "NULLABLE"),
    ("length_seconds", "INT64", "NULLABLE"),
    ("engagement_seconds", "FLOAT64", "NULLABLE"),
    ("engagement_pct", "FLOAT64", "NULLABLE"),
];

/// BigQuery's TIMESTAMP range, Unix microseconds: 0001-01-01 00:00:00 to
/// 9999-12-31 23:59:59.999999 UTC. An event time outside it can never be stored.
pub const MIN_TIMESTAMP_MICROS: i64 = -62_135_596_800_000_000;
pub const MAX_TIMESTAMP_MICROS: i64 = 253_402_300_799_999_999;

/// Where and how to reach one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// API root without a trailing slash: `https://bigquery.googleapis.com` or the emulator.
    pub base: String,
    pub project: String,
    pub dataset: String,
    pub table: String,
    /// Dataset location for `datasets.insert` (`US`, `EU`, ...); None = BigQuery's default.
    pub location: Option<String>,
    /// Sent as `Authorization: Bearer <token>` when not empty.
    pub token: String,
    pub timeout_ms: u32,
}

impl Target {
    fn project_url(&self) -> String {
        format!("{}/bigquery/v2/projects/{}", self.base, self.project)
    }

    /// `project.dataset.table`, back-quoted for GoogleSQL.
    pub fn qualified(&self) -> String {
        format!("`{}.{}.{}`", self.project, self.dataset, self.table)
    }

    fn request(&self, method: &str, url: String, body: Option<String>) -> Request {
        let mut headers = Vec::with_capacity(2);
        if body.is_some() {
            headers.push(("Content-Type".to_string(), "application/json".to_string()));
        }
        if !self.token.is_empty() {
            headers.push((
                "Authorization".to_string(),
                format!("Bearer {}", self.token),
            ));
        }
        Request {
            method: method.into(),
            url,
            headers,
            body: body.map(String::into_bytes).unwrap_or_default(),
            timeout_ms: self.timeout_ms,
        }
    }

    /// `datasets.insert`.
    pub fn create_dataset(&self) -> Request {
        let mut body = serde_json::json!({
            "datasetReference": {"projectId": self.project, "datasetId": self.dataset}
        });
        if let Some(location) = &self.location {
            body["location"] = location.clone().into();
        }
        self.request(
            "POST",
            format!("{}/datasets", self.project_url()),
            Some(body.to_string()),
        )
    }

    /// `tables.insert`: the columns of [`COLUMNS`], partitioned by day of `event_ts` and
    /// clustered by `event_id` (the lookup of stored ids reads few blocks).
    pub fn create_table(&self) -> Request {
        let fields: Vec<serde_json::Value> = COLUMNS
            .iter()
            .map(|(name, ty, mode)| serde_json::json!({"name": name, "type": ty, "mode": mode}))
            .collect();
        let body = serde_json::json!({
            "tableReference": {
                "projectId": self.project, "datasetId": self.dataset, "tableId": self.table
            },
            "schema": {"fields": fields},
            "timePartitioning": {"type": "DAY", "field": "event_ts"},
            "clustering": {"fields": ["event_id"]},
        });
        self.request(
            "POST",
            format!("{}/datasets/{}/tables", self.project_url(), self.dataset),
            Some(body.to_string()),
        )
    }

    /// `tabledata.insertAll` of `events`, each with `insertId` = its event_id. Invalid rows are
    /// skipped (and reported per row) instead of failing the request.
    pub fn insert_all(&self, events: &[Event<'_>]) -> Request {
        let mut body = String::with_capacity(64 + events.len() * 320);
        body.push_str(r#"{"kind":"bigquery#tableDataInsertAllRequest","skipInvalidRows":true,"ignoreUnknownValues":false,"rows":["#);
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(r#"{"insertId":""#);
            body.push_str(&e.event_id().to_string());
            body.push_str(r#"","json":"#);
            body.push_str(&event_json_string(*e));
            body.push('}');
        }
        body.push_str("]}");
        self.request(
            "POST",
            format!(
                "{}/datasets/{}/tables/{}/insertAll",
                self.project_url(),
                self.dataset,
                self.table
            ),
            Some(body),
        )
    }

    /// `jobs.query` of GoogleSQL `sql`, waiting up to `wait_ms` inside the call.
    pub fn query(&self, sql: &str, wait_ms: u32) -> Request {
        let body = serde_json::json!({
            "query": sql, "useLegacySql": false, "timeoutMs": wait_ms, "maxResults": 100_000,
        });
        self.request(
            "POST",
            format!("{}/queries", self.project_url()),
            Some(body.to_string()),
        )
    }

    /// `jobs.getQueryResults`: the rest of a query's answer (or its completion).
    pub fn query_results(
        &self,
        job: &JobReference,
        page_token: Option<&str>,
        wait_ms: u32,
    ) -> Request {
        let mut url = format!(
            "{}/queries/{}?timeoutMs={wait_ms}&maxResults=100000",
            self.project_url(),
            job.job_id
        );
        if let Some(location) = &job.location {
            url.push_str(&format!("&location={location}"));
        }
        if let Some(token) = page_token {
            url.push_str(&format!("&pageToken={token}"));
        }
        self.request("GET", url, None)
    }

    /// The query listing which of `ids` the table already holds.
    pub fn lookup_sql(&self, ids: &[i64]) -> String {
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        format!(
            "SELECT DISTINCT event_id FROM {} WHERE event_id IN ({})",
            self.qualified(),
            list.join(",")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobReference {
    pub job_id: String,
    #[serde(default)]
    pub location: Option<String>,
}

/// The part of a `jobs.query` / `jobs.getQueryResults` answer the lookup reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryAnswer {
    #[serde(default)]
    pub job_complete: bool,
    pub job_reference: Option<JobReference>,
    #[serde(default)]
    pub page_token: Option<String>,
    #[serde(default)]
    pub rows: Vec<QueryRow>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueryRow {
    pub f: Vec<QueryCell>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueryCell {
    pub v: Option<serde_json::Value>,
}

impl QueryAnswer {
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("unexpected query answer: {e}"))
    }

    /// The first column of every row as an INT64 (BigQuery sends them as strings).
    pub fn ids(&self) -> Result<Vec<i64>, String> {
        self.rows
            .iter()
            .map(|r| {
                let cell = r.f.first().and_then(|c| c.v.as_ref());
                match cell {
                    Some(serde_json::Value::String(s)) => s.parse().ok(),
                    Some(serde_json::Value::Number(n)) => n.as_i64(),
                    _ => None,
                }
                .ok_or_else(|| format!("unexpected row in lookup answer: {:?}", r.f))
            })
            .collect()
    }
}

/// One problem BigQuery reports for a row of `insertAll`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RowError {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InsertAllAnswer {
    #[serde(default)]
    insert_errors: Vec<InsertError>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct InsertError {
    index: usize,
    #[serde(default)]
    errors: Vec<RowError>,
}

/// The rows of an `insertAll` request BigQuery did not store, by index in the request.
pub fn insert_errors(body: &[u8]) -> Result<HashMap<usize, Vec<RowError>>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(HashMap::new());
    }
    let answer: InsertAllAnswer =
        serde_json::from_slice(body).map_err(|e| format!("unexpected insertAll answer: {e}"))?;
    Ok(answer
        .insert_errors
        .into_iter()
        .map(|e| (e.index, e.errors))
        .collect())
}

/// Row error reasons a retry of the same row can fix: `stopped` (the row was valid, another
/// row of the request was not, and skipInvalidRows was off) and BigQuery's transient ones.
pub fn row_error_is_retriable(errors: &[RowError]) -> bool {
    !errors.is_empty()
        && errors.iter().all(|e| {
            matches!(
                e.reason.as_str(),
                "stopped" | "backendError" | "internalError" | "timeout" | "rateLimitExceeded"
            )
        })
}

/// A row's errors as one line: `invalid at content_id: Cannot convert value to integer ...`.
pub fn row_error_text(errors: &[RowError]) -> String {
    if errors.is_empty() {
        return "rejected without a reason".into();
    }
    errors
        .iter()
        .filter(|e| e.reason != "stopped" || errors.len() == 1)
        .map(|e| {
            let at = if e.location.is_empty() {
                String::new()
            } else {
                format!(" at {}", e.location)
            };
            format!("{}{at}: {}", e.reason, e.message)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Ok,
    /// 409 `duplicate` on a create: the dataset or table is there.
    AlreadyExists,
    /// Worth retrying: no response, 408, 429, 5xx, or a 403 of a rate or quota limit.
    Retriable {
        reason: String,
        retry_after_secs: Option<u64>,
    },
    /// Not the data's fault and not fixed by retrying now: 401, 403, 404 (table or dataset
    /// missing), the capability not granted. The batch waits (retry-later) under both
    /// policies: dead-lettering every event for an expired token would lose the stream.
    Setup(String),
    /// The request itself is refused (400 and other 4xx): the rows it carried are rejected.
    Invalid(String),
}

/// The `error.errors[].reason` and `error.message` of a BigQuery error body.
fn error_reason(body: &[u8]) -> (Option<String>, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let err = &v["error"];
    let reason = err["errors"][0]["reason"].as_str().map(str::to_string);
    let message = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            text.trim().chars().take(200).collect()
        });
    (reason, message)
}

pub fn classify(result: &Result<Response, CapabilityError>) -> Answer {
    let r = match result {
        Ok(r) => r,
        Err(CapabilityError::Failed(m)) => {
            return Answer::Retriable {
                reason: format!("no response: {m}"),
                retry_after_secs: None,
            }
        }
        Err(e @ CapabilityError::NotGranted(_)) => return Answer::Setup(describe(e)),
    };
    if (200..300).contains(&r.status) {
        return Answer::Ok;
    }
    let (reason, message) = error_reason(&r.body);
    let text = format!(
        "HTTP {}{}: {message}",
        r.status,
        reason
            .as_deref()
            .map(|x| format!(" {x}"))
            .unwrap_or_default()
    );
    let retry_after_secs = header(r, "retry-after").and_then(|v| v.trim().parse().ok());
    let limited = matches!(
        reason.as_deref(),
        Some("rateLimitExceeded" | "backendError" | "internalError")
    );
    match r.status {
        409 if reason.as_deref() == Some("duplicate") => Answer::AlreadyExists,
        408 | 429 | 500..=599 => Answer::Retriable {
            reason: text,
            retry_after_secs,
        },
        403 if limited => Answer::Retriable {
            reason: text,
            retry_after_secs,
        },
        401 | 403 | 404 => Answer::Setup(text),
        _ => Answer::Invalid(text),
    }
}
