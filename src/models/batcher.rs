//! Cross-room micro-batching for one model. Every partition task of the
//! instance submits requests tagged with their room; worker threads take a
//! batch when `max_batch` requests wait or when the oldest has waited
//! `max_delay`, run it on the serving version of the model, and send each
//! result back to the channel its request named, waking the partition task.
//!
//! Rooms are served round-robin: a batch takes one request from each waiting
//! room in turn, so a room with a burst of frames cannot starve the others.
//! The queue is bounded: [`Batcher::submit`] refuses a request when it is
//! full, the caller keeps it and stops reading input (backpressure: the
//! partition's consumer pauses) until the batcher wakes it again.
//!
//! Not for: loading or swapping models ([`super::serving`]) or deciding what
//! to embed (operators do).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::Notify;
use tracing::warn;

use super::serving::{ModelSlot, Servable};
use super::ModelError;
use crate::metrics as m;

/// A model that runs a batch of inputs.
pub trait BatchModel: Servable {
    /// One request's input.
    type Input: Send + 'static;
    /// One request's result.
    type Output: Send + 'static;

    /// Runs `inputs` as one batch, one output per input, in order.
    fn run_batch(&mut self, inputs: &[Self::Input]) -> Result<Vec<Self::Output>, ModelError>;
}

/// How one model batches.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Longest the oldest request waits for a batch to fill.
    pub max_delay: Duration,
    /// Most requests waiting (across rooms) before submissions are refused.
    pub capacity: usize,
    /// Worker threads, each with its own replica of the model.
    pub workers: usize,
}

/// A finished request.
#[derive(Debug)]
pub struct Done<O> {
    /// The id the submitter gave.
    pub id: u64,
    /// The result, or why there is none.
    pub result: Result<O, ModelError>,
    /// `name@version` of the model version that ran it.
    pub model: Arc<str>,
}

/// Where a request's result goes: a channel and the signal that wakes its
/// reader.
pub struct ReplyTo<O> {
    /// The submitter's channel.
    pub tx: Sender<Done<O>>,
    /// Notified after results are sent (and when queue space frees up after
    /// a refusal).
    pub wake: Option<Arc<Notify>>,
}

