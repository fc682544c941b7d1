//! The media stage of a partition task: each video and audio record is
//! handed to the shared decode pool as soon as it is read, and rejoins the
//! event-time merge when its decode is done, so decoding overlaps with the
//! merge and with other rooms' decodes while operators still see records in
//! order. A room's fragmented-MP4 init segment is kept for its media
//! segments, and its timeline sampling (frames per second of event time)
//! continues from one segment to the next.
//!
//! Not for: decoding itself (see `decode`) or what models do with frames.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use foldhash::fast::RandomState;
use metrics::{counter, gauge, histogram, Gauge};
use tokio::sync::{oneshot, Notify};

use crate::config::MediaConfig;
use crate::decode::pool::DecodePool;
use crate::decode::video::{decode_video, purpose, Timeline, VideoInput};
use crate::decode::{audio, DecodedMedia, MediaError};
use crate::metrics as m;
use crate::schema::{AudioFormat, Event, InputKind, VideoFormat};

/// A failed decode, with the payload taken from the record (to dead-letter it).
pub(crate) type Failure = (MediaError, Option<Vec<u8>>);

/// One payload's decode, run on the pool.
type DecodeJob = Box<dyn FnOnce(&MediaConfig) -> Result<DecodedMedia, Failure> + Send>;

/// Where a buffered record's media stands.
pub(crate) enum Slot {
    /// Not a media record, or media decoding is off.
    None,
    /// Being decoded.
    Pending(oneshot::Receiver<Result<DecodedMedia, Failure>>),
    /// Decoded (or failed).
    Done(Result<DecodedMedia, Failure>),
}

impl Slot {
    /// Takes a finished decode's result if there is one; true when the
    /// record may go on (no media, or decode finished).
    pub(crate) fn poll(&mut self) -> bool {
        let Slot::Pending(rx) = self else {
            return true;
        };
        match rx.try_recv() {
            Ok(r) => {
                *self = Slot::Done(r);
                true
            }
            Err(oneshot::error::TryRecvError::Empty) => false,
            Err(oneshot::error::TryRecvError::Closed) => {
                *self = Slot::Done(Err((
                    MediaError::Library("the decode job ended without a result".into()),
                    None,
                )));
                true
            }
        }
    }
}

/// A partition's media stage.
pub(crate) struct MediaStage {
    cfg: Arc<MediaConfig>,
    pool: Arc<DecodePool>,
    /// Notified when a decode finishes.
    pub(crate) done: Arc<Notify>,
    /// Media records of each stream in the task's buffers (decoding or
    /// decoded, not yet processed). Each stream has its own budget, so one
    /// stream can never use up what the merge needs from another: a stream
    /// out of budget always has records buffered.
    held: [usize; InputKind::COUNT],
    inits: HashMap<String, Arc<Vec<u8>>, RandomState>,
    timelines: HashMap<String, Timeline, RandomState>,
    gauge: Gauge,
}

impl MediaStage {
    pub(crate) fn new(cfg: Arc<MediaConfig>, pool: Arc<DecodePool>, partition: i32) -> Self {
        MediaStage {
            cfg,
            pool,
            done: Arc::new(Notify::new()),
            held: [0; InputKind::COUNT],
            inits: HashMap::default(),
            timelines: HashMap::default(),
            gauge: gauge!(m::MEDIA_IN_FLIGHT, "partition" => partition.to_string()),
        }
    }

    /// How many more records of `kind` may be read now.
    pub(crate) fn room(&self, kind: InputKind) -> usize {
        match kind {
            InputKind::Video | InputKind::Audio => self
                .cfg
                .max_in_flight
                .saturating_sub(self.held[kind.index()]),
            _ => usize::MAX,
        }
    }

    /// Whether every media stream may take more (for sources that push all
    /// streams through one queue).
    pub(crate) fn has_room(&self) -> bool {
        self.room(InputKind::Video) > 0 && self.room(InputKind::Audio) > 0
    }

    /// A media record of `kind` left the buffers.
    pub(crate) fn release(&mut self, kind: InputKind) {
        if let Some(h) = self.held.get_mut(kind.index()) {
            *h = h.saturating_sub(1);
        }
        self.gauge.set(self.held.iter().sum::<usize>() as f64);
    }

