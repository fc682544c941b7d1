//! The graph job against the broker: simulated days of one world go to the
//! actions topic, `onair graph` reads them back into the gifting graph and writes
//! table versions; checked against the simulator's truth.
//!
//! - every GIFT action is merged, once (the truth's gift count);
//! - Swing finds the world's genres: a streamer's most similar streamer shares its
//!   genre far more often than chance (1 in 5 genres; 12 of 16 streamers when this
//!   was written);
//! - a rerun on the same topic merges nothing new (it starts from the previous
//!   version's snapshot and skips what it holds); after another day it merges
//!   exactly that day's gifts; a serving slot picks each new version up.
//!
//! Needs the `torch` feature (the embeddings) and a broker (`scripts/test`).
#![cfg(feature = "torch")]

mod common;

use std::process::Command;

use onair::graph::{GraphSlot, GraphTables, NodeKind};
use onair::simulator::GroundTruth;

use common::{pipeline, scratch, unique, Proc, Topics};

const T0: i64 = 1_767_225_600_000;

fn run_sim(dir: &std::path::Path, p: &std::path::Path, day: u32, secs: u32) -> GroundTruth {
    let truth = dir.join(format!("truth-{day}.jsonl"));
    let start = (T0 + i64::from(day) * 86_400_000).to_string();
    let d = day.to_string();
    let t = truth.display().to_string();
    let dur = format!("{secs}s");
    let mut sim = Proc::simulate(
        dir,
        p,
        &[
            "--rooms",
            "16",
            "--viewers",
            "60",
            "--seed",
            "3",
            "--day",
            &d,
            "--duration",
            &dur,
            "--speed",
            "0",
            "--fps",
            "0",
            "--no-audio",
            "--start-ms",
            &start,
            "--truth",
            &t,
        ],
    );
    let status = sim.wait(std::time::Duration::from_secs(240));
    assert!(status.success(), "simulate failed: {}", sim.log_tail());
    let f = std::fs::File::open(&truth).expect("truth");
    GroundTruth::read_jsonl(std::io::BufReader::new(f)).expect("truth parses")
}

fn graph(p: &std::path::Path, out: &std::path::Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_onair"))
        .args(["--log", "warn", "graph", "--pipeline"])
        .arg(p)
        .arg("--out")
        .arg(out)
        .args(["--steps", "60", "--threads", "1"])
        .output()
        .expect("run onair graph");
    assert!(
        o.status.success(),
        "onair graph failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("graph.json on stdout")
}

#[test]
fn graph_job_reads_gifts_from_kafka_and_builds_versions() {
    let dir = scratch("graph-job");
    let topics = Topics {
        prefix: unique("graph"),
    };
    let p = pipeline(&dir, &topics, "[simulator]\nshared_viewers = 0.8\n");
    let day0 = run_sim(&dir, &p, 0, 3600);
    let gifts0: u64 = day0.ticks().map(|t| u64::from(t.gifts)).sum();
    assert!(gifts0 > 100, "only {gifts0} gifts simulated");

    let out = dir.join("graph");
    let m1 = graph(&p, &out);
    let read = &m1["inputs"][topics.name("actions")];
    assert_eq!(read["merged"].as_u64(), Some(gifts0), "{m1}");
    assert_eq!(read["undecodable"].as_u64(), Some(0), "{m1}");
    assert_eq!(m1["gifts"].as_u64(), Some(gifts0));
    let report = &m1["embeddings"]["report"];
    eprintln!(
        "day 0: {} users, {} streamers, {} edges; held-out AUC {} (popularity {})",
        m1["users"], m1["streamers"], m1["edges"], report["holdout_auc"], report["popularity_auc"]
    );

    // Swing against the truth's genres.
    let t1 = GraphTables::read(&out.join("1")).expect("version 1 reads");
    let genre: std::collections::HashMap<&str, u32> = day0
        .streamers()
        .iter()
        .map(|s| (s.streamer_id.as_str(), s.genre))
        .collect();
    let (mut same, mut with_similar) = (0, 0);
    for s in day0.streamers() {
        let Some(row) = t1.row(NodeKind::Streamer, &s.streamer_id) else {
            continue;
        };
        if let Some(&(top, _)) = t1.neighbours(row).first.first() {
            with_similar += 1;
            if genre[t1.node(top).1] == s.genre {
                same += 1;
            }
        }
    }
    eprintln!("top Swing neighbour in the same genre: {same} of {with_similar}");
    assert!(
        with_similar >= 8,
        "{with_similar} streamers have a similar streamer"
    );
    // Chance is about 1 in 5 genres.
    assert!(
        same * 2 > with_similar,
        "{same} of {with_similar} in the same genre"
    );
    let slot = GraphSlot::open(&out, 1, 1).expect("slot");
    assert_eq!(slot.current().version, 1);

    // Nothing new: the snapshot already holds every gift.
    let m2 = graph(&p, &out);
    let read = &m2["inputs"][topics.name("actions")];
    assert_eq!(
        (read["merged"].as_u64(), read["skipped"].as_u64()),
        (Some(0), Some(gifts0)),
        "{m2}"
    );
    assert_eq!(m2["edges"], m1["edges"]);
    assert_eq!(m2["version"].as_u64(), Some(2));

    // Another day: exactly its gifts are added.
    let day1 = run_sim(&dir, &p, 1, 600);
    let gifts1: u64 = day1.ticks().map(|t| u64::from(t.gifts)).sum();
    let m3 = graph(&p, &out);
    let read = &m3["inputs"][topics.name("actions")];
    assert_eq!(read["merged"].as_u64(), Some(gifts1), "{m3}");
    assert_eq!(m3["gifts"].as_u64(), Some(gifts0 + gifts1));
    assert!(
        slot.refresh().is_some(),
        "the slot did not pick up a new version"
    );
    assert_eq!(slot.current().version, 3);
}
