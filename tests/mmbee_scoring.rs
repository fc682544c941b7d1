//! Incrementality of MMBee scoring, with the committed model (ONNX Runtime) and
//! the user stage's scoring operator fed as a partition task feeds it:
//! - a viewer who enters is scored (once its room has content);
//! - a new content segment in one room re-scores that room's viewers and no one else;
//! - a gift re-scores the gifting viewer's pairs (every room the viewer is in) and no one else's;
//! - likes and comments re-score nobody; a viewer who left is not scored;
//! - content is joined in event time: a segment counts for a partition once its
//!   ticks pass the moment it completed, so a viewer who left before is not scored on it.
//!
//! Needs ONNX Runtime (`scripts/models`) and the committed `models/mmbee`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onair::config::MmbeeConfig;
use onair::models::mmbee::MmbeeService;
use onair::operators::gift_scoring::GiftScoring;
use onair::runtime::{split_changelog_key, Context, Operator, Output, OutputTopic, Position};
use onair::schema::{ActionKind, Event, GiftPrediction, InputKind, ViewerAction};
use onair::sources::room_table::{RoomContent, RoomTable};
use onair::state::Holds;
use prost::Message;

const T0: i64 = 1_767_225_600_000;

fn service() -> Arc<MmbeeService> {
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mmbee");
    let cfg = MmbeeConfig {
        enabled: true,
        model: root.display().to_string(),
        graph: root.join("graph").display().to_string(),
        ..MmbeeConfig::default()
    };
    Arc::new(MmbeeService::start(&cfg).expect("the committed MMBee model loads"))
}

fn content(svc: &MmbeeService, streamer: &str, start_ms: i64, x: f32) -> RoomContent {
    let d = svc.dims();
    RoomContent {
        streamer_id: Arc::from(streamer),
        start_ms,
        at_ms: start_ms + 13_000,
        tokens: vec![x; d.queries * d.d].into(),
        dim: d.d as u32,
        model: svc.label(),
    }
}

fn action(t: i64, room: &str, user: &str, kind: ActionKind, value: u64) -> Event {
    Event::Action(ViewerAction {
        schema_version: 1,
        room_id: room.into(),
        user_id: user.into(),
        streamer_id: format!("streamer-of-{room}"),
        event_time_ms: t,
        kind: kind as i32,
        gift_value: value,
        ..ViewerAction::default()
    })
}

struct Harness {
    op: GiftScoring,
    offset: i64,
}

impl Harness {
    fn record(&mut self, e: Event) {
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        self.offset += 1;
        let pos = Position {
            kind: InputKind::UserActions,
            offset: self.offset,
        };
        // Its position on the room stage's input (the repartition operator's
        // annotation): one source partition, in order.
        let mut e = e;
        if let Event::Action(a) = &mut e {
            a.source_offset = self.offset;
        }
        self.op.on_record(&e, pos, false, &mut ctx);
        drop(ctx);
        assert!(out.is_empty(), "scores come back through poll");
    }

    /// Closes the ticks up to `end_ms` and returns what that scored.
    fn tick(&mut self, end_ms: i64) -> BTreeSet<(String, String, String)> {
        self.close(end_ms);
        self.scored()
    }

    fn close(&mut self, end_ms: i64) {
        let mut out = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        self.op.poll(&mut ctx);
        self.op.on_tick(end_ms - 1000, &mut ctx);
        drop(ctx);
        assert!(
            out.iter()
                .all(|o| matches!(o.topic, OutputTopic::UserChangelog { .. })),
            "scores come back through poll"
        );
    }

    /// Polls until nothing is pending and returns the (user, room, trigger) scored.
    fn scored(&mut self) -> BTreeSet<(String, String, String)> {
        let mut got = BTreeSet::new();
        for p in self.predictions() {
            assert!(
                got.insert((p.user_id, p.room_id, p.trigger)),
                "a pair scored twice for one change"
            );
        }
        got
    }

    /// Closes the ticks up to `end_ms`; the one prediction that scored, as
    /// (model version, graph version, content segment start).
    fn versions(&mut self, end_ms: i64) -> (String, u64, i64) {
        self.close(end_ms);
        let p = self.predictions();
        assert_eq!(p.len(), 1, "{p:?}");
        let p = &p[0];
        (p.model_version.clone(), p.graph_version, p.content_start_ms)
    }

