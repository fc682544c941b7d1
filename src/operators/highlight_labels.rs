//! Highlight labels: the weak supervision of the highlight model, from what
//! viewers do. Per room and tick, the long-view-through rate (LVTR): of the
//! feed impressions of the room that started in the tick, the share that
//! became a long view. Joined, once it is known, with the tick's features
//! and written as a `highlight` training sample to `training-samples`.
//!
//! # Definitions
//! * An IMPRESSION of user u at time t starts an impression in tick
//!   `floor(t / tick_ms)`. It *led to a view* when u's next ENTER into the
//!   room comes within `enter_window_ms` after it (a newer impression of u
//!   replaces an unanswered one; an ENTER with no impression before it came
//!   from elsewhere and is not counted).
//! * That view is a *long view* when u is still in the room `long_view_ms`
//!   after entering (no LEAVE before then).
//! * The label of tick k is final once event time has passed
//!   `end(k) + enter_window_ms + long_view_ms`: every impression of the tick
//!   has then either led to no view, or to a view that left early, or to a
//!   long view. LVTR = long views / impressions (0 with no impression: the
//!   sample is context for the model's look-back, not a label).
//! * A sample is written when its label is final and the features operator
//!   has written the tick's features (ticks without a features record are
//!   dropped, counted as `no_features`). A room's samples are written in
//!   tick order.
//!
//! Labels lag their ticks by about `enter_window_ms + long_view_ms`; the
//! operator holds the input positions of unwritten ticks (or has them in
//! its changelog records), so a restart recomputes them instead of losing
//! them. A sample is an output of the tick whose close wrote it (its
//! `tick_end_ms`), not of the tick it labels: the emitted-through time is
//! not held back by labels still waiting.
//! When a finite run ends (the demo), its last ticks are left unlabelled and
//! are not written. On Kafka a quiet room's event time still advances with
//! its partition's watermark, so the last ticks of a broadcast are labelled
//! with views that the broadcast's end cut short.
//!
//! # State on the changelog
//! With the room changelog (Kafka; see [`Operator::snapshot`]) a room's
//! counts, open impressions and views are a record of their own, and each
//! waiting tick's features another, written once and deleted when the
//! tick's sample is written. Without it a restart replayed every input of
//! the last `enter_window_ms + long_view_ms` (the video above all, to embed
//! it again); with it the replay starts at the last records. A restored
//! room skips the replayed records its cut covers and the replayed features
//! of ticks it has or wrote.
//!
//! Not for: training (models/highlight/) or scoring (the highlight operator).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use foldhash::fast::RandomState;
use metrics::{counter, Counter};
use prost::Message;

use crate::config::HighlightLabelsConfig;
use crate::features::row::{tick_row, LAYOUT};
use crate::metrics::{Stage, TRAINING_SAMPLES};
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, Event, HighlightLabelOpen, HighlightLabelTick,
    HighlightLabelsRecord, RoomFeatures, TrainingSample, SCHEMA_VERSION,
};
use crate::state::room_log::{Logged, RoomLog};
use crate::state::Cut;

/// Task name of the samples this operator writes.
pub const TASK: &str = "highlight";

/// The highlight-label operator for one partition.
pub struct HighlightLabels {
    cfg: Arc<HighlightLabelsConfig>,
    tick_ms: i64,
    rooms: HashMap<String, Room, RandomState>,
    /// Event time decided so far (exclusive): ticks whose labels were final
    /// by then are written or dropped for good.
    now: Option<i64>,
    written: Counter,
    stage: Stage,
    /// The rooms' changelog: once on, only what changed since a room's
    /// last record (and features not yet written) is held.
    log: RoomLog,
    /// Ticks whose features record is to be deleted at the next snapshot
    /// (their samples are written).
    written_features: Vec<(String, i64)>,
}

#[derive(Default)]
struct Room {
    log: Logged,
    streamer_id: String,
    /// Unwritten ticks by start time.
    ticks: BTreeMap<i64, LabelTick>,
    /// Impressions waiting for their ENTER: user -> (tick, time).
    waiting: HashMap<String, (i64, i64), RandomState>,
    /// Views not yet long and not yet left: user -> (impression tick, enter time).
    viewing: HashMap<String, (i64, i64), RandomState>,
}

