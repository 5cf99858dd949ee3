//! `iter/task_file`: the daemon runs this iterator at scrape time. It visits
//! every open file of every process and writes a [`HolderRecord`] for each
//! TCP or Unix-domain listener and each accepted connection of a listened
//! port or path: who holds which listener (the worker pool) and how many
//! connections each has open.
//! Unlike `iter/tcp`, which the kernel limits to the iterator's own network
//! namespace, this sees the sockets of every process in every namespace, so
//! it also reports each listener's queue figures.
use aya_ebpf::{
    bindings::seq_file,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_seq_write},
};
use core::ffi::c_void;
use observer_common::{
    AF_UNIX, HELD_CONNECTIONS_PER_PROCESS, Health, HolderRecord, IPPROTO_TCP, KernelOffsets,
    TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN, VisitedProcess, listen_port_key,
};

use crate::{
    connect::unix_queued_at_ns,
    kernel::{
        SockHead, SockHeadBuf, offsets, read, read_ptr, read_unix_name, socket_place,
        tcp_in_service, tcp_listen_figures, tcp_received, tcp_unread_us, unix_listen_key,
        unix_queue, zero_words,
    },
    maps::{HELD_CURSOR, HOLDER, LISTEN_PORTS, UNIX_NAME, VISITED, count_health},
};

/// `struct bpf_iter__task_file`, its pointers as plain numbers.
#[repr(C)]
#[derive(Clone, Copy)]
struct TaskFileContext {
    meta: u64,
    task: u64,
    fd: u32,
    _pad: u32,
    file: u64,
}

/// Byte offset of `session_id` in `struct bpf_iter_meta` (after `seq`).
const META_SESSION: usize = 8;

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// # Safety
/// Called by the kernel with a valid `struct bpf_iter__task_file *`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub unsafe extern "C" fn holders(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx->meta is the first field, and meta->seq the first of bpf_iter_meta.
    let seq: *mut seq_file = unsafe { **(ctx as *const *const *mut seq_file) };
    // Copy the context out as plain numbers, in one probe read, so later
    // arithmetic on them is not pointer arithmetic to the verifier.
    // SAFETY: reading our own context, `struct bpf_iter__task_file`.
    let Ok(TaskFileContext {
        meta,
        task,
        fd,
        file,
        ..
    }) = (unsafe { bpf_probe_read_kernel(ctx as *const TaskFileContext) })
    else {
        return 0;
    };
    if task == 0 || file == 0 {
        return 0;
    }
    let off = offsets();
    let Some(inode) = read_ptr(file, off.file_f_inode) else {
        return 0;
    };
    if read::<u16>(inode, off.inode_i_mode).map(|m| m & S_IFMT) != Some(S_IFSOCK) {
        return 0;
    }
    let Some(sk) = read_ptr(file, off.file_private_data).and_then(|s| read_ptr(s, off.socket_sk))
    else {
        return 0;
    };
    let mut buf = SockHeadBuf::new();
    let Some(head) = SockHead::read(&mut buf, sk) else {
        return 0;
    };
    let state: u8 = head.field(off.sk_state).unwrap_or(0);
    // The walk's session id, in `bpf_iter_meta` (read for sockets only).
    let session = read::<u64>(meta, META_SESSION as u32).unwrap_or(0);
    let Some(process) = visited(task, session, &off) else {
        return 0;
    };
    let Some(record) = HOLDER.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: our per-CPU slot, used only until this run's writes
    // (iterator runs do not nest on one CPU).
    let record = unsafe { &mut *record };
    zero_words(record);
    record.tgid = process.tgid;
    record.fd = fd;
    record.state = state;
    record.inode = read(inode, off.inode_i_ino).unwrap_or(0);
    if head.field::<u16>(off.sk_family) == Some(AF_UNIX) {
        unix_holder(seq, &process, sk, head, &off, record, session);
        return 0;
    }
    let Some(place) = socket_place(head, &off) else {
        return 0;
    };
    if read::<u16>(sk, off.sk_protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let wanted = state == TCP_LISTEN
        || ((state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT)
            && LISTEN_PORTS
                .get_ptr(listen_port_key(place.netns, place.port))
                .is_some());
    if !wanted || (state != TCP_LISTEN && !within_held_limit(session, record.tgid)) {
        return 0;
    }
    record.netns = place.netns;
    record.family = place.family;
    record.port = place.port;
    record.addr = place.addr;
    fill_process(&process, record);
    if state == TCP_LISTEN {
        let figures = tcp_listen_figures(sk, record.inode, &off);
        record.queue_len = figures.queue_len;
        record.queue_max = figures.queue_max;
        record.syn_queue_len = figures.syn_queue_len;
        record.drops = figures.drops;
        record.defer_accept = figures.defer_accept;
        record.oldest_wait_us = figures.oldest_wait_us;
        write(seq, record);
    } else {
        if let Some(received) = tcp_received(sk, &off) {
            record.unread_us = tcp_unread_us(sk, received, &off);
            record.in_service = tcp_in_service(sk, received, &off) as u8;
        }
        if write(seq, record) {
            count_held();
        }
    }
    0
}

