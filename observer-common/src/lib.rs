//! The contract between observer's eBPF programs and its daemon: map keys,
//! map values, records and settings, laid out `#[repr(C)]` so both sides read
//! the same bytes. Nothing else may define a type that crosses the boundary.
#![no_std]

/// `AF_UNIX` as the kernel stores it in `sock_common.skc_family`.
pub const AF_UNIX: u16 = 1;
/// `AF_INET` as the kernel stores it in `sock_common.skc_family`.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as the kernel stores it in `sock_common.skc_family`.
pub const AF_INET6: u16 = 10;
/// `TCP_LISTEN` in `sock_common.skc_state`.
pub const TCP_LISTEN: u8 = 10;
/// `IPPROTO_TCP` in `sock.sk_protocol`.
pub const IPPROTO_TCP: u16 = 6;
/// `TCP_ESTABLISHED` in `sock_common.skc_state`.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_SYN_RECV`: a child socket still completing its handshake.
pub const TCP_SYN_RECV: u8 = 3;
/// `TCP_CLOSE_WAIT` in `sock_common.skc_state` (peer closed, we have not yet).
pub const TCP_CLOSE_WAIT: u8 = 8;

/// Bytes of a Unix socket name (`sockaddr_un.sun_path`).
pub const UNIX_PATH_BYTES: usize = 108;

/// Upper bounds (inclusive, microseconds) of the accept-queue wait histogram
/// buckets, from 100 µs to 60 s. The kernel side counts each accepted
/// connection into the first bucket whose bound is >= its wait; one extra slot
/// past the end holds waits above the last bound (+Inf).
pub const WAIT_BUCKET_BOUNDS_US: [u64; WAIT_BUCKETS] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// Number of finite histogram buckets.
pub const WAIT_BUCKETS: usize = 18;

/// Capacity of the `ACCEPTS` map (distinct listener address × accepting
/// process pairs alive at once). Inserts beyond it are counted in
/// [`Health::AcceptMapFull`], never silently lost.
pub const ACCEPT_MAP_CAPACITY: u32 = 8192;

/// Capacity of the `WATCHED` map (worker processes whose threads the sampler
/// reports).
pub const WORKER_MAP_CAPACITY: u32 = 16384;
/// Capacity of the `WATCHED_MASTERS` map (the masters of watched pools).
pub const MASTER_MAP_CAPACITY: u32 = 4096;

/// Capacity of the `LISTEN_PORTS` map ((netns, port) pairs with a listener).
pub const LISTEN_PORT_MAP_CAPACITY: u32 = 16384;

/// Queued Unix-domain connections whose enqueue time is kept (an LRU map:
/// past this many connections waiting host-wide, the oldest stamps go).
pub const UNIX_QUEUED_MAP_CAPACITY: u32 = 16384;
/// Listening sockets' files the holder iterator remembers per scan, to tell
/// a child's inherited copies from sockets of its own (see
/// [`InheritableListener`]). Past this many, the oldest are forgotten: a
/// child writes a record for each copy of those, its count falls short of
/// its parent's, and the daemon reads the fds it misses from /proc.
pub const INHERITABLE_MAP_CAPACITY: u32 = 65536;

/// `sock.sk_type` of the Unix sockets that have listeners.
pub const SOCK_STREAM: u16 = 1;
pub const SOCK_SEQPACKET: u16 = 5;

/// Key of `LISTEN_PORTS`: the daemon lists the ports that have a listener so
/// that the socket-holder iterator reports only accepted connections of them.
/// (Unix listeners are keyed by [`UnixListenKey`] instead: below 2^48, these
/// keys never meet a kernel address.)
#[inline(always)]
pub fn listen_port_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

/// What ties an accepted Unix connection to its listener: the kernel address
/// of the listener's `struct unix_address`, which `unix_stream_connect`
/// shares with every child of the listener. It names the listener while it
/// lives; the daemon maps it to the path through the listener's record, and
/// uses it as the listener's `LISTEN_PORTS` key (kernel addresses are above
/// 2^63, so they never meet a [`listen_port_key`]).
pub type UnixListenKey = u64;

/// Listener fds (and epoll fds watching a listener) kept per worker process.
pub const WORKER_FD_SLOTS: usize = 4;

