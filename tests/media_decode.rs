//! Media decode against real encoded media made at test time with the
//! `ffmpeg` CLI: every container and codec decodes to the expected frame
//! count, size and event times; audio round-trips a known tone; hostile
//! payloads fail with the right reason and never crash the process.

mod common;

use common::media::{ffmpeg, fmp4_segments, has_encoder, read, scratch, ts_clip};

use onair::decode::audio::{decode_aac_adts, decode_pcm_s16le, loudness_dbfs, AudioConfig};
use onair::decode::video::{
    decode_video, purpose, DecodedVideo, Layout, Timeline, VideoConfig, VideoInput,
};
use onair::decode::MediaError;
use onair::schema::VideoFormat;

/// A whole second of event time, so the 1-per-second cells start with the segment.
const T0: i64 = 1_767_225_600_000;

fn decode(
    format: VideoFormat,
    payload: &[u8],
    duration_ms: u32,
    cfg: &VideoConfig,
) -> Result<DecodedVideo, MediaError> {
    decode_video(
        &VideoInput {
            format,
            payload,
            init: None,
            start_time_ms: T0,
            duration_ms,
        },
        cfg,
        &mut Timeline::default(),
        None,
    )
}

fn times(d: &DecodedVideo, p: u8) -> Vec<i64> {
    d.frames
        .iter()
        .filter(|f| f.purposes & p != 0)
        .map(|f| f.time_ms - T0)
        .collect()
}

#[test]
fn h264_ts_segment_samples_in_event_time() {
    let dir = scratch("h264");
    let ts = ts_clip(&dir, "a.ts", "libx264", "320x240", 10, 3, false);
    let cfg = VideoConfig::default();
    let d = decode(VideoFormat::MpegTs, &ts, 3000, &cfg).expect("decodes");
    assert_eq!(d.decoded, 30, "every frame decoded");
    assert_eq!(d.source_size, (320, 240));
    assert_eq!(d.codec, "h264");
    // One frame per second of event time, and three spread over the segment.
    assert_eq!(times(&d, purpose::TIMELINE), vec![0, 1000, 2000]);
    assert_eq!(times(&d, purpose::SEGMENT), vec![500, 1500, 2500]);
    for f in &d.frames {
        assert_eq!(f.tensor.len(), 3 * 224 * 224);
        assert!(f.tensor.iter().all(|v| v.is_finite()));
    }
    // testsrc2 is colourful: the normalised picture is not flat.
    let t = &d.frames[0].tensor;
    let mean = t.iter().sum::<f32>() / t.len() as f32;
    let var = t.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / t.len() as f32;
    assert!(var > 0.1, "picture variance {var}");
}

#[test]
fn timeline_sampling_continues_across_segments() {
    let dir = scratch("timeline");
    let ts = ts_clip(&dir, "a.ts", "libx264", "160x120", 4, 2, false);
    let cfg = VideoConfig {
        sample_every_ms: 1500,
        frames_per_segment: 0,
        ..VideoConfig::default()
    };
    let mut timeline = Timeline::default();
    let mut kept = Vec::new();
    for seg in 0..3 {
        let start = T0 + seg * 2000;
        let d = decode_video(
            &VideoInput {
                format: VideoFormat::MpegTs,
                payload: &ts,
                init: None,
                start_time_ms: start,
                duration_ms: 2000,
            },
            &cfg,
            &mut timeline,
            None,
        )
        .expect("decodes");
        kept.extend(d.frames.iter().map(|f| f.time_ms));
    }
    // Cells of 1.5 s (T0 is a multiple of 1.5 s) over 6 s at 4 fps: the
    // first frame in each cell, whichever segment it is in.
    let want: Vec<i64> = [0, 1500, 3000, 4500].iter().map(|o| T0 + o).collect();
    assert_eq!(kept, want);
}

#[test]
fn h265_ts_segment() {
    if !has_encoder("libx265") {
        eprintln!("skipped: this ffmpeg has no libx265 encoder");
        return;
    }
    let dir = scratch("h265");
    let ts = ts_clip(&dir, "a.ts", "libx265", "320x240", 10, 2, false);
    let d = decode(VideoFormat::MpegTs, &ts, 2000, &VideoConfig::default()).expect("decodes");
    assert_eq!(d.codec, "hevc");
    assert_eq!(d.decoded, 20);
}

