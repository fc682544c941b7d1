//! Highlight detection online: every room's newest tick is scored by the
//! highlight model from that tick and the ticks before it (never later
//! ones), the score is written to `highlight-scores` (and, for the user
//! stage's sequences, to `room-embeddings`: see [`Highlight::with_room_scores`]),
//! and runs of high scores become highlight events on `highlights`.
//!
//! # Per room
//! * A queue of ticks whose features came (from the features operator's
//!   notes) and are not scored yet; one tick per room is with the model at a
//!   time, because each tick's step reads what the previous one left. When a
//!   room has more than a few waiting (the model is slower than the ticks) or
//!   the model's queue is full, the operator reports itself congested and the
//!   partition stops taking input until it catches up.
//! * The model states of the last `history_ticks` ticks (see
//!   [`crate::models::highlight`]): a tick costs O(window), nothing is
//!   recomputed. A gap in a room's ticks (a tick with no features record)
//!   starts the look-back afresh and ends an open highlight.
//! * The running mean of the room's feature rows (the model's streamer
//!   input), the comments of recent ticks and recent transcripts (for the
//!   events' context).
//!
//! # Events (hysteresis with the thresholds that came with the model version)
//! A highlight opens at the first tick scoring at least `enter`, stays open
//! while ticks score at least `exit`, and closes after `hold_ticks` ticks in
//! a row below `exit`; its end is the start of the first of those. One shorter
//! than `min_ticks` is not reported. It is written when it has lasted
//! `min_ticks` (end 0, open) and again when it closes, with the same id.
//! The thresholds are global (calibrated on held-out rooms, see the model
//! card): streamers seen for the first time have no history to calibrate on.
//!
//! # State on the changelog
//! With the room changelog (Kafka; see [`Operator::snapshot`]) each room
//! whose state changed gets a record of all of it: the ticks waiting for the
//! model, the look-back states, the running mean, kept comments and
//! transcripts and the open highlight. The look-back is what made a restart
//! expensive without it: the last `history_ticks` ticks' inputs (video
//! above all) stayed held, to be decoded, embedded and scored again. A
//! restored room sends its waiting ticks to the model again and skips
//! the replayed features of ticks it already has and the replayed comments
//! its cut covers.
//!
//! Not for: labels or training (see `highlight_labels` and models/highlight/),
//! or the features themselves.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, Counter, Gauge};
use prost::Message;

use crate::config::HighlightConfig;
use crate::features::row::{tick_row, ROW_WIDTH};
use crate::metrics::{Stage, HIGHLIGHT_EVENTS, HIGHLIGHT_SCORES, HIGHLIGHT_STATE_BYTES};
use crate::models::batcher::{BatchModel, Batcher, Done, Refused, ReplyTo, Submit};
use crate::models::highlight::{HighlightModel, StepInput, StepOutput, StepState, Threshold};
use crate::models::serving::{ModelSlot, Watch};
use crate::models::ModelError;
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, Event, HighlightComment, HighlightEvent, HighlightOpen, HighlightPendingTick,
    HighlightRoomRecord, HighlightScore, HighlightStepState, HighlightTranscript, RoomEmbedding,
    SCHEMA_VERSION,
};
use crate::state::room_log::{Logged, RoomLog};
use crate::state::Cut;

/// How far after the peak comments are taken for an event (chat lags).
const COMMENTS_AFTER_PEAK_MS: i64 = 5_000;
/// How far around the peak transcripts are taken for an event.
const TRANSCRIPT_AROUND_PEAK_MS: i64 = 5_000;
/// Transcripts each room keeps.
const TRANSCRIPTS_KEPT: usize = 16;
/// Ticks a room may have waiting for the model before the operator reports
/// itself congested (the model is slower than the rooms' ticks): the
/// partition stops taking input until the rooms catch up, so nothing queues
/// without bound.
const MAX_QUEUED_PER_ROOM: usize = 4;

/// The highlight model as the operators of every partition share it.
pub struct HighlightService {
    /// The settings.
    pub cfg: Arc<HighlightConfig>,
    /// The model's batcher.
    pub model: Box<dyn Submit<StepInput, StepOutput>>,
    _watch: Option<Watch>,
}

impl std::fmt::Debug for HighlightService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HighlightService")
            .field("model", &self.model.label())
            .finish_non_exhaustive()
    }
}

impl HighlightService {
    /// Loads the highest working version, starts its batcher and, when
    /// `reload_interval_ms` > 0, its watcher.
    pub fn start(cfg: Arc<HighlightConfig>) -> Result<Self, ModelError> {
        let (model, watch) = match cfg.backend.as_str() {
            "onnx" => serve::<HighlightModel>(&cfg)?,
            #[cfg(feature = "torch")]
            "torch" => serve::<crate::models::torch::TorchHighlight>(&cfg)?,
            other => {
                return Err(ModelError::Missing {
                    path: "operators.highlight.backend".into(),
                    reason: format!("backend {other:?} is not built in"),
                })
            }
        };
        Ok(HighlightService {
            cfg,
            model,
            _watch: watch,
        })
    }
}

