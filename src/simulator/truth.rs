//! Ground truth of a simulated run: per room and tick, the activity figures the engine's
//! room-activity operator must reproduce exactly, the rooms' highlight intervals, and
//! the streamer's utterances (what was said, in which language, and when).
//!
//! What it is for: computing those figures independently of the engine, directly from
//! the events as the simulator hands them out ([`GroundTruth::record`]), and storing
//! them as JSON lines next to a simulated run so tests and benchmarks can compare the
//! engine's `room-stats` output, highlight detections and speech transcripts with them.
//! Utterances are not derived from the events: the simulator knows what it mixed into
//! the audio and adds each one ([`GroundTruth::add_utterance`]) once the audio chunks
//! that carry all of it have been handed out.
//!
//! What it is not for: the engine's own statistics (those live in the operators; no
//! code is shared on purpose), or anything the simulator did not generate.
//!
//! # Definitions (shared with the engine's room-activity operator)
//!
//! * Tick `k` of a room is `[k * tick_ms, (k + 1) * tick_ms)` of absolute event time.
//! * `comments` / `distinct_commenters`: Comment records in the tick. `enters`,
//!   `leaves`, `impressions`, `likes`, `shares`, `follows`, `gifts`: viewer actions of
//!   that kind in the tick (COMMENT actions count nowhere); `gift_value` their sum;
//!   `watch_ms` the sum of WATCH_PROGRESS `watch_ms`.
//! * `viewers_present`: size of the set of users in the room after applying every
//!   ENTER (insert) and LEAVE (remove) with event time before the tick's end.
//! * `video_segments`: video records whose start time is in the tick.
//! * Audio: frame `i` of a chunk has time `start + floor(i * 1000 / sample_rate)`;
//!   `audio_samples` counts the frames in the tick, `has_audio = audio_samples > 0`,
//!   and `loudness_dbfs = 10 log10(sum_sq / (values * 32768^2))` over every sample
//!   value of those frames (all channels), floored at -120, and -120 when `sum_sq`
//!   is 0.
//! * A tick appears iff a record of the room (any kind; for audio, a frame) falls in
//!   it or at least one viewer is present at its end. `id` is empty and
//!   `schema_version` is 1.
//! * An utterance is `[start_ms, end_ms)` of event time: `start_ms` is the time (as
//!   for audio frames above) of its first speech sample, `end_ms` that of the first
//!   sample after its last one, or the end of the broadcast when that cuts it short.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};

use super::world::SimEvent;
use crate::schema::{ActionKind, AudioFormat, RoomStats};

/// A highlight interval `[start_ms, end_ms)` of a room.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct HighlightTruth {
    /// The room.
    pub room_id: String,
    /// First instant of the highlight, ms since the epoch.
    pub start_ms: i64,
    /// End of the highlight (exclusive).
    pub end_ms: i64,
}

/// One utterance of a room's streamer: speech mixed into the room's audio over
/// `[start_ms, end_ms)` of event time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct UtteranceTruth {
    /// The room.
    pub room_id: String,
    /// Time of the first speech sample, ms since the epoch.
    pub start_ms: i64,
    /// Time of the first sample after the speech (exclusive end), or the end of the
    /// broadcast when that cut the utterance short.
    pub end_ms: i64,
    /// Language spoken: `"en"` or `"zh"` (Mandarin).
    pub lang: String,
    /// What was said as it is written: the English text, or for Mandarin the Chinese
    /// characters (with full-width commas where the pinyin has commas).
    pub text: String,
    /// Mandarin only: the pinyin with tone numbers that the synthesiser spoke.
    pub pinyin: Option<String>,
}

/// What the simulator made of one viewer in one room: the traits that decide how
/// likely the viewer is to come, stay and gift (see the world's module docs).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewerTruth {
    /// The room.
    pub room_id: String,
    /// The user.
    pub user_id: String,
    /// Affinity to the room's streamer, in `[0, 1]`.
    pub affinity: f64,
    /// The user's gifting level, in `[0, 1]` (most users near 0).
    pub gift_level: f64,
    /// The genre the user prefers.
    pub genre: u32,
}

/// A streamer and its genre.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct StreamerTruth {
    /// The streamer.
    pub streamer_id: String,
    /// Its genre.
    pub genre: u32,
}

