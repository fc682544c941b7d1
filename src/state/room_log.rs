//! The room changelog bookkeeping an operator keeps across its rooms (see
//! [`crate::runtime::Operator::snapshot`]): which rooms changed since their
//! last record, the input positions that stay held until their next one,
//! tombstones for the rooms dropped meanwhile, and the cuts that restored
//! rooms judge replayed records and ticks by.
//!
//! Before its first record is written or restored an operator's log is off:
//! it then holds its positions as it would without a changelog. Once on,
//! a room holds only what it folded in since its last record.
//!
//! Not for: encoding a room's state (each operator has its own record) or
//! reading the changelog back (the runtime does, see
//! [`crate::runtime::ChangelogReader`]).

use std::collections::HashMap;

use metrics::{counter, Counter};

use super::{Cut, Holds};
use crate::metrics::{Stage, CHANGELOG_BYTES};
use crate::runtime::{room_changelog, Context, Position};
use crate::schema::StateCut;

/// One operator's changelog bookkeeping (see the module docs).
pub struct RoomLog {
    name: &'static str,
    on: bool,
    /// The partition's cut, from its restored record.
    restored: Option<Cut>,
    /// Rooms dropped since the last snapshot, with the positions their
    /// tombstones depend on.
    dropped: HashMap<Box<str>, Holds>,
    bytes: Counter,
    stage: Stage,
}

/// What a room keeps for the log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Logged {
    /// Positions of what the room folded in since its last record.
    unflushed: Holds,
    /// Changed since its last record.
    dirty: bool,
    /// The cut of the record the room was restored from (or the
    /// partition's, when later).
    restored: Option<Cut>,
}

impl Logged {
    /// Whether the room's restored state already has the record at `pos`
    /// (a replay of it changes nothing).
    pub fn covers(&self, pos: Position) -> bool {
        self.restored.is_some_and(|c| c.covers(pos))
    }

    /// Whether the tick starting at `tick_start_ms` had closed, its outputs
    /// written, when the room's restored state was taken.
    pub fn closed(&self, tick_start_ms: i64) -> bool {
        self.restored.is_some_and(|c| c.closed(tick_start_ms))
    }

    /// The cut the room's restored state was taken at (None: the room
    /// was not restored and the partition's state was not either).
    pub fn restored(&self) -> Option<Cut> {
        self.restored
    }

    /// The room's state changed (a tick, model work).
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// The room folded in the record at `pos`: held until its next record.
    pub fn folded(&mut self, pos: Position) {
        self.dirty = true;
        self.unflushed.hold(pos);
    }

    /// The room folded in something that depends on `holds`.
    pub fn folded_all(&mut self, holds: &Holds) {
        self.dirty = true;
        self.unflushed.merge(holds);
    }
}

impl RoomLog {
    /// The log of operator `name` (its records' key prefix and metrics label).
    pub fn new(name: &'static str) -> Self {
        RoomLog {
            name,
            on: false,
            restored: None,
            dropped: HashMap::new(),
            bytes: counter!(CHANGELOG_BYTES, "stage" => name),
            stage: Stage::new(name),
        }
    }

    /// Whether the rooms' state is on the changelog: positions a room's
    /// last record covers need not be held.
    pub fn on(&self) -> bool {
        self.on
    }

    /// The partition's cut the restored state was taken at.
    pub fn restored(&self) -> Option<Cut> {
        self.restored
    }

    /// Whether the partition's restored cut covers the record at `pos`
    /// (for a room the operator does not hold: see [`Logged::covers`]).
    pub fn covers(&self, pos: Position) -> bool {
        self.restored.is_some_and(|c| c.covers(pos))
    }

    /// The bookkeeping of a room new to the operator (again, perhaps: a
    /// room dropped since the last snapshot gets its record instead of its
    /// tombstone).
    pub fn entry(&mut self, room: &str) -> Logged {
        let mut logged = Logged {
            restored: self.restored,
            ..Logged::default()
        };
        if let Some(holds) = self.dropped.remove(room) {
            logged.folded_all(&holds);
        }
        logged
    }

    /// A room's state is gone: its key is deleted at the next snapshot.
    pub fn drop_room(&mut self, room: &str, logged: Logged) {
        if self.on {
            self.dropped.insert(room.into(), logged.unflushed);
        }
    }

