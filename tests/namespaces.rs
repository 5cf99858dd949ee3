//! Listeners in network namespaces the tests create: each appears with its
//! own `netns`; SYN-queue depth and per-listener drops agree with `ss` and
//! `nstat` run inside the same namespace.
mod support;

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use support::{Daemon, Netns, start_connects};

fn listen_in(ns: &Netns, port: u16, backlog: i32) -> TcpListener {
    ns.enter(move || support::listen(format!("127.0.0.1:{port}").parse().expect("addr"), backlog))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn listeners_in_two_namespaces_appear_with_their_own_netns_depth_and_limit() {
    let daemon = Daemon::start();
    let (a, b) = (Netns::new(), Netns::new());
    let port = 8080; // the same port in both: only netns tells them apart
    let (_la, _lb) = (listen_in(&a, port, 5), listen_in(&b, port, 7));
    let (_ca, _cb) = (start_connects(&a, port, 2), start_connects(&b, port, 3));
    wait_until("queues to fill", || {
        a.ss_listen(port).0 == 2.0 && b.ss_listen(port).0 == 3.0
    });
    let m = daemon.scrape();
    let (ia, ib) = (a.inode(), b.inode());
    assert_ne!(ia, ib);
    for (ns, inode) in [(&a, &ia), (&b, &ib)] {
        let (recv_q, send_q) = ns.ss_listen(port);
        let labels = [("port", "8080"), ("netns", inode.as_str())];
        assert_eq!(
            m.get("observer_listen_queue_length", &labels),
            Some(recv_q),
            "depth in {inode}"
        );
        assert_eq!(
            m.get("observer_listen_queue_max", &labels),
            Some(send_q),
            "limit in {inode}"
        );
    }
}

#[test]
fn per_listener_drops_equal_the_namespace_listen_drops_from_nstat() {
    let daemon = Daemon::start();
    let ns = Netns::new();
    let port = 8081;
    let _listener = listen_in(&ns, port, 1);
    let drops_before = ns.nstat("TcpExtListenDrops");
    // Backlog 1 holds 2 connections; the other 18 SYNs (and their retries) are dropped.
    let clients = start_connects(&ns, port, 20);
    std::thread::sleep(Duration::from_millis(1500)); // at least one SYN retry each
    drop(clients); // closing stops the retries, so the counts settle
    std::thread::sleep(Duration::from_millis(200));
    let nstat_drops = ns.nstat("TcpExtListenDrops") - drops_before;
    let m = daemon.scrape();
    let inode = ns.inode();
    let labels = [("port", "8081"), ("netns", inode.as_str())];
    let observed = m
        .get("observer_listen_drops_total", &labels)
        .expect("drops series");
    println!("listen drops: observer {observed}, nstat {nstat_drops}");
    assert!(nstat_drops >= 18.0, "the flood was dropped: {nstat_drops}");
    assert_eq!(observed, nstat_drops);
    assert_eq!(
        ns.nstat("TcpExtListenOverflows") - drops_before,
        nstat_drops,
        "all drops were overflows"
    );
}

/// Sets TCP_DEFER_ACCEPT (Apache's `AcceptFilter http data`, nginx
/// `deferred`): the kernel discards each handshake's bare ACK into the
/// listener's `sk_drops` and queues the connection when data arrives.
fn defer_accept(listener: &TcpListener, seconds: i32) {
    // SAFETY: setsockopt on a socket we own, with an int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            &seconds as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(rc, 0, "TCP_DEFER_ACCEPT");
}

/// The listener's `sk_drops` as `ss -m` shows it (`d<N>` in skmem).
fn ss_sk_drops(ns: &Netns, port: u16) -> f64 {
    let out = ns.exec(&["ss", "-Hltnm", &format!("sport = :{port}")]);
    out.split(|c: char| c == ',' || c == ')' || c.is_whitespace())
        .find_map(|field| field.strip_prefix('d')?.parse().ok())
        .unwrap_or_else(|| panic!("no d<N> in ss -m: {out}"))
}

#[test]
fn a_deferred_accept_listener_counts_no_drop_for_its_discarded_acks_and_each_real_one() {
    let daemon = Daemon::start();
    let ns = Netns::new();
    let port = 8084;
    let listener = listen_in(&ns, port, 1);
    defer_accept(&listener, 5);
    let inode = ns.inode();
    let labels = [("port", "8084"), ("netns", inode.as_str())];
    let counters = || {
        (
            ns.nstat("TcpExtListenDrops"),
            ns.nstat("TcpExtTCPDeferAcceptDrop"),
            ss_sk_drops(&ns, port),
        )
    };

    // Served one at a time: nothing is lost, but each handshake's bare ACK
    // is discarded (and counted in sk_drops).
    let (drops_before, deferred_before, sk_drops_before) = counters();
    let served = 30;
    let server = {
        let listener = listener.try_clone().expect("clone listener");
        std::thread::spawn(move || {
            for _ in 0..served {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut request = [0u8; 16];
                let n = std::io::Read::read(&mut conn, &mut request).expect("read request");
                std::io::Write::write_all(&mut conn, &request[..n]).expect("answer");
            }
        })
    };
    let answered = ns.enter(move || {
        (0..served)
            .filter(|_| {
                let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                std::io::Write::write_all(&mut conn, b"ping").expect("send");
                let mut reply = [0u8; 4];
                std::io::Read::read_exact(&mut conn, &mut reply).is_ok()
            })
            .count()
    });
    server.join().expect("server");
    let (drops_after, deferred_after, sk_drops_after) = counters();
    let Some(observed) = daemon.scrape().get("observer_listen_drops_total", &labels) else {
        // Where the kernel cannot tell them apart (kfree_skb without
        // rx_sk, before 6.11), nothing is exported rather than a false
        // drop per connection: doctor says so.
        assert!(
            !support::doctor_says_drops_counted(),
            "doctor says drops are counted, yet no series"
        );
        return;
    };
    println!(
        "served {answered}: observer drops {observed}, ListenDrops +{}, TCPDeferAcceptDrop +{}, sk_drops +{}",
        drops_after - drops_before,
        deferred_after - deferred_before,
        sk_drops_after - sk_drops_before
    );
    assert_eq!(answered, served);
    assert!(
        deferred_after - deferred_before >= served as f64
            && sk_drops_after - sk_drops_before >= served as f64,
        "each handshake's bare ACK went into sk_drops"
    );
    assert_eq!(drops_after - drops_before, 0.0, "nothing was lost");
    assert_eq!(observed, 0.0, "no drop counted for the discarded ACKs");

    // Nobody accepts now: clients that send data fill the queue (backlog 1
    // holds 2), and the rest are dropped, at their SYN or at their ACK.
    let clients = start_connects(&ns, port, 20);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        for fd in &clients {
            // SAFETY: send on a socket we own; errors (not yet connected) are expected.
            unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    b"x".as_ptr() as *const libc::c_void,
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
    drop(clients); // closing stops the retries, so the counts settle
    std::thread::sleep(Duration::from_millis(300));
    let (drops_end, _, sk_drops_end) = counters();
    let observed_end = daemon
        .scrape()
        .get("observer_listen_drops_total", &labels)
        .expect("drops series");
    println!(
        "flood: observer drops {observed_end}, ListenDrops +{}, sk_drops +{}",
        drops_end - drops_after,
        sk_drops_end - sk_drops_after
    );
    assert!(drops_end - drops_after >= 10.0, "the flood was dropped");
    assert_eq!(
        observed_end,
        drops_end - drops_before,
        "drops = ListenDrops"
    );
}

#[test]
fn syn_queue_length_equals_half_open_connections_in_ss() {
    let daemon = Daemon::start();
    let ns = Netns::new();
    let port = 8082;
    // The server's SYN-ACKs never leave: handshakes stay half open.
    ns.exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--tcp-flags",
        "SYN,ACK",
        "SYN,ACK",
        "-j",
        "DROP",
    ]);
    let _listener = listen_in(&ns, port, 16);
    let _clients = start_connects(&ns, port, 3);
    let half_open = || {
        ns.exec(&[
            "ss",
            "-Htn",
            "state",
            "syn-recv",
            &format!("sport = :{port}"),
        ])
        .lines()
        .count() as f64
    };
    wait_until("3 half-open connections", || half_open() == 3.0);
    let m = daemon.scrape();
    let inode = ns.inode();
    let labels = [("port", "8082"), ("netns", inode.as_str())];
    assert_eq!(
        m.get("observer_listen_syn_queue_length", &labels),
        Some(half_open())
    );
    assert_eq!(
        m.get("observer_listen_queue_length", &labels),
        Some(0.0),
        "none completed"
    );
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
fn cgroup2_root() -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| f[1].to_owned())
        .expect("cgroup2 mounted")
}

