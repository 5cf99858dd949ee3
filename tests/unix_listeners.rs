//! Unix-domain listeners against `ss -lx`, the clients' own counts and
//! clocks, and Prometheus' own checker for names no label should break on.
mod support;

use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, net::UnixStream},
    },
    process::Command,
    time::{Duration, Instant},
};

use support::{Daemon, Metrics, counts_unix_accepts, http_get};

/// A Unix listener of `kind` (SOCK_STREAM or SOCK_SEQPACKET) bound to the
/// raw name `name` (a leading NUL makes it abstract) with an exact backlog.
fn unix_listener(name: &[u8], kind: i32, backlog: i32) -> OwnedFd {
    // SAFETY: plain socket calls on a descriptor we own; every return is checked.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let (addr, len) = sockaddr(name);
        let rc = libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        );
        assert_eq!(rc, 0, "bind {name:?}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd.as_raw_fd(), backlog), 0, "listen");
        fd
    }
}

fn sockaddr(name: &[u8]) -> (libc::sockaddr_un, u32) {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (dst, src) in addr.sun_path.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    (addr, (2 + name.len()) as u32)
}

/// A non-blocking connect to the raw name (a full queue fails at once).
fn connect(name: &[u8], kind: i32) -> OwnedFd {
    // SAFETY: as in unix_listener.
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        assert!(fd >= 0, "socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let (addr, len) = sockaddr(name);
        let rc = libc::connect(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        );
        assert_eq!(
            rc,
            0,
            "connect {name:?}: {}",
            std::io::Error::last_os_error()
        );
        fd
    }
}

/// `ss -Hlx` for the socket with this inode: (Recv-Q, Send-Q).
fn ss_unix(inode: u64) -> Option<(u64, u64)> {
    let out = Command::new("ss").args(["-Hlx"]).output().expect("run ss");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.iter()
            .any(|x| *x == inode.to_string())
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn inode_of(fd: &OwnedFd) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("fd link");
    let text = link.to_string_lossy();
    text.trim_start_matches("socket:[")
        .trim_end_matches(']')
        .parse()
        .expect("socket inode")
}

fn by_path(m: &Metrics, name: &str, path: &str) -> f64 {
    m.get(name, &[("path", path)])
        .unwrap_or_else(|| panic!("{name} for {path} missing from scrape:\n{}", m.text))
}

