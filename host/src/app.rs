//! Assembles a running host from a config: metrics, shared services, plugins, dead letters,
//! the content table; then [`App::run`] starts the live path (one lane per plugin, the lag
//! monitor, the content follower, the operator's HTTP endpoints). Backfill starts from
//! [`App::start`] too and delivers through the same plugins.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};

use crate::config::Config;
use crate::content::{ContentError, ContentTable};
use crate::deadletter::DeadLetterQueue;
use crate::lane::consumer::{lane_consumer, lanes_established, seed_and_log};
use crate::lane::decoded::DecodedMessages;
use crate::lane::delivery::{Delivery, PluginSlot};
use crate::lane::lag::{LagMonitor, WatchedLane};
use crate::lane::Lane;
use crate::metrics::Metrics;
use crate::plugin::capabilities::{Services, ServicesError};
use crate::plugin::{self, Plugin, PluginError};
use crate::reload::Reloader;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("services: {0}")]
    Services(#[from] ServicesError),
    #[error("plugin `{name}`: {source}")]
    Plugin { name: String, source: PluginError },
    #[error("content table: {0}")]
    Content(#[from] ContentError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("no plugins configured: add at least one [[plugins]] entry")]
    NoPlugins,
    #[error("no plugin named `{0}` in the config (known: {1})")]
    UnknownPlugin(String, String),
    #[error("cannot start the lag monitor: {0}")]
    LagMonitor(std::io::Error),
    #[error("cannot read the lanes' committed positions: {0}")]
    Positions(String),
    #[error("lane `{0}` panicked: {1}")]
    LanePanicked(String, String),
}

pub struct App {
    pub config: Config,
    pub metrics: Metrics,
    pub plugins: Vec<Arc<Plugin>>,
    pub dead_letters: Arc<DeadLetterQueue>,
    pub content: ContentTable,
    /// What loads plugins, kept for reloads (hot swap).
    pub engine: wasmtime::Engine,
    pub linker: Arc<wasmtime::component::Linker<plugin::PluginState>>,
    pub services: Arc<Services>,
}

/// Where a reload reads the config from, and the SIGHUPs that ask for one.
pub struct ReloadOn {
    pub path: std::path::PathBuf,
    pub hangups: tokio::signal::unix::Signal,
}

impl App {
    /// Loads every configured plugin.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, &[]).await
    }

    /// Loads the plugins named in `only` (all when empty).
    pub async fn start_with(mut config: Config, only: &[String]) -> Result<Self, StartError> {
        let metrics = Metrics::default();
        if config.plugins.is_empty() {
            return Err(StartError::NoPlugins);
        }
        if let Some(unknown) = only
            .iter()
            .find(|n| !config.plugins.iter().any(|p| &&p.name == n))
        {
            let known: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
            return Err(StartError::UnknownPlugin(unknown.clone(), known.join(", ")));
        }
        if !only.is_empty() {
            config.plugins.retain(|p| only.contains(&p.name));
        }
        let services = Services::connect(&config.services, metrics.clone()).await?;
        let setup = |name: &str| {
            let name = name.to_string();
            move |source| StartError::Plugin { name, source }
        };
        let engine = plugin::engine_for(&config.plugins).map_err(setup("<engine>"))?;
        let linker = plugin::linker(&engine).map_err(setup("<linker>"))?;
        // Compiling a component takes a moment of CPU (none when cached): off the async
        // threads, all plugins at once.
        let loads = config.plugins.iter().map(|pc| {
            let name = pc.name.clone();
            let (engine, linker, services, pc) =
                (engine.clone(), linker.clone(), services.clone(), pc.clone());
            async move {
                tokio::task::spawn_blocking(move || Plugin::load(pc, &engine, linker, services))
                    .await
                    .map_err(|e| StartError::Plugin {
                        name: name.clone(),
                        source: PluginError::Init(e.to_string()),
                    })?
                    .map(Arc::new)
                    .map_err(|source| StartError::Plugin { name, source })
            }
        });
        let plugins = futures::future::try_join_all(loads).await?;
        let dead_letters = Arc::new(DeadLetterQueue::new(
            &config.kafka.brokers,
            &config.kafka.dead_letter_topic,
            &config.kafka.properties,
            metrics.clone(),
        )?);
        dead_letters
            .ensure_topic(&config.kafka.brokers, &config.kafka.properties)
            .await;
        let content = if config.postgres.url.is_empty() {
            ContentTable::default()
        } else {
            ContentTable::connect(&config.postgres.url).await?
        };
        info!(
            plugins = plugins.len(),
            content_rows = content.len(),
            "host assembled"
        );
        Ok(App {
            config,
            metrics,
            plugins,
            dead_letters,
            content,
            engine,
            linker,
            services,
        })
    }

    /// How batches reach `plugin`.
    pub fn delivery(&self, plugin: &Arc<Plugin>) -> Arc<Delivery> {
        Arc::new(Delivery {
            plugin: plugin.clone(),
            dead_letters: self.dead_letters.clone(),
            metrics: self.metrics.clone(),
            generation: 0,
            taken: Default::default(),
        })
    }

    /// The live path: one lane per plugin until shutdown. Err when a lane panicked (a bug:
    /// the process must end non-zero rather than run on without that plugin).
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), StartError> {
        self.run_reloading(shutdown, None).await
    }

    /// [`App::run`], and with `reload`, a hot swap of changed plugins on every SIGHUP
    /// (see [`crate::reload`]).
    pub async fn run_reloading(
        self,
        shutdown: watch::Receiver<bool>,
        reload: Option<ReloadOn>,
    ) -> Result<(), StartError> {
        let cfg = &self.config;
        let mut slots = std::collections::BTreeMap::new();
        // The console reads the lanes' slots (the plugin version each lane runs, swaps
        // included) once the lanes exist; /metrics and /healthz answer from the start.
        let console = crate::console::Console::new(
            self.metrics.clone(),
            cfg.console.clone(),
            cfg.kafka.clone(),
            self.content.clone(),
        );
        tokio::spawn(crate::serve::serve(
            cfg.http.listen.clone(),
            self.metrics.clone(),
            console.clone(),
        ));
        if !cfg.kafka.content_topic.is_empty() {
            self.content.follow_topic(
                &cfg.kafka.brokers,
                &cfg.kafka.content_topic,
                &cfg.kafka.properties,
                self.metrics.clone(),
            )?;
        }
        let mut lanes = tokio::task::JoinSet::new();
        let mut lane_names = std::collections::HashMap::new();
        let mut watched = Vec::new();
        // Broker round trips: off the async threads. Asked before any lane seeds its group.
        // Where lanes start is read before anything is consumed; a broker that cannot tell
        // stops the start (a guess could skip events under `start = "latest"`).
        let established = {
            let (kafka, plugins) = (cfg.kafka.clone(), cfg.plugins.clone());
            blocking(move || lanes_established(&kafka, &plugins)).await?
        };
        // One plugin gains nothing from sharing what it decodes.
        let decoded = Arc::new(DecodedMessages::new(
            &cfg.kafka.events_topic,
            cfg.kafka.include_snapshot_reads,
            if self.plugins.len() > 1 {
                cfg.kafka.shared_decode_bytes
            } else {
                0
            },
        ));
        for plugin in &self.plugins {
            let pc = plugin.config.clone();
            let kafka = cfg.kafka.clone();
            blocking(move || seed_and_log(&kafka, &pc, established)).await?;
            let consumer = Arc::new(lane_consumer(&cfg.kafka, &plugin.config)?);
            let group = cfg.kafka.lane_group(plugin.name());
            watched.push(WatchedLane {
                name: plugin.name().to_string(),
                group: group.clone(),
                start: plugin.config.start,
                consumer: consumer.clone(),
            });
            let lane = Lane {
                name: plugin.name().to_string(),
                group,
                consumer,
                decoded: Arc::clone(&decoded),
                batch: cfg.lane_batch(&plugin.config).clone(),
                enrich: cfg.enrich.clone(),
                content: self.content.clone(),
                slot: slots
                    .entry(plugin.name().to_string())
                    .or_insert_with(|| PluginSlot::new(self.delivery(plugin)))
                    .clone(),
                metrics: self.metrics.clone(),
                counters: self.metrics.lane(plugin.name()),
                commit_interval: std::time::Duration::from_millis(cfg.kafka.commit_interval_ms),
                delivered: Default::default(),
                last_commit: std::sync::Mutex::new(std::time::Instant::now()),
            };
            let task = lanes.spawn(lane.run(shutdown.clone()));
            lane_names.insert(task.id(), plugin.name().to_string());
        }
        console.set_slots(slots.clone());
        console.spawn(shutdown.clone());
        LagMonitor {
            kafka: cfg.kafka.clone(),
            health: cfg.health.clone(),
            lanes: watched,
            metrics: self.metrics.clone(),
        }
        .spawn(shutdown.clone())
        .map_err(StartError::LagMonitor)?;
        if let Some(ReloadOn { path, hangups }) = reload {
            Reloader {
                path,
                config: cfg.clone(),
                engine: self.engine.clone(),
                linker: self.linker.clone(),
                services: self.services.clone(),
                metrics: self.metrics.clone(),
                slots,
            }
            .spawn(hangups, shutdown.clone());
        }
        info!(
            lanes = lanes.len(),
            group = %cfg.kafka.group_id,
            topic = %cfg.kafka.events_topic,
            "live path started"
        );
        while let Some(done) = lanes.join_next_with_id().await {
            match done {
                Ok((id, ())) => info!(lane = ?lane_names.get(&id), "lane stopped"),
                Err(e) if e.is_panic() => {
                    let lane = lane_names.get(&e.id()).cloned().unwrap_or_default();
                    let message = panic_message(e.into_panic());
                    error!(%lane, %message, "a lane panicked; stopping the host");
                    return Err(StartError::LanePanicked(lane, message));
                }
                Err(e) => error!(error = %e, "a lane was cancelled"),
            }
        }
        let (decoded, shared) = decoded.counts();
        info!(
            decoded,
            shared, "messages decoded, and taken already decoded by another lane"
        );
        Ok(())
    }
}

/// Runs a blocking broker call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, rdkafka::error::KafkaError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Positions(e.to_string()))?
        .map_err(|e| StartError::Positions(e.to_string()))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}
