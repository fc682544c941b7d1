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
//! State lives in memory: after a restart or a hand-over, users' histories
//! and presence start empty (the changelog that restores them is the user
//! stage's next step, with the behaviour sequences).
//!
//! Not for: MFQ (the room stage runs it once per segment, see
//! [`super::mmbee_fusion`]), labels, or training data (the room stage's
//! `gift_labels`).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::sync::Arc;

use metrics::{counter, gauge, Counter, Gauge};
use prost::Message;

use super::mmbee_scoring::{Due, Reason, ScoringState};
use crate::metrics::{Stage, GIFT_PREDICTIONS, MMBEE_USERS};
use crate::models::batcher::{Done, Outbox, ReplyTo};
use crate::models::mmbee::{MmbeeService, PairInput, Reply, Request};
use crate::runtime::{Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, Event, GiftPrediction, ViewerAction, SCHEMA_VERSION,
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
    /// Content read from the table that completed after this partition's
    /// event time: applied once the ticks pass it.
    waiting: HashMap<Arc<str>, RoomContent>,
    /// End of the last closed tick.
    watermark: i64,
    /// Actions waiting for the watermark, by (event time, arrival): the
    /// repartition topic interleaves rooms whose partitions run at their own
    /// pace, so a partition's actions are put back in event-time order first.
    buffered: BTreeMap<(i64, u64), (ViewerAction, Position)>,
    arrivals: u64,
    /// Position of the newest action, held while its pairs are scored.
    last_pos: Option<Position>,
    pending: HashMap<u64, Pending>,
    /// Requests on their way to the batcher.
    outbox: Outbox<Request>,
    next_id: u64,
    reply: ReplyTo<Reply>,
    rx: mpsc::Receiver<Done<Reply>>,
    stage: Stage,
    by_trigger: [Counter; 3],
    users: Option<Gauge>,
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
            waiting: HashMap::new(),
            watermark: i64::MIN,
            buffered: BTreeMap::new(),
            arrivals: 0,
            last_pos: None,
            pending: HashMap::new(),
            outbox: Outbox::default(),
            next_id: 0,
            reply: ReplyTo { tx, wake: None },
            rx,
            stage: Stage::new("gift_scoring"),
            by_trigger: [Reason::Enter, Reason::Content, Reason::Gift]
                .map(|r| counter!(GIFT_PREDICTIONS, "trigger" => trigger(r))),
            users: None,
        }
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
        true
    }

    /// A viewer enters `room` at `t_ms`: the state gets the room's content
    /// from the table first, if it had completed by then.
    fn sync_room(&mut self, room: &str, t_ms: i64) {
        if let Some(c) = self.table.get(room).filter(|c| c.at_ms <= t_ms) {
            self.apply(&Arc::from(room), c);
        }
    }

    /// Reads the table's changes into `waiting` (the newest segment per room).
    fn read_table(&mut self) {
        let (changes, next) = self.table.changes_since(self.seen);
        self.seen = next;
        for (room, c) in changes {
            let newer = self
                .waiting
                .get(&room)
                .is_none_or(|w| w.start_ms < c.start_ms);
            if newer {
                self.waiting.insert(room, c);
            }
        }
    }

    /// Handles, in event-time order, the buffered actions before `wm` and the
    /// room content that completed at or before it: an event-time join of the
    /// partition's actions with the room table, so a viewer who left before a
    /// segment completed is not scored on it, and a gift re-scores exactly the
    /// rooms the viewer was in at the gift.
    fn advance(&mut self, wm: i64) {
        self.read_table();
        loop {
            let action = self.buffered.keys().next().map(|k| k.0).filter(|&t| t < wm);
            let content = self
                .waiting
                .iter()
                .filter(|(_, c)| c.at_ms <= wm)
                .min_by_key(|(_, c)| c.at_ms)
                .map(|(r, c)| (r.clone(), c.at_ms));
            let content_first = match (action, &content) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(t), Some((_, at))) => *at <= t,
            };
            if content_first {
                let room = content.map(|(r, _)| r).unwrap_or_else(|| Arc::from(""));
                if let Some(c) = self.waiting.remove(&room) {
                    if self.state.viewers(&room) > 0 {
                        self.apply(&room, c);
                        self.score_due();
                    }
                }
            } else if let Some((_, (a, pos))) = action.and_then(|_| self.buffered.pop_first()) {
                self.handle(&a, pos);
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
        self.score_due();
    }

    /// Turns the due pairs into ranker requests. A pair is scored as of the
    /// event time of what made it due: the viewer's action, or the moment
    /// the room's content segment completed.
    fn score_due(&mut self) {
        let due = self.state.take_due();
        let mut holds = Holds::default();
        if let Some(p) = self.last_pos {
            holds.hold(p);
        }
        for d in due {
            let t = match d.reason {
                Reason::Content => self.content_at.get(&d.room).map_or(self.action_ms, |c| c.0),
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
            let id = deterministic_id(&[
                b"gift-prediction",
                p.due.user.as_bytes(),
                p.due.room.as_bytes(),
                &p.t_ms.to_le_bytes(),
                trig.as_bytes(),
                model.as_bytes(),
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
                // -1: the room's tokens came from another version's MFQ (a
                // version change) and were not read.
                content_start_ms: if scored.content {
                    p.content_start_ms
                } else {
                    -1
                },
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
        if relevant {
            self.arrivals += 1;
            self.buffered
                .insert((a.event_time_ms, self.arrivals), (a.clone(), pos));
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
    }

    fn rooms(&self) -> usize {
        self.state.users()
    }

    fn on_revoke(&mut self) {
        self.pending.clear();
        self.outbox.clear();
        self.state = ScoringState::new();
        self.content_at.clear();
        self.waiting.clear();
        self.buffered.clear();
    }
}
