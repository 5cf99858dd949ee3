//! Worker pools of real servers against each server's own view of its
//! workers: gunicorn's classic busy-worker semaphore in pre/post_request
//! hooks, uWSGI's stats server, php-fpm's status page, unicorn's listener
//! stats from raindrops.
mod support;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use support::{
    Daemon, GUNICORN_HOOKS, Metrics, WSGI_APP, free_port, http_get, run, run_ok, ss_listen_queues,
    until,
};

/// A server started in its own process group (master and workers die together).
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, port: u16, files: &[(&str, &str)], cmd: &[&str]) -> Server {
        Self::start_until(name, port, files, cmd, || {
            !ss_listen_queues(port).is_empty()
        })
    }

    /// Starts a server and waits until `listening()` says it listens.
    fn start_until(
        name: &str,
        port: u16,
        files: &[(&str, &str)],
        cmd: &[&str],
        listening: impl Fn() -> bool,
    ) -> Server {
        let dir = std::env::temp_dir().join(format!("observer-{name}-{port}"));
        std::fs::create_dir_all(&dir).expect("server dir");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write server file");
        }
        let child = Command::new(cmd[0])
            .args(&cmd[1..])
            .current_dir(&dir)
            .env("BUSY_FILE", dir.join("busy"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("log file"))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} (cargo xtask setup installs it): {e}"));
        let server = Server { child, port, dir };
        // Ruby's servers take over 20 s to boot in an emulated guest.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !listening() {
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {port}: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The semaphore value the gunicorn hooks write (0 before any request).
    fn semaphore(&self) -> i64 {
        std::fs::read_to_string(self.dir.join("busy"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Pids of the master's children (the workers, as the OS sees them).
    fn worker_pids(&self) -> Vec<u32> {
        support::children_of(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: signals to the process group we created for this server.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; anything left is killed.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn gunicorn(extra: &[&str]) -> Server {
    gunicorn_serving(WSGI_APP, extra)
}

/// gunicorn with its busy semaphore hooks, serving the WSGI `app`.
fn gunicorn_serving(app: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut cmd = vec!["gunicorn", "-c", "hooks.py", "-b", &bind];
    cmd.extend_from_slice(extra);
    cmd.push("app:app");
    Server::start(
        "gunicorn",
        port,
        &[("app.py", app), ("hooks.py", GUNICORN_HOOKS)],
        &cmd,
    )
}

/// `clients` threads, each making `requests` HTTP/1.0 requests (a new
/// connection each) for a response delayed by `sleep_s`. Returns how many
/// completed.
/// What one client thread got: requests completed, and the time they took
/// by its own clock (connect to the last byte of each reply).
type ClientRun = JoinHandle<(usize, Duration)>;

/// Clients started together: tests that compare the connections a server
/// holds open with its in-request count want every client in a request
/// at once (staggered, one client is between two connections at any
/// moment, and the two counts differ by the ones in transit).
fn load(port: u16, clients: usize, requests: usize, sleep_s: f64) -> Vec<ClientRun> {
    clients_at(port, "/", clients, requests, sleep_s, Duration::ZERO)
}

/// [`load`] on the page at `path`, with the clients started staggered over
/// one request's sleep: started together they finish and come back
/// together, and every worker is idle for the same millisecond each round
/// (a scrape landing there reads all of them idle while the server's own
/// count, read just before and after, says busy).
fn load_at(
    port: u16,
    path: &'static str,
    clients: usize,
    requests: usize,
    sleep_s: f64,
) -> Vec<ClientRun> {
    let stagger = Duration::from_secs_f64(sleep_s / clients.max(1) as f64);
    clients_at(port, path, clients, requests, sleep_s, stagger)
}

/// `clients` threads, the i-th starting `i × stagger` late.
fn clients_at(
    port: u16,
    path: &'static str,
    clients: usize,
    requests: usize,
    sleep_s: f64,
    stagger: Duration,
) -> Vec<ClientRun> {
    (0..clients)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(stagger * i as u32);
                let (mut done, mut took) = (0, Duration::ZERO);
                for _ in 0..requests {
                    let started = Instant::now();
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = write!(s, "GET {path}?{sleep_s} HTTP/1.0\r\n\r\n");
                    let mut reply = String::new();
                    if s.read_to_string(&mut reply).is_ok()
                        && reply.starts_with("HTTP/1.")
                        && reply.contains(" 200 ")
                    {
                        done += 1;
                        took += started.elapsed();
                    }
                }
                (done, took)
            })
        })
        .collect()
}

fn finish(clients: Vec<ClientRun>) -> usize {
    finish_timed(clients).0
}

/// Requests completed, and their total time by the clients' clocks.
fn finish_timed(clients: Vec<ClientRun>) -> (usize, f64) {
    clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .fold((0, 0.0), |(n, t), (done, took)| {
            (n + done, t + took.as_secs_f64())
        })
}

/// The listener whose series a pool's figures carry: its port (TCP) or
/// its path (Unix).
#[derive(Clone, Debug)]
enum Pool {
    Port(u16),
    Path(String),
}

impl Pool {
    fn label(&self) -> (&'static str, String) {
        match self {
            Pool::Port(port) => ("port", port.to_string()),
            Pool::Path(path) => ("path", path.clone()),
        }
    }
}

impl From<u16> for Pool {
    fn from(port: u16) -> Pool {
        Pool::Port(port)
    }
}

fn pool_state(m: &Metrics, pool: impl Into<Pool>, state: &str) -> f64 {
    let (name, value) = pool.into().label();
    m.get("observer_workers", &[(name, &value), ("state", state)])
        .unwrap_or(0.0)
}

fn sum_per_worker(m: &Metrics, metric: &str, pool: impl Into<Pool>) -> f64 {
    let (name, value) = pool.into().label();
    m.samples
        .iter()
        .filter(|(n, l, _)| n == metric && l.get(name) == Some(&value))
        .map(|(_, _, v)| v)
        .sum()
}

fn worker_pids_seen(m: &Metrics, port: u16) -> Vec<u32> {
    let port = port.to_string();
    let mut pids: Vec<u32> = m
        .samples
        .iter()
        .filter(|(n, l, _)| n == "observer_worker_busy" && l.get("port") == Some(&port))
        .filter_map(|(_, l, _)| l.get("pid")?.parse().ok())
        .collect();
    pids.sort();
    pids
}

/// Waits until the observer sees `n` workers in the pool, all idle.
fn wait_for_idle_pool(daemon: &Daemon, pool: impl Into<Pool>, n: f64) {
    let pool = pool.into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = daemon.scrape();
        if pool_state(&m, pool.clone(), "idle") == n && pool_state(&m, pool.clone(), "busy") == 0.0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool never showed {n} idle workers:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sample: the observer's figure, with the ground truth read just
/// before and just after it (the two are never read at the same instant).
#[derive(Debug)]
struct Sample {
    observer: f64,
    truth_before: f64,
    truth_after: f64,
}

/// Takes `count` samples `every` apart.
fn sample(
    count: usize,
    every: Duration,
    observer: impl Fn() -> f64,
    truth: impl Fn() -> f64,
) -> Vec<Sample> {
    (0..count)
        .map(|_| {
            std::thread::sleep(every);
            let truth_before = truth();
            let observer = observer();
            Sample {
                observer,
                truth_before,
                truth_after: truth(),
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every sample within ±1 of the ground truth around it.
fn assert_tracks(samples: &[Sample], what: &str) {
    assert_tracks_within(samples, 1.0, what);
}

/// Every sample within ±`within` of the ground truth around it.
fn assert_tracks_within(samples: &[Sample], within: f64, what: &str) {
    println!(
        "{what}: {:?}",
        samples
            .iter()
            .map(|s| (s.observer, s.truth_before, s.truth_after))
            .collect::<Vec<_>>()
    );
    let off: Vec<_> = samples
        .iter()
        .filter(|s| {
            let (lo, hi) = (
                s.truth_before.min(s.truth_after),
                s.truth_before.max(s.truth_after),
            );
            s.observer < lo - within || s.observer > hi + within
        })
        .collect();
    assert!(
        off.is_empty(),
        "{what}: samples off by more than {within}: {off:?}"
    );
}

fn observed(samples: &[Sample]) -> Vec<f64> {
    samples.iter().map(|s| s.observer).collect()
}

/// How a pool is loaded and sampled against a server's own view of it.
struct PoolRun<'a> {
    workers: f64,
    clients: usize,
    requests: usize,
    sleep_s: f64,
    samples: usize,
    every_ms: u64,
    what: &'a str,
    /// Connections each read of the truth makes to the pool itself (a
    /// status page the pool serves), which its accepts count too.
    truth_connections: usize,
}

/// Waits for an idle pool of `run.workers`, loads it with `run.clients`
/// looping clients, and samples the busy count against `truth`: every sample
/// within ±1, the median equal to the number of clients (fewer than the
/// workers), and the per-worker accepts adding up to the completed requests.
/// Returns how many requests completed, and their time by the clients'
/// clocks.
fn busy_tracks_truth(
    daemon: &Daemon,
    port: u16,
    run: &PoolRun,
    truth: impl Fn() -> f64,
) -> (usize, f64) {
    busy_tracks_truth_at(daemon, port, (port, "/"), run, truth)
}

/// [`busy_tracks_truth`] for the pool of `pool`, with the clients
/// requesting `page` on loopback port `port` (the server's, or a proxy's in
/// front of it).
fn busy_tracks_truth_at(
    daemon: &Daemon,
    pool: impl Into<Pool>,
    (port, page): (u16, &'static str),
    run: &PoolRun,
    truth: impl Fn() -> f64,
) -> (usize, f64) {
    let pool = pool.into();
    wait_for_idle_pool(daemon, pool.clone(), run.workers);
    let load = load_at(port, page, run.clients, run.requests, run.sleep_s);
    std::thread::sleep(Duration::from_millis(400));
    let samples = sample(
        run.samples,
        Duration::from_millis(run.every_ms),
        || pool_state(&daemon.scrape(), pool.clone(), "busy"),
        truth,
    );
    let (done, client_seconds) = finish_timed(load);
    assert_tracks(&samples, run.what);
    assert_eq!(
        median(observed(&samples)),
        run.clients as f64,
        "min(k, workers) busy"
    );
    let accepted = match pool {
        Pool::Path(_) if !support::counts_unix_accepts() => 0,
        _ => done + 2 * run.samples * run.truth_connections,
    };
    assert_eq!(
        sum_per_worker(&daemon.scrape(), "observer_worker_accepts_total", pool),
        accepted as f64,
        "per-worker accepts = requests served (the truth's own included), \
         where the accept source counts them"
    );
    (done, client_seconds)
}

#[test]
fn gunicorn_sync_busy_workers_track_the_semaphore_and_accepts_add_up() {
    let daemon = Daemon::start_with_pids();
    let server = gunicorn(&["-w", "4"]);
    let (clients, requests) = (2, 10);
    // Requests long against the sampling interval (50 ms; about 120 ms
    // where the /proc sampler reads a debug build), so that the error at
    // each end of a busy period, up to one interval, stays well within 5%.
    let run = PoolRun {
        workers: 4.0,
        clients,
        requests,
        sleep_s: 0.6,
        samples: 12,
        every_ms: 150,
        what: "busy workers vs semaphore",
        truth_connections: 0,
    };
    let (done, client_seconds) =
        busy_tracks_truth(&daemon, server.port, &run, || server.semaphore() as f64);

    let m = daemon.scrape();
    assert_eq!(done, clients * requests, "every client request succeeded");
    assert_eq!(
        m.listener("observer_connections_accepted_total", server.port),
        done as f64
    );
    assert_eq!(
        sum_per_worker(&m, "observer_worker_accepts_total", server.port),
        done as f64
    );
    assert_eq!(
        worker_pids_seen(&m, server.port),
        server.worker_pids(),
        "workers are the arbiter's children"
    );
    // Everything finished: all idle, nothing open, and busy time (sampled)
    // adds up, within 5%, to the requests' time by the clients' clocks
    // (2 clients on 4 workers: nothing queues, so a request's time is a
    // worker's busy time), which is at least their sleeps (20 × 0.6 s).
    assert_eq!(
        (
            pool_state(&m, server.port, "busy"),
            pool_state(&m, server.port, "idle")
        ),
        (0.0, 4.0)
    );
    assert_eq!(
        sum_per_worker(&m, "observer_worker_active_connections", server.port),
        0.0
    );
    let busy_s = sum_per_worker(&m, "observer_worker_busy_seconds_total", server.port);
    let slept = done as f64 * run.sleep_s;
    println!(
        "busy {busy_s} s vs {client_seconds} s by the clients, {slept} s of sleeps; \
         sampled every {:?} s",
        m.get("observer_worker_sample_interval_seconds", &[])
    );
    assert!(client_seconds >= slept, "the requests slept");
    assert!(
        (busy_s - client_seconds).abs() <= 0.05 * client_seconds,
        "busy {busy_s} s vs {client_seconds} s by the clients ({slept} s of sleeps)"
    );
}

/// A WSGI app whose every request forks a child that holds the worker's
/// fds (the listener among them) for twice the request's time: what a CGI,
/// or any subprocess between its fork and its exec, looks like to the
/// kernel.
const FORKING_WSGI_APP: &str = r#"import os, time
def app(environ, start_response):
    seconds = float(environ.get('QUERY_STRING') or 0.3)
    if os.fork() == 0:
        time.sleep(2 * seconds)
        os._exit(0)
    time.sleep(seconds)
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'ok\n']
"#;

/// gunicorn's sync workers fork a child on every request, which holds the
/// listener beside them. Throughout, the pool's workers are gunicorn's
/// own (a worker with a child holding the listener is not taken for a
/// master, and the child is not taken for a worker), the busy count
/// tracks the semaphore, and per-worker accepts add up to the requests.
#[test]
fn gunicorn_workers_whose_children_inherit_the_listener_stay_the_pool_and_accepts_add_up() {
    let daemon = Daemon::start_with_pids();
    let server = gunicorn_serving(FORKING_WSGI_APP, &["-w", "2"]);
    let port = server.port;
    wait_for_idle_pool(&daemon, port, 2.0);
    let workers = server.worker_pids();
    let load = load_at(port, "/", 2, 8, 0.3);
    let mut seen = Vec::new();
    let mut with_children = 0;
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(150));
        let truth_before = server.semaphore() as f64;
        let m = daemon.scrape();
        let truth_after = server.semaphore() as f64;
        with_children += workers
            .iter()
            .filter(|w| !support::children_of(**w).is_empty())
            .count();
        seen.push((
            worker_pids_seen(&m, port),
            pool_state(&m, port, "busy"),
            (truth_before, truth_after),
        ));
    }
    let done = finish(load);
    println!("{with_children} worker samples with a child; (pids, busy, semaphore): {seen:?}");
    assert!(
        with_children > 0,
        "the workers' children were alive meanwhile"
    );
    for (pids, busy, (before, after)) in &seen {
        assert_eq!(
            pids, &workers,
            "the pool's workers, and only them: {seen:?}"
        );
        assert!(
            *busy >= before.min(*after) - 1.0 && *busy <= before.max(*after) + 1.0,
            "busy {busy} vs the semaphore {before}..{after}: {seen:?}"
        );
    }
    let m = daemon.scrape();
    assert_eq!(done, 16, "every client request succeeded");
    assert_eq!(
        (
            sum_per_worker(&m, "observer_worker_accepts_total", port),
            m.listener("observer_connections_accepted_total", port)
        ),
        (done as f64, done as f64),
        "per-worker accepts = the listener's = the clients' requests"
    );
}

/// A big host: 10,000 parked threads that belong to no pool, and gunicorn
/// with 2 workers. The sampler reads the pool's own threads, not the
/// host's (no pass walks the host), so it keeps its rate, and busy time
/// adds up, within 5%, to the requests' time by the clients' clocks. The
/// CPU time the sampler says it spent is its thread's, as the scheduler
/// counts it.
#[test]
fn beside_ten_thousand_parked_threads_the_sampler_reads_only_the_pool_and_its_figures_hold() {
    let _parked = support::ParkedThreads::start(10_000);
    let daemon = Daemon::start();
    let server = gunicorn(&["-w", "2"]);
    wait_for_idle_pool(&daemon, server.port, 2.0);
    let sampler_cpu_before = sampler_thread_cpu_seconds(&daemon);
    let before = daemon.scrape();
    let (done, client_seconds) = finish_timed(load(server.port, 2, 15, 0.4));
    let m = daemon.scrape();
    let sampler_cpu = sampler_thread_cpu_seconds(&daemon) - sampler_cpu_before;
    let walked_host = m
        .get("observer_worker_sample_host_walks_total", &[])
        .unwrap_or(-1.0)
        - before
            .get("observer_worker_sample_host_walks_total", &[])
            .unwrap_or(0.0);
    let interval = m.get("observer_worker_sample_interval_seconds", &[]);
    let busy_s = sum_per_worker(&m, "observer_worker_busy_seconds_total", server.port)
        - sum_per_worker(&before, "observer_worker_busy_seconds_total", server.port);
    println!(
        "{done} requests, {client_seconds:.2} s by the clients; busy {busy_s:.2} s; \
         interval {interval:?} s; {walked_host} passes walked the host"
    );
    assert_eq!(done, 30, "every client request succeeded");
    assert_eq!(walked_host, 0.0, "passes walked the host's threads");
    assert!(
        (busy_s - client_seconds).abs() <= 0.05 * client_seconds,
        "busy {busy_s} s vs {client_seconds} s by the clients"
    );
    assert_sampler_cost_is_its_threads(&before, &m, sampler_cpu);
}

/// The scheduler's count of the daemon's sampler thread's time on a CPU
/// (`/proc/PID/task/TID/schedstat`, its first field, in ns), the thread
/// found by its name.
fn sampler_thread_cpu_seconds(daemon: &Daemon) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).expect("daemon's tasks");
    let sampler = tasks
        .flatten()
        .map(|task| task.path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == "thread-sampler")
        })
        .expect("the daemon's thread-sampler thread");
    let schedstat = std::fs::read_to_string(sampler.join("schedstat")).expect("schedstat");
    let ns: f64 = schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .expect("schedstat's run time");
    ns / 1e9
}

