//! The MMBee gift model as the engine serves it: one version directory
//! (`models/mmbee/N/`: `mfq.onnx`, `ranker.onnx`, `mmbee.json`) holding both of
//! its graphs, so the content fusion and the ranker that reads its tokens are
//! always swapped together.
//!
//! - **MFQ** ([`Request::Content`]): a room's content segment (the
//!   `mmbee-content-v1` row, see `operators::mmbee_content`) and its streamer ->
//!   the room's content tokens `[queries, d]`. Viewer-independent: once per room
//!   and segment.
//! - **Ranker** ([`Request::Pair`]): one (viewer, room) pair ->
//!   P(the viewer gifts in the room within the horizon). [`PairFeatures::build`]
//!   assembles its inputs exactly as `mmbee.json` defines them (and
//!   `models/mmbee/data.py` does for training) from the content tokens, the
//!   viewer's session, the viewer's gifting history and the graph tables.
//!
//! A version holds the graph tables it was trained with (`mmbee.json`
//! `graph.version`), and the inputs that depend on the graph or the
//! vocabulary are assembled inside the version that runs them, so a hot swap
//! (a new version directory, picked up every `reload_interval_ms`) replaces
//! the graphs, the vocabulary and the graph tables as one unit: no request is
//! ever run with another version's tables. Content tokens made by another
//! version's MFQ are not read by this version's ranker: such a pair is scored
//! as a room without content until the room's next segment.
//!
//! Not for: training (models/mmbee/), keeping histories or sessions (operators and
//! user state do), or graph tables of another version than the one a model
//! version names (its embeddings are another space).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use super::batcher::{BatchModel, Batcher, Submit};
use super::serving::{ModelSlot, Servable, Watch};
use super::ModelError;
use crate::graph::{GraphTables, NodeKind};
use crate::operators::mmbee_content::{
    COMMENTS, CONTENT_WIDTH, FRAMES, IMAGE_DIM, TEXT_DIM, TRANSCRIPTS,
};

/// Widths of one export.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Dims {
    /// Token width.
    pub d: usize,
    /// Query tokens per room.
    pub queries: usize,
    /// Graph embedding width.
    pub graph: usize,
    /// Gifting-history slots.
    pub seq_len: usize,
    /// Expanded-sequence slots.
    pub exp_len: usize,
    /// Context features.
    pub context: usize,
}

#[derive(Clone, Debug, Deserialize)]
struct ContextDef {
    name: String,
}

#[derive(Clone, Debug, Deserialize)]
struct GraphRef {
    version: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct RawSpec {
    format: String,
    dims: Dims,
    vocab: Vec<String>,
    context: Vec<ContextDef>,
    graph: GraphRef,
}

/// What `mmbee.json` says the engine must know.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Widths.
    pub dims: Dims,
    /// Streamer vocabulary: index `i + 1` is `vocab[i]`, 0 unknown.
    pub vocab: std::collections::HashMap<String, i64>,
    /// Context features, in order.
    pub context: Vec<String>,
    /// The graph version the model was trained with.
    pub graph_version: u64,
}

/// The context features the engine knows how to compute.
const KNOWN_CONTEXT: [&str; 8] = [
    "log_present_s",
    "log_session_likes",
    "log_session_comments",
    "log_session_gifts",
    "log_session_gift_value",
    "followed",
    "user_known",
    "streamer_known",
];

impl Spec {
    /// Reads and checks `mmbee.json`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Missing {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let raw: RawSpec = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if raw.format != "mmbee-v1" {
            return Err(bad(format!("format {:?}, not \"mmbee-v1\"", raw.format)));
        }
        let context: Vec<String> = raw.context.into_iter().map(|c| c.name).collect();
        if let Some(c) = context
            .iter()
            .find(|c| !KNOWN_CONTEXT.contains(&c.as_str()))
        {
            return Err(bad(format!(
                "context feature {c:?} is not one the engine computes"
            )));
        }
        if context.len() != raw.dims.context {
            return Err(bad("context list and dims.context differ".into()));
        }
        Ok(Spec {
            dims: raw.dims,
            vocab: raw
                .vocab
                .into_iter()
                .enumerate()
                .map(|(i, s)| (s, i as i64 + 1))
                .collect(),
            context,
            graph_version: raw.graph.version,
        })
    }

    /// The vocabulary index of a streamer (0 unknown).
    pub fn streamer_index(&self, streamer: &str) -> i64 {
        self.vocab.get(streamer).copied().unwrap_or(0)
    }
}

