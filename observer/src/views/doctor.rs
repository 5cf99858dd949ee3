//! `observer doctor`: what this host provides, each check on one line with
//! what its absence costs, and an exit status that says whether `serve` can
//! run. The programs are loaded (and unloaded) for real: nothing is assumed.
use anyhow::Result;

use crate::{
    kernel::{
        host::{self, Lockdown},
        offsets::{self, KernelLayout},
        probes::{AcceptSource, Probes, UNIX_WAITS_UNTIMED},
    },
    pipeline::{KernelOptions, SamplerChoice, ThreadReader, thread_reader},
};

#[derive(Clone, Debug, clap::Args)]
pub struct DoctorOptions {
    #[command(flatten)]
    pub kernel: KernelOptions,
}

/// One check: its name, whether `serve` needs it, and what was found.
struct Check {
    name: &'static str,
    required: bool,
    result: Result<String, String>,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn checks(opts: &DoctorOptions) -> Vec<Check> {
    let mut checks = vec![Check {
        name: "kernel",
        required: false,
        result: Ok(kernel_release()),
    }];
    let layout = offsets::from_kernel(&opts.kernel.btf);
    checks.push(Check {
        name: "BTF",
        required: true,
        result: match &layout {
            Ok(_) => Ok(format!(
                "{}: every struct field observer reads is there",
                opts.kernel.btf.display()
            )),
            Err(e) => Err(format!("{e:#}")),
        },
    });
    checks.push(Check {
        name: "lockdown",
        required: true,
        result: match host::lockdown() {
            Lockdown::Mode(mode) if mode == "confidentiality" => {
                Err("confidentiality: eBPF may not read kernel memory".into())
            }
            Lockdown::Mode(mode) => Ok(format!("{mode} (eBPF kernel reads allowed)")),
            Lockdown::NoLsm => Ok("none (the kernel has no lockdown LSM)".into()),
            Lockdown::Unknown(why) => Ok(format!(
                "unknown: securityfs is not mounted here and mounting it failed ({why}); \
                 mount the host's /sys/kernel/security read-only to know (programs are \
                 loaded below either way)"
            )),
        },
    });
    checks.push(Check {
        name: "privileges",
        required: true,
        result: match host::missing_capabilities() {
            Ok(missing) if missing.is_empty() => Ok(format!(
                "CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH{}",
                match host::missing_optional_capabilities() {
                    Ok(optional) if optional.is_empty() => ", CAP_SYSLOG".into(),
                    Ok(optional) => optional
                        .iter()
                        .map(|(cap, why)| format!("; without {cap} ({why})"))
                        .collect::<String>(),
                    Err(_) => String::new(),
                }
            )),
            Ok(missing) => Err(missing
                .iter()
                .map(|(cap, why)| format!("missing {cap} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")),
            Err(e) => Err(format!("{e:#}")),
        },
    });
    checks.push(Check {
        name: "tracefs",
        required: true,
        result: host::ensure_tracefs()
            .map(|mounted| {
                if mounted {
                    "mounted it now".into()
                } else {
                    "mounted".into()
                }
            })
            .map_err(|e| format!("{e:#}")),
    });
    let seccomp_blocks_bpf = host::seccomp_blocks_bpf();
    checks.push(Check {
        name: "seccomp",
        required: true,
        result: if seccomp_blocks_bpf {
            Err(host::SECCOMP_BLOCKS_BPF.into())
        } else {
            Ok("bpf() is allowed".into())
        },
    });
    let privileged = checks
        .iter()
        .any(|c| c.name == "privileges" && c.result.is_ok())
        && !seccomp_blocks_bpf;
    if let (Ok(layout), true) = (&layout, privileged) {
        checks.extend(program_checks(layout, opts));
    }
    checks
}

/// Each accept source loaded and attached for real, on its own, with what
/// its absence costs; then the "programs" check, taken from the load of the
/// source `serve` would use (the first that loads, or the forced one). Each
/// load includes the trace ring buffer's code, a superset of what `serve`
/// loads.
fn program_checks(layout: &KernelLayout, opts: &DoctorOptions) -> Vec<Check> {
    let sources = [
        (
            AcceptSource::Fexit,
            "the next source that loads is used instead",
        ),
        (
            AcceptSource::Kprobe,
            "tracepoint is used if fexit is refused too (then io_uring accepts are missed)",
        ),
        (AcceptSource::Tracepoint, "the last fallback"),
    ];
    let requested = opts.kernel.accept_source;
    let mut checks = Vec::new();
    let mut serve_would_load = None;
    let mut sampler = None;
    let mut unix = None;
    let mut drops = None;
    for (source, fallback) in sources {
        let loaded = Probes::load(layout, &opts.kernel.btf, source, true);
        let used_by_serve = match requested {
            AcceptSource::Auto => serve_would_load.is_none() && loaded.is_ok(),
            forced => forced == source,
        };
        if used_by_serve {
            serve_would_load = Some(programs_summary(&loaded));
            sampler = loaded
                .as_ref()
                .ok()
                .map(|probes| sampler_check(probes, opts.kernel.thread_sampler));
            unix = loaded.as_ref().ok().map(unix_check);
            drops = loaded.as_ref().ok().map(drops_check);
        }
        checks.push(Check {
            name: source.name(),
            required: false,
            result: match loaded {
                Ok(_) => Ok(format!(
                    "accept source {} loads and attaches",
                    source.name()
                )),
                // The chain under the "--accept-source=… cannot be used" line.
                Err(e) => Err(format!("{} — {fallback}", reason(&e))),
            },
        });
    }
    checks.push(Check {
        name: "programs",
        required: true,
        result: serve_would_load
            .unwrap_or_else(|| Err("no accept source loads on this kernel (lines above)".into())),
    });
    checks.extend(sampler.map(|result| Check {
        name: "sampler",
        required: false,
        result,
    }));
    checks.extend(unix.map(|result| Check {
        name: "unix",
        required: false,
        result,
    }));
    checks.extend(drops.map(|result| Check {
        name: "drops",
        required: false,
        result,
    }));
    checks
}

/// Whether TCP listeners' drops are real ones on this kernel: `sk_drops`
/// also counts segments discarded without a connection lost (one bare ACK
/// per handshake under TCP_DEFER_ACCEPT: Apache's default, nginx
/// `deferred`).
fn drops_check(probes: &Probes) -> Result<String, String> {
    match &probes.listen_discards {
        Ok(()) => Ok(
            "TCP listen drops are real drops (= ListenDrops): segments a listener \
                      discards without losing a connection (TCP_DEFER_ACCEPT's bare ACKs, \
                      resets of half-open connections) are counted on kfree_skb and left out"
                .into(),
        ),
        Err(why) => Err(format!(
            "the segments listeners discard cannot be told from real drops: {why}; drops \
             are not exported for listeners with TCP_DEFER_ACCEPT (Apache's default \
             AcceptFilter, nginx `deferred`); for the others they are the sockets' sk_drops, \
             which also count resets of half-open connections and an overflowed \
             handshake ACK twice"
        )),
    }
}

/// What observer can tell about Unix-domain listeners with this accept
/// source, and what the kernel never lets it tell.
fn unix_check(probes: &Probes) -> Result<String, String> {
    const NEVER: &str = "no drops for them on any kernel (a full Unix queue makes clients \
                         wait in connect() or fail with EAGAIN, counted nowhere)";
    let lost: Vec<&str> = probes
        .attach_errors
        .iter()
        .filter(|e| {
            e.message.contains("Unix-domain accepts are not counted")
                || e.message.contains(UNIX_WAITS_UNTIMED)
        })
        .map(|e| e.message.as_str())
        .collect();
    if !lost.is_empty() {
        return Err(format!("{}; {NEVER}", lost.join("; ")));
    }
    let waits = if probes.unix_waits_timed {
        "queue waits (each connect() stamped as it returns)"
    } else {
        "no queue waits"
    };
    Ok(format!(
        "Unix-domain listeners: depth, limit, oldest wait, accepts, workers and {waits}; {NEVER}"
    ))
}

/// How worker busy/idle is read here: the BPF sampler (over the watched
/// processes where the kernel can), or its /proc fallback.
fn sampler_check(probes: &Probes, choice: SamplerChoice) -> Result<String, String> {
    const NO_HOOK: &str = "no program on any wait syscall";
    match thread_reader(choice, probes.thread_sampler()) {
        Ok(ThreadReader::Proc {
            instead_of_bpf: None,
        }) => Ok(format!(
            "worker busy/idle is read from /proc and the workers' memory \
             (--collector.workers.sampler proc): {NO_HOOK}; it costs more CPU per watched \
             thread than the BPF sampler"
        )),
        Ok(ThreadReader::Bpf(link)) => {
            let reads = match link.for_process(std::process::id()) {
                Ok(_) => "the watched processes' threads, one task iterator each \
                          (every thread on the host where that is cheaper)"
                    .to_owned(),
                Err(e) => format!(
                    "every thread on the host at each pass: this kernel has no task \
                     iterator over one process ({e}; Linux 6.1+), so a host with many \
                     threads stretches the sampling interval"
                ),
            };
            Ok(format!(
                "worker busy/idle is read by a thread sampler (iter.s/task): {NO_HOOK}; \
                 it reads {reads}"
            ))
        }
        Err(why) => Err(format!(
            "{why} — --collector.workers.sampler bpf cannot run here; proc (or auto) can"
        )),
        Ok(ThreadReader::Proc {
            instead_of_bpf: Some(why),
        }) => Ok(format!(
            "worker busy/idle is read from /proc and the workers' memory: {NO_HOOK}; \
             the BPF sampler cannot run here ({why}), and /proc costs more CPU per \
             watched thread"
        )),
    }
}

/// The "programs" line for one load of every program.
fn programs_summary(loaded: &Result<Probes>) -> Result<String, String> {
    match loaded {
        Ok(probes) if probes.attach_errors.is_empty() => Ok(format!(
            "all load and attach: accept source {}, iter/tcp, iter/task_file, ring buffer",
            probes.accept_source.name()
        )),
        Ok(probes) => Ok(format!(
            "load: accept source {}, with {} attach point(s) missing (non-fatal): {}",
            probes.accept_source.name(),
            probes.attach_errors.len(),
            probes
                .attach_errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// An error's causes without its outermost context, when it has any
/// (never empty: an error without causes is its own reason).
fn reason(e: &anyhow::Error) -> String {
    let causes: Vec<String> = e.chain().map(ToString::to_string).collect();
    let skip = usize::from(causes.len() > 1);
    let reason = causes[skip..].join(": ");
    if reason.trim().is_empty() {
        format!("{e:#}")
    } else {
        reason
    }
}

pub fn run(opts: DoctorOptions) -> Result<()> {
    let checks = checks(&opts);
    let mut can_serve = true;
    for c in &checks {
        let (mark, detail) = match &c.result {
            Ok(detail) => ("ok  ", detail),
            Err(detail) if c.required => ("FAIL", detail),
            Err(detail) => ("warn", detail),
        };
        can_serve &= c.result.is_ok() || !c.required;
        println!("{mark} {:<11} {detail}", c.name);
    }
    let ran_programs = checks.iter().any(|c| c.name == "programs");
    if can_serve && ran_programs {
        println!("observer serve can run on this host");
        Ok(())
    } else {
        anyhow::bail!("observer serve cannot run on this host: fix the FAIL lines above")
    }
}
