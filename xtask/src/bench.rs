//! `cargo xtask bench`: what observing costs the observed, measured side by
//! side in one run, with a peer (a bpftrace script doing the same counting).
//!
//! Method (see BENCHMARKS.md): conditions are interleaved round by round so
//! that machine noise hits each equally, and results are ratios to the
//! baseline of the same round, reported as median [min, max]. Everything is
//! bounded in time and targets loopback only.
use std::{
    collections::HashMap,
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::daemon::{
    ObserverDaemon, Running, cpu_ticks, free_port, median, rss_mib, spawn, wait_for_port,
};

#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// Rounds of each throughput comparison.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// A smoke run: 1 round of 1 s, small growth sizes.
    #[arg(long)]
    quick: bool,
    /// Only the growth table (start-up, scrape, exposition, memory as
    /// listeners, workers and network namespaces grow).
    #[arg(long)]
    growth_only: bool,
    /// The growth table's scenes instead of the full set, as
    /// NETNSxLISTENERSxWORKERS (listeners per namespace), comma-separated:
    /// --scenes 1x10000x1000,100x100x10
    #[arg(long, value_delimiter = ',', value_parser = crate::growth::Scene::parse)]
    scenes: Vec<crate::growth::Scene>,
}

/// What runs beside the server during a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Condition {
    Baseline,
    Observer,
    Bpftrace,
}

impl Condition {
    const ALL: [Condition; 3] = [
        Condition::Baseline,
        Condition::Observer,
        Condition::Bpftrace,
    ];

    /// Every condition, in round `round`'s order (it rotates each round).
    fn in_round(round: usize) -> impl Iterator<Item = Condition> {
        (0..Self::ALL.len()).map(move |i| Self::ALL[(i + round) % Self::ALL.len()])
    }

    fn name(self) -> &'static str {
        match self {
            Condition::Baseline => "baseline",
            Condition::Observer => "observer",
            Condition::Bpftrace => "bpftrace",
        }
    }
}

/// The peer: the same per-process/per-port accept count and queue-wait
/// histogram as observer's accept program, written for bpftrace.
const BPFTRACE_PEER: &str = r#"
tracepoint:syscalls:sys_exit_accept4 /args->ret >= 0/ {
  $file = (struct file *)*(uint64 *)((uint64)curtask->files->fdt->fd + args->ret * 8);
  $sock = (struct socket *)$file->private_data;
  $tp = (struct tcp_sock *)$sock->sk;
  @accepts[pid, $tp->inet_conn.icsk_inet.sk.__sk_common.skc_num] = count();
  @wait_us = hist((nsecs / 1000) - $tp->rcvq_space.time);
}
"#;

/// Whatever a condition keeps running while it is measured (held only so
/// that dropping it stops it).
#[allow(dead_code)]
enum Beside {
    Nothing,
    Observer(ObserverDaemon),
    Bpftrace(Running),
}

fn start_condition(c: Condition, bin: &Path, script: &Path) -> Result<Beside> {
    start_scraped_every(c, bin, script, Duration::from_secs(1))
}

/// [`start_condition`], with the daemon scraped every `scrape_every`.
fn start_scraped_every(
    c: Condition,
    bin: &Path,
    script: &Path,
    scrape_every: Duration,
) -> Result<Beside> {
    Ok(match c {
        Condition::Baseline => Beside::Nothing,
        Condition::Observer => {
            let daemon = ObserverDaemon::start_scraped_every(bin, Some(scrape_every))?;
            daemon.wait_until_healthy()?;
            Beside::Observer(daemon)
        }
        Condition::Bpftrace => {
            // A program id not loaded before (counting them would race the
            // last condition's daemon, whose programs the kernel may still
            // be freeing).
            let before = prog_stats()?;
            let child = spawn(Command::new("bpftrace").arg(script), "bpftrace")?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while prog_stats()?.keys().all(|id| before.contains_key(id)) {
                if Instant::now() > deadline {
                    bail!("bpftrace did not load its program");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Beside::Bpftrace(child)
        }
    })
}

/// (name, run_time_ns, run_cnt) per loaded program id, from bpftool.
fn prog_stats() -> Result<HashMap<u64, (String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .context("bpftool prog show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stats = HashMap::new();
    for line in text
        .lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
    {
        let field = |key: &str| -> Option<&str> {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key).and_then(|_| words.next())
        };
        let Some(id) = line.split(':').next().and_then(|i| i.parse().ok()) else {
            continue;
        };
        let name = field("name").unwrap_or("?").to_owned();
        let ns = field("run_time_ns")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cnt = field("run_cnt").and_then(|v| v.parse().ok()).unwrap_or(0);
        stats.insert(id, (name, ns, cnt));
    }
    Ok(stats)
}

/// wrk with a new connection per request; returns requests/s.
fn wrk(port: u16, seconds: u64) -> Result<f64> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{seconds}s"),
            "-H",
            "Connection: close",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3} [{:.3}, {:.3}]", median(v.to_vec()), min, max)
}