    /// Adds what the log keeps held: what each room folded in since its
    /// last record, and what the tombstones to write depend on.
    pub fn holds<'a>(&self, rooms: impl Iterator<Item = &'a Logged>, holds: &mut Holds) {
        for logged in rooms {
            holds.merge(&logged.unflushed);
        }
        for h in self.dropped.values() {
            holds.merge(h);
        }
    }

    /// Writes the records taken at `cut`: tombstones of the rooms dropped,
    /// each changed room's state (`encode`), then the partition's record,
    /// the cut alone (`partition`: an encoded record with no room). Each
    /// record holds what its room folded in since the last one.
    pub fn snapshot<'a, R: 'a>(
        &mut self,
        cut: &Cut,
        ctx: &mut Context<'_>,
        rooms: impl Iterator<Item = (&'a str, &'a mut R)>,
        logged: impl Fn(&mut R) -> &mut Logged,
        encode: impl Fn(&R, &Cut) -> Vec<u8>,
        partition: Vec<u8>,
    ) {
        self.on = true;
        for (room, held) in std::mem::take(&mut self.dropped) {
            self.write(cut, ctx, room.as_bytes(), Vec::new(), held);
        }
        for (room, r) in rooms {
            let log = logged(r);
            if !log.dirty {
                continue;
            }
            log.dirty = false;
            let held = std::mem::take(&mut log.unflushed);
            self.write(cut, ctx, room.as_bytes(), encode(r, cut), held);
        }
        // Last: the cut every room without a later record of its own had
        // its state at.
        self.write(cut, ctx, b"", partition, Holds::default());
    }

    /// Writes one record taken at `cut` under the operator's `key` (an
    /// empty payload deletes it), held by `held` until acknowledged. For
    /// records of the operator's own beside its rooms' (written before
    /// [`RoomLog::snapshot`], so that a room's record never lands without
    /// them); their keys must not be room ids (e.g. start with 0xFF, which
    /// no UTF-8 string has).
    pub fn write(
        &self,
        cut: &Cut,
        ctx: &mut Context<'_>,
        key: &[u8],
        payload: Vec<u8>,
        held: Holds,
    ) {
        self.bytes.increment((key.len() + payload.len()) as u64);
        let p = ctx.partition();
        ctx.emit(room_changelog(self.name, p, key, payload, cut, held));
    }

    /// Reads one of the operator's changelog records back (see
    /// [`crate::runtime::Operator::restore`]). The partition's record is
    /// applied here: rooms with no record of their own, or an older one,
    /// judge replays by its cut. A room's record comes back decoded, with
    /// its room id and bookkeeping, for the operator to rebuild the room
    /// from. One that does not decode is counted and skipped: the room
    /// starts from its replayed records.
    pub fn restore<'a, M: prost::Message + Default>(
        &mut self,
        key: &[u8],
        value: &[u8],
        cut_of: impl Fn(&M) -> Option<&StateCut>,
        rooms: impl Iterator<Item = &'a mut Logged>,
    ) -> Option<(String, M, Logged)> {
        self.on = true;
        let (record, room) = match (M::decode(value), std::str::from_utf8(key)) {
            (Ok(record), Ok(room)) => (record, room),
            (Err(e), _) => {
                self.stage.error("changelog_record");
                tracing::warn!(operator = self.name, error = %e, "a changelog record could not be read back; the room starts from its replayed records");
                return None;
            }
            (_, Err(_)) => {
                self.stage.error("changelog_record");
                return None;
            }
        };
        let cut = cut_of(&record).map(Cut::from_record);
        if room.is_empty() {
            self.restored = Cut::later(self.restored, cut);
            for logged in rooms {
                logged.restored = Cut::later(logged.restored, self.restored);
            }
            return None;
        }
        let logged = Logged {
            restored: Cut::later(cut, self.restored),
            ..Logged::default()
        };
        Some((room.to_string(), record, logged))
    }

    /// The partition left: forget everything.
    pub fn clear(&mut self) {
        self.on = false;
        self.restored = None;
        self.dropped.clear();
    }
}

