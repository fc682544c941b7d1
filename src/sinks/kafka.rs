//! The Kafka sink: an idempotent producer writing outputs with their key, a
//! deterministic `onair-id` header (and `onair-model` where a model made
//! them), and delivery reports routed back to the partition that made each
//! output (through its [`Ack`]). A producer broken by a fatal error is
//! replaced and its held outputs sent again in order ([`RecoveringProducer`]).
//! Under exactly-once, a transactional producer takes its place
//! ([`TransactionalProducer`]), and outputs commit with their input offsets.
//!
//! Not for: deciding when transactions commit (`runtime::transactions`) or
//! topic creation.

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};

use super::producer::{Delivery, RecoveringProducer, Refused};
use super::transactional::{TransactionalProducer, TRANSACTION_TIMEOUT};
use super::{Ack, Busy, Sink, SinkError};
use crate::config::{KafkaConfig, TopicsConfig};
use crate::kafka::{client_config, KafkaFailure};
use crate::runtime::{Output, OutputTopic};

/// Header with the output's deterministic id.
pub const ID_HEADER: &str = "onair-id";
/// Header with the model version that made the output.
pub const MODEL_HEADER: &str = "onair-model";

/// The topic an output goes to.
fn topic_name(t: &TopicsConfig, o: OutputTopic) -> &str {
    match o {
        OutputTopic::RoomStats => &t.room_stats,
        OutputTopic::DeadLetters => &t.dead_letters,
        OutputTopic::Transcripts => &t.transcripts,
        OutputTopic::RoomFeatures => &t.room_features,
        OutputTopic::TrainingSamples => &t.training_samples,
        OutputTopic::HighlightScores => &t.highlight_scores,
        OutputTopic::Highlights => &t.highlights,
        OutputTopic::UserActions => &t.user_actions,
        OutputTopic::RoomEmbeddings
        | OutputTopic::RoomScores
        | OutputTopic::RoomProgress { .. } => &t.room_embeddings,
        OutputTopic::GiftPredictions => &t.gift_predictions,
        OutputTopic::UserSequences => &t.user_sequences,
        OutputTopic::UserChangelog { .. } => &t.user_state,
        OutputTopic::RoomChangelog { .. } => &t.room_state,
    }
}

/// A delivery's outcome as the partition task hears it.
fn outcome(topic: &str, result: Delivery) -> Result<(), SinkError> {
    result.map_err(|e| failure(topic, &e))
}

fn failure(topic: &str, e: &KafkaError) -> SinkError {
    SinkError::Delivery {
        topic: topic.to_string(),
        reason: e.to_string(),
        retryable: matches!(e.rdkafka_error_code(), Some(c) if c != RDKafkaErrorCode::MessageSizeTooLarge),
    }
}

/// The producer of the outputs, by guarantee.
enum Producer {
    /// At-least-once: idempotent, replaced when it breaks.
    Idempotent(RecoveringProducer<(Ack, OutputTopic)>),
    /// Exactly-once: transactional.
    Transactional(Arc<TransactionalProducer<(Ack, OutputTopic)>>),
}

/// Writes outputs to the pipeline's topics.
pub struct KafkaSink {
    producer: Producer,
    topics: TopicsConfig,
}

impl KafkaSink {
    /// An idempotent producer for the pipeline.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaFailure> {
        let topics = cfg.topics.clone();
        let producer = RecoveringProducer::new(
            Self::config(cfg),
            "sink",
            move |(ack, topic): (Ack, OutputTopic), result| {
                ack.done(outcome(topic_name(&topics, topic), result));
            },
        )?;
        Ok(KafkaSink {
            producer: Producer::Idempotent(producer),
            topics: cfg.topics.clone(),
        })
    }

    /// A transactional producer for the pipeline (exactly-once), with a
    /// transaction open.
    pub fn transactional(cfg: &KafkaConfig, transactional_id: &str) -> Result<Self, KafkaFailure> {
        let topics = cfg.topics.clone();
        let mut config = Self::config(cfg);
        let timeout = TRANSACTION_TIMEOUT.as_millis().to_string();
        config
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", &timeout)
            // Bounded by the transaction: an output not delivered by then
            // fails the transaction, which aborts and is replayed.
            .set("message.timeout.ms", &timeout);
        let producer =
            TransactionalProducer::new(config, move |(ack, topic): (Ack, OutputTopic), result| {
                ack.done(outcome(topic_name(&topics, topic), result));
            })?;
        Ok(KafkaSink {
            producer: Producer::Transactional(Arc::new(producer)),
            topics: cfg.topics.clone(),
        })
    }

    /// The transactional producer, under exactly-once.
    pub fn transactions(&self) -> Option<Arc<TransactionalProducer<(Ack, OutputTopic)>>> {
        match &self.producer {
            Producer::Transactional(p) => Some(Arc::clone(p)),
            Producer::Idempotent(_) => None,
        }
    }

    /// The producer settings onair uses for outputs.
    pub fn config(cfg: &KafkaConfig) -> ClientConfig {
        let mut c = client_config(cfg);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("message.max.bytes", cfg.message_max_bytes.to_string())
            .set("compression.type", "lz4")
            // Retry transient errors until delivered; permanent ones fail the ack.
            .set("message.timeout.ms", "0")
            .set("queue.buffering.max.messages", "200000");
        c
    }

    /// Waits for everything queued to be delivered (under exactly-once,
    /// outputs are final when their transaction commits instead).
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        match &self.producer {
            Producer::Idempotent(p) => p.flush(timeout),
            Producer::Transactional(_) => Ok(()),
        }
    }
}

impl Sink for KafkaSink {
    fn send(&self, out: Output, ack: Ack) -> Result<(), Box<Busy>> {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len() + 2).insert(Header {
            key: ID_HEADER,
            value: Some(out.id.as_bytes()),
        });
        if let Some(m) = &out.model_version {
            headers = headers.insert(Header {
                key: MODEL_HEADER,
                value: Some(m.as_bytes()),
            });
        }
        for (k, v) in &out.headers {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            });
        }
        let partition = match out.topic {
            OutputTopic::UserChangelog { partition }
            | OutputTopic::RoomChangelog { partition }
            | OutputTopic::RoomProgress { partition } => Some(partition),
            _ => None,
        };
        let topic = topic_name(&self.topics, out.topic);
        // An empty changelog record deletes its key: a tombstone.
        let tombstone = out.payload.is_empty() && partition.is_some();
        let payload = (!tombstone).then_some(&out.payload[..]);
        let (key, token) = (&out.key, (ack, out.topic));
        let sent = match &self.producer {
            Producer::Idempotent(p) => p.send(topic, partition, key, payload, headers, token),
            Producer::Transactional(p) => p.send(topic, partition, key, payload, headers, token),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(Refused::QueueFull((ack, _))) => Err(Box::new(Busy(out, ack))),
            Err(Refused::Failed(e, (ack, _))) => {
                ack.done(Err(failure(topic, &e)));
                Ok(())
            }
        }
    }
}
