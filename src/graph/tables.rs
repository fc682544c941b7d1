//! The graph tables one build of the gifting graph produces, as a numbered version
//! directory that every instance reads in full and hot-swaps like a model
//! ([`GraphSlot`] is a [`ModelSlot`] of tables):
//!
//! ```text
//! graph/3/graph.json       format "onair-graph-v1", version, dim, counts, parameters,
//!                          the build's figures
//! graph/3/nodes.tsv        kind \t id \t degree \t weight   (kind u or s), one per row
//! graph/3/embeddings.f32   [rows, dim] float32 little-endian, rows in nodes.tsv order
//! graph/3/neighbors.jsonl  users:     {"id","kind":"u","gifted":[[streamer, weight]..],
//!                                      "expanded":[[streamer, score]..]}
//!                          streamers: {"id","kind":"s","similar":[[streamer, swing]..],
//!                                      "gifters":[[user, weight]..]}
//! graph/3/edges.tsv        the gifting graph it was built from (the next build's start)
//! ```
//!
//! Users come first, then streamers. `gifted` is the user's heaviest edges (weight
//! `ln(1 + value)`); `expanded` is the metapath user -> streamer -> similar streamer:
//! each streamer the user has not gifted to scores the sum, over the user's `gifted`
//! list, of the edge's share of the list's weight times the Swing similarity.
//!
//! Not for: the live history of a user since the build (user state keeps it), or
//! computing embeddings ([`super::graphcl`]).

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use foldhash::{HashMap, HashMapExt};
use serde::{Deserialize, Serialize};

use super::gifts::GiftGraph;
use crate::models::serving::{ModelSlot, Servable};
use crate::models::ModelError;

/// The format tag in `graph.json`.
pub const FORMAT: &str = "onair-graph-v1";

/// Users or streamers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    /// A viewer who gifted.
    User,
    /// A streamer who received gifts.
    Streamer,
}

impl NodeKind {
    fn tag(self) -> &'static str {
        match self {
            NodeKind::User => "u",
            NodeKind::Streamer => "s",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "u" => Some(NodeKind::User),
            "s" => Some(NodeKind::Streamer),
            _ => None,
        }
    }
}

/// A node's neighbour lists (rows of other nodes, with a weight), best first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Neighbours {
    /// Users: streamers gifted to, by edge weight. Streamers: Swing-similar streamers.
    pub first: Vec<(u32, f32)>,
    /// Users: streamers reached by user -> streamer -> similar streamer. Streamers:
    /// their heaviest gifters.
    pub second: Vec<(u32, f32)>,
}

/// How long the lists are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListParams {
    /// `gifted` per user.
    pub gifted: usize,
    /// `expanded` per user.
    pub expanded: usize,
    /// `similar` per streamer.
    pub similar: usize,
    /// `gifters` per streamer.
    pub gifters: usize,
}

impl Default for ListParams {
    fn default() -> Self {
        ListParams {
            gifted: 32,
            expanded: 16,
            similar: 16,
            gifters: 32,
        }
    }
}

/// Why tables could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// The files could not be read or written (external; retrying may help).
    #[error("graph tables {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not what this module writes (the file's fault).
    #[error("graph tables {path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl crate::error::Classify for TablesError {
    fn fault(&self) -> crate::error::Fault {
        match self {
            TablesError::Io { .. } => crate::error::Fault::External,
            TablesError::Format { .. } => crate::error::Fault::Input,
        }
    }
}

/// One version of the graph tables, in memory.
#[derive(Clone, Debug)]
pub struct GraphTables {
    /// Version number (its directory's name).
    pub version: u64,
    /// Embedding width.
    pub dim: usize,
    /// `graph.json`.
    pub meta: serde_json::Value,
    /// Row by id, users then streamers.
    rows: [HashMap<Box<str>, u32>; 2],
    nodes: Vec<Node>,
    embeddings: Vec<f32>,
}

#[derive(Clone, Debug)]
struct Node {
    kind: NodeKind,
    id: Box<str>,
    degree: u32,
    weight: f32,
    lists: Neighbours,
}

