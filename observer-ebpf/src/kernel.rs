//! Reading kernel structs at offsets the daemon resolved from BTF.
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::MaybeUninit,
};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        generated,
    },
    programs::TracePointContext,
};
use observer_common::{KernelOffsets, SOCK_COMMON_HEAD, UnixNameRecord};

use crate::maps::LISTEN_DISCARDS;

// The programs build byte arrays from words (an IPv4 address, the
// iterator's context) in little-endian order: the only BPF target we build.
#[cfg(not(target_endian = "little"))]
compile_error!("observer's eBPF programs assume a little-endian target (bpfel)");

/// Filled in by the daemon before load (`EbpfLoader::set_global`). It lives in
/// `.rodata`, which the loader freezes, so the verifier sees constants.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    file_private_data: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_state: 0,
    sk_num: 0,
    sk_rcv_saddr: 0,
    sk_v6_rcv_saddr: 0,
    sk_net: 0,
    net_ns_inum: 0,
    sk_protocol: 0,
    sk_ack_backlog: 0,
    sk_max_ack_backlog: 0,
    sk_drops: 0,
    sk_socket: 0,
    icsk_accept_queue_qlen: 0,
    tcp_rcvq_space_time: 0,
    socket_alloc_vfs_inode: 0,
    inode_i_ino: 0,
    inode_i_mode: 0,
    file_f_inode: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_comm: 0,
    sk_daddr: 0,
    sk_v6_daddr: 0,
    sk_dport: 0,
    task_pid: 0,
    task_state: 0,
    task_group_leader: 0,
    task_start_time: 0,
    regs_syscall_nr: 0,
    regs_syscall_nr_bytes: 0,
    regs_args: [0; 4],
    sk_receive_queue_next: 0,
    sk_receive_queue_qlen: 0,
    skb_sk: 0,
    unix_addr: 0,
    unix_address_len: 0,
    unix_address_path: 0,
    icsk_accept_queue_head: 0,
    request_sock_sk: 0,
    unix_peer: 0,
    sk_type: 0,
    tcp_bytes_received: 0,
    tcp_rcv_nxt: 0,
    tcp_copied_seq: 0,
    rskq_defer_accept: 0,
    skb_head: 0,
    skb_end: 0,
    shinfo_gso_segs: 0,
    eventpoll_rbr: 0,
    epitem_rbn: 0,
    epitem_ffd: 0,
    rb_right: 0,
    rb_left: 0,
    tcp_bytes_sent: 0,
    tcp_lsndtime: 0,
    icsk_ack_lrcvtime: 0,
};

/// 1 in the copy of the programs that `observer trace` loads: accepted
/// connections are then streamed to `EVENTS`. 0 (the daemon) makes that code
/// dead to the verifier, which sees frozen read-only data as constants.
#[unsafe(no_mangle)]
static TRACE: u8 = 0;

#[inline(always)]
pub fn tracing() -> bool {
    // SAFETY: reading our own static; volatile only defeats constant folding.
    unsafe { core::ptr::read_volatile(&TRACE) != 0 }
}

/// The offsets, read through a volatile load so that the compiler cannot fold
/// the zero placeholders above into the code.
#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: reading our own static; volatile only defeats constant folding.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Offset of `long ret` in every `syscalls/sys_exit_*` event record.
const SYS_EXIT_RET_OFFSET: usize = 16;

/// The return value in a `syscalls/sys_exit_*` tracepoint's record.
#[inline(always)]
pub fn sys_exit_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: `ret` sits at this offset in every sys_exit_* record; a direct
    // context load (no helper call).
    unsafe {
        core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(SYS_EXIT_RET_OFFSET) as *const i64)
    }
}

/// Adds `value` to the u64 at `slot` atomically (other CPUs add to it too).
///
/// # Safety
/// `slot` must point to a live, 8-byte aligned u64 in a map value.
#[inline(always)]
pub unsafe fn atomic_add(slot: *mut u64, value: u64) {
    // SAFETY: guaranteed by the caller. (core's AtomicU64 has no fetch_add on
    // the bpf target; the intrinsic lowers to the BPF atomic add.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, value) };
}

