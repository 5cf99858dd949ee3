//! What one listener looked like over a sampling interval: the rows of
//! `observer listeners` and `observer top`. Pure: two snapshots in, rows out.
use std::collections::HashMap;

use serde::Serialize;

use crate::{
    aggregate::ListenerView,
    pipeline::Snapshot,
    quantile::{wait_quantile, waits_between},
    sockets::ListenerId,
    workers::{PoolView, WorkerView},
};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WorkerRow {
    pub pid: u32,
    pub comm: String,
    pub busy: Option<bool>,
    /// Share of the interval it was busy (0..1).
    pub utilisation: f64,
    pub accepts_per_second: f64,
    pub active_connections: u64,
    /// Of those, the ones whose request it has not started to read.
    pub unread_connections: u64,
    /// Of those, the ones whose request it serves now (read, not yet
    /// answered; `None` for Unix listeners).
    pub requests_in_service: Option<u64>,
}

/// A process that accepts the listener's connections and hands them to its
/// workers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DispatcherRow {
    pub pid: u32,
    pub comm: String,
    pub accepts_per_second: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ListenerRow {
    pub netns: u32,
    /// The local address as `ss` prints it: `addr:port` or the Unix path.
    pub listen: String,
    /// TCP only ("" for Unix).
    pub addr: String,
    /// TCP only (0 for Unix).
    pub port: u16,
    /// Unix only.
    pub path: Option<String>,
    pub queue_length: u64,
    pub queue_max: u64,
    /// How long the connection at the head of the queue has waited.
    pub oldest_wait_seconds: f64,
    /// Accepted connections whose request nobody has started to read (the
    /// queue after accept; `None` for Unix listeners).
    pub unread_connections: Option<u64>,
    /// How long the oldest of them has waited since it was queued.
    pub unread_oldest_seconds: Option<f64>,
    pub syn_queue_length: u64,
    pub accepts_per_second: f64,
    pub wait_p50_seconds: Option<f64>,
    pub wait_p99_seconds: Option<f64>,
    pub workers_busy: usize,
    pub workers: usize,
    /// Connections dropped during the interval (`None` for Unix
    /// listeners, whose drops the kernel does not count, and for TCP
    /// listeners whose drops cannot be told from their discarded ACKs).
    pub drops: Option<u64>,
    pub container_id: Option<String>,
    pub pod: Option<String>,
    pub worker_list: Vec<WorkerRow>,
    pub dispatchers: Vec<DispatcherRow>,
}

/// Which listeners to show.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ListenerFilter {
    /// Only TCP listeners on this port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only the Unix-domain listener on this path (as `ss -lx` prints it:
    /// `@name` for an abstract socket).
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,
    /// Only listeners in this network namespace (inode, as in the `netns` label).
    #[arg(long, value_name = "INODE")]
    pub netns: Option<u32>,
}

impl ListenerFilter {
    pub fn keeps(&self, id: &ListenerId) -> bool {
        self.port.is_none_or(|p| !id.is_unix() && p == id.port)
            && self
                .path
                .as_deref()
                .is_none_or(|p| id.is_unix() && id.path.display() == p)
            && self.netns.is_none_or(|n| n == id.netns)
    }
}

/// A worker's accepts and busy seconds since `before`'s reading of the same
/// pid (all of them for a worker `before` did not have).
pub fn worker_since(w: &WorkerView, before: Option<&PoolView>) -> (u64, f64) {
    let earlier = before.and_then(|p| p.workers.iter().find(|b| b.pid == w.pid));
    (
        w.accepts.saturating_sub(earlier.map_or(0, |e| e.accepts)),
        (w.busy_seconds - earlier.map_or(0.0, |e| e.busy_seconds)).max(0.0),
    )
}

fn worker_rows(pool: Option<&PoolView>, before: Option<&PoolView>, seconds: f64) -> Vec<WorkerRow> {
    let Some(pool) = pool else { return vec![] };
    pool.workers
        .iter()
        .map(|w| {
            let (accepts, busy_s) = worker_since(w, before);
            WorkerRow {
                pid: w.pid,
                comm: w.comm.to_string(),
                busy: w.busy,
                utilisation: (busy_s / seconds).clamp(0.0, 1.0),
                accepts_per_second: accepts as f64 / seconds,
                active_connections: w.active_connections,
                unread_connections: w.unread_connections,
                requests_in_service: w.requests_in_service,
            }
        })
        .collect()
}

