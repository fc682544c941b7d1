//! Users' behaviour sequences in the user stage: each partition keeps the
//! [`UserState`] of the users it owns, fed by the live actions the room
//! stage re-keyed by user (`user-actions`) and by the short-video actions
//! (`short-video-actions`, already user-keyed), merged in event time by the
//! runtime. An action waits for its tick to close; then the tick's actions
//! join their users' sequences in event time, and every user whose sequence
//! changed gets a full snapshot on `user-sequences` (compacted: the last
//! record per user is the sequence), so the snapshot as of a tick's end holds
//! exactly the actions before it, however the streams interleaved. The live
//! visits' moment labels that came due go to `training-samples` (task
//! `live-moment`). An action whose tick has closed joins at once and shows in
//! the next tick's snapshot, unless its tick's snapshots were written before
//! a restart: then it is a replay the restored state lacks, and joins
//! silently.
//!
//! A live entry carries the room's state at entry, from the
//! `room-embeddings` table: its highlight score, that of its latest tick
//! scored that ended by the entry ([`RoomTable::score_as_of`]), and its
//! content representation, the mean of the MMBee content tokens of its
//! latest segment that completed by the entry ([`RoomTable::pooled_as_of`]).
//! When the table is gated (the room stage writes its progress), a closed
//! tick with live entries waits until the table is complete through its end
//! before its actions join (and the ticks after it wait behind it;
//! [`Operator::unfinished_tick`] keeps the checkpoint behind them), so an
//! entry gets the same score and content however late they reached the
//! table. Ticks without entries (short videos while
//! the room stage is down) do not wait.
//!
//! State survives restarts and hand-overs through the user stage's changelog
//! (`[kafka.topics] user_state`, compacted): at the end of the first tick
//! `changelog_interval_ms` after the previous write, every user whose
//! sequence changed since then gets a record of their whole state
//! ([`UserState::encode`]) on the partition that owns them, and the input
//! positions of the actions since the previous write are held until those
//! records are acknowledged, so offsets are never committed past an action
//! the changelog does not have. When a partition is assigned, the runtime
//! reads its changelog back ([`Operator::restore`]) before any record; the
//! actions replayed after the committed offsets are then recognised by their
//! source positions (or refused as older than the horizon, which only
//! actions already folded in can be).
//!
//! Not for: the sequence rules themselves ([`crate::state::sequence`]), or
//! the room side of anything.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use metrics::{counter, gauge, Counter, Gauge};
use prost::Message;

use crate::config::UserSequencesConfig;
use crate::metrics::{
    Stage, CHANGELOG_BYTES, SEQUENCE_SNAPSHOTS, SEQUENCE_USERS, TRAINING_SAMPLES,
};
use crate::models::interests::InterestModel;
use crate::runtime::{changelog_key, Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, Behaviour as BehaviourRecord, Event, TrainingSample, UserSequence,
    SCHEMA_VERSION,
};
use crate::sources::room_table::RoomTable;
use crate::state::sequence::{
    Act, Applied, Behaviour, Bounds, Domain, Feedback, LabelReport, Source, Step, UserState,
    LIVE_LABELS,
};

/// Training-sample task of the moment labels.
pub const TASK: &str = "live-moment";
/// Feature layout of the moment labels: the room's highlight score at entry
/// (0 when unknown), whether it was known, then the room's content vector
/// at entry (empty when the room had none).
pub const LAYOUT: &str = "live-moment-v1";

