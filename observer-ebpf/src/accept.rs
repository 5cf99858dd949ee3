//! One accepted connection → one count, and its wait in the listen queue.
//! Three sources see accepted connections; the daemon attaches one of them
//! (`--accept-source`), best first:
//!
//! - `accept_fexit`: fexit on `inet_csk_accept`, whose return value is the
//!   accepted socket. Every accept passes there, io_uring's included.
//! - `accept_kretprobe`: the same function's return through a kretprobe, for
//!   kernels that allow kprobes but not fexit.
//! - `accept_exit`: the `syscalls/sys_exit_accept4` and `sys_exit_accept`
//!   tracepoints, which find the socket through the returned fd. Works where
//!   neither of the above loads; misses accepts that bypass the syscalls.
//!
//! The wait needs no hook of its own: when the handshake completes and the
//! child socket enters the accept queue, the kernel stamps
//! `tcp_sock.rcvq_space.time` (µs, the clock of `bpf_ktime_get_ns`), and
//! nothing moves that stamp until the owner reads from the socket, which it
//! can only do after accept. So wait = now − that stamp.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fexit, kretprobe, tracepoint},
    programs::{FExitContext, RetProbeContext, TracePointContext},
};
use observer_common::{
    AF_UNIX, AcceptEvent, AcceptKey, AcceptStats, Health, IPPROTO_TCP, KernelOffsets, TCP_SYN_RECV,
    WAIT_BUCKETS, wait_bucket,
};

use crate::{
    connect::unix_queued_at_ns,
    kernel::{
        SockHead, SockHeadBuf, atomic_add, current_fd_sock, offsets, read, read_ptr, socket_place,
        sys_exit_ret, tcp_queued_at_us, tracing, unix_listen_key,
    },
    maps::{ACCEPTS, EVENTS, UNIX_QUEUED, count_health},
};

#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let fd = sys_exit_ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let off = offsets();
    match current_fd_sock(fd as u64, &off) {
        Some(sk) => count_accept(sk, &off),
        // Rare, and a sign of wrong offsets: counted and exported.
        None => count_health(Health::AcceptReadError),
    }
    0
}

/// `struct sock *inet_csk_accept(...)` returned: the accepted socket or NULL.
/// (Its arguments changed in 6.10; only the return value is used.)
#[fexit(function = "inet_csk_accept")]
pub fn accept_fexit(ctx: FExitContext) -> u32 {
    // bpf_get_func_ret (5.17+) finds the return value whatever the arity.
    match ctx.ret::<u64>() {
        Ok(sk) if sk != 0 => count_accept(sk, &offsets()),
        Ok(_) => {}
        Err(_) => count_health(Health::AcceptReadError),
    }
    0
}

/// `int unix_accept(struct socket *sock, struct socket *newsock, ...)`
/// returned: Unix-domain accepts do not pass `inet_csk_accept`. Attached
/// with `accept_fexit`. (Its third argument changed in 6.10; only `newsock`
/// is read.)
#[fexit(function = "unix_accept")]
pub fn accept_unix_fexit(ctx: FExitContext) -> u32 {
    // An int in a 64-bit register: only the low half is defined.
    if !matches!(ctx.ret::<u64>(), Ok(ret) if ret as u32 == 0) {
        return 0;
    }
    let off = offsets();
    let newsock: u64 = ctx.arg(1);
    match read_ptr(newsock, off.socket_sk) {
        Some(sk) => count_accept(sk, &off),
        None => count_health(Health::AcceptReadError),
    }
    0
}

/// The kprobe flavour of [`accept_fexit`].
#[kretprobe]
pub fn accept_kretprobe(ctx: RetProbeContext) -> u32 {
    let sk: u64 = ctx.ret();
    if sk != 0 {
        count_accept(sk, &offsets());
    }
    0
}

#[inline(always)]
fn count_accept(sk: u64, off: &KernelOffsets) {
    let mut buf = SockHeadBuf::new();
    let Some(head) = SockHead::read(&mut buf, sk) else {
        count_health(Health::AcceptReadError);
        return;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if head.field::<u16>(off.sk_family) == Some(AF_UNIX) {
        count_unix_accept(sk, head, off, tgid);
        return;
    }
    // Other families and non-TCP accepts are none of our business.
    let Some(place) = socket_place(head, off) else {
        return;
    };
    if read::<u16>(sk, off.sk_protocol) != Some(IPPROTO_TCP) {
        return;
    }
    let key = AcceptKey {
        netns: place.netns,
        tgid,
        family: place.family,
        port: place.port,
        _pad: 0,
        addr: place.addr,
    };
    let Some(stats) = stats_for(&key) else {
        count_health(Health::AcceptMapFull);
        return;
    };
    // SAFETY: `stats` points into a live map value (RCU keeps it alive for
    // this program run).
    unsafe { atomic_add(&raw mut (*stats).accepted, 1) };
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let wait_us = queue_wait_us(sk, head, off, now_ns / 1000);
    if tracing() {
        let wait_ns = wait_us.map_or(u64::MAX, |us| us * 1000);
        emit_event(head, off, &key, now_ns, wait_ns);
    }
    match wait_us {
        Some(wait_us) => record_wait(stats, wait_us),
        None => count_health(Health::WaitUnknown),
    }
}

/// A Unix-domain accept, counted under its listener's
/// [`observer_common::UnixListenKey`], with the wait since the stamp that
/// its connect() left (see `connect`). No stamp means that the worker took
/// it before connect() returned: a wait of 0. (Also, rarely: queued before
/// the daemon started, or its stamp aged out of a full map.)
#[inline(always)]
fn count_unix_accept(sk: u64, head: &SockHead, off: &KernelOffsets, tgid: u32) {
    let Some(listen_key) = unix_listen_key(sk, off) else {
        return;
    };
    let Some(netns) = head
        .field::<u64>(off.sk_net)
        .and_then(|net| read::<u32>(net, off.net_ns_inum))
    else {
        count_health(Health::AcceptReadError);
        return;
    };
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&listen_key.to_ne_bytes());
    let key = AcceptKey {
        netns,
        tgid,
        family: AF_UNIX,
        port: 0,
        _pad: 0,
        addr,
    };
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let wait_ns = match unix_queued_at_ns(sk) {
        Some(queued_at_ns) => {
            let _ = UNIX_QUEUED.remove(sk);
            now_ns.saturating_sub(queued_at_ns)
        }
        None => 0,
    };
    match stats_for(&key) {
        Some(stats) => {
            // SAFETY: `stats` points into a live map value.
            unsafe { atomic_add(&raw mut (*stats).accepted, 1) };
            record_wait(stats, wait_ns / 1000);
        }
        None => count_health(Health::AcceptMapFull),
    }
    if tracing() {
        emit_event(head, off, &key, now_ns, wait_ns);
    }
}

