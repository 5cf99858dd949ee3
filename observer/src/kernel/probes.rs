//! Loads observer's eBPF programs, attaches the accept source, and reads what
//! they counted. The only module that talks to aya.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use super::{iter::IterLink, kretprobe::TracefsKretprobe};
use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, PerCpuArray},
    programs::{BtfTracePoint, FExit, Iter, KProbe, ProgramError, TracePoint},
};
use observer_common::{
    AcceptKey, AcceptStats, DISCARD_SITES_UNCOUNTED, DiscardSites, HEALTH_SLOTS, Health,
    ListenerRecord, WorkerFds,
};

use super::{
    holders::{self, RawWalk},
    iter,
    offsets::KernelLayout,
    procfs,
};

/// The compiled programs, built by build.rs from observer-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// Where accepted connections are seen (see observer-ebpf's `accept.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceptSource {
    /// The best source that loads on this kernel: fexit, then kprobe, then tracepoint.
    Auto,
    /// fexit on `inet_csk_accept` (BTF kernels ≥ 5.17 that allow tracing programs).
    Fexit,
    /// kretprobe on `inet_csk_accept` (kernels with CONFIG_KPROBES).
    Kprobe,
    /// `syscalls/sys_exit_accept4` and `sys_exit_accept` tracepoints (misses io_uring accepts).
    Tracepoint,
}

/// What `Auto` tries, in order.
const SOURCES_BEST_FIRST: [AcceptSource; 3] = [
    AcceptSource::Fexit,
    AcceptSource::Kprobe,
    AcceptSource::Tracepoint,
];

/// The kernel function the fexit and kprobe sources hook.
const ACCEPT_FUNCTION: &str = "inet_csk_accept";

impl AcceptSource {
    pub fn name(self) -> &'static str {
        match self {
            AcceptSource::Auto => "auto",
            AcceptSource::Fexit => "fexit",
            AcceptSource::Kprobe => "kprobe",
            AcceptSource::Tracepoint => "tracepoint",
        }
    }

    /// The eBPF program that counts accepts for this source.
    fn program(self) -> &'static str {
        match self {
            AcceptSource::Fexit => "accept_fexit",
            AcceptSource::Kprobe => "accept_kretprobe",
            AcceptSource::Tracepoint | AcceptSource::Auto => "accept_exit",
        }
    }

    /// The eBPF program that stamps Unix-domain connects for this source.
    fn connect_program(self) -> Option<&'static str> {
        match self {
            AcceptSource::Fexit => Some("connect_unix_fexit"),
            AcceptSource::Kprobe => None,
            AcceptSource::Tracepoint | AcceptSource::Auto => Some("connect_exit"),
        }
    }
}

/// What [`Probes::walks`] read, each with the seconds it took.
pub struct Walks {
    pub holders: (Result<RawWalk>, f64),
    pub listeners: Option<(Result<Vec<ListenerRecord>>, f64)>,
}

/// `iter/tcp`'s records (its program ends the walk after the listeners).
fn read_listeners(link: &IterLink) -> Result<Vec<ListenerRecord>> {
    Ok(parse_records(&link.read_until_stopped()?))
}

/// The holder walk's records, read on one CPU (the walk keeps a process's
/// inherited count per CPU: a read that moved would split it).
fn read_holders(link: &IterLink) -> Result<RawWalk> {
    let bytes = iter::on_one_cpu(|| link.read())?;
    Ok(holders::parse(&bytes))
}

/// `f`'s result, and the seconds it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = std::time::Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

/// What one of observer's programs cost, since it was loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_seconds: f64,
}

/// Turns the kernel's BPF run-time statistics on for as long as the
/// returned fd is held.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        anyhow!("turning BPF run-time statistics on (BPF_ENABLE_STATS, Linux 5.8+): {e}")
    })
}

/// A program that could not be attached but was not essential.
#[derive(Clone, Debug)]
pub struct AttachError {
    pub program: &'static str,
    pub message: String,
}

