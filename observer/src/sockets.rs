//! Stage 2 of the data path: names what the iterators read. A listener is a
//! TCP address and port or a Unix-domain path ([`ListenerId`]); each
//! listening socket behind it is a [`ListenSocket`]; and the
//! [`ListenerIndex`] finds the listener of an accepted connection from what
//! the kernel records on it. Pure logic, no I/O.
use std::{
    cmp::Ordering,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use foldhash::{HashMap, HashSet, HashSetExt};

use observer_common::{
    AF_INET, AF_INET6, AF_UNIX, HolderRecord, ListenerRecord, TCP_LISTEN, UNIX_PATH_BYTES,
    UnixListenKey, UnixNameRecord,
};

use crate::kernel::holders::Holding;

/// The name a Unix-domain socket is bound to: a filesystem path, or an
/// abstract name (first byte NUL). Kept as the kernel's bytes; [`fmt`]
/// renders it as `ss` does.
///
/// [`fmt`]: UnixPath::display
#[derive(Clone, Copy)]
pub struct UnixPath {
    len: u8,
    /// The name, then zeroes.
    bytes: [u8; UNIX_PATH_BYTES],
}

/// Equality, order and hash read the name's bytes only, not the unused
/// rest of the array (every listener id is compared and hashed many times
/// per collection). Ordered by length, then bytes.
impl PartialEq for UnixPath {
    fn eq(&self, other: &Self) -> bool {
        self.raw() == other.raw()
    }
}

impl Eq for UnixPath {}

impl PartialOrd for UnixPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UnixPath {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.len, self.raw()).cmp(&(other.len, other.raw()))
    }
}

impl std::hash::Hash for UnixPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw().hash(state);
    }
}

impl UnixPath {
    /// No path: the value TCP listeners carry.
    pub const NONE: UnixPath = UnixPath {
        len: 0,
        bytes: [0; UNIX_PATH_BYTES],
    };

    pub fn new(raw: &[u8]) -> UnixPath {
        let len = raw.len().min(UNIX_PATH_BYTES);
        let mut bytes = [0; UNIX_PATH_BYTES];
        bytes[..len].copy_from_slice(&raw[..len]);
        UnixPath {
            len: len as u8,
            bytes,
        }
    }

    fn from_record(name: &UnixNameRecord) -> UnixPath {
        UnixPath::new(&name.path[..(name.len as usize).min(UNIX_PATH_BYTES)])
    }

    pub fn raw(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn is_abstract(&self) -> bool {
        self.raw().first() == Some(&0)
    }

    /// As `ss` prints it: an abstract name as `@name` (every NUL in it as
    /// `@`, like /proc/net/unix), a path up to its first NUL. Bytes that are
    /// not printable UTF-8 are written `\xNN` and a backslash `\\`, so the
    /// text is a valid label value and names exactly one socket.
    pub fn display(&self) -> String {
        let raw = self.raw();
        let (prefix, body) = match raw.split_first() {
            Some((0, rest)) => ("@", rest),
            _ => ("", raw.split(|b| *b == 0).next().unwrap_or_default()),
        };
        let mut text = String::from(prefix);
        for chunk in body.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\0' => text.push('@'),
                    '\\' => text.push_str("\\\\"),
                    c if c.is_control() => {
                        let mut buf = [0; 4];
                        for b in c.encode_utf8(&mut buf).bytes() {
                            let _ = write!(text, "\\x{b:02x}");
                        }
                    }
                    c => text.push(c),
                }
            }
            for b in chunk.invalid() {
                let _ = write!(text, "\\x{b:02x}");
            }
        }
        text
    }
}

impl std::fmt::Debug for UnixPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

/// A listener: what the metrics' `addr`/`port` (TCP) or `path` (Unix)
/// labels name, with `netns`. Sockets sharing it (an SO_REUSEPORT group, or
/// a Unix socket unlinked while listening and its successor on the same
/// path) are reported together, and one by one in the per-socket series.
#[derive(Clone, Copy, Debug, Eq)]
pub struct ListenerId {
    pub netns: u32,
    /// `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub family: u16,
    /// TCP only (zero for Unix).
    pub addr: [u8; 16],
    /// TCP only (zero for Unix).
    pub port: u16,
    /// Unix only ([`UnixPath::NONE`] for TCP).
    pub path: UnixPath,
}

