//! Operators: the per-room computations that run inside partition tasks
//! (see [`crate::runtime::Operator`]). Each file is one operator.
//!
//! Not for: anything that talks to Kafka, or state shared across partitions.

pub mod room_activity;

use crate::config::PipelineConfig;
use crate::runtime::Operator;

/// Builds the operators a pipeline enables, in the order they run.
pub fn build(config: &PipelineConfig) -> Vec<Box<dyn Operator>> {
    let mut ops: Vec<Box<dyn Operator>> = Vec::new();
    if config.operators.room_activity.enabled {
        ops.push(Box::new(room_activity::RoomActivity::new(
            config.runtime.tick_ms,
        )));
    }
    ops
}
