//! Shared Kafka plumbing: client configuration from a pipeline, topic
//! creation through the admin API and the check of what the cluster holds
//! (partition counts from metadata, topic configs from DescribeConfigs), and
//! the error type for them.
//!
//! Not for: consuming (see `sources::kafka`) or producing outputs (see
//! `sinks::kafka`).

use std::time::Duration;

use std::collections::HashMap;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
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
    // librdkafka backs off reconnecting up to 10 s by default, so after a
    // broker outage the engine could idle for seconds with the broker back;
    // 1 s (the Java client's default) bounds that. `[kafka.properties]` wins.
    c.set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &cfg.properties {
        match crate::config::resolve_property(v) {
            Ok(v) => {
                c.set(k, v);
            }
            // Checked at start (`check_properties`); a secret removed since
            // then leaves the property unset, and the broker says why.
            Err(reason) => {
                tracing::error!(property = %k, %reason, "a Kafka property could not be resolved")
            }
        }
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

/// Creates the topics that do not exist yet (replication factor 1); existing
/// ones are left alone.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec<'_>],
) -> Result<(), KafkaFailure> {
    ensure_topics_replicated(cfg, topics, 1).await
}

/// librdkafka's log lines as `tracing` events (target `librdkafka`): errors
/// as errors, warnings as warnings, the rest at debug. (librdkafka prints
/// sensitive properties such as `sasl.password` as `[redacted]`.)
pub fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        _ => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// A client context that only forwards librdkafka's logs ([`forward_log`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        forward_error(&error, reason);
    }
}

/// A client-level error librdkafka reports (a broker down, a TLS handshake
/// refused, authentication failed) as a `tracing` warning: the client retries.
pub fn forward_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error");
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

fn admin_client(cfg: &KafkaConfig) -> Result<AdminClient<LogContext>, KafkaFailure> {
    client_config(cfg)
        .create_with_context(LogContext)
        .map_err(|source| KafkaFailure::Client {
            what: "admin client",
            source,
        })
}

/// As [`ensure_topics`], with `replication` replicas of every partition.
pub async fn ensure_topics_replicated(
    cfg: &KafkaConfig,
    topics: &[TopicSpec<'_>],
    replication: i32,
) -> Result<(), KafkaFailure> {
    let admin = admin_client(cfg)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(t.name, t.partitions, TopicReplication::Fixed(replication));
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

/// The partition count of every topic in the cluster. Blocking. Asks for all
/// topics rather than naming some: a metadata request that names an unknown
/// topic creates it with one partition on brokers that auto-create topics.
pub fn partition_counts(
    cfg: &KafkaConfig,
    timeout: Duration,
) -> Result<HashMap<String, i32>, KafkaFailure> {
    let consumer: BaseConsumer<LogContext> = client_config(cfg)
        .set("allow.auto.create.topics", "false")
        .create_with_context(LogContext)
        .map_err(|source| KafkaFailure::Client {
            what: "metadata client",
            source,
        })?;
    let metadata =
        consumer
            .fetch_metadata(None, timeout)
            .map_err(|source| KafkaFailure::Operation {
                what: "metadata request",
                source,
            })?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// One topic as the cluster holds it, against its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicCheck {
    /// The topic.
    pub name: String,
    /// Partitions stated.
    pub want_partitions: i32,
    /// Partitions the cluster reports (None: no such topic).
    pub partitions: Option<i32>,
    /// Each stated config: key, stated value, the cluster's value (None: not
    /// reported).
    pub configs: Vec<(String, String, Option<String>)>,
    /// Why the configs could not be read, if they could not.
    pub error: Option<String>,
}

impl TopicCheck {
    /// Whether the topic is as stated.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.partitions == Some(self.want_partitions)
            && self
                .configs
                .iter()
                .all(|(_, want, got)| got.as_deref() == Some(want.as_str()))
    }
}

/// Compares every topic of `topics` with what the cluster holds: partition
/// counts as [`partition_counts`] read them, configs from DescribeConfigs.
pub async fn check_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec<'_>],
    counts: &HashMap<String, i32>,
) -> Result<Vec<TopicCheck>, KafkaFailure> {
    let admin = admin_client(cfg)?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.name))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs(specifiers.iter(), &opts)
        .await
        .map_err(|source| KafkaFailure::Operation {
            what: "describe configs",
            source,
        })?;
    Ok(topics
        .iter()
        .zip(described)
        .map(|(t, d)| {
            let (entries, error) = match d {
                Ok(resource) => (
                    resource
                        .entries
                        .into_iter()
                        .map(|e| (e.name, e.value))
                        .collect::<HashMap<_, _>>(),
                    None,
                ),
                Err(code) => (HashMap::new(), Some(code.to_string())),
            };
            TopicCheck {
                name: t.name.to_string(),
                want_partitions: t.partitions,
                partitions: counts.get(t.name).copied(),
                configs: t
                    .configs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            v.to_string(),
                            entries.get(*k).cloned().flatten(),
                        )
                    })
                    .collect(),
                error,
            }
        })
        .collect())
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
            name: &t.room_state,
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
