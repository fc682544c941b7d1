//! The console sink of the embedded demo: keeps the latest figures of every
//! room, prints a readable live view on demand (with each room's latest
//! transcript), and keeps every room-stats record and transcript so that the
//! demo can compare them with the simulator's truth.
//!
//! Not for: production output (it holds everything in memory).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use prost::Message;

use super::{Ack, Busy, Sink};
use crate::runtime::{Output, OutputTopic};
use crate::schema::{DeadLetter, HighlightEvent, RoomFeatures, RoomStats, Transcript};

#[derive(Default)]
struct View {
    stats: BTreeMap<(String, i64), RoomStats>,
    duplicates: u64,
    conflicting: u64,
    dead_letters: Vec<DeadLetter>,
    transcripts: Vec<Transcript>,
    features: BTreeMap<(String, i64), RoomFeatures>,
    features_duplicates: u64,
    training_samples: u64,
    highlight_scores: u64,
    user_actions: u64,
    room_embeddings: u64,
    gift_predictions: u64,
    user_sequences: u64,
    /// Highlight events, the last record per id.
    highlights: BTreeMap<String, HighlightEvent>,
}

/// Acknowledges at once and remembers what it saw.
#[derive(Default)]
pub struct ConsoleSink {
    view: Mutex<View>,
}

/// Totals over a whole run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Distinct (room, tick) records.
    pub ticks: usize,
    /// Rooms seen.
    pub rooms: usize,
    /// Comments counted.
    pub comments: u64,
    /// Gifts counted.
    pub gifts: u64,
    /// Gift value.
    pub gift_value: u64,
    /// Records received twice with identical content (replays).
    pub duplicates: u64,
    /// Records received twice with different content (must be 0).
    pub conflicting: u64,
    /// Dead letters written.
    pub dead_letters: usize,
    /// Transcripts written.
    pub transcripts: usize,
    /// Distinct (room, tick) feature records.
    pub feature_ticks: usize,
    /// Feature records received twice (replays).
    pub feature_duplicates: u64,
    /// Training samples written (every copy).
    pub training_samples: u64,
    /// Highlight scores written (every copy).
    pub highlight_scores: u64,
    /// Distinct highlight events.
    pub highlights: usize,
    /// Live actions re-keyed by user (every copy).
    pub user_actions: u64,
    /// Room content representations written (every copy).
    pub room_embeddings: u64,
    /// Gift predictions written (every copy).
    pub gift_predictions: u64,
    /// User sequence snapshots written (every copy).
    pub user_sequences: u64,
}

