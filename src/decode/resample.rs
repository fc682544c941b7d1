//! Sample-rate conversion for mono audio: a windowed-sinc (Blackman) filter
//! evaluated at exact rational positions, so any rate pair converts without
//! drift and downsampling does not alias.
//!
//! Not for: channel mixing or format conversion (see `audio`).

/// Zero crossings of the sinc on each side of the centre.
const ZERO_CROSSINGS: f64 = 12.0;
/// Largest number of filter phases precomputed as a table.
const MAX_TABLE_PHASES: u64 = 4096;

/// Output length for `n` input samples converted from `from` to `to` Hz:
/// `round(n * to / from)`.
pub fn output_len(n: usize, from: u32, to: u32) -> usize {
    if from == 0 {
        return 0;
    }
    ((n as u128 * u128::from(to) + u128::from(from / 2)) / u128::from(from)) as usize
}

/// Converts `n` samples (read with `input(i)`) from `from` Hz to `to` Hz,
/// handing each output sample to `output` in order. The low-pass cut-off is
/// 92 % of the lower of the two Nyquist frequencies; samples beyond either
/// end count as silence. Equal rates copy; a zero rate gives nothing.
pub fn resample_with(
    n: usize,
    from: u32,
    to: u32,
    input: impl Fn(usize) -> f64,
    mut output: impl FnMut(f64),
) {
    if from == 0 || to == 0 || n == 0 {
        return;
    }
    if from == to {
        (0..n).for_each(|i| output(input(i)));
        return;
    }
    let out_len = output_len(n, from, to);
    // Output sample k sits at input position k * down / up.
    let g = gcd(u64::from(to), u64::from(from));
    let up = u64::from(to) / g;
    let down = u64::from(from) / g;

    // Cut-off as a fraction of the input Nyquist frequency.
    let beta = 0.92 * (f64::from(to) / f64::from(from)).min(1.0);
    let half_width = ZERO_CROSSINGS / beta;
    let reach = half_width.ceil() as usize;
    let taps = 2 * reach;

    // Weights for taps at input offsets -reach+1 ..= reach from floor(position).
    let kernel = |frac: f64, w: &mut [f64]| {
        let mut sum = 0.0;
        for (t, wt) in w.iter_mut().enumerate() {
            let x = (t as f64 - (reach as f64 - 1.0)) - frac;
            *wt = if x.abs() >= half_width {
                0.0
            } else {
                let u = std::f64::consts::PI * x / half_width;
                let window = 0.42 + 0.5 * u.cos() + 0.08 * (2.0 * u).cos();
                let s = beta * x;
                let sinc = if s == 0.0 {
                    1.0
                } else {
                    (std::f64::consts::PI * s).sin() / (std::f64::consts::PI * s)
                };
                beta * sinc * window
            };
            sum += *wt;
        }
        if sum != 0.0 {
            for wt in w.iter_mut() {
                *wt /= sum;
            }
        }
    };

    let table: Option<Vec<f64>> = (up <= MAX_TABLE_PHASES).then(|| {
        let mut table = vec![0.0; up as usize * taps];
        for (phase, w) in table.chunks_exact_mut(taps).enumerate() {
            kernel(phase as f64 / up as f64, w);
        }
        table
    });
    let mut scratch = vec![0.0; taps];

    for k in 0..out_len {
        let pos = k as u128 * u128::from(down);
        let base = (pos / u128::from(up)) as usize;
        let phase = (pos % u128::from(up)) as usize;
        let weights: &[f64] = match &table {
            Some(t) => &t[phase * taps..(phase + 1) * taps],
            None => {
                kernel(phase as f64 / up as f64, &mut scratch);
                &scratch
            }
        };
        // Tap t reads input index base + t + 1 - reach; keep those inside 0..n.
        let first_tap = (reach - 1).saturating_sub(base);
        let end_tap = taps.min((n + reach - 1).saturating_sub(base));
        let mut acc = 0.0;
        for (t, w) in weights.iter().enumerate().take(end_tap).skip(first_tap) {
            acc += w * input(base + t + 1 - reach);
        }
        output(acc);
    }
}

/// Converts mono f32 samples from `from` Hz to `to` Hz.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Vec<f32> {
    let mut out = Vec::with_capacity(output_len(samples.len(), from, to));
    resample_with(
        samples.len(),
        from,
        to,
        |i| f64::from(samples[i]),
        |v| out.push(v as f32),
    );
    out
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, rate: u32, secs: f64) -> Vec<f32> {
        (0..(f64::from(rate) * secs) as usize)
            .map(|i| {
                (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin() as f32 * 0.5
            })
            .collect()
    }

    /// Frequency by counting upward zero crossings.
    fn frequency(s: &[f32], rate: u32) -> f64 {
        let ups = s.windows(2).filter(|w| w[0] <= 0.0 && w[1] > 0.0).count();
        ups as f64 * f64::from(rate) / s.len() as f64
    }

    #[test]
    fn keeps_frequency_and_length() {
        for from in [8_000, 22_050, 44_100, 48_000] {
            let out = resample(&tone(440.0, from, 1.0), from, 16_000);
            assert_eq!(out.len(), 16_000, "from {from}");
            let f = frequency(&out[100..15_900], 16_000);
            assert!((f - 440.0).abs() < 3.0, "from {from}: {f} Hz");
        }
    }

    #[test]
    fn removes_what_the_new_rate_cannot_hold() {
        // 11 kHz is above 16 kHz's Nyquist: it must not alias into the output.
        let out = resample(&tone(11_000.0, 48_000, 0.5), 48_000, 16_000);
        let rms = (out[200..7_800]
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            / 7_600.0)
            .sqrt();
        assert!(rms < 0.01, "aliased energy {rms}");
    }

    #[test]
    fn edge_cases() {
        assert_eq!(resample(&[0.1, 0.2], 16_000, 16_000), vec![0.1, 0.2]);
        assert!(resample(&[0.1], 0, 16_000).is_empty());
        assert!(resample(&[], 48_000, 16_000).is_empty());
        assert_eq!(output_len(3, 48_000, 16_000), 1);
    }
}
