//! Stage 3b: worker pools. Joins who holds each listener (the socket-holder
//! iterator), which threads are tracked and whether they wait for work (the
//! WORKERS map), and who accepted what (the listener views) into one pool per
//! listener: its workers, each busy or idle.
//!
//! A pool's **workers** are the processes holding the listening socket,
//! except its master: a holder whose child also holds it (gunicorn's arbiter,
//! nginx's or uWSGI's master). A worker is **busy** while its acceptor
//! thread is outside accept/select/poll/epoll_wait, i.e. not waiting for new
//! work. Pure logic, no I/O.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use observer_common::{HolderRecord, REGISTERED_BY_ACCEPT, TCP_LISTEN, WorkerFds, WorkerThread};

use crate::aggregate::{ListenerId, ListenerView, listener_of};

/// One worker process of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    pub pid: u32,
    pub comm: String,
    /// Connections it accepted from this listener since the daemon started.
    pub accepts: u64,
    /// Accepted connections of this listener it holds open now.
    pub active_connections: u64,
    /// `None` until one of its threads is tracked.
    pub busy: Option<bool>,
    /// Time its acceptor thread spent outside wait syscalls since tracked.
    pub busy_seconds: f64,
}

/// The workers of one listener.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    pub listener: ListenerId,
    pub workers: Vec<WorkerView>,
}

impl PoolView {
    pub fn busy(&self) -> usize {
        self.workers.iter().filter(|w| w.busy == Some(true)).count()
    }

    pub fn idle(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.busy == Some(false))
            .count()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Pools {
    pub pools: Vec<PoolView>,
    /// Workers left out because of the cap.
    pub workers_over_cap: u64,
}

/// The processes that serve each listener, with their names.
pub struct Membership {
    workers: BTreeMap<ListenerId, BTreeSet<u32>>,
    comms: HashMap<u32, String>,
    /// Open accepted connections per (listener, pid).
    active: HashMap<(ListenerId, u32), u64>,
    /// Listening-socket fds per process.
    listen_fds: HashMap<u32, BTreeSet<i32>>,
    /// Every process holding each listener (masters included).
    holders: BTreeMap<ListenerId, BTreeSet<u32>>,
}

fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn holder_id(h: &HolderRecord) -> ListenerId {
    ListenerId {
        netns: h.netns,
        family: h.family,
        addr: h.addr,
        port: h.port,
    }
}

impl Membership {
    /// Works out each listener's workers from what processes hold.
    pub fn from_holders(listeners: &[ListenerView], holders: &[HolderRecord]) -> Membership {
        let present: HashSet<ListenerId> = listeners.iter().map(|v| v.id).collect();
        let mut holders_of: BTreeMap<ListenerId, BTreeMap<u32, u32>> = BTreeMap::new();
        let mut comms = HashMap::new();
        let mut active: HashMap<(ListenerId, u32), u64> = HashMap::new();
        let mut seen_sockets = HashSet::new();
        let mut listen_fds: HashMap<u32, BTreeSet<i32>> = HashMap::new();
        for h in holders {
            comms.entry(h.tgid).or_insert_with(|| comm_string(&h.comm));
            if h.state == TCP_LISTEN {
                if present.contains(&holder_id(h)) {
                    holders_of
                        .entry(holder_id(h))
                        .or_default()
                        .insert(h.tgid, h.ppid);
                    listen_fds.entry(h.tgid).or_default().insert(h.fd as i32);
                }
            } else if let Some(id) = listener_of(holder_id(h), &present) {
                // Count each open connection once per process (threads share fds).
                if seen_sockets.insert((h.tgid, h.inode)) {
                    *active.entry((id, h.tgid)).or_default() += 1;
                }
            }
        }
        let holders = holders_of
            .iter()
            .map(|(id, h)| (*id, h.keys().copied().collect()))
            .collect();
        let workers = holders_of
            .into_iter()
            .map(|(id, holders)| {
                let parents: HashSet<u32> = holders.values().copied().collect();
                let workers = holders
                    .keys()
                    .copied()
                    .filter(|pid| !parents.contains(pid))
                    .collect();
                (id, workers)
            })
            .collect();
        Membership {
            workers,
            comms,
            active,
            listen_fds,
            holders,
        }
    }