/// A cgroup shaped like Docker's (`…/docker-<id>.scope`), removed on drop.
struct ContainerCgroup {
    dir: String,
    slice: String,
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(&self.slice);
    }
}

#[test]
fn a_listener_in_a_container_cgroup_gets_the_container_id_label() {
    let daemon = Daemon::start();
    let id = format!("{:064x}", 0x0b5e_47e5_u64 + std::process::id() as u64);
    let slice = format!("{}/obs-test-{}.slice", cgroup2_root(), std::process::id());
    let cgroup = ContainerCgroup {
        dir: format!("{slice}/docker-{id}.scope"),
        slice,
    };
    std::fs::create_dir_all(&cgroup.dir).expect("create cgroup");
    let port = support::free_port();
    // The shell joins the cgroup, then becomes the server.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c 'import socket,time; s=socket.socket(); \
         s.bind((\"127.0.0.1\",{port})); s.listen(8); time.sleep(30)'",
        cgroup.dir
    );
    let mut server = Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .expect("start server");
    wait_until("the server to listen", || {
        !support::ss_listen_queues(port).is_empty()
    });
    let m = daemon.scrape();
    let labels = [("port", port.to_string()), ("container_id", id.clone())];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let found = m.get("observer_listen_queue_max", &labels);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        found,
        Some(8.0),
        "no series with container_id={id}:\n{}",
        m.text
    );
    // A host process's listener has no container label.
    let host = TcpListener::bind("127.0.0.1:0").expect("bind");
    let host_port = host.local_addr().expect("addr").port().to_string();
    let m = daemon.scrape();
    assert!(
        m.samples
            .iter()
            .any(|(n, l, _)| n == "observer_listen_queue_max"
                && l.get("port") == Some(&host_port)
                && !l.contains_key("container_id"))
    );
}

