//! The Kafka source: one consumer-group member that reads the co-partitioned
//! room topics and feeds one partition task per partition number.
//!
//! Co-partitioning: the group subscribes to one topic (the comments topic,
//! the "group topic") with `cooperative-sticky` assignment; when partition
//! `p` of it is assigned, partition `p` of every other room topic is assigned
//! with it, and revoked with it. So one member always owns all of a room's
//! streams, which is what Kafka Streams achieves with its own assignor.
//!
//! The poll loop runs on its own thread. It never blocks on a task: when a
//! task's queue is full, records are stashed and that partition is paused
//! while polling continues (so the member never leaves the group); a task
//! can also ask for one stream to be paused (its merge buffer is full).
//! Offsets are committed from each task's [`Checkpoint`] (never past an
//! unacknowledged output) every `commit_interval_ms`, and synchronously when
//! a partition is revoked, after the task has drained. The emitted-through
//! time travels in the commit metadata.
//!
//! Not for: decoding (partition tasks do it) or producing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, error, info, warn};

use crate::config::PipelineConfig;
use crate::kafka::{client_config, KafkaFailure};
use crate::metrics::{
    Stage, CONSUMER_LAG, OFFSET_COMMITS, PARTITIONS_ASSIGNED, PARTITIONS_PAUSED, REBALANCES,
};
use crate::runtime::{Checkpoint, Control, Input, InputRecord, PartitionHandle};
use crate::schema::{InputKind, CONTENT_TYPE_HEADER};

/// Starts a partition task for a partition number, given the emitted-through
/// time found in the commit metadata.
pub type TaskFactory = dyn Fn(i32, Option<i64>) -> PartitionHandle + Send + Sync;

/// Topic names of the room streams, by `InputKind::index`.
#[derive(Clone, Debug)]
struct Topics {
    names: [Arc<str>; InputKind::ROOM_COUNT],
    group: usize,
}

impl Topics {
    fn kind_of(&self, topic: &str) -> Option<InputKind> {
        InputKind::ROOM
            .into_iter()
            .find(|k| &*self.names[k.index()] == topic)
    }

    fn tpl_for(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for name in &self.names {
            tpl.add_partition(name, partition);
        }
        tpl
    }
}

struct Tasks {
    running: HashMap<i32, PartitionHandle>,
    /// Records read while a task's queue was full, in order.
    stash: HashMap<i32, VecDeque<Input>>,
    /// Last checkpoint committed per partition.
    committed: HashMap<i32, Checkpoint>,
    /// Committed offset each stream resumed from, by (kind index, partition).
    starts: HashMap<(usize, i32), i64>,
}

/// The consumer's context: rebalance handling and statistics.
pub struct SourceContext {
    topics: Topics,
    factory: Arc<TaskFactory>,
    tasks: Mutex<Tasks>,
    drain_timeout: Duration,
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
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", fac, "{log_message}"),
            _ => debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let group_topic = self.topics.names[self.topics.group].clone();
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

impl SourceContext {
    fn assign(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
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
            let mut replayed_through: Option<i64> = None;
            for e in committed.elements() {
                if let Some(t) = Checkpoint::parse_metadata(e.metadata()) {
                    replayed_through = Some(replayed_through.map_or(t, |r: i64| r.min(t)));
                }
                let offset = match e.offset() {
                    Offset::Offset(o) => {
                        if let (Some(kind), Ok(mut t)) =
                            (self.topics.kind_of(e.topic()), self.tasks.lock())
                        {
                            t.starts.insert((kind.index(), p), o);
                        }
                        Offset::Offset(o)
                    }
                    _ => Offset::Beginning,
                };
                if let Err(err) = assign.add_partition_offset(e.topic(), p, offset) {
                    error!(partition = p, error = %err, "bad offset in assignment");
                }
            }
            drop(committed);
            let handle = (self.factory)(p, replayed_through);
            if let Ok(mut t) = self.tasks.lock() {
                t.running.insert(p, handle);
            }
            info!(partition = p, ?replayed_through, "partition assigned");
        }
        if let Err(e) = consumer.incremental_assign(&assign) {
            error!(error = %e, "incremental assign failed");
        }
        drop(assign);
        self.publish_assigned();
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32], lost: bool) {
        let mut unassign = TopicPartitionList::new();
        for &p in partitions {
            let handle = self.tasks.lock().ok().and_then(|mut t| {
                t.stash.remove(&p);
                t.committed.remove(&p);
                t.starts.retain(|(_, q), _| *q != p);
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
                    commit(consumer, &self.topics, p, &cp, CommitMode::Sync);
                }
            }
            for name in &self.topics.names {
                unassign.add_partition(name, p);
            }
            info!(partition = p, lost, "partition revoked");
        }
        if let Err(e) = consumer.incremental_unassign(&unassign) {
            error!(error = %e, "incremental unassign failed");
        }
        drop(unassign);
        self.publish_assigned();
    }

    fn publish_assigned(&self) {
        if let Ok(t) = self.tasks.lock() {
            gauge!(PARTITIONS_ASSIGNED).set(t.running.len() as f64);
        }
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
    topics: &Topics,
    p: i32,
    cp: &Checkpoint,
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    let metadata = cp.metadata();
    for kind in InputKind::ROOM {
        if let Some(off) = cp.next_offsets[kind.index()] {
            let mut e = tpl.add_partition(&topics.names[kind.index()], p);
            if e.set_offset(Offset::Offset(off)).is_ok() {
                e.set_metadata(metadata.clone());
            }
        }
    }
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

/// The (low, high) watermarks librdkafka last saw in a fetch response (no
/// network round trip), or None when it has not fetched the partition yet.
fn cached_watermarks(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the topic
    // is a NUL-terminated string that outlives the call; both out-pointers
    // point to live locals. The function only reads librdkafka's cache.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low.max(0), high))
}

/// The consumer-group member.
pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    topics: Topics,
    commit_every: Duration,
    stage: Stage,
}