    /// Worker processes that have no tracked thread yet.
    pub fn untracked(&self, threads: &[(u32, WorkerThread)]) -> Vec<u32> {
        let tracked: HashSet<u32> = threads.iter().map(|(_, t)| t.tgid).collect();
        let all: BTreeSet<u32> = self.workers.values().flatten().copied().collect();
        all.into_iter()
            .filter(|pid| !tracked.contains(pid))
            .collect()
    }

    /// A process that holds the listener (a worker if any), to learn its container.
    pub fn a_holder(&self, id: &ListenerId) -> Option<u32> {
        let workers = self.workers.get(id).and_then(|w| w.first().copied());
        workers.or_else(|| self.holders.get(id).and_then(|h| h.first().copied()))
    }

    /// Every worker process with its listening-socket fds.
    pub fn worker_listen_fds(&self) -> BTreeMap<u32, Vec<i32>> {
        let workers: BTreeSet<u32> = self.workers.values().flatten().copied().collect();
        workers
            .into_iter()
            .map(|pid| {
                (
                    pid,
                    self.listen_fds
                        .get(&pid)
                        .map(|f| f.iter().copied().collect())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    fn is_worker(&self, pid: u32) -> bool {
        self.workers.values().any(|w| w.contains(&pid))
    }
}

/// A process's busy state from its tracked threads: threads that accepted
/// are its acceptors; without any, the daemon-tracked main thread stands in.
/// Busy when every acceptor is busy; busy time is the least of theirs.
fn process_state(threads: &[&WorkerThread], now_ns: u64) -> (Option<bool>, f64) {
    let accepting: Vec<&&WorkerThread> = threads
        .iter()
        .filter(|t| t.registered_by == REGISTERED_BY_ACCEPT)
        .collect();
    let chosen: Vec<&WorkerThread> = if accepting.is_empty() {
        threads.to_vec()
    } else {
        accepting.into_iter().copied().collect()
    };
    if chosen.is_empty() {
        return (None, 0.0);
    }
    let busy = chosen.iter().all(|t| t.waiting == 0);
    let busy_ns = chosen
        .iter()
        .map(|t| {
            t.busy_ns
                + if t.waiting == 0 {
                    now_ns.saturating_sub(t.since_ns)
                } else {
                    0
                }
        })
        .min()
        .unwrap_or(0);
    (Some(busy), busy_ns as f64 / 1e9)
}

/// Builds the pools. `now_ns` is CLOCK_MONOTONIC, the clock of the threads'
/// stamps.
pub fn pools(
    listeners: &[ListenerView],
    membership: &Membership,
    threads: &[(u32, WorkerThread)],
    now_ns: u64,
    max_workers: usize,
) -> Pools {
    let mut by_process: HashMap<u32, Vec<&WorkerThread>> = HashMap::new();
    for (_, t) in threads {
        by_process.entry(t.tgid).or_default().push(t);
    }
    let mut budget = max_workers;
    let mut over = 0u64;
    let mut pools = Vec::new();
    for view in listeners {
        let Some(pids) = membership.workers.get(&view.id) else {
            continue;
        };
        let mut workers = Vec::new();
        for pid in pids {
            if budget == 0 {
                over += 1;
                continue;
            }
            budget -= 1;
            let (busy, busy_seconds) = process_state(
                by_process.get(pid).map(Vec::as_slice).unwrap_or(&[]),
                now_ns,
            );
            workers.push(WorkerView {
                pid: *pid,
                comm: membership.comms.get(pid).cloned().unwrap_or_default(),
                accepts: view.by_process.get(pid).map(|a| a.accepted).unwrap_or(0),
                active_connections: membership
                    .active
                    .get(&(view.id, *pid))
                    .copied()
                    .unwrap_or(0),
                busy,
                busy_seconds,
            });
        }
        pools.push(PoolView {
            listener: view.id,
            workers,
        });
    }
    Pools {
        pools,
        workers_over_cap: over,
    }
}

/// The fds each worker waits on for new work, for the kernel side: its
/// listeners, and `epolls` (epoll fds watching a listener, by process).
pub fn worker_fds(
    membership: &Membership,
    epolls: &HashMap<u32, Vec<i32>>,
) -> HashMap<u32, WorkerFds> {
    membership
        .worker_listen_fds()
        .into_iter()
        .map(|(pid, listen)| {
            let mut fds = WorkerFds::EMPTY;
            for (slot, fd) in fds.listen.iter_mut().zip(listen.iter()) {
                *slot = *fd;
            }
            for (slot, fd) in fds
                .epoll
                .iter_mut()
                .zip(epolls.get(&pid).into_iter().flatten())
            {
                *slot = *fd;
            }
            (pid, fds)
        })
        .collect()
}

/// Tracked threads to stop tracking: their thread is gone, or the daemon
/// tracked them on a guess and their process no longer serves a listener.
pub fn stale_threads(
    threads: &[(u32, WorkerThread)],
    membership: &Membership,
    thread_alive: impl Fn(u32, u32) -> bool,
) -> Vec<u32> {
    threads
        .iter()
        .filter(|(tid, t)| {
            !thread_alive(t.tgid, *tid)
                || (t.registered_by != REGISTERED_BY_ACCEPT && !membership.is_worker(t.tgid))
        })
        .map(|(tid, _)| *tid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Accepts;
    use observer_common::{AF_INET, REGISTERED_BY_DAEMON, TCP_ESTABLISHED};

    fn id(port: u16) -> ListenerId {
        ListenerId {
            netns: 1,
            family: AF_INET,
            addr: [0; 16],
            port,
        }
    }

    fn view(port: u16) -> ListenerView {
        ListenerView {
            id: id(port),
            sockets: 1,
            queue_len: 0,
            queue_max: 128,
            syn_queue_len: 0,
            queued: 0,
            drops: 0,
            drops_raw: 0,
            accepts: Accepts::default(),
            by_process: BTreeMap::new(),
        }
    }

    fn holder(tgid: u32, ppid: u32, port: u16, state: u8, inode: u64) -> HolderRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"gunz");
        let mut addr = [0u8; 16];
        if state != TCP_LISTEN {
            addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        }
        HolderRecord {
            tgid,
            ppid,
            fd: 3,
            netns: 1,
            family: AF_INET,
            port,
            state,
            _pad: [0; 3],
            addr,
            inode,
            comm,
            ..Default::default()
        }
    }

    fn thread(tgid: u32, waiting: u32, since_ns: u64, busy_ns: u64, by: u32) -> WorkerThread {
        WorkerThread {
            tgid,
            waiting,
            since_ns,
            busy_ns,
            registered_by: by,
            _pad: 0,
        }
    }

    #[test]
    fn the_master_holding_the_listener_is_not_a_worker() {
        // gunicorn: arbiter 10 (parent 1) forks workers 11 and 12.
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(12, 10, 80, TCP_LISTEN, 5),
        ];
        let m = Membership::from_holders(&[view(80)], &holders);
        let p = pools(&[view(80)], &m, &[], 0, 100);
        let pids: Vec<u32> = p.pools[0].workers.iter().map(|w| w.pid).collect();
        assert_eq!(pids, vec![11, 12]);
        assert_eq!(p.pools[0].workers[0].comm, "gunz");
    }

    #[test]
    fn a_single_process_server_is_its_own_worker() {
        let m = Membership::from_holders(&[view(80)], &[holder(20, 1, 80, TCP_LISTEN, 5)]);
        assert_eq!(m.untracked(&[]), vec![20]);
    }

    #[test]
    fn busy_and_idle_come_from_the_acceptor_thread() {
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(12, 10, 80, TCP_LISTEN, 5),
        ];
        let m = Membership::from_holders(&[view(80)], &holders);
        let threads = [
            (11, thread(11, 0, 1_000, 500, REGISTERED_BY_ACCEPT)), // busy since t=1000
            (12, thread(12, 1, 1_000, 700, REGISTERED_BY_ACCEPT)), // idle
        ];
        let p = pools(&[view(80)], &m, &threads, 3_000, 100);
        assert_eq!((p.pools[0].busy(), p.pools[0].idle()), (1, 1));
        assert_eq!(p.pools[0].workers[0].busy_seconds, 2_500e-9);
        assert_eq!(p.pools[0].workers[1].busy_seconds, 700e-9);
    }

    #[test]
    fn an_accepting_thread_outranks_the_guessed_main_thread() {
        // Puma-like: main thread 30 (guessed) sleeps elsewhere; thread 31 accepts.
        let threads = [
            (30, thread(30, 0, 0, 0, REGISTERED_BY_DAEMON)),
            (31, thread(30, 1, 0, 0, REGISTERED_BY_ACCEPT)),
        ];
        let m = Membership::from_holders(&[view(80)], &[holder(30, 1, 80, TCP_LISTEN, 5)]);
        let p = pools(&[view(80)], &m, &threads, 10, 100);
        assert_eq!(p.pools[0].workers[0].busy, Some(false));
    }

    #[test]
    fn open_accepted_connections_count_per_worker_once() {
        let holders = [
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_ESTABLISHED, 77),
            holder(11, 10, 80, TCP_ESTABLISHED, 77), // same socket through a dup'd fd
            holder(11, 10, 80, TCP_ESTABLISHED, 78),
        ];
        let m = Membership::from_holders(&[view(80)], &holders);
        let p = pools(&[view(80)], &m, &[], 0, 100);
        assert_eq!(p.pools[0].workers[0].active_connections, 2);
    }

