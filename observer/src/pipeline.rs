//! Wires the stages into one collection, node_exporter's way: **observe**
//! (read the kernel: iterators and maps, nothing written) → **compute**
//! (pure: listeners, pools) → **apply** (the few writes the daemon makes to
//! kernel maps: which ports have listeners, which workers to sample, which
//! accept keys are folded in) → a [`Snapshot`]. The thread sampler then
//! reads the workers once more, so that busy/idle describes this instant.
//! Shared by `serve` and the one-shot CLI commands.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashSet};

use anyhow::{Context as _, Result, bail};

use observer_common::{
    AF_UNIX, AcceptKey, AcceptStats, ListenerRecord, TCP_LISTEN, listen_port_key,
};

use crate::{
    activity::{Watched, WatchedSet},
    aggregate::{Aggregator, Collection},
    collectors::{CollectorOptions, Collectors},
    containers::{ContainerCache, ContainerInfo},
    kernel::{
        holders::{HolderWalk, Holding, ShortChildren},
        host,
        iter::IterLink,
        offsets,
        probes::{self, AcceptSource, Probes, timed},
        procfs,
    },
    sampler::{self, SamplerCost, ThreadSampler, ThreadSource, WorkerActivity},
    slots::{Finals, Slots},
    sockets::{self, ListenSocket, ListenerId},
    workers::{self, EventLoops, Handoffs, Membership, Pools},
};

/// The daemon's view of itself, exported next to the listener figures.
#[derive(Clone, Debug, Default)]
pub struct DaemonHealth {
    pub accept_source: String,
    pub lockdown: String,
    /// Where the thread sampler reads worker threads: `bpf`, `proc`, or
    /// `none` (the workers collector is off).
    pub thread_sampler: String,
    /// (program, message) for every non-fatal load/attach failure.
    pub program_errors: Vec<(String, String)>,
    /// (reason, count) of kernel events the programs could not count.
    pub kernel_events_lost: Vec<(&'static str, u64)>,
    /// The thread sampler's own cost; `None` where it cannot run.
    pub sampler: Option<SamplerCost>,
    /// What each of observer's programs cost; `None` while the kernel's
    /// BPF run-time statistics are off (see `--collector.program-stats`).
    pub program_costs: Option<Vec<probes::ProgramCost>>,
    pub collect_errors: u64,
    pub last_collect_seconds: f64,
    /// Where the last collection spent its time, stage by stage (and the
    /// exposition of the scrape before it).
    pub stages: Stages,
}

/// Seconds spent per stage of one collection, in the order they ran.
#[derive(Clone, Debug, Default)]
pub struct Stages(pub Vec<(&'static str, f64)>);

impl Stages {
    /// Runs `f`, adding its time to `stage`.
    pub fn time<T>(&mut self, stage: &'static str, f: impl FnOnce() -> T) -> T {
        let (out, seconds) = timed(f);
        match self.0.iter_mut().find(|(name, _)| *name == stage) {
            Some((_, total)) => *total += seconds,
            None => self.0.push((stage, seconds)),
        }
        out
    }

    /// Sets `stage`'s time, replacing what it held.
    pub fn set(&mut self, stage: &'static str, seconds: f64) {
        self.0.retain(|(name, _)| *name != stage);
        self.0.push((stage, seconds));
    }
}

/// Everything one collection produced.
pub struct Snapshot {
    pub listeners: Collection,
    pub pools: Pools,
    /// Container facts of listeners whose processes run in a container.
    pub containers: HashMap<ListenerId, ContainerInfo>,
    /// (pid, comm) of the processes holding each socket of listeners with
    /// more than one, by inode.
    pub socket_holders: HashMap<u64, Vec<(u32, String)>>,
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
    /// How often the thread sampler reads worker threads between scrapes
    /// (at most: passes are kept under 0.5% of a core, so on a host with
    /// many threads they come less often; see
    /// observer_worker_sample_interval_seconds).
    #[arg(
        long = "collector.workers.sample-rate",
        value_name = "HZ",
        default_value_t = 20.0,
        value_parser = parse_rate
    )]
    pub sample_rate: f64,
    /// How worker threads are read: bpf (a sleepable task iterator, Linux
    /// 5.18+), proc (/proc and the workers' memory, any kernel, more CPU
    /// per thread), or auto (bpf where it loads, else proc).
    #[arg(
        long = "collector.workers.sampler",
        env = "OBSERVER_THREAD_SAMPLER",
        value_enum,
        default_value = "auto"
    )]
    pub thread_sampler: SamplerChoice,
}

