//! Stage 4a: Prometheus exposition. Writes a [`Snapshot`] and the daemon's
//! own health as the Prometheus text format, straight into one buffer: each
//! listener's label set is rendered once per scrape, and no series is built
//! as an object first (at 10,000 listeners, building and encoding protobuf
//! families took 100 ms of a 300 ms scrape; see BENCHMARKS.md).
//!
//! What is exported for whom: every listener gets the core series (queue
//! length and limit, accepted, queued and dropped totals) and, with the
//! workers collector, its pool's busy/idle counts; a listener that had
//! traffic since the daemon started ([`ListenerView::had_traffic`]) gets the
//! rest (oldest wait, SYN queue, socket count, the wait histogram, per-worker
//! and per-socket series). A quiet listener's would all be zero.
use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Context as _, Result};
use observer_common::WAIT_BUCKET_BOUNDS_US;
use prometheus::{Encoder as _, TextEncoder, proto::MetricFamily};

use crate::{
    aggregate::{Collection, ListenerView, SocketView, Waits},
    collectors::Collectors,
    containers::ContainerInfo,
    pipeline::{DaemonHealth, Snapshot},
    sockets::ListenerId,
    workers::{PoolView, Pools, VacantSlot, WorkerView},
};

type Containers = foldhash::HashMap<ListenerId, ContainerInfo>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label value escaped for the text format (`\`, `"`, newline).
fn escape_into(out: &mut String, value: &str) {
    // Most values (addresses, ports, names) need no escape: one copy.
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `name="value"` pairs, comma-separated, as they go between braces.
#[derive(Clone, Debug, Default)]
pub struct Labels(String);

impl Labels {
    fn with(mut self, name: &str, value: &str) -> Labels {
        self.push(name, value);
        self
    }

    fn push(&mut self, name: &str, value: &str) {
        self.start(name);
        escape_into(&mut self.0, value);
        self.0.push('"');
    }

    /// A label whose value is a number (needs no escape).
    fn push_number(&mut self, name: &str, value: impl itoa::Integer) {
        self.start(name);
        self.0.push_str(itoa::Buffer::new().format(value));
        self.0.push('"');
    }

    fn start(&mut self, name: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(name);
        self.0.push_str("=\"");
    }
}

/// A listener's address as the `addr` label writes it (as `IpAddr`'s
/// `Display` does; IPv4, the common case, without the formatter).
fn push_addr(labels: &mut Labels, id: &ListenerId) {
    match id.ip() {
        IpAddr::V4(v4) => {
            labels.start("addr");
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    labels.0.push('.');
                }
                labels.0.push_str(itoa::Buffer::new().format(*octet));
            }
            labels.0.push('"');
        }
        ip => labels.push("addr", &ip.to_string()),
    }
}

/// A listener's labels: `addr` and `port` (TCP) or `path` (Unix, as `ss`
/// prints it), `netns`, and its container's when it has one. Rules and
/// dashboards group by `addr, port, path, netns`: each kind leaves the
/// other's labels empty, which Prometheus treats as absent.
fn id_labels(id: &ListenerId, containers: &Containers) -> Labels {
    let mut labels = Labels(String::with_capacity(64));
    if id.is_unix() {
        labels.push_number("netns", id.netns);
        labels.push("path", &id.path.display());
    } else {
        push_addr(&mut labels, id);
        labels.push_number("netns", id.netns);
        labels.push_number("port", id.port);
    }
    if let Some(c) = containers.get(id) {
        labels.push("container_id", &c.container_id);
        for (name, value) in [("pod", &c.pod), ("namespace", &c.namespace)] {
            if !value.is_empty() {
                labels.push(name, value);
            }
        }
    }
    labels
}

/// The text being written. A family's HELP and TYPE lines are written with
/// its first series: the text format has no way to say "a family with no
/// series", so one without is left out.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// One family being written into a [`Text`].
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    help: &'static str,
    kind: Kind,
    started: bool,
}

impl Text {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> Family<'_> {
        Family {
            out: &mut self.out,
            name,
            help,
            kind,
            started: false,
        }
    }

    /// Appends families collected by the prometheus crate (the process
    /// collector's).
    pub fn extend_encoded(&mut self, families: &[MetricFamily]) -> Result<()> {
        let present: Vec<&MetricFamily> = families
            .iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut bytes = Vec::new();
        for family in present {
            TextEncoder::new()
                .encode(std::slice::from_ref(family), &mut bytes)
                .context("encoding metrics")?;
        }
        self.out
            .push_str(std::str::from_utf8(&bytes).context("metrics text is not UTF-8")?);
        Ok(())
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample value as the text format writes it.
fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        // Most samples are counts: integer formatting, as `{value}` would
        // print them, without the float formatter's cost.
        out.push_str(itoa::Buffer::new().format(value as i64));
    } else {
        let _ = write!(out, "{value}");
    }
}

