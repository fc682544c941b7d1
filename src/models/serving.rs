//! Serving versioned models with hot reload. A model lives in a directory of
//! numbered versions, as TensorFlow Serving lays them out:
//!
//! ```text
//! models/image/1/model.onnx
//! models/image/2/model.onnx      <- the highest version that loads serves
//! ```
//!
//! A [`ModelSlot`] loads the highest version that loads and passes a smoke
//! inference, and [`ModelSlot::refresh`] (run every few seconds by
//! [`ModelSlot::watch`]) loads a newer one in the background and swaps it in
//! atomically: requests already running finish on the old version, the next
//! batch runs on the new one. A version that fails to load or fails its
//! smoke inference leaves the old one serving, counts in
//! `onair_model_loads_total{result="failed"}` and is not tried again until
//! its files change. Removing the serving version rolls back to the highest
//! one left. Write a new version under another name and rename it into place,
//! so a half-copied directory is never seen (one that is seen fails, and is
//! retried once its files change).
//!
//! Not for: running requests (the batcher does) or what a model computes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use super::ModelError;
use crate::metrics as m;

/// A model the slot can load from a version directory.
pub trait Servable: Send + Sized + 'static {
    /// Loads the model in version directory `dir`, with `threads` intra-op
    /// threads.
    fn load(dir: &Path, threads: usize) -> Result<Self, ModelError>;

    /// Runs one inference on a fixed input, so a version that loads but
    /// cannot run never serves.
    fn smoke(&mut self) -> Result<(), ModelError>;
}

/// One loaded version: `replicas` copies of the model, one per worker, so
/// workers never wait for each other.
pub struct Served<M> {
    /// The model's name (its directory's name).
    pub name: Arc<str>,
    /// The version number.
    pub version: u64,
    /// `name@version`, the label outputs carry.
    pub label: Arc<str>,
    replicas: Vec<Mutex<M>>,
}

impl<M> Served<M> {
    /// The replica for worker `worker`. A poisoned lock (a panic inside the
    /// model library) still holds a usable session.
    pub fn replica(&self, worker: usize) -> MutexGuard<'_, M> {
        let r = &self.replicas[worker % self.replicas.len()];
        r.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a version's files looked like when it failed: retried when they change.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// How a slot loads one version directory with some intra-op threads:
/// [`Servable::load`] unless the slot was opened with another
/// ([`ModelSlot::open_with`], for models that need more than their directory).
pub type Loader<M> = Arc<dyn Fn(&Path, usize) -> Result<M, ModelError> + Send + Sync>;

/// The serving version of one model, swapped atomically on reload.
pub struct ModelSlot<M> {
    name: Arc<str>,
    dir: PathBuf,
    replicas: usize,
    threads: usize,
    loader: Loader<M>,
    current: ArcSwap<Served<M>>,
    failed: Mutex<HashMap<u64, Stamp>>,
}

impl<M> std::fmt::Debug for ModelSlot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlot")
            .field("dir", &self.dir)
            .field("serving", &self.current.load().label)
            .finish_non_exhaustive()
    }
}

impl<M: Servable> ModelSlot<M> {
    /// Opens the model directory `dir` (its last path component names the
    /// model) and loads the highest version that works, with `replicas`
    /// copies of `threads` intra-op threads each. Fails when no version works.
    pub fn open(dir: &Path, replicas: usize, threads: usize) -> Result<Arc<Self>, ModelError> {
        Self::open_with(
            dir,
            replicas,
            threads,
            Arc::new(|d: &Path, t| M::load(d, t)),
        )
    }

