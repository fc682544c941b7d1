//! Audio decode: PCM s16le, AAC in ADTS framing, and the audio track of a
//! video segment, each turned into mono f32 at the models' rate (16 kHz),
//! with its loudness.
//!
//! Not for: voice activity or speech recognition (they read what this makes).

use ffmpeg_next::format::sample::Type as SampleLayout;
use ffmpeg_next::format::Sample;
use ffmpeg_next::{codec, frame, media, Packet};
use serde::{Deserialize, Serialize};

use super::demux::{Container, Demuxer};
use super::resample;
use super::{Deadline, MediaError};

/// Audio decode settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    /// Output sample rate (Hz), what the speech models read.
    pub sample_rate: u32,
    /// Longest audio one payload may hold (ms); longer payloads are rejected.
    pub max_payload_ms: u32,
    /// Wall-clock budget to decode one payload (ms).
    pub max_decode_ms: u64,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            sample_rate: 16_000,
            max_payload_ms: 30_000,
            max_decode_ms: 2_000,
        }
    }
}

/// Decoded audio: mono f32 at the configured rate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedAudio {
    /// Samples in [-1, 1].
    pub samples: Vec<f32>,
    /// Their rate (Hz).
    pub rate: u32,
    /// The source's rate and channel count.
    pub source_rate: u32,
    /// The source's channel count.
    pub source_channels: u16,
}

impl DecodedAudio {
    /// Duration in ms.
    pub fn duration_ms(&self) -> i64 {
        if self.rate == 0 {
            return 0;
        }
        (self.samples.len() as i64 * 1000) / i64::from(self.rate)
    }
}

/// Loudness of samples in dBFS (RMS; -120 for silence or nothing).
pub fn loudness_dbfs(samples: &[f32]) -> f64 {
    if samples.is_empty() {
        return -120.0;
    }
    let mean_sq = samples.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / samples.len() as f64;
    if mean_sq <= 0.0 {
        -120.0
    } else {
        (10.0 * mean_sq.log10()).max(-120.0)
    }
}

/// Decodes interleaved signed 16-bit little-endian PCM.
pub fn decode_pcm_s16le(
    bytes: &[u8],
    sample_rate: u32,
    channels: u32,
    cfg: &AudioConfig,
) -> Result<DecodedAudio, MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty);
    }
    if !(1..=8).contains(&channels) {
        return Err(MediaError::Unsupported(format!("{channels} PCM channels")));
    }
    if !(1_000..=384_000).contains(&sample_rate) {
        return Err(MediaError::Unsupported(format!(
            "PCM sample rate {sample_rate} Hz"
        )));
    }
    let frame_bytes = 2 * channels as usize;
    if !bytes.len().is_multiple_of(frame_bytes) {
        return Err(MediaError::Truncated(format!(
            "{} bytes is not a whole number of {channels}-channel 16-bit frames",
            bytes.len()
        )));
    }
    let frames = bytes.len() / frame_bytes;
    check_length(frames, sample_rate, cfg)?;
    let mut mono = Vec::with_capacity(frames);
    for f in bytes.chunks_exact(frame_bytes) {
        let sum: f32 = f
            .chunks_exact(2)
            .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])) / 32768.0)
            .sum();
        mono.push(sum / channels as f32);
    }
    Ok(DecodedAudio {
        samples: resample::resample(&mono, sample_rate, cfg.sample_rate),
        rate: cfg.sample_rate,
        source_rate: sample_rate,
        source_channels: channels as u16,
    })
}

/// Decodes AAC in ADTS framing.
pub fn decode_aac_adts(bytes: Vec<u8>, cfg: &AudioConfig) -> Result<DecodedAudio, MediaError> {
    let deadline = Deadline::after(std::time::Duration::from_millis(cfg.max_decode_ms));
    let mut demux = Demuxer::open(bytes, Container::Adts, deadline)?;
    let mut track = AudioTrack::open(&demux, cfg)?
        .ok_or_else(|| MediaError::Corrupt("no audio stream".into()))?;
    let mut packet = Packet::empty();
    while demux.next(&mut packet)? {
        track.feed(&packet)?;
    }
    track.finish()
}

fn check_length(frames: usize, rate: u32, cfg: &AudioConfig) -> Result<(), MediaError> {
    let max = u64::from(cfg.max_payload_ms) * u64::from(rate) / 1000;
    if frames as u64 > max {
        return Err(MediaError::TooLarge(format!(
            "{} ms of audio",
            cfg.max_payload_ms
        )));
    }
    Ok(())
}

/// One audio stream of an opened payload being decoded to mono.
pub struct AudioTrack<'c> {
    index: usize,
    decoder: codec::decoder::Audio,
    cfg: &'c AudioConfig,
    mono: Vec<f32>,
    rate: u32,
    channels: u16,
    bad: usize,
    frames: usize,
}

