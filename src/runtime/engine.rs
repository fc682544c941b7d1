//! The engine: wires a source, one partition task per partition and a sink
//! for a pipeline, and runs them until the input ends or a stop is asked.
//!
//! Not for: command-line concerns (flags, printing); see `cli`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::feed::StreamReader;
use super::partition::{Checkpoint, Control, PartitionHandle, PartitionSpec, PartitionTask};
use crate::config::{MediaConfig, PipelineConfig};
use crate::decode::pool::DecodePool;
use crate::kafka::{ensure_topics, pipeline_topics, KafkaFailure};
use crate::models::asr::{AsrBudget, AsrPool};
use crate::models::whisper::Whisper;
use crate::models::ModelError;
use crate::operators::{self, Services};
use crate::schema::InputKind;
use crate::simulator::{SimError, Simulator};
use crate::sinks::kafka::KafkaSink;
use crate::sinks::Sink;
use crate::sources::kafka::{KafkaSource, StageTopics, TaskFactory};

use super::partition::ReplayMarks;
use super::transactions::Transactions;
use crate::config::Guarantee;

/// Why a run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Kafka could not be used.
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
    /// The simulator failed.
    #[error(transparent)]
    Simulator(#[from] SimError),
    /// A model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A thread of ours died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl crate::error::Classify for EngineError {
    fn fault(&self) -> crate::error::Fault {
        match self {
            EngineError::Kafka(e) => e.fault(),
            EngineError::Simulator(_) => crate::error::Fault::External,
            EngineError::Model(e) => e.fault(),
            EngineError::Internal(_) => crate::error::Fault::Internal,
        }
    }
}

/// What a finite run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Simulated event time reached.
    pub simulated_until_ms: i64,
    /// Wall time taken.
    pub wall: Duration,
    /// Final checkpoints of every partition.
    pub checkpoints: Vec<Checkpoint>,
}

/// A finished simulated run: its summary and the simulator, whose ground
/// truth covers what was fed.
pub struct SimulatedRun {
    /// The summary.
    pub summary: RunSummary,
    /// The simulator after the run.
    pub simulator: Simulator,
}

/// A pipeline ready to run.
pub struct Engine {
    config: PipelineConfig,
    instance_id: Option<String>,
    samples_dir: Option<std::path::PathBuf>,
    /// The instance's transactions once `run_kafka` started (exactly-once).
    transactions: std::sync::OnceLock<Arc<Transactions>>,
}

impl Engine {
    /// An engine for a validated pipeline.
    pub fn new(config: PipelineConfig) -> Self {
        Engine {
            config,
            instance_id: None,
            samples_dir: None,
            transactions: std::sync::OnceLock::new(),
        }
    }

    /// Static group membership under this id (see `KafkaSource::new`).
    pub fn with_instance_id(mut self, id: Option<String>) -> Self {
        self.instance_id = id;
        self
    }

