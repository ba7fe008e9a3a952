//! Assembles a running host from a config: metrics, shared services, plugins, dead letters,
//! the content table. The live pipeline and backfill both start from here.

use std::sync::Arc;

use tracing::info;

use crate::config::Config;
use crate::content::{ContentError, ContentTable};
use crate::deadletter::DeadLetterQueue;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::plugin::capabilities::{Services, ServicesError};
use crate::plugin::{self, Plugin, PluginError};

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
}

pub struct App {
    pub config: Config,
    pub metrics: Metrics,
    pub fanout: Arc<Fanout>,
    pub content: ContentTable,
}

impl App {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::default();
        if config.plugins.is_empty() {
            return Err(StartError::NoPlugins);
        }
        let services = Services::connect(&config.services, metrics.clone()).await?;
        let engine = plugin::engine().map_err(|source| StartError::Plugin {
            name: "<engine>".into(),
            source,
        })?;
        let linker = plugin::linker(&engine).map_err(|source| StartError::Plugin {
            name: "<linker>".into(),
            source,
        })?;
        let mut plugins = Vec::new();
        for pc in &config.plugins {
            let name = pc.name.clone();
            let (engine, linker, services, pc) =
                (engine.clone(), linker.clone(), services.clone(), pc.clone());
            // Compiling a component takes a moment of CPU: off the async threads.
            let loaded =
                tokio::task::spawn_blocking(move || Plugin::load(pc, &engine, linker, services))
                    .await
                    .map_err(|e| StartError::Plugin {
                        name: name.clone(),
                        source: PluginError::Init(e.to_string()),
                    })?
                    .map_err(|source| StartError::Plugin { name, source })?;
            plugins.push(Arc::new(loaded));
        }
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
            fanout: Arc::new(Fanout {
                plugins,
                dead_letters,
                metrics: metrics.clone(),
            }),
            config,
            metrics,
            content,
        })
    }
}