#[derive(Default)]
struct LabelTick {
    impressions: u32,
    long_views: u32,
    features: Option<Arc<RoomFeatures>>,
    /// The impressions' and the features' input positions (the sample
    /// depends on them).
    holds: Holds,
    /// Features not on the changelog yet, with their input positions.
    features_unlogged: Option<Holds>,
    /// The features have a changelog record (to delete once written).
    features_logged: bool,
}

impl HighlightLabels {
    /// An operator with ticks of `tick_ms`.
    pub fn new(cfg: Arc<HighlightLabelsConfig>, tick_ms: i64) -> Self {
        HighlightLabels {
            cfg,
            tick_ms: tick_ms.max(1),
            rooms: HashMap::default(),
            now: None,
            written: counter!(TRAINING_SAMPLES, "task" => TASK),
            stage: Stage::new(NAME),
            log: RoomLog::new(NAME),
            written_features: Vec::new(),
        }
    }

    /// The room (made when new).
    fn room(&mut self, id: &str) -> &mut Room {
        let log = &mut self.log;
        self.rooms
            .entry(id.to_string())
            .or_insert_with_key(|k| Room {
                log: log.entry(k),
                ..Room::default()
            })
    }

    fn tick_of(&self, t: i64) -> i64 {
        t.div_euclid(self.tick_ms) * self.tick_ms
    }

    /// Whether tick `tick`'s label was final by `now`.
    fn labelled(&self, tick: i64, now: i64) -> bool {
        tick + self.tick_ms + self.cfg.enter_window_ms + self.cfg.long_view_ms <= now
    }

    /// Whether tick `tick` is labelled for good already.
    fn closed(&self, tick: i64) -> bool {
        self.now.is_some_and(|now| self.labelled(tick, now))
    }

    /// Open impressions and views a room may hold.
    fn full(&self, room: &Room) -> bool {
        room.waiting.len() + room.viewing.len() >= self.cfg.max_open_per_room
    }

    fn on_action(&mut self, a: &crate::schema::ViewerAction, pos: Position) {
        let tick = self.tick_of(a.event_time_ms);
        let Some(kind) = ActionKind::try_from(a.kind).ok() else {
            return;
        };
        if !matches!(
            kind,
            ActionKind::Impression | ActionKind::Enter | ActionKind::Leave
        ) {
            return;
        }
        let covered = match self.rooms.get(&a.room_id) {
            Some(r) => r.log.covers(pos),
            None => self.log.covers(pos),
        };
        if covered {
            // Replayed: the restored state has it.
            return;
        }
        let long_view_ms = self.cfg.long_view_ms;
        let window = self.cfg.enter_window_ms;
        let full = self.rooms.get(&a.room_id).is_some_and(|r| self.full(r));
        let closed = self.closed(tick);
        let room = self.room(&a.room_id);
        room.log.folded(pos);
        if room.streamer_id.is_empty() && !a.streamer_id.is_empty() {
            room.streamer_id.clone_from(&a.streamer_id);
        }
        match kind {
            ActionKind::Impression => {
                if closed {
                    return;
                }
                if full && !room.waiting.contains_key(&a.user_id) {
                    self.stage.dropped("room_full", 1);
                    return;
                }
                let t = room.ticks.entry(tick).or_default();
                t.impressions += 1;
                t.holds.hold(pos);
                room.waiting
                    .insert(a.user_id.clone(), (tick, a.event_time_ms));
            }
            ActionKind::Enter => {
                if let Some((imp_tick, at)) = room.waiting.remove(&a.user_id) {
                    let gap = a.event_time_ms - at;
                    if (0..=window).contains(&gap) {
                        room.viewing
                            .insert(a.user_id.clone(), (imp_tick, a.event_time_ms));
                    }
                }
            }
            _ => {
                if let Some((imp_tick, enter)) = room.viewing.remove(&a.user_id) {
                    if a.event_time_ms - enter >= long_view_ms {
                        if let Some(t) = room.ticks.get_mut(&imp_tick) {
                            t.long_views += 1;
                        }
                    }
                }
            }
        }
    }

