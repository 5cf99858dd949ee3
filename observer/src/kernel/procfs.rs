//! The few facts the daemon reads from /proc: whether a process or thread
//! still exists, and which syscall a thread is blocked in. A process that
//! vanishes mid-read is simply "not alive", never an error.
use std::path::Path;

/// The shapes of wait syscalls (see `WAIT_SYSCALLS` in probes.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitKind {
    Accept,
    Select,
    Poll,
    Epoll,
}

#[cfg(target_arch = "x86_64")]
fn wait_kind(nr: i64) -> Option<WaitKind> {
    Some(match nr {
        43 | 288 => WaitKind::Accept,
        23 | 270 => WaitKind::Select,
        7 | 271 => WaitKind::Poll,
        232 | 281 | 441 => WaitKind::Epoll,
        _ => return None,
    })
}

#[cfg(target_arch = "aarch64")]
fn wait_kind(nr: i64) -> Option<WaitKind> {
    Some(match nr {
        202 | 242 => WaitKind::Accept,
        72 => WaitKind::Select,
        73 => WaitKind::Poll,
        22 | 441 => WaitKind::Epoll,
        _ => return None,
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn wait_kind(_nr: i64) -> Option<WaitKind> {
    None
}

/// The syscall a thread is blocked in, with its arguments, from
/// /proc/PID/task/TID/syscall ("NR arg0 … arg5 sp pc"; "running" or "-1 …"
/// when it is not in a syscall).
fn blocked_syscall(tgid: u32, tid: u32) -> Option<(i64, [u64; 6])> {
    parse_syscall_line(&std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall")).ok()?)
}

/// Parses a /proc/PID/task/TID/syscall line: the syscall number and its six
/// arguments, or `None` ("running", "-1 …", or anything malformed).
pub fn parse_syscall_line(text: &str) -> Option<(i64, [u64; 6])> {
    let mut fields = text.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for arg in args.iter_mut() {
        *arg = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

/// Reads `len` bytes of process memory at `addr` (root reads any process's).
fn read_memory(tgid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(format!("/proc/{tgid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

/// Whether the thread is blocked waiting for new work now: in a wait
/// syscall on one of `listen`/`epoll` fds (the same test the kernel side
/// makes on entry). With `None` fds, any wait syscall counts.
pub fn waits_for_work(tgid: u32, tid: u32, fds: Option<(&[i32], &[i32])>) -> bool {
    let Some((nr, args)) = blocked_syscall(tgid, tid) else {
        return false;
    };
    let Some(kind) = wait_kind(nr) else {
        return false;
    };
    let Some((listen, epoll)) = fds else {
        return true;
    };
    let listen: Vec<i32> = listen.iter().copied().filter(|fd| *fd >= 0).collect();
    match kind {
        WaitKind::Accept => listen.contains(&(args[0] as i32)),
        WaitKind::Epoll => epoll.contains(&(args[0] as i32)),
        WaitKind::Select => listen.iter().any(|fd| {
            let (fd, nfds, readfds) = (*fd as u64, args[0], args[1]);
            fd < nfds
                && readfds != 0
                && read_memory(tgid, readfds + fd / 64 * 8, 8)
                    .and_then(|b| b.try_into().ok())
                    .is_some_and(|word: [u8; 8]| u64::from_ne_bytes(word) & (1 << (fd % 64)) != 0)
        }),
        WaitKind::Poll => {
            let entries = args[1].min(64) as usize;
            read_memory(tgid, args[0], entries * 8).is_some_and(|bytes| {
                bytes.chunks_exact(8).any(|pollfd| {
                    listen.contains(&i32::from_ne_bytes([
                        pollfd[0], pollfd[1], pollfd[2], pollfd[3],
                    ]))
                })
            })
        }
    }
}

/// Whether a process (by its id in the initial PID namespace) still exists.
pub fn process_is_alive(tgid: u32) -> bool {
    Path::new("/proc").join(tgid.to_string()).exists()
}

pub fn thread_is_alive(tgid: u32, tid: u32) -> bool {
    Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// The epoll fds of process `tgid` whose interest list contains one of
/// `listen_fds` (from /proc/PID/fdinfo/N, whose "tfd:" lines name the fds an
/// epoll instance watches).
pub fn epolls_watching(tgid: u32, listen_fds: &[i32]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{tgid}/fd")) else {
        return vec![];
    };
    let mut epolls = Vec::new();
    for entry in dir.flatten() {
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]");
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_epoll {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}")).unwrap_or_default();
        let watches_listener = info
            .lines()
            .filter_map(|l| l.strip_prefix("tfd:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<i32>().ok())
            .any(|watched| listen_fds.contains(&watched));
        if watches_listener {
            epolls.push(fd);
        }
    }
    epolls
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
    fn syscall_lines_parse_or_are_rejected() {
        let line = "232 0x4 0x7ffe437f97cc 0x80 0xffffffff 0x0 0x0 0x7ffe437f9790 0x7f0a1b2c3d4e";
        assert_eq!(
            parse_syscall_line(line),
            Some((232, [4, 0x7ffe437f97cc, 0x80, 0xffffffff, 0, 0]))
        );
        assert_eq!(parse_syscall_line("running"), None);
        assert_eq!(parse_syscall_line("-1 0x7ffe 0x7f0a"), None);
        assert_eq!(parse_syscall_line(""), None);
    }

    #[test]
    fn this_process_is_alive_and_running_not_waiting() {
        let pid = std::process::id();
        assert!(process_is_alive(pid));
        assert!(thread_is_alive(pid, pid));
        assert!(!process_is_alive(u32::MAX));
    }
}
