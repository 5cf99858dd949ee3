//! What the benches share: the observer daemon under measurement (started,
//! scraped, stopped), child processes stopped on drop, and the figures read
//! from /proc and from the daemon's own metrics.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A child process stopped (SIGTERM, then SIGKILL) on drop.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(cmd: &mut Command, what: &str) -> Result<Running> {
    Ok(Running(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?,
    ))
}

pub(crate) fn http_get(port: u16, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    Some(body)
}

/// observer serve, scraped every second like a (demanding) Prometheus.
pub(crate) struct ObserverDaemon {
    process: Running,
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
    scraper: Option<std::thread::JoinHandle<()>>,
}

impl ObserverDaemon {
    /// A daemon scraped every second (a demanding Prometheus).
    pub(crate) fn start(bin: &Path) -> Result<ObserverDaemon> {
        Self::start_scraped_every(bin, Some(Duration::from_secs(1)))
    }

    /// A daemon scraped every `every` in the background, or only when the
    /// bench asks (`None`).
    pub(crate) fn start_scraped_every(
        bin: &Path,
        every: Option<Duration>,
    ) -> Result<ObserverDaemon> {
        Self::start_with(bin, every, &[])
    }

    /// [`ObserverDaemon::start_scraped_every`], with more `serve` flags.
    pub(crate) fn start_with(
        bin: &Path,
        every: Option<Duration>,
        flags: &[&str],
    ) -> Result<ObserverDaemon> {
        let port = free_port()?;
        let process = spawn(
            Command::new(bin)
                .args([
                    "serve",
                    "--web.listen-address",
                    &format!("127.0.0.1:{port}"),
                ])
                .args(flags),
            "observer",
        )?;
        wait_for_port(port, "observer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let scraper = every.map(|every| {
            std::thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let _ = http_get(port, "/metrics");
                    std::thread::sleep(every);
                }
            })
        });
        Ok(ObserverDaemon {
            process,
            port,
            stop,
            scraper,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Waits until /healthz says ok: the programs are loaded and the
    /// baseline collection is done (the port answers before).
    pub(crate) fn wait_until_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ok = |reply: Vec<u8>| reply.starts_with(b"HTTP/1.") && reply.ends_with(b"\r\n\r\nok\n");
        while !http_get(self.port, "/healthz").is_some_and(ok) {
            if Instant::now() > deadline {
                bail!("observer did not say ok on /healthz within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ObserverDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.scraper.take() {
            let _ = s.join();
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Resident memory of a process (VmRSS), KiB; 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

pub(crate) fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid) as f64 / 1024.0
}

/// The process's peak RSS so far (VmHWM), MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") as f64 / 1024.0
}

/// The sampler's counters, from one scrape of the daemon.
#[derive(Clone, Copy, Default)]
struct SamplerTotals {
    passes: f64,
    seconds: f64,
    threads: f64,
    host_walks: f64,
    interval: f64,
}

fn sampler_totals(daemon: &ObserverDaemon) -> SamplerTotals {
    let text = http_get(daemon.port, "/metrics").unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    SamplerTotals {
        passes: value("observer_worker_sample_passes_total"),
        seconds: value("observer_worker_sample_seconds_total"),
        threads: value("observer_worker_sample_threads_total"),
        host_walks: value("observer_worker_sample_host_walks_total"),
        interval: value("observer_worker_sample_interval_seconds"),
    }
}

/// The daemon's CPU and its thread sampler's cost over a window.
pub(crate) struct SamplerCost {
    /// The daemon's CPU, % of a core.
    pub(crate) cpu: f64,
    /// The interval between passes in effect, s.
    pub(crate) interval: f64,
    pub(crate) pass_us: f64,
    /// Watched threads read per pass.
    pub(crate) watched_threads: f64,
    /// Share of passes that walked every thread on the host.
    pub(crate) host_walk_share: f64,
}

/// The daemon's CPU over `window` with one scrape at its start (a
/// Prometheus scraping every `window`): the sampler's passes plus that
/// scrape. Then the sampler's interval in effect, its time per pass, the
/// watched threads a pass read and how often it walked the host.
pub(crate) fn sampler_cost(daemon: &ObserverDaemon, window: Duration) -> Result<SamplerCost> {
    let (t0, w0) = (cpu_ticks(daemon.pid()), Instant::now());
    let before = sampler_totals(daemon);
    std::thread::sleep(window.saturating_sub(w0.elapsed()));
    let cpu = (cpu_ticks(daemon.pid()) - t0) as f64 / 100.0 / w0.elapsed().as_secs_f64() * 100.0;
    let after = sampler_totals(daemon);
    let passes = after.passes - before.passes;
    if passes < 1.0 {
        bail!("the daemon's thread sampler did not run");
    }
    Ok(SamplerCost {
        cpu,
        interval: after.interval,
        pass_us: (after.seconds - before.seconds) / passes * 1e6,
        watched_threads: (after.threads - before.threads) / passes,
        host_walk_share: (after.host_walks - before.host_walks) / passes,
    })
}
