//! The command line: `run`, `demo`, `simulate`, `topics`, `validate`, `tail`,
//! `graph` and `sequences`.
//! Runtime behaviour (addresses, durations, log level) is set here by flags;
//! what the pipeline does is in its TOML file.
//!
//! Not for: pipeline semantics (see `config`) or engine logic.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use tracing::{error, info};

use crate::config::{PipelineConfig, SinkKind, SourceKind};
use crate::error::chain;
use crate::kafka::{
    check_topics, client_config, ensure_topics, ensure_topics_replicated, partition_counts,
    pipeline_topics, TopicCheck,
};
use crate::runtime::Engine;
use crate::schema::{self, RoomStats};
use crate::simulator::publish::{publish, PublishOptions};
use crate::simulator::{default_start_ms, sim_config, SimEvent, Simulator};
use crate::sinks::console::ConsoleSink;
use crate::sinks::samples::SampleFiles;

/// onair: real-time live-stream processing.
#[derive(Parser, Debug)]
#[command(name = "onair", version, about)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `onair=debug`.
    #[arg(long, global = true, default_value = "info", env = "ONAIR_LOG")]
    pub log: String,
    /// Threads of the async runtime that runs the partition tasks (default:
    /// one per core). librdkafka runs its own threads besides these.
    #[arg(long, global = true, env = "ONAIR_WORKERS")]
    pub workers: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline as a member of its consumer group until SIGTERM/Ctrl-C.
    Run(RunArgs),
    /// Run the whole pipeline in one process on simulated rooms (no broker).
    Demo(DemoArgs),
    /// Generate simulated live rooms into Kafka, with their ground truth.
    Simulate(SimulateArgs),
    /// Create every topic of a pipeline that does not exist yet, then check
    /// each one's partition count and configs against the pipeline (a table;
    /// fails when any topic differs).
    Topics(TopicsArgs),
    /// Check pipeline files and report every problem at once.
    Validate {
        /// Pipeline files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a topic's records as JSON lines.
    Tail(TailArgs),
    /// Build the next version of the gifting-graph tables from gift events: Swing
    /// similarity, GraphCL node embeddings (needs the `torch` feature) and the
    /// neighbour lists MMBee's interest expansion reads.
    Graph(GraphArgs),
    /// Write simulated users' behaviour sequences, with the compressed-interest
    /// model's features, as JSON lines: that model's training data (runs the
    /// simulator in process, actions only; no broker, no media).
    Sequences(SequencesArgs),
}

