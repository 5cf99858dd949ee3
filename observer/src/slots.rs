//! Stage 3c: stable worker series. Pools replace their workers all the
//! time (gunicorn `--max-requests`, php-fpm `ondemand`, reloads), and a
//! series per process would grow without bound. Each worker of a pool
//! instead takes a **slot**: the lowest one free when it is first seen,
//! kept while it lives, and taken over by a process that comes after it
//! exits. A pool has no more slots than it ever had workers at once.
//!
//! Each slot's counters carry on across the processes that held it: what
//! they counted (up to their exit: the kernel's accept count and the
//! sampler's busy time of a process that exited since the last scrape),
//! plus its current process's own. A slot no process holds now keeps its
//! counters exported, so `sum()` and `rate()` over a pool's slots equal
//! its workers' totals over any window. Pure logic, no I/O.
use std::{collections::BTreeMap, time::Duration};

use foldhash::HashMap;

use crate::{
    sockets::{ByListener, ListenerId},
    workers::{Comm, Pools, WorkerView},
};

/// What processes that exited since the last scrape counted to the end.
#[derive(Debug, Default)]
pub struct Finals {
    /// Connections each accepted from a listener, by listener and pid.
    pub accepts: HashMap<ListenerId, BTreeMap<u32, u64>>,
    /// Busy time of each, by pid, from the thread sampler.
    pub busy_seconds: HashMap<u32, f64>,
}

/// A slot's counters: what its processes counted, the current one's
/// included.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotCounts {
    /// Its position in the pool: the `worker` label.
    pub no: u32,
    pub accepts: u64,
    pub busy_seconds: f64,
    /// Whether the thread sampler saw a process in it (its busy time means
    /// something).
    pub sampled: bool,
    /// The name of its first process (the `comm` label: a successor of
    /// another name does not start another series).
    pub comm: Comm,
}

/// The slots of every pool, kept from scrape to scrape.
#[derive(Debug, Default)]
pub struct Slots {
    /// By listener: the pools of a scrape come in listener order, so each
    /// finds its slots at the next place (10,000 pools on a large host).
    pools: ByListener<Vec<Slot>>,
    pending: PendingBusy,
    /// When the last scrape assigned them.
    last: Option<Duration>,
}

/// The time constant of each slot's accept rate: the busiest slot's share
/// is about the last 5 minutes', as the `uneven` rule reads it.
pub const SHARE_WINDOW: Duration = Duration::from_secs(300);

/// Final busy time of processes the sampler stopped watching, kept until a
/// slot takes it: an exiting worker leaves the listener's holders (and the
/// sampler's watch) a scrape before its accepts count as exited; and a
/// worker forked just after a holder walk is watched as a worker one
/// scrape late.
#[derive(Debug, Default)]
struct PendingBusy {
    /// pid → (seconds, scrapes left before it is dropped).
    by_pid: HashMap<u32, (f64, u8)>,
}

impl PendingBusy {
    /// How many scrapes a pid's busy time waits for its slot.
    const SCRAPES: u8 = 3;

    fn add(&mut self, finals: &HashMap<u32, f64>) {
        for (pid, seconds) in finals {
            self.by_pid.insert(*pid, (*seconds, Self::SCRAPES));
        }
    }

    fn take(&mut self, pid: u32) -> Option<f64> {
        self.by_pid.remove(&pid).map(|(seconds, _)| seconds)
    }

    fn age(&mut self) {
        self.by_pid.retain(|_, (_, left)| {
            *left -= 1;
            *left > 0
        });
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// The process in it, and its own counts at the last scrape.
    holder: Option<Holder>,
    /// The name of the last process in it.
    comm: Option<Comm>,
    /// Whether the thread sampler has seen a process in it.
    sampled: bool,
    /// The last process that left it before its exit was seen (it stopped
    /// holding the listener while exiting), with what was counted for it:
    /// its final accepts add the rest once it has exited, or, back in the
    /// pool, it does not count again what was.
    departed: Option<Counted>,
    /// Its accepts at the last scrape, and their rate per second averaged
    /// over about [`SHARE_WINDOW`] (exponentially weighted).
    accepts_seen: u64,
    accept_rate: f64,
    /// What the processes before it counted.
    retired_accepts: u64,
    retired_busy_seconds: f64,
}

/// A process's own counts, as last seen; `base` is the part a slot
/// counted already (a worker back in its pool after it left it).
#[derive(Clone, Copy, Debug, Default)]
struct Counted {
    pid: u32,
    accepts: u64,
    busy_seconds: f64,
}

#[derive(Debug)]
struct Holder {
    own: Counted,
    base: Counted,
}

impl Holder {
    fn accepts(&self) -> u64 {
        self.own.accepts.saturating_sub(self.base.accepts)
    }

