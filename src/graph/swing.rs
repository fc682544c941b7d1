//! Swing similarity between streamers, from the gifting graph.
//!
//! Two streamers are similar when pairs of users gift to both, and a pair counts for
//! more when those two users have little else in common (a pair that co-gifts to
//! everything says little about any two streamers):
//!
//! ```text
//! sim(i, j) = Σ_{u < v, both gifting to i and j} w_u w_v / (alpha + |I_u ∩ I_v|)
//! w_u = (|I_u| + 5)^-0.35
//! ```
//!
//! where `I_u` is the set of streamers `u` gifted to. Hubs are bounded first: a user
//! keeps its `max_streamers_per_user` heaviest edges and a streamer its
//! `max_users_per_streamer` heaviest gifters (ties by index); the formula is then
//! exact over the edges both kept. The cost is the number of (u, v) pairs sharing a
//! streamer in that bounded graph.
//!
//! Not for: user-user similarity, or graphs whose edges are not gifts.

use foldhash::{HashMap, HashMapExt};

use super::gifts::GiftGraph;

/// Swing's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct SwingParams {
    /// Smoothing in the pair weight's denominator.
    pub alpha: f64,
    /// Edges kept per user (heaviest first).
    pub max_streamers_per_user: usize,
    /// Gifters kept per streamer (heaviest first).
    pub max_users_per_streamer: usize,
    /// Similar streamers kept per streamer.
    pub top_k: usize,
}

impl Default for SwingParams {
    fn default() -> Self {
        SwingParams {
            alpha: 1.0,
            max_streamers_per_user: 100,
            max_users_per_streamer: 300,
            top_k: 32,
        }
    }
}

/// The bounded graph Swing runs on: per user its kept streamers (sorted), per
/// streamer its kept users (sorted).
pub(crate) fn bounded(g: &GiftGraph, p: &SwingParams) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let heaviest = |mut v: Vec<(u32, u64)>, k: usize| -> Vec<u32> {
        if v.len() > k {
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(k);
        }
        let mut ids: Vec<u32> = v.into_iter().map(|(i, _)| i).collect();
        ids.sort_unstable();
        ids
    };
    let user_keep: Vec<Vec<u32>> = (0..g.users() as u32)
        .map(|u| {
            let v = g.user_edges(u).iter().map(|&(s, e)| (s, e.value)).collect();
            heaviest(v, p.max_streamers_per_user)
        })
        .collect();
    let streamer_keep: Vec<Vec<u32>> = (0..g.streamers() as u32)
        .map(|s| {
            let v = g
                .streamer_users(s)
                .iter()
                .filter_map(|&u| g.edge(u, s).map(|e| (u, e.value)))
                .collect();
            heaviest(v, p.max_users_per_streamer)
        })
        .collect();
    // Keep an edge only when both ends kept it.
    let mut by_user = vec![Vec::new(); g.users()];
    let mut by_streamer = vec![Vec::new(); g.streamers()];
    for (s, users) in streamer_keep.iter().enumerate() {
        for &u in users {
            if user_keep[u as usize].binary_search(&(s as u32)).is_ok() {
                by_user[u as usize].push(s as u32);
                by_streamer[s].push(u);
            }
        }
    }
    // Streamers were visited in order, so each user's list is sorted already.
    (by_user, by_streamer)
}

fn intersection(a: &[u32], b: &[u32], out: &mut Vec<u32>) {
    out.clear();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
}