/// `observer_worker_sample_seconds_total` between two scrapes against the
/// sampler thread's CPU time read around them: at most that, and at least
/// three quarters of it (the rest: its sleeps and wake-ups between passes,
/// 11% in a debug build), but for the passes at either edge (the later
/// scrape's own pass runs on another thread; one background pass may fall
/// between a scrape and a read).
fn assert_sampler_cost_is_its_threads(before: &Metrics, after: &Metrics, sampler_cpu: f64) {
    let delta = |name| after.get(name, &[]).unwrap_or(-1.0) - before.get(name, &[]).unwrap_or(0.0);
    let (said, passes) = (
        delta("observer_worker_sample_seconds_total"),
        delta("observer_worker_sample_passes_total"),
    );
    let per_pass = said / passes.max(1.0);
    println!(
        "sampler: {said:.4} s of CPU over {passes} passes by its counter, \
         {sampler_cpu:.4} s by the scheduler"
    );
    assert!(passes > 0.0, "the sampler ran");
    let edges = 2.0 * per_pass;
    assert!(
        said <= sampler_cpu + edges && said >= 0.75 * sampler_cpu - edges,
        "observer_worker_sample_seconds_total grew {said} s; its thread ran {sampler_cpu} s"
    );
}

#[test]
fn all_workers_busy_makes_the_queue_grow_and_waits_show_it_then_both_drain() {
    let daemon = Daemon::start_with_pids();
    let server = gunicorn(&["-w", "2"]);
    wait_for_idle_pool(&daemon, server.port, 2.0);
    // 4 clients against 2 workers: 2 connections wait in the queue.
    let load = load(server.port, 4, 4, 0.4);
    std::thread::sleep(Duration::from_millis(300));
    let samples: Vec<(f64, f64)> = (0..8)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(150));
            let m = daemon.scrape();
            (
                pool_state(&m, server.port, "busy"),
                m.listener("observer_listen_queue_length", server.port),
            )
        })
        .collect();
    println!("(busy, queue length) = {samples:?}");
    assert_eq!(
        median(samples.iter().map(|s| s.0).collect()),
        2.0,
        "both workers busy"
    );
    assert!(
        samples.iter().any(|s| s.1 >= 1.0),
        "queue grew while all workers were busy: {samples:?}"
    );
    finish(load);
    let m = daemon.scrape();
    let port = server.port.to_string();
    let under = |le: &str| {
        m.get(
            "observer_accept_queue_wait_seconds_bucket",
            &[("port", &port), ("le", le)],
        )
        .unwrap_or(0.0)
    };
    let count = m.listener("observer_accept_queue_wait_seconds_count", server.port);
    assert_eq!(count, 16.0);
    assert!(
        under("0.25") < count,
        "some connections waited longer than 250 ms in the queue"
    );
    assert_eq!(
        m.listener("observer_listen_queue_length", server.port),
        0.0,
        "queue drained"
    );
    // A worker is back in accept() a moment after its client has read the
    // response, not at that instant: a scrape right after the clients can
    // still see one busy (CI did). Freed within 2 s, then.
    let freed = (0..20).any(|_| {
        let busy = pool_state(&daemon.scrape(), server.port, "busy");
        if busy != 0.0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        busy == 0.0
    });
    assert!(freed, "workers freed within 2 s of the last response");
}