    /// Polls until nothing is pending and returns the predictions written.
    fn predictions(&mut self) -> Vec<GiftPrediction> {
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut out: Vec<Output> = Vec::new();
            let mut ctx = Context::new(&mut out, 0, 1000);
            self.op.poll(&mut ctx);
            drop(ctx);
            for o in out {
                assert_eq!(o.topic, OutputTopic::GiftPredictions);
                let p = GiftPrediction::decode(&o.payload[..]).expect("prediction decodes");
                assert_eq!(o.key, p.room_id.as_bytes());
                assert!((0.0..=1.0).contains(&p.probability), "{p:?}");
                assert!(p.model_version.starts_with("mmbee@"), "{p:?}");
                got.push(p);
            }
            if self.op.pending() == 0 {
                return got;
            }
            assert!(Instant::now() < until, "scores did not come back");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(u, r, t)| (u.to_string(), r.to_string(), t.to_string()))
        .collect()
}

#[test]
fn only_the_pairs_whose_inputs_changed_are_scored() {
    let svc = service();
    let table = RoomTable::new();
    // r1's first segment [T0, T0 + 10 s) completed at T0 + 13 s.
    table.put("r1", content(&svc, "streamer-of-r1", T0, 0.1));
    let mut h = Harness {
        op: GiftScoring::new(svc.clone(), table.clone()),
        offset: 0,
    };
    // Entering: r1 has content, r2 not yet. Actions wait for the watermark.
    h.record(action(T0 + 14_000, "r1", "a", ActionKind::Enter, 0));
    h.record(action(T0 + 14_100, "r1", "b", ActionKind::Enter, 0));
    h.record(action(T0 + 14_200, "r2", "c", ActionKind::Enter, 0));
    assert!(h.scored().is_empty(), "scored before the watermark passed");
    assert_eq!(
        h.tick(T0 + 15_000),
        set(&[("a", "r1", "enter"), ("b", "r1", "enter")]),
        "c waits for r2's content"
    );
    // r2's first content (completed at 13 s, read late): its viewer, and only it.
    table.put("r2", content(&svc, "streamer-of-r2", T0, 0.2));
    assert_eq!(h.scored(), set(&[("c", "r2", "content")]));
    // A new segment in r1 (completed at 23 s): r1's viewers only, not before 23 s.
    table.put("r1", content(&svc, "streamer-of-r1", T0 + 10_000, 0.3));
    assert!(h.tick(T0 + 22_000).is_empty(), "scored before it completed");
    assert_eq!(
        h.tick(T0 + 24_000),
        set(&[("a", "r1", "content"), ("b", "r1", "content")])
    );
    // An older segment arriving late changes nothing.
    table.put("r1", content(&svc, "streamer-of-r1", T0, 0.4));
    assert!(h.tick(T0 + 25_000).is_empty());
    // Likes and comments update the session without a score.
    h.record(action(T0 + 25_000, "r1", "a", ActionKind::Like, 0));
    h.record(action(T0 + 25_100, "r2", "c", ActionKind::Comment, 0));
    assert!(h.tick(T0 + 26_000).is_empty());
    // A gift: the gifting viewer's pair only.
    h.record(action(T0 + 26_000, "r1", "b", ActionKind::Gift, 50));
    assert_eq!(h.tick(T0 + 27_000), set(&[("b", "r1", "gift")]));
    // b leaves; r1's next segment scores a alone.
    h.record(action(T0 + 27_000, "r1", "b", ActionKind::Leave, 0));
    table.put("r1", content(&svc, "streamer-of-r1", T0 + 20_000, 0.5));
    assert_eq!(h.tick(T0 + 34_000), set(&[("a", "r1", "content")]));
    // a moves to r2: scored there, and r1's next segment scores no one.
    h.record(action(T0 + 34_500, "r1", "a", ActionKind::Leave, 0));
    h.record(action(T0 + 35_000, "r2", "a", ActionKind::Enter, 0));
    assert_eq!(h.tick(T0 + 36_000), set(&[("a", "r2", "enter")]));
    table.put("r1", content(&svc, "streamer-of-r1", T0 + 30_000, 0.6));
    assert!(h.tick(T0 + 44_000).is_empty());
    assert_eq!(h.op.state().viewers("r2"), 2);
    // r2's segment completing at 53 s: c left at 50 s, so only a is scored on it,
    // although the table had it before c's leave was read.
    table.put("r2", content(&svc, "streamer-of-r2", T0 + 40_000, 0.7));
    h.record(action(T0 + 50_000, "r2", "c", ActionKind::Leave, 0));
    assert_eq!(h.tick(T0 + 54_000), set(&[("a", "r2", "content")]));
    // Out of order across rooms (the repartition topic interleaves room
    // partitions): a gift at 56.5 s read before an enter at 55 s still finds
    // the viewer in both rooms; a viewer in two rooms at once (two players
    // open) has both pairs re-scored by a gift in one, and no one else.
    h.record(action(T0 + 56_500, "r1", "a", ActionKind::Gift, 20));
    h.record(action(T0 + 55_000, "r1", "a", ActionKind::Enter, 0));
    assert_eq!(
        h.tick(T0 + 57_000),
        set(&[
            ("a", "r1", "enter"),
            ("a", "r1", "gift"),
            ("a", "r2", "gift")
        ])
    );
}

