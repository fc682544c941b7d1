//! Benchmark: the user stage's sequence state, without Kafka.
//!
//! - `apply`: one live or short-video action through the `user_sequences`
//!   operator (protobuf decode, `on_record`, and the tick's snapshot and
//!   changelog records), users in steady state at the default bounds. The
//!   reference, measured in the same run, is what a store of raw actions
//!   does instead: rebuild the user's sequence from all of its actions on
//!   each new one.
//! - memory per user at the default bounds (64 live visits with a 64-float
//!   content vector each, 128 short-video plays), with and without
//!   compressed interests (on in every measurement here), counted by a counting
//!   allocator, and the size of the user's changelog record;
//! - restore: reading one user's changelog record back (decode and refold),
//!   reported per million users.
//!
//! Run: `cargo bench --bench user_sequences -- --warm-up-time 1 --measurement-time 3`.
//!
//! Not for: the broker path (see `tests/user_sequences_pipeline.rs` for the
//! restore through the broker).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use onair::config::UserSequencesConfig;
use onair::models::interests::InterestModel;
use onair::operators::user_sequences::UserSequences;
use onair::runtime::{Context, Operator, Output, Position};
use onair::schema::{
    decode_input, ActionKind, Event, InputKind, Limits, ShortVideoAction, ShortVideoActionKind,
    ViewerAction,
};
use onair::state::sequence::{rebuild, Act, Bounds, Domain, Source, Step, UserState};
use prost::Message;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const T0: i64 = 1_767_225_600_000;
const DIM: usize = 64;

/// One user's history: `visits` live visits (impression, enter, 3
/// heartbeats, a like, leave) and `plays` short-video plays (impression,
/// play, a like on every 4th), interleaved in time.
fn history(user: u32, visits: u32, plays: u32) -> Vec<Act> {
    let mut out = Vec::new();
    let mut t = T0;
    let mut off = 0i64;
    let mut push = |t: i64, domain: Domain, item: String, owner: String, step: Step, w: u32| {
        off += 1;
        let enter = step == Step::Enter;
        out.push(Act {
            time_ms: t,
            source: Source {
                stream: u8::from(domain == Domain::ShortVideo),
                partition: 0,
                offset: off,
            },
            domain,
            item: item.into(),
            owner: owner.into(),
            step,
            watch_ms: w,
            duration_ms: if step == Step::Play { 15_000 } else { 0 },
            gift_value: 0,
            highlight: enter.then_some(0.5),
            content: enter.then(|| Arc::from(vec![0.1f32; DIM])),
        });
    };
    for i in 0..visits.max(plays) {
        if i < visits {
            let room = format!("room-{:04}", (user + i * 7) % 500);
            let s = format!("streamer-{:04}", (user + i * 7) % 500);
            push(
                t,
                Domain::Live,
                room.clone(),
                s.clone(),
                Step::Impression,
                0,
            );
            push(
                t + 1_000,
                Domain::Live,
                room.clone(),
                s.clone(),
                Step::Enter,
                0,
            );
            for k in 1..=3 {
                push(
                    t + 1_000 + k * 5_000,
                    Domain::Live,
                    room.clone(),
                    s.clone(),
                    Step::Watch,
                    5_000,
                );
            }
            push(
                t + 9_000,
                Domain::Live,
                room.clone(),
                s.clone(),
                Step::Feedback(onair::state::sequence::Feedback::Like),
                0,
            );
            push(t + 20_000, Domain::Live, room, s, Step::Leave, 0);
            t += 21_000;
        }
        for _ in 0..2 {
            if i < plays {
                let v = format!("video-{:06}", (user * 131 + i) % 100_000);
                let a = format!("author-{:04}", (user + i) % 3000);
                push(
                    t,
                    Domain::ShortVideo,
                    v.clone(),
                    a.clone(),
                    Step::Impression,
                    0,
                );
                push(t + 500, Domain::ShortVideo, v, a, Step::Play, 12_000);
                t += 13_000;
            }
        }
    }
    out
}

fn state(acts: &[Act], b: &Bounds, model: Option<&Arc<InterestModel>>) -> UserState {
    let mut s = UserState::with_interests(model.cloned());
    for a in acts {
        s.apply(a.clone(), b);
    }
    s.advance(i64::MAX, b);
    s
}

