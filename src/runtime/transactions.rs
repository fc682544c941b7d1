//! Exactly-once commits: every `commit_interval_ms`, one Kafka transaction
//! takes the outputs every partition task sent since the last one, together
//! with each task's checkpoint as its consumer group's offsets (with the
//! commit metadata the at-least-once path writes too).
//!
//! A commit round: every task of every stage gets a barrier; it stops
//! sending, waits for its outputs' acknowledgements and replies with the
//! checkpoint that covers exactly what it sent. With every task stopped, the
//! producer adds each group's offsets to the transaction and commits it;
//! the tasks then go on. If the transaction cannot commit, it aborts, every
//! task ends without sending more, and each stage restarts its partitions
//! from their last committed offsets: the aborted outputs are made again,
//! and nothing committed is written twice.
//!
//! Partition tasks start only between rounds (the round lock), so a round
//! never misses a task's outputs; a revoked or drained partition's final
//! checkpoint joins the round that its stage runs before letting it go.
//!
//! Not for: the producer itself (`sinks::transactional`) or the consumers
//! (`sources::kafka`, which implement [`Participant`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use metrics::counter;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::partition::{Checkpoint, Control};
use super::OutputTopic;
use crate::metrics::TRANSACTIONS;
use crate::sinks::transactional::TransactionalProducer;
use crate::sinks::Ack;

/// A stage's consumer, as a commit round sees it.
pub trait Participant: Send + Sync {
    /// The consumer group (names the stage).
    fn group_id(&self) -> &str;
    /// The running partition tasks' control channels.
    fn tasks(&self) -> Vec<(i32, mpsc::UnboundedSender<Control>)>;
    /// The consumer's group metadata, for the transaction's offsets.
    fn group_metadata(&self) -> Option<ConsumerGroupMetadata>;
    /// The offsets (with metadata) that commit these checkpoints.
    fn offsets(&self, checkpoints: &[(i32, Checkpoint)]) -> TopicPartitionList;
    /// Ends every task at once (the transaction aborted) and has the stage
    /// restart its partitions from their last committed offsets.
    fn rewind(&self);
}

/// The commit rounds of one instance.
pub struct Transactions {
    producer: Arc<TransactionalProducer<(Ack, OutputTopic)>>,
    round: Mutex<()>,
    stages: Mutex<Vec<Weak<dyn Participant>>>,
    /// How long a round waits for every task's checkpoint.
    barrier_timeout: Duration,
    committed: AtomicU64,
    aborted: AtomicU64,
}

impl Transactions {
    /// Rounds over `producer`, waiting up to `barrier_timeout` for tasks.
    pub fn new(
        producer: Arc<TransactionalProducer<(Ack, OutputTopic)>>,
        barrier_timeout: Duration,
    ) -> Self {
        Transactions {
            producer,
            round: Mutex::new(()),
            stages: Mutex::new(Vec::new()),
            barrier_timeout,
            committed: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
        }
    }

    /// Rounds so far: (committed, aborted).
    pub fn rounds(&self) -> (u64, u64) {
        (
            self.committed.load(Ordering::Relaxed),
            self.aborted.load(Ordering::Relaxed),
        )
    }

    /// Adds a stage to every later round.
    pub fn register(&self, stage: Weak<dyn Participant>) {
        if let Ok(mut s) = self.stages.lock() {
            s.push(stage);
        }
    }

    /// Held while a task starts, so that no round runs meanwhile.
    pub fn between_rounds(&self) -> Option<MutexGuard<'_, ()>> {
        self.round.lock().ok()
    }

    /// The producer, for tests of the abort path.
    pub fn producer(&self) -> &TransactionalProducer<(Ack, OutputTopic)> {
        &self.producer
    }

    /// Runs a round every `every` until `stop`.
    pub fn run(&self, every: Duration, stop: &AtomicBool) {
        let mut next = Instant::now() + every;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            self.commit(None);
            next = Instant::now() + every;
        }
    }

    /// One round. `extra`: a stage's (by group id) final checkpoints of
    /// partitions it has drained and is letting go. True when committed.
    pub fn commit(&self, extra: Option<(&str, Vec<(i32, Checkpoint)>)>) -> bool {
        let Ok(_round) = self.round.lock() else {
            return false;
        };
        let stages: Vec<Arc<dyn Participant>> = self
            .stages
            .lock()
            .map(|s| s.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        let started = Instant::now();
        // Stop every task at its barrier.
        let mut waits = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            for (p, control) in stage.tasks() {
                let (reply, checkpoint) = std::sync::mpsc::sync_channel(1);
                let (go, resume) = tokio::sync::oneshot::channel();
                if control.send(Control::Barrier { reply, resume }).is_ok() {
                    waits.push((i, p, checkpoint, go));
                }
            }
        }
        let mut checkpoints: Vec<Vec<(i32, Checkpoint)>> = vec![Vec::new(); stages.len()];
        let deadline = Instant::now() + self.barrier_timeout;
        let mut ok = true;
        for (i, p, checkpoint, _) in &waits {
            match checkpoint.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(cp) => checkpoints[*i].push((*p, cp)),
                // The task ended (drained by its stage, which commits it).
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    warn!(
                        partition = p,
                        "a partition task did not reach the commit barrier in time"
                    );
                    ok = false;
                    break;
                }
            }
        }
        if let Some((group, drained)) = extra {
            if let Some(i) = stages.iter().position(|s| s.group_id() == group) {
                checkpoints[i].extend(drained);
            }
        }
        // Each group's offsets join the transaction, which commits.
        let mut offsets = Vec::new();
        for (stage, cps) in stages.iter().zip(&checkpoints) {
            if !ok || cps.is_empty() {
                continue;
            }
            let tpl = stage.offsets(cps);
            if tpl.count() == 0 {
                continue;
            }
            match stage.group_metadata() {
                Some(group) => offsets.push((tpl, group)),
                None => {
                    error!(
                        group = stage.group_id(),
                        "no consumer group metadata for the transaction"
                    );
                    ok = false;
                }
            }
        }
        if ok {
            match self.producer.commit(&offsets, self.barrier_timeout) {
                Ok(()) => {
                    for (_, _, _, go) in waits {
                        let _ = go.send(true);
                    }
                    counter!(TRANSACTIONS, "result" => "committed").increment(1);
                    self.committed.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        tasks = checkpoints.iter().map(Vec::len).sum::<usize>(),
                        ms = started.elapsed().as_millis() as u64,
                        "transaction committed"
                    );
                    return true;
                }
                Err(e) => warn!(error = %e, "the transaction did not commit; aborting it"),
            }
        }
        // Nothing of this transaction stays: its tasks end without another
        // output, the transaction aborts, the partitions start again.
        for (_, _, _, go) in waits {
            let _ = go.send(false);
        }
        for stage in &stages {
            stage.rewind();
        }
        self.producer.abort(self.barrier_timeout);
        counter!(TRANSACTIONS, "result" => "aborted").increment(1);
        self.aborted.fetch_add(1, Ordering::Relaxed);
        false
    }
}
