//! The host side of the capability interfaces of wit/sink.wit. Each call is checked against
//! the plugin's grant, then performed on the host's shared clients. Plugin code runs on a
//! thread of its own, so these block on the tokio runtime's handle.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, error, info, trace, warn};

use super::bindings::fanout::sink::errors::CapabilityError;
use super::bindings::fanout::sink::{
    clickhouse, errors, http, log, metrics, redis as wit_redis, types,
};
use super::PluginState;
use super::{clickhouse_sql, grants};
use crate::config::{Grants, ServicesConfig};
use crate::metrics::{label, Metrics};

mod redis_access;
pub use redis_access::RedisAccess;

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("redis at {url}: {source}")]
    Redis {
        url: String,
        source: ::redis::RedisError,
    },
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("a password for the plugins' redis users: {0}")]
    Random(std::io::Error),
}

/// Clients shared by every plugin; grants decide who may use them.
pub struct Services {
    pub runtime: tokio::runtime::Handle,
    /// The admin connection, and each plugin's own as its ACL user.
    pub redis: Option<RedisAccess>,
    pub http: reqwest::Client,
    pub clickhouse: Option<::clickhouse::Client>,
    /// Where `insert-json-rows` posts (with `clickhouse`).
    pub clickhouse_inserts: Option<ClickHouseInserts>,
    pub metrics: Metrics,
    /// `fanout plugin test` (plugin::trial): in-memory stand-ins answering every capability
    /// call instead of the services above. None in `run` and `backfill`.
    pub fakes: Option<Arc<dyn FakeServices>>,
}

/// ClickHouse's HTTP interface as the host's user, for inserts: a plain POST of the rows. The
/// `clickhouse` crate's insert (LZ4-compressed, streamed) cost several ms more per 500 rows
/// than the same POST (BENCHMARKS.md, "Capability calls"), none of it the data's.
#[derive(Clone)]
pub struct ClickHouseInserts {
    url: String,
    user: String,
    password: String,
    client: reqwest::Client,
}

