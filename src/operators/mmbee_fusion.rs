//! MMBee's content fusion in the room stage: every completed content segment
//! of a room ([`Note::Content`]) goes through MFQ once (the streamer's query
//! tokens over the segment's frames, comments and speech), batched across the
//! instance's rooms, and the room's content tokens are written to the
//! compacted `room-embeddings` topic, keyed by room. The user stage reads that
//! topic as a global table: a new record re-scores the room's viewers.
//!
//! MFQ does not depend on the viewer, so this is the only place it runs.
//!
//! Not for: assembling segments ([`super::mmbee_content`]), viewers, or scoring
//! pairs ([`super::gift_scoring`], in the user stage).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use prost::Message;

use crate::metrics::Stage;
use crate::models::batcher::{Done, Outbox, ReplyTo};
use crate::models::mmbee::{ContentInput, MmbeeService, Reply, Request};
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, Event, RoomEmbedding, SCHEMA_VERSION};

/// A segment waiting for its tokens.
#[derive(Clone, Debug)]
struct Pending {
    room_id: Arc<str>,
    streamer_id: Arc<str>,
    start_ms: i64,
    end_ms: i64,
    at_ms: i64,
    holds: Holds,
}

/// The fusion operator for one partition.
pub struct MmbeeFusion {
    svc: Arc<MmbeeService>,
    pending: HashMap<u64, Pending>,
    /// Requests on their way to the batcher.
    outbox: Outbox<Request>,
    next_id: u64,
    reply: ReplyTo<Reply>,
    rx: mpsc::Receiver<Done<Reply>>,
    stage: Stage,
    tick_ms: i64,
}

impl MmbeeFusion {
    /// The operator for one partition, sharing the instance's model.
    pub fn new(svc: Arc<MmbeeService>) -> Self {
        let (tx, rx) = mpsc::channel();
        MmbeeFusion {
            svc,
            pending: HashMap::new(),
            outbox: Outbox::default(),
            next_id: 0,
            reply: ReplyTo { tx, wake: None },
            rx,
            stage: Stage::new("mmbee_fusion"),
            tick_ms: 1_000,
        }
    }

    fn drain(&mut self, ctx: &mut Context<'_>) {
        while let Ok(done) = self.rx.try_recv() {
            let Some(p) = self.pending.remove(&done.id) else {
                continue;
            };
            let (tokens, d) = match done.result {
                Ok(Reply::Tokens { tokens, dim }) => (tokens, dim.max(1)),
                Ok(Reply::Pair(_)) => {
                    self.stage.error("wrong_reply");
                    continue;
                }
                Err(e) => {
                    self.stage.error("model");
                    tracing::warn!(room = %p.room_id, error = %e, "MFQ failed; the room keeps its previous content");
                    continue;
                }
            };
            let model = done.model.to_string();
            let id = deterministic_id(&[
                b"room-embedding",
                p.room_id.as_bytes(),
                &p.start_ms.to_le_bytes(),
                model.as_bytes(),
            ]);
            let rec = RoomEmbedding {
                schema_version: SCHEMA_VERSION,
                id: id.clone(),
                room_id: p.room_id.to_string(),
                streamer_id: p.streamer_id.to_string(),
                event_time_ms: p.at_ms,
                rows: tokens.len() as u32 / d,
                dim: d,
                embedding: tokens.to_vec(),
                model_version: model.clone(),
                segment_start_ms: p.start_ms,
                segment_end_ms: p.end_ms,
                ..RoomEmbedding::default()
            };
            self.stage.sent.increment(1);
            ctx.emit(Output {
                topic: OutputTopic::RoomEmbeddings,
                key: p.room_id.as_bytes().to_vec(),
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

impl Operator for MmbeeFusion {
    fn name(&self) -> &'static str {
        "mmbee_fusion"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.reply.wake = ctx.wake();
        self.tick_ms = ctx.tick_ms();
    }

    /// The tick a segment completed in, while its tokens are computed: the
    /// partition's content progress stays before it (see
    /// [`crate::sources::room_table`]).
    fn unfinished_tick(&self) -> Option<i64> {
        self.pending.values().map(|p| p.at_ms - self.tick_ms).min()
    }

    fn on_record(&mut self, _event: &Event, _pos: Position, _late: bool, _ctx: &mut Context<'_>) {}

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        let Note::Content {
            room_id,
            streamer_id,
            start_ms,
            end_ms,
            at_ms,
            content,
            holds,
        } = note
        else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                room_id: room_id.clone(),
                streamer_id: streamer_id.clone(),
                start_ms: *start_ms,
                end_ms: *end_ms,
                at_ms: *at_ms,
                holds: *holds,
            },
        );
        let req = Request::Content(ContentInput::new(content, streamer_id));
        if !self
            .outbox
            .send(self.svc.model.as_ref(), room_id, id, req, &self.reply)
        {
            self.pending.remove(&id);
            self.stage.error("model_stopped");
        }
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        for id in self.outbox.retry(self.svc.model.as_ref(), &self.reply) {
            self.pending.remove(&id);
            self.stage.error("model_stopped");
        }
        self.drain(ctx);
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
    }

    fn rooms(&self) -> usize {
        0
    }

    fn on_revoke(&mut self) {
        self.pending.clear();
        self.outbox.clear();
    }
}
