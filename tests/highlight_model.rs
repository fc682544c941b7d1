//! The shipped highlight model (models/highlight/, the highest version) as
//! the engine runs it, on ONNX Runtime:
//! - causality: changing the features of ticks after t never changes the
//!   score of t, through the model's step and through the highlight
//!   operator (its per-room history, batching and running means);
//! - the look-back is real: changing an earlier tick does change later
//!   scores;
//! - batching rooms together gives each room the score it gets alone.
//!
//! Needs the files of `scripts/models` (ONNX Runtime); the model itself is
//! committed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onair::config::HighlightConfig;
use onair::features::row::ROW_WIDTH;
use onair::models::highlight::{HighlightModel, StepInput, StepState};
use onair::operators::highlight::{Highlight, HighlightService};
use onair::runtime::{Context, Holds, Note, Operator, Output, OutputTopic};
use onair::schema::{AudioFeatures, HighlightScore, RoomFeatures};
use prost::Message;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/highlight")
}

/// The highest numbered version directory.
fn latest_version() -> PathBuf {
    onair::models::serving::latest_version(&model_dir()).expect("a highlight version")
}

fn init() {
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
}

/// Deterministic pseudo-random numbers in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Feature records that look like the engine's: non-negative image
/// features, unit text embeddings, log-mel values, loudness.
fn features(room: &str, ticks: usize, seed: u64) -> Vec<RoomFeatures> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..ticks)
        .map(|i| {
            let excited = (i / 7) % 3 == 2;
            let mut text: Vec<f32> = (0..384).map(|_| rng.next() - 0.5).collect();
            let n = text.iter().map(|v| v * v).sum::<f32>().sqrt();
            text.iter_mut().for_each(|v| *v /= n);
            RoomFeatures {
                room_id: room.into(),
                tick_start_ms: 1_000_000 + i as i64 * 1000,
                tick_ms: 1000,
                image_embedding: (0..1280)
                    .map(|_| rng.next() * if excited { 2.0 } else { 0.8 })
                    .collect(),
                frames: 1,
                comment_embedding: text,
                comments: 2 + u32::from(excited) * 6,
                audio: Some(AudioFeatures {
                    audio_ms: 1000,
                    log_mel_mean: (0..32).map(|_| -3.0 + rng.next()).collect(),
                    log_mel_std: (0..32).map(|_| 0.5 * rng.next()).collect(),
                    rms_dbfs: if excited { -22.0 } else { -35.0 } + rng.next(),
                    peak_dbfs: -6.0,
                    speech_ratio: None,
                }),
                ..RoomFeatures::default()
            }
        })
        .collect()
}

/// Scores a room's ticks one by one through the step, as the operator does.
fn scores_by_step(model: &mut HighlightModel, records: &[RoomFeatures]) -> Vec<f32> {
    let mut sum = vec![0.0f64; ROW_WIDTH];
    let mut history: Vec<Arc<StepState>> = Vec::new();
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let x = onair::features::row::tick_row(r);
        for (s, v) in sum.iter_mut().zip(&x) {
            *s += f64::from(*v);
        }
        let streamer = sum.iter().map(|s| (s / (i + 1) as f64) as f32).collect();
        let step = model
            .step(&[StepInput {
                x,
                streamer,
                history: history.clone(),
            }])
            .expect("step");
        out.push(step[0].score);
        history.push(step[0].state.clone());
    }
    out
}

