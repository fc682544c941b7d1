//! The libtorch backend (the `torch` feature): the same two encoders as
//! [`super::image`] and [`super::text`], and the highlight model's step of
//! [`super::highlight`], as TorchScript exports (`scripts/torch` writes the
//! encoders' `model.pt` next to each version's `model.onnx`;
//! models/highlight/export.py writes the highlight model's) run by `tch` on
//! the GPU when libtorch sees one, else on the CPU. Inputs and outputs are
//! those of the ONNX backend, so either serves the batcher;
//! `tests/backends.rs` checks that they agree.
//!
//! Not for: training, or choosing a backend (the features configuration does).

use std::path::Path;

use tch::{CModule, Device, IValue, Kind, Tensor};
use tokenizers::Tokenizer;

use super::batcher::BatchModel;
use super::image::{ImageEncoder, ImageOutputs};
use super::serving::Servable;
use super::text::{load_tokenizer, tokenize, TextEncoder, Tokens};
use super::ModelError;

fn runtime(what: &'static str) -> impl Fn(tch::TchError) -> ModelError {
    move |e| ModelError::Runtime(format!("{what} (libtorch): {e}"))
}

/// The device models load on: the first GPU when libtorch has CUDA and sees
/// one, else the CPU.
pub fn device() -> Device {
    Device::cuda_if_available()
}

fn load_module(path: &Path, threads: usize) -> Result<CModule, ModelError> {
    if !path.is_file() {
        return Err(ModelError::Missing {
            path: path.display().to_string(),
            reason: "not found (scripts/torch exports it)".into(),
        });
    }
    // libtorch's intra-op pool is per process: the last setting wins.
    tch::set_num_threads(threads.max(1) as i32);
    CModule::load_on_device(path, device()).map_err(|e| ModelError::Missing {
        path: path.display().to_string(),
        reason: format!("cannot load the TorchScript module: {e}"),
    })
}

fn two_tensors(out: IValue, what: &str) -> Result<(Tensor, Tensor), ModelError> {
    match out {
        IValue::Tuple(mut v) if v.len() == 2 => match (v.remove(0), v.remove(0)) {
            (IValue::Tensor(a), IValue::Tensor(b)) => Ok((a, b)),
            _ => Err(ModelError::Runtime(format!(
                "{what}: outputs are not tensors"
            ))),
        },
        _ => Err(ModelError::Runtime(format!(
            "{what}: not a pair of outputs"
        ))),
    }
}

fn to_vec(t: &Tensor, what: &'static str) -> Result<Vec<f32>, ModelError> {
    let flat = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_flatten(0, -1))
        .map_err(runtime(what))?;
    Vec::<f32>::try_from(&flat).map_err(runtime(what))
}

/// MobileNetV2 on libtorch.
pub struct TorchImageEncoder {
    module: CModule,
}

impl std::fmt::Debug for TorchImageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchImageEncoder").finish_non_exhaustive()
    }
}

impl TorchImageEncoder {
    /// Loads the TorchScript export.
    pub fn load(model: &Path, threads: usize) -> Result<Self, ModelError> {
        Ok(TorchImageEncoder {
            module: load_module(model, threads)?,
        })
    }

    /// As [`ImageEncoder::embed`].
    pub fn embed(&mut self, frames: &[f32]) -> Result<ImageOutputs, ModelError> {
        let f = ImageEncoder::FRAME;
        if frames.is_empty() || !frames.len().is_multiple_of(f) {
            return Err(ModelError::Input(format!(
                "{} values is not a whole number of 3x224x224 frames",
                frames.len()
            )));
        }
        if frames.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Input("non-finite pixel value".into()));
        }
        let n = (frames.len() / f) as i64;
        let s = ImageEncoder::SIZE as i64;
        let _guard = tch::no_grad_guard();
        let x = Tensor::f_from_slice(frames)
            .and_then(|t| t.f_reshape([n, 3, s, s]))
            .and_then(|t| t.f_to_device(device()))
            .map_err(runtime("image encoder"))?;
        let out = self
            .module
            .forward_is(&[IValue::Tensor(x)])
            .map_err(runtime("image encoder"))?;
        let (emb, logits) = two_tensors(out, "image encoder")?;
        let embeddings = to_vec(&emb, "image encoder")?;
        let logits = to_vec(&logits, "image encoder")?;
        let n = n as usize;
        if embeddings.len() != n * ImageEncoder::EMBEDDING
            || logits.len() != n * ImageEncoder::CLASSES
        {
            return Err(ModelError::Runtime(format!(
                "image encoder gave {} embedding and {} logit values for {n} frames",
                embeddings.len(),
                logits.len()
            )));
        }
        Ok(ImageOutputs { embeddings, logits })
    }
}

impl Servable for TorchImageEncoder {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        TorchImageEncoder::load(&dir.join("model.pt"), threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        super::image::smoke_check(&self.embed(&vec![0.0; ImageEncoder::FRAME])?)
    }
}

impl BatchModel for TorchImageEncoder {
    type Input = Vec<f32>;
    type Output = Vec<f32>;

    fn run_batch(&mut self, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let frames = super::image::concat_frames(inputs)?;
        Ok(super::image::per_frame(&self.embed(&frames)?))
    }
}

/// multilingual-e5-small on libtorch.
pub struct TorchTextEncoder {
    module: CModule,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for TorchTextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchTextEncoder").finish_non_exhaustive()
    }
}