#[derive(Args, Debug)]
struct SequencesArgs {
    /// Pipeline file whose `[simulator]` to use (short videos are always on).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Day of the seed's world.
    #[arg(long)]
    day: Option<u32>,
    /// Rooms.
    #[arg(long)]
    rooms: Option<u32>,
    /// Viewer population per room.
    #[arg(long)]
    viewers: Option<u32>,
    /// Simulated duration.
    #[arg(long, default_value = "3600s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Event time of the first instant (ms since epoch).
    #[arg(long, default_value_t = 1_767_225_600_000)]
    start_ms: i64,
    /// Output file: one JSON object per user (`user`, `behaviours`: each with
    /// `t`, `domain`, `item`, `owner` and `dense`, the model's features).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct GraphArgs {
    /// Root of the numbered table versions (the latest is the starting graph).
    #[arg(long, default_value = "graph")]
    out: PathBuf,
    /// Gift events as JSON lines (`user_id`, `streamer_id`, `t_ms`, `value`); repeatable.
    #[arg(long)]
    gifts: Vec<PathBuf>,
    /// Read GIFT actions from this pipeline's actions topic.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Override `kafka.brokers` of `--pipeline`.
    #[arg(long, env = "ONAIR_BROKERS")]
    brokers: Option<String>,
    /// Simulate this many days of `--pipeline`'s simulator world (the default
    /// pipeline's without one) and use their gifts.
    #[arg(long)]
    simulate_days: Option<u32>,
    /// Length of each simulated day's broadcast, e.g. `10m`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Override `simulator.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override `simulator.rooms`.
    #[arg(long)]
    rooms: Option<u32>,
    /// Ignore earlier versions: build from these inputs alone.
    #[arg(long)]
    full: bool,
    /// Embedding width.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// GraphCL optimiser steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// libtorch threads for the embeddings (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Override `kafka.brokers`.
    #[arg(long, env = "ONAIR_BROKERS")]
    brokers: Option<String>,
    /// Override `kafka.group_id`.
    #[arg(long)]
    group_id: Option<String>,
    /// Where to serve Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:9464", env = "ONAIR_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Static group membership id (e.g. the pod name): a member restarted
    /// with the same id gets its partitions back without a rebalance.
    #[arg(long, env = "ONAIR_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Also append training samples to files here, for offline training
    /// (`DIR/<task>/samples.jsonl` and `samples.f32`).
    #[arg(long, env = "ONAIR_SAMPLES_DIR")]
    samples_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// The pipeline file (source must be `simulator`).
    #[arg(long, default_value = "pipelines/demo.toml")]
    pipeline: PathBuf,
    /// How long to run (simulated time at the pipeline's speed), e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Override `simulator.rooms`.
    #[arg(long)]
    rooms: Option<u32>,
    /// Override `simulator.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override `simulator.day`.
    #[arg(long)]
    day: Option<u32>,
    /// Event time of the broadcast's start, ms since the epoch (default: now,
    /// rounded down to the minute). Days of one world are a day apart in real data.
    #[arg(long)]
    start_ms: Option<i64>,
    /// Override `simulator.speed`.
    #[arg(long)]
    speed: Option<f64>,
    /// Turn off video (saves CPU on small machines).
    #[arg(long)]
    no_video: bool,
    /// Where to serve Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:9464", env = "ONAIR_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Don't print the live view every second (summary only).
    #[arg(long)]
    quiet: bool,
    /// Also append training samples to files here, for offline training
    /// (`DIR/<task>/samples.jsonl` and `samples.f32`).
    #[arg(long)]
    samples_dir: Option<PathBuf>,
    /// Write the simulator's ground truth (JSON lines) here at the end.
    #[arg(long)]
    truth: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SimulateArgs {
    /// Bootstrap servers.
    #[arg(long, env = "ONAIR_BROKERS")]
    brokers: String,
    /// Pipeline file whose `[kafka.topics]` and `[simulator]` to use.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Rooms.
    #[arg(long)]
    rooms: Option<u32>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Day of the seed's world (see `simulator.day`).
    #[arg(long)]
    day: Option<u32>,
    /// Simulated duration, e.g. `60s`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Simulated seconds per wall second; `0` = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Mean comments per second per room.
    #[arg(long)]
    comments_per_sec: Option<f64>,
    /// Viewer population per room.
    #[arg(long)]
    viewers: Option<u32>,
    /// Video frame rate (0 = no video).
    #[arg(long)]
    fps: Option<u32>,
    /// No audio.
    #[arg(long)]
    no_audio: bool,
    /// No synthesized speech in the audio.
    #[arg(long)]
    no_speech: bool,
    /// Event time of the first instant (ms since epoch); default: now, to the minute.
    #[arg(long)]
    start_ms: Option<i64>,
    /// Send every n-th comment/action as JSON (0 = never).
    #[arg(long, default_value_t = 0)]
    json_every: u64,
    /// Partitions of the topics, when they are created.
    #[arg(long)]
    partitions: Option<i32>,
    /// Write the ground truth (JSON lines) here.
    #[arg(long)]
    truth: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TopicsArgs {
    /// Pipeline file whose `[kafka]` and `[kafka.topics]` to use.
    #[arg(long, default_value = "pipelines/kafka.toml")]
    pipeline: PathBuf,
    /// Override `kafka.brokers`.
    #[arg(long, env = "ONAIR_BROKERS")]
    brokers: Option<String>,
    /// Partitions of every topic (default: `[kafka.topics] partitions`). An
    /// existing topic with another count is reported, never altered (that
    /// would move keys between partitions).
    #[arg(long)]
    partitions: Option<i32>,
    /// Replicas of each partition of the topics created now.
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,
    /// `retention.ms` of the video and audio topics (default, or empty: the
    /// broker's). Kafka judges retention by the records' timestamps, their
    /// event time.
    #[arg(long, env = "ONAIR_MEDIA_RETENTION_MS", value_parser = optional_ms)]
    media_retention_ms: Option<String>,
    /// How long to wait for the cluster to answer, e.g. `120s`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

#[derive(Args, Debug)]
struct TailArgs {
    /// Topic to read.
    topic: String,
    /// Bootstrap servers.
    #[arg(long, env = "ONAIR_BROKERS")]
    brokers: String,
    /// Record type: room-stats, dead-letter, comment, action, video, audio
    /// (default: guessed from the topic name).
    #[arg(long = "type")]
    record_type: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this long without a record, e.g. `5s` (default: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.workers {
        builder.worker_threads(n.max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run(a) => run(a).await,
            Command::Demo(a) => demo(a).await,
            Command::Simulate(a) => simulate(a).await,
            Command::Topics(a) => topics(a).await,
            Command::Validate { files } => validate(&files),
            Command::Tail(a) => tail(a).await,
            Command::Sequences(a) => tokio::task::spawn_blocking(move || sequences(a))
                .await
                .map_err(|e| e.to_string())?,
            Command::Graph(a) => tokio::task::spawn_blocking(move || graph(a))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), String>;

fn load(path: &Path) -> Result<PipelineConfig, String> {
    let config = PipelineConfig::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Secrets named by reference must be there before anything connects.
    config
        .kafka
        .check_properties()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Sets `stop` on the first SIGINT/SIGTERM; exits at once on the second.
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            wait_signal().await;
            seen += 1;
            if seen == 1 {
                info!("stopping: draining in-flight work (signal again to exit at once)");
                flag.store(true, Ordering::SeqCst);
            } else {
                error!("second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    });
    stop
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(a: RunArgs) -> CliResult {
    let mut config = load(&a.pipeline)?;
    if config.source.kind != SourceKind::Kafka || config.sink.kind != SinkKind::Kafka {
        return Err(format!(
            "{}: `run` needs source.kind and sink.kind = \"kafka\" (use `demo` for the simulator)",
            a.pipeline.display()
        ));
    }
    if let Some(b) = a.brokers {
        config.kafka.brokers = b;
    }
    if let Some(g) = a.group_id {
        config.kafka.group_id = g;
    }
    crate::metrics::install(a.metrics_addr)
        .map_err(|e| format!("metrics endpoint on {}: {e}", a.metrics_addr))?;
    crate::metrics::register(&config);
    info!(metrics = %a.metrics_addr, "serving /metrics");
    let stop = stop_on_signal();
    Engine::new(config)
        .with_instance_id(a.instance_id)
        .with_samples_dir(a.samples_dir)
        .run_kafka(stop)
        .await
        .map_err(|e| chain(&e))
}

async fn demo(a: DemoArgs) -> CliResult {
    let mut config = load(&a.pipeline)?;
    if config.source.kind != SourceKind::Simulator {
        return Err(format!(
            "{}: `demo` needs source.kind = \"simulator\"",
            a.pipeline.display()
        ));
    }
    if let Some(r) = a.rooms {
        config.simulator.rooms = r;
    }
    if let Some(s) = a.seed {
        config.simulator.seed = s;
    }
    if let Some(d) = a.day {
        config.simulator.day = d;
    }
    if let Some(s) = a.speed {
        config.simulator.speed = s;
    }
    if a.no_video {
        config.simulator.video = false;
    }
    crate::metrics::install(a.metrics_addr)
        .map_err(|e| format!("metrics endpoint on {}: {e}", a.metrics_addr))?;
    crate::metrics::register(&config);
    let start = a.start_ms.unwrap_or_else(default_start_ms);
    let sim_cfg = sim_config(
        &config.simulator,
        start,
        a.duration.as_millis() as i64,
        config.runtime.tick_ms,
    );
    println!(
        "onair demo: {} rooms, {} of event time at {}x, metrics on http://{}/metrics",
        config.simulator.rooms,
        humantime::format_duration(a.duration),
        config.simulator.speed,
        a.metrics_addr
    );
    let sim = tokio::task::spawn_blocking(move || Simulator::new(sim_cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| chain(&e))?;
    let truth_sim_rooms = sim.rooms().to_vec();
    let console = Arc::new(ConsoleSink::new());
    let stop = stop_on_signal();
    let printer = if a.quiet {
        None
    } else {
        let view = console.clone();
        let stop = stop.clone();
        Some(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(2));
            every.tick().await;
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                let table = view.render(5);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "\n{table}");
            }
        }))
    };
    let config_highlight = config.operators.highlight.enabled;
    let engine = Engine::new(config);
    let started = Instant::now();
    let sink: Arc<dyn crate::sinks::Sink> = match &a.samples_dir {
        Some(dir) => Arc::new(SampleFiles::new(console.clone(), dir)),
        None => console.clone(),
    };
    let run = engine
        .run_simulated(sim, sink, stop.clone())
        .await
        .map_err(|e| chain(&e))?;
    stop.store(true, Ordering::SeqCst);
    if let Some(p) = printer {
        p.abort();
    }
    let totals = console.totals();
    println!("\n{}", console.render(usize::MAX));
    println!(
        "summary: {} rooms, {} room-ticks, {} comments, {} gifts worth {}, {} transcript segments, {} feature records, {} training samples, {} highlight scores, {} highlights, {} dead letters, {} replayed duplicates, {} conflicting, in {:.1}s",
        totals.rooms,
        totals.ticks,
        totals.comments,
        totals.gifts,
        totals.gift_value,
        totals.transcripts,
        totals.feature_ticks,
        totals.training_samples,
        totals.highlight_scores,
        totals.highlights,
        totals.dead_letters,
        totals.duplicates,
        totals.conflicting,
        started.elapsed().as_secs_f64()
    );
    let detected = console.highlights();
    let span = |s: i64, e: i64| {
        if e == 0 {
            format!("{}s-(open)", (s - start) / 1000)
        } else {
            format!("{}s-{}s", (s - start) / 1000, (e - start) / 1000)
        }
    };
    for room in truth_sim_rooms
        .iter()
        .filter(|r| !r.highlights.is_empty())
        .take(8)
    {
        let truth: Vec<String> = room.highlights.iter().map(|&(s, e)| span(s, e)).collect();
        let found: Vec<String> = detected
            .iter()
            .filter(|h| h.room_id == room.room_id)
            .map(|h| span(h.start_time_ms, h.end_time_ms))
            .collect();
        if config_highlight {
            println!(
                "  {} highlights: truth {}; detected {}",
                room.room_id,
                truth.join(", "),
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            );
        } else {
            println!(
                "  {} highlights (truth): {}",
                room.room_id,
                truth.join(", ")
            );
        }
    }
    let mut truth = run.simulator.truth().clone();
    truth.close_until(run.summary.simulated_until_ms);
    if let Some(path) = &a.truth {
        write_truth(&truth, path)?;
    }
    let comparison = truth.compare(&console.stats());
    println!("check: {comparison}");
    if comparison.is_exact() {
        Ok(())
    } else {
        Err("the engine's room stats differ from the simulator's ground truth".into())
    }
}

/// `onair sequences`: every simulated user's whole sequence (no bounds but
/// the run's length), folded by the engine's own rules.
fn sequences(a: SequencesArgs) -> CliResult {
    use crate::state::sequence::{rebuild, Act, Bounds, Source};
    let mut config = match &a.pipeline {
        Some(p) => load(p)?,
        None => PipelineConfig::default(),
    };
    let s = &mut config.simulator;
    if let Some(x) = a.seed {
        s.seed = x;
    }
    if let Some(d) = a.day {
        s.day = d;
    }
    if let Some(r) = a.rooms {
        s.rooms = r;
    }
    if let Some(v) = a.viewers {
        s.viewers = v;
    }
    (s.video, s.audio, s.speech, s.short_videos) = (false, false, false, true);
    let duration = a.duration.as_millis() as i64;
    let sim_cfg = sim_config(
        &config.simulator,
        a.start_ms,
        duration,
        config.runtime.tick_ms,
    );
    let mut sim = Simulator::new(sim_cfg).map_err(|e| chain(&e))?;
    let mut acts: std::collections::BTreeMap<String, Vec<Act>> = Default::default();
    let mut offset = 0i64;
    let step = 60_000;
    let mut t = a.start_ms;
    while t < a.start_ms + duration {
        t = (t + step).min(a.start_ms + duration);
        for event in sim.advance(t).map_err(|e| chain(&e))? {
            offset += 1;
            let (user, act) = match &event {
                SimEvent::Action(v) => {
                    let source = Source {
                        stream: 0,
                        partition: 0,
                        offset,
                    };
                    (&v.user_id, Act::live(v, source, None))
                }
                SimEvent::ShortVideo(v) => {
                    let source = Source {
                        stream: 1,
                        partition: 0,
                        offset,
                    };
                    (&v.user_id, Act::short_video(v, source))
                }
                _ => continue,
            };
            if let Some(act) = act {
                acts.entry(user.clone()).or_default().push(act);
            }
        }
    }
    let bounds = Bounds {
        live_max: usize::MAX,
        short_video_max: usize::MAX,
        live_max_age_ms: i64::MAX / 4,
        short_video_max_age_ms: i64::MAX / 4,
        long_view_ms: config.operators.user_sequences.long_view_ms,
    };
    let file = std::fs::File::create(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let (mut users, mut behaviours) = (0usize, 0usize);
    for (user, acts) in &acts {
        let fold = rebuild(acts, &bounds, None);
        let list: Vec<serde_json::Value> = fold
            .behaviours()
            .into_iter()
            .map(|b| {
                serde_json::json!({
                    "t": b.start_ms,
                    "domain": b.domain.name(),
                    "item": &*b.item,
                    "owner": &*b.owner,
                    "dense": crate::models::interests::dense(b),
                })
            })
            .collect();
        users += 1;
        behaviours += list.len();
        let line = serde_json::json!({ "user": user, "behaviours": list });
        writeln!(out, "{line}").map_err(|e| format!("{}: {e}", a.out.display()))?;
    }
    out.flush()
        .map_err(|e| format!("{}: {e}", a.out.display()))?;
    println!(
        "onair sequences: {users} users, {behaviours} behaviours -> {}",
        a.out.display()
    );
    Ok(())
}

async fn simulate(a: SimulateArgs) -> CliResult {
    let mut config = match &a.pipeline {
        Some(p) => load(p)?,
        None => PipelineConfig::default(),
    };
    config.kafka.brokers = a.brokers.clone();
    if let Some(p) = a.partitions {
        config.kafka.topics.partitions = p;
    }
    let s = &mut config.simulator;
    if let Some(r) = a.rooms {
        s.rooms = r;
    }
    if let Some(x) = a.seed {
        s.seed = x;
    }
    if let Some(d) = a.day {
        s.day = d;
    }
    if let Some(c) = a.comments_per_sec {
        s.comments_per_sec = c;
    }
    if let Some(v) = a.viewers {
        s.viewers = v;
    }
    match a.fps {
        Some(0) => s.video = false,
        Some(f) => s.video_fps = f,
        None => {}
    }
    if a.no_audio {
        s.audio = false;
    }
    if a.no_speech {
        s.speech = false;
    }
    ensure_topics(&config.kafka, &pipeline_topics(&config.kafka))
        .await
        .map_err(|e| chain(&e))?;
    let start = a.start_ms.unwrap_or_else(default_start_ms);
    let sim_cfg = sim_config(
        &config.simulator,
        start,
        a.duration.as_millis() as i64,
        config.runtime.tick_ms,
    );
    let sim = tokio::task::spawn_blocking(move || Simulator::new(sim_cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| chain(&e))?;
    let opts = PublishOptions {
        speed: if a.speed > 0.0 {
            a.speed
        } else {
            f64::INFINITY
        },
        json_every: a.json_every,
        ..PublishOptions::default()
    };
    info!(brokers = %a.brokers, rooms = config.simulator.rooms, start_ms = start, "publishing simulated rooms");
    let (sim, report) = publish(sim, &config.kafka, &opts)
        .await
        .map_err(|e| chain(&e))?;
    eprintln!(
        "published video={} audio={} comments={} actions={} short_video_actions={} ({} bytes) in {:.1}s",
        report.records[0],
        report.records[1],
        report.records[2],
        report.records[3],
        report.records[4],
        report.bytes,
        report.wall.as_secs_f64()
    );
    if let Some(path) = a.truth {
        write_truth(sim.truth(), &path)?;
    }
    Ok(())
}

/// `onair topics`: create what is missing, then compare every topic with the
/// pipeline.
async fn topics(a: TopicsArgs) -> CliResult {
    let mut config = load(&a.pipeline)?;
    if let Some(b) = a.brokers {
        config.kafka.brokers = b;
    }
    if let Some(p) = a.partitions {
        config.kafka.topics.partitions = p;
    }
    let retention = a.media_retention_ms.filter(|ms| !ms.is_empty());
    let mut specs = pipeline_topics(&config.kafka);
    if let Some(r) = &retention {
        let t = &config.kafka.topics;
        for s in specs
            .iter_mut()
            .filter(|s| s.name == t.video || s.name == t.audio)
        {
            s.configs.push(("retention.ms", r));
        }
    }
    let counts = || {
        let kafka = config.kafka.clone();
        async move {
            tokio::task::spawn_blocking(move || partition_counts(&kafka, Duration::from_secs(5)))
                .await
                .map_err(|e| e.to_string())
        }
    };
    let deadline = Instant::now() + a.wait;
    while let Err(e) = counts().await? {
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer from {} within {}: {}",
                config.kafka.brokers,
                humantime::format_duration(a.wait),
                chain(&e)
            ));
        }
        info!(brokers = %config.kafka.brokers, error = %e, "waiting for the cluster");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    ensure_topics_replicated(&config.kafka, &specs, a.replication_factor)
        .await
        .map_err(|e| chain(&e))?;
    // A topic just created may take a moment to show in the metadata.
    let settle = Instant::now() + Duration::from_secs(10);
    let checks = loop {
        let counts = counts().await?.map_err(|e| chain(&e))?;
        let checks = check_topics(&config.kafka, &specs, &counts)
            .await
            .map_err(|e| chain(&e))?;
        if checks.iter().all(|c| c.partitions.is_some()) || Instant::now() >= settle {
            break checks;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    print!("{}", topics_table(&checks));
    let differ: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name.as_str())
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} of {} topics differ from {}: {} (a partition count cannot be changed in place: \
         recreate the topic; configs can be set with the cluster's tools)",
        differ.len(),
        checks.len(),
        a.pipeline.display(),
        differ.join(", ")
    ))
}

/// Milliseconds, or empty for none (an unset setting passed on as an empty
/// variable, as docker-compose.yml does).
fn optional_ms(s: &str) -> Result<String, std::num::ParseIntError> {
    if !s.is_empty() {
        s.parse::<i64>()?;
    }
    Ok(s.to_string())
}

/// What `onair topics` prints: one row per topic, each stated value as the
/// cluster holds it, with the stated one beside it where they differ.
fn topics_table(checks: &[TopicCheck]) -> String {
    let rows: Vec<[String; 4]> = checks
        .iter()
        .map(|c| {
            let partitions = match c.partitions {
                Some(n) if n == c.want_partitions => n.to_string(),
                Some(n) => format!("{n} (want {})", c.want_partitions),
                None => format!("missing (want {})", c.want_partitions),
            };
            let configs: Vec<String> = c
                .configs
                .iter()
                .map(|(k, want, got)| match got {
                    Some(g) if g == want => format!("{k}={g}"),
                    Some(g) => format!("{k}={g} (want {want})"),
                    None => format!("{k}=? (want {want})"),
                })
                .collect();
            let status = match &c.error {
                Some(e) => format!("configs unreadable: {e}"),
                None if c.ok() => "ok".into(),
                None => "DIFFERS".into(),
            };
            [c.name.clone(), partitions, configs.join(" "), status]
        })
        .collect();
    let head = ["TOPIC", "PARTITIONS", "CONFIGS", "STATUS"].map(String::from);
    let mut width = [0usize; 3];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Writes a simulated run's ground truth as JSON lines.
fn write_truth(truth: &crate::simulator::truth::GroundTruth, path: &Path) -> CliResult {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    truth
        .write_jsonl(&mut w)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.flush().map_err(|e| format!("{}: {e}", path.display()))
}

fn validate(files: &[PathBuf]) -> CliResult {
    let mut failed = 0;
    for f in files {
        match PipelineConfig::load(f) {
            Ok(_) => println!("{}: ok", f.display()),
            Err(e) => {
                failed += 1;
                println!("{}: {e}", f.display());
            }
        }
    }
    if failed > 0 {
        Err(format!(
            "{failed} of {} pipeline file(s) invalid",
            files.len()
        ))
    } else {
        Ok(())
    }
}

/// Renders one record of a known type as JSON.
pub fn record_json(record_type: &str, payload: &[u8]) -> Result<serde_json::Value, String> {
    fn enc<M: prost::Message + Default + serde::Serialize>(
        b: &[u8],
    ) -> Result<serde_json::Value, String> {
        let m = M::decode(b).map_err(|e| e.to_string())?;
        serde_json::to_value(&m).map_err(|e| e.to_string())
    }
    match record_type {
        "room-stats" => enc::<RoomStats>(payload),
        "dead-letter" => enc::<schema::DeadLetter>(payload),
        "comment" => enc::<schema::Comment>(payload),
        "action" => enc::<schema::ViewerAction>(payload),
        "audio" => enc::<schema::AudioChunk>(payload).map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "payload".into(),
                    serde_json::json!(format!("<{} bytes>", payload.len())),
                );
            }
            v
        }),
        "video" => enc::<schema::VideoSegment>(payload).map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "payload".into(),
                    serde_json::json!(format!("<{} bytes>", payload.len())),
                );
            }
            v
        }),
        other => Err(format!("unknown record type {other:?}")),
    }
}

