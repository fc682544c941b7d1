//! One stream's librdkafka queue (a topic-partition split off the consumer
//! queue), read in batches through librdkafka's C API: one call hands over
//! up to a few hundred records, which are lent to the caller in place and
//! released after it returns. The safe `rdkafka` crate only offers one
//! message per call, with an allocation and a clock read each; this is the
//! hot path of the engine, so it is worth the small unsafe surface here.
//!
//! Not for: group membership, offsets or decoding.

use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;

/// What a queue hands over.
pub enum Item<'a> {
    /// A record.
    Record {
        /// Offset in the partition.
        offset: i64,
        /// Kafka key.
        key: Option<&'a [u8]>,
        /// Kafka value.
        payload: Option<&'a [u8]>,
        /// The first header named `name_ci` (ASCII case-insensitive), if asked.
        header: Option<&'a [u8]>,
    },
    /// The end of the partition as the broker reported it.
    Eof,
    /// A partition-level error (already retried by librdkafka where it can).
    Error(RDKafkaRespErr),
}

/// A topic-partition's own queue; records of it no longer reach the
/// consumer queue. Dropping it stops the wake-ups and releases the queue.
pub struct StreamQueue<C: ConsumerContext + 'static> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Woken (from a librdkafka thread) when the queue turns non-empty;
    /// held so that the callback's pointer stays valid.
    _wake: Arc<Notify>,
    /// Keeps the client alive for as long as the queue.
    _consumer: Arc<BaseConsumer<C>>,
    batch: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: the queue handle is a reference-counted librdkafka object whose
// operations are thread-safe; the raw message pointers in `batch` are only
// live within one `read` call.
unsafe impl<C: ConsumerContext + 'static> Send for StreamQueue<C> {}

unsafe extern "C" fn on_nonempty(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` inside the `Arc` the queue holds; the
    // callback is disabled (under the queue lock) before that Arc is dropped.
    let wake = unsafe { &*(opaque as *const Notify) };
    wake.notify_one();
}

/// Destroys a message when dropped, also if the reader's callback unwinds.
struct Owned(*mut rd::rd_kafka_message_t);

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: the pointer came from rd_kafka_consume_batch_queue and is
        // destroyed exactly once, here.
        unsafe { rd::rd_kafka_message_destroy(self.0) }
    }
}

impl<C: ConsumerContext + 'static> StreamQueue<C> {
    /// Splits `topic` / `partition` off the consumer queue. Call it before
    /// the partition is assigned, so no record of it reaches the consumer
    /// queue; librdkafka keeps an application-set forwarding across assigns.
    pub fn split(
        consumer: &Arc<BaseConsumer<C>>,
        topic: &str,
        partition: i32,
        wake: Arc<Notify>,
    ) -> Option<Self> {
        let name = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives; the
        // name is NUL-terminated and outlives the call.
        let raw = unsafe {
            rd::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                name.as_ptr(),
                partition,
            )
        };
        let queue = NonNull::new(raw)?;
        // SAFETY: `queue` is a live queue reference we own; forwarding to
        // NULL detaches it from the consumer queue. The callback's opaque
        // pointer stays valid while `wake` (held by Self) lives.
        unsafe {
            rd::rd_kafka_queue_forward(queue.as_ptr(), std::ptr::null_mut());
            rd::rd_kafka_queue_cb_event_enable(
                queue.as_ptr(),
                Some(on_nonempty),
                Arc::as_ptr(&wake) as *mut c_void,
            );
        }
        Some(StreamQueue {
            queue,
            _wake: wake,
            _consumer: consumer.clone(),
            batch: Vec::new(),
        })
    }

    /// Hands `f` up to `max` items that are queued now (never waits), with
    /// the header named `header_ci` looked up in each record. Returns how
    /// many items were handed over.
    pub fn read(&mut self, max: usize, header_ci: &str, f: &mut dyn FnMut(Item<'_>)) -> usize {
        let max = max.clamp(1, 1024);
        self.batch.clear();
        self.batch.reserve(max);
        // SAFETY: the buffer has room for `max` pointers; librdkafka writes
        // at most that many and returns how many (or -1).
        let got = unsafe {
            let n = rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                0,
                self.batch.as_mut_ptr(),
                max,
            );
            if n > 0 {
                self.batch.set_len((n as usize).min(max));
            }
            n
        };
        if got <= 0 {
            return 0;
        }
        let mut handed = 0;
        for &m in &self.batch {
            let owned = Owned(m);
            // SAFETY: a message from the batch is valid until destroyed (by
            // `owned`, after this iteration); the slices borrowed from it do
            // not outlive the callback.
            let msg = unsafe { &*owned.0 };
            let item = if msg.err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                Item::Record {
                    offset: msg.offset,
                    key: unsafe { bytes(msg.key, msg.key_len) },
                    payload: unsafe { bytes(msg.payload, msg.len) },
                    header: unsafe { header(owned.0, header_ci) },
                }
            } else if msg.err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF {
                Item::Eof
            } else {
                Item::Error(msg.err)
            };
            f(item);
            handed += 1;
        }
        self.batch.clear();
        handed
    }
}

impl<C: ConsumerContext + 'static> Drop for StreamQueue<C> {
    fn drop(&mut self) {
        // SAFETY: disabling the callback takes the queue lock, so no
        // callback runs after it returns; then our reference is released.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// A byte slice from a librdkafka pointer and length (None for NULL).
///
/// # Safety
/// `ptr` must be NULL or point to `len` bytes that outlive `'a`.
unsafe fn bytes<'a>(ptr: *mut c_void, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else {
        Some(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
    }
}

/// The value of the first header whose name equals `name_ci`, ignoring
/// ASCII case.
///
/// # Safety
/// `m` must be a live message; the slice must not outlive it.
unsafe fn header<'a>(m: *mut rd::rd_kafka_message_t, name_ci: &str) -> Option<&'a [u8]> {
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    if unsafe { rd::rd_kafka_message_headers(m, &mut hdrs) }
        != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        || hdrs.is_null()
    {
        return None;
    }
    let mut idx = 0;
    loop {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        idx += 1;
        if name.is_null() {
            continue;
        }
        let n = unsafe { CStr::from_ptr(name) }.to_bytes();
        if n.eq_ignore_ascii_case(name_ci.as_bytes()) {
            // A header with a NULL value counts as empty.
            return Some(unsafe { bytes(value as *mut c_void, size) }.unwrap_or(&[]));
        }
    }
}
