//! Lag and stalls, measured from the broker's side for every partition of the events topic,
//! not only the ones this host holds: a partition assigned to a dead member, or a lane whose
//! commits stopped, shows here even when nothing in this process fails.
//!
//! Every `lag_interval_ms`, per lane: the lane group's committed offset of each partition
//! against the partition's high watermark (messages behind), and the source timestamp of the
//! message at the committed offset (seconds behind: the age of the oldest event the plugin
//! has not taken). A partition with lag whose committed offset has not moved for
//! `stall_after_ms` makes the host unhealthy, with the partitions, the group and, when the
//! broker tells, the members that hold them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::consumer::{committed, topic_partitions, LaneConsumer};
use crate::config::{HealthConfig, KafkaConfig, StartPosition};

use crate::metrics::{label, Metrics};

/// What the monitor needs of a lane.
pub struct WatchedLane {
    pub name: String,
    pub group: String,
    pub start: StartPosition,
    /// The lane's live consumer: which partitions this host holds.
    pub consumer: Arc<LaneConsumer>,
}

/// One partition of one lane, as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// The lane group's committed offset (None: never committed).
    pub committed: Option<i64>,
    pub high_watermark: i64,
    /// Messages behind.
    pub lag: i64,
}

/// Messages behind for one partition: from the committed offset, or, never committed, from
/// where the lane's `start` setting begins.
pub fn partition_lag(committed: Option<i64>, low: i64, high: i64, start: StartPosition) -> i64 {
    match (committed, start) {
        (Some(c), _) => (high - c).max(0),
        (None, StartPosition::Earliest) => (high - low).max(0),
        (None, StartPosition::Latest) => 0,
    }
}

/// Since when a partition's committed offset has stood still with lag.
#[derive(Debug, Clone, Copy)]
struct Standstill {
    committed: Option<i64>,
    since: Instant,
}

pub struct LagMonitor {
    pub kafka: KafkaConfig,
    pub health: HealthConfig,
    pub lanes: Vec<WatchedLane>,
    pub metrics: Metrics,
}