    /// Also appends training samples to files under `dir` (see
    /// [`crate::sinks::samples`]).
    pub fn with_samples_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.samples_dir = dir;
        self
    }

    /// The pipeline.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The commit rounds of a running exactly-once engine (for tests that
    /// break its transactions).
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        self.transactions.get()
    }

    #[allow(clippy::too_many_arguments)]
    fn spec(
        config: &PipelineConfig,
        partition: i32,
        sink: Arc<dyn Sink>,
        reader: Option<Box<dyn StreamReader>>,
        replayed_through: Option<i64>,
        marks: Option<ReplayMarks>,
        media: &Media,
        services: &Services,
    ) -> PartitionSpec {
        let operators = operators::build(config, services).unwrap_or_else(|e| {
            // Loaded once already at start (see `services`), so this is
            // unexpected; the partition still runs its other operators.
            tracing::error!(partition, error = %e, "an operator could not be built; the partition runs without it");
            operators::build(config, &Services::default()).unwrap_or_default()
        });
        // Read from and written to Kafka: the rooms' lasting state goes to
        // the room changelog.
        let kafka = reader.is_some() && config.sink.kind == crate::config::SinkKind::Kafka;
        let changelog = kafka && config.runtime.snapshot_interval_ms > 0;
        PartitionSpec {
            partition,
            kinds: &InputKind::ROOM,
            runtime: config.runtime.clone(),
            limits: config.limits,
            dead_letters: config.dead_letters.clone(),
            operators,
            sink,
            reader,
            wait_for_backlog: false,
            replayed_through,
            marks,
            media: media.clone(),
            checkpoint_every: Duration::from_millis(
                u64::from(config.kafka.commit_interval_ms).max(50),
            ),
            changelog: changelog.then(|| {
                Box::new(crate::sources::changelog::KafkaChangelog::new(
                    &config.kafka,
                    &config.kafka.topics.room_state,
                )) as Box<dyn crate::runtime::ChangelogReader>
            }),
            snapshot_every: changelog
                .then(|| Duration::from_millis(config.runtime.snapshot_interval_ms)),
            progress: (kafka && operators::writes_room_table(config, services))
                .then_some(config.kafka.topics.partitions),
        }
    }

    /// A user-stage partition's task: the user-keyed streams, no media.
    fn user_spec(
        config: &PipelineConfig,
        partition: i32,
        sink: Arc<dyn Sink>,
        reader: Box<dyn StreamReader>,
        replayed_through: Option<i64>,
        marks: Option<ReplayMarks>,
        services: &Services,
    ) -> PartitionSpec {
        PartitionSpec {
            partition,
            kinds: &InputKind::USER,
            runtime: config.runtime.clone(),
            limits: config.limits,
            dead_letters: config.dead_letters.clone(),
            operators: operators::build_users(config, services),
            sink,
            reader: Some(reader),
            wait_for_backlog: false,
            replayed_through,
            marks,
            media: None,
            checkpoint_every: Duration::from_millis(
                u64::from(config.kafka.commit_interval_ms).max(50),
            ),
            // The user stage's state is changelogged (user sequences, MMBee scoring).
            changelog: config.user_stage().then(|| {
                Box::new(crate::sources::changelog::KafkaChangelog::new(
                    &config.kafka,
                    &config.kafka.topics.user_state,
                )) as Box<dyn crate::runtime::ChangelogReader>
            }),
            // Its operators write their changelog at their own ticks.
            snapshot_every: None,
            progress: None,
        }
    }

    /// Runs as a consumer-group member until `stop` is set; then drains,
    /// commits and leaves the group.
    pub async fn run_kafka(&self, stop: Arc<AtomicBool>) -> Result<(), EngineError> {
        let config = self.config.clone();
        if config.kafka.topics.create {
            ensure_topics(&config.kafka, &pipeline_topics(&config.kafka)).await?;
        }
        let sink = Arc::new(match config.kafka.guarantee {
            Guarantee::AtLeastOnce => KafkaSink::new(&config.kafka)?,
            Guarantee::ExactlyOnce => {
                let id = transactional_id(&config.kafka.group_id, self.instance_id.as_deref());
                info!(transactional_id = %id, "exactly-once: outputs commit in transactions");
                KafkaSink::transactional(&config.kafka, &id)?
            }
        });
        let txn = sink.transactions().map(|producer| {
            Arc::new(Transactions::new(
                producer,
                Duration::from_millis(config.runtime.drain_timeout_ms) + Duration::from_secs(2),
            ))
        });
        if let Some(t) = &txn {
            let _ = self.transactions.set(Arc::clone(t));
        }
        let media = media_stage(&config)?;
        let mut services = services(&config)?;
        let handle = tokio::runtime::Handle::current();
        let mut pollers = Vec::new();
        if config.user_stage() {
            // The room stage writes its content progress with the content:
            // the table waits for it.
            let table = if operators::writes_room_table(&config, &services) {
                crate::sources::room_table::RoomTable::gated()
            } else {
                crate::sources::room_table::RoomTable::new()
            };
            services.room_table = Some(table.clone());
            let (kafka, topic, table_stop) = (
                config.kafka.clone(),
                config.kafka.topics.room_embeddings.clone(),
                stop.clone(),
            );
            let follower = std::thread::Builder::new()
                .name("room-table".into())
                .spawn(move || {
                    if let Err(e) = crate::sources::room_table::follow(&kafka, &topic, table, table_stop) {
                        tracing::error!(error = %e, "the room table stopped: rooms' content is no longer updated");
                    }
                })
                .map_err(|e| EngineError::Internal(format!("cannot start the room table: {e}")))?;
            pollers.push(follower);
            let (user_config, user_sink, user_services, user_handle) = (
                config.clone(),
                sink.clone(),
                services.clone(),
                handle.clone(),
            );
            let factory: Arc<TaskFactory> =
                Arc::new(move |partition, replayed_through, marks, reader| {
                    let _guard = user_handle.enter();
                    PartitionTask::spawn(Self::user_spec(
                        &user_config,
                        partition,
                        user_sink.clone(),
                        reader,
                        replayed_through,
                        marks,
                        &user_services,
                    ))
                });
            let source = KafkaSource::new(
                &config,
                StageTopics::users(&config),
                factory,
                self.instance_id.as_deref(),
                txn.clone(),
            )?;
            let user_stop = stop.clone();
            pollers.push(
                std::thread::Builder::new()
                    .name("kafka-poll-users".into())
                    .spawn(move || source.run(user_stop))
                    .map_err(|e| {
                        EngineError::Internal(format!("cannot start the poll thread: {e}"))
                    })?,
            );
            info!(group = %StageTopics::users(&config).group_id, "user stage consuming");
        }
        let task_sink: Arc<dyn Sink> = match &self.samples_dir {
            Some(dir) => Arc::new(crate::sinks::samples::SampleFiles::new(sink.clone(), dir)),
            None => sink.clone(),
        };
        let task_config = config.clone();
        let factory: Arc<TaskFactory> =
            Arc::new(move |partition, replayed_through, marks, reader| {
                let _guard = handle.enter();
                PartitionTask::spawn(Self::spec(
                    &task_config,
                    partition,
                    task_sink.clone(),
                    Some(reader),
                    replayed_through,
                    marks,
                    &media,
                    &services,
                ))
            });
        let source = KafkaSource::new(
            &config,
            StageTopics::rooms(&config),
            factory,
            self.instance_id.as_deref(),
            txn.clone(),
        )?;
        if let Some(txn) = txn {
            let (every, txn_stop) = (
                Duration::from_millis(u64::from(config.kafka.commit_interval_ms).max(50)),
                stop.clone(),
            );
            pollers.push(
                std::thread::Builder::new()
                    .name("transactions".into())
                    .spawn(move || txn.run(every, &txn_stop))
                    .map_err(|e| {
                        EngineError::Internal(format!("cannot start the transactions: {e}"))
                    })?,
            );
        }
        info!(brokers = %config.kafka.brokers, group = %config.kafka.group_id, "consuming");
        pollers.push(
            std::thread::Builder::new()
                .name("kafka-poll".into())
                .spawn(move || source.run(stop))
                .map_err(|e| EngineError::Internal(format!("cannot start the poll thread: {e}")))?,
        );
        for poller in pollers {
            tokio::task::spawn_blocking(move || poller.join())
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))?
                .map_err(|_| EngineError::Internal("a poll thread panicked".into()))?;
        }
        let flushed = tokio::task::spawn_blocking(move || sink.flush(Duration::from_secs(5))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!(
                "producer flush did not complete; unacknowledged outputs will be replayed"
            );
        }
        Ok(())
    }

    /// Runs the pipeline on the in-process simulator (no broker): every
    /// simulated room goes through the same tasks and operators as on Kafka.
    pub async fn run_simulated(
        &self,
        sim: Simulator,
        sink: Arc<dyn Sink>,
        stop: Arc<AtomicBool>,
    ) -> Result<SimulatedRun, EngineError> {
        let started = Instant::now();
        let partitions = self.config.simulator.partitions.max(1);
        let media = media_stage(&self.config)?;
        let services = services(&self.config)?;
        let tasks: Vec<PartitionHandle> = (0..partitions as i32)
            .map(|p| {
                PartitionTask::spawn(Self::spec(
                    &self.config,
                    p,
                    sink.clone(),
                    None,
                    None,
                    None,
                    &media,
                    &services,
                ))
            })
            .collect();
        let (simulator, until) =
            crate::sources::simulator::feed(sim, &tasks, self.config.simulator.speed, stop).await?;
        let mut checkpoints = Vec::new();
        for task in &tasks {
            if let Some(cp) = drain_async(
                task,
                Duration::from_millis(self.config.runtime.drain_timeout_ms) * 4,
            )
            .await
            {
                checkpoints.push(cp);
            }
        }
        Ok(SimulatedRun {
            summary: RunSummary {
                simulated_until_ms: until,
                wall: started.elapsed(),
                checkpoints,
            },
            simulator,
        })
    }
}

