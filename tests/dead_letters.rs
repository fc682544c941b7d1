//! A corpus of hostile inputs for every input kind the engine reads (video,
//! audio, comments, actions, short-video actions and the repartitioned user
//! actions): empty payloads and tombstones, malformed protobuf and JSON,
//! foreign content types, wrong schema versions, oversized payloads, empty
//! or mismatched room and user ids, event times far in the future or before
//! 2000, corrupt and truncated media, and each kind's own rules. Every one
//! ends in the dead-letter topic once, with its reason, source topic,
//! partition and offset, byte for byte; the engine does not crash; the good
//! records around them are all processed: room stats equal the simulator's
//! truth and every user's sequence equals the one rebuilt from the good
//! actions.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::BufReader;
use std::path::Path;
use std::time::{Duration, Instant};

use common::media::{aac_tone, ffmpeg, read, ts_clip};
use common::{read_until, Proc, Rec, Topics};
use onair::operators::user_sequences::behaviour_record;
use onair::schema::{
    decode_input, ActionKind, AudioChunk, AudioFormat, Behaviour, Comment, DeadLetter, Event,
    InputKind, Limits, RoomStats, ShortVideoAction, ShortVideoActionKind, UserSequence,
    VideoFormat, VideoSegment, ViewerAction,
};
use onair::simulator::GroundTruth;
use onair::state::sequence::{rebuild, Act, Bounds, Source};
use prost::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The limits of the test pipeline: small, so that oversized records stay
/// cheap to send. The simulator's own records fit (1 s of 16 kHz mono PCM
/// is 32 000 bytes; it sends no video here).
const MAX_EVENT_BYTES: usize = 2048;
const MAX_VIDEO_BYTES: usize = 256 << 10;
const MAX_AUDIO_BYTES: usize = 64 << 10;

const EXTRA: &str = r#"
[limits]
max_event_bytes = 2048
max_video_bytes = 262144
max_audio_bytes = 65536
[simulator]
short_videos = true
[operators.user_sequences]
enabled = true
interests_model = ""
"#;

const TEN_YEARS_MS: i64 = 10 * 365 * 86_400_000;
/// 1990-01-01: before the decoder's plausible range (2000-01-01 on).
const BEFORE_2000_MS: i64 = 631_152_000_000;

/// A hostile record, and the dead-letter reason it must get.
struct Poison {
    topic: &'static str,
    /// What is wrong with it, for the failure messages.
    what: String,
    key: &'static str,
    /// None: a tombstone (a record without a value).
    payload: Option<Vec<u8>>,
    content_type: Option<&'static str>,
    reason: &'static str,
}

/// One input kind: a good record of it, from which its poisons are made,
/// each breaking one rule.
struct Kind<M> {
    topic: &'static str,
    /// A record that decodes.
    good: M,
    /// The key the good record is sent with, and another of the same sort.
    key: &'static str,
    other_key: &'static str,
    /// The field the key must equal: the room id, or the user id on the
    /// user-keyed topics.
    keyed: fn(&mut M) -> &mut String,
    version: fn(&mut M) -> &mut u32,
    time: fn(&mut M) -> &mut i64,
    /// The record as JSON, where the kind accepts JSON.
    json: Option<fn(&M) -> String>,
    /// The kind's size limit in the test pipeline.
    limit: usize,
}

impl<M: Message + Clone + Default> Kind<M> {
    fn edit(&self, f: impl FnOnce(&mut M)) -> M {
        let mut m = self.good.clone();
        f(&mut m);
        m
    }

    /// A poison sent as protobuf with the good record's key.
    fn pb(&self, what: &str, m: &M, reason: &'static str) -> Poison {
        self.bytes(what, Some(m.encode_to_vec()), None, reason)
    }

    fn bytes(
        &self,
        what: &str,
        payload: Option<Vec<u8>>,
        content_type: Option<&'static str>,
        reason: &'static str,
    ) -> Poison {
        Poison {
            topic: self.topic,
            what: format!("{}: {what}", self.topic),
            key: self.key,
            payload,
            content_type,
            reason,
        }
    }

    fn json(&self, what: &str, text: String, reason: &'static str) -> Poison {
        self.bytes(
            what,
            Some(text.into_bytes()),
            Some("application/json"),
            reason,
        )
    }

