//! Operations, checked with the real tools:
//! - the Prometheus configuration and alert rules in `deploy/` pass
//!   `promtool check config`, `check rules` and the rules' unit tests
//!   (`deploy/alerts_test.yml`);
//! - a real Prometheus (Debian's package, which `scripts/setup` installs)
//!   scrapes a running engine on loopback, and its HTTP API returns the
//!   engine's series with the values the engine reports;
//! - every metric the Grafana dashboard's panels and the alert rules query is
//!   on a running engine's `/metrics` (the shipped pipeline, both stages);
//! - `onair topics` creates every topic on the local broker with the stated
//!   partitions and configs, as the broker's own answers show;
//! - `docker compose config` accepts docker-compose.yml, and its `topics`
//!   service's command works here.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{Proc, Topics};
use rdkafka::producer::{FutureProducer, FutureRecord};

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

/// `onair topics` against a pipeline: (exit status, stdout, stderr).
fn onair_topics(pipeline: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_onair"))
        .args(["topics", "--brokers", &common::brokers(), "--pipeline"])
        .arg(pipeline)
        .args(extra)
        .output()
        .expect("run onair topics");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the broker itself says, read with rdkafka's own clients (not
/// onair's): every topic's partition count from metadata (all topics asked
/// for: naming an unknown one would create it on noida), and the configs of
/// `names` from DescribeConfigs.
fn broker_view(
    names: &[String],
) -> (
    HashMap<String, usize>,
    HashMap<String, HashMap<String, String>>,
) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", common::brokers());
    let consumer: BaseConsumer = cfg.create().expect("metadata client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    if names.is_empty() {
        return (partitions, HashMap::new());
    }
    let admin: AdminClient<DefaultClientContext> = cfg.create().expect("admin client");
    let specs: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let described = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(admin.describe_configs(specs.iter(), &AdminOptions::new()))
        .expect("describe configs");
    let configs = names
        .iter()
        .zip(described)
        .map(|(name, d)| {
            let resource = d.unwrap_or_else(|e| panic!("describe configs of {name}: {e}"));
            let entries = resource
                .entries
                .into_iter()
                .filter_map(|e| Some((e.name, e.value?)))
                .collect();
            (name.clone(), entries)
        })
        .collect();
    (partitions, configs)
}

/// Creates one topic with rdkafka's admin client, as something other than
/// onair might have.
fn create_topic(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(admin.create_topics([&topic], &AdminOptions::new()))
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create {t}: {e}"));
    }
}

