//! MMBee scoring in the user stage: each partition of `user-actions` (live
//! actions re-keyed by user) keeps its users' presence, sessions and gifting
//! histories ([`ScoringState`]), reads rooms' content tokens from the
//! `room-embeddings` table ([`RoomTable`]), and scores exactly the pairs whose
//! inputs changed: a viewer who entered, every viewer of this partition in a
//! room whose content changed, a viewer who gifted. The ranker runs batched
//! across the instance's partitions; each score goes to `gift-predictions`
//! (keyed by room) with the model and graph versions.
//!
//! Actions and room content are joined in event time: the partition's actions
//! wait for its watermark (the allowed lateness, 2 s by default) and are then
//! handled in event-time order together with the content segments that
//! completed by then, so a viewer who left before a segment completed is not
//! scored on it and a gift re-scores the rooms the viewer was in at the gift,
//! however the repartition topic interleaved the rooms' partitions. That wait
//! is the latency a prediction pays for it. A pair is scored only once its room
//! has content tokens: a viewer who enters a room before its first segment
//! completes is scored when it does.
//!
//! The join goes no further than the table is complete
//! ([`RoomTable::content_through`]: the room stage's content progress), so
//! content that reaches the table late (MFQ is slow, the room stage restarted)
//! is still joined as of when it completed, and a replay after a crash scores
//! the same pairs at the same times as a clean run. Every segment the table
//! passes on is joined, not only a room's latest.
//!
//! The room stage writes a source partition's actions in offset order, and
//! writes them again when it replays after a restart: an action whose source
//! offset is not past the newest taken from its source partition is such a
//! replay and is dropped (`dropped{reason="duplicate"}`), so a gift is never
//! counted twice.
//!
//! State survives restarts and hand-overs through the user stage's changelog
//! (the same topic as the behaviour sequences'): every
//! `changelog_interval_ms`, each user whose state changed gets a record of
//! their sessions, gifting history and the actions read but still waiting
//! for the watermark, with the partition's next input offset then; each room
//! whose content segment changed gets a record of it (start, tokens), since the
//! `room-embeddings` table keeps only a room's latest; and the newest source
//! offset per source partition gets one record. The input positions
//! read since the previous write are held until those records are
//! acknowledged. On assignment the records are read back before any input
//! ([`Operator::restore`]); a replayed action of a restored user below that
//! offset is already in the state and is skipped (`dropped{reason="replayed"}`),
//! and a restored room's viewers are not re-scored on the segment they had.
//!
//! Not for: MFQ (the room stage runs it once per segment, see
//! [`super::mmbee_fusion`]), labels, or training data (the room stage's
//! `gift_labels`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc;
use std::sync::Arc;

use metrics::{counter, gauge, Counter, Gauge};
use prost::Message;

use super::mmbee_scoring::{Due, Reason, ScoringState, SessionRecord};
use crate::metrics::{Stage, CHANGELOG_BYTES, GIFT_PREDICTIONS, MMBEE_USERS};
use crate::models::batcher::{Done, Outbox, ReplyTo};
use crate::models::mmbee::{Gift, MmbeeService, PairInput, Reply, Request, SessionRow};
use crate::runtime::{changelog_key, Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, Event, GiftPrediction, GiftScoringGift, GiftScoringPending,
    GiftScoringRecord, GiftScoringRoom, GiftScoringSession, InputKind, ViewerAction,
    SCHEMA_VERSION,
};
use crate::sources::room_table::{RoomContent, RoomTable};

/// A pair being scored.
#[derive(Clone, Debug)]
struct Pending {
    due: Due,
    streamer_id: Arc<str>,
    t_ms: i64,
    content_start_ms: i64,
    holds: Holds,
}