    /// Every class of hostile input that applies to all kinds.
    fn every_class(&self) -> Vec<Poison> {
        let t = *(self.time)(&mut self.edit(|_| {}));
        let good = self.good.encode_to_vec();
        // Protobuf encodings concatenate into one valid record: this one is
        // refused for its size alone.
        let oversized = good.repeat(self.limit / good.len() + 1);
        assert!(M::decode(&oversized[..]).is_ok(), "{}", self.topic);
        let mut out = vec![
            self.bytes("tombstone", None, None, "schema"),
            self.bytes("empty payload", Some(Vec::new()), None, "schema"),
            self.bytes(
                "malformed protobuf",
                Some(vec![0xff, 0xff, 0xff, 0x0f]),
                None,
                "malformed",
            ),
            self.bytes(
                "protobuf cut short",
                Some(good[..good.len() - 1].to_vec()),
                None,
                "malformed",
            ),
            self.bytes(
                "foreign content type",
                Some(good.clone()),
                Some("text/plain"),
                "content_type",
            ),
            self.bytes("oversized", Some(oversized), None, "oversized"),
            self.pb(
                "schema_version 99",
                &self.edit(|m| *(self.version)(m) = 99),
                "schema",
            ),
            self.pb(
                "schema_version 2",
                &self.edit(|m| *(self.version)(m) = 2),
                "schema",
            ),
            self.pb(
                "key field empty",
                &self.edit(|m| (self.keyed)(m).clear()),
                "schema",
            ),
            self.pb(
                "ten years ahead",
                &self.edit(|m| *(self.time)(m) = t + TEN_YEARS_MS),
                "schema",
            ),
            self.pb(
                "seconds for milliseconds",
                &self.edit(|m| *(self.time)(m) = t / 1000),
                "schema",
            ),
            self.pb(
                "before 2000",
                &self.edit(|m| *(self.time)(m) = BEFORE_2000_MS),
                "schema",
            ),
            self.pb(
                "negative time",
                &self.edit(|m| *(self.time)(m) = -t),
                "schema",
            ),
        ];
        // A record of another kind: its producer picked the wrong topic.
        // (Field 5 is a string in one and a number in the other.)
        let foreign = if self.topic == "comments" {
            action("room-0003", "user-900001", t).encode_to_vec()
        } else {
            comment("room-0003", t).encode_to_vec()
        };
        out.push(self.bytes("a record of another kind", Some(foreign), None, "malformed"));
        // The good record under another key: it would sit on the wrong
        // partition.
        out.push(Poison {
            key: self.other_key,
            ..self.pb("key differs from the record", &self.good, "schema")
        });
        match self.json {
            Some(json) => {
                let text = json(&self.good);
                out.extend([
                    self.json("empty JSON", String::new(), "malformed"),
                    self.json(
                        "JSON cut short",
                        text[..text.len() / 2].to_string(),
                        "malformed",
                    ),
                    self.json(
                        "JSON with an unknown field",
                        text.replacen('{', r#"{"colour":"red","#, 1),
                        "malformed",
                    ),
                    self.json("JSON array", format!("[{text}]"), "malformed"),
                    self.json(
                        "JSON schema_version 99",
                        json(&self.edit(|m| *(self.version)(m) = 99)),
                        "schema",
                    ),
                    self.json(
                        "JSON ten years ahead",
                        json(&self.edit(|m| *(self.time)(m) = t + TEN_YEARS_MS)),
                        "schema",
                    ),
                    self.json(
                        "JSON key field empty",
                        json(&self.edit(|m| (self.keyed)(m).clear())),
                        "schema",
                    ),
                    self.json(
                        "JSON oversized",
                        text.replacen('{', &format!("{{{}", " ".repeat(self.limit)), 1),
                        "oversized",
                    ),
                ]);
            }
            None => out.extend([
                self.json("JSON", r#"{"room_id":"room-0001"}"#.into(), "content_type"),
                self.json("malformed JSON", r#"{"room_id": "#.into(), "content_type"),
            ]),
        }
        out
    }
}

/// Media made with the ffmpeg CLI for the media poisons.
struct Media {
    /// One second of 176x144 H.264 in MPEG-TS.
    ts: Vec<u8>,
    /// One second of AAC in ADTS framing.
    aac: Vec<u8>,
    /// A JPEG picture.
    jpg: Vec<u8>,
}

impl Media {
    fn make(dir: &Path) -> Media {
        let ts = ts_clip(dir, "a.ts", "libx264", "176x144", 10, 1, false);
        let aac = aac_tone(dir);
        ffmpeg(
            dir,
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=176x144",
                "-frames:v",
                "1",
                "a.jpg",
            ],
        );
        Media {
            ts,
            aac,
            jpg: read(dir, "a.jpg"),
        }
    }
}

/// A comment as JSON, as the simulator writes it.
fn comment_json(c: &Comment) -> String {
    String::from_utf8(onair::simulator::publish::comment_json(c)).expect("JSON is UTF-8")
}

fn action_json(a: &ViewerAction) -> String {
    serde_json::json!({
        "schema_version": a.schema_version,
        "room_id": a.room_id,
        "user_id": a.user_id,
        "event_time_ms": a.event_time_ms,
        "kind": a.kind().as_str_name(),
    })
    .to_string()
}

fn short_video_json(s: &ShortVideoAction) -> String {
    serde_json::json!({
        "schema_version": s.schema_version,
        "user_id": s.user_id,
        "video_id": s.video_id,
        "event_time_ms": s.event_time_ms,
        "kind": s.kind().as_str_name(),
        "watch_ms": s.watch_ms,
        "duration_ms": s.duration_ms,
    })
    .to_string()
}

fn video_poisons(t: i64, media: &Media) -> Vec<Poison> {
    let k = Kind {
        topic: "video",
        good: VideoSegment {
            schema_version: 1,
            room_id: "room-0001".into(),
            streamer_id: "streamer-1".into(),
            sequence: 7,
            start_time_ms: t,
            duration_ms: 1000,
            format: VideoFormat::MpegTs as i32,
            payload: media.ts.clone(),
        },
        key: "room-0001",
        other_key: "room-0002",
        keyed: |m| &mut m.room_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.start_time_ms,
        json: None,
        limit: MAX_VIDEO_BYTES,
    };
    let ts = &media.ts;
    let half = ts.len() / 188 / 2 * 188;
    let garbage: Vec<u8> = (0..188 * 40u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut jpeg_as_ts = media.jpg.clone();
    jpeg_as_ts.resize(media.jpg.len().div_ceil(188) * 188, 0);
    let with = |payload: &[u8], format: VideoFormat| {
        k.edit(|v| {
            v.payload = payload.to_vec();
            v.format = format as i32;
            if format == VideoFormat::Jpeg {
                // One picture: no duration.
                v.duration_ms = 0;
            }
        })
    };
    let mut out = k.every_class();
    out.extend([
        k.pb("no media", &with(&[], VideoFormat::MpegTs), "schema"),
        k.pb("unknown format", &k.edit(|v| v.format = 99), "schema"),
        k.pb(
            "format unspecified",
            &with(ts, VideoFormat::Unspecified),
            "schema",
        ),
        // Corrupt media: the envelope is valid, the media is not.
        k.pb(
            "TS cut mid-packet",
            &with(&ts[..ts.len() - 100], VideoFormat::MpegTs),
            "media_truncated",
        ),
        k.pb(
            "TS cut to its first half",
            &with(&ts[..half], VideoFormat::MpegTs),
            "media_truncated",
        ),
        k.pb(
            "garbage TS packets",
            &with(&garbage, VideoFormat::MpegTs),
            "media_corrupt",
        ),
        k.pb(
            "JPEG labelled as TS",
            &with(&jpeg_as_ts, VideoFormat::MpegTs),
            "media_corrupt",
        ),
        k.pb(
            "TS labelled as JPEG",
            &with(ts, VideoFormat::Jpeg),
            "media_corrupt",
        ),
        k.pb(
            "a 60 s segment",
            &k.edit(|v| v.duration_ms = 60_000),
            "media_too_large",
        ),
    ]);
    out
}

fn audio_poisons(t: i64, media: &Media) -> Vec<Poison> {
    let k = Kind {
        topic: "audio",
        good: AudioChunk {
            schema_version: 1,
            room_id: "room-0002".into(),
            streamer_id: "streamer-2".into(),
            sequence: 7,
            start_time_ms: t,
            sample_rate: 16_000,
            channels: 1,
            format: AudioFormat::AacAdts as i32,
            payload: media.aac.clone(),
        },
        key: "room-0002",
        other_key: "room-0003",
        keyed: |m| &mut m.room_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.start_time_ms,
        json: None,
        limit: MAX_AUDIO_BYTES,
    };
    let garbage: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let pcm = |rate: u32, channels: u32, bytes: usize| {
        k.edit(|a| {
            a.format = AudioFormat::PcmS16le as i32;
            a.sample_rate = rate;
            a.channels = channels;
            a.payload = vec![0; bytes];
        })
    };
    let aac_of = |payload: &[u8]| k.edit(|a| a.payload = payload.to_vec());
    let mut out = k.every_class();
    out.extend([
        k.pb("unknown format", &k.edit(|a| a.format = 99), "schema"),
        k.pb("sample rate 0", &pcm(0, 1, 3200), "schema"),
        k.pb("9 channels", &pcm(16_000, 9, 3600), "schema"),
        k.pb("PCM cut mid-frame", &pcm(16_000, 2, 3202), "schema"),
        // Corrupt media: the envelope is valid, the media is not.
        k.pb("garbage AAC", &aac_of(&garbage), "media_corrupt"),
        k.pb("TS labelled as AAC", &aac_of(&media.ts), "media_corrupt"),
        // 31 s of 1 kHz PCM: small in bytes, over the 30 s a payload may hold.
        k.pb("31 s of PCM", &pcm(1000, 1, 62_000), "media_too_large"),
    ]);
    out
}

fn comment(room: &str, t: i64) -> Comment {
    Comment {
        schema_version: 1,
        room_id: room.into(),
        user_id: "user-900001".into(),
        event_time_ms: t,
        text: "hello".into(),
        comment_id: String::new(),
    }
}

fn comment_poisons(t: i64) -> Vec<Poison> {
    let k = Kind {
        topic: "comments",
        good: comment("room-0003", t),
        key: "room-0003",
        other_key: "room-0000",
        keyed: |m| &mut m.room_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.event_time_ms,
        json: Some(comment_json),
        limit: MAX_EVENT_BYTES,
    };
    // Over max_comment_chars (2000) yet under max_event_bytes.
    let long = k.edit(|c| c.text = "a".repeat(2001));
    assert!(long.encoded_len() <= MAX_EVENT_BYTES);
    // "hello" with its last byte made invalid UTF-8.
    let not_utf8 = |bytes: Vec<u8>| {
        let mut bytes = bytes;
        let at = bytes
            .windows(5)
            .position(|w| w == b"hello")
            .expect("the text is in the record");
        bytes[at + 4] = 0xff;
        Some(bytes)
    };
    let mut out = k.every_class();
    out.extend([
        k.bytes(
            "text not UTF-8",
            not_utf8(k.good.encode_to_vec()),
            None,
            "malformed",
        ),
        k.bytes(
            "JSON text not UTF-8",
            not_utf8(comment_json(&k.good).into_bytes()),
            Some("application/json"),
            "malformed",
        ),
        k.pb("user_id empty", &k.edit(|c| c.user_id.clear()), "schema"),
        k.pb("text over 2000 characters", &long, "schema"),
        k.json(
            "JSON event time as a string",
            comment_json(&k.good).replacen(
                &format!("\"event_time_ms\":{t}"),
                &format!("\"event_time_ms\":\"{t}\""),
                1,
            ),
            "malformed",
        ),
    ]);
    out
}

fn action(room: &str, user: &str, t: i64) -> ViewerAction {
    ViewerAction {
        schema_version: 1,
        room_id: room.into(),
        user_id: user.into(),
        streamer_id: "streamer-0".into(),
        event_time_ms: t,
        kind: ActionKind::Like as i32,
        ..Default::default()
    }
}

fn action_poisons(t: i64) -> Vec<Poison> {
    let k = Kind {
        topic: "actions",
        good: action("room-0000", "user-900002", t),
        key: "room-0000",
        other_key: "room-0001",
        keyed: |m| &mut m.room_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.event_time_ms,
        json: Some(action_json),
        limit: MAX_EVENT_BYTES,
    };
    let mut out = k.every_class();
    out.extend([
        k.pb("user_id empty", &k.edit(|a| a.user_id.clear()), "schema"),
        k.pb("unknown kind", &k.edit(|a| a.kind = 99), "schema"),
        k.pb(
            "kind unspecified",
            &k.edit(|a| a.kind = ActionKind::Unspecified as i32),
            "schema",
        ),
        k.pb(
            "a 3000-byte gift id",
            &k.edit(|a| {
                a.kind = ActionKind::Gift as i32;
                a.gift_id = "x".repeat(3000);
            }),
            "oversized",
        ),
        k.json(
            "JSON unknown kind",
            action_json(&k.good).replace("ACTION_KIND_LIKE", "dance"),
            "malformed",
        ),
        k.json(
            "JSON kind unspecified",
            action_json(&k.good).replace("ACTION_KIND_LIKE", "unspecified"),
            "malformed",
        ),
        k.json(
            "JSON seconds for milliseconds",
            action_json(&k.edit(|a| a.event_time_ms = t / 1000)),
            "schema",
        ),
    ]);
    out
}

fn short_video_poisons(t: i64) -> Vec<Poison> {
    let k = Kind {
        topic: "short-video-actions",
        good: ShortVideoAction {
            schema_version: 1,
            user_id: "user-900003".into(),
            video_id: "video-1".into(),
            author_id: "author-1".into(),
            event_time_ms: t,
            kind: ShortVideoActionKind::Play as i32,
            watch_ms: 4000,
            duration_ms: 9000,
        },
        key: "user-900003",
        other_key: "user-900004",
        keyed: |m| &mut m.user_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.event_time_ms,
        json: Some(short_video_json),
        limit: MAX_EVENT_BYTES,
    };
    let mut out = k.every_class();
    out.extend([
        k.pb("video_id empty", &k.edit(|s| s.video_id.clear()), "schema"),
        k.pb("unknown kind", &k.edit(|s| s.kind = 99), "schema"),
        k.json(
            "JSON unknown kind",
            short_video_json(&k.good).replace("SHORT_VIDEO_ACTION_KIND_PLAY", "swipe"),
            "malformed",
        ),
    ]);
    out
}

fn user_action_poisons(t: i64) -> Vec<Poison> {
    let k = Kind {
        topic: "user-actions",
        good: action("room-0002", "user-900005", t),
        key: "user-900005",
        other_key: "user-900006",
        keyed: |m| &mut m.user_id,
        version: |m| &mut m.schema_version,
        time: |m| &mut m.event_time_ms,
        json: Some(action_json),
        limit: MAX_EVENT_BYTES,
    };
    let mut out = k.every_class();
    out.extend([
        k.pb("room_id empty", &k.edit(|a| a.room_id.clear()), "schema"),
        k.pb("unknown kind", &k.edit(|a| a.kind = 99), "schema"),
    ]);
    out
}

/// The corpus: every class of hostile input for every input kind, with
/// event times at `t` where the time is not what is wrong.
fn poisons(t: i64, media: &Media) -> Vec<Poison> {
    let all: Vec<Poison> = [
        video_poisons(t, media),
        audio_poisons(t, media),
        comment_poisons(t),
        action_poisons(t),
        short_video_poisons(t),
        user_action_poisons(t),
    ]
    .into_iter()
    .flatten()
    .collect();
    // The table itself must hold what it claims: the decoder refuses each
    // record for its reason, or passes it on to the media decoder.
    let limits = Limits {
        max_event_bytes: MAX_EVENT_BYTES,
        max_video_bytes: MAX_VIDEO_BYTES,
        max_audio_bytes: MAX_AUDIO_BYTES,
        ..Limits::default()
    };
    for p in &all {
        let got = decode_input(
            kind_of(p.topic),
            Some(p.key.as_bytes()),
            p.payload.as_deref(),
            p.content_type,
            &limits,
        );
        match (&got, p.reason.starts_with("media_")) {
            (Ok(_), true) => {}
            (Err(e), false) if e.reason() == p.reason => {}
            _ => panic!("{}: decodes to {got:?}, want {}", p.what, p.reason),
        }
    }
    all
}

fn kind_of(topic: &str) -> InputKind {
    match topic {
        "video" => InputKind::Video,
        "audio" => InputKind::Audio,
        "comments" => InputKind::Comments,
        "actions" => InputKind::Actions,
        "short-video-actions" => InputKind::ShortVideoActions,
        "user-actions" => InputKind::UserActions,
        other => panic!("not an input topic: {other}"),
    }
}

/// (topic, partition, offset) of a record.
type Origin = (String, i32, i64);

/// Produces the poisons at `indices` and returns where each went.
fn produce(topics: &Topics, all: &[Poison], indices: &[usize]) -> Vec<(Origin, usize)> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("producer");
    let mut out = Vec::new();
    for &i in indices {
        let p = &all[i];
        let topic = topics.name(p.topic);
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic).key(p.key);
        if let Some(payload) = &p.payload {
            rec = rec.payload(&payload[..]);
        }
        if let Some(ct) = p.content_type {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(ct),
            }));
        }
        let delivery = rt
            .block_on(producer.send(rec, Duration::from_secs(10)))
            .unwrap_or_else(|(e, _)| panic!("produce {}: {e}", p.what));
        out.push(((topic, delivery.partition, delivery.offset), i));
    }
    out
}

