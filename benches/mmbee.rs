//! Benchmark: what MMBee adds to serving a viewer — the latency of scoring one
//! (viewer, room) pair, p50 and p99, at batch sizes 1, 32 and 256 on the CPU — and
//! the content fusion it amortises (MFQ, once per room and segment).
//!
//! Per batch of B pairs, two parts are timed: assembling the ranker's inputs as the
//! engine does (`PairFeatures::build`: graph-table lookups for the streamer, the
//! viewer, 32 history gifts and 16 expanded streamers) and running the ranker.
//! Printed per batch size: p50 and p99 of the batch's wall time and of the same
//! divided by B (per viewer), and assembly / total. MFQ is timed alone at batch 1
//! and 32 (rooms), for the ratio of a room's fusion to a viewer's score.
//!
//! Inputs: the model version under `ONAIR_MMBEE_MODEL` (default `models/mmbee`,
//! its highest version), graph tables built here from a generated gifting graph of
//! 50,000 users and 2,000 streamers with that model's graph width, random content
//! rows. Latency does not depend on the weights. One ONNX Runtime thread (per core).
//! `ONAIR_BENCH_ROUNDS` (default 200) batches per size.
//! Run: `cargo bench --bench mmbee` (after `scripts/models`).
//! Not for: accuracy (models/mmbee/README.md) or throughput under load.

use std::sync::Arc;
use std::time::Instant;

use onair::graph::{swing, GiftGraph, GraphTables, SwingParams};
use onair::models::mmbee::{ContentInput, Gift, MmbeeModel, PairFeatures, SessionRow};
use onair::operators::mmbee_content::CONTENT_WIDTH;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs benches without --bench: nothing to check.
    }
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (scripts/models)");
    let root = std::env::var("ONAIR_MMBEE_MODEL").unwrap_or_else(|_| "models/mmbee".into());
    let dir = onair::models::serving::latest_version(std::path::Path::new(&root))
        .expect("a numbered MMBee version (models/mmbee/N)");
    let mut model = MmbeeModel::load(&dir, 1).expect("MMBee model");
    let spec = model.spec().clone();
    let rounds = env_usize("ONAIR_BENCH_ROUNDS", 200);

    // A gifting graph and its tables, with random embeddings of the model's width.
    let mut rng = Rng(7);
    let mut g = GiftGraph::new();
    for u in 0..50_000u64 {
        for _ in 0..1 + rng.next() % 6 {
            let s = (rng.next() % 2_000) as u32;
            g.add_gift(
                &format!("user-{u}"),
                &format!("streamer-{s}"),
                1 + rng.next() % 100,
                0,
            );
        }
    }
    let similar = swing(&g, &SwingParams::default());
    let dim = spec.dims.graph;
    let emb: Vec<f32> = (0..(g.users() + g.streamers()) * dim)
        .map(|_| (rng.next() % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let tables = GraphTables::build(
        &g,
        &similar,
        emb,
        dim,
        &onair::graph::tables::ListParams::default(),
        serde_json::json!({}),
    )
    .expect("tables");

    let content = |rng: &mut Rng| ContentInput {
        row: (0..CONTENT_WIDTH)
            .map(|_| (rng.next() % 1000) as f32 / 1000.0)
            .collect::<Vec<f32>>()
            .into(),
        frames: 3,
        comment_tokens: 8,
        transcript_tokens: 2,
        streamer_id: Arc::from("streamer-1"),
    };
    // MFQ per room.
    for b in [1usize, 32] {
        let inputs: Vec<ContentInput> = (0..b).map(|_| content(&mut rng)).collect();
        let refs: Vec<&ContentInput> = inputs.iter().collect();
        model.content(&refs).expect("warm-up");
        let mut t = Vec::new();
        for _ in 0..rounds.min(100) {
            let s = Instant::now();
            model.content(&refs).expect("mfq");
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let p50 = pct(&mut t, 0.5);
        println!(
            "MFQ   batch {b:>3} rooms: p50 {p50:7.3} ms/batch, {:7.3} ms/room",
            p50 / b as f64
        );
    }
    let tokens = model.content(&[&content(&mut rng)]).expect("mfq")[0].clone();

    let t_ms = 1_000_000_000i64;
    let session = SessionRow {
        present_ms: 60_000.0,
        likes: 3.0,
        comments: 1.0,
        ..SessionRow::default()
    };
    for b in [1usize, 32, 256] {
        let (mut total, mut build_share) = (Vec::new(), Vec::new());
        for round in 0..rounds + 5 {
            let users: Vec<(String, String, Vec<Gift>)> = (0..b)
                .map(|_| {
                    let u = format!("user-{}", rng.next() % 50_000);
                    let s = format!("streamer-{}", rng.next() % 2_000);
                    let hist = (0..32)
                        .map(|i| Gift {
                            streamer_id: Arc::from(format!("streamer-{}", rng.next() % 2_000)),
                            t_ms: t_ms - 1_000 * (i + 1),
                            value: 1 + rng.next() % 100,
                        })
                        .collect();
                    (u, s, hist)
                })
                .collect();
            let s0 = Instant::now();
            let pairs: Vec<PairFeatures> = users
                .iter()
                .map(|(u, s, h)| {
                    PairFeatures::build(
                        &spec,
                        Some(&tables),
                        tokens.clone(),
                        s,
                        u,
                        h,
                        &session,
                        t_ms,
                    )
                })
                .collect();
            let built = s0.elapsed().as_secs_f64();
            let refs: Vec<&PairFeatures> = pairs.iter().collect();
            let p = model.rank(&refs).expect("rank");
            assert_eq!(p.len(), b);
            let all = s0.elapsed().as_secs_f64();
            if round >= 5 {
                total.push(all * 1e3);
                build_share.push(built / all);
            }
        }
        let (p50, p99) = (pct(&mut total, 0.5), pct(&mut total, 0.99));
        println!(
            "score batch {b:>3} pairs: p50 {p50:7.3} ms/batch ({:6.3} ms/viewer), p99 {p99:7.3} ms/batch ({:6.3} ms/viewer); input assembly {:.0} % of it",
            p50 / b as f64,
            p99 / b as f64,
            100.0 * pct(&mut build_share, 0.5)
        );
    }
}
