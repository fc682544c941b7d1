//! Benchmark: the per-record and per-tick CPU cost of the room-activity
//! operator, without Kafka: decoding a protobuf record (`decode_input`) plus
//! `RoomActivity::on_record`, for comments and for viewer actions, and
//! `on_tick` over 200 rooms with 50 viewers each.
//!
//! Records come in batches of one tick's worth for 200 rooms that have 50
//! viewers inside; the tick is closed (untimed) after each batch, so the
//! operator's state stays the size it has in a running engine and every
//! batch pays for opening its ticks.
//!
//! Run: `cargo bench --bench room_activity -- --warm-up-time 1 --measurement-time 3`.
//!
//! Not for: the broker path (see `benches/comment_path.rs`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use onair::operators::room_activity::RoomActivity;
use onair::runtime::{Context, Operator, Output, Position};
use onair::schema::{decode_input, ActionKind, Comment, Event, InputKind, Limits, ViewerAction};
use prost::Message;

const T0: i64 = 1_767_225_600_000;
const TICK_MS: i64 = 1000;
const ROOMS: u32 = 200;
const USERS: u32 = 5000;
const VIEWERS: u32 = 50;

/// One encoded input record.
struct Rec {
    kind: InputKind,
    key: Vec<u8>,
    payload: Vec<u8>,
}

fn room_id(r: u32) -> String {
    format!("room-{r:03}")
}

fn user_id(u: u32) -> String {
    format!("user-{u:04}")
}

/// `per_room` comments for each room, all in the tick starting at `T0`.
fn comments(per_room: u32) -> Vec<Rec> {
    let n = ROOMS * per_room;
    (0..n)
        .map(|i| {
            let room = i % ROOMS;
            let c = Comment {
                schema_version: 1,
                room_id: room_id(room),
                user_id: user_id((i * 7919) % USERS),
                event_time_ms: T0 + i64::from(i) * TICK_MS / i64::from(n),
                text: "主播好 666 so good".into(),
                comment_id: format!("c{i}"),
            };
            Rec {
                kind: InputKind::Comments,
                key: c.room_id.clone().into_bytes(),
                payload: c.encode_to_vec(),
            }
        })
        .collect()
}

/// Ten actions per room in the tick starting at `T0`: impression, enter,
/// watch progress, like, leave (of the user who entered), watch progress,
/// share, gift, follow, like.
fn actions() -> Vec<Rec> {
    const KINDS: [ActionKind; 10] = [
        ActionKind::Impression,
        ActionKind::Enter,
        ActionKind::WatchProgress,
        ActionKind::Like,
        ActionKind::Leave,
        ActionKind::WatchProgress,
        ActionKind::Share,
        ActionKind::Gift,
        ActionKind::Follow,
        ActionKind::Like,
    ];
    let n = ROOMS * KINDS.len() as u32;
    (0..n)
        .map(|i| {
            let room = i % ROOMS;
            let step = i / ROOMS;
            let kind = KINDS[step as usize];
            let user = match kind {
                // The same user enters and leaves: presence stays bounded.
                ActionKind::Enter | ActionKind::Leave => room * 13 % USERS,
                _ => (i * 7919) % USERS,
            };
            let a = ViewerAction {
                schema_version: 1,
                room_id: room_id(room),
                user_id: user_id(user),
                streamer_id: format!("streamer-{room:03}"),
                event_time_ms: T0 + i64::from(i) * TICK_MS / i64::from(n),
                kind: kind as i32,
                watch_ms: 5000,
                gift_value: 10,
                gift_id: "rose".into(),
                ..ViewerAction::default()
            };
            Rec {
                kind: InputKind::Actions,
                key: a.room_id.clone().into_bytes(),
                payload: a.encode_to_vec(),
            }
        })
        .collect()
}

fn decode(r: &Rec, limits: &Limits) -> Event {
    decode_input(
        r.kind,
        Some(black_box(&r.key[..])),
        Some(black_box(&r.payload[..])),
        None,
        limits,
    )
    .expect("valid record")
}

