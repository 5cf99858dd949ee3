//! Busy/idle of worker threads. A tracked thread is idle while it waits for
//! new work: in accept/accept4 on its listener, in select/pselect6/poll/ppoll
//! with its listener in the set, or in epoll_wait/epoll_pwait/epoll_pwait2 on
//! an epoll instance that watches its listener. Busy otherwise, including
//! while it waits on anything else (a database socket, a sleep).
//!
//! These tracepoints fire for every process on the host, so the programs do
//! one map lookup by thread id and return at once for untracked threads.
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use observer_common::{Health, REGISTERED_BY_ACCEPT, WORKER_FD_SLOTS, WorkerFds, WorkerThread};

use crate::maps::{WORKER_FDS, WORKERS, count_health};

/// Offset of a sys_enter_* event's first argument; each takes 8 bytes.
const SYS_ENTER_ARG0: usize = 16;

/// Most pollfd entries looked at in a poll()/ppoll() call.
const POLL_FDS_CHECKED: u64 = 8;

/// Argument `n` of a sys_enter_* event, by a direct context load (the
/// verifier allows constant-offset loads from a tracepoint's record, and
/// they cost no helper call).
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: sys_enter_* records hold six 8-byte arguments from offset 16.
    unsafe {
        core::ptr::read_volatile(
            (ctx.as_ptr() as *const u8).add(SYS_ENTER_ARG0 + 8 * n) as *const u64
        )
    }
}

/// The current thread, if tracked, starts waiting when `waits_on_work`
/// says the call waits on one of its process's work fds. Without known fds
/// (the daemon has not scanned the process yet) any wait counts. Untracked
/// threads (every other process on the host) cost one lookup: the syscall's
/// arguments are read only for tracked ones.
#[inline(always)]
fn enter_wait(waits_on_work: impl Fn(&WorkerFds) -> bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(worker) = WORKERS.get_ptr_mut(pid_tgid as u32) else {
        return;
    };
    let waits = match WORKER_FDS.get_ptr((pid_tgid >> 32) as u32) {
        // SAFETY: a live map value, only read.
        Some(fds) => waits_on_work(unsafe { &*fds }),
        None => true,
    };
    if waits {
        // SAFETY: a live map value, written only by this thread.
        unsafe { start_waiting(worker) };
    }
}

#[inline(always)]
fn is_one_of(fd: i64, set: &[i32; WORKER_FD_SLOTS]) -> bool {
    fd >= 0 && set.iter().any(|f| *f as i64 == fd)
}

/// `sys_enter_accept`, `sys_enter_accept4`: waits on the listener passed.
#[tracepoint]
pub fn wait_enter_accept(ctx: TracePointContext) -> u32 {
    enter_wait(|fds| is_one_of(arg(&ctx, 0) as i32 as i64, &fds.listen));
    0
}

/// `sys_enter_select`, `sys_enter_pselect6`: waits on a listener whose bit
/// is set in the read set.
#[tracepoint]
pub fn wait_enter_select(ctx: TracePointContext) -> u32 {
    enter_wait(|fds| {
        let (nfds, readfds) = (arg(&ctx, 0) as i32 as i64, arg(&ctx, 1));
        readfds != 0
            && fds.listen.iter().any(|fd| {
                let fd = *fd as i64;
                if fd < 0 || fd >= nfds {
                    return false;
                }
                let word = readfds + (fd as u64 / 64) * 8;
                // SAFETY: reading the caller's fd_set; a bad pointer fails cleanly.
                let bits = unsafe { bpf_probe_read_user(word as *const u64) }.unwrap_or(0);
                bits & (1u64 << (fd as u64 % 64)) != 0
            })
    });
    0
}

/// `sys_enter_poll`, `sys_enter_ppoll`: waits on a listener among the first
/// pollfd entries.
#[tracepoint]
pub fn wait_enter_poll(ctx: TracePointContext) -> u32 {
    enter_wait(|fds| {
        let (pollfds, nfds) = (arg(&ctx, 0), arg(&ctx, 1));
        let mut i = 0;
        while i < POLL_FDS_CHECKED && i < nfds {
            // struct pollfd { int fd; short events; short revents; }: 8 bytes.
            // SAFETY: reading the caller's pollfd array; a bad pointer fails cleanly.
            let fd = unsafe { bpf_probe_read_user((pollfds + i * 8) as *const i32) }.unwrap_or(-1);
            if is_one_of(fd as i64, &fds.listen) {
                return true;
            }
            i += 1;
        }
        false
    });
    0
}

/// `sys_enter_epoll_wait`, `epoll_pwait`, `epoll_pwait2`: waits on an epoll
/// instance that watches a listener.
#[tracepoint]
pub fn wait_enter_epoll(ctx: TracePointContext) -> u32 {
    enter_wait(|fds| is_one_of(arg(&ctx, 0) as i32 as i64, &fds.epoll));
    0
}

/// `syscalls/sys_exit_<wait syscall>` (accept's exit is in `accept.rs`).
#[tracepoint]
pub fn wait_exit(_ctx: TracePointContext) -> u32 {
    stop_waiting_current();
    0
}

/// The current thread, if tracked, is busy from now on.
#[inline(always)]
pub fn stop_waiting_current() {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(worker) = WORKERS.get_ptr_mut(tid) {
        // SAFETY: a live map value, written only by this thread.
        unsafe { stop_waiting(worker) };
    }
}

/// # Safety
/// `w` must point to a live `WORKERS` value of the current thread.
#[inline(always)]
unsafe fn start_waiting(w: *mut WorkerThread) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if (*w).waiting == 0 {
            let now = bpf_ktime_get_ns(); // SAFETY: helper without arguments.
            (*w).busy_ns += now.saturating_sub((*w).since_ns);
            (*w).waiting = 1;
            (*w).since_ns = now;
        }
    }
}

/// # Safety
/// `w` must point to a live `WORKERS` value of the current thread.
#[inline(always)]
unsafe fn stop_waiting(w: *mut WorkerThread) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if (*w).waiting != 0 {
            (*w).waiting = 0;
            (*w).since_ns = bpf_ktime_get_ns();
        }
    }
}

/// Tracks the current thread as an acceptor (it just accepted a TCP
/// connection, so it is busy now).
#[inline(always)]
pub fn track_acceptor(tgid: u32) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(worker) = WORKERS.get_ptr_mut(tid) {
        // SAFETY: a live map value, written only by this thread.
        unsafe { (*worker).registered_by = REGISTERED_BY_ACCEPT };
        return;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let worker = WorkerThread {
        tgid,
        waiting: 0,
        since_ns: now,
        busy_ns: 0,
        registered_by: REGISTERED_BY_ACCEPT,
        _pad: 0,
    };
    if WORKERS.insert(tid, worker, BPF_NOEXIST as u64).is_err() && WORKERS.get_ptr(tid).is_none() {
        count_health(Health::WorkerMapFull);
    }
}