/// Adds one wait to the sum and histogram of `stats`.
#[inline(always)]
fn record_wait(stats: *mut AcceptStats, wait_us: u64) {
    let mut bucket = wait_bucket(wait_us);
    if bucket > WAIT_BUCKETS {
        bucket = WAIT_BUCKETS; // proves the bound to the verifier
    }
    // SAFETY (whole block): `stats` points into a live map value (RCU keeps
    // it alive for this program run); atomics because other CPUs add to it
    // too.
    unsafe {
        atomic_add(&raw mut (*stats).wait_sum_ns, wait_us * 1000);
        atomic_add(
            (&raw mut (*stats).wait_buckets).cast::<u64>().add(bucket),
            1,
        );
    }
}

/// How long the child socket `sk` waited in the accept queue, by its
/// queue-entry stamp; `None` when the stamp is unreadable.
///
/// At `inet_csk_accept`'s return (the fexit and kprobe sources) a child can
/// be dequeued while the CPU that queued it is still finishing its handshake
/// (the child is queued before it processes the final ACK, which is when the
/// stamp is written): still `TCP_SYN_RECV` with no stamp, it entered the
/// queue just now, so its wait is 0. (Seen under load on 6.12: 1 accept in
/// ~3500.) The tracepoint source runs after `inet_accept` has locked the
/// child, so it always finds the stamp.
#[inline(always)]
fn queue_wait_us(sk: u64, head: &SockHead, off: &KernelOffsets, now_us: u64) -> Option<u64> {
    if let Some(queued_at_us) = tcp_queued_at_us(sk, off) {
        return now_us.checked_sub(queued_at_us);
    }
    (head.field::<u8>(off.sk_state)? == TCP_SYN_RECV).then_some(0)
}

/// Streams one accepted connection to `observer trace`; a full ring buffer
/// is counted, never silently lost.
#[inline(always)]
fn emit_event(head: &SockHead, off: &KernelOffsets, key: &AcceptKey, now_ns: u64, wait_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<AcceptEvent>(0) else {
        count_health(Health::TraceEventLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY (whole block): `event` is our reserved, exclusively owned slot
    // of the ring buffer; every field is written before it is submitted
    // (written in place: an event built on the stack and moved in would
    // overflow the 512-byte BPF stack).
    unsafe {
        (*event).time_ns = now_ns;
        (*event).wait_ns = wait_ns;
        (*event).tgid = key.tgid;
        (*event).tid = bpf_get_current_pid_tgid() as u32;
        (*event).netns = key.netns;
        (*event).family = key.family;
        (*event).port = key.port;
        (*event)._pad = [0; 6];
        (*event).addr = key.addr;
        (*event).peer_port = 0;
        (*event).peer_addr = [0; 16];
        if key.family == observer_common::AF_INET {
            let v4: [u8; 4] = head.field(off.sk_daddr).unwrap_or([0; 4]);
            (*event).peer_addr = [
                v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            (*event).peer_port = u16::from_be(head.field(off.sk_dport).unwrap_or(0));
        } else if key.family == observer_common::AF_INET6 {
            (*event).peer_addr = head.field(off.sk_v6_daddr).unwrap_or([0; 16]);
            (*event).peer_port = u16::from_be(head.field(off.sk_dport).unwrap_or(0));
        }
        (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    entry.submit(0);
}

/// The stats slot for `key`, created zeroed on first use; `None` when full.
#[inline(always)]
fn stats_for(key: &AcceptKey) -> Option<*mut AcceptStats> {
    if let Some(stats) = ACCEPTS.get_ptr_mut(key) {
        return Some(stats);
    }
    // Another CPU may insert the same key first: NOEXIST fails, lookup wins.
    let _ = ACCEPTS.insert(key, AcceptStats::ZERO, BPF_NOEXIST as u64);
    ACCEPTS.get_ptr_mut(key)
}