type Served = (Box<dyn Submit<StepInput, StepOutput>>, Option<Watch>);

/// Opens the model directory on backend `M`, starts its batcher and watcher.
fn serve<M>(cfg: &HighlightConfig) -> Result<Served, ModelError>
where
    M: BatchModel<Input = StepInput, Output = StepOutput>,
{
    let slot = ModelSlot::<M>::open(
        std::path::Path::new(&cfg.model),
        cfg.batch.workers,
        cfg.batch.threads,
    )?;
    let watch = (cfg.reload_interval_ms > 0)
        .then(|| slot.watch(Duration::from_millis(cfg.reload_interval_ms)));
    Ok((
        Box::new(Batcher::start(slot, cfg.batch.batch_config())),
        watch,
    ))
}

/// A tick waiting to be scored.
struct Pending {
    tick: i64,
    x: Vec<f32>,
    holds: Holds,
}

/// A highlight being tracked.
#[derive(Clone, Debug)]
struct Open {
    start: i64,
    peak_tick: i64,
    peak_score: f32,
    /// Ticks in a row below `exit` so far.
    below: u32,
    /// Whether the open record was written.
    announced: bool,
    model: Arc<str>,
    /// The thresholds of the version that opened it (they hold to its end).
    threshold: Threshold,
    holds: Holds,
}

#[derive(Default)]
struct Room {
    streamer_id: String,
    queue: VecDeque<Pending>,
    in_flight: bool,
    /// States of the last scored ticks, oldest first, with their holds.
    history: VecDeque<(Arc<StepState>, Holds)>,
    last_scored: Option<i64>,
    row_sum: Vec<f64>,
    rows: u64,
    /// Kept comments: (time, text), oldest first.
    comments: VecDeque<(i64, String)>,
    /// Comments kept per tick: (tick, count) of the newest tick.
    comments_tick: (i64, usize),
    transcripts: VecDeque<(i64, i64, String)>,
    open: Option<Open>,
    /// Latest event time seen for the room.
    last_seen: i64,
    log: Logged,
    /// The newest tick the restored room had: replayed features up to it
    /// are already in.
    replayed_through: Option<i64>,
}

impl Room {
    /// Approximate bytes of state.
    fn bytes(&self) -> usize {
        let states: usize = self
            .history
            .iter()
            .map(|(s, _)| (s.z.len() + s.e.len() + s.p.len()) * 4 + 64)
            .sum();
        let queue: usize = self.queue.iter().map(|p| p.x.len() * 4 + 64).sum();
        let comments: usize = self.comments.iter().map(|(_, c)| c.len() + 32).sum();
        let transcripts: usize = self.transcripts.iter().map(|(_, _, t)| t.len() + 40).sum();
        states + queue + comments + transcripts + self.row_sum.len() * 8 + 256
    }
}

/// The highlight operator for one partition.
pub struct Highlight {
    svc: Arc<HighlightService>,
    rooms: HashMap<Arc<str>, Room>,
    /// Request id -> room.
    requests: HashMap<u64, Arc<str>>,
    next_id: u64,
    reply: ReplyTo<StepOutput>,
    rx: mpsc::Receiver<Done<StepOutput>>,
    /// Rooms whose next tick the model refused (queue full), in order.
    held: VecDeque<Arc<str>>,
    /// Rooms with more than [`MAX_QUEUED_PER_ROOM`] ticks waiting.
    backlogged: usize,
    tick_ms: i64,
    stage: Stage,
    scored: Option<Counter>,
    state_bytes: Option<Gauge>,
    opened: Counter,
    closed: Counter,
    /// The rooms' changelog: once on, the look-back is not held.
    log: RoomLog,
    /// Whether scores also go to `room-embeddings`.
    room_scores: bool,
}

impl Highlight {
    /// The operator for one partition, sharing the instance's model.
    pub fn new(svc: Arc<HighlightService>) -> Self {
        let (tx, rx) = mpsc::channel();
        Highlight {
            svc,
            rooms: HashMap::new(),
            requests: HashMap::new(),
            next_id: 0,
            reply: ReplyTo { tx, wake: None },
            rx,
            held: VecDeque::new(),
            backlogged: 0,
            tick_ms: 1000,
            stage: Stage::new("highlight"),
            scored: None,
            state_bytes: None,
            opened: counter!(HIGHLIGHT_EVENTS, "state" => "open"),
            closed: counter!(HIGHLIGHT_EVENTS, "state" => "closed"),
            log: RoomLog::new("highlight"),
            room_scores: false,
        }
    }

    /// Also writes every score to `room-embeddings`, where the user stage's
    /// room table reads a room's score as of an entry (the partition's
    /// content progress covers it: a tick is unfinished until scored).
    pub fn with_room_scores(mut self, on: bool) -> Self {
        self.room_scores = on;
        self
    }

