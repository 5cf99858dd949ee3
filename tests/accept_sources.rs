//! The accept sources (fexit, kprobe, tracepoint on this kernel's terms):
//! each one `observer doctor` says loads must count real accepts when forced,
//! each one it says does not must be refused in one line, and `auto` must
//! pick the best that loads. On the development kernel only tracepoint loads;
//! `cargo xtask vm-test` runs this on kernels where all three do.
mod support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use support::{
    Daemon, accept_sources_on_this_kernel, bpftool_json, listen, loading_accept_sources,
    observer_bin, run,
};

/// Three clients accepted by a forced source: counted exactly, and the
/// daemon names the source it used.
fn counts_accepts_with(source: &str) {
    let daemon = Daemon::start_with(&["--accept-source", source]);
    let m = daemon.scrape();
    assert_eq!(
        m.get("observer_build_info", &[("accept_source", source)]),
        Some(1.0),
        "build_info does not name the forced source {source}"
    );
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let addr = listener.local_addr().expect("local addr");
    let mut accepted = Vec::new();
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(b"x").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        accepted.push((client, listener.accept().expect("accept")));
    }
    let m = daemon.scrape();
    assert_eq!(
        m.listener("observer_connections_accepted_total", addr.port()),
        3.0,
        "source {source}"
    );
    assert_eq!(
        m.listener("observer_accept_queue_wait_seconds_count", addr.port()),
        3.0,
        "source {source}"
    );
}

