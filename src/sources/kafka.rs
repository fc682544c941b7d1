//! The Kafka source: one consumer-group member that reads the co-partitioned
//! room topics and starts one partition task per partition number.
//!
//! Co-partitioning: the group subscribes to one topic (the comments topic,
//! the "group topic") with `cooperative-sticky` (or, if configured, eager)
//! assignment; when partition `p` of it is assigned, partition `p` of every
//! other room topic is assigned with it, and revoked with it. So one member
//! always owns all of a room's streams, which is what Kafka Streams achieves
//! with its own assignor.
//!
//! Records do not pass through this module's thread: before a partition is
//! assigned, each of its streams is split into its own librdkafka queue and
//! lent to the partition task ([`KafkaReader`]), which reads and decodes in
//! place. A task holds a stream back by not reading it; librdkafka then stops
//! fetching it once its prefetch queue is full (`queued.max.messages.kbytes`),
//! so backpressure needs no pause and never drops prefetched records. The
//! partition EOF that librdkafka queues after a stream's last record tells
//! the task, exactly, that nothing more of that stream is on the broker.
//!
//! The poll thread here keeps the membership alive (rebalances, statistics),
//! and commits offsets from each task's [`Checkpoint`] (never past an
//! unacknowledged output) every `commit_interval_ms`, and synchronously when
//! a partition is revoked, after the task has drained. The emitted-through
//! time and the replay marks travel in the commit metadata. Under
//! exactly-once, offsets are committed by the instance's transactions
//! instead ([`Transactions`]): the stage takes part in every commit round,
//! runs one itself before letting a drained partition go, and restarts its
//! partitions from their last commit when a transaction aborts.
//!
//! Not for: decoding (partition tasks do it) or producing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::stream_queue::{Item, StreamQueue};
use crate::config::PipelineConfig;
use crate::kafka::{client_config, KafkaFailure};
use crate::metrics::{
    Stage, CONSUMER_LAG, OFFSET_COMMITS, PARTITIONS_ASSIGNED, PARTITIONS_PAUSED, REBALANCES,
};
use crate::runtime::transactions::{Participant, Transactions};
use crate::runtime::{
    Checkpoint, Control, PartitionHandle, Polled, RecordRef, ReplayMarks, StreamReader,
};
use crate::schema::{InputKind, CONTENT_TYPE_HEADER};

/// Starts a partition task for a partition number, given the emitted-through
/// time and replay marks found in the commit metadata and the reader of its
/// streams.
pub type TaskFactory = dyn Fn(i32, Option<i64>, Option<ReplayMarks>, Box<dyn StreamReader>) -> PartitionHandle
    + Send
    + Sync;

/// The streams one stage reads: its kinds, their topics, and the topic the
/// group subscribes to (the others follow it partition by partition).
#[derive(Clone, Debug)]
pub struct StageTopics {
    /// The consumer group.
    pub group_id: String,
    /// Each stream and its topic.
    pub streams: Vec<(InputKind, Arc<str>)>,
    /// The stream whose topic the group subscribes to.
    pub group_kind: InputKind,
}

impl StageTopics {
    /// The room stage: video, audio, comments and actions, by comments.
    pub fn rooms(config: &PipelineConfig) -> Self {
        let t = &config.kafka.topics;
        StageTopics {
            group_id: config.kafka.group_id.clone(),
            streams: vec![
                (InputKind::Video, t.video.as_str().into()),
                (InputKind::Audio, t.audio.as_str().into()),
                (InputKind::Comments, t.comments.as_str().into()),
                (InputKind::Actions, t.actions.as_str().into()),
            ],
            group_kind: InputKind::Comments,
        }
    }

    /// The user stage: short-video actions and the repartitioned live
    /// actions, by the latter, in its own group (`<group_id>-users`).
    pub fn users(config: &PipelineConfig) -> Self {
        let t = &config.kafka.topics;
        StageTopics {
            group_id: format!("{}-users", config.kafka.group_id),
            streams: vec![
                (
                    InputKind::ShortVideoActions,
                    t.short_video_actions.as_str().into(),
                ),
                (InputKind::UserActions, t.user_actions.as_str().into()),
            ],
            group_kind: InputKind::UserActions,
        }
    }

    fn kind_of(&self, topic: &str) -> Option<InputKind> {
        self.streams
            .iter()
            .find(|(_, name)| &**name == topic)
            .map(|(k, _)| *k)
    }

