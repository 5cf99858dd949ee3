//! The few facts the daemon reads from /proc: which processes exist,
//! which epoll instances watch a listener, who holds a file lock,
//! and for `explain` a process's scheduler state, the daemon's network
//! namespace and `net.core.somaxconn`. A process that vanishes mid-read is simply "not alive", never an
//! error.

use foldhash::HashSet;

/// The file open as `fd` in process `pid`.
pub fn file_id(pid: u32, fd: u32) -> Option<crate::activity::FileId> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
    Some(crate::activity::FileId { ino: meta.ino() })
}

/// The fds open in process `pid` (none if it is gone).
pub fn open_fds(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// Processes' open fds, as /proc lists them.
pub struct Fds;

impl super::holders::ProcessFds for Fds {
    fn open_fds(&self, pid: u32) -> Vec<u32> {
        open_fds(pid)
    }

    fn inode_at(&self, pid: u32, fd: u32) -> Option<u64> {
        file_id(pid, fd).map(|file| file.ino)
    }
}

/// The processes holding a lock (flock, POSIX or OFD) on `file`.
pub fn lock_holders(file: crate::activity::FileId) -> Vec<u32> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_proc_locks(&text)
        .into_iter()
        .filter(|l| !l.waiting && l.ino == file.ino)
        .filter_map(|l| l.pid)
        .collect()
}

/// One line of /proc/locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockLine {
    /// A `->` line: a process blocked waiting for the lock.
    pub waiting: bool,
    /// The process (none for OFD locks, shown as -1).
    pub pid: Option<u32>,
    pub ino: u64,
}

/// Parses /proc/locks ("1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF",
/// waiters as "1: -> FLOCK …"); malformed lines are skipped.
pub fn parse_proc_locks(text: &str) -> Vec<LockLine> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1).peekable();
            let waiting = fields.next_if_eq(&"->").is_some();
            let mut fields = fields.skip(3); // class, mode, access
            let pid = fields.next()?.parse::<i64>().ok()?;
            // MAJOR:MINOR:INODE, the device in hex.
            let ino = fields.next()?.rsplit(':').next()?.parse().ok()?;
            Some(LockLine {
                waiting,
                pid: u32::try_from(pid).ok(),
                ino,
            })
        })
        .collect()
}

/// The processes that exist now (their ids in the daemon's PID namespace),
/// from one listing of /proc: a few `getdents` calls for the whole host,
/// where a lookup per process would cost a path walk each (2,000 of them
/// were 4 ms of a scrape). Empty when /proc cannot be listed.
pub fn live_processes() -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashSet::default();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// The epoll fds of process `tgid` whose interest list contains one of
/// `listen_fds` (from /proc/PID/fdinfo/N, whose "tfd:" lines name the fds an
/// epoll instance watches). The fds in `listen_fds` are sockets, so their
/// links are not read: a process holding 10,000 listeners costs a directory
/// listing, not 10,000 readlinks.
pub fn epolls_watching(tgid: u32, listen_fds: &[i32]) -> Vec<i32> {
    let sockets: HashSet<i32> = listen_fds.iter().copied().collect();
    let mut epolls = Vec::new();
    for fd in open_fds(tgid).into_iter().map(|fd| fd as i32) {
        if sockets.contains(&fd) {
            continue;
        }
        let is_epoll = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}"))
            .is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}")).unwrap_or_default();
        let watches_listener = info
            .lines()
            .filter_map(|l| l.strip_prefix("tfd:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<i32>().ok())
            .any(|watched| sockets.contains(&watched));
        if watches_listener {
            epolls.push(fd);
        }
    }
    epolls
}

/// The scheduler state of a process (`/proc/PID/stat`, after the name).
pub fn process_state(pid: u32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ")?.1.chars().next())
        .unwrap_or('?')
}

/// The daemon's network namespace (inode).
pub fn own_netns() -> Option<u32> {
    let link = std::fs::read_link("/proc/self/ns/net").ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `net.core.somaxconn` of the namespace this thread is in.
pub fn somaxconn() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The code ranges `[start, end)` of kernel functions `names`, from
/// /proc/kallsyms (`None` for one this kernel lacks); `Err` where the file
/// hides addresses (`kernel.kptr_restrict`, or not root).
pub fn kernel_function_ranges(names: &[&str]) -> Result<Vec<Option<[u64; 2]>>, String> {
    let text = std::fs::read_to_string("/proc/kallsyms")
        .map_err(|e| format!("/proc/kallsyms is not readable: {e}"))?;
    function_ranges(&text, names)
}

/// [`kernel_function_ranges`] on the file's text: a function ends where
/// the next text symbol starts.
pub fn function_ranges(kallsyms: &str, names: &[&str]) -> Result<Vec<Option<[u64; 2]>>, String> {
    let mut starts = Vec::with_capacity(200_000);
    let mut found = vec![None; names.len()];
    for line in kallsyms.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        starts.push(addr);
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i].get_or_insert(addr);
        }
    }
    if starts.iter().all(|a| *a == 0) {
        return Err(
            "/proc/kallsyms shows no kernel addresses to this process (it needs CAP_SYSLOG, \
             and kernel.kptr_restrict below 2)"
                .into(),
        );
    }
    starts.sort_unstable();
    Ok(found
        .into_iter()
        .map(|start| {
            let start = start?;
            let next = starts.partition_point(|a| *a <= start);
            Some([start, *starts.get(next)?])
        })
        .collect())
}

