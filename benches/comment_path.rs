//! Benchmark: the comment path through the broker (consume, per-room state,
//! produce), as a ratio to a raw rdkafka consumer reading the same topic in
//! the same run, plus peak RSS. Aim: the engine reaches at least 0.8 of the
//! raw consumer's rate.
//!
//! What it does:
//! 1. uses the broker in `ONAIR_BROKERS`, or starts one with `scripts/broker`
//!    in a temp state dir (stopped at the end, also on panic);
//! 2. creates unique topics (4 partitions) and produces `ONAIR_BENCH_COMMENTS`
//!    protobuf comments (default 1,000,000) keyed by 200 rooms from 5,000 users,
//!    with event times spread over 300 s from now (to the minute), ending
//!    with one comment per room 5 s later so every tick closes; the video,
//!    audio and actions topics exist but stay empty;
//! 3. alternates, `ONAIR_BENCH_RUNS` times each (default 3): a raw
//!    `BaseConsumer` in a child process (this binary again) that reads every
//!    comment and touches its payload, timed from `assign` (and from its
//!    first message) to its last; then the real `onair run` binary with room
//!    activity on, timed by
//!    scraping its `/metrics` every 100 ms (`ONAIR_BENCH_SCRAPE_MS`) from the first record the source
//!    received (and from its partitions' assignment) until the source, and
//!    then the room-activity operator, have seen them all;
//! 4. prints per-run rates, medians, the median ratio and peak RSS (`VmHWM`).
//!    The headline ratio times both from the assignment to the last record,
//!    fetches included; first-to-last ratios are printed alongside.
//!
//! Run: `cargo bench --bench comment_path` (it builds `onair` in release mode
//! first). Each engine run's log and metrics timeline (CSV) are kept under
//! `target/tmp/`. `ONAIR_BENCH_PERF=<path prefix>` records each engine run
//! with `perf record` (options in `ONAIR_BENCH_PERF_ARGS`, default
//! `-F 499 -g`); `ONAIR_BENCH_RUNTIME` adds `[runtime]` settings to
//! the pipeline (`;`-separated, e.g. `max_wait_ms = 100; queue_capacity = 8192`).
//!
//! Not for: absolute throughput claims. noida-db (the local broker) answers a
//! fetch with everything a partition holds, spins consumers that are caught
//! up and rewrites its state file under load, so only the ratio to the raw
//! consumer on the same broker in the same run means something. On noida
//! the raw consumer's first fetch can bring the whole topic, so its
//! first-to-last time is then librdkafka iterating in memory (it swung from
//! 0.57 to 1.34 M/s between runs): hence the headline from `assign`.
//!
//! The user path (`ONAIR_BENCH_PATH=users`): the same harness with
//! short-video actions (`ONAIR_BENCH_COMMENTS` of them, keyed by 5,000 users:
//! impressions, plays, likes, comments and shares of 2,000 videos by 200
//! authors, over the same 300 s) through the user stage, whose
//! `user_sequences` operator is the one timed (compressed interests on, with
//! the committed model); the sink writes each changed user's snapshot and
//! changelog record per tick. Actions per second per core: the operator's
//! count over the engine's CPU seconds, printed with the rest.
//!
//! Env: `ONAIR_BENCH_PATH` (`comments`, default, or `users`),
//! `ONAIR_BENCH_COMMENTS` (default 1,000,000), `ONAIR_BENCH_RUNS` (3),
//! `ONAIR_BENCH_SCRAPE_MS` (100), `ONAIR_WORKERS` (the engine's async
//! threads).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use onair::config::KafkaConfig;
use onair::kafka::{client_config, ensure_topics, pipeline_topics};
use onair::schema::Comment;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Which path is measured (`ONAIR_BENCH_PATH`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Comments through the room stage's room_activity operator.
    Comments,
    /// Short-video actions through the user stage's user_sequences operator.
    Users,
}

fn route() -> Route {
    match std::env::var("ONAIR_BENCH_PATH").as_deref() {
        Ok("users") => Route::Users,
        _ => Route::Comments,
    }
}

impl Route {
    /// The operator timed.
    fn operator(self) -> &'static str {
        match self {
            Route::Comments => "room_activity",
            Route::Users => "user_sequences",
        }
    }

    /// The input topic.
    fn topic(self, k: &KafkaConfig) -> String {
        match self {
            Route::Comments => k.topics.comments.clone(),
            Route::Users => k.topics.short_video_actions.clone(),
        }
    }

    /// What its records are.
    fn records(self) -> &'static str {
        match self {
            Route::Comments => "comments",
            Route::Users => "short-video actions",
        }
    }
}

