//! The in-process simulator source: runs the simulated world at the
//! configured speed and hands its records, encoded exactly as they would be
//! on Kafka, to the partition tasks, so the embedded demo exercises the same
//! decode, merge, operators and sinks as a deployment.
//!
//! It feeds the room stage only: short-video actions (simulated with
//! `short_videos` on) are skipped, as the partition tasks here are the rooms'.
//!
//! Not for: producing to Kafka (that is `onair simulate`, in `simulator`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use tracing::warn;

use super::partition_of;
use crate::runtime::{Control, Input, InputRecord, PartitionHandle};
use crate::schema::InputKind;
use crate::simulator::{SimError, SimEvent, Simulator};

/// How much simulated time one step covers.
const STEP_MS: i64 = 200;

/// Encodes a simulated event as the record its source would send (a room, or
/// for a short-video action the short-video service).
pub fn to_record(ev: &SimEvent) -> (InputKind, Vec<u8>) {
    match ev {
        SimEvent::ShortVideo(s) => (InputKind::ShortVideoActions, s.encode_to_vec()),
        SimEvent::Video(v) => (InputKind::Video, v.encode_to_vec()),
        SimEvent::Audio(a) => (InputKind::Audio, a.encode_to_vec()),
        SimEvent::Comment(c) => (InputKind::Comments, c.encode_to_vec()),
        SimEvent::Action(a) => (InputKind::Actions, a.encode_to_vec()),
    }
}

/// Feeds `sim` to `tasks` (one per partition) until the simulation ends or
/// `stop` is set, pacing simulated time at `speed` x real time; then tells
/// every task that input has ended. Returns the simulator (with its ground
/// truth) and the simulated time reached.
pub async fn feed(
    mut sim: Simulator,
    tasks: &[PartitionHandle],
    speed: f64,
    stop: Arc<AtomicBool>,
) -> Result<(Simulator, i64), SimError> {
    let start_ms = sim.config().start_ms;
    let end_ms = sim.end_ms();
    let partitions = tasks.len() as u32;
    let mut offsets = vec![[0i64; InputKind::COUNT]; tasks.len()];
    let wall0 = Instant::now();
    let mut t = start_ms;
    while t < end_ms && !stop.load(Ordering::Relaxed) {
        let until = (t + STEP_MS).min(end_ms);
        let (back, events) = crate::simulator::advance_off_thread(sim, until).await?;
        sim = back;
        for ev in events {
            // The room stage only: short-video actions are keyed by user and
            // belong to the user stage, which this demo does not run.
            if matches!(ev, SimEvent::ShortVideo(_)) {
                continue;
            }
            let p = partition_of(ev.room_id(), partitions) as usize;
            let (kind, payload) = to_record(&ev);
            let Some(task) = tasks.get(p) else { continue };
            let offset = &mut offsets[p][kind.index()];
            let rec = InputRecord {
                kind,
                topic: Arc::from(kind.name()),
                offset: *offset,
                key: Some(ev.room_id().as_bytes().to_vec()),
                payload: Some(payload),
                content_type: None,
            };
            *offset += 1;
            if task.input.send(Input::Record(rec)).await.is_err() {
                warn!(partition = p, "partition task ended early");
            }
        }
        t = until;
        crate::simulator::pace(wall0, start_ms, t, speed).await;
    }
    for task in tasks {
        let _ = task.control.send(Control::Finish { until_ms: t });
    }
    Ok((sim, t))
}