/// `onair topics` (what docker-compose.yml's `topics` service runs) on the
/// local broker: every topic of the pipeline exists afterwards with the
/// stated partitions and configs, as the broker's own answers (metadata,
/// DescribeConfigs) show; a second run changes nothing and passes; a topic
/// that already exists with another partition count or cleanup policy makes
/// it fail and names the difference. (noida-db 0.2.3 answers DescribeConfigs
/// per topic with the configs it was created with, and the defaults,
/// `cleanup.policy=delete` among them, for the rest.)
#[test]
fn topics_command_creates_every_topic_with_its_settings() {
    let dir = common::scratch("topics");
    let topics = Topics {
        prefix: common::unique("topics"),
    };
    let pipeline = common::pipeline(&dir, &topics, "");
    // The stated settings, as docs/OPERATIONS.md and docs/SCHEMAS.md give them.
    let big = "67108864";
    let want: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "video",
            vec![("max.message.bytes", big), ("retention.ms", "86400000")],
        ),
        (
            "audio",
            vec![("max.message.bytes", big), ("retention.ms", "86400000")],
        ),
        ("comments", vec![]),
        ("actions", vec![]),
        ("short-video-actions", vec![]),
        ("room-stats", vec![]),
        ("transcripts", vec![]),
        ("room-features", vec![]),
        ("training-samples", vec![]),
        ("highlight-scores", vec![]),
        ("highlights", vec![]),
        ("user-actions", vec![]),
        ("room-embeddings", vec![("cleanup.policy", "compact")]),
        ("gift-predictions", vec![]),
        ("user-sequences", vec![("cleanup.policy", "compact")]),
        (
            "user-state",
            vec![("cleanup.policy", "compact"), ("max.message.bytes", big)],
        ),
        (
            "room-state",
            vec![("cleanup.policy", "compact"), ("max.message.bytes", big)],
        ),
        ("dead-letters", vec![("max.message.bytes", big)]),
    ];
    let names: Vec<String> = want.iter().map(|(t, _)| topics.name(t)).collect();
    // Every topic the pipeline names is in that list.
    let text = std::fs::read_to_string(&pipeline).expect("pipeline");
    let parsed: toml::Table = text.parse().expect("pipeline is TOML");
    let mut named: Vec<String> = parsed["kafka"]["topics"]
        .as_table()
        .expect("[kafka.topics]")
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    named.sort();
    let mut listed = names.clone();
    listed.sort();
    assert_eq!(named, listed, "the topics the pipeline names");

    let retention = ["--media-retention-ms", "86400000"];
    let (ok, first, err) = onair_topics(&pipeline, &retention);
    assert!(ok, "onair topics failed:\n{first}{err}");
    for name in &names {
        let row = first
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no row for {name}:\n{first}"));
        assert!(row.ends_with(" ok"), "{row}");
    }

    let check = |when: &str| {
        let (partitions, configs) = broker_view(&names);
        for ((topic, stated), name) in want.iter().zip(&names) {
            assert_eq!(
                partitions.get(name),
                Some(&4),
                "{when}: partitions of {name}"
            );
            let got = &configs[name];
            for (k, v) in stated {
                assert_eq!(
                    got.get(*k).map(String::as_str),
                    Some(*v),
                    "{when}: {name} {k}"
                );
            }
            if !stated.iter().any(|(k, _)| *k == "cleanup.policy") {
                assert_eq!(
                    got.get("cleanup.policy").map(String::as_str),
                    Some("delete"),
                    "{when}: {topic} is not compacted"
                );
            }
        }
    };
    check("after the first run");
    let (ok, second, err) = onair_topics(&pipeline, &retention);
    assert!(ok, "second run failed:\n{second}{err}");
    assert_eq!(second, first, "a second run reports the same");
    check("after the second run");

    // Topics made beforehand by someone else, one with 2 partitions, one not
    // compacted: the run creates the rest, then fails and says what differs.
    let other = Topics {
        prefix: common::unique("topics-wrong"),
    };
    let pipeline = common::pipeline(&common::scratch("topics-wrong"), &other, "");
    create_topic(&other.name("comments"), 2, &[]);
    create_topic(
        &other.name("room-embeddings"),
        4,
        &[("cleanup.policy", "delete")],
    );
    let (ok, table, err) = onair_topics(&pipeline, &[]);
    assert!(!ok, "a wrong topic passed:\n{table}");
    let row = |t: &str| {
        let name = other.name(t);
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_string()
    };
    assert!(row("comments").contains("2 (want 4)"), "{table}");
    assert!(row("comments").ends_with("DIFFERS"), "{table}");
    assert!(
        row("room-embeddings").contains("cleanup.policy=delete (want compact)"),
        "{table}"
    );
    assert!(row("actions").ends_with(" ok"), "{table}");
    assert!(
        err.contains("2 of 18 topics differ") && err.contains(&other.name("comments")),
        "{err}"
    );
    let (partitions, _) = broker_view(&[]);
    assert_eq!(
        partitions.get(&other.name("comments")),
        Some(&2),
        "left as it was"
    );
    assert_eq!(
        partitions.get(&other.name("video")),
        Some(&4),
        "the rest created"
    );
}

/// Docker Compose's binary, where scripts/setup links it.
fn docker_compose() -> std::path::PathBuf {
    let cache = std::env::var_os("ONAIR_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/onair")
        });
    let bin = cache.join("bin/docker-compose");
    assert!(
        bin.exists(),
        "{} is missing: scripts/setup installs Docker Compose",
        bin.display()
    );
    bin
}

