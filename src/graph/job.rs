//! The graph job (`onair graph`): reads gift events, merges them into the gifting
//! graph of the latest table version (its `edges.tsv`), computes Swing similarity,
//! trains the node embeddings (the `torch` feature) and writes the next version.
//!
//! Gift events come from JSON lines (`{"user_id", "streamer_id", "t_ms", "value"}`,
//! one gift each: what `--samples-dir` writes as `mmbee/gifts.jsonl`) or from the
//! viewer-actions topic (GIFT actions; see `cli`). With a previous version, only
//! events after its `events_through_ms` are merged, so rerunning the job on the same
//! input does not count a gift twice.
//!
//! Not for: serving the tables (they are read by [`super::GraphSlot`]).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::gifts::{GiftGraph, SnapshotError};
use super::swing::{swing, SwingParams};
use super::tables::{GraphTables, ListParams, TablesError};

/// What went wrong in the job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// An input file could not be read (external).
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A gift line is malformed (the input's fault).
    #[error("{path} line {line}: {reason}")]
    Input {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The previous version's snapshot is unreadable.
    #[error("previous graph snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// Tables could not be written.
    #[error(transparent)]
    Tables(#[from] TablesError),
    /// Embeddings could not be trained.
    #[error("{0}")]
    Embeddings(String),
}

impl crate::error::Classify for JobError {
    fn fault(&self) -> crate::error::Fault {
        use crate::error::Fault;
        match self {
            JobError::Io { .. } => Fault::External,
            JobError::Input { .. } | JobError::Snapshot(SnapshotError::Format { .. }) => {
                Fault::Input
            }
            JobError::Snapshot(SnapshotError::Io(_)) => Fault::External,
            JobError::Tables(e) => e.fault(),
            JobError::Embeddings(_) => Fault::Internal,
        }
    }
}

/// The job's settings.
#[derive(Clone, Debug)]
pub struct GraphJob {
    /// Root of the numbered table versions (read for the previous one, written to).
    pub out: PathBuf,
    /// Start from the latest version's graph under `out`.
    pub incremental: bool,
    /// Swing's knobs.
    pub swing: SwingParams,
    /// Neighbour list lengths.
    pub lists: ListParams,
    /// Embedding training.
    #[cfg(feature = "torch")]
    pub graphcl: super::graphcl::GraphClParams,
}

impl GraphJob {
    /// Defaults, writing under `out`.
    pub fn new(out: PathBuf) -> Self {
        GraphJob {
            out,
            incremental: true,
            swing: SwingParams::default(),
            lists: ListParams::default(),
            #[cfg(feature = "torch")]
            graphcl: super::graphcl::GraphClParams::default(),
        }
    }

    /// The graph to start from: the latest version's snapshot when incremental
    /// (and one exists), else empty; with the time its events run through.
    pub fn start(&self) -> Result<(GiftGraph, Option<PathBuf>), JobError> {
        let mut g = GiftGraph::new();
        if !self.incremental {
            return Ok((g, None));
        }
        let Some(dir) = crate::models::serving::latest_version(&self.out) else {
            return Ok((g, None));
        };
        let p = dir.join("edges.tsv");
        let f = std::fs::File::open(&p).map_err(|source| JobError::Io {
            path: p.display().to_string(),
            source,
        })?;
        g.read_snapshot(std::io::BufReader::new(f))?;
        Ok((g, Some(dir)))
    }

    /// Computes similarity, embeddings and lists for `graph` and writes the next
    /// version; returns its directory and its `graph.json`.
    pub fn finish(
        &self,
        graph: &GiftGraph,
        inputs: serde_json::Value,
    ) -> Result<(PathBuf, serde_json::Value), JobError> {
        let t0 = Instant::now();
        let similar = swing(graph, &self.swing);
        let swing_s = t0.elapsed().as_secs_f64();
        let (embeddings, dim, training) = self.embeddings(graph, &similar)?;
        let meta = serde_json::json!({
            "inputs": inputs,
            "swing": {
                "alpha": self.swing.alpha,
                "max_streamers_per_user": self.swing.max_streamers_per_user,
                "max_users_per_streamer": self.swing.max_users_per_streamer,
                "top_k": self.swing.top_k,
                "seconds": swing_s,
                "pairs": similar.iter().map(Vec::len).sum::<usize>() / 2,
            },
            "embeddings": training,
        });
        let mut tables = GraphTables::build(graph, &similar, embeddings, dim, &self.lists, meta)?;
        let dir = tables.write_next(&self.out, graph)?;
        Ok((dir, tables.meta.clone()))
    }

    #[cfg(feature = "torch")]
    fn embeddings(
        &self,
        graph: &GiftGraph,
        similar: &[Vec<(u32, f32)>],
    ) -> Result<(Vec<f32>, usize, serde_json::Value), JobError> {
        let p = &self.graphcl;
        let (emb, report) = super::graphcl::train(graph, similar, p)
            .map_err(|e| JobError::Embeddings(e.to_string()))?;
        let info = serde_json::json!({"method": "graphcl", "params": p, "report": report});
        Ok((emb, p.dim, info))
    }

    #[cfg(not(feature = "torch"))]
    fn embeddings(
        &self,
        _graph: &GiftGraph,
        _similar: &[Vec<(u32, f32)>],
    ) -> Result<(Vec<f32>, usize, serde_json::Value), JobError> {
        Err(JobError::Embeddings(
            "this onair was built without the `torch` feature, which trains the graph \
             embeddings (cargo build --features torch)"
                .into(),
        ))
    }
}

/// Merges the gifts of a JSON-lines file with event time after `after_ms` into
/// `graph`; returns (gifts merged, gifts skipped as already in the graph or as
/// replays). A line with an `id` seen before in the file is a replay (the
/// engine's sample files get one after a restart) and is skipped.
pub fn read_gifts_jsonl(
    graph: &mut GiftGraph,
    path: &Path,
    after_ms: i64,
) -> Result<(u64, u64), JobError> {
    let io = |source| JobError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let (mut merged, mut skipped) = (0, 0);
    let mut ids = std::collections::HashSet::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| JobError::Input {
            path: path.display().to_string(),
            line: n + 1,
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .filter(|x| !x.is_empty())
                .ok_or_else(|| bad(format!("missing or empty {k:?}")))
        };
        let i = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_i64())
                .ok_or_else(|| bad(format!("missing or non-integer {k:?}")))
        };
        let (user, streamer, t, value) =
            (s("user_id")?, s("streamer_id")?, i("t_ms")?, i("value")?);
        if value < 0 {
            return Err(bad("negative value".into()));
        }
        let replay = v
            .get("id")
            .and_then(|x| x.as_str())
            .is_some_and(|id| !ids.insert(id.to_owned()));
        if t <= after_ms || replay {
            skipped += 1;
            continue;
        }
        graph.add_gift(user, streamer, value as u64, t);
        merged += 1;
    }
    Ok((merged, skipped))
}

