//! Gift labels: MMBee's training pairs, from what viewers do in rooms.
//!
//! Per room it keeps the viewers present and their session (since the ENTER that
//! started it): time present, likes, comments, gifts and their value, whether the
//! viewer followed the streamer. At every moment the engine scores a viewer —
//! the viewer enters (`trigger` 0), the room's content segment completes
//! (`trigger` 1, every viewer present), the viewer sends a gift (`trigger` 2) —
//! it snapshots the pair's features (layout `mmbee-pair-v1`, see
//! [`PAIR_WIDTH`]) with the room's current content segment, and once event time
//! has passed `t + horizon_ms` writes it as an `mmbee` training sample labelled
//! 1.0 when the viewer sent a gift in the room within `(t, t + horizon_ms]`.
//! Every gift is also written as an `mmbee-gifts` sample (the live history and
//! the gifting graph are built from them offline) as it is read.
//!
//! Everything is decided in event time, so a replay writes the same pairs
//! however its records interleaved with the model work: an action waits for
//! its tick to close, and the tick's actions are then applied in event-time
//! order (ties by input offset); an action whose tick had closed is applied
//! as it is read. A segment `[s, s + segment_ms)` completes at
//! `s + segment_ms + finalize_delay_ms` — the moment the MMBee content
//! operator's row of it is final ([`Note::Content`]'s `at_ms`) — when the
//! room streamed in it (a media or comment record of the room in it, read
//! before that moment's tick closed): the viewers present then get their
//! `trigger` 1 pair, counting the actions at or before that moment, and the
//! segment is the room's content for every pair after it. Session counters
//! include every action of the session at or before `t`, the triggering one
//! too. A segment can count as streamed here and have no `mmbee-content`
//! sample (its features never came): training finds no content for it.
//!
//! # State across restarts
//! With the room changelog (Kafka; see [`Operator::snapshot`]) each room
//! whose state changed gets a record of all of it: viewers and sessions,
//! actions waiting for their tick, pairs waiting for their label, the gifts
//! they may need, the segments it streamed in and the content segment. A
//! restored room skips the replayed records its cut covers and the ticks a
//! replay closes again. Without the changelog, pairs and waiting actions
//! hold their input position until written and sessions are not held: a
//! restart replays pairs from their trigger, with the counters of the
//! actions replayed since, and loses the pairs of viewers whose ENTER was
//! before the replay.
//!
//! Not for: scoring (the MMBee scorer reads the same snapshot), content rows
//! (see [`super::mmbee_content`]), or users across rooms (user-keyed state).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use metrics::{counter, Counter};
use prost::Message;

use crate::config::MmbeeConfig;
use crate::metrics::{Stage, TRAINING_SAMPLES};
use crate::runtime::{Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, Event, GiftLabelsAction, GiftLabelsGift, GiftLabelsPair,
    GiftLabelsRecord, GiftLabelsViewer, InputKind, TrainingSample, ViewerAction, SCHEMA_VERSION,
};
use crate::state::room_log::{Logged, RoomLog};
use crate::state::Cut;

/// Task name of the pair samples.
pub const TASK: &str = "mmbee";
/// Task name of the gift samples.
pub const GIFTS_TASK: &str = "mmbee-gifts";
/// Layout of a pair's features: present_ms, session likes, comments, gifts,
/// gift value, followed (0/1).
pub const LAYOUT: &str = "mmbee-pair-v1";
/// Width of [`LAYOUT`].
pub const PAIR_WIDTH: usize = 6;
/// Layout of a gift sample's features: its value.
pub const GIFTS_LAYOUT: &str = "gift-v1";

/// Why a pair was snapshotted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Trigger {
    /// The viewer entered.
    Enter = 0,
    /// The room's content segment completed.
    Content = 1,
    /// The viewer sent a gift.
    Gift = 2,
}

/// The labels operator for one partition.
pub struct GiftLabels {
    cfg: Arc<MmbeeConfig>,
    rooms: HashMap<Arc<str>, Room>,
    /// End of the last tick closed (None: none yet).
    closed_through: Option<i64>,
    pairs_written: Counter,
    gifts_written: Counter,
    stage: Stage,
    /// The rooms' changelog: once on, only what changed since a room's
    /// last record is held.
    log: RoomLog,
}