    /// As [`Self::open`], loading every version (the first and each reload)
    /// with `loader`.
    pub fn open_with(
        dir: &Path,
        replicas: usize,
        threads: usize,
        loader: Loader<M>,
    ) -> Result<Arc<Self>, ModelError> {
        let name = model_name(dir);
        let missing = |reason: String| ModelError::Missing {
            path: dir.display().to_string(),
            reason,
        };
        let versions = versions(dir).map_err(|e| missing(format!("cannot list versions: {e}")))?;
        if versions.is_empty() {
            return Err(missing(
                "no version directories (numbered subdirectories such as 1/)".into(),
            ));
        }
        let mut failed = HashMap::new();
        let mut last_error = None;
        for &v in versions.iter().rev() {
            match load_version::<M>(&name, dir, v, replicas, threads, &loader) {
                Ok(served) => {
                    let slot = Arc::new(ModelSlot {
                        name,
                        dir: dir.to_path_buf(),
                        replicas,
                        threads,
                        loader,
                        current: ArcSwap::from_pointee(served),
                        failed: Mutex::new(failed),
                    });
                    slot.announce(None);
                    return Ok(slot);
                }
                Err(e) => {
                    failed.insert(v, stamp(&dir.join(v.to_string())));
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| missing("no version loads".into())))
    }

    /// The version serving now. Hold the `Arc` for one batch, not longer, or
    /// a replaced version stays in memory.
    pub fn current(&self) -> Arc<Served<M>> {
        self.current.load_full()
    }

    /// `name@version` of the serving version.
    pub fn label(&self) -> Arc<str> {
        self.current.load().label.clone()
    }

    /// The model's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Looks at the directory once: when the highest version present is not
    /// the one serving (a new one, or the serving one was removed), loads it
    /// and swaps it in. Returns the new label when it swapped. A failed load
    /// is logged and counted, and the old version keeps serving.
    pub fn refresh(&self) -> Option<Arc<str>> {
        let serving = self.current.load().version;
        let versions = match versions(&self.dir) {
            Ok(v) => v,
            Err(e) => {
                warn!(model = %self.name, dir = %self.dir.display(), error = %e, "cannot list model versions");
                return None;
            }
        };
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        // The highest version not known to fail with its present files.
        let want = versions.iter().rev().copied().find(|v| {
            failed
                .get(v)
                .is_none_or(|s| *s != stamp(&self.dir.join(v.to_string())))
        })?;
        if want == serving {
            return None;
        }
        let vdir = self.dir.join(want.to_string());
        let before = stamp(&vdir);
        match load_version::<M>(
            &self.name,
            &self.dir,
            want,
            self.replicas,
            self.threads,
            &self.loader,
        ) {
            Ok(served) => {
                failed.remove(&want);
                let old = self.current.swap(Arc::new(served));
                self.announce(Some(&old));
                Some(self.label())
            }
            Err(e) => {
                failed.insert(want, before);
                error!(
                    model = %self.name,
                    version = want,
                    serving = %self.label(),
                    error = %e,
                    "model version failed to load; the serving version stays"
                );
                None
            }
        }
    }

    /// Runs [`Self::refresh`] every `every` on a background thread until the
    /// returned guard is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let slot = Arc::downgrade(self);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("reload-{}", self.name))
            .spawn(move || {
                let step = Duration::from_millis(50).min(every);
                let mut waited = Duration::ZERO;
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(step);
                    waited += step;
                    if waited < every {
                        continue;
                    }
                    waited = Duration::ZERO;
                    match slot.upgrade() {
                        Some(slot) => {
                            slot.refresh();
                        }
                        None => break,
                    }
                }
            })
            .ok();
        Watch { stop, thread }
    }

    fn announce(&self, old: Option<&Served<M>>) {
        let now = self.current.load();
        if let Some(old) = old {
            metrics::gauge!(m::MODEL_SERVING, "model" => self.name.to_string(), "version" => old.version.to_string()).set(0.0);
        }
        metrics::gauge!(m::MODEL_SERVING, "model" => self.name.to_string(), "version" => now.version.to_string()).set(1.0);
        info!(
            model = %self.name,
            serving = %now.label,
            replaced = old.map(|o| o.label.to_string()),
            "model version serving"
        );
    }
}

/// Stops a [`ModelSlot::watch`] thread when dropped.
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loads and smoke-tests one version, counting the result.
fn load_version<M: Servable>(
    name: &Arc<str>,
    dir: &Path,
    version: u64,
    replicas: usize,
    threads: usize,
    loader: &Loader<M>,
) -> Result<Served<M>, ModelError> {
    let vdir = dir.join(version.to_string());
    let result = (|| {
        let mut models = Vec::with_capacity(replicas.max(1));
        for _ in 0..replicas.max(1) {
            let mut model = loader(&vdir, threads)?;
            model.smoke()?;
            models.push(Mutex::new(model));
        }
        Ok(Served {
            name: name.clone(),
            version,
            label: format!("{name}@{version}").into(),
            replicas: models,
        })
    })();
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    metrics::counter!(m::MODEL_LOADS, "model" => name.to_string(), "result" => outcome)
        .increment(1);
    result
}

