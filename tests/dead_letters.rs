//! Poison messages of every kind end in the dead-letter topic with their
//! reason, source topic, partition and offset, byte for byte; the good
//! records around them are all processed (room stats equal the truth).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::BufReader;
use std::time::Duration;

use common::{read_until, Proc, Topics};
use onair::schema::{ActionKind, Comment, DeadLetter, RoomStats, ViewerAction};
use onair::simulator::GroundTruth;
use prost::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

struct Poison {
    topic: &'static str,
    key: &'static str,
    payload: Vec<u8>,
    content_type: Option<&'static str>,
    reason: &'static str,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn poisons() -> Vec<Poison> {
    let t = now_ms();
    let comment = |room: &str, user: &str, time: i64| Comment {
        schema_version: 1,
        room_id: room.into(),
        user_id: user.into(),
        event_time_ms: time,
        text: "hello".into(),
        comment_id: String::new(),
    };
    let big_action = ViewerAction {
        schema_version: 1,
        room_id: "room-0001".into(),
        user_id: "u".into(),
        event_time_ms: t,
        kind: ActionKind::Gift as i32,
        gift_id: "x".repeat(3000),
        ..Default::default()
    };
    vec![
        Poison {
            topic: "comments",
            key: "room-0001",
            payload: vec![0xff, 0xff, 0xff, 0x0f],
            content_type: None,
            reason: "malformed",
        },
        Poison {
            topic: "comments",
            key: "room-0002",
            payload: b"{\"room_id\": \"room-0002\", ".to_vec(),
            content_type: Some("application/json"),
            reason: "malformed",
        },
        Poison {
            topic: "comments",
            key: "room-0003",
            payload: b"hi there".to_vec(),
            content_type: Some("text/plain"),
            reason: "content_type",
        },
        Poison {
            topic: "actions",
            key: "room-0001",
            payload: big_action.encode_to_vec(),
            content_type: None,
            reason: "oversized",
        },
        Poison {
            topic: "actions",
            key: "room-0000",
            payload: format!(
                r#"{{"room_id":"room-0000","user_id":"u1","event_time_ms":{t},"kind":"dance"}}"#
            )
            .into_bytes(),
            content_type: Some("application/json"),
            reason: "malformed",
        },
        Poison {
            topic: "comments",
            key: "room-0002",
            payload: comment("room-0002", "", t).encode_to_vec(),
            content_type: None,
            reason: "schema",
        },
        Poison {
            topic: "video",
            key: "room-0003",
            payload: b"\x47garbage that is not a segment".to_vec(),
            content_type: None,
            reason: "malformed",
        },
        Poison {
            topic: "audio",
            key: "room-0000",
            payload: b"{}".to_vec(),
            content_type: Some("application/json"),
            reason: "content_type",
        },
        Poison {
            topic: "comments",
            key: "room-0001",
            payload: comment("room-0002", "u2", t).encode_to_vec(),
            content_type: None,
            reason: "schema",
        },
        Poison {
            topic: "actions",
            key: "room-0002",
            payload: format!(
                r#"{{"room_id":"room-0002","user_id":"u1","event_time_ms":{},"kind":"like"}}"#,
                t / 1000
            )
            .into_bytes(),
            content_type: Some("application/json"),
            reason: "schema",
        },
        // Time travel: ten years ahead would carry the partition's watermark
        // past every record after it.
        Poison {
            topic: "comments",
            key: "room-0003",
            payload: comment("room-0003", "u3", now_ms() + 10 * 365 * 86_400_000).encode_to_vec(),
            content_type: None,
            reason: "schema",
        },
    ]
}

/// Produces the poison messages and returns (topic, partition, offset, poison index).
fn produce(
    topics: &Topics,
    batch: &[Poison],
    first_index: usize,
) -> Vec<(String, i32, i64, usize)> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("producer");
    let mut out = Vec::new();
    for (i, p) in batch.iter().enumerate() {
        let topic = topics.name(p.topic);
        let mut rec = FutureRecord::to(&topic).key(p.key).payload(&p.payload);
        if let Some(ct) = p.content_type {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(ct),
            }));
        }
        let delivery = rt
            .block_on(producer.send(rec, Duration::from_secs(10)))
            .unwrap_or_else(|(e, _)| panic!("produce poison {i}: {e}"));
        out.push((topic, delivery.partition, delivery.offset, first_index + i));
    }
    out
}

