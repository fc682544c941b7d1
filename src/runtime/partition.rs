//! One partition task: it owns every room whose records land on one
//! partition number of the co-partitioned input topics.
//!
//! What it does, in order, for each record:
//! 1. decode and check it (a bad record becomes a dead letter at once);
//! 2. buffer it per input stream, and take records out in event-time order
//!    across streams (Kafka Streams' rule: the smallest head first, waiting a
//!    bounded time for a stream that the broker says has more data);
//! 3. hand it to every operator, then close the ticks the watermark (newest
//!    event time minus the allowed lateness) has passed;
//! 4. send what the operators emitted and, once acknowledged, move the
//!    checkpoint: per stream, the lowest offset that state, unacknowledged
//!    outputs or buffered records still need, plus the end of the last tick
//!    whose outputs are all acknowledged (the emitted-through time).
//!
//! After a restart the source resumes every stream at its checkpoint and the
//! task re-emits nothing at or before the emitted-through time: outputs after
//! it are exact replays with the same ids.
//!
//! Not for: fetching records or committing offsets (the source does both,
//! from the [`Checkpoint`] published here).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, trace, warn};

use super::feed::{Polled, RecordRef, StreamReader};
use super::media::{MediaStage, Slot};
use super::operator::{each_operator, Context, Operator, Output, OutputTopic, Position};
use crate::config::{DeadLetterConfig, MediaConfig, RuntimeConfig};
use crate::decode::pool::DecodePool;
use crate::decode::MediaError;
use crate::metrics::{self as m, Stage};
use crate::schema::{decode_input, Event, InputKind, Limits};
use crate::sinks::dead_letters::{self, RateLimit, Rejected};
use crate::sinks::{Ack, AckMsg, Busy, Sink};
use crate::state::Holds;
pub use crate::state::{Checkpoint, ReplayMarks};

/// One raw input record, as a pushing source hands it over.
#[derive(Debug)]
pub struct InputRecord {
    /// Which stream.
    pub kind: InputKind,
    /// Source topic name (for dead letters).
    pub topic: Arc<str>,
    /// Offset in the stream's partition.
    pub offset: i64,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Kafka value.
    pub payload: Option<Vec<u8>>,
    /// The `content-type` header, if any.
    pub content_type: Option<String>,
}

/// Messages from the source to a partition task.
#[derive(Debug)]
pub enum Control {
    /// Stop taking records, wait (up to the deadline) for outputs in flight,
    /// reply with the final checkpoint and drop all state.
    Drain {
        /// Where the final checkpoint goes.
        reply: std::sync::mpsc::SyncSender<Checkpoint>,
    },
    /// A transaction commit (exactly-once): send nothing more, wait until
    /// every output sent is acknowledged, reply with the checkpoint that
    /// covers exactly them, then wait for `resume`: true goes on, false (the
    /// transaction was aborted, so its outputs are gone) ends the task
    /// without another output, for the partition to restart from its last
    /// committed checkpoint.
    Barrier {
        /// Where the checkpoint goes.
        reply: std::sync::mpsc::SyncSender<Checkpoint>,
        /// Whether the transaction committed.
        resume: tokio::sync::oneshot::Receiver<bool>,
    },
    /// No more input will come: process everything buffered and close every
    /// tick up to `until_ms` (the end of a finite input such as the simulator).
    Finish {
        /// Close ticks ending at or before this event time.
        until_ms: i64,
    },
}

/// What a pushing source sends a partition task, in the order it read it.
#[derive(Debug)]
pub enum Input {
    /// A record.
    Record(InputRecord),
    /// The source has handed over everything the broker held for this
    /// stream so far: the merge need not wait for it.
    CaughtUp(InputKind),
}

/// State the source and the task share.
#[derive(Debug, Default)]
pub struct PartitionShared {
    /// Per room stream: held back because its buffer is full (a pulling
    /// task stops reading it; a pushing source may pause it).
    pub pause: [AtomicBool; InputKind::COUNT],
    /// The latest checkpoint, for the source's periodic commit.
    pub checkpoint: Mutex<Option<Checkpoint>>,
    /// Set when the task has ended.
    pub finished: AtomicBool,
    /// Records waiting in the task's buffers.
    pub buffered: AtomicUsize,
}

/// The source's handle on a running partition task.
pub struct PartitionHandle {
    /// Partition number.
    pub partition: i32,
    /// Input records and end-of-backlog markers (pushing sources).
    pub input: mpsc::Sender<Input>,
    /// Control messages.
    pub control: mpsc::UnboundedSender<Control>,
    /// Shared state.
    pub shared: Arc<PartitionShared>,
    /// The task.
    pub join: tokio::task::JoinHandle<()>,
}

struct Buffered {
    event: Event,
    pos: Position,
    media: Slot,
}

struct Batch {
    id: u64,
    pending: usize,
    holds: Holds,
    tick_end_ms: Option<i64>,
    /// The inputs of its tick outputs, by the end of their tick.
    ticks: Vec<(i64, Holds)>,
}

/// A partition task (see the module docs).
pub struct PartitionTask {
    partition: i32,
    /// The streams this stage reads.
    kinds: &'static [InputKind],
    cfg: RuntimeConfig,
    /// The stage's changelog, read once at start.
    changelog: Option<Box<dyn ChangelogReader>>,
    /// How often operators are asked for changelog records (see
    /// [`Operator::snapshot`]; None: never).
    snapshot_every: Option<Duration>,
    /// Partitions of `room-embeddings` to write this partition's content
    /// progress to at each tick close (None: it writes none).
    progress: Option<i32>,
    /// The progress last written.
    progress_written: Option<i64>,
    /// Where the restored state was taken (see [`Operator::resumed_at`]):
    /// the first tick closed is at or before its first open one.
    resumed: Option<crate::state::Cut>,
    limits: Limits,
    ops: Vec<Box<dyn Operator>>,
    op_stages: Vec<Stage>,
    sink: Arc<dyn Sink>,
    input: mpsc::Receiver<Input>,
    /// The queues the task reads itself (pulling sources), and their wake-up.
    reader: Option<Box<dyn StreamReader>>,
    reader_ready: Option<Arc<Notify>>,
    /// Whether the task reads its streams itself (`reader` is only taken
    /// out while a pull runs).
    pulls: bool,
    control: mpsc::UnboundedReceiver<Control>,
    /// Control that came while the state was restored, handled first.
    stashed: VecDeque<Control>,
    shared: Arc<PartitionShared>,
    /// Per stream: everything the broker held has been received.
    caught_up: [bool; InputKind::COUNT],
    /// Whether the source reports caught-up streams (see [`PartitionSpec`]).
    wait_for_backlog: bool,
    /// Records taken per stream since the last pull (for the decode timing).
    pulled: usize,
    /// Decoding of video and audio payloads (when enabled).
    media: Option<MediaStage>,
    media_done: Option<Arc<Notify>>,
    /// Notified when an operator's off-task work is back (see `Operator::poll`).
    op_wake: Arc<Notify>,
    /// Each stream's topic name, learned from its records (for dead letters).
    stream_topics: [Option<Arc<str>>; InputKind::COUNT],
    /// Emitted-through time restored from the last commit: tick outputs at or
    /// before it were written before and are not written again.
    replayed_through: Option<i64>,
    /// Replay marks restored from the last commit (see [`ReplayMarks`]).
    marks: Option<ReplayMarks>,
    checkpoint_every: Duration,