/// Equal when every field is, the small ones compared first.
impl PartialEq for ListenerId {
    fn eq(&self, other: &Self) -> bool {
        self.port == other.port
            && self.netns == other.netns
            && self.family == other.family
            && self.addr == other.addr
            && self.path == other.path
    }
}

/// The fields `eq` compares, the path by its bytes in use.
impl std::hash::Hash for ListenerId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.netns, self.family, self.addr, self.port).hash(state);
        self.path.hash(state);
    }
}

impl PartialOrd for ListenerId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The fields in their declared order (netns, family, addr, port, path),
/// the address compared as one number: a collection sorts and searches
/// 10,000 ids on a large host, and a derived order calls `memcmp` for each
/// address and path.
impl Ord for ListenerId {
    fn cmp(&self, other: &Self) -> Ordering {
        let key = |id: &ListenerId| (id.netns, id.family, u128::from_be_bytes(id.addr), id.port);
        key(self)
            .cmp(&key(other))
            .then_with(|| self.path.cmp(&other.path))
    }
}

/// What a stage keeps of each listener from one collection to the next,
/// sorted by listener. A collection goes through its listeners in id
/// order, so each finds its value at the next place, or by binary search
/// where it is new or out of order: no hashing and no tree of 136-byte ids
/// walked per listener (10,000 of them on a large host).
#[derive(Clone, Debug)]
pub struct ByListener<T> {
    entries: Vec<(ListenerId, T)>,
    /// Where the next listener's value is, when they come in order.
    next: usize,
}

impl<T> Default for ByListener<T> {
    fn default() -> Self {
        ByListener {
            entries: Vec::new(),
            next: 0,
        }
    }
}

impl<T: Default> ByListener<T> {
    /// From a collection's values, in any order (sorted here where they
    /// are not already).
    pub fn new(mut entries: Vec<(ListenerId, T)>) -> ByListener<T> {
        if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
            entries.sort_unstable_by_key(|(id, _)| *id);
        }
        ByListener { entries, next: 0 }
    }

    /// `listener`'s value, taken out (the default where it has none).
    pub fn take(&mut self, listener: &ListenerId) -> T {
        let at = match self.entries.get(self.next) {
            Some((id, _)) if id == listener => self.next,
            // Between the last taken and the next: it has none (most
            // listeners, where few have a value).
            next if next.is_none_or(|(id, _)| id > listener) && self.after_previous(listener) => {
                return T::default();
            }
            _ => match self.entries.binary_search_by(|(id, _)| id.cmp(listener)) {
                Ok(at) => at,
                Err(at) => {
                    self.next = at;
                    return T::default();
                }
            },
        };
        self.next = at + 1;
        std::mem::take(&mut self.entries[at].1)
    }

    /// Whether `listener` comes after the entry before the next one (or
    /// there is none before it).
    fn after_previous(&self, listener: &ListenerId) -> bool {
        match self.next.checked_sub(1) {
            Some(previous) => self.entries[previous].0 < *listener,
            None => true,
        }
    }

    pub fn get(&self, listener: &ListenerId) -> Option<&T> {
        let at = self
            .entries
            .binary_search_by(|(id, _)| id.cmp(listener))
            .ok()?;
        Some(&self.entries[at].1)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|(_, value)| value)
    }

    /// Keeps the listeners whose value `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.entries.retain(|(_, value)| keep(value));
        self.next = 0;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl ListenerId {
    pub fn tcp(netns: u32, family: u16, addr: [u8; 16], port: u16) -> ListenerId {
        ListenerId {
            netns,
            family,
            addr,
            port,
            path: UnixPath::NONE,
        }
    }

    pub fn unix(netns: u32, path: UnixPath) -> ListenerId {
        ListenerId {
            netns,
            family: AF_UNIX,
            addr: [0; 16],
            port: 0,
            path,
        }
    }

    pub fn is_unix(&self) -> bool {
        self.family == AF_UNIX
    }

    /// The IP address of a TCP listener.
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

    /// As `ss` shows the local address: `127.0.0.1:80`, `[::]:80`, or
    /// the Unix path.
    pub fn local_address(&self) -> String {
        match self.family {
            AF_UNIX => self.path.display(),
            AF_INET => format!("{}:{}", self.ip(), self.port),
            _ => format!("[{}]:{}", self.ip(), self.port),
        }
    }
}

