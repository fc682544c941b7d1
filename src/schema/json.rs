//! JSON forms of the records upstream services often emit as JSON (comments,
//! viewer actions, short-video actions). Field names are the protobuf names;
//! enum values are accepted as the short lower-case name (`"gift"`) or the full
//! protobuf name (`"ACTION_KIND_GIFT"`). Unknown fields are rejected so that a
//! producer's typo is caught rather than silently dropped.

use serde::Deserialize;

use super::v1::{ActionKind, Comment, ShortVideoAction, ShortVideoActionKind, ViewerAction};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommentJson {
    #[serde(default)]
    schema_version: u32,
    room_id: String,
    user_id: String,
    event_time_ms: i64,
    text: String,
    #[serde(default)]
    comment_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionJson {
    #[serde(default)]
    schema_version: u32,
    room_id: String,
    user_id: String,
    #[serde(default)]
    streamer_id: String,
    event_time_ms: i64,
    kind: String,
    #[serde(default)]
    watch_ms: u32,
    #[serde(default)]
    gift_value: u64,
    #[serde(default)]
    gift_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShortVideoActionJson {
    #[serde(default)]
    schema_version: u32,
    user_id: String,
    video_id: String,
    #[serde(default)]
    author_id: String,
    event_time_ms: i64,
    kind: String,
    #[serde(default)]
    watch_ms: u32,
    #[serde(default)]
    duration_ms: u32,
}

pub(super) fn comment(bytes: &[u8]) -> Result<Comment, String> {
    let c: CommentJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(Comment {
        schema_version: c.schema_version,
        room_id: c.room_id,
        user_id: c.user_id,
        event_time_ms: c.event_time_ms,
        text: c.text,
        comment_id: c.comment_id,
    })
}

pub(super) fn action(bytes: &[u8]) -> Result<ViewerAction, String> {
    let a: ActionJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let kind = enum_value(&a.kind, "ACTION_KIND_", ActionKind::from_str_name)
        .ok_or_else(|| format!("unknown action kind {:?}", a.kind))?;
    Ok(ViewerAction {
        schema_version: a.schema_version,
        room_id: a.room_id,
        user_id: a.user_id,
        streamer_id: a.streamer_id,
        event_time_ms: a.event_time_ms,
        kind: kind as i32,
        watch_ms: a.watch_ms,
        gift_value: a.gift_value,
        gift_id: a.gift_id,
        ..ViewerAction::default()
    })
}

pub(super) fn short_video_action(bytes: &[u8]) -> Result<ShortVideoAction, String> {
    let a: ShortVideoActionJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let kind = enum_value(
        &a.kind,
        "SHORT_VIDEO_ACTION_KIND_",
        ShortVideoActionKind::from_str_name,
    )
    .ok_or_else(|| format!("unknown short-video action kind {:?}", a.kind))?;
    Ok(ShortVideoAction {
        schema_version: a.schema_version,
        user_id: a.user_id,
        video_id: a.video_id,
        author_id: a.author_id,
        event_time_ms: a.event_time_ms,
        kind: kind as i32,
        watch_ms: a.watch_ms,
        duration_ms: a.duration_ms,
    })
}

/// Resolves `gift` or `ACTION_KIND_GIFT` (any case) to the enum.
fn enum_value<T>(name: &str, prefix: &str, parse: fn(&str) -> Option<T>) -> Option<T> {
    let upper = name.trim().to_ascii_uppercase();
    if upper.ends_with("UNSPECIFIED") {
        return None;
    }
    parse(&upper).or_else(|| parse(&format!("{prefix}{upper}")))
}
