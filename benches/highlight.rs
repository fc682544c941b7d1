//! Benchmark: the highlight model as the engine runs it — rooms scored per
//! second per core at the shipped window n, against scoring without the
//! per-tick cache, in the same run; and the memory a room's highlight state
//! takes.
//!
//! 1. Cached step (what the engine does): each room's newest tick with the
//!    states its previous n-1 ticks left, in batches of 1, 16 and 64 rooms,
//!    on one ONNX Runtime thread (per core). Items are room ticks scored.
//! 2. Reference, no cache: the same model recomputing each room's window on
//!    every tick (its n ticks stepped from an empty history, batched across
//!    the same 64 rooms): what scoring costs when nothing is kept between
//!    ticks. Printed: rooms/s and cached/reference.
//! 3. Per-room state: the bytes the operator keeps per room at a full
//!    look-back (states of n-1 ticks, the running sum of feature rows), from
//!    the sizes the model really returns.
//!
//! Medians of `ONAIR_BENCH_ROUNDS` (default 3) rounds of about 2 s.
//! Run: `cargo bench --bench highlight` (after `scripts/models`).
//! Not for: accuracy (the model card, models/highlight/README.md) or the
//! events (tests/highlight_pipeline.rs).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use onair::features::row::ROW_WIDTH;
use onair::models::highlight::{HighlightModel, StepInput, StepState};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `step` (which handles `items` items) for about `secs`; items/s.
fn rate(items: usize, secs: f64, mut step: impl FnMut()) -> f64 {
    step();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed().as_secs_f64() < secs || n < 2 {
        step();
        n += 1;
    }
    (n * items) as f64 / start.elapsed().as_secs_f64()
}

/// A plausible feature row, varying with `seed`.
fn row(seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..ROW_WIDTH)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs benches without --bench: nothing to check.
    }
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/highlight");
    let version = onair::models::serving::latest_version(&dir).expect("a highlight version");
    let mut model = HighlightModel::load(&version, 1).expect("highlight model");
    let n = model.spec().window;
    let rounds = env_usize("ONAIR_BENCH_ROUNDS", 3);
    println!(
        "highlight model {} (window n = {n}), 1 thread",
        version.display()
    );

    // Full histories for 64 rooms, built by the model itself.
    let rooms = 64;
    let rows: Vec<Vec<f32>> = (0..rooms as u64).map(row).collect();
    let mut history: Vec<Vec<Arc<StepState>>> = vec![Vec::new(); rooms];
    for _ in 0..n - 1 {
        let inputs: Vec<StepInput> = (0..rooms)
            .map(|r| StepInput {
                x: rows[r].clone(),
                streamer: rows[r].clone(),
                history: history[r].clone(),
            })
            .collect();
        for (r, o) in model.step(&inputs).expect("step").into_iter().enumerate() {
            history[r].push(o.state);
        }
    }
    let cached_inputs = |b: usize| -> Vec<StepInput> {
        (0..b)
            .map(|r| StepInput {
                x: rows[r].clone(),
                streamer: rows[r].clone(),
                history: history[r].clone(),
            })
            .collect()
    };

    let mut cached64 = 0.0;
    for b in [1, 16, 64] {
        let inputs = cached_inputs(b);
        let r = median(
            (0..rounds)
                .map(|_| rate(b, 2.0, || drop(model.step(&inputs).expect("step"))))
                .collect(),
        );
        println!("cached step, batch {b:>2}: {r:>9.0} rooms/s per core");
        if b == 64 {
            cached64 = r;
        }
    }
    // Reference: each tick recomputes the room's window from scratch.
    let reference = median(
        (0..rounds)
            .map(|_| {
                rate(rooms, 2.0, || {
                    let mut h: Vec<Vec<Arc<StepState>>> = vec![Vec::new(); rooms];
                    for _ in 0..n {
                        let inputs: Vec<StepInput> = (0..rooms)
                            .map(|r| StepInput {
                                x: rows[r].clone(),
                                streamer: rows[r].clone(),
                                history: h[r].clone(),
                            })
                            .collect();
                        for (r, o) in model.step(&inputs).expect("step").into_iter().enumerate() {
                            h[r].push(o.state);
                        }
                    }
                })
            })
            .collect(),
    );
    println!("reference, window recomputed per tick, batch 64: {reference:>9.0} rooms/s per core");
    println!(
        "cached / reference at batch 64: {:.1}x (n = {n})",
        cached64 / reference
    );

    // Per-room state at a full look-back.
    let state = &history[0];
    let states: usize = state
        .iter()
        .map(|s| (s.z.len() + s.e.len() + s.p.len()) * 4 + std::mem::size_of::<StepState>())
        .sum();
    let running_sum = ROW_WIDTH * 8;
    println!(
        "per-room state: {} states x {} floats = {:.1} KiB, running mean {:.1} KiB, total {:.1} KiB (+ kept comments, at most comments_per_tick x (history_ticks + 1) texts)",
        state.len(),
        state[0].z.len() + state[0].e.len() + state[0].p.len(),
        states as f64 / 1024.0,
        running_sum as f64 / 1024.0,
        (states + running_sum) as f64 / 1024.0
    );
}