/// Everything on `topic` now: read until the count its partitions' high
/// watermarks promise.
fn read_all(topic: &str) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut total = 0;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            total += (high - low).max(0) as usize;
        }
    }
    let recs = read_until(topic, Duration::from_secs(60), |r| r.len() >= total);
    assert_eq!(recs.len(), total, "{topic} read to its end");
    recs
}

/// Every user's sequence rebuilt from the good live and short-video actions
/// on the input topics (the poisons left out), as the operator folds them.
fn expected_sequences(
    topics: &Topics,
    poisoned: &HashSet<Origin>,
) -> BTreeMap<String, Vec<Behaviour>> {
    let mut acts: HashMap<String, Vec<Act>> = HashMap::new();
    let mut good = |kind: InputKind, stream: u8| {
        let topic = topics.name(if stream == 0 {
            "actions"
        } else {
            "short-video-actions"
        });
        for r in read_all(&topic) {
            if poisoned.contains(&(topic.clone(), r.partition, r.offset)) {
                continue;
            }
            let event = decode_input(
                kind,
                Some(&r.key),
                Some(&r.payload),
                r.headers.get("content-type").map(String::as_str),
                &Limits::default(),
            )
            .unwrap_or_else(|e| panic!("{topic}/{}@{}: {e}", r.partition, r.offset));
            let source = Source {
                stream,
                partition: r.partition,
                offset: r.offset,
            };
            let (user, act) = match &event {
                Event::Action(a) => (&a.user_id, Act::live(a, source, None)),
                Event::ShortVideo(s) => (&s.user_id, Act::short_video(s, source)),
                other => panic!("{other:?} on {topic}"),
            };
            if let Some(act) = act {
                acts.entry(user.clone()).or_default().push(act);
            }
        }
    };
    good(InputKind::Actions, 0);
    good(InputKind::ShortVideoActions, 1);
    let bounds = Bounds::default();
    acts.into_iter()
        .map(|(user, acts)| {
            let fold = rebuild(&acts, &bounds, None);
            let seq: Vec<Behaviour> = fold
                .behaviours()
                .into_iter()
                .map(behaviour_record)
                .collect();
            (user, seq)
        })
        .filter(|(_, seq)| !seq.is_empty())
        .collect()
}

