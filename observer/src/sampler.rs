//! Stage 2b: the thread sampler. Runs the `iter.s/task` program at a fixed
//! rate on a thread of its own (and once more at every scrape, so that the
//! busy/idle gauges describe the instant of the scrape), applies the
//! busy/idle rule of `activity.rs` to each pass, and integrates busy time
//! per worker process: a process busy in a pass is counted busy for the
//! time since the previous pass (capped at [`MAX_GAP_NS`]).
//!
//! Resolution is the sampling interval; the error of a worker's busy time
//! over a window is about ± one interval per busy period that starts or ends
//! in it, and averages out (docs/busy.md).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt, HashSet};

use anyhow::Result;
use observer_common::ThreadSample;

use crate::{
    activity::{self, FileId, FileLocks, Learnt, ProcessKey, ProcessState, WatchedSet},
    kernel::{
        iter::IterLink,
        probes::parse_records,
        proc_threads::ProcThreads,
        procfs,
        threads::{ThreadWalk, Walk},
    },
};

/// Longest time one pass may account for: a pass delayed longer (a slow
/// scrape holding the sampler) does not stretch one observation over it.
const MAX_GAP_NS: u64 = 1_000_000_000;

/// The most of one core the sampler's thread may use. A pass reads the
/// watched processes' threads, or walks every thread on the host where
/// that is cheaper or the kernel has no per-process walk (about 2 µs per
/// host thread here, BENCHMARKS.md); where passes cost more than this share
/// of the requested interval, the interval stretches to fit, and
/// resolution, not the host, pays.
pub const MAX_CORE_SHARE: f64 = 0.005;

/// What reading one process's threads through an iterator of its own
/// costs, in threads of a walk over the host: about 6 µs against 0.4 µs
/// per thread the walk passes over (BENCHMARKS.md, "The thread sampler on
/// a big host").
const PROCESS_READ_IN_HOST_THREADS: u64 = 16;

/// How long the host's thread count is trusted before it is read again.
const HOST_THREADS_TTL: Duration = Duration::from_secs(1);

/// A worker's state as the sampler last saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerActivity {
    pub busy: bool,
    /// Its threads free to take a new request (`ProcessState`).
    pub idle_threads: u32,
    /// Busy time integrated since the sampler first saw this process.
    pub busy_seconds: f64,
}

#[derive(Debug)]
struct Account {
    state: ProcessState,
    busy_ns: u64,
    last_ns: u64,
}

/// The sampler's own cost, exported with the daemon's health.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplerCost {
    pub passes: u64,
    pub seconds: f64,
    pub threads_sampled: u64,
    /// Passes that walked every thread on the host, not the watched
    /// processes' own.
    pub host_walks: u64,
    /// The interval between passes in effect (after [`MAX_CORE_SHARE`]).
    pub interval_seconds: f64,
}

/// Where a pass's thread samples come from.
pub enum ThreadSource {
    /// The BPF task iterator (`iter.s/task`, Linux 5.18+): over the watched
    /// processes, or over the host where that is cheaper.
    Bpf {
        walk: ThreadWalk,
        /// The host's thread count, and when it was read.
        host_threads: Option<(Instant, u64)>,
    },
    /// /proc and the workers' memory, where the kernel cannot run the
    /// program (`kernel/proc_threads.rs`).
    Proc(ProcThreads),
}

impl ThreadSource {
    pub fn bpf(link: IterLink) -> ThreadSource {
        ThreadSource::Bpf {
            walk: ThreadWalk::new(link),
            host_threads: None,
        }
    }

    pub fn proc() -> ThreadSource {
        ThreadSource::Proc(ProcThreads::default())
    }

    /// `bpf` or `proc`, as `--collector.workers.sampler` names them.
    pub fn name(&self) -> &'static str {
        match self {
            ThreadSource::Bpf { .. } => "bpf",
            ThreadSource::Proc(_) => "proc",
        }
    }

    /// One pass's samples of `watched`'s threads, and whether it walked
    /// every thread on the host.
    fn read(&mut self, watched: &WatchedSet) -> Result<(Vec<ThreadSample>, bool)> {
        match self {
            ThreadSource::Bpf { walk, host_threads } => {
                let chosen = match walk.per_process_refused() {
                    Some(_) => Walk::Host,
                    None => cheaper_walk(watched, host_threads),
                };
                let (bytes, walked_host) = walk.read(&chosen)?;
                Ok((parse_records(&bytes), walked_host))
            }
            ThreadSource::Proc(threads) => Ok((threads.samples(watched), false)),
        }
    }
}

