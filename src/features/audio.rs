//! Per-tick features of a room's audio: log-mel statistics (32 bands, 25 ms
//! Hann frames every 10 ms at 16 kHz) and loudness (RMS and peak in dBFS).
//! Samples are added as they arrive; a tick's summary is read when it closes.
//!
//! Not for: speech (the speech operator finds and transcribes it; its voice
//! activity reaches the features as a note) or resampling (16 kHz in).

/// Mel bands.
pub const MEL_BANDS: usize = 32;
/// Sample rate the analyser expects.
pub const RATE: usize = 16_000;
/// Frame length: 25 ms.
const FRAME: usize = 400;
/// Hop: 10 ms.
const HOP: usize = 160;
/// FFT size (the frame zero-padded).
const FFT: usize = 512;
/// Spectrum bins.
const BINS: usize = FFT / 2 + 1;
/// Power floor before the log.
const FLOOR: f64 = 1e-10;

/// Frames, mel filters and FFT tables, shared by every room of a partition.
#[derive(Debug)]
pub struct AudioAnalyzer {
    window: Vec<f32>,
    /// Per band: (first bin, weights).
    filters: Vec<(usize, Vec<f32>)>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// What one tick's audio added up to so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AudioAcc {
    samples: u64,
    sum_sq: f64,
    peak: f32,
    frames: u32,
    mel_sum: Vec<f64>,
    mel_sq: Vec<f64>,
    /// Samples after the last whole frame, carried to the next call.
    tail: Vec<f32>,
}

/// A closed tick's audio summary.
#[derive(Clone, Debug, PartialEq)]
pub struct AudioSummary {
    /// Milliseconds of audio.
    pub audio_ms: i64,
    /// Mean log10 power per mel band over the frames.
    pub log_mel_mean: Vec<f32>,
    /// Standard deviation of the same.
    pub log_mel_std: Vec<f32>,
    /// RMS level, dB relative to full scale (-120 for silence).
    pub rms_dbfs: f32,
    /// Peak level, dBFS.
    pub peak_dbfs: f32,
}

fn hz_to_mel(hz: f64) -> f64 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

fn mel_to_hz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

fn dbfs(v: f64) -> f32 {
    (20.0 * v.max(1e-6).log10()) as f32
}

impl Default for AudioAnalyzer {
    fn default() -> Self {
        Self::new()
    }
}

impl AudioAnalyzer {
    /// Builds the tables (HTK mel scale, 0 to 8 kHz, triangular filters).
    pub fn new() -> Self {
        let window = (0..FRAME)
            .map(|i| {
                let x = std::f64::consts::TAU * i as f64 / FRAME as f64;
                (0.5 - 0.5 * x.cos()) as f32
            })
            .collect();
        let top = hz_to_mel(RATE as f64 / 2.0);
        let edges: Vec<f64> = (0..MEL_BANDS + 2)
            .map(|i| mel_to_hz(top * i as f64 / (MEL_BANDS + 1) as f64))
            .collect();
        let bin_hz = RATE as f64 / FFT as f64;
        let filters = (0..MEL_BANDS)
            .map(|b| {
                let (lo, mid, hi) = (edges[b], edges[b + 1], edges[b + 2]);
                let first = (lo / bin_hz).floor() as usize;
                let last = ((hi / bin_hz).ceil() as usize).min(BINS - 1);
                let weights = (first..=last)
                    .map(|k| {
                        let f = k as f64 * bin_hz;
                        let w = if f <= mid {
                            (f - lo) / (mid - lo)
                        } else {
                            (hi - f) / (hi - mid)
                        };
                        w.max(0.0) as f32
                    })
                    .collect();
                (first, weights)
            })
            .collect();
        let cos = (0..FFT / 2)
            .map(|k| (std::f64::consts::TAU * k as f64 / FFT as f64).cos() as f32)
            .collect();
        let sin = (0..FFT / 2)
            .map(|k| -(std::f64::consts::TAU * k as f64 / FFT as f64).sin() as f32)
            .collect();
        AudioAnalyzer {
            window,
            filters,
            cos,
            sin,
        }
    }

