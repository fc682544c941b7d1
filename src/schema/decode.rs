//! Turns the bytes of one input record into a typed, checked [`Event`], or a
//! [`DecodeError`] that says why the record goes to the dead-letter topic.

use prost::Message;
use serde::{Deserialize, Serialize};

use super::json;
use super::v1::{
    ActionKind, AudioChunk, AudioFormat, Comment, ShortVideoAction, ShortVideoActionKind,
    VideoFormat, VideoSegment, ViewerAction,
};
use super::SCHEMA_VERSION;
use crate::error::{Classify, Fault};

/// The Kafka header that selects the payload encoding.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// Which input stream a record came from. The room-keyed kinds share a key
/// (the room id) and a partition count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Video segments and frames.
    Video,
    /// Audio chunks.
    Audio,
    /// Chat comments.
    Comments,
    /// Live viewer actions.
    Actions,
    /// Short-video actions (user-keyed; read by the user stage).
    ShortVideoActions,
    /// Live viewer actions re-keyed by user (the repartition topic the room
    /// stage writes and the user stage reads).
    UserActions,
}

impl InputKind {
    /// The room-keyed kinds, in their index order.
    pub const ROOM: [InputKind; 4] = [
        InputKind::Video,
        InputKind::Audio,
        InputKind::Comments,
        InputKind::Actions,
    ];
    /// Number of room-keyed kinds.
    pub const ROOM_COUNT: usize = 4;
    /// The user-keyed kinds the user stage reads, in their index order.
    pub const USER: [InputKind; 2] = [InputKind::ShortVideoActions, InputKind::UserActions];
    /// Number of kinds (per-stream arrays are this long, whatever the stage).
    pub const COUNT: usize = 6;

    /// Dense index among all kinds (room kinds first).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Video => "video",
            InputKind::Audio => "audio",
            InputKind::Comments => "comments",
            InputKind::Actions => "actions",
            InputKind::ShortVideoActions => "short_video_actions",
            InputKind::UserActions => "user_actions",
        }
    }
}

/// A decoded, checked input record.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A video segment or frame.
    Video(VideoSegment),
    /// An audio chunk.
    Audio(AudioChunk),
    /// A chat comment.
    Comment(Comment),
    /// A live viewer action.
    Action(ViewerAction),
    /// A short-video action.
    ShortVideo(ShortVideoAction),
}

impl Event {
    /// The room the event belongs to (empty for user-keyed events).
    pub fn room_id(&self) -> &str {
        match self {
            Event::Video(v) => &v.room_id,
            Event::Audio(a) => &a.room_id,
            Event::Comment(c) => &c.room_id,
            Event::Action(a) => &a.room_id,
            Event::ShortVideo(_) => "",
        }
    }

    /// Event time in ms since the epoch, from the record itself.
    pub fn event_time_ms(&self) -> i64 {
        match self {
            Event::Video(v) => v.start_time_ms,
            Event::Audio(a) => a.start_time_ms,
            Event::Comment(c) => c.event_time_ms,
            Event::Action(a) => a.event_time_ms,
            Event::ShortVideo(s) => s.event_time_ms,
        }
    }

    /// The streamer named by the record, if any.
    pub fn streamer_id(&self) -> Option<&str> {
        let s = match self {
            Event::Video(v) => &v.streamer_id,
            Event::Audio(a) => &a.streamer_id,
            Event::Action(a) => &a.streamer_id,
            Event::Comment(_) | Event::ShortVideo(_) => return None,
        };
        (!s.is_empty()).then_some(s.as_str())
    }
}

/// Size limits applied before parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted video payload (whole Kafka value), bytes.
    pub max_video_bytes: usize,
    /// Largest accepted audio payload, bytes.
    pub max_audio_bytes: usize,
    /// Largest accepted comment or action record, bytes.
    pub max_event_bytes: usize,
    /// Longest accepted comment text, in characters.
    pub max_comment_chars: usize,
    /// Largest lead of an event time over this machine's clock (ms); a record
    /// further in the future is refused (`schema`): it would carry its
    /// partition's watermark past every record that follows, making them all
    /// late. 0: no bound.
    pub max_future_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_video_bytes: 8 << 20,
            max_audio_bytes: 1 << 20,
            max_event_bytes: 16 << 10,
            max_comment_chars: 2000,
            max_future_ms: 86_400_000,
        }
    }
}

