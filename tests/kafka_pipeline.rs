//! The spine against a real Kafka-protocol broker: simulated rooms go in
//! through Kafka, `onair run` processes them, and a plain consumer reads
//! `room-stats` back and compares every tick with the simulator's truth —
//! from a backlog, and across a rebalance. Crashes, joins and leaves, broker
//! restarts and overload are the fault suite's (`tests/faults.rs`).

mod common;

use std::time::{Duration, Instant};

use common::stats::{self, assert_matches, load_truth, Replays};
use common::{Proc, Rec, Topics};

fn read_stats(topics: &Topics, expected: usize, timeout: Duration) -> Vec<Rec> {
    stats::read_stats_at(&common::brokers(), topics, expected, timeout)
}

/// 20 rooms, 60 s of event time, produced first (a backlog), then processed.
#[test]
fn room_stats_from_a_backlog_equal_the_truth() {
    let dir = common::scratch("backlog");
    let topics = Topics {
        prefix: common::unique("backlog"),
    };
    let pipeline = common::pipeline(&dir, &topics, "");
    let truth_path = dir.join("truth.jsonl");
    let t = truth_path.to_str().expect("utf-8 path");
    Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "20",
            "--duration",
            "60s",
            "--speed",
            "0",
            "--seed",
            "11",
            "--json-every",
            "5",
            "--truth",
            t,
        ],
    )
    .simulate_ok(Duration::from_secs(240));
    let truth = load_truth(&truth_path);
    assert!(
        truth.ticks().count() >= 20 * 55,
        "the simulation covers 20 rooms x 60 s"
    );
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let recs = read_stats(&topics, truth.ticks().count(), Duration::from_secs(180));
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit: {status}\n{}",
        engine.log_tail()
    );
    assert_matches(&truth, &recs, Replays::Exact);
}

fn replays_expected(topics: &Topics) -> Replays {
    stats::replays_expected_at(&common::brokers(), topics)
}

/// Two engines in one group share the partitions; stopping one moves its
/// partitions to the other with nothing lost.
#[test]
fn two_members_share_and_hand_over_partitions() {
    let dir = common::scratch("group");
    let topics = Topics {
        prefix: common::unique("group"),
    };
    let pipeline = common::pipeline(&dir, &topics, "");
    let truth_path = dir.join("truth.jsonl");
    let t = truth_path.to_str().expect("utf-8 path");
    let mut a = Proc::engine(&dir, &pipeline, "engine-a");
    let mut b = Proc::engine(&dir, &pipeline, "engine-b");
    let sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "12",
            "--duration",
            "60s",
            "--speed",
            "3",
            "--seed",
            "13",
            "--fps",
            "0",
            "--truth",
            t,
        ],
    );
    let assigned = |p: &Proc| {
        p.scrape()
            .and_then(|m| common::metric(&m, "onair_partitions_assigned", &[]))
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    let (mut pa, mut pb) = (0.0, 0.0);
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
        pa = assigned(&a);
        pb = assigned(&b);
        if pa > 0.0 && pb > 0.0 && pa + pb == 4.0 {
            break;
        }
    }
    assert!(
        pa > 0.0 && pb > 0.0 && pa + pb == 4.0,
        "both members hold partitions: {pa} + {pb}\n{}\n{}",
        a.log_tail(),
        b.log_tail()
    );
    // Let both work for a while, then stop one gracefully.
    std::thread::sleep(Duration::from_secs(4));
    b.signal_term();
    let status = b.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "member b exit: {status}\n{}",
        b.log_tail()
    );
    let until = Instant::now() + Duration::from_secs(60);
    while assigned(&a) < 4.0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        assigned(&a),
        4.0,
        "a took over every partition\n{}",
        a.log_tail()
    );
    sim.simulate_ok(Duration::from_secs(240));
    let truth = load_truth(&truth_path);
    let recs = read_stats(&topics, truth.ticks().count(), Duration::from_secs(180));
    a.signal_term();
    let status = a.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "member a exit: {status}\n{}",
        a.log_tail()
    );
    let replays_are = replays_expected(&topics);
    assert_matches(&truth, &recs, replays_are);
}