/// The fds on which a worker process waits for new work: its listening
/// sockets, and epoll instances that have a listening socket in their set.
/// A wait syscall counts as "waiting for work" only when it waits on one of
/// them (a `ppoll` inside Ruby's `sleep`, or Python's socket timeouts, does
/// not). Unused slots are -1. Written by the daemon into `WATCHED`; the
/// thread sampler reads `listen` to know which bits of a select() set to read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerFds {
    pub listen: [i32; WORKER_FD_SLOTS],
    pub epoll: [i32; WORKER_FD_SLOTS],
}

impl WorkerFds {
    pub const EMPTY: WorkerFds = WorkerFds {
        listen: [-1; WORKER_FD_SLOTS],
        epoll: [-1; WORKER_FD_SLOTS],
    };
}

/// One socket held open by a process, as the `iter/task_file` program
/// writes it: TCP and Unix-domain listening sockets (with their queue
/// figures: this iterator sees every network namespace, `iter/tcp` only the
/// daemon's), and accepted connections of listened ports and paths.
///
/// A Unix socket (`family` = [`AF_UNIX`]) has no address or port: `addr`
/// holds its listener's [`UnixListenKey`] (first 8 bytes, native order), and
/// a Unix *listener*'s record is followed in the stream by a
/// [`UnixNameRecord`] with its path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HolderRecord {
    pub tgid: u32,
    /// Parent's tgid, to tell a pool's master from its workers.
    pub ppid: u32,
    pub fd: u32,
    pub netns: u32,
    pub family: u16,
    pub port: u16,
    /// `TCP_LISTEN`, `TCP_ESTABLISHED` or `TCP_CLOSE_WAIT` (Unix sockets
    /// use the same numbers).
    pub state: u8,
    /// For TCP listeners, as in [`ListenerRecord`]; 0 otherwise.
    pub defer_accept: u8,
    /// Accepted TCP connections: 1 when they hold a request in service:
    /// the client has sent bytes, the server has read all of them, and has
    /// sent nothing since the last ones arrived (`bytes_sent` 0, or
    /// `icsk_ack.lrcvtime` after `lsndtime`). A response written in pieces
    /// counts as answered from its first one.
    pub in_service: u8,
    /// Listening sockets: 1 when this process is the first of the scan to
    /// hold the socket's file. A child holding the same file at the same fd
    /// writes no record for it, and counts it in its
    /// [`INHERITED_LISTENERS`] record instead.
    pub inheritable: u8,
    pub addr: [u8; 16],
    pub inode: u64,
    pub comm: [u8; 16],
    /// For listening sockets, as in [`ListenerRecord`]; 0 otherwise.
    pub queue_len: u32,
    pub queue_max: u32,
    pub syn_queue_len: u32,
    pub drops: u32,
    /// As in [`ListenerRecord`]; for Unix listeners, from the stamp the
    /// connect programs wrote for the head connection.
    pub oldest_wait_us: u64,
    /// Unix listeners: the kernel address of the connection at the head of
    /// the queue (0 when empty). Where its connect() was not stamped (it
    /// came before the daemon), `oldest_wait_us` is 0 and the daemon times
    /// the head itself.
    pub queue_head: u64,
    /// Accepted TCP connections: nonzero when the client has sent bytes and
    /// the server has read none of them yet (`tcp_sock.bytes_received` > 0,
    /// all of it still between `copied_seq` and `rcv_nxt`): µs since the
    /// connection entered the accept queue (its `rcvq_space.time` stamp,
    /// which only the first read moves), at least 1. 0 otherwise.
    pub unread_us: u64,
    /// A record with `state` [`INHERITED_LISTENERS`]: how many of its
    /// parent's inheritable listening sockets this process holds at the
    /// parent's fds (the parent's records stand for them). A process's
    /// count can come in several records: the daemon adds them up.
    pub inherited: u32,
    pub _pad: u32,
}

/// [`HolderRecord::state`] of a record that holds no socket but the count
/// of listening sockets a process inherited from its parent
/// ([`HolderRecord::inherited`]): 1,000 workers that inherited 10,000
/// listeners are 1,000 records, not 10 million.
pub const INHERITED_LISTENERS: u8 = 0xff;

/// The first holder, in one scan, of a listening socket's file: by the
/// file's kernel address, in the holder iterator's `INHERITABLE` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InheritableListener {
    pub session: u64,
    pub tgid: u32,
    pub fd: u32,
}