/// A Unix-domain socket: a listener (followed by its path), or an accepted
/// connection of a listener the daemon knows.
#[inline(always)]
fn unix_holder(
    seq: *mut seq_file,
    process: &VisitedProcess,
    sk: u64,
    head: &SockHead,
    off: &KernelOffsets,
    record: &mut HolderRecord,
    session: u64,
) {
    let Some(key) = unix_listen_key(sk, off) else {
        return; // unbound: a client, never a listener or its child
    };
    let listening = record.state == TCP_LISTEN;
    let accepted = (record.state == TCP_ESTABLISHED || record.state == TCP_CLOSE_WAIT)
        && LISTEN_PORTS.get_ptr(key).is_some();
    if (!listening && !accepted) || (accepted && !within_held_limit(session, record.tgid)) {
        return;
    }
    let Some(netns) = head
        .field::<u64>(off.sk_net)
        .and_then(|net| read::<u32>(net, off.net_ns_inum))
    else {
        return;
    };
    record.netns = netns;
    record.family = AF_UNIX;
    record.addr[..8].copy_from_slice(&key.to_ne_bytes());
    fill_process(process, record);
    if !listening {
        if write(seq, record) {
            count_held();
        }
        return;
    }
    let (queue_len, queue_head) = unix_queue(sk, off);
    record.queue_len = queue_len;
    record.queue_max = read(sk, off.sk_max_ack_backlog).unwrap_or(0);
    record.queue_head = queue_head;
    record.oldest_wait_us = unix_oldest_wait_us(queue_head);
    write(seq, record);
    if let Some(name) = UNIX_NAME.get_ptr_mut(0) {
        // SAFETY: our per-CPU slot, used only between here and the write
        // (iterator runs do not nest on one CPU).
        let name = unsafe { &mut *name };
        read_unix_name(key, off, name);
        write(seq, name);
    }
}

/// How long the Unix connection whose child socket is `head` has waited, µs,
/// by its connect() stamp; 0 when the queue is empty or it has no stamp.
#[inline(always)]
fn unix_oldest_wait_us(head: u64) -> u64 {
    let Some(queued_at_ns) = (head != 0).then(|| unix_queued_at_ns(head)).flatten() else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    now_ns.saturating_sub(queued_at_ns) / 1000
}

/// Whether one more accepted connection of process `tgid` may be reported
/// in this scan (see [`HELD_CONNECTIONS_PER_PROCESS`]); one that may not is
/// counted. Only records written count towards the limit ([`count_held`]):
/// a record that did not fit the output buffer is shown again.
#[inline(always)]
fn within_held_limit(session: u64, tgid: u32) -> bool {
    let Some(cursor) = HELD_CURSOR.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: our per-CPU slot (iterator runs do not nest on one CPU).
    let cursor = unsafe { &mut *cursor };
    if cursor.session != session || cursor.tgid != tgid {
        cursor.session = session;
        cursor.tgid = tgid;
        cursor.held = 0;
    }
    if cursor.held >= HELD_CONNECTIONS_PER_PROCESS {
        count_health(Health::HeldConnectionsOverLimit);
        return false;
    }
    true
}

/// One more accepted connection of the current process was written.
#[inline(always)]
fn count_held() {
    if let Some(cursor) = HELD_CURSOR.get_ptr_mut(0) {
        // SAFETY: as in `within_held_limit`.
        unsafe { (*cursor).held += 1 };
    }
}

/// The holding process's parent and name (its tgid is already in).
#[inline(always)]
fn fill_process(process: &VisitedProcess, record: &mut HolderRecord) {
    record.ppid = process.ppid;
    record.comm = process.comm;
}

/// The process of `task`: its tgid, and its parent and name, read at its
/// first socket in this scan and kept in a per-CPU slot for the rest of its
/// files. The tgid is read each time: a `task_struct` freed during the scan
/// can come back as another process's at the same address.
#[inline(always)]
fn visited(task: u64, session: u64, off: &KernelOffsets) -> Option<VisitedProcess> {
    let slot = VISITED.get_ptr_mut(0)?;
    // SAFETY: our per-CPU slot (iterator runs do not nest on one CPU).
    let slot = unsafe { &mut *slot };
    let tgid = read(task, off.task_tgid).unwrap_or(0);
    if slot.session != session || slot.task != task || slot.tgid != tgid {
        slot.session = session;
        slot.task = task;
        slot.tgid = tgid;
        slot.ppid = read_ptr(task, off.task_real_parent)
            .and_then(|p| read::<u32>(p, off.task_tgid))
            .unwrap_or(0);
        slot.comm = read(task, off.task_comm).unwrap_or([0; 16]);
    }
    Some(*slot)
}

/// Appends `value`'s bytes to the iterator's output; false when they did
/// not fit (the kernel then shows this object again, in the next read).
#[inline(always)]
fn write<T>(seq: *mut seq_file, value: &T) -> bool {
    // SAFETY: `seq` is the iterator's seq_file; `value` lives on our stack.
    let rc = unsafe {
        bpf_seq_write(
            seq,
            value as *const T as *const c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
    rc == 0
}