    buffers: [VecDeque<Buffered>; InputKind::COUNT],
    received_next: [Option<i64>; InputKind::COUNT],
    /// Per stream, the offset after the last record processed.
    processed_next: [Option<i64>; InputKind::COUNT],
    stream_time: Option<i64>,
    next_tick: Option<i64>,
    wait_since: Option<Instant>,
    last_wait_warning: Instant,
    last_input: Instant,
    idle_anchor: Option<(Instant, i64)>,
    input_closed: bool,

    batches: VecDeque<Batch>,
    next_batch: u64,
    emitted_through: Option<i64>,
    /// Inputs of acknowledged tick outputs, by the end of their tick, kept
    /// until the checkpoint's emitted-through time passes it: a restart
    /// writes the outputs of later ticks again, so their inputs must be
    /// replayed whole (an operator's own hold ends when its output is
    /// acknowledged, another's output of the same tick may still be due).
    retained: std::collections::BTreeMap<i64, Holds>,
    /// The streams are shown held back because an operator is congested.
    held_for_ops: bool,
    in_flight: usize,
    ack_tx: mpsc::UnboundedSender<AckMsg>,
    ack_rx: mpsc::UnboundedReceiver<AckMsg>,
    outputs: Vec<Output>,
    late: u64,

    dlq_limit: RateLimit,
    decode_stage: Stage,
    sink_stage: Stage,
    dlq_stage: Stage,
    media_stage: Stage,
    runtime_stage: Stage,
    depth: Gauge,
    rooms_gauge: Gauge,
}

/// Everything needed to start a partition task.
pub struct PartitionSpec {
    /// Partition number.
    pub partition: i32,
    /// The streams this stage reads (`InputKind::ROOM` or `InputKind::USER`).
    pub kinds: &'static [InputKind],
    /// Event-time settings.
    pub runtime: RuntimeConfig,
    /// Input limits.
    pub limits: Limits,
    /// Dead-letter policy.
    pub dead_letters: DeadLetterConfig,
    /// The operators, fresh for this partition.
    pub operators: Vec<Box<dyn Operator>>,
    /// Where outputs go.
    pub sink: Arc<dyn Sink>,
    /// Per-stream queues the task reads itself (Kafka). Such a source
    /// reports caught-up streams, so the merge waits for streams with records
    /// still on the broker. Without one, records are pushed over the task's
    /// channel and, unless `wait_for_backlog` says otherwise, nothing waits
    /// (the simulator never runs one stream ahead).
    pub reader: Option<Box<dyn StreamReader>>,
    /// Whether a pushing source reports [`Input::CaughtUp`] markers.
    pub wait_for_backlog: bool,
    /// Emitted-through time from the last commit.
    pub replayed_through: Option<i64>,
    /// Replay marks from the last commit: records below them do not make
    /// their immediate outputs again.
    pub marks: Option<ReplayMarks>,
    /// Media decoding: its settings and the decode pool (None: off).
    pub media: Option<(Arc<MediaConfig>, Arc<DecodePool>)>,
    /// How often the checkpoint is recomputed.
    pub checkpoint_every: Duration,
    /// Where the stage's changelog is read back from before the first
    /// record (None: the stage keeps no changelog).
    pub changelog: Option<Box<dyn ChangelogReader>>,
    /// How often the operators write their changed state to the changelog
    /// (see [`Operator::snapshot`]; None: the stage does not ask them to).
    pub snapshot_every: Option<Duration>,
    /// The room stage's content progress: the number of partitions of
    /// `room-embeddings`, to each of which a tick close writes the time
    /// through which this partition's rooms' content is written (None: the
    /// stage writes no room content).
    pub progress: Option<i32>,
}