    /// Resolves what event time `now` (exclusive) has decided, and writes
    /// the samples whose labels are final.
    fn advance(&mut self, now: i64, ctx: &mut Context<'_>) {
        let long_view_ms = self.cfg.long_view_ms;
        let window = self.cfg.enter_window_ms;
        let tick_ms = self.tick_ms;
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
        let labelled_by = |n: i64, tick: i64| tick + tick_ms + window + long_view_ms <= n;
        let mut gone = Vec::new();
        for (room_id, room) in &mut self.rooms {
            // Ticks labelled when the room's restored state was taken were
            // written then (a stale features record brings one back); a
            // replay closing ticks the state had closed changes nothing.
            let restored_now = room.log.restored().and_then(|c| c.next_tick_ms);
            if restored_now.is_some_and(|n| now <= n) {
                continue;
            }
            let ticks = &mut room.ticks;
            let open = (room.viewing.len(), room.waiting.len());
            room.viewing.retain(|_, &mut (imp_tick, enter)| {
                if enter + long_view_ms > now {
                    return true;
                }
                if let Some(t) = ticks.get_mut(&imp_tick) {
                    t.long_views += 1;
                }
                false
            });
            room.waiting.retain(|_, &mut (_, at)| at + window >= now);
            if open != (room.viewing.len(), room.waiting.len()) {
                room.log.changed();
            }
            while let Some(entry) = room.ticks.first_entry() {
                let tick = *entry.key();
                if !labelled_by(now, tick) {
                    break;
                }
                let t = entry.remove();
                room.log.changed();
                if t.features_logged {
                    self.written_features.push((room_id.clone(), tick));
                }
                if restored_now.is_some_and(|n| labelled_by(n, tick)) {
                    continue;
                }
                let Some(features) = &t.features else {
                    self.stage.dropped("no_features", 1);
                    continue;
                };
                let sample = sample(
                    room_id,
                    &room.streamer_id,
                    tick,
                    tick_ms,
                    &t,
                    features,
                    long_view_ms,
                );
                self.written.increment(1);
                ctx.emit(Output {
                    topic: OutputTopic::TrainingSamples,
                    key: room_id.as_bytes().to_vec(),
                    id: sample.id.clone(),
                    payload: sample.encode_to_vec(),
                    headers: Vec::new(),
                    model_version: None,
                    // Written at the close of the tick ending at `now`:
                    // after a restart, a sample is not written again when
                    // that tick's outputs were (its label tick is long
                    // closed by then).
                    tick_end_ms: Some(now),
                    depends_on: t.holds,
                });
            }
            if room.ticks.is_empty() && room.waiting.is_empty() && room.viewing.is_empty() {
                gone.push(room_id.clone());
            }
        }
        for id in gone {
            if let Some(room) = self.rooms.remove(&id) {
                self.log.drop_room(&id, room.log);
            }
        }
    }

    /// Whether the room's restored state had tick `tick` labelled, its
    /// sample written.
    fn written_before_restart(&self, room: &Room, tick: i64) -> bool {
        room.log
            .restored()
            .and_then(|c| c.next_tick_ms)
            .is_some_and(|n| self.labelled(tick, n))
    }
}

/// Name of the operator (metrics label and changelog key prefix).
const NAME: &str = "highlight_labels";

/// The changelog key of a tick's features: 0xFF (no room id, being UTF-8,
/// starts with it), the tick's start big-endian, the room id.
fn features_key(room_id: &str, tick: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + room_id.len());
    k.push(0xFF);
    k.extend_from_slice(&tick.to_be_bytes());
    k.extend_from_slice(room_id.as_bytes());
    k
}

/// The room id and tick of a features key (None: not one).
fn parse_features_key(key: &[u8]) -> Option<(&str, i64)> {
    let rest = key.strip_prefix(&[0xFF])?;
    let (tick, room) = rest.split_first_chunk::<8>()?;
    Some((std::str::from_utf8(room).ok()?, i64::from_be_bytes(*tick)))
}

/// The changelog record of a room's state (its features aside), taken at `cut`.
fn room_record(room: &Room, cut: &Cut) -> HighlightLabelsRecord {
    let open = |m: &HashMap<String, (i64, i64), RandomState>| {
        let mut v: Vec<HighlightLabelOpen> = m
            .iter()
            .map(|(u, &(tick_ms, time_ms))| HighlightLabelOpen {
                user_id: u.clone(),
                tick_ms,
                time_ms,
            })
            .collect();
        v.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        v
    };
    HighlightLabelsRecord {
        schema_version: SCHEMA_VERSION,
        cut: Some(cut.to_record()),
        streamer_id: room.streamer_id.clone(),
        ticks: room
            .ticks
            .iter()
            .map(|(&start_ms, t)| HighlightLabelTick {
                start_ms,
                impressions: t.impressions,
                long_views: t.long_views,
            })
            .collect(),
        waiting: open(&room.waiting),
        viewing: open(&room.viewing),
    }
}