/// The watched processes' threads, where reading them one process at a
/// time costs less than walking the host's.
fn cheaper_walk(watched: &WatchedSet, host_threads: &mut Option<(Instant, u64)>) -> Walk {
    let threads = match *host_threads {
        Some((read, n)) if read.elapsed() < HOST_THREADS_TTL => Some(n),
        _ => {
            let n = procfs::threads_on_host();
            *host_threads = n.map(|n| (Instant::now(), n));
            n
        }
    };
    let masters: Vec<u32> = watched.masters.keys().copied().collect();
    choose_walk(
        watched.workers.keys().copied(),
        &masters,
        threads,
        procfs::children,
    )
}

pub struct ThreadSampler {
    source: ThreadSource,
    watched: WatchedSet,
    learnt: Learnt,
    accounts: BTreeMap<ProcessKey, Account>,
    /// See [`activity::waiting_in_accept`]: as of the last pass.
    in_accept: HashSet<u32>,
    /// Busy time of processes no longer watched, by pid, until taken.
    retired: HashMap<u32, f64>,
    /// When the previous pass ran (`CLOCK_MONOTONIC`, the clock of a
    /// task's start time).
    last_pass_ns: Option<u64>,
    cost: SamplerCost,
}

impl ThreadSampler {
    pub fn new(source: ThreadSource) -> ThreadSampler {
        ThreadSampler {
            source,
            watched: WatchedSet::default(),
            learnt: Learnt::default(),
            accounts: BTreeMap::new(),
            in_accept: HashSet::default(),
            retired: HashMap::new(),
            last_pass_ns: None,
            cost: SamplerCost::default(),
        }
    }

    /// The worker processes to classify (the same set the daemon wrote to
    /// the kernel's `WATCHED` map).
    pub fn set_watched(&mut self, watched: WatchedSet) {
        self.learnt.retain(&watched);
        let retired = &mut self.retired;
        self.accounts.retain(|k, a| {
            let keep = watched.workers.contains_key(&k.pid);
            if !keep {
                retire(retired, k.pid, a);
            }
            keep
        });
        self.watched = watched;
    }

    /// One pass: read every watched thread, classify, integrate.
    pub fn sample(&mut self) -> Result<()> {
        let cpu_started_ns = procfs::thread_cpu_ns();
        let (samples, walked_host) = self.source.read(&self.watched)?;
        self.cost.host_walks += walked_host as u64;
        let now_ns = procfs::monotonic_ns();
        let states = activity::process_states(
            &samples,
            &self.watched,
            &mut self.learnt,
            &mut ProcFileLocks,
        );
        integrate(&mut self.accounts, &states, (self.last_pass_ns, now_ns));
        self.last_pass_ns = Some(now_ns);
        // A master's child that is gone, or left its pool, before a scrape
        // named it a worker: its busy time waits for the scrape's slots.
        let (workers, retired) = (&self.watched.workers, &mut self.retired);
        self.accounts.retain(|k, a| {
            let keep = states.contains_key(k) || workers.contains_key(&k.pid);
            if !keep {
                retire(retired, k.pid, a);
            }
            keep
        });
        self.in_accept = activity::waiting_in_accept(&samples, &self.watched.workers);
        self.cost.passes += 1;
        self.cost.threads_sampled += samples.len() as u64;
        self.cost.seconds += pass_cpu(cpu_started_ns).as_secs_f64();
        Ok(())
    }

    /// Each watched process's latest state, by pid (the newest process
    /// with that pid).
    pub fn activity(&self) -> HashMap<u32, WorkerActivity> {
        self.accounts
            .iter()
            .map(|(key, a)| {
                let activity = WorkerActivity {
                    busy: a.state.busy,
                    idle_threads: a.state.idle_threads,
                    busy_seconds: a.busy_ns as f64 / 1e9,
                };
                (key.pid, activity)
            })
            .collect()
    }