/// A room's content segment for MFQ.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentInput {
    /// The `mmbee-content-v1` row.
    pub row: Arc<[f32]>,
    /// Filled frame, comment and transcript slots.
    pub frames: usize,
    /// See `frames`.
    pub comment_tokens: usize,
    /// See `frames`.
    pub transcript_tokens: usize,
    /// The room's streamer (the version looks up its vocabulary index and
    /// graph embedding).
    pub streamer_id: Arc<str>,
}

impl ContentInput {
    /// MFQ's input for a room's completed content segment.
    pub fn new(content: &crate::operators::mmbee_content::ContentRow, streamer_id: &str) -> Self {
        ContentInput {
            row: content.row.clone().into(),
            frames: content.frames,
            comment_tokens: content.comment_tokens,
            transcript_tokens: content.transcript_tokens,
            streamer_id: streamer_id.into(),
        }
    }
}

/// One (viewer, room) pair as the scoring operator knows it at the prediction
/// time; the serving version assembles the ranker's inputs from it
/// ([`PairFeatures::build`]) with its own spec and graph tables.
#[derive(Clone, Debug, PartialEq)]
pub struct PairInput {
    /// The room's content tokens.
    pub tokens: Arc<[f32]>,
    /// `name@version` of the MFQ that made `tokens`: another version's are
    /// not read (the pair is scored as a room without content).
    pub tokens_model: Arc<str>,
    /// The room's streamer.
    pub streamer_id: Arc<str>,
    /// The viewer.
    pub user_id: Arc<str>,
    /// The viewer's gifts (those at or after `t_ms` are left out).
    pub history: Vec<Gift>,
    /// The viewer's session in the room.
    pub session: SessionRow,
    /// The prediction time.
    pub t_ms: i64,
}

/// One gift in a viewer's history.
#[derive(Clone, Debug, PartialEq)]
pub struct Gift {
    /// The streamer who received it.
    pub streamer_id: Arc<str>,
    /// Event time.
    pub t_ms: i64,
    /// Value.
    pub value: u64,
}

/// A viewer's session in a room at the prediction time (the `mmbee-pair-v1` row).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionRow {
    /// Since entering (ms).
    pub present_ms: f32,
    /// Actions in the session.
    pub likes: f32,
    /// See `likes`.
    pub comments: f32,
    /// See `likes`.
    pub gifts: f32,
    /// Sum of the session's gift values.
    pub gift_value: f32,
    /// Whether the viewer followed the streamer in the session.
    pub followed: bool,
}

/// One pair's ranker inputs, laid out as the graph reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct PairFeatures {
    /// `[queries * d]` content tokens of the room.
    pub tokens: Arc<[f32]>,
    /// The room's streamer's vocabulary index.
    pub streamer_index: i64,
    /// `[graph]` each.
    pub streamer_graph: Vec<f32>,
    /// See `streamer_graph`.
    pub user_graph: Vec<f32>,
    /// `[seq_len * graph]`.
    pub seq: Vec<f32>,
    /// `[seq_len * 3]`.
    pub seq_feats: Vec<f32>,
    /// `[seq_len]`.
    pub seq_mask: Vec<f32>,
    /// `[exp_len * graph]`.
    pub exp: Vec<f32>,
    /// `[exp_len]`.
    pub exp_scores: Vec<f32>,
    /// `[exp_len]`.
    pub exp_mask: Vec<f32>,
    /// `[context]`.
    pub context: Vec<f32>,
}

