//! Helpers shared by the integration tests: the broker address, per-test
//! topic names, engine processes (so tests can SIGKILL them), a plain
//! consumer to read outputs back, and a metrics scraper.
#![allow(dead_code)]

pub mod media;
pub mod stats;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

/// The broker the test command started (`scripts/test` exports it).
pub fn brokers() -> String {
    std::env::var("ONAIR_BROKERS").unwrap_or_else(|_| {
        panic!("ONAIR_BROKERS is not set: run the integration tests through scripts/test, or `eval \"$(scripts/broker start)\"` first")
    })
}

/// A unique name prefix for one test's topics and group.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Topic names of a test pipeline.
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn name(&self, t: &str) -> String {
        format!("{}-{t}", self.prefix)
    }
}

/// Writes a Kafka pipeline file for a test and returns its path.
pub fn pipeline(dir: &Path, topics: &Topics, extra: &str) -> PathBuf {
    pipeline_at(dir, topics, &brokers(), extra)
}

/// [`pipeline`] for the broker at `brokers`.
pub fn pipeline_at(dir: &Path, topics: &Topics, brokers: &str, extra: &str) -> PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, pipeline_text(topics, topics, brokers, extra)).expect("write pipeline");
    path
}

/// A reference beside a test's pipeline: a second consumer group that reads
/// the same input topics (`inputs`) and writes everything else (outputs,
/// changelogs, the re-keyed actions) to topics of its own (`own`). Run
/// untouched next to engines that a fault hits, it writes what a clean run
/// writes, from the same input records.
pub fn reference_pipeline(dir: &Path, inputs: &Topics, own: &Topics, extra: &str) -> PathBuf {
    let path = dir.join("reference.toml");
    let text = pipeline_text(inputs, own, &brokers(), extra);
    std::fs::write(&path, text).expect("write pipeline");
    path
}

/// The five input topics a simulator writes.
const INPUTS: [&str; 5] = [
    "video",
    "audio",
    "comments",
    "actions",
    "short-video-actions",
];

fn pipeline_text(inputs: &Topics, own: &Topics, brokers: &str, extra: &str) -> String {
    let mut text = format!(
        r#"
[source]
kind = "kafka"
[sink]
kind = "kafka"
[kafka]
brokers = "{brokers}"
group_id = "{prefix}-group"
session_timeout_ms = 10000
commit_interval_ms = 200
statistics_interval_ms = 1000
[kafka.topics]
video = "{prefix}-video"
audio = "{prefix}-audio"
comments = "{prefix}-comments"
actions = "{prefix}-actions"
short_video_actions = "{prefix}-short-video-actions"
room_stats = "{prefix}-room-stats"
dead_letters = "{prefix}-dead-letters"
transcripts = "{prefix}-transcripts"
room_features = "{prefix}-room-features"
training_samples = "{prefix}-training-samples"
highlight_scores = "{prefix}-highlight-scores"
highlights = "{prefix}-highlights"
user_actions = "{prefix}-user-actions"
room_embeddings = "{prefix}-room-embeddings"
gift_predictions = "{prefix}-gift-predictions"
user_sequences = "{prefix}-user-sequences"
user_state = "{prefix}-user-state"
room_state = "{prefix}-room-state"
partitions = 4
[runtime]
idle_timeout_ms = 2000
drain_timeout_ms = 4000
# The tests demand exact figures, so the merge may wait long for a slow
# broker's fetch (tansu under load took over 10 s) rather than run ahead.
max_wait_ms = 60000
# The simulator runs 3-4x faster than real time here and CI machines are
# loaded: 15 s of event time is 4-5 s of wall time for one stream's fetch to
# lag the others (seen: 1-2 s when a stream goes from empty to live) before
# its records count as late.
allowed_lateness_ms = 15000
{extra}
"#,
        prefix = own.prefix
    );
    for t in INPUTS {
        text = text.replace(
            &format!("\"{}\"", own.name(t)),
            &format!("\"{}\"", inputs.name(t)),
        );
    }
    text
}

