//! A lane's Kafka consumer: its own group, where it starts, and what it tells the operator.
//!
//! Where a lane starts, in order: the positions its own group committed; else, on the first
//! start after an upgrade from a host before lanes (no lane of this host has committed yet),
//! the positions the host's `group_id` committed, copied into the lane's group once so that
//! the upgrade replays and skips nothing; else (a plugin added once lanes run) the plugin's
//! `start` setting (`earliest` or `latest`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::{KafkaConfig, PluginConfig};

/// Logs every assignment of a lane at INFO: what an operator looks for first.
pub struct LaneContext {
    lane: String,
    group: String,
}

impl ClientContext for LaneContext {}

impl ConsumerContext for LaneContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(lane = %self.lane, group = %self.group, partitions = %partitions(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                info!(lane = %self.lane, group = %self.group, partitions = %partitions(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => warn!(lane = %self.lane, error = %e, "rebalance failed"),
        }
    }
}

pub type LaneConsumer = StreamConsumer<LaneContext>;

fn partitions(tpl: &TopicPartitionList) -> String {
    let list: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(",")
    }
}

/// The librdkafka settings every client of a lane shares: brokers and the operator's extra
/// properties. A static member id (`group.instance.id`) is made unique per lane: it names a
/// member of one group, and every lane is a group of its own.
fn base_config(kafka: &KafkaConfig, lane: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    for (key, v) in &kafka.properties {
        if key == "group.instance.id" {
            cfg.set(key, format!("{v}.{lane}"));
        } else {
            cfg.set(key, v);
        }
    }
    cfg
}

/// The lane's consumer, subscribed to the events topic in the lane's own group.
pub fn lane_consumer(
    kafka: &KafkaConfig,
    plugin: &PluginConfig,
) -> Result<LaneConsumer, KafkaError> {
    let mut cfg = base_config(kafka, &plugin.name);
    cfg.set("group.id", kafka.lane_group(&plugin.name))
        // Offsets are committed by the lane, after delivery: never automatically.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", plugin.start.as_offset_reset())
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        // Notice a topic created after start (Debezium creates it with the first change).
        .set("topic.metadata.refresh.interval.ms", "5000");
    // Every lane prefetches on its own: keep each one's queue modest so that memory stays
    // bounded with many plugins (librdkafka's default is 64 MiB per consumer).
    if !kafka.properties.contains_key("queued.max.messages.kbytes") {
        cfg.set("queued.max.messages.kbytes", "16384");
    }
    if !kafka.properties.contains_key("client.id") {
        cfg.set("client.id", format!("fanout.{}", plugin.name));
    }
    let consumer: LaneConsumer = cfg.create_with_context(LaneContext {
        lane: plugin.name.clone(),
        group: kafka.lane_group(&plugin.name),
    })?;
    consumer.subscribe(&[kafka.events_topic.as_str()])?;
    Ok(consumer)
}

/// Where a lane found its starting positions.
#[derive(Debug, PartialEq, Eq)]
pub enum StartingPoint {
    /// Its own group has committed positions.
    Own,
    /// Copied from the host's `group_id` (partition -> offset).
    HostGroup(BTreeMap<i32, i64>),
    /// A plugin added while other lanes already run: the `start` setting applies.
    NewPlugin,
    /// Nowhere: the plugin's `start` setting applies.
    StartSetting,
    /// The topic does not exist yet: the `start` setting applies when it appears.
    NoTopic,
}

/// A client of `group` that never joins it: reads and writes its committed offsets only.
fn offsets_client(kafka: &KafkaConfig, group: &str) -> Result<BaseConsumer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    for (key, v) in &kafka.properties {
        // A static member id would make the broker treat this client as that member.
        if key != "group.instance.id" {
            cfg.set(key, v);
        }
    }
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false");
    cfg.create()
}

/// Every partition of `topic` (empty when the topic does not exist yet).
pub fn topic_partitions(
    client: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Committed offsets of `client`'s group for `partitions` of `topic` (only the valid ones).
pub fn committed(
    client: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let answer = client.committed_offsets(tpl, timeout)?;
    Ok(answer
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// True when any of `plugins`' lanes has committed a position: lanes already run for this
/// host, so a lane without positions belongs to a plugin added since. Asked once, before any
/// lane is seeded (seeding commits). Blocking.
pub fn lanes_established(
    kafka: &KafkaConfig,
    plugins: &[PluginConfig],
) -> Result<bool, KafkaError> {
    for plugin in plugins {
        let lane = offsets_client(kafka, &kafka.lane_group(&plugin.name))?;
        let partitions = topic_partitions(&lane, &kafka.events_topic, TIMEOUT)?;
        if !committed(&lane, &kafka.events_topic, &partitions, TIMEOUT)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Before the lane joins its group: when the group has no positions at all and lanes are not
/// `established` yet (the first start after an upgrade), copies the positions the host's
/// `group_id` committed into it. Blocking.
pub fn seed_from_host_group(
    kafka: &KafkaConfig,
    plugin: &PluginConfig,
    established: bool,
) -> Result<StartingPoint, KafkaError> {
    let timeout = TIMEOUT;
    let lane_group = kafka.lane_group(&plugin.name);
    let lane = offsets_client(kafka, &lane_group)?;
    let partitions = topic_partitions(&lane, &kafka.events_topic, timeout)?;
    if partitions.is_empty() {
        return Ok(StartingPoint::NoTopic);
    }
    if !committed(&lane, &kafka.events_topic, &partitions, timeout)?.is_empty() {
        return Ok(StartingPoint::Own);
    }
    if established {
        return Ok(StartingPoint::NewPlugin);
    }
    let host = offsets_client(kafka, &kafka.group_id)?;
    let inherited = committed(&host, &kafka.events_topic, &partitions, timeout)?;
    if inherited.is_empty() {
        return Ok(StartingPoint::StartSetting);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &inherited {
        tpl.add_partition_offset(&kafka.events_topic, *p, Offset::Offset(*o))?;
    }
    lane.commit(&tpl, CommitMode::Sync)?;
    Ok(StartingPoint::HostGroup(inherited))
}

/// [`seed_from_host_group`], logged for the operator.
pub fn seed_and_log(
    kafka: &KafkaConfig,
    plugin: &PluginConfig,
    established: bool,
) -> Result<(), KafkaError> {
    let lane = &plugin.name;
    let group = kafka.lane_group(lane);
    let start = plugin.start.as_offset_reset();
    match seed_from_host_group(kafka, plugin, established)? {
        StartingPoint::Own => info!(%lane, %group, "lane resumes from its own committed positions"),
        StartingPoint::HostGroup(offsets) => info!(
            %lane, %group, from = %kafka.group_id, ?offsets,
            "lane has no positions of its own: starting from the host group's committed positions"
        ),
        StartingPoint::NewPlugin => info!(
            %lane, %group, start,
            "new plugin (other lanes already run): starting from its `start` setting"
        ),
        StartingPoint::StartSetting => info!(
            %lane, %group, start,
            "lane has no committed positions anywhere: starting from its `start` setting"
        ),
        StartingPoint::NoTopic => info!(
            %lane, topic = %kafka.events_topic, start,
            "events topic does not exist yet: the lane starts from its `start` setting when it appears"
        ),
    }
    Ok(())
}
