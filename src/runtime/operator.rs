//! The operator interface: what every per-room computation (room activity,
//! highlight detection, gift prediction, user sequences) implements to plug
//! into a partition task without touching sources or sinks.
//!
//! An operator owns the state of the rooms of one partition. The runtime calls
//! its hooks in event-time order: `on_record` for each input, `on_tick` once
//! per closed tick, `on_revoke` when the partition leaves this instance.
//! Work an operator hands off the task (speech recognition on a shared pool)
//! comes back through `poll`, which the runtime calls after the context's
//! wake signal fires.
//! Operators report the input positions their state still depends on
//! ([`Holds`]), which is what makes at-least-once commits safe without a
//! changelog: offsets are never committed past a record whose effect a
//! restarted engine would still need.
//!
//! Not for: I/O. Operators never talk to Kafka; they emit [`Output`]s.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::decode::DecodedMedia;
use crate::schema::{Event, InputKind};
pub use crate::state::Holds;

/// Runs `hook` on every operator in order, delivering the notes each one
/// sends to the operators after it.
pub(crate) fn each_operator(
    ops: &mut [Box<dyn Operator>],
    ctx: &mut Context<'_>,
    mut hook: impl FnMut(&mut dyn Operator, &mut Context<'_>, usize),
) {
    for i in 0..ops.len() {
        hook(ops[i].as_mut(), ctx, i);
        if ctx.notes.is_empty() {
            continue;
        }
        let notes = std::mem::take(&mut ctx.notes);
        for later in &mut ops[i + 1..] {
            for n in &notes {
                later.on_note(n, ctx);
            }
        }
        ctx.notes.clear();
    }
}

/// Where a record sits in its input stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Which input stream.
    pub kind: InputKind,
    /// Offset in that stream's partition.
    pub offset: i64,
}

/// Which output topic a record goes to (names come from the pipeline file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputTopic {
    /// Per-room per-tick activity.
    RoomStats,
    /// Records that could not be processed.
    DeadLetters,
    /// Recognised speech.
    Transcripts,
    /// Per-room per-tick embeddings and audio features.
    RoomFeatures,
    /// Labelled examples for training the engine's models.
    TrainingSamples,
    /// Per-room per-tick highlight scores.
    HighlightScores,
    /// Highlight events.
    Highlights,
    /// Live actions re-keyed by user (the user stage's input).
    UserActions,
    /// Rooms' content representations (compacted).
    RoomEmbeddings,
    /// Viewers' gift probabilities.
    GiftPredictions,
    /// Users' behaviour sequences (compacted).
    UserSequences,
    /// The user stage's state changelog (internal, compacted), written to
    /// the partition that owns the state. Keys are the operator's name, a
    /// NUL byte, and the state's key (see [`Operator::restore`]).
    UserChangelog {
        /// The partition.
        partition: i32,
    },
    /// The room stage's state changelog (internal, compacted), keyed and
    /// partitioned as `UserChangelog` (see [`Operator::snapshot`]).
    RoomChangelog {
        /// The partition.
        partition: i32,
    },
    /// Rooms' highlight scores for the user stage, on `room-embeddings`
    /// (see [`crate::sources::room_table`]).
    RoomScores,
    /// A room-stage partition's content progress, on one partition of the
    /// `room-embeddings` topic (see [`crate::sources::room_table`]).
    RoomProgress {
        /// The partition of `room-embeddings`.
        partition: i32,
    },
}

