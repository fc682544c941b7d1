//! The Kafka sink: an idempotent producer writing outputs with their key, a
//! deterministic `onair-id` header (and `onair-model` where a model made
//! them), and delivery reports routed back to the partition that made each
//! output (through its [`Ack`]). A producer broken by a fatal error is
//! replaced and its held outputs sent again in order ([`RecoveringProducer`]).
//!
//! Not for: transactions (exactly-once is a later option) or topic creation.

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};

use super::producer::{Delivery, RecoveringProducer, Refused};
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
        OutputTopic::RoomEmbeddings => &t.room_embeddings,
        OutputTopic::GiftPredictions => &t.gift_predictions,
        OutputTopic::UserSequences => &t.user_sequences,
        OutputTopic::UserChangelog { .. } => &t.user_state,
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

/// Writes outputs to the pipeline's topics.
pub struct KafkaSink {
    producer: RecoveringProducer<(Ack, OutputTopic)>,
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
            producer,
            topics: cfg.topics.clone(),
        })
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

    /// Waits for everything queued to be delivered.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
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
            OutputTopic::UserChangelog { partition } => Some(partition),
            _ => None,
        };
        let topic = topic_name(&self.topics, out.topic);
        match self.producer.send(
            topic,
            partition,
            &out.key,
            &out.payload,
            headers,
            (ack, out.topic),
        ) {
            Ok(()) => Ok(()),
            Err(Refused::QueueFull((ack, _))) => Err(Box::new(Busy(out, ack))),
            Err(Refused::Failed(e, (ack, _))) => {
                ack.done(Err(failure(topic, &e)));
                Ok(())
            }
        }
    }
}