/// Name of the operator (metrics label and changelog key prefix).
const NAME: &str = "gift_labels";

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Session {
    enter_ms: i64,
    likes: u32,
    comments: u32,
    gifts: u32,
    gift_value: u64,
    followed: bool,
}

impl Session {
    fn row(&self, t: i64) -> [f32; PAIR_WIDTH] {
        [
            (t - self.enter_ms).max(0) as f32,
            self.likes as f32,
            self.comments as f32,
            self.gifts as f32,
            self.gift_value as f32,
            f32::from(u8::from(self.followed)),
        ]
    }
}

struct Pair {
    user: Arc<str>,
    t: i64,
    row: [f32; PAIR_WIDTH],
    content_start_ms: i64,
    trigger: Trigger,
    holds: Holds,
}

/// An action read but not applied yet: its tick is open.
struct Waiting {
    user: Arc<str>,
    t: i64,
    kind: ActionKind,
    value: u64,
    pos: Position,
}

#[derive(Default)]
struct Room {
    log: Logged,
    streamer_id: Arc<str>,
    viewers: HashMap<Arc<str>, Session>,
    /// Actions of ticks still open, in the order read.
    waiting: Vec<Waiting>,
    /// Pairs waiting for their label, in time order.
    pending: VecDeque<Pair>,
    /// Gifts (time, value) per user, kept while a pending pair may need them.
    gifts: HashMap<Arc<str>, VecDeque<(i64, u64)>>,
    /// Starts of the segments the room streamed in whose content moment
    /// has not passed.
    live: BTreeSet<i64>,
    /// Start of the room's current content segment.
    content_start_ms: Option<i64>,
    /// Newest event time seen.
    now: i64,
    /// End of the last tick closed for the room: actions before it are
    /// applied as they are read.
    ticked: i64,
}

impl Room {
    fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.viewers.is_empty()
            && self.waiting.is_empty()
            && self.live.is_empty()
    }
}

impl GiftLabels {
    /// The operator for one partition.
    pub fn new(cfg: Arc<MmbeeConfig>) -> Self {
        GiftLabels {
            cfg,
            rooms: HashMap::new(),
            closed_through: None,
            pairs_written: counter!(TRAINING_SAMPLES, "task" => TASK),
            gifts_written: counter!(TRAINING_SAMPLES, "task" => GIFTS_TASK),
            stage: Stage::new(NAME),
            log: RoomLog::new(NAME),
        }
    }