impl OutputTopic {
    /// Name used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            OutputTopic::RoomStats => "room_stats",
            OutputTopic::DeadLetters => "dead_letters",
            OutputTopic::Transcripts => "transcripts",
            OutputTopic::RoomFeatures => "room_features",
            OutputTopic::TrainingSamples => "training_samples",
            OutputTopic::HighlightScores => "highlight_scores",
            OutputTopic::Highlights => "highlights",
            OutputTopic::UserActions => "user_actions",
            OutputTopic::RoomEmbeddings => "room_embeddings",
            OutputTopic::GiftPredictions => "gift_predictions",
            OutputTopic::UserSequences => "user_sequences",
            OutputTopic::UserChangelog { .. } => "user_changelog",
            OutputTopic::RoomChangelog { .. } => "room_changelog",
            OutputTopic::RoomScores => "room_scores",
            OutputTopic::RoomProgress { .. } => "room_progress",
        }
    }

    /// A changelog: state, always written (never skipped as a replayed
    /// tick's output, whatever its `tick_end_ms`).
    pub fn is_changelog(self) -> bool {
        matches!(
            self,
            OutputTopic::UserChangelog { .. } | OutputTopic::RoomChangelog { .. }
        )
    }
}

/// One record to write.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// Destination.
    pub topic: OutputTopic,
    /// Kafka key (room id or user id).
    pub key: Vec<u8>,
    /// Deterministic id, also sent as the `onair-id` header.
    pub id: String,
    /// Encoded record.
    pub payload: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// `name@version` of the model that made it, sent as `onair-model` header.
    pub model_version: Option<String>,
    /// End of the event-time interval this output closes, for outputs made at
    /// ticks. After a restart, tick outputs at or before the partition's
    /// committed emitted-through time are not written again (changelog
    /// records are: the inputs they hold may be new to the changelog).
    pub tick_end_ms: Option<i64>,
    /// Input positions the output was computed from: offsets are not
    /// committed past them until the output is acknowledged.
    pub depends_on: Holds,
}

/// What an operator tells the operators after it in the same partition
/// task (in the order the pipeline builds them). Notes are not written
/// anywhere; notes sent while handling a note are dropped.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// Speech recognised in a room (also written to the transcripts topic).
    Transcript {
        /// The room.
        room_id: String,
        /// Event time the speech started and ended.
        start_ms: i64,
        /// End of the speech.
        end_ms: i64,
        /// What was said.
        text: String,
    },
    /// The features of one room tick, as written to the room-features
    /// topic, with the input positions they were computed from.
    Features {
        /// The record.
        record: Arc<crate::schema::RoomFeatures>,
        /// Input positions it depends on.
        holds: Holds,
    },
    /// An embedding the features operator got back for one of a room's
    /// inputs, as it arrives (sent only when a later operator asked for them:
    /// see `Features::with_embedding_notes`). Those of a tick come before the
    /// tick's `Features` note; a transcript's may come after it.
    Embedded {
        /// The room.
        room_id: Arc<str>,
        /// What was embedded.
        item: Embedded,
        /// The embedding.
        embedding: Arc<[f32]>,
        /// `name@version` of the model that made it.
        model: Arc<str>,
    },
    /// A room's content segment is complete (see the MMBee content operator):
    /// from this moment on the room's content representation is this segment's.
    Content {
        /// The room.
        room_id: Arc<str>,
        /// The room's streamer (empty when not known).
        streamer_id: Arc<str>,
        /// The segment.
        start_ms: i64,
        /// End of the segment (exclusive).
        end_ms: i64,
        /// Event time from which it is the room's content: its end plus the
        /// finalize delay (whenever the operator found it complete).
        at_ms: i64,
        /// The segment's content row (layout `mmbee-content-v1`).
        content: Arc<crate::operators::mmbee_content::ContentRow>,
        /// The input positions the segment was built from.
        holds: Holds,
    },
    /// Voice activity over a closed tick of a room's audio.
    Voice {
        /// The room.
        room_id: String,
        /// The tick.
        tick_start_ms: i64,
        /// Milliseconds judged speech.
        voiced_ms: i64,
        /// Milliseconds judged in all.
        judged_ms: i64,
    },
}