/// Per streamer (by dense index), its `top_k` most similar other streamers with
/// their similarity, most similar first (ties by index). Deterministic: the same
/// graph gives the same lists to the bit.
pub fn swing(g: &GiftGraph, p: &SwingParams) -> Vec<Vec<(u32, f32)>> {
    let (by_user, by_streamer) = bounded(g, p);
    let w: Vec<f64> = by_user
        .iter()
        .map(|l| (l.len() as f64 + 5.0).powf(-0.35))
        .collect();
    let mut sim: HashMap<(u32, u32), f64> = HashMap::new();
    let mut co: HashMap<u32, u32> = HashMap::new();
    let mut partners: Vec<u32> = Vec::new();
    let mut common = Vec::new();
    for (u, items) in by_user.iter().enumerate() {
        if items.len() < 2 {
            continue;
        }
        co.clear();
        for &s in items {
            for &v in &by_streamer[s as usize] {
                if v as usize > u {
                    *co.entry(v).or_insert(0) += 1;
                }
            }
        }
        partners.clear();
        partners.extend(co.iter().filter(|&(_, &c)| c >= 2).map(|(&v, _)| v));
        partners.sort_unstable();
        for &v in &partners {
            intersection(items, &by_user[v as usize], &mut common);
            let score = w[u] * w[v as usize] / (p.alpha + common.len() as f64);
            for (a, &i) in common.iter().enumerate() {
                for &j in &common[a + 1..] {
                    *sim.entry((i, j)).or_insert(0.0) += score;
                }
            }
        }
    }
    let mut out: Vec<Vec<(u32, f32)>> = vec![Vec::new(); g.streamers()];
    let mut pairs: Vec<((u32, u32), f64)> = sim.into_iter().collect();
    pairs.sort_unstable_by_key(|&(k, _)| k);
    for ((i, j), s) in pairs {
        out[i as usize].push((j, s as f32));
        out[j as usize].push((i, s as f32));
    }
    for list in &mut out {
        list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        list.truncate(p.top_k);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, pair by pair, on the bounded graph.
    fn brute(g: &GiftGraph, p: &SwingParams) -> HashMap<(u32, u32), f64> {
        let (by_user, by_streamer) = bounded(g, p);
        let w = |u: u32| (by_user[u as usize].len() as f64 + 5.0).powf(-0.35);
        let mut out = HashMap::new();
        let n = g.streamers() as u32;
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&by_streamer[i as usize], &by_streamer[j as usize]);
                let both: Vec<u32> = a.iter().copied().filter(|u| b.contains(u)).collect();
                let mut s = 0.0;
                for (x, &u) in both.iter().enumerate() {
                    for &v in &both[x + 1..] {
                        let c = by_user[u as usize]
                            .iter()
                            .filter(|k| by_user[v as usize].contains(k))
                            .count();
                        s += w(u) * w(v) / (p.alpha + c as f64);
                    }
                }
                if s > 0.0 {
                    out.insert((i, j), s);
                }
            }
        }
        out
    }

    fn graph(edges: &[(u8, u8, u16)]) -> GiftGraph {
        let mut g = GiftGraph::new();
        for (t, &(u, s, v)) in edges.iter().enumerate() {
            g.add_gift(&format!("u{u}"), &format!("s{s}"), u64::from(v), t as i64);
        }
        g
    }

    proptest! {
        #[test]
        fn swing_equals_its_definition(
            edges in prop::collection::vec((0u8..12, 0u8..7, 1u16..500), 0..80),
            max_s in 1usize..6,
            max_u in 1usize..10,
        ) {
            let g = graph(&edges);
            let p = SwingParams {
                alpha: 1.0,
                max_streamers_per_user: max_s,
                max_users_per_streamer: max_u,
                top_k: 100,
            };
            let fast = swing(&g, &p);
            let slow = brute(&g, &p);
            let mut seen = 0;
            for (i, list) in fast.iter().enumerate() {
                for &(j, s) in list {
                    let key = ((i as u32).min(j), (i as u32).max(j));
                    let want = slow.get(&key).copied().unwrap_or(0.0);
                    prop_assert!((f64::from(s) - want).abs() <= 1e-6 * want.max(1e-3),
                        "({i},{j}): {s} vs {want}");
                    seen += 1;
                }
            }
            prop_assert_eq!(seen, 2 * slow.len());
            // Symmetric, and sorted most similar first.
            for list in &fast {
                prop_assert!(list.windows(2).all(|w| w[0].1 >= w[1].1));
            }
        }
    }

    #[test]
    fn co_gifters_make_streamers_similar() {
        // u0..u3 gift to s0 and s1; only u4 gifts to s1 and s2.
        let mut e = Vec::new();
        for u in 0..4 {
            e.push((u, 0, 10));
            e.push((u, 1, 10));
        }
        e.push((4, 1, 10));
        e.push((4, 2, 10));
        e.push((5, 2, 10));
        let g = graph(&e);
        let sims = swing(&g, &SwingParams::default());
        let s = |a: &str| g.streamer_index(a).unwrap();
        assert_eq!(sims[s("s0") as usize].len(), 1);
        assert_eq!(sims[s("s0") as usize][0].0, s("s1"));
        // s2 shares a single gifter with s1: one user is not a pair.
        assert!(sims[s("s2") as usize].is_empty());
        // 6 pairs of users, each sharing exactly {s0, s1}.
        let want = 6.0 * (7.0f64).powf(-0.7) / 3.0;
        assert!((f64::from(sims[s("s0") as usize][0].1) - want).abs() < 1e-6);
    }
}
