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
//! # State on the changelog
//! Who is inside a room lasts as long as the viewers stay, hours perhaps.
//! Without a changelog the ENTER of every viewer inside stays held, so the
//! actions offset cannot be committed past it and a restart replays hours.
//! With the room changelog (Kafka; see [`Operator::snapshot`]) each room
//! whose state changed gets a record of all of it (viewers inside, open
//! ticks) at every snapshot, a dropped room a tombstone, and the partition
//! a record of the cut alone; the positions of the records folded in since
//! the room's last record are what stay held. After a restore, a room
//! skips the replayed records and ticks its cut covers (the latest of its
//! own record's cut and the partition's: a room that did not change since
//! its record had the same state at the partition's later cut).
//!
//! Not for: anything learned (highlights, gifts); those are their own operators.

use std::collections::{BTreeMap, HashMap, HashSet};

use foldhash::fast::RandomState;

use prost::Message;

use crate::runtime::{Context, Holds, Operator, Output, OutputTopic, Position};
use crate::schema::{
    deterministic_id, ActionKind, ActivityPresence, ActivityTick, ActivityViewer, AudioChunk,
    AudioFormat, Event, InputKind, RoomActivityRecord, RoomStats, SCHEMA_VERSION,
};
use crate::state::room_log::{Logged, RoomLog};
use crate::state::Cut;

/// Loudness reported for digital silence.
pub const SILENCE_DBFS: f64 = -120.0;

/// The room-activity operator for one partition.
pub struct RoomActivity {
    tick_ms: i64,
    rooms: HashMap<String, Room, RandomState>,
    /// The rooms' changelog: once on, the viewers inside are not held.
    log: RoomLog,
}

#[derive(Default)]
struct Room {
    streamer_id: String,
    /// Open ticks by start time.
    open: BTreeMap<i64, Tick>,
    /// Viewers inside, with the position of the ENTER that put them there.
    present: HashMap<String, Position, RandomState>,
    log: Logged,
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
            log: RoomLog::new("room_activity"),
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
            let room = Room {
                log: self.log.entry(room_id),
                ..Room::default()
            };
            self.rooms.insert(room_id.to_string(), room);
        }
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if room.log.covers(pos) {
            // Replayed: the restored state has it.
            return;
        }
        // A tick closed before the restored state was taken: only lasting
        // state may change.
        let late = late || room.log.closed(start);
        room.log.folded(pos);
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
        let changelog = self.log.on();
        let log = &mut self.log;
        self.rooms.retain(|room_id, room| {
            if room.log.closed(tick_start_ms) {
                // Closed, and its outputs written, before the room's cut.
                return true;
            }
            let acc = room.open.remove(&tick_start_ms);
            let mut acc = match acc {
                Some(acc) => {
                    room.log.changed();
                    acc
                }
                None => Tick::default(),
            };
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
                ctx.emit(stats_output(
                    room_id,
                    room,
                    acc,
                    tick_start_ms,
                    tick_ms,
                    changelog,
                ));
            }
            let keep = !(room.open.is_empty() && room.present.is_empty());
            if !keep {
                log.drop_room(room_id, room.log);
            }
            keep
        });
    }

    fn holds(&self, holds: &mut Holds) {
        if self.log.on() {
            // Everything before each room's last record is in it.
            self.log.holds(self.rooms.values().map(|r| &r.log), holds);
            return;
        }
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
        self.log.clear();
    }

    fn resumed_at(&self) -> Option<Cut> {
        self.log.restored()
    }

    fn snapshot(&mut self, cut: &Cut, ctx: &mut Context<'_>) {
        let partition = RoomActivityRecord {
            schema_version: SCHEMA_VERSION,
            cut: Some(cut.to_record()),
            ..Default::default()
        };
        self.log.snapshot(
            cut,
            ctx,
            self.rooms.iter_mut().map(|(k, r)| (k.as_str(), r)),
            |r| &mut r.log,
            |r, cut| room_record(r, cut).encode_to_vec(),
            partition.encode_to_vec(),
        );
    }

    fn restore(&mut self, key: &[u8], value: &[u8], _emitted_through_ms: Option<i64>) {
        let rooms = self.rooms.values_mut().map(|r| &mut r.log);
        let restored = self
            .log
            .restore(key, value, |r: &RoomActivityRecord| r.cut.as_ref(), rooms);
        if let Some((room_id, record, log)) = restored {
            let mut room = room_from(record);
            room.log = log;
            self.rooms.insert(room_id, room);
        }
    }
}

