//! Dead letters: turning a rejected input into a record on the dead-letter
//! topic (reason, source topic, partition and offset in the record and in its
//! headers, the original bytes untouched), under a per-partition rate limit
//! so that a bad deploy upstream cannot pour everything there.
//!
//! Not for: outputs that failed to be written (those are sink errors).

use std::time::Instant;

use metrics::counter;
use prost::Message;

use crate::config::DeadLetterConfig;
use crate::metrics::DEAD_LETTERS;
use crate::runtime::{Holds, Output, OutputTopic, Position};
use crate::schema::InputKind;
use crate::schema::{deterministic_id, DeadLetter, SCHEMA_VERSION};

/// Header names on dead-letter records.
pub mod headers {
    /// Machine-readable reason.
    pub const REASON: &str = "onair-dlq-reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "onair-dlq-detail";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "onair-source-topic";
    /// Source partition.
    pub const SOURCE_PARTITION: &str = "onair-source-partition";
    /// Source offset.
    pub const SOURCE_OFFSET: &str = "onair-source-offset";
}

/// What is known of the rejected record.
pub struct Rejected<'a> {
    /// Why it was rejected (`malformed`, `schema`, `oversized`, `content_type`).
    pub reason: &'static str,
    /// Details for a human.
    pub detail: String,
    /// Which input stream it came from.
    pub kind: InputKind,
    /// Where it came from.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<&'a [u8]>,
    /// Its bytes.
    pub payload: Option<&'a [u8]>,
    /// Its `content-type` header.
    pub content_type: Option<&'a str>,
}

/// Builds the dead-letter output for a rejected record.
pub fn dead_letter(r: &Rejected<'_>) -> Output {
    let id = deterministic_id(&[
        b"dead-letter",
        r.topic.as_bytes(),
        &r.partition.to_le_bytes(),
        &r.offset.to_le_bytes(),
    ]);
    let record = DeadLetter {
        schema_version: SCHEMA_VERSION,
        id: id.clone(),
        reason: r.reason.to_string(),
        detail: r.detail.clone(),
        source_topic: r.topic.to_string(),
        source_partition: r.partition,
        source_offset: r.offset,
        key: r.key.unwrap_or_default().to_vec(),
        payload: r.payload.unwrap_or_default().to_vec(),
        content_type: r.content_type.unwrap_or_default().to_string(),
    };
    let mut detail = r.detail.clone();
    detail.truncate(detail.floor_char_boundary(512));
    Output {
        topic: OutputTopic::DeadLetters,
        key: r.key.unwrap_or_default().to_vec(),
        id,
        payload: record.encode_to_vec(),
        headers: vec![
            (headers::REASON.into(), r.reason.as_bytes().to_vec()),
            (headers::DETAIL.into(), detail.into_bytes()),
            (headers::SOURCE_TOPIC.into(), r.topic.as_bytes().to_vec()),
            (
                headers::SOURCE_PARTITION.into(),
                r.partition.to_string().into_bytes(),
            ),
            (
                headers::SOURCE_OFFSET.into(),
                r.offset.to_string().into_bytes(),
            ),
        ],
        model_version: None,
        tick_end_ms: None,
        depends_on: {
            let mut h = Holds::default();
            h.hold(Position {
                kind: r.kind,
                offset: r.offset,
            });
            h
        },
    }
}

/// A token bucket: `rate_per_sec` on average, `burst` at once.
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(config: &DeadLetterConfig) -> Self {
        RateLimit {
            rate: config.rate_per_sec,
            burst: f64::from(config.burst.max(1)),
            tokens: f64::from(config.burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token if one is left.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts a dead letter that was written.
pub fn count(reason: &'static str, topic: &str) {
    counter!(DEAD_LETTERS, "reason" => reason, "topic" => topic.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_limits_bursts_and_refills() {
        let mut rl = RateLimit::new(&DeadLetterConfig {
            rate_per_sec: 10.0,
            burst: 3,
        });
        let t = Instant::now();
        assert!((0..3).all(|_| rl.allow(t)));
        assert!(!rl.allow(t));
        assert!(rl.allow(t + Duration::from_millis(150)));
        assert!(!rl.allow(t + Duration::from_millis(160)));
    }

    #[test]
    fn dead_letter_carries_everything() {
        let out = dead_letter(&Rejected {
            reason: "malformed",
            detail: "bad".into(),
            kind: InputKind::Comments,
            topic: "comments",
            partition: 2,
            offset: 42,
            key: Some(b"room-1"),
            payload: Some(b"\xff\xfe"),
            content_type: Some("application/json"),
        });
        let dl = DeadLetter::decode(&out.payload[..]).unwrap();
        assert_eq!(
            (dl.reason.as_str(), dl.source_partition, dl.source_offset),
            ("malformed", 2, 42)
        );
        assert_eq!(dl.payload, b"\xff\xfe");
        assert_eq!(out.key, b"room-1");
        assert!(out
            .headers
            .iter()
            .any(|(k, v)| k == headers::SOURCE_OFFSET && v == b"42"));
    }
}
