//! The exposition's scope and its knobs (issue #15): a quiet listener
//! exports its core series only, and gets the rest with its first
//! connection; `--collector.listeners.include`/`exclude` keep and drop
//! listeners; `--no-collector.*` leave their families out. Each checked
//! against what the test did (its clients) and `ss`.
mod support;

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use support::{Daemon, Metrics, ss_listen_queues};

fn families(m: &Metrics, port: u16) -> Vec<String> {
    let port = port.to_string();
    let mut names: Vec<String> = m
        .samples
        .iter()
        .filter(|(_, l, _)| l.get("port") == Some(&port))
        .map(|(n, _, _)| n.clone())
        .collect();
    names.dedup();
    names
}

/// One connection made and accepted on `listener`; returns when accepted.
fn one_accepted(listener: &TcpListener) -> TcpStream {
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let _ = listener.accept().expect("accept");
    client
}

#[test]
fn a_quiet_listener_exports_its_core_series_until_its_first_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let daemon = Daemon::start();
    let m = daemon.scrape();
    assert_eq!(
        families(&m, port),
        [
            "observer_listen_queue_length",
            "observer_listen_queue_max",
            "observer_listen_drops_total",
            "observer_connections_queued_total",
            "observer_connections_accepted_total",
            "observer_workers",
            "observer_idle_threads",
        ],
        "{}",
        m.text
    );
    // The core series say what ss says.
    let (depth, limit) = ss_listen_queues(port)[0];
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        depth as f64
    );
    assert_eq!(m.listener("observer_listen_queue_max", port), limit as f64);
    assert_eq!(m.listener("observer_connections_accepted_total", port), 0.0);
    // One connection later: every family, and the histogram counts it.
    let _client = one_accepted(&listener);
    let m = daemon.scrape();
    let names = families(&m, port);
    for name in [
        "observer_listen_queue_oldest_seconds",
        "observer_accept_queue_wait_seconds_count",
        "observer_worker_accepts_total",
        "observer_worker_busy",
        "observer_connections_unread",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing:\n{}",
            m.text
        );
    }
    assert_eq!(m.listener("observer_connections_accepted_total", port), 1.0);
    assert_eq!(
        m.listener("observer_accept_queue_wait_seconds_count", port),
        1.0
    );
    support::promtool_check_metrics(&m.text);
}

#[test]
fn listener_include_and_exclude_keep_the_selected_pools_only() {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    let (lo, hi) = (ports.iter().min().unwrap(), ports.iter().max().unwrap());
    // Keep the range that holds all three, then drop the first by port.
    let include = format!("port:{lo}-{hi}");
    let exclude = format!("port:{}", ports[0]);
    let daemon = Daemon::start_with(&[
        "--collector.listeners.include",
        &include,
        "--collector.listeners.exclude",
        &exclude,
    ]);
    let clients: Vec<TcpStream> = listeners.iter().map(one_accepted).collect();
    let m = daemon.scrape();
    assert!(!m.has_listener(ports[0]), "excluded:\n{}", m.text);
    for port in &ports[1..] {
        assert_eq!(
            m.listener("observer_connections_accepted_total", *port),
            1.0
        );
    }
    // A listener outside the include range is not exported.
    let outside = (0..100)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .find(|l| {
            let port = l.local_addr().expect("addr").port();
            port < *lo || port > *hi
        })
        .expect("a port outside the range");
    let outside_port = outside.local_addr().expect("addr").port();
    let _outside_client = one_accepted(&outside);
    let m = daemon.scrape();
    assert!(!m.has_listener(outside_port), "not included:\n{}", m.text);
    assert!(!m.has_listener(ports[0]), "excluded:\n{}", m.text);
    drop(clients);
}