#[test]
fn gunicorn_gthread_active_connections_track_the_semaphore() {
    let daemon = Daemon::start_with_pids();
    let server = gunicorn(&["-k", "gthread", "-w", "2", "--threads", "3"]);
    wait_for_idle_pool(&daemon, server.port, 2.0);
    let load = load(server.port, 4, 8, 0.3);
    std::thread::sleep(Duration::from_millis(400));
    let samples = sample(
        12,
        Duration::from_millis(150),
        || {
            sum_per_worker(
                &daemon.scrape(),
                "observer_worker_active_connections",
                server.port,
            )
        },
        || server.semaphore() as f64,
    );
    let done = finish(load);
    assert_tracks(&samples, "gthread: open connections vs semaphore");
    assert_eq!(median(observed(&samples)), 4.0);
    let m = daemon.scrape();
    assert_eq!(
        sum_per_worker(&m, "observer_worker_accepts_total", server.port),
        done as f64
    );
}

/// gunicorn gthread, one worker of 4 threads: its acceptor polls the
/// listener whatever its pool does, and its executor starts threads as
/// requests come (a thread is known as the pool's once seen parked). Once
/// it has run all 4, its free threads are 4 less the
/// pre/post_request semaphore, and it is busy exactly when the semaphore
/// is 4, with clients that each hold one request of 2.5 s.
#[test]
fn gunicorn_gthread_free_threads_are_its_threads_less_the_semaphore() {
    const THREADS: usize = 4;
    let daemon = Daemon::start_with_pids();
    let server = gunicorn(&["-k", "gthread", "-w", "1", "--threads", "4"]);
    wait_for_idle_pool(&daemon, server.port, 1.0);
    let p = server.port.to_string();
    // Its executor starts the 4 threads; they park when done.
    let mut served = finish(load(server.port, THREADS, 1, 0.5));
    std::thread::sleep(Duration::from_millis(500));
    for clients in [THREADS, 2, 1] {
        let load = load(server.port, clients, 1, 2.5);
        std::thread::sleep(Duration::from_millis(800));
        let mut agreed = 0;
        for _ in 0..4 {
            let before = server.semaphore();
            let m = daemon.scrape();
            if server.semaphore() != before {
                continue;
            }
            let seen = (
                m.get("observer_worker_busy", &[("port", &p)]),
                m.get("observer_worker_idle_threads", &[("port", &p)]),
            );
            let truth = (
                Some((before == THREADS as i64) as u8 as f64),
                Some((THREADS as i64 - before) as f64),
            );
            println!("gthread, {clients} client(s): observer {seen:?} vs semaphore {before}");
            assert_eq!(seen, truth, "{clients} client(s): (busy, free threads)");
            agreed += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(
            agreed >= 2,
            "{clients} client(s): the semaphore never settled"
        );
        served += finish(load);
    }
    assert_eq!(served, 2 * THREADS + 3, "every request served");
}

/// `clients` keep-alive clients (HTTP/1.1, one connection each): each
/// makes `requests` requests for a response delayed by `sleep_s`, pausing
/// `pause_s` between them with its connection open. Returns the requests
/// answered.
fn keep_alive_load(
    port: u16,
    clients: usize,
    requests: usize,
    sleep_s: f64,
    pause_s: f64,
) -> Vec<JoinHandle<usize>> {
    (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    return 0;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut answered = 0;
                for _ in 0..requests {
                    let request = format!("GET /?{sleep_s} HTTP/1.1\r\nHost: test\r\n\r\n");
                    if s.write_all(request.as_bytes()).is_err() {
                        break;
                    }
                    // A chunked reply (the app sets no length) ends with an
                    // empty chunk.
                    let mut reply = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !reply.ends_with(b"0\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => reply.extend_from_slice(&buf[..n]),
                            _ => return answered,
                        }
                    }
                    answered += 1;
                    std::thread::sleep(Duration::from_secs_f64(pause_s));
                }
                answered
            })
        })
        .collect()
}

/// Keep-alive clients that pause between requests: the threaded workers
/// hold all 4 connections open the whole time, but serve only the requests
/// in flight. The requests in service (read from each connection's own TCP
/// counters) track the pre/post_request semaphore, where the open
/// connections stay at 4.
#[test]
fn requests_in_service_track_the_semaphore_while_keep_alive_connections_stay_open() {
    let daemon = Daemon::start_with_pids();
    let server = gunicorn(&[
        "-k",
        "gthread",
        "-w",
        "2",
        "--threads",
        "3",
        "--keep-alive",
        "10",
    ]);
    wait_for_idle_pool(&daemon, server.port, 2.0);
    let clients = keep_alive_load(server.port, 4, 8, 0.3, 0.3);
    std::thread::sleep(Duration::from_millis(500));
    let open = std::cell::RefCell::new(Vec::new());
    let samples = sample(
        12,
        Duration::from_millis(150),
        || {
            let m = daemon.scrape();
            open.borrow_mut().push(sum_per_worker(
                &m,
                "observer_worker_active_connections",
                server.port,
            ));
            sum_per_worker(&m, "observer_worker_requests_in_service", server.port)
        },
        || server.semaphore() as f64,
    );
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    let open = open.into_inner();
    println!("open connections: {open:?}");
    assert_tracks(
        &samples,
        "gthread keep-alive: requests in service vs semaphore",
    );
    assert_eq!(answered, 4 * 8, "every request was answered");
    assert!(
        open.iter().all(|n| *n == 4.0),
        "the 4 keep-alive connections stayed open: {open:?}"
    );
    let in_service = observed(&samples);
    assert!(
        in_service.iter().any(|n| *n < 4.0) && in_service.iter().any(|n| *n > 0.0),
        "requests come and go while the connections stay: {in_service:?}"
    );
}

#[test]
fn gunicorn_worker_restarts_leave_no_stale_pids_and_counts_stay_exact() {
    let daemon = Daemon::start_with_pids();
    // Each worker exits after 3 requests and the arbiter starts a new one.
    let server = gunicorn(&["-w", "2", "--max-requests", "3"]);
    wait_for_idle_pool(&daemon, server.port, 2.0);
    let done = finish(load(server.port, 2, 9, 0.05));
    assert_eq!(done, 18);
    std::thread::sleep(Duration::from_millis(1500)); // let the arbiter respawn
    let m = daemon.scrape();
    assert_eq!(
        m.listener("observer_connections_accepted_total", server.port),
        18.0
    );
    assert_eq!(
        worker_pids_seen(&m, server.port),
        server.worker_pids(),
        "only live workers are exported"
    );
    assert_eq!(
        sum_per_worker(&m, "observer_worker_accepts_total", server.port),
        18.0,
        "the worker slots keep what restarted workers counted"
    );
}

/// The label values of `metric`'s series of a pool.
fn label_values(m: &Metrics, metric: &str, pool: impl Into<Pool>, label: &str) -> BTreeSet<String> {
    let (name, value) = pool.into().label();
    m.samples
        .iter()
        .filter(|(n, l, _)| n == metric && l.get(name) == Some(&value))
        .filter_map(|(_, l, _)| l.get(label).cloned())
        .collect()
}

/// gunicorn replacing each worker every 5 requests (`--max-requests 5`,
/// the usual guard against leaks) under 3 looping clients for 40 s,
/// scraped every 2 s with the default labels. The worker series stay
/// within twice the most workers alive at once (a daemon with pid labels
/// beside it shows how many processes came and went), and the slots keep
/// counting across replacements: their accepts add up to the listener's
/// and to the clients' requests exactly, and their busy seconds, within
/// 5%, to the requests' time by the clients' clocks plus the workers' boot
/// times (a worker forked between two scrapes is sampled as a child of
/// its master, from its start).
#[test]
fn worker_series_stay_bounded_and_add_up_while_gunicorn_replaces_its_workers() {
    let daemon = Daemon::start_with(&[]);
    let per_pid = Daemon::start_with_pids();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    // Each worker also writes how long it took from its fork to its loop:
    // busy too (not waiting for work), and no client's clock sees it.
    let hooks = format!("{GUNICORN_HOOKS}{BOOT_HOOKS}");
    let server = Server::start(
        "gunicorn",
        port,
        &[("app.py", WSGI_APP), ("hooks.py", &hooks)],
        &[
            "gunicorn",
            "-c",
            "hooks.py",
            "-b",
            &bind,
            "-w",
            "4",
            "--max-requests",
            "5",
            "app:app",
        ],
    );
    wait_for_idle_pool(&daemon, server.port, 4.0);
    let deadline = Instant::now() + Duration::from_secs(40);
    let clients: Vec<ClientRun> = (0..3)
        .map(|_| {
            let port = server.port;
            std::thread::spawn(move || {
                let (mut done, mut took) = (0, Duration::ZERO);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    if http_get(port, "/?0.2").is_some() {
                        done += 1;
                        took += started.elapsed();
                    }
                }
                (done, took)
            })
        })
        .collect();
    let (mut slots, mut pids) = (BTreeSet::new(), BTreeSet::new());
    let mut most_alive = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        let m = daemon.scrape();
        slots.extend(label_values(
            &m,
            "observer_worker_accepts_total",
            server.port,
            "worker",
        ));
        most_alive =
            most_alive.max(label_values(&m, "observer_worker_busy", server.port, "worker").len());
        let with_pids = per_pid.scrape();
        pids.extend(label_values(
            &with_pids,
            "observer_worker_busy",
            server.port,
            "pid",
        ));
    }
    let (done, client_seconds) = finish_timed(clients);
    std::thread::sleep(Duration::from_millis(2500));
    let m = daemon.scrape();
    let boots = std::fs::read_to_string(server.dir.join("busy.boots")).unwrap_or_default();
    let boot_seconds: f64 = boots
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .sum();
    slots.extend(label_values(
        &m,
        "observer_worker_accepts_total",
        server.port,
        "worker",
    ));
    let accepts = sum_per_worker(&m, "observer_worker_accepts_total", server.port);
    let busy = sum_per_worker(&m, "observer_worker_busy_seconds_total", server.port);
    println!(
        "{done} requests ({client_seconds:.1} s by the clients' clocks, {boot_seconds:.1} s of {} worker boots): {} worker slots (most alive at once {most_alive}), {} pids seen; slots' accepts {accepts}, busy {busy:.1} s",
        boots.lines().count(),
        slots.len(),
        pids.len()
    );
    assert!(pids.len() > 8, "workers were replaced: {pids:?}");
    assert!(
        slots.len() <= 2 * most_alive,
        "{} worker series for at most {most_alive} workers alive at once: {slots:?}",
        slots.len()
    );
    assert_eq!(
        (
            accepts,
            m.listener("observer_connections_accepted_total", server.port)
        ),
        (done as f64, done as f64),
        "slots' accepts = the listener's = the clients' requests"
    );
    let truth = client_seconds + boot_seconds;
    assert!(
        (busy - truth).abs() <= 0.05 * truth,
        "busy seconds {busy:.2} vs the clients' {client_seconds:.2} + the boots' {boot_seconds:.2}"
    );
}

