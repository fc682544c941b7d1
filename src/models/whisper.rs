//! Speech recognition with Whisper (whisper.cpp through whisper-rs): 16 kHz
//! mono audio in, timed text segments and the detected language out.
//!
//! The model is loaded once and shared; each transcription makes its own
//! decoding state, so calls may run on several threads at once. Decoding is
//! greedy without temperature fallback, so a call's cost is bounded by the
//! audio's length (the encoder always processes a 30 s window unless
//! `audio_ctx` shortens it).
//!
//! Not for: finding speech (voice activity decides what is sent here) or
//! choosing which rooms get transcribed (the ASR budget does).

use std::path::Path;
use std::sync::Once;

use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

use super::ModelError;

/// The sample rate Whisper reads.
pub const SAMPLE_RATE: u32 = 16_000;

/// How to transcribe.
#[derive(Clone, Debug, PartialEq)]
pub struct AsrOptions {
    /// Threads for one transcription.
    pub threads: usize,
    /// A language code ("en", "zh") to force, or None to detect it.
    pub language: Option<String>,
    /// When detecting: the languages to choose from (the most likely of
    /// them wins); empty: any language Whisper knows. Live rooms speak a
    /// known set, and on noisy audio an open choice drifts (espeak-ng
    /// English over crowd noise was once detected as Thai).
    pub candidates: Vec<String>,
    /// Audio context in encoder frames (50 per second, at most 1500 = 30 s);
    /// 0: the full window. A short context is faster but, tried on short
    /// espeak-ng sentences fitted to their length, made base repeat itself
    /// (English WER 0.08 -> 5.4), so the default keeps the full window.
    pub audio_ctx: i32,
    /// Text the decoder sees as if it came before (e.g. "以下是普通话的句子。"
    /// makes Mandarin come out in simplified characters).
    pub prompt: Option<String>,
}

impl Default for AsrOptions {
    fn default() -> Self {
        AsrOptions {
            threads: 1,
            language: None,
            candidates: Vec::new(),
            audio_ctx: 0,
            prompt: None,
        }
    }
}

/// One recognised stretch of speech.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    /// Start, ms from the start of the audio given.
    pub start_ms: i64,
    /// End, ms from the start of the audio given.
    pub end_ms: i64,
    /// The text.
    pub text: String,
}

/// What one call recognised.
#[derive(Clone, Debug, PartialEq)]
pub struct Transcription {
    /// Detected (or forced) language code, e.g. "en" or "zh".
    pub language: String,
    /// The segments in order.
    pub segments: Vec<Segment>,
}

impl Transcription {
    /// All segments' text joined with spaces.
    pub fn text(&self) -> String {
        self.segments
            .iter()
            .map(|s| s.text.trim())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A loaded Whisper model.
pub struct Whisper {
    ctx: WhisperContext,
}

impl Whisper {
    /// Loads a ggml model file (see `scripts/models`).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        static QUIET: Once = Once::new();
        // whisper.cpp and ggml print to stderr; route them into nothing (the
        // crate's hooks without a logging backend drop them).
        QUIET.call_once(whisper_rs::install_logging_hooks);
        let missing = |reason: String| ModelError::Missing {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(missing("not found".into()));
        }
        let p = path
            .to_str()
            .ok_or_else(|| missing("path is not UTF-8".into()))?;
        let ctx = WhisperContext::new_with_params(p, WhisperContextParameters::default())
            .map_err(|e| missing(format!("cannot load: {e}")))?;
        Ok(Whisper { ctx })
    }

    /// Transcribes mono 16 kHz samples.
    pub fn transcribe(
        &self,
        samples: &[f32],
        opts: &AsrOptions,
    ) -> Result<Transcription, ModelError> {
        if samples.is_empty() {
            return Err(ModelError::Input("no audio".into()));
        }
        if samples.iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Input(
                "audio with NaN or infinite samples".into(),
            ));
        }
        let mut state = self
            .ctx
            .create_state()
            .map_err(|e| ModelError::Runtime(format!("state: {e}")))?;
        let threads = opts.threads.clamp(1, 64);
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(threads as i32);
        params.set_translate(false);
        params.set_no_context(true);
        params.set_temperature_inc(0.0);
        params.set_audio_ctx(opts.audio_ctx.clamp(0, 1500));
        if let Some(p) = opts.prompt.as_deref() {
            params.set_initial_prompt(p);
        }
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_special(false);
        params.set_print_timestamps(false);
        // Whisper pads the window with silence; anything shorter than ~1 s
        // is better padded by us to one second than refused.
        let padded: Vec<f32>;
        let audio = if samples.len() < SAMPLE_RATE as usize {
            let mut p = samples.to_vec();
            p.resize(SAMPLE_RATE as usize + SAMPLE_RATE as usize / 10, 0.0);
            padded = p;
            &padded[..]
        } else {
            samples
        };
        let language = match (&opts.language, opts.candidates.is_empty()) {
            (Some(l), _) => l.as_str(),
            (None, true) => "auto",
            (None, false) => {
                // What whisper.cpp's "auto" does (encode the first 30 s, one
                // decoder step), choosing among the candidates only.
                state
                    .pcm_to_mel(audio, threads)
                    .map_err(|e| ModelError::Runtime(format!("mel spectrogram: {e}")))?;
                let (_, probs) = state
                    .lang_detect(0, threads)
                    .map_err(|e| ModelError::Runtime(format!("language detection: {e}")))?;
                opts.candidates
                    .iter()
                    .filter_map(|c| {
                        let id = whisper_rs::get_lang_id(c)?;
                        Some((c.as_str(), probs.get(usize::try_from(id).ok()?).copied()?))
                    })
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or("auto", |(c, _)| c)
            }
        };
        params.set_language(Some(language));
        state
            .full(params, audio)
            .map_err(|e| ModelError::Runtime(format!("transcription: {e}")))?;
        let language = whisper_rs::get_lang_str(state.full_lang_id_from_state())
            .unwrap_or("unknown")
            .to_string();
        let segments = state
            .as_iter()
            .map(|s| Segment {
                // whisper.cpp timestamps are in 10 ms units.
                start_ms: s.start_timestamp() * 10,
                end_ms: s.end_timestamp() * 10,
                text: s.to_str_lossy().map(|t| t.into_owned()).unwrap_or_default(),
            })
            .collect();
        Ok(Transcription { language, segments })
    }
}
