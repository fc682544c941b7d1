//! The runtime: partition tasks that own every room of one partition, merge
//! its input streams in event time, drive ticks from a watermark, run the
//! operators and track which offsets are safe to commit; and the engine that
//! wires a source, the tasks and a sink together.
//!
//! Not for: talking to Kafka (sources and sinks do) or per-room logic
//! (operators do).

mod engine;
mod feed;
mod media;
mod operator;
mod partition;
pub mod transactions;

pub use engine::{Engine, EngineError, RunSummary, SimulatedRun};
pub use feed::{Polled, RecordRef, StreamReader};
pub use operator::{
    changelog_key, room_changelog, split_changelog_key, Context, Embedded, Holds, Note, Operator,
    Output, OutputTopic, Position,
};
pub use partition::{
    ChangelogReader, Checkpoint, Control, Input, InputRecord, PartitionHandle, PartitionShared,
    PartitionSpec, PartitionTask, ReplayMarks,
};
