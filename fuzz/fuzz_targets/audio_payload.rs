//! Audio decode (AAC in ADTS, PCM s16le) on arbitrary bytes: a result or a
//! `MediaError`, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair::decode::audio::{decode_aac_adts, decode_pcm_s16le, AudioConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let cfg = AudioConfig {
        max_decode_ms: 1000,
        ..AudioConfig::default()
    };
    if selector & 1 == 0 {
        let _ = decode_aac_adts(rest.to_vec(), &cfg);
    } else {
        let rate = [8_000, 16_000, 22_050, 44_100, 48_000, 0, 7][usize::from(selector >> 1) % 7];
        let channels = u32::from(selector >> 5);
        let _ = decode_pcm_s16le(rest, rate, channels, &cfg);
    }
});
