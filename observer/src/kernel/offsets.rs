//! The kernel struct offsets the eBPF programs need, from this kernel's BTF.
use anyhow::{Context as _, Result, ensure};
use observer_common::{KernelOffsets, SOCK_COMMON_HEAD};

use super::btf::Btf;

/// Resolves every field the programs read; the error names the first one this
/// kernel lacks.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let at = |s: &str, path: &[&str]| btf.member_offset(s, path);
    let syscall = syscall_registers(btf)?;
    let offsets = KernelOffsets {
        task_files: at("task_struct", &["files"])?,
        files_fdt: at("files_struct", &["fdt"])?,
        fdtable_fd: at("fdtable", &["fd"])?,
        fdtable_max_fds: at("fdtable", &["max_fds"])?,
        file_private_data: at("file", &["private_data"])?,
        socket_sk: at("socket", &["sk"])?,
        // struct sock starts with its sock_common, so these are offsets in both.
        sk_family: at("sock_common", &["skc_family"])?,
        sk_state: at("sock_common", &["skc_state"])?,
        sk_num: at("sock_common", &["skc_num"])?,
        sk_rcv_saddr: at("sock_common", &["skc_rcv_saddr"])?,
        sk_v6_rcv_saddr: at("sock_common", &["skc_v6_rcv_saddr"])?,
        sk_net: at("sock_common", &["skc_net", "net"])?,
        net_ns_inum: at("net", &["ns", "inum"])?,
        sk_protocol: at("sock", &["sk_protocol"])?,
        sk_ack_backlog: at("sock", &["sk_ack_backlog"])?,
        sk_max_ack_backlog: at("sock", &["sk_max_ack_backlog"])?,
        sk_drops: at("sock", &["sk_drops"])?,
        sk_socket: at("sock", &["sk_socket"])?,
        icsk_accept_queue_qlen: at("inet_connection_sock", &["icsk_accept_queue", "qlen"])?,
        tcp_rcvq_space_time: at("tcp_sock", &["rcvq_space", "time"])?,
        socket_alloc_vfs_inode: at("socket_alloc", &["vfs_inode"])?,
        inode_i_ino: at("inode", &["i_ino"])?,
        inode_i_mode: at("inode", &["i_mode"])?,
        file_f_inode: at("file", &["f_inode"])?,
        task_tgid: at("task_struct", &["tgid"])?,
        task_real_parent: at("task_struct", &["real_parent"])?,
        task_comm: at("task_struct", &["comm"])?,
        sk_daddr: at("sock_common", &["skc_daddr"])?,
        sk_v6_daddr: at("sock_common", &["skc_v6_daddr"])?,
        sk_dport: at("sock_common", &["skc_dport"])?,
        task_pid: at("task_struct", &["pid"])?,
        // `__state` since 5.14 (`state`, a long, before).
        task_state: at("task_struct", &["__state"]).or_else(|_| at("task_struct", &["state"]))?,
        task_group_leader: at("task_struct", &["group_leader"])?,
        task_start_time: at("task_struct", &["start_time"])?,
        regs_syscall_nr: syscall.nr,
        regs_syscall_nr_bytes: syscall.nr_bytes,
        regs_args: syscall.args,
        sk_receive_queue_next: at("sock", &["sk_receive_queue", "next"])?,
        sk_receive_queue_qlen: at("sock", &["sk_receive_queue", "qlen"])?,
        skb_sk: at("sk_buff", &["sk"])?,
        unix_addr: at("unix_sock", &["addr"])?,
        unix_address_len: at("unix_address", &["len"])?,
        // `name` is a flexible array of sockaddr_un.
        unix_address_path: at("unix_address", &["name"])? + at("sockaddr_un", &["sun_path"])?,
        icsk_accept_queue_head: at(
            "inet_connection_sock",
            &["icsk_accept_queue", "rskq_accept_head"],
        )?,
        request_sock_sk: at("request_sock", &["sk"])?,
        unix_peer: at("unix_sock", &["peer"])?,
        sk_type: at("sock", &["sk_type"])?,
        tcp_bytes_received: at("tcp_sock", &["bytes_received"])?,
        tcp_rcv_nxt: at("tcp_sock", &["rcv_nxt"])?,
        tcp_copied_seq: at("tcp_sock", &["copied_seq"])?,
        rskq_defer_accept: at(
            "inet_connection_sock",
            &["icsk_accept_queue", "rskq_defer_accept"],
        )?,
        skb_head: at("sk_buff", &["head"])?,
        skb_end: at("sk_buff", &["end"])?,
        shinfo_gso_segs: at("skb_shared_info", &["gso_segs"])?,
        eventpoll_rbr: at("eventpoll", &["rbr"])?,
        epitem_rbn: at("epitem", &["rbn"])?,
        epitem_ffd: at("epitem", &["ffd"])?,
        rb_right: at("rb_node", &["rb_right"])?,
        rb_left: at("rb_node", &["rb_left"])?,
        tcp_bytes_sent: at("tcp_sock", &["bytes_sent"])?,
        tcp_lsndtime: at("tcp_sock", &["lsndtime"])?,
        icsk_ack_lrcvtime: at("inet_connection_sock", &["icsk_ack", "lrcvtime"])?,
    };
    check_wide_reads(&offsets)?;
    Ok(offsets)
}

