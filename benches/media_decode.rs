//! Benchmark: video decode and frame sampling, as a ratio to the `ffmpeg`
//! CLI decoding the same clips with the same sampling in the same run.
//! Aim: onair at least 0.9 of the CLI's throughput.
//!
//! What it does:
//! 1. makes H.264 MPEG-TS segments with the ffmpeg CLI (2 s each, 30 fps,
//!    3 Mbps; 720p and 360p; `ONAIR_BENCH_SEGMENTS` of each, default 10);
//! 2. alternates, `ONAIR_BENCH_RUNS` times (default 3): onair's
//!    `decode_video` on every segment (one thread, 1 frame per second of
//!    event time plus 3 per segment, scaled to 224x224 and normalised), and
//!    `ffmpeg -threads 1` on the same files, keeping 1 frame per second plus 3
//!    per segment (a `select` filter on the same instants) scaled to 224x224
//!    RGB, written to /dev/null — once over all segments (concat protocol,
//!    the headline: process start paid once) and once per segment;
//! 3. prints each side's source frames per second, the median ratio, and
//!    real-time factor.
//!
//! Run: `cargo bench --bench media_decode`.
//! Not for: absolute speed claims (shared 2-core machines); the ratio is the figure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use onair::decode::video::{decode_video, Timeline, VideoConfig, VideoInput};
use onair::schema::VideoFormat;

const SEGMENT_MS: u32 = 2000;
const FPS: u32 = 30;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ffmpeg(dir: &Path, args: &[&str]) {
    let out = Command::new("ffmpeg")
        .current_dir(dir)
        .args(["-y", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .output()
        .expect("ffmpeg on PATH");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` 2-second segments at `size`, from one continuous encode.
fn segments(dir: &Path, size: &str, n: usize) -> Vec<PathBuf> {
    let secs = (n as u32 * SEGMENT_MS / 1000).to_string();
    let src = format!("testsrc2=size={size}:rate={FPS}:duration={secs}");
    let pattern = format!("seg-{size}-%03d.ts");
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            &src,
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-b:v",
            "3M",
            "-g",
            "60",
            "-keyint_min",
            "60",
            "-sc_threshold",
            "0",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "segment",
            "-segment_time",
            "2",
            "-segment_format",
            "mpegts",
            "-reset_timestamps",
            "1",
            &pattern,
        ],
    );
    (0..n)
        .map(|i| dir.join(format!("seg-{size}-{i:03}.ts")))
        .filter(|p| p.exists())
        .collect()
}

fn onair_run(files: &[PathBuf], cfg: &VideoConfig) -> (f64, usize, usize) {
    let payloads: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("segment"))
        .collect();
    let mut timeline = Timeline::default();
    let started = Instant::now();
    let (mut decoded, mut kept) = (0, 0);
    for (i, p) in payloads.iter().enumerate() {
        let d = decode_video(
            &VideoInput {
                format: VideoFormat::MpegTs,
                payload: p,
                init: None,
                start_time_ms: 1_767_225_600_000 + i as i64 * i64::from(SEGMENT_MS),
                duration_ms: SEGMENT_MS,
            },
            cfg,
            &mut timeline,
            None,
        )
        .expect("segment decodes");
        decoded += d.decoded;
        kept += d.frames.len();
    }
    (started.elapsed().as_secs_f64(), decoded, kept)
}

/// Runs `ffmpeg` on one thread: `input` through `filter` to raw RGB in /dev/null.
fn cli_decode(input: &std::ffi::OsStr, filter: &str) {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-threads", "1", "-i"])
        .arg(input)
        .args([
            "-filter_threads",
            "1",
            "-vf",
            filter,
            "-vsync",
            "0",
            "-f",
            "rawvideo",
            "-threads",
            "1",
            "-y",
            "/dev/null",
        ])
        .output()
        .expect("ffmpeg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same instants as onair: t = 0, 1 s (timeline) and 1/6, 3/6, 5/6 of the
/// segment (the first frame at or after each); at 30 fps, frames 0, 10, 30
/// and 50 of every 60.
fn cli_filter(frame: &str) -> String {
    let pick = [0, 10, 30, 50]
        .map(|k| format!("eq({frame}\\,{k})"))
        .join("+");
    format!("select='{pick}',scale=224:224:flags=bilinear,format=rgb24")
}

/// The CLI once per segment, as a pipeline calling it per payload would.
fn cli_run(files: &[PathBuf]) -> f64 {
    let filter = cli_filter("n");
    let started = Instant::now();
    for f in files {
        cli_decode(f.as_os_str(), &filter);
    }
    started.elapsed().as_secs_f64()
}

/// The CLI once over all segments (concat protocol), so its process start
/// is paid once: the stricter reference.
fn cli_one_process(files: &[PathBuf]) -> f64 {
    let input = format!(
        "concat:{}",
        files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("|")
    );
    let filter = cli_filter("mod(n\\,60)");
    let started = Instant::now();
    cli_decode(input.as_ref(), &filter);
    started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("media_decode: skipped (run it with `cargo bench --bench media_decode`)");
        return;
    }
    let n = env_num("ONAIR_BENCH_SEGMENTS", 10).max(1);
    let runs = env_num("ONAIR_BENCH_RUNS", 3).max(1);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("media-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let cfg = VideoConfig::default();
    for size in ["1280x720", "640x360"] {
        let files = segments(&dir, size, n);
        let mut ratios = Vec::new();
        let mut onair_fps = Vec::new();
        let mut cli_fps = Vec::new();
        let mut per_file_ratios = Vec::new();
        for run in 1..=runs {
            let (secs, decoded, kept) = onair_run(&files, &cfg);
            let per_file = cli_run(&files);
            let cli = cli_one_process(&files);
            let source_frames = decoded as f64;
            onair_fps.push(source_frames / secs);
            cli_fps.push(source_frames / cli);
            ratios.push(cli / secs);
            per_file_ratios.push(per_file / secs);
            println!(
                "  {size} run {run}: onair {decoded} frames decoded, {kept} kept in {secs:.2} s ({:.0} frames/s, {:.1}x real time); ffmpeg CLI in one process {cli:.2} s ({:.0} frames/s), one process per segment {per_file:.2} s; ratio {:.2} (per-segment CLI {:.2})",
                source_frames / secs,
                f64::from(SEGMENT_MS) / 1000.0 * files.len() as f64 / secs,
                source_frames / cli,
                cli / secs,
                per_file / secs
            );
        }
        println!(
            "media_decode {size}: {} segments of 2 s at {FPS} fps; onair {:.0} frames/s vs ffmpeg CLI in one process {:.0} frames/s (one thread each) => ratio {:.2} (median of {runs}; vs one CLI process per segment {:.2}); aim >= 0.90: {}",
            files.len(),
            median(onair_fps),
            median(cli_fps),
            median(ratios.clone()),
            median(per_file_ratios),
            if median(ratios) >= 0.9 { "met" } else { "NOT met" }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
