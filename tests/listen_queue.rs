//! Listen-queue figures against independent ground truth: `ss` for depth and
//! limit, the clients' own counts, and the clients' own clocks for waits.
mod support;

use std::{
    collections::HashMap,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::{Daemon, listen, ss_listen_queues, ss_sockets};

/// Connects `n` clients that each send a request line at once, and returns
/// them with the instant each connect completed, by local port.
/// When a client's connect(2) was called and when it returned: the kernel
/// queues (and stamps) the connection somewhere in between, or just after
/// on a busy or emulated machine, where the calling thread may also be
/// preempted before it reads the clock.
#[derive(Clone, Copy)]
struct Connected {
    called: Instant,
    returned: Instant,
}

fn connect_clients(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, HashMap<u16, Connected>) {
    let mut clients = Vec::new();
    let mut connected_at = HashMap::new();
    for _ in 0..n {
        let called = Instant::now();
        let mut c = TcpStream::connect(addr).expect("client connect");
        let returned = Instant::now();
        let port = c.local_addr().expect("client addr").port();
        connected_at.insert(port, Connected { called, returned });
        c.write_all(b"GET / HTTP/1.0\r\n").expect("client write");
        clients.push(c);
    }
    (clients, connected_at)
}

/// Accepts one connection and returns it with the bounds the clients' clocks
/// put on its queue wait: at least from connect's return to the accept call,
/// at most from connect's call to accept's return. (Bounds, not one figure,
/// so that a slow machine, an emulated guest say, widens them instead of
/// failing the test.)
fn accept_timed(
    listener: &TcpListener,
    connected_at: &HashMap<u16, Connected>,
) -> (TcpStream, Duration, Duration) {
    let called = Instant::now();
    let (conn, peer) = listener.accept().expect("accept");
    let returned = Instant::now();
    let connected = connected_at[&peer.port()];
    (
        conn,
        called.saturating_duration_since(connected.returned),
        returned - connected.called,
    )
}

/// Whether `observed` seconds lies within [at_least, at_most], give or take
/// `slack` (clock reading granularity, per connection).
fn within(observed: f64, at_least: Duration, at_most: Duration, slack: f64) -> bool {
    observed >= at_least.as_secs_f64() - slack && observed <= at_most.as_secs_f64() + slack
}

/// Waits until the kernel shows `depth` connections queued on `port`.
fn wait_for_depth(port: u16, depth: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ss_listen_queues(port).first().map(|q| q.0) != Some(depth) {
        assert!(
            Instant::now() < deadline,
            "queue on port {port} never reached {depth}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `fd` over `sock` (SCM_RIGHTS) with one byte.
fn send_fd(sock: &std::os::unix::net::UnixStream, fd: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd as _;
    let fd_bytes = std::mem::size_of::<std::os::fd::RawFd>() as u32;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer has room for one cmsg carrying one fd
    // (CMSG_SPACE above); sendmsg reads our own buffers.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
        std::ptr::copy_nonoverlapping(
            (&fd as *const std::os::fd::RawFd).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            fd_bytes as usize,
        );
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    assert_eq!(sent, 1, "sendmsg: {}", std::io::Error::last_os_error());
}

/// A listener no process holds is seen by iter/tcp alone, which must then
/// walk at every scrape (not once a minute): its depth follows `ss` from
/// one scrape to the next, from the scrape where its holder let it go.
#[test]
fn a_listener_no_process_holds_is_read_at_every_scrape() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let local = listener.local_addr().expect("local addr");
    let port = local.port();
    let daemon = Daemon::start();
    let mut clients = vec![TcpStream::connect(local).expect("connect")];
    wait_for_depth(port, 1);
    let m = daemon.scrape();
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        1.0,
        "held"
    );
    // Now its only reference is in flight: sent over a socket pair and
    // closed, never received. No process has it among its fds.
    let (tx, _rx) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    send_fd(&tx, std::os::fd::AsRawFd::as_raw_fd(&listener));
    drop(listener);
    for depth in 2..=4 {
        clients.push(TcpStream::connect(local).expect("connect"));
        wait_for_depth(port, depth);
        let m = daemon.scrape();
        assert_eq!(
            m.listener("observer_listen_queue_length", port),
            depth as f64,
            "in flight, scrape {depth}"
        );
        assert_eq!(m.listener("observer_listen_queue_max", port), 8.0);
    }
}

fn depth_and_limit_equal_ss(addr: &str) {
    let listener = listen(addr.parse().expect("addr"), 8);
    let local = listener.local_addr().expect("local addr");
    let port = local.port();
    // Connections queue up before the daemon starts: the first scrape must see them.
    let (_clients, _) = connect_clients(local, 5);
    wait_for_depth(port, 5);
    let daemon = Daemon::start();
    let m = daemon.scrape();
    let ss = ss_listen_queues(port);
    assert_eq!(ss, vec![(5, 8)], "ss sees 5 queued of a backlog of 8");
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        ss[0].0 as f64
    );
    assert_eq!(
        m.listener("observer_listen_queue_max", port),
        ss[0].1 as f64
    );
    // Counters count from daemon start: those 5 were queued before it.
    assert_eq!(m.listener("observer_connections_queued_total", port), 0.0);
    assert_eq!(m.listener("observer_connections_accepted_total", port), 0.0);
    drop(listener);
}

#[test]
fn queue_depth_and_limit_equal_ss_for_a_listener_that_never_accepts_ipv4() {
    depth_and_limit_equal_ss("127.0.0.1:0");
}

#[test]
fn queue_depth_and_limit_equal_ss_for_a_listener_that_never_accepts_ipv6() {
    depth_and_limit_equal_ss("[::1]:0");
}

fn counts_and_waits_match_clients(addr: &str) {
    let daemon = Daemon::start();
    let listener = listen(addr.parse().expect("addr"), 16);
    let local = listener.local_addr().expect("local addr");
    let port = local.port();
    let (_clients, connected_at) = connect_clients(local, 5);
    wait_for_depth(port, 5);

    // Accept 3 of the 5 after known sleeps; the clients' clocks say how long
    // each one waited.
    let (mut at_least, mut at_most) = (Duration::ZERO, Duration::ZERO);
    let mut accepted = Vec::new();
    for sleep_ms in [300, 200, 100] {
        std::thread::sleep(Duration::from_millis(sleep_ms));
        let (conn, low, high) = accept_timed(&listener, &connected_at);
        at_least += low;
        at_most += high;
        accepted.push(conn);
    }

    let m = daemon.scrape();
    let count = m.listener("observer_accept_queue_wait_seconds_count", port);
    let sum = m.listener("observer_accept_queue_wait_seconds_sum", port);
    println!("waits: observer sum {sum:.6} s, clients {at_least:?}..{at_most:?}");
    assert_eq!(m.listener("observer_connections_queued_total", port), 5.0);
    assert_eq!(m.listener("observer_connections_accepted_total", port), 3.0);
    assert_eq!(count, 3.0);
    assert_eq!(
        m.get(
            "observer_kernel_events_lost_total",
            &[("reason", "wait_unknown")]
        ),
        Some(0.0)
    );
    assert!(
        within(sum, at_least, at_most, 3.0 * 0.002),
        "wait sum {sum} s is outside the clients' {at_least:?}..{at_most:?}"
    );
    // The two left waiting are what ss shows.
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        ss_listen_queues(port)[0].0 as f64
    );
    assert_eq!(m.listener("observer_listen_queue_length", port), 2.0);
}

