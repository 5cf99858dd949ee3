//! `iter/task_file`: the daemon runs this iterator at scrape time. It visits
//! every open file of every process and writes a [`HolderRecord`] for each
//! TCP or Unix-domain listener and each accepted connection of a listened
//! port or path: who holds which listener (the worker pool) and how many
//! connections each has open.
//! Unlike `iter/tcp`, which the kernel limits to the iterator's own network
//! namespace, this sees the sockets of every process in every namespace, so
//! it also reports each listener's queue figures.
//!
//! A worker that inherited its master's listeners holds the master's very
//! files at the same fds. It writes no record for those: the master's
//! records stand for them, and the worker writes one
//! [`INHERITED_LISTENERS`] record with their count (1,000 workers that
//! inherited 10,000 listeners are 1,000 records, not 10 million). The
//! daemon checks that count against the master's records.
use aya_ebpf::{
    bindings::seq_file,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_seq_write},
};
use core::ffi::c_void;
use observer_common::{
    AF_UNIX, HELD_CONNECTIONS_PER_PROCESS, Health, HolderRecord, INHERITED_LISTENERS, IPPROTO_TCP,
    InheritableListener, KernelOffsets, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN,
    VisitedProcess, listen_port_key,
};

use crate::{
    connect::unix_queued_at_ns,
    kernel::{
        SockHead, SockHeadBuf, offsets, read, read_ptr, read_unix_name, socket_place,
        tcp_in_service, tcp_listen_figures, tcp_received, tcp_unread_us, unix_listen_key,
        unix_queue, zero_words,
    },
    maps::{
        HELD_CURSOR, HOLDER, INHERITABLE, LISTEN_PORTS, UNIX_NAME, VISITED, VISITED_SLOT,
        VISITING_SLOT, count_health,
    },
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
    // The walk's session id, in `bpf_iter_meta`.
    let session = read::<u64>(meta, META_SESSION as u32).unwrap_or(0);
    if task == 0 || file == 0 {
        // The walk's end: the last process's inherited count.
        end_of_walk(seq, session);
        return 0;
    }
    let off = offsets();
    if counted_as_inherited(task, file, fd, session, &off) {
        return 0;
    }
    let Some(inode) = read_ptr(file, off.file_f_inode) else {
        return 0;
    };
    if read::<u16>(inode, off.inode_i_mode).map(|m| m & S_IFMT) != Some(S_IFSOCK) {
        return 0;
    }
    let Some(visit) = Visit::start(task, session, &off) else {
        return 0;
    };
    // The last process's count before this socket's records: if those do
    // not fit, the kernel drops both and runs this again.
    if !visit.report_before(seq) {
        return 0;
    }
    // An inherited listener is counted before anything else is read: a
    // worker holding 10,000 of them costs a lookup each.
    let inheritance = inheritance(file, fd, session, visit.process);
    let fitted = match inheritance {
        Inheritance::FromParent => {
            visit.process.inherited += 1;
            true
        }
        _ => match read_ptr(file, off.file_private_data).and_then(|s| read_ptr(s, off.socket_sk)) {
            Some(sk) => {
                let socket = HeldSocket {
                    file,
                    fd,
                    sk,
                    inode,
                    first: match inheritance {
                        Inheritance::First(mark) => Some(mark),
                        _ => None,
                    },
                };
                holder(seq, visit.process, socket, session, &off)
            }
            None => true,
        },
    };
    visit.finish(fitted);
    0
}

/// A socket file a process holds, as the iterator hands it over.
#[derive(Clone, Copy)]
struct HeldSocket {
    file: u64,
    fd: u32,
    sk: u64,
    inode: u64,
    /// No process held this file earlier in the scan (see [`Inheritance`]):
    /// its mark from an earlier scan, if the map still has one.
    first: Option<Option<*mut InheritableListener>>,
}