    fn name_of(&self, kind: InputKind) -> Option<&Arc<str>> {
        self.streams
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, n)| n)
    }

    fn group_topic(&self) -> Arc<str> {
        self.name_of(self.group_kind)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    fn tpl_for(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (_, name) in &self.streams {
            tpl.add_partition(name, partition);
        }
        tpl
    }
}

struct Tasks {
    running: HashMap<i32, PartitionHandle>,
    /// Last checkpoint committed per partition.
    committed: HashMap<i32, Checkpoint>,
}

/// The consumer's context: rebalance handling and statistics.
pub struct SourceContext {
    topics: StageTopics,
    factory: Arc<TaskFactory>,
    tasks: Mutex<Tasks>,
    drain_timeout: Duration,
    /// The consumer itself, to split partition queues off it on assignment.
    consumer: OnceLock<Weak<BaseConsumer<SourceContext>>>,
    /// Warned that the broker drops commit metadata.
    warned_metadata: AtomicBool,
    /// The instance's transactions, under exactly-once.
    txn: Option<Arc<Transactions>>,
    /// Partitions to restart from their last commit (a transaction aborted).
    rewind: Mutex<Vec<i32>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::forward_log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::forward_error(&error, reason);
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let group_topic = self.topics.group_topic();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&group_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                counter!(REBALANCES, "event" => "assign").increment(1);
                self.assign(consumer, &partitions);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                counter!(REBALANCES, "event" => if lost { "lost" } else { "revoke" }).increment(1);
                self.revoke(consumer, &partitions, lost);
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Whether the group runs an eager protocol (`range`, `roundrobin`), whose
/// rebalances revoke and assign whole assignments.
fn eager(consumer: &BaseConsumer<SourceContext>) -> bool {
    matches!(consumer.rebalance_protocol(), RebalanceProtocol::Eager)
}

impl SourceContext {
    fn assign(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let Some(shared) = self.consumer.get().and_then(Weak::upgrade) else {
            error!("consumer gone during an assignment");
            return;
        };
        let mut assign = TopicPartitionList::new();
        for &p in partitions {
            let wanted = self.topics.tpl_for(p);
            let committed = match consumer.committed_offsets(wanted, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => {
                    // Without committed offsets we cannot resume safely; the
                    // group will retry the assignment after the session times out.
                    error!(partition = p, error = %e, "cannot read committed offsets; partition not started");
                    continue;
                }
            };
            // Split every stream off before it is assigned, so that no record
            // of it ever reaches the consumer's main queue.
            let mut reader = match KafkaReader::split(&shared, &self.topics, p) {
                Some(r) => r,
                None => {
                    error!(
                        partition = p,
                        "cannot split the partition's queues; partition not started"
                    );
                    continue;
                }
            };
            let mut replayed_through: Option<i64> = None;
            let mut marks = ReplayMarks::default();
            let mut has_marks = false;
            let (mut resumed, mut has_metadata) = (false, false);
            for e in committed.elements() {
                resumed |= matches!(e.offset(), Offset::Offset(_));
                has_metadata |= e.metadata().starts_with(Checkpoint::PREFIX);
                // Each stream's offset comes with the emitted-through time of
                // the same checkpoint. When the streams' commits differ (one
                // landed later), the newest time is the safe one: its ticks
                // were all written, and every stream resumes at or before
                // what that checkpoint's state needed. An older time would
                // rewrite ticks whose inputs the newer offsets no longer
                // replay (seen once: a viewer missing from a rewritten tick).
                if let Some(t) = Checkpoint::parse_metadata(e.metadata()) {
                    replayed_through = Some(replayed_through.map_or(t, |r: i64| r.max(t)));
                }
                // Each stream's marks are its own (written with its offset).
                if let (Some(c), Some(kind)) = (
                    Checkpoint::parse_committed(e.metadata()),
                    self.topics.kind_of(e.topic()),
                ) {
                    if let (Some(a), Some(p)) = (c.accepted, c.processed) {
                        marks.accepted[kind.index()] = Some(a);
                        marks.processed[kind.index()] = Some(p);
                        has_marks = true;
                    }
                }
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::Beginning,
                };
                // A stream that starts at the end of what the broker holds
                // is caught up from the start: the merge need not wait for
                // its first fetch (which may come after a long one of
                // another stream).
                if let (Some(kind), Ok((low, high))) = (
                    self.topics.kind_of(e.topic()),
                    consumer.fetch_watermarks(e.topic(), p, Duration::from_secs(2)),
                ) {
                    let start = match offset {
                        Offset::Offset(o) => o,
                        _ => low,
                    };
                    if start >= high {
                        reader.caught_up_at_start(kind);
                    }
                }
                if let Err(err) = assign.add_partition_offset(e.topic(), p, offset) {
                    error!(partition = p, error = %err, "bad offset in assignment");
                }
            }
            drop(committed);
            if resumed && !has_metadata && !self.warned_metadata.swap(true, Ordering::Relaxed) {
                warn!(
                    partition = p,
                    "committed offsets came back without their metadata: this broker drops it, so \
                     the first ticks after a restart or hand-over may be written again from part \
                     of their input"
                );
            }
            // No commit round runs while a task starts: each round sees
            // every task that may have sent into its transaction.
            let between = self.txn.as_ref().and_then(|t| t.between_rounds());
            let handle = (self.factory)(
                p,
                replayed_through,
                has_marks.then_some(marks),
                Box::new(reader),
            );
            if let Ok(mut t) = self.tasks.lock() {
                t.running.insert(p, handle);
            }
            drop(between);
            info!(partition = p, ?replayed_through, "partition assigned");
        }
        // Eager protocols hand over the whole new assignment at once;
        // cooperative-sticky only the partitions added.
        let assigned = if eager(consumer) {
            consumer.assign(&assign)
        } else {
            consumer.incremental_assign(&assign)
        };
        if let Err(e) = assigned {
            error!(error = %e, "assign failed");
        }
        drop(assign);
        self.publish_assigned();
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32], lost: bool) {
        let mut unassign = TopicPartitionList::new();
        let mut drained = Vec::new();
        for &p in partitions {
            let handle = self.tasks.lock().ok().and_then(|mut t| {
                t.committed.remove(&p);
                t.running.remove(&p)
            });
            if let Some(handle) = handle {
                if lost {
                    // Another member owns it now: committing would be wrong.
                    handle.join.abort();
                    warn!(
                        partition = p,
                        "partition lost; state dropped without commit"
                    );
                } else if let Some(cp) = drain(&handle, self.drain_timeout) {
                    if self.txn.is_some() {
                        drained.push((p, cp));
                    } else {
                        commit(consumer, &self.topics, p, &cp, CommitMode::Sync);
                    }
                }
            }
            for (_, name) in &self.topics.streams {
                unassign.add_partition(name, p);
            }
            info!(partition = p, lost, "partition revoked");
        }
        if let Some(txn) = &self.txn {
            // The drained partitions' outputs and offsets commit before
            // another member may take them.
            if !lost && !txn.commit(Some((&self.topics.group_id, drained))) {
                warn!("the revoked partitions' transaction aborted; their new owner replays from the last commit");
            }
        }
        // Eager protocols revoke every partition, cooperative ones only
        // those that move.
        let unassigned = if eager(consumer) {
            consumer.unassign()
        } else {
            consumer.incremental_unassign(&unassign)
        };
        if let Err(e) = unassigned {
            error!(error = %e, "unassign failed");
        }
        drop(unassign);
        self.publish_assigned();
    }

    /// Restarts the partitions whose tasks a transaction's abort ended: gives
    /// them up and takes them again, from their last committed offsets.
    fn rewind_partitions(&self, consumer: &BaseConsumer<Self>) {
        let partitions = match self.rewind.lock() {
            Ok(mut r) if !r.is_empty() => std::mem::take(&mut *r),
            _ => return,
        };
        let mut unassign = TopicPartitionList::new();
        for &p in &partitions {
            for (_, name) in &self.topics.streams {
                unassign.add_partition(name, p);
            }
        }
        let unassigned = if eager(consumer) {
            consumer.unassign()
        } else {
            consumer.incremental_unassign(&unassign)
        };
        if let Err(e) = unassigned {
            error!(error = %e, "unassign for the restart failed");
        }
        counter!(REBALANCES, "event" => "rewind").increment(1);
        info!(?partitions, "restarting partitions from their last commit");
        self.assign(consumer, &partitions);
    }

    fn publish_assigned(&self) {
        if let Ok(t) = self.tasks.lock() {
            gauge!(PARTITIONS_ASSIGNED).set(t.running.len() as f64);
        }
    }
}