/// Set in the raw-consumer child process.
const ROLE_ENV: &str = "ONAIR_BENCH_ROLE";
const PARTITIONS: i32 = 4;
const ROOMS: u32 = 200;
const USERS: u32 = 5000;
const SPAN_MS: i64 = 300_000;
/// Event time of the closing comments after the last regular one: more than
/// a tick plus the allowed lateness (1 s + 2 s by default).
const CLOSE_AFTER_MS: i64 = 5_000;
/// How often the engine's /metrics is read (`ONAIR_BENCH_SCRAPE_MS`): each
/// scrape renders every metric on the engine's own threads, so scraping
/// much more often than Prometheus would slows down what is measured.
fn scrape_every() -> Duration {
    Duration::from_millis(env_num("ONAIR_BENCH_SCRAPE_MS", 100).max(5))
}
/// librdkafka settings of the engine's consumer that matter on noida-db.
const RECEIVE_MAX: &str = "1000000000";
const FETCH_MAX: &str = "16777216";

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("raw") {
        raw_child();
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("comment_path: skipped (run it with `cargo bench --bench comment_path`)");
        return;
    }
    let n: u64 = env_num("ONAIR_BENCH_COMMENTS", 1_000_000).max(u64::from(ROOMS) * 2);
    let runs = env_num("ONAIR_BENCH_RUNS", 3).max(1) as usize;
    let started = Instant::now();

    let scratch = Scratch::new();
    let binary = engine_binary();
    let broker = Broker::from_env_or_start(&scratch.path);
    let brokers = broker.address.clone();

    let prefix = unique("onair-bench");
    let kafka = kafka_config(&brokers, &prefix);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut specs = pipeline_topics(&kafka);
    for s in &mut specs {
        s.configs.push(("retention.ms", "-1"));
    }
    rt.block_on(ensure_topics(&kafka, &specs))
        .expect("create the benchmark topics");
    drop(specs);
    let _topics = TopicsGuard {
        kafka: kafka.clone(),
    };

    let start_ms = now_ms() - now_ms().rem_euclid(60_000);
    let produced = produce(&kafka, n, start_ms);
    println!(
        "comment_path: {n} {} ({} bytes of payload) produced to {} in {:.1} s ({:.0}/s); broker {} ({})",
        route().records(),
        produced.bytes,
        route().topic(&kafka),
        produced.wall.as_secs_f64(),
        n as f64 / produced.wall.as_secs_f64(),
        brokers,
        if broker.owned { "started by the bench" } else { "ONAIR_BROKERS" },
    );

    let pipeline = scratch.path.join("pipeline.toml");
    std::fs::write(&pipeline, pipeline_toml(&kafka)).expect("write the pipeline file");
    let timelines = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-timelines"));
    std::fs::create_dir_all(&timelines).expect("timeline dir");

    let mut raws = Vec::new();
    let mut engines = Vec::new();
    for run in 1..=runs {
        let raw = raw_run(
            &brokers,
            &route().topic(&kafka),
            n,
            &format!("{prefix}-raw-{run}"),
        );
        println!(
            "  run {run} raw consumer: {} in {:.3} s = {}/s ({:.3} s = {}/s counting from assign, fetches included), cpu {:.2} s, peak RSS {}",
            raw.count,
            raw.secs,
            k(raw.rate()),
            raw.from_assign_secs,
            k(raw.count as f64 / raw.from_assign_secs),
            raw.cpu_s,
            mb(raw.hwm_kb)
        );
        raws.push(raw);
        let eng = engine_run(&EngineRun {
            binary: &binary,
            dir: &timelines,
            pipeline: &pipeline,
            brokers: &brokers,
            group: &format!("{prefix}-engine-{run}"),
            n,
            run,
            timeline: &timelines.join(format!("engine-run{run}.csv")),
        });
        println!("  run {run} engine:       {}", eng.describe(n));
        engines.push(eng);
    }

    // Headline: both timed from the assignment to the last record, fetches
    // included. (noida answers the first fetch with most of a partition, so
    // the raw consumer's first-to-last time is mostly librdkafka iterating
    // in memory and swings 2x between runs; it is printed too.)
    let raw_assign: Vec<f64> = raws
        .iter()
        .map(|r| r.count as f64 / r.from_assign_secs.max(1e-9))
        .collect();
    let eng_assign: Vec<f64> = engines.iter().map(|e| e.rate_since_assign(n)).collect();
    let raw_rates: Vec<f64> = raws.iter().map(RawResult::rate).collect();
    let src_rates: Vec<f64> = engines.iter().map(|e| e.source_rate(n)).collect();
    let op_rates: Vec<f64> = engines.iter().map(|e| e.operator_rate(n)).collect();
    let raw_assign_med = median(&raw_assign);
    let eng_assign_med = median(&eng_assign);
    let raw_med = median(&raw_rates);
    let src_med = median(&src_rates);
    let op_med = median(&op_rates);
    let active_rates: Vec<f64> = engines.iter().map(|e| e.active_rate(n)).collect();
    let active_med = median(&active_rates);
    // Each engine run is paired with the raw run just before it (same
    // broker state): the headline is the median of those pairs' ratios.
    let pairs: Vec<f64> = eng_assign
        .iter()
        .zip(&raw_assign)
        .map(|(e, r)| e / r)
        .collect();
    let ratio = median(&pairs);
    let pair_ratios: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
    let engine_hwm = engines.iter().map(|e| e.hwm_kb).max().unwrap_or(0);
    let raw_hwm = raws.iter().map(|r| r.hwm_kb).max().unwrap_or(0);
    let stats_written: Vec<String> = engines.iter().map(|e| e.sink_sent.to_string()).collect();
    println!();
    if route() == Route::Users {
        let per_core: Vec<f64> = engines
            .iter()
            .map(|e| e.operator_count as f64 / e.cpu_s.max(1e-9))
            .collect();
        println!(
            "user path: {} actions per engine CPU second (median; the engine's whole process: source, merge, operator, snapshots, changelog, sink)",
            k(median(&per_core))
        );
    }
    println!(
        "{} path: engine {}/s vs raw consumer {}/s from assign to last record (medians); ratio {:.2} (median of {runs} paired runs: {}); aim >= 0.80: {}; engine peak RSS {} vs raw consumer {}",
        match route() {
            Route::Comments => "comment",
            Route::Users => "user",
        },
        k(eng_assign_med),
        k(raw_assign_med),
        ratio,
        pair_ratios.join(", "),
        if ratio >= 0.8 { "met" } else { "NOT met" },
        mb(engine_hwm),
        mb(raw_hwm),
    );
    println!(
        "  first to last record: engine {}/s (source alone {}/s; room_activity from its own first record {}/s) vs raw consumer {}/s => ratio {:.2} ({:.2}, {:.2})",
        k(op_med),
        k(src_med),
        k(active_med),
        k(raw_med),
        op_med / raw_med,
        src_med / raw_med,
        active_med / raw_med,
    );
    let plausible = engines.iter().all(|e| e.sink_sent > 0);
    println!(
        "  room-stats written per run: {} ({}; at most {} room-ticks in the data)",
        stats_written.join(", "),
        if plausible {
            "plausible: > 0"
        } else {
            "IMPLAUSIBLE: a run wrote none"
        },
        u64::from(ROOMS) * (SPAN_MS / 1000 + 1) as u64,
    );
    println!(
        "  engine logs and metrics timelines: {}; total bench time {:.0} s",
        timelines.display(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- setup

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A temp folder, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let path = std::env::temp_dir().join(unique("onair-comment-path"));
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Builds `onair` in release mode (a no-op when it is up to date) and returns
/// its path, next to this bench's own folder (`target/release/deps/..`).
fn engine_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("onair"))
        .expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--release", "--bin", "onair"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    match built {
        Ok(s) if s.success() => {}
        other if binary.exists() => eprintln!(
            "comment_path: `cargo build --release --bin onair` failed ({other:?}); using the existing {}",
            binary.display()
        ),
        other => panic!(
            "`cargo build --release --bin onair` failed ({other:?}) and {} does not exist",
            binary.display()
        ),
    }
    assert!(binary.exists(), "{} not found", binary.display());
    binary
}

