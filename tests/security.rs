//! Security basics through the real binary: TLS settings in `[kafka.properties]`
//! reach the broker connection (a TLS server sees onair's Kafka request inside a
//! verified session, and a client that does not trust the server's certificate
//! sends nothing), and a SASL password given by reference (`${file:...}`) is
//! never printed, at any log level, by onair or librdkafka.
//!
//! The TLS endpoint is `openssl s_server` (scripts/setup installs openssl): no
//! broker that runs here speaks TLS, so the test stops at the first request,
//! which is what shows the settings took effect.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A self-signed certificate for 127.0.0.1 (and its key) in `dir`.
fn certificate(dir: &Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.pem")).display().to_string();
    let key = dir.join(format!("{name}.key")).display().to_string();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// `openssl s_server` on a free port: it prints what a client sends.
fn tls_server(cert: &str, key: &str) -> (Child, u16) {
    let port = common::free_port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-accept",
            &port.to_string(),
            "-cert",
            cert,
            "-key",
            key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_server");
    // Until it listens.
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// Runs `onair <command>` against `port` with `properties` (it cannot
/// succeed: no Kafka answers) and stops it after `secs`, returning everything
/// it printed at log level `log`.
fn onair(dir: &Path, command: &str, port: u16, properties: &str, log: &str, secs: u64) -> String {
    let pipeline = dir.join(format!("p{port}.toml"));
    std::fs::write(
        &pipeline,
        // No topic creation: the admin client's logs are not served, the
        // consumer's are.
        format!(
            "[source]\nkind = \"kafka\"\n\n[kafka.topics]\ncreate = false\n\n\
             [kafka.properties]\n{properties}"
        ),
    )
    .expect("pipeline");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onair"));
    cmd.arg(command);
    if command == "run" {
        cmd.arg(&pipeline).args(["--metrics-addr", "127.0.0.1:0"]);
    } else {
        cmd.arg("--pipeline")
            .arg(&pipeline)
            .args(["--wait", &format!("{secs}s")]);
    }
    let mut child = cmd
        .args(["--brokers", &format!("127.0.0.1:{port}")])
        .env("ONAIR_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onair");
    let until = Instant::now() + Duration::from_secs(secs + 10);
    while child.try_wait().expect("wait").is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        if command == "run" && Instant::now() + Duration::from_secs(10) >= until {
            let _ = child.kill();
        }
    }
    server_output(child)
}

/// Stops a process and returns what it printed.
fn server_output(mut child: Child) -> String {
    let _ = child.kill();
    let mut s = String::new();
    if let Some(mut o) = child.stdout.take() {
        let mut b = Vec::new();
        let _ = o.read_to_end(&mut b);
        s.push_str(&String::from_utf8_lossy(&b));
    }
    if let Some(mut e) = child.stderr.take() {
        let mut b = Vec::new();
        let _ = e.read_to_end(&mut b);
        s.push_str(&String::from_utf8_lossy(&b));
    }
    let _ = child.wait();
    s
}

#[test]
fn tls_settings_in_the_pipeline_file_reach_the_connection() {
    let dir = common::scratch("tls");
    let (cert, key) = certificate(&dir, "server");
    let (other, _) = certificate(&dir, "other");

    // Trusting the server's certificate: the TLS session carries onair's
    // first Kafka request (its client id is in the request header).
    let (server, port) = tls_server(&cert, &key);
    let props = format!("\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{cert}\"\n");
    let printed = onair(&dir, "topics", port, &props, "info", 4);
    let seen = server_output(server);
    assert!(
        seen.contains("onair"),
        "no Kafka request arrived over TLS; server: {seen}\nonair: {printed}"
    );

    // Trusting another certificate: the handshake fails, nothing is sent.
    let (server, port) = tls_server(&cert, &key);
    let props = format!("\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{other}\"\n");
    let printed = onair(&dir, "run", port, &props, "debug", 5);
    let seen = server_output(server);
    assert!(
        !seen.contains("onair"),
        "a request went to a server whose certificate is not trusted: {seen}"
    );
    assert!(
        printed.to_lowercase().contains("ssl") || printed.to_lowercase().contains("certificate"),
        "the refusal was not reported: {printed}"
    );
}

#[test]
fn a_sasl_password_by_reference_is_never_printed() {
    let dir = common::scratch("sasl");
    let (cert, key) = certificate(&dir, "server");
    let secret = format!("s3cret-{}-{}", std::process::id(), common::free_port());
    let file = dir.join("password");
    std::fs::write(&file, format!("{secret}\n")).expect("secret file");
    let (server, port) = tls_server(&cert, &key);
    let props = format!(
        "\"security.protocol\" = \"SASL_SSL\"\n\"ssl.ca.location\" = \"{cert}\"\n\
         \"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"onair-test\"\n\
         \"sasl.password\" = \"${{file:{}}}\"\n\"debug\" = \"all\"\n",
        file.display()
    );
    // Everything onair and librdkafka can say.
    let printed = onair(&dir, "run", port, &props, "trace", 5);
    let _ = server_output(server);
    assert!(
        printed.len() > 1000,
        "too little output to mean anything: {printed}"
    );
    assert!(
        !printed.contains(&secret),
        "the SASL password was printed:\n{printed}"
    );
    // librdkafka dumped its whole configuration (debug=all), the password
    // among it, redacted: the reference resolved and reached it.
    assert!(
        printed.contains("sasl.password = [redacted]"),
        "librdkafka's configuration was not in the output"
    );

    // A missing secret fails at start, naming the property, not a value.
    let props = "\"sasl.password\" = \"${env:ONAIR_SURELY_UNSET_7C1}\"\n";
    let printed = onair(&dir, "topics", port, props, "info", 2);
    assert!(
        printed.contains("kafka.properties.sasl.password")
            && printed.contains("ONAIR_SURELY_UNSET_7C1"),
        "{printed}"
    );
}
