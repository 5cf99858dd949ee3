//! The ad-hoc commands, run as a person would: `trace` against connections
//! the test makes and times, `listeners` against `ss`, `top` in a real
//! terminal (tmux), and `--help` for each.
mod support;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{listen, observer_bin, run, ss_listen_queues};

#[test]
fn trace_shows_exactly_the_connections_made_with_their_waits() {
    // The CLI loads its own programs: it works alongside a running daemon.
    let _daemon = support::Daemon::start();
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let port = listener.local_addr().expect("addr").port();
    let mut trace = Command::new(observer_bin())
        .args([
            "trace",
            "--json",
            "--port",
            &port.to_string(),
            "--count",
            "3",
            "--duration",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start observer trace");
    // It says on stderr when its programs are attached.
    let mut ready = String::new();
    BufReader::new(trace.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("read stderr");
    assert!(ready.contains("tracing"), "unexpected: {ready}");

    let mut connected_at = HashMap::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        connected_at.insert(c.local_addr().expect("addr").port(), Instant::now());
        c.write_all(b"hello").expect("write");
        clients.push(c);
    }
    let mut expected = HashMap::new();
    for sleep_ms in [100, 200, 300] {
        std::thread::sleep(Duration::from_millis(sleep_ms));
        let (_conn, peer) = listener.accept().expect("accept");
        expected.insert(
            peer.port(),
            connected_at[&peer.port()].elapsed().as_secs_f64(),
        );
    }
    let out = trace.wait_with_output().expect("trace output");
    assert!(out.status.success(), "trace exited with {}", out.status);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        let peer = l["peer"].as_str().expect("peer");
        let peer_port: u16 = peer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("peer port");
        let client_wait = expected
            .remove(&peer_port)
            .unwrap_or_else(|| panic!("{peer} is not one of our clients"));
        let wait = l["wait_seconds"].as_f64().expect("wait");
        println!("traced {peer}: waited {wait:.6} s, client measured {client_wait:.6} s");
        assert!(
            (wait - client_wait).abs() <= 0.005,
            "{peer}: traced {wait} vs {client_wait}"
        );
        assert_eq!(l["listen"], format!("127.0.0.1:{port}"));
        assert_eq!(l["pid"], std::process::id());
    }
}

#[test]
fn listeners_json_matches_ss_and_the_table_names_the_listener() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let port = listener.local_addr().expect("addr").port();
    let _clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let json = run(Command::new(observer_bin()).args([
        "listeners",
        "--json",
        "--interval",
        "0.2",
        "--port",
        &port.to_string(),
    ]));
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).expect("a JSON array");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (recv_q, send_q) = ss_listen_queues(port)[0];
    assert_eq!(rows[0]["queue_length"], recv_q);
    assert_eq!(rows[0]["queue_max"], send_q);
    assert_eq!((recv_q, send_q), (2, 8));
    // Every duration flag takes units as well as bare seconds.
    let table = run(Command::new(observer_bin()).args([
        "listeners",
        "--interval",
        "200ms",
        "--port",
        &port.to_string(),
    ]));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("     NETNS  LISTEN") || text.contains("WAIT-p99"),
        "{text}"
    );
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

fn tmux(args: &[&str]) -> String {
    let out = run(Command::new("tmux").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the tmux pane shows `text`, returning the screen.
fn screen_with(session: &str, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.contains(text) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "screen never showed {text:?}:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_runs_in_an_80_column_terminal_sorts_and_quits() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let port = listener.local_addr().expect("addr").port();
    let _queued = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let session = format!("observer-top-{}", std::process::id());
    let status_file = std::env::temp_dir().join(format!("{session}.status"));
    let _ = std::fs::remove_file(&status_file);
    let command = format!(
        "{} top --interval 0.5 --port {port}; echo $? > {}",
        observer_bin().display(),
        status_file.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    let screen = screen_with(&session, &format!("127.0.0.1:{port}"));
    assert!(screen.contains("sorted by wait p99"), "{screen}");
    assert!(screen.contains("1/8"), "queue 1 of 8 shown:\n{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80));
    // The selected listener's verdict: one connection queued, nobody accepts.
    let screen = screen_with(&session, "verdict (");
    assert!(
        screen.contains("NOT ACCEPTING") && screen.contains("fix: no acceptor"),
        "{screen}"
    );
    tmux(&["send-keys", "-t", &session, "s"]);
    screen_with(&session, "sorted by queue");
    tmux(&["send-keys", "-t", &session, "q"]);
    // The shell writes top's exit status once top has quit.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match std::fs::read_to_string(&status_file) {
            Ok(s) if !s.is_empty() => break s,
            _ if Instant::now() > deadline => panic!("top did not exit after q"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    let _ = std::fs::remove_file(&status_file);
    assert_eq!(status.trim(), "0", "top's exit status");
}

#[test]
fn every_command_has_help_with_examples() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["listeners", "--help"],
        vec!["trace", "--help"],
        vec!["top", "--help"],
        vec!["doctor", "--help"],
        vec!["explain", "--help"],
    ] {
        let out = run(Command::new(observer_bin()).args(&args));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Examples:"),
            "observer {args:?}:\n{text}"
        );
    }
}

#[test]
fn bad_durations_are_rejected_with_the_flag_named() {
    let out = run(Command::new(observer_bin()).args(["trace", "--min-wait", "10parsecs"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("--min-wait") && stderr.contains("unknown unit"),
        "{stderr}"
    );
    for (view, flag, value) in [
        ("explain", "--interval", "0s"),
        ("top", "--interval", "61m"),
        ("trace", "--duration", "soon"),
    ] {
        let out = run(Command::new(observer_bin()).args([view, flag, value]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{view} {flag} {value}: {stderr}"
        );
        assert!(stderr.contains(flag), "{view} {flag} {value}: {stderr}");
    }
}

#[test]
fn doctor_says_whether_serve_can_run_here() {
    let ok = run(Command::new(observer_bin()).arg("doctor"));
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("ok   programs")),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");

    let nobody = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(observer_bin())
        .arg("doctor"));
    let text = String::from_utf8_lossy(&nobody.stdout);
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL privileges") && l.contains("CAP_BPF")),
        "{text}"
    );

    let no_btf = run(Command::new(observer_bin()).args(["doctor", "--kernel.btf", "/nonexistent"]));
    let text = String::from_utf8_lossy(&no_btf.stdout);
    assert_eq!(no_btf.status.code(), Some(1));
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL BTF") && l.contains("CONFIG_DEBUG_INFO_BTF")),
        "{text}"
    );
}