impl ClickHouseInserts {
    fn new(cfg: &ServicesConfig) -> Result<Self, reqwest::Error> {
        Ok(ClickHouseInserts {
            url: cfg.clickhouse_url.trim_end_matches('/').to_string(),
            user: cfg.clickhouse_user.clone(),
            password: cfg.clickhouse_password.clone(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
        })
    }

    /// Runs `sql` (an INSERT the host built) with `body` as its data; Ok once ClickHouse
    /// answered, i.e. the rows are written.
    async fn insert(&self, sql: &str, body: Vec<u8>) -> Result<(), CapabilityError> {
        let failed = |e: String| CapabilityError::Failed(format!("clickhouse insert: {e}"));
        let mut url = reqwest::Url::parse(&format!("{}/", self.url))
            .map_err(|e| failed(format!("clickhouse_url: {e}")))?;
        url.query_pairs_mut().append_pair("query", sql);
        let mut request = self.client.post(url).body(body);
        if !self.user.is_empty() {
            request = request.header("X-ClickHouse-User", &self.user);
        }
        if !self.password.is_empty() {
            request = request.header("X-ClickHouse-Key", &self.password);
        }
        let response = request.send().await.map_err(|e| failed(error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // ClickHouse names the problem in the body (bounded: it is an error text).
        let text = response.text().await.unwrap_or_default();
        let text: String = text.trim().chars().take(2000).collect();
        Err(failed(format!("HTTP {status}: {text}")))
    }
}

/// Stand-ins for the services behind the capability interfaces: the calls a plugin makes go
/// through the same capability code (argument caps, and the grant checks when
/// [`FakeServices::checks_grants`]), then here instead of to Redis, HTTP or ClickHouse.
pub trait FakeServices: Send + Sync {
    /// Whether calls are held to the plugin's grants first, as `fanout run` holds them.
    fn checks_grants(&self) -> bool;
    fn redis(
        &self,
        commands: &[wit_redis::Command],
        atomic: bool,
    ) -> Result<Vec<wit_redis::Reply>, CapabilityError>;
    fn http(&self, request: &http::Request) -> Result<http::Response, CapabilityError>;
    fn clickhouse_execute(&self, sql: &str) -> Result<String, CapabilityError>;
    fn clickhouse_insert(
        &self,
        database: &str,
        table: &str,
        rows: &[String],
    ) -> Result<(), CapabilityError>;
    /// A call the grant checks refused: it reached no fake.
    fn refused(&self, call: String, reason: &CapabilityError);
    /// A line the plugin logged (log calls, stdout, stderr), escaped and cut as the host's.
    fn log(&self, level: log::Level, stream: &str, line: &str);
    /// A counter added to (`gauge` false) or a gauge set.
    fn metric(&self, name: &str, value: f64, gauge: bool);
}

impl Services {
    pub async fn connect(
        cfg: &ServicesConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, ServicesError> {
        let redis = if cfg.redis_url.is_empty() {
            None
        } else {
            Some(RedisAccess::connect(cfg).await?)
        };
        let clickhouse = (!cfg.clickhouse_url.is_empty()).then(|| {
            // The statement check is one fence; the user is the other (docs/architecture.md).
            if matches!(cfg.clickhouse_user.as_str(), "" | "default") {
                warn!(
                    "clickhouse: connecting as `default`: give the host a user of its own, \
                     limited to the granted databases (services.clickhouse_user)"
                );
            }
            let mut c = ::clickhouse::Client::default().with_url(&cfg.clickhouse_url);
            if !cfg.clickhouse_user.is_empty() {
                c = c.with_user(&cfg.clickhouse_user);
            }
            if !cfg.clickhouse_password.is_empty() {
                c = c.with_password(&cfg.clickhouse_password);
            }
            c
        });
        Ok(Arc::new(Services {
            runtime: tokio::runtime::Handle::current(),
            redis,
            // Redirects are followed by the capability, each hop checked against the grant.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            clickhouse_inserts: if cfg.clickhouse_url.is_empty() {
                None
            } else {
                Some(ClickHouseInserts::new(cfg)?)
            },
            clickhouse,
            metrics,
            fakes: None,
        }))
    }
}

/// One plugin's view of the services.
pub struct Capabilities {
    pub plugin: String,
    pub grants: Grants,
    pub services: Arc<Services>,
    /// What the plugin may still write to the host log (log calls, stdout, stderr).
    output: std::sync::Mutex<OutputBudget>,
}

impl Capabilities {
    pub fn new(plugin: String, grants: Grants, services: Arc<Services>) -> Self {
        Capabilities {
            plugin,
            grants,
            services,
            output: std::sync::Mutex::new(OutputBudget::new()),
        }
    }

    /// Writes one line of the plugin's to the host log: truncated, control characters
    /// escaped (a plugin cannot forge host lines), within the plugin's output budget.
    fn log_line(&self, level: log::Level, stream: &str, message: &[u8]) {
        let line = crate::deadletter::escape_truncate(
            &String::from_utf8_lossy(message),
            MAX_LOG_LINE_BYTES,
        );
        if let Some(fakes) = &self.services.fakes {
            fakes.log(level, stream, &line);
            return;
        }
        // Charged with what a host log line costs around the text, so that many short lines
        // cannot outrun the budget.
        let cost = (line.len() + LOG_LINE_OVERHEAD_BYTES) as u64;
        let allowed = match self.output.lock() {
            Ok(mut b) => b.take(cost),
            Err(_) => Err(false),
        };
        if let Err(first) = allowed {
            self.services.metrics.add_labelled(
                "fanout_plugin_log_dropped_bytes_total",
                &label("plugin", &self.plugin),
                line.len() as f64,
            );
            if first {
                warn!(plugin = %self.plugin, "plugin writes more than its log budget; dropping its lines for now (counted in fanout_plugin_log_dropped_bytes_total)");
            }
            return;
        }
        let plugin = self.plugin.as_str();
        match level {
            log::Level::Trace => trace!(plugin, stream, "{line}"),
            log::Level::Debug => debug!(plugin, stream, "{line}"),
            log::Level::Info => info!(plugin, stream, "{line}"),
            log::Level::Warn => warn!(plugin, stream, "{line}"),
            log::Level::Error => error!(plugin, stream, "{line}"),
        }
    }
}

/// The longest line a plugin writes to the host log (log calls and stdout/stderr lines).
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// A plugin's log budget: a burst of this many bytes...
const LOG_BURST_BYTES: f64 = 1024.0 * 1024.0;
/// ... refilled at this rate.
const LOG_BYTES_PER_SEC: f64 = 256.0 * 1024.0;
/// What a plugin's line costs in the host log besides its text (time, level, target, fields).
const LOG_LINE_OVERHEAD_BYTES: usize = 128;
/// The "over budget" warning is repeated at most this often per plugin.
const LOG_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A token bucket of log bytes per plugin: a flood costs the host a bounded log volume.
struct OutputBudget {
    tokens: f64,
    at: std::time::Instant,
    warned_at: Option<std::time::Instant>,
}

impl OutputBudget {
    fn new() -> Self {
        OutputBudget {
            tokens: LOG_BURST_BYTES,
            at: std::time::Instant::now(),
            warned_at: None,
        }
    }

    /// Ok when `n` bytes may be logged; Err(true) when the refusal should be warned about
    /// (the first, then at most every `LOG_WARN_EVERY`).
    fn take(&mut self, n: u64) -> Result<(), bool> {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * LOG_BYTES_PER_SEC;
        self.tokens = (self.tokens + refill).min(LOG_BURST_BYTES);
        self.at = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            Ok(())
        } else {
            let warn = self
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= LOG_WARN_EVERY);
            if warn {
                self.warned_at = Some(now);
            }
            Err(warn)
        }
    }
}

/// A plugin's WASI stdout or stderr: never the host's own, split into lines that go to the
/// host log as the plugin's (capped and escaped like log calls, within the same budget).
pub struct PluginOutput {
    caps: Arc<Capabilities>,
    stream: &'static str,
    line: Arc<std::sync::Mutex<LineBuffer>>,
}

impl PluginOutput {
    pub fn new(caps: Arc<Capabilities>, stream: &'static str) -> Self {
        PluginOutput {
            caps,
            stream,
            line: Arc::default(),
        }
    }
}

#[derive(Default)]
struct LineBuffer {
    bytes: Vec<u8>,
    /// The current line was already cut at the cap: its rest is skipped up to the newline.
    skipping: bool,
}

struct OutputWriter {
    caps: Arc<Capabilities>,
    stream: &'static str,
    line: Arc<std::sync::Mutex<LineBuffer>>,
}

impl OutputWriter {
    fn accept(&self, mut buf: &[u8]) {
        let Ok(mut line) = self.line.lock() else {
            return;
        };
        let level = if self.stream == "stderr" {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        while !buf.is_empty() {
            let (part, rest, ends) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], &buf[i + 1..], true),
                None => (buf, &buf[buf.len()..], false),
            };
            buf = rest;
            if !line.skipping {
                let room = MAX_LOG_LINE_BYTES.saturating_sub(line.bytes.len());
                line.bytes.extend_from_slice(&part[..part.len().min(room)]);
                if part.len() > room {
                    line.bytes.extend_from_slice(b" [line truncated]");
                    self.caps.log_line(level, self.stream, &line.bytes);
                    line.bytes.clear();
                    line.skipping = true;
                }
            }
            if ends {
                if !line.skipping {
                    self.caps.log_line(level, self.stream, &line.bytes);
                }
                line.bytes.clear();
                line.skipping = false;
            }
        }
    }
}