#[test]
fn queued_and_accepted_counts_and_wait_sum_match_the_clients_ipv4() {
    counts_and_waits_match_clients("127.0.0.1:0");
}

#[test]
fn queued_and_accepted_counts_and_wait_sum_match_the_clients_ipv6() {
    counts_and_waits_match_clients("[::1]:0");
}

#[test]
fn waits_land_in_the_histogram_bucket_of_their_length() {
    let daemon = Daemon::start();
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 16);
    let port = listener.local_addr().expect("addr").port();
    let (_clients, _) = connect_clients(listener.local_addr().expect("addr"), 1);
    std::thread::sleep(Duration::from_millis(700));
    let _conn = listener.accept().expect("accept");
    let m = daemon.scrape();
    let bucket = |le: &str| {
        m.get(
            "observer_accept_queue_wait_seconds_bucket",
            &[("port", &port.to_string()), ("le", le)],
        )
        .unwrap_or_else(|| panic!("bucket le={le} missing"))
    };
    // 700 ms: above the 0.5 s bound, within the 1 s bound.
    assert_eq!(bucket("0.5"), 0.0);
    assert_eq!(bucket("1"), 1.0);
    assert_eq!(bucket("+Inf"), 1.0);
}

#[test]
fn a_client_trickling_data_while_queued_does_not_shorten_its_wait() {
    let daemon = Daemon::start();
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 16);
    let port = listener.local_addr().expect("addr").port();
    let (mut clients, connected_at) = connect_clients(listener.local_addr().expect("addr"), 1);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        clients[0].write_all(b"X-Slow: 1\r\n").expect("trickle");
    }
    std::thread::sleep(Duration::from_millis(100));
    let (_conn, at_least, at_most) = accept_timed(&listener, &connected_at);
    let sum = daemon
        .scrape()
        .listener("observer_accept_queue_wait_seconds_sum", port);
    // A trickle that restarted the clock would show ≤ 100 ms.
    assert!(
        within(sum, at_least, at_most, 0.002),
        "observer {sum} s vs the client's {at_least:?}..{at_most:?}"
    );
}