/// The children of every thread of process `pid`
/// (`/proc/PID/task/TID/children`), or `None` where this kernel does not
/// list them (no `CONFIG_PROC_CHILDREN`) or the process is gone.
pub fn children(pid: u32) -> Option<Vec<u32>> {
    let mut children = Vec::new();
    for tid in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let mut path = tid.path();
        path.push("children");
        // A thread that exited since the listing has no children to give.
        if let Ok(text) = std::fs::read_to_string(&path) {
            children.extend(parse_pids(&text));
        } else if !tid.path().exists() {
            continue;
        } else {
            return None;
        }
    }
    Some(children)
}

/// Space-separated pids (a `children` file).
fn parse_pids(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace().filter_map(|p| p.parse().ok())
}

/// Threads on the host, from `/proc/loadavg` (its fourth field,
/// `running/total`).
pub fn threads_on_host() -> Option<u64> {
    parse_loadavg_threads(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg_threads(text: &str) -> Option<u64> {
    text.split_ascii_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// Whether `kernel.bpf_stats_enabled` is on: the kernel then counts every
/// BPF program's runs and run time.
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The CPU time the calling thread has used, in nanoseconds: what a pass
/// costs the host, whatever else preempts it.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_on_the_host_are_the_fourth_field_of_loadavg() {
        assert_eq!(
            parse_loadavg_threads("0.52 0.58 0.59 2/10113 4242\n"),
            Some(10113)
        );
        assert_eq!(parse_loadavg_threads("0.52 0.58\n"), None);
    }

    #[test]
    fn a_children_file_lists_pids_separated_by_spaces() {
        assert_eq!(
            parse_pids("812 813 9001 ").collect::<Vec<_>>(),
            [812, 813, 9001]
        );
        assert_eq!(parse_pids("").count(), 0);
    }

    #[test]
    fn this_process_children_are_listed_from_proc() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let children = children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            children
                .expect("CONFIG_PROC_CHILDREN")
                .contains(&child.id())
        );
    }

    #[test]
    fn a_function_ends_where_the_next_text_symbol_starts() {
        let kallsyms = "\
ffffffff81a00000 T tcp_v4_do_rcv
ffffffff81a00400 d some_data
ffffffff81a00300 t tcp_v4_fill_cb
ffffffff81a00500 T cookie_v4_check
ffffffffc0001000 t cookie_v6_check\t[ipv6]
";
        let ranges = function_ranges(
            kallsyms,
            &[
                "tcp_v4_do_rcv",
                "cookie_v4_check",
                "cookie_v6_check",
                "absent",
            ],
        )
        .expect("addresses shown");
        assert_eq!(ranges[0], Some([0xffffffff81a00000, 0xffffffff81a00300]));
        assert_eq!(ranges[1], Some([0xffffffff81a00500, 0xffffffffc0001000]));
        // The last text symbol has no end: not a range.
        assert_eq!(ranges[2], None);
        assert_eq!(ranges[3], None);
        let hidden = "0000000000000000 T tcp_v4_do_rcv\n0000000000000000 T cookie_v4_check\n";
        assert!(function_ranges(hidden, &["tcp_v4_do_rcv"]).is_err());
    }

    #[test]
    fn proc_locks_lines_give_holders_and_waiters() {
        // Recorded on 6.18 while Apache children queued on `Mutex fcntl`.
        let text = "1: POSIX  ADVISORY  WRITE 4101 00:1a:6271 0 0\n\
                    1: -> POSIX  ADVISORY  WRITE 4102 00:1a:6271 0 0\n\
                    2: OFDLCK ADVISORY  READ  -1 fd:01:131 0 EOF\n\
                    garbage\n";
        let lines = parse_proc_locks(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            LockLine {
                waiting: false,
                pid: Some(4101),
                ino: 6271
            }
        );
        assert!(lines[1].waiting);
        assert_eq!(lines[1].pid, Some(4102));
        assert_eq!((lines[2].pid, lines[2].ino), (None, 131));
    }

    #[test]
    fn this_process_is_alive() {
        let pid = std::process::id();
        let alive = live_processes();
        assert!(alive.contains(&pid));
        assert!(!alive.contains(&u32::MAX));
    }
}
