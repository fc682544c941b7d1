//! Video decode: MPEG-TS segments (H.264, H.265 where FFmpeg has it),
//! fragmented-MP4 media segments (behind the room's init segment) and single
//! JPEG frames, from memory. Frames are sampled in event time — the first
//! frame of every `sample_every_ms` cell of event time (the highlight rate,
//! continuing across segments) and `frames_per_segment` frames spread over
//! each segment (MMBee's) — and only the sampled ones are scaled, converted
//! once to the image encoder's size, layout and normalisation.
//!
//! Not for: running the image encoder, or audio (see `audio`; a segment's
//! audio track is decoded here in the same pass when asked).

use std::time::Duration;

use ffmpeg_next::format::Pixel;
use ffmpeg_next::software::scaling::{self, Flags};
use ffmpeg_next::{codec, frame, media, Packet, Rational};
use serde::{Deserialize, Serialize};

use super::audio::{AudioConfig, AudioTrack, DecodedAudio};
use super::demux::{Container, Demuxer};
use super::{Deadline, MediaError};
use crate::schema::VideoFormat;

/// Memory layout of a frame tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Channels, then rows, then columns (PyTorch / ONNX vision models).
    Chw,
    /// Rows, then columns, then channels (TensorFlow-style models).
    Hwc,
}

/// Video decode and sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoConfig {
    /// Keep the first frame of every this many ms of event time (highlight
    /// detection; 1000 = 1 frame per second). 0 turns it off.
    pub sample_every_ms: i64,
    /// Frames spread evenly over each segment (MMBee). 0 turns it off.
    pub frames_per_segment: usize,
    /// Width of the frames handed to the image encoder (pixels).
    pub width: u32,
    /// Height of the frames handed to the image encoder (pixels).
    pub height: u32,
    /// Tensor layout.
    pub layout: Layout,
    /// Per-channel (R, G, B) mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel (R, G, B) standard deviation divided by after the mean.
    pub std: [f32; 3],
    /// Largest accepted source picture (width x height).
    pub max_source_pixels: u64,
    /// Most frames one payload may decode to.
    pub max_frames_per_payload: usize,
    /// Longest segment accepted (ms of declared duration).
    pub max_segment_ms: u32,
    /// Wall-clock budget to decode one payload (ms).
    pub max_decode_ms: u64,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            sample_every_ms: 1000,
            frames_per_segment: 3,
            width: 224,
            height: 224,
            layout: Layout::Chw,
            // ImageNet statistics, what torchvision's pretrained CNNs expect.
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            max_source_pixels: 3840 * 2160,
            max_frames_per_payload: 1200,
            max_segment_ms: 20_000,
            max_decode_ms: 5_000,
        }
    }
}

/// Why a frame was kept (bit set).
pub mod purpose {
    /// The first frame of a `sample_every_ms` cell (highlight detection).
    pub const TIMELINE: u8 = 1;
    /// One of the frames spread over the segment (MMBee).
    pub const SEGMENT: u8 = 2;
}

/// One sampled frame, ready for the image encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledFrame {
    /// Event time (ms since epoch).
    pub time_ms: i64,
    /// Why it was kept ([`purpose`] bits).
    pub purposes: u8,
    /// Normalised pixels: 3 x height x width in the configured layout.
    pub tensor: Vec<f32>,
}

/// What one payload decoded to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedVideo {
    /// The sampled frames in event-time order.
    pub frames: Vec<SampledFrame>,
    /// Frames decoded in all.
    pub decoded: usize,
    /// Source picture size of the last frame.
    pub source_size: (u32, u32),
    /// Codec name.
    pub codec: String,
    /// The audio track, when asked for and present.
    pub audio: Option<DecodedAudio>,
}

/// Where a room's timeline sampling stands, carried from one payload to the
/// next so that the rate holds across segment boundaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    /// The last cell (event time / `sample_every_ms`) a frame was kept for.
    pub last_cell: Option<i64>,
}