/// What reading the actions topic found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KafkaRead {
    /// Records read.
    pub records: u64,
    /// Gifts merged.
    pub merged: u64,
    /// Gifts at or before the previous build.
    pub skipped: u64,
    /// Gifts without a streamer id (cannot be placed on the graph).
    pub no_streamer: u64,
    /// Records that did not decode (they are the dead-letter topic's business when
    /// the engine reads them; here they are counted and skipped).
    pub undecodable: u64,
}

/// Merges the GIFT actions of `topic` (every partition, from the start to the end
/// it had when the read began) with event time after `after_ms` into `graph`.
pub fn read_gifts_kafka(
    graph: &mut GiftGraph,
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    after_ms: i64,
    limits: &crate::schema::Limits,
) -> Result<KafkaRead, crate::kafka::KafkaFailure> {
    use crate::kafka::KafkaFailure;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::time::Duration;

    let timeout = Duration::from_secs(10);
    let mut c = crate::kafka::client_config(kafka);
    c.set("group.id", format!("onair-graph-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = c.create().map_err(|source| KafkaFailure::Client {
        what: "graph consumer",
        source,
    })?;
    let op = |what: &'static str| move |source| KafkaFailure::Operation { what, source };
    let meta = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(op("metadata"))?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(op("watermarks"))?;
        if hi > lo {
            ends.insert(p, hi);
            tpl.add_partition_offset(topic, p, Offset::Offset(lo))
                .map_err(op("assign"))?;
        }
    }
    let mut read = KafkaRead::default();
    if ends.is_empty() {
        return Ok(read);
    }
    consumer.assign(&tpl).map_err(op("assign"))?;
    let mut idle = std::time::Instant::now();
    while !ends.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            if idle.elapsed() > Duration::from_secs(30) {
                return Err(KafkaFailure::Operation {
                    what: "reading the actions topic (no record for 30 s before its end)",
                    source: rdkafka::error::KafkaError::NoMessageReceived,
                });
            }
            continue;
        };
        idle = std::time::Instant::now();
        let msg = msg.map_err(op("consume"))?;
        let (p, offset) = (msg.partition(), msg.offset());
        if ends.get(&p).is_some_and(|&end| offset + 1 >= end) {
            ends.remove(&p);
        }
        read.records += 1;
        let content_type = msg.headers().and_then(|h| {
            use rdkafka::message::Headers;
            h.iter()
                .find(|x| x.key == crate::schema::CONTENT_TYPE_HEADER)
                .and_then(|x| x.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        });
        let event = crate::schema::decode_input(
            crate::schema::InputKind::Actions,
            msg.key(),
            msg.payload(),
            content_type,
            limits,
        );
        let a = match event {
            Ok(crate::schema::Event::Action(a)) => a,
            _ => {
                read.undecodable += 1;
                continue;
            }
        };
        if a.kind != crate::schema::ActionKind::Gift as i32 {
            continue;
        }
        if a.streamer_id.is_empty() || a.user_id.is_empty() {
            read.no_streamer += 1;
        } else if a.event_time_ms <= after_ms {
            read.skipped += 1;
        } else {
            graph.add_gift(&a.user_id, &a.streamer_id, a.gift_value, a.event_time_ms);
            read.merged += 1;
        }
    }
    Ok(read)
}