/// The scoring operator for one user-stage partition.
pub struct GiftScoring {
    svc: Arc<MmbeeService>,
    table: Arc<RoomTable>,
    /// The table's change sequence read so far.
    seen: u64,
    state: ScoringState,
    /// Event time of the last action handled.
    action_ms: i64,
    /// When each room's content in the state completed, and the MFQ version
    /// that made its tokens.
    content_at: HashMap<Arc<str>, (i64, Arc<str>)>,
    /// Content read from the table, by (completion, room, segment start):
    /// applied once the ticks pass its completion and the table is complete
    /// through it.
    waiting: BTreeMap<(i64, Arc<str>, i64), RoomContent>,
    /// Each room's latest content that completed by the event time handled:
    /// what a viewer who enters gets.
    latest: HashMap<Arc<str>, RoomContent>,
    /// Per room-stage partition, the newest source offset of the actions
    /// taken: an action at or below it is a room-stage replay.
    sources: HashMap<i32, i64>,
    /// Whether `sources` changed since the last changelog write.
    sources_unwritten: bool,
    /// End of the last closed tick.
    watermark: i64,
    /// Actions waiting for the watermark, by (event time, source partition,
    /// source offset): the repartition topic interleaves rooms whose
    /// partitions run at their own pace, so a partition's actions are put
    /// back in event-time order first, ties (a viewer's actions in two rooms
    /// in the same millisecond) by where the room stage read them, never by
    /// when they arrived.
    buffered: BTreeMap<(i64, i32, i64), (ViewerAction, Position)>,
    /// Position of the newest action, held while its pairs are scored.
    last_pos: Option<Position>,
    /// Positions of the actions handled since pairs were last scored.
    group: Holds,
    pending: HashMap<u64, Pending>,
    /// Requests on their way to the batcher.
    outbox: Outbox<Request>,
    next_id: u64,
    reply: ReplyTo<Reply>,
    rx: mpsc::Receiver<Done<Reply>>,
    stage: Stage,
    by_trigger: [Counter; 3],
    users: Option<Gauge>,
    /// The partition (its changelog records go to the same one).
    partition: i32,
    /// Users whose record changed since the last changelog write.
    unwritten: HashSet<Arc<str>>,
    /// Rooms whose content segment changed since the last write.
    rooms_unwritten: HashSet<Arc<str>>,
    /// Input positions read since the last write, held until it is acknowledged.
    unflushed: Holds,
    /// Tick end of the last write.
    written_ms: i64,
    changelog_interval_ms: i64,
    /// The partition's next input offset (after the last action read).
    received_through: i64,
    /// After a restore: per restored user, the input offset below which an
    /// action is one the state already has; cleared once the input passes
    /// `replay_end`.
    replayed_below: HashMap<Arc<str>, i64>,
    replay_end: i64,
    changelog_bytes: Counter,
}

fn trigger(r: Reason) -> &'static str {
    match r {
        Reason::Enter => "enter",
        Reason::Content => "content",
        Reason::Gift => "gift",
    }
}

impl GiftScoring {
    /// The operator for one partition, sharing the instance's model and room table.
    pub fn new(svc: Arc<MmbeeService>, table: Arc<RoomTable>) -> Self {
        let (tx, rx) = mpsc::channel();
        GiftScoring {
            svc,
            table,
            seen: 0,
            state: ScoringState::new(),
            action_ms: 0,
            content_at: HashMap::new(),
            waiting: BTreeMap::new(),
            latest: HashMap::new(),
            sources: HashMap::new(),
            sources_unwritten: false,
            watermark: i64::MIN,
            buffered: BTreeMap::new(),
            last_pos: None,
            group: Holds::default(),
            pending: HashMap::new(),
            outbox: Outbox::default(),
            next_id: 0,
            reply: ReplyTo { tx, wake: None },
            rx,
            stage: Stage::new("gift_scoring"),
            by_trigger: [Reason::Enter, Reason::Content, Reason::Gift]
                .map(|r| counter!(GIFT_PREDICTIONS, "trigger" => trigger(r))),
            users: None,
            partition: 0,
            unwritten: HashSet::new(),
            rooms_unwritten: HashSet::new(),
            unflushed: Holds::default(),
            written_ms: i64::MIN,
            changelog_interval_ms: 5_000,
            received_through: 0,
            replayed_below: HashMap::new(),
            replay_end: 0,
            changelog_bytes: counter!(CHANGELOG_BYTES, "stage" => "gift_scoring"),
        }
    }

    /// Writes changed users' state to the changelog at most every `ms` (0:
    /// every tick).
    pub fn with_changelog_interval(mut self, ms: i64) -> Self {
        self.changelog_interval_ms = ms;
        self
    }

    /// The state (for tests of which pairs are scored).
    pub fn state(&self) -> &ScoringState {
        &self.state
    }

    /// Puts a room's content into the state when it is newer than what the
    /// state holds (marking the room's viewers due). Returns whether it did.
    fn apply(&mut self, room: &Arc<str>, c: RoomContent) -> bool {
        if self
            .state
            .content_start(room)
            .is_some_and(|s| s >= c.start_ms)
        {
            return false;
        }
        self.content_at
            .insert(room.clone(), (c.at_ms, c.model.clone()));
        self.state.content(room, c.start_ms, c.tokens);
        self.rooms_unwritten.insert(room.clone());
        true
    }