    fn busy_seconds(&self) -> f64 {
        (self.own.busy_seconds - self.base.busy_seconds).max(0.0)
    }
}

impl Slot {
    /// The holder's counts move into the slot's own: to the process's
    /// final ones where it exited, else to what was last seen.
    fn retire(&mut self, exited: Option<&BTreeMap<u32, u64>>, pending: &mut PendingBusy) {
        let Some(mut h) = self.holder.take() else {
            return;
        };
        let final_accepts = exited.and_then(|e| e.get(&h.own.pid)).copied();
        h.own.accepts = h.own.accepts.max(final_accepts.unwrap_or(0));
        let busy = pending.take(h.own.pid).unwrap_or(0.0);
        h.own.busy_seconds = h.own.busy_seconds.max(busy);
        if final_accepts.is_none() {
            self.departed = Some(h.own);
        }
        self.retired_accepts += h.accepts();
        self.retired_busy_seconds += h.busy_seconds();
    }

    /// Records `w` as the holder's latest (`base`: what a slot counted of
    /// it already). A count that went back is a new process under the same
    /// pid (each counter on its own: the kernel's accepts of a reused pid
    /// carry on where busy time starts again), and the old one's stay. A
    /// new holder brings the busy time it had before it was a worker.
    fn hold(&mut self, w: &WorkerView, base: Counted, pending: &mut PendingBusy) {
        let own = Counted {
            pid: w.pid,
            accepts: w.accepts,
            busy_seconds: w.busy_seconds,
        };
        let holder = match self.holder.take() {
            Some(mut h) => {
                if own.accepts < h.own.accepts {
                    self.retired_accepts += h.accepts();
                    h.base.accepts = 0;
                }
                if own.busy_seconds < h.own.busy_seconds {
                    self.retired_busy_seconds += h.busy_seconds();
                    h.base.busy_seconds = 0.0;
                }
                Holder { own, base: h.base }
            }
            None => {
                self.retired_busy_seconds += pending.take(w.pid).unwrap_or(0.0);
                Holder { own, base }
            }
        };
        self.comm.get_or_insert_with(|| w.comm.clone());
        self.sampled |= w.busy.is_some();
        self.holder = Some(holder);
    }

    fn counts(&self, no: usize) -> SlotCounts {
        let (accepts, busy) = self
            .holder
            .as_ref()
            .map_or((0, 0.0), |h| (h.accepts(), h.busy_seconds()));
        SlotCounts {
            no: no as u32,
            accepts: self.retired_accepts + accepts,
            busy_seconds: self.retired_busy_seconds + busy,
            sampled: self.sampled,
            comm: self.comm.clone().unwrap_or_else(|| Comm::from("")),
        }
    }
}

impl Slots {
    /// Gives each worker of `pools` its slot and the slot's counters, and
    /// each pool its busiest slot's share of accepts, at `now`. Pools whose
    /// listener is gone are forgotten.
    pub fn assign(&mut self, pools: &mut Pools, finals: &Finals, now: Duration) {
        let elapsed = self.last.map(|last| now.saturating_sub(last));
        self.last = Some(now);
        self.pending.add(&finals.busy_seconds);
        let mut before = std::mem::take(&mut self.pools);
        let mut kept = Vec::with_capacity(pools.pools.len());
        for pool in &mut pools.pools {
            let mut slots = before.take(&pool.listener);
            let known = slots.len();
            let exited = finals.accepts.get(&pool.listener);
            pool.vacant_slots =
                assign_pool(&mut slots, &mut pool.workers, exited, &mut self.pending);
            // A new slot's rate starts from what it holds now, not from all
            // its first process accepted before.
            for (no, slot) in slots.iter_mut().enumerate().skip(known) {
                slot.accepts_seen = slot.counts(no).accepts;
            }
            pool.busiest_accept_share = busiest_share(&mut slots, elapsed);
            // A listener without workers keeps no entry (most of them, on a
            // host of 10,000 listeners): a missing one reads as no slots.
            if !slots.is_empty() {
                kept.push((pool.listener, slots));
            }
        }
        self.pools = ByListener::new(kept);
        self.pending.age();
    }
}

/// Assigns one pool's slots, given what its processes that exited since
/// the last scrape accepted; returns the slots no process holds now.
fn assign_pool(
    slots: &mut Vec<Slot>,
    workers: &mut [WorkerView],
    exited: Option<&BTreeMap<u32, u64>>,
    pending: &mut PendingBusy,
) -> Vec<SlotCounts> {
    let slot_of = PidIndex::new(
        slots
            .iter()
            .enumerate()
            .filter_map(|(no, s)| Some((s.holder.as_ref()?.own.pid, no)))
            .collect(),
    );
    // Slots whose process left first, so that a newcomer can take one.
    let present = PidIndex::new(workers.iter().map(|w| (w.pid, 0)).collect());
    for slot in slots.iter_mut() {
        if slot
            .holder
            .as_ref()
            .is_some_and(|h| present.get(h.own.pid).is_none())
        {
            slot.retire(exited, pending);
        }
    }
    let comm = (workers.first().map(|w| w.comm.clone()))
        .or_else(|| slots.iter().find_map(|s| s.comm.clone()));
    for (pid, accepts) in exited.into_iter().flatten() {
        if slot_of.get(*pid).is_none() {
            count_exited(slots, (*pid, *accepts), pending, &comm);
        }
    }
    for w in workers.iter_mut() {
        let (no, base) = match slot_of.get(w.pid) {
            Some(no) => (no, Counted::default()),
            None => (free_slot(slots), came_back(slots, w)),
        };
        slots[no].hold(w, base, pending);
        w.slot = slots[no].counts(no);
    }
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.holder.is_none() && s.comm.is_some())
        .map(|(no, s)| s.counts(no))
        .collect()
}

