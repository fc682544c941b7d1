//! The command line as a user meets it: `validate` reports every problem at
//! once with its path, and `demo` (the embedded default, no broker) runs the
//! whole pipeline on simulated rooms with real video and speech and checks
//! its own results against the simulator's ground truth.

mod common;

use std::process::Command;

fn onair(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_onair"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("run onair")
}

#[test]
fn shipped_pipelines_are_valid() {
    // Every pipeline file in the folder, so a new one cannot ship unchecked.
    let mut files: Vec<String> = std::fs::read_dir("pipelines")
        .expect("pipelines/")
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let out = onair(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(": ok").count(), files.len(), "{stdout}");
}

/// `onair sequences` (the compressed-interest model's training data): every
/// simulated user's day in both domains, in time order, with the model's
/// features, and the same file for the same seed and day.
#[test]
fn sequences_writes_each_users_behaviours_with_features() {
    let dir = common::scratch("sequences");
    let run = |name: &str| {
        let path = dir.join(name);
        let out = onair(&[
            "sequences",
            "--pipeline",
            "pipelines/interests-data.toml",
            "--day",
            "1",
            "--duration",
            "300s",
            "--out",
            path.to_str().expect("utf-8"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(path).expect("output")
    };
    let text = run("a.jsonl");
    assert_eq!(text, run("b.jsonl"), "not deterministic");
    let (mut live, mut short) = (0, 0);
    for line in text.lines() {
        let u: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
        let bs = u["behaviours"].as_array().expect("behaviours");
        let times: Vec<i64> = bs.iter().map(|b| b["t"].as_i64().expect("t")).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order");
        for b in bs {
            assert_eq!(b["dense"].as_array().expect("dense").len(), 12);
            match b["domain"].as_str() {
                Some("live") => live += 1,
                Some("short_video") => short += 1,
                other => panic!("domain {other:?}"),
            }
        }
    }
    assert!(
        live > 100 && short > 100,
        "{live} live, {short} short-video behaviours"
    );
}

#[test]
fn validate_lists_every_problem_with_its_path() {
    let dir = common::scratch("validate");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[runtime]\ntick_ms = 7\nqueue_capacity = \"lots\"\n[kafka]\nbrokers = \"\"\nsesion_timeout_ms = 1\n[kafka.topics]\ncomments = \"no spaces allowed\"\n",
    )
    .expect("write");
    let out = onair(&["validate", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for path in [
        "runtime.tick_ms",
        "runtime.queue_capacity",
        "kafka.brokers",
        "kafka.sesion_timeout_ms",
        "kafka.topics.comments",
    ] {
        assert!(
            text.contains(&format!("  - {path}: ")),
            "{path} not reported in:\n{text}"
        );
    }
}

#[test]
fn demo_runs_without_a_broker_and_matches_the_truth() {
    let port = common::free_port().to_string();
    let out = onair(&[
        "--log",
        "warn",
        "demo",
        "--duration",
        "6s",
        "--rooms",
        "2",
        "--speed",
        "3",
        "--quiet",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("summary: 2 rooms"), "{stdout}");
    let check = stdout
        .lines()
        .find(|l| l.starts_with("check: "))
        .expect("a check line");
    assert!(
        check.contains("(0 missing, 0 extra, 0 different)"),
        "{check}"
    );
}