fn graph_row(
    tables: Option<&GraphTables>,
    kind: NodeKind,
    id: &str,
    dim: usize,
) -> Option<Vec<f32>> {
    let t = tables?;
    let row = t.row(kind, id)?;
    let e = t.embedding(row);
    (e.len() == dim).then(|| e.to_vec())
}

impl PairFeatures {
    /// Assembles a pair's inputs as `mmbee.json` defines them. `history` is the
    /// viewer's gifts in any order (those at or after `t_ms` are left out);
    /// `tables` must be the graph version the model names (None: no graph).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        spec: &Spec,
        tables: Option<&GraphTables>,
        tokens: Arc<[f32]>,
        streamer_id: &str,
        user_id: &str,
        history: &[Gift],
        session: &SessionRow,
        t_ms: i64,
    ) -> Self {
        let Dims {
            graph: g,
            seq_len: l,
            exp_len: k,
            ..
        } = spec.dims;
        let zeros = || vec![0.0f32; g];
        let streamer = graph_row(tables, NodeKind::Streamer, streamer_id, g);
        let user = graph_row(tables, NodeKind::User, user_id, g);
        let mut past: Vec<&Gift> = history.iter().filter(|x| x.t_ms < t_ms).collect();
        past.sort_by_key(|g| std::cmp::Reverse(g.t_ms));
        let mut seq = vec![0.0; l * g];
        let mut seq_feats = vec![0.0; l * 3];
        let mut seq_mask = vec![0.0; l];
        for (i, gift) in past.iter().take(l).enumerate() {
            if let Some(e) = graph_row(tables, NodeKind::Streamer, &gift.streamer_id, g) {
                seq[i * g..(i + 1) * g].copy_from_slice(&e);
            }
            let age_h = (t_ms - gift.t_ms) as f64 / 3_600_000.0;
            seq_feats[i * 3] = (gift.value as f64).ln_1p() as f32;
            seq_feats[i * 3 + 1] = age_h.ln_1p() as f32;
            seq_feats[i * 3 + 2] = f32::from(u8::from(&*gift.streamer_id == streamer_id));
            seq_mask[i] = 1.0;
        }
        let mut exp = vec![0.0; k * g];
        let mut exp_scores = vec![0.0; k];
        let mut exp_mask = vec![0.0; k];
        if let (Some(t), Some(row)) = (tables, tables.and_then(|t| t.row(NodeKind::User, user_id)))
        {
            for (i, &(s, score)) in t.neighbours(row).second.iter().take(k).enumerate() {
                let e = t.embedding(s);
                if e.len() == g {
                    exp[i * g..(i + 1) * g].copy_from_slice(e);
                }
                exp_scores[i] = score;
                exp_mask[i] = 1.0;
            }
        }
        let context = spec
            .context
            .iter()
            .map(|name| match name.as_str() {
                "log_present_s" => (f64::from(session.present_ms) / 1000.0).max(0.0).ln_1p() as f32,
                "log_session_likes" => session.likes.max(0.0).ln_1p(),
                "log_session_comments" => session.comments.max(0.0).ln_1p(),
                "log_session_gifts" => session.gifts.max(0.0).ln_1p(),
                "log_session_gift_value" => session.gift_value.max(0.0).ln_1p(),
                "followed" => f32::from(u8::from(session.followed)),
                "user_known" => f32::from(u8::from(user.is_some())),
                "streamer_known" => f32::from(u8::from(streamer.is_some())),
                _ => 0.0,
            })
            .collect();
        PairFeatures {
            tokens,
            streamer_index: spec.streamer_index(streamer_id),
            streamer_graph: streamer.unwrap_or_else(zeros),
            user_graph: user.unwrap_or_else(zeros),
            seq,
            seq_feats,
            seq_mask,
            exp,
            exp_scores,
            exp_mask,
            context,
        }
    }
}

/// One request to a version.
#[derive(Clone, Debug)]
pub enum Request {
    /// MFQ over a room's content segment.
    Content(ContentInput),
    /// The ranker over one pair.
    Pair(Box<PairInput>),
}

