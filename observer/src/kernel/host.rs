//! What the host must provide before programs can load: privileges, tracefs,
//! and a lockdown mode that allows reading kernel memory. Each check fails
//! with one line naming the problem and the fix.
use std::path::Path;

use anyhow::{Result, bail};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const TRACEFS: &str = "/sys/kernel/tracing";
const SECURITYFS: &str = "/sys/kernel/security";

/// The effective capability set of this process (CapEff in /proc/self/status).
fn effective_capabilities() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or("0");
    Ok(u64::from_str_radix(hex, 16).unwrap_or(0))
}

/// What the daemon needs, each with what it is for. A requirement is met by
/// any one of its capabilities.
const REQUIREMENTS: &[(&str, &[u32], &str)] = &[
    (
        "CAP_BPF",
        &[CAP_BPF, CAP_SYS_ADMIN],
        "to load eBPF programs",
    ),
    (
        "CAP_PERFMON",
        &[CAP_PERFMON, CAP_SYS_ADMIN],
        "to attach tracepoints and read kernel memory from them",
    ),
    (
        "CAP_SYS_PTRACE",
        &[CAP_SYS_PTRACE],
        "to read, in /proc, which epoll instances of a worker watch its listener",
    ),
    (
        "CAP_DAC_READ_SEARCH",
        &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE],
        "to read tracefs and other users' /proc entries",
    ),
];

/// What the daemon uses where it has it, and does without otherwise (with
/// a `doctor` line saying what that costs).
const OPTIONAL: &[(&str, &[u32], &str)] = &[(
    "CAP_SYSLOG",
    &[CAP_SYSLOG],
    "to read kernel addresses in /proc/kallsyms: telling the bare ACKs a TCP_DEFER_ACCEPT \
     listener discards from real drops",
)];

/// The optional capabilities (with their purpose) that this process lacks.
pub fn missing_optional_capabilities() -> Result<Vec<(&'static str, &'static str)>> {
    missing_of(OPTIONAL)
}

/// The capabilities (with their purpose) that this process lacks.
pub fn missing_capabilities() -> Result<Vec<(&'static str, &'static str)>> {
    missing_of(REQUIREMENTS)
}

/// The entries of `wanted` none of whose capabilities this process has.
fn missing_of(
    wanted: &[(&'static str, &[u32], &'static str)],
) -> Result<Vec<(&'static str, &'static str)>> {
    let caps = effective_capabilities()?;
    Ok(wanted
        .iter()
        .filter(|(_, any_of, _)| !any_of.iter().any(|cap| caps & (1 << cap) != 0))
        .map(|(name, _, why)| (*name, *why))
        .collect())
}

pub fn require_privileges() -> Result<()> {
    let missing = missing_capabilities()?;
    if !missing.is_empty() {
        let needs: Vec<String> = missing
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        bail!(
            "missing privileges: observer needs {}; run it as root (e.g. `sudo observer serve`) or \
             grant those capabilities (see deploy/systemd/observer.service)",
            needs.join(", ")
        );
    }
    Ok(())
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("static mount strings have no NUL");
    let (source, target_c, fstype_c) = (c(fstype), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts tracefs at /sys/kernel/tracing unless it (or the debugfs copy) is there.
/// Returns whether this call mounted it.
pub fn ensure_tracefs() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.get(2) == Some(&"tracefs")
            && matches!(
                fields.get(1),
                Some(&TRACEFS) | Some(&"/sys/kernel/debug/tracing")
            )
    });
    if mounted {
        return Ok(false);
    }
    match mount("tracefs", TRACEFS) {
        Ok(()) => Ok(true),
        Err(e) => bail!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({e}): run \
             `mount -t tracefs tracefs {TRACEFS}` as root, or give observer CAP_SYS_ADMIN"
        ),
    }
}

/// What can be known of the kernel's lockdown mode from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lockdown {
    /// The active mode: "none", "integrity" or "confidentiality".
    Mode(String),
    /// securityfs is mounted and has no `lockdown` file: no lockdown LSM.
    NoLsm,
    /// securityfs is not mounted here (a container, say) and mounting it
    /// failed, with this error.
    Unknown(String),
}

impl Lockdown {
    /// The mode, or "unknown" (for `observer_build_info`).
    pub fn label(&self) -> String {
        match self {
            Lockdown::Mode(mode) => mode.clone(),
            Lockdown::NoLsm => "none".into(),
            Lockdown::Unknown(_) => "unknown".into(),
        }
    }
}

/// Reads the kernel lockdown mode from securityfs, mounting it when it is
/// not mounted (a container without the host's /sys/kernel/security).
pub fn lockdown() -> Lockdown {
    let file = Path::new(SECURITYFS).join("lockdown");
    if !file.exists()
        && !securityfs_mounted()
        && let Err(e) = mount("securityfs", SECURITYFS)
    {
        return Lockdown::Unknown(e.to_string());
    }
    match std::fs::read_to_string(&file) {
        Ok(text) => parse_lockdown(&text).map_or(Lockdown::NoLsm, Lockdown::Mode),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lockdown::NoLsm,
        Err(e) => Lockdown::Unknown(e.to_string()),
    }
}

fn securityfs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("securityfs"))
}

/// The active mode of a securityfs `lockdown` file, in brackets:
/// "none [integrity] confidentiality".
fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_owned())
}

/// Whether a seccomp filter keeps this process from calling bpf(2), as a
/// container runtime's default profile does: the process is filtered
/// (`Seccomp: 2` in /proc/self/status) and a bpf() call that the kernel
/// itself would refuse with EINVAL fails with EPERM or ENOSYS instead.
pub fn seccomp_blocks_bpf() -> bool {
    let filtered = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.strip_prefix("Seccomp:").map(str::trim) == Some("2"));
    if !filtered {
        return false;
    }
    // BPF_MAP_CREATE with an all-zero attribute (map type 0 does not exist).
    let attr = [0u8; 72];
    // SAFETY: the bpf syscall reads `attr`, ours and of the size passed;
    // this call can create nothing (the kernel rejects map type 0).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    rc < 0 && matches!(errno, Some(libc::EPERM) | Some(libc::ENOSYS))
}

pub const SECCOMP_BLOCKS_BPF: &str = "the container's seccomp profile blocks bpf(): run with \
     seccomp=unconfined or a profile that allows bpf, perf_event_open";

pub fn require_bpf_allowed() -> Result<()> {
    if seccomp_blocks_bpf() {
        bail!("{SECCOMP_BLOCKS_BPF}");
    }
    Ok(())
}

pub fn require_lockdown_allows_reads() -> Result<()> {
    if lockdown() == Lockdown::Mode("confidentiality".into()) {
        bail!(
            "kernel lockdown is 'confidentiality', which forbids eBPF programs from reading \
             kernel memory; boot with lockdown=integrity (or none) to use observer"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_active_lockdown_mode_is_the_bracketed_one() {
        // The file lists every mode and brackets the active one; the first
        // is what our 6.18 host reads.
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(
            parse_lockdown("[none] integrity confidentiality\n").as_deref(),
            Some("none")
        );
        assert_eq!(parse_lockdown("").as_deref(), None);
        assert_eq!(Lockdown::Unknown("EPERM".into()).label(), "unknown");
        assert_eq!(Lockdown::NoLsm.label(), "none");
    }
}
