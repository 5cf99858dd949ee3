//! `observer explain`: watches every listener for a window (10 s by
//! default), then says for each one with traffic or a queue why its
//! connections wait, with the evidence and the fix (`verdict.rs`).
use std::{
    collections::HashMap,
    io::Write as _,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    aggregate::ListenerView,
    kernel::procfs,
    pipeline::{KernelOptions, Pipeline, Snapshot},
    quantile::{wait_quantile, waits_between},
    sockets::ListenerId,
    verdict::{self, Kind, Verdict, Window, WorkerWindow},
    views::rows::{ListenerFilter, listeners_by_id, pools_by_listener, worker_since},
    workers::PoolView,
};

#[derive(Clone, Debug, clap::Args)]
pub struct ExplainOptions {
    /// How long to watch, e.g. 10s, 1m, 500ms (a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = super::duration::window_seconds)]
    pub interval: f64,
    /// One JSON document: each listener with its verdict and the window it rests on.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: ListenerFilter,
    #[command(flatten)]
    pub kernel: KernelOptions,
}

/// Collections per second while watching.
const SAMPLES_PER_SECOND: f64 = 2.0;

/// One listener's verdict, as printed and as `--json` writes it.
#[derive(Debug, Serialize)]
pub struct Explained {
    pub listen: String,
    pub netns: u32,
    /// The name of its workers' (or holders') process, when it has any.
    pub comm: Option<String>,
    pub verdict: Verdict,
    pub window: Window,
}

/// What the samples between the first and last collection saw.
#[derive(Default)]
pub struct Seen {
    samples: u32,
    all_busy: u32,
    queued: u32,
}

