//! An idempotent producer that outlives its own fatal errors.
//!
//! librdkafka's idempotent producer gives up for good (a fatal error) when
//! the broker loses track of its producer id or sequence numbers: seen when a
//! broker restarts without its producer state (noida-db), and possible in
//! Kafka after a producer's records expire. Everything it held is then
//! failed. Here such failures are not reported as failures: the records come
//! back (from the delivery report, or from a `send` refused at once), a new
//! producer (new producer id) replaces the broken one, and the records are
//! sent again in the order they were first sent, before anything newer. So
//! per partition, order holds and nothing is lost; a record the old producer
//! wrote without hearing back is written again (an exact replay, same id).
//!
//! Not for: topic routing or ids (the Kafka sink), transactions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::counter;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::kafka::KafkaFailure;
use crate::metrics::PRODUCER_RECOVERIES;

/// What became of one record: delivered, or failed for a reason a new
/// producer would not fix.
pub type Delivery = Result<(), KafkaError>;

/// A record to send again, with the caller's token.
struct Resend<T> {
    seq: u64,
    topic: String,
    partition: Option<i32>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    token: T,
}

/// A record's headers, owned, to send again.
fn copy_headers(h: &impl Headers) -> Vec<(String, Option<Vec<u8>>)> {
    h.iter()
        .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
        .collect()
}

/// State shared by the producers one after another and the recovery thread.
struct Shared<T> {
    on_delivery: Box<dyn Fn(T, Delivery) + Send + Sync>,
    resend: Mutex<Vec<Resend<T>>>,
    broken: AtomicBool,
    recoveries: AtomicU64,
    wake: Condvar,
    wake_lock: Mutex<bool>,
}

impl<T> Shared<T> {
    /// Keeps a record for the next producer and starts the replacement.
    fn hold(&self, resend: Resend<T>) {
        if let Ok(mut r) = self.resend.lock() {
            r.push(resend);
        }
        self.set_broken();
    }

    fn set_broken(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            if let Ok(mut w) = self.wake_lock.lock() {
                *w = true;
                self.wake.notify_all();
            }
        }
    }

    /// Whether `e` means the producer itself is unusable (or was purged by
    /// the recovery): the record goes to a new producer instead of failing.
    fn needs_new_producer(&self, e: &KafkaError) -> bool {
        matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::PurgeQueue
                    | RDKafkaErrorCode::PurgeInflight
            )
        ) || self.broken.load(Ordering::SeqCst)
    }
}

/// A record's token with its send order and requested partition.
pub struct Opaque<T> {
    seq: u64,
    partition: Option<i32>,
    token: T,
}

/// The context of every producer generation.
pub struct Context<T> {
    shared: Arc<Shared<T>>,
}

impl<T: Send + Sync + 'static> ClientContext for Context<T> {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::forward_error(&error, reason);
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.shared.set_broken();
        }
    }
}

impl<T: Send + Sync + 'static> ProducerContext for Context<T> {
    type DeliveryOpaque = Box<Opaque<T>>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Opaque<T>>) {
        let Opaque {
            seq,
            partition,
            token,
        } = *opaque;
        match result {
            Ok(_) => (self.shared.on_delivery)(token, Ok(())),
            Err((e, msg)) if self.shared.needs_new_producer(e) => {
                let headers = msg.headers().map(copy_headers).unwrap_or_default();
                let resend = Resend {
                    seq,
                    topic: msg.topic().to_string(),
                    partition: partition.or((msg.partition() >= 0).then(|| msg.partition())),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers,
                    token,
                };
                self.shared.hold(resend);
            }
            Err((e, _)) => (self.shared.on_delivery)(token, Err(e.clone())),
        }
    }
}

/// Why `send` did not take a record.
pub enum Refused<T> {
    /// The local queue is full: try again shortly.
    QueueFull(T),
    /// A failure a new producer would not fix (e.g. the record is too large).
    Failed(KafkaError, T),
}

/// The producer, replaced by a new one whenever it breaks.
pub struct RecoveringProducer<T: Send + Sync + 'static> {
    producer: Arc<RwLock<ThreadedProducer<Context<T>>>>,
    shared: Arc<Shared<T>>,
    seq: AtomicU64,
}

impl<T: Send + Sync + 'static> RecoveringProducer<T> {
    /// A producer with `config` (which should enable idempotence);
    /// `on_delivery` hears every record's fate exactly once, on a client
    /// thread. `name` labels the recovery metric and logs.
    pub fn new(
        config: ClientConfig,
        name: &'static str,
        on_delivery: impl Fn(T, Delivery) + Send + Sync + 'static,
    ) -> Result<Self, KafkaFailure> {
        let shared = Arc::new(Shared {
            on_delivery: Box::new(on_delivery),
            resend: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
            recoveries: AtomicU64::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
        });
        let producer = Arc::new(RwLock::new(create(&config, &shared)?));
        let recovery = Recovery {
            config,
            producer: Arc::downgrade(&producer),
            shared: Arc::clone(&shared),
            name,
        };
        std::thread::spawn(move || recovery.run());
        Ok(RecoveringProducer {
            producer,
            shared,
            seq: AtomicU64::new(0),
        })
    }

    /// Queues one record (to `partition`, or by its key when None; a None
    /// payload is a tombstone).
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
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let opaque = Box::new(Opaque {
            seq,
            partition,
            token,
        });
        let mut record = BaseRecord::with_opaque_to(topic, opaque)
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
                Err(Refused::QueueFull(record.delivery_opaque.token))
            }
            Err((e, record)) if self.shared.needs_new_producer(&e) => {
                let headers = record
                    .headers
                    .as_ref()
                    .map(copy_headers)
                    .unwrap_or_default();
                let resend = Resend {
                    seq,
                    topic: topic.to_string(),
                    partition,
                    key: Some(key.to_vec()),
                    payload: payload.map(<[u8]>::to_vec),
                    headers,
                    token: record.delivery_opaque.token,
                };
                self.shared.hold(resend);
                Ok(())
            }
            Err((e, record)) => Err(Refused::Failed(e, record.delivery_opaque.token)),
        }
    }

    /// Waits until everything queued is delivered (or `timeout`), across a
    /// recovery if one is under way.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if !self.shared.broken.load(Ordering::SeqCst) {
                let flushed = match self.producer.read() {
                    Ok(p) => p.flush(left),
                    Err(_) => Err(KafkaError::Canceled),
                };
                if flushed.is_ok() && !self.shared.broken.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            if left.is_zero() {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many times the producer was replaced.
    pub fn recoveries(&self) -> u64 {
        self.shared.recoveries.load(Ordering::SeqCst)
    }

    /// Raises a fatal error in the current producer through librdkafka's own
    /// fault injection (`rd_kafka_test_fatal_error`), as a broker that lost
    /// the producer's state would: for tests of the recovery.
    pub fn inject_fatal_error(&self) {
        if let Ok(p) = self.producer.read() {
            raise_fatal_error(p.client());
        }
    }
}

