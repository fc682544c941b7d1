//! The compressed-interest model of the user stage: k learned interest
//! queries attending, with linear attention, over every behaviour of a user's
//! history, so that a fixed-size summary of an arbitrarily long history can be
//! kept per user and updated as behaviours arrive and change.
//!
//! A behaviour `b` becomes an embedding `e = O[bucket(owner)] + W x(b) + c`
//! ([`dense`] is `x`: domain, watch time, completion, feedback bits, gift
//! value), a key `k = φ(K e)` with `φ = elu + 1` (positive) and a value
//! `v = V e`. The user's state is the pair of sums `S = Σ k vᵀ` and
//! `z = Σ k` over the behaviours; interest `j` reads them with its learned
//! query `q_j`: `h_j = φ(q_j)ᵀ S / φ(q_j)ᵀ z`, published as `P h_j`. Because
//! the state is a sum, adding a behaviour adds its term and a change to a
//! behaviour (more watch time, a like) subtracts the old term and adds the new
//! one; [`crate::state::interests`] keeps the sums exactly (fixed point).
//!
//! What it is for: loading a trained version (`interests.json`, from
//! `models/interests/train.py`), the features, one behaviour's term and the
//! read-out. What it is not for: the sums themselves (state), training
//! (PyTorch, `scripts/interests`), or the behaviour's content vector and
//! highlight score, which this version does not read (see the card).

use std::path::Path;

use serde::Deserialize;

use super::ModelError;
use crate::state::sequence::{Behaviour, Domain, Feedback};

/// Width of [`dense`].
pub const DENSE: usize = 12;

/// One behaviour's dense features, the model's input besides the owner.
pub fn dense(b: &Behaviour) -> [f32; DENSE] {
    let mut x = [0f32; DENSE];
    let short = b.domain == Domain::ShortVideo;
    x[0] = f32::from(u8::from(!short));
    x[1] = f32::from(u8::from(short));
    x[2] = ((b.watch_ms as f64 / 1000.0).ln_1p() / 5.0) as f32;
    if short && b.duration_ms > 0 {
        x[3] = ((b.watch_ms as f64 / f64::from(b.duration_ms)).min(2.0) / 2.0) as f32;
    }
    for (i, f) in Feedback::ALL.iter().enumerate() {
        x[4 + i] = f32::from(u8::from(b.feedback & f.bit() != 0));
    }
    x[11] = ((b.gift_value as f64).ln_1p() / 5.0) as f32;
    x
}

/// The owner's embedding row: FNV-1a (64 bit) of its id, modulo `buckets`.
pub fn bucket(owner: &str, buckets: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in owner.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % buckets.max(1) as u64) as usize
}

/// `interests.json` as written by `models/interests/export.py`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u64,
    buckets: usize,
    dense: usize,
    dim: usize,
    key_dim: usize,
    value_dim: usize,
    out_dim: usize,
    interests: usize,
    /// buckets x dim.
    owner: Vec<f32>,
    /// dim x dense.
    weight: Vec<f32>,
    /// dim.
    bias: Vec<f32>,
    /// key_dim x dim.
    key: Vec<f32>,
    /// value_dim x dim.
    value: Vec<f32>,
    /// interests x key_dim.
    queries: Vec<f32>,
    /// out_dim x value_dim.
    project: Vec<f32>,
    /// Reference outputs from PyTorch, checked at load.
    #[serde(default)]
    checks: Vec<Check>,
}

/// A sequence of behaviours (dense features and owner) and the interests
/// PyTorch computed for it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    dense: Vec<Vec<f32>>,
    owners: Vec<String>,
    interests: Vec<f32>,
}

