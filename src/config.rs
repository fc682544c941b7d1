//! Pipeline files: what a deployment reads, processes and writes. One TOML
//! file per pipeline (see `pipelines/`), validated as a whole so that a user
//! sees every mistake at once, each with the path of its field.
//!
//! Not for: runtime behaviour of one process (metrics address, log level,
//! durations); those are command-line flags.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::schema::Limits;

/// A whole pipeline.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Where records come from.
    pub source: SourceConfig,
    /// Kafka connection and topic names (used by the kafka source and sink).
    pub kafka: KafkaConfig,
    /// The built-in simulator (used by the simulator source).
    pub simulator: SimulatorConfig,
    /// Event-time processing.
    pub runtime: RuntimeConfig,
    /// Input size limits.
    pub limits: Limits,
    /// Where results go.
    pub sink: SinkConfig,
    /// Dead-letter policy.
    pub dead_letters: DeadLetterConfig,
    /// Media decoding.
    pub media: MediaConfig,
    /// Operators and their settings.
    pub operators: OperatorsConfig,
}

/// Which source feeds the pipeline.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Kafka topics (see `[kafka]`).
    #[default]
    Kafka,
    /// The in-process simulator (see `[simulator]`): no broker needed.
    Simulator,
}

/// `[source]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// `kafka` or `simulator`.
    pub kind: SourceKind,
}

/// `[kafka]`.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`. The `--brokers` flag overrides it.
    pub brokers: String,
    /// Consumer group shared by every instance of this pipeline.
    pub group_id: String,
    /// How the group assigns partitions to members: `cooperative-sticky`
    /// (the default: a rebalance moves only the partitions that change
    /// owner, the others keep working) or the eager `range` / `roundrobin`
    /// (every member gives up all its partitions, drains and commits them,
    /// then gets its new set). All members of a group must agree.
    pub assignment: Assignment,
    /// What a crash may do to the outputs: `at-least-once` (the default:
    /// after a crash, some outputs may be written again, as exact replays
    /// with the same ids) or `exactly-once` (outputs, changelog writes and
    /// input offsets commit together in one Kafka transaction per commit
    /// interval; read the outputs with `isolation.level=read_committed`).
    /// Exactly-once needs a broker with transactions and delays outputs to
    /// read_committed readers by up to `commit_interval_ms`.
    pub guarantee: Guarantee,
    /// Consumer session timeout (ms). A revoked partition is drained within
    /// `runtime.drain_timeout_ms`, which must be shorter.
    pub session_timeout_ms: u32,
    /// Longest gap between polls before the group considers the member
    /// stuck (ms). onair polls continuously (partition tasks read their own
    /// queues; the poll loop never waits for them), so this mainly bounds how long a rebalance waits for a
    /// member that died without leaving.
    pub max_poll_interval_ms: u32,
    /// How often safe offsets are committed (ms).
    pub commit_interval_ms: u32,
    /// How often librdkafka statistics (consumer lag) are refreshed (ms).
    pub statistics_interval_ms: u32,
    /// Producer linger (ms): how long outputs wait to be batched.
    pub linger_ms: u32,
    /// Largest message the producer sends (bytes); dead letters carry the
    /// original payload, so keep it above the input limits.
    pub message_max_bytes: u32,
    /// Topic names.
    pub topics: TopicsConfig,
    /// Extra librdkafka properties applied to every client (free-form), e.g.
    /// TLS (`security.protocol = "SSL"`, `ssl.ca.location`) and SASL
    /// (`sasl.mechanism`, `sasl.username`, `sasl.password`). A value may be
    /// `${env:NAME}` (an environment variable) or `${file:PATH}` (a file's
    /// contents, without the trailing newline), read when a client is made,
    /// so secrets stay out of pipeline files; secret values are never logged.
    pub properties: BTreeMap<String, String>,
}

/// `[kafka] assignment`: the consumer group's partition assignment strategy.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Assignment {
    /// Incremental (KIP-429): only moved partitions are revoked.
    #[default]
    #[serde(rename = "cooperative-sticky")]
    CooperativeSticky,
    /// Eager, contiguous ranges per member.
    #[serde(rename = "range")]
    Range,
    /// Eager, partitions dealt out in turn.
    #[serde(rename = "roundrobin")]
    RoundRobin,
}

impl Assignment {
    /// librdkafka's `partition.assignment.strategy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Assignment::CooperativeSticky => "cooperative-sticky",
            Assignment::Range => "range",
            Assignment::RoundRobin => "roundrobin",
        }
    }
}

/// `[kafka] guarantee`: the processing guarantee for outputs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Guarantee {
    /// Offsets are committed after the outputs they cover are acknowledged;
    /// a crash may write some outputs again (same ids, same bytes).
    #[default]
    #[serde(rename = "at-least-once")]
    AtLeastOnce,
    /// Outputs and offsets commit in one transaction (exactly-once v2).
    #[serde(rename = "exactly-once")]
    ExactlyOnce,
}

impl Guarantee {
    /// The name used in the pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::ExactlyOnce => "exactly-once",
        }
    }
}

/// Whether a librdkafka property holds a secret (its value is never printed).
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with("jaas.config")
        || k.ends_with("oauthbearer.config")
        || k == "ssl.key.pem"
        || k == "ssl_key"
}

