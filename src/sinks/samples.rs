//! Training samples to local files, for offline training: a sink that passes
//! every output on to another sink and also appends each training sample it
//! accepts to `DIR/<task>/samples.jsonl` (one JSON object per sample) and
//! `DIR/<task>/samples.f32` (its feature row, little-endian float32; the
//! object's `row` is the row's index). numpy reads the rows with
//! `np.fromfile(path, "<f4").reshape(-1, width)`; models/highlight/data.py
//! reads both.
//!
//! `DIR/<task>/layout.json` names the rows' layout and width; a sample of
//! another layout or width is refused (logged and counted), not mixed in.
//! Files are appended to, so several runs can fill one directory; a row is
//! written before the line that points at it, and both are flushed per
//! sample, so a crash leaves at most a row without a line.
//!
//! Not for: the training-samples topic (the wrapped sink writes that) or
//! exactly-once files: a sample replayed after a crash is appended again
//! (same `id`; readers keep the last per id).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metrics::counter;
use prost::Message;

use super::{Ack, Busy, Sink};
use crate::metrics::STAGE_ERRORS;
use crate::runtime::{Output, OutputTopic};
use crate::schema::TrainingSample;

/// One task's pair of files.
struct TaskFiles {
    lines: BufWriter<File>,
    rows: BufWriter<File>,
    layout: String,
    width: usize,
    next_row: u64,
}