/// One video payload to decode.
pub struct VideoInput<'a> {
    /// Its container.
    pub format: VideoFormat,
    /// The bytes.
    pub payload: &'a [u8],
    /// The room's init segment (fragmented MP4 only).
    pub init: Option<&'a [u8]>,
    /// Event time of the first frame (ms).
    pub start_time_ms: i64,
    /// Declared duration (ms; 0 for a single picture).
    pub duration_ms: u32,
}

/// Decodes one payload, sampling frames as configured. `timeline` is the
/// room's sampling state (updated); `audio` decodes the payload's audio
/// track too.
pub fn decode_video(
    input: &VideoInput<'_>,
    cfg: &VideoConfig,
    timeline: &mut Timeline,
    audio: Option<&AudioConfig>,
) -> Result<DecodedVideo, MediaError> {
    if input.payload.is_empty() {
        return Err(MediaError::Empty);
    }
    if input.duration_ms > cfg.max_segment_ms {
        return Err(MediaError::TooLarge(format!(
            "a {} ms segment (at most {} ms)",
            input.duration_ms, cfg.max_segment_ms
        )));
    }
    let (container, bytes) = match input.format {
        VideoFormat::MpegTs => {
            if !input.payload.len().is_multiple_of(188) {
                return Err(MediaError::Truncated(format!(
                    "{} bytes is not a whole number of 188-byte TS packets",
                    input.payload.len()
                )));
            }
            (Container::MpegTs, input.payload.to_vec())
        }
        VideoFormat::Fmp4Segment => {
            let init = input.init.ok_or(MediaError::MissingInit)?;
            let mut b = Vec::with_capacity(init.len() + input.payload.len());
            b.extend_from_slice(init);
            b.extend_from_slice(input.payload);
            (Container::Mp4, b)
        }
        VideoFormat::Jpeg => (Container::Jpeg, input.payload.to_vec()),
        VideoFormat::Fmp4Init => {
            return Err(MediaError::Unsupported(
                "an init segment holds no frames".into(),
            ))
        }
        VideoFormat::Unspecified => {
            return Err(MediaError::Unsupported("video format unspecified".into()))
        }
    };
    let deadline = Deadline::after(Duration::from_millis(cfg.max_decode_ms));
    let mut demux = Demuxer::open(bytes, container, deadline)?;
    let (index, time_base, codec_name, mut decoder) = {
        let stream = demux
            .input()
            .streams()
            .best(media::Type::Video)
            .ok_or_else(|| MediaError::Corrupt("no video stream".into()))?;
        let params = stream.parameters();
        let ctx = codec::context::Context::from_parameters(params)
            .map_err(|e| MediaError::Library(format!("video codec context: {e}")))?;
        let codec_name = ctx.id().name().to_string();
        let decoder = ctx
            .decoder()
            .video()
            .map_err(|e| MediaError::Unsupported(format!("video codec {codec_name}: {e}")))?;
        (stream.index(), stream.time_base(), codec_name, decoder)
    };
    let mut track = match audio {
        Some(a) => AudioTrack::open(&demux, a)?,
        None => None,
    };
    let mut sampler = Sampler::new(cfg, input, *timeline);
    let mut packet = Packet::empty();
    let mut bad = 0usize;
    while demux.next(&mut packet)? {
        if packet.stream() == index {
            if decoder.send_packet(&packet).is_err() {
                bad += 1;
            }
            sampler.drain(&mut decoder, time_base, deadline)?;
        } else if let Some(t) = track.as_mut() {
            t.feed(&packet)?;
        }
    }
    let _ = decoder.send_eof();
    sampler.drain(&mut decoder, time_base, deadline)?;
    if sampler.decoded == 0 {
        return Err(MediaError::Corrupt(format!(
            "no frame decoded from {} packets ({} unreadable, {bad} rejected by the {codec_name} decoder)",
            demux.packets, demux.bad_packets
        )));
    }
    if bad * 10 > sampler.decoded + bad {
        return Err(MediaError::Corrupt(format!(
            "{bad} of {} video packets rejected by the {codec_name} decoder",
            sampler.decoded + bad
        )));
    }
    // A payload cut at a packet boundary demuxes cleanly: its frames then
    // cover only part of the declared duration.
    let covered = sampler.last_t - input.start_time_ms + sampler.frame_step_ms;
    let declared = i64::from(input.duration_ms);
    if declared >= 200 && covered * 10 < declared * 7 {
        return Err(MediaError::Truncated(format!(
            "frames cover {covered} ms of the declared {declared} ms"
        )));
    }
    let audio = match track {
        Some(t) => Some(t.finish()?),
        None => None,
    };
    let sampled = sampler.finish()?;
    *timeline = sampled.timeline;
    Ok(DecodedVideo {
        frames: sampled.frames,
        decoded: sampled.decoded,
        source_size: sampled.source_size,
        codec: codec_name,
        audio,
    })
}