/// What a `[kafka.properties]` value refers to.
enum PropertySource<'a> {
    Literal(&'a str),
    Env(&'a str),
    File(&'a str),
}

fn property_source(value: &str) -> Result<PropertySource<'_>, String> {
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else {
        return Ok(PropertySource::Literal(value));
    };
    if let Some(name) = inner.strip_prefix("env:") {
        let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        return if ok {
            Ok(PropertySource::Env(name))
        } else {
            Err(format!("{value:?}: not an environment variable name"))
        };
    }
    if let Some(path) = inner.strip_prefix("file:") {
        return if path.is_empty() {
            Err("${file:}: no path".into())
        } else {
            Ok(PropertySource::File(path))
        };
    }
    Err(format!(
        "{value:?}: only ${{env:NAME}} and ${{file:PATH}} are understood"
    ))
}

/// The value a `[kafka.properties]` entry stands for. The error names the
/// variable or file, never a value.
pub fn resolve_property(value: &str) -> Result<String, String> {
    match property_source(value)? {
        PropertySource::Literal(v) => Ok(v.to_owned()),
        PropertySource::Env(name) => std::env::var(name)
            .map_err(|_| format!("environment variable {name} is not set (or not UTF-8)")),
        PropertySource::File(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}")),
    }
}

impl KafkaConfig {
    /// Resolves every property reference (`${env:...}`, `${file:...}`), so a
    /// missing secret fails at start with the property's name rather than as
    /// an authentication error later.
    pub fn check_properties(&self) -> Result<(), ConfigError> {
        let problems: Vec<Problem> = self
            .properties
            .iter()
            .filter_map(|(k, v)| {
                resolve_property(v).err().map(|message| Problem {
                    path: format!("kafka.properties.{k}"),
                    message,
                })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Secret property values are shown as `<redacted>` (references such as
/// `${env:NAME}` are not secrets and are shown).
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let literal = matches!(property_source(v), Ok(PropertySource::Literal(_)));
                let shown = if is_secret_property(k) && literal {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("assignment", &self.assignment)
            .field("guarantee", &self.guarantee)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("max_poll_interval_ms", &self.max_poll_interval_ms)
            .field("commit_interval_ms", &self.commit_interval_ms)
            .field("statistics_interval_ms", &self.statistics_interval_ms)
            .field("linger_ms", &self.linger_ms)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("topics", &self.topics)
            .field("properties", &properties)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "onair".into(),
            assignment: Assignment::CooperativeSticky,
            guarantee: Guarantee::AtLeastOnce,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 20_000,
            commit_interval_ms: 1_000,
            statistics_interval_ms: 5_000,
            linger_ms: 5,
            message_max_bytes: 16 << 20,
            topics: TopicsConfig::default(),
            properties: BTreeMap::new(),
        }
    }
}

/// `[kafka.topics]`: every topic the engine reads or writes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Input: video segments (room-keyed).
    pub video: String,
    /// Input: audio chunks (room-keyed).
    pub audio: String,
    /// Input: comments (room-keyed).
    pub comments: String,
    /// Input: live viewer actions (room-keyed).
    pub actions: String,
    /// Input: short-video actions (user-keyed; read by the user stage).
    pub short_video_actions: String,
    /// Output: per-room per-tick activity.
    pub room_stats: String,
    /// Output: records that could not be processed.
    pub dead_letters: String,
    /// Output: the streamers' recognised speech (room-keyed).
    pub transcripts: String,
    /// Output: per-room per-tick embeddings and audio features (room-keyed).
    pub room_features: String,
    /// Output: labelled examples for training (room- or user-keyed).
    pub training_samples: String,
    /// Output: per-room per-tick highlight scores (room-keyed).
    pub highlight_scores: String,
    /// Output: highlight events (room-keyed).
    pub highlights: String,
    /// Internal: live viewer actions re-keyed by user, written by the room
    /// stage and read by the user stage (same partition count).
    pub user_actions: String,
    /// Output: each room's latest content representation (MMBee's MFQ
    /// tokens; compacted, room-keyed).
    pub room_embeddings: String,
    /// Output: viewers' gift probabilities (room-keyed).
    pub gift_predictions: String,
    /// Output: each user's behaviour sequence, a full snapshot per record
    /// (compacted, user-keyed).
    pub user_sequences: String,
    /// Internal: the user stage's state changelog (compacted, same partition
    /// count as the user stage's inputs), read back when a partition is
    /// assigned. One per deployment (consumer group).
    pub user_state: String,
    /// Internal: the room stage's state changelog (compacted, same partition
    /// count as the room-keyed inputs): each room's lasting state, written
    /// every `runtime.snapshot_interval_ms` and read back when a partition
    /// is assigned. One per deployment (consumer group).
    pub room_state: String,
    /// Partitions of the room-keyed topics when onair creates them.
    pub partitions: i32,
    /// Whether `run` creates missing topics at start (admin API).
    pub create: bool,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            video: "video".into(),
            audio: "audio".into(),
            comments: "comments".into(),
            actions: "actions".into(),
            short_video_actions: "short-video-actions".into(),
            room_stats: "room-stats".into(),
            dead_letters: "dead-letters".into(),
            transcripts: "transcripts".into(),
            room_features: "room-features".into(),
            training_samples: "training-samples".into(),
            highlight_scores: "highlight-scores".into(),
            highlights: "highlights".into(),
            user_actions: "user-actions".into(),
            room_embeddings: "room-embeddings".into(),
            gift_predictions: "gift-predictions".into(),
            user_sequences: "user-sequences".into(),
            user_state: "onair-users-changelog".into(),
            room_state: "onair-rooms-changelog".into(),
            partitions: 4,
            create: true,
        }
    }
}

/// `[simulator]`: the built-in generator of live rooms.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Seed; the same seed gives the same rooms, events and media.
    pub seed: u64,
    /// Day of the seed's world: the same rooms, streamers and viewers (with
    /// their affinities and gifting levels), a different broadcast each day.
    pub day: u32,
    /// Number of live rooms.
    pub rooms: u32,
    /// Mean comments per second per room at average excitement.
    pub comments_per_sec: f64,
    /// Viewer population per room.
    pub viewers: u32,
    /// Share of each room's viewers drawn from a pool shared by all rooms (a
    /// pooled user is in about 4 rooms): what links streamers in the gifting graph.
    pub shared_viewers: f64,
    /// Whether rooms send H.264 MPEG-TS video segments.
    pub video: bool,
    /// Video width (px).
    pub video_width: u32,
    /// Video height (px).
    pub video_height: u32,
    /// Video frame rate.
    pub video_fps: u32,
    /// Video segment length (ms).
    pub segment_ms: i64,
    /// 0: encode every segment from its own frames; n: draw segments at one
    /// of n excitement levels and encode each variant once (bounded CPU).
    pub video_variants: u32,
    /// Whether rooms send PCM audio.
    pub audio: bool,
    /// Whether the audio carries synthesized speech (espeak-ng).
    pub speech: bool,
    /// Whether the rooms' viewers also scroll short videos when not watching
    /// live: `short-video-actions` keyed by user, for the user stage's
    /// cross-domain sequences. Changes no room event.
    pub short_videos: bool,
    /// Simulated seconds per wall-clock second (1 = real time).
    pub speed: f64,
    /// Partition tasks the simulated rooms are spread over.
    pub partitions: u32,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            seed: 1,
            day: 0,
            rooms: 8,
            comments_per_sec: 2.0,
            viewers: 40,
            shared_viewers: 0.2,
            video: true,
            video_width: 256,
            video_height: 144,
            video_fps: 5,
            segment_ms: 2000,
            video_variants: 6,
            audio: true,
            speech: true,
            short_videos: false,
            speed: 1.0,
            partitions: 4,
        }
    }
}

