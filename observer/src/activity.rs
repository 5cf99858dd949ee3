//! The busy/idle rule, in one place: what counts as a worker waiting for
//! new work, decided from one pass of the thread sampler (the kernel's view
//! of each thread of a watched worker: running or blocked, the syscall it is
//! blocked in, its arguments, and what it waits on).
//!
//! A worker process is **idle** while one of its threads waits for new work:
//! - blocked in `accept`/`accept4` on one of its listeners;
//! - in `select`/`pselect6`/`poll`/`ppoll` with one of its listeners in the set;
//! - in `epoll_wait`/`epoll_pwait`/`epoll_pwait2` on an epoll instance that
//!   watches one of its listeners now (its event loop: the sampler searches
//!   the instance's tree of watched files). An instance whose listeners were
//!   taken out of it is no wait for work in a process with other threads:
//!   Apache's event MPM takes them out while every worker thread serves. A
//!   single-threaded event loop waits for work in an epoll instance known
//!   to have watched its listeners; or, for a worker whose own such epoll
//!   was never seen, on any epoll instance, when its pool's event loops are
//!   epoll (nginx with `accept_mutex on` keeps the listener out of the sets
//!   of the workers that do not hold the mutex: they wait in their event
//!   loop all the same). A worker whose listener epoll is known and waits
//!   on another one is busy (Apache's mod_cgi waits on the CGI's pipes in
//!   an epoll of its own);
//! - in `io_uring_enter` waiting for completions (an io_uring event loop);
//! - on a CPU, in a process with other threads, with its saved registers
//!   still naming `accept` on a listener or `epoll_wait` on its event loop
//!   (unless it last waited there with no listener in the set), or, for a
//!   known acceptor, a private futex wake: an acceptor leaving its wait or
//!   handing a connection to its pool (no syscall or interrupt since),
//!   whose process is as free as its pool;
//! - waiting for the pool's **accept lock**: a process-shared lock (futex,
//!   `flock`, `fcntl(F_SETLKW)`) that a fellow worker of the same pool was
//!   seen holding while it waited on the listener (Apache httpd with several
//!   `Listen`s, uWSGI `--thunder-lock`). Once seen, the lock is known for
//!   the pool's lifetime.
//!
//! In a process with other threads, the thread that waits for work may be
//! an acceptor that hands what it accepts to a pool of threads (Puma,
//! gunicorn gthread, Apache's listener threads, in `accept`, a poll or the
//! accept lock). Such a process is idle only while a thread of its pool is
//! free: **parked** (blocked in a private futex wait with no timeout, as an
//! idle pool thread waits on its condition variable in glibc, CPython, Ruby
//! and the JVM; glibc's wait for a contended mutex is a serving thread's,
//! as CPython's take the GIL's, unless the threads take turns at the
//! listener), or one it can start again (fewer pool threads alive than
//! the most a worker of the pool has run at once). Pool threads are the
//! ones seen parked; until one is seen, the process is idle while its
//! acceptor waits, and so is one that held no accepted connection at the
//! last scrape (its parked threads are helpers, not a pool serving).
//! Threads that take turns at the listener (two or more seen waiting on
//! it, as uWSGI's threads do) each serve what they take.
//!
//! It is **busy** otherwise: running, or blocked on anything else (a
//! database, an upstream, a `sleep`, a lock that is not the accept lock).
//! Pure logic: I/O (file-lock holders) comes in through [`FileLocks`].
use std::collections::BTreeMap;

use foldhash::{HashMap, HashSet};

use observer_common::{
    EPOLL_WATCHES_LISTENER, EPOLL_WATCHES_NO_LISTENER, SYS_ACCEPT, SYS_ACCEPT4, SYS_EPOLL_PWAIT,
    SYS_EPOLL_PWAIT2, SYS_EPOLL_WAIT, SYS_FCNTL, SYS_FLOCK, SYS_FUTEX, SYS_IO_URING_ENTER,
    SYS_POLL, SYS_PPOLL, SYS_PSELECT6, SYS_SELECT, ThreadSample, WorkerFds,
};

const FUTEX_PRIVATE_FLAG: u64 = 128;
const FUTEX_CMD_MASK: u64 = 127;
const FUTEX_WAIT: u64 = 0;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE: u64 = 1;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_LOCK_PI2: u64 = 13;
/// A glibc mutex's futex word while it is locked and has waiters.
const GLIBC_MUTEX_LOCKED_WITH_WAITERS: u64 = 2;
/// The owner's thread id in a PI or robust mutex's futex word.
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
const IORING_ENTER_GETEVENTS: u64 = 1;
const F_SETLKW: u64 = 7;
const F_OFD_SETLKW: u64 = 38;
const LOCK_NB: u64 = 4;

/// A process across pid reuse: its pid and its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    pub pid: u32,
    pub start_ns: u64,
}

impl ProcessKey {
    fn of(s: &ThreadSample) -> ProcessKey {
        ProcessKey {
            pid: s.tgid,
            start_ns: s.start_ns,
        }
    }
}

/// Which pool a worker belongs to: workers that hold the same listeners.
pub type PoolTag = u64;

/// What the daemon knows of a watched worker process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// Its listener fds and the epoll fds watching them (also in `WATCHED`).
    pub fds: WorkerFds,
    pub pool: PoolTag,
    /// Some worker of its pool has an epoll instance watching a listener:
    /// the pool's workers are epoll event loops.
    pub epoll_pool: bool,
    /// It held an accepted connection at the last scrape: only then can a
    /// pool of its threads be serving while its acceptor waits (a helper
    /// thread of an idle worker, as an error reporter's sender, is no pool).
    pub holds_connections: bool,
}

/// The processes the sampler reports: the workers, and the masters of
/// their pools, whose children that are not known workers yet (forked
/// since the daemon last looked) are reported as workers of the pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchedSet {
    pub workers: HashMap<u32, Watched>,
    pub masters: HashMap<u32, Watched>,
}

impl WatchedSet {
    /// What is known of the process of sample `s`.
    pub fn of(&self, s: &ThreadSample) -> Option<&Watched> {
        match self.workers.get(&s.tgid) {
            Some(w) => Some(w),
            None if s.master_tgid != 0 => self.masters.get(&s.master_tgid),
            None => None,
        }
    }
}

/// A locked file, by inode number. Only the number: /proc/locks names a
/// file on an overlay (a container's root) by the device of the filesystem
/// below, where `stat` through the overlay gives the overlay's. A match
/// also needs the holder to be a fellow worker waiting for work, so two
/// filesystems' equal numbers cannot mislead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub ino: u64,
}

/// Where file locks are looked up (the daemon reads /proc; tests fake it).
pub trait FileLocks {
    /// The file open as `fd` in process `pid`.
    fn file_of(&mut self, pid: u32, fd: u32) -> Option<FileId>;
    /// The processes holding a lock on `file`.
    fn holders(&mut self, file: FileId) -> Vec<u32>;
}

/// A lock a thread is blocked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Lock {
    /// A process-shared futex, by its address (the same in every forked
    /// worker that inherited the mapping).
    Futex { uaddr: u64 },
    /// `flock`/`fcntl` on an fd.
    File { fd: u32 },
}

/// A lock as the pool knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum LockId {
    Futex(u64),
    File(FileId),
}

/// What one thread is doing in one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Doing {
    /// Waits for new work (in a process with other threads, maybe as an
    /// acceptor that hands what it accepts to a pool of threads).
    WaitsForWork,
    /// Blocked on a lock; `owner` is the thread id stored in a futex word.
    WaitsOnLock {
        lock: Lock,
        owner: Option<u32>,
    },
    /// Blocked in a private futex wait with no timeout: how an idle pool
    /// thread waits for its next task.
    Parked,
    /// Parked on a contended mutex: a thread waiting for its turn at the
    /// listener where the process's threads take turns (uWSGI's thread
    /// lock), a serving thread otherwise (CPython's GIL: its threads take
    /// the GIL's mutex while they serve).
    OnMutex,
    /// On a CPU, in a process with other threads, just out of a private
    /// futex wake: an acceptor that has handed a connection to its pool
    /// (if it is one), working otherwise.
    Waking,
    Other,
}

