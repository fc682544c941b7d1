//! Models: loading and running the networks the engine serves — pretrained
//! ones fetched and converted by `scripts/models` (Whisper for speech, Silero
//! for voice activity) and, in later work, the project's own. Each wrapper
//! takes decoded inputs and returns plain results; nothing here knows about
//! rooms or Kafka.
//!
//! Not for: training (see `models/` at the project root) or deciding when a
//! model runs (operators do).

pub mod asr;
pub mod batcher;
pub mod highlight;
pub mod image;
pub mod interests;
pub mod mmbee;
pub mod onnx;
pub mod serving;
pub mod text;
#[cfg(feature = "torch")]
pub mod torch;
pub mod vad;
pub mod whisper;

/// Why a model could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file is missing or unreadable (run `scripts/models`).
    #[error("model file {path}: {reason} (scripts/models fetches and converts it)")]
    Missing {
        /// Where it was looked for.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The model refused the input.
    #[error("bad model input: {0}")]
    Input(String),
    /// The model library failed.
    #[error("model failure: {0}")]
    Runtime(String),
}

impl crate::error::Classify for ModelError {
    fn fault(&self) -> crate::error::Fault {
        match self {
            ModelError::Missing { .. } => crate::error::Fault::External,
            ModelError::Input(_) => crate::error::Fault::Input,
            ModelError::Runtime(_) => crate::error::Fault::Internal,
        }
    }
}
