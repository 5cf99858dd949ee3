//! Maps shared by the programs. Types come from `observer-common` only.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    ACCEPT_MAP_CAPACITY, AcceptKey, AcceptStats, EVENTS_RING_BYTES, HEALTH_SLOTS, Health,
    HeldCursor, HolderRecord, INHERITABLE_MAP_CAPACITY, InheritableListener,
    LISTEN_DISCARDS_CAPACITY, LISTEN_PORT_MAP_CAPACITY, ListenDiscards, MASTER_MAP_CAPACITY,
    UNIX_QUEUED_MAP_CAPACITY, UnixNameRecord, VisitedProcess, WORKER_MAP_CAPACITY, WorkerFds,
};

/// `BPF_F_NO_PREALLOC`: entries are freed through RCU, so the daemon deleting
/// a dead process's key can never make a running program write into a reused
/// slot of another key.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Accepted connections and their queue waits, per child local address and
/// accepting process.
#[map]
pub static ACCEPTS: HashMap<AcceptKey, AcceptStats> =
    HashMap::with_max_entries(ACCEPT_MAP_CAPACITY, BPF_F_NO_PREALLOC);

/// Worker processes (tgid) whose threads the sampler reports, with the fds
/// each waits on for new work. Written by the daemon. Preallocated: the
/// sampler is a sleepable program, and kernels before 6.1 let those use
/// preallocated hash maps only.
#[map]
pub static WATCHED: HashMap<u32, WorkerFds> = HashMap::with_max_entries(WORKER_MAP_CAPACITY, 0);

/// Masters of watched pools (tgid), with the fds their workers inherit:
/// a child of one that is not in `WATCHED` yet (forked since the daemon
/// last looked, and maybe gone before it looks again) is sampled too.
/// Written by the daemon; preallocated, as `WATCHED`.
#[map]
pub static WATCHED_MASTERS: HashMap<u32, WorkerFds> =
    HashMap::with_max_entries(MASTER_MAP_CAPACITY, 0);

/// (netns, port) pairs that have a listener, filled by the daemon; see
/// `observer_common::listen_port_key`.
#[map]
pub static LISTEN_PORTS: HashMap<u64, u8> = HashMap::with_max_entries(LISTEN_PORT_MAP_CAPACITY, 0);

/// When each queued Unix-domain connection entered its listener's queue
/// (ns, the clock of `bpf_ktime_get_ns`), by the kernel address of the
/// child socket accept() will return. Written as connect() returns, taken
/// out at accept; see `connect`. LRU: stamps of connections never accepted
/// (their listener closed) age out.
#[map]
pub static UNIX_QUEUED: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(UNIX_QUEUED_MAP_CAPACITY, 0);

/// Segments each listening TCP socket discarded without losing a
/// connection, by the socket's kernel address (see `discards.rs`). LRU: a
/// closed listener's entry ages out.
#[map]
pub static LISTEN_DISCARDS: LruHashMap<u64, ListenDiscards> =
    LruHashMap::with_max_entries(LISTEN_DISCARDS_CAPACITY, 0);

/// Accepted connections for `observer trace` (written only in trace mode).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Room for the record the holder iterator is writing (with the socket's
/// head on the stack, it would not fit the 512-byte BPF stack).
#[map]
pub static HOLDER: PerCpuArray<HolderRecord> = PerCpuArray::with_max_entries(1, 0);

/// Room for one Unix listener's path while the holder iterator writes it
/// (too large for the 512-byte BPF stack beside the record).
#[map]
pub static UNIX_NAME: PerCpuArray<UnixNameRecord> = PerCpuArray::with_max_entries(1, 0);

/// The holder iterator's count of accepted connections reported for the
/// process it is visiting; see [`HeldCursor`].
#[map]
pub static HELD_CURSOR: PerCpuArray<HeldCursor> = PerCpuArray::with_max_entries(1, 0);

/// The process the holder iterator visited last ([`VISITED_SLOT`]), and
/// the one it is visiting now ([`VISITING_SLOT`]); see [`VisitedProcess`].
#[map]
pub static VISITED: PerCpuArray<VisitedProcess> = PerCpuArray::with_max_entries(2, 0);
pub const VISITED_SLOT: u32 = 0;
pub const VISITING_SLOT: u32 = 1;

/// The first holder of each listening socket's file in the holder
/// iterator's scan, by the file's kernel address; see
/// [`InheritableListener`]. LRU: a closed listener's entry ages out.
#[map]
pub static INHERITABLE: LruHashMap<u64, InheritableListener> =
    LruHashMap::with_max_entries(INHERITABLE_MAP_CAPACITY, 0);

/// Events the programs could not handle fully; see [`Health`].
#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

#[inline(always)]
pub fn count_health(slot: Health) {
    if let Some(counter) = HEALTH.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot, and programs do not nest on one CPU for these hooks.
        unsafe { *counter += 1 };
    }
}
