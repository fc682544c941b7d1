//! Speech: what each room's streamer says, as timed text. Every room's
//! decoded audio (16 kHz mono, from its audio records or its MPEG-TS
//! segments' audio track) goes into the room's buffer in event time; silero
//! VAD judges each 32 ms chunk, and a stretch of voiced chunks closed by
//! enough silence (or cut at the longest window) is one voiced window. Each
//! window goes to the shared ASR pool with the room's activity (comments and
//! actions per second) as its priority; the transcribed segments come back
//! through [`Operator::poll`] and are written to `transcripts` with their
//! event-time start and end and the detected language, and kept as the
//! room's recent speech for the models.
//!
//! Until a window's transcript is written, the operator holds the input
//! position of the window's first audio record, so offsets are never
//! committed past speech that a restart would still need to transcribe.
//!
//! Not for: decoding (see `decode`), running Whisper or choosing between
//! rooms when over budget (see `models::asr`).

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc};

use foldhash::fast::RandomState;
use metrics::{counter, gauge, Counter, Gauge};
use prost::Message;
use tokio::sync::Notify;

use crate::config::SpeechConfig;
use crate::decode::DecodedMedia;
use crate::models::asr::{AsrFailure, AsrOutcome, AsrPool, AsrReply, AsrRequest};
use crate::models::vad::{SileroVad, VadStream};
use crate::models::whisper::SAMPLE_RATE;
use crate::models::ModelError;
use crate::runtime::{Context, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, Event, Transcript, SCHEMA_VERSION};

/// Samples per millisecond at 16 kHz.
const PER_MS: i64 = SAMPLE_RATE as i64 / 1000;
/// Audio that starts this much after (or before) where the room's audio
/// ended is a new stretch (or a repeat), not a continuation (ms).
const DISCONTINUITY_MS: i64 = 200;
/// A room with no audio, no open speech and no pending window for this
/// long (event time) is forgotten.
const ROOM_IDLE_MS: i64 = 60_000;
/// Transcripts kept per room as its recent speech.
const RECENT: usize = 8;
/// Activity decay per tick: a room's activity is an exponentially weighted
/// count of its comments and actions per tick (about a 10-tick memory).
const ACTIVITY_DECAY: f64 = 0.9;

/// A transcribed segment kept in the room's state.
#[derive(Clone, Debug, PartialEq)]
pub struct Said {
    /// Event time of its start.
    pub start_ms: i64,
    /// Event time of its end.
    pub end_ms: i64,
    /// Language code.
    pub language: String,
    /// The text.
    pub text: String,
}

/// An open voiced stretch.
#[derive(Clone, Copy, Debug)]
struct Open {
    /// First voiced sample.
    start: u64,
    /// First sample of the silence that may end it.
    silence_since: Option<u64>,
}

struct Room {
    streamer_id: String,
    vad: VadStream,
    /// Samples from absolute index `base`.
    audio: VecDeque<f32>,
    base: u64,
    /// Event time of absolute sample `origin_abs` (the start of the current
    /// continuous stretch).
    origin_ms: i64,
    origin_abs: u64,
    /// Next sample the VAD judges.
    judged: u64,
    open: Option<Open>,
    /// Records whose samples are in `audio`: (first sample, position).
    records: VecDeque<(u64, Position)>,
    /// Decayed count of comments and actions per tick.
    activity: f64,
    this_tick: u32,
    /// Event time of the end of the room's audio.
    audio_end_ms: i64,
    recent: VecDeque<Said>,
    /// Milliseconds voiced and judged per tick (by tick start), told to
    /// later operators when the tick closes.
    voice: std::collections::BTreeMap<i64, (i64, i64)>,
}

impl Room {
    fn new(streamer_id: &str, start_ms: i64) -> Self {
        Room {
            streamer_id: streamer_id.to_string(),
            vad: VadStream::default(),
            audio: VecDeque::new(),
            base: 0,
            origin_ms: start_ms,
            origin_abs: 0,
            judged: 0,
            open: None,
            records: VecDeque::new(),
            activity: 0.0,
            this_tick: 0,
            audio_end_ms: start_ms,
            recent: VecDeque::new(),
            voice: std::collections::BTreeMap::new(),
        }
    }