/// The path of a Unix listener, right after its [`HolderRecord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixNameRecord {
    /// Bytes of `path` in use (`sun_path`'s part of the bound address
    /// length); an abstract name starts with a NUL byte.
    pub len: u32,
    pub path: [u8; UNIX_PATH_BYTES],
}

impl Default for UnixNameRecord {
    fn default() -> Self {
        UnixNameRecord {
            len: 0,
            path: [0; UNIX_PATH_BYTES],
        }
    }
}

/// fds of a poll()/ppoll() call (its first pollfd entries) or of a select()
/// set (the process's listeners found in it) that a [`ThreadSample`] carries.
pub const POLLED_FDS: usize = 16;

/// The syscalls whose numbers the thread sampler and the busy/idle rule
/// (`activity.rs`) read: the target architecture's own table, for the
/// daemon (`target_arch`) and for the eBPF programs built for it
/// (`bpf_target_arch`, which aya-build sets from the daemon's target).
pub use syscalls::*;

#[cfg(not(any(target_arch = "aarch64", bpf_target_arch = "aarch64")))]
mod syscalls {
    //! x86_64 (arch/x86/entry/syscalls/syscall_64.tbl).
    pub const SYS_POLL: i64 = 7;
    pub const SYS_SELECT: i64 = 23;
    pub const SYS_ACCEPT: i64 = 43;
    pub const SYS_FCNTL: i64 = 72;
    pub const SYS_FLOCK: i64 = 73;
    pub const SYS_FUTEX: i64 = 202;
    pub const SYS_EPOLL_WAIT: i64 = 232;
    pub const SYS_PSELECT6: i64 = 270;
    pub const SYS_PPOLL: i64 = 271;
    pub const SYS_EPOLL_PWAIT: i64 = 281;
    pub const SYS_ACCEPT4: i64 = 288;
    pub const SYS_IO_URING_ENTER: i64 = 426;
    pub const SYS_EPOLL_PWAIT2: i64 = 441;
}

#[cfg(any(target_arch = "aarch64", bpf_target_arch = "aarch64"))]
mod syscalls {
    //! arm64: the generic table (include/uapi/asm-generic/unistd.h), which
    //! has no poll, select or epoll_wait (libc calls ppoll, pselect6 and
    //! epoll_pwait). Those three get numbers no syscall has, so that they
    //! match nothing.
    pub const SYS_POLL: i64 = -1001;
    pub const SYS_SELECT: i64 = -1002;
    pub const SYS_EPOLL_WAIT: i64 = -1003;
    pub const SYS_EPOLL_PWAIT: i64 = 22;
    pub const SYS_FCNTL: i64 = 25;
    pub const SYS_FLOCK: i64 = 32;
    pub const SYS_PSELECT6: i64 = 72;
    pub const SYS_PPOLL: i64 = 73;
    pub const SYS_FUTEX: i64 = 98;
    pub const SYS_ACCEPT: i64 = 202;
    pub const SYS_ACCEPT4: i64 = 242;
    pub const SYS_IO_URING_ENTER: i64 = 426;
    pub const SYS_EPOLL_PWAIT2: i64 = 441;
}

/// One thread of a watched worker process, as the sleepable `iter/task`
/// sampler writes it: whether it runs, which syscall it is blocked in with
/// its first arguments, and the few bytes of its memory that say what the
/// wait is on. Facts only: the daemon decides what counts as waiting for work.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ThreadSample {
    pub tgid: u32,
    pub tid: u32,
    /// `task_struct.__state`: 0 while runnable or running.
    pub state: u32,
    /// epoll_wait: whether the epoll instance `args[0]` watches one of the
    /// process's listeners right now ([`EPOLL_WATCHES_LISTENER`]), none of
    /// them ([`EPOLL_WATCHES_NO_LISTENER`]: Apache's event MPM takes its
    /// listeners out while no worker thread is free), or was not looked at
    /// ([`EPOLL_UNCHECKED`]: no listener fd known, or a read failed).
    pub epoll_listeners: u32,
    /// The process's start (`group_leader->start_time`, ns since boot):
    /// with `tgid`, names the process across pid reuse.
    pub start_ns: u64,
    /// The syscall the thread is in (`pt_regs.orig_ax`); -1 outside one.
    pub syscall: i64,
    /// Its first four arguments (di, si, dx, r10).
    pub args: [u64; 4],
    /// select/pselect6: the process's listener fds whose bit is set in the
    /// read set; poll/ppoll: the fds of its first pollfd entries. -1 unused.
    pub polled_fds: [i32; POLLED_FDS],
    /// futex: the word at `args[0]` (a PI or robust mutex keeps its
    /// owner's thread id there).
    pub futex_word: u32,
    /// 1 when the user memory above could not be read.
    pub user_read_failed: u32,
    /// A thread of a process not in `WATCHED` whose parent is in
    /// `WATCHED_MASTERS` (a worker forked since the daemon last looked):
    /// that parent's tgid; 0 otherwise.
    pub master_tgid: u32,
    pub _pad: u32,
}