impl Family<'_> {
    fn header(&mut self) {
        if !self.started {
            self.started = true;
            let _ = writeln!(self.out, "# HELP {} {}", self.name, self.help);
            let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind.name());
        }
    }

    fn line(&mut self, suffix: &str, labels: &str, extra: Option<(&str, &str)>, value: f64) {
        let out = &mut *self.out;
        out.push_str(self.name);
        out.push_str(suffix);
        if !labels.is_empty() || extra.is_some() {
            out.push('{');
            out.push_str(labels);
            if let Some((name, value)) = extra {
                if !labels.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
                out.push_str("=\"");
                escape_into(out, value);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        write_value(out, value);
        out.push('\n');
    }

    /// One series of a counter or gauge.
    fn sample(&mut self, labels: &Labels, value: f64) {
        self.header();
        self.line("", &labels.0, None, value);
    }

    /// One series, with one label more than `labels`.
    fn sample_with(&mut self, labels: &Labels, extra: (&str, &str), value: f64) {
        self.header();
        self.line("", &labels.0, Some(extra), value);
    }

    /// A histogram in seconds from per-bucket microsecond counts.
    fn histogram(&mut self, labels: &Labels, waits: &Waits) {
        self.header();
        let mut cumulative = 0;
        let mut le = String::new();
        for (bound_us, n) in WAIT_BUCKET_BOUNDS_US.iter().zip(waits.buckets.iter()) {
            cumulative += n;
            le.clear();
            write_value(&mut le, *bound_us as f64 / 1e6);
            self.line("_bucket", &labels.0, Some(("le", &le)), cumulative as f64);
        }
        self.line(
            "_bucket",
            &labels.0,
            Some(("le", "+Inf")),
            waits.count() as f64,
        );
        self.line("_sum", &labels.0, None, waits.sum_ns as f64 / 1e9);
        self.line("_count", &labels.0, None, waits.count() as f64);
    }
}

/// Which listeners a family has series for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every listener: the core series.
    Every,
    /// Listeners that had traffic since the daemon started
    /// ([`ListenerView::had_traffic`]); a quiet listener's would all be 0.
    WithTraffic,
}

impl Scope {
    fn covers(self, v: &ListenerView) -> bool {
        self == Scope::Every || v.had_traffic
    }
}

/// The listeners of a snapshot with their label sets, rendered once.
pub struct Exported<'a> {
    s: &'a Snapshot,
    labels: Vec<Labels>,
    /// Each pool's listener, by position in the snapshot's listeners.
    pool_listener: Vec<Option<usize>>,
}

impl<'a> Exported<'a> {
    pub fn new(s: &'a Snapshot) -> Exported<'a> {
        let labels = s
            .listeners
            .listeners
            .iter()
            .map(|v| id_labels(&v.id, &s.containers))
            .collect();
        let pool_listener = pool_positions(&s.pools, &s.listeners);
        Exported {
            s,
            labels,
            pool_listener,
        }
    }

    /// Each listener with its labels.
    fn listeners(&self) -> impl Iterator<Item = (&'a ListenerView, &Labels)> {
        self.s.listeners.listeners.iter().zip(&self.labels)
    }

    /// Each pool with its listener's labels, where the listener had
    /// traffic (`traffic_only`) or always.
    fn pools(&self, traffic_only: bool) -> impl Iterator<Item = (&'a PoolView, &Labels)> {
        let listeners = &self.s.listeners.listeners;
        self.s
            .pools
            .pools
            .iter()
            .zip(&self.pool_listener)
            .filter_map(move |(pool, i)| {
                let i = (*i)?;
                (listeners[i].had_traffic || !traffic_only).then_some((pool, &self.labels[i]))
            })
    }
}

/// Each pool's listener, by position in `listeners` (both in id order, so
/// one merge walk; a pool out of order is looked up).
fn pool_positions(pools: &Pools, listeners: &Collection) -> Vec<Option<usize>> {
    let all = &listeners.listeners;
    let mut next = 0;
    pools
        .pools
        .iter()
        .map(|pool| {
            while next < all.len() && all[next].id < pool.listener {
                next += 1;
            }
            match all.get(next) {
                Some(v) if v.id == pool.listener => Some(next),
                _ => listeners.position(&pool.listener),
            }
        })
        .collect()
}

/// One series per listener in `scope`; `value` is `None` where the kernel
/// does not know the figure for this listener (the series is then absent).
fn per_listener(
    text: &mut Text,
    e: &Exported,
    scope: Scope,
    (name, help, kind): (&'static str, &'static str, Kind),
    value: impl Fn(&ListenerView) -> Option<f64>,
) {
    let mut f = text.family(name, help, kind);
    for (v, labels) in e.listeners().filter(|(v, _)| scope.covers(v)) {
        if let Some(value) = value(v) {
            f.sample(labels, value);
        }
    }
}

/// Listening sockets reported one by one per listener (beyond it, the
/// sockets with the longest queues are kept).
pub const MAX_SOCKETS_PER_LISTENER: usize = 64;
/// Holders named per listening socket in `observer_listen_socket_holder_info`.
pub const MAX_HOLDERS_PER_SOCKET: usize = 8;

/// The sockets of listeners with more than one (SO_REUSEPORT groups, or a
/// Unix path bound again after an unlink) that had traffic, each with its
/// labels: the listener's plus `socket` (its inode, as in `socket:[N]` and
/// `ss -e`), and whether its drops are known.
fn shared_sockets<'a>(e: &Exported<'a>) -> Vec<(Labels, &'a SocketView, bool)> {
    let mut out = Vec::new();
    let shared = |(v, _): &(&ListenerView, &Labels)| v.sockets.len() > 1 && v.had_traffic;
    for (v, labels) in e.listeners().filter(shared) {
        let mut sockets: Vec<&SocketView> = v.sockets.iter().collect();
        sockets.sort_by_key(|sk| (std::cmp::Reverse(sk.queue_len), sk.inode));
        sockets.truncate(MAX_SOCKETS_PER_LISTENER);
        sockets.sort_by_key(|sk| sk.inode);
        for socket in sockets {
            let labels = labels.clone().with("socket", &socket.inode.to_string());
            out.push((labels, socket, v.drops_known()));
        }
    }
    out
}

