//! The room stage's half of the user stage's input: every live viewer action,
//! as it arrives on the room's partition, re-keyed by user and written to the
//! `user-actions` topic (Kafka Streams' repartition topic), so that the
//! partition owning a user sees all of that user's actions, in every room, in
//! the order each room produced them.
//!
//! The record is the action as decoded (protobuf, whatever encoding it came
//! in), annotated with its source position (`source_partition`,
//! `source_offset`: the user stage recognises replays by them). Its id is
//! derived from the source position too, so a replay after a restart writes
//! the same ids.
//!
//! Not for: the room's state at the action (the user stage reads it as of
//! the action's time from the `room-embeddings` table: content and highlight
//! score), or anything the user stage does with them (see `gift_scoring`).

use prost::Message;

use crate::metrics::Stage;
use crate::runtime::{Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, Event};

/// The repartition operator for one partition.
pub struct Repartition {
    stage: Stage,
    partition: i32,
}

impl Repartition {
    /// The operator for one partition.
    pub fn new() -> Self {
        Repartition {
            stage: Stage::new("repartition"),
            partition: 0,
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

    fn holds(&self, _holds: &mut Holds) {}
}