/// The operator for one user-stage partition.
pub struct UserSequences {
    cfg: Arc<UserSequencesConfig>,
    bounds: Bounds,
    table: Option<Arc<RoomTable>>,
    interests: Option<Arc<InterestModel>>,
    users: HashMap<Arc<str>, UserState>,
    /// Actions waiting for their tick to close, with their input positions.
    pending: Vec<(Arc<str>, Act, Position)>,
    /// Starts of the ticks the runtime closed that wait, in order, for the
    /// room table to hold their entries' content.
    deferred: VecDeque<i64>,
    /// Users whose sequence changed since the last tick.
    dirty: BTreeSet<Arc<str>>,
    /// Restored users whose last snapshot may not have been written: it is
    /// written again, as of the same tick, at the first tick.
    republish: Vec<Arc<str>>,
    /// Ticks through this end were closed, and their snapshots written, by
    /// the partition's previous owner (see [`Context::replayed_through`]).
    replayed_through: Option<i64>,
    /// Users with raw actions after their horizon.
    unsettled: HashSet<Arc<str>>,
    /// Users with live visits not fully labelled.
    labelling: HashSet<Arc<str>>,
    /// Positions of the actions taken since the last changelog records.
    unflushed: Holds,
    /// Users whose state changed since their last changelog record.
    unwritten: BTreeSet<Arc<str>>,
    /// Tick end of the last changelog write (i64::MIN: none yet).
    written_ms: i64,
    partition: i32,
    stage: Stage,
    changelog_bytes: Counter,
    snapshots: Counter,
    samples: Counter,
    users_gauge: Option<Gauge>,
}

impl UserSequences {
    /// The operator for one partition; `table` is the user stage's copy of
    /// `room-embeddings` (None: behaviours carry no content).
    pub fn new(cfg: Arc<UserSequencesConfig>, table: Option<Arc<RoomTable>>) -> Self {
        UserSequences {
            bounds: cfg.bounds(),
            cfg,
            table,
            interests: None,
            users: HashMap::new(),
            pending: Vec::new(),
            deferred: VecDeque::new(),
            dirty: BTreeSet::new(),
            republish: Vec::new(),
            replayed_through: None,
            unsettled: HashSet::new(),
            labelling: HashSet::new(),
            unflushed: Holds::default(),
            unwritten: BTreeSet::new(),
            written_ms: i64::MIN,
            partition: 0,
            stage: Stage::new("user_sequences"),
            changelog_bytes: counter!(CHANGELOG_BYTES, "stage" => "user_sequences"),
            snapshots: counter!(SEQUENCE_SNAPSHOTS),
            samples: counter!(TRAINING_SAMPLES, "task" => TASK),
            users_gauge: None,
        }
    }

    /// Keeps each user's compressed interests with `model` and publishes
    /// them with the sequence.
    pub fn with_interests(mut self, model: Option<Arc<InterestModel>>) -> Self {
        self.interests = model;
        self
    }

    /// A user's state (for tests).
    pub fn user(&self, user: &str) -> Option<&UserState> {
        self.users.get(user)
    }

    /// Gives a live entry the room's state as of its time: the content
    /// vector of the room's latest segment completed by then, and the score
    /// of its latest tick ended by then.
    fn with_content(&self, act: &mut Act) {
        if act.domain == Domain::Live && act.step == Step::Enter {
            let table = self.table.as_ref();
            act.content = table.and_then(|t| t.pooled_as_of(&act.item, act.time_ms));
            act.highlight = table.and_then(|t| t.score_as_of(&act.item, act.time_ms));
        }
    }

    /// Whether the table holds every room's content that completed before
    /// `end`, so actions before `end` can join (a table filled by hand, or
    /// none, always does).
    fn content_complete(&self, end: i64) -> bool {
        self.table
            .as_ref()
            .and_then(|t| t.content_through())
            .is_none_or(|through| through >= end - 1)
    }

    /// The action as the sequence takes it, and its user. A live entry gets
    /// its room's content when it joins ([`Self::with_content`]).
    fn act(&self, event: &Event, pos: Position) -> Option<(String, Act)> {
        match event {
            Event::Action(a) => {
                let source = Source {
                    stream: 0,
                    partition: a.source_partition,
                    offset: a.source_offset,
                };
                Some((a.user_id.clone(), Act::live(a, source, None)?))
            }
            Event::ShortVideo(s) => {
                let source = Source {
                    stream: 1,
                    partition: self.partition,
                    offset: pos.offset,
                };
                Some((s.user_id.clone(), Act::short_video(s, source)?))
            }
            _ => None,
        }
    }
}