/// Times `iters` records (decode + on_record), one tick's batch at a time,
/// closing the tick between batches outside the timed part.
fn records_per_iter(op: &mut RoomActivity, recs: &[Rec], iters: u64) -> Duration {
    let limits = Limits::default();
    let mut outputs: Vec<Output> = Vec::new();
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    let mut offset = 0i64;
    while done < iters {
        let batch = ((iters - done) as usize).min(recs.len());
        let mut ctx = Context::new(&mut outputs, 0, TICK_MS);
        let started = Instant::now();
        for r in &recs[..batch] {
            let event = decode(r, &limits);
            let pos = Position {
                kind: r.kind,
                offset,
            };
            op.on_record(&event, pos, false, &mut ctx);
            offset += 1;
        }
        total += started.elapsed();
        op.on_tick(T0, &mut ctx);
        outputs.clear();
        done += batch as u64;
    }
    total
}

fn bench_records(c: &mut Criterion) {
    let limits = Limits::default();
    let comments = comments(5);
    let actions = actions();
    let mut g = c.benchmark_group("per_record");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode/comment", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % comments.len();
            decode(&comments[i], &limits)
        })
    });
    // Rooms with viewers inside stay in the operator between ticks, as live
    // rooms do in a running engine.
    g.bench_function("decode+on_record/comment", |b| {
        let mut op = rooms_with_viewers();
        b.iter_custom(|iters| records_per_iter(&mut op, &comments, iters))
    });
    g.bench_function("decode+on_record/action", |b| {
        let mut op = rooms_with_viewers();
        b.iter_custom(|iters| records_per_iter(&mut op, &actions, iters))
    });
    g.finish();
}

/// An operator holding `ROOMS` rooms with `VIEWERS` viewers inside each.
fn rooms_with_viewers() -> RoomActivity {
    let limits = Limits::default();
    let mut op = RoomActivity::new(TICK_MS);
    let mut outputs = Vec::new();
    let mut ctx = Context::new(&mut outputs, 0, TICK_MS);
    let mut offset = 0;
    for room in 0..ROOMS {
        for v in 0..VIEWERS {
            let a = ViewerAction {
                schema_version: 1,
                room_id: room_id(room),
                user_id: user_id((room * VIEWERS + v) % USERS),
                streamer_id: format!("streamer-{room:03}"),
                event_time_ms: T0 + i64::from(v),
                kind: ActionKind::Enter as i32,
                ..Default::default()
            };
            let rec = Rec {
                kind: InputKind::Actions,
                key: a.room_id.clone().into_bytes(),
                payload: a.encode_to_vec(),
            };
            let pos = Position {
                kind: InputKind::Actions,
                offset,
            };
            offset += 1;
            op.on_record(&decode(&rec, &limits), pos, false, &mut ctx);
        }
    }
    op.on_tick(T0, &mut ctx);
    assert_eq!(op.rooms(), ROOMS as usize);
    op
}

fn bench_ticks(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("on_tick");
    g.throughput(Throughput::Elements(u64::from(ROOMS)));
    g.bench_function("200_rooms_50_viewers/idle", |b| {
        let mut op = rooms_with_viewers();
        let mut outputs = Vec::new();
        let mut tick = T0;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                tick += TICK_MS;
                let mut ctx = Context::new(&mut outputs, 0, TICK_MS);
                let started = Instant::now();
                op.on_tick(tick, &mut ctx);
                total += started.elapsed();
                assert_eq!(outputs.len(), ROOMS as usize);
                outputs.clear();
            }
            total
        })
    });
    // The same, after a tick with 5 comments per room (fed untimed).
    let events: Vec<(Event, Position)> = comments(5)
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let pos = Position {
                kind: r.kind,
                offset: i as i64,
            };
            (decode(r, &limits), pos)
        })
        .collect();
    g.bench_function("200_rooms_50_viewers/5_comments_each", |b| {
        let mut op = rooms_with_viewers();
        let mut outputs = Vec::new();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut ctx = Context::new(&mut outputs, 0, TICK_MS);
                for (event, pos) in &events {
                    op.on_record(event, *pos, false, &mut ctx);
                }
                let started = Instant::now();
                op.on_tick(T0, &mut ctx);
                total += started.elapsed();
                assert_eq!(outputs.len(), ROOMS as usize);
                outputs.clear();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench_records, bench_ticks);
criterion_main!(benches);
