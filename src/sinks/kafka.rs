//! The Kafka sink: an idempotent producer writing outputs with their key, a
//! deterministic `onair-id` header (and `onair-model` where a model made
//! them), and delivery reports routed back to the partition that made each
//! output (through its [`Ack`]).
//!
//! Not for: transactions (exactly-once is a later option) or topic creation.

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{Ack, Busy, Sink, SinkError};
use crate::config::KafkaConfig;
use crate::kafka::{client_config, KafkaFailure};
use crate::runtime::{Output, OutputTopic};

/// Header with the output's deterministic id.
pub const ID_HEADER: &str = "onair-id";
/// Header with the model version that made the output.
pub const MODEL_HEADER: &str = "onair-model";

/// Routes delivery reports to acks.
pub struct AckContext;

impl ClientContext for AckContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::forward_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::forward_error(&error, reason);
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, msg)) => Err(SinkError::Delivery {
                topic: rdkafka::Message::topic(msg).to_string(),
                reason: e.to_string(),
                retryable: matches!(e.rdkafka_error_code(), Some(c) if c != RDKafkaErrorCode::MessageSizeTooLarge),
            }),
        };
        ack.done(outcome);
    }
}

/// Writes outputs to the pipeline's topics.
pub struct KafkaSink {
    producer: ThreadedProducer<AckContext>,
    room_stats: String,
    dead_letters: String,
    transcripts: String,
    room_features: String,
    training_samples: String,
    highlight_scores: String,
    highlights: String,
    user_actions: String,
    room_embeddings: String,
    gift_predictions: String,
    user_sequences: String,
    user_state: String,
}

impl KafkaSink {
    /// An idempotent producer for the pipeline.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaFailure> {
        let producer = Self::config(cfg)
            .create_with_context(AckContext)
            .map_err(|source| KafkaFailure::Client {
                what: "producer",
                source,
            })?;
        Ok(KafkaSink {
            producer,
            room_stats: cfg.topics.room_stats.clone(),
            dead_letters: cfg.topics.dead_letters.clone(),
            transcripts: cfg.topics.transcripts.clone(),
            room_features: cfg.topics.room_features.clone(),
            training_samples: cfg.topics.training_samples.clone(),
            highlight_scores: cfg.topics.highlight_scores.clone(),
            highlights: cfg.topics.highlights.clone(),
            user_actions: cfg.topics.user_actions.clone(),
            room_embeddings: cfg.topics.room_embeddings.clone(),
            gift_predictions: cfg.topics.gift_predictions.clone(),
            user_sequences: cfg.topics.user_sequences.clone(),
            user_state: cfg.topics.user_state.clone(),
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

    fn topic(&self, t: OutputTopic) -> &str {
        match t {
            OutputTopic::RoomStats => &self.room_stats,
            OutputTopic::DeadLetters => &self.dead_letters,
            OutputTopic::Transcripts => &self.transcripts,
            OutputTopic::RoomFeatures => &self.room_features,
            OutputTopic::TrainingSamples => &self.training_samples,
            OutputTopic::HighlightScores => &self.highlight_scores,
            OutputTopic::Highlights => &self.highlights,
            OutputTopic::UserActions => &self.user_actions,
            OutputTopic::RoomEmbeddings => &self.room_embeddings,
            OutputTopic::GiftPredictions => &self.gift_predictions,
            OutputTopic::UserSequences => &self.user_sequences,
            OutputTopic::UserChangelog { .. } => &self.user_state,
        }
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
        let mut record = BaseRecord::with_opaque_to(self.topic(out.topic), Box::new(ack))
            .key(&out.key[..])
            .payload(&out.payload[..])
            .headers(headers);
        if let OutputTopic::UserChangelog { partition } = out.topic {
            record = record.partition(partition);
        }
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                let ack = record.delivery_opaque;
                Err(Box::new(Busy(out, *ack)))
            }
            Err((e, record)) => {
                let topic = self.topic(out.topic).to_string();
                record.delivery_opaque.done(Err(SinkError::Delivery {
                    topic,
                    reason: e.to_string(),
                    retryable: false,
                }));
                Ok(())
            }
        }
    }
}