/// Reads a `T` at `base + offset` in kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Reads `dst.len()` bytes at `base` into `dst`, in place; false if the
/// read faults.
#[inline(always)]
pub fn read_into(base: u64, dst: &mut [u8]) -> bool {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    base != 0 && unsafe { bpf_probe_read_kernel_buf(base as *const u8, dst) }.is_ok()
}

/// Follows a pointer stored at `base + offset`.
#[inline(always)]
pub fn read_ptr(base: u64, offset: u32) -> Option<u64> {
    read::<u64>(base, offset).filter(|p| *p != 0)
}

/// The syscall number saved in the `pt_regs` at `regs` (-1: none), in the
/// width this architecture saves it.
#[inline(always)]
pub fn syscall_nr(regs: u64, off: &KernelOffsets) -> Option<i64> {
    if off.regs_syscall_nr_bytes == 4 {
        read::<i32>(regs, off.regs_syscall_nr).map(i64::from)
    } else {
        read::<i64>(regs, off.regs_syscall_nr)
    }
}

/// Argument `n` (0..=3) of the syscall whose `pt_regs` are at `regs`.
#[inline(always)]
pub fn syscall_arg(regs: u64, off: &KernelOffsets, n: usize) -> Option<u64> {
    read::<u64>(regs, *off.regs_args.get(n)?)
}

/// `N` bytes of kernel memory read in one helper call into a buffer that is
/// not zeroed first: on BPF the compiler zeroes with a byte loop (5
/// instructions a byte: about 480 for a socket's head, on every accept).
pub struct KernelBytes<const N: usize>(MaybeUninit<[u8; N]>);

impl<const N: usize> KernelBytes<N> {
    #[inline(always)]
    pub const fn new() -> Self {
        KernelBytes(MaybeUninit::uninit())
    }

    /// Reads `N` bytes at `base` into the buffer; them, or `None` if the
    /// read faults.
    #[inline(always)]
    pub fn read(&mut self, base: u64) -> Option<&[u8; N]> {
        if base == 0 {
            return None;
        }
        // SAFETY: the helper checks the source address and writes all `N`
        // bytes of our buffer (zeroes where the read faults).
        let rc = unsafe {
            generated::bpf_probe_read_kernel(
                self.0.as_mut_ptr().cast::<c_void>(),
                N as u32,
                base as *const c_void,
            )
        };
        // SAFETY: written in full by the helper just above.
        (rc == 0).then(|| unsafe { self.0.assume_init_ref() })
    }
}

/// Zeroes `value` with 8-byte stores (the compiler's zeroing is a byte loop
/// on BPF, see [`KernelBytes`]): for records built in map memory.
#[inline(always)]
pub fn zero_words<T>(value: &mut T) {
    const {
        assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() >= 8);
    }
    let words = (value as *mut T).cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within `value`, 8-byte aligned (checked above); volatile,
        // so that the compiler keeps the stores and calls no memset.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// The head of a `struct sock_common`, read in one helper call: family,
/// state, ports and addresses are all in it (`SOCK_COMMON_HEAD` bytes; the
/// daemon checks that against BTF before load).
#[repr(transparent)]
pub struct SockHead([u8; SOCK_COMMON_HEAD]);

/// Where a [`SockHead`] is read into, on the caller's stack.
pub type SockHeadBuf = KernelBytes<SOCK_COMMON_HEAD>;

impl SockHead {
    /// Reads the head of `sk` into `buf` (in place: a value this large
    /// moved through an `Option` overflows the 512-byte BPF stack); `None`
    /// if the read faults.
    #[inline(always)]
    pub fn read(buf: &mut SockHeadBuf, sk: u64) -> Option<&SockHead> {
        let bytes = buf.read(sk)?;
        // SAFETY: `SockHead` is a transparent wrapper of this array type.
        Some(unsafe { &*(bytes as *const [u8; SOCK_COMMON_HEAD]).cast::<SockHead>() })
    }