/// Pids and a number each, sorted by pid: a pool's lookups by pid without
/// a hash table (most pools are small, and 10,000 of them are assigned a
/// scrape on a large host).
struct PidIndex(Vec<(u32, usize)>);

impl PidIndex {
    fn new(mut pids: Vec<(u32, usize)>) -> PidIndex {
        pids.sort_unstable_by_key(|(pid, _)| *pid);
        PidIndex(pids)
    }

    fn get(&self, pid: u32) -> Option<usize> {
        let at = self.0.binary_search_by_key(&pid, |(p, _)| *p).ok()?;
        Some(self.0[at].1)
    }
}

/// Counts a process that exited since the last scrape without holding a
/// slot now: one that left its slot at an earlier scrape adds the rest of
/// its accepts there; one that came and went between two scrapes takes a
/// free slot for that while, and what it counted stays in it.
fn count_exited(
    slots: &mut Vec<Slot>,
    (pid, accepts): (u32, u64),
    pending: &mut PendingBusy,
    comm: &Option<Comm>,
) {
    if let Some(slot) = slots
        .iter_mut()
        .find(|s| s.departed.is_some_and(|d| d.pid == pid))
    {
        let counted = slot.departed.take().map_or(0, |d| d.accepts);
        slot.retired_accepts += accepts.saturating_sub(counted);
        return;
    }
    let free = free_slot(slots);
    let slot = &mut slots[free];
    slot.retired_accepts += accepts;
    if let Some(busy) = pending.take(pid) {
        slot.retired_busy_seconds += busy;
        slot.sampled = true;
    }
    slot.comm = slot.comm.take().or_else(|| comm.clone());
}

/// For a worker new to the pool's slots that left one of them alive (it
/// stopped holding the listener for a while): what was counted of it, so
/// that its own counts, which carried on, are not counted twice.
fn came_back(slots: &mut [Slot], w: &WorkerView) -> Counted {
    let Some(slot) = slots
        .iter_mut()
        .find(|s| s.departed.is_some_and(|d| d.pid == w.pid))
    else {
        return Counted::default();
    };
    let Some(counted) = slot.departed.take() else {
        return Counted::default();
    };
    // A count lower than what was counted started again (a new process).
    Counted {
        pid: w.pid,
        accepts: if w.accepts >= counted.accepts {
            counted.accepts
        } else {
            0
        },
        busy_seconds: if w.busy_seconds >= counted.busy_seconds {
            counted.busy_seconds
        } else {
            0.0
        },
    }
}

