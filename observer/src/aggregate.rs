//! Stage 3 of the data path: turns what the kernel counted (listener records
//! and per-address/per-process accept stats) into per-listener figures that
//! behave like Prometheus counters: monotonic from daemon start, surviving the
//! exit of the processes that did the accepting.
//!
//! Pure logic, no I/O: the caller passes the kernel snapshot and a liveness
//! test for process ids.
use std::{collections::BTreeMap, time::Duration};

use foldhash::{HashMap, HashMapExt, HashSet};

use observer_common::{AcceptKey, AcceptStats, WAIT_BUCKETS};

use crate::sockets::{ListenSocket, ListenerId, ListenerIndex, QueueHead};

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

/// One listening socket's figures, for the per-socket series of listeners
/// with more than one (SO_REUSEPORT groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketView {
    pub inode: u64,
    pub queue_len: u64,
    pub queue_max: u64,
    /// Its `sk_drops` since the daemon started.
    pub drops: u64,
    pub oldest_wait: Duration,
}

/// One listener's figures at a collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerView {
    pub id: ListenerId,
    /// Listening sockets behind this address (more than 1 with SO_REUSEPORT),
    /// by inode.
    pub sockets: Vec<SocketView>,
    pub queue_len: u64,
    pub queue_max: u64,
    pub syn_queue_len: u64,
    /// How long the oldest queued connection has waited (the longest of its
    /// sockets' queue heads); zero when nothing waits. TCP: from the
    /// kernel's queue-entry stamp. Unix: from the stamp our connect program
    /// wrote; for a head without one (queued before the daemon started),
    /// from the first collection that saw it at the head (a lower bound,
    /// late by at most the time between collections).
    pub oldest_wait: Duration,
    /// Connections that entered the accept queue since the daemon started.
    pub queued: u64,
    /// Connections the listener dropped since the daemon started (accept
    /// queue full, or SYN queue overflow): its sockets' `sk_drops` less the
    /// segments they discarded without losing a connection, which moves
    /// with ListenDrops. Meaningless where not [`ListenerView::drops_known`].
    pub drops: u64,
    /// `sk_drops` as read now (since the sockets were created).
    pub drops_raw: u64,
    pub accepts: Accepts,
    /// Accepts per live process (tgid) since the daemon started.
    pub by_process: BTreeMap<u32, Accepts>,
    /// Whether `accepts` holds each accepted connection's queue wait: TCP
    /// always (the kernel stamps the child); Unix where a program stamps
    /// connects (`Probes::unix_waits_timed`).
    pub waits_known: bool,
    /// Whether `drops` counts this listener's lost connections: TCP, where
    /// none of its sockets defers accept or where observer counts their
    /// discarded bare ACKs (`Probes::listen_discards` is `Ok`); never for
    /// Unix listeners (a full Unix queue makes clients wait in connect() or
    /// fail with EAGAIN, counted nowhere).
    pub drops_known: bool,
    /// Whether the listener has had traffic since the daemon started (or
    /// since it appeared): a connection queued, accepted or dropped, or one
    /// waiting now, in either queue. Stays true while the listener lives.
    /// A listener without is *quiet*: the exposition keeps its core series
    /// only (see `metrics`).
    pub had_traffic: bool,
}

impl ListenerView {
    /// See [`ListenerView::drops_known`] (the field).
    pub fn drops_known(&self) -> bool {
        self.drops_known
    }
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
    /// Every listener seen (capped or not), to find accepted connections'.
    pub index: ListenerIndex,
    /// Connections each process found exited in this collection accepted
    /// from a listener, to its end (the worker series' slots keep them).
    pub exited_accepts: HashMap<ListenerId, BTreeMap<u32, u64>>,
}

impl Collection {
    /// Where listener `id` is in `listeners` (sorted by id).
    pub fn position(&self, id: &ListenerId) -> Option<usize> {
        position(&self.listeners, id)
    }