/// Whether `fd` (a syscall argument) is one of `fds` (-1: an empty slot).
fn contains(fds: &[i32], fd: u64) -> bool {
    fd <= i32::MAX as u64 && fds.contains(&(fd as i32))
}

/// The rule for one thread; `multithreaded`: its process has more than
/// one thread in this pass.
fn doing(s: &ThreadSample, w: &Watched, multithreaded: bool) -> Doing {
    if s.state == 0 {
        // On a CPU, or woken and about to be.
        return match multithreaded {
            true if leaving_its_wait_for_work(s, w) => Doing::WaitsForWork,
            true if waking(s) => Doing::Waking,
            _ => Doing::Other,
        };
    }
    let listen = &w.fds.listen;
    let [a0, a1, _, a3] = s.args;
    let waits_for_work = match s.syscall {
        SYS_ACCEPT | SYS_ACCEPT4 => in_accept_on_listener(s, w),
        SYS_SELECT | SYS_PSELECT6 | SYS_POLL | SYS_PPOLL => {
            let polled = match s.syscall {
                SYS_POLL | SYS_PPOLL => &s.polled_fds[..(a1 as usize).min(s.polled_fds.len())],
                _ => &s.polled_fds[..],
            };
            polled.iter().any(|fd| *fd >= 0 && listen.contains(fd))
        }
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 => match s.epoll_listeners {
            EPOLL_WATCHES_LISTENER => true,
            // Its listeners taken out of the set, by a process with
            // threads that serve: Apache's event MPM does so while every
            // worker thread is taken (mod_status: "accepting: no").
            EPOLL_WATCHES_NO_LISTENER if multithreaded => false,
            // A single-threaded event loop that takes turns at the
            // listener (nginx's accept_mutex) waits in it all the same.
            _ => {
                let own_epoll_unknown = w.fds.epoll.iter().all(|fd| *fd < 0);
                contains(&w.fds.epoll, a0) || (w.epoll_pool && own_epoll_unknown)
            }
        },
        SYS_IO_URING_ENTER => a3 & IORING_ENTER_GETEVENTS != 0,
        _ => false,
    };
    if waits_for_work {
        return Doing::WaitsForWork;
    }
    match lock_wait(s) {
        Some((lock, owner)) => Doing::WaitsOnLock { lock, owner },
        None if parked(s) && on_a_mutex(s) => Doing::OnMutex,
        None if parked(s) => Doing::Parked,
        None => Doing::Other,
    }
}

/// Whether a thread on a CPU is on its way out of a wait for work: its
/// saved registers still name `accept` on one of its listeners or
/// `epoll_wait` on its event loop (an epoll instance known to watch its
/// listeners), which holds from its wake-up until its next syscall or
/// interrupt (an interrupt's entry marks them "no syscall"), so within a
/// tick of it. In a process with other threads this is an acceptor between
/// two waits (Apache event's listener thread woken by a connection a
/// fellow child takes, gthread's main thread dispatching one): its process
/// is as free as its pool. A thread that serves has made a syscall or
/// taken a tick since. (One woken where its event loop watched no listener
/// is no acceptor leaving a wait for work: [`Learnt::woken_without_listeners`].)
fn leaving_its_wait_for_work(s: &ThreadSample, w: &Watched) -> bool {
    in_accept_on_listener(s, w) || (in_epoll_wait(s) && contains(&w.fds.epoll, s.args[0]))
}

fn in_epoll_wait(s: &ThreadSample) -> bool {
    matches!(
        s.syscall,
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2
    )
}

/// Whether a thread's last syscall was a private futex wake (the registers
/// of a thread on a CPU, as in [`leaving_its_wait_for_work`]): glibc's,
/// CPython's and APR's way to signal a pool's condition variable.
fn waking(s: &ThreadSample) -> bool {
    let [_, a1, _, _] = s.args;
    s.syscall == SYS_FUTEX
        && a1 & FUTEX_PRIVATE_FLAG != 0
        && matches!(a1 & FUTEX_CMD_MASK, FUTEX_WAKE | FUTEX_WAKE_BITSET)
}

/// A private futex wait with no timeout (the timeout pointer is `args[3]`).
fn parked(s: &ThreadSample) -> bool {
    let [_, a1, _, a3] = s.args;
    let cmd = a1 & FUTEX_CMD_MASK;
    s.syscall == SYS_FUTEX
        && a1 & FUTEX_PRIVATE_FLAG != 0
        && matches!(cmd, FUTEX_WAIT | FUTEX_WAIT_BITSET)
        && a3 == 0
}

/// Of parked waits, glibc's for a contended mutex: `FUTEX_WAIT` for the
/// value 2, "locked, with waiters" (`args[2]`), as `pthread_mutex_lock`
/// blocks. glibc's condition variables and semaphores, where idle pool
/// threads wait, use `FUTEX_WAIT_BITSET`.
fn on_a_mutex(s: &ThreadSample) -> bool {
    let [_, a1, a2, _] = s.args;
    a1 & FUTEX_CMD_MASK == FUTEX_WAIT && a2 == GLIBC_MUTEX_LOCKED_WITH_WAITERS
}

/// A wait on a process-shared lock, with the owner a futex word names.
fn lock_wait(s: &ThreadSample) -> Option<(Lock, Option<u32>)> {
    let [a0, a1, _, _] = s.args;
    match s.syscall {
        SYS_FUTEX => {
            let cmd = a1 & FUTEX_CMD_MASK;
            let shared = a1 & FUTEX_PRIVATE_FLAG == 0;
            let waits = matches!(
                cmd,
                FUTEX_WAIT | FUTEX_WAIT_BITSET | FUTEX_LOCK_PI | FUTEX_LOCK_PI2
            );
            // The lock is its address (a register); only its owner comes
            // from user memory, so a word that could not be read still
            // names a known accept lock, just proves no new one.
            (shared && waits).then(|| {
                let owner = s.futex_word & FUTEX_TID_MASK;
                let owner = (s.user_read_failed == 0 && owner != 0).then_some(owner);
                (Lock::Futex { uaddr: a0 }, owner)
            })
        }
        SYS_FLOCK if a1 & LOCK_NB == 0 => Some((Lock::File { fd: a0 as u32 }, None)),
        SYS_FCNTL if a1 == F_SETLKW || a1 == F_OFD_SETLKW => {
            Some((Lock::File { fd: a0 as u32 }, None))
        }
        _ => None,
    }
}

/// What the rule learnt from earlier passes.
#[derive(Debug, Default)]
pub struct Learnt {
    /// Accept locks: a lock that a worker of the pool held while it waited
    /// on the listener.
    accept_locks: HashSet<(PoolTag, LockId)>,
    /// Per process: its threads that waited for work, and its pool threads.
    threads: HashMap<ProcessKey, ThreadRoles>,
    /// Per pool: the most pool threads one of its live workers had alive
    /// at once (made again at each pass: a pool reloaded with fewer threads
    /// forgets the old workers' count with them).
    most_pool_threads: HashMap<PoolTag, usize>,
    /// Threads last seen blocked in an epoll wait whose instance watched
    /// none of their listeners (Apache event's listener thread while every
    /// worker thread is taken), and still on a CPU since.
    listenerless_epoll_waiters: HashSet<u32>,
}

