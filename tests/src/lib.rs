//! Harness for the integration tests: the local stack's settings, and isolated resources per
//! test (own database, CDC producer instance, topics, Redis key prefix, ClickHouse database,
//! mock-API namespace), plus the host binary started as a real process.
//!
//! The tests need `scripts/stack up` and `.stack/env` sourced. Without it they print a skip
//! notice and pass, so `cargo test` works on a bare machine; `scripts/test` sets
//! `FANOUT_REQUIRE_STACK=1`, which turns a missing stack into a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_postgres::NoTls;

/// The stack's settings, from the environment written by `scripts/stack up`.
#[derive(Clone, Debug)]
pub struct Stack {
    pub pg_admin_url: String,
    pub kafka_brokers: String,
    pub redis_url: String,
    pub clickhouse_url: String,
    /// ClickHouse's admin user (`default`, with the stack's password): the harness's own
    /// queries and the hosts of tests with their own databases.
    pub clickhouse_admin: ClickHouseUser,
    /// The host's user of the stack (`fanout`), limited to `engagement` and `fanout_sandbox`.
    pub clickhouse_host: ClickHouseUser,
    pub external_api_url: String,
    pub cdc_producer: String,
}

#[derive(Clone, Debug)]
pub struct ClickHouseUser {
    pub user: String,
    pub password: String,
}

impl ClickHouseUser {
    /// The `[services]` lines connecting a host as this user.
    pub fn services_toml(&self) -> String {
        format!(
            "clickhouse_user = \"{}\"\nclickhouse_password = \"{}\"\n",
            self.user, self.password
        )
    }
}

/// `key` from the environment, else from `.stack/env` (a shell that sourced it before the
/// stack wrote the key still finds it).
fn stack_var(key: &str) -> Option<String> {
    if let Some(v) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
        return Some(v);
    }
    let dir = std::env::var("STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".stack"));
    let text = std::fs::read_to_string(dir.join("env")).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

impl Stack {
    /// The stack, or None (with a notice) when it is not configured and not required.
    pub fn get() -> Option<Stack> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let stack = (|| {
            Some(Stack {
                pg_admin_url: var("PG_ADMIN_URL")?,
                kafka_brokers: var("KAFKA_BROKERS")?,
                redis_url: var("REDIS_URL")?,
                clickhouse_url: var("CLICKHOUSE_URL")?,
                clickhouse_admin: ClickHouseUser {
                    user: stack_var("CLICKHOUSE_ADMIN_USER").unwrap_or_else(|| "default".into()),
                    password: stack_var("CLICKHOUSE_ADMIN_PASSWORD").unwrap_or_default(),
                },
                clickhouse_host: ClickHouseUser {
                    user: stack_var("CLICKHOUSE_HOST_USER").unwrap_or_else(|| "fanout".into()),
                    password: stack_var("CLICKHOUSE_HOST_PASSWORD").unwrap_or_default(),
                },
                external_api_url: var("EXTERNAL_API_URL")?,
                cdc_producer: var("CDC_PRODUCER")?,
            })
        })();
        if stack.is_none() {
            if std::env::var("FANOUT_REQUIRE_STACK").as_deref() == Ok("1") {
                panic!("FANOUT_REQUIRE_STACK=1 but the stack settings are missing: run `scripts/stack up` and `. .stack/env`");
            }
            eprintln!(
                "SKIPPED: integration test needs the local stack (scripts/stack up; . .stack/env)"
            );
        }
        stack
    }

    pub fn pg_url(&self, database: &str) -> String {
        match self.pg_admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{database}"),
            None => self.pg_admin_url.clone(),
        }
    }
}

/// A name unique to this test run: prefix + pid + counter.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        millis,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A wasm plugin built by scripts/build-plugins.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let p = repo_root()
        .join("plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-plugins",
        p.display()
    );
    p
}

