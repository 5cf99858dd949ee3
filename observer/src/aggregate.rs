//! Stage 3 of the data path: turns what the kernel counted (listener records
//! and per-address/per-process accept stats) into per-listener figures that
//! behave like Prometheus counters: monotonic from daemon start, surviving the
//! exit of the processes that did the accepting.
//!
//! Pure logic, no I/O: the caller passes the kernel snapshot and a liveness
//! test for process ids.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use observer_common::{AF_INET, AF_INET6, AcceptKey, AcceptStats, ListenerRecord, WAIT_BUCKETS};

/// A listening address: what the metrics' `addr`, `port` and `netns` labels
/// name. Sockets sharing it (SO_REUSEPORT groups) are reported together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId {
    pub netns: u32,
    pub family: u16,
    pub addr: [u8; 16],
    pub port: u16,
}

impl ListenerId {
    pub fn ip(&self) -> IpAddr {
        match self.family {
            AF_INET => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            _ => IpAddr::V6(Ipv6Addr::from(self.addr)),
        }
    }

    pub fn from_record(r: &ListenerRecord) -> Self {
        ListenerId {
            netns: r.netns,
            family: r.family,
            addr: r.addr,
            port: r.port,
        }
    }
}

/// Queue-wait histogram: per-bucket counts (not cumulative), last = +Inf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Waits {
    pub buckets: [u64; WAIT_BUCKETS + 1],
    pub sum_ns: u64,
}

impl Waits {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Accept counts of one listener (or one worker of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Accepts {
    pub accepted: u64,
    pub waits: Waits,
}

impl Accepts {
    fn add(&mut self, s: &AcceptStats) {
        self.accepted += s.accepted;
        self.waits.sum_ns += s.wait_sum_ns;
        for (total, n) in self.waits.buckets.iter_mut().zip(s.wait_buckets.iter()) {
            *total += n;
        }
    }

    fn add_accepts(&mut self, other: &Accepts) {
        self.accepted += other.accepted;
        self.waits.sum_ns += other.waits.sum_ns;
        for (total, n) in self
            .waits
            .buckets
            .iter_mut()
            .zip(other.waits.buckets.iter())
        {
            *total += n;
        }
    }
}

/// One listener's figures at a collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerView {
    pub id: ListenerId,
    /// Listening sockets behind this address (more than 1 with SO_REUSEPORT).
    pub sockets: u32,
    pub queue_len: u64,
    pub queue_max: u64,
    pub syn_queue_len: u64,
    /// Connections that entered the accept queue since the daemon started.
    pub queued: u64,
    /// Connections the listener dropped since the daemon started (accept
    /// queue full, or SYN queue overflow): the kernel's per-socket `sk_drops`,
    /// which moves with ListenDrops.
    pub drops: u64,
    /// `sk_drops` as read now (since the sockets were created).
    pub drops_raw: u64,
    pub accepts: Accepts,
    /// Accepts per live process (tgid) since the daemon started.
    pub by_process: BTreeMap<u32, Accepts>,
}

/// What one collection produced.
#[derive(Clone, Debug, Default)]
pub struct Collection {
    pub listeners: Vec<ListenerView>,
    /// Listeners left out because of the cap.
    pub listeners_over_cap: u64,
    /// Map keys the caller should delete from the kernel map (their counts are
    /// folded in here, or their listener is gone).
    pub forget: Vec<AcceptKey>,
}

#[derive(Debug, Default)]
struct ListenerState {
    /// Queue depth when first seen at daemon start (0 for later listeners).
    depth_baseline: u64,
    /// Counts of processes that exited, folded in when their keys were deleted.
    retired: Accepts,
    /// Last exported `queued`, to keep it monotonic across sampling races.
    last_queued: u64,
    /// `sk_drops` when first seen at daemon start (0 for later listeners).
    drops_baseline: u64,
    /// Last exported `drops`.
    last_drops: u64,
}

/// Holds what must survive between collections.
#[derive(Debug)]
pub struct Aggregator {
    seen_first_collection: bool,
    listeners: HashMap<ListenerId, ListenerState>,
    max_listeners: usize,
}

impl Aggregator {
    pub fn new(max_listeners: usize) -> Self {
        Aggregator {
            seen_first_collection: false,
            listeners: HashMap::new(),
            max_listeners,
        }
    }

