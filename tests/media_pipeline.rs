//! Media through the broker: the simulator's rooms with real H.264 video and
//! PCM audio are decoded by the engine, a room that changes resolution and
//! codec mid-stream (and sends fragmented MP4 behind its init segment and
//! single JPEG frames) decodes without a hitch, and every kind of hostile
//! media payload, delivered in the middle of that traffic, ends in the
//! dead-letter topic with its reason while the good traffic stays complete.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::BufReader;
use std::time::Duration;

use common::media::{aac_tone, ffmpeg, fmp4_segments, read, ts_clip};
use common::{read_until, Proc, Topics};
use onair::schema::{AudioChunk, AudioFormat, DeadLetter, RoomStats, VideoFormat, VideoSegment};
use onair::simulator::GroundTruth;
use prost::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// A media record to produce, and the dead-letter reason it must get (None:
/// it must decode).
struct Media {
    topic: &'static str,
    room: &'static str,
    payload: Vec<u8>,
    reason: Option<&'static str>,
}

fn video(room: &str, t: i64, duration_ms: u32, format: VideoFormat, payload: Vec<u8>) -> Vec<u8> {
    VideoSegment {
        schema_version: 1,
        room_id: room.into(),
        streamer_id: format!("streamer-{room}"),
        sequence: 0,
        start_time_ms: t,
        duration_ms,
        format: format as i32,
        payload,
    }
    .encode_to_vec()
}

fn audio(room: &str, t: i64, format: AudioFormat, payload: Vec<u8>) -> Vec<u8> {
    AudioChunk {
        schema_version: 1,
        room_id: room.into(),
        streamer_id: format!("streamer-{room}"),
        sequence: 0,
        start_time_ms: t,
        sample_rate: 16_000,
        channels: 1,
        format: format as i32,
        payload,
    }
    .encode_to_vec()
}

