//! Room activity: per room and per tick, how many comments and commenters,
//! who is watching, what viewers did (likes, shares, follows, gifts, watch
//! time), how much video arrived and how loud the audio was. Published to the
//! `room-stats` topic; the first operator, and the one whose numbers are
//! checked against the simulator's ground truth.
//!
//! A tick is published when anything arrived for the room in it or at least
//! one viewer was present at its end. Loudness is computed from PCM audio;
//! compressed audio counts as activity but has no loudness until the decode
//! stage exists.
//!
//! Not for: anything learned (highlights, gifts); those are their own operators.

use std::collections::{BTreeMap, HashMap, HashSet};

use foldhash::fast::RandomState;

use prost::Message;

use crate::runtime::{Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, AudioChunk, AudioFormat, Event, RoomStats, SCHEMA_VERSION,
};

/// Loudness reported for digital silence.
pub const SILENCE_DBFS: f64 = -120.0;

/// The room-activity operator for one partition.
pub struct RoomActivity {
    tick_ms: i64,
    rooms: HashMap<String, Room, RandomState>,
}

#[derive(Default)]
struct Room {
    streamer_id: String,
    /// Open ticks by start time.
    open: BTreeMap<i64, Tick>,
    /// Viewers inside, with the position of the ENTER that put them there.
    present: HashMap<String, Position, RandomState>,
}

#[derive(Default)]
struct Tick {
    any: bool,
    streamer_id: Option<String>,
    comments: u32,
    commenters: HashSet<String, RandomState>,
    impressions: u32,
    enters: u32,
    leaves: u32,
    watch_ms: u64,
    likes: u32,
    shares: u32,
    follows: u32,
    gifts: u32,
    gift_value: u64,
    video_segments: u32,
    audio_frames: u64,
    audio_values: u64,
    audio_sum_sq: u128,
    /// ENTER (true) / LEAVE (false) in this tick, applied in event-time order at close.
    presence: Vec<(i64, Position, String, bool)>,
    holds: Holds,
}

impl RoomActivity {
    /// An operator with ticks of `tick_ms`.
    pub fn new(tick_ms: i64) -> Self {
        RoomActivity {
            tick_ms,
            rooms: HashMap::default(),
        }
    }

    fn tick_of(&self, t: i64) -> i64 {
        t.div_euclid(self.tick_ms) * self.tick_ms
    }
}

/// Splits a PCM chunk's frames over ticks: (tick_start, frames, values, sum of squares).
fn pcm_by_tick(chunk: &AudioChunk, tick_ms: i64) -> Vec<(i64, u64, u64, u128)> {
    let channels = chunk.channels.max(1) as usize;
    let rate = i64::from(chunk.sample_rate.max(1));
    let frames = chunk.payload.len() / (2 * channels);
    let mut out = Vec::new();
    let mut first = 0usize;
    while first < frames {
        let t = chunk.start_time_ms + (first as i64 * 1000) / rate;
        let tick = t.div_euclid(tick_ms) * tick_ms;
        let boundary = tick + tick_ms;
        // First frame whose time reaches the boundary: ceil((b - start) * rate / 1000).
        let end = (((boundary - chunk.start_time_ms) * rate + 999) / 1000)
            .clamp(first as i64 + 1, frames as i64) as usize;
        let mut sum_sq: u128 = 0;
        for s in chunk.payload[first * 2 * channels..end * 2 * channels].chunks_exact(2) {
            let v = i64::from(i16::from_le_bytes([s[0], s[1]]));
            sum_sq += (v * v) as u128;
        }
        out.push((
            tick,
            (end - first) as u64,
            ((end - first) * channels) as u64,
            sum_sq,
        ));
        first = end;
    }
    out
}

/// RMS level in dBFS of `values` samples with the given sum of squares.
pub fn loudness_dbfs(sum_sq: u128, values: u64) -> f64 {
    if sum_sq == 0 || values == 0 {
        return SILENCE_DBFS;
    }
    let ratio = sum_sq as f64 / (values as f64 * 32768.0 * 32768.0);
    (10.0 * ratio.log10()).max(SILENCE_DBFS)
}