    fn end(&self) -> u64 {
        self.base + self.audio.len() as u64
    }

    fn time_of(&self, abs: u64) -> i64 {
        let d = abs as i64 - self.origin_abs as i64;
        self.origin_ms + d.div_euclid(PER_MS)
    }

    /// The record holding sample `abs` (the earliest record when before them all).
    fn record_at(&self, abs: u64) -> Option<Position> {
        let i = self.records.partition_point(|(s, _)| *s <= abs);
        self.records.get(i.saturating_sub(1)).map(|(_, p)| *p)
    }

    fn samples(&self, from: u64, to: u64) -> Vec<f32> {
        let a = from.saturating_sub(self.base) as usize;
        let b = (to.saturating_sub(self.base) as usize).min(self.audio.len());
        self.audio.range(a.min(b)..b).copied().collect()
    }

    /// Drops samples (and records) nothing needs any more.
    fn trim(&mut self, pad: u64) {
        let mut keep = self.judged.saturating_sub(pad);
        if let Some(o) = self.open {
            keep = keep.min(o.start.saturating_sub(pad));
        }
        let drop_n = keep.saturating_sub(self.base) as usize;
        let drop_n = drop_n.min(self.audio.len());
        self.audio.drain(..drop_n);
        self.base += drop_n as u64;
        while self.records.len() > 1 && self.records[1].0 <= self.base {
            self.records.pop_front();
        }
    }
}

/// A window sent to the ASR pool.
struct Window {
    room_id: String,
    streamer_id: String,
    start_ms: i64,
    end_ms: i64,
    hold: Option<Position>,
}

/// The operator (one per partition; see the module docs).
pub struct Speech {
    cfg: Arc<SpeechConfig>,
    asr: Arc<AsrPool>,
    vad: SileroVad,
    rooms: HashMap<String, Room, RandomState>,
    windows: HashMap<u64, Window, RandomState>,
    next_ticket: u64,
    tx: mpsc::Sender<AsrOutcome>,
    rx: mpsc::Receiver<AsrOutcome>,
    wake: Arc<Notify>,
    voiced_ms: Counter,
    unvoiced_ms: Counter,
    pending_gauge: Option<Gauge>,
    vad_failed: bool,
    tick_ms: i64,
}

impl Speech {
    /// The operator for one partition: its own VAD session, the shared pool.
    pub fn new(cfg: Arc<SpeechConfig>, asr: Arc<AsrPool>) -> Result<Self, ModelError> {
        let vad = SileroVad::load(std::path::Path::new(&cfg.vad_model))?;
        let (tx, rx) = mpsc::channel();
        Ok(Speech {
            cfg,
            asr,
            vad,
            rooms: HashMap::default(),
            windows: HashMap::default(),
            next_ticket: 0,
            tx,
            rx,
            wake: Arc::new(Notify::new()),
            voiced_ms: counter!(crate::metrics::VAD_AUDIO_MS, "voiced" => "true"),
            unvoiced_ms: counter!(crate::metrics::VAD_AUDIO_MS, "voiced" => "false"),
            pending_gauge: None,
            vad_failed: false,
            tick_ms: 1000,
        })
    }