/// Raises a fatal error in a client through librdkafka's fault injection
/// (`rd_kafka_test_fatal_error`), with the error a broker that lost the
/// producer's state would cause: for tests of what follows.
pub(crate) fn raise_fatal_error<C: rdkafka::ClientContext>(client: &rdkafka::client::Client<C>) {
    let reason = c"injected by onair's fault test";
    // SAFETY: the client is alive for the call (borrowed); librdkafka
    // copies the reason string.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            client.native_ptr(),
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
}

fn create<T: Send + Sync + 'static>(
    config: &ClientConfig,
    shared: &Arc<Shared<T>>,
) -> Result<ThreadedProducer<Context<T>>, KafkaFailure> {
    config
        .create_with_context(Context {
            shared: Arc::clone(shared),
        })
        .map_err(|source| KafkaFailure::Client {
            what: "producer",
            source,
        })
}

/// The thread that replaces a broken producer.
struct Recovery<T: Send + Sync + 'static> {
    config: ClientConfig,
    producer: std::sync::Weak<RwLock<ThreadedProducer<Context<T>>>>,
    shared: Arc<Shared<T>>,
    name: &'static str,
}

impl<T: Send + Sync + 'static> Recovery<T> {
    fn run(self) {
        loop {
            {
                let Ok(mut woken) = self.shared.wake_lock.lock() else {
                    return;
                };
                while !*woken {
                    let Ok((w, _)) = self.shared.wake.wait_timeout(woken, Duration::from_secs(1))
                    else {
                        return;
                    };
                    woken = w;
                    if self.producer.strong_count() == 0 {
                        return;
                    }
                }
                *woken = false;
            }
            let Some(producer) = self.producer.upgrade() else {
                return;
            };
            self.recover(&producer);
        }
    }

    fn recover(&self, producer: &RwLock<ThreadedProducer<Context<T>>>) {
        warn!(
            producer = self.name,
            "the producer hit a fatal error; replacing it and sending again what it held"
        );
        loop {
            // Senders wait from here until the held records are queued again.
            let Ok(mut slot) = producer.write() else {
                return;
            };
            // Everything the old producer still holds comes back through its
            // delivery reports (purged, or failed as fatal), then it is empty.
            slot.purge(PurgeConfig::default().queue().inflight());
            let until = Instant::now() + Duration::from_secs(30);
            while slot.in_flight_count() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            let fresh = match create(&self.config, &self.shared) {
                Ok(p) => p,
                Err(e) => {
                    drop(slot);
                    error!(producer = self.name, error = %e, "cannot create a new producer; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            *slot = fresh;
            let mut pending = self
                .shared
                .resend
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            pending.sort_by_key(|r| r.seq);
            let count = pending.len();
            // Still under the write lock: nothing newer gets ahead of these.
            // The purge above set the wake flag again; this round covers it.
            self.shared.broken.store(false, Ordering::SeqCst);
            if let Ok(mut w) = self.shared.wake_lock.lock() {
                *w = false;
            }
            for r in pending {
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
                for (k, v) in &r.headers {
                    headers = headers.insert(Header {
                        key: k.as_str(),
                        value: v.as_deref(),
                    });
                }
                let mut opaque = Box::new(Opaque {
                    seq: r.seq,
                    partition: r.partition,
                    token: r.token,
                });
                loop {
                    let mut record = BaseRecord::with_opaque_to(&r.topic, opaque).headers(headers);
                    if let Some(k) = &r.key {
                        record = record.key(k);
                    }
                    if let Some(p) = &r.payload {
                        record = record.payload(p);
                    }
                    if let Some(p) = r.partition {
                        record = record.partition(p);
                    }
                    match slot.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            opaque = back.delivery_opaque;
                            headers = back.headers.unwrap_or_default();
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err((e, back)) => {
                            let Opaque { token, .. } = *back.delivery_opaque;
                            (self.shared.on_delivery)(token, Err(e));
                            break;
                        }
                    }
                }
            }
            counter!(PRODUCER_RECOVERIES, "producer" => self.name).increment(1);
            self.shared.recoveries.fetch_add(1, Ordering::SeqCst);
            info!(
                producer = self.name,
                records = count,
                "new producer in place; held records sent again in order"
            );
            return;
        }
    }
}
