//! Property tests of the user stage's sequence state: whatever order the
//! actions of a user arrive in (live and short-video streams interleaved,
//! out of event-time order up to the reorder bound, replayed suffixes of a
//! stream), the incrementally kept sequence equals the one rebuilt from
//! scratch over the distinct actions in event-time order, after every
//! delivery; and the state read back from its changelog record is the same
//! state.

use std::sync::Arc;

use onair::models::interests::InterestModel;
use onair::state::interests::{Interests, FRACTION_BITS};
use onair::state::sequence::{
    rebuild, Act, Applied, Bounds, Domain, Feedback, Source, Step, UserState,
};
use proptest::prelude::*;

/// The committed compressed-interest model.
fn model() -> Arc<InterestModel> {
    static MODEL: std::sync::OnceLock<Arc<InterestModel>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(
                InterestModel::load(std::path::Path::new("models/interests"))
                    .expect("the committed interest model"),
            )
        })
        .clone()
}

/// Reorder bound of the generated deliveries (ms).
const LATENESS_MS: i64 = 20_000;

#[derive(Clone, Debug)]
struct Gen {
    /// (stream, event time, domain, item index, step)
    acts: Vec<(u8, i64, Domain, u8, Step)>,
    /// Arrival jitter per act, 0..=LATENESS_MS.
    jitter: Vec<i64>,
    /// Replays: after the n-th delivery, stream s is re-delivered from its k-th record.
    replays: Vec<(usize, u8, usize)>,
    bounds: Bounds,
}

fn step() -> impl Strategy<Value = (Domain, Step)> {
    prop_oneof![
        Just((Domain::Live, Step::Impression)),
        Just((Domain::Live, Step::Enter)),
        Just((Domain::Live, Step::Enter)),
        Just((Domain::Live, Step::Watch)),
        Just((Domain::Live, Step::Watch)),
        Just((Domain::Live, Step::Leave)),
        Just((Domain::Live, Step::Feedback(Feedback::Like))),
        Just((Domain::Live, Step::Feedback(Feedback::Gift))),
        Just((Domain::Live, Step::Feedback(Feedback::Comment))),
        Just((Domain::ShortVideo, Step::Impression)),
        Just((Domain::ShortVideo, Step::Play)),
        Just((Domain::ShortVideo, Step::Play)),
        Just((Domain::ShortVideo, Step::Feedback(Feedback::Like))),
        Just((Domain::ShortVideo, Step::Feedback(Feedback::Share))),
    ]
}

fn gen() -> impl Strategy<Value = Gen> {
    let acts = prop::collection::vec((0u8..3, 0i64..600, step(), 0u8..4), 1..120);
    (
        acts,
        prop::collection::vec(0..=LATENESS_MS, 120),
        prop::collection::vec((0usize..120, 0u8..3, 0usize..60), 0..4),
        prop_oneof![
            Just(Bounds::default()),
            Just(Bounds {
                live_max: 3,
                live_max_age_ms: 200_000,
                short_video_max: 4,
                short_video_max_age_ms: 150_000,
                long_view_ms: 12_000,
            }),
        ],
    )
        .prop_map(|(acts, jitter, replays, bounds)| Gen {
            acts: acts
                .into_iter()
                .enumerate()
                .map(|(i, (stream, t, (d, s), item))| {
                    // Distinct event times (ties are tested in the unit tests).
                    let t = t * 1_000 + i as i64;
                    // Live actions come from two source partitions (streams 0
                    // and 1), short-video ones from their own (stream 2).
                    let stream = if d == Domain::ShortVideo {
                        2
                    } else {
                        stream % 2
                    };
                    (stream, t, d, item, s)
                })
                .collect(),
            jitter,
            replays,
            bounds,
        })
}

