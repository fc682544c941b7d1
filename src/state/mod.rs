//! Partition state bookkeeping: what a partition's state still depends on
//! ([`Holds`]) and how far a partition has safely got ([`Checkpoint`], with
//! its encoding in Kafka commit metadata). Operators keep their own per-room
//! tables; this module is the shared vocabulary that makes at-least-once
//! commits and replays exact, and the [`Cut`] that changelog records of
//! operator state are taken at.
//!
//! Not for: storage engines or I/O.

use crate::runtime::Position;
use crate::schema::InputKind;

pub mod interests;
pub mod room_log;
pub mod sequence;

/// The lowest input offset, per input stream (index = `InputKind::index`), that state still needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holds(pub [i64; InputKind::COUNT]);

impl Default for Holds {
    fn default() -> Self {
        Holds([i64::MAX; InputKind::COUNT])
    }
}

impl Holds {
    /// Keeps `pos` (and everything after it) needed.
    pub fn hold(&mut self, pos: Position) {
        if let Some(slot) = self.0.get_mut(pos.kind.index()) {
            *slot = (*slot).min(pos.offset);
        }
    }

    /// Merges another set of holds into this one.
    pub fn merge(&mut self, other: &Holds) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = (*a).min(b);
        }
    }

    /// The hold for one stream, if any.
    pub fn get(&self, kind: InputKind) -> Option<i64> {
        self.0.get(kind.index()).copied().filter(|&o| o != i64::MAX)
    }
}

/// Where the partition stands: what may be committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Per stream (index = `InputKind::index`), the offset to resume from.
    pub next_offsets: [Option<i64>; InputKind::COUNT],
    /// End of the last tick whose outputs are all acknowledged.
    pub emitted_through_ms: Option<i64>,
    /// Set when no output was in flight: how far each stream's records had
    /// been accepted and processed, with every output they made right away
    /// acknowledged. A replay does not write those outputs again.
    pub marks: Option<ReplayMarks>,
}

/// Per stream (index = `InputKind::index`), the offsets below which every
/// record's immediate outputs are written: dead letters of records
/// accepted (decoded or rejected) and outputs made while records were
/// processed. Outputs of later work (ticks, model results) are not covered:
/// ticks have the emitted-through time, model results may be written again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayMarks {
    /// Offset after the last record accepted.
    pub accepted: [Option<i64>; InputKind::COUNT],
    /// Offset after the last record processed.
    pub processed: [Option<i64>; InputKind::COUNT],
}

impl ReplayMarks {
    /// Whether the record at `pos` was accepted before the marks were taken.
    pub fn accepted_before(&self, pos: Position) -> bool {
        self.accepted
            .get(pos.kind.index())
            .copied()
            .flatten()
            .is_some_and(|n| pos.offset < n)
    }

    /// Whether the record at `pos` was processed before the marks were taken.
    pub fn processed_before(&self, pos: Position) -> bool {
        self.processed
            .get(pos.kind.index())
            .copied()
            .flatten()
            .is_some_and(|n| pos.offset < n)
    }
}

/// Where a partition task stood when it asked its operators for changelog
/// records ([`crate::runtime::Operator::snapshot`]): every record before
/// `processed` (per stream) had been handed to the operators, every tick
/// starting before `next_tick_ms` had closed, and every output made so far
/// was acknowledged. A record taken at a cut, restored, plus the records the
/// cut does not cover, is the state the task had: a replay skips what the
/// cut covers and writes nothing for the ticks it closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Per stream (index = `InputKind::index`), the offset after the last
    /// record processed.
    pub processed: [Option<i64>; InputKind::COUNT],
    /// Start of the first tick still open (None: none closed yet).
    pub next_tick_ms: Option<i64>,
    /// The newest event time the task had seen.
    pub stream_time_ms: Option<i64>,
}

impl Cut {
    /// Whether the record at `pos` was processed before the cut.
    pub fn covers(&self, pos: Position) -> bool {
        self.processed
            .get(pos.kind.index())
            .copied()
            .flatten()
            .is_some_and(|n| pos.offset < n)
    }

    /// Whether the tick starting at `tick_start_ms` had closed at the cut.
    pub fn closed(&self, tick_start_ms: i64) -> bool {
        self.next_tick_ms.is_some_and(|n| tick_start_ms < n)
    }

    /// The later of two cuts of one partition (either may be missing).
    pub fn later(a: Option<Cut>, b: Option<Cut>) -> Option<Cut> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let mut c = a;
                for (x, y) in c.processed.iter_mut().zip(b.processed) {
                    *x = (*x).max(y);
                }
                c.next_tick_ms = a.next_tick_ms.max(b.next_tick_ms);
                c.stream_time_ms = a.stream_time_ms.max(b.stream_time_ms);
                Some(c)
            }
            (a, b) => a.or(b),
        }
    }

    /// The changelog form.
    pub fn to_record(&self) -> crate::schema::StateCut {
        crate::schema::StateCut {
            processed: self.processed.iter().map(|p| p.unwrap_or(-1)).collect(),
            next_tick_ms: self.next_tick_ms.unwrap_or(i64::MIN),
            stream_time_ms: self.stream_time_ms.unwrap_or(i64::MIN),
        }
    }

    /// Reads the changelog form back (streams it does not name: none).
    pub fn from_record(r: &crate::schema::StateCut) -> Self {
        let mut processed = [None; InputKind::COUNT];
        for (slot, &p) in processed.iter_mut().zip(&r.processed) {
            *slot = (p >= 0).then_some(p);
        }
        Cut {
            processed,
            next_tick_ms: (r.next_tick_ms != i64::MIN).then_some(r.next_tick_ms),
            stream_time_ms: (r.stream_time_ms != i64::MIN).then_some(r.stream_time_ms),
        }
    }
}