/// The `i`-th action of the steady-state stream: `per_tick` per second of
/// event time, spread over `users` users, two live actions for each
/// short-video one.
fn record(users: u32, i: u32, per_tick: u32) -> (InputKind, Vec<u8>, Vec<u8>) {
    let t = T0 + i64::from(i) * 1000 / i64::from(per_tick);
    let uid = format!("user-{:06}", (i.wrapping_mul(7919)) % users);
    if i.is_multiple_of(3) {
        let s = ShortVideoAction {
            schema_version: 1,
            user_id: uid.clone(),
            video_id: format!("video-{}", i % 1000),
            author_id: format!("author-{}", i % 100),
            event_time_ms: t,
            kind: ShortVideoActionKind::Play as i32,
            watch_ms: 9_000,
            duration_ms: 15_000,
        };
        (
            InputKind::ShortVideoActions,
            uid.into_bytes(),
            s.encode_to_vec(),
        )
    } else {
        let kind = match i % 6 {
            1 => ActionKind::Enter,
            2 => ActionKind::WatchProgress,
            4 => ActionKind::Like,
            _ => ActionKind::Leave,
        };
        let a = ViewerAction {
            schema_version: 1,
            room_id: format!("room-{}", i % 200),
            user_id: uid.clone(),
            streamer_id: format!("streamer-{}", i % 200),
            event_time_ms: t,
            kind: kind as i32,
            watch_ms: 5_000,
            source_partition: 0,
            source_offset: i64::from(i),
            ..ViewerAction::default()
        };
        (InputKind::UserActions, uid.into_bytes(), a.encode_to_vec())
    }
}

fn bench(c: &mut Criterion) {
    let b = Bounds::default();
    // The committed compressed-interest model, on by default.
    let model = Arc::new(
        InterestModel::load(std::path::Path::new("models/interests")).expect("interest model"),
    );
    // Memory per user at the default bounds.
    let users = 2_000u32;
    let histories: Vec<Vec<Act>> = (0..users).map(|u| history(u, 64, 128)).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let plain: Vec<UserState> = histories.iter().map(|h| state(h, &b, None)).collect();
    let plain_bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(plain);
    let before = LIVE.load(Ordering::Relaxed);
    let states: Vec<UserState> = histories
        .iter()
        .map(|h| state(h, &b, Some(&model)))
        .collect();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let s0 = &states[0];
    assert_eq!(s0.current().live().count(), 64);
    assert_eq!(s0.current().short_videos().count(), 128);
    let record_bytes: usize =
        states.iter().map(|s| s.encode().len()).sum::<usize>() / users as usize;
    eprintln!(
        "memory per user at the default bounds: {} bytes in the state with compressed interests ({} without; {} users; 64 live with {DIM}-float content, 128 short); changelog record {} bytes",
        bytes / users as isize,
        plain_bytes / users as isize,
        users,
        record_bytes
    );

    // Restore: decode and refold one user's record.
    let encoded: Vec<Vec<u8>> = states.iter().take(200).map(UserState::encode).collect();
    let mut g = c.benchmark_group("user_sequences");
    g.throughput(Throughput::Elements(encoded.len() as u64));
    g.bench_function("restore_user_record", |bench| {
        bench.iter(|| {
            for e in &encoded {
                black_box(UserState::decode(e, &b, Some(&model)).expect("reads back"));
            }
        })
    });
    let started = Instant::now();
    for e in &encoded {
        black_box(UserState::decode(e, &b, Some(&model)).expect("reads back"));
    }
    let per_user = started.elapsed() / encoded.len() as u32;
    eprintln!(
        "restore (decode + refold, no broker): {:?} per user, {:.1} s per million users",
        per_user,
        per_user.as_secs_f64() * 1e6
    );
    drop(states);

    // The operator in steady state, against the rebuild-per-action reference.
    let cfg = Arc::new(UserSequencesConfig {
        enabled: true,
        ..UserSequencesConfig::default()
    });
    let n_users = 20_000u32;
    let per_tick = 2_000u32;
    let limits = Limits::default();
    // The same stream with and without compressed interests (each operator
    // gets fresh users and times: the streams start over).
    for (name, interests) in [
        ("apply_operator", Some(model.clone())),
        ("apply_operator_without_interests", None),
    ] {
        let mut op = UserSequences::new(cfg.clone(), None).with_interests(interests);
        let mut outputs: Vec<Output> = Vec::new();
        let next = std::cell::Cell::new(0u32);
        g.throughput(Throughput::Elements(u64::from(per_tick)));
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || {
                    // One tick's records, encoded (not timed).
                    let k = next.get();
                    next.set(k + 1);
                    let recs: Vec<_> = (0..per_tick)
                        .map(|j| record(n_users, k * per_tick + j, per_tick))
                        .collect();
                    (k, recs)
                },
                |(k, recs)| {
                    let mut ctx = Context::new(&mut outputs, 0, 1000);
                    for (i, (kind, key, payload)) in recs.iter().enumerate() {
                        let ev: Event =
                            decode_input(*kind, Some(key), Some(payload), None, &limits)
                                .expect("valid record");
                        let pos = Position {
                            kind: *kind,
                            offset: i64::from(k * per_tick) + i as i64,
                        };
                        op.on_record(&ev, pos, false, &mut ctx);
                    }
                    op.on_tick(T0 + i64::from(k) * 1000, &mut ctx);
                    drop(ctx);
                    outputs.clear();
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    // Reference: rebuild a full user's sequence from its raw actions on each new one.
    let full = &histories[0];
    g.throughput(Throughput::Elements(1));
    g.bench_function("reference_rebuild_per_action", |bench| {
        bench.iter(|| black_box(rebuild(full.iter(), &b, Some(&model))))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