    /// Whether listener `id` had traffic since the daemon started
    /// ([`ListenerView::had_traffic`]); false for one not collected.
    pub fn had_traffic(&self, id: &ListenerId) -> bool {
        position(&self.listeners, id).is_some_and(|i| self.listeners[i].had_traffic)
    }

    /// Marks listener `id` as having had traffic (its workers hold open
    /// connections, which the kernel counts nowhere else), from now on.
    pub fn mark_traffic(&mut self, id: &ListenerId) {
        if let Some(i) = position(&self.listeners, id) {
            self.listeners[i].had_traffic = true;
        }
    }
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
    /// See [`ListenerView::had_traffic`].
    had_traffic: bool,
}

/// What must survive between collections for one listening socket.
#[derive(Debug, Default)]
struct SocketState {
    /// `sk_drops` when first seen at daemon start (0 for later sockets).
    drops_baseline: u64,
    /// Unix: the connection at the head of the queue, and when it was
    /// first seen there.
    head: Option<(u64, Duration)>,
}

/// Holds what must survive between collections.
#[derive(Debug)]
pub struct Aggregator {
    seen_first_collection: bool,
    /// Every listener of the last collection, sorted by id (as the views
    /// are: one merge walk per collection, no hashing of 136-byte ids).
    listeners: Vec<(ListenerId, ListenerState)>,
    sockets: HashMap<u64, SocketState>,
    max_listeners: usize,
    /// See [`ListenerView::waits_known`].
    unix_waits_timed: bool,
    /// See [`ListenerView::drops_known`].
    listen_discards_counted: bool,
}

impl Aggregator {
    pub fn new(
        max_listeners: usize,
        unix_waits_timed: bool,
        listen_discards_counted: bool,
    ) -> Self {
        Aggregator {
            seen_first_collection: false,
            listeners: Vec::new(),
            sockets: HashMap::new(),
            max_listeners,
            unix_waits_timed,
            listen_discards_counted,
        }
    }

    /// Combines one kernel snapshot, read at `now` (any monotonic clock),
    /// into listener views.
    pub fn collect(
        &mut self,
        sockets: &[ListenSocket],
        accepts: &[(AcceptKey, AcceptStats)],
        is_alive: impl Fn(u32) -> bool,
        now: Duration,
    ) -> Collection {
        let startup = !self.seen_first_collection;
        self.seen_first_collection = true;
        let socket_views = self.socket_views(sockets, startup, now);
        let mut views = group_listeners(
            sockets,
            socket_views,
            self.unix_waits_timed,
            self.listen_discards_counted,
        );
        let index = ListenerIndex::from_sorted(views.iter().map(|v| v.id).collect(), sockets);

        let mut forget = Vec::new();
        // Accepts of live processes, per view (same order), and of those
        // that exited, per listener: those are folded into its state below.
        let mut live = vec![Accepts::default(); views.len()];
        let mut exited: HashMap<ListenerId, Accepts> = HashMap::new();
        let mut exited_accepts: HashMap<ListenerId, BTreeMap<u32, u64>> = HashMap::new();
        for (key, stats) in accepts {
            let Some(id) = index.listener_of(key.netns, key.family, &key.addr, key.port) else {
                forget.push(*key);
                continue;
            };
            if is_alive(key.tgid) {
                if let Some(i) = position(&views, &id) {
                    live[i].add(stats);
                    views[i].by_process.entry(key.tgid).or_default().add(stats);
                }
            } else if position(&views, &id).is_some() {
                exited.entry(id).or_default().add(stats);
                *exited_accepts
                    .entry(id)
                    .or_default()
                    .entry(key.tgid)
                    .or_default() += stats.accepted;
                forget.push(*key);
            }
        }

        // The listeners' states, merged with the views (both sorted by id):
        // a listener that closed has no view, and its state is dropped
        // (its keys are gone with it, above).
        let mut before = std::mem::take(&mut self.listeners).into_iter().peekable();
        let mut states = Vec::with_capacity(views.len());
        for (view, live) in views.iter_mut().zip(&live) {
            while before.next_if(|(id, _)| *id < view.id).is_some() {}
            let mut state = match before.next_if(|(id, _)| *id == view.id) {
                Some((_, state)) => state,
                None => ListenerState {
                    depth_baseline: if startup { view.queue_len } else { 0 },
                    drops_baseline: if startup { view.drops_raw } else { 0 },
                    ..Default::default()
                },
            };
            if let Some(exited) = exited.get(&view.id) {
                state.retired.add_accepts(exited);
            }
            view.accepts = state.retired;
            view.accepts.add_accepts(live);
            let derived =
                (view.accepts.accepted + view.queue_len).saturating_sub(state.depth_baseline);
            state.last_queued = state.last_queued.max(derived);
            view.queued = state.last_queued;
            state.last_drops = state
                .last_drops
                .max(view.drops_raw.saturating_sub(state.drops_baseline));
            view.drops = state.last_drops;
            state.had_traffic |= view.queued > 0
                || view.accepts.accepted > 0
                || view.drops > 0
                || view.queue_len > 0
                || view.syn_queue_len > 0;
            view.had_traffic = state.had_traffic;
            states.push((view.id, state));
        }
        self.listeners = states;

        let listeners_over_cap = cap(&mut views, self.max_listeners);
        Collection {
            listeners: views,
            listeners_over_cap,
            forget,
            index,
            exited_accepts,
        }
    }

