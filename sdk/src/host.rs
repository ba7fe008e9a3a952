//! The host's capabilities behind one trait, so plugin logic can run against the real host
//! ([`WasmHost`]) or a recorder in native unit tests ([`crate::testing::MockHost`]).

#[cfg(target_arch = "wasm32")]
use crate::bindings::fanout::sink as wit;
use crate::exactly_once::{Applied, RedisOnce};
use crate::http::{Request, Response};
use crate::redis::{Command, Pipeline, Reply};
use crate::{CapabilityError, Level};

/// What a plugin can ask of the host. [`Sink::init`](crate::Sink::init) and
/// [`Sink::write`](crate::Sink::write) receive it: [`WasmHost`] in the component, a
/// [`crate::testing::MockHost`] (or any implementation) in native tests.
pub trait Host {
    /// Redis commands for one round trip: `host.redis().cmd("INCR").arg(key).send()?`
    /// ([`crate::redis`]). The one way to call Redis.
    fn redis(&self) -> Pipeline<'_, Self>
    where
        Self: Sized,
    {
        Pipeline::new(self)
    }

    /// The transport under [`Host::redis`]: sends the commands in one round trip
    /// (`MULTI`/`EXEC` when `atomic`). Implement it; call [`Host::redis`].
    fn redis_pipeline(
        &self,
        commands: &[Command],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError>;

    /// [`Host::redis_pipeline`] with the commands already in the Redis protocol
    /// ([`crate::resp`]): what the exactly-once primitive writes. The default reads them back
    /// and calls `redis_pipeline`; the real host hands the buffer over as it is.
    fn redis_pipeline_resp(
        &self,
        resp: &[u8],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        let commands = crate::resp::parse_owned(resp)
            .map_err(|e| CapabilityError::Failed(format!("redis: {e}")))?;
        self.redis_pipeline(&commands, atomic)
    }

    /// Applies the events of `once` exactly once, then its `then` commands, in one round
    /// trip: what [`RedisOnce::apply`] calls (see [`crate::exactly_once`]). The default sends
    /// the `EVAL` of [`RedisOnce::eval_command`] and the `then` commands through
    /// [`Host::redis_pipeline`] (the real host); [`crate::testing::MockHost`] runs the same
    /// rules in memory.
    fn redis_once(&self, once: RedisOnce) -> Result<Applied, CapabilityError> {
        crate::exactly_once::apply_by_script(self, once)
    }

    /// Sends one HTTP request. Any status is `Ok`; `Err(Failed)` means no response.
    fn http_send(&self, request: &Request) -> Result<Response, CapabilityError>;

    /// Sends HTTP requests concurrently, at most `max_in_flight` at a time (the host clamps
    /// it to `1..=`[`MAX_IN_FLIGHT`](crate::http::MAX_IN_FLIGHT)); one result per request, in
    /// request order, each as [`Host::http_send`] answers. Every URL is checked against the
    /// grant first: if one is refused, nothing is sent and every result is `NotGranted`.
    ///
    /// The default sends them one after another through [`Host::http_send`], for `Host`
    /// implementations written before this method existed.
    fn http_send_all(
        &self,
        requests: &[Request],
        max_in_flight: u32,
    ) -> Vec<Result<Response, CapabilityError>> {
        let _ = max_in_flight;
        requests.iter().map(|r| self.http_send(r)).collect()
    }

    /// Runs a ClickHouse statement and returns the response body.
    fn clickhouse_execute(&self, sql: &str) -> Result<String, CapabilityError>;

    /// Inserts JSON rows (`JSONEachRow`) into `database.table` in one request.
    fn clickhouse_insert_json_rows(
        &self,
        database: &str,
        table: &str,
        rows: &[String],
    ) -> Result<(), CapabilityError>;

    /// Writes to the host's log, tagged with the plugin's name.
    fn log(&self, level: Level, message: &str) {
        crate::log::log(level, message)
    }

    /// Adds to the plugin's counter `name`: `fanout_plugin_counter_total{plugin,name}` on
    /// /metrics. Names are [`crate::metrics::valid_name`]: `[a-z_][a-z0-9_]*`, at most 64 bytes,
    /// at most 100 per plugin; the host drops others (counted in
    /// `fanout_plugin_metrics_refused_total`), `MockHost` panics on them.
    fn counter_add(&self, name: &str, value: u64) {
        crate::metrics::counter_add(name, value)
    }

    /// Sets the plugin's gauge `name`: `fanout_plugin_gauge{plugin,name}` on /metrics (names as
    /// for [`Host::counter_add`]).
    fn gauge_set(&self, name: &str, value: f64) {
        crate::metrics::gauge_set(name, value)
    }

    /// Wall-clock time, Unix microseconds.
    fn now_micros(&self) -> i64 {
        crate::time::now_micros()
    }

    /// Blocks for `millis` (WASI monotonic clock inside the host). Used between retries.
    fn sleep_ms(&self, millis: u64) {
        std::thread::sleep(std::time::Duration::from_millis(millis))
    }
}

/// The real host. Outside a fanout host (a native build), every capability answers
/// `not-granted`, logs go to stderr and metrics nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct WasmHost;

/// The error capability calls get natively, where no host exists.
#[cfg(not(target_arch = "wasm32"))]
fn no_host() -> CapabilityError {
    CapabilityError::NotGranted("not running inside the fanout host (native build)".into())
}

impl Host for WasmHost {
    fn redis_pipeline(
        &self,
        commands: &[Command],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        // One buffer across the boundary, not a list per argument (docs/wit.md).
        self.redis_pipeline_resp(&crate::resp::encode(commands), atomic)
    }

    fn redis_pipeline_resp(
        &self,
        resp: &[u8],
        atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        #[cfg(target_arch = "wasm32")]
        {
            wit::redis::pipeline_resp(resp, atomic)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (resp, atomic);
            Err(no_host())
        }
    }

    fn http_send(&self, request: &Request) -> Result<Response, CapabilityError> {
        #[cfg(target_arch = "wasm32")]
        {
            wit::http::send(request)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = request;
            Err(no_host())
        }
    }

    fn http_send_all(
        &self,
        requests: &[Request],
        max_in_flight: u32,
    ) -> Vec<Result<Response, CapabilityError>> {
        #[cfg(target_arch = "wasm32")]
        {
            wit::http::send_all(requests, max_in_flight)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = max_in_flight;
            requests.iter().map(|_| Err(no_host())).collect()
        }
    }

    fn clickhouse_execute(&self, sql: &str) -> Result<String, CapabilityError> {
        #[cfg(target_arch = "wasm32")]
        {
            wit::clickhouse::execute(sql)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = sql;
            Err(no_host())
        }
    }

    fn clickhouse_insert_json_rows(
        &self,
        database: &str,
        table: &str,
        rows: &[String],
    ) -> Result<(), CapabilityError> {
        #[cfg(target_arch = "wasm32")]
        {
            wit::clickhouse::insert_json_rows(database, table, rows)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (database, table, rows);
            Err(no_host())
        }
    }
}

/// A short text for a capability error, for logs and retry reasons.
pub fn describe(err: &CapabilityError) -> String {
    match err {
        CapabilityError::NotGranted(m) => format!("not granted: {m}"),
        CapabilityError::Failed(m) => format!("failed: {m}"),
    }
}