/// One result.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A room's content tokens, `[rows * dim]`.
    Tokens {
        /// The tokens, row-major.
        tokens: Arc<[f32]>,
        /// Width of a row (the version's `d`).
        dim: u32,
    },
    /// A pair's score.
    Pair(Scored),
}

/// A pair's gift probability and what the version read to get it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// P(the viewer gifts in the room within the horizon).
    pub probability: f32,
    /// Whether the room's content tokens were read (false: they came from
    /// another version's MFQ, and the room was scored as without content).
    pub content: bool,
    /// The graph version whose tables the inputs came from (0: none).
    pub graph_version: u64,
}

/// A loaded version: both graphs, their spec, and the graph tables the spec
/// names.
pub struct MmbeeModel {
    mfq: Session,
    ranker: Session,
    spec: Spec,
    graph: Option<Arc<GraphTables>>,
    /// `name@version`, as the serving slot labels it.
    label: Arc<str>,
    /// MFQ over an empty segment of an unknown streamer: the tokens of a room
    /// without content.
    empty: Arc<[f32]>,
}

impl std::fmt::Debug for MmbeeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmbeeModel")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

const MFQ_INPUTS: [&str; 8] = [
    "frames",
    "frame_mask",
    "comments",
    "comment_mask",
    "transcripts",
    "transcript_mask",
    "streamer_index",
    "streamer_graph",
];
const RANKER_INPUTS: [&str; 11] = [
    "tokens",
    "streamer_index",
    "streamer_graph",
    "user_graph",
    "seq",
    "seq_feats",
    "seq_mask",
    "exp",
    "exp_scores",
    "exp_mask",
    "context",
];

fn check_io(
    session: &Session,
    path: &Path,
    inputs: &[&str],
    output: &str,
) -> Result<(), ModelError> {
    let have: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    if have != inputs || !outs.contains(&output) {
        return Err(ModelError::Missing {
            path: path.display().to_string(),
            reason: format!("not the MMBee export (inputs {have:?}, outputs {outs:?})"),
        });
    }
    Ok(())
}