impl ConsoleSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every room-stats record, keyed by (room, tick start).
    pub fn stats(&self) -> BTreeMap<(String, i64), RoomStats> {
        self.view
            .lock()
            .map(|v| v.stats.clone())
            .unwrap_or_default()
    }

    /// Every highlight event (the last record of each), by room and start.
    pub fn highlights(&self) -> Vec<HighlightEvent> {
        let mut h: Vec<HighlightEvent> = self
            .view
            .lock()
            .map(|v| v.highlights.values().cloned().collect())
            .unwrap_or_default();
        h.sort_by(|a, b| (&a.room_id, a.start_time_ms).cmp(&(&b.room_id, b.start_time_ms)));
        h
    }

    /// Every transcript, in the order written.
    pub fn transcripts(&self) -> Vec<Transcript> {
        self.view
            .lock()
            .map(|v| v.transcripts.clone())
            .unwrap_or_default()
    }

    /// Every room-features record, keyed by (room, tick start); a replayed
    /// tick keeps the last copy.
    pub fn features(&self) -> BTreeMap<(String, i64), RoomFeatures> {
        self.view
            .lock()
            .map(|v| v.features.clone())
            .unwrap_or_default()
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        let Ok(v) = self.view.lock() else {
            return Totals::default();
        };
        let mut rooms = std::collections::BTreeSet::new();
        let mut t = Totals {
            ticks: v.stats.len(),
            duplicates: v.duplicates,
            conflicting: v.conflicting,
            dead_letters: v.dead_letters.len(),
            transcripts: v.transcripts.len(),
            feature_ticks: v.features.len(),
            feature_duplicates: v.features_duplicates,
            training_samples: v.training_samples,
            highlight_scores: v.highlight_scores,
            highlights: v.highlights.len(),
            user_actions: v.user_actions,
            room_embeddings: v.room_embeddings,
            gift_predictions: v.gift_predictions,
            user_sequences: v.user_sequences,
            ..Totals::default()
        };
        for ((room, _), s) in &v.stats {
            rooms.insert(room.as_str());
            t.comments += u64::from(s.comments);
            t.gifts += u64::from(s.gifts);
            t.gift_value += s.gift_value;
        }
        t.rooms = rooms.len();
        t
    }

    /// A table of every room: its latest tick and totals over the last `window` ticks.
    pub fn render(&self, window: usize) -> String {
        let Ok(v) = self.view.lock() else {
            return String::new();
        };
        let mut by_room: BTreeMap<&str, Vec<&RoomStats>> = BTreeMap::new();
        for ((room, _), s) in &v.stats {
            by_room.entry(room.as_str()).or_default().push(s);
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>8} {:>7} {:>9} {:>6} {:>8} {:>7} {:>8}",
            "room", "tick", "viewers", "com/s", "chatters", "likes", "gifts", "value", "loud dB"
        );
        for (room, ticks) in by_room {
            let recent = &ticks[ticks.len().saturating_sub(window)..];
            let Some(last) = recent.last() else { continue };
            let n = recent.len().max(1) as f64;
            let comments: u32 = recent.iter().map(|s| s.comments).sum();
            let chatters: u32 = recent.iter().map(|s| s.distinct_commenters).sum();
            let likes: u32 = recent.iter().map(|s| s.likes).sum();
            let gifts: u32 = recent.iter().map(|s| s.gifts).sum();
            let value: u64 = recent.iter().map(|s| s.gift_value).sum();
            let loud = if last.has_audio {
                format!("{:.1}", last.loudness_dbfs)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<12} {:>9} {:>8} {:>7.1} {:>9} {:>6} {:>8} {:>7} {:>8}",
                room,
                (last.tick_start_ms / 1000) % 100_000,
                last.viewers_present,
                f64::from(comments) / n,
                chatters,
                likes,
                gifts,
                value,
                loud
            );
        }
        let mut latest: BTreeMap<&str, &Transcript> = BTreeMap::new();
        for t in &v.transcripts {
            if latest
                .get(t.room_id.as_str())
                .is_none_or(|l| l.start_time_ms <= t.start_time_ms)
            {
                latest.insert(&t.room_id, t);
            }
        }
        for (room, t) in latest {
            let text: String = t.text.trim().chars().take(60).collect();
            let _ = writeln!(
                out,
                "{:<12} {:>9} [{}] {}",
                room,
                (t.start_time_ms / 1000) % 100_000,
                t.language,
                text
            );
        }
        if !v.dead_letters.is_empty() {
            let _ = writeln!(out, "dead letters: {}", v.dead_letters.len());
        }
        out
    }
}

impl Sink for ConsoleSink {
    fn send(&self, out: Output, ack: Ack) -> Result<(), Box<Busy>> {
        if let Ok(mut v) = self.view.lock() {
            match out.topic {
                OutputTopic::RoomStats => {
                    if let Ok(s) = RoomStats::decode(&out.payload[..]) {
                        let key = (s.room_id.clone(), s.tick_start_ms);
                        match v.stats.get(&key) {
                            Some(old) if *old == s => v.duplicates += 1,
                            Some(_) => v.conflicting += 1,
                            None => {}
                        }
                        v.stats.insert(key, s);
                    }
                }
                OutputTopic::DeadLetters => {
                    if let Ok(d) = DeadLetter::decode(&out.payload[..]) {
                        v.dead_letters.push(d);
                    }
                }
                OutputTopic::Transcripts => {
                    if let Ok(t) = Transcript::decode(&out.payload[..]) {
                        v.transcripts.push(t);
                    }
                }
                OutputTopic::TrainingSamples => v.training_samples += 1,
                OutputTopic::HighlightScores => v.highlight_scores += 1,
                OutputTopic::Highlights => {
                    if let Ok(h) = HighlightEvent::decode(&out.payload[..]) {
                        v.highlights.insert(h.id.clone(), h);
                    }
                }
                OutputTopic::UserActions => v.user_actions += 1,
                OutputTopic::RoomEmbeddings => v.room_embeddings += 1,
                OutputTopic::GiftPredictions => v.gift_predictions += 1,
                OutputTopic::UserSequences => v.user_sequences += 1,
                OutputTopic::UserChangelog { .. }
                | OutputTopic::RoomChangelog { .. }
                | OutputTopic::RoomScores
                | OutputTopic::RoomProgress { .. } => {}
                OutputTopic::RoomFeatures => {
                    if let Ok(f) = RoomFeatures::decode(&out.payload[..]) {
                        let key = (f.room_id.clone(), f.tick_start_ms);
                        if v.features.insert(key, f).is_some() {
                            v.features_duplicates += 1;
                        }
                    }
                }
            }
        }
        ack.done(Ok(()));
        Ok(())
    }
}