/// How long the connection at the head of a socket's queue has waited, as
/// the kernel lets us know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueHead {
    /// From the head's queue-entry stamp, µs (0 when empty): the kernel's
    /// for TCP, our connect program's for Unix.
    Waited { us: u64 },
    /// Unix, when the head has no stamp (it was queued before the daemon
    /// started, or no connect program runs): the head connection's kernel
    /// address, for the daemon to time it (0 when empty).
    Unix { head: u64 },
}

/// One listening socket as read at this collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSocket {
    pub id: ListenerId,
    /// Its inode (`socket:[N]`), 0 when no process holds it.
    pub inode: u64,
    pub queue_len: u32,
    pub queue_max: u32,
    pub syn_queue_len: u32,
    /// Connections it lost (see `ListenerRecord::drops`).
    pub drops: u32,
    /// TCP_DEFER_ACCEPT is on: its `sk_drops` holds a bare ACK per
    /// handshake besides real drops.
    pub defer_accept: bool,
    pub head: QueueHead,
    /// Unix: what its accepted connections carry to name it.
    pub unix_key: Option<UnixListenKey>,
}

impl ListenSocket {
    /// A TCP listener from `iter/tcp`.
    pub fn from_tcp_record(r: &ListenerRecord) -> ListenSocket {
        ListenSocket {
            id: ListenerId::tcp(r.netns, r.family, r.addr, r.port),
            inode: r.inode,
            queue_len: r.queue_len,
            queue_max: r.queue_max,
            syn_queue_len: r.syn_queue_len,
            drops: r.drops,
            defer_accept: r.defer_accept != 0,
            head: QueueHead::Waited {
                us: r.oldest_wait_us,
            },
            unix_key: None,
        }
    }

    /// A listener that a process holds; `None` for held connections.
    pub fn from_holding(h: &Holding) -> Option<ListenSocket> {
        let r = &h.record;
        if r.state != TCP_LISTEN {
            return None;
        }
        if r.family == AF_UNIX {
            let name = h.unix_name.as_ref()?;
            return Some(ListenSocket {
                id: ListenerId::unix(r.netns, UnixPath::from_record(name)),
                inode: r.inode,
                queue_len: r.queue_len,
                queue_max: r.queue_max,
                syn_queue_len: 0,
                drops: 0,
                defer_accept: false,
                head: match r.oldest_wait_us {
                    0 => QueueHead::Unix { head: r.queue_head },
                    us => QueueHead::Waited { us },
                },
                unix_key: Some(unix_key(&r.addr)),
            });
        }
        Some(ListenSocket {
            id: ListenerId::tcp(r.netns, r.family, r.addr, r.port),
            inode: r.inode,
            queue_len: r.queue_len,
            queue_max: r.queue_max,
            syn_queue_len: r.syn_queue_len,
            drops: r.drops,
            defer_accept: r.defer_accept != 0,
            head: QueueHead::Waited {
                us: r.oldest_wait_us,
            },
            unix_key: None,
        })
    }
}

/// The [`UnixListenKey`] in the first 8 bytes of a record's `addr`.
pub fn unix_key(addr: &[u8; 16]) -> UnixListenKey {
    let mut key = [0; 8];
    key.copy_from_slice(&addr[..8]);
    UnixListenKey::from_ne_bytes(key)
}

/// Every listening socket: those of the daemon's namespace (`iter/tcp`,
/// which also sees kernel-owned TCP listeners) and those held by any process
/// in any namespace (`iter/task_file`), once each (by socket inode).
pub fn listen_sockets(own_netns: &[ListenerRecord], holdings: &[Holding]) -> Vec<ListenSocket> {
    // Sized once for both (10,000 listeners each way on a large host).
    let mut seen: HashSet<u64> = HashSet::with_capacity(own_netns.len() + holdings.len());
    seen.extend(own_netns.iter().map(|l| l.inode).filter(|i| *i != 0));
    let mut sockets: Vec<ListenSocket> = own_netns
        .iter()
        .filter(|r| r.family == AF_INET || r.family == AF_INET6)
        .map(ListenSocket::from_tcp_record)
        .collect();
    for socket in holdings.iter().filter_map(ListenSocket::from_holding) {
        if seen.insert(socket.inode) {
            sockets.push(socket);
        }
    }
    sockets
}

/// Finds the listener of an accepted connection from what the kernel
/// records on it: its local address (TCP) or its listener's key (Unix).
#[derive(Clone, Debug, Default)]
pub struct ListenerIndex {
    /// Every listener, sorted (a collection builds it from its views, which
    /// are: no hashing of 10,000 ids per scrape for a few lookups).
    present: Vec<ListenerId>,
    unix: HashMap<(u32, UnixListenKey), ListenerId>,
}

