//! A room's recent features in event time, bounded in memory: the last
//! `window_ticks` ticks (the look-back window highlight detection reads) and
//! the last `segments` video segments as sets of frame, comment and
//! transcript embeddings (what MMBee's per-segment fusion reads).
//!
//! Transcripts arrive seconds after the picture (speech recognition runs
//! behind), so they are placed by their event time into the ticks and
//! segments they overlap, even ticks already closed.
//!
//! Not for: computing embeddings (the encoders) or writing anything.

use std::collections::VecDeque;
use std::sync::Arc;

use super::audio::AudioSummary;

/// One tick of one room.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TickFeatures {
    /// Tick start (event time, ms).
    pub start_ms: i64,
    /// Mean image embedding of the tick's timeline frames.
    pub image: Option<Vec<f32>>,
    /// Frames that went into it.
    pub frames: u32,
    /// Mean text embedding of the tick's comments.
    pub comments_mean: Option<Vec<f32>>,
    /// Comments in the tick (embedded or not).
    pub comments: u32,
    /// Mean text embedding of the speech overlapping the tick.
    pub speech: Option<Vec<f32>>,
    /// Transcripts that went into it.
    pub transcripts: u32,
    /// The tick's audio.
    pub audio: Option<AudioSummary>,
    /// Share of the tick's audio judged speech.
    pub speech_ratio: Option<f32>,
    /// `name@version` of the image and text models that made the embeddings.
    pub image_model: Option<Arc<str>>,
    /// See `image_model`.
    pub text_model: Option<Arc<str>>,
}

/// One video segment's inputs for per-segment fusion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentSet {
    /// Segment start and end (event time, ms).
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// Embeddings of the frames spread over the segment, in time order.
    pub frames: Vec<(i64, Vec<f32>)>,
    /// Embeddings of the comments made during the segment.
    pub comments: Vec<(i64, Vec<f32>)>,
    /// Embeddings of the speech overlapping the segment, by start time.
    pub transcripts: Vec<(i64, Vec<f32>)>,
}

/// Most comment embeddings one segment keeps (the rest are counted in ticks).
pub const SEGMENT_COMMENTS: usize = 64;

/// A room's window.
#[derive(Clone, Debug)]
pub struct RoomWindow {
    ticks: VecDeque<TickFeatures>,
    segments: VecDeque<SegmentSet>,
    max_ticks: usize,
    max_segments: usize,
}

/// Adds `v` into the running mean `mean` of `n` vectors (then n + 1).
pub fn mean_in(mean: &mut Option<Vec<f32>>, n: u32, v: &[f32]) {
    match mean {
        Some(m) if m.len() == v.len() => {
            let k = n as f32 + 1.0;
            for (a, b) in m.iter_mut().zip(v) {
                *a += (b - *a) / k;
            }
        }
        _ => *mean = Some(v.to_vec()),
    }
}

impl RoomWindow {
    /// An empty window keeping `max_ticks` ticks and `max_segments` segments.
    pub fn new(max_ticks: usize, max_segments: usize) -> Self {
        RoomWindow {
            ticks: VecDeque::new(),
            segments: VecDeque::new(),
            max_ticks: max_ticks.max(1),
            max_segments: max_segments.max(1),
        }
    }

    /// Appends a closed tick. Ticks come in increasing start order; one at or
    /// before the newest is ignored (returns false). Ticks older than
    /// `max_ticks` ticks before it fall out, as do gaps' worth of ticks.
    pub fn push_tick(&mut self, tick: TickFeatures, tick_ms: i64) -> bool {
        if self
            .ticks
            .back()
            .is_some_and(|t| t.start_ms >= tick.start_ms)
        {
            return false;
        }
        let oldest = tick.start_ms - (self.max_ticks as i64 - 1) * tick_ms.max(1);
        self.ticks.push_back(tick);
        while self
            .ticks
            .front()
            .is_some_and(|t| t.start_ms < oldest || self.ticks.len() > self.max_ticks)
        {
            self.ticks.pop_front();
        }
        true
    }

    /// The segment starting at `start_ms` (created, in order, if new; None
    /// when older than every kept segment).
    pub fn segment(&mut self, start_ms: i64, end_ms: i64) -> Option<&mut SegmentSet> {
        let i = self.segments.partition_point(|s| s.start_ms < start_ms);
        let exists = self.segments.get(i).is_some_and(|s| s.start_ms == start_ms);
        if !exists {
            if i == 0 && self.segments.len() >= self.max_segments {
                return None;
            }
            self.segments.insert(
                i,
                SegmentSet {
                    start_ms,
                    end_ms,
                    ..SegmentSet::default()
                },
            );
            while self.segments.len() > self.max_segments {
                self.segments.pop_front();
            }
        }
        let i = self.segments.partition_point(|s| s.start_ms < start_ms);
        self.segments.get_mut(i)
    }

    /// Adds a comment embedding at event time `t` to the segment holding it.
    pub fn add_comment(&mut self, t: i64, embedding: &[f32]) {
        if let Some(s) = self
            .segments
            .iter_mut()
            .rev()
            .find(|s| s.start_ms <= t && t < s.end_ms)
        {
            if s.comments.len() < SEGMENT_COMMENTS {
                s.comments.push((t, embedding.to_vec()));
            }
        }
    }

