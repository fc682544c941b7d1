//! Test media made at test time with the `ffmpeg` CLI (nothing large is
//! committed).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("media-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `ffmpeg -y -loglevel error <args>` in `dir`.
pub fn ffmpeg(dir: &Path, args: &[&str]) {
    let out = Command::new("ffmpeg")
        .current_dir(dir)
        .args(["-y", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .output()
        .expect("ffmpeg on PATH (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn has_encoder(name: &str) -> bool {
    Command::new("ffmpeg")
        .args(["-hide_banner", "-encoders"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(name))
        .unwrap_or(false)
}

pub fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).expect("generated media")
}

/// One second of a 300 Hz tone at 16 kHz, as AAC in ADTS (`a.aac` in `dir`).
pub fn aac_tone(dir: &Path) -> Vec<u8> {
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:sample_rate=16000:duration=1",
            "-c:a",
            "aac",
            "-f",
            "adts",
            "a.aac",
        ],
    );
    read(dir, "a.aac")
}

/// A `secs`-second test pattern at `fps` and `size`, in MPEG-TS.
pub fn ts_clip(
    dir: &Path,
    file: &str,
    codec: &str,
    size: &str,
    fps: u32,
    secs: u32,
    audio: bool,
) -> Vec<u8> {
    let src = format!("testsrc2=size={size}:rate={fps}:duration={secs}");
    let mut args = vec!["-f", "lavfi", "-i", &src];
    let tone = format!("sine=frequency=440:sample_rate=48000:duration={secs}");
    if audio {
        args.extend(["-f", "lavfi", "-i", &tone, "-c:a", "aac", "-b:a", "64k"]);
    }
    args.extend(["-c:v", codec, "-g", "1000", "-pix_fmt", "yuv420p"]);
    if codec == "libx265" {
        args.extend(["-x265-params", "log-level=error"]);
    }
    args.extend(["-f", "mpegts", file]);
    ffmpeg(dir, &args);
    read(dir, file)
}

/// Four seconds of 256x144 H.264 at 10 fps as fragmented-MP4 HLS: the init
/// segment and the second 2 s media segment.
pub fn fmp4_segments(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=256x144:rate=10:duration=4",
            "-c:v",
            "libx264",
            "-g",
            "20",
            "-keyint_min",
            "20",
            "-sc_threshold",
            "0",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "hls",
            "-hls_time",
            "2",
            "-hls_segment_type",
            "fmp4",
            "-hls_fmp4_init_filename",
            "init.mp4",
            "-hls_segment_filename",
            "seg%d.m4s",
            "-hls_playlist_type",
            "vod",
            "index.m3u8",
        ],
    );
    (read(dir, "init.mp4"), read(dir, "seg1.m4s"))
}
