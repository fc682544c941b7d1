//! Partition state bookkeeping: what a partition's state still depends on
//! ([`Holds`]) and how far a partition has safely got ([`Checkpoint`], with
//! its encoding in Kafka commit metadata). Operators keep their own per-room
//! tables; this module is the shared vocabulary that makes at-least-once
//! commits and replays exact, and the place where changelog snapshots of
//! operator state will be described.
//!
//! Not for: storage engines or I/O.

use crate::runtime::Position;
use crate::schema::InputKind;

pub mod interests;
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
}

impl Checkpoint {
    /// What every onair commit metadata starts with.
    pub const PREFIX: &'static str = "onair:v1:emitted_through=";

    /// The commit metadata string carrying the emitted-through time.
    pub fn metadata(&self) -> String {
        match self.emitted_through_ms {
            Some(t) => format!("{}{t}", Self::PREFIX),
            // Written anyway, so a resume can tell "nothing emitted yet" from
            // a broker that drops commit metadata.
            None => format!("{}none", Self::PREFIX),
        }
    }

    /// Reads the emitted-through time back from commit metadata.
    pub fn parse_metadata(metadata: &str) -> Option<i64> {
        metadata.strip_prefix(Self::PREFIX)?.parse().ok()
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
        let cp = Checkpoint {
            next_offsets: [None; InputKind::COUNT],
            emitted_through_ms: Some(1_767_225_601_000),
        };
        assert_eq!(
            Checkpoint::parse_metadata(&cp.metadata()),
            Some(1_767_225_601_000)
        );
        assert_eq!(Checkpoint::parse_metadata(""), None);
        let none = Checkpoint {
            next_offsets: [None; InputKind::COUNT],
            emitted_through_ms: None,
        };
        assert!(none.metadata().starts_with(Checkpoint::PREFIX));
        assert_eq!(Checkpoint::parse_metadata(&none.metadata()), None);
        assert_eq!(Checkpoint::parse_metadata("something else"), None);
    }
}