    /// Places a transcript spanning `[start_ms, end_ms]` into every kept
    /// tick and segment it overlaps.
    pub fn add_transcript(&mut self, start_ms: i64, end_ms: i64, tick_ms: i64, e: &[f32]) {
        for t in &mut self.ticks {
            if t.start_ms <= end_ms && start_ms < t.start_ms + tick_ms {
                mean_in(&mut t.speech, t.transcripts, e);
                t.transcripts += 1;
            }
        }
        for s in &mut self.segments {
            if s.start_ms <= end_ms && start_ms < s.end_ms {
                s.transcripts.push((start_ms, e.to_vec()));
            }
        }
    }

    /// The kept ticks, oldest first.
    pub fn ticks(&self) -> &VecDeque<TickFeatures> {
        &self.ticks
    }

    /// The kept segments, oldest first.
    pub fn segments(&self) -> &VecDeque<SegmentSet> {
        &self.segments
    }

    /// Approximate bytes of embeddings held.
    pub fn bytes(&self) -> usize {
        let v = |o: &Option<Vec<f32>>| o.as_ref().map_or(0, Vec::len);
        let ticks: usize = self
            .ticks
            .iter()
            .map(|t| v(&t.image) + v(&t.comments_mean) + v(&t.speech))
            .sum();
        let segs: usize = self
            .segments
            .iter()
            .map(|s| {
                [&s.frames, &s.comments, &s.transcripts]
                    .iter()
                    .flat_map(|l| l.iter())
                    .map(|(_, e)| e.len())
                    .sum::<usize>()
            })
            .sum();
        (ticks + segs) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tick(start_ms: i64) -> TickFeatures {
        TickFeatures {
            start_ms,
            image: Some(vec![start_ms as f32; 4]),
            frames: 1,
            ..TickFeatures::default()
        }
    }

    proptest! {
        #[test]
        fn the_window_holds_exactly_the_ticks_within_its_span(
            steps in proptest::collection::vec(0i64..4, 1..200),
            max in 1usize..40,
        ) {
            let tick_ms = 1000;
            let mut w = RoomWindow::new(max, 2);
            let mut t = 0;
            let mut pushed = Vec::new();
            for s in steps {
                // 0 repeats the last tick (ignored); larger steps leave gaps.
                t += s * tick_ms;
                if w.push_tick(tick(t), tick_ms) {
                    pushed.push(t);
                }
                let newest = *pushed.last().unwrap();
                let expect: Vec<i64> = pushed
                    .iter()
                    .copied()
                    .filter(|&p| p > newest - max as i64 * tick_ms)
                    .collect();
                let got: Vec<i64> = w.ticks().iter().map(|t| t.start_ms).collect();
                prop_assert_eq!(got, expect);
                prop_assert!(w.ticks().len() <= max);
            }
        }

        #[test]
        fn segments_stay_sorted_and_bounded(
            starts in proptest::collection::vec(0i64..50, 1..100),
            max in 1usize..8,
        ) {
            let mut w = RoomWindow::new(4, max);
            for s in starts {
                let start = s * 2000;
                if let Some(seg) = w.segment(start, start + 2000) {
                    prop_assert_eq!(seg.start_ms, start);
                }
                let got: Vec<i64> = w.segments().iter().map(|s| s.start_ms).collect();
                prop_assert!(got.windows(2).all(|p| p[0] < p[1]));
                prop_assert!(got.len() <= max);
            }
        }
    }

    #[test]
    fn late_transcripts_land_in_the_ticks_and_segments_they_overlap() {
        let mut w = RoomWindow::new(8, 4);
        for t in 0..6 {
            w.push_tick(tick(t * 1000), 1000);
        }
        w.segment(0, 2000);
        w.segment(2000, 4000);
        w.segment(4000, 6000);
        w.add_transcript(1500, 3200, 1000, &[1.0, 0.0]);
        w.add_transcript(3000, 3100, 1000, &[0.0, 1.0]);
        let counts: Vec<u32> = w.ticks().iter().map(|t| t.transcripts).collect();
        assert_eq!(counts, [0, 1, 1, 2, 0, 0]);
        assert_eq!(w.ticks()[3].speech.as_deref(), Some(&[0.5, 0.5][..]));
        let segs: Vec<usize> = w.segments().iter().map(|s| s.transcripts.len()).collect();
        assert_eq!(segs, [1, 2, 0]);
        w.add_comment(2500, &[1.0, 1.0]);
        w.add_comment(9000, &[1.0, 1.0]);
        assert_eq!(w.segments()[1].comments.len(), 1);
        assert!(w.bytes() > 0);
    }

    #[test]
    fn the_running_mean_is_the_mean() {
        let mut m = None;
        for (n, v) in [[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]].iter().enumerate() {
            mean_in(&mut m, n as u32, v);
        }
        let m = m.unwrap();
        assert!((m[0] - 3.0).abs() < 1e-6 && (m[1] - 2.0).abs() < 1e-6);
    }
}