    /// Sends the room's next tick to the model unless one is there already.
    /// Returns false when the model refused it (queue full).
    fn submit(&mut self, key: &Arc<str>) -> bool {
        let Some(room) = self.rooms.get_mut(key) else {
            return true;
        };
        if room.in_flight {
            return true;
        }
        let Some(next) = room.queue.front() else {
            return true;
        };
        // A gap in the room's ticks starts the look-back afresh.
        if room
            .last_scored
            .is_some_and(|last| next.tick != last + self.tick_ms)
        {
            room.history.clear();
        }
        if room.row_sum.len() != next.x.len() {
            room.row_sum = vec![0.0; next.x.len()];
            room.rows = 0;
        }
        let n = (room.rows + 1) as f64;
        let streamer: Vec<f32> = room
            .row_sum
            .iter()
            .zip(&next.x)
            .map(|(s, &x)| ((s + f64::from(x)) / n) as f32)
            .collect();
        let input = StepInput {
            x: next.x.clone(),
            streamer,
            history: room.history.iter().map(|(s, _)| s.clone()).collect(),
        };
        let id = self.next_id;
        match self.svc.model.submit(key, id, input, &self.reply) {
            Ok(()) => {
                self.next_id += 1;
                self.requests.insert(id, key.clone());
                // The running mean takes the tick when it is scored, so the
                // state a changelog record holds never counts a tick that
                // is still with the model.
                room.in_flight = true;
                true
            }
            Err(Refused::Full(_)) => false,
            Err(Refused::Stopped(_)) => {
                // Shutting down: the tick stays unscored (and held, so a
                // restart scores it).
                true
            }
        }
    }

    /// Resubmits rooms the model refused, in order, until one is refused again.
    fn resubmit(&mut self) {
        while let Some(key) = self.held.front().cloned() {
            if !self.submit(&key) {
                return;
            }
            self.held.pop_front();
        }
    }

    fn drain(&mut self, ctx: &mut Context<'_>) {
        while let Ok(done) = self.rx.try_recv() {
            let Some(key) = self.requests.remove(&done.id) else {
                continue;
            };
            let Some(room) = self.rooms.get_mut(&key) else {
                continue;
            };
            room.in_flight = false;
            let Some(tick) = room.queue.pop_front() else {
                continue;
            };
            for (s, &x) in room.row_sum.iter_mut().zip(&tick.x) {
                *s += f64::from(x);
            }
            room.rows += 1;
            room.log.changed();
            if room.queue.len() == MAX_QUEUED_PER_ROOM {
                self.backlogged -= 1;
            }
            let previous = room.last_scored.replace(tick.tick);
            // A gap in the room's ticks ends its highlight.
            if let Some(p) = previous.filter(|&p| tick.tick != p + self.tick_ms) {
                self.close(&key, p + self.tick_ms, ctx);
            }
            let Some(room) = self.rooms.get_mut(&key) else {
                continue;
            };
            match done.result {
                Ok(out) => {
                    room.history.push_back((out.state.clone(), tick.holds));
                    while room.history.len() > self.svc.cfg.history_ticks {
                        room.history.pop_front();
                    }
                    self.emit_score(&key, &tick, &out, &done.model, ctx);
                    self.track(&key, &tick, &out, &done.model, ctx);
                }
                Err(e) => {
                    self.stage.error("model");
                    tracing::debug!(room = %key, error = %e, "highlight scoring failed");
                    // The look-back restarts after a failed tick.
                    room.history.clear();
                }
            }
            self.send_next(key);
        }
    }

    /// Sends the room's next tick, or queues the room behind those the model
    /// refused (rooms go to the model in the order they were refused).
    fn send_next(&mut self, key: Arc<str>) {
        if self.held.is_empty() {
            if !self.submit(&key) {
                self.held.push_back(key);
            }
        } else if !self.held.contains(&key) {
            self.held.push_back(key);
        }
    }

