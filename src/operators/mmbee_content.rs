//! MMBee content segments: each room's stream cut into segments of `segment_ms`
//! (aligned to the epoch), each one's content assembled from the embeddings the
//! features operator sends ([`Note::Embedded`]) as the row MMBee's fusion reads
//! (layout `mmbee-content-v1`, [`CONTENT_WIDTH`] values):
//!
//! | columns | content |
//! |---|---|
//! | 0..3840 | 3 segment-frame embeddings (1280 each), spread over the segment's frames in time order |
//! | 3840..6912 | up to 8 comment embeddings (384 each), spread over the segment's comments in time order |
//! | 6912..7680 | up to 2 transcript embeddings (384 each), spread over the speech overlapping the segment, by start |
//!
//! Unused slots are zeros; the counts say how many of the first slots are filled.
//! "Spread" picks item `((2i + 1) n) / (2k)` of `n` for slot `i` of `k`.
//!
//! A segment completes when the room's features for the tick ending
//! `finalize_delay_ms` after the segment's end have been written (embeddings that
//! come later are counted as dropped, `late_content`); a room whose features stop
//! completes its open segments once the partition's ticks have passed them by a
//! further 30 s. On completion it tells later operators ([`Note::Content`]) and,
//! with `samples`, writes the segment as an `mmbee-content` training sample.
//!
//! Not for: the fusion model itself (MFQ; the scoring side runs it), viewers
//! (see [`super::gift_labels`]), or rooms without the features operator.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use metrics::{counter, Counter};
use prost::Message;

use crate::config::MmbeeConfig;
use crate::metrics::{Stage, TRAINING_SAMPLES};
use crate::runtime::{Context, Embedded, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, Event, TrainingSample, SCHEMA_VERSION};

/// Task name of the content samples.
pub const TASK: &str = "mmbee-content";
/// Layout name of the content row.
pub const LAYOUT: &str = "mmbee-content-v1";
/// Frames per segment, and their width.
pub const FRAMES: usize = 3;
/// Image embedding width.
pub const IMAGE_DIM: usize = 1280;
/// Comment slots.
pub const COMMENTS: usize = 8;
/// Transcript slots.
pub const TRANSCRIPTS: usize = 2;
/// Text embedding width.
pub const TEXT_DIM: usize = 384;
/// Width of the content row.
pub const CONTENT_WIDTH: usize = FRAMES * IMAGE_DIM + COMMENTS * TEXT_DIM + TRANSCRIPTS * TEXT_DIM;
/// Extra wait, past the finalize delay, for rooms whose features stopped.
const STALE_MS: i64 = 30_000;

/// The content operator for one partition.
pub struct MmbeeContent {
    cfg: Arc<MmbeeConfig>,
    rooms: HashMap<Arc<str>, Room>,
    written: Counter,
    stage: Stage,
    /// A room's features moved on since the last completion pass.
    dirty: bool,
    /// The partition's tick length (known from the first tick).
    tick_ms: Option<i64>,
}

#[derive(Default)]
struct Room {
    streamer_id: Arc<str>,
    /// Open segments by start.
    segments: BTreeMap<i64, Segment>,
    /// Segments starting before this are complete.
    complete_before: Option<i64>,
    /// End of the newest tick whose features came.
    now: i64,
}

#[derive(Default)]
struct Segment {
    frames: Vec<(i64, Arc<[f32]>)>,
    comments: Vec<(i64, Arc<[f32]>)>,
    transcripts: Vec<(i64, Arc<[f32]>)>,
    /// Comments counted from the records (embedded or not).
    comment_count: u32,
    /// Whether any features record of the room fell in it.
    live: bool,
    image_model: Option<Arc<str>>,
    text_model: Option<Arc<str>>,
    holds: Holds,
}

/// A completed segment's content row and counts.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentRow {
    /// The row ([`CONTENT_WIDTH`] values).
    pub row: Vec<f32>,
    /// Filled frame slots.
    pub frames: usize,
    /// Filled comment slots.
    pub comment_tokens: usize,
    /// Filled transcript slots.
    pub transcript_tokens: usize,
}