/// What the sampler kept.
struct Sampled {
    frames: Vec<SampledFrame>,
    decoded: usize,
    source_size: (u32, u32),
    timeline: Timeline,
}

/// Picks and converts frames as they come out of the decoder.
struct Sampler<'c> {
    cfg: &'c VideoConfig,
    start_ms: i64,
    /// Event times the segment frames are taken at.
    segment_at: Vec<i64>,
    next_segment: usize,
    timeline: Timeline,
    first_ts: Option<i64>,
    last_t: i64,
    frame_step_ms: i64,
    decoded: usize,
    kept: Vec<SampledFrame>,
    /// The last decoded frame and its time, in case the segment ends before
    /// every segment instant is reached.
    last: Option<(frame::Video, i64, bool)>,
    scaler: Option<(scaling::Context, (Pixel, u32, u32))>,
    source_size: (u32, u32),
}

impl<'c> Sampler<'c> {
    fn new(cfg: &'c VideoConfig, input: &VideoInput<'_>, timeline: Timeline) -> Self {
        let n = cfg.frames_per_segment;
        let d = i64::from(input.duration_ms);
        let segment_at = (0..n as i64)
            .map(|i| input.start_time_ms + d * (2 * i + 1) / (2 * n as i64))
            .collect();
        Sampler {
            cfg,
            start_ms: input.start_time_ms,
            segment_at,
            next_segment: 0,
            timeline,
            first_ts: None,
            last_t: input.start_time_ms,
            frame_step_ms: 0,
            decoded: 0,
            kept: Vec::new(),
            last: None,
            scaler: None,
            source_size: (0, 0),
        }
    }

    fn drain(
        &mut self,
        decoder: &mut codec::decoder::Video,
        time_base: Rational,
        deadline: Deadline,
    ) -> Result<(), MediaError> {
        loop {
            let mut f = frame::Video::empty();
            if decoder.receive_frame(&mut f).is_err() {
                return Ok(());
            }
            deadline.check()?;
            self.decoded += 1;
            if self.decoded > self.cfg.max_frames_per_payload {
                return Err(MediaError::TooLarge(format!(
                    "{} frames",
                    self.cfg.max_frames_per_payload
                )));
            }
            let t = self.time_of(&f, time_base);
            self.take(f, t)?;
        }
    }

    /// Event time of a decoded frame: the segment's start plus the frame's
    /// timestamp relative to the first one.
    fn time_of(&mut self, f: &frame::Video, tb: Rational) -> i64 {
        let ts = f.timestamp().or(f.pts());
        let t = match (ts, tb.denominator()) {
            (Some(ts), den) if den != 0 && tb.numerator() > 0 => {
                let first = *self.first_ts.get_or_insert(ts);
                let rel = i128::from(ts.saturating_sub(first)) * i128::from(tb.numerator()) * 1000
                    / i128::from(den);
                self.start_ms
                    .saturating_add(rel.clamp(0, i128::from(i64::MAX / 4)) as i64)
            }
            // No timestamp: one frame step after the previous frame.
            _ if self.decoded > 1 => self.last_t + self.frame_step_ms,
            _ => self.start_ms,
        };
        if self.decoded > 1 && t > self.last_t {
            self.frame_step_ms = t - self.last_t;
        }
        self.last_t = t;
        t
    }

