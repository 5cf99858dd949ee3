//! Stage 3b: worker pools. Joins who holds each listener (the socket-holder
//! iterator), what the thread sampler saw each worker doing, and who
//! accepted what (the listener views) into one pool per listener: its
//! workers, each busy or idle.
//!
//! A pool's **workers** are the processes that serve the listener's
//! connections:
//! - the processes holding the listening socket, except its master (a holder
//!   whose child also holds it: gunicorn's arbiter, nginx's or uWSGI's
//!   master) and its dispatchers (below);
//! - **fed workers**: processes holding accepted connections of the listener
//!   without holding the listener, handed each one by another process (an fd
//!   passed over a Unix socket with `SCM_RIGHTS`, as Node's cluster primary
//!   does, or inherited by a child forked per connection). They are
//!   remembered while they live ([`Handoffs`]): between connections they
//!   hold none.
//!
//! A **dispatcher** is a holder that is the parent of a fed worker: it
//! accepts and hands the connections on, and is shown as such, not as a
//! worker. Whether a worker is busy is the rule in `activity.rs`. Pure
//! logic, no I/O.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use observer_common::{TCP_LISTEN, WorkerFds};

use crate::{
    activity::{PoolTag, Watched, WatchedSet},
    aggregate::{Collection, ListenerView},
    kernel::holders::{HolderWalk, Inheritor},
    sampler::WorkerActivity,
    slots::SlotCounts,
    sockets::{ByListener, ListenSocket, ListenerId},
};

/// A process's name (`comm`), shared by every view that shows it.
pub type Comm = std::sync::Arc<str>;

/// One worker process of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    pub pid: u32,
    pub comm: Comm,
    /// Connections it accepted from this listener since the daemon started.
    pub accepts: u64,
    /// Accepted connections of this listener it holds open now.
    pub active_connections: u64,
    /// Of those, the ones whose client's bytes it has not started to read.
    pub unread_connections: u64,
    /// Of those, the ones holding a request in service: read in full and
    /// not yet answered (see `HolderRecord::in_service`); `None` for a
    /// Unix listener, whose connections keep no such counters.
    pub requests_in_service: Option<u64>,
    /// `None` until the thread sampler has seen it (or where it cannot run).
    pub busy: Option<bool>,
    /// Its threads free to take a new request, as the sampler last saw
    /// them (`activity::ProcessState`); `None` with `busy`.
    pub idle_threads: Option<u32>,
    /// Busy time the sampler integrated since it first saw the worker.
    pub busy_seconds: f64,
    /// Its slot in the pool and the slot's counters (set by `slots`).
    pub slot: SlotCounts,
}

/// The second queue of a listener: accepted connections whose client has
/// sent bytes that no process has started to read (TCP only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unread {
    pub connections: u64,
    /// The longest any of them has waited since it entered the accept
    /// queue (its accept-queue wait included).
    pub oldest: Duration,
}

/// A process that accepts a listener's connections and hands them to its
/// fed workers.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatcherView {
    pub pid: u32,
    pub comm: Comm,
    /// Connections it accepted from this listener since the daemon started.
    pub accepts: u64,
}

/// The workers of one listener.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    pub listener: ListenerId,
    pub workers: Vec<WorkerView>,
    pub dispatchers: Vec<DispatcherView>,
    pub unread: Unread,
    /// Slots whose process exited and that no process took over yet: their
    /// counters stay exported (`slots`).
    pub vacant_slots: Vec<VacantSlot>,
    /// The largest share of the pool's accepts one worker slot took, over
    /// about the last 5 minutes (`slots`); `None` for a pool of one slot,
    /// or one that did not accept.
    pub busiest_accept_share: Option<f64>,
}

/// A worker slot no process holds now: its counters stay exported.
pub type VacantSlot = SlotCounts;

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

impl Pools {
    /// Listeners whose workers hold connections open now.
    pub fn serving(&self) -> impl Iterator<Item = &ListenerId> {
        self.pools
            .iter()
            .filter(|pool| {
                pool.unread.connections > 0 || pool.workers.iter().any(|w| w.active_connections > 0)
            })
            .map(|pool| &pool.listener)
    }
}

/// Who hands connections to whom, per listener, kept from one collection
/// to the next while the processes live: a fed worker idle between
/// connections holds none, and a fork-per-connection server's dispatcher
/// has no child between connections.
#[derive(Clone, Debug, Default)]
pub struct Handoffs {
    /// Processes seen serving the listener's connections without holding
    /// the listener: pid → parent's pid.
    fed: BTreeMap<ListenerId, BTreeMap<u32, u32>>,
    /// Holders seen as the parent of a fed worker.
    dispatchers: BTreeMap<ListenerId, BTreeSet<u32>>,
    /// Holders seen as the parent of another holder: a pool's master stays
    /// one in the moment between a worker's exit and its replacement's
    /// fork, when it holds the listener alone, but not once it accepts
    /// (a server whose fork was caught before its exec: a CGI, a
    /// subprocess) or after [`MASTER_ALONE`] collections alone. Only
    /// listeners with masters have an entry.
    masters: ByListener<BTreeMap<u32, MasterSeen>>,
    /// Fed workers' names, from when they were seen: one between
    /// connections holds nothing that would name it.
    comms: HashMap<u32, Comm>,
}

impl Handoffs {
    /// Forgets processes that exited.
    pub fn retain_alive(&mut self, alive: impl Fn(u32) -> bool) {
        for fed in self.fed.values_mut() {
            fed.retain(|pid, _| alive(*pid));
        }
        for dispatchers in self.dispatchers.values_mut() {
            dispatchers.retain(|pid| alive(*pid));
        }
        for masters in self.masters.values_mut() {
            masters.retain(|pid, _| alive(*pid));
        }
        self.comms.retain(|pid, _| alive(*pid));
        self.forget_empty();
    }

    /// Keeps the name of every fed worker, and names those seen before.
    fn remember_comms(&mut self, comms: &mut HashMap<u32, Comm>) {
        for pid in self.fed.values().flat_map(|fed| fed.keys()) {
            match comms.get(pid) {
                Some(comm) => {
                    self.comms.insert(*pid, comm.clone());
                }
                None => {
                    if let Some(comm) = self.comms.get(pid) {
                        comms.insert(*pid, comm.clone());
                    }
                }
            }
        }
    }

    fn forget_empty(&mut self) {
        self.fed.retain(|_, fed| !fed.is_empty());
        self.dispatchers.retain(|_, d| !d.is_empty());
        self.masters.retain(|m| !m.is_empty());
    }

    /// Learns this collection's fed workers (processes holding a
    /// listener's accepted connections and not the listener), and from
    /// them the roles of every listener's processes. A process that now
    /// holds the listener is no longer fed; a dispatcher that no longer
    /// holds it is forgotten, and so is a listener that is gone or left out
    /// by the cap (which is not a pool: as a filtered-out one, its
    /// processes are not sampled). `holders` and the result are by
    /// [`ListenerNo`] in `listeners`.
    fn learn(
        &mut self,
        listeners: &[ListenerView],
        holders: &[HolderSet],
        servers: &BTreeMap<ListenerNo, BTreeMap<u32, u32>>,
    ) -> Vec<Arc<Roles>> {
        let number = |id: &ListenerId| listeners.binary_search_by(|v| v.id.cmp(id)).ok();
        // Taken listener by listener, in order; what is not taken (a
        // listener gone, or held by no one now) is forgotten.
        let mut masters_before = std::mem::take(&mut self.masters);
        let mut masters_now = Vec::new();
        self.fed.retain(|id, _| number(id).is_some());
        for (no, servers) in servers {
            let holding = &holders[*no];
            let fed = self.fed.entry(listeners[*no].id).or_default();
            for (pid, ppid) in servers {
                if !holds(holding, *pid) {
                    fed.insert(*pid, *ppid);
                }
            }
        }
        // One empty set of roles, shared by the listeners nobody serves.
        let nobody = Arc::new(Roles::default());
        let mut roles_of: Vec<Arc<Roles>> = (0..listeners.len()).map(|_| nobody.clone()).collect();
        // Listeners with the very same set of holders (a pool holding many
        // listeners, one process holding thousands) and nothing known of
        // them but their masters share one computation: looked up by the
        // set alone where nothing else is known (most listeners), a key
        // that hashes as one number.
        let mut shared: HashMap<(usize, Vec<u32>, Vec<u32>), Arc<Roles>> = HashMap::new();
        let mut shared_plain: HashMap<usize, Arc<Roles>> = HashMap::new();
        let (no_one, no_one_else) = (BTreeMap::new(), BTreeSet::new());
        for (no, (view, holding)) in listeners.iter().zip(holders).enumerate() {
            let id = &view.id;
            if holding.is_empty() {
                // Served by fed workers only (or by no one seen).
                if let Some(fed) = self.fed.get(id) {
                    roles_of[no] = Arc::new(Roles {
                        workers: fed.keys().copied().collect(),
                        ..Roles::default()
                    });
                }
                continue;
            }
            // Most listeners have neither: the maps are empty, and cheap.
            if let Some(fed) = self.fed.get_mut(id) {
                fed.retain(|pid, _| !holds(holding, *pid));
            }
            if let Some(dispatchers) = self.dispatchers.get_mut(id) {
                dispatchers.retain(|pid| holds(holding, *pid));
            }
            let accepted = |pid: &u32| view.by_process.get(pid).map_or(0, |a| a.accepted);
            let masters_seen = masters_before.take(id);
            let known_masters: BTreeSet<u32> = masters_seen
                .iter()
                .filter(|(pid, seen)| seen.still_master(holds(holding, **pid), accepted(pid)))
                .map(|(pid, _)| *pid)
                .collect();
            let serving: BTreeSet<u32> = view
                .by_process
                .iter()
                .filter(|(pid, a)| a.accepted > 0 && holds(holding, **pid))
                .map(|(pid, _)| *pid)
                .collect();
            let known = Known {
                dispatchers: self.dispatchers.get(id).unwrap_or(&no_one_else),
                masters: &known_masters,
                serving: &serving,
            };
            let fed = self.fed.get(id).unwrap_or(&no_one);
            let r = if fed.is_empty()
                && known.dispatchers.is_empty()
                && (holding.len() > FEW_PROCESSES || holding.is_shared())
            {
                let compute = || Arc::new(roles(holding, fed, known));
                if known_masters.is_empty() && serving.is_empty() {
                    shared_plain
                        .entry(holding.identity())
                        .or_insert_with(compute)
                        .clone()
                } else {
                    let key = (
                        holding.identity(),
                        known_masters.iter().copied().collect(),
                        serving.iter().copied().collect(),
                    );
                    shared.entry(key).or_insert_with(compute).clone()
                }
            } else {
                Arc::new(roles(holding, fed, known))
            };
            remember(&mut self.dispatchers, id, &r.dispatchers);
            // A listener without masters now keeps none.
            if !r.masters.is_empty() {
                masters_now.push((*id, masters_seen_now(&r, &masters_seen, accepted)));
            }
            roles_of[no] = r;
        }
        self.dispatchers
            .retain(|id, _| number(id).is_some_and(|no| !holders[no].is_empty()));
        self.masters = ByListener::new(masters_now);
        self.forget_empty();
        roles_of
    }
}

