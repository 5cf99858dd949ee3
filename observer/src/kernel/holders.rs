//! The holder walk's output (`iter/task_file`, see `observer-ebpf`'s
//! `holders.rs`): the sockets each process holds, and the processes that
//! hold their parent's listeners by inheritance, which the walk counts
//! instead of writing them out (1,000 workers that inherited 10,000
//! listeners are 1,000 records, not 10 million).
//!
//! A worker's count is checked against its parent's inheritable records:
//! equal, it holds every one of them, at the parent's fds (an
//! [`Inheritor`]); short (it closed some, or the walk's count was cut),
//! the ones it holds are read from /proc and written out as its own: its
//! open fds, and those of them that are the parent's fds, checked by inode
//! (a child that kept one of a parent's 10,000 listeners costs a listing of
//! its few fds and one check, not 10,000).
use foldhash::{HashMap, HashMapExt as _};
use observer_common::{AF_UNIX, HolderRecord, INHERITED_LISTENERS, TCP_LISTEN, UnixNameRecord};

/// One socket a process holds, with the path of a Unix listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    pub record: HolderRecord,
    /// Unix listeners only: the record that follows theirs.
    pub unix_name: Option<UnixNameRecord>,
}

/// A process that holds every inheritable listener of its parent
/// ([`HolderRecord::inheritable`]), at the parent's fds, and whose own
/// records do not repeat them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inheritor {
    pub pid: u32,
    pub ppid: u32,
    pub comm: [u8; 16],
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

impl HolderWalk {
    /// The walk's records with every inherited count resolved.
    pub fn resolve(raw: RawWalk, proc: &impl ProcessFds) -> HolderWalk {
        let RawWalk {
            mut holdings,
            inherited,
        } = raw;
        // Each parent's inheritable records, by fd.
        let mut inheritable: HashMap<u32, HashMap<u32, usize>> = HashMap::new();
        for (at, h) in holdings.iter().enumerate() {
            if h.record.state == TCP_LISTEN && h.record.inheritable != 0 {
                let fds = inheritable.entry(h.record.tgid).or_default();
                fds.insert(h.record.fd, at);
            }
        }
        let none = HashMap::new();
        let mut inheritors = Vec::new();
        let mut own_copies = Vec::new();
        for child in inherited {
            let parents = inheritable.get(&child.ppid).unwrap_or(&none);
            if child.listeners as usize == parents.len() {
                inheritors.push(Inheritor {
                    pid: child.pid,
                    ppid: child.ppid,
                    comm: child.comm,
                });
                continue;
            }
            for fd in proc.open_fds(child.pid) {
                let Some(at) = parents.get(&fd) else {
                    continue;
                };
                let parent = holdings[*at];
                if proc.inode_at(child.pid, fd) != Some(parent.record.inode) {
                    continue;
                }
                let mut copy = parent;
                copy.record.tgid = child.pid;
                copy.record.ppid = child.ppid;
                copy.record.comm = child.comm;
                copy.record.inheritable = 0;
                own_copies.push(copy);
            }
        }
        holdings.extend(own_copies);
        inheritors.sort_unstable_by_key(|i| i.pid);
        HolderWalk {
            holdings,
            inheritors,
        }
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
        let walk = HolderWalk::resolve(raw, &Unread);
        assert_eq!(walk.holdings.len(), 3);
        assert_eq!(walk.inheritors.len(), 1);
        assert_eq!((walk.inheritors[0].pid, walk.inheritors[0].ppid), (11, 10));
    }

    #[test]
    fn a_child_short_of_its_parent_is_read_from_proc_fd_by_fd() {
        let raw = parse(&bytes(&[
            listener(10, 1, 3, 100, true).record,
            listener(10, 1, 4, 101, true).record,
            listener(10, 1, 5, 102, true).record,
            count(11, 10, 1),
        ]));
        // The child closed fds 3 and 5 and keeps fd 4; another file took
        // fd 5's number; fd 7 is one of its own.
        let child = Fds(vec![(11, 0, 1), (11, 4, 101), (11, 5, 999), (11, 7, 7)]);
        let walk = HolderWalk::resolve(raw, &child);
        assert!(walk.inheritors.is_empty());
        let own: Vec<(u32, u32, u64, u8)> = walk
            .holdings
            .iter()
            .filter(|h| h.record.tgid == 11)
            .map(|h| {
                (
                    h.record.ppid,
                    h.record.fd,
                    h.record.inode,
                    h.record.inheritable,
                )
            })
            .collect();
        assert_eq!(own, vec![(10, 4, 101, 0)]);
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
