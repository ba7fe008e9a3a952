//! Reading the dead-letter topic: every letter with its headers (see [`crate::deadletter`]),
//! filtered by plugin, stage, reason and time, for `fanout dlq list|show|replay` and the
//! console. Reading never joins a consumer group and commits nothing: the topic is only read.

pub mod replay;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("dead-letter topic `{0}` does not exist (nothing was dead-lettered yet?)")]
    NoTopic(String),
    #[error("reading `{topic}` stopped at {read} of {want} letters after {secs}s: the broker did not hand over the rest")]
    Incomplete {
        topic: String,
        read: usize,
        want: i64,
        secs: u64,
    },
    #[error("invalid filter: {0}")]
    Filter(String),
    #[error("replay ledger {path}: {message}")]
    Ledger { path: String, message: String },
    #[error("{0}")]
    Replay(String),
}

/// One dead letter as read back: where it sits in the dead-letter topic, and its headers.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (the record's timestamp), ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub stage: String,
    pub plugin: String,
    pub reason: String,
    /// `fanout.reason.class`; derived from stage and reason for letters written before it.
    pub reason_class: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// Every header, as text (lossy), in order.
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

impl Letter {
    /// `<partition>@<offset>`: how `dlq show` and the replay ledger name a letter (within its
    /// topic).
    pub fn id(&self) -> String {
        format!("{}@{}", self.partition, self.offset)
    }

    fn from_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Letter {
        let mut headers = Vec::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.push((header.key.to_string(), value));
            }
        }
        let get = |k: &str| {
            headers
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let stage = get("fanout.stage");
        let reason = get("fanout.reason");
        let class = get("fanout.reason.class");
        let reason_class = if class.is_empty() {
            legacy_class(&stage, &reason).to_string()
        } else {
            class
        };
        Letter {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            plugin: get("fanout.plugin"),
            source_topic: get("fanout.source.topic"),
            source_partition: get("fanout.source.partition").parse().unwrap_or(-1),
            source_offset: get("fanout.source.offset").parse().unwrap_or(-1),
            stage,
            reason,
            reason_class,
            headers,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }
}

/// The reason class of a letter written before the `fanout.reason.class` header existed.
fn legacy_class(stage: &str, reason: &str) -> &'static str {
    use crate::deadletter::{reason_class, Stage};
    let stage = match stage {
        "decode" => Stage::Decode,
        "enrich" => Stage::Enrich,
        _ => Stage::Plugin,
    };
    reason_class(stage, reason)
}

/// Which letters: every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub plugin: Option<String>,
    pub stage: Option<String>,
    /// A reason class (`rejected`, `gave_up`, `undecodable`, `missing_content`) or text the
    /// reason contains.
    pub reason: Option<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Dead-lettered before (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Only these letters (partition, offset in the dead-letter topic); empty: any.
    pub ids: Vec<(i32, i64)>,
}

impl Filter {
    pub fn matches(&self, l: &Letter) -> bool {
        let ts = l.timestamp_ms.unwrap_or(0);
        self.plugin.as_ref().is_none_or(|p| &l.plugin == p)
            && self.stage.as_ref().is_none_or(|s| &l.stage == s)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| &l.reason_class == r || l.reason.contains(r.as_str()))
            && self.since_ms.is_none_or(|t| ts >= t)
            && self.until_ms.is_none_or(|t| ts < t)
            && (self.ids.is_empty() || self.ids.contains(&(l.partition, l.offset)))
    }
}

/// A time bound of a filter: ISO 8601 (UTC without a zone) or a duration back from now
/// (`30s`, `15m`, `2h`, `1d`). Returns ms since the epoch.
pub fn parse_time(text: &str) -> Result<i64, DlqError> {
    let t = text.trim();
    let units = [
        ('s', 1_000i64),
        ('m', 60_000),
        ('h', 3_600_000),
        ('d', 86_400_000),
    ];
    for (suffix, ms) in units {
        if let Some(n) = t.strip_suffix(suffix).and_then(|n| n.parse::<i64>().ok()) {
            return Ok(chrono::Utc::now().timestamp_millis() - n * ms);
        }
    }
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"] {
        if let Ok(dt) = chrono::NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        if let Some(dt) = d.and_hms_opt(0, 0, 0) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    Err(DlqError::Filter(format!(
        "`{text}` is neither a time (2026-01-08T14:00:00Z, 2026-01-08) nor an age (30s, 15m, 2h, 1d)"
    )))
}