    /// The busy time of the processes that stopped being watched since
    /// the last call, to their last pass (the slots of worker series keep
    /// it).
    pub fn take_retired(&mut self) -> HashMap<u32, f64> {
        std::mem::take(&mut self.retired)
    }

    /// The workers blocked in accept() at the last pass.
    pub fn in_accept(&self) -> HashSet<u32> {
        self.in_accept.clone()
    }

    pub fn cost(&self) -> SamplerCost {
        self.cost
    }
}

/// The most processes whose final busy time waits for a scrape: beyond,
/// while no one scrapes, later ones are not kept.
const RETIRED_KEPT: usize = 16_384;

/// Keeps a process's final busy time for the next scrape.
fn retire(retired: &mut HashMap<u32, f64>, pid: u32, account: &Account) {
    if retired.len() < RETIRED_KEPT || retired.contains_key(&pid) {
        retired.insert(pid, account.busy_ns as f64 / 1e9);
    }
}

/// Adds one pass to the accounts: a process busy in it is counted busy
/// for the time since its previous pass (at most [`MAX_GAP_NS`]). One seen
/// for the first time counts from the sampler's previous pass or its own
/// start, whichever is later (a worker forked between two passes and busy
/// at once, as a replacement worker is); nothing on the first pass of all.
fn integrate(
    accounts: &mut BTreeMap<ProcessKey, Account>,
    states: &BTreeMap<ProcessKey, ProcessState>,
    (previous_pass_ns, now_ns): (Option<u64>, u64),
) {
    // A process replaced by another with its pid stops being accounted
    // (exited ones go when the scrape stops watching their pid).
    let pids_seen: HashSet<u32> = states.keys().map(|k| k.pid).collect();
    accounts.retain(|k, _| states.contains_key(k) || !pids_seen.contains(&k.pid));
    for (key, state) in states {
        let account = accounts.entry(*key).or_insert(Account {
            state: *state,
            busy_ns: 0,
            last_ns: previous_pass_ns.map_or(now_ns, |p| p.max(key.start_ns).min(now_ns)),
        });
        if state.busy {
            account.busy_ns += now_ns.saturating_sub(account.last_ns).min(MAX_GAP_NS);
        }
        account.state = *state;
        account.last_ns = now_ns;
    }
}

/// The processes whose threads a pass reads: the watched workers and the
/// children of the watched masters (a pool's new workers, before a scrape
/// names them), where reading those one by one costs less than walking
/// the host's `host_threads`; else every thread. A master's children come
/// from /proc (`children`), at about the cost of one more process read.
fn choose_walk(
    workers: impl ExactSizeIterator<Item = u32>,
    masters: &[u32],
    host_threads: Option<u64>,
    mut children: impl FnMut(u32) -> Option<Vec<u32>>,
) -> Walk {
    let Some(host_threads) = host_threads else {
        return Walk::Host;
    };
    let cheaper =
        |processes: usize| (processes as u64) * PROCESS_READ_IN_HOST_THREADS < host_threads;
    if !cheaper(workers.len() + 2 * masters.len()) {
        return Walk::Host;
    }
    let mut pids: Vec<u32> = workers.collect();
    for &master in masters {
        match children(master) {
            Some(of_master) => pids.extend(of_master),
            None => return Walk::Host,
        }
    }
    pids.sort_unstable();
    pids.dedup();
    if !cheaper(pids.len() + masters.len()) {
        return Walk::Host;
    }
    Walk::Processes(pids)
}

/// The interval that keeps passes of `pass_cpu` CPU time within
/// [`MAX_CORE_SHARE`] of a core, and no shorter than `requested`.
fn budgeted_interval(requested: Duration, pass_cpu: Duration) -> Duration {
    requested.max(pass_cpu.div_f64(MAX_CORE_SHARE))
}