/// Why a truth file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    /// Reading failed.
    #[error("reading ground truth failed")]
    Io(#[from] std::io::Error),
    /// A line is not what [`GroundTruth::write_jsonl`] writes.
    #[error("ground truth line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Audio accumulated for one tick.
#[derive(Clone, Copy, Debug, Default)]
struct AudioAcc {
    frames: u64,
    values: u64,
    sum_sq: u128,
}

impl AudioAcc {
    fn add(&mut self, other: AudioAcc) {
        self.frames += other.frames;
        self.values += other.values;
        self.sum_sq += other.sum_sq;
    }
}

/// The tick being accumulated for a room.
#[derive(Clone, Debug, Default)]
struct OpenTick {
    start: i64,
    stats: RoomStats,
    audio: AudioAcc,
}

/// Per-room state while recording.
#[derive(Clone, Debug)]
struct RoomAcc {
    room_id: String,
    streamer_id: String,
    /// Users inside the room now.
    present: HashSet<String>,
    /// Strings freed by LEAVEs, reused by ENTERs.
    spare: Vec<String>,
    open: Option<OpenTick>,
    /// Ticks before this one are materialised (or had nothing to show).
    next_tick: Option<i64>,
    /// Audio frames that fall in ticks after the open one.
    audio_ahead: BTreeMap<i64, AudioAcc>,
    /// Commenters of the open tick, concatenated, with their spans.
    commenter_arena: String,
    commenter_spans: Vec<(u32, u32)>,
}

/// Ground truth of a simulated run. Ticks appear once they are complete (see
/// [`GroundTruth::close_until`]).
#[derive(Clone, Debug)]
pub struct GroundTruth {
    tick_ms: i64,
    ticks: BTreeMap<(String, i64), RoomStats>,
    highlights: Vec<HighlightTruth>,
    utterances: Vec<UtteranceTruth>,
    streamers: Vec<StreamerTruth>,
    viewers: Vec<ViewerTruth>,
    rooms: Vec<RoomAcc>,
}

impl PartialEq for GroundTruth {
    fn eq(&self, other: &Self) -> bool {
        self.ticks == other.ticks
            && self.highlights() == other.highlights()
            && self.utterances() == other.utterances()
            && self.streamers == other.streamers
            && self.viewers.len() == other.viewers.len()
            && self.viewers.iter().zip(&other.viewers).all(|(a, b)| {
                // JSON numbers read back within an ulp or so, not bit for bit.
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-12;
                (&a.room_id, &a.user_id, a.genre) == (&b.room_id, &b.user_id, b.genre)
                    && close(a.affinity, b.affinity)
                    && close(a.gift_level, b.gift_level)
            })
    }
}

fn loudness(a: &AudioAcc) -> f64 {
    if a.sum_sq == 0 || a.values == 0 {
        return -120.0;
    }
    let db = 10.0 * (a.sum_sq as f64 / (a.values as f64 * 32768.0 * 32768.0)).log10();
    db.max(-120.0)
}

impl GroundTruth {
    /// An empty truth with the given tick length.
    pub fn new(tick_ms: i64) -> Self {
        GroundTruth {
            tick_ms: tick_ms.max(1),
            ticks: BTreeMap::new(),
            highlights: Vec::new(),
            utterances: Vec::new(),
            streamers: Vec::new(),
            viewers: Vec::new(),
            rooms: Vec::new(),
        }
    }

    /// Registers a room (its index is the order of registration) and its highlights.
    pub fn add_room(&mut self, room_id: &str, streamer_id: &str, highlights: &[(i64, i64)]) {
        self.rooms.push(RoomAcc {
            room_id: room_id.to_owned(),
            streamer_id: streamer_id.to_owned(),
            present: HashSet::new(),
            spare: Vec::new(),
            open: None,
            next_tick: None,
            audio_ahead: BTreeMap::new(),
            commenter_arena: String::new(),
            commenter_spans: Vec::new(),
        });
        for &(start_ms, end_ms) in highlights {
            self.highlights.push(HighlightTruth {
                room_id: room_id.to_owned(),
                start_ms,
                end_ms,
            });
        }
    }

    /// Records a streamer's genre.
    pub fn add_streamer(&mut self, streamer_id: &str, genre: u32) {
        self.streamers.push(StreamerTruth {
            streamer_id: streamer_id.to_owned(),
            genre,
        });
    }

    /// Records a viewer's traits in a room.
    pub fn add_viewer(&mut self, viewer: ViewerTruth) {
        self.viewers.push(viewer);
    }

    /// Every streamer with its genre, in room order.
    pub fn streamers(&self) -> &[StreamerTruth] {
        &self.streamers
    }

    /// Every room's viewer population with their traits, in room order.
    pub fn viewers(&self) -> &[ViewerTruth] {
        &self.viewers
    }

    /// Tick length.
    pub fn tick_ms(&self) -> i64 {
        self.tick_ms
    }

    /// Completed ticks, by (room_id, tick_start_ms).
    pub fn ticks(&self) -> impl Iterator<Item = &RoomStats> {
        self.ticks.values()
    }

    /// Completed ticks keyed by (room_id, tick_start_ms).
    pub fn tick_map(&self) -> &BTreeMap<(String, i64), RoomStats> {
        &self.ticks
    }

    /// One tick of one room, if it appears in the truth.
    pub fn get(&self, room_id: &str, tick_start_ms: i64) -> Option<&RoomStats> {
        self.ticks.get(&(room_id.to_owned(), tick_start_ms))
    }

    /// Every highlight interval, sorted by room and start.
    pub fn highlights(&self) -> Vec<HighlightTruth> {
        let mut h = self.highlights.clone();
        h.sort();
        h
    }

    /// Adds one utterance. The simulator adds an utterance once every audio chunk that
    /// carries it has been handed out (its end is at or before the cursor), so the
    /// truth holds only what a consumer of the events can have heard.
    pub fn add_utterance(&mut self, utterance: UtteranceTruth) {
        self.utterances.push(utterance);
    }

    /// Every utterance, sorted by room and start.
    pub fn utterances(&self) -> Vec<UtteranceTruth> {
        let mut u = self.utterances.clone();
        u.sort();
        u
    }

    /// Records one event of room `room` (index of [`GroundTruth::add_room`]). Events
    /// of a room must come in event-time order; unknown rooms are ignored, and so
    /// are short-video actions (they belong to no room).
    pub fn record(&mut self, room: usize, ev: &SimEvent) {
        if matches!(ev, SimEvent::ShortVideo(_)) {
            return;
        }
        let tick_ms = self.tick_ms;
        let Some(acc) = self.rooms.get_mut(room) else {
            return;
        };
        let t = ev.event_time_ms();
        let tick = t.div_euclid(tick_ms) * tick_ms;
        acc.roll_to(tick, tick_ms, &mut self.ticks);
        let Some(open) = acc.open.as_mut() else {
            return;
        };
        let st = &mut open.stats;
        match ev {
            SimEvent::Comment(c) => {
                st.comments += 1;
                let from = acc.commenter_arena.len() as u32;
                acc.commenter_arena.push_str(&c.user_id);
                acc.commenter_spans
                    .push((from, acc.commenter_arena.len() as u32));
            }
            SimEvent::Action(a) => match ActionKind::try_from(a.kind) {
                Ok(ActionKind::Enter) => {
                    st.enters += 1;
                    if !acc.present.contains(a.user_id.as_str()) {
                        let mut s = acc.spare.pop().unwrap_or_default();
                        s.clear();
                        s.push_str(&a.user_id);
                        acc.present.insert(s);
                    }
                }
                Ok(ActionKind::Leave) => {
                    st.leaves += 1;
                    if let Some(s) = acc.present.take(a.user_id.as_str()) {
                        acc.spare.push(s);
                    }
                }
                Ok(ActionKind::Impression) => st.impressions += 1,
                Ok(ActionKind::WatchProgress) => st.watch_ms += u64::from(a.watch_ms),
                Ok(ActionKind::Like) => st.likes += 1,
                Ok(ActionKind::Share) => st.shares += 1,
                Ok(ActionKind::Follow) => st.follows += 1,
                Ok(ActionKind::Gift) => {
                    st.gifts += 1;
                    st.gift_value += a.gift_value;
                }
                Ok(ActionKind::Comment | ActionKind::Unspecified) | Err(_) => {}
            },
            SimEvent::Video(_) => st.video_segments += 1,
            SimEvent::ShortVideo(_) => {}
            SimEvent::Audio(a) => {
                if a.format != AudioFormat::PcmS16le as i32 || a.sample_rate == 0 || a.channels == 0
                {
                    return;
                }
                let ch = a.channels as usize;
                let frames = a.payload.len() / 2 / ch;
                let sr = i64::from(a.sample_rate);
                let mut i = 0usize;
                let mut tick_start = tick;
                while i < frames {
                    // Frames before index b have time < tick_start + tick_ms:
                    // floor(i*1000/sr) < D  <=>  i < ceil(D*sr/1000).
                    let d = tick_start + tick_ms - a.start_time_ms;
                    let b =
                        ((d as i128 * sr as i128 + 999) / 1000).clamp(0, frames as i128) as usize;
                    let mut part = AudioAcc::default();
                    for pair in a.payload[i * ch * 2..b * ch * 2].chunks_exact(2) {
                        let s = i128::from(i16::from_le_bytes([pair[0], pair[1]]));
                        part.sum_sq += (s * s) as u128;
                    }
                    part.frames = (b - i) as u64;
                    part.values = ((b - i) * ch) as u64;
                    if tick_start == open.start {
                        open.audio.add(part);
                    } else if part.frames > 0 {
                        acc.audio_ahead.entry(tick_start).or_default().add(part);
                    }
                    i = b;
                    tick_start += tick_ms;
                }
            }
        }
    }

    /// Closes every tick that ends at or before `until_ms` (no event before that time
    /// can arrive any more), adding ticks where viewers were present but nothing
    /// happened.
    pub fn close_until(&mut self, until_ms: i64) {
        let tick_ms = self.tick_ms;
        let complete_before = until_ms.div_euclid(tick_ms) * tick_ms;
        for acc in &mut self.rooms {
            if acc
                .open
                .as_ref()
                .is_some_and(|o| o.start + tick_ms <= until_ms)
            {
                acc.close_open(tick_ms, &mut self.ticks);
            }
            if acc.open.is_none() {
                if let Some(from) = acc.next_tick {
                    acc.fill_gaps(from, complete_before, tick_ms, &mut self.ticks);
                }
            }
        }
    }

    /// Closes everything (the run is over).
    pub fn close_all(&mut self) {
        let tick_ms = self.tick_ms;
        for acc in &mut self.rooms {
            acc.close_open(tick_ms, &mut self.ticks);
            let last_audio = acc.audio_ahead.keys().next_back().copied();
            if let (Some(from), Some(last)) = (acc.next_tick, last_audio) {
                acc.fill_gaps(from, last + tick_ms, tick_ms, &mut self.ticks);
            }
        }
    }

    /// Writes one JSON object per line: every highlight
    /// (`{"type":"highlight","room_id":..,"start_ms":..,"end_ms":..}`), then every
    /// utterance (`{"type":"utterance","room_id":..,"start_ms":..,"end_ms":..,
    /// "lang":"en"|"zh","text":..,"pinyin":..|null}`), both sorted by room and start,
    /// then every streamer (`{"type":"streamer","streamer_id":..,"genre":..}`) and every
    /// room's viewers (`{"type":"viewer","room_id":..,"user_id":..,"affinity":..,
    /// "gift_level":..,"genre":..}`) in room order, then every completed tick
    /// (`{"type":"tick", ...RoomStats fields...}`), in key order. Strings are written as
    /// JSON escapes them (UTF-8, not `\u` escapes).
    pub fn write_jsonl(&self, mut w: impl Write) -> std::io::Result<()> {
        for h in self.highlights() {
            writeln!(
                w,
                "{{\"type\":\"highlight\",\"room_id\":{},\"start_ms\":{},\"end_ms\":{}}}",
                serde_json::to_string(&h.room_id)?,
                h.start_ms,
                h.end_ms
            )?;
        }
        for u in self.utterances() {
            writeln!(
                w,
                "{{\"type\":\"utterance\",\"room_id\":{},\"start_ms\":{},\"end_ms\":{},\"lang\":{},\"text\":{},\"pinyin\":{}}}",
                serde_json::to_string(&u.room_id)?,
                u.start_ms,
                u.end_ms,
                serde_json::to_string(&u.lang)?,
                serde_json::to_string(&u.text)?,
                serde_json::to_string(&u.pinyin)?
            )?;
        }
        for s in &self.streamers {
            let obj = serde_json::to_string(s)?;
            let fields = obj.strip_prefix('{').unwrap_or(&obj);
            writeln!(w, "{{\"type\":\"streamer\",{fields}")?;
        }
        for v in &self.viewers {
            let obj = serde_json::to_string(v)?;
            let fields = obj.strip_prefix('{').unwrap_or(&obj);
            writeln!(w, "{{\"type\":\"viewer\",{fields}")?;
        }
        for s in self.ticks.values() {
            let obj = serde_json::to_string(s)?;
            let fields = obj.strip_prefix('{').unwrap_or(&obj);
            writeln!(w, "{{\"type\":\"tick\",{fields}")?;
        }
        Ok(())
    }

    /// Reads what [`GroundTruth::write_jsonl`] wrote. Blank lines are skipped; files
    /// written before utterances were recorded (no `utterance` lines) read with none.
    /// An utterance's `pinyin` may be `null` or absent.
    pub fn read_jsonl(r: impl BufRead) -> Result<Self, TruthError> {
        let mut truth = GroundTruth::new(1);
        let mut tick_ms = None;
        for (n, line) in r.lines().enumerate() {
            let line = line?;
            let err = |reason: String| TruthError::Format {
                line: n + 1,
                reason,
            };
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| err(e.to_string()))?;
            let obj = v
                .as_object()
                .ok_or_else(|| err("not a JSON object".into()))?;
            let str_field = |k: &str| -> Result<String, TruthError> {
                obj.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| err(format!("missing or non-string field {k:?}")))
            };
            let i64_field = |k: &str| -> Result<i64, TruthError> {
                obj.get(k)
                    .and_then(|x| x.as_i64())
                    .ok_or_else(|| err(format!("missing or non-integer field {k:?}")))
            };
            let u64_field = |k: &str| -> Result<u64, TruthError> {
                obj.get(k)
                    .and_then(|x| x.as_u64())
                    .ok_or_else(|| err(format!("missing or non-integer field {k:?}")))
            };
            let u32_field = |k: &str| -> Result<u32, TruthError> {
                u32::try_from(u64_field(k)?).map_err(|_| err(format!("{k:?} out of range")))
            };
            match obj.get("type").and_then(|t| t.as_str()) {
                Some("highlight") => truth.highlights.push(HighlightTruth {
                    room_id: str_field("room_id")?,
                    start_ms: i64_field("start_ms")?,
                    end_ms: i64_field("end_ms")?,
                }),
                Some("utterance") => {
                    let pinyin = match obj.get("pinyin") {
                        None | Some(serde_json::Value::Null) => None,
                        Some(serde_json::Value::String(p)) => Some(p.clone()),
                        Some(_) => return Err(err("non-string field \"pinyin\"".into())),
                    };
                    truth.utterances.push(UtteranceTruth {
                        room_id: str_field("room_id")?,
                        start_ms: i64_field("start_ms")?,
                        end_ms: i64_field("end_ms")?,
                        lang: str_field("lang")?,
                        text: str_field("text")?,
                        pinyin,
                    });
                }
                Some("tick") => {
                    let stats = RoomStats {
                        schema_version: u32_field("schema_version")?,
                        id: str_field("id")?,
                        room_id: str_field("room_id")?,
                        streamer_id: str_field("streamer_id")?,
                        tick_start_ms: i64_field("tick_start_ms")?,
                        tick_ms: u32_field("tick_ms")?,
                        comments: u32_field("comments")?,
                        distinct_commenters: u32_field("distinct_commenters")?,
                        viewers_present: u32_field("viewers_present")?,
                        enters: u32_field("enters")?,
                        leaves: u32_field("leaves")?,
                        impressions: u32_field("impressions")?,
                        watch_ms: u64_field("watch_ms")?,
                        likes: u32_field("likes")?,
                        shares: u32_field("shares")?,
                        follows: u32_field("follows")?,
                        gifts: u32_field("gifts")?,
                        gift_value: u64_field("gift_value")?,
                        video_segments: u32_field("video_segments")?,
                        has_audio: obj
                            .get("has_audio")
                            .and_then(|x| x.as_bool())
                            .ok_or_else(|| err("missing or non-boolean \"has_audio\"".into()))?,
                        audio_samples: u64_field("audio_samples")?,
                        loudness_dbfs: exact_number(&line, "loudness_dbfs")
                            .ok_or_else(|| err("missing or bad \"loudness_dbfs\"".into()))?,
                    };
                    tick_ms.get_or_insert(i64::from(stats.tick_ms));
                    truth
                        .ticks
                        .insert((stats.room_id.clone(), stats.tick_start_ms), stats);
                }
                Some("streamer") => truth
                    .streamers
                    .push(serde_json::from_value(v.clone()).map_err(|e| err(e.to_string()))?),
                Some("viewer") => truth
                    .viewers
                    .push(serde_json::from_value(v.clone()).map_err(|e| err(e.to_string()))?),
                other => return Err(err(format!("unknown record type {other:?}"))),
            }
        }
        truth.tick_ms = tick_ms.unwrap_or(1000).max(1);
        Ok(truth)
    }
}