pub struct Probes {
    ebpf: Ebpf,
    /// `iter/tcp`: listeners of the daemon's network namespace.
    listeners: IterLink,
    /// `iter/task_file`: every process's listeners and accepted connections.
    holders: IterLink,
    /// `iter.s/task`: threads of watched workers; `Err` says why this kernel
    /// cannot run it (busy/idle is then not exported).
    threads: Result<IterLink, String>,
    pub accept_source: AcceptSource,
    /// Whether a program stamps Unix-domain connects, which timing their
    /// queue wait needs (see [`attach_unix_connect`]).
    pub unix_waits_timed: bool,
    /// Whether the segments listeners discard without losing a connection
    /// are counted (`listen_discards` on `kfree_skb`), so that their drops
    /// are real ones; `Err` says why not (then the drops of a listener with
    /// TCP_DEFER_ACCEPT are not exported).
    pub listen_discards: Result<(), String>,
    /// Non-fatal load/attach failures, exported as metrics.
    pub attach_errors: Vec<AttachError>,
    /// The kprobe source's kretprobe (detached and removed on drop).
    kretprobe: Option<TracefsKretprobe>,
    /// What the daemon wrote to `LISTEN_PORTS`, `WATCHED` and
    /// `WATCHED_MASTERS` (nothing else
    /// writes them), so that each collection writes only what changed.
    listen_ports: HashMirror<u64, u8>,
    watched: HashMirror<u32, WorkerFds>,
    watched_masters: HashMirror<u32, WorkerFds>,
}

/// One readable line for a program error; the verifier log goes to debug level.
fn describe(program: &str, err: ProgramError) -> anyhow::Error {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            log::debug!("verifier log for {program}:\n{verifier_log}");
            anyhow!(
                "the kernel refused to load eBPF program {program}: {io_error} (rerun with \
                 --verbose for the verifier log)"
            )
        }
        other => anyhow!("eBPF program {program}: {other}"),
    }
}

impl Probes {
    /// Loads the programs with this kernel's struct offsets and attaches the
    /// accept source. `btf_path` is the kernel BTF the offsets came from.
    /// With `trace`, accepted connections are also streamed to the `EVENTS`
    /// ring buffer (see [`Probes::take_events`]).
    pub fn load(
        layout: &KernelLayout,
        btf_path: &Path,
        requested: AcceptSource,
        trace: bool,
    ) -> Result<Self> {
        let trace_flag = trace as u8;
        let btf = Btf::parse_file(btf_path, Endianness::default())
            .with_context(|| format!("reading kernel BTF from {}", btf_path.display()))?;
        let sites = discard_sites(layout);
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", &layout.offsets, true)
            .override_global("TRACE", &trace_flag, true)
            .override_global(
                "DISCARD_SITES",
                sites.as_ref().unwrap_or(&DiscardSites::default()),
                true,
            )
            .load(OBJECT)
            .map_err(|e| match e {
                aya::EbpfError::MapError(m) => anyhow!("creating eBPF maps failed: {m}"),
                other => anyhow!("loading the eBPF object failed: {other}"),
            })?;
        let mut attach_errors = Vec::new();
        let AttachedSource {
            source: accept_source,
            kretprobe,
        } = attach_accept_source(&mut ebpf, &btf, requested, &mut attach_errors)?;
        let unix_waits_timed = match attach_unix_connect(&mut ebpf, &btf, accept_source) {
            Ok(timed) => timed,
            Err(e) => {
                attach_errors.push(AttachError {
                    program: accept_source.connect_program().unwrap_or_default(),
                    message: format!("{e:#}: {UNIX_WAITS_UNTIMED}"),
                });
                false
            }
        };
        let listen_discards = sites.and_then(|_| {
            attach_listen_discards(&mut ebpf, &btf).map_err(|e| {
                format!("{e:#} (counting them needs kfree_skb's rx_sk argument: Linux 6.11+)")
            })
        });
        let listeners = load_iterator(&mut ebpf, &btf, "listeners", "tcp")?;
        let holders = load_iterator(&mut ebpf, &btf, "holders", "task_file")?;
        let threads = load_iterator(&mut ebpf, &btf, "threads", "task").map_err(|e| {
            format!(
                "{e:#} (the thread sampler needs a sleepable task iterator, \
                 bpf_task_pt_regs and bpf_copy_from_user_task: Linux 5.18+)"
            )
        });
        Ok(Probes {
            ebpf,
            listeners,
            holders,
            threads,
            accept_source,
            unix_waits_timed,
            listen_discards,
            attach_errors,
            kretprobe,
            listen_ports: HashMirror::default(),
            watched: HashMirror::default(),
            watched_masters: HashMirror::default(),
        })
    }

