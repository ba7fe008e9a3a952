//! Test helpers: a [`Host`] that records every call and answers with scripted replies, and
//! builders for events and batches. Works natively: `cargo test` needs no host.
//!
//! ```
//! use fanout_sdk::testing::{batch, event, Call, MockHost};
//! use fanout_sdk::Host;
//!
//! let host = MockHost::new();
//! host.push_clickhouse_execute(Ok("1\n".into()));
//! assert_eq!(host.clickhouse_execute("SELECT 1").unwrap(), "1\n");
//! assert_eq!(host.calls(), vec![Call::ClickhouseExecute("SELECT 1".into())]);
//! let b = batch(vec![event(1, Some(7), 0)]);
//! assert_eq!(b.events.len(), 1);
//! assert_eq!(b.events.get(0).unwrap().content_id(), Some(7));
//! ```

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use crate::http::{Request, Response};
use crate::packed::PackedWriter;
use crate::redis::{Command, Reply};
use crate::{
    Batch, CapabilityError, EnrichedEvent, EventFields, Host, Level, PackedEvents, Position,
    SourceRange,
};

/// One recorded capability call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// A Redis pipeline; arguments as (lossy) text.
    Redis {
        commands: Vec<Vec<String>>,
        atomic: bool,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A [`Host::http_send_all`] call: its `max_in_flight` and how many requests it carried.
    /// Each request follows as its own [`Call::Http`], in order.
    HttpSendAll {
        max_in_flight: u32,
        requests: usize,
    },
    ClickhouseExecute(String),
    ClickhouseInsert {
        database: String,
        table: String,
        rows: Vec<String>,
    },
    Log(Level, String),
    Counter(String, u64),
    Gauge(String, f64),
    Sleep(u64),
}

/// A scripted, recording [`Host`]. Replies are consumed in order; when a queue is empty the
/// default answer is a success (`Nil` per Redis command, HTTP 200 with an empty body, an
/// empty ClickHouse body, `Ok(())` for inserts). [`Host::http_send_all`] answers its requests
/// from the same HTTP queue, in request order, as if each were sent with `http_send`. The
/// clock starts at `now_micros` and advances by each sleep.
#[derive(Default)]
pub struct MockHost {
    calls: RefCell<Vec<Call>>,
    redis: RefCell<VecDeque<Result<Vec<Reply>, CapabilityError>>>,
    http: RefCell<VecDeque<Result<Response, CapabilityError>>>,
    execute: RefCell<VecDeque<Result<String, CapabilityError>>>,
    insert: RefCell<VecDeque<Result<(), CapabilityError>>>,
    now: Cell<i64>,
}

impl MockHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// A host whose clock reads `now_micros`.
    pub fn at(now_micros: i64) -> Self {
        let h = Self::default();
        h.now.set(now_micros);
        h
    }

    pub fn set_now(&self, now_micros: i64) {
        self.now.set(now_micros)
    }

    pub fn push_redis(&self, reply: Result<Vec<Reply>, CapabilityError>) {
        self.redis.borrow_mut().push_back(reply)
    }

    pub fn push_http(&self, reply: Result<Response, CapabilityError>) {
        self.http.borrow_mut().push_back(reply)
    }

    /// Queues an HTTP response with `status` and `headers`.
    pub fn push_http_status(&self, status: u16, headers: &[(&str, &str)]) {
        self.push_http(Ok(Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        }))
    }

    pub fn push_clickhouse_execute(&self, reply: Result<String, CapabilityError>) {
        self.execute.borrow_mut().push_back(reply)
    }

    pub fn push_clickhouse_insert(&self, reply: Result<(), CapabilityError>) {
        self.insert.borrow_mut().push_back(reply)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Calls other than logs, metrics, sleeps and [`Call::HttpSendAll`] markers: what reached a
    /// service (each request of a send-all is its own [`Call::Http`]).
    pub fn service_calls(&self) -> Vec<Call> {
        self.calls
            .borrow()
            .iter()
            .filter(|c| {
                !matches!(
                    c,
                    Call::Log(..)
                        | Call::Counter(..)
                        | Call::Gauge(..)
                        | Call::Sleep(..)
                        | Call::HttpSendAll { .. }
                )
            })
            .cloned()
            .collect()
    }

    /// The [`Host::http_send_all`] calls so far, as (`max_in_flight`, number of requests).
    pub fn http_send_alls(&self) -> Vec<(u32, usize)> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::HttpSendAll {
                    max_in_flight,
                    requests,
                } => Some((*max_in_flight, *requests)),
                _ => None,
            })
            .collect()
    }

    /// The sleeps so far, in milliseconds.
    pub fn sleeps(&self) -> Vec<u64> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Sleep(ms) => Some(*ms),
                _ => None,
            })
            .collect()
    }

    /// The sum of counter `name`.
    pub fn counter(&self, name: &str) -> u64 {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Counter(n, v) if n == name => Some(*v),
                _ => None,
            })
            .sum()
    }

    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call)
    }
}