/// The host binary (built by `cargo build -p fanout`; scripts/test does it).
pub fn host_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FANOUT_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let p = target.join("debug/fanout");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p fanout`",
        p.display()
    );
    p
}

/// A fresh PostgreSQL database with the project's schema (and, optionally, seed rows).
pub struct Database {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl Database {
    pub async fn create(stack: &Stack, seed: bool) -> Database {
        let name = unique("t");
        let admin = connect(&stack.pg_admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = stack.pg_url(&name);
        let db = connect(&url).await;
        let schema = std::fs::read_to_string(repo_root().join("scripts/sql/schema.sql"))
            .expect("schema.sql");
        db.batch_execute(&schema).await.expect("apply schema");
        if seed {
            let seed = std::fs::read_to_string(repo_root().join("scripts/sql/seed.sql"))
                .expect("seed.sql");
            db.batch_execute(&seed).await.expect("apply seed");
        }
        Database {
            name,
            url,
            admin_url: stack.pg_admin_url.clone(),
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Inserts one event and returns its id.
    pub async fn insert_event(
        &self,
        client: &tokio_postgres::Client,
        content_id: Option<i64>,
        user_id: i64,
        event_type: &str,
        duration_ms: Option<i32>,
        device: &str,
    ) -> i64 {
        client
            .query_one(
                "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) VALUES ($1,$2,$3,$4,$5) RETURNING id",
                &[&content_id, &user_id, &event_type, &duration_ms, &device],
            )
            .await
            .expect("insert event")
            .get(0)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Best effort, off the test's runtime: slots of this database must go first.
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&admin, NoTls).await.ok()?;
                tokio::spawn(conn);
                let _ = c
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid();
                         SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active;"
                    ))
                    .await;
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                Some(())
            })
        })
        .join();
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A child process killed (SIGKILL) when dropped, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log_name: &str) -> Proc {
        let dir = repo_root().join("target/test-logs");
        let _ = std::fs::create_dir_all(&dir);
        let log = dir.join(format!("{log_name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child, log }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// This test's own Debezium instance: own database, slot, publication and topic prefix.
pub struct Cdc {
    pub prefix: String,
    pub proc: Proc,
}

impl Cdc {
    pub fn start(stack: &Stack, db: &Database) -> Cdc {
        let prefix = db.name.clone();
        let mut cmd = Command::new(&stack.cdc_producer);
        cmd.args([
            "--pg-url",
            &db.url,
            "--topic-prefix",
            &prefix,
            "--slot-name",
            &format!("{}_slot", db.name),
            "--brokers",
            &stack.kafka_brokers,
            "--partitions",
            "4",
        ]);
        let proc = Proc::spawn(cmd, &format!("cdc-{prefix}"));
        let cdc = Cdc { prefix, proc };
        cdc.wait_streaming();
        cdc
    }

    /// Rows inserted during Debezium's initial snapshot arrive as snapshot reads (`op: "r"`),
    /// which the host skips by default: tests insert only once the connector streams.
    fn wait_streaming(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.proc.log_text().contains("Processing messages") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "Debezium did not start streaming; see {}",
            self.proc.log.display()
        );
    }

    pub fn events_topic(&self) -> String {
        format!("{}.public.engagement_events", self.prefix)
    }

    pub fn content_topic(&self) -> String {
        format!("{}.public.content", self.prefix)
    }
}

pub async fn create_topic(stack: &Stack, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .expect("admin client");
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let _ = admin.create_topics(&[t], &AdminOptions::new()).await;
    // Wait until the broker serves its metadata: creation is not always synchronous.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            if md
                .topics()
                .first()
                .is_some_and(|t| t.partitions().len() == partitions as usize)
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("topic {topic} not visible after creation");
}

pub async fn produce(stack: &Stack, topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .expect("producer");
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(p) = payload {
        rec = rec.payload(p);
    }
    producer
        .send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// A record read back from a topic (the dead-letter topic, typically).
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a topic from the beginning until `want` records arrived or `timeout` passed.
///
/// Only for a test's own topic (a per-test dead-letter or CDC topic: a few records). The
/// stack's long-lived topics (`dbserver1.*`, `fanout.dead_letter`) hold everything a used stack
/// ever carried, so reading them from the beginning slows down with its age; they are refused.
pub fn read_topic(stack: &Stack, topic: &str, want: usize, timeout: Duration) -> Vec<Record> {
    use rdkafka::message::Headers;
    assert!(
        !topic.starts_with("dbserver1.") && !topic.starts_with("fanout."),
        "read_topic({topic}): a long-lived stack topic; read a test's own topic instead"
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    let md = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md)
                if md
                    .topics()
                    .first()
                    .is_some_and(|t| !t.partitions().is_empty()) =>
            {
                break md
            }
            _ if Instant::now() > deadline => return vec![],
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// The running host, configured by a TOML string written to a temp file.
pub struct HostProc {
    pub proc: Proc,
    pub config_path: PathBuf,
    pub metrics_addr: String,
}

impl HostProc {
    pub fn start(name: &str, config_toml: &str, metrics_addr: &str) -> HostProc {
        let dir = repo_root().join("target/test-logs");
        let _ = std::fs::create_dir_all(&dir);
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config_toml).expect("write config");
        Self::start_with(name, config_path, metrics_addr)
    }

    pub fn start_with(name: &str, config_path: PathBuf, metrics_addr: &str) -> HostProc {
        let mut cmd = Command::new(host_binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,fanout=debug");
        HostProc {
            proc: Proc::spawn(cmd, &format!("host-{name}-{}", unique("run"))),
            config_path,
            metrics_addr: metrics_addr.to_string(),
        }
    }

    /// Restarts with the same config (after a kill).
    pub fn restart(&mut self, name: &str) {
        self.proc.kill9();
        let fresh = Self::start_with(name, self.config_path.clone(), &self.metrics_addr);
        *self = fresh;
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of one series, e.g. `fanout_events_delivered_total{plugin="rec"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A free loopback port for the host's metrics server.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    addr.to_string()
}