    /// A room's most recent transcribed speech, oldest first.
    pub fn recent(&self, room_id: &str) -> Vec<Said> {
        self.rooms
            .get(room_id)
            .map(|r| r.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn update_pending(&self) {
        if let Some(g) = &self.pending_gauge {
            g.set(self.windows.len() as f64);
        }
    }

    fn samples_ms(&self, ms: i64) -> u64 {
        (ms.max(0) * PER_MS) as u64
    }

    /// Appends a decoded stretch of a room's audio and runs the VAD over it.
    fn append(
        &mut self,
        room_id: &str,
        streamer: &str,
        start_ms: i64,
        samples: &[f32],
        pos: Position,
    ) {
        if samples.is_empty() {
            return;
        }
        if !self.rooms.contains_key(room_id) {
            self.rooms
                .insert(room_id.to_string(), Room::new(streamer, start_ms));
        }
        let mut skip = 0usize;
        let mut restart = false;
        if let Some(room) = self.rooms.get_mut(room_id) {
            if !streamer.is_empty() && room.streamer_id != streamer {
                room.streamer_id = streamer.to_string();
            }
            let expected = room.time_of(room.end());
            let gap = start_ms - expected;
            if room.end() > 0 && gap > DISCONTINUITY_MS {
                restart = true;
            } else if room.end() > 0 && gap < -DISCONTINUITY_MS {
                // Audio already heard (e.g. the same sound as an audio record
                // and in a video segment): only what is new is kept.
                skip = ((-gap) * PER_MS) as usize;
                if skip >= samples.len() {
                    return;
                }
            }
        }
        if restart {
            // A gap: whatever was being said ended with the audio.
            self.close_open(room_id, None);
            if let Some(room) = self.rooms.get_mut(room_id) {
                let end = room.end();
                room.origin_ms = start_ms;
                room.origin_abs = end;
                room.judged = end;
                room.vad = VadStream::default();
            }
        }
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let first = room.end();
        if room.records.back().is_none_or(|(_, p)| *p != pos) {
            room.records.push_back((first, pos));
        }
        room.audio.extend(&samples[skip..]);
        room.audio_end_ms = room.time_of(room.end());
        self.judge(room_id);
    }

    /// Runs the VAD over the room's complete unjudged chunks.
    fn judge(&mut self, room_id: &str) {
        let chunk = SileroVad::CHUNK as u64;
        let threshold = self.cfg.vad_threshold;
        let negative = threshold - 0.15;
        let min_silence = self.samples_ms(self.cfg.min_silence_ms);
        let max_window = self.samples_ms(self.cfg.max_window_ms);
        let mut buf = vec![0f32; SileroVad::CHUNK];
        loop {
            let Some(room) = self.rooms.get_mut(room_id) else {
                return;
            };
            if room.judged + chunk > room.end() {
                break;
            }
            let c = room.judged;
            let from = (c - room.base) as usize;
            for (dst, src) in buf
                .iter_mut()
                .zip(room.audio.range(from..from + SileroVad::CHUNK))
            {
                *dst = *src;
            }
            let p = match self.vad.chunk_in(&mut room.vad, &buf) {
                Ok(p) => p,
                Err(e) => {
                    if !self.vad_failed {
                        tracing::error!(error = %e, "voice activity detection failed; audio is treated as silence");
                        self.vad_failed = true;
                    }
                    0.0
                }
            };
            room.judged = c + chunk;
            let tick = room.time_of(c).div_euclid(self.tick_ms) * self.tick_ms;
            let v = room.voice.entry(tick).or_default();
            v.1 += 32;
            if p >= threshold {
                v.0 += 32;
                self.voiced_ms.increment(32);
            } else {
                self.unvoiced_ms.increment(32);
            }
            let mut close = None;
            match room.open.as_mut() {
                None => {
                    if p >= threshold {
                        room.open = Some(Open {
                            start: c,
                            silence_since: None,
                        });
                    }
                }
                Some(o) => {
                    if p >= threshold {
                        o.silence_since = None;
                    } else if p < negative && o.silence_since.is_none() {
                        o.silence_since = Some(c);
                    }
                    if let Some(s) = o.silence_since {
                        if c + chunk - s >= min_silence {
                            close = Some(s);
                        }
                    }
                    if close.is_none() && c + chunk - o.start >= max_window {
                        close = Some(c + chunk);
                    }
                }
            }
            if let Some(end) = close {
                self.close_open(room_id, Some(end));
            }
        }
        let pad = self.samples_ms(self.cfg.pad_ms);
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.trim(pad);
        }
    }

    /// Ends the room's open stretch at `end` (default: the end of its audio)
    /// and sends it for transcription if it is long enough.
    fn close_open(&mut self, room_id: &str, end: Option<u64>) {
        let min_speech = self.samples_ms(self.cfg.min_speech_ms);
        let pad = self.samples_ms(self.cfg.pad_ms);
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let Some(open) = room.open.take() else {
            return;
        };
        let end = end
            .or(open.silence_since)
            .unwrap_or(room.end())
            .min(room.end());
        if end.saturating_sub(open.start) < min_speech.max(1) {
            return;
        }
        let from = open.start.saturating_sub(pad).max(room.base);
        let to = (end + pad).min(room.end());
        let samples = room.samples(from, to);
        let window = Window {
            room_id: room_id.to_string(),
            streamer_id: room.streamer_id.clone(),
            start_ms: room.time_of(from),
            end_ms: room.time_of(to),
            hold: room.record_at(from),
        };
        let priority = room.activity + f64::from(room.this_tick);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.windows.insert(ticket, window);
        self.asr.submit(AsrRequest {
            ticket,
            room_id: room_id.to_string(),
            priority,
            samples,
            reply: AsrReply::new(self.tx.clone(), self.wake.clone()),
        });
        self.update_pending();
    }

    fn transcript(
        &self,
        w: &Window,
        seg: &crate::models::whisper::Segment,
        language: &str,
    ) -> Option<Transcript> {
        let text = seg.text.trim();
        if text.is_empty() || is_non_speech(text) {
            return None;
        }
        let start = (w.start_ms + seg.start_ms).clamp(w.start_ms, w.end_ms);
        let end = (w.start_ms + seg.end_ms).clamp(start, w.end_ms);
        Some(Transcript {
            schema_version: SCHEMA_VERSION,
            id: deterministic_id(&[
                b"transcript",
                w.room_id.as_bytes(),
                &start.to_be_bytes(),
                text.as_bytes(),
            ]),
            room_id: w.room_id.clone(),
            streamer_id: w.streamer_id.clone(),
            start_time_ms: start,
            end_time_ms: end,
            language: language.to_string(),
            text: text.to_string(),
            window_start_ms: w.start_ms,
            window_end_ms: w.end_ms,
            model_version: self.asr.model_version().to_string(),
        })
    }
}

/// Whisper's annotations for sounds that are not speech: "[Music]",
/// "(applause)", "[BLANK_AUDIO]", "*laughs*".
fn is_non_speech(text: &str) -> bool {
    let t = text.trim();
    let wrapped = |open: char, close: char| t.starts_with(open) && t.ends_with(close);
    wrapped('[', ']') || wrapped('(', ')') || wrapped('*', '*') || wrapped('♪', '♪')
}

impl Operator for Speech {
    fn name(&self) -> &'static str {
        "speech"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.tick_ms = ctx.tick_ms().max(1);
        if let Some(w) = ctx.wake() {
            self.wake = w;
        }
        self.pending_gauge = Some(gauge!(
            crate::metrics::ASR_PENDING,
            "partition" => ctx.partition().to_string()
        ));
    }