/// Where a task's saved user registers (`struct pt_regs`) keep the number
/// of the syscall it is in and that syscall's first four arguments.
struct SyscallRegisters {
    nr: u32,
    nr_bytes: u32,
    args: [u32; 4],
}

/// x86_64: `orig_ax` (a long), then `di`, `si`, `dx`, `r10` (the syscall
/// ABI's argument registers).
#[cfg(target_arch = "x86_64")]
fn syscall_registers(btf: &Btf) -> Result<SyscallRegisters> {
    let at = |field: &str| btf.member_offset("pt_regs", &[field]);
    Ok(SyscallRegisters {
        nr: at("orig_ax")?,
        nr_bytes: 8,
        args: [at("di")?, at("si")?, at("dx")?, at("r10")?],
    })
}

/// arm64: `syscallno` (an s32), then `orig_x0` (the first argument: `x0`
/// is overwritten by the return value) and `regs[1..=3]`.
#[cfg(target_arch = "aarch64")]
fn syscall_registers(btf: &Btf) -> Result<SyscallRegisters> {
    let at = |field: &str| btf.member_offset("pt_regs", &[field]);
    let regs = at("regs")?;
    Ok(SyscallRegisters {
        nr: at("syscallno")?,
        nr_bytes: 4,
        args: [at("orig_x0")?, regs + 8, regs + 16, regs + 24],
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("observer reads syscall registers on x86_64 and aarch64 only");

/// The programs read some structs in one helper call instead of one per
/// field: the head of `sock_common` and `fdtable`'s first two fields.
/// Refuse a kernel whose layout would put a field outside.
fn check_wide_reads(o: &KernelOffsets) -> Result<()> {
    // (field, its offset, its size)
    let head_fields = [
        ("skc_family", o.sk_family, 2),
        ("skc_state", o.sk_state, 1),
        ("skc_num", o.sk_num, 2),
        ("skc_rcv_saddr", o.sk_rcv_saddr, 4),
        ("skc_v6_rcv_saddr", o.sk_v6_rcv_saddr, 16),
        ("skc_net", o.sk_net, 8),
        ("skc_daddr", o.sk_daddr, 4),
        ("skc_v6_daddr", o.sk_v6_daddr, 16),
        ("skc_dport", o.sk_dport, 2),
    ];
    for (name, offset, size) in head_fields {
        ensure!(
            offset as usize + size <= SOCK_COMMON_HEAD,
            "sock_common.{name} lies at byte {offset}, past the {SOCK_COMMON_HEAD} bytes observer reads at once"
        );
    }
    ensure!(
        o.epitem_ffd.is_multiple_of(8),
        "epitem.ffd is not 8-byte aligned (observer reads its file and fd at once)"
    );
    ensure!(
        o.fdtable_fd == o.fdtable_max_fds + 8,
        "fdtable.fd is not 8 bytes after fdtable.max_fds (observer reads both at once)"
    );
    Ok(())
}

/// What the programs need to know of the running kernel, from its BTF.
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    /// `SKB_DROP_REASON_TCP_CSUM`, where the kernel names drop reasons
    /// (5.17+; its number changes between kernels).
    pub csum_drop_reason: Option<u32>,
}

/// Reads BTF from `path` and resolves the offsets, with a message that says
/// what this kernel is missing.
pub fn from_kernel(path: &std::path::Path) -> Result<KernelLayout> {
    let btf = Btf::from_file(path)?;
    let offsets = resolve(&btf).context("this kernel lacks a struct field observer reads")?;
    Ok(KernelLayout {
        offsets,
        csum_drop_reason: btf
            .enumerator("SKB_DROP_REASON_TCP_CSUM")
            .and_then(|v| u32::try_from(v).ok()),
    })
}