    /// The field of type `T` at `offset`; `None` past the head.
    #[inline(always)]
    pub fn field<T: Copy>(&self, offset: u32) -> Option<T> {
        let offset = offset as usize;
        if offset + core::mem::size_of::<T>() > SOCK_COMMON_HEAD {
            return None;
        }
        // SAFETY: in bounds (checked above); unaligned read of plain data.
        Some(unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(offset) as *const T) })
    }
}

/// The socket's network namespace inode, family, local port and address.
pub struct SocketPlace {
    pub netns: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

/// Where a socket lives, from its head; `None` for anything but an
/// IPv4/IPv6 socket.
#[inline(always)]
pub fn socket_place(head: &SockHead, off: &KernelOffsets) -> Option<SocketPlace> {
    let family: u16 = head.field(off.sk_family)?;
    let addr: [u8; 16] = if family == observer_common::AF_INET {
        let v4: u32 = head.field(off.sk_rcv_saddr)?;
        // The four address bytes, then zeroes: built from words, as a
        // zeroed byte array would cost a byte loop (see `KernelBytes`).
        // SAFETY: same size; every bit pattern is a valid byte array.
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([v4 as u64, 0]) }
    } else if family == observer_common::AF_INET6 {
        head.field(off.sk_v6_rcv_saddr)?
    } else {
        return None;
    };
    let port: u16 = head.field(off.sk_num)?;
    let net: u64 = head.field(off.sk_net)?;
    let netns: u32 = read(net, off.net_ns_inum)?;
    Some(SocketPlace {
        netns,
        family,
        port,
        addr,
    })
}

/// A TCP listener's queue figures: what `ss -lt` shows (accept queue
/// length and limit), the SYN queue, drops, `TCP_DEFER_ACCEPT`, and how
/// long the oldest queued connection has waited. Fields that are
/// neighbours come in one read.
pub struct ListenFigures {
    pub queue_len: u32,
    pub queue_max: u32,
    pub syn_queue_len: u32,
    pub drops: u32,
    pub defer_accept: u8,
    pub oldest_wait_us: u64,
}

/// `inode`: the listener's socket inode, which tells its entry in
/// `LISTEN_DISCARDS` from one a closed socket at the same address left.
#[inline(always)]
pub fn tcp_listen_figures(sk: u64, inode: u64, off: &KernelOffsets) -> ListenFigures {
    let (queue_len, queue_max) = accept_backlog(sk, off);
    let (syn_queue_len, head) = syn_queue_and_head(sk, off);
    ListenFigures {
        queue_len,
        queue_max,
        syn_queue_len,
        drops: listen_drops(sk, inode, off),
        defer_accept: read(sk, off.rskq_defer_accept).unwrap_or(0),
        oldest_wait_us: head.map_or(0, |request| oldest_wait_us(request, off)),
    }
}

/// Connections the listener lost: `sk_drops` less the segments it
/// discarded without losing one (see `discards.rs`). The discards are read
/// first: each follows its own `sk_drops` increment, so the difference
/// cannot go below zero.
#[inline(always)]
fn listen_drops(sk: u64, inode: u64, off: &KernelOffsets) -> u32 {
    let discarded = match LISTEN_DISCARDS.get_ptr(sk) {
        Some(entry) => {
            // SAFETY: a live map value (RCU keeps it for this run), copied
            // at once; a racing update only makes the copy one event older.
            let entry = unsafe { core::ptr::read_volatile(entry) };
            if entry.inode == inode {
                entry.segments
            } else {
                0
            }
        }
        None => 0,
    };
    // Saturating: a discard that reached no `sk_drops` (a freeing site this
    // kernel has that the daemon did not resolve) must not wrap into 4
    // billion drops; it shows as fewer drops instead.
    read::<u32>(sk, off.sk_drops)
        .unwrap_or(0)
        .saturating_sub(discarded as u32)
}