impl Host for MockHost {
    fn redis_pipeline(
        &self,
        commands: &[Command],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        let text = commands
            .iter()
            .map(|c| {
                c.iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .collect();
        self.record(Call::Redis {
            commands: text,
            atomic,
        });
        self.redis
            .borrow_mut()
            .pop_front()
            .unwrap_or_else(|| Ok(commands.iter().map(|_| Reply::Nil).collect()))
    }

    fn http_send(&self, request: &Request) -> Result<Response, CapabilityError> {
        self.record(Call::Http {
            method: request.method.clone(),
            url: request.url.clone(),
            headers: request.headers.clone(),
            body: String::from_utf8_lossy(&request.body).into_owned(),
        });
        self.http.borrow_mut().pop_front().unwrap_or_else(|| {
            Ok(Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            })
        })
    }

    fn http_send_all(
        &self,
        requests: &[Request],
        max_in_flight: u32,
    ) -> Vec<Result<Response, CapabilityError>> {
        self.record(Call::HttpSendAll {
            max_in_flight,
            requests: requests.len(),
        });
        requests.iter().map(|r| self.http_send(r)).collect()
    }

    fn clickhouse_execute(&self, sql: &str) -> Result<String, CapabilityError> {
        self.record(Call::ClickhouseExecute(sql.to_string()));
        self.execute
            .borrow_mut()
            .pop_front()
            .unwrap_or_else(|| Ok(String::new()))
    }

    fn clickhouse_insert_json_rows(
        &self,
        database: &str,
        table: &str,
        rows: &[String],
    ) -> Result<(), CapabilityError> {
        self.record(Call::ClickhouseInsert {
            database: database.to_string(),
            table: table.to_string(),
            rows: rows.to_vec(),
        });
        self.insert.borrow_mut().pop_front().unwrap_or(Ok(()))
    }

    fn log(&self, level: Level, message: &str) {
        self.record(Call::Log(level, message.to_string()))
    }

    fn counter_add(&self, name: &str, value: u64) {
        self.record(Call::Counter(name.to_string(), value))
    }

    fn gauge_set(&self, name: &str, value: f64) {
        self.record(Call::Gauge(name.to_string(), value))
    }

    fn now_micros(&self) -> i64 {
        self.now.get()
    }

    fn sleep_ms(&self, millis: u64) {
        self.record(Call::Sleep(millis));
        let advance = i64::try_from(millis)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        self.now.set(self.now.get().saturating_add(advance));
    }
}

/// An event with only the required fields set (everything nullable is `None`).
pub fn event(event_id: i64, content_id: Option<i64>, event_ts_micros: i64) -> EnrichedEvent {
    EnrichedEvent {
        event_id,
        content_id,
        user_id: None,
        event_type: None,
        event_ts_micros,
        duration_ms: None,
        device: None,
        content_type: None,
        length_seconds: None,
        engagement_seconds: None,
        engagement_pct: None,
    }
}

/// A batch of `events` from one made-up source range: partition 0 of topic `test`, each
/// event at the offset equal to its event_id.
pub fn batch(events: Vec<EnrichedEvent>) -> Batch {
    let first = events.first().map_or(0, |e| e.event_id);
    let last = events.last().map_or(0, |e| e.event_id);
    let positioned = events.iter().map(|e| {
        (
            e,
            Some(Position {
                topic: "test",
                partition: 0,
                offset: e.event_id,
            }),
        )
    });
    let mut b = batch_at(positioned);
    b.id = format!("test/0:{first}-{last}");
    b.sources = vec![SourceRange {
        topic: "test".into(),
        partition: 0,
        first_offset: first,
        last_offset: last,
    }];
    b
}

/// A batch of events at the given Kafka positions (`None`: a backfilled event), with
/// `id` and `sources` derived from them.
pub fn batch_at<'a>(
    events: impl IntoIterator<Item = (&'a EnrichedEvent, Option<Position<'a>>)>,
) -> Batch {
    let mut w = PackedWriter::default();
    let mut sources: Vec<SourceRange> = Vec::new();
    for (e, position) in events {
        w.push(&EventFields {
            position,
            ..e.fields()
        });
        let Some(p) = position else { continue };
        match sources
            .iter_mut()
            .find(|s| s.topic == p.topic && s.partition == p.partition)
        {
            Some(s) => {
                s.first_offset = s.first_offset.min(p.offset);
                s.last_offset = s.last_offset.max(p.offset);
            }
            None => sources.push(SourceRange {
                topic: p.topic.to_owned(),
                partition: p.partition,
                first_offset: p.offset,
                last_offset: p.offset,
            }),
        }
    }
    let id = sources
        .iter()
        .map(|s| {
            format!(
                "{}/{}:{}-{}",
                s.topic, s.partition, s.first_offset, s.last_offset
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    Batch {
        id,
        // The writer's output is valid by construction.
        events: PackedEvents::new(w.finish()).expect("packed writer output"),
        sources,
    }
}
