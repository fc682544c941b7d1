//! Node embeddings for the gifting graph, learned with graph contrastive learning
//! on libtorch (the `torch` feature; the GPU when libtorch sees one, else the CPU).
//!
//! The graph has a node per user and per streamer, an edge per gifting pair
//! (weight `ln(1 + value)`) and an edge per Swing-similar streamer pair (weight the
//! similarity, rescaled so that both edge families carry the same total weight).
//! The encoder propagates a learned embedding table over the symmetrically
//! normalised adjacency for `layers` hops and averages the hops (LightGCN's
//! propagation: no weights or non-linearity between hops, which is what lets one
//! table serve graphs of a million edges on a CPU).
//!
//! Training, per step, as in GraphCL applied to recommendation graphs (SGL):
//! - two views of the graph by edge dropout (each edge kept with probability
//!   `1 - edge_drop`, normalisation recomputed per view) are encoded, and the
//!   InfoNCE loss (temperature `temperature`) pulls the two views of each node in a
//!   sampled batch together and pushes the other nodes of the batch away;
//! - a BPR loss on the full graph ranks a gifting pair above the same user with a
//!   random streamer, so the embeddings keep the gifting signal GIE relies on.
//!
//! `holdout` of the gifting edges are kept out of the graph and of the loss and
//! scored at the end (AUC against random streamers of the same user, and the same
//! for a streamer-popularity baseline), so every build reports how well its
//! embeddings predict gifts they did not see.
//!
//! Not for: Swing or the neighbour lists ([`super::swing`], [`super::tables`]), or
//! serving (the tables carry the embeddings).

use std::time::Instant;

use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use super::gifts::GiftGraph;

/// Training knobs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GraphClParams {
    /// Embedding width.
    pub dim: usize,
    /// Propagation hops.
    pub layers: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Edge dropout of each contrastive view.
    pub edge_drop: f64,
    /// InfoNCE temperature.
    pub temperature: f64,
    /// Nodes per contrastive batch, and gifting pairs per BPR batch.
    pub batch: usize,
    /// Weight of the contrastive loss against BPR.
    pub cl_weight: f64,
    /// L2 weight on the batch's base embeddings.
    pub l2: f64,
    /// Share of gifting edges held out for evaluation.
    pub holdout: f64,
    /// Random seed.
    pub seed: i64,
    /// libtorch intra-op threads (0: libtorch's default, one per core). Set 1 on a
    /// machine busy with other work: spinning thread pools slow each other badly.
    pub threads: usize,
}

impl Default for GraphClParams {
    fn default() -> Self {
        GraphClParams {
            dim: 32,
            layers: 2,
            steps: 200,
            lr: 0.01,
            edge_drop: 0.2,
            temperature: 0.2,
            batch: 1024,
            cl_weight: 0.1,
            l2: 1e-4,
            holdout: 0.05,
            seed: 1,
            threads: 0,
        }
    }
}

/// What a training run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GraphClReport {
    /// Steps run.
    pub steps: usize,
    /// Mean losses over the last 10 % of the steps.
    pub bpr_loss: f64,
    /// See `bpr_loss`.
    pub cl_loss: f64,
    /// Held-out gifting edges scored.
    pub holdout_edges: usize,
    /// AUC of the held-out edges against random streamers, by embedding dot product.
    pub holdout_auc: f64,
    /// The same AUC when streamers are ranked by their number of gifters.
    pub popularity_auc: f64,
    /// Wall seconds.
    pub seconds: f64,
    /// "cpu" or "cuda".
    pub device: String,
}

/// Why training failed (ours: the inputs are built here).
#[derive(Debug, thiserror::Error)]
pub enum GraphClError {
    /// The graph has no gifting edges to learn from.
    #[error("the gifting graph is empty")]
    Empty,
    /// libtorch failed.
    #[error("graph training failed in libtorch: {0}")]
    Torch(String),
}

/// A directed edge list with weights (both directions of every undirected edge).
struct Edges {
    src: Vec<i64>,
    dst: Vec<i64>,
    w: Vec<f32>,
}

impl Edges {
    fn push(&mut self, a: i64, b: i64, w: f32) {
        self.src.extend([a, b]);
        self.dst.extend([b, a]);
        self.w.extend([w, w]);
    }
}

