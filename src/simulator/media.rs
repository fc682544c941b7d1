//! Test-media generator for the room simulator.
//!
//! What it is for: making *real, encoded* media for simulated rooms, so the engine's
//! ingest path sees the same bytes a live source would send. It draws synthetic video
//! frames whose content follows the room's state ([`render_frame`]), encodes them as
//! self-contained H.264 MPEG-TS segments ([`encode_ts_segment`]) or single JPEG frames
//! ([`encode_jpeg`]) with the `ffmpeg` CLI, and speaks text with the `espeak-ng` CLI
//! ([`synthesize_speech`]), returning 16 kHz mono PCM.
//!
//! What it is not for: decoding or analysing media. Nothing here is on the engine's
//! processing path; the only parsing is [`parse_wav`], which reads the WAV that
//! `espeak-ng` writes (and similar simple PCM files).
//!
//! Only `std` is used, plus the two external tools found on `PATH` (Debian packages
//! `ffmpeg` and `espeak-ng`). A missing tool is reported as [`MediaError::ToolMissing`].

use std::io::{self, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Longest a single `ffmpeg` or `espeak-ng` run may take before it is killed.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a tool's stderr is kept for error messages.
const STDERR_TAIL_BYTES: usize = 2048;
/// Largest accepted frame side, to keep a bad spec from allocating gigabytes.
const MAX_SIDE: u32 = 8192;
/// MPEG-TS packet size.
const TS_PACKET: usize = 188;
/// ffmpeg options shared by every encode: quiet, no terminal, raw RGB24 on stdin.
const RAW_INPUT: &str = "-nostdin -hide_banner -loglevel error -f rawvideo -pix_fmt rgb24";
/// Sample rate produced by [`resample_to_16k`].
const TARGET_RATE: u32 = 16_000;

/// Why making media failed, and whose fault it was.
#[derive(thiserror::Error, Debug)]
pub enum MediaError {
    /// The external tool is not installed or not on `PATH`. The host's setup is at
    /// fault; retrying will not help.
    #[error("`{tool}` is not installed or not on PATH (install the `{tool}` package)")]
    ToolMissing {
        /// The program that could not be started.
        tool: &'static str,
        /// The error from spawning it.
        #[source]
        source: io::Error,
    },
    /// The tool ran but exited unsuccessfully or was killed by a signal. Usually the
    /// request or the tool's build is at fault, so a retry gives the same result.
    #[error("`{tool}` failed ({status}): {stderr_tail}")]
    ToolFailed {
        /// The program that failed.
        tool: &'static str,
        /// Its exit status, in words.
        status: String,
        /// The last part of what it wrote to stderr.
        stderr_tail: String,
    },
    /// The tool did not finish within its time limit and was killed; usually an
    /// overloaded machine, so retrying may help.
    #[error("`{tool}` did not finish within {after:?} and was killed: {stderr_tail}")]
    TimedOut {
        /// The program that was killed.
        tool: &'static str,
        /// The time limit it ran past.
        after: Duration,
        /// The last part of what it wrote to stderr.
        stderr_tail: String,
    },
    /// The tool reported success but its output is not what was asked for.
    #[error("`{tool}` produced unusable output: {reason}")]
    BadOutput {
        /// The program whose output was rejected.
        tool: &'static str,
        /// What is wrong with the output.
        reason: String,
    },
    /// Spawning the tool or talking to it over its pipes failed (for example process
    /// or file-descriptor limits); usually transient.
    #[error("I/O with `{tool}` failed")]
    Io {
        /// The program being talked to.
        tool: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The caller asked for something that cannot be made (zero or odd frame size, no
    /// frames, empty text). The caller is at fault.
    #[error("invalid media request: {0}")]
    InvalidInput(String),
    /// Bytes given to [`parse_wav`] are not a 16-bit PCM RIFF/WAVE file.
    #[error("not a 16-bit PCM WAV file: {0}")]
    InvalidWav(String),
}

impl MediaError {
    /// Whether trying the same request again may succeed (a transient condition such
    /// as a timeout on a busy machine or a pipe error), as opposed to a missing tool,
    /// a bad request or a deterministic tool failure.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MediaError::TimedOut { .. } | MediaError::Io { .. })
    }
}

/// Size and frame rate of generated video.
#[derive(Clone, Copy, Debug)]
pub struct VideoSpec {
    /// Frame width in pixels (must be even for H.264 segments).
    pub width: u32,
    /// Frame height in pixels (must be even for H.264 segments).
    pub height: u32,
    /// Frames per second; one [`Scene`] is drawn per frame.
    pub fps: u32,
}

impl VideoSpec {
    /// Bytes in one RGB24 frame of this size (`width * height * 3`), the length
    /// [`render_frame`] expects.
    pub fn frame_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// What the picture shows at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// Stream time of this frame in milliseconds; drives motion, the progress bar and
    /// the timestamps of encoded segments.
    pub t_ms: u64,
    /// How exciting the room is right now, `0.0..=1.0` (clamped; NaN counts as 0).
    /// Higher values give a brighter, more saturated picture and faster motion.
    pub excitement: f32,
    /// Whether a highlight is happening: draws flashing bars and confetti.
    pub highlight: bool,
    /// Identifies the room; picks the background hue, texture and motion phase.
    pub room_seed: u64,
}

/// Voice used by [`synthesize_speech`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// American English (`espeak-ng` voice `en-us`).
    En,
    /// Mandarin Chinese (`espeak-ng` voice `cmn-latn-pinyin`); the text must be pinyin
    /// with tone numbers, e.g. `"ni3 hao3"`.
    Zh,
}

// ---------------------------------------------------------------------------
// Drawing
// ---------------------------------------------------------------------------

/// Draws one frame, RGB24, row-major, deterministic for the same inputs.
///
/// `buf.len()` should be `spec.frame_len()` (`width * height * 3`). A shorter buffer
/// gets only the whole rows that fit; bytes past the frame are left untouched.
///
/// The picture follows the room's state: the background hue comes from
/// `room_seed`, its brightness and saturation rise with `excitement`, a ball bounces
/// faster as `excitement` grows, a meter on the left shows `excitement`, `highlight`
/// adds flashing bars and falling confetti, a bar along the bottom shows the position
/// of `t_ms` within a 10 s cycle, and a 16-cell binary code at the top right shows
/// `t_ms / 100` (so frames can be identified after decoding). Integer arithmetic
/// only, with work per pixel limited to the background fill.
pub fn render_frame(spec: &VideoSpec, scene: &Scene, buf: &mut [u8]) {
    let w = spec.width as usize;
    let h = spec.height as usize;
    if w == 0 || h == 0 {
        return;
    }
    let rows = (buf.len() / (w * 3)).min(h);
    if rows == 0 {
        return;
    }
    let mut canvas = Canvas {
        buf: &mut buf[..rows * w * 3],
        w,
        rows,
    };

    let seed = splitmix64(scene.room_seed);
    let e = excitement_q8(scene.excitement);
    let t = scene.t_ms;

    // Background: hue from the room, saturation and value from excitement, a
    // vertical gradient and diagonal stripes that scroll with time.
    let hue = (seed % 1536) as u32;
    let bg = hsv(hue, 70 + e * 170 / 256, 60 + e * 170 / 256);
    let stripe_shift = 3 + ((seed >> 16) % 3) as u32;
    let drift = (t / 50) as usize;
    for (y, row) in canvas.buf.chunks_exact_mut(w * 3).enumerate() {
        let shade = 160 + (y * 96 / h) as u32;
        let dark = bg.map(|c| (c * shade / 256) as u8);
        let light = dark.map(|c| c.saturating_add(20));
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let lit = (x.wrapping_add(y).wrapping_add(drift) >> stripe_shift) & 1 == 1;
            px.copy_from_slice(if lit { &light } else { &dark });
        }
    }

    // Bouncing ball: speed grows from w/2 to 4w pixels per second with excitement.
    let r = (h / 8).max(2) as u64;
    let speed = w as u64 * (16 + u64::from(e) * 112 / 256) / 32;
    let cx = r + bounce(
        travel(t, speed, seed >> 20),
        (w as u64).saturating_sub(2 * r),
    );
    let cy = r + bounce(
        travel(t, speed * 5 / 8, seed >> 40),
        (h as u64).saturating_sub(2 * r),
    );
    let ball = hsv((hue + 768) % 1536, 255, 255).map(|c| c as u8);
    canvas.disc(cx as i64, cy as i64, r as i64 + 1, [16, 16, 16]);
    canvas.disc(cx as i64, cy as i64, r as i64, ball);

    if scene.highlight {
        draw_highlight(&mut canvas, w, h, t, seed);
    }

    let (wi, hi) = (w as i64, h as i64);

    // Excitement meter on the left: green when calm, red when excited.
    let meter_w = (wi / 48).max(2);
    let meter_h = i64::from(e) * hi / 256;
    let meter = hsv(512 * (256 - e) / 256, 255, 240).map(|c| c as u8);
    canvas.fill_rect(0, 0, meter_w, hi, [0, 0, 0]);
    canvas.fill_rect(0, hi - meter_h, meter_w, hi, meter);

    // Progress bar along the bottom: position of t within a 10 s cycle.
    let bar_h = (hi / 36).max(2);
    let filled = ((t % 10_000) * w as u64 / 10_000) as i64;
    canvas.fill_rect(0, hi - bar_h, wi, hi, [32, 32, 32]);
    canvas.fill_rect(0, hi - bar_h, filled, hi, [240, 240, 240]);

    // Binary time code of t / 100 ms, most significant bit first.
    let cell = (wi / 64).max(2);
    let code = (t / 100) & 0xFFFF;
    let x0 = wi - 17 * cell;
    for bit in 0..16i64 {
        let on = (code >> (15 - bit)) & 1 == 1;
        let c = if on { [255, 255, 255] } else { [0, 0, 0] };
        let x = x0 + bit * cell;
        canvas.fill_rect(x, cell, x + cell, 2 * cell, c);
    }
}