/// Test helpers for operators on the room changelog.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::{BTreeMap, BTreeSet};

    use crate::runtime::{split_changelog_key, Context, Operator, OutputTopic, Position};
    use crate::schema::{ActionKind, Event, InputKind, ViewerAction};
    use crate::state::{Cut, Holds};

    /// One viewer action of a replay: (event time, room, user, kind).
    pub type Act = (i64, u8, u8, ActionKind);

    /// Feeds `acts` to `op` from offset `from` on (offsets from 0; room
    /// "r{n}", user "u{n}", streamer "s{n}", gift value user + 1, gift id
    /// "g{offset}"), closing ticks of 1 s as the runtime does with no
    /// allowed lateness (a restored state's open ticks close even where the
    /// replay starts after them), and `tail` ticks more after the last.
    /// `notes(op, tick, rooms, ctx)` runs just before each tick closes, with
    /// the rooms that have an action in the tick in the whole input (the
    /// operators before this one hold a tick's inputs, so a replay gives
    /// them all again). Calls `at(op, i, cut, ctx)` before action `i`.
    /// Returns the training samples written (id, bytes).
    pub fn replay_actions<O: Operator>(
        op: &mut O,
        acts: &[Act],
        from: i64,
        tail: usize,
        mut notes: impl FnMut(&mut O, i64, &BTreeSet<u8>, &mut Context<'_>),
        mut at: impl FnMut(&mut O, usize, &Cut, &mut Context<'_>),
    ) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        let resume = op.resumed_at().and_then(|c| c.next_tick_ms);
        let mut in_tick: BTreeMap<i64, BTreeSet<u8>> = BTreeMap::new();
        for &(t, room, _, _) in acts {
            in_tick
                .entry(t.div_euclid(1000) * 1000)
                .or_default()
                .insert(room);
        }
        let none = BTreeSet::new();
        let mut close = |op: &mut O, nt: i64, ctx: &mut Context<'_>| {
            notes(op, nt, in_tick.get(&nt).unwrap_or(&none), ctx);
            op.on_tick(nt, ctx);
        };
        let (mut next_tick, mut processed): (Option<i64>, Option<i64>) = (None, None);
        for (i, &(t, room, user, kind)) in acts.iter().enumerate() {
            let mut p = [None; InputKind::COUNT];
            p[InputKind::Actions.index()] = processed;
            let cut = Cut {
                processed: p,
                next_tick_ms: next_tick,
                stream_time_ms: None,
            };
            at(op, i, &cut, &mut ctx);
            let offset = i as i64;
            if offset < from {
                continue;
            }
            let tick = t.div_euclid(1000) * 1000;
            let mut nt = *next_tick.get_or_insert(resume.map_or(tick, |r| r.min(tick)));
            while nt + 1000 <= t {
                close(op, nt, &mut ctx);
                nt += 1000;
            }
            next_tick = Some(nt);
            let a = ViewerAction {
                schema_version: 1,
                room_id: format!("r{room}"),
                user_id: format!("u{user}"),
                streamer_id: format!("s{room}"),
                event_time_ms: t,
                kind: kind as i32,
                gift_value: u64::from(user) + 1,
                gift_id: format!("g{i}"),
                ..ViewerAction::default()
            };
            let pos = Position {
                kind: InputKind::Actions,
                offset,
            };
            op.on_record(&Event::Action(a), pos, tick < nt, &mut ctx);
            processed = Some(offset + 1);
        }
        if let Some(mut nt) = next_tick {
            for _ in 0..tail {
                close(op, nt, &mut ctx);
                nt += 1000;
            }
        }
        out.iter()
            .filter(|o| o.topic == OutputTopic::TrainingSamples)
            .map(|o| (o.id.clone(), o.payload.clone()))
            .collect()
    }

    /// Has `op` write its changelog records at `cut` and takes them out
    /// of the context (key, value), checking that they are room changelog
    /// records and that nothing stays held once they are written.
    pub fn take_snapshot(
        op: &mut dyn Operator,
        cut: &Cut,
        ctx: &mut Context<'_>,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let before = ctx.outputs.len();
        op.snapshot(cut, ctx);
        let records = ctx.outputs[before..]
            .iter()
            .map(|o| {
                assert!(matches!(o.topic, OutputTopic::RoomChangelog { .. }));
                (o.key.clone(), o.payload.clone())
            })
            .collect();
        ctx.outputs.truncate(before);
        let mut h = Holds::default();
        op.holds(&mut h);
        assert_eq!(h, Holds::default(), "nothing held once written");
        records
    }

    /// Restores `op` from `records` as the runtime reads a changelog back:
    /// the last record per key, in the order of those, a tombstone deleting.
    pub fn restore(op: &mut dyn Operator, records: Vec<(Vec<u8>, Vec<u8>)>) {
        let mut latest: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (k, v) in records {
            latest.retain(|(k2, _)| *k2 != k);
            if !v.is_empty() {
                latest.push((k, v));
            }
        }
        for (k, v) in &latest {
            let (name, key) = split_changelog_key(k).expect("a changelog key");
            assert_eq!(name, op.name().as_bytes());
            op.restore(key, v, None);
        }
    }
}
