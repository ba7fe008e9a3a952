//! Lanes: every plugin consumes, batches, delivers and commits on its own, in a consumer group
//! of its own (`<group_id>.<plugin>`, the way Kafka Connect runs one group per connector). A
//! slow or failing sink lags alone; the others keep their pace.
//!
//! One lane reads top to bottom as the data flows:
//! consume -> decode -> batch -> enrich -> deliver -> commit.
//!
//! Batches of a lane are delivered one after the other, so committing the last offset of each
//! partition in a delivered batch is an ordered acknowledgement: every earlier offset of that
//! partition was in this batch or an earlier, already delivered one.

pub mod consumer;
pub mod decoded;
pub mod delivery;
pub mod lag;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::batch::{Origin, PendingBatch, ReadyBatch};
use crate::config::{BatchConfig, EnrichConfig};
use crate::content::ContentTable;
use crate::deadletter::{DeadLetter, Stage};
use crate::decode::EventMessage;
use crate::enrich::enrich_batch;
use crate::metrics::{label, LaneMetrics, Metrics};
use decoded::{DecodedMessage, DecodedMessages};
use delivery::{DeliveryError, PluginSlot};

/// One plugin's lane.
pub struct Lane {
    /// The plugin's name: the lane's name in logs, metrics and dead letters.
    pub name: String,
    pub group: String,
    pub consumer: Arc<consumer::LaneConsumer>,
    /// Messages decoded once for all lanes.
    pub decoded: Arc<DecodedMessages>,
    pub batch: BatchConfig,
    pub enrich: EnrichConfig,
    pub content: ContentTable,
    /// The plugin version batches go to; a reload swaps it between two batches.
    pub slot: Arc<PluginSlot>,
    pub metrics: Metrics,
    pub counters: Arc<LaneMetrics>,
    /// Commits are cumulative: at most one per interval while the lane is busy (every commit
    /// is a write on the broker), at once when it is idle or stops.
    pub commit_interval: Duration,
    /// (topic, partition) -> last offset delivered and not yet committed.
    pub delivered: Mutex<BTreeMap<(String, i32), i64>>,
    pub last_commit: Mutex<Instant>,
}

/// A batch handed to the plugin in the background, with how its delivery ended.
type InFlight = tokio::task::JoinHandle<(ReadyBatch, Result<(), DeliveryError>)>;

/// Why filling a batch stopped without a batch to deliver.
enum Stop {
    /// SIGINT/SIGTERM.
    Shutdown,
    /// The batch in flight could not be delivered: stop without committing past it.
    Undelivered,
}