/// `sk_ack_backlog` and `sk_max_ack_backlog`: in one read where they are
/// neighbours, as on every kernel we know (the offsets are constants to
/// the verifier, which drops the other branch).
#[inline(always)]
fn accept_backlog(sk: u64, off: &KernelOffsets) -> (u32, u32) {
    if off.sk_max_ack_backlog == off.sk_ack_backlog + 4 {
        let [len, max] = read::<[u32; 2]>(sk, off.sk_ack_backlog).unwrap_or([0, 0]);
        (len, max)
    } else {
        let len = read(sk, off.sk_ack_backlog).unwrap_or(0);
        (len, read(sk, off.sk_max_ack_backlog).unwrap_or(0))
    }
}

/// `icsk_accept_queue.qlen` (the SYN queue) and `rskq_accept_head` (the
/// accept queue's oldest request): in one read where the head is 8 bytes
/// after the length (`qlen`, `young`, then the head: 6.18, whose
/// `synflood_warned` is a byte), else two (6.1 and 6.12 have 12 bytes
/// between them).
#[inline(always)]
fn syn_queue_and_head(sk: u64, off: &KernelOffsets) -> (u32, Option<u64>) {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct QueueHead {
        qlen: u32,
        young: u32,
        head: u64,
    }
    if off.icsk_accept_queue_head == off.icsk_accept_queue_qlen + 8 {
        match read::<QueueHead>(sk, off.icsk_accept_queue_qlen) {
            Some(q) => (q.qlen, Some(q.head).filter(|h| *h != 0)),
            None => (0, None),
        }
    } else {
        let qlen = read(sk, off.icsk_accept_queue_qlen).unwrap_or(0);
        (qlen, read_ptr(sk, off.icsk_accept_queue_head))
    }
}

/// The stamp `tcp_sock.rcvq_space.time` (µs, the clock of
/// `bpf_ktime_get_ns`) that a child socket gets when it enters the accept
/// queue; nothing moves it until the owner reads, after accept.
#[inline(always)]
pub fn tcp_queued_at_us(child: u64, off: &KernelOffsets) -> Option<u64> {
    read::<u64>(child, off.tcp_rcvq_space_time).filter(|us| *us != 0)
}

/// What an accepted TCP connection has received: bytes in all
/// (`bytes_received`), and how many of them the server has not read yet
/// (`rcv_nxt - copied_seq`). Read once per connection for the figures below.
#[derive(Clone, Copy)]
pub struct TcpReceived {
    pub bytes: u64,
    pub unread: u64,
}

#[inline(always)]
pub fn tcp_received(sk: u64, off: &KernelOffsets) -> Option<TcpReceived> {
    let bytes = read::<u64>(sk, off.tcp_bytes_received).unwrap_or(0);
    let rcv_nxt = read::<u32>(sk, off.tcp_rcv_nxt)?;
    let copied_seq = read::<u32>(sk, off.tcp_copied_seq)?;
    Some(TcpReceived {
        bytes,
        unread: rcv_nxt.wrapping_sub(copied_seq) as u64,
    })
}

/// For an accepted TCP connection `sk` whose client has sent bytes that the
/// server has not started to read: µs since it entered the accept queue
/// (at least 1); 0 otherwise. "Not started": every byte received is still
/// queued (`rcv_nxt - copied_seq == bytes_received > 0`), so the
/// `rcvq_space.time` stamp has not moved since the queueing either.
#[inline(always)]
pub fn tcp_unread_us(sk: u64, received: TcpReceived, off: &KernelOffsets) -> u64 {
    if received.bytes == 0 || received.unread != received.bytes {
        return 0;
    }
    let Some(queued_at) = tcp_queued_at_us(sk, off) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now_us = unsafe { bpf_ktime_get_ns() } / 1000;
    now_us.saturating_sub(queued_at).max(1)
}

/// Whether an accepted connection holds a request in service: bytes
/// received and all read by the server, and nothing sent since the last
/// ones arrived (see `HolderRecord::in_service`).
#[inline(always)]
pub fn tcp_in_service(sk: u64, received: TcpReceived, off: &KernelOffsets) -> bool {
    if received.bytes == 0 || received.unread != 0 {
        return false;
    }
    if read::<u64>(sk, off.tcp_bytes_sent).unwrap_or(1) == 0 {
        return true;
    }
    let (Some(received_at), Some(sent_at)) = (
        read::<u32>(sk, off.icsk_ack_lrcvtime),
        read::<u32>(sk, off.tcp_lsndtime),
    ) else {
        return false;
    };
    // Jiffies: later if ahead by less than half the counter's range.
    (received_at.wrapping_sub(sent_at) as i32) > 0
}