/// gunicorn hooks that append each worker's boot time (fork to its loop,
/// seconds) to `$BUSY_FILE.boots`.
const BOOT_HOOKS: &str = r#"
import time
_forked = [0.0]
def post_fork(server, worker):
    _forked[0] = time.monotonic()
def post_worker_init(worker):
    with open(os.environ['BUSY_FILE'] + '.boots', 'a') as f:
        f.write('%f\n' % (time.monotonic() - _forked[0]))
"#;

/// uWSGI's stats server: number of workers whose status is "busy".
fn uwsgi_busy(stats_port: u16) -> f64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", stats_port)) else {
        return -1.0;
    };
    let mut json = String::new();
    let _ = s.read_to_string(&mut json);
    json.matches("\"status\":\"busy\"").count() as f64
}

/// uWSGI with 4 processes serving `app.py` on `bind` (its socket flags),
/// plus `extra` flags, with its stats server on the returned port; started
/// once `listening()`.
fn uwsgi(bind: &[&str], extra: &[&str], listening: impl Fn() -> bool) -> (Server, u16) {
    let (id, stats) = (free_port(), free_port());
    let stats_addr = format!("127.0.0.1:{stats}");
    let mut cmd = vec!["uwsgi_python3"];
    cmd.extend_from_slice(bind);
    cmd.extend_from_slice(&[
        "--wsgi-file",
        "app.py",
        "--callable",
        "app",
        "--master",
        "--processes",
        "4",
        "--stats",
        &stats_addr,
        "--disable-logging",
    ]);
    cmd.extend_from_slice(extra);
    let server = Server::start_until("uwsgi", id, &[("app.py", WSGI_APP)], &cmd, listening);
    (server, stats)
}

/// 3 looping clients against 4 workers, sampled against the stats server.
const UWSGI_RUN: PoolRun<'static> = PoolRun {
    workers: 4.0,
    clients: 3,
    requests: 8,
    sleep_s: 0.3,
    samples: 12,
    every_ms: 150,
    what: "uWSGI busy workers vs its stats server",
    truth_connections: 0,
};

/// uWSGI on a loopback HTTP socket (plus `extra` flags), sampled against
/// its stats server under 3 looping clients.
fn uwsgi_pool_tracks_its_stats_server(extra: &[&str], what: &'static str) {
    let daemon = Daemon::start_with_pids();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let (_server, stats) = uwsgi(&["--http-socket", &http], extra, || {
        !ss_listen_queues(port).is_empty()
    });
    let run = PoolRun { what, ..UWSGI_RUN };
    busy_tracks_truth(&daemon, port, &run, || uwsgi_busy(stats));
}

#[test]
fn uwsgi_busy_workers_track_its_stats_server() {
    uwsgi_pool_tracks_its_stats_server(&[], "uWSGI busy workers vs stats server");
}

/// uWSGI's own protocol on a Unix socket (`--socket PATH`), behind nginx's
/// `uwsgi_pass`: the deployment its docs show.
#[test]
fn uwsgi_on_a_unix_socket_behind_nginx_busy_workers_track_its_stats_server() {
    let daemon = Daemon::start_with_pids();
    let sock = std::env::temp_dir().join(format!("observer-uwsgi-{}.sock", free_port()));
    let bind = sock.display().to_string();
    // nginx's workers run as nobody: the socket must be writable to them.
    let (_server, stats) = uwsgi(&["--socket", &bind, "--chmod-socket=666"], &[], || {
        sock.exists()
    });
    let nginx = nginx_in_front(&format!(
        "include /etc/nginx/uwsgi_params; uwsgi_pass unix:{bind}; uwsgi_read_timeout 60s;"
    ));
    let run = PoolRun {
        what: "uWSGI on a Unix socket: busy workers vs its stats server",
        ..UWSGI_RUN
    };
    let (done, _) = busy_tracks_truth_at(
        &daemon,
        Pool::Path(bind.clone()),
        (nginx.port, "/"),
        &run,
        || uwsgi_busy(stats),
    );
    assert_eq!(done, run.clients * run.requests);
    let _ = std::fs::remove_file(&sock);
}

/// With `--thunder-lock`, idle workers queue on a process-shared mutex
/// (futex) instead of the listener: they are idle, as uWSGI says.
#[test]
fn uwsgi_thunder_lock_waiters_are_idle_as_its_stats_server_says() {
    uwsgi_pool_tracks_its_stats_server(
        &["--thunder-lock"],
        "uWSGI --thunder-lock busy workers vs stats server",
    );
}

/// Apache httpd prefork, 4 children, two `Listen` ports (so children
/// serialize accept with the accept mutex `mutex`), a CGI that sleeps, and
/// mod_status on the second port.
fn apache_prefork(mutex: &str) -> (Server, u16) {
    apache(
        "prefork",
        &format!(
            "StartServers 4\nMinSpareServers 4\nMaxSpareServers 4\nServerLimit 4\n\
             MaxRequestWorkers 4\nMutex {mutex} default"
        ),
    )
}

/// Apache with `mpm` and `mpm_lines` (see `support::apache_setup`) on a
/// free port, with mod_status on a second one (returned).
fn apache(mpm: &str, mpm_lines: &str) -> (Server, u16) {
    let (port, status_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("observer-apache-{port}"));
    let conf = support::apache_setup(&dir, mpm, mpm_lines, &[port, status_port]);
    let server = Server::start(
        "apache",
        port,
        &[],
        &["apache2", "-f", &conf, "-DFOREGROUND"],
    );
    (server, status_port)
}

/// A figure of mod_status' `?auto` page (`BusyWorkers`, `IdleWorkers`).
fn mod_status_auto(status_port: u16, field: &str) -> Option<f64> {
    let page = http_get(status_port, "/server-status?auto")?;
    let line = page
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(": "))?;
    line.trim().parse().ok()
}

/// mod_status's BusyWorkers, less the worker serving this status request.
fn apache_busy(status_port: u16) -> f64 {
    mod_status_auto(status_port, "BusyWorkers").map_or(-1.0, |n| n - 1.0)
}

/// [`apache_busy`] for prefork, whose children serve the status page
/// too: the child that served it lingers on its connection for a moment
/// after the reply (Apache's lingering close) while the accept mutex passes
/// to another, and under load a scrape right then sees both busy. This
/// gives them that moment before the scrape that follows.
fn prefork_busy_settled(status_port: u16) -> f64 {
    let busy = apache_busy(status_port);
    std::thread::sleep(Duration::from_millis(100));
    busy
}

/// The children waiting for the accept mutex are idle, as mod_status says
/// (before this, an idle pool read 3 busy / 1 idle), and under 2 clients
/// exactly 2 are busy.
fn apache_pool_tracks_mod_status(mutex: &str) {
    let daemon = Daemon::start_with_pids();
    let (server, status_port) = apache_prefork(mutex);
    let busy_at_rest = support::until("mod_status to answer", 10, || {
        Some(apache_busy(status_port)).filter(|busy| *busy >= 0.0)
    });
    assert_eq!(busy_at_rest, 0.0, "{}", server.log());
    let run = PoolRun {
        workers: 4.0,
        clients: 2,
        // 4.8 s of requests per client: longer than the samples take
        // under load (10 × 200 ms, plus the truth's reads and settling).
        requests: 12,
        sleep_s: 0.4,
        samples: 10,
        every_ms: 200,
        what: "Apache prefork busy workers vs mod_status",
        truth_connections: 0,
    };
    busy_tracks_truth_at(&daemon, server.port, (server.port, "/sleep"), &run, || {
        prefork_busy_settled(status_port)
    });
}

#[test]
fn apache_prefork_accept_mutex_waiters_are_idle_as_mod_status_says() {
    apache_pool_tracks_mod_status("pthread");
}

#[test]
fn apache_prefork_fcntl_and_flock_mutex_waiters_are_idle_as_mod_status_says() {
    apache_pool_tracks_mod_status("fcntl");
    apache_pool_tracks_mod_status("flock");
}

/// Apache httpd with a threaded MPM (`event`, Debian's default, or
/// `worker`) and Apache's default `AcceptFilter http data`: 2 children × 2
/// worker threads, a CGI at /sleep, mod_status on a second port.
fn apache_threaded(mpm: &str) -> (Server, u16) {
    apache(
        mpm,
        "StartServers 2\nServerLimit 2\nThreadsPerChild 2\nThreadLimit 2\nMaxRequestWorkers 4\n\
         MinSpareThreads 1\nMaxSpareThreads 4",
    )
}