/// Good media for an extra room, and hostile media for the simulated rooms.
fn media(dir: &std::path::Path, t: i64) -> Vec<Media> {
    let ts = ts_clip(dir, "a.ts", "libx264", "320x240", 10, 2, false);
    let big = ts_clip(dir, "big.ts", "libx264", "640x480", 5, 2, false);
    let small_hevc = ts_clip(dir, "b.ts", "libx265", "176x144", 10, 2, false);
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=176x144",
            "-frames:v",
            "1",
            "a.jpg",
        ],
    );
    let jpg = read(dir, "a.jpg");
    let (init, seg) = fmp4_segments(dir);
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=10:duration=2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            "late.mp4",
        ],
    );
    let late = read(dir, "late.mp4");
    let aac = aac_tone(dir);
    let garbage: Vec<u8> = (0..188 * 40u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut jpeg_as_ts = jpg.clone();
    jpeg_as_ts.resize(jpg.len().div_ceil(188) * 188, 0);
    let half = ts.len() / 188 / 2 * 188;
    use VideoFormat as F;
    let bad = |topic, room, payload, reason| Media {
        topic,
        room,
        payload,
        reason: Some(reason),
    };
    let good = |topic, payload| Media {
        topic,
        room: "room-media",
        payload,
        reason: None,
    };
    let good_in = |room, payload| Media {
        topic: "video",
        room,
        payload,
        reason: None,
    };
    let r = "room-media";
    let mut late_as_ts = late.clone();
    late_as_ts.resize(late.len().div_ceil(188) * 188, 0);
    // The progressive MP4 without its index (the moov is at the end).
    let indexless = late[..late.len() * 3 / 4].to_vec();
    vec![
        // A room whose stream changes size and codec, in every container.
        good("video", video(r, t, 2000, F::MpegTs, ts.clone())),
        good("video", video(r, t + 2000, 2000, F::MpegTs, small_hevc)),
        good("video", video(r, t + 4000, 0, F::Jpeg, jpg.clone())),
        good("video", video(r, t + 4500, 0, F::Fmp4Init, init.clone())),
        good(
            "video",
            video(r, t + 5000, 2000, F::Fmp4Segment, seg.clone()),
        ),
        good("audio", audio(r, t, AudioFormat::AacAdts, aac)),
        // Hostile payloads in the simulated rooms.
        bad(
            "video",
            "room-0000",
            video(
                "room-0000",
                t,
                2000,
                F::MpegTs,
                ts[..ts.len() - 100].to_vec(),
            ),
            "media_truncated",
        ),
        bad(
            "video",
            "room-0001",
            video("room-0001", t, 2000, F::MpegTs, ts[..half].to_vec()),
            "media_truncated",
        ),
        bad(
            "video",
            "room-0002",
            video("room-0002", t, 2000, F::MpegTs, garbage.clone()),
            "media_corrupt",
        ),
        bad(
            "video",
            "room-0003",
            video("room-0003", t, 2000, F::MpegTs, jpeg_as_ts),
            "media_corrupt",
        ),
        bad(
            "video",
            "room-0000",
            video("room-0000", t, 0, F::Jpeg, ts.clone()),
            "media_corrupt",
        ),
        bad(
            "video",
            "room-0001",
            video("room-0001", t, 2000, F::Fmp4Segment, seg),
            "media_missing_init",
        ),
        bad(
            "video",
            "room-0002",
            video("room-0002", t, 2000, F::MpegTs, big),
            "media_geometry",
        ),
        bad(
            "video",
            "room-0003",
            video("room-0003", t, 60_000, F::MpegTs, ts),
            "media_too_large",
        ),
        bad(
            "video",
            "room-0000",
            video("room-0000", t, 2000, F::MpegTs, late_as_ts),
            "media_corrupt",
        ),
        bad(
            "video",
            "room-0001",
            video("room-0001", t, 2000, F::MpegTs, Vec::new()),
            "schema",
        ),
        bad(
            "audio",
            "room-0002",
            audio("room-0002", t, AudioFormat::AacAdts, garbage),
            "media_corrupt",
        ),
        bad(
            "audio",
            "room-0003",
            audio("room-0003", t, AudioFormat::AacAdts, jpg),
            "media_corrupt",
        ),
        // An MP4 whose index never came, behind a valid init of its room.
        good_in(
            "room-media2",
            video("room-media2", t + 100, 0, F::Fmp4Init, init),
        ),
        bad(
            "video",
            "room-media2",
            video("room-media2", t + 200, 2000, F::Fmp4Segment, indexless),
            "media_corrupt",
        ),
    ]
}

