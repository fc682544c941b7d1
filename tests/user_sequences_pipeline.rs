//! The user stage through a real broker: the simulator's live rooms and its
//! users' short-video scrolling go in; every user's last `user-sequences`
//! record must equal the sequence rebuilt from scratch from the actions the
//! simulator published (read back from the input topics), with small bounds
//! so eviction is exercised too. Once the engine is SIGKILLed mid-run and
//! restarted as the same member; once one of two members leaves mid-run and
//! its partitions move to the other. Either way the state comes back from the
//! changelog. The compressed interests published with each sequence must be
//! the ones recomputed over every behaviour the bounded sequence ever held
//! (bit for bit: the engine keeps them in fixed point), so they too survive
//! the restart and the move. (A member SIGKILLed for good would hand its partitions over
//! only when the broker expires its session: noida 0.2.3 did not within
//! four minutes, so the move is tested with a member that leaves.)

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Proc, Rec, Rng, Topics};
use onair::models::interests::InterestModel;
use onair::operators::user_sequences::{behaviour_record, TASK};
use onair::schema::{Behaviour, ShortVideoAction, TrainingSample, UserSequence, ViewerAction};
use onair::state::sequence::{rebuild, Act, Bounds, Source};
use prost::Message;

const EXTRA: &str = r#"
[simulator]
short_videos = true
[operators.user_sequences]
enabled = true
live_max = 4
short_video_max = 6
"#;

fn bounds() -> Bounds {
    Bounds {
        live_max: 4,
        short_video_max: 6,
        ..Bounds::default()
    }
}

/// Reads a topic to its end: until it has not grown for `quiet`.
fn read_all(topic: &str, quiet: Duration) -> Vec<Rec> {
    let mut last = (0, Instant::now());
    common::read_until(topic, Duration::from_secs(120), |recs| {
        if recs.len() != last.0 {
            last = (recs.len(), Instant::now());
        }
        !recs.is_empty() && last.1.elapsed() > quiet
    })
}

/// Every user's sequence rebuilt from the published actions, as the
/// operator takes them (no content or highlight: features are off here).
fn expected(topics: &Topics) -> BTreeMap<String, Want> {
    let mut acts: HashMap<String, Vec<Act>> = HashMap::new();
    for r in read_all(&topics.name("actions"), Duration::from_secs(5)) {
        let a = ViewerAction::decode(&r.payload[..]).expect("the simulator writes protobuf");
        let source = Source {
            stream: 0,
            partition: r.partition,
            offset: r.offset,
        };
        if let Some(act) = Act::live(&a, source, None) {
            acts.entry(a.user_id.clone()).or_default().push(act);
        }
    }
    let shorts = read_all(&topics.name("short-video-actions"), Duration::from_secs(5));
    assert!(
        shorts.len() > 100,
        "the simulator published {} short-video actions",
        shorts.len()
    );
    for r in shorts {
        let s = ShortVideoAction::decode(&r.payload[..]).expect("protobuf");
        let source = Source {
            stream: 1,
            partition: r.partition,
            offset: r.offset,
        };
        if let Some(act) = Act::short_video(&s, source) {
            acts.entry(s.user_id.clone()).or_default().push(act);
        }
    }
    let b = bounds();
    let model = Arc::new(
        InterestModel::load(Path::new("models/interests")).expect("the committed interest model"),
    );
    acts.into_iter()
        .map(|(user, acts)| {
            let fold = rebuild(&acts, &b, Some(&model));
            let behaviours: Vec<Behaviour> = fold
                .behaviours()
                .into_iter()
                .map(behaviour_record)
                .collect();
            let i = fold.interests().expect("interests kept");
            let want = Want {
                behaviours,
                interests: i.read(),
                count: i.count(),
            };
            (user, want)
        })
        .filter(|(_, w)| !w.behaviours.is_empty())
        .collect()
}

/// What a user's last record must hold.
struct Want {
    behaviours: Vec<Behaviour>,
    interests: Vec<f32>,
    /// Behaviours the interests summarise.
    count: u64,
}

/// The last `user-sequences` record per user.
fn latest(recs: &[Rec]) -> HashMap<String, UserSequence> {
    let mut out: HashMap<String, (i32, i64, UserSequence)> = HashMap::new();
    for r in recs {
        let Ok(s) = UserSequence::decode(&r.payload[..]) else {
            continue;
        };
        let newer = out
            .get(&s.user_id)
            .is_none_or(|(p, o, _)| (r.partition, r.offset) > (*p, *o));
        if newer {
            out.insert(s.user_id.clone(), (r.partition, r.offset, s));
        }
    }
    out.into_iter().map(|(u, (_, _, s))| (u, s)).collect()
}

