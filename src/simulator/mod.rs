//! The simulator of live rooms (`onair simulate`, and the source of the
//! embedded demo): a deterministic, seeded world of rooms with streamers,
//! excitement curves and highlight moments, real H.264 video and speech
//! audio, multilingual chat and viewers who watch, like and gift, together
//! with the ground truth of what the engine should find.
//!
//! - [`world`]: the world model and its event stream;
//! - [`truth`]: the ground truth, computed independently of the engine;
//! - [`media`]: real encoded media (ffmpeg and espeak-ng);
//! - `shorts`: the users' short-video feed (with `short_videos` on);
//! - [`publish`]: writing the event stream to Kafka.
//!
//! Not for: anything the engine needs at run time on real input.

pub mod media;
pub mod publish;
mod shorts;
pub mod truth;
pub mod world;

pub use truth::{GroundTruth, StreamerTruth, ViewerTruth};
pub use world::{RoomInfo, SimConfig, SimError, SimEvent, Simulator};

use crate::config::SimulatorConfig;

/// The simulator's own config from a pipeline's `[simulator]` table.
pub fn sim_config(
    cfg: &SimulatorConfig,
    start_ms: i64,
    duration_ms: i64,
    tick_ms: i64,
) -> SimConfig {
    SimConfig {
        seed: cfg.seed,
        day: cfg.day,
        rooms: cfg.rooms,
        start_ms,
        duration_ms,
        tick_ms,
        comments_per_sec: cfg.comments_per_sec,
        viewers: cfg.viewers,
        shared_viewers: cfg.shared_viewers,
        video: cfg.video.then_some(media::VideoSpec {
            width: cfg.video_width,
            height: cfg.video_height,
            fps: cfg.video_fps,
        }),
        segment_ms: cfg.segment_ms,
        audio_chunk_ms: 1000,
        audio: cfg.audio,
        speech: cfg.speech && cfg.audio,
        video_variants: cfg.video_variants,
        short_videos: cfg.short_videos,
    }
}

/// Now, rounded down to a whole minute: the default start of a simulation
/// (records stamped near the present are not expired by broker retention).
pub fn default_start_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(1_767_225_600_000);
    now - now.rem_euclid(60_000)
}

/// Advances `sim` to `until_ms` on tokio's blocking pool (drawing and
/// encoding video is CPU work) and hands it back with the events.
pub async fn advance_off_thread(
    mut sim: Simulator,
    until_ms: i64,
) -> Result<(Simulator, Vec<SimEvent>), SimError> {
    let (events, sim) = tokio::task::spawn_blocking(move || (sim.advance(until_ms), sim))
        .await
        .map_err(|_| SimError::WorkerPanicked)?;
    Ok((sim, events?))
}

/// Sleeps until simulated time `t_ms` is due, simulated time running at
/// `speed` x real time from `start_ms` at `wall0` (an infinite speed never waits).
pub async fn pace(wall0: std::time::Instant, start_ms: i64, t_ms: i64, speed: f64) {
    if speed.is_finite() && speed > 0.0 {
        let due =
            wall0 + std::time::Duration::from_secs_f64((t_ms - start_ms) as f64 / 1000.0 / speed);
        tokio::time::sleep_until(due.into()).await;
    }
}