/// The CPU time this thread used since `cpu_started_ns`. A pass is
/// budgeted on CPU, not on wall time: on a saturated host a pass waits
/// for a core, and that wait costs the host nothing, so it must not
/// stretch the interval (and coarsen busy time) when it matters most.
fn pass_cpu(cpu_started_ns: u64) -> Duration {
    Duration::from_nanos(procfs::thread_cpu_ns().saturating_sub(cpu_started_ns))
}

/// Runs `sampler` every `interval` (stretched by [`budgeted_interval`]) on
/// a thread of its own, until the last other reference to it is dropped.
pub fn spawn(sampler: &Arc<Mutex<ThreadSampler>>, requested: Duration) -> Result<()> {
    let weak: Weak<Mutex<ThreadSampler>> = Arc::downgrade(sampler);
    if let Ok(mut s) = sampler.lock() {
        s.cost.interval_seconds = requested.as_secs_f64();
    }
    std::thread::Builder::new()
        .name("thread-sampler".into())
        .spawn(move || {
            let mut next = Instant::now() + requested;
            loop {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let Some(sampler) = weak.upgrade() else {
                    return;
                };
                let Ok(mut sampler) = sampler.lock() else {
                    return;
                };
                let started = Instant::now();
                let cpu_started_ns = procfs::thread_cpu_ns();
                if let Err(e) = sampler.sample() {
                    log::debug!("thread sampler: {e:#}");
                }
                let interval = budgeted_interval(requested, pass_cpu(cpu_started_ns));
                sampler.cost.interval_seconds = interval.as_secs_f64();
                // From this pass's start; a late pass is not followed by a burst.
                next = (started + interval).max(Instant::now());
            }
        })?;
    Ok(())
}

/// File locks from /proc: the file behind a process's fd, and the holders
/// of locks on it (`/proc/locks`). Read only for threads blocked on a file
/// lock that is not a known accept lock.
struct ProcFileLocks;

impl FileLocks for ProcFileLocks {
    fn file_of(&mut self, pid: u32, fd: u32) -> Option<FileId> {
        procfs::file_id(pid, fd)
    }