/// Users whose last record differs from `want` (all of them, with the first
/// difference described).
fn mismatches(want: &BTreeMap<String, Want>, got: &HashMap<String, UserSequence>) -> Vec<String> {
    want.iter()
        .map(|(user, w)| (user, &w.behaviours, w))
        .filter_map(|(user, seq, w)| match got.get(user) {
            None => Some(format!("{user}: no record")),
            Some(s) if &s.behaviours == seq
                && (s.interests != w.interests || s.interest_behaviours != w.count) =>
            {
                Some(format!(
                    "{user}: interests over {} behaviours (want {}) differ from the recomputation: got {:?}, want {:?}",
                    s.interest_behaviours,
                    w.count,
                    &s.interests[..s.interests.len().min(4)],
                    &w.interests[..w.interests.len().min(4)]
                ))
            }
            Some(s) if &s.behaviours != seq => {
                let i = s
                    .behaviours
                    .iter()
                    .zip(seq)
                    .position(|(a, b)| a != b)
                    .unwrap_or(s.behaviours.len().min(seq.len()));
                Some(format!(
                    "{user}: {} behaviours, want {}; first difference at {i}: got {:?}, want {:?}",
                    s.behaviours.len(),
                    seq.len(),
                    s.behaviours.get(i),
                    seq.get(i)
                ))
            }
            Some(_) => None,
        })
        .collect()
}

/// Waits until every user's last record matches (or the timeout), and
/// asserts it.
fn assert_sequences(topics: &Topics, want: &BTreeMap<String, Want>, engine: &Proc) {
    let topic = topics.name("user-sequences");
    let recs = common::read_until(&topic, Duration::from_secs(240), |recs| {
        mismatches(want, &latest(recs)).is_empty()
    });
    let got = latest(&recs);
    let bad = mismatches(want, &got);
    let live: usize = want
        .values()
        .flat_map(|w| &w.behaviours)
        .filter(|b| b.domain == "live")
        .count();
    let short: usize = want
        .values()
        .flat_map(|w| &w.behaviours)
        .filter(|b| b.domain != "live")
        .count();
    // The bounds are small: some users' interests summarise behaviours
    // their sequence no longer holds (and must still match).
    let beyond = want
        .values()
        .filter(|w| w.count > w.behaviours.len() as u64)
        .count();
    assert!(
        beyond > 0,
        "only {beyond} of {} users' interests summarise more than their sequence",
        want.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {} users' sequences differ from the rebuild, e.g.:\n{}\n{}",
        bad.len(),
        want.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("\n"),
        engine.log_tail()
    );
    assert!(
        live > 50 && short > 50,
        "{live} live and {short} short-video behaviours"
    );
    eprintln!(
        "{} users' sequences match the rebuild ({live} live, {short} short-video behaviours; {} snapshots read)",
        want.len(),
        recs.len()
    );
}

fn simulate(dir: &Path, pipeline: &Path, seed: &str) -> Proc {
    simulate_for(dir, pipeline, seed, "90s")
}

/// 10 rooms and their users for `duration` of event time, at 3x.
fn simulate_for(dir: &Path, pipeline: &Path, seed: &str, duration: &str) -> Proc {
    Proc::simulate(
        dir,
        pipeline,
        &[
            "--rooms",
            "10",
            "--duration",
            duration,
            "--speed",
            "3",
            "--seed",
            seed,
            "--fps",
            "0",
        ],
    )
}

fn sent(p: &Proc, name: &str, labels: &[(&str, &str)]) -> f64 {
    p.scrape()
        .and_then(|m| common::metric(&m, name, labels))
        .unwrap_or(0.0)
}

/// User-stage changelog records the engine read back.
fn restored_users(p: &Proc) -> f64 {
    p.scrape()
        .and_then(|m| {
            common::metric(
                &m,
                "onair_state_restored_records_total",
                &[("stage", "users")],
            )
        })
        .unwrap_or(0.0)
}

fn wait_for_snapshots(p: &Proc, n: f64) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        if sent(p, "onair_sequence_snapshots_total", &[]) >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("no {n} user-sequence snapshots in 90 s:\n{}", p.log_tail());
}

#[test]
fn sequences_survive_sigkill_and_restart() {
    let dir = common::scratch("seq-kill");
    let topics = Topics {
        prefix: common::unique("seq-kill"),
    };
    let pipeline = common::pipeline(&dir, &topics, EXTRA);
    common::create_topics(&pipeline);
    let instance = ["--instance-id", "onair-0"];
    let mut first = Proc::engine_with(&dir, &pipeline, "engine-1", &instance);
    let sim = simulate(&dir, &pipeline, "31");
    wait_for_snapshots(&first, 200.0);
    first.kill9();
    let mut second = Proc::engine_with(&dir, &pipeline, "engine-2", &instance);
    sim.simulate_ok(Duration::from_secs(300));
    let want = expected(&topics);
    assert_sequences(&topics, &want, &second);
    let restored = restored_users(&second);
    assert!(restored > 0.0, "the restarted engine read no changelog");
    let too_late = sent(
        &second,
        "onair_stage_dropped_total",
        &[("stage", "user_sequences"), ("reason", "too_late")],
    );
    assert_eq!(too_late, 0.0, "actions refused as too late");
    eprintln!("restored {restored} changelog records after the SIGKILL");
    second.signal_term();
    let status = second.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit: {status}\n{}",
        second.log_tail()
    );
}