/// Waits until `f` returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn redis(stack: &Stack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(stack.redis_url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// The events a testkit plugin recorded under `key`, as JSON.
pub async fn recorded(
    conn: &redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<serde_json::Value> {
    let mut conn = conn.clone();
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect()
}

/// A host config for tests: topics of `cdc_prefix`, own group and dead-letter topic.
pub struct ConfigBuilder {
    pub stack: Stack,
    pub events_topic: String,
    pub content_topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub pg_url: String,
    pub metrics_addr: String,
    pub max_wait_ms: u64,
    pub max_events: usize,
    pub plugins: Vec<String>,
    pub extra: String,
    /// Who the host connects to ClickHouse as: the admin unless a test says otherwise.
    pub clickhouse_user: ClickHouseUser,
}

impl ConfigBuilder {
    pub fn new(stack: &Stack, events_topic: &str, content_topic: &str, pg_url: &str) -> Self {
        ConfigBuilder {
            stack: stack.clone(),
            events_topic: events_topic.into(),
            content_topic: content_topic.into(),
            dead_letter_topic: unique("dlq"),
            group_id: unique("group"),
            pg_url: pg_url.into(),
            metrics_addr: free_addr(),
            max_wait_ms: 100,
            max_events: 500,
            plugins: vec![],
            extra: String::new(),
            clickhouse_user: stack.clickhouse_admin.clone(),
        }
    }

    /// A testkit plugin recording into the Redis list `key` (its grant is the key itself).
    pub fn testkit(
        mut self,
        name: &str,
        mode: &str,
        key: &str,
        policy: &str,
        max_retries: u32,
    ) -> Self {
        self.plugins.push(format!(
            r#"
[[plugins]]
name = "{name}"
path = "{path}"
failure_policy = "{policy}"
max_retries = {max_retries}
retry_backoff_ms = 50
max_backoff_ms = 200
fuel_per_call = 500000000
memory_mb = 32
call_timeout_ms = 20000
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
[plugins.config]
key = "{key}"
mode = "{mode}"
"#,
            path = plugin_wasm("testkit").display()
        ));
        self
    }

    /// The default redis-topn plugin, every key under `prefix` (its grant is the prefix).
    pub fn redis_topn(self, prefix: &str) -> Self {
        self.plugin_raw(&plugin_toml::redis_topn("redis-topn", prefix))
    }

    pub fn plugin_raw(mut self, toml: &str) -> Self {
        self.plugins.push(toml.to_string());
        self
    }

    pub fn render(&self) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
events_topic = "{events}"
content_topic = "{content}"
dead_letter_topic = "{dlq}"
# Static membership: a restarted host takes its partitions back at once. tansu 0.6.0 does
# not evict a member that died without leaving (kill -9), so without it a restart waits forever.
properties = {{ "group.instance.id" = "{group}-host" }}

[postgres]
url = "{pg}"

[batch]
max_events = {max_events}
max_wait_ms = {max_wait}

[services]
redis_url = "{redis}"
clickhouse_url = "{ch}"
{ch_user}
[http]
listen = "{metrics}"
{extra}
{plugins}
"#,
            brokers = self.stack.kafka_brokers,
            group = self.group_id,
            events = self.events_topic,
            content = self.content_topic,
            dlq = self.dead_letter_topic,
            pg = self.pg_url,
            max_events = self.max_events,
            max_wait = self.max_wait_ms,
            redis = self.stack.redis_url,
            ch = self.stack.clickhouse_url,
            ch_user = self.clickhouse_user.services_toml(),
            metrics = self.metrics_addr,
            extra = self.extra,
            plugins = self.plugins.join("\n"),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Driving one plugin in-process through the host library (no Kafka): load it from a
// `[[plugins]]` TOML snippet, hand it batches, read its metrics.

/// A plugin loaded in this process with the host's own loader, capabilities and grants.
pub struct LoadedPlugin {
    pub plugin: std::sync::Arc<fanout::plugin::Plugin>,
    pub metrics: fanout::metrics::Metrics,
}

impl LoadedPlugin {
    /// Loads the single `[[plugins]]` entry of `plugin_toml` against the stack's services.
    /// Call from a multi-thread tokio test (capability calls block on the runtime).
    pub async fn load(stack: &Stack, plugin_toml: &str) -> LoadedPlugin {
        Self::load_as(stack, plugin_toml, &stack.clickhouse_admin).await
    }

    /// [`LoadedPlugin::load`] with the host connecting to ClickHouse as `user`.
    pub async fn load_as(stack: &Stack, plugin_toml: &str, user: &ClickHouseUser) -> LoadedPlugin {
        Self::load_with(stack, plugin_toml, user, "").await
    }

    /// [`LoadedPlugin::load_as`] with more `[services]` lines (`redis_users = "provided"`).
    pub async fn load_with(
        stack: &Stack,
        plugin_toml: &str,
        user: &ClickHouseUser,
        services: &str,
    ) -> LoadedPlugin {
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\n[services]\nredis_url = \"{}\"\nclickhouse_url = \"{}\"\n{}{services}\n{plugin_toml}",
            stack.kafka_brokers,
            stack.redis_url,
            stack.clickhouse_url,
            user.services_toml()
        );
        let config =
            fanout::config::Config::from_toml(&text, Path::new("test.toml"), std::iter::empty())
                .unwrap_or_else(|e| panic!("plugin config: {e}\n{text}"));
        let plugin_cfg = config
            .plugins
            .into_iter()
            .next()
            .expect("one [[plugins]] entry");
        let metrics = fanout::metrics::Metrics::default();
        let services =
            fanout::plugin::capabilities::Services::connect(&config.services, metrics.clone())
                .await
                .expect("services");
        let plugin = tokio::task::spawn_blocking(move || {
            let engine =
                fanout::plugin::engine_for(std::slice::from_ref(&plugin_cfg)).expect("engine");
            let linker = fanout::plugin::linker(&engine).expect("linker");
            fanout::plugin::Plugin::load(plugin_cfg, &engine, linker, services)
        })
        .await
        .expect("load task")
        .unwrap_or_else(|e| panic!("plugin load: {e}"));
        LoadedPlugin {
            plugin: std::sync::Arc::new(plugin),
            metrics,
        }
    }

    /// Hands `events` to the plugin as one batch with the given id.
    pub async fn write(
        &self,
        batch_id: &str,
        events: &[fanout::plugin::WitEvent],
    ) -> fanout::plugin::WriteOutcome {
        let batch = fanout::plugin::WitBatch {
            id: batch_id.to_string(),
            events: events.to_vec(),
            sources: vec![],
        };
        self.plugin
            .write(std::sync::Arc::new(
                fanout::plugin::PluginBatch::unpositioned(batch),
            ))
            .await
            .unwrap_or_else(|e| panic!("plugin call failed: {e}"))
    }

    /// Hands `events` to the plugin as one batch whose events sit at `offsets` of partition
    /// `partition` of `topic` (a `None` offset: a backfilled event), as a lane would.
    pub async fn write_at(
        &self,
        topic: &str,
        partition: i32,
        events: &[fanout::plugin::WitEvent],
        offsets: &[Option<i64>],
    ) -> fanout::plugin::WriteOutcome {
        let live: Vec<i64> = offsets.iter().flatten().copied().collect();
        let (first, last) = (
            live.iter().min().copied().unwrap_or(0),
            live.iter().max().copied().unwrap_or(0),
        );
        let batch = fanout::plugin::WitBatch {
            id: format!("{topic}/{partition}:{first}-{last}"),
            events: events.to_vec(),
            sources: vec![fanout::plugin::SourceRange {
                topic: topic.to_string(),
                partition,
                first_offset: first,
                last_offset: last,
            }],
        };
        let positions: Vec<_> = offsets
            .iter()
            .map(|o| o.map(|offset| fanout::plugin::EventPosition { source: 0, offset }))
            .collect();
        self.plugin
            .write(std::sync::Arc::new(fanout::plugin::PluginBatch::new(
                &batch, &positions,
            )))
            .await
            .unwrap_or_else(|e| panic!("plugin call failed: {e}"))
    }

    /// The plugin's own counter `name` (fanout_plugin_counter_total{plugin=..,name=..}).
    pub fn counter(&self, name: &str) -> f64 {
        let labels = format!(
            "{},{}",
            fanout::metrics::label("plugin", self.plugin.name()),
            fanout::metrics::label("name", name)
        );
        self.metrics
            .labelled("fanout_plugin_counter_total", &labels)
    }
}

/// An enriched event with every field set from the SPEC-4 example shape; change what a test needs.
pub fn wit_event(
    event_id: i64,
    content_id: Option<i64>,
    event_ts_micros: i64,
) -> fanout::plugin::WitEvent {
    fanout::plugin::WitEvent {
        event_id,
        content_id,
        user_id: Some(999),
        event_type: Some("play".into()),
        event_ts_micros,
        duration_ms: Some(7000),
        device: Some("web".into()),
        content_type: Some("video".into()),
        length_seconds: Some(300),
        engagement_seconds: Some(7.0),
        engagement_pct: Some(0.02),
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A Debezium insert envelope (schemaless JSON) of one engagement event, as the CDC produces it.
pub fn event_envelope(id: i64, content_id: i64, event_ts: &str) -> Vec<u8> {
    format!(
        r#"{{"before":null,"after":{{"id":{id},"content_id":{content_id},"user_id":7,"event_type":"play","event_ts":"{event_ts}","duration_ms":7000,"device":"web"}},"source":{{}},"op":"c","ts_ms":1}}"#
    )
    .into_bytes()
}

/// Produces one insert envelope per id (content 1, a fixed event time), unkeyed, in order.
pub async fn produce_events(stack: &Stack, topic: &str, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        produce(
            stack,
            topic,
            None,
            Some(&event_envelope(id, 1, "2026-01-08T14:21:52Z")),
        )
        .await;
    }
}

/// Runs a statement on ClickHouse over HTTP as the admin user and returns the body; panics on
/// an error status.
pub async fn clickhouse_query(stack: &Stack, sql: &str) -> String {
    match clickhouse_query_as(stack, &stack.clickhouse_admin, sql).await {
        Ok(body) => body,
        Err(e) => panic!("clickhouse {sql}: {e}"),
    }
}

/// Runs a statement as `user`; Err holds the status and ClickHouse's message.
pub async fn clickhouse_query_as(
    stack: &Stack,
    user: &ClickHouseUser,
    sql: &str,
) -> Result<String, String> {
    let url = format!(
        "{}/?output_format_json_quote_64bit_integers=0",
        stack.clickhouse_url.trim_end_matches('/')
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .basic_auth(&user.user, Some(&user.password))
        .body(sql.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// Rows of a `FORMAT JSONEachRow` answer.
pub async fn clickhouse_rows(stack: &Stack, sql: &str) -> Vec<serde_json::Value> {
    clickhouse_query(stack, &format!("{sql} FORMAT JSONEachRow"))
        .await
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("row {l}: {e}")))
        .collect()
}

/// The requests the mock API recorded in namespace `ns`.
pub async fn mock_received(stack: &Stack, ns: &str) -> Vec<serde_json::Value> {
    let url = format!(
        "{}/ns/{ns}/received",
        stack.external_api_url.trim_end_matches('/')
    );
    match reqwest::get(&url).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => vec![],
    }
}

/// Sets the mock API's behaviour in namespace `ns` (see scripts/mock_api.py /control).
pub async fn mock_control(stack: &Stack, ns: &str, control: serde_json::Value) {
    let url = format!(
        "{}/ns/{ns}/control",
        stack.external_api_url.trim_end_matches('/')
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&control)
        .send()
        .await
        .expect("mock control");
    assert!(
        resp.status().is_success(),
        "mock control: {}",
        resp.status()
    );
}

/// A loopback URL where nothing listens (connection refused).
pub fn closed_port_url() -> String {
    format!("http://{}/", free_addr())
}

/// `[[plugins]]` entries of the default plugins, each confined to the test's own resources.
pub mod plugin_toml {
    use super::{plugin_wasm, Stack};

    /// clickhouse.wasm writing to (and granted) database `db` only.
    pub fn clickhouse(name: &str, db: &str) -> String {
        format!(
            r#"
[[plugins]]
name = "{name}"
path = "{}"
[plugins.grants]
clickhouse = {{ databases = ["{db}"] }}
[plugins.config]
database = "{db}"
"#,
            plugin_wasm("clickhouse").display()
        )
    }

    /// redis_topn.wasm with every key (exactly-once bookkeeping and old markers included)
    /// under `prefix`, granted exactly the key prefixes it uses (as config/local.toml does).
    pub fn redis_topn(name: &str, prefix: &str) -> String {
        format!(
            r#"
[[plugins]]
name = "{name}"
path = "{}"
[plugins.grants]
redis = {{ key_prefixes = ["{prefix}content:", "{prefix}top:content:", "{prefix}fanout:once:", "{prefix}fanout:seen:"], allow_scripts = true }}
[plugins.config]
key_prefix = "{prefix}"
"#,
            plugin_wasm("redis_topn").display()
        )
    }

    /// device_counter.wasm (the exactly-once example) with its counts and bookkeeping under
    /// `prefix`.
    pub fn device_counter(name: &str, prefix: &str) -> String {
        format!(
            r#"
[[plugins]]
name = "{name}"
path = "{}"
[plugins.grants]
redis = {{ key_prefixes = ["{prefix}devcount:", "{prefix}devcount-once:"], allow_scripts = true }}
[plugins.config]
key_prefix = "{prefix}devcount:"
once_key_prefix = "{prefix}devcount-once:"
"#,
            plugin_wasm("device_counter").display()
        )
    }

    /// external_api.wasm posting to the mock's namespace `ns` (`mode`: per-event or batch).
    pub fn external_api(name: &str, stack: &Stack, ns: &str, mode: &str) -> String {
        let url = stack.external_api_url.trim_end_matches('/');
        format!(
            r#"
[[plugins]]
name = "{name}"
path = "{}"
[plugins.grants]
http = {{ url_prefixes = ["{url}/"] }}
[plugins.config]
url = "{url}/ns/{ns}/events"
mode = "{mode}"
"#,
            plugin_wasm("external_api").display()
        )
    }

    /// The three default plugins, as `config/local.toml` wires them, on the test's resources.
    pub fn defaults(stack: &Stack, db: &str, prefix: &str, ns: &str, api_mode: &str) -> String {
        [
            clickhouse("clickhouse", db),
            redis_topn("redis-topn", prefix),
            external_api("external-api", stack, ns, api_mode),
        ]
        .concat()
    }
}

/// A TCP forwarder on a fixed loopback port that a test can take down (connections refused)
/// and bring back: an external service that goes away and returns, seen from the plugin.
pub struct ToggleProxy {
    pub addr: std::net::SocketAddr,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ToggleProxy {
    /// Forwards to `target` ("host:port") from a free loopback port, up at once.
    pub async fn start(target: &str) -> ToggleProxy {
        let addr: std::net::SocketAddr = free_addr().parse().expect("addr");
        let mut proxy = ToggleProxy {
            addr,
            target: target.to_string(),
            task: None,
        };
        proxy.up().await;
        proxy
    }

    /// "http://addr/" : the base URL the plugin is pointed at.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Listens again (SO_REUSEADDR: the port's old connections may linger in TIME_WAIT).
    pub async fn up(&mut self) {
        if self.task.is_some() {
            return;
        }
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(self.addr).expect("bind the proxy port again");
        let listener = socket.listen(1024).expect("listen");
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Closes the listener and every open connection: new connections are refused.
    pub async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
