//! The `room-embeddings` topic read as a global table: every instance of the
//! user stage reads all of its partitions from the beginning (it is compacted,
//! so that is one record per live room) and keeps following it, the way Kafka
//! Streams reads a GlobalKTable. Operators of the user stage look rooms up and
//! ask for what changed since they last looked ([`RoomTable::changes_since`]);
//! the reader wakes them when something did.
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

#[derive(Default)]
struct Inner {
    rooms: HashMap<Arc<str>, RoomContent>,
    /// (sequence number, room) of every change, oldest first.
    log: VecDeque<(u64, Arc<str>)>,
    next_seq: u64,
    wakes: Vec<Weak<Notify>>,
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
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(RoomTable::default())
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
        g.rooms.insert(key.clone(), content);
        let seq = g.next_seq;
        g.next_seq += 1;
        g.log.push_back((seq, key));
        while g.log.len() > LOG_KEPT {
            g.log.pop_front();
        }
        g.wakes.retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        });
        gauge!(ROOM_TABLE_ROOMS).set(g.rooms.len() as f64);
        true
    }

    /// A room's content.
    pub fn get(&self, room: &str) -> Option<RoomContent> {
        self.lock().rooms.get(room).cloned()
    }

    /// Rooms in the table.
    pub fn len(&self) -> usize {
        self.lock().rooms.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rooms changed since sequence number `seq` (each once, with its
    /// content now), and the sequence number to ask from next time. A reader
    /// further behind than the log reaches gets every room.
    pub fn changes_since(&self, seq: u64) -> (Vec<(Arc<str>, RoomContent)>, u64) {
        let g = self.lock();
        let next = g.next_seq;
        if seq >= next {
            return (Vec::new(), next);
        }
        let rooms: Vec<Arc<str>> = if g.log.front().is_some_and(|(s, _)| *s <= seq) {
            let mut seen = std::collections::HashSet::new();
            g.log
                .iter()
                .filter(|(s, _)| *s >= seq)
                .filter(|(_, r)| seen.insert(r.clone()))
                .map(|(_, r)| r.clone())
                .collect()
        } else {
            g.rooms.keys().cloned().collect()
        };
        let out = rooms
            .into_iter()
            .filter_map(|r| g.rooms.get(&r).cloned().map(|c| (r, c)))
            .collect();
        (out, next)
    }

    /// Wakes `wake` after every change (for as long as it lives).
    pub fn subscribe(&self, wake: &Arc<Notify>) {
        self.lock().wakes.push(Arc::downgrade(wake));
    }

    /// Decodes one `room-embeddings` record and puts it. None: not a valid
    /// record (counted, skipped: the table is an output of ours).
    pub fn put_record(&self, payload: &[u8]) -> Option<bool> {
        let rec = RoomEmbedding::decode(payload).ok()?;
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
        .set("fetch.wait.max.ms", "100");
    let consumer: BaseConsumer = c.create().map_err(|source| KafkaFailure::Client {
        what: "room-table consumer",
        source,
    })?;
    let stage = Stage::new("room_table");
    let mut assigned = 0;
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
                match msg.payload().and_then(|p| table.put_record(p)) {
                    Some(_) => stage.sent.increment(1),
                    None => stage.error("invalid_record"),
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
    fn newer_segments_replace_older_and_changes_are_read_once() {
        let t = RoomTable::new();
        let wake = Arc::new(Notify::new());
        t.subscribe(&wake);
        assert!(t.put("a", content(10_000)));
        assert!(!t.put("a", content(0)), "an older segment is ignored");
        assert!(t.put("b", content(0)));
        assert!(t.put("a", content(20_000)));
        let (changes, next) = t.changes_since(0);
        let mut rooms: Vec<(&str, i64)> = changes.iter().map(|(r, c)| (&**r, c.start_ms)).collect();
        rooms.sort();
        assert_eq!(rooms, vec![("a", 20_000), ("b", 0)]);
        assert_eq!(next, 3);
        assert!(t.changes_since(next).0.is_empty());
        assert!(t.put("b", content(10_000)));
        let (changes, _) = t.changes_since(next);
        assert_eq!(changes.len(), 1);
        assert_eq!(&*changes[0].0, "b");
    }
}