impl tokio::io::AsyncWrite for OutputWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // Always taken: what is over the budget is dropped, never pushed back on the plugin.
        self.accept(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(OutputWriter {
            caps: self.caps.clone(),
            stream: self.stream,
            line: self.line.clone(),
        })
    }
}

/// The plugin's grant for `capability`, or the error the plugin sees when it has none.
fn granted<'a, G>(
    grant: &'a Option<G>,
    capability: &str,
    plugin: &str,
) -> Result<&'a G, CapabilityError> {
    grant.as_ref().ok_or_else(|| {
        CapabilityError::NotGranted(format!("plugin `{plugin}` has no `{capability}` grant"))
    })
}

impl PluginState {
    /// The fakes standing in for the services (`fanout plugin test`), if any.
    pub(crate) fn fakes(&self) -> Option<&dyn FakeServices> {
        self.caps.services.fakes.as_deref()
    }

    /// The fakes, when they take calls without any grant check (`plugin test` without `--grants`).
    fn unchecked_fakes(&self) -> Option<&dyn FakeServices> {
        self.fakes().filter(|f| !f.checks_grants())
    }

    /// Tells the fakes a call was refused before it reached them; passes the result on.
    fn note_refusal<T>(
        &self,
        call: impl FnOnce() -> String,
        result: Result<T, CapabilityError>,
    ) -> Result<T, CapabilityError> {
        if let (Err(e), Some(fakes)) = (&result, self.fakes()) {
            fakes.refused(call(), e);
        }
        result
    }
}

impl types::Host for PluginState {}
impl errors::Host for PluginState {}

impl log::Host for PluginState {
    fn log(&mut self, level: log::Level, message: String) {
        self.caps.log_line(level, "log", message.as_bytes());
    }
}

impl PluginState {
    /// Whether the plugin may write series `name`: a valid name, and at most
    /// `MAX_PLUGIN_METRIC_NAMES` names per plugin (each one is a series on /metrics).
    fn metric_allowed(&self, name: &str) -> bool {
        let caps = &self.caps;
        match caps.services.metrics.plugin_metric_name(&caps.plugin, name) {
            Ok(()) => true,
            Err(refusal) => {
                if refusal.first {
                    warn!(plugin = %caps.plugin, reason = %refusal.reason, "plugin metric refused");
                }
                false
            }
        }
    }
}