    /// End of the last tick closed, by this task or (restored) before it.
    fn closed_through(&self) -> Option<i64> {
        let restored = self.log.restored().and_then(|c| c.next_tick_ms);
        match (self.closed_through, restored) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The id of the room a record at `pos` of time `t` goes to, the room
    /// made when new; None when the restored state covers the record.
    fn room_for(&mut self, room_id: &str, pos: Position, t: i64, tick_ms: i64) -> Option<Arc<str>> {
        let covered = match self.rooms.get(room_id) {
            Some(r) => r.log.covers(pos),
            None => self.log.covers(pos),
        };
        if covered {
            // Replayed: the restored state has it.
            return None;
        }
        if let Some((k, _)) = self.rooms.get_key_value(room_id) {
            return Some(k.clone());
        }
        let ticked = self
            .closed_through()
            .unwrap_or_else(|| t.div_euclid(tick_ms) * tick_ms);
        let room = Room {
            log: self.log.entry(room_id),
            ticked,
            ..Room::default()
        };
        let k: Arc<str> = Arc::from(room_id);
        self.rooms.insert(k.clone(), room);
        Some(k)
    }

    fn on_action(&mut self, a: &ViewerAction, pos: Position, ctx: &mut Context<'_>) {
        let Ok(kind) = ActionKind::try_from(a.kind) else {
            return;
        };
        if a.user_id.is_empty() || a.room_id.is_empty() {
            return;
        }
        let samples = self.cfg.samples;
        let t = a.event_time_ms;
        let Some(room_id) = self.room_for(&a.room_id, pos, t, ctx.tick_ms()) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if room.streamer_id.is_empty() && !a.streamer_id.is_empty() {
            room.streamer_id = Arc::from(a.streamer_id.as_str());
        }
        room.log.folded(pos);
        room.now = room.now.max(t);
        if kind == ActionKind::Gift && samples {
            let g = gift_sample(&room_id, &room.streamer_id, a);
            self.gifts_written.increment(1);
            ctx.emit(Output {
                topic: OutputTopic::TrainingSamples,
                key: a.room_id.as_bytes().to_vec(),
                id: g.id.clone(),
                payload: g.encode_to_vec(),
                headers: Vec::new(),
                model_version: None,
                tick_end_ms: None,
                depends_on: Holds::default(),
            });
        }
        let user: Arc<str> = match room.viewers.get_key_value(a.user_id.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(a.user_id.as_str()),
        };
        let w = Waiting {
            user,
            t,
            kind,
            value: a.gift_value,
            pos,
        };
        if t < room.ticked {
            // Its tick has closed: applied now, in the order read.
            apply(room, w, self.cfg.max_viewers_per_room, &self.stage);
        } else {
            room.waiting.push(w);
        }
    }

    /// A media or comment record of a room: the room streamed in its segment.
    fn on_stream(&mut self, room_id: &str, t: i64, pos: Position, tick_ms: i64) {
        let (len, delay) = (self.cfg.segment_ms, self.cfg.finalize_delay_ms);
        let s = t.div_euclid(len) * len;
        let known = match self.rooms.get(room_id) {
            Some(r) => r.live.contains(&s) || s + len + delay < r.ticked,
            None => false,
        };
        if known {
            return;
        }
        let Some(room) = self
            .room_for(room_id, pos, t, tick_ms)
            .and_then(|k| self.rooms.get_mut(&k))
        else {
            return;
        };
        if s + len + delay < room.ticked {
            // Its moment has passed.
            return;
        }
        room.live.insert(s);
        room.log.folded(pos);
    }

    /// Closes the tick ending `end` for every room: applies its actions in
    /// event time, completes the segments whose moment is in it, and writes
    /// every pair whose horizon has passed.
    fn close(&mut self, end: i64, ctx: &mut Context<'_>) {
        let (len, delay) = (self.cfg.segment_ms, self.cfg.finalize_delay_ms);
        let max_viewers = self.cfg.max_viewers_per_room;
        let horizon = self.cfg.horizon_ms;
        self.closed_through = Some(self.closed_through.map_or(end, |c| c.max(end)));
        let mut gone = Vec::new();
        for (room_id, room) in &mut self.rooms {
            if end <= room.ticked {
                // A replay closing a tick the restored state had closed.
                continue;
            }
            room.ticked = end;
            let (mut due, later): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut room.waiting)
                .into_iter()
                .partition(|w| w.t < end);
            room.waiting = later;
            due.sort_by_key(|w| (w.t, w.pos.offset));
            let moments: Vec<i64> = room
                .live
                .iter()
                .map(|s| s + len + delay)
                .take_while(|&m| m < end)
                .collect();
            if !due.is_empty() || !moments.is_empty() {
                room.log.changed();
            }
            let mut due = due.into_iter().peekable();
            for m in moments {
                while let Some(w) = due.next_if(|w| w.t <= m) {
                    apply(room, w, max_viewers, &self.stage);
                }
                let start = m - len - delay;
                room.live.remove(&start);
                content(room, start, m);
            }
            for w in due {
                apply(room, w, max_viewers, &self.stage);
            }
            // By closed ticks only: no action of an earlier time can come.
            while room.pending.front().is_some_and(|p| p.t + horizon <= end) {
                let Some(p) = room.pending.pop_front() else {
                    break;
                };
                room.log.changed();
                let (mut n, mut value) = (0u32, 0u64);
                if let Some(g) = room.gifts.get(&p.user) {
                    for &(t, v) in g {
                        if t > p.t && t <= p.t + horizon {
                            n += 1;
                            value = value.saturating_add(v);
                        }
                    }
                }
                if self.cfg.samples {
                    let s = pair_sample(room_id, &room.streamer_id, &p, n > 0, value, horizon);
                    self.pairs_written.increment(1);
                    ctx.emit(Output {
                        topic: OutputTopic::TrainingSamples,
                        key: room_id.as_bytes().to_vec(),
                        id: s.id.clone(),
                        payload: s.encode_to_vec(),
                        headers: Vec::new(),
                        model_version: None,
                        tick_end_ms: Some(end),
                        depends_on: p.holds,
                    });
                }
            }
            // Gifts older than every pending pair can no longer label one.
            let oldest = room.pending.front().map_or(i64::MAX, |p| p.t);
            let mut forgot = false;
            room.gifts.retain(|_, g| {
                while g.front().is_some_and(|&(t, _)| t <= oldest) {
                    g.pop_front();
                    forgot = true;
                }
                !g.is_empty()
            });
            if forgot {
                room.log.changed();
            }
            if room.idle() {
                gone.push(room_id.clone());
            }
        }
        for id in gone {
            if let Some(room) = self.rooms.remove(&id) {
                self.log.drop_room(&id, room.log);
            }
        }
    }
}