    /// Every listening TCP socket of the daemon's network namespace, right
    /// now (`iter/tcp` is limited to it; see `holders` for the others).
    pub fn listeners(&self) -> Result<Vec<ListenerRecord>> {
        read_listeners(&self.listeners)
    }

    /// Every process's listening sockets and its accepted connections of the
    /// ports in `LISTEN_PORTS`, right now.
    pub fn holders(&self) -> Result<RawWalk> {
        read_holders(&self.holders)
    }

    /// The holder walk ([`Probes::holders`]) and, on a second thread beside
    /// it, the `iter/tcp` walk ([`Probes::listeners`]) when `tcp`, then
    /// `beside`: work that needs neither walk. A collection then waits for
    /// the longer of the two threads, not for their sum. Each walk comes
    /// with its own seconds.
    pub fn walks<T: Send>(
        &self,
        tcp: bool,
        beside: impl FnOnce() -> T + Send,
    ) -> (Walks, Result<T>) {
        // The links, not `self`: the second thread needs only its own.
        let (holders, listeners) = (&self.holders, &self.listeners);
        let beside = std::sync::Mutex::new(Some(beside));
        // Run by the second thread, or here when none can be had.
        let second = || {
            let listeners = tcp.then(|| timed(|| read_listeners(listeners)));
            let beside = beside.lock().ok().and_then(|mut job| job.take());
            (listeners, beside.map(|job| job()))
        };
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("collect-beside".into())
                .spawn_scoped(scope, second);
            let holders = timed(|| read_holders(holders));
            let (listeners, beside) = match spawned {
                Ok(thread) => thread.join().unwrap_or((None, None)),
                Err(_) => second(),
            };
            let beside =
                beside.ok_or_else(|| anyhow!("the thread beside the holder walk panicked"));
            (Walks { holders, listeners }, beside)
        })
    }

    /// The thread sampler's iterator (a handle of its own, for the sampler's
    /// thread), or why this kernel cannot run it.
    pub fn thread_sampler(&self) -> Result<IterLink, String> {
        match &self.threads {
            Ok(link) => link.try_clone().map_err(|e| format!("{e:#}")),
            Err(why) => Err(why.clone()),
        }
    }

    /// Makes `LISTEN_PORTS` hold exactly `keys`.
    pub fn set_listen_ports(&mut self, keys: &foldhash::HashSet<u64>) -> Result<()> {
        let wanted = keys.iter().map(|k| (*k, 1u8)).collect();
        self.listen_ports
            .sync(&mut self.ebpf, "LISTEN_PORTS", &wanted)
    }

    /// Makes `WATCHED` hold exactly `fds` (per worker process): the
    /// processes whose threads the sampler reports.
    pub fn set_watched(&mut self, fds: &foldhash::HashMap<u32, WorkerFds>) -> Result<()> {
        self.watched.sync(&mut self.ebpf, "WATCHED", fds)
    }

    /// Makes `WATCHED_MASTERS` hold exactly `fds` (per master of a watched
    /// pool): the processes whose new children the sampler reports.
    pub fn set_watched_masters(&mut self, fds: &foldhash::HashMap<u32, WorkerFds>) -> Result<()> {
        self.watched_masters
            .sync(&mut self.ebpf, "WATCHED_MASTERS", fds)
    }

    /// The ring buffer of accepted connections (trace mode).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("map EVENTS missing")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// Everything the accept program counted, per child address and process.
    pub fn accepts(&self) -> Result<Vec<(AcceptKey, AcceptStats)>> {
        let map: HashMap<_, AcceptKey, AcceptStats> =
            HashMap::try_from(self.ebpf.map("ACCEPTS").context("map ACCEPTS missing")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                // A key deleted while we walk is not an error worth failing a scrape.
                Err(e) => log::debug!("reading ACCEPTS: {e}"),
            }
        }
        Ok(out)
    }

    /// Forgets counted keys (dead processes, closed listeners).
    pub fn forget_accepts(&mut self, keys: &[AcceptKey]) -> Result<()> {
        let mut map: HashMap<_, AcceptKey, AcceptStats> = HashMap::try_from(
            self.ebpf
                .map_mut("ACCEPTS")
                .context("map ACCEPTS missing")?,
        )?;
        for key in keys {
            if let Err(e) = map.remove(key) {
                log::debug!("removing an ACCEPTS key: {e}");
            }
        }
        Ok(())
    }

    /// Times the kernel skipped the accept program: it was already running on
    /// that CPU (the program's `recursion_misses`, 5.12+), or the kretprobe
    /// had no free return slot. Each one is an accept not counted.
    pub fn accept_program_misses(&self) -> u64 {
        let kretprobe_missed = self.kretprobe.as_ref().map_or(0, |k| k.missed());
        let name = self.accept_source.program();
        let Some(Ok(fd)) = self.ebpf.program(name).map(|p| p.fd()) else {
            return kretprobe_missed;
        };
        let fdinfo = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        let recursion_misses = std::fs::read_to_string(fdinfo)
            .ok()
            .and_then(|text| fdinfo_field(&text, "recursion_misses"))
            .unwrap_or(0);
        recursion_misses + kretprobe_missed
    }

    /// Each loaded program's runs and run time, as the kernel counts them
    /// while BPF statistics are on (`kernel.bpf_stats_enabled`, or a
    /// `BPF_ENABLE_STATS` fd held; both counters stay 0 otherwise).
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramCost {
                    program: name.to_owned(),
                    runs: info.run_count(),
                    run_seconds: info.run_time().as_secs_f64(),
                })
            })
            .collect()
    }

    /// Totals of the programs' health counters, indexed by [`Health`].
    pub fn health(&self) -> Result<[u64; HEALTH_SLOTS as usize]> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("HEALTH").context("map HEALTH missing")?)?;
        let mut totals = [0u64; HEALTH_SLOTS as usize];
        for (slot, total) in totals.iter_mut().enumerate() {
            *total = map.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(totals)
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF program {name} missing from the object"))?;
    program.try_into().map_err(|e| describe(name, e))
}

