//! Room statistics read back from the broker, judged against the simulator's
//! ground truth: what the spine's tests and the fault suite check.

use std::collections::{BTreeMap, HashSet};
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

use onair::schema::RoomStats;
use onair::simulator::GroundTruth;
use prost::Message;

use super::{read_until_at, Rec, Topics};

pub fn load_truth(path: &Path) -> GroundTruth {
    let f = std::fs::File::open(path).expect("truth file");
    GroundTruth::read_jsonl(BufReader::new(f)).expect("truth parses")
}

/// How duplicates of a tick are judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Replays {
    /// Every duplicate is an exact replay (same bytes, same id).
    Exact,
    /// The broker dropped the commit metadata (tansu): a restarted engine
    /// cannot know which ticks it already wrote and may rewrite the first
    /// ticks after its checkpoint from part of their input. The first write
    /// of every tick is still checked against the truth; rewrites are counted.
    FirstWriteCounts,
}

/// Decodes room-stats records; a record seen twice must be an exact replay
/// (same bytes, same id) unless `replays_are` says otherwise. Returns the
/// distinct ticks (first write) and the duplicate count.
pub fn distinct_stats(
    recs: &[Rec],
    replays_are: Replays,
) -> (BTreeMap<(String, i64), RoomStats>, usize) {
    let mut seen: BTreeMap<(String, i64), (RoomStats, Vec<u8>)> = BTreeMap::new();
    let mut replays = 0;
    for r in recs {
        let s = RoomStats::decode(&r.payload[..]).expect("room-stats decodes");
        assert_eq!(
            r.headers.get("onair-id"),
            Some(&s.id),
            "the onair-id header carries the record's id"
        );
        assert_eq!(r.key, s.room_id.as_bytes(), "keyed by room");
        let key = (s.room_id.clone(), s.tick_start_ms);
        if let Some((first, bytes)) = seen.get(&key) {
            if replays_are == Replays::Exact {
                assert_eq!(
                    bytes, &r.payload,
                    "a duplicate must be an exact replay: {first:?} vs {s:?}"
                );
            }
            replays += 1;
        } else {
            seen.insert(key, (s, r.payload.clone()));
        }
    }
    (
        seen.into_iter().map(|(k, (s, _))| (k, s)).collect(),
        replays,
    )
}

/// Every tick of the truth is there and equal, no tick the truth lacks, every
/// room present; returns the number of duplicates.
pub fn assert_matches(truth: &GroundTruth, recs: &[Rec], replays_are: Replays) -> usize {
    let (stats, replays) = distinct_stats(recs, replays_are);
    let cmp = truth.compare(&stats);
    assert!(
        cmp.is_exact(),
        "{cmp}\nfirst missing: {:?}\nfirst extra: {:?}\nfirst different: {:#?}",
        cmp.missing.iter().take(5).collect::<Vec<_>>(),
        cmp.extra.iter().take(5).collect::<Vec<_>>(),
        cmp.different.iter().take(2).collect::<Vec<_>>()
    );
    let rooms: HashSet<&str> = stats.keys().map(|(r, _)| r.as_str()).collect();
    let truth_rooms: HashSet<&str> = truth.ticks().map(|t| t.room_id.as_str()).collect();
    assert_eq!(rooms, truth_rooms, "every room present");
    replays
}

/// Reads `room-stats` until `expected` distinct records are there.
pub fn read_stats_at(
    brokers: &str,
    topics: &Topics,
    expected: usize,
    timeout: Duration,
) -> Vec<Rec> {
    read_until_at(brokers, &topics.name("room-stats"), timeout, |recs| {
        let keys: HashSet<&[u8]> = recs.iter().map(|r| r.payload.as_slice()).collect();
        keys.len() >= expected
    })
}

/// [`read_stats_at`] with a new consumer for every attempt (each reads from
/// the start) until `expected` distinct records are there: how to read
/// transactional outputs on noida-db, whose read_committed consumers stop
/// seeing new transactions of a producer once one of its transactions was
/// fenced open (docs/OPERATIONS.md, "Exactly-once").
pub fn read_stats_fresh_at(
    brokers: &str,
    topics: &Topics,
    expected: usize,
    timeout: Duration,
) -> Vec<Rec> {
    let until = std::time::Instant::now() + timeout;
    loop {
        let recs = read_stats_at(brokers, topics, expected, Duration::from_secs(10));
        let distinct: HashSet<&[u8]> = recs.iter().map(|r| r.payload.as_slice()).collect();
        if distinct.len() >= expected || std::time::Instant::now() >= until {
            return recs;
        }
    }
}

/// How to judge duplicates after a restart or hand-over, from what the
/// broker kept of the engine's commits.
pub fn replays_expected_at(brokers: &str, topics: &Topics) -> Replays {
    if super::broker_kept_commit_metadata_at(brokers, topics) {
        Replays::Exact
    } else {
        eprintln!(
            "the broker dropped offset-commit metadata: duplicates after a restart are counted, not required to be exact"
        );
        Replays::FirstWriteCounts
    }
}