impl<O> Clone for ReplyTo<O> {
    fn clone(&self) -> Self {
        ReplyTo {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

struct Pending<I, O> {
    id: u64,
    input: I,
    reply: ReplyTo<O>,
    queued: Instant,
}

/// Requests waiting, per room, with the rooms in round-robin order.
struct Queue<I, O> {
    rooms: HashMap<Arc<str>, VecDeque<Pending<I, O>>>,
    order: VecDeque<Arc<str>>,
    len: usize,
    /// Submitters refused since space last freed.
    refused: Vec<Arc<Notify>>,
}

impl<I, O> Queue<I, O> {
    fn new() -> Self {
        Queue {
            rooms: HashMap::new(),
            order: VecDeque::new(),
            len: 0,
            refused: Vec::new(),
        }
    }

    fn push(&mut self, room: &Arc<str>, p: Pending<I, O>) {
        let q = self.rooms.entry(room.clone()).or_default();
        if q.is_empty() {
            self.order.push_back(room.clone());
        }
        q.push_back(p);
        self.len += 1;
    }

    /// When the oldest waiting request was queued.
    fn oldest(&self) -> Option<Instant> {
        self.order
            .iter()
            .filter_map(|r| self.rooms.get(r).and_then(|q| q.front()))
            .map(|p| p.queued)
            .min()
    }

    /// Up to `n` requests, one per room in turn.
    fn take(&mut self, n: usize) -> Vec<Pending<I, O>> {
        let mut out = Vec::with_capacity(n.min(self.len));
        while out.len() < n {
            let Some(room) = self.order.pop_front() else {
                break;
            };
            let Some(q) = self.rooms.get_mut(&room) else {
                continue;
            };
            if let Some(p) = q.pop_front() {
                out.push(p);
                self.len -= 1;
            }
            if q.is_empty() {
                self.rooms.remove(&room);
            } else {
                self.order.push_back(room);
            }
        }
        out
    }
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<I> {
    /// The queue is full: hold the input and retry after the wake signal.
    Full(I),
    /// The batcher has stopped.
    Stopped(I),
}

/// Requests an operator hands to a batcher, kept in order: those the batcher
/// refused (queue full) wait here, and everything after them waits behind
/// them until [`Outbox::retry`] gets them in.
pub struct Outbox<I> {
    held: VecDeque<(Arc<str>, u64, I)>,
}

impl<I> Default for Outbox<I> {
    fn default() -> Self {
        Outbox {
            held: VecDeque::new(),
        }
    }
}

impl<I> Outbox<I> {
    /// Submits a request for `room`, or keeps it behind those waiting.
    /// Returns false when the batcher has stopped (the request is dropped).
    pub fn send<O>(
        &mut self,
        model: &dyn Submit<I, O>,
        room: &Arc<str>,
        id: u64,
        input: I,
        reply: &ReplyTo<O>,
    ) -> bool {
        if !self.held.is_empty() {
            self.held.push_back((room.clone(), id, input));
            return true;
        }
        match model.submit(room, id, input, reply) {
            Ok(()) => true,
            Err(Refused::Full(input)) => {
                self.held.push_back((room.clone(), id, input));
                true
            }
            Err(Refused::Stopped(_)) => false,
        }
    }

    /// Submits what waits, in order, until the batcher refuses again.
    /// Returns the ids dropped because it has stopped.
    pub fn retry<O>(&mut self, model: &dyn Submit<I, O>, reply: &ReplyTo<O>) -> Vec<u64> {
        let mut stopped = Vec::new();
        while let Some((room, id, input)) = self.held.pop_front() {
            match model.submit(&room, id, input, reply) {
                Ok(()) => {}
                Err(Refused::Full(input)) => {
                    self.held.push_front((room, id, input));
                    break;
                }
                Err(Refused::Stopped(_)) => stopped.push(id),
            }
        }
        stopped
    }

    /// Whether requests wait (the operator is congested).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Drops what waits.
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

struct Shared<M: BatchModel> {
    slot: Arc<ModelSlot<M>>,
    cfg: BatchConfig,
    queue: Mutex<Queue<M::Input, M::Output>>,
    ready: Condvar,
    stop: AtomicBool,
    batch_size: Histogram,
    queue_seconds: Histogram,
    inference_seconds: Histogram,
    queued: Gauge,
    refused: Counter,
}

/// The batcher of one model; dropping it stops its workers after the
/// requests already queued.
pub struct Batcher<M: BatchModel> {
    shared: Arc<Shared<M>>,
    workers: Vec<JoinHandle<()>>,
}

impl<M: BatchModel> std::fmt::Debug for Batcher<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.shared.slot)
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl<M: BatchModel> Batcher<M> {
    /// Starts `cfg.workers` workers serving `slot`.
    pub fn start(slot: Arc<ModelSlot<M>>, cfg: BatchConfig) -> Self {
        let name = slot.name().to_string();
        let cfg = BatchConfig {
            max_batch: cfg.max_batch.max(1),
            capacity: cfg.capacity.max(cfg.max_batch.max(1)),
            workers: cfg.workers.max(1),
            ..cfg
        };
        let shared = Arc::new(Shared {
            batch_size: metrics::histogram!(m::BATCH_SIZE, "model" => name.clone()),
            queue_seconds: metrics::histogram!(m::BATCH_QUEUE_SECONDS, "model" => name.clone()),
            inference_seconds: metrics::histogram!(m::BATCH_INFERENCE_SECONDS, "model" => name.clone()),
            queued: metrics::gauge!(m::BATCH_QUEUED, "model" => name.clone()),
            refused: metrics::counter!(m::BATCH_REFUSED, "model" => name.clone()),
            slot,
            cfg,
            queue: Mutex::new(Queue::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let workers = (0..shared.cfg.workers)
            .filter_map(|w| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("batch-{name}-{w}"))
                    .spawn(move || work(&s, w))
                    .ok()
            })
            .collect();
        Batcher { shared, workers }
    }

    /// The model slot (for its label and reloads).
    pub fn slot(&self) -> &Arc<ModelSlot<M>> {
        &self.shared.slot
    }

    /// Queues one request for `room`. Refused when the queue is full (the
    /// reply's wake signal fires when there is room again) or stopped.
    pub fn submit(
        &self,
        room: &Arc<str>,
        id: u64,
        input: M::Input,
        reply: &ReplyTo<M::Output>,
    ) -> Result<(), Refused<M::Input>> {
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(Refused::Stopped(input));
        }
        let mut q = self.shared.lock();
        if q.len >= self.shared.cfg.capacity {
            if let Some(w) = &reply.wake {
                if !q.refused.iter().any(|r| Arc::ptr_eq(r, w)) {
                    q.refused.push(w.clone());
                }
            }
            self.shared.refused.increment(1);
            return Err(Refused::Full(input));
        }
        q.push(
            room,
            Pending {
                id,
                input,
                reply: reply.clone(),
                queued: Instant::now(),
            },
        );
        self.shared.queued.set(q.len as f64);
        let full = q.len >= self.shared.cfg.max_batch;
        drop(q);
        if full {
            self.shared.ready.notify_one();
        } else {
            // A first request starts the delay clock of a sleeping worker.
            self.shared.ready.notify_all();
        }
        Ok(())
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.shared.lock().len
    }
}

/// A batcher as its callers see it, whatever model and backend serve it.
pub trait Submit<I, O>: Send + Sync {
    /// See [`Batcher::submit`].
    fn submit(
        &self,
        room: &Arc<str>,
        id: u64,
        input: I,
        reply: &ReplyTo<O>,
    ) -> Result<(), Refused<I>>;
    /// `name@version` of the version serving now.
    fn label(&self) -> Arc<str>;
    /// Requests waiting now.
    fn queued(&self) -> usize;
}

impl<M: BatchModel> Submit<M::Input, M::Output> for Batcher<M> {
    fn submit(
        &self,
        room: &Arc<str>,
        id: u64,
        input: M::Input,
        reply: &ReplyTo<M::Output>,
    ) -> Result<(), Refused<M::Input>> {
        Batcher::submit(self, room, id, input, reply)
    }

    fn label(&self) -> Arc<str> {
        self.shared.slot.label()
    }

    fn queued(&self) -> usize {
        Batcher::queued(self)
    }
}

impl<M: BatchModel> Drop for Batcher<M> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<M: BatchModel> Shared<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<M::Input, M::Output>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a batch: full, or the oldest request past its delay, or
    /// (once stopping) whatever is left. None when stopped and empty.
    fn next_batch(&self) -> Option<Vec<Pending<M::Input, M::Output>>> {
        let mut q = self.lock();
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            if q.len >= self.cfg.max_batch || (stopping && q.len > 0) {
                break;
            }
            if stopping {
                return None;
            }
            match q.oldest() {
                Some(t) => {
                    let due = t + self.cfg.max_delay;
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    q = self
                        .ready
                        .wait_timeout(q, due - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
        let batch = q.take(self.cfg.max_batch);
        self.queued.set(q.len as f64);
        let refused = std::mem::take(&mut q.refused);
        drop(q);
        for w in refused {
            w.notify_one();
        }
        Some(batch)
    }
}

fn work<M: BatchModel>(shared: &Shared<M>, worker: usize) {
    while let Some(batch) = shared.next_batch() {
        let now = Instant::now();
        for p in &batch {
            shared
                .queue_seconds
                .record(now.duration_since(p.queued).as_secs_f64());
        }
        shared.batch_size.record(batch.len() as f64);
        let (meta, inputs): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|p| ((p.id, p.reply), p.input))
            .unzip();
        let served = shared.slot.current();
        let started = Instant::now();
        let result = served.replica(worker).run_batch(&inputs);
        shared
            .inference_seconds
            .record(started.elapsed().as_secs_f64());
        let results: Vec<Result<M::Output, ModelError>> = match result {
            Ok(outs) if outs.len() == meta.len() => outs.into_iter().map(Ok).collect(),
            Ok(outs) => {
                let msg = format!("{} outputs for {} inputs", outs.len(), meta.len());
                meta.iter()
                    .map(|_| Err(ModelError::Runtime(msg.clone())))
                    .collect()
            }
            Err(e) => {
                warn!(model = %served.label, batch = meta.len(), error = %e, "batch failed");
                let msg = e.to_string();
                meta.iter()
                    .map(|_| Err(ModelError::Runtime(msg.clone())))
                    .collect()
            }
        };
        let mut wakes: Vec<Arc<Notify>> = Vec::new();
        for ((id, reply), result) in meta.into_iter().zip(results) {
            // A closed channel means its partition left; nothing to do.
            let _ = reply.tx.send(Done {
                id,
                result,
                model: served.label.clone(),
            });
            if let Some(w) = reply.wake {
                if !wakes.iter().any(|x| Arc::ptr_eq(x, &w)) {
                    wakes.push(w);
                }
            }
        }
        for w in wakes {
            w.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::mpsc::channel;

    /// What a test's model records and waits on, by the version number the
    /// test gives its model directory (tests run in parallel).
    #[derive(Clone, Default)]
    struct Hooks {
        batches: Arc<Mutex<Vec<Vec<u64>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    static HOOKS: Mutex<Option<HashMap<u64, Hooks>>> = Mutex::new(None);

    /// Adds 1000 x its version to each input: the pure logic of batching,
    /// not a model's arithmetic. Runs only while its gate is open.
    struct AddVersion {
        version: u64,
        hooks: Hooks,
    }

    impl Servable for AddVersion {
        fn load(dir: &Path, _threads: usize) -> Result<Self, ModelError> {
            let version = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ModelError::Runtime("bad dir".into()))?;
            let hooks = HOOKS
                .lock()
                .unwrap()
                .get_or_insert_default()
                .entry(version)
                .or_default()
                .clone();
            Ok(AddVersion { version, hooks })
        }
        fn smoke(&mut self) -> Result<(), ModelError> {
            Ok(())
        }
    }

    impl BatchModel for AddVersion {
        type Input = u64;
        type Output = u64;
        fn run_batch(&mut self, inputs: &[u64]) -> Result<Vec<u64>, ModelError> {
            let (lock, cv) = &*self.hooks.gate;
            let _open = cv.wait_while(lock.lock().unwrap(), |open| !*open).unwrap();
            self.hooks.batches.lock().unwrap().push(inputs.to_vec());
            Ok(inputs.iter().map(|i| i + self.version * 1000).collect())
        }
    }

    /// A model directory with one version, and that version's hooks.
    fn slot(version: u64, gate_open: bool) -> (Arc<ModelSlot<AddVersion>>, Hooks) {
        let d = std::env::temp_dir()
            .join(format!("onair-batcher-{}-{version}", std::process::id()))
            .join("add");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(version.to_string())).unwrap();
        let hooks = Hooks::default();
        *hooks.gate.0.lock().unwrap() = gate_open;
        HOOKS
            .lock()
            .unwrap()
            .get_or_insert_default()
            .insert(version, hooks.clone());
        (ModelSlot::open(&d, 1, 1).unwrap(), hooks)
    }

    fn open(hooks: &Hooks) {
        *hooks.gate.0.lock().unwrap() = true;
        hooks.gate.1.notify_all();
    }

    #[test]
    fn round_robin_takes_one_request_per_room_in_turn() {
        let mut q: Queue<u64, u64> = Queue::new();
        let (tx, _rx) = channel();
        let reply = ReplyTo { tx, wake: None };
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let c: Arc<str> = "c".into();
        for (room, ids) in [(&a, 0..5), (&b, 10..12), (&c, 20..21)] {
            for id in ids {
                q.push(
                    room,
                    Pending {
                        id,
                        input: id,
                        reply: reply.clone(),
                        queued: Instant::now(),
                    },
                );
            }
        }
        let ids = |v: Vec<Pending<u64, u64>>| v.into_iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(q.take(4)), [0, 10, 20, 1]);
        assert_eq!(ids(q.take(4)), [11, 2, 3, 4]);
        assert_eq!(q.len, 0);
        assert!(q.order.is_empty() && q.rooms.is_empty());
    }

    #[test]
    fn batches_fill_or_time_out_and_replies_name_the_version() {
        let (slot, hooks) = slot(1, true);
        let b = Batcher::start(
            slot,
            BatchConfig {
                max_batch: 4,
                max_delay: Duration::from_millis(50),
                capacity: 64,
                workers: 1,
            },
        );
        let (tx, rx) = channel();
        let reply = ReplyTo { tx, wake: None };
        let room: Arc<str> = "r".into();
        for id in 0..9 {
            b.submit(&room, id, id, &reply).unwrap();
        }
        let mut got: Vec<_> = (0..9)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_by_key(|d| d.id);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.id, i as u64);
            assert_eq!(*d.result.as_ref().unwrap(), d.id + 1000);
            assert_eq!(&*d.model, "add@1");
        }
        let sizes: Vec<usize> = hooks.batches.lock().unwrap().iter().map(Vec::len).collect();
        // Full batches as soon as they fill, the ninth request after the delay.
        assert_eq!(sizes, [4, 4, 1]);
    }

    #[test]
    fn a_full_queue_refuses_and_wakes_the_refused_once_space_frees() {
        let (slot, hooks) = slot(2, false);
        let b = Batcher::start(
            slot,
            BatchConfig {
                max_batch: 2,
                max_delay: Duration::from_secs(3600),
                capacity: 4,
                workers: 1,
            },
        );
        let wake = Arc::new(Notify::new());
        let (tx, rx) = channel();
        let reply = ReplyTo {
            tx,
            wake: Some(wake.clone()),
        };
        let room: Arc<str> = "r".into();
        b.submit(&room, 0, 0, &reply).unwrap();
        b.submit(&room, 1, 1, &reply).unwrap();
        // The worker takes the first batch and waits at the gate.
        let t = Instant::now();
        while b.queued() > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "worker never took the batch"
            );
            std::thread::yield_now();
        }
        for id in 2..6 {
            b.submit(&room, id, id, &reply).unwrap();
        }
        assert_eq!(b.submit(&room, 6, 6, &reply), Err(Refused::Full(6)));
        assert_eq!(b.queued(), 4);
        open(&hooks);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), wake.notified())
                .await
                .expect("the refused submitter is woken when space frees")
        });
        let mut ids: Vec<u64> = (0..6)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap().id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
    }
}