#[test]
fn media_decodes_and_hostile_payloads_are_dead_lettered() {
    let dir = common::scratch("media");
    let topics = Topics {
        prefix: common::unique("media"),
    };
    let pipeline = common::pipeline(&dir, &topics, "[media.video]\nmax_source_pixels = 100000\n");
    common::create_topics(&pipeline);
    let truth_path = dir.join("truth.jsonl");
    let t = truth_path.to_str().expect("utf-8 path");
    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    // One start for the simulator and the media made here: the default
    // (now, to the minute) could differ between the two.
    let start = onair::simulator::default_start_ms();
    let start_arg = start.to_string();
    let sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "4",
            "--duration",
            "20s",
            "--speed",
            "3",
            "--seed",
            "5",
            "--fps",
            "4",
            "--truth",
            t,
            "--start-ms",
            &start_arg,
        ],
    );
    // In the middle of the live traffic.
    std::thread::sleep(Duration::from_secs(3));
    let all = media(&dir, start + 6000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("message.max.bytes", "10000000")
        .create()
        .expect("producer");
    let mut origin = BTreeMap::new();
    for (i, m) in all.iter().enumerate() {
        let topic = topics.name(m.topic);
        let d = rt
            .block_on(producer.send(
                FutureRecord::to(&topic).key(m.room).payload(&m.payload),
                Duration::from_secs(10),
            ))
            .unwrap_or_else(|(e, _)| panic!("produce media {i}: {e}"));
        origin.insert((topic, d.partition, d.offset), i);
    }
    let mut sim = sim;
    assert!(
        sim.wait(Duration::from_secs(180)).success(),
        "{}",
        sim.log_tail()
    );
    let expected_dead = all.iter().filter(|m| m.reason.is_some()).count();
    let dead = read_until(
        &topics.name("dead-letters"),
        Duration::from_secs(120),
        |r| r.len() >= expected_dead,
    );
    let truth = GroundTruth::read_jsonl(BufReader::new(
        std::fs::File::open(&truth_path).expect("truth"),
    ))
    .expect("truth parses");
    let expected: HashSet<(String, i64)> = truth.tick_map().keys().cloned().collect();
    let stats = read_until(
        &topics.name("room-stats"),
        Duration::from_secs(120),
        |recs| {
            let got: HashSet<(String, i64)> = recs
                .iter()
                .filter_map(|r| RoomStats::decode(&r.payload[..]).ok())
                .map(|s| (s.room_id, s.tick_start_ms))
                .collect();
            expected.is_subset(&got)
        },
    );
    let metrics = engine.scrape().expect("/metrics answers");
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit {status}\n{}",
        engine.log_tail()
    );

    // Each hostile payload once, with its reason and its bytes.
    for r in &dead {
        let key = (
            r.headers["onair-source-topic"].clone(),
            r.headers["onair-source-partition"]
                .parse::<i32>()
                .expect("partition"),
            r.headers["onair-source-offset"]
                .parse::<i64>()
                .expect("offset"),
        );
        let i = origin.get(&key).unwrap_or_else(|| {
            panic!(
                "dead letter for a record we did not send: {key:?} {:?}",
                r.headers
            )
        });
        let m = &all[*i];
        let dl = DeadLetter::decode(&r.payload[..]).expect("dead letter decodes");
        assert_eq!(
            Some(dl.reason.as_str()),
            m.reason,
            "media {i}: {}",
            dl.detail
        );
        assert_eq!(dl.payload, m.payload, "media {i}: the record's bytes kept");
        assert_eq!(r.key, m.room.as_bytes());
    }
    assert_eq!(
        dead.len(),
        expected_dead,
        "one dead letter per hostile payload"
    );

    // The decoder worked on the good video: the simulated rooms' segments
    // and the changing room's.
    let m = |name: &str, labels: &[(&str, &str)]| common::metric(&metrics, name, labels);
    let ok_video = m(
        "onair_media_decoded_total",
        &[("kind", "video"), ("result", "ok")],
    )
    .unwrap_or(0.0);
    assert!(
        ok_video >= 4.0 * 9.0 + 4.0,
        "video payloads decoded: {ok_video}\n{metrics}"
    );
    assert!(m(
        "onair_media_frames_sampled_total",
        &[("purpose", "timeline")]
    )
    .is_some_and(|v| v > 60.0));
    assert!(m(
        "onair_media_frames_sampled_total",
        &[("purpose", "segment")]
    )
    .is_some_and(|v| v > 90.0));
    assert!(m("onair_media_audio_milliseconds_total", &[]).is_some_and(|v| v > 60_000.0));

    // The good traffic around them: every tick of the simulated rooms equal
    // to the truth.
    let mut got = BTreeMap::new();
    for r in &stats {
        let s = RoomStats::decode(&r.payload[..]).expect("room-stats decodes");
        if !s.room_id.starts_with("room-media") {
            got.insert((s.room_id.clone(), s.tick_start_ms), s);
        }
    }
    let cmp = truth.compare(&got);
    assert!(
        cmp.is_exact(),
        "{cmp}: missing {:?} extra {:?} different {:?}",
        cmp.missing.iter().take(3).collect::<Vec<_>>(),
        cmp.extra.iter().take(3).collect::<Vec<_>>(),
        cmp.different.first()
    );
}
