//! `observer trace`: one line per accepted connection as it happens: when,
//! which listener, which peer, which process took it, and how long it waited
//! in the accept queue. Events come through a BPF ring buffer; any the kernel
//! could not hand over are counted and reported, never silently dropped.
use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use observer_common::{AF_UNIX, AcceptEvent, Health, UnixListenKey};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    kernel::{probes::Probes, procfs},
    pipeline::{KernelOptions, load_probes},
    quantile::human_seconds,
    sockets::{ListenSocket, ListenerId, unix_key},
};

#[derive(Clone, Debug, clap::Args)]
pub struct TraceOptions {
    /// Only connections to this local (listening) TCP port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only connections to the Unix-domain listener on this path (as `ss
    /// -lx` prints it). Unix connections have no wait: the kernel keeps no
    /// time of when they were queued.
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,
    /// Only connections accepted by this process id.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only connections accepted by processes with this name (as in /proc/PID/comm).
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only connections in this network namespace (inode).
    #[arg(long, value_name = "INODE")]
    pub netns: Option<u32>,
    /// Only connections that waited at least this long in the queue, e.g. 10ms, 1.5s, 200us.
    #[arg(long = "min-wait", value_name = "DURATION", value_parser = super::duration::parse_duration)]
    pub min_wait: Option<Duration>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many connections.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long, e.g. 30s, 5m (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = super::duration::window_seconds)]
    pub duration: Option<f64>,
    #[command(flatten)]
    pub kernel: KernelOptions,
}

/// One traced connection, as printed.
#[derive(Debug, Serialize)]
struct Line {
    time: String,
    netns: u32,
    listen: String,
    peer: String,
    pid: u32,
    tid: u32,
    comm: String,
    wait_seconds: Option<f64>,
}

/// The paths of Unix listeners by the key their connections carry, read
/// from the kernel again when an unknown key shows up (at most once a
/// second).
struct UnixPaths {
    paths: HashMap<(u32, UnixListenKey), String>,
    read_at: Option<Instant>,
}

impl UnixPaths {
    fn path(&mut self, probes: &Probes, netns: u32, key: UnixListenKey) -> String {
        if !self.paths.contains_key(&(netns, key))
            && self
                .read_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.read_at = Some(Instant::now());
            if let Ok(walk) = probes.holders() {
                self.paths = walk
                    .holdings
                    .iter()
                    .filter_map(ListenSocket::from_holding)
                    .filter_map(|s| Some(((s.id.netns, s.unix_key?), s.id.path.display())))
                    .collect();
            }
        }
        self.paths
            .get(&(netns, key))
            .cloned()
            .unwrap_or_else(|| "(closed unix listener)".into())
    }
}

/// Wall-clock time of a monotonic kernel timestamp, as UTC "HH:MM:SS.micros".
fn wall_time(event_ns: u64, mono_now_ns: u64, wall_now: Duration) -> String {
    let wall = wall_now.saturating_sub(Duration::from_nanos(mono_now_ns.saturating_sub(event_ns)));
    let secs = wall.as_secs();
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        wall.subsec_micros()
    )
}

impl TraceOptions {
    fn keeps(&self, e: &AcceptEvent, l: &Line) -> bool {
        let wait_ok = match self.min_wait {
            Some(min) => e.wait_ns != u64::MAX && Duration::from_nanos(e.wait_ns) >= min,
            None => true,
        };
        let unix = e.family == AF_UNIX;
        wait_ok
            && self.port.is_none_or(|p| !unix && p == e.port)
            && self.path.as_deref().is_none_or(|p| unix && p == l.listen)
            && self.pid.is_none_or(|p| p == e.tgid)
            && self.netns.is_none_or(|n| n == e.netns)
            && self.comm.as_deref().is_none_or(|c| c == l.comm)
    }
}

fn line(e: &AcceptEvent, unix_paths: &mut UnixPaths, probes: &Probes) -> Line {
    let end = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
    let wall_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (listen, peer) = if e.family == AF_UNIX {
        (
            unix_paths.path(probes, e.netns, unix_key(&e.addr)),
            "-".into(),
        )
    } else {
        (
            ListenerId::tcp(e.netns, e.family, e.addr, e.port).local_address(),
            ListenerId::tcp(e.netns, e.family, e.peer_addr, e.peer_port).local_address(),
        )
    };
    Line {
        time: wall_time(e.time_ns, procfs::monotonic_ns(), wall_now),
        netns: e.netns,
        listen,
        peer,
        pid: e.tgid,
        tid: e.tid,
        comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
        wait_seconds: (e.wait_ns != u64::MAX && (e.family != AF_UNIX || probes.unix_waits_timed))
            .then(|| e.wait_ns as f64 / 1e9),
    }
}

fn print(out: &mut impl std::io::Write, l: &Line, json: bool) -> Result<()> {
    if json {
        serde_json::to_writer(&mut *out, l)?;
        writeln!(out)?;
    } else {
        let wait = l
            .wait_seconds
            .map(human_seconds)
            .unwrap_or_else(|| "?".into());
        writeln!(
            out,
            "{:<15}  {:>7}  {:<15}  {:<22}  {:<22}  {:>9}",
            l.time, l.pid, l.comm, l.listen, l.peer, wait
        )?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(opts: TraceOptions) -> Result<()> {
    let mut probes = load_probes(&opts.kernel, true)?;
    let ring = probes.take_events()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("async runtime")?;
    let shown = runtime.block_on(stream(&opts, ring, &probes))?;
    let lost = probes
        .health()
        .map(|h| h[Health::TraceEventLost as usize])
        .unwrap_or(0);
    if lost > 0 {
        eprintln!(
            "observer: {lost} accepted connections were not traced (ring buffer full); {shown} shown"
        );
    }
    Ok(())
}

async fn stream(
    opts: &TraceOptions,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    probes: &Probes,
) -> Result<u64> {
    let mut unix_paths = UnixPaths {
        paths: HashMap::new(),
        read_at: None,
    };
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut out = std::io::stdout().lock();
    eprintln!("observer: tracing accepted connections; Ctrl-C stops");
    if !opts.json {
        writeln!(
            out,
            "{:<15}  {:>7}  {:<15}  {:<22}  {:<22}  {:>9}",
            "TIME(UTC)", "PID", "COMM", "LISTEN", "PEER", "WAITED"
        )?;
    }
    let deadline = tokio::time::sleep(Duration::from_secs_f64(opts.duration.unwrap_or(1e9)));
    tokio::pin!(deadline);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut shown = 0u64;
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = ready.context("waiting for events")?;
                while let Some(item) = guard.get_inner_mut().next() {
                    if item.len() < std::mem::size_of::<AcceptEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote an AcceptEvent (Pod) here; read_unaligned copes with alignment.
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<AcceptEvent>()) };
                    let l = line(&event, &mut unix_paths, probes);
                    if opts.keeps(&event, &l) {
                        print(&mut out, &l, opts.json)?;
                        shown += 1;
                        if opts.count.is_some_and(|n| shown >= n) {
                            return Ok(shown);
                        }
                    }
                }
                guard.clear_ready();
            }
            _ = &mut deadline => return Ok(shown),
            _ = tokio::signal::ctrl_c() => return Ok(shown),
            _ = terminate.recv() => return Ok(shown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_timestamps_become_wall_clock() {
        // An event 1.5 s before "now" (now = 01:00:02.000000 UTC).
        assert_eq!(
            wall_time(500_000_000, 2_000_000_000, Duration::from_secs(3602)),
            "01:00:00.500000"
        );
    }
}