/// A room as its changelog record has it, without its features (the record
/// covers what it holds: nothing is held for it).
fn room_from(r: HighlightLabelsRecord) -> Room {
    let open = |v: Vec<HighlightLabelOpen>| {
        v.into_iter()
            .map(|o| (o.user_id, (o.tick_ms, o.time_ms)))
            .collect()
    };
    Room {
        log: Logged::default(),
        streamer_id: r.streamer_id,
        ticks: r
            .ticks
            .into_iter()
            .map(|t| {
                let tick = LabelTick {
                    impressions: t.impressions,
                    long_views: t.long_views,
                    ..LabelTick::default()
                };
                (t.start_ms, tick)
            })
            .collect(),
        waiting: open(r.waiting),
        viewing: open(r.viewing),
    }
}

/// The training sample of one labelled tick.
fn sample(
    room_id: &str,
    streamer_id: &str,
    tick: i64,
    tick_ms: i64,
    t: &LabelTick,
    features: &RoomFeatures,
    long_view_ms: i64,
) -> TrainingSample {
    let label = if t.impressions == 0 {
        0.0
    } else {
        t.long_views.min(t.impressions) as f32 / t.impressions as f32
    };
    TrainingSample {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"training-samples",
            TASK.as_bytes(),
            room_id.as_bytes(),
            &tick.to_le_bytes(),
        ]),
        task: TASK.into(),
        room_id: room_id.into(),
        user_id: String::new(),
        event_time_ms: tick,
        features: tick_row(features),
        label,
        // Both, comma-separated, even when one is empty.
        model_version: format!("{},{}", features.image_model, features.text_model),
        streamer_id: streamer_id.into(),
        tick_ms,
        impressions: t.impressions,
        long_views: t.long_views,
        long_view_ms,
        feature_layout: LAYOUT.into(),
        values: Default::default(),
    }
}