/// The `room-stats` record of a closed tick.
fn stats_output(
    room_id: &str,
    room: &Room,
    acc: Tick,
    tick_start_ms: i64,
    tick_ms: i64,
    changelog: bool,
) -> Output {
    let stats = RoomStats {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"room-stats",
            room_id.as_bytes(),
            &tick_start_ms.to_le_bytes(),
        ]),
        room_id: room_id.to_string(),
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
    // The tick counts the viewers inside at its end: until it is written,
    // their ENTERs stay needed even if they leave in a later tick (a replay
    // from past an ENTER would count one viewer fewer). With the changelog,
    // the room's record or its held positions have them instead.
    let mut depends_on = acc.holds;
    if !changelog {
        for pos in room.present.values() {
            depends_on.hold(*pos);
        }
    }
    Output {
        topic: OutputTopic::RoomStats,
        key: room_id.as_bytes().to_vec(),
        id: stats.id.clone(),
        payload: stats.encode_to_vec(),
        headers: Vec::new(),
        model_version: None,
        tick_end_ms: Some(tick_start_ms + tick_ms),
        depends_on,
    }
}

/// The changelog record of a room's state, taken at `cut`.
fn room_record(room: &Room, cut: &Cut) -> RoomActivityRecord {
    let mut present: Vec<ActivityViewer> = room
        .present
        .iter()
        .map(|(user, pos)| ActivityViewer {
            user_id: user.clone(),
            offset: pos.offset,
        })
        .collect();
    present.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let open = room
        .open
        .iter()
        .map(|(&start_ms, t)| {
            let mut commenters: Vec<String> = t.commenters.iter().cloned().collect();
            commenters.sort();
            ActivityTick {
                start_ms,
                any: t.any,
                streamer_id: t.streamer_id.clone().unwrap_or_default(),
                has_streamer: t.streamer_id.is_some(),
                comments: t.comments,
                commenters,
                impressions: t.impressions,
                enters: t.enters,
                leaves: t.leaves,
                watch_ms: t.watch_ms,
                likes: t.likes,
                shares: t.shares,
                follows: t.follows,
                gifts: t.gifts,
                gift_value: t.gift_value,
                video_segments: t.video_segments,
                audio_frames: t.audio_frames,
                audio_values: t.audio_values,
                audio_sum_sq_hi: (t.audio_sum_sq >> 64) as u64,
                audio_sum_sq_lo: t.audio_sum_sq as u64,
                presence: t
                    .presence
                    .iter()
                    .map(|(t_ms, pos, user, enter)| ActivityPresence {
                        t_ms: *t_ms,
                        offset: pos.offset,
                        user_id: user.clone(),
                        enter: *enter,
                    })
                    .collect(),
            }
        })
        .collect();
    RoomActivityRecord {
        schema_version: SCHEMA_VERSION,
        cut: Some(cut.to_record()),
        streamer_id: room.streamer_id.clone(),
        present,
        open,
    }
}