struct Servers {
    _nginx: Running,
    nginx_port: u16,
    _gunicorn: Running,
    gunicorn_port: u16,
    dir: PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_servers() -> Result<Servers> {
    let dir = std::env::temp_dir().join(format!("observer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (nginx_port, gunicorn_port) = (free_port()?, free_port()?);
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\nhttp {{ access_log off; client_body_temp_path {d}/b; \
             proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
             server {{ listen 127.0.0.1:{nginx_port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        ),
    )?;
    std::fs::write(
        dir.join("app.py"),
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
    )?;
    let nginx = spawn(
        Command::new("nginx").args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")]),
        "nginx",
    )?;
    let gunicorn = spawn(
        Command::new("gunicorn")
            .args([
                "-w",
                "2",
                "-b",
                &format!("127.0.0.1:{gunicorn_port}"),
                "app:app",
            ])
            .current_dir(&dir),
        "gunicorn",
    )?;
    wait_for_port(nginx_port, "nginx")?;
    wait_for_port(gunicorn_port, "gunicorn")?;
    Ok(Servers {
        _nginx: nginx,
        nginx_port,
        _gunicorn: gunicorn,
        gunicorn_port,
        dir,
    })
}

/// Interleaved throughput rounds against one server; returns per-condition
/// ratios to the same round's baseline, and program costs (ns/event).
fn throughput(
    port: u16,
    rounds: usize,
    seconds: u64,
    bin: &Path,
    script: &Path,
    report: &mut String,
    server: &str,
) -> Result<HashMap<String, (u64, u64)>> {
    let mut rates: HashMap<Condition, Vec<f64>> = HashMap::new();
    let mut ratios: HashMap<Condition, Vec<f64>> = HashMap::new();
    let mut costs: HashMap<String, (u64, u64)> = HashMap::new();
    for round in 0..rounds {
        let mut this_round = HashMap::new();
        for c in Condition::in_round(round) {
            let loaded_before = prog_stats()?;
            let beside = start_condition(c, bin, script)?;
            let before = prog_stats()?;
            let rate = wrk(port, seconds)?;
            let after = prog_stats()?;
            // The condition's programs: those it loaded.
            for (id, (name, ns, cnt)) in after
                .iter()
                .filter(|(id, _)| !loaded_before.contains_key(id))
            {
                let (ns0, cnt0) = before.get(id).map(|(_, n, c)| (*n, *c)).unwrap_or((0, 0));
                let e = costs.entry(format!("{} {name}", c.name())).or_default();
                e.0 += ns - ns0;
                e.1 += cnt - cnt0;
            }
            drop(beside);
            this_round.insert(c, rate);
            rates.entry(c).or_default().push(rate);
        }
        against_baseline(&this_round, &mut ratios, |c, base| c / base);
    }
    report.push_str(&format!(
        "| {server} | {:.0} | {} | {} |\n",
        median(rates[&Condition::Baseline].clone()),
        spread(&ratios[&Condition::Observer]),
        spread(&ratios[&Condition::Bpftrace]),
    ));
    Ok(costs)
}

/// Each condition beside the baseline, held against the same round's
/// baseline by `compare` (a ratio, a difference), appended to `into`.
fn against_baseline(
    this_round: &HashMap<Condition, f64>,
    into: &mut HashMap<Condition, Vec<f64>>,
    compare: impl Fn(f64, f64) -> f64,
) {
    for c in [Condition::Observer, Condition::Bpftrace] {
        into.entry(c)
            .or_default()
            .push(compare(this_round[&c], this_round[&Condition::Baseline]));
    }
}

/// Nanoseconds per call of `f`, over `n` calls.
fn ns_per_call(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Syscalls of a process the observer does not track: what every other
/// process on the host pays.
fn untracked_syscalls(rounds: usize, bin: &Path, script: &Path, report: &mut String) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let fd = listener.as_raw_fd();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: creates an epoll instance this function owns (closed with the process).
    let epfd = unsafe { libc::epoll_create1(0) };
    type Call<'a> = (&'a str, Box<dyn Fn()>);
    let calls: [Call; 4] = [
        // SAFETY (all four): plain syscalls on our own, valid arguments.
        (
            "getppid() (no hook of ours)",
            Box::new(|| unsafe {
                libc::getppid();
            }),
        ),
        (
            "ppoll(none, timeout 0)",
            Box::new(move || unsafe {
                libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null());
            }),
        ),
        (
            "epoll_wait(empty set, timeout 0)",
            Box::new(move || unsafe {
                let mut event = libc::epoll_event { events: 0, u64: 0 };
                libc::epoll_wait(epfd, &mut event, 1, 0);
            }),
        ),
        (
            "accept4() → EAGAIN",
            Box::new(move || unsafe {
                libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            }),
        ),
    ];
    let mut ns: HashMap<(usize, Condition), Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for c in Condition::in_round(round) {
            let beside = start_condition(c, bin, script)?;
            // The daemon's thread sampler runs meanwhile, as it would.
            std::thread::sleep(Duration::from_millis(200));
            for (k, (_, call)) in calls.iter().enumerate() {
                ns.entry((k, c))
                    .or_default()
                    .push(ns_per_call(300_000, call));
            }
            drop(beside);
        }
    }
    report.push_str(&format!("\n| syscall of an untracked process ({rounds} rounds, median ns) | baseline ns | with observer ns | observer extra ns | with bpftrace ns |\n|---|---|---|---|---|\n"));
    for (k, (name, _)) in calls.iter().enumerate() {
        let m = |c| median(ns[&(k, c)].clone());
        report.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:+.0} | {:.0} |\n",
            m(Condition::Baseline),
            m(Condition::Observer),
            m(Condition::Observer) - m(Condition::Baseline),
            m(Condition::Bpftrace)
        ));
    }
    Ok(())
}

