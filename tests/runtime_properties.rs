//! Property tests of the event-time runtime and the room-activity state:
//! whatever the arrival order (within the allowed lateness), a partition task
//! publishes exactly the ticks the simulator's independent ground-truth code
//! computes; and no byte string makes the decoder panic.

use std::sync::Arc;
use std::time::Duration;

use onair::config::{DeadLetterConfig, PipelineConfig};
use onair::runtime::{Control, Input, InputRecord, PartitionSpec, PartitionTask};
use onair::schema::{
    decode_input, ActionKind, AudioChunk, AudioFormat, Comment, InputKind, Limits, VideoFormat,
    VideoSegment, ViewerAction,
};
use onair::simulator::{GroundTruth, SimEvent};
use onair::sinks::console::ConsoleSink;
use proptest::prelude::*;
use prost::Message;

const T0: i64 = 1_767_225_600_000;
const ROOMS: usize = 3;

#[derive(Clone, Debug)]
enum Gen {
    Comment {
        user: u8,
    },
    Action {
        user: u8,
        kind: u8,
        value: u16,
    },
    Toggle {
        user: u8,
    },
    Audio {
        frames: u16,
        stereo: bool,
        rate_8k: bool,
        amp: u16,
    },
    Video,
}

fn gen_event() -> impl Strategy<Value = (usize, i64, Gen)> {
    let kind = prop_oneof![
        (0u8..6).prop_map(|user| Gen::Comment { user }),
        (0u8..6, 0u8..6, 0u16..600).prop_map(|(user, kind, value)| Gen::Action {
            user,
            kind,
            value
        }),
        (0u8..6).prop_map(|user| Gen::Toggle { user }),
        (1u16..3000, any::<bool>(), any::<bool>(), 0u16..20000).prop_map(
            |(frames, stereo, rate_8k, amp)| Gen::Audio {
                frames,
                stereo,
                rate_8k,
                amp
            }
        ),
        Just(Gen::Video),
    ];
    (0..ROOMS, 0i64..8000, kind)
}

/// Builds the concrete events (presence toggles become ENTER/LEAVE in time
/// order per user and room), sorted by event time.
fn materialise(gens: Vec<(usize, i64, Gen)>) -> Vec<(usize, SimEvent)> {
    let mut gens = gens;
    // Unique times per (room, user) toggle so ENTER/LEAVE never tie.
    gens.sort_by_key(|(r, t, _)| (*t, *r));
    let mut inside = std::collections::HashSet::new();
    let mut last_toggle = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (room, t, g) in gens {
        let room_id = format!("room-{room}");
        let at = T0 + t;
        let ev = match g {
            Gen::Comment { user } => SimEvent::Comment(Comment {
                schema_version: 1,
                room_id,
                user_id: format!("u{user}"),
                event_time_ms: at,
                text: "好 nice".into(),
                comment_id: String::new(),
            }),
            Gen::Action { user, kind, value } => {
                let kind = [
                    ActionKind::Impression,
                    ActionKind::WatchProgress,
                    ActionKind::Like,
                    ActionKind::Share,
                    ActionKind::Follow,
                    ActionKind::Gift,
                ][kind as usize];
                SimEvent::Action(ViewerAction {
                    schema_version: 1,
                    room_id,
                    user_id: format!("u{user}"),
                    event_time_ms: at,
                    kind: kind as i32,
                    watch_ms: u32::from(value),
                    gift_value: u64::from(value),
                    ..Default::default()
                })
            }
            Gen::Toggle { user } => {
                let key = (room, user);
                if last_toggle.get(&key) == Some(&at) {
                    continue;
                }
                last_toggle.insert(key, at);
                let kind = if inside.insert(key) {
                    ActionKind::Enter
                } else {
                    inside.remove(&key);
                    ActionKind::Leave
                };
                SimEvent::Action(ViewerAction {
                    schema_version: 1,
                    room_id,
                    user_id: format!("u{user}"),
                    event_time_ms: at,
                    kind: kind as i32,
                    ..Default::default()
                })
            }
            Gen::Audio {
                frames,
                stereo,
                rate_8k,
                amp,
            } => {
                let ch = if stereo { 2 } else { 1 };
                let payload: Vec<u8> = (0..usize::from(frames) * ch)
                    .map(|i| {
                        (((i * 7919) % 2001) as i32 - 1000).saturating_mul(i32::from(amp)) / 1000
                    })
                    .flat_map(|v| (v.clamp(-32768, 32767) as i16).to_le_bytes())
                    .collect();
                SimEvent::Audio(AudioChunk {
                    schema_version: 1,
                    room_id,
                    start_time_ms: at,
                    sample_rate: if rate_8k { 8000 } else { 16000 },
                    channels: ch as u32,
                    format: AudioFormat::PcmS16le as i32,
                    payload,
                    ..Default::default()
                })
            }
            Gen::Video => SimEvent::Video(VideoSegment {
                schema_version: 1,
                room_id,
                start_time_ms: at,
                duration_ms: 2000,
                format: VideoFormat::MpegTs as i32,
                payload: vec![0x47; 188],
                ..Default::default()
            }),
        };
        out.push((room, ev));
    }
    out
}