/// Slot `i` of `k` spread over `n` items (see the module docs).
fn spread(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        (0..n).collect()
    } else {
        (0..k).map(|i| ((2 * i + 1) * n) / (2 * k)).collect()
    }
}

/// Puts an embedding into a list kept in (time, embedding bits) order: items
/// of one time (comments sent in the same millisecond) take the same places
/// whatever order their embeddings came back in, so a replay builds the same
/// row.
fn insert_in_order(list: &mut Vec<(i64, Arc<[f32]>)>, t: i64, e: &Arc<[f32]>) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let key = bits(e);
    let i = list.partition_point(|(t2, e2)| *t2 < t || (*t2 == t && bits(e2) <= key));
    list.insert(i, (t, e.clone()));
}

/// Builds the content row from a segment's embeddings (each list sorted by time).
/// Embeddings of the wrong width are left out.
pub fn content_row(
    frames: &[(i64, Arc<[f32]>)],
    comments: &[(i64, Arc<[f32]>)],
    transcripts: &[(i64, Arc<[f32]>)],
) -> ContentRow {
    let mut row = vec![0.0f32; CONTENT_WIDTH];
    let mut place = |list: &[(i64, Arc<[f32]>)], k: usize, dim: usize, offset: usize| {
        let ok: Vec<&Arc<[f32]>> = list
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.len() == dim)
            .collect();
        let picked = spread(ok.len(), k);
        for (slot, &i) in picked.iter().enumerate() {
            let at = offset + slot * dim;
            row[at..at + dim].copy_from_slice(&ok[i][..]);
        }
        picked.len()
    };
    let frames = place(frames, FRAMES, IMAGE_DIM, 0);
    let comment_tokens = place(comments, COMMENTS, TEXT_DIM, FRAMES * IMAGE_DIM);
    let transcript_tokens = place(
        transcripts,
        TRANSCRIPTS,
        TEXT_DIM,
        FRAMES * IMAGE_DIM + COMMENTS * TEXT_DIM,
    );
    ContentRow {
        row,
        frames,
        comment_tokens,
        transcript_tokens,
    }
}

impl MmbeeContent {
    /// The operator for one partition.
    pub fn new(cfg: Arc<MmbeeConfig>) -> Self {
        MmbeeContent {
            cfg,
            rooms: HashMap::new(),
            written: counter!(TRAINING_SAMPLES, "task" => TASK),
            stage: Stage::new("mmbee_content"),
            dirty: false,
            tick_ms: None,
        }
    }

    fn seg_start(&self, t: i64) -> i64 {
        t.div_euclid(self.cfg.segment_ms) * self.cfg.segment_ms
    }

    fn room(&mut self, room_id: &str) -> &mut Room {
        if !self.rooms.contains_key(room_id) {
            self.rooms.insert(Arc::from(room_id), Room::default());
        }
        self.rooms.get_mut(room_id).expect("inserted above")
    }

    /// The open segment holding `t` (None when it completed already).
    fn open_segment(&mut self, room_id: &str, t: i64) -> Option<&mut Segment> {
        let start = self.seg_start(t);
        let room = self.room(room_id);
        if room.complete_before.is_some_and(|c| start < c) {
            return None;
        }
        Some(room.segments.entry(start).or_default())
    }