/// Creates every topic of a pipeline file (validated), as `run` would.
pub fn create_topics(pipeline: &Path) {
    let config = onair::config::PipelineConfig::load(pipeline).expect("pipeline is valid");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(onair::kafka::ensure_topics(
            &config.kafka,
            &onair::kafka::pipeline_topics(&config.kafka),
        ))
        .expect("topics created");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `onair` process.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Proc {
    /// `onair run <pipeline>` with its log in `dir`.
    pub fn engine(dir: &Path, pipeline: &Path, name: &str) -> Proc {
        Self::engine_with(dir, pipeline, name, &[])
    }

    /// `onair run <pipeline> <extra args>`.
    pub fn engine_with(dir: &Path, pipeline: &Path, name: &str, extra: &[&str]) -> Proc {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_onair"))
            .args([
                "--log",
                "info,librdkafka=warn,onair::runtime::partition=debug,onair::runtime::transactions=debug",
                "run",
            ])
            .arg(pipeline)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start onair");
        Proc {
            child,
            log,
            metrics_port: port,
        }
    }

    /// `onair simulate ...` with extra arguments.
    pub fn simulate(dir: &Path, pipeline: &Path, args: &[&str]) -> Proc {
        Self::simulate_at(&brokers(), dir, pipeline, args)
    }

    /// [`Proc::simulate`] producing to the broker at `brokers`.
    pub fn simulate_at(brokers: &str, dir: &Path, pipeline: &Path, args: &[&str]) -> Proc {
        let log = dir.join("simulate.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_onair"))
            .args(["simulate", "--brokers", brokers, "--pipeline"])
            .arg(pipeline)
            .args(args)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start onair simulate");
        Proc {
            child,
            log,
            metrics_port: 0,
        }
    }

    /// Waits for a simulator to finish and asserts that it succeeded.
    pub fn simulate_ok(mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(status.success(), "simulate: {status}\n{}", self.log_tail());
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and asserts that it drains and exits cleanly within 60 s.
    pub fn stop(&mut self) {
        self.signal_term();
        let status = self.wait(Duration::from_secs(60));
        assert!(status.success(), "{status}\n{}", self.log_tail());
    }

    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit; kills it and panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > until {
                self.kill9();
                panic!(
                    "process did not exit within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The text of `/metrics`, or None if it does not answer.
    pub fn scrape(&self) -> Option<String> {
        scrape(self.metrics_port)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// GET /metrics over plain HTTP/1.0.
pub fn scrape(port: u16) -> Option<String> {
    get(port, "/metrics")
}

/// GET `path` on loopback over plain HTTP/1.0; the body of a 200 answer.
pub fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).then(|| body.to_string())
}

/// Sum of the samples of a metric whose labels contain every `k="v"` given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
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
        let value: f64 = rest.rsplit(' ').next().and_then(|v| v.parse().ok())?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Whether the broker kept the metadata of the offsets the engine committed
/// for `topics` (group `{prefix}-group`): Kafka does; tansu 0.6.0 drops it,
/// which loses the emitted-through time a restarted engine uses to write
/// nothing twice (see README, "Brokers").
pub fn broker_kept_commit_metadata(topics: &Topics) -> bool {
    broker_kept_commit_metadata_at(&brokers(), topics)
}

/// The offsets the engine's group (`{prefix}-group`) committed for the 4
/// partitions of `stream`, with the consumer that asked (None: the broker
/// did not answer).
pub fn committed_at(
    brokers: &str,
    topics: &Topics,
    stream: &str,
) -> (BaseConsumer, Option<rdkafka::TopicPartitionList>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-group", topics.prefix))
        .set("enable.auto.commit", "false")
        .create()
        .expect("probe consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition(&topics.name(stream), p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok();
    (consumer, committed)
}

/// [`broker_kept_commit_metadata`] on the broker at `brokers`.
pub fn broker_kept_commit_metadata_at(brokers: &str, topics: &Topics) -> bool {
    let (_, committed) = committed_at(brokers, topics, "comments");
    let committed = committed.expect("committed offsets");
    let elements = committed.elements();
    assert!(
        elements
            .iter()
            .any(|e| matches!(e.offset(), rdkafka::Offset::Offset(_))),
        "the engine committed offsets for {}",
        topics.name("comments")
    );
    elements.iter().any(|e| !e.metadata().is_empty())
}

/// One record read back.
#[derive(Clone, Debug)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads `topic` from the start with a plain consumer until `done` says so
/// or `timeout` passes; returns everything read.
pub fn read_until(topic: &str, timeout: Duration, done: impl FnMut(&[Rec]) -> bool) -> Vec<Rec> {
    read_until_at(&brokers(), topic, timeout, done)
}

/// [`read_until`] from the broker at `brokers`.
pub fn read_until_at(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Rec]) -> bool,
) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let until = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut last_check = Instant::now();
    while Instant::now() < until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.insert(
                            hdr.key.to_string(),
                            String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Rec {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            if done(&out) {
                break;
            }
        }
    }
    consumer.unsubscribe();
    drop(consumer);
    out
}

/// A faulted run's records of one output topic against a clean run's (a
/// reference group on the same input), by their `onair-id` header.
#[derive(Debug, Default)]
pub struct Against {
    /// Distinct ids the clean run wrote.
    pub clean: usize,
    /// Records the faulted run wrote.
    pub records: usize,
    /// Records written again with an id already written, byte for byte.
    pub replays: usize,
    /// Ids of the clean run the faulted one never wrote.
    pub lost: Vec<String>,
    /// Ids the faulted run wrote with another key or payload than the clean
    /// run.
    pub differ: Vec<String>,
    /// Ids the faulted run wrote twice with different keys or payloads.
    pub conflicts: Vec<String>,
    /// Ids only the faulted run wrote.
    pub extra: Vec<String>,
}

impl Against {
    /// Nothing lost, nothing different, nothing extra.
    pub fn exact(&self) -> bool {
        self.lost.is_empty()
            && self.differ.is_empty()
            && self.conflicts.is_empty()
            && self.extra.is_empty()
    }
}

impl std::fmt::Display for Against {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records of {} clean ids: {} lost, e.g. {:?}; {} different, e.g. {:?}; {} written twice differently, e.g. {:?}; {} extra, e.g. {:?}",
            self.records,
            self.clean,
            self.lost.len(),
            self.lost.first(),
            self.differ.len(),
            self.differ.first(),
            self.conflicts.len(),
            self.conflicts.first(),
            self.extra.len(),
            self.extra.first(),
        )
    }
}

