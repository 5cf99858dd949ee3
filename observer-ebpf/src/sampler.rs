//! `iter.s/task`: the thread sampler. The daemon runs this sleepable task
//! iterator many times a second and at each scrape; it visits every thread
//! on the host and, for threads of the worker processes listed in
//! `WATCHED`, writes one [`ThreadSample`]: whether the thread runs, the
//! syscall it is blocked in (from its saved user registers,
//! `bpf_task_pt_regs`), and the few bytes of its memory that say what that
//! wait is on (`bpf_copy_from_user_task`, which needs a sleepable program).
//!
//! This replaces programs on the wait syscalls, which every process on the
//! host paid for on every call: here nothing runs between samples, and a
//! thread of an unwatched process costs one map lookup per pass.
//! Whether a sample means "waiting for work" is decided by the daemon.
use aya_ebpf::{
    bindings::{seq_file, task_struct},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_copy_from_user_task, bpf_seq_write, bpf_task_pt_regs},
    },
};
use core::ffi::c_void;
use observer_common::{
    EPOLL_UNCHECKED, EPOLL_WATCHES_LISTENER, EPOLL_WATCHES_NO_LISTENER, KernelOffsets, POLLED_FDS,
    SYS_EPOLL_PWAIT, SYS_EPOLL_PWAIT2, SYS_EPOLL_WAIT, SYS_FUTEX, SYS_POLL, SYS_PPOLL,
    SYS_PSELECT6, SYS_SELECT, ThreadSample, WorkerFds,
};

use crate::{
    kernel::{fdtable_head, offsets, read, read_ptr, syscall_arg, syscall_nr},
    maps::{WATCHED, WATCHED_MASTERS},
};

/// The deepest an epoll instance's tree of watched files is searched: a
/// red-black tree of 2^16 files is at most 32 deep.
const EPOLL_TREE_DEPTH: usize = 32;

/// Byte offset of `task` in `struct bpf_iter__task` (after `meta`).
const ITER_TASK: usize = 8;

/// # Safety
/// Called by the kernel with a valid `struct bpf_iter__task *`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter.s/task")]
pub unsafe extern "C" fn threads(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx->meta is the first field, and meta->seq the first of bpf_iter_meta.
    let seq: *mut seq_file = unsafe { **(ctx as *const *const *mut seq_file) };
    // The helpers below want the task as the verifier's typed pointer: a
    // direct load from the context. Field reads use a plain-number copy
    // (a probe read), so their arithmetic is not pointer arithmetic.
    // SAFETY: ctx->task sits at this offset; NULL at the end of the walk.
    let task_ptr: *mut task_struct =
        unsafe { core::ptr::read_volatile((ctx as *const u8).add(ITER_TASK) as *const _) };
    if task_ptr.is_null() {
        return 0;
    }
    // SAFETY: reading a field of our own context.
    let task: u64 =
        match unsafe { bpf_probe_read_kernel((ctx as *const u8).add(ITER_TASK) as *const u64) } {
            Ok(t) if t != 0 => t,
            _ => return 0,
        };
    let off = offsets();
    let Some(tgid) = read::<u32>(task, off.task_tgid) else {
        return 0;
    };
    let (fds, master_tgid) = match WATCHED.get_ptr(tgid) {
        Some(fds) => (fds, 0),
        None => {
            // A worker forked since the daemon last looked: its master is.
            let Some(parent) = read_ptr(task, off.task_real_parent) else {
                return 0;
            };
            let Some(master) = read::<u32>(parent, off.task_tgid) else {
                return 0;
            };
            let Some(fds) = WATCHED_MASTERS.get_ptr(master) else {
                return 0;
            };
            (fds, master)
        }
    };
    // SAFETY: a map value of a preallocated map, only read, in place (not
    // copied, to keep the program within 6.1's stack): its memory stays the
    // map's; a value the daemon rewrites meanwhile gives one pass a stale
    // or mixed fd list, which only that pass's reading of this thread uses.
    let fds: &WorkerFds = unsafe { &*fds };
    let mut sample = ThreadSample {
        tgid,
        master_tgid,
        tid: read(task, off.task_pid).unwrap_or(0),
        state: read(task, off.task_state).unwrap_or(0),
        start_ns: read_ptr(task, off.task_group_leader)
            .and_then(|leader| read(leader, off.task_start_time))
            .unwrap_or(0),
        syscall: -1,
        polled_fds: [-1; POLLED_FDS],
        ..Default::default()
    };
    // SAFETY: a trusted task pointer from the iterator's context.
    let regs = unsafe { bpf_task_pt_regs(task_ptr) } as u64;
    if let Some(nr) = syscall_nr(regs, &off) {
        sample.syscall = nr;
        sample.args = [
            syscall_arg(regs, &off, 0).unwrap_or(0),
            syscall_arg(regs, &off, 1).unwrap_or(0),
            syscall_arg(regs, &off, 2).unwrap_or(0),
            syscall_arg(regs, &off, 3).unwrap_or(0),
        ];
    }
    // A running thread's registers are in flux and its wait does not matter.
    if sample.state != 0 {
        read_wait_details(&mut sample, fds, task_ptr, task);
    }
    // SAFETY: `seq` is the iterator's seq_file; the sample lives on our stack.
    unsafe {
        bpf_seq_write(
            seq,
            &sample as *const ThreadSample as *const c_void,
            core::mem::size_of::<ThreadSample>() as u32,
        );
    }
    0
}