/// `--collector.workers.sampler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerChoice {
    Auto,
    Bpf,
    Proc,
}

/// Where worker threads are read, as `--collector.workers.sampler` asks on
/// this kernel (the daemon starts it; `doctor` describes it).
pub enum ThreadReader {
    /// The BPF sampler, through its iterator.
    Bpf(IterLink),
    /// /proc and the workers' memory; `instead_of_bpf`: why `auto` could not
    /// take the BPF sampler (`None`: proc was asked for).
    Proc { instead_of_bpf: Option<String> },
}

/// The reader `choice` gets, given the BPF sampler's iterator or why this
/// kernel cannot run it; `Err` (why) where `bpf` was asked for and cannot
/// run.
pub fn thread_reader(
    choice: SamplerChoice,
    bpf: Result<IterLink, String>,
) -> Result<ThreadReader, String> {
    match (choice, bpf) {
        (SamplerChoice::Proc, _) => Ok(ThreadReader::Proc {
            instead_of_bpf: None,
        }),
        (_, Ok(link)) => Ok(ThreadReader::Bpf(link)),
        (SamplerChoice::Bpf, Err(why)) => Err(why),
        (SamplerChoice::Auto, Err(why)) => Ok(ThreadReader::Proc {
            instead_of_bpf: Some(why),
        }),
    }
}

/// The thread sampler's source that `choice` asks for on this kernel.
fn thread_source(choice: SamplerChoice, bpf: Result<IterLink, String>) -> Result<ThreadSource> {
    match thread_reader(choice, bpf) {
        Ok(ThreadReader::Bpf(link)) => Ok(ThreadSource::bpf(link)),
        Ok(ThreadReader::Proc { instead_of_bpf }) => {
            if let Some(why) = instead_of_bpf {
                log::info!("worker threads are read from /proc: {why}");
            }
            Ok(ThreadSource::proc())
        }
        Err(why) => bail!(
            "--collector.workers.sampler bpf cannot run here: {why}; \
             use --collector.workers.sampler proc (or auto)"
        ),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(hz) if (0.1..=1000.0).contains(&hz) => Ok(hz),
        _ => Err(format!(
            "{text:?} is not a rate from 0.1 to 1000 (samples per second)"
        )),
    }
}

/// What one collection read from the kernel, before anything is computed.
struct KernelView {
    listeners: Vec<ListenerRecord>,
    holders: HolderWalk,
    accepts: Vec<(AcceptKey, AcceptStats)>,
    kernel_events_lost: Vec<(&'static str, u64)>,
    /// The processes that exist, listed once.
    alive: HashSet<u32>,
}

/// The writes one collection asks of the kernel maps.
struct MapWrites {
    listen_ports: HashSet<u64>,
    watched: WatchedSet,
    forget_accepts: Vec<AcceptKey>,
}

pub struct Pipeline {
    probes: Probes,
    aggregator: Aggregator,
    max_workers: usize,
    collectors: Collectors,
    /// Epoll fds watching a listener (or a fed worker's connections), per
    /// worker process.
    event_loops: EventLoops,
    /// The worker series' slots, kept across scrapes.
    slots: Slots,
    /// Who hands connections to whom (dispatchers, fed workers),
    /// remembered while they live.
    handoffs: Handoffs,
    /// The listeners workers miss of their master's, remembered while
    /// their counts stay the same.
    short_children: ShortChildren,
    containers: ContainerCache,
    /// The clock of Unix queue heads' first sightings.
    started: Instant,
    /// `None` where this kernel cannot run the thread sampler.
    sampler: Option<Arc<Mutex<ThreadSampler>>>,
    tcp_walk: TcpWalk,
    /// The last collection's membership, until [`Pipeline::take_spent`].
    spent: Option<Membership>,
    /// Held while `--collector.program-stats` keeps the kernel's BPF
    /// run-time statistics on.
    run_time_stats: Option<std::os::fd::OwnedFd>,
    pub health: DaemonHealth,
}

impl Pipeline {
    /// Checks the host, loads and attaches the programs, starts the thread
    /// sampler, and takes the baseline collection (queue depths at start).
    pub fn start(
        kernel: &KernelOptions,
        collectors: Collectors,
        max_listeners: usize,
        max_workers: usize,
    ) -> Result<Self> {
        let mut pipeline = Self::load(kernel, collectors, max_listeners, max_workers)?;
        pipeline.collect().context("first collection")?;
        Ok(pipeline)
    }