/// A partition's room streams, each in its own librdkafka queue, read by
/// the partition task.
pub struct KafkaReader {
    /// By `InputKind::index`; None for streams the stage does not read.
    queues: Vec<Option<StreamQueue<SourceContext>>>,
    /// Streams to report caught up before their first read.
    caught_up: [bool; InputKind::COUNT],
    topics: [Option<Arc<str>>; InputKind::COUNT],
    ready: Arc<Notify>,
    stage: Stage,
}

impl KafkaReader {
    fn split(
        consumer: &Arc<BaseConsumer<SourceContext>>,
        topics: &StageTopics,
        p: i32,
    ) -> Option<Self> {
        let ready = Arc::new(Notify::new());
        let mut queues: Vec<Option<StreamQueue<SourceContext>>> =
            (0..InputKind::COUNT).map(|_| None).collect();
        let mut names: [Option<Arc<str>>; InputKind::COUNT] = Default::default();
        for (kind, name) in &topics.streams {
            queues[kind.index()] = Some(StreamQueue::split(consumer, name, p, ready.clone())?);
            names[kind.index()] = Some(name.clone());
        }
        Some(KafkaReader {
            queues,
            caught_up: [false; InputKind::COUNT],
            topics: names,
            ready,
            stage: Stage::new("source"),
        })
    }
}

