//! The dead-letter topic: records that cannot be processed, with their original bytes and the
//! reason, as Kafka headers. Sending is awaited: a batch is only committed once its dead
//! letters are durable too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tokio::sync::oneshot;
use tracing::warn;

use crate::batch::Origin;
use crate::metrics::{label, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The message is not a Debezium envelope we understand.
    Decode,
    /// The event names content that is unknown (with `missing_content = "dead-letter"`).
    Enrich,
    /// A plugin rejected the event, or gave up on it under the best-effort policy.
    Plugin,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Enrich => "enrich",
            Stage::Plugin => "plugin",
        }
    }
}

/// The reason class of a letter: a bounded label (`fanout_dead_letters_total{reason}`, the
/// `fanout.reason.class` header) for what the free-text `fanout.reason` says.
pub fn reason_class(stage: Stage, reason: &str) -> &'static str {
    match stage {
        Stage::Decode => "undecodable",
        Stage::Enrich => "missing_content",
        // Written by delivery.rs when best-effort gives up on a batch.
        Stage::Plugin if reason.starts_with("gave up after") => "gave_up",
        Stage::Plugin => "rejected",
    }
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stage: Stage,
    pub plugin: Option<String>,
    pub reason: String,
    pub origin: Origin,
}

/// Completes each letter's send when librdkafka reports its delivery.
struct LetterContext;

impl ClientContext for LetterContext {}

impl ProducerContext for LetterContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        // The sender may have stopped waiting (its task was cancelled): nothing to tell.
        let _ = done.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// A producer whose delivery reports are served by a thread of its own.
///
/// Not rdkafka's `FutureProducer`: its thread polls with a 100 ms timeout, and the last
/// millisecond of every poll rounds down to a zero timeout that spins, about 1% of a core for
/// a topic that is written to only when something goes wrong. This thread waits up to a
/// second per poll (woken at once by a delivery report) and ends with the queue.
struct LetterProducer {
    producer: Arc<BaseProducer<LetterContext>>,
    stop: Arc<AtomicBool>,
}

impl LetterProducer {
    fn new(cfg: &ClientConfig) -> Result<Self, KafkaError> {
        let producer: Arc<BaseProducer<LetterContext>> =
            Arc::new(cfg.create_with_context(LetterContext)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (poller, stopping) = (Arc::clone(&producer), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("dead-letter-poll".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    poller.poll(Duration::from_secs(1));
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("dead-letter poll thread: {e}")))?;
        Ok(LetterProducer { producer, stop })
    }

    /// Sends one record and waits for its delivery report (librdkafka retries until
    /// `message.timeout.ms`); a full local queue is waited out like `FutureProducer` does.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let (tx, rx) = oneshot::channel();
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(topic, Box::new(tx)).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }
}

impl Drop for LetterProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // What is still queued gets its chance to be delivered before the client goes.
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

pub struct DeadLetterQueue {
    producer: LetterProducer,
    topic: String,
    metrics: Metrics,
    /// The producer's `message.max.bytes`: every letter is made to fit it.
    max_message_bytes: usize,
}

/// The longest reason a letter carries (a plugin chooses its rejection reasons).
pub const MAX_REASON_BYTES: usize = 1024;
/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// What a record costs beyond its key, value and header bytes (batch and record framing),
/// generously.
const RECORD_OVERHEAD_BYTES: usize = 1024;

/// `text` made safe for one log line or header: control characters (newlines included) and
/// Unicode line separators escaped, cut at `max_bytes` with a note of what was cut.
pub fn escape_truncate(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + 32);
    let mut buf = [0u8; 4];
    for (i, c) in text.char_indices() {
        let escaped;
        let piece: &str = if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            escaped = c.escape_default().to_string();
            &escaped
        } else {
            c.encode_utf8(&mut buf)
        };
        if out.len() + piece.len() > max_bytes {
            out.push_str(&format!("...[{} more bytes]", text.len() - i));
            return out;
        }
        out.push_str(piece);
    }
    out
}

impl DeadLetterQueue {
    pub fn new(
        brokers: &str,
        topic: &str,
        properties: &std::collections::BTreeMap<String, String>,
        metrics: Metrics,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let max_message_bytes = properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(DeadLetterQueue {
            producer: LetterProducer::new(&cfg)?,
            topic: topic.to_string(),
            metrics,
            max_message_bytes,
        })
    }

