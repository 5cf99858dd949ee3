//! Wires the stages: kernel (probes) → aggregation (listeners, worker pools)
//! → a [`Snapshot`].
//! Shared by `serve` and the one-shot CLI commands.
use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};

use std::collections::HashMap;

use observer_common::{
    HolderRecord, ListenerRecord, REGISTERED_BY_DAEMON, TCP_LISTEN, WorkerFds, WorkerThread,
    listen_port_key,
};

use crate::{
    aggregate::{Aggregator, Collection, ListenerId},
    containers::{ContainerCache, ContainerInfo},
    kernel::{
        host, offsets,
        probes::{self, AcceptSource, Probes},
        procfs,
    },
    metrics::DaemonHealth,
    workers::{self, Membership, Pools},
};

/// Everything one collection produced.
pub struct Snapshot {
    pub listeners: Collection,
    pub pools: Pools,
    /// Container facts of listeners whose processes run in a container.
    pub containers: HashMap<ListenerId, ContainerInfo>,
}

/// How to reach the kernel: where its BTF is and which accept source to use.
#[derive(Clone, Debug, clap::Args)]
pub struct KernelOptions {
    /// Kernel BTF to resolve struct offsets from (a BTFHub file on kernels
    /// that do not ship /sys/kernel/btf/vmlinux).
    #[arg(
        long = "kernel.btf",
        value_name = "PATH",
        default_value = "/sys/kernel/btf/vmlinux"
    )]
    pub btf: PathBuf,
    /// Where accepted connections are observed: auto picks the best that
    /// this kernel allows (fexit, then kprobe, then tracepoint).
    #[arg(
        long = "accept-source",
        env = "OBSERVER_ACCEPT_SOURCE",
        value_enum,
        default_value = "auto"
    )]
    pub accept_source: AcceptSource,
}

pub struct Pipeline {
    probes: Probes,
    aggregator: Aggregator,
    max_workers: usize,
    /// Epoll fds watching a listener, per worker process (found once).
    epolls: HashMap<u32, Vec<i32>>,
    containers: ContainerCache,
    pub health: DaemonHealth,
}

impl Pipeline {
    /// Checks the host, loads and attaches the programs, and takes the
    /// baseline collection (queue depths at start).
    pub fn start(kernel: &KernelOptions, max_listeners: usize, max_workers: usize) -> Result<Self> {
        let probes = load_probes(kernel, false)?;
        log::info!("accept source: {}", probes.accept_source.name());
        for e in &probes.attach_errors {
            log::warn!("{}: {}", e.program, e.message);
        }
        let health = DaemonHealth {
            accept_source: probes.accept_source.name().to_owned(),
            lockdown: host::lockdown_mode().unwrap_or_else(|| "unknown".into()),
            program_errors: probes
                .attach_errors
                .iter()
                .map(|e| (e.program.to_owned(), e.message.clone()))
                .collect(),
            ..Default::default()
        };
        let mut pipeline = Pipeline {
            probes,
            aggregator: Aggregator::new(max_listeners),
            max_workers,
            epolls: Default::default(),
            containers: Default::default(),
            health,
        };
        pipeline.collect().context("first collection")?;
        Ok(pipeline)
    }

    /// Reads the kernel and aggregates; deletes map keys the aggregator folded in.
    pub fn collect(&mut self) -> Result<Snapshot> {
        let started = Instant::now();
        let result = self.collect_inner();
        self.health.last_collect_seconds = started.elapsed().as_secs_f64();
        if result.is_err() {
            self.health.collect_errors += 1;
        }
        result
    }

    fn collect_inner(&mut self) -> Result<Snapshot> {
        let (listeners, holders) = self.collect_listeners()?;
        let membership = Membership::from_holders(&listeners.listeners, &holders);
        let pools = self.collect_pools(&listeners, &membership)?;
        self.health.kernel_events_lost = self
            .probes
            .health()?
            .iter()
            .enumerate()
            .map(|(slot, n)| (probes::health_name(slot), *n))
            .chain([(
                "accept_program_skipped",
                self.probes.accept_program_misses(),
            )])
            .collect();
        self.containers.retain(procfs::process_is_alive);
        let containers = listeners
            .listeners
            .iter()
            .filter_map(|v| Some((v.id, self.containers.lookup(membership.a_holder(&v.id)?)?)))
            .collect();
        Ok(Snapshot {
            listeners,
            pools,
            containers,
        })
    }

    /// Listeners of every namespace with their accept counts, and the
    /// socket holders they were found through.
    fn collect_listeners(&mut self) -> Result<(Collection, Vec<HolderRecord>)> {
        let holders = self.probes.holders()?;
        let listener_records = all_listeners(self.probes.listeners()?, &holders);
        let ports = listener_records
            .iter()
            .map(|l| listen_port_key(l.netns, l.port))
            .collect();
        self.probes.set_listen_ports(&ports)?;
        // Accepted connections of listeners first seen just now are reported
        // only once their ports are in LISTEN_PORTS: read the holders again.
        let holders = if self.probes.listen_ports_changed() {
            self.probes.holders()?
        } else {
            holders
        };
        let accepts = self.probes.accepts()?;
        let listeners =
            self.aggregator
                .collect(&listener_records, &accepts, procfs::process_is_alive);
        self.probes.forget_accepts(&listeners.forget)?;
        Ok((listeners, holders))
    }