    fn emit_score(
        &mut self,
        key: &Arc<str>,
        tick: &Pending,
        out: &StepOutput,
        model: &Arc<str>,
        ctx: &mut Context<'_>,
    ) {
        let streamer_id = self
            .rooms
            .get(key)
            .map(|r| r.streamer_id.clone())
            .unwrap_or_default();
        let record = HighlightScore {
            schema_version: SCHEMA_VERSION,
            id: deterministic_id(&[
                b"highlight-scores",
                key.as_bytes(),
                &tick.tick.to_le_bytes(),
            ]),
            room_id: key.to_string(),
            tick_start_ms: tick.tick,
            score: out.score,
            model_version: model.to_string(),
            streamer_id,
            tick_ms: self.tick_ms,
        };
        if let Some(c) = &self.scored {
            c.increment(1);
        }
        let tick_end = tick.tick + self.tick_ms;
        if self.room_scores {
            let table = RoomEmbedding {
                schema_version: SCHEMA_VERSION,
                id: deterministic_id(&[b"room-score", key.as_bytes(), &tick.tick.to_le_bytes()]),
                room_id: key.to_string(),
                streamer_id: record.streamer_id.clone(),
                event_time_ms: tick_end,
                model_version: model.to_string(),
                segment_start_ms: tick.tick,
                segment_end_ms: tick_end,
                highlight_score: Some(out.score),
                ..RoomEmbedding::default()
            };
            let mut table_key = key.as_bytes().to_vec();
            table_key.extend_from_slice(b"\0highlight");
            ctx.emit(Output {
                topic: OutputTopic::RoomScores,
                key: table_key,
                id: table.id.clone(),
                payload: table.encode_to_vec(),
                headers: Vec::new(),
                model_version: Some(model.to_string()),
                tick_end_ms: Some(tick_end),
                depends_on: tick.holds,
            });
        }
        ctx.emit(Output {
            topic: OutputTopic::HighlightScores,
            key: key.as_bytes().to_vec(),
            id: record.id.clone(),
            payload: record.encode_to_vec(),
            headers: Vec::new(),
            model_version: Some(model.to_string()),
            tick_end_ms: Some(tick_end),
            depends_on: tick.holds,
        });
    }

    /// Runs the hysteresis on a room's newest score and writes what it decided.
    fn track(
        &mut self,
        key: &Arc<str>,
        tick: &Pending,
        out: &StepOutput,
        model: &Arc<str>,
        ctx: &mut Context<'_>,
    ) {
        let tick_ms = self.tick_ms;
        let Some(room) = self.rooms.get_mut(key) else {
            return;
        };
        let opener = || (model.clone(), out.threshold, tick.holds);
        match observe(&mut room.open, tick.tick, out.score, tick_ms, opener) {
            Change::None => {}
            Change::Announce => {
                let open = room.open.as_mut().map(|o| {
                    o.announced = true;
                    o.clone()
                });
                if let Some(open) = open {
                    let record = self.event(key, &open, 0, tick.tick + tick_ms);
                    self.opened.increment(1);
                    ctx.emit(event_output(record, &open, None));
                }
            }
            Change::Close(end) => self.close(key, end, ctx),
        }
    }

    /// Closes a room's highlight at `end`, writing it when long enough.
    fn close(&mut self, key: &Arc<str>, end: i64, ctx: &mut Context<'_>) {
        let Some(open) = self.rooms.get_mut(key).and_then(|r| r.open.take()) else {
            return;
        };
        if (end - open.start) / self.tick_ms >= i64::from(open.threshold.min_ticks) {
            let record = self.event(key, &open, end, end);
            self.closed.increment(1);
            ctx.emit(event_output(record, &open, Some(end)));
        }
    }

    /// The event record of `open` (end 0: still open), its top comments
    /// from the ticks before `through` only: those ticks have closed, so
    /// the comments are all there however far the input has run ahead of
    /// the model.
    fn event(&self, key: &Arc<str>, open: &Open, end: i64, through: i64) -> HighlightEvent {
        let room = self.rooms.get(key);
        let streamer_id = room.map(|r| r.streamer_id.clone()).unwrap_or_default();
        let (top_comments, peak_transcript) = room
            .map(|r| {
                (
                    top_comments(
                        &r.comments,
                        open.peak_tick,
                        (open.peak_tick + COMMENTS_AFTER_PEAK_MS.max(self.tick_ms)).min(through),
                        self.svc.cfg.top_comments,
                    ),
                    transcript_around(&r.transcripts, open.peak_tick, self.tick_ms),
                )
            })
            .unwrap_or_default();
        HighlightEvent {
            schema_version: SCHEMA_VERSION,
            id: deterministic_id(&[b"highlights", key.as_bytes(), &open.start.to_le_bytes()]),
            room_id: key.to_string(),
            streamer_id,
            start_time_ms: open.start,
            end_time_ms: end,
            peak_score: open.peak_score,
            model_version: open.model.to_string(),
            peak_time_ms: open.peak_tick,
            peak_transcript,
            top_comments,
        }
    }

    fn on_comment(&mut self, c: &crate::schema::Comment, pos: Position, late: bool) {
        let per_tick = self.svc.cfg.comments_per_tick;
        if per_tick == 0 || c.text.trim().is_empty() || late {
            // A late comment's tick was scored: whether an event would
            // see it depends on when it came.
            return;
        }
        let history = self.svc.cfg.history_ticks;
        let keep_ms = (history as i64 + 1) * self.tick_ms;
        let tick = c.event_time_ms.div_euclid(self.tick_ms) * self.tick_ms;
        let Some(room) = self.room_at(&c.room_id, pos) else {
            return;
        };
        room.last_seen = room.last_seen.max(c.event_time_ms);
        if room.comments_tick.0 != tick {
            room.comments_tick = (tick, 0);
        }
        if room.comments_tick.1 >= per_tick {
            return;
        }
        room.comments_tick.1 += 1;
        let text: String = c.text.trim().chars().take(280).collect();
        room.comments.push_back((c.event_time_ms, text));
        // The open highlight's peak keeps its comments: its record takes
        // them when it closes, however long after.
        let peak = room.open.as_ref().map_or(i64::MAX, |o| o.peak_tick);
        while room
            .comments
            .front()
            .is_some_and(|(t, _)| *t < c.event_time_ms - keep_ms && *t < peak)
        {
            room.comments.pop_front();
        }
        while room.comments.len() > per_tick * (history + 1)
            && room.comments.front().is_some_and(|(t, _)| *t < peak)
        {
            room.comments.pop_front();
        }
    }

