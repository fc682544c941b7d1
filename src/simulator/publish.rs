//! Writes the simulator's event stream to Kafka, room events keyed by room and
//! short-video actions keyed by user, at a chosen speed: the load generator and
//! the producer of test data. A share of the comments and actions can be sent as
//! JSON (with `content-type: application/json`) so both encodings are exercised;
//! short-video actions are always protobuf.
//!
//! Not for: anything the engine does on consumption.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::json;

use super::{SimError, SimEvent, Simulator};
use crate::config::KafkaConfig;
use crate::kafka::{client_config, KafkaFailure};
use crate::schema::{ActionKind, Comment, ViewerAction, CONTENT_TYPE_HEADER};
use crate::sinks::producer::{RecoveringProducer, Refused};

/// How to publish.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Simulated seconds per wall second (`f64::INFINITY`: as fast as possible).
    pub speed: f64,
    /// Send every n-th room event, when it is a comment or an action, as JSON
    /// (0: never). Short-video actions are not counted (the room topics are the
    /// same with them on or off) and always go as protobuf.
    pub json_every: u64,
    /// Simulated time per step.
    pub step_ms: i64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            speed: 1.0,
            json_every: 0,
            step_ms: 200,
        }
    }
}

/// What was published.
#[derive(Clone, Debug, Default)]
pub struct PublishReport {
    /// Records per topic kind: video, audio, comments, actions, short-video
    /// actions (indices 0 to 4).
    pub records: [u64; 5],
    /// Bytes of payload.
    pub bytes: u64,
    /// Wall time.
    pub wall: Duration,
}

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The simulator failed.
    #[error(transparent)]
    Simulator(#[from] SimError),
    /// Kafka failed.
    #[error(transparent)]
    Kafka(#[from] KafkaFailure),
}

/// JSON form of a comment (the schema's field names).
pub fn comment_json(c: &Comment) -> Vec<u8> {
    json!({
        "schema_version": c.schema_version,
        "room_id": c.room_id,
        "user_id": c.user_id,
        "event_time_ms": c.event_time_ms,
        "text": c.text,
    })
    .to_string()
    .into_bytes()
}

/// JSON form of a viewer action, with the kind's short name.
pub fn action_json(a: &ViewerAction) -> Vec<u8> {
    let kind = ActionKind::try_from(a.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("ACTION_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    json!({
        "schema_version": a.schema_version,
        "room_id": a.room_id,
        "user_id": a.user_id,
        "streamer_id": a.streamer_id,
        "event_time_ms": a.event_time_ms,
        "kind": kind,
        "watch_ms": a.watch_ms,
        "gift_value": a.gift_value,
        "gift_id": a.gift_id,
    })
    .to_string()
    .into_bytes()
}

/// Publishes every event of `sim` until it finishes.
pub async fn publish(
    mut sim: Simulator,
    kafka: &KafkaConfig,
    opts: &PublishOptions,
) -> Result<(Simulator, PublishReport), PublishError> {
    let mut c = client_config(kafka);
    c.set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("message.max.bytes", kafka.message_max_bytes.to_string())
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576");
    // A broker that restarts without its producer state breaks an idempotent
    // producer for good; the recovering one replaces it and sends again what
    // it held, in order, so the topics still hold the simulation exactly once.
    let failed = Arc::new(Mutex::new(None::<KafkaError>));
    let producer = {
        let failed = Arc::clone(&failed);
        RecoveringProducer::new(c, "simulator", move |(), result| {
            if let (Err(e), Ok(mut f)) = (result, failed.lock()) {
                f.get_or_insert(e);
            }
        })?
    };
    let t = &kafka.topics;
    let start = sim.config().start_ms;
    let end = sim.end_ms();
    let wall0 = Instant::now();
    let mut report = PublishReport::default();
    let mut n_events: u64 = 0;
    let mut cursor = start;
    while cursor < end {
        let until = (cursor + opts.step_ms).min(end);
        let (back, events) = super::advance_off_thread(sim, until).await?;
        sim = back;
        for ev in events {
            if !matches!(ev, SimEvent::ShortVideo(_)) {
                n_events += 1;
            }
            let as_json = opts.json_every > 0 && n_events.is_multiple_of(opts.json_every);
            let (idx, topic, payload, json) = match &ev {
                SimEvent::Video(v) => (0, &t.video, v.encode_to_vec(), false),
                SimEvent::Audio(a) => (1, &t.audio, a.encode_to_vec(), false),
                SimEvent::Comment(c) if as_json => (2, &t.comments, comment_json(c), true),
                SimEvent::Comment(c) => (2, &t.comments, c.encode_to_vec(), false),
                SimEvent::Action(a) if as_json => (3, &t.actions, action_json(a), true),
                SimEvent::Action(a) => (3, &t.actions, a.encode_to_vec(), false),
                SimEvent::ShortVideo(s) => (4, &t.short_video_actions, s.encode_to_vec(), false),
            };
            report.records[idx] += 1;
            report.bytes += payload.len() as u64;
            let key = ev.key().as_bytes();
            loop {
                let mut headers = OwnedHeaders::new();
                if json {
                    headers = headers.insert(Header {
                        key: CONTENT_TYPE_HEADER,
                        value: Some("application/json"),
                    });
                }
                match producer.send(topic, None, key, Some(&payload), headers, ()) {
                    Ok(()) => break,
                    Err(Refused::QueueFull(())) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(Refused::Failed(source, ())) => {
                        return Err(KafkaFailure::Operation {
                            what: "produce",
                            source,
                        }
                        .into());
                    }
                }
            }
        }
        cursor = until;
        super::pace(wall0, start, cursor, opts.speed).await;
    }
    let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(60)))
        .await
        .map_err(|_| SimError::WorkerPanicked)?;
    flushed.map_err(|source| KafkaFailure::Operation {
        what: "flush",
        source,
    })?;
    if let Some(source) = failed.lock().ok().and_then(|mut f| f.take()) {
        return Err(KafkaFailure::Operation {
            what: "produce",
            source,
        }
        .into());
    }
    report.wall = wall0.elapsed();
    Ok((sim, report))
}
