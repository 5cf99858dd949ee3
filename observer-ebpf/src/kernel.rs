//! Reading kernel structs at offsets the daemon resolved from BTF.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use observer_common::KernelOffsets;

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

/// Reads a `T` at `base + offset` in kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Follows a pointer stored at `base + offset`.
#[inline(always)]
pub fn read_ptr(base: u64, offset: u32) -> Option<u64> {
    read::<u64>(base, offset).filter(|p| *p != 0)
}

/// The socket's network namespace inode, family, local port and address.
pub struct SocketPlace {
    pub netns: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

/// Reads where a socket lives; `None` for anything but an IPv4/IPv6 socket.
#[inline(always)]
pub fn socket_place(sk: u64, off: &KernelOffsets) -> Option<SocketPlace> {
    let family: u16 = read(sk, off.sk_family)?;
    let mut addr = [0u8; 16];
    if family == observer_common::AF_INET {
        let v4: [u8; 4] = read(sk, off.sk_rcv_saddr)?;
        addr[..4].copy_from_slice(&v4);
    } else if family == observer_common::AF_INET6 {
        addr = read(sk, off.sk_v6_rcv_saddr)?;
    } else {
        return None;
    }
    let port: u16 = read(sk, off.sk_num)?;
    let net = read_ptr(sk, off.sk_net)?;
    let netns: u32 = read(net, off.net_ns_inum)?;
    Some(SocketPlace {
        netns,
        family,
        port,
        addr,
    })
}