impl GraphTables {
    /// Builds tables from a graph, its Swing lists (per streamer index, see
    /// [`super::swing`]) and node embeddings (`[users + streamers, dim]`, users
    /// first, both in the graph's index order). `meta` is merged into `graph.json`.
    pub fn build(
        graph: &GiftGraph,
        similar: &[Vec<(u32, f32)>],
        embeddings: Vec<f32>,
        dim: usize,
        lists: &ListParams,
        meta: serde_json::Value,
    ) -> Result<Self, TablesError> {
        let (nu, ns) = (graph.users(), graph.streamers());
        let bad = |reason: String| TablesError::Format {
            path: "(build)".into(),
            reason,
        };
        if embeddings.len() != (nu + ns) * dim || similar.len() != ns {
            return Err(bad(format!(
                "{} embedding values and {} similarity lists for {nu} users, {ns} streamers, dim {dim}",
                embeddings.len(),
                similar.len()
            )));
        }
        let srow = |s: u32| nu as u32 + s;
        let mut nodes = Vec::with_capacity(nu + ns);
        for u in 0..nu as u32 {
            let edges = graph.user_edges(u);
            let mut gifted: Vec<(u32, f32)> = edges.iter().map(|&(s, e)| (s, e.weight())).collect();
            sort_best_first(&mut gifted);
            gifted.truncate(lists.gifted);
            let total: f32 = gifted.iter().map(|&(_, w)| w).sum();
            let mut scores: HashMap<u32, f32> = HashMap::new();
            if total > 0.0 {
                for &(s, w) in &gifted {
                    for &(t, sim) in &similar[s as usize] {
                        if graph.edge(u, t).is_none() {
                            *scores.entry(t).or_insert(0.0) += w / total * sim;
                        }
                    }
                }
            }
            let mut expanded: Vec<(u32, f32)> = scores.into_iter().collect();
            sort_best_first(&mut expanded);
            expanded.truncate(lists.expanded);
            nodes.push(Node {
                kind: NodeKind::User,
                id: graph.user_name(u).into(),
                degree: edges.len() as u32,
                weight: edges.iter().map(|(_, e)| e.weight()).sum(),
                lists: Neighbours {
                    first: gifted.into_iter().map(|(s, w)| (srow(s), w)).collect(),
                    second: expanded.into_iter().map(|(s, w)| (srow(s), w)).collect(),
                },
            });
        }
        for s in 0..ns as u32 {
            let users = graph.streamer_users(s);
            let mut gifters: Vec<(u32, f32)> = users
                .iter()
                .filter_map(|&u| graph.edge(u, s).map(|e| (u, e.weight())))
                .collect();
            let weight = gifters.iter().map(|&(_, w)| w).sum();
            sort_best_first(&mut gifters);
            gifters.truncate(lists.gifters);
            let mut sim = similar[s as usize].clone();
            sim.truncate(lists.similar);
            nodes.push(Node {
                kind: NodeKind::Streamer,
                id: graph.streamer_name(s).into(),
                degree: users.len() as u32,
                weight,
                lists: Neighbours {
                    first: sim.into_iter().map(|(t, w)| (srow(t), w)).collect(),
                    second: gifters,
                },
            });
        }
        let mut rows = [HashMap::new(), HashMap::new()];
        for (i, n) in nodes.iter().enumerate() {
            rows[n.kind as usize].insert(n.id.clone(), i as u32);
        }
        let mut m = serde_json::json!({
            "format": FORMAT,
            "version": 0,
            "dim": dim,
            "users": nu,
            "streamers": ns,
            "edges": graph.edges(),
            "gifts": graph.gifts(),
            "events_through_ms": graph.through_ms(),
            "lists": lists,
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (m.as_object_mut(), meta) {
            obj.extend(extra);
        }
        Ok(GraphTables {
            version: 0,
            dim,
            meta: m,
            rows,
            nodes,
            embeddings,
        })
    }

    /// Number of rows (users, then streamers).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The row of a node.
    pub fn row(&self, kind: NodeKind, id: &str) -> Option<u32> {
        self.rows[kind as usize].get(id).copied()
    }

    /// The embedding of a row.
    pub fn embedding(&self, row: u32) -> &[f32] {
        let r = row as usize * self.dim;
        &self.embeddings[r..r + self.dim]
    }

    /// The neighbour lists of a row.
    pub fn neighbours(&self, row: u32) -> &Neighbours {
        &self.nodes[row as usize].lists
    }

    /// The kind and id of a row.
    pub fn node(&self, row: u32) -> (NodeKind, &str) {
        let n = &self.nodes[row as usize];
        (n.kind, &n.id)
    }

    /// Approximate heap bytes held.
    pub fn bytes(&self) -> usize {
        self.embeddings.len() * 4
            + self
                .nodes
                .iter()
                .map(|n| {
                    2 * n.id.len() + 64 + 8 * (n.lists.first.capacity() + n.lists.second.capacity())
                })
                .sum::<usize>()
    }

    /// Writes the tables (and the graph's snapshot) as the next version under
    /// `root` (1 when there is none), through a temporary directory renamed into
    /// place, and returns the version directory.
    pub fn write_next(&mut self, root: &Path, graph: &GiftGraph) -> Result<PathBuf, TablesError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TablesError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(root).map_err(io(root))?;
        let next = crate::models::serving::latest_version(root)
            .and_then(|d| d.file_name()?.to_str()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        self.version = next;
        if let Some(obj) = self.meta.as_object_mut() {
            obj.insert("version".into(), next.into());
        }
        let tmp = root.join(format!(".tmp-{next}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let file = |name: &str| -> Result<BufWriter<std::fs::File>, TablesError> {
            let p = tmp.join(name);
            Ok(BufWriter::new(std::fs::File::create(&p).map_err(io(&p))?))
        };
        let p = tmp.join("graph.json");
        let text = serde_json::to_string_pretty(&self.meta).map_err(|e| TablesError::Format {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(&p, text + "\n").map_err(io(&p))?;

        let p = tmp.join("nodes.tsv");
        let mut w = file("nodes.tsv")?;
        for n in &self.nodes {
            writeln!(w, "{}\t{}\t{}\t{}", n.kind.tag(), n.id, n.degree, n.weight)
                .map_err(io(&p))?;
        }
        w.flush().map_err(io(&p))?;

        let p = tmp.join("embeddings.f32");
        let mut w = file("embeddings.f32")?;
        for x in &self.embeddings {
            w.write_all(&x.to_le_bytes()).map_err(io(&p))?;
        }
        w.flush().map_err(io(&p))?;

        let p = tmp.join("neighbors.jsonl");
        let mut w = file("neighbors.jsonl")?;
        for n in &self.nodes {
            let names = |l: &[(u32, f32)]| -> Vec<(String, f32)> {
                l.iter()
                    .map(|&(r, x)| (self.nodes[r as usize].id.to_string(), x))
                    .collect()
            };
            let line = match n.kind {
                NodeKind::User => serde_json::json!({
                    "id": &*n.id, "kind": "u",
                    "gifted": names(&n.lists.first), "expanded": names(&n.lists.second),
                }),
                NodeKind::Streamer => serde_json::json!({
                    "id": &*n.id, "kind": "s",
                    "similar": names(&n.lists.first), "gifters": names(&n.lists.second),
                }),
            };
            writeln!(w, "{line}").map_err(io(&p))?;
        }
        w.flush().map_err(io(&p))?;

        let p = tmp.join("edges.tsv");
        let mut w = file("edges.tsv")?;
        graph.write_snapshot(&mut w).map_err(io(&p))?;
        w.flush().map_err(io(&p))?;

        let dir = root.join(next.to_string());
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Reads a version directory written by [`GraphTables::write_next`].
    pub fn read(dir: &Path) -> Result<Self, TablesError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TablesError::Io {
                path: path.clone(),
                source,
            }
        };
        let fmt = |path: &Path, reason: String| TablesError::Format {
            path: path.display().to_string(),
            reason,
        };
        let p = dir.join("graph.json");
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fmt(&p, e.to_string()))?;
        if meta.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(fmt(&p, format!("format is not {FORMAT:?}")));
        }
        let dim = meta
            .get("dim")
            .and_then(|d| d.as_u64())
            .filter(|&d| (1..=4096).contains(&d))
            .ok_or_else(|| fmt(&p, "missing or bad \"dim\"".into()))? as usize;
        let version = meta.get("version").and_then(|v| v.as_u64()).unwrap_or(0);

        let p = dir.join("nodes.tsv");
        let f = std::fs::File::open(&p).map_err(io(&p))?;
        let mut nodes = Vec::new();
        let mut rows = [HashMap::new(), HashMap::new()];
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io(&p))?;
            let mut it = line.split('\t');
            let parsed = (|| {
                let kind = NodeKind::parse(it.next()?)?;
                let id = it.next().filter(|s| !s.is_empty())?;
                let degree = it.next()?.parse().ok()?;
                let weight = it.next()?.parse().ok()?;
                it.next().is_none().then_some((kind, id, degree, weight))
            })();
            let (kind, id, degree, weight) = parsed
                .ok_or_else(|| fmt(&p, format!("line {}: not kind/id/degree/weight", n + 1)))?;
            if rows[kind as usize]
                .insert(Box::from(id), nodes.len() as u32)
                .is_some()
            {
                return Err(fmt(&p, format!("line {}: {id} twice", n + 1)));
            }
            nodes.push(Node {
                kind,
                id: id.into(),
                degree,
                weight,
                lists: Neighbours::default(),
            });
        }

        let p = dir.join("embeddings.f32");
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        if bytes.len() != nodes.len() * dim * 4 {
            return Err(fmt(
                &p,
                format!("{} bytes for {} rows of {dim}", bytes.len(), nodes.len()),
            ));
        }
        let embeddings: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if embeddings.iter().any(|x| !x.is_finite()) {
            return Err(fmt(&p, "non-finite embedding values".into()));
        }

        let p = dir.join("neighbors.jsonl");
        let f = std::fs::File::open(&p).map_err(io(&p))?;
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io(&p))?;
            if line.is_empty() {
                continue;
            }
            let bad = |what: &str| fmt(&p, format!("line {}: {what}", n + 1));
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| bad(&e.to_string()))?;
            let kind = v
                .get("kind")
                .and_then(|k| k.as_str())
                .and_then(NodeKind::parse)
                .ok_or_else(|| bad("bad kind"))?;
            let id = v
                .get("id")
                .and_then(|k| k.as_str())
                .ok_or_else(|| bad("no id"))?;
            let row = *rows[kind as usize]
                .get(id)
                .ok_or_else(|| bad("unknown node"))?;
            let (a, b, kb) = match kind {
                NodeKind::User => ("gifted", "expanded", NodeKind::Streamer),
                NodeKind::Streamer => ("similar", "gifters", NodeKind::User),
            };
            let list = |key: &str, of: NodeKind| -> Result<Vec<(u32, f32)>, TablesError> {
                let arr = v
                    .get(key)
                    .and_then(|l| l.as_array())
                    .ok_or_else(|| bad(key))?;
                arr.iter()
                    .map(|pair| {
                        let id = pair.get(0).and_then(|x| x.as_str());
                        let w = pair.get(1).and_then(|x| x.as_f64());
                        match (id, w) {
                            (Some(id), Some(w)) => rows[of as usize]
                                .get(id)
                                .map(|&r| (r, w as f32))
                                .ok_or_else(|| bad(&format!("{key}: unknown node {id}"))),
                            _ => Err(bad(&format!("{key}: not [id, weight]"))),
                        }
                    })
                    .collect()
            };
            let lists = Neighbours {
                first: list(a, NodeKind::Streamer)?,
                second: list(b, kb)?,
            };
            nodes[row as usize].lists = lists;
        }
        Ok(GraphTables {
            version,
            dim,
            meta,
            rows,
            nodes,
            embeddings,
        })
    }
}

