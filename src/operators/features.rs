//! The features operator: for every room of the partition it sends sampled
//! frames to the image encoder and comments and transcripts to the text
//! encoder (batched across every room of the instance), summarises the audio
//! of each tick, and once a closed tick's embeddings are all back writes one
//! `room-features` record for it and keeps it in the room's look-back window.
//!
//! Ticks of a room are written in order; a tick waits for its own requests
//! only. Transcripts come back from speech recognition seconds late: they go
//! into the window at their event time and into the next record written, which
//! names their span. When a model's queue is full the operator keeps the
//! refused requests, reports itself congested (the partition stops taking
//! records and its input pauses) and resubmits when the batcher wakes it.
//!
//! Not for: loading models or batching (`models::serving`, `models::batcher`),
//! speech recognition (the speech operator, whose notes it reads), or the
//! highlight and gift models that read the window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use prost::Message;

use crate::config::{BatchSettings, FeaturesConfig};
use crate::decode::video::purpose;
use crate::decode::DecodedMedia;
use crate::features::audio::{AudioAcc, AudioAnalyzer};
use crate::features::window::{mean_in, RoomWindow, TickFeatures};
use crate::models::batcher::{BatchModel, Batcher, Done, Refused, ReplyTo, Submit};
use crate::models::image::ImageEncoder;
use crate::models::serving::{ModelSlot, Watch};
use crate::models::text::TextEncoder;
use crate::models::ModelError;
use crate::runtime::{Context, Embedded, Holds, Note, Operator, Output, OutputTopic, Position};
use crate::schema::{deterministic_id, AudioFeatures, Event, RoomFeatures, SCHEMA_VERSION};

/// A room with no input for this long (event time) and nothing pending is
/// forgotten, window and all.
const ROOM_IDLE_MS: i64 = 60_000;

/// The encoders every partition shares: one batcher per model, and the
/// threads that watch the model directories for new versions.
pub struct Encoders {
    /// The settings.
    pub cfg: Arc<FeaturesConfig>,
    /// Frames to embeddings.
    pub image: Box<dyn Submit<Vec<f32>, Vec<f32>>>,
    /// Comments and transcripts to embeddings.
    pub text: Box<dyn Submit<String, Vec<f32>>>,
    _watches: Vec<Watch>,
}

impl std::fmt::Debug for Encoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoders")
            .field("image", &self.image.label())
            .field("text", &self.text.label())
            .finish_non_exhaustive()
    }
}

/// Opens a model directory, starts its batcher and its watcher.
fn serve<M: BatchModel>(
    dir: &str,
    batch: &BatchSettings,
    reload_ms: u64,
    watches: &mut Vec<Watch>,
) -> Result<Batcher<M>, ModelError> {
    let slot = ModelSlot::<M>::open(std::path::Path::new(dir), batch.workers, batch.threads)?;
    if reload_ms > 0 {
        watches.push(slot.watch(Duration::from_millis(reload_ms)));
    }
    Ok(Batcher::start(slot, batch.batch_config()))
}

impl Encoders {
    /// Loads both models (the highest working version of each) on the
    /// configured backend, starts their batchers and, when
    /// `reload_interval_ms` > 0, their watchers.
    pub fn start(cfg: Arc<FeaturesConfig>) -> Result<Self, ModelError> {
        let mut watches = Vec::new();
        let reload = cfg.reload_interval_ms;
        let (image, text): (Box<dyn Submit<_, _>>, Box<dyn Submit<_, _>>) =
            match cfg.backend.as_str() {
                #[cfg(feature = "torch")]
                "torch" => (
                    Box::new(serve::<crate::models::torch::TorchImageEncoder>(
                        &cfg.image_model,
                        &cfg.image_batch,
                        reload,
                        &mut watches,
                    )?),
                    Box::new(serve::<crate::models::torch::TorchTextEncoder>(
                        &cfg.text_model,
                        &cfg.text_batch,
                        reload,
                        &mut watches,
                    )?),
                ),
                "onnx" => (
                    Box::new(serve::<ImageEncoder>(
                        &cfg.image_model,
                        &cfg.image_batch,
                        reload,
                        &mut watches,
                    )?),
                    Box::new(serve::<TextEncoder>(
                        &cfg.text_model,
                        &cfg.text_batch,
                        reload,
                        &mut watches,
                    )?),
                ),
                other => {
                    return Err(ModelError::Missing {
                        path: "operators.features.backend".into(),
                        reason: format!("backend {other:?} is not built in"),
                    })
                }
            };
        Ok(Encoders {
            image,
            text,
            cfg,
            _watches: watches,
        })
    }
}

