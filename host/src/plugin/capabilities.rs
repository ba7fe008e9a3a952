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
    pub metrics: Metrics,
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
            http: reqwest::Client::builder().build()?,
            clickhouse,
            metrics,
        }))
    }
}

/// One plugin's view of the services.
pub struct Capabilities {
    pub plugin: String,
    pub grants: Grants,
    pub services: Arc<Services>,
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

impl types::Host for PluginState {}
impl errors::Host for PluginState {}

impl log::Host for PluginState {
    fn log(&mut self, level: log::Level, message: String) {
        let plugin = self.caps.plugin.as_str();
        match level {
            log::Level::Trace => trace!(plugin, "{message}"),
            log::Level::Debug => debug!(plugin, "{message}"),
            log::Level::Info => info!(plugin, "{message}"),
            log::Level::Warn => warn!(plugin, "{message}"),
            log::Level::Error => error!(plugin, "{message}"),
        }
    }
}

impl metrics::Host for PluginState {
    fn counter_add(&mut self, name: String, value: u64) {
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
        redis_access::pipeline(self, commands, atomic)
    }
}

/// The most requests one `send-all` keeps in flight, whatever the plugin asks for.
pub const MAX_HTTP_IN_FLIGHT: u32 = 256;

/// A plugin's `max-in-flight`, clamped to what the host allows.
fn http_in_flight(requested: u32) -> usize {
    requested.clamp(1, MAX_HTTP_IN_FLIGHT) as usize
}

/// Checks the request's URL against the grant: nothing is built for a refused URL.
fn granted_http_url(
    caps: &Capabilities,
    req: &http::Request,
) -> Result<reqwest::Url, CapabilityError> {
    let grant = granted(&caps.grants.http, "http", &caps.plugin)?;
    grants::check_http_url(grant, &req.url).map_err(CapabilityError::NotGranted)
}

/// The reqwest request for a granted URL; the timeout is capped as for every request.
fn http_request(
    caps: &Capabilities,
    url: reqwest::Url,
    req: http::Request,
) -> Result<reqwest::RequestBuilder, CapabilityError> {
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| CapabilityError::Failed(format!("bad HTTP method `{}`", req.method)))?;
    let timeout = Duration::from_millis(u64::from(req.timeout_ms.clamp(1, 300_000)));
    let mut builder = caps
        .services
        .http
        .request(method, url)
        .timeout(timeout)
        .body(req.body);
    for (k, v) in &req.headers {
        builder = builder.header(k, v);
    }
    Ok(builder)
}

async fn perform_http(builder: reqwest::RequestBuilder) -> Result<http::Response, CapabilityError> {
    let resp = builder
        .send()
        .await
        .map_err(|e| CapabilityError::Failed(format!("http: {}", error_chain(&e))))?;
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
    let body = resp
        .bytes()
        .await
        .map_err(|e| CapabilityError::Failed(format!("http body: {}", error_chain(&e))))?;
    Ok(http::Response {
        status,
        headers,
        body: body.to_vec(),
    })
}

impl http::Host for PluginState {
    fn send(&mut self, req: http::Request) -> Result<http::Response, CapabilityError> {
        let caps = &self.caps;
        let url = granted_http_url(caps, &req)?;
        let builder = http_request(caps, url, req)?;
        caps.services.runtime.block_on(perform_http(builder))
    }

