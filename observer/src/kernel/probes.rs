//! Loads observer's eBPF programs, attaches the accept source, and reads what
//! they counted. The only module that talks to aya.
use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use super::kretprobe::TracefsKretprobe;
use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, PerCpuArray},
    programs::{FExit, Iter, KProbe, ProgramError, TracePoint},
};
use observer_common::{
    AcceptKey, AcceptStats, HEALTH_SLOTS, Health, HolderRecord, KernelOffsets, ListenerRecord,
    WorkerFds, WorkerThread,
};

/// Syscalls in which a worker may wait for new work, with the program that
/// checks, on entry, whether the call waits on one of the worker's listeners.
/// Leaving any of them makes a tracked thread busy.
const WAIT_SYSCALLS: &[(&str, &str)] = &[
    ("accept", "wait_enter_accept"),
    ("accept4", "wait_enter_accept"),
    ("select", "wait_enter_select"),
    ("pselect6", "wait_enter_select"),
    ("poll", "wait_enter_poll"),
    ("ppoll", "wait_enter_poll"),
    ("epoll_wait", "wait_enter_epoll"),
    ("epoll_pwait", "wait_enter_epoll"),
    ("epoll_pwait2", "wait_enter_epoll"),
];

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
}

/// A program that could not be attached but was not essential.
#[derive(Clone, Debug)]
pub struct AttachError {
    pub program: &'static str,
    pub message: String,
}