/// `docker compose <args>` on docker-compose.yml with none of its settings
/// set (so the defaults are what is checked): (success, stdout, stderr).
fn compose(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(docker_compose());
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--file", "docker-compose.yml"])
        .args(args);
    for var in [
        "ONAIR_TAG",
        "ONAIR_LOG",
        "ONAIR_BIND",
        "ONAIR_PARTITIONS",
        "ONAIR_MEDIA_RETENTION_MS",
        "KAFKA_CLUSTER_ID",
        "GRAFANA_ADMIN_USER",
        "GRAFANA_ADMIN_PASSWORD",
        "COMPOSE_PROFILES",
        "COMPOSE_FILE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run docker-compose");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `docker compose config` accepts docker-compose.yml without a warning and
/// finds every service (the simulator under the `load` profile); the one-shot
/// `topics` service runs the onair image's `onair topics`, and that very
/// command (its broker and pipeline swapped for the local broker and a test
/// pipeline, its environment as compose sets it) succeeds here.
#[test]
fn docker_compose_config_passes() {
    let (ok, out, err) = compose(&["config", "--quiet"]);
    assert!(ok && err.trim().is_empty(), "compose config:\n{out}{err}");
    let services = |profile: &[&str]| {
        let mut args = profile.to_vec();
        args.extend(["config", "--services"]);
        let (ok, out, err) = compose(&args);
        assert!(ok, "compose config --services:\n{err}");
        let mut s: Vec<String> = out.lines().map(String::from).collect();
        s.sort();
        s
    };
    assert_eq!(
        services(&[]),
        ["grafana", "kafka", "onair", "prometheus", "topics"]
    );
    assert_eq!(
        services(&["--profile", "load"]),
        [
            "grafana",
            "kafka",
            "onair",
            "prometheus",
            "simulator",
            "topics"
        ]
    );

    let (ok, json, err) = compose(&["config", "--format", "json"]);
    assert!(ok, "{err}");
    let config: serde_json::Value = serde_json::from_str(&json).expect("compose JSON");
    let topics = &config["services"]["topics"];
    let onair = &config["services"]["onair"];
    assert_eq!(
        topics["image"], onair["image"],
        "topics runs the onair image"
    );
    assert_eq!(topics["build"], onair["build"]);
    assert!(
        topics["entrypoint"].is_null(),
        "the image's entrypoint (onair)"
    );
    let dockerfile = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    assert!(
        dockerfile.contains("ENTRYPOINT [\"onair\"]"),
        "Dockerfile entrypoint"
    );
    assert_eq!(
        onair["depends_on"]["topics"]["condition"],
        "service_completed_successfully"
    );
    let mut args: Vec<String> = topics["command"]
        .as_array()
        .expect("topics command")
        .iter()
        .map(|a| a.as_str().expect("string argument").to_string())
        .collect();
    assert_eq!(args[0], "topics", "{args:?}");
    let dir = common::scratch("compose-topics");
    let prefix = Topics {
        prefix: common::unique("compose-topics"),
    };
    let pipeline = common::pipeline(&dir, &prefix, "");
    for (flag, value) in [
        ("--brokers", common::brokers()),
        ("--pipeline", pipeline.display().to_string()),
    ] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        assert!(
            flag != "--pipeline" || std::path::Path::new(&args[i + 1]).exists(),
            "{} is not in the repo (the image copies pipelines/)",
            args[i + 1]
        );
        args[i + 1] = value;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onair"));
    cmd.args(&args);
    for (k, v) in topics["environment"].as_object().expect("environment") {
        cmd.env(k, v.as_str().unwrap_or_default());
    }
    let out = cmd.output().expect("run onair topics");
    assert!(
        out.status.success(),
        "the topics service's command failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names a PromQL expression reads: its identifiers, less
/// functions (followed by `(`), aggregations, keywords, the label lists of
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, label matchers
/// (`{...}`), ranges (`[...]`), strings, numbers and Grafana's `$variables`.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Operators, numbers, and the aggregations (whose `(` may follow a `by` list).
    const KEYWORDS: [&str; 22] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    // Index just past the bracket that closes the one at `i`.
    let close = |mut i: usize, open: char, shut: char| {
        let mut depth = 0;
        let mut quote = None;
        while i < c.len() {
            match (quote, c[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), ch) if ch == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'' | '`') => quote = Some(c[i]),
                (None, ch) if ch == open => depth += 1,
                (None, ch) if ch == shut => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '{' => i = close(i, '{', '}'),
            '[' => i = close(i, '[', ']'),
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            ch if ch == '$' || ch.is_ascii_digit() || ch == '.' => {
                i += 1;
                while i < c.len() && (ident(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ident(ch) => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let call = j < c.len() && c[j] == '(';
                if LISTS.contains(&word.as_str()) {
                    if call {
                        i = close(j, '(', ')');
                    }
                } else if !call && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_names_are_found() {
    let names = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names("histogram_quantile(0.95, sum by (stage, le) (rate(onair_stage_latency_seconds_bucket{stage!~\"a|b\"}[$__rate_interval])))"),
        ["onair_stage_latency_seconds_bucket"]
    );
    assert_eq!(
        names("sum by (instance) (rate(a_total[5m])) > 0\n  unless on(instance) sum by (instance) (b_total offset 1h) > 1e3"),
        ["a_total", "b_total"]
    );
    assert_eq!(names("max by (model, version) (x) == 1"), ["x"]);
}

/// Every PromQL expression of the Grafana dashboard (its panels' targets,
/// rows included) and of the alert rules (`expr:` in deploy/alerts.yml).
fn dashboard_and_alert_queries() -> Vec<(String, String)> {
    fn panels(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in v.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let text = std::fs::read_to_string("deploy/grafana/provisioning/dashboards/onair.json")
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    let panels_found = out.len();
    assert!(panels_found >= 20, "{panels_found} panel queries");
    // The rules file's `expr:` values, inline or as block scalars.
    let rules = std::fs::read_to_string("deploy/alerts.yml").expect("alert rules");
    let lines: Vec<&str> = rules.lines().collect();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        if let Some(rest) = t.strip_prefix("expr:") {
            let indent = lines[i].len() - t.len();
            let rest = rest.trim();
            let mut expr = String::new();
            if rest.starts_with('|') || rest.starts_with('>') {
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty()
                        || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    expr.push_str(lines[i].trim());
                    expr.push('\n');
                }
            } else {
                expr.push_str(rest);
            }
            out.push((format!("alert {alert}"), expr));
        }
        i += 1;
    }
    assert_eq!(out.len() - panels_found, 5, "the five alert rules");
    out
}

/// The sample names a `/metrics` page holds (histograms as their `_bucket`,
/// `_sum` and `_count` series).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// The shipped pipeline (pipelines/kafka.toml: every operator on, the
/// committed models) with a test's broker, topics and runtime settings, and
/// `simulator` for `onair simulate`.
fn shipped_pipeline(dir: &std::path::Path, topics: &Topics, simulator: &str) -> std::path::PathBuf {
    let path = common::pipeline(dir, topics, simulator);
    let test: toml::Table = std::fs::read_to_string(&path)
        .expect("test pipeline")
        .parse()
        .expect("TOML");
    let mut full: toml::Table = std::fs::read_to_string("pipelines/kafka.toml")
        .expect("pipelines/kafka.toml")
        .parse()
        .expect("TOML");
    for table in ["kafka", "simulator"] {
        full.insert(table.into(), test[table].clone());
    }
    let runtime = full["runtime"].as_table_mut().expect("[runtime]");
    for (k, v) in test["runtime"].as_table().expect("[runtime]") {
        runtime.insert(k.clone(), v.clone());
    }
    std::fs::write(&path, full.to_string()).expect("write pipeline");
    path
}

/// Every metric the dashboard's panels and the alert rules query exists on a
/// running engine: the shipped pipeline (both stages, every operator and
/// model) reads simulated rooms and users and one poison record through the
/// local broker, and once it has written outputs, `/metrics` must hold every
/// name the queries read. The poison record's dead letter counts in the
/// series registered at zero at start (the same labels, not a second series).
#[test]
fn every_dashboard_and_alert_metric_exists_on_a_running_engine() {
    let started = Instant::now();
    let queries = dashboard_and_alert_queries();
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, expr) in &queries {
        let names = promql_metrics(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr:?}");
        for n in names {
            wanted.entry(n).or_default().push(place.clone());
        }
    }

    let dir = common::scratch("dashboard");
    let topics = Topics {
        prefix: common::unique("dashboard"),
    };
    let pipeline = shipped_pipeline(
        &dir,
        &topics,
        "[simulator]\nshort_videos = true\nvideo_width = 256\nvideo_height = 144\nvideo_fps = 5\nsegment_ms = 2000\n",
    );
    common::create_topics(&pipeline);
    let comments = topics.name("comments");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("producer");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(
            producer.send(
                FutureRecord::to(&comments)
                    .key("room-0001")
                    .payload(&[0xffu8, 0xff, 0xff, 0x0f][..]),
                Duration::from_secs(10),
            ),
        )
        .expect("produce the poison record");
    let engine = Proc::engine(&dir, &pipeline, "engine");
    let sim = Proc::simulate(
        &dir,
        &pipeline,
        &["--rooms", "4", "--duration", "30s", "--speed", "0"],
    );

    let dead = [("reason", "malformed"), ("topic", comments.as_str())];
    let deadline = Instant::now() + Duration::from_secs(100);
    let (missing, text) = loop {
        let text = engine.scrape().unwrap_or_default();
        let have = exposed(&text);
        let missing: Vec<&String> = wanted.keys().filter(|n| !have.contains(*n)).collect();
        let dead_letter = common::metric(&text, "onair_dead_letters_total", &dead);
        let written = common::metric(&text, "onair_stage_sent_total", &[("stage", "sink")]);
        let running = dead_letter == Some(1.0) && written.is_some_and(|n| n > 0.0);
        if (missing.is_empty() && running) || Instant::now() > deadline {
            break (missing, text);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    std::fs::write(dir.join("metrics.txt"), &text).expect("keep the scrape");
    let listed: Vec<String> = missing
        .iter()
        .map(|n| format!("{n} (in {})", wanted[*n].join(", ")))
        .collect();
    assert!(
        listed.is_empty(),
        "not on /metrics after {:?}:\n  {}\nengine log:\n{}",
        started.elapsed(),
        listed.join("\n  "),
        engine.log_tail()
    );
    let series = text
        .lines()
        .filter(|l| {
            l.starts_with("onair_dead_letters_total{")
                && dead
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .count();
    assert_eq!(series, 1, "one dead-letter series for the poison's labels");
    assert_eq!(
        common::metric(&text, "onair_dead_letters_total", &dead),
        Some(1.0),
        "the poison record's dead letter"
    );
    drop(sim);
    eprintln!(
        "{} metrics of {} queries found in {:?}",
        wanted.len(),
        queries.len(),
        started.elapsed()
    );
}

/// `*` within one path segment; everything else literally.
fn glob(pattern: &str, path: &str) -> bool {
    let (p, s): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    p.len() == s.len()
        && p.iter().zip(&s).all(|(p, s)| {
            let parts: Vec<&str> = p.split('*').collect();
            let (first, last) = (parts[0], parts[parts.len() - 1]);
            if parts.len() == 1 {
                return p == s;
            }
            let mut rest = match s.strip_prefix(first) {
                Some(r) => r,
                None => return false,
            };
            for mid in &parts[1..parts.len() - 1] {
                match rest.find(mid) {
                    Some(i) => rest = &rest[i + mid.len()..],
                    None => return false,
                }
            }
            rest.len() >= last.len() && rest.ends_with(last)
        })
}

#[test]
fn the_image_carries_every_model_the_shipped_pipeline_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = onair::config::PipelineConfig::load(&root.join("pipelines/kafka.toml"))
        .expect("pipelines/kafka.toml");
    let ops = &cfg.operators;
    let models = [
        &ops.speech.whisper_model,
        &ops.speech.vad_model,
        &ops.features.image_model,
        &ops.features.text_model,
        &ops.highlight.model,
        &ops.mmbee.model,
        &ops.mmbee.graph,
        &ops.user_sequences.interests_model,
    ];
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    // The runtime stage's destinations under /app.
    let runtime = dockerfile
        .split("AS runtime")
        .nth(1)
        .expect("a runtime stage");
    let copied: Vec<&str> = runtime
        .lines()
        .filter(|l| l.starts_with("COPY"))
        .filter_map(|l| l.split_whitespace().last()?.strip_prefix("/app/"))
        .collect();
    for m in models.iter().filter(|m| !m.is_empty()) {
        assert!(
            copied
                .iter()
                .any(|d| d.starts_with(m.as_str()) || m.starts_with(d.trim_end_matches('/'))),
            "{m} (named in pipelines/kafka.toml) is not copied into the runtime image: {copied:?}"
        );
    }
    // Committed model files the build context must not leave out.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    let listed = Command::new("git")
        .args(["ls-files", "models"])
        .current_dir(root)
        .output()
        .expect("git ls-files");
    let files = String::from_utf8_lossy(&listed.stdout).into_owned();
    let mut checked = 0;
    for f in files
        .lines()
        .filter(|f| f.ends_with(".onnx") || f.ends_with(".jsonl"))
    {
        // The last matching line decides, as Docker reads .dockerignore.
        let mut ignored = false;
        for line in ignore.lines().map(str::trim) {
            let (negate, pat) = match line.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, line),
            };
            if pat.is_empty() || pat.starts_with('#') {
                continue;
            }
            let hit = match pat.strip_prefix("**/") {
                Some(tail) => (0..f.matches('/').count() + 1).any(|skip| {
                    let rest: Vec<&str> = f.split('/').skip(skip).collect();
                    glob(tail, &rest.join("/"))
                }),
                None => glob(pat, f),
            };
            if hit {
                ignored = !negate;
            }
        }
        assert!(
            !ignored,
            "{f} is committed but .dockerignore leaves it out of the image"
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} committed model files found");
}