impl Lane {
    /// Runs until `shutdown` turns true.
    ///
    /// One batch is delivered in the background while the next one fills, so consuming and
    /// delivering overlap; a batch is only handed over once the previous one is delivered and
    /// committed, which keeps commits in order. At shutdown the batch being delivered is
    /// finished (unless the plugin is stuck in retries) and committed; the batch being filled
    /// is abandoned (not committed: it is consumed again after a restart).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        info!(lane = %self.name, group = %self.group, "lane started");
        let mut in_flight: Option<InFlight> = None;
        loop {
            let filled = self.fill_batch(&mut shutdown, &mut in_flight).await;
            // The previous batch must be committed before the next one is handed over.
            if let Some(delivery) = in_flight.take() {
                if !self.settle(delivery.await) {
                    self.commit(true);
                    return;
                }
            }
            let mut pending = match filled {
                Ok(p) => p,
                Err(Stop::Shutdown) => {
                    info!(lane = %self.name, "shutdown: abandoning the batch being filled (it is not committed)");
                    self.commit(true);
                    return;
                }
                Err(Stop::Undelivered) => {
                    self.commit(true);
                    return;
                }
            };
            self.commit(false);
            let committed_ms = pending.take_committed_ms();
            let ready = enrich_batch(
                pending,
                &self.content,
                &self.enrich,
                &self.counters,
                Some(&self.name),
            )
            .await;
            let (delivery, stop) = (self.slot.current(), shutdown.clone());
            in_flight = Some(tokio::spawn(async move {
                let result = delivery.deliver(&ready, &stop).await;
                if result.is_ok() {
                    delivery.record_taken(&committed_ms);
                }
                (ready, result)
            }));
        }
    }

    /// Records a finished delivery for the next commit. False when the batch was not
    /// delivered.
    fn settle(
        &self,
        done: Result<(ReadyBatch, Result<(), DeliveryError>), tokio::task::JoinError>,
    ) -> bool {
        match done {
            Ok((ready, Ok(()))) => {
                if !ready.plugin_batch.is_empty() {
                    self.counters.batches_delivered.inc();
                }
                if let Ok(mut delivered) = self.delivered.lock() {
                    delivered.extend(ready.offsets.iter().map(|(k, v)| (k.clone(), *v)));
                }
                true
            }
            Ok((ready, Err(e))) => {
                warn!(lane = %self.name, error = %e, batch = %ready.plugin_batch.id(), "batch not delivered; not committed");
                false
            }
            Err(e) if e.is_panic() => {
                // A bug, not a sink failure: let the process end (non-zero) rather than run
                // on with a lane that silently stopped.
                std::panic::resume_unwind(e.into_panic())
            }
            Err(e) => {
                warn!(lane = %self.name, error = %e, "delivery task cancelled; not committed");
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
        in_flight: &mut Option<InFlight>,
    ) -> Result<PendingBatch, Stop> {
        let mut pending = PendingBatch::default();
        let max_events = self.batch.max_events;
        let max_wait = self.batch.max_wait();
        // One stream and one timer for the whole batch: a fresh `recv()` registers a waker
        // slot under a lock, and a fresh `sleep` a timer entry, on every message.
        let mut stream = self.consumer.stream();
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut timer_at = None;
        loop {
            let wait = match pending.started() {
                Some(t) => max_wait.saturating_sub(t.elapsed()),
                // Idle with a commit still to make (the last one failed): try again then.
                None if self.uncommitted() => self.commit_interval,
                None => Duration::from_secs(3600),
            };
            // Only a new deadline moves the timer: the batch's does not change per message.
            let due = match (pending.started(), timer_at) {
                (Some(_), Some(at)) => at,
                _ => tokio::time::Instant::now() + wait,
            };
            if timer_at != Some(due) {
                timer.as_mut().reset(due);
                timer_at = pending.started().map(|_| due);
            }
            // Set in the select, slept after it: the select's output holds the consumer's
            // borrowed message, which must not live across an await of a spawned task.
            let mut consumer_error = false;
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Err(Stop::Shutdown),
                done = async {
                    match in_flight.as_mut() {
                        Some(delivery) => delivery.await,
                        None => std::future::pending().await,
                    }
                } => {
                    *in_flight = None;
                    if !self.settle(done) {
                        return Err(Stop::Undelivered);
                    }
                    // Nothing is being filled: commit now, an idle lane holds nothing back.
                    if pending.is_empty() {
                        self.commit(true);
                    }
                }
                _ = &mut timer => {
                    timer_at = None;
                    if !pending.is_empty() {
                        return Ok(pending);
                    }
                    self.commit(true);
                }
                msg = stream.next() => match msg {
                    Some(Ok(m)) => {
                        self.accept(&mut pending, &m);
                        drop(m);
                        // Take what librdkafka already holds without another turn of the
                        // select: most messages of a busy lane are already queued.
                        while pending.event_count() < max_events {
                            match stream.next().now_or_never() {
                                Some(Some(Ok(m))) => self.accept(&mut pending, &m),
                                Some(Some(Err(e))) => {
                                    warn!(lane = %self.name, error = %e, "kafka consumer error");
                                    break;
                                }
                                _ => break,
                            }
                        }
                        if pending.event_count() >= max_events {
                            return Ok(pending);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(lane = %self.name, error = %e, "kafka consumer error");
                        consumer_error = true;
                    }
                    None => consumer_error = true,
                },
            }
            if consumer_error {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    fn accept(&self, pending: &mut PendingBatch, m: &BorrowedMessage<'_>) {
        self.counters.messages_consumed.inc();
        // Read once: each call measures and validates the C string anew.
        let topic = m.topic();
        let (partition, offset) = (m.partition(), m.offset());
        pending.record_offset(topic, partition, offset);
        let published_ms = m.timestamp().to_millis();
        if let Some(ts) = published_ms {
            pending.record_timestamp(ts);
        }
        let events_topic = topic == &**self.decoded.topic();
        let decoded = self.decoded.get(m, events_topic);
        let origin = |decoded: &DecodedMessage| Origin {
            topic: Arc::from(topic),
            partition,
            offset,
            key: decoded.key.clone(),
            payload: decoded.payload.clone(),
        };
        match &decoded.outcome {
            Ok(EventMessage::Insert(event)) => {
                self.counters.events_decoded.inc();
                let committed_ms = event.source_ts_ms.or(published_ms);
                if events_topic {
                    // Read in place by enrichment: nothing copied for this lane.
                    pending.push_consumed(
                        self.decoded.topic(),
                        Arc::clone(&decoded),
                        partition,
                        offset,
                        committed_ms,
                    );
                } else {
                    let mut event = event.clone();
                    event.source_ts_ms = committed_ms;
                    pending.push_event(event, origin(&decoded));
                }
            }
            Ok(EventMessage::Skip(reason)) => {
                debug!(lane = %self.name, reason = reason.as_str(), offset = m.offset(), "skipped");
                self.metrics.add_labelled(
                    "fanout_messages_skipped_total",
                    &format!(
                        "{},{}",
                        label("plugin", &self.name),
                        label("reason", reason.as_str())
                    ),
                    1.0,
                );
            }
            Err(e) => {
                warn!(lane = %self.name, error = %e, partition = m.partition(), offset = m.offset(), "undecodable message: dead-lettered");
                pending.push_dead_letter(DeadLetter {
                    stage: Stage::Decode,
                    plugin: Some(self.name.clone()),
                    reason: e.to_string(),
                    origin: origin(&decoded),
                });
            }
        }
    }

    /// Commits the offset after the last delivered one of each partition, when `now` or
    /// when `commit_interval_ms` has passed since the last commit. Batches are delivered in
    /// order, so the newest delivered offset of a partition covers every earlier one.
    fn commit(&self, now: bool) {
        let Ok(mut last) = self.last_commit.lock() else {
            return;
        };
        if !now && last.elapsed() < self.commit_interval {
            return;
        }
        let Ok(mut delivered) = self.delivered.lock() else {
            return;
        };
        // Partitions this lane no longer holds (a rebalance moved them) are the new owner's
        // to commit: it replays them, which the sinks absorb.
        let held: Option<std::collections::BTreeSet<(String, i32)>> =
            self.consumer.assignment().ok().map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            });
        if let Some(held) = &held {
            delivered.retain(|k, _| held.contains(k));
        }
        if delivered.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), last) in delivered.iter() {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1)) {
                warn!(lane = %self.name, error = %e, "cannot build the commit");
                return;
            }
        }
        *last = Instant::now();
        // A failed commit (a broker hiccup, a rebalance under way) keeps the offsets for the
        // next try; a crash meanwhile replays, which the sinks absorb.
        match tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync)) {
            Ok(()) => {
                self.counters.commits.inc();
                debug!(lane = %self.name, offsets = ?*delivered, "committed");
                delivered.clear();
            }
            Err(e) => {
                warn!(lane = %self.name, error = %e, "commit failed; retrying with the next commit")
            }
        }
    }

    /// True when delivered offsets wait for a commit.
    fn uncommitted(&self) -> bool {
        self.delivered
            .lock()
            .map(|d| !d.is_empty())
            .unwrap_or(false)
    }
}
