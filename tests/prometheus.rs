//! What we ship for Prometheus is valid for Prometheus' own tool: the live
//! exposition passes `promtool check metrics`, and the rules pass
//! `promtool check rules` and their unit tests.
mod support;

use std::{net::TcpListener, process::Command};

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
    support::promtool_check_metrics(&text);
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
