//! End to end through the broker: the simulator's rooms speak (espeak-ng
//! English and Mandarin mixed into their noisy audio, with video alongside);
//! the engine decodes the audio, finds speech with silero VAD, transcribes
//! it with Whisper base and writes `transcripts`. Checked against what the
//! simulator says it spoke (its ground truth's utterances): every
//! utterance heard, at the right event times, English detected as English,
//! and the English words mostly right (the word error rate is printed).
//!
//! Needs the models from `scripts/models` and a broker (`scripts/test`
//! starts one).

mod common;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::time::{Duration, Instant};

use common::{read_until, Proc, Topics};
use onair::schema::{RoomFeatures, Transcript};
use onair::simulator::truth::{GroundTruth, UtteranceTruth};
use prost::Message;

/// Word error rate of `hyp` against `reference` (lower-cased words, no punctuation).
fn wer(reference: &str, hyp: &str) -> (usize, usize) {
    let words = |s: &str| -> Vec<String> {
        s.to_lowercase()
            .split(|c: char| c.is_whitespace())
            .map(|w| {
                w.chars()
                    .filter(|c| c.is_alphanumeric() || *c == '\'')
                    .collect::<String>()
            })
            .filter(|w| !w.is_empty())
            .collect()
    };
    let (r, h) = (words(reference), words(hyp));
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let mut cur = vec![i; h.len() + 1];
        for j in 1..=h.len() {
            let sub = prev[j - 1] + usize::from(r[i - 1] != h[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        prev = cur;
    }
    (prev[h.len()], r.len())
}

fn overlap(a: (i64, i64), b: (i64, i64)) -> i64 {
    (a.1.min(b.1) - a.0.max(b.0)).max(0)
}

#[test]
fn rooms_speech_is_transcribed_at_the_right_event_times() {
    let dir = common::scratch("speech");
    let topics = Topics {
        prefix: common::unique("speech"),
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let pipeline = common::pipeline(
        &dir,
        &topics,
        &format!(
            r#"
[operators.speech]
enabled = true
whisper_model = "{root}/models/whisper/ggml-base.bin"
vad_model = "{root}/models/silero/silero_vad.onnx"
# Every window transcribed (the budget's skipping has its own unit test):
# the queue may hold them all.
max_concurrent = 1
max_queued = 1000
# The features operator reads the speech operator's notes: voice activity
# per tick (speech ratio) and the transcripts (embedded).
[operators.features]
enabled = true
image_model = "{root}/models/image"
text_model = "{root}/models/text"
reload_interval_ms = 0
"#
        ),
    );
    common::create_topics(&pipeline);
    let truth_path = dir.join("truth.jsonl");
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let start = onair::simulator::default_start_ms().to_string();
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "2",
            "--duration",
            "30s",
            "--speed",
            "2",
            "--seed",
            "11",
            "--fps",
            "2",
            "--start-ms",
            &start,
            "--truth",
            truth_path.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        sim.wait(Duration::from_secs(180)).success(),
        "{}",
        sim.log_tail()
    );
    let truth = GroundTruth::read_jsonl(BufReader::new(
        std::fs::File::open(&truth_path).expect("truth"),
    ))
    .expect("truth parses");
    let utterances: Vec<UtteranceTruth> = truth.utterances();
    assert!(
        utterances.len() >= 6,
        "the simulated rooms spoke: {utterances:?}"
    );

    // Wait until the engine has judged all the audio (the rooms' last
    // speech closes when their audio stops) and every window is back.
    let until = Instant::now() + Duration::from_secs(300);
    let mut last = (f64::NAN, Instant::now());
    let metrics = loop {
        // A loaded machine may keep the endpoint from answering in time.
        let Some(text) = engine.scrape() else {
            assert!(Instant::now() < until, "/metrics never answered");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let m = |name: &str, labels: &[(&str, &str)]| common::metric(&text, name, labels);
        let done = m("onair_asr_windows_total", &[]).unwrap_or(0.0);
        let pending = m("onair_asr_windows_pending", &[]).unwrap_or(0.0);
        if done != last.0 {
            last = (done, Instant::now());
        }
        // Stable for a while after the simulator ended: the idle timeout has
        // advanced event time past the rooms' end, closing their last speech.
        if done > 0.0 && pending == 0.0 && last.1.elapsed() > Duration::from_secs(8) {
            break text;
        }
        assert!(
            Instant::now() < until,
            "transcription did not finish: {done} windows done, {pending} pending\n{}",
            engine.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let recs = read_until(&topics.name("transcripts"), Duration::from_secs(30), |_| {
        false
    });
    let feature_recs = read_until(
        &topics.name("room-features"),
        Duration::from_secs(20),
        |_| false,
    );
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit {status}\n{}",
        engine.log_tail()
    );
    let m = |name: &str, labels: &[(&str, &str)]| common::metric(&metrics, name, labels);
    let ok = m("onair_asr_windows_total", &[("result", "ok")]).unwrap_or(0.0);
    let skipped = m("onair_asr_windows_total", &[("result", "skipped")]).unwrap_or(0.0);
    let voiced = m("onair_vad_audio_milliseconds_total", &[("voiced", "true")]).unwrap_or(0.0);
    let unvoiced = m("onair_vad_audio_milliseconds_total", &[("voiced", "false")]).unwrap_or(0.0);
    let rtf_sum = m("onair_asr_real_time_factor_sum", &[]).unwrap_or(0.0);
    let rtf_count = m("onair_asr_real_time_factor_count", &[]).unwrap_or(0.0);

    let mut transcripts: Vec<Transcript> = recs
        .iter()
        .map(|r| Transcript::decode(&r.payload[..]).expect("transcript decodes"))
        .collect();
    transcripts.sort_by(|a, b| (&a.room_id, a.start_time_ms).cmp(&(&b.room_id, b.start_time_ms)));
    for r in &recs {
        assert!(
            r.headers.contains_key("onair-id"),
            "transcripts carry their id header"
        );
    }
    println!(
        "{} utterances spoken, {} voiced windows transcribed ({skipped} skipped), {} transcript segments; VAD speech ratio {:.2}; mean ASR real-time factor {:.2}",
        utterances.len(),
        ok,
        transcripts.len(),
        voiced / (voiced + unvoiced).max(1.0),
        rtf_sum / rtf_count.max(1.0)
    );
    assert_eq!(skipped, 0.0, "nothing skipped with a queue this deep");

    // Every transcript is inside the room's speech: its window overlaps an
    // utterance of the same room (a rare one on loud noise is tolerated).
    let mut stray = Vec::new();
    for t in &transcripts {
        assert!(t.start_time_ms <= t.end_time_ms, "{t:?}");
        assert!(
            t.window_start_ms <= t.start_time_ms && t.end_time_ms <= t.window_end_ms,
            "segment inside its window: {t:?}"
        );
        let hit = utterances.iter().any(|u| {
            u.room_id == t.room_id
                && overlap((u.start_ms, u.end_ms), (t.window_start_ms, t.window_end_ms)) > 0
        });
        if !hit {
            stray.push(t.clone());
        }
    }
    assert!(
        stray.len() * 10 <= transcripts.len(),
        "transcripts where nothing was said: {stray:?}"
    );

    // Every utterance that ended well inside the run was heard: transcripts
    // whose windows overlap it, starting where it started.
    let end_of_run = utterances.iter().map(|u| u.end_ms).max().unwrap_or(0);
    let mut heard = 0;
    let mut considered = 0;
    let mut start_errors = Vec::new();
    // (English utterances heard, of them detected as English; the same for Mandarin.)
    let mut en_lang = (0, 0);
    let mut zh_lang = (0, 0);
    let (mut errors, mut words) = (0, 0);
    let mut worst = Vec::new();
    for u in &utterances {
        if u.end_ms > end_of_run - 1000 {
            continue;
        }
        considered += 1;
        let mine: Vec<&Transcript> = transcripts
            .iter()
            .filter(|t| {
                t.room_id == u.room_id
                    && overlap((u.start_ms, u.end_ms), (t.window_start_ms, t.window_end_ms))
                        > (u.end_ms - u.start_ms) / 2
            })
            .collect();
        let Some(first) = mine.first() else {
            println!(
                "  not heard: {} {}..{} {:?}",
                u.room_id, u.start_ms, u.end_ms, u.text
            );
            continue;
        };
        heard += 1;
        // The window opens where the voice starts (less the 100 ms pad).
        start_errors.push((first.window_start_ms - u.start_ms).abs());
        let right = usize::from(mine.iter().all(|t| t.language == u.lang));
        let tally = if u.lang == "en" {
            &mut en_lang
        } else {
            &mut zh_lang
        };
        tally.0 += 1;
        tally.1 += right;
        let text: Vec<&str> = mine.iter().map(|t| t.text.as_str()).collect();
        let text = text.join(" ");
        if u.lang == "en" {
            let (e, n) = wer(&u.text, &text);
            errors += e;
            words += n;
            if e * 3 > n {
                worst.push((u.text.clone(), text.clone()));
            }
        }
        println!(
            "  {} {:>6}..{:<6} [{}→{}] {:?} → {:?}",
            u.room_id,
            u.start_ms % 100_000,
            u.end_ms % 100_000,
            u.lang,
            first.language,
            u.text,
            text
        );
    }
    start_errors.sort_unstable();
    let median_start = start_errors
        .get(start_errors.len() / 2)
        .copied()
        .unwrap_or(0);
    let english_wer = errors as f64 / words.max(1) as f64;
    println!(
        "heard {heard}/{considered}; window start vs utterance start: median {median_start} ms, max {} ms; language detected right: English {}/{}, Mandarin {}/{}; English WER {english_wer:.3} over {words} words",
        start_errors.last().copied().unwrap_or(0),
        en_lang.1,
        en_lang.0,
        zh_lang.1,
        zh_lang.0
    );
    assert!(
        heard * 10 >= considered * 9,
        "only {heard} of {considered} utterances heard"
    );
    assert!(
        median_start <= 200,
        "windows start {median_start} ms (median) from the utterances"
    );
    // English must be recognised as English. espeak-ng's Mandarin is heavily
    // accented, and Whisper base often takes it for English even clean (see
    // tests/speech.rs, where Mandarin is transcribed with the language given):
    // its rate is printed, not required.
    assert!(
        en_lang.1 * 10 >= en_lang.0 * 8,
        "English detected for only {} of {} English utterances",
        en_lang.1,
        en_lang.0
    );
    // Whisper base over the rooms' noise (about 10 dB below the voice, which
    // each room's voice rate also shifts in pitch) gets about half the words
    // (seen: 0.59; the same sentences clean: below 0.1, tests/speech.rs). A
    // window misplaced in time gets next to none right (WER near 1).
    assert!(
        english_wer <= 0.75,
        "English WER {english_wer:.3} over noisy room audio: {worst:?}"
    );
    let per_room: BTreeMap<&str, usize> = transcripts.iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.room_id.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per_room.len(), 2, "both rooms transcribed: {per_room:?}");

    // The features records carry the VAD's speech ratio per tick, higher in
    // ticks the simulator spoke in, and the transcripts' embeddings.
    let feats: Vec<RoomFeatures> = feature_recs
        .iter()
        .map(|r| RoomFeatures::decode(&r.payload[..]).expect("features decode"))
        .collect();
    let (mut spoken, mut silent) = (Vec::new(), Vec::new());
    for f in &feats {
        let Some(ratio) = f.audio.as_ref().and_then(|a| a.speech_ratio) else {
            continue;
        };
        let tick = (f.tick_start_ms, f.tick_start_ms + f.tick_ms);
        let said: i64 = utterances
            .iter()
            .filter(|u| u.room_id == f.room_id)
            .map(|u| overlap((u.start_ms, u.end_ms), tick))
            .sum();
        if said * 2 >= f.tick_ms {
            spoken.push(ratio);
        } else if said == 0 {
            silent.push(ratio);
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let with_speech: Vec<&RoomFeatures> = feats.iter().filter(|f| f.transcripts > 0).collect();
    println!(
        "features: {} records; speech ratio {:.2} in {} ticks mostly spoken, {:.2} in {} silent ones; {} records carry {} transcripts",
        feats.len(),
        mean(&spoken),
        spoken.len(),
        mean(&silent),
        silent.len(),
        with_speech.len(),
        with_speech.iter().map(|f| f.transcripts).sum::<u32>()
    );
    assert!(
        spoken.len() >= 5 && silent.len() >= 5,
        "both kinds of ticks"
    );
    assert!(
        mean(&spoken) > mean(&silent) + 0.3,
        "speech ratio follows the speech"
    );
    assert!(!with_speech.is_empty(), "transcripts reach the features");
    for f in with_speech {
        assert_eq!(f.transcript_embedding.len(), 384);
        assert!(f.transcripts_start_ms <= f.transcripts_end_ms);
        assert_eq!(f.text_model, "text@1");
    }
}