    /// Completes every segment of every room whose content can no longer
    /// change: by the room's own features (`now` of the room) or, for rooms
    /// gone quiet, by the partition's time `partition_now`.
    fn complete(&mut self, partition_now: i64, ctx: &mut Context<'_>) {
        self.dirty = false;
        let (len, delay) = (self.cfg.segment_ms, self.cfg.finalize_delay_ms);
        let mut gone = Vec::new();
        for (room_id, room) in &mut self.rooms {
            while let Some(entry) = room.segments.first_entry() {
                let start = *entry.key();
                let end = start + len;
                let by_room = end + delay <= room.now;
                let by_partition = end + delay + STALE_MS <= partition_now;
                if !(by_room || by_partition) {
                    break;
                }
                let seg = entry.remove();
                room.complete_before = Some(end);
                if !seg.live {
                    continue;
                }
                // The moment the row is final, whenever it is found to be.
                let at_ms = end + delay;
                let content = content_row(&seg.frames, &seg.comments, &seg.transcripts);
                let holds = seg.holds;
                if self.cfg.samples {
                    let sample = sample(room_id, &room.streamer_id, start, len, &seg, &content);
                    self.written.increment(1);
                    ctx.emit(Output {
                        topic: OutputTopic::TrainingSamples,
                        key: room_id.as_bytes().to_vec(),
                        id: sample.id.clone(),
                        payload: sample.encode_to_vec(),
                        headers: Vec::new(),
                        model_version: None,
                        tick_end_ms: Some(end),
                        depends_on: holds,
                    });
                }
                ctx.note(Note::Content {
                    room_id: room_id.clone(),
                    streamer_id: room.streamer_id.clone(),
                    start_ms: start,
                    end_ms: end,
                    at_ms,
                    content: Arc::new(content),
                    holds,
                });
            }
            if room.segments.is_empty() && room.now + STALE_MS + len + delay <= partition_now {
                gone.push(room_id.clone());
            }
        }
        for id in gone {
            self.rooms.remove(&id);
        }
    }
}

fn sample(
    room_id: &str,
    streamer_id: &str,
    start: i64,
    len: i64,
    seg: &Segment,
    content: &ContentRow,
) -> TrainingSample {
    let mut values = BTreeMap::new();
    values.insert("frames".to_owned(), content.frames as f64);
    values.insert("comment_tokens".to_owned(), content.comment_tokens as f64);
    values.insert(
        "transcript_tokens".to_owned(),
        content.transcript_tokens as f64,
    );
    values.insert("comments".to_owned(), f64::from(seg.comment_count));
    let model = |m: &Option<Arc<str>>| m.as_deref().unwrap_or("").to_owned();
    TrainingSample {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"training-samples",
            TASK.as_bytes(),
            room_id.as_bytes(),
            &start.to_le_bytes(),
        ]),
        task: TASK.into(),
        room_id: room_id.into(),
        event_time_ms: start,
        features: content.row.clone(),
        model_version: format!("{},{}", model(&seg.image_model), model(&seg.text_model)),
        streamer_id: streamer_id.into(),
        tick_ms: len,
        feature_layout: LAYOUT.into(),
        values,
        ..TrainingSample::default()
    }
}