/// What is known of a listener's masters now (`r.masters`): what each had
/// accepted, and how many collections in a row it held the listener alone
/// (`before`: as the last collection saw them).
fn masters_seen_now(
    r: &Roles,
    before: &BTreeMap<u32, MasterSeen>,
    accepted: impl Fn(&u32) -> u64,
) -> BTreeMap<u32, MasterSeen> {
    r.masters
        .iter()
        .map(|pid| {
            let has_child = r.lone_masters.binary_search(pid).is_err();
            let seen = MasterSeen {
                accepted: accepted(pid),
                alone: match before.get(pid) {
                    Some(seen) if !has_child => seen.alone.saturating_add(1),
                    _ => 0,
                },
            };
            (*pid, seen)
        })
        .collect()
}

/// How many collections in a row a master may hold its listener alone
/// and stay one (a pool between a worker's exit and its replacement's
/// fork; longer, it serves the listener itself).
const MASTER_ALONE: u8 = 3;

/// What is known of a listener's master.
#[derive(Clone, Copy, Debug, Default)]
struct MasterSeen {
    /// The connections it had accepted from the listener.
    accepted: u64,
    /// Collections in a row it held the listener with no child holding it.
    alone: u8,
}

impl MasterSeen {
    /// Whether a master seen before is one still: it holds the listener,
    /// has not accepted from it since, and has not held it alone too long.
    fn still_master(&self, holds: bool, accepted: u64) -> bool {
        holds && accepted <= self.accepted && self.alone < MASTER_ALONE
    }
}

/// Keeps `pids` as a listener's processes of one role, or forgets the
/// listener's where there are none.
fn remember(known: &mut BTreeMap<ListenerId, BTreeSet<u32>>, id: &ListenerId, pids: &[u32]) {
    if pids.is_empty() {
        known.remove(id);
    } else {
        known.insert(*id, pids.iter().copied().collect());
    }
}

/// A listener's processes of each role seen before, and the holders that
/// have accepted from it.
#[derive(Clone, Copy)]
struct Known<'a> {
    dispatchers: &'a BTreeSet<u32>,
    masters: &'a BTreeSet<u32>,
    serving: &'a BTreeSet<u32>,
}

/// A listener's place in the collection's listeners (sorted by id): the
/// index of membership's per-listener tables. Numbering the listeners once
/// per collection makes each table a `Vec`, read in order, instead of a
/// hash map keyed by a 136-byte [`ListenerId`] and looked up several times
/// per listener.
pub type ListenerNo = usize;

/// A process holding a listener, with its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Process {
    pid: u32,
    ppid: u32,
}

/// Whether `pid` is among `holders` (sorted by pid).
fn holds(holders: &[Process], pid: u32) -> bool {
    holders.binary_search_by_key(&pid, |p| p.pid).is_ok()
}

/// The processes holding a listener, sorted by pid: shared by every
/// listener with the very same holders (a pool's workers that inherited
/// 10,000 listeners are one set, not 10,000 copies).
#[derive(Clone, Debug, Default)]
struct HolderSet(Arc<[Process]>);

impl HolderSet {
    /// Which set this is, for as long as it lives.
    fn identity(&self) -> usize {
        Arc::as_ptr(&self.0) as *const Process as usize
    }

    /// Whether other listeners have this very set too.
    fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

impl std::ops::Deref for HolderSet {
    type Target = [Process];
    fn deref(&self) -> &[Process] {
        &self.0
    }
}

/// One listener's processes by role, each sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Roles {
    workers: Vec<u32>,
    dispatchers: Vec<u32>,
    masters: Vec<u32>,
    /// Masters none of whose children hold the listener (now).
    lone_masters: Vec<u32>,
}

/// Who serves a listener, from its holders (sorted by pid) and its fed
/// workers (each pid → its parent's pid) and the roles known before: a
/// holder whose child also holds the listener, or that was seen as its
/// master, is its master, unless it accepts from the listener itself; one
/// whose child is a fed worker, or that was seen as a dispatcher, a
/// dispatcher; the other holders and every fed worker are workers. A
/// worker's own child that holds the listener without accepting from it
/// (a CGI or a subprocess between its fork and its exec, which inherited
/// the worker's fds) is none of these: its parent stays the worker.
fn roles(holders: &[Process], fed: &BTreeMap<u32, u32>, known: Known) -> Roles {
    let parents_of_holders = Parents::of(holders.iter().map(|p| p.ppid));
    let parents_of_fed = Parents::of(fed.values().copied());
    let serves = |pid: u32| known.serving.contains(&pid);
    let mut roles = Roles::default();
    for p in holders {
        if !serves(p.pid) && serves(p.ppid) {
            continue; // a serving worker's child
        }
        let has_child = parents_of_holders.contains(p.pid) && !serves(p.pid);
        if has_child || known.masters.contains(&p.pid) {
            roles.masters.push(p.pid);
            if !has_child {
                roles.lone_masters.push(p.pid);
            }
            continue;
        }
        if parents_of_fed.contains(p.pid) || known.dispatchers.contains(&p.pid) {
            roles.dispatchers.push(p.pid);
        } else {
            roles.workers.push(p.pid);
        }
    }
    if !fed.is_empty() {
        roles.workers.extend(fed.keys().copied());
        roles.workers.sort_unstable();
        roles.workers.dedup();
    }
    roles
}

/// The parents of a set of processes: a hash set for a large pool, a scan
/// for a few (most listeners have one holder, and a set for each of 10,000
/// costs more than the scans).
enum Parents<I> {
    Few(I),
    Many(HashSet<u32>),
}

/// How many processes a scan is cheaper for than a hash set.
const FEW_PROCESSES: usize = 8;

impl<I: ExactSizeIterator<Item = u32> + Clone> Parents<I> {
    const FEW: usize = FEW_PROCESSES;

    fn of(parents: I) -> Parents<I> {
        if parents.len() <= Self::FEW {
            Parents::Few(parents)
        } else {
            Parents::Many(parents.collect())
        }
    }

    fn contains(&self, pid: u32) -> bool {
        match self {
            Parents::Few(parents) => parents.clone().any(|parent| parent == pid),
            Parents::Many(parents) => parents.contains(&pid),
        }
    }
}

/// At most this many of a process's accepted connections are kept to find
/// its event loop by (a fed worker's epoll watches them).
const CONNECTION_FDS_KEPT: usize = 16;

/// The processes that serve each listener, with their names. Per-listener
/// tables are indexed by [`ListenerNo`] in the collection it was made from.
pub struct Membership {
    /// Each listener's processes by role: shared by listeners with the
    /// same holders (one pool holding many listeners).
    roles: Vec<Arc<Roles>>,
    /// Every process holding each listener (masters included), by pid.
    holders: Vec<HolderSet>,
    /// Each worker's pool: the first listener it serves, in id order
    /// (workers that hold the same listeners share it).
    pool_tags: HashMap<u32, PoolTag>,
    /// Each master's pool (see [`Handoffs`]), likewise.
    master_tags: HashMap<u32, PoolTag>,
    comms: HashMap<u32, Comm>,
    /// Open accepted connections per (listener, pid).
    active: HashMap<(ListenerNo, u32), u64>,
    /// Of those, the unread ones.
    unread_held: HashMap<(ListenerNo, u32), u64>,
    /// Of those, the ones holding a request in service.
    in_service_held: HashMap<(ListenerNo, u32), u64>,
    /// Unread connections per listener, each socket once.
    unread: HashMap<ListenerNo, Unread>,
    /// Listening-socket fds per process, sorted (shared by the children
    /// that inherited them).
    listen_fds: HashMap<u32, Arc<[i32]>>,
    /// Some fds of accepted connections per process (at most
    /// [`CONNECTION_FDS_KEPT`]).
    connection_fds: HashMap<u32, BTreeSet<i32>>,
    /// Every (inode, process) of a listening socket and a process holding
    /// it by a record of its own: sorted, once each.
    socket_holders: Vec<(u64, u32)>,
    /// The children that inherited their parent's listeners.
    inherited: InheritedGroups,
}