#[test]
fn a_closed_listener_disappears_from_the_output() {
    let daemon = Daemon::start();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    assert!(
        daemon.scrape().has_listener(port),
        "new listener is exported"
    );
    drop(listener);
    assert!(ss_listen_queues(port).is_empty(), "ss no longer shows it");
    let m = daemon.scrape();
    assert!(
        !m.has_listener(port),
        "closed listener still exported:\n{}",
        m.text
    );
    assert!(
        m.get(
            "observer_connections_accepted_total",
            &[("port", &port.to_string())]
        )
        .is_none()
    );
}

#[test]
fn the_daemon_exports_its_build_info_and_stops_cleanly_on_sigterm() {
    let daemon = Daemon::start();
    let m = daemon.scrape();
    let source = support::expected_accept_source();
    assert_eq!(
        m.get("observer_build_info", &[("accept_source", &source)]),
        Some(1.0),
        "build_info does not name accept source {source}"
    );
    assert_eq!(
        m.get(
            "observer_kernel_events_lost_total",
            &[("reason", "accept_map_full")]
        ),
        Some(0.0)
    );
    let status = daemon.terminate();
    assert!(status.success(), "observer exited with {status} on SIGTERM");
}

#[test]
fn the_oldest_wait_follows_the_clients_clocks_while_nobody_accepts() {
    let listener = listen("127.0.0.1:0".parse().expect("addr"), 16);
    let local = listener.local_addr().expect("local addr");
    let daemon = Daemon::start();
    let m = daemon.scrape();
    // Nothing queued yet: a quiet listener, whose oldest wait (0) is not
    // exported; its depth is.
    let port = local.port().to_string();
    assert_eq!(
        m.get("observer_listen_queue_oldest_seconds", &[("port", &port)]),
        None
    );
    assert_eq!(
        m.listener("observer_listen_queue_length", local.port()),
        0.0
    );
    let first = Instant::now();
    let (_clients, _) = connect_clients(local, 1);
    std::thread::sleep(Duration::from_millis(700));
    let (_more, _) = connect_clients(local, 2);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let before = first.elapsed().as_secs_f64();
        let oldest = daemon
            .scrape()
            .listener("observer_listen_queue_oldest_seconds", local.port());
        let after = first.elapsed().as_secs_f64();
        println!("oldest {oldest:.3} s, clients' clock {before:.3}..{after:.3} s");
        assert!(
            oldest >= before - 0.1 && oldest <= after + 0.1,
            "oldest {oldest} s is not the first client's age ({before}..{after} s)"
        );
    }
    // Accepting the head makes the next connection the oldest.
    let (_conn, _) = listener.accept().expect("accept");
    let oldest = daemon
        .scrape()
        .listener("observer_listen_queue_oldest_seconds", local.port());
    assert!(
        oldest < first.elapsed().as_secs_f64() - 0.5,
        "after the first accept, the oldest ({oldest} s) is a later client"
    );
}

#[test]
fn reuseport_sockets_are_reported_one_by_one_with_a_stopped_holder_s_queue_growing() {
    let port = support::free_port();
    // One socket of the group is held by a process that stops: nobody
    // accepts from it, while this process accepts from its sibling.
    let (mut stopped, sibling) = support::reuseport_pair_with_a_stopped_holder(port);
    let daemon = Daemon::start();
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    sibling.set_nonblocking(true).expect("nonblocking");
    while sibling.accept().is_ok() {}
    std::thread::sleep(Duration::from_millis(1200));
    let m = daemon.scrape();
    let ss = ss_sockets(port);
    println!("ss: {ss:?}\n{}", m.text);
    assert_eq!(ss.len(), 2);
    assert_eq!(m.listener("observer_listen_sockets", port), 2.0);
    let p = port.to_string();
    for (depth, limit, inode) in &ss {
        let labels = [("port", p.as_str()), ("socket", inode.as_str())];
        let get = |name: &str| {
            m.get(name, &labels)
                .unwrap_or_else(|| panic!("{name} of socket {inode} missing"))
        };
        assert_eq!(get("observer_listen_socket_queue_length"), *depth as f64);
        assert_eq!(get("observer_listen_socket_queue_max"), *limit as f64);
        assert_eq!(get("observer_listen_socket_holders"), 1.0);
        let oldest = get("observer_listen_socket_queue_oldest_seconds");
        if *depth > 0 {
            // The stopped holder's socket: its head has waited since the clients connected.
            assert!(
                oldest >= 1.1 && oldest <= started.elapsed().as_secs_f64() + 0.1,
                "{oldest}"
            );
        } else {
            assert_eq!(oldest, 0.0);
        }
    }
    assert!(
        ss.iter().any(|s| s.0 > 0),
        "the kernel put some clients on the stopped socket"
    );
    let held_by_python = m.samples.iter().any(|(n, l, _)| {
        n == "observer_listen_socket_holder_info" && l.get("pid") == Some(&stopped.id().to_string())
    });
    assert!(held_by_python, "the stopped holder is named");
    let _ = stopped.kill();
    let _ = stopped.wait();
}