    fn on_record(&mut self, event: &Event, _pos: Position, _late: bool, _ctx: &mut Context<'_>) {
        if matches!(event, Event::Comment(_) | Event::Action(_)) {
            if let Some(room) = self.rooms.get_mut(event.room_id()) {
                room.this_tick = room.this_tick.saturating_add(1);
            }
        }
    }

    fn on_media(
        &mut self,
        event: &Event,
        media: &DecodedMedia,
        pos: Position,
        _late: bool,
        _ctx: &mut Context<'_>,
    ) {
        let Some(audio) = media.audio.as_ref() else {
            return;
        };
        if audio.rate != SAMPLE_RATE {
            return;
        }
        let (streamer, start) = match event {
            Event::Audio(a) => (a.streamer_id.as_str(), a.start_time_ms),
            Event::Video(v) => (v.streamer_id.as_str(), v.start_time_ms),
            _ => return,
        };
        self.append(event.room_id(), streamer, start, &audio.samples, pos);
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        let tick_end = tick_start_ms + ctx.tick_ms();
        let quiet_after = self.cfg.min_silence_ms;
        let mut silent = Vec::new();
        let mut gone = Vec::new();
        for (id, room) in &mut self.rooms {
            while let Some(entry) = room.voice.first_entry() {
                if *entry.key() > tick_start_ms {
                    break;
                }
                let (tick, (voiced_ms, judged_ms)) = entry.remove_entry();
                ctx.note(Note::Voice {
                    room_id: id.clone(),
                    tick_start_ms: tick,
                    voiced_ms,
                    judged_ms,
                });
            }
            room.activity = room.activity * ACTIVITY_DECAY + f64::from(room.this_tick);
            room.this_tick = 0;
            // The audio stopped (the stream ended or stalled): what was being
            // said has ended.
            if room.open.is_some() && room.audio_end_ms + quiet_after <= tick_end {
                silent.push(id.clone());
            } else if room.open.is_none() && room.audio_end_ms + ROOM_IDLE_MS <= tick_end {
                gone.push(id.clone());
            }
        }
        for id in silent {
            self.close_open(&id, None);
        }
        for id in gone {
            if !self.windows.values().any(|w| w.room_id == id) {
                self.rooms.remove(&id);
            }
        }
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        while let Ok(outcome) = self.rx.try_recv() {
            let Some(w) = self.windows.remove(&outcome.ticket) else {
                continue;
            };
            self.update_pending();
            let tr = match outcome.result {
                Ok(tr) => tr,
                Err(e) => {
                    let result = match e {
                        AsrFailure::Skipped => "skipped",
                        AsrFailure::Model(_) => "error",
                        AsrFailure::ShutDown => "dropped",
                    };
                    counter!(crate::metrics::ASR_WINDOWS, "result" => result).increment(1);
                    continue;
                }
            };
            counter!(crate::metrics::ASR_WINDOWS, "result" => "ok").increment(1);
            let mut depends_on = Holds::default();
            if let Some(p) = w.hold {
                depends_on.hold(p);
            }
            for seg in &tr.segments {
                let Some(t) = self.transcript(&w, seg, &tr.language) else {
                    continue;
                };
                counter!(crate::metrics::TRANSCRIPTS, "language" => t.language.clone())
                    .increment(1);
                if let Some(room) = self.rooms.get_mut(&w.room_id) {
                    room.recent.push_back(Said {
                        start_ms: t.start_time_ms,
                        end_ms: t.end_time_ms,
                        language: t.language.clone(),
                        text: t.text.clone(),
                    });
                    while room.recent.len() > RECENT {
                        room.recent.pop_front();
                    }
                }
                ctx.note(Note::Transcript {
                    room_id: w.room_id.clone(),
                    start_ms: t.start_time_ms,
                    end_ms: t.end_time_ms,
                    text: t.text.clone(),
                });
                ctx.emit(Output {
                    topic: OutputTopic::Transcripts,
                    key: w.room_id.clone().into_bytes(),
                    id: t.id.clone(),
                    payload: t.encode_to_vec(),
                    headers: Vec::new(),
                    model_version: Some(t.model_version.clone()),
                    tick_end_ms: None,
                    depends_on,
                });
            }
        }
    }