/// Connections a second in the CPU-per-connection figure: about a third
/// of what nginx serves here with 2 workers, so that no condition is short
/// of CPU.
const PACED_RATE: u32 = 2_000;

/// CPU time per connection at a fixed rate ([`crate::paced`]): the CPU all
/// tasks on the host used while [`PACED_RATE`] connections a second were
/// served, per connection served, for each condition in interleaved
/// rounds; the median and its 95% interval, and each condition's extra
/// over the same round's baseline. The daemon is scraped every 15 s, as
/// Prometheus does by default.
fn cpu_per_connection(
    port: u16,
    rounds: usize,
    seconds: u64,
    bin: &Path,
    script: &Path,
    report: &mut String,
) -> Result<()> {
    let mut per_conn: HashMap<Condition, Vec<f64>> = HashMap::new();
    let mut extra: HashMap<Condition, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        let mut this_round = HashMap::new();
        for c in Condition::in_round(round) {
            let beside = start_scraped_every(c, bin, script, Duration::from_secs(15))?;
            // Past the daemon's start-up and first scrape.
            std::thread::sleep(Duration::from_millis(500));
            let cpu_before = crate::paced::host_cpu_ns()?;
            let served = crate::paced::load(port, PACED_RATE, seconds)?;
            let cpu_ns = crate::paced::host_cpu_ns()? - cpu_before;
            drop(beside);
            if served == 0 {
                bail!("no connection was served at {PACED_RATE}/s ({})", c.name());
            }
            let ns = cpu_ns as f64 / served as f64;
            this_round.insert(c, ns);
            per_conn.entry(c).or_default().push(ns);
        }
        against_baseline(&this_round, &mut extra, |c, base| c - base);
    }
    report.push_str(&format!(
        "\n| nginx at {PACED_RATE} connections/s ({rounds} rounds × {seconds} s, interleaved) | host CPU µs per connection: median [95% interval] | interval half-width, % of the baseline's median | extra over the same round's baseline, µs: median [95% interval] |\n|---|---|---|---|\n"
    ));
    let (base, _, _) = crate::paced::median_interval(&per_conn[&Condition::Baseline])?;
    for c in Condition::ALL {
        let (m, low, high) = crate::paced::median_interval(&per_conn[&c])?;
        let extra_cell = match extra.get(&c) {
            Some(e) => {
                let (m, low, high) = crate::paced::median_interval(e)?;
                format!("{:+.2} [{:+.2}, {:+.2}]", m / 1e3, low / 1e3, high / 1e3)
            }
            None => "—".into(),
        };
        report.push_str(&format!(
            "| {} | {:.2} [{:.2}, {:.2}] | {:.2} | {extra_cell} |\n",
            c.name(),
            m / 1e3,
            low / 1e3,
            high / 1e3,
            (high - low) / 2.0 / base * 100.0,
        ));
    }
    Ok(())
}