/// Reads `T` at `addr` in the task's own memory.
#[inline(always)]
fn read_user<T: Copy + Default>(task: *mut task_struct, addr: u64) -> Option<T> {
    let mut value = T::default();
    // SAFETY: the helper checks the address and fails cleanly; `value` is ours.
    let rc = unsafe {
        bpf_copy_from_user_task(
            &mut value as *mut T as *mut c_void,
            core::mem::size_of::<T>() as u32,
            addr as *const c_void,
            task,
            0,
        )
    };
    (rc == 0).then_some(value)
}

/// What a blocked select/poll waits on, a futex's word, and whether an
/// epoll instance watches a listener now.
#[inline(always)]
fn read_wait_details(
    sample: &mut ThreadSample,
    fds: &WorkerFds,
    task: *mut task_struct,
    task_addr: u64,
) {
    let [a0, a1, _, _] = sample.args;
    let ok = match sample.syscall {
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 => {
            sample.epoll_listeners = epoll_listeners(task_addr, fds, a0);
            true
        }
        SYS_SELECT | SYS_PSELECT6 => select_hits(sample, fds, task, a0, a1),
        SYS_POLL | SYS_PPOLL => poll_fds(sample, task, a0, a1),
        SYS_FUTEX => match read_user::<u32>(task, a0) {
            Some(word) => {
                sample.futex_word = word;
                true
            }
            None => false,
        },
        _ => true,
    };
    sample.user_read_failed = !ok as u32;
}

/// select(nfds, readfds, …): which of the process's listeners are in the set.
#[inline(always)]
fn select_hits(
    sample: &mut ThreadSample,
    fds: &WorkerFds,
    task: *mut task_struct,
    nfds: u64,
    readfds: u64,
) -> bool {
    if readfds == 0 {
        return true;
    }
    let mut found = 0;
    for fd in fds.listen {
        if fd < 0 || fd as u64 >= nfds {
            continue;
        }
        let word_addr = readfds + (fd as u64 / 64) * 8;
        let Some(bits) = read_user::<u64>(task, word_addr) else {
            return false;
        };
        if bits & (1u64 << (fd as u64 % 64)) != 0 && found < POLLED_FDS {
            sample.polled_fds[found] = fd;
            found += 1;
        }
    }
    true
}

/// poll(fds, nfds, …): the fds of its first [`POLLED_FDS`] entries.
#[inline(always)]
fn poll_fds(sample: &mut ThreadSample, task: *mut task_struct, pollfds: u64, nfds: u64) -> bool {
    // struct pollfd { int fd; short events; short revents; }: 8 bytes each.
    let mut i = 0;
    while i < POLLED_FDS && (i as u64) < nfds {
        let Some(entry) = read_user::<u64>(task, pollfds + i as u64 * 8) else {
            return false;
        };
        sample.polled_fds[i] = entry as u32 as i32;
        i += 1;
    }
    true
}

/// Whether the epoll instance at `epfd` in the task's fd table watches one
/// of the process's listeners now: a search of its tree of watched files
/// (keyed by file and fd, as `ep_find` searches it) for each listener.
/// Kernel reads only: the task's own table, not its memory.
#[inline(always)]
fn epoll_listeners(task: u64, fds: &WorkerFds, epfd: u64) -> u32 {
    let off = offsets();
    let Some((max_fds, fd_array)) = read_ptr(task, off.task_files)
        .and_then(|files| read_ptr(files, off.files_fdt))
        .and_then(|fdt| fdtable_head(fdt, &off))
    else {
        return EPOLL_UNCHECKED;
    };
    let file_at = |fd: u64| {
        if fd < max_fds as u64 {
            read_ptr(fd_array + fd * 8, 0)
        } else {
            None
        }
    };
    let Some(root) = file_at(epfd)
        .and_then(|file| read_ptr(file, off.file_private_data))
        .and_then(|ep| read::<u64>(ep, off.eventpoll_rbr))
    else {
        return EPOLL_UNCHECKED;
    };
    let mut checked = false;
    for fd in fds.listen {
        if fd < 0 {
            continue;
        }
        let Some(file) = file_at(fd as u64) else {
            continue;
        };
        match tree_holds(root, file, fd, &off) {
            Some(true) => return EPOLL_WATCHES_LISTENER,
            Some(false) => checked = true,
            // A read failed, or the tree is deeper than searched: unknown.
            None => return EPOLL_UNCHECKED,
        }
    }
    if checked {
        EPOLL_WATCHES_NO_LISTENER
    } else {
        EPOLL_UNCHECKED
    }
}

/// Whether the epoll tree under `node` has an item for (`file`, `fd`);
/// `None` when a read fails or the search runs past its depth.
#[inline(always)]
fn tree_holds(mut node: u64, file: u64, fd: i32, off: &KernelOffsets) -> Option<bool> {
    for _ in 0..EPOLL_TREE_DEPTH {
        if node == 0 {
            return Some(false);
        }
        let item = node - off.epitem_rbn as u64;
        // epoll_filefd: the file pointer, then the fd (an int).
        let [item_file, item_fd] = read::<[u64; 2]>(item, off.epitem_ffd)?;
        let order = if file != item_file {
            (file > item_file) as i32 * 2 - 1
        } else {
            fd.wrapping_sub(item_fd as u32 as i32)
        };
        if order == 0 {
            return Some(true);
        }
        let child = if order < 0 { off.rb_left } else { off.rb_right };
        node = read::<u64>(node, child)?;
    }
    None
}