/// Applies one action to its room's sessions (and pairs).
fn apply(room: &mut Room, w: Waiting, max_viewers: usize, stage: &Stage) {
    let Waiting {
        user,
        t,
        kind,
        value,
        pos,
    } = w;
    let content = room.content_start_ms.unwrap_or(-1);
    match kind {
        ActionKind::Enter => {
            if room.viewers.len() >= max_viewers && !room.viewers.contains_key(&user) {
                stage.dropped("room_full", 1);
                return;
            }
            let s = Session {
                enter_ms: t,
                ..Session::default()
            };
            room.viewers.insert(user.clone(), s);
            push_pending(room, pair(user, t, &s, content, Trigger::Enter, pos));
        }
        ActionKind::Leave => {
            room.viewers.remove(&user);
        }
        ActionKind::Like | ActionKind::Comment | ActionKind::Follow => {
            if let Some(s) = room.viewers.get_mut(&user) {
                match kind {
                    ActionKind::Like => s.likes += 1,
                    ActionKind::Comment => s.comments += 1,
                    _ => s.followed = true,
                }
            }
        }
        ActionKind::Gift => {
            if !room.pending.is_empty() {
                room.gifts
                    .entry(user.clone())
                    .or_default()
                    .push_back((t, value));
            }
            if let Some(s) = room.viewers.get_mut(&user) {
                s.gifts += 1;
                s.gift_value = s.gift_value.saturating_add(value);
                let s = *s;
                push_pending(room, pair(user, t, &s, content, Trigger::Gift, pos));
            }
        }
        _ => {}
    }
}

/// The room's segment from `start` completed at `at`: it is the room's
/// content from then on, and every viewer present gets a pair.
fn content(room: &mut Room, start: i64, at: i64) {
    room.content_start_ms = Some(start);
    let mut users: Vec<(&Arc<str>, &Session)> = room.viewers.iter().collect();
    users.sort_by(|a, b| a.0.cmp(b.0));
    let new: Vec<Pair> = users
        .into_iter()
        .map(|(u, s)| Pair {
            user: u.clone(),
            t: at,
            row: s.row(at),
            content_start_ms: start,
            trigger: Trigger::Content,
            holds: Holds::default(),
        })
        .collect();
    for p in new {
        push_pending(room, p);
    }
}

/// Queues a pair, keeping the queue in time order (a late action's pair
/// can be older than the newest).
fn push_pending(room: &mut Room, p: Pair) {
    let i = room.pending.partition_point(|q| q.t <= p.t);
    room.pending.insert(i, p);
}