impl MmbeeModel {
    /// Loads a version directory, without graph tables (their rows read as
    /// zeros, "not in the graph"; see [`Self::with_graph`]).
    pub fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let spec = Spec::load(&dir.join("mmbee.json"))?;
        let (mp, rp) = (dir.join("mfq.onnx"), dir.join("ranker.onnx"));
        let mfq = super::onnx::session(&mp, threads)?;
        check_io(&mfq, &mp, &MFQ_INPUTS, "tokens")?;
        let ranker = super::onnx::session(&rp, threads)?;
        check_io(&ranker, &rp, &RANKER_INPUTS, "probability")?;
        let mut model = MmbeeModel {
            mfq,
            ranker,
            spec,
            graph: None,
            label: super::serving::version_label(dir),
            empty: Arc::from(Vec::new()),
        };
        model.empty = model.run_empty()?;
        Ok(model)
    }

    /// The version with the graph tables it names (the caller reads the
    /// version `spec().graph_version`).
    pub fn with_graph(mut self, graph: Option<Arc<GraphTables>>) -> Result<Self, ModelError> {
        self.graph = graph;
        self.empty = self.run_empty()?;
        Ok(self)
    }

    /// The version's spec.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The graph version whose tables this version reads (0: none).
    pub fn graph_version(&self) -> u64 {
        self.graph.as_ref().map_or(0, |_| self.spec.graph_version)
    }

    fn run_empty(&mut self) -> Result<Arc<[f32]>, ModelError> {
        let empty = ContentInput {
            row: vec![0.0; CONTENT_WIDTH].into(),
            frames: 0,
            comment_tokens: 0,
            transcript_tokens: 0,
            streamer_id: Arc::from(""),
        };
        self.content(&[&empty])?
            .pop()
            .ok_or_else(|| ModelError::Runtime("MMBee MFQ gave no tokens".into()))
    }

    /// Ranker inputs for a pair, with this version's spec and tables. The
    /// second value says whether the room's tokens were read.
    pub fn features(&self, p: &PairInput) -> (PairFeatures, bool) {
        let width = self.spec.dims.queries * self.spec.dims.d;
        let own = *p.tokens_model == *self.label && p.tokens.len() == width;
        let tokens = if own {
            p.tokens.clone()
        } else {
            self.empty.clone()
        };
        let f = PairFeatures::build(
            &self.spec,
            self.graph.as_deref(),
            tokens,
            &p.streamer_id,
            &p.user_id,
            &p.history,
            &p.session,
            p.t_ms,
        );
        (f, own)
    }

    /// MFQ over rooms' content segments.
    ///
    /// A room's tokens are the same to the last bit whatever they are batched
    /// with. With ONNX Runtime's CPU kernels a batch of two or more gives
    /// every row the same bits whatever its size or order, but a batch of one
    /// takes other kernels for some rows, e.g. one whose frame or transcript
    /// slots are all filled (its last bits differ;
    /// `tests/mmbee_scoring.rs::mfq_and_the_ranker_do_not_depend_on_their_batch`).
    /// So a single segment runs as a batch of two, itself twice.
    pub fn content(&mut self, inputs: &[&ContentInput]) -> Result<Vec<Arc<[f32]>>, ModelError> {
        match inputs {
            [] => Ok(Vec::new()),
            [one] => {
                let mut tokens = self.run_content(&[one, one])?;
                tokens.truncate(1);
                Ok(tokens)
            }
            _ => self.run_content(inputs),
        }
    }

    fn run_content(&mut self, inputs: &[&ContentInput]) -> Result<Vec<Arc<[f32]>>, ModelError> {
        let b = inputs.len();
        let g = self.spec.dims.graph;
        let mut frames = Vec::with_capacity(b * FRAMES * IMAGE_DIM);
        let mut comments = Vec::with_capacity(b * COMMENTS * TEXT_DIM);
        let mut transcripts = Vec::with_capacity(b * TRANSCRIPTS * TEXT_DIM);
        let (mut fm, mut cm, mut tm) = (
            vec![0.0f32; b * FRAMES],
            vec![0.0f32; b * COMMENTS],
            vec![0.0f32; b * TRANSCRIPTS],
        );
        let mut index = Vec::with_capacity(b);
        let mut sg = Vec::with_capacity(b * g);
        for (i, c) in inputs.iter().enumerate() {
            if c.row.len() != CONTENT_WIDTH {
                return Err(ModelError::Input(format!(
                    "content row of {} values, not {CONTENT_WIDTH}",
                    c.row.len(),
                )));
            }
            if c.row.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::Input("non-finite content value".into()));
            }
            let a = FRAMES * IMAGE_DIM;
            let bb = a + COMMENTS * TEXT_DIM;
            frames.extend_from_slice(&c.row[..a]);
            comments.extend_from_slice(&c.row[a..bb]);
            transcripts.extend_from_slice(&c.row[bb..]);
            for j in 0..c.frames.min(FRAMES) {
                fm[i * FRAMES + j] = 1.0;
            }
            for j in 0..c.comment_tokens.min(COMMENTS) {
                cm[i * COMMENTS + j] = 1.0;
            }
            for j in 0..c.transcript_tokens.min(TRANSCRIPTS) {
                tm[i * TRANSCRIPTS + j] = 1.0;
            }
            index.push(self.spec.streamer_index(&c.streamer_id));
            match graph_row(self.graph.as_deref(), NodeKind::Streamer, &c.streamer_id, g) {
                Some(e) => sg.extend_from_slice(&e),
                None => sg.resize(sg.len() + g, 0.0),
            }
        }
        let runtime = |e: ort::Error| ModelError::Runtime(format!("MMBee MFQ: {e}"));
        let out = self
            .mfq
            .run(ort::inputs![
                "frames" => TensorRef::from_array_view(([b, FRAMES, IMAGE_DIM], &frames[..])).map_err(runtime)?,
                "frame_mask" => TensorRef::from_array_view(([b, FRAMES], &fm[..])).map_err(runtime)?,
                "comments" => TensorRef::from_array_view(([b, COMMENTS, TEXT_DIM], &comments[..])).map_err(runtime)?,
                "comment_mask" => TensorRef::from_array_view(([b, COMMENTS], &cm[..])).map_err(runtime)?,
                "transcripts" => TensorRef::from_array_view(([b, TRANSCRIPTS, TEXT_DIM], &transcripts[..])).map_err(runtime)?,
                "transcript_mask" => TensorRef::from_array_view(([b, TRANSCRIPTS], &tm[..])).map_err(runtime)?,
                "streamer_index" => TensorRef::from_array_view(([b], &index[..])).map_err(runtime)?,
                "streamer_graph" => TensorRef::from_array_view(([b, g], &sg[..])).map_err(runtime)?,
            ])
            .map_err(runtime)?;
        let (_, v) = out["tokens"].try_extract_tensor::<f32>().map_err(runtime)?;
        let w = self.spec.dims.queries * self.spec.dims.d;
        if v.len() != b * w {
            return Err(ModelError::Runtime(format!(
                "MMBee MFQ gave {} values for {b} rooms",
                v.len()
            )));
        }
        Ok(v.chunks_exact(w).map(Arc::from).collect())
    }

    /// The ranker over pairs.
    ///
    /// A pair's probability is the same to the last bit whatever it is
    /// batched with. With ONNX Runtime's CPU kernels it was not: alone, or
    /// beside pairs whose history or graph slots are all filled like its
    /// own, some pairs took other kernels (last bits differ;
    /// `tests/mmbee_scoring.rs::mfq_and_the_ranker_do_not_depend_on_their_batch`).
    /// So every batch runs with one more pair, an anchor whose slots are
    /// mostly padding, and its probability is dropped.
    pub fn rank(&mut self, inputs: &[&PairFeatures]) -> Result<Vec<f32>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let anchor = self.anchor();
        let mut batch = inputs.to_vec();
        batch.push(&anchor);
        let mut p = self.run_rank(&batch)?;
        p.truncate(inputs.len());
        Ok(p)
    }

    /// The pair run beside every batch of the ranker: no content, no graph,
    /// one gift in its history.
    fn anchor(&self) -> PairFeatures {
        let gift = Gift {
            streamer_id: Arc::from(""),
            t_ms: 0,
            value: 1,
        };
        PairFeatures::build(
            &self.spec,
            None,
            self.empty.clone(),
            "",
            "",
            &[gift],
            &SessionRow::default(),
            1,
        )
    }

    fn run_rank(&mut self, inputs: &[&PairFeatures]) -> Result<Vec<f32>, ModelError> {
        let b = inputs.len();
        let Dims {
            d,
            queries: n,
            graph: g,
            seq_len: l,
            exp_len: k,
            context: c,
        } = self.spec.dims;
        let cat =
            |f: &dyn Fn(&PairFeatures) -> &[f32], width: usize| -> Result<Vec<f32>, ModelError> {
                let mut v = Vec::with_capacity(b * width);
                for p in inputs {
                    let x = f(p);
                    if x.len() != width || x.iter().any(|v| !v.is_finite()) {
                        return Err(ModelError::Input(format!(
                            "a pair input of {} values (want {width} finite ones)",
                            x.len()
                        )));
                    }
                    v.extend_from_slice(x);
                }
                Ok(v)
            };
        let tokens = cat(&|p| &p.tokens, n * d)?;
        let sg = cat(&|p| &p.streamer_graph, g)?;
        let ug = cat(&|p| &p.user_graph, g)?;
        let seq = cat(&|p| &p.seq, l * g)?;
        let sf = cat(&|p| &p.seq_feats, l * 3)?;
        let sm = cat(&|p| &p.seq_mask, l)?;
        let exp = cat(&|p| &p.exp, k * g)?;
        let es = cat(&|p| &p.exp_scores, k)?;
        let em = cat(&|p| &p.exp_mask, k)?;
        let ctx = cat(&|p| &p.context, c)?;
        let index: Vec<i64> = inputs.iter().map(|p| p.streamer_index).collect();
        let runtime = |e: ort::Error| ModelError::Runtime(format!("MMBee ranker: {e}"));
        let out = self
            .ranker
            .run(ort::inputs![
                "tokens" => TensorRef::from_array_view(([b, n, d], &tokens[..])).map_err(runtime)?,
                "streamer_index" => TensorRef::from_array_view(([b], &index[..])).map_err(runtime)?,
                "streamer_graph" => TensorRef::from_array_view(([b, g], &sg[..])).map_err(runtime)?,
                "user_graph" => TensorRef::from_array_view(([b, g], &ug[..])).map_err(runtime)?,
                "seq" => TensorRef::from_array_view(([b, l, g], &seq[..])).map_err(runtime)?,
                "seq_feats" => TensorRef::from_array_view(([b, l, 3], &sf[..])).map_err(runtime)?,
                "seq_mask" => TensorRef::from_array_view(([b, l], &sm[..])).map_err(runtime)?,
                "exp" => TensorRef::from_array_view(([b, k, g], &exp[..])).map_err(runtime)?,
                "exp_scores" => TensorRef::from_array_view(([b, k], &es[..])).map_err(runtime)?,
                "exp_mask" => TensorRef::from_array_view(([b, k], &em[..])).map_err(runtime)?,
                "context" => TensorRef::from_array_view(([b, c], &ctx[..])).map_err(runtime)?,
            ])
            .map_err(runtime)?;
        let (_, v) = out["probability"]
            .try_extract_tensor::<f32>()
            .map_err(runtime)?;
        if v.len() != b {
            return Err(ModelError::Runtime(format!(
                "MMBee ranker gave {} values for {b} pairs",
                v.len()
            )));
        }
        Ok(v.to_vec())
    }

    /// The smoke inputs: an empty segment of an unknown streamer, and a pair of
    /// an unknown viewer with no history over its tokens.
    fn smoke_run(&mut self) -> Result<(), ModelError> {
        let tokens = self.run_empty()?;
        let (pair, _) = self.features(&PairInput {
            tokens,
            tokens_model: self.label.clone(),
            streamer_id: Arc::from(""),
            user_id: Arc::from(""),
            history: Vec::new(),
            session: SessionRow::default(),
            t_ms: 0,
        });
        match self.rank(&[&pair])?.first() {
            Some(p) if (0.0..=1.0).contains(p) => Ok(()),
            _ => Err(ModelError::Runtime(
                "no probability in [0, 1] for an empty pair".into(),
            )),
        }
    }
}