/// The per-socket series of listeners with more than one socket, and the
/// processes holding each (named up to [`MAX_HOLDERS_PER_SOCKET`], counted
/// all).
fn socket_families(text: &mut Text, e: &Exported) {
    let shared = shared_sockets(e);
    let per_socket = |text: &mut Text,
                      (name, help, kind): (&'static str, &'static str, Kind),
                      value: &dyn Fn(&SocketView, bool) -> Option<f64>| {
        let mut f = text.family(name, help, kind);
        for (labels, socket, drops_known) in &shared {
            if let Some(value) = value(socket, *drops_known) {
                f.sample(labels, value);
            }
        }
    };
    per_socket(
        text,
        (
            "observer_listen_socket_queue_length",
            "Connections waiting in this one listening socket's accept queue (listeners with more than one socket).",
            Kind::Gauge,
        ),
        &|sk, _| Some(sk.queue_len as f64),
    );
    per_socket(
        text,
        (
            "observer_listen_socket_queue_max",
            "Accept queue limit of this one listening socket.",
            Kind::Gauge,
        ),
        &|sk, _| Some(sk.queue_max as f64),
    );
    per_socket(
        text,
        (
            "observer_listen_socket_queue_oldest_seconds",
            "How long the connection at the head of this one socket's accept queue has waited.",
            Kind::Gauge,
        ),
        &|sk, _| Some(sk.oldest_wait.as_secs_f64()),
    );
    per_socket(
        text,
        (
            "observer_listen_socket_drops_total",
            "Connections this one listening socket dropped since observer started (TCP).",
            Kind::Counter,
        ),
        &|sk, drops_known| drops_known.then_some(sk.drops as f64),
    );
    let holders_of = |socket: &SocketView| {
        e.s.socket_holders
            .get(&socket.inode)
            .map_or(&[][..], |h| &h[..])
    };
    let mut f = text.family(
        "observer_listen_socket_holders",
        "Processes holding this listening socket (0: nobody can accept from it).",
        Kind::Gauge,
    );
    for (labels, socket, _) in &shared {
        f.sample(labels, holders_of(socket).len() as f64);
    }
    let mut f = text.family(
        "observer_listen_socket_holder_info",
        "A process holding this listening socket (the lowest pids, at most 8 per socket).",
        Kind::Gauge,
    );
    for (labels, socket, _) in &shared {
        for (pid, comm) in holders_of(socket).iter().take(MAX_HOLDERS_PER_SOCKET) {
            let labels = labels
                .clone()
                .with("pid", &pid.to_string())
                .with("comm", comm);
            f.sample(&labels, 1.0);
        }
    }
}

/// Every listener metric family, in the order of docs/metrics.md's reference
/// table. Quiet listeners get the core series only (see [`Scope`]).
pub fn listener_families(text: &mut Text, e: &Exported, c: &Collectors) {
    use Kind::{Counter, Gauge};
    use Scope::{Every, WithTraffic};
    per_listener(
        text,
        e,
        Every,
        (
            "observer_listen_queue_length",
            "Connections waiting in the listening socket's accept queue now (ss Recv-Q).",
            Gauge,
        ),
        |v| Some(v.queue_len as f64),
    );
    per_listener(
        text,
        e,
        Every,
        (
            "observer_listen_queue_max",
            "Accept queue limit of the listening socket (the backlog; ss Send-Q).",
            Gauge,
        ),
        |v| Some(v.queue_max as f64),
    );
    per_listener(
        text,
        e,
        WithTraffic,
        (
            "observer_listen_queue_oldest_seconds",
            "How long the connection at the head of the accept queue (the oldest) has waited, at the scrape; 0 when the queue is empty. Unix listeners: counted from the first scrape that saw it there (the kernel keeps no enqueue time).",
            Gauge,
        ),
        |v| Some(v.oldest_wait.as_secs_f64()),
    );
    per_listener(
        text,
        e,
        WithTraffic,
        (
            "observer_listen_sockets",
            "Listening sockets behind this address or path (more than 1 with SO_REUSEPORT); see observer_listen_socket_*.",
            Gauge,
        ),
        |v| Some(v.sockets.len().max(1) as f64),
    );
    per_listener(
        text,
        e,
        WithTraffic,
        (
            "observer_listen_syn_queue_length",
            "Half-open connections (SYN received, handshake not complete) of the listening socket now (TCP).",
            Gauge,
        ),
        |v| (!v.id.is_unix()).then_some(v.syn_queue_len as f64),
    );
    per_listener(
        text,
        e,
        Every,
        (
            "observer_listen_drops_total",
            "Connections the listener dropped since observer started: accept queue full or SYN queue overflow (per-socket ListenDrops; TCP; absent where they cannot be told from TCP_DEFER_ACCEPT's discarded ACKs).",
            Counter,
        ),
        |v| v.drops_known().then_some(v.drops as f64),
    );
    per_listener(
        text,
        e,
        Every,
        (
            "observer_connections_queued_total",
            "Connections that completed the handshake (TCP) or connect() (Unix) and entered the accept queue since observer started.",
            Counter,
        ),
        |v| Some(v.queued as f64),
    );
    per_listener(
        text,
        e,
        Every,
        (
            "observer_connections_accepted_total",
            "Connections taken from the accept queue by accept() since observer started.",
            Counter,
        ),
        |v| Some(v.accepts.accepted as f64),
    );
    let mut f = text.family(
        "observer_accept_queue_wait_seconds",
        "Time each accepted connection waited in the accept queue until accept(): TCP from handshake completion, Unix from connect().",
        Kind::Histogram,
    );
    let histogram = |v: &ListenerView| c.wait_histogram && v.waits_known && v.had_traffic;
    for (v, labels) in e.listeners().filter(|(v, _)| histogram(v)) {
        f.histogram(labels, &v.accepts.waits);
    }
    if c.sockets {
        socket_families(text, e);
    }
}

