//! The transactional producer behind exactly-once outputs (`[kafka]
//! guarantee = "exactly-once"`): one per instance (the exactly-once v2
//! shape), its `transactional.id` derived from the group and the instance.
//! Outputs go into the open transaction; [`TransactionalProducer::commit`]
//! adds the consumers' offsets to it, commits and opens the next one. A
//! transaction that cannot commit is aborted, and so are its outputs: the
//! caller must then restart the partitions from their last committed
//! offsets (nothing is sent again from here, unlike the idempotent
//! [`super::producer::RecoveringProducer`]: an output outside the
//! transaction of its input's offsets would break exactly-once).
//!
//! Not for: choosing what to commit or when (`runtime::transactions`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use super::producer::{Delivery, Refused};
use crate::kafka::KafkaFailure;

/// How long a transaction may stay open on the broker before it aborts it
/// (Kafka Streams' exactly-once default): a crashed instance's open
/// transaction holds back read_committed readers of its partitions at most
/// this long.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The context of each producer: delivery reports go to the caller.
pub struct TxnContext<T> {
    on_delivery: Arc<dyn Fn(T, Delivery) + Send + Sync>,
    undelivered: Arc<AtomicBool>,
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// An output of the transaction was refused or not delivered: committing
    /// would commit offsets past it.
    #[error("an output of the transaction was not delivered")]
    Undelivered,
    /// The broker or the client refused the commit.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

impl<T: Send + Sync + 'static> ClientContext for TxnContext<T> {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::forward_error(&error, reason);
    }
}

impl<T: Send + Sync + 'static> ProducerContext for TxnContext<T> {
    type DeliveryOpaque = Box<T>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<T>) {
        if result.is_err() {
            self.undelivered.store(true, Ordering::SeqCst);
        }
        (self.on_delivery)(
            *token,
            result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()),
        );
    }
}

/// A transactional producer with a transaction always open.
pub struct TransactionalProducer<T: Send + Sync + 'static> {
    producer: RwLock<ThreadedProducer<TxnContext<T>>>,
    config: ClientConfig,
    on_delivery: Arc<dyn Fn(T, Delivery) + Send + Sync>,
    /// An output of the open transaction was refused or failed.
    undelivered: Arc<AtomicBool>,
}

impl<T: Send + Sync + 'static> TransactionalProducer<T> {
    /// Creates the producer (`config` must carry a `transactional.id`),
    /// fences older producers with the same id (their open transactions
    /// abort) and opens the first transaction. `on_delivery` hears every
    /// record's fate once; a delivered record is only final once its
    /// transaction commits.
    pub fn new(
        config: ClientConfig,
        on_delivery: impl Fn(T, Delivery) + Send + Sync + 'static,
    ) -> Result<Self, KafkaFailure> {
        let on_delivery: Arc<dyn Fn(T, Delivery) + Send + Sync> = Arc::new(on_delivery);
        let undelivered = Arc::new(AtomicBool::new(false));
        let producer = start(&config, &on_delivery, &undelivered)?;
        Ok(TransactionalProducer {
            producer: RwLock::new(producer),
            config,
            on_delivery,
            undelivered,
        })
    }

    /// Queues one record into the open transaction.
    pub fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        token: T,
    ) -> Result<(), Refused<T>> {
        let Ok(producer) = self.producer.read() else {
            return Err(Refused::Failed(KafkaError::Canceled, token));
        };
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(token))
            .key(key)
            .headers(headers);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                Err(Refused::QueueFull(*record.delivery_opaque))
            }
            Err((e, record)) => {
                self.undelivered.store(true, Ordering::SeqCst);
                Err(Refused::Failed(e, *record.delivery_opaque))
            }
        }
    }

    /// Adds each group's offsets to the open transaction, commits it and
    /// opens the next. On an error the transaction is not committed: call
    /// [`Self::abort`].
    pub fn commit(
        &self,
        offsets: &[(TopicPartitionList, ConsumerGroupMetadata)],
        timeout: Duration,
    ) -> Result<(), CommitError> {
        let producer = self.producer.write().map_err(|_| KafkaError::Canceled)?;
        if self.undelivered.load(Ordering::SeqCst) || producer.client().fatal_error().is_some() {
            return Err(CommitError::Undelivered);
        }
        for (tpl, group) in offsets {
            producer.send_offsets_to_transaction(tpl, group, timeout)?;
        }
        producer.commit_transaction(timeout)?;
        producer.begin_transaction()?;
        Ok(())
    }

    /// Aborts the open transaction (everything sent into it is discarded)
    /// and opens a new one; a producer that cannot abort (a fatal error) is
    /// replaced by a new one with the same `transactional.id`. Retries until
    /// a transaction is open again.
    pub fn abort(&self, timeout: Duration) {
        let Ok(mut producer) = self.producer.write() else {
            return;
        };
        if let Some((code, reason)) = producer.client().fatal_error() {
            warn!(?code, %reason, "the transactional producer hit a fatal error; replacing it");
        } else {
            match producer.abort_transaction(timeout) {
                Ok(()) => match producer.begin_transaction() {
                    Ok(()) => {
                        // The aborted outputs' reports came back in the abort.
                        self.undelivered.store(false, Ordering::SeqCst);
                        info!("transaction aborted; a new one is open");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot open a transaction after the abort; replacing the producer")
                    }
                },
                Err(e) => warn!(error = %e, "cannot abort the transaction; replacing the producer"),
            }
        }
        loop {
            match start(&self.config, &self.on_delivery, &self.undelivered) {
                Ok(fresh) => {
                    // The old producer's held outputs fail as it goes.
                    *producer = fresh;
                    self.undelivered.store(false, Ordering::SeqCst);
                    info!("new transactional producer in place");
                    return;
                }
                Err(e) => {
                    error!(error = %e, "cannot start a transactional producer; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Raises a fatal error in the producer through librdkafka's fault
    /// injection (`rd_kafka_test_fatal_error`): for tests of the abort path.
    pub fn inject_fatal_error(&self) {
        if let Ok(p) = self.producer.read() {
            super::producer::raise_fatal_error(p.client());
        }
    }
}

/// Creates a producer, initialises its transactions and opens the first.
fn start<T: Send + Sync + 'static>(
    config: &ClientConfig,
    on_delivery: &Arc<dyn Fn(T, Delivery) + Send + Sync>,
    undelivered: &Arc<AtomicBool>,
) -> Result<ThreadedProducer<TxnContext<T>>, KafkaFailure> {
    let producer: ThreadedProducer<TxnContext<T>> = config
        .create_with_context(TxnContext {
            on_delivery: Arc::clone(on_delivery),
            undelivered: Arc::clone(undelivered),
        })
        .map_err(|source| KafkaFailure::Client {
            what: "transactional producer",
            source,
        })?;
    producer
        .init_transactions(Duration::from_secs(30))
        .map_err(|source| KafkaFailure::Operation {
            what: "init transactions",
            source,
        })?;
    producer
        .begin_transaction()
        .map_err(|source| KafkaFailure::Operation {
            what: "begin transaction",
            source,
        })?;
    Ok(producer)
}
