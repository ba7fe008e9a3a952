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
use std::collections::{HashMap, HashSet, VecDeque};

use crate::exactly_once::{key_mask, Applied, Outcome, RedisOnce};
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
    /// A [`Host::redis_once`] call: the outcome per event and the commands of the events it
    /// applied (what the real script would run), in order. Its `then` commands follow as a
    /// [`Call::Redis`].
    RedisOnce {
        scope: String,
        outcomes: Vec<(i64, Outcome)>,
        commands: Vec<Vec<String>>,
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
///
/// Metric names are checked as the host checks them ([`crate::metrics::valid_name`], at most
/// [`crate::metrics::MAX_NAMES`]): a name the host would drop panics, failing the test.
///
/// [`Host::redis_once`] runs the rules of [`crate::exactly_once`] in memory (marks,
/// `min_live_event_id`, backfill and live bits, and the keys [`MockHost::insert_key`] made exist for
/// old markers; no TTLs): it takes one entry of the Redis queue, as one round trip would: an
/// `Err` fails the call before anything is applied, `Ok` replies answer its `then` commands.
#[derive(Default)]
pub struct MockHost {
    calls: RefCell<Vec<Call>>,
    redis: RefCell<VecDeque<Result<Vec<Reply>, CapabilityError>>>,
    http: RefCell<VecDeque<Result<Response, CapabilityError>>>,
    execute: RefCell<VecDeque<Result<String, CapabilityError>>>,
    insert: RefCell<VecDeque<Result<(), CapabilityError>>>,
    now: Cell<i64>,
    once: RefCell<OnceState>,
    /// Metric names used so far (the host keeps at most `metrics::MAX_NAMES` per plugin).
    metric_names: RefCell<HashSet<String>>,
}

/// What the exactly-once bookkeeping would hold in Redis.
#[derive(Default)]
struct OnceState {
    /// marks key -> field -> offset.
    marks: HashMap<String, HashMap<String, i64>>,
    /// marks key -> min_live_event_id.
    min_live: HashMap<String, i64>,
    /// (bitmap key, event id) set by backfilled events.
    bits: HashSet<(String, i64)>,
    /// (live bitmap key, event id) set by live events applied (a re-send is then skipped).
    live_bits: HashSet<(String, i64)>,
    /// Keys that exist (for `EXISTS` on old markers).
    keys: HashSet<String>,
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

    /// Every command [`Host::redis_once`] applied so far (the events it skipped add none), in
    /// order, as text.
    pub fn redis_once_commands(&self) -> Vec<Vec<String>> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::RedisOnce { commands, .. } => Some(commands.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// The mark of `topic`/`partition` in the exactly-once scope `scope`: the highest offset
    /// applied.
    pub fn once_mark(&self, scope: &str, topic: &str, partition: i32) -> Option<i64> {
        let once = self.once.borrow();
        once.marks
            .get(&format!("{scope}marks"))?
            .get(&format!("{topic}/{partition}"))
            .copied()
    }

    /// `min_live_event_id` of the exactly-once scope `scope`.
    pub fn once_min_live(&self, scope: &str) -> Option<i64> {
        self.once
            .borrow()
            .min_live
            .get(&format!("{scope}marks"))
            .copied()
    }

    /// Makes `key` exist, for [`RedisOnce::legacy_markers`] checks (an old marker).
    pub fn insert_key(&self, key: &str) {
        self.once.borrow_mut().keys.insert(key.to_string());
    }

    /// The host drops metrics it would not record (the series never appears on /metrics):
    /// fail the test instead.
    fn check_metric_name(&self, name: &str) {
        use crate::metrics::{valid_name, MAX_NAMES, MAX_NAME_LEN};
        assert!(
            valid_name(name),
            "metric name {name:?} would be refused by the host: names are [a-z_][a-z0-9_]*, at most {MAX_NAME_LEN} bytes"
        );
        let mut names = self.metric_names.borrow_mut();
        if !names.contains(name) {
            assert!(
                names.len() < MAX_NAMES,
                "metric {name:?} would be refused by the host: at most {MAX_NAMES} names per plugin"
            );
            names.insert(name.to_string());
        }
    }

    /// The rules of the exactly-once script, in memory. Returns the outcomes.
    fn run_once(&self, once: &RedisOnce) -> Vec<(i64, Outcome)> {
        let mut state = self.once.borrow_mut();
        let state = &mut *state;
        let marks_key = once.marks_key();
        let start: HashMap<String, i64> = state.marks.get(&marks_key).cloned().unwrap_or_default();
        let mut min_live = state.min_live.get(&marks_key).copied();
        let mut top: HashMap<String, i64> = HashMap::new();
        let mut done: HashSet<(String, i64)> = HashSet::new();
        let mut out = Vec::with_capacity(once.len());
        for e in once.events() {
            let bit = (once.bitmap_key(e.event_id), e.event_id);
            let legacy = once
                .legacy_marker_key(e.event_id)
                .is_some_and(|k| state.keys.contains(&k));
            let outcome = match &e.position {
                Some(p) => {
                    let field = p.field();
                    let mark = start.get(&field).copied().unwrap_or(-1);
                    if p.offset <= mark || !done.insert((field.clone(), p.offset)) {
                        Outcome::Replayed
                    } else {
                        let live_bit = (once.live_bitmap_key(e.event_id), e.event_id);
                        let o = if state.bits.contains(&bit) {
                            Outcome::AppliedByBackfill
                        } else if state.live_bits.contains(&live_bit) {
                            Outcome::Resent
                        } else if legacy {
                            Outcome::LegacyMarker
                        } else {
                            Outcome::Applied
                        };
                        if o != Outcome::Resent {
                            state.live_bits.insert(live_bit);
                        }
                        let t = top.entry(field).or_insert(mark);
                        *t = (*t).max(p.offset);
                        min_live = Some(min_live.map_or(e.event_id, |m| m.min(e.event_id)));
                        o
                    }
                }
                None => {
                    if min_live.is_some_and(|m| e.event_id >= m) {
                        Outcome::CoveredByLive
                    } else if state.bits.contains(&bit) {
                        Outcome::Replayed
                    } else {
                        state.bits.insert(bit);
                        if legacy {
                            Outcome::LegacyMarker
                        } else {
                            Outcome::Applied
                        }
                    }
                }
            };
            out.push((e.event_id, outcome));
        }
        let marks = state.marks.entry(marks_key.clone()).or_default();
        marks.extend(top);
        if let Some(m) = min_live {
            state.min_live.insert(marks_key, m);
        }
        out
    }
}

fn text_command(c: &Command) -> Vec<String> {
    c.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

impl Host for MockHost {
    fn redis_pipeline(
        &self,
        commands: &[Command],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        self.record(Call::Redis {
            commands: commands.iter().map(text_command).collect(),
            atomic,
        });
        self.redis
            .borrow_mut()
            .pop_front()
            .unwrap_or_else(|| Ok(commands.iter().map(|_| Reply::Nil).collect()))
    }

    fn redis_once(&self, once: RedisOnce) -> Result<Applied, CapabilityError> {
        for e in once.events() {
            for c in e.commands.as_slice() {
                key_mask(c)?;
            }
        }
        let then = once.then_commands().as_slice();
        let queued = self.redis.borrow_mut().pop_front();
        let then_replies = match queued {
            Some(Err(e)) => {
                self.record(Call::RedisOnce {
                    scope: once.scope().to_string(),
                    outcomes: Vec::new(),
                    commands: Vec::new(),
                });
                return Err(e);
            }
            Some(Ok(replies)) => replies,
            None => then.iter().map(|_| Reply::Nil).collect(),
        };
        let outcomes = self.run_once(&once);
        let commands = once
            .events()
            .iter()
            .zip(&outcomes)
            .filter(|(_, (_, o))| *o == Outcome::Applied)
            .flat_map(|(e, _)| e.commands.as_slice().iter().map(text_command))
            .collect();
        self.record(Call::RedisOnce {
            scope: once.scope().to_string(),
            outcomes: outcomes.clone(),
            commands,
        });
        if !then.is_empty() {
            self.record(Call::Redis {
                commands: then.iter().map(text_command).collect(),
                atomic: false,
            });
        }
        Ok(Applied {
            events: outcomes,
            replies: then_replies,
        })
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
        self.check_metric_name(name);
        self.record(Call::Counter(name.to_string(), value))
    }

    fn gauge_set(&self, name: &str, value: f64) {
        self.check_metric_name(name);
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

/// A [`Host`] whose Redis is a real server (RESP2 over TCP, no auth), for tests of scripts
/// against Redis itself: `FANOUT_TEST_REDIS=127.0.0.1:56379 cargo test`. The other
/// capabilities answer `not-granted`; the clock is fixed at `now_micros`.
pub struct RedisServerHost {
    conn: RefCell<std::io::BufReader<std::net::TcpStream>>,
    now: i64,
}

impl RedisServerHost {
    /// Connects to `addr` (`host:port`).
    pub fn connect(addr: &str, now_micros: i64) -> std::io::Result<Self> {
        let stream = std::net::TcpStream::connect(addr)?;
        Ok(RedisServerHost {
            conn: RefCell::new(std::io::BufReader::new(stream)),
            now: now_micros,
        })
    }

    /// From `FANOUT_TEST_REDIS`, or None (the test should skip) when it is unset. With
    /// `FANOUT_REQUIRE_STACK` set (scripts/test, CI) an unset address fails the test instead.
    pub fn from_env(now_micros: i64) -> Option<Self> {
        let Ok(addr) = std::env::var("FANOUT_TEST_REDIS") else {
            assert!(
                std::env::var_os("FANOUT_REQUIRE_STACK").is_none(),
                "FANOUT_REQUIRE_STACK is set but FANOUT_TEST_REDIS is not (host:port of Redis)"
            );
            return None;
        };
        Some(Self::connect(&addr, now_micros).unwrap_or_else(|e| panic!("redis {addr}: {e}")))
    }

    /// One text command, its reply (panics on an error).
    pub fn cmd(&self, args: &[&str]) -> Reply {
        let mut p = crate::redis::Pipeline::new(self);
        p.args(args.iter().copied());
        p.send()
            .unwrap_or_else(|e| panic!("redis {args:?}: {e:?}"))
            .remove(0)
    }

    /// Deletes every key starting with `prefix` (KEYS: for tests only).
    pub fn delete_prefix(&self, prefix: &str) {
        if let Reply::Array(keys) = self.cmd(&["KEYS", &format!("{prefix}*")]) {
            for k in keys {
                if let crate::redis::Scalar::Data(d) = k {
                    self.cmd(&["DEL", &String::from_utf8_lossy(&d)]);
                }
            }
        }
    }
}

mod resp {
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpStream;

    use crate::redis::{Reply, Scalar};

    fn line(r: &mut BufReader<TcpStream>) -> String {
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        line.trim_end().to_string()
    }

    fn bulk(r: &mut BufReader<TcpStream>, len: i64) -> Option<Vec<u8>> {
        if len < 0 {
            return None;
        }
        let mut buf = vec![0u8; len as usize + 2];
        r.read_exact(&mut buf).expect("read bulk");
        buf.truncate(len as usize);
        Some(buf)
    }

    fn scalar(r: &mut BufReader<TcpStream>) -> Result<Scalar, String> {
        let l = line(r);
        let (t, rest) = l.split_at(1);
        Ok(match t {
            "+" => Scalar::Status(rest.into()),
            "-" => return Err(rest.into()),
            ":" => Scalar::Integer(rest.parse().expect("int")),
            "$" => bulk(r, rest.parse().expect("len")).map_or(Scalar::Nil, Scalar::Data),
            other => panic!("nested reply {other}"),
        })
    }

    pub fn reply(r: &mut BufReader<TcpStream>) -> Result<Reply, String> {
        let l = line(r);
        let (t, rest) = l.split_at(1);
        Ok(match t {
            "+" => Reply::Status(rest.into()),
            "-" => return Err(rest.into()),
            ":" => Reply::Integer(rest.parse().expect("int")),
            "$" => bulk(r, rest.parse().expect("len")).map_or(Reply::Nil, Reply::Data),
            "*" => {
                let n: i64 = rest.parse().expect("len");
                let mut items = Vec::new();
                let mut err = None;
                for _ in 0..n.max(0) {
                    match scalar(r) {
                        Ok(s) => items.push(s),
                        Err(e) => err = Some(e),
                    }
                }
                if let Some(e) = err {
                    return Err(e);
                }
                Reply::Array(items)
            }
            other => panic!("unknown reply type {other}"),
        })
    }
}

impl Host for RedisServerHost {
    fn redis_pipeline(
        &self,
        commands: &[Command],
        _atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        use std::io::Write;
        let mut conn = self.conn.borrow_mut();
        let mut out = Vec::new();
        for c in commands {
            out.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
            for a in c {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        conn.get_mut().write_all(&out).expect("write");
        let mut replies = Vec::new();
        let mut error = None;
        for _ in commands {
            match resp::reply(&mut conn) {
                Ok(r) => replies.push(r),
                Err(e) => error = Some(e),
            }
        }
        match error {
            // As the host: an error reply anywhere fails the whole call.
            Some(e) => Err(CapabilityError::Failed(format!("redis: {e}"))),
            None => Ok(replies),
        }
    }

    fn http_send(&self, _: &Request) -> Result<Response, CapabilityError> {
        Err(CapabilityError::NotGranted(
            "RedisServerHost: redis only".into(),
        ))
    }

    fn clickhouse_execute(&self, _: &str) -> Result<String, CapabilityError> {
        Err(CapabilityError::NotGranted(
            "RedisServerHost: redis only".into(),
        ))
    }

    fn clickhouse_insert_json_rows(
        &self,
        _: &str,
        _: &str,
        _: &[String],
    ) -> Result<(), CapabilityError> {
        Err(CapabilityError::NotGranted(
            "RedisServerHost: redis only".into(),
        ))
    }

    fn log(&self, _: Level, _: &str) {}

    fn counter_add(&self, _: &str, _: u64) {}

    fn gauge_set(&self, _: &str, _: f64) {}

    fn now_micros(&self) -> i64 {
        self.now
    }
}