/// The changelog record of a room's state, taken at `cut`.
fn room_record(room: &Room, cut: &Cut) -> GiftLabelsRecord {
    let mut viewers: Vec<GiftLabelsViewer> = room
        .viewers
        .iter()
        .map(|(u, s)| GiftLabelsViewer {
            user_id: u.to_string(),
            enter_ms: s.enter_ms,
            likes: s.likes,
            comments: s.comments,
            gifts: s.gifts,
            gift_value: s.gift_value,
            followed: s.followed,
        })
        .collect();
    viewers.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let mut gifts: Vec<GiftLabelsGift> = room
        .gifts
        .iter()
        .flat_map(|(u, g)| {
            g.iter().map(|&(t_ms, value)| GiftLabelsGift {
                user_id: u.to_string(),
                t_ms,
                value,
            })
        })
        .collect();
    gifts.sort_by(|a, b| (&a.user_id, a.t_ms).cmp(&(&b.user_id, b.t_ms)));
    GiftLabelsRecord {
        schema_version: SCHEMA_VERSION,
        cut: Some(cut.to_record()),
        streamer_id: room.streamer_id.to_string(),
        viewers,
        pending: room
            .pending
            .iter()
            .map(|p| GiftLabelsPair {
                user_id: p.user.to_string(),
                t_ms: p.t,
                row: p.row.to_vec(),
                content_start_ms: p.content_start_ms,
                trigger: u32::from(p.trigger as u8),
            })
            .collect(),
        gifts,
        content_start_ms: room.content_start_ms.unwrap_or(0),
        has_content: room.content_start_ms.is_some(),
        now_ms: room.now,
        waiting: room
            .waiting
            .iter()
            .map(|w| GiftLabelsAction {
                user_id: w.user.to_string(),
                t_ms: w.t,
                kind: w.kind as i32,
                value: w.value,
                offset: w.pos.offset,
            })
            .collect(),
        live_segments: room.live.iter().copied().collect(),
        ticked_ms: room.ticked,
    }
}

/// A room as its changelog record has it (the record covers what it holds:
/// nothing is held for it). Pairs of an unknown trigger or row width, and
/// waiting actions of an unknown kind, are left out.
fn room_from(r: GiftLabelsRecord) -> Room {
    let mut users: HashMap<Arc<str>, ()> = HashMap::new();
    let mut user = |u: String| -> Arc<str> {
        match users.get_key_value(u.as_str()) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(u);
                users.insert(k.clone(), ());
                k
            }
        }
    };
    let viewers = r
        .viewers
        .into_iter()
        .map(|v| {
            let s = Session {
                enter_ms: v.enter_ms,
                likes: v.likes,
                comments: v.comments,
                gifts: v.gifts,
                gift_value: v.gift_value,
                followed: v.followed,
            };
            (user(v.user_id), s)
        })
        .collect();
    let pending = r
        .pending
        .into_iter()
        .filter_map(|p| {
            let trigger = match p.trigger {
                0 => Trigger::Enter,
                1 => Trigger::Content,
                2 => Trigger::Gift,
                _ => return None,
            };
            Some(Pair {
                user: user(p.user_id),
                t: p.t_ms,
                row: p.row.try_into().ok()?,
                content_start_ms: p.content_start_ms,
                trigger,
                holds: Holds::default(),
            })
        })
        .collect();
    let mut gifts: HashMap<Arc<str>, VecDeque<(i64, u64)>> = HashMap::new();
    for g in r.gifts {
        gifts
            .entry(user(g.user_id))
            .or_default()
            .push_back((g.t_ms, g.value));
    }
    let waiting = r
        .waiting
        .into_iter()
        .filter_map(|w| {
            Some(Waiting {
                kind: ActionKind::try_from(w.kind).ok()?,
                user: user(w.user_id),
                t: w.t_ms,
                value: w.value,
                pos: Position {
                    kind: InputKind::Actions,
                    offset: w.offset,
                },
            })
        })
        .collect();
    Room {
        log: Logged::default(),
        streamer_id: Arc::from(r.streamer_id),
        viewers,
        waiting,
        pending,
        gifts,
        live: r.live_segments.into_iter().collect(),
        content_start_ms: r.has_content.then_some(r.content_start_ms),
        now: r.now_ms,
        ticked: r.ticked_ms,
    }
}