/// Values of [`ThreadSample::epoll_listeners`].
pub const EPOLL_UNCHECKED: u32 = 0;
pub const EPOLL_WATCHES_LISTENER: u32 = 1;
pub const EPOLL_WATCHES_NO_LISTENER: u32 = 2;

/// Size of the `EVENTS` ring buffer (trace mode only).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// One accepted connection, streamed to `observer trace` through the
/// `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AcceptEvent {
    /// `bpf_ktime_get_ns()` at accept.
    pub time_ns: u64,
    /// Time spent in the accept queue; `u64::MAX` when unknown.
    pub wait_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub netns: u32,
    pub family: u16,
    /// Local (listening) port.
    pub port: u16,
    pub peer_port: u16,
    pub _pad: [u8; 6],
    pub addr: [u8; 16],
    pub peer_addr: [u8; 16],
    pub comm: [u8; 16],
}

/// Where the accepted child socket was bound, and who accepted it.
///
/// `addr`/`port` are the child's *local* address: the daemon maps them to the
/// listening socket (which may be bound to a wildcard address) in userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AcceptKey {
    /// Inode number of the network namespace (what `ls -l /proc/PID/ns/net` shows).
    pub netns: u32,
    /// Thread-group id (the process id) that called accept.
    pub tgid: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port, host byte order.
    pub port: u16,
    pub _pad: u32,
    /// Local address: IPv4 in the first 4 bytes, or IPv6 (network order).
    pub addr: [u8; 16],
}

/// What was counted for one [`AcceptKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Sum of their waits in the accept queue, nanoseconds.
    pub wait_sum_ns: u64,
    /// Per-bucket (not cumulative) counts; the last slot is the +Inf overflow.
    pub wait_buckets: [u64; WAIT_BUCKETS + 1],
}

impl AcceptStats {
    pub const ZERO: AcceptStats = AcceptStats {
        accepted: 0,
        wait_sum_ns: 0,
        wait_buckets: [0; WAIT_BUCKETS + 1],
    };
}

/// One listening TCP socket, as the `iter/tcp` program writes it to its seq file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerRecord {
    pub netns: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
    /// Connections waiting in the accept queue (`sk_ack_backlog`, ss Recv-Q).
    pub queue_len: u32,
    /// The accept-queue limit (`sk_max_ack_backlog`, ss Send-Q).
    pub queue_max: u32,
    /// Half-open connections (`icsk_accept_queue.qlen`).
    pub syn_queue_len: u32,
    /// Connections this listener dropped: its `sk_drops` less the
    /// segments counted in [`ListenDiscards`] (which are no lost
    /// connection), read in that order (each discard follows its own
    /// `sk_drops` increment) and subtracted without going below zero.
    pub drops: u32,
    /// Inode of the socket (`socket:[N]` in /proc/PID/fd), 0 if orphaned.
    pub inode: u64,
    /// How long the connection at the head of the accept queue (the
    /// oldest: the queue is FIFO) has waited, µs, from its queue-entry
    /// stamp; 0 when the queue is empty or the stamp is not yet written.
    pub oldest_wait_us: u64,
    /// `TCP_DEFER_ACCEPT` in effect (`rskq_defer_accept`: SYN-ACK
    /// retransmits a bare ACK is dropped for; 0 = off). Such a listener
    /// discards each handshake's bare ACK into `sk_drops`.
    pub defer_accept: u8,
    pub _pad: [u8; 7],
}

/// Segments the kernel discarded on one listening TCP socket that lost no
/// connection: bare ACKs under `TCP_DEFER_ACCEPT`, resets and stray
/// segments for half-open connections, the second count of an accept-queue
/// overflow. Each also went into the socket's `sk_drops`, beside the real
/// drops (those that ListenDrops counts); the walks subtract these.
/// Keyed by the listener's kernel address; `inode` tells a reused address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenDiscards {
    pub segments: u64,
    pub inode: u64,
}