/// Updates each slot's accept rate with its accepts since the last scrape
/// (`elapsed` ago) and returns the busiest worker's share of the rate of
/// the pool's workers alive now, for two or more that accepted about one
/// connection in the last 5 minutes or more.
fn busiest_share(slots: &mut [Slot], elapsed: Option<Duration>) -> Option<f64> {
    let Some(dt) = elapsed.filter(|dt| !dt.is_zero()) else {
        for (no, slot) in slots.iter_mut().enumerate() {
            slot.accepts_seen = slot.counts(no).accepts;
        }
        return None;
    };
    let weight = 1.0 - (-dt.as_secs_f64() / SHARE_WINDOW.as_secs_f64()).exp();
    for (no, slot) in slots.iter_mut().enumerate() {
        let accepts = slot.counts(no).accepts;
        let rate = accepts.saturating_sub(slot.accepts_seen) as f64 / dt.as_secs_f64();
        slot.accept_rate += weight * (rate - slot.accept_rate);
        slot.accepts_seen = accepts;
    }
    // Among the workers alive now: a pool whose new processes take the
    // lowest free slot (php-fpm ondemand) is not uneven for that.
    let held = || slots.iter().filter(|s| s.holder.is_some());
    let total: f64 = held().map(|s| s.accept_rate).sum();
    let busiest = held().map(|s| s.accept_rate).fold(0.0, f64::max);
    // A pool that went quiet has no share to tell (its old rates decay
    // alike and would keep the old share forever).
    let some_accepts = total * SHARE_WINDOW.as_secs_f64() >= 1.0;
    (held().count() >= 2 && some_accepts).then(|| busiest / total)
}

