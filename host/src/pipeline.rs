//! The live pipeline, top to bottom as the data flows:
//! consume -> decode -> batch -> enrich -> fan out -> commit.
//!
//! Batches are delivered one after the other, so committing the last offset of each
//! partition in a delivered batch is an ordered acknowledgement: every earlier offset of that
//! partition was in this batch or an earlier, already delivered one.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::batch::{Origin, PendingBatch, ReadyBatch};
use crate::config::Config;
use crate::content::ContentTable;
use crate::deadletter::{DeadLetter, Stage};
use crate::decode::{decode_event, EventMessage};
use crate::fanout::Fanout;
use crate::metrics::{label, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

pub struct Pipeline {
    pub config: Config,
    pub consumer: StreamConsumer,
    pub content: ContentTable,
    pub fanout: Arc<Fanout>,
    pub metrics: Metrics,
}

pub fn events_consumer(config: &Config) -> Result<StreamConsumer, PipelineError> {
    let k = &config.kafka;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        // Offsets are committed by the pipeline, after delivery: never automatically.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        // Notice a topic created after start (Debezium creates it with the first change).
        .set("topic.metadata.refresh.interval.ms", "5000");
    for (key, v) in &k.properties {
        cfg.set(key, v);
    }
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(&[k.events_topic.as_str()])?;
    Ok(consumer)
}

impl Pipeline {
    /// Runs until `shutdown` turns true. The batch being filled at that moment is abandoned
    /// (not committed: it is consumed again after a restart); a batch being delivered is
    /// finished unless a plugin is stuck in retries.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), PipelineError> {
        info!(topic = %self.config.kafka.events_topic, group = %self.config.kafka.group_id, "pipeline started");
        loop {
            let Some(pending) = self.fill_batch(&mut shutdown).await else {
                info!("shutdown: abandoning the batch being filled (it is not committed)");
                return Ok(());
            };
            let ready = pending
                .prepare(&self.content, &self.config.enrich, &self.metrics)
                .await;
            match self.fanout.deliver(&ready, &shutdown).await {
                Ok(()) => self.commit(&ready),
                Err(e) => {
                    warn!(error = %e, batch = %ready.wit.id, "batch not delivered; not committed");
                    return Ok(());
                }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// Consumes until the batch is full, or its first message is `max_wait` old.
    /// None when shut down first.
    async fn fill_batch(&self, shutdown: &mut watch::Receiver<bool>) -> Option<PendingBatch> {
        let mut pending = PendingBatch::default();
        let max_events = self.config.batch.max_events;
        let max_wait = self.config.batch.max_wait();
        loop {
            let wait = match pending.started() {
                Some(t) => max_wait.saturating_sub(t.elapsed()),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return None,
                _ = tokio::time::sleep(wait) => return Some(pending),
                msg = self.consumer.recv() => match msg {
                    Ok(m) => {
                        self.accept(&mut pending, &m);
                        if pending.event_count() >= max_events {
                            return Some(pending);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    fn accept(&self, pending: &mut PendingBatch, m: &BorrowedMessage<'_>) {
        self.metrics.messages_consumed.inc();
        pending.record_offset(m.topic(), m.partition(), m.offset());
        let origin = || Origin {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
        };
        match decode_event(m.payload(), self.config.kafka.include_snapshot_reads) {
            Ok(EventMessage::Insert(event)) => {
                self.metrics.events_decoded.inc();
                pending.push_event(event, origin());
            }
            Ok(EventMessage::Skip(reason)) => {
                debug!(reason = reason.as_str(), offset = m.offset(), "skipped");
                self.metrics.add_labelled(
                    "fanout_messages_skipped_total",
                    &label("reason", reason.as_str()),
                    1.0,
                );
            }
            Err(e) => {
                warn!(error = %e, partition = m.partition(), offset = m.offset(), "undecodable message: dead-lettered");
                pending.push_dead_letter(DeadLetter {
                    stage: Stage::Decode,
                    plugin: None,
                    reason: e.to_string(),
                    origin: origin(),
                });
            }
        }
    }

    /// Commits the offset after the last one of each partition in the batch.
    fn commit(&self, batch: &ReadyBatch) {
        if batch.offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), last) in &batch.offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1)) {
                warn!(error = %e, "cannot build the commit");
                return;
            }
        }
        // A failed commit (e.g. after a rebalance) is not fatal: the batch is replayed later
        // and every sink is idempotent by event_id.
        match tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync)) {
            Ok(()) => {
                self.metrics.commits.inc();
                debug!(batch = %batch.wit.id, "committed");
            }
            Err(e) => {
                warn!(error = %e, batch = %batch.wit.id, "commit failed; the batch will be replayed")
            }
        }
    }
}