fn pair(
    user: Arc<str>,
    t: i64,
    s: &Session,
    content: i64,
    trigger: Trigger,
    pos: Position,
) -> Pair {
    let mut holds = Holds::default();
    holds.hold(pos);
    Pair {
        user,
        t,
        row: s.row(t),
        content_start_ms: content,
        trigger,
        holds,
    }
}

fn pair_sample(
    room_id: &str,
    streamer_id: &str,
    p: &Pair,
    positive: bool,
    gift_value: u64,
    horizon: i64,
) -> TrainingSample {
    let mut values = std::collections::BTreeMap::new();
    values.insert("gift_value".to_owned(), gift_value as f64);
    values.insert("horizon_ms".to_owned(), horizon as f64);
    values.insert("content_start_ms".to_owned(), p.content_start_ms as f64);
    values.insert("trigger".to_owned(), f64::from(p.trigger as u8));
    TrainingSample {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"training-samples",
            TASK.as_bytes(),
            room_id.as_bytes(),
            p.user.as_bytes(),
            &p.t.to_le_bytes(),
            &[p.trigger as u8],
        ]),
        task: TASK.into(),
        room_id: room_id.into(),
        user_id: p.user.to_string(),
        event_time_ms: p.t,
        features: p.row.to_vec(),
        label: if positive { 1.0 } else { 0.0 },
        streamer_id: streamer_id.into(),
        feature_layout: LAYOUT.into(),
        values,
        ..TrainingSample::default()
    }
}

fn gift_sample(room_id: &str, streamer_id: &str, a: &ViewerAction) -> TrainingSample {
    let mut values = std::collections::BTreeMap::new();
    values.insert("t_ms".to_owned(), a.event_time_ms as f64);
    values.insert("value".to_owned(), a.gift_value as f64);
    TrainingSample {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"training-samples",
            GIFTS_TASK.as_bytes(),
            room_id.as_bytes(),
            a.user_id.as_bytes(),
            &a.event_time_ms.to_le_bytes(),
            a.gift_id.as_bytes(),
        ]),
        task: GIFTS_TASK.into(),
        room_id: room_id.into(),
        user_id: a.user_id.clone(),
        event_time_ms: a.event_time_ms,
        features: vec![a.gift_value as f32],
        label: a.gift_value as f32,
        streamer_id: if a.streamer_id.is_empty() {
            streamer_id.into()
        } else {
            a.streamer_id.clone()
        },
        feature_layout: GIFTS_LAYOUT.into(),
        values,
        ..TrainingSample::default()
    }
}

