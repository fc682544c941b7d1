//! The `room-embeddings` topic read as a global table: every instance of the
//! user stage reads all of its partitions from the beginning (it is compacted,
//! so that is one record per live room) and keeps following it, the way Kafka
//! Streams reads a GlobalKTable. Operators of the user stage look rooms up and
//! ask for what changed since they last looked ([`RoomTable::changes_since`]);
//! the reader wakes them when something did.
//!
//! The topic also carries the room stage's progress (see `RoomEmbedding` in
//! the schema): every room-stage partition writes, to every partition of the
//! topic, the time through which it has written its rooms' content. A table
//! that is *gated* ([`RoomTable::gated`]: the engine's room stage writes that
//! progress) says through what time its content is complete
//! ([`RoomTable::content_through`]): only once it has read each partition up
//! to where that partition ended when it was assigned, and then the least
//! progress over every partition of the topic and every room-stage partition
//! that reported on it. Joining content no later than that makes the join
//! independent of when the content arrived.
//!
//! With the user stage's sequences on, the room stage also writes each
//! room's highlight score per tick to the topic; the table keeps the recent
//! ones ([`RoomTable::score_as_of`]), under the same progress.
//!
//! Not for: room-keyed state (the room stage owns it), or committing offsets
//! (a table is rebuilt from the topic at every start).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metrics::gauge;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::kafka::{client_config, KafkaFailure};
use crate::metrics::{Stage, ROOM_TABLE_ROOMS};
use crate::schema::RoomEmbedding;

/// Changes remembered for readers that fall behind; older ones read the whole table.
const LOG_KEPT: usize = 100_000;

/// How far back, in event time behind the newest segment in the table, a
/// room's earlier segments are kept for [`RoomTable::pooled_as_of`]: a
/// segment goes once its successor completed longer ago than this.
pub const HISTORY_MS: i64 = 15 * 60 * 1000;

/// One room's latest content.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomContent {
    /// The room's streamer.
    pub streamer_id: Arc<str>,
    /// The content segment it represents.
    pub start_ms: i64,
    /// When it completed.
    pub at_ms: i64,
    /// The tokens, row-major.
    pub tokens: Arc<[f32]>,
    /// Width of a token row (0: one row).
    pub dim: u32,
    /// `name@version` of the model that made them.
    pub model: Arc<str>,
}

impl RoomContent {
    /// The mean of the token rows: one vector for the room's content.
    pub fn pooled(&self) -> Vec<f32> {
        let dim = match self.dim as usize {
            0 => self.tokens.len(),
            d => d,
        };
        if dim == 0 {
            return Vec::new();
        }
        let rows = self.tokens.len() / dim;
        let mut out = vec![0f32; dim];
        for row in self.tokens.chunks_exact(dim) {
            for (o, x) in out.iter_mut().zip(row) {
                *o += x;
            }
        }
        for o in &mut out {
            *o /= rows.max(1) as f32;
        }
        out
    }
}

/// A segment in a room's history: when it completed, and its pooled tokens.
type Segment = (i64, Arc<[f32]>);

#[derive(Default)]
struct Inner {
    rooms: HashMap<Arc<str>, RoomContent>,
    /// Per room, (completion, pooled content) of its segments, oldest first,
    /// back to [`HISTORY_MS`] behind `newest_ms`.
    history: HashMap<Arc<str>, VecDeque<Segment>>,
    /// The latest completion of any segment put.
    newest_ms: i64,
    /// Per room, (tick end, highlight score) of its scored ticks, oldest
    /// first, back to [`HISTORY_MS`] behind `newest_score_ms`.
    scores: HashMap<Arc<str>, VecDeque<(i64, f32)>>,
    /// The latest tick end of any score put.
    newest_score_ms: i64,
    /// Up to when every room's history was last pruned (a room prunes its
    /// own when it changes; one that no longer changes, by these sweeps).
    swept_ms: i64,
    /// (sequence number, room, content) of every change, oldest first.
    log: VecDeque<(u64, Arc<str>, RoomContent)>,
    next_seq: u64,
    wakes: Vec<Weak<Notify>>,
    /// Whether [`RoomTable::content_through`] waits for progress.
    gated: bool,
    /// Partitions of the topic, once assigned.
    partitions: Option<i32>,
    /// Whether every partition has been read up to where it ended at assignment.
    caught_up: bool,
    /// Per topic partition, per room-stage partition: its progress.
    progress: HashMap<i32, HashMap<i32, i64>>,
}

