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
use crate::fanout::{DeliveryError, Fanout};
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

/// A batch handed to the plugins in the background, with how its delivery ended.
type Delivery = tokio::task::JoinHandle<(ReadyBatch, Result<(), DeliveryError>)>;

/// Why filling a batch stopped without a batch to deliver.
enum Stop {
    /// SIGINT/SIGTERM.
    Shutdown,
    /// The batch in flight could not be delivered: stop without committing past it.
    Undelivered,
}

impl Pipeline {
    /// Runs until `shutdown` turns true.
    ///
    /// One batch is delivered in the background while the next one fills, so consuming and
    /// delivering overlap; a batch is only handed over once the previous one is delivered and
    /// committed, which keeps commits in order. At shutdown the batch being delivered is
    /// finished (unless a plugin is stuck in retries) and committed; the batch being filled is
    /// abandoned (not committed: it is consumed again after a restart).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), PipelineError> {
        info!(topic = %self.config.kafka.events_topic, group = %self.config.kafka.group_id, "pipeline started");
        let mut in_flight: Option<Delivery> = None;
        loop {
            let filled = self.fill_batch(&mut shutdown, &mut in_flight).await;
            // The previous batch must be committed before the next one is handed over.
            if let Some(delivery) = in_flight.take() {
                if !self.finish(delivery).await {
                    return Ok(());
                }
            }
            let pending = match filled {
                Ok(p) => p,
                Err(Stop::Shutdown) => {
                    info!("shutdown: abandoning the batch being filled (it is not committed)");
                    return Ok(());
                }
                Err(Stop::Undelivered) => return Ok(()),
            };
            let ready = pending
                .prepare(&self.content, &self.config.enrich, &self.metrics)
                .await;
            let (fanout, stop) = (self.fanout.clone(), shutdown.clone());
            in_flight = Some(tokio::spawn(async move {
                let result = fanout.deliver(&ready, &stop).await;
                (ready, result)
            }));
        }
    }

    /// Waits for a delivery and commits it. False when the batch was not delivered.
    async fn finish(&self, delivery: Delivery) -> bool {
        self.settle(delivery.await)
    }

    /// Commits a finished delivery. False when the batch was not delivered.
    fn settle(
        &self,
        done: Result<(ReadyBatch, Result<(), DeliveryError>), tokio::task::JoinError>,
    ) -> bool {
        match done {
            Ok((ready, Ok(()))) => {
                self.commit(&ready);
                true
            }
            Ok((ready, Err(e))) => {
                warn!(error = %e, batch = %ready.wit.id, "batch not delivered; not committed");
                false
            }
            Err(e) => {
                warn!(error = %e, "delivery task failed; not committed");
                false
            }
        }
    }

    /// Consumes until the batch is full, or its first message is `max_wait` old. Meanwhile
    /// commits the batch in flight as soon as it is delivered, so an idle stream does not
    /// hold back its commit.
    async fn fill_batch(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        in_flight: &mut Option<Delivery>,
    ) -> Result<PendingBatch, Stop> {
        let mut pending = PendingBatch::default();
        let max_events = self.config.batch.max_events;
        let max_wait = self.config.batch.max_wait();
        loop {
            let wait = match pending.started() {
                Some(t) => max_wait.saturating_sub(t.elapsed()),
                None => Duration::from_secs(3600),
            };
            let delivering = in_flight.is_some();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Err(Stop::Shutdown),
                done = async { in_flight.as_mut().expect("guarded by `delivering`").await }, if delivering => {
                    *in_flight = None;
                    if !self.settle(done) {
                        return Err(Stop::Undelivered);
                    }
                }
                _ = tokio::time::sleep(wait) => return Ok(pending),
                msg = self.consumer.recv() => match msg {
                    Ok(m) => {
                        self.accept(&mut pending, &m);
                        if pending.event_count() >= max_events {
                            return Ok(pending);
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