/// mod_status' scoreboard (`?auto`): the children (a slot of `ThreadLimit`
/// characters each) none of whose threads waits for a connection ('_');
/// a slot of '.' only has no child.
fn apache_children_without_a_waiting_thread(status_port: u16) -> f64 {
    let Some(page) = http_get(status_port, "/server-status?auto") else {
        return -1.0;
    };
    let Some(board) = page.lines().find_map(|l| l.strip_prefix("Scoreboard: ")) else {
        return -1.0;
    };
    board
        .as_bytes()
        .chunks(2)
        .filter(|child| !child.contains(&b'_') && child.iter().any(|c| *c != b'.'))
        .count() as f64
}

/// mod_status's per-child table (event MPM): the children that say
/// "accepting: no", every worker thread taken.
fn apache_children_not_accepting(status_port: u16) -> f64 {
    let Some(page) = http_get(status_port, "/server-status") else {
        return -1.0;
    };
    // <tr><td>slot</td><td>pid</td><td>stopping</td><td>total</td><td>accepting</td>…
    page.lines()
        .filter(|l| l.starts_with("<tr><td>") && !l.starts_with("<tr><td>Sum"))
        .filter_map(|l| l.split("</td><td>").nth(4))
        .filter(|accepting| *accepting == "no")
        .count() as f64
}

/// 8 samples, 250 ms apart, of a pool's busy workers as two daemons see it
/// (the first's bracketed by the truth); the second's alone.
fn sample_two_daemons(
    [first, second]: [&Daemon; 2],
    port: u16,
    truth: impl Fn() -> f64,
) -> (Vec<Sample>, Vec<f64>) {
    let both: Vec<(Sample, f64)> = (0..8)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(250));
            let truth_before = truth();
            let seen_first = pool_state(&first.scrape(), port, "busy");
            let seen_second = pool_state(&second.scrape(), port, "busy");
            let sample = Sample {
                observer: seen_first,
                truth_before,
                truth_after: truth(),
            };
            (sample, seen_second)
        })
        .collect();
    let (first, second): (Vec<Sample>, Vec<f64>) = both.into_iter().unzip();
    println!("daemon started under load: {second:?}");
    (first, second)
}

/// Two daemons' samples agree, but for at most one (scraped a moment apart).
fn assert_agree(first: &[Sample], second: &[f64]) {
    let disagree = first
        .iter()
        .zip(second)
        .filter(|(a, b)| a.observer != **b)
        .count();
    assert!(
        disagree <= 1,
        "the two daemons disagree in {disagree} of {} samples",
        second.len()
    );
}

/// Apache's event MPM counts a child busy when every worker thread serves
/// (it then stops accepting); observer agrees, sample by sample, with a
/// daemon started at rest and with one started under saturation: both read
/// the kernel's present state (whether each child's pollset watches the
/// listener now), not what they saw before.
#[test]
fn apache_event_children_are_busy_when_not_accepting_whenever_the_daemon_starts() {
    let (server, status_port) = apache_threaded("event");
    threaded_children_busy_whenever_the_daemon_starts(
        &server,
        "Apache event",
        || apache_children_not_accepting(status_port),
        || apache_idle_workers(status_port),
    );
}

/// Apache's worker MPM: a child's listener thread waits for an idle worker
/// thread before it polls the listeners, so a child whose threads all serve
/// waits elsewhere. Truth: mod_status' scoreboard, a child busy when none
/// of its thread slots is waiting ('_').
#[test]
fn apache_worker_children_are_busy_when_every_thread_serves_whenever_the_daemon_starts() {
    let (server, status_port) = apache_threaded("worker");
    threaded_children_busy_whenever_the_daemon_starts(
        &server,
        "Apache worker",
        || apache_children_without_a_waiting_thread(status_port),
        || apache_idle_workers(status_port),
    );
}

/// mod_status' IdleWorkers (`?auto`), plus the thread serving the status
/// request itself, free again once it has answered.
fn apache_idle_workers(status_port: u16) -> f64 {
    mod_status_auto(status_port, "IdleWorkers").map_or(-1.0, |n| n + 1.0)
}

/// 2 threaded children × 2 worker threads under 1 client (a free thread in
/// each child: 0 busy, or 1 while the status request itself fills one),
/// then 8 (both busy), read by a daemon started at rest and by one started
/// under the saturation, against `busy_children`; the free threads against
/// `idle_workers` at rest (exactly) and under 1 client.
fn threaded_children_busy_whenever_the_daemon_starts(
    server: &Server,
    what: &str,
    busy_children: impl Fn() -> f64,
    idle_workers: impl Fn() -> f64,
) {
    let at_rest = Daemon::start_with_pids();
    wait_for_idle_pool(&at_rest, server.port, 2.0);
    assert_eq!(busy_children(), 0.0, "{what} at rest");
    let free_threads = || {
        at_rest
            .scrape()
            .listener("observer_idle_threads", server.port)
    };
    assert_eq!(
        (free_threads(), idle_workers()),
        (4.0, 4.0),
        "{what} at rest: every worker thread is free"
    );

    let light = load_at(server.port, "/sleep", 1, 8, 0.4);
    std::thread::sleep(Duration::from_millis(600));
    let samples = sample(
        6,
        Duration::from_millis(200),
        || pool_state(&at_rest.scrape(), server.port, "busy"),
        &busy_children,
    );
    let free = sample(6, Duration::from_millis(200), free_threads, &idle_workers);
    finish(light);
    assert_tracks(&samples, &format!("{what}, 1 client: busy children"));
    // Free threads move by two at once where the truth's status request
    // and the client's next request change threads between the reads.
    assert_tracks_within(&free, 2.0, &format!("{what}, 1 client: free threads"));
    let truth: Vec<f64> = free.iter().map(|s| s.truth_before).collect();
    assert!(
        (median(observed(&free)) - median(truth)).abs() <= 1.0,
        "{what}, 1 client: free threads' median vs IdleWorkers': {free:?}"
    );
    // One request, plus the truth's own status request (or its thread
    // still finishing): 3 threads at most, so one of the 2 children at
    // most is full; which one is, the truth itself decides.
    assert!(
        observed(&samples).iter().all(|busy| *busy <= 1.0),
        "one client fills one child at most: {:?}",
        observed(&samples)
    );

    let heavy = load_at(server.port, "/sleep", 8, 12, 0.4);
    std::thread::sleep(Duration::from_millis(800));
    let under_load = Daemon::start_with_pids();
    std::thread::sleep(Duration::from_millis(300));
    let (first, second) = sample_two_daemons([&at_rest, &under_load], server.port, &busy_children);
    let (done, _) = finish_timed(heavy);
    assert_tracks(&first, &format!("{what}, 8 clients: busy children"));
    assert_agree(&first, &second);
    assert_eq!(
        median(observed(&first)),
        2.0,
        "saturated: both children busy"
    );
    assert_eq!(median(second), 2.0, "saturated, seen by the late daemon");
    assert_eq!(done, 8 * 12, "every request was served");
}

/// Apache prefork's accept mutex, 2 clients on 4 children: a daemon
/// started under load reads the same busy children as one started at
/// rest, sample by sample. A child waiting on the mutex is known idle in
/// the pass where a fellow child holds it while it waits on the listeners.
#[test]
fn apache_prefork_accept_mutex_pool_reads_the_same_whenever_the_daemon_starts() {
    let at_rest = Daemon::start_with_pids();
    let (server, status_port) = apache_prefork("pthread");
    wait_for_idle_pool(&at_rest, server.port, 4.0);
    let load = load_at(server.port, "/sleep", 2, 14, 0.4);
    std::thread::sleep(Duration::from_millis(600));
    let under_load = Daemon::start_with_pids();
    std::thread::sleep(Duration::from_millis(300));
    let (first, second) = sample_two_daemons([&at_rest, &under_load], server.port, || {
        prefork_busy_settled(status_port)
    });
    let done = finish(load);
    assert_tracks(&first, "Apache prefork, 2 clients: busy vs mod_status");
    assert_agree(&first, &second);
    assert_eq!(median(observed(&first)), 2.0);
    assert_eq!(median(second), 2.0);
    assert_eq!(done, 2 * 14, "every request was served");
}

/// raindrops' view of a listener: connections being served ("active"),
/// read by one ruby process kept for the test. A `ruby` started per read
/// takes 6 to 11 s to boot in an emulated guest, longer than a test's load
/// lasts: every sample would come after it.
struct Raindrops {
    ruby: Child,
    replies: std::io::BufReader<std::process::ChildStdout>,
}