/// A room as its changelog record has it (positions of actions only).
fn room_from(r: RoomActivityRecord) -> Room {
    let at = |offset| Position {
        kind: InputKind::Actions,
        offset,
    };
    Room {
        streamer_id: r.streamer_id,
        present: r
            .present
            .into_iter()
            .map(|v| (v.user_id, at(v.offset)))
            .collect(),
        open: r
            .open
            .into_iter()
            .map(|t| {
                let tick = Tick {
                    any: t.any,
                    streamer_id: t.has_streamer.then_some(t.streamer_id),
                    comments: t.comments,
                    commenters: t.commenters.into_iter().collect(),
                    impressions: t.impressions,
                    enters: t.enters,
                    leaves: t.leaves,
                    watch_ms: t.watch_ms,
                    likes: t.likes,
                    shares: t.shares,
                    follows: t.follows,
                    gifts: t.gifts,
                    gift_value: t.gift_value,
                    video_segments: t.video_segments,
                    audio_frames: t.audio_frames,
                    audio_values: t.audio_values,
                    audio_sum_sq: (u128::from(t.audio_sum_sq_hi) << 64)
                        | u128::from(t.audio_sum_sq_lo),
                    presence: t
                        .presence
                        .into_iter()
                        .map(|p| (p.t_ms, at(p.offset), p.user_id, p.enter))
                        .collect(),
                    // The record covers its records: nothing to hold.
                    holds: Holds::default(),
                };
                (t.start_ms, tick)
            })
            .collect(),
        log: Logged::default(),
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

    /// One record of the replay harness: (stream, time, room, user, kind).
    type Rec = (InputKind, i64, u8, u8, u8);

    fn record(r: &Rec) -> Event {
        let (kind, t, room, user, what) = *r;
        let (room, user) = (format!("room-{room}"), format!("user-{user}"));
        if kind == InputKind::Comments {
            return Event::Comment(Comment {
                room_id: room,
                user_id: user,
                event_time_ms: t,
                ..Default::default()
            });
        }
        let kind = [ActionKind::Enter, ActionKind::Leave, ActionKind::Like][what as usize % 3];
        Event::Action(ViewerAction {
            room_id: room,
            user_id: user,
            event_time_ms: t,
            kind: kind as i32,
            ..Default::default()
        })
    }

    /// Feeds `recs` (in time order, offsets per stream from 0) from the
    /// first record at or after `from` per stream, closing ticks as the
    /// runtime does with no allowed lateness; calls `at(op, i, ctx)` before
    /// record `i`. Returns the stats written, by (room, tick).
    fn run(
        op: &mut RoomActivity,
        recs: &[Rec],
        from: [i64; InputKind::COUNT],
        mut at: impl FnMut(&mut RoomActivity, usize, &Cut, &mut Context<'_>),
    ) -> BTreeMap<(String, i64), RoomStats> {
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        let mut next = [0i64; InputKind::COUNT];
        let mut next_tick: Option<i64> = None;
        let mut processed = [None; InputKind::COUNT];
        // As the runtime: a restored state's open ticks close, even where
        // the replay starts after them.
        let resume = op.resumed_at().and_then(|c| c.next_tick_ms);
        for (i, r) in recs.iter().enumerate() {
            let k = r.0.index();
            let p = pos(r.0, next[k]);
            next[k] += 1;
            at(
                op,
                i,
                &Cut {
                    processed,
                    next_tick_ms: next_tick,
                    stream_time_ms: None,
                },
                &mut ctx,
            );
            if p.offset < from[k] {
                continue;
            }
            let tick = r.1.div_euclid(1000) * 1000;
            let mut nt = *next_tick.get_or_insert(resume.map_or(tick, |r| r.min(tick)));
            while nt + 1000 <= r.1 {
                op.on_tick(nt, &mut ctx);
                nt += 1000;
            }
            next_tick = Some(nt);
            op.on_record(&record(r), p, tick < nt, &mut ctx);
            processed[k] = Some(p.offset + 1);
        }
        if let Some(mut nt) = next_tick {
            for _ in 0..3 {
                op.on_tick(nt, &mut ctx);
                nt += 1000;
            }
        }
        let mut stats = BTreeMap::new();
        for o in &out {
            if o.topic == OutputTopic::RoomStats {
                let s = RoomStats::decode(&o.payload[..]).unwrap();
                assert!(
                    stats
                        .insert((s.room_id.clone(), s.tick_start_ms), s)
                        .is_none(),
                    "a tick written twice in one run"
                );
            }
        }
        stats
    }

    proptest::proptest! {
        /// A room-activity state restored from its changelog records, fed
        /// a replay from anywhere at or before the cut, writes exactly what
        /// the uninterrupted run wrote after the cut, and nothing the cut
        /// had written; and once the records are written, the viewers'
        /// ENTERs are not held.
        #[test]
        fn restored_state_replays_exactly(
            raw in proptest::collection::vec((proptest::bool::ANY, 0i64..700, 0u8..3, 0u8..5, 0u8..3), 5..80),
            at_frac in 0.0f64..1.0,
            // A third of the cases replay from the cut itself.
            from_frac in 0.0f64..1.5,
        ) {
            let mut t = T0;
            let recs: Vec<Rec> = raw
                .iter()
                .map(|&(comment, gap, room, user, what)| {
                    t += gap;
                    let kind = if comment { InputKind::Comments } else { InputKind::Actions };
                    (kind, t, room, user, what)
                })
                .collect();
            let at = ((recs.len() as f64) * at_frac) as usize;
            let mut changelog: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut cut_taken = Cut::default();
            let mut a = RoomActivity::new(1000);
            let whole = run(&mut a, &recs, [0; InputKind::COUNT], |op, i, cut, ctx| {
                if i == at {
                    let before = ctx.outputs.len();
                    op.snapshot(cut, ctx);
                    for o in &ctx.outputs[before..] {
                        assert!(matches!(o.topic, OutputTopic::RoomChangelog { partition: 0 }));
                        changelog.push((o.key.clone(), o.payload.clone()));
                    }
                    ctx.outputs.truncate(before);
                    cut_taken = *cut;
                    let mut h = Holds::default();
                    op.holds(&mut h);
                    assert_eq!(h, Holds::default(), "nothing held once written");
                }
            });
            let mut b = RoomActivity::new(1000);
            let mut latest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (k, v) in changelog {
                latest.insert(k, v);
            }
            for (k, v) in &latest {
                let (name, key) = crate::runtime::split_changelog_key(k).unwrap();
                proptest::prop_assert_eq!(name, b"room_activity");
                if !v.is_empty() {
                    b.restore(key, v, None);
                }
            }
            let mut from = [0i64; InputKind::COUNT];
            for (f, p) in from.iter_mut().zip(cut_taken.processed) {
                *f = ((p.unwrap_or(0) as f64) * from_frac.min(1.0)) as i64;
            }
            let replay = run(&mut b, &recs, from, |_, _, _, _| {});
            let after: BTreeMap<_, _> = whole
                .iter()
                .filter(|((_, tick), _)| !cut_taken.closed(*tick))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            proptest::prop_assert_eq!(replay, after);
        }
    }
}
