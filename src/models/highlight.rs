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
        let b = inputs.len();
        let Spec { window, dims, .. } = self.spec;
        let h = window - 1;
        if b == 0 {
            return Ok(Vec::new());
        }
        let mut x = Vec::with_capacity(b * dims.x);
        let mut streamer = Vec::with_capacity(b * dims.x);
        let mut z = vec![0.0f32; b * h * dims.z];
        let mut e = vec![0.0f32; b * h * dims.e];
        let mut p = vec![0.0f32; b * h * dims.p];
        let mut valid = vec![0.0f32; b * h];
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
            x.extend_from_slice(&input.x);
            streamer.extend_from_slice(&input.streamer);
            // The last h states that fit, right-aligned: empty slots in front.
            let usable: Vec<&StepState> = input
                .history
                .iter()
                .rev()
                .take_while(|s| s.z.len() == dims.z && s.e.len() == dims.e && s.p.len() == dims.p)
                .take(h)
                .map(|s| s.as_ref())
                .collect();
            for (back, s) in usable.iter().enumerate() {
                let slot = i * h + (h - 1 - back);
                z[slot * dims.z..(slot + 1) * dims.z].copy_from_slice(&s.z);
                e[slot * dims.e..(slot + 1) * dims.e].copy_from_slice(&s.e);
                p[slot * dims.p..(slot + 1) * dims.p].copy_from_slice(&s.p);
                valid[slot] = 1.0;
            }
        }
        let runtime = |e: ort::Error| ModelError::Runtime(format!("highlight model: {e}"));
        let outputs = self
            .session
            .run(ort::inputs![
                "x" => TensorRef::from_array_view(([b, dims.x], &x[..])).map_err(runtime)?,
                "streamer" => TensorRef::from_array_view(([b, dims.x], &streamer[..])).map_err(runtime)?,
                "z_hist" => TensorRef::from_array_view(([b, h, dims.z], &z[..])).map_err(runtime)?,
                "e_hist" => TensorRef::from_array_view(([b, h, dims.e], &e[..])).map_err(runtime)?,
                "p_hist" => TensorRef::from_array_view(([b, h, dims.p], &p[..])).map_err(runtime)?,
                "valid" => TensorRef::from_array_view(([b, h], &valid[..])).map_err(runtime)?,
            ])
            .map_err(runtime)?;
        let take = |name: &str, width: usize| -> Result<Vec<f32>, ModelError> {
            let (_, v) = outputs[name].try_extract_tensor::<f32>().map_err(runtime)?;
            if v.len() != b * width {
                return Err(ModelError::Runtime(format!(
                    "highlight model gave {} values of {name} for {b} rooms",
                    v.len()
                )));
            }
            Ok(v.to_vec())
        };
        let score = take("score", 1)?;
        let logit = take("logit", 1)?;
        let (oz, oe, op) = (take("z", dims.z)?, take("e", dims.e)?, take("p", dims.p)?);
        Ok((0..b)
            .map(|i| StepOutput {
                score: score[i],
                logit: logit[i],
                state: Arc::new(StepState {
                    z: oz[i * dims.z..(i + 1) * dims.z].to_vec(),
                    e: oe[i * dims.e..(i + 1) * dims.e].to_vec(),
                    p: op[i * dims.p..(i + 1) * dims.p].to_vec(),
                }),
                threshold: self.spec.threshold,
            })
            .collect())
    }
}

impl Servable for HighlightModel {
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        HighlightModel::load(dir, threads)
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        let x = self.spec.dims.x;
        let out = self.step(&[StepInput {
            x: vec![0.0; x],
            streamer: vec![0.0; x],
            history: Vec::new(),
        }])?;
        match out.first() {
            Some(o) if (0.0..=1.0).contains(&o.score) && o.logit.is_finite() => Ok(()),
            _ => Err(ModelError::Runtime(
                "no score in [0, 1] for an empty tick".into(),
            )),
        }
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
