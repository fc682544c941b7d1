//! The decode pool: a fixed number of blocking threads shared by every
//! partition task, so media decoding never runs on the async runtime's
//! threads and its parallelism is bounded. Each task bounds how many of its
//! payloads are queued or decoding, so the queue is bounded too.
//!
//! Not for: deciding what to decode (partition tasks do).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::error;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of decode threads.
pub struct DecodePool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
    size: usize,
}

impl DecodePool {
    /// Starts `threads` threads (0: one per core).
    pub fn new(threads: usize) -> std::io::Result<Arc<Self>> {
        let size = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(size);
        for i in 0..size {
            let rx = rx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("decode-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking decode must not take the thread (and
                            // the pool's capacity) with it.
                            Ok(job) => {
                                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                                    .is_err()
                                {
                                    error!("a decode job panicked; its payload is dropped");
                                }
                            }
                            Err(_) => return,
                        }
                    })?,
            );
        }
        Ok(Arc::new(DecodePool {
            tx: Mutex::new(Some(tx)),
            threads: handles,
            size,
        }))
    }

    /// Threads in the pool.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Queues a job; false when the pool has shut down.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        match self.tx.lock() {
            Ok(tx) => tx.as_ref().is_some_and(|tx| tx.send(Box::new(job)).is_ok()),
            Err(_) => false,
        }
    }
}

impl Drop for DecodePool {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_and_survives_a_panic() {
        let pool = DecodePool::new(2).expect("pool");
        let (tx, rx) = mpsc::channel();
        assert!(pool.submit(|| panic!("bad job")));
        for i in 0..10 {
            let tx = tx.clone();
            assert!(pool.submit(move || tx.send(i).expect("send")));
        }
        let mut got: Vec<i32> = (0..10).map(|_| rx.recv().expect("result")).collect();
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }
}