/// Why an input record was rejected. Always the input's fault; never retried.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the {limit}-byte limit for {kind}")]
    Oversized {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
        /// Which stream.
        kind: &'static str,
    },
    /// The `content-type` header names an encoding this stream does not accept.
    #[error("content type {0:?} is not accepted here")]
    ContentType(String),
    /// The bytes do not parse as the declared encoding.
    #[error("malformed {encoding} record: {detail}")]
    Malformed {
        /// `protobuf` or `json`.
        encoding: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// The record parses but breaks the schema's rules.
    #[error("schema violation: {0}")]
    Schema(String),
}

impl DecodeError {
    /// Every reason [`Self::reason`] gives.
    pub const REASONS: [&'static str; 4] = ["oversized", "content_type", "malformed", "schema"];

    /// The machine-readable reason written to the dead-letter record.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::ContentType(_) => "content_type",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::Schema(_) => "schema",
        }
    }
}

impl Classify for DecodeError {
    fn fault(&self) -> Fault {
        Fault::Input
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

fn encoding(content_type: Option<&str>) -> Result<Encoding, DecodeError> {
    let Some(ct) = content_type else {
        return Ok(Encoding::Protobuf);
    };
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        ""
        | "application/x-protobuf"
        | "application/protobuf"
        | "application/vnd.google.protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(DecodeError::ContentType(ct.to_string())),
    }
}

fn proto<M: Message + Default>(bytes: &[u8]) -> Result<M, DecodeError> {
    M::decode(bytes).map_err(|e| DecodeError::Malformed {
        encoding: "protobuf",
        detail: e.to_string(),
    })
}

fn malformed_json(detail: String) -> DecodeError {
    DecodeError::Malformed {
        encoding: "json",
        detail,
    }
}

fn schema(msg: impl Into<String>) -> DecodeError {
    DecodeError::Schema(msg.into())
}

/// Decodes and checks one record of `kind`.
///
/// `key` is the Kafka key; when present on a room-keyed stream it must equal
/// the record's room id (otherwise the record may sit on the wrong partition).
pub fn decode_input(
    kind: InputKind,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    let payload = payload.ok_or_else(|| schema("empty payload (tombstone)"))?;
    let limit = match kind {
        InputKind::Video => limits.max_video_bytes,
        InputKind::Audio => limits.max_audio_bytes,
        _ => limits.max_event_bytes,
    };
    if payload.len() > limit {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit,
            kind: kind.name(),
        });
    }
    let enc = encoding(content_type)?;
    // Zero bytes are a valid protobuf encoding (every field at its default),
    // which no kind accepts: say so rather than name the first empty field.
    if payload.is_empty() && enc == Encoding::Protobuf {
        return Err(schema("empty payload"));
    }
    let event = match (kind, enc) {
        (InputKind::Video, Encoding::Protobuf) => Event::Video(proto(payload)?),
        (InputKind::Audio, Encoding::Protobuf) => Event::Audio(proto(payload)?),
        (InputKind::Comments, Encoding::Protobuf) => Event::Comment(proto(payload)?),
        (InputKind::Actions | InputKind::UserActions, Encoding::Protobuf) => {
            Event::Action(proto(payload)?)
        }
        (InputKind::ShortVideoActions, Encoding::Protobuf) => Event::ShortVideo(proto(payload)?),
        (InputKind::Comments, Encoding::Json) => {
            Event::Comment(json::comment(payload).map_err(malformed_json)?)
        }
        (InputKind::Actions | InputKind::UserActions, Encoding::Json) => {
            Event::Action(json::action(payload).map_err(malformed_json)?)
        }
        (InputKind::ShortVideoActions, Encoding::Json) => {
            Event::ShortVideo(json::short_video_action(payload).map_err(malformed_json)?)
        }
        (InputKind::Video | InputKind::Audio, Encoding::Json) => {
            return Err(DecodeError::ContentType(
                content_type.unwrap_or_default().to_string(),
            ))
        }
    };
    // The repartition topic is keyed by user: its key is checked against
    // the user, the room only for being there.
    let by_user = kind == InputKind::UserActions;
    check(&event, key.filter(|_| !by_user), limits)?;
    if let (true, Event::Action(a), Some(key)) = (by_user, &event, key) {
        if key != a.user_id.as_bytes() {
            return Err(schema(format!(
                "message key {:?} differs from user_id {:?}",
                String::from_utf8_lossy(key),
                a.user_id
            )));
        }
    }
    Ok(event)
}

