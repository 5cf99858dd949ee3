//! `cargo xtask bench`'s growth table: what the daemon costs as the host's
//! listeners, workers and network namespaces grow (targets: at 10,000
//! listeners and 1,000 workers, start-up ≤ 5 s, scrape ≤ 50 ms, exposition
//! ≤ 8 MiB, RSS ≤ 64 MiB, /healthz ≤ 50 ms during a scrape; where the
//! workers inherited every listener, peak RSS ≤ 128 MiB).
//!
//! Each scene is made by this process: it opens the listeners (or forks one
//! child per network namespace that opens them there) and forks the pools,
//! whose workers block in `accept()`, in one of three holding shapes
//! ([`Holding`]); then a fresh daemon is started and measured, and
//! everything is killed.
use std::{
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::daemon::{
    ObserverDaemon, SamplerCost, http_get, median, peak_rss_mib, rss_mib, sampler_cost,
};

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// Network namespaces holding listeners (1: the host's only).
    pub netns: usize,
    /// Listeners per namespace.
    pub listeners: usize,
    /// Worker processes blocked in accept().
    pub workers: usize,
    pub holding: Holding,
    /// Threads of an unrelated process, parked (a JVM's, a sidecar's): a
    /// big host's threads that no pool owns.
    pub parked_threads: usize,
    /// The daemon reads worker threads from /proc
    /// (`--collector.workers.sampler proc`, as before Linux 5.18).
    pub proc_sampler: bool,
}

/// Which listeners the workers hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// One pool, its workers holding the first listener only.
    First,
    /// One pool whose master opened every listener before forking: each
    /// worker inherited all of them (nginx or Apache with many `Listen`s;
    /// this process holds none).
    All,
    /// One-worker pools, each on a listener of its own (a master and its
    /// worker), among the rest (many small apps on one host).
    OnePerPool,
}

impl Holding {
    fn name(self) -> &'static str {
        match self {
            Holding::First => "first",
            Holding::All => "all",
            Holding::OnePerPool => "pools",
        }
    }
}