/// A process in `ns` holding a TCP listener with 3 queued connections and
/// an abstract Unix listener with 2, until killed.
fn spawn_listeners_in(ns: &Netns) -> std::process::Child {
    let script = "import socket,time\n\
                  t=socket.socket(); t.bind(('127.0.0.1',8080)); t.listen(8)\n\
                  u=socket.socket(socket.AF_UNIX); u.bind('\\0observer-vanishing'); u.listen(8)\n\
                  c=[socket.create_connection(('127.0.0.1',8080)) for _ in range(3)]\n\
                  d=[socket.socket(socket.AF_UNIX) for _ in range(2)]\n\
                  [s.connect('\\0observer-vanishing') for s in d]\n\
                  time.sleep(60)";
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", script])
        .spawn()
        .expect("python3 in the namespace")
}

#[test]
fn namespaces_that_vanish_while_scraped_never_break_the_exposition() {
    let daemon = Daemon::start();
    let churn = std::thread::spawn(|| {
        for _ in 0..6 {
            let ns = Netns::new();
            let mut holder = spawn_listeners_in(&ns);
            std::thread::sleep(Duration::from_millis(400));
            let _ = holder.kill();
            let _ = holder.wait();
            drop(ns); // `ip netns del`: the namespace goes once its sockets do
        }
    });
    let mut scrapes = 0;
    let mut saw_one = false;
    while !churn.is_finished() && scrapes < 200 {
        let m = daemon.scrape();
        support::promtool_check_metrics(&m.text);
        saw_one |= m.text.contains("path=\"@observer-vanishing\"");
        scrapes += 1;
    }
    churn.join().expect("churn thread");
    assert!(saw_one, "no scrape caught a namespace's listeners");
    let m = daemon.scrape();
    support::promtool_check_metrics(&m.text);
    println!("{scrapes} scrapes during the churn");
}