#[test]
fn collectors_turned_off_leave_their_families_out_and_the_rest_exact() {
    let daemon = Daemon::start_with(&[
        "--no-collector.workers",
        "--no-collector.wait-histogram",
        "--no-collector.sockets",
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let clients: Vec<TcpStream> = (0..3).map(|_| one_accepted(&listener)).collect();
    // Two more wait in the queue.
    let waiting: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let m = daemon.scrape();
    for gone in [
        "observer_workers",
        "observer_worker_",
        "observer_accept_queue_wait_seconds",
        "observer_listen_socket_",
        "observer_worker_sample_passes_total",
    ] {
        assert!(
            !m.samples.iter().any(|(n, _, _)| n.starts_with(gone)),
            "{gone} still exported:\n{}",
            m.text
        );
    }
    assert_eq!(m.listener("observer_connections_accepted_total", port), 3.0);
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        ss_listen_queues(port)[0].0 as f64
    );
    assert_eq!(m.listener("observer_listen_queue_length", port), 2.0);
    // A second flag wins over the first, as in node_exporter.
    let again = Daemon::start_with(&["--no-collector.workers", "--collector.workers"]);
    let m = again.scrape();
    assert!(
        m.get(
            "observer_worker_accepts_total",
            &[("port", &port.to_string())]
        )
        .is_some()
            || m.get("observer_worker_sample_passes_total", &[]).is_some(),
        "workers stayed off:\n{}",
        m.text
    );
    drop((clients, waiting));
}

/// `run_cnt` of the daemon's program named `name`, as `bpftool` reads the
/// kernel's counter: of the programs so named (the kernel keeps 15
/// characters of a name, bpftool may show them only), those the daemon
/// holds, as another observer on the host loads programs of the same names.
fn bpftool_run_count(name: &str, daemon: &Daemon) -> f64 {
    let kept = &name[..name.len().min(15)];
    let held = support::program_ids_held_by(daemon.pid());
    let list = support::bpftool_json(&["prog", "show"]);
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with(kept)))
        .filter(|p| p["id"].as_u64().is_some_and(|id| held.contains(&id)))
        .filter_map(|p| p["run_cnt"].as_u64())
        .sum::<u64>() as f64
}

/// The program that counts accepts for the source in use.
fn accept_program(m: &Metrics) -> &'static str {
    let source = ["fexit", "kprobe", "tracepoint"]
        .into_iter()
        .find(|s| {
            m.get("observer_build_info", &[("accept_source", s)])
                .is_some()
        })
        .unwrap_or_else(|| panic!("no accept source in observer_build_info:\n{}", m.text));
    match source {
        "fexit" => "accept_fexit",
        "kprobe" => "accept_kretprobe",
        _ => "accept_exit",
    }
}

/// observer's own cost, live: without `--collector.program-stats` (and
/// with the kernel's BPF statistics off) there are no per-program series;
/// with it, each program's runs and run time, which for the accept program
/// lie between what `bpftool` reads of the same kernel counter just before
/// and just after the scrape, and cover the test's 5 accepts.
#[test]
fn program_stats_are_the_kernels_own_counters_when_asked_for() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let plain = Daemon::start();
    let m = plain.scrape();
    let stats_were_on = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() == "1");
    if !stats_were_on {
        assert!(
            m.get("observer_program_runs_total", &[]).is_none(),
            "program series without the flag:\n{}",
            m.text
        );
    }
    drop(plain);

    let daemon = Daemon::start_with(&["--collector.program-stats"]);
    let _clients: Vec<TcpStream> = (0..5).map(|_| one_accepted(&listener)).collect();
    let program = accept_program(&daemon.scrape());
    let before = bpftool_run_count(program, &daemon);
    let m = daemon.scrape();
    let after = bpftool_run_count(program, &daemon);
    let runs = m
        .get("observer_program_runs_total", &[("program", program)])
        .unwrap_or_else(|| panic!("no runs for {program}:\n{}", m.text));
    let seconds = m
        .get(
            "observer_program_run_seconds_total",
            &[("program", program)],
        )
        .expect("run seconds");
    println!("{program}: bpftool {before}..{after}, observer {runs} runs in {seconds} s");
    assert!(runs >= 5.0, "at least the test's accepts: {runs}");
    assert!(
        before <= runs && runs <= after,
        "{before} <= {runs} <= {after}"
    );
    assert!(seconds > 0.0);
    let holders = m
        .get("observer_program_runs_total", &[("program", "holders")])
        .expect("the holder walk's program");
    assert!(
        holders >= 1.0,
        "the holder walk ran at each scrape: {holders}"
    );
}

/// Where worker threads are read, as `observer_build_info{thread_sampler}`
/// says: what `doctor`'s sampler line names by default (the BPF sampler
/// where it loads, /proc elsewhere), `proc` where asked for, `none` with
/// the workers collector off.
#[test]
fn build_info_names_the_thread_sampler_doctor_names() {
    let doctor = support::run(std::process::Command::new(support::observer_bin()).arg("doctor"));
    let line = String::from_utf8_lossy(&doctor.stdout)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("sampler"))
        .expect("doctor's sampler line")
        .to_owned();
    let by_doctor = if line.contains("(iter.s/task)") {
        "bpf"
    } else if line.contains("from /proc") {
        "proc"
    } else {
        panic!("doctor names no sampler: {line}")
    };
    for (flags, want) in [
        (&[][..], by_doctor),
        (&["--collector.workers.sampler", "proc"][..], "proc"),
        (&["--no-collector.workers"][..], "none"),
    ] {
        let m = Daemon::start_with(flags).scrape();
        assert_eq!(
            m.get("observer_build_info", &[("thread_sampler", want)]),
            Some(1.0),
            "{flags:?}: observer_build_info\n{}",
            m.text
        );
    }
}