/// A series per worker of a listener that had traffic, by its slot
/// (`worker`, see `slots.rs`) and `comm`; and its `pid` where asked
/// (`--collector.workers.pid`: a series per process, unbounded under
/// worker restarts). None with `--no-collector.workers.per-worker`.
fn per_worker(
    text: &mut Text,
    (e, c): (&Exported, &Collectors),
    spec: (&'static str, &'static str, Kind),
    value: impl Fn(&WorkerView) -> Option<f64>,
) {
    per_slot(text, (e, c), spec, value, |_| None);
}

/// A counter per worker slot, [`per_worker`]'s and the vacant slots' too:
/// their counts stay, so that sums over slots keep what exited workers
/// counted.
fn per_slot_counter(
    text: &mut Text,
    (e, c): (&Exported, &Collectors),
    (name, help): (&'static str, &'static str),
    value: impl Fn(&WorkerView) -> Option<f64>,
    vacant: impl Fn(&VacantSlot) -> Option<f64>,
) {
    per_slot(text, (e, c), (name, help, Kind::Counter), value, vacant);
}

fn per_slot(
    text: &mut Text,
    (e, c): (&Exported, &Collectors),
    (name, help, kind): (&'static str, &'static str, Kind),
    value: impl Fn(&WorkerView) -> Option<f64>,
    vacant: impl Fn(&VacantSlot) -> Option<f64>,
) {
    if !c.per_worker {
        return;
    }
    let with_pid = c.worker_pids;
    let mut f = text.family(name, help, kind);
    for (pool, labels) in e.pools(true) {
        for w in &pool.workers {
            if let Some(value) = value(w) {
                let mut labels = labels
                    .clone()
                    .with("worker", &w.slot.no.to_string())
                    .with("comm", &w.slot.comm);
                if with_pid {
                    labels = labels.with("pid", &w.pid.to_string());
                }
                f.sample(&labels, value);
            }
        }
        for slot in &pool.vacant_slots {
            if let Some(value) = vacant(slot) {
                let labels = labels
                    .clone()
                    .with("worker", &slot.no.to_string())
                    .with("comm", &slot.comm);
                f.sample(&labels, value);
            }
        }
    }
}

/// A gauge per pool of a TCP listener that had traffic (Unix connections
/// have no read counter to tell unread ones).
fn per_pool(
    text: &mut Text,
    e: &Exported,
    (name, help): (&'static str, &'static str),
    value: impl Fn(&PoolView) -> f64,
) {
    let mut f = text.family(name, help, Kind::Gauge);
    for (pool, labels) in e.pools(true).filter(|(pool, _)| !pool.listener.is_unix()) {
        f.sample(labels, value(pool));
    }
}

/// The pool-level figures that stand in for per-worker series (which a
/// fleet may leave out, `--no-collector.workers.per-worker`): the pool's
/// busy time, and how unevenly its workers share its accepts.
fn pool_figures(text: &mut Text, e: &Exported) {
    let mut f = text.family(
        "observer_workers_busy_seconds_total",
        "Time the listener's workers spent busy since observer first saw them: the sum of observer_worker_busy_seconds_total over the pool's worker slots.",
        Kind::Counter,
    );
    for (pool, labels) in e.pools(true).filter(|(pool, _)| sampled_pool(pool)) {
        let held: f64 = pool
            .workers
            .iter()
            .filter(|w| w.slot.sampled)
            .map(|w| w.slot.busy_seconds)
            .sum();
        let vacant: f64 = pool
            .vacant_slots
            .iter()
            .filter(|s| s.sampled)
            .map(|s| s.busy_seconds)
            .sum();
        f.sample(labels, held + vacant);
    }
    let mut f = text.family(
        "observer_workers_accepts_max_share",
        "The largest share of the listener's accepts that one worker slot took, averaged over about the last 5 minutes (exponentially weighted): near 1/workers where accepts are spread, near 1 where one worker takes them all. For pools of 2 worker slots or more that accepted.",
        Kind::Gauge,
    );
    for (pool, labels) in e.pools(true) {
        if let Some(share) = pool.busiest_accept_share {
            f.sample(labels, share);
        }
    }
}