impl Servable for MmbeeModel {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        MmbeeModel::load(dir, threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        self.smoke_run()
    }
}

/// Graph tables by version, read once and shared by every replica and version
/// that names them while any of them holds them.
struct GraphCache {
    root: PathBuf,
    loaded: Mutex<HashMap<u64, Weak<GraphTables>>>,
}

impl GraphCache {
    /// The tables of `version` (None for version 0: a model without a graph).
    /// A version the model names but that cannot be read fails the load, so
    /// the version serving before stays.
    fn get(&self, version: u64) -> Result<Option<Arc<GraphTables>>, ModelError> {
        if version == 0 {
            return Ok(None);
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.retain(|_, t| t.strong_count() > 0);
        if let Some(t) = loaded.get(&version).and_then(Weak::upgrade) {
            return Ok(Some(t));
        }
        let dir = self.root.join(version.to_string());
        let tables = GraphTables::read(&dir).map_err(|e| ModelError::Missing {
            path: dir.display().to_string(),
            reason: format!("the graph version the MMBee model names: {e}"),
        })?;
        let tables = Arc::new(tables);
        loaded.insert(version, Arc::downgrade(&tables));
        Ok(Some(tables))
    }
}

/// MMBee as the operators of both stages share it: the batcher of the serving
/// version (MFQ, the ranker and the graph tables they were trained with, as
/// one unit). One per process. With `reload_interval_ms` set, a new version
/// directory is loaded (with the graph version it names) and swapped in;
/// a version that fails to load, or whose graph tables are missing, leaves
/// the serving one in place.
pub struct MmbeeService {
    /// The batcher of both graphs.
    pub model: Box<dyn Submit<Request, Reply>>,
    slot: Arc<ModelSlot<MmbeeModel>>,
    _watch: Option<Watch>,
}

impl std::fmt::Debug for MmbeeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmbeeService")
            .field("model", &self.label())
            .field("graph", &self.graph_version())
            .finish_non_exhaustive()
    }
}