fn test_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("observer-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

#[test]
fn stream_and_seqpacket_listeners_report_ss_depth_and_limit_from_the_first_scrape() {
    let dir = test_dir();
    let stream_path = dir.join("app.sock");
    let name = stream_path.as_os_str().as_bytes().to_vec();
    let stream = unix_listener(&name, libc::SOCK_STREAM, 7);
    let seqpacket = unix_listener(b"\0observer-seqpacket-test", libc::SOCK_SEQPACKET, 3);
    let _queued: Vec<OwnedFd> = (0..5).map(|_| connect(&name, libc::SOCK_STREAM)).collect();
    let _queued_seq: Vec<OwnedFd> = (0..2)
        .map(|_| connect(b"\0observer-seqpacket-test", libc::SOCK_SEQPACKET))
        .collect();
    let daemon = Daemon::start_with_pids();
    let m = daemon.scrape();
    let path = stream_path.to_str().expect("utf-8 temp dir");
    for (fd, label, want) in [
        (&stream, path, (5, 7)),
        (&seqpacket, "@observer-seqpacket-test", (2, 3)),
    ] {
        let ss = ss_unix(inode_of(fd)).expect("ss -lx shows the listener");
        assert_eq!(ss, want, "ss -lx for {label}");
        assert_eq!(
            by_path(&m, "observer_listen_queue_length", label),
            ss.0 as f64
        );
        assert_eq!(by_path(&m, "observer_listen_queue_max", label), ss.1 as f64);
        // The kernel counts no drops for Unix listeners.
        assert!(
            m.get("observer_listen_drops_total", &[("path", label)])
                .is_none()
        );
        assert_eq!(
            m.get(
                "observer_accept_queue_wait_seconds_count",
                &[("path", label)]
            ),
            times_unix_waits().then_some(0.0),
            "nothing accepted yet (and no histogram where waits are not timed)"
        );
    }
    drop(stream);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether it times their waits too: not where the program that stamps
/// Unix connects cannot load.
fn times_unix_waits() -> bool {
    counts_unix_accepts() && support::stamps_unix_connects(&support::expected_accept_source())
}

/// Connects to `path`, with the client's clock around the call: the
/// kernel's stamp of the queued connection lies between the two.
fn timed_connect(path: &std::path::Path) -> (UnixStream, Instant, Instant) {
    let before = Instant::now();
    let stream = UnixStream::connect(path).expect("connect");
    (stream, before, Instant::now())
}

#[test]
fn waits_and_the_oldest_wait_match_the_clients_clocks_and_accepts_count_per_worker() {
    let dir = test_dir();
    let path = dir.join("accepts.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let label = path.to_str().expect("utf-8 temp dir");
    let daemon = Daemon::start_with_pids();
    if !times_unix_waits() {
        let _client = UnixStream::connect(&path).expect("connect");
        listener.accept().expect("accept");
        let m = daemon.scrape();
        assert_eq!(
            by_path(&m, "observer_connections_accepted_total", label),
            if counts_unix_accepts() { 1.0 } else { 0.0 },
            "the kprobe source counts no Unix accepts; the others count this one (documented)"
        );
        assert!(
            m.get(
                "observer_accept_queue_wait_seconds_count",
                &[("path", label)]
            )
            .is_none()
        );
        return;
    }
    // Four connections queued 300 ms apart, nobody accepting.
    let mut clients = Vec::new();
    for i in 0..4 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        clients.push(timed_connect(&path));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (scrape_start, m, scrape_end) = (Instant::now(), daemon.scrape(), Instant::now());
    let oldest = by_path(&m, "observer_listen_queue_oldest_seconds", label);
    let (_, first_before, first_after) = &clients[0];
    let low = scrape_start.duration_since(*first_after).as_secs_f64();
    let high = scrape_end.duration_since(*first_before).as_secs_f64();
    assert!(
        oldest >= low - 0.001 && oldest <= high + 0.001,
        "oldest {oldest} s; the first client connected {low}..{high} s before the scrape"
    );
    assert!(oldest >= 1.2, "oldest {oldest} s");
    // Accept three, 200 ms apart: each waited from its connect to its
    // accept, at least from connect's return to accept's call, at most from
    // connect's call to accept's return (bounds, so that an emulated guest,
    // where a syscall takes milliseconds, widens them instead of failing).
    let mut waits = (0.0, 0.0);
    for (_, before, after) in &clients[..3] {
        std::thread::sleep(Duration::from_millis(200));
        let called = Instant::now();
        listener.accept().expect("accept");
        let accepted = Instant::now();
        waits.0 += called.duration_since(*after).as_secs_f64() - 0.001;
        waits.1 += accepted.duration_since(*before).as_secs_f64() + 0.001;
    }
    let m = daemon.scrape();
    let wait_sum = by_path(&m, "observer_accept_queue_wait_seconds_sum", label);
    assert!(
        wait_sum >= waits.0 && wait_sum <= waits.1,
        "wait sum {wait_sum} s; the clients' clocks say {}..{} s",
        waits.0,
        waits.1
    );
    assert_eq!(
        by_path(&m, "observer_accept_queue_wait_seconds_count", label),
        3.0
    );
    assert_eq!(
        by_path(&m, "observer_connections_accepted_total", label),
        3.0
    );
    assert_eq!(by_path(&m, "observer_connections_queued_total", label), 4.0);
    let me = std::process::id().to_string();
    assert_eq!(
        m.get(
            "observer_worker_accepts_total",
            &[("path", label), ("pid", &me)]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.get(
            "observer_worker_active_connections",
            &[("path", label), ("pid", &me)]
        ),
        Some(0.0),
        "accepted connections were dropped right away"
    );
    // The fourth is now the head: its own connect time, not the first's.
    let (_, fourth_before, _) = &clients[3];
    let oldest = by_path(&m, "observer_listen_queue_oldest_seconds", label);
    assert!(
        oldest <= fourth_before.elapsed().as_secs_f64() + 0.001,
        "oldest {oldest} s is the fourth connection's"
    );
    listener.accept().expect("accept the last");
    let m = daemon.scrape();
    assert_eq!(
        by_path(&m, "observer_listen_queue_oldest_seconds", label),
        0.0
    );
    assert_eq!(
        by_path(&m, "observer_connections_accepted_total", label),
        4.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_connection_queued_before_the_daemon_started_is_timed_from_its_first_sighting() {
    let dir = test_dir();
    let path = dir.join("before.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let label = path.to_str().expect("utf-8 temp dir");
    let _client = UnixStream::connect(&path).expect("connect");
    std::thread::sleep(Duration::from_millis(500));
    // The daemon first sees the connection at its start-up collection: its
    // oldest wait counts from then, not from the connect 500 ms earlier.
    let before_start = Instant::now();
    let daemon = Daemon::start_with_pids();
    let oldest = |daemon: &Daemon| {
        by_path(
            &daemon.scrape(),
            "observer_listen_queue_oldest_seconds",
            label,
        )
    };
    let first = oldest(&daemon);
    assert!(first <= before_start.elapsed().as_secs_f64(), "{first}");
    std::thread::sleep(Duration::from_millis(1000));
    let second = oldest(&daemon);
    let since_start = before_start.elapsed().as_secs_f64();
    assert!(
        second >= first + 0.99 && second <= since_start,
        "oldest {first} s, then {second} s, {since_start} s since the daemon was started"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn odd_names_and_unlinked_sockets_keep_the_exposition_valid() {
    let dir = test_dir();
    let mut names: Vec<Vec<u8>> = vec![
        dir.join("with space \"and quotes\".sock")
            .as_os_str()
            .as_bytes()
            .to_vec(),
        [dir.as_os_str().as_bytes(), b"/bad-utf8-\xff\xfe.sock"].concat(),
        [dir.as_os_str().as_bytes(), b"/back\\slash\nnewline.sock"].concat(),
        b"\0abstract\0with\0nuls".to_vec(),
    ];
    // A 107-byte path (the most bind() takes with its NUL in 108).
    let long = [dir.as_os_str().as_bytes(), b"/"].concat();
    names.push([long.clone(), vec![b'x'; 107 - long.len()]].concat());
    let listeners: Vec<OwnedFd> = names
        .iter()
        .map(|n| unix_listener(n, libc::SOCK_STREAM, 4))
        .collect();
    let _queued: Vec<OwnedFd> = names
        .iter()
        .map(|n| connect(n, libc::SOCK_STREAM))
        .collect();
    // Unlinked while listening, and a new listener on the same path: two
    // sockets behind one path.
    let reused = dir.join("reused.sock");
    let old = unix_listener(reused.as_os_str().as_bytes(), libc::SOCK_STREAM, 4);
    std::fs::remove_file(&reused).expect("unlink");
    let new = unix_listener(reused.as_os_str().as_bytes(), libc::SOCK_STREAM, 9);
    // A connection waiting: a listener with traffic gets its per-socket
    // series (a quiet one, its core series only).
    let _waiting = UnixStream::connect(&reused).expect("connect");
    let daemon = Daemon::start_with_pids();
    let text = http_get(daemon.port, "/metrics").expect("scrape");
    let m = Metrics::parse(&text);
    assert_eq!(
        by_path(&m, "observer_listen_queue_length", "@abstract@with@nuls"),
        1.0
    );
    let long_label = String::from_utf8(names[4].clone()).expect("ascii");
    assert_eq!(
        by_path(&m, "observer_listen_queue_length", &long_label),
        1.0
    );
    let reused_label = reused.to_str().expect("utf-8");
    assert_eq!(by_path(&m, "observer_listen_sockets", reused_label), 2.0);
    assert_eq!(by_path(&m, "observer_listen_queue_max", reused_label), 13.0);
    for fd in [&old, &new] {
        let inode = inode_of(fd).to_string();
        assert!(
            m.get(
                "observer_listen_socket_queue_max",
                &[("path", reused_label), ("socket", &inode)]
            )
            .is_some(),
            "socket {inode} of the reused path has its own series"
        );
    }
    support::promtool_check_metrics(&text);
    drop(listeners);
    let _ = std::fs::remove_dir_all(dir);
}