/// Reports one socket of `process` (see the module's summary); false when
/// a record did not fit the output (the kernel then shows the socket again).
#[inline(always)]
fn holder(
    seq: *mut seq_file,
    process: &mut VisitedProcess,
    socket: HeldSocket,
    session: u64,
    off: &KernelOffsets,
) -> bool {
    let sk = socket.sk;
    let mut buf = SockHeadBuf::new();
    let Some(head) = SockHead::read(&mut buf, sk) else {
        return true;
    };
    let state: u8 = head.field(off.sk_state).unwrap_or(0);
    let inheritable = (state == TCP_LISTEN && socket.first.is_some()) as u8;
    let Some(record) = HOLDER.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: our per-CPU slot, used only until this run's writes
    // (iterator runs do not nest on one CPU).
    let record = unsafe { &mut *record };
    zero_words(record);
    record.tgid = process.tgid;
    record.fd = socket.fd;
    record.state = state;
    record.inheritable = inheritable;
    record.inode = read(socket.inode, off.inode_i_ino).unwrap_or(0);
    if head.field::<u16>(off.sk_family) == Some(AF_UNIX) {
        return unix_holder(seq, process, socket, head, off, record, session);
    }
    let Some(place) = socket_place(head, off) else {
        return true;
    };
    if read::<u16>(sk, off.sk_protocol) != Some(IPPROTO_TCP) {
        return true;
    }
    let wanted = state == TCP_LISTEN
        || ((state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT)
            && LISTEN_PORTS
                .get_ptr(listen_port_key(place.netns, place.port))
                .is_some());
    if !wanted || (state != TCP_LISTEN && !within_held_limit(session, record.tgid)) {
        return true;
    }
    record.netns = place.netns;
    record.family = place.family;
    record.port = place.port;
    record.addr = place.addr;
    fill_process(process, record);
    if state == TCP_LISTEN {
        let figures = tcp_listen_figures(sk, record.inode, off);
        record.queue_len = figures.queue_len;
        record.queue_max = figures.queue_max;
        record.syn_queue_len = figures.syn_queue_len;
        record.drops = figures.drops;
        record.defer_accept = figures.defer_accept;
        record.oldest_wait_us = figures.oldest_wait_us;
        return write_listener(seq, record, socket, session);
    }
    if let Some(received) = tcp_received(sk, off) {
        record.unread_us = tcp_unread_us(sk, received, off);
        record.in_service = tcp_in_service(sk, received, off) as u8;
    }
    let fitted = write(seq, record);
    if fitted {
        count_held();
    }
    fitted
}

/// The fast path of a worker that inherited its master's listeners: while
/// the process this CPU visits has counted an inherited socket already, a
/// file its parent passed on is counted at once, before any read of the
/// file (about a third of a 10-million-fd walk). Anything else takes the
/// full path.
#[inline(always)]
fn counted_as_inherited(task: u64, file: u64, fd: u32, session: u64, off: &KernelOffsets) -> bool {
    let Some(visited) = VISITED.get_ptr_mut(VISITED_SLOT) else {
        return false;
    };
    // SAFETY: our per-CPU slot (iterator runs do not nest on one CPU).
    let visited = unsafe { &mut *visited };
    if visited.session != session || visited.task != task || visited.inherited == 0 {
        return false;
    }
    // The tgid too: a `task_struct` freed during the scan can come back as
    // another process's at the same address.
    if read::<u32>(task, off.task_tgid) != Some(visited.tgid) {
        return false;
    }
    if !matches!(
        inheritance(file, fd, session, visited),
        Inheritance::FromParent
    ) {
        return false;
    }
    visited.inherited += 1;
    true
}

/// How a socket's file came to the process holding it, as far as this
/// scan can tell (only listening sockets' files are remembered).
enum Inheritance {
    /// Its parent held the same file at the same fd earlier in the scan,
    /// and wrote the record.
    FromParent,
    /// No process held it earlier in the scan; the mark an earlier scan
    /// left, where the map has one, to be rewritten in place.
    First(Option<*mut InheritableListener>),
    /// Another process held it first (a socket passed over a Unix socket,
    /// a grandparent's), or the same process at another fd.
    Other,
}