impl TorchTextEncoder {
    /// Loads the TorchScript export and the tokenizer.
    pub fn load(model: &Path, tokenizer: &Path, threads: usize) -> Result<Self, ModelError> {
        Ok(TorchTextEncoder {
            module: load_module(model, threads)?,
            tokenizer: load_tokenizer(tokenizer)?,
        })
    }

    /// As [`TextEncoder::embed`].
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<f32>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let Tokens { ids, mask, n, len } = tokenize(&self.tokenizer, texts)?;
        let shape = [n as i64, len as i64];
        let _guard = tch::no_grad_guard();
        let err = runtime("text encoder");
        let ids = Tensor::f_from_slice(&ids)
            .and_then(|t| t.f_reshape(shape))
            .and_then(|t| t.f_to_device(device()))
            .map_err(&err)?;
        let mask = Tensor::f_from_slice(&mask)
            .and_then(|t| t.f_reshape(shape))
            .and_then(|t| t.f_to_device(device()))
            .map_err(&err)?;
        let out = self
            .module
            .forward_is(&[IValue::Tensor(ids), IValue::Tensor(mask)])
            .map_err(&err)?;
        let (_, sentence) = two_tensors(out, "text encoder")?;
        let emb = to_vec(&sentence, "text encoder")?;
        if emb.len() != n * TextEncoder::DIM {
            return Err(ModelError::Runtime(format!(
                "text encoder gave {} values for {n} texts",
                emb.len()
            )));
        }
        Ok(emb)
    }
}

impl Servable for TorchTextEncoder {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        TorchTextEncoder::load(&dir.join("model.pt"), &dir.join("tokenizer.json"), threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        super::text::smoke_check(&self.embed(&super::text::SMOKE)?)
    }
}

impl BatchModel for TorchTextEncoder {
    type Input = String;
    type Output = Vec<f32>;

    fn run_batch(&mut self, inputs: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let e = self.embed(&texts)?;
        Ok(e.chunks(TextEncoder::DIM).map(<[f32]>::to_vec).collect())
    }
}

/// The highlight model's step on libtorch (`N/model.pt` next to
/// `N/model.onnx`, with the same `N/highlight.json`).
pub struct TorchHighlight {
    module: CModule,
    spec: super::highlight::Spec,
}

impl std::fmt::Debug for TorchHighlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchHighlight")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl TorchHighlight {
    /// Loads `model.pt` and `highlight.json` from a version directory.
    pub fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let spec = super::highlight::Spec::load(&dir.join("highlight.json"))?;
        Ok(TorchHighlight {
            module: load_module(&dir.join("model.pt"), threads)?,
            spec,
        })
    }

    /// The version's spec.
    pub fn spec(&self) -> &super::highlight::Spec {
        &self.spec
    }

    /// As [`super::highlight::HighlightModel::step`].
    pub fn step(
        &mut self,
        inputs: &[super::highlight::StepInput],
    ) -> Result<Vec<super::highlight::StepOutput>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let k = super::highlight::Packed::new(&self.spec, inputs)?;
        let (b, h, d) = (k.b as i64, k.h as i64, k.dims);
        let err = runtime("highlight model");
        let _guard = tch::no_grad_guard();
        let tensor = |v: &[f32], shape: &[i64]| {
            Tensor::f_from_slice(v)
                .and_then(|t| t.f_reshape(shape))
                .and_then(|t| t.f_to_device(device()))
                .map(IValue::Tensor)
        };
        let args = [
            tensor(&k.x, &[b, d.x as i64]),
            tensor(&k.streamer, &[b, d.x as i64]),
            tensor(&k.z, &[b, h, d.z as i64]),
            tensor(&k.e, &[b, h, d.e as i64]),
            tensor(&k.p, &[b, h, d.p as i64]),
            tensor(&k.valid, &[b, h]),
        ]
        .into_iter()
        .collect::<Result<Vec<IValue>, _>>()
        .map_err(&err)?;
        let out = self.module.forward_is(&args).map_err(&err)?;
        let IValue::Tuple(parts) = out else {
            return Err(ModelError::Runtime(
                "highlight model: not a tuple of outputs".into(),
            ));
        };
        let mut vecs = Vec::with_capacity(5);
        for part in parts.into_iter().take(5) {
            match part {
                IValue::Tensor(t) => vecs.push(to_vec(&t, "highlight model")?),
                _ => {
                    return Err(ModelError::Runtime(
                        "highlight model: an output is not a tensor".into(),
                    ))
                }
            }
        }
        let out: [Vec<f32>; 5] = vecs
            .try_into()
            .map_err(|_| ModelError::Runtime("highlight model: fewer than 5 outputs".into()))?;
        k.unpack(&self.spec, out)
    }
}

impl Servable for TorchHighlight {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        TorchHighlight::load(dir, threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        let input = super::highlight::smoke_input(&self.spec);
        super::highlight::smoke_check(&self.step(&[input])?)
    }
}

/// One request is one room's newest tick.
impl BatchModel for TorchHighlight {
    type Input = super::highlight::StepInput;
    type Output = super::highlight::StepOutput;

    fn run_batch(&mut self, inputs: &[Self::Input]) -> Result<Vec<Self::Output>, ModelError> {
        self.step(inputs)
    }
}