fn sort_best_first(v: &mut [(u32, f32)]) {
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

impl Servable for GraphTables {
    fn load(dir: &Path, _threads: usize) -> Result<Self, ModelError> {
        GraphTables::read(dir).map_err(|e| ModelError::Missing {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn smoke(&mut self) -> Result<(), ModelError> {
        // Reading validated every row, list and value already.
        Ok(())
    }
}

/// The serving graph tables, hot-swapped when a newer version appears.
pub type GraphSlot = ModelSlot<GraphTables>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::swing::{swing, SwingParams};

    fn sample() -> GiftGraph {
        let mut g = GiftGraph::new();
        // Two genres: s0,s1 share fans u0..u3; s2,s3 share u4..u6; u7 gifts to s0 only.
        for u in 0..4 {
            g.add_gift(&format!("u{u}"), "s0", 10 + u, 1);
            g.add_gift(&format!("u{u}"), "s1", 5, 2);
        }
        for u in 4..7 {
            g.add_gift(&format!("u{u}"), "s2", 100, 3);
            g.add_gift(&format!("u{u}"), "s3", 1, 4);
        }
        g.add_gift("u7", "s0", 52, 5);
        g
    }

    fn tables(g: &GiftGraph) -> GraphTables {
        let sims = swing(g, &SwingParams::default());
        let dim = 3;
        let emb: Vec<f32> = (0..(g.users() + g.streamers()) * dim)
            .map(|i| i as f32 * 0.5)
            .collect();
        GraphTables::build(
            g,
            &sims,
            emb,
            dim,
            &ListParams::default(),
            serde_json::json!({"x": 1}),
        )
        .unwrap()
    }

    #[test]
    fn expansion_follows_similar_streamers() {
        let g = sample();
        let t = tables(&g);
        let u7 = t.row(NodeKind::User, "u7").unwrap();
        let s1 = t.row(NodeKind::Streamer, "s1").unwrap();
        let s0 = t.row(NodeKind::Streamer, "s0").unwrap();
        let n = t.neighbours(u7);
        assert_eq!(n.first.iter().map(|x| x.0).collect::<Vec<_>>(), vec![s0]);
        // u7 never gifted to s1, but s0's gifters also gift to s1.
        assert_eq!(n.second.iter().map(|x| x.0).collect::<Vec<_>>(), vec![s1]);
        // u0 gifted to both already: nothing to expand to in its genre.
        let u0 = t.row(NodeKind::User, "u0").unwrap();
        assert!(t.neighbours(u0).second.is_empty());
        let gifters: Vec<&str> = t
            .neighbours(s0)
            .second
            .iter()
            .map(|x| t.node(x.0).1)
            .collect();
        assert_eq!(gifters[0], "u7");
        assert_eq!(t.meta["x"], 1);
    }

    #[test]
    fn write_read_round_trip_and_versions() {
        let g = sample();
        let mut t = tables(&g);
        let root = std::env::temp_dir().join(format!("onair-graph-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let d1 = t.write_next(&root, &g).unwrap();
        assert!(d1.ends_with("1"));
        let back = GraphTables::read(&d1).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.len(), t.len());
        assert_eq!(back.embeddings, t.embeddings);
        for r in 0..t.len() as u32 {
            assert_eq!(back.node(r), t.node(r));
            assert_eq!(back.neighbours(r), t.neighbours(r));
        }
        let mut again = GiftGraph::new();
        again
            .read_snapshot(std::io::BufReader::new(
                std::fs::File::open(d1.join("edges.tsv")).unwrap(),
            ))
            .unwrap();
        assert_eq!(again.edges(), g.edges());
        assert!(t.write_next(&root, &g).unwrap().ends_with("2"));
        let slot = GraphSlot::open(&root, 1, 1).unwrap();
        assert_eq!(slot.current().version, 2);
        // A corrupt newer version is refused; the old one keeps serving.
        std::fs::create_dir_all(root.join("3")).unwrap();
        std::fs::write(
            root.join("3/graph.json"),
            "{\"format\":\"onair-graph-v1\",\"dim\":3}",
        )
        .unwrap();
        std::fs::write(root.join("3/nodes.tsv"), "u\tx\t1\n").unwrap();
        assert!(slot.refresh().is_none());
        assert_eq!(slot.current().version, 2);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