    /// Checks the host, loads and attaches the programs and starts the
    /// thread sampler; the first [`Pipeline::collect`] is the baseline
    /// (queue depths at start).
    pub fn load(
        kernel: &KernelOptions,
        collectors: Collectors,
        max_listeners: usize,
        max_workers: usize,
    ) -> Result<Self> {
        let probes = load_probes(kernel, false)?;
        log::info!("accept source: {}", probes.accept_source.name());
        for e in &probes.attach_errors {
            log::warn!("{}: {}", e.program, e.message);
        }
        let (sampler, thread_sampler) = if collectors.workers {
            let source = thread_source(kernel.thread_sampler, probes.thread_sampler())?;
            let name = source.name();
            let sampler = Arc::new(Mutex::new(ThreadSampler::new(source)));
            sampler::spawn(&sampler, Duration::from_secs_f64(1.0 / kernel.sample_rate))?;
            (Some(sampler), name)
        } else {
            (None, "none")
        };
        let mut program_errors: Vec<(String, String)> = probes
            .attach_errors
            .iter()
            .map(|e| (e.program.to_owned(), e.message.clone()))
            .collect();
        let run_time_stats = if collectors.program_stats {
            probes::enable_run_time_stats()
                .inspect_err(|e| {
                    log::warn!("{e:#}");
                    program_errors.push(("program-stats".into(), format!("{e:#}")));
                })
                .ok()
        } else {
            None
        };
        let health = DaemonHealth {
            accept_source: probes.accept_source.name().to_owned(),
            thread_sampler: thread_sampler.to_owned(),
            lockdown: host::lockdown().label(),
            program_errors,
            ..Default::default()
        };
        let aggregator = Aggregator::new(
            max_listeners,
            probes.unix_waits_timed,
            probes.listen_discards.is_ok(),
        );
        Ok(Pipeline {
            probes,
            aggregator,
            max_workers,
            collectors,
            event_loops: Default::default(),
            slots: Default::default(),
            handoffs: Default::default(),
            short_children: Default::default(),
            containers: Default::default(),
            started: Instant::now(),
            sampler,
            tcp_walk: TcpWalk::default(),
            spent: None,
            run_time_stats,
            health,
        })
    }

    /// Every collector, every listener, no cap: the CLI views.
    pub fn start_unbounded(kernel: &KernelOptions) -> Result<Self> {
        Self::start(kernel, CollectorOptions::all(), usize::MAX, usize::MAX)
    }

    /// What the last collection built and no longer needs: for the caller
    /// to free once its reply is out ([`drop_off_path`]).
    pub fn take_spent(&mut self) -> Option<Membership> {
        self.spent.take()
    }