fn dispatcher_rows(
    pool: Option<&PoolView>,
    before: Option<&PoolView>,
    seconds: f64,
) -> Vec<DispatcherRow> {
    let Some(pool) = pool else { return vec![] };
    pool.dispatchers
        .iter()
        .map(|d| {
            let earlier = before.and_then(|p| p.dispatchers.iter().find(|b| b.pid == d.pid));
            let accepts = d.accepts - earlier.map(|e| e.accepts).unwrap_or(0);
            DispatcherRow {
                pid: d.pid,
                comm: d.comm.to_string(),
                accepts_per_second: accepts as f64 / seconds,
            }
        })
        .collect()
}

/// A snapshot's listeners, by id.
pub fn listeners_by_id(s: &Snapshot) -> HashMap<ListenerId, &ListenerView> {
    s.listeners.listeners.iter().map(|v| (v.id, v)).collect()
}

/// A snapshot's worker pools, by listener.
pub fn pools_by_listener(s: &Snapshot) -> HashMap<ListenerId, &PoolView> {
    s.pools.pools.iter().map(|p| (p.listener, p)).collect()
}

/// Rows for the listeners of `after`, with rates over the `seconds` since `before`.
pub fn rows(
    before: &Snapshot,
    after: &Snapshot,
    seconds: f64,
    filter: &ListenerFilter,
) -> Vec<ListenerRow> {
    let seconds = seconds.max(1e-3);
    let earlier = listeners_by_id(before);
    let (pools_before, pools_after) = (pools_by_listener(before), pools_by_listener(after));
    after
        .listeners
        .listeners
        .iter()
        .filter(|v| filter.keeps(&v.id))
        .map(|v| {
            let prior = earlier.get(&v.id);
            let waits = prior
                .map(|p| waits_between(&p.accepts.waits, &v.accepts.waits))
                .unwrap_or(v.accepts.waits);
            let accepted = v.accepts.accepted - prior.map(|p| p.accepts.accepted).unwrap_or(0);
            let pool = pools_after.get(&v.id).copied();
            let container = after.containers.get(&v.id);
            ListenerRow {
                netns: v.id.netns,
                listen: v.id.local_address(),
                addr: if v.id.is_unix() {
                    String::new()
                } else {
                    v.id.ip().to_string()
                },
                port: v.id.port,
                path: v.id.is_unix().then(|| v.id.path.display()),
                queue_length: v.queue_len,
                queue_max: v.queue_max,
                oldest_wait_seconds: v.oldest_wait.as_secs_f64(),
                unread_connections: (!v.id.is_unix())
                    .then(|| pool.map_or(0, |p| p.unread.connections)),
                unread_oldest_seconds: (!v.id.is_unix())
                    .then(|| pool.map_or(0.0, |p| p.unread.oldest.as_secs_f64())),
                syn_queue_length: v.syn_queue_len,
                accepts_per_second: accepted as f64 / seconds,
                wait_p50_seconds: wait_quantile(&waits, 0.5).filter(|_| v.waits_known),
                wait_p99_seconds: wait_quantile(&waits, 0.99).filter(|_| v.waits_known),
                workers_busy: pool.map(|p| p.busy()).unwrap_or(0),
                workers: pool.map(|p| p.workers.len()).unwrap_or(0),
                drops: v
                    .drops_known()
                    .then(|| v.drops - prior.map(|p| p.drops).unwrap_or(0)),
                container_id: container.map(|c| c.container_id.clone()),
                pod: container.map(|c| c.pod.clone()).filter(|p| !p.is_empty()),
                worker_list: worker_rows(pool, pools_before.get(&v.id).copied(), seconds),
                dispatchers: dispatcher_rows(pool, pools_before.get(&v.id).copied(), seconds),
            }
        })
        .collect()
}