/// Compares `faulted` with `clean` record by record (see [`Against`]).
pub fn against_clean(clean: &[Rec], faulted: &[Rec]) -> Against {
    against_clean_by(clean, faulted, |r| {
        r.headers.get("onair-id").cloned().unwrap_or_default()
    })
}

/// `topic` as the faulted run (`faulted`) wrote it against the clean run's
/// (`clean`), both read to their ends, without the records `skip` says are
/// not replays (such as progress records).
pub fn compare_topic(
    clean: &Topics,
    faulted: &Topics,
    topic: &str,
    skip: fn(&Rec) -> bool,
) -> Against {
    let read = |t: &Topics| {
        let mut recs = read_until(&t.name(topic), Duration::from_secs(15), |_| false);
        recs.retain(|r| !skip(r));
        recs
    };
    against_clean(&read(clean), &read(faulted))
}

/// Sets `runtime.allowed_lateness_ms` of pipeline files written by
/// [`pipeline`] to `seconds`.
pub fn set_lateness(pipelines: &[&Path], seconds: u64) {
    for p in pipelines {
        let text = std::fs::read_to_string(p).expect("pipeline");
        assert!(text.contains("allowed_lateness_ms = 15000"));
        let text = text.replace(
            "allowed_lateness_ms = 15000",
            &format!("allowed_lateness_ms = {}", seconds * 1000),
        );
        std::fs::write(p, text).expect("pipeline");
    }
}

