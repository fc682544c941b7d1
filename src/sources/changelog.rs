//! Reads one partition of a stage's changelog topic back, from its start to
//! the end it has when the read begins: what a partition task restores its
//! operators' state from when the partition is assigned (see
//! [`crate::runtime::ChangelogReader`]).
//!
//! Not for: writing the changelog (operators emit it as outputs through the
//! sink) or following a topic as a table (see `room_table`).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::config::{Guarantee, KafkaConfig};
use crate::kafka::{client_config, KafkaFailure};
use crate::runtime::ChangelogReader;

/// How long one read may go without progress before it gives up.
const STALL: Duration = Duration::from_secs(60);

/// A changelog topic of the pipeline's cluster.
pub struct KafkaChangelog {
    cfg: KafkaConfig,
    topic: String,
}

impl KafkaChangelog {
    /// Reads `topic` of the cluster `cfg` names.
    pub fn new(cfg: &KafkaConfig, topic: &str) -> Self {
        KafkaChangelog {
            cfg: cfg.clone(),
            topic: topic.to_string(),
        }
    }
}

impl ChangelogReader for KafkaChangelog {
    fn read(
        &mut self,
        partition: i32,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut c = client_config(&self.cfg);
        c.set("group.id", format!("{}-restore", self.cfg.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "50");
        if self.cfg.guarantee == Guarantee::ExactlyOnce {
            // Records of aborted transactions are not state.
            c.set("isolation.level", "read_committed");
        }
        let consumer: BaseConsumer = c.create().map_err(|source| KafkaFailure::Client {
            what: "changelog consumer",
            source,
        })?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(30))
            .map_err(|source| KafkaFailure::Operation {
                what: "changelog watermarks",
                source,
            })?;
        debug!(topic = %self.topic, partition, low, high, "reading the changelog");
        if high <= low {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)
            .map_err(|source| KafkaFailure::Operation {
                what: "changelog assignment",
                source,
            })?;
        consumer
            .assign(&tpl)
            .map_err(|source| KafkaFailure::Operation {
                what: "changelog assignment",
                source,
            })?;
        let mut progress = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    progress = Instant::now();
                    if let Some(k) = m.key() {
                        // A tombstone comes as an empty value.
                        f(k, m.payload().unwrap_or_default());
                    }
                    if m.offset() + 1 >= high {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
                Some(Err(e)) => {
                    let fatal = matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::TopicAuthorizationFailed
                        )
                    );
                    if fatal {
                        return Err(Box::new(e));
                    }
                    warn!(topic = %self.topic, partition, error = %e, "reading the changelog");
                }
                None => {}
            }
            if progress.elapsed() > STALL {
                return Err(format!(
                    "no progress reading {} partition {partition} for {STALL:?}",
                    self.topic
                )
                .into());
            }
        }
    }
}