fn comm_string(comm: &[u8; 16]) -> Comm {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    Comm::from(String::from_utf8_lossy(&comm[..end]))
}

/// A listening socket a parent holds that its children may have inherited
/// ([`observer_common::HolderRecord::inheritable`]).
#[derive(Clone, Copy, Debug)]
struct InheritableSocket {
    /// Its listener, when shown.
    no: Option<ListenerNo>,
    inode: u64,
    fd: i32,
}

/// The processes that hold their parent's inheritable listeners
/// ([`Inheritor`]), one group per parent and set of fds its children miss
/// (most often none): in the holders of each of those listeners, the group
/// stands for them all.
#[derive(Debug, Default)]
struct InheritedGroups {
    /// Each group's processes, sorted by pid.
    groups: Vec<Arc<[Process]>>,
    /// The groups holding each listener, by [`ListenerNo`].
    by_listener: Vec<Vec<usize>>,
    /// (inode, group) of every inherited listening socket, sorted.
    sockets: Vec<(u64, usize)>,
}

/// The holder sets made so far in one collection, each shared by every
/// listener with the same holders (one process holding 9,000 listeners
/// is one set, not 9,000).
#[derive(Default)]
struct HolderSets {
    /// Those holding by a record of their own only, sorted by pid.
    own: HashMap<Vec<Process>, HolderSet>,
    /// Those with inherited groups too.
    with_groups: HashMap<(Vec<Process>, Vec<usize>), HolderSet>,
}

impl InheritedGroups {
    /// Groups `inheritors` by parent and missed fds; each child's listening
    /// fds are its parent's inheritable ones but those it misses, and its
    /// own (`listen_fds`, updated).
    fn of(
        inheritors: &[Inheritor],
        inheritable: &HashMap<u32, Vec<InheritableSocket>>,
        listeners: usize,
        listen_fds: &mut HashMap<u32, Arc<[i32]>>,
        comms: &mut HashMap<u32, Comm>,
    ) -> InheritedGroups {
        let mut children: BTreeMap<(u32, Arc<[u32]>), Vec<Process>> = BTreeMap::new();
        for child in inheritors {
            // A parent none of whose listeners is shown: nothing to hold.
            if inheritable.contains_key(&child.ppid) {
                comms
                    .entry(child.pid)
                    .or_insert_with(|| comm_string(&child.comm));
                let group = (child.ppid, child.missing.clone());
                children.entry(group).or_default().push(Process {
                    pid: child.pid,
                    ppid: child.ppid,
                });
            }
        }
        let mut inherited = InheritedGroups {
            by_listener: vec![Vec::new(); listeners],
            ..InheritedGroups::default()
        };
        for ((parent, missing), mut kids) in children {
            let group = inherited.groups.len();
            let held: Vec<InheritableSocket> = inheritable
                .get(&parent)
                .into_iter()
                .flatten()
                .filter(|s| missing.binary_search(&(s.fd as u32)).is_err())
                .copied()
                .collect();
            for socket in &held {
                if let Some(no) = socket.no {
                    inherited.by_listener[no].push(group);
                }
                inherited.sockets.push((socket.inode, group));
            }
            let fds: Arc<[i32]> = sorted_fds(held.iter().map(|s| s.fd));
            for kid in &kids {
                let fds = match listen_fds.get(&kid.pid) {
                    Some(own) => sorted_fds(own.iter().chain(fds.iter()).copied()),
                    None => fds.clone(),
                };
                listen_fds.insert(kid.pid, fds);
            }
            kids.sort_unstable();
            kids.dedup_by_key(|p| p.pid);
            inherited.groups.push(Arc::from(kids));
        }
        for groups in &mut inherited.by_listener {
            groups.sort_unstable();
            groups.dedup();
        }
        inherited.sockets.sort_unstable();
        inherited.sockets.dedup();
        inherited
    }

    /// Listener `no`'s holders: those holding it by a record of their own
    /// (`own`, sorted by pid) and its groups, as one set; listeners with
    /// the same holders get the same set (`sets` keeps them).
    fn holders(&self, no: ListenerNo, own: &[Process], sets: &mut HolderSets) -> HolderSet {
        let groups = &self.by_listener[no];
        if groups.is_empty() {
            if let Some(set) = sets.own.get(own) {
                return set.clone();
            }
            let set = HolderSet(Arc::from(own));
            sets.own.insert(own.to_vec(), set.clone());
            return set;
        }
        let key = (own.to_vec(), groups.clone());
        sets.with_groups
            .entry(key)
            .or_insert_with_key(|(own, groups)| {
                let mut all = own.clone();
                for group in groups {
                    all.extend(self.groups[*group].iter().copied());
                }
                all.sort_unstable();
                all.dedup_by_key(|p| p.pid);
                HolderSet(Arc::from(all))
            })
            .clone()
    }

    /// The processes of the groups holding the socket with this inode
    /// (with those holding it by a record of their own: `Membership`'s
    /// `socket_holders` takes each once).
    fn socket_holders(&self, inode: u64) -> impl Iterator<Item = u32> + '_ {
        let first = self.sockets.partition_point(|(i, _)| *i < inode);
        self.sockets[first..]
            .iter()
            .take_while(move |(i, _)| *i == inode)
            .flat_map(|(_, group)| self.groups[*group].iter().map(|p| p.pid))
    }
}

/// `fds`, sorted, once each.
fn sorted_fds(fds: impl Iterator<Item = i32>) -> Arc<[i32]> {
    let mut fds: Vec<i32> = fds.collect();
    fds.sort_unstable();
    fds.dedup();
    Arc::from(fds)
}

