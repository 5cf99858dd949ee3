//! The daemon under the conditions of a host in trouble: killed with -9 and
//! restarted under load, started twice, sent garbage, flooded.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use support::{Daemon, http_get, listen};

/// The ids of every BPF program loaded now (bpftool).
fn loaded_programs() -> std::collections::HashSet<u64> {
    let shown = support::bpftool_json(&["prog", "show"]);
    let programs = shown.as_array().into_iter().flatten();
    programs.filter_map(|p| p["id"].as_u64()).collect()
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
    // This daemon's own programs, by the ids its fds hold (another
    // observer on the host loads programs of the same names).
    let loaded = support::program_ids_held_by(daemon.pid());
    assert!(!loaded.is_empty(), "programs loaded");
    daemon.kill_hard();
    // Nothing is pinned: the kernel frees the programs with the process's
    // fds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !loaded.is_disjoint(&loaded_programs()) {
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

/// Eight scrapes released at once: the ones that arrive while a collection
/// runs wait for it and get its very text (the stage timings and the
/// daemon's CPU seconds in it differ between any two collections), and each
/// answer still shows the queue as `ss` does.
#[test]
fn scrapes_that_arrive_during_a_collection_share_its_text() {
    // Two thousand listeners make a collection last long enough for the
    // scrapes released together to overlap it.
    let limit = libc::rlimit {
        rlim_cur: 16384,
        rlim_max: 16384,
    };
    // SAFETY: setrlimit with a valid struct, for this test process's fds.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let listeners: Vec<_> = (0..2_000)
        .map(|_| listen("127.0.0.1:0".parse().expect("addr"), 16))
        .collect();
    let port = listeners[0].local_addr().expect("addr").port();
    let _clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let daemon = Daemon::start();
    std::thread::sleep(Duration::from_millis(50));
    let queued = support::ss_listen_queues(port)[0].0 as f64;
    let release = std::sync::Arc::new(std::sync::Barrier::new(8));
    let scrapes: Vec<_> = (0..8)
        .map(|_| {
            let release = release.clone();
            let port = daemon.port;
            std::thread::spawn(move || {
                release.wait();
                http_get(port, "/metrics").expect("scrape")
            })
        })
        .collect();
    let texts: Vec<String> = scrapes
        .into_iter()
        .map(|s| s.join().expect("scrape thread"))
        .collect();
    for text in &texts {
        let m = support::Metrics::parse(text);
        assert_eq!(m.listener("observer_listen_queue_length", port), queued);
    }
    let distinct: std::collections::HashSet<&String> = texts.iter().collect();
    println!("8 scrapes at once: {} collections", distinct.len());
    assert!(
        distinct.len() < texts.len(),
        "each of {} scrapes ran its own collection",
        texts.len()
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

/// Fires `attempts` non-blocking connects at 127.0.0.1:`port` (each socket
/// closed right away), for at most `limit`; returns how many were sent.
fn flood(attempts: u64, port: u16, limit: Duration) -> u64 {
    let addr = support::loopback_v4(port);
    let deadline = Instant::now() + limit;
    let mut sent = 0;
    while sent < attempts && Instant::now() < deadline {
        // SAFETY: socket/connect/close on our own fd with a valid sockaddr_in.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            if fd < 0 {
                continue;
            }
            libc::connect(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&addr) as u32,
            );
            libc::close(fd);
        }
        sent += 1;
    }
    sent
}

#[test]
fn a_flood_of_connection_attempts_keeps_counts_exact_and_memory_bounded() {
    let daemon = Daemon::start();
    let ns = support::Netns::new();
    let port = 8090;
    let listener = ns.enter(move || listen(format!("127.0.0.1:{port}").parse().expect("addr"), 16));
    listener.set_nonblocking(true).expect("nonblocking");
    let rss_before = rss_kib(daemon.pid());
    let drops_before = ns.nstat("TcpExtListenDrops");
    // Hundreds of thousands of attempts while the listener accepts slowly
    // (the queue stays full and the kernel drops most of them).
    let flooder = {
        let name = ns.name.clone();
        std::thread::spawn(move || {
            let netns = std::fs::File::open(format!("/run/netns/{name}")).expect("netns");
            // SAFETY: setns on this thread only.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) },
                0
            );
            flood(200_000, port, Duration::from_secs(20))
        })
    };
    let mut accepted = 0u64;
    while !flooder.is_finished() {
        match listener.accept() {
            Ok(_) => accepted += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
        if accepted.is_multiple_of(200) {
            daemon.scrape(); // scrapes during the flood
        }
    }
    let attempts = flooder.join().expect("flooder");
    std::thread::sleep(Duration::from_millis(200));
    while listener.accept().is_ok() {
        accepted += 1;
    }
    let nstat_drops = ns.nstat("TcpExtListenDrops") - drops_before;
    let m = daemon.scrape();
    let inode = ns.inode();
    let labels = [("port", "8090"), ("netns", inode.as_str())];
    let drops = m
        .get("observer_listen_drops_total", &labels)
        .expect("drops");
    let observed_accepts = m
        .get("observer_connections_accepted_total", &labels)
        .expect("accepted");
    let rss_after = rss_kib(daemon.pid());
    println!(
        "flood: {attempts} attempts, {accepted} accepted, drops observer {drops} / nstat {nstat_drops}, RSS {rss_before} → {rss_after} KiB"
    );
    assert!(attempts >= 100_000, "only {attempts} attempts were made");
    assert_eq!(observed_accepts, accepted as f64);
    assert!(drops > 1000.0, "the flood overflowed the queue");
    assert_eq!(
        drops, nstat_drops,
        "per-listener drops = the namespace's ListenDrops"
    );
    for reason in ["accept_map_full", "accept_read_error"] {
        assert_eq!(
            m.get("observer_kernel_events_lost_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
    assert!(
        rss_after < rss_before + 16 * 1024,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn namespaces_vanishing_between_and_during_scrapes_cause_no_error() {
    let daemon = Daemon::start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    // Namespaces with a listener come and go while the daemon scrapes.
    let churn = std::thread::spawn(move || {
        let mut made = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && made < 200 {
            let ns = support::Netns::new();
            let listener =
                ns.enter(|| std::net::TcpListener::bind("127.0.0.1:7000").expect("bind"));
            drop(listener);
            drop(ns);
            made += 1;
        }
        made
    });
    let mut scrapes = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !churn.is_finished() && Instant::now() < deadline {
        let m = daemon.scrape();
        assert_eq!(
            m.get("observer_collect_errors_total", &[]),
            Some(0.0),
            "a collection failed"
        );
        scrapes += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = churn.join().expect("churn");
    println!("{made} namespaces created and deleted during {scrapes} scrapes");
    assert!(
        made >= 10 && scrapes >= 10,
        "{made} namespaces, {scrapes} scrapes"
    );
    assert_eq!(http_get(daemon.port, "/healthz").as_deref(), Some("ok\n"));
}