/// Whether the thread sampler has seen a worker of the pool (one alive
/// now, or one of a slot no process holds at the moment: between a
/// worker's exit and its replacement, a pool can have none).
fn sampled_pool(pool: &PoolView) -> bool {
    pool.workers.iter().any(|w| w.busy.is_some()) || pool.vacant_slots.iter().any(|s| s.sampled)
}

/// Worker families (none with `--no-collector.workers`): every pool's
/// busy/idle counts; the per-worker and per-pool series of listeners that
/// had traffic.
pub fn worker_families(text: &mut Text, e: &Exported, c: &Collectors) {
    use Kind::{Counter, Gauge};
    if !c.workers {
        return;
    }
    // Without a sampler (or before it saw a pool) there is no state to tell.
    let mut f = text.family(
        "observer_workers",
        "Worker processes of the listener's pool by state at the scrape: idle (a thread waits for new work: on the listener, its epoll, or the pool's accept lock) or busy.",
        Gauge,
    );
    let sampled = |(pool, _): &(&PoolView, &Labels)| sampled_pool(pool);
    for (pool, labels) in e.pools(false).filter(sampled) {
        for (state, n) in [("busy", pool.busy()), ("idle", pool.idle())] {
            f.sample_with(labels, ("state", state), n as f64);
        }
    }
    per_worker(
        text,
        (e, c),
        (
            "observer_worker_busy",
            "1 while the worker is busy (no thread of it waits for new work), 0 while idle, at the scrape.",
            Gauge,
        ),
        |w| w.busy.map(|b| b as u8 as f64),
    );
    per_worker(
        text,
        (e, c),
        (
            "observer_worker_idle_threads",
            "Threads of the worker free to take a new request at the scrape: waiting for work, or, in a worker whose acceptor hands connections to a pool of threads, its parked pool threads and the ones it can start again. 0 while busy.",
            Gauge,
        ),
        |w| w.idle_threads.map(f64::from),
    );
    let mut f = text.family(
        "observer_idle_threads",
        "Threads of the listener's workers free to take a new request at the scrape: the sum of observer_worker_idle_threads.",
        Gauge,
    );
    for (pool, labels) in e.pools(false).filter(sampled) {
        let idle: u32 = pool.workers.iter().filter_map(|w| w.idle_threads).sum();
        f.sample(labels, f64::from(idle));
    }
    pool_figures(text, e);
    per_slot_counter(
        text,
        (e, c),
        (
            "observer_worker_busy_seconds_total",
            "Time the worker slot's processes spent busy since observer first saw them, from the thread sampler (--collector.workers.sample-rate); rate() of it is utilisation. A slot (label worker) is taken over by the process that replaces one that exited, and keeps counting.",
        ),
        |w| w.slot.sampled.then_some(w.slot.busy_seconds),
        |slot| slot.sampled.then_some(slot.busy_seconds),
    );
    per_slot_counter(
        text,
        (e, c),
        (
            "observer_worker_accepts_total",
            "Connections the worker slot's processes accepted from this listener since observer started (each to its exit; a slot is taken over by the process that replaces one that exited).",
        ),
        |w| Some(w.slot.accepts as f64),
        |slot| Some(slot.accepts as f64),
    );
    per_worker(
        text,
        (e, c),
        (
            "observer_worker_active_connections",
            "Connections the worker accepted from this listener that are still open.",
            Gauge,
        ),
        |w| Some(w.active_connections as f64),
    );
    per_worker(
        text,
        (e, c),
        (
            "observer_worker_connections_unread",
            "Of the worker's open connections, those whose client has sent bytes it has not started to read (TCP).",
            Gauge,
        ),
        |w| Some(w.unread_connections as f64),
    );
    per_worker(
        text,
        (e, c),
        (
            "observer_worker_requests_in_service",
            "Of the worker's open connections, those holding a request in service: every byte the client sent has been read, and nothing answered since (TCP; from each connection's own counters, no hook). For a threaded worker, the threads serving requests.",
            Gauge,
        ),
        |w| w.requests_in_service.map(|n| n as f64),
    );
    per_pool(
        text,
        e,
        (
            "observer_requests_in_service",
            "Requests the listener's workers are serving now: the sum of observer_worker_requests_in_service (TCP).",
        ),
        |pool| {
            pool.workers
                .iter()
                .filter_map(|w| w.requests_in_service)
                .sum::<u64>() as f64
        },
    );
    per_pool(
        text,
        e,
        (
            "observer_connections_unread",
            "Accepted connections of the listener whose client has sent bytes that no process has started to read: the queue after accept (TCP).",
        ),
        |pool| pool.unread.connections as f64,
    );
    per_pool(
        text,
        e,
        (
            "observer_connections_unread_oldest_seconds",
            "How long the oldest unread accepted connection has waited since it entered the accept queue (its accept-queue wait included); 0 when none (TCP).",
        ),
        |pool| pool.unread.oldest.as_secs_f64(),
    );
    let mut f = text.family(
        "observer_dispatcher_accepts_total",
        "Connections a dispatcher accepted from this listener since observer started and handed to its fed workers (Node's cluster primary, a fork-per-connection server); a dispatcher is not one of the pool's workers.",
        Counter,
    );
    for (pool, labels) in e.pools(true) {
        for d in &pool.dispatchers {
            let labels = labels
                .clone()
                .with("comm", &d.comm)
                .with("pid", &d.pid.to_string());
            f.sample(&labels, d.accepts as f64);
        }
    }
    text.family(
        "observer_workers_over_limit",
        "Worker processes left out of this scrape because of --collector.max-workers.",
        Gauge,
    )
    .sample(&Labels::default(), e.s.pools.workers_over_cap as f64);
}