#[test]
fn a_gift_changes_the_gifting_viewers_score() {
    let svc = service();
    let table = RoomTable::new();
    table.put("r1", content(&svc, "streamer-of-r1", T0, 0.1));
    let mut h = Harness {
        op: GiftScoring::new(svc, table),
        offset: 0,
    };
    h.record(action(T0 + 14_000, "r1", "a", ActionKind::Enter, 0));
    assert_eq!(h.tick(T0 + 15_000).len(), 1);
    // The same pair before and after gifts: the history and session are
    // inputs, so the score moves.
    let probe = |h: &mut Harness, end_ms: i64| -> f32 {
        h.close(end_ms);
        let p = h.predictions();
        assert_eq!(p.len(), 1, "{p:?}");
        p[0].probability
    };
    h.record(action(T0 + 15_000, "r1", "a", ActionKind::Gift, 10));
    let first = probe(&mut h, T0 + 16_000);
    for i in 0..5 {
        h.record(action(T0 + 16_000 + i, "r1", "a", ActionKind::Gift, 500));
    }
    h.record(action(T0 + 17_000, "r1", "a", ActionKind::Gift, 500));
    // The five close together and the sixth: one score each.
    h.close(T0 + 18_000);
    let later = h.predictions();
    assert_eq!(later.len(), 6);
    let last = later
        .iter()
        .find(|p| p.event_time_ms == T0 + 17_000)
        .expect("the sixth gift's score");
    assert_ne!(
        first, last.probability,
        "six gifts later the viewer's score is the same"
    );
}

/// Copies every file of `from` into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// A copy of the committed version 1 as version `v` naming graph version `graph`.
fn add_version(root: &Path, v: u64, graph: u64) {
    let dir = root.join("mmbee").join(format!("staging-{v}"));
    copy_dir(&root.join("mmbee/1"), &dir);
    let path = dir.join("mmbee.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("mmbee.json")).expect("json");
    spec["graph"]["version"] = graph.into();
    std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write");
    // Whole, then visible (as a deploy would rename it into place).
    std::fs::rename(&dir, root.join("mmbee").join(v.to_string())).expect("rename");
}

fn wait_for_label(svc: &MmbeeService, want: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    while &*svc.label() != want {
        assert!(Instant::now() < until, "still serving {}", svc.label());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_new_version_swaps_in_with_its_graph_tables() {
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mmbee");
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "mmbee-swap-{}-{}",
        std::process::id(),
        T0
    ));
    let _ = std::fs::remove_dir_all(&root);
    copy_dir(&committed.join("1"), &root.join("mmbee/1"));
    copy_dir(&committed.join("graph/1"), &root.join("graph/1"));
    let cfg = MmbeeConfig {
        enabled: true,
        model: root.join("mmbee").display().to_string(),
        graph: root.join("graph").display().to_string(),
        reload_interval_ms: 50,
        ..MmbeeConfig::default()
    };
    let svc = Arc::new(MmbeeService::start(&cfg).expect("version 1 loads"));
    assert_eq!((&*svc.label(), svc.graph_version()), ("mmbee@1", 1));
    let table = RoomTable::new();
    table.put("r1", content(&svc, "streamer-of-r1", T0, 0.1));
    let mut h = Harness {
        op: GiftScoring::new(svc.clone(), table.clone()),
        offset: 0,
    };
    h.record(action(T0 + 14_000, "r1", "a", ActionKind::Enter, 0));
    assert_eq!(h.versions(T0 + 15_000), ("mmbee@1".into(), 1, T0));

    // Version 3 names graph tables that are not there: it does not serve.
    add_version(&root, 3, 9);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        &*svc.label(),
        "mmbee@1",
        "a version without its graph swapped in"
    );

    // Version 4 with graph version 2 (another copy of the tables, with the
    // embeddings scaled: another space as far as the engine can tell).
    copy_dir(&root.join("graph/1"), &root.join("graph/2"));
    let emb = root.join("graph/2/embeddings.f32");
    let scaled: Vec<u8> = std::fs::read(&emb)
        .expect("embeddings")
        .chunks_exact(4)
        .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * -2.0).to_le_bytes())
        .collect();
    std::fs::write(&emb, scaled).expect("write");
    add_version(&root, 4, 2);
    wait_for_label(&svc, "mmbee@4");
    assert_eq!(svc.graph_version(), 2);

    // The room's tokens are version 1's: the new ranker scores the gift
    // without them (content -1), with graph 2's rows.
    h.record(action(T0 + 16_000, "r1", "a", ActionKind::Gift, 10));
    assert_eq!(h.versions(T0 + 17_000), ("mmbee@4".into(), 2, -1));
    // The room's next segment from version 4's MFQ is read again.
    table.put("r1", content(&svc, "streamer-of-r1", T0 + 10_000, 0.3));
    assert_eq!(h.versions(T0 + 24_000), ("mmbee@4".into(), 2, T0 + 10_000));
    let _ = std::fs::remove_dir_all(&root);
}

