//! End to end through the broker: simulated rooms with known highlights
//! (H.264 video, PCM audio, comments, viewers; no speech, as the shipped
//! model was trained) go through the features, highlight and highlight-label
//! operators. Checked:
//! - every room tick gets one highlight score, in event time;
//! - the highlight events on `highlights` match the simulator's highlight
//!   intervals (IoU >= 0.5) at the rate the model card promises for
//!   held-out rooms: precision and recall each at least the card's figure
//!   minus two standard errors of the difference between this run's estimate
//!   and the card's (binomial, at this run's counts and the card's: about 11
//!   highlights here, 18 on the card; one miss moves recall by 0.09 and the
//!   recall tolerance is about 0.38). The run is deterministic for its seed,
//!   so it is not flaky, but a small sample is what it is: the simulator's
//!   genre change moved it from 3 to 2 matched highlights;
//! - events are in event time, tick-aligned, inside the broadcast, one per
//!   highlight id, with their peak inside them and the peak's comments;
//! - training samples come with the long-view-through rate and the feature row.
//!
//! Needs the models from `scripts/models`, the committed highlight model and
//! a broker (`scripts/test` starts one).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{read_until, Proc, Topics};
use onair::schema::{HighlightEvent, HighlightScore, TrainingSample};
use prost::Message;

/// Two standard errors of the difference between a rate `p` measured on `n`
/// trials here and the card's own estimate of it on `n_card` trials (both are
/// samples: with 11 highlights here and 18 on the card, either alone is off by a
/// few events).
fn tolerance(p: f64, n: usize, n_card: usize) -> f64 {
    let var = p * (1.0 - p);
    2.0 * (var / n.max(1) as f64 + var / n_card.max(1) as f64).sqrt()
}
const ROOMS: usize = 6;
const SECONDS: i64 = 150;

