//! Benchmark: speech recognition's real-time factor (processing time over
//! audio duration; below 1 is faster than real time) for Whisper base per
//! thread count, and the voice-activity detector's, on espeak-ng speech made
//! at run time. The reference is the audio's own duration, so the figures
//! are ratios already; the same run measures every thread count.
//!
//! What it does: synthesises English and Mandarin clips of about 3, 8 and 15
//! seconds (espeak-ng sentences joined by 300 ms pauses), then, for 1 and 2
//! threads per transcription, transcribes each clip `ONAIR_BENCH_RUNS` times
//! (default 2) and prints the median real-time factor per clip and overall
//! (total processing time over total audio). Whisper's encoder reads a 30 s
//! window whatever the clip's length, so short clips cost nearly as much as
//! long ones: their factor is the worst case the ASR budget must absorb.
//!
//! Run: `cargo bench --bench asr` (after `scripts/models`).
//! Not for: accuracy (tests/speech.rs measures word and character error rates).

use std::path::Path;
use std::time::Instant;

use onair::models::vad::{SileroVad, VadStream};
use onair::models::whisper::{AsrOptions, Whisper, SAMPLE_RATE};
use onair::simulator::media::{synthesize_speech, Lang};

const EN: [&str; 6] = [
    "Welcome back to the stream everyone.",
    "Today we are going to try the hardest level.",
    "Thank you so much for the gift.",
    "Let me know in the comments what you think.",
    "This next part is going to be really close.",
    "Remember to follow for more videos like this.",
];
const ZH: [&str; 6] = [
    "huan1 ying2 hui2 dao4 zhi2 bo1 jian1",
    "jin1 tian1 wo3 men2 shi4 yi2 xia4 zui4 nan2 de5 yi4 guan1",
    "xie4 xie4 da4 jia1 de5 li3 wu4",
    "da4 jia1 jue2 de2 zen3 me5 yang4",
    "xia4 mian4 zhe4 yi2 duan4 hui4 fei1 chang2 jin3 zhang1",
    "ji4 de2 dian3 zan4 he2 guan1 zhu4",
];

fn clip(sentences: &[&str], lang: Lang, secs: f64) -> Vec<f32> {
    let pause = vec![0f32; SAMPLE_RATE as usize * 3 / 10];
    let mut out = Vec::new();
    for s in sentences.iter().cycle() {
        if out.len() as f64 >= secs * f64::from(SAMPLE_RATE) {
            break;
        }
        let pcm = synthesize_speech(s, lang).expect("espeak-ng on PATH");
        out.extend(pcm.iter().map(|&v| f32::from(v) / 32768.0));
        out.extend_from_slice(&pause);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("asr: skipped (run it with `cargo bench --bench asr`)");
        return;
    }
    let runs = std::env::var("ONAIR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let whisper = Whisper::load(&root.join("models/whisper/ggml-base.bin"))
        .expect("Whisper base (run scripts/models)");
    let mut vad = SileroVad::load(&root.join("models/silero/silero_vad.onnx"))
        .expect("silero VAD (run scripts/models)");
    let mut clips = Vec::new();
    for (name, sentences, lang) in [("en", &EN, Lang::En), ("zh", &ZH, Lang::Zh)] {
        for secs in [3.0, 8.0, 15.0] {
            clips.push((format!("{name} {secs:.0}s"), clip(sentences, lang, secs)));
        }
    }
    // Warm-up: the first call pays for allocations and page faults.
    let _ = whisper.transcribe(&clips[0].1, &AsrOptions::default());
    println!("asr: Whisper base, greedy, full 30 s window, language detected among en/zh; real-time factor = processing / audio");
    for threads in [1usize, 2] {
        // As the engine runs by default: the language detected among
        // English and Mandarin (the detection is a second encoder pass).
        let opts = AsrOptions {
            threads,
            candidates: vec!["en".into(), "zh".into()],
            ..AsrOptions::default()
        };
        let (mut total_proc, mut total_audio) = (0.0, 0.0);
        for (name, samples) in &clips {
            let audio = samples.len() as f64 / f64::from(SAMPLE_RATE);
            let mut rtfs = Vec::new();
            let mut text = String::new();
            for _ in 0..runs {
                let t = Instant::now();
                let tr = whisper.transcribe(samples, &opts).expect("transcribe");
                let secs = t.elapsed().as_secs_f64();
                total_proc += secs;
                total_audio += audio;
                rtfs.push(secs / audio);
                text = tr.text();
            }
            let shown: String = text.chars().take(50).collect();
            println!(
                "  threads {threads} {name:<7} audio {audio:>5.1} s  RTF {:.3}  ({shown}...)",
                median(rtfs)
            );
        }
        println!(
            "threads {threads}: overall RTF {:.3} ({:.1} s of audio in {:.1} s)",
            total_proc / total_audio,
            total_audio,
            total_proc
        );
    }
    // The VAD over all clips, one stream, 512-sample chunks.
    let mut chunks = 0usize;
    let mut audio = 0.0;
    let t = Instant::now();
    for _ in 0..runs {
        for (_, samples) in &clips {
            let mut stream = VadStream::default();
            for c in samples.chunks_exact(SileroVad::CHUNK) {
                vad.chunk_in(&mut stream, c).expect("vad");
                chunks += 1;
            }
            audio += samples.len() as f64 / f64::from(SAMPLE_RATE);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "silero VAD: {chunks} chunks ({audio:.1} s of audio) in {secs:.3} s: RTF {:.4}",
        secs / audio
    );
}