/// `[runtime]`: event time, ticks and queues.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tick length in ms of event time; every operator sees each room once per tick.
    pub tick_ms: i64,
    /// How long (wall ms) the merge waits for a stream that has nothing queued
    /// while the source has not reported it caught up with the broker, before
    /// processing the other streams without it (their records may then make
    /// this stream's late). Caught-up streams are never waited for.
    pub max_wait_ms: u64,
    /// How far (event ms) the watermark trails the newest event: records up
    /// to this late still count in their own tick; later ones are dropped.
    pub allowed_lateness_ms: i64,
    /// After this long (wall ms) with no input, a partition's watermark
    /// advances with the wall clock so idle rooms still tick.
    pub idle_timeout_ms: u64,
    /// Records buffered per stream of a partition; a full stream is not read
    /// until it drains (its Kafka prefetch queue then fills and librdkafka
    /// stops fetching it).
    pub queue_capacity: usize,
    /// Most output records in flight per partition before it stops reading.
    pub max_in_flight: usize,
    /// Deadline (ms) to drain a revoked partition or shut down.
    pub drain_timeout_ms: u64,
    /// How often (wall ms) a room-stage partition writes the lasting state
    /// of its changed rooms to `[kafka.topics] room_state`, so that offsets
    /// can be committed past the records that state came from (Kafka only;
    /// also when a partition is drained). The task waits for its outputs in
    /// flight first. 0: never; a restart rebuilds the state by replaying
    /// every record it still depends on.
    pub snapshot_interval_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            tick_ms: 1000,
            max_wait_ms: 10_000,
            allowed_lateness_ms: 2000,
            idle_timeout_ms: 3000,
            queue_capacity: 4096,
            max_in_flight: 10_000,
            drain_timeout_ms: 5000,
            snapshot_interval_ms: 5000,
        }
    }
}

/// Where outputs go.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Kafka topics (see `[kafka.topics]`).
    #[default]
    Kafka,
    /// Standard output: a live view of the rooms (the embedded demo).
    Console,
}

/// `[sink]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// `kafka` or `console`.
    pub kind: SinkKind,
}

/// `[dead_letters]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Dead letters per second each partition may write on average.
    pub rate_per_sec: f64,
    /// Burst each partition may write at once.
    pub burst: u32,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            rate_per_sec: 100.0,
            burst: 1000,
        }
    }
}

/// `[media]`: decoding of the rooms' video and audio payloads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Whether video and audio payloads are decoded (sampled frames and
    /// 16 kHz audio for the models). Off: they are only counted.
    pub enabled: bool,
    /// Threads of the decode pool shared by every partition (0: one per core).
    pub threads: usize,
    /// Payloads of one partition queued or decoding at once; its video and
    /// audio streams are not read further until one finishes.
    pub max_in_flight: usize,
    /// Video decode and frame sampling.
    pub video: crate::decode::video::VideoConfig,
    /// Audio decode.
    pub audio: crate::decode::audio::AudioConfig,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            enabled: true,
            threads: 0,
            max_in_flight: 8,
            video: Default::default(),
            audio: Default::default(),
        }
    }
}

/// `[operators]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorsConfig {
    /// Per-room activity statistics.
    pub room_activity: RoomActivityConfig,
    /// Voice activity and speech recognition.
    pub speech: SpeechConfig,
    /// Image, text and audio features per room and tick.
    pub features: FeaturesConfig,
    /// Highlight labels from viewers' long views, joined with features.
    pub highlight_labels: HighlightLabelsConfig,
    /// Highlight scores and events per room, from the highlight model.
    pub highlight: HighlightConfig,
    /// MMBee's room side: content segments, the rooms' audiences, gift labels.
    pub mmbee: MmbeeConfig,
    /// Users' behaviour sequences and live moment labels (user stage).
    pub user_sequences: UserSequencesConfig,
}

impl Default for OperatorsConfig {
    fn default() -> Self {
        OperatorsConfig {
            room_activity: RoomActivityConfig { enabled: true },
            speech: SpeechConfig::default(),
            features: FeaturesConfig::default(),
            highlight_labels: HighlightLabelsConfig::default(),
            highlight: HighlightConfig::default(),
            mmbee: MmbeeConfig::default(),
            user_sequences: UserSequencesConfig::default(),
        }
    }
}

/// `[operators.speech]`: finds speech in each room's audio (silero VAD) and
/// transcribes the voiced windows with Whisper, under a budget, into the
/// `transcripts` topic. Needs `media.enabled` (it reads decoded audio).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpeechConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// Whisper model in whisper.cpp's ggml format (`scripts/models` makes it).
    pub whisper_model: String,
    /// Silero VAD ONNX model (`scripts/models` fetches it).
    pub vad_model: String,
    /// ONNX Runtime shared library; empty: `ORT_DYLIB_PATH`, else the copy
    /// `scripts/models` puts under `models/onnxruntime/`.
    pub onnxruntime: String,
    /// Language to transcribe in ("en", "zh", ...), or "auto" to detect it
    /// per window.
    pub language: String,
    /// With "auto": the languages the rooms speak; each window gets the
    /// most likely of them (empty: any language Whisper knows).
    pub languages: Vec<String>,
    /// Transcriptions running at once (threads of the ASR pool, shared by
    /// every partition).
    pub max_concurrent: usize,
    /// Threads one transcription uses.
    pub threads_per_job: usize,
    /// Voiced windows waiting for a transcription slot. When it is full, the
    /// window of the least active room (comments and actions per second) is
    /// skipped and counted in `onair_asr_windows_total{result="skipped"}`.
    pub max_queued: usize,
    /// Speech probability at or above which a 32 ms chunk is voiced.
    pub vad_threshold: f32,
    /// Voiced stretches shorter than this are not transcribed (ms).
    pub min_speech_ms: i64,
    /// Silence that ends a voiced window (ms).
    pub min_silence_ms: i64,
    /// Longest window: longer speech is cut here and continues in the next (ms).
    pub max_window_ms: i64,
    /// Audio kept on each side of a voiced window (ms).
    pub pad_ms: i64,
}

impl Default for SpeechConfig {
    fn default() -> Self {
        SpeechConfig {
            enabled: false,
            whisper_model: "models/whisper/ggml-base.bin".into(),
            vad_model: "models/silero/silero_vad.onnx".into(),
            onnxruntime: String::new(),
            language: "auto".into(),
            languages: vec!["en".into(), "zh".into()],
            max_concurrent: 1,
            threads_per_job: 1,
            max_queued: 4,
            vad_threshold: 0.5,
            min_speech_ms: 250,
            min_silence_ms: 300,
            max_window_ms: 15_000,
            pad_ms: 100,
        }
    }
}

/// `[operators.features]`: embeds each room's sampled frames (image encoder)
/// and its comments and transcripts (text encoder), computes audio features,
/// and writes one `room-features` record per room and tick. Requests from
/// every room of the instance are batched per model. Needs `media.enabled`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// The image encoder's model directory: numbered versions inside
    /// (`1/model.onnx`, ...); the highest that loads serves.
    pub image_model: String,
    /// The text encoder's model directory (`N/model.onnx` and
    /// `N/tokenizer.json`).
    pub text_model: String,
    /// What runs the encoders: "onnx" (ONNX Runtime, `N/model.onnx`) or
    /// "torch" (libtorch, `N/model.pt`; needs a build with the `torch`
    /// feature), on a GPU when the runtime sees one.
    pub backend: String,
    /// How often the model directories are checked for a new version (ms);
    /// 0: never (the version loaded at start serves until restart).
    pub reload_interval_ms: u64,
    /// Ticks of features each room keeps for the models that look back.
    pub window_ticks: usize,
    /// Video segments each room keeps as per-segment sets (frames,
    /// comments, transcripts).
    pub segments: usize,
    /// Comments embedded per room and tick; the rest are counted but not
    /// embedded (a flood of comments cannot flood the text encoder).
    pub max_comments_per_tick: usize,
    /// Batching of the image encoder.
    pub image_batch: BatchSettings,
    /// Batching of the text encoder.
    pub text_batch: BatchSettings,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        FeaturesConfig {
            enabled: false,
            image_model: "models/image".into(),
            text_model: "models/text".into(),
            backend: "onnx".into(),
            reload_interval_ms: 5000,
            window_ticks: 32,
            segments: 4,
            max_comments_per_tick: 32,
            image_batch: BatchSettings {
                max_batch: 16,
                max_delay_ms: 20,
                capacity: 64,
                workers: 1,
                threads: 2,
            },
            text_batch: BatchSettings {
                max_batch: 32,
                max_delay_ms: 20,
                capacity: 512,
                workers: 1,
                threads: 1,
            },
        }
    }
}

