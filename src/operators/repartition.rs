//! The room stage's half of the user stage's input: every live viewer action,
//! as it arrives on the room's partition, re-keyed by user and written to the
//! `user-actions` topic (Kafka Streams' repartition topic), so that the
//! partition owning a user sees all of that user's actions, in every room, in
//! the order each room produced them.
//!
//! The record is the action as decoded (protobuf, whatever encoding it came
//! in), annotated with its source position (`source_partition`,
//! `source_offset`: the user stage recognises replays by them) and, for
//! entries, the room's latest highlight score this operator has seen (the
//! highlight operator's notes; scores come back from the model a little
//! after their tick, so this is usually the score of a tick or two before).
//! Its id is derived from the source position too, so a replay after a
//! restart writes the same ids.
//!
//! Not for: anything the user stage does with them (see `gift_scoring`).

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use crate::metrics::Stage;
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, ActionKind, Event};

/// The repartition operator for one partition.
pub struct Repartition {
    stage: Stage,
    partition: i32,
    /// Each room's latest highlight score: (tick start, score).
    highlight: HashMap<Arc<str>, (i64, f32)>,
}

impl Repartition {
    /// The operator for one partition.
    pub fn new() -> Self {
        Repartition {
            stage: Stage::new("repartition"),
            partition: 0,
            highlight: HashMap::new(),
        }
    }
}

impl Default for Repartition {
    fn default() -> Self {
        Self::new()
    }
}

impl Operator for Repartition {
    fn name(&self) -> &'static str {
        "repartition"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.partition = ctx.partition();
    }

    fn on_record(&mut self, event: &Event, pos: Position, _late: bool, ctx: &mut Context<'_>) {
        let Event::Action(a) = event else {
            return;
        };
        let mut action = a.clone();
        action.source_partition = self.partition;
        action.source_offset = pos.offset;
        action.highlight_score = None;
        if a.kind() == ActionKind::Enter {
            action.highlight_score = self.highlight.get(a.room_id.as_str()).map(|&(_, s)| s);
        }
        let mut holds = Holds::default();
        holds.hold(pos);
        let id = deterministic_id(&[
            b"user-action",
            &self.partition.to_le_bytes(),
            &pos.offset.to_le_bytes(),
        ]);
        ctx.emit(Output {
            topic: OutputTopic::UserActions,
            key: a.user_id.as_bytes().to_vec(),
            id,
            payload: action.encode_to_vec(),
            headers: Vec::new(),
            model_version: None,
            tick_end_ms: None,
            depends_on: holds,
        });
        self.stage.sent.increment(1);
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        if let Note::HighlightScore {
            room_id,
            tick_start_ms,
            score,
        } = note
        {
            let slot = self
                .highlight
                .entry(room_id.clone())
                .or_insert((i64::MIN, 0.0));
            if *tick_start_ms >= slot.0 {
                *slot = (*tick_start_ms, *score);
            }
        }
    }

    fn holds(&self, _holds: &mut Holds) {}

    fn on_revoke(&mut self) {
        self.highlight.clear();
    }
}
