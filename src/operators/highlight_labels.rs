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
//! operator holds the input positions and the emitted-through time of
//! unwritten ticks, so a restart recomputes them instead of losing them.
//! When a finite run ends (the demo), its last ticks are left unlabelled and
//! are not written. On Kafka a quiet room's event time still advances with
//! its partition's watermark, so the last ticks of a broadcast are labelled
//! with views that the broadcast's end cut short.
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
    deterministic_id, ActionKind, Event, RoomFeatures, TrainingSample, SCHEMA_VERSION,
};

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
}

#[derive(Default)]
struct Room {
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
    holds: Holds,
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
            stage: Stage::new("highlight_labels"),
        }
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
        let long_view_ms = self.cfg.long_view_ms;
        let window = self.cfg.enter_window_ms;
        let full = self.rooms.get(&a.room_id).is_some_and(|r| self.full(r));
        let closed = self.closed(tick);
        let room = self.rooms.entry(a.room_id.clone()).or_default();
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
        let mut gone = Vec::new();
        for (room_id, room) in &mut self.rooms {
            let ticks = &mut room.ticks;
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
            while let Some(entry) = room.ticks.first_entry() {
                let tick = *entry.key();
                if tick + tick_ms + window + long_view_ms > now {
                    break;
                }
                let t = entry.remove();
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
                    tick_end_ms: Some(tick + tick_ms),
                    depends_on: t.holds,
                });
            }
            if room.ticks.is_empty() && room.waiting.is_empty() && room.viewing.is_empty() {
                gone.push(room_id.clone());
            }
        }
        for id in gone {
            self.rooms.remove(&id);
        }
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
        "highlight_labels"
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
        if self.closed(record.tick_start_ms) {
            self.stage.dropped("features_after_label", 1);
            return;
        }
        let room = self.rooms.entry(record.room_id.clone()).or_default();
        let t = room.ticks.entry(record.tick_start_ms).or_default();
        t.features = Some(record.clone());
        t.holds.merge(holds);
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.advance(tick_start_ms + self.tick_ms, ctx);
    }

    fn unfinished_tick(&self) -> Option<i64> {
        self.rooms
            .values()
            .filter_map(|r| r.ticks.keys().next().copied())
            .min()
    }

    fn holds(&self, holds: &mut Holds) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{InputKind, ViewerAction};

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
    fn holds_and_unfinished_tick_cover_unwritten_samples() {
        let mut r = Run::new();
        r.act("a", 5_100, ActionKind::Impression);
        r.features(5_000);
        assert_eq!(r.op.unfinished_tick(), Some(T0 + 5_000));
        let mut h = Holds::default();
        r.op.holds(&mut h);
        assert_eq!(h.0[InputKind::Actions.index()], 0);
        r.close(46_000);
        assert_eq!(r.samples().len(), 1);
        assert_eq!(r.op.unfinished_tick(), None);
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