/// The accept source in use, and the kprobe source's kretprobe.
struct AttachedSource {
    source: AcceptSource,
    kretprobe: Option<TracefsKretprobe>,
}

/// Attaches the requested accept source, or with `Auto` the first of
/// [`SOURCES_BEST_FIRST`] that loads (each refusal is logged with the
/// kernel's reason).
fn attach_accept_source(
    ebpf: &mut Ebpf,
    btf: &Btf,
    requested: AcceptSource,
    errors: &mut Vec<AttachError>,
) -> Result<AttachedSource> {
    let candidates = match requested {
        AcceptSource::Auto => SOURCES_BEST_FIRST.to_vec(),
        forced => vec![forced],
    };
    let mut refused = Vec::new();
    for source in candidates {
        match attach_one_source(ebpf, btf, source, errors) {
            Ok(kretprobe) => {
                return Ok(AttachedSource { source, kretprobe });
            }
            Err(e) if requested != AcceptSource::Auto => {
                return Err(e.context(format!(
                    "--accept-source={} cannot be used on this kernel (--accept-source=auto \
                     picks one that can)",
                    source.name()
                )));
            }
            Err(e) => {
                log::info!("accept source {} unavailable: {e:#}", source.name());
                refused.push((source, format!("{e:#}")));
            }
        }
    }
    let reasons = refused
        .iter()
        .map(|(source, why)| format!("{}: {why}", source.name()))
        .collect::<Vec<_>>()
        .join("; ");
    bail!("no accept source works on this kernel ({reasons})")
}

