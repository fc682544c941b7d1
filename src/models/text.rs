//! The text encoder: multilingual-e5-small (Chinese, English and about 90
//! other languages) on ONNX Runtime, with its own tokenizer (the upstream
//! `tokenizer.json`, read by the `tokenizers` crate). Texts in, one
//! L2-normalised 384-d embedding per text out; cosine similarity is their
//! dot product.
//!
//! E5 expects a prefix: `query: ` for similarity and clustering (what the
//! engine does with comments and transcripts), `passage: ` for documents in
//! query-to-document retrieval. [`TextEncoder::embed`] adds `query: `.
//!
//! Not for: batching across rooms (the batcher does) or pooling per tick
//! (the feature state does).

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::Tokenizer;

use super::batcher::BatchModel;
use super::serving::Servable;
use super::ModelError;

/// A loaded text encoder.
pub struct TextEncoder {
    session: Session,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder").finish_non_exhaustive()
    }
}

impl TextEncoder {
    /// Embedding width.
    pub const DIM: usize = 384;
    /// Longest input in tokens (the model's positions); longer texts are cut.
    pub const MAX_TOKENS: usize = 512;
    /// The `<pad>` token id.
    pub(crate) const PAD: u32 = 1;

    /// Loads the ONNX export (`scripts/models` makes it) and the tokenizer,
    /// with `threads` intra-op threads.
    pub fn load(model: &Path, tokenizer: &Path, threads: usize) -> Result<Self, ModelError> {
        let session = super::onnx::session(model, threads)?;
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != ["input_ids", "attention_mask"] || !outputs.contains(&"sentence_embedding") {
            return Err(ModelError::Missing {
                path: model.display().to_string(),
                reason: format!(
                    "not the text encoder export (inputs {inputs:?}, outputs {outputs:?})"
                ),
            });
        }
        let tokenizer = load_tokenizer(tokenizer)?;
        Ok(TextEncoder { session, tokenizer })
    }

    /// Embeds `texts` (as E5 queries), one row of [`Self::DIM`] values each,
    /// back to back.
    ///
    /// A text's embedding is the same to the last bit whatever it is batched
    /// with: with ONNX Runtime's CPU kernels a row of a batch of two or more
    /// that has padding gets the same bits whatever the batch's size, order
    /// or amount of padding, but a row with none, or a batch of one, takes
    /// other kernels (last bits differ). So every row is padded (see
    /// [`tokenize`]) and a single text runs as a batch of two, itself twice.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<f32>, ModelError> {
        match texts {
            [] => Ok(Vec::new()),
            [one] => {
                let mut e = self.run(&[one, one])?;
                e.truncate(Self::DIM);
                Ok(e)
            }
            _ => self.run(texts),
        }
    }

    fn run(&mut self, texts: &[&str]) -> Result<Vec<f32>, ModelError> {
        let Tokens { ids, mask, n, len } = tokenize(&self.tokenizer, texts)?;
        let runtime = |e: ort::Error| ModelError::Runtime(format!("text encoder: {e}"));
        let ids_t = TensorRef::from_array_view(([n, len], &ids[..])).map_err(runtime)?;
        let mask_t = TensorRef::from_array_view(([n, len], &mask[..])).map_err(runtime)?;
        let outputs = self
            .session
            .run(ort::inputs!["input_ids" => ids_t, "attention_mask" => mask_t])
            .map_err(runtime)?;
        let (_, emb) = outputs["sentence_embedding"]
            .try_extract_tensor::<f32>()
            .map_err(runtime)?;
        if emb.len() != n * Self::DIM {
            return Err(ModelError::Runtime(format!(
                "text encoder gave {} values for {n} texts",
                emb.len()
            )));
        }
        Ok(emb.to_vec())
    }
}

/// A batch of texts as the model reads them: `n` rows of `len` token ids
/// (padded) and their attention mask.
pub(crate) struct Tokens {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub n: usize,
    pub len: usize,
}

/// Tokenises `texts` as E5 queries (`query: ` prefix), cut at one token
/// short of [`TextEncoder::MAX_TOKENS`] and padded one token past the
/// longest: every row has padding, so no row takes the kernels of an
/// unpadded one (whose last bits differ, see [`TextEncoder::embed`]).
pub(crate) fn tokenize(tokenizer: &Tokenizer, texts: &[&str]) -> Result<Tokens, ModelError> {
    let max = TextEncoder::MAX_TOKENS - 1;
    let prefixed: Vec<String> = texts.iter().map(|t| format!("query: {t}")).collect();
    let encodings = tokenizer
        .encode_batch(prefixed, true)
        .map_err(|e| ModelError::Input(format!("tokenising: {e}")))?;
    let len = encodings
        .iter()
        .map(|e| e.get_ids().len().min(max))
        .max()
        .unwrap_or(0)
        + 1;
    let n = encodings.len();
    let mut ids = vec![i64::from(TextEncoder::PAD); n * len];
    let mut mask = vec![0i64; n * len];
    for (row, e) in encodings.iter().enumerate() {
        let take = e.get_ids().len().min(max);
        for (j, &id) in e.get_ids()[..take].iter().enumerate() {
            ids[row * len + j] = i64::from(id);
            mask[row * len + j] = 1;
        }
        // A cut text still ends with its end-of-sequence token.
        if e.get_ids().len() > max {
            if let Some(&eos) = e.get_ids().last() {
                ids[row * len + take - 1] = i64::from(eos);
            }
        }
    }
    Ok(Tokens { ids, mask, n, len })
}

/// Loads the tokenizer file.
pub(crate) fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path).map_err(|e| ModelError::Missing {
        path: path.display().to_string(),
        reason: format!("cannot load the tokenizer: {e}"),
    })
}

/// The texts a loaded version embeds before it serves (either backend).
pub(crate) const SMOKE: [&str; 2] = ["smoke test", "冒烟测试"];

/// What [`SMOKE`] must give: unit-length embeddings.
pub(crate) fn smoke_check(e: &[f32]) -> Result<(), ModelError> {
    let norm: f32 = e.iter().take(TextEncoder::DIM).map(|v| v * v).sum();
    if e.len() == SMOKE.len() * TextEncoder::DIM && (norm - 1.0).abs() < 0.01 {
        Ok(())
    } else {
        Err(ModelError::Runtime(format!(
            "{} values, the first of squared norm {norm}: not unit embeddings",
            e.len()
        )))
    }
}

/// A version directory holds `model.onnx` and `tokenizer.json`.
impl Servable for TextEncoder {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        TextEncoder::load(
            &dir.join("model.onnx"),
            &dir.join("tokenizer.json"),
            threads,
        )
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        smoke_check(&self.embed(&SMOKE)?)
    }
}

/// One request is one text; its result is its embedding.
impl BatchModel for TextEncoder {
    type Input = String;
    type Output = Vec<f32>;

    fn run_batch(&mut self, inputs: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let e = self.embed(&texts)?;
        Ok(e.chunks(Self::DIM).map(<[f32]>::to_vec).collect())
    }
}

/// Cosine similarity of two L2-normalised embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
