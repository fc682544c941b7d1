//! Video decode (MPEG-TS, fragmented MP4 behind an init, JPEG) on arbitrary
//! bytes: a result or a `MediaError`, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair::decode::video::{decode_video, Timeline, VideoConfig, VideoInput};
use onair::schema::VideoFormat;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = [VideoFormat::MpegTs, VideoFormat::Fmp4Segment, VideoFormat::Jpeg]
        [usize::from(selector) % 3];
    // For fragmented MP4, part of the input plays the room's init segment.
    let split = (usize::from(selector >> 2) * rest.len() / 64).min(rest.len());
    let (init, payload) = rest.split_at(split);
    let cfg = VideoConfig {
        width: 32,
        height: 32,
        max_decode_ms: 1000,
        ..VideoConfig::default()
    };
    let _ = decode_video(
        &VideoInput {
            format,
            payload,
            init: (format == VideoFormat::Fmp4Segment).then_some(init),
            start_time_ms: 1_767_225_600_000,
            duration_ms: 2000,
        },
        &cfg,
        &mut Timeline::default(),
        Some(&Default::default()),
    );
});
