//! The queue after accept: connections a server accepted ahead of its
//! workers, whose requests nobody has started to read, against the
//! clients' own counts and clocks.
mod support;

use std::{
    collections::HashMap,
    io::Write as _,
    net::TcpStream,
    process::{Child, Command},
    time::{Duration, Instant},
};

use support::{Daemon, children_of, free_port, ss_listen_queues};

/// A server that accepts every connection at once and hands it to one
/// worker thread, which reads a request, sleeps `sleep_s` and replies:
/// the shape of threaded and event-loop servers with a busy pool.
fn accept_ahead_server(port: u16, sleep_s: f64) -> Child {
    let script = format!(
        "import socket,threading,queue,time\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1',{port})); l.listen(64)\n\
         q=queue.Queue()\n\
         def work():\n\
         \x20   while True:\n\
         \x20       c=q.get(); c.recv(1024); time.sleep({sleep_s})\n\
         \x20       c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nok'); c.close()\n\
         threading.Thread(target=work, daemon=True).start()\n\
         while True:\n\
         \x20   c,_=l.accept(); q.put(c)\n"
    );
    python_server(&script, port)
}

/// Runs `script` with python3 and waits until it listens on `port`.
fn python_server(script: &str, port: u16) -> Child {
    let child = Command::new("python3")
        .args(["-c", script])
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ss_listen_queues(port).is_empty() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A client that connected and sent its request, with its clock around
/// the connect.
struct Client {
    _stream: TcpStream,
    before: Instant,
    after: Instant,
}

fn send_request(port: u16) -> Client {
    let before = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let after = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send the request");
    Client {
        _stream: stream,
        before,
        after,
    }
}

#[test]
fn unread_connections_and_the_oldest_one_match_the_clients_and_idle_ones_are_not_unread() {
    let port = free_port();
    let mut server = accept_ahead_server(port, 5.0);
    let daemon = Daemon::start_with_pids();
    // 5 requests 150 ms apart: the worker reads the first and sleeps; the
    // other 4 are accepted and wait unread. A sixth client sends nothing
    // (a keep-alive connection between requests): not unread.
    let mut clients = Vec::new();
    for i in 0..5 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
        clients.push(send_request(port));
    }
    let _idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::thread::sleep(Duration::from_millis(400));
    let (start, m, end) = (Instant::now(), daemon.scrape(), Instant::now());
    let p = port.to_string();
    let get = |name: &str| m.get(name, &[("port", p.as_str())]);
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        0.0,
        "every connection was accepted"
    );
    assert_eq!(get("observer_connections_unread"), Some(4.0));
    let me = server.id().to_string();
    assert_eq!(
        m.get(
            "observer_worker_connections_unread",
            &[("port", p.as_str()), ("pid", me.as_str())]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "observer_worker_active_connections",
            &[("port", p.as_str()), ("pid", me.as_str())]
        ),
        Some(6.0)
    );
    // The oldest unread is the second client's: queued when it connected.
    let oldest = get("observer_connections_unread_oldest_seconds").unwrap_or(-1.0);
    let low = start.duration_since(clients[1].after).as_secs_f64();
    let high = end.duration_since(clients[1].before).as_secs_f64();
    assert!(
        oldest >= low - 0.002 && oldest <= high + 0.002,
        "oldest unread {oldest} s; the second client connected {low}..{high} s before"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// A server whose worker processes publish their own truth: each writes
/// `dir/PID` (requests in flight, requests served, milliseconds spent in
/// handlers) on every change and `dir/PID.ready` once it serves, and logs
/// every handler start to `dir/starts` as `REQUEST-ID UNIX-MS`.
struct AppPool {
    parent: Child,
    dir: std::path::PathBuf,
    workers: Vec<u32>,
}

impl AppPool {
    /// Writes `files` into a fresh directory, starts `cmd` there with
    /// `APP_DIR` set to it, and waits for `workers` workers to be ready.
    fn start(
        name: &str,
        files: &[(&str, &str)],
        cmd: &[&str],
        envs: &[(&str, &str)],
        workers: usize,
    ) -> AppPool {
        let dir = std::env::temp_dir().join(format!("observer-{name}-{}", free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("app dir");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write app file");
        }
        let parent = Command::new(cmd[0])
            .args(&cmd[1..])
            .current_dir(&dir)
            .env("APP_DIR", &dir)
            .envs(envs.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} (cargo xtask setup installs it): {e}"));
        let mut pool = AppPool {
            parent,
            dir,
            workers: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.workers.len() < workers {
            let log = std::fs::read_to_string(pool.dir.join("stderr.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "{name} did not start: {log}");
            std::thread::sleep(Duration::from_millis(50));
            pool.workers = pool.ready_workers();
        }
        pool
    }

    fn ready_workers(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready")?.parse().ok())
            .collect();
        pids.sort();
        pids
    }

    /// A worker's own (in flight, served, busy ms).
    fn truth(&self, pid: u32) -> (u64, u64, u64) {
        let text = std::fs::read_to_string(self.dir.join(pid.to_string())).unwrap_or_default();
        let n: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match n[..] {
            [a, b, c] => (a, b, c),
            _ => panic!("worker {pid} published {text:?}"),
        }
    }

    /// When each request's handler started, by request id (Unix ms).
    fn starts(&self) -> HashMap<u64, f64> {
        std::fs::read_to_string(self.dir.join("starts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (id, ms) = l.split_once(' ')?;
                Some((id.parse().ok()?, ms.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for AppPool {
    fn drop(&mut self) {
        let _ = self.parent.kill();
        let _ = self.parent.wait();
        for pid in &self.workers {
            // SAFETY: plain kill(2) of the pool's workers, ours.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node's `cluster`: the handler busy-waits `busy_ms` (a CPU-bound request).
const NODE_CLUSTER_APP: &str = r#"
const cluster = require('node:cluster');
const http = require('node:http');
const fs = require('node:fs');
const [port, workers, busyMs] = process.argv.slice(2);
const dir = process.env.APP_DIR;
if (cluster.isPrimary) {
  for (let i = 0; i < +workers; i++) cluster.fork();
} else {
  const state = `${dir}/${process.pid}`;
  let served = 0, busy = 0;
  const publish = (inFlight) => {
    fs.writeFileSync(`${state}.tmp`, `${inFlight} ${served} ${busy}\n`);
    fs.renameSync(`${state}.tmp`, state);
  };
  publish(0);
  http.createServer((req, res) => {
    const start = Date.now();
    publish(1);
    fs.appendFileSync(`${dir}/starts`, `${req.headers['x-id']} ${start}\n`);
    while (Date.now() - start < +busyMs) {}
    served += 1;
    busy += Date.now() - start;
    publish(0);
    res.end('ok');
  }).listen(+port, '127.0.0.1', () => fs.writeFileSync(`${state}.ready`, ''));
}
"#;

fn node_cluster(port: u16, policy: &str) -> AppPool {
    let port = port.to_string();
    AppPool::start(
        "node",
        &[("app.js", NODE_CLUSTER_APP)],
        &["node", "app.js", &port, "2", "300"],
        &[("NODE_CLUSTER_SCHED_POLICY", policy)],
        2,
    )
}

/// An ASGI app whose handler blocks the event loop for 300 ms.
const BLOCKING_ASGI_APP: &str = r#"import os, time
d = os.environ['APP_DIR']
state = f"{d}/{os.getpid()}"
served = busy = 0
def publish(in_flight):
    with open(state + '.tmp', 'w') as f:
        f.write(f"{in_flight} {served} {busy}\n")
    os.replace(state + '.tmp', state)
publish(0)
open(state + '.ready', 'w').close()
async def app(scope, receive, send):
    global served, busy
    start = time.time()
    publish(1)
    rid = dict(scope['headers']).get(b'x-id', b'0').decode()
    with open(f"{d}/starts", 'a') as f:
        f.write(f"{rid} {int(start * 1000)}\n")
    time.sleep(0.3)
    served += 1
    busy += int((time.time() - start) * 1000)
    publish(0)
    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-type', b'text/plain')]})
    await send({'type': 'http.response.body', 'body': b'ok'})
"#;

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Clients that each make `requests` requests in turn (one connection each,
/// `X-Id` numbered), recording when each connected (Unix ms, by id).
fn numbered_clients(
    port: u16,
    clients: u64,
    requests: u64,
) -> Vec<std::thread::JoinHandle<Vec<(u64, f64)>>> {
    (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut connected = Vec::new();
                for r in 0..requests {
                    let id = c * 1000 + r;
                    let at = unix_ms();
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    connected.push((id, at));
                    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                    let _ = write!(s, "GET / HTTP/1.0\r\nX-Id: {id}\r\n\r\n");
                    let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
                }
                connected
            })
        })
        .collect()
}

/// One scrape during the load, with the app's own truth around it.
struct PoolSample {
    /// Unix ms just before and just after the scrape.
    at_ms: (f64, f64),
    /// (pid, observer's busy, app's in flight before, after).
    busy: Vec<(u32, Option<f64>, u64, u64)>,
    /// Connections still in the accept queue, and the oldest one's wait.
    queued: f64,
    queued_oldest: f64,
    unread: f64,
    oldest: f64,
}

/// What a loaded pool showed, against its app's truth.
struct LoadedPool {
    samples: Vec<PoolSample>,
    /// When each client connection was made (Unix ms, by request id).
    connected: HashMap<u64, f64>,
    accepted_before: f64,
}

/// Makes the workers known (a worker fed by a dispatcher shows only once
/// a scrape sees it holding a connection: a request each, scraped while
/// they run), checks the pool is idle, then loads it with 6 clients (3 per
/// worker, 300 ms requests) and checks, sample by sample: busy per worker
/// = the app's in flight, and each worker's busy time over the load = its
/// handlers' time.
fn load_app_pool(daemon: &Daemon, port: u16, pool: &AppPool, what: &str) -> LoadedPool {
    let p = port.to_string();
    let pids: Vec<String> = pool.workers.iter().map(u32::to_string).collect();
    let worker_busy = |m: &support::Metrics, pid: &str| {
        m.get("observer_worker_busy", &[("port", &p), ("pid", pid)])
    };
    let busy_seconds = |m: &support::Metrics, pid: &str| {
        m.get(
            "observer_worker_busy_seconds_total",
            &[("port", &p), ("pid", pid)],
        )
        .unwrap_or(-1.0)
    };
    let mut seen = false;
    for _ in 0..10 {
        let warm = numbered_clients(port, 2, 1);
        std::thread::sleep(Duration::from_millis(150));
        let m = daemon.scrape();
        seen = pids.iter().all(|pid| worker_busy(&m, pid).is_some());
        for c in warm {
            let _ = c.join();
        }
        if seen {
            break;
        }
    }
    assert!(seen, "{what}: the workers never showed as the pool's");
    std::thread::sleep(Duration::from_millis(300));
    let m = daemon.scrape();
    assert_eq!(
        m.get("observer_workers", &[("port", &p), ("state", "idle")]),
        Some(pids.len() as f64),
        "{what}: every worker idle before the load:\n{}",
        m.text
    );
    let busy_before: Vec<(f64, u64)> = pool
        .workers
        .iter()
        .zip(&pids)
        .map(|(w, pid)| (busy_seconds(&m, pid), pool.truth(*w).2))
        .collect();
    let accepted_before = m
        .get("observer_connections_accepted_total", &[("port", &p)])
        .unwrap_or(0.0);
    let clients = numbered_clients(port, 6, 8);
    std::thread::sleep(Duration::from_millis(700));
    let mut samples = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(350));
        let before: Vec<(u64, u64, u64)> = pool.workers.iter().map(|w| pool.truth(*w)).collect();
        let t0 = unix_ms();
        let m = daemon.scrape();
        let t1 = unix_ms();
        let busy = pool
            .workers
            .iter()
            .zip(&before)
            .zip(&pids)
            .map(|((w, b), pid)| (*w, worker_busy(&m, pid), b.0, pool.truth(*w).0))
            .collect();
        samples.push(PoolSample {
            at_ms: (t0, t1),
            busy,
            queued: m.listener("observer_listen_queue_length", port),
            queued_oldest: m.listener("observer_listen_queue_oldest_seconds", port),
            unread: m
                .get("observer_connections_unread", &[("port", &p)])
                .unwrap_or(-1.0),
            oldest: m
                .get(
                    "observer_connections_unread_oldest_seconds",
                    &[("port", &p)],
                )
                .unwrap_or(-1.0),
        });
    }
    let connected: HashMap<u64, f64> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    // Busy: the samples whose truth held still around the scrape agree.
    let stable: Vec<_> = samples
        .iter()
        .flat_map(|s| &s.busy)
        .filter(|(_, _, before, after)| before == after)
        .collect();
    let agree = stable
        .iter()
        .filter(|(_, seen, truth, _)| *seen == Some(*truth as f64))
        .count();
    println!("{what}: busy (pid, observer, app before, app after): {stable:?}");
    assert!(
        stable.len() >= 10,
        "{what}: too few stable samples: {stable:?}"
    );
    assert!(
        agree * 10 >= stable.len() * 9,
        "{what}: busy agreed with the app in {agree} of {} samples",
        stable.len()
    );
    // Each worker's busy time over the load is its handlers' time (the
    // sampler's passes are 50 ms apart; every request is 300 ms).
    let m = daemon.scrape();
    for ((w, pid), (observer_before, app_before_ms)) in
        pool.workers.iter().zip(&pids).zip(&busy_before)
    {
        let (_, served, busy_ms) = pool.truth(*w);
        let observer_s = busy_seconds(&m, pid) - observer_before;
        let app_s = (busy_ms - app_before_ms) as f64 / 1000.0;
        println!(
            "{what}: worker {pid}: {served} served, {app_s:.2} s in handlers during the load, observer {observer_s:.2} s busy"
        );
        assert!(
            app_s >= 2.0,
            "{what}: worker {pid} served little: {app_s} s"
        );
        assert!(
            (observer_s - app_s).abs() <= 0.1 * app_s + 0.2,
            "{what}: worker {pid} busy {observer_s:.2} s, its handlers ran {app_s:.2} s"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let m = daemon.scrape();
    assert_eq!(
        m.get("observer_workers", &[("port", &p), ("state", "idle")]),
        Some(pids.len() as f64),
        "{what}: idle again:\n{}",
        m.text
    );
    LoadedPool {
        samples,
        connected,
        accepted_before,
    }
}

/// The clients waiting to be served are those in the two queues: the
/// accept queue (a worker that accepts for itself leaves them there while
/// its loop is busy) and the connections accepted but unread (held by
/// Node's primary, or handed to a worker whose loop is busy). Their number
/// is the clients whose request the app had not started (±1), and the
/// oldest is as old as the oldest of them by the clients' clocks (within
/// 20%). With `accept_ahead`, no client waits in the accept queue.
fn queues_match_the_clients(run: &LoadedPool, pool: &AppPool, what: &str, accept_ahead: bool) {
    let starts = pool.starts();
    // The clients waiting for all of the scrape, or at some instant of it.
    let waiting_between = |from: f64, to: f64| -> Vec<f64> {
        run.connected
            .iter()
            .filter(|(id, at)| **at < from && starts.get(id).is_none_or(|st| *st > to))
            .map(|(_, at)| *at)
            .collect()
    };
    let oldest_at = |waiting: &[f64], now: f64| {
        waiting
            .iter()
            .map(|at| (now - at) / 1000.0)
            .fold(0.0, f64::max)
    };
    let mut compared = 0;
    for s in &run.samples {
        let (t0, t1) = s.at_ms;
        let (surely, maybe) = (waiting_between(t0, t1), waiting_between(t1, t0));
        let (low, high) = (oldest_at(&surely, t0), oldest_at(&maybe, t1));
        let oldest = s.oldest.max(s.queued_oldest);
        let waiting = s.queued + s.unread;
        println!(
            "{what}: queued {} + unread {} (clients waiting {}..{}), oldest {oldest:.3} s (clients {low:.3}..{high:.3} s)",
            s.queued,
            s.unread,
            surely.len(),
            maybe.len()
        );
        if surely.is_empty() {
            continue;
        }
        compared += 1;
        if accept_ahead {
            assert_eq!(s.queued, 0.0, "{what}: the dispatcher accepts at once");
        }
        assert!(
            waiting >= surely.len() as f64 - 1.0 && waiting <= maybe.len() as f64 + 1.0,
            "{what}: {} queued and {} unread, {}..{} clients waiting to be served",
            s.queued,
            s.unread,
            surely.len(),
            maybe.len()
        );
        assert!(
            oldest >= low - (0.2 * low).max(0.05) && oldest <= high + (0.2 * high).max(0.05),
            "{what}: the oldest waited {oldest:.3} s, the clients' {low:.3}..{high:.3} s"
        );
    }
    assert!(
        compared >= 6,
        "{what}: clients waited in {compared} of 8 scrapes"
    );
}

#[test]
fn node_cluster_round_robin_workers_behind_the_primary_match_the_app() {
    let port = free_port();
    let daemon = Daemon::start_with_pids();
    let pool = node_cluster(port, "rr");
    let run = load_app_pool(&daemon, port, &pool, "node rr");
    queues_match_the_clients(&run, &pool, "node rr", true);
    let m = daemon.scrape();
    let p = port.to_string();
    let accepted = m.listener("observer_connections_accepted_total", port);
    assert_eq!(
        accepted - run.accepted_before,
        run.connected.len() as f64,
        "accepted = the clients' connections"
    );
    let primary = pool.parent.id().to_string();
    assert_eq!(
        m.get(
            "observer_dispatcher_accepts_total",
            &[("port", &p), ("pid", &primary)]
        ),
        Some(accepted),
        "the primary accepted every connection, and is a dispatcher"
    );
    assert_eq!(
        m.get("observer_worker_busy", &[("port", &p), ("pid", &primary)]),
        None,
        "the primary is not a worker"
    );
    for w in &pool.workers {
        let pid = w.to_string();
        assert_eq!(
            m.get(
                "observer_worker_busy",
                &[("port", &p), ("pid", &pid), ("comm", "node")]
            ),
            Some(0.0),
            "worker {pid}, between connections, idle and still named:\n{}",
            m.text
        );
    }
}

#[test]
fn node_cluster_workers_that_accept_for_themselves_match_the_app() {
    let port = free_port();
    let daemon = Daemon::start_with_pids();
    let pool = node_cluster(port, "none");
    let run = load_app_pool(&daemon, port, &pool, "node none");
    queues_match_the_clients(&run, &pool, "node none", false);
    let m = daemon.scrape();
    let p = port.to_string();
    // One request per connection: each worker's accepts are its requests.
    let mut accepted = 0.0;
    for w in &pool.workers {
        let (_, served, _) = pool.truth(*w);
        let pid = w.to_string();
        let accepts = m.get(
            "observer_worker_accepts_total",
            &[("port", &p), ("pid", &pid)],
        );
        println!("node none: worker {pid}: {accepts:?} accepts, {served} served");
        assert_eq!(
            accepts,
            Some(served as f64),
            "worker {pid}: accepts vs the app's requests"
        );
        accepted += served as f64;
    }
    assert_eq!(
        accepted,
        m.listener("observer_connections_accepted_total", port)
    );
    assert!(
        !m.text.contains("observer_dispatcher_accepts_total{"),
        "the primary only shares the listener: {}",
        m.text
    );
}

#[test]
fn uvicorn_workers_blocking_their_loop_are_busy_as_the_app_says() {
    let port = free_port();
    let daemon = Daemon::start_with_pids();
    let port_s = port.to_string();
    let pool = AppPool::start(
        "uvicorn",
        &[("app.py", BLOCKING_ASGI_APP)],
        &[
            "python3",
            "-m",
            "uvicorn",
            "--workers",
            "2",
            "--lifespan",
            "off",
            "--no-access-log",
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "app:app",
        ],
        &[],
        2,
    );
    load_app_pool(&daemon, port, &pool, "uvicorn");
}

/// A fork-per-connection server: the parent accepts, and each connection is
/// served by a child of its own that closes the listener.
fn fork_per_connection_server(port: u16, sleep_s: f64) -> Child {
    let script = format!(
        "import os,signal,socket,time\n\
         signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1',{port})); l.listen(64)\n\
         while True:\n\
         \x20   c,_=l.accept()\n\
         \x20   if os.fork()==0:\n\
         \x20       l.close(); c.recv(1024); time.sleep({sleep_s})\n\
         \x20       c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nok'); c.close(); os._exit(0)\n\
         \x20   c.close()\n"
    );
    python_server(&script, port)
}

#[test]
fn a_fork_per_connection_server_is_a_dispatcher_and_its_children_the_busy_workers() {
    let port = free_port();
    let daemon = Daemon::start_with_pids();
    let server = KilledOnDrop(fork_per_connection_server(port, 1.0));
    let p = port.to_string();
    // A scrape that sees the new listener, so that the next one reads its
    // connections (the holder iterator reports those of known listeners).
    assert!(daemon.scrape().has_listener(port));
    let clients: Vec<Client> = (0..3).map(|_| send_request(port)).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while children_of(server.0.id()).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the server never forked 3 children"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let children = children_of(server.0.id());
    let m = daemon.scrape();
    let seen: Vec<u32> = m
        .samples
        .iter()
        .filter(|(n, l, _)| n == "observer_worker_busy" && l.get("port") == Some(&p))
        .filter_map(|(_, l, v)| (*v == 1.0).then(|| l.get("pid")?.parse().ok()).flatten())
        .collect();
    let mut seen = seen;
    seen.sort();
    assert_eq!(
        seen, children,
        "the busy workers are the children serving:\n{}",
        m.text
    );
    assert_eq!(
        m.get("observer_workers", &[("port", &p), ("state", "busy")]),
        Some(3.0)
    );
    let parent = server.0.id().to_string();
    assert_eq!(
        m.get(
            "observer_dispatcher_accepts_total",
            &[("port", &p), ("pid", &parent)]
        ),
        Some(3.0)
    );
    drop(clients);
    // The children exit; the parent, waiting in accept(), stays the dispatcher.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !children_of(server.0.id()).is_empty() {
        assert!(Instant::now() < deadline, "the children never exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = daemon.scrape();
    assert_eq!(
        m.get("observer_worker_busy", &[("port", &p), ("pid", &parent)]),
        None,
        "{}",
        m.text
    );
    assert_eq!(
        m.get(
            "observer_dispatcher_accepts_total",
            &[("port", &p), ("pid", &parent)]
        ),
        Some(3.0)
    );
}

/// Server-side connections on `port`, by `ss` (the kernel's count).
fn ss_established(port: u16) -> usize {
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_worker_holding_thousands_of_connections_costs_a_bounded_scan_and_the_rest_is_counted() {
    const CLIENTS: usize = 4200;
    const BOUND: f64 = 4096.0; // observer_common::HELD_CONNECTIONS_PER_PROCESS
    let limit = libc::rlimit {
        rlim_cur: 16384,
        rlim_max: 16384,
    };
    // SAFETY: setrlimit with a valid struct, for this test process's fds.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let port = free_port();
    let script = format!(
        "import resource,socket\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (16384, 16384))\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1',{port})); l.listen(4096)\n\
         held=[]\n\
         while True:\n\
         \x20   c,_=l.accept(); held.append(c)\n"
    );
    let server = KilledOnDrop(python_server(&script, port));
    let daemon = Daemon::start_with_pids();
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ss_established(port) < CLIENTS {
        assert!(
            Instant::now() < deadline,
            "the server did not accept them all"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let lost = |m: &support::Metrics| {
        m.get(
            "observer_kernel_events_lost_total",
            &[("reason", "held_connections_over_limit")],
        )
        .unwrap_or(-1.0)
    };
    let (p, pid) = (port.to_string(), server.0.id().to_string());
    let first = daemon.scrape();
    let m = daemon.scrape();
    assert_eq!(
        m.get(
            "observer_worker_active_connections",
            &[("port", &p), ("pid", &pid)]
        ),
        Some(BOUND),
        "the scan reports at most the bound per process"
    );
    assert_eq!(
        lost(&m) - lost(&first),
        (CLIENTS as f64) - BOUND,
        "each scan counts what it left out (ss: {} held)",
        ss_established(port)
    );
    support::promtool_check_metrics(&m.text);
    drop(clients);
}

/// A child process killed when the test ends, passed or not.
struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
