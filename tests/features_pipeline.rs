//! End to end through the broker: simulated rooms (H.264 video, PCM audio,
//! comments) go through the engine's features operator, which embeds frames
//! with MobileNetV2 and comments with multilingual-e5-small, batched across
//! rooms, and writes one `room-features` record per room and tick. While it
//! runs, the model directories change under it:
//! - image version 2 appears, but its model.onnx is garbage: it must fail to
//!   load, be counted, and leave version 1 serving;
//! - image version 3 and text version 2 appear (good copies): they must be
//!   swapped in without any room losing or repeating a tick.
//!
//! Needs the models from `scripts/models` and a broker (`scripts/test`
//! starts one).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{read_until, Proc, Topics};
use onair::schema::{RoomFeatures, RoomStats};
use prost::Message;

/// A version directory whose files are hard links to `from`'s (no copy).
fn link_version(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::create_dir_all(&tmp).expect("version dir");
    for e in std::fs::read_dir(from).expect("model dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::hard_link(e.path(), tmp.join(e.file_name()))
                .or_else(|_| std::fs::copy(e.path(), tmp.join(e.file_name())).map(drop))
                .expect("link model file");
        }
    }
    // Renamed into place, as an operator should, so it is never seen half-made.
    std::fs::rename(&tmp, to).expect("rename version into place");
}