/// The broker: the one in `ONAIR_BROKERS`, or one started (and stopped on
/// drop) with `scripts/broker`.
struct Broker {
    address: String,
    owned: bool,
    state: PathBuf,
}

impl Broker {
    fn from_env_or_start(scratch: &Path) -> Self {
        if let Ok(address) = std::env::var("ONAIR_BROKERS") {
            if !address.trim().is_empty() {
                return Broker {
                    address,
                    owned: false,
                    state: PathBuf::new(),
                };
            }
        }
        let state = scratch.join("broker");
        let out = Command::new("bash")
            .arg("scripts/broker")
            .arg("start")
            .env("ONAIR_BROKER_STATE", &state)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/broker start");
        // From here on a broker may run: stop it even if the rest fails.
        let mut broker = Broker {
            address: String::new(),
            owned: true,
            state,
        };
        let text = String::from_utf8_lossy(&out.stdout);
        broker.address = text
            .lines()
            .find_map(|l| l.strip_prefix("ONAIR_BROKERS="))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("scripts/broker start printed no address: {text}"));
        assert!(out.status.success(), "scripts/broker start failed");
        broker
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("bash")
                .arg("scripts/broker")
                .arg("stop")
                .env("ONAIR_BROKER_STATE", &self.state)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status();
        }
    }
}