impl Operator for GiftLabels {
    fn name(&self) -> &'static str {
        NAME
    }

    fn on_record(&mut self, event: &Event, pos: Position, _late: bool, ctx: &mut Context<'_>) {
        match event {
            Event::Action(a) => self.on_action(a, pos, ctx),
            Event::Video(_) | Event::Audio(_) | Event::Comment(_) => {
                let room = event.room_id();
                if !room.is_empty() {
                    self.on_stream(room, event.event_time_ms(), pos, ctx.tick_ms());
                }
            }
            Event::ShortVideo(_) => {}
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.close(tick_start_ms + ctx.tick_ms(), ctx);
    }

    fn holds(&self, holds: &mut Holds) {
        if self.log.on() {
            // Everything before each room's last record is in it.
            self.log.holds(self.rooms.values().map(|r| &r.log), holds);
            return;
        }
        for room in self.rooms.values() {
            for p in &room.pending {
                holds.merge(&p.holds);
            }
            for w in &room.waiting {
                holds.hold(w.pos);
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
        self.log.clear();
        self.closed_through = None;
    }

    fn resumed_at(&self) -> Option<Cut> {
        self.log.restored()
    }

    fn snapshot(&mut self, cut: &Cut, ctx: &mut Context<'_>) {
        let partition = GiftLabelsRecord {
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
        let restored = self
            .log
            .restore(key, value, |r: &GiftLabelsRecord| r.cut.as_ref(), rooms);
        if let Some((room_id, record, log)) = restored {
            let mut room = room_from(record);
            room.log = log;
            self.rooms.insert(Arc::from(room_id), room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Comment;
    use crate::state::room_log::testing::{replay_actions, restore, take_snapshot, Act};
    use std::collections::BTreeSet;

    fn act(t: i64, user: &str, kind: ActionKind, value: u64) -> Event {
        Event::Action(ViewerAction {
            room_id: "r".into(),
            user_id: user.into(),
            streamer_id: "s".into(),
            event_time_ms: t,
            kind: kind as i32,
            gift_value: value,
            ..ViewerAction::default()
        })
    }

    fn decode(out: &[Output], task: &str) -> Vec<TrainingSample> {
        out.iter()
            .map(|o| TrainingSample::decode(&o.payload[..]).unwrap())
            .filter(|s| s.task == task)
            .collect()
    }

    /// [`replay_actions`], each room streaming (a comment at the tick's
    /// start) in the ticks it has an action in, read before the tick closes.
    fn replay(
        op: &mut GiftLabels,
        acts: &[Act],
        from: i64,
        at: impl FnMut(&mut GiftLabels, usize, &Cut, &mut Context<'_>),
    ) -> Vec<(String, Vec<u8>)> {
        let notes = |op: &mut GiftLabels, nt: i64, rooms: &BTreeSet<u8>, ctx: &mut Context<'_>| {
            for &room in rooms {
                let c = Event::Comment(Comment {
                    room_id: format!("r{room}"),
                    event_time_ms: nt,
                    ..Comment::default()
                });
                let pos = Position {
                    kind: InputKind::Comments,
                    offset: nt / 1000,
                };
                op.on_record(&c, pos, false, ctx);
            }
        };
        replay_actions(op, acts, from, 10, notes, at)
    }

    proptest::proptest! {
        /// A gift-label state restored from its changelog records, fed a
        /// replay from anywhere at or before the cut (stream records of
        /// replayed ticks included), writes exactly the samples the
        /// uninterrupted run wrote after the cut, byte for byte, and none
        /// it wrote before; once the records are written nothing is held.
        #[test]
        fn restored_state_replays_exactly(
            raw in proptest::collection::vec((0i64..700, 0u8..3, 0u8..6, 0u8..6), 5..120),
            at_frac in 0.0f64..1.0,
            // A third of the cases replay from the cut itself.
            from_frac in 0.0f64..1.5,
        ) {
            let kinds = [
                ActionKind::Enter,
                ActionKind::Leave,
                ActionKind::Like,
                ActionKind::Comment,
                ActionKind::Follow,
                ActionKind::Gift,
            ];
            let mut t = 1_000_000;
            let acts: Vec<_> = raw
                .iter()
                .map(|&(gap, room, user, what)| {
                    t += gap;
                    (t, room, user, kinds[what as usize])
                })
                .collect();
            // Content moments in the middle of a tick.
            let cfg = Arc::new(MmbeeConfig {
                enabled: true,
                horizon_ms: 3_000,
                segment_ms: 2_000,
                finalize_delay_ms: 1_500,
                ..MmbeeConfig::default()
            });
            let at = ((acts.len() as f64) * at_frac) as usize;
            let mut changelog: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut cut_taken = Cut::default();
            let mut written_before = 0;
            let mut a = GiftLabels::new(cfg.clone());
            let whole = replay(&mut a, &acts, 0, |op, i, cut, ctx| {
                if i == at {
                    written_before = ctx
                        .outputs
                        .iter()
                        .filter(|o| o.topic == OutputTopic::TrainingSamples)
                        .count();
                    changelog = take_snapshot(op, cut, ctx);
                    cut_taken = *cut;
                }
            });
            let mut b = GiftLabels::new(cfg);
            restore(&mut b, changelog);
            let from = ((cut_taken.processed[InputKind::Actions.index()].unwrap_or(0) as f64)
                * from_frac.min(1.0)) as i64;
            let mut again = replay(&mut b, &acts, from, |_, _, _, _| {});
            let mut after = whole[written_before..].to_vec();
            let brief = |v: &[(String, Vec<u8>)]| -> Vec<(String, String, i64, Vec<f32>, f32)> {
                let mut b: Vec<_> = v
                    .iter()
                    .map(|(_, p)| {
                        let s = TrainingSample::decode(&p[..]).expect("decodes");
                        (s.task, s.user_id, s.event_time_ms, s.features, s.label)
                    })
                    .collect();
                b.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
                b
            };
            let (x, y) = (brief(&again), brief(&after));
            let only = |a: &[(String, String, i64, Vec<f32>, f32)], b: &[(String, String, i64, Vec<f32>, f32)]| {
                let mut b = b.to_vec();
                let mut left = Vec::new();
                for e in a {
                    match b.iter().position(|f| f == e) {
                        Some(i) => {
                            b.remove(i);
                        }
                        None => left.push(e.clone()),
                    }
                }
                left
            };
            proptest::prop_assert!(x == y, "replay only {:?}; clean only {:?}", only(&x, &y), only(&y, &x));
            again.sort();
            after.sort();
            proptest::prop_assert!(again == after, "same samples, other bytes");
        }
    }

    #[test]
    fn pairs_are_labelled_by_gifts_within_the_horizon() {
        let cfg = Arc::new(MmbeeConfig {
            enabled: true,
            horizon_ms: 30_000,
            ..MmbeeConfig::default()
        });
        let mut op = GiftLabels::new(cfg);
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        let pos = |o| Position {
            kind: InputKind::Actions,
            offset: o,
        };
        op.on_record(
            &act(1_000, "a", ActionKind::Enter, 0),
            pos(1),
            false,
            &mut ctx,
        );
        op.on_record(
            &act(2_000, "b", ActionKind::Enter, 0),
            pos(2),
            false,
            &mut ctx,
        );
        op.on_record(
            &act(3_000, "a", ActionKind::Like, 0),
            pos(3),
            false,
            &mut ctx,
        );
        // The room streams in its first segment: complete at 13 s.
        let comment = Event::Comment(Comment {
            room_id: "r".into(),
            event_time_ms: 5_000,
            ..Comment::default()
        });
        let at = Position {
            kind: InputKind::Comments,
            offset: 0,
        };
        op.on_record(&comment, at, false, &mut ctx);
        op.on_record(
            &act(20_000, "a", ActionKind::Gift, 52),
            pos(4),
            false,
            &mut ctx,
        );
        op.on_record(
            &act(25_000, "b", ActionKind::Leave, 0),
            pos(5),
            false,
            &mut ctx,
        );
        // The oldest pair (enter at 1 s) holds offset 1 until written.
        let mut h = Holds::default();
        op.holds(&mut h);
        assert_eq!(h.get(InputKind::Actions), Some(1));
        op.on_tick(30_000, &mut ctx);
        op.on_tick(60_000, &mut ctx);
        drop(ctx);
        let gifts = decode(&out, GIFTS_TASK);
        assert_eq!(gifts.len(), 1);
        assert_eq!(
            (gifts[0].values["t_ms"], gifts[0].values["value"]),
            (20_000.0, 52.0)
        );
        let pairs = decode(&out, TASK);
        let summary: Vec<(&str, i64, u8, f32, f64)> = pairs
            .iter()
            .map(|p| {
                (
                    p.user_id.as_str(),
                    p.event_time_ms,
                    p.values["trigger"] as u8,
                    p.label,
                    p.values["content_start_ms"],
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", 1_000, 0, 1.0, -1.0),
                ("b", 2_000, 0, 0.0, -1.0),
                ("a", 13_000, 1, 1.0, 0.0),
                ("b", 13_000, 1, 0.0, 0.0),
                ("a", 20_000, 2, 0.0, 0.0),
            ]
        );
        // a's session at the content pair: 12 s present, one like.
        assert_eq!(pairs[2].features, vec![12_000.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // The gift's own pair counts the gift.
        assert_eq!(pairs[4].features, vec![19_000.0, 1.0, 0.0, 1.0, 52.0, 0.0]);
        assert_eq!(pairs[2].values["gift_value"], 52.0);
        assert!(op.rooms.is_empty() || op.rooms["r"].pending.is_empty());
    }
}