    fn room(&mut self, id: &str) -> &mut Room {
        let key = match self.rooms.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(id),
        };
        self.room_by_key(key)
    }

    /// The room (made when new), marked changed.
    fn room_by_key(&mut self, key: Arc<str>) -> &mut Room {
        let log = &mut self.log;
        let room = self.rooms.entry(key).or_insert_with_key(|k| Room {
            log: log.entry(k),
            ..Room::default()
        });
        room.log.changed();
        room
    }

    /// The room a record at `pos` is for, unless the room's restored state
    /// has the record already (a replay); the position stays held until
    /// the room's next changelog record.
    fn room_at(&mut self, id: &str, pos: Position) -> Option<&mut Room> {
        let covered = match self.rooms.get(id) {
            Some(r) => r.log.covers(pos),
            None => self.log.covers(pos),
        };
        if covered {
            return None;
        }
        let room = self.room(id);
        room.log.folded(pos);
        Some(room)
    }

    /// Forgets rooms with nothing queued that have been quiet for longer
    /// than their look-back (a highlight still open ends after the last
    /// scored tick).
    fn forget_idle(&mut self, now: i64, ctx: &mut Context<'_>) {
        let idle_ms = (self.svc.cfg.history_ticks as i64 + 1) * self.tick_ms;
        let quiet: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.queue.is_empty() && !r.in_flight && r.last_seen + idle_ms < now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in quiet {
            let end = self
                .rooms
                .get(&key)
                .and_then(|r| r.last_scored)
                .map(|t| t + self.tick_ms);
            if let Some(end) = end {
                self.close(&key, end, ctx);
            }
            if let Some(room) = self.rooms.remove(&key) {
                self.log.drop_room(&key, room.log);
            }
        }
    }
}

/// What a score did to a room's highlight.
#[derive(Debug, PartialEq)]
enum Change {
    /// Nothing to write.
    None,
    /// The highlight has lasted its minimum length: write it as open.
    Announce,
    /// The highlight ended at this time: write it closed (when it lasted
    /// its minimum length).
    Close(i64),
}

/// The hysteresis: the score `s` of tick `t` applied to a room's highlight
/// (`open`); `opener` gives the model, thresholds and holds of a highlight
/// this tick opens.
fn observe(
    open: &mut Option<Open>,
    t: i64,
    s: f32,
    tick_ms: i64,
    opener: impl FnOnce() -> (Arc<str>, Threshold, Holds),
) -> Change {
    let announce = |o: &Open| {
        !o.announced
            && o.below == 0
            && (t - o.start) / tick_ms + 1 >= i64::from(o.threshold.min_ticks.max(1))
    };
    let Some(o) = open.as_mut() else {
        let (model, threshold, holds) = opener();
        if s < threshold.enter {
            return Change::None;
        }
        let o = Open {
            start: t,
            peak_tick: t,
            peak_score: s,
            below: 0,
            announced: false,
            model,
            threshold,
            holds,
        };
        let change = if announce(&o) {
            Change::Announce
        } else {
            Change::None
        };
        *open = Some(o);
        return change;
    };
    if s >= o.threshold.exit {
        o.below = 0;
        if s > o.peak_score {
            o.peak_score = s;
            o.peak_tick = t;
        }
        return if announce(o) {
            Change::Announce
        } else {
            Change::None
        };
    }
    o.below += 1;
    if o.below < o.threshold.hold_ticks.max(1) {
        return Change::None;
    }
    Change::Close(t - i64::from(o.below - 1) * tick_ms)
}

/// The output of an event record.
fn event_output(record: HighlightEvent, open: &Open, end: Option<i64>) -> Output {
    Output {
        topic: OutputTopic::Highlights,
        key: record.room_id.as_bytes().to_vec(),
        id: record.id.clone(),
        payload: record.encode_to_vec(),
        headers: vec![(
            "onair-highlight-state".into(),
            if end.is_some() {
                b"closed".to_vec()
            } else {
                b"open".to_vec()
            },
        )],
        model_version: Some(open.model.to_string()),
        tick_end_ms: None,
        depends_on: open.holds,
    }
}