impl TaskFiles {
    fn open(dir: &Path, layout: &str, width: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let want = serde_json::json!({ "feature_layout": layout, "width": width });
        let meta = dir.join("layout.json");
        match std::fs::read_to_string(&meta) {
            Ok(text) => {
                let have: serde_json::Value =
                    serde_json::from_str(&text).map_err(std::io::Error::other)?;
                if have != want {
                    return Err(std::io::Error::other(format!(
                        "{} holds {have}, not {want}",
                        meta.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&meta, format!("{want}\n"))?;
            }
            Err(e) => return Err(e),
        }
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
        };
        let rows = open("samples.f32")?;
        let bytes = rows.metadata()?.len();
        let row_bytes = (width * 4) as u64;
        if bytes % row_bytes != 0 {
            return Err(std::io::Error::other(format!(
                "{}: {bytes} bytes is not a whole number of {width}-value rows",
                dir.join("samples.f32").display()
            )));
        }
        Ok(TaskFiles {
            lines: BufWriter::new(open("samples.jsonl")?),
            rows: BufWriter::new(rows),
            layout: layout.to_owned(),
            width,
            next_row: bytes / row_bytes,
        })
    }

    fn append(&mut self, s: &TrainingSample) -> std::io::Result<()> {
        if s.features.len() != self.width || s.feature_layout != self.layout {
            return Err(std::io::Error::other(format!(
                "a {} sample of layout {:?} has {} features, not {} of {:?}",
                s.task,
                s.feature_layout,
                s.features.len(),
                self.width,
                self.layout
            )));
        }
        let mut bytes = Vec::with_capacity(self.width * 4);
        for v in &s.features {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.rows.write_all(&bytes)?;
        self.rows.flush()?;
        let mut models = s.model_version.splitn(2, ',');
        let mut line = serde_json::json!({
            "id": s.id,
            "task": s.task,
            "room_id": s.room_id,
            "user_id": s.user_id,
            "streamer_id": s.streamer_id,
            "tick_start_ms": s.event_time_ms,
            "tick_ms": s.tick_ms,
            "impressions": s.impressions,
            "long_views": s.long_views,
            "lvtr": s.label,
            "label": s.label,
            "long_view_ms": s.long_view_ms,
            "feature_layout": s.feature_layout,
            "row": self.next_row,
            "image_model": models.next().unwrap_or_default(),
            "text_model": models.next().unwrap_or_default(),
        });
        if let Some(obj) = line.as_object_mut() {
            let mut values: Vec<(&String, &f64)> = s.values.iter().collect();
            values.sort_by(|a, b| a.0.cmp(b.0));
            for (k, &v) in values {
                // Whole numbers as JSON integers (times, counts, ids).
                let json = if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    serde_json::Value::from(v as i64)
                } else {
                    serde_json::Value::from(v)
                };
                obj.entry(k.clone()).or_insert(json);
            }
        }
        writeln!(self.lines, "{line}")?;
        self.lines.flush()?;
        self.next_row += 1;
        Ok(())
    }
}

/// Passes outputs on to `inner` and logs training samples to files.
pub struct SampleFiles {
    inner: Arc<dyn Sink>,
    dir: PathBuf,
    tasks: Mutex<HashMap<String, TaskFiles>>,
}

impl SampleFiles {
    /// Samples go under `dir` (created when the first one comes).
    pub fn new(inner: Arc<dyn Sink>, dir: impl Into<PathBuf>) -> Self {
        SampleFiles {
            inner,
            dir: dir.into(),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn log(&self, payload: &[u8]) -> std::io::Result<()> {
        let sample = TrainingSample::decode(payload).map_err(std::io::Error::other)?;
        if sample.task.is_empty()
            || !sample
                .task
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(std::io::Error::other(format!(
                "task name {:?} is not a safe directory name",
                sample.task
            )));
        }
        let mut tasks = self
            .tasks
            .lock()
            .map_err(|_| std::io::Error::other("sample files lock poisoned"))?;
        if !tasks.contains_key(&sample.task) {
            let files = TaskFiles::open(
                &self.dir.join(&sample.task),
                &sample.feature_layout,
                sample.features.len(),
            )?;
            tasks.insert(sample.task.clone(), files);
        }
        match tasks.get_mut(&sample.task) {
            Some(files) => files.append(&sample),
            None => Ok(()),
        }
    }
}

impl Sink for SampleFiles {
    fn send(&self, output: Output, ack: Ack) -> Result<(), Box<Busy>> {
        let copy = (output.topic == OutputTopic::TrainingSamples).then(|| output.payload.clone());
        self.inner.send(output, ack)?;
        if let Some(payload) = copy {
            if let Err(e) = self.log(&payload) {
                counter!(STAGE_ERRORS, "stage" => "sample_files", "kind" => "io").increment(1);
                tracing::warn!(dir = %self.dir.display(), error = %e, "a training sample was not written to the local files");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::AckMsg;
    use tokio::sync::mpsc;

    struct Dir(PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Accept;
    impl Sink for Accept {
        fn send(&self, _output: Output, ack: Ack) -> Result<(), Box<Busy>> {
            ack.done(Ok(()));
            Ok(())
        }
    }

    fn output(id: &str, features: Vec<f32>) -> Output {
        let s = TrainingSample {
            id: id.into(),
            task: "highlight".into(),
            room_id: "r".into(),
            features,
            label: 0.5,
            model_version: "image@1,text@2".into(),
            feature_layout: "test".into(),
            ..TrainingSample::default()
        };
        Output {
            topic: OutputTopic::TrainingSamples,
            key: b"r".to_vec(),
            id: id.into(),
            payload: s.encode_to_vec(),
            headers: Vec::new(),
            model_version: None,
            tick_end_ms: None,
            depends_on: Default::default(),
        }
    }

    #[test]
    fn rows_and_lines_line_up_across_runs() {
        let dir = std::env::temp_dir().join(format!("onair-samples-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dir = Dir(dir);
        let (tx, _rx) = mpsc::unbounded_channel::<AckMsg>();
        for run in 0..2 {
            let sink = SampleFiles::new(Arc::new(Accept), dir.path());
            for i in 0..3 {
                let v = (run * 3 + i) as f32;
                let out = output(&format!("s{run}{i}"), vec![v, v + 0.5]);
                assert!(sink.send(out, Ack::new(tx.clone(), 0)).is_ok());
            }
        }
        let task = dir.path().join("highlight");
        let rows = std::fs::read(task.join("samples.f32")).expect("rows");
        let values: Vec<f32> = rows
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let lines = std::fs::read_to_string(task.join("samples.jsonl")).expect("lines");
        let lines: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 6);
        for (i, l) in lines.iter().enumerate() {
            let row = l["row"].as_u64().expect("row") as usize;
            assert_eq!(row, i);
            assert_eq!(values[row * 2], i as f32);
            assert_eq!(l["image_model"], "image@1");
            assert_eq!(l["text_model"], "text@2");
            assert_eq!(l["lvtr"], 0.5);
        }
        // A sample of another width is refused, not mixed in.
        let sink = SampleFiles::new(Arc::new(Accept), dir.path());
        assert!(sink.log(&output("x", vec![1.0; 3]).payload).is_err());
        assert!(sink.log(&output("y", vec![1.0; 2]).payload).is_ok());
    }
}