    /// Combines one kernel snapshot into listener views.
    pub fn collect(
        &mut self,
        records: &[ListenerRecord],
        accepts: &[(AcceptKey, AcceptStats)],
        is_alive: impl Fn(u32) -> bool,
    ) -> Collection {
        let mut views = group_listeners(records);
        let startup = !self.seen_first_collection;
        self.seen_first_collection = true;

        // Listeners that closed: forget their state (and, below, their keys).
        let present: HashSet<ListenerId> = views.keys().copied().collect();
        self.listeners.retain(|id, _| present.contains(id));
        for (id, view) in &views {
            self.listeners.entry(*id).or_insert_with(|| ListenerState {
                depth_baseline: if startup { view.queue_len } else { 0 },
                drops_baseline: if startup { view.drops_raw } else { 0 },
                ..Default::default()
            });
        }

        let mut forget = Vec::new();
        let mut live: HashMap<ListenerId, Accepts> = HashMap::new();
        for (key, stats) in accepts {
            let child = ListenerId {
                netns: key.netns,
                family: key.family,
                addr: key.addr,
                port: key.port,
            };
            let Some(id) = listener_of(child, &present) else {
                forget.push(*key);
                continue;
            };
            if is_alive(key.tgid) {
                live.entry(id).or_default().add(stats);
                if let Some(view) = views.get_mut(&id) {
                    view.by_process.entry(key.tgid).or_default().add(stats);
                }
            } else if let Some(state) = self.listeners.get_mut(&id) {
                state.retired.add(stats);
                forget.push(*key);
            }
        }

        for (id, view) in views.iter_mut() {
            let state = self
                .listeners
                .get_mut(id)
                .expect("state inserted above for every view");
            view.accepts = state.retired;
            if let Some(l) = live.get(id) {
                view.accepts.add_accepts(l);
            }
            let derived =
                (view.accepts.accepted + view.queue_len).saturating_sub(state.depth_baseline);
            state.last_queued = state.last_queued.max(derived);
            view.queued = state.last_queued;
            state.last_drops = state
                .last_drops
                .max(view.drops_raw.saturating_sub(state.drops_baseline));
            view.drops = state.last_drops;
        }

        let mut listeners: Vec<ListenerView> = views.into_values().collect();
        listeners.sort_by_key(|v| v.id);
        let listeners_over_cap = listeners.len().saturating_sub(self.max_listeners) as u64;
        listeners.truncate(self.max_listeners);
        Collection {
            listeners,
            listeners_over_cap,
            forget,
        }
    }
}

/// One view per listening address, summing SO_REUSEPORT siblings.
fn group_listeners(records: &[ListenerRecord]) -> HashMap<ListenerId, ListenerView> {
    let mut views: HashMap<ListenerId, ListenerView> = HashMap::new();
    for r in records {
        if r.family != AF_INET && r.family != AF_INET6 {
            continue;
        }
        let id = ListenerId::from_record(r);
        let view = views.entry(id).or_insert_with(|| ListenerView {
            id,
            sockets: 0,
            queue_len: 0,
            queue_max: 0,
            syn_queue_len: 0,
            queued: 0,
            drops: 0,
            drops_raw: 0,
            accepts: Accepts::default(),
            by_process: BTreeMap::new(),
        });
        view.sockets += 1;
        view.queue_len += r.queue_len as u64;
        view.queue_max += r.queue_max as u64;
        view.syn_queue_len += r.syn_queue_len as u64;
        view.drops_raw += r.drops as u64;
    }
    views
}

/// The listener that accepted a child socket bound to `child` (its local
/// address): the listener bound to exactly that address, else the wildcard
/// listener on that port (for IPv4 children of a dual-stack `[::]` listener,
/// the child is an IPv6 socket with a v4-mapped address).
pub fn listener_of(child: ListenerId, present: &HashSet<ListenerId>) -> Option<ListenerId> {
    if present.contains(&child) {
        return Some(child);
    }
    if child.family == AF_INET6 && is_v4_mapped(&child.addr) {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&child.addr[12..16]);
        let as_v4 = ListenerId {
            family: AF_INET,
            addr: v4,
            ..child
        };
        if present.contains(&as_v4) {
            return Some(as_v4);
        }
    }
    let wildcard = ListenerId {
        addr: [0; 16],
        ..child
    };
    if present.contains(&wildcard) {
        return Some(wildcard);
    }
    None
}

fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&a);
        addr
    }

    fn listener(addr: [u8; 16], family: u16, port: u16, depth: u32) -> ListenerRecord {
        ListenerRecord {
            netns: 1,
            family,
            port,
            addr,
            queue_len: depth,
            queue_max: 128,
            ..Default::default()
        }
    }

    fn key(addr: [u8; 16], family: u16, port: u16, tgid: u32) -> AcceptKey {
        AcceptKey {
            netns: 1,
            tgid,
            family,
            port,
            _pad: 0,
            addr,
        }
    }

    fn stats(accepted: u64, wait_ns_each: u64) -> AcceptStats {
        let mut s = AcceptStats::ZERO;
        s.accepted = accepted;
        s.wait_sum_ns = accepted * wait_ns_each;
        s.wait_buckets[observer_common::wait_bucket(wait_ns_each / 1000)] = accepted;
        s
    }

    #[test]
    fn children_of_a_wildcard_listener_count_for_it() {
        let mut agg = Aggregator::new(100);
        let records = [listener([0; 16], AF_INET, 80, 0)];
        let accepts = [(key(v4([127, 0, 0, 1]), AF_INET, 80, 7), stats(3, 1_000_000))];
        let c = agg.collect(&records, &accepts, |_| true);
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].accepts.accepted, 3);
        assert_eq!(c.listeners[0].accepts.waits.count(), 3);
        assert_eq!(c.listeners[0].by_process[&7].accepted, 3);
    }

    #[test]
    fn ipv4_children_of_a_dual_stack_listener_count_for_it() {
        let mut agg = Aggregator::new(100);
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        let records = [listener([0; 16], AF_INET6, 8080, 0)];
        let accepts = [(key(mapped, AF_INET6, 8080, 7), stats(2, 0))];
        let c = agg.collect(&records, &accepts, |_| true);
        assert_eq!(c.listeners[0].accepts.accepted, 2);
    }

    #[test]
    fn queued_counts_from_the_depth_seen_at_start() {
        let mut agg = Aggregator::new(100);
        // At start 4 connections already wait; they are not "queued since start".
        let c = agg.collect(&[listener(v4([127, 0, 0, 1]), AF_INET, 80, 4)], &[], |_| {
            true
        });
        assert_eq!(c.listeners[0].queued, 0);
        // 2 new arrive, 3 get accepted: depth 4 + 2 - 3 = 3.
        let accepts = [(key(v4([127, 0, 0, 1]), AF_INET, 80, 9), stats(3, 0))];
        let c = agg.collect(
            &[listener(v4([127, 0, 0, 1]), AF_INET, 80, 3)],
            &accepts,
            |_| true,
        );
        assert_eq!(c.listeners[0].queued, 2);
    }

    #[test]
    fn listeners_created_after_start_count_their_whole_queue() {
        let mut agg = Aggregator::new(100);
        agg.collect(&[], &[], |_| true);
        let c = agg.collect(&[listener(v4([127, 0, 0, 1]), AF_INET, 81, 5)], &[], |_| {
            true
        });
        assert_eq!(c.listeners[0].queued, 5);
    }

    #[test]
    fn queued_never_goes_backwards() {
        let mut agg = Aggregator::new(100);
        agg.collect(&[], &[], |_| true);
        let l = |d| [listener(v4([127, 0, 0, 1]), AF_INET, 80, d)];
        assert_eq!(agg.collect(&l(5), &[], |_| true).listeners[0].queued, 5);
        // A racy sample (depth read after an accept that the map missed).
        assert_eq!(agg.collect(&l(4), &[], |_| true).listeners[0].queued, 5);
    }

    #[test]
    fn counts_of_exited_processes_are_kept_and_their_keys_forgotten() {
        let mut agg = Aggregator::new(100);
        let records = [listener([0; 16], AF_INET, 80, 0)];
        let dead = key(v4([127, 0, 0, 1]), AF_INET, 80, 100);
        let alive = key(v4([127, 0, 0, 1]), AF_INET, 80, 200);
        let c = agg.collect(
            &records,
            &[(dead, stats(5, 0)), (alive, stats(1, 0))],
            |pid| pid == 200,
        );
        assert_eq!(c.forget, vec![dead]);
        assert_eq!(c.listeners[0].accepts.accepted, 6);
        assert!(!c.listeners[0].by_process.contains_key(&100));
        // Next round the dead key is gone from the map; the total stays.
        let c = agg.collect(&records, &[(alive, stats(2, 0))], |pid| pid == 200);
        assert_eq!(c.listeners[0].accepts.accepted, 7);
    }

    #[test]
    fn a_closed_listener_disappears_and_its_keys_are_forgotten() {
        let mut agg = Aggregator::new(100);
        let k = key(v4([127, 0, 0, 1]), AF_INET, 80, 1);
        agg.collect(
            &[listener([0; 16], AF_INET, 80, 0)],
            &[(k, stats(1, 0))],
            |_| true,
        );
        let c = agg.collect(&[], &[(k, stats(1, 0))], |_| true);
        assert!(c.listeners.is_empty());
        assert_eq!(c.forget, vec![k]);
    }

    #[test]
    fn drops_count_from_daemon_start() {
        let mut agg = Aggregator::new(100);
        let l = |drops| ListenerRecord {
            drops,
            ..listener([0; 16], AF_INET, 80, 0)
        };
        assert_eq!(agg.collect(&[l(7)], &[], |_| true).listeners[0].drops, 0);
        assert_eq!(agg.collect(&[l(10)], &[], |_| true).listeners[0].drops, 3);
    }

    #[test]
    fn reuseport_siblings_are_summed() {
        let mut agg = Aggregator::new(100);
        let l = listener([0; 16], AF_INET, 80, 2);
        let c = agg.collect(&[l, l], &[], |_| true);
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(
            (
                c.listeners[0].sockets,
                c.listeners[0].queue_len,
                c.listeners[0].queue_max
            ),
            (2, 4, 256)
        );
    }

    #[test]
    fn listeners_beyond_the_cap_are_counted_not_exported() {
        let mut agg = Aggregator::new(2);
        let records: Vec<_> = (1..=5).map(|p| listener([0; 16], AF_INET, p, 0)).collect();
        let c = agg.collect(&records, &[], |_| true);
        assert_eq!((c.listeners.len(), c.listeners_over_cap), (2, 3));
    }

    #[test]
    fn addresses_format_like_ss() {
        let id = ListenerId {
            netns: 1,
            family: AF_INET,
            addr: v4([127, 0, 0, 1]),
            port: 80,
        };
        assert_eq!(id.ip().to_string(), "127.0.0.1");
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let id = ListenerId {
            family: AF_INET6,
            addr: v6,
            ..id
        };
        assert_eq!(id.ip().to_string(), "::1");
    }
}
