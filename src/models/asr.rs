//! Speech recognition under a budget: a fixed pool of threads, shared by
//! every partition, runs Whisper on voiced windows. At most `max_concurrent`
//! windows are transcribed at once and at most `max_queued` wait; when the
//! queue is full the window of the least active room is skipped (reported
//! back as [`AsrFailure::Skipped`] and counted), so a burst of speech costs
//! a bounded amount of memory and CPU and the busiest rooms are heard first.
//!
//! Not for: finding the windows (the speech operator's voice activity does)
//! or deciding what a transcript means downstream.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use tokio::sync::Notify;

use super::whisper::{AsrOptions, Transcription, Whisper, SAMPLE_RATE};
use super::ModelError;
use crate::metrics as m;

/// Something that turns 16 kHz mono audio into text: Whisper, or in the
/// pool's own tests a stand-in whose timing the test controls.
pub trait Transcribe: Send + Sync {
    /// Transcribes one window.
    fn transcribe(&self, samples: &[f32], opts: &AsrOptions) -> Result<Transcription, ModelError>;
}

impl Transcribe for Whisper {
    fn transcribe(&self, samples: &[f32], opts: &AsrOptions) -> Result<Transcription, ModelError> {
        Whisper::transcribe(self, samples, opts)
    }
}

/// How much recognition may run, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct AsrBudget {
    /// Transcriptions at once (pool threads).
    pub max_concurrent: usize,
    /// Threads of one transcription.
    pub threads_per_job: usize,
    /// Windows that may wait for a thread.
    pub max_queued: usize,
    /// Language to force, or None to detect it per window.
    pub language: Option<String>,
    /// Languages detection chooses from (empty: any).
    pub candidates: Vec<String>,
}

/// Why a window has no transcription.
#[derive(Debug, thiserror::Error)]
pub enum AsrFailure {
    /// The budget was spent on more active rooms.
    #[error("skipped: over the speech-recognition budget")]
    Skipped,
    /// Whisper failed on the window.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The pool is shutting down.
    #[error("the speech-recognition pool has shut down")]
    ShutDown,
}

/// A finished (or skipped) window, sent back to whoever submitted it.
#[derive(Debug)]
pub struct AsrOutcome {
    /// The submitter's ticket.
    pub ticket: u64,
    /// The transcription, or why there is none.
    pub result: Result<Transcription, AsrFailure>,
}

/// Where a window's outcome goes: a channel, and a signal to wake its reader.
#[derive(Clone)]
pub struct AsrReply {
    tx: mpsc::Sender<AsrOutcome>,
    wake: Arc<Notify>,
}

impl AsrReply {
    /// Outcomes go to `tx`; `wake` is notified after each.
    pub fn new(tx: mpsc::Sender<AsrOutcome>, wake: Arc<Notify>) -> Self {
        AsrReply { tx, wake }
    }

    fn send(&self, ticket: u64, result: Result<Transcription, AsrFailure>) {
        // The submitter may be gone (its partition was revoked): nothing to do.
        let _ = self.tx.send(AsrOutcome { ticket, result });
        self.wake.notify_one();
    }
}

/// One voiced window to transcribe.
pub struct AsrRequest {
    /// The submitter's ticket, returned in the outcome.
    pub ticket: u64,
    /// The window's room (for logs).
    pub room_id: String,
    /// Higher goes first and is skipped last (the room's activity).
    pub priority: f64,
    /// 16 kHz mono samples.
    pub samples: Vec<f32>,
    /// Where the outcome goes.
    pub reply: AsrReply,
}

struct Queued {
    req: AsrRequest,
    seq: u64,
}

#[derive(Default)]
struct Queue {
    items: Vec<Queued>,
    seq: u64,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    max_queued: usize,
}

/// The pool (see the module docs). Dropping it stops the threads once their
/// current window is done; waiting windows are answered `ShutDown`.
pub struct AsrPool {
    shared: Arc<Shared>,
    model_version: String,
    threads: usize,
}