impl Operator for RoomActivity {
    fn name(&self) -> &'static str {
        "room_activity"
    }

    fn on_record(&mut self, event: &Event, pos: Position, late: bool, _ctx: &mut Context<'_>) {
        let room_id = event.room_id();
        if room_id.is_empty() {
            return;
        }
        let tick_ms = self.tick_ms;
        let start = self.tick_of(event.event_time_ms());
        // Look up before inserting: no allocation for a room already held.
        if !self.rooms.contains_key(room_id) {
            self.rooms.insert(room_id.to_string(), Room::default());
        }
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if let Some(s) = event.streamer_id() {
            if room.streamer_id != s {
                room.streamer_id = s.to_string();
            }
        }
        if late {
            // The tick is closed: only lasting state (who is inside) may change.
            if let Event::Action(a) = event {
                match ActionKind::try_from(a.kind) {
                    Ok(ActionKind::Enter) => {
                        room.present.entry(a.user_id.clone()).or_insert(pos);
                    }
                    Ok(ActionKind::Leave) => {
                        room.present.remove(&a.user_id);
                    }
                    _ => {}
                }
            }
            return;
        }
        if let Event::Audio(chunk) = event {
            if AudioFormat::try_from(chunk.format) == Ok(AudioFormat::PcmS16le) {
                for (tick, frames, values, sum_sq) in pcm_by_tick(chunk, tick_ms) {
                    let acc = room.open.entry(tick).or_default();
                    acc.any = true;
                    acc.audio_frames += frames;
                    acc.audio_values += values;
                    acc.audio_sum_sq += sum_sq;
                    acc.holds.hold(pos);
                }
                return;
            }
        }
        let acc = room.open.entry(start).or_default();
        acc.any = true;
        acc.holds.hold(pos);
        if let Some(s) = event.streamer_id() {
            acc.streamer_id = Some(s.to_string());
        }
        match event {
            Event::Comment(c) => {
                acc.comments += 1;
                if !acc.commenters.contains(&c.user_id) {
                    acc.commenters.insert(c.user_id.clone());
                }
            }
            Event::Video(_) => acc.video_segments += 1,
            Event::Audio(_) | Event::ShortVideo(_) => {}
            Event::Action(a) => match ActionKind::try_from(a.kind) {
                Ok(ActionKind::Impression) => acc.impressions += 1,
                Ok(ActionKind::Enter) => {
                    acc.enters += 1;
                    acc.presence
                        .push((a.event_time_ms, pos, a.user_id.clone(), true));
                }
                Ok(ActionKind::Leave) => {
                    acc.leaves += 1;
                    acc.presence
                        .push((a.event_time_ms, pos, a.user_id.clone(), false));
                }
                Ok(ActionKind::WatchProgress) => acc.watch_ms += u64::from(a.watch_ms),
                Ok(ActionKind::Like) => acc.likes += 1,
                Ok(ActionKind::Share) => acc.shares += 1,
                Ok(ActionKind::Follow) => acc.follows += 1,
                Ok(ActionKind::Gift) => {
                    acc.gifts += 1;
                    acc.gift_value += a.gift_value;
                }
                Ok(ActionKind::Comment) | Ok(ActionKind::Unspecified) | Err(_) => {}
            },
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        let tick_ms = self.tick_ms;
        self.rooms.retain(|room_id, room| {
            let mut acc = room.open.remove(&tick_start_ms).unwrap_or_default();
            acc.presence.sort_by_key(|(t, pos, _, _)| (*t, *pos));
            for (_, pos, user, enter) in acc.presence.drain(..) {
                if enter {
                    room.present.entry(user).or_insert(pos);
                } else {
                    room.present.remove(&user);
                }
            }
            if let Some(s) = acc.streamer_id.take() {
                room.streamer_id = s;
            }
            if acc.any || !room.present.is_empty() {
                let stats = RoomStats {
                    schema_version: SCHEMA_VERSION,
                    id: deterministic_id(&[
                        b"room-stats",
                        room_id.as_bytes(),
                        &tick_start_ms.to_le_bytes(),
                    ]),
                    room_id: room_id.clone(),
                    streamer_id: room.streamer_id.clone(),
                    tick_start_ms,
                    tick_ms: tick_ms as u32,
                    comments: acc.comments,
                    distinct_commenters: acc.commenters.len() as u32,
                    viewers_present: room.present.len() as u32,
                    enters: acc.enters,
                    leaves: acc.leaves,
                    impressions: acc.impressions,
                    watch_ms: acc.watch_ms,
                    likes: acc.likes,
                    shares: acc.shares,
                    follows: acc.follows,
                    gifts: acc.gifts,
                    gift_value: acc.gift_value,
                    video_segments: acc.video_segments,
                    has_audio: acc.audio_frames > 0,
                    audio_samples: acc.audio_frames,
                    loudness_dbfs: loudness_dbfs(acc.audio_sum_sq, acc.audio_values),
                };
                // The tick counts the viewers inside at its end: until it
                // is written, their ENTERs stay needed even if they leave
                // in a later tick (a replay from past an ENTER would count
                // one viewer fewer).
                let mut depends_on = acc.holds;
                for pos in room.present.values() {
                    depends_on.hold(*pos);
                }
                ctx.emit(Output {
                    topic: OutputTopic::RoomStats,
                    key: room_id.as_bytes().to_vec(),
                    id: stats.id.clone(),
                    payload: stats.encode_to_vec(),
                    headers: Vec::new(),
                    model_version: None,
                    tick_end_ms: Some(tick_start_ms + tick_ms),
                    depends_on,
                });
            }
            !(room.open.is_empty() && room.present.is_empty())
        });
    }

    fn holds(&self, holds: &mut Holds) {
        for room in self.rooms.values() {
            for tick in room.open.values() {
                holds.merge(&tick.holds);
            }
            for pos in room.present.values() {
                holds.hold(*pos);
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Comment, InputKind, ViewerAction};

    const T0: i64 = 1_767_225_600_000;

    fn pos(kind: InputKind, offset: i64) -> Position {
        Position { kind, offset }
    }

    fn action(user: &str, t: i64, kind: ActionKind) -> Event {
        Event::Action(ViewerAction {
            room_id: "r".into(),
            user_id: user.into(),
            event_time_ms: t,
            kind: kind as i32,
            watch_ms: 500,
            gift_value: 10,
            ..Default::default()
        })
    }

    fn stats(outputs: &[Output]) -> Vec<RoomStats> {
        outputs
            .iter()
            .map(|o| RoomStats::decode(&o.payload[..]).unwrap())
            .collect()
    }

    #[test]
    fn counts_presence_and_holds() {
        let mut op = RoomActivity::new(1000);
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        let c = |u: &str, t| {
            Event::Comment(Comment {
                room_id: "r".into(),
                user_id: u.into(),
                event_time_ms: t,
                ..Default::default()
            })
        };
        op.on_record(
            &action("a", T0 + 10, ActionKind::Enter),
            pos(InputKind::Actions, 0),
            false,
            &mut ctx,
        );
        op.on_record(
            &c("a", T0 + 20),
            pos(InputKind::Comments, 0),
            false,
            &mut ctx,
        );
        op.on_record(
            &c("a", T0 + 30),
            pos(InputKind::Comments, 1),
            false,
            &mut ctx,
        );
        op.on_record(
            &action("b", T0 + 40, ActionKind::Enter),
            pos(InputKind::Actions, 1),
            false,
            &mut ctx,
        );
        op.on_record(
            &action("b", T0 + 900, ActionKind::Leave),
            pos(InputKind::Actions, 2),
            false,
            &mut ctx,
        );
        op.on_record(
            &action("a", T0 + 1500, ActionKind::Gift),
            pos(InputKind::Actions, 3),
            false,
            &mut ctx,
        );
        let mut h = Holds::default();
        op.holds(&mut h);
        assert_eq!(h.get(InputKind::Actions), Some(0));
        op.on_tick(T0, &mut ctx);
        let mut h = Holds::default();
        op.holds(&mut h);
        assert_eq!(h.get(InputKind::Actions), Some(0), "a is still inside");
        assert_eq!(h.get(InputKind::Comments), None);
        op.on_tick(T0 + 1000, &mut ctx);
        op.on_tick(T0 + 2000, &mut ctx);
        let s = stats(&out);
        assert_eq!(s.len(), 3, "a keeps the room ticking");
        assert_eq!(
            (
                s[0].comments,
                s[0].distinct_commenters,
                s[0].viewers_present,
                s[0].enters,
                s[0].leaves
            ),
            (2, 1, 1, 2, 1)
        );
        assert_eq!(
            (s[1].gifts, s[1].gift_value, s[1].viewers_present),
            (1, 10, 1)
        );
        assert_eq!(s[2].comments, 0);
        // Each tick depends on the ENTER of every viewer it counts, also
        // where the tick itself had no action (a leaves later: a replay must
        // not start past a's ENTER while the tick is unwritten).
        assert_eq!(out[2].depends_on.get(InputKind::Actions), Some(0));
        assert_eq!(out[2].depends_on.get(InputKind::Comments), None);
        assert_eq!(
            s[0].id,
            deterministic_id(&[b"room-stats", b"r", &T0.to_le_bytes()])
        );
    }

    #[test]
    fn audio_split_across_ticks() {
        let samples: Vec<u8> = (0..16000)
            .flat_map(|i| ((i % 200) as i16 * 100).to_le_bytes())
            .collect();
        let chunk = AudioChunk {
            room_id: "r".into(),
            start_time_ms: T0 + 500,
            sample_rate: 16000,
            channels: 1,
            format: AudioFormat::PcmS16le as i32,
            payload: samples,
            ..Default::default()
        };
        let parts = pcm_by_tick(&chunk, 1000);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, T0);
        assert_eq!(parts[0].1 + parts[1].1, 16000);
        assert_eq!(parts[0].1, 8000);
        assert!(loudness_dbfs(parts[0].3, parts[0].2) < 0.0);
        assert_eq!(loudness_dbfs(0, 10), SILENCE_DBFS);
    }
}