/// One step of a scripted user-stage partition.
#[derive(Clone, Debug)]
enum Item {
    /// An action read at the next input offset.
    Action(Event),
    /// A room's segment reaching the `room-embeddings` table.
    Content(&'static str, i64),
    /// Ticks closed up to this end.
    Tick(i64),
}

/// A few minutes of five viewers moving between three rooms, liking and
/// gifting, with a content segment per room every 10 s (in the table when it
/// completes) and a tick every second.
fn script() -> Vec<Item> {
    const ROOMS: [&str; 3] = ["r1", "r2", "r3"];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut items = Vec::new();
    let mut inside: Vec<Option<usize>> = vec![None; 5];
    let mut source_offset = 0;
    for s in 0..180i64 {
        let t = T0 + 14_000 + s * 1000;
        if s % 10 == 0 {
            for (i, room) in ROOMS.iter().enumerate() {
                // In the table before the ticks reach its completion (13 s
                // after its start), as a room stage that keeps up puts it.
                let start = t + 1000 * i as i64 - 13_000;
                items.push(Item::Content(room, start));
            }
        }
        for _ in 0..2 {
            let u = next(5) as usize;
            let user = format!("u{u}");
            let dt = next(1000) as i64;
            let (room, kind, value) = match inside[u] {
                None => {
                    let r = next(3) as usize;
                    inside[u] = Some(r);
                    (ROOMS[r], ActionKind::Enter, 0)
                }
                Some(r) => match next(10) {
                    0 => {
                        inside[u] = None;
                        (ROOMS[r], ActionKind::Leave, 0)
                    }
                    1 | 2 => (ROOMS[r], ActionKind::Gift, 1 + next(50)),
                    3 => (ROOMS[r], ActionKind::Comment, 0),
                    _ => (ROOMS[r], ActionKind::Like, 0),
                },
            };
            let mut a = action(t + dt, room, &user, kind, value);
            if let Event::Action(a) = &mut a {
                a.source_offset = source_offset;
            }
            source_offset += 1;
            items.push(Item::Action(a));
        }
        items.push(Item::Tick(t + 1000));
    }
    // Half a minute more of ticks: a room stage running behind catches up.
    for s in 180..210i64 {
        items.push(Item::Tick(T0 + 14_000 + s * 1000 + 1000));
    }
    items
}

/// Runs `items` through a scoring operator; with `crash_at`, the operator is
/// dropped before that item, a new one restores the changelog records written
/// so far and the input is replayed from the last committed offset (the
/// lowest position the operator held at the last commit). With `lag_ms`, the
/// table is gated and the room stage runs that far behind: a segment reaches
/// the table only when a tick ends `lag_ms` after its completion, with the
/// progress saying so. Returns every prediction written, by id (a second
/// write of an id must be identical).
fn run(
    svc: &Arc<MmbeeService>,
    items: &[Item],
    crash_at: Option<usize>,
    lag_ms: Option<i64>,
) -> BTreeMap<String, GiftPrediction> {
    let table = match lag_ms {
        Some(_) => {
            let t = RoomTable::gated();
            t.assigned(1);
            t.caught_up();
            t
        }
        None => RoomTable::new(),
    };
    let late: std::cell::RefCell<Vec<(&str, RoomContent)>> = Default::default();
    let new_op = || GiftScoring::new(svc.clone(), table.clone()).with_changelog_interval(3000);
    let mut op = new_op();
    let mut changelog: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut got: BTreeMap<String, GiftPrediction> = BTreeMap::new();
    let mut offsets = Vec::new(); // the input offset of each item (actions)
    let mut offset = 0i64;
    for it in items {
        offsets.push(offset);
        if matches!(it, Item::Action(_)) {
            offset += 1;
        }
    }
    let feed = |op: &mut GiftScoring, it: &Item, at: i64, replay: bool| -> Vec<Output> {
        let mut out: Vec<Output> = Vec::new();
        let mut ctx = Context::new(&mut out, 0, 1000);
        match it {
            Item::Action(e) => {
                let pos = Position {
                    kind: InputKind::UserActions,
                    offset: at,
                };
                op.on_record(e, pos, false, &mut ctx);
            }
            Item::Content(room, start) if !replay => {
                let c = content(svc, &format!("streamer-of-{room}"), *start, 0.1);
                match lag_ms {
                    Some(_) => late.borrow_mut().push((room, c)),
                    None => {
                        table.put(room, c);
                    }
                }
            }
            Item::Content(..) => {}
            Item::Tick(end) => {
                if let Some(lag) = lag_ms.filter(|_| !replay) {
                    let through = end - lag;
                    late.borrow_mut().retain(|(room, c)| {
                        let due = c.at_ms <= through;
                        if due {
                            table.put(room, c.clone());
                        }
                        !due
                    });
                    table.progress(0, 0, through);
                }
                op.on_tick(end - 1000, &mut ctx)
            }
        }
        drop(ctx);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ctx = Context::new(&mut out, 0, 1000);
            op.poll(&mut ctx);
            drop(ctx);
            if op.pending() == 0 {
                break;
            }
            assert!(Instant::now() < until, "scores did not come back");
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    };
    let mut collect = |out: Vec<Output>, changelog: &mut BTreeMap<Vec<u8>, Vec<u8>>| {
        for o in out {
            match o.topic {
                OutputTopic::GiftPredictions => {
                    let p = GiftPrediction::decode(&o.payload[..]).expect("prediction");
                    if let Some(old) = got.insert(p.id.clone(), p.clone()) {
                        assert!(
                            (old.probability - p.probability).abs() < 1e-5,
                            "written again with another score: {old:?} then {p:?}"
                        );
                    }
                }
                OutputTopic::UserChangelog { .. } => {
                    changelog.insert(o.key, o.payload);
                }
                other => panic!("unexpected output {other:?}"),
            }
        }
    };
    // Offsets are committed now and then (every 17 items here), each time up
    // to the lowest position the operator holds: the replay after a crash
    // starts there, usually before the last changelog write.
    let mut committed = 0;
    for (i, it) in items.iter().enumerate() {
        if i % 17 == 0 {
            let mut holds = Holds::default();
            op.holds(&mut holds);
            committed = holds.get(InputKind::UserActions).unwrap_or(offsets[i]);
        }
        if crash_at == Some(i) {
            op = new_op();
            let mut out: Vec<Output> = Vec::new();
            let mut ctx = Context::new(&mut out, 0, 1000);
            op.on_start(&mut ctx);
            drop(ctx);
            for (k, v) in &changelog {
                let (name, key) = split_changelog_key(k).expect("changelog key");
                assert_eq!(name, b"gift_scoring");
                op.restore(key, v, None);
            }
            let from = offsets.iter().position(|&o| o >= committed).unwrap_or(i);
            // The replay: every action from the committed offset, and the
            // ticks between them (the table already has the content).
            for j in from..i {
                if matches!(items[j], Item::Action(_)) && offsets[j] < committed {
                    continue;
                }
                collect(feed(&mut op, &items[j], offsets[j], true), &mut changelog);
            }
        }
        collect(feed(&mut op, it, offsets[i], false), &mut changelog);
    }
    got
}

#[test]
fn a_restart_from_the_changelog_writes_what_a_clean_run_writes() {
    let svc = service();
    let items = script();
    let clean = run(&svc, &items, None, None);
    assert!(clean.len() > 150, "too few predictions: {}", clean.len());
    let mut crashes = 0;
    for at in (7..items.len()).step_by(23) {
        let crashed = run(&svc, &items, Some(at), None);
        let missing: Vec<&String> = clean.keys().filter(|k| !crashed.contains_key(*k)).collect();
        let extra: Vec<&String> = crashed.keys().filter(|k| !clean.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "crash before item {at}: missing {:?}, not in the clean run {:?}",
            missing
                .iter()
                .take(3)
                .map(|k| &clean[*k])
                .collect::<Vec<_>>(),
            extra
                .iter()
                .take(3)
                .map(|k| &crashed[*k])
                .collect::<Vec<_>>(),
        );
        for (id, p) in &crashed {
            let c = &clean[id];
            assert!(
                (c.probability - p.probability).abs() < 1e-5,
                "crash before item {at}: {p:?} after the crash, {c:?} in the clean run"
            );
        }
        crashes += 1;
    }
    assert!(crashes >= 10);
}

/// Panics with the first difference between two runs' predictions.
fn same_predictions(
    what: &str,
    want: &BTreeMap<String, GiftPrediction>,
    got: &BTreeMap<String, GiftPrediction>,
) {
    let missing: Vec<&GiftPrediction> = want
        .iter()
        .filter(|(k, _)| !got.contains_key(*k))
        .map(|(_, p)| p)
        .collect();
    let extra: Vec<&GiftPrediction> = got
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .map(|(_, p)| p)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing, e.g. {:?}; {} not in the reference, e.g. {:?}",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
    for (id, p) in got {
        assert!(
            want[id] == *p && want[id].probability.to_bits() == p.probability.to_bits(),
            "{what}: {p:?}, but {:?} in the reference",
            want[id]
        );
    }
}

/// A viewer's actions in several rooms at one millisecond (the rooms' room
/// stage partitions write them to the viewer's partition in any order)
/// apply in one order, so the gifting history, and every score that reads
/// it, is the same to the last bit however they arrived.
#[test]
fn actions_at_one_time_apply_in_one_order_however_they_arrive() {
    let svc = service();
    let rooms = ["r1", "r2", "r3"];
    let at = |t: i64, room: usize, kind: ActionKind, value: u64, offset: i64| {
        let mut a = action(t, rooms[room], "u1", kind, value);
        if let Event::Action(a) = &mut a {
            a.source_partition = room as i32;
            a.source_offset = offset;
        }
        Item::Action(a)
    };
    let script = |order: [usize; 3]| -> Vec<Item> {
        let mut items = Vec::new();
        for (i, room) in rooms.iter().enumerate() {
            items.push(Item::Content(room, T0 + 1000 * i as i64 - 13_000));
        }
        for &r in &order {
            items.push(at(T0 + 1000, r, ActionKind::Enter, 0, 0));
        }
        items.push(Item::Tick(T0 + 2000));
        // Three rounds of gifts in the three rooms at one millisecond each.
        for round in 0..3i64 {
            for &r in &order {
                let value = 1 + 7 * r as u64 + 3 * round as u64;
                items.push(at(
                    T0 + 3000 + 2000 * round,
                    r,
                    ActionKind::Gift,
                    value,
                    1 + round,
                ));
            }
            items.push(Item::Tick(T0 + 4000 + 2000 * round));
        }
        // New segments re-score the viewer in every room on that history.
        for (i, room) in rooms.iter().enumerate() {
            items.push(Item::Content(room, T0 + 10_000 + 1000 * i as i64 - 13_000));
        }
        for s in 0..30 {
            items.push(Item::Tick(T0 + 10_000 + 1000 * s));
        }
        items
    };
    let clean = run(&svc, &script([0, 1, 2]), None, None);
    assert!(clean.values().any(|p| p.trigger == "gift"), "{clean:?}");
    for order in [[2, 1, 0], [1, 0, 2], [0, 2, 1]] {
        same_predictions(
            &format!("arrival order {order:?}"),
            &clean,
            &run(&svc, &script(order), None, None),
        );
    }
}

/// The room stage writes the actions of a source partition again when it
/// restarts: taken once, they change nothing (a gift counted twice would
/// change the viewer's history and every later score).
#[test]
fn actions_the_room_stage_writes_again_are_taken_once() {
    let svc = service();
    let items = script();
    let clean = run(&svc, &items, None, None);
    let mut again = items.clone();
    for at in [len_third(&items), 2 * len_third(&items)] {
        let earlier: Vec<Item> = items[..at]
            .iter()
            .filter(|i| matches!(i, Item::Action(_)))
            .rev()
            .take(12)
            .cloned()
            .collect();
        let gifts = earlier
            .iter()
            .filter(|i| matches!(i, Item::Action(Event::Action(a)) if a.kind() == ActionKind::Gift))
            .count();
        assert!(gifts > 0, "the repeated actions include a gift");
        let pos = again.len() - (items.len() - at);
        for it in earlier.into_iter().rev() {
            again.insert(pos, it);
        }
    }
    same_predictions("repeated actions", &clean, &run(&svc, &again, None, None));
    same_predictions(
        "repeated actions and a crash",
        &clean,
        &run(&svc, &again, Some(2 * len_third(&items) + 5), None),
    );
}

fn len_third(items: &[Item]) -> usize {
    items.len() / 3
}

/// Content that reaches the table late (the room stage behind) is joined as
/// of when it completed: with the table's progress holding the join back,
/// the predictions are those of a room stage that keeps up, crash or not.
#[test]
fn content_that_comes_late_is_joined_as_of_its_completion() {
    let svc = service();
    let items = script();
    let clean = run(&svc, &items, None, None);
    for lag in [1_000, 7_000, 25_000] {
        same_predictions(
            &format!("content {lag} ms late"),
            &clean,
            &run(&svc, &items, None, Some(lag)),
        );
    }
    same_predictions(
        "content 7000 ms late and a crash",
        &clean,
        &run(&svc, &items, Some(items.len() / 2), Some(7_000)),
    );
}

/// MFQ's tokens and the ranker's probability for an input are the same bits
/// whatever batch it runs in (alone, first of two, anywhere in up to 240
/// others), with one thread or two: the batcher groups rooms and pairs as
/// they come, so a replay batches them otherwise.
#[test]
fn mfq_and_the_ranker_do_not_depend_on_their_batch() {
    use onair::models::mmbee::{ContentInput, Gift, MmbeeModel, PairInput, SessionRow};
    use onair::operators::mmbee_content::{COMMENTS, CONTENT_WIDTH, FRAMES, TRANSCRIPTS};
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mmbee");
    let version = onair::models::serving::latest_version(&root).expect("a committed version");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 2001) as f32 / 1000.0 - 1.0
    };
    let contents: Vec<ContentInput> = (0..16)
        .map(|i| ContentInput {
            row: (0..CONTENT_WIDTH).map(|_| uniform()).collect(),
            frames: 1 + i % FRAMES,
            comment_tokens: (5 * i) % (COMMENTS + 1),
            transcript_tokens: i % (TRANSCRIPTS + 1),
            streamer_id: Arc::from(format!("streamer-{i:04}")),
        })
        .collect();
    for threads in [1, 2] {
        let graph = onair::graph::tables::GraphTables::read(&root.join("graph/1"))
            .expect("the committed graph tables");
        let mut m = MmbeeModel::load(&version, threads)
            .and_then(|m| m.with_graph(Some(Arc::new(graph))))
            .expect("the committed version loads");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let c = &contents;
        let alone = m.content(&[&c[0]]).expect("mfq");
        let two = m.content(&[&c[0], &c[1]]).expect("mfq");
        let six = m
            .content(&[&c[3], &c[1], &c[2], &c[0], &c[5], &c[4]])
            .expect("mfq");
        let all: Vec<&ContentInput> = c.iter().rev().collect();
        let sixteen = m.content(&all).expect("mfq");
        let want = bits(&two[0]);
        assert_eq!(
            bits(&alone[0]),
            want,
            "MFQ alone vs first of two, {threads} threads"
        );
        assert_eq!(
            bits(&six[3]),
            want,
            "MFQ 4th of six vs first of two, {threads} threads"
        );
        assert_eq!(
            bits(&sixteen[15]),
            want,
            "MFQ last of 16 vs first of two, {threads} threads"
        );
        // Every row, whatever slots it fills, gets the bits it gets alone in
        // any batch (a batch of one runs as two: with its frames or
        // transcripts all filled, a row alone took other kernels).
        let each: Vec<Vec<u32>> = c
            .iter()
            .map(|x| bits(&m.content(&[x]).expect("mfq")[0]))
            .collect();
        for k in 1..c.len() {
            let some: Vec<&ContentInput> = c[..=k].iter().rev().collect();
            let out = m.content(&some).expect("mfq");
            for (j, o) in out.iter().enumerate() {
                assert_eq!(
                    bits(o),
                    each[k - j],
                    "MFQ row {} at {j} of {}, {threads} threads",
                    k - j,
                    k + 1
                );
            }
        }
        // Pairs of viewers in the graph and not, with histories up to past
        // the ranker's sequence length (alone, 7 of 300 such pairs took
        // other kernels).
        let users: Vec<String> = std::fs::read_to_string(root.join("graph/1/nodes.tsv"))
            .expect("graph nodes")
            .lines()
            .filter_map(|l| l.strip_prefix("u\t"))
            .filter_map(|l| l.split('\t').next())
            .take(30)
            .map(str::to_string)
            .chain((0..10).map(|i| format!("unknown-{i}")))
            .collect();
        let pairs: Vec<_> = (0..240)
            .map(|i| {
                let n = [0, 1, 3, 7, 33, 40][i % 6];
                let p = PairInput {
                    tokens: each_tokens(&mut m, &c[i % c.len()]),
                    tokens_model: onair::models::serving::version_label(&version),
                    streamer_id: Arc::from(format!("streamer-{:04}", i % 8)),
                    user_id: Arc::from(users[i % users.len()].as_str()),
                    history: (0..n)
                        .map(|k| Gift {
                            streamer_id: Arc::from(format!("streamer-{:04}", k % 12)),
                            t_ms: T0 + k as i64 * 1777,
                            value: 1 + k as u64,
                        })
                        .collect(),
                    session: SessionRow {
                        present_ms: 7.3 * (uniform() + 1.0) * 5000.0,
                        likes: (n % 4) as f32,
                        comments: (n % 3) as f32,
                        gifts: (n % 2) as f32,
                        gift_value: (n * 3 % 5) as f32,
                        followed: n % 2 == 0,
                    },
                    t_ms: T0 + 60_000 + i as i64 * 613,
                };
                m.features(&p).0
            })
            .collect();
        let alone: Vec<u32> = pairs
            .iter()
            .map(|p| m.rank(&[p]).expect("ranker")[0].to_bits())
            .collect();
        let all: Vec<_> = pairs.iter().collect();
        let reversed: Vec<_> = pairs.iter().take(100).rev().collect();
        // Only pairs whose history fills the sequence (no padding there).
        let full: Vec<usize> = (0..240).filter(|i| i % 6 >= 4).collect();
        let full_batch: Vec<_> = full.iter().map(|&i| &pairs[i]).collect();
        for (what, batch, index) in [
            (
                "full histories",
                m.rank(&full_batch).expect("ranker"),
                full.clone(),
            ),
            (
                "all 240",
                m.rank(&all).expect("ranker"),
                (0..240).collect::<Vec<_>>(),
            ),
            (
                "100 reversed",
                m.rank(&reversed).expect("ranker"),
                (0..100).rev().collect(),
            ),
        ] {
            for (j, &i) in index.iter().enumerate() {
                assert_eq!(
                    batch[j].to_bits(),
                    alone[i],
                    "ranker pair {i} at {j} of {what} vs alone, {threads} threads"
                );
            }
        }
        for i in 0..pairs.len() - 1 {
            let two = m.rank(&[&pairs[i + 1], &pairs[i]]).expect("ranker");
            assert_eq!(
                two[1].to_bits(),
                alone[i],
                "ranker pair {i} second of two vs alone, {threads} threads"
            );
        }
    }
}

/// MFQ's tokens for one segment, alone.
fn each_tokens(
    m: &mut onair::models::mmbee::MmbeeModel,
    c: &onair::models::mmbee::ContentInput,
) -> Arc<[f32]> {
    m.content(&[c]).expect("mfq").remove(0)
}
