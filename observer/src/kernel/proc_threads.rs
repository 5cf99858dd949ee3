//! The thread sampler's reads where the kernel cannot run its BPF program
//! (no sleepable task iterator, `bpf_task_pt_regs` or
//! `bpf_copy_from_user_task`: Linux before 5.18). The same facts, from
//! /proc and the workers' memory, as [`ThreadSample`]s for the same rule
//! (`activity.rs`):
//! - the syscall a thread is blocked in and its arguments:
//!   `/proc/PID/task/TID/syscall` ("running" while it runs);
//! - the process's start: `/proc/PID/stat`;
//! - the few bytes of its memory that say what the wait is on (the
//!   `select` bits of its listeners, the first `poll` fds, a futex's word):
//!   `process_vm_readv`;
//! - whether an epoll instance watches a listener now: the instance's
//!   `/proc/PID/fdinfo/FD` (one `tfd:` line per watched fd).
//!
//! Reading another process's syscall and memory needs CAP_SYS_PTRACE,
//! which the daemon holds. A process or thread that exits mid-read is left
//! out of the pass.
use observer_common::{
    EPOLL_UNCHECKED, EPOLL_WATCHES_LISTENER, EPOLL_WATCHES_NO_LISTENER, POLLED_FDS,
    SYS_EPOLL_PWAIT, SYS_EPOLL_PWAIT2, SYS_EPOLL_WAIT, SYS_FUTEX, SYS_POLL, SYS_PPOLL,
    SYS_PSELECT6, SYS_SELECT, ThreadSample, WorkerFds,
};

use crate::activity::WatchedSet;

use super::procfs;

/// Reads watched workers' threads from /proc.
pub struct ProcThreads {
    /// Nanoseconds per clock tick (`/proc/PID/stat`'s start time unit).
    tick_ns: u64,
}

impl Default for ProcThreads {
    fn default() -> Self {
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ProcThreads {
            tick_ns: 1_000_000_000 / hz.max(1) as u64,
        }
    }
}

impl ProcThreads {
    /// One sample per thread of the watched workers and of the watched
    /// masters' other children (a pool's new workers), as the BPF sampler
    /// writes them.
    pub fn samples(&self, watched: &WatchedSet) -> Vec<ThreadSample> {
        let mut samples = Vec::new();
        for (&pid, worker) in &watched.workers {
            self.process(pid, 0, &worker.fds, &mut samples);
        }
        for (&master, of_master) in &watched.masters {
            for child in procfs::children(master).unwrap_or_default() {
                if !watched.workers.contains_key(&child) {
                    self.process(child, master, &of_master.fds, &mut samples);
                }
            }
        }
        samples
    }

    fn process(&self, pid: u32, master_tgid: u32, fds: &WorkerFds, out: &mut Vec<ThreadSample>) {
        let Some(start_ticks) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_start_ticks(&stat))
        else {
            return;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for tid in tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
        {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
            else {
                continue;
            };
            let mut sample = ThreadSample {
                tgid: pid,
                tid,
                master_tgid,
                start_ns: start_ticks * self.tick_ns,
                polled_fds: [-1; POLLED_FDS],
                ..Default::default()
            };
            match parse_syscall(&text) {
                Some(InSyscall::Blocked { nr, args }) => {
                    sample.state = 1;
                    sample.syscall = nr;
                    sample.args = args;
                    read_wait_details(&mut sample, fds);
                }
                // Running, or runnable outside a syscall: busy, as a
                // thread on a CPU is to the BPF sampler.
                Some(InSyscall::No) | None => sample.syscall = -1,
            }
            out.push(sample);
        }
    }
}

/// What `/proc/PID/task/TID/syscall` says of a thread.
#[derive(Debug, PartialEq)]
enum InSyscall {
    /// Blocked in syscall `nr` with these first four arguments.
    Blocked { nr: i64, args: [u64; 4] },
    /// Running, or stopped outside a syscall (`-1 sp pc`).
    No,
}

/// `nr arg1 … arg6 sp pc` (numbers in hex after the first), `-1 sp pc`,
/// or `running`.
fn parse_syscall(text: &str) -> Option<InSyscall> {
    let mut words = text.split_ascii_whitespace();
    let first = words.next()?;
    if first == "running" {
        return Some(InSyscall::No);
    }
    let nr: i64 = first.parse().ok()?;
    if nr < 0 {
        return Some(InSyscall::No);
    }
    let mut args = [0u64; 4];
    for arg in &mut args {
        let word = words.next()?;
        *arg = u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()?;
    }
    Some(InSyscall::Blocked { nr, args })
}

/// Field 22 of `/proc/PID/stat` (start time, clock ticks since boot); the
/// fields are counted after the command name's closing parenthesis, as the
/// name itself may hold spaces and parentheses.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // After the name: field 3 (state) is the first; field 22 the 20th.
    after_name.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// What a blocked select/poll waits on, a futex's word, and whether an
/// epoll instance watches a listener now (`read_wait_details` of the BPF
/// sampler).
fn read_wait_details(sample: &mut ThreadSample, fds: &WorkerFds) {
    let [a0, a1, _, _] = sample.args;
    let pid = sample.tgid;
    let ok = match sample.syscall {
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 => {
            sample.epoll_listeners = epoll_listeners(pid, fds, a0);
            true
        }
        SYS_SELECT | SYS_PSELECT6 => select_hits(sample, fds, a0, a1),
        SYS_POLL | SYS_PPOLL => poll_fds(sample, a0, a1),
        SYS_FUTEX => match read_user::<4>(pid, a0) {
            Some(word) => {
                sample.futex_word = u32::from_ne_bytes(word);
                true
            }
            None => false,
        },
        _ => true,
    };
    sample.user_read_failed = !ok as u32;
}