impl KafkaReader {
    fn caught_up_at_start(&mut self, kind: InputKind) {
        if let Some(c) = self.caught_up.get_mut(kind.index()) {
            *c = true;
        }
    }
}

impl StreamReader for KafkaReader {
    fn read(&mut self, kind: InputKind, budget: usize, f: &mut dyn FnMut(Polled<'_>)) -> usize {
        if let Some(c) = self.caught_up.get_mut(kind.index()) {
            if std::mem::take(c) {
                f(Polled::CaughtUp(kind));
            }
        }
        let (Some(Some(queue)), Some(Some(topic))) = (
            self.queues.get_mut(kind.index()),
            self.topics.get(kind.index()),
        ) else {
            return 0;
        };
        let mut n = 0;
        let stage = &self.stage;
        while n < budget {
            let got = queue.read(budget - n, CONTENT_TYPE_HEADER, &mut |item| match item {
                Item::Record {
                    offset,
                    key,
                    payload,
                    header,
                } => {
                    n += 1;
                    f(Polled::Record(RecordRef {
                        kind,
                        topic,
                        offset,
                        key,
                        payload,
                        content_type: header
                            .map(|v| std::str::from_utf8(v).unwrap_or("(not UTF-8)")),
                    }));
                }
                Item::Eof => f(Polled::CaughtUp(kind)),
                Item::Error(e) => {
                    stage.error("consume");
                    warn!(topic = %topic, error = ?e, "consume error");
                }
            });
            if got == 0 {
                break;
            }
        }
        if n > 0 {
            self.stage.received.increment(n as u64);
            self.stage.sent.increment(n as u64);
        }
        n
    }

    fn ready(&self) -> Arc<Notify> {
        self.ready.clone()
    }
}

/// Asks a task to drain and waits (blocking) for its final checkpoint.
fn drain(handle: &PartitionHandle, timeout: Duration) -> Option<Checkpoint> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if handle.control.send(Control::Drain { reply: tx }).is_err() {
        return None;
    }
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(cp) => Some(cp),
        Err(_) => {
            warn!(
                partition = handle.partition,
                "task did not drain in time; its records will be replayed"
            );
            handle.join.abort();
            None
        }
    }
}

fn commit(
    consumer: &BaseConsumer<SourceContext>,
    topics: &StageTopics,
    p: i32,
    cp: &Checkpoint,
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    add_offsets(&mut tpl, topics, p, cp);
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            counter!(OFFSET_COMMITS, "result" => "ok").increment(1);
            debug!(partition = p, checkpoint = ?cp, "offsets committed");
        }
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            counter!(OFFSET_COMMITS, "result" => "error").increment(1);
            warn!(partition = p, error = %e, "offset commit failed; will retry");
        }
    }
}

/// Adds the offsets (with their metadata) that commit `cp` for partition `p`.
fn add_offsets(tpl: &mut TopicPartitionList, topics: &StageTopics, p: i32, cp: &Checkpoint) {
    for (kind, name) in &topics.streams {
        if let Some(off) = cp.next_offsets[kind.index()] {
            let mut e = tpl.add_partition(name, p);
            if e.set_offset(Offset::Offset(off)).is_ok() {
                e.set_metadata(cp.metadata(*kind));
            }
        }
    }
}