/// The roles of a process's threads, as seen so far.
#[derive(Debug, Default)]
struct ThreadRoles {
    /// Threads seen waiting for work (two are enough to tell that its
    /// threads take turns at the listener).
    waiters: HashSet<u32>,
    /// Threads seen parked while another thread waited for work.
    pool: HashSet<u32>,
    /// The most of them alive at once, and the process's pool.
    most: usize,
    pool_tag: PoolTag,
}

impl Learnt {
    /// Forgets pools and processes that are no longer watched.
    pub fn retain(&mut self, watched: &WatchedSet) {
        let pools: HashSet<PoolTag> = watched.workers.values().map(|w| w.pool).collect();
        self.accept_locks.retain(|(pool, _)| pools.contains(pool));
        self.threads
            .retain(|k, _| watched.workers.contains_key(&k.pid));
    }

    /// Whether a thread on a CPU was woken in an epoll wait that watched
    /// none of its listeners: its registers name its event loop, but what
    /// it waited for was not new work (an Apache event child whose worker
    /// threads were all taken, until its listener thread puts the
    /// listeners back).
    fn woken_without_listeners(&self, s: &ThreadSample) -> bool {
        s.state == 0 && in_epoll_wait(s) && self.listenerless_epoll_waiters.contains(&s.tid)
    }

    /// Notes the threads blocked in an epoll wait that watches none of
    /// their listeners, and keeps those of them still on a CPU.
    fn note_listenerless_epoll_waits(&mut self, samples: &[ThreadSample]) {
        let before = std::mem::take(&mut self.listenerless_epoll_waiters);
        self.listenerless_epoll_waiters = samples
            .iter()
            .filter(|s| match s.state {
                0 => before.contains(&s.tid),
                _ => in_epoll_wait(s) && s.epoll_listeners == EPOLL_WATCHES_NO_LISTENER,
            })
            .map(|s| s.tid)
            .collect();
    }

    /// Whether the process's thread `tid` was seen waiting for work.
    fn is_acceptor(&self, key: ProcessKey, tid: u32) -> bool {
        self.threads
            .get(&key)
            .is_some_and(|roles| roles.waiters.contains(&tid))
    }

    /// The most pool threads of each pool, from its workers' own.
    fn count_pool_threads(&mut self) {
        self.most_pool_threads.clear();
        for roles in self.threads.values() {
            let most = self.most_pool_threads.entry(roles.pool_tag).or_default();
            *most = (*most).max(roles.most);
        }
    }

    /// The free pool threads of a process whose acceptors (`waiting`) wait
    /// for work while its other threads are as in `threads`: parked ones,
    /// and ones it can start again. `None` while no pool thread is known.
    fn free_pool_threads(
        &mut self,
        key: ProcessKey,
        pool: PoolTag,
        waiting: &[u32],
        threads: &[(u32, Doing)],
    ) -> Option<usize> {
        let roles = self.threads.entry(key).or_default();
        roles.pool_tag = pool;
        let alive: HashSet<u32> = threads.iter().map(|(tid, _)| *tid).collect();
        roles.waiters.retain(|tid| alive.contains(tid));
        for tid in waiting {
            if roles.waiters.len() < 2 {
                roles.waiters.insert(*tid);
            }
        }
        let takes_turns = roles.waiters.len() > 1;
        let free = |d: &Doing| *d == Doing::Parked || (takes_turns && *d == Doing::OnMutex);
        let parked: Vec<u32> = threads
            .iter()
            .filter(|(tid, d)| free(d) && !roles.waiters.contains(tid))
            .map(|(tid, _)| *tid)
            .collect();
        roles.pool.extend(&parked);
        roles
            .pool
            .retain(|tid| alive.contains(tid) && !roles.waiters.contains(tid));
        if takes_turns {
            // Its threads take turns at the listener: each one waiting is free.
            return Some(waiting.len() + parked.len());
        }
        roles.most = roles.most.max(roles.pool.len());
        let alive_pool = roles.pool.len();
        let most = self.most_pool_threads.entry(pool).or_default();
        *most = (*most).max(roles.most);
        (*most > 0).then(|| parked.len() + (*most - alive_pool))
    }
}

/// A worker process's state in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessState {
    pub busy: bool,
    /// Its threads free to take a new request: waiting for work and
    /// serving what they take, parked pool threads, and pool threads it can
    /// start again.
    pub idle_threads: u32,
}

/// The watched processes with a thread blocked in `accept`/`accept4` on one
/// of their listeners in this pass: they wait for work without an event
/// loop, so the daemon does not look in /proc for theirs.
pub fn waiting_in_accept(
    samples: &[ThreadSample],
    watched: &HashMap<u32, Watched>,
) -> HashSet<u32> {
    samples
        .iter()
        .filter(|s| s.state != 0)
        .filter(|s| {
            watched
                .get(&s.tgid)
                .is_some_and(|w| in_accept_on_listener(s, w))
        })
        .map(|s| s.tgid)
        .collect()
}

/// Whether the thread's syscall is `accept`/`accept4` on one of the
/// worker's listeners.
fn in_accept_on_listener(s: &ThreadSample, w: &Watched) -> bool {
    matches!(s.syscall, SYS_ACCEPT | SYS_ACCEPT4) && contains(&w.fds.listen, s.args[0])
}

/// One pass: the state of each watched process seen in it. Processes not
/// in `watched` (a stale map entry) are left out.
pub fn process_states(
    samples: &[ThreadSample],
    watched: &WatchedSet,
    learnt: &mut Learnt,
    files: &mut impl FileLocks,
) -> BTreeMap<ProcessKey, ProcessState> {
    let mut threads_per_process: HashMap<u32, usize> = HashMap::default();
    for s in samples {
        *threads_per_process.entry(s.tgid).or_default() += 1;
    }
    let threads: Vec<(&ThreadSample, Watched, Doing)> = samples
        .iter()
        .filter_map(|s| {
            let w = watched.of(s)?;
            let multithreaded = threads_per_process.get(&s.tgid).is_some_and(|n| *n > 1);
            let d = match doing(s, w, multithreaded) {
                Doing::WaitsForWork if learnt.woken_without_listeners(s) => Doing::Other,
                d => d,
            };
            Some((s, *w, d))
        })
        .collect();
    learnt.note_listenerless_epoll_waits(samples);
    let waiting = |d: &Doing| *d == Doing::WaitsForWork;
    // Threads that wait for work, by thread id, and processes with one.
    let waiting_threads: HashMap<u32, PoolTag> = threads
        .iter()
        .filter(|(_, _, d)| waiting(d))
        .map(|(s, w, _)| (s.tid, w.pool))
        .collect();
    let waiting_processes: HashSet<(u32, PoolTag)> = threads
        .iter()
        .filter(|(_, _, d)| waiting(d))
        .map(|(s, w, _)| (s.tgid, w.pool))
        .collect();
    // Each process's threads, a lock wait on a known or proven accept lock
    // resolved to a wait for work that serves itself.
    let mut processes: BTreeMap<ProcessKey, (Watched, Vec<(u32, Doing)>)> = BTreeMap::new();
    for (s, w, d) in &threads {
        let d = match *d {
            Doing::WaitsOnLock { lock, owner } => {
                let id = match lock {
                    Lock::Futex { uaddr } => Some(LockId::Futex(uaddr)),
                    Lock::File { fd } => files.file_of(s.tgid, fd).map(LockId::File),
                };
                let accept_lock = id.is_some_and(|id| {
                    if learnt.accept_locks.contains(&(w.pool, id)) {
                        return true;
                    }
                    // Proven when a fellow worker holds it while it waits for work.
                    let proven = match id {
                        LockId::Futex(_) => {
                            owner.is_some_and(|tid| waiting_threads.get(&tid) == Some(&w.pool))
                        }
                        LockId::File(file) => files
                            .holders(file)
                            .into_iter()
                            .any(|pid| pid != s.tgid && waiting_processes.contains(&(pid, w.pool))),
                    };
                    if proven {
                        learnt.accept_locks.insert((w.pool, id));
                    }
                    proven
                });
                if accept_lock {
                    Doing::WaitsForWork
                } else {
                    Doing::Other
                }
            }
            d => d,
        };
        let entry = processes.entry(ProcessKey::of(s)).or_insert((*w, vec![]));
        entry.1.push((s.tid, d));
    }
    // What was learnt of a process goes with it (or with its pid's reuse);
    // a watched worker missing from one pass keeps it.
    let pids_seen: HashSet<u32> = processes.keys().map(|k| k.pid).collect();
    learnt.threads.retain(|k, _| {
        processes.contains_key(k)
            || (watched.workers.contains_key(&k.pid) && !pids_seen.contains(&k.pid))
    });
    learnt.count_pool_threads();
    processes
        .into_iter()
        .map(|(key, (w, threads))| (key, process_state(key, &w, &threads, learnt)))
        .collect()
}

