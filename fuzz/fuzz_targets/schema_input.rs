//! The wire decoder (protobuf or JSON, chosen by content type) on arbitrary
//! bytes: it returns a value or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair::schema::{decode_input, InputKind, Limits};

const KINDS: [InputKind; 6] = [
    InputKind::Video,
    InputKind::Audio,
    InputKind::Comments,
    InputKind::Actions,
    InputKind::ShortVideoActions,
    InputKind::UserActions,
];
const TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("application/x-protobuf"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    let content_type = TYPES[usize::from(selector >> 4) % TYPES.len()];
    let (key, payload) = rest.split_at(rest.len().min(usize::from(selector & 7)));
    let _ = decode_input(kind, Some(key), Some(payload), content_type, &Limits::default());
});
