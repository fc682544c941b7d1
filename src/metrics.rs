//! Every metric name the engine exports, in one place, and the per-stage
//! family that every stage emits: received, sent, errors, dropped and a
//! processing-latency histogram, all labelled `stage`.
//!
//! Not for: choosing where metrics go; that is [`install`]'s caller's choice
//! (the Prometheus endpoint on `run` and `demo`, a local recorder in tests).

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::config::{PipelineConfig, SourceKind};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Records a stage accepted. For an operator the runtime counts it (every
/// record handed to the operator); operators never count it themselves.
pub const STAGE_RECEIVED: &str = "onair_stage_received_total";
/// Records a stage passed on (or wrote, for sinks).
pub const STAGE_SENT: &str = "onair_stage_sent_total";
/// Failures in a stage, labelled `kind`.
pub const STAGE_ERRORS: &str = "onair_stage_errors_total";
/// Records a stage dropped on purpose, labelled `reason`.
pub const STAGE_DROPPED: &str = "onair_stage_dropped_total";
/// Time a stage spent on one unit of work, seconds.
pub const STAGE_LATENCY: &str = "onair_stage_latency_seconds";
/// Messages between the consumer's position and the high watermark, from
/// librdkafka statistics, labelled `topic` and `partition`.
pub const CONSUMER_LAG: &str = "onair_consumer_lag";
/// Records waiting in a partition task's input queues, labelled `partition`.
pub const QUEUE_DEPTH: &str = "onair_queue_depth";
/// Topic-partitions held back for backpressure (their task's buffer is full,
/// so the task stops reading them and librdkafka stops fetching them).
pub const PARTITIONS_PAUSED: &str = "onair_partitions_paused";
/// Partition tasks currently running on this instance.
pub const PARTITIONS_ASSIGNED: &str = "onair_partitions_assigned";
/// Records written to the dead-letter topic, labelled `reason` and `topic`.
pub const DEAD_LETTERS: &str = "onair_dead_letters_total";
/// Event time minus the partition watermark at each tick, seconds.
pub const WATERMARK_DELAY: &str = "onair_watermark_delay_seconds";
/// Rooms held in state, labelled `partition`.
pub const ROOMS_ACTIVE: &str = "onair_rooms_active";
/// Offset commits, labelled `result` (ok or error).
pub const OFFSET_COMMITS: &str = "onair_offset_commits_total";
/// Rebalance events, labelled `event` (assign, revoke, lost).
pub const REBALANCES: &str = "onair_rebalances_total";

/// Wall time to decode one media payload, seconds, labelled `kind`
/// (`video` or `audio`) and `result` (`ok` or the error reason).
pub const MEDIA_DECODE_SECONDS: &str = "onair_media_decode_seconds";
/// Media payloads decoded, labelled `kind` and `result`.
pub const MEDIA_DECODED: &str = "onair_media_decoded_total";
/// Source frames decoded, labelled `codec`.
pub const MEDIA_FRAMES_DECODED: &str = "onair_media_frames_decoded_total";
/// Frames kept for the models, labelled `purpose` (`timeline` or `segment`).
pub const MEDIA_FRAMES_SAMPLED: &str = "onair_media_frames_sampled_total";
/// Milliseconds of audio decoded.
pub const MEDIA_AUDIO_MS: &str = "onair_media_audio_milliseconds_total";
/// Payloads queued or decoding, labelled `partition`.
pub const MEDIA_IN_FLIGHT: &str = "onair_media_in_flight";

/// Milliseconds of audio voice activity judged, labelled `voiced`
/// (`true`/`false`); voiced over the sum is the speech ratio.
pub const VAD_AUDIO_MS: &str = "onair_vad_audio_milliseconds_total";
/// Voiced windows, labelled `result`: `ok` (transcribed), `skipped` (over
/// the ASR budget), `error`, or `dropped` (the partition left first).
pub const ASR_WINDOWS: &str = "onair_asr_windows_total";
/// Real-time factor of each transcription: processing time over audio
/// duration (below 1 is faster than real time), per job of `threads_per_job`.
pub const ASR_REAL_TIME_FACTOR: &str = "onair_asr_real_time_factor";
/// Wall time of one transcription, seconds.
pub const ASR_SECONDS: &str = "onair_asr_seconds";
/// Milliseconds of audio transcribed.
pub const ASR_AUDIO_MS: &str = "onair_asr_audio_milliseconds_total";
/// Voiced windows waiting for a transcription slot.
pub const ASR_QUEUED: &str = "onair_asr_queued";
/// Voiced windows of a partition sent for transcription and not yet back,
/// labelled `partition`.
pub const ASR_PENDING: &str = "onair_asr_windows_pending";
/// Transcribed segments written.
pub const TRANSCRIPTS: &str = "onair_transcripts_total";

/// Model versions loaded, labelled `model` and `result` (`ok`, or `failed`
/// when the files did not load or the smoke inference failed; the old
/// version keeps serving).
pub const MODEL_LOADS: &str = "onair_model_loads_total";
/// 1 for the version of each model now serving, 0 for versions that served
/// before; labelled `model` and `version`.
pub const MODEL_SERVING: &str = "onair_model_serving";
/// Requests per batch sent to a model, labelled `model`.
pub const BATCH_SIZE: &str = "onair_batch_size";
/// Time a request waited in a model's queue before its batch ran, seconds,
/// labelled `model`.
pub const BATCH_QUEUE_SECONDS: &str = "onair_batch_queue_seconds";
/// Wall time of one batch's inference, seconds, labelled `model`.
pub const BATCH_INFERENCE_SECONDS: &str = "onair_batch_inference_seconds";
/// Requests waiting in a model's queue, labelled `model`.
pub const BATCH_QUEUED: &str = "onair_batch_queued";
/// Requests a model's full queue refused (the caller holds them and stops
/// reading input until there is room), labelled `model`.
pub const BATCH_REFUSED: &str = "onair_batch_refused_total";
/// Per-tick feature records written, labelled `partition`.
pub const ROOM_FEATURES: &str = "onair_room_features_total";
/// Training samples written, labelled `task`.
pub const TRAINING_SAMPLES: &str = "onair_training_samples_total";
/// Room ticks scored by the highlight model, labelled `partition`.
pub const HIGHLIGHT_SCORES: &str = "onair_highlight_scores_total";
/// Highlight event records written, labelled `state` (`open`, `closed`).
pub const HIGHLIGHT_EVENTS: &str = "onair_highlight_events_total";
/// Bytes of per-room highlight state (model states, running means,
/// comments kept for events), labelled `partition`.
pub const HIGHLIGHT_STATE_BYTES: &str = "onair_highlight_state_bytes";
/// Rooms in the user stage's copy of the `room-embeddings` table.
pub const ROOM_TABLE_ROOMS: &str = "onair_room_table_rooms";
/// Gift predictions written, labelled `trigger` (`enter`, `content`, `gift`).
pub const GIFT_PREDICTIONS: &str = "onair_gift_predictions_total";
/// Users whose MMBee state (history, presence) a user-stage partition keeps,
/// labelled `partition`.
pub const MMBEE_USERS: &str = "onair_mmbee_users";
/// Users whose behaviour sequence a user-stage partition keeps, labelled `partition`.
pub const SEQUENCE_USERS: &str = "onair_sequence_users";
/// User sequence snapshots written to `user-sequences`.
pub const SEQUENCE_SNAPSHOTS: &str = "onair_sequence_snapshots_total";

/// Seconds a partition took to read its state back from the changelog
/// when assigned (a histogram), labelled `partition`.
pub const STATE_RESTORE_SECONDS: &str = "onair_state_restore_seconds";
/// Changelog records read back, labelled `partition`.
pub const STATE_RESTORED_RECORDS: &str = "onair_state_restored_records_total";
/// Changelog bytes read back, labelled `partition`.
pub const STATE_RESTORED_BYTES: &str = "onair_state_restored_bytes_total";
/// Changelog bytes written, labelled `stage`.
pub const CHANGELOG_BYTES: &str = "onair_changelog_bytes_total";
/// Producers replaced after a fatal error (their held records sent again),
/// labelled `producer`.
pub const PRODUCER_RECOVERIES: &str = "onair_producer_recoveries_total";
/// Exactly-once commit rounds, labelled `result` (committed, aborted).
pub const TRANSACTIONS: &str = "onair_transactions_total";

/// Records a partition's restore from its changelog.
pub fn state_restored(stage: &'static str, partition: i32, seconds: f64, records: u64, bytes: u64) {
    let p = partition.to_string();
    metrics::histogram!(STATE_RESTORE_SECONDS, "stage" => stage, "partition" => p.clone())
        .record(seconds);
    metrics::counter!(STATE_RESTORED_RECORDS, "stage" => stage, "partition" => p.clone())
        .increment(records);
    metrics::counter!(STATE_RESTORED_BYTES, "stage" => stage, "partition" => p).increment(bytes);
}

/// The stages every partition task runs around its operators.
pub mod stage {
    /// Records parsed from their wire format.
    pub const DECODE: &str = "decode";
    /// Media payloads decoded.
    pub const MEDIA: &str = "media";
    /// Records refused, written to the dead-letter topic.
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// The event-time merge and ticks.
    pub const RUNTIME: &str = "runtime";
    /// Outputs written to Kafka.
    pub const SINK: &str = "sink";
}

/// Why those stages drop records (`STAGE_DROPPED`'s `reason`).
pub mod dropped {
    /// decode: a record of a partition the task does not own.
    pub const UNROUTABLE: &str = "unroutable";
    /// dead_letters: over the dead-letter rate limit.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// runtime: behind the allowed lateness (lasting state still updated).
    pub const LATE: &str = "late";
    /// sink: written before the checkpoint's emitted-through time.
    pub const ALREADY_WRITTEN: &str = "already_written";
}

/// The results `ASR_WINDOWS` is labelled with.
pub const ASR_RESULTS: [&str; 4] = ["ok", "skipped", "error", "dropped"];

/// Registers at zero the series this pipeline's engine can emit whose label
/// values are known before anything happens, so that they are on `/metrics`
/// from the start: `rate()` and `increase()` then count the first event, and
/// every dashboard panel and alert finds its series on an idle engine. The
/// instance gauges; dead letters and decode errors by reason and input
/// topic; the runtime stages' drops by reason; ASR windows by result; failed
/// loads of each served model. Series labelled by partition appear when a
/// partition is assigned (its operators register theirs then).
pub fn register(config: &PipelineConfig) {
    use crate::decode::MediaError;
    use crate::schema::DecodeError;
    if config.source.kind == SourceKind::Kafka {
        counter!(PRODUCER_RECOVERIES, "producer" => "sink").absolute(0);
        if config.kafka.guarantee == crate::config::Guarantee::ExactlyOnce {
            for result in ["committed", "aborted"] {
                counter!(TRANSACTIONS, "result" => result).absolute(0);
            }
        }
        gauge!(PARTITIONS_ASSIGNED).set(0.0);
        gauge!(PARTITIONS_PAUSED).set(0.0);
        let t = &config.kafka.topics;
        // (topic, whether it carries media)
        let mut inputs = vec![
            (&t.video, true),
            (&t.audio, true),
            (&t.comments, false),
            (&t.actions, false),
        ];
        if config.user_stage() {
            inputs.extend([(&t.short_video_actions, false), (&t.user_actions, false)]);
        }
        for (topic, media) in inputs {
            let media = media && config.media.enabled;
            let reasons = DecodeError::REASONS
                .iter()
                .chain(media.then_some(&MediaError::REASONS).into_iter().flatten());
            for reason in reasons {
                counter!(DEAD_LETTERS, "reason" => *reason, "topic" => topic.clone()).absolute(0);
            }
        }
    }
    for reason in DecodeError::REASONS {
        counter!(STAGE_ERRORS, "stage" => stage::DECODE, "kind" => reason).absolute(0);
    }
    if config.media.enabled {
        for reason in MediaError::REASONS {
            counter!(STAGE_ERRORS, "stage" => stage::MEDIA, "kind" => reason).absolute(0);
        }
    }
    for (s, reason) in [
        (stage::DECODE, dropped::UNROUTABLE),
        (stage::DEAD_LETTERS, dropped::RATE_LIMITED),
        (stage::RUNTIME, dropped::LATE),
        (stage::SINK, dropped::ALREADY_WRITTEN),
    ] {
        counter!(STAGE_DROPPED, "stage" => s, "reason" => reason).absolute(0);
    }
    let ops = &config.operators;
    if ops.speech.enabled {
        for result in ASR_RESULTS {
            counter!(ASR_WINDOWS, "result" => result).absolute(0);
        }
    }
    let mut served = Vec::new();
    if ops.features.enabled {
        served.extend([&ops.features.image_model, &ops.features.text_model]);
    }
    if ops.highlight.enabled {
        served.push(&ops.highlight.model);
    }
    if ops.mmbee.enabled && !ops.mmbee.model.is_empty() {
        served.push(&ops.mmbee.model);
    }
    for dir in served {
        let name = crate::models::serving::model_name(std::path::Path::new(dir)).to_string();
        counter!(MODEL_LOADS, "model" => name, "result" => "failed").absolute(0);
    }
}

/// Handles of one stage's metric family, created once and cloned cheaply.
#[derive(Clone)]
pub struct Stage {
    name: &'static str,
    /// Records accepted.
    pub received: Counter,
    /// Records passed on.
    pub sent: Counter,
    /// Processing latency.
    pub latency: Histogram,
}

impl Stage {
    /// Registers the family for `name`.
    pub fn new(name: &'static str) -> Self {
        Stage {
            name,
            received: counter!(STAGE_RECEIVED, "stage" => name),
            sent: counter!(STAGE_SENT, "stage" => name),
            latency: histogram!(STAGE_LATENCY, "stage" => name),
        }
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        counter!(STAGE_ERRORS, "stage" => self.name, "kind" => kind).increment(1);
    }

    /// Counts `n` records dropped for `reason`.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        counter!(STAGE_DROPPED, "stage" => self.name, "reason" => reason).increment(n);
    }

    /// The stage's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The gauge of queued input records for one partition task.
pub fn queue_depth(partition: i32) -> Gauge {
    gauge!(QUEUE_DEPTH, "partition" => partition.to_string())
}

/// The gauge of rooms held by one partition task.
pub fn rooms_active(partition: i32) -> Gauge {
    gauge!(ROOMS_ACTIVE, "partition" => partition.to_string())
}

fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(ASR_REAL_TIME_FACTOR.into()),
            &[
                0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
            ],
        )
}

/// Installs the global recorder and serves `/metrics` on `addr`. Must be
/// called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<PrometheusHandle, BuildError> {
    let builder = builder()?
        .with_http_listener(addr)
        .upkeep_timeout(Duration::from_secs(5));
    let (recorder, exporter) = builder.build()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics endpoint stopped");
        }
    });
    Ok(handle)
}

/// Installs a global recorder without an endpoint (for `simulate` and tests
/// that render the registry themselves).
pub fn install_local() -> Result<PrometheusHandle, BuildError> {
    builder()?.install_recorder()
}