fn guess_type(topic: &str) -> &'static str {
    if topic.contains("stats") {
        "room-stats"
    } else if topic.contains("dead") {
        "dead-letter"
    } else if topic.contains("comment") {
        "comment"
    } else if topic.contains("video") {
        "video"
    } else if topic.contains("audio") {
        "audio"
    } else {
        "action"
    }
}

async fn tail(a: TailArgs) -> CliResult {
    let record_type = a
        .record_type
        .clone()
        .unwrap_or_else(|| guess_type(&a.topic).to_string());
    tokio::task::spawn_blocking(move || tail_blocking(&a, &record_type))
        .await
        .map_err(|e| e.to_string())?
}

fn tail_blocking(a: &TailArgs, record_type: &str) -> CliResult {
    let cfg = crate::config::KafkaConfig {
        brokers: a.brokers.clone(),
        ..Default::default()
    };
    let mut c = client_config(&cfg);
    c.set("group.id", format!("onair-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = c.create().map_err(|e| e.to_string())?;
    consumer.subscribe(&[&a.topic]).map_err(|e| e.to_string())?;
    let mut seen = 0u64;
    let mut last = Instant::now();
    let stdout = std::io::stdout();
    loop {
        if a.max.is_some_and(|m| seen >= m) || a.idle.is_some_and(|d| last.elapsed() > d) {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                seen += 1;
                last = Instant::now();
                let mut line = match record_json(record_type, msg.payload().unwrap_or_default()) {
                    Ok(v) => v,
                    Err(e) => serde_json::json!({ "error": e }),
                };
                if let Some(o) = line.as_object_mut() {
                    o.insert("_partition".into(), msg.partition().into());
                    o.insert("_offset".into(), msg.offset().into());
                    if let Some(h) = msg.headers() {
                        for hdr in h.iter() {
                            if let Some(v) = hdr.value {
                                o.insert(
                                    format!("_header_{}", hdr.key),
                                    String::from_utf8_lossy(v).into(),
                                );
                            }
                        }
                    }
                }
                let mut out = stdout.lock();
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
            Some(Err(e)) => eprintln!("warning: {e}"),
            None => {}
        }
    }
    Ok(())
}

fn graph(a: GraphArgs) -> CliResult {
    use crate::graph::job::{self, GraphJob};
    let mut config = match &a.pipeline {
        Some(p) => load(p)?,
        None => PipelineConfig::default(),
    };
    if let Some(b) = &a.brokers {
        config.kafka.brokers = b.clone();
    }
    if let Some(s) = a.seed {
        config.simulator.seed = s;
    }
    if let Some(r) = a.rooms {
        config.simulator.rooms = r;
    }
    let mut j = GraphJob::new(a.out.clone());
    j.incremental = !a.full;
    #[cfg(feature = "torch")]
    {
        j.graphcl.dim = a.dim;
        j.graphcl.steps = a.steps;
        j.graphcl.threads = a.threads;
    }
    #[cfg(not(feature = "torch"))]
    let _ = (a.dim, a.steps, a.threads);
    let (mut g, previous) = j.start().map_err(|e| e.to_string())?;
    let after = g.through_ms();
    let mut inputs = serde_json::Map::new();
    inputs.insert(
        "previous".into(),
        previous.map(|p| p.display().to_string()).into(),
    );
    inputs.insert("after_ms".into(), after.into());
    for f in &a.gifts {
        let (merged, skipped) =
            job::read_gifts_jsonl(&mut g, f, after).map_err(|e| e.to_string())?;
        inputs.insert(
            f.display().to_string(),
            serde_json::json!({"merged": merged, "skipped": skipped}),
        );
    }
    if let Some(days) = a.simulate_days {
        let base = crate::simulator::sim_config(
            &config.simulator,
            crate::simulator::default_start_ms(),
            a.duration.as_millis() as i64,
            config.runtime.tick_ms,
        );
        let merged = job::simulate_gifts(&mut g, &base, days, after).map_err(|e| e.to_string())?;
        inputs.insert(
            "simulator".into(),
            serde_json::json!({"seed": base.seed, "rooms": base.rooms, "days": days,
                "duration_ms": base.duration_ms, "merged": merged}),
        );
    } else if a.pipeline.is_some() {
        let topic = config.kafka.topics.actions.clone();
        let read = job::read_gifts_kafka(&mut g, &config.kafka, &topic, after, &config.limits)
            .map_err(|e| e.to_string())?;
        inputs.insert(topic, serde_json::to_value(&read).unwrap_or_default());
    }
    if g.edges() == 0 {
        return Err("no gift events in the inputs (and no earlier version to start from)".into());
    }
    let (dir, meta) = j.finish(&g, inputs.into()).map_err(|e| e.to_string())?;
    info!(dir = %dir.display(), users = g.users(), streamers = g.streamers(), edges = g.edges(), "graph tables written");
    println!("{meta}");
    Ok(())
}