/// One process's state from what each of its threads does.
fn process_state(
    key: ProcessKey,
    w: &Watched,
    threads: &[(u32, Doing)],
    learnt: &mut Learnt,
) -> ProcessState {
    // A known acceptor waking its pool has handed it a connection: it is
    // on its way back to its wait.
    let handing_off = |tid: &u32, d: &Doing| *d == Doing::Waking && learnt.is_acceptor(key, *tid);
    let waiting: Vec<u32> = threads
        .iter()
        .filter(|(tid, d)| *d == Doing::WaitsForWork || handing_off(tid, d))
        .map(|(tid, _)| *tid)
        .collect();
    let idle_threads = if waiting.is_empty() {
        0
    } else if threads.len() == 1 {
        1
    } else {
        let pool = learnt.free_pool_threads(key, w.pool, &waiting, threads);
        match pool {
            // Serving connections: free while a thread of its pool is.
            Some(free) if w.holds_connections => free,
            // No pool thread known, or no connection to serve: its waiting
            // threads are all there is to go by.
            free => free.unwrap_or(0).max(waiting.len()),
        }
    };
    ProcessState {
        busy: idle_threads == 0,
        idle_threads: idle_threads as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: PoolTag = 7;

    fn watched(pids: &[u32], listen: &[i32], epoll: &[i32]) -> WatchedSet {
        WatchedSet {
            workers: workers(pids, listen, epoll),
            masters: HashMap::default(),
        }
    }

    fn workers(pids: &[u32], listen: &[i32], epoll: &[i32]) -> HashMap<u32, Watched> {
        let mut fds = WorkerFds::EMPTY;
        fds.listen[..listen.len()].copy_from_slice(listen);
        fds.epoll[..epoll.len()].copy_from_slice(epoll);
        let epoll_pool = !epoll.is_empty();
        pids.iter()
            .map(|pid| {
                let w = Watched {
                    fds,
                    pool: POOL,
                    epoll_pool,
                    holds_connections: true,
                };
                (*pid, w)
            })
            .collect()
    }

    /// A blocked thread (state 1, TASK_INTERRUPTIBLE) in `syscall`.
    #[test]
    fn workers_blocked_in_accept_on_their_listener_are_waiting_in_accept() {
        let w = watched(&[1, 2, 3], &[3], &[]);
        let samples = [
            blocked(1, 1, SYS_ACCEPT4, [3, 0, 0, 0]),
            // accept() on another socket, and epoll_wait: not on the listener.
            blocked(2, 2, SYS_ACCEPT, [9, 0, 0, 0]),
            blocked(3, 3, SYS_EPOLL_WAIT, [3, 0, 0, 0]),
        ];
        assert_eq!(
            waiting_in_accept(&samples, &w.workers),
            HashSet::from_iter([1])
        );
    }

    fn blocked(tgid: u32, tid: u32, syscall: i64, args: [u64; 4]) -> ThreadSample {
        ThreadSample {
            tgid,
            tid,
            state: 1,
            start_ns: 1000 + tgid as u64,
            syscall,
            args,
            polled_fds: [-1; 16],
            ..Default::default()
        }
    }

    fn running(tgid: u32, tid: u32) -> ThreadSample {
        ThreadSample {
            state: 0,
            ..blocked(tgid, tid, -1, [0; 4])
        }
    }

    struct NoFiles;
    impl FileLocks for NoFiles {
        fn file_of(&mut self, _: u32, _: u32) -> Option<FileId> {
            None
        }
        fn holders(&mut self, _: FileId) -> Vec<u32> {
            vec![]
        }
    }

    fn busy_by_pid(states: &BTreeMap<ProcessKey, ProcessState>) -> Vec<(u32, bool)> {
        states.iter().map(|(k, s)| (k.pid, s.busy)).collect()
    }

    fn states(samples: &[ThreadSample], w: &WatchedSet) -> Vec<(u32, bool)> {
        busy_by_pid(&process_states(
            samples,
            w,
            &mut Learnt::default(),
            &mut NoFiles,
        ))
    }

    #[test]
    fn gunicorn_sync_idle_in_select_on_its_listener_busy_in_a_sleep() {
        // Recorded on 6.18 (/proc/PID/syscall, the same saved registers):
        // gunicorn 20.1 sync workers, listener fd 5. Idle: `270 0x8
        // 0x7ffd3a272540 0x0 0x0` (pselect6, fd 5 set in the read set);
        // serving `?1.5`: `230 0x1 0x1 0x7ffd3a27e700 0x0` (time.sleep).
        let mut idle = blocked(30075, 30075, SYS_PSELECT6, [8, 0x7ffd_3a27_2540, 0, 0]);
        idle.polled_fds[0] = 5;
        let sleeping = blocked(30076, 30076, 230, [1, 1, 0x7ffd_3a27_e700, 0]);
        let w = watched(&[30075, 30076], &[5], &[]);
        assert_eq!(
            states(&[idle, sleeping], &w),
            vec![(30075, false), (30076, true)]
        );
    }

    #[test]
    fn select_on_other_fds_and_ruby_sleep_ppoll_are_busy() {
        // A select with no listener found in its set (a database socket),
        // and ppoll(NULL, 0, timeout): Ruby's sleep.
        let select_db = blocked(11, 11, SYS_SELECT, [12, 0x7000, 0, 0]);
        let ruby_sleep = blocked(12, 12, SYS_PPOLL, [0, 0, 0x7100, 0]);
        let w = watched(&[11, 12], &[3], &[]);
        assert_eq!(
            states(&[select_db, ruby_sleep], &w),
            vec![(11, true), (12, true)]
        );
    }

    #[test]
    fn poll_counts_only_the_entries_it_was_given() {
        let mut p = blocked(11, 11, SYS_POLL, [0x7000, 1, u64::MAX, 0]);
        p.polled_fds[0] = 9; // its one entry
        p.polled_fds[1] = 3; // stale memory past nfds
        let w = watched(&[11], &[3], &[]);
        assert_eq!(states(&[p], &w), vec![(11, true)]);
        p.args[1] = 2;
        assert_eq!(states(&[p], &w), vec![(11, false)]);
    }

    #[test]
    fn accept_on_a_listener_and_epoll_on_a_listener_epoll_are_idle() {
        let accept = blocked(11, 11, SYS_ACCEPT4, [3, 0, 0, 0x80000]);
        let epoll = blocked(12, 12, SYS_EPOLL_WAIT, [7, 0x7000, 512, u64::MAX]);
        let accept_elsewhere = blocked(13, 13, SYS_ACCEPT4, [8, 0, 0, 0x80000]);
        let w = watched(&[11, 12, 13], &[3], &[7]);
        assert_eq!(
            states(&[accept, epoll, accept_elsewhere], &w),
            vec![(11, false), (12, false), (13, true)]
        );
    }

    #[test]
    fn nginx_accept_mutex_workers_without_the_listener_wait_in_their_event_loop() {
        // Recorded on 6.18, nginx `accept_mutex on`, 2 workers: the mutex
        // holder waits on epoll 7 (listener in its set, found in fdinfo),
        // the other on its own epoll 9, without the listener, for 500 ms.
        let holder = blocked(31, 31, SYS_EPOLL_WAIT, [7, 0x55e1_b9fd, 512, u64::MAX]);
        let other = blocked(32, 32, SYS_EPOLL_WAIT, [9, 0x55e1_b9fd, 512, 500]);
        let mut w = watched(&[31, 32], &[6], &[7]);
        if let Some(x) = w.workers.get_mut(&32) {
            x.fds.epoll = [-1; 4];
        }
        assert_eq!(states(&[holder, other], &w), vec![(31, false), (32, false)]);
        // A pool whose workers never wait in epoll on a listener (gunicorn
        // sync): an epoll_wait inside a request is work.
        let w = watched(&[32], &[6], &[]);
        assert_eq!(states(&[other], &w), vec![(32, true)]);
    }

    #[test]
    fn an_apache_child_waiting_on_its_cgi_in_another_epoll_is_busy() {
        // Recorded on 6.18, Apache 2.4 prefork: the child serving a CGI
        // waits for its output in mod_cgi's own pollset, `232 0x9
        // 0x7f40464504b0 0x2 0xea60` (60 s CGI timeout); the idle one in its
        // listener pollset, `232 0x7 0x7f404645c1f0 0x2 0x2710`.
        let serving = blocked(21, 21, SYS_EPOLL_WAIT, [9, 0x7f40_4645_04b0, 2, 60_000]);
        let idle = blocked(22, 22, SYS_EPOLL_WAIT, [7, 0x7f40_4645_c1f0, 2, 10_000]);
        let w = watched(&[21, 22], &[3, 4], &[7]);
        assert_eq!(states(&[serving, idle], &w), vec![(21, true), (22, false)]);
    }

    #[test]
    fn a_process_is_idle_when_any_thread_waits_for_work() {
        // Puma/gthread shape: the acceptor waits on the listener while a
        // pool thread runs; a process whose threads all work is busy.
        let mut acceptor = blocked(30, 31, SYS_PSELECT6, [8, 0x7000, 0, 0]);
        acceptor.polled_fds[0] = 5;
        let w = watched(&[30, 40], &[5], &[]);
        let samples = [
            running(30, 30),
            acceptor,
            running(30, 32),
            running(40, 40),
            blocked(40, 41, 230, [0; 4]),
        ];
        assert_eq!(states(&samples, &w), vec![(30, false), (40, true)]);
    }

    /// Recorded on 6.18, Apache 2.4 event, 1 client: child 19219's
    /// listener thread is on a CPU, its registers still naming the
    /// `epoll_wait` on its pollset (fd 7) it was woken from, while both its
    /// worker threads are parked and its main thread reads the pipe of
    /// death. A child busy in that pass contradicted mod_status
    /// ("accepting: yes"). A worker thread woken from the pool's condition
    /// variable (on a CPU, registers naming the futex) has been handed a
    /// connection: with the other one serving, its child is full.
    #[test]
    fn an_acceptor_leaving_its_wait_leaves_its_process_as_free_as_its_pool() {
        let w = watched(&[19218, 19219], &[3, 4], &[7]);
        let mut learnt = Learnt::default();
        let worker_thread =
            |pid, tid| blocked(pid, tid, SYS_FUTEX, [0x7f94_a6eb_e164, 0x189, 0, 0]);
        let listener = |pid, tid| {
            let mut s = blocked(pid, tid, SYS_EPOLL_WAIT, [7, 0x7f94_a6eb_e3c8, 8, 0x596f]);
            s.epoll_listeners = EPOLL_WATCHES_LISTENER;
            s
        };
        let pipe_of_death = |pid| blocked(pid, pid, 0, [5, 0x7ffd_78a0_a0a3, 1, 8]);
        let on_cpu = |s: ThreadSample| ThreadSample { state: 0, ..s };
        let at_rest: Vec<ThreadSample> = [19218, 19219]
            .into_iter()
            .flat_map(|pid| {
                let tid = pid * 10;
                [
                    pipe_of_death(pid),
                    worker_thread(pid, tid + 1),
                    worker_thread(pid, tid + 2),
                    listener(pid, tid + 3),
                ]
            })
            .collect();
        let s = busy_by_pid(&process_states(&at_rest, &w, &mut learnt, &mut NoFiles));
        assert_eq!(s, vec![(19218, false), (19219, false)]);

        let serving = blocked(19218, 192_182, SYS_POLL, [0x7f94_a5d7_38f0, 1, 60_000, 0]);
        let pass = [
            pipe_of_death(19218),
            on_cpu(worker_thread(19218, 192_181)),
            serving,
            listener(19218, 192_183),
            pipe_of_death(19219),
            worker_thread(19219, 192_191),
            worker_thread(19219, 192_192),
            on_cpu(listener(19219, 192_193)),
        ];
        let s = busy_by_pid(&process_states(&pass, &w, &mut learnt, &mut NoFiles));
        assert_eq!(s, vec![(19218, true), (19219, false)]);

        // The child that took the connection: its listener thread has woken
        // a worker thread (`futex(…, FUTEX_WAKE_PRIVATE, 1)`) and is
        // preempted by it; the other worker thread is parked.
        let handing_off = ThreadSample {
            args: [0x7f0b_c9dd_e0e8, 0x81, 1, 0],
            ..on_cpu(blocked(19219, 192_193, SYS_FUTEX, [0; 4]))
        };
        let pass = [
            pipe_of_death(19219),
            on_cpu(worker_thread(19219, 192_191)),
            worker_thread(19219, 192_192),
            handing_off,
        ];
        let s = busy_by_pid(&process_states(&pass, &w, &mut learnt, &mut NoFiles));
        assert_eq!(s, vec![(19219, false)]);

        // Every worker thread taken, the listener thread took the
        // listeners out of its pollset and waits there. Woken (a worker
        // thread that has just finished parks), it has not yet put them
        // back: busy, as mod_status' "accepting: no" says until it does.
        let serving = |tid| blocked(19219, tid, SYS_POLL, [0x7f94_a5d7_38f0, 1, 60_000, 0]);
        let without_listeners = ThreadSample {
            epoll_listeners: EPOLL_WATCHES_NO_LISTENER,
            ..listener(19219, 192_193)
        };
        let full = [
            pipe_of_death(19219),
            serving(192_191),
            serving(192_192),
            without_listeners,
        ];
        let s = busy_by_pid(&process_states(&full, &w, &mut learnt, &mut NoFiles));
        assert_eq!(s, vec![(19219, true)]);
        let woken = [
            pipe_of_death(19219),
            worker_thread(19219, 192_191),
            serving(192_192),
            on_cpu(listener(19219, 192_193)),
        ];
        let s = busy_by_pid(&process_states(&woken, &w, &mut learnt, &mut NoFiles));
        assert_eq!(s, vec![(19219, true)]);
    }

    /// One thread on a CPU serves, whatever its registers say: its event
    /// loop or its accept returned into the work itself.
    #[test]
    fn a_single_threaded_worker_on_a_cpu_is_busy_whatever_its_registers_say() {
        let mut r = blocked(11, 11, SYS_ACCEPT4, [3, 0, 0, 0]);
        r.state = 0;
        assert_eq!(states(&[r], &watched(&[11], &[3], &[])), vec![(11, true)]);
    }

    #[test]
    fn io_uring_waiting_for_completions_is_idle() {
        let waiting = blocked(
            11,
            11,
            SYS_IO_URING_ENTER,
            [4, 0, 1, IORING_ENTER_GETEVENTS],
        );
        let submitting = blocked(12, 12, SYS_IO_URING_ENTER, [4, 1, 0, 0]);
        let w = watched(&[11, 12], &[3], &[]);
        assert_eq!(
            states(&[waiting, submitting], &w),
            vec![(11, false), (12, true)]
        );
    }

    /// Apache 2.4 prefork with two Listen lines, recorded on 6.18: child 21
    /// (8079) waits in `232 0x7 … 0x2 0x2710` holding the accept mutex (a
    /// robust PI mutex in a shared page: word 0x80001f8f, FUTEX_WAITERS |
    /// 8079); 22 and 23 in `202 0x7f9cfd502000 0x6` (FUTEX_LOCK_PI, shared).
    fn apache_idle() -> Vec<ThreadSample> {
        let uaddr = 0x7f00_1000;
        let lock_wait = |pid| {
            let mut s = blocked(pid, pid, SYS_FUTEX, [uaddr, FUTEX_LOCK_PI, 0, 0]);
            s.futex_word = 21 | 0x8000_0000; // FUTEX_WAITERS
            s
        };
        vec![
            blocked(21, 21, SYS_EPOLL_WAIT, [9, 0x7000, 2, u64::MAX]),
            lock_wait(22),
            lock_wait(23),
        ]
    }

    #[test]
    fn apache_children_waiting_for_the_accept_mutex_are_idle() {
        let w = watched(&[21, 22, 23], &[3, 4], &[9]);
        assert_eq!(
            states(&apache_idle(), &w),
            vec![(21, false), (22, false), (23, false)]
        );
    }

    #[test]
    fn a_known_accept_lock_stays_known_when_its_holder_is_serving() {
        let w = watched(&[21, 22, 23], &[3, 4], &[9]);
        let mut locks = Learnt::default();
        process_states(&apache_idle(), &w, &mut locks, &mut NoFiles);
        // 21 accepted and serves, still holding the mutex for a moment.
        let mut later = apache_idle();
        later[0] = running(21, 21);
        let s = busy_by_pid(&process_states(&later, &w, &mut locks, &mut NoFiles));
        assert_eq!(s, vec![(21, true), (22, false), (23, false)]);
    }

    /// Apache's event MPM, 2 children of a listener thread in epoll_wait on
    /// its pollset (fd 9) and 2 worker threads: child 31's workers both
    /// serve (one reads a request, one runs), so its listener thread took
    /// the listeners out of the pollset; child 32 has a worker thread parked
    /// on the pool's condition variable (a private futex) and its pollset
    /// watches the listener.
    #[test]
    fn an_apache_event_child_whose_pollset_lost_its_listeners_is_busy() {
        let w = watched(&[31, 32], &[3], &[9]);
        let listener_thread = |pid, watches| {
            let mut s = blocked(pid, pid, SYS_EPOLL_WAIT, [9, 0x7000, 2, 100]);
            s.epoll_listeners = watches;
            s
        };
        let samples = [
            listener_thread(31, EPOLL_WATCHES_NO_LISTENER),
            blocked(31, 311, 0, [12, 0x7100, 8000, 0]), // read() on its client
            running(31, 312),
            listener_thread(32, EPOLL_WATCHES_LISTENER),
            blocked(32, 321, SYS_FUTEX, [0x5000, FUTEX_WAIT_BITSET | 128, 0, 0]),
            running(32, 322),
        ];
        assert_eq!(states(&samples, &w), vec![(31, true), (32, false)]);
    }

    /// nginx `accept_mutex on`: a worker without the mutex has the listener
    /// out of its epoll set, and is idle all the same (one thread: its event
    /// loop is what serves).
    #[test]
    fn a_single_threaded_event_loop_without_its_listener_in_the_set_is_idle() {
        let w = watched(&[41, 42], &[6], &[8]);
        let mut holder = blocked(41, 41, SYS_EPOLL_WAIT, [8, 0x7000, 512, 500]);
        holder.epoll_listeners = EPOLL_WATCHES_LISTENER;
        let mut other = blocked(42, 42, SYS_EPOLL_WAIT, [8, 0x7000, 512, 500]);
        other.epoll_listeners = EPOLL_WATCHES_NO_LISTENER;
        assert_eq!(states(&[holder, other], &w), vec![(41, false), (42, false)]);
    }

    #[test]
    fn a_known_accept_lock_is_known_when_its_word_cannot_be_read() {
        let w = watched(&[21, 22, 23], &[3, 4], &[9]);
        let mut locks = Learnt::default();
        let unread = |mut samples: Vec<ThreadSample>| {
            for s in &mut samples[1..] {
                s.futex_word = 0;
                s.user_read_failed = 1;
            }
            samples
        };
        // Unknown yet: a waiter whose word is unread proves nothing.
        let first = process_states(&unread(apache_idle()), &w, &mut locks, &mut NoFiles);
        assert_eq!(
            busy_by_pid(&first),
            vec![(21, false), (22, true), (23, true)]
        );
        process_states(&apache_idle(), &w, &mut locks, &mut NoFiles);
        let later = process_states(&unread(apache_idle()), &w, &mut locks, &mut NoFiles);
        assert_eq!(
            busy_by_pid(&later),
            vec![(21, false), (22, false), (23, false)]
        );
    }

    #[test]
    fn a_shared_lock_held_by_a_serving_worker_is_not_an_accept_lock() {
        // php-fpm shape: 22 waits on a lock that busy worker 21 holds.
        let mut waiter = blocked(22, 22, SYS_FUTEX, [0x7f00_2000, FUTEX_WAIT, 2, 0]);
        waiter.futex_word = 21;
        let w = watched(&[21, 22], &[3], &[]);
        assert_eq!(
            states(&[running(21, 21), waiter], &w),
            vec![(21, true), (22, true)]
        );
    }

    #[test]
    fn private_futexes_are_never_accept_locks() {
        // The GIL, or any lock inside one process.
        let mut waiter = blocked(22, 22, SYS_FUTEX, [0x7f00_2000, FUTEX_WAIT | 128, 0, 0]);
        waiter.futex_word = 21;
        let listener = blocked(21, 21, SYS_ACCEPT4, [3, 0, 0, 0]);
        let w = watched(&[21, 22], &[3], &[]);
        assert_eq!(
            states(&[listener, waiter], &w),
            vec![(21, false), (22, true)]
        );
    }

    #[test]
    fn a_lock_of_another_pool_proves_nothing() {
        let mut waiter = blocked(22, 22, SYS_FUTEX, [0x7f00_2000, FUTEX_LOCK_PI, 0, 0]);
        waiter.futex_word = 21;
        let mut w = watched(&[21, 22], &[3], &[]);
        if let Some(x) = w.workers.get_mut(&21) {
            x.pool = POOL + 1;
        }
        let listener = blocked(21, 21, SYS_ACCEPT4, [3, 0, 0, 0]);
        assert_eq!(
            states(&[listener, waiter], &w),
            vec![(21, false), (22, true)]
        );
    }

    struct OneLockFile {
        holder: u32,
    }
    impl FileLocks for OneLockFile {
        fn file_of(&mut self, _: u32, fd: u32) -> Option<FileId> {
            (fd == 6).then_some(FileId { ino: 99 })
        }
        fn holders(&mut self, file: FileId) -> Vec<u32> {
            if file.ino == 99 {
                vec![self.holder]
            } else {
                vec![]
            }
        }
    }

    #[test]
    fn fcntl_and_flock_accept_locks_are_idle_when_the_holder_waits_for_work() {
        // Apache `Mutex fcntl` / `Mutex flock`: 21 holds the lock file and
        // polls the listeners; 22 waits in fcntl(F_SETLKW), 23 in flock(LOCK_EX).
        let w = watched(&[21, 22, 23], &[3, 4], &[9]);
        let samples = [
            blocked(21, 21, SYS_EPOLL_WAIT, [9, 0, 2, u64::MAX]),
            blocked(22, 22, SYS_FCNTL, [6, F_SETLKW, 0x7000, 0]),
            blocked(23, 23, SYS_FLOCK, [6, 2, 0, 0]),
        ];
        let mut locks = Learnt::default();
        let s = process_states(&samples, &w, &mut locks, &mut OneLockFile { holder: 21 });
        assert_eq!(busy_by_pid(&s), vec![(21, false), (22, false), (23, false)]);
        // Held by a process that is not waiting for work (a session lock).
        let mut fresh = Learnt::default();
        let s = process_states(
            &samples[1..],
            &w,
            &mut fresh,
            &mut OneLockFile { holder: 21 },
        );
        assert_eq!(busy_by_pid(&s), vec![(22, true), (23, true)]);
    }

    #[test]
    fn processes_are_told_apart_by_start_time_across_pid_reuse() {
        let mut old = blocked(11, 11, SYS_ACCEPT4, [3, 0, 0, 0]);
        old.start_ns = 5;
        let mut new = running(11, 11);
        new.start_ns = 9;
        let s = process_states(
            &[old, new],
            &watched(&[11], &[3], &[]),
            &mut Learnt::default(),
            &mut NoFiles,
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn unwatched_processes_are_left_out() {
        let s = states(&[running(99, 99)], &watched(&[11], &[3], &[]));
        assert!(s.is_empty());
    }

    /// A Puma 5.6 cluster worker (Ruby 3.1), recorded on 6.18 from
    /// /proc/PID/task/*/syscall, listener fd 5: its main thread and
    /// `puma wrkr check` in ppoll on pipes, `puma reactor` in epoll_wait on
    /// an epoll of client sockets, two helper threads and `puma stat pld`
    /// in timed futex waits (`0x89`, a timeout), `puma srv` in pselect6 on
    /// the listener, and pool threads `puma srv tp 00N`: parked on their
    /// condition variable (`0x189`, no timeout) while idle, in a timed
    /// futex wait (Ruby's `sleep`) while serving.
    fn puma_worker(pid: u32, pool_threads: &[bool]) -> Vec<ThreadSample> {
        let timed = |tid| {
            blocked(
                pid,
                tid,
                SYS_FUTEX,
                [0x5600_0000 + tid as u64, 0x89, 0, 0x7f00],
            )
        };
        let mut reactor = blocked(pid, pid + 2, SYS_EPOLL_WAIT, [12, 0x5600, 64, 59743]);
        reactor.epoll_listeners = EPOLL_WATCHES_NO_LISTENER;
        let mut srv = blocked(pid, pid + 6, SYS_PSELECT6, [14, 0x5600, 0, 0]);
        srv.polled_fds[0] = 5;
        let mut threads = vec![
            blocked(pid, pid, SYS_PPOLL, [0x7ffc, 2, 0, 0]),
            blocked(pid, pid + 1, SYS_PPOLL, [0x7f2c, 2, 0, 0]),
            reactor,
            timed(pid + 3),
            timed(pid + 4),
            timed(pid + 5),
            srv,
        ];
        for (i, serving) in pool_threads.iter().enumerate() {
            let tid = pid + 10 + i as u32;
            threads.push(if *serving {
                timed(tid)
            } else {
                blocked(pid, tid, SYS_FUTEX, [0x5600_0000 + tid as u64, 0x189, 0, 0])
            });
        }
        threads
    }

    fn idle_threads(states: &BTreeMap<ProcessKey, ProcessState>) -> Vec<(u32, bool, u32)> {
        states
            .iter()
            .map(|(k, s)| (k.pid, s.busy, s.idle_threads))
            .collect()
    }

    #[test]
    fn a_puma_worker_whose_only_thread_serves_is_busy_and_idle_at_rest() {
        let w = watched(&[30, 40], &[5], &[]);
        let mut learnt = Learnt::default();
        let mut pass = |samples: Vec<ThreadSample>| {
            idle_threads(&process_states(&samples, &w, &mut learnt, &mut NoFiles))
        };
        let at_rest = [puma_worker(30, &[false]), puma_worker(40, &[false])].concat();
        assert_eq!(pass(at_rest), vec![(30, false, 1), (40, false, 1)]);
        // `-t 1:1`: 30's thread serves, nothing waits: Puma's pool_capacity 0.
        let one_serving = [puma_worker(30, &[true]), puma_worker(40, &[false])].concat();
        assert_eq!(pass(one_serving), vec![(30, true, 0), (40, false, 1)]);
    }

    #[test]
    fn a_pool_thread_never_seen_parked_leaves_the_acceptor_to_go_by() {
        // A daemon that starts while the only pool thread serves cannot
        // tell it from a helper: the acceptor's wait says idle, as before
        // the thread was known.
        let w = watched(&[30], &[5], &[]);
        let s = process_states(
            &puma_worker(30, &[true]),
            &w,
            &mut Learnt::default(),
            &mut NoFiles,
        );
        assert_eq!(idle_threads(&s), vec![(30, false, 1)]);
    }

    #[test]
    fn a_pool_counts_the_threads_it_can_start_again() {
        // `-t 1:4` once a worker of the pool ran 4 threads: every worker
        // can start up to 4 (Puma's pool_capacity: waiting threads plus
        // the ones not started), whether it never grew or was trimmed.
        let w = watched(&[30, 40], &[5], &[]);
        let mut learnt = Learnt::default();
        let mut pass = |samples: Vec<ThreadSample>| {
            idle_threads(&process_states(&samples, &w, &mut learnt, &mut NoFiles))
        };
        let started = [puma_worker(30, &[false; 4]), puma_worker(40, &[false])].concat();
        assert_eq!(pass(started), vec![(30, false, 4), (40, false, 4)]);
        let partly = [
            puma_worker(30, &[true, false, false, false]),
            puma_worker(40, &[true, false]),
        ]
        .concat();
        assert_eq!(pass(partly), vec![(30, false, 3), (40, false, 3)]);
        let full = [puma_worker(30, &[true; 4]), puma_worker(40, &[true, true])].concat();
        assert_eq!(pass(full), vec![(30, true, 0), (40, false, 2)]);
    }

    /// gunicorn gthread `--threads 4`, all 4 pool threads serving: one is
    /// caught taking the GIL's mutex (`futex(…, FUTEX_WAIT_PRIVATE, 2,
    /// NULL)`), which is no free thread; one idle thread parks on the
    /// executor's queue (a semaphore: `FUTEX_WAIT_BITSET`).
    #[test]
    fn a_pool_thread_taking_a_contended_mutex_is_serving_not_parked() {
        let w = watched(&[70], &[5], &[9]);
        let mut learnt = Learnt::default();
        let mut main = blocked(70, 70, SYS_EPOLL_WAIT, [9, 0x7000, 4, 1000]);
        main.epoll_listeners = EPOLL_WATCHES_LISTENER;
        let queue = |tid| blocked(70, tid, SYS_FUTEX, [0x5500, 0x189, 0, 0]);
        let gil = |tid| blocked(70, tid, SYS_FUTEX, [0x9a40, 0x80, 2, 0]);
        let sleeping = |tid| blocked(70, tid, 230, [1, 0, 0x7100, 0]);
        let pass = |pool: Vec<ThreadSample>, learnt: &mut Learnt| {
            let s = process_states(&[vec![main], pool].concat(), &w, learnt, &mut NoFiles);
            idle_threads(&s)
        };
        let at_rest = (71..75).map(queue).collect();
        assert_eq!(pass(at_rest, &mut learnt), vec![(70, false, 4)]);
        let full = vec![gil(71), sleeping(72), sleeping(73), sleeping(74)];
        assert_eq!(pass(full, &mut learnt), vec![(70, true, 0)]);
        let one_free = vec![gil(71), sleeping(72), sleeping(73), queue(74)];
        assert_eq!(pass(one_free, &mut learnt), vec![(70, false, 1)]);
    }

    #[test]
    fn a_pool_reloaded_with_fewer_threads_forgets_the_old_workers_count() {
        // Workers 30 and 40 ran 4 threads each; a reload replaced them with
        // 50 and 60 of 1 thread (`-t 1:1`): 50 serving is full.
        let mut learnt = Learnt::default();
        let old = watched(&[30, 40], &[5], &[]);
        let before = [puma_worker(30, &[false; 4]), puma_worker(40, &[false; 4])].concat();
        process_states(&before, &old, &mut learnt, &mut NoFiles);
        let new = watched(&[50, 60], &[5], &[]);
        learnt.retain(&new);
        let rest = [puma_worker(50, &[false]), puma_worker(60, &[false])].concat();
        process_states(&rest, &new, &mut learnt, &mut NoFiles);
        let serving = [puma_worker(50, &[true]), puma_worker(60, &[false])].concat();
        let s = process_states(&serving, &new, &mut learnt, &mut NoFiles);
        assert_eq!(idle_threads(&s), vec![(50, true, 0), (60, false, 1)]);
    }

    #[test]
    fn a_worker_without_connections_whose_helper_thread_works_is_idle() {
        // A gunicorn sync worker waits in select on its listener; an error
        // reporter's thread parks on its queue, then sends. Holding no
        // connection, the worker is idle either way.
        let mut w = watched(&[30], &[5], &[]);
        if let Some(x) = w.workers.get_mut(&30) {
            x.holds_connections = false;
        }
        let mut learnt = Learnt::default();
        let mut select = blocked(30, 30, SYS_PSELECT6, [8, 0x7000, 0, 0]);
        select.polled_fds[0] = 5;
        let parked = blocked(30, 31, SYS_FUTEX, [0x5000, 0x189, 0, 0]);
        let sending = running(30, 31);
        for helper in [parked, sending] {
            let s = process_states(&[select, helper], &w, &mut learnt, &mut NoFiles);
            assert_eq!(idle_threads(&s), vec![(30, false, 1)]);
        }
    }

    /// The same worker with a connection: its thread on a CPU just out of
    /// `accept4` on the listener is leaving its wait (idle, its helper
    /// parked); once it reads the request (a syscall) or runs past a tick
    /// (an interrupt's "no syscall"), it serves (busy), and so it does
    /// while it wakes its helper.
    #[test]
    fn a_worker_serving_on_a_cpu_beside_a_parked_helper_is_busy() {
        let w = watched(&[30], &[5], &[]);
        let mut learnt = Learnt::default();
        let mut select = blocked(30, 30, SYS_PSELECT6, [8, 0x7000, 0, 0]);
        select.polled_fds[0] = 5;
        let parked = blocked(30, 31, SYS_FUTEX, [0x5000, 0x189, 0, 0]);
        process_states(&[select, parked], &w, &mut learnt, &mut NoFiles);
        let on_cpu = |syscall, args| ThreadSample {
            state: 0,
            ..blocked(30, 30, syscall, args)
        };
        let leaving = on_cpu(SYS_ACCEPT4, [5, 0, 0, 0x80800]);
        let reading = on_cpu(0, [9, 0x7100, 8192, 0]);
        let computing = on_cpu(-1, [0; 4]);
        let mut busy = |main, helper| {
            let s = process_states(&[main, helper], &w, &mut learnt, &mut NoFiles);
            busy_by_pid(&s)[0].1
        };
        assert_eq!(
            [
                busy(leaving, parked),
                busy(reading, parked),
                busy(computing, parked)
            ],
            [false, true, true]
        );
        // Serving, it wakes its helper (to send a report): nothing of it
        // is parked then.
        let waking = on_cpu(SYS_FUTEX, [0x5000, 0x81, 1, 0]);
        assert!(busy(waking, running(30, 31)));
    }

    #[test]
    fn threads_that_take_turns_at_the_listener_each_serve_what_they_take() {
        // uWSGI `--threads 3`: the thread holding its thread lock waits in
        // epoll on the listener, the others park on the lock or serve.
        let w = watched(&[50], &[3], &[9]);
        let mut learnt = Learnt::default();
        let epoll = |tid| {
            let mut s = blocked(50, tid, SYS_EPOLL_WAIT, [9, 0x7000, 1, u64::MAX]);
            s.epoll_listeners = EPOLL_WATCHES_LISTENER;
            s
        };
        let lock = |tid| blocked(50, tid, SYS_FUTEX, [0x6000, FUTEX_WAIT | 128, 2, 0]);
        let mut pass = |samples: Vec<ThreadSample>| {
            idle_threads(&process_states(&samples, &w, &mut learnt, &mut NoFiles))
        };
        // Not yet seen taking turns: a wait on a mutex may be a serving
        // thread's (CPython's GIL), so only the acceptor is known free.
        assert_eq!(
            pass(vec![epoll(50), lock(51), lock(52)]),
            vec![(50, false, 1)]
        );
        assert_eq!(
            pass(vec![running(50, 50), epoll(51), lock(52)]),
            vec![(50, false, 2)]
        );
        // Two of three serve; the third waits on the listener: free.
        assert_eq!(
            pass(vec![running(50, 50), running(50, 51), epoll(52)]),
            vec![(50, false, 1)]
        );
    }

    #[test]
    fn an_apache_worker_child_whose_listener_waits_for_an_idle_thread_is_busy() {
        // mpm_worker: the listener thread polls the listeners while a
        // worker thread is parked; with every worker serving it waits for
        // an idler on a condition variable, itself parked-looking.
        let w = watched(&[60], &[3], &[]);
        let mut learnt = Learnt::default();
        let mut poll = blocked(60, 61, SYS_POLL, [0x7000, 1, u64::MAX, 0]);
        poll.polled_fds[0] = 3;
        let parked = |tid| blocked(60, tid, SYS_FUTEX, [0x8000 + tid as u64, 0x189, 0, 0]);
        let mut pass = |samples: Vec<ThreadSample>| {
            idle_threads(&process_states(&samples, &w, &mut learnt, &mut NoFiles))
        };
        let main = blocked(60, 60, 0, [4, 0x7000, 1, 0]); // read() on the pod
        let at_rest = vec![main, poll, parked(62), parked(63)];
        assert_eq!(pass(at_rest), vec![(60, false, 2)]);
        let one_free = vec![main, poll, running(60, 62), parked(63)];
        assert_eq!(pass(one_free), vec![(60, false, 1)]);
        let full = vec![main, parked(61), running(60, 62), running(60, 63)];
        assert_eq!(pass(full), vec![(60, true, 0)]);
    }

    #[test]
    fn a_child_of_a_watched_master_is_sampled_as_a_worker_of_its_pool() {
        // gunicorn forked a worker since the last scrape: it is not in the
        // workers yet, but its master is.
        let mut w = watched(&[30], &[5], &[]);
        w.masters = workers(&[20], &[5], &[]);
        let mut newcomer = blocked(31, 31, SYS_PSELECT6, [8, 0x7000, 0, 0]);
        newcomer.polled_fds[0] = 5;
        newcomer.master_tgid = 20;
        let mut stranger = running(40, 40);
        stranger.master_tgid = 21;
        let samples = [running(30, 30), newcomer, stranger];
        assert_eq!(states(&samples, &w), vec![(30, true), (31, false)]);
    }
}
