//! Gift labels: MMBee's training pairs, from what viewers do in rooms.
//!
//! Per room it keeps the viewers present and their session (since the ENTER that
//! started it): time present, likes, comments, gifts and their value, whether the
//! viewer followed the streamer. At every moment the engine scores a viewer —
//! the viewer enters (`trigger` 0), the room's content segment completes
//! (`Note::Content`, every viewer present, `trigger` 1), the viewer sends a gift
//! (`trigger` 2) — it snapshots the pair's features (layout `mmbee-pair-v1`, see
//! [`PAIR_WIDTH`]) with the room's current content segment, and once event time
//! has passed `t + horizon_ms` writes it as an `mmbee` training sample labelled
//! 1.0 when the viewer sent a gift in the room within `(t, t + horizon_ms]`.
//! Every gift is also written as an `mmbee-gifts` sample (the live history and
//! the gifting graph are built from them offline).
//!
//! Session counters include every action of the session at or before `t`,
//! the triggering one too.
//!
//! # State across restarts
//! With the room changelog (Kafka; see [`Operator::snapshot`]) each room
//! whose state changed gets a record of all of it: viewers and sessions,
//! pairs waiting for their label, the gifts they may need, the content
//! segment and the room's newest time. A restored room skips the replayed
//! actions its cut covers and the content notes of segments it has seen.
//! Without the changelog, pairs hold their trigger's input position until
//! written and sessions are not held: a restart replays pairs from their
//! trigger, with the counters of the actions replayed since, and loses the
//! pairs of viewers whose ENTER was before the replay.
//!
//! Not for: scoring (the MMBee scorer reads the same snapshot), content (see
//! [`super::mmbee_content`]), or users across rooms (user-keyed state).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use metrics::{counter, Counter};
use prost::Message;

use crate::config::MmbeeConfig;
use crate::metrics::{Stage, TRAINING_SAMPLES};
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, Event, GiftLabelsGift, GiftLabelsPair, GiftLabelsRecord,
    GiftLabelsViewer, TrainingSample, ViewerAction, SCHEMA_VERSION,
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

#[derive(Default)]
struct Room {
    log: Logged,
    streamer_id: Arc<str>,
    viewers: HashMap<Arc<str>, Session>,
    /// Pairs waiting for their label, in time order.
    pending: VecDeque<Pair>,
    /// Gifts (time, value) per user, kept while a pending pair may need them.
    gifts: HashMap<Arc<str>, VecDeque<(i64, u64)>>,
    /// Start of the room's current content segment.
    content_start_ms: Option<i64>,
    /// Newest event time seen.
    now: i64,
}

impl GiftLabels {
    /// The operator for one partition.
    pub fn new(cfg: Arc<MmbeeConfig>) -> Self {
        GiftLabels {
            cfg,
            rooms: HashMap::new(),
            pairs_written: counter!(TRAINING_SAMPLES, "task" => TASK),
            gifts_written: counter!(TRAINING_SAMPLES, "task" => GIFTS_TASK),
            stage: Stage::new(NAME),
            log: RoomLog::new(NAME),
        }
    }