/// The number after `"key":` in one JSON line, parsed with Rust's correctly rounded
/// float parser (so a written `f64` reads back bit for bit).
fn exact_number(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\"");
    let at = line.find(&pat)? + pat.len();
    let rest = line[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl RoomAcc {
    /// Makes `tick` the open tick, closing the previous one and filling gaps.
    fn roll_to(&mut self, tick: i64, tick_ms: i64, out: &mut BTreeMap<(String, i64), RoomStats>) {
        if let Some(open) = &self.open {
            if open.start == tick {
                return;
            }
            self.close_open(tick_ms, out);
        }
        if let Some(from) = self.next_tick {
            self.fill_gaps(from, tick, tick_ms, out);
        }
        self.open_tick(tick);
        self.next_tick = Some(tick + tick_ms);
    }

    fn open_tick(&mut self, tick: i64) {
        let mut open = OpenTick {
            start: tick,
            ..OpenTick::default()
        };
        if let Some(a) = self.audio_ahead.remove(&tick) {
            open.audio.add(a);
        }
        self.open = Some(open);
        self.commenter_arena.clear();
        self.commenter_spans.clear();
    }

    /// Materialises the ticks in `[from, to)` that have viewers present or audio
    /// frames (nothing else happened in them).
    fn fill_gaps(
        &mut self,
        from: i64,
        to: i64,
        tick_ms: i64,
        out: &mut BTreeMap<(String, i64), RoomStats>,
    ) {
        if from >= to {
            return;
        }
        if self.present.is_empty() {
            // Only ticks with audio frames appear.
            let ticks: Vec<i64> = self.audio_ahead.range(from..to).map(|(&t, _)| t).collect();
            for t in ticks {
                self.open_tick(t);
                self.close_open(tick_ms, out);
            }
        } else {
            let mut t = from;
            while t < to {
                self.open_tick(t);
                self.close_open(tick_ms, out);
                t += tick_ms;
            }
        }
        self.next_tick = Some(to);
    }

    fn close_open(&mut self, tick_ms: i64, out: &mut BTreeMap<(String, i64), RoomStats>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let mut st = open.stats;
        st.schema_version = 1;
        st.id = String::new();
        st.room_id = self.room_id.clone();
        st.streamer_id = self.streamer_id.clone();
        st.tick_start_ms = open.start;
        st.tick_ms = tick_ms as u32;
        st.viewers_present = self.present.len() as u32;
        let arena = &self.commenter_arena;
        let mut names: Vec<&str> = self
            .commenter_spans
            .iter()
            .map(|&(a, b)| &arena[a as usize..b as usize])
            .collect();
        names.sort_unstable();
        names.dedup();
        st.distinct_commenters = names.len() as u32;
        st.audio_samples = open.audio.frames;
        st.has_audio = open.audio.frames > 0;
        st.loudness_dbfs = loudness(&open.audio);
        out.insert((self.room_id.clone(), open.start), st);
        self.next_tick = Some(open.start + tick_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{AudioChunk, Comment, VideoSegment, ViewerAction};

    const R: &str = "room-0000";

    fn act(t: i64, user: &str, kind: ActionKind) -> SimEvent {
        SimEvent::Action(ViewerAction {
            schema_version: 1,
            room_id: R.into(),
            user_id: user.into(),
            streamer_id: "streamer-0000".into(),
            event_time_ms: t,
            kind: kind as i32,
            watch_ms: if kind == ActionKind::WatchProgress {
                5000
            } else {
                0
            },
            gift_value: if kind == ActionKind::Gift { 52 } else { 0 },
            gift_id: String::new(),
            ..ViewerAction::default()
        })
    }

    fn comment(t: i64, user: &str) -> SimEvent {
        SimEvent::Comment(Comment {
            schema_version: 1,
            room_id: R.into(),
            user_id: user.into(),
            event_time_ms: t,
            text: "太精彩了！".into(),
            comment_id: String::new(),
        })
    }

    fn audio(t: i64, samples: &[i16], rate: u32, channels: u32) -> SimEvent {
        SimEvent::Audio(AudioChunk {
            schema_version: 1,
            room_id: R.into(),
            streamer_id: "streamer-0000".into(),
            sequence: 0,
            start_time_ms: t,
            sample_rate: rate,
            channels,
            format: AudioFormat::PcmS16le as i32,
            payload: samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        })
    }

    fn truth_of(events: &[SimEvent]) -> GroundTruth {
        let mut g = GroundTruth::new(1000);
        g.add_room(R, "streamer-0000", &[(10_500, 16_000)]);
        for e in events {
            g.record(0, e);
        }
        g.close_all();
        g
    }

    #[test]
    fn counts_per_tick() {
        let g = truth_of(&[
            act(100, "u1", ActionKind::Impression),
            act(900, "u1", ActionKind::Enter),
            comment(950, "u1"),
            act(950, "u1", ActionKind::Comment),
            act(1_200, "u2", ActionKind::Enter),
            comment(1_300, "u1"),
            comment(1_400, "u2"),
            comment(1_500, "u1"),
            act(1_600, "u1", ActionKind::Like),
            act(1_700, "u1", ActionKind::Gift),
            act(1_800, "u2", ActionKind::Gift),
            act(1_900, "u2", ActionKind::Share),
            act(1_999, "u2", ActionKind::Follow),
            act(5_900, "u1", ActionKind::WatchProgress),
            act(5_950, "u1", ActionKind::Leave),
            act(9_000, "u2", ActionKind::Leave),
        ]);
        let t0 = g.get(R, 0).expect("tick 0");
        assert_eq!(
            (t0.impressions, t0.enters, t0.comments, t0.viewers_present),
            (1, 1, 1, 1)
        );
        assert_eq!(t0.distinct_commenters, 1);
        let t1 = g.get(R, 1000).expect("tick 1");
        assert_eq!((t1.comments, t1.distinct_commenters), (3, 2));
        assert_eq!(
            (t1.likes, t1.gifts, t1.gift_value, t1.shares, t1.follows),
            (1, 2, 104, 1, 1)
        );
        assert_eq!(t1.viewers_present, 2);
        // Gaps with viewers present appear, empty but with the audience.
        for t in [2000, 3000, 4000] {
            let s = g.get(R, t).expect("gap tick");
            assert_eq!((s.viewers_present, s.comments, s.has_audio), (2, 0, false));
            assert_eq!(s.loudness_dbfs, -120.0);
        }
        let t5 = g.get(R, 5000).expect("tick 5");
        assert_eq!((t5.watch_ms, t5.leaves, t5.viewers_present), (5000, 1, 1));
        assert!(g.get(R, 6000).is_some() && g.get(R, 8000).is_some());
        let t9 = g.get(R, 9000).expect("tick 9");
        assert_eq!((t9.leaves, t9.viewers_present), (1, 0));
        assert!(g.get(R, 10_000).is_none());
        assert_eq!(g.ticks().count(), 10);
        assert!(g
            .ticks()
            .all(|s| s.streamer_id == "streamer-0000" && s.tick_ms == 1000));
    }

    #[test]
    fn audio_split_across_ticks() {
        // 8 kHz stereo, starting 250 ms into tick 0, 1.5 s long: frames at times
        // 250 + floor(i/8).
        let frames = 12_000;
        let samples: Vec<i16> = (0..frames * 2)
            .map(|i| if i % 2 == 0 { 1000 } else { -2000 })
            .collect();
        let g = truth_of(&[
            audio(250, &samples, 8000, 2),
            SimEvent::Video(VideoSegment {
                start_time_ms: 1_999,
                ..VideoSegment::default()
            }),
        ]);
        let t0 = g.get(R, 0).expect("tick 0");
        assert_eq!(t0.audio_samples, 750 * 8);
        let t1 = g.get(R, 1000).expect("tick 1");
        assert_eq!((t1.audio_samples, t1.video_segments), (12_000 - 6000, 1));
        assert!(t0.has_audio && t1.has_audio);
        let expect =
            10.0 * ((1000.0f64.powi(2) + 2000.0f64.powi(2)) / 2.0 / 32768.0 / 32768.0).log10();
        assert!((t0.loudness_dbfs - expect).abs() < 1e-9);
        assert_eq!(t0.loudness_dbfs, t1.loudness_dbfs);
        // Audio reaching into a tick where nothing else happens still makes it appear.
        let g = truth_of(&[audio(500, &vec![7i16; 16_000 * 2], 16_000, 1)]);
        assert_eq!(g.ticks().count(), 3);
        assert_eq!(g.get(R, 2000).expect("tick 2").audio_samples, 8000);
        // Silence counts as audio, at -120 dBFS.
        let g = truth_of(&[audio(0, &[0i16; 160], 16_000, 1)]);
        let t = g.get(R, 0).expect("tick");
        assert!(t.has_audio && t.loudness_dbfs == -120.0);
    }

    #[test]
    fn close_until_only_closes_complete_ticks() {
        let mut g = GroundTruth::new(1000);
        g.add_room(R, "s", &[]);
        g.record(0, &act(100, "u1", ActionKind::Enter));
        g.close_until(900);
        assert_eq!(g.ticks().count(), 0);
        g.close_until(3_500);
        assert_eq!(
            g.ticks().count(),
            3,
            "tick 0 plus two ticks with a viewer present"
        );
        g.record(0, &act(3_600, "u1", ActionKind::Leave));
        g.close_until(10_000);
        assert_eq!(
            g.ticks().map(|s| s.tick_start_ms).collect::<Vec<_>>(),
            [0, 1000, 2000, 3000]
        );
        assert_eq!(g.get(R, 3000).expect("tick 3").viewers_present, 0);
    }

    #[test]
    fn jsonl_round_trip() {
        let samples: Vec<i16> = (0..16_000)
            .map(|i| ((i * 37) % 2001 - 1000) as i16)
            .collect();
        let g = truth_of(&[
            act(900, "u1", ActionKind::Enter),
            comment(950, "u\"1"),
            audio(1000, &samples, 16_000, 1),
            act(2_500, "u1", ActionKind::Leave),
        ]);
        let mut buf = Vec::new();
        g.write_jsonl(&mut buf).expect("write");
        let text = String::from_utf8(buf.clone()).expect("utf8");
        assert!(text
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("{\"type\":\"highlight\"")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("{\"type\":\"tick\",\"schema_version\":1,")));
        let back = GroundTruth::read_jsonl(&buf[..]).expect("read");
        assert!(back == g);
        assert_eq!(back.tick_ms(), 1000);
        assert_eq!(back.highlights()[0].start_ms, 10_500);
        let loud = g.get(R, 1000).expect("tick").loudness_dbfs;
        assert_eq!(
            back.get(R, 1000).expect("tick").loudness_dbfs.to_bits(),
            loud.to_bits()
        );
        // Files written before utterances existed read with none.
        assert!(back.utterances().is_empty());
        assert!(!text.contains("\"type\":\"utterance\""));
        assert!(GroundTruth::read_jsonl(&b"{\"type\":\"nope\"}\n"[..]).is_err());
        assert!(GroundTruth::read_jsonl(&b"{\"type\":\"tick\"}\n"[..]).is_err());
        assert!(GroundTruth::read_jsonl(&b"[1]\n"[..]).is_err());
    }

    #[test]
    fn utterances_round_trip() {
        let mut g = truth_of(&[act(900, "u1", ActionKind::Enter)]);
        let zh = UtteranceTruth {
            room_id: R.into(),
            start_ms: 4_100,
            end_ms: 6_033,
            lang: "zh".into(),
            text: "赢了，赢了".into(),
            pinyin: Some("ying2 le5, ying2 le5".into()),
        };
        let en = UtteranceTruth {
            room_id: R.into(),
            start_ms: 1_200,
            end_ms: 3_517,
            lang: "en".into(),
            text: "say \"hi\", \\ please".into(),
            pinyin: None,
        };
        let other = UtteranceTruth {
            room_id: "room-0001".into(),
            start_ms: 0,
            end_ms: 10,
            ..en.clone()
        };
        g.add_utterance(zh.clone());
        g.add_utterance(other.clone());
        g.add_utterance(en.clone());
        // Sorted by room, then start.
        assert_eq!(g.utterances(), [en.clone(), zh.clone(), other.clone()]);
        let mut buf = Vec::new();
        g.write_jsonl(&mut buf).expect("write");
        let text = String::from_utf8(buf.clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("{\"type\":\"highlight\""));
        assert_eq!(
            lines[1],
            r#"{"type":"utterance","room_id":"room-0000","start_ms":1200,"end_ms":3517,"lang":"en","text":"say \"hi\", \\ please","pinyin":null}"#
        );
        assert_eq!(
            lines[2],
            r#"{"type":"utterance","room_id":"room-0000","start_ms":4100,"end_ms":6033,"lang":"zh","text":"赢了，赢了","pinyin":"ying2 le5, ying2 le5"}"#
        );
        assert!(lines[3].contains("\"room_id\":\"room-0001\""));
        assert!(lines[4].starts_with("{\"type\":\"tick\""));
        let back = GroundTruth::read_jsonl(&buf[..]).expect("read");
        assert!(back == g);
        assert_eq!(back.utterances(), g.utterances());
        // Truths that differ only in utterances differ.
        let mut fewer = g.clone();
        fewer.utterances.pop();
        assert!(fewer != g);
        // `pinyin` may be absent; it must be a string or null.
        let line =
            r#"{"type":"utterance","room_id":"r","start_ms":1,"end_ms":2,"lang":"en","text":"hi"}"#;
        let one = GroundTruth::read_jsonl(line.as_bytes()).expect("no pinyin");
        assert_eq!(one.utterances()[0].pinyin, None);
        for bad in [
            r#"{"type":"utterance","room_id":"r","start_ms":1,"end_ms":2,"lang":"en","text":"hi","pinyin":3}"#,
            r#"{"type":"utterance","room_id":"r","start_ms":1,"end_ms":2,"lang":"en"}"#,
            r#"{"type":"utterance","room_id":"r","start_ms":"1","end_ms":2,"lang":"en","text":"hi"}"#,
        ] {
            assert!(GroundTruth::read_jsonl(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn exact_float_parse() {
        for x in [
            -23.456_789_012_345_678_f64,
            -120.0,
            -0.000_123_456_789_012_345_67,
            -99.999_999_999_999_99,
        ] {
            let line = format!(
                "{{\"a\":1,\"loudness_dbfs\":{}}}",
                serde_json::to_string(&x).expect("json")
            );
            assert_eq!(
                exact_number(&line, "loudness_dbfs").map(f64::to_bits),
                Some(x.to_bits())
            );
        }
    }
}

/// How a set of engine outputs compares with the truth.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Ticks in the truth.
    pub expected: usize,
    /// Ticks equal in every figure.
    pub matched: usize,
    /// Ticks in the truth the engine did not publish.
    pub missing: Vec<(String, i64)>,
    /// Ticks the engine published that the truth does not have.
    pub extra: Vec<(String, i64)>,
    /// Ticks whose figures differ: (truth, engine).
    pub different: Vec<(RoomStats, RoomStats)>,
}

impl Comparison {
    /// Whether everything matched.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} room-ticks equal the ground truth ({} missing, {} extra, {} different)",
            self.matched,
            self.expected,
            self.missing.len(),
            self.extra.len(),
            self.different.len()
        )
    }
}

/// Figures compared: everything but the id and the streamer (which the
/// engine learns from the first record that names it).
fn same_figures(a: &RoomStats, b: &RoomStats) -> bool {
    let strip = |s: &RoomStats| RoomStats {
        id: String::new(),
        streamer_id: String::new(),
        loudness_dbfs: 0.0,
        ..s.clone()
    };
    strip(a) == strip(b) && (a.loudness_dbfs - b.loudness_dbfs).abs() < 1e-9
}

impl GroundTruth {
    /// Compares engine outputs, keyed by (room, tick start), with the truth.
    pub fn compare(&self, actual: &BTreeMap<(String, i64), RoomStats>) -> Comparison {
        let expected = self.tick_map();
        let mut c = Comparison {
            expected: expected.len(),
            ..Comparison::default()
        };
        for (key, want) in expected {
            match actual.get(key) {
                None => c.missing.push(key.clone()),
                Some(got) if same_figures(want, got) => c.matched += 1,
                Some(got) => c.different.push((want.clone(), got.clone())),
            }
        }
        c.extra = actual
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .cloned()
            .collect();
        c
    }
}