/// What an outstanding request is for.
enum Req {
    /// A sampled frame: for the tick (timeline frames) and/or the segment.
    Frame {
        room: Arc<str>,
        time_ms: i64,
        /// The tick that waits for it (every frame, so that a tick's
        /// features, and the segments completed by them, come after its
        /// frames' embeddings).
        tick: Option<i64>,
        /// Whether it is one of the tick's timeline frames (in its mean).
        timeline: bool,
        /// The video segment's start and end.
        segment: Option<(i64, i64)>,
    },
    /// A comment of a tick.
    Comment {
        room: Arc<str>,
        time_ms: i64,
        tick: i64,
    },
    /// A transcript.
    Transcript {
        room: Arc<str>,
        start_ms: i64,
        end_ms: i64,
    },
}

impl Req {
    /// The room and what was embedded, for the embedding notes (segment frames,
    /// comments and transcripts; frames for the tick timeline only are not sent).
    fn embedded(&self) -> Option<(&Arc<str>, Embedded)> {
        match self {
            Req::Frame {
                room,
                time_ms,
                segment: Some(_),
                ..
            } => Some((room, Embedded::SegmentFrame { time_ms: *time_ms })),
            Req::Frame { segment: None, .. } => None,
            Req::Comment { room, time_ms, .. } => {
                Some((room, Embedded::Comment { time_ms: *time_ms }))
            }
            Req::Transcript {
                room,
                start_ms,
                end_ms,
            } => Some((
                room,
                Embedded::Transcript {
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                },
            )),
        }
    }
}

/// A request a full queue refused, kept in order until there is room.
enum Held {
    Image(Arc<str>, u64, Vec<f32>),
    Text(Arc<str>, u64, String),
}

/// One tick of one room while it collects.
#[derive(Default)]
struct TickAcc {
    feats: TickFeatures,
    audio: AudioAcc,
    voiced_ms: i64,
    judged_ms: i64,
    /// Requests not yet back.
    pending: u32,
    /// Comments embedded so far (the count of the comments' mean).
    comments_embedded: u32,
    /// The runtime closed the tick: no more inputs will come for it.
    closed: bool,
    holds: Holds,
}

struct Room {
    window: RoomWindow,
    ticks: BTreeMap<i64, TickAcc>,
    /// Transcripts back since the room's last record: (start, end, embedding).
    new_speech: Vec<(i64, i64, Vec<f32>)>,
    /// Whether the room sends audio records (then a video segment's own
    /// audio track is not counted again).
    audio_records: bool,
    last_ms: i64,
    /// The newest tick written; later inputs for it or before are late.
    written_through: Option<i64>,
}

/// The operator (one per partition; see the module docs).
pub struct Features {
    enc: Arc<Encoders>,
    analyzer: Arc<AudioAnalyzer>,
    rooms: HashMap<Arc<str>, Room>,
    requests: HashMap<u64, Req>,
    next_id: u64,
    image_reply: ReplyTo<Vec<f32>>,
    image_rx: mpsc::Receiver<Done<Vec<f32>>>,
    text_reply: ReplyTo<Vec<f32>>,
    text_rx: mpsc::Receiver<Done<Vec<f32>>>,
    held: VecDeque<Held>,
    tick_ms: i64,
    written: Option<Counter>,
    failed: Counter,
    /// Whether to send `Note::Embedded` (see [`Features::with_embedding_notes`]).
    embedding_notes: bool,
    /// Embedding notes waiting for a hook with a context.
    embedded: Vec<Note>,
}

impl Features {
    /// The operator for one partition, sharing the instance's encoders.
    pub fn new(enc: Arc<Encoders>) -> Self {
        let (itx, image_rx) = mpsc::channel();
        let (ttx, text_rx) = mpsc::channel();
        Features {
            enc,
            analyzer: Arc::new(AudioAnalyzer::new()),
            rooms: HashMap::new(),
            requests: HashMap::new(),
            next_id: 0,
            image_reply: ReplyTo {
                tx: itx,
                wake: None,
            },
            image_rx,
            text_reply: ReplyTo {
                tx: ttx,
                wake: None,
            },
            text_rx,
            held: VecDeque::new(),
            tick_ms: 1000,
            written: None,
            failed: metrics::counter!(crate::metrics::STAGE_ERRORS, "stage" => "features", "kind" => "model"),
            embedding_notes: false,
            embedded: Vec::new(),
        }
    }