impl LagMonitor {
    /// Measures until shutdown, on a thread of its own (every broker call here blocks).
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("lag-monitor".into())
            .spawn(move || self.run(shutdown))
            .map(|_| ())
    }

    fn run(self, shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.health.lag_interval_ms);
        let mut standstill: BTreeMap<(String, i32), Standstill> = BTreeMap::new();
        let clients = match self.clients() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "lag monitor: cannot create Kafka clients; lag is not measured");
                return;
            }
        };
        while !*shutdown.borrow() {
            for (lane, client) in self.lanes.iter().zip(&clients) {
                if let Err(e) = self.measure(lane, client, &mut standstill) {
                    debug!(lane = %lane.name, error = %e, "lag monitor: cannot measure");
                }
            }
            sleep_unless_shutdown(interval, &shutdown);
        }
    }

    /// One client per lane group, never joining it: reads the group's committed offsets, and
    /// (assigned by hand) the messages at them.
    fn clients(&self) -> Result<Vec<BaseConsumer>, KafkaError> {
        self.lanes
            .iter()
            .map(|lane| {
                let mut cfg = ClientConfig::new();
                cfg.set("bootstrap.servers", &self.kafka.brokers);
                for (key, v) in &self.kafka.properties {
                    if key != "group.instance.id" {
                        cfg.set(key, v);
                    }
                }
                cfg.set("group.id", &lane.group)
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    // It reads one message per lagging partition: keep the prefetch small.
                    .set("max.partition.fetch.bytes", "65536")
                    .set("queued.min.messages", "1");
                cfg.create()
            })
            .collect()
    }

    fn measure(
        &self,
        lane: &WatchedLane,
        client: &BaseConsumer,
        standstill: &mut BTreeMap<(String, i32), Standstill>,
    ) -> Result<(), KafkaError> {
        let timeout = Duration::from_secs(5);
        let topic = &self.kafka.events_topic;
        let partitions = topic_partitions(client, topic, timeout)?;
        if partitions.is_empty() {
            return Ok(());
        }
        let commits = committed(client, topic, &partitions, timeout)?;
        let mut lags = Vec::with_capacity(partitions.len());
        for &p in &partitions {
            let (low, high) = client.fetch_watermarks(topic, p, timeout)?;
            let c = commits.get(&p).copied();
            lags.push(PartitionLag {
                partition: p,
                committed: c,
                high_watermark: high,
                lag: partition_lag(c, low, high, lane.start),
            });
        }
        let plugin = label("plugin", &lane.name);
        for l in &lags {
            self.metrics.set_labelled(
                "fanout_lag_messages",
                &format!("{plugin},{}", label("partition", &l.partition.to_string())),
                l.lag as f64,
            );
        }
        let total: i64 = lags.iter().map(|l| l.lag).sum();
        self.metrics
            .set_labelled("fanout_lane_lag_messages", &plugin, total as f64);
        let oldest = oldest_undelivered_ms(client, topic, &lags);
        let age = oldest
            .map(|ts| (chrono::Utc::now().timestamp_millis() - ts).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.metrics
            .set_labelled("fanout_lane_lag_seconds", &plugin, age);
        let held: BTreeSet<i32> = lane
            .consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        self.metrics.set_labelled(
            "fanout_lane_assigned_partitions",
            &plugin,
            held.len() as f64,
        );
        let stalled = self.stalled(lane, &lags, standstill);
        let key = format!("lane {} stalled", lane.name);
        if stalled.is_empty() {
            self.metrics.set_unhealthy(&key, None);
        } else {
            let reason = describe_stall(lane, topic, &stalled, &held, client);
            warn!(lane = %lane.name, "{reason}");
            self.metrics.set_unhealthy(&key, Some(reason));
        }
        Ok(())
    }

    /// Partitions with lag whose committed offset has stood still for `stall_after_ms`.
    fn stalled(
        &self,
        lane: &WatchedLane,
        lags: &[PartitionLag],
        standstill: &mut BTreeMap<(String, i32), Standstill>,
    ) -> Vec<(PartitionLag, Duration)> {
        let stall_after = Duration::from_millis(self.health.stall_after_ms);
        let mut out = Vec::new();
        for l in lags {
            let key = (lane.name.clone(), l.partition);
            if l.lag == 0 {
                standstill.remove(&key);
                continue;
            }
            let entry = standstill.entry(key).or_insert(Standstill {
                committed: l.committed,
                since: Instant::now(),
            });
            if entry.committed != l.committed {
                *entry = Standstill {
                    committed: l.committed,
                    since: Instant::now(),
                };
            }
            let still = entry.since.elapsed();
            if still >= stall_after {
                out.push((*l, still));
            }
        }
        out
    }
}

fn sleep_unless_shutdown(total: Duration, shutdown: &watch::Receiver<bool>) {
    let deadline = Instant::now() + total;
    while Instant::now() < deadline && !*shutdown.borrow() {
        std::thread::sleep(Duration::from_millis(100).min(total));
    }
}

/// The source timestamp (ms) of the oldest message not yet committed by the lane, over the
/// partitions with lag: the message at each committed offset, read with a group-less client.
fn oldest_undelivered_ms(peek: &BaseConsumer, topic: &str, lags: &[PartitionLag]) -> Option<i64> {
    let behind: Vec<&PartitionLag> = lags.iter().filter(|l| l.lag > 0).collect();
    if behind.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::new();
    for l in &behind {
        let at = l.committed.map(Offset::Offset).unwrap_or(Offset::Beginning);
        tpl.add_partition_offset(topic, l.partition, at).ok()?;
    }
    peek.assign(&tpl).ok()?;
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while seen.len() < behind.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = peek.poll(Duration::from_millis(200)) {
            if let Some(ts) = m.timestamp().to_millis() {
                seen.entry(m.partition()).or_insert(ts);
            }
        }
    }
    // Unassigned at once: an assigned client keeps prefetching in the background.
    let _ = peek.unassign();
    seen.values().min().copied()
}

