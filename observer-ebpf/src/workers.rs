//! Busy/idle of worker threads. A tracked thread is idle while it waits for
//! new work in accept/accept4/select/pselect6/poll/ppoll/epoll_wait/
//! epoll_pwait/epoll_pwait2, and busy otherwise.
//!
//! These tracepoints fire for every process on the host, so the programs do
//! one map lookup by thread id and return at once for untracked threads.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use observer_common::{Health, REGISTERED_BY_ACCEPT, WorkerThread};

use crate::maps::{WORKERS, count_health};

/// `syscalls/sys_enter_<wait syscall>`: a tracked thread starts waiting.
#[tracepoint]
pub fn wait_enter(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(worker) = WORKERS.get_ptr_mut(&tid) {
        // SAFETY: a live map value, written only by this thread.
        unsafe { start_waiting(worker) };
    }
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
    if let Some(worker) = WORKERS.get_ptr_mut(&tid) {
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
    if let Some(worker) = WORKERS.get_ptr_mut(&tid) {
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
    if WORKERS.insert(&tid, &worker, BPF_NOEXIST as u64).is_err() && WORKERS.get_ptr(&tid).is_none()
    {
        count_health(Health::WorkerMapFull);
    }
}