fn wait_for(engine: &Proc, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + timeout;
    loop {
        if let Some(text) = engine.scrape() {
            if ok(&text) {
                return text;
            }
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}\n{}",
            engine.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn features_for_every_room_tick_across_good_and_bad_model_reloads() {
    let dir = common::scratch("features");
    let topics = Topics {
        prefix: common::unique("features"),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = dir.join("models");
    let _ = std::fs::remove_dir_all(&models);
    for name in ["image", "text"] {
        std::fs::create_dir_all(models.join(name)).expect("models dir");
        link_version(
            &root.join("models").join(name).join("1"),
            &models.join(name).join("1"),
        );
    }
    let pipeline = common::pipeline(
        &dir,
        &topics,
        &format!(
            r#"
[operators.features]
enabled = true
image_model = "{image}"
text_model = "{text}"
reload_interval_ms = 300
[operators.features.image_batch]
max_batch = 8
max_delay_ms = 20
capacity = 32
workers = 1
threads = 1
[operators.features.text_batch]
max_batch = 16
max_delay_ms = 20
capacity = 64
workers = 1
threads = 1
"#,
            image = models.join("image").display(),
            text = models.join("text").display(),
        ),
    );
    common::create_topics(&pipeline);
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let start = onair::simulator::default_start_ms().to_string();
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "3",
            "--duration",
            "40s",
            "--speed",
            "1",
            "--seed",
            "5",
            "--fps",
            "2",
            "--start-ms",
            &start,
        ],
    );
    let m = |text: &str, name: &str, labels: &[(&str, &str)]| {
        common::metric(text, name, labels).unwrap_or(0.0)
    };
    wait_for(
        &engine,
        "the first features",
        Duration::from_secs(120),
        |t| m(t, "onair_room_features_total", &[]) >= 6.0,
    );
    // A broken version: garbage where the model should be.
    let broken = models.join("image").join("2.tmp");
    std::fs::create_dir_all(&broken).expect("dir");
    std::fs::write(broken.join("model.onnx"), b"not an onnx model").expect("write");
    std::fs::rename(&broken, models.join("image").join("2")).expect("rename");
    let text = wait_for(&engine, "the failed load", Duration::from_secs(30), |t| {
        m(
            t,
            "onair_model_loads_total",
            &[("model", "image"), ("result", "failed")],
        ) >= 1.0
    });
    assert_eq!(
        m(
            &text,
            "onair_model_serving",
            &[("model", "image"), ("version", "1")]
        ),
        1.0,
        "version 1 still serves after 2 failed"
    );
    let before_swap = m(&text, "onair_room_features_total", &[]);
    // Good versions of both models.
    link_version(
        &models.join("image").join("1"),
        &models.join("image").join("3"),
    );
    link_version(
        &models.join("text").join("1"),
        &models.join("text").join("2"),
    );
    let text = wait_for(&engine, "the swaps", Duration::from_secs(60), |t| {
        m(
            t,
            "onair_model_serving",
            &[("model", "image"), ("version", "3")],
        ) == 1.0
            && m(
                t,
                "onair_model_serving",
                &[("model", "text"), ("version", "2")],
            ) == 1.0
    });
    assert_eq!(
        m(
            &text,
            "onair_model_serving",
            &[("model", "image"), ("version", "1")]
        ),
        0.0
    );
    assert!(
        sim.wait(Duration::from_secs(180)).success(),
        "{}",
        sim.log_tail()
    );
    let (metrics, feats, stats) = settle_and_stop(&mut engine, &topics, 120, |_| {});
    let by_key = one_record_per_media_tick(&feats, &stats, before_swap, 3 * 35);
    check_models_and_widths(&by_key);
    let batches = m(&metrics, "onair_batch_size_count", &[("model", "image")]);
    let frames = m(&metrics, "onair_batch_size_sum", &[("model", "image")]);
    println!(
        "image batches {batches}, mean size {:.2}; text mean size {:.2}",
        frames / batches.max(1.0),
        m(&metrics, "onair_batch_size_sum", &[("model", "text")])
            / m(&metrics, "onair_batch_size_count", &[("model", "text")]).max(1.0)
    );
    assert!(batches > 0.0);
}

/// Waits until the engine has written every tick (the count of features
/// records stops moving once the idle timeout has closed the rooms' last
/// ticks), reads back the features and room statistics, and stops the
/// engine. `each` sees every scrape. Returns (last scrape, features, stats).
fn settle_and_stop(
    engine: &mut Proc,
    topics: &Topics,
    timeout_s: u64,
    mut each: impl FnMut(&str),
) -> (String, Vec<common::Rec>, Vec<common::Rec>) {
    let count = |text: &str| common::metric(text, "onair_room_features_total", &[]).unwrap_or(0.0);
    let mut last = (-1.0, Instant::now());
    let until = Instant::now() + Duration::from_secs(timeout_s);
    let metrics = loop {
        let text = engine.scrape().unwrap_or_default();
        each(&text);
        let n = count(&text);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n > 0.0 && last.1.elapsed() > Duration::from_secs(6) {
            break text;
        }
        assert!(
            Instant::now() < until,
            "features kept coming\n{}",
            engine.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let written = count(&metrics);
    let feats = read_until(
        &topics.name("room-features"),
        Duration::from_secs(60),
        |r| r.len() as f64 >= written,
    );
    let stats = read_until(&topics.name("room-stats"), Duration::from_secs(30), |_| {
        false
    });
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit {status}\n{}",
        engine.log_tail()
    );
    (metrics, feats, stats)
}

/// Exactly one record per (room, tick), for the same (room, tick)s as the
/// room statistics' ticks with media or comments.
fn one_record_per_media_tick(
    feats: &[common::Rec],
    stats: &[common::Rec],
    before_swap: f64,
    min_ticks: usize,
) -> BTreeMap<(String, i64), RoomFeatures> {
    let mut by_key: BTreeMap<(String, i64), RoomFeatures> = BTreeMap::new();
    let mut repeated = Vec::new();
    for r in feats {
        let f = RoomFeatures::decode(&r.payload[..]).expect("room features decode");
        assert_eq!(r.key, f.room_id.as_bytes(), "keyed by room");
        assert_eq!(r.headers.get("onair-id"), Some(&f.id), "id header");
        if let Some(old) = by_key.insert((f.room_id.clone(), f.tick_start_ms), f) {
            repeated.push((old.room_id, old.tick_start_ms));
        }
    }
    assert!(repeated.is_empty(), "ticks written twice: {repeated:?}");
    let stat_keys: BTreeSet<(String, i64)> = stats
        .iter()
        .map(|r| RoomStats::decode(&r.payload[..]).expect("stats"))
        .filter(|s| s.has_audio || s.video_segments > 0 || s.comments > 0)
        .map(|s| (s.room_id, s.tick_start_ms))
        .collect();
    let feat_keys: BTreeSet<(String, i64)> = by_key.keys().cloned().collect();
    let missing: Vec<_> = stat_keys.difference(&feat_keys).collect();
    let extra: Vec<_> = feat_keys.difference(&stat_keys).collect();
    println!(
        "{} feature records for {} media ticks; {} written before the swap; missing {missing:?}; extra {extra:?}",
        by_key.len(),
        stat_keys.len(),
        before_swap
    );
    assert!(
        stat_keys.len() >= min_ticks,
        "the rooms were live: {}",
        stat_keys.len()
    );
    assert!(missing.is_empty(), "ticks without features: {missing:?}");
    assert!(
        extra.is_empty(),
        "features for ticks without media: {extra:?}"
    );
    by_key
}

fn check_models_and_widths(by_key: &BTreeMap<(String, i64), RoomFeatures>) {
    // Per room, the image model goes from version 1 to 3 once and never
    // names the broken 2; every embedding has the right width.
    let mut versions_seen = BTreeSet::new();
    let mut rooms: BTreeMap<&str, Vec<&RoomFeatures>> = BTreeMap::new();
    for f in by_key.values() {
        rooms.entry(&f.room_id).or_default().push(f);
    }
    for (room, ticks) in &rooms {
        let mut switched = false;
        for f in ticks {
            if f.frames > 0 {
                assert_eq!(f.image_embedding.len(), 1280, "{room} {}", f.tick_start_ms);
                assert!(f.image_embedding.iter().all(|v| v.is_finite()));
                match f.image_model.as_str() {
                    "image@1" => assert!(!switched, "{room}: back to version 1 after 3"),
                    "image@3" => switched = true,
                    other => panic!("{room}: image model {other:?}"),
                }
                versions_seen.insert(f.image_model.clone());
            }
            if !f.comment_embedding.is_empty() {
                assert_eq!(f.comment_embedding.len(), 384);
                assert!(f.comments > 0);
                versions_seen.insert(f.text_model.clone());
            }
            let a = f.audio.as_ref().expect("every media tick has audio");
            assert!(a.audio_ms > 0 && a.rms_dbfs.is_finite());
            assert_eq!(a.log_mel_mean.len(), 32);
            assert_eq!(a.speech_ratio, None, "speech is off in this pipeline");
        }
    }
    println!("model versions in the records: {versions_seen:?}");
    for v in ["image@1", "image@3", "text@1", "text@2"] {
        assert!(versions_seen.contains(v), "{v} made some records");
    }
}

/// Input faster than the models with tiny model queues: the operator holds
/// what a full queue refuses, the partitions stop reading (paused), and
/// still every room tick gets exactly one record.
#[test]
fn full_model_queues_pause_the_input_and_lose_nothing() {
    let dir = common::scratch("features-backpressure");
    let topics = Topics {
        prefix: common::unique("features-bp"),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = common::pipeline(
        &dir,
        &topics,
        &format!(
            r#"# (still in [runtime]) small stream buffers, so holding back shows soon
queue_capacity = 16
[operators.features]
enabled = true
image_model = "{root}/models/image"
text_model = "{root}/models/text"
reload_interval_ms = 0
[operators.features.image_batch]
max_batch = 2
max_delay_ms = 5
capacity = 2
workers = 1
threads = 1
[operators.features.text_batch]
max_batch = 2
max_delay_ms = 5
capacity = 2
workers = 1
threads = 1
"#,
            root = root.display()
        ),
    );
    common::create_topics(&pipeline);
    let start = onair::simulator::default_start_ms().to_string();
    // The whole input is in the broker before the engine starts.
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "3",
            "--duration",
            "20s",
            "--speed",
            "0",
            "--seed",
            "8",
            "--fps",
            "2",
            "--start-ms",
            &start,
        ],
    );
    assert!(
        sim.wait(Duration::from_secs(180)).success(),
        "{}",
        sim.log_tail()
    );
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let m = |text: &str, name: &str, labels: &[(&str, &str)]| {
        common::metric(text, name, labels).unwrap_or(0.0)
    };
    let mut paused_seen = 0.0f64;
    let (metrics, feats, stats) = settle_and_stop(&mut engine, &topics, 240, |text| {
        paused_seen = paused_seen.max(m(text, "onair_partitions_paused", &[]));
    });
    let refused = m(&metrics, "onair_batch_refused_total", &[]);
    let queued_max = m(&metrics, "onair_batch_queued", &[]);
    println!(
        "refused submissions {refused}; partitions paused (max seen) {paused_seen}; queued at the end {queued_max}"
    );
    assert!(refused > 0.0, "the tiny queues filled");
    assert!(paused_seen > 0.0, "a full model queue paused the input");
    let by_key = one_record_per_media_tick(&feats, &stats, f64::NAN, 3 * 18);
    assert!(by_key.len() >= 3 * 18, "{} records", by_key.len());
}