fn kafka_config(brokers: &str, prefix: &str) -> KafkaConfig {
    let mut k = KafkaConfig {
        brokers: brokers.to_string(),
        group_id: format!("{prefix}-group"),
        commit_interval_ms: 200,
        ..KafkaConfig::default()
    };
    let t = &mut k.topics;
    t.video = format!("{prefix}-video");
    t.audio = format!("{prefix}-audio");
    t.comments = format!("{prefix}-comments");
    t.actions = format!("{prefix}-actions");
    t.short_video_actions = format!("{prefix}-short-video-actions");
    t.room_stats = format!("{prefix}-room-stats");
    t.dead_letters = format!("{prefix}-dead-letters");
    t.user_actions = format!("{prefix}-user-actions");
    t.user_sequences = format!("{prefix}-user-sequences");
    t.user_state = format!("{prefix}-users-changelog");
    t.room_embeddings = format!("{prefix}-room-embeddings");
    t.training_samples = format!("{prefix}-training-samples");
    t.partitions = PARTITIONS;
    k
}

/// Deletes the run's topics on drop (the broker keeps everything in memory).
struct TopicsGuard {
    kafka: KafkaConfig,
}

impl Drop for TopicsGuard {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let Ok(admin) = client_config(&self.kafka).create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let names: Vec<&str> = pipeline_topics(&self.kafka)
            .iter()
            .map(|t| t.name)
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), admin.delete_topics(&names, &opts)).await
        });
    }
}

fn pipeline_toml(k: &KafkaConfig) -> String {
    let t = &k.topics;
    format!(
        r#"[source]
kind = "kafka"
[sink]
kind = "kafka"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
commit_interval_ms = {commit}
[kafka.topics]
video = "{video}"
audio = "{audio}"
comments = "{comments}"
actions = "{actions}"
short_video_actions = "{sva}"
room_stats = "{stats}"
dead_letters = "{dl}"
user_actions = "{ua}"
user_sequences = "{us}"
user_state = "{ust}"
room_embeddings = "{re}"
training_samples = "{ts}"
partitions = {partitions}
create = false
{operator}
{runtime}"#,
        ua = t.user_actions,
        us = t.user_sequences,
        ust = t.user_state,
        re = t.room_embeddings,
        ts = t.training_samples,
        operator = match route() {
            Route::Comments => "[operators.room_activity]\nenabled = true",
            Route::Users => "[operators.room_activity]\nenabled = false\n[operators.user_sequences]\nenabled = true",
        },
        brokers = k.brokers,
        group = k.group_id,
        commit = k.commit_interval_ms,
        video = t.video,
        audio = t.audio,
        comments = t.comments,
        actions = t.actions,
        sva = t.short_video_actions,
        stats = t.room_stats,
        dl = t.dead_letters,
        partitions = t.partitions,
        runtime = match std::env::var("ONAIR_BENCH_RUNTIME") {
            Ok(lines) => format!("[runtime]\n{}\n", lines.replace(';', "\n")),
            Err(_) => String::new(),
        },
    )
}

// ---------------------------------------------------------------- data

/// splitmix64: a tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

const WORDS: &[&str] = &[
    "nice",
    "666",
    "wow",
    "哈哈哈",
    "主播好",
    "gift!",
    "lol",
    "太强了",
    "hello",
    "再来一次",
    "gg",
    "love it",
    "what",
    "加油",
    "so good",
    "🔥",
];

struct Produced {
    bytes: u64,
    wall: Duration,
}