impl UserSequences {
    /// Folds `act` into `user`'s sequence; `publish`: the user gets a
    /// snapshot at the end of this tick if it changed.
    fn take(&mut self, user: Arc<str>, mut act: Act, pos: Position, publish: bool) {
        self.with_content(&mut act);
        let state = self
            .users
            .entry(user.clone())
            .or_insert_with(|| UserState::with_interests(self.interests.clone()));
        match state.apply(act, &self.bounds) {
            Applied::Changed => {
                self.unflushed.hold(pos);
                self.unwritten.insert(user.clone());
                if publish {
                    self.dirty.insert(user.clone());
                }
                self.unsettled.insert(user.clone());
                self.labelling.insert(user);
            }
            Applied::Duplicate => self.stage.dropped("duplicate", 1),
            Applied::TooLate => self.stage.dropped("too_late", 1),
        }
    }

    /// Closes the ticks the runtime closed, in order, as far as the room
    /// table is complete for their live entries (`force`: all of them).
    fn close_ready(&mut self, ctx: &mut Context<'_>, force: bool) {
        while let Some(&tick_start_ms) = self.deferred.front() {
            let end = tick_start_ms + ctx.tick_ms();
            // Only live entries read the table: a tick without any (short
            // videos only, the room stage down) need not wait for it.
            let entries = self.pending.iter().any(|(_, a, _)| {
                a.time_ms < end && a.domain == Domain::Live && a.step == Step::Enter
            });
            if !force && entries && !self.content_complete(end) {
                break;
            }
            self.deferred.pop_front();
            self.close_tick(tick_start_ms, ctx);
        }
    }

    /// One tick: its actions join, snapshots and labels go out.
    fn close_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        let as_of = tick_start_ms + ctx.tick_ms();
        // The tick's actions join in event time (ties by source position),
        // so its snapshots hold exactly the actions before its end whatever
        // order the streams delivered them in.
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, a, _)| a.time_ms < as_of);
        self.pending = rest;
        due.sort_by_key(|(_, a, _)| (a.time_ms, a.source));
        for (user, act, pos) in due {
            self.take(user, act, pos, true);
        }
        for user in std::mem::take(&mut self.republish) {
            if let Some(state) = self.users.get(&user) {
                ctx.emit(snapshot(&user, state, state.published_as_of_ms));
                self.snapshots.increment(1);
                self.stage.sent.increment(1);
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        for user in &dirty {
            let Some(state) = self.users.get_mut(user) else {
                continue;
            };
            state.published_as_of_ms = as_of;
            ctx.emit(snapshot(user, state, as_of));
            self.snapshots.increment(1);
            self.stage.sent.increment(1);
        }
        if self.cfg.samples {
            let mut done = Vec::new();
            let (period, long_view) = (self.cfg.label_period_ms, self.cfg.long_view_ms);
            for user in &self.labelling {
                let Some(state) = self.users.get_mut(user) else {
                    done.push(user.clone());
                    continue;
                };
                for r in state.labels(as_of, period) {
                    debug_assert_eq!((r.positives | r.negatives) & !LIVE_LABELS, 0);
                    ctx.emit(label_sample(long_view, user, state, &r, as_of));
                    self.samples.increment(1);
                }
                if !state.labelling() {
                    done.push(user.clone());
                }
            }
            for u in done {
                self.labelling.remove(&u);
            }
        }
        let horizon = as_of - self.cfg.reorder_ms;
        let bounds = self.bounds;
        let users = &mut self.users;
        self.unsettled.retain(|u| match users.get_mut(u) {
            Some(state) => {
                state.advance(horizon, &bounds);
                state.recent() > 0
            }
            None => false,
        });
        if let Some(g) = &self.users_gauge {
            g.set(self.users.len() as f64);
        }
        // Last, so the records hold this tick's label progress and horizon.
        if as_of.saturating_sub(self.written_ms) >= self.cfg.changelog_interval_ms {
            self.write_changelog(as_of, ctx);
        }
    }

    /// Writes the state record of every user changed since the last write,
    /// holding the input positions taken since then until they are acknowledged.
    fn write_changelog(&mut self, as_of: i64, ctx: &mut Context<'_>) {
        self.written_ms = as_of;
        let name = self.name();
        let holds = std::mem::take(&mut self.unflushed);
        for user in std::mem::take(&mut self.unwritten) {
            let Some(state) = self.users.get(&user) else {
                continue;
            };
            let payload = state.encode();
            self.changelog_bytes.increment(payload.len() as u64);
            ctx.emit(Output {
                topic: OutputTopic::UserChangelog {
                    partition: self.partition,
                },
                key: changelog_key(name, user.as_bytes()),
                id: deterministic_id(&[b"user-state", user.as_bytes(), &as_of.to_le_bytes()]),
                payload,
                headers: Vec::new(),
                model_version: None,
                // State, not a tick's output: written again after a restart
                // whatever the tick (its holds must reach the broker).
                tick_end_ms: None,
                depends_on: holds,
            });
        }
    }
}