impl KafkaSource {
    /// Creates the consumer and subscribes to the group topic.
    ///
    /// `instance_id` turns on static membership (`group.instance.id`): a
    /// member restarted with the same id gets its partitions back at once,
    /// without a rebalance (the way to run onair as pods with stable names).
    pub fn new(
        config: &PipelineConfig,
        factory: Arc<TaskFactory>,
        instance_id: Option<&str>,
    ) -> Result<Self, KafkaFailure> {
        let k = &config.kafka;
        let t = &k.topics;
        let topics = Topics {
            names: InputKind::ROOM.map(|kind| -> Arc<str> {
                match kind {
                    InputKind::Video => t.video.as_str().into(),
                    InputKind::Audio => t.audio.as_str().into(),
                    InputKind::Comments => t.comments.as_str().into(),
                    _ => t.actions.as_str().into(),
                }
            }),
            group: InputKind::Comments.index(),
        };
        let context = SourceContext {
            topics: topics.clone(),
            factory,
            tasks: Mutex::new(Tasks {
                running: HashMap::new(),
                stash: HashMap::new(),
                committed: HashMap::new(),
                starts: HashMap::new(),
            }),
            drain_timeout: Duration::from_millis(config.runtime.drain_timeout_ms),
        };
        let mut c = client_config(k);
        c.set("group.id", &k.group_id)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            .set("max.poll.interval.ms", k.max_poll_interval_ms.to_string())
            .set(
                "statistics.interval.ms",
                k.statistics_interval_ms.to_string(),
            )
            .set("fetch.wait.max.ms", "100")
            // librdkafka postpones a partition's next fetch by this much when
            // its prefetch queue is full. 10 ms made the comment path 2.4x
            // faster on noida-db, but records then arrived late after a
            // restart (streams marked caught up on stale watermarks): kept at
            // librdkafka's default until the caught-up check is made exact.
            .set("fetch.queue.backoff.ms", "1000")
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
        let consumer: BaseConsumer<SourceContext> =
            c.create_with_context(context)
                .map_err(|source| KafkaFailure::Client {
                    what: "consumer",
                    source,
                })?;
        consumer
            .subscribe(&[&topics.names[topics.group]])
            .map_err(|source| KafkaFailure::Operation {
                what: "subscribe",
                source,
            })?;
        Ok(KafkaSource {
            consumer,
            topics,
            commit_every: Duration::from_millis(u64::from(k.commit_interval_ms)),
            stage: Stage::new("source"),
        })
    }