#[test]
fn poison_goes_to_dead_letters_and_good_records_flow() {
    let dir = common::scratch("poison");
    let topics = Topics {
        prefix: common::unique("poison"),
    };
    let pipeline = common::pipeline(&dir, &topics, "[limits]\nmax_event_bytes = 2048\n");
    // Create the topics before producing: some brokers auto-create a topic
    // with one partition when a producer names it.
    let truth_path = dir.join("truth.jsonl");
    let t = truth_path.to_str().expect("utf-8 path");
    let all = poisons();
    let (before, after) = all.split_at(5);
    common::create_topics(&pipeline);
    let mut produced = produce(&topics, before, 0);
    let mut sim = Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "4",
            "--duration",
            "20s",
            "--speed",
            "0",
            "--seed",
            "3",
            "--fps",
            "0",
            "--json-every",
            "4",
            "--truth",
            t,
        ],
    );
    assert!(
        sim.wait(Duration::from_secs(120)).success(),
        "{}",
        sim.log_tail()
    );
    produced.extend(produce(&topics, after, 5));

    let mut engine = Proc::engine(&dir, &pipeline, "engine");
    let dead = read_until(&topics.name("dead-letters"), Duration::from_secs(90), |r| {
        r.len() >= all.len()
    });
    let truth = GroundTruth::read_jsonl(BufReader::new(
        std::fs::File::open(&truth_path).expect("truth"),
    ))
    .expect("truth parses");
    let expected: HashSet<(String, i64)> = truth.tick_map().keys().cloned().collect();
    let stats = read_until(
        &topics.name("room-stats"),
        Duration::from_secs(90),
        |recs| {
            let got: HashSet<(String, i64)> = recs
                .iter()
                .filter_map(|r| RoomStats::decode(&r.payload[..]).ok())
                .map(|s| (s.room_id, s.tick_start_ms))
                .collect();
            expected.is_subset(&got)
        },
    );
    // The real /metrics endpoint shows what happened.
    let metrics = engine.scrape().expect("/metrics answers");
    let m = |name: &str, labels: &[(&str, &str)]| common::metric(&metrics, name, labels);
    assert_eq!(
        m("onair_dead_letters_total", &[]),
        Some(all.len() as f64),
        "dead letters counted"
    );
    assert_eq!(
        m("onair_dead_letters_total", &[("reason", "schema")]),
        Some(all.iter().filter(|p| p.reason == "schema").count() as f64)
    );
    assert!(m("onair_stage_errors_total", &[("stage", "decode")]) >= Some(all.len() as f64));
    for stage in [
        "source",
        "decode",
        "runtime",
        "room_activity",
        "sink",
        "dead_letters",
    ] {
        assert!(
            m("onair_stage_received_total", &[("stage", stage)]).is_some_and(|v| v > 0.0),
            "{stage} received
{metrics}"
        );
        assert!(
            m("onair_stage_sent_total", &[("stage", stage)]).is_some(),
            "{stage} sent"
        );
    }
    for stage in ["decode", "runtime", "room_activity"] {
        assert!(
            m("onair_stage_latency_seconds_count", &[("stage", stage)]).is_some_and(|v| v > 0.0),
            "{stage} latency"
        );
    }
    for name in [
        "onair_consumer_lag",
        "onair_queue_depth",
        "onair_partitions_paused",
        "onair_partitions_assigned",
        "onair_offset_commits_total",
    ] {
        assert!(m(name, &[]).is_some(), "{name} exported\n{metrics}");
    }
    engine.signal_term();
    let status = engine.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "engine exit {status}\n{}",
        engine.log_tail()
    );

    // Every poison is there once, with its reason and origin, byte for byte.
    assert_eq!(dead.len(), all.len(), "one dead letter per poison message");
    let by_origin: BTreeMap<(String, i32, i64), &common::Rec> = dead
        .iter()
        .map(|r| {
            let h = &r.headers;
            let origin = (
                h["onair-source-topic"].clone(),
                h["onair-source-partition"]
                    .parse()
                    .expect("partition header"),
                h["onair-source-offset"].parse().expect("offset header"),
            );
            (origin, r)
        })
        .collect();
    for (topic, partition, offset, i) in &produced {
        let p = &all[*i];
        let rec = by_origin
            .get(&(topic.clone(), *partition, *offset))
            .unwrap_or_else(|| {
                panic!("no dead letter for poison {i} at {topic}/{partition}@{offset}")
            });
        assert_eq!(rec.headers["onair-dlq-reason"], p.reason, "poison {i}");
        let dl = DeadLetter::decode(&rec.payload[..]).expect("dead letter decodes");
        assert_eq!(dl.reason, p.reason, "poison {i}: {}", dl.detail);
        assert_eq!(dl.payload, p.payload, "poison {i}: original bytes kept");
        assert_eq!(dl.key, p.key.as_bytes());
        assert_eq!(
            (
                dl.source_topic.as_str(),
                dl.source_partition,
                dl.source_offset
            ),
            (topic.as_str(), *partition, *offset)
        );
        assert_eq!(dl.content_type, p.content_type.unwrap_or_default());
        assert!(!dl.detail.is_empty());
        assert_eq!(rec.key, p.key.as_bytes(), "keyed like the source");
    }

    // The good records around them: every tick equal to the truth.
    let mut got = BTreeMap::new();
    for r in &stats {
        let s = RoomStats::decode(&r.payload[..]).expect("room-stats decodes");
        got.insert((s.room_id.clone(), s.tick_start_ms), s);
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