/// Propagation operator: (src, dst, normalised weight) tensors.
struct Adjacency {
    src: Tensor,
    dst: Tensor,
    /// Per directed edge, the index of its undirected edge.
    pair: Tensor,
    /// The normalised adjacency as a sparse `[n, n]` matrix (row = destination):
    /// a hop is one sparse-dense product, without materialising a message per
    /// edge (which took 2.3 GB and 12 s a step at a million edges).
    mat: Tensor,
}

impl Adjacency {
    /// From directed edges sorted by (dst, src), without duplicates.
    fn new(src: Tensor, dst: Tensor, w: Tensor, pair: Tensor, n: i64) -> Self {
        // bincount, not a 1-D index_add: libtorch's CPU index_add walks a 1-D
        // index one element at a time.
        let deg = dst.bincount(Some(&w), n).to_kind(Kind::Float);
        let inv = (deg + 1e-9).rsqrt();
        let norm = &w * inv.index_select(0, &src) * inv.index_select(0, &dst);
        let indices = Tensor::stack(&[&dst, &src], 0);
        let mat = Tensor::sparse_coo_tensor_indices_size(
            &indices,
            &norm,
            [n, n],
            (Kind::Float, norm.device()),
            true,
        );
        Adjacency {
            src,
            dst,
            pair,
            mat,
        }
    }

    /// A view with each undirected edge kept with probability `keep` (both of
    /// its directions or neither).
    fn dropped(&self, w: &Tensor, keep: f64, n: i64, device: Device) -> Self {
        let m = self.src.size()[0] / 2;
        let mask = Tensor::rand([m], (Kind::Float, device))
            .lt(keep)
            .index_select(0, &self.pair);
        Adjacency::new(
            self.src.masked_select(&mask),
            self.dst.masked_select(&mask),
            w.masked_select(&mask),
            self.pair.masked_select(&mask),
            n,
        )
    }

    fn propagate(&self, base: &Tensor, layers: usize) -> Tensor {
        // Not in place: `base` is the trained leaf.
        let mut hops = vec![base.shallow_clone()];
        for _ in 0..layers {
            let next = self.mat.mm(&hops[hops.len() - 1]);
            hops.push(next);
        }
        Tensor::stack(&hops, 0).mean_dim(0, false, Kind::Float)
    }
}

/// Learns embeddings for every node of `graph`: rows `[users + streamers, dim]`,
/// users first, both in the graph's index order. `similar` is Swing's output.
pub fn train(
    graph: &GiftGraph,
    similar: &[Vec<(u32, f32)>],
    p: &GraphClParams,
) -> Result<(Vec<f32>, GraphClReport), GraphClError> {
    if graph.edges() == 0 {
        return Err(GraphClError::Empty);
    }
    // libtorch reports misuse by panicking through tch's non-`f_` calls; the inputs
    // are all built here, so a panic is our bug: report it instead of aborting.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_inner(graph, similar, p)
    }))
    .map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        GraphClError::Torch(msg)
    })
}