impl Scene {
    /// `NETNSxLISTENERSxWORKERS[:HOLDING][+PARKED][@proc]`, e.g.
    /// `1x10000x1000`, `1x10000x1000:all` (holding: `first`, the default,
    /// `all` or `pools`), `1x10x2+10000` (10,000 parked threads besides) or
    /// `1x10x100@proc` (the /proc thread sampler).
    pub fn parse(text: &str) -> Result<Scene, String> {
        let (text, proc_sampler) = match text.strip_suffix("@proc") {
            Some(scene) => (scene, true),
            None => (text, false),
        };
        let (text, parked_threads) = match text.split_once('+') {
            Some((scene, parked)) => (
                scene,
                parked
                    .parse()
                    .map_err(|_| format!("{parked:?} is not a number of parked threads"))?,
            ),
            None => (text, 0),
        };
        let (sizes, holding) = text.split_once(':').unwrap_or((text, "first"));
        let holding = match holding {
            "first" => Holding::First,
            "all" => Holding::All,
            "pools" => Holding::OnePerPool,
            other => {
                return Err(format!(
                    "{other:?} is not a holding shape (first, all or pools)"
                ));
            }
        };
        let numbers: Vec<usize> = sizes
            .split('x')
            .map(|n| n.parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{text:?} is not NETNSxLISTENERSxWORKERS[:HOLDING]"))?;
        match numbers[..] {
            [netns, listeners, workers]
                if netns > 0 && listeners > 0 && (holding == Holding::First || netns == 1) =>
            {
                if holding == Holding::OnePerPool && workers > listeners {
                    return Err(format!("{text:?}: more one-worker pools than listeners"));
                }
                Ok(Scene {
                    netns,
                    listeners,
                    workers,
                    holding,
                    parked_threads,
                    proc_sampler,
                })
            }
            _ => Err(format!(
                "{text:?} is not NETNSxLISTENERSxWORKERS[:HOLDING][+PARKED][@proc] (at least 1 namespace and 1 listener; all and pools in 1 namespace)"
            )),
        }
    }
}

/// The full table: 10 / 1k / 10k listeners × 10 / 100 / 1,000 workers, and
/// 100 network namespaces × 100 listeners; then the other holding shapes:
/// 1,000 workers that inherited 10,000 listeners, 64 that inherited 2,000,
/// and 1,000 one-worker pools among 10,000 listeners; and a big host: a
/// 2-worker pool beside 10,000 parked threads.
pub fn scenes(quick: bool) -> Vec<Scene> {
    let s = |netns, listeners, workers, holding| Scene {
        netns,
        listeners,
        workers,
        holding,
        parked_threads: 0,
        proc_sampler: false,
    };
    if quick {
        return vec![
            s(1, 10, 10, Holding::First),
            s(3, 10, 10, Holding::First),
            s(1, 10, 10, Holding::All),
            s(1, 10, 5, Holding::OnePerPool),
        ];
    }
    let mut all = Vec::new();
    for listeners in [10, 1000, 10000] {
        for workers in [10, 100, 1000] {
            all.push(s(1, listeners, workers, Holding::First));
        }
    }
    all.push(s(100, 100, 10, Holding::First));
    all.push(s(1, 2000, 64, Holding::All));
    all.push(s(1, 10000, 1000, Holding::All));
    all.push(s(1, 10000, 1000, Holding::OnePerPool));
    all.push(Scene {
        parked_threads: 10_000,
        ..s(1, 10, 2, Holding::First)
    });
    for workers in [10, 100] {
        all.push(Scene {
            proc_sampler: true,
            ..s(1, 10, workers, Holding::First)
        });
    }
    all
}

/// Processes this process forked for a scene; killed and reaped on drop.
#[derive(Default)]
struct Children {
    pids: Vec<i32>,
    /// Process groups of pools (a master and its workers), each killed as
    /// one; the workers come back to this process (a child subreaper, see
    /// [`run`]) when their master dies, and are reaped here too.
    groups: Vec<i32>,
}

impl Drop for Children {
    fn drop(&mut self) {
        // SAFETY: killing and reaping our own children and their groups.
        unsafe {
            for group in &self.groups {
                libc::kill(-group, libc::SIGKILL);
            }
            for pid in &self.pids {
                libc::kill(*pid, libc::SIGKILL);
            }
            for pid in &self.pids {
                libc::waitpid(*pid, std::ptr::null_mut(), 0);
            }
            // Bounded: one wait per process of the group, until none is left.
            for group in &self.groups {
                while libc::waitpid(-group, std::ptr::null_mut(), 0) > 0 {}
            }
        }
    }
}

/// While it lives, this process is a child subreaper: a pool's workers,
/// which outlive their master by a moment when a scene ends, come back to
/// it and are reaped (see [`Children`]), not left to init.
struct Subreaper;

impl Subreaper {
    fn become_one() -> Subreaper {
        // SAFETY: prctl sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        Subreaper
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0) };
    }
}

/// Forks a child that runs `body` (async-signal-safe calls only: this
/// process may have threads) and never returns.
fn fork_child(children: &mut Children, body: impl FnOnce()) -> Result<()> {
    // SAFETY: the child runs `body`, which only makes raw syscalls, then
    // waits to be killed; it never returns into Rust code that could
    // touch state another thread held at the fork.
    match unsafe { libc::fork() } {
        0 => {
            body();
            loop {
                // SAFETY: pause() only waits for a signal.
                unsafe { libc::pause() };
            }
        }
        pid if pid > 0 => {
            children.pids.push(pid);
            Ok(())
        }
        _ => bail!("fork failed: {}", std::io::Error::last_os_error()),
    }
}

/// In a forked child: a new network namespace with `n` TCP listeners on
/// 0.0.0.0, ports chosen by the kernel.
fn listeners_in_new_netns(n: usize) {
    // SAFETY: unshare() changes only this child's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return;
    }
    open_listeners(n, 0);
}

/// Opens `n` TCP listeners on `addr` (network order), ports chosen by the
/// kernel; returns the first one's fd (-1 if none). Raw syscalls only, for
/// forked children. Failures leave fewer listeners, which the table's
/// exposition size shows.
fn open_listeners(n: usize, addr: u32) -> i32 {
    let mut first = -1;
    // SAFETY: raw syscalls with valid arguments.
    unsafe {
        for _ in 0..n {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: addr },
                sin_zero: [0; 8],
            };
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            libc::listen(fd, 128);
            if first < 0 {
                first = fd;
            }
        }
    }
    first
}

/// The listeners of a pool the bench forks.
#[derive(Clone, Copy)]
enum PoolListeners {
    /// One of this process's: the master and its workers keep it only.
    Kept(i32),
    /// This many, opened by the master before it forks: every worker
    /// inherits them all, and accepts on the first.
    Opened(usize),
}