/// Flashing bars at the top and bottom plus falling confetti.
fn draw_highlight(canvas: &mut Canvas<'_>, w: usize, h: usize, t: u64, seed: u64) {
    let (wi, hi) = (w as i64, h as i64);
    let band = (hi / 10).max(1);
    let stripe = (wi / 16).max(1);
    let flip = (t / 200) % 2;
    let mut i = 0u64;
    let mut x = 0i64;
    while x < wi {
        let c = if (i + flip) & 1 == 0 {
            [255, 255, 255]
        } else {
            [255, 215, 0]
        };
        canvas.fill_rect(x, 0, x + stripe, band, c);
        canvas.fill_rect(x, hi - band, x + stripe, hi, c);
        x += stripe;
        i += 1;
    }

    let size = (wi / 80).max(2);
    for k in 0..48u64 {
        let hsh = splitmix64(seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let x0 = hsh % w as u64;
        let y0 = (hsh >> 16) % h as u64;
        let fall = h as u64 / 2 + (hsh >> 32) % h as u64;
        let y = (y0 + travel(t, fall, 0)) % h as u64;
        let sway = bounce(travel(t, 12, hsh >> 48), 8);
        let x = (x0 + sway) % w as u64;
        let c = hsv(((hsh >> 40) % 1536) as u32, 200, 255).map(|v| v as u8);
        let (x, y) = (x as i64, y as i64);
        canvas.fill_rect(x, y, x + size, y + size, c);
    }
}

/// A clipped view of an RGB24 frame.
struct Canvas<'a> {
    buf: &'a mut [u8],
    w: usize,
    rows: usize,
}

