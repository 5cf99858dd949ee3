//! The holder walk's output (`iter/task_file`, see `observer-ebpf`'s
//! `holders.rs`): the sockets each process holds, and the processes that
//! hold their parent's listeners by inheritance, which the walk counts
//! instead of writing them out (1,000 workers that inherited 10,000
//! listeners are 1,000 records, not 10 million).
//!
//! A worker's count is checked against its parent's inheritable records:
//! equal, it holds every one of them, at the parent's fds. Short (it closed
//! some, its parent opened more since the fork, or the walk's count was
//! cut), the ones it misses are read from /proc: its open fds, and those of
//! them that are the parent's, checked by inode. Either way it is an
//! [`Inheritor`], with the parent's fds it misses; a short child's are kept
//! ([`ShortChildren`]) and read again only when its count or its parent's
//! changes, so that 1,000 workers each missing one of their master's
//! 10,000 listeners cost /proc reads once, not at every scrape.
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt as _, HashSet};
use observer_common::{AF_UNIX, HolderRecord, INHERITED_LISTENERS, TCP_LISTEN, UnixNameRecord};

/// One socket a process holds, with the path of a Unix listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    pub record: HolderRecord,
    /// Unix listeners only: the record that follows theirs.
    pub unix_name: Option<UnixNameRecord>,
}

/// A process that holds its parent's inheritable listeners
/// ([`HolderRecord::inheritable`]) at the parent's fds, but `missing`, and
/// whose own records do not repeat them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inheritor {
    pub pid: u32,
    pub ppid: u32,
    pub comm: [u8; 16],
    /// The parent's inheritable fds it does not hold, sorted (most often
    /// none).
    pub missing: Arc<[u32]>,
}

/// What one holder walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HolderWalk {
    /// Sockets written out, each with its holder.
    pub holdings: Vec<Holding>,
    /// Processes holding their parent's inheritable listeners as well.
    pub inheritors: Vec<Inheritor>,
}

/// What the daemon reads of a process whose inherited count falls short of
/// its parent's (from /proc).
pub trait ProcessFds {
    /// Its open fds.
    fn open_fds(&self, pid: u32) -> Vec<u32>;
    /// The inode of the file open as `fd`.
    fn inode_at(&self, pid: u32, fd: u32) -> Option<u64>;
}

/// The fds short children miss, kept from one walk to the next while each
/// child's count and its parent's number of inheritable listeners stay the
/// same; forgotten with the child.
#[derive(Debug, Default)]
pub struct ShortChildren {
    known: HashMap<u32, ShortChild>,
}

#[derive(Debug)]
struct ShortChild {
    ppid: u32,
    counted: u32,
    inheritable: usize,
    missing: Arc<[u32]>,
}

impl HolderWalk {
    /// The walk's records with every inherited count resolved; `short`
    /// keeps what /proc said of short children for the next walk.
    pub fn resolve(raw: RawWalk, short: &mut ShortChildren, proc: &impl ProcessFds) -> HolderWalk {
        let RawWalk {
            holdings,
            inherited,
        } = raw;
        // Each parent's inheritable records: fd and inode, sorted by fd.
        let mut inheritable: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        for h in &holdings {
            if h.record.state == TCP_LISTEN && h.record.inheritable != 0 {
                let fds = inheritable.entry(h.record.tgid).or_default();
                fds.push((h.record.fd, h.record.inode));
            }
        }
        for fds in inheritable.values_mut() {
            fds.sort_unstable();
            fds.dedup_by_key(|(fd, _)| *fd);
        }
        let none: Arc<[u32]> = Arc::from([]);
        let mut inheritors = Vec::with_capacity(inherited.len());
        let mut still_short = HashSet::default();
        for child in inherited {
            // A parent of none shown: nothing to inherit.
            let Some(parents) = inheritable.get(&child.ppid) else {
                continue;
            };
            let missing = if child.listeners as usize == parents.len() {
                none.clone()
            } else {
                still_short.insert(child.pid);
                short.missing(&child, parents, proc)
            };
            inheritors.push(Inheritor {
                pid: child.pid,
                ppid: child.ppid,
                comm: child.comm,
                missing,
            });
        }
        short.known.retain(|pid, _| still_short.contains(pid));
        HolderWalk {
            holdings,
            inheritors,
        }
    }
}