impl metrics::Host for PluginState {
    fn counter_add(&mut self, name: String, value: u64) {
        if let Some(fakes) = &self.caps.services.fakes {
            fakes.metric(&name, value as f64, false);
        }
        if !self.metric_allowed(&name) {
            return;
        }
        let labels = format!(
            "{},{}",
            label("plugin", &self.caps.plugin),
            label("name", &name)
        );
        self.caps.services.metrics.add_labelled(
            "fanout_plugin_counter_total",
            &labels,
            value as f64,
        );
    }

    fn gauge_set(&mut self, name: String, value: f64) {
        if let Some(fakes) = &self.caps.services.fakes {
            fakes.metric(&name, value, true);
        }
        if !self.metric_allowed(&name) {
            return;
        }
        let labels = format!(
            "{},{}",
            label("plugin", &self.caps.plugin),
            label("name", &name)
        );
        self.caps
            .services
            .metrics
            .set_labelled("fanout_plugin_gauge", &labels, value);
    }
}

impl wit_redis::Host for PluginState {
    fn pipeline(
        &mut self,
        commands: Vec<wit_redis::Command>,
        atomic: bool,
    ) -> Result<Vec<wit_redis::Reply>, CapabilityError> {
        redis_access::pipeline(self, &commands, atomic)
    }

    fn pipeline_resp(
        &mut self,
        commands: Vec<u8>,
        atomic: bool,
    ) -> Result<Vec<wit_redis::Reply>, CapabilityError> {
        redis_access::pipeline_resp(self, &commands, atomic)
    }
}

/// The most requests one `send-all` keeps in flight, whatever the plugin asks for.
pub const MAX_HTTP_IN_FLIGHT: u32 = 256;

/// Redirects followed by the capability, each one checked against the grant again.
pub const MAX_HTTP_REDIRECTS: usize = 5;

/// The longest any capability call may take, whatever the plugin asks for; the time left in
/// the plugin's call caps it further.
pub const MAX_CAPABILITY_TIMEOUT: Duration = Duration::from_secs(300);

/// Headers that belong to the host (framing, routing, connection management): a plugin that
/// sets one is refused rather than silently overridden.
const HOST_OWNED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
];

/// A plugin's `max-in-flight`, clamped to what the host allows.
fn http_in_flight(requested: u32) -> usize {
    requested.clamp(1, MAX_HTTP_IN_FLIGHT) as usize
}

impl PluginState {
    /// A timeout asked for by the plugin, capped by the time left in the call: a capability
    /// call never outlives the call it is part of.
    fn capability_timeout(&self, requested_ms: u64) -> Result<Duration, CapabilityError> {
        Ok(Duration::from_millis(requested_ms.max(1))
            .min(self.remaining()?)
            .min(MAX_CAPABILITY_TIMEOUT))
    }
}

/// One checked request: everything needed to send it again on a redirect.
struct HttpCall {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    body: Bytes,
    timeout: Duration,
}

/// Checks the request against the grant (URL, method, headers): nothing is sent for a
/// refused request.
/// What one request hands the host: URL, headers and body.
fn http_request_bytes(req: &http::Request) -> usize {
    req.url.len()
        + req.body.len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

fn checked_http_call(state: &PluginState, req: http::Request) -> Result<HttpCall, CapabilityError> {
    use reqwest::header::{HeaderName, HeaderValue};
    let caps = &state.caps;
    let grant = granted(&caps.grants.http, "http", &caps.plugin)?;
    crate::plugin::check_args_size("http", http_request_bytes(&req))?;
    let url = grants::check_http_url(grant, &req.url).map_err(CapabilityError::NotGranted)?;
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| CapabilityError::Failed(format!("bad HTTP method `{}`", req.method)))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| CapabilityError::Failed(format!("bad header name `{k}`")))?;
        if HOST_OWNED_HEADERS.contains(&name.as_str()) {
            return Err(CapabilityError::NotGranted(format!(
                "header `{name}` is set by the host, not by plugins"
            )));
        }
        let value = HeaderValue::from_str(v)
            .map_err(|_| CapabilityError::Failed(format!("bad value of header `{name}`")))?;
        headers.append(name, value);
    }
    Ok(HttpCall {
        method,
        url,
        headers,
        body: Bytes::from(req.body),
        timeout: state.capability_timeout(u64::from(req.timeout_ms))?,
    })
}

/// What one call may still read: per response and, for `send-all`, for all its responses.
struct BodyBudget {
    per_response: u64,
    left: std::sync::atomic::AtomicU64,
}

impl BodyBudget {
    fn new(max: u64) -> Self {
        BodyBudget {
            per_response: max,
            left: std::sync::atomic::AtomicU64::new(max),
        }
    }

    /// Takes `n` bytes from the call's budget; false when it is spent.
    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }
}