    /// Also tells later operators each segment frame, comment and transcript
    /// embedding as it comes back ([`Note::Embedded`]), for operators that fuse
    /// a room's content from its parts.
    pub fn with_embedding_notes(mut self, on: bool) -> Self {
        self.embedding_notes = on;
        self
    }

    fn note_embedding(
        &mut self,
        room: &Arc<str>,
        item: Embedded,
        e: &[f32],
        model: &Option<Arc<str>>,
    ) {
        if self.embedding_notes {
            self.embedded.push(Note::Embedded {
                room_id: room.clone(),
                item,
                embedding: e.into(),
                model: model.clone().unwrap_or_else(|| Arc::from("")),
            });
        }
    }

    /// The look-back window and segment sets of a room (None if not held).
    pub fn window(&self, room_id: &str) -> Option<&RoomWindow> {
        self.rooms.get(room_id).map(|r| &r.window)
    }

    fn tick_of(&self, t: i64) -> i64 {
        t.div_euclid(self.tick_ms) * self.tick_ms
    }

    fn room(&mut self, room_id: &str, t: i64) -> (Arc<str>, &mut Room) {
        let cfg = &self.enc.cfg;
        let key: Arc<str> = match self.rooms.get_key_value(room_id) {
            Some((k, _)) => k.clone(),
            None => room_id.into(),
        };
        let room = self.rooms.entry(key.clone()).or_insert_with(|| Room {
            window: RoomWindow::new(cfg.window_ticks, cfg.segments),
            ticks: BTreeMap::new(),
            new_speech: Vec::new(),
            audio_records: false,
            last_ms: t,
            written_through: None,
        });
        room.last_ms = room.last_ms.max(t);
        (key, room)
    }

    /// The collecting tick `tick` of `room` (None when it was written).
    fn acc(room: &mut Room, tick: i64) -> Option<&mut TickAcc> {
        if room.written_through.is_some_and(|w| tick <= w) {
            return None;
        }
        let acc = room.ticks.entry(tick).or_insert_with(|| TickAcc {
            feats: TickFeatures {
                start_ms: tick,
                ..TickFeatures::default()
            },
            ..TickAcc::default()
        });
        (!acc.closed).then_some(acc)
    }

    fn submit_image(&mut self, room: Arc<str>, id: u64, frame: Vec<f32>) {
        if self.held.is_empty() {
            match self.enc.image.submit(&room, id, frame, &self.image_reply) {
                Ok(()) => {}
                Err(Refused::Full(f)) => self.held.push_back(Held::Image(room, id, f)),
                Err(Refused::Stopped(_)) => self.give_up(id),
            }
        } else {
            self.held.push_back(Held::Image(room, id, frame));
        }
    }

    fn submit_text(&mut self, room: Arc<str>, id: u64, text: String) {
        if self.held.is_empty() {
            match self.enc.text.submit(&room, id, text, &self.text_reply) {
                Ok(()) => {}
                Err(Refused::Full(t)) => self.held.push_back(Held::Text(room, id, t)),
                Err(Refused::Stopped(_)) => self.give_up(id),
            }
        } else {
            self.held.push_back(Held::Text(room, id, text));
        }
    }

    /// Resubmits held requests in order until one is refused again.
    fn resubmit(&mut self) {
        while let Some(h) = self.held.pop_front() {
            let refused = match h {
                Held::Image(room, id, f) => {
                    match self.enc.image.submit(&room, id, f, &self.image_reply) {
                        Ok(()) => None,
                        Err(Refused::Full(f)) => Some(Held::Image(room, id, f)),
                        Err(Refused::Stopped(_)) => {
                            self.give_up(id);
                            None
                        }
                    }
                }
                Held::Text(room, id, t) => {
                    match self.enc.text.submit(&room, id, t, &self.text_reply) {
                        Ok(()) => None,
                        Err(Refused::Full(t)) => Some(Held::Text(room, id, t)),
                        Err(Refused::Stopped(_)) => {
                            self.give_up(id);
                            None
                        }
                    }
                }
            };
            if let Some(h) = refused {
                self.held.push_front(h);
                break;
            }
        }
    }