impl ShortChildren {
    /// The parent's fds (`parents`: fd and inode) that `child` does not
    /// hold: as found before, or read from /proc now.
    fn missing(
        &mut self,
        child: &InheritedCount,
        parents: &[(u32, u64)],
        proc: &impl ProcessFds,
    ) -> Arc<[u32]> {
        if let Some(known) = self.known.get(&child.pid)
            && known.ppid == child.ppid
            && known.counted == child.listeners
            && known.inheritable == parents.len()
        {
            return known.missing.clone();
        }
        let open: HashSet<u32> = proc.open_fds(child.pid).into_iter().collect();
        let holds = |(fd, inode): &(u32, u64)| {
            open.contains(fd) && proc.inode_at(child.pid, *fd) == Some(*inode)
        };
        let missing: Arc<[u32]> = parents
            .iter()
            .filter(|parent| !holds(parent))
            .map(|(fd, _)| *fd)
            .collect();
        let known = ShortChild {
            ppid: child.ppid,
            counted: child.listeners,
            inheritable: parents.len(),
            missing: missing.clone(),
        };
        self.known.insert(child.pid, known);
        missing
    }
}

/// A process's inherited count, as the walk wrote it (added up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InheritedCount {
    pub pid: u32,
    pub ppid: u32,
    pub comm: [u8; 16],
    pub listeners: u32,
}

/// The walk's records, before the inherited counts are checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawWalk {
    pub holdings: Vec<Holding>,
    /// One per process, by pid.
    pub inherited: Vec<InheritedCount>,
}

/// Splits the holder iterator's output: fixed-size [`HolderRecord`]s, each
/// Unix listener's followed by its [`UnixNameRecord`], and the inherited
/// counts ([`INHERITED_LISTENERS`]), added up per process. A cut-off tail
/// is dropped.
pub fn parse(bytes: &[u8]) -> RawWalk {
    let mut holdings = Vec::new();
    let mut inherited: HashMap<u32, InheritedCount> = HashMap::new();
    let mut rest = bytes;
    while let Some(record) = take_record::<HolderRecord>(&mut rest) {
        if record.state == INHERITED_LISTENERS {
            inherited
                .entry(record.tgid)
                .or_insert(InheritedCount {
                    pid: record.tgid,
                    ppid: record.ppid,
                    comm: record.comm,
                    listeners: 0,
                })
                .listeners += record.inherited;
            continue;
        }
        let unix_name = if record.family == AF_UNIX && record.state == TCP_LISTEN {
            match take_record::<UnixNameRecord>(&mut rest) {
                Some(name) => Some(name),
                None => break,
            }
        } else {
            None
        };
        holdings.push(Holding { record, unix_name });
    }
    let mut inherited: Vec<InheritedCount> = inherited.into_values().collect();
    inherited.sort_unstable_by_key(|c| c.pid);
    RawWalk {
        holdings,
        inherited,
    }
}