#[inline(always)]
fn inheritance(file: u64, fd: u32, session: u64, process: &VisitedProcess) -> Inheritance {
    let Some(mark) = INHERITABLE.get_ptr_mut(file) else {
        return Inheritance::First(None);
    };
    // SAFETY: a value of our map, read at once (an LRU entry may be reused
    // under us; a torn read only costs a record written in full).
    let first = unsafe { *mark };
    if first.session != session {
        return Inheritance::First(Some(mark));
    }
    if first.tgid == process.ppid && first.fd == fd && process.ppid != 0 {
        Inheritance::FromParent
    } else if first.tgid == process.tgid && first.fd == fd {
        // This record again (it did not fit the output last time).
        Inheritance::First(Some(mark))
    } else {
        Inheritance::Other
    }
}

/// Writes a listening socket's record; a first holder's file is remembered
/// for the children that inherited it: in the mark an earlier scan left,
/// rewritten in place (the common case: a listener lives across many
/// scrapes, and an LRU insert takes a free node and frees the old one), or
/// in a new one.
#[inline(always)]
fn write_listener(
    seq: *mut seq_file,
    record: &HolderRecord,
    socket: HeldSocket,
    session: u64,
) -> bool {
    if record.inheritable != 0 {
        let first = InheritableListener {
            session,
            tgid: record.tgid,
            fd: socket.fd,
        };
        match socket.first {
            // SAFETY: a value of our map. Only holder walks insert into it,
            // so only another walk running at once (a second daemon) can
            // reuse this node for another file; the mark it then finds has
            // another session, and costs a record written in full.
            Some(Some(mark)) => unsafe { *mark = first },
            // A full map forgets its oldest entry; a failed insert only
            // costs the children's records, written in full.
            _ => {
                let _ = INHERITABLE.insert(socket.file, first, 0);
            }
        }
    }
    write(seq, record)
}

/// The process being visited: this CPU's `VISITED` slot when it holds it
/// already (counted in place: an inherited socket writes nothing, so its
/// run is never dropped), or the `VISITING` slot, read afresh at its first
/// socket and copied into `VISITED` once the socket's records fitted. When
/// the visit moves on to another process of the scan, the last one's
/// inherited count is written first ([`INHERITED_LISTENERS`]), before the
/// socket's records.
struct Visit {
    process: &'static mut VisitedProcess,
    /// The process visited before, when `process` is another one.
    before: Option<&'static mut VisitedProcess>,
}

impl Visit {
    /// The process of `task`: its tgid, and its parent and name, read at its
    /// first socket in this scan and kept in a per-CPU slot for the rest of
    /// its files. The tgid is read each time: a `task_struct` freed during
    /// the scan can come back as another process's at the same address.
    #[inline(always)]
    fn start(task: u64, session: u64, off: &KernelOffsets) -> Option<Visit> {
        let visited = VISITED.get_ptr_mut(VISITED_SLOT)?;
        // SAFETY: our per-CPU slot (iterator runs do not nest on one CPU).
        let visited = unsafe { &mut *visited };
        let tgid = read(task, off.task_tgid).unwrap_or(0);
        if visited.session == session && visited.task == task && visited.tgid == tgid {
            return Some(Visit {
                process: visited,
                before: None,
            });
        }
        let process = VISITED.get_ptr_mut(VISITING_SLOT)?;
        // SAFETY: our per-CPU slot, another entry than `visited`.
        let process = unsafe { &mut *process };
        process.session = session;
        process.task = task;
        process.tgid = tgid;
        process.ppid = read_ptr(task, off.task_real_parent)
            .and_then(|p| read::<u32>(p, off.task_tgid))
            .unwrap_or(0);
        process.comm = read(task, off.task_comm).unwrap_or([0; 16]);
        process.inherited = 0;
        Some(Visit {
            process,
            before: Some(visited),
        })
    }