/// Produces `n` comments: `n - ROOMS` spread over `SPAN_MS` of event time in
/// order, then one per room `CLOSE_AFTER_MS` after the span. Records carry
/// the current time as CreateTime (noida deletes old ones).
fn produce(kafka: &KafkaConfig, n: u64, start_ms: i64) -> Produced {
    let mut c = client_config(kafka);
    c.set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000");
    let producer: BaseProducer = c.create().expect("producer");
    let topic = &route().topic(kafka);
    let regular = n - u64::from(ROOMS);
    let mut rng = Rng(0x0A1B_2C3D);
    let wall0 = Instant::now();
    let mut bytes = 0u64;
    let mut text = String::new();
    for i in 0..n {
        let (room, t) = if i < regular {
            // Two draws, the smaller wins: a few rooms are much busier.
            let room = rng.below(ROOMS).min(rng.below(ROOMS));
            (room, start_ms + (i as i64 * SPAN_MS) / regular as i64)
        } else {
            ((i - regular) as u32, start_ms + SPAN_MS + CLOSE_AFTER_MS)
        };
        if route() == Route::Users {
            let (key, payload) = short_video_action(&mut rng, t);
            bytes += payload.len() as u64;
            send(&producer, topic, &key, &payload);
            if i % 1000 == 0 {
                producer.poll(Duration::ZERO);
            }
            continue;
        }
        text.clear();
        for w in 0..=rng.below(5) {
            if w > 0 {
                text.push(' ');
            }
            text.push_str(WORDS[rng.below(WORDS.len() as u32) as usize]);
        }
        let room_id = format!("room-{room:03}");
        let comment = Comment {
            schema_version: 1,
            room_id: room_id.clone(),
            user_id: format!("user-{:04}", rng.below(USERS)),
            event_time_ms: t,
            text: text.clone(),
            comment_id: format!("c{i}"),
        };
        let payload = comment.encode_to_vec();
        bytes += payload.len() as u64;
        send(&producer, topic, &room_id, &payload);
        if i % 1000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("flush the comments");
    let wall = wall0.elapsed();
    // Check that every record landed (delivery reports are not tracked).
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{}-check", kafka.group_id))
        .create()
        .expect("check consumer");
    let mut total = 0;
    for p in 0..PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        total += high - low;
    }
    assert_eq!(total as u64, n, "the input topic holds {total} records");
    Produced { bytes, wall }
}

fn send(producer: &BaseProducer, topic: &str, key: &str, payload: &[u8]) {
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(payload)) {
            Ok(()) => break,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => panic!("produce failed: {e}"),
        }
    }
}

/// One short-video action of the user path at event time `t`: its key (the
/// user) and payload. Impressions 45%, plays 40% (5-60 s videos, watched
/// 1 s to all of it), likes 9%, comments 3%, shares 3%; a busier half of the
/// users (two draws, the smaller wins).
fn short_video_action(rng: &mut Rng, t: i64) -> (String, Vec<u8>) {
    use onair::schema::{ShortVideoAction, ShortVideoActionKind as K};
    let user = format!("user-{:04}", rng.below(USERS).min(rng.below(USERS)));
    let video = rng.below(2000);
    let author = video % 200;
    let duration = 5_000 + (video * 7919) % 55_000;
    let kind = match rng.below(100) {
        0..=44 => K::Impression,
        45..=84 => K::Play,
        85..=93 => K::Like,
        94..=96 => K::Comment,
        _ => K::Share,
    };
    let watch = if kind == K::Play {
        1_000 + rng.below(duration)
    } else {
        0
    };
    let a = ShortVideoAction {
        schema_version: 1,
        user_id: user.clone(),
        video_id: format!("video-{video:04}"),
        author_id: format!("author-{author:03}"),
        event_time_ms: t,
        kind: kind as i32,
        watch_ms: watch,
        duration_ms: if kind == K::Play { duration } else { 0 },
    };
    (user, a.encode_to_vec())
}

// ---------------------------------------------------------------- raw consumer

struct RawResult {
    count: u64,
    secs: f64,
    cpu_s: f64,
    hwm_kb: u64,
    /// From `assign` (before the first fetch) to the last message.
    from_assign_secs: f64,
}

impl RawResult {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs.max(1e-9)
    }
}