fn run_engine(arrivals: &[SimEvent], until_ms: i64, lateness_ms: i64) -> ConsoleSink {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sink = Arc::new(ConsoleSink::new());
    let mut config = PipelineConfig::default();
    config.runtime.allowed_lateness_ms = lateness_ms;
    config.runtime.queue_capacity = 64;
    let task_sink = sink.clone();
    rt.block_on(async move {
        let handle = PartitionTask::spawn(PartitionSpec {
            kinds: &InputKind::ROOM,
            partition: 0,
            runtime: config.runtime.clone(),
            limits: Limits::default(),
            dead_letters: DeadLetterConfig::default(),
            operators: onair::operators::build(&config, &Default::default()).expect("operators"),
            sink: task_sink,
            reader: None,
            wait_for_backlog: false,
            replayed_through: None,
            marks: None,
            media: None,
            checkpoint_every: Duration::from_millis(100),
            changelog: None,
            snapshot_every: None,
            progress: None,
        });
        let mut offsets = [0i64; 4];
        for ev in arrivals {
            let (kind, payload) = onair::sources::simulator::to_record(ev);
            let offset = offsets[kind.index()];
            offsets[kind.index()] += 1;
            let rec = InputRecord {
                kind,
                topic: Arc::from(kind.name()),
                offset,
                key: Some(ev.room_id().as_bytes().to_vec()),
                payload: Some(payload),
                content_type: None,
            };
            handle
                .input
                .send(Input::Record(rec))
                .await
                .expect("task alive");
        }
        handle
            .control
            .send(Control::Finish { until_ms })
            .expect("task alive");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        handle
            .control
            .send(Control::Drain { reply: tx })
            .expect("task alive");
        let _ = handle.join.await;
        rx.try_recv().expect("drained with a checkpoint");
    });
    Arc::try_unwrap(sink).unwrap_or_else(|_| panic!("sink still shared"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Records arriving out of order by less than the allowed lateness give
    /// exactly the ticks of the independent truth.
    #[test]
    fn out_of_order_within_lateness_equals_truth(
        gens in prop::collection::vec(gen_event(), 1..120),
        jitter in prop::collection::vec(0i64..900, 120),
    ) {
        let events = materialise(gens);
        let mut truth = GroundTruth::new(1000);
        for r in 0..ROOMS {
            truth.add_room(&format!("room-{r}"), "", &[]);
        }
        for (room, ev) in &events {
            truth.record(*room, ev);
        }
        let end = T0 + 8000 + 3000;
        truth.close_until(end);
        // Arrival order: event time plus a jitter below the lateness, but
        // each room's ENTER/LEAVE keep their order within a stream as Kafka does.
        let mut arrivals: Vec<(i64, usize, SimEvent)> = events
            .iter()
            .enumerate()
            .map(|(i, (_, ev))| (ev.event_time_ms() + jitter[i % jitter.len()], i, ev.clone()))
            .collect();
        arrivals.sort_by_key(|(t, i, _)| (*t, *i));
        let arrivals: Vec<SimEvent> = arrivals.into_iter().map(|(_, _, e)| e).collect();
        let sink = run_engine(&arrivals, end, 1000);
        let cmp = truth.compare(&sink.stats());
        prop_assert!(cmp.is_exact(), "{cmp}: missing {:?} extra {:?} different {:?}", cmp.missing, cmp.extra, cmp.different.first());
    }

    /// The decoder returns an error, never panics, whatever the bytes and header.
    #[test]
    fn decoder_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        kind in 0usize..5,
        ct in prop_oneof![Just(None), Just(Some("application/json".to_string())), Just(Some("application/x-protobuf".to_string())), "[ -~]{0,20}".prop_map(Some)],
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
    ) {
        let kind = [InputKind::Video, InputKind::Audio, InputKind::Comments, InputKind::Actions, InputKind::ShortVideoActions][kind];
        let _ = decode_input(kind, key.as_deref(), Some(&bytes), ct.as_deref(), &Limits::default());
    }

    /// Valid records with fields mutated at random still decode or fail cleanly.
    #[test]
    fn mutated_records_fail_cleanly(flip in prop::collection::vec((0usize..64, any::<u8>()), 1..6), text in ".{0,40}") {
        let c = Comment { schema_version: 1, room_id: "room-1".into(), user_id: "u".into(), event_time_ms: T0, text, comment_id: String::new() };
        let mut bytes = c.encode_to_vec();
        for (i, b) in flip {
            let n = bytes.len();
            bytes[i % n] ^= b;
        }
        let _ = decode_input(InputKind::Comments, Some(b"room-1"), Some(&bytes), None, &Limits::default());
        let json = serde_json::to_vec(&c).expect("json");
        let _ = decode_input(InputKind::Comments, None, Some(&json), Some("application/json"), &Limits::default());
    }
}
