//! Benchmark: the graph job (`onair graph`) on a gifting graph of a million edges —
//! time per phase and peak memory — with the embedding training measured against a
//! reference in the same run.
//!
//! The graph is generated, not simulated (the simulator would take hours to gift a
//! million times): `ONAIR_BENCH_EDGES` (default 1,000,000) distinct user-streamer
//! edges over 10,000 streamers in 20 genres; a user has 1 + Geometric(1/4) edges,
//! 80 % of them in its genre, streamers picked Zipf-like (s^-0.8) within a genre,
//! gift values from the platform's catalogue. Phases, as the job runs them:
//! 1. ingest: reading the gifts as JSON lines (the `--gifts` path) into the graph;
//! 2. Swing with the default bounds;
//! 3. embeddings: GraphCL (`ONAIR_BENCH_STEPS`, default 200, as the job), and the
//!    reference: the same propagation trained with BPR alone (LightGCN), same steps;
//!    printed: seconds per step of each and GraphCL / LightGCN;
//! 4. building and writing the tables.
//!
//! Peak RSS (VmHWM) is read after each phase. Run: `cargo bench --features torch
//! --bench graph` (LIBTORCH set as `scripts/torch` prints).
//! Not for: the quality of the embeddings (the job reports a held-out AUC in
//! graph.json; the MMBee card measures what they add).

use std::io::Write;
use std::time::Instant;

use onair::graph::graphcl::{self, GraphClParams};
use onair::graph::job::{read_gifts_jsonl, GraphJob};
use onair::graph::{swing, GiftGraph, SwingParams};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
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
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Writes about `edges` distinct edges as gift lines; returns the gift count.
fn generate(path: &std::path::Path, edges: usize) -> u64 {
    const STREAMERS: usize = 10_000;
    const GENRES: usize = 20;
    const GIFTS: [u64; 7] = [1, 5, 10, 52, 100, 520, 1314];
    let per_genre = STREAMERS / GENRES;
    // Zipf-like cumulative weights within a genre.
    let cum: Vec<f64> = (1..=per_genre)
        .scan(0.0, |acc, k| {
            *acc += (k as f64).powf(-0.8);
            Some(*acc)
        })
        .collect();
    let total = cum[cum.len() - 1];
    let mut rng = Rng(42);
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).expect("create gifts"));
    let (mut made, mut gifts, mut user) = (0usize, 0u64, 0u64);
    let mut mine = Vec::new();
    while made < edges {
        let genre = (rng.next() % GENRES as u64) as usize;
        let mut k = 1;
        while rng.f64() < 0.75 && k < 40 {
            k += 1;
        }
        mine.clear();
        for _ in 0..k {
            let g = if rng.f64() < 0.8 {
                genre
            } else {
                (rng.next() % GENRES as u64) as usize
            };
            let x = rng.f64() * total;
            let rank = cum.partition_point(|&c| c < x).min(per_genre - 1);
            let s = g * per_genre + rank;
            if mine.contains(&s) {
                continue;
            }
            mine.push(s);
            made += 1;
            let n = 1 + (rng.next() % 3);
            for _ in 0..n {
                let v = GIFTS[((rng.f64().powi(3)) * GIFTS.len() as f64) as usize % GIFTS.len()];
                writeln!(
                    w,
                    "{{\"user_id\":\"user-{user:07}\",\"streamer_id\":\"streamer-{s:05}\",\"t_ms\":{},\"value\":{v}}}",
                    1_767_225_600_000u64 + gifts
                )
                .expect("write");
                gifts += 1;
            }
        }
        user += 1;
    }
    w.flush().expect("flush");
    gifts
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs benches without --bench: nothing to check.
    }
    let edges = env_usize("ONAIR_BENCH_EDGES", 1_000_000);
    let steps = env_usize("ONAIR_BENCH_STEPS", 200);
    let dir = std::env::temp_dir().join(format!("onair-graph-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("gifts.jsonl");
    let t = Instant::now();
    let gifts = generate(&path, edges);
    println!(
        "generated {gifts} gifts ({:.0} MiB of JSON lines) in {:.1} s",
        std::fs::metadata(&path).map_or(0.0, |m| m.len() as f64 / 1048576.0),
        t.elapsed().as_secs_f64()
    );
    let base_rss = peak_rss_mib();

    let t = Instant::now();
    let mut g = GiftGraph::new();
    read_gifts_jsonl(&mut g, &path, i64::MIN).expect("ingest");
    let ingest = t.elapsed().as_secs_f64();
    println!(
        "ingest:     {ingest:7.2} s  {:.2} M gifts/s  users {} streamers {} edges {}  graph {:.0} MiB  peak RSS {:.0} MiB",
        gifts as f64 / ingest / 1e6,
        g.users(),
        g.streamers(),
        g.edges(),
        g.bytes() as f64 / 1048576.0,
        peak_rss_mib()
    );

    let t = Instant::now();
    let sp = SwingParams::default();
    let similar = swing(&g, &sp);
    let swing_s = t.elapsed().as_secs_f64();
    println!(
        "swing:      {swing_s:7.2} s  {} similar pairs kept  peak RSS {:.0} MiB",
        similar.iter().map(Vec::len).sum::<usize>() / 2,
        peak_rss_mib()
    );

    let p = GraphClParams {
        steps,
        ..GraphClParams::default()
    };
    let (emb, report) = graphcl::train(&g, &similar, &p).expect("graphcl");
    println!(
        "graphcl:    {:7.2} s  {:.3} s/step  held-out AUC {:.3} (popularity {:.3})  peak RSS {:.0} MiB",
        report.seconds,
        report.seconds / steps as f64,
        report.holdout_auc,
        report.popularity_auc,
        peak_rss_mib()
    );
    let reference = GraphClParams {
        cl_weight: 0.0,
        ..p.clone()
    };
    let (_, plain) = graphcl::train(&g, &similar, &reference).expect("lightgcn");
    println!(
        "lightgcn:   {:7.2} s  {:.3} s/step  held-out AUC {:.3}  (reference: BPR only, same propagation)",
        plain.seconds,
        plain.seconds / steps as f64,
        plain.holdout_auc
    );
    println!(
        "graphcl / lightgcn time per step: {:.2}x",
        report.seconds / plain.seconds
    );

    let t = Instant::now();
    let mut job = GraphJob::new(dir.join("tables"));
    job.graphcl = p;
    let mut tables = onair::graph::GraphTables::build(
        &g,
        &similar,
        emb,
        job.graphcl.dim,
        &job.lists,
        serde_json::json!({}),
    )
    .expect("tables");
    let out = tables.write_next(&job.out, &g).expect("write");
    let write_s = t.elapsed().as_secs_f64();
    let size: u64 = std::fs::read_dir(&out)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "tables:     {write_s:7.2} s  {:.0} MiB on disk, {:.0} MiB in memory  peak RSS {:.0} MiB",
        size as f64 / 1048576.0,
        tables.bytes() as f64 / 1048576.0,
        peak_rss_mib()
    );
    println!(
        "job total (ingest + swing + graphcl + tables): {:.1} s; peak RSS {:.0} MiB (generator alone {:.0} MiB)",
        ingest + swing_s + report.seconds + write_s,
        peak_rss_mib(),
        base_rss
    );
    let _ = std::fs::remove_dir_all(&dir);
}
