//! What we ship for Prometheus is valid for Prometheus' own tool: the live
//! exposition passes `promtool check metrics`, and the rules pass
//! `promtool check rules` and their unit tests.
mod support;

use std::{
    io::Write as _,
    net::TcpListener,
    process::{Command, Stdio},
};

use support::{Daemon, http_get, run};

fn rules_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[test]
fn the_live_exposition_passes_promtool_check_metrics() {
    let daemon = Daemon::start();
    // A listener with a queued connection and an accept, so every family has series.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let _client =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let text = http_get(daemon.port, "/metrics").expect("scrape");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

#[test]
fn the_shipped_rules_pass_promtool_check_and_their_unit_tests() {
    let check = run(Command::new("promtool")
        .args(["check", "rules", "observer.rules.yml"])
        .current_dir(rules_dir()));
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = run(Command::new("promtool")
        .args(["test", "rules", "observer.rules.test.yml"])
        .current_dir(rules_dir()));
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
