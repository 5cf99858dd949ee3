//! When a Unix-domain connection entered its listener's queue. A TCP child
//! carries that stamp in the kernel (`rcvq_space.time`); a Unix one carries
//! none, so these programs write it, once per successful Unix stream or
//! seqpacket connect(), into `UNIX_QUEUED`, keyed by the child socket that
//! accept() will return. The accept programs take it out (the wait), and the
//! holder iterator reads the queue head's (the oldest wait).
//!
//! - `connect_unix_fexit`: fexit on `unix_stream_connect` (seqpacket
//!   connects call it too); attached with the fexit accept source. Runs for
//!   Unix stream connects only.
//! - `connect_exit`: the `syscalls/sys_exit_connect` tracepoint, attached
//!   with the tracepoint accept source. It runs for every connect() on the
//!   host; anything but a successful AF_UNIX connect leaves after reading
//!   the address family the caller passed (three helper calls).
//!
//! The stamp is taken as connect() returns, microseconds after the child
//! was queued. A worker woken by that very connect can accept it first;
//! the stamp is then skipped (the child already has its `struct socket`),
//! and the accept, finding none, counts a wait of 0.
use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};
use observer_common::{AF_UNIX, KernelOffsets, SOCK_SEQPACKET, SOCK_STREAM};

use crate::{
    kernel::{current_fd_sock, offsets, read, read_ptr, sys_exit_ret, syscall_arg},
    maps::UNIX_QUEUED,
};

/// `int unix_stream_connect(struct socket *sock, ...)` returned.
#[fexit(function = "unix_stream_connect")]
pub fn connect_unix_fexit(ctx: FExitContext) -> u32 {
    // An int in a 64-bit register: only the low half is defined.
    if !matches!(ctx.ret::<u64>(), Ok(ret) if ret as u32 == 0) {
        return 0;
    }
    let off = offsets();
    let sock: u64 = ctx.arg(0);
    if let Some(client) = read_ptr(sock, off.socket_sk) {
        stamp_queued_child(client, &off);
    }
    0
}

/// `connect(fd, uservaddr, addrlen)` returned.
#[tracepoint]
pub fn connect_exit(ctx: TracePointContext) -> u32 {
    if sys_exit_ret(&ctx) != 0 {
        return 0; // Unix connects never return EINPROGRESS: queued means 0
    }
    let off = offsets();
    // The arguments, from the registers the task entered the syscall with.
    // SAFETY: the helpers take the running task, which they return typed.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let Some(uservaddr) = syscall_arg(regs, &off, 1) else {
        return 0;
    };
    // SAFETY: bpf_probe_read_user checks the user address and fails cleanly.
    let family = unsafe { bpf_probe_read_user(uservaddr as *const u16) };
    if family != Ok(AF_UNIX) {
        return 0;
    }
    let Some(client) = syscall_arg(regs, &off, 0).and_then(|fd| current_fd_sock(fd, &off)) else {
        return 0;
    };
    stamp_queued_child(client, &off);
    0
}

/// Stamps the child that the connected Unix socket `client` queued on its
/// listener, unless a worker has accepted it already.
#[inline(always)]
fn stamp_queued_child(client: u64, off: &KernelOffsets) {
    if read::<u16>(client, off.sk_family) != Some(AF_UNIX) {
        return;
    }
    // A datagram socket's peer is the server's own socket: no queue.
    let kind = read::<u16>(client, off.sk_type);
    if kind != Some(SOCK_STREAM) && kind != Some(SOCK_SEQPACKET) {
        return;
    }
    let Some(child) = read_ptr(client, off.unix_peer) else {
        return;
    };
    // Grafted onto a `struct socket` by unix_accept: no longer queued.
    if read::<u64>(child, off.sk_socket) != Some(0) {
        return;
    }
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    // Full: the LRU map drops its least recently used stamp.
    let _ = UNIX_QUEUED.insert(child, now_ns, 0);
}

/// When the queued Unix connection whose child socket is `child` entered
/// its listener's queue (ns, the clock of `bpf_ktime_get_ns`), if stamped.
#[inline(always)]
pub fn unix_queued_at_ns(child: u64) -> Option<u64> {
    // SAFETY: a plain value copied out of the map entry at once.
    unsafe { UNIX_QUEUED.get(child) }.copied()
}
