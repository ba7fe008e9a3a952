//! The content table as the host sees it: loaded from PostgreSQL at start, kept current from
//! Debezium's content topic, and asked of PostgreSQL directly (once per batch) for ids that
//! an event names before the topic has shown them: the race between an event and its content.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_postgres::NoTls;
use tracing::{debug, info, warn};

use crate::decode::{decode_content, ContentMessage, ContentRow};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot start the content follower thread: {0}")]
    Thread(std::io::Error),
}

/// Shared, concurrently readable content rows.
#[derive(Clone, Default)]
pub struct ContentTable {
    /// By content id: looked up for every event of every lane, so hashed with FxHash.
    rows: Arc<RwLock<FxHashMap<i64, ContentRow>>>,
    /// PostgreSQL, when configured: the source of truth for ids the map lacks.
    pg: Option<Arc<tokio_postgres::Client>>,
}

impl ContentTable {
    pub fn len(&self) -> usize {
        self.rows.read().map(|r| r.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: i64) -> Option<ContentRow> {
        self.rows.read().ok()?.get(&id).cloned()
    }

    /// All rows under one read lock, for a batch's lookups without a lock and a row clone
    /// each. `None` when the lock is poisoned (every id then reads as unknown, as in `get`).
    /// Not to be held across an `.await`: the follower's writes wait for it.
    pub fn rows(&self) -> Option<RwLockReadGuard<'_, FxHashMap<i64, ContentRow>>> {
        self.rows.read().ok()
    }

    pub fn upsert(&self, id: i64, row: ContentRow) {
        if let Ok(mut rows) = self.rows.write() {
            rows.insert(id, row);
        }
    }

    pub fn remove(&self, id: i64) {
        if let Ok(mut rows) = self.rows.write() {
            rows.remove(&id);
        }
    }

    /// Connects to PostgreSQL and loads the whole table (it is a dimension: small).
    pub async fn connect(pg_url: &str) -> Result<Self, ContentError> {
        let (client, connection) = tokio_postgres::connect(pg_url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "content: postgres connection closed");
            }
        });
        let table = ContentTable {
            rows: Default::default(),
            pg: Some(Arc::new(client)),
        };
        let loaded = table.load_all().await?;
        info!(rows = loaded, "content: loaded from postgres");
        Ok(table)
    }

    async fn load_all(&self) -> Result<usize, ContentError> {
        let Some(pg) = &self.pg else { return Ok(0) };
        let rows = pg
            .query(
                "SELECT content_id, content_type, length_seconds FROM content",
                &[],
            )
            .await?;
        let n = rows.len();
        for r in rows {
            self.upsert(
                r.try_get(0)?,
                ContentRow {
                    content_type: r.try_get(1)?,
                    length_seconds: r.try_get(2)?,
                },
            );
        }
        Ok(n)
    }

    /// Resolves ids the map does not know yet, asking PostgreSQL in one query, and retrying
    /// until `wait` has passed. Returns the ids still unknown.
    pub async fn resolve_missing(&self, ids: &[i64], wait: Duration) -> Vec<i64> {
        let deadline = Instant::now() + wait;
        let mut missing: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| self.get(*id).is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        loop {
            if missing.is_empty() {
                return missing;
            }
            if let Some(pg) = &self.pg {
                match pg
                    .query(
                        "SELECT content_id, content_type, length_seconds FROM content WHERE content_id = ANY($1)",
                        &[&missing],
                    )
                    .await
                {
                    Ok(rows) => {
                        for r in rows {
                            if let (Ok(id), Ok(content_type), Ok(length_seconds)) =
                                (r.try_get(0), r.try_get(1), r.try_get(2))
                            {
                                self.upsert(id, ContentRow { content_type, length_seconds });
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "content: lookup of missing ids failed"),
                }
            }
            missing.retain(|id| self.get(*id).is_none());
            if missing.is_empty() || Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline - Instant::now())).await;
        }
    }

    fn apply(&self, payload: Option<&[u8]>, offset: i64, metrics: &Metrics) {
        match decode_content(payload) {
            Ok(ContentMessage::Upsert(id, row)) => {
                debug!(content_id = id, "content: upsert");
                self.upsert(id, row);
                metrics.content_updates.inc();
            }
            Ok(ContentMessage::Delete(id)) => {
                // Events that name deleted content keep flowing with NULL content.
                self.remove(id);
                metrics.content_updates.inc();
            }
            Ok(ContentMessage::Ignore) => {}
            Err(e) => {
                warn!(error = %e, offset, "content: undecodable change ignored");
                metrics.content_decode_errors.inc();
            }
        }
    }

    /// Follows Debezium's content topic from its beginning on a thread of its own.
    /// Group-less (assign, no commits): every host reads the whole topic.
    pub fn follow_topic(
        &self,
        brokers: &str,
        topic: &str,
        properties: &std::collections::BTreeMap<String, String>,
        metrics: Metrics,
    ) -> Result<(), ContentError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("group.id", "fanout-content-follower")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg.create()?;
        let table = self.clone();
        let topic = topic.to_string();
        std::thread::Builder::new()
            .name("content-follower".into())
            .spawn(move || {
                // The topic may not exist yet (Debezium creates it with the first change).
                loop {
                    match assign_all_from_beginning(&consumer, &topic) {
                        Ok(true) => break,
                        Ok(false) => debug!(%topic, "content topic not there yet"),
                        Err(e) => warn!(error = %e, %topic, "content: cannot read topic metadata"),
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
                info!(%topic, "content: following the topic");
                loop {
                    match consumer.poll(Duration::from_millis(500)) {
                        None => {}
                        Some(Err(e)) => warn!(error = %e, "content: kafka error"),
                        Some(Ok(msg)) => table.apply(msg.payload(), msg.offset(), &metrics),
                    }
                }
            })
            .map_err(ContentError::Thread)?;
        Ok(())
    }
}

/// Assigns every partition of `topic` from its beginning; false when the topic has none yet.
fn assign_all_from_beginning(
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<bool, rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    if tpl.count() == 0 {
        return Ok(false);
    }
    consumer.assign(&tpl)?;
    Ok(true)
}
