//! Benchmark (the `torch` feature): how many rooms one device serves per
//! encoder at a p95 latency budget, through the libtorch backend and the
//! engine's cross-room batcher. `benches/gpu.sh` runs it on a GPU machine;
//! on a CPU-only machine it measures the CPU (small loads, same method).
//!
//! Method, per model: R rooms send requests at a steady rate each (image:
//! `ONAIR_GPU_FPS` sampled frames per second per room, default 1, what
//! highlight detection samples; text: `ONAIR_GPU_CPS` comments per second
//! per room, default 5), spread evenly in time, for `ONAIR_GPU_SECS` seconds
//! (default 10) after a warm-up. The p95 of submit-to-result latency is
//! compared with the budget (`ONAIR_GPU_BUDGET_MS`, default 250). R doubles
//! from `ONAIR_GPU_START_ROOMS` until the budget breaks (or the offered load
//! is not kept up with), then a bisection between the last good and first
//! bad R finds the largest R that holds it. Batches: up to
//! `ONAIR_GPU_MAX_BATCH` (default 64) with a 5 ms delay, one worker.
//!
//! Run: `cargo bench --features torch --bench gpu` (LIBTORCH set; see
//! benches/gpu.sh). Not for: ONNX Runtime's CUDA provider (the `cuda`
//! feature; not measured here).

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onair::models::batcher::{BatchConfig, BatchModel, Batcher, ReplyTo};
use onair::models::serving::ModelSlot;
use onair::models::torch::{device, TorchImageEncoder, TorchTextEncoder};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Offers `rooms` x `per_room` requests per second for `secs`; returns
/// (p95 seconds, share of the offered requests answered in time).
fn offer<M: BatchModel>(
    b: &Batcher<M>,
    rooms: usize,
    per_room: f64,
    secs: f64,
    make: &dyn Fn(u64) -> M::Input,
) -> (f64, f64) {
    let names: Vec<Arc<str>> = (0..rooms).map(|i| format!("room-{i}").into()).collect();
    let (tx, rx) = channel();
    let reply = ReplyTo { tx, wake: None };
    let interval = 1.0 / (rooms as f64 * per_room);
    let total = ((secs / interval) as u64).max(1);
    let warm = total / 5;
    let start = Instant::now();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut lat = Vec::new();
    let mut refused = 0u64;
    for id in 0..total {
        let due = start + Duration::from_secs_f64(id as f64 * interval);
        // Collect results while waiting for the next send time.
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            if let Ok(d) = rx.recv_timeout(due - now) {
                if let Some(t) = sent.remove(&d.id) {
                    if d.id >= warm {
                        lat.push(t.elapsed().as_secs_f64());
                    }
                }
            }
        }
        sent.insert(id, Instant::now());
        if b.submit(&names[id as usize % rooms], id, make(id), &reply)
            .is_err()
        {
            sent.remove(&id);
            refused += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sent.is_empty() && Instant::now() < deadline {
        if let Ok(d) = rx.recv_timeout(Duration::from_millis(100)) {
            if let Some(t) = sent.remove(&d.id) {
                if d.id >= warm {
                    lat.push(t.elapsed().as_secs_f64());
                }
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let p95 = lat
        .get((lat.len() * 95 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::INFINITY);
    let measured = (total - warm) as f64;
    let answered = lat.len() as f64 / measured.max(1.0);
    let _ = refused;
    (p95, answered)
}

/// The largest room count whose p95 stays under `budget`.
fn rooms_per_device<M: BatchModel>(
    name: &str,
    b: &Batcher<M>,
    per_room: f64,
    make: &dyn Fn(u64) -> M::Input,
) -> usize {
    let budget = env("ONAIR_GPU_BUDGET_MS", 250.0) / 1000.0;
    let secs = env("ONAIR_GPU_SECS", 10.0);
    let ok = |rooms: usize| {
        let (p95, answered) = offer(b, rooms, per_room, secs, make);
        let good = p95 <= budget && answered >= 0.99;
        println!(
            "  {name}: {rooms:>6} rooms ({:>8.1} req/s): p95 {:8.1} ms, answered {:5.1}% -> {}",
            rooms as f64 * per_room,
            p95 * 1000.0,
            answered * 100.0,
            if good { "ok" } else { "over" }
        );
        good
    };
    let mut lo = 0;
    let mut hi = env("ONAIR_GPU_START_ROOMS", 4usize);
    while ok(hi) {
        lo = hi;
        hi *= 2;
        if hi > 1 << 20 {
            return lo;
        }
    }
    // lo holds, hi does not: bisect to about 5%.
    while hi - lo > (lo / 20).max(1) {
        let mid = (lo + hi) / 2;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gpu: skipped (run it with `cargo bench --features torch --bench gpu`)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let threads = env("ONAIR_GPU_THREADS", 4usize);
    let max_batch = env("ONAIR_GPU_MAX_BATCH", 64usize);
    println!(
        "device: {:?}; batches up to {max_batch}; p95 budget {} ms",
        device(),
        env("ONAIR_GPU_BUDGET_MS", 250.0)
    );
    let cfg = BatchConfig {
        max_batch,
        max_delay: Duration::from_millis(5),
        capacity: 1 << 16,
        workers: 1,
    };
    let image = Batcher::start(
        ModelSlot::<TorchImageEncoder>::open(&root.join("image"), 1, threads)
            .expect("image model.pt (scripts/torch)"),
        cfg.clone(),
    );
    let frame: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| ((i % 251) as f32 / 251.0 - 0.45) / 0.226)
        .collect();
    let fps = env("ONAIR_GPU_FPS", 1.0);
    let r_image = rooms_per_device("image", &image, fps, &|_| frame.clone());
    drop(image);
    let text = Batcher::start(
        ModelSlot::<TorchTextEncoder>::open(&root.join("text"), 1, threads)
            .expect("text model.pt (scripts/torch)"),
        cfg,
    );
    let comments = [
        "What a great play, that was amazing!",
        "这一波操作太秀了",
        "主播唱得真好听 love it",
        "gg",
        "can you play the song from yesterday again please",
    ];
    let cps = env("ONAIR_GPU_CPS", 5.0);
    let r_text = rooms_per_device("text", &text, cps, &|id| {
        comments[id as usize % comments.len()].to_string()
    });
    println!(
        "rooms per device at the p95 budget: image {r_image} (at {fps} frames/s per room), text {r_text} (at {cps} comments/s per room)"
    );
}