    /// Polls until `stop` is set, then drains every partition, commits and
    /// leaves the group. Blocking: run it on its own thread.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut paused: HashSet<(usize, i32)> = HashSet::new();
        let mut last_commit = Instant::now();
        let mut last_upkeep = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(Ok(msg)) => self.dispatch(&msg),
                Some(Err(KafkaError::PartitionEOF(p))) => self.dispatch_eof(p),
                Some(Err(e)) => {
                    self.stage.error("consume");
                    warn!(error = %e, "consume error");
                }
                None => {}
            }
            let now = Instant::now();
            if now.duration_since(last_upkeep) >= Duration::from_millis(20) {
                last_upkeep = now;
                self.flush_stashes();
                self.apply_pauses(&mut paused);
            }
            if now.duration_since(last_commit) >= self.commit_every {
                last_commit = now;
                self.commit_checkpoints();
            }
        }
        self.shutdown();
    }

    fn dispatch_eof(&self, partition: i32) {
        // PartitionEOF names only the partition: find which of its streams
        // have been handed over up to the broker's high watermark.
        let Ok(pos) = self.consumer.position() else {
            return;
        };
        let mut kinds = Vec::new();
        for e in pos.elements() {
            if e.partition() != partition {
                continue;
            }
            let Some(kind) = self.topics.kind_of(e.topic()) else {
                continue;
            };
            let Some((low, high)) = cached_watermarks(&self.consumer, e.topic(), partition) else {
                continue;
            };
            // Nothing delivered yet (no position): caught up when the stream
            // resumed at the end, or the partition holds nothing.
            let caught_up = match e.offset() {
                Offset::Offset(at) => at >= high,
                _ => {
                    let start = self
                        .consumer
                        .context()
                        .tasks
                        .lock()
                        .ok()
                        .and_then(|t| t.starts.get(&(kind.index(), partition)).copied());
                    low >= high || start.is_some_and(|s| s >= high)
                }
            };
            if caught_up {
                kinds.push(kind);
            }
        }
        drop(pos);
        for k in kinds {
            self.route(partition, Input::CaughtUp(k));
        }
    }

    fn dispatch(&self, msg: &BorrowedMessage<'_>) {
        self.stage.received.increment(1);
        let Some(kind) = self.topics.kind_of(msg.topic()) else {
            self.stage.dropped("unknown_topic", 1);
            return;
        };
        let content_type = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        let rec = InputRecord {
            kind,
            topic: self.topics.names[kind.index()].clone(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            content_type,
        };
        self.route(msg.partition(), Input::Record(rec));
    }

    fn route(&self, partition: i32, input: Input) {
        let ctx = self.consumer.context();
        let Ok(mut tasks) = ctx.tasks.lock() else {
            return;
        };
        let Tasks { running, stash, .. } = &mut *tasks;
        let Some(handle) = running.get(&partition) else {
            // Not ours (any more): it will be read again by its owner.
            self.stage.dropped("not_assigned", 1);
            return;
        };
        if let Some(s) = stash.get_mut(&partition) {
            s.push_back(input);
            return;
        }
        match handle.input.try_send(input) {
            Ok(()) => self.stage.sent.increment(1),
            Err(TrySendError::Full(input)) => {
                stash.entry(partition).or_default().push_back(input);
            }
            Err(TrySendError::Closed(_)) => {
                self.stage.dropped("task_gone", 1);
            }
        }
    }

    fn flush_stashes(&self) {
        let ctx = self.consumer.context();
        let Ok(mut tasks) = ctx.tasks.lock() else {
            return;
        };
        let Tasks { running, stash, .. } = &mut *tasks;
        stash.retain(|p, queue| {
            let Some(handle) = running.get(p) else {
                return false;
            };
            while let Some(input) = queue.pop_front() {
                match handle.input.try_send(input) {
                    Ok(()) => self.stage.sent.increment(1),
                    Err(TrySendError::Full(input)) => {
                        queue.push_front(input);
                        return true;
                    }
                    Err(TrySendError::Closed(_)) => return false,
                }
            }
            false
        });
    }

    /// Pauses a topic-partition while its task's queue is full (stash not
    /// empty) or the task asked for it; resumes it otherwise.
    fn apply_pauses(&self, paused: &mut HashSet<(usize, i32)>) {
        let ctx = self.consumer.context();
        let mut want: HashSet<(usize, i32)> = HashSet::new();
        if let Ok(tasks) = ctx.tasks.lock() {
            for (p, handle) in &tasks.running {
                // Hysteresis: a partition paused because its task's queue
                // was full stays paused until the queue is half empty, so
                // librdkafka does not drop and re-fetch its prefetched
                // records on every small pause.
                let was_paused = paused.iter().any(|(_, q)| q == p);
                let queue_busy = handle.input.capacity() < handle.input.max_capacity() / 2;
                let hold = tasks.stash.contains_key(p) || (was_paused && queue_busy);
                for kind in InputKind::ROOM {
                    if hold || handle.shared.pause[kind.index()].load(Ordering::Relaxed) {
                        want.insert((kind.index(), *p));
                    }
                }
            }
        }
        let to_pause: Vec<_> = want.difference(paused).copied().collect();
        let to_resume: Vec<_> = paused.difference(&want).copied().collect();
        if !to_pause.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (k, p) in &to_pause {
                tpl.add_partition(&self.topics.names[*k], *p);
            }
            if let Err(e) = self.consumer.pause(&tpl) {
                warn!(error = %e, "pause failed");
            }
        }
        if !to_resume.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (k, p) in &to_resume {
                tpl.add_partition(&self.topics.names[*k], *p);
            }
            if let Err(e) = self.consumer.resume(&tpl) {
                warn!(error = %e, "resume failed");
            }
        }
        *paused = want;
        gauge!(PARTITIONS_PAUSED).set(paused.len() as f64);
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
            .map(|mut t| {
                t.stash.clear();
                t.running.drain().map(|(_, h)| h).collect()
            })
            .unwrap_or_default();
        for handle in &handles {
            if let Some(cp) = drain(handle, ctx.drain_timeout) {
                commit(
                    &self.consumer,
                    &self.topics,
                    handle.partition,
                    &cp,
                    CommitMode::Sync,
                );
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