#[test]
fn scores_never_depend_on_later_ticks_and_do_depend_on_earlier_ones() {
    init();
    let mut model = HighlightModel::load(&latest_version(), 1).expect("highlight model");
    let window = model.spec().window;
    let base = features("room-a", 60, 1);
    let a = scores_by_step(&mut model, &base);
    assert!(a.iter().all(|s| (0.0..=1.0).contains(s)), "{a:?}");
    let t = 30;
    // Every tick after t replaced by another room's.
    let mut later = base.clone();
    later[t + 1..].clone_from_slice(&features("room-a", 60, 2)[t + 1..]);
    let b = scores_by_step(&mut model, &later);
    assert_eq!(a[..=t], b[..=t], "a score changed with later ticks");
    assert!(
        a[t + 1..] != b[t + 1..],
        "later ticks changed nothing after t"
    );
    // An earlier tick changes the scores of the ticks that look back on it.
    let mut earlier = base.clone();
    earlier[t - 5] = features("room-a", 60, 3)[t - 5].clone();
    let c = scores_by_step(&mut model, &earlier);
    assert_eq!(a[..t - 5], c[..t - 5]);
    let moved = (t - 4..(t - 5 + window).min(60))
        .filter(|&i| (a[i] - c[i]).abs() > 1e-6)
        .count();
    assert!(moved > 0, "no score looked back at tick {}", t - 5);
    println!("window {window}; ticks after t=5 whose score moved: {moved}");
}

#[test]
fn a_batch_of_rooms_scores_each_as_alone() {
    init();
    let mut model = HighlightModel::load(&latest_version(), 1).expect("highlight model");
    let rooms: Vec<Vec<RoomFeatures>> = (0..6)
        .map(|r| features(&format!("room-{r}"), 12 + r * 3, 10 + r as u64))
        .collect();
    let alone: Vec<Vec<f32>> = rooms
        .iter()
        .map(|r| scores_by_step(&mut model, r))
        .collect();
    // Together: each step is one batch of every room that still has a tick.
    let mut sums = vec![vec![0.0f64; ROW_WIDTH]; rooms.len()];
    let mut hist: Vec<Vec<Arc<StepState>>> = vec![Vec::new(); rooms.len()];
    let mut together: Vec<Vec<f32>> = vec![Vec::new(); rooms.len()];
    let longest = rooms.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        let live: Vec<usize> = (0..rooms.len()).filter(|&r| i < rooms[r].len()).collect();
        let inputs: Vec<StepInput> = live
            .iter()
            .map(|&r| {
                let x = onair::features::row::tick_row(&rooms[r][i]);
                for (s, v) in sums[r].iter_mut().zip(&x) {
                    *s += f64::from(*v);
                }
                StepInput {
                    x,
                    streamer: sums[r]
                        .iter()
                        .map(|s| (s / (i + 1) as f64) as f32)
                        .collect(),
                    history: hist[r].clone(),
                }
            })
            .collect();
        let out = model.step(&inputs).expect("batch");
        for (&r, o) in live.iter().zip(out) {
            together[r].push(o.score);
            hist[r].push(o.state);
        }
    }
    let worst = alone
        .iter()
        .flatten()
        .zip(together.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("largest batched-vs-alone score difference: {worst:e}");
    assert!(worst < 1e-5, "{worst}");
}

/// The highlight service on the shipped model, as the engine starts it.
fn service() -> Arc<HighlightService> {
    let cfg = HighlightConfig {
        enabled: true,
        model: model_dir().display().to_string(),
        reload_interval_ms: 0,
        ..HighlightConfig::default()
    };
    Arc::new(HighlightService::start(Arc::new(cfg)).expect("highlight service"))
}