/// Forks a pool master, in a process group of its own, that forks
/// `workers` processes blocked in accept() on its listener; returns once
/// they all are forked.
fn fork_pool(children: &mut Children, listeners: PoolListeners, workers: usize) -> Result<()> {
    let mut ready = [0i32; 2];
    // SAFETY: pipe() fills the two fds.
    if unsafe { libc::pipe(ready.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let [read_end, write_end] = ready;
    let mut master = Children::default();
    fork_child(&mut master, || pool_master(listeners, workers, write_end))?;
    // The master leads its group (it calls setpgid before it says ready).
    children.groups.append(&mut master.pids);
    let mut forked = [0u8; 4];
    // SAFETY: reading into our own buffer; closing our pipe fds.
    let n = unsafe {
        libc::close(write_end);
        let n = loop {
            let n = libc::read(read_end, forked.as_mut_ptr().cast(), forked.len());
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        libc::close(read_end);
        n
    };
    if n != forked.len() as isize {
        bail!("the pool master exited before forking its workers");
    }
    let forked = u32::from_ne_bytes(forked) as usize;
    if forked != workers {
        bail!("the pool master forked {forked} of {workers} workers (fork failed: see ulimit -u)");
    }
    Ok(())
}

/// In a forked child: leads a process group of its own, keeps or opens its
/// listeners (closing every other fd but stdio and `ready`), forks the
/// workers, then writes how many it forked to `ready`.
fn pool_master(listeners: PoolListeners, workers: usize, ready: i32) {
    // SAFETY: raw syscalls only (setpgid, close_range, socket, fork,
    // prctl, write), as fork_child asks.
    unsafe {
        libc::setpgid(0, 0);
        let keep = match listeners {
            PoolListeners::Kept(listener) => listener,
            PoolListeners::Opened(_) => ready,
        };
        let (low, high) = (keep.min(ready), keep.max(ready));
        for (first, last) in [(3, low - 1), (low + 1, high - 1), (high + 1, i32::MAX)] {
            if first <= last {
                libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0);
            }
        }
        let (listener, inherit) = match listeners {
            PoolListeners::Kept(listener) => (listener, false),
            PoolListeners::Opened(n) => {
                (open_listeners(n, u32::from_ne_bytes([127, 0, 0, 1])), true)
            }
        };
        let master = libc::getpid();
        let mut forked: u32 = 0;
        for _ in 0..workers {
            match libc::fork() {
                0 => {
                    libc::close(ready);
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The master died before the line above: go with it.
                    if libc::getppid() != master {
                        libc::_exit(0);
                    }
                    worker_in_accept(listener, inherit);
                }
                pid if pid > 0 => forked += 1,
                _ => break,
            }
        }
        libc::write(ready, forked.to_ne_bytes().as_ptr().cast(), 4);
        libc::close(ready);
    }
}

/// In a forked worker: keeps only `listener` (as fd 3) and stdio, or with
/// `inherit` every fd, and blocks in accept() for ever.
fn worker_in_accept(listener: i32, inherit: bool) {
    const LISTENER: i32 = 3;
    // SAFETY: raw syscalls on this child's own fds.
    unsafe {
        if inherit {
            loop {
                libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
            }
        }
        if listener != LISTENER {
            libc::dup2(listener, LISTENER);
        }
        libc::syscall(libc::SYS_close_range, LISTENER + 1, u32::MAX, 0);
        loop {
            libc::accept(LISTENER, std::ptr::null_mut(), std::ptr::null_mut());
        }
    }
}

/// A process of `n` threads that sleep (python3, as a JVM's or a
/// sidecar's idle threads would), killed with `children`; returns once all
/// of them are there. It is init's child, not this process's: this process
/// holds a pool's listener, and a holder's children would be its pool's
/// new workers to the sampler.
fn park_threads(n: usize, children: &mut Children) -> Result<()> {
    let script = format!(
        "import threading, time\n\
         threading.stack_size(64 * 1024)\n\
         for _ in range({n}):\n    threading.Thread(target=time.sleep, args=(86400,), daemon=True).start()\n\
         time.sleep(86400)\n"
    );
    // SAFETY: prctl clears a flag of this process, for the moment the shell
    // below leaves python3 an orphan (init adopts it); set again after.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0) };
    let spawned = std::process::Command::new("sh")
        .args(["-c", "python3 -c \"$0\" >/dev/null 2>&1 & echo $!", &script])
        .output();
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let spawned = spawned.context("starting python3 to park threads")?;
    let pid: i32 = String::from_utf8_lossy(&spawned.stdout)
        .trim()
        .parse()
        .context("the parked threads' pid")?;
    children.pids.push(pid);
    let tasks = format!("/proc/{pid}/task");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&tasks).map_or(0, |t| t.count()) < n + 1 {
        if Instant::now() > deadline {
            bail!("python3 did not park {n} threads within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What a scene's daemon measured.
struct Measured {
    start_up: f64,
    scrape_ms: f64,
    size: usize,
    /// Every /healthz probe's time that overlapped a scrape.
    healthz_ms: Vec<f64>,
    rss: f64,
    peak_rss: f64,
    sampler: SamplerCost,
    stages: Vec<(String, f64)>,
}

/// /healthz latencies (ms) taken while a /metrics scrape is in flight.
fn healthz_during_scrape(port: u16) -> (f64, Vec<f64>) {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let start = Instant::now();
    let scrape = std::thread::spawn(move || {
        let size = http_get(port, "/metrics").map_or(0, |b| b.len());
        flag.store(true, Ordering::Relaxed);
        size
    });
    let mut healthz = Vec::new();
    // Bounded: at most 200 probes, 2 ms apart.
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(2));
        if done.load(Ordering::Relaxed) {
            break;
        }
        let t = Instant::now();
        let _ = http_get(port, "/healthz");
        if !done.load(Ordering::Relaxed) {
            healthz.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = scrape.join();
    (start.elapsed().as_secs_f64() * 1e3, healthz)
}

/// "median, max" of the /healthz probes, or why there are none: a scrape
/// shorter than the probes' 2 ms spacing ends before the first.
fn healthz_cell(healthz_ms: &[f64]) -> String {
    if healthz_ms.is_empty() {
        return "— (each scrape ended before the first probe)".to_owned();
    }
    let max = healthz_ms.iter().copied().fold(0.0, f64::max);
    format!("{:.1}, {max:.1}", median(healthz_ms.to_vec()))
}

/// `observer_collect_stage_seconds{stage}` of the daemon's last collection.
fn stages(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("observer_collect_stage_seconds{stage=\"")?;
            let (stage, value) = rest.split_once("\"} ")?;
            Some((stage.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn measure(bin: &Path, window: Duration, flags: &[&str]) -> Result<Measured> {
    // Start-up: the daemon binds its port first, so the first scrape waits
    // in its backlog until the first collection is done.
    let spawned = Instant::now();
    let daemon = ObserverDaemon::start_with(bin, None, flags)?;
    let _ = http_get(daemon.port, "/metrics");
    let start_up = spawned.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut healthz = Vec::new();
    for _ in 0..5 {
        let (scrape_ms, during) = healthz_during_scrape(daemon.port);
        times.push(scrape_ms);
        healthz.extend(during);
    }
    let text = http_get(daemon.port, "/metrics").unwrap_or_default();
    let size = text.len();
    let stages = stages(&String::from_utf8_lossy(&text));
    let rss = rss_mib(daemon.pid());
    let sampler = sampler_cost(&daemon, window)?;
    let peak_rss = peak_rss_mib(daemon.pid());
    Ok(Measured {
        start_up,
        scrape_ms: median(times),
        size,
        healthz_ms: healthz,
        rss,
        peak_rss,
        sampler,
        stages,
    })
}

fn raise_fd_limit(n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit with a valid struct; failure only limits the growth sizes.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

/// Threads on the host now (what each sampler pass walks).
fn host_threads() -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_dir(e.path().join("task")).ok())
        .map(|tasks| tasks.count())
        .sum()
}

/// The "workers hold" cell: the holding shape, and the parked threads
/// beside it.
fn holding_cell(scene: &Scene) -> String {
    let mut cell = scene.holding.name().to_owned();
    if scene.parked_threads > 0 {
        cell.push_str(&format!(", {} parked threads beside", scene.parked_threads));
    }
    if scene.proc_sampler {
        cell.push_str(", /proc sampler");
    }
    cell
}

/// Start-up, scrape latency, exposition, memory, /healthz and CPU per scene;
/// then where each scene's scrape spent its time.
pub fn run(scenes: &[Scene], window: Duration, bin: &Path, report: &mut String) -> Result<()> {
    report.push_str(
        "\n| netns | listeners | workers | workers hold | start-up s (spawn to first /metrics) | scrape ms (median of 5) | /metrics KiB | daemon RSS MiB | daemon peak RSS MiB (VmHWM) | /healthz ms during a scrape (median, max) | daemon CPU % of a core, 15 s scrapes (sampler + scrape) | sampler interval s | sampler µs per pass | threads on the host | sampler ns per host thread | watched threads per pass | sampler ns per watched thread | passes that walked the host % |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let most = scenes.iter().map(|s| s.listeners).max().unwrap_or(0);
    raise_fd_limit(most as u64 + 1024);
    let _subreaper = Subreaper::become_one();
    let mut profile = String::new();
    for scene in scenes {
        let mut children = Children::default();
        let host = open_scene(scene, &mut children)?;
        let flags: &[&str] = if scene.proc_sampler {
            &["--collector.workers.sampler", "proc"]
        } else {
            &[]
        };
        let m = measure(bin, window, flags)?;
        let threads = host_threads();
        report.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {:.2} | {:.3} | {:.0} | {threads} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            scene.netns,
            scene.listeners * scene.netns,
            scene.workers,
            holding_cell(scene),
            m.start_up,
            m.scrape_ms,
            m.size as f64 / 1024.0,
            m.rss,
            m.peak_rss,
            healthz_cell(&m.healthz_ms),
            m.sampler.cpu,
            m.sampler.interval,
            m.sampler.pass_us,
            m.sampler.pass_us * 1e3 / threads.max(1) as f64,
            m.sampler.watched_threads,
            m.sampler.pass_us * 1e3 / m.sampler.watched_threads.max(1.0),
            m.sampler.host_walk_share * 100.0,
        ));
        let stages: Vec<String> = m
            .stages
            .iter()
            .map(|(stage, s)| format!("{stage} {:.1}", s * 1e3))
            .collect();
        profile.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            scene.netns,
            scene.listeners * scene.netns,
            scene.workers,
            holding_cell(scene),
            stages.join(", ")
        ));
        drop(host);
    }
    report.push_str(
        "\n| netns | listeners | workers | workers hold | the last scrape's collection by stage, ms (observer_collect_stage_seconds) |\n|---|---|---|---|---|\n",
    );
    report.push_str(&profile);
    Ok(())
}

/// Opens a scene's listeners and forks its pools (killed with
/// `children`); returns the listeners this process holds.
fn open_scene(scene: &Scene, children: &mut Children) -> Result<Vec<TcpListener>> {
    if scene.parked_threads > 0 {
        park_threads(scene.parked_threads, children)?;
    }
    let bind = || TcpListener::bind("127.0.0.1:0");
    match scene.holding {
        Holding::First => {
            // The pool: a master forked while this process holds few fds
            // forks the workers, which hold the first listener only, in fd
            // tables as small as a real pool's. (A fork copies the parent's
            // table at its size: forked after 10,000 listeners, each worker
            // had 16,384 slots, which the kernel's task_file iterator walks
            // one by one, and neither close_range nor unshare(CLONE_FILES)
            // in a process that does not share its table shrinks it.)
            // With namespaces, the host's gets one listener, for the workers
            // (forked after the namespaces' children, which must not hold it).
            if scene.netns > 1 {
                for _ in 0..scene.netns {
                    fork_child(children, || listeners_in_new_netns(scene.listeners))?;
                }
            }
            let first = bind()?;
            fork_pool(
                children,
                PoolListeners::Kept(first.as_raw_fd()),
                scene.workers,
            )?;
            let host_listeners = if scene.netns == 1 { scene.listeners } else { 1 };
            let rest = (1..host_listeners).map(|_| bind());
            Ok(std::iter::once(Ok(first))
                .chain(rest)
                .collect::<Result<_, _>>()?)
        }
        Holding::All => {
            // The master opens them, as nginx's does: this process holds none.
            fork_pool(
                children,
                PoolListeners::Opened(scene.listeners),
                scene.workers,
            )?;
            Ok(Vec::new())
        }
        Holding::OnePerPool => {
            // Each master opens its own listener, forked while this process
            // holds few fds; this process opens the rest.
            for _ in 0..scene.workers {
                fork_pool(children, PoolListeners::Opened(1), 1)?;
            }
            (scene.workers..scene.listeners)
                .map(|_| bind())
                .collect::<Result<_, _>>()
                .map_err(Into::into)
        }
    }
}