/// The deliveries: every act once, in arrival order (event time plus
/// jitter, each stream in its offset order), with replayed stream suffixes.
fn deliveries(g: &Gen) -> Vec<Act> {
    let mut arrivals: Vec<(i64, usize)> = g
        .acts
        .iter()
        .enumerate()
        .map(|(i, a)| (a.1 + g.jitter[i % g.jitter.len()], i))
        .collect();
    arrivals.sort();
    // Offsets follow arrival order within each stream.
    let mut per_stream: [Vec<Act>; 3] = Default::default();
    let mut order = Vec::new();
    for &(_, i) in &arrivals {
        let (stream, t, domain, item, step) = g.acts[i];
        let lane = &mut per_stream[stream as usize];
        let act = Act {
            time_ms: t,
            source: Source {
                stream: u8::from(domain == Domain::ShortVideo),
                partition: i32::from(stream),
                offset: lane.len() as i64,
            },
            domain,
            item: Arc::from(format!("item-{item}")),
            owner: Arc::from(format!("owner-{}", item % 2)),
            step,
            watch_ms: match step {
                Step::Watch | Step::Play => 5_000,
                _ => 0,
            },
            duration_ms: if step == Step::Play { 9_000 } else { 0 },
            gift_value: if step == Step::Feedback(Feedback::Gift) {
                7
            } else {
                0
            },
            highlight: (step == Step::Enter).then_some(f32::from(item) / 4.0),
            content: (step == Step::Enter).then(|| Arc::from(vec![f32::from(item); 3])),
        };
        lane.push(act.clone());
        order.push(act);
    }
    let mut out = Vec::new();
    let mut sent = [0usize; 3];
    for (n, act) in order.into_iter().enumerate() {
        for &(at, stream, from) in &g.replays {
            if at == n {
                let s = stream as usize;
                let lane = &per_stream[s];
                out.extend(lane[from.min(sent[s])..sent[s]].iter().cloned());
            }
        }
        sent[act.source.partition as usize] += 1;
        out.push(act);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_sequence_equals_rebuild(g in gen()) {
        let model = model();
        let mut state = UserState::with_interests(Some(model.clone()));
        let mut taken: Vec<Act> = Vec::new();
        let mut newest = i64::MIN;
        for act in deliveries(&g) {
            newest = newest.max(act.time_ms);
            let fresh = !taken.iter().any(|a| a.time_ms == act.time_ms && a.source == act.source);
            let applied = state.apply(act.clone(), &g.bounds);
            if fresh {
                prop_assert_eq!(applied, Applied::Changed, "a new action within the bound was refused");
                taken.push(act);
            } else {
                prop_assert_ne!(applied, Applied::Changed, "a replay changed the state");
            }
            prop_assert_eq!(state.current(), &rebuild(&taken, &g.bounds, Some(&model)));
            // What the operator does at each tick: nothing older than the
            // reorder bound will come in order any more.
            state.advance(newest - LATENESS_MS, &g.bounds);
            prop_assert_eq!(state.current(), &rebuild(&taken, &g.bounds, Some(&model)));
            // The changelog record reads back to the same state, which
            // then goes on exactly as the original would.
            let restored = UserState::decode(&state.encode(), &g.bounds, Some(&model)).expect("reads back");
            prop_assert_eq!(&restored, &state);
            state = restored;
        }
        // Every distinct action was taken exactly once.
        let mut keys: Vec<(i64, Source)> = taken.iter().map(|a| (a.time_ms, a.source)).collect();
        keys.sort();
        keys.dedup();
        prop_assert_eq!(keys.len(), g.acts.len());
    }

    /// Compressed interests: with bounds that keep every behaviour, the
    /// incrementally kept sums (terms added, and replaced as behaviours
    /// changed, in arrival order with late actions refolded) are exactly the
    /// sums recomputed from scratch over the final behaviours, in any order;
    /// and they are within n · 2^-(FRACTION_BITS+1) of the real-valued sums.
    #[test]
    fn interests_equal_recomputation(g in gen(), rotate in 0usize..50) {
        let model = model();
        let bounds = Bounds {
            live_max: usize::MAX,
            live_max_age_ms: i64::MAX / 4,
            short_video_max: usize::MAX,
            short_video_max_age_ms: i64::MAX / 4,
            long_view_ms: g.bounds.long_view_ms,
        };
        let mut state = UserState::with_interests(Some(model.clone()));
        for act in deliveries(&g) {
            state.apply(act, &bounds);
        }
        let mut behaviours = state.current().behaviours();
        let n = behaviours.len();
        behaviours.rotate_left(rotate % n.max(1));
        let mut scratch = Interests::new(model.clone());
        for b in behaviours.iter().rev() {
            scratch.add(b);
        }
        let kept = state.current().interests().expect("interests kept");
        prop_assert_eq!(kept, &scratch);
        let mut real = vec![0f64; model.state_len()];
        for b in &behaviours {
            let x = onair::models::interests::dense(b);
            let t = model.term(&x, onair::models::interests::bucket(&b.owner, model.buckets()));
            model.accumulate(&t, |i, v| real[i] += v);
        }
        let bound = n as f64 * 2f64.powi(-(FRACTION_BITS as i32) - 1) + 1e-9;
        for (i, (&fixed, &r)) in kept.sums().iter().zip(&real).enumerate() {
            let got = fixed as f64 / 2f64.powi(FRACTION_BITS as i32);
            prop_assert!((got - r).abs() <= bound, "value {}: {} vs {} (bound {})", i, got, r, bound);
        }
    }

    /// Moment labels: whatever the visit, each feedback type is reported at
    /// most once, positives at the end of the period it first occurred in
    /// (or at the leave), negatives only at the leave, and every type is
    /// reported by the time the watermark passes the leave.
    #[test]
    fn moment_labels_report_each_type_once(g in gen(), period in 5_000i64..40_000) {
        let mut state = UserState::new();
        let mut sorted: Vec<Act> = deliveries(&g);
        sorted.sort_by_key(|a| (a.time_ms, a.source));
        sorted.dedup_by_key(|a| (a.time_ms, a.source));
        let mut reports = Vec::new();
        let mut last = i64::MIN;
        for act in sorted {
            let t = act.time_ms;
            if t > last {
                reports.extend(state.labels(t - 1, period));
                last = t;
            }
            state.apply(act, &g.bounds);
        }
        reports.extend(state.labels(i64::MAX / 2, period));
        let fold = state.current().clone();
        for r in &reports {
            let earlier: u16 = reports
                .iter()
                .filter(|o| o.room == r.room && o.visit_start_ms == r.visit_start_ms && o.at_ms < r.at_ms)
                .fold(0, |m, o| m | o.positives | o.negatives);
            prop_assert_eq!(earlier & (r.positives | r.negatives), 0, "a type reported twice");
            prop_assert_eq!(r.positives & r.negatives, 0);
            if r.negatives != 0 {
                prop_assert!(r.at_leave);
                prop_assert_eq!(Some(r.at_ms), r.visit.end_ms);
            }
            for f in Feedback::ALL {
                if r.positives & f.bit() != 0 {
                    let first = r.visit.first(f).expect("a positive that never occurred");
                    prop_assert!(first < r.at_ms || (r.at_leave && first <= r.at_ms));
                    prop_assert!(r.at_leave || r.at_ms - first <= period, "reported late");
                }
            }
        }
        // Every visit that ended and is still in the sequence was fully reported.
        for b in fold.live().filter(|b| b.end_ms.is_some()) {
            let all: u16 = reports
                .iter()
                .filter(|o| o.room == b.item && o.visit_start_ms == b.start_ms)
                .fold(0, |m, o| m | o.positives | o.negatives);
            prop_assert_eq!(all, onair::state::sequence::LIVE_LABELS);
        }
    }
}