#[test]
fn sequences_move_with_their_partitions() {
    let dir = common::scratch("seq-move");
    let topics = Topics {
        prefix: common::unique("seq-move"),
    };
    let pipeline = common::pipeline(&dir, &topics, EXTRA);
    common::create_topics(&pipeline);
    let mut a = Proc::engine(&dir, &pipeline, "engine-a");
    let mut b = Proc::engine(&dir, &pipeline, "engine-b");
    let sim = simulate(&dir, &pipeline, "32");
    // Both members work for a while; then one leaves mid-run and the other
    // takes its partitions over, reading their state from the changelog.
    wait_for_snapshots(&b, 100.0);
    b.signal_term();
    let status = b.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "member b exit: {status}\n{}",
        b.log_tail()
    );
    sim.simulate_ok(Duration::from_secs(300));
    let want = expected(&topics);
    assert_sequences(&topics, &want, &a);
    let restored = restored_users(&a);
    assert!(
        restored > 0.0,
        "member a restored nothing of b's partitions\n{}",
        a.log_tail()
    );
    eprintln!("member a restored {restored} changelog records of b's partitions");
    a.signal_term();
    let status = a.wait(Duration::from_secs(30));
    assert!(status.success(), "engine exit: {status}\n{}", a.log_tail());
}

/// The fault suite's SIGKILL case for the user stage: ten SIGKILLs at random
/// moments of one run, each engine replaced by one with the same instance id
/// (a static member, as a pod keeps its name), which restores the users'
/// state from the changelog and replays. A reference group reads the same
/// input beside it, untouched, and writes what a clean run writes. Every
/// `user-sequences` snapshot and live-moment training sample of the clean
/// run must be there, byte for byte, and every other record must be an exact
/// replay of one of them; the last snapshot per user must equal the rebuild
/// from the published actions.
#[test]
fn ten_sigkills_lose_no_sequence_and_write_only_exact_replays() {
    let dir = common::scratch("seq-kills");
    let topics = Topics {
        prefix: common::unique("seq-kills"),
    };
    let clean = Topics {
        prefix: common::unique("seq-clean"),
    };
    let pipeline = common::pipeline(&dir, &topics, EXTRA);
    let reference = common::reference_pipeline(&dir, &topics, &clean, EXTRA);
    common::create_topics(&pipeline);
    common::create_topics(&reference);
    let mut reference = Proc::engine(&dir, &reference, "reference");
    let instance = ["--instance-id", "onair-0"];
    let mut engine = Proc::engine_with(&dir, &pipeline, "engine-0", &instance);
    let sim = simulate_for(&dir, &pipeline, "33", "150s");
    wait_for_snapshots(&engine, 50.0);
    let mut rng = Rng::from_clock();
    eprintln!("kill moments: seed {}", rng.0);
    let mut recoveries = Vec::new();
    let mut restored = Vec::new();
    let mut too_late = 0.0;
    for k in 1..=10 {
        std::thread::sleep(Duration::from_millis(200 + rng.below(2800)));
        too_late += sent(
            &engine,
            "onair_stage_dropped_total",
            &[("stage", "user_sequences"), ("reason", "too_late")],
        );
        engine.kill9();
        let killed = Instant::now();
        engine = Proc::engine_with(&dir, &pipeline, &format!("engine-{k}"), &instance);
        wait_for_snapshots(&engine, 1.0);
        recoveries.push(killed.elapsed());
        let users = restored_users(&engine);
        assert!(
            users > 0.0,
            "engine-{k} restored no user state\n{}",
            engine.log_tail()
        );
        restored.push(users);
    }
    sim.simulate_ok(Duration::from_secs(300));
    let want = expected(&topics);
    assert_sequences(&clean, &want, &reference);
    assert_sequences(&topics, &want, &engine);
    let mut lines = Vec::new();
    for (topic, task) in [("user-sequences", None), ("training-samples", Some(TASK))] {
        let read = |t: &Topics| {
            let recs = read_all(&t.name(topic), Duration::from_secs(5));
            match task {
                None => recs,
                Some(task) => recs
                    .into_iter()
                    .filter(|r| {
                        TrainingSample::decode(&r.payload[..]).is_ok_and(|s| s.task == task)
                    })
                    .collect(),
            }
        };
        let got = common::against_clean(&read(&clean), &read(&topics));
        assert!(got.exact() && got.clean > 0, "{topic}: {got}");
        lines.push(format!(
            "{topic}: {} of {} clean records, {} exact replays",
            got.records - got.replays,
            got.clean,
            got.replays
        ));
    }
    too_late += sent(
        &engine,
        "onair_stage_dropped_total",
        &[("stage", "user_sequences"), ("reason", "too_late")],
    );
    assert_eq!(too_late, 0.0, "actions refused as too late");
    for e in [&mut engine, &mut reference] {
        e.signal_term();
        let status = e.wait(Duration::from_secs(30));
        assert!(status.success(), "engine exit: {status}\n{}", e.log_tail());
    }
    println!(
        "fault: 10 SIGKILLs, user stage | records lost 0 | {} | changelog records restored per replacement {restored:?} | kill to first snapshot: {}",
        lines.join("; "),
        common::summary(&recoveries)
    );
}
