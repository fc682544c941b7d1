//! The image encoder: MobileNetV2 (torchvision's ImageNet weights, exported
//! to ONNX by `scripts/export_mobilenet.py`) run by ONNX Runtime. A batch of
//! sampled frames in, one pooled 1280-d embedding per frame out (and the
//! ImageNet logits, for checks and for anyone who wants labels).
//!
//! Frames come from `decode::video` already scaled to 224x224, in CHW layout
//! and normalised with ImageNet's mean and standard deviation, which is what
//! the export expects (see `models/image/README.md`).
//!
//! Not for: batching requests across rooms (the batcher does), choosing
//! frames (decode and operators do), or loading ONNX Runtime (see
//! [`super::onnx::init_onnx_runtime`]).

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::batcher::BatchModel;
use super::serving::Servable;
use super::ModelError;

/// What one batch gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageOutputs {
    /// One embedding of [`ImageEncoder::EMBEDDING`] values per frame, row-major.
    pub embeddings: Vec<f32>,
    /// One row of [`ImageEncoder::CLASSES`] logits per frame, row-major.
    pub logits: Vec<f32>,
}

impl ImageOutputs {
    /// The embedding of frame `i`.
    pub fn embedding(&self, i: usize) -> Option<&[f32]> {
        let d = ImageEncoder::EMBEDDING;
        self.embeddings.get(i * d..(i + 1) * d)
    }

    /// The logits of frame `i`.
    pub fn logits(&self, i: usize) -> Option<&[f32]> {
        let c = ImageEncoder::CLASSES;
        self.logits.get(i * c..(i + 1) * c)
    }

    /// Frame `i`'s `k` best classes (ImageNet index, softmax probability).
    pub fn top(&self, i: usize, k: usize) -> Vec<(usize, f32)> {
        let Some(l) = self.logits(i) else {
            return Vec::new();
        };
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = l.iter().map(|v| (v - max).exp()).sum();
        let mut p: Vec<(usize, f32)> = l
            .iter()
            .enumerate()
            .map(|(c, v)| (c, (v - max).exp() / sum))
            .collect();
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        p.truncate(k);
        p
    }
}

/// What a grey frame must give for a loaded version to serve (either backend).
pub(crate) fn smoke_check(out: &ImageOutputs) -> Result<(), ModelError> {
    if !out.embeddings.is_empty() && out.embeddings.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(ModelError::Runtime(
            "non-finite embedding on a grey frame".into(),
        ))
    }
}

/// One batch's frames back to back, each checked for size.
pub(crate) fn concat_frames(inputs: &[Vec<f32>]) -> Result<Vec<f32>, ModelError> {
    let mut frames = Vec::with_capacity(inputs.len() * ImageEncoder::FRAME);
    for f in inputs {
        if f.len() != ImageEncoder::FRAME {
            return Err(ModelError::Input(format!(
                "a frame of {} values, not 3x224x224",
                f.len()
            )));
        }
        frames.extend_from_slice(f);
    }
    Ok(frames)
}

/// A batch's embeddings, one vector per frame.
pub(crate) fn per_frame(out: &ImageOutputs) -> Vec<Vec<f32>> {
    out.embeddings
        .chunks(ImageEncoder::EMBEDDING)
        .map(<[f32]>::to_vec)
        .collect()
}

/// A loaded image encoder (one session; `embed` takes `&mut self`).
pub struct ImageEncoder {
    session: Session,
}

impl std::fmt::Debug for ImageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageEncoder").finish_non_exhaustive()
    }
}

/// A version directory holds `model.onnx`.
impl Servable for ImageEncoder {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        ImageEncoder::load(&dir.join("model.onnx"), threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        smoke_check(&self.embed(&vec![0.0; Self::FRAME])?)
    }
}

/// One request is one frame ([`ImageEncoder::FRAME`] values); its result is
/// the frame's embedding.
impl BatchModel for ImageEncoder {
    type Input = Vec<f32>;
    type Output = Vec<f32>;

    fn run_batch(&mut self, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        Ok(per_frame(&self.embed(&concat_frames(inputs)?)?))
    }
}

impl ImageEncoder {
    /// Width and height of the frames it reads.
    pub const SIZE: usize = 224;
    /// Values per frame (3 x 224 x 224, CHW).
    pub const FRAME: usize = 3 * Self::SIZE * Self::SIZE;
    /// Embedding width.
    pub const EMBEDDING: usize = 1280;
    /// ImageNet classes.
    pub const CLASSES: usize = 1000;

    /// Loads the ONNX export with `threads` intra-op threads, loading ONNX
    /// Runtime first if this process has not.
    pub fn load(model: &Path, threads: usize) -> Result<Self, ModelError> {
        let session = super::onnx::session(model, threads)?;
        let missing = |reason: String| ModelError::Missing {
            path: model.display().to_string(),
            reason,
        };
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != ["image"] || !outputs.contains(&"embedding") || !outputs.contains(&"logits") {
            return Err(missing(format!(
                "not the image encoder export (inputs {inputs:?}, outputs {outputs:?})"
            )));
        }
        Ok(ImageEncoder { session })
    }

    /// Embeds a batch: `frames` holds whole frames of [`Self::FRAME`] values
    /// back to back (CHW, normalised).
    pub fn embed(&mut self, frames: &[f32]) -> Result<ImageOutputs, ModelError> {
        if frames.is_empty() || !frames.len().is_multiple_of(Self::FRAME) {
            return Err(ModelError::Input(format!(
                "{} values is not a whole number of 3x224x224 frames",
                frames.len()
            )));
        }
        if frames.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Input("non-finite pixel value".into()));
        }
        let n = frames.len() / Self::FRAME;
        let runtime = |e: ort::Error| ModelError::Runtime(format!("image encoder: {e}"));
        let input = TensorRef::from_array_view(([n, 3, Self::SIZE, Self::SIZE], frames))
            .map_err(runtime)?;
        let outputs = self
            .session
            .run(ort::inputs!["image" => input])
            .map_err(runtime)?;
        let (_, emb) = outputs["embedding"]
            .try_extract_tensor::<f32>()
            .map_err(runtime)?;
        let (_, logits) = outputs["logits"]
            .try_extract_tensor::<f32>()
            .map_err(runtime)?;
        if emb.len() != n * Self::EMBEDDING || logits.len() != n * Self::CLASSES {
            return Err(ModelError::Runtime(format!(
                "image encoder gave {} embedding and {} logit values for {n} frames",
                emb.len(),
                logits.len()
            )));
        }
        Ok(ImageOutputs {
            embeddings: emb.to_vec(),
            logits: logits.to_vec(),
        })
    }
}