/// Drops the entries of `history` superseded before `horizon`: an entry goes
/// once its successor came at or before it (the last always stays).
fn prune<T>(history: &mut VecDeque<(i64, T)>, horizon: i64) {
    while history.get(1).is_some_and(|(next, _)| *next < horizon) {
        history.pop_front();
    }
}

impl Inner {
    /// Once every [`HISTORY_MS`] of event time, prunes every room's
    /// history, so that rooms that ended keep one entry each.
    fn sweep(&mut self) {
        let newest = self.newest_ms.max(self.newest_score_ms);
        if newest < self.swept_ms.saturating_add(HISTORY_MS) {
            return;
        }
        self.swept_ms = newest;
        let (segments, scores) = (
            self.newest_ms.saturating_sub(HISTORY_MS),
            self.newest_score_ms.saturating_sub(HISTORY_MS),
        );
        for h in self.history.values_mut() {
            prune(h, segments);
        }
        for h in self.scores.values_mut() {
            prune(h, scores);
        }
    }

    fn wake(&mut self) {
        self.wakes.retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        });
    }
}

/// The table (see the module docs).
#[derive(Default)]
pub struct RoomTable {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RoomTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomTable")
            .field("rooms", &self.len())
            .finish_non_exhaustive()
    }
}

impl RoomTable {
    /// An empty table whose content is complete as soon as it is there (for
    /// a table filled by hand).
    pub fn new() -> Arc<Self> {
        Arc::new(RoomTable::default())
    }

    /// An empty table that follows the room stage's progress: its content
    /// is complete through [`RoomTable::content_through`].
    pub fn gated() -> Arc<Self> {
        let t = RoomTable::default();
        t.lock().gated = true;
        Arc::new(t)
    }

    /// The time through which every room's content that completed by then
    /// is in the table; None when the table is not gated (all it has is
    /// complete). `i64::MIN` until it has caught up and every partition of
    /// the topic has progress.
    pub fn content_through(&self) -> Option<i64> {
        let g = self.lock();
        if !g.gated {
            return None;
        }
        let Some(n) = g.partitions.filter(|_| g.caught_up) else {
            return Some(i64::MIN);
        };
        let mut through = i64::MAX;
        for q in 0..n {
            let least = g
                .progress
                .get(&q)
                .and_then(|by_source| by_source.values().min().copied());
            through = through.min(least.unwrap_or(i64::MIN));
        }
        Some(through)
    }

    /// The topic's partitions have been assigned (`n` of them).
    pub fn assigned(&self, n: i32) {
        self.lock().partitions = Some(n);
    }

    /// Every partition has been read up to where it ended at assignment.
    pub fn caught_up(&self) {
        let mut g = self.lock();
        if !g.caught_up {
            g.caught_up = true;
            g.wake();
        }
    }