impl Raindrops {
    fn start(port: u16) -> Raindrops {
        let script = format!(
            "STDOUT.sync = true; while STDIN.gets; \
             s = Raindrops::Linux.tcp_listener_stats(['127.0.0.1:{port}'])['127.0.0.1:{port}']; \
             puts s.active; end"
        );
        let mut ruby = Command::new("ruby")
            .args(["-rraindrops", "-e", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ruby raindrops");
        let replies = std::io::BufReader::new(ruby.stdout.take().expect("ruby's stdout"));
        Raindrops { ruby, replies }
    }

    fn active(&mut self) -> f64 {
        use std::io::BufRead as _;
        let mut line = String::new();
        let asked = writeln!(self.ruby.stdin.as_mut().expect("ruby's stdin"));
        if asked.is_err() || self.replies.read_line(&mut line).is_err() {
            return -1.0;
        }
        line.trim().parse().unwrap_or(-1.0)
    }
}

impl Drop for Raindrops {
    fn drop(&mut self) {
        let _ = self.ruby.kill();
        let _ = self.ruby.wait();
    }
}

#[test]
fn unicorn_busy_workers_track_raindrops_active_connections() {
    let daemon = Daemon::start_with_pids();
    let port = free_port();
    let config = "worker_processes 3\n";
    let app = "run lambda { |env| sleep(env['QUERY_STRING'].to_f); [200, {'content-type' => 'text/plain'}, [\"ok\\n\"]] }\n";
    let server = Server::start(
        "unicorn",
        port,
        &[("config.ru", app), ("unicorn.rb", config)],
        &[
            "unicorn",
            "-E",
            "none",
            "-o",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "unicorn.rb",
            "config.ru",
        ],
    );
    let run = PoolRun {
        workers: 3.0,
        clients: 2,
        requests: 24,
        sleep_s: 0.4,
        samples: 10,
        every_ms: 200,
        what: "unicorn busy workers vs raindrops active",
        truth_connections: 0,
    };
    let raindrops = std::cell::RefCell::new(Raindrops::start(server.port));
    // Ruby has booted (and reads the listener) before the load starts.
    assert_eq!(
        raindrops.borrow_mut().active(),
        0.0,
        "raindrops reads the idle listener"
    );
    busy_tracks_truth(&daemon, server.port, &run, || {
        raindrops.borrow_mut().active()
    });
}

/// Puma in cluster mode (`-w 2 -t THREADS`) with its control server; each
/// worker reports its status to it every second.
fn puma(threads: &str) -> (Server, u16) {
    let port = free_port();
    let control = free_port();
    let app = "run lambda { |env| sleep(env['QUERY_STRING'].to_f); [200, {'content-type' => 'text/plain'}, [\"ok\\n\"]] }\n";
    let bind = format!("tcp://127.0.0.1:{port}");
    let control_url = format!("tcp://127.0.0.1:{control}");
    let server = Server::start(
        "puma",
        port,
        &[("config.ru", app), ("puma.rb", "worker_check_interval 1\n")],
        &[
            "puma",
            "-C",
            "puma.rb",
            "-e",
            "none",
            "-w",
            "2",
            "-t",
            threads,
            "-b",
            &bind,
            "--control-url",
            &control_url,
            "--control-token",
            "t",
            "config.ru",
        ],
    );
    (server, control)
}

/// Each worker's last status from Puma's control server (`/stats`): pid,
/// `pool_capacity` (threads free or still to spawn), `requests_count`.
fn puma_workers(control: u16) -> Vec<(u32, f64, f64)> {
    let Some(body) = http_get(control, "/stats?token=t") else {
        return vec![];
    };
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    stats["worker_status"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| {
            let status = w.get("last_status")?;
            Some((
                w["pid"].as_u64()? as u32,
                status.get("pool_capacity")?.as_f64()?,
                status.get("requests_count")?.as_f64()?,
            ))
        })
        .collect()
}

/// Each Puma worker as observer sees it, by pid: busy, and its threads
/// free to take a request.
fn puma_observed(daemon: &Daemon, port: u16) -> Vec<(u32, f64, f64)> {
    let m = daemon.scrape();
    let p = port.to_string();
    worker_pids_seen(&m, port)
        .into_iter()
        .filter_map(|pid| {
            let labels = [("port", p.as_str()), ("pid", &pid.to_string())];
            let busy = m.get("observer_worker_busy", &labels)?;
            let idle_threads = m.get("observer_worker_idle_threads", &labels)?;
            Some((pid, busy, idle_threads))
        })
        .collect()
}

/// While `clients` clients each hold one request of 3 s, every worker's
/// busy and free threads against Puma's own view, sampled where its
/// status is settled (a worker reports every second): busy = its
/// `pool_capacity` is 0, free threads = `pool_capacity`. Samples where
/// Puma's view changed while observer was read prove nothing and are
/// left out; the others must all agree. Returns the busy workers.
fn puma_agrees_while_held(daemon: &Daemon, server: &Server, control: u16, clients: usize) -> f64 {
    let load = load(server.port, clients, 1, 3.0);
    std::thread::sleep(Duration::from_millis(1500));
    let mut agreed = vec![];
    for _ in 0..4 {
        let before = puma_workers(control);
        let seen = puma_observed(daemon, server.port);
        if puma_workers(control) != before || before.len() != 2 {
            continue;
        }
        let truth: Vec<(u32, f64, f64)> = before
            .iter()
            .map(|(pid, capacity, _)| (*pid, (*capacity == 0.0) as u8 as f64, *capacity))
            .collect();
        let mut seen = seen;
        seen.sort_by_key(|w| w.0);
        let mut truth = truth;
        truth.sort_by_key(|w| w.0);
        println!("puma, {clients} client(s): observer {seen:?} vs Puma {truth:?}");
        assert_eq!(
            seen, truth,
            "{clients} client(s): (pid, busy, free threads) vs Puma's (pid, pool_capacity 0, pool_capacity)"
        );
        agreed.push(seen.iter().map(|w| w.1).sum::<f64>());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(finish(load), clients, "every request served");
    assert!(
        agreed.len() >= 2,
        "{clients} client(s): Puma's view never settled"
    );
    median(agreed)
}

/// Puma's workers are threaded: the `puma srv` thread selects on the
/// listener and hands connections to its pool threads. A worker is busy
/// when every thread of its pool serves, as Puma's `pool_capacity` 0 says:
/// idle from the first scrape after boot, busy under overload, busy while
/// its one thread serves (`-t 1:1`) and not while it can start more
/// (`-t 1:4`), busy when full with nothing waiting; each worker's free
/// threads are its `pool_capacity` once the pool has run all its threads;
/// and each worker's accepts are its `requests_count`.
fn puma_pool_tracks_its_stats(threads: &str, max_threads: usize) {
    let daemon = Daemon::start_with_pids();
    let (server, control) = puma(threads);
    let deadline = Instant::now() + Duration::from_secs(30);
    while puma_workers(control).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "puma workers never reported: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = daemon.scrape();
    assert_eq!(
        (
            pool_state(&m, server.port, "idle"),
            pool_state(&m, server.port, "busy")
        ),
        (2.0, 0.0),
        "a booted pool is idle from the first scrape:\n{}",
        m.text
    );
    let clients = 3 * 2 * max_threads;
    // About 5 s of work: 4 requests a client, 0.4 s each.
    let load = load(server.port, clients, 4, 0.4);
    std::thread::sleep(Duration::from_millis(1500));
    let full = || {
        puma_workers(control)
            .iter()
            .filter(|(_, capacity, _)| *capacity == 0.0)
            .count() as f64
    };
    let samples = sample(
        6,
        Duration::from_millis(300),
        || pool_state(&daemon.scrape(), server.port, "busy"),
        full,
    );
    let mut done = finish(load);
    assert_tracks(
        &samples,
        &format!("puma -t {threads}: busy workers vs full pools"),
    );
    assert_eq!(median(observed(&samples)), 2.0, "both pools full");
    wait_for_idle_pool(&daemon, server.port, 2.0);
    // One request in service: its worker is full only with one thread.
    let one_thread = (max_threads == 1) as u8 as f64;
    assert_eq!(
        puma_agrees_while_held(&daemon, &server, control, 1),
        one_thread
    );
    done += 1;
    // Every thread serves and nothing waits: both full.
    let every_thread = 2 * max_threads;
    assert_eq!(
        puma_agrees_while_held(&daemon, &server, control, every_thread),
        2.0
    );
    done += every_thread;
    // The control server's counts are a second old at most.
    std::thread::sleep(Duration::from_millis(2200));
    let m = daemon.scrape();
    let stats = puma_workers(control);
    let mut counted = 0.0;
    for (pid, _, requests) in &stats {
        let pid = pid.to_string();
        let p = server.port.to_string();
        let accepts = m.get(
            "observer_worker_accepts_total",
            &[("port", &p), ("pid", &pid)],
        );
        assert_eq!(
            accepts,
            Some(*requests),
            "worker {pid}: accepts vs requests_count"
        );
        counted += requests;
    }
    assert_eq!(
        counted, done as f64,
        "requests_count adds up to the clients' requests"
    );
    assert_eq!(pool_state(&m, server.port, "idle"), 2.0, "idle again");
}

#[test]
fn puma_one_thread_workers_are_busy_while_their_thread_serves_as_its_stats_say() {
    puma_pool_tracks_its_stats("1:1", 1);
}

#[test]
fn puma_four_thread_workers_are_busy_when_every_thread_serves_as_its_stats_say() {
    puma_pool_tracks_its_stats("1:4", 4);
}

/// Forks a child that accepts one connection from `listener` and exits.
fn fork_one_shot_acceptor(listener: &std::net::TcpListener) -> libc::pid_t {
    use std::os::fd::AsRawFd as _;
    // SAFETY: the child only calls async-signal-safe functions (accept,
    // close, _exit) before exiting.
    match unsafe { libc::fork() } {
        0 => unsafe {
            let fd = libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            if fd >= 0 {
                libc::close(fd);
            }
            libc::_exit(0)
        },
        pid => {
            assert!(pid > 0, "fork failed");
            pid
        }
    }
}

#[test]
fn thousands_of_short_lived_acceptors_are_counted_exactly_and_leave_nothing_behind() {
    let daemon = Daemon::start_with_pids();
    let listener = support::listen("127.0.0.1:0".parse().expect("addr"), 128);
    let port = listener.local_addr().expect("addr").port();
    let rounds = 2000;
    for round in 0..rounds {
        let child = fork_one_shot_acceptor(&listener);
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        drop(client);
        if round % 500 == 0 {
            daemon.scrape(); // collections while processes come and go
        }
    }
    let m = daemon.scrape();
    assert_eq!(
        m.listener("observer_connections_accepted_total", port),
        rounds as f64
    );
    assert_eq!(
        m.listener("observer_accept_queue_wait_seconds_count", port),
        rounds as f64
    );
    let port_label = port.to_string();
    let leftover: Vec<_> = m
        .samples
        .iter()
        .filter(|(n, l, _)| n.starts_with("observer_worker_") && l.get("port") == Some(&port_label))
        .filter(|(_, l, _)| {
            l.get("pid")
                .is_some_and(|p| p != &std::process::id().to_string())
        })
        .collect();
    assert!(
        leftover.is_empty(),
        "series of exited acceptors: {leftover:?}"
    );
    for reason in ["accept_map_full", "accept_read_error"] {
        assert_eq!(
            m.get("observer_kernel_events_lost_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
}

/// `clients` threads, each making `requests` HTTP/1.0 requests over the Unix
/// socket at `path`, for a response delayed by `sleep_s`.
fn load_unix(
    path: &std::path::Path,
    clients: usize,
    requests: usize,
    sleep_s: f64,
) -> Vec<ClientRun> {
    (0..clients)
        .map(|_| {
            let path = path.to_owned();
            std::thread::spawn(move || {
                let (mut done, mut took) = (0, Duration::ZERO);
                for _ in 0..requests {
                    let started = Instant::now();
                    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = write!(s, "GET /?{sleep_s} HTTP/1.0\r\nHost: x\r\n\r\n");
                    let mut reply = String::new();
                    if s.read_to_string(&mut reply).is_ok() && reply.contains(" 200 ") {
                        done += 1;
                        took += started.elapsed();
                    }
                }
                (done, took)
            })
        })
        .collect()
}

/// gunicorn bound to a Unix socket in its directory, with `extra` flags,
/// logging each request to `access.log` there; returns it and its socket.
fn gunicorn_unix(extra: &[&str]) -> (Server, PathBuf) {
    let id = free_port();
    let dir = std::env::temp_dir().join(format!("observer-gunicorn-{id}"));
    let sock = dir.join("gunicorn.sock");
    let bind = format!("unix:{}", sock.display());
    let mut cmd = vec!["gunicorn", "-b", &bind, "--access-logfile", "access.log"];
    cmd.extend_from_slice(extra);
    cmd.push("app:app");
    let files = [("app.py", WSGI_APP), ("hooks.py", GUNICORN_HOOKS)];
    let server = Server::start_until("gunicorn", id, &files, &cmd, || sock.exists());
    (server, sock)
}

#[test]
fn gunicorn_on_a_unix_socket_busy_workers_track_the_semaphore_and_accepts_match_its_access_log() {
    let daemon = Daemon::start_with_pids();
    let (server, sock) = gunicorn_unix(&["-c", "hooks.py", "-w", "3"]);
    let path = sock.to_str().expect("utf-8 temp dir").to_owned();
    let busy = |m: &Metrics, state: &str| {
        m.get("observer_workers", &[("path", &path), ("state", state)])
            .unwrap_or(-1.0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while busy(&daemon.scrape(), "idle") != 3.0 {
        assert!(
            Instant::now() < deadline,
            "3 idle workers never showed:\n{}",
            daemon.scrape().text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let load = load_unix(&sock, 2, 6, 0.3);
    std::thread::sleep(Duration::from_millis(400));
    let samples = sample(
        10,
        Duration::from_millis(150),
        || busy(&daemon.scrape(), "busy"),
        || server.semaphore() as f64,
    );
    let done = finish(load);
    assert_tracks(&samples, "gunicorn on a Unix socket");
    assert_eq!(
        median(observed(&samples)),
        2.0,
        "2 clients keep 2 of 3 workers busy"
    );
    let m = daemon.scrape();
    let log_lines = std::fs::read_to_string(server.dir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .count();
    assert_eq!(done, 12);
    assert_eq!(log_lines, done, "gunicorn logged every request");
    assert_eq!(
        m.get("observer_connections_accepted_total", &[("path", &path)]),
        Some(log_lines as f64)
    );
    let per_worker: f64 = m
        .samples
        .iter()
        .filter(|(n, l, _)| n == "observer_worker_accepts_total" && l.get("path") == Some(&path))
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(per_worker, log_lines as f64);
}

/// nginx on a free loopback port with one `location /` block, logging
/// each request's id and `$upstream_header_time` to `pair.log` in its
/// directory.
fn nginx_in_front(location: &str) -> Server {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("observer-nginx-{port}"));
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
         http {{\n log_format pair '$request_id $upstream_header_time';\n\
         access_log {d}/pair.log pair;\n client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         server {{\n  listen 127.0.0.1:{port};\n  location / {{ {location} }}\n }}\n}}\n",
        d = dir.display(),
    );
    let conf_path = dir.join("nginx.conf").display().to_string();
    let prefix = dir.display().to_string();
    Server::start(
        "nginx",
        port,
        &[("nginx.conf", &conf)],
        &["nginx", "-p", &prefix, "-c", &conf_path],
    )
}

/// `id value` lines of a log, as a map.
fn log_by_id(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter_map(|line| {
            let (id, value) = line.split_once(' ')?;
            Some((id.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn gunicorn_on_a_unix_socket_behind_nginx_waits_match_nginx_upstream_time_minus_gunicorn_time() {
    let daemon = Daemon::start_with_pids();
    let (server, sock) =
        gunicorn_unix(&["-w", "2", "--access-logformat", "%({x-request-id}i)s %(D)s"]);
    let nginx = nginx_in_front(&format!(
        "proxy_pass http://unix:{}:; proxy_set_header X-Request-Id $request_id; \
         proxy_read_timeout 60s;",
        sock.display()
    ));
    let path = sock.to_str().expect("utf-8 temp dir").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon
        .scrape()
        .get("observer_workers", &[("path", &path), ("state", "idle")])
        != Some(2.0)
    {
        assert!(
            Instant::now() < deadline,
            "2 idle gunicorn workers never showed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // 6 clients against 2 workers: most requests wait in the Unix queue.
    let done = finish(load(nginx.port, 6, 3, 0.3));
    assert_eq!(done, 18);
    let m = daemon.scrape();
    let read = |dir: &PathBuf, file: &str| {
        log_by_id(&std::fs::read_to_string(dir.join(file)).unwrap_or_default())
    };
    // nginx: from connecting to the socket to the reply's header (s);
    // gunicorn: its own time for the request (µs). The rest is the queue.
    let header_s = read(&nginx.dir, "pair.log");
    let served_us = read(&server.dir, "access.log");
    let waits: Vec<f64> = header_s
        .iter()
        .filter_map(|(id, h)| Some(h - served_us.get(id)? / 1e6))
        .collect();
    assert_eq!(waits.len(), done, "every request paired by its id");
    let truth: f64 = waits.iter().sum();
    let counted = m.get(
        "observer_accept_queue_wait_seconds_count",
        &[("path", &path)],
    );
    let wait_sum = m
        .get("observer_accept_queue_wait_seconds_sum", &[("path", &path)])
        .unwrap_or(-1.0);
    println!("wait sum {wait_sum} s; nginx minus gunicorn {truth} s; waits {waits:?}");
    assert_eq!(counted, Some(done as f64));
    assert!(truth > 3.0, "the queue held requests: {truth} s of waits");
    // nginx's clock ticks in ms: up to 1 ms per request either way, plus
    // gunicorn's read and parse of each request.
    assert!(
        (wait_sum - truth).abs() <= 0.01 * truth + 0.002 * done as f64,
        "observer's wait sum {wait_sum} s vs nginx minus gunicorn {truth} s"
    );
}

const SLOW_PHP: &str =
    "<?php usleep((int)((float)$_SERVER['QUERY_STRING'] * 1e6)); echo \"ok\\n\";\n";

/// php-fpm's binary: Debian names it by version (php-fpm8.2).
fn php_fpm_binary() -> String {
    std::fs::read_dir("/usr/sbin")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("php-fpm"))
        .map(|name| format!("/usr/sbin/{name}"))
        .expect("php-fpm (cargo xtask setup installs it)")
}

/// php-fpm in the foreground, one static pool of `children` on a Unix
/// socket (as Debian configures it), with its status page; returns it and
/// its socket.
fn php_fpm(children: u32) -> (Server, PathBuf) {
    php_fpm_pool(&format!("pm = static\npm.max_children = {children}\n"))
}

/// php-fpm on a Unix socket with the process manager lines `pm`.
fn php_fpm_pool(pm: &str) -> (Server, PathBuf) {
    let id = free_port();
    let dir = std::env::temp_dir().join(format!("observer-php-fpm-{id}"));
    let sock = dir.join("php.sock");
    let conf = format!(
        "[global]\npid = {d}/php-fpm.pid\nerror_log = /proc/self/fd/2\ndaemonize = no\n\
         [www]\nuser = root\ngroup = root\nlisten = {s}\nlisten.backlog = 64\n\
         listen.mode = 0666\n{pm}pm.status_path = /status\n",
        d = dir.display(),
        s = sock.display()
    );
    let binary = php_fpm_binary();
    let server = Server::start_until(
        "php-fpm",
        id,
        &[("php-fpm.conf", &conf), ("slow.php", SLOW_PHP)],
        &[&binary, "-F", "-R", "-n", "-y", "php-fpm.conf"],
        || sock.exists(),
    );
    (server, sock)
}

/// nginx passing every request to the php-fpm pool on `sock` (its scripts
/// and status page).
fn nginx_in_front_of_php_fpm(server: &Server, sock: &std::path::Path) -> Server {
    nginx_in_front(&format!(
        "root {}; include /etc/nginx/fastcgi_params; \
         fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name; \
         fastcgi_pass unix:{}; fastcgi_read_timeout 60s;",
        server.dir.display(),
        sock.display()
    ))
}

/// php-fpm's status page through nginx, as JSON.
fn php_fpm_status(nginx_port: u16) -> serde_json::Value {
    http_get(nginx_port, "/status?json")
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Recv-Q of the Unix listener at `path`, per `ss -lx`.
fn ss_unix_queue(path: &std::path::Path) -> f64 {
    let out = run(Command::new("ss").args(["-Hlx", "src", &path.display().to_string()]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn php_fpm_on_a_unix_socket_busy_tracks_its_status_page_and_depth_tracks_ss_where_fpm_says_0() {
    let daemon = Daemon::start_with_pids();
    let (server, sock) = php_fpm(4);
    let nginx = nginx_in_front_of_php_fpm(&server, &sock);
    let pool = Pool::Path(sock.display().to_string());
    // Busy: the status page's active processes, less the one serving it.
    let run = PoolRun {
        workers: 4.0,
        clients: 3,
        requests: 8,
        sleep_s: 0.3,
        samples: 12,
        every_ms: 150,
        what: "php-fpm on a Unix socket: busy vs its status page's active processes - 1",
        truth_connections: 1,
    };
    busy_tracks_truth_at(
        &daemon,
        pool.clone(),
        (nginx.port, "/slow.php"),
        &run,
        || {
            php_fpm_status(nginx.port)["active processes"]
                .as_f64()
                .map_or(-1.0, |active| active - 1.0)
        },
    );
    // Overload: 8 clients on 4 children; the queue grows, as ss -lx shows.
    let load = load_at(nginx.port, "/slow.php", 8, 4, 0.4);
    std::thread::sleep(Duration::from_millis(300));
    let depth = |m: &Metrics| {
        let (name, value) = pool.label();
        m.get("observer_listen_queue_length", &[(name, &value)])
            .unwrap_or(-1.0)
    };
    let samples = sample(
        8,
        Duration::from_millis(100),
        || depth(&daemon.scrape()),
        || ss_unix_queue(&sock),
    );
    // Its own status, asked while the queue holds connections, says 0.
    let status = php_fpm_status(nginx.port);
    assert_eq!(finish(load), 32);
    assert_tracks(&samples, "php-fpm's Unix queue vs ss -lx");
    assert!(
        samples.iter().any(|s| s.observer >= 2.0),
        "the queue grew: {samples:?}"
    );
    println!("php-fpm status under overload: {status}");
    assert_eq!(status["listen queue"].as_f64(), Some(0.0));
    assert_eq!(status["max listen queue"].as_f64(), Some(0.0));
    // Accepts: php-fpm's own count, which includes this status request.
    let (name, value) = pool.label();
    let accepted = daemon
        .scrape()
        .get("observer_connections_accepted_total", &[(name, &value)]);
    let fpm_accepted = php_fpm_status(nginx.port)["accepted conn"].as_f64();
    assert_eq!(accepted.map(|n| n + 1.0), fpm_accepted);
}

/// php-fpm with `pm = ondemand`: a child is forked for a request that finds
/// none idle and exits after 1 s idle, so every burst of clients, 2.5 s
/// apart, is served by new children. Scraped every second with the default
/// labels: the worker series stay within twice the most children alive at
/// once, and the slots' accepts add up to the listener's and to php-fpm's
/// own "accepted conn" (its status page; the status requests included).
#[test]
fn php_fpm_ondemand_children_keep_a_bounded_set_of_series_whose_accepts_equal_its_accepted_conn() {
    let daemon = Daemon::start_with(&[]);
    let per_pid = Daemon::start_with_pids();
    let (server, sock) =
        php_fpm_pool("pm = ondemand\npm.max_children = 4\npm.process_idle_timeout = 1s\n");
    let nginx = nginx_in_front_of_php_fpm(&server, &sock);
    let pool = || Pool::Path(sock.display().to_string());
    let (mut slots, mut pids, mut most_alive, mut served) =
        (BTreeSet::new(), BTreeSet::new(), 0, 0);
    let mut see = |m: &Metrics| {
        slots.extend(label_values(
            m,
            "observer_worker_accepts_total",
            pool(),
            "worker",
        ));
        let alive = label_values(m, "observer_worker_busy", pool(), "worker").len();
        most_alive = most_alive.max(alive);
        pids.extend(label_values(
            &per_pid.scrape(),
            "observer_worker_busy",
            pool(),
            "pid",
        ));
    };
    for _ in 0..4 {
        let burst = load_at(nginx.port, "/slow.php", 3, 3, 0.3);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(1));
            see(&daemon.scrape());
        }
        served += finish(burst);
        std::thread::sleep(Duration::from_millis(2500));
        see(&daemon.scrape());
    }
    let accepted_conn = php_fpm_status(nginx.port)["accepted conn"]
        .as_f64()
        .expect("php-fpm's status page");
    std::thread::sleep(Duration::from_millis(1500));
    let m = daemon.scrape();
    see(&m);
    let (name, value) = pool().label();
    let listener = m
        .get("observer_connections_accepted_total", &[(name, &value)])
        .unwrap_or(-1.0);
    let accepts = sum_per_worker(&m, "observer_worker_accepts_total", pool());
    println!(
        "php-fpm ondemand: {served} requests, accepted conn {accepted_conn}; {} worker slots (most alive at once {most_alive}) for {} children seen; slots' accepts {accepts}, listener {listener}",
        slots.len(),
        pids.len()
    );
    assert_eq!(served, 4 * 3 * 3, "every request served");
    assert!(pids.len() > 4, "children came and went: {pids:?}");
    assert!(
        slots.len() <= 2 * most_alive.max(1),
        "{} worker series for at most {most_alive} children alive at once: {slots:?}",
        slots.len()
    );
    assert_eq!(
        (accepts, listener),
        (accepted_conn, accepted_conn),
        "slots' accepts = the listener's = php-fpm's accepted conn"
    );
}

/// A fleet may leave per-worker series out; the pool's own figures then
/// say what they would. gunicorn with 2 workers, one of them stopped
/// (SIGSTOP), so the other accepts every connection: the busiest worker's
/// share of accepts is 1; the pool's busy time is its workers' summed (a
/// daemon with per-worker series, in the same scrape) and the requests'
/// time by the clients' clocks within 5%; and no series of a worker is
/// left.
#[test]
fn without_per_worker_series_the_pools_figures_say_its_busy_time_and_busiest_share() {
    let pooled = Daemon::start_with(&["--no-collector.workers.per-worker"]);
    let full = Daemon::start_with_pids();
    let server = gunicorn(&["-w", "2"]);
    wait_for_idle_pool(&full, server.port, 2.0);
    let stopped = server.worker_pids()[0] as i32;
    // SAFETY: a signal to a worker of the server this test started.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    pooled.scrape(); // the share's rates start from here
    let (done, client_seconds) = finish_timed(load(server.port, 1, 8, 0.5));
    std::thread::sleep(Duration::from_millis(300));
    let p = server.port.to_string();
    let m = pooled.scrape();
    let share = m.get("observer_workers_accepts_max_share", &[("port", &p)]);
    let busy = m.listener("observer_workers_busy_seconds_total", server.port);
    let per_worker: Vec<&String> = m
        .samples
        .iter()
        .filter(|(_, l, _)| l.contains_key("worker"))
        .map(|(n, _, _)| n)
        .collect();
    let f = full.scrape();
    let (pool_busy, sum_busy) = (
        f.listener("observer_workers_busy_seconds_total", server.port),
        sum_per_worker(&f, "observer_worker_busy_seconds_total", server.port),
    );
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    println!(
        "{done} requests in {client_seconds:.2} s: share {share:?}, pool busy {busy:.2} s; with per-worker series: pool {pool_busy:.3} = sum {sum_busy:.3}"
    );
    assert_eq!(done, 8);
    assert_eq!(share, Some(1.0), "one worker took every connection");
    assert!(per_worker.is_empty(), "per-worker series: {per_worker:?}");
    assert_eq!(
        pool_busy, sum_busy,
        "the pool's busy time is its workers' summed"
    );
    assert!(
        (busy - client_seconds).abs() <= 0.05 * client_seconds,
        "pool busy {busy:.2} s vs the clients' {client_seconds:.2} s"
    );
}

/// The worker pids `observer listeners --json` lists on `port`.
fn listed_worker_pids(port: u16) -> Vec<u32> {
    let out = run_ok(Command::new(support::observer_bin()).args([
        "listeners",
        "--json",
        "--interval",
        "100ms",
        "--port",
        &port.to_string(),
    ]));
    let listeners: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut pids: Vec<u32> = listeners[0]["worker_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| Some(w["pid"].as_u64()? as u32))
        .collect();
    pids.sort();
    pids
}

/// nginx with one server on forty ports: each worker inherited every
/// listening socket from the master, the shape in which the holder walk
/// counts a worker's inherited sockets instead of writing each out. Every
/// port's pool is the master's children, as `pgrep -P` lists them.
#[test]
fn nginx_workers_that_inherited_forty_listen_ports_are_the_pool_of_each() {
    let daemon = Daemon::start();
    let mut ports = BTreeSet::new();
    while ports.len() < 40 {
        ports.insert(free_port());
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    let first = ports[0];
    let dir = std::env::temp_dir().join(format!("observer-nginx-{first}"));
    let listens: String = ports
        .iter()
        .map(|p| format!("  listen 127.0.0.1:{p};\n"))
        .collect();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 4;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         server {{\n{listens}  location / {{ return 200 \"ok\\n\"; }}\n }}\n}}\n",
        d = dir.display(),
    );
    let conf_path = dir.join("nginx.conf").display().to_string();
    let prefix = dir.display().to_string();
    let nginx = Server::start_until(
        "nginx",
        first,
        &[("nginx.conf", &conf)],
        &["nginx", "-p", &prefix, "-c", &conf_path],
        || ports.iter().all(|p| !ss_listen_queues(*p).is_empty()),
    );
    let workers = until("nginx's 4 workers", 10, || {
        let workers = nginx.worker_pids();
        (workers.len() == 4).then_some(workers)
    });
    for port in &ports {
        wait_for_idle_pool(&daemon, *port, 4.0);
    }
    for port in [ports[0], ports[19], ports[39]] {
        assert_eq!(listed_worker_pids(port), workers, "port {port}");
    }
}

/// A master with three listeners forks four children that inherit them;
/// two of the children close the third. The holder walk's count for those
/// two falls short of the master's, and the daemon reads which listeners
/// they kept from /proc. Every port's workers are the pids `ss -ltnp`
/// lists on it, less the master.
#[test]
fn children_that_closed_an_inherited_listener_are_workers_of_the_others_only() {
    const TREE: &str = "import os, socket, sys, time\n\
        socks = []\n\
        for port in sys.argv[1:]:\n\
        \x20   s = socket.socket()\n\
        \x20   s.bind(('127.0.0.1', int(port)))\n\
        \x20   s.listen(16)\n\
        \x20   socks.append(s)\n\
        for child in range(4):\n\
        \x20   if os.fork() == 0:\n\
        \x20       if child % 2 == 1:\n\
        \x20           socks[2].close()\n\
        \x20       while True:\n\
        \x20           socks[0].accept()[0].close()\n\
        time.sleep(600)\n";
    let daemon = Daemon::start();
    let mut ports = BTreeSet::new();
    while ports.len() < 3 {
        ports.insert(free_port());
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    let args: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    let mut cmd = vec!["python3", "tree.py"];
    cmd.extend(args.iter().map(|a| a.as_str()));
    let tree = Server::start_until("inherit", ports[0], &[("tree.py", TREE)], &cmd, || {
        ports.iter().all(|p| !ss_listen_queues(*p).is_empty())
    });
    let master = tree.child.id();
    let holders_by_ss = |port: u16| {
        let out = run_ok(Command::new("ss").args(["-Hltnp", &format!("sport = :{port}")]));
        let mut pids: Vec<u32> = out
            .split("pid=")
            .skip(1)
            .filter_map(|rest| rest.split(',').next()?.parse().ok())
            .filter(|pid| *pid != master)
            .collect();
        pids.sort();
        pids
    };
    let expected = [4.0, 4.0, 2.0];
    let truth = until("4, 4 and 2 children on the ports", 10, || {
        let truth: Vec<Vec<u32>> = ports.iter().map(|p| holders_by_ss(*p)).collect();
        let sizes: Vec<f64> = truth.iter().map(|t| t.len() as f64).collect();
        (sizes == expected).then_some(truth)
    });
    for (port, n) in ports.iter().zip(expected) {
        wait_for_idle_pool(&daemon, *port, n);
    }
    for (port, pids) in ports.iter().zip(&truth) {
        assert_eq!(&listed_worker_pids(*port), pids, "port {port}");
    }
}
