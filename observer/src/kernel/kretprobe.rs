//! The kprobe accept source's kretprobe, made through tracefs.
//!
//! A kretprobe needs one return slot per call in flight, and a thread blocked
//! inside `inet_csk_accept` holds its slot while it waits. aya attaches
//! kretprobes through the perf PMU, which gives them the kernel's default,
//! max(10, 2 × possible CPUs) slots: a pool with more threads blocked in
//! accept than that would lose the rest of its accepts, and nothing would say
//! so. Through tracefs the kretprobe gets [`MAX_ACTIVE`] slots (the kernel's
//! most), and `kprobe_profile` counts any return it still misses.
use std::{
    io::Write as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result};

const TRACEFS: &str = "/sys/kernel/tracing";
/// KRETPROBE_MAXACTIVE_MAX in the kernel.
const MAX_ACTIVE: u32 = 4096;
/// tracefs group of our events; each daemon's event is `accept_<pid>`.
const GROUP: &str = "observer";

const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `sizeof(struct perf_event_attr)` as of PERF_ATTR_SIZE_VER5 (4.1+).
const PERF_ATTR_SIZE: usize = 112;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IOW('$', 8, __u32)`
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// `_IO('$', 0)`
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// A kretprobe on a kernel function that runs a BPF program; removed on drop.
pub struct TracefsKretprobe {
    event: String,
    /// The perf event the program is attached to; `None` once closed.
    perf: Option<OwnedFd>,
}

impl TracefsKretprobe {
    /// Creates `observer/accept_<pid>` on `function`'s return and attaches
    /// `program` (a loaded kprobe-type program) to it.
    pub fn attach(function: &str, program: BorrowedFd<'_>) -> Result<Self> {
        remove_stale_events();
        let event = format!("accept_{}", std::process::id());
        write_kprobe_events(&format!("r{MAX_ACTIVE}:{GROUP}/{event} {function}"))
            .with_context(|| format!("creating a kretprobe on {function}"))?;
        let mut probe = TracefsKretprobe { event, perf: None };
        let id_path = format!("{TRACEFS}/events/{GROUP}/{}/id", probe.event);
        let id: u64 = std::fs::read_to_string(&id_path)
            .with_context(|| format!("reading {id_path}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {id_path}"))?;
        let perf = open_tracepoint_event(id)?;
        for (request, arg, what) in [
            (
                PERF_EVENT_IOC_SET_BPF,
                program.as_raw_fd() as libc::c_ulong,
                "attaching the program",
            ),
            (PERF_EVENT_IOC_ENABLE, 0, "enabling the kretprobe"),
        ] {
            // SAFETY: a perf event fd we own and a request that takes an int.
            if unsafe { libc::ioctl(perf.as_raw_fd(), request, arg) } != 0 {
                return Err(std::io::Error::last_os_error()).context(what);
            }
        }
        probe.perf = Some(perf);
        Ok(probe)
    }

    /// Returns the kretprobe could not hook (no slot free), from
    /// `kprobe_profile`; each one is an accept not counted.
    pub fn missed(&self) -> u64 {
        std::fs::read_to_string(format!("{TRACEFS}/kprobe_profile"))
            .ok()
            .and_then(|profile| profile_missed(&profile, &self.event))
            .unwrap_or(0)
    }
}

impl Drop for TracefsKretprobe {
    fn drop(&mut self) {
        // Detach first: an event with a perf user cannot be removed.
        drop(self.perf.take());
        if let Err(e) = write_kprobe_events(&format!("-:{GROUP}/{}", self.event)) {
            log::warn!("removing kprobe event {GROUP}/{}: {e:#}", self.event);
        }
    }
}

/// `perf_event_open` of a tracefs event, for every process, on CPU 0 (a
/// BPF program attached to it runs on every CPU).
fn open_tracepoint_event(id: u64) -> Result<OwnedFd> {
    let mut attr = [0u8; PERF_ATTR_SIZE];
    attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&(PERF_ATTR_SIZE as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: attr is a zeroed perf_event_attr of the size it declares;
    // pid -1 / cpu 0 / no group is a valid combination.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("perf_event_open on the kretprobe");
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn write_kprobe_events(line: &str) -> Result<()> {
    let path = format!("{TRACEFS}/kprobe_events");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {path} (needs tracefs and CONFIG_KPROBE_EVENTS)"))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("writing `{line}` to {path}"))
}

/// Removes events left by daemons that died without cleaning up (kill -9).
/// Such an event has no program and is disabled, so it costs nothing.
fn remove_stale_events() {
    let Ok(events) = std::fs::read_to_string(format!("{TRACEFS}/kprobe_events")) else {
        return;
    };
    for pid in stale_event_pids(&events) {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = write_kprobe_events(&format!("-:{GROUP}/accept_{pid}"));
        }
    }
}

/// PIDs in our events' names, from `kprobe_events` lines such as
/// `r4096:observer/accept_1234 inet_csk_accept`.
fn stale_event_pids(events: &str) -> Vec<u32> {
    events
        .lines()
        .filter_map(|line| {
            let name = line.split_whitespace().next()?.split_once(':')?.1;
            name.strip_prefix(GROUP)?
                .strip_prefix("/accept_")?
                .parse()
                .ok()
        })
        .collect()
}

/// The miss count of `event` in `kprobe_profile` ("name hits misses").
fn profile_missed(profile: &str, event: &str) -> Option<u64> {
    profile.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == event).then(|| words.nth(1)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_events_are_found_by_pid_and_others_ignored() {
        let events = "r4096:observer/accept_1234 inet_csk_accept\n\
                      p:kprobes/other do_sys_open\n\
                      r4096:observer/accept_x inet_csk_accept\n";
        assert_eq!(stale_event_pids(events), [1234]);
    }

    #[test]
    fn misses_are_read_from_the_profile_line_of_the_event() {
        let profile = "  accept_77                                   120               3\n\
                       \x20 accept_78                                     5               0\n";
        assert_eq!(profile_missed(profile, "accept_77"), Some(3));
        assert_eq!(profile_missed(profile, "accept_78"), Some(0));
        assert_eq!(profile_missed(profile, "accept_79"), None);
    }
}