    /// Room-stage partition `source` has written, before this point of
    /// topic partition `partition`, every room's content that completed at
    /// or before `through`. Progress never goes back.
    pub fn progress(&self, partition: i32, source: i32, through: i64) {
        let mut g = self.lock();
        let slot = g
            .progress
            .entry(partition)
            .or_default()
            .entry(source)
            .or_insert(i64::MIN);
        if through > *slot {
            *slot = through;
            g.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a room's content unless the table holds a newer segment of it.
    /// Returns whether it changed.
    pub fn put(&self, room: &str, content: RoomContent) -> bool {
        let mut g = self.lock();
        if g.rooms
            .get(room)
            .is_some_and(|old| old.start_ms >= content.start_ms)
        {
            return false;
        }
        let key: Arc<str> = g
            .rooms
            .get_key_value(room)
            .map_or_else(|| Arc::from(room), |(k, _)| k.clone());
        g.rooms.insert(key.clone(), content.clone());
        g.newest_ms = g.newest_ms.max(content.at_ms);
        let horizon = g.newest_ms.saturating_sub(HISTORY_MS);
        let segments = g.history.entry(key.clone()).or_default();
        let at = segments.partition_point(|(at, _)| *at <= content.at_ms);
        segments.insert(at, (content.at_ms, content.pooled().into()));
        prune(segments, horizon);
        g.sweep();
        let seq = g.next_seq;
        g.next_seq += 1;
        g.log.push_back((seq, key, content));
        while g.log.len() > LOG_KEPT {
            g.log.pop_front();
        }
        g.wake();
        gauge!(ROOM_TABLE_ROOMS).set(g.rooms.len() as f64);
        true
    }

    /// A room's content.
    pub fn get(&self, room: &str) -> Option<RoomContent> {
        self.lock().rooms.get(room).cloned()
    }

    /// The room's content as of `t`: the pooled tokens ([`RoomContent::pooled`])
    /// of its latest segment that completed at or before `t`. Segments
    /// superseded more than [`HISTORY_MS`] before the newest in the table
    /// are forgotten.
    pub fn pooled_as_of(&self, room: &str, t: i64) -> Option<Arc<[f32]>> {
        let g = self.lock();
        let segments = g.history.get(room)?;
        let n = segments.partition_point(|(at, _)| *at <= t);
        n.checked_sub(1).map(|i| segments[i].1.clone())
    }

    /// Puts a room's highlight score for the tick that ended at `tick_end_ms`
    /// (a replay of one it has replaces it).
    pub fn put_score(&self, room: &str, tick_end_ms: i64, score: f32) {
        let mut g = self.lock();
        g.newest_score_ms = g.newest_score_ms.max(tick_end_ms);
        let horizon = g.newest_score_ms.saturating_sub(HISTORY_MS);
        let scores = match g.scores.get_mut(room) {
            Some(s) => s,
            None => g.scores.entry(Arc::from(room)).or_default(),
        };
        let at = scores.partition_point(|(end, _)| *end < tick_end_ms);
        match scores.get_mut(at) {
            Some(slot) if slot.0 == tick_end_ms => slot.1 = score,
            _ => scores.insert(at, (tick_end_ms, score)),
        }
        prune(scores, horizon);
        g.sweep();
    }

    /// The room's highlight score as of `t`: that of its latest scored tick
    /// that ended at or before `t`. Ticks more than [`HISTORY_MS`] older
    /// than the room's next are forgotten, as segments are.
    pub fn score_as_of(&self, room: &str, t: i64) -> Option<f32> {
        let g = self.lock();
        let scores = g.scores.get(room)?;
        let n = scores.partition_point(|(end, _)| *end <= t);
        n.checked_sub(1).map(|i| scores[i].1)
    }

    /// Rooms in the table.
    pub fn len(&self) -> usize {
        self.lock().rooms.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every change since sequence number `seq`, oldest first (a room's
    /// segments each once, in the order they came), and the sequence number
    /// to ask from next time. A reader further behind than the log reaches
    /// gets every room's latest.
    pub fn changes_since(&self, seq: u64) -> (Vec<(Arc<str>, RoomContent)>, u64) {
        let g = self.lock();
        let next = g.next_seq;
        if seq >= next {
            return (Vec::new(), next);
        }
        let out = if g.log.front().is_some_and(|(s, _, _)| *s <= seq) {
            g.log
                .iter()
                .filter(|(s, _, _)| *s >= seq)
                .map(|(_, r, c)| (r.clone(), c.clone()))
                .collect()
        } else {
            g.rooms
                .iter()
                .map(|(r, c)| (r.clone(), c.clone()))
                .collect()
        };
        (out, next)
    }

    /// Wakes `wake` after every change (for as long as it lives).
    pub fn subscribe(&self, wake: &Arc<Notify>) {
        self.lock().wakes.push(Arc::downgrade(wake));
    }

    /// Decodes one record of `room-embeddings` partition `partition` and
    /// puts it: a room's content or highlight score, or a room-stage
    /// partition's progress.
    /// None: not a valid record (counted, skipped: the table is an output of
    /// ours).
    pub fn put_record(&self, partition: i32, payload: &[u8]) -> Option<bool> {
        let rec = RoomEmbedding::decode(payload).ok()?;
        if rec.room_id.is_empty() && rec.embedding.is_empty() {
            self.progress(partition, rec.source_partition, rec.content_through_ms);
            return Some(false);
        }
        if let (Some(score), false) = (rec.highlight_score, rec.room_id.is_empty()) {
            self.put_score(&rec.room_id, rec.event_time_ms, score);
            return Some(false);
        }
        if rec.room_id.is_empty() || rec.embedding.is_empty() {
            return None;
        }
        Some(self.put(
            &rec.room_id,
            RoomContent {
                streamer_id: Arc::from(rec.streamer_id.as_str()),
                start_ms: rec.segment_start_ms,
                at_ms: rec.event_time_ms,
                tokens: rec.embedding.into(),
                dim: rec.dim,
                model: Arc::from(rec.model_version.as_str()),
            },
        ))
    }
}

/// Follows `topic` into `table` until `stop` is set (blocking: run it on its
/// own thread). Reads every partition from the beginning; commits nothing.
pub fn follow(
    cfg: &KafkaConfig,
    topic: &str,
    table: Arc<RoomTable>,
    stop: Arc<AtomicBool>,
) -> Result<(), KafkaFailure> {
    let mut c = client_config(cfg);
    c.set("group.id", format!("{}-room-table", cfg.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = c.create().map_err(|source| KafkaFailure::Client {
        what: "room-table consumer",
        source,
    })?;
    let stage = Stage::new("room_table");
    let mut assigned = 0;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        if assigned == 0 {
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                Ok(md) => {
                    let n = md
                        .topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map_or(0, |t| t.partitions().len());
                    if n > 0 {
                        let mut tpl = TopicPartitionList::new();
                        for p in 0..n as i32 {
                            let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
                        }
                        consumer
                            .assign(&tpl)
                            .map_err(|source| KafkaFailure::Operation {
                                what: "assign the room table",
                                source,
                            })?;
                        assigned = n;
                        table.assigned(n as i32);
                        // Where each partition ends now: the table is caught
                        // up once it has read that far.
                        for p in 0..n as i32 {
                            let end = match consumer.fetch_watermarks(
                                topic,
                                p,
                                Duration::from_secs(10),
                            ) {
                                Ok((low, high)) if high > low => high,
                                Ok(_) => continue,
                                Err(e) => {
                                    warn!(topic, partition = p, error = %e, "no end offset for the room table; reading it as empty");
                                    continue;
                                }
                            };
                            ends.insert(p, end);
                        }
                        if ends.is_empty() {
                            table.caught_up();
                        }
                        info!(topic, partitions = n, "following the room table");
                    }
                }
                Err(e) => warn!(topic, error = %e, "no metadata for the room table yet"),
            }
            if assigned == 0 {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                stage.received.increment(1);
                match msg
                    .payload()
                    .and_then(|p| table.put_record(msg.partition(), p))
                {
                    Some(_) => stage.sent.increment(1),
                    None => stage.error("invalid_record"),
                }
                if ends
                    .get(&msg.partition())
                    .is_some_and(|&end| msg.offset() + 1 >= end)
                {
                    ends.remove(&msg.partition());
                    if ends.is_empty() {
                        table.caught_up();
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // The end (a transaction's control record may be the last
                // offset: no message reaches it).
                let was_behind = ends.remove(&p).is_some();
                if was_behind && ends.is_empty() {
                    table.caught_up();
                }
            }
            Some(Err(e)) => {
                stage.error("consume");
                warn!(topic, error = %e, "room table consume error");
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(start_ms: i64) -> RoomContent {
        RoomContent {
            streamer_id: Arc::from("s"),
            start_ms,
            at_ms: start_ms + 13_000,
            tokens: vec![start_ms as f32].into(),
            dim: 1,
            model: Arc::from("mmbee@1"),
        }
    }

    #[test]
    fn a_room_is_read_as_of_a_time_from_its_recent_segments() {
        let t = RoomTable::new();
        let at = |start: i64| start + 13_000;
        assert!(t.put("a", content(0)));
        assert!(t.put("a", content(10_000)));
        assert!(t.put("b", content(0)));
        let as_of = |room: &str, ms: i64| t.pooled_as_of(room, ms).map(|v| v[0]);
        assert_eq!(as_of("a", at(0) - 1), None, "nothing had completed");
        assert_eq!(as_of("a", at(0)), Some(0.0));
        assert_eq!(as_of("a", at(10_000) - 1), Some(0.0));
        assert_eq!(as_of("a", at(10_000)), Some(10_000.0));
        assert_eq!(as_of("c", at(10_000)), None, "an unknown room");
        // A segment goes once its successor completed more than the horizon
        // before the newest in the table; the successor stays.
        assert!(t.put("b", content(10_000 + HISTORY_MS)));
        assert_eq!(
            as_of("a", at(0)),
            Some(0.0),
            "a's second completed within the horizon"
        );
        assert!(t.put("b", content(20_000 + HISTORY_MS)));
        assert_eq!(
            as_of("a", at(0)),
            Some(0.0),
            "pruned when the room changes, or by a sweep, once a horizon on"
        );
        assert!(t.put("a", content(30_000 + HISTORY_MS)));
        assert_eq!(as_of("a", at(0)), None, "forgotten");
        assert_eq!(as_of("a", at(10_000)), Some(10_000.0));
        assert_eq!(as_of("a", i64::MAX), Some((30_000 + HISTORY_MS) as f32));
    }

    #[test]
    fn a_room_has_the_score_of_its_latest_tick_ended_and_ended_rooms_keep_one() {
        let t = RoomTable::new();
        t.put_score("a", 2_000, 0.2);
        t.put_score("a", 1_000, 0.1);
        t.put_score("a", 4_000, 0.4);
        t.put_score("a", 2_000, 0.25);
        assert_eq!(t.score_as_of("a", 999), None, "no tick had ended");
        assert_eq!(t.score_as_of("a", 1_000), Some(0.1));
        assert_eq!(
            t.score_as_of("a", 3_999),
            Some(0.25),
            "a replay replaced it"
        );
        assert_eq!(t.score_as_of("a", i64::MAX), Some(0.4));
        assert_eq!(t.score_as_of("b", 4_000), None);
        // Room "a" ends; "b" goes on: a sweep leaves "a" its last score.
        for end in (5_000..=5_000 + 2 * HISTORY_MS).step_by(60_000) {
            t.put_score("b", end, 1.0);
        }
        assert_eq!(t.score_as_of("a", 3_999), None, "swept");
        assert_eq!(t.score_as_of("a", i64::MAX), Some(0.4), "the last stays");
        assert_eq!(t.lock().scores["a"].len(), 1);
        assert!(t.lock().scores["b"].len() <= (HISTORY_MS / 60_000) as usize + 2);
        // Through a record of the topic: not content, no progress.
        let rec = RoomEmbedding {
            room_id: "c".into(),
            event_time_ms: 7_000,
            highlight_score: Some(0.7),
            ..RoomEmbedding::default()
        };
        assert_eq!(t.put_record(0, &rec.encode_to_vec()), Some(false));
        assert_eq!(t.score_as_of("c", 7_000), Some(0.7));
        assert!(t.get("c").is_none());
    }

    #[test]
    fn newer_segments_replace_older_and_every_change_is_read_once() {
        let t = RoomTable::new();
        let wake = Arc::new(Notify::new());
        t.subscribe(&wake);
        assert!(t.put("a", content(10_000)));
        assert!(!t.put("a", content(0)), "an older segment is ignored");
        assert!(t.put("b", content(0)));
        assert!(t.put("a", content(20_000)));
        let (changes, next) = t.changes_since(0);
        let rooms: Vec<(&str, i64)> = changes.iter().map(|(r, c)| (&**r, c.start_ms)).collect();
        assert_eq!(rooms, vec![("a", 10_000), ("b", 0), ("a", 20_000)]);
        assert_eq!(next, 3);
        assert!(t.changes_since(next).0.is_empty());
        assert!(t.put("b", content(10_000)));
        let (changes, _) = t.changes_since(next);
        assert_eq!(changes.len(), 1);
        assert_eq!(&*changes[0].0, "b");
    }

    #[test]
    fn gated_content_is_complete_through_the_least_progress_once_caught_up() {
        let t = RoomTable::gated();
        assert_eq!(
            RoomTable::new().content_through(),
            None,
            "a table filled by hand"
        );
        assert_eq!(t.content_through(), Some(i64::MIN), "nothing assigned yet");
        t.assigned(2);
        t.progress(0, 0, 5_000);
        t.progress(0, 1, 3_000);
        t.progress(1, 0, 4_000);
        assert_eq!(t.content_through(), Some(i64::MIN), "not caught up");
        t.caught_up();
        assert_eq!(t.content_through(), Some(3_000));
        t.progress(0, 1, 2_000);
        assert_eq!(t.content_through(), Some(3_000), "progress never goes back");
        t.progress(0, 1, 9_000);
        assert_eq!(t.content_through(), Some(4_000));
        let g = RoomTable::gated();
        g.assigned(2);
        g.caught_up();
        g.progress(0, 0, 5_000);
        assert_eq!(
            g.content_through(),
            Some(i64::MIN),
            "a partition without progress"
        );
        let mut rec = RoomEmbedding {
            source_partition: 3,
            content_through_ms: 7_000,
            ..RoomEmbedding::default()
        };
        assert_eq!(g.put_record(1, &rec.encode_to_vec()), Some(false));
        assert_eq!(g.content_through(), Some(5_000));
        rec.room_id = "r".into();
        assert_eq!(
            g.put_record(1, &rec.encode_to_vec()),
            None,
            "a room without tokens"
        );
    }
}
