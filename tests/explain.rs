//! `observer explain` against scenarios whose cause the test made: a
//! gunicorn pool too small for its load (saturated, with the workers Little's
//! law needs = the clients' arrival rate × the app's 0.3 s), the same pool
//! SIGSTOPped (not accepting, naming the stopped workers), a listener nobody
//! accepts from (no acceptor), a backlog-8 listener flooded (overflowing,
//! drops = nstat), a reuseport group steered to one socket (uneven, the
//! share = the server's own log), a light load (healthy).
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Netns, WSGI_APP, children_of, free_port, observer_bin, ss_listen_queues, start_connects,
};

/// A server the test started, as a process group (killed on drop).
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    /// gunicorn with `workers` sync workers on a free loopback port.
    fn gunicorn(workers: u32) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("observer-explain-{port}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("app.py"), WSGI_APP).expect("app.py");
        let mut cmd = Command::new("gunicorn");
        cmd.args([
            "-w",
            &workers.to_string(),
            "-b",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--backlog", "64", "app:app"])
        .current_dir(&dir);
        Self::spawn("gunicorn", cmd, port, dir, workers as usize)
    }

    /// Apache httpd with Debian's default MPM (event) and Apache's default
    /// `AcceptFilter http data` (TCP_DEFER_ACCEPT: each handshake's bare ACK
    /// is discarded into the listener's `sk_drops`): 2 children × 2 worker
    /// threads, every URL a CGI that sleeps for its query string's seconds.
    fn apache_event() -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("observer-explain-{port}"));
        let conf = support::apache_setup(
            &dir,
            "event",
            "StartServers 2\nServerLimit 2\nThreadsPerChild 2\nMaxRequestWorkers 4\n\
             MinSpareThreads 1\nMaxSpareThreads 4",
            &[port],
        );
        let mut cmd = Command::new("apache2");
        cmd.args(["-f", &conf, "-DFOREGROUND"]);
        Self::spawn("apache2", cmd, port, dir, 2)
    }

    /// Starts `cmd` as its own process group and waits until it listens on
    /// `port` with at least `workers` children.
    fn spawn(name: &str, mut cmd: Command, port: u16, dir: PathBuf, workers: usize) -> Server {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} (cargo xtask setup installs it): {e}"));
        let server = Server { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while ss_listen_queues(port).is_empty() || server.workers().len() < workers {
            assert!(Instant::now() < deadline, "{name} did not start on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn workers(&self) -> Vec<u32> {
        children_of(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we started.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGCONT);
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `clients` threads making requests (a new connection each, reply delayed
/// by `sleep_s`) until `stop`; `made` counts connections, with when.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    connects: Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl Load {
    fn start(port: u16, clients: usize, sleep_s: f64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stagger = Duration::from_secs_f64(sleep_s / clients as f64);
        let threads = (0..clients)
            .map(|i| {
                let (stop, connects) = (stop.clone(), connects.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(stagger * i as u32);
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        };
                        if let Ok(mut c) = connects.lock() {
                            c.push(Instant::now());
                        }
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let _ = write!(s, "GET /?{sleep_s} HTTP/1.0\r\n\r\n");
                        let mut reply = String::new();
                        let _ = s.read_to_string(&mut reply);
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            connects,
        }
    }

    /// Connections the clients made between `from` and `to`.
    fn connects_between(&self, from: Instant, to: Instant) -> usize {
        self.connects
            .lock()
            .map(|c| c.iter().filter(|t| **t >= from && **t <= to).count())
            .unwrap_or(0)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `observer explain --json` with `args`; returns the listeners it
/// explained, and when its window ran (from the first collection, which
/// comes after the programs load, to its exit).
fn explain(args: &[&str]) -> (Vec<Value>, Instant, Instant) {
    let started = Instant::now();
    let out = Command::new(observer_bin())
        .args(["explain", "--json"])
        .args(args)
        .output()
        .expect("run observer explain");
    let ended = Instant::now();
    assert!(
        out.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("explain --json is JSON");
    (doc.as_array().cloned().unwrap_or_default(), started, ended)
}

fn the_one(listeners: &[Value]) -> &Value {
    assert_eq!(listeners.len(), 1, "{listeners:#?}");
    &listeners[0]
}

fn kind(e: &Value) -> &str {
    e["verdict"]["kind"].as_str().unwrap_or("")
}

fn evidence(e: &Value) -> String {
    e["verdict"]["evidence"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn a_pool_too_small_for_its_load_is_saturated_and_littles_law_sizes_it() {
    let server = Server::gunicorn(2);
    let load = Load::start(server.port, 8, 0.3);
    std::thread::sleep(Duration::from_secs(2));
    let port = server.port.to_string();
    let (listeners, started, ended) = explain(&["--interval", "6", "--port", &port]);
    let e = the_one(&listeners);
    assert_eq!(kind(e), "saturated", "{e:#}");
    // The truth: the clients' own connections per second over the run.
    let rate =
        load.connects_between(started, ended) as f64 / ended.duration_since(started).as_secs_f64();
    let needed = e["verdict"]["workers_needed"]
        .as_f64()
        .expect("workers_needed");
    println!(
        "saturated: needs {needed}, clients' rate {rate:.2}/s × 0.3 s = {:.2}\n{}",
        rate * 0.3,
        evidence(e)
    );
    // workers_needed is Little's law rounded up: the ceiling of a load
    // within 10% of the clients' (their rate is over a slightly longer
    // window than the kernel's, and a request holds a worker a little
    // longer than its sleep). Rounding up 2.01 gives 3 where 1.99 gives 2.
    let truth = rate * 0.3;
    assert!(
        ((truth * 0.9).ceil()..=(truth * 1.1).ceil()).contains(&needed),
        "workers needed {needed} vs the clients' {rate:.2}/s × 0.3 s = {truth:.2}, rounded up"
    );
    assert!(
        evidence(e).contains("2 workers, all busy"),
        "{}",
        evidence(e)
    );
}

#[test]
fn a_stopped_pool_is_not_accepting_and_its_stopped_workers_are_named() {
    let server = Server::gunicorn(2);
    let workers = server.workers();
    for pid in &workers {
        // SAFETY: kill(2) on gunicorn's workers, which this test started.
        unsafe { libc::kill(*pid as i32, libc::SIGSTOP) };
    }
    let _waiting: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    let port = server.port.to_string();
    let (listeners, _, _) = explain(&["--interval", "3", "--port", &port]);
    let e = the_one(&listeners);
    assert_eq!(kind(e), "not_accepting", "{e:#}");
    let text = evidence(e);
    println!("stopped:\n{text}\n{}", e["verdict"]["fix"]);
    assert!(text.contains("stopped (state T): 2 of 2"), "{text}");
    for pid in &workers {
        assert!(text.contains(&pid.to_string()), "{pid} not named: {text}");
    }
    assert_eq!(
        e["window"]["queue_len"], 3,
        "the 3 clients wait (ss says 3)"
    );
    assert_eq!(ss_listen_queues(server.port)[0].0, 3);
}

#[test]
fn a_listener_nobody_accepts_from_is_not_accepting_with_no_acceptor() {
    let listener = support::listen("127.0.0.1:0".parse().expect("addr"), 16);
    let port = listener.local_addr().expect("addr").port();
    let _waiting: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let (listeners, _, _) = explain(&["--interval", "3", "--port", &port.to_string()]);
    let e = the_one(&listeners);
    assert_eq!(kind(e), "not_accepting", "{e:#}");
    let fix = e["verdict"]["fix"].as_str().unwrap_or("");
    println!("no acceptor:\n{}\nfix: {fix}", evidence(e));
    assert!(fix.starts_with("no acceptor"), "{fix}");
    assert!(
        evidence(e).contains(&std::process::id().to_string()),
        "the holder (this test, {}) is named: {}",
        std::process::id(),
        evidence(e)
    );
    drop(listener);
}

#[test]
fn a_flooded_backlog_8_listener_is_overflowing_with_drops_equal_to_nstat() {
    let ns = Netns::new();
    let port = 8082;
    let listener: TcpListener =
        ns.enter(move || support::listen(format!("127.0.0.1:{port}").parse().expect("addr"), 8));
    // An acceptor that starts paused, then takes everything.
    let go = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let acceptor = {
        let (go, stop, accepted) = (go.clone(), stop.clone(), accepted.clone());
        listener.set_nonblocking(true).expect("nonblocking");
        let netns = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("netns");
        std::thread::spawn(move || {
            // The serving thread lives in the listener's namespace, as a
            // server's would (explain reads somaxconn through it).
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                if go.load(Ordering::Relaxed) {
                    while let Ok((conn, _)) = listener.accept() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let drops_before = ns.nstat("TcpExtListenDrops");
    let inode = ns.inode();
    let explaining = {
        let (port, inode) = (port.to_string(), inode.clone());
        std::thread::spawn(move || {
            explain(&["--interval", "6", "--port", &port, "--netns", &inode])
        })
    };
    // After the programs load and the first collection (well under 2 s).
    std::thread::sleep(Duration::from_secs(2));
    let clients = start_connects(&ns, port, 40);
    std::thread::sleep(Duration::from_millis(1500)); // a SYN retry each
    drop(clients); // stops the retries
    go.store(true, Ordering::Relaxed);
    let (listeners, _, _) = explaining.join().expect("explain thread");
    let nstat_drops = ns.nstat("TcpExtListenDrops") - drops_before;
    let e = the_one(&listeners);
    println!(
        "overflowing: nstat {nstat_drops}, accepted {}\n{}\nfix: {}",
        accepted.load(Ordering::Relaxed),
        evidence(e),
        e["verdict"]["fix"]
    );
    assert_eq!(kind(e), "overflowing", "{e:#}");
    assert!(nstat_drops >= 30.0, "the flood was dropped: {nstat_drops}");
    assert_eq!(
        e["window"]["drops"].as_f64(),
        Some(nstat_drops),
        "drops vs nstat"
    );
    assert!(
        evidence(e).contains("the backlog in effect is 8"),
        "{}",
        evidence(e)
    );
    let somaxconn = ns.exec(&["cat", "/proc/sys/net/core/somaxconn"]);
    assert!(
        evidence(e).contains(&format!(
            "net.core.somaxconn is {}: not the cap; the app asked for 8",
            somaxconn.trim()
        )),
        "{}",
        evidence(e)
    );
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
}

/// One client of 50 ms requests on `server`, explained over `interval`:
/// its one listener's verdict, which must be healthy with at least
/// `accepts` in the window.
fn healthy_under_light_load(server: &Server, interval: &str, accepts: u64) -> Value {
    let _load = Load::start(server.port, 1, 0.05);
    std::thread::sleep(Duration::from_secs(1));
    let port = server.port.to_string();
    let (listeners, _, _) = explain(&["--interval", interval, "--port", &port]);
    let e = the_one(&listeners).clone();
    println!("light load:\n{}", evidence(&e));
    assert_eq!(kind(&e), "healthy", "{e:#}");
    assert!(
        e["window"]["accepts"].as_u64().unwrap_or(0) >= accepts,
        "{e:#}"
    );
    e
}

#[test]
fn a_lightly_loaded_pool_is_healthy() {
    healthy_under_light_load(&Server::gunicorn(2), "3", 20);
}

/// Apache as Debian ships it (event MPM, `AcceptFilter http data`) under a
/// light load is healthy: the bare ACK its TCP_DEFER_ACCEPT listener
/// discards for every connection is no drop, so not "overflowing".
#[test]
fn a_lightly_loaded_apache_with_its_default_accept_filter_is_healthy_not_overflowing() {
    let e = healthy_under_light_load(&Server::apache_event(), "3s", 10);
    if support::doctor_says_drops_counted() {
        assert_eq!(e["window"]["drops"].as_u64(), Some(0), "{e:#}");
    } else {
        assert!(
            e["window"]["drops"].is_null(),
            "no drops, not false ones: {e:#}"
        );
    }
}

#[test]
fn the_text_output_names_the_verdict_evidence_and_fix() {
    let listener = support::listen("127.0.0.1:0".parse().expect("addr"), 16);
    let port = listener.local_addr().expect("addr").port();
    let _waiting = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let out = Command::new(observer_bin())
        .args(["explain", "--interval", "2", "--port", &port.to_string()])
        .output()
        .expect("run observer explain");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("127.0.0.1:{port} (netns "))
            && lines[0].ends_with(": NOT ACCEPTING"),
        "{text}"
    );
    assert!(lines[1].trim_start().starts_with("wait mean"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("fix: no acceptor")),
        "{text}"
    );
    drop(listener);
}

/// 4 workers, one SO_REUSEPORT socket each; a classic BPF program on the
/// group sends every connection to socket 0. Each worker logs its pid per
/// request served.
const STEERED_SERVER: &str = r#"import ctypes, os, socket, struct, sys
port, log = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(4):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    socks.append(s)
insn = (ctypes.c_ubyte * 8)(*struct.pack("HBBI", 0x06, 0, 0, 0))  # ret #0
socks[0].setsockopt(socket.SOL_SOCKET, 51, struct.pack("HxxxxxxQ", 1, ctypes.addressof(insn)))
for s in socks:
    if os.fork() == 0:
        for other in socks:
            if other is not s:
                other.close()
        while True:
            c, _ = s.accept()
            c.recv(1024)
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\nok\n")
            c.close()
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
for s in socks:
    s.close()
os.wait()
"#;

#[test]
fn a_reuseport_group_steered_to_one_socket_is_uneven_as_the_servers_log_says() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("observer-explain-steered-{port}"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("server.py"), STEERED_SERVER).expect("server.py");
    let log = dir.join("served.log");
    let child = Command::new("python3")
        .arg("server.py")
        .arg(port.to_string())
        .arg(&log)
        .current_dir(&dir)
        .process_group(0)
        .spawn()
        .expect("python3");
    let server = Server {
        child,
        port,
        dir: dir.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ss_listen_queues(port).len() < 4 || children_of(server.pid()).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the steered server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let explaining =
        std::thread::spawn(move || explain(&["--interval", "5", "--port", &port.to_string()]));
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..100 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET / HTTP/1.0\r\n\r\n");
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
    let (listeners, _, _) = explaining.join().expect("explain");
    let e = the_one(&listeners);
    println!("uneven:\n{}\nfix: {}", evidence(e), e["verdict"]["fix"]);
    assert_eq!(kind(e), "uneven", "{e:#}");
    // The truth: which worker served how many, by its own log.
    let served = std::fs::read_to_string(&log).unwrap_or_default();
    let mut per_pid: std::collections::BTreeMap<&str, usize> = Default::default();
    for pid in served.lines() {
        *per_pid.entry(pid).or_default() += 1;
    }
    let (top_pid, top) = per_pid
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(p, n)| (p.to_string(), *n))
        .expect("the server served");
    let total: usize = per_pid.values().sum();
    assert_eq!(total, 100, "{per_pid:?}");
    let window_accepts = e["window"]["accepts"].as_u64().unwrap_or(0) as usize;
    assert_eq!(window_accepts, total, "accepts in the window = the log's");
    let share = 100.0 * top as f64 / total as f64;
    assert!(
        evidence(e).contains(&format!(
            "worker {top_pid} (python3) took {share:.0}% of {total} accepts"
        )),
        "the log says {top_pid} served {top} of {total}: {}",
        evidence(e)
    );
    assert!(
        e["verdict"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains("one of the 4 sockets"),
        "{e:#}"
    );
}