/// select(nfds, readfds, …): which of the process's listeners are in the set.
fn select_hits(sample: &mut ThreadSample, fds: &WorkerFds, nfds: u64, readfds: u64) -> bool {
    if readfds == 0 {
        return true;
    }
    let mut found = 0;
    for fd in fds.listen {
        if fd < 0 || fd as u64 >= nfds {
            continue;
        }
        let Some(word) = read_user::<8>(sample.tgid, readfds + (fd as u64 / 64) * 8) else {
            return false;
        };
        if u64::from_ne_bytes(word) & (1u64 << (fd as u64 % 64)) != 0 && found < POLLED_FDS {
            sample.polled_fds[found] = fd;
            found += 1;
        }
    }
    true
}

/// poll(fds, nfds, …): the fds of its first [`POLLED_FDS`] entries.
fn poll_fds(sample: &mut ThreadSample, pollfds: u64, nfds: u64) -> bool {
    // struct pollfd { int fd; short events; short revents; }: 8 bytes each.
    let entries = (nfds as usize).min(POLLED_FDS);
    if entries == 0 {
        return true;
    }
    let Some(bytes) = read_user::<{ POLLED_FDS * 8 }>(sample.tgid, pollfds) else {
        // Fewer entries than we asked for may end the mapping: ask for them alone.
        return (0..entries).all(
            |i| match read_user::<4>(sample.tgid, pollfds + i as u64 * 8) {
                Some(fd) => {
                    sample.polled_fds[i] = i32::from_ne_bytes(fd);
                    true
                }
                None => false,
            },
        );
    };
    for (i, entry) in bytes.chunks_exact(8).take(entries).enumerate() {
        sample.polled_fds[i] = i32::from_ne_bytes([entry[0], entry[1], entry[2], entry[3]]);
    }
    true
}

/// Whether the epoll instance at `epfd` watches one of the process's
/// listeners now, from its fdinfo.
fn epoll_listeners(pid: u32, fds: &WorkerFds, epfd: u64) -> u32 {
    let listeners: Vec<i32> = fds.listen.iter().copied().filter(|fd| *fd >= 0).collect();
    if listeners.is_empty() {
        return EPOLL_UNCHECKED;
    }
    let Ok(fdinfo) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}")) else {
        return EPOLL_UNCHECKED;
    };
    if epoll_targets(&fdinfo).any(|fd| listeners.contains(&fd)) {
        EPOLL_WATCHES_LISTENER
    } else {
        EPOLL_WATCHES_NO_LISTENER
    }
}

/// The fds an epoll instance watches: its fdinfo's `tfd:` lines.
fn epoll_targets(fdinfo: &str) -> impl Iterator<Item = i32> + '_ {
    fdinfo.lines().filter_map(|line| {
        line.strip_prefix("tfd:")?
            .split_ascii_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `N` bytes at `addr` in process `pid`'s memory (`process_vm_readv`).
fn read_user<const N: usize>(pid: u32, addr: u64) -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    let local = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: N,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: N,
    };
    // SAFETY: the kernel writes at most N bytes into our own buffer and
    // checks the remote range itself (EFAULT, ESRCH, EPERM).
    let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
    (n == N as isize).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_thread_s_syscall_line_gives_its_number_and_first_arguments() {
        let line = "43 0x3 0x7ffd2a3c 0x7ffd2a38 0x80800 0x0 0x0 0x7ffd2a10 0x7f3c1a2b\n";
        assert_eq!(
            parse_syscall(line),
            Some(InSyscall::Blocked {
                nr: 43,
                args: [3, 0x7ffd2a3c, 0x7ffd2a38, 0x80800]
            })
        );
    }

    #[test]
    fn a_running_thread_or_one_outside_a_syscall_is_in_none() {
        assert_eq!(parse_syscall("running\n"), Some(InSyscall::No));
        assert_eq!(
            parse_syscall("-1 0x7ffd2a10 0x55d1c0de\n"),
            Some(InSyscall::No)
        );
        assert_eq!(parse_syscall(""), None);
        assert_eq!(parse_syscall("7 0x1"), None, "a torn line");
    }

    #[test]
    fn the_start_time_is_counted_after_the_name_even_with_spaces_and_parentheses() {
        let stat = "4242 (gunicorn: (worker) x) S 4241 4241 4241 0 -1 4194560 1 0 0 0 0 0 0 0 \
                    20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        assert_eq!(parse_start_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn an_epoll_instance_s_fdinfo_lists_the_fds_it_watches() {
        let fdinfo = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
                      tfd:        5 events:       19 data:                5  pos:0 ino:2a1b sdev:8\n\
                      tfd:       12 events: 80000019 data:                c  pos:0 ino:2a1f sdev:8\n";
        assert_eq!(epoll_targets(fdinfo).collect::<Vec<_>>(), [5, 12]);
        assert_eq!(epoll_targets("pos:\t0\n").count(), 0);
    }

    #[test]
    fn own_memory_is_read_back_and_an_unmapped_address_is_none() {
        let word: u64 = 0x0123_4567_89ab_cdef;
        let read = read_user::<8>(std::process::id(), &word as *const u64 as u64);
        assert_eq!(read.map(u64::from_ne_bytes), Some(word));
        assert_eq!(read_user::<8>(std::process::id(), 8), None);
    }
}
