//! The kernel struct offsets the eBPF programs need, from this kernel's BTF.
use anyhow::{Context as _, Result};
use observer_common::KernelOffsets;

use super::btf::Btf;

/// Resolves every field the programs read; the error names the first one this
/// kernel lacks.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let at = |s: &str, path: &[&str]| btf.member_offset(s, path);
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
    };
    Ok(offsets)
}

/// Reads BTF from `path` and resolves the offsets, with a message that says
/// what this kernel is missing.
pub fn from_kernel(path: &std::path::Path) -> Result<KernelOffsets> {
    let btf = Btf::from_file(path)?;
    resolve(&btf).context("this kernel lacks a struct field observer reads")
}