/// Sends the call; redirects are followed here (the shared client follows none) only to
/// URLs the grant covers. The body is read in chunks and refused past the budget, so a
/// huge response costs the host at most the budget.
async fn perform_http(
    grant: &crate::config::HttpGrant,
    mut call: HttpCall,
    client: &reqwest::Client,
    budget: &BodyBudget,
) -> Result<http::Response, CapabilityError> {
    use reqwest::StatusCode;
    let deadline = tokio::time::Instant::now() + call.timeout;
    let mut hops = 0;
    let resp = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(CapabilityError::Failed("http: timed out".into()));
        }
        let resp = client
            .request(call.method.clone(), call.url.clone())
            .headers(call.headers.clone())
            .body(call.body.clone())
            .timeout(left)
            .send()
            .await
            .map_err(|e| CapabilityError::Failed(format!("http: {}", error_chain(&e))))?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok());
        let (true, Some(location)) = (status.is_redirection(), location) else {
            break resp;
        };
        hops += 1;
        if hops > MAX_HTTP_REDIRECTS {
            return Err(CapabilityError::Failed(format!(
                "http: more than {MAX_HTTP_REDIRECTS} redirects"
            )));
        }
        let next = call.url.join(location).map_err(|e| {
            CapabilityError::Failed(format!("http: bad redirect `{location}`: {e}"))
        })?;
        let next = grants::check_http_url(grant, next.as_str()).map_err(|why| {
            CapabilityError::NotGranted(format!("redirect from {} refused: {why}", call.url))
        })?;
        // As browsers do: 303 (and 301/302 after a POST) continue as a GET without a body.
        if status == StatusCode::SEE_OTHER
            || (call.method == reqwest::Method::POST
                && matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND))
        {
            call.method = reqwest::Method::GET;
            call.body = Bytes::new();
            call.headers.remove(reqwest::header::CONTENT_TYPE);
        }
        if next.origin() != call.url.origin() {
            call.headers.remove(reqwest::header::AUTHORIZATION);
            call.headers.remove(reqwest::header::COOKIE);
        }
        call.url = next;
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let too_big = || {
        CapabilityError::Failed(format!(
            "http: response body larger than the grant's max_response_bytes ({} bytes)",
            budget.per_response
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > budget.per_response)
    {
        return Err(too_big());
    }
    let mut resp = resp;
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| CapabilityError::Failed(format!("http body: {}", error_chain(&e))))?
    {
        let n = chunk.len() as u64;
        if body.len() as u64 + n > budget.per_response {
            return Err(too_big());
        }
        if !budget.take(n) {
            return Err(CapabilityError::Failed(format!(
                "http: the responses of this call together exceed the grant's \
                 max_response_bytes ({} bytes)",
                budget.per_response
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(http::Response {
        status,
        headers,
        body,
    })
}

impl http::Host for PluginState {
    fn send(&mut self, req: http::Request) -> Result<http::Response, CapabilityError> {
        if let Some(fakes) = self.unchecked_fakes() {
            return fakes.http(&req);
        }
        // Only `plugin test` keeps a copy (and a description) of the request.
        let copy = self.fakes().map(|_| req.clone());
        let what = copy
            .as_ref()
            .map(|r| format!("http {} {}", r.method, r.url))
            .unwrap_or_default();
        let call = self.note_refusal(|| what, checked_http_call(self, req))?;
        if let (Some(fakes), Some(req)) = (self.fakes(), copy) {
            return fakes.http(&req);
        }
        let caps = &self.caps;
        let grant = granted(&caps.grants.http, "http", &caps.plugin)?;
        let budget = BodyBudget::new(grant.max_response_bytes());
        self.block_on(perform_http(grant, call, &caps.services.http, &budget))
    }

    fn send_all(
        &mut self,
        requests: Vec<http::Request>,
        max_in_flight: u32,
    ) -> Vec<Result<http::Response, CapabilityError>> {
        use futures::stream::{self, StreamExt};

        if let Some(fakes) = self.unchecked_fakes() {
            return requests.iter().map(|r| fakes.http(r)).collect();
        }
        let copies = self.fakes().map(|_| requests.clone());
        let caps = &self.caps;
        let count = requests.len();
        let grant = match granted(&caps.grants.http, "http", &caps.plugin) {
            Ok(g) => g,
            Err(e) => {
                let _ = self.note_refusal(
                    || format!("http send-all of {count}"),
                    Err::<(), _>(e.clone()),
                );
                return (0..count).map(|_| Err(e.clone())).collect();
            }
        };
        let total = requests.iter().map(http_request_bytes).sum();
        if let Err(e) = crate::plugin::check_args_size("http send-all", total) {
            return (0..count).map(|_| Err(e.clone())).collect();
        }
        // Every request first: one refused request means nothing is sent at all, as with `send`.
        let mut calls = Vec::with_capacity(count);
        for (i, req) in requests.into_iter().enumerate() {
            let what = copies
                .as_ref()
                .map(|_| {
                    format!(
                        "http {} {} (request {i} of a send-all)",
                        req.method, req.url
                    )
                })
                .unwrap_or_default();
            match self.note_refusal(|| what, checked_http_call(self, req)) {
                Ok(call) => calls.push(call),
                Err(e) => {
                    let why = match &e {
                        CapabilityError::NotGranted(m) | CapabilityError::Failed(m) => m.clone(),
                    };
                    return (0..count)
                        .map(|j| {
                            Err(CapabilityError::NotGranted(if j == i {
                                why.clone()
                            } else {
                                format!("not sent: request {i} of the call is refused: {why}")
                            }))
                        })
                        .collect();
                }
            }
        }
        if let (Some(fakes), Some(requests)) = (self.fakes(), copies) {
            return requests.iter().map(|r| fakes.http(r)).collect();
        }
        let in_flight = http_in_flight(max_in_flight);
        // One budget for all the responses of the call: 256 in flight cannot each take it all.
        let budget = BodyBudget::new(grant.max_response_bytes());
        let client = &caps.services.http;
        // `buffered` keeps the results in request order while up to `in_flight` run at once.
        let all = self.block_on(async {
            Ok(stream::iter(calls)
                .map(|call| perform_http(grant, call, client, &budget))
                .buffered(in_flight)
                .collect::<Vec<_>>()
                .await)
        });
        all.unwrap_or_else(|e| (0..count).map(|_| Err(e.clone())).collect())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl clickhouse::Host for PluginState {
    fn execute(&mut self, sql: String) -> Result<String, CapabilityError> {
        if let Some(fakes) = self.unchecked_fakes() {
            return fakes.clickhouse_execute(&sql);
        }
        let caps = &self.caps;
        let what = || format!("clickhouse execute {sql}");
        let grant = self.note_refusal(
            what,
            granted(&caps.grants.clickhouse, "clickhouse", &caps.plugin),
        )?;
        // Deny by default on a parse tree; the ClickHouse user the host connects with is the
        // second fence (docs/architecture.md).
        let checked = self.checked_sql.check(&sql, grant).map_err(|reason| {
            warn!(plugin = %caps.plugin, %reason, "clickhouse statement refused");
            CapabilityError::NotGranted(reason)
        });
        self.note_refusal(what, checked)?;
        if let Some(fakes) = self.fakes() {
            return fakes.clickhouse_execute(&sql);
        }
        let client = caps
            .services
            .clickhouse
            .as_ref()
            .ok_or_else(|| CapabilityError::Failed("the host has no clickhouse_url".into()))?;
        // No default database: `CREATE DATABASE` must work before the database exists, and
        // the check above allows only `database.table` names.
        let client = client.clone();
        let max = grant.max_result_bytes();
        let read = async move {
            let mut cursor = client
                .query(&sql)
                .fetch_bytes("TabSeparated")
                .map_err(|e| CapabilityError::Failed(format!("clickhouse: {e}")))?;
            // Read in chunks and stop past the cap (dropping the cursor ends the query).
            let mut out = Vec::new();
            while let Some(chunk) = cursor
                .next()
                .await
                .map_err(|e| CapabilityError::Failed(format!("clickhouse: {e}")))?
            {
                if (out.len() + chunk.len()) as u64 > max {
                    return Err(CapabilityError::Failed(format!(
                        "clickhouse: result larger than the grant's max_result_bytes ({max} bytes)"
                    )));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        };
        // At most until the call's deadline: then the query is dropped (cancelled).
        self.block_on(read)
    }

    fn insert_json_rows(
        &mut self,
        database: String,
        table: String,
        rows: Vec<String>,
    ) -> Result<(), CapabilityError> {
        if let Some(fakes) = self.unchecked_fakes() {
            return fakes.clickhouse_insert(&database, &table, &rows);
        }
        let caps = &self.caps;
        let what = || {
            format!(
                "clickhouse insert into {database}.{table} ({} rows)",
                rows.len()
            )
        };
        let grant = self.note_refusal(
            what,
            granted(&caps.grants.clickhouse, "clickhouse", &caps.plugin),
        )?;
        let target = clickhouse_sql::check_insert_target(grant, &database, &table)
            .map_err(CapabilityError::NotGranted);
        self.note_refusal(what, target)?;
        crate::plugin::check_args_size(
            "clickhouse insert",
            rows.iter().map(|r| r.len() + 1).sum(),
        )?;
        if let Some(fakes) = self.fakes() {
            return fakes.clickhouse_insert(&database, &table, &rows);
        }
        let inserts = caps
            .services
            .clickhouse_inserts
            .clone()
            .ok_or_else(|| CapabilityError::Failed("the host has no clickhouse_url".into()))?;
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum());
        for r in rows {
            body.extend_from_slice(r.as_bytes());
            body.push(b'\n');
        }
        // Built here from the two checked identifiers: nothing else of the plugin's reaches SQL.
        let sql = format!("INSERT INTO `{database}`.`{table}` FORMAT JSONEachRow");
        // At most until the call's deadline: then the request is dropped.
        self.block_on(async move { inserts.insert(&sql, body).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_clamped_to_the_host_cap() {
        assert_eq!(http_in_flight(0), 1);
        assert_eq!(http_in_flight(32), 32);
        assert_eq!(http_in_flight(100_000), MAX_HTTP_IN_FLIGHT as usize);
    }

    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::config::{Grants, HttpGrant};
    use http::Host as _;

    /// What the test server saw: requests, and the most it was answering at once.
    #[derive(Default)]
    struct Seen {
        requests: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    /// A local HTTP server answering `POST /n` with body `n` after 30 ms.
    fn server(rt: &tokio::runtime::Runtime) -> (String, Arc<Seen>) {
        use axum::extract::{Path, State};
        let seen = Arc::new(Seen::default());
        let app = axum::Router::new()
            .route(
                "/{n}",
                axum::routing::post(
                    |State(seen): State<Arc<Seen>>, Path(n): Path<String>| async move {
                        seen.requests.fetch_add(1, Ordering::SeqCst);
                        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                        n
                    },
                ),
            )
            .with_state(seen.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/"), seen)
    }

    fn state(rt: &tokio::runtime::Runtime, prefix: &str) -> PluginState {
        state_with(rt, prefix, 1 << 20)
    }

    fn state_with(rt: &tokio::runtime::Runtime, prefix: &str, max_body: u64) -> PluginState {
        let services = Arc::new(Services {
            runtime: rt.handle().clone(),
            redis: None,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            clickhouse: None,
            clickhouse_inserts: None,
            metrics: Metrics::default(),
            fakes: None,
        });
        let caps = Arc::new(Capabilities::new(
            "t".into(),
            Grants {
                http: Some(HttpGrant {
                    url_prefixes: vec![prefix.to_string()],
                    max_response_bytes: Some(max_body),
                }),
                ..Grants::default()
            },
            services,
        ));
        PluginState::new(
            caps,
            1 << 20,
            std::time::Instant::now() + Duration::from_secs(10),
        )
    }

    fn post(url: String) -> http::Request {
        http::Request {
            method: "POST".into(),
            url,
            headers: vec![],
            body: vec![],
            timeout_ms: 5_000,
        }
    }

    #[test]
    fn send_all_answers_in_order_with_bounded_concurrency() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (base, seen) = server(&rt);
        let mut st = state(&rt, &base);
        let requests: Vec<_> = (0..40).map(|i| post(format!("{base}{i}"))).collect();
        let answers = st.send_all(requests, 4);
        let bodies: Vec<String> = answers
            .iter()
            .map(|a| match a {
                Ok(r) => String::from_utf8_lossy(&r.body).into_owned(),
                Err(e) => format!("{e:?}"),
            })
            .collect();
        let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        assert_eq!(bodies, expected, "each answer at its request's position");
        let most = seen.max_in_flight.load(Ordering::SeqCst);
        assert!(
            (2..=4).contains(&most),
            "concurrent, at most 4 at once: {most}"
        );
        // A refused connection is that request's own `failed`.
        let mut st = state(&rt, "http://127.0.0.1:9/");
        let out = st.send_all(vec![post("http://127.0.0.1:9/x".into())], 0);
        assert!(
            matches!(out[..], [Err(CapabilityError::Failed(_))]),
            "{out:?}"
        );
    }

    #[test]
    fn send_all_sends_nothing_when_one_url_is_not_granted() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (base, seen) = server(&rt);
        let mut st = state(&rt, &base);
        let out = st.send_all(
            vec![
                post(format!("{base}1")),
                post("http://elsewhere.example/".into()),
            ],
            8,
        );
        assert_eq!(out.len(), 2);
        assert!(
            out.iter()
                .all(|r| matches!(r, Err(CapabilityError::NotGranted(_)))),
            "{out:?}"
        );
        assert_eq!(seen.requests.load(Ordering::SeqCst), 0, "nothing was sent");
    }

    /// A granted server under `/api/` that redirects (to itself, to `outside`, in a loop),
    /// streams a body of `huge` bytes and echoes the Host header it saw.
    fn hostile_server(rt: &tokio::runtime::Runtime, outside: &str, huge: usize) -> String {
        use axum::response::{IntoResponse, Redirect};
        let outside = outside.to_string();
        let app = axum::Router::new()
            .route(
                "/api/out",
                axum::routing::get(move || {
                    let to = format!("{outside}api/secret");
                    async move { Redirect::to(&to) }
                }),
            )
            .route(
                "/api/in",
                axum::routing::post(|| async { Redirect::to("/api/ok") }),
            )
            .route(
                "/api/up",
                axum::routing::get(|| async { Redirect::to("/api/../admin") }),
            )
            .route(
                "/api/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/api/loop",
                axum::routing::get(|| async { Redirect::to("/api/loop") }),
            )
            .route(
                "/api/ok",
                axum::routing::get(|headers: axum::http::HeaderMap| async move {
                    format!("{:?}", headers.get("host"))
                }),
            )
            .route(
                "/api/huge",
                axum::routing::get(move || async move {
                    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                    let chunks = (0..huge / chunk.len())
                        .map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                    axum::body::Body::from_stream(futures::stream::iter(chunks)).into_response()
                }),
            );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    fn get(url: String) -> http::Request {
        http::Request {
            method: "GET".into(),
            ..post(url)
        }
    }

    #[test]
    fn a_plugin_timeout_is_capped_by_the_time_left_in_its_call() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (outside, _) = server(&rt);
        let base = hostile_server(&rt, &outside, 0);
        let mut st = state(&rt, &format!("{base}api/"));
        st.deadline = std::time::Instant::now() + Duration::from_millis(500);
        let mut req = get(format!("{base}api/slow"));
        req.timeout_ms = 300_000;
        let started = std::time::Instant::now();
        let r = st.send(req);
        assert!(matches!(r, Err(CapabilityError::Failed(_))), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "asked for 300 s, ended after {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn redirects_headers_and_bodies_are_held_to_the_grant() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (outside, seen_outside) = server(&rt);
        let base = hostile_server(&rt, &outside, 4 << 20);
        let mut st = state_with(&rt, &format!("{base}api/"), 1 << 20);
        // A redirect out of the grant is refused before anything is sent there.
        let r = st.send(get(format!("{base}api/out")));
        assert!(
            matches!(&r, Err(CapabilityError::NotGranted(m)) if m.contains("redirect")),
            "{r:?}"
        );
        let r = st.send(get(format!("{base}api/up")));
        assert!(matches!(r, Err(CapabilityError::NotGranted(_))), "{r:?}");
        assert_eq!(seen_outside.requests.load(Ordering::SeqCst), 0);
        // A redirect inside it is followed (a POST continues as a GET); loops end.
        let r = st.send(post(format!("{base}api/in"))).expect("followed");
        assert_eq!(r.status, 200);
        let r = st.send(get(format!("{base}api/loop")));
        assert!(
            matches!(&r, Err(CapabilityError::Failed(m)) if m.contains("redirects")),
            "{r:?}"
        );
        // Framing and routing headers are the host's.
        for h in ["Host", "content-length", "Transfer-Encoding", "connection"] {
            let mut req = get(format!("{base}api/ok"));
            req.headers.push((h.into(), "evil.example".into()));
            let r = st.send(req);
            assert!(
                matches!(r, Err(CapabilityError::NotGranted(_))),
                "{h}: {r:?}"
            );
        }
        // A body past max_response_bytes is refused while streaming (4 MiB, cap 1 MiB).
        let r = st.send(get(format!("{base}api/huge")));
        assert!(
            matches!(&r, Err(CapabilityError::Failed(m)) if m.contains("max_response_bytes")),
            "{r:?}"
        );
        // send-all: the cap holds for all responses of the call together.
        let mut st = state_with(&rt, &format!("{base}api/"), 3 << 20);
        let hugeish = hostile_server(&rt, &outside, 2 << 20);
        let mut st2 = state_with(&rt, &format!("{hugeish}api/"), 3 << 20);
        let out = st2.send_all(
            (0..4).map(|_| get(format!("{hugeish}api/huge"))).collect(),
            1,
        );
        let sizes: Vec<_> = out
            .iter()
            .map(|r| r.as_ref().map(|r| r.body.len()))
            .collect();
        assert!(
            matches!(sizes[..], [Ok(n), Err(_), Err(_), Err(_)] if n == 2 << 20),
            "one 2 MiB body fits a 3 MiB call budget: {sizes:?}"
        );
        // A plugin's timeout is capped by the time left in its call.
        let mut req = get(format!("{base}api/ok"));
        req.timeout_ms = u32::MAX;
        assert!(st.send(req).is_ok());
    }
}
