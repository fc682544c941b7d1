//! How records reach a partition task: pushed over its channel (the
//! simulator, tests) or pulled by the task itself from per-stream queues that
//! a source lends it (Kafka's partition queues), decoded in place without
//! copying the payload.
//!
//! Not for: decoding (the task does it) or group membership (the source).

use std::sync::Arc;

use tokio::sync::Notify;

use crate::schema::InputKind;

/// One record, borrowed from wherever the source keeps it.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    /// Which stream.
    pub kind: InputKind,
    /// Source topic name (for dead letters).
    pub topic: &'a str,
    /// Offset in the stream's partition.
    pub offset: i64,
    /// Kafka key.
    pub key: Option<&'a [u8]>,
    /// Kafka value.
    pub payload: Option<&'a [u8]>,
    /// The `content-type` header, if any.
    pub content_type: Option<&'a str>,
}

/// What a read hands the task, in stream order.
#[derive(Clone, Copy, Debug)]
pub enum Polled<'a> {
    /// A record.
    Record(RecordRef<'a>),
    /// The stream has been read up to the end the broker reported: nothing
    /// more is there now (Kafka's partition EOF, which librdkafka queues
    /// after the stream's last record).
    CaughtUp(InputKind),
}

/// Per-stream queues a partition task reads itself. Reading one stream and
/// not another is how the task holds a stream back: the source's queue fills
/// and the client stops fetching it, with no pause and no re-fetch.
pub trait StreamReader: Send {
    /// Hands `f` what stream `kind` holds now, up to `budget` records,
    /// without waiting. Returns the number of records handed over.
    fn read(&mut self, kind: InputKind, budget: usize, f: &mut dyn FnMut(Polled<'_>)) -> usize;

    /// Notified when a stream that was read empty has records again.
    fn ready(&self) -> Arc<Notify>;
}