/// Reads one partition of a stage's changelog back (see
/// [`Operator::restore`]).
pub trait ChangelogReader: Send {
    /// Calls `f` with the key and value of every record of the changelog's
    /// `partition`, oldest first, up to its end when called (a tombstone
    /// with an empty value). Blocking.
    fn read(
        &mut self,
        partition: i32,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

const PROCESS_BUDGET: usize = 512;

/// How long the end of a finite input waits for operators' off-task work.
const FINISH_WAIT: Duration = Duration::from_secs(300);

impl PartitionTask {
    /// Spawns the task on the current tokio runtime.
    pub fn spawn(spec: PartitionSpec) -> PartitionHandle {
        let (input_tx, input) = mpsc::channel(spec.runtime.queue_capacity.max(1));
        let (control_tx, control) = mpsc::unbounded_channel();
        let shared = Arc::new(PartitionShared::default());
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let partition = spec.partition;
        let wait_for_backlog = spec.wait_for_backlog || spec.reader.is_some();
        let reader_ready = spec.reader.as_ref().map(|r| r.ready());
        let media = spec
            .media
            .map(|(cfg, pool)| MediaStage::new(cfg, pool, spec.partition));
        let media_done = media.as_ref().map(|m| m.done.clone());
        let op_stages = spec
            .operators
            .iter()
            .map(|o| Stage::new(o.name()))
            .collect();
        let task = PartitionTask {
            partition,
            limits: spec.limits,
            ops: spec.operators,
            op_stages,
            sink: spec.sink,
            input,
            pulls: spec.reader.is_some(),
            reader: spec.reader,
            reader_ready,
            control,
            stashed: VecDeque::new(),
            shared: shared.clone(),
            caught_up: std::array::from_fn(|i| {
                !wait_for_backlog || !spec.kinds.iter().any(|k| k.index() == i)
            }),
            kinds: spec.kinds,
            wait_for_backlog,
            pulled: 0,
            media,
            media_done,
            op_wake: Arc::new(Notify::new()),
            stream_topics: Default::default(),
            replayed_through: spec.replayed_through,
            marks: spec.marks,
            checkpoint_every: spec.checkpoint_every,
            buffers: Default::default(),
            received_next: [None; InputKind::COUNT],
            processed_next: [None; InputKind::COUNT],
            stream_time: None,
            next_tick: None,
            wait_since: None,
            last_wait_warning: Instant::now() - Duration::from_secs(60),
            last_input: Instant::now(),
            idle_anchor: None,
            input_closed: false,
            batches: VecDeque::new(),
            retained: Default::default(),
            next_batch: 0,
            emitted_through: spec.replayed_through,
            held_for_ops: false,
            in_flight: 0,
            ack_tx,
            ack_rx,
            outputs: Vec::new(),
            late: 0,
            dlq_limit: RateLimit::new(&spec.dead_letters),
            decode_stage: Stage::new(m::stage::DECODE),
            sink_stage: Stage::new(m::stage::SINK),
            dlq_stage: Stage::new(m::stage::DEAD_LETTERS),
            media_stage: Stage::new(m::stage::MEDIA),
            runtime_stage: Stage::new(m::stage::RUNTIME),
            depth: m::queue_depth(partition),
            rooms_gauge: m::rooms_active(partition),
            cfg: spec.runtime,
            changelog: spec.changelog,
            snapshot_every: spec.snapshot_every,
            progress: spec.progress,
            progress_written: None,
            resumed: None,
        };
        let join = tokio::spawn(task.run());
        PartitionHandle {
            partition,
            input: input_tx,
            control: control_tx,
            shared,
            join,
        }
    }

    async fn run(mut self) {
        info!(partition = self.partition, replayed_through = ?self.replayed_through, "partition task started");
        {
            let mut ctx = Context::new(&mut self.outputs, self.partition, self.cfg.tick_ms)
                .with_wake(&self.op_wake)
                .with_replayed_through(self.replayed_through);
            for op in &mut self.ops {
                op.on_start(&mut ctx);
            }
        }
        self.flush_outputs(None).await;
        if !self.restore().await {
            return;
        }
        let mut next_checkpoint = Instant::now();
        let mut next_snapshot = self.snapshot_every.map(|every| Instant::now() + every);
        loop {
            while let Ok(ack) = self.ack_rx.try_recv() {
                self.on_ack(ack);
            }
            let control = match self.stashed.pop_front() {
                Some(c) => Ok(c),
                None => self.control.try_recv(),
            };
            if let Ok(c) = control {
                if !self.on_control(c).await {
                    break;
                }
            }
            self.poll_ops().await;
            self.mark_congestion();
            let pulled = self.pull();
            let processed = self.process_ready().await;
            self.advance_idle().await;
            let now = Instant::now();
            if now >= next_checkpoint {
                self.publish_checkpoint();
                next_checkpoint = now + self.checkpoint_every;
            }
            if let (Some(at), Some(every)) = (next_snapshot, self.snapshot_every) {
                if now >= at {
                    self.snapshot().await;
                    next_snapshot = Some(Instant::now() + every);
                }
            }
            if pulled + processed > 0 {
                tokio::task::yield_now().await;
                continue;
            }
            // Nothing to do now: sleep until something arrives or a timer fires.
            let deadline = self.next_deadline(next_checkpoint);
            let can_pull = self.may_pull() && !self.input_closed;
            let pushed = !self.pulls;
            let ready = self.reader_ready.clone();
            let media_done = self.media_done.clone();
            let op_wake = self.op_wake.clone();
            tokio::select! {
                ack = self.ack_rx.recv() => {
                    if let Some(ack) = ack {
                        self.on_ack(ack);
                    }
                }
                () = op_wake.notified() => {}
                rec = self.input.recv(), if can_pull && pushed => match rec {
                    Some(input) => self.accept(input),
                    None => self.input_closed = true,
                },
                () = notified(ready.as_deref()), if can_pull && !pushed => {}
                () = notified(media_done.as_deref()) => {}
                ctl = self.control.recv() => match ctl {
                    Some(c) => {
                        if !self.on_control(c).await {
                            break;
                        }
                    }
                    // The source is gone without a drain: stop.
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        for op in &mut self.ops {
            op.on_revoke();
        }
        if let Some(m) = self.media.as_mut() {
            m.clear();
        }
        if !self.user_stage() {
            self.rooms_gauge.set(0.0);
        }
        self.depth.set(0.0);
        self.shared.finished.store(true, Ordering::Release);
        info!(partition = self.partition, "partition task stopped");
    }

    /// Lets operators emit what their off-task work produced.
    async fn poll_ops(&mut self) {
        {
            let mut ctx = Context::new(&mut self.outputs, self.partition, self.cfg.tick_ms)
                .with_wake(&self.op_wake);
            let stages = &self.op_stages;
            each_operator(&mut self.ops, &mut ctx, |op, ctx, i| {
                let before = ctx.outputs.len();
                op.poll(ctx);
                stages[i]
                    .sent
                    .increment((ctx.outputs.len() - before) as u64);
            });
        }
        if !self.outputs.is_empty() {
            self.flush_outputs(None).await;
        }
    }

    /// Whether an operator holds work a full model queue refused: no record
    /// is taken or processed until it is handed off.
    fn congested(&self) -> bool {
        self.ops.iter().any(|o| o.congested())
    }

    /// Shows a congested task's streams as held back (the paused gauge),
    /// and their buffers' own state once it is not.
    fn mark_congestion(&mut self) {
        let congested = self.congested();
        if congested == self.held_for_ops {
            return;
        }
        self.held_for_ops = congested;
        for &kind in self.kinds {
            let k = kind.index();
            let full = self.buffers[k].len() >= self.cfg.queue_capacity / 2;
            self.shared.pause[k].store(congested || full, Ordering::Relaxed);
        }
    }

    fn buffered(&self) -> usize {
        self.buffers.iter().map(VecDeque::len).sum()
    }

    /// Whether to take more records from the source. While the merge waits
    /// for a stream, records keep being taken (streams over their buffer
    /// capacity are paused at the source instead), or the awaited records
    /// could never get past the others in the queue.
    fn may_pull(&self) -> bool {
        self.in_flight < self.cfg.max_in_flight
            // An operator holding work a full model queue refused.
            && !self.ops.iter().any(|o| o.congested())
            // A pushing source mixes streams: hold all of them while the
            // media stage is full (a pulling one holds only video and audio).
            && (self.pulls || self.media.as_ref().is_none_or(MediaStage::has_room))
            && (self.wait_since.is_some()
                || self.buffered() < self.cfg.queue_capacity * self.kinds.len())
    }

    /// Takes what the source has queued, without waiting.
    fn pull(&mut self) -> usize {
        let started = Instant::now();
        self.pulled = 0;
        if let Some(mut reader) = self.reader.take() {
            for &kind in self.kinds {
                if !self.may_pull() {
                    break;
                }
                if self.buffers[kind.index()].len() >= self.cfg.queue_capacity {
                    // Held back: its queue at the source fills and fetching stops.
                    continue;
                }
                let budget = self
                    .media
                    .as_ref()
                    .map_or(PROCESS_BUDGET, |m| m.room(kind).min(PROCESS_BUDGET));
                if budget == 0 {
                    continue;
                }
                reader.read(kind, budget, &mut |polled| match polled {
                    Polled::Record(rec) => self.accept_record(rec),
                    Polled::CaughtUp(kind) => self.caught_up[kind.index()] = true,
                });
            }
            self.reader = Some(reader);
        } else {
            while self.pulled < PROCESS_BUDGET && self.may_pull() {
                match self.input.try_recv() {
                    Ok(input) => self.accept(input),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.input_closed = true;
                        break;
                    }
                }
            }
        }
        let n = self.pulled;
        if n > 0 {
            self.last_input = Instant::now();
            // Mean decode time per record of the batch.
            self.decode_stage
                .latency
                .record(started.elapsed().as_secs_f64() / n as f64);
        }
        n
    }

    fn accept(&mut self, input: Input) {
        self.last_input = Instant::now();
        match input {
            Input::Record(rec) => self.accept_record(RecordRef {
                kind: rec.kind,
                topic: &rec.topic,
                offset: rec.offset,
                key: rec.key.as_deref(),
                payload: rec.payload.as_deref(),
                content_type: rec.content_type.as_deref(),
            }),
            Input::CaughtUp(kind) => {
                if let Some(c) = self.caught_up.get_mut(kind.index()) {
                    *c = true;
                }
            }
        }
    }

    /// Decodes one record into its stream's buffer, or dead-letters it.
    fn accept_record(&mut self, rec: RecordRef<'_>) {
        self.pulled += 1;
        self.idle_anchor = None;
        self.decode_stage.received.increment(1);
        let Some(slot) = self.received_next.get_mut(rec.kind.index()) else {
            warn!(
                partition = self.partition,
                kind = rec.kind.name(),
                "stream kind not handled by room tasks"
            );
            self.decode_stage.dropped(m::dropped::UNROUTABLE, 1);
            return;
        };
        *slot = Some(slot.map_or(rec.offset + 1, |n| n.max(rec.offset + 1)));
        if let Some(t) = self.stream_topics.get_mut(rec.kind.index()) {
            if t.is_none() {
                *t = Some(Arc::from(rec.topic));
            }
        }
        if self.wait_for_backlog {
            // Until the source says otherwise, more of this stream may be on the broker.
            self.caught_up[rec.kind.index()] = false;
        }
        let pos = Position {
            kind: rec.kind,
            offset: rec.offset,
        };
        match decode_input(
            rec.kind,
            rec.key,
            rec.payload,
            rec.content_type,
            &self.limits,
        ) {
            Ok(mut event) => {
                self.decode_stage.sent.increment(1);
                let media = match self.media.as_mut() {
                    Some(m) => m.submit(&mut event),
                    None => Slot::None,
                };
                if matches!(media, Slot::Pending(_)) {
                    self.media_stage.received.increment(1);
                }
                let buf = &mut self.buffers[rec.kind.index()];
                buf.push_back(Buffered { event, pos, media });
                if buf.len() >= self.cfg.queue_capacity {
                    self.shared.pause[rec.kind.index()].store(true, Ordering::Relaxed);
                }
            }
            Err(err) => {
                self.decode_stage.error(err.reason());
                trace!(partition = self.partition, offset = rec.offset, kind = rec.kind.name(), error = %err, "rejected record");
                if self.marks.is_some_and(|m| m.accepted_before(pos)) {
                    // Replayed: its dead letter was written before the restart.
                    self.sink_stage.dropped(m::dropped::ALREADY_WRITTEN, 1);
                    return;
                }
                self.dead_letter(&Rejected {
                    reason: err.reason(),
                    detail: err.to_string(),
                    kind: rec.kind,
                    topic: rec.topic,
                    partition: self.partition,
                    offset: rec.offset,
                    key: rec.key,
                    payload: rec.payload,
                    content_type: rec.content_type,
                });
            }
        }
    }

    /// Queues a dead letter (sent by the next flush; the output's dependency
    /// on the record's position keeps it uncommitted until then), within the
    /// partition's rate limit.
    fn dead_letter(&mut self, r: &Rejected<'_>) {
        if self.dlq_limit.allow(Instant::now()) {
            let out = dead_letters::dead_letter(r);
            dead_letters::count(r.reason, r.topic);
            self.dlq_stage.received.increment(1);
            self.outputs.push(out);
            self.dlq_stage.sent.increment(1);
        } else {
            self.dlq_stage.dropped(m::dropped::RATE_LIMITED, 1);
            error!(
                partition = self.partition,
                topic = %r.topic,
                offset = r.offset,
                reason = r.reason,
                "dead-letter rate limit exceeded: record dropped"
            );
        }
    }

    /// A media record whose payload did not decode: dead-lettered with the
    /// record re-encoded as it came (its payload put back).
    fn dead_letter_media(&mut self, mut b: Buffered, err: MediaError, payload: Option<Vec<u8>>) {
        use prost::Message as _;
        self.media_stage.error(err.reason());
        debug!(partition = self.partition, offset = b.pos.offset, kind = b.pos.kind.name(), error = %err, "media payload rejected");
        let bytes = match &mut b.event {
            Event::Video(v) => {
                if let Some(p) = payload {
                    v.payload = p;
                }
                v.encode_to_vec()
            }
            Event::Audio(a) => a.encode_to_vec(),
            _ => Vec::new(),
        };
        let topic = self.stream_topics[b.pos.kind.index()]
            .clone()
            .unwrap_or_else(|| Arc::from(b.pos.kind.name()));
        let room = b.event.room_id().as_bytes().to_vec();
        self.dead_letter(&Rejected {
            reason: err.reason(),
            detail: err.to_string(),
            kind: b.pos.kind,
            topic: &topic,
            partition: self.partition,
            offset: b.pos.offset,
            key: Some(&room),
            payload: Some(&bytes),
            content_type: None,
        });
    }
}

impl PartitionTask {
    /// A user-stage task (its inputs are the user-keyed streams).
    fn user_stage(&self) -> bool {
        self.kinds == InputKind::USER.as_slice()
    }

    fn tick_of(&self, t: i64) -> i64 {
        t.div_euclid(self.cfg.tick_ms) * self.cfg.tick_ms
    }

    /// The stream whose head record goes next, or None to wait.
    fn next_ready(&mut self, now: Instant) -> Option<usize> {
        let mut best: Option<(i64, usize)> = None;
        for (k, buf) in self.buffers.iter().enumerate() {
            if let Some(b) = buf.front() {
                let t = b.event.event_time_ms();
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, k));
                }
            }
        }
        let (_, k) = best?;
        // The earliest record goes next, once its media is decoded.
        if let Some(head) = self.buffers[k].front_mut() {
            if !head.media.poll() {
                return None;
            }
        }
        let waiting =
            (0..InputKind::COUNT).any(|i| self.buffers[i].is_empty() && !self.caught_up[i]);
        if waiting {
            let since = *self.wait_since.get_or_insert(now);
            if now.saturating_duration_since(since) < Duration::from_millis(self.cfg.max_wait_ms) {
                return None;
            }
            if now.saturating_duration_since(self.last_wait_warning) > Duration::from_secs(10) {
                self.last_wait_warning = now;
                let waiting_for: Vec<&str> = self
                    .kinds
                    .iter()
                    .filter(|k| self.buffers[k.index()].is_empty() && !self.caught_up[k.index()])
                    .map(|k| k.name())
                    .collect();
                warn!(partition = self.partition, ?waiting_for, "gave up waiting for streams with records still on the broker; their records may arrive late");
            }
        } else {
            self.wait_since = None;
        }
        Some(k)
    }

    /// Processes buffered records in event-time order, as far as allowed.
    async fn process_ready(&mut self) -> usize {
        if !self.outputs.is_empty() {
            self.flush_outputs(None).await;
        }
        let mut n = 0;
        let started = Instant::now();
        while n < PROCESS_BUDGET && self.in_flight < self.cfg.max_in_flight && !self.congested() {
            let Some(k) = self.next_ready(started) else {
                break;
            };
            let Some(b) = self.buffers[k].pop_front() else {
                break;
            };
            if self.buffers[k].len() < self.cfg.queue_capacity / 2 {
                self.shared.pause[k].store(false, Ordering::Relaxed);
            }
            self.process(b).await;
            n += 1;
        }
        if n > 0 {
            // Counted and timed per batch: the mean per-record time of the batch.
            let per_record = started.elapsed().as_secs_f64() / n as f64;
            self.runtime_stage.received.increment(n as u64);
            self.runtime_stage.sent.increment(n as u64);
            self.runtime_stage.latency.record(per_record);
            for stage in &self.op_stages {
                stage.received.increment(n as u64);
            }
        }
        let buffered = self.buffered();
        self.depth.set(buffered as f64);
        self.shared.buffered.store(buffered, Ordering::Relaxed);
        n
    }

    /// Reads the stage's changelog back into the operators, before any
    /// record (off the async threads: it blocks). False: the operators were
    /// lost (a panic while restoring) and the task cannot go on.
    async fn restore(&mut self) -> bool {
        let Some(mut reader) = self.changelog.take() else {
            return true;
        };
        let mut ops = std::mem::take(&mut self.ops);
        let (partition, through) = (self.partition, self.replayed_through);
        let started = Instant::now();
        let mut restoring = tokio::task::spawn_blocking(move || {
            let (mut records, mut bytes) = (0u64, 0u64);
            // The last record per key, in the order of those last records
            // (a topic not compacted yet holds older ones; a tombstone
            // deletes the key).
            let mut order: std::collections::BTreeMap<u64, (Vec<u8>, Vec<u8>)> = Default::default();
            let mut latest: std::collections::HashMap<Vec<u8>, u64> = Default::default();
            let result = reader.read(partition, &mut |key, value| {
                if let Some(seq) = latest.remove(key) {
                    order.remove(&seq);
                }
                if !value.is_empty() {
                    latest.insert(key.to_vec(), records);
                    order.insert(records, (key.to_vec(), value.to_vec()));
                }
                records += 1;
                bytes += (key.len() + value.len()) as u64;
            });
            drop(latest);
            for (key, value) in order.into_values() {
                let Some((name, key)) = super::split_changelog_key(&key) else {
                    continue;
                };
                for op in ops.iter_mut() {
                    if op.name().as_bytes() == name {
                        op.restore(key, &value, through);
                    }
                }
            }
            (ops, reader, result, records, bytes)
        });
        // Commit rounds go on meanwhile: the task has sent nothing yet, so
        // its checkpoint commits nothing (other control waits for the end).
        let mut aborted = false;
        let joined = loop {
            tokio::select! {
                joined = &mut restoring => break joined,
                ctl = self.control.recv(), if !aborted => match ctl {
                    Some(Control::Barrier { reply, resume }) => {
                        let _ = reply.try_send(Checkpoint::default());
                        aborted = !matches!(resume.await, Ok(true));
                    }
                    Some(other) => self.stashed.push_back(other),
                    None => aborted = true,
                },
            }
        };
        if aborted {
            return false;
        }
        let (ops, reader, result, records, bytes) = match joined {
            Ok(r) => r,
            Err(e) => {
                error!(partition, error = %e, "restoring the partition's state failed; the partition stops");
                return false;
            }
        };
        self.ops = ops;
        self.changelog = Some(reader);
        for cut in self.ops.iter().filter_map(|o| o.resumed_at()) {
            let r = self.resumed.get_or_insert(cut);
            // The earliest open tick of the operators' cuts; a cut that
            // knows of none leaves the start to the first record.
            r.next_tick_ms = match (r.next_tick_ms, cut.next_tick_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (None, b) => b,
                (Some(_), None) => None,
            };
            r.stream_time_ms = r.stream_time_ms.max(cut.stream_time_ms);
        }
        let secs = started.elapsed().as_secs_f64();
        let stage = if self.user_stage() { "users" } else { "rooms" };
        m::state_restored(stage, partition, secs, records, bytes);
        match result {
            Ok(()) => info!(
                partition,
                records,
                bytes,
                seconds = secs,
                "state restored from the changelog"
            ),
            Err(e) => {
                self.runtime_stage.error("changelog");
                error!(partition, records, error = %e, "reading the changelog failed: the partition starts from what was read");
            }
        }
        true
    }

    async fn process(&mut self, mut b: Buffered) {
        if !matches!(b.media, Slot::None) {
            if let Some(stage) = self.media.as_mut() {
                stage.release(b.pos.kind);
            }
        }
        let pos = b.pos;
        let replayed = self.marks.is_some_and(|m| m.processed_before(pos));
        self.mark_processed(pos);
        let media = match std::mem::replace(&mut b.media, Slot::None) {
            Slot::Done(Err((err, payload))) => {
                if replayed {
                    self.sink_stage.dropped(m::dropped::ALREADY_WRITTEN, 1);
                } else {
                    self.dead_letter_media(b, err, payload);
                }
                self.flush_outputs(None).await;
                return;
            }
            Slot::Done(Ok(mut m)) => {
                if let Some(stage) = self.media.as_mut() {
                    stage.sample_timeline(b.event.room_id(), &mut m);
                }
                self.media_stage.sent.increment(1);
                Some(m)
            }
            Slot::None | Slot::Pending(_) => None,
        };
        let t = b.event.event_time_ms();
        let tick = self.tick_of(t);
        // The first tick left open is the one the watermark would allow for
        // this record: other streams' records up to the allowed lateness
        // before it are still on time.
        let first_open = self.tick_of(t - self.cfg.allowed_lateness_ms);
        let resume = self.resumed.and_then(|c| c.next_tick_ms);
        let next_tick = *self
            .next_tick
            .get_or_insert(resume.map_or(first_open, |r| r.min(first_open)));
        let late = tick < next_tick;
        if late {
            self.late += 1;
            self.runtime_stage.dropped(m::dropped::LATE, 1);
            debug!(
                partition = self.partition,
                kind = b.pos.kind.name(),
                offset = b.pos.offset,
                event_time_ms = t,
                closed_before_ms = next_tick,
                "late record: its tick has closed"
            );
        }
        let before = self.outputs.len();
        {
            let mut ctx = Context::new(&mut self.outputs, self.partition, self.cfg.tick_ms)
                .with_wake(&self.op_wake);
            each_operator(&mut self.ops, &mut ctx, |op, ctx, _| {
                op.on_record(&b.event, b.pos, late, ctx);
                if let Some(m) = &media {
                    op.on_media(&b.event, m, b.pos, late, ctx);
                }
            });
        }
        if replayed {
            // What the record made at once was written before the restart
            // (tick outputs are judged by their tick when flushed).
            let mut i = before;
            while i < self.outputs.len() {
                let o = &self.outputs[i];
                if o.tick_end_ms.is_none() && !o.topic.is_changelog() {
                    self.outputs.remove(i);
                    self.sink_stage.dropped(m::dropped::ALREADY_WRITTEN, 1);
                } else {
                    i += 1;
                }
            }
        }
        if !self.outputs.is_empty() {
            self.flush_outputs(None).await;
        }
        if self.stream_time.is_none_or(|st| t > st) {
            self.stream_time = Some(t);
        }
        if let Some(st) = self.stream_time {
            self.close_ticks(st - self.cfg.allowed_lateness_ms).await;
        }
    }

    /// Closes every tick that ends at or before `watermark`.
    async fn close_ticks(&mut self, watermark: i64) {
        let Some(mut nt) = self.next_tick else {
            return;
        };
        let tick_ms = self.cfg.tick_ms;
        if nt + tick_ms > watermark {
            return;
        }
        while nt + tick_ms <= watermark {
            if self.ops.iter().all(|o| o.rooms() == 0) {
                // Nothing holds state: skip the empty ticks of an event-time gap.
                nt = nt.max(watermark.div_euclid(tick_ms) * tick_ms - tick_ms);
            }
            let mut ctx =
                Context::new(&mut self.outputs, self.partition, tick_ms).with_wake(&self.op_wake);
            let stages = &self.op_stages;
            each_operator(&mut self.ops, &mut ctx, |op, ctx, i| {
                let s = Instant::now();
                let before = ctx.outputs.len();
                op.on_tick(nt, ctx);
                stages[i]
                    .sent
                    .increment((ctx.outputs.len() - before) as u64);
                stages[i].latency.record(s.elapsed().as_secs_f64());
            });
            nt += tick_ms;
        }
        self.next_tick = Some(nt);
        if !self.user_stage() {
            // A user stage's operators hold users, not rooms.
            let rooms: usize = self.ops.iter().map(|o| o.rooms()).max().unwrap_or(0);
            self.rooms_gauge.set(rooms as f64);
        }
        if let Some(st) = self.stream_time {
            metrics::histogram!(m::WATERMARK_DELAY).record((st - nt).max(0) as f64 / 1000.0);
        }
        self.write_progress(nt);
        self.flush_outputs(Some(nt)).await;
    }

    /// Writes the partition's content progress after closing the ticks
    /// through `closed`: every output of a tick at or before it has been
    /// made (the operators finished it), so, sent after them on the same
    /// producer, the record follows them on every `room-embeddings`
    /// partition. Written when it moved.
    fn write_progress(&mut self, closed: i64) {
        let Some(n) = self.progress else {
            return;
        };
        let unfinished = self.unfinished_tick();
        let through = unfinished.map_or(closed, |u| u.min(closed));
        if self.progress_written.is_some_and(|w| w >= through) {
            return;
        }
        self.progress_written = Some(through);
        let rec = crate::schema::RoomEmbedding {
            schema_version: crate::schema::SCHEMA_VERSION,
            source_partition: self.partition,
            content_through_ms: through,
            event_time_ms: through,
            ..Default::default()
        };
        let mut key = b"\0progress/".to_vec();
        key.extend_from_slice(self.partition.to_string().as_bytes());
        for q in 0..n {
            let id = crate::schema::deterministic_id(&[
                b"room-progress",
                &self.partition.to_le_bytes(),
                &q.to_le_bytes(),
                &through.to_le_bytes(),
            ]);
            let mut rec = rec.clone();
            rec.id = id.clone();
            self.outputs.push(Output {
                topic: OutputTopic::RoomProgress { partition: q },
                id,
                key: key.clone(),
                payload: prost::Message::encode_to_vec(&rec),
                headers: Vec::new(),
                model_version: None,
                tick_end_ms: None,
                depends_on: Holds::default(),
            });
        }
    }

    /// The earliest tick an operator has not finished (see
    /// [`Operator::unfinished_tick`]).
    fn unfinished_tick(&self) -> Option<i64> {
        self.ops.iter().filter_map(|o| o.unfinished_tick()).min()
    }

    /// Sends the collected outputs as one batch. `tick_end` marks a batch that
    /// closes ticks up to that time (possibly with no outputs at all).
    async fn flush_outputs(&mut self, tick_end: Option<i64>) {
        let outputs = std::mem::take(&mut self.outputs);
        let id = self.next_batch;
        self.next_batch += 1;
        let mut holds = Holds::default();
        let mut ticks: Vec<(i64, Holds)> = Vec::new();
        let mut count = 0;
        for out in outputs {
            if let (Some(t), Some(r)) = (out.tick_end_ms, self.replayed_through) {
                // A changelog record holds inputs that may be in no record
                // yet: dropping it would commit past them.
                if t <= r && !out.topic.is_changelog() {
                    self.sink_stage.dropped(m::dropped::ALREADY_WRITTEN, 1);
                    continue;
                }
            }
            holds.merge(&out.depends_on);
            if let Some(t) = out
                .tick_end_ms
                .filter(|_| out.depends_on != Holds::default())
            {
                match ticks.iter_mut().find(|(e, _)| *e == t) {
                    Some((_, h)) => h.merge(&out.depends_on),
                    None => ticks.push((t, out.depends_on)),
                }
            }
            count += 1;
            self.sink_stage.received.increment(1);
            let mut item = (out, Ack::new(self.ack_tx.clone(), id));
            loop {
                match self.sink.send(item.0, item.1) {
                    Ok(()) => break,
                    Err(busy) => {
                        let Busy(o, a) = *busy;
                        item = (o, a);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        self.in_flight += count;
        self.batches.push_back(Batch {
            id,
            pending: count,
            holds,
            tick_end_ms: tick_end,
            ticks,
        });
        self.complete_prefix();
    }

    fn on_ack(&mut self, ack: AckMsg) {
        if let Err(e) = &ack.result {
            // librdkafka has retried what can be retried: the output is lost.
            self.sink_stage.error("delivery");
            error!(partition = self.partition, error = %crate::error::chain(e), "output lost: delivery failed");
        } else {
            self.sink_stage.sent.increment(1);
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(front) = self.batches.front().map(|b| b.id) else {
            return;
        };
        let Some(idx) = ack.batch.checked_sub(front) else {
            return;
        };
        if let Some(b) = self.batches.get_mut(idx as usize) {
            b.pending = b.pending.saturating_sub(1);
        }
        self.complete_prefix();
    }

    fn complete_prefix(&mut self) {
        while self.batches.front().is_some_and(|b| b.pending == 0) {
            if let Some(b) = self.batches.pop_front() {
                if let Some(t) = b.tick_end_ms {
                    self.emitted_through = Some(self.emitted_through.map_or(t, |e| e.max(t)));
                }
                for (t, h) in b.ticks {
                    self.retained.entry(t).or_default().merge(&h);
                }
            }
        }
    }

    /// The end of the last tick whose outputs are all written, as the
    /// checkpoint has it: no later than a tick an operator has not finished,
    /// and no earlier than what the partition's previous owner had written
    /// (a restored operator may redo ticks before that: their outputs are
    /// not written again, and their inputs need not all be replayed, so the
    /// next owner must not write them either).
    fn emitted_through_ms(&self) -> Option<i64> {
        let unfinished = self.unfinished_tick();
        let e = match (self.emitted_through, unfinished) {
            (Some(e), Some(u)) => Some(e.min(u)),
            (e, _) => e,
        };
        match (e, self.replayed_through) {
            (Some(e), Some(r)) => Some(e.max(r)),
            (e, r) => e.or(r),
        }
    }

    /// Advances event time with the wall clock when no input has come for a
    /// while, so that idle rooms still tick. Not while the input is held
    /// back (an operator congested) or a stream still has records on the
    /// broker: those records would all come late.
    async fn advance_idle(&mut self) {
        let now = Instant::now();
        let behind = self.pulls && self.kinds.iter().any(|k| !self.caught_up[k.index()]);
        if self.buffered() > 0
            || behind
            || self.congested()
            || now.saturating_duration_since(self.last_input)
                < Duration::from_millis(self.cfg.idle_timeout_ms)
        {
            self.idle_anchor = None;
            return;
        }
        if self.stream_time.is_none() {
            // Restored, and nothing to replay: the restored state's open
            // ticks close as the clock moves on from where it was taken.
            if let Some(cut) = self.resumed {
                self.stream_time = cut.stream_time_ms;
                self.next_tick = self.next_tick.or(cut.next_tick_ms);
            }
        }
        let Some(st) = self.stream_time else {
            return;
        };
        let (since, base) = *self.idle_anchor.get_or_insert((now, st));
        let advanced = base + now.saturating_duration_since(since).as_millis() as i64;
        if advanced > st {
            self.stream_time = Some(advanced);
            self.close_ticks(advanced - self.cfg.allowed_lateness_ms)
                .await;
        }
    }

    fn next_deadline(&self, next_checkpoint: Instant) -> Instant {
        let now = Instant::now();
        let mut d = next_checkpoint;
        if let Some(since) = self.wait_since {
            d = d.min(since + Duration::from_millis(self.cfg.max_wait_ms));
        }
        if self.stream_time.is_some() {
            let idle_at = self.last_input + Duration::from_millis(self.cfg.idle_timeout_ms);
            d = d.min(if idle_at > now {
                idle_at
            } else {
                now + Duration::from_millis((self.cfg.tick_ms as u64 / 4).max(10))
            });
        }
        d.max(now + Duration::from_millis(1))
    }

    fn checkpoint(&self) -> Checkpoint {
        let mut holds = Holds::default();
        for op in &self.ops {
            op.holds(&mut holds);
        }
        for b in &self.batches {
            holds.merge(&b.holds);
        }
        let emitted_through_ms = self.emitted_through_ms();
        for (&t, h) in &self.retained {
            if emitted_through_ms.is_none_or(|e| t > e) {
                holds.merge(h);
            }
        }
        for out in &self.outputs {
            holds.merge(&out.depends_on);
        }
        for buf in &self.buffers {
            if let Some(b) = buf.front() {
                holds.hold(b.pos);
            }
        }
        let mut next_offsets = [None; InputKind::COUNT];
        for &kind in self.kinds {
            let k = kind.index();
            next_offsets[k] =
                self.received_next[k].map(|n| holds.get(kind).map_or(n, |h| h.min(n)));
        }
        // With nothing in flight, every output that accepted and processed
        // records made at once is acknowledged: the marks say how far.
        let marks = (self.in_flight == 0 && self.outputs.is_empty()).then(|| {
            let mut marks = ReplayMarks {
                accepted: self.received_next,
                processed: self.processed_next,
            };
            if let Some(old) = &self.marks {
                // What the last run wrote stays written.
                for (now, was) in marks.accepted.iter_mut().zip(old.accepted) {
                    *now = (*now).max(was);
                }
                for (now, was) in marks.processed.iter_mut().zip(old.processed) {
                    *now = (*now).max(was);
                }
            }
            marks
        });
        Checkpoint {
            next_offsets,
            emitted_through_ms,
            marks,
        }
    }

    fn mark_processed(&mut self, pos: Position) {
        if let Some(slot) = self.processed_next.get_mut(pos.kind.index()) {
            *slot = Some(slot.map_or(pos.offset + 1, |n| n.max(pos.offset + 1)));
        }
    }

    fn publish_checkpoint(&mut self) {
        // What the checkpoint counts as emitted through is not written
        // again: its inputs need no longer be kept (once per checkpoint,
        // not per acknowledgement).
        if let Some(e) = self.emitted_through_ms() {
            self.retained = self.retained.split_off(&(e + 1));
        }
        let cp = self.checkpoint();
        if let Ok(mut slot) = self.shared.checkpoint.lock() {
            *slot = Some(cp);
        }
    }

    /// End of a finite input: everything buffered is processed and every tick
    /// up to `until_ms` closes.
    async fn finish(&mut self, until_ms: i64) {
        self.caught_up = [true; InputKind::COUNT];
        self.wait_for_backlog = false;
        loop {
            while let Ok(ack) = self.ack_rx.try_recv() {
                self.on_ack(ack);
            }
            self.poll_ops().await;
            let pulled = self.pull();
            let processed = self.process_ready().await;
            if pulled + processed == 0 {
                if self.buffered() == 0 && (self.pulls || self.input.is_empty()) {
                    break;
                }
                // Blocked on outputs in flight, on media being decoded or
                // on a full model queue: wait for any.
                let media_done = self.media_done.clone();
                let op_wake = self.op_wake.clone();
                tokio::select! {
                    ack = self.ack_rx.recv() => {
                        if let Some(ack) = ack {
                            self.on_ack(ack);
                        }
                    }
                    () = notified(media_done.as_deref()) => {}
                    () = op_wake.notified() => {}
                }
            }
        }
        if self.stream_time.is_none_or(|st| until_ms > st) {
            self.stream_time = Some(until_ms);
        }
        self.close_ticks(until_ms).await;
        {
            let mut ctx = Context::new(&mut self.outputs, self.partition, self.cfg.tick_ms)
                .with_wake(&self.op_wake);
            each_operator(&mut self.ops, &mut ctx, |op, ctx, _| op.on_finish(ctx));
        }
        self.flush_outputs(None).await;
        // Off-task work (bounded by its budgets) comes back before the end.
        let deadline = Instant::now() + FINISH_WAIT;
        loop {
            self.poll_ops().await;
            let pending: usize = self.ops.iter().map(|o| o.pending()).sum();
            if pending == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    partition = self.partition,
                    pending, "finish: off-task work still pending; its results are dropped"
                );
                break;
            }
            let op_wake = self.op_wake.clone();
            tokio::select! {
                ack = self.ack_rx.recv() => {
                    if let Some(ack) = ack {
                        self.on_ack(ack);
                    }
                }
                () = op_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        self.publish_checkpoint();
    }

    /// Handles one control message. False: the task ends.
    async fn on_control(&mut self, control: Control) -> bool {
        match control {
            Control::Drain { reply } => {
                self.drain(reply).await;
                false
            }
            Control::Barrier { reply, resume } => self.barrier(reply, resume).await,
            Control::Finish { until_ms } => {
                self.finish(until_ms).await;
                true
            }
        }
    }

    /// A transaction commit (see [`Control::Barrier`]). False: the
    /// transaction was aborted and the task must end.
    async fn barrier(
        &mut self,
        reply: std::sync::mpsc::SyncSender<Checkpoint>,
        resume: tokio::sync::oneshot::Receiver<bool>,
    ) -> bool {
        if !self.outputs.is_empty() {
            self.flush_outputs(None).await;
        }
        if !self.wait_for_acks().await {
            warn!(
                partition = self.partition,
                in_flight = self.in_flight,
                "commit barrier: outputs still unacknowledged; the checkpoint does not cover them"
            );
        }
        if reply.try_send(self.checkpoint()).is_err() {
            return true;
        }
        match resume.await {
            Ok(true) => true,
            _ => {
                warn!(
                    partition = self.partition,
                    "transaction aborted: the partition restarts from its last commit"
                );
                false
            }
        }
    }

    /// Revocation or shutdown: wait for outputs in flight (up to the deadline),
    /// then hand back the final checkpoint.
    async fn drain(&mut self, reply: std::sync::mpsc::SyncSender<Checkpoint>) {
        if self.snapshot_every.is_some() {
            // The next owner restores the state rather than replaying it.
            self.snapshot().await;
        }
        if !self.wait_for_acks().await {
            warn!(
                partition = self.partition,
                in_flight = self.in_flight,
                "drain deadline passed with outputs in flight; their inputs will be replayed"
            );
        }
        let cp = self.checkpoint();
        info!(partition = self.partition, checkpoint = ?cp, late = self.late, "partition drained");
        let _ = reply.try_send(cp);
    }
}

impl PartitionTask {
    /// Asks every operator for changelog records of its changed state (see
    /// [`Operator::snapshot`]), once every output sent is acknowledged: the
    /// records are taken at a [`crate::state::Cut`]. Waits for the
    /// acknowledgements (up to the drain deadline) and, when they do not
    /// come, takes none this time.
    async fn snapshot(&mut self) {
        if !self.outputs.is_empty() {
            self.flush_outputs(None).await;
        }
        if !self.wait_for_acks().await {
            debug!(
                partition = self.partition,
                in_flight = self.in_flight,
                "outputs still in flight: no changelog records this time"
            );
            return;
        }
        let cut = crate::state::Cut {
            processed: self.processed_next,
            next_tick_ms: self.next_tick,
            stream_time_ms: self.stream_time,
        };
        {
            let mut ctx = Context::new(&mut self.outputs, self.partition, self.cfg.tick_ms)
                .with_wake(&self.op_wake);
            each_operator(&mut self.ops, &mut ctx, |op, ctx, _| op.snapshot(&cut, ctx));
        }
        if !self.outputs.is_empty() {
            trace!(
                partition = self.partition,
                records = self.outputs.len(),
                "changelog records"
            );
            self.flush_outputs(None).await;
        }
    }

    /// Takes acknowledgements until none is outstanding (true) or
    /// `drain_timeout_ms` passes (false).
    async fn wait_for_acks(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
        while self.in_flight > 0 {
            tokio::select! {
                ack = self.ack_rx.recv() => match ack {
                    Some(ack) => self.on_ack(ack),
                    None => return false,
                },
                _ = tokio::time::sleep_until(deadline.into()) => return false,
            }
        }
        true
    }
}

/// Waits for a reader's wake-up (forever without a reader).
async fn notified(ready: Option<&Notify>) {
    match ready {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}