    /// A request that will never be answered: its tick stops waiting for it.
    fn give_up(&mut self, id: u64) {
        self.failed.increment(1);
        if let Some(req) = self.requests.remove(&id) {
            self.apply(req, None, None);
        }
    }

    fn new_id(&mut self, req: Req) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(id, req);
        id
    }

    /// Applies a finished request (`embedding` None: it failed).
    fn apply(&mut self, req: Req, embedding: Option<Vec<f32>>, model: Option<Arc<str>>) {
        let tick_ms = self.tick_ms;
        if let (Some(e), Some((room, item))) = (&embedding, req.embedded()) {
            self.note_embedding(room, item, e, &model);
        }
        match req {
            Req::Frame {
                room,
                time_ms,
                tick,
                timeline,
                segment,
            } => {
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                if let Some(acc) = tick.and_then(|t| r.ticks.get_mut(&t)) {
                    acc.pending = acc.pending.saturating_sub(1);
                    if let (Some(e), true) = (&embedding, timeline) {
                        mean_in(&mut acc.feats.image, acc.feats.frames, e);
                        acc.feats.frames += 1;
                        acc.feats.image_model = model.clone();
                    }
                }
                if let (Some((start, end)), Some(e)) = (segment, embedding) {
                    if let Some(seg) = r.window.segment(start, end) {
                        let i = seg.frames.partition_point(|(t, _)| *t <= time_ms);
                        seg.frames.insert(i, (time_ms, e));
                    }
                }
            }
            Req::Comment {
                room,
                time_ms,
                tick,
            } => {
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                if let Some(acc) = r.ticks.get_mut(&tick) {
                    acc.pending = acc.pending.saturating_sub(1);
                    if let Some(e) = &embedding {
                        // `feats.comments` counts every comment, embedded or not.
                        mean_in(&mut acc.feats.comments_mean, acc.comments_embedded, e);
                        acc.comments_embedded += 1;
                        acc.feats.text_model = model.clone();
                    }
                }
                if let Some(e) = embedding {
                    r.window.add_comment(time_ms, &e);
                }
            }
            Req::Transcript {
                room,
                start_ms,
                end_ms,
            } => {
                let (Some(r), Some(e)) = (self.rooms.get_mut(&room), embedding) else {
                    return;
                };
                r.window.add_transcript(start_ms, end_ms, tick_ms, &e);
                r.new_speech.push((start_ms, end_ms, e));
            }
        }
    }

    /// Writes every room's closed ticks whose requests are all back, in
    /// order per room.
    fn emit_ready(&mut self, ctx: &mut Context<'_>) {
        for n in self.embedded.drain(..) {
            ctx.note(n);
        }
        let tick_ms = self.tick_ms;
        let text_label = self.enc.text.label();
        for (room_id, room) in &mut self.rooms {
            while let Some(entry) = room.ticks.first_entry() {
                let acc = entry.get();
                if !acc.closed || acc.pending > 0 {
                    break;
                }
                let (tick, mut acc) = entry.remove_entry();
                room.written_through = Some(tick);
                acc.feats.audio = acc.audio.summary();
                acc.feats.speech_ratio = (acc.judged_ms > 0)
                    .then(|| (acc.voiced_ms as f32 / acc.judged_ms as f32).clamp(0.0, 1.0));
                let speech = std::mem::take(&mut room.new_speech);
                let record = Arc::new(record(room_id, tick_ms, &acc.feats, &speech, &text_label));
                room.window.push_tick(acc.feats, tick_ms);
                if let Some(c) = &self.written {
                    c.increment(1);
                }
                ctx.emit(Output {
                    topic: OutputTopic::RoomFeatures,
                    key: room_id.as_bytes().to_vec(),
                    id: record.id.clone(),
                    payload: record.encode_to_vec(),
                    headers: Vec::new(),
                    model_version: (!record.image_model.is_empty())
                        .then(|| record.image_model.clone()),
                    tick_end_ms: Some(tick + tick_ms),
                    depends_on: acc.holds,
                });
                ctx.note(Note::Features {
                    record,
                    holds: acc.holds,
                });
            }
        }
    }

    fn drain_replies(&mut self) {
        loop {
            let done = match self.image_rx.try_recv() {
                Ok(d) => Some(d),
                Err(_) => self.text_rx.try_recv().ok(),
            };
            let Some(done) = done else {
                break;
            };
            let Some(req) = self.requests.remove(&done.id) else {
                continue;
            };
            match done.result {
                Ok(e) => self.apply(req, Some(e), Some(done.model)),
                Err(e) => {
                    self.failed.increment(1);
                    tracing::debug!(error = %e, "embedding failed");
                    self.apply(req, None, None);
                }
            }
        }
    }
}

