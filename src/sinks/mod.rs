//! Sinks: where outputs go once operators have made them, and how their
//! acknowledgements flow back to the partition that made them (so that
//! offsets are only committed past acknowledged outputs).
//!
//! Not for: deciding what to write (operators) or retry policy beyond the
//! client's own (librdkafka retries transient produce errors itself).

pub mod console;
pub mod dead_letters;
pub mod kafka;
pub mod producer;
pub mod samples;
pub mod transactional;

use tokio::sync::mpsc;

use crate::error::{Classify, Fault};
use crate::runtime::Output;

/// The result of writing one output, sent back to its partition task.
#[derive(Debug)]
pub struct AckMsg {
    /// The batch (group of outputs) the output belongs to.
    pub batch: u64,
    /// Whether the sink accepted it for good.
    pub result: Result<(), SinkError>,
}

/// A promise to report one output's fate. Dropping it unreported counts as a
/// failure, so no output can be forgotten silently.
#[derive(Debug)]
pub struct Ack {
    tx: Option<mpsc::UnboundedSender<AckMsg>>,
    batch: u64,
}

impl Ack {
    /// An ack for `batch` reported on `tx`.
    pub fn new(tx: mpsc::UnboundedSender<AckMsg>, batch: u64) -> Self {
        Ack {
            tx: Some(tx),
            batch,
        }
    }

    /// Reports the output's fate.
    pub fn done(mut self, result: Result<(), SinkError>) {
        if let Some(tx) = self.tx.take() {
            // The partition may be gone (revoked); then nobody needs the ack.
            let _ = tx.send(AckMsg {
                batch: self.batch,
                result,
            });
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(AckMsg {
                batch: self.batch,
                result: Err(SinkError::Lost),
            });
        }
    }
}

/// Why an output was not written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The broker refused or the delivery timed out after the client's retries.
    #[error("delivery to {topic} failed: {reason}")]
    Delivery {
        /// Destination topic.
        topic: String,
        /// The client's error.
        reason: String,
        /// Whether sending it again could succeed.
        retryable: bool,
    },
    /// The sink dropped the acknowledgement (shut down mid-flight).
    #[error("the sink shut down before acknowledging")]
    Lost,
}

impl Classify for SinkError {
    fn fault(&self) -> Fault {
        Fault::External
    }
    fn retryable(&self) -> bool {
        match self {
            SinkError::Delivery { retryable, .. } => *retryable,
            SinkError::Lost => true,
        }
    }
}

/// The sink's local queue is full: try again shortly with the same output.
pub struct Busy(pub Output, pub Ack);

/// Somewhere outputs are written.
pub trait Sink: Send + Sync {
    /// Hands one output over; its fate is reported through `ack`.
    fn send(&self, output: Output, ack: Ack) -> Result<(), Box<Busy>>;
}
