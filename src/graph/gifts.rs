//! The user-to-streamer gifting graph, kept incrementally: one weighted edge per
//! (user, streamer) pair that has seen a gift, carrying the total value, the number
//! of gifts and the time of the last one. A snapshot (`edges.tsv`, one edge per
//! line) lets the next build start from it and read only newer gift events.
//!
//! Not for: similarity or embeddings ([`super::swing`], [`super::graphcl`]), or
//! deciding which events are gifts (callers pass gifts only).

use std::io::{BufRead, Write};

use foldhash::HashMap;

/// One user-to-streamer edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Edge {
    /// Sum of the gifts' values.
    pub value: u64,
    /// Number of gifts.
    pub gifts: u32,
    /// Event time of the latest gift.
    pub last_ms: i64,
}

impl Edge {
    /// The weight the similarity and the encoder use: `ln(1 + value)`, so a whale's
    /// thousand-unit gift counts more than a single coin but not a thousand times more.
    pub fn weight(&self) -> f32 {
        (self.value as f64).ln_1p() as f32
    }
}

/// Strings to dense ids and back.
#[derive(Clone, Debug, Default)]
struct Interner {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Interner {
    fn get_or_add(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), i);
        i
    }
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading failed (an external fault; retrying may help).
    #[error("reading the edge snapshot failed")]
    Io(#[from] std::io::Error),
    /// A line is not `user \t streamer \t value \t gifts \t last_ms` (the file's fault).
    #[error("edge snapshot line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The gifting graph. Users and streamers get dense ids in order of first
/// appearance; a user's edges are sorted by streamer id.
#[derive(Clone, Debug, Default)]
pub struct GiftGraph {
    users: Interner,
    streamers: Interner,
    /// Per user: (streamer, edge), sorted by streamer.
    by_user: Vec<Vec<(u32, Edge)>>,
    /// Per streamer: its gifters, in order of their first gift to it.
    by_streamer: Vec<Vec<u32>>,
    edges: usize,
    gifts: u64,
    through_ms: i64,
}

impl GiftGraph {
    /// An empty graph.
    pub fn new() -> Self {
        GiftGraph {
            through_ms: i64::MIN,
            ..GiftGraph::default()
        }
    }

    /// Adds one gift; returns whether it created a new edge. Events may come in any
    /// order: the edge keeps the latest time seen.
    pub fn add_gift(&mut self, user: &str, streamer: &str, value: u64, t_ms: i64) -> bool {
        self.add_edge(
            user,
            streamer,
            Edge {
                value,
                gifts: 1,
                last_ms: t_ms,
            },
        )
    }

    /// Merges an aggregated edge (from a snapshot) into the graph.
    pub fn add_edge(&mut self, user: &str, streamer: &str, e: Edge) -> bool {
        let u = self.users.get_or_add(user) as usize;
        let s = self.streamers.get_or_add(streamer);
        if u == self.by_user.len() {
            self.by_user.push(Vec::new());
        }
        if s as usize == self.by_streamer.len() {
            self.by_streamer.push(Vec::new());
        }
        self.gifts += u64::from(e.gifts);
        self.through_ms = self.through_ms.max(e.last_ms);
        let list = &mut self.by_user[u];
        match list.binary_search_by_key(&s, |&(k, _)| k) {
            Ok(i) => {
                let old = &mut list[i].1;
                old.value = old.value.saturating_add(e.value);
                old.gifts = old.gifts.saturating_add(e.gifts);
                old.last_ms = old.last_ms.max(e.last_ms);
                false
            }
            Err(i) => {
                list.insert(i, (s, e));
                self.by_streamer[s as usize].push(u as u32);
                self.edges += 1;
                true
            }
        }
    }

    /// Number of users with at least one edge.
    pub fn users(&self) -> usize {
        self.users.names.len()
    }

    /// Number of streamers with at least one edge.
    pub fn streamers(&self) -> usize {
        self.streamers.names.len()
    }

    /// Number of distinct (user, streamer) edges.
    pub fn edges(&self) -> usize {
        self.edges
    }

    /// Number of gifts merged in.
    pub fn gifts(&self) -> u64 {
        self.gifts
    }

    /// Event time of the latest gift (`i64::MIN` when empty).
    pub fn through_ms(&self) -> i64 {
        self.through_ms
    }

    /// The id of a user, by dense index.
    pub fn user_name(&self, u: u32) -> &str {
        &self.users.names[u as usize]
    }

    /// The id of a streamer, by dense index.
    pub fn streamer_name(&self, s: u32) -> &str {
        &self.streamers.names[s as usize]
    }

    /// Dense index of a user.
    pub fn user_index(&self, user: &str) -> Option<u32> {
        self.users.ids.get(user).copied()
    }

    /// Dense index of a streamer.
    pub fn streamer_index(&self, streamer: &str) -> Option<u32> {
        self.streamers.ids.get(streamer).copied()
    }

    /// A user's edges, sorted by streamer index.
    pub fn user_edges(&self, u: u32) -> &[(u32, Edge)] {
        self.by_user.get(u as usize).map_or(&[], Vec::as_slice)
    }

    /// A streamer's gifters, in order of their first gift to it.
    pub fn streamer_users(&self, s: u32) -> &[u32] {
        self.by_streamer.get(s as usize).map_or(&[], Vec::as_slice)
    }

    /// The edge between a user and a streamer.
    pub fn edge(&self, u: u32, s: u32) -> Option<Edge> {
        let list = self.user_edges(u);
        list.binary_search_by_key(&s, |&(k, _)| k)
            .ok()
            .map(|i| list[i].1)
    }

    /// Every edge as (user, streamer, edge), users in index order.
    pub fn iter_edges(&self) -> impl Iterator<Item = (u32, u32, Edge)> + '_ {
        self.by_user
            .iter()
            .enumerate()
            .flat_map(|(u, l)| l.iter().map(move |&(s, e)| (u as u32, s, e)))
    }

    /// Writes the snapshot: `user \t streamer \t value \t gifts \t last_ms` per edge.
    pub fn write_snapshot(&self, mut w: impl Write) -> std::io::Result<()> {
        for (u, s, e) in self.iter_edges() {
            writeln!(
                w,
                "{}\t{}\t{}\t{}\t{}",
                self.user_name(u),
                self.streamer_name(s),
                e.value,
                e.gifts,
                e.last_ms
            )?;
        }
        Ok(())
    }

    /// Merges a snapshot written by [`GiftGraph::write_snapshot`] into the graph.
    pub fn read_snapshot(&mut self, r: impl BufRead) -> Result<(), SnapshotError> {
        for (n, line) in r.lines().enumerate() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            let err = |reason: &str| SnapshotError::Format {
                line: n + 1,
                reason: reason.to_owned(),
            };
            let mut f = line.split('\t');
            let (Some(user), Some(streamer), Some(value), Some(gifts), Some(last), None) =
                (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return Err(err("expected 5 tab-separated fields"));
            };
            if user.is_empty() || streamer.is_empty() {
                return Err(err("empty user or streamer id"));
            }
            let e = Edge {
                value: value.parse().map_err(|_| err("bad value"))?,
                gifts: gifts.parse().map_err(|_| err("bad gift count"))?,
                last_ms: last.parse().map_err(|_| err("bad last_ms"))?,
            };
            self.add_edge(user, streamer, e);
        }
        Ok(())
    }

    /// Approximate heap bytes held.
    pub fn bytes(&self) -> usize {
        let names: usize = self
            .users
            .names
            .iter()
            .chain(&self.streamers.names)
            .map(|n| 2 * n.len() + 2 * std::mem::size_of::<Box<str>>() + 8)
            .sum();
        let lists: usize = self
            .by_user
            .iter()
            .map(|l| l.capacity() * std::mem::size_of::<(u32, Edge)>())
            .sum::<usize>()
            + self
                .by_streamer
                .iter()
                .map(|l| l.capacity() * 4)
                .sum::<usize>();
        names + lists + (self.by_user.capacity() + self.by_streamer.capacity()) * 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gifts_merge_into_edges() {
        let mut g = GiftGraph::new();
        assert!(g.add_gift("u1", "s1", 10, 5));
        assert!(!g.add_gift("u1", "s1", 1, 3));
        assert!(g.add_gift("u1", "s0", 52, 7));
        assert!(g.add_gift("u2", "s1", 1, 9));
        assert_eq!(
            (g.users(), g.streamers(), g.edges(), g.gifts()),
            (2, 2, 3, 4)
        );
        let (u1, s1) = (g.user_index("u1").unwrap(), g.streamer_index("s1").unwrap());
        assert_eq!(
            g.edge(u1, s1),
            Some(Edge {
                value: 11,
                gifts: 2,
                last_ms: 5
            })
        );
        // Sorted by streamer index (s1 came first, so it is 0).
        let order: Vec<u32> = g.user_edges(u1).iter().map(|&(s, _)| s).collect();
        assert_eq!(order, vec![0, 1]);
        assert_eq!(g.streamer_users(s1).len(), 2);
        assert_eq!(g.through_ms(), 9);
    }

    #[test]
    fn snapshot_round_trip_and_errors() {
        let mut g = GiftGraph::new();
        for (i, (u, s, v)) in [("a", "x", 5), ("b", "x", 1), ("a", "y", 100), ("a", "x", 2)]
            .into_iter()
            .enumerate()
        {
            g.add_gift(u, s, v, i as i64);
        }
        let mut buf = Vec::new();
        g.write_snapshot(&mut buf).unwrap();
        let mut back = GiftGraph::new();
        back.read_snapshot(&buf[..]).unwrap();
        let all = |g: &GiftGraph| {
            let mut v: Vec<_> = g
                .iter_edges()
                .map(|(u, s, e)| (g.user_name(u).to_owned(), g.streamer_name(s).to_owned(), e))
                .collect();
            v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            v
        };
        assert_eq!(all(&g), all(&back));
        assert_eq!(back.gifts(), 4);
        for bad in [
            "a\tx\t1\t1",
            "a\tx\tone\t1\t2",
            "\tx\t1\t1\t2",
            "a\tx\t1\t1\t2\t3",
        ] {
            let e = GiftGraph::new().read_snapshot(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Format { line: 1, .. }),
                "{bad:?}"
            );
        }
    }
}
