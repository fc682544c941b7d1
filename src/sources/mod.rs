//! Sources: where input records come from and how they reach partition
//! tasks. [`kafka`] is a consumer-group member over one stage's
//! co-partitioned topics (the room topics, or the user stage's); [`room_table`]
//! follows the compacted `room-embeddings` topic as a global table;
//! [`simulator`] feeds the simulator's rooms in process (the embedded
//! default, no broker).
//!
//! Not for: decoding or event-time logic (partition tasks do both).

pub mod changelog;
pub mod kafka;
pub mod room_table;
pub mod simulator;
mod stream_queue;

/// Which partition a room lands on when onair itself spreads rooms (the
/// simulator source). Kafka producers use their own partitioner.
pub fn partition_of(room_id: &str, partitions: u32) -> i32 {
    let mut h: u32 = 0x811c9dc5;
    for b in room_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    (h % partitions.max(1)) as i32
}