/// [`against_clean`] with the records told apart by `id` (for a topic
/// whose records of one id change, as a highlight written open and then
/// closed: the id and the bytes).
pub fn against_clean_by(clean: &[Rec], faulted: &[Rec], id: impl Fn(&Rec) -> String) -> Against {
    let by_id = |recs: &[Rec]| {
        let mut first: BTreeMap<String, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        let mut replays = 0;
        let mut differ = Vec::new();
        for r in recs {
            let id = id(r);
            match first.get(&id) {
                None => {
                    first.insert(id, (r.key.clone(), r.payload.clone()));
                }
                Some((k, p)) if *k == r.key && *p == r.payload => replays += 1,
                Some(_) => differ.push(id),
            }
        }
        (first, replays, differ)
    };
    let (want, _, _) = by_id(clean);
    let (got, replays, conflicts) = by_id(faulted);
    let lost = want
        .keys()
        .filter(|id| !got.contains_key(*id))
        .cloned()
        .collect();
    let extra = got
        .keys()
        .filter(|id| !want.contains_key(*id))
        .cloned()
        .collect();
    let differ = got
        .iter()
        .filter(|(id, r)| want.get(*id).is_some_and(|w| w != *r))
        .map(|(id, _)| id.clone())
        .collect();
    Against {
        clean: want.len(),
        records: faulted.len(),
        replays,
        lost,
        differ,
        conflicts,
        extra,
    }
}

/// A small deterministic generator (for kill moments; print its seed).
pub struct Rng(pub u64);

impl Rng {
    /// The seed from the clock.
    pub fn from_clock() -> Rng {
        Rng(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1))
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Median, max and min of some durations, for a `fault:` line.
pub fn summary(d: &[Duration]) -> String {
    let mut ms: Vec<u128> = d.iter().map(|d| d.as_millis()).collect();
    ms.sort_unstable();
    match (ms.first(), ms.last()) {
        (Some(lo), Some(hi)) => {
            format!("median {} ms, max {hi} ms (min {lo} ms)", ms[ms.len() / 2])
        }
        _ => "none".into(),
    }
}

/// Waits up to 300 s for `count` of `p` to reach `n`; panics with `what`
/// and the log's tail otherwise.
pub fn wait_for_count(p: &Proc, n: f64, what: &str, count: &dyn Fn(&Proc) -> f64) {
    let until = Instant::now() + Duration::from_secs(300);
    while count(p) < n {
        assert!(Instant::now() < until, "{what}\n{}", p.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILLs `engine` `kills` times, each `pause_ms.0` plus up to
/// `pause_ms.1` ms after the previous recovery (the moments from the
/// clock; the seed is printed), each time starting a replacement
/// `engine-<k>` with `args` and waiting for its `count` to pass 0. Returns
/// the last replacement and each kill's time to that first output.
pub fn kill_and_replace(
    mut engine: Proc,
    dir: &Path,
    pipeline: &Path,
    args: &[&str],
    kills: usize,
    pause_ms: (u64, u64),
    count: &dyn Fn(&Proc) -> f64,
) -> (Proc, Vec<Duration>) {
    let mut rng = Rng::from_clock();
    eprintln!("kill moments: seed {}", rng.0);
    let mut recoveries = Vec::new();
    for k in 1..=kills {
        std::thread::sleep(Duration::from_millis(pause_ms.0 + rng.below(pause_ms.1)));
        engine.kill9();
        let killed = Instant::now();
        engine = Proc::engine_with(dir, pipeline, &format!("engine-{k}"), args);
        wait_for_count(&engine, 1.0, &format!("no output after kill {k}"), count);
        recoveries.push(killed.elapsed());
    }
    (engine, recoveries)
}

/// A kill case's scratch directory, the topics of the engine it kills
/// (`<name>-kills-…`) and those of the reference beside it (`<name>-clean-…`).
pub fn kill_case(name: &str) -> (PathBuf, Topics, Topics) {
    (
        scratch(&format!("{name}-kills")),
        Topics {
            prefix: unique(&format!("{name}-kills")),
        },
        Topics {
            prefix: unique(&format!("{name}-clean")),
        },
    )
}