impl Canvas<'_> {
    /// Fills `[x0, x1) x [y0, y1)`, clipped to the frame.
    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let x0 = x0.clamp(0, self.w as i64) as usize;
        let x1 = x1.clamp(0, self.w as i64) as usize;
        let y0 = y0.clamp(0, self.rows as i64) as usize;
        let y1 = y1.clamp(0, self.rows as i64) as usize;
        if x0 >= x1 {
            return;
        }
        for y in y0..y1 {
            let start = (y * self.w + x0) * 3;
            let end = (y * self.w + x1) * 3;
            for px in self.buf[start..end].chunks_exact_mut(3) {
                px.copy_from_slice(&c);
            }
        }
    }

    /// Fills a disc of radius `r` centred on `(cx, cy)`, one span per row.
    fn disc(&mut self, cx: i64, cy: i64, r: i64, c: [u8; 3]) {
        for dy in -r..=r {
            let half = (r * r - dy * dy).max(0).unsigned_abs().isqrt() as i64;
            self.fill_rect(cx - half, cy + dy, cx + half + 1, cy + dy + 1, c);
        }
    }
}

/// Excitement as a fixed-point fraction `0..=256`.
fn excitement_q8(e: f32) -> u32 {
    if e.is_nan() {
        0
    } else {
        (e.clamp(0.0, 1.0) * 256.0) as u32
    }
}