fn train_inner(
    graph: &GiftGraph,
    similar: &[Vec<(u32, f32)>],
    p: &GraphClParams,
) -> (Vec<f32>, GraphClReport) {
    let t0 = Instant::now();
    tch::manual_seed(p.seed);
    if p.threads > 0 {
        tch::set_num_threads(p.threads as i32);
    }
    let device = Device::cuda_if_available();
    let (nu, ns) = (graph.users() as i64, graph.streamers() as i64);
    let n = nu + ns;

    // Hold out edges by a hash of the pair, so the split does not depend on order.
    let mut train_pairs: Vec<(i64, i64)> = Vec::new();
    let mut held: Vec<(i64, i64)> = Vec::new();
    let mut edges = Edges {
        src: Vec::new(),
        dst: Vec::new(),
        w: Vec::new(),
    };
    let cut = (p.holdout.clamp(0.0, 0.5) * u64::MAX as f64) as u64;
    for (u, s, e) in graph.iter_edges() {
        let h = splitmix(p.seed as u64 ^ (u64::from(u) << 32 | u64::from(s)));
        let pair = (i64::from(u), nu + i64::from(s));
        // Users with a single edge keep it: holding it out would leave them unseen.
        if h < cut && graph.user_edges(u).len() > 1 {
            held.push(pair);
        } else {
            train_pairs.push(pair);
            edges.push(pair.0, pair.1, e.weight());
        }
    }
    let gift_weight: f32 = edges.w.iter().sum::<f32>() / 2.0;
    let mut sim_edges = Vec::new();
    for (i, list) in similar.iter().enumerate() {
        for &(j, w) in list {
            if (i as u32) < j {
                sim_edges.push((nu + i as i64, nu + i64::from(j), w));
            }
        }
    }
    let sim_total: f32 = sim_edges.iter().map(|e| e.2).sum();
    let scale = if sim_total > 0.0 {
        gift_weight / sim_total
    } else {
        0.0
    };
    for (a, b, w) in sim_edges {
        edges.push(a, b, w * scale);
    }

    // Directed edges sorted by (destination, source), each with the index of its
    // undirected edge: any subset keeps the order of a coalesced sparse matrix,
    // so views need no sort.
    let mut order: Vec<usize> = (0..edges.src.len()).collect();
    order.sort_unstable_by_key(|&i| (edges.dst[i], edges.src[i]));
    let pick = |v: &[i64]| -> Vec<i64> { order.iter().map(|&i| v[i]).collect() };
    let undirected: Vec<i64> = order.iter().map(|&i| (i / 2) as i64).collect();
    let src = Tensor::from_slice(&pick(&edges.src)).to(device);
    let dst = Tensor::from_slice(&pick(&edges.dst)).to(device);
    let wv: Vec<f32> = order.iter().map(|&i| edges.w[i]).collect();
    let w = Tensor::from_slice(&wv).to(device);
    let full = Adjacency::new(
        src.shallow_clone(),
        dst.shallow_clone(),
        w.shallow_clone(),
        Tensor::from_slice(&undirected).to(device),
        n,
    );

    let vs = nn::VarStore::new(device);
    let base = vs.root().var(
        "embeddings",
        &[n, p.dim as i64],
        nn::Init::Randn {
            mean: 0.0,
            stdev: 0.1,
        },
    );
    let mut opt = match nn::Adam::default().build(&vs, p.lr) {
        Ok(o) => o,
        Err(e) => panic!("optimiser: {e}"),
    };
    let pairs_u: Vec<i64> = train_pairs.iter().map(|x| x.0).collect();
    let pairs_s: Vec<i64> = train_pairs.iter().map(|x| x.1).collect();
    let pairs_u = Tensor::from_slice(&pairs_u).to(device);
    let pairs_s = Tensor::from_slice(&pairs_s).to(device);
    let npairs = train_pairs.len() as i64;
    let b = p.batch.max(2) as i64;
    let tail = (p.steps / 10).max(1);
    let (mut bpr_sum, mut cl_sum) = (0.0, 0.0);
    for step in 0..p.steps {
        let h = full.propagate(&base, p.layers);
        let pick = Tensor::randint(npairs, [b], (Kind::Int64, device));
        let u = pairs_u.index_select(0, &pick);
        let pos = pairs_s.index_select(0, &pick);
        let neg = Tensor::randint(ns, [b], (Kind::Int64, device)) + nu;
        let hu = h.index_select(0, &u);
        let sp = (&hu * h.index_select(0, &pos)).sum_dim_intlist(1, false, Kind::Float);
        let sn = (&hu * h.index_select(0, &neg)).sum_dim_intlist(1, false, Kind::Float);
        let bpr = -(sp - sn).log_sigmoid().mean(Kind::Float);
        let reg = (base.index_select(0, &u).square().sum(Kind::Float)
            + base.index_select(0, &pos).square().sum(Kind::Float)
            + base.index_select(0, &neg).square().sum(Kind::Float))
            / b as f64;

        let mut loss = &bpr + p.l2 * reg;
        // cl_weight 0 is plain LightGCN with BPR (the benchmark's reference).
        if p.cl_weight > 0.0 {
            let view = || {
                full.dropped(&w, 1.0 - p.edge_drop, n, device)
                    .propagate(&base, p.layers)
            };
            let (v1, v2) = (view(), view());
            let nodes = Tensor::randint(n, [b.min(n)], (Kind::Int64, device));
            let z1 = normalize(&v1.index_select(0, &nodes));
            let z2 = normalize(&v2.index_select(0, &nodes));
            let logits = z1.matmul(&z2.tr()) / p.temperature;
            let targets = Tensor::arange(nodes.size()[0], (Kind::Int64, device));
            let cl = logits.cross_entropy_for_logits(&targets);
            if step + tail >= p.steps {
                cl_sum += cl.double_value(&[]);
            }
            loss += p.cl_weight * cl;
        }
        opt.backward_step(&loss);
        if step + tail >= p.steps {
            bpr_sum += bpr.double_value(&[]);
        }
    }

    let out = tch::no_grad(|| full.propagate(&base, p.layers)).to(Device::Cpu);
    let flat = out.flatten(0, -1).to_kind(Kind::Float);
    let embeddings = match Vec::<f32>::try_from(&flat) {
        Ok(v) => v,
        Err(e) => panic!("copying embeddings out: {e}"),
    };
    let (holdout_auc, popularity_auc) = holdout_aucs(graph, &embeddings, p.dim, &held, p.seed);
    let report = GraphClReport {
        steps: p.steps,
        bpr_loss: bpr_sum / tail as f64,
        cl_loss: cl_sum / tail as f64,
        holdout_edges: held.len(),
        holdout_auc,
        popularity_auc,
        seconds: t0.elapsed().as_secs_f64(),
        device: if device == Device::Cpu { "cpu" } else { "cuda" }.into(),
    };
    (embeddings, report)
}