/// Takes one `T` off the front of `bytes`.
pub fn take_record<T: aya::Pod>(bytes: &mut &[u8]) -> Option<T> {
    let size = std::mem::size_of::<T>();
    if bytes.len() < size {
        return None;
    }
    // SAFETY: `T` is plain old data and `size` bytes are there.
    let value = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) };
    *bytes = &bytes[size..];
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::AF_INET;

    fn listener(tgid: u32, ppid: u32, fd: u32, inode: u64, inheritable: bool) -> Holding {
        Holding {
            record: HolderRecord {
                tgid,
                ppid,
                fd,
                family: AF_INET,
                port: 8000 + fd as u16,
                state: TCP_LISTEN,
                inheritable: inheritable as u8,
                inode,
                ..Default::default()
            },
            unix_name: None,
        }
    }

    fn count(pid: u32, ppid: u32, listeners: u32) -> HolderRecord {
        HolderRecord {
            tgid: pid,
            ppid,
            state: INHERITED_LISTENERS,
            inherited: listeners,
            ..Default::default()
        }
    }

    /// A process table: each pid's open fds, with their inodes.
    struct Fds(Vec<(u32, u32, u64)>);

    impl ProcessFds for Fds {
        fn open_fds(&self, pid: u32) -> Vec<u32> {
            self.0.iter().filter(|f| f.0 == pid).map(|f| f.1).collect()
        }
        fn inode_at(&self, pid: u32, fd: u32) -> Option<u64> {
            self.0.iter().find(|f| (f.0, f.1) == (pid, fd)).map(|f| f.2)
        }
    }

    /// A process table that must not be read.
    struct Unread;

    impl ProcessFds for Unread {
        fn open_fds(&self, _: u32) -> Vec<u32> {
            panic!("no /proc read needed")
        }
        fn inode_at(&self, _: u32, _: u32) -> Option<u64> {
            panic!("no /proc read needed")
        }
    }

    fn bytes(records: &[HolderRecord]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| {
                // SAFETY: a plain `#[repr(C)]` record without implicit padding.
                let raw = unsafe {
                    std::slice::from_raw_parts(
                        r as *const HolderRecord as *const u8,
                        std::mem::size_of::<HolderRecord>(),
                    )
                };
                raw.to_vec()
            })
            .collect()
    }

    #[test]
    fn a_process_counts_written_in_pieces_are_added_up() {
        let raw = parse(&bytes(&[
            listener(10, 1, 3, 100, true).record,
            count(11, 10, 1),
            count(12, 10, 1),
            count(11, 10, 2),
        ]));
        assert_eq!(raw.holdings.len(), 1);
        let counts: Vec<(u32, u32)> = raw.inherited.iter().map(|c| (c.pid, c.listeners)).collect();
        assert_eq!(counts, vec![(11, 3), (12, 1)]);
    }

    #[test]
    fn a_child_whose_count_matches_its_parent_holds_every_inheritable_listener() {
        let raw = parse(&bytes(&[
            listener(10, 1, 3, 100, true).record,
            listener(10, 1, 4, 101, true).record,
            // Held first by another process: not the child's to inherit.
            listener(10, 1, 5, 102, false).record,
            count(11, 10, 2),
        ]));
        let walk = HolderWalk::resolve(raw, &mut ShortChildren::default(), &Unread);
        assert_eq!(walk.holdings.len(), 3);
        assert_eq!(walk.inheritors.len(), 1);
        let child = &walk.inheritors[0];
        assert_eq!((child.pid, child.ppid), (11, 10));
        assert!(child.missing.is_empty());
    }

    #[test]
    fn a_short_child_misses_what_proc_says_it_does_not_hold_read_once() {
        let raw = parse(&bytes(&[
            listener(10, 1, 3, 100, true).record,
            listener(10, 1, 4, 101, true).record,
            listener(10, 1, 5, 102, true).record,
            count(11, 10, 1),
        ]));
        // The child closed fds 3 and 5 and keeps fd 4; another file took
        // fd 5's number; fd 7 is one of its own.
        let child = Fds(vec![(11, 0, 1), (11, 4, 101), (11, 5, 999), (11, 7, 7)]);
        let mut short = ShortChildren::default();
        let walk = HolderWalk::resolve(raw.clone(), &mut short, &child);
        assert_eq!(walk.holdings.len(), 3, "no record for the child's");
        assert_eq!(&walk.inheritors[0].missing[..], [3, 5]);
        // The next walk, with the same counts: not read again.
        let again = HolderWalk::resolve(raw.clone(), &mut short, &Unread);
        assert_eq!(again.inheritors, walk.inheritors);
        // Its count changed: read again.
        let mut changed = raw;
        changed.inherited[0].listeners = 2;
        let child = Fds(vec![(11, 3, 100), (11, 4, 101)]);
        let walk = HolderWalk::resolve(changed, &mut short, &child);
        assert_eq!(&walk.inheritors[0].missing[..], [5]);
    }

    #[test]
    fn a_short_child_that_is_gone_is_forgotten() {
        let raw = parse(&bytes(&[
            listener(10, 1, 3, 100, true).record,
            listener(10, 1, 4, 101, true).record,
            count(11, 10, 1),
        ]));
        let mut short = ShortChildren::default();
        let child = Fds(vec![(11, 3, 100)]);
        HolderWalk::resolve(raw, &mut short, &child);
        assert_eq!(short.known.len(), 1);
        let gone = parse(&bytes(&[listener(10, 1, 3, 100, true).record]));
        HolderWalk::resolve(gone, &mut short, &Unread);
        assert!(short.known.is_empty());
    }

    #[test]
    fn a_cut_off_tail_is_dropped() {
        let mut raw = bytes(&[listener(10, 1, 3, 100, true).record, count(11, 10, 1)]);
        raw.truncate(raw.len() - 1);
        let walk = parse(&raw);
        assert_eq!(walk.holdings.len(), 1);
        assert!(walk.inherited.is_empty());
    }
}