impl ListenerIndex {
    pub fn new(sockets: &[ListenSocket]) -> ListenerIndex {
        let mut ids: Vec<ListenerId> = sockets.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ListenerIndex::from_sorted(ids, sockets)
    }

    /// The index of `sockets`, whose listeners are `ids` (sorted, once each).
    pub fn from_sorted(ids: Vec<ListenerId>, sockets: &[ListenSocket]) -> ListenerIndex {
        debug_assert!(ids.windows(2).all(|w| w[0] < w[1]));
        ListenerIndex {
            present: ids,
            unix: sockets
                .iter()
                .filter_map(|s| Some(((s.id.netns, s.unix_key?), s.id)))
                .collect(),
        }
    }

    pub fn contains(&self, id: &ListenerId) -> bool {
        self.present.binary_search(id).is_ok()
    }

    /// The listener of a connection whose record says `netns`, `family`,
    /// `addr` and `port` (an `AcceptKey`'s or a `HolderRecord`'s fields).
    pub fn listener_of(
        &self,
        netns: u32,
        family: u16,
        addr: &[u8; 16],
        port: u16,
    ) -> Option<ListenerId> {
        if family == AF_UNIX {
            return self.unix.get(&(netns, unix_key(addr))).copied();
        }
        self.tcp_listener_of(ListenerId::tcp(netns, family, *addr, port))
    }

    /// The listener bound to exactly the child's local address, else the
    /// wildcard listener on that port (for IPv4 children of a dual-stack
    /// `[::]` listener, the child is an IPv6 socket with a v4-mapped address).
    fn tcp_listener_of(&self, child: ListenerId) -> Option<ListenerId> {
        if self.contains(&child) {
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
            if self.contains(&as_v4) {
                return Some(as_v4);
            }
        }
        let wildcard = ListenerId {
            addr: [0; 16],
            ..child
        };
        self.contains(&wildcard).then_some(wildcard)
    }

    /// The listener of a held connection.
    pub fn listener_of_held(&self, r: &HolderRecord) -> Option<ListenerId> {
        self.listener_of(r.netns, r.family, &r.addr, r.port)
    }
}

fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_listener_finds_each_value_in_order_out_of_order_and_none_between() {
        let port = |port: u16| ListenerId::tcp(1, AF_INET, [0; 16], port);
        let kept = || ByListener::new(vec![(port(30), 3), (port(10), 1), (port(20), 2)]);
        // In order, with listeners that have none before, between and after.
        let mut values = kept();
        let seen: Vec<u32> = [5, 10, 15, 20, 25, 30, 35]
            .into_iter()
            .map(|p| values.take(&port(p)))
            .collect();
        assert_eq!(seen, [0, 1, 0, 2, 0, 3, 0]);
        // Out of order, and again once taken.
        let mut values = kept();
        assert_eq!(values.take(&port(30)), 3);
        assert_eq!(values.take(&port(10)), 1);
        assert_eq!(values.take(&port(15)), 0);
        assert_eq!(values.take(&port(20)), 2);
        assert_eq!(values.take(&port(20)), 0);
        assert_eq!(kept().get(&port(20)), Some(&2));
        assert_eq!(kept().get(&port(25)), None);
    }

    #[test]
    fn listener_ids_order_and_equal_field_by_field_as_declared() {
        let v4 = |a: u8, port: u16| {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&[127, 0, 0, a]);
            ListenerId::tcp(7, AF_INET, addr, port)
        };
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let ids = [
            v4(1, 80),
            v4(1, 81),
            v4(2, 79),
            v4(255, 1),
            ListenerId::tcp(6, AF_INET, [9; 16], 9),
            ListenerId::tcp(7, AF_INET6, v6, 80),
            ListenerId::tcp(7, AF_INET6, [0; 16], 80),
            ListenerId::unix(7, UnixPath::new(b"/run/a.sock")),
            ListenerId::unix(7, UnixPath::new(b"/run/b")),
            ListenerId::unix(7, UnixPath::new(b"\0abstract")),
        ];
        let fields = |id: &ListenerId| {
            let path = id.path.raw();
            (
                id.netns,
                id.family,
                id.addr,
                id.port,
                path.len(),
                path.to_vec(),
            )
        };
        for a in &ids {
            for b in &ids {
                assert_eq!(a.cmp(b), fields(a).cmp(&fields(b)), "{a:?} vs {b:?}");
                assert_eq!(a == b, fields(a) == fields(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn unix_paths_display_like_ss_and_stay_valid_labels() {
        assert_eq!(
            UnixPath::new(b"/run/gunicorn.sock").display(),
            "/run/gunicorn.sock"
        );
        // bind() with the terminating NUL counted in the length.
        assert_eq!(UnixPath::new(b"/run/php.sock\0").display(), "/run/php.sock");
        assert_eq!(UnixPath::new(b"\0uwsgi").display(), "@uwsgi");
        assert_eq!(UnixPath::new(b"\0a\0b").display(), "@a@b");
        assert_eq!(UnixPath::new(b"/tmp/a b\"c").display(), "/tmp/a b\"c");
        assert_eq!(UnixPath::new(b"/tmp/\xff\xfe").display(), "/tmp/\\xff\\xfe");
        assert_eq!(
            UnixPath::new(b"/tmp/new\nline").display(),
            "/tmp/new\\x0aline"
        );
        assert_eq!(
            UnixPath::new(b"/tmp/back\\slash").display(),
            "/tmp/back\\\\slash"
        );
        assert_eq!(UnixPath::new("/tmp/é".as_bytes()).display(), "/tmp/é");
        let long = [b'x'; 200];
        assert_eq!(UnixPath::new(&long).raw().len(), UNIX_PATH_BYTES);
    }

    #[test]
    fn local_addresses_read_like_ss() {
        let mut v4 = [0; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(
            ListenerId::tcp(1, AF_INET, v4, 80).local_address(),
            "127.0.0.1:80"
        );
        assert_eq!(
            ListenerId::tcp(1, AF_INET6, [0; 16], 80).local_address(),
            "[::]:80"
        );
        let unix = ListenerId::unix(1, UnixPath::new(b"\0x"));
        assert_eq!(unix.local_address(), "@x");
        assert!(unix.is_unix());
    }

    fn unix_socket(path: &[u8], key: u64) -> ListenSocket {
        ListenSocket {
            id: ListenerId::unix(7, UnixPath::new(path)),
            inode: key,
            queue_len: 0,
            queue_max: 128,
            syn_queue_len: 0,
            drops: 0,
            defer_accept: false,
            head: QueueHead::Unix { head: 0 },
            unix_key: Some(key),
        }
    }

    #[test]
    fn a_unix_head_with_a_connect_stamp_has_waited_and_one_without_is_left_to_time() {
        let holding = |oldest_wait_us| Holding {
            record: HolderRecord {
                family: AF_UNIX,
                state: TCP_LISTEN,
                queue_len: 1,
                queue_head: 0xffff_8881_0000_3000,
                oldest_wait_us,
                ..HolderRecord::default()
            },
            unix_name: Some(UnixNameRecord::default()),
        };
        let head = |h: &Holding| ListenSocket::from_holding(h).map(|s| s.head);
        assert_eq!(
            head(&holding(250_000)),
            Some(QueueHead::Waited { us: 250_000 })
        );
        assert_eq!(
            head(&holding(0)),
            Some(QueueHead::Unix {
                head: 0xffff_8881_0000_3000
            })
        );
    }

    #[test]
    fn unix_connections_find_their_listener_by_its_key_within_the_netns() {
        let sockets = [
            unix_socket(b"/a", 0xffff_8881_0000_1000),
            unix_socket(b"/b", 0xffff_8881_0000_2000),
        ];
        let index = ListenerIndex::new(&sockets);
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&0xffff_8881_0000_2000u64.to_ne_bytes());
        assert_eq!(index.listener_of(7, AF_UNIX, &addr, 0), Some(sockets[1].id));
        assert_eq!(index.listener_of(8, AF_UNIX, &addr, 0), None);
    }

    #[test]
    fn tcp_children_find_wildcard_and_dual_stack_listeners() {
        let wildcard = ListenSocket {
            unix_key: None,
            head: QueueHead::Waited { us: 0 },
            ..unix_socket(b"", 1)
        };
        let wildcard = ListenSocket {
            id: ListenerId::tcp(7, AF_INET6, [0; 16], 8080),
            ..wildcard
        };
        let index = ListenerIndex::new(&[wildcard]);
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(
            index.listener_of(7, AF_INET6, &mapped, 8080),
            Some(wildcard.id)
        );
        assert_eq!(index.listener_of(7, AF_INET6, &mapped, 8081), None);
    }
}