    fn pending(&self) -> usize {
        self.windows.len()
    }

    fn on_finish(&mut self, _ctx: &mut Context<'_>) {
        let open: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.open.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in open {
            self.close_open(&id, None);
        }
    }

    fn holds(&self, holds: &mut Holds) {
        for w in self.windows.values() {
            if let Some(p) = w.hold {
                holds.hold(p);
            }
        }
        let pad = self.samples_ms(self.cfg.pad_ms);
        for room in self.rooms.values() {
            if let Some(o) = room.open {
                if let Some(p) = room.record_at(o.start.saturating_sub(pad)) {
                    holds.hold(p);
                }
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        let n = self.windows.len() as u64;
        if n > 0 {
            counter!(crate::metrics::ASR_WINDOWS, "result" => "dropped").increment(n);
        }
        self.windows.clear();
        self.rooms.clear();
        self.update_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whisper_sound_annotations_are_not_speech() {
        for t in [
            "[Music]",
            "(applause)",
            "[BLANK_AUDIO]",
            "*laughs*",
            " ♪ ♪ ",
        ] {
            assert!(is_non_speech(t), "{t}");
        }
        for t in ["Hello (everyone)", "谢谢大家", "[x] marks the spot"] {
            assert!(!is_non_speech(t), "{t}");
        }
    }
}