/// A stage as its instance's commit rounds see it (exactly-once).
struct StageTxn {
    consumer: Weak<BaseConsumer<SourceContext>>,
    group_id: String,
}

impl Participant for StageTxn {
    fn group_id(&self) -> &str {
        &self.group_id
    }

    fn tasks(&self) -> Vec<(i32, tokio::sync::mpsc::UnboundedSender<Control>)> {
        let Some(consumer) = self.consumer.upgrade() else {
            return Vec::new();
        };
        let tasks = consumer.context().tasks.lock();
        tasks
            .map(|t| {
                t.running
                    .iter()
                    .map(|(p, h)| (*p, h.control.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        self.consumer.upgrade()?.group_metadata()
    }

    fn offsets(&self, checkpoints: &[(i32, Checkpoint)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if let Some(consumer) = self.consumer.upgrade() {
            for (p, cp) in checkpoints {
                add_offsets(&mut tpl, &consumer.context().topics, *p, cp);
            }
        }
        tpl
    }

    fn rewind(&self) {
        let Some(consumer) = self.consumer.upgrade() else {
            return;
        };
        let ctx = consumer.context();
        let handles: Vec<PartitionHandle> = ctx
            .tasks
            .lock()
            .map(|mut t| {
                t.committed.clear();
                t.running.drain().map(|(_, h)| h).collect()
            })
            .unwrap_or_default();
        // Told at their barrier to end; any other ends here, before the
        // transaction aborts, so nothing reaches the next one.
        for h in &handles {
            h.join.abort();
        }
        let until = Instant::now() + Duration::from_secs(5);
        while handles.iter().any(|h| !h.join.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Ok(mut r) = ctx.rewind.lock() {
            r.extend(handles.iter().map(|h| h.partition));
        }
        ctx.publish_assigned();
    }
}

/// The consumer-group member.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<SourceContext>>,
    topics: StageTopics,
    commit_every: Duration,
    stage: Stage,
    /// Keeps the stage in its instance's commit rounds (exactly-once).
    _txn_stage: Option<Arc<StageTxn>>,
}

impl KafkaSource {
    /// Creates the consumer of one stage's streams (`topics`) and subscribes
    /// to its group topic.
    ///
    /// `instance_id` turns on static membership (`group.instance.id`): a
    /// member restarted with the same id gets its partitions back at once,
    /// without a rebalance (the way to run onair as pods with stable names).
    /// `txn`: the instance's transactions, under exactly-once.
    pub fn new(
        config: &PipelineConfig,
        topics: StageTopics,
        factory: Arc<TaskFactory>,
        instance_id: Option<&str>,
        txn: Option<Arc<Transactions>>,
    ) -> Result<Self, KafkaFailure> {
        let k = &config.kafka;
        let context = SourceContext {
            topics: topics.clone(),
            factory,
            tasks: Mutex::new(Tasks {
                running: HashMap::new(),
                committed: HashMap::new(),
            }),
            drain_timeout: Duration::from_millis(config.runtime.drain_timeout_ms),
            consumer: OnceLock::new(),
            warned_metadata: AtomicBool::new(false),
            txn: txn.clone(),
            rewind: Mutex::new(Vec::new()),
        };
        let mut c = client_config(k);
        c.set("group.id", &topics.group_id)
            .set("partition.assignment.strategy", k.assignment.as_str())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            // Outputs of onair that onair reads (the repartitioned actions)
            // count once their transaction commits (librdkafka's default).
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            .set("max.poll.interval.ms", k.max_poll_interval_ms.to_string())
            .set(
                "statistics.interval.ms",
                k.statistics_interval_ms.to_string(),
            )
            .set("fetch.wait.max.ms", "100")
            // A stream whose task holds it back fills its prefetch queue;
            // librdkafka then checks again after this long. The default (1 s)
            // would leave a drained stream idle for up to a second.
            .set("fetch.queue.backoff.ms", "20")
            .set("fetch.error.backoff.ms", "100")
            // Some Kafka-protocol brokers (noida-db) ignore fetch.max.bytes and
            // answer with everything a partition holds; a response larger than
            // this limit fails every fetch, so allow large responses.
            .set("receive.message.max.bytes", "1000000000")
            .set("fetch.max.bytes", k.message_max_bytes.to_string())
            .set("max.partition.fetch.bytes", k.message_max_bytes.to_string());
        if let Some(id) = instance_id {
            c.set("group.instance.id", id);
        }
        for (key, v) in &k.properties {
            c.set(key, v);
        }
        let consumer: Arc<BaseConsumer<SourceContext>> = Arc::new(
            c.create_with_context(context)
                .map_err(|source| KafkaFailure::Client {
                    what: "consumer",
                    source,
                })?,
        );
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let txn_stage = txn.map(|txn| {
            let stage = Arc::new(StageTxn {
                consumer: Arc::downgrade(&consumer),
                group_id: topics.group_id.clone(),
            });
            let weak: Weak<dyn Participant> = Arc::downgrade(&stage) as Weak<dyn Participant>;
            txn.register(weak);
            stage
        });
        consumer
            .subscribe(&[&topics.group_topic()])
            .map_err(|source| KafkaFailure::Operation {
                what: "subscribe",
                source,
            })?;
        Ok(KafkaSource {
            consumer,
            topics,
            commit_every: Duration::from_millis(u64::from(k.commit_interval_ms)),
            stage: Stage::new("source"),
            _txn_stage: txn_stage,
        })
    }

    /// Polls until `stop` is set, then drains every partition, commits and
    /// leaves the group. Blocking: run it on its own thread.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut last_commit = Instant::now();
        let mut last_upkeep = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(msg)) => {
                    // Every assigned stream is split off before assignment,
                    // so this is a bug; the record is replayed on restart
                    // (its offset is not committed past it).
                    self.stage.error("unsplit_record");
                    error!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "record arrived on the consumer queue instead of its partition queue"
                    );
                }
                Some(Err(e)) => {
                    self.stage.error("consume");
                    warn!(error = %e, "consume error");
                }
                None => {}
            }
            let now = Instant::now();
            if now.duration_since(last_upkeep) >= Duration::from_millis(500) {
                last_upkeep = now;
                self.publish_held_back();
            }
            let ctx = self.consumer.context();
            ctx.rewind_partitions(&self.consumer);
            if ctx.txn.is_none() && now.duration_since(last_commit) >= self.commit_every {
                last_commit = now;
                self.commit_checkpoints();
            }
        }
        self.shutdown();
    }

