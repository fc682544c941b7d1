//! The simulator of live rooms (`onair simulate`, and the source of the
//! embedded demo): a deterministic, seeded world of rooms with streamers,
//! excitement curves and highlight moments, real H.264 video and speech
//! audio, multilingual chat and viewers who watch, like and gift, together
//! with the ground truth of what the engine should find.
//!
//! - [`world`]: the world model and its event stream;
//! - [`truth`]: the ground truth, computed independently of the engine;
//! - [`media`]: real encoded media (ffmpeg and espeak-ng);
//! - [`publish`]: writing the event stream to Kafka.
//!
//! Not for: anything the engine needs at run time on real input.

pub mod media;
pub mod publish;
pub mod truth;
pub mod world;

pub use truth::GroundTruth;
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
        rooms: cfg.rooms,
        start_ms,
        duration_ms,
        tick_ms,
        comments_per_sec: cfg.comments_per_sec,
        viewers: cfg.viewers,
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
