//! The simulated world: live rooms, their streamers, their latent excitement, and the
//! viewers who watch, chat, like and send gifts — generated deterministically from a
//! seed, with the ground truth ([`super::truth::GroundTruth`]) recorded as it goes.
//!
//! What it is for: feeding the engine (in-process or through Kafka) with input records
//! that behave like a real live-streaming platform's, at any rate (it doubles as the
//! load generator), and knowing exactly what the engine should find in them.
//!
//! What it is not for: encoding media (that is [`super::media`]), writing to Kafka or
//! the runtime (the callers do that with the events returned by
//! [`Simulator::advance`]), or computing the engine's own statistics (the truth here is
//! computed independently, from the events as they leave the simulator).
//!
//! # The model
//!
//! Time is cut into fixed internal steps of one second from `start_ms`; every step of
//! every room is generated in the same order whatever `until_ms` the caller advances
//! by, and each room draws from its own random streams (layout, viewers, chat, audio),
//! so a seed gives the same events however the run is chunked, and turning video or
//! audio on or off does not change the chat or the viewers. Randomness comes from
//! xoshiro256** seeded through SplitMix64, and every number that decides an event
//! uses only IEEE-exact arithmetic (the logarithm and exponential are computed here
//! from `+ - * /`), so a seed reproduces the same comments and actions on any machine.
//! Video and speech bytes also depend on the installed `ffmpeg` and `espeak-ng`.
//!
//! * **Excitement.** Each room has a latent excitement curve in `[0, 1]`: smooth value
//!   noise at three time scales (20 s, 5 s, 1.2 s) around a calm level of about 0.35,
//!   plus 1–3 *highlight moments* (5–15 s each, placed at random without overlap) where
//!   it builds up over 2 s, stays near 0.9 and decays over 4 s afterwards. The
//!   highlight intervals `[start, end)` are ground truth.
//! * **Video.** One MPEG-TS segment per `segment_ms` per room; each frame is a
//!   [`Scene`] sampled from the curve at the configured fps (brighter, faster, with
//!   confetti during highlights). Segments are encoded on up to two worker threads.
//! * **Audio.** 16 kHz mono PCM chunks: low-passed crowd/game noise whose amplitude
//!   follows excitement, a quiet 110 Hz hum, and the streamer's speech — phrases in
//!   English and Mandarin synthesised once per process with `espeak-ng`, about 10 dB
//!   over the noise as a streamer's microphone would be — mixed in with pauses that
//!   shorten (and phrases that turn to hype) as excitement rises. Every chunk has
//!   non-zero energy. Each utterance (room, event-time interval of its
//!   speech samples, language, and text: Chinese characters and the pinyin spoken for
//!   Mandarin) is ground truth; it enters the truth once the events are handed out up
//!   to its end.
//! * **Viewers.** Each room has a population of `viewers` users (`shared_viewers` of
//!   them from a pool shared with other rooms), each with an affinity to the streamer and a gifting
//!   level (a user trait: most never gift, a few whales do). Streamers belong to one
//!   of [`GENRES`] genres and users prefer one: affinity to a streamer of the
//!   preferred genre is raised, to others lowered, and pooled users are mostly
//!   placed in rooms of their genre, so users who gift to one streamer tend to gift
//!   to its genre's other streamers (the structure a gifting graph can find). An absent viewer gets
//!   feed impressions of the room (more often when it is exciting, and right after the
//!   broadcast starts for fans); an impression turns into an ENTER a few seconds later
//!   with a probability that grows with affinity and excitement. At ENTER the watch
//!   duration is drawn: short views (exponential, mean 16 s) or long views (30 s plus
//!   a Pareto tail), the long share rising with affinity and much more during a
//!   highlight; viewers present during a highlight may also stay longer. While
//!   present a viewer sends WATCH_PROGRESS every 5 s (and one at leaving with the
//!   remainder), LIKE bursts, rare SHAREs and FOLLOWs, and GIFTs (catalogue 1, 5, 10,
//!   52, 100, 520, 1314; cheap ones in combos) with a probability that grows with
//!   affinity, gifting level and the square of excitement. A user is never in two
//!   rooms at once, ENTER and LEAVE of a user in a room strictly alternate, and at
//!   `start + duration - 1` everyone still present leaves (after a final
//!   WATCH_PROGRESS).
//! * **Chat.** Comments arrive as a Poisson process whose rate is `comments_per_sec`
//!   times a factor of the excitement 2–5 s earlier (chat lags the picture), from
//!   viewers present at that instant (chatty fans more often), in English or Chinese
//!   (a user trait), with wording that turns from calm chat to hype as excitement
//!   rises. Each comment also yields an ACTION_KIND_COMMENT action at the same time.
//! * **Short videos** (only with [`SimConfig::short_videos`]). The same users scroll a
//!   short-video feed when they are not in a live room (the `shorts` module). They
//!   draw from their own random streams and only read the live visits, so turning
//!   them on changes no room event.
//!
//! Events of one `advance` are sorted by event time; ties are broken by room index,
//! then by generation order within the room (so a final WATCH_PROGRESS precedes its
//! LEAVE, and a comment precedes its COMMENT action); short-video actions come after
//! every room's events of the same millisecond, in generation order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::media::{self, Lang, MediaError, Scene, VideoSpec};
use super::shorts::{ShortVideos, Visits};
use super::truth::{GroundTruth, UtteranceTruth, ViewerTruth};
use crate::schema::{
    ActionKind, AudioChunk, AudioFormat, Comment, ShortVideoAction, VideoFormat, VideoSegment,
    ViewerAction,
};

/// Length of the internal generation step. Fixed, so that the events do not depend on
/// how callers chunk [`Simulator::advance`].
const STEP_MS: i64 = 1000;
/// Resolution of the comment process (its rate is re-evaluated every slice).
const SLICE_MS: i64 = 100;
/// Audio sample rate (PCM s16le mono).
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples per millisecond at [`SAMPLE_RATE`].
const SAMPLES_PER_MS: i64 = SAMPLE_RATE as i64 / 1000;
/// Interval between WATCH_PROGRESS heartbeats.
const HEARTBEAT_MS: i64 = 5_000;
/// Worker threads used to encode video segments.
const VIDEO_WORKERS: usize = 2;
/// Worker threads used to synthesise the speech phrases (mostly waiting on espeak-ng).
const SPEECH_WORKERS: usize = 4;
/// Excitement considered "calm average" when scaling the comment rate.
const CALM_EXCITEMENT: f64 = 0.35;
/// Excitement from which a viewer counts as watching a highlight.
const HIGHLIGHT_EXCITEMENT: f64 = 0.8;
/// Build-up before, and decay after, a highlight interval.
const RAMP_UP_MS: f64 = 2_000.0;
const DECAY_MS: f64 = 4_000.0;
/// Gift catalogue: (value, id).
const GIFTS: [(u64, &str); 7] = [
    (1, "rose"),
    (5, "finger-heart"),
    (10, "lollipop"),
    (52, "fireworks"),
    (100, "sports-car"),
    (520, "love-letter"),
    (1314, "castle"),
];

// ------------------------------------------------------------------ configuration

/// What to simulate. `Default` gives a small, complete run (8 rooms, 60 s, video,
/// audio and speech).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Which day of the seed's world to simulate. The world (rooms, streamers, their
    /// genres, viewer populations, affinities and gifting levels) depends on the seed
    /// only; the day decides the broadcast itself (highlights, excitement, who comes
    /// and what they do), so consecutive days give the history a model learns from.
    /// Day 0 is the seed's original broadcast.
    pub day: u32,
    /// Number of live rooms.
    pub rooms: u32,
    /// Event time of the first instant, ms since the epoch.
    pub start_ms: i64,
    /// Every room broadcasts over `[start_ms, start_ms + duration_ms)`.
    pub duration_ms: i64,
    /// Ground-truth tick length (ticks are aligned to the epoch).
    pub tick_ms: i64,
    /// Mean comments per second per room at average excitement.
    pub comments_per_sec: f64,
    /// Viewer population per room.
    pub viewers: u32,
    /// Share of each room's population drawn from a pool shared by all rooms (each
    /// pooled user belongs to about 4 rooms); the rest are the room's own users.
    pub shared_viewers: f64,
    /// Video size and frame rate; `None` for no video records at all.
    pub video: Option<VideoSpec>,
    /// Video segment length.
    pub segment_ms: i64,
    /// Audio chunk length (PCM s16le, 16 kHz, mono).
    pub audio_chunk_ms: i64,
    /// Whether to emit audio chunks.
    pub audio: bool,
    /// Whether the streamer's speech (espeak-ng) is mixed into the audio.
    pub speech: bool,
    /// 0: every video segment is drawn and encoded from its own scenes.
    /// n > 0: segments are drawn at one of n excitement levels (with or
    /// without the highlight overlay, in one of 4 palettes) and each such
    /// variant is encoded once and reused: the picture still follows the
    /// room's state, at a bounded encoding cost (ffmpeg start-up dominates).
    pub video_variants: u32,
    /// Whether the rooms' viewers also scroll short videos when they are not in a
    /// live room ([`SimEvent::ShortVideo`] actions, keyed by user). Off by default;
    /// turning it on leaves every room event as it was.
    pub short_videos: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            day: 0,
            rooms: 8,
            start_ms: 1_767_225_600_000,
            duration_ms: 60_000,
            tick_ms: 1000,
            comments_per_sec: 2.0,
            viewers: 40,
            shared_viewers: 0.2,
            video: Some(VideoSpec {
                width: 256,
                height: 144,
                fps: 5,
            }),
            segment_ms: 2000,
            audio_chunk_ms: 1000,
            audio: true,
            speech: true,
            video_variants: 0,
            short_videos: false,
        }
    }
}

/// Why the simulator could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration cannot be simulated.
    #[error("invalid simulator config: {0}")]
    Config(String),
    /// Encoding a video segment failed.
    #[error("encoding video segment {sequence} of {room_id} failed")]
    Video {
        /// Room of the segment.
        room_id: String,
        /// Sequence number of the segment.
        sequence: u64,
        /// What the encoder reported.
        #[source]
        source: MediaError,
    },
    /// Synthesising a speech phrase failed.
    #[error("synthesising speech {text:?} failed")]
    Speech {
        /// The phrase.
        text: &'static str,
        /// What the synthesiser reported.
        #[source]
        source: MediaError,
    },
    /// A worker thread panicked.
    #[error("a simulator worker thread panicked")]
    WorkerPanicked,
    /// An earlier `advance` failed; the simulator's state is no longer consistent.
    #[error("the simulator failed earlier and cannot continue")]
    Poisoned,
}

// ------------------------------------------------------------------ events

/// One input record, as the engine receives it.
#[derive(Clone, Debug, PartialEq)]
pub enum SimEvent {
    /// A video segment (topic `video`).
    Video(VideoSegment),
    /// An audio chunk (topic `audio`).
    Audio(AudioChunk),
    /// A chat message (topic `comments`).
    Comment(Comment),
    /// A viewer action (topic `actions`).
    Action(ViewerAction),
    /// A user's action on a short video (topic `short-video-actions`, keyed by
    /// user); only with [`SimConfig::short_videos`].
    ShortVideo(ShortVideoAction),
}

impl SimEvent {
    /// The room the record belongs to; `""` for a short-video action, which
    /// belongs to no room.
    pub fn room_id(&self) -> &str {
        match self {
            SimEvent::Video(v) => &v.room_id,
            SimEvent::Audio(a) => &a.room_id,
            SimEvent::Comment(c) => &c.room_id,
            SimEvent::Action(a) => &a.room_id,
            SimEvent::ShortVideo(_) => "",
        }
    }

    /// The record's Kafka key: the room id for room events, the user id for a
    /// short-video action.
    pub fn key(&self) -> &str {
        match self {
            SimEvent::ShortVideo(s) => &s.user_id,
            other => other.room_id(),
        }
    }

    /// The record's event time (start time for media).
    pub fn event_time_ms(&self) -> i64 {
        match self {
            SimEvent::Video(v) => v.start_time_ms,
            SimEvent::Audio(a) => a.start_time_ms,
            SimEvent::Comment(c) => c.event_time_ms,
            SimEvent::Action(a) => a.event_time_ms,
            SimEvent::ShortVideo(s) => s.event_time_ms,
        }
    }
}

/// A room as the simulator built it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    /// `room-0007`.
    pub room_id: String,
    /// `streamer-0007`.
    pub streamer_id: String,
    /// Highlight intervals `[start_ms, end_ms)` in event time, sorted, disjoint: 1–3
    /// of 5–15 s each, at least 4 s from either end of the broadcast (a broadcast
    /// shorter than 20 s gets one highlight a third of its length).
    pub highlights: Vec<(i64, i64)>,
    /// How far the chat lags the picture in this room.
    pub chat_lag_ms: i64,
}

// ------------------------------------------------------------------ PRNG and math