/// The daemon's own CPU and memory at fixed accept rates (hey, rate-limited).
fn daemon_cost(port: u16, seconds: u64, bin: &Path, report: &mut String) -> Result<()> {
    report.push_str("\n| target accepts/s | achieved req/s | daemon CPU % of a core (1 s scrapes) | daemon RSS MiB |\n|---|---|---|---|\n");
    let ticks_per_s = 100.0; // USER_HZ
    for (clients, per_client) in [(10, 100), (50, 200)] {
        let daemon = ObserverDaemon::start(bin)?;
        let (t0, w0) = (cpu_ticks(daemon.pid()), Instant::now());
        let out = Command::new("hey")
            .args([
                "-z",
                &format!("{seconds}s"),
                "-c",
                &clients.to_string(),
                "-q",
                &per_client.to_string(),
                "-disable-keepalive",
            ])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .context("running hey")?;
        let cpu = (cpu_ticks(daemon.pid()) - t0) as f64 / ticks_per_s / w0.elapsed().as_secs_f64()
            * 100.0;
        let achieved = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Requests/sec:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into());
        report.push_str(&format!(
            "| {} | {achieved} | {cpu:.2} | {:.1} |\n",
            clients * per_client,
            rss_mib(daemon.pid())
        ));
    }
    Ok(())
}

pub fn run(opts: &BenchOptions, bin: &Path) -> Result<()> {
    let (rounds, seconds) = if opts.quick {
        (1, 1)
    } else {
        (opts.rounds, opts.seconds)
    };
    let mut report = String::new();
    if !opts.growth_only {
        let stats_before =
            std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
            .context("enabling kernel.bpf_stats_enabled (run as root)")?;
        let measured = costs(rounds, seconds, opts.quick, bin, &mut report);
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
        measured?;
    }
    println!("bench: growth…");
    let shown = report.len();
    let window = Duration::from_secs(if opts.quick { 2 } else { 15 });
    let scenes = match &opts.scenes[..] {
        [] => crate::growth::scenes(opts.quick),
        chosen => chosen.to_vec(),
    };
    crate::growth::run(&scenes, window, bin, &mut report)?;
    print!("{}", &report[shown..]);
    std::fs::write("target/bench-report.md", &report).context("writing target/bench-report.md")?;
    println!("(also written to target/bench-report.md)");
    Ok(())
}

/// What observing costs the observed: served throughput beside the peer,
/// per-event program costs, untracked processes' syscalls, and the daemon's
/// own CPU and memory under load.
fn costs(rounds: usize, seconds: u64, quick: bool, bin: &Path, report: &mut String) -> Result<()> {
    let script = std::env::temp_dir().join("observer-bench-peer.bt");
    std::fs::write(&script, BPFTRACE_PEER)?;
    let servers = start_servers()?;
    report.push_str(&format!(
        "## Served throughput (wrk, new connection per request, {rounds} rounds × {seconds} s per condition)\n\n\
         | server | baseline req/s (median) | with observer ÷ baseline | with bpftrace peer ÷ baseline |\n|---|---|---|---|\n"
    ));
    let mut shown = 0;
    let mut show = |report: &str| {
        print!("{}", &report[shown..]);
        shown = report.len();
    };
    println!("bench: throughput against nginx…");
    let mut costs = throughput(
        servers.nginx_port,
        rounds,
        seconds,
        bin,
        &script,
        report,
        "nginx (2 workers)",
    )?;
    println!("bench: throughput against gunicorn…");
    costs.extend(throughput(
        servers.gunicorn_port,
        rounds,
        seconds,
        bin,
        &script,
        report,
        "gunicorn (2 sync workers)",
    )?);
    report.push_str(
        "\n| program (kernel.bpf_stats_enabled) | events | ns per event |\n|---|---|---|\n",
    );
    let mut names: Vec<_> = costs.iter().filter(|(_, (_, cnt))| *cnt > 0).collect();
    names.sort_by_key(|(name, _)| name.to_string());
    for (name, (ns, cnt)) in names {
        report.push_str(&format!(
            "| {name} | {cnt} | {:.0} |\n",
            *ns as f64 / *cnt as f64
        ));
    }
    show(report);
    println!("bench: CPU per connection at a fixed rate…");
    cpu_per_connection(
        servers.nginx_port,
        if quick { 6 } else { rounds.max(12) },
        seconds,
        bin,
        &script,
        report,
    )?;
    show(report);
    println!("bench: syscalls of untracked processes…");
    untracked_syscalls(if quick { 1 } else { 5 }, bin, &script, report)?;
    show(report);
    println!("bench: daemon CPU and memory…");
    daemon_cost(servers.nginx_port, seconds.max(2), bin, report)?;
    show(report);
    Ok(())
}