    /// Starts decoding a media record. A video payload moves into the job
    /// (operators read the decoded frames, not the bytes) and comes back
    /// only if decoding fails; an init segment is kept for its room.
    pub(crate) fn submit(&mut self, event: &mut Event) -> Slot {
        let job: DecodeJob = match event {
            Event::Video(v) => {
                let format = VideoFormat::try_from(v.format).unwrap_or(VideoFormat::Unspecified);
                if format == VideoFormat::Fmp4Init {
                    self.inits
                        .insert(v.room_id.clone(), Arc::new(v.payload.clone()));
                    return Slot::None;
                }
                let payload = std::mem::take(&mut v.payload);
                let init = self.inits.get(&v.room_id).cloned();
                let (start, duration) = (v.start_time_ms, v.duration_ms);
                Box::new(move |cfg| {
                    let input = VideoInput {
                        format,
                        payload: &payload,
                        init: init.as_deref().map(Vec::as_slice),
                        start_time_ms: start,
                        duration_ms: duration,
                    };
                    // Timeline sampling restarts per payload here and
                    // continues across payloads when the record rejoins
                    // the merge (see `sample_timeline`).
                    let audio_cfg = (format == VideoFormat::MpegTs).then_some(&cfg.audio);
                    match decode_video(&input, &cfg.video, &mut Timeline::default(), audio_cfg) {
                        Ok(mut video) => Ok(DecodedMedia {
                            audio: video.audio.take(),
                            video: Some(video),
                        }),
                        Err(e) => Err((e, Some(payload))),
                    }
                })
            }
            Event::Audio(a) => {
                let payload = a.payload.clone();
                let (format, rate, channels) = (a.format, a.sample_rate, a.channels);
                Box::new(move |cfg| {
                    let r = match AudioFormat::try_from(format) {
                        Ok(AudioFormat::PcmS16le) => {
                            audio::decode_pcm_s16le(&payload, rate, channels, &cfg.audio)
                        }
                        Ok(AudioFormat::AacAdts) => audio::decode_aac_adts(payload, &cfg.audio),
                        _ => Err(MediaError::Unsupported("audio format unspecified".into())),
                    };
                    r.map(|a| DecodedMedia {
                        video: None,
                        audio: Some(a),
                    })
                    .map_err(|e| (e, None))
                })
            }
            _ => return Slot::None,
        };
        let kind = if matches!(event, Event::Video(_)) {
            InputKind::Video
        } else {
            InputKind::Audio
        };
        self.held[kind.index()] += 1;
        self.gauge.set(self.held.iter().sum::<usize>() as f64);
        let label = kind.name();
        let (tx, rx) = oneshot::channel();
        let cfg = self.cfg.clone();
        let done = self.done.clone();
        let submitted = self.pool.submit(move || {
            let started = Instant::now();
            let r = job(&cfg);
            record_metrics(label, &r, started);
            let _ = tx.send(r);
            done.notify_one();
        });
        if !submitted {
            return Slot::Done(Err((
                MediaError::Library("the decode pool has shut down".into()),
                None,
            )));
        }
        Slot::Pending(rx)
    }

    /// Continues the room's timeline sampling over a decoded payload (in
    /// event-time order): a frame kept for a cell an earlier payload already
    /// served loses its timeline mark, and frames with no mark left go.
    pub(crate) fn sample_timeline(&mut self, room: &str, media: &mut DecodedMedia) {
        let every = self.cfg.video.sample_every_ms;
        let Some(video) = media.video.as_mut() else {
            return;
        };
        if every <= 0 {
            return;
        }
        if !self.timelines.contains_key(room) {
            self.timelines.insert(room.to_string(), Timeline::default());
        }
        let Some(t) = self.timelines.get_mut(room) else {
            return;
        };
        for f in &mut video.frames {
            if f.purposes & purpose::TIMELINE == 0 {
                continue;
            }
            let cell = f.time_ms.div_euclid(every);
            if t.last_cell.is_some_and(|c| cell <= c) {
                f.purposes &= !purpose::TIMELINE;
            } else {
                t.last_cell = Some(cell);
            }
        }
        video.frames.retain(|f| f.purposes != 0);
        for f in &video.frames {
            if f.purposes & purpose::TIMELINE != 0 {
                counter!(m::MEDIA_FRAMES_SAMPLED, "purpose" => "timeline").increment(1);
            }
            if f.purposes & purpose::SEGMENT != 0 {
                counter!(m::MEDIA_FRAMES_SAMPLED, "purpose" => "segment").increment(1);
            }
        }
    }

    /// Drops the state of every room (revocation).
    pub(crate) fn clear(&mut self) {
        self.inits.clear();
        self.timelines.clear();
        self.held = [0; InputKind::COUNT];
        self.gauge.set(0.0);
    }
}

fn record_metrics(kind: &'static str, r: &Result<DecodedMedia, Failure>, started: Instant) {
    let result = match r {
        Ok(_) => "ok",
        Err((e, _)) => e.reason(),
    };
    let secs = started.elapsed().as_secs_f64();
    histogram!(m::MEDIA_DECODE_SECONDS, "kind" => kind, "result" => result).record(secs);
    histogram!(m::STAGE_LATENCY, "stage" => "media").record(secs);
    counter!(m::MEDIA_DECODED, "kind" => kind, "result" => result).increment(1);
    if let Ok(media) = r {
        if let Some(v) = &media.video {
            counter!(m::MEDIA_FRAMES_DECODED, "codec" => v.codec.clone())
                .increment(v.decoded as u64);
        }
        if let Some(a) = &media.audio {
            counter!(m::MEDIA_AUDIO_MS).increment(a.duration_ms().max(0) as u64);
        }
    }
}