#[test]
fn fragmented_mp4_segments_decode_behind_their_init() {
    let dir = scratch("fmp4");
    let (init, seg) = fmp4_segments(&dir);
    let d = decode_video(
        &VideoInput {
            format: VideoFormat::Fmp4Segment,
            payload: &seg,
            init: Some(&init),
            start_time_ms: T0,
            duration_ms: 2000,
        },
        &VideoConfig::default(),
        &mut Timeline::default(),
        None,
    )
    .expect("decodes");
    assert_eq!(d.decoded, 20);
    assert_eq!(d.source_size, (256, 144));
    // Instants at 1/6, 3/6 and 5/6 of 2 s; the first frame (every 100 ms) at or after each.
    assert_eq!(times(&d, purpose::SEGMENT), vec![400, 1000, 1700]);
    // Without its init segment the media segment cannot be read.
    let err = decode(
        VideoFormat::Fmp4Segment,
        &seg,
        2000,
        &VideoConfig::default(),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "media_missing_init");
}

#[test]
fn jpeg_frame_with_layouts() {
    let dir = scratch("jpeg");
    ffmpeg(
        &dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360",
            "-frames:v",
            "1",
            "a.jpg",
        ],
    );
    let jpg = read(&dir, "a.jpg");
    let chw = decode(VideoFormat::Jpeg, &jpg, 0, &VideoConfig::default()).expect("decodes");
    assert_eq!(chw.decoded, 1);
    assert_eq!(chw.source_size, (640, 360));
    assert_eq!(chw.frames.len(), 1);
    assert_eq!(chw.frames[0].purposes, purpose::TIMELINE | purpose::SEGMENT);
    let hwc = decode(
        VideoFormat::Jpeg,
        &jpg,
        0,
        &VideoConfig {
            layout: Layout::Hwc,
            width: 32,
            height: 16,
            ..VideoConfig::default()
        },
    )
    .expect("decodes");
    let t = &hwc.frames[0].tensor;
    assert_eq!(t.len(), 3 * 32 * 16);
    // The same pixel in both layouts: CHW at its own size, so compare HWC to
    // a CHW decode at 32x16.
    let chw_small = decode(
        VideoFormat::Jpeg,
        &jpg,
        0,
        &VideoConfig {
            width: 32,
            height: 16,
            ..VideoConfig::default()
        },
    )
    .expect("decodes");
    let c = &chw_small.frames[0].tensor;
    for (y, x, ch) in [(0, 0, 0), (5, 7, 1), (15, 31, 2)] {
        assert_eq!(t[(y * 32 + x) * 3 + ch], c[ch * 32 * 16 + y * 32 + x]);
    }
}

#[test]
fn audio_round_trips_a_tone() {
    let dir = scratch("audio");
    ffmpeg(
        &dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=44100:duration=2",
            "-ac",
            "2",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            "-f",
            "adts",
            "a.aac",
        ],
    );
    let cfg = AudioConfig::default();
    let aac = decode_aac_adts(read(&dir, "a.aac"), &cfg).expect("decodes");
    assert_eq!(
        (aac.source_rate, aac.source_channels, aac.rate),
        (44_100, 2, 16_000)
    );
    // AAC adds a priming delay and pads the last frame: within 100 ms.
    assert!(
        (aac.duration_ms() - 2000).abs() <= 100,
        "{} ms",
        aac.duration_ms()
    );
    assert_frequency(&aac.samples, 16_000, 440.0);

    // The same tone as raw PCM, 48 kHz stereo.
    let pcm: Vec<u8> = (0..96_000)
        .flat_map(|i| {
            let v = ((2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 48_000.0).sin()
                * 16_000.0) as i16;
            [v.to_le_bytes(), v.to_le_bytes()].concat()
        })
        .collect();
    let raw = decode_pcm_s16le(&pcm, 48_000, 2, &cfg).expect("decodes");
    assert_eq!(raw.samples.len(), 32_000);
    assert_frequency(&raw.samples, 16_000, 440.0);
    let db = loudness_dbfs(&raw.samples);
    // A sine of amplitude 16000/32768 is 20*log10(0.488/sqrt 2) = -9.2 dBFS.
    assert!((db + 9.23).abs() < 0.2, "{db} dBFS");
}

