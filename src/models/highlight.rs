//! The highlight model's online step, run by ONNX Runtime: for each room, the
//! newest tick's feature row plus what the room's previous ticks left
//! behind (their cached per-tick states) in, the tick's highlight score and
//! its own state out. The model is trained and exported by
//! `models/highlight/` (see its README, the model card); a version directory
//! holds `model.onnx` and `highlight.json` (window, state widths, calibrated
//! event thresholds).
//!
//! Why a step: every position of the model looks back over exactly `window`
//! ticks, so a tick's intermediate results never change once computed. The
//! engine keeps them per room and each tick costs O(window), not the
//! O(window²) of re-running the whole window.
//!
//! Not for: keeping the rooms' histories or turning scores into events (the
//! highlight operator does both), or training.

use std::path::Path;
use std::sync::Arc;

use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use super::batcher::BatchModel;
use super::serving::Servable;
use super::ModelError;

/// Widths of the step's vectors.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Dims {
    /// The feature row (see `features::row`).
    pub x: usize,
    /// Text state.
    pub z: usize,
    /// Aligned frame state.
    pub e: usize,
    /// Perceiver state.
    pub p: usize,
}

/// Calibrated event thresholds (hysteresis) that came with the model.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Threshold {
    /// A highlight opens at the first tick scoring at least this.
    pub enter: f32,
    /// It stays open while ticks score at least this.
    pub exit: f32,
    /// It closes after this many ticks in a row below `exit`.
    pub hold_ticks: u32,
    /// Highlights shorter than this many ticks are not reported.
    pub min_ticks: u32,
}

/// What `highlight.json` says about a version.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Spec {
    /// Ticks each position looks back over, itself included.
    pub window: usize,
    /// Vector widths.
    pub dims: Dims,
    /// Event thresholds.
    pub threshold: Threshold,
}

impl Spec {
    /// Reads and checks `highlight.json`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let missing = |reason: String| ModelError::Missing {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| missing(e.to_string()))?;
        let spec: Spec = serde_json::from_str(&text).map_err(|e| missing(e.to_string()))?;
        let t = &spec.threshold;
        let sane = (2..=4096).contains(&spec.window)
            && spec.dims.x == crate::features::row::ROW_WIDTH
            && [spec.dims.z, spec.dims.e, spec.dims.p]
                .iter()
                .all(|d| (1..=65_536).contains(d))
            && (0.0..=1.0).contains(&t.exit)
            && t.exit <= t.enter
            && t.enter <= 1.0
            && t.hold_ticks >= 1;
        if sane {
            Ok(spec)
        } else {
            Err(missing(format!("implausible spec {spec:?}")))
        }
    }
}

/// What one tick of a room leaves for the ticks after it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepState {
    /// Text state.
    pub z: Vec<f32>,
    /// Aligned frame state.
    pub e: Vec<f32>,
    /// Perceiver state.
    pub p: Vec<f32>,
}

/// One room's request: its newest tick.
#[derive(Clone, Debug)]
pub struct StepInput {
    /// The tick's feature row.
    pub x: Vec<f32>,
    /// Mean feature row of the room's ticks so far, this one included.
    pub streamer: Vec<f32>,
    /// States of the room's previous ticks, oldest first (any number; the
    /// model uses the last `window - 1` whose widths are its own).
    pub history: Vec<Arc<StepState>>,
}

/// One room's result.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// Probability that the tick is a highlight moment.
    pub score: f32,
    /// The score before the sigmoid.
    pub logit: f32,
    /// What the tick leaves for the next ones.
    pub state: Arc<StepState>,
    /// The thresholds of the version that scored it.
    pub threshold: Threshold,
}

/// A loaded version.
pub struct HighlightModel {
    session: Session,
    spec: Spec,
}

impl std::fmt::Debug for HighlightModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HighlightModel")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Input names of the step graph, in order.
const INPUTS: [&str; 6] = ["x", "streamer", "z_hist", "e_hist", "p_hist", "valid"];
/// Output names the engine reads.
const OUTPUTS: [&str; 5] = ["score", "logit", "z", "e", "p"];

impl HighlightModel {
    /// Loads `model.onnx` and `highlight.json` from a version directory.
    pub fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let spec = Spec::load(&dir.join("highlight.json"))?;
        let model = dir.join("model.onnx");
        let session = super::onnx::session(&model, threads)?;
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != INPUTS || !OUTPUTS.iter().all(|o| outputs.contains(o)) {
            return Err(ModelError::Missing {
                path: model.display().to_string(),
                reason: format!(
                    "not the highlight step export (inputs {inputs:?}, outputs {outputs:?})"
                ),
            });
        }
        Ok(HighlightModel { session, spec })
    }

    /// The version's spec.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Scores a batch of rooms' newest ticks.
    pub fn step(&mut self, inputs: &[StepInput]) -> Result<Vec<StepOutput>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let k = Packed::new(&self.spec, inputs)?;
        let Packed { b, h, dims, .. } = k;
        let runtime = |e: ort::Error| ModelError::Runtime(format!("highlight model: {e}"));
        let outputs = self
            .session
            .run(ort::inputs![
                "x" => TensorRef::from_array_view(([b, dims.x], &k.x[..])).map_err(runtime)?,
                "streamer" => TensorRef::from_array_view(([b, dims.x], &k.streamer[..])).map_err(runtime)?,
                "z_hist" => TensorRef::from_array_view(([b, h, dims.z], &k.z[..])).map_err(runtime)?,
                "e_hist" => TensorRef::from_array_view(([b, h, dims.e], &k.e[..])).map_err(runtime)?,
                "p_hist" => TensorRef::from_array_view(([b, h, dims.p], &k.p[..])).map_err(runtime)?,
                "valid" => TensorRef::from_array_view(([b, h], &k.valid[..])).map_err(runtime)?,
            ])
            .map_err(runtime)?;
        let take = |name: &str| -> Result<Vec<f32>, ModelError> {
            let (_, v) = outputs[name].try_extract_tensor::<f32>().map_err(runtime)?;
            Ok(v.to_vec())
        };
        k.unpack(
            &self.spec,
            [
                take("score")?,
                take("logit")?,
                take("z")?,
                take("e")?,
                take("p")?,
            ],
        )
    }
}