    /// One collection: observe, compute, apply, then sample the workers.
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
        let mut st = Stages::default();
        let view = self.observe(&mut st)?;
        let all = st.time("sockets", || {
            let mut all = sockets::listen_sockets(&view.listeners, &view.holders.holdings);
            all.retain(|socket| self.collectors.filter.keeps(&socket.id));
            all
        });
        let mut listeners = st.time("aggregate", || {
            self.aggregator.collect(
                &all,
                &view.accepts,
                |pid| view.alive.contains(&pid),
                self.started.elapsed(),
            )
        });
        let membership = st.time("membership", || {
            self.handoffs.retain_alive(|pid| view.alive.contains(&pid));
            Membership::from_holders(&listeners, &view.holders, &mut self.handoffs)
        });
        if self.collectors.workers {
            let loop_fds = membership.event_loop_fds();
            let in_accept = match &self.sampler {
                Some(sampler) => lock(sampler)?.in_accept(),
                None => HashSet::default(),
            };
            let now = self.started.elapsed();
            st.time("epolls", || {
                self.event_loops
                    .refresh(&loop_fds, &in_accept, now, procfs::epolls_watching)
            });
        }
        let writes = MapWrites {
            listen_ports: all.iter().map(listen_key).collect(),
            watched: workers::watched(&membership, self.event_loops.epolls()),
            forget_accepts: listeners.forget.clone(),
        };
        st.time("apply", || self.apply(&writes))?;
        let sampled = st.time("sample", || self.sample(writes.watched))?;
        let mut pools = st.time("pools", || {
            workers::pools(
                &listeners.listeners,
                &membership,
                &sampled.activity,
                self.max_workers,
            )
        });
        let finals = Finals {
            accepts: std::mem::take(&mut listeners.exited_accepts),
            busy_seconds: sampled.retired_busy_seconds,
        };
        let now = self.started.elapsed();
        st.time("slots", || self.slots.assign(&mut pools, &finals, now));
        for id in pools.serving() {
            self.aggregator.mark_traffic(id);
            listeners.mark_traffic(id);
        }
        self.health.kernel_events_lost = view.kernel_events_lost;
        let stats_on = self.run_time_stats.is_some() || procfs::bpf_stats_enabled();
        self.health.program_costs = stats_on.then(|| self.probes.program_costs());
        let containers = st.time("containers", || {
            self.containers.retain(|pid| view.alive.contains(&pid));
            listeners
                .listeners
                .iter()
                .enumerate()
                .filter_map(|(no, v)| {
                    Some((v.id, self.containers.lookup(membership.a_holder(no)?)?))
                })
                .collect()
        });
        let socket_holders = listeners
            .listeners
            .iter()
            .filter(|v| v.sockets.len() > 1)
            .flat_map(|v| &v.sockets)
            .map(|socket| {
                let holders = membership
                    .socket_holders(socket.inode)
                    .map(|(pid, comm)| (pid, comm.to_owned()))
                    .collect();
                (socket.inode, holders)
            })
            .collect();
        // The previous scrape's exposition stages (see serve).
        let previous = &self.health.stages.0;
        st.0.extend(previous.iter().filter(|(name, _)| *name == "exposition"));
        self.health.stages = st;
        self.spent = Some(membership);
        Ok(Snapshot {
            listeners,
            pools,
            containers,
            socket_holders,
        })
    }

    /// Hands the watched set to the thread sampler and takes busy/idle from
    /// its last pass, which runs once more now; and the final busy time of
    /// the processes no longer watched.
    fn sample(&mut self, watched: WatchedSet) -> Result<Sampled> {
        let Some(sampler) = &self.sampler else {
            return Ok(Sampled::default());
        };
        let mut sampler = lock(sampler)?;
        sampler.set_watched(watched);
        let retired = sampler.take_retired();
        // Busy/idle then comes from the sampler's previous pass.
        if let Err(e) = sampler.sample() {
            log::warn!("thread sampler at this scrape: {e:#}");
        }
        self.health.sampler = Some(sampler.cost());
        Ok(Sampled {
            activity: sampler.activity(),
            retired_busy_seconds: retired,
        })
    }