/// Reads the dead-letter topic: every letter, or only the last `tail` of each partition.
pub fn read(
    kafka: &KafkaConfig,
    topic: &str,
    tail: Option<i64>,
    timeout: Duration,
) -> Result<Vec<Letter>, DlqError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        if k != "group.instance.id" {
            cfg.set(k, v);
        }
    }
    // A group id is required by the client; it never joins nor commits (offsets assigned).
    cfg.set("group.id", format!("{}.dlq-reader", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cfg.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(DlqError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    // partition -> the offset up to which it is read (its high watermark now).
    let mut until: BTreeMap<i32, i64> = BTreeMap::new();
    let mut want = 0i64;
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let from = match tail {
            Some(n) => (high - n).max(low),
            None => low,
        };
        if high > from {
            tpl.add_partition_offset(topic, p, Offset::Offset(from))?;
            until.insert(p, high);
            want += high - from;
        }
    }
    let mut letters = Vec::new();
    if until.is_empty() {
        return Ok(letters);
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    while !until.is_empty() {
        if started.elapsed() > timeout {
            return Err(DlqError::Incomplete {
                topic: topic.to_string(),
                read: letters.len(),
                want,
                secs: timeout.as_secs(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition();
                if let Some(&end) = until.get(&p) {
                    if m.offset() < end {
                        letters.push(Letter::from_message(&m));
                    }
                    if m.offset() + 1 >= end {
                        until.remove(&p);
                    }
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "dead-letter topic: read error"),
            None => {}
        }
    }
    letters.sort_by_key(|l| (l.timestamp_ms, l.partition, l.offset));
    Ok(letters)
}

/// `PARTITION@OFFSET` (or a bare offset: partition 0).
pub fn parse_id(text: &str) -> Result<(i32, i64), DlqError> {
    let bad = || {
        DlqError::Filter(format!(
            "`{text}` is not a letter id (PARTITION@OFFSET, e.g. 0@42)"
        ))
    };
    match text.split_once('@') {
        Some((p, o)) => Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?)),
        None => Ok((0, text.parse().map_err(|_| bad())?)),
    }
}

/// A one-line time for listings: `2026-01-08 14:21:52`.
pub fn format_ms(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(stage: &str, plugin: &str, reason: &str, ts: i64) -> Letter {
        Letter {
            partition: 0,
            offset: 1,
            timestamp_ms: Some(ts),
            stage: stage.into(),
            plugin: plugin.into(),
            reason: reason.into(),
            reason_class: legacy_class(stage, reason).into(),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 5,
            headers: vec![],
            key: None,
            payload: None,
        }
    }

    #[test]
    fn filters_match_every_set_field() {
        let l = letter("plugin", "api", "gave up after 3 attempts: refused", 1_000);
        assert_eq!(l.reason_class, "gave_up");
        assert!(Filter::default().matches(&l));
        let f = |plugin: Option<&str>, reason: Option<&str>, since: Option<i64>| Filter {
            plugin: plugin.map(Into::into),
            reason: reason.map(Into::into),
            since_ms: since,
            ..Default::default()
        };
        assert!(f(Some("api"), Some("gave_up"), Some(1_000)).matches(&l));
        assert!(
            f(None, Some("refused"), None).matches(&l),
            "text of the reason"
        );
        assert!(!f(Some("other"), None, None).matches(&l));
        assert!(!f(None, Some("rejected"), None).matches(&l));
        assert!(!f(None, None, Some(1_001)).matches(&l));
        assert_eq!(letter("decode", "", "x", 0).reason_class, "undecodable");
    }

    #[test]
    fn times_and_ids_parse() {
        assert_eq!(
            parse_time("2026-01-08T14:21:52Z").unwrap(),
            1_767_882_112_000
        );
        assert_eq!(
            parse_time("2026-01-08 14:21:52").unwrap(),
            1_767_882_112_000
        );
        let ago = chrono::Utc::now().timestamp_millis() - parse_time("15m").unwrap();
        assert!((899_000..=901_000).contains(&ago), "{ago}");
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_id("2@42").unwrap(), (2, 42));
        assert_eq!(parse_id("42").unwrap(), (0, 42));
        assert!(parse_id("x@1").is_err());
    }
}