    fn send_all(
        &mut self,
        requests: Vec<http::Request>,
        max_in_flight: u32,
    ) -> Vec<Result<http::Response, CapabilityError>> {
        use futures::stream::{self, StreamExt};

        let caps = &self.caps;
        // Every URL first: one refused URL means nothing is sent at all, as with `send`.
        let mut urls = Vec::with_capacity(requests.len());
        for (i, req) in requests.iter().enumerate() {
            match granted_http_url(caps, req) {
                Ok(url) => urls.push(url),
                Err(e) => {
                    let why = match &e {
                        CapabilityError::NotGranted(m) | CapabilityError::Failed(m) => m.clone(),
                    };
                    return requests
                        .iter()
                        .enumerate()
                        .map(|(j, _)| {
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
        let builders: Vec<_> = urls
            .into_iter()
            .zip(requests)
            .map(|(url, req)| http_request(caps, url, req))
            .collect();
        let in_flight = http_in_flight(max_in_flight);
        // `buffered` keeps the results in request order while up to `in_flight` run at once.
        caps.services.runtime.block_on(
            stream::iter(builders)
                .map(|b| async move { perform_http(b?).await })
                .buffered(in_flight)
                .collect::<Vec<_>>(),
        )
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
        let caps = &self.caps;
        let grant = granted(&caps.grants.clickhouse, "clickhouse", &caps.plugin)?;
        // Deny by default on a parse tree; the ClickHouse user the host connects with is the
        // second fence (docs/architecture.md).
        clickhouse_sql::check_statement(&sql, grant).map_err(|reason| {
            warn!(plugin = %caps.plugin, %reason, "clickhouse statement refused");
            CapabilityError::NotGranted(reason)
        })?;
        let client = caps
            .services
            .clickhouse
            .as_ref()
            .ok_or_else(|| CapabilityError::Failed("the host has no clickhouse_url".into()))?;
        // No default database: `CREATE DATABASE` must work before the database exists, and
        // the check above allows only `database.table` names.
        let client = client.clone();
        caps.services.runtime.block_on(async move {
            let mut cursor = client
                .query(&sql)
                .fetch_bytes("TabSeparated")
                .map_err(|e| CapabilityError::Failed(format!("clickhouse: {e}")))?;
            let bytes = cursor
                .collect()
                .await
                .map_err(|e| CapabilityError::Failed(format!("clickhouse: {e}")))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
    }

    fn insert_json_rows(
        &mut self,
        database: String,
        table: String,
        rows: Vec<String>,
    ) -> Result<(), CapabilityError> {
        let caps = &self.caps;
        let grant = granted(&caps.grants.clickhouse, "clickhouse", &caps.plugin)?;
        clickhouse_sql::check_insert_target(grant, &database, &table)
            .map_err(CapabilityError::NotGranted)?;
        let client = caps
            .services
            .clickhouse
            .clone()
            .ok_or_else(|| CapabilityError::Failed("the host has no clickhouse_url".into()))?;
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum());
        for r in rows {
            body.extend_from_slice(r.as_bytes());
            body.push(b'\n');
        }
        // Built here from the two checked identifiers: nothing else of the plugin's reaches SQL.
        let sql = format!("INSERT INTO `{database}`.`{table}` FORMAT JSONEachRow");
        caps.services.runtime.block_on(async move {
            let mut insert = client.insert_formatted_with(sql);
            insert
                .send(Bytes::from(body))
                .await
                .map_err(|e| CapabilityError::Failed(format!("clickhouse insert: {e}")))?;
            // `end` returns once ClickHouse answered the INSERT: the rows are written.
            insert
                .end()
                .await
                .map_err(|e| CapabilityError::Failed(format!("clickhouse insert: {e}")))
        })
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
        let services = Arc::new(Services {
            runtime: rt.handle().clone(),
            redis: None,
            http: reqwest::Client::new(),
            clickhouse: None,
            metrics: Metrics::default(),
        });
        PluginState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: wasmtime::component::ResourceTable::new(),
            limiter: super::super::MemoryLimiter {
                max_bytes: 1 << 20,
                denied: false,
            },
            caps: Arc::new(Capabilities {
                plugin: "t".into(),
                grants: Grants {
                    http: Some(HttpGrant {
                        url_prefixes: vec![prefix.to_string()],
                    }),
                    ..Grants::default()
                },
                services,
            }),
        }
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
        let mut st = state(&rt, "http://127.0.0.1:");
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
}