impl Membership {
    /// Works out each listener's workers from what processes hold, and who
    /// was seen handing connections to whom before (updated with this
    /// collection's).
    pub fn from_holders(
        listeners: &Collection,
        walk: &HolderWalk,
        handoffs: &mut Handoffs,
    ) -> Membership {
        let views = &listeners.listeners;
        let index = &listeners.index;
        // Each listening socket's listener, by inode: a holder record's
        // listener in one lookup of a number.
        let mut numbers: HashMap<u64, ListenerNo> = HashMap::with_capacity(views.len());
        numbers.extend(
            views
                .iter()
                .enumerate()
                .flat_map(|(no, v)| v.sockets.iter().map(move |s| (s.inode, no)))
                .filter(|(inode, _)| *inode != 0), // iter/tcp's socket without a file
        );
        // (listener, holder) for every record of a holder's own: one vector
        // for all, sorted below, not one per listener.
        let mut own: Vec<(ListenerNo, Process)> = Vec::with_capacity(walk.holdings.len());
        // Accepted connections held: (listener, pid, parent, inode).
        let mut connections: Vec<(ListenerNo, u32, u32, u64)> = Vec::new();
        let mut connection_fds: HashMap<u32, BTreeSet<i32>> = HashMap::new();
        let mut comms = HashMap::new();
        let mut active: HashMap<(ListenerNo, u32), u64> = HashMap::new();
        let mut unread_held: HashMap<(ListenerNo, u32), u64> = HashMap::new();
        let mut in_service_held: HashMap<(ListenerNo, u32), u64> = HashMap::new();
        let mut unread: HashMap<ListenerNo, Unread> = HashMap::new();
        let mut seen_sockets = HashSet::new();
        let mut seen_unread = HashSet::new();
        // (pid, fd) of every listener held: grouped by pid below.
        let mut listen_fds: Vec<(u32, i32)> = Vec::new();
        let mut inheritable: HashMap<u32, Vec<InheritableSocket>> = HashMap::new();
        // One per listener record at most: sized once.
        let mut socket_holders: Vec<(u64, u32)> = Vec::with_capacity(walk.holdings.len());
        let mut named = None;
        for holding in &walk.holdings {
            let h = &holding.record;
            // A process's records come together: its name once.
            if named != Some(h.tgid) {
                comms.entry(h.tgid).or_insert_with(|| comm_string(&h.comm));
                named = Some(h.tgid);
            }
            if h.state == TCP_LISTEN {
                let no = numbers.get(&h.inode).copied();
                // A listener left out by the cap is not a pool (its holders
                // are not sampled), but a worker of a shown one waiting on
                // it waits for work: its fd counts.
                let indexed =
                    || ListenSocket::from_holding(holding).is_some_and(|s| index.contains(&s.id));
                if no.is_none() && !indexed() {
                    continue;
                }
                listen_fds.push((h.tgid, h.fd as i32));
                socket_holders.push((h.inode, h.tgid));
                if h.inheritable != 0 {
                    inheritable
                        .entry(h.tgid)
                        .or_default()
                        .push(InheritableSocket {
                            no,
                            inode: h.inode,
                            fd: h.fd as i32,
                        });
                }
                if let Some(no) = no {
                    let holder = Process {
                        pid: h.tgid,
                        ppid: h.ppid,
                    };
                    own.push((no, holder));
                }
            } else if let Some(no) = index
                .listener_of_held(h)
                .and_then(|id| listeners.position(&id))
            {
                connections.push((no, h.tgid, h.ppid, h.inode));
                let fds = connection_fds.entry(h.tgid).or_default();
                if fds.len() < CONNECTION_FDS_KEPT {
                    fds.insert(h.fd as i32);
                }
                // Count each open connection once per process (threads share fds).
                if seen_sockets.insert((h.tgid, h.inode)) {
                    *active.entry((no, h.tgid)).or_default() += 1;
                    if h.unread_us > 0 {
                        *unread_held.entry((no, h.tgid)).or_default() += 1;
                    }
                    if h.in_service != 0 {
                        *in_service_held.entry((no, h.tgid)).or_default() += 1;
                    }
                }
                // And once per listener (a passed fd can sit in two processes).
                if h.unread_us > 0 && seen_unread.insert(h.inode) {
                    let u = unread.entry(no).or_default();
                    u.connections += 1;
                    u.oldest = u.oldest.max(Duration::from_micros(h.unread_us));
                }
            }
        }
        // Who serves each listener's connections. A process whose parent
        // holds the very same connection was not handed it: it inherited
        // it in a fork, as a CGI script forked by an Apache worker does
        // until its exec closes it, and neither it nor its parent serve
        // otherwise than before.
        let mut servers: BTreeMap<ListenerNo, BTreeMap<u32, u32>> = BTreeMap::new();
        for (no, tgid, ppid, inode) in connections {
            if !seen_sockets.contains(&(ppid, inode)) {
                servers.entry(no).or_default().insert(tgid, ppid);
            }
        }
        // Sorted, once each (the walk gives a process's fds in order, and
        // a listener's holders in pid order: these sorts find them sorted).
        listen_fds.sort_unstable();
        let mut listen_fds: HashMap<u32, Arc<[i32]>> = listen_fds
            .chunk_by(|a, b| a.0 == b.0)
            .map(|fds| (fds[0].0, sorted_fds(fds.iter().map(|(_, fd)| *fd))))
            .collect();
        let inherited = InheritedGroups::of(
            &walk.inheritors,
            &inheritable,
            views.len(),
            &mut listen_fds,
            &mut comms,
        );
        own.sort_unstable();
        own.dedup_by_key(|(no, p)| (*no, p.pid));
        let (own_numbers, own): (Vec<ListenerNo>, Vec<Process>) = own.into_iter().unzip();
        let mut sets = HolderSets::default();
        let mut first = 0;
        let holders: Vec<HolderSet> = (0..views.len())
            .map(|no| {
                let end = first + own_numbers[first..].partition_point(|n| *n == no);
                let set = inherited.holders(no, &own[first..end], &mut sets);
                first = end;
                set
            })
            .collect();
        // Only the listeners' references are left: a set counts as shared
        // (`HolderSet::is_shared`) where two listeners have it.
        drop(sets);
        let roles = handoffs.learn(views, &holders, &servers);
        handoffs.remember_comms(&mut comms);
        socket_holders.sort_unstable();
        socket_holders.dedup();
        Membership {
            pool_tags: pool_tags(views, &roles, |r| &r.workers),
            master_tags: pool_tags(views, &roles, |r| &r.masters),
            roles,
            holders,
            comms,
            active,
            unread_held,
            in_service_held,
            unread,
            listen_fds,
            connection_fds,
            socket_holders,
            inherited,
        }
    }

    /// The processes holding the listening socket with this inode.
    pub fn socket_holders(&self, inode: u64) -> impl Iterator<Item = (u32, &str)> {
        let first = self.socket_holders.partition_point(|(i, _)| *i < inode);
        let own = self.socket_holders[first..]
            .iter()
            .take_while(move |(i, _)| *i == inode)
            .map(|(_, pid)| *pid);
        let mut pids: Vec<u32> = own.chain(self.inherited.socket_holders(inode)).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.into_iter().map(|pid| (pid, self.comm(pid)))
    }

    /// A process's name, as the kernel holds it (`comm`).
    pub fn comm(&self, pid: u32) -> &str {
        self.comms.get(&pid).map_or("", |c| c)
    }

    /// A process's name, shared (a pool of 1,000 workers names them without
    /// 1,000 copies).
    fn shared_comm(&self, pid: u32) -> Comm {
        self.comms
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| Comm::from(""))
    }

    /// A process that holds listener `no` (a worker if any), to learn its
    /// container.
    pub fn a_holder(&self, no: ListenerNo) -> Option<u32> {
        let worker = self.roles.get(no).and_then(|r| r.workers.first());
        let holder = || self.holders.get(no).and_then(|h| h.first()).map(|p| &p.pid);
        worker.or_else(holder).copied()
    }

    /// Each listener's roles once (listeners sharing theirs are skipped).
    fn distinct_roles(&self) -> impl Iterator<Item = &Roles> {
        let mut seen = HashSet::new();
        self.roles
            .iter()
            .filter(move |r| seen.insert(Arc::as_ptr(r)))
            .map(|r| &**r)
    }

    /// Every worker process with its listening-socket fds.
    pub fn worker_listen_fds(&self) -> BTreeMap<u32, Arc<[i32]>> {
        let workers: BTreeSet<u32> = self
            .distinct_roles()
            .flat_map(|r| r.workers.iter().copied())
            .collect();
        let none: Arc<[i32]> = Arc::from([]);
        workers
            .into_iter()
            .map(|pid| (pid, self.listen_fds.get(&pid).unwrap_or(&none).clone()))
            .collect()
    }

    /// The fds by which each worker's event loop is found (an epoll
    /// instance watching one of them): its listeners, or, for a fed worker,
    /// the connections it was handed.
    pub fn event_loop_fds(&self) -> BTreeMap<u32, Arc<[i32]>> {
        let mut fds = self.worker_listen_fds();
        for (pid, fds) in fds.iter_mut().filter(|(_, fds)| fds.is_empty()) {
            *fds = self
                .connection_fds
                .get(pid)
                .into_iter()
                .flatten()
                .copied()
                .collect();
        }
        fds
    }
}

/// Each worker's (or master's: `pids`) pool: the first listener, in id
/// order (which is [`ListenerNo`] order), it is one of. Listeners sharing
/// their roles are looked at once: the first of them tagged every pid.
fn pool_tags(
    listeners: &[ListenerView],
    roles: &[Arc<Roles>],
    pids: impl Fn(&Roles) -> &Vec<u32>,
) -> HashMap<u32, PoolTag> {
    let mut tags = HashMap::new();
    let mut seen = HashSet::new();
    for (view, r) in listeners.iter().zip(roles) {
        if !seen.insert(Arc::as_ptr(r)) {
            continue;
        }
        for pid in pids(r) {
            tags.entry(*pid).or_insert_with(|| pool_tag(&view.id));
        }
    }
    tags
}