/// Runs the raw consumer in a child process (this binary with `ROLE_ENV`),
/// so its peak RSS is its own.
fn raw_run(brokers: &str, topic: &str, n: u64, group: &str) -> RawResult {
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .env(ROLE_ENV, "raw")
        .env("ONAIR_BROKERS", brokers)
        .env("ONAIR_BENCH_TOPIC", topic)
        .env("ONAIR_BENCH_COMMENTS", n.to_string())
        .env("ONAIR_BENCH_GROUP", group)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the raw consumer");
    let mut child = ChildGuard(child);
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait for the raw consumer") {
            break s;
        }
        assert!(
            Instant::now() < until,
            "the raw consumer did not finish within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut s) = child.0.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    assert!(status.success(), "raw consumer failed: {status}; {out}");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RAW_RESULT "))
        .unwrap_or_else(|| panic!("raw consumer printed no result: {out}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> f64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN) };
    let result = RawResult {
        count: num(0) as u64,
        secs: num(1),
        cpu_s: num(2),
        hwm_kb: num(3) as u64,
        from_assign_secs: num(4),
    };
    assert_eq!(
        result.count, n,
        "the raw consumer read {} of {n}",
        result.count
    );
    result
}

/// The child: reads every comment once with a plain consumer and prints
/// `RAW_RESULT count secs cpu_secs vmhwm_kb secs_from_assign bytes checksum`.
fn raw_child() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let brokers = var("ONAIR_BROKERS");
    let topic = var("ONAIR_BENCH_TOPIC");
    let n: u64 = var("ONAIR_BENCH_COMMENTS").parse().expect("count");
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("client.id", "onair-bench-raw")
        .set("group.id", var("ONAIR_BENCH_GROUP"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .set("receive.message.max.bytes", RECEIVE_MAX)
        .set("fetch.max.bytes", FETCH_MAX)
        .set("max.partition.fetch.bytes", FETCH_MAX)
        .create()
        .expect("raw consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("partition");
    }
    let assigned = Instant::now();
    consumer.assign(&tpl).expect("assign");
    drop(tpl);
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut count, mut bytes, mut check) = (0u64, 0u64, 0u64);
    let mut first: Option<(Instant, f64)> = None;
    let mut last = (Instant::now(), 0.0);
    while count < n && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if first.is_none() {
                    first = Some((Instant::now(), cpu_secs("self")));
                }
                let payload = m.payload().unwrap_or_default();
                bytes += payload.len() as u64;
                check = check.wrapping_mul(31).wrapping_add(u64::from(
                    payload.first().copied().unwrap_or(0) ^ payload.last().copied().unwrap_or(0),
                ));
                count += 1;
                if count == n {
                    last = (Instant::now(), cpu_secs("self"));
                }
            }
            Some(Err(e)) => eprintln!("raw consumer: {e}"),
            None => {}
        }
    }
    let (t0, c0) = first.unwrap_or(last);
    println!(
        "RAW_RESULT {count} {:.6} {:.2} {} {:.6} {bytes} {check}",
        last.0.duration_since(t0).as_secs_f64(),
        last.1 - c0,
        vm_hwm_kb("self"),
        last.0.duration_since(assigned).as_secs_f64(),
    );
    let _ = std::io::stdout().flush();
    // Exit without closing the consumer: nothing to commit, and a close can
    // hang on some brokers.
    std::process::exit(0);
}

// ---------------------------------------------------------------- engine

struct EngineRun<'a> {
    binary: &'a Path,
    dir: &'a Path,
    pipeline: &'a Path,
    brokers: &'a str,
    group: &'a str,
    n: u64,
    run: usize,
    timeline: &'a Path,
}

#[derive(Default)]
struct EngineResult {
    /// First record at the source until the source had them all (s).
    source_secs: Option<f64>,
    /// First record at the source until the operator had them all (s).
    operator_secs: Option<f64>,
    /// The operator's first record until its last (s): the rate once the
    /// merge has started releasing records.
    operator_active_secs: Option<f64>,
    /// From the partitions' assignment until the operator had every record
    /// (s): fetches included, as the raw consumer's time from `assign`.
    from_assign_secs: Option<f64>,
    /// CPU the engine used over the operator window (s).
    cpu_s: f64,
    hwm_kb: u64,
    /// Records the sink wrote (room stats and dead letters).
    sink_sent: u64,
    dead_letters: u64,
    late: u64,
    source_count: u64,
    operator_count: u64,
    /// Mean per-record latency by stage, µs.
    latencies: Vec<(&'static str, f64)>,
    /// Time from spawn to the first record (s).
    startup_secs: f64,
}

impl EngineResult {
    fn source_rate(&self, n: u64) -> f64 {
        self.source_secs.map_or(0.0, |s| n as f64 / s.max(1e-9))
    }

