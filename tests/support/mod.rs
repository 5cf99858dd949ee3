//! Helpers shared by the end-to-end tests: start the real observer binary,
//! scrape it, and read the kernel's own view through `ss`.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{FromRawFd as _, IntoRawFd as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The observer binary under test (set by `cargo xtask test`).
pub fn observer_bin() -> PathBuf {
    std::env::var_os("OBSERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/observer")
        })
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `observer serve`, killed on drop.
pub struct Daemon {
    child: Child,
    pub port: u16,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// A daemon whose per-worker series carry the worker's pid too, for
    /// tests that hold a worker's figures against its own truth.
    pub fn start_with_pids() -> Daemon {
        Self::start_with(&["--collector.workers.pid"])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let port = free_port();
        let child = Command::new(observer_bin())
            .args([
                "serve",
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start observer");
        let mut daemon = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(port, "/healthz")
            .map(|b| b != "ok\n")
            .unwrap_or(true)
        {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("observer exited during start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "observer did not serve /healthz within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    pub fn scrape(&self) -> Metrics {
        Metrics::parse(&http_get(self.port, "/metrics").expect("scrape /metrics"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, as an OOM killer or an operator would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for observer");
        std::mem::forget(self);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 response.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// A process of idle threads that belong to no pool (a JVM's, a
/// sidecar's on a big host): python3, its threads asleep. Killed on drop.
pub struct ParkedThreads(std::process::Child);

impl ParkedThreads {
    pub fn start(n: usize) -> ParkedThreads {
        let script = format!(
            "import threading, time\n\
             threading.stack_size(64 * 1024)\n\
             for _ in range({n}):\n    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n\
             time.sleep(3600)\n"
        );
        let child = Command::new("python3")
            .args(["-c", &script])
            .spawn()
            .expect("start python3 to park threads");
        let parked = ParkedThreads(child);
        let tasks = format!("/proc/{}/task", parked.0.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_dir(&tasks).map_or(0, |t| t.count()) <= n {
            assert!(Instant::now() < deadline, "{n} threads not parked in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        parked
    }
}

impl Drop for ParkedThreads {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parsed Prometheus text: (name, labels) → value.
pub struct Metrics {
    pub text: String,
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once("=\""))
                .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                .collect();
            samples.push((
                name.to_owned(),
                labels,
                value.parse().expect("numeric value"),
            ));
        }
        Metrics {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of `name` whose labels include every pair in `want`.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Like `get` for a listener on `port`, panicking with the scrape if absent.
    pub fn listener(&self, name: &str, port: u16) -> f64 {
        let port = port.to_string();
        self.get(name, &[("port", &port)])
            .unwrap_or_else(|| panic!("{name} for port {port} missing from scrape:\n{}", self.text))
    }

    pub fn has_listener(&self, port: u16) -> bool {
        let port = port.to_string();
        self.get("observer_listen_queue_length", &[("port", &port)])
            .is_some()
    }
}

/// `ss -ltn` for one local port: (Recv-Q, Send-Q) per listening socket.
pub fn ss_listen_queues(port: u16) -> Vec<(u64, u64)> {
    ss_sockets(port)
        .into_iter()
        .map(|(queue, limit, _)| (queue, limit))
        .collect()
}

/// A listening socket with an exact backlog (std always asks for its own).
pub fn listen(addr: SocketAddr, backlog: i32) -> TcpListener {
    let l = TcpListener::bind(addr).expect("bind test listener");
    // SAFETY: listen(2) on a socket we own; calling it again only resizes the backlog.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), backlog) };
    assert_eq!(rc, 0, "listen({backlog})");
    let fd = l.into_raw_fd();
    // SAFETY: fd came from into_raw_fd just above.
    unsafe { TcpListener::from_raw_fd(fd) }
}

/// Runs a command to completion, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// A network namespace made for one test (loopback up), deleted on drop.
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "obs-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        assert!(
            run(Command::new("ip").args(["netns", "add", &name]))
                .status
                .success(),
            "ip netns add"
        );
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's inode: what observer's `netns` label holds.
    pub fn inode(&self) -> String {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
            .to_string()
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd));
        assert!(
            out.status.success(),
            "{cmd:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it
    /// creates belong to the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(format!("/run/netns/{}", self.name), f)
    }

    /// (Recv-Q, Send-Q) of the listener on `port`, per `ss` in the namespace.
    pub fn ss_listen(&self, port: u16) -> (f64, f64) {
        let out = self.exec(&["ss", "-Hltn", &format!("sport = :{port}")]);
        let f: Vec<f64> = out
            .split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        (f[0], f[1])
    }

    /// An absolute counter of `nstat` in the namespace (without touching its history).
    pub fn nstat(&self, counter: &str) -> f64 {
        let out = self.exec(&["nstat", "-asz", counter]);
        out.lines()
            .find_map(|l| {
                l.strip_prefix(counter)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{counter} missing from nstat: {out}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `127.0.0.1:port` as the sockaddr that libc's connect takes.
pub fn loopback_v4(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// What `observer doctor` found for each accept source on this kernel, best
/// first: (name, loads and attaches).
pub fn accept_sources_on_this_kernel() -> Vec<(String, bool)> {
    // Asked once per test binary: doctor loads every program three times.
    static SOURCES: std::sync::OnceLock<Vec<(String, bool)>> = std::sync::OnceLock::new();
    SOURCES.get_or_init(ask_doctor_for_accept_sources).clone()
}

fn ask_doctor_for_accept_sources() -> Vec<(String, bool)> {
    let out = run(Command::new(observer_bin())
        .arg("doctor")
        .env_remove("OBSERVER_ACCEPT_SOURCE"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let sources: Vec<(String, bool)> = stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let mark = words.next()?;
            let name = words.next()?;
            ["fexit", "kprobe", "tracepoint"]
                .contains(&name)
                .then(|| (name.to_owned(), mark == "ok"))
        })
        .collect();
    assert_eq!(
        sources.len(),
        3,
        "doctor printed no line per source:\n{stdout}"
    );
    sources
}

/// The accept sources that load on this kernel, best first.
pub fn loading_accept_sources() -> Vec<String> {
    accept_sources_on_this_kernel()
        .into_iter()
        .filter_map(|(name, loads)| loads.then_some(name))
        .collect()
}

/// Whether the accept source in use counts Unix-domain accepts: every
/// source but kprobe (a kretprobe cannot read `unix_accept`'s new socket;
/// `doctor` says so).
pub fn counts_unix_accepts() -> bool {
    expected_accept_source() != "kprobe"
}

/// Whether accept source `source` loads the program that stamps Unix
/// connects here, so that Unix-domain waits are timed: `doctor`'s programs
/// line says where it cannot (the tracepoint source's needs
/// `bpf_task_pt_regs`, Linux 5.15+).
pub fn stamps_unix_connects(source: &str) -> bool {
    !doctor_says("programs", source).contains("waits are not timed")
}

/// `doctor`'s line for check `name`, with accept source `source`.
fn doctor_says(name: &str, source: &str) -> String {
    let out = run(Command::new(observer_bin())
        .arg("doctor")
        .args(["--accept-source", source]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("doctor printed no {name} line"))
        .to_owned()
}

/// The accept source the daemon must be using: the one the environment forces
/// (`OBSERVER_ACCEPT_SOURCE`, as the VM matrix does), else the best that loads.
pub fn expected_accept_source() -> String {
    match std::env::var("OBSERVER_ACCEPT_SOURCE") {
        Ok(forced) if forced != "auto" => forced,
        _ => loading_accept_sources()
            .into_iter()
            .next()
            .expect("doctor says no accept source loads"),
    }
}

/// Asserts that `promtool check metrics` finds nothing wrong in `text`.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write as _;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

/// `ss -ltne` for one port: (Recv-Q, Send-Q, inode) per listening socket.
pub fn ss_sockets(port: u16) -> Vec<(u64, u64, String)> {
    let out = Command::new("ss")
        .args(["-Hltne", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.iter().find_map(|x| x.strip_prefix("ino:"))?;
            Some((f[1].parse().ok()?, f[2].parse().ok()?, inode.to_owned()))
        })
        .collect()
}

/// Two `SO_REUSEPORT` listeners on 127.0.0.1:`port` (backlog 64): one
/// held by a `python3` child that then stops itself (SIGSTOP: nobody
/// accepts from that socket), and its sibling, returned for the caller to
/// accept from. Kill the child when done.
pub fn reuseport_pair_with_a_stopped_holder(port: u16) -> (Child, TcpListener) {
    let stopped = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import socket,os,signal\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
                 s.bind(('127.0.0.1',{port})); s.listen(64)\n\
                 os.kill(os.getpid(), signal.SIGSTOP)\n\
                 signal.pause()"
            ),
        ])
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ss_sockets(port).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stopped holder never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (stopped, listen_on(socket_reuseport(port), 64))
}

/// A TCP socket with SO_REUSEPORT bound to 127.0.0.1:`port`, not yet listening.
fn socket_reuseport(port: u16) -> std::os::fd::OwnedFd {
    // SAFETY: plain socket calls on a descriptor we own; every return is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        assert_eq!(rc, 0);
        let addr = loopback_v4(port);
        let rc = libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "bind 127.0.0.1:{port}");
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

fn listen_on(fd: std::os::fd::OwnedFd, backlog: i32) -> TcpListener {
    // SAFETY: listen(2) on a socket we own.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, 0);
    TcpListener::from(fd)
}

/// The child processes of `pid`, sorted (`pgrep -P`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("pgrep");
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.sort();
    pids
}

/// Runs `f` on a thread that has entered the network namespace at `path`
/// (`/run/netns/NAME`, `/proc/PID/ns/net`): sockets it creates belong there.
pub fn in_netns<T: Send + 'static>(path: String, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
    .join()
    .expect("thread in netns")
}

/// Starts `n` non-blocking connects to 127.0.0.1:`port` from inside `ns`
/// (they complete, or keep retrying SYNs, in the background).
pub fn start_connects(ns: &Netns, port: u16, n: usize) -> Vec<std::os::fd::OwnedFd> {
    ns.enter(move || {
        (0..n)
            .map(|_| {
                // SAFETY: plain socket(2); the fd is owned by the OwnedFd below.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)
                };
                assert!(fd >= 0, "socket");
                let addr = loopback_v4(port);
                // SAFETY: connect with a sockaddr_in of the right size; EINPROGRESS is expected.
                unsafe {
                    libc::connect(
                        fd,
                        &addr as *const _ as *const libc::sockaddr,
                        std::mem::size_of_val(&addr) as u32,
                    )
                };
                // SAFETY: fd is a socket we just created and own.
                unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
            })
            .collect()
    })
}

/// Runs a command that must succeed; its stdout, trimmed.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A WSGI app that answers after the seconds its query string says (0.3
/// without one).
pub const WSGI_APP: &str = r#"import time
def app(environ, start_response):
    time.sleep(float(environ.get('QUERY_STRING') or 0.3))
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'ok\n']
"#;

/// The classic busy-worker semaphore, shared by all workers (created before
/// the fork), published to a file on every change.
pub const GUNICORN_HOOKS: &str = r#"import multiprocessing, os
busy = multiprocessing.Value('i', 0)
def _publish():
    tmp = os.environ['BUSY_FILE'] + '.tmp'
    with open(tmp, 'w') as f:
        f.write(str(busy.value))
    os.replace(tmp, os.environ['BUSY_FILE'])
def pre_request(worker, req):
    with busy.get_lock():
        busy.value += 1
        _publish()
def post_request(worker, req, environ, resp):
    with busy.get_lock():
        busy.value -= 1
        _publish()
"#;

/// Polls `f` (every 200 ms) until it gives a value, for at most `seconds`.
pub fn until<T>(what: &str, seconds: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `observer doctor` says a listener's discarded segments are
/// counted (its `drops` line is ok: Linux 6.11+ with CAP_SYSLOG), so that a
/// TCP_DEFER_ACCEPT listener has a drops series.
pub fn doctor_says_drops_counted() -> bool {
    let out = run(Command::new(observer_bin()).arg("doctor"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("ok   drops"))
}

/// An Apache httpd set up in `dir` for a test: its MPM `mpm` (`prefork`,
/// `event`, `worker`) with `mpm_lines` (pool size, mutex), listening on
/// loopback `ports` (the first serves, any other too), every path but
/// mod_status's a CGI that sleeps for its query string's seconds, and
/// mod_status at /server-status. Apache's own defaults stay, its
/// `AcceptFilter http data` (TCP_DEFER_ACCEPT) included. Writes the
/// configuration and the CGI (executable by `www-data`); returns the
/// configuration's path.
pub fn apache_setup(dir: &std::path::Path, mpm: &str, mpm_lines: &str, ports: &[u16]) -> String {
    let d = dir.display();
    let modules = "/usr/lib/apache2/modules";
    // A threaded MPM runs CGIs through the cgid daemon.
    let cgi_module = if mpm == "prefork" {
        format!("LoadModule cgi_module {modules}/mod_cgi.so\n")
    } else {
        format!("LoadModule cgid_module {modules}/mod_cgid.so\nScriptSock {d}/cgisock\n")
    };
    let listens: String = ports
        .iter()
        .map(|port| format!("Listen 127.0.0.1:{port}\n"))
        .collect();
    let conf = format!(
        "ServerRoot {d}\nServerName 127.0.0.1\nPidFile {d}/httpd.pid\nErrorLog {d}/error.log\n\
         DefaultRuntimeDir {d}\n\
         LoadModule mpm_{mpm}_module {modules}/mod_mpm_{mpm}.so\n\
         LoadModule authz_core_module {modules}/mod_authz_core.so\n\
         LoadModule status_module {modules}/mod_status.so\n\
         LoadModule alias_module {modules}/mod_alias.so\n\
         {cgi_module}User www-data\nGroup www-data\n{listens}{mpm_lines}\nExtendedStatus On\n\
         ScriptAliasMatch ^/(?!server-status) {d}/sleep.cgi\n\
         <Location /server-status>\n  SetHandler server-status\n  Require all granted\n</Location>\n"
    );
    let cgi =
        "#!/bin/sh\nsleep \"$QUERY_STRING\"\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n";
    std::fs::create_dir_all(dir).expect("apache dir");
    std::fs::write(dir.join("sleep.cgi"), cgi).expect("cgi");
    let conf_path = dir.join("httpd.conf");
    std::fs::write(&conf_path, conf).expect("httpd.conf");
    run_ok(Command::new("chmod").args(["755", &d.to_string(), &format!("{d}/sleep.cgi")]));
    conf_path.display().to_string()
}

/// What `bpftool -j ARGS` prints, parsed.
pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("bpftool").arg("-j").args(args));
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// The ids of the BPF programs a process holds open (`prog_id` in its
/// fds' fdinfo).
pub fn program_ids_held_by(pid: u32) -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Default::default();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// `EI_CLASS` of a 64-bit ELF file.
pub const ELF_64_BIT: u8 = 2;
/// `e_machine` of an arm64 ELF file.
pub const EM_AARCH64: u16 = 183;

/// The class and machine an ELF file's header names (`EI_CLASS`,
/// `e_machine`); `None` if `bytes` are not an ELF file.
pub fn elf_class_and_machine(bytes: &[u8]) -> Option<(u8, u16)> {
    if bytes.get(..4)? != b"\x7fELF" {
        return None;
    }
    Some((
        *bytes.get(4)?,
        u16::from_le_bytes([*bytes.get(18)?, *bytes.get(19)?]),
    ))
}
