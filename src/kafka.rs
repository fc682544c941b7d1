//! Shared Kafka plumbing: client configuration from a pipeline, topic
//! creation through the admin API, and the error type for both.
//!
//! Not for: consuming (see `sources::kafka`) or producing outputs (see
//! `sinks::kafka`).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::error::{Classify, Fault};

/// A Kafka operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaFailure {
    /// The client could not be created (bad property, bad broker list).
    #[error("cannot create the Kafka {what}: {source}")]
    Client {
        /// Which client.
        what: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// Creating a topic failed.
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    /// Any other broker operation.
    #[error("Kafka {what} failed: {source}")]
    Operation {
        /// What was attempted.
        what: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
}

impl Classify for KafkaFailure {
    fn fault(&self) -> Fault {
        match self {
            KafkaFailure::Client { .. } => Fault::Input,
            _ => Fault::External,
        }
    }
    fn retryable(&self) -> bool {
        !matches!(self, KafkaFailure::Client { .. })
    }
}

/// Base client configuration: brokers plus the pipeline's extra properties.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", "onair");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// A topic onair may create.
pub struct TopicSpec<'a> {
    /// Name.
    pub name: &'a str,
    /// Partition count.
    pub partitions: i32,
    /// Extra topic configs (e.g. `cleanup.policy=compact`).
    pub configs: Vec<(&'a str, &'a str)>,
}

/// Creates the topics that do not exist yet; existing ones are left alone.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec<'_>],
) -> Result<(), KafkaFailure> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(cfg)
            .create()
            .map_err(|source| KafkaFailure::Client {
                what: "admin client",
                source,
            })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(t.name, t.partitions, TopicReplication::Fixed(1));
            for (k, v) in &t.configs {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|source| KafkaFailure::Operation {
            what: "create topics",
            source,
        })?;
    for r in results {
        if let Err((topic, code)) = r {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                return Err(KafkaFailure::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Every topic of a pipeline, with onair's partition counts and policies.
pub fn pipeline_topics(cfg: &KafkaConfig) -> Vec<TopicSpec<'_>> {
    let t = &cfg.topics;
    let p = t.partitions;
    let big = "67108864";
    vec![
        TopicSpec {
            name: &t.video,
            partitions: p,
            configs: vec![("max.message.bytes", big)],
        },
        TopicSpec {
            name: &t.audio,
            partitions: p,
            configs: vec![("max.message.bytes", big)],
        },
        TopicSpec {
            name: &t.comments,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.actions,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.short_video_actions,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.room_stats,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.transcripts,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.room_features,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.training_samples,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.highlight_scores,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.highlights,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.user_actions,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.room_embeddings,
            partitions: p,
            configs: vec![("cleanup.policy", "compact")],
        },
        TopicSpec {
            name: &t.gift_predictions,
            partitions: p,
            configs: vec![],
        },
        TopicSpec {
            name: &t.user_sequences,
            partitions: p,
            configs: vec![("cleanup.policy", "compact")],
        },
        TopicSpec {
            name: &t.user_state,
            partitions: p,
            configs: vec![("cleanup.policy", "compact"), ("max.message.bytes", big)],
        },
        TopicSpec {
            name: &t.dead_letters,
            partitions: p,
            configs: vec![("max.message.bytes", big)],
        },
    ]
}