impl<'c> AudioTrack<'c> {
    /// The payload's best audio stream, ready to decode (None if it has none).
    pub fn open(demux: &Demuxer, cfg: &'c AudioConfig) -> Result<Option<Self>, MediaError> {
        let Some(stream) = demux.input().streams().best(media::Type::Audio) else {
            return Ok(None);
        };
        let ctx = codec::context::Context::from_parameters(stream.parameters())
            .map_err(|e| MediaError::Library(format!("audio codec context: {e}")))?;
        let decoder = ctx
            .decoder()
            .audio()
            .map_err(|e| MediaError::Unsupported(format!("audio codec: {e}")))?;
        Ok(Some(AudioTrack {
            index: stream.index(),
            decoder,
            cfg,
            mono: Vec::new(),
            rate: 0,
            channels: 0,
            bad: 0,
            frames: 0,
        }))
    }

    /// Decodes one packet if it belongs to this track.
    pub fn feed(&mut self, packet: &Packet) -> Result<(), MediaError> {
        if packet.stream() != self.index {
            return Ok(());
        }
        if self.decoder.send_packet(packet).is_err() {
            self.bad += 1;
        }
        self.drain()
    }

    fn drain(&mut self) -> Result<(), MediaError> {
        let mut f = frame::Audio::empty();
        while self.decoder.receive_frame(&mut f).is_ok() {
            self.push(&f)?;
        }
        Ok(())
    }

    fn push(&mut self, f: &frame::Audio) -> Result<(), MediaError> {
        let rate = f.rate();
        let channels = f.channels();
        let n = f.samples();
        if rate == 0 || channels == 0 || n == 0 {
            return Ok(());
        }
        if self.rate == 0 {
            self.rate = rate;
            self.channels = channels;
        } else if rate != self.rate {
            return Err(MediaError::Unsupported(format!(
                "sample rate changes within a payload ({} to {rate} Hz)",
                self.rate
            )));
        }
        self.frames += 1;
        check_length(self.mono.len() + n, rate, self.cfg)?;
        mix_to_mono(f, n, usize::from(channels), &mut self.mono)
    }

    /// Flushes the decoder and resamples.
    pub fn finish(mut self) -> Result<DecodedAudio, MediaError> {
        let _ = self.decoder.send_eof();
        self.drain()?;
        if self.mono.is_empty() {
            return Err(MediaError::Corrupt(format!(
                "no audio decoded ({} bad packets)",
                self.bad
            )));
        }
        if self.bad * 10 > self.frames.max(1) {
            return Err(MediaError::Corrupt(format!(
                "{} of {} audio packets failed to decode",
                self.bad,
                self.frames + self.bad
            )));
        }
        Ok(DecodedAudio {
            samples: resample::resample(&self.mono, self.rate, self.cfg.sample_rate),
            rate: self.cfg.sample_rate,
            source_rate: self.rate,
            source_channels: self.channels,
        })
    }
}

/// Appends the frame's samples, averaged over channels, to `out`.
fn mix_to_mono(
    f: &frame::Audio,
    n: usize,
    channels: usize,
    out: &mut Vec<f32>,
) -> Result<(), MediaError> {
    let format = f.format();
    let (size, planar) = match format {
        Sample::U8(l) => (1, l == SampleLayout::Planar),
        Sample::I16(l) => (2, l == SampleLayout::Planar),
        Sample::I32(l) | Sample::F32(l) => (4, l == SampleLayout::Planar),
        Sample::I64(l) | Sample::F64(l) => (8, l == SampleLayout::Planar),
        Sample::None => {
            return Err(MediaError::Corrupt(
                "audio frame without a sample format".into(),
            ))
        }
    };
    let value = |b: &[u8]| -> f32 {
        match format {
            Sample::U8(_) => (f32::from(b[0]) - 128.0) / 128.0,
            Sample::I16(_) => f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0,
            Sample::I32(_) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32 / 2_147_483_648.0,
            Sample::F32(_) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Sample::I64(_) => {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                    / 9.223_372e18
            }
            Sample::F64(_) => {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            Sample::None => 0.0,
        }
    };
    let planes = f.planes();
    let start = out.len();
    out.resize(start + n, 0.0);
    let dst = &mut out[start..];
    if planar {
        if planes < channels {
            return Err(MediaError::Corrupt(
                "audio frame with missing planes".into(),
            ));
        }
        for c in 0..channels {
            let data = f.data(c);
            if data.len() < n * size {
                return Err(MediaError::Corrupt("short audio plane".into()));
            }
            for (i, d) in dst.iter_mut().enumerate() {
                *d += value(&data[i * size..(i + 1) * size]);
            }
        }
    } else {
        if planes < 1 {
            return Err(MediaError::Corrupt("audio frame without data".into()));
        }
        let data = f.data(0);
        if data.len() < n * size * channels {
            return Err(MediaError::Corrupt("short audio buffer".into()));
        }
        for (i, d) in dst.iter_mut().enumerate() {
            for c in 0..channels {
                let at = (i * channels + c) * size;
                *d += value(&data[at..at + size]);
            }
        }
    }
    let scale = 1.0 / channels as f32;
    for d in dst.iter_mut() {
        *d = if d.is_finite() {
            (*d * scale).clamp(-1.0, 1.0)
        } else {
            0.0
        };
    }
    Ok(())
}