/// Integer HSV to RGB: `h` in `0..1536` (six sectors of 256), `s` and `v` in `0..=255`.
fn hsv(h: u32, s: u32, v: u32) -> [u32; 3] {
    let (s, v) = (s.min(255), v.min(255));
    let f = h % 256;
    let p = v * (255 - s) / 255;
    let q = v * (255 - s * f / 255) / 255;
    let t = v * (255 - s * (255 - f) / 255) / 255;
    match (h / 256) % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Distance in pixels covered after `t_ms` at `speed` pixels per second, plus an offset.
fn travel(t_ms: u64, speed: u64, offset: u64) -> u64 {
    let d = u128::from(t_ms) * u128::from(speed) / 1000;
    (d as u64).wrapping_add(offset)
}

/// Folds a distance onto `0..=span` as a triangle wave (bouncing between two walls).
fn bounce(dist: u64, span: u64) -> u64 {
    if span == 0 {
        return 0;
    }
    let p = dist % (2 * span);
    if p <= span {
        p
    } else {
        2 * span - p
    }
}

/// SplitMix64 finaliser: a cheap, well-mixed hash of a 64-bit value.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// Encoding with ffmpeg
// ---------------------------------------------------------------------------

/// Encodes frames (one [`Scene`] per frame, at `spec.fps`) as one self-contained
/// H.264 MPEG-TS segment whose first frame is a keyframe (IDR).
///
/// Runs `ffmpeg` with libx264 (`ultrafast`, `zerolatency`, no B-frames, one GOP of
/// `scenes.len()` frames, one thread, bit-exact flags), so the same input gives the
/// same bytes on the same ffmpeg build. The segment's timestamps start at the first
/// scene's `t_ms` (modulo MPEG-TS's 33-bit, about 26.5 h, clock), so consecutive
/// segments of a room form one continuous timeline. Frames are rendered and piped
/// to ffmpeg while it encodes.
///
/// Width and height must be even and non-zero, `fps` non-zero, and `scenes`
/// non-empty, or [`MediaError::InvalidInput`] is returned.
pub fn encode_ts_segment(spec: &VideoSpec, scenes: &[Scene]) -> Result<Vec<u8>, MediaError> {
    check_spec(spec, true)?;
    let first = scenes
        .first()
        .ok_or_else(|| MediaError::InvalidInput("a segment needs at least one scene".into()))?;
    let size = format!("{}x{}", spec.width, spec.height);
    let fps = spec.fps.to_string();
    let gop = scenes.len().to_string();
    // Start the segment at the first scene's time on the 33-bit, 90 kHz MPEG-TS clock
    // (reduced here so that any u64 is accepted; ffmpeg wraps the same way).
    let ticks = (u128::from(first.t_ms) * 90) % (1u128 << 33);
    let micros = ticks * 100 / 9;
    let offset = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    let mut args: Vec<&str> = RAW_INPUT.split(' ').collect();
    args.extend(["-s", &size, "-r", &fps, "-i", "pipe:0"]);
    args.extend(
        "-an -c:v libx264 -preset ultrafast -tune zerolatency -bf 0 -sc_threshold 0 \
         -threads 1 -filter_threads 1 -pix_fmt yuv420p -fflags +bitexact -flags:v +bitexact \
         -muxdelay 0 -muxpreload 0"
            .split_whitespace(),
    );
    args.extend(["-g", &gop, "-keyint_min", &gop]);
    args.extend(["-output_ts_offset", &offset]);
    args.extend(["-f", "mpegts", "pipe:1"]);
    let out = run_tool("ffmpeg", &args, TOOL_TIMEOUT, |sink| {
        let mut frame = vec![0u8; spec.frame_len()];
        for scene in scenes {
            render_frame(spec, scene, &mut frame);
            sink.write_all(&frame)?;
        }
        Ok(())
    })?;
    if out.is_empty() || out.len() % TS_PACKET != 0 {
        return Err(MediaError::BadOutput {
            tool: "ffmpeg",
            reason: format!(
                "{} bytes is not a whole number of {TS_PACKET}-byte TS packets",
                out.len()
            ),
        });
    }
    if let Some(i) = out.chunks(TS_PACKET).position(|p| p[0] != 0x47) {
        return Err(MediaError::BadOutput {
            tool: "ffmpeg",
            reason: format!("TS packet {i} lacks the 0x47 sync byte"),
        });
    }
    Ok(out)
}

/// Encodes a single frame as JPEG (`ffmpeg -f image2pipe -c:v mjpeg`), for rooms that
/// send single frames instead of video segments.
///
/// Width and height must be non-zero (odd sizes are fine); `fps` is ignored.
pub fn encode_jpeg(spec: &VideoSpec, scene: &Scene) -> Result<Vec<u8>, MediaError> {
    check_spec(spec, false)?;
    let size = format!("{}x{}", spec.width, spec.height);
    let mut args: Vec<&str> = RAW_INPUT.split(' ').collect();
    args.extend(["-s", &size, "-i", "pipe:0"]);
    args.extend(
        "-frames:v 1 -c:v mjpeg -q:v 4 -pix_fmt yuvj420p -threads 1 -filter_threads 1 \
         -fflags +bitexact -flags:v +bitexact -f image2pipe pipe:1"
            .split_whitespace(),
    );
    let out = run_tool("ffmpeg", &args, TOOL_TIMEOUT, |sink| {
        let mut frame = vec![0u8; spec.frame_len()];
        render_frame(spec, scene, &mut frame);
        sink.write_all(&frame)
    })?;
    if out.len() < 4 || out[..2] != [0xFF, 0xD8] || out[out.len() - 2..] != [0xFF, 0xD9] {
        return Err(MediaError::BadOutput {
            tool: "ffmpeg",
            reason: format!(
                "{} bytes without JPEG start/end markers (FF D8 .. FF D9)",
                out.len()
            ),
        });
    }
    Ok(out)
}

/// Rejects sizes ffmpeg cannot encode (zero, too large, or odd for 4:2:0 H.264).
fn check_spec(spec: &VideoSpec, video: bool) -> Result<(), MediaError> {
    let (w, h) = (spec.width, spec.height);
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(MediaError::InvalidInput(format!(
            "frame size {w}x{h} outside 1..={MAX_SIDE}"
        )));
    }
    if video && (w & 1 == 1 || h & 1 == 1) {
        return Err(MediaError::InvalidInput(format!(
            "frame size {w}x{h} must be even for H.264 4:2:0"
        )));
    }
    if video && spec.fps == 0 {
        return Err(MediaError::InvalidInput("fps must be non-zero".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running external tools
// ---------------------------------------------------------------------------

/// Runs `tool` with `args`, feeding its stdin from `feed` on one thread while stdout
/// and stderr are drained on others (so neither side can block the other), and
/// returns stdout. Kills the tool after `timeout`.
fn run_tool<F>(
    tool: &'static str,
    args: &[&str],
    timeout: Duration,
    feed: F,
) -> Result<Vec<u8>, MediaError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send,
{
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                MediaError::ToolMissing { tool, source }
            } else {
                MediaError::Io { tool, source }
            }
        })?;
    let (Some(stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        kill_and_reap(&mut child);
        return Err(MediaError::Io {
            tool,
            source: io::Error::other("child process has no pipes"),
        });
    };

    thread::scope(|s| {
        let writer = thread::Builder::new()
            .name(format!("{tool}-stdin"))
            .spawn_scoped(s, move || {
                let mut stdin = stdin;
                feed(&mut stdin)
                // stdin is dropped here, closing the pipe so the tool sees EOF.
            });
        let err_reader = thread::Builder::new()
            .name(format!("{tool}-stderr"))
            .spawn_scoped(s, move || read_tail(&mut stderr, STDERR_TAIL_BYTES));
        let (tx, rx) = mpsc::channel();
        let out_reader = thread::Builder::new()
            .name(format!("{tool}-stdout"))
            .spawn_scoped(s, move || {
                let mut out = Vec::new();
                let result = stdout.read_to_end(&mut out).map(|_| out);
                // The receiver may have given up after a timeout; nothing to do then.
                let _ = tx.send(result);
            });
        let (writer, err_reader) = match (writer, err_reader, out_reader) {
            (Ok(w), Ok(e), Ok(_)) => (w, e),
            (Err(source), _, _) | (_, Err(source), _) | (_, _, Err(source)) => {
                kill_and_reap(&mut child);
                return Err(MediaError::Io { tool, source });
            }
        };

        let remaining = deadline.saturating_duration_since(Instant::now());
        let (stdout_result, status) = match rx.recv_timeout(remaining) {
            Ok(result) => match wait_until(&mut child, deadline) {
                Ok(Some(status)) => (result, status),
                Ok(None) => {
                    kill_and_reap(&mut child);
                    let stderr_tail = join_tail(err_reader);
                    return Err(MediaError::TimedOut {
                        tool,
                        after: timeout,
                        stderr_tail,
                    });
                }
                Err(source) => {
                    kill_and_reap(&mut child);
                    return Err(MediaError::Io { tool, source });
                }
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_and_reap(&mut child);
                let stderr_tail = join_tail(err_reader);
                return Err(MediaError::TimedOut {
                    tool,
                    after: timeout,
                    stderr_tail,
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                kill_and_reap(&mut child);
                return Err(MediaError::Io {
                    tool,
                    source: io::Error::other("stdout reader thread panicked"),
                });
            }
        };
        let stderr_tail = join_tail(err_reader);
        let written = writer.join();

        if !status.success() {
            return Err(MediaError::ToolFailed {
                tool,
                status: describe(status),
                stderr_tail,
            });
        }
        match written {
            Ok(Ok(())) => {}
            // The tool exited successfully without reading all of its input; its
            // output is checked by the caller.
            Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Ok(Err(source)) => return Err(MediaError::Io { tool, source }),
            Err(_) => {
                return Err(MediaError::Io {
                    tool,
                    source: io::Error::other("stdin writer thread panicked"),
                })
            }
        }
        stdout_result.map_err(|source| MediaError::Io { tool, source })
    })
}

/// Waits for the child to exit, polling until `deadline`; `None` if it is still running.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Kills the child (if still running) and collects its exit status so no zombie is left.
fn kill_and_reap(child: &mut Child) {
    // Either call fails only when the child has already exited and been reaped.
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads `r` to its end, keeping only the last `limit` bytes.
fn read_tail(r: &mut impl Read, limit: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * limit {
                    tail.drain(..tail.len() - limit);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if tail.len() > limit {
        tail.drain(..tail.len() - limit);
    }
    tail
}

/// Joins the stderr reader and renders its tail as trimmed text.
fn join_tail(handle: thread::ScopedJoinHandle<'_, Vec<u8>>) -> String {
    let bytes = handle.join().unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// An exit status in words ("exit status: 1", "signal: 9 (SIGKILL)").
fn describe(status: ExitStatus) -> String {
    status.to_string()
}

// ---------------------------------------------------------------------------
// Speech
// ---------------------------------------------------------------------------

/// Synthesises speech with `espeak-ng` and returns 16 kHz mono samples.
///
/// Uses voice `en-us` for [`Lang::En`] and `cmn-latn-pinyin` for [`Lang::Zh`] (where
/// `text` must be pinyin with tone numbers, e.g. `"ni3 hao3"`; Chinese characters are
/// not read correctly by espeak-ng 1.51). The text goes to espeak-ng on stdin, so it
/// cannot be mistaken for options. The WAV espeak writes (16-bit mono, 22050 Hz) is
/// parsed with [`parse_wav`] and resampled with [`resample_to_16k`].
pub fn synthesize_speech(text: &str, lang: Lang) -> Result<Vec<i16>, MediaError> {
    const TOOL: &str = "espeak-ng";
    let text = text.trim();
    if text.is_empty() {
        return Err(MediaError::InvalidInput("no text to speak".into()));
    }
    let voice = match lang {
        Lang::En => "en-us",
        Lang::Zh => "cmn-latn-pinyin",
    };
    let args = ["--stdout", "-v", voice, "-b", "1", "--stdin"];
    let wav = run_tool(TOOL, &args, TOOL_TIMEOUT, |sink| {
        sink.write_all(text.as_bytes())
    })?;
    let (samples, rate) = parse_wav(&wav).map_err(|e| MediaError::BadOutput {
        tool: TOOL,
        reason: e.to_string(),
    })?;
    if samples.is_empty() {
        return Err(MediaError::BadOutput {
            tool: TOOL,
            reason: format!("no audio for voice {voice}"),
        });
    }
    Ok(resample_to_16k(&samples, rate))
}

/// Parses a RIFF/WAVE PCM s16le file (any rate, mono, or stereo downmixed to mono)
/// into `(samples, sample_rate)`.
///
/// Accepts format tag 1 (PCM) and WAVE_FORMAT_EXTENSIBLE with the PCM sub-format.
/// A `data` chunk whose declared size runs past the end of `bytes` is read up to the
/// end, because streamed WAVs (such as `espeak-ng --stdout`) carry a placeholder
/// size. Anything else (not RIFF/WAVE, other encodings or sample sizes, more than two
/// channels, a header cut short, no `data` chunk) is [`MediaError::InvalidWav`].
pub fn parse_wav(bytes: &[u8]) -> Result<(Vec<i16>, u32), MediaError> {
    let bad = |m: &str| MediaError::InvalidWav(m.to_string());
    if bytes.len() < 12 {
        return Err(bad("shorter than a RIFF header"));
    }
    if &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("no RIFF/WAVE signature"));
    }
    let mut format: Option<(usize, u32)> = None;
    let mut pos = 12usize;
    loop {
        if bytes.len() - pos < 8 {
            return Err(bad(if format.is_none() {
                "header cut short before the fmt chunk"
            } else {
                "no data chunk"
            }));
        }
        let id = &bytes[pos..pos + 4];
        let size = le_u32(&bytes[pos + 4..pos + 8]) as usize;
        let body = pos + 8;
        match id {
            b"fmt " => {
                if size < 16 || bytes.len() - body < size {
                    return Err(bad("fmt chunk cut short"));
                }
                format = Some(parse_fmt(&bytes[body..body + size])?);
            }
            b"data" => {
                let Some((channels, rate)) = format else {
                    return Err(bad("data chunk before fmt chunk"));
                };
                let data = &bytes[body..body + size.min(bytes.len() - body)];
                let samples = data
                    .chunks_exact(2 * channels)
                    .map(|frame| {
                        let sum: i32 = frame
                            .chunks_exact(2)
                            .map(|s| i32::from(i16::from_le_bytes([s[0], s[1]])))
                            .sum();
                        (sum / channels as i32) as i16
                    })
                    .collect();
                return Ok((samples, rate));
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        pos = body
            .checked_add(size)
            .and_then(|p| p.checked_add(size & 1))
            .filter(|&p| p <= bytes.len())
            .ok_or_else(|| bad("chunk runs past the end before the data chunk"))?;
    }
}

/// Validates a `fmt ` chunk body; returns `(channels, sample_rate)`.
fn parse_fmt(f: &[u8]) -> Result<(usize, u32), MediaError> {
    let bad = |m: String| MediaError::InvalidWav(m);
    let tag = le_u16(&f[0..2]);
    let channels = le_u16(&f[2..4]);
    let rate = le_u32(&f[4..8]);
    let block_align = le_u16(&f[12..14]);
    let bits = le_u16(&f[14..16]);
    let pcm = match tag {
        1 => true,
        // WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the real tag.
        0xFFFE => f.len() >= 26 && le_u16(&f[24..26]) == 1,
        _ => false,
    };
    if !pcm {
        return Err(bad(format!("format tag {tag:#06x} is not PCM")));
    }
    if bits != 16 {
        return Err(bad(format!("{bits}-bit samples, expected 16")));
    }
    if !(1..=2).contains(&channels) {
        return Err(bad(format!("{channels} channels, expected 1 or 2")));
    }
    if block_align != channels * 2 {
        return Err(bad(format!(
            "block align {block_align} does not match {channels} channel(s) of 16 bits"
        )));
    }
    if rate == 0 {
        return Err(bad("sample rate 0".into()));
    }
    Ok((usize::from(channels), rate))
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

// ---------------------------------------------------------------------------
// Resampling
// ---------------------------------------------------------------------------

/// Resamples mono PCM from `rate` Hz to 16 kHz with a windowed-sinc (Blackman) filter.
///
/// The output has `round(len * 16000 / rate)` samples. The low-pass cut-off is 92 % of
/// the lower of the two Nyquist frequencies, so downsampling does not alias; samples
/// beyond either end count as silence. A `rate` of 16000 returns a copy; a `rate` of 0
/// returns nothing.
pub fn resample_to_16k(samples: &[i16], rate: u32) -> Vec<i16> {
    if rate == 0 || samples.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(crate::decode::resample::output_len(
        samples.len(),
        rate,
        TARGET_RATE,
    ));
    crate::decode::resample::resample_with(
        samples.len(),
        rate,
        TARGET_RATE,
        |i| f64::from(samples[i]),
        |v| out.push(v.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SMALL: VideoSpec = VideoSpec {
        width: 256,
        height: 144,
        fps: 5,
    };

    fn scene(t_ms: u64, excitement: f32, highlight: bool) -> Scene {
        Scene {
            t_ms,
            excitement,
            highlight,
            room_seed: 42,
        }
    }

    fn render(spec: &VideoSpec, s: &Scene) -> Vec<u8> {
        let mut buf = vec![0u8; spec.frame_len()];
        render_frame(spec, s, &mut buf);
        buf
    }

    fn mean(buf: &[u8]) -> f64 {
        buf.iter().map(|&b| f64::from(b)).sum::<f64>() / buf.len() as f64
    }

    fn temp_path(ext: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("onair-media-{}-{n}.{ext}", std::process::id()))
    }

    fn ffprobe(path: &PathBuf, args: &[&str]) -> String {
        let out = Command::new("ffprobe")
            .args(["-v", "error"])
            .args(args)
            .arg(path)
            .output()
            .expect("ffprobe runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn rms(s: &[i16]) -> f64 {
        (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
    }

    fn zero_crossings(s: &[i16]) -> usize {
        s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
    }

    fn sine(freq: f64, rate: u32, secs: f64, amp: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                (amp * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
            })
            .collect()
    }

    fn wav(channels: u16, rate: u32, bits: u16, tag: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        let align = channels * bits / 8;
        v.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        v.extend_from_slice(&align.to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn render_is_deterministic_and_follows_state() {
        let calm = scene(1_000, 0.1, false);
        let a = render(&SMALL, &calm);
        assert_eq!(a, render(&SMALL, &calm));

        let excited = render(&SMALL, &scene(1_000, 0.9, false));
        let diff = mean(&excited) - mean(&a);
        assert!(diff > 20.0, "excitement brightens the picture by {diff}");

        let mid = scene(1_000, 0.5, false);
        let plain = render(&SMALL, &mid);
        let lit = render(
            &SMALL,
            &Scene {
                highlight: true,
                ..mid
            },
        );
        let diff = mean(&lit) - mean(&plain);
        assert!(diff > 10.0, "highlight brightens the picture by {diff}");

        let other_room = render(
            &SMALL,
            &Scene {
                room_seed: 7,
                ..mid
            },
        );
        assert_ne!(plain, other_room);
        let later = render(&SMALL, &Scene { t_ms: 1_400, ..mid });
        assert_ne!(plain, later);
    }

    #[test]
    fn render_tolerates_odd_buffers_and_inputs() {
        let mut short = vec![7u8; SMALL.frame_len() / 2 + 5];
        render_frame(&SMALL, &scene(0, f32::NAN, true), &mut short);
        assert_eq!(&short[short.len() - 5..], &[7; 5]);
        let mut empty: Vec<u8> = Vec::new();
        render_frame(&SMALL, &scene(u64::MAX, 5.0, true), &mut empty);
        let tiny = VideoSpec {
            width: 3,
            height: 1,
            fps: 1,
        };
        let _ = render(&tiny, &scene(u64::MAX, -1.0, true));
    }

    #[test]
    fn ts_segment_is_h264_with_all_frames() {
        let scenes: Vec<Scene> = (0..10)
            .map(|i| scene(12_000 + i * 200, i as f32 / 10.0, i >= 5))
            .collect();
        let ts = encode_ts_segment(&SMALL, &scenes).expect("encode");
        assert_eq!(ts.len() % 188, 0);
        assert!(ts.chunks(188).all(|p| p[0] == 0x47));
        assert_eq!(ts, encode_ts_segment(&SMALL, &scenes).expect("encode"));

        let path = temp_path("ts");
        std::fs::write(&path, &ts).expect("write temp file");
        let stream = ffprobe(
            &path,
            &[
                "-count_frames",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=codec_name,width,height,nb_read_frames,start_time",
                "-of",
                "csv=p=0",
            ],
        );
        let frames = ffprobe(
            &path,
            &[
                "-select_streams",
                "v:0",
                "-show_entries",
                "frame=key_frame",
                "-of",
                "csv=p=0",
            ],
        );
        let _ = std::fs::remove_file(&path);
        // MPEG-TS lists the stream under its program too: check the first listing.
        let first = stream.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert_eq!(first.trim(), "h264,256,144,12.000000,10", "{stream}");
        let keys: Vec<&str> = frames
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(keys.len(), 10);
        assert_eq!(
            keys[0].trim_end_matches(','),
            "1",
            "first frame is a keyframe"
        );
    }

    #[test]
    fn bad_video_requests_are_rejected() {
        let odd = VideoSpec {
            width: 255,
            height: 144,
            fps: 5,
        };
        let s = [scene(0, 0.5, false)];
        assert!(matches!(
            encode_ts_segment(&odd, &s),
            Err(MediaError::InvalidInput(_))
        ));
        assert!(matches!(
            encode_ts_segment(&SMALL, &[]),
            Err(MediaError::InvalidInput(_))
        ));
        let no_fps = VideoSpec { fps: 0, ..SMALL };
        assert!(matches!(
            encode_ts_segment(&no_fps, &s),
            Err(MediaError::InvalidInput(_))
        ));
    }

    #[test]
    fn jpeg_has_markers() {
        let jpg = encode_jpeg(&SMALL, &scene(500, 0.7, true)).expect("encode");
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
        assert_eq!(&jpg[jpg.len() - 2..], &[0xFF, 0xD9]);
        let odd = VideoSpec {
            width: 255,
            height: 143,
            fps: 0,
        };
        let jpg = encode_jpeg(&odd, &scene(500, 0.7, false)).expect("odd size");
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
    }

    #[test]
    fn english_speech() {
        let pcm = synthesize_speech("hello world", Lang::En).expect("speech");
        let secs = pcm.len() as f64 / 16_000.0;
        assert!((0.3..3.0).contains(&secs), "{secs} s");
        assert!(rms(&pcm) > 300.0, "rms {}", rms(&pcm));
    }

    #[test]
    fn mandarin_speech_from_pinyin() {
        let pcm = synthesize_speech("ni3 hao3", Lang::Zh).expect("speech");
        let secs = pcm.len() as f64 / 16_000.0;
        assert!((0.2..3.0).contains(&secs), "{secs} s");
        assert!(rms(&pcm) > 300.0, "rms {}", rms(&pcm));
        assert!(matches!(
            synthesize_speech("  ", Lang::Zh),
            Err(MediaError::InvalidInput(_))
        ));
    }

    #[test]
    fn tool_errors_say_whose_fault() {
        let e = run_tool("onair-no-such-tool", &[], TOOL_TIMEOUT, |_| Ok(())).unwrap_err();
        assert!(matches!(e, MediaError::ToolMissing { .. }), "{e}");
        assert!(!e.is_retryable());

        let e = run_tool(
            "ffmpeg",
            &["-nostdin", "-loglevel", "error", "-i", "/nonexistent/x.ts"],
            TOOL_TIMEOUT,
            |_| Ok(()),
        )
        .unwrap_err();
        match &e {
            MediaError::ToolFailed { stderr_tail, .. } => {
                assert!(stderr_tail.contains("No such file"), "{stderr_tail}")
            }
            other => panic!("unexpected {other}"),
        }
        assert!(!e.is_retryable());

        let start = Instant::now();
        let e = run_tool("sleep", &["5"], Duration::from_millis(200), |_| Ok(())).unwrap_err();
        assert!(matches!(e, MediaError::TimedOut { .. }), "{e}");
        assert!(e.is_retryable());
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn parse_wav_reads_mono_and_stereo() {
        let mono: Vec<u8> = [1i16, -2, 300]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(
            parse_wav(&wav(1, 22_050, 16, 1, &mono)).expect("mono"),
            (vec![1, -2, 300], 22_050)
        );
        let stereo: Vec<u8> = [100i16, 200, -50, -150]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(
            parse_wav(&wav(2, 44_100, 16, 1, &stereo)).expect("stereo"),
            (vec![150, -100], 44_100)
        );
        // Streamed WAV: placeholder data size larger than the file.
        let mut streamed = wav(1, 22_050, 16, 1, &mono);
        streamed[40..44].copy_from_slice(&0x7fff_f000u32.to_le_bytes());
        assert_eq!(parse_wav(&streamed).expect("streamed").0.len(), 3);
    }

    #[test]
    fn parse_wav_rejects_garbage_and_truncation() {
        let mono: Vec<u8> = [1i16, 2, 3].iter().flat_map(|s| s.to_le_bytes()).collect();
        let good = wav(1, 16_000, 16, 1, &mono);
        for bad in [
            &b""[..],
            &b"garbage garbage garbage garbage garbage garbage"[..],
            &good[..11],
            &good[..30],
            &good[..40],
        ] {
            assert!(
                matches!(parse_wav(bad), Err(MediaError::InvalidWav(_))),
                "{} bytes accepted",
                bad.len()
            );
        }
        for bad in [
            wav(1, 16_000, 8, 1, &mono),
            wav(1, 16_000, 16, 3, &mono),
            wav(3, 16_000, 16, 1, &mono),
            wav(1, 0, 16, 1, &mono),
        ] {
            assert!(matches!(parse_wav(&bad), Err(MediaError::InvalidWav(_))));
        }
    }

    #[test]
    fn resample_keeps_length_ratio_and_frequency() {
        for rate in [8_000u32, 22_050, 44_100, 48_000, 22_051] {
            let input = sine(1_000.0, rate, 1.0, 10_000.0);
            let out = resample_to_16k(&input, rate);
            let expected = input.len() as f64 * 16_000.0 / f64::from(rate);
            assert!(
                (out.len() as f64 - expected).abs() <= 1.0,
                "{rate}: {} vs {expected}",
                out.len()
            );
            let zc = zero_crossings(&out) as i64;
            assert!((zc - 2_000).abs() <= 4, "{rate}: {zc} zero crossings");
            let level = rms(&out[200..out.len() - 200]);
            assert!((level - 7_071.0).abs() < 200.0, "{rate}: rms {level}");
        }
        assert_eq!(resample_to_16k(&[1, 2, 3], 16_000), vec![1, 2, 3]);
        assert!(resample_to_16k(&[1, 2, 3], 0).is_empty());
    }

    #[test]
    fn resample_filters_out_aliases() {
        // 10 kHz is above the 8 kHz Nyquist limit of the output: it must be removed,
        // not folded down to 6 kHz.
        let input = sine(10_000.0, 44_100, 0.5, 10_000.0);
        let out = resample_to_16k(&input, 44_100);
        let level = rms(&out[100..out.len() - 100]);
        assert!(level < 150.0, "alias rms {level}");
    }
}