/// The `user-sequences` snapshot of a user's state.
fn snapshot(user: &Arc<str>, state: &UserState, as_of_ms: i64) -> Output {
    let fold = state.current();
    let mut record = UserSequence {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[b"user-sequences", user.as_bytes(), &as_of_ms.to_le_bytes()]),
        user_id: user.to_string(),
        event_time_ms: fold.newest_ms(),
        behaviours: fold
            .behaviours()
            .into_iter()
            .map(behaviour_record)
            .collect(),
        as_of_ms,
        ..Default::default()
    };
    if let Some(i) = fold.interests() {
        let m = i.model();
        record.interests = i.read();
        record.interest_rows = if record.interests.is_empty() {
            0
        } else {
            m.interests() as u32
        };
        record.interest_dim = m.out_dim() as u32;
        record.interest_model = m.label().to_string();
        record.interest_behaviours = i.count();
    }
    Output {
        topic: OutputTopic::UserSequences,
        key: user.as_bytes().to_vec(),
        id: record.id.clone(),
        payload: record.encode_to_vec(),
        headers: Vec::new(),
        model_version: None,
        tick_end_ms: Some(as_of_ms),
        depends_on: Holds::default(),
    }
}

/// The training sample of one moment-label report.
fn label_sample(
    long_view_ms: i64,
    user: &Arc<str>,
    state: &UserState,
    r: &LabelReport,
    as_of_ms: i64,
) -> Output {
    {
        let v = &r.visit;
        let mut features = vec![
            v.highlight.unwrap_or(0.0),
            f32::from(u8::from(v.highlight.is_some())),
        ];
        if let Some(c) = &v.content {
            features.extend_from_slice(c);
        }
        let mut values = std::collections::BTreeMap::new();
        for f in Feedback::ALL {
            if r.positives & f.bit() != 0 {
                values.insert(f.name().to_string(), 1.0);
            } else if r.negatives & f.bit() != 0 {
                values.insert(f.name().to_string(), 0.0);
            }
        }
        values.insert("visit_start_ms".into(), v.start_ms as f64);
        values.insert("watch_ms".into(), v.watch_ms as f64);
        values.insert("at_leave".into(), f64::from(u8::from(r.at_leave)));
        let before = |d: Domain| {
            let fold = state.current();
            let it: Box<dyn Iterator<Item = &Behaviour>> = match d {
                Domain::Live => Box::new(fold.live()),
                Domain::ShortVideo => Box::new(fold.short_videos()),
            };
            it.filter(|b| b.start_ms < v.start_ms).count() as f64
        };
        values.insert("live_history".into(), before(Domain::Live));
        values.insert("short_video_history".into(), before(Domain::ShortVideo));
        let sample = TrainingSample {
            schema_version: SCHEMA_VERSION,
            id: deterministic_id(&[
                TASK.as_bytes(),
                user.as_bytes(),
                r.room.as_bytes(),
                &r.visit_start_ms.to_le_bytes(),
                &r.at_ms.to_le_bytes(),
            ]),
            task: TASK.into(),
            room_id: r.room.to_string(),
            user_id: user.to_string(),
            event_time_ms: r.at_ms,
            features,
            label: if r.positives != 0 { 1.0 } else { 0.0 },
            model_version: String::new(),
            streamer_id: r.streamer.to_string(),
            tick_ms: 0,
            impressions: 0,
            long_views: 0,
            long_view_ms,
            feature_layout: LAYOUT.into(),
            values,
        };
        Output {
            topic: OutputTopic::TrainingSamples,
            key: user.as_bytes().to_vec(),
            id: sample.id.clone(),
            payload: sample.encode_to_vec(),
            headers: Vec::new(),
            model_version: None,
            tick_end_ms: Some(as_of_ms),
            depends_on: Holds::default(),
        }
    }
}