fn check_version(v: u32) -> Result<(), DecodeError> {
    if v > SCHEMA_VERSION {
        return Err(schema(format!(
            "schema_version {v} is newer than {SCHEMA_VERSION}"
        )));
    }
    Ok(())
}

fn check_room(room: &str, key: Option<&[u8]>) -> Result<(), DecodeError> {
    if room.is_empty() {
        return Err(schema("room_id is empty"));
    }
    if let Some(key) = key {
        if key != room.as_bytes() {
            return Err(schema(format!(
                "message key {:?} differs from room_id {room:?}",
                String::from_utf8_lossy(key)
            )));
        }
    }
    Ok(())
}

fn check_time(t: i64, field: &str, limits: &Limits) -> Result<(), DecodeError> {
    // 2000-01-01 .. 2200-01-01: catches seconds-for-milliseconds and garbage.
    if !(946_684_800_000..7_258_118_400_000).contains(&t) {
        return Err(schema(format!(
            "{field} {t} is not a plausible epoch time in ms"
        )));
    }
    if limits.max_future_ms > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if t.saturating_sub(now) > limits.max_future_ms {
            return Err(schema(format!(
                "{field} {t} is {} ms ahead of this machine's clock (limits.max_future_ms {})",
                t - now,
                limits.max_future_ms
            )));
        }
    }
    Ok(())
}