/// Merges the gifts of `days` simulated days of one world (`base` with days
/// `base.day ..`, each starting a day after the previous, no media) with event
/// time after `after_ms` into `graph`; returns the gifts merged.
pub fn simulate_gifts(
    graph: &mut GiftGraph,
    base: &crate::simulator::SimConfig,
    days: u32,
    after_ms: i64,
) -> Result<u64, crate::simulator::SimError> {
    use crate::simulator::{SimConfig, SimEvent, Simulator};
    let mut merged = 0;
    for d in 0..days {
        let cfg = SimConfig {
            day: base.day + d,
            start_ms: base.start_ms + i64::from(d) * 86_400_000,
            video: None,
            audio: false,
            speech: false,
            ..base.clone()
        };
        let mut sim = Simulator::new(cfg)?;
        let mut t = sim.config().start_ms;
        while !sim.finished() {
            t += 10_000;
            for ev in sim.advance(t)? {
                if let SimEvent::Action(a) = ev {
                    if a.kind == crate::schema::ActionKind::Gift as i32
                        && a.event_time_ms > after_ms
                    {
                        graph.add_gift(&a.user_id, &a.streamer_id, a.gift_value, a.event_time_ms);
                        merged += 1;
                    }
                }
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gift_lines_are_checked_and_cut_at_the_previous_build() {
        let dir = std::env::temp_dir().join(format!("onair-gifts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gifts.jsonl");
        std::fs::write(
            &p,
            "{\"user_id\":\"u\",\"streamer_id\":\"s\",\"t_ms\":5,\"value\":10}\n\n\
             {\"user_id\":\"u\",\"streamer_id\":\"s\",\"t_ms\":9,\"value\":1,\"id\":\"a\"}\n\
             {\"user_id\":\"u\",\"streamer_id\":\"s\",\"t_ms\":9,\"value\":1,\"id\":\"a\"}\n",
        )
        .unwrap();
        let mut g = GiftGraph::new();
        assert_eq!(read_gifts_jsonl(&mut g, &p, 5).unwrap(), (1, 2));
        assert_eq!(g.gifts(), 1);
        std::fs::write(
            &p,
            "{\"user_id\":\"u\",\"streamer_id\":\"\",\"t_ms\":5,\"value\":10}\n",
        )
        .unwrap();
        let e = read_gifts_jsonl(&mut g, &p, 0).unwrap_err();
        assert!(matches!(e, JobError::Input { line: 1, .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