/// A loaded interest model.
#[derive(Debug)]
pub struct InterestModel {
    label: String,
    buckets: usize,
    dim: usize,
    key_dim: usize,
    value_dim: usize,
    out_dim: usize,
    // The weights in f64, as every term is computed.
    owner: Vec<f64>,
    weight: Vec<f64>,
    bias: Vec<f64>,
    key: Vec<f64>,
    value: Vec<f64>,
    /// φ(q_j), interests x key_dim.
    queries: Vec<f64>,
    project: Vec<f64>,
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// φ = elu + 1: positive, so every attention weight is.
fn phi(x: f64) -> f64 {
    if x > 0.0 {
        x + 1.0
    } else {
        x.exp()
    }
}

/// One behaviour's key φ(K e) and value V e.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    /// key_dim values, all positive.
    pub key: Vec<f64>,
    /// value_dim values.
    pub value: Vec<f64>,
}

impl InterestModel {
    /// Loads the newest version directory under `dir` (or `dir` itself when
    /// it holds `interests.json`) and checks it against its reference outputs.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let dir = if dir.join("interests.json").is_file() {
            dir.to_path_buf()
        } else {
            super::serving::latest_version(dir).ok_or_else(|| ModelError::Missing {
                path: dir.display().to_string(),
                reason: "no version directory".into(),
            })?
        };
        let path = dir.join("interests.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Missing {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let file: File = serde_json::from_str(&text).map_err(|e| ModelError::Missing {
            path: path.display().to_string(),
            reason: format!("not an interest model: {e}"),
        })?;
        Self::from_file(file).map_err(|reason| ModelError::Missing {
            path: path.display().to_string(),
            reason,
        })
    }

    fn from_file(f: File) -> Result<Self, String> {
        let shapes = [
            ("owner", f.owner.len(), f.buckets * f.dim),
            ("weight", f.weight.len(), f.dim * f.dense),
            ("bias", f.bias.len(), f.dim),
            ("key", f.key.len(), f.key_dim * f.dim),
            ("value", f.value.len(), f.value_dim * f.dim),
            ("queries", f.queries.len(), f.interests * f.key_dim),
            ("project", f.project.len(), f.out_dim * f.value_dim),
        ];
        for (name, got, want) in shapes {
            if got != want {
                return Err(format!("{name}: {got} values, expected {want}"));
            }
        }
        if f.dense != DENSE || f.buckets == 0 || f.interests == 0 || f.key_dim == 0 {
            return Err(format!(
                "shape: dense {} (engine: {DENSE}), buckets {}, interests {}, key_dim {}",
                f.dense, f.buckets, f.interests, f.key_dim
            ));
        }
        if [
            &f.owner, &f.weight, &f.bias, &f.key, &f.value, &f.queries, &f.project,
        ]
        .iter()
        .any(|w| w.iter().any(|v| !v.is_finite()))
        {
            return Err("non-finite weight".into());
        }
        let model = InterestModel {
            label: format!("interests@{}", f.version),
            buckets: f.buckets,
            dim: f.dim,
            key_dim: f.key_dim,
            value_dim: f.value_dim,
            out_dim: f.out_dim,
            owner: wide(&f.owner),
            weight: wide(&f.weight),
            bias: wide(&f.bias),
            key: wide(&f.key),
            value: wide(&f.value),
            queries: f.queries.iter().map(|&q| phi(f64::from(q))).collect(),
            project: wide(&f.project),
        };
        for (i, c) in f.checks.iter().enumerate() {
            model
                .check(c)
                .map_err(|e| format!("reference check {i}: {e}"))?;
        }
        Ok(model)
    }

    /// Recomputes a reference sequence's interests (in floating point, as
    /// PyTorch does) and compares.
    fn check(&self, c: &Check) -> Result<(), String> {
        if c.dense.len() != c.owners.len() || c.dense.iter().any(|d| d.len() != DENSE) {
            return Err("malformed".into());
        }
        let mut s = vec![0f64; self.state_len()];
        for (d, owner) in c.dense.iter().zip(&c.owners) {
            let x: [f32; DENSE] = d.as_slice().try_into().map_err(|_| "width")?;
            let t = self.term(&x, bucket(owner, self.buckets));
            self.accumulate(&t, |i, v| s[i] += v);
        }
        let got = self.read_out(|i| s[i]);
        if got.len() != c.interests.len() {
            return Err(format!(
                "{} values, reference {}",
                got.len(),
                c.interests.len()
            ));
        }
        for (g, w) in got.iter().zip(&c.interests) {
            if (g - w).abs() > 1e-3 * (1.0 + w.abs()) {
                return Err(format!("{g} where PyTorch computed {w}"));
            }
        }
        Ok(())
    }

    /// `interests@N`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Embedding rows of owners.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Interests read out per user.
    pub fn interests(&self) -> usize {
        self.queries.len() / self.key_dim
    }

    /// Width of one published interest.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Values in a user's state: S (key_dim x value_dim) then z (key_dim).
    pub fn state_len(&self) -> usize {
        self.key_dim * self.value_dim + self.key_dim
    }

    /// One behaviour's key and value, from its features and owner bucket.
    pub fn term(&self, x: &[f32; DENSE], bucket: usize) -> Term {
        let row = bucket.min(self.buckets - 1) * self.dim;
        let x = x.map(f64::from);
        let owner = &self.owner[row..row + self.dim];
        let e: Vec<f64> = (self.weight.chunks_exact(DENSE).zip(owner).zip(&self.bias))
            .map(|((w, o), b)| o + b + dot(w, &x))
            .collect();
        Term {
            key: self
                .key
                .chunks_exact(self.dim)
                .map(|k| phi(dot(k, &e)))
                .collect(),
            value: self
                .value
                .chunks_exact(self.dim)
                .map(|v| dot(v, &e))
                .collect(),
        }
    }

    /// Calls `add(i, v)` for each state value `i` the term adds `v` to.
    pub fn accumulate(&self, t: &Term, mut add: impl FnMut(usize, f64)) {
        for (a, &k) in t.key.iter().enumerate() {
            for (c, &v) in t.value.iter().enumerate() {
                add(a * self.value_dim + c, k * v);
            }
            add(self.key_dim * self.value_dim + a, k);
        }
    }

    /// The published interests (interests x out_dim, row-major) from a state
    /// whose value `i` is `state(i)`.
    pub fn read_out(&self, state: impl Fn(usize) -> f64) -> Vec<f32> {
        let kv = self.key_dim * self.value_dim;
        let mut out = Vec::with_capacity(self.interests() * self.out_dim);
        for q in self.queries.chunks_exact(self.key_dim) {
            let den: f64 = q.iter().enumerate().map(|(a, &w)| w * state(kv + a)).sum();
            let h: Vec<f64> = (0..self.value_dim)
                .map(|c| {
                    let num: f64 = q
                        .iter()
                        .enumerate()
                        .map(|(a, &w)| w * state(a * self.value_dim + c))
                        .sum();
                    num / den.max(1e-9)
                })
                .collect();
            for p in self.project.chunks_exact(self.value_dim) {
                out.push(dot(p, &h) as f32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_model_loads_and_matches_pytorch() {
        let m = InterestModel::load(Path::new("models/interests")).expect("committed model");
        assert!(m.interests() >= 1);
        assert_eq!(m.read_out(|_| 0.0).len(), m.interests() * m.out_dim());
    }

    #[test]
    fn a_model_that_disagrees_with_its_pytorch_reference_is_refused() {
        let dir = crate::models::serving::latest_version(Path::new("models/interests")).unwrap();
        let text = std::fs::read_to_string(dir.join("interests.json")).unwrap();
        let mut f: File = serde_json::from_str(&text).unwrap();
        assert!(!f.checks.is_empty(), "the export writes reference outputs");
        f.project[0] += 0.5;
        let err = InterestModel::from_file(f).unwrap_err();
        assert!(err.contains("reference check"), "{err}");
    }

    #[test]
    fn buckets_are_fnv1a() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(
            bucket("a", usize::MAX),
            0xaf63_dc4c_8601_ec8c_u64 as usize % usize::MAX
        );
        assert_eq!(bucket("", 7), (0xcbf2_9ce4_8422_2325_u64 % 7) as usize);
    }
}