    /// Remembers that listener `id` had traffic that the kernel counts
    /// nowhere else (its workers hold open connections): see
    /// [`Collection::mark_traffic`].
    pub fn mark_traffic(&mut self, id: &ListenerId) {
        if let Ok(i) = self.listeners.binary_search_by(|(other, _)| other.cmp(id)) {
            self.listeners[i].1.had_traffic = true;
        }
    }

    /// Each socket's figures (same order as `sockets`): drops since start,
    /// and how long its queue head has waited (Unix heads timed from their
    /// first sighting).
    fn socket_views(
        &mut self,
        sockets: &[ListenSocket],
        startup: bool,
        now: Duration,
    ) -> Vec<SocketView> {
        let present: HashSet<u64> = sockets.iter().map(|s| s.inode).collect();
        self.sockets.retain(|inode, _| present.contains(inode));
        sockets
            .iter()
            .map(|s| {
                let state = self.sockets.entry(s.inode).or_insert_with(|| SocketState {
                    drops_baseline: if startup { s.drops as u64 } else { 0 },
                    head: None,
                });
                let oldest_wait = match s.head {
                    QueueHead::Waited { us } => Duration::from_micros(us),
                    QueueHead::Unix { head: 0 } => {
                        state.head = None;
                        Duration::ZERO
                    }
                    QueueHead::Unix { head } => match state.head {
                        Some((seen, since)) if seen == head => now.saturating_sub(since),
                        _ => {
                            state.head = Some((head, now));
                            Duration::ZERO
                        }
                    },
                };
                SocketView {
                    inode: s.inode,
                    queue_len: s.queue_len as u64,
                    queue_max: s.queue_max as u64,
                    drops: (s.drops as u64).saturating_sub(state.drops_baseline),
                    oldest_wait,
                }
            })
            .collect()
    }
}

/// Where listener `id` is in `views` (sorted by id).
fn position(views: &[ListenerView], id: &ListenerId) -> Option<usize> {
    views.binary_search_by(|v| v.id.cmp(id)).ok()
}

/// Keeps at most `max` of `views` (sorted by id, and still so after),
/// listeners with traffic before quiet ones; returns how many it left out.
/// The views stay where they are: their order is chosen by index, and the
/// ones left out are removed in one pass.
fn cap(views: &mut Vec<ListenerView>, max: usize) -> u64 {
    let over = views.len().saturating_sub(max);
    if over == 0 {
        return 0;
    }
    // Those with traffic first, then by id (their index, views being sorted).
    let mut order: Vec<usize> = (0..views.len()).collect();
    order.select_nth_unstable_by_key(max, |i| (!views[*i].had_traffic, *i));
    let mut kept = vec![false; views.len()];
    for i in &order[..max] {
        kept[*i] = true;
    }
    let mut i = 0;
    views.retain(|_| {
        i += 1;
        kept[i - 1]
    });
    over as u64
}