/// A source this kernel refuses, forced: one line naming it, exit 1.
fn refuses(source: &str) {
    let out = run(Command::new(observer_bin()).args([
        "serve",
        "--web.listen-address",
        "127.0.0.1:0",
        "--accept-source",
        source,
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // One line: no verifier dump without --verbose.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{stderr}");
    assert!(
        lines[0].starts_with(&format!("error: --accept-source={source} cannot be used")),
        "{stderr}"
    );
}

#[test]
fn each_source_doctor_says_loads_counts_and_each_other_is_refused_in_one_line() {
    let sources = accept_sources_on_this_kernel();
    println!("accept sources on this kernel: {sources:?}");
    assert!(sources.iter().any(|(_, loads)| *loads), "no source loads");
    for (source, loads) in &sources {
        if *loads {
            counts_accepts_with(source);
        } else {
            refuses(source);
        }
    }
}

#[test]
fn auto_picks_the_best_source_that_loads() {
    let best = loading_accept_sources()
        .into_iter()
        .next()
        .expect("a source loads");
    let daemon = Daemon::start_with(&["--accept-source", "auto"]);
    assert_eq!(
        daemon
            .scrape()
            .get("observer_build_info", &[("accept_source", &best)]),
        Some(1.0),
        "auto did not pick {best}"
    );
}

/// tests/programs/uring_accept.c, compiled (with liburing) into a temp dir.
fn uring_accept_program() -> PathBuf {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("programs/uring_accept.c");
    let binary = std::env::temp_dir().join(format!("observer-uring-accept-{}", std::process::id()));
    let out = run(Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .arg("-luring"));
    assert!(
        out.status.success(),
        "gcc uring_accept.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// Accepted connections of a server that accepts through io_uring, as one
/// source counts them: 3 clients, all accepted (the program says so).
fn io_uring_accepts_counted_by(source: &str, program: &PathBuf) -> f64 {
    let daemon = Daemon::start_with(&["--accept-source", source]);
    let mut server = Command::new(program)
        .arg("3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start uring_accept");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let port: u16 = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| l.trim().parse().ok())
        .expect("uring_accept prints its port");
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    for _ in 0..3 {
        let line = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        assert!(line.starts_with("accepted "), "uring_accept said {line:?}");
    }
    let accepted = daemon
        .scrape()
        .listener("observer_connections_accepted_total", port);
    drop(clients);
    drop(server.stdin.take());
    let _ = server.wait();
    accepted
}

/// The reason for the inet_csk_accept sources: a server that accepts through
/// io_uring makes no accept syscall. fexit and kprobe count its 3 accepts;
/// the tracepoint source cannot see them (the documented gap: 0).
#[test]
fn io_uring_accepts_are_counted_by_the_inet_csk_accept_sources_only() {
    let program = uring_accept_program();
    for source in loading_accept_sources() {
        let expected = if source == "tracepoint" { 0.0 } else { 3.0 };
        let counted = io_uring_accepts_counted_by(&source, &program);
        println!("{source}: {counted} of 3 io_uring accepts");
        assert_eq!(counted, expected, "source {source}");
    }
    let _ = std::fs::remove_file(program);
}

/// Accepts of `threads` threads that all block in accept(2) at once on one
/// listener, as one source counts them, and the accept-program runs the
/// kernel reports it skipped.
fn blocked_acceptors_counted_by(source: &str, threads: usize) -> (f64, f64) {
    let daemon = Daemon::start_with(&["--accept-source", source]);
    let listener = std::sync::Arc::new(listen("127.0.0.1:0".parse().expect("addr"), 64));
    let addr = listener.local_addr().expect("local addr");
    let acceptors: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.clone();
            std::thread::spawn(move || listener.accept().map(|(conn, _)| conn))
        })
        .collect();
    // Every thread inside accept() before the first client arrives.
    std::thread::sleep(Duration::from_millis(500));
    let clients: Vec<TcpStream> = (0..threads)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let accepted: Vec<TcpStream> = acceptors
        .into_iter()
        .map(|t| t.join().expect("acceptor thread").expect("accept"))
        .collect();
    let m = daemon.scrape();
    let counted = m.listener("observer_connections_accepted_total", addr.port());
    let skipped = m
        .get(
            "observer_kernel_events_lost_total",
            &[("reason", "accept_program_skipped")],
        )
        .expect("accept_program_skipped exported");
    drop((clients, accepted));
    (counted, skipped)
}

/// Many threads blocked in accept at once (a thread-per-connection server's
/// idle pool): every accept is counted, whatever the source. (A kretprobe
/// needs one return slot per call in flight; see docs/kernels.md.)
#[test]
fn every_accept_of_many_threads_blocked_in_accept_is_counted() {
    const THREADS: usize = 40;
    for source in loading_accept_sources() {
        let (counted, skipped) = blocked_acceptors_counted_by(&source, THREADS);
        println!("{source}: {counted} of {THREADS}, {skipped} skipped");
        assert_eq!(counted, THREADS as f64, "source {source}");
        // Counted and reported-lost together account for every client.
        assert_eq!(counted + skipped, THREADS as f64, "source {source}");
    }
}

/// One thread already blocked in accept(2) when the daemon starts, then one
/// client: what each source counts. The tracepoint fires on syscall exit and
/// counts it; fexit and kprobe hook the function's entry, which that thread
/// passed before they were attached, so they miss it (docs/kernels.md).
#[test]
fn an_accept_already_blocked_when_the_daemon_starts_is_counted_by_the_tracepoint_only() {
    for source in loading_accept_sources() {
        let listener = std::sync::Arc::new(listen("127.0.0.1:0".parse().expect("addr"), 8));
        let addr = listener.local_addr().expect("local addr");
        let acceptor = {
            let listener = listener.clone();
            std::thread::spawn(move || listener.accept().map(|(conn, _)| conn))
        };
        std::thread::sleep(Duration::from_millis(200));
        let daemon = Daemon::start_with(&["--accept-source", &source]);
        let client = TcpStream::connect(addr).expect("connect");
        let conn = acceptor.join().expect("acceptor").expect("accept");
        let counted = daemon
            .scrape()
            .listener("observer_connections_accepted_total", addr.port());
        let expected = if source == "tracepoint" { 1.0 } else { 0.0 };
        assert_eq!(counted, expected, "source {source}");
        drop((client, conn));
    }
}

/// One loaded eBPF program, as `bpftool -j prog show` lists it.
#[derive(Debug, Clone)]
struct Program {
    id: u64,
    kind: String,
    name: String,
    run_cnt: u64,
}

fn programs() -> Vec<Program> {
    let list = bpftool_json(&["prog", "show"]);
    list.as_array()
        .into_iter()
        .flatten()
        .map(|p| Program {
            id: p["id"].as_u64().unwrap_or(0),
            kind: p["type"].as_str().unwrap_or("").to_owned(),
            name: p["name"].as_str().unwrap_or("").to_owned(),
            run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// Programs that only run when the daemon reads an iterator.
fn iterator_program_ids() -> Vec<u64> {
    let links = bpftool_json(&["link", "show"]);
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == "iter")
        .filter_map(|l| l["prog_id"].as_u64())
        .collect()
}

/// Turns `kernel.bpf_stats_enabled` on (run counts) while alive.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> BpfStats {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into());
        std::fs::write(path, "1").expect("enable bpf_stats");
        BpfStats(was.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// This (untracked) process waits the ways event loops and pools do, with
/// zero timeouts: epoll_wait, ppoll, select, poll, `rounds` times each.
fn wait_syscalls(rounds: usize) {
    // SAFETY (whole block): plain syscalls on objects this function owns,
    // with null or stack-allocated arguments and zero timeouts.
    unsafe {
        let epfd = libc::epoll_create1(0);
        assert!(epfd >= 0, "epoll_create1");
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        for _ in 0..rounds {
            libc::epoll_wait(epfd, &mut event, 1, 0);
            libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null());
            let mut tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            libc::select(
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut tv,
            );
            libc::poll(std::ptr::null_mut(), 0, 0);
        }
        libc::close(epfd);
    }
}

/// What every other process pays. With the daemon running (and sampling a
/// worker), another process's wait syscalls run none of its programs,
/// whatever the accept source; fexit and kprobe load no tracepoint program
/// at all, and the tracepoint source only its accept-exit and connect-exit
/// ones (the latter stamps Unix connects, where the kernel lets it load).
/// The daemon's
/// programs and links are printed: the VM run's record of what is attached.
#[test]
fn no_program_of_ours_runs_on_another_process_s_wait_syscalls() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let port = listener.local_addr().expect("local addr").port();
    for source in loading_accept_sources() {
        let before: Vec<u64> = programs().iter().map(|p| p.id).collect();
        let daemon = Daemon::start_with(&["--accept-source", &source]);
        daemon.scrape();
        let ours: Vec<Program> = programs()
            .into_iter()
            .filter(|p| !before.contains(&p.id))
            .collect();
        let iterators = iterator_program_ids();
        println!("source {source}: our programs: {ours:?}; iterators: {iterators:?}");
        println!(
            "links: {}",
            String::from_utf8_lossy(&run(Command::new("bpftool").args(["link", "show"])).stdout)
        );
        let mut tracepoints: Vec<&str> = ours
            .iter()
            .filter(|p| p.kind == "tracepoint")
            .map(|p| p.name.as_str())
            .collect();
        tracepoints.sort();
        let expected: Vec<&str> = match source.as_str() {
            "tracepoint" if support::stamps_unix_connects(&source) => {
                vec!["accept_exit", "connect_exit"]
            }
            "tracepoint" => vec!["accept_exit"],
            _ => vec![],
        };
        assert_eq!(
            tracepoints, expected,
            "source {source}: tracepoint programs"
        );
        let hooks: Vec<&Program> = ours.iter().filter(|p| !iterators.contains(&p.id)).collect();
        assert!(!hooks.is_empty(), "no accept program found for {source}");
        let stats = BpfStats::enable();
        let runs = |id: u64| {
            programs()
                .iter()
                .find(|p| p.id == id)
                .map_or(0, |p| p.run_cnt)
        };
        let runs_before: Vec<u64> = hooks.iter().map(|p| runs(p.id)).collect();
        wait_syscalls(2000);
        let runs_after: Vec<u64> = hooks.iter().map(|p| runs(p.id)).collect();
        // The instrument moves: accept4 on an empty non-blocking listener
        // runs the accept program (every source hooks accept).
        listener.set_nonblocking(true).expect("nonblocking");
        for _ in 0..100 {
            assert!(listener.accept().is_err(), "nothing is queued");
        }
        let runs_accepting: u64 = hooks.iter().map(|p| runs(p.id)).sum();
        drop(stats);
        assert_eq!(
            runs_after, runs_before,
            "source {source}: {hooks:?} ran on another process's wait syscalls"
        );
        assert!(
            runs_accepting >= runs_after.iter().sum::<u64>() + 100,
            "source {source}: bpf_stats did not count the accept program's runs"
        );
        // The sampler was at work meanwhile: the pool of `listener` (this
        // process) is watched and sampled.
        let m = daemon.scrape();
        assert!(
            m.get("observer_worker_sample_passes_total", &[])
                .unwrap_or(0.0)
                > 1.0,
            "the thread sampler did not run"
        );
        // Its pool's busy/idle count (a listener without traffic exports
        // that, not per-worker series).
        assert!(
            m.get("observer_workers", &[("port", &port.to_string())])
                .is_some(),
            "the listener's process was not sampled:\n{}",
            m.text
        );
    }
}
