//! `tp_btf/kfree_skb`: counts, per listening TCP socket, the segments the
//! kernel discarded on it without losing a connection, so that the walks
//! can tell real drops from the rest of `sk_drops`.
//!
//! A listener's `sk_drops` (ss's `d<N>`) counts its real drops (accept queue
//! or SYN queue full: what ListenDrops counts, one each) and every segment
//! `tcp_v4_rcv`/`tcp_v6_rcv` discarded on it: the bare ACK of each
//! handshake under `TCP_DEFER_ACCEPT`, resets of half-open connections, a
//! handshake's ACK that overflowed the queue (counted a second time), and
//! a listener's own discards (`tcp_drop_reason`). Each of those is freed
//! with `kfree_skb` and the listener as `rx_sk` (Linux 6.11+); a dropped SYN
//! is not (`consume_skb`). Freed segments that never went into `sk_drops`
//! are left out: those of the listener's receive path and the syncookie
//! check (by the code address that freed them) and bad checksums.
//!
//! The hook fires only for freed-and-dropped packets, not for every packet:
//! it returns at once unless the packet was received on a listening socket.
use core::ffi::c_void;

use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use observer_common::{DiscardSites, ListenDiscards, TCP_LISTEN};

use crate::{
    kernel::{atomic_add, offsets, read, read_ptr},
    maps::LISTEN_DISCARDS,
};

/// Filled in by the daemon before load, like `OFFSETS`.
#[unsafe(no_mangle)]
static DISCARD_SITES: DiscardSites = DiscardSites {
    uncounted: [[0; 2]; observer_common::DISCARD_SITES_UNCOUNTED],
    csum_reason: 0,
    _pad: 0,
};

/// `kfree_skb(skb, location, reason, rx_sk)`: argument slots in the context.
const ARG_SKB: usize = 0;
const ARG_LOCATION: usize = 1;
const ARG_REASON: usize = 2;
const ARG_RX_SK: usize = 3;

/// # Safety
/// Called by the kernel with the tracepoint's arguments as an array of u64.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/kfree_skb")]
pub unsafe extern "C" fn listen_discards(ctx: *mut c_void) -> i32 {
    // SAFETY: a BTF tracepoint's context is its arguments, one u64 each; a
    // kernel whose kfree_skb has no 4th argument refuses the program at load.
    let arg = |n: usize| unsafe { core::ptr::read_volatile((ctx as *const u64).add(n)) };
    let sk = arg(ARG_RX_SK);
    if sk == 0 {
        return 0;
    }
    let off = offsets();
    if read::<u8>(sk, off.sk_state) != Some(TCP_LISTEN) {
        return 0;
    }
    // SAFETY: reading our own static; volatile only defeats constant folding.
    let sites = unsafe { core::ptr::read_volatile(&DISCARD_SITES) };
    if arg(ARG_REASON) as u32 == sites.csum_reason {
        return 0;
    }
    let location = arg(ARG_LOCATION);
    let mut i = 0;
    while i < sites.uncounted.len() {
        let [start, end] = sites.uncounted[i];
        if location >= start && location < end {
            return 0;
        }
        i += 1;
    }
    // Copied out as plain numbers: arithmetic on the typed arguments would
    // be pointer arithmetic to the verifier.
    count(sk, segments(arg(ARG_SKB)));
    0
}

/// What `sk_drops` went up by for this packet: its GSO segments, at least 1.
#[inline(always)]
fn segments(skb: u64) -> u64 {
    if skb == 0 {
        return 1;
    }
    let off = offsets();
    let head = read_ptr(skb, off.skb_head).unwrap_or(0);
    let end = read::<u32>(skb, off.skb_end).unwrap_or(0) as u64;
    let gso_segs = if head == 0 {
        0
    } else {
        read::<u16>(head + end, off.shinfo_gso_segs).unwrap_or(0)
    };
    gso_segs.max(1) as u64
}

#[inline(always)]
fn count(sk: u64, segments: u64) {
    let off = offsets();
    let inode = read_ptr(sk, off.sk_socket)
        .and_then(|socket| read::<u64>(socket, off.socket_alloc_vfs_inode + off.inode_i_ino))
        .unwrap_or(0);
    let fresh = ListenDiscards { segments: 0, inode };
    let entry = match LISTEN_DISCARDS.get_ptr_mut(sk) {
        // SAFETY: a live map value (RCU keeps it for this run).
        Some(entry) if unsafe { (*entry).inode } == inode => entry,
        found => {
            // New: another CPU inserting first makes NOEXIST fail, and both
            // add to its entry below. An address a closed listener left:
            // start over from zero.
            let flags = if found.is_some() {
                BPF_EXIST
            } else {
                BPF_NOEXIST
            };
            let _ = LISTEN_DISCARDS.insert(sk, fresh, flags as u64);
            match LISTEN_DISCARDS.get_ptr_mut(sk) {
                Some(entry) => entry,
                None => return,
            }
        }
    };
    // SAFETY: a live map value; other CPUs add to it at the same time.
    unsafe { atomic_add(&raw mut (*entry).segments, segments) };
}