    /// Creates the dead-letter topic when the broker does not have it (not every broker
    /// auto-creates topics on produce), so the first dead letter does not wait for an operator.
    pub async fn ensure_topic(
        &self,
        brokers: &str,
        properties: &std::collections::BTreeMap<String, String>,
    ) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers);
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let admin: AdminClient<DefaultClientContext> = match cfg.create() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot create a Kafka admin client to check the dead-letter topic");
                return;
            }
        };
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(&[topic], &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(t) => tracing::info!(topic = %t, "dead-letter topic created"),
                        Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, code)) => {
                            warn!(topic = %t, error = %code, "cannot create the dead-letter topic; create it yourself")
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot create the dead-letter topic; create it yourself"),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends every letter and waits until Kafka acknowledged all of them.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), rdkafka::error::KafkaError> {
        let sends = letters.iter().map(|l| self.send(l));
        for result in futures::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }

    async fn send(&self, letter: &DeadLetter) -> Result<(), rdkafka::error::KafkaError> {
        let reason = escape_truncate(&letter.reason, MAX_REASON_BYTES);
        let key = letter.origin.key.as_deref();
        let payload = letter.origin.payload.as_deref();
        let size = |k: Option<&[u8]>, p: Option<&[u8]>| {
            k.map_or(0, <[u8]>::len)
                + p.map_or(0, <[u8]>::len)
                + reason.len()
                + letter.origin.topic.len()
                + RECORD_OVERHEAD_BYTES
        };
        // A letter that cannot fit would be refused forever and hold the lane: the original
        // bytes are left out (the source topic, partition and offset still point at them).
        let fits = |k, p| size(k, p) <= self.max_message_bytes;
        let mut omitted = None;
        let (mut key, mut payload) = (key, payload);
        if !fits(key, payload) {
            omitted = Some(format!(
                "payload of {} bytes left out: the letter would exceed message.max.bytes ({})",
                payload.map_or(0, <[u8]>::len),
                self.max_message_bytes
            ));
            payload = None;
            if !fits(key, None) {
                key = None;
            }
        }
        let result = match self
            .produce(letter, &reason, key, payload, omitted.as_deref())
            .await
        {
            // The broker's limit can be lower than the producer's: once more without the bytes.
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
                if payload.is_some() || key.is_some() =>
            {
                let note = "key and payload left out: the broker refused the letter as too large";
                self.produce(letter, &reason, None, None, Some(note)).await
            }
            other => other,
        };
        match result {
            Ok(()) => {
                let labels = format!(
                    "{},{}",
                    label("stage", letter.stage.as_str()),
                    label("plugin", letter.plugin.as_deref().unwrap_or(""))
                );
                self.metrics
                    .add_labelled("fanout_dead_lettered_total", &labels, 1.0);
                let by_reason = format!(
                    "{},{},{}",
                    label("plugin", letter.plugin.as_deref().unwrap_or("")),
                    label("stage", letter.stage.as_str()),
                    label("reason", reason_class(letter.stage, &letter.reason))
                );
                self.metrics
                    .add_labelled("fanout_dead_letters_total", &by_reason, 1.0);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, reason = %reason, "dead letter not sent");
                Err(e)
            }
        }
    }

    async fn produce(
        &self,
        letter: &DeadLetter,
        reason: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        omitted: Option<&str>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let partition = letter.origin.partition.to_string();
        let offset = letter.origin.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "fanout.reason",
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: "fanout.reason.class",
                value: Some(reason_class(letter.stage, &letter.reason).as_bytes()),
            })
            .insert(Header {
                key: "fanout.stage",
                value: Some(letter.stage.as_str().as_bytes()),
            })
            .insert(Header {
                key: "fanout.plugin",
                value: Some(letter.plugin.as_deref().unwrap_or("").as_bytes()),
            })
            .insert(Header {
                key: "fanout.source.topic",
                value: Some(letter.origin.topic.as_bytes()),
            })
            .insert(Header {
                key: "fanout.source.partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "fanout.source.offset",
                value: Some(offset.as_bytes()),
            });
        if let Some(note) = omitted {
            headers = headers.insert(Header {
                key: "fanout.payload.omitted",
                value: Some(note.as_bytes()),
            });
        }
        self.producer.send(&self.topic, key, payload, headers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_escaped_and_truncated() {
        assert_eq!(escape_truncate("plain", 100), "plain");
        let forged = "x\n2026-01-01T00:00:00Z  INFO fanout: forged\r\u{1b}[31m\u{2028}";
        let out = escape_truncate(forged, 1000);
        assert!(!out.chars().any(|c| c.is_control()), "{out}");
        assert!(out.contains("\\n2026"), "{out}");
        let long = "é".repeat(10_000);
        let out = escape_truncate(&long, MAX_REASON_BYTES);
        assert!(out.len() <= MAX_REASON_BYTES + 32, "{}", out.len());
        assert!(out.ends_with("more bytes]"), "{out}");
    }
}