impl MmbeeService {
    /// Loads the highest working version under `cfg.model` with the graph
    /// version it names under `cfg.graph`, and starts the batcher (and the
    /// reload watch).
    pub fn start(cfg: &crate::config::MmbeeConfig) -> Result<Self, ModelError> {
        let graphs = Arc::new(GraphCache {
            root: PathBuf::from(&cfg.graph),
            loaded: Mutex::new(HashMap::new()),
        });
        let loader: super::serving::Loader<MmbeeModel> = Arc::new(move |dir: &Path, threads| {
            let model = MmbeeModel::load(dir, threads)?;
            let graph = graphs.get(model.spec.graph_version)?;
            model.with_graph(graph)
        });
        let slot = ModelSlot::open_with(
            Path::new(&cfg.model),
            cfg.batch.workers,
            cfg.batch.threads,
            loader,
        )?;
        let watch = (cfg.reload_interval_ms > 0)
            .then(|| slot.watch(std::time::Duration::from_millis(cfg.reload_interval_ms)));
        Ok(MmbeeService {
            model: Box::new(Batcher::start(slot.clone(), cfg.batch.batch_config())),
            slot,
            _watch: watch,
        })
    }

    /// `name@version` of the serving version.
    pub fn label(&self) -> Arc<str> {
        self.slot.label()
    }