    /// Streams that tasks are holding back (not reading: buffer full).
    fn publish_held_back(&self) {
        if let Ok(tasks) = self.consumer.context().tasks.lock() {
            let held: usize = tasks
                .running
                .values()
                .map(|h| {
                    h.shared
                        .pause
                        .iter()
                        .filter(|p| p.load(Ordering::Relaxed))
                        .count()
                })
                .sum();
            gauge!(PARTITIONS_PAUSED).set(held as f64);
        }
    }

    fn commit_checkpoints(&self) {
        let ctx = self.consumer.context();
        let mut todo = Vec::new();
        if let Ok(mut tasks) = ctx.tasks.lock() {
            let Tasks {
                running, committed, ..
            } = &mut *tasks;
            for (p, handle) in running.iter() {
                let cp = handle.shared.checkpoint.lock().ok().and_then(|c| c.clone());
                if let Some(cp) = cp {
                    if committed.get(p) != Some(&cp) {
                        committed.insert(*p, cp.clone());
                        todo.push((*p, cp));
                    }
                }
            }
        }
        for (p, cp) in todo {
            commit(&self.consumer, &self.topics, p, &cp, CommitMode::Async);
        }
    }

    fn shutdown(self) {
        info!("draining every partition before leaving the group");
        let ctx = self.consumer.context();
        let handles: Vec<PartitionHandle> = ctx
            .tasks
            .lock()
            .map(|mut t| t.running.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        let mut drained = Vec::new();
        for handle in &handles {
            if let Some(cp) = drain(handle, ctx.drain_timeout) {
                if ctx.txn.is_some() {
                    drained.push((handle.partition, cp));
                } else {
                    commit(
                        &self.consumer,
                        &self.topics,
                        handle.partition,
                        &cp,
                        CommitMode::Sync,
                    );
                }
            }
        }
        if let Some(txn) = &ctx.txn {
            if !txn.commit(Some((&self.topics.group_id, drained))) {
                warn!("the final transaction aborted; the next owner replays from the last commit");
            }
        }
        ctx.publish_assigned();
        self.consumer.unsubscribe();
        // Let the revoke go through so the group rebalances at once.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if self.consumer.poll(Duration::from_millis(50)).is_none()
                && self
                    .consumer
                    .assignment()
                    .map(|a| a.count() == 0)
                    .unwrap_or(true)
            {
                break;
            }
        }
        info!("left the group");
    }
}