/// Listening sockets whose discards are counted at once (LRU: a closed
/// listener's entry ages out).
pub const LISTEN_DISCARDS_CAPACITY: u32 = 16384;

/// The code ranges `[start, end)` whose `kfree_skb` events on a listener
/// are not preceded by an `sk_drops` increment (the listener's own receive
/// path and the syncookie check), resolved from /proc/kallsyms, and the
/// drop reason of a bad checksum (its number differs between kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DiscardSites {
    pub uncounted: [[u64; 2]; DISCARD_SITES_UNCOUNTED],
    pub csum_reason: u32,
    pub _pad: u32,
}

/// Number of code ranges in [`DiscardSites`].
pub const DISCARD_SITES_UNCOUNTED: usize = 8;

/// Byte offsets of the kernel struct fields the programs read, resolved by the
/// daemon from the running kernel's BTF and written into the programs'
/// read-only data before they load. This keeps one object file valid across
/// kernel versions without CO-RE support in the Rust toolchain.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_state: u32,
    pub sk_num: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_net: u32,
    pub net_ns_inum: u32,
    pub sk_protocol: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    pub sk_drops: u32,
    pub sk_socket: u32,
    pub icsk_accept_queue_qlen: u32,
    pub tcp_rcvq_space_time: u32,
    pub socket_alloc_vfs_inode: u32,
    pub inode_i_ino: u32,
    pub inode_i_mode: u32,
    pub file_f_inode: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_comm: u32,
    pub sk_daddr: u32,
    pub sk_v6_daddr: u32,
    pub sk_dport: u32,
    pub task_pid: u32,
    pub task_state: u32,
    pub task_group_leader: u32,
    pub task_start_time: u32,
    /// `pt_regs`: the syscall number a task entered with (x86_64:
    /// `orig_ax`, 8 bytes; arm64: `syscallno`, a 4-byte s32), and its first
    /// four arguments as the syscall received them (x86_64: `di`, `si`,
    /// `dx`, `r10`; arm64: `orig_x0`, `regs[1..=3]`, since `regs[0]` takes
    /// the return value).
    pub regs_syscall_nr: u32,
    pub regs_syscall_nr_bytes: u32,
    pub regs_args: [u32; 4],
    pub sk_receive_queue_next: u32,
    pub sk_receive_queue_qlen: u32,
    pub skb_sk: u32,
    pub unix_addr: u32,
    pub unix_address_len: u32,
    pub unix_address_path: u32,
    pub icsk_accept_queue_head: u32,
    pub request_sock_sk: u32,
    /// `unix_sock.peer`: a connected Unix socket's other end.
    pub unix_peer: u32,
    /// `sock.sk_type` (a u16: `SOCK_STREAM`, `SOCK_SEQPACKET`, ...).
    pub sk_type: u32,
    pub tcp_bytes_received: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    /// `inet_connection_sock.icsk_accept_queue.rskq_defer_accept` (a u8).
    pub rskq_defer_accept: u32,
    /// `sk_buff.head` (a pointer) and `sk_buff.end` (an offset from it,
    /// where `skb_shared_info` lies).
    pub skb_head: u32,
    pub skb_end: u32,
    pub shinfo_gso_segs: u32,
    /// `eventpoll.rbr` (its tree of watched files), `epitem.rbn` (its node
    /// in that tree), `epitem.ffd` (the file and fd it watches, the tree's
    /// key), and `rb_node.rb_right`/`rb_left`.
    pub eventpoll_rbr: u32,
    pub epitem_rbn: u32,
    pub epitem_ffd: u32,
    pub rb_right: u32,
    pub rb_left: u32,
    /// `tcp_sock.bytes_sent` (u64), `tcp_sock.lsndtime` and
    /// `inet_connection_sock.icsk_ack.lrcvtime` (u32 jiffies).
    pub tcp_bytes_sent: u32,
    pub tcp_lsndtime: u32,
    pub icsk_ack_lrcvtime: u32,
}

/// Bytes of `struct sock_common` read at once: every field of it the
/// programs use lies within (the daemon checks this against BTF).
pub const SOCK_COMMON_HEAD: usize = 96;