    fn on_action(&mut self, a: &ViewerAction, pos: Position, ctx: &mut Context<'_>) {
        let Ok(kind) = ActionKind::try_from(a.kind) else {
            return;
        };
        if a.user_id.is_empty() || a.room_id.is_empty() {
            return;
        }
        let covered = match self.rooms.get(a.room_id.as_str()) {
            Some(r) => r.log.covers(pos),
            None => self.log.covers(pos),
        };
        if covered {
            // Replayed: the restored state has it.
            return;
        }
        if !self.rooms.contains_key(a.room_id.as_str()) {
            let log = self.log.entry(&a.room_id);
            let room = Room {
                log,
                ..Room::default()
            };
            self.rooms.insert(Arc::from(a.room_id.as_str()), room);
        }
        let max_viewers = self.cfg.max_viewers_per_room;
        let Some(room_id) = self
            .rooms
            .get_key_value(a.room_id.as_str())
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if room.streamer_id.is_empty() && !a.streamer_id.is_empty() {
            room.streamer_id = Arc::from(a.streamer_id.as_str());
        }
        room.log.folded(pos);
        let t = a.event_time_ms;
        room.now = room.now.max(t);
        let user: Arc<str> = match room.viewers.get_key_value(a.user_id.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(a.user_id.as_str()),
        };
        let content = room.content_start_ms.unwrap_or(-1);
        match kind {
            ActionKind::Enter => {
                if room.viewers.len() >= max_viewers && !room.viewers.contains_key(&user) {
                    self.stage.dropped("room_full", 1);
                    return;
                }
                let s = Session {
                    enter_ms: t,
                    ..Session::default()
                };
                room.viewers.insert(user.clone(), s);
                room.pending
                    .push_back(pair(user, t, &s, content, Trigger::Enter, pos));
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
                if self.cfg.samples {
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
                let keep = !room.pending.is_empty();
                if keep {
                    room.gifts
                        .entry(user.clone())
                        .or_default()
                        .push_back((t, a.gift_value));
                }
                if let Some(s) = room.viewers.get_mut(&user) {
                    s.gifts += 1;
                    s.gift_value = s.gift_value.saturating_add(a.gift_value);
                    let s = *s;
                    room.pending
                        .push_back(pair(user, t, &s, content, Trigger::Gift, pos));
                }
            }
            _ => {}
        }
    }

    /// Writes every pair whose horizon event time `now` has passed.
    fn resolve(&mut self, now: i64, ctx: &mut Context<'_>) {
        let horizon = self.cfg.horizon_ms;
        let mut gone = Vec::new();
        for (room_id, room) in &mut self.rooms {
            if room
                .log
                .restored()
                .and_then(|c| c.next_tick_ms)
                .is_some_and(|n| now <= n)
            {
                // A replay closing ticks the restored state had closed.
                continue;
            }
            // By closed ticks only: no record of an earlier time can come.
            while room.pending.front().is_some_and(|p| p.t + horizon <= now) {
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
                        tick_end_ms: None,
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
            if room.pending.is_empty() && room.viewers.is_empty() {
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
    }
}

/// A room as its changelog record has it (the record covers what it holds:
/// nothing is held for it). Pairs of an unknown trigger or row width are
/// left out.
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
    Room {
        log: Logged::default(),
        streamer_id: Arc::from(r.streamer_id),
        viewers,
        pending,
        gifts,
        content_start_ms: r.has_content.then_some(r.content_start_ms),
        now: r.now_ms,
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
        if let Event::Action(a) = event {
            self.on_action(a, pos, ctx);
        }
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        let Note::Content {
            room_id,
            streamer_id,
            start_ms,
            at_ms,
            ..
        } = note
        else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let seen = match room.content_start_ms {
            Some(s) => s >= *start_ms,
            // A room with no segment yet that was restored: the segment
            // may have completed before the room's record was taken, when
            // the room was not there (dropped, and made again by a later
            // action). Segments completed by the cut are taken as such.
            None => room
                .log
                .restored()
                .and_then(|c| c.next_tick_ms)
                .is_some_and(|n| *at_ms <= n),
        };
        if seen {
            // A segment seen already (sent again by a replay).
            return;
        }
        room.log.changed();
        if room.streamer_id.is_empty() {
            room.streamer_id = streamer_id.clone();
        }
        room.content_start_ms = Some(*start_ms);
        // Scored when the content is there: at the room's newest time.
        let t = room.now.max(*at_ms);
        let mut users: Vec<(&Arc<str>, &Session)> = room.viewers.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        let new: Vec<Pair> = users
            .into_iter()
            .map(|(u, s)| Pair {
                user: u.clone(),
                t,
                row: s.row(t),
                content_start_ms: *start_ms,
                trigger: Trigger::Content,
                holds: Holds::default(),
            })
            .collect();
        // Keep the queue in time order (a content note can trail the actions).
        for p in new {
            let i = room.pending.partition_point(|q| q.t <= p.t);
            room.pending.insert(i, p);
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.resolve(tick_start_ms + ctx.tick_ms(), ctx);
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
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
        self.log.clear();
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
    use crate::schema::InputKind;
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

    /// [`replay_actions`], every third tick completing a content segment
    /// in the rooms with an action in it (a note before the tick closes).
    fn replay(
        op: &mut GiftLabels,
        acts: &[Act],
        from: i64,
        at: impl FnMut(&mut GiftLabels, usize, &Cut, &mut Context<'_>),
    ) -> Vec<(String, Vec<u8>)> {
        let notes = |op: &mut GiftLabels, nt: i64, rooms: &BTreeSet<u8>, ctx: &mut Context<'_>| {
            if nt % 3000 != 0 {
                return;
            }
            for &room in rooms {
                let note = Note::Content {
                    room_id: Arc::from(format!("r{room}").as_str()),
                    streamer_id: Arc::from(format!("s{room}").as_str()),
                    start_ms: nt - 3000,
                    end_ms: nt,
                    at_ms: nt + 1000,
                    content: Arc::new(crate::operators::mmbee_content::content_row(&[], &[], &[])),
                    holds: Holds::default(),
                };
                op.on_note(&note, ctx);
            }
        };
        replay_actions(op, acts, from, 10, notes, at)
    }

    proptest::proptest! {
        /// A gift-label state restored from its changelog records, fed a
        /// replay from anywhere at or before the cut (content notes of
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
            let cfg = Arc::new(MmbeeConfig {
                enabled: true,
                horizon_ms: 3_000,
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
        op.on_note(
            &Note::Content {
                room_id: Arc::from("r"),
                streamer_id: Arc::from("s"),
                start_ms: 0,
                end_ms: 10_000,
                at_ms: 13_000,
                content: Arc::new(crate::operators::mmbee_content::content_row(&[], &[], &[])),
                holds: Holds::default(),
            },
            &mut ctx,
        );
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