    /// For a process visited afresh: writes the last one's count, when it
    /// is of this scan; false when it did not fit.
    #[inline(always)]
    fn report_before(&self, seq: *mut seq_file) -> bool {
        match &self.before {
            Some(before) if before.session == self.process.session && before.inherited > 0 => {
                write_inherited(seq, before)
            }
            _ => true,
        }
    }

    /// For a process visited afresh: keeps it in `VISITED`, only once
    /// everything this run wrote fitted (the kernel drops a run's output
    /// that did not fit, and runs it again).
    #[inline(always)]
    fn finish(self, fitted: bool) {
        if let Some(before) = self.before
            && fitted
        {
            *before = *self.process;
        }
    }
}

/// The walk's end: reports the inherited count of the last process this
/// CPU visited. (A walk that moved between CPUs leaves a count in another
/// CPU's slot; the daemon reads the walk on one CPU.)
#[inline(always)]
fn end_of_walk(seq: *mut seq_file, session: u64) {
    let Some(slot) = VISITED.get_ptr_mut(VISITED_SLOT) else {
        return;
    };
    // SAFETY: our per-CPU slot (iterator runs do not nest on one CPU).
    let slot = unsafe { &mut *slot };
    if slot.session == session && slot.inherited > 0 && write_inherited(seq, slot) {
        slot.inherited = 0;
    }
}

/// Writes `process`'s [`INHERITED_LISTENERS`] record.
#[inline(always)]
fn write_inherited(seq: *mut seq_file, process: &VisitedProcess) -> bool {
    let Some(record) = HOLDER.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: our per-CPU slot, used only until this run's writes
    // (iterator runs do not nest on one CPU).
    let record = unsafe { &mut *record };
    zero_words(record);
    record.tgid = process.tgid;
    record.state = INHERITED_LISTENERS;
    record.inherited = process.inherited;
    fill_process(process, record);
    write(seq, record)
}

/// A Unix-domain socket: a listener (followed by its path), or an accepted
/// connection of a listener the daemon knows.
#[inline(always)]
fn unix_holder(
    seq: *mut seq_file,
    process: &VisitedProcess,
    socket: HeldSocket,
    head: &SockHead,
    off: &KernelOffsets,
    record: &mut HolderRecord,
    session: u64,
) -> bool {
    let sk = socket.sk;
    let Some(key) = unix_listen_key(sk, off) else {
        return true; // unbound: a client, never a listener or its child
    };
    let listening = record.state == TCP_LISTEN;
    let accepted = (record.state == TCP_ESTABLISHED || record.state == TCP_CLOSE_WAIT)
        && LISTEN_PORTS.get_ptr(key).is_some();
    if (!listening && !accepted) || (accepted && !within_held_limit(session, record.tgid)) {
        return true;
    }
    let Some(netns) = head
        .field::<u64>(off.sk_net)
        .and_then(|net| read::<u32>(net, off.net_ns_inum))
    else {
        return true;
    };
    record.netns = netns;
    record.family = AF_UNIX;
    record.addr[..8].copy_from_slice(&key.to_ne_bytes());
    fill_process(process, record);
    if !listening {
        let fitted = write(seq, record);
        if fitted {
            count_held();
        }
        return fitted;
    }
    let (queue_len, queue_head) = unix_queue(sk, off);
    record.queue_len = queue_len;
    record.queue_max = read(sk, off.sk_max_ack_backlog).unwrap_or(0);
    record.queue_head = queue_head;
    record.oldest_wait_us = unix_oldest_wait_us(queue_head);
    if !write_listener(seq, record, socket, session) {
        return false;
    }
    let Some(name) = UNIX_NAME.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: our per-CPU slot, used only between here and the write
    // (iterator runs do not nest on one CPU).
    let name = unsafe { &mut *name };
    read_unix_name(key, off, name);
    write(seq, name)
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