    fn operator_rate(&self, n: u64) -> f64 {
        self.operator_secs.map_or(0.0, |s| n as f64 / s.max(1e-9))
    }

    fn rate_since_assign(&self, n: u64) -> f64 {
        self.from_assign_secs
            .map_or(0.0, |s| n as f64 / s.max(1e-9))
    }

    fn active_rate(&self, n: u64) -> f64 {
        self.operator_active_secs
            .map_or(0.0, |s| n as f64 / s.max(1e-9))
    }

    fn describe(&self, n: u64) -> String {
        let op = route().operator();
        let timing = match (self.source_secs, self.operator_secs) {
            (Some(s), Some(o)) => format!(
                "{:.3} s = {}/s from assign to the last record through {op}; first to last record: source {} in {s:.3} s = {}/s; {op} {} in {o:.3} s = {}/s ({:.3} s = {}/s from its own first record)",
                self.from_assign_secs.unwrap_or(f64::NAN),
                k(self.rate_since_assign(n)),
                self.source_count,
                k(self.source_rate(n)),
                self.operator_count,
                k(self.operator_rate(n)),
                self.operator_active_secs.unwrap_or(f64::NAN),
                k(self.active_rate(n)),
            ),
            _ => format!(
                "TIMED OUT: source {} and {op} {} of {n}",
                self.source_count, self.operator_count
            ),
        };
        let lat: Vec<String> = self
            .latencies
            .iter()
            .map(|(s, us)| format!("{s} {us:.2}"))
            .collect();
        format!(
            "{timing}, cpu {:.2} s, peak RSS {}, started in {:.1} s, sink wrote {} (dead letters {}, late {}); mean µs/record: {}",
            self.cpu_s,
            mb(self.hwm_kb),
            self.startup_secs,
            self.sink_sent,
            self.dead_letters,
            self.late,
            lat.join(", ")
        )
    }
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `onair run`, follows its metrics until the operator has every
/// record (and the sink has settled), then reads its peak RSS and stops it.
fn engine_run(r: &EngineRun<'_>) -> EngineResult {
    let port = free_port();
    let log_path = r.dir.join(format!("engine-run{}.log", r.run));
    let log = std::fs::File::create(&log_path).expect("engine log");
    let spawned = Instant::now();
    let child = Command::new(r.binary)
        .args(["--log", "info,librdkafka=warn", "run"])
        .arg(r.pipeline)
        .args(["--brokers", r.brokers, "--group-id", r.group])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(log.try_clone().expect("engine log"))
        .stderr(log)
        .spawn()
        .expect("start onair run");
    let mut child = ChildGuard(child);
    let pid = child.0.id();
    let perf = std::env::var("ONAIR_BENCH_PERF").ok().map(|prefix| {
        ChildGuard(
            Command::new("perf")
                .arg("record")
                .args(
                    std::env::var("ONAIR_BENCH_PERF_ARGS")
                        .unwrap_or_else(|_| "-F 499 -g".into())
                        .split_whitespace(),
                )
                .args(["-p", &pid.to_string(), "-o"])
                .arg(format!("{prefix}.run{}", r.run))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start perf"),
        )
    });
    let tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    let mut res = EngineResult::default();
    let mut csv = String::from("t_s,source,room_activity,sink_sent,cpu_s,paused\n");
    let deadline = spawned + Duration::from_secs(30) + Duration::from_micros(r.n * 200);
    let mut prev = spawned;
    let mut first: Option<(Instant, f64)> = None;
    let mut op_first: Option<Instant> = None;
    let mut assigned_at: Option<Instant> = None;
    let mut op_done_at: Option<Instant> = None;
    let mut sink_last = (0u64, Instant::now());
    let text = loop {
        // Fine-grained until the assignment is seen (nothing flows before
        // it, so scraping costs the run nothing), then `scrape_every`.
        let every = if assigned_at.is_none() {
            Duration::from_millis(10)
        } else {
            scrape_every()
        };
        std::thread::sleep(every.saturating_sub(prev.elapsed()));
        let now = Instant::now();
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("onair run exited early ({status}); log:\n{}", tail());
        }
        let Some(text) = scrape(port) else {
            assert!(now < deadline, "no /metrics from onair; log:\n{}", tail());
            prev = now;
            continue;
        };
        let cpu = cpu_secs(&pid.to_string());
        let src = metric(&text, "onair_stage_received_total", &[("stage", "source")]) as u64;
        let op = metric(
            &text,
            "onair_stage_received_total",
            &[("stage", route().operator())],
        ) as u64;
        let sink = metric(&text, "onair_stage_sent_total", &[("stage", "sink")]) as u64;
        // A threshold crossed between two scrapes is dated to their midpoint.
        let mid = prev + now.duration_since(prev) / 2;
        if assigned_at.is_none() && metric(&text, "onair_partitions_assigned", &[]) > 0.0 {
            assigned_at = Some(mid);
        }
        if src > 0 && first.is_none() {
            first = Some((mid, cpu));
            res.startup_secs = mid.duration_since(spawned).as_secs_f64();
        }
        if let Some((t0, c0)) = first {
            let paused = metric(&text, "onair_partitions_paused", &[]);
            csv.push_str(&format!(
                "{:.3},{src},{op},{sink},{:.2},{paused}\n",
                now.duration_since(t0).as_secs_f64(),
                cpu - c0
            ));
            if src >= r.n && res.source_secs.is_none() {
                res.source_secs = Some(mid.duration_since(t0).as_secs_f64());
            }
            if op > 0 && op_first.is_none() {
                op_first = Some(mid);
            }
            if op >= r.n && res.operator_secs.is_none() {
                res.operator_secs = Some(mid.duration_since(t0).as_secs_f64());
                res.operator_active_secs = op_first.map(|f| mid.duration_since(f).as_secs_f64());
                res.cpu_s = cpu - c0;
                res.from_assign_secs = assigned_at.map(|a| mid.duration_since(a).as_secs_f64());
                op_done_at = Some(now);
            }
        }
        res.source_count = src;
        res.operator_count = op;
        if sink != sink_last.0 {
            sink_last = (sink, now);
        }
        if let Some(done) = op_done_at {
            // Let the last ticks' outputs be acknowledged: stop once the sink
            // count has not moved for 500 ms (at most 5 s).
            let quiet = now.duration_since(sink_last.1) >= Duration::from_millis(500);
            if (quiet && sink > 0) || now.duration_since(done) > Duration::from_secs(5) {
                break text;
            }
        }
        if now > deadline {
            eprintln!(
                "comment_path: engine run {} timed out; log tail:\n{}",
                r.run,
                tail()
            );
            break text;
        }
        prev = now;
    };
    res.hwm_kb = vm_hwm_kb(&pid.to_string());
    res.sink_sent = metric(&text, "onair_stage_sent_total", &[("stage", "sink")]) as u64;
    res.dead_letters = metric(&text, "onair_dead_letters_total", &[]) as u64;
    res.late = metric(
        &text,
        "onair_stage_dropped_total",
        &[("stage", "runtime"), ("reason", "late")],
    ) as u64;
    for stage in ["decode", route().operator(), "runtime"] {
        let sum = metric(
            &text,
            "onair_stage_latency_seconds_sum",
            &[("stage", stage)],
        );
        let count = metric(
            &text,
            "onair_stage_latency_seconds_count",
            &[("stage", stage)],
        );
        if count > 0.0 {
            res.latencies.push((stage, sum / count * 1e6));
        }
    }
    let _ = std::fs::write(r.timeline, csv);

    if let Some(mut p) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &p.0.id().to_string()])
            .status();
        let _ = p.0.wait();
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match child.0.try_wait() {
            Ok(Some(_)) => break,
            _ if Instant::now() > until => {
                eprintln!(
                    "comment_path: onair did not stop within 20 s of SIGTERM; killed. log tail:\n{}",
                    tail()
                );
                break; // the guard kills it
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    res
}

// ---------------------------------------------------------------- /metrics and /proc

/// GET /metrics over plain HTTP/1.0.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).then(|| body.to_string())
}

/// Sum of the samples of a metric whose labels contain every `k="v"` given
/// (0 when there is none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
        }
    }
    sum
}

/// Peak resident set size of a process (`VmHWM`), kB.
fn vm_hwm_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User plus system CPU time of a process, seconds (USER_HZ = 100).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

// ---------------------------------------------------------------- printing

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn k(rate: f64) -> String {
    format!("{:.1}k", rate / 1000.0)
}

fn mb(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}