/// One batch laid out as the step graph reads it (shared by the backends).
pub(crate) struct Packed {
    /// Rooms.
    pub b: usize,
    /// History slots (window - 1).
    pub h: usize,
    /// Widths.
    pub dims: Dims,
    /// [b, x] rows.
    pub x: Vec<f32>,
    /// [b, x] running means.
    pub streamer: Vec<f32>,
    /// [b, h, z] text states.
    pub z: Vec<f32>,
    /// [b, h, e] aligned frame states.
    pub e: Vec<f32>,
    /// [b, h, p] perceiver states.
    pub p: Vec<f32>,
    /// [b, h]: 1 where a slot holds a state.
    pub valid: Vec<f32>,
}

impl Packed {
    /// Packs `inputs` (not empty) for a model of `spec`.
    pub fn new(spec: &Spec, inputs: &[StepInput]) -> Result<Self, ModelError> {
        let b = inputs.len();
        let dims = spec.dims;
        let h = spec.window - 1;
        let mut k = Packed {
            b,
            h,
            dims,
            x: Vec::with_capacity(b * dims.x),
            streamer: Vec::with_capacity(b * dims.x),
            z: vec![0.0; b * h * dims.z],
            e: vec![0.0; b * h * dims.e],
            p: vec![0.0; b * h * dims.p],
            valid: vec![0.0; b * h],
        };
        for (i, input) in inputs.iter().enumerate() {
            if input.x.len() != dims.x || input.streamer.len() != dims.x {
                return Err(ModelError::Input(format!(
                    "rows of {} and {} values, not {}",
                    input.x.len(),
                    input.streamer.len(),
                    dims.x
                )));
            }
            if input
                .x
                .iter()
                .chain(&input.streamer)
                .any(|v| !v.is_finite())
            {
                return Err(ModelError::Input("non-finite feature value".into()));
            }
            k.x.extend_from_slice(&input.x);
            k.streamer.extend_from_slice(&input.streamer);
            // The last h states that fit, right-aligned: empty slots in front.
            let usable = input
                .history
                .iter()
                .rev()
                .take_while(|s| s.z.len() == dims.z && s.e.len() == dims.e && s.p.len() == dims.p)
                .take(h);
            for (back, s) in usable.enumerate() {
                let slot = i * h + (h - 1 - back);
                k.z[slot * dims.z..(slot + 1) * dims.z].copy_from_slice(&s.z);
                k.e[slot * dims.e..(slot + 1) * dims.e].copy_from_slice(&s.e);
                k.p[slot * dims.p..(slot + 1) * dims.p].copy_from_slice(&s.p);
                k.valid[slot] = 1.0;
            }
        }
        Ok(k)
    }

    /// The rooms' results from the graph's outputs (score, logit, z, e, p).
    pub fn unpack(&self, spec: &Spec, out: [Vec<f32>; 5]) -> Result<Vec<StepOutput>, ModelError> {
        let (b, dims) = (self.b, self.dims);
        let [score, logit, z, e, p] = out;
        for (name, v, width) in [
            ("score", &score, 1),
            ("logit", &logit, 1),
            ("z", &z, dims.z),
            ("e", &e, dims.e),
            ("p", &p, dims.p),
        ] {
            if v.len() != b * width {
                return Err(ModelError::Runtime(format!(
                    "highlight model gave {} values of {name} for {b} rooms",
                    v.len()
                )));
            }
        }
        Ok((0..b)
            .map(|i| StepOutput {
                score: score[i],
                logit: logit[i],
                state: Arc::new(StepState {
                    z: z[i * dims.z..(i + 1) * dims.z].to_vec(),
                    e: e[i * dims.e..(i + 1) * dims.e].to_vec(),
                    p: p[i * dims.p..(i + 1) * dims.p].to_vec(),
                }),
                threshold: spec.threshold,
            })
            .collect())
    }
}

/// Checks a version's smoke output: a score in [0, 1] for an empty tick.
pub(crate) fn smoke_check(out: &[StepOutput]) -> Result<(), ModelError> {
    match out.first() {
        Some(o) if (0.0..=1.0).contains(&o.score) && o.logit.is_finite() => Ok(()),
        _ => Err(ModelError::Runtime(
            "no score in [0, 1] for an empty tick".into(),
        )),
    }
}

/// The smoke input: one empty tick with no history.
pub(crate) fn smoke_input(spec: &Spec) -> StepInput {
    StepInput {
        x: vec![0.0; spec.dims.x],
        streamer: vec![0.0; spec.dims.x],
        history: Vec::new(),
    }
}

impl Servable for HighlightModel {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        HighlightModel::load(dir, threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        let input = smoke_input(&self.spec);
        smoke_check(&self.step(&[input])?)
    }
}

/// One request is one room's newest tick.
impl BatchModel for HighlightModel {
    type Input = StepInput;
    type Output = StepOutput;

    fn run_batch(&mut self, inputs: &[StepInput]) -> Result<Vec<StepOutput>, ModelError> {
        self.step(inputs)
    }
}