impl AsrPool {
    /// Starts `budget.max_concurrent` threads sharing `model`.
    pub fn start(
        model: Arc<dyn Transcribe>,
        model_version: String,
        budget: &AsrBudget,
    ) -> std::io::Result<Arc<Self>> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            max_queued: budget.max_queued,
        });
        let opts = AsrOptions {
            threads: budget.threads_per_job.max(1),
            language: budget.language.clone(),
            candidates: budget.candidates.clone(),
            ..AsrOptions::default()
        };
        let threads = budget.max_concurrent.max(1);
        for i in 0..threads {
            let shared = shared.clone();
            let model = model.clone();
            let opts = opts.clone();
            std::thread::Builder::new()
                .name(format!("asr-{i}"))
                .spawn(move || worker(&shared, &*model, &opts))?;
        }
        Ok(Arc::new(AsrPool {
            shared,
            model_version,
            threads,
        }))
    }

    /// `name@version` of the model, for the outputs.
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// Transcription threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues a window, or skips it (or a less active room's queued window)
    /// when the queue is full; a skipped window's outcome is sent at once.
    pub fn submit(&self, req: AsrRequest) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            drop(q);
            req.reply.send(req.ticket, Err(AsrFailure::ShutDown));
            return;
        }
        let skipped = if q.items.len() < self.shared.max_queued.max(1) {
            None
        } else {
            // The least active waiting window (the newest among equals).
            let lowest = q
                .items
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| {
                    a.req
                        .priority
                        .total_cmp(&b.req.priority)
                        .then(b.seq.cmp(&a.seq))
                })
                .map(|(i, w)| (i, w.req.priority));
            match lowest {
                Some((i, p)) if p < req.priority => Some(q.items.swap_remove(i).req),
                _ => {
                    drop(q);
                    skip(req);
                    return;
                }
            }
        };
        q.seq += 1;
        let seq = q.seq;
        q.items.push(Queued { req, seq });
        gauge!(m::ASR_QUEUED).set(q.items.len() as f64);
        drop(q);
        self.shared.ready.notify_one();
        if let Some(s) = skipped {
            skip(s);
        }
    }
}

impl Drop for AsrPool {
    fn drop(&mut self) {
        let items = {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.closed = true;
            std::mem::take(&mut q.items)
        };
        self.shared.ready.notify_all();
        for w in items {
            w.req.reply.send(w.req.ticket, Err(AsrFailure::ShutDown));
        }
    }
}

fn skip(req: AsrRequest) {
    tracing::debug!(room = %req.room_id, priority = req.priority, "voiced window skipped: over the ASR budget");
    req.reply.send(req.ticket, Err(AsrFailure::Skipped));
}

fn worker(shared: &Shared, model: &dyn Transcribe, opts: &AsrOptions) {
    loop {
        let req = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.closed {
                    return;
                }
                // The most active room's window (the oldest among equals).
                let best = q
                    .items
                    .iter()
                    .enumerate()
                    .max_by(|(_, a), (_, b)| {
                        a.req
                            .priority
                            .total_cmp(&b.req.priority)
                            .then(b.seq.cmp(&a.seq))
                    })
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    let w = q.items.swap_remove(i);
                    gauge!(m::ASR_QUEUED).set(q.items.len() as f64);
                    break w.req;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.transcribe(&req.samples, opts)
        }))
        .unwrap_or_else(|_| Err(ModelError::Runtime("whisper panicked".into())));
        let secs = started.elapsed().as_secs_f64();
        let audio_secs = req.samples.len() as f64 / f64::from(SAMPLE_RATE);
        histogram!(m::ASR_SECONDS).record(secs);
        histogram!(m::STAGE_LATENCY, "stage" => "asr").record(secs);
        if audio_secs > 0.0 {
            histogram!(m::ASR_REAL_TIME_FACTOR).record(secs / audio_secs);
        }
        counter!(m::ASR_AUDIO_MS).increment((audio_secs * 1000.0) as u64);
        if let Err(e) = &result {
            tracing::warn!(room = %req.room_id, error = %e, "transcription failed");
        }
        req.reply.send(req.ticket, result.map_err(AsrFailure::from));
    }
}

