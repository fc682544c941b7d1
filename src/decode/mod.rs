//! Decode: turns a room's encoded media (the bytes of a video or audio
//! record) into what the models read — sampled, scaled, normalised frames
//! and 16 kHz mono audio — safely, whatever the bytes are.
//!
//! Everything here is synchronous and CPU-bound: callers run it on a bounded
//! pool of blocking threads, never on the async runtime's threads. Each call
//! is bounded in time (a deadline FFmpeg's I/O polls) and in output (frame
//! and sample caps), and reports a [`MediaError`] whose reason names the
//! dead-letter cause.
//!
//! Not for: deciding which rooms to decode or when (operators do), or
//! running models on the results (features do).

pub mod audio;
pub mod demux;
pub mod pool;
pub mod resample;
pub mod video;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Classify, Fault};

/// What one media record decoded to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedMedia {
    /// Sampled frames (video records).
    pub video: Option<video::DecodedVideo>,
    /// 16 kHz mono audio (audio records, and a segment's audio track).
    pub audio: Option<audio::DecodedAudio>,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// Nothing to decode.
    #[error("empty payload")]
    Empty,
    /// The payload is larger than allowed before decoding starts.
    #[error("payload of {size} bytes is over the {limit}-byte limit")]
    Oversized {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The container or codec is not one onair decodes.
    #[error("unsupported media: {0}")]
    Unsupported(String),
    /// The bytes are not valid media of the declared kind.
    #[error("corrupt media: {0}")]
    Corrupt(String),
    /// The payload ended early: part of it decoded.
    #[error("truncated media: {0}")]
    Truncated(String),
    /// A fragmented-MP4 media segment came before its room's init segment.
    #[error("fragmented-MP4 segment without an init segment for the room")]
    MissingInit,
    /// Picture dimensions outside the accepted range.
    #[error(
        "picture of {width}x{height} is outside the accepted size (at most {max_pixels} pixels)"
    )]
    Geometry {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Largest accepted width x height.
        max_pixels: u64,
    },
    /// Decoding took longer than its budget.
    #[error("decoding took over {0:?}")]
    TooSlow(Duration),
    /// Decoding produced more than its output cap.
    #[error("payload decodes to more than {0}")]
    TooLarge(String),
    /// FFmpeg failed in a way that is not the input's fault.
    #[error("media library failure: {0}")]
    Library(String),
}

impl MediaError {
    /// Every reason [`Self::reason`] gives.
    pub const REASONS: [&'static str; 10] = [
        "media_empty",
        "oversized",
        "media_unsupported",
        "media_corrupt",
        "media_truncated",
        "media_missing_init",
        "media_geometry",
        "media_too_slow",
        "media_too_large",
        "media_library",
    ];

    /// Short machine-readable reason (dead-letter header, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            MediaError::Empty => "media_empty",
            MediaError::Oversized { .. } => "oversized",
            MediaError::Unsupported(_) => "media_unsupported",
            MediaError::Corrupt(_) => "media_corrupt",
            MediaError::Truncated(_) => "media_truncated",
            MediaError::MissingInit => "media_missing_init",
            MediaError::Geometry { .. } => "media_geometry",
            MediaError::TooSlow(_) => "media_too_slow",
            MediaError::TooLarge(_) => "media_too_large",
            MediaError::Library(_) => "media_library",
        }
    }
}

impl Classify for MediaError {
    fn fault(&self) -> Fault {
        match self {
            MediaError::Library(_) => Fault::Internal,
            _ => Fault::Input,
        }
    }
}

/// Initialises FFmpeg once per process and silences its own logging (its
/// messages go to stderr, unstructured; errors come back as [`MediaError`]).
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        ffmpeg_next::init().map_err(|e| e.to_string())?;
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Quiet);
        Ok(())
    })
    .clone()
    .map_err(MediaError::Library)
}

/// A decode's time budget, shared by FFmpeg's I/O callback and the loops.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The error for a decode that ran past it.
    pub fn error(&self) -> MediaError {
        MediaError::TooSlow(self.budget)
    }

    /// Errs when the deadline has passed.
    pub fn check(&self) -> Result<(), MediaError> {
        if self.passed() {
            Err(self.error())
        } else {
            Ok(())
        }
    }
}

/// Maps an FFmpeg error met while reading or decoding the input.
fn input_error(what: &str, e: ffmpeg_next::Error) -> MediaError {
    use ffmpeg_next::Error as E;
    match e {
        E::InvalidData | E::Eof | E::Bug | E::Bug2 => MediaError::Corrupt(format!("{what}: {e}")),
        E::DecoderNotFound | E::DemuxerNotFound | E::StreamNotFound | E::PatchWelcome => {
            MediaError::Unsupported(format!("{what}: {e}"))
        }
        E::Exit => MediaError::Corrupt(format!("{what}: interrupted")),
        other => MediaError::Corrupt(format!("{what}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::MediaError;

    #[test]
    fn every_reason_is_listed() {
        let s = || String::new();
        let all = [
            MediaError::Empty,
            MediaError::Oversized { size: 0, limit: 0 },
            MediaError::Unsupported(s()),
            MediaError::Corrupt(s()),
            MediaError::Truncated(s()),
            MediaError::MissingInit,
            MediaError::Geometry {
                width: 0,
                height: 0,
                max_pixels: 0,
            },
            MediaError::TooSlow(std::time::Duration::ZERO),
            MediaError::TooLarge(s()),
            MediaError::Library(s()),
        ];
        let reasons: Vec<&str> = all.iter().map(MediaError::reason).collect();
        assert_eq!(reasons, MediaError::REASONS);
    }
}