    /// Adds 16 kHz samples that follow the ones added before to `acc`.
    pub fn add(&self, acc: &mut AudioAcc, samples: &[f32]) {
        if acc.mel_sum.is_empty() {
            acc.mel_sum = vec![0.0; MEL_BANDS];
            acc.mel_sq = vec![0.0; MEL_BANDS];
        }
        for &s in samples {
            let s = if s.is_finite() { s } else { 0.0 };
            acc.sum_sq += f64::from(s) * f64::from(s);
            acc.peak = acc.peak.max(s.abs());
        }
        acc.samples += samples.len() as u64;
        acc.tail
            .extend(samples.iter().map(|s| if s.is_finite() { *s } else { 0.0 }));
        let mut re = vec![0f32; FFT];
        let mut im = vec![0f32; FFT];
        let mut start = 0;
        while start + FRAME <= acc.tail.len() {
            re.iter_mut().for_each(|v| *v = 0.0);
            im.iter_mut().for_each(|v| *v = 0.0);
            for (i, (r, w)) in re.iter_mut().zip(&self.window).enumerate() {
                *r = acc.tail[start + i] * w;
            }
            self.fft(&mut re, &mut im);
            for (b, (first, weights)) in self.filters.iter().enumerate() {
                let e: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(j, w)| {
                        let k = first + j;
                        f64::from(*w) * f64::from(re[k] * re[k] + im[k] * im[k])
                    })
                    .sum();
                let l = e.max(FLOOR).log10();
                acc.mel_sum[b] += l;
                acc.mel_sq[b] += l * l;
            }
            acc.frames += 1;
            start += HOP;
        }
        acc.tail.drain(..start.min(acc.tail.len()));
    }

    /// In-place radix-2 FFT of size [`FFT`].
    fn fft(&self, re: &mut [f32], im: &mut [f32]) {
        let n = FFT;
        let mut j = 0;
        for i in 1..n {
            let mut bit = n >> 1;
            while j & bit != 0 {
                j ^= bit;
                bit >>= 1;
            }
            j |= bit;
            if i < j {
                re.swap(i, j);
                im.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= n {
            let step = n / len;
            for start in (0..n).step_by(len) {
                for k in 0..len / 2 {
                    let (c, s) = (self.cos[k * step], self.sin[k * step]);
                    let (a, b) = (start + k, start + k + len / 2);
                    let tr = re[b] * c - im[b] * s;
                    let ti = re[b] * s + im[b] * c;
                    re[b] = re[a] - tr;
                    im[b] = im[a] - ti;
                    re[a] += tr;
                    im[a] += ti;
                }
            }
            len <<= 1;
        }
    }
}

impl AudioAcc {
    /// Whether any audio was added.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// The summary of what was added (None without audio).
    pub fn summary(&self) -> Option<AudioSummary> {
        if self.samples == 0 {
            return None;
        }
        let n = f64::from(self.frames.max(1));
        let (mean, std) = if self.frames == 0 {
            let floor = FLOOR.log10() as f32;
            (vec![floor; MEL_BANDS], vec![0.0; MEL_BANDS])
        } else {
            self.mel_sum
                .iter()
                .zip(&self.mel_sq)
                .map(|(s, q)| {
                    let m = s / n;
                    (m as f32, (q / n - m * m).max(0.0).sqrt() as f32)
                })
                .unzip()
        };
        Some(AudioSummary {
            audio_ms: (self.samples * 1000 / RATE as u64) as i64,
            log_mel_mean: mean,
            log_mel_std: std,
            rms_dbfs: dbfs((self.sum_sq / self.samples as f64).sqrt()),
            peak_dbfs: dbfs(f64::from(self.peak)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f64, amp: f32, secs: f64) -> Vec<f32> {
        (0..(secs * RATE as f64) as usize)
            .map(|i| amp * (std::f64::consts::TAU * hz * i as f64 / RATE as f64).sin() as f32)
            .collect()
    }

    fn band_of(hz: f64) -> usize {
        let top = hz_to_mel(RATE as f64 / 2.0);
        let m = hz_to_mel(hz) / top * (MEL_BANDS + 1) as f64;
        (m.round() as usize).saturating_sub(1)
    }

    #[test]
    fn a_tone_lights_its_band_and_has_the_right_level() {
        let a = AudioAnalyzer::new();
        for hz in [300.0, 1000.0, 4000.0] {
            let mut acc = AudioAcc::default();
            a.add(&mut acc, &tone(hz, 0.5, 1.0));
            let s = acc.summary().unwrap();
            let loudest = s
                .log_mel_mean
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0;
            assert!(
                loudest.abs_diff(band_of(hz)) <= 1,
                "{hz} Hz: loudest band {loudest}, expected about {}",
                band_of(hz)
            );
            // A sine of amplitude 0.5: RMS 0.354 = -9.03 dBFS, peak -6.02.
            assert!((s.rms_dbfs + 9.03).abs() < 0.05, "rms {}", s.rms_dbfs);
            assert!((s.peak_dbfs + 6.02).abs() < 0.05, "peak {}", s.peak_dbfs);
            assert_eq!(s.audio_ms, 1000);
            // A steady tone: little spread in its own band over time.
            assert!(s.log_mel_std[loudest] < 0.1);
        }
    }

    #[test]
    fn pieces_add_up_to_the_whole() {
        let a = AudioAnalyzer::new();
        let x: Vec<f32> = tone(440.0, 0.3, 0.7)
            .into_iter()
            .zip(tone(2500.0, 0.2, 0.7))
            .map(|(p, q)| p + q)
            .collect();
        let mut whole = AudioAcc::default();
        a.add(&mut whole, &x);
        let mut parts = AudioAcc::default();
        for c in x.chunks(333) {
            a.add(&mut parts, c);
        }
        let (w, p) = (whole.summary().unwrap(), parts.summary().unwrap());
        assert_eq!(whole.frames, parts.frames);
        for (u, v) in w.log_mel_mean.iter().zip(&p.log_mel_mean) {
            assert!((u - v).abs() < 1e-4);
        }
        assert!((w.rms_dbfs - p.rms_dbfs).abs() < 1e-4);
    }

    #[test]
    fn silence_and_garbage_do_not_break_it() {
        let a = AudioAnalyzer::new();
        let mut acc = AudioAcc::default();
        assert!(acc.summary().is_none());
        a.add(&mut acc, &[0.0; 100]);
        let s = acc.summary().unwrap();
        assert_eq!(s.rms_dbfs, -120.0);
        assert!(s.log_mel_mean.iter().all(|v| v.is_finite()));
        a.add(&mut acc, &[f32::NAN, f32::INFINITY, 0.1]);
        let s = acc.summary().unwrap();
        assert!(s.rms_dbfs.is_finite() && s.peak_dbfs.is_finite());
    }
}