fn check(event: &Event, key: Option<&[u8]>, limits: &Limits) -> Result<(), DecodeError> {
    match event {
        Event::Video(v) => {
            check_version(v.schema_version)?;
            check_room(&v.room_id, key)?;
            check_time(v.start_time_ms, "start_time_ms", limits)?;
            if VideoFormat::try_from(v.format).unwrap_or(VideoFormat::Unspecified)
                == VideoFormat::Unspecified
            {
                return Err(schema(format!("unknown video format {}", v.format)));
            }
            if v.payload.is_empty() {
                return Err(schema("video payload is empty"));
            }
        }
        Event::Audio(a) => {
            check_version(a.schema_version)?;
            check_room(&a.room_id, key)?;
            check_time(a.start_time_ms, "start_time_ms", limits)?;
            let format = AudioFormat::try_from(a.format).unwrap_or(AudioFormat::Unspecified);
            if format == AudioFormat::Unspecified {
                return Err(schema(format!("unknown audio format {}", a.format)));
            }
            if !(1000..=384_000).contains(&a.sample_rate) {
                return Err(schema(format!(
                    "sample_rate {} out of range",
                    a.sample_rate
                )));
            }
            if !(1..=8).contains(&a.channels) {
                return Err(schema(format!(
                    "channels {} out of range 1..=8",
                    a.channels
                )));
            }
            if format == AudioFormat::PcmS16le && a.payload.len() % (2 * a.channels as usize) != 0 {
                return Err(schema("PCM payload is not a whole number of frames"));
            }
        }
        Event::Comment(c) => {
            check_version(c.schema_version)?;
            check_room(&c.room_id, key)?;
            check_time(c.event_time_ms, "event_time_ms", limits)?;
            if c.user_id.is_empty() {
                return Err(schema("user_id is empty"));
            }
            if c.text.chars().count() > limits.max_comment_chars {
                return Err(schema(format!(
                    "comment text longer than {} characters",
                    limits.max_comment_chars
                )));
            }
        }
        Event::Action(a) => {
            check_version(a.schema_version)?;
            check_room(&a.room_id, key)?;
            check_time(a.event_time_ms, "event_time_ms", limits)?;
            if a.user_id.is_empty() {
                return Err(schema("user_id is empty"));
            }
            if ActionKind::try_from(a.kind).unwrap_or(ActionKind::Unspecified)
                == ActionKind::Unspecified
            {
                return Err(schema(format!("unknown action kind {}", a.kind)));
            }
        }
        Event::ShortVideo(s) => {
            check_version(s.schema_version)?;
            check_time(s.event_time_ms, "event_time_ms", limits)?;
            if s.user_id.is_empty() || s.video_id.is_empty() {
                return Err(schema("user_id and video_id are required"));
            }
            if let Some(key) = key {
                if key != s.user_id.as_bytes() {
                    return Err(schema("message key differs from user_id"));
                }
            }
            if ShortVideoActionKind::try_from(s.kind).unwrap_or(ShortVideoActionKind::Unspecified)
                == ShortVideoActionKind::Unspecified
            {
                return Err(schema(format!(
                    "unknown short-video action kind {}",
                    s.kind
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_time_far_ahead_of_the_clock_is_refused() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let at =
            |t: i64| format!(r#"{{"room_id":"r","user_id":"u","event_time_ms":{t},"text":"hi"}}"#);
        let decode = |t: i64, limits: &Limits| {
            decode_input(
                InputKind::Comments,
                Some(b"r"),
                Some(at(t).as_bytes()),
                Some("application/json"),
                limits,
            )
        };
        let limits = Limits::default();
        assert!(
            decode(now + 60_000, &limits).is_ok(),
            "a minute ahead is clock skew"
        );
        assert!(
            decode(now - 365 * 86_400_000, &limits).is_ok(),
            "the past is a replay"
        );
        let err = decode(now + 2 * 86_400_000, &limits).unwrap_err();
        assert_eq!(err.reason(), "schema", "{err}");
        assert!(
            err.to_string().contains("ahead of this machine's clock"),
            "{err}"
        );
        let unbounded = Limits {
            max_future_ms: 0,
            ..Limits::default()
        };
        assert!(decode(now + 2 * 86_400_000, &unbounded).is_ok());
    }

    const T: i64 = 1_767_225_600_000;

    #[test]
    fn every_reason_is_listed() {
        let all = [
            DecodeError::Oversized {
                size: 0,
                limit: 0,
                kind: "",
            },
            DecodeError::ContentType(String::new()),
            DecodeError::Malformed {
                encoding: "",
                detail: String::new(),
            },
            DecodeError::Schema(String::new()),
        ];
        let reasons: Vec<&str> = all.iter().map(DecodeError::reason).collect();
        assert_eq!(reasons, DecodeError::REASONS);
    }

    fn comment() -> Comment {
        Comment {
            schema_version: 1,
            room_id: "room-1".into(),
            user_id: "u1".into(),
            event_time_ms: T,
            text: "太精彩了！".into(),
            comment_id: String::new(),
        }
    }

    #[test]
    fn protobuf_roundtrip_and_key_check() {
        let bytes = comment().encode_to_vec();
        let l = Limits::default();
        let ev =
            decode_input(InputKind::Comments, Some(b"room-1"), Some(&bytes), None, &l).unwrap();
        assert_eq!(ev, Event::Comment(comment()));
        let err =
            decode_input(InputKind::Comments, Some(b"room-2"), Some(&bytes), None, &l).unwrap_err();
        assert_eq!(err.reason(), "schema");
    }

    #[test]
    fn json_comment_and_action() {
        let l = Limits::default();
        let j = br#"{"room_id":"room-1","user_id":"u1","event_time_ms":1767225600000,"text":"hi"}"#;
        let ev = decode_input(
            InputKind::Comments,
            None,
            Some(j),
            Some("application/json; charset=utf-8"),
            &l,
        )
        .unwrap();
        assert_eq!(ev.room_id(), "room-1");
        let a = br#"{"room_id":"room-1","user_id":"u1","event_time_ms":1767225600000,"kind":"gift","gift_value":52}"#;
        match decode_input(
            InputKind::Actions,
            None,
            Some(a),
            Some("application/json"),
            &l,
        )
        .unwrap()
        {
            Event::Action(a) => {
                assert_eq!(a.kind, ActionKind::Gift as i32);
                assert_eq!(a.gift_value, 52);
            }
            other => panic!("{other:?}"),
        }
        let full = br#"{"room_id":"r","user_id":"u","event_time_ms":1767225600000,"kind":"ACTION_KIND_LIKE"}"#;
        assert!(decode_input(
            InputKind::Actions,
            None,
            Some(full),
            Some("application/json"),
            &l
        )
        .is_ok());
    }

    #[test]
    fn an_empty_record_is_refused_as_empty_for_every_kind() {
        let l = Limits::default();
        for kind in InputKind::ROOM.into_iter().chain(InputKind::USER) {
            let err = decode_input(kind, Some(b"k"), Some(&[]), None, &l).unwrap_err();
            assert_eq!(err, DecodeError::Schema("empty payload".into()), "{kind:?}");
            let tombstone = decode_input(kind, Some(b"k"), None, None, &l).unwrap_err();
            assert_eq!(tombstone.reason(), "schema", "{kind:?}");
        }
        // Zero bytes are not JSON.
        let err = decode_input(
            InputKind::Comments,
            None,
            Some(&[]),
            Some("application/json"),
            &l,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "malformed", "{err}");
    }

    #[test]
    fn a_newer_schema_version_is_refused_for_every_kind() {
        let l = Limits::default();
        let video = VideoSegment {
            schema_version: 99,
            room_id: "r".into(),
            start_time_ms: T,
            format: VideoFormat::MpegTs as i32,
            payload: vec![0x47; 188],
            ..Default::default()
        };
        let audio = AudioChunk {
            schema_version: 99,
            room_id: "r".into(),
            start_time_ms: T,
            sample_rate: 16_000,
            channels: 1,
            format: AudioFormat::PcmS16le as i32,
            payload: vec![0; 2],
            ..Default::default()
        };
        let action = ViewerAction {
            schema_version: 99,
            room_id: "r".into(),
            user_id: "u".into(),
            event_time_ms: T,
            kind: ActionKind::Like as i32,
            ..Default::default()
        };
        let short = ShortVideoAction {
            schema_version: 99,
            user_id: "u".into(),
            video_id: "v".into(),
            event_time_ms: T,
            kind: ShortVideoActionKind::Play as i32,
            ..Default::default()
        };
        let newer_comment = Comment {
            schema_version: 99,
            ..comment()
        };
        let cases: [(InputKind, Vec<u8>); 6] = [
            (InputKind::Video, video.encode_to_vec()),
            (InputKind::Audio, audio.encode_to_vec()),
            (InputKind::Comments, newer_comment.encode_to_vec()),
            (InputKind::Actions, action.encode_to_vec()),
            (InputKind::ShortVideoActions, short.encode_to_vec()),
            (InputKind::UserActions, action.encode_to_vec()),
        ];
        for (kind, bytes) in cases {
            let err = decode_input(kind, None, Some(&bytes), None, &l).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Schema(format!("schema_version 99 is newer than {SCHEMA_VERSION}")),
                "{kind:?}"
            );
        }
        // 0 is read as 1.
        let v0 = Comment {
            schema_version: 0,
            ..comment()
        };
        assert!(decode_input(
            InputKind::Comments,
            None,
            Some(&v0.encode_to_vec()),
            None,
            &l
        )
        .is_ok());
    }

    #[test]
    fn rejections_say_why() {
        let l = Limits {
            max_event_bytes: 100,
            ..Limits::default()
        };
        let cases: Vec<(InputKind, &[u8], Option<&str>, &str)> = vec![
            (InputKind::Comments, b"{not json", Some("application/json"), "malformed"),
            (InputKind::Comments, &[0xff, 0xff, 0xff], None, "malformed"),
            (InputKind::Comments, b"x", Some("text/plain"), "content_type"),
            (InputKind::Comments, &[b' '; 101], None, "oversized"),
            (InputKind::Actions, br#"{"room_id":"r","user_id":"u","event_time_ms":1767225600000,"kind":"dance"}"#, Some("application/json"), "malformed"),
            (InputKind::Comments, br#"{"room_id":"","user_id":"u","event_time_ms":1767225600000,"text":""}"#, Some("application/json"), "schema"),
            (InputKind::Comments, br#"{"room_id":"r","user_id":"u","event_time_ms":1767225600,"text":""}"#, Some("application/json"), "schema"),
            (InputKind::Comments, br#"{"room_id":"r","user_id":"u","event_time_ms":1767225600000,"text":"","extra":1}"#, Some("application/json"), "malformed"),
            (InputKind::Video, b"{}", Some("application/json"), "content_type"),
        ];
        for (kind, bytes, ct, reason) in cases {
            let err = decode_input(kind, None, Some(bytes), ct, &l).unwrap_err();
            assert_eq!(err.reason(), reason, "{bytes:?}: {err}");
        }
        assert_eq!(
            decode_input(InputKind::Comments, None, None, None, &l)
                .unwrap_err()
                .reason(),
            "schema"
        );
    }
}