/// Attaches one accept source; the kprobe source returns its kretprobe,
/// which lives as long as the probes.
fn attach_one_source(
    ebpf: &mut Ebpf,
    btf: &Btf,
    source: AcceptSource,
    errors: &mut Vec<AttachError>,
) -> Result<Option<TracefsKretprobe>> {
    let name = source.program();
    match source {
        AcceptSource::Fexit => {
            let fexit: &mut FExit = program(ebpf, name)?;
            fexit
                .load(ACCEPT_FUNCTION, btf)
                .map_err(|e| describe(name, e))
                .context("fexit needs a BTF kernel ≥ 5.17 with BPF trampolines and no LSM veto")?;
            if let Err(e) = fexit.attach() {
                let _ = fexit.unload();
                bail!(
                    "attaching fexit to {ACCEPT_FUNCTION} failed: {:#}",
                    anyhow::Error::from(e)
                );
            }
            if let Err(e) = attach_unix_fexit(ebpf, btf) {
                errors.push(AttachError {
                    program: UNIX_FEXIT_PROGRAM,
                    message: format!("{e:#}: Unix-domain accepts are not counted"),
                });
            }
        }
        AcceptSource::Kprobe => {
            let kprobe: &mut KProbe = program(ebpf, name)?;
            kprobe.load().map_err(|e| describe(name, e))?;
            let attached = kprobe
                .fd()
                .map_err(|e| describe(name, e))
                .and_then(|fd| TracefsKretprobe::attach(ACCEPT_FUNCTION, fd.as_fd()));
            match attached {
                Ok(kretprobe) => {
                    errors.push(AttachError {
                        program: name,
                        message: "Unix-domain accepts are not counted: a kretprobe on \
                                  unix_accept cannot read its new socket, an argument"
                            .into(),
                    });
                    return Ok(Some(kretprobe));
                }
                Err(e) => {
                    let _ = kprobe.unload();
                    return Err(e);
                }
            }
        }
        AcceptSource::Tracepoint | AcceptSource::Auto => {
            let tp: &mut TracePoint = program(ebpf, name)?;
            tp.load().map_err(|e| describe(name, e))?;
            tp.attach("syscalls", "sys_exit_accept4").map_err(|e| {
                anyhow!(
                    "attaching to tracepoint syscalls/sys_exit_accept4 failed ({e}): this \
                     kernel needs CONFIG_FTRACE_SYSCALLS=y for the tracepoint accept source"
                )
            })?;
            // accept(2) is rarer (and absent on some architectures): not fatal.
            if let Err(e) = tp.attach("syscalls", "sys_exit_accept") {
                errors.push(AttachError {
                    program: name,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(None)
}

/// The fexit source's companion: Unix-domain accepts do not pass
/// `inet_csk_accept`, but `unix_accept`.
const UNIX_FEXIT_PROGRAM: &str = "accept_unix_fexit";

/// The kernel functions whose `kfree_skb` events on a listener follow no
/// `sk_drops` increment: its own receive path and the syncookie check (see
/// observer-ebpf's `discards.rs`), and the parts of them a compiler may
/// have split off (`.cold`).
const UNCOUNTED_DISCARD_FUNCTIONS: [&str; DISCARD_SITES_UNCOUNTED] = [
    "tcp_v4_do_rcv",
    "tcp_v6_do_rcv",
    "cookie_v4_check",
    "cookie_v6_check",
    "tcp_v4_do_rcv.cold",
    "tcp_v6_do_rcv.cold",
    "cookie_v4_check.cold",
    "cookie_v6_check.cold",
];

/// Where `listen_discards` looks, for this kernel: `Err` says what it lacks.
/// The IPv6 functions may be missing (IPv6 off, or a module not loaded):
/// no IPv6 segment then reaches a listener; and a `.cold` part exists only
/// where the compiler split one off.
fn discard_sites(layout: &KernelLayout) -> Result<DiscardSites, String> {
    let csum_reason = layout
        .csum_drop_reason
        .ok_or("this kernel names no drop reasons (Linux 5.17+)")?;
    let ranges = procfs::kernel_function_ranges(&UNCOUNTED_DISCARD_FUNCTIONS)?;
    let mut uncounted = [[0; 2]; DISCARD_SITES_UNCOUNTED];
    for (i, (range, name)) in ranges.iter().zip(UNCOUNTED_DISCARD_FUNCTIONS).enumerate() {
        match range {
            Some(range) => uncounted[i] = *range,
            None if name.contains("v6") || name.ends_with(".cold") => {}
            None => return Err(format!("{name} is not in /proc/kallsyms")),
        }
    }
    Ok(DiscardSites {
        uncounted,
        csum_reason,
        _pad: 0,
    })
}

/// `listen_discards` on `tp_btf/kfree_skb`.
fn attach_listen_discards(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    const NAME: &str = "listen_discards";
    let program: &mut BtfTracePoint = program(ebpf, NAME)?;
    program
        .load("kfree_skb", btf)
        .map_err(|e| describe(NAME, e))?;
    program
        .attach()
        .map_err(|e| anyhow!("attaching {NAME} to kfree_skb: {e}"))?;
    Ok(())
}

fn attach_unix_fexit(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let fexit: &mut FExit = program(ebpf, UNIX_FEXIT_PROGRAM)?;
    fexit
        .load("unix_accept", btf)
        .map_err(|e| describe(UNIX_FEXIT_PROGRAM, e))?;
    fexit.attach().context("attaching fexit to unix_accept")?;
    Ok(())
}

/// What an [`AttachError`] of the Unix connect stamp says it costs.
pub const UNIX_WAITS_UNTIMED: &str = "Unix-domain queue waits are not timed";

/// Attaches the program that stamps Unix-domain connects for this accept
/// source (a Unix connection carries no enqueue time of its own); false
/// where the source has none (kprobe: it counts no Unix accepts either).
fn attach_unix_connect(ebpf: &mut Ebpf, btf: &Btf, source: AcceptSource) -> Result<bool> {
    let Some(name) = source.connect_program() else {
        return Ok(false);
    };
    if source == AcceptSource::Fexit {
        let fexit: &mut FExit = program(ebpf, name)?;
        fexit
            .load("unix_stream_connect", btf)
            .map_err(|e| describe(name, e))?;
        fexit
            .attach()
            .context("attaching fexit to unix_stream_connect")?;
    } else {
        let tp: &mut TracePoint = program(ebpf, name)?;
        tp.load().map_err(|e| describe(name, e))?;
        tp.attach("syscalls", "sys_exit_connect")
            .context("attaching to tracepoint syscalls/sys_exit_connect")?;
    }
    Ok(true)
}

/// A userspace copy of a hash map that only the daemon writes: syncing it
/// to a wanted state removes and writes the keys that differ, without
/// reading the kernel map back (10,000 listeners: 20,000 syscalls a scrape
/// saved).
struct HashMirror<K, V> {
    written: foldhash::HashMap<K, V>,
}

impl<K, V> Default for HashMirror<K, V> {
    fn default() -> Self {
        HashMirror {
            written: foldhash::HashMap::default(),
        }
    }
}

impl<K, V> HashMirror<K, V>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    /// Makes the hash map `name` hold exactly `wanted`.
    fn sync(
        &mut self,
        ebpf: &mut Ebpf,
        name: &str,
        wanted: &foldhash::HashMap<K, V>,
    ) -> Result<()> {
        let mut map: HashMap<_, K, V> = HashMap::try_from(
            ebpf.map_mut(name)
                .with_context(|| format!("map {name} missing"))?,
        )?;
        let stale: Vec<K> = (self.written.keys())
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            // ENOENT is fine: the state wanted is "absent".
            let _ = map.remove(&key);
            self.written.remove(&key);
        }
        for (key, value) in wanted {
            if self.written.get(key) == Some(value) {
                continue;
            }
            if let Err(e) = map.insert(key, value, 0) {
                log::debug!("{name}: {e}");
                break;
            }
            self.written.insert(*key, *value);
        }
        Ok(())
    }
}

/// Loads an iterator program for the kernel iterator `target` and links it.
fn load_iterator(ebpf: &mut Ebpf, btf: &Btf, name: &'static str, target: &str) -> Result<IterLink> {
    let iter: &mut Iter = program(ebpf, name)?;
    iter.load(target, btf)
        .map_err(|e| describe(&format!("{name} (iter/{target})"), e))?;
    let fd = iter.fd().map_err(|e| describe(name, e))?;
    IterLink::create(fd.as_fd(), name)
}

/// A numeric `name:\tvalue` line of a /proc fdinfo file.
fn fdinfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
}

/// Splits an iterator's output into fixed-size records; a torn tail is ignored.
///
pub fn parse_records<T: aya::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        // SAFETY: T is Pod (any bit pattern is valid); the chunk has its exact
        // size and read_unaligned copes with any alignment.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) })
        .collect()
}

/// Human names of the health slots, used as metric labels.
pub fn health_name(slot: usize) -> &'static str {
    match slot {
        s if s == Health::AcceptMapFull as usize => "accept_map_full",
        s if s == Health::AcceptReadError as usize => "accept_read_error",
        s if s == Health::TraceEventLost as usize => "trace_event_lost",
        s if s == Health::WaitUnknown as usize => "wait_unknown",
        s if s == Health::HeldConnectionsOverLimit as usize => "held_connections_over_limit",
        _ => "unknown",
    }
}