fn pool_tag(id: &ListenerId) -> PoolTag {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Each worker's event loop: the epoll fds that watch its listeners (or, for
/// a fed worker, its connections), looked up in /proc. A found set is kept
/// while the worker lives: an event loop keeps its epoll. A worker where
/// none was found (one blocking in accept, or not yet in its loop) is looked
/// at again with back-off, 1 s doubling to 64 s, or at once when the fds it
/// serves change: a host of blocking workers, or one process holding
/// thousands of fds, costs a few /proc reads per scrape, not all of them.
/// Those second looks are also capped per scrape
/// ([`RELOOKS_PER_REFRESH`], the longest due first): a thousand workers
/// started together come due together, and one scrape would pay for all
/// (~120 µs each).
#[derive(Debug, Default)]
pub struct EventLoops {
    found: HashMap<u32, Vec<i32>>,
    /// Workers with none found: the fds looked for, when to look again,
    /// and the back-off after that.
    missing: HashMap<u32, (Arc<[i32]>, Duration, Duration)>,
}

const LOOK_AGAIN_FIRST: Duration = Duration::from_secs(1);
const LOOK_AGAIN_MAX: Duration = Duration::from_secs(64);
/// Second looks at most per refresh (first looks, and looks after a
/// worker's fds changed, are deferred only past [`FDS_LOOKED_PER_REFRESH`]).
pub const RELOOKS_PER_REFRESH: usize = 64;
/// Listening fds of the workers looked at per refresh, at most (beyond the
/// first look): a look lists the worker's fds in /proc, about 2 µs each,
/// and 1,000 workers that inherited 10,000 listeners would cost 20 s in
/// one scrape. The rest are looked at in the next refreshes.
pub const FDS_LOOKED_PER_REFRESH: usize = 20_000;

impl EventLoops {
    /// Updates the sets for the workers' fds (`loop_fds`, per pid) at `now`
    /// (any monotonic clock), with `lookup(pid, fds)` reading /proc. Workers
    /// `in_accept` (blocked in accept() on a listener at the sampler's last
    /// pass) wait for work without an event loop: they are not looked at
    /// now, and keep their place in the back-off for when they are not.
    pub fn refresh(
        &mut self,
        loop_fds: &BTreeMap<u32, Arc<[i32]>>,
        in_accept: &HashSet<u32>,
        now: Duration,
        lookup: impl Fn(u32, &[i32]) -> Vec<i32>,
    ) {
        self.found.retain(|pid, _| loop_fds.contains_key(pid));
        self.missing.retain(|pid, _| loop_fds.contains_key(pid));
        // Second looks that are due: (due since, pid, fds, next back-off).
        let mut due = Vec::new();
        let mut fds_looked = 0;
        for (pid, fds) in loop_fds {
            if self.found.contains_key(pid) || in_accept.contains(pid) {
                continue;
            }
            match self.missing.get(pid) {
                Some((looked_for, next, step)) if looked_for == fds => {
                    if now >= *next {
                        due.push((*next, *pid, fds, (*step * 2).min(LOOK_AGAIN_MAX)));
                    }
                }
                _ if fds_looked < FDS_LOOKED_PER_REFRESH => {
                    fds_looked += fds.len();
                    self.look(*pid, fds, now, LOOK_AGAIN_FIRST, &lookup);
                }
                // Due at once, in the next refresh.
                _ => {
                    self.missing
                        .insert(*pid, (fds.clone(), now, LOOK_AGAIN_FIRST));
                }
            }
        }
        due.sort_unstable_by_key(|(since, pid, _, _)| (*since, *pid));
        for (_, pid, fds, step) in due.into_iter().take(RELOOKS_PER_REFRESH) {
            if fds_looked >= FDS_LOOKED_PER_REFRESH {
                break;
            }
            fds_looked += fds.len();
            self.look(pid, fds, now, step, &lookup);
        }
    }

    /// Looks for `pid`'s event loop now; if none, again `step` from `now`.
    fn look(
        &mut self,
        pid: u32,
        fds: &Arc<[i32]>,
        now: Duration,
        step: Duration,
        lookup: impl Fn(u32, &[i32]) -> Vec<i32>,
    ) {
        let epolls = lookup(pid, fds);
        if epolls.is_empty() {
            self.missing.insert(pid, (fds.clone(), now + step, step));
        } else {
            self.missing.remove(&pid);
            self.found.insert(pid, epolls);
        }
    }

    /// The epoll fds found, per worker.
    pub fn epolls(&self) -> &HashMap<u32, Vec<i32>> {
        &self.found
    }
}

/// Builds the pools from the membership and each worker's activity.
/// `listeners` are those the membership was made from.
pub fn pools(
    listeners: &[ListenerView],
    membership: &Membership,
    activity: &HashMap<u32, WorkerActivity>,
    max_workers: usize,
) -> Pools {
    debug_assert_eq!(listeners.len(), membership.roles.len(), "not its listeners");
    let mut budget = max_workers;
    let mut over = 0u64;
    let mut pools = Vec::new();
    for (no, view) in listeners.iter().enumerate() {
        let Some(roles) = membership.roles.get(no) else {
            continue;
        };
        let (pids, dispatcher_pids) = (&roles.workers, &roles.dispatchers);
        // A pool whose master holds the listener alone (between a worker's
        // exit and its replacement's fork) is still a pool, of no workers.
        let has_master = !roles.masters.is_empty();
        if pids.is_empty() && dispatcher_pids.is_empty() && !has_master {
            continue;
        }
        let accepts = |pid: u32| view.by_process.get(&pid).map_or(0, |a| a.accepted);
        let dispatchers = dispatcher_pids
            .iter()
            .map(|pid| DispatcherView {
                pid: *pid,
                comm: membership.shared_comm(*pid),
                accepts: accepts(*pid),
            })
            .collect();
        let mut workers = Vec::with_capacity(pids.len().min(budget));
        for pid in pids {
            if budget == 0 {
                // The rest of the pool, counted at once (a pool of 1,000
                // workers on each of 10,000 listeners leaves millions).
                over += (pids.len() - workers.len()) as u64;
                break;
            }
            budget -= 1;
            let seen = activity.get(pid);
            let held = |counts: &HashMap<(ListenerNo, u32), u64>| {
                counts.get(&(no, *pid)).copied().unwrap_or(0)
            };
            workers.push(WorkerView {
                pid: *pid,
                comm: membership.shared_comm(*pid),
                accepts: accepts(*pid),
                active_connections: held(&membership.active),
                unread_connections: held(&membership.unread_held),
                requests_in_service: (!view.id.is_unix())
                    .then(|| held(&membership.in_service_held)),
                busy: seen.map(|a| a.busy),
                idle_threads: seen.map(|a| a.idle_threads),
                busy_seconds: seen.map_or(0.0, |a| a.busy_seconds),
                slot: SlotCounts::default(),
            });
        }
        pools.push(PoolView {
            listener: view.id,
            workers,
            dispatchers,
            unread: membership.unread.get(&no).copied().unwrap_or_default(),
            vacant_slots: vec![],
            busiest_accept_share: None,
        });
    }
    Pools {
        pools,
        workers_over_cap: over,
    }
}

/// The worker processes the thread sampler watches: each with the fds it
/// waits on for new work (its listeners, and `epolls`: epoll fds watching a
/// listener, by process) and its pool; and the masters of their pools, with
/// the listener fds their new children inherit.
pub fn watched(membership: &Membership, epolls: &HashMap<u32, Vec<i32>>) -> WatchedSet {
    let tags = &membership.pool_tags;
    let epoll_pools: HashSet<PoolTag> = epolls
        .iter()
        .filter(|(_, fds)| !fds.is_empty())
        .filter_map(|(pid, _)| tags.get(pid).copied())
        .collect();
    let masters = membership
        .master_tags
        .iter()
        .map(|(pid, pool)| {
            let mut fds = WorkerFds::EMPTY;
            let listen = membership
                .listen_fds
                .get(pid)
                .into_iter()
                .flat_map(|f| f.iter());
            for (slot, fd) in fds.listen.iter_mut().zip(listen) {
                *slot = *fd;
            }
            let watched = Watched {
                fds,
                pool: *pool,
                epoll_pool: epoll_pools.contains(pool),
                holds_connections: false,
            };
            (*pid, watched)
        })
        .collect();
    let holding_connections: HashSet<u32> = membership
        .active
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|((_, pid), _)| *pid)
        .collect();
    let workers = membership
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
            let pool = tags.get(&pid).copied().unwrap_or_default();
            let epoll_pool = epoll_pools.contains(&pool);
            (
                pid,
                Watched {
                    fds,
                    pool,
                    epoll_pool,
                    holds_connections: holding_connections.contains(&pid),
                },
            )
        })
        .collect();
    WatchedSet { workers, masters }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Accepts, SocketView};
    use crate::kernel::holders::Holding;
    use crate::sockets::{ListenerIndex, QueueHead};
    use observer_common::{AF_INET, HolderRecord, TCP_ESTABLISHED};

    fn fd_set(fds: &[i32]) -> Arc<[i32]> {
        Arc::from(fds)
    }

    fn id(port: u16) -> ListenerId {
        ListenerId::tcp(1, AF_INET, [0; 16], port)
    }

    #[test]
    fn workers_without_an_event_loop_are_looked_at_again_with_back_off() {
        use std::cell::RefCell;
        let looked = RefCell::new(Vec::new());
        let has_epoll = RefCell::new(false);
        let lookup = |pid: u32, _: &[i32]| {
            looked.borrow_mut().push(pid);
            if *has_epoll.borrow() { vec![9] } else { vec![] }
        };
        let mut loops = EventLoops::default();
        let fds = BTreeMap::from([(7, fd_set(&[3]))]);
        let secs = Duration::from_secs;
        // Looked at 0 s, then 1 s later, then 2 s after that, then 4 s.
        for t in 0..8 {
            loops.refresh(&fds, &HashSet::default(), secs(t), lookup);
        }
        assert_eq!(looked.borrow().len(), 4, "at 0, 1, 3, 7 s");
        // Its fds change: looked at once, whatever the back-off.
        let moved = BTreeMap::from([(7, fd_set(&[4]))]);
        loops.refresh(&moved, &HashSet::default(), secs(8), lookup);
        assert_eq!(looked.borrow().len(), 5);
        // Found: kept, never looked up again.
        *has_epoll.borrow_mut() = true;
        loops.refresh(&moved, &HashSet::default(), secs(9), lookup);
        loops.refresh(&moved, &HashSet::default(), secs(100), lookup);
        assert_eq!(looked.borrow().len(), 6);
        assert_eq!(loops.epolls()[&7], vec![9]);
        // Gone: forgotten.
        loops.refresh(&BTreeMap::new(), &HashSet::default(), secs(101), lookup);
        assert!(loops.epolls().is_empty());
    }

    #[test]
    fn looks_at_workers_holding_many_fds_are_spread_over_refreshes() {
        use std::cell::RefCell;
        let looked = RefCell::new(Vec::new());
        let lookup = |pid: u32, _: &[i32]| {
            looked.borrow_mut().push(pid);
            vec![]
        };
        let mut loops = EventLoops::default();
        // Ten workers that inherited 5,000 listeners each.
        let many: Arc<[i32]> = (3..5003).collect();
        let fds: BTreeMap<u32, Arc<[i32]>> = (0..10).map(|pid| (pid, many.clone())).collect();
        let per_refresh = FDS_LOOKED_PER_REFRESH.div_ceil(5000);
        let mut seen = Vec::new();
        for t in 0..3 {
            loops.refresh(&fds, &HashSet::default(), Duration::from_millis(t), lookup);
            seen.push(looked.borrow().len());
        }
        assert_eq!(seen, [per_refresh, 2 * per_refresh, 10], "then the rest");
        let mut pids = looked.borrow().clone();
        pids.sort_unstable();
        assert_eq!(pids, (0..10).collect::<Vec<_>>(), "each once");
    }

    #[test]
    fn workers_blocked_in_accept_are_not_looked_at_until_they_leave_it() {
        use std::cell::RefCell;
        let looked = RefCell::new(Vec::new());
        let lookup = |pid: u32, _: &[i32]| {
            looked.borrow_mut().push(pid);
            vec![]
        };
        let mut loops = EventLoops::default();
        let fds = BTreeMap::from([(7, fd_set(&[3])), (8, fd_set(&[3]))]);
        let in_accept = HashSet::from_iter([8]);
        let secs = Duration::from_secs;
        loops.refresh(&fds, &in_accept, secs(0), lookup);
        assert_eq!(
            *looked.borrow(),
            vec![7],
            "8 waits in accept(): no event loop to find"
        );
        for t in 1..10 {
            loops.refresh(&fds, &in_accept, secs(t), lookup);
        }
        assert!(!looked.borrow().contains(&8));
        // Out of accept(): looked at.
        loops.refresh(&fds, &HashSet::default(), secs(10), lookup);
        assert_eq!(looked.borrow().last(), Some(&8));
    }

    #[test]
    fn second_looks_are_capped_per_refresh_longest_due_first() {
        use std::cell::RefCell;
        let looked = RefCell::new(Vec::new());
        let lookup = |pid: u32, _: &[i32]| {
            looked.borrow_mut().push(pid);
            vec![]
        };
        let mut loops = EventLoops::default();
        let n = RELOOKS_PER_REFRESH as u32 * 3;
        let fds: BTreeMap<u32, Arc<[i32]>> = (0..n).map(|pid| (pid, fd_set(&[3]))).collect();
        loops.refresh(&fds, &HashSet::default(), Duration::ZERO, lookup);
        assert_eq!(looked.borrow().len(), n as usize, "first looks: all");
        // All come due at 1 s: a third per refresh, the rest later.
        looked.borrow_mut().clear();
        let mut per_refresh = Vec::new();
        for t in [1000, 1001, 1002] {
            let before = looked.borrow().len();
            loops.refresh(&fds, &HashSet::default(), Duration::from_millis(t), lookup);
            per_refresh.push(looked.borrow().len() - before);
        }
        assert_eq!(per_refresh, vec![RELOOKS_PER_REFRESH; 3]);
        let mut pids = looked.borrow().clone();
        pids.sort_unstable();
        assert_eq!(pids, (0..n).collect::<Vec<_>>(), "each once");
        // A new worker is looked at at once, cap or not.
        looked.borrow_mut().clear();
        let mut more = fds.clone();
        more.insert(n, fd_set(&[3]));
        loops.refresh(
            &more,
            &HashSet::default(),
            Duration::from_millis(1003),
            lookup,
        );
        assert_eq!(*looked.borrow(), vec![n]);
    }

    /// The membership of the listener on `port`, from these holder records.
    fn membership(port: u16, holders: &[HolderRecord]) -> Membership {
        membership_after(port, holders, &mut Handoffs::default())
    }

    /// [`membership`], with the hand-offs seen before (updated).
    fn membership_after(
        port: u16,
        holders: &[HolderRecord],
        handoffs: &mut Handoffs,
    ) -> Membership {
        let listeners = Collection {
            listeners: vec![view(port)],
            index: ListenerIndex::new(&[socket(port, 5)]),
            ..Default::default()
        };
        Membership::from_holders(&listeners, &walk(holders), handoffs)
    }

    /// A TCP listening socket on `port`.
    fn socket(port: u16, inode: u64) -> ListenSocket {
        ListenSocket {
            id: id(port),
            inode,
            queue_len: 0,
            queue_max: 128,
            syn_queue_len: 0,
            drops: 0,
            defer_accept: false,
            head: QueueHead::Waited { us: 0 },
            unix_key: None,
        }
    }

    /// Holder records as the holder walk gives them (TCP: no names), each
    /// a record of its holder's own.
    fn walk(records: &[HolderRecord]) -> HolderWalk {
        let holdings = records
            .iter()
            .map(|record| Holding {
                record: *record,
                unix_name: None,
            })
            .collect();
        HolderWalk {
            holdings,
            inheritors: vec![],
        }
    }

    /// A listener with one socket, inode 5 (as in [`membership_after`]).
    fn view(port: u16) -> ListenerView {
        ListenerView {
            id: id(port),
            sockets: vec![SocketView {
                inode: 5,
                queue_len: 0,
                queue_max: 128,
                drops: 0,
                oldest_wait: std::time::Duration::ZERO,
            }],
            oldest_wait: std::time::Duration::ZERO,
            queue_len: 0,
            queue_max: 128,
            syn_queue_len: 0,
            queued: 0,
            drops: 0,
            drops_raw: 0,
            accepts: Accepts::default(),
            by_process: BTreeMap::new(),
            waits_known: true,
            drops_known: true,
            had_traffic: true,
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
            defer_accept: 0,
            in_service: 0,
            inheritable: 0,
            addr,
            inode,
            comm,
            ..Default::default()
        }
    }

    fn gunicorn_pool() -> Membership {
        // Arbiter 10 (parent 1) forks workers 11 and 12.
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(12, 10, 80, TCP_LISTEN, 5),
        ];
        membership(80, &holders)
    }

    #[test]
    fn the_master_holding_the_listener_is_not_a_worker() {
        let p = pools(&[view(80)], &gunicorn_pool(), &HashMap::new(), 100);
        let pids: Vec<u32> = p.pools[0].workers.iter().map(|w| w.pid).collect();
        assert_eq!(pids, vec![11, 12]);
        assert_eq!(&*p.pools[0].workers[0].comm, "gunz");
    }

    #[test]
    fn a_single_process_server_is_its_own_worker() {
        let m = membership(80, &[holder(20, 1, 80, TCP_LISTEN, 5)]);
        assert_eq!(
            m.worker_listen_fds().keys().copied().collect::<Vec<_>>(),
            vec![20]
        );
    }

    #[test]
    fn busy_and_idle_come_from_the_sampler() {
        let activity = HashMap::from_iter([
            (
                11,
                WorkerActivity {
                    busy: true,
                    idle_threads: 0,
                    busy_seconds: 2.5,
                },
            ),
            (
                12,
                WorkerActivity {
                    busy: false,
                    idle_threads: 1,
                    busy_seconds: 0.7,
                },
            ),
        ]);
        let p = pools(&[view(80)], &gunicorn_pool(), &activity, 100);
        assert_eq!((p.pools[0].busy(), p.pools[0].idle()), (1, 1));
        assert_eq!(p.pools[0].workers[0].busy_seconds, 2.5);
        assert_eq!(p.pools[0].workers[1].busy_seconds, 0.7);
    }

    #[test]
    fn a_worker_the_sampler_has_not_seen_is_neither_busy_nor_idle() {
        let p = pools(&[view(80)], &gunicorn_pool(), &HashMap::new(), 100);
        assert_eq!((p.pools[0].busy(), p.pools[0].idle()), (0, 0));
        assert_eq!(p.pools[0].workers[0].busy, None);
    }

    #[test]
    fn open_accepted_connections_count_per_worker_once() {
        let holders = [
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_ESTABLISHED, 77),
            holder(11, 10, 80, TCP_ESTABLISHED, 77), // same socket through a dup'd fd
            holder(11, 10, 80, TCP_ESTABLISHED, 78),
        ];
        let m = membership(80, &holders);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(p.pools[0].workers[0].active_connections, 2);
    }

    #[test]
    fn an_unread_connection_counts_once_for_its_listener_with_the_longest_wait() {
        let unread = |tgid, inode, unread_us| HolderRecord {
            unread_us,
            ..holder(tgid, 10, 80, TCP_ESTABLISHED, inode)
        };
        let holders = [
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(12, 10, 80, TCP_LISTEN, 5),
            unread(11, 77, 300_000),
            unread(12, 77, 300_000), // passed to a second process, still unread
            unread(12, 78, 900_000),
            unread(12, 79, 0), // read already
        ];
        let p = pools(&[view(80)], &membership(80, &holders), &HashMap::new(), 100);
        let pool = &p.pools[0];
        assert_eq!(pool.unread.connections, 2);
        assert_eq!(pool.unread.oldest, Duration::from_millis(900));
        let unread_held: Vec<u64> = pool.workers.iter().map(|w| w.unread_connections).collect();
        assert_eq!(unread_held, vec![1, 2]);
    }

    #[test]
    fn watched_workers_carry_listeners_epolls_and_one_pool() {
        let set = watched(&gunicorn_pool(), &HashMap::from_iter([(11, vec![7])]));
        let w = &set.workers;
        assert_eq!(w.len(), 2, "the workers, not the master");
        // The arbiter, whose new children are sampled before a scrape
        // finds them: the listener fd they inherit, the workers' pool.
        let master = set.masters[&10];
        assert_eq!(set.masters.len(), 1);
        assert_eq!(master.fds.listen, [3, -1, -1, -1]);
        assert_eq!(master.pool, w[&11].pool);
        assert_eq!(w[&11].fds.listen, [3, -1, -1, -1]);
        assert_eq!(w[&11].fds.epoll, [7, -1, -1, -1]);
        assert_eq!(w[&12].fds.epoll, [-1; 4]);
        assert_eq!(w[&11].pool, w[&12].pool);
        assert!(
            w[&12].epoll_pool,
            "12's pool has an epoll event loop (11's)"
        );
        let other = membership(81, &[holder(30, 1, 81, TCP_LISTEN, 5)]);
        assert_ne!(
            watched(&other, &HashMap::new()).workers[&30].pool,
            w[&11].pool
        );
    }

    /// Node's cluster primary (10) accepts every connection and passes it to
    /// worker 11 or 12, which never hold the listener.
    fn round_robin(fed: &mut Handoffs, held_by: &[(u32, u64)]) -> Membership {
        let mut holders = vec![holder(10, 1, 80, TCP_LISTEN, 5)];
        for (pid, inode) in held_by {
            holders.push(HolderRecord {
                fd: 20 + *inode as u32,
                ..holder(*pid, 10, 80, TCP_ESTABLISHED, *inode)
            });
        }
        membership_after(80, &holders, fed)
    }

    fn pids(pool: &PoolView) -> (Vec<u32>, Vec<u32>) {
        (
            pool.workers.iter().map(|w| w.pid).collect(),
            pool.dispatchers.iter().map(|d| d.pid).collect(),
        )
    }

    #[test]
    fn processes_handed_connections_are_the_workers_and_the_primary_a_dispatcher() {
        let mut fed = Handoffs::default();
        // Connection 40 is still the primary's (not yet handed on).
        let m = round_robin(&mut fed, &[(11, 41), (12, 42), (10, 40)]);
        let mut v = view(80);
        v.by_process.insert(
            10,
            Accepts {
                accepted: 7,
                ..Default::default()
            },
        );
        let p = pools(&[v], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11, 12], vec![10]));
        assert_eq!(p.pools[0].dispatchers[0].accepts, 7);
        assert_eq!(p.pools[0].workers[0].active_connections, 1);
        let w = watched(&m, &HashMap::new()).workers;
        assert_eq!(
            w.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([11, 12]),
            "the dispatcher is not sampled"
        );
        assert_eq!(w[&11].fds.listen, [-1; 4], "fed workers hold no listener");
        assert_eq!(m.event_loop_fds()[&11][..], [61], "found by its connection");
    }

    #[test]
    fn a_child_that_inherited_its_parent_s_connection_makes_no_dispatcher() {
        // Apache worker 11 serves connection 41 and forks a CGI (40): until
        // its exec, the CGI holds 41 too, and may have closed the listener.
        let mut fed = Handoffs::default();
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(12, 10, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_ESTABLISHED, 41),
            holder(40, 11, 80, TCP_ESTABLISHED, 41),
        ];
        let m = membership_after(80, &holders, &mut fed);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11, 12], vec![]));
        // And nothing was learnt: once the CGI is gone, 11 is a worker still.
        let m = membership_after(80, &holders[..3], &mut fed);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11, 12], vec![]));
    }

    #[test]
    fn a_fed_worker_between_connections_stays_a_worker_while_it_lives() {
        let mut fed = Handoffs::default();
        round_robin(&mut fed, &[(11, 41), (12, 42)]);
        let m = round_robin(&mut fed, &[]);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11, 12], vec![10]));
        assert_eq!(&*p.pools[0].workers[0].comm, "gunz", "named as when seen");
        fed.retain_alive(|pid| pid != 12);
        let m = round_robin(&mut fed, &[]);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11], vec![10]));
        fed.retain_alive(|pid| pid != 11);
        let m = round_robin(&mut fed, &[]);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(
            pids(&p.pools[0]),
            (vec![], vec![10]),
            "with its workers gone, the primary is still a dispatcher"
        );
        fed.retain_alive(|_| false);
        let m = round_robin(&mut fed, &[]);
        let p = pools(&[view(80)], &m, &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![10], vec![]), "a new process");
    }

    #[test]
    fn workers_that_hold_the_listener_and_their_connections_are_plain_workers() {
        // Node's cluster with NODE_CLUSTER_SCHED_POLICY=none: the primary
        // shares the listener, each worker accepts for itself.
        let holders = [
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_ESTABLISHED, 41),
            holder(12, 10, 80, TCP_LISTEN, 5),
        ];
        let p = pools(&[view(80)], &membership(80, &holders), &HashMap::new(), 100);
        assert_eq!(pids(&p.pools[0]), (vec![11, 12], vec![]));
    }

    /// The workers of port 80 after one collection of `holders`, where
    /// `accepted` says what each process had accepted from it.
    fn workers_after(
        holders: &[HolderRecord],
        accepted: &[(u32, u64)],
        handoffs: &mut Handoffs,
    ) -> Vec<u32> {
        let mut v = view(80);
        for (pid, n) in accepted {
            v.by_process.entry(*pid).or_default().accepted = *n;
        }
        let listeners = Collection {
            listeners: vec![v],
            index: ListenerIndex::new(&[socket(80, 5)]),
            ..Default::default()
        };
        let m = Membership::from_holders(&listeners, &walk(holders), handoffs);
        m.roles[0].workers.clone()
    }

    #[test]
    fn a_master_holding_its_listener_alone_stays_one_until_it_accepts_or_for_long() {
        let mut handoffs = Handoffs::default();
        let arbiter = holder(10, 1, 80, TCP_LISTEN, 5);
        let worker = holder(11, 10, 80, TCP_LISTEN, 5);
        assert_eq!(
            workers_after(&[arbiter, worker], &[(11, 5)], &mut handoffs),
            [11]
        );
        // 11 exited, its replacement not forked yet: 10 is still the master.
        for _ in 0..MASTER_ALONE {
            assert!(workers_after(&[arbiter], &[], &mut handoffs).is_empty());
        }
        // Alone for longer: it serves the listener itself.
        assert_eq!(workers_after(&[arbiter], &[], &mut handoffs), [10]);

        // A single-process server caught between a fork and its child's
        // exec holding the listener: it has accepted, so it stays the
        // worker, and the child is none of the pool.
        let mut handoffs = Handoffs::default();
        let server = holder(20, 1, 80, TCP_LISTEN, 5);
        let child = holder(21, 20, 80, TCP_LISTEN, 5);
        assert_eq!(workers_after(&[server], &[(20, 7)], &mut handoffs), [20]);
        assert_eq!(
            workers_after(&[server, child], &[(20, 7)], &mut handoffs),
            [20]
        );
        assert_eq!(workers_after(&[server], &[(20, 8)], &mut handoffs), [20]);
    }

    #[test]
    fn roles_of_holders_and_fed_workers() {
        let m = |pairs: &[(u32, u32)]| pairs.iter().copied().collect::<BTreeMap<u32, u32>>();
        let held = |pairs: &[(u32, u32)]| {
            let to_process = |(pid, ppid): &(u32, u32)| Process {
                pid: *pid,
                ppid: *ppid,
            };
            pairs.iter().map(to_process).collect::<Vec<_>>()
        };
        // A fork-per-connection server: 10 accepts, each child serves one.
        let empty = BTreeSet::new();
        let none = Known {
            dispatchers: &empty,
            masters: &empty,
            serving: &empty,
        };
        let r = roles(&held(&[(10, 1)]), &m(&[(21, 10), (22, 10)]), none);
        assert_eq!(r.workers, [21, 22]);
        assert_eq!(r.dispatchers, [10]);
        // A master's child that was handed a connection: still the master.
        let r = roles(&held(&[(10, 1), (11, 10)]), &m(&[(21, 10)]), none);
        assert_eq!(r.workers, [11, 21]);
        assert!(r.dispatchers.is_empty());
        // A fed process that is nobody's child: the holder stays a worker.
        let r = roles(&held(&[(10, 1)]), &m(&[(30, 2)]), none);
        assert_eq!(r.workers, [10, 30]);
        // Between connections, a dispatcher seen before stays one.
        let ten = BTreeSet::from([10]);
        let dispatcher = Known {
            dispatchers: &ten,
            masters: &empty,
            serving: &empty,
        };
        let r = roles(&held(&[(10, 1)]), &m(&[]), dispatcher);
        assert!(r.workers.is_empty());
        assert_eq!(r.dispatchers, [10]);
        // Between a worker's exit and its replacement's fork, a master seen
        // before holds the listener alone: still the master, not a worker.
        let master = Known {
            dispatchers: &empty,
            masters: &ten,
            serving: &empty,
        };
        let r = roles(&held(&[(10, 1)]), &m(&[]), master);
        assert!(r.workers.is_empty());
        assert_eq!(r.masters, [10]);
    }

    #[test]
    fn a_worker_whose_child_inherited_the_listener_stays_the_worker() {
        // Apache prefork: parent 10, children 11 and 12 accept; 12 forks a
        // CGI (20) that holds the listener until its exec.
        let held = [(10, 1), (11, 10), (12, 10), (20, 12)].map(|(pid, ppid)| Process { pid, ppid });
        let (empty, serving) = (BTreeSet::new(), BTreeSet::from([11, 12]));
        let known = Known {
            dispatchers: &empty,
            masters: &empty,
            serving: &serving,
        };
        let r = roles(&held, &BTreeMap::new(), known);
        assert_eq!(r.masters, [10]);
        assert_eq!(
            r.workers,
            [11, 12],
            "12 serves; its child 20 is not a worker"
        );
        // Before it has accepted anything, a holder with a holding child is
        // its master (a pool's master and its workers, which never accept).
        let nobody = Known {
            serving: &empty,
            ..known
        };
        let r = roles(&held, &BTreeMap::new(), nobody);
        assert_eq!(r.masters, [10, 12]);
        assert_eq!(r.workers, [11, 20]);
    }

    /// Each pool's port and worker pids.
    fn workers_by_port(p: &Pools) -> Vec<(u16, Vec<u32>)> {
        p.pools
            .iter()
            .map(|pool| {
                let pids = pool.workers.iter().map(|w| w.pid).collect();
                (pool.listener.port, pids)
            })
            .collect()
    }

    /// Listeners shown (`shown`: port and inode each) among the listening
    /// `sockets` of the host (the rest left out by the cap): their views,
    /// and the collection made of them.
    fn shown_among(
        shown: &[(u16, u64)],
        sockets: &[ListenSocket],
    ) -> (Vec<ListenerView>, Collection) {
        let views: Vec<ListenerView> = shown
            .iter()
            .map(|(port, inode)| {
                let mut v = view(*port);
                v.sockets[0].inode = *inode;
                v
            })
            .collect();
        let listeners = Collection {
            listeners: views.clone(),
            index: ListenerIndex::new(sockets),
            ..Default::default()
        };
        (views, listeners)
    }

    /// Master 10's record of the listener on `port`, the first to hold
    /// its file, at `fd`.
    fn masters(port: u16, inode: u64, fd: u32) -> HolderRecord {
        HolderRecord {
            fd,
            inheritable: 1,
            ..holder(10, 1, port, TCP_LISTEN, inode)
        }
    }

    #[test]
    fn each_listener_gets_its_own_holders_and_one_left_out_by_the_cap_none() {
        // Listeners 80 (inode 5) and 81 (inode 6) are shown; 82 (inode 7)
        // exists but was left out by the cap.
        let sockets = [socket(80, 5), socket(81, 6), socket(82, 7)];
        let (views, listeners) = shown_among(&[(80, 5), (81, 6)], &sockets);
        let with_fd = |mut h: HolderRecord, fd: u32| {
            h.fd = fd;
            h
        };
        let holders = [
            // gunicorn on 80: arbiter 10, workers 11 and 12; 11 also holds 82.
            holder(10, 1, 80, TCP_LISTEN, 5),
            holder(11, 10, 80, TCP_LISTEN, 5),
            with_fd(holder(11, 10, 82, TCP_LISTEN, 7), 4),
            holder(12, 10, 80, TCP_LISTEN, 5),
            // A single process on 81.
            holder(20, 1, 81, TCP_LISTEN, 6),
            // One only on 82.
            holder(30, 1, 82, TCP_LISTEN, 7),
        ];
        let m = Membership::from_holders(&listeners, &walk(&holders), &mut Handoffs::default());
        let p = pools(&views, &m, &HashMap::new(), 100);
        let workers = workers_by_port(&p);
        assert_eq!(workers, [(80, vec![11, 12]), (81, vec![20])]);
        assert_eq!(m.a_holder(1), Some(20));
        let fds = m.worker_listen_fds();
        assert_eq!(
            fds[&11][..],
            [3, 4],
            "82's fd counts as a listener it waits on"
        );
        assert!(
            !fds.contains_key(&30),
            "82 is no pool: its holder is not sampled"
        );
        let tags = watched(&m, &HashMap::new()).workers;
        assert_eq!(tags[&11].pool, tags[&12].pool);
        assert_ne!(tags[&11].pool, tags[&20].pool);
    }

    #[test]
    fn children_that_inherited_every_listener_are_workers_of_each_by_one_shared_set() {
        // A master (10) holding 80, 81 and 82 (82 left out by the cap), at
        // fds 3, 4 and 5; its ten children 11 to 20 inherited all three,
        // and 12 also holds 83, of its own.
        let sockets = [socket(80, 5), socket(81, 6), socket(82, 7), socket(83, 8)];
        let (views, listeners) = shown_among(&[(80, 5), (81, 6), (83, 8)], &sockets);
        let own = HolderRecord {
            fd: 9,
            ..holder(12, 10, 83, TCP_LISTEN, 8)
        };
        let mut walk = walk(&[masters(80, 5, 3), masters(81, 6, 4), masters(82, 7, 5), own]);
        walk.inheritors = (11..=20)
            .map(|pid| Inheritor {
                pid,
                ppid: 10,
                comm: *b"gunz\0\0\0\0\0\0\0\0\0\0\0\0",
                missing: Arc::from([]),
            })
            .collect();
        let m = Membership::from_holders(&listeners, &walk, &mut Handoffs::default());
        let p = pools(&views, &m, &HashMap::new(), 100);
        let workers = workers_by_port(&p);
        let children: Vec<u32> = (11..=20).collect();
        assert_eq!(
            workers,
            [(80, children.clone()), (81, children), (83, vec![12])]
        );
        assert_eq!(m.holders[0].identity(), m.holders[1].identity());
        assert!(
            Arc::ptr_eq(&m.roles[0], &m.roles[1]),
            "80 and 81 have the same holders: one set, one computation"
        );
        assert_eq!(m.comm(11), "gunz");
        let fds = m.worker_listen_fds();
        assert_eq!(fds[&11][..], [3, 4, 5], "the master's fds, 82's too");
        assert_eq!(fds[&12][..], [3, 4, 5, 9]);
        let on_82: Vec<u32> = m.socket_holders(7).map(|(pid, _)| pid).collect();
        assert_eq!(on_82, (10..=20).collect::<Vec<u32>>());
        let tags = watched(&m, &HashMap::new()).workers;
        assert_eq!(tags[&11].pool, tags[&12].pool);
    }

    #[test]
    fn listeners_held_by_the_same_process_share_one_holder_set_and_one_computation() {
        // One process (30) holds 80 and 81, at fds 3 and 4; another (40)
        // holds 82.
        let sockets = [socket(80, 5), socket(81, 6), socket(82, 7)];
        let (views, listeners) = shown_among(&[(80, 5), (81, 6), (82, 7)], &sockets);
        let on = |pid, port, inode, fd| HolderRecord {
            fd,
            ..holder(pid, 1, port, TCP_LISTEN, inode)
        };
        let walk = walk(&[on(30, 80, 5, 3), on(30, 81, 6, 4), on(40, 82, 7, 3)]);
        let m = Membership::from_holders(&listeners, &walk, &mut Handoffs::default());
        let p = pools(&views, &m, &HashMap::new(), 100);
        assert_eq!(
            workers_by_port(&p),
            [(80, vec![30]), (81, vec![30]), (82, vec![40])]
        );
        assert_eq!(m.holders[0].identity(), m.holders[1].identity());
        assert!(
            Arc::ptr_eq(&m.roles[0], &m.roles[1]),
            "one set, one computation"
        );
        assert_ne!(m.holders[0].identity(), m.holders[2].identity());
        assert!(!Arc::ptr_eq(&m.roles[0], &m.roles[2]));
        assert_eq!(m.worker_listen_fds()[&30][..], [3, 4]);
    }

    #[test]
    fn children_missing_some_of_the_masters_listeners_are_workers_of_the_rest() {
        // A master (10) with 80 and 81 at fds 3 and 4; its children 11 and
        // 12 closed 81, 13 kept both.
        let sockets = [socket(80, 5), socket(81, 6)];
        let (views, listeners) = shown_among(&[(80, 5), (81, 6)], &sockets);
        let mut walk = walk(&[masters(80, 5, 3), masters(81, 6, 4)]);
        let child = |pid, missing: &[u32]| Inheritor {
            pid,
            ppid: 10,
            comm: [0; 16],
            missing: Arc::from(missing),
        };
        walk.inheritors = vec![child(11, &[4]), child(12, &[4]), child(13, &[])];
        let m = Membership::from_holders(&listeners, &walk, &mut Handoffs::default());
        let p = pools(&views, &m, &HashMap::new(), 100);
        assert_eq!(
            workers_by_port(&p),
            [(80, vec![11, 12, 13]), (81, vec![13])]
        );
        let fds = m.worker_listen_fds();
        assert_eq!((&fds[&11][..], &fds[&13][..]), (&[3][..], &[3, 4][..]));
        let on_81: Vec<u32> = m.socket_holders(6).map(|(pid, _)| pid).collect();
        assert_eq!(on_81, [10, 13]);
    }

    #[test]
    fn a_pool_past_the_cap_is_counted_whole_without_a_view_per_worker() {
        let holders: Vec<_> = (11..1011)
            .map(|pid| holder(pid, 1, 80, TCP_LISTEN, 5))
            .collect();
        let p = pools(&[view(80)], &membership(80, &holders), &HashMap::new(), 10);
        assert_eq!((p.pools[0].workers.len(), p.workers_over_cap), (10, 990));
    }

    #[test]
    fn workers_beyond_the_cap_are_counted() {
        let holders: Vec<_> = (11..16)
            .map(|pid| holder(pid, 1, 80, TCP_LISTEN, 5))
            .collect();
        let m = membership(80, &holders);
        let p = pools(&[view(80)], &m, &HashMap::new(), 3);
        assert_eq!((p.pools[0].workers.len(), p.workers_over_cap), (3, 2));
    }
}