/// How one model's requests are batched across rooms.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Longest the oldest request waits for its batch to fill (ms).
    pub max_delay_ms: u64,
    /// Requests waiting across all rooms before the model refuses more and
    /// the partitions stop reading (backpressure).
    pub capacity: usize,
    /// Worker threads, each with its own copy of the model.
    pub workers: usize,
    /// ONNX Runtime intra-op threads per worker.
    pub threads: usize,
}

impl PipelineConfig {
    /// Whether the user stage runs: MMBee scores viewers (on, with a model),
    /// or the behaviour sequences are kept.
    pub fn user_stage(&self) -> bool {
        let mb = &self.operators.mmbee;
        (mb.enabled && !mb.model.is_empty()) || self.operators.user_sequences.enabled
    }
}

impl BatchSettings {
    /// As the batcher takes it.
    pub fn batch_config(&self) -> crate::models::batcher::BatchConfig {
        crate::models::batcher::BatchConfig {
            max_batch: self.max_batch,
            max_delay: std::time::Duration::from_millis(self.max_delay_ms),
            capacity: self.capacity,
            workers: self.workers,
        }
    }
}

/// `[operators.highlight_labels]`: the highlight model's weak labels. Per
/// room and tick, the long-view-through rate of the feed impressions that
/// started in the tick, joined with the tick's features once known, written
/// as `highlight` samples to the training-samples topic (and to local files
/// with `--samples-dir`). Needs `operators.features.enabled`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HighlightLabelsConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// A view is long when the viewer is still in the room this long after
    /// entering (ms).
    pub long_view_ms: i64,
    /// An impression led to a view when the viewer entered the room within
    /// this long after it (ms).
    pub enter_window_ms: i64,
    /// Impressions and views a room may have open at once; more are counted
    /// as dropped (`room_full`) and left out of the rate.
    pub max_open_per_room: usize,
}

impl Default for HighlightLabelsConfig {
    fn default() -> Self {
        HighlightLabelsConfig {
            enabled: false,
            long_view_ms: 30_000,
            enter_window_ms: 10_000,
            max_open_per_room: 100_000,
        }
    }
}

/// `[operators.mmbee]`: the room side of MMBee gift prediction. Cuts each
/// room's stream into content segments of `segment_ms` (aligned to the epoch)
/// and assembles each one's content from the features operator's embeddings:
/// 3 frames spread over the segment, up to 8 comments spread over its comments,
/// up to 2 transcripts (layout `mmbee-content-v1`). A segment is complete
/// `finalize_delay_ms` after its end (late frames and speech count until
/// then). With `samples`, it also writes the model's training data to
/// `training-samples`: each segment's content (`mmbee-content`), each gift
/// (`mmbee-gifts`), and a labelled (viewer, room) pair (`mmbee`) at every
/// moment the engine would score one — a viewer enters, the room's content
/// segment completes (every viewer present), the viewer sends a gift —
/// labelled 1 when the viewer gifts in the room within `horizon_ms` after.
///
/// With a `model`, it also serves MMBee: the room stage runs MFQ on each
/// completed segment and writes the room's content tokens to `room-embeddings`,
/// re-keys live actions by user to `user-actions`, and the user stage (its own
/// consumer group, `<group_id>-users`) scores the viewers whose pairs changed
/// and writes `gift-predictions`. Needs `operators.features.enabled`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MmbeeConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// Content segment length (ms).
    pub segment_ms: i64,
    /// How long after a segment's end its content may still arrive (ms).
    pub finalize_delay_ms: i64,
    /// Whether to write the training samples.
    pub samples: bool,
    /// A pair is positive when the viewer gifts within this long (ms).
    pub horizon_ms: i64,
    /// Viewers tracked per room; more are counted as dropped (`room_full`).
    pub max_viewers_per_room: usize,
    /// The model directory: numbered versions (`1/mfq.onnx`, `1/ranker.onnx`,
    /// `1/mmbee.json`); the highest that loads serves. Empty: no scoring (the
    /// room side writes its samples only).
    pub model: String,
    /// The graph tables directory (`onair graph --out`): the version the
    /// serving model names in its `mmbee.json` is loaded with it (a version
    /// whose graph tables cannot be read does not serve).
    pub graph: String,
    /// How often the model directory is checked for a new version (ms); the
    /// new version swaps in with its graph tables. 0: never (the version
    /// loaded at start serves until restart).
    pub reload_interval_ms: u64,
    /// How often the user stage's scoring state (viewers' sessions and
    /// gifting histories) of changed users goes to the changelog (ms; 0: at
    /// every tick), as `user_sequences.changelog_interval_ms`.
    pub changelog_interval_ms: i64,
    /// Batching of MFQ and the ranker (one batcher serves both).
    pub batch: BatchSettings,
}

impl Default for MmbeeConfig {
    fn default() -> Self {
        MmbeeConfig {
            model: String::new(),
            graph: "graph".into(),
            reload_interval_ms: 5000,
            changelog_interval_ms: 5_000,
            batch: BatchSettings {
                max_batch: 256,
                max_delay_ms: 5,
                capacity: 8192,
                workers: 1,
                threads: 1,
            },
            enabled: false,
            segment_ms: 10_000,
            finalize_delay_ms: 3_000,
            samples: true,
            horizon_ms: 30_000,
            max_viewers_per_room: 100_000,
        }
    }
}

