//! Maps shared by the programs. Types come from `observer-common` only.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use observer_common::{ACCEPT_MAP_CAPACITY, AcceptKey, AcceptStats, HEALTH_SLOTS, Health};

/// `BPF_F_NO_PREALLOC`: entries are freed through RCU, so the daemon deleting
/// a dead process's key can never make a running program write into a reused
/// slot of another key.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Accepted connections and their queue waits, per child local address and
/// accepting process.
#[map]
pub static ACCEPTS: HashMap<AcceptKey, AcceptStats> =
    HashMap::with_max_entries(ACCEPT_MAP_CAPACITY, BPF_F_NO_PREALLOC);

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