fn describe_stall(
    lane: &WatchedLane,
    topic: &str,
    stalled: &[(PartitionLag, Duration)],
    held: &BTreeSet<i32>,
    client: &BaseConsumer,
) -> String {
    let holders = group_assignment(client, &lane.group, topic);
    let parts: Vec<String> = stalled
        .iter()
        .map(|(l, still)| {
            let owner = if held.contains(&l.partition) {
                "held by this host".to_string()
            } else {
                match holders.get(&l.partition) {
                    Some(member) => format!("held by member {member}"),
                    None => "not held by this host".to_string(),
                }
            };
            format!(
                "{topic}/{} lag {} (committed {}, high watermark {}), no progress for {}s, {owner}",
                l.partition,
                l.lag,
                l.committed.map_or("none".to_string(), |c| c.to_string()),
                l.high_watermark,
                still.as_secs()
            )
        })
        .collect();
    let mut reason = format!("group {}: {}", lane.group, parts.join("; "));
    if held.is_empty() {
        reason.push_str("; this host holds no partition of the topic");
    }
    reason
}

/// partition -> "member-id (client-id@host)", from the broker's view of the group, when it
/// answers DescribeGroups; empty otherwise.
fn group_assignment(client: &BaseConsumer, group: &str, topic: &str) -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    let Ok(list) = client.fetch_group_list(Some(group), Duration::from_secs(5)) else {
        return out;
    };
    for g in list.groups() {
        for m in g.members() {
            let who = format!("{} ({}@{})", m.id(), m.client_id(), m.client_host());
            for p in m
                .assignment()
                .map(|a| assigned_partitions(a, topic))
                .unwrap_or_default()
            {
                out.insert(p, who.clone());
            }
        }
    }
    out
}

/// The partitions of `topic` in a consumer-protocol member assignment:
/// version i16, [topic string (i16 length), [partition i32]], user data.
pub fn assigned_partitions(bytes: &[u8], topic: &str) -> Vec<i32> {
    let mut r = Reader(bytes);
    let mut out = Vec::new();
    let parsed = (|| {
        r.i16()?;
        let topics = r.i32()?;
        for _ in 0..topics.max(0) {
            let len = usize::try_from(r.i16()?).ok()?;
            let name = r.take(len)?;
            let count = r.i32()?;
            for _ in 0..count.max(0) {
                let p = r.i32()?;
                if name == topic.as_bytes() {
                    out.push(p);
                }
            }
        }
        Some(())
    })();
    if parsed.is_none() {
        out.clear();
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_the_start_setting() {
        assert_eq!(partition_lag(Some(90), 0, 100, StartPosition::Earliest), 10);
        assert_eq!(partition_lag(Some(100), 0, 100, StartPosition::Latest), 0);
        assert_eq!(partition_lag(None, 20, 100, StartPosition::Earliest), 80);
        assert_eq!(partition_lag(None, 20, 100, StartPosition::Latest), 0);
        // A commit past the watermark (a truncated topic) is no negative lag.
        assert_eq!(partition_lag(Some(120), 0, 100, StartPosition::Earliest), 0);
    }

    #[test]
    fn member_assignments_are_parsed() {
        let mut b = vec![0, 0]; // version
        b.extend(2i32.to_be_bytes()); // two topics
        for (name, parts) in [("t", vec![2i32, 3]), ("other", vec![0])] {
            b.extend((name.len() as i16).to_be_bytes());
            b.extend(name.as_bytes());
            b.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // no user data
        assert_eq!(assigned_partitions(&b, "t"), vec![2, 3]);
        assert_eq!(assigned_partitions(&b, "other"), vec![0]);
        assert!(assigned_partitions(&b[..9], "t").is_empty());
        assert!(assigned_partitions(&[], "t").is_empty());
    }
}