/// One view per listener, summing the sockets behind it (`socket_views`:
/// the same order as `sockets`); sorted by id, each view's sockets by inode.
fn group_listeners(
    sockets: &[ListenSocket],
    socket_views: Vec<SocketView>,
    unix_waits_timed: bool,
    listen_discards_counted: bool,
) -> Vec<ListenerView> {
    let mut order: Vec<(&ListenSocket, SocketView)> = sockets.iter().zip(socket_views).collect();
    order.sort_unstable_by(|(a, _), (b, _)| (&a.id, a.inode).cmp(&(&b.id, b.inode)));
    // At most one view per socket: sized once, not regrown (and recopied)
    // a dozen times at 10,000 listeners.
    let mut views: Vec<ListenerView> = Vec::with_capacity(order.len());
    for (s, socket) in order {
        let view = match views.last_mut() {
            Some(view) if view.id == s.id => view,
            _ => {
                views.push(ListenerView {
                    id: s.id,
                    sockets: Vec::with_capacity(1),
                    queue_len: 0,
                    queue_max: 0,
                    syn_queue_len: 0,
                    oldest_wait: Duration::ZERO,
                    queued: 0,
                    drops: 0,
                    drops_raw: 0,
                    accepts: Accepts::default(),
                    by_process: BTreeMap::new(),
                    waits_known: !s.id.is_unix() || unix_waits_timed,
                    drops_known: !s.id.is_unix(),
                    had_traffic: false,
                });
                let last = views.len() - 1;
                &mut views[last]
            }
        };
        view.queue_len += s.queue_len as u64;
        view.queue_max += s.queue_max as u64;
        view.syn_queue_len += s.syn_queue_len as u64;
        view.drops_raw += s.drops as u64;
        view.drops_known &= !s.defer_accept || listen_discards_counted;
        view.oldest_wait = view.oldest_wait.max(socket.oldest_wait);
        view.sockets.push(socket);
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::UnixPath;
    use observer_common::{AF_INET, AF_INET6, AF_UNIX};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&a);
        addr
    }

    fn listener(addr: [u8; 16], family: u16, port: u16, depth: u32) -> ListenSocket {
        ListenSocket {
            id: ListenerId::tcp(1, family, addr, port),
            inode: port as u64,
            queue_len: depth,
            queue_max: 128,
            syn_queue_len: 0,
            drops: 0,
            defer_accept: false,
            head: QueueHead::Waited { us: 0 },
            unix_key: None,
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
        let mut agg = Aggregator::new(100, true, true);
        let records = [listener([0; 16], AF_INET, 80, 0)];
        let accepts = [(key(v4([127, 0, 0, 1]), AF_INET, 80, 7), stats(3, 1_000_000))];
        let c = agg.collect(&records, &accepts, |_| true, Duration::ZERO);
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].accepts.accepted, 3);
        assert_eq!(c.listeners[0].accepts.waits.count(), 3);
        assert_eq!(c.listeners[0].by_process[&7].accepted, 3);
    }

    #[test]
    fn ipv4_children_of_a_dual_stack_listener_count_for_it() {
        let mut agg = Aggregator::new(100, true, true);
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        let records = [listener([0; 16], AF_INET6, 8080, 0)];
        let accepts = [(key(mapped, AF_INET6, 8080, 7), stats(2, 0))];
        let c = agg.collect(&records, &accepts, |_| true, Duration::ZERO);
        assert_eq!(c.listeners[0].accepts.accepted, 2);
    }

    #[test]
    fn over_the_cap_listeners_with_traffic_are_kept_before_quiet_ones() {
        let mut agg = Aggregator::new(2, true, true);
        let lo = v4([127, 0, 0, 1]);
        let records = [
            listener(lo, AF_INET, 80, 0),
            listener(lo, AF_INET, 81, 0),
            listener(lo, AF_INET, 82, 1), // a connection waiting
        ];
        let c = agg.collect(&records, &[], |_| true, Duration::ZERO);
        let ports: Vec<u16> = c.listeners.iter().map(|v| v.id.port).collect();
        assert_eq!(ports, [80, 82]);
        assert_eq!(c.listeners_over_cap, 1);
        assert!(c.had_traffic(&c.listeners[1].id) && !c.had_traffic(&c.listeners[0].id));
    }

    #[test]
    fn queued_counts_from_the_depth_seen_at_start() {
        let mut agg = Aggregator::new(100, true, true);
        // At start 4 connections already wait; they are not "queued since start".
        let c = agg.collect(
            &[listener(v4([127, 0, 0, 1]), AF_INET, 80, 4)],
            &[],
            |_| true,
            Duration::ZERO,
        );
        assert_eq!(c.listeners[0].queued, 0);
        // 2 new arrive, 3 get accepted: depth 4 + 2 - 3 = 3.
        let accepts = [(key(v4([127, 0, 0, 1]), AF_INET, 80, 9), stats(3, 0))];
        let c = agg.collect(
            &[listener(v4([127, 0, 0, 1]), AF_INET, 80, 3)],
            &accepts,
            |_| true,
            Duration::ZERO,
        );
        assert_eq!(c.listeners[0].queued, 2);
    }

    #[test]
    fn each_listener_keeps_its_own_state_as_others_close_and_open() {
        let mut agg = Aggregator::new(100, true, true);
        let lo = v4([127, 0, 0, 1]);
        // A collection of these (port, depth) listeners: each one's queued.
        let mut queued_after = |ports: &[(u16, u32)]| -> Vec<u64> {
            let sockets: Vec<ListenSocket> = ports
                .iter()
                .map(|(p, depth)| listener(lo, AF_INET, *p, *depth))
                .collect();
            let c = agg.collect(&sockets, &[], |_| true, Duration::ZERO);
            c.listeners.iter().map(|v| v.queued).collect()
        };
        // At start, 80 and 82 hold 4 and 6 (their baselines).
        queued_after(&[(80, 4), (82, 6)]);
        // 81 opens between them with 2 queued (all new), 83 after them.
        let queued = queued_after(&[(80, 5), (81, 2), (82, 6), (83, 1)]);
        assert_eq!(queued, [1, 2, 0, 1]);
        // 81 closes, then comes back: a new listener, counted from 0.
        queued_after(&[(80, 5), (82, 7), (83, 1)]);
        let queued = queued_after(&[(80, 5), (81, 1), (82, 7), (83, 1)]);
        assert_eq!(queued, [1, 1, 1, 1]);
    }

    #[test]
    fn views_come_sorted_by_listener_with_their_sockets_by_inode() {
        let lo = v4([127, 0, 0, 1]);
        let with_inode = |mut s: ListenSocket, inode: u64| {
            s.inode = inode;
            s
        };
        let unix = |path: &[u8], inode: u64| ListenSocket {
            id: ListenerId::unix(1, UnixPath::new(path)),
            unix_key: Some(inode),
            ..with_inode(listener([0; 16], AF_UNIX, 0, 0), inode)
        };
        let sockets = [
            with_inode(listener(lo, AF_INET, 90, 0), 9),
            unix(b"/run/b.sock", 4),
            with_inode(listener([0; 16], AF_INET6, 80, 0), 7),
            with_inode(listener(lo, AF_INET, 80, 0), 12),
            unix(b"/run/a.sock", 5),
            with_inode(listener(lo, AF_INET, 80, 0), 3), // SO_REUSEPORT
            unix(b"/run/b.sock", 2),                     // bound again
        ];
        let c = Aggregator::new(100, true, true).collect(&sockets, &[], |_| true, Duration::ZERO);
        let got: Vec<(ListenerId, Vec<u64>)> = c
            .listeners
            .iter()
            .map(|v| (v.id, v.sockets.iter().map(|s| s.inode).collect()))
            .collect();
        let mut want: Vec<(ListenerId, Vec<u64>)> = Vec::new();
        let mut by_id: Vec<&ListenSocket> = sockets.iter().collect();
        by_id.sort_by_key(|s| (s.id, s.inode));
        for s in by_id {
            match want.last_mut() {
                Some((id, inodes)) if *id == s.id => inodes.push(s.inode),
                _ => want.push((s.id, vec![s.inode])),
            }
        }
        assert_eq!(got, want);
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn listeners_created_after_start_count_their_whole_queue() {
        let mut agg = Aggregator::new(100, true, true);
        agg.collect(&[], &[], |_| true, Duration::ZERO);
        let c = agg.collect(
            &[listener(v4([127, 0, 0, 1]), AF_INET, 81, 5)],
            &[],
            |_| true,
            Duration::ZERO,
        );
        assert_eq!(c.listeners[0].queued, 5);
    }

    #[test]
    fn queued_never_goes_backwards() {
        let mut agg = Aggregator::new(100, true, true);
        agg.collect(&[], &[], |_| true, Duration::ZERO);
        let l = |d| [listener(v4([127, 0, 0, 1]), AF_INET, 80, d)];
        assert_eq!(
            agg.collect(&l(5), &[], |_| true, Duration::ZERO).listeners[0].queued,
            5
        );
        // A racy sample (depth read after an accept that the map missed).
        assert_eq!(
            agg.collect(&l(4), &[], |_| true, Duration::ZERO).listeners[0].queued,
            5
        );
    }

    #[test]
    fn counts_of_exited_processes_are_kept_and_their_keys_forgotten() {
        let mut agg = Aggregator::new(100, true, true);
        let records = [listener([0; 16], AF_INET, 80, 0)];
        let dead = key(v4([127, 0, 0, 1]), AF_INET, 80, 100);
        let alive = key(v4([127, 0, 0, 1]), AF_INET, 80, 200);
        let c = agg.collect(
            &records,
            &[(dead, stats(5, 0)), (alive, stats(1, 0))],
            |pid| pid == 200,
            Duration::ZERO,
        );
        assert_eq!(c.forget, vec![dead]);
        assert_eq!(c.listeners[0].accepts.accepted, 6);
        assert!(!c.listeners[0].by_process.contains_key(&100));
        // Next round the dead key is gone from the map; the total stays.
        let c = agg.collect(
            &records,
            &[(alive, stats(2, 0))],
            |pid| pid == 200,
            Duration::ZERO,
        );
        assert_eq!(c.listeners[0].accepts.accepted, 7);
    }

    #[test]
    fn a_closed_listener_disappears_and_its_keys_are_forgotten() {
        let mut agg = Aggregator::new(100, true, true);
        let k = key(v4([127, 0, 0, 1]), AF_INET, 80, 1);
        agg.collect(
            &[listener([0; 16], AF_INET, 80, 0)],
            &[(k, stats(1, 0))],
            |_| true,
            Duration::ZERO,
        );
        let c = agg.collect(&[], &[(k, stats(1, 0))], |_| true, Duration::ZERO);
        assert!(c.listeners.is_empty());
        assert_eq!(c.forget, vec![k]);
    }

    #[test]
    fn drops_count_from_daemon_start() {
        let mut agg = Aggregator::new(100, true, true);
        let l = |drops| ListenSocket {
            drops,
            ..listener([0; 16], AF_INET, 80, 0)
        };
        assert_eq!(
            agg.collect(&[l(7)], &[], |_| true, Duration::ZERO)
                .listeners[0]
                .drops,
            0
        );
        assert_eq!(
            agg.collect(&[l(10)], &[], |_| true, Duration::ZERO)
                .listeners[0]
                .drops,
            3
        );
    }

    #[test]
    fn reuseport_siblings_are_summed_and_kept_one_by_one() {
        let mut agg = Aggregator::new(100, true, true);
        let l = listener([0; 16], AF_INET, 80, 2);
        let full = ListenSocket {
            inode: 99,
            queue_len: 128,
            drops: 5,
            ..l
        };
        let c = agg.collect(&[l, full], &[], |_| true, Duration::ZERO);
        assert_eq!(c.listeners.len(), 1);
        let v = &c.listeners[0];
        assert_eq!((v.sockets.len(), v.queue_len, v.queue_max), (2, 130, 256));
        assert_eq!(
            v.sockets
                .iter()
                .map(|s| (s.inode, s.queue_len))
                .collect::<Vec<_>>(),
            vec![(80, 2), (99, 128)]
        );
        let more = ListenSocket { drops: 9, ..full };
        let c = agg.collect(&[l, more], &[], |_| true, Duration::ZERO);
        assert_eq!(c.listeners[0].sockets[1].drops, 4);
    }

    #[test]
    fn the_oldest_wait_is_the_longest_queue_head_of_the_listener() {
        let mut agg = Aggregator::new(100, true, true);
        let a = ListenSocket {
            head: QueueHead::Waited { us: 1_500_000 },
            ..listener([0; 16], AF_INET, 80, 1)
        };
        let b = ListenSocket {
            inode: 2,
            head: QueueHead::Waited { us: 300_000 },
            ..a
        };
        let c = agg.collect(&[a, b], &[], |_| true, Duration::ZERO);
        assert_eq!(c.listeners[0].oldest_wait, Duration::from_millis(1500));
    }

    #[test]
    fn a_unix_queue_head_is_timed_from_its_first_sighting() {
        let mut agg = Aggregator::new(100, true, true);
        let unix = |head| ListenSocket {
            id: ListenerId::unix(1, UnixPath::new(b"/run/app.sock")),
            inode: 5,
            queue_len: (head != 0) as u32,
            queue_max: 128,
            syn_queue_len: 0,
            drops: 0,
            defer_accept: false,
            head: QueueHead::Unix { head },
            unix_key: Some(0xffff_0000),
        };
        let at = Duration::from_secs;
        let wait = |c: Collection| c.listeners[0].oldest_wait;
        assert_eq!(
            wait(agg.collect(&[unix(0xa)], &[], |_| true, at(10))),
            at(0)
        );
        assert_eq!(
            wait(agg.collect(&[unix(0xa)], &[], |_| true, at(13))),
            at(3)
        );
        // Accepted; the next one is new at the head.
        assert_eq!(
            wait(agg.collect(&[unix(0xb)], &[], |_| true, at(14))),
            at(0)
        );
        assert_eq!(wait(agg.collect(&[unix(0)], &[], |_| true, at(15))), at(0));
    }

    #[test]
    fn unix_accepts_count_for_the_listener_that_owns_their_key() {
        let mut agg = Aggregator::new(100, true, true);
        let key_value: u64 = 0xffff_8881_2345_6780;
        let socket = ListenSocket {
            id: ListenerId::unix(1, UnixPath::new(b"\0uwsgi")),
            inode: 5,
            queue_len: 0,
            queue_max: 100,
            syn_queue_len: 0,
            drops: 0,
            defer_accept: false,
            head: QueueHead::Unix { head: 0 },
            unix_key: Some(key_value),
        };
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&key_value.to_ne_bytes());
        let accepted = (key(addr, AF_UNIX, 0, 42), stats(3, 0));
        let c = agg.collect(&[socket], &[accepted], |_| true, Duration::ZERO);
        assert_eq!(c.listeners[0].accepts.accepted, 3);
        assert_eq!(c.listeners[0].by_process[&42].accepted, 3);
        assert!(!c.listeners[0].drops_known());
    }

    #[test]
    fn listeners_beyond_the_cap_are_counted_not_exported() {
        let mut agg = Aggregator::new(2, true, true);
        let records: Vec<_> = (1..=5).map(|p| listener([0; 16], AF_INET, p, 0)).collect();
        let c = agg.collect(&records, &[], |_| true, Duration::ZERO);
        assert_eq!((c.listeners.len(), c.listeners_over_cap), (2, 3));
    }
}