#[test]
fn ts_audio_track_decodes_with_the_video() {
    let dir = scratch("av");
    let ts = ts_clip(&dir, "av.ts", "libx264", "160x120", 10, 2, true);
    let d = decode_video(
        &VideoInput {
            format: VideoFormat::MpegTs,
            payload: &ts,
            init: None,
            start_time_ms: T0,
            duration_ms: 2000,
        },
        &VideoConfig::default(),
        &mut Timeline::default(),
        Some(&AudioConfig::default()),
    )
    .expect("decodes");
    assert_eq!(d.decoded, 20);
    let audio = d.audio.expect("audio track");
    assert!(
        (audio.duration_ms() - 2000).abs() <= 100,
        "{} ms",
        audio.duration_ms()
    );
    assert_frequency(&audio.samples, 16_000, 440.0);
}

fn assert_frequency(s: &[f32], rate: u32, want: f64) {
    // Skip the codec's priming and padding at the ends.
    let s = &s[s.len() / 10..s.len() * 9 / 10];
    let ups = s.windows(2).filter(|w| w[0] <= 0.0 && w[1] > 0.0).count();
    let f = ups as f64 * f64::from(rate) / s.len() as f64;
    assert!((f - want).abs() < 5.0, "{f} Hz, want {want}");
}

#[test]
fn hostile_payloads_fail_with_reasons() {
    let dir = scratch("hostile");
    let cfg = VideoConfig::default();
    let ts = ts_clip(&dir, "a.ts", "libx264", "320x240", 10, 2, false);
    let jpg = {
        ffmpeg(
            &dir,
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=64x64",
                "-frames:v",
                "1",
                "a.jpg",
            ],
        );
        read(&dir, "a.jpg")
    };
    let reason = |format, payload: &[u8], duration| {
        decode(format, payload, duration, &cfg)
            .map(|d| format!("decoded {} frames", d.decoded))
            .unwrap_or_else(|e| e.reason().to_string())
    };
    // Empty and garbage.
    assert_eq!(reason(VideoFormat::MpegTs, &[], 2000), "media_empty");
    let garbage: Vec<u8> = (0..188 * 50u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_eq!(reason(VideoFormat::MpegTs, &garbage, 2000), "media_corrupt");
    assert_eq!(reason(VideoFormat::Jpeg, &garbage, 0), "media_corrupt");
    // Truncated: mid-packet, and at a packet boundary half way.
    assert_eq!(
        reason(VideoFormat::MpegTs, &ts[..ts.len() - 100], 2000),
        "media_truncated"
    );
    let half = ts.len() / 188 / 2 * 188;
    assert_eq!(
        reason(VideoFormat::MpegTs, &ts[..half], 2000),
        "media_truncated"
    );
    // Mislabelled.
    let jpeg_as_ts = [jpg.clone(), vec![0; 188 - jpg.len() % 188]].concat();
    assert_eq!(
        reason(VideoFormat::MpegTs, &jpeg_as_ts, 2000),
        "media_corrupt"
    );
    assert_eq!(reason(VideoFormat::Jpeg, &ts, 0), "media_corrupt");
    // Not a frame-carrying format.
    assert_eq!(reason(VideoFormat::Fmp4Init, &ts, 0), "media_unsupported");
    assert_eq!(
        reason(VideoFormat::Unspecified, &ts, 0),
        "media_unsupported"
    );
    // A corrupt middle: flipped bytes in the H.264 payload after the headers.
    let mut flipped = ts.clone();
    for i in (ts.len() / 3..ts.len() * 2 / 3).step_by(7) {
        if i % 188 > 8 {
            flipped[i] ^= 0x5a;
        }
    }
    let r = reason(VideoFormat::MpegTs, &flipped, 2000);
    assert!(
        r == "media_corrupt" || r == "media_truncated" || r.starts_with("decoded"),
        "flipped bytes: {r}"
    );
    // Over the size limits.
    let small = VideoConfig {
        max_source_pixels: 100 * 100,
        ..VideoConfig::default()
    };
    assert_eq!(
        decode(VideoFormat::MpegTs, &ts, 2000, &small)
            .unwrap_err()
            .reason(),
        "media_geometry"
    );
    assert_eq!(reason(VideoFormat::MpegTs, &ts, 60_000), "media_too_large");
    let few = VideoConfig {
        max_frames_per_payload: 5,
        ..VideoConfig::default()
    };
    assert_eq!(
        decode(VideoFormat::MpegTs, &ts, 2000, &few)
            .unwrap_err()
            .reason(),
        "media_too_large"
    );
    let hurried = VideoConfig {
        max_decode_ms: 0,
        ..VideoConfig::default()
    };
    assert_eq!(
        decode(VideoFormat::MpegTs, &ts, 2000, &hurried)
            .unwrap_err()
            .reason(),
        "media_too_slow"
    );
    // Audio.
    let acfg = AudioConfig::default();
    assert_eq!(
        decode_pcm_s16le(&[1, 2, 3], 16_000, 1, &acfg)
            .unwrap_err()
            .reason(),
        "media_truncated"
    );
    assert_eq!(
        decode_pcm_s16le(&[1, 2], 16_000, 9, &acfg)
            .unwrap_err()
            .reason(),
        "media_unsupported"
    );
    assert_eq!(
        decode_pcm_s16le(&vec![0; 16_000 * 2 * 31], 16_000, 1, &acfg)
            .unwrap_err()
            .reason(),
        "media_too_large"
    );
    assert_eq!(
        decode_aac_adts(garbage.clone(), &acfg)
            .unwrap_err()
            .reason(),
        "media_corrupt"
    );
    assert_eq!(
        decode_aac_adts(ts.clone(), &acfg).unwrap_err().reason(),
        "media_corrupt"
    );
}

