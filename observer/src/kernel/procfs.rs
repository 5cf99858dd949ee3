//! The few facts the daemon reads from /proc: whether a process or thread
//! still exists, and which syscall a thread is blocked in. A process that
//! vanishes mid-read is simply "not alive", never an error.
use std::path::Path;

/// Wait syscalls (see `WAIT_SYSCALLS` in probes.rs) by number, per arch.
#[cfg(target_arch = "x86_64")]
const WAIT_SYSCALL_NUMBERS: &[i64] = &[43, 288, 23, 270, 7, 271, 232, 281, 441];
#[cfg(target_arch = "aarch64")]
const WAIT_SYSCALL_NUMBERS: &[i64] = &[202, 242, 72, 73, 22, 441];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const WAIT_SYSCALL_NUMBERS: &[i64] = &[];

/// Whether a process (by its id in the initial PID namespace) still exists.
pub fn process_is_alive(tgid: u32) -> bool {
    Path::new("/proc").join(tgid.to_string()).exists()
}

pub fn thread_is_alive(tgid: u32, tid: u32) -> bool {
    Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// Whether the thread is blocked in a wait syscall now (from
/// /proc/PID/task/TID/syscall: "NR args…", "running", or "-1 …").
pub fn waits_for_work(tgid: u32, tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|nr| nr.parse::<i64>().ok())
        })
        .is_some_and(|nr| WAIT_SYSCALL_NUMBERS.contains(&nr))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_running_not_waiting() {
        let pid = std::process::id();
        assert!(process_is_alive(pid));
        assert!(thread_is_alive(pid, pid));
        assert!(!process_is_alive(u32::MAX));
    }
}