/// A thread sampler family: name, help, kind and its value.
type SamplerFamily = (
    &'static str,
    &'static str,
    Kind,
    fn(&crate::sampler::SamplerCost) -> f64,
);

/// The daemon's own health and build information.
pub fn daemon_families(text: &mut Text, snapshot: &Snapshot, d: &DaemonHealth) {
    use Kind::{Counter, Gauge};
    let none = Labels::default();
    let build = Labels::default()
        .with("accept_source", &d.accept_source)
        .with("lockdown", &d.lockdown)
        .with("thread_sampler", &d.thread_sampler)
        .with("version", env!("CARGO_PKG_VERSION"));
    text.family(
        "observer_build_info",
        "Build and probe information: the accept source in use, the kernel lockdown mode, and where the thread sampler reads worker threads (bpf, proc, or none).",
        Gauge,
    )
    .sample(&build, 1.0);
    let mut f = text.family(
        "observer_program_errors_total",
        "eBPF programs or attach points that failed to load or attach (non-fatal ones).",
        Counter,
    );
    for (program, _) in &d.program_errors {
        f.sample(&Labels::default().with("program", program), 1.0);
    }
    if let Some(costs) = &d.program_costs {
        let mut f = text.family(
            "observer_program_runs_total",
            "Runs of each of observer's eBPF programs since it was loaded, as the kernel counts them (while BPF run-time statistics are on: --collector.program-stats or kernel.bpf_stats_enabled=1).",
            Counter,
        );
        for c in costs {
            f.sample(
                &Labels::default().with("program", &c.program),
                c.runs as f64,
            );
        }
        let mut f = text.family(
            "observer_program_run_seconds_total",
            "Time spent running each of observer's eBPF programs since it was loaded, as the kernel counts it (the same condition).",
            Counter,
        );
        for c in costs {
            f.sample(
                &Labels::default().with("program", &c.program),
                c.run_seconds,
            );
        }
    }
    let mut f = text.family(
        "observer_kernel_events_lost_total",
        "Kernel events the eBPF programs could not count, by reason (e.g. a full map).",
        Counter,
    );
    for (reason, n) in &d.kernel_events_lost {
        f.sample(&Labels::default().with("reason", reason), *n as f64);
    }
    text.family(
        "observer_listeners_over_limit",
        "Listening addresses left out of this scrape because of --collector.max-listeners.",
        Gauge,
    )
    .sample(&none, snapshot.listeners.listeners_over_cap as f64);
    let sampler: &[SamplerFamily] = &[
        (
            "observer_worker_sample_passes_total",
            "Passes of the thread sampler over the watched workers' threads (between and at scrapes).",
            Counter,
            |c| c.passes as f64,
        ),
        (
            "observer_worker_sample_interval_seconds",
            "Interval between the thread sampler's passes in effect: 1 / --collector.workers.sample-rate, or longer where passes would take more than 0.5% of a core.",
            Gauge,
            |c| c.interval_seconds,
        ),
        (
            "observer_worker_sample_seconds_total",
            "CPU time the thread sampler spent in its passes (kernel iterator and classification).",
            Counter,
            |c| c.seconds,
        ),
        (
            "observer_worker_sample_threads_total",
            "Threads of watched workers read by the thread sampler, summed over its passes.",
            Counter,
            |c| c.threads_sampled as f64,
        ),
        (
            "observer_worker_sample_host_walks_total",
            "Passes of the thread sampler that walked every thread on the host: the watched processes were too many to read one by one, or the kernel has no per-process task iterator (Linux 6.1+).",
            Counter,
            |c| c.host_walks as f64,
        ),
    ];
    if let Some(cost) = &d.sampler {
        for (name, help, kind, value) in sampler {
            text.family(name, help, *kind).sample(&none, value(cost));
        }
    }
    text.family(
        "observer_collect_errors_total",
        "Scrapes whose collection from the kernel failed.",
        Counter,
    )
    .sample(&none, d.collect_errors as f64);
    text.family(
        "observer_collect_duration_seconds",
        "Time the last collection from the kernel took.",
        Gauge,
    )
    .sample(&none, d.last_collect_seconds);
    let mut f = text.family(
        "observer_collect_stage_seconds",
        "Time the last collection spent in each stage (iterators, maps, aggregation, /proc reads, the thread sampler's pass; exposition: writing the previous scrape's text).",
        Gauge,
    );
    for (stage, seconds) in &d.stages.0 {
        f.sample(&Labels::default().with("stage", stage), *seconds);
    }
}

