//! The dead-letter topic: records that cannot be processed, with their original bytes and the
//! reason, as Kafka headers. Sending is awaited: a batch is only committed once its dead
//! letters are durable too.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
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

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stage: Stage,
    pub plugin: Option<String>,
    pub reason: String,
    pub origin: Origin,
}

pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    metrics: Metrics,
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
        Ok(DeadLetterQueue {
            producer: cfg.create()?,
            topic: topic.to_string(),
            metrics,
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
        let partition = letter.origin.partition.to_string();
        let offset = letter.origin.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "fanout.reason",
                value: Some(letter.reason.as_bytes()),
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
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &letter.origin.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &letter.origin.payload {
            record = record.payload(p.as_slice());
        }
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                let labels = format!(
                    "{},{}",
                    label("stage", letter.stage.as_str()),
                    label("plugin", letter.plugin.as_deref().unwrap_or(""))
                );
                self.metrics
                    .add_labelled("fanout_dead_lettered_total", &labels, 1.0);
                Ok(())
            }
            Err((e, _)) => {
                warn!(error = %e, reason = %letter.reason, "dead letter not sent");
                Err(e)
            }
        }
    }
}