    /// A viewer enters `room` at `t_ms`: the state gets the room's latest
    /// content that had completed by then first.
    fn sync_room(&mut self, room: &str, t_ms: i64) {
        let latest = self.latest.get_key_value(room);
        if let Some((room, c)) = latest.filter(|(_, c)| c.at_ms <= t_ms) {
            let (room, c) = (room.clone(), c.clone());
            self.apply(&room, c);
        }
    }

    /// Reads the table's changes into `waiting` (every segment, each once).
    fn read_table(&mut self) {
        let (changes, next) = self.table.changes_since(self.seen);
        self.seen = next;
        for (room, c) in changes {
            let passed = self
                .latest
                .get(&room)
                .is_some_and(|l| l.start_ms >= c.start_ms);
            if !passed {
                self.waiting.insert((c.at_ms, room, c.start_ms), c);
            }
        }
    }

    /// Handles, in event-time order, the buffered actions before `wm` and the
    /// room content that completed at or before it: an event-time join of the
    /// partition's actions with the room table, so a viewer who left before a
    /// segment completed is not scored on it, and a gift re-scores exactly the
    /// rooms the viewer was in at the gift. No further than the table is
    /// complete: content that came late would otherwise be joined as of
    /// when it came.
    fn advance(&mut self, wm: i64) {
        self.read_table();
        // An action at t needs the content that completed at or before t.
        let (actions_before, content_through) = match self.table.content_through() {
            Some(complete) => (wm.min(complete.saturating_add(1)), wm.min(complete)),
            None => (wm, wm),
        };
        loop {
            let action = self
                .buffered
                .keys()
                .next()
                .map(|k| k.0)
                .filter(|&t| t < actions_before);
            let content = self
                .waiting
                .keys()
                .next()
                .map(|k| k.0)
                .filter(|&at| at <= content_through);
            let content_first = match (action, content) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(t), Some(at)) => at <= t,
            };
            if content_first {
                if let Some(((_, room, _), c)) = self.waiting.pop_first() {
                    let newer = self
                        .latest
                        .get(&room)
                        .is_none_or(|l| l.start_ms < c.start_ms);
                    if newer {
                        self.latest.insert(room.clone(), c.clone());
                    }
                    if self.state.viewers(&room) > 0 {
                        self.apply(&room, c);
                        self.score_due();
                    }
                }
            } else if let Some((_, (a, pos))) = action.and_then(|_| self.buffered.pop_first()) {
                self.handle(&a, pos);
                // The viewer's pairs are scored once every action at this
                // millisecond is in (a prediction's id is its time).
                let same_time = self
                    .buffered
                    .keys()
                    .next()
                    .is_some_and(|k| k.0 == a.event_time_ms);
                if !same_time {
                    self.score_due();
                }
            } else {
                break;
            }
        }
    }

    /// One action, in event-time order.
    fn handle(&mut self, a: &ViewerAction, pos: Position) {
        let Ok(kind) = ActionKind::try_from(a.kind) else {
            return;
        };
        let t = a.event_time_ms;
        self.action_ms = t;
        self.last_pos = Some(pos);
        self.unwritten.insert(Arc::from(a.user_id.as_str()));
        match kind {
            ActionKind::Enter => {
                self.sync_room(&a.room_id, t);
                self.state.enter(&a.user_id, &a.room_id, &a.streamer_id, t);
            }
            ActionKind::Leave => self.state.leave(&a.user_id, &a.room_id),
            ActionKind::Like | ActionKind::Comment | ActionKind::Follow => {
                self.state.session_action(
                    &a.user_id,
                    &a.room_id,
                    kind == ActionKind::Like,
                    kind == ActionKind::Comment,
                    kind == ActionKind::Follow,
                );
            }
            ActionKind::Gift => {
                self.state
                    .gift(&a.user_id, &a.room_id, &a.streamer_id, a.gift_value, t);
            }
            _ => return,
        }
        self.group.hold(pos);
    }

    /// Turns the due pairs into ranker requests. A pair is scored as of the
    /// event time of what made it due: the viewer's action, or the moment
    /// the room's content segment completed.
    fn score_due(&mut self) {
        let due = self.state.take_due();
        let mut holds = std::mem::take(&mut self.group);
        if let Some(p) = self.last_pos {
            holds.hold(p);
        }
        for d in due {
            let t = match d.reason {
                // As of its completion, or of the partition's event time when
                // the segment reached the table after later actions were
                // handled (the state has them by now).
                Reason::Content => self
                    .content_at
                    .get(&d.room)
                    .map_or(self.action_ms, |c| c.0.max(self.action_ms)),
                Reason::Enter | Reason::Gift => self.action_ms,
            };
            let Some(enter_ms) = self
                .state
                .pair_view(&d.user, &d.room, t)
                .map(|v| v.enter_ms)
            else {
                continue;
            };
            // A viewer who entered after the segment completed (its table
            // record came late) is scored as of the enter.
            let t = t.max(enter_ms);
            let Some(view) = self.state.pair_view(&d.user, &d.room, t) else {
                continue;
            };
            let Some((start, tokens)) = view.content.cloned() else {
                // Scored when the room's first content arrives.
                self.stage.dropped("no_content_yet", 1);
                continue;
            };
            let input = PairInput {
                tokens,
                tokens_model: self
                    .content_at
                    .get(&d.room)
                    .map_or_else(|| Arc::from(""), |c| c.1.clone()),
                streamer_id: view.streamer.clone(),
                user_id: d.user.clone(),
                history: view.history.iter().cloned().collect(),
                session: view.session,
                t_ms: t,
            };
            let id = self.next_id;
            self.next_id += 1;
            let room = d.room.clone();
            self.pending.insert(
                id,
                Pending {
                    streamer_id: view.streamer.clone(),
                    due: d,
                    t_ms: t,
                    content_start_ms: start,
                    holds,
                },
            );
            let req = Request::Pair(Box::new(input));
            if !self
                .outbox
                .send(self.svc.model.as_ref(), &room, id, req, &self.reply)
            {
                self.pending.remove(&id);
                self.stage.error("model_stopped");
            }
        }
    }

    /// Writes the record of every user changed since the last write, and of
    /// every room whose content segment changed, holding the input positions
    /// read since then until they are acknowledged.
    fn write_changelog(&mut self, as_of: i64, ctx: &mut Context<'_>) {
        self.written_ms = as_of;
        let name = self.name();
        let holds = std::mem::take(&mut self.unflushed);
        let mut pending: HashMap<&str, Vec<GiftScoringPending>> = HashMap::new();
        for (a, pos) in self.buffered.values() {
            if self.unwritten.contains(a.user_id.as_str()) {
                pending
                    .entry(a.user_id.as_str())
                    .or_default()
                    .push(GiftScoringPending {
                        action: Some(a.clone()),
                        offset: pos.offset,
                    });
            }
        }
        let mut users: Vec<Arc<str>> = self.unwritten.drain().collect();
        users.sort();
        let mut records = Vec::with_capacity(users.len() + 1);
        for user in users {
            let (sessions, history) = self.state.user_record(&user);
            let rec = GiftScoringRecord {
                schema_version: SCHEMA_VERSION,
                sessions: sessions
                    .into_iter()
                    .map(|s| GiftScoringSession {
                        room_id: s.room.to_string(),
                        streamer_id: s.streamer.to_string(),
                        enter_ms: s.enter_ms,
                        likes: s.session.likes,
                        comments: s.session.comments,
                        gifts: s.session.gifts,
                        gift_value: s.session.gift_value,
                        followed: s.session.followed,
                    })
                    .collect(),
                history: history
                    .into_iter()
                    .map(|g| GiftScoringGift {
                        streamer_id: g.streamer_id.to_string(),
                        t_ms: g.t_ms,
                        value: g.value,
                    })
                    .collect(),
                pending: pending.remove(&*user).unwrap_or_default(),
                received_through: self.received_through,
                ..GiftScoringRecord::default()
            };
            records.push((user.as_bytes().to_vec(), rec));
        }
        if std::mem::take(&mut self.sources_unwritten) {
            let rec = GiftScoringRecord {
                schema_version: SCHEMA_VERSION,
                sources: self.sources.iter().map(|(&p, &o)| (p, o)).collect(),
                received_through: self.received_through,
                ..GiftScoringRecord::default()
            };
            // NUL and no room.
            records.push((vec![0u8], rec));
        }
        let mut rooms: Vec<Arc<str>> = self.rooms_unwritten.drain().collect();
        rooms.sort();
        for room in rooms {
            let (Some((start, tokens)), Some((at_ms, model))) =
                (self.state.room_content(&room), self.content_at.get(&room))
            else {
                continue;
            };
            let rec = GiftScoringRecord {
                schema_version: SCHEMA_VERSION,
                room: Some(GiftScoringRoom {
                    content_start_ms: *start,
                    at_ms: *at_ms,
                    model: model.to_string(),
                    tokens: tokens.to_vec(),
                }),
                ..GiftScoringRecord::default()
            };
            // NUL, then the room: no user id starts with NUL.
            let mut key = vec![0u8];
            key.extend_from_slice(room.as_bytes());
            records.push((key, rec));
        }
        for (key, rec) in records {
            let payload = rec.encode_to_vec();
            self.changelog_bytes.increment(payload.len() as u64);
            ctx.emit(Output {
                topic: OutputTopic::UserChangelog {
                    partition: self.partition,
                },
                id: deterministic_id(&[
                    b"gift-scoring-state",
                    &self.partition.to_le_bytes(),
                    &key,
                    &as_of.to_le_bytes(),
                ]),
                key: changelog_key(name, &key),
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

    fn drain(&mut self, ctx: &mut Context<'_>) {
        while let Ok(done) = self.rx.try_recv() {
            let Some(p) = self.pending.remove(&done.id) else {
                continue;
            };
            let scored = match done.result {
                Ok(Reply::Pair(x)) => x,
                Ok(Reply::Tokens { .. }) => {
                    self.stage.error("wrong_reply");
                    continue;
                }
                Err(e) => {
                    self.stage.error("model");
                    tracing::debug!(user = %p.due.user, room = %p.due.room, error = %e, "ranker failed");
                    continue;
                }
            };
            let model = done.model.to_string();
            let trig = trigger(p.due.reason);
            // -1: the room's tokens came from another version's MFQ (a
            // version change) and were not read.
            let content_start_ms = if scored.content {
                p.content_start_ms
            } else {
                -1
            };
            let id = deterministic_id(&[
                b"gift-prediction",
                p.due.user.as_bytes(),
                p.due.room.as_bytes(),
                &p.t_ms.to_le_bytes(),
                trig.as_bytes(),
                model.as_bytes(),
                &content_start_ms.to_le_bytes(),
            ]);
            let rec = GiftPrediction {
                schema_version: SCHEMA_VERSION,
                id: id.clone(),
                room_id: p.due.room.to_string(),
                user_id: p.due.user.to_string(),
                streamer_id: p.streamer_id.to_string(),
                event_time_ms: p.t_ms,
                probability: scored.probability,
                model_version: model.clone(),
                trigger: trig.to_owned(),
                graph_version: scored.graph_version,
                content_start_ms,
            };
            self.by_trigger[p.due.reason as usize].increment(1);
            self.stage.sent.increment(1);
            ctx.emit(Output {
                topic: OutputTopic::GiftPredictions,
                key: p.due.room.as_bytes().to_vec(),
                id,
                payload: rec.encode_to_vec(),
                headers: Vec::new(),
                model_version: Some(model),
                tick_end_ms: None,
                depends_on: p.holds,
            });
        }
    }
}

impl Operator for GiftScoring {
    fn name(&self) -> &'static str {
        "gift_scoring"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.reply.wake = ctx.wake();
        if let Some(w) = &self.reply.wake {
            self.table.subscribe(w);
        }
        self.users = Some(gauge!(MMBEE_USERS, "partition" => ctx.partition().to_string()));
        self.partition = ctx.partition();
    }

    fn on_record(&mut self, event: &Event, pos: Position, _late: bool, _ctx: &mut Context<'_>) {
        let Event::Action(a) = event else {
            return;
        };
        let relevant = matches!(
            ActionKind::try_from(a.kind),
            Ok(ActionKind::Enter
                | ActionKind::Leave
                | ActionKind::Like
                | ActionKind::Comment
                | ActionKind::Follow
                | ActionKind::Gift)
        );
        if relevant && pos.kind == InputKind::UserActions {
            if pos.offset >= self.replay_end {
                self.replayed_below.clear();
            } else if self
                .replayed_below
                .get(a.user_id.as_str())
                .is_some_and(|&below| pos.offset < below)
            {
                self.stage.dropped("replayed", 1);
                return;
            }
            // The room stage writes a source partition's actions in offset
            // order; one it writes again after a restart is one taken.
            let newest = self.sources.entry(a.source_partition).or_insert(-1);
            if a.source_offset <= *newest {
                self.stage.dropped("duplicate", 1);
                return;
            }
            *newest = a.source_offset;
            self.sources_unwritten = true;
            self.received_through = self.received_through.max(pos.offset + 1);
            self.unflushed.hold(pos);
            self.unwritten.insert(Arc::from(a.user_id.as_str()));
            self.buffered.insert(
                (a.event_time_ms, a.source_partition, a.source_offset),
                (a.clone(), pos),
            );
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.watermark = self.watermark.max(tick_start_ms + ctx.tick_ms());
        self.advance(self.watermark);
        self.state.forget_idle();
        let state = &self.state;
        self.content_at.retain(|room, _| state.viewers(room) > 0);
        if let Some(g) = &self.users {
            g.set(self.state.users() as f64);
        }
        let as_of = tick_start_ms + ctx.tick_ms();
        if as_of.saturating_sub(self.written_ms) >= self.changelog_interval_ms {
            self.write_changelog(as_of, ctx);
        }
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        // Content that reached the table after the ticks passed it.
        self.advance(self.watermark);
        for id in self.outbox.retry(self.svc.model.as_ref(), &self.reply) {
            self.pending.remove(&id);
            self.stage.error("model_stopped");
        }
        self.drain(ctx);
    }

    fn on_finish(&mut self, _ctx: &mut Context<'_>) {
        self.advance(i64::MAX);
    }

    fn congested(&self) -> bool {
        !self.outbox.is_empty()
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }

    fn holds(&self, holds: &mut Holds) {
        for p in self.pending.values() {
            holds.merge(&p.holds);
        }
        for (_, pos) in self.buffered.values() {
            holds.hold(*pos);
        }
        holds.merge(&self.unflushed);
    }

    fn restore(&mut self, key: &[u8], value: &[u8], _emitted_through_ms: Option<i64>) {
        let (Ok(user), Ok(rec)) = (std::str::from_utf8(key), GiftScoringRecord::decode(value))
        else {
            self.stage.error("changelog_record");
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                "a gift-scoring changelog record could not be read back; it is skipped"
            );
            return;
        };
        if user == "\0" {
            for (p, o) in rec.sources {
                let newest = self.sources.entry(p).or_insert(-1);
                *newest = (*newest).max(o);
            }
            return;
        }
        if let Some(room) = user.strip_prefix('\0') {
            if let Some(r) = rec.room {
                let room: Arc<str> = Arc::from(room);
                self.state
                    .restore_content(&room, r.content_start_ms, Arc::from(r.tokens));
                self.content_at.insert(room, (r.at_ms, Arc::from(r.model)));
            }
            return;
        }
        let sessions = rec
            .sessions
            .into_iter()
            .map(|s| SessionRecord {
                room: Arc::from(s.room_id),
                streamer: Arc::from(s.streamer_id),
                enter_ms: s.enter_ms,
                session: SessionRow {
                    present_ms: 0.0,
                    likes: s.likes,
                    comments: s.comments,
                    gifts: s.gifts,
                    gift_value: s.gift_value,
                    followed: s.followed,
                },
            })
            .collect();
        let history = rec
            .history
            .into_iter()
            .map(|g| Gift {
                streamer_id: Arc::from(g.streamer_id),
                t_ms: g.t_ms,
                value: g.value,
            })
            .collect();
        self.state.restore_user(user, sessions, history);
        for p in rec.pending {
            let Some(a) = p.action else { continue };
            let pos = Position {
                kind: InputKind::UserActions,
                offset: p.offset,
            };
            self.buffered.insert(
                (a.event_time_ms, a.source_partition, a.source_offset),
                (a, pos),
            );
        }
        self.replayed_below
            .insert(Arc::from(user), rec.received_through);
        self.replay_end = self.replay_end.max(rec.received_through);
        self.received_through = self.received_through.max(rec.received_through);
    }

    fn rooms(&self) -> usize {
        self.state.users()
    }

    fn on_revoke(&mut self) {
        self.pending.clear();
        self.outbox.clear();
        self.unwritten.clear();
        self.rooms_unwritten.clear();
        self.unflushed = Holds::default();
        self.group = Holds::default();
        self.replayed_below.clear();
        self.state = ScoringState::new();
        self.content_at.clear();
        self.waiting.clear();
        self.latest.clear();
        self.sources.clear();
        self.sources_unwritten = false;
        self.seen = 0;
        self.buffered.clear();
    }
}