/// SplitMix64 finaliser: a strong 64-bit mixing function.
pub(super) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` that depends only on its three inputs.
pub(super) fn hash01(a: u64, b: u64, c: i64) -> f64 {
    let h = mix64(a ^ mix64(b ^ mix64(c as u64)));
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// xoshiro256** — small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from one 64-bit value (through SplitMix64).
    pub fn seeded(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut s = [next(), next(), next(), next()];
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s }
    }

    /// An independent stream for (seed, entity, purpose).
    pub fn stream(seed: u64, entity: u64, purpose: u64) -> Rng {
        Rng::seeded(mix64(
            seed ^ mix64(entity ^ mix64(purpose.wrapping_mul(0xA24B_AED4_963E_E407))),
        ))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below((hi - lo) as u64) as i64
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * det_ln(1.0 - self.f64())
    }

    /// Approximately standard normal (Irwin–Hall with 12 terms).
    pub fn normal(&mut self) -> f64 {
        let mut s = 0.0;
        for _ in 0..12 {
            s += self.f64();
        }
        s - 6.0
    }

    /// Poisson with the given mean (normal approximation above 30).
    pub fn poisson(&mut self, mean: f64) -> u32 {
        if mean <= 0.0 || !mean.is_finite() {
            return 0;
        }
        if mean > 30.0 {
            let x = (mean + mean.sqrt() * self.normal()).round();
            return if x <= 0.0 {
                0
            } else {
                x.min(u32::MAX as f64) as u32
            };
        }
        let limit = det_exp(-mean);
        let mut k = 0u32;
        let mut p = self.f64();
        while p > limit {
            k += 1;
            p *= self.f64();
        }
        k
    }
}

/// Natural logarithm from basic arithmetic only (bit-identical on every IEEE-754
/// machine, unlike the platform's libm). `x` must be positive and finite; anything
/// else gives a very negative number.
fn det_ln(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return -745.0;
    }
    let mut x = x;
    let mut e = 0i64;
    if x < f64::MIN_POSITIVE {
        x *= (1u64 << 54) as f64;
        e -= 54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(z), z = (m-1)/(m+1), |z| <= 0.172.
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    let mut term = z;
    let mut sum = 0.0;
    let mut k = 1.0;
    for _ in 0..12 {
        sum += term / k;
        term *= z2;
        k += 2.0;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

/// Exponential from basic arithmetic only (see [`det_ln`]); clamped to the normal
/// range of `f64`.
fn det_exp(x: f64) -> f64 {
    if x.is_nan() {
        return 0.0;
    }
    let x = x.clamp(-700.0, 700.0);
    let k = (x / std::f64::consts::LN_2).round();
    let r = x - k * std::f64::consts::LN_2;
    // Taylor series of e^r, |r| <= 0.347, Horner form.
    let mut p = 1.0;
    let mut i = 16.0;
    while i >= 1.0 {
        p = 1.0 + p * r / i;
        i -= 1.0;
    }
    let k = k as i64;
    p * f64::from_bits(((k + 1023) as u64) << 52)
}

/// Smooth value noise in `[0, 1]` at position `x` (knots at integers).
fn value_noise(seed: u64, octave: u64, x: f64) -> f64 {
    let i = x.floor();
    let f = x - i;
    let i = i as i64;
    let a = hash01(seed, octave, i);
    let b = hash01(seed, octave, i + 1);
    let s = f * f * (3.0 - 2.0 * f);
    a + (b - a) * s
}

// ------------------------------------------------------------------ text

const EN_CALM: &[&str] = &[
    "hi everyone",
    "hello from Berlin",
    "what game is this?",
    "nice stream",
    "how long have you been playing?",
    "gg",
    "lol",
    "what rank are you?",
    "love the music",
    "first time here",
    "good evening",
    "say hi to me please",
    "chill vibes tonight",
    "what's your setup?",
    "just lurking",
    "is this ranked?",
    "hello streamer",
    "the graphics look nice",
];
const EN_HYPE: &[&str] = &[
    "WOW",
    "NO WAY",
    "insane!!!",
    "clip it!",
    "let's gooo",
    "that was crazy",
    "what a play",
    "OMG",
    "HUGE",
    "clutch!",
    "unbelievable",
    "GOAT",
    "best stream ever",
    "I can't believe it",
];
const ZH_CALM: &[&str] = &[
    "主播好",
    "大家好",
    "来了来了",
    "这是什么游戏？",
    "主播今天播多久？",
    "背景音乐好听",
    "晚上好",
    "第一次来",
    "已关注",
    "主播加油",
    "哈哈哈",
    "在吗",
    "支持一下",
    "画质不错",
    "主播是哪里人？",
    "今天打到几点？",
    "路过看看",
];
const ZH_HYPE: &[&str] = &[
    "太精彩了！",
    "666666",
    "卧槽！",
    "牛啊！",
    "太强了",
    "名场面！",
    "啊啊啊啊啊",
    "绝了",
    "神操作！",
    "这波可以",
    "起飞！",
    "好家伙",
    "封神了",
    "泪目了",
];
const EN_EMPHASIS: &[&str] = &["!", "!!!", " 🔥", " 🔥🔥🔥", " xD"];
const ZH_EMPHASIS: &[&str] = &["！！", "666", "🔥", "～～", "哈哈哈"];

/// The streamer's lines: (spoken text, language, hype, written text). English is
/// spoken and written the same (the written text is `None`); Mandarin is spoken as
/// pinyin with tone numbers and written in Chinese characters, one per syllable, with
/// a full-width comma where the pinyin has a comma. Order matters: a line is picked by
/// its index among the lines of its language and kind, so reordering or inserting
/// lines changes the audio of every seed.
const PHRASES: &[(&str, Lang, bool, Option<&str>)] = &[
    (
        "hey everyone, welcome back to the stream",
        Lang::En,
        false,
        None,
    ),
    (
        "thanks for the follow, really appreciate it",
        Lang::En,
        false,
        None,
    ),
    ("let me check the map real quick", Lang::En, false, None),
    (
        "we are going to play a few more rounds tonight",
        Lang::En,
        false,
        None,
    ),
    ("don't forget to hit the like button", Lang::En, false, None),
    ("okay, let's see what we have here", Lang::En, false, None),
    ("this round should be pretty easy", Lang::En, false, None),
    (
        "someone asked about my settings, I'll show them later",
        Lang::En,
        false,
        None,
    ),
    (
        "let's grab some items before the next fight",
        Lang::En,
        false,
        None,
    ),
    (
        "chat, what do you think we should do",
        Lang::En,
        false,
        None,
    ),
    ("oh my god, did you see that", Lang::En, true, None),
    ("let's go, that was insane", Lang::En, true, None),
    ("clip that right now", Lang::En, true, None),
    ("no way, no way, we actually won", Lang::En, true, None),
    ("that was the best play of the night", Lang::En, true, None),
    ("thank you so much for the gift", Lang::En, true, None),
    ("here they come, get ready", Lang::En, true, None),
    ("unbelievable, what a comeback", Lang::En, true, None),
    (
        "huan1 ying2 da4 jia1 lai2 dao4 zhi2 bo1 jian1",
        Lang::Zh,
        false,
        Some("欢迎大家来到直播间"),
    ),
    (
        "xie4 xie4 da4 jia1 de5 guan1 zhu4",
        Lang::Zh,
        false,
        Some("谢谢大家的关注"),
    ),
    (
        "wo3 men2 xian1 kan4 yi2 xia4 di4 tu2",
        Lang::Zh,
        false,
        Some("我们先看一下地图"),
    ),
    (
        "ji4 de2 dian3 zan4 he2 fen1 xiang3",
        Lang::Zh,
        false,
        Some("记得点赞和分享"),
    ),
    (
        "zhe4 yi4 ju2 ying1 gai1 bu2 tai4 nan2",
        Lang::Zh,
        false,
        Some("这一局应该不太难"),
    ),
    (
        "jin1 tian1 wo3 men2 duo1 da3 ji3 ju2",
        Lang::Zh,
        false,
        Some("今天我们多打几局"),
    ),
    (
        "you3 ren2 wen4 wo3 de5 she4 zhi4",
        Lang::Zh,
        false,
        Some("有人问我的设置"),
    ),
    (
        "xian1 qu4 na2 yi4 dian3 zhuang1 bei4",
        Lang::Zh,
        false,
        Some("先去拿一点装备"),
    ),
    (
        "da4 jia1 jue2 de2 zen3 me5 da3 bi3 jiao4 hao3",
        Lang::Zh,
        false,
        Some("大家觉得怎么打比较好"),
    ),
    (
        "wo3 men2 man4 man4 lai2",
        Lang::Zh,
        false,
        Some("我们慢慢来"),
    ),
    ("tai4 jing1 cai3 le5", Lang::Zh, true, Some("太精彩了")),
    (
        "wo3 de5 tian1 a5, ni3 men2 kan4 dao4 le5 ma5",
        Lang::Zh,
        true,
        Some("我的天啊，你们看到了吗"),
    ),
    ("ying2 le5, ying2 le5", Lang::Zh, true, Some("赢了，赢了")),
    (
        "zhe4 bo1 tai4 qiang2 le5",
        Lang::Zh,
        true,
        Some("这波太强了"),
    ),
    (
        "kuai4 jie2 tu2, kuai4 jie2 tu2",
        Lang::Zh,
        true,
        Some("快截图，快截图"),
    ),
    (
        "xie4 xie4 lao3 tie3 de5 li3 wu4",
        Lang::Zh,
        true,
        Some("谢谢老铁的礼物"),
    ),
    (
        "lai2 le5 lai2 le5, zhun3 bei4 hao3",
        Lang::Zh,
        true,
        Some("来了来了，准备好"),
    ),
    (
        "bu4 ke3 si1 yi4, zhen1 de5 fan1 pan2 le5",
        Lang::Zh,
        true,
        Some("不可思议，真的翻盘了"),
    ),
];

/// The language code of the ground truth (`"en"`, `"zh"`).
fn lang_code(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "en",
        Lang::Zh => "zh",
    }
}

/// The ground truth of an utterance of line `phrase` of [`PHRASES`] in `room_id` over
/// `[start_ms, end_ms)`.
fn utterance(room_id: &str, phrase: usize, start_ms: i64, end_ms: i64) -> UtteranceTruth {
    let (spoken, lang, _, written) =
        PHRASES
            .get(phrase)
            .copied()
            .unwrap_or(("", Lang::En, false, None));
    UtteranceTruth {
        room_id: room_id.to_owned(),
        start_ms,
        end_ms,
        lang: lang_code(lang).to_owned(),
        text: written.unwrap_or(spoken).to_owned(),
        pinyin: written.map(|_| spoken.to_owned()),
    }
}

/// A synthesised phrase.
struct Phrase {
    lang: Lang,
    hype: bool,
    samples: Vec<i16>,
}

/// Phrases are synthesised once per process and shared by every simulator.
static SPEECH_CACHE: Mutex<Option<Arc<Vec<Phrase>>>> = Mutex::new(None);

fn speech_phrases() -> Result<Arc<Vec<Phrase>>, SimError> {
    let mut guard = SPEECH_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = guard.as_ref() {
        return Ok(Arc::clone(p));
    }
    let next = AtomicUsize::new(0);
    type Done = Vec<(usize, Result<Vec<i16>, MediaError>)>;
    let results: Vec<Done> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..SPEECH_WORKERS.min(PHRASES.len()))
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(text, lang, _, _)) = PHRASES.get(i) else {
                            break;
                        };
                        out.push((i, media::synthesize_speech(text, lang)));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|_| SimError::WorkerPanicked)?;
    let mut slots: Vec<Option<Vec<i16>>> = PHRASES.iter().map(|_| None).collect();
    for (i, r) in results.into_iter().flatten() {
        let samples = r.map_err(|source| SimError::Speech {
            text: PHRASES[i].0,
            source,
        })?;
        slots[i] = Some(samples);
    }
    let mut phrases = Vec::with_capacity(PHRASES.len());
    for (slot, &(_, lang, hype, _)) in slots.into_iter().zip(PHRASES) {
        let samples = slot.ok_or(SimError::WorkerPanicked)?;
        phrases.push(Phrase {
            lang,
            hype,
            samples,
        });
    }
    let phrases = Arc::new(phrases);
    *guard = Some(Arc::clone(&phrases));
    Ok(phrases)
}

// ------------------------------------------------------------------ rooms

/// The latent excitement of a room over time.
#[derive(Clone, Debug)]
struct Curve {
    start_ms: i64,
    seed: u64,
    /// Highlight intervals, relative to `start_ms`.
    highlights: Vec<(f64, f64)>,
}

impl Curve {
    fn at(&self, t_ms: i64) -> f64 {
        let rel = (t_ms - self.start_ms) as f64;
        let n1 = value_noise(self.seed, 1, rel / 20_000.0);
        let n2 = value_noise(self.seed, 2, rel / 5_000.0);
        let n3 = value_noise(self.seed, 3, rel / 1_200.0);
        let base = 0.08 + 0.34 * n1 + 0.14 * n2 + 0.06 * n3;
        let mut h: f64 = 0.0;
        for &(s, e) in &self.highlights {
            if rel >= s - RAMP_UP_MS && rel < s {
                h = h.max(0.9 * (rel - (s - RAMP_UP_MS)) / RAMP_UP_MS);
            } else if rel >= s && rel < e {
                h = h.max(0.86 + 0.12 * n3);
            } else if rel >= e && rel < e + DECAY_MS {
                h = h.max(0.9 * (1.0 - (rel - e) / DECAY_MS));
            }
        }
        base.max(h).clamp(0.0, 1.0)
    }

    fn in_highlight(&self, t_ms: i64) -> bool {
        let rel = (t_ms - self.start_ms) as f64;
        self.highlights.iter().any(|&(s, e)| rel >= s && rel < e)
    }
}

#[derive(Clone, Copy, Debug)]
enum ViewerState {
    Away,
    /// Saw an impression and will try to enter at `enter_at`.
    Pending {
        enter_at: i64,
    },
    Present {
        enter_ms: i64,
        last_hb: i64,
        leave_at: i64,
    },
}

#[derive(Clone, Debug)]
struct Viewer {
    user: u32,
    user_id: String,
    affinity: f64,
    gift_level: f64,
    zh: bool,
    followed: bool,
    /// No impression before this time (just left, or scrolled past).
    cooldown_until: i64,
    state: ViewerState,
}

/// The phrase being spoken (it can span chunks and steps).
#[derive(Clone, Debug)]
struct Speaking {
    /// Index into [`PHRASES`].
    phrase: usize,
    /// Playback position in the phrase's samples (advances by the room's voice rate).
    pos: f64,
    gain: f64,
    /// Event time of the first sample, for the ground truth.
    start_ms: i64,
}

#[derive(Clone, Debug)]
struct AudioState {
    rng: Rng,
    lowpass: f64,
    amp: f64,
    target: f64,
    hum_phase: u32,
    speaking: Option<Speaking>,
    next_talk_ms: i64,
}

struct Room {
    curve: Curve,
    zh_streamer: bool,
    voice_rate: f64,
    viewers: Vec<Viewer>,
    /// Viewers present at the end of the last generated step (indices into `viewers`).
    present: Vec<u32>,
    rng_viewers: Rng,
    rng_chat: Rng,
    audio: AudioState,
    comment_seq: u64,
}

/// Sort key of a generated event: (event time, room index, generation order, slot).
type Key = (i64, u32, u32, u32);

/// The "room index" of short-video actions in a [`Key`]: after every room.
const SHORTS_LANE: u32 = u32::MAX;

/// Events of one generation pass, before sorting.
#[derive(Default)]
struct Staging {
    events: Vec<Option<SimEvent>>,
    keys: Vec<Key>,
}

impl Staging {
    fn push(&mut self, room: u32, seq: &mut u32, ev: SimEvent) -> usize {
        let slot = self.events.len();
        self.keys
            .push((ev.event_time_ms(), room, *seq, slot as u32));
        *seq += 1;
        self.events.push(Some(ev));
        slot
    }
}

/// A video segment waiting for its payload.
struct VideoJob {
    slot: usize,
    room_id: String,
    sequence: u64,
    scenes: Vec<Scene>,
}

/// Everything a room step needs that is not the room itself.
struct StepCtx<'a> {
    info: &'a RoomInfo,
    room_ix: u32,
    s: i64,
    e: i64,
    end_ms: i64,
    start_ms: i64,
}

// ------------------------------------------------------------------ the simulator

/// The simulated world. See the module documentation for the model.
pub struct Simulator {
    cfg: SimConfig,
    end_ms: i64,
    rooms: Vec<Room>,
    infos: Vec<RoomInfo>,
    /// Per user: the scheduled LEAVE of the room they are in (a user enters a room only
    /// after it), so no user is in two rooms at once.
    busy_until: Vec<i64>,
    /// Per user, with short videos on (empty otherwise): the last two live visits,
    /// which the feed must not overlap.
    visits: Vec<Visits>,
    /// The short-video feed, with short videos on.
    shorts: Option<ShortVideos>,
    phrases: Option<Arc<Vec<Phrase>>>,
    /// Events are generated up to here (a step boundary or the end).
    gen_until: i64,
    /// Events before this were returned.
    cursor: i64,
    pending: VecDeque<(u32, SimEvent)>,
    /// Most events seen in one step (a capacity hint).
    events_per_step: usize,
    truth: GroundTruth,
    poisoned: bool,
    /// Encoded video variants (see [`SimConfig::video_variants`]).
    video_cache: HashMap<VariantKey, Vec<u8>>,
    /// Utterances generated to their end but not yet in the truth: one goes there once
    /// the cursor reaches its end (all the audio carrying it has been handed out).
    spoken: Vec<UtteranceTruth>,
}

/// (palette, excitement level, highlight, frames).
type VariantKey = (u64, u32, bool, usize);

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("cfg", &self.cfg)
            .field("cursor", &self.cursor)
            .field("rooms", &self.infos.len())
            .finish_non_exhaustive()
    }
}

fn validate(cfg: &SimConfig) -> Result<i64, SimError> {
    let bad = |m: String| Err(SimError::Config(m));
    if cfg.duration_ms <= 0 {
        return bad(format!(
            "duration_ms must be positive, got {}",
            cfg.duration_ms
        ));
    }
    let Some(end) = cfg.start_ms.checked_add(cfg.duration_ms) else {
        return bad("start_ms + duration_ms overflows".into());
    };
    if end > i64::MAX / 4 || cfg.start_ms < i64::MIN / 4 {
        return bad("start_ms/duration_ms out of range".into());
    }
    if cfg.tick_ms <= 0 || cfg.tick_ms > i64::from(u32::MAX) {
        return bad(format!(
            "tick_ms must be in 1..=u32::MAX, got {}",
            cfg.tick_ms
        ));
    }
    if !(0.0..=1.0).contains(&cfg.shared_viewers) {
        return bad(format!(
            "shared_viewers must be in 0..=1, got {}",
            cfg.shared_viewers
        ));
    }
    if cfg.segment_ms <= 0 || cfg.segment_ms > i64::from(u32::MAX) {
        return bad(format!(
            "segment_ms must be in 1..=u32::MAX, got {}",
            cfg.segment_ms
        ));
    }
    if cfg.audio_chunk_ms <= 0 || cfg.audio_chunk_ms > 600_000 {
        return bad(format!(
            "audio_chunk_ms must be in 1..=600000, got {}",
            cfg.audio_chunk_ms
        ));
    }
    if !cfg.comments_per_sec.is_finite() || cfg.comments_per_sec < 0.0 {
        return bad(format!(
            "comments_per_sec must be finite and >= 0, got {}",
            cfg.comments_per_sec
        ));
    }
    if u64::from(cfg.rooms) * u64::from(cfg.viewers) > (1 << 31) {
        return bad("rooms * viewers must be at most 2^31".into());
    }
    if let Some(v) = cfg.video {
        if v.width == 0 || v.height == 0 || v.width % 2 != 0 || v.height % 2 != 0 {
            return bad(format!(
                "video size must be even and non-zero, got {}x{}",
                v.width, v.height
            ));
        }
        if v.fps == 0 || v.fps > 120 {
            return bad(format!("video fps must be in 1..=120, got {}", v.fps));
        }
    }
    Ok(end)
}

/// Number of streamer genres (see the module docs).
pub const GENRES: u32 = 5;

/// The genre of room `r`'s streamer.
pub(super) fn streamer_genre(seed: u64, r: usize) -> u32 {
    ((hash01(seed, 21, r as i64) * f64::from(GENRES)) as u32).min(GENRES - 1)
}

/// The genre user `user` prefers.
pub(super) fn user_genre(seed: u64, user: u32) -> u32 {
    ((hash01(seed, 22, i64::from(user)) * f64::from(GENRES)) as u32).min(GENRES - 1)
}

/// Places 1–3 disjoint highlights of 5–15 s in `[0, duration)`, relative to the start.
fn place_highlights(rng: &mut Rng, duration_ms: i64) -> Vec<(i64, i64)> {
    const MIN_GAP: i64 = 6_000;
    const MARGIN: i64 = 4_000;
    if duration_ms < 20_000 {
        // Too short for the usual layout: one highlight in the middle third.
        let len = (duration_ms / 3).max(1);
        let s = rng.range(
            duration_ms / 3,
            (duration_ms - len).max(duration_ms / 3 + 1),
        );
        return vec![(s, (s + len).min(duration_ms))];
    }
    let avail = duration_ms - 2 * MARGIN;
    let mut n = 1 + rng.below(3) as usize;
    let mut lens: Vec<i64> = (0..3).map(|_| rng.range(5_000, 15_001)).collect();
    loop {
        let need: i64 = lens[..n].iter().sum::<i64>() + (n as i64 - 1) * MIN_GAP;
        if need <= avail || n == 1 {
            break;
        }
        n -= 1;
    }
    lens.truncate(n);
    if lens[0] > avail {
        lens[0] = avail.max(1);
    }
    let slack = avail - lens.iter().sum::<i64>() - (n as i64 - 1) * MIN_GAP;
    let weights: Vec<f64> = (0..=n).map(|_| 0.05 + rng.f64()).collect();
    let wsum: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(n);
    let mut t = MARGIN;
    for (i, len) in lens.iter().enumerate() {
        t += (slack.max(0) as f64 * weights[i] / wsum) as i64;
        if i > 0 {
            t += MIN_GAP;
        }
        out.push((t, t + len));
        t += len;
    }
    out
}

impl Simulator {
    /// Builds the world: rooms, curves, highlights and viewer populations; synthesises
    /// the speech phrases (once per process) when audio and speech are on.
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        let end_ms = validate(&cfg)?;
        let seed = cfg.seed;
        let n_rooms = cfg.rooms as usize;
        let viewers = cfg.viewers as usize;
        // User population: each room has its own users plus a slice of a shared pool
        // (`shared_viewers` of the room's viewers); a pooled user is in about 4 rooms.
        let shared_n = if n_rooms > 1 {
            ((viewers as f64 * cfg.shared_viewers) as usize).min(viewers)
        } else {
            0
        };
        let own_n = viewers - shared_n;
        let pool_n = shared_n.max(n_rooms * shared_n / 4);
        let own_total = n_rooms * own_n;
        let mut pool: Vec<u32> = (0..pool_n as u32).collect();
        let mut pool_rng = Rng::stream(seed, u64::MAX, 7);
        // The broadcast of `cfg.day`: day 0 draws from the seed itself.
        let day_seed = if cfg.day == 0 {
            seed
        } else {
            mix64(seed ^ mix64(0xDA1_u64 << 32 | u64::from(cfg.day)))
        };
        let user_traits = |user: u32| -> (f64, bool) {
            let u = hash01(seed, 11, i64::from(user));
            let whale = hash01(seed, 12, i64::from(user)) < 0.04;
            let level = if whale {
                0.6 + 0.4 * u
            } else {
                0.25 * u * u * u
            };
            (level, hash01(seed, 13, i64::from(user)) < 0.62)
        };

        let mut rooms = Vec::with_capacity(n_rooms);
        let mut infos = Vec::with_capacity(n_rooms);
        let mut truth = GroundTruth::new(cfg.tick_ms);
        for r in 0..n_rooms {
            let mut layout = Rng::stream(seed, r as u64, 1);
            let room_id = format!("room-{r:04}");
            let streamer_id = format!("streamer-{r:04}");
            let day0 = place_highlights(&mut layout, cfg.duration_ms);
            let rel = if cfg.day == 0 {
                day0
            } else {
                place_highlights(&mut Rng::stream(day_seed, r as u64, 5), cfg.duration_ms)
            };
            let genre = streamer_genre(seed, r);
            let highlights: Vec<(i64, i64)> = rel
                .iter()
                .map(|&(s, e)| (cfg.start_ms + s, cfg.start_ms + e))
                .collect();
            let chat_lag_ms = layout.range(2_000, 5_001);
            let curve = Curve {
                start_ms: cfg.start_ms,
                seed: mix64(day_seed ^ mix64(r as u64 ^ 0x5EED)),
                highlights: rel.iter().map(|&(s, e)| (s as f64, e as f64)).collect(),
            };
            let zh_streamer = layout.chance(0.6);
            let voice_rate = 0.9 + 0.22 * layout.f64();

            // Pick this room's shared users (partial Fisher–Yates over the pool),
            // mostly among those who prefer the room's genre: a pooled user's
            // rooms cluster in the genre it likes, as a platform's feed would.
            let mut users: Vec<u32> = (0..own_n).map(|j| (r * own_n + j) as u32).collect();
            for j in 0..shared_n {
                let mut k = j + pool_rng.below((pool_n - j) as u64) as usize;
                for _ in 0..8 {
                    let user = own_total as u32 + pool[k];
                    if user_genre(seed, user) == genre || pool_rng.chance(0.2) {
                        break;
                    }
                    k = j + pool_rng.below((pool_n - j) as u64) as usize;
                }
                pool.swap(j, k);
                users.push(own_total as u32 + pool[j]);
            }
            let mut vrs = Vec::with_capacity(users.len());
            for user in users {
                let (gift_level, zh) = user_traits(user);
                let u = layout.f64();
                let base = if layout.chance(0.08) {
                    0.7 + 0.3 * u
                } else {
                    0.6 * u * u
                };
                let affinity = if user_genre(seed, user) == genre {
                    (0.15 + 1.5 * base).min(1.0)
                } else {
                    0.6 * base
                };
                vrs.push(Viewer {
                    user,
                    user_id: format!("user-{user:06}"),
                    affinity,
                    gift_level,
                    zh,
                    followed: false,
                    cooldown_until: cfg.start_ms,
                    state: ViewerState::Away,
                });
            }
            let info = RoomInfo {
                room_id,
                streamer_id,
                highlights,
                chat_lag_ms,
            };
            truth.add_room(&info.room_id, &info.streamer_id, &info.highlights);
            truth.add_streamer(&info.streamer_id, genre);
            for v in &vrs {
                truth.add_viewer(ViewerTruth {
                    room_id: info.room_id.clone(),
                    user_id: v.user_id.clone(),
                    affinity: v.affinity,
                    gift_level: v.gift_level,
                    genre: user_genre(seed, v.user),
                });
            }
            let next_talk_ms = cfg.start_ms + layout.range(0, 3_000);
            rooms.push(Room {
                curve,
                zh_streamer,
                voice_rate,
                viewers: vrs,
                present: Vec::new(),
                rng_viewers: Rng::stream(day_seed, r as u64, 2),
                rng_chat: Rng::stream(day_seed, r as u64, 3),
                audio: AudioState {
                    rng: Rng::stream(day_seed, r as u64, 4),
                    lowpass: 0.0,
                    amp: 220.0,
                    target: 220.0,
                    hum_phase: 0,
                    speaking: None,
                    next_talk_ms,
                },
                comment_seq: 0,
            });
            infos.push(info);
        }
        let phrases = if cfg.audio && cfg.speech {
            Some(speech_phrases()?)
        } else {
            None
        };
        let n_users = own_total + pool_n;
        let (visits, shorts) = if cfg.short_videos {
            // Every user in some room's population, with the rooms and affinities.
            let mut of_user: Vec<Vec<(u32, f64)>> = vec![Vec::new(); n_users];
            for (r, room) in rooms.iter().enumerate() {
                for v in &room.viewers {
                    if let Some(list) = of_user.get_mut(v.user as usize) {
                        list.push((r as u32, v.affinity));
                    }
                }
            }
            let users = of_user
                .into_iter()
                .enumerate()
                .filter(|(_, rooms)| !rooms.is_empty())
                .map(|(u, rooms)| (u as u32, rooms))
                .collect();
            let streamers = infos
                .iter()
                .enumerate()
                .map(|(r, i)| (i.streamer_id.clone(), streamer_genre(seed, r)))
                .collect();
            (
                vec![Visits::default(); n_users],
                Some(ShortVideos::new(
                    seed,
                    day_seed,
                    cfg.start_ms,
                    end_ms,
                    streamers,
                    users,
                )),
            )
        } else {
            (Vec::new(), None)
        };
        Ok(Simulator {
            busy_until: vec![i64::MIN; n_users],
            visits,
            shorts,
            end_ms,
            rooms,
            infos,
            phrases,
            gen_until: cfg.start_ms,
            cursor: cfg.start_ms,
            pending: VecDeque::new(),
            events_per_step: 0,
            truth,
            poisoned: false,
            video_cache: HashMap::new(),
            spoken: Vec::new(),
            cfg,
        })
    }

    /// Returns every event with event time in `[previous until, until_ms)` (clamped to
    /// the broadcast), sorted by event time (ties: room index, then generation order),
    /// and records them in the ground truth. Ticks of the truth are closed, and the
    /// streamers' utterances added to it, once `until_ms` reaches their end. After an
    /// error the simulator is unusable.
    ///
    /// Events are generated one internal second at a time, so memory grows with the
    /// span asked for: a load generator should advance in small steps.
    pub fn advance(&mut self, until_ms: i64) -> Result<Vec<SimEvent>, SimError> {
        if self.poisoned {
            return Err(SimError::Poisoned);
        }
        let until = until_ms.min(self.end_ms);
        if until <= self.cursor {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        while let Some((_, ev)) = self.pending.front() {
            if ev.event_time_ms() >= until {
                break;
            }
            if let Some((room, ev)) = self.pending.pop_front() {
                self.truth.record(room as usize, &ev);
                out.push(ev);
            }
        }
        if self.gen_until < until {
            self.poisoned = true;
            let (mut events, keys) = self.generate(until)?;
            self.poisoned = false;
            // Older pending events all precede the new ones; if some are still
            // pending, so are all new ones.
            let direct = self.pending.is_empty();
            out.reserve(keys.len());
            for (t, room, _, slot) in keys {
                let Some(ev) = events[slot as usize].take() else {
                    continue;
                };
                if direct && t < until {
                    self.truth.record(room as usize, &ev);
                    out.push(ev);
                } else {
                    self.pending.push_back((room, ev));
                }
            }
        }
        self.cursor = until;
        if self.spoken.iter().any(|u| u.end_ms <= until) {
            let (done, later) = std::mem::take(&mut self.spoken)
                .into_iter()
                .partition(|u| u.end_ms <= until);
            self.spoken = later;
            for u in done {
                self.truth.add_utterance(u);
            }
        }
        if until >= self.end_ms {
            self.truth.close_all();
        } else {
            self.truth.close_until(until);
        }
        Ok(out)
    }

    /// Whether the whole broadcast has been returned.
    pub fn finished(&self) -> bool {
        self.cursor >= self.end_ms
    }

    /// The ground truth of the events returned so far (ticks appear once complete).
    pub fn truth(&self) -> &GroundTruth {
        &self.truth
    }

    /// The rooms: ids, streamers, highlight intervals.
    pub fn rooms(&self) -> &[RoomInfo] {
        &self.infos
    }

    /// The configuration simulated.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// End of the broadcast (exclusive), `start_ms + duration_ms`.
    pub fn end_ms(&self) -> i64 {
        self.end_ms
    }

    /// Events before this time have been returned.
    pub fn cursor_ms(&self) -> i64 {
        self.cursor
    }

    /// The latent excitement of room `room` (index into [`Simulator::rooms`]) at
    /// `t_ms`, in `[0, 1]`; `None` for an unknown room.
    pub fn excitement(&self, room: usize, t_ms: i64) -> Option<f64> {
        self.rooms.get(room).map(|r| r.curve.at(t_ms))
    }

    /// Generates whole steps until `gen_until >= until`; returns the events and their
    /// sort keys, sorted.
    #[allow(clippy::type_complexity)]
    fn generate(&mut self, until: i64) -> Result<(Vec<Option<SimEvent>>, Vec<Key>), SimError> {
        let steps = (until - self.gen_until + STEP_MS - 1) / STEP_MS;
        let hint = (self.events_per_step * steps.max(1) as usize).min(1 << 20);
        let mut staging = Staging {
            events: Vec::with_capacity(hint),
            keys: Vec::with_capacity(hint),
        };
        let mut jobs = Vec::new();
        while self.gen_until < until {
            let s = self.gen_until;
            let e = (s + STEP_MS).min(self.end_ms);
            let before = staging.events.len();
            self.generate_step(s, e, &mut staging, &mut jobs);
            self.events_per_step = self.events_per_step.max(staging.events.len() - before);
            self.gen_until = e;
        }
        if let Some(spec) = self.cfg.video {
            let payloads = match self.cfg.video_variants {
                0 => encode_all(&spec, &jobs)?,
                n => self.encode_variants(&spec, n, &jobs)?,
            };
            for (job, payload) in jobs.iter().zip(payloads) {
                if let Some(Some(SimEvent::Video(v))) = staging.events.get_mut(job.slot) {
                    v.payload = payload;
                }
            }
        }
        let Staging { events, mut keys } = staging;
        keys.sort_unstable();
        Ok((events, keys))
    }

    fn generate_step(&mut self, s: i64, e: i64, out: &mut Staging, jobs: &mut Vec<VideoJob>) {
        let cfg = &self.cfg;
        for (r, (room, info)) in self.rooms.iter_mut().zip(&self.infos).enumerate() {
            let ctx = StepCtx {
                info,
                room_ix: r as u32,
                s,
                e,
                end_ms: self.end_ms,
                start_ms: cfg.start_ms,
            };
            let mut seq = 0u32;
            if let Some(spec) = cfg.video {
                gen_video(&ctx, room, &spec, cfg.segment_ms, out, &mut seq, jobs);
            }
            if cfg.audio {
                gen_audio(
                    &ctx,
                    room,
                    cfg.audio_chunk_ms,
                    self.phrases.as_deref().map(|p| p.as_slice()),
                    out,
                    &mut seq,
                    &mut self.spoken,
                );
            }
            gen_viewers(
                &ctx,
                room,
                &mut self.busy_until,
                &mut self.visits,
                out,
                &mut seq,
            );
            gen_comments(&ctx, room, cfg.comments_per_sec, out, &mut seq);
        }
        // After every room's step: the visits in [s, e) are final then.
        if let Some(shorts) = self.shorts.as_mut() {
            let mut actions = Vec::new();
            shorts.step(e, &self.visits, &mut actions);
            let mut seq = 0u32;
            for a in actions {
                out.push(SHORTS_LANE, &mut seq, SimEvent::ShortVideo(a));
            }
        }
    }
}

impl Simulator {
    /// Replaces each job's scenes by its cached variant's, encoding the
    /// variants not seen yet, and fills the payloads from the cache.
    fn encode_variants(
        &mut self,
        spec: &VideoSpec,
        levels: u32,
        jobs: &[VideoJob],
    ) -> Result<Vec<Vec<u8>>, SimError> {
        let key_of = |job: &VideoJob| -> VariantKey {
            let n = job.scenes.len().max(1);
            let mean = job
                .scenes
                .iter()
                .map(|s| f64::from(s.excitement))
                .sum::<f64>()
                / n as f64;
            let level = ((mean.clamp(0.0, 1.0) * f64::from(levels)) as u32).min(levels - 1);
            let highlight = job.scenes.iter().any(|s| s.highlight);
            let palette = job.scenes.first().map_or(0, |s| s.room_seed % 4);
            (palette, level, highlight, job.scenes.len())
        };
        let mut missing: Vec<VideoJob> = Vec::new();
        for job in jobs.iter() {
            let key = key_of(job);
            if self.video_cache.contains_key(&key) || missing.iter().any(|m| key_of(m) == key) {
                continue;
            }
            let (palette, level, highlight, frames) = key;
            let fps = u64::from(spec.fps.max(1));
            let scenes = (0..frames as u64)
                .map(|i| Scene {
                    t_ms: i * 1000 / fps,
                    excitement: (level as f32 + 0.5) / levels as f32,
                    highlight,
                    room_seed: palette,
                })
                .collect();
            missing.push(VideoJob {
                slot: job.slot,
                room_id: job.room_id.clone(),
                sequence: job.sequence,
                scenes,
            });
        }
        let payloads = encode_all(spec, &missing)?;
        for (job, payload) in missing.iter().zip(payloads) {
            let key = key_of(job);
            self.video_cache.insert(key, payload);
        }
        Ok(jobs
            .iter()
            .map(|job| {
                self.video_cache
                    .get(&key_of(job))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect())
    }
}

/// Encodes every job, on up to [`VIDEO_WORKERS`] threads; payloads in job order.
fn encode_all(spec: &VideoSpec, jobs: &[VideoJob]) -> Result<Vec<Vec<u8>>, SimError> {
    let workers = VIDEO_WORKERS
        .min(jobs.len())
        .min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut results: Vec<Option<Result<Vec<u8>, MediaError>>> = jobs.iter().map(|_| None).collect();
    if workers <= 1 {
        for (slot, job) in results.iter_mut().zip(jobs) {
            *slot = Some(media::encode_ts_segment(spec, &job.scenes));
        }
    } else {
        let next = AtomicUsize::new(0);
        let parts = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    sc.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(job) = jobs.get(i) else {
                                break;
                            };
                            done.push((i, media::encode_ts_segment(spec, &job.scenes)));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join())
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|_| SimError::WorkerPanicked)?;
        for (i, r) in parts.into_iter().flatten() {
            results[i] = Some(r);
        }
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (job, r) in jobs.iter().zip(results) {
        match r {
            Some(Ok(bytes)) => out.push(bytes),
            Some(Err(source)) => {
                return Err(SimError::Video {
                    room_id: job.room_id.clone(),
                    sequence: job.sequence,
                    source,
                })
            }
            None => return Err(SimError::WorkerPanicked),
        }
    }
    Ok(out)
}

/// Indices `k` of periodic items (period `len` from `start`) that start in `[s, e)`.
fn starts_in(start: i64, len: i64, s: i64, e: i64) -> std::ops::Range<i64> {
    let lo = (s - start + len - 1).div_euclid(len).max(0);
    let hi = (e - start + len - 1).div_euclid(len).max(0);
    lo..hi
}

fn gen_video(
    ctx: &StepCtx<'_>,
    room: &Room,
    spec: &VideoSpec,
    segment_ms: i64,
    out: &mut Staging,
    seq: &mut u32,
    jobs: &mut Vec<VideoJob>,
) {
    for k in starts_in(ctx.start_ms, segment_ms, ctx.s, ctx.e) {
        let t0 = ctx.start_ms + k * segment_ms;
        let t1 = (t0 + segment_ms).min(ctx.end_ms);
        let fps = i64::from(spec.fps);
        let frames = ((t1 - t0) * fps + 999) / 1000;
        let scenes: Vec<Scene> = (0..frames.max(1))
            .map(|i| {
                let t = t0 + i * 1000 / fps;
                Scene {
                    t_ms: (t - ctx.start_ms) as u64,
                    excitement: room.curve.at(t) as f32,
                    highlight: room.curve.in_highlight(t),
                    room_seed: room.curve.seed,
                }
            })
            .collect();
        let seg = VideoSegment {
            schema_version: 1,
            room_id: ctx.info.room_id.clone(),
            streamer_id: ctx.info.streamer_id.clone(),
            sequence: k as u64,
            start_time_ms: t0,
            duration_ms: (t1 - t0) as u32,
            format: VideoFormat::MpegTs as i32,
            payload: Vec::new(),
        };
        let slot = out.push(ctx.room_ix, seq, SimEvent::Video(seg));
        jobs.push(VideoJob {
            slot,
            room_id: ctx.info.room_id.clone(),
            sequence: k as u64,
            scenes,
        });
    }
}

/// The room's audio chunks that start in the step; utterances that end in them (or
/// are cut by the end of the broadcast) go to `spoken`.
fn gen_audio(
    ctx: &StepCtx<'_>,
    room: &mut Room,
    chunk_ms: i64,
    phrases: Option<&[Phrase]>,
    out: &mut Staging,
    seq: &mut u32,
    spoken: &mut Vec<UtteranceTruth>,
) {
    /// 110 Hz hum: phase increment per sample of a 32-bit phase accumulator.
    const HUM_STEP: u32 = ((110u64 << 32) / SAMPLE_RATE as u64) as u32;
    const BLOCK: usize = 1600;
    for k in starts_in(ctx.start_ms, chunk_ms, ctx.s, ctx.e) {
        let t0 = ctx.start_ms + k * chunk_ms;
        let t1 = (t0 + chunk_ms).min(ctx.end_ms);
        let n = ((t1 - t0) * SAMPLES_PER_MS) as usize;
        let mut pcm = Vec::with_capacity(n * 2);
        let a = &mut room.audio;
        let mut bits = 0u64;
        let mut nonzero = false;
        for i in 0..n {
            if i % BLOCK == 0 {
                let t = t0 + (i as i64) / SAMPLES_PER_MS;
                let ex = room.curve.at(t);
                a.target = 220.0 + 5200.0 * ex * ex.sqrt();
                if let (Some(ph), None) = (phrases, &a.speaking) {
                    if t >= a.next_talk_ms && !ph.is_empty() {
                        let hype = (ex > 0.65 && a.rng.chance(0.8)) || a.rng.chance(0.05);
                        let lang = if room.zh_streamer != a.rng.chance(0.15) {
                            Lang::Zh
                        } else {
                            Lang::En
                        };
                        let matching = ph
                            .iter()
                            .filter(|p| p.lang == lang && p.hype == hype)
                            .count();
                        let pick = a.rng.below(matching as u64) as usize;
                        let idx = ph
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.lang == lang && p.hype == hype)
                            .nth(pick)
                            .map_or(0, |(i, _)| i);
                        a.speaking = Some(Speaking {
                            phrase: idx,
                            pos: 0.0,
                            // espeak-ng speaks at about 2500 RMS; the noise
                            // is about 0.3 x its amplitude (600-1700 RMS).
                            gain: 0.9 + 0.3 * ex,
                            start_ms: t,
                        });
                    }
                }
            }
            if i % 4 == 0 {
                bits = a.rng.next_u64();
            }
            let w = f64::from((bits & 0xffff) as u16 as i16) / 32768.0;
            bits >>= 16;
            a.lowpass += 0.06 * (w - a.lowpass);
            a.amp += (a.target - a.amp) * 0.0015;
            a.hum_phase = a.hum_phase.wrapping_add(HUM_STEP);
            let tri = ((a.hum_phase >> 16) as f64 / 32768.0 - 1.0).abs() * 2.0 - 1.0;
            let mut x = a.amp * (2.5 * a.lowpass + 0.3 * w) + 120.0 * tri;
            if let (Some(ph), Some(sp)) = (phrases, a.speaking.as_mut()) {
                let samples = ph.get(sp.phrase).map_or(&[][..], |p| &p.samples[..]);
                let j = sp.pos as usize;
                if j + 1 < samples.len() {
                    let frac = sp.pos - j as f64;
                    let v = f64::from(samples[j]) * (1.0 - frac) + f64::from(samples[j + 1]) * frac;
                    x += v * sp.gain;
                    sp.pos += room.voice_rate;
                } else {
                    let t = t0 + (i as i64) / SAMPLES_PER_MS;
                    let ex = room.curve.at(t);
                    let pause = 400.0 + a.rng.exp(600.0 + 5000.0 * (1.0 - ex));
                    a.next_talk_ms = t + pause.min(30_000.0) as i64;
                    spoken.push(utterance(&ctx.info.room_id, sp.phrase, sp.start_ms, t));
                    a.speaking = None;
                }
            }
            let s = x.round().clamp(-32768.0, 32767.0) as i16;
            nonzero |= s != 0;
            pcm.extend_from_slice(&s.to_le_bytes());
        }
        if !nonzero && pcm.len() >= 2 {
            pcm[0] = 1;
        }
        if t1 >= ctx.end_ms {
            // The broadcast ends: no audio follows (and no random draw depends on this).
            if let Some(sp) = a.speaking.take() {
                spoken.push(utterance(
                    &ctx.info.room_id,
                    sp.phrase,
                    sp.start_ms,
                    ctx.end_ms,
                ));
            }
        }
        let chunk = AudioChunk {
            schema_version: 1,
            room_id: ctx.info.room_id.clone(),
            streamer_id: ctx.info.streamer_id.clone(),
            sequence: k as u64,
            start_time_ms: t0,
            sample_rate: SAMPLE_RATE,
            channels: 1,
            format: AudioFormat::PcmS16le as i32,
            payload: pcm,
        };
        out.push(ctx.room_ix, seq, SimEvent::Audio(chunk));
    }
}

fn action(info: &RoomInfo, user_id: &str, t: i64, kind: ActionKind) -> ViewerAction {
    ViewerAction {
        schema_version: 1,
        room_id: info.room_id.clone(),
        user_id: user_id.to_owned(),
        streamer_id: info.streamer_id.clone(),
        event_time_ms: t,
        kind: kind as i32,
        watch_ms: 0,
        gift_value: 0,
        gift_id: String::new(),
        ..ViewerAction::default()
    }
}

/// Draws a watch duration for a viewer entering at excitement `ex`.
fn watch_duration(rng: &mut Rng, affinity: f64, highlight: bool) -> i64 {
    let p_long = (0.08 + 0.3 * affinity + if highlight { 0.4 } else { 0.0 }).min(0.95);
    let d = if rng.chance(p_long) {
        // 30 s plus a Pareto tail (alpha 1.4, scale 20 s).
        let u = 1.0 - rng.f64();
        let tail = 20_000.0 * (det_exp(-det_ln(u) / 1.4) - 1.0);
        30_000.0 + tail.min(5_400_000.0)
    } else {
        2_000.0 + rng.exp(14_000.0)
    };
    d.min(6_000_000.0) as i64
}

/// The viewers of a room over the step. `visits` (per user, or empty) gets every
/// ENTER and longer stay; it is only written, so it changes no draw.
fn gen_viewers(
    ctx: &StepCtx<'_>,
    room: &mut Room,
    busy_until: &mut [i64],
    visits: &mut [Visits],
    out: &mut Staging,
    seq: &mut u32,
) {
    let (s, e) = (ctx.s, ctx.e);
    let last_ms = ctx.end_ms - 1;
    let dt = (e - s) as f64 / 1000.0;
    let ex = room.curve.at(s + (e - s) / 2);
    let hl_now = room.curve.in_highlight(s + (e - s) / 2) || ex >= HIGHLIGHT_EXCITEMENT;
    let early = s - ctx.start_ms < 10_000;
    let rng = &mut room.rng_viewers;
    room.present.clear();
    for (vi, v) in room.viewers.iter_mut().enumerate() {
        loop {
            match v.state {
                ViewerState::Away => {
                    let lo = s.max(v.cooldown_until);
                    if lo >= e {
                        break;
                    }
                    let mut p = dt * (1.0 / 20.0) * (0.35 + v.affinity) * (0.5 + ex);
                    if early {
                        // Followers are notified when the broadcast starts.
                        p += dt * 0.15 * v.affinity * v.affinity;
                    }
                    if !rng.chance(p) {
                        break;
                    }
                    let ti = rng.range(lo, e);
                    out.push(
                        ctx.room_ix,
                        seq,
                        SimEvent::Action(action(ctx.info, &v.user_id, ti, ActionKind::Impression)),
                    );
                    let p_enter = (0.2 + 0.5 * v.affinity + 0.25 * ex).min(0.95);
                    if rng.chance(p_enter) {
                        v.state = ViewerState::Pending {
                            enter_at: ti + rng.range(300, 4_000),
                        };
                    } else {
                        v.cooldown_until = ti + rng.range(10_000, 40_000);
                        break;
                    }
                }
                ViewerState::Pending { enter_at } => {
                    if enter_at >= e {
                        break;
                    }
                    let user = v.user as usize;
                    let free = busy_until.get(user).is_none_or(|&b| enter_at > b);
                    if enter_at >= last_ms || !free {
                        v.state = ViewerState::Away;
                        v.cooldown_until = enter_at + rng.range(5_000, 30_000);
                        break;
                    }
                    let hl = room.curve.in_highlight(enter_at)
                        || room.curve.at(enter_at) >= HIGHLIGHT_EXCITEMENT;
                    let d = watch_duration(rng, v.affinity, hl);
                    let leave_at = (enter_at + d.max(1_000)).min(last_ms);
                    if let Some(b) = busy_until.get_mut(user) {
                        *b = leave_at;
                    }
                    if let Some(w) = visits.get_mut(user) {
                        w.enter(enter_at, leave_at);
                    }
                    out.push(
                        ctx.room_ix,
                        seq,
                        SimEvent::Action(action(ctx.info, &v.user_id, enter_at, ActionKind::Enter)),
                    );
                    v.state = ViewerState::Present {
                        enter_ms: enter_at,
                        last_hb: enter_at,
                        leave_at,
                    };
                }
                ViewerState::Present {
                    enter_ms,
                    mut last_hb,
                    mut leave_at,
                } => {
                    // Heartbeats strictly before leaving.
                    while last_hb + HEARTBEAT_MS < e && last_hb + HEARTBEAT_MS < leave_at {
                        let t = last_hb + HEARTBEAT_MS;
                        let mut a = action(ctx.info, &v.user_id, t, ActionKind::WatchProgress);
                        a.watch_ms = HEARTBEAT_MS as u32;
                        out.push(ctx.room_ix, seq, SimEvent::Action(a));
                        last_hb = t;
                    }
                    // Hooked by a highlight: stay longer (only when not leaving this step,
                    // so no other room has let the user in meanwhile).
                    if hl_now && leave_at >= e && leave_at < last_ms && rng.chance(dt * 0.08) {
                        leave_at = (leave_at + rng.range(20_000, 90_000)).min(last_ms);
                        if let Some(b) = busy_until.get_mut(v.user as usize) {
                            *b = (*b).max(leave_at);
                        }
                        if let Some(w) = visits.get_mut(v.user as usize) {
                            w.extend(enter_ms, leave_at);
                        }
                    }
                    // Interactions strictly between entering and leaving.
                    let lo = s.max(enter_ms + 1);
                    let hi = e.min(leave_at);
                    if lo < hi {
                        interact(ctx, v, rng, ex, dt, lo, hi, out, seq);
                    }
                    if leave_at < e {
                        let mut a =
                            action(ctx.info, &v.user_id, leave_at, ActionKind::WatchProgress);
                        a.watch_ms = (leave_at - last_hb) as u32;
                        out.push(ctx.room_ix, seq, SimEvent::Action(a));
                        out.push(
                            ctx.room_ix,
                            seq,
                            SimEvent::Action(action(
                                ctx.info,
                                &v.user_id,
                                leave_at,
                                ActionKind::Leave,
                            )),
                        );
                        v.state = ViewerState::Away;
                        v.cooldown_until = leave_at + rng.range(10_000, 60_000);
                    } else {
                        v.state = ViewerState::Present {
                            enter_ms,
                            last_hb,
                            leave_at,
                        };
                        room.present.push(vi as u32);
                    }
                    break;
                }
            }
        }
    }
}

/// Likes, shares, follows and gifts of a present viewer within `[lo, hi)`.
#[allow(clippy::too_many_arguments)]
fn interact(
    ctx: &StepCtx<'_>,
    v: &mut Viewer,
    rng: &mut Rng,
    ex: f64,
    dt: f64,
    lo: i64,
    hi: i64,
    out: &mut Staging,
    seq: &mut u32,
) {
    // Seconds present in this step.
    let w = ((hi - lo) as f64 / 1000.0).min(dt);
    let p_like = w * 0.04 * (0.4 + v.affinity) * (0.3 + 2.0 * ex);
    let p_gift =
        w * 0.036 * (0.2 + v.affinity) * (0.05 + 2.0 * v.gift_level) * (0.2 + 3.0 * ex * ex);
    let p_share = w * 0.0015 * (0.3 + ex);
    let p_follow = if v.followed {
        0.0
    } else {
        w * 0.004 * v.affinity * (0.3 + ex)
    };
    let u = rng.f64();
    let t = rng.range(lo, hi);
    if u < p_like {
        let n = 1 + rng.below(4) as i64;
        let mut tt = t;
        for _ in 0..n {
            if tt >= hi {
                break;
            }
            out.push(
                ctx.room_ix,
                seq,
                SimEvent::Action(action(ctx.info, &v.user_id, tt, ActionKind::Like)),
            );
            tt += rng.range(120, 260);
        }
    } else if u < p_like + p_gift {
        let x = rng.f64();
        let tier = ((x * x * (3.0 + 4.0 * v.gift_level)) as usize).min(GIFTS.len() - 1);
        let (value, id) = GIFTS[tier];
        let combo = if tier <= 1 {
            1 + rng.below(5) as i64
        } else {
            1
        };
        let mut tt = t;
        for _ in 0..combo {
            if tt >= hi {
                break;
            }
            let mut a = action(ctx.info, &v.user_id, tt, ActionKind::Gift);
            a.gift_value = value;
            a.gift_id = id.to_owned();
            out.push(ctx.room_ix, seq, SimEvent::Action(a));
            tt += rng.range(250, 450);
        }
    } else if u < p_like + p_gift + p_share {
        out.push(
            ctx.room_ix,
            seq,
            SimEvent::Action(action(ctx.info, &v.user_id, t, ActionKind::Share)),
        );
    } else if u < p_like + p_gift + p_share + p_follow {
        v.followed = true;
        out.push(
            ctx.room_ix,
            seq,
            SimEvent::Action(action(ctx.info, &v.user_id, t, ActionKind::Follow)),
        );
    }
}

/// Comment rate factor at (lagged) excitement `ex`; 1 at calm average excitement.
fn comment_factor(ex: f64) -> f64 {
    (0.2 + 3.0 * ex * ex) / (0.2 + 3.0 * CALM_EXCITEMENT * CALM_EXCITEMENT)
}

fn comment_text(rng: &mut Rng, zh: bool, ex: f64) -> String {
    let p_hype = ((ex - 0.3) * 1.6).clamp(0.02, 0.95);
    let hype = rng.chance(p_hype);
    let list = match (zh, hype) {
        (false, false) => EN_CALM,
        (false, true) => EN_HYPE,
        (true, false) => ZH_CALM,
        (true, true) => ZH_HYPE,
    };
    let base = list[rng.below(list.len() as u64) as usize];
    let emphasis = if hype && rng.chance(0.35) {
        let l = if zh { ZH_EMPHASIS } else { EN_EMPHASIS };
        l[rng.below(l.len() as u64) as usize]
    } else {
        ""
    };
    let mut text = String::with_capacity(base.len() + emphasis.len());
    text.push_str(base);
    text.push_str(emphasis);
    text
}

fn gen_comments(ctx: &StepCtx<'_>, room: &mut Room, cps: f64, out: &mut Staging, seq: &mut u32) {
    let rng = &mut room.rng_chat;
    let mut a = ctx.s;
    while a < ctx.e {
        let b = (a + SLICE_MS).min(ctx.e);
        let lagged = room.curve.at(a + (b - a) / 2 - ctx.info.chat_lag_ms);
        let mean = cps * comment_factor(lagged) * (b - a) as f64 / 1000.0;
        let n = rng.poisson(mean);
        for _ in 0..n {
            let t = rng.range(a, b);
            if room.present.is_empty() {
                continue;
            }
            // A present viewer, chatty fans more often.
            let mut chosen = None;
            for _ in 0..8 {
                let vi = room.present[rng.below(room.present.len() as u64) as usize] as usize;
                let v = &room.viewers[vi];
                let entered_before = matches!(v.state, ViewerState::Present { enter_ms, leave_at, .. } if enter_ms < t && t < leave_at);
                if entered_before {
                    chosen = Some(vi);
                    if rng.chance(0.35 + 0.65 * v.affinity) {
                        break;
                    }
                }
            }
            let Some(vi) = chosen else {
                continue;
            };
            let v = &room.viewers[vi];
            let text = comment_text(rng, v.zh, lagged);
            room.comment_seq += 1;
            let comment = Comment {
                schema_version: 1,
                room_id: ctx.info.room_id.clone(),
                user_id: v.user_id.clone(),
                event_time_ms: t,
                text,
                comment_id: format!("{}-c{}", ctx.info.room_id, room.comment_seq),
            };
            out.push(ctx.room_ix, seq, SimEvent::Comment(comment));
            out.push(
                ctx.room_ix,
                seq,
                SimEvent::Action(action(ctx.info, &v.user_id, t, ActionKind::Comment)),
            );
        }
        a = b;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn floor_div(a: i64, b: i64) -> i64 {
        a.div_euclid(b)
    }

    fn quiet(seed: u64, rooms: u32, secs: i64) -> SimConfig {
        SimConfig {
            seed,
            rooms,
            duration_ms: secs * 1000,
            video: None,
            audio: false,
            speech: false,
            ..SimConfig::default()
        }
    }

    /// Runs a simulation to its end in steps of `step_ms`.
    pub(in crate::simulator) fn run_all(
        cfg: SimConfig,
        step_ms: i64,
    ) -> (Simulator, Vec<SimEvent>) {
        let mut sim = Simulator::new(cfg).expect("new");
        let mut all = Vec::new();
        let mut t = sim.config().start_ms;
        while !sim.finished() {
            t += step_ms;
            all.extend(sim.advance(t).expect("advance"));
        }
        (sim, all)
    }

    fn kind(a: &ViewerAction) -> ActionKind {
        ActionKind::try_from(a.kind).expect("kind")
    }

    #[test]
    fn det_math_matches_std_closely() {
        for &x in &[
            1e-300, 1e-9, 0.001, 0.1, 0.5, 0.999_999, 1.0, 1.5, 2.0, 10.0, 1e6, 1e300,
        ] {
            let (a, b) = (det_ln(x), x.ln());
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "ln {x}: {a} vs {b}"
            );
        }
        for &x in &[
            -700.0, -50.0, -3.2, -1.0, -1e-9, 0.0, 0.3, 1.0, 5.5, 80.0, 700.0,
        ] {
            let (a, b) = (det_exp(x), f64::exp(x));
            assert!((a - b).abs() <= 1e-13 * b.abs(), "exp {x}: {a} vs {b}");
        }
    }

    #[test]
    fn rng_is_stable_and_uniform() {
        let mut r = Rng::seeded(42);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r2 = Rng::seeded(42);
        assert_eq!(first, (0..3).map(|_| r2.next_u64()).collect::<Vec<_>>());
        let mut r = Rng::stream(1, 2, 3);
        let n = 100_000;
        let mean = (0..n).map(|_| r.f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01);
        let pm = (0..n).map(|_| f64::from(r.poisson(3.0))).sum::<f64>() / n as f64;
        assert!((pm - 3.0).abs() < 0.05, "poisson mean {pm}");
        let pm = (0..n).map(|_| f64::from(r.poisson(50.0))).sum::<f64>() / n as f64;
        assert!((pm - 50.0).abs() < 0.3, "poisson mean {pm}");
        assert!((0..1000).all(|_| r.below(7) < 7));
    }

    #[test]
    fn same_seed_same_events_regardless_of_chunking() {
        let cfg = SimConfig {
            audio: true,
            ..quiet(7, 3, 25)
        };
        let (_, a) = run_all(cfg.clone(), 1000);
        let (_, b) = run_all(cfg.clone(), 3_700);
        let (_, c) = run_all(cfg.clone(), 100_000);
        assert!(a.len() > 1000, "only {} events", a.len());
        assert!(a == b, "1 s vs 3.7 s steps differ");
        assert!(a == c, "1 s vs one step differ");
        let (_, d) = run_all(SimConfig { seed: 8, ..cfg }, 1000);
        assert!(a != d, "different seeds gave the same events");
        // Audio on/off does not change chat and viewers.
        let (_, e) = run_all(quiet(7, 3, 25), 1000);
        let no_audio: Vec<&SimEvent> = a
            .iter()
            .filter(|x| !matches!(x, SimEvent::Audio(_)))
            .collect();
        assert!(no_audio == e.iter().collect::<Vec<_>>());
    }

    #[test]
    fn days_share_the_world_not_the_broadcast() {
        let day0 = quiet(5, 4, 60);
        let day1 = SimConfig {
            day: 1,
            start_ms: day0.start_ms + 86_400_000,
            ..day0.clone()
        };
        let (s0, a) = run_all(day0, 1000);
        let (s1, b) = run_all(day1, 1000);
        let (t0, t1) = (s0.truth(), s1.truth());
        assert_eq!(t0.streamers(), t1.streamers());
        assert!(!t0.viewers().is_empty());
        assert!(
            t0.viewers() == t1.viewers(),
            "the populations differ between days"
        );
        assert_ne!(t0.highlights(), t1.highlights());
        let users = |evs: &[SimEvent]| -> Vec<String> {
            evs.iter()
                .filter_map(|e| match e {
                    SimEvent::Action(a) => Some(a.user_id.clone()),
                    _ => None,
                })
                .take(200)
                .collect()
        };
        assert_ne!(users(&a), users(&b), "day 1 replayed day 0");
    }

    #[test]
    fn affinity_follows_genre() {
        let (sim, _) = run_all(quiet(3, 12, 1), 1000);
        let truth = sim.truth();
        let genre: HashMap<String, u32> = truth
            .streamers()
            .iter()
            .map(|s| (s.streamer_id.replace("streamer", "room"), s.genre))
            .collect();
        let (mut same, mut other) = ((0.0, 0), (0.0, 0));
        for v in truth.viewers() {
            let acc = if genre[&v.room_id] == v.genre {
                &mut same
            } else {
                &mut other
            };
            acc.0 += v.affinity;
            acc.1 += 1;
        }
        let (ms, mo) = (same.0 / same.1 as f64, other.0 / other.1 as f64);
        assert!(same.1 > 10 && other.1 > 10);
        assert!(ms > 2.0 * mo, "same genre {ms:.3} vs other {mo:.3}");
    }

    /// FNV-1a over the protobuf encoding of every event.
    fn digest(events: &[SimEvent]) -> u64 {
        use prost::Message;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for ev in events {
            let bytes = match ev {
                SimEvent::Video(v) => v.encode_to_vec(),
                SimEvent::Audio(a) => a.encode_to_vec(),
                SimEvent::Comment(c) => c.encode_to_vec(),
                SimEvent::Action(a) => a.encode_to_vec(),
                SimEvent::ShortVideo(s) => s.encode_to_vec(),
            };
            for b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// The events of a seed are pinned: the same bytes on every machine and build.
    /// A deliberate change of the model changes this digest; update it then.
    #[test]
    fn golden_digest() {
        let cfg = SimConfig {
            audio: true,
            ..quiet(1, 2, 15)
        };
        let (_, events) = run_all(cfg, 1000);
        assert_eq!(digest(&events), GOLDEN, "digest {:#x}", digest(&events));
    }
    const GOLDEN: u64 = 0x147e_d4f3_b44c_5372;

    #[test]
    fn events_are_ordered_and_in_range() {
        let cfg = SimConfig {
            audio: true,
            ..quiet(3, 4, 30)
        };
        let (start, end) = (cfg.start_ms, cfg.start_ms + cfg.duration_ms);
        let mut sim = Simulator::new(cfg).expect("new");
        let mut prev = i64::MIN;
        let mut t = start;
        let mut n = 0;
        while !sim.finished() {
            t += 777;
            for ev in sim.advance(t).expect("advance") {
                let et = ev.event_time_ms();
                assert!(et >= prev, "out of order");
                assert!(et >= start && et < end && et < t);
                prev = et;
                n += 1;
            }
        }
        assert!(n > 0);
        assert!(sim.advance(end + 10_000).expect("after end").is_empty());
    }

    #[test]
    fn viewer_discipline() {
        let cfg = SimConfig {
            viewers: 120,
            comments_per_sec: 6.0,
            ..quiet(11, 6, 90)
        };
        let end = cfg.start_ms + cfg.duration_ms;
        let (sim, events) = run_all(cfg, 1000);
        // (room, user) -> entered at
        let mut inside: HashMap<(String, String), i64> = HashMap::new();
        let mut last_leave: HashMap<(String, String), i64> = HashMap::new();
        let mut last_hb: HashMap<(String, String), i64> = HashMap::new();
        let mut watched: HashMap<(String, String), i64> = HashMap::new();
        let mut user_room: HashMap<String, String> = HashMap::new();
        let mut pending_comments: Vec<(String, String, i64)> = Vec::new();
        let mut kinds = HashSet::new();
        for (i, ev) in events.iter().enumerate() {
            match ev {
                SimEvent::Comment(c) => {
                    let key = (c.room_id.clone(), c.user_id.clone());
                    assert!(inside.contains_key(&key), "comment from absent viewer");
                    assert!(inside[&key] < c.event_time_ms);
                    // The next event is its COMMENT action.
                    match &events[i + 1] {
                        SimEvent::Action(a) => {
                            assert_eq!(kind(a), ActionKind::Comment);
                            assert_eq!(
                                (&a.user_id, a.event_time_ms),
                                (&c.user_id, c.event_time_ms)
                            );
                        }
                        other => panic!("comment not followed by its action: {other:?}"),
                    }
                    pending_comments.push((c.room_id.clone(), c.user_id.clone(), c.event_time_ms));
                    assert!(!c.text.is_empty());
                }
                SimEvent::Action(a) => {
                    let key = (a.room_id.clone(), a.user_id.clone());
                    let k = kind(a);
                    kinds.insert(a.kind);
                    assert_eq!(a.streamer_id, a.room_id.replace("room", "streamer"));
                    match k {
                        ActionKind::Enter => {
                            assert!(!inside.contains_key(&key), "double enter");
                            if let Some(&l) = last_leave.get(&key) {
                                assert!(a.event_time_ms > l);
                            }
                            if let Some(r) = user_room.get(&a.user_id) {
                                panic!("{} entered {} while in {r}", a.user_id, a.room_id);
                            }
                            user_room.insert(a.user_id.clone(), a.room_id.clone());
                            inside.insert(key.clone(), a.event_time_ms);
                            last_hb.insert(key.clone(), a.event_time_ms);
                        }
                        ActionKind::Leave => {
                            let entered = inside.remove(&key).expect("leave without enter");
                            assert!(a.event_time_ms > entered);
                            assert_eq!(last_hb[&key], a.event_time_ms, "no final heartbeat");
                            assert_eq!(
                                watched.remove(&key).unwrap_or(0),
                                a.event_time_ms - entered
                            );
                            last_leave.insert(key, a.event_time_ms);
                            user_room.remove(&a.user_id);
                        }
                        ActionKind::WatchProgress => {
                            let entered = *inside.get(&key).expect("heartbeat outside");
                            let prev = last_hb[&key];
                            assert_eq!(i64::from(a.watch_ms), a.event_time_ms - prev);
                            assert!(a.watch_ms > 0 && a.event_time_ms > entered);
                            last_hb.insert(key.clone(), a.event_time_ms);
                            *watched.entry(key).or_default() += i64::from(a.watch_ms);
                        }
                        ActionKind::Impression => {}
                        ActionKind::Gift => {
                            assert!(GIFTS
                                .iter()
                                .any(|&(v, id)| v == a.gift_value && id == a.gift_id));
                            assert!(inside.get(&key).is_some_and(|&t| t < a.event_time_ms));
                        }
                        _ => {
                            assert!(
                                inside.get(&key).is_some_and(|&t| t < a.event_time_ms),
                                "{k:?} outside"
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        assert!(inside.is_empty(), "viewers still inside at the end");
        for (k, l) in &last_leave {
            let _ = k;
            assert!(*l < end);
        }
        let final_leaves = events
            .iter()
            .filter(|e| matches!(e, SimEvent::Action(a) if kind(a) == ActionKind::Leave && a.event_time_ms == end - 1))
            .count();
        assert!(final_leaves > 0, "nobody stayed to the end");
        for k in [
            ActionKind::Impression,
            ActionKind::Enter,
            ActionKind::Leave,
            ActionKind::WatchProgress,
            ActionKind::Like,
            ActionKind::Comment,
            ActionKind::Share,
            ActionKind::Follow,
            ActionKind::Gift,
        ] {
            assert!(kinds.contains(&(k as i32)), "no {k:?} at all");
        }
        // Some users appear in several rooms.
        let mut rooms_of: HashMap<&str, HashSet<&str>> = HashMap::new();
        for ev in &events {
            if let SimEvent::Action(a) = ev {
                rooms_of.entry(&a.user_id).or_default().insert(&a.room_id);
            }
        }
        assert!(rooms_of.values().any(|r| r.len() > 1));
        assert!(!pending_comments.is_empty());
        assert_eq!(sim.rooms().len(), 6);
        // Chinese and English chat.
        let texts: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                SimEvent::Comment(c) => Some(c.text.as_str()),
                _ => None,
            })
            .collect();
        assert!(texts
            .iter()
            .any(|t| t.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))));
        assert!(texts.iter().any(|t| t.is_ascii()));
    }

    #[test]
    fn truth_matches_events() {
        let cfg = SimConfig {
            audio: true,
            viewers: 80,
            comments_per_sec: 4.0,
            start_ms: 1_767_225_600_250, // ticks not aligned to the start
            audio_chunk_ms: 700,
            ..quiet(5, 3, 40)
        };
        let tick = cfg.tick_ms;
        let (sim, events) = run_all(cfg, 1_300);
        let truth = sim.truth();
        let comments = events
            .iter()
            .filter(|e| matches!(e, SimEvent::Comment(_)))
            .count();
        let t_comments: u64 = truth.ticks().map(|s| u64::from(s.comments)).sum();
        assert_eq!(t_comments, comments as u64);
        // Recompute per (room, tick) a few figures the simple way.
        #[derive(Default, Debug, PartialEq)]
        struct Fig {
            comments: u32,
            commenters: HashSet<String>,
            enters: u32,
            leaves: u32,
            likes: u32,
            gifts: u32,
            gift_value: u64,
            watch_ms: u64,
            samples: u64,
        }
        let mut figs: BTreeMap<(String, i64), Fig> = BTreeMap::new();
        for ev in &events {
            let key = (
                ev.room_id().to_string(),
                floor_div(ev.event_time_ms(), tick) * tick,
            );
            match ev {
                SimEvent::Comment(c) => {
                    let f = figs.entry(key).or_default();
                    f.comments += 1;
                    f.commenters.insert(c.user_id.clone());
                }
                SimEvent::Action(a) => {
                    let f = figs.entry(key).or_default();
                    match kind(a) {
                        ActionKind::Enter => f.enters += 1,
                        ActionKind::Leave => f.leaves += 1,
                        ActionKind::Like => f.likes += 1,
                        ActionKind::Gift => {
                            f.gifts += 1;
                            f.gift_value += a.gift_value;
                        }
                        ActionKind::WatchProgress => f.watch_ms += u64::from(a.watch_ms),
                        _ => {}
                    }
                }
                SimEvent::Audio(a) => {
                    for i in 0..(a.payload.len() / 2) as i64 {
                        let t = a.start_time_ms + i * 1000 / i64::from(a.sample_rate);
                        let k = (a.room_id.clone(), floor_div(t, tick) * tick);
                        figs.entry(k).or_default().samples += 1;
                    }
                }
                SimEvent::Video(_) | SimEvent::ShortVideo(_) => {}
            }
        }
        for (key, f) in &figs {
            let s = truth.tick_map().get(key).expect("tick missing from truth");
            assert_eq!(s.comments, f.comments);
            assert_eq!(s.distinct_commenters as usize, f.commenters.len());
            assert_eq!((s.enters, s.leaves, s.likes), (f.enters, f.leaves, f.likes));
            assert_eq!(
                (s.gifts, s.gift_value, s.watch_ms),
                (f.gifts, f.gift_value, f.watch_ms)
            );
            assert_eq!(s.audio_samples, f.samples);
            assert_eq!(s.has_audio, f.samples > 0);
            assert!(s.has_audio, "audio everywhere");
            assert!(s.loudness_dbfs > -120.0 && s.loudness_dbfs < 0.0);
        }
        // Every truth tick has records (audio covers the whole broadcast).
        assert_eq!(truth.tick_map().len(), figs.len());
        // Viewers present, by replay.
        let mut present: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut ends: BTreeMap<(String, i64), usize> = BTreeMap::new();
        for ev in &events {
            if let SimEvent::Action(a) = ev {
                let set = present.entry(&a.room_id).or_default();
                match kind(a) {
                    ActionKind::Enter => {
                        set.insert(&a.user_id);
                    }
                    ActionKind::Leave => {
                        set.remove(a.user_id.as_str());
                    }
                    _ => {}
                }
                let k = (a.room_id.clone(), floor_div(a.event_time_ms, tick) * tick);
                ends.insert(k, set.len());
            }
        }
        for (k, n) in ends {
            assert_eq!(truth.tick_map()[&k].viewers_present as usize, n, "{k:?}");
        }
        assert!(truth.ticks().any(|s| s.viewers_present > 5));
        let last = truth.ticks().map(|s| s.tick_start_ms).max().unwrap_or(0);
        assert!(truth
            .ticks()
            .filter(|s| s.tick_start_ms == last)
            .all(|s| s.viewers_present == 0));
        assert_eq!(
            truth.highlights().len(),
            sim.rooms()
                .iter()
                .map(|r| r.highlights.len())
                .sum::<usize>()
        );
        assert!(truth
            .ticks()
            .all(|s| s.id.is_empty() && s.schema_version == 1 && s.tick_ms == 1000));
    }

    /// Samples of phrase `phrase` played at `rate` (the mixing loop's own stepping).
    fn played_samples(sim: &Simulator, phrase: usize, rate: f64) -> i64 {
        let len = sim.phrases.as_ref().expect("speech on")[phrase]
            .samples
            .len();
        let (mut pos, mut n) = (0.0f64, 0i64);
        while (pos as usize) + 1 < len {
            pos += rate;
            n += 1;
        }
        n
    }

    /// Runs `cfg` (speech on) in steps of `step_ms`, checking that the truth holds only
    /// utterances that end by the cursor; returns the simulator and the events.
    fn run_speech(cfg: SimConfig, step_ms: i64) -> (Simulator, Vec<SimEvent>) {
        let mut sim = Simulator::new(cfg).expect("new");
        let mut all = Vec::new();
        let mut t = sim.config().start_ms;
        let mut seen = 0;
        while !sim.finished() {
            t += step_ms;
            all.extend(sim.advance(t).expect("advance"));
            let now = sim.truth().utterances();
            assert!(now.len() >= seen);
            assert!(now.iter().all(|u| u.end_ms <= sim.cursor_ms()));
            seen = now.len();
        }
        (sim, all)
    }

    #[test]
    fn utterances_are_ground_truth() {
        let cfg = SimConfig {
            audio: true,
            speech: true,
            ..quiet(5, 4, 20)
        };
        let (start, end) = (cfg.start_ms, cfg.start_ms + cfg.duration_ms);
        let (sim, events) = run_speech(cfg.clone(), 1_300);
        let utts = sim.truth().utterances();
        for u in &utts {
            println!(
                "{} [{}, {}) +{} ms {} {:?} {:?}",
                u.room_id,
                u.start_ms - start,
                u.end_ms - start,
                u.end_ms - u.start_ms,
                u.lang,
                u.text,
                u.pinyin
            );
        }
        assert!(utts.len() >= 8, "only {} utterances", utts.len());
        assert!(utts.iter().any(|u| u.lang == "en") && utts.iter().any(|u| u.lang == "zh"));
        let mut cut = 0;
        for u in &utts {
            assert!(start <= u.start_ms && u.start_ms < u.end_ms && u.end_ms <= end);
            // Speech starts on a block (100 ms) boundary.
            assert_eq!((u.start_ms - start) % 100, 0, "{u:?}");
            let idx = PHRASES
                .iter()
                .position(|&(spoken, _, _, written)| match written {
                    Some(w) => u.text == w && u.pinyin.as_deref() == Some(spoken),
                    None => u.text == spoken && u.pinyin.is_none(),
                })
                .expect("utterance of a known phrase");
            assert_eq!(u.lang, lang_code(PHRASES[idx].1));
            let room = sim
                .rooms()
                .iter()
                .position(|r| r.room_id == u.room_id)
                .expect("room");
            let rate = sim.rooms[room].voice_rate;
            // Exactly the samples played (16 per ms), unless the broadcast ended first.
            let full = u.start_ms + played_samples(&sim, idx, rate) / SAMPLES_PER_MS;
            if u.end_ms == end && full > end {
                cut += 1;
            } else {
                assert_eq!(u.end_ms, full, "{u:?}");
                let len = sim.phrases.as_ref().expect("speech")[idx].samples.len();
                let want = len as f64 / rate / SAMPLES_PER_MS as f64;
                assert!(((u.end_ms - u.start_ms) as f64 - want).abs() < 100.0);
            }
        }
        assert!(cut <= sim.rooms().len());
        // Not overlapping within a room (sorted by room, then start).
        for w in utts.windows(2) {
            if w[0].room_id == w[1].room_id {
                assert!(w[0].end_ms < w[1].start_ms, "{w:?}");
            }
        }
        // The audio is louder while the streamer speaks.
        let (mut e_in, mut n_in, mut e_out, mut n_out) = (0.0f64, 0u64, 0.0f64, 0u64);
        for ev in &events {
            let SimEvent::Audio(a) = ev else { continue };
            let spans: Vec<(i64, i64)> = utts
                .iter()
                .filter(|u| u.room_id == a.room_id)
                .map(|u| (u.start_ms, u.end_ms))
                .collect();
            for (i, b) in a.payload.chunks_exact(2).enumerate() {
                let t = a.start_time_ms + i as i64 / SAMPLES_PER_MS;
                let x = f64::from(i16::from_le_bytes([b[0], b[1]]));
                if spans.iter().any(|&(s, e)| s <= t && t < e) {
                    (e_in, n_in) = (e_in + x * x, n_in + 1);
                } else {
                    (e_out, n_out) = (e_out + x * x, n_out + 1);
                }
            }
        }
        let (rms_in, rms_out) = ((e_in / n_in as f64).sqrt(), (e_out / n_out as f64).sqrt());
        println!(
            "{} utterances, rms {rms_in:.0} inside, {rms_out:.0} outside",
            utts.len()
        );
        assert!(rms_in > 1.3 * rms_out, "{rms_in} vs {rms_out}");
        // The same however the run is chunked, and it survives the JSONL round trip.
        let (other, _) = run_speech(cfg, 20_000);
        assert_eq!(other.truth().utterances(), utts);
        let mut buf = Vec::new();
        sim.truth().write_jsonl(&mut buf).expect("write");
        let back = GroundTruth::read_jsonl(&buf[..]).expect("read");
        assert_eq!(back.utterances(), utts);
    }

    #[test]
    fn utterances_span_chunks_and_stop_with_speech() {
        // Chunks that are not whole steps, ticks not aligned to the start.
        let cfg = SimConfig {
            audio: true,
            speech: true,
            audio_chunk_ms: 700,
            start_ms: 1_767_225_600_250,
            ..quiet(9, 3, 23)
        };
        let start = cfg.start_ms;
        let (sim, _) = run_speech(cfg.clone(), 900);
        let utts = sim.truth().utterances();
        assert!(!utts.is_empty());
        // Some utterance crosses a chunk boundary.
        assert!(utts
            .iter()
            .any(|u| (u.start_ms - start) / 700 != (u.end_ms - 1 - start) / 700));
        for u in &utts {
            let room = sim
                .rooms()
                .iter()
                .position(|r| r.room_id == u.room_id)
                .expect("room");
            let idx = PHRASES
                .iter()
                .position(|p| u.pinyin.as_deref().unwrap_or(&u.text) == p.0)
                .expect("phrase");
            let full =
                u.start_ms + played_samples(&sim, idx, sim.rooms[room].voice_rate) / SAMPLES_PER_MS;
            assert!(u.end_ms == full || (u.end_ms == sim.end_ms() && full > u.end_ms));
        }
        // No speech, no utterances.
        let (sim, _) = run_all(
            SimConfig {
                speech: false,
                ..cfg
            },
            1000,
        );
        assert!(sim.truth().utterances().is_empty());
    }

    #[test]
    fn phrase_table_is_consistent() {
        for &(spoken, lang, _, written) in PHRASES {
            match (lang, written) {
                (Lang::En, None) => assert!(spoken.is_ascii()),
                (Lang::Zh, Some(w)) => {
                    // One character per syllable, commas in the same places.
                    let syl: Vec<usize> = spoken
                        .split(',')
                        .map(|p| p.split_whitespace().count())
                        .collect();
                    let chars: Vec<usize> = w.split('，').map(|p| p.chars().count()).collect();
                    assert_eq!(syl, chars, "{spoken} / {w}");
                    assert!(w
                        .split('，')
                        .flat_map(str::chars)
                        .all(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)));
                    assert!(spoken
                        .split([' ', ','])
                        .filter(|x| !x.is_empty())
                        .all(|x| x.ends_with(|c: char| ('1'..='5').contains(&c))));
                }
                other => panic!("{spoken}: {other:?}"),
            }
        }
        for lang in [Lang::En, Lang::Zh] {
            for hype in [false, true] {
                assert!(PHRASES.iter().any(|p| p.1 == lang && p.2 == hype));
            }
        }
        let u = utterance("room-0001", 19, 5, 9);
        assert_eq!(
            (u.lang.as_str(), u.text.as_str(), u.pinyin.as_deref()),
            (
                "zh",
                "谢谢大家的关注",
                Some("xie4 xie4 da4 jia1 de5 guan1 zhu4")
            )
        );
        let u = utterance("room-0001", 0, 5, 9);
        assert_eq!((u.lang.as_str(), u.pinyin), ("en", None));
    }

    #[test]
    fn highlights_drive_chat_and_long_views() {
        let cfg = SimConfig {
            viewers: 200,
            comments_per_sec: 5.0,
            ..quiet(21, 10, 120)
        };
        let end = cfg.start_ms + cfg.duration_ms;
        let (sim, events) = run_all(cfg, 1000);
        let rooms: HashMap<&str, &RoomInfo> = sim
            .rooms()
            .iter()
            .map(|r| (r.room_id.as_str(), r))
            .collect();
        for r in sim.rooms() {
            assert!((1..=3).contains(&r.highlights.len()));
            for w in r.highlights.windows(2) {
                assert!(w[0].1 <= w[1].0);
            }
            for &(s, e) in &r.highlights {
                assert!((5_000..=15_000).contains(&(e - s)));
                assert!(s >= sim.config().start_ms && e <= end);
            }
        }
        let in_hl =
            |room: &str, t: i64| rooms[room].highlights.iter().any(|&(s, e)| t >= s && t < e);
        let hl_ms: i64 = sim
            .rooms()
            .iter()
            .flat_map(|r| r.highlights.iter().map(|(s, e)| e - s))
            .sum();
        let total_ms = 120_000 * 10;
        let (mut c_in, mut c_out) = (0.0, 0.0);
        let mut entered: HashMap<(&str, &str), (i64, bool)> = HashMap::new();
        let (mut long_in, mut n_in, mut long_out, mut n_out) = (0, 0, 0, 0);
        for ev in &events {
            match ev {
                SimEvent::Comment(c) => {
                    if in_hl(&c.room_id, c.event_time_ms) {
                        c_in += 1.0;
                    } else {
                        c_out += 1.0;
                    }
                }
                SimEvent::Action(a) if kind(a) == ActionKind::Enter => {
                    entered.insert(
                        (&a.room_id, &a.user_id),
                        (a.event_time_ms, in_hl(&a.room_id, a.event_time_ms)),
                    );
                }
                SimEvent::Action(a) if kind(a) == ActionKind::Leave => {
                    if let Some((t0, hl)) =
                        entered.remove(&(a.room_id.as_str(), a.user_id.as_str()))
                    {
                        if t0 >= end - 30_000 {
                            continue;
                        }
                        let long = a.event_time_ms - t0 >= 30_000;
                        if hl {
                            n_in += 1;
                            long_in += usize::from(long);
                        } else {
                            n_out += 1;
                            long_out += usize::from(long);
                        }
                    }
                }
                _ => {}
            }
        }
        let rate_in = c_in / hl_ms as f64;
        let rate_out = c_out / (total_ms - hl_ms) as f64;
        let long_share_in = long_in as f64 / n_in as f64;
        let long_share_out = long_out as f64 / n_out as f64;
        println!(
            "comments/s in highlights {:.2}, outside {:.2}; long views entering in highlights {long_in}/{n_in} ({long_share_in:.2}), outside {long_out}/{n_out} ({long_share_out:.2})",
            rate_in * 1000.0,
            rate_out * 1000.0
        );
        assert!(rate_in > 1.8 * rate_out, "highlight chat not busier");
        assert!(
            n_in >= 30,
            "too few sessions entered during highlights: {n_in}"
        );
        assert!(
            long_share_in > 1.4 * long_share_out,
            "long views not more likely in highlights"
        );
    }

    #[test]
    fn media_records() {
        let cfg = SimConfig {
            rooms: 2,
            duration_ms: 7_000,
            segment_ms: 2_000,
            ..SimConfig::default()
        };
        let (sim, events) = run_all(cfg, 1000);
        let videos: Vec<&VideoSegment> = events
            .iter()
            .filter_map(|e| match e {
                SimEvent::Video(v) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(videos.len(), 2 * 4);
        for v in &videos {
            assert_eq!(v.format, VideoFormat::MpegTs as i32);
            assert!(!v.payload.is_empty() && v.payload[0] == 0x47 && v.payload.len() % 188 == 0);
        }
        let last = videos
            .iter()
            .rfind(|v| v.room_id == "room-0001")
            .expect("video");
        assert_eq!((last.sequence, last.duration_ms), (3, 1000));
        let chunks: Vec<&AudioChunk> = events
            .iter()
            .filter_map(|e| match e {
                SimEvent::Audio(a) => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(chunks.len(), 2 * 7);
        for c in &chunks {
            assert_eq!(
                (c.sample_rate, c.channels, c.format),
                (16_000, 1, AudioFormat::PcmS16le as i32)
            );
            assert_eq!(c.payload.len(), 16_000 * 2);
            let ss: u64 = c
                .payload
                .chunks_exact(2)
                .map(|b| i64::from(i16::from_le_bytes([b[0], b[1]])).pow(2) as u64)
                .sum();
            assert!(ss > 0);
        }
        assert!(sim.truth().ticks().all(|s| s.has_audio));
        let vids: u32 = sim.truth().ticks().map(|s| s.video_segments).sum();
        assert_eq!(vids, 8);
    }

    #[test]
    fn audio_follows_excitement() {
        let cfg = SimConfig {
            audio: true,
            ..quiet(4, 4, 60)
        };
        let (sim, _) = run_all(cfg, 1000);
        let (mut hi, mut lo) = (Vec::new(), Vec::new());
        for s in sim.truth().ticks() {
            let room = sim
                .rooms()
                .iter()
                .position(|r| r.room_id == s.room_id)
                .expect("room");
            let ex = sim
                .excitement(room, s.tick_start_ms + 500)
                .expect("excitement");
            if ex > 0.8 {
                hi.push(s.loudness_dbfs);
            } else if ex < 0.4 {
                lo.push(s.loudness_dbfs);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(!hi.is_empty() && !lo.is_empty());
        assert!(
            mean(&hi) > mean(&lo) + 6.0,
            "{} vs {}",
            mean(&hi),
            mean(&lo)
        );
    }

    #[test]
    fn bad_configs_are_rejected() {
        for cfg in [
            SimConfig {
                duration_ms: 0,
                ..quiet(1, 1, 1)
            },
            SimConfig {
                tick_ms: 0,
                ..quiet(1, 1, 1)
            },
            SimConfig {
                comments_per_sec: f64::NAN,
                ..quiet(1, 1, 1)
            },
            SimConfig {
                video: Some(VideoSpec {
                    width: 255,
                    height: 144,
                    fps: 5,
                }),
                ..quiet(1, 1, 1)
            },
        ] {
            assert!(matches!(Simulator::new(cfg), Err(SimError::Config(_))));
        }
        // Short and empty runs work.
        let (sim, ev) = run_all(quiet(1, 0, 5), 1000);
        assert!(ev.is_empty() && sim.finished());
        let (sim, _) = run_all(quiet(1, 2, 3), 1000);
        assert!(sim.rooms().iter().all(|r| r.highlights.len() == 1));
    }

    #[test]
    #[ignore = "speed figure with real media; run with --release --ignored --nocapture"]
    fn media_generation_speed() {
        let cfg = SimConfig {
            duration_ms: 20_000,
            ..SimConfig::default()
        };
        let t0 = std::time::Instant::now();
        let mut sim = Simulator::new(cfg).expect("new");
        let setup = t0.elapsed();
        let t0 = std::time::Instant::now();
        let mut t = sim.config().start_ms;
        let mut n = 0usize;
        while !sim.finished() {
            t += 2000;
            n += sim.advance(t).expect("advance").len();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "default config (8 rooms, 256x144@5 video, audio, speech), 20 s of event time: {n} events in {secs:.2} s ({:.2}x real time; setup incl. speech {:.2} s)",
            20.0 / secs,
            setup.as_secs_f64()
        );
    }

    #[test]
    #[ignore = "speed figure; run with --release --ignored --nocapture"]
    fn generation_speed() {
        let cfg = SimConfig {
            rooms: 200,
            comments_per_sec: 50.0,
            viewers: 2000,
            ..quiet(1, 200, 30)
        };
        let t0 = std::time::Instant::now();
        let mut sim = Simulator::new(cfg).expect("new");
        let setup = t0.elapsed();
        let t0 = std::time::Instant::now();
        let mut n = 0usize;
        let mut t = sim.config().start_ms;
        while !sim.finished() {
            t += 1000;
            n += sim.advance(t).expect("advance").len();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "generated {n} events for 200 rooms x 30 s in {secs:.2} s: {:.0} events/s (setup {:.2} s)",
            n as f64 / secs,
            setup.as_secs_f64()
        );
        assert!(n as f64 / secs > 200_000.0);
    }
}