/// A behaviour as the `user-sequences` record has it.
pub fn behaviour_record(b: &Behaviour) -> BehaviourRecord {
    BehaviourRecord {
        domain: b.domain.name().into(),
        item_id: b.item.to_string(),
        owner_id: b.owner.to_string(),
        event_time_ms: b.start_ms,
        watch_ms: b.watch_ms,
        feedback: Feedback::names(b.feedback),
        gift_value: b.gift_value,
        content: b
            .content
            .as_deref()
            .map(<[f32]>::to_vec)
            .unwrap_or_default(),
        highlight_score: b.highlight,
        end_time_ms: b.end_ms.unwrap_or(0),
        impression_time_ms: b.impression_ms.unwrap_or(0),
        duration_ms: b.duration_ms,
    }
}

impl Operator for UserSequences {
    fn name(&self) -> &'static str {
        "user_sequences"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.partition = ctx.partition();
        self.replayed_through = ctx.replayed_through();
        // Ticks waiting for content close when the table moves on.
        if let (Some(table), Some(w)) = (&self.table, ctx.wake()) {
            table.subscribe(&w);
        }
        self.users_gauge = Some(gauge!(SEQUENCE_USERS, "partition" => self.partition.to_string()));
    }

    fn on_record(&mut self, event: &Event, pos: Position, late: bool, _ctx: &mut Context<'_>) {
        let Some((user, act)) = self.act(event, pos) else {
            return;
        };
        let user: Arc<str> = match self.users.get_key_value(user.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        };
        let deferred = self.deferred.front().is_some_and(|&t| act.time_ms >= t);
        if late && !deferred {
            // Its tick has closed. When that tick's snapshots were written
            // before a restart, the action is a replay the restored state
            // lacks: it joins silently, as the uninterrupted run had it by
            // then; otherwise it shows in the next tick's snapshot.
            let written = self.replayed_through.is_some_and(|t| act.time_ms < t);
            self.take(user, act, pos, !written);
        } else {
            self.pending.push((user, act, pos));
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.deferred.push_back(tick_start_ms);
        self.close_ready(ctx, false);
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        self.close_ready(ctx, false);
    }

    fn on_finish(&mut self, ctx: &mut Context<'_>) {
        // The input has ended: what the table has is all it will get.
        self.close_ready(ctx, true);
    }

    fn unfinished_tick(&self) -> Option<i64> {
        self.deferred.front().copied()
    }
    fn holds(&self, holds: &mut Holds) {
        holds.merge(&self.unflushed);
        for (_, _, pos) in &self.pending {
            holds.hold(*pos);
        }
    }

    /// The users held: while there are any, or actions waiting for their
    /// tick, every tick is closed (none skipped as empty), so a tick's
    /// actions and labels come out as of their own tick. (Before the first
    /// users joined, ticks waiting for the room table let the runtime skip
    /// ticks, and their actions came out as of a later one.)
    fn rooms(&self) -> usize {
        let waiting = !self.pending.is_empty() || !self.deferred.is_empty();
        self.users.len().max(usize::from(waiting))
    }

    fn restore(&mut self, key: &[u8], value: &[u8], emitted_through_ms: Option<i64>) {
        let Ok(user) = std::str::from_utf8(key) else {
            self.stage.error("changelog_key");
            return;
        };
        match UserState::decode(value, &self.bounds, self.interests.as_ref()) {
            Ok(state) => {
                let user: Arc<str> = Arc::from(user);
                if state.recent() > 0 {
                    self.unsettled.insert(user.clone());
                }
                if state.labelling() {
                    self.labelling.insert(user.clone());
                }
                // Its last snapshot may not have been acknowledged: write it
                // again, with the same id.
                if emitted_through_ms.is_none_or(|t| state.published_as_of_ms > t) {
                    self.republish.push(user.clone());
                }
                self.users.insert(user, state);
            }
            Err(e) => {
                self.stage.error("changelog_key");
                tracing::warn!(user, error = %e, "a changelog record could not be read back; the user starts empty");
            }
        }
        if let Some(g) = &self.users_gauge {
            g.set(self.users.len() as f64);
        }
    }

    fn on_revoke(&mut self) {
        self.unflushed = Holds::default();
        self.pending.clear();
        self.deferred.clear();
        self.republish.clear();
        self.unwritten.clear();
        self.written_ms = i64::MIN;
        self.users.clear();
        self.dirty.clear();
        self.unsettled.clear();
        self.labelling.clear();
        if let Some(g) = &self.users_gauge {
            g.set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{InputKind, ShortVideoAction, ShortVideoActionKind};

    const T0: i64 = 1_700_000_000_000;
    const TICK: i64 = 1000;

    /// What the operator writes when the events of tick k arrive in
    /// `phase[i]` (k - 1 or k: before tick k - 1 or tick k closes), in the
    /// order of `rank` within a phase.
    fn run(events: &[(Event, Position)], phase: &[i64], rank: &[u32]) -> Vec<(String, Vec<u8>)> {
        let cfg = Arc::new(UserSequencesConfig {
            enabled: true,
            ..UserSequencesConfig::default()
        });
        let mut op = UserSequences::new(cfg, None);
        let mut outputs = Vec::new();
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| (phase[i], rank[i]));
        let last = 6;
        let mut next = order.into_iter().peekable();
        for k in -1..=last {
            let mut ctx = Context::new(&mut outputs, 0, TICK);
            while let Some(i) = next.next_if(|&i| phase[i] <= k) {
                let (e, pos) = &events[i];
                op.on_record(e, *pos, false, &mut ctx);
            }
            op.on_tick(T0 + k * TICK, &mut ctx);
        }
        outputs.into_iter().map(|o| (o.id, o.payload)).collect()
    }

    fn segment(start_ms: i64, at_ms: i64) -> crate::sources::room_table::RoomContent {
        crate::sources::room_table::RoomContent {
            streamer_id: Arc::from("s"),
            start_ms,
            at_ms,
            tokens: vec![start_ms as f32, 1.0].into(),
            dim: 2,
            model: Arc::from("mmbee@1"),
        }
    }

    /// The snapshots written for two users who enter room r at T0 + 700
    /// and T0 + 1700, the room's segments completing at T0 + 500 and T0 +
    /// 1200 (with highlight scores 0.5 and 0.25 of ticks ending then, and
    /// one of 0.75 ending at T0 + 1800, after both entries), when the room
    /// table gets each segment and score and the room stage's progress at
    /// tick `arrive[i]` (the progress through T0 + 500 and T0 + 1200 after
    /// each).
    fn entries(arrive: [i64; 2]) -> Vec<(String, Vec<u8>)> {
        let cfg = Arc::new(UserSequencesConfig {
            enabled: true,
            ..UserSequencesConfig::default()
        });
        let table = RoomTable::gated();
        table.assigned(1);
        table.caught_up();
        let mut op = UserSequences::new(cfg, Some(table.clone()));
        let mut outputs = Vec::new();
        let enter = |user: &str, t: i64, offset: i64| {
            let a = crate::schema::ViewerAction {
                room_id: "r".into(),
                user_id: user.into(),
                streamer_id: "s".into(),
                event_time_ms: t,
                kind: crate::schema::ActionKind::Enter as i32,
                source_offset: offset,
                ..Default::default()
            };
            let pos = Position {
                kind: InputKind::UserActions,
                offset,
            };
            (Event::Action(a), pos)
        };
        let segments = [(0, T0 + 500), (T0 + 500, T0 + 1200)];
        for k in -1..8 {
            let mut ctx = Context::new(&mut outputs, 0, TICK);
            if k == -1 {
                for (e, pos) in [enter("u1", T0 + 700, 0), enter("u2", T0 + 1700, 1)] {
                    op.on_record(&e, pos, false, &mut ctx);
                }
            }
            for (i, &(start, at)) in segments.iter().enumerate() {
                if arrive[i] == k {
                    table.put("r", segment(start, at));
                    table.put_score("r", at, 0.5 / (i + 1) as f32);
                    if i == 1 {
                        table.put_score("r", T0 + 1800, 0.75);
                    }
                    table.progress(0, 0, at);
                }
            }
            op.poll(&mut ctx);
            if (0..4).contains(&k) {
                op.on_tick(T0 + k * TICK, &mut ctx);
            }
            // Later the room stage has passed everything.
            if k == 6 {
                table.progress(0, 0, T0 + 10 * TICK);
                op.poll(&mut ctx);
            }
        }
        outputs
            .into_iter()
            .filter(|o| o.topic == OutputTopic::UserSequences)
            .map(|o| (o.id, o.payload))
            .collect()
    }

    /// A live entry carries the content of the room's latest segment that
    /// completed by the entry, and the score of its latest tick that ended
    /// by then, however late they reached the table: its tick waits for the
    /// room stage's progress.
    #[test]
    fn entries_take_the_content_of_their_time_whenever_it_arrives() {
        let on_time = entries([-1, 0]);
        let content = |out: &[(String, Vec<u8>)]| -> Vec<(String, Vec<f32>)> {
            out.iter()
                .map(|(_, p)| {
                    let s = UserSequence::decode(&p[..]).unwrap();
                    (s.user_id.clone(), s.behaviours[0].content.clone())
                })
                .collect()
        };
        assert_eq!(
            content(&on_time),
            vec![
                ("u1".to_string(), vec![0.0, 1.0]),
                ("u2".to_string(), vec![(T0 + 500) as f32, 1.0])
            ]
        );
        let scores: Vec<Option<f32>> = on_time
            .iter()
            .map(|(_, p)| UserSequence::decode(&p[..]).unwrap().behaviours[0].highlight_score)
            .collect();
        assert_eq!(scores, vec![Some(0.5), Some(0.25)]);
        for arrive in [[2, 2], [0, 5], [3, 3], [5, 6], [1, 4]] {
            assert_eq!(entries(arrive), on_time, "segments at ticks {arrive:?}");
        }
    }

    /// Only ticks with live entries wait for the room table: short videos
    /// keep flowing while the room stage writes no progress (it is down),
    /// and a live entry's tick, and those after it, wait.
    #[test]
    fn only_ticks_with_entries_wait_for_the_table() {
        let cfg = Arc::new(UserSequencesConfig {
            enabled: true,
            ..UserSequencesConfig::default()
        });
        let table = RoomTable::gated();
        let mut op = UserSequences::new(cfg, Some(table.clone()));
        let mut outputs = Vec::new();
        let play = |t: i64, offset: i64| {
            let s = ShortVideoAction {
                user_id: "u1".into(),
                video_id: format!("video-{offset}"),
                author_id: "author".into(),
                event_time_ms: t,
                kind: ShortVideoActionKind::Play as i32,
                watch_ms: 1000,
                duration_ms: 5000,
                ..ShortVideoAction::default()
            };
            let pos = Position {
                kind: InputKind::ShortVideoActions,
                offset,
            };
            (Event::ShortVideo(s), pos)
        };
        let enter = Event::Action(crate::schema::ViewerAction {
            room_id: "r".into(),
            user_id: "u2".into(),
            event_time_ms: T0 + 1500,
            kind: crate::schema::ActionKind::Enter as i32,
            ..Default::default()
        });
        let snapshots = |out: &[Output]| -> Vec<(String, i64)> {
            out.iter()
                .filter(|o| o.topic == OutputTopic::UserSequences)
                .map(|o| {
                    let s = UserSequence::decode(&o.payload[..]).unwrap();
                    (s.user_id, s.as_of_ms)
                })
                .collect()
        };
        {
            let mut ctx = Context::new(&mut outputs, 0, TICK);
            let (e, pos) = play(T0 + 200, 0);
            op.on_record(&e, pos, false, &mut ctx);
            let pos = Position {
                kind: InputKind::UserActions,
                offset: 0,
            };
            op.on_record(&enter, pos, false, &mut ctx);
            let (e, pos) = play(T0 + 2200, 1);
            op.on_record(&e, pos, false, &mut ctx);
            for k in 0..3 {
                op.on_tick(T0 + k * TICK, &mut ctx);
            }
        }
        assert_eq!(snapshots(&outputs), vec![("u1".to_string(), T0 + TICK)]);
        assert_eq!(op.unfinished_tick(), Some(T0 + TICK));
        table.assigned(1);
        table.caught_up();
        table.progress(0, 0, T0 + 5 * TICK);
        op.poll(&mut Context::new(&mut outputs, 0, TICK));
        assert_eq!(
            snapshots(&outputs),
            vec![
                ("u1".to_string(), T0 + TICK),
                ("u2".to_string(), T0 + 2 * TICK),
                ("u1".to_string(), T0 + 3 * TICK)
            ]
        );
        assert_eq!(op.unfinished_tick(), None);
    }

    proptest::proptest! {
        /// A tick's snapshots hold exactly the actions before its end: how
        /// the actions of neighbouring ticks interleave before the ticks
        /// close changes nothing written.
        #[test]
        fn snapshots_do_not_depend_on_arrival_order(
            raw in proptest::collection::vec((0u8..4, proptest::bool::ANY, 0i64..6000), 1..40),
            early_a in proptest::collection::vec(proptest::bool::ANY, 40),
            early_b in proptest::collection::vec(proptest::bool::ANY, 40),
            rank_a in proptest::collection::vec(0u32..1000, 40),
            rank_b in proptest::collection::vec(0u32..1000, 40),
        ) {
            let events: Vec<(Event, Position)> = raw
                .iter()
                .enumerate()
                .map(|(i, &(user, play, dt))| {
                    let kind = if play {
                        ShortVideoActionKind::Play
                    } else {
                        ShortVideoActionKind::Impression
                    };
                    let s = ShortVideoAction {
                        user_id: format!("user-{user}"),
                        video_id: format!("video-{}", i % 7),
                        author_id: "author".into(),
                        event_time_ms: T0 + dt,
                        kind: kind as i32,
                        watch_ms: 1000,
                        duration_ms: 5000,
                        ..ShortVideoAction::default()
                    };
                    let pos = Position {
                        kind: InputKind::ShortVideoActions,
                        offset: i as i64,
                    };
                    (Event::ShortVideo(s), pos)
                })
                .collect();
            let phases = |early: &[bool]| -> Vec<i64> {
                raw.iter()
                    .zip(early)
                    .map(|(&(_, _, dt), &e)| dt / TICK - i64::from(e))
                    .collect()
            };
            let a = run(&events, &phases(&early_a), &rank_a);
            let b = run(&events, &phases(&early_b), &rank_b);
            proptest::prop_assert!(!a.is_empty());
            proptest::prop_assert_eq!(a, b);
        }
    }
}