    /// Worker pools: tracks new workers, forgets gone ones, reconciles
    /// threads whose state the kernel side could not see change.
    fn collect_pools(&mut self, listeners: &Collection, membership: &Membership) -> Result<Pools> {
        let worker_fds = self.refresh_worker_fds(membership)?;
        let mut threads = self.probes.worker_threads()?;
        let untracked = membership.untracked(&threads);
        if !untracked.is_empty() {
            self.probes
                .track_threads(&main_threads(&untracked, &worker_fds))?;
            threads = self.probes.worker_threads()?;
        }
        let stale = workers::stale_threads(&threads, membership, procfs::thread_is_alive);
        self.probes.forget_threads(&stale)?;
        threads.retain(|(tid, _)| !stale.contains(tid));
        self.reconcile_waiting(&mut threads, &worker_fds)?;
        Ok(workers::pools(
            &listeners.listeners,
            membership,
            &threads,
            procfs::monotonic_ns(),
            self.max_workers,
        ))
    }
}

impl Pipeline {
    /// Tells the kernel side which fds each worker waits on for new work.
    /// Epoll sets are looked up once per process (until one is found).
    fn refresh_worker_fds(&mut self, membership: &Membership) -> Result<HashMap<u32, WorkerFds>> {
        let listen_fds = membership.worker_listen_fds();
        self.epolls.retain(|pid, _| listen_fds.contains_key(pid));
        for (pid, fds) in &listen_fds {
            if !self.epolls.contains_key(pid) {
                let found = procfs::epolls_watching(*pid, fds);
                if !found.is_empty() {
                    self.epolls.insert(*pid, found);
                }
            }
        }
        let fds = workers::worker_fds(membership, &self.epolls);
        self.probes.set_worker_fds(&fds)?;
        Ok(fds)
    }

    /// A thread that entered its wait before it was tracked, or before its
    /// epoll set was known, sends no event until it leaves the wait: it
    /// would look busy all that time. Threads that have looked busy for a
    /// while are checked against /proc and marked idle if they are in fact
    /// blocked waiting for new work.
    fn reconcile_waiting(
        &mut self,
        threads: &mut [(u32, WorkerThread)],
        fds: &HashMap<u32, WorkerFds>,
    ) -> Result<()> {
        const LOOKS_STUCK_NS: u64 = 200_000_000;
        let now = procfs::monotonic_ns();
        let mut fixed = Vec::new();
        for (tid, t) in threads.iter_mut() {
            if t.waiting != 0 || now.saturating_sub(t.since_ns) < LOOKS_STUCK_NS {
                continue;
            }
            let worker_fds = fds.get(&t.tgid).map(|f| (&f.listen[..], &f.epoll[..]));
            // The kernel side keeps writing while we look: write only if the
            // entry is unchanged since the snapshot, checked after /proc.
            if procfs::waits_for_work(t.tgid, *tid, worker_fds)
                && self.probes.worker_thread(*tid) == Some(*t)
            {
                t.busy_ns += now.saturating_sub(t.since_ns);
                t.waiting = 1;
                t.since_ns = now;
                fixed.push((*tid, *t));
            }
        }
        if !fixed.is_empty() {
            log::debug!(
                "{} tracked threads were waiting for work unseen",
                fixed.len()
            );
            self.probes.update_threads(&fixed)?;
        }
        Ok(())
    }
}

/// Checks the host and loads the programs (`trace`: also stream accepts).
pub fn load_probes(kernel: &KernelOptions, trace: bool) -> Result<Probes> {
    probes::ensure_object_sane()?;
    host::require_privileges()?;
    host::require_lockdown_allows_reads()?;
    if host::ensure_tracefs()? {
        log::info!("mounted tracefs at /sys/kernel/tracing");
    }
    let offsets = offsets::from_kernel(&kernel.btf)?;
    log::debug!("kernel struct offsets: {offsets:?}");
    Probes::load(&offsets, &kernel.btf, kernel.accept_source, trace)
}

/// Every listening socket: those of the daemon's namespace (`iter/tcp`, which
/// also sees kernel-owned listeners) and those held by any process in any
/// namespace (`iter/task_file`), once each (by socket inode).
fn all_listeners(own_netns: Vec<ListenerRecord>, holders: &[HolderRecord]) -> Vec<ListenerRecord> {
    let mut seen: std::collections::HashSet<u64> = own_netns
        .iter()
        .map(|l| l.inode)
        .filter(|i| *i != 0)
        .collect();
    let mut listeners = own_netns;
    for h in holders.iter().filter(|h| h.state == TCP_LISTEN) {
        if seen.insert(h.inode) {
            listeners.push(ListenerRecord {
                netns: h.netns,
                family: h.family,
                port: h.port,
                addr: h.addr,
                queue_len: h.queue_len,
                queue_max: h.queue_max,
                syn_queue_len: h.syn_queue_len,
                drops: h.drops,
                inode: h.inode,
            });
        }
    }
    listeners
}

/// Tracks the main thread of worker processes that have not accepted yet
/// (they are idle if blocked in a wait syscall now, else busy).
fn main_threads(pids: &[u32], fds: &HashMap<u32, WorkerFds>) -> Vec<(u32, WorkerThread)> {
    let now = procfs::monotonic_ns();
    pids.iter()
        .map(|pid| {
            let worker_fds = fds.get(pid).map(|f| (&f.listen[..], &f.epoll[..]));
            let waiting = procfs::waits_for_work(*pid, *pid, worker_fds) as u32;
            let thread = WorkerThread {
                tgid: *pid,
                waiting,
                since_ns: now,
                busy_ns: 0,
                registered_by: REGISTERED_BY_DAEMON,
                _pad: 0,
            };
            (*pid, thread)
        })
        .collect()
}