impl Operator for HighlightLabels {
    fn name(&self) -> &'static str {
        NAME
    }

    fn on_record(&mut self, event: &Event, pos: Position, _late: bool, _ctx: &mut Context<'_>) {
        if let Event::Action(a) = event {
            self.on_action(a, pos);
        }
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        let Note::Features { record, holds } = note else {
            return;
        };
        let tick = record.tick_start_ms;
        let replayed = match self.rooms.get(&record.room_id) {
            Some(r) => {
                self.written_before_restart(r, tick)
                    || r.ticks.get(&tick).is_some_and(|t| t.features.is_some())
            }
            None => self
                .log
                .restored()
                .and_then(|c| c.next_tick_ms)
                .is_some_and(|n| self.labelled(tick, n)),
        };
        if replayed {
            // The restored state has the tick, or wrote its sample.
            return;
        }
        if self.closed(tick) {
            self.stage.dropped("features_after_label", 1);
            return;
        }
        let room = self.room(&record.room_id);
        room.log.changed();
        let t = room.ticks.entry(tick).or_default();
        t.features = Some(record.clone());
        t.holds.merge(holds);
        t.features_unlogged = Some(*holds);
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.advance(tick_start_ms + self.tick_ms, ctx);
    }

    fn holds(&self, holds: &mut Holds) {
        if self.log.on() {
            // What a room's last record and its features records have is
            // not needed again.
            self.log.holds(self.rooms.values().map(|r| &r.log), holds);
            for room in self.rooms.values() {
                for h in room
                    .ticks
                    .values()
                    .filter_map(|t| t.features_unlogged.as_ref())
                {
                    holds.merge(h);
                }
            }
            return;
        }
        for room in self.rooms.values() {
            for t in room.ticks.values() {
                holds.merge(&t.holds);
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
        self.now = None;
        self.written_features.clear();
        self.log.clear();
    }

    fn resumed_at(&self) -> Option<Cut> {
        self.log.restored()
    }

    fn snapshot(&mut self, cut: &Cut, ctx: &mut Context<'_>) {
        // Features and their deletions first: a room's record, which
        // lists its ticks, never lands without them.
        for (room_id, room) in &mut self.rooms {
            for (&tick, t) in &mut room.ticks {
                let (Some(held), Some(f)) = (t.features_unlogged.take(), &t.features) else {
                    continue;
                };
                let key = features_key(room_id, tick);
                self.log.write(cut, ctx, &key, f.encode_to_vec(), held);
                t.features_logged = true;
            }
        }
        for (room_id, tick) in std::mem::take(&mut self.written_features) {
            let key = features_key(&room_id, tick);
            self.log.write(cut, ctx, &key, Vec::new(), Holds::default());
        }
        let partition = HighlightLabelsRecord {
            schema_version: SCHEMA_VERSION,
            cut: Some(cut.to_record()),
            ..Default::default()
        };
        self.log.snapshot(
            cut,
            ctx,
            self.rooms.iter_mut().map(|(k, r)| (k.as_str(), r)),
            |r| &mut r.log,
            |r, cut| room_record(r, cut).encode_to_vec(),
            partition.encode_to_vec(),
        );
    }

    fn restore(&mut self, key: &[u8], value: &[u8], _emitted_through_ms: Option<i64>) {
        if key.first() == Some(&0xFF) {
            let parsed = parse_features_key(key)
                .and_then(|(room, tick)| Some((room, tick, RoomFeatures::decode(value).ok()?)));
            let Some((room_id, tick, features)) = parsed else {
                self.stage.error("changelog_record");
                tracing::warn!(operator = NAME, "a tick's features could not be read back from the changelog; the tick's sample is not written");
                return;
            };
            let t = self.room(room_id).ticks.entry(tick).or_default();
            t.features = Some(Arc::new(features));
            t.features_logged = true;
            return;
        }
        let rooms = self.rooms.values_mut().map(|r| &mut r.log);
        let restored = self.log.restore(
            key,
            value,
            |r: &HighlightLabelsRecord| r.cut.as_ref(),
            rooms,
        );
        if let Some(n) = self.log.restored().and_then(|c| c.next_tick_ms) {
            self.now = Some(self.now.map_or(n, |now| now.max(n)));
        }
        let Some((room_id, record, log)) = restored else {
            return;
        };
        let mut room = room_from(record);
        room.log = log;
        if let Some(old) = self.rooms.remove(&room_id) {
            // Its features, read back before its record.
            for (tick, t) in old.ticks {
                if t.features.is_some() {
                    let e = room.ticks.entry(tick).or_default();
                    e.features = t.features;
                    e.features_logged = t.features_logged;
                }
            }
        }
        self.rooms.insert(room_id, room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{InputKind, ViewerAction};
    use crate::state::room_log::testing::{replay_actions, restore, take_snapshot, Act};
    use std::collections::BTreeSet;

    const T0: i64 = 1_000_000;

    fn cfg() -> Arc<HighlightLabelsConfig> {
        Arc::new(HighlightLabelsConfig {
            enabled: true,
            long_view_ms: 30_000,
            enter_window_ms: 10_000,
            max_open_per_room: 100,
        })
    }

    struct Run {
        op: HighlightLabels,
        out: Vec<Output>,
        offset: i64,
    }

    impl Run {
        fn new() -> Self {
            Run {
                op: HighlightLabels::new(cfg(), 1000),
                out: Vec::new(),
                offset: 0,
            }
        }
        fn act(&mut self, user: &str, t: i64, kind: ActionKind) {
            let a = ViewerAction {
                schema_version: 1,
                room_id: "r".into(),
                user_id: user.into(),
                streamer_id: "s".into(),
                event_time_ms: T0 + t,
                kind: kind as i32,
                ..ViewerAction::default()
            };
            let pos = Position {
                kind: InputKind::Actions,
                offset: self.offset,
            };
            self.offset += 1;
            let mut ctx = Context::new(&mut self.out, 0, 1000);
            self.op.on_record(&Event::Action(a), pos, false, &mut ctx);
        }
        fn features(&mut self, tick: i64) {
            let record = Arc::new(RoomFeatures {
                room_id: "r".into(),
                tick_start_ms: T0 + tick,
                tick_ms: 1000,
                comments: 3,
                image_model: "image@1".into(),
                ..RoomFeatures::default()
            });
            let mut ctx = Context::new(&mut self.out, 0, 1000);
            self.op.on_note(
                &Note::Features {
                    record,
                    holds: Holds::default(),
                },
                &mut ctx,
            );
        }
        /// Closes every tick up to `t` (exclusive end).
        fn close(&mut self, t: i64) {
            let mut ctx = Context::new(&mut self.out, 0, 1000);
            self.op.on_tick(T0 + t - 1000, &mut ctx);
        }
        fn samples(&self) -> Vec<TrainingSample> {
            self.out
                .iter()
                .map(|o| TrainingSample::decode(&o.payload[..]).expect("decodes"))
                .collect()
        }
    }

    #[test]
    fn lvtr_counts_impressions_that_became_long_views() {
        let mut r = Run::new();
        // Tick 0: four impressions. a: long view (still there at 30 s);
        // b: entered, left at 20 s; c: never entered; d: entered after 12 s
        // (outside the window), stays long.
        r.act("a", 100, ActionKind::Impression);
        r.act("b", 200, ActionKind::Impression);
        r.act("c", 300, ActionKind::Impression);
        r.act("d", 400, ActionKind::Impression);
        r.act("a", 2_000, ActionKind::Enter);
        r.act("b", 3_000, ActionKind::Enter);
        r.act("d", 12_500, ActionKind::Enter);
        r.act("b", 23_000, ActionKind::Leave);
        // Tick 1: e enters and leaves after exactly 30 s: a long view.
        r.act("e", 1_500, ActionKind::Impression);
        r.act("e", 1_600, ActionKind::Enter);
        r.act("e", 31_600, ActionKind::Leave);
        for t in 0..3 {
            r.features(t * 1000);
        }
        // Tick 0's label is final at 1 + 10 + 30 = 41 s.
        r.close(40_000);
        assert!(r.out.is_empty(), "written before the label was final");
        r.close(41_000);
        let s = r.samples();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].impressions, s[0].long_views), (4, 1));
        assert_eq!(s[0].label, 0.25);
        assert_eq!(s[0].event_time_ms, T0);
        assert_eq!(s[0].streamer_id, "s");
        assert_eq!(s[0].features.len(), crate::features::row::ROW_WIDTH);
        assert_eq!(s[0].feature_layout, LAYOUT);
        r.close(43_000);
        let s = r.samples();
        assert_eq!(s.len(), 3);
        assert_eq!((s[1].impressions, s[1].long_views, s[1].label), (1, 1, 1.0));
        // Tick 2 had features but no impression: context, label 0.
        assert_eq!((s[2].impressions, s[2].label), (0, 0.0));
        assert_eq!(r.op.rooms(), 0, "a room with nothing open is forgotten");
    }

    #[test]
    fn holds_cover_unwritten_samples() {
        let mut r = Run::new();
        r.act("a", 5_100, ActionKind::Impression);
        r.features(5_000);
        let mut h = Holds::default();
        r.op.holds(&mut h);
        assert_eq!(h.0[InputKind::Actions.index()], 0);
        r.close(46_000);
        assert_eq!(r.samples().len(), 1);
        assert_eq!(
            r.out[0].tick_end_ms,
            Some(T0 + 46_000),
            "written as tick 45 closed"
        );
        let mut h = Holds::default();
        r.op.holds(&mut h);
        assert_eq!(h, Holds::default());
    }

    #[test]
    fn ticks_without_features_are_dropped_and_late_input_ignored() {
        let mut r = Run::new();
        r.act("a", 100, ActionKind::Impression);
        r.close(41_000);
        assert!(r.out.is_empty());
        // Impressions and features for a labelled tick change nothing.
        r.act("b", 200, ActionKind::Impression);
        r.features(0);
        r.close(42_000);
        assert!(r.out.is_empty());
    }

    /// [`replay_actions`], each tick's features (a function of room and
    /// tick) coming for the rooms with an action in it, just before the
    /// tick closes, as the features operator sends them (those of ticks
    /// before `replayed_before` marked as sent again).
    fn replay(
        op: &mut HighlightLabels,
        acts: &[Act],
        from: i64,
        replayed_before: Option<i64>,
        at: impl FnMut(&mut HighlightLabels, usize, &Cut, &mut Context<'_>),
    ) -> Vec<(String, Vec<u8>)> {
        let notes =
            |op: &mut HighlightLabels, nt: i64, rooms: &BTreeSet<u8>, ctx: &mut Context<'_>| {
                for &room in rooms {
                    let record = Arc::new(RoomFeatures {
                        room_id: format!("r{room}"),
                        tick_start_ms: nt,
                        tick_ms: 1000,
                        comments: (nt / 1000 % 7) as u32 + room as u32,
                        // Features sent again for ticks closed before the cut
                        // differ from those sent then: the restored ones win.
                        image_model: if replayed_before.is_some_and(|c| nt < c) {
                            "image@replayed".into()
                        } else {
                            "image@1".into()
                        },
                        ..RoomFeatures::default()
                    });
                    let holds = Holds::default();
                    op.on_note(&Note::Features { record, holds }, ctx);
                }
            };
        replay_actions(op, acts, from, 60, notes, at)
    }

    proptest::proptest! {
        /// A highlight-label state restored from its changelog records, fed
        /// a replay from anywhere at or before the cut (features of the
        /// replayed ticks included), writes exactly the samples the
        /// uninterrupted run wrote after the cut, byte for byte, and none
        /// it wrote before; once the records are written nothing is held.
        #[test]
        fn restored_state_replays_exactly(
            raw in proptest::collection::vec((0i64..900, 0u8..3, 0u8..6, 0u8..3), 5..120),
            at_frac in 0.0f64..1.0,
            // A third of the cases replay from the cut itself.
            from_frac in 0.0f64..1.5,
        ) {
            let mut t = T0;
            let acts: Vec<_> = raw
                .iter()
                .map(|&(gap, room, user, what)| {
                    t += gap;
                    let kind = [ActionKind::Impression, ActionKind::Enter, ActionKind::Leave][what as usize];
                    (t, room, user, kind)
                })
                .collect();
            let cfg = Arc::new(HighlightLabelsConfig {
                enabled: true,
                long_view_ms: 3_000,
                enter_window_ms: 2_000,
                max_open_per_room: 100,
            });
            let at = ((acts.len() as f64) * at_frac) as usize;
            let mut changelog: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut cut_taken = Cut::default();
            let mut written_before = 0;
            let mut a = HighlightLabels::new(cfg.clone(), 1000);
            let whole = replay(&mut a, &acts, 0, None, |op, i, cut, ctx| {
                if i == at {
                    written_before = ctx.outputs.iter().filter(|o| o.topic == OutputTopic::TrainingSamples).count();
                    changelog = take_snapshot(op, cut, ctx);
                    cut_taken = *cut;
                }
            });
            // The changelog as the runtime reads it back: the last record
            // per key, in the order of those, tombstones deleting.
            let mut b = HighlightLabels::new(cfg, 1000);
            restore(&mut b, changelog);
            let from = ((cut_taken.processed[InputKind::Actions.index()].unwrap_or(0) as f64) * from_frac.min(1.0)) as i64;
            let again = replay(&mut b, &acts, from, cut_taken.next_tick_ms, |_, _, _, _| {});
            let after: BTreeMap<_, _> = whole[written_before..].iter().cloned().collect();
            proptest::prop_assert_eq!(after.len(), whole.len() - written_before, "a sample written twice");
            let again_map: BTreeMap<_, _> = again.iter().cloned().collect();
            proptest::prop_assert_eq!(again_map.len(), again.len(), "a sample written twice after the restore");
            let brief = |m: &BTreeMap<String, Vec<u8>>| -> Vec<(String, i64, u32, u32)> {
                m.values()
                    .map(|p| {
                        let s = TrainingSample::decode(&p[..]).expect("decodes");
                        (s.room_id, s.event_time_ms - T0, s.impressions, s.long_views)
                    })
                    .collect()
            };
            proptest::prop_assert_eq!(brief(&again_map), brief(&after));
            for (id, p) in &after {
                let mut a = TrainingSample::decode(&p[..]).expect("decodes");
                let mut b = TrainingSample::decode(&again_map[id][..]).expect("decodes");
                a.features.clear();
                b.features.clear();
                proptest::prop_assert_eq!(&b, &a);
            }
            proptest::prop_assert!(again_map == after, "same samples, other bytes");
        }
    }

    #[test]
    fn features_keys_round_trip_and_are_no_room_id() {
        let k = features_key("room-7", -5_000);
        assert_eq!(parse_features_key(&k), Some(("room-7", -5_000)));
        assert!(std::str::from_utf8(&k).is_err());
        assert_eq!(parse_features_key(b"room-7"), None);
        assert_eq!(parse_features_key(&[0xFF, 1, 2]), None);
    }

    #[test]
    fn open_impressions_are_bounded_per_room() {
        let mut r = Run::new();
        for u in 0..150 {
            r.act(&format!("u{u}"), 100, ActionKind::Impression);
        }
        let room = r.op.rooms.get("r").expect("room");
        assert_eq!(room.waiting.len(), 100);
        assert_eq!(room.ticks[&T0].impressions, 100);
    }
}
