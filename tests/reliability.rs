//! The daemon under the conditions of a host in trouble: killed with -9 and
//! restarted under load, started twice, sent garbage, flooded.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use support::{Daemon, http_get, listen, run};

/// Loaded eBPF programs under our programs' names (bpftool).
fn our_programs() -> usize {
    let out = run(Command::new("bpftool").args(["prog", "show"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            [
                "accept_exit",
                "listeners",
                "holders",
                "wait_enter_",
                "wait_exit",
            ]
            .iter()
            .any(|n| l.contains(&format!(" name {n}")))
        })
        .count()
}

/// Keeps connecting to `port` (and closing) until dropped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    n += 1;
                }
            }
            n
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("load thread"))
            .unwrap_or(0)
    }
}

#[test]
fn kill_9_under_load_leaves_no_programs_and_a_restart_serves_within_2_seconds() {
    let before = our_programs();
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 1024);
    let port = listener.local_addr().expect("addr").port();
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if listener.accept().is_err() {
                break;
            }
        }
    });
    let load = Load::start(port);
    let mut daemon = Daemon::start();
    assert!(our_programs() > before, "programs loaded");
    daemon.kill_hard();
    // Nothing is pinned: the kernel frees the programs with the process's fds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while our_programs() != before {
        assert!(
            Instant::now() < deadline,
            "programs left in the kernel after kill -9"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let restarted = Daemon::start();
    let ready = started.elapsed();
    let m = restarted.scrape();
    let served = load.stop();
    println!("restart to first /healthz: {ready:?}; {served} connections during the test");
    assert!(ready < Duration::from_secs(2), "restart took {ready:?}");
    assert!(m.has_listener(port));
    // A restarted target: counters start again from 0, which Prometheus treats as a reset.
    assert!(m.listener("observer_connections_accepted_total", port) < served as f64);
    drop(acceptor);
}

#[test]
fn two_daemons_at_once_both_serve_the_same_truth() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 16);
    let port = listener.local_addr().expect("addr").port();
    let (a, b) = (Daemon::start(), Daemon::start());
    let _clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let (ma, mb) = (a.scrape(), b.scrape());
    for m in [&ma, &mb] {
        assert_eq!(m.listener("observer_listen_queue_length", port), 3.0);
    }
    for _ in 0..3 {
        drop(listener.accept().expect("accept"));
    }
    let (ma, mb) = (a.scrape(), b.scrape());
    assert_eq!(
        ma.listener("observer_connections_accepted_total", port),
        3.0
    );
    assert_eq!(
        mb.listener("observer_connections_accepted_total", port),
        3.0
    );
}

/// Sends raw bytes to the daemon and returns what it answered (may be empty).
fn raw_request(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn garbage_huge_headers_and_wrong_methods_get_4xx_and_the_daemon_lives_on() {
    let daemon = Daemon::start();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let reply = raw_request(daemon.port, &garbage);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
        "garbage got: {reply:.80}"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let reply = raw_request(daemon.port, huge.as_bytes());
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431") || reply.starts_with("HTTP/1.1 4"),
        "huge header got: {reply:.80}"
    );
    let reply = raw_request(
        daemon.port,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 405"), "POST got: {reply:.80}");
    let reply = raw_request(daemon.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 404"),
        "unknown path got: {reply:.80}"
    );
    assert_eq!(
        http_get(daemon.port, "/healthz").as_deref(),
        Some("ok\n"),
        "still healthy"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
fn a_connection_flood_keeps_counts_exact_and_memory_bounded() {
    let daemon = Daemon::start();
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 16);
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let rss_before = rss_kib(daemon.pid());
    // 4 threads connect as fast as they can for 5 s while the listener
    // accepts slowly (the queue stays full and the kernel drops the rest).
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, deadline) = (0u64, Instant::now() + Duration::from_secs(5));
                while Instant::now() < deadline {
                    if TcpStream::connect_timeout(
                        &format!("127.0.0.1:{port}").parse().expect("addr"),
                        Duration::from_millis(20),
                    )
                    .is_ok()
                    {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let (mut accepted, deadline) = (0u64, Instant::now() + Duration::from_secs(7));
    while Instant::now() < deadline {
        match listener.accept() {
            Ok(_) => accepted += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        if accepted % 100 == 0 {
            daemon.scrape();
        }
    }
    let connected: u64 = flooders
        .into_iter()
        .map(|f| f.join().expect("flooder"))
        .sum();
    while listener.accept().is_ok() {
        accepted += 1;
    }
    let m = daemon.scrape();
    println!(
        "flood: {connected} connects completed, {accepted} accepted, drops {}",
        m.listener("observer_listen_drops_total", port)
    );
    assert_eq!(
        m.listener("observer_connections_accepted_total", port),
        accepted as f64
    );
    assert!(
        m.listener("observer_listen_drops_total", port) > 0.0,
        "the flood overflowed the queue"
    );
    assert_eq!(
        m.get(
            "observer_kernel_events_lost_total",
            &[("reason", "accept_map_full")]
        ),
        Some(0.0)
    );
    let rss_after = rss_kib(daemon.pid());
    assert!(
        rss_after < rss_before + 16 * 1024,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