pub struct Probes {
    ebpf: Ebpf,
    /// Whether the last `set_listen_ports` changed the map.
    listen_ports_changed: bool,
    pub accept_source: AcceptSource,
    /// Non-fatal load/attach failures, exported as metrics.
    pub attach_errors: Vec<AttachError>,
    /// The kprobe source's kretprobe (detached and removed on drop).
    kretprobe: Option<TracefsKretprobe>,
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
        offsets: &KernelOffsets,
        btf_path: &Path,
        requested: AcceptSource,
        trace: bool,
    ) -> Result<Self> {
        let trace_flag = trace as u8;
        let btf = Btf::parse_file(btf_path, Endianness::default())
            .with_context(|| format!("reading kernel BTF from {}", btf_path.display()))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", offsets, true)
            .override_global("TRACE", &trace_flag, true)
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
        attach_wait_programs(&mut ebpf, accept_source, &mut attach_errors)?;
        let iter: &mut Iter = program(&mut ebpf, "listeners")?;
        iter.load("tcp", &btf)
            .map_err(|e| describe("listeners (iter/tcp)", e))?;
        let iter: &mut Iter = program(&mut ebpf, "holders")?;
        iter.load("task_file", &btf)
            .map_err(|e| describe("holders (iter/task_file)", e))?;
        Ok(Probes {
            ebpf,
            listen_ports_changed: false,
            accept_source,
            attach_errors,
            kretprobe,
        })
    }

    /// Runs one of the iterator programs and returns what it wrote.
    fn run_iterator(&mut self, name: &str) -> Result<Vec<u8>> {
        let iter: &mut Iter = program(&mut self.ebpf, name)?;
        let link_id = iter.attach().map_err(|e| describe(name, e))?;
        let link = iter.take_link(link_id).map_err(|e| describe(name, e))?;
        let mut file = link
            .into_file()
            .with_context(|| format!("opening the {name} iterator"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading the {name} iterator"))?;
        Ok(bytes)
    }

    /// Every listening TCP socket of the daemon's network namespace, right
    /// now (`iter/tcp` is limited to it; see `holders` for the others).
    pub fn listeners(&mut self) -> Result<Vec<ListenerRecord>> {
        Ok(parse_records(&self.run_iterator("listeners")?))
    }

    /// Every process's listening sockets and its accepted connections of the
    /// ports in `LISTEN_PORTS`, right now.
    pub fn holders(&mut self) -> Result<Vec<HolderRecord>> {
        Ok(parse_records(&self.run_iterator("holders")?))
    }

    /// Makes `LISTEN_PORTS` hold exactly `keys`.
    pub fn set_listen_ports(&mut self, keys: &std::collections::HashSet<u64>) -> Result<()> {
        let wanted = keys.iter().map(|k| (*k, 1u8)).collect();
        self.listen_ports_changed = sync_map(&mut self.ebpf, "LISTEN_PORTS", &wanted)?;
        Ok(())
    }

    /// Whether the last `set_listen_ports` added or removed ports.
    pub fn listen_ports_changed(&self) -> bool {
        self.listen_ports_changed
    }

    /// Tracked worker threads by thread id.
    pub fn worker_threads(&self) -> Result<Vec<(u32, WorkerThread)>> {
        let map: HashMap<_, u32, WorkerThread> =
            HashMap::try_from(self.ebpf.map("WORKERS").context("map WORKERS missing")?)?;
        Ok(map.iter().filter_map(|e| e.ok()).collect())
    }

    /// One tracked thread's entry now.
    pub fn worker_thread(&self, tid: u32) -> Option<WorkerThread> {
        let map: HashMap<_, u32, WorkerThread> =
            HashMap::try_from(self.ebpf.map("WORKERS")?).ok()?;
        map.get(&tid, 0).ok()
    }

    /// Starts tracking threads (unless the kernel side already does).
    pub fn track_threads(&mut self, threads: &[(u32, WorkerThread)]) -> Result<()> {
        const BPF_NOEXIST: u64 = 1;
        self.write_threads(threads, BPF_NOEXIST)
    }

    /// Writes `WORKERS` entries with the given BPF_* update flag.
    fn write_threads(&mut self, threads: &[(u32, WorkerThread)], flag: u64) -> Result<()> {
        let mut map: HashMap<_, u32, WorkerThread> = HashMap::try_from(
            self.ebpf
                .map_mut("WORKERS")
                .context("map WORKERS missing")?,
        )?;
        for (tid, thread) in threads {
            if let Err(e) = map.insert(tid, thread, flag) {
                log::debug!("WORKERS entry of thread {tid}: {e}");
            }
        }
        Ok(())
    }

    /// Makes `WORKER_FDS` hold exactly `fds` (per worker process).
    pub fn set_worker_fds(
        &mut self,
        fds: &std::collections::HashMap<u32, WorkerFds>,
    ) -> Result<()> {
        sync_map(&mut self.ebpf, "WORKER_FDS", fds).map(|_| ())
    }

    /// Overwrites the state of tracked threads (only for threads blocked in
    /// a syscall, which do not write their own entry meanwhile).
    pub fn update_threads(&mut self, threads: &[(u32, WorkerThread)]) -> Result<()> {
        const BPF_EXIST: u64 = 2;
        self.write_threads(threads, BPF_EXIST)
    }

    /// Stops tracking threads.
    pub fn forget_threads(&mut self, tids: &[u32]) -> Result<()> {
        let mut map: HashMap<_, u32, WorkerThread> = HashMap::try_from(
            self.ebpf
                .map_mut("WORKERS")
                .context("map WORKERS missing")?,
        )?;
        for tid in tids {
            let _ = map.remove(tid);
        }
        Ok(())
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
        }
        AcceptSource::Kprobe => {
            let kprobe: &mut KProbe = program(ebpf, name)?;
            kprobe.load().map_err(|e| describe(name, e))?;
            let attached = kprobe
                .fd()
                .map_err(|e| describe(name, e))
                .and_then(|fd| TracefsKretprobe::attach(ACCEPT_FUNCTION, fd.as_fd()));
            match attached {
                Ok(kretprobe) => return Ok(Some(kretprobe)),
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

/// Makes the hash map `name` hold exactly `wanted`: other keys are removed,
/// wanted ones written. Returns whether the set of keys changed.
fn sync_map<K, V>(
    ebpf: &mut Ebpf,
    name: &str,
    wanted: &std::collections::HashMap<K, V>,
) -> Result<bool>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let mut map: HashMap<_, K, V> = HashMap::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("map {name} missing"))?,
    )?;
    let present: std::collections::HashMap<K, V> = map.iter().filter_map(|e| e.ok()).collect();
    let stale: Vec<&K> = present.keys().filter(|k| !wanted.contains_key(k)).collect();
    let changed = !stale.is_empty() || wanted.keys().any(|k| !present.contains_key(k));
    for key in stale {
        let _ = map.remove(key);
    }
    for (key, value) in wanted.iter().filter(|(k, v)| present.get(k) != Some(v)) {
        if let Err(e) = map.insert(key, value, 0) {
            log::debug!("{name}: {e}");
            break;
        }
    }
    Ok(changed)
}

/// Attaches the idle/busy programs to every wait syscall this kernel has.
/// Leaving accept makes a thread busy: the tracepoint accept source does that
/// itself; with the others, `wait_exit` is attached there too.
fn attach_wait_programs(
    ebpf: &mut Ebpf,
    accept_source: AcceptSource,
    errors: &mut Vec<AttachError>,
) -> Result<()> {
    let enter_programs = [
        "wait_enter_accept",
        "wait_enter_select",
        "wait_enter_poll",
        "wait_enter_epoll",
    ];
    for name in enter_programs.into_iter().chain(["wait_exit"]) {
        let tp: &mut TracePoint = program(ebpf, name)?;
        tp.load().map_err(|e| describe(name, e))?;
    }
    for (syscall, enter) in WAIT_SYSCALLS {
        let mut attach = |name: &'static str, tracepoint: String| -> Result<()> {
            let tp: &mut TracePoint = program(ebpf, name)?;
            if let Err(e) = tp.attach("syscalls", &tracepoint) {
                errors.push(AttachError {
                    program: name,
                    message: format!("syscalls/{tracepoint}: {e}"),
                });
            }
            Ok(())
        };
        attach(enter, format!("sys_enter_{syscall}"))?;
        if !syscall.starts_with("accept") || accept_source != AcceptSource::Tracepoint {
            attach("wait_exit", format!("sys_exit_{syscall}"))?;
        }
    }
    Ok(())
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
        s if s == Health::WorkerMapFull as usize => "worker_map_full",
        s if s == Health::TraceEventLost as usize => "trace_event_lost",
        s if s == Health::WaitUnknown as usize => "wait_unknown",
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
    use super::fdinfo_field;

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        let text = "prog_type:\t26\nrun_cnt:\t0\nrecursion_misses:\t7\nverified_insns:\t312\n";
        assert_eq!(fdinfo_field(text, "recursion_misses"), Some(7));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(0));
        assert_eq!(fdinfo_field(text, "missing"), None);
    }
}