/// The lowest slot no process holds, a new one if none.
fn free_slot(slots: &mut Vec<Slot>) -> usize {
    match slots.iter().position(|s| s.holder.is_none()) {
        Some(free) => free,
        None => {
            slots.push(Slot::default());
            slots.len() - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::PoolView;

    fn id() -> ListenerId {
        ListenerId::tcp(
            1,
            observer_common::AF_INET,
            [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            8000,
        )
    }

    fn worker(pid: u32, accepts: u64, busy_seconds: f64) -> WorkerView {
        WorkerView {
            pid,
            comm: "gunicorn".into(),
            accepts,
            active_connections: 0,
            unread_connections: 0,
            requests_in_service: None,
            busy: Some(false),
            idle_threads: Some(1),
            busy_seconds,
            slot: SlotCounts::default(),
        }
    }

    impl Slots {
        fn of(&self, listener: &ListenerId) -> &[Slot] {
            self.pools.get(listener).map_or(&[], |slots| slots)
        }
    }

    /// One pool, of `workers`, on the test's listener.
    fn one_pool(workers: Vec<WorkerView>) -> Pools {
        Pools {
            pools: vec![PoolView {
                listener: id(),
                workers,
                dispatchers: vec![],
                unread: Default::default(),
                vacant_slots: vec![],
                busiest_accept_share: None,
            }],
            workers_over_cap: 0,
        }
    }

    fn scrape(
        slots: &mut Slots,
        workers: Vec<WorkerView>,
        finals: &Finals,
    ) -> Vec<(u32, u32, u64)> {
        let mut pools = one_pool(workers);
        slots.assign(&mut pools, finals, Duration::ZERO);
        pools.pools[0]
            .workers
            .iter()
            .map(|w| (w.pid, w.slot.no, w.slot.accepts))
            .collect()
    }

    /// A scrape at `t` seconds of one pool of `workers`: its busiest share.
    fn share_at(slots: &mut Slots, workers: Vec<WorkerView>, t: u64) -> Option<f64> {
        let mut pools = one_pool(workers);
        slots.assign(&mut pools, &Finals::default(), Duration::from_secs(t));
        pools.pools[0].busiest_accept_share
    }

    #[test]
    fn a_replacement_takes_the_slot_of_the_worker_it_replaces_and_its_counts_carry_on() {
        let mut slots = Slots::default();
        let none = Finals::default();
        assert_eq!(
            scrape(
                &mut slots,
                vec![worker(10, 3, 1.0), worker(11, 4, 2.0)],
                &none
            ),
            vec![(10, 0, 3), (11, 1, 4)]
        );
        // 10 exited after 5 accepts (2 since the last scrape); 12 replaced it.
        let mut finals = Finals::default();
        finals.accepts.insert(id(), BTreeMap::from([(10, 5)]));
        finals.busy_seconds.insert(10, 1.5);
        assert_eq!(
            scrape(
                &mut slots,
                vec![worker(11, 6, 2.0), worker(12, 1, 0.5)],
                &finals
            ),
            vec![(11, 1, 6), (12, 0, 6)]
        );
        let mut pools = one_pool(vec![worker(11, 6, 2.0), worker(12, 1, 0.5)]);
        slots.assign(&mut pools, &none, Duration::ZERO);
        assert_eq!(pools.pools[0].workers[1].slot.busy_seconds, 2.0);
    }

    /// Pools on `(port, workers)`, in the order given.
    fn pools_on(ports: &[(u16, Vec<WorkerView>)]) -> Pools {
        let pools = ports
            .iter()
            .map(|(port, workers)| PoolView {
                listener: ListenerId::tcp(1, observer_common::AF_INET, id().addr, *port),
                workers: workers.clone(),
                dispatchers: vec![],
                unread: Default::default(),
                vacant_slots: vec![],
                busiest_accept_share: None,
            })
            .collect();
        Pools {
            pools,
            workers_over_cap: 0,
        }
    }

    #[test]
    fn each_pool_keeps_its_slots_as_listeners_come_and_go_in_any_order() {
        let mut slots = Slots::default();
        let none = Finals::default();
        let mut first = pools_on(&[
            (8001, vec![worker(10, 1, 0.0)]),
            (8002, vec![worker(20, 2, 0.0)]),
            (8003, vec![worker(30, 3, 0.0), worker(31, 4, 0.0)]),
        ]);
        slots.assign(&mut first, &none, Duration::ZERO);
        // 8002 closed, 8000 is new, and the pools come out of order; 31
        // exited after 6 accepts, and 32 took its place; 10 after 2, and 11.
        let mut finals = Finals::default();
        finals
            .accepts
            .insert(first.pools[2].listener, BTreeMap::from([(31, 6)]));
        finals
            .accepts
            .insert(first.pools[0].listener, BTreeMap::from([(10, 2)]));
        let mut second = pools_on(&[
            (8003, vec![worker(32, 1, 0.0), worker(30, 5, 0.0)]),
            (8000, vec![worker(40, 7, 0.0)]),
            (8001, vec![worker(11, 1, 0.0)]),
        ]);
        slots.assign(&mut second, &finals, Duration::ZERO);
        let seen = |pools: &Pools| -> Vec<Vec<(u32, u32, u64)>> {
            pools
                .pools
                .iter()
                .map(|p| {
                    p.workers
                        .iter()
                        .map(|w| (w.pid, w.slot.no, w.slot.accepts))
                        .collect()
                })
                .collect()
        };
        assert_eq!(
            seen(&second),
            vec![
                vec![(32, 1, 7), (30, 0, 5)],
                vec![(40, 0, 7)],
                vec![(11, 0, 3)],
            ]
        );
        // 8002's slots are gone: a pool there again starts afresh.
        let mut third = pools_on(&[(8002, vec![worker(21, 1, 0.0)])]);
        slots.assign(&mut third, &none, Duration::ZERO);
        assert_eq!(seen(&third), vec![vec![(21, 0, 1)]]);
        assert_eq!(slots.pools.len(), 1, "only the pools of the last scrape");
    }

    #[test]
    fn slots_never_outnumber_the_most_workers_alive_at_once() {
        let mut slots = Slots::default();
        let none = Finals::default();
        for round in 0..100u32 {
            // Two workers, each replaced every round.
            let workers = vec![
                worker(1000 + 2 * round, 1, 0.0),
                worker(1001 + 2 * round, 1, 0.0),
            ];
            let seen = scrape(&mut slots, workers, &none);
            assert_eq!(seen.iter().map(|w| w.1).collect::<Vec<_>>(), vec![0, 1]);
            assert_eq!(seen[0].2, u64::from(round) + 1, "one accept per process");
        }
        assert_eq!(slots.of(&id()).len(), 2);
    }

    #[test]
    fn a_worker_that_came_and_went_between_two_scrapes_leaves_its_counts_in_a_slot() {
        let mut slots = Slots::default();
        scrape(&mut slots, vec![worker(10, 3, 0.0)], &Finals::default());
        // 10 exited with 4 accepts; 11 took over, served 2 and exited; 12
        // is there now. Slot 0 has all of it, and nothing else was made.
        let mut finals = Finals::default();
        finals
            .accepts
            .insert(id(), BTreeMap::from([(10, 4), (11, 2)]));
        finals.busy_seconds.extend([(10, 1.0), (11, 0.5)]);
        assert_eq!(
            scrape(&mut slots, vec![worker(12, 1, 0.25)], &finals),
            vec![(12, 0, 7)]
        );
        assert_eq!(slots.of(&id()).len(), 1);
        assert_eq!(slots.of(&id())[0].counts(0).busy_seconds, 1.75);
    }

    #[test]
    fn a_worker_that_leaves_its_listener_while_exiting_is_counted_once_it_has_exited() {
        let mut slots = Slots::default();
        scrape(&mut slots, vec![worker(10, 3, 1.0)], &Finals::default());
        // 10 closed its files on its way out but is not reaped: no worker
        // now, its accepts not final yet; the sampler's last busy time is.
        let mut leaving = Finals::default();
        leaving.busy_seconds.insert(10, 1.4);
        scrape(&mut slots, vec![], &leaving);
        // Reaped: 5 accepts to its end. 11 replaced it.
        let mut exited = Finals::default();
        exited.accepts.insert(id(), BTreeMap::from([(10, 5)]));
        assert_eq!(
            scrape(&mut slots, vec![worker(11, 1, 0.25)], &exited),
            vec![(11, 0, 6)]
        );
        assert_eq!(slots.of(&id())[0].counts(0).busy_seconds, 1.65);
    }

    #[test]
    fn a_worker_back_in_its_pool_after_a_while_away_is_not_counted_twice() {
        let mut slots = Slots::default();
        let none = Finals::default();
        scrape(
            &mut slots,
            vec![worker(10, 3, 1.0), worker(11, 1, 0.5)],
            &none,
        );
        // 10 left the pool's view alive (not exited), then came back with
        // its own counts carried on.
        scrape(&mut slots, vec![worker(11, 1, 0.5)], &none);
        let back = scrape(
            &mut slots,
            vec![worker(10, 5, 1.5), worker(11, 1, 0.5)],
            &none,
        );
        let total: u64 = back.iter().map(|w| w.2).sum::<u64>()
            + slots
                .of(&id())
                .iter()
                .enumerate()
                .filter(|(_, s)| s.holder.is_none())
                .map(|(no, s)| s.counts(no).accepts)
                .sum::<u64>();
        assert_eq!(total, 6, "5 accepts of 10 and 1 of 11: {back:?}");
    }

    #[test]
    fn the_busiest_share_is_of_the_workers_alive_now() {
        // php-fpm ondemand: one child at a time, each taking the lowest
        // free slot: slot 0 takes every accept, and no one is uneven.
        let mut slots = Slots::default();
        let mut pools = |pid: u32, accepts: u64, t: u64| {
            share_at(&mut slots, vec![worker(pid, accepts, 0.0)], t)
        };
        for i in 0..10u32 {
            assert_eq!(pools(100 + i, 10, 15 * u64::from(i)), None);
        }
    }

    #[test]
    fn a_count_that_goes_back_is_a_new_process_and_the_slot_keeps_counting() {
        let mut slots = Slots::default();
        let none = Finals::default();
        scrape(&mut slots, vec![worker(10, 7, 0.0)], &none);
        // pid 10 exited and was reused between two scrapes.
        assert_eq!(
            scrape(&mut slots, vec![worker(10, 2, 0.0)], &none),
            vec![(10, 0, 9)]
        );
    }

    #[test]
    fn the_busiest_slots_share_follows_the_accepts_of_the_last_minutes() {
        let mut slots = Slots::default();
        let share = |slots: &mut Slots, a: u64, b: u64, t: u64| {
            share_at(slots, vec![worker(10, a, 0.0), worker(11, b, 0.0)], t)
        };
        assert_eq!(share(&mut slots, 0, 0, 0), None, "no rate from one scrape");
        assert_eq!(share(&mut slots, 0, 0, 15), None, "no accepts yet");
        // One worker takes 9 of every 10 connections for 10 minutes.
        let mut last = None;
        for i in 1..=40 {
            last = share(&mut slots, 90 * i, 10 * i, 15 + 15 * i);
        }
        assert!((last.unwrap() - 0.9).abs() < 1e-9, "{last:?}");
        // Then both take as many: the old share fades as e^(-t / 5 min),
        // and 10 minutes on it is near half.
        for i in 1..=40 {
            last = share(&mut slots, 3600 + 50 * i, 400 + 50 * i, 615 + 15 * i);
        }
        let now = last.unwrap();
        assert!(now < 0.6 && now > 0.5, "{now}");
    }

    #[test]
    fn a_pool_whose_listener_closed_is_forgotten() {
        let mut slots = Slots::default();
        scrape(&mut slots, vec![worker(10, 7, 0.0)], &Finals::default());
        slots.assign(&mut Pools::default(), &Finals::default(), Duration::ZERO);
        assert!(slots.pools.is_empty());
    }
}