    #[test]
    fn dead_threads_and_guesses_about_non_workers_are_forgotten() {
        let m = Membership::from_holders(&[view(80)], &[holder(11, 10, 80, TCP_LISTEN, 5)]);
        let threads = [
            (11, thread(11, 1, 0, 0, REGISTERED_BY_DAEMON)),
            (40, thread(40, 1, 0, 0, REGISTERED_BY_DAEMON)), // no longer holds a listener
            (50, thread(50, 1, 0, 0, REGISTERED_BY_ACCEPT)), // exited
        ];
        let mut stale = stale_threads(&threads, &m, |tgid, _| tgid != 50);
        stale.sort();
        assert_eq!(stale, vec![40, 50]);
    }

    #[test]
    fn worker_fds_hold_listeners_and_listener_epolls() {
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
        ];
        let m = Membership::from_holders(&[view(80)], &holders);
        let fds = worker_fds(&m, &HashMap::from([(11, vec![7])]));
        assert_eq!(fds.len(), 1, "only the worker, not the master");
        assert_eq!(fds[&11].listen, [3, -1, -1, -1]);
        assert_eq!(fds[&11].epoll, [7, -1, -1, -1]);
    }

    #[test]
    fn workers_beyond_the_cap_are_counted() {
        let holders: Vec<_> = (11..16)
            .map(|pid| holder(pid, 1, 80, TCP_LISTEN, 5))
            .collect();
        let m = Membership::from_holders(&[view(80)], &holders);
        let p = pools(&[view(80)], &m, &[], 0, 3);
        assert_eq!((p.pools[0].workers.len(), p.workers_over_cap), (3, 2));
    }
}