#[cfg(test)]
mod tests {
    //! The queue policy, with a stand-in transcriber that holds its thread
    //! until the test lets it go (the real model runs in tests/speech.rs and
    //! the end-to-end speech test).

    use super::*;
    use crate::models::whisper::Segment;
    use std::time::Duration;

    /// Answers each window with its first sample as text, once allowed.
    struct Gate {
        go: Mutex<mpsc::Receiver<()>>,
    }

    impl Transcribe for Gate {
        fn transcribe(
            &self,
            samples: &[f32],
            _opts: &AsrOptions,
        ) -> Result<Transcription, ModelError> {
            let go = self.go.lock().unwrap_or_else(|p| p.into_inner());
            go.recv_timeout(Duration::from_secs(10))
                .map_err(|_| ModelError::Runtime("not released".into()))?;
            Ok(Transcription {
                language: "en".into(),
                segments: vec![Segment {
                    start_ms: 0,
                    end_ms: 1,
                    text: format!("{}", samples[0]),
                }],
            })
        }
    }

    fn request(ticket: u64, priority: f64, reply: &AsrReply) -> AsrRequest {
        AsrRequest {
            ticket,
            room_id: format!("room-{ticket}"),
            priority,
            samples: vec![ticket as f32; 160],
            reply: reply.clone(),
        }
    }

    #[test]
    fn busiest_rooms_go_first_and_the_quietest_are_skipped() {
        let (go_tx, go_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            go: Mutex::new(go_rx),
        });
        let budget = AsrBudget {
            max_concurrent: 1,
            threads_per_job: 1,
            max_queued: 2,
            language: None,
            candidates: Vec::new(),
        };
        let pool = AsrPool::start(gate, "gate@1".into(), &budget).expect("pool");
        let (tx, rx) = mpsc::channel();
        let reply = AsrReply::new(tx, Arc::new(Notify::new()));
        // Ticket 1 occupies the only thread (wait until it has been taken).
        pool.submit(request(1, 1.0, &reply));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pool.shared.queue.lock().expect("lock").items.is_empty() {
            assert!(Instant::now() < deadline, "the worker never took a window");
            std::thread::sleep(Duration::from_millis(1));
        }
        pool.submit(request(2, 5.0, &reply));
        pool.submit(request(3, 1.0, &reply));
        // Full: 4 is busier than 3, so 3 is skipped; 5 is quieter than all.
        pool.submit(request(4, 3.0, &reply));
        pool.submit(request(5, 0.5, &reply));
        let mut skipped = Vec::new();
        while let Ok(o) = rx.try_recv() {
            assert!(matches!(o.result, Err(AsrFailure::Skipped)));
            skipped.push(o.ticket);
        }
        assert_eq!(skipped, vec![3, 5]);
        let mut order = Vec::new();
        for _ in 0..3 {
            go_tx.send(()).expect("release");
            let o = rx.recv_timeout(Duration::from_secs(5)).expect("outcome");
            let t = o.result.expect("transcribed");
            assert_eq!(t.segments[0].text, o.ticket.to_string());
            order.push(o.ticket);
        }
        assert_eq!(order, vec![1, 2, 4], "the busier waiting room goes first");
    }

    #[test]
    fn dropping_the_pool_answers_waiting_windows() {
        let (_go_tx, go_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            go: Mutex::new(go_rx),
        });
        let budget = AsrBudget {
            max_concurrent: 1,
            threads_per_job: 1,
            max_queued: 4,
            language: None,
            candidates: Vec::new(),
        };
        let pool = AsrPool::start(gate, "gate@1".into(), &budget).expect("pool");
        let (tx, rx) = mpsc::channel();
        let reply = AsrReply::new(tx, Arc::new(Notify::new()));
        for t in 1..=3 {
            pool.submit(request(t, 1.0, &reply));
        }
        drop(pool);
        let mut shut = 0;
        while let Ok(o) = rx.recv_timeout(Duration::from_millis(200)) {
            if matches!(o.result, Err(AsrFailure::ShutDown)) {
                shut += 1;
            }
        }
        // One window may be on the thread already; the others are answered.
        assert!(shut >= 2, "{shut} windows answered ShutDown");
    }
}