/// The whole exposition of a snapshot, the daemon's health and `extra`
/// families (the process collector's), in a text of at least
/// `expected_bytes` (the last scrape's size: a large text then grows
/// without copies).
pub fn exposition(
    snapshot: &Snapshot,
    health: &DaemonHealth,
    c: &Collectors,
    extra: &[MetricFamily],
    expected_bytes: usize,
) -> Result<String> {
    let mut text = Text {
        out: String::with_capacity(expected_bytes + expected_bytes / 8),
    };
    let exported = Exported::new(snapshot);
    listener_families(&mut text, &exported, c);
    worker_families(&mut text, &exported, c);
    daemon_families(&mut text, snapshot, health);
    text.extend_encoded(extra)?;
    Ok(text.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Accepts, Collection};
    use crate::workers::Pools;
    use observer_common::AF_INET;

    fn all() -> Collectors {
        crate::collectors::CollectorOptions::all()
    }

    fn with_a_worker(snapshot: &mut Snapshot) {
        use crate::workers::{PoolView, WorkerView};
        snapshot.pools.pools.push(PoolView {
            listener: snapshot.listeners.listeners[0].id,
            workers: vec![WorkerView {
                pid: 11,
                comm: "gunicorn".into(),
                accepts: 0,
                active_connections: 0,
                unread_connections: 0,
                requests_in_service: Some(0),
                busy: Some(false),
                idle_threads: Some(1),
                busy_seconds: 0.0,
                slot: Default::default(),
            }],
            dispatchers: vec![],
            unread: Default::default(),
            vacant_slots: vec![],
            busiest_accept_share: None,
        });
    }

    fn listeners_text(s: &Snapshot, c: &Collectors) -> String {
        let mut text = Text::default();
        listener_families(&mut text, &Exported::new(s), c);
        text.finish()
    }

    fn workers_text(s: &Snapshot, c: &Collectors) -> String {
        let mut text = Text::default();
        worker_families(&mut text, &Exported::new(s), c);
        text.finish()
    }

    fn families_of(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect()
    }

    #[test]
    fn a_quiet_listener_exports_its_core_series_and_its_pool_state_only() {
        let mut snapshot = one_listener();
        let v = &mut snapshot.listeners.listeners[0];
        (v.had_traffic, v.queue_len, v.queued) = (false, 0, 0);
        v.accepts = Default::default();
        with_a_worker(&mut snapshot);
        let text = listeners_text(&snapshot, &all()) + &workers_text(&snapshot, &all());
        assert_eq!(
            families_of(&text),
            [
                "observer_listen_queue_length",
                "observer_listen_queue_max",
                "observer_listen_drops_total",
                "observer_connections_queued_total",
                "observer_connections_accepted_total",
                "observer_workers",
                "observer_idle_threads",
                "observer_workers_over_limit",
            ],
            "{text}"
        );
        // With traffic, every family is back.
        snapshot.listeners.listeners[0].had_traffic = true;
        let text = listeners_text(&snapshot, &all()) + &workers_text(&snapshot, &all());
        for name in [
            "observer_listen_queue_oldest_seconds",
            "observer_accept_queue_wait_seconds",
            "observer_worker_busy",
            "observer_worker_accepts_total",
            "observer_connections_unread",
        ] {
            assert!(families_of(&text).contains(&name), "{name}: {text}");
        }
    }

    #[test]
    fn collectors_turned_off_leave_their_families_out() {
        let mut snapshot = one_listener();
        with_a_worker(&mut snapshot);
        let mut c = all();
        (c.workers, c.wait_histogram) = (false, false);
        let text = listeners_text(&snapshot, &c) + &workers_text(&snapshot, &c);
        assert!(
            !text.contains("observer_accept_queue_wait_seconds"),
            "{text}"
        );
        assert!(!text.contains("observer_worker"), "{text}");
        assert!(text.contains("observer_listen_queue_length{"), "{text}");
    }

    fn one_listener() -> Snapshot {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut waits = Waits::default();
        waits.buckets[0] = 2; // <= 100 µs
        waits.buckets[12] = 1; // <= 1 s
        waits.sum_ns = 900_000_000;
        let listeners = Collection {
            listeners: vec![ListenerView {
                id: ListenerId::tcp(4026531840, AF_INET, addr, 8080),
                sockets: Vec::new(),
                oldest_wait: std::time::Duration::from_millis(250),
                queue_len: 3,
                queue_max: 128,
                syn_queue_len: 0,
                queued: 6,
                drops: 0,
                drops_raw: 0,
                accepts: Accepts { accepted: 3, waits },
                by_process: Default::default(),
                waits_known: true,
                drops_known: true,
                had_traffic: true,
            }],
            ..Default::default()
        };
        Snapshot {
            listeners,
            pools: Pools::default(),
            containers: Default::default(),
            socket_holders: Default::default(),
        }
    }

    #[test]
    fn listener_metrics_carry_addr_port_netns_labels() {
        let text = listeners_text(&one_listener(), &all());
        assert!(text.contains(
            "observer_listen_queue_length{addr=\"127.0.0.1\",netns=\"4026531840\",port=\"8080\"} 3"
        ), "{text}");
        assert!(text.contains("# TYPE observer_connections_accepted_total counter"));
    }

    #[test]
    fn listeners_in_containers_carry_the_container_labels() {
        let mut snapshot = one_listener();
        let id = snapshot.listeners.listeners[0].id;
        let info = ContainerInfo {
            container_id: "abc".into(),
            pod: "web-1".into(),
            ..Default::default()
        };
        snapshot.containers.insert(id, info);
        let text = listeners_text(&snapshot, &all());
        assert!(text.contains(
            "observer_listen_queue_max{addr=\"127.0.0.1\",netns=\"4026531840\",port=\"8080\",container_id=\"abc\",pod=\"web-1\"} 128"
        ), "{text}");
    }

    #[test]
    fn without_a_sampler_busy_and_idle_are_absent_not_zero() {
        use crate::workers::{PoolView, WorkerView};
        let mut snapshot = one_listener();
        let worker = WorkerView {
            pid: 11,
            comm: "gunicorn".into(),
            accepts: 3,
            active_connections: 1,
            unread_connections: 0,
            requests_in_service: Some(0),
            busy: None, // the thread sampler could not run on this kernel
            idle_threads: None,
            busy_seconds: 0.0,
            slot: Default::default(),
        };
        snapshot.pools.pools.push(PoolView {
            listener: snapshot.listeners.listeners[0].id,
            workers: vec![worker],
            dispatchers: vec![],
            unread: Default::default(),
            vacant_slots: vec![],
            busiest_accept_share: None,
        });
        let text = workers_text(&snapshot, &all());
        assert!(!text.contains("observer_workers{"), "{text}");
        assert!(!text.contains("observer_worker_busy"), "{text}");
        assert!(text.contains("observer_worker_accepts_total{"), "{text}");
        // Sampled (the slots stage marks its slot so).
        snapshot.pools.pools[0].workers[0].busy = Some(true);
        snapshot.pools.pools[0].workers[0].slot.sampled = true;
        let text = workers_text(&snapshot, &all());
        assert!(text.contains("state=\"busy\"} 1"), "{text}");
        assert!(
            text.contains("observer_worker_busy_seconds_total{"),
            "{text}"
        );
    }

    #[test]
    fn a_dispatcher_is_exported_with_its_accepts_and_not_as_a_worker() {
        use crate::workers::{DispatcherView, PoolView};
        let mut snapshot = one_listener();
        snapshot.pools.pools.push(PoolView {
            listener: snapshot.listeners.listeners[0].id,
            workers: vec![],
            dispatchers: vec![DispatcherView {
                pid: 10,
                comm: "node".into(),
                accepts: 12,
            }],
            unread: Default::default(),
            vacant_slots: vec![],
            busiest_accept_share: None,
        });
        let text = workers_text(&snapshot, &all());
        assert!(text.contains(
            "observer_dispatcher_accepts_total{addr=\"127.0.0.1\",netns=\"4026531840\",port=\"8080\",comm=\"node\",pid=\"10\"} 12"
        ), "{text}");
        assert!(!text.contains("observer_worker_accepts_total{"), "{text}");
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        use observer_common::AF_INET6;
        let v4 = |a: [u8; 4]| {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a);
            ListenerId::tcp(1, AF_INET, addr, 80)
        };
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        let ids = [
            v4([0, 0, 0, 0]),
            v4([127, 0, 0, 1]),
            v4([255, 10, 100, 9]),
            ListenerId::tcp(1, AF_INET6, [0; 16], 80),
            ListenerId::tcp(1, AF_INET6, mapped, 80),
        ];
        for id in ids {
            let labels = id_labels(&id, &Default::default());
            let want = format!("addr=\"{}\",netns=\"1\",port=\"80\"", id.ip());
            assert_eq!(labels.0, want);
        }
    }

    #[test]
    fn label_values_are_escaped_and_values_written_as_prometheus_does() {
        let labels = Labels::default().with("comm", "a\"b\\c\nd");
        assert_eq!(labels.0, r#"comm="a\"b\\c\nd""#);
        let mut out = String::new();
        for v in [3.0, 0.9, f64::INFINITY, 1e-4, 4026531840.0] {
            write_value(&mut out, v);
            out.push(' ');
        }
        assert_eq!(out, "3 0.9 +Inf 0.0001 4026531840 ");
    }

    #[test]
    fn wait_histogram_is_cumulative_in_seconds_with_inf() {
        let text = listeners_text(&one_listener(), &all());
        let line = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("observer_accept_queue_wait_seconds_bucket")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(line("0.0001").as_deref(), Some("2"));
        assert_eq!(line("0.5").as_deref(), Some("2"));
        assert_eq!(line("1").as_deref(), Some("3"));
        assert_eq!(line("+Inf").as_deref(), Some("3"));
        assert!(text.contains("observer_accept_queue_wait_seconds_sum{addr=\"127.0.0.1\",netns=\"4026531840\",port=\"8080\"} 0.9"));
    }
}