    fn take(&mut self, f: frame::Video, t: i64) -> Result<(), MediaError> {
        let mut purposes = 0;
        if self.cfg.sample_every_ms > 0 {
            let cell = t.div_euclid(self.cfg.sample_every_ms);
            if self.timeline.last_cell.is_none_or(|c| cell > c) {
                self.timeline.last_cell = Some(cell);
                purposes |= purpose::TIMELINE;
            }
        }
        let mut segment = false;
        while self.next_segment < self.segment_at.len() && t >= self.segment_at[self.next_segment] {
            self.next_segment += 1;
            segment = true;
        }
        if segment {
            purposes |= purpose::SEGMENT;
        }
        if purposes != 0 {
            let tensor = self.convert(&f)?;
            self.kept.push(SampledFrame {
                time_ms: t,
                purposes,
                tensor,
            });
        }
        self.last = Some((f, t, segment));
        Ok(())
    }

    /// Segment instants the segment did not reach are served by its last
    /// frame.
    fn finish(mut self) -> Result<Sampled, MediaError> {
        if self.next_segment < self.segment_at.len() {
            if let Some((f, t, already)) = self.last.take() {
                if !already {
                    match self.kept.last_mut() {
                        Some(k) if k.time_ms == t => k.purposes |= purpose::SEGMENT,
                        _ => {
                            let tensor = self.convert(&f)?;
                            self.kept.push(SampledFrame {
                                time_ms: t,
                                purposes: purpose::SEGMENT,
                                tensor,
                            });
                        }
                    }
                }
            }
        }
        Ok(Sampled {
            frames: self.kept,
            decoded: self.decoded,
            source_size: self.source_size,
            timeline: self.timeline,
        })
    }

    /// Scales one frame to the encoder's size and normalises it. The scaler
    /// is made from the frame's real format and size (and remade when they
    /// change), never from the stream's declared ones.
    fn convert(&mut self, f: &frame::Video) -> Result<Vec<f32>, MediaError> {
        let (fmt, w, h) = (f.format(), f.width(), f.height());
        if fmt == Pixel::None || w == 0 || h == 0 {
            return Err(MediaError::Corrupt(format!(
                "decoded frame without a usable picture ({fmt:?} {w}x{h})"
            )));
        }
        if u64::from(w) * u64::from(h) > self.cfg.max_source_pixels || w > 16_384 || h > 16_384 {
            return Err(MediaError::Geometry {
                width: w,
                height: h,
                max_pixels: self.cfg.max_source_pixels,
            });
        }
        self.source_size = (w, h);
        let key = (fmt, w, h);
        if self.scaler.as_ref().is_none_or(|(_, k)| *k != key) {
            let ctx = scaling::Context::get(
                fmt,
                w,
                h,
                Pixel::RGB24,
                self.cfg.width,
                self.cfg.height,
                Flags::BILINEAR,
            )
            .map_err(|e| MediaError::Unsupported(format!("pixel format {fmt:?}: {e}")))?;
            self.scaler = Some((ctx, key));
        }
        let Some((scaler, _)) = self.scaler.as_mut() else {
            return Err(MediaError::Library("no scaler".into()));
        };
        let mut rgb = frame::Video::empty();
        scaler
            .run(f, &mut rgb)
            .map_err(|e| MediaError::Library(format!("scaling: {e}")))?;
        Ok(normalise(&rgb, self.cfg))
    }
}

/// RGB24 pixels to the configured tensor.
fn normalise(rgb: &frame::Video, cfg: &VideoConfig) -> Vec<f32> {
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    let stride = rgb.stride(0);
    let data = rgb.data(0);
    let mut out = vec![0f32; 3 * w * h];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * cfg.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| cfg.mean[c] / cfg.std[c]);
    for y in 0..h {
        let Some(row) = data.get(y * stride..y * stride + 3 * w) else {
            break;
        };
        for x in 0..w {
            for c in 0..3 {
                let v = f32::from(row[3 * x + c]) * scale[c] - shift[c];
                let at = match cfg.layout {
                    Layout::Chw => c * w * h + y * w + x,
                    Layout::Hwc => (y * w + x) * 3 + c,
                };
                out[at] = v;
            }
        }
    }
    out
}
