//! Voice activity detection with Silero VAD (v6, ONNX) run by ONNX Runtime
//! through `ort`: 16 kHz mono samples in, one speech probability per 32 ms
//! chunk (512 samples) out.
//!
//! A [`SileroVad`] follows one stream: the model is recurrent, so it keeps the
//! network's state and the last 64 samples of the previous chunk, which it
//! puts in front of the next one, exactly as the `silero-vad` package's own
//! `OnnxWrapper` does. ONNX Runtime itself is loaded by [`super::onnx`].
//!
//! Not for: turning probabilities into speech segments (thresholds, minimum
//! lengths and padding belong to the operator that calls this), resampling
//! (callers hand over 16 kHz audio), or 8 kHz audio (the model can, this
//! wrapper does not).

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::TensorRef;

use super::ModelError;

/// The Silero model under a models folder.
const MODEL_IN_MODELS: &str = "silero/silero_vad.onnx";
/// Samples of the previous chunk put in front of each chunk at 16 kHz.
const CONTEXT: usize = 64;
/// The recurrent state's shape: [2, batch 1, 128].
const STATE_SHAPE: [usize; 3] = [2, 1, 128];
/// Elements in the recurrent state.
const STATE_LEN: usize = 2 * 128;

/// One stream's recurrent memory for [`SileroVad::chunk_in`]: the network's
/// state and the last 64 samples the model saw. `VadStream::default()` is a
/// fresh stream.
///
/// Lets one loaded [`SileroVad`] serve many streams (e.g. one per room) in
/// turn, each keeping its own `VadStream`.
#[derive(Clone, Debug, PartialEq)]
pub struct VadStream {
    /// The model's `state`, [2, 1, 128], row-major.
    state: Vec<f32>,
    /// The last [`CONTEXT`] samples of the previous model input.
    context: Vec<f32>,
}

impl Default for VadStream {
    fn default() -> Self {
        VadStream {
            state: vec![0.0; STATE_LEN],
            context: vec![0.0; CONTEXT],
        }
    }
}

/// One stream's voice activity detector: session + recurrent state + 64-sample
/// context.
///
/// Feed it consecutive [`SileroVad::CHUNK`]-sample chunks of one stream with
/// [`SileroVad::chunk`], and call [`SileroVad::reset`] before reusing it for
/// another; or keep one [`VadStream`] per stream and use
/// [`SileroVad::chunk_in`].
pub struct SileroVad {
    session: Session,
    /// Scratch for the model's `input`: the context, then the chunk.
    input: Vec<f32>,
    /// The stream [`SileroVad::chunk`] follows.
    own: VadStream,
}

impl std::fmt::Debug for SileroVad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroVad").finish_non_exhaustive()
    }
}

impl SileroVad {
    /// The sample rate the detector reads.
    pub const RATE: u32 = 16_000;
    /// Samples per decision (32 ms at 16 kHz).
    pub const CHUNK: usize = 512;

    /// Loads the Silero ONNX model (`silero_vad.onnx` from `silero-vad` 6.2.3;
    /// see `scripts/models`), loading ONNX Runtime first if this process has
    /// not (see [`super::onnx::init_onnx_runtime`]). The session runs on one intra-op and
    /// one inter-op thread with all graph optimisations on.
    pub fn load(model: &Path) -> Result<Self, ModelError> {
        let session = super::onnx::session(model, 1)?;
        let missing = |reason: String| ModelError::Missing {
            path: model.display().to_string(),
            reason,
        };
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let has = |names: &[&str], want: &[&str]| want.iter().all(|w| names.contains(w));
        if !has(&inputs, &["input", "state", "sr"]) || !has(&outputs, &["output", "stateN"]) {
            return Err(missing(format!(
                "not a Silero VAD v5/v6 model (inputs {inputs:?}, outputs {outputs:?})"
            )));
        }
        Ok(SileroVad {
            session,
            input: vec![0.0; CONTEXT + Self::CHUNK],
            own: VadStream::default(),
        })
    }