    /// Reads everything a collection needs from the kernel; writes nothing.
    fn observe(&mut self, st: &mut Stages) -> Result<KernelView> {
        let now = self.started.elapsed();
        let probes = &self.probes;
        // Beside the walks: the accepts, then which processes exist, in that
        // order, so that every process with accepts is either in `alive` or
        // gone (its accepts then final).
        let (walks, beside) = probes.walks(self.tcp_walk.due(now), || {
            let accepts = timed(|| probes.accepts());
            let alive = timed(procfs::live_processes);
            (accepts, alive)
        });
        let (holders, seconds) = walks.holders;
        let resolving = Instant::now();
        let holders = HolderWalk::resolve(holders?, &mut self.short_children, &procfs::Fds);
        st.set(
            "holders_iterator",
            seconds + resolving.elapsed().as_secs_f64(),
        );
        let lost_a_holder = self.tcp_walk.saw_held(&holders.holdings);
        let listeners = match walks.listeners {
            Some((listeners, seconds)) => {
                st.set("listeners_iterator", seconds);
                Some(listeners?)
            }
            // A listener held before may still be there, held by no one we
            // see (in flight to another process): iter/tcp looks now.
            None if lost_a_holder => {
                Some(st.time("listeners_iterator", || self.probes.listeners())?)
            }
            None => {
                st.set("listeners_iterator", 0.0);
                None
            }
        };
        let listeners = match listeners {
            Some(listeners) => {
                self.tcp_walk.walked(now, &listeners);
                listeners
            }
            None => Vec::new(),
        };
        let ((accepts, accepts_seconds), (alive, alive_seconds)) = beside?;
        st.set("accepts_map", accepts_seconds);
        st.set("processes", alive_seconds);
        let accepts = accepts?;
        let kernel_events_lost = self
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
        Ok(KernelView {
            listeners,
            holders,
            accepts,
            kernel_events_lost,
            alive,
        })
    }

    /// The daemon's writes to kernel maps, in one place.
    fn apply(&mut self, writes: &MapWrites) -> Result<()> {
        self.probes.set_listen_ports(&writes.listen_ports)?;
        let fds = |set: &HashMap<u32, Watched>| set.iter().map(|(pid, w)| (*pid, w.fds)).collect();
        self.probes.set_watched(&fds(&writes.watched.workers))?;
        self.probes
            .set_watched_masters(&fds(&writes.watched.masters))?;
        self.probes.forget_accepts(&writes.forget_accepts)
    }
}

/// When `iter/tcp` walks the daemon's namespace. Every listener a process
/// holds is also in the holder walk, with the same figures; `iter/tcp`
/// alone sees those nobody holds (kernel-owned, as nfsd's, held by
/// processes outside the daemon's PID namespace, or in flight between two
/// processes). So it walks at the first collection, then at every one
/// while it found such listeners, after a TCP listener the holder walk saw
/// is no longer seen held, and at least every [`TcpWalk::EVERY`] for new
/// ones. At 10,000 listeners a walk costs about 16 ms of a 50 ms scrape
/// budget.
#[derive(Debug, Default)]
struct TcpWalk {
    last: Option<Duration>,
    found_unheld: bool,
    /// The TCP listening sockets (inodes) the last holder walk saw held.
    held: HashSet<u64>,
}

impl TcpWalk {
    const EVERY: Duration = Duration::from_secs(60);

    fn due(&self, now: Duration) -> bool {
        match self.last {
            None => true,
            Some(last) => self.found_unheld || now.saturating_sub(last) >= Self::EVERY,
        }
    }

    /// Takes this collection's holder walk; true when a TCP listener held
    /// at the last one is not held now (closed, or held by no one seen).
    fn saw_held(&mut self, holders: &[Holding]) -> bool {
        let held: HashSet<u64> = holders
            .iter()
            .map(|h| &h.record)
            .filter(|r| r.state == TCP_LISTEN && r.family != AF_UNIX)
            .map(|r| r.inode)
            .collect();
        let lost = self.held.iter().any(|inode| !held.contains(inode));
        self.held = held;
        lost
    }