/// The model card's event-level figures on held-out rooms, as the exported
/// highlight.json of the serving version records them.
/// Precision, recall, and the events and highlights they were measured on.
fn card_figures(version: &Path) -> (f64, f64, usize, usize) {
    let text = std::fs::read_to_string(version.join("highlight.json")).expect("highlight.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let ev = &v["card"]["event"];
    let p = ev["precision"].as_f64().expect("card.event.precision");
    let r = ev["recall"].as_f64().expect("card.event.recall");
    let n = |k: &str| ev[k].as_u64().unwrap_or(1) as usize;
    (p, r, n("predicted"), n("true"))
}

fn iou(a: (i64, i64), b: (i64, i64)) -> f64 {
    let inter = (a.1.min(b.1) - a.0.max(b.0)).max(0) as f64;
    let union = ((a.1 - a.0) + (b.1 - b.0)) as f64 - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy one-to-one matching by IoU (>= 0.5): matched pairs.
fn matches(pred: &[(String, i64, i64)], truth: &[(String, i64, i64)]) -> usize {
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for (i, p) in pred.iter().enumerate() {
        for (j, t) in truth.iter().enumerate() {
            if p.0 == t.0 {
                let o = iou((p.1, p.2), (t.1, t.2));
                if o >= 0.5 {
                    pairs.push((o, i, j));
                }
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_p, mut used_t) = (vec![false; pred.len()], vec![false; truth.len()]);
    let mut n = 0;
    for (_, i, j) in pairs {
        if !used_p[i] && !used_t[j] {
            used_p[i] = true;
            used_t[j] = true;
            n += 1;
        }
    }
    n
}

/// The pipeline's operators: features, highlight and highlight labels, on
/// the shipped models, over small video.
fn extra(models: &Path) -> String {
    format!(
        r#"
[simulator]
comments_per_sec = 3.0
viewers = 60
video_width = 256
video_height = 144
video_fps = 5
segment_ms = 2000
video_variants = 12
[operators.features]
enabled = true
image_model = "{image}"
text_model = "{text}"
reload_interval_ms = 0
[operators.highlight]
enabled = true
model = "{highlight}"
reload_interval_ms = 0
[operators.highlight_labels]
enabled = true
"#,
        image = models.join("image").display(),
        text = models.join("text").display(),
        highlight = models.join("highlight").display(),
    )
}

#[test]
fn highlight_events_match_the_simulated_highlights() {
    let dir = common::scratch("highlight");
    let topics = Topics {
        prefix: common::unique("highlight"),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join("models");
    let pipeline = common::pipeline(&dir, &topics, &extra(&models));
    common::create_topics(&pipeline);
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let start_ms = onair::simulator::default_start_ms();
    let truth_path = dir.join("truth.jsonl");
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            &ROOMS.to_string(),
            "--duration",
            &format!("{SECONDS}s"),
            "--speed",
            "0",
            "--seed",
            "77",
            "--no-speech",
            "--start-ms",
            &start_ms.to_string(),
            "--truth",
            truth_path.to_str().expect("path"),
        ],
    );
    assert!(
        sim.wait(Duration::from_secs(300)).success(),
        "{}",
        sim.log_tail()
    );
    // Every room tick scored: wait for the count to settle.
    let scored = |t: &str| common::metric(t, "onair_highlight_scores_total", &[]).unwrap_or(0.0);
    let until = Instant::now() + Duration::from_secs(600);
    let mut last = (-1.0, Instant::now());
    let metrics = loop {
        let text = engine.scrape().unwrap_or_default();
        let n = scored(&text);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n >= (ROOMS as f64) * (SECONDS as f64 - 5.0)
            && last.1.elapsed() > Duration::from_secs(8)
        {
            break text;
        }
        assert!(
            Instant::now() < until,
            "scores did not settle ({n})\n{}",
            engine.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let written = scored(&metrics);
    let scores = read_until(
        &topics.name("highlight-scores"),
        Duration::from_secs(60),
        |r| r.len() as f64 >= written,
    );
    let events = read_until(&topics.name("highlights"), Duration::from_secs(15), |_| {
        false
    });
    let samples = read_until(
        &topics.name("training-samples"),
        Duration::from_secs(15),
        |_| false,
    );
    engine.signal_term();
    assert!(engine.wait(Duration::from_secs(60)).success());

    // One score per room tick, in [0, 1], tick-aligned, inside the broadcast.
    let mut per_tick: BTreeMap<(String, i64), f32> = BTreeMap::new();
    for r in &scores {
        let s = HighlightScore::decode(&r.payload[..]).expect("score decodes");
        assert_eq!(r.key, s.room_id.as_bytes());
        assert!((0.0..=1.0).contains(&s.score));
        assert_eq!(s.tick_start_ms % 1000, 0);
        assert!((start_ms..start_ms + SECONDS * 1000).contains(&s.tick_start_ms));
        assert!(
            per_tick
                .insert((s.room_id.clone(), s.tick_start_ms), s.score)
                .is_none(),
            "tick scored twice"
        );
    }
    assert!(per_tick.len() >= ROOMS * (SECONDS as usize - 5));

    // Events: the last record per id; closed ones are the detections.
    let mut by_id: BTreeMap<String, HighlightEvent> = BTreeMap::new();
    for r in &events {
        let e = HighlightEvent::decode(&r.payload[..]).expect("event decodes");
        assert_eq!(r.key, e.room_id.as_bytes());
        by_id.insert(e.id.clone(), e);
    }
    let mut pred = Vec::new();
    for e in by_id.values() {
        assert!(e.model_version.starts_with("highlight@"), "{e:?}");
        assert_eq!(e.start_time_ms % 1000, 0);
        assert!(e.start_time_ms >= start_ms);
        assert!(e.peak_time_ms >= e.start_time_ms);
        if e.end_time_ms == 0 {
            continue; // still open when the broadcast ended
        }
        assert!(e.end_time_ms > e.start_time_ms && e.end_time_ms <= start_ms + SECONDS * 1000);
        assert!(e.peak_time_ms < e.end_time_ms);
        let peak = per_tick[&(e.room_id.clone(), e.peak_time_ms)];
        assert_eq!(peak, e.peak_score, "peak score is the peak tick's score");
        pred.push((e.room_id.clone(), e.start_time_ms, e.end_time_ms));
    }
    let with_comments = by_id
        .values()
        .filter(|e| !e.top_comments.is_empty())
        .count();
    let truth_text = std::fs::read_to_string(&truth_path).expect("truth");
    let truth: Vec<(String, i64, i64)> = truth_text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "highlight")
        .map(|v| {
            (
                v["room_id"].as_str().unwrap_or_default().to_string(),
                v["start_ms"].as_i64().unwrap_or_default(),
                v["end_ms"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    let hit = matches(&pred, &truth);
    let precision = hit as f64 / pred.len().max(1) as f64;
    let recall = hit as f64 / truth.len().max(1) as f64;
    let version = onair::models::serving::latest_version(&models.join("highlight"))
        .expect("a highlight version");
    let (card_p, card_r, card_pred, card_true) = card_figures(&version);
    let (tol_p, tol_r) = (
        tolerance(card_p, pred.len(), card_pred),
        tolerance(card_r, truth.len(), card_true),
    );
    println!(
        "{} truth highlights, {} detected ({} with top comments), {hit} matched: precision {precision:.2} (card {card_p:.2} +- {tol_p:.2}), recall {recall:.2} (card {card_r:.2} +- {tol_r:.2})",
        truth.len(),
        pred.len(),
        with_comments
    );
    assert!(truth.len() >= ROOMS, "the simulator gives 1-3 per room");
    assert!(!pred.is_empty(), "no highlight detected");
    assert!(
        precision >= card_p - tol_p && recall >= card_r - tol_r,
        "events {pred:?}\ntruth {truth:?}"
    );
    // A real highlight has its burst of repeated comments at the peak; a
    // false detection in a quiet stretch may have none. So: most events carry
    // comments, or at least as many as matched a real highlight (one CI run
    // under load: 5 events, 2 matched, 2 with comments).
    assert!(
        with_comments * 2 >= by_id.len() || (hit > 0 && with_comments >= hit),
        "too few events carry comments: {with_comments} of {} ({hit} matched a highlight)",
        by_id.len()
    );

    // Training samples: the rate, the counts and the row.
    assert!(!samples.is_empty(), "no training samples");
    let mut labelled = 0;
    for r in &samples {
        let s = TrainingSample::decode(&r.payload[..]).expect("sample decodes");
        assert_eq!(s.task, "highlight");
        assert_eq!(s.features.len(), onair::features::row::ROW_WIDTH);
        assert!(s.long_views <= s.impressions);
        if s.impressions > 0 {
            labelled += 1;
            let rate = s.long_views as f32 / s.impressions as f32;
            assert!((s.label - rate).abs() < 1e-6);
        }
        assert!((start_ms..start_ms + SECONDS * 1000).contains(&s.event_time_ms));
    }
    println!(
        "{} training samples, {labelled} with impressions",
        samples.len()
    );
    assert!(labelled > 0);
}

/// Highlight detection under SIGKILL through the broker: the engine is killed
/// four times at random moments while it works through the rooms' video,
/// comments and viewers (features, highlight and highlight labels on the
/// shipped models), each time replaced by one with the same instance id,
/// which restores the room changelog and replays. A reference group reads the
/// same input beside it, untouched. Every record the reference writes on
/// `room-features`, `highlight-scores`, `highlights` (open and closed),
/// `training-samples` and `room-stats` must be there, with nothing else,
/// byte for byte: every extra record is an exact replay. The training
/// samples include MMBee's (content segments, gifts, labelled pairs) and the
/// user stage's live moments. The user stage runs too: the rooms' scores the
/// room stage writes to `room-embeddings` and the behaviour sequences on
/// `user-sequences`, whose live entries carry the room's score as of the
/// entry, must be the reference's byte for byte as well.
#[test]
fn highlights_after_sigkills_are_what_a_clean_run_writes() {
    const KILL_ROOMS: usize = 4;
    const KILL_SECONDS: i64 = 90;
    let (dir, topics, clean) = common::kill_case("highlight");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    // MMBee's training data too (content segments, gifts, labelled pairs;
    // no model: no scoring), and the user stage's behaviour sequences, whose
    // live entries carry the room's highlight score as of the entry (from
    // the room table: the room stage writes the scores there).
    let extra = format!(
        "{}\n[operators.mmbee]\nenabled = true\nsamples = true\nmodel = \"\"\n\
         [operators.user_sequences]\nenabled = true\nsamples = true\n",
        extra(&models)
    );
    let pipeline = common::pipeline(&dir, &topics, &extra);
    let reference = common::reference_pipeline(&dir, &topics, &clean, &extra);
    // The user stage's event-time order across rooms holds within the
    // allowed lateness, and a restarted room stage drains its backlog with
    // its partitions apart (see the MMBee kill case).
    const LATENESS_S: u64 = 60;
    common::set_lateness(&[&pipeline, &reference], LATENESS_S);
    common::create_topics(&pipeline);
    common::create_topics(&reference);
    let mut reference = Proc::engine(&dir, &reference, "reference");
    let instance = ["--instance-id", "onair-0"];
    let engine = Proc::engine_with(&dir, &pipeline, "engine-0", &instance);
    let scored = |p: &Proc| {
        p.scrape()
            .and_then(|t| common::metric(&t, "onair_highlight_scores_total", &[]))
            .unwrap_or(0.0)
    };
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            &KILL_ROOMS.to_string(),
            "--duration",
            &format!("{KILL_SECONDS}s"),
            "--speed",
            "2",
            "--seed",
            "78",
            "--no-speech",
        ],
    );
    common::wait_for_count(&engine, 20.0, "no scores from the first engine", &scored);
    let (mut engine, recoveries) =
        common::kill_and_replace(engine, &dir, &pipeline, &instance, 4, (1000, 5000), &scored);
    assert!(
        sim.wait(Duration::from_secs(300)).success(),
        "{}",
        sim.log_tail()
    );
    // The reference settles first; then the killed engine's topics must
    // hold every record it wrote.
    let outputs = [
        "room-features",
        "highlight-scores",
        "highlights",
        "training-samples",
        "room-stats",
    ];
    let settle = |t: &Topics, topic: &str, at_least: usize| {
        let mut last = (0, Instant::now());
        read_until(&t.name(topic), Duration::from_secs(600), |recs| {
            if recs.len() != last.0 {
                last = (recs.len(), Instant::now());
            }
            recs.len() >= at_least && last.1.elapsed() > Duration::from_secs(10)
        })
    };
    let mut lines = Vec::new();
    let mut events = 0;
    for topic in outputs {
        let want = if topic == "highlight-scores" {
            KILL_ROOMS * (KILL_SECONDS as usize - 5)
        } else {
            1
        };
        let clean_recs = settle(&clean, topic, want);
        let faulted = settle(&topics, topic, clean_recs.len());
        // A highlight is written open and then closed under one id.
        let got = common::against_clean_by(&clean_recs, &faulted, |r| {
            let id = r.headers.get("onair-id").cloned().unwrap_or_default();
            if topic == "highlights" {
                let e = HighlightEvent::decode(&r.payload[..]).expect("highlight");
                format!("{id}/{}-{}", e.start_time_ms, e.end_time_ms)
            } else {
                id
            }
        });
        // Ids: nothing lost, nothing extra, whatever the topic.
        assert!(
            got.lost.is_empty() && got.extra.is_empty() && got.clean > 0,
            "{topic}: {got}\n{}",
            engine.log_tail()
        );
        // Bytes: every record is the clean run's exactly, embeddings
        // included (the text encoder gives a comment the same bits in any
        // batch), so every extra record is an exact replay.
        let differing: Vec<&String> = got.differ.iter().chain(&got.conflicts).collect();
        if topic == "room-features" && !differing.is_empty() {
            name_feature_difference(&clean_recs, &faulted);
        }
        assert!(
            differing.is_empty(),
            "{topic}: {} records differ from the clean run's bytes, e.g. {:?} ({})",
            differing.len(),
            differing.first(),
            lines.join(", ")
        );
        if topic == "training-samples" {
            let tasks = task_counts(&clean_recs);
            for task in [
                "mmbee",
                "mmbee-gifts",
                "mmbee-content",
                "highlight",
                "live-moment",
            ] {
                assert!(
                    tasks.get(task).is_some_and(|&n| n > 0),
                    "no {task} samples in the clean run: {tasks:?}"
                );
            }
            lines.push(format!("samples by task {tasks:?}"));
        }
        if topic == "highlights" {
            events = got.clean;
        }
        lines.push(format!(
            "{topic} {} ({} replays, {} with other bytes)",
            got.clean,
            got.replays,
            differing.len()
        ));
    }
    assert!(
        events > 0,
        "no highlight written: the hysteresis went untested"
    );
    // The user stage: the rooms' scores it read (the progress records are
    // not replays: which values are written depends on when ticks close),
    // and the sequences, whose entries carry them, byte for byte.
    let compare = |topic: &str, skip| common::compare_topic(&clean, &topics, topic, skip);
    let scores = compare("room-embeddings", |r| r.key.first() == Some(&0));
    assert!(
        scores.exact() && scores.clean > 0,
        "room-embeddings: {scores}"
    );
    let clean_sequences = settle(&clean, "user-sequences", 1);
    let with_score = clean_sequences
        .iter()
        .filter(|r| {
            onair::schema::UserSequence::decode(&r.payload[..])
                .is_ok_and(|s| s.behaviours.iter().any(|b| b.highlight_score.is_some()))
        })
        .count();
    settle(&topics, "user-sequences", clean_sequences.len());
    let sequences = compare("user-sequences", |_| false);
    assert!(
        sequences.exact() && with_score > 0,
        "user-sequences: {sequences}; {with_score} snapshots with a highlight score\n{}",
        engine.log_tail()
    );
    lines.push(format!(
        "room-embeddings scores {} ({} replays), user-sequences {} ({} replays, {with_score} with a score)",
        scores.clean, scores.replays, sequences.clean, sequences.replays
    ));
    engine.stop();
    reference.stop();
    println!(
        "fault: 4 SIGKILLs, features, highlight and user sequences | records lost 0 | {} | kill to first score: {}",
        lines.join(", "),
        common::summary(&recoveries)
    );
}

/// Panics naming the room, tick and part of the first `room-features`
/// record of `faulted` whose counts, models or embeddings differ from the
/// record of the same id in `clean`.
fn name_feature_difference(clean: &[common::Rec], faulted: &[common::Rec]) {
    use onair::schema::RoomFeatures;
    let decode = |recs: &[common::Rec]| -> BTreeMap<String, RoomFeatures> {
        recs.iter()
            .map(|r| RoomFeatures::decode(&r.payload[..]).expect("room features"))
            .map(|f| (f.id.clone(), f))
            .collect()
    };
    let want = decode(clean);
    for r in faulted {
        let f = RoomFeatures::decode(&r.payload[..]).expect("room features");
        let Some(w) = want.get(&f.id) else { continue };
        assert_eq!(
            (
                f.frames,
                f.comments,
                f.transcripts,
                &f.image_model,
                &f.text_model
            ),
            (
                w.frames,
                w.comments,
                w.transcripts,
                &w.image_model,
                &w.text_model
            ),
            "{} (room {}, tick {}, offset {} of room-features)",
            f.id,
            f.room_id,
            f.tick_start_ms,
            r.offset
        );
        for (name, a, b) in [
            ("image", &f.image_embedding, &w.image_embedding),
            ("comment", &f.comment_embedding, &w.comment_embedding),
            (
                "transcript",
                &f.transcript_embedding,
                &w.transcript_embedding,
            ),
        ] {
            assert_eq!(a.len(), b.len(), "{}", f.id);
            for (x, y) in a.iter().zip(b) {
                let d = (x - y).abs();
                assert!(
                    d == 0.0,
                    "{} (room {}, tick {}, offset {} of room-features): {name} embedding differs by {d:e}",
                    f.id,
                    f.room_id,
                    f.tick_start_ms,
                    r.offset
                );
            }
        }
    }
}

/// Training samples per task.
fn task_counts(recs: &[common::Rec]) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for r in recs {
        let s = TrainingSample::decode(&r.payload[..]).expect("training sample");
        *n.entry(s.task).or_default() += 1;
    }
    n
}