/// Runs the operator over `records` (one room) and returns its scores.
fn scores_by_operator(svc: &Arc<HighlightService>, records: &[RoomFeatures]) -> Vec<(i64, f32)> {
    let mut op = Highlight::new(svc.clone());
    let mut outputs: Vec<Output> = Vec::new();
    {
        let mut ctx = Context::new(&mut outputs, 0, 1000);
        op.on_start(&mut ctx);
        for r in records {
            op.on_note(
                &Note::Features {
                    record: Arc::new(r.clone()),
                    holds: Holds::default(),
                },
                &mut ctx,
            );
            op.poll(&mut ctx);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.pending() > 0 {
        assert!(Instant::now() < deadline, "the model never answered");
        std::thread::sleep(Duration::from_millis(5));
        let mut ctx = Context::new(&mut outputs, 0, 1000);
        op.poll(&mut ctx);
    }
    outputs
        .iter()
        .filter(|o| o.topic == OutputTopic::HighlightScores)
        .map(|o| {
            let s = HighlightScore::decode(&o.payload[..]).expect("score record");
            (s.tick_start_ms, s.score)
        })
        .collect()
}

#[test]
fn the_operator_scores_causally() {
    init();
    let svc = service();
    let base = features("room-b", 50, 4);
    let a = scores_by_operator(&svc, &base);
    assert_eq!(a.len(), 50);
    let t = 25;
    let mut later = base.clone();
    later[t + 1..].clone_from_slice(&features("room-b", 50, 5)[t + 1..]);
    let b = scores_by_operator(&svc, &later);
    assert_eq!(a[..=t], b[..=t]);
    assert!(a[t + 1..] != b[t + 1..]);
    // The operator's scores are the step's.
    let mut model = HighlightModel::load(&latest_version(), 1).expect("highlight model");
    let direct = scores_by_step(&mut model, &base);
    for ((_, op), st) in a.iter().zip(&direct) {
        assert!((op - st).abs() < 1e-6, "{op} vs {st}");
    }
}

#[test]
fn a_room_ahead_of_the_model_congests_the_partition_until_it_catches_up() {
    init();
    let svc = service();
    let mut op = Highlight::new(svc);
    let mut outputs: Vec<Output> = Vec::new();
    let mut ctx = Context::new(&mut outputs, 0, 1000);
    op.on_start(&mut ctx);
    // Ten ticks arrive before the model has answered one.
    for r in features("room-c", 10, 6) {
        op.on_note(
            &Note::Features {
                record: Arc::new(r),
                holds: Holds::default(),
            },
            &mut ctx,
        );
    }
    assert!(op.congested(), "ten ticks waiting and not congested");
    assert_eq!(op.pending(), 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.pending() > 0 {
        assert!(Instant::now() < deadline, "the model never answered");
        std::thread::sleep(Duration::from_millis(5));
        op.poll(&mut ctx);
    }
    assert!(!op.congested());
    assert_eq!(
        outputs
            .iter()
            .filter(|o| o.topic == OutputTopic::HighlightScores)
            .count(),
        10
    );
}

/// The shipped model with its thresholds lowered (a copy of its version
/// with `enter` 0.225, `exit` 0.221), so that the synthetic ticks of
/// [`features`] (seed 7), which score 0.19 to 0.24, open a highlight at
/// tick 54, write it open at 58 and closed at 73.
fn low_threshold_service() -> Arc<HighlightService> {
    let dir = std::env::temp_dir().join(format!("onair-highlight-{}", std::process::id()));
    let version = dir.join("1");
    std::fs::create_dir_all(&version).expect("model copy");
    std::fs::copy(
        latest_version().join("model.onnx"),
        version.join("model.onnx"),
    )
    .expect("copy the model");
    let meta = std::fs::read_to_string(latest_version().join("highlight.json")).expect("meta");
    let mut meta: serde_json::Value = serde_json::from_str(&meta).expect("highlight.json");
    meta["threshold"]["enter"] = 0.225.into();
    meta["threshold"]["exit"] = 0.221.into();
    std::fs::write(version.join("highlight.json"), meta.to_string()).expect("write meta");
    let cfg = HighlightConfig {
        enabled: true,
        model: dir.display().to_string(),
        reload_interval_ms: 0,
        ..HighlightConfig::default()
    };
    Arc::new(HighlightService::start(Arc::new(cfg)).expect("highlight service"))
}

/// Feeds `records` to `op` as features notes, waiting for the model's
/// answer after each unless `hold` says to leave it (ticks then wait in the
/// room's queue).
fn feed(op: &mut Highlight, records: &[RoomFeatures], outputs: &mut Vec<Output>, hold: bool) {
    for r in records {
        op.on_note(
            &Note::Features {
                record: Arc::new(r.clone()),
                holds: Holds::default(),
            },
            &mut Context::new(outputs, 0, 1000),
        );
        if !hold {
            settle(op, outputs);
        }
    }
}

/// Waits until the operator has nothing with the model.
fn settle(op: &mut Highlight, outputs: &mut Vec<Output>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.pending() > 0 {
        assert!(Instant::now() < deadline, "the model never answered");
        std::thread::sleep(Duration::from_millis(5));
        let mut ctx = Context::new(outputs, 0, 1000);
        op.poll(&mut ctx);
    }
}

/// The scores and events among `outputs`, by id.
fn written(outputs: &[Output]) -> std::collections::BTreeMap<String, Vec<u8>> {
    outputs
        .iter()
        .filter(|o| {
            matches!(
                o.topic,
                OutputTopic::HighlightScores | OutputTopic::Highlights
            )
        })
        // An event's open and closed records share the id; the header tells them apart.
        .map(|o| (format!("{}/{:?}", o.id, o.headers), o.payload.clone()))
        .collect()
}

/// Highlight state on the changelog: a room's state taken while ticks still
/// wait for the model, restored into a new operator and fed the features
/// again from ten ticks before, makes exactly the scores and events (same
/// ids, same bytes) the uninterrupted operator made after the snapshot.
#[test]
fn a_restored_room_scores_exactly_as_the_uninterrupted_one() {
    init();
    let svc = low_threshold_service();
    let records = features("room-d", 80, 7);
    // The highlight opened at tick 54 is open, not yet written, when the
    // record is taken.
    let (at, from) = (60, 50);
    let cut = onair::state::Cut {
        processed: Default::default(),
        next_tick_ms: Some(records[at].tick_start_ms),
        stream_time_ms: None,
    };
    let mut a = Highlight::new(svc.clone());
    let mut out_a: Vec<Output> = Vec::new();
    a.on_start(&mut Context::new(&mut out_a, 0, 1000));
    feed(&mut a, &records[..at - 4], &mut out_a, false);
    // Four ticks wait for the model when the record is taken.
    feed(&mut a, &records[at - 4..at], &mut out_a, true);
    assert!(a.pending() > 0);
    let before = out_a.len();
    a.snapshot(&cut, &mut Context::new(&mut out_a, 0, 1000));
    let changelog: Vec<Output> = out_a.drain(before..).collect();
    assert!(changelog
        .iter()
        .all(|o| o.topic == OutputTopic::RoomChangelog { partition: 0 }));
    assert_eq!(changelog.len(), 2, "the room's record and the partition's");
    let mut held = Holds::default();
    a.holds(&mut held);
    assert_eq!(held, Holds::default(), "nothing held once written");
    feed(&mut a, &records[at..], &mut out_a, false);
    settle(&mut a, &mut out_a);
    let written_before = written(&out_a[..before]);
    let after: std::collections::BTreeMap<_, _> = written(&out_a)
        .into_iter()
        .filter(|(id, _)| !written_before.contains_key(id))
        .collect();

    let mut b = Highlight::new(svc);
    let mut out_b: Vec<Output> = Vec::new();
    b.on_start(&mut Context::new(&mut out_b, 0, 1000));
    for o in &changelog {
        let (name, key) = onair::runtime::split_changelog_key(&o.key).expect("changelog key");
        assert_eq!(name, b"highlight");
        b.restore(key, &o.payload, None);
    }
    b.poll(&mut Context::new(&mut out_b, 0, 1000));
    feed(&mut b, &records[from..], &mut out_b, false);
    settle(&mut b, &mut out_b);
    let replayed = written(&out_b);
    let events = after.keys().filter(|k| !k.ends_with("/[]")).count();
    eprintln!(
        "{} scores and {events} event records after the snapshot",
        after.len() - events
    );
    assert_eq!(
        after.len() - events,
        80 - (at - 4),
        "scores after the snapshot"
    );
    assert_eq!(events, 2, "the highlight's open and closed records");
    assert_eq!(replayed, after);
}