/// What a [`Note::Embedded`] embedding is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embedded {
    /// A frame sampled for the room's video segment (3 per segment), at its time.
    SegmentFrame {
        /// Frame time (event time, ms).
        time_ms: i64,
    },
    /// A comment, at its time.
    Comment {
        /// Comment time.
        time_ms: i64,
    },
    /// Recognised speech over an event-time span.
    Transcript {
        /// Start of the speech.
        start_ms: i64,
        /// End of the speech.
        end_ms: i64,
    },
}

/// What an operator can do while handling a hook.
pub struct Context<'a> {
    pub(crate) outputs: &'a mut Vec<Output>,
    pub(crate) notes: Vec<Note>,
    pub(crate) partition: i32,
    pub(crate) tick_ms: i64,
    pub(crate) wake: Option<&'a Arc<Notify>>,
    pub(crate) replayed_through: Option<i64>,
}

impl<'a> Context<'a> {
    /// A context collecting into `outputs` (for operator tests and benches).
    pub fn new(outputs: &'a mut Vec<Output>, partition: i32, tick_ms: i64) -> Self {
        Context {
            outputs,
            notes: Vec::new(),
            partition,
            tick_ms,
            wake: None,
            replayed_through: None,
        }
    }

    /// The same, for a task whose tick outputs through `t` were written
    /// before a restart (see [`Context::replayed_through`]).
    pub fn with_replayed_through(mut self, t: Option<i64>) -> Self {
        self.replayed_through = t;
        self
    }

    /// In [`Operator::on_start`]: the end of the last tick whose outputs the
    /// partition's previous owner wrote (from the committed offsets'
    /// metadata), so records replayed into those ticks made their tick
    /// outputs already. None: nothing written before, or not known.
    pub fn replayed_through(&self) -> Option<i64> {
        self.replayed_through
    }

    /// The same, with the signal that makes the runtime call [`Operator::poll`].
    pub fn with_wake(mut self, wake: &'a Arc<Notify>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// The signal to notify when work handed off the task has finished and
    /// [`Operator::poll`] should run (None outside a partition task).
    pub fn wake(&self) -> Option<Arc<Notify>> {
        self.wake.cloned()
    }

    /// Queues an output; it is written once the hook returns.
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output);
    }

    /// Tells the operators after this one (see [`Note`]).
    pub fn note(&mut self, note: Note) {
        self.notes.push(note);
    }

    /// The partition this task owns.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Tick length in ms.
    pub fn tick_ms(&self) -> i64 {
        self.tick_ms
    }
}

/// A per-partition computation over the rooms of that partition.
pub trait Operator: Send {
    /// Stable name, used as the metrics `stage` label.
    fn name(&self) -> &'static str;