#[test]
fn resolution_change_and_index_at_the_end() {
    let dir = scratch("change");
    let a = ts_clip(&dir, "a.ts", "libx264", "320x240", 10, 1, false);
    // The second second at another size, its timestamps following on.
    ffmpeg(
        &dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=176x144:rate=10:duration=1",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-output_ts_offset",
            "1",
            "-f",
            "mpegts",
            "b.ts",
        ],
    );
    let b = read(&dir, "b.ts");
    // Two encodes back to back in one payload: the picture size changes mid-stream.
    let both = [a, b].concat();
    let d = decode(VideoFormat::MpegTs, &both, 2000, &VideoConfig::default()).expect("decodes");
    assert_eq!(d.decoded, 20);
    assert_eq!(d.source_size, (176, 144), "the last frame's size");
    assert!(d.frames.iter().all(|f| f.tensor.len() == 3 * 224 * 224));

    // A progressive MP4 with its index (moov) at the end, sent as a media
    // segment behind an unrelated init: an error, never an abort.
    ffmpeg(
        &dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=10:duration=1",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            "late.mp4",
        ],
    );
    let late = read(&dir, "late.mp4");
    let r = decode_video(
        &VideoInput {
            format: VideoFormat::Fmp4Segment,
            payload: &late,
            init: Some(&late[..64]),
            start_time_ms: T0,
            duration_ms: 1000,
        },
        &VideoConfig::default(),
        &mut Timeline::default(),
        None,
    );
    if let Err(e) = &r {
        assert!(!e.reason().is_empty());
    }
    // As its own "init" plus nothing, it still decodes or fails cleanly.
    let r = decode_video(
        &VideoInput {
            format: VideoFormat::Fmp4Segment,
            payload: &late[late.len() / 2..],
            init: Some(&late[..late.len() / 2]),
            start_time_ms: T0,
            duration_ms: 1000,
        },
        &VideoConfig::default(),
        &mut Timeline::default(),
        None,
    );
    eprintln!(
        "moov-at-end MP4 split in two: {:?}",
        r.map(|d| d.decoded).map_err(|e| e.reason())
    );
}
