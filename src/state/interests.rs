//! One user's compressed interests, kept incrementally: the sums `S = Σ k vᵀ`
//! and `z = Σ k` of [`InterestModel`] over every behaviour the user's
//! sequence ever held, each behaviour counted in its latest state while the
//! sequence held it (a behaviour that leaves the bounded sequence stays in
//! the sums as it was then: the summary covers the whole history, the
//! sequence only its newest part).
//!
//! The sums are kept in fixed point, each term rounded to a multiple of
//! 2^-[`FRACTION_BITS`] before it is added, with wrapping 64-bit integer
//! arithmetic. Integer addition is associative, commutative and exactly
//! invertible, so the incremental state (terms added as behaviours arrive,
//! a changed behaviour's old term subtracted and the new one added, in any
//! order) is bit for bit the sum recomputed from scratch over the same
//! behaviours, and replays after a restart give identical records. Against
//! the real-valued sums, each value differs by at most `n · 2^-(FRACTION_BITS+1)`
//! after `n` terms (tested). Wrapping cannot panic; the sums stay far from
//! the range's end (terms are bounded by the model's weights: a value needs
//! about 2^39 / |term| behaviours to wrap).
//!
//! Not for: the model (features, terms, read-out: [`crate::models::interests`])
//! or when terms are added (the fold, [`super::sequence`]).

use std::sync::Arc;

use crate::models::interests::{bucket, dense, InterestModel, DENSE};
use crate::state::sequence::Behaviour;

/// Fixed-point fraction bits of the sums.
pub const FRACTION_BITS: u32 = 24;

const SCALE: f64 = (1u64 << FRACTION_BITS) as f64;

/// A real value as a fixed-point term (saturating far outside any term).
fn fixed(v: f64) -> i64 {
    // Round half away from zero (without libm's `round`); the cast saturates.
    let x = v * SCALE;
    (x + 0.5f64.copysign(x)) as i64
}

/// One user's sums under one model.
#[derive(Clone, Debug)]
pub struct Interests {
    model: Arc<InterestModel>,
    sums: Box<[i64]>,
    /// Behaviours added (each once, however often it changed).
    count: u64,
}

impl PartialEq for Interests {
    fn eq(&self, other: &Self) -> bool {
        self.model.label() == other.model.label()
            && self.sums == other.sums
            && self.count == other.count
    }
}

impl Interests {
    /// Empty sums.
    pub fn new(model: Arc<InterestModel>) -> Self {
        let sums = vec![0; model.state_len()].into_boxed_slice();
        Interests {
            model,
            sums,
            count: 0,
        }
    }

    /// Sums restored from a record; None when they do not fit the model
    /// (another version or shape wrote them).
    pub fn restore(
        model: Arc<InterestModel>,
        label: &str,
        sums: Vec<i64>,
        count: u64,
    ) -> Option<Self> {
        (label == model.label() && sums.len() == model.state_len()).then(|| Interests {
            model,
            sums: sums.into_boxed_slice(),
            count,
        })
    }

    fn term(&mut self, x: &[f32; DENSE], owner: &str, sign: i64) {
        let t = self.model.term(x, bucket(owner, self.model.buckets()));
        let sums = &mut self.sums;
        self.model.accumulate(&t, |i, v| {
            sums[i] = sums[i].wrapping_add(sign.wrapping_mul(fixed(v)));
        });
    }

    /// Adds a new behaviour's term.
    pub fn add(&mut self, b: &Behaviour) {
        self.term(&dense(b), &b.owner, 1);
        self.count = self.count.wrapping_add(1);
    }

    /// Replaces a behaviour's term after a change that made its features go
    /// from `before` to the behaviour's current ones (nothing when equal).
    pub fn changed(&mut self, before: &[f32; DENSE], b: &Behaviour) {
        let after = dense(b);
        if after != *before {
            self.term(before, &b.owner, -1);
            self.term(&after, &b.owner, 1);
        }
    }

    /// The published interests (rows x [`InterestModel::out_dim`]); empty
    /// before the first behaviour.
    pub fn read(&self) -> Vec<f32> {
        if self.count == 0 {
            return Vec::new();
        }
        self.model.read_out(|i| self.sums[i] as f64 / SCALE)
    }

    /// The model.
    pub fn model(&self) -> &Arc<InterestModel> {
        &self.model
    }

    /// The raw sums (for the changelog).
    pub fn sums(&self) -> &[i64] {
        &self.sums
    }

    /// Behaviours summarised.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::sequence::{Act, Bounds, Domain, Fold, Source, Step};

    fn model() -> Arc<InterestModel> {
        Arc::new(InterestModel::load(std::path::Path::new("models/interests")).expect("model"))
    }

    fn play(t: i64, video: &str, author: &str, watch: u32) -> Act {
        Act {
            time_ms: t,
            source: Source {
                stream: 1,
                partition: 0,
                offset: t,
            },
            domain: Domain::ShortVideo,
            item: Arc::from(video),
            owner: Arc::from(author),
            step: Step::Play,
            watch_ms: watch,
            duration_ms: 20_000,
            gift_value: 0,
            highlight: None,
            content: None,
        }
    }

    #[test]
    fn a_change_replaces_the_term_exactly() {
        let m = model();
        let mut fold = Fold::with_interests(Some(m.clone()));
        let bounds = Bounds::default();
        fold.apply(&play(1_000, "v1", "a1", 5_000), &bounds);
        fold.apply(&play(2_000, "v2", "a2", 20_000), &bounds);
        let mut like = play(3_000, "v1", "a1", 0);
        like.step = Step::Feedback(crate::state::sequence::Feedback::Like);
        fold.apply(&like, &bounds);
        let mut scratch = Interests::new(m);
        for b in fold.behaviours() {
            scratch.add(b);
        }
        assert_eq!(fold.interests(), Some(&scratch));
        assert_eq!(
            scratch.read().len(),
            scratch.model().interests() * scratch.model().out_dim()
        );
    }
}