impl Operator for MmbeeContent {
    fn name(&self) -> &'static str {
        "mmbee_content"
    }

    fn on_record(&mut self, event: &Event, pos: Position, late: bool, _ctx: &mut Context<'_>) {
        let room_id = event.room_id();
        if room_id.is_empty() {
            return;
        }
        if let Some(s) = event.streamer_id().filter(|s| !s.is_empty()) {
            let room = self.room(room_id);
            if room.streamer_id.is_empty() {
                room.streamer_id = Arc::from(s);
            }
        }
        if let Event::Comment(c) = event {
            if late {
                return;
            }
            if let Some(seg) = self.open_segment(room_id, c.event_time_ms) {
                seg.comment_count += 1;
                seg.holds.hold(pos);
            }
        }
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        match note {
            Note::Embedded {
                room_id,
                item,
                embedding,
                model,
            } => {
                let model = (!model.is_empty()).then(|| model.clone());
                match *item {
                    Embedded::SegmentFrame { time_ms } => match self.open_segment(room_id, time_ms)
                    {
                        Some(seg) => {
                            insert_in_order(&mut seg.frames, time_ms, embedding);
                            seg.image_model = model;
                        }
                        None => self.stage.dropped("late_content", 1),
                    },
                    Embedded::Comment { time_ms } => match self.open_segment(room_id, time_ms) {
                        Some(seg) => {
                            insert_in_order(&mut seg.comments, time_ms, embedding);
                            seg.text_model = model;
                        }
                        None => self.stage.dropped("late_content", 1),
                    },
                    Embedded::Transcript { start_ms, end_ms } => {
                        let len = self.cfg.segment_ms;
                        let mut placed = false;
                        let mut s = self.seg_start(start_ms);
                        while s <= end_ms {
                            if let Some(seg) = self.open_segment(room_id, s) {
                                insert_in_order(&mut seg.transcripts, start_ms, embedding);
                                seg.text_model.clone_from(&model);
                                placed = true;
                            }
                            s += len;
                        }
                        if !placed {
                            self.stage.dropped("late_content", 1);
                        }
                    }
                }
            }
            Note::Features { record, holds } => {
                let tick_end = record.tick_start_ms + record.tick_ms;
                if let Some(seg) = self.open_segment(&record.room_id, record.tick_start_ms) {
                    seg.live = true;
                    seg.holds.merge(holds);
                }
                let room = self.room(&record.room_id);
                room.now = room.now.max(tick_end);
                // Completed in `poll` or `on_tick`, right after: notes sent
                // while handling a note would not reach the next operator.
                self.dirty = true;
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        self.tick_ms = Some(ctx.tick_ms());
        self.complete(tick_start_ms + ctx.tick_ms(), ctx);
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        if self.dirty {
            self.complete(i64::MIN, ctx);
        }
    }

    fn on_finish(&mut self, ctx: &mut Context<'_>) {
        // The input ended: what each room has is all it will get.
        for room in self.rooms.values_mut() {
            room.now = i64::MAX / 4;
        }
        self.complete(i64::MAX / 4, ctx);
    }

    fn unfinished_tick(&self) -> Option<i64> {
        // A segment's sample is an output of the tick ending with it (the
        // ticks before are done: a replay rebuilds the segment from the
        // inputs it holds, whatever their outputs).
        let tick = self.tick_ms.unwrap_or(self.cfg.segment_ms);
        self.rooms
            .values()
            .filter_map(|r| r.segments.keys().next().copied())
            .min()
            .map(|s| s + self.cfg.segment_ms - tick)
    }

    fn holds(&self, holds: &mut Holds) {
        for room in self.rooms.values() {
            for seg in room.segments.values() {
                holds.merge(&seg.holds);
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
    use crate::schema::RoomFeatures;

    fn emb(dim: usize, x: f32) -> Arc<[f32]> {
        vec![x; dim].into()
    }

    #[test]
    fn items_of_one_time_take_the_same_places_in_any_arrival_order() {
        let items = [(5, 0.3), (2, 0.9), (5, -0.1), (5, 0.3), (7, 0.0), (5, 2.0)];
        let mut orders = vec![items.to_vec()];
        let mut reversed = items.to_vec();
        reversed.reverse();
        orders.push(reversed);
        let mut rotated = items.to_vec();
        rotated.rotate_left(2);
        orders.push(rotated);
        let lists: Vec<Vec<(i64, Vec<u32>)>> = orders
            .iter()
            .map(|order| {
                let mut list = Vec::new();
                for &(t, x) in order {
                    insert_in_order(&mut list, t, &emb(4, x));
                }
                list.iter()
                    .map(|(t, e)| (*t, e.iter().map(|v| v.to_bits()).collect()))
                    .collect()
            })
            .collect();
        assert_eq!(lists[0], lists[1]);
        assert_eq!(lists[0], lists[2]);
        let times: Vec<i64> = lists[0].iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![2, 5, 5, 5, 5, 7]);
    }

    fn features(room: &str, tick: i64) -> Note {
        Note::Features {
            record: Arc::new(RoomFeatures {
                room_id: room.into(),
                tick_start_ms: tick,
                tick_ms: 1000,
                ..RoomFeatures::default()
            }),
            holds: Holds::default(),
        }
    }

    fn embedded(room: &str, item: Embedded, e: Arc<[f32]>) -> Note {
        Note::Embedded {
            room_id: Arc::from(room),
            item,
            embedding: e,
            model: Arc::from("m@1"),
        }
    }

    #[test]
    fn spread_picks_evenly() {
        assert_eq!(spread(2, 3), vec![0, 1]);
        assert_eq!(spread(15, 3), vec![2, 7, 12]);
        assert_eq!(spread(9, 8), vec![0, 1, 2, 3, 5, 6, 7, 8]);
    }

    #[test]
    fn segments_complete_after_the_delay_with_their_content() {
        let cfg = Arc::new(MmbeeConfig {
            enabled: true,
            segment_ms: 10_000,
            finalize_delay_ms: 3_000,
            ..MmbeeConfig::default()
        });
        let mut op = MmbeeContent::new(cfg);
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        for (i, t) in [500, 2_500, 4_500, 6_500, 8_500].into_iter().enumerate() {
            op.on_note(
                &embedded(
                    "r",
                    Embedded::SegmentFrame { time_ms: t },
                    emb(IMAGE_DIM, i as f32),
                ),
                &mut ctx,
            );
        }
        op.on_note(
            &embedded(
                "r",
                Embedded::Comment { time_ms: 9_000 },
                emb(TEXT_DIM, 7.0),
            ),
            &mut ctx,
        );
        // Speech over the boundary lands in both segments.
        op.on_note(
            &embedded(
                "r",
                Embedded::Transcript {
                    start_ms: 9_500,
                    end_ms: 10_500,
                },
                emb(TEXT_DIM, 9.0),
            ),
            &mut ctx,
        );
        for tick in (0..12_000).step_by(1000) {
            op.on_note(&features("r", tick), &mut ctx);
            op.poll(&mut ctx);
        }
        // Tick 12 s ends at 13 s = end + delay: the first segment completes.
        assert!(ctx.notes.is_empty());
        op.on_note(&features("r", 12_000), &mut ctx);
        assert!(ctx.notes.is_empty(), "completed inside a note");
        op.poll(&mut ctx);
        let notes = std::mem::take(&mut ctx.notes);
        assert!(matches!(
            notes.as_slice(),
            [Note::Content {
                start_ms: 0,
                end_ms: 10_000,
                at_ms: 13_000,
                ..
            }]
        ));
        drop(ctx);
        assert_eq!(out.len(), 1);
        let s = TrainingSample::decode(&out[0].payload[..]).unwrap();
        assert_eq!((s.task.as_str(), s.feature_layout.as_str()), (TASK, LAYOUT));
        assert_eq!(s.features.len(), CONTENT_WIDTH);
        // Frames 0, 2, 4 of 5: values 0, 2, 4.
        assert_eq!(s.features[0], 0.0);
        assert_eq!(s.features[IMAGE_DIM], 2.0);
        assert_eq!(s.features[2 * IMAGE_DIM], 4.0);
        assert_eq!(s.features[FRAMES * IMAGE_DIM], 7.0);
        assert_eq!(s.features[FRAMES * IMAGE_DIM + COMMENTS * TEXT_DIM], 9.0);
        assert_eq!(s.values["frames"], 3.0);
        assert_eq!(s.values["comment_tokens"], 1.0);
        assert_eq!(s.values["transcript_tokens"], 1.0);
        // A frame for the completed segment is late now.
        let mut out2 = Vec::new();
        let mut ctx = Context::new(&mut out2, 0, 1000);
        op.on_note(
            &embedded(
                "r",
                Embedded::SegmentFrame { time_ms: 9_999 },
                emb(IMAGE_DIM, 1.0),
            ),
            &mut ctx,
        );
        op.on_finish(&mut ctx);
        drop(ctx);
        // The second segment [10 s, 20 s) had ticks 10..12 s: written at the end.
        let s = TrainingSample::decode(&out2[0].payload[..]).unwrap();
        assert_eq!(s.event_time_ms, 10_000);
        assert_eq!(s.values["transcript_tokens"], 1.0);
        assert_eq!(s.values["frames"], 0.0);
    }
}
