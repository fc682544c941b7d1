//! Operations, checked with the real tools:
//! - the Prometheus configuration and alert rules in `deploy/` pass
//!   `promtool check config`, `check rules` and the rules' unit tests
//!   (`deploy/alerts_test.yml`);
//! - a real Prometheus (Debian's package, which `scripts/setup` installs)
//!   scrapes a running engine on loopback, and its HTTP API returns the
//!   engine's series with the values the engine reports.

mod common;

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{Proc, Topics};

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{name}: {e} (scripts/setup installs Debian's `prometheus` package)")
        })
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    for args in [
        ["check", "config", "deploy/prometheus.yml"],
        ["check", "rules", "deploy/alerts.yml"],
        ["test", "rules", "deploy/alerts_test.yml"],
    ] {
        let out = tool("promtool", &args);
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The samples of an instant query: (labels, value) per series.
fn query(port: u16, promql: &str) -> Vec<(serde_json::Value, f64)> {
    let mut q = String::new();
    for b in promql.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => q.push(b as char),
            _ => q.push_str(&format!("%{b:02X}")),
        }
    }
    let Some(body) = common::get(port, &format!("/api/v1/query?query={q}")) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            (r["metric"].clone(), value)
        })
        .collect()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_engine() {
    let dir = common::scratch("prometheus");
    let topics = Topics {
        prefix: common::unique("prometheus"),
    };
    let pipeline = common::pipeline(&dir, &topics, "");
    Proc::simulate(
        &dir,
        &pipeline,
        &[
            "--rooms",
            "4",
            "--duration",
            "20s",
            "--speed",
            "0",
            "--fps",
            "0",
            "--no-audio",
        ],
    )
    .simulate_ok(Duration::from_secs(120));
    let engine = Proc::engine(&dir, &pipeline, "engine");

    let port = common::free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: onair\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            engine.metrics_port
        ),
    )
    .expect("prometheus config");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus (scripts/setup installs Debian's `prometheus` package)"),
    );

    // The engine reads the 20 s backlog; Prometheus must see it up and
    // find the source's count, equal to what the engine itself reports.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (up, received) = loop {
        let up = query(port, "up{job=\"onair\"}");
        let received = query(port, "sum(onair_stage_received_total{stage=\"source\"})");
        let done = up.iter().any(|(_, v)| *v == 1.0) && received.iter().any(|(_, v)| *v > 0.0);
        if done || Instant::now() > deadline {
            break (up, received);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert!(
        up.iter().any(|(_, v)| *v == 1.0),
        "Prometheus does not see the engine up: {up:?}\nprometheus log tail:\n{}\nengine log:\n{}",
        log.lines().rev().take(15).collect::<Vec<_>>().join("\n"),
        engine.log_tail()
    );
    let seen = received.first().map_or(0.0, |(_, v)| *v);
    assert!(seen > 0.0, "no source records in Prometheus: {received:?}");
    // What Prometheus stored is what the engine serves (the counter only
    // grows, so the engine's own value now is at least the stored one).
    let now = engine.scrape().expect("engine /metrics");
    let direct =
        common::metric(&now, "onair_stage_received_total", &[("stage", "source")]).unwrap_or(0.0);
    assert!(
        direct >= seen,
        "engine reports {direct}, Prometheus stored {seen}"
    );
    // Every family of the stage metrics is there, labelled by stage.
    for family in [
        "onair_stage_sent_total",
        "onair_stage_latency_seconds_count",
    ] {
        let series = query(port, family);
        assert!(
            series.iter().any(|(m, _)| m["stage"].is_string()),
            "{family}: {series:?}"
        );
    }
    drop(prometheus);
}