pub fn ensure_object_sane() -> Result<()> {
    if OBJECT.is_empty() {
        bail!("this observer binary was built without its eBPF programs (AYA_BUILD_SKIP?)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{OBJECT, fdinfo_field};
    use aya_obj::generated::bpf_insn;

    /// The stack a function's code uses, from its instructions: the lowest
    /// address below the frame pointer (r10) that it loads, stores or hands
    /// to a helper (through a register set to r10 plus a constant). A
    /// straight scan, which LLVM's code for helper arguments (`r1 = r10;
    /// r1 += -N` right before the call) allows; it does not follow `-=`,
    /// nor stack pointers spilled and reloaded (LLVM emits neither here).
    fn stack_depth(code: &[bpf_insn]) -> i64 {
        const FP: u8 = 10;
        // Per register: its offset from r10, while it holds one.
        let mut from_fp: [Option<i64>; 11] = [None; 11];
        let mut depth = 0i64;
        for insn in code {
            let (op, dst, src) = (insn.code, insn.dst_reg() as usize, insn.src_reg());
            let class = op & 0x07;
            let base = match class {
                0x01 => Some(src as usize), // LDX: dst = *(src + off)
                0x02 | 0x03 => Some(dst),   // ST, STX: *(dst + off) = ...
                _ => None,
            };
            if let Some(base) = base.filter(|b| *b < from_fp.len()) {
                let at = if base == FP as usize {
                    Some(0)
                } else {
                    from_fp[base]
                };
                if let Some(at) = at {
                    depth = depth.max(-(at + insn.off as i64));
                }
            }
            match op {
                0xbf if src == FP => from_fp[dst] = Some(0), // r_dst = r10
                0xbf => from_fp[dst] = from_fp.get(src as usize).copied().flatten(),
                0x07 => from_fp[dst] = from_fp[dst].map(|at| at + insn.imm as i64), // += imm
                0x85 => from_fp[..6].fill(None), // a call clobbers r0-r5
                _ if (class == 0x04 || class == 0x07 || class == 0x01 || op == 0x18)
                    && dst < from_fp.len() =>
                {
                    from_fp[dst] = None;
                }
                _ => {}
            }
            for reg in from_fp.iter().flatten() {
                depth = depth.max(-reg);
            }
        }
        depth
    }

    /// Linux 6.1's verifier refuses a program whose call chain's stack is
    /// over 512 bytes, each frame rounded up to 32 (`check_max_stack_depth`):
    /// it refused a holder walk of 488 bytes that calls LLVM's `memset`
    /// (488 → 512, + 32 = 544), which 6.12 loads. CI boots 6.12 only, so the
    /// rule is checked here, for every program, with its deepest callee (one
    /// level: our callees are LLVM's `memset`/`memcpy`, which call nothing).
    #[test]
    fn every_program_fits_the_stack_of_the_oldest_kernel_we_run_on() {
        if OBJECT.is_empty() {
            return; // built without the programs (AYA_BUILD_SKIP)
        }
        let object = aya_obj::Object::parse(OBJECT).expect("our own eBPF object parses");
        let frame = |depth: i64| (depth.max(1) + 31) / 32 * 32;
        let programs: Vec<(usize, u64)> =
            object.programs.values().map(|p| p.function_key()).collect();
        let deepest_callee = object
            .functions
            .iter()
            .filter(|(key, _)| !programs.contains(key))
            .map(|(_, f)| frame(stack_depth(&f.instructions)))
            .max()
            .unwrap_or(0);
        for (name, program) in &object.programs {
            let code = &object.functions[&program.function_key()].instructions;
            let calls = code.iter().any(|i| i.code == 0x85 && i.src_reg() == 1);
            let own = stack_depth(code);
            let chain = frame(own) + if calls { deepest_callee } else { 0 };
            assert!(
                chain <= 512,
                "{name}: {own} bytes of stack (+ {deepest_callee} for a call) is {chain} > 512: 6.1 refuses it"
            );
        }
    }

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        let text = "prog_type:\t26\nrun_cnt:\t0\nrecursion_misses:\t7\nverified_insns:\t312\n";
        assert_eq!(fdinfo_field(text, "recursion_misses"), Some(7));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(0));
        assert_eq!(fdinfo_field(text, "missing"), None);
    }
}