/// The record for one written tick.
fn record(
    room_id: &str,
    tick_ms: i64,
    f: &TickFeatures,
    speech: &[(i64, i64, Vec<f32>)],
    text_label: &Arc<str>,
) -> RoomFeatures {
    let mut speech_mean = None;
    for (n, (_, _, e)) in speech.iter().enumerate() {
        mean_in(&mut speech_mean, n as u32, e);
    }
    let audio = f.audio.as_ref().map(|a| AudioFeatures {
        audio_ms: a.audio_ms,
        log_mel_mean: a.log_mel_mean.clone(),
        log_mel_std: a.log_mel_std.clone(),
        rms_dbfs: a.rms_dbfs,
        peak_dbfs: a.peak_dbfs,
        speech_ratio: f.speech_ratio,
    });
    let text_model = f
        .text_model
        .clone()
        .or_else(|| (!speech.is_empty()).then(|| text_label.clone()));
    RoomFeatures {
        schema_version: SCHEMA_VERSION,
        id: deterministic_id(&[
            b"room-features",
            room_id.as_bytes(),
            &f.start_ms.to_le_bytes(),
        ]),
        room_id: room_id.to_string(),
        tick_start_ms: f.start_ms,
        tick_ms,
        image_embedding: f.image.clone().unwrap_or_default(),
        frames: f.frames,
        comment_embedding: f.comments_mean.clone().unwrap_or_default(),
        comments: f.comments,
        transcript_embedding: speech_mean.unwrap_or_default(),
        transcripts: speech.len() as u32,
        transcripts_start_ms: speech.iter().map(|s| s.0).min().unwrap_or(0),
        transcripts_end_ms: speech.iter().map(|s| s.1).max().unwrap_or(0),
        audio,
        image_model: f.image_model.as_deref().unwrap_or("").to_string(),
        text_model: text_model.as_deref().unwrap_or("").to_string(),
    }
}