fn normalize(x: &Tensor) -> Tensor {
    let norm = x.square().sum_dim_intlist(1, true, Kind::Float).sqrt() + 1e-8;
    x / norm
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// AUC of held-out (user, streamer) pairs against one random streamer the user
/// never gifted to, by embedding dot product and by streamer popularity (number of
/// gifters; ties count half).
fn holdout_aucs(
    graph: &GiftGraph,
    emb: &[f32],
    dim: usize,
    held: &[(i64, i64)],
    seed: i64,
) -> (f64, f64) {
    let nu = graph.users() as i64;
    let ns = graph.streamers() as u64;
    if held.is_empty() || ns < 2 {
        return (f64::NAN, f64::NAN);
    }
    let dot = |a: i64, b: i64| -> f32 {
        let (a, b) = (a as usize * dim, b as usize * dim);
        emb[a..a + dim]
            .iter()
            .zip(&emb[b..b + dim])
            .map(|(x, y)| x * y)
            .sum()
    };
    let pop = |s: i64| graph.streamer_users((s - nu) as u32).len() as f64;
    let (mut auc, mut auc_pop, mut count) = (0.0, 0.0, 0usize);
    let mut state = seed as u64;
    for &(u, s) in held {
        // A negative: a streamer this user has no edge to (a few tries).
        let mut neg = None;
        for _ in 0..16 {
            state = splitmix(state);
            let c = (state % ns) as u32;
            if graph.edge(u as u32, c).is_none() {
                neg = Some(nu + i64::from(c));
                break;
            }
        }
        let Some(neg) = neg else { continue };
        let half = |a: f64, b: f64| {
            if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            }
        };
        auc += half(f64::from(dot(u, s)), f64::from(dot(u, neg)));
        // The held-out user is among s's gifters in the full graph: not counted.
        auc_pop += half(pop(s) - 1.0, pop(neg));
        count += 1;
    }
    if count == 0 {
        return (f64::NAN, f64::NAN);
    }
    (auc / count as f64, auc_pop / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::swing::{swing, SwingParams};

    /// Two communities of users and streamers: embeddings learned on part of the
    /// edges must rank the held-out edges (within a community) above random pairs.
    #[test]
    fn embeddings_predict_held_out_gifts() {
        let mut g = GiftGraph::new();
        let mut state = 7u64;
        for u in 0..300u32 {
            let community = u % 3;
            for _ in 0..6 {
                state = splitmix(state);
                let s = community * 10 + (state % 10) as u32;
                g.add_gift(&format!("u{u}"), &format!("s{s}"), 1 + state % 50, 0);
            }
        }
        let sims = swing(&g, &SwingParams::default());
        let p = GraphClParams {
            steps: 60,
            holdout: 0.15,
            batch: 256,
            ..GraphClParams::default()
        };
        let (emb, report) = train(&g, &sims, &p).unwrap();
        assert_eq!(emb.len(), (g.users() + g.streamers()) * p.dim);
        assert!(emb.iter().all(|x| x.is_finite()));
        assert!(report.holdout_edges > 50, "{report:?}");
        assert!(report.holdout_auc > 0.85, "{report:?}");
        // Popularity is uninformative here (all streamers are alike).
        assert!(
            report.holdout_auc > report.popularity_auc + 0.2,
            "{report:?}"
        );
    }

    #[test]
    fn empty_graph_is_an_error() {
        let g = GiftGraph::new();
        assert!(matches!(
            train(&g, &[], &GraphClParams::default()),
            Err(GraphClError::Empty)
        ));
    }
}