    /// Where the model is: `models/silero/silero_vad.onnx` under the working
    /// directory if it is there, else under `$ONAIR_MODELS` if that is set
    /// and holds it; when neither has it, the working-directory path (so the
    /// error from [`SileroVad::load`] names it).
    pub fn default_model_path() -> PathBuf {
        let places: Vec<PathBuf> = super::onnx::models_dirs()
            .into_iter()
            .map(|dir| dir.join(MODEL_IN_MODELS))
            .collect();
        places
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| Path::new("models").join(MODEL_IN_MODELS))
    }

    /// Speech probability of the next CHUNK samples of the stream (16 kHz
    /// mono f32 in [-1,1]); errors if len != CHUNK.
    ///
    /// Also refuses non-finite samples (they would poison the recurrent
    /// state). A refused or failed chunk leaves the stream's state as it was.
    pub fn chunk(&mut self, samples: &[f32]) -> Result<f32, ModelError> {
        step(&mut self.session, &mut self.input, &mut self.own, samples)
    }

    /// Like [`SileroVad::chunk`], for the stream whose memory is `stream`
    /// instead of the detector's own one.
    pub fn chunk_in(&mut self, stream: &mut VadStream, samples: &[f32]) -> Result<f32, ModelError> {
        step(&mut self.session, &mut self.input, stream, samples)
    }

    /// Forgets the stream (state and context to zero).
    pub fn reset(&mut self) {
        self.own = VadStream::default();
    }
}