/// The last `user-sequences` record per user.
fn latest_sequences(recs: &[Rec]) -> HashMap<String, Vec<Behaviour>> {
    let mut out: HashMap<String, ((i32, i64), Vec<Behaviour>)> = HashMap::new();
    for r in recs {
        let Ok(s) = UserSequence::decode(&r.payload[..]) else {
            continue;
        };
        let at = (r.partition, r.offset);
        if out.get(&s.user_id).is_none_or(|(seen, _)| at > *seen) {
            out.insert(s.user_id, (at, s.behaviours));
        }
    }
    out.into_iter().map(|(u, (_, b))| (u, b)).collect()
}

fn sequence_mismatches(
    want: &BTreeMap<String, Vec<Behaviour>>,
    got: &HashMap<String, Vec<Behaviour>>,
) -> Vec<String> {
    want.iter()
        .filter_map(|(user, seq)| match got.get(user) {
            None => Some(format!("{user}: no record")),
            Some(s) if s != seq => Some(format!(
                "{user}: {} behaviours, want {}; got {:?}, want {:?}",
                s.len(),
                seq.len(),
                s.first(),
                seq.first()
            )),
            Some(_) => None,
        })
        .collect()
}

/// Whether `rec` is the dead letter of poison `p`, read from `origin`.
fn check_dead_letter(p: &Poison, origin: &Origin, rec: &Rec) -> Result<(), String> {
    let dl = DeadLetter::decode(&rec.payload[..]).map_err(|e| format!("undecodable: {e}"))?;
    let header = rec.headers.get("onair-dlq-reason").map(String::as_str);
    if dl.reason != p.reason || header != Some(p.reason) {
        return Err(format!(
            "reason {:?} (header {header:?}), want {}: {}",
            dl.reason, p.reason, dl.detail
        ));
    }
    if dl.detail.is_empty() {
        return Err("no detail".into());
    }
    if dl.payload != p.payload.clone().unwrap_or_default() {
        return Err(format!(
            "{} bytes kept, want the original {}",
            dl.payload.len(),
            p.payload.as_ref().map_or(0, Vec::len)
        ));
    }
    let source = (
        dl.source_topic.clone(),
        dl.source_partition,
        dl.source_offset,
    );
    if &source != origin {
        return Err(format!("source {source:?}"));
    }
    if dl.key != p.key.as_bytes() || rec.key != p.key.as_bytes() {
        return Err(format!(
            "key {:?}, record keyed {:?}",
            String::from_utf8_lossy(&dl.key),
            String::from_utf8_lossy(&rec.key)
        ));
    }
    if dl.content_type != p.content_type.unwrap_or_default() {
        return Err(format!("content type {:?}", dl.content_type));
    }
    Ok(())
}