pub fn run(opts: ExplainOptions) -> Result<()> {
    let mut pipeline = Pipeline::start_unbounded(&opts.kernel)?;
    let first = pipeline.collect()?;
    let started = Instant::now();
    let window = Duration::from_secs_f64(opts.interval);
    let every = Duration::from_secs_f64(1.0 / SAMPLES_PER_SECOND);
    let mut seen: HashMap<ListenerId, Seen> = HashMap::new();
    let last = loop {
        std::thread::sleep(every.min(window.saturating_sub(started.elapsed())));
        let snapshot = pipeline.collect()?;
        count_samples(&snapshot, &opts.filter, &mut seen);
        if started.elapsed() >= window {
            break snapshot;
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut explained = explain(&first, &last, seconds, &seen, &opts.filter);
    explained.sort_by_key(|e| (severity(e.verdict.kind), e.listen.clone(), e.netns));
    let mut out = std::io::stdout().lock();
    if opts.json {
        serde_json::to_writer_pretty(&mut out, &explained).context("writing JSON")?;
        writeln!(out)?;
    } else if explained.is_empty() {
        writeln!(
            out,
            "no listener had traffic or a queue in {seconds:.0} s (observer listeners shows them all)"
        )?;
    } else {
        let texts: Vec<String> = explained.iter().map(format_explained).collect();
        write!(out, "{}", texts.join("\n"))?;
    }
    Ok(())
}

fn severity(kind: Kind) -> u8 {
    match kind {
        Kind::NotAccepting => 0,
        Kind::Saturated => 1,
        Kind::Overflowing => 2,
        Kind::Uneven => 3,
        Kind::Healthy => 4,
    }
}

/// One listener: a header line with the verdict, the evidence, the fix.
pub fn format_explained(e: &Explained) -> String {
    let comm = e
        .comm
        .as_deref()
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    let mut text = format!(
        "{} (netns {}){comm}: {}\n",
        e.listen,
        e.netns,
        e.verdict.kind.name().to_uppercase()
    );
    for line in &e.verdict.evidence {
        text += &format!("  {line}\n");
    }
    text += &format!("  fix: {}\n", e.verdict.fix);
    text
}

/// Counts one more sample for each listener of `s`: whether connections
/// were queued, and whether every worker of its pool was busy.
pub fn count_samples(s: &Snapshot, filter: &ListenerFilter, seen: &mut HashMap<ListenerId, Seen>) {
    let pools = pools_by_listener(s);
    for v in s.listeners.listeners.iter().filter(|v| filter.keeps(&v.id)) {
        let entry = seen.entry(v.id).or_default();
        entry.samples += 1;
        if v.queue_len > 0 {
            entry.queued += 1;
        }
        let all_busy = pools.get(&v.id).is_some_and(|pool| {
            !pool.workers.is_empty() && pool.workers.iter().all(|w| w.busy == Some(true))
        });
        if all_busy {
            entry.all_busy += 1;
        }
    }
}

/// Verdicts for the listeners of `last` that had traffic or a queue.
pub fn explain(
    first: &Snapshot,
    last: &Snapshot,
    seconds: f64,
    seen: &HashMap<ListenerId, Seen>,
    filter: &ListenerFilter,
) -> Vec<Explained> {
    let before = listeners_by_id(first);
    let (pools_before, pools_after) = (pools_by_listener(first), pools_by_listener(last));
    let own_netns = procfs::own_netns();
    last.listeners
        .listeners
        .iter()
        .filter(|v| filter.keeps(&v.id))
        .filter_map(|v| {
            let prior = before.get(&v.id).copied();
            let pool = pools_after.get(&v.id).copied();
            let before = pools_before.get(&v.id).copied();
            let mut window = window_of(v, prior, pool, before, seen.get(&v.id), seconds);
            let active = window.accepts > 0
                || window.arrivals > 0
                || window.queue_len > 0
                || window.drops.unwrap_or(0) > 0;
            if !active {
                return None;
            }
            // What only the listeners explained need: /proc reads, and the
            // namespace's sysctl through a thread that enters it.
            window.somaxconn = somaxconn(v.id.netns, own_netns, pool);
            window.orphaned_socket = orphaned_socket(v, last);
            for worker in &mut window.workers {
                worker.state = procfs::process_state(worker.pid);
            }
            Some(Explained {
                listen: v.id.local_address(),
                netns: v.id.netns,
                comm: pool.and_then(|p| p.workers.first().map(|w| w.comm.to_string())),
                verdict: verdict::judge(&window),
                window,
            })
        })
        .collect()
}

/// The window from the two snapshots and the samples between them (no I/O:
/// process states, somaxconn and orphaned sockets are left unknown).
fn window_of(
    v: &ListenerView,
    prior: Option<&ListenerView>,
    pool: Option<&PoolView>,
    pool_before: Option<&PoolView>,
    seen: Option<&Seen>,
    seconds: f64,
) -> Window {
    let waits = prior
        .map(|p| waits_between(&p.accepts.waits, &v.accepts.waits))
        .unwrap_or(v.accepts.waits);
    let workers = pool
        .map(|pool| {
            pool.workers
                .iter()
                .map(|w| {
                    let (accepts, busy_seconds) = worker_since(w, pool_before);
                    WorkerWindow {
                        pid: w.pid,
                        comm: w.comm.to_string(),
                        accepts,
                        busy_seconds,
                        state: '?',
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let seen = seen.map_or((0, 0, 0), |s| (s.samples, s.all_busy, s.queued));
    Window {
        seconds,
        samples: seen.0,
        samples_all_busy: seen.1,
        samples_queued: seen.2,
        arrivals: v.queued - prior.map_or(0, |p| p.queued.min(v.queued)),
        accepts: v.accepts.accepted
            - prior.map_or(0, |p| p.accepts.accepted.min(v.accepts.accepted)),
        drops: v
            .drops_known()
            .then(|| v.drops - prior.map_or(0, |p| p.drops.min(v.drops))),
        queue_len: v.queue_len,
        queue_max: v.queue_max,
        oldest_first: prior.map_or(0.0, |p| p.oldest_wait.as_secs_f64()),
        oldest_last: v.oldest_wait.as_secs_f64(),
        wait_mean: (waits.count() > 0 && v.waits_known)
            .then(|| waits.sum_ns as f64 / 1e9 / waits.count() as f64),
        wait_p50: wait_quantile(&waits, 0.5).filter(|_| v.waits_known),
        wait_p99: wait_quantile(&waits, 0.99).filter(|_| v.waits_known),
        workers,
        dispatchers: pool.map_or(0, |p| p.dispatchers.len()),
        somaxconn: None,
        orphaned_socket: false,
        sockets: v.sockets.len(),
    }
}

/// A socket of the listener's reuseport group with connections queued and
/// no process holding it.
fn orphaned_socket(v: &ListenerView, s: &Snapshot) -> bool {
    v.sockets.len() > 1
        && v.sockets.iter().any(|socket| {
            socket.queue_len > 0
                && s.socket_holders
                    .get(&socket.inode)
                    .is_none_or(|holders| holders.is_empty())
        })
}

/// `net.core.somaxconn` of network namespace `netns`: read here for ours,
/// and for another from a thread that entered it through one of the
/// listener's processes (sysctls under /proc/sys/net are the opener's
/// namespace's): through any of its threads in that namespace, as a process
/// can hold a socket made by a thread that entered another one.
fn somaxconn(netns: u32, own: Option<u32>, pool: Option<&PoolView>) -> Option<u64> {
    if Some(netns) == own {
        return procfs::somaxconn();
    }
    let pid = pool?.workers.first()?.pid;
    let want = format!("net:[{netns}]");
    let ns_path = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .map(|task| task.path().join("ns/net"))
        .find(|path| std::fs::read_link(path).is_ok_and(|l| l.to_str() == Some(want.as_str())))?;
    let ns = std::fs::File::open(ns_path).ok()?;
    std::thread::spawn(move || {
        // SAFETY: setns on this short-lived thread only, with an fd we hold.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        procfs::somaxconn()
    })
    .join()
    .ok()
    .flatten()
}
