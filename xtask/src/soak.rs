//! `cargo xtask soak`: worker churn against a live daemon for minutes
//! (default 10): processes that accept one connection and exit, PIDs reused,
//! a scrape every second. Samples the daemon's RSS; passes when memory stays
//! flat and the accepted count is exact.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::daemon::rss_kib;

fn scrape(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// One short-lived process accepts one connection and exits.
fn churn_once(listener: &TcpListener, port: u16) -> Result<()> {
    // SAFETY: the child only calls accept, close and _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: async-signal-safe calls in the forked child.
        unsafe {
            let fd = libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            if fd >= 0 {
                libc::close(fd);
            }
            libc::_exit(0);
        }
    }
    if child < 0 {
        bail!("fork failed");
    }
    let client = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
    drop(client);
    Ok(())
}

pub fn run(minutes: f64, bin: &Path) -> Result<()> {
    let metrics_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut daemon = Command::new(bin)
        .args([
            "serve",
            "--web.listen-address",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting observer")?;
    let pid = daemon.id();
    let started = Instant::now();
    while scrape(metrics_port).is_empty() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("observer did not serve");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (deadline, mut connections, mut samples) = (
        Instant::now() + Duration::from_secs_f64(minutes * 60.0),
        0u64,
        Vec::new(),
    );
    let (mut next_scrape, mut next_sample) = (Instant::now(), Instant::now());
    println!("soak: {minutes} min of worker churn against observer (pid {pid})");
    while Instant::now() < deadline {
        churn_once(&listener, port)?;
        connections += 1;
        if Instant::now() >= next_scrape {
            scrape(metrics_port);
            next_scrape += Duration::from_secs(1);
        }
        if Instant::now() >= next_sample {
            let kib = rss_kib(pid);
            println!(
                "soak: {:>5.0} s  {connections:>8} short-lived acceptors  RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                kib as f64 / 1024.0
            );
            samples.push(kib);
            next_sample += Duration::from_secs(10);
        }
    }
    let text = scrape(metrics_port);
    let accepted: f64 = text
        .lines()
        .find(|l| {
            l.starts_with("observer_connections_accepted_total{")
                && l.contains(&format!("port=\"{port}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0);
    let _ = daemon.kill();
    let _ = daemon.wait();
    // Flat: the last third of the run holds no sample above the first third's
    // peak by more than 10% + 2 MiB.
    let third = (samples.len() / 3).max(1);
    let early_peak = samples.iter().take(third).max().copied().unwrap_or(0);
    let late_peak = samples.iter().rev().take(third).max().copied().unwrap_or(0);
    println!(
        "soak: {connections} acceptors; observer counted {accepted}; RSS early peak {:.1} MiB, late peak {:.1} MiB",
        early_peak as f64 / 1024.0,
        late_peak as f64 / 1024.0
    );
    if accepted != connections as f64 {
        bail!("accepted count {accepted} differs from the {connections} connections made");
    }
    if late_peak > early_peak + early_peak / 10 + 2048 {
        bail!("daemon memory grew during the soak");
    }
    println!("soak: passed");
    Ok(())
}