impl Operator for Features {
    fn name(&self) -> &'static str {
        "features"
    }

    fn on_start(&mut self, ctx: &mut Context<'_>) {
        self.tick_ms = ctx.tick_ms().max(1);
        let wake = ctx.wake();
        self.image_reply.wake = wake.clone();
        self.text_reply.wake = wake;
        self.written = Some(metrics::counter!(
            crate::metrics::ROOM_FEATURES,
            "partition" => ctx.partition().to_string()
        ));
    }

    fn on_record(&mut self, event: &Event, pos: Position, late: bool, _ctx: &mut Context<'_>) {
        let Event::Comment(c) = event else {
            return;
        };
        if late {
            return;
        }
        let max = self.enc.cfg.max_comments_per_tick as u32;
        let tick = self.tick_of(c.event_time_ms);
        let (key, room) = self.room(&c.room_id, c.event_time_ms);
        let Some(acc) = Self::acc(room, tick) else {
            return;
        };
        acc.feats.comments += 1;
        // Counted, so held, embedded or not: a replay counts it again.
        acc.holds.hold(pos);
        if acc.feats.comments > max || c.text.trim().is_empty() {
            return;
        }
        acc.pending += 1;
        let id = self.new_id(Req::Comment {
            room: key.clone(),
            time_ms: c.event_time_ms,
            tick,
        });
        self.submit_text(key, id, c.text.clone());
    }

    fn on_media(
        &mut self,
        event: &Event,
        media: &DecodedMedia,
        pos: Position,
        late: bool,
        _ctx: &mut Context<'_>,
    ) {
        if late {
            return;
        }
        let (start, is_audio, duration) = match event {
            Event::Audio(a) => (a.start_time_ms, true, 0),
            Event::Video(v) => (v.start_time_ms, false, i64::from(v.duration_ms)),
            _ => return,
        };
        let seg = (start, start + duration.max(1));
        let tick_ms = self.tick_ms;
        let analyzer = self.analyzer.clone();
        let (key, room) = self.room(event.room_id(), start);
        if let Some(audio) = media.audio.as_ref() {
            room.audio_records |= is_audio;
            if (is_audio || !room.audio_records) && audio.rate == 16_000 {
                // Split the samples at tick boundaries.
                let per_ms = 16;
                let mut offset = 0usize;
                while offset < audio.samples.len() {
                    let t = start + (offset / per_ms) as i64;
                    let tick = t.div_euclid(tick_ms) * tick_ms;
                    let end =
                        (((tick + tick_ms - start) as usize) * per_ms).min(audio.samples.len());
                    let end = end.max(offset + 1);
                    if let Some(acc) = Self::acc(room, tick) {
                        analyzer.add(&mut acc.audio, &audio.samples[offset..end]);
                        acc.holds.hold(pos);
                    }
                    offset = end;
                }
            }
        }
        let Some(video) = media.video.as_ref() else {
            return;
        };
        for frame in &video.frames {
            let tick = frame.time_ms.div_euclid(tick_ms) * tick_ms;
            let timeline = frame.purposes & purpose::TIMELINE != 0;
            let segment = frame.purposes & purpose::SEGMENT != 0;
            let Some(room) = self.rooms.get_mut(&key) else {
                return;
            };
            if !timeline && !segment {
                continue;
            }
            // A segment frame holds its tick too: MMBee's content segment
            // completes with the features of a later tick, and must find
            // its frames there whenever their embeddings come back.
            let tick = match Self::acc(room, tick) {
                Some(acc) => {
                    acc.pending += 1;
                    acc.holds.hold(pos);
                    Some(tick)
                }
                None => None,
            };
            if segment {
                room.window.segment(seg.0, seg.1);
            }
            if tick.is_none() && !segment {
                continue;
            }
            let id = self.new_id(Req::Frame {
                room: key.clone(),
                time_ms: frame.time_ms,
                tick,
                timeline,
                segment: segment.then_some(seg),
            });
            self.submit_image(key.clone(), id, frame.tensor.clone());
        }
    }

    fn on_note(&mut self, note: &Note, _ctx: &mut Context<'_>) {
        match note {
            Note::Transcript {
                room_id,
                start_ms,
                end_ms,
                text,
            } => {
                if text.trim().is_empty() {
                    return;
                }
                let (key, _) = self.room(room_id, *end_ms);
                let id = self.new_id(Req::Transcript {
                    room: key.clone(),
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                });
                self.submit_text(key, id, text.clone());
            }
            Note::Voice {
                room_id,
                tick_start_ms,
                voiced_ms,
                judged_ms,
            } => {
                if let Some(room) = self.rooms.get_mut(room_id.as_str()) {
                    if let Some(acc) = Self::acc(room, *tick_start_ms) {
                        acc.voiced_ms += voiced_ms;
                        acc.judged_ms += judged_ms;
                    }
                }
            }
            Note::Features { .. } | Note::Embedded { .. } | Note::Content { .. } => {}
        }
    }

    fn on_tick(&mut self, tick_start_ms: i64, ctx: &mut Context<'_>) {
        let mut gone = Vec::new();
        for (id, room) in &mut self.rooms {
            for (_, acc) in room.ticks.range_mut(..=tick_start_ms) {
                acc.closed = true;
            }
            if room.ticks.is_empty() && room.last_ms + ROOM_IDLE_MS <= tick_start_ms {
                gone.push(id.clone());
            }
        }
        for id in gone {
            if !self.requests.values().any(|r| match r {
                Req::Frame { room, .. }
                | Req::Comment { room, .. }
                | Req::Transcript { room, .. } => *room == id,
            }) {
                self.rooms.remove(&id);
            }
        }
        self.emit_ready(ctx);
    }

    fn poll(&mut self, ctx: &mut Context<'_>) {
        self.resubmit();
        self.drain_replies();
        self.emit_ready(ctx);
    }

    fn pending(&self) -> usize {
        self.requests.len()
    }

    fn on_finish(&mut self, ctx: &mut Context<'_>) {
        for room in self.rooms.values_mut() {
            for acc in room.ticks.values_mut() {
                acc.closed = true;
            }
        }
        self.emit_ready(ctx);
    }

    fn unfinished_tick(&self) -> Option<i64> {
        self.rooms
            .values()
            .filter_map(|r| r.ticks.keys().next().copied())
            .min()
    }

    fn congested(&self) -> bool {
        !self.held.is_empty()
    }

    fn holds(&self, holds: &mut Holds) {
        for room in self.rooms.values() {
            for acc in room.ticks.values() {
                holds.merge(&acc.holds);
            }
        }
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn on_revoke(&mut self) {
        self.rooms.clear();
        self.requests.clear();
        self.held.clear();
    }
}