/// What one stream's commit metadata says about where its partition stood.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The checkpoint's emitted-through time.
    pub emitted_through_ms: Option<i64>,
    /// The stream's accepted and processed marks (see [`ReplayMarks`]).
    pub accepted: Option<i64>,
    /// See [`ReplayMarks::processed`].
    pub processed: Option<i64>,
}

impl Checkpoint {
    /// What every onair commit metadata starts with.
    pub const PREFIX: &'static str = "onair:v1:emitted_through=";

    /// The commit metadata string of one stream (`kind`): the emitted-through
    /// time, then the stream's replay marks when the checkpoint has them
    /// (`onair:v1:emitted_through=T;accepted=A;processed=P`).
    pub fn metadata(&self, kind: InputKind) -> String {
        let mut m = match self.emitted_through_ms {
            Some(t) => format!("{}{t}", Self::PREFIX),
            // Written anyway, so a resume can tell "nothing emitted yet" from
            // a broker that drops commit metadata.
            None => format!("{}none", Self::PREFIX),
        };
        if let Some(marks) = &self.marks {
            let k = kind.index();
            if let (Some(Some(a)), Some(Some(p))) = (marks.accepted.get(k), marks.processed.get(k))
            {
                m.push_str(&format!(";accepted={a};processed={p}"));
            }
        }
        m
    }

    /// Reads the emitted-through time back from commit metadata.
    pub fn parse_metadata(metadata: &str) -> Option<i64> {
        Self::parse_committed(metadata)?.emitted_through_ms
    }

    /// Reads everything a stream's commit metadata says (None: not onair's).
    pub fn parse_committed(metadata: &str) -> Option<Committed> {
        let rest = metadata.strip_prefix(Self::PREFIX)?;
        let mut parts = rest.split(';');
        let mut c = Committed {
            emitted_through_ms: parts.next().and_then(|t| t.parse().ok()),
            ..Committed::default()
        };
        for part in parts {
            match part.split_once('=') {
                Some(("accepted", v)) => c.accepted = v.parse().ok(),
                Some(("processed", v)) => c.processed = v.parse().ok(),
                _ => {}
            }
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_take_the_minimum_per_stream() {
        let mut h = Holds::default();
        assert_eq!(h.get(InputKind::Comments), None);
        h.hold(Position {
            kind: InputKind::Comments,
            offset: 9,
        });
        h.hold(Position {
            kind: InputKind::Comments,
            offset: 4,
        });
        let mut other = Holds::default();
        other.hold(Position {
            kind: InputKind::Actions,
            offset: 2,
        });
        h.merge(&other);
        assert_eq!(h.get(InputKind::Comments), Some(4));
        assert_eq!(h.get(InputKind::Actions), Some(2));
        assert_eq!(h.get(InputKind::Video), None);
    }

    #[test]
    fn metadata_roundtrip() {
        let c = InputKind::Comments;
        let mut cp = Checkpoint {
            next_offsets: [None; InputKind::COUNT],
            emitted_through_ms: Some(1_767_225_601_000),
            marks: None,
        };
        assert_eq!(
            Checkpoint::parse_metadata(&cp.metadata(c)),
            Some(1_767_225_601_000)
        );
        assert_eq!(Checkpoint::parse_metadata(""), None);
        let none = Checkpoint {
            next_offsets: [None; InputKind::COUNT],
            emitted_through_ms: None,
            marks: None,
        };
        assert!(none.metadata(c).starts_with(Checkpoint::PREFIX));
        assert_eq!(Checkpoint::parse_metadata(&none.metadata(c)), None);
        assert_eq!(Checkpoint::parse_metadata("something else"), None);
        // The marks travel per stream, after the time.
        let mut marks = ReplayMarks::default();
        marks.accepted[c.index()] = Some(40);
        marks.processed[c.index()] = Some(31);
        cp.marks = Some(marks);
        let m = cp.metadata(c);
        assert_eq!(Checkpoint::parse_metadata(&m), Some(1_767_225_601_000));
        assert_eq!(
            Checkpoint::parse_committed(&m),
            Some(Committed {
                emitted_through_ms: Some(1_767_225_601_000),
                accepted: Some(40),
                processed: Some(31),
            })
        );
        // A stream without marks writes the time alone.
        assert_eq!(
            cp.metadata(InputKind::Video),
            "onair:v1:emitted_through=1767225601000"
        );
        let pos = |offset| Position { kind: c, offset };
        assert!(marks.accepted_before(pos(39)) && !marks.accepted_before(pos(40)));
        assert!(marks.processed_before(pos(30)) && !marks.processed_before(pos(31)));
        assert!(!marks.processed_before(Position {
            kind: InputKind::Video,
            offset: 0
        }));
    }
}