    /// Called once before the first record.
    fn on_start(&mut self, _ctx: &mut Context<'_>) {}

    /// One input record, in event-time order across the partition's streams
    /// (up to the allowed lateness). `late` is true when the record's tick has
    /// already closed: it may update lasting state but must not change emitted
    /// ticks.
    fn on_record(&mut self, event: &Event, pos: Position, late: bool, ctx: &mut Context<'_>);

    /// What a video or audio record decoded to (sampled frames, 16 kHz
    /// audio), right after `on_record` for it, when media decoding is on.
    /// Records whose media failed to decode are dead-lettered and reach no
    /// operator.
    fn on_media(
        &mut self,
        _event: &Event,
        _media: &DecodedMedia,
        _pos: Position,
        _late: bool,
        _ctx: &mut Context<'_>,
    ) {
    }

    /// The tick `[tick_start_ms, tick_start_ms + tick_ms)` closed: no more
    /// records for it will come (later ones are flagged late).
    fn on_tick(&mut self, _tick_start_ms: i64, _ctx: &mut Context<'_>) {}

    /// A note from an operator before this one, handled right after the
    /// hook that sent it.
    fn on_note(&mut self, _note: &Note, _ctx: &mut Context<'_>) {}

    /// The start of the earliest tick whose outputs this operator has not
    /// written yet because work for it is still off the task. The partition's
    /// emitted-through time stays at or before it, so a restart writes that
    /// tick again rather than skipping it.
    fn unfinished_tick(&self) -> Option<i64> {
        None
    }

    /// Whether the operator holds work it could not hand off (a model's
    /// queue was full): the partition stops taking records until a wake
    /// signal, and its paused input is what backpressure looks like.
    fn congested(&self) -> bool {
        false
    }

    /// Emits the results of work that finished off the partition task.
    /// Called after the wake signal (see [`Context::wake`]) fires, between
    /// records.
    fn poll(&mut self, _ctx: &mut Context<'_>) {}

    /// Work handed off the task and not yet back (the end of a finite input
    /// waits for it).
    fn pending(&self) -> usize {
        0
    }

    /// The input has ended (a finite run): close whatever waits for more
    /// input, e.g. an utterance still open at the end of the audio.
    fn on_finish(&mut self, _ctx: &mut Context<'_>) {}

    /// Adds the positions the operator's state still depends on.
    fn holds(&self, holds: &mut Holds);

    /// Rooms currently held.
    fn rooms(&self) -> usize {
        0
    }

    /// The partition is leaving this instance (or the process stops): drop state.
    fn on_revoke(&mut self) {}

    /// Write the state that changed since the last call to the changelog
    /// (outputs to [`OutputTopic::RoomChangelog`], an empty payload deleting
    /// a key), each record taken at `cut` (see [`crate::state::Cut`]): every
    /// output emitted so far is acknowledged. Called every
    /// `runtime.snapshot_interval_ms` and when the partition is drained, by
    /// stages that keep a changelog this way; once an operator has written
    /// (or restored) a record, it need no longer hold the positions the
    /// record covers. Operators whose state is not worth a record keep
    /// holding their positions and leave this alone.
    fn snapshot(&mut self, _cut: &crate::state::Cut, _ctx: &mut Context<'_>) {}

    /// The cut the operator's restored state was taken at (None: nothing
    /// restored). The task closes ticks from that cut's first open tick on,
    /// or earlier where replayed records need it: ticks the restored state
    /// has open would otherwise never close when the replay starts later.
    fn resumed_at(&self) -> Option<crate::state::Cut> {
        None
    }

    /// One record of the stage's changelog, read back when the partition is
    /// assigned, before any input: `key` is what the operator wrote after
    /// its name and the NUL byte. Records come in the changelog's order, the
    /// last per key winning. `emitted_through_ms` is the partition's
    /// committed emitted-through time (tick outputs after it will be
    /// written again).
    fn restore(&mut self, _key: &[u8], _value: &[u8], _emitted_through_ms: Option<i64>) {}
}

/// The key of a changelog record: the operator's name, NUL, the state's key.
pub fn changelog_key(operator: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(operator.len() + 1 + key.len());
    k.extend_from_slice(operator.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// A record of the room changelog (see [`Operator::snapshot`]): the state
/// of `key` (empty: the partition's record) as operator `name` wrote it at
/// `cut`, on `partition`; an empty payload deletes the key. Offsets stay
/// behind `depends_on` until it is acknowledged.
pub fn room_changelog(
    name: &str,
    partition: i32,
    key: &[u8],
    payload: Vec<u8>,
    cut: &crate::state::Cut,
    depends_on: Holds,
) -> Output {
    use prost::Message as _;
    let cut_bytes = cut.to_record().encode_to_vec();
    Output {
        topic: OutputTopic::RoomChangelog { partition },
        key: changelog_key(name, key),
        id: crate::schema::deterministic_id(&[b"room-state", name.as_bytes(), key, &cut_bytes]),
        payload,
        headers: Vec::new(),
        model_version: None,
        tick_end_ms: None,
        depends_on,
    }
}

/// Splits a changelog key into the operator's name and the state's key.
pub fn split_changelog_key(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = key.iter().position(|&b| b == 0)?;
    Some((&key[..i], &key[i + 1..]))
}