/// The `transactional.id` of an instance's producer: stable across restarts
/// of a static member (so the restarted instance fences its predecessor and
/// aborts its open transaction), unique otherwise.
fn transactional_id(group_id: &str, instance_id: Option<&str>) -> String {
    match instance_id {
        Some(id) => format!("{group_id}-{id}"),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{group_id}-{}-{nanos}", std::process::id())
        }
    }
}

/// Media decoding's settings and pool, shared by every partition task.
type Media = Option<(Arc<MediaConfig>, Arc<DecodePool>)>;

fn media_stage(config: &PipelineConfig) -> Result<Media, EngineError> {
    if !config.media.enabled {
        return Ok(None);
    }
    crate::decode::init().map_err(|e| EngineError::Internal(e.to_string()))?;
    let pool = DecodePool::new(config.media.threads)
        .map_err(|e| EngineError::Internal(format!("cannot start the decode pool: {e}")))?;
    info!(threads = pool.size(), "media decode pool started");
    Ok(Some((Arc::new(config.media.clone()), pool)))
}

/// Loads what operators share: Whisper and its pool when speech is on (and
/// the VAD model once, so that a missing file fails the start, not a
/// partition).
fn services(config: &PipelineConfig) -> Result<Services, EngineError> {
    let mut services = Services::default();
    let us = &config.operators.user_sequences;
    if us.enabled && !us.interests_model.is_empty() {
        let m = crate::models::interests::InterestModel::load(std::path::Path::new(
            &us.interests_model,
        ))?;
        info!(model = %m.label(), "compressed interests");
        services.interests = Some(Arc::new(m));
    }
    let sp = &config.operators.speech;
    if (sp.enabled || config.operators.features.enabled) && config.media.enabled {
        let ort = (!sp.onnxruntime.is_empty()).then(|| std::path::Path::new(&sp.onnxruntime));
        crate::models::onnx::init_onnx_runtime(ort)?;
    }
    let fc = &config.operators.features;
    if fc.enabled && config.media.enabled {
        let enc = crate::operators::features::Encoders::start(Arc::new(fc.clone()))?;
        info!(
            image = %enc.image.label(),
            text = %enc.text.label(),
            backend = %fc.backend,
            "encoders serving"
        );
        services.features = Some(Arc::new(enc));
        let hc = &config.operators.highlight;
        if hc.enabled {
            let svc = crate::operators::highlight::HighlightService::start(Arc::new(hc.clone()))?;
            info!(model = %svc.model.label(), "highlight model serving");
            services.highlight = Some(Arc::new(svc));
        }
        let mb = &config.operators.mmbee;
        // Gift prediction: MMBee on with a model (without one, samples only;
        // the user stage may run for the sequences alone).
        if mb.enabled && !mb.model.is_empty() {
            let svc = crate::models::mmbee::MmbeeService::start(mb)?;
            info!(model = %svc.label(), graph = svc.graph_version(), "MMBee serving");
            services.mmbee = Some(Arc::new(svc));
        }
    }
    if !sp.enabled || !config.media.enabled {
        return Ok(services);
    }
    crate::models::vad::SileroVad::load(std::path::Path::new(&sp.vad_model))?;
    let path = std::path::Path::new(&sp.whisper_model);
    let whisper = Arc::new(Whisper::load(path)?);
    let version = format!(
        "whisper@{}",
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("unknown")
    );
    let budget = AsrBudget {
        max_concurrent: sp.max_concurrent,
        threads_per_job: sp.threads_per_job,
        max_queued: sp.max_queued,
        language: (sp.language != "auto").then(|| sp.language.clone()),
        candidates: sp.languages.clone(),
    };
    let pool = AsrPool::start(whisper, version, &budget)
        .map_err(|e| EngineError::Internal(format!("cannot start the ASR pool: {e}")))?;
    info!(threads = pool.threads(), model = %sp.whisper_model, "speech recognition pool started");
    services.speech = Some((Arc::new(sp.clone()), pool));
    Ok(services)
}

/// Asks a task to drain and waits for its checkpoint without blocking the runtime.
async fn drain_async(task: &PartitionHandle, timeout: Duration) -> Option<Checkpoint> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    task.control.send(Control::Drain { reply: tx }).ok()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(cp) => return Some(cp),
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    None
}