    /// The graph version the serving version reads (0: none).
    pub fn graph_version(&self) -> u64 {
        self.slot.current().replica(0).graph_version()
    }

    /// The serving version's widths.
    pub fn dims(&self) -> Dims {
        self.slot.current().replica(0).spec.dims
    }
}

/// Content and pairs share a batch: each kind runs as one call of its graph.
impl BatchModel for MmbeeModel {
    type Input = Request;
    type Output = Reply;

    fn run_batch(&mut self, inputs: &[Request]) -> Result<Vec<Reply>, ModelError> {
        let contents: Vec<&ContentInput> = inputs
            .iter()
            .filter_map(|r| match r {
                Request::Content(c) => Some(c),
                Request::Pair(_) => None,
            })
            .collect();
        let (pairs, own): (Vec<PairFeatures>, Vec<bool>) = inputs
            .iter()
            .filter_map(|r| match r {
                Request::Pair(p) => Some(self.features(p)),
                Request::Content(_) => None,
            })
            .unzip();
        let refs: Vec<&PairFeatures> = pairs.iter().collect();
        let dim = self.spec.dims.d as u32;
        let graph_version = self.graph_version();
        let mut tokens = self.content(&contents)?.into_iter();
        let mut probs = self.rank(&refs)?.into_iter().zip(own);
        inputs
            .iter()
            .map(|r| {
                let out = match r {
                    Request::Content(_) => {
                        tokens.next().map(|tokens| Reply::Tokens { tokens, dim })
                    }
                    Request::Pair(_) => probs.next().map(|(probability, content)| {
                        Reply::Pair(Scored {
                            probability,
                            content,
                            graph_version,
                        })
                    }),
                };
                out.ok_or_else(|| ModelError::Runtime("MMBee batch lost a result".into()))
            })
            .collect()
    }
}