/// How long the connection of `request`, the head of a TCP listener's
/// accept queue (`icsk_accept_queue.rskq_accept_head`: the queue is FIFO,
/// so the oldest), has waited, µs; 0 when its stamp is not yet written (it
/// entered the queue this instant).
#[inline(always)]
fn oldest_wait_us(request: u64, off: &KernelOffsets) -> u64 {
    let Some(queued_at) =
        read_ptr(request, off.request_sock_sk).and_then(|child| tcp_queued_at_us(child, off))
    else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now_us = unsafe { bpf_ktime_get_ns() } / 1000;
    now_us.saturating_sub(queued_at)
}

/// A Unix listener's queue: connections waiting (`sk_receive_queue.qlen`,
/// what `ss -lx` shows as Recv-Q) and the child socket of the skb at its
/// head (0 when empty).
#[inline(always)]
pub fn unix_queue(sk: u64, off: &KernelOffsets) -> (u32, u64) {
    let len = read::<u32>(sk, off.sk_receive_queue_qlen).unwrap_or(0);
    let list_head = sk + off.sk_receive_queue_next as u64;
    let head = match read_ptr(sk, off.sk_receive_queue_next) {
        Some(skb) if skb != list_head => read_ptr(skb, off.skb_sk).unwrap_or(0),
        _ => 0,
    };
    (len, head)
}

/// The socket behind the current process's descriptor `fd`:
/// current->files->fdt->fd[fd]->private_data (a `struct socket`)->sk; `None`
/// when `fd` is not open or not a socket. Every step is a helper call
/// (~70 ns here), so `max_fds` and the `fd` array pointer, neighbours in
/// `struct fdtable`, come in one read.
#[inline(always)]
pub fn current_fd_sock(fd: u64, off: &KernelOffsets) -> Option<u64> {
    // SAFETY: the helper takes no arguments and returns the running task.
    let task = unsafe { bpf_get_current_task() };
    let files = read_ptr(task, off.task_files)?;
    let fdt = read_ptr(files, off.files_fdt)?;
    let (max_fds, fd_array) = fdtable_head(fdt, off)?;
    if fd >= max_fds as u64 {
        return None;
    }
    let file = read_ptr(fd_array + fd * 8, 0)?;
    let socket = read_ptr(file, off.file_private_data)?;
    read_ptr(socket, off.socket_sk)
}

/// `struct fdtable`'s `max_fds` and `fd` in one read of the 16 bytes
/// from the first of them (the daemon checks, from BTF, that `fd` lies
/// 8 bytes after `max_fds`).
#[inline(always)]
pub fn fdtable_head(fdt: u64, off: &KernelOffsets) -> Option<(u32, u64)> {
    let head: [u64; 2] = read(fdt, off.fdtable_max_fds)?;
    let fd_array = head[1];
    (fd_array != 0).then_some((head[0] as u32, fd_array))
}

/// A Unix socket's `unix_sk(sk)->addr`: its bound address, which a listener
/// shares with the children it queues (see `observer_common::UnixListenKey`).
#[inline(always)]
pub fn unix_listen_key(sk: u64, off: &KernelOffsets) -> Option<u64> {
    read_ptr(sk, off.unix_addr)
}

/// Reads the path of the bound address `addr` into `name`, in place.
#[inline(always)]
pub fn read_unix_name(addr: u64, off: &KernelOffsets, name: &mut UnixNameRecord) {
    // `len` counts sun_family's 2 bytes too.
    let len = read::<i32>(addr, off.unix_address_len).unwrap_or(0) - 2;
    if len <= 0 || !read_into(addr + off.unix_address_path as u64, &mut name.path) {
        name.len = 0;
        return;
    }
    name.len = (len as u32).min(observer_common::UNIX_PATH_BYTES as u32);
}