#[test]
fn poison_goes_to_dead_letters_and_good_records_flow() {
    let started = Instant::now();
    let dir = common::scratch("poison");
    let topics = Topics {
        prefix: common::unique("poison"),
    };
    let pipeline = common::pipeline(&dir, &topics, EXTRA);
    let truth_path = dir.join("truth.jsonl");
    let t = truth_path.to_str().expect("utf-8 path");
    // One start for the simulator and the poisons. The media poisons pass
    // the record decoder and join the merge: stamped later than the
    // simulated records behind them on their stream, they would close the
    // ticks those records belong to (streams are ordered in time).
    let start = onair::simulator::default_start_ms();
    let start_arg = start.to_string();
    let all = poisons(start, &Media::make(&dir));
    // Create the topics before producing: some brokers auto-create a topic
    // with one partition when a producer names it.
    common::create_topics(&pipeline);
    // Half the poisons before the simulated traffic, half after it.
    let (before, after): (Vec<usize>, Vec<usize>) = (0..all.len()).partition(|i| i % 2 == 0);
    let mut produced = produce(&topics, &all, &before);
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "4",
            "--duration",
            "20s",
            "--speed",
            "0",
            "--seed",
            "3",
            "--fps",
            "0",
            "--json-every",
            "4",
            "--truth",
            t,
            "--start-ms",
            &start_arg,
        ],
    );
    assert!(
        sim.wait(Duration::from_secs(120)).success(),
        "{}",
        sim.log_tail()
    );
    produced.extend(produce(&topics, &all, &after));
    let poisoned: HashSet<Origin> = produced.iter().map(|(o, _)| o.clone()).collect();
    let want_sequences = expected_sequences(&topics, &poisoned);

    eprintln!(
        "{:?}: {} poisons and the simulated traffic sent",
        started.elapsed(),
        all.len()
    );
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let dead = read_until(&topics.name("dead-letters"), Duration::from_secs(90), |r| {
        r.len() >= all.len()
    });
    let by_origin: BTreeMap<Origin, &Rec> = dead
        .iter()
        .map(|r| {
            let h = &r.headers;
            let origin = (
                h["onair-source-topic"].clone(),
                h["onair-source-partition"]
                    .parse()
                    .expect("partition header"),
                h["onair-source-offset"].parse().expect("offset header"),
            );
            (origin, r)
        })
        .collect();
    // Every poison is there once, with its reason and origin, byte for byte.
    let wrong: Vec<String> = produced
        .iter()
        .filter_map(|(origin, i)| {
            let p = &all[*i];
            let found = by_origin
                .get(origin)
                .ok_or_else(|| "no dead letter".to_string())
                .and_then(|rec| check_dead_letter(p, origin, rec));
            found.err().map(|e| format!("{}: {e}", p.what))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} poisons not dead-lettered as they should be:\n{}",
        wrong.len(),
        all.len(),
        wrong.join("\n")
    );
    eprintln!("{:?}: every poison dead-lettered", started.elapsed());
    let truth = GroundTruth::read_jsonl(BufReader::new(
        std::fs::File::open(&truth_path).expect("truth"),
    ))
    .expect("truth parses");
    let expected: HashSet<(String, i64)> = truth.tick_map().keys().cloned().collect();
    let stats = read_until(
        &topics.name("room-stats"),
        Duration::from_secs(90),
        |recs| {
            let got: HashSet<(String, i64)> = recs
                .iter()
                .filter_map(|r| RoomStats::decode(&r.payload[..]).ok())
                .map(|s| (s.room_id, s.tick_start_ms))
                .collect();
            expected.is_subset(&got)
        },
    );
    eprintln!("{:?}: room stats read", started.elapsed());
    let sequences = read_until(
        &topics.name("user-sequences"),
        Duration::from_secs(90),
        |recs| sequence_mismatches(&want_sequences, &latest_sequences(recs)).is_empty(),
    );
    eprintln!("{:?}: user sequences read", started.elapsed());
    // The real /metrics endpoint shows what happened.
    let metrics = engine.scrape().expect("/metrics answers");
    let m = |name: &str, labels: &[(&str, &str)]| common::metric(&metrics, name, labels);
    assert_eq!(
        m("onair_dead_letters_total", &[]),
        Some(all.len() as f64),
        "dead letters counted"
    );
    let reasons: BTreeSet<&str> = all.iter().map(|p| p.reason).collect();
    for reason in reasons {
        assert_eq!(
            m("onair_dead_letters_total", &[("reason", reason)]),
            Some(all.iter().filter(|p| p.reason == reason).count() as f64),
            "dead letters of reason {reason}"
        );
    }
    let (media, decode): (Vec<&Poison>, Vec<&Poison>) =
        all.iter().partition(|p| p.reason.starts_with("media_"));
    assert!(m("onair_stage_errors_total", &[("stage", "decode")]) >= Some(decode.len() as f64));
    assert!(m("onair_stage_errors_total", &[("stage", "media")]) >= Some(media.len() as f64));
    for stage in [
        "source",
        "decode",
        "runtime",
        "room_activity",
        "sink",
        "dead_letters",
    ] {
        assert!(
            m("onair_stage_received_total", &[("stage", stage)]).is_some_and(|v| v > 0.0),
            "{stage} received
{metrics}"
        );
        assert!(
            m("onair_stage_sent_total", &[("stage", stage)]).is_some(),
            "{stage} sent"
        );
    }
    for stage in ["decode", "runtime", "room_activity"] {
        assert!(
            m("onair_stage_latency_seconds_count", &[("stage", stage)]).is_some_and(|v| v > 0.0),
            "{stage} latency"
        );
    }
    for name in [
        "onair_consumer_lag",
        "onair_queue_depth",
        "onair_partitions_paused",
        "onair_partitions_assigned",
        "onair_offset_commits_total",
    ] {
        assert!(m(name, &[]).is_some(), "{name} exported\n{metrics}");
    }
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit {status}\n{}",
        engine.log_tail()
    );

    assert_eq!(dead.len(), all.len(), "one dead letter per poison message");

    // The good records around them, room stage: every tick equal to the truth.
    let mut got = BTreeMap::new();
    for r in &stats {
        let s = RoomStats::decode(&r.payload[..]).expect("room-stats decodes");
        got.insert((s.room_id.clone(), s.tick_start_ms), s);
    }
    let cmp = truth.compare(&got);
    assert!(
        cmp.is_exact(),
        "{cmp}: missing {:?} extra {:?} different {:?}",
        cmp.missing.iter().take(3).collect::<Vec<_>>(),
        cmp.extra.iter().take(3).collect::<Vec<_>>(),
        cmp.different.first()
    );
    // User stage: every user's last sequence equals the rebuild.
    let bad = sequence_mismatches(&want_sequences, &latest_sequences(&sequences));
    assert!(
        bad.is_empty(),
        "{} of {} users' sequences differ from the rebuild, e.g.:\n{}",
        bad.len(),
        want_sequences.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    let short = want_sequences
        .values()
        .flatten()
        .filter(|b| b.domain != "live")
        .count();
    let live = want_sequences.values().flatten().count() - short;
    assert!(
        live > 20 && short > 20,
        "{live} live and {short} short-video behaviours"
    );
    eprintln!(
        "{} poisons dead-lettered; {} room-ticks and {} users' sequences ({live} live, {short} short-video behaviours) equal the good records",
        all.len(),
        got.len(),
        want_sequences.len()
    );
}