    /// `iter/tcp` walked at `now` and found `listeners` (after
    /// [`TcpWalk::saw_held`] took this collection's holders).
    fn walked(&mut self, now: Duration, listeners: &[ListenerRecord]) {
        self.last = Some(now);
        self.found_unheld = listeners.iter().any(|l| !self.held.contains(&l.inode));
    }
}

/// What the thread sampler gives one collection.
#[derive(Default)]
struct Sampled {
    activity: HashMap<u32, WorkerActivity>,
    /// The final busy time of processes no longer watched, by pid.
    retired_busy_seconds: HashMap<u32, f64>,
}

/// Drops `value` on a thread of its own: a collection at 10,000 listeners
/// leaves tens of thousands of allocations, a few ms of frees that no
/// scrape needs to wait for. Dropped here when no thread can be had.
pub fn drop_off_path<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("free".into())
        .spawn(move || drop(value));
}

fn lock(sampler: &Mutex<ThreadSampler>) -> Result<std::sync::MutexGuard<'_, ThreadSampler>> {
    sampler
        .lock()
        .map_err(|_| anyhow::anyhow!("thread sampler state poisoned"))
}

/// Checks the host and loads the programs (`trace`: also stream accepts).
pub fn load_probes(kernel: &KernelOptions, trace: bool) -> Result<Probes> {
    probes::ensure_object_sane()?;
    host::require_privileges()?;
    host::require_bpf_allowed()?;
    host::require_lockdown_allows_reads()?;
    if host::ensure_tracefs()? {
        log::info!("mounted tracefs at /sys/kernel/tracing");
    }
    let layout = offsets::from_kernel(&kernel.btf)?;
    log::debug!("kernel layout: {layout:?}");
    Probes::load(&layout, &kernel.btf, kernel.accept_source, trace)
}

/// A listener's `LISTEN_PORTS` key: what its accepted connections carry.
fn listen_key(socket: &ListenSocket) -> u64 {
    socket
        .unix_key
        .unwrap_or_else(|| listen_port_key(socket.id.netns, socket.id.port))
}

#[cfg(test)]
mod tests {
    use observer_common::{HolderRecord, TCP_ESTABLISHED};

    use super::*;

    fn listener(inode: u64) -> ListenerRecord {
        ListenerRecord {
            inode,
            ..Default::default()
        }
    }

    fn holding(inode: u64, state: u8) -> Holding {
        Holding {
            record: HolderRecord {
                inode,
                state,
                ..Default::default()
            },
            unix_name: None,
        }
    }

    #[test]
    fn iter_tcp_walks_while_a_listener_is_unheld_and_else_once_a_minute() {
        let mut walk = TcpWalk::default();
        let at = Duration::from_secs;
        assert!(walk.due(at(0)), "the first collection walks");
        // Every listener held: the holder walk has them all.
        assert!(!walk.saw_held(&[holding(1, TCP_LISTEN), holding(2, TCP_LISTEN)]));
        walk.walked(at(0), &[listener(1), listener(2)]);
        assert!(!walk.due(at(59)));
        assert!(walk.due(at(60)), "new unheld listeners are looked for");
        // Inode 2 is held only as a connection's inode would be: unheld.
        let lost = walk.saw_held(&[holding(1, TCP_LISTEN), holding(2, TCP_ESTABLISHED)]);
        assert!(lost, "listener 2 was held at the last collection");
        walk.walked(at(60), &[listener(1), listener(2)]);
        assert!(
            walk.due(at(61)),
            "an unheld listener's figures come from iter/tcp alone"
        );
        // Held again, then closed: a walk at once, not in a minute.
        assert!(!walk.saw_held(&[holding(1, TCP_LISTEN), holding(2, TCP_LISTEN)]));
        walk.walked(at(61), &[listener(1), listener(2)]);
        assert!(!walk.due(at(62)));
        assert!(
            walk.saw_held(&[holding(1, TCP_LISTEN)]),
            "listener 2 is gone"
        );
    }
}