    fn holders(&mut self, file: FileId) -> Vec<u32> {
        procfs::lock_holders(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn no_children(_: u32) -> Option<Vec<u32>> {
        Some(Vec::new())
    }

    #[test]
    fn a_small_pool_on_a_host_of_ten_thousand_threads_is_read_process_by_process() {
        let walk = choose_walk([11, 10].into_iter(), &[9], Some(10_113), |master| {
            (master == 9).then(|| vec![12, 10])
        });
        assert_eq!(walk, Walk::Processes(vec![10, 11, 12]));
    }

    #[test]
    fn watched_processes_that_cost_more_than_the_host_walk_make_it_walk_the_host() {
        let workers = 0..1_000u32;
        assert_eq!(
            choose_walk(workers, &[], Some(2_113), no_children),
            Walk::Host
        );
        // A master's children, listed, tip the balance too.
        let walk = choose_walk([1].into_iter(), &[2], Some(200), |_| {
            Some((100..120).collect())
        });
        assert_eq!(walk, Walk::Host);
    }

    #[test]
    fn without_a_thread_count_or_a_children_list_the_host_is_walked() {
        assert_eq!(
            choose_walk([1].into_iter(), &[], None, no_children),
            Walk::Host
        );
        let walk = choose_walk([1].into_iter(), &[2], Some(10_000), |_| None);
        assert_eq!(walk, Walk::Host);
    }

    #[test]
    fn nothing_watched_reads_nothing() {
        let walk = choose_walk(std::iter::empty(), &[], Some(100), no_children);
        assert_eq!(walk, Walk::Processes(vec![]));
    }

    fn pass(pids: &[(u32, u64, bool)]) -> BTreeMap<ProcessKey, ProcessState> {
        pids.iter()
            .map(|(pid, start_ns, busy)| {
                let key = ProcessKey {
                    pid: *pid,
                    start_ns: *start_ns,
                };
                let state = ProcessState {
                    busy: *busy,
                    idle_threads: !busy as u32,
                };
                (key, state)
            })
            .collect()
    }

    fn busy_ms(accounts: &BTreeMap<ProcessKey, Account>, pid: u32) -> Vec<u64> {
        accounts
            .iter()
            .filter(|(k, _)| k.pid == pid)
            .map(|(_, a)| a.busy_ns / MS)
            .collect()
    }

    #[test]
    fn a_busy_pass_counts_the_time_since_the_previous_one() {
        let mut accounts = BTreeMap::new();
        integrate(&mut accounts, &pass(&[(11, 1, false)]), (None, 0));
        integrate(&mut accounts, &pass(&[(11, 1, true)]), (Some(0), 50 * MS));
        integrate(
            &mut accounts,
            &pass(&[(11, 1, true)]),
            (Some(50 * MS), 100 * MS),
        );
        integrate(
            &mut accounts,
            &pass(&[(11, 1, false)]),
            (Some(100 * MS), 150 * MS),
        );
        assert_eq!(busy_ms(&accounts, 11), vec![100]);
        assert!(!accounts.values().next().unwrap().state.busy);
    }

    #[test]
    fn a_first_pass_and_a_late_pass_count_no_more_than_they_saw() {
        let mut accounts = BTreeMap::new();
        integrate(&mut accounts, &pass(&[(11, 1, true)]), (None, 0));
        assert_eq!(
            busy_ms(&accounts, 11),
            vec![0],
            "first sight counts nothing"
        );
        integrate(
            &mut accounts,
            &pass(&[(11, 1, true)]),
            (Some(0), 5_000 * MS),
        );
        assert_eq!(busy_ms(&accounts, 11), vec![1_000], "a 5 s gap adds 1 s");
    }

    #[test]
    fn the_interval_stretches_to_keep_passes_within_the_budget() {
        let requested = Duration::from_millis(50);
        // 100 µs passes: 0.2% of a core at 20 Hz, within the budget.
        assert_eq!(
            budgeted_interval(requested, Duration::from_micros(100)),
            requested
        );
        // 2 ms passes (a host with ~1000 threads): every 400 ms, 0.5%.
        assert_eq!(
            budgeted_interval(requested, Duration::from_millis(2)),
            Duration::from_millis(400)
        );
    }

    #[test]
    fn a_pass_is_charged_its_cpu_time_not_the_time_it_waited() {
        // A pass that waits 50 ms for a core (here: sleeps) and computes
        // for 5 ms is charged about 5 ms, not 55 ms.
        let started = procfs::thread_cpu_ns();
        std::thread::sleep(Duration::from_millis(50));
        let give_up = Instant::now() + Duration::from_secs(2);
        while pass_cpu(started) < Duration::from_millis(5) && Instant::now() < give_up {
            std::hint::spin_loop();
        }
        let charged = pass_cpu(started);
        assert!(
            charged >= Duration::from_millis(5) && charged < Duration::from_millis(40),
            "{charged:?}"
        );
    }

    #[test]
    fn a_process_first_seen_busy_counts_from_its_start_or_the_previous_pass() {
        let mut accounts = BTreeMap::new();
        integrate(&mut accounts, &pass(&[(11, 1, false)]), (None, 100 * MS));
        // 12 started at 120 ms, between two passes, and serves at once; 13
        // ran before the previous pass but was not watched then.
        let later = pass(&[(11, 1, false), (12, 120 * MS, true), (13, 1, true)]);
        integrate(&mut accounts, &later, (Some(100 * MS), 150 * MS));
        assert_eq!(busy_ms(&accounts, 12), vec![30]);
        assert_eq!(busy_ms(&accounts, 13), vec![50]);
    }

    #[test]
    fn a_reused_pid_starts_from_zero() {
        let mut accounts = BTreeMap::new();
        integrate(&mut accounts, &pass(&[(11, 1, true)]), (None, 0));
        integrate(&mut accounts, &pass(&[(11, 1, true)]), (Some(0), 50 * MS));
        // The new process 11 started at 90 ms.
        let reused = pass(&[(11, 90 * MS, true)]);
        integrate(&mut accounts, &reused, (Some(50 * MS), 100 * MS));
        assert_eq!(busy_ms(&accounts, 11), vec![10], "only the new process");
    }
}
