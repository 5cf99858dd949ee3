//! `iter/tcp`: the daemon runs this iterator at scrape time. It visits every
//! TCP socket of the daemon's network namespace (the kernel filters the walk
//! by the iterator's namespace) and writes one fixed-size [`ListenerRecord`]
//! per listening socket to the iterator's seq file. Listeners of other
//! namespaces come from `holders.rs`.
//! Reading depth at scrape time costs nothing per packet.
use aya_ebpf::{
    bindings::seq_file,
    helpers::{bpf_probe_read_kernel, generated::bpf_seq_write},
};
use core::ffi::c_void;
use observer_common::{ListenerRecord, TCP_LISTEN};

use crate::kernel::{
    SockHead, SockHeadBuf, offsets, read, read_ptr, socket_place, tcp_listen_figures,
};

/// Byte offset of `sk_common` in `struct bpf_iter__tcp` (after `meta`).
const ITER_TCP_SK_COMMON: usize = 8;

/// # Safety
/// Called by the kernel with a valid `struct bpf_iter__tcp *`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub unsafe extern "C" fn listeners(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx->meta is the first field, and meta->seq the first of bpf_iter_meta.
    let seq: *mut seq_file = unsafe { **(ctx as *const *const *mut seq_file) };
    // Copy the socket pointer out as a plain number (a probe read), so that
    // later arithmetic on it is not pointer arithmetic to the verifier.
    // SAFETY: reading a field of our own context.
    let sk = match unsafe {
        bpf_probe_read_kernel((ctx as *const u8).add(ITER_TCP_SK_COMMON) as *const u64)
    } {
        Ok(sk) if sk != 0 => sk,
        _ => return 0,
    };
    let off = offsets();
    let mut buf = SockHeadBuf::new();
    let Some(head) = SockHead::read(&mut buf, sk) else {
        return 0;
    };
    if head.field::<u8>(off.sk_state) != Some(TCP_LISTEN) {
        // The walk visits the listening hash first: past it, every socket
        // is a connection. Returning 1 ends the read (-EAGAIN, which the
        // daemon takes as the end), so the established hash, as large as
        // the host's connections and TIME_WAIT sockets, is not walked.
        return 1;
    }
    let Some(place) = socket_place(head, &off) else {
        return 0;
    };
    let inode = read_ptr(sk, off.sk_socket)
        .and_then(|socket| read::<u64>(socket, off.socket_alloc_vfs_inode + off.inode_i_ino))
        .unwrap_or(0);
    let figures = tcp_listen_figures(sk, inode, &off);
    let record = ListenerRecord {
        netns: place.netns,
        family: place.family,
        port: place.port,
        addr: place.addr,
        queue_len: figures.queue_len,
        queue_max: figures.queue_max,
        syn_queue_len: figures.syn_queue_len,
        drops: figures.drops,
        inode,
        oldest_wait_us: figures.oldest_wait_us,
        defer_accept: figures.defer_accept,
        _pad: [0; 7],
    };
    // SAFETY: `seq` is the iterator's seq_file; the record lives on our stack.
    unsafe {
        bpf_seq_write(
            seq,
            &record as *const ListenerRecord as *const c_void,
            core::mem::size_of::<ListenerRecord>() as u32,
        );
    }
    0
}