/// `[operators.user_sequences]`: the user stage keeps, per user, a bounded
/// sequence of behaviours in both domains (live rooms entered, short videos
/// played; each with its owner, times, watch time and feedback, and for live
/// rooms the room's content representation and highlight score at entry),
/// and writes a full snapshot to `user-sequences` (compacted, user-keyed) at
/// the end of each tick in which it changed. Each live visit is labelled in
/// real time on `training-samples` (task `live-moment`): the feedback types
/// first seen in each report period, and at the leave the types never seen.
/// Turning it on runs the user stage (it reads `user-actions`, which the room
/// stage then writes, and `short-video-actions`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UserSequencesConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// Live behaviours kept per user (the newest).
    pub live_max: usize,
    /// Live behaviours that started this long before the user's newest
    /// action are dropped (ms).
    pub live_max_age_ms: i64,
    /// Short-video behaviours kept per user.
    pub short_video_max: usize,
    /// Short-video behaviours this old are dropped (ms).
    pub short_video_max_age_ms: i64,
    /// Watch time that makes a long view (ms); a short video watched to its
    /// end is a long view too.
    pub long_view_ms: i64,
    /// How far behind the partition's watermark an action may still be put
    /// in its place in the sequence (ms); older ones are dropped and counted
    /// (`too_late`). Each user keeps the raw actions of this span.
    pub reorder_ms: i64,
    /// Moment labels: positives are reported at the end of each period of
    /// this length after entry (ms).
    pub label_period_ms: i64,
    /// Whether to write the moment labels to `training-samples`.
    pub samples: bool,
    /// How often changed users' state records go to the changelog (ms; 0:
    /// at every tick). Between writes only the latest state of each user is
    /// kept (as Kafka Streams' record cache does up to its commit interval)
    /// and input offsets are not committed past what the changelog lacks, so
    /// a longer interval writes fewer, and replays more after a crash.
    pub changelog_interval_ms: i64,
    /// The compressed-interest model: a directory of numbered versions (the
    /// newest is loaded) or one version's directory; `""`: no compressed
    /// interests.
    pub interests_model: String,
}

impl Default for UserSequencesConfig {
    fn default() -> Self {
        let b = crate::state::sequence::Bounds::default();
        UserSequencesConfig {
            enabled: false,
            live_max: b.live_max,
            live_max_age_ms: b.live_max_age_ms,
            short_video_max: b.short_video_max,
            short_video_max_age_ms: b.short_video_max_age_ms,
            long_view_ms: b.long_view_ms,
            reorder_ms: 120_000,
            label_period_ms: 30_000,
            samples: true,
            changelog_interval_ms: 5_000,
            interests_model: "models/interests".into(),
        }
    }
}

impl UserSequencesConfig {
    /// The sequence bounds.
    pub fn bounds(&self) -> crate::state::sequence::Bounds {
        crate::state::sequence::Bounds {
            live_max: self.live_max,
            live_max_age_ms: self.live_max_age_ms,
            short_video_max: self.short_video_max,
            short_video_max_age_ms: self.short_video_max_age_ms,
            long_view_ms: self.long_view_ms,
        }
    }
}

/// `[operators.highlight]`: scores every room's newest tick with the
/// highlight model (its look-back window of features, never later ticks),
/// writes the scores to `highlight-scores`, and turns them into highlight
/// events on `highlights` with the thresholds calibrated for the model
/// version (hysteresis: one highlight, one event). Ticks of all rooms of
/// the instance are batched. Needs `operators.features.enabled`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HighlightConfig {
    /// Whether the operator runs.
    pub enabled: bool,
    /// The model directory: numbered versions (`1/model.onnx` and
    /// `1/highlight.json`); the highest that loads serves.
    pub model: String,
    /// What runs the model: "onnx" (`N/model.onnx`) or "torch" (`N/model.pt`;
    /// needs a build with the `torch` feature).
    pub backend: String,
    /// How often the directory is checked for a new version (ms); 0: never.
    pub reload_interval_ms: u64,
    /// Per-tick model states each room keeps (at least the window of any
    /// version that will serve, minus one).
    pub history_ticks: usize,
    /// Comments per tick each room keeps for its events' top comments.
    pub comments_per_tick: usize,
    /// Top comments reported with an event.
    pub top_comments: usize,
    /// Batching of the model.
    pub batch: BatchSettings,
}

impl Default for HighlightConfig {
    fn default() -> Self {
        HighlightConfig {
            enabled: false,
            model: "models/highlight".into(),
            backend: "onnx".into(),
            reload_interval_ms: 5000,
            history_ticks: 32,
            comments_per_tick: 16,
            top_comments: 5,
            batch: BatchSettings {
                max_batch: 64,
                max_delay_ms: 10,
                capacity: 1024,
                workers: 1,
                threads: 1,
            },
        }
    }
}

/// Checks one model's batch settings, found at `path`.
fn check_batch(path: &str, b: &BatchSettings, bad: &mut impl FnMut(&str, bool, &str)) {
    let at = |field: &str| format!("{path}.{field}");
    bad(
        &at("max_batch"),
        (1..=1024).contains(&b.max_batch),
        "must be 1..=1024",
    );
    bad(
        &at("max_delay_ms"),
        b.max_delay_ms <= 10_000,
        "must be at most 10000",
    );
    bad(
        &at("capacity"),
        b.capacity >= b.max_batch && b.capacity <= 1_000_000,
        "must be at least max_batch and at most 1000000",
    );
    bad(
        &at("workers"),
        (1..=64).contains(&b.workers),
        "must be 1..=64",
    );
    bad(
        &at("threads"),
        (1..=64).contains(&b.threads),
        "must be 1..=64",
    );
}

/// `[operators.room_activity]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoomActivityConfig {
    /// Whether the operator runs.
    pub enabled: bool,
}

impl Default for RoomActivityConfig {
    fn default() -> Self {
        RoomActivityConfig { enabled: true }
    }
}

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `runtime.tick_ms`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A pipeline file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid; every problem found is listed.
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl crate::error::Classify for ConfigError {
    fn fault(&self) -> crate::error::Fault {
        crate::error::Fault::Input
    }
}

/// Tables whose keys are free-form.
const FREE_MAPS: &[&str] = &["kafka.properties"];