/// Runs one chunk of `stream` through the model, as the `silero-vad`
/// package's `OnnxWrapper.__call__` does at 16 kHz: the model reads the
/// stream's 64 context samples followed by the chunk, with the stream's state;
/// on success the stream keeps the returned state and the input's last 64
/// samples. `input` is scratch of CONTEXT + CHUNK samples.
fn step(
    session: &mut Session,
    input: &mut [f32],
    stream: &mut VadStream,
    samples: &[f32],
) -> Result<f32, ModelError> {
    const CHUNK: usize = SileroVad::CHUNK;
    if samples.len() != CHUNK {
        return Err(ModelError::Input(format!(
            "VAD chunk of {} samples (needs {CHUNK})",
            samples.len()
        )));
    }
    if samples.iter().any(|s| !s.is_finite()) {
        return Err(ModelError::Input("non-finite audio sample".into()));
    }
    input[..CONTEXT].copy_from_slice(&stream.context);
    input[CONTEXT..].copy_from_slice(samples);
    let runtime = |e: ort::Error| ModelError::Runtime(format!("Silero VAD: {e}"));
    let sr = [i64::from(SileroVad::RATE)];
    let model_input =
        TensorRef::from_array_view(([1, CONTEXT + CHUNK], &input[..])).map_err(runtime)?;
    let state = TensorRef::from_array_view((STATE_SHAPE, &stream.state[..])).map_err(runtime)?;
    let sr = TensorRef::from_array_view(([0usize; 0], &sr[..])).map_err(runtime)?;
    let outputs = session
        .run(ort::inputs!["input" => model_input, "state" => state, "sr" => sr])
        .map_err(runtime)?;
    let (_, prob) = outputs["output"]
        .try_extract_tensor::<f32>()
        .map_err(runtime)?;
    let (_, next) = outputs["stateN"]
        .try_extract_tensor::<f32>()
        .map_err(runtime)?;
    let prob = match prob {
        [p] => *p,
        other => {
            return Err(ModelError::Runtime(format!(
                "Silero VAD gave {} probabilities for one chunk",
                other.len()
            )))
        }
    };
    if next.len() != STATE_LEN {
        return Err(ModelError::Runtime(format!(
            "Silero VAD gave a state of {} values (expected {STATE_LEN})",
            next.len()
        )));
    }
    stream.state.copy_from_slice(next);
    stream.context.copy_from_slice(&input[CHUNK..]);
    Ok(prob)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::simulator::media::{synthesize_speech, Lang};

    const _: () = {
        const fn send<T: Send>() {}
        send::<SileroVad>();
        send::<VadStream>();
    };

    /// The detector on the model `scripts/models` installs; fails (does not
    /// skip) when it is absent.
    fn vad() -> SileroVad {
        let path = SileroVad::default_model_path();
        assert!(
            path.is_file(),
            "{} is missing: run scripts/models before the tests",
            path.display()
        );
        SileroVad::load(&path).unwrap_or_else(|e| panic!("{e} (run scripts/models)"))
    }

    fn probabilities(vad: &mut SileroVad, audio: &[f32]) -> Vec<f32> {
        audio
            .chunks_exact(SileroVad::CHUNK)
            .map(|c| vad.chunk(c).expect("vad chunk"))
            .collect()
    }

    /// Fraction of `probs` for which `pred` holds.
    fn share(probs: &[f32], pred: impl Fn(f32) -> bool) -> f64 {
        assert!(!probs.is_empty(), "no chunks to judge");
        probs.iter().filter(|&&p| pred(p)).count() as f64 / probs.len() as f64
    }

    /// Chunks wholly inside samples `start..end`.
    fn chunks_within(start: usize, end: usize) -> std::ops::Range<usize> {
        start.div_ceil(SileroVad::CHUNK)..end / SileroVad::CHUNK
    }

    #[test]
    fn speech_is_detected_and_silence_tone_and_noise_are_not() {
        let rate = SileroVad::RATE as usize;
        let pcm = synthesize_speech(
            "The quick brown fox jumps over the lazy dog. \
             Live streams carry a lot of people talking at once.",
            Lang::En,
        )
        .expect("espeak-ng speech (install espeak-ng)");
        // espeak-ng pads its output with a little silence: measure speech
        // from the first to the last sample that is clearly not silent.
        let loud = |s: &i16| s.unsigned_abs() > 300;
        let first = pcm.iter().position(loud).expect("audible speech");
        let last = pcm.iter().rposition(loud).expect("audible speech");
        let speech: Vec<f32> = pcm[first..=last]
            .iter()
            .map(|&s| f32::from(s) / 32768.0)
            .collect();

        let mut audio = vec![0.0f32; rate];
        let speech_at = audio.len();
        audio.extend_from_slice(&speech);
        let speech_end = audio.len();
        audio.extend(std::iter::repeat_n(0.0, rate));
        // The tone and the noise fade in and out over 10 ms and are kept
        // apart by 0.5 s of silence: a hard cut from one to the other is a
        // click, which the model (rightly) finds speech-like for a chunk or two.
        let fade = |i: usize| (i.min(rate - 1 - i) as f32 / (rate / 100) as f32).min(1.0);
        let tone_at = audio.len();
        audio.extend((0..rate).map(|i| {
            let t = i as f32 / rate as f32;
            fade(i) * 0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
        }));
        let gap_at = audio.len();
        audio.extend(std::iter::repeat_n(0.0, rate / 2));
        let noise_at = audio.len();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        audio.extend((0..rate).map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            fade(i) * 0.01 * ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        }));
        let end = audio.len();

        let mut vad = vad();
        let started = Instant::now();
        let probs = probabilities(&mut vad, &audio);
        let took = started.elapsed();
        eprintln!(
            "silero vad: {:.2} s of audio ({} chunks) in {:.1} ms",
            audio.len() as f64 / rate as f64,
            probs.len(),
            took.as_secs_f64() * 1e3
        );

        eprintln!(
            "probabilities (%) per chunk: {:?}",
            probs
                .iter()
                .map(|p| (p * 100.0).round() as i32)
                .collect::<Vec<_>>()
        );
        let speech_probs = &probs[chunks_within(speech_at, speech_end)];
        let lead_probs = &probs[chunks_within(0, speech_at)];
        let after_probs = &probs[chunks_within(speech_end, tone_at)];
        let tone_probs = &probs[chunks_within(tone_at, gap_at)];
        let gap_probs = &probs[chunks_within(gap_at, noise_at)];
        let noise_probs = &probs[chunks_within(noise_at, end)];
        let quiet = |p: f32| p < 0.5;
        let in_speech = share(speech_probs, |p| p > 0.5);
        let lead = share(lead_probs, quiet);
        let after = share(after_probs, quiet);
        let tone = share(tone_probs, quiet);
        let noise = share(noise_probs, quiet);
        let not_speech = share(
            &[lead_probs, after_probs, tone_probs, gap_probs, noise_probs].concat(),
            quiet,
        );
        eprintln!(
            "speech chunks > 0.5: {in_speech:.3}; < 0.5 in leading silence {lead:.3}, \
             trailing silence {after:.3}, tone {tone:.3}, noise {noise:.3}, \
             all non-speech {not_speech:.3}"
        );
        assert!(
            in_speech >= 0.8,
            "speech detected in {in_speech:.3} of its chunks"
        );
        assert!(lead >= 0.95, "leading silence: {lead:.3} below 0.5");
        assert!(after >= 0.9, "trailing silence: {after:.3} below 0.5");
        assert!(tone >= 0.95, "tone: {tone:.3} below 0.5");
        assert!(noise >= 0.95, "noise: {noise:.3} below 0.5");
        assert!(not_speech >= 0.95, "non-speech: {not_speech:.3} below 0.5");

        // Forgetting the stream makes a second pass identical.
        vad.reset();
        let again = probabilities(&mut vad, &audio);
        assert_eq!(probs, again, "reset() did not make the run repeatable");
    }

    #[test]
    fn state_carries_between_chunks_and_reset_clears_it() {
        let mut vad = vad();
        let chunk: Vec<f32> = (0..SileroVad::CHUNK)
            .map(|i| 0.2 * (i as f32 * 0.05).sin() * (i as f32 * 0.3).cos())
            .collect();
        let first = vad.chunk(&chunk).expect("chunk");
        let second = vad.chunk(&chunk).expect("chunk");
        assert_ne!(
            first, second,
            "the recurrent state should change the answer"
        );
        vad.reset();
        assert_eq!(vad.chunk(&chunk).expect("chunk"), first);
    }

    #[test]
    fn streams_kept_apart_match_one_detector_per_stream() {
        let mut shared = vad();
        let mut alone = vad();
        let a: Vec<f32> = (0..4 * SileroVad::CHUNK)
            .map(|i| 0.3 * (i as f32 * 0.07).sin())
            .collect();
        let b: Vec<f32> = (0..4 * SileroVad::CHUNK)
            .map(|i| 0.1 * (i as f32 * 0.011).cos())
            .collect();
        let (mut sa, mut sb) = (VadStream::default(), VadStream::default());
        let mut interleaved = Vec::new();
        for (ca, cb) in a
            .chunks_exact(SileroVad::CHUNK)
            .zip(b.chunks_exact(SileroVad::CHUNK))
        {
            interleaved.push(shared.chunk_in(&mut sa, ca).expect("chunk a"));
            interleaved.push(shared.chunk_in(&mut sb, cb).expect("chunk b"));
        }
        let only_a = probabilities(&mut alone, &a);
        alone.reset();
        let only_b = probabilities(&mut alone, &b);
        let expected: Vec<f32> = only_a
            .iter()
            .zip(&only_b)
            .flat_map(|(x, y)| [*x, *y])
            .collect();
        assert_eq!(interleaved, expected);
    }

    #[test]
    fn wrong_input_is_refused_without_touching_the_state() {
        let mut vad = vad();
        let silence = vec![0.0f32; SileroVad::CHUNK];
        let fresh = vad.chunk(&silence).expect("chunk");
        vad.reset();
        for bad in [
            vec![0.0f32; SileroVad::CHUNK - 1],
            vec![0.0f32; SileroVad::CHUNK + 1],
            Vec::new(),
            vec![f32::NAN; SileroVad::CHUNK],
        ] {
            assert!(matches!(vad.chunk(&bad), Err(ModelError::Input(_))));
        }
        assert_eq!(vad.chunk(&silence).expect("chunk"), fresh);
    }

    #[test]
    fn missing_files_are_errors_not_panics() {
        let nowhere = Path::new("/nonexistent/onair/silero_vad.onnx");
        assert!(matches!(
            SileroVad::load(nowhere),
            Err(ModelError::Missing { .. })
        ));
    }
}