/// The `k` most repeated comments with times in `[from, to)` (ties: the
/// earliest first), compared without case.
fn top_comments(comments: &VecDeque<(i64, String)>, from: i64, to: i64, k: usize) -> Vec<String> {
    let mut counts: Vec<(String, usize, i64, String)> = Vec::new();
    for (t, text) in comments.iter().filter(|(t, _)| (from..to).contains(t)) {
        let norm = text.to_lowercase();
        match counts.iter_mut().find(|c| c.0 == norm) {
            Some(c) => c.1 += 1,
            None => counts.push((norm, 1, *t, text.clone())),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    counts.into_iter().take(k).map(|c| c.3).collect()
}

/// The transcripts overlapping the peak's neighbourhood, joined.
fn transcript_around(
    transcripts: &VecDeque<(i64, i64, String)>,
    peak: i64,
    tick_ms: i64,
) -> String {
    let from = peak - TRANSCRIPT_AROUND_PEAK_MS;
    let to = peak + tick_ms + TRANSCRIPT_AROUND_PEAK_MS;
    transcripts
        .iter()
        .filter(|(s, e, _)| *s < to && *e > from)
        .map(|(_, _, t)| t.trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Operator for Highlight {
    fn name(&self) -> &'static str {
        "highlight"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.tick_ms = ctx.tick_ms().max(1);
        self.reply.wake = ctx.wake();
        let p = ctx.partition().to_string();
        self.scored = Some(counter!(HIGHLIGHT_SCORES, "partition" => p.clone()));
        self.state_bytes = Some(gauge!(HIGHLIGHT_STATE_BYTES, "partition" => p));
    }

    fn on_record(&mut self, event: &Event, pos: Position, late: bool, _ctx: &mut Context<'_>) {
        match event {
            Event::Comment(c) => self.on_comment(c, pos, late),
            Event::Video(v) if !v.streamer_id.is_empty() => {
                let Some(room) = self.room_at(&v.room_id, pos) else {
                    return;
                };
                room.last_seen = room.last_seen.max(v.start_time_ms);
                if room.streamer_id.is_empty() {
                    room.streamer_id.clone_from(&v.streamer_id);
                }
            }
            _ => {}
        }
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        match note {
            Note::Features { record, holds } => {
                let tick_ms = self.tick_ms;
                let key: Arc<str> = match self.rooms.get_key_value(record.room_id.as_str()) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(record.room_id.as_str()),
                };
                if self
                    .rooms
                    .get(&key)
                    .and_then(|r| r.replayed_through)
                    .is_some_and(|n| record.tick_start_ms <= n)
                {
                    // Replayed: the restored room has the tick.
                    return;
                }
                let room = self.room_by_key(key.clone());
                room.log.folded_all(holds);
                room.last_seen = room.last_seen.max(record.tick_start_ms + tick_ms);
                let newest = room.queue.back().map(|p| p.tick).or(room.last_scored);
                if newest.is_some_and(|n| record.tick_start_ms <= n) {
                    self.stage.dropped("tick_out_of_order", 1);
                    return;
                }
                let x = tick_row(record);
                debug_assert_eq!(x.len(), ROW_WIDTH);
                room.queue.push_back(Pending {
                    tick: record.tick_start_ms - record.tick_start_ms.rem_euclid(tick_ms),
                    x,
                    holds: *holds,
                });
                if room.queue.len() == MAX_QUEUED_PER_ROOM + 1 {
                    self.backlogged += 1;
                }
                self.send_next(key);
            }
            Note::Transcript {
                room_id,
                start_ms,
                end_ms,
                text,
            } => {
                let room = self.room(room_id);
                room.last_seen = room.last_seen.max(*end_ms);
                room.transcripts
                    .push_back((*start_ms, *end_ms, text.clone()));
                while room.transcripts.len() > TRANSCRIPTS_KEPT {
                    room.transcripts.pop_front();
                }
            }
            Note::Voice { .. } | Note::Embedded { .. } | Note::Content { .. } => {}
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.forget_idle(tick_start_ms + self.tick_ms, ctx);
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        self.resubmit();
        self.drain(ctx);
        if let Some(g) = &self.state_bytes {
            g.set(self.rooms.values().map(Room::bytes).sum::<usize>() as f64);
        }
    }

    fn pending(&self) -> usize {
        self.rooms.values().map(|r| r.queue.len()).sum()
    }

    fn unfinished_tick(&self) -> Option<i64> {
        self.rooms
            .values()
            .filter_map(|r| r.queue.front().map(|p| p.tick))
            .min()
    }

    fn congested(&self) -> bool {
        !self.held.is_empty() || self.backlogged > 0
    }

    fn holds(&self, holds: &mut Holds) {
        if self.log.on() {
            // Everything before each room's last record is in it.
            self.log.holds(self.rooms.values().map(|r| &r.log), holds);
            return;
        }
        for room in self.rooms.values() {
            for p in &room.queue {
                holds.merge(&p.holds);
            }
            for (_, h) in &room.history {
                holds.merge(h);
            }
            if let Some(o) = &room.open {
                holds.merge(&o.holds);
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
        self.requests.clear();
        self.held.clear();
        self.backlogged = 0;
        self.log.clear();
    }

    fn resumed_at(&self) -> Option<Cut> {
        self.log.restored()
    }

    fn snapshot(&mut self, cut: &Cut, ctx: &mut Context<'_>) {
        let partition = HighlightRoomRecord {
            schema_version: SCHEMA_VERSION,
            cut: Some(cut.to_record()),
            ..Default::default()
        };
        self.log.snapshot(
            cut,
            ctx,
            self.rooms.iter_mut().map(|(k, r)| (&**k, r)),
            |r| &mut r.log,
            |r, cut| room_record(r, cut).encode_to_vec(),
            partition.encode_to_vec(),
        );
    }

    fn restore(&mut self, key: &[u8], value: &[u8], _emitted_through_ms: Option<i64>) {
        let rooms = self.rooms.values_mut().map(|r| &mut r.log);
        let restored =
            self.log
                .restore(key, value, |r: &HighlightRoomRecord| r.cut.as_ref(), rooms);
        let Some((room_id, record, log)) = restored else {
            return;
        };
        let key: Arc<str> = Arc::from(room_id);
        let mut room = room_from(record);
        room.log = log;
        room.replayed_through = room.queue.back().map(|p| p.tick).or(room.last_scored);
        if !room.queue.is_empty() {
            // Its waiting ticks go to the model again (the first may have
            // been there when the record was taken).
            self.held.push_back(key.clone());
        }
        if room.queue.len() > MAX_QUEUED_PER_ROOM {
            self.backlogged += 1;
        }
        if let Some(old) = self.rooms.insert(key.clone(), room) {
            if old.queue.len() > MAX_QUEUED_PER_ROOM {
                self.backlogged -= 1;
            }
        }
    }
}

/// The changelog record of a room's state, taken at `cut`.
fn room_record(room: &Room, cut: &Cut) -> HighlightRoomRecord {
    HighlightRoomRecord {
        schema_version: SCHEMA_VERSION,
        cut: Some(cut.to_record()),
        streamer_id: room.streamer_id.clone(),
        queue: room
            .queue
            .iter()
            .map(|p| HighlightPendingTick {
                tick: p.tick,
                x: p.x.clone(),
            })
            .collect(),
        history: room
            .history
            .iter()
            .map(|(s, _)| HighlightStepState {
                z: s.z.clone(),
                e: s.e.clone(),
                p: s.p.clone(),
            })
            .collect(),
        last_scored: room.last_scored.unwrap_or(i64::MIN),
        row_sum: room.row_sum.clone(),
        rows: room.rows,
        comments: room
            .comments
            .iter()
            .map(|(t_ms, text)| HighlightComment {
                t_ms: *t_ms,
                text: text.clone(),
            })
            .collect(),
        comments_tick: room.comments_tick.0,
        comments_in_tick: room.comments_tick.1 as u64,
        transcripts: room
            .transcripts
            .iter()
            .map(|(start_ms, end_ms, text)| HighlightTranscript {
                start_ms: *start_ms,
                end_ms: *end_ms,
                text: text.clone(),
            })
            .collect(),
        open: room.open.as_ref().map(|o| HighlightOpen {
            start: o.start,
            peak_tick: o.peak_tick,
            peak_score: o.peak_score,
            below: o.below,
            announced: o.announced,
            model: o.model.to_string(),
            enter: o.threshold.enter,
            exit: o.threshold.exit,
            hold_ticks: o.threshold.hold_ticks,
            min_ticks: o.threshold.min_ticks,
        }),
        last_seen: room.last_seen,
    }
}

/// A room as its changelog record has it (the record covers what it holds:
/// nothing is held for it).
fn room_from(r: HighlightRoomRecord) -> Room {
    Room {
        streamer_id: r.streamer_id,
        queue: r
            .queue
            .into_iter()
            .map(|p| Pending {
                tick: p.tick,
                x: p.x,
                holds: Holds::default(),
            })
            .collect(),
        in_flight: false,
        history: r
            .history
            .into_iter()
            .map(|s| {
                let state = StepState {
                    z: s.z,
                    e: s.e,
                    p: s.p,
                };
                (Arc::new(state), Holds::default())
            })
            .collect(),
        last_scored: (r.last_scored != i64::MIN).then_some(r.last_scored),
        row_sum: r.row_sum,
        rows: r.rows,
        comments: r.comments.into_iter().map(|c| (c.t_ms, c.text)).collect(),
        comments_tick: (r.comments_tick, r.comments_in_tick as usize),
        transcripts: r
            .transcripts
            .into_iter()
            .map(|t| (t.start_ms, t.end_ms, t.text))
            .collect(),
        open: r.open.map(|o| Open {
            start: o.start,
            peak_tick: o.peak_tick,
            peak_score: o.peak_score,
            below: o.below,
            announced: o.announced,
            model: Arc::from(o.model.as_str()),
            threshold: Threshold {
                enter: o.enter,
                exit: o.exit,
                hold_ticks: o.hold_ticks,
                min_ticks: o.min_ticks,
            },
            holds: Holds::default(),
        }),
        last_seen: r.last_seen,
        ..Room::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TH: Threshold = Threshold {
        enter: 0.6,
        exit: 0.4,
        hold_ticks: 2,
        min_ticks: 3,
    };

    /// Runs the hysteresis over `scores` (tick i starts at i * 1000):
    /// (announced at, closed (start, end)) per highlight.
    fn run(scores: &[f32], th: Threshold) -> (Vec<i64>, Vec<(i64, i64)>) {
        let mut open = None;
        let (mut announced, mut closed) = (Vec::new(), Vec::new());
        for (i, &s) in scores.iter().enumerate() {
            let t = i as i64 * 1000;
            let opener = || (Arc::from("highlight@1"), th, Holds::default());
            match observe(&mut open, t, s, 1000, opener) {
                Change::None => {}
                Change::Announce => {
                    let o: &mut Open = open.as_mut().expect("announced an open highlight");
                    o.announced = true;
                    announced.push(t);
                }
                Change::Close(end) => {
                    let o = open.take().expect("closed an open highlight");
                    if (end - o.start) / 1000 >= i64::from(th.min_ticks) {
                        closed.push((o.start, end));
                    }
                }
            }
        }
        (announced, closed)
    }

    #[test]
    fn one_highlight_is_one_event() {
        // Opens at 2, dips below exit once at 5 (held), closes at 8-9 (end 8).
        let s = [0.1, 0.5, 0.7, 0.9, 0.5, 0.3, 0.8, 0.45, 0.2, 0.1, 0.1];
        let (announced, closed) = run(&s, TH);
        assert_eq!(announced, vec![4000]);
        assert_eq!(closed, vec![(2000, 8000)]);
    }

    #[test]
    fn short_blips_are_not_reported() {
        let s = [0.1, 0.9, 0.2, 0.1, 0.1, 0.95, 0.9, 0.1, 0.1, 0.1];
        let (announced, closed) = run(&s, TH);
        assert!(announced.is_empty());
        assert!(closed.is_empty(), "{closed:?}");
    }

    #[test]
    fn top_comments_rank_repeats_then_time() {
        let c: VecDeque<(i64, String)> = [
            (900, "too early"),
            (1000, "nice"),
            (1100, "WOW"),
            (1200, "wow"),
            (1300, "gg"),
            (1400, "gg"),
            (1500, "wow"),
            (6000, "too late"),
        ]
        .into_iter()
        .map(|(t, s)| (t, s.to_string()))
        .collect();
        assert_eq!(top_comments(&c, 1000, 6000, 2), vec!["WOW", "gg"]);
        assert_eq!(top_comments(&c, 1000, 6000, 9).len(), 3);
    }

    #[test]
    fn transcripts_around_the_peak() {
        let t: VecDeque<(i64, i64, String)> = [
            (0, 2_000, "long ago"),
            (8_000, 11_000, "here we go"),
            (11_000, 12_000, " what a shot "),
            (17_000, 18_000, "later"),
        ]
        .into_iter()
        .map(|(s, e, x)| (s, e, x.to_string()))
        .collect();
        assert_eq!(
            transcript_around(&t, 10_000, 1000),
            "here we go what a shot"
        );
    }

    proptest! {
        #[test]
        fn events_are_ordered_disjoint_and_follow_the_thresholds(
            scores in proptest::collection::vec(0.0f32..1.0, 0..200),
            hold in 1u32..4,
            min in 1u32..5,
        ) {
            let th = Threshold { enter: 0.7, exit: 0.5, hold_ticks: hold, min_ticks: min };
            let (announced, closed) = run(&scores, th);
            let mut last_end = i64::MIN;
            for &(start, end) in &closed {
                prop_assert!(start >= last_end, "overlap");
                prop_assert!((end - start) / 1000 >= i64::from(min));
                let (a, b) = ((start / 1000) as usize, (end / 1000) as usize);
                prop_assert!(scores[a] >= th.enter);
                // The `hold` ticks from the end are below exit.
                for &s in &scores[b..b + hold as usize] {
                    prop_assert!(s < th.exit);
                }
                // Inside, no run of `hold` ticks below exit.
                let mut run_below = 0;
                for &s in &scores[a..b] {
                    run_below = if s < th.exit { run_below + 1 } else { 0 };
                    prop_assert!(run_below < hold);
                }
                last_end = end;
            }
            // Every closed event was announced first (open record, then closed).
            for &(start, end) in &closed {
                prop_assert!(announced.iter().any(|&t| t >= start && t < end));
            }
        }
    }
}