impl PipelineConfig {
    /// Reads and validates a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates pipeline text, reporting every problem at once.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(vec![Problem {
                path: "(file)".into(),
                message: e.to_string().trim().to_string(),
            }])
        })?;
        let mut problems = Vec::new();
        let reference = toml::Table::try_from(PipelineConfig::default()).unwrap_or_default();
        // Fields with the wrong shape are reported and removed, so that the
        // semantic checks below still run on the rest of the file.
        shape(&mut value, &reference, "", &mut problems);
        let config: PipelineConfig =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    ConfigError::Invalid(vec![Problem {
                        path: "(file)".into(),
                        message: e.to_string().trim().to_string(),
                    }])
                })?;
        config.check(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn check(&self, p: &mut Vec<Problem>) {
        // Property references must be well formed (whether they resolve is
        // checked when the engine starts: `KafkaConfig::check_properties`).
        for (k, v) in &self.kafka.properties {
            if let Err(message) = property_source(v) {
                p.push(Problem {
                    path: format!("kafka.properties.{k}"),
                    message,
                });
            }
        }
        if self
            .kafka
            .properties
            .contains_key("partition.assignment.strategy")
        {
            p.push(Problem {
                path: "kafka.properties.partition.assignment.strategy".into(),
                message:
                    "set kafka.assignment instead: the source handles a rebalance by its protocol"
                        .into(),
            });
        }
        for key in ["transactional.id", "enable.idempotence", "isolation.level"] {
            if self.kafka.properties.contains_key(key) {
                p.push(Problem {
                    path: format!("kafka.properties.{key}"),
                    message: "set kafka.guarantee instead: onair sets this from it".into(),
                });
            }
        }
        let mut bad = |path: &str, ok: bool, message: &str| {
            if !ok {
                p.push(Problem {
                    path: path.into(),
                    message: message.into(),
                });
            }
        };
        let r = &self.runtime;
        bad(
            "runtime.tick_ms",
            r.tick_ms >= 10 && 60_000 % r.tick_ms.max(1) == 0,
            "must be at least 10 and divide 60000",
        );
        bad(
            "runtime.allowed_lateness_ms",
            r.allowed_lateness_ms >= 0,
            "must not be negative",
        );
        bad(
            "runtime.queue_capacity",
            r.queue_capacity >= 1,
            "must be at least 1",
        );
        bad(
            "runtime.max_in_flight",
            r.max_in_flight >= 1,
            "must be at least 1",
        );
        bad(
            "runtime.drain_timeout_ms",
            r.drain_timeout_ms < u64::from(self.kafka.session_timeout_ms),
            "must be shorter than kafka.session_timeout_ms, or the group evicts the member while it drains",
        );
        bad(
            "runtime.snapshot_interval_ms",
            r.snapshot_interval_ms == 0 || r.snapshot_interval_ms >= 100,
            "must be 0 (off) or at least 100",
        );
        let k = &self.kafka;
        let kafka_used = self.source.kind == SourceKind::Kafka || self.sink.kind == SinkKind::Kafka;
        if kafka_used {
            bad(
                "kafka.brokers",
                !k.brokers.trim().is_empty(),
                "must name at least one broker",
            );
            bad(
                "kafka.group_id",
                !k.group_id.trim().is_empty(),
                "must not be empty",
            );
        }
        bad(
            "kafka.topics.partitions",
            k.topics.partitions >= 1,
            "must be at least 1",
        );
        bad(
            "kafka.commit_interval_ms",
            k.commit_interval_ms >= 10,
            "must be at least 10",
        );
        for (name, topic) in [
            ("video", &k.topics.video),
            ("audio", &k.topics.audio),
            ("comments", &k.topics.comments),
            ("actions", &k.topics.actions),
            ("short_video_actions", &k.topics.short_video_actions),
            ("room_stats", &k.topics.room_stats),
            ("dead_letters", &k.topics.dead_letters),
            ("transcripts", &k.topics.transcripts),
            ("room_features", &k.topics.room_features),
            ("training_samples", &k.topics.training_samples),
            ("highlight_scores", &k.topics.highlight_scores),
            ("highlights", &k.topics.highlights),
        ] {
            let valid = !topic.is_empty()
                && topic.len() <= 249
                && topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            bad(
                &format!("kafka.topics.{name}"),
                valid,
                "must be a valid Kafka topic name",
            );
        }
        let s = &self.simulator;
        if self.source.kind == SourceKind::Simulator {
            bad("simulator.rooms", s.rooms >= 1, "must be at least 1");
            bad(
                "simulator.speed",
                s.speed > 0.0 && s.speed.is_finite(),
                "must be positive",
            );
            bad(
                "simulator.partitions",
                s.partitions >= 1,
                "must be at least 1",
            );
            bad(
                "simulator.comments_per_sec",
                s.comments_per_sec >= 0.0,
                "must not be negative",
            );
            bad(
                "simulator.shared_viewers",
                (0.0..=1.0).contains(&s.shared_viewers),
                "must be between 0 and 1",
            );
            bad(
                "simulator.segment_ms",
                s.segment_ms >= 100,
                "must be at least 100",
            );
            bad(
                "simulator.video_width",
                !s.video || (s.video_width >= 16 && s.video_width.is_multiple_of(2)),
                "must be even and at least 16",
            );
            bad(
                "simulator.video_height",
                !s.video || (s.video_height >= 16 && s.video_height.is_multiple_of(2)),
                "must be even and at least 16",
            );
            bad(
                "simulator.video_fps",
                !s.video || (1..=60).contains(&s.video_fps),
                "must be 1..=60",
            );
            bad(
                "sink.kind",
                self.sink.kind == SinkKind::Console || kafka_used,
                "",
            );
        }
        let sp = &self.operators.speech;
        if sp.enabled {
            bad(
                "operators.speech.enabled",
                self.media.enabled,
                "needs media.enabled (speech reads the decoded audio)",
            );
            bad(
                "operators.speech.enabled",
                self.media.audio.sample_rate == crate::models::whisper::SAMPLE_RATE,
                "needs media.audio.sample_rate = 16000 (what the speech models read)",
            );
            bad(
                "operators.speech.whisper_model",
                !sp.whisper_model.trim().is_empty(),
                "must name a file",
            );
            bad(
                "operators.speech.vad_model",
                !sp.vad_model.trim().is_empty(),
                "must name a file",
            );
            bad(
                "operators.speech.language",
                sp.language == "auto"
                    || (2..=3).contains(&sp.language.len())
                        && sp.language.chars().all(|c| c.is_ascii_lowercase()),
                "must be \"auto\" or a language code such as \"en\" or \"zh\"",
            );
            bad(
                "operators.speech.languages",
                sp.languages.iter().all(|l| {
                    (2..=3).contains(&l.len()) && l.chars().all(|c| c.is_ascii_lowercase())
                }),
                "must be language codes such as \"en\" or \"zh\"",
            );
            bad(
                "operators.speech.max_concurrent",
                (1..=64).contains(&sp.max_concurrent),
                "must be 1..=64",
            );
            bad(
                "operators.speech.threads_per_job",
                (1..=64).contains(&sp.threads_per_job),
                "must be 1..=64",
            );
            bad(
                "operators.speech.max_queued",
                (1..=100_000).contains(&sp.max_queued),
                "must be 1..=100000",
            );
            bad(
                "operators.speech.vad_threshold",
                sp.vad_threshold > 0.15 && sp.vad_threshold < 1.0,
                "must be in (0.15, 1)",
            );
            bad(
                "operators.speech.min_speech_ms",
                sp.min_speech_ms >= 0,
                "must not be negative",
            );
            bad(
                "operators.speech.min_silence_ms",
                sp.min_silence_ms >= 32,
                "must be at least 32 (one VAD chunk)",
            );
            bad(
                "operators.speech.max_window_ms",
                (1000..=30_000).contains(&sp.max_window_ms),
                "must be 1000..=30000 (Whisper reads at most 30 s)",
            );
            bad(
                "operators.speech.pad_ms",
                (0..=1000).contains(&sp.pad_ms),
                "must be 0..=1000",
            );
        }
        let f = &self.operators.features;
        if f.enabled {
            bad(
                "operators.features.enabled",
                self.media.enabled,
                "needs media.enabled (features read decoded frames and audio)",
            );
            bad(
                "operators.features.enabled",
                self.media.audio.sample_rate == 16_000,
                "needs media.audio.sample_rate = 16000",
            );
            bad(
                "operators.features.enabled",
                self.media.video.width == 224
                    && self.media.video.height == 224
                    && self.media.video.layout == crate::decode::video::Layout::Chw,
                "needs 224x224 CHW frames (media.video), what the image encoder reads",
            );
            bad(
                "operators.features.image_model",
                !f.image_model.trim().is_empty(),
                "must name a directory",
            );
            bad(
                "operators.features.text_model",
                !f.text_model.trim().is_empty(),
                "must name a directory",
            );
            bad(
                "operators.features.backend",
                f.backend == "onnx" || f.backend == "torch",
                "must be \"onnx\" or \"torch\"",
            );
            bad(
                "operators.features.backend",
                f.backend != "torch" || cfg!(feature = "torch"),
                "\"torch\" needs a build with the `torch` feature (see scripts/torch)",
            );
            bad(
                "operators.features.window_ticks",
                (1..=3600).contains(&f.window_ticks),
                "must be 1..=3600",
            );
            bad(
                "operators.features.segments",
                (1..=64).contains(&f.segments),
                "must be 1..=64",
            );
            bad(
                "operators.features.max_comments_per_tick",
                (1..=10_000).contains(&f.max_comments_per_tick),
                "must be 1..=10000",
            );
            check_batch("operators.features.image_batch", &f.image_batch, &mut bad);
            check_batch("operators.features.text_batch", &f.text_batch, &mut bad);
        }
        let h = &self.operators.highlight;
        if h.enabled {
            bad(
                "operators.highlight.enabled",
                f.enabled,
                "needs operators.features.enabled (the model reads the features)",
            );
            bad(
                "operators.highlight.model",
                !h.model.trim().is_empty(),
                "must name a directory",
            );
            bad(
                "operators.highlight.backend",
                h.backend == "onnx" || (h.backend == "torch" && cfg!(feature = "torch")),
                "must be \"onnx\", or \"torch\" in a build with the `torch` feature",
            );
            bad(
                "operators.highlight.history_ticks",
                (1..=4096).contains(&h.history_ticks),
                "must be 1..=4096",
            );
            bad(
                "operators.highlight.comments_per_tick",
                h.comments_per_tick <= 1000,
                "must be at most 1000",
            );
            bad(
                "operators.highlight.top_comments",
                h.top_comments <= 100,
                "must be at most 100",
            );
            check_batch("operators.highlight.batch", &h.batch, &mut bad);
        }
        let hl = &self.operators.highlight_labels;
        if hl.enabled {
            bad(
                "operators.highlight_labels.enabled",
                f.enabled,
                "needs operators.features.enabled (labels are joined with the features)",
            );
            bad(
                "operators.highlight_labels.long_view_ms",
                (1..=3_600_000).contains(&hl.long_view_ms),
                "must be 1..=3600000",
            );
            bad(
                "operators.highlight_labels.enter_window_ms",
                (0..=600_000).contains(&hl.enter_window_ms),
                "must be 0..=600000",
            );
            bad(
                "operators.highlight_labels.max_open_per_room",
                (1..=10_000_000).contains(&hl.max_open_per_room),
                "must be 1..=10000000",
            );
        }
        let mb = &self.operators.mmbee;
        if mb.enabled {
            bad(
                "operators.mmbee.enabled",
                f.enabled,
                "needs operators.features.enabled (content is built from its embeddings)",
            );
            bad(
                "operators.mmbee.segment_ms",
                (1000..=600_000).contains(&mb.segment_ms),
                "must be 1000..=600000",
            );
            bad(
                "operators.mmbee.finalize_delay_ms",
                (0..=120_000).contains(&mb.finalize_delay_ms),
                "must be 0..=120000",
            );
            bad(
                "operators.mmbee.horizon_ms",
                (1000..=3_600_000).contains(&mb.horizon_ms),
                "must be 1000..=3600000",
            );
            bad(
                "operators.mmbee.max_viewers_per_room",
                (1..=10_000_000).contains(&mb.max_viewers_per_room),
                "must be 1..=10000000",
            );
            check_batch("operators.mmbee.batch", &mb.batch, &mut bad);
            bad(
                "operators.mmbee.changelog_interval_ms",
                (0..=600_000).contains(&mb.changelog_interval_ms),
                "must be 0..=600000",
            );
        }
        let us = &self.operators.user_sequences;
        if us.enabled {
            let day = 24 * 3_600_000;
            bad(
                "operators.user_sequences.live_max",
                (1..=100_000).contains(&us.live_max),
                "must be 1..=100000",
            );
            bad(
                "operators.user_sequences.short_video_max",
                (1..=100_000).contains(&us.short_video_max),
                "must be 1..=100000",
            );
            bad(
                "operators.user_sequences.live_max_age_ms",
                (60_000..=365 * day).contains(&us.live_max_age_ms),
                "must be 60000..=31536000000 (a minute to a year)",
            );
            bad(
                "operators.user_sequences.short_video_max_age_ms",
                (60_000..=365 * day).contains(&us.short_video_max_age_ms),
                "must be 60000..=31536000000 (a minute to a year)",
            );
            bad(
                "operators.user_sequences.long_view_ms",
                (1..=3_600_000).contains(&us.long_view_ms),
                "must be 1..=3600000",
            );
            bad(
                "operators.user_sequences.reorder_ms",
                (0..=3_600_000).contains(&us.reorder_ms),
                "must be 0..=3600000",
            );
            bad(
                "operators.user_sequences.label_period_ms",
                (1000..=3_600_000).contains(&us.label_period_ms),
                "must be 1000..=3600000",
            );
            bad(
                "operators.user_sequences.changelog_interval_ms",
                (0..=600_000).contains(&us.changelog_interval_ms),
                "must be 0..=600000",
            );
        }
        let m = &self.media;
        let v = &m.video;
        bad("media.threads", m.threads <= 256, "must be at most 256");
        bad(
            "media.max_in_flight",
            m.max_in_flight >= 1,
            "must be at least 1",
        );
        bad(
            "media.video.width",
            (8..=4096).contains(&v.width),
            "must be 8..=4096",
        );
        bad(
            "media.video.height",
            (8..=4096).contains(&v.height),
            "must be 8..=4096",
        );
        bad(
            "media.video.std",
            v.std.iter().all(|s| *s > 0.0 && s.is_finite()),
            "every value must be positive",
        );
        bad(
            "media.video.mean",
            v.mean.iter().all(|s| s.is_finite()),
            "every value must be finite",
        );
        bad(
            "media.video.sample_every_ms",
            v.sample_every_ms >= 0,
            "must not be negative (0 turns it off)",
        );
        bad(
            "media.video.frames_per_segment",
            v.frames_per_segment <= 64,
            "must be at most 64",
        );
        bad(
            "media.video.max_decode_ms",
            v.max_decode_ms >= 10,
            "must be at least 10",
        );
        bad(
            "media.video.max_frames_per_payload",
            v.max_frames_per_payload >= 1,
            "must be at least 1",
        );
        bad(
            "media.video.max_source_pixels",
            v.max_source_pixels >= 64,
            "must be at least 64",
        );
        bad(
            "media.audio.sample_rate",
            (8_000..=48_000).contains(&m.audio.sample_rate),
            "must be 8000..=48000",
        );
        bad(
            "media.audio.max_decode_ms",
            m.audio.max_decode_ms >= 10,
            "must be at least 10",
        );
        bad(
            "media.audio.max_payload_ms",
            m.audio.max_payload_ms >= 100,
            "must be at least 100",
        );
        bad(
            "dead_letters.rate_per_sec",
            self.dead_letters.rate_per_sec > 0.0,
            "must be positive",
        );
        bad(
            "limits.max_event_bytes",
            self.limits.max_event_bytes >= 64,
            "must be at least 64",
        );
        bad(
            "limits.max_future_ms",
            self.limits.max_future_ms >= 0,
            "must not be negative (0: no bound)",
        );
        bad(
            "kafka.message_max_bytes",
            k.message_max_bytes as usize
                > self.limits.max_video_bytes.max(self.limits.max_audio_bytes),
            "must exceed the largest input limit, so dead letters can carry the payload",
        );
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

/// Walks the file's table against the default config's: unknown keys and
/// wrong types are reported with their path.
fn shape(
    value: &mut toml::Table,
    reference: &toml::Table,
    prefix: &str,
    problems: &mut Vec<Problem>,
) {
    let before = problems.len();
    let mut remove = Vec::new();
    for (key, v) in value.iter_mut() {
        let reported = problems.len();
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(r) = reference.get(key) else {
            if !FREE_MAPS.contains(&prefix) {
                remove.push(key.clone());
                let known: Vec<&str> = reference.keys().map(String::as_str).collect();
                problems.push(Problem {
                    path,
                    message: format!("unknown field (known here: {})", known.join(", ")),
                });
            }
            continue;
        };
        let is_table = v.is_table();
        let v_type = type_name(v);
        let same_type = std::mem::discriminant(&*v) == std::mem::discriminant(r);
        match (v, r) {
            (toml::Value::Table(t), toml::Value::Table(rt)) => {
                shape(t, rt, &path, problems);
                continue;
            }
            (toml::Value::Integer(_), toml::Value::Float(_)) => {}
            _ if FREE_MAPS.contains(&path.as_str()) && !is_table => problems.push(Problem {
                path,
                message: format!("expected a table, found {v_type}"),
            }),
            _ if FREE_MAPS.contains(&path.as_str()) => {}
            _ if !same_type => problems.push(Problem {
                path,
                message: format!("expected {}, found {v_type}", type_name(r)),
            }),
            _ => {}
        }
        if problems.len() > reported {
            remove.push(key.clone());
        }
    }
    if problems.len() > before {
        for key in remove {
            value.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_resolve_from_the_environment_and_files_and_secrets_are_not_shown() {
        let dir = std::env::temp_dir().join(format!("onair-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "hunter2-from-file\n").unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(resolve_property("${env:PATH}").unwrap(), path);
        assert_eq!(
            resolve_property(&format!("${{file:{}}}", file.display())).unwrap(),
            "hunter2-from-file"
        );
        assert_eq!(resolve_property("plain").unwrap(), "plain");
        let missing = resolve_property("${env:ONAIR_SURELY_UNSET_7C1}").unwrap_err();
        assert!(missing.contains("ONAIR_SURELY_UNSET_7C1"), "{missing}");
        assert!(resolve_property("${vault:x}").is_err());
        assert!(resolve_property("${env:A-B}").is_err());

        let mut cfg = PipelineConfig::default();
        cfg.kafka
            .properties
            .insert("sasl.password".into(), "literal-hunter2".into());
        cfg.kafka.properties.insert(
            "ssl.key.password".into(),
            "${env:ONAIR_SURELY_UNSET_7C1}".into(),
        );
        cfg.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("literal-hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("SASL_SSL"),
            "{shown}"
        );
        // A reference is fine to show, and the check names what is missing.
        assert!(shown.contains("${env:ONAIR_SURELY_UNSET_7C1}"), "{shown}");
        let err = cfg.kafka.check_properties().unwrap_err().to_string();
        assert!(err.contains("kafka.properties.ssl.key.password"), "{err}");
        assert!(!err.contains("literal-hunter2"), "{err}");
        // A malformed reference is a validation problem.
        let bad = PipelineConfig::parse("[kafka.properties]\n\"sasl.password\" = \"${env:}\"\n")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("kafka.properties.sasl.password"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_assignment_strategy_is_a_field_not_a_property() {
        let eager = PipelineConfig::parse("[kafka]\nassignment = \"range\"\n").unwrap();
        assert_eq!(eager.kafka.assignment, Assignment::Range);
        assert_eq!(eager.kafka.assignment.as_str(), "range");
        assert_eq!(
            PipelineConfig::default().kafka.assignment.as_str(),
            "cooperative-sticky"
        );
        assert!(PipelineConfig::parse("[kafka]\nassignment = \"sticky\"\n").is_err());
        let err = PipelineConfig::parse(
            "[kafka.properties]\n\"partition.assignment.strategy\" = \"range\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kafka.assignment"), "{err}");
    }

    #[test]
    fn the_guarantee_is_a_field_and_its_client_settings_are_not_properties() {
        let eos = PipelineConfig::parse("[kafka]\nguarantee = \"exactly-once\"\n").unwrap();
        assert_eq!(eos.kafka.guarantee, Guarantee::ExactlyOnce);
        assert_eq!(
            PipelineConfig::default().kafka.guarantee.as_str(),
            "at-least-once"
        );
        assert!(PipelineConfig::parse("[kafka]\nguarantee = \"exactly_once_v2\"\n").is_err());
        for key in ["transactional.id", "enable.idempotence", "isolation.level"] {
            let err = PipelineConfig::parse(&format!("[kafka.properties]\n\"{key}\" = \"x\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("kafka.guarantee"), "{key}: {err}");
        }
    }

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let text = toml::to_string(&PipelineConfig::default()).unwrap();
        assert_eq!(
            PipelineConfig::parse(&text).unwrap(),
            PipelineConfig::default()
        );
        assert_eq!(
            PipelineConfig::parse("").unwrap(),
            PipelineConfig::default()
        );
    }

    #[test]
    fn every_problem_at_once_with_paths() {
        let text = r#"
            [runtime]
            tick_ms = 7
            bogus = 1
            queue_capacity = "big"
            [kafka.topics]
            comments = "bad topic!"
            [kafka.properties]
            "fetch.wait.max.ms" = "10"
        "#;
        let Err(ConfigError::Invalid(p)) = PipelineConfig::parse(text) else {
            panic!("accepted")
        };
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "runtime.bogus",
                "runtime.queue_capacity",
                "runtime.tick_ms",
                "kafka.topics.comments"
            ],
            "{p:?}"
        );
    }
}