/// Slots of the `HEALTH` per-CPU array: events the programs could not fully
/// handle. Exported so that nothing is lost silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// An accept could not be counted because `ACCEPTS` was full.
    AcceptMapFull = 0,
    /// A kernel read failed while following an accepted fd to its socket.
    AcceptReadError = 1,
    /// `observer trace` could not stream an accept: its ring buffer was full.
    TraceEventLost = 2,
    /// An accepted connection's queue-entry stamp was unreadable: it is
    /// counted as accepted but its wait is not in the histogram.
    WaitUnknown = 3,
    /// The holder iterator left out an accepted connection: its process
    /// already had [`HELD_CONNECTIONS_PER_PROCESS`] reported in this scan.
    HeldConnectionsOverLimit = 4,
}

/// Number of [`Health`] slots.
pub const HEALTH_SLOTS: u32 = 5;

/// The most accepted connections the holder iterator reports per process
/// and scan: a worker holding many thousands (an event loop's keep-alive
/// connections) costs a bounded share of a scrape; the rest are counted in
/// [`Health::HeldConnectionsOverLimit`].
pub const HELD_CONNECTIONS_PER_PROCESS: u32 = 4096;

/// Where the holder iterator is in a scan, per CPU: which scan (the
/// iterator's session), which process, and how many of its accepted
/// connections it has reported. A task's files are visited one after
/// another, so a change of process restarts the count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldCursor {
    pub session: u64,
    pub tgid: u32,
    pub held: u32,
}

/// The process the holder iterator is visiting, per CPU: read once per
/// task and scan (`session`), not once per socket it holds (a process
/// holding 10,000 listeners would read its parent and name 10,000 times).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VisitedProcess {
    pub session: u64,
    /// The kernel address of the `task_struct`.
    pub task: u64,
    pub tgid: u32,
    /// Parent's tgid.
    pub ppid: u32,
    pub comm: [u8; 16],
    /// Listening sockets it inherited, counted since its last
    /// [`INHERITED_LISTENERS`] record.
    pub inherited: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): plain `#[repr(C)]` integers and byte arrays with
    // explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::AcceptKey {}
    unsafe impl aya::Pod for super::AcceptStats {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ThreadSample {}
    unsafe impl aya::Pod for super::WorkerFds {}
    unsafe impl aya::Pod for super::HeldCursor {}
    unsafe impl aya::Pod for super::ListenerRecord {}
    unsafe impl aya::Pod for super::HolderRecord {}
    unsafe impl aya::Pod for super::InheritableListener {}
    unsafe impl aya::Pod for super::UnixNameRecord {}
    unsafe impl aya::Pod for super::AcceptEvent {}
    unsafe impl aya::Pod for super::ListenDiscards {}
    unsafe impl aya::Pod for super::DiscardSites {}
}

/// Index of the histogram slot that a wait of `wait_us` microseconds falls in.
#[inline(always)]
pub fn wait_bucket(wait_us: u64) -> usize {
    let mut i = 0;
    while i < WAIT_BUCKETS {
        if wait_us <= WAIT_BUCKET_BOUNDS_US[i] {
            return i;
        }
        i += 1;
    }
    WAIT_BUCKETS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_bucket_boundaries_are_inclusive_upper_bounds() {
        assert_eq!(wait_bucket(0), 0);
        assert_eq!(wait_bucket(100), 0);
        assert_eq!(wait_bucket(101), 1);
        assert_eq!(wait_bucket(60_000_000), WAIT_BUCKETS - 1);
        assert_eq!(wait_bucket(60_000_001), WAIT_BUCKETS);
    }

    #[test]
    fn shared_layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<AcceptKey>(), 32);
        assert_eq!(core::mem::size_of::<ListenerRecord>(), 64);
        assert_eq!(core::mem::size_of::<ListenDiscards>(), 16);
        assert_eq!(core::mem::size_of::<DiscardSites>(), 136);
        assert_eq!(core::mem::size_of::<HolderRecord>(), 112);
        assert_eq!(core::mem::size_of::<InheritableListener>(), 16);
        assert_eq!(core::mem::size_of::<VisitedProcess>(), 48);
        assert_eq!(core::mem::size_of::<UnixNameRecord>(), 112);
        assert_eq!(core::mem::size_of::<ThreadSample>(), 144);
        assert_eq!(core::mem::size_of::<AcceptEvent>(), 88);
        assert_eq!(core::mem::size_of::<HeldCursor>(), 16);
        assert_eq!(core::mem::size_of::<AcceptStats>(), 8 * (WAIT_BUCKETS + 3));
    }
}