/// `name@version` for a version directory `<models>/<name>/<version>`: the
/// label its slot gives it (for a model that needs to know its own).
pub fn version_label(vdir: &Path) -> Arc<str> {
    let version = vdir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let root = vdir.parent().unwrap_or(Path::new(""));
    format!("{}@{version}", model_name(root)).into()
}

/// The name a model directory serves under (and labels its metrics with):
/// its last path component, `model` when it has none.
pub fn model_name(dir: &Path) -> Arc<str> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .into()
}

/// The highest numbered version directory under `dir` (whether or not it
/// loads), e.g. for tools and tests that read one version's files.
pub fn latest_version(dir: &Path) -> Option<PathBuf> {
    let v = *versions(dir).ok()?.last()?;
    Some(dir.join(v.to_string()))
}

/// The numbered version directories under `dir`, ascending.
fn versions(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(v) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push(v);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Names, sizes and modification times of a version directory's files.
fn stamp(dir: &Path) -> Stamp {
    let mut out: Stamp = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "model" whose whole content is the number in its `weights` file:
    /// enough to test version choice, swaps and failures without a network.
    struct Number(u64);

    impl Servable for Number {
        fn load(dir: &Path, _threads: usize) -> Result<Self, ModelError> {
            let text =
                std::fs::read_to_string(dir.join("weights")).map_err(|e| ModelError::Missing {
                    path: dir.display().to_string(),
                    reason: e.to_string(),
                })?;
            text.trim()
                .parse()
                .map(Number)
                .map_err(|e| ModelError::Missing {
                    path: dir.display().to_string(),
                    reason: format!("{e}"),
                })
        }

        fn smoke(&mut self) -> Result<(), ModelError> {
            if self.0 == 0 {
                return Err(ModelError::Runtime("smoke inference failed".into()));
            }
            Ok(())
        }
    }

    fn write(root: &Path, version: u64, content: &str) {
        let d = root.join(version.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("weights"), content).unwrap();
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir()
            .join(format!("onair-serving-{}-{name}", std::process::id()))
            .join("number");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn serves_the_highest_working_version_and_swaps_to_newer_ones() {
        let d = dir("swap");
        write(&d, 1, "11");
        write(&d, 3, "not a number");
        std::fs::create_dir_all(d.join("notes")).unwrap();
        let slot = ModelSlot::<Number>::open(&d, 2, 1).unwrap();
        assert_eq!(&*slot.label(), "number@1");
        assert_eq!(slot.current().replica(1).0, 11);
        // Nothing new: no swap, and the broken 3 is not retried.
        assert_eq!(slot.refresh(), None);
        let held = slot.current();
        write(&d, 2, "22");
        // 3 still fails with the same files, so 2 is the highest to try.
        assert_eq!(slot.refresh().as_deref(), Some("number@2"));
        assert_eq!(slot.current().replica(0).0, 22);
        // A batch that took the old version keeps it until it finishes.
        assert_eq!(held.replica(0).0, 11);
        // Fixing 3's files makes it eligible again.
        write(&d, 3, "33");
        assert_eq!(slot.refresh().as_deref(), Some("number@3"));
    }

    #[test]
    fn a_failing_version_leaves_the_old_one_serving_and_removal_rolls_back() {
        let d = dir("fail");
        write(&d, 1, "11");
        let slot = ModelSlot::<Number>::open(&d, 1, 1).unwrap();
        write(&d, 2, "0"); // loads, fails the smoke inference
        assert_eq!(slot.refresh(), None);
        assert_eq!(&*slot.label(), "number@1");
        write(&d, 3, "33");
        assert_eq!(slot.refresh().as_deref(), Some("number@3"));
        std::fs::remove_dir_all(d.join("3")).unwrap();
        assert_eq!(slot.refresh().as_deref(), Some("number@1"));
    }

    #[test]
    fn no_working_version_is_an_error() {
        let d = dir("none");
        assert!(ModelSlot::<Number>::open(&d, 1, 1).is_err());
        write(&d, 1, "0");
        assert!(ModelSlot::<Number>::open(&d, 1, 1).is_err());
    }
}
