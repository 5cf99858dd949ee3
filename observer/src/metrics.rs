//! Stage 4a: Prometheus exposition. Builds metric families from a
//! [`Collection`] and the daemon's own health, and encodes them as text.
use anyhow::{Context as _, Result};
use observer_common::WAIT_BUCKET_BOUNDS_US;
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    aggregate::{ListenerView, SocketView, Waits},
    containers::ContainerInfo,
    pipeline::{DaemonHealth, Snapshot},
    sockets::ListenerId,
    workers::{PoolView, WorkerView},
};

fn label(name: &str, value: impl Into<String>) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.into());
    l
}

/// A listener's labels: `addr` and `port` (TCP) or `path` (Unix, as `ss`
/// prints it), `netns`, and its container's when it has one. Rules and
/// dashboards group by `addr, port, path, netns`: each kind leaves the
/// other's labels empty, which Prometheus treats as absent.
fn id_labels(id: &ListenerId, containers: &Containers) -> Vec<LabelPair> {
    let mut labels = if id.is_unix() {
        vec![
            label("netns", id.netns.to_string()),
            label("path", id.path.display()),
        ]
    } else {
        vec![
            label("addr", id.ip().to_string()),
            label("netns", id.netns.to_string()),
            label("port", id.port.to_string()),
        ]
    };
    if let Some(c) = containers.get(id) {
        labels.push(label("container_id", c.container_id.clone()));
        for (name, value) in [("pod", &c.pod), ("namespace", &c.namespace)] {
            if !value.is_empty() {
                labels.push(label(name, value.clone()));
            }
        }
    }
    labels
}

fn worker_labels(pool: &PoolView, w: &WorkerView, containers: &Containers) -> Vec<LabelPair> {
    let mut labels = id_labels(&pool.listener, containers);
    labels.push(label("comm", w.comm.clone()));
    labels.push(label("pid", w.pid.to_string()));
    labels
}

type Containers = std::collections::HashMap<ListenerId, ContainerInfo>;

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels);
    m
}

fn counter(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

/// A histogram in seconds from per-bucket microsecond counts.
fn histogram(labels: Vec<LabelPair>, waits: &Waits) -> Metric {
    let mut cumulative = 0;
    let buckets = WAIT_BUCKET_BOUNDS_US
        .iter()
        .zip(waits.buckets.iter())
        .map(|(bound_us, n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound_us as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_bucket(buckets); // the encoder adds le="+Inf" = sample count
    h.set_sample_count(waits.count());
    h.set_sample_sum(waits.sum_ns as f64 / 1e9);
    let mut m = Metric::from_label(labels);
    m.set_histogram(h);
    m
}

/// One series per listener; `value` is `None` where the kernel does not
/// know the figure for this listener (the series is then absent).
fn per_listener(
    s: &Snapshot,
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&ListenerView) -> Option<f64>,
) -> MetricFamily {
    let make = if kind == MetricType::COUNTER {
        counter
    } else {
        gauge
    };
    let metrics = s
        .listeners
        .listeners
        .iter()
        .filter_map(|v| Some(make(id_labels(&v.id, &s.containers), value(v)?)))
        .collect();
    family(name, help, kind, metrics)
}

/// Listening sockets reported one by one per listener (beyond it, the
/// sockets with the longest queues are kept).
pub const MAX_SOCKETS_PER_LISTENER: usize = 64;
/// Holders named per listening socket in `observer_listen_socket_holder_info`.
pub const MAX_HOLDERS_PER_SOCKET: usize = 8;

/// The sockets of listeners with more than one (SO_REUSEPORT groups, or a
/// Unix path bound again after an unlink), each with its labels: the
/// listener's plus `socket` (its inode, as in `socket:[N]` and `ss -e`).
fn shared_sockets(s: &Snapshot) -> Vec<(Vec<LabelPair>, &SocketView, bool)> {
    let mut out = Vec::new();
    for v in s.listeners.listeners.iter().filter(|v| v.sockets.len() > 1) {
        let mut sockets: Vec<&SocketView> = v.sockets.iter().collect();
        sockets.sort_by_key(|sk| (std::cmp::Reverse(sk.queue_len), sk.inode));
        sockets.truncate(MAX_SOCKETS_PER_LISTENER);
        sockets.sort_by_key(|sk| sk.inode);
        for socket in sockets {
            let mut labels = id_labels(&v.id, &s.containers);
            labels.push(label("socket", socket.inode.to_string()));
            out.push((labels, socket, v.drops_known()));
        }
    }
    out
}

fn per_socket(
    s: &Snapshot,
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&SocketView, bool) -> Option<f64>,
) -> MetricFamily {
    let make = if kind == MetricType::COUNTER {
        counter
    } else {
        gauge
    };
    let metrics = shared_sockets(s)
        .into_iter()
        .filter_map(|(labels, socket, drops_known)| Some(make(labels, value(socket, drops_known)?)))
        .collect();
    family(name, help, kind, metrics)
}

/// The processes holding each shared socket (named up to
/// [`MAX_HOLDERS_PER_SOCKET`], counted all).
fn socket_holder_families(s: &Snapshot) -> Vec<MetricFamily> {
    let mut counts = Vec::new();
    let mut info = Vec::new();
    for (labels, socket, _) in shared_sockets(s) {
        let holders = s
            .socket_holders
            .get(&socket.inode)
            .map_or(&[][..], |h| &h[..]);
        counts.push(gauge(labels.clone(), holders.len() as f64));
        for (pid, comm) in holders.iter().take(MAX_HOLDERS_PER_SOCKET) {
            let mut labels = labels.clone();
            labels.push(label("pid", pid.to_string()));
            labels.push(label("comm", comm.clone()));
            info.push(gauge(labels, 1.0));
        }
    }
    vec![
        family(
            "observer_listen_socket_holders",
            "Processes holding this listening socket (0: nobody can accept from it).",
            MetricType::GAUGE,
            counts,
        ),
        family(
            "observer_listen_socket_holder_info",
            "A process holding this listening socket (the lowest pids, at most 8 per socket).",
            MetricType::GAUGE,
            info,
        ),
    ]
}

/// Every listener metric family, in the order of the README's reference table.
pub fn listener_families(s: &Snapshot) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let mut families = vec![
        per_listener(
            s,
            "observer_listen_queue_length",
            "Connections waiting in the listening socket's accept queue now (ss Recv-Q).",
            GAUGE,
            |v| Some(v.queue_len as f64),
        ),
        per_listener(
            s,
            "observer_listen_queue_max",
            "Accept queue limit of the listening socket (the backlog; ss Send-Q).",
            GAUGE,
            |v| Some(v.queue_max as f64),
        ),
        per_listener(
            s,
            "observer_listen_queue_oldest_seconds",
            "How long the connection at the head of the accept queue (the oldest) has waited, at the scrape; 0 when the queue is empty. Unix listeners: counted from the first scrape that saw it there (the kernel keeps no enqueue time).",
            GAUGE,
            |v| Some(v.oldest_wait.as_secs_f64()),
        ),
        per_listener(
            s,
            "observer_listen_sockets",
            "Listening sockets behind this address or path (more than 1 with SO_REUSEPORT); see observer_listen_socket_*.",
            GAUGE,
            |v| Some(v.sockets.len().max(1) as f64),
        ),
        per_listener(
            s,
            "observer_listen_syn_queue_length",
            "Half-open connections (SYN received, handshake not complete) of the listening socket now (TCP).",
            GAUGE,
            |v| v.drops_known().then_some(v.syn_queue_len as f64),
        ),
        per_listener(
            s,
            "observer_listen_drops_total",
            "Connections the listener dropped since observer started: accept queue full or SYN queue overflow (per-socket ListenDrops; TCP).",
            COUNTER,
            |v| v.drops_known().then_some(v.drops as f64),
        ),
        per_listener(
            s,
            "observer_connections_queued_total",
            "Connections that completed the handshake (TCP) or connect() (Unix) and entered the accept queue since observer started.",
            COUNTER,
            |v| Some(v.queued as f64),
        ),
        per_listener(
            s,
            "observer_connections_accepted_total",
            "Connections taken from the accept queue by accept() since observer started.",
            COUNTER,
            |v| Some(v.accepts.accepted as f64),
        ),
        family(
            "observer_accept_queue_wait_seconds",
            "Time each accepted connection waited in the accept queue until accept(): TCP from handshake completion, Unix from connect().",
            HISTOGRAM,
            s.listeners
                .listeners
                .iter()
                .filter(|v| v.waits_known)
                .map(|v| histogram(id_labels(&v.id, &s.containers), &v.accepts.waits))
                .collect(),
        ),
        per_socket(
            s,
            "observer_listen_socket_queue_length",
            "Connections waiting in this one listening socket's accept queue (listeners with more than one socket).",
            GAUGE,
            |sk, _| Some(sk.queue_len as f64),
        ),
        per_socket(
            s,
            "observer_listen_socket_queue_max",
            "Accept queue limit of this one listening socket.",
            GAUGE,
            |sk, _| Some(sk.queue_max as f64),
        ),
        per_socket(
            s,
            "observer_listen_socket_queue_oldest_seconds",
            "How long the connection at the head of this one socket's accept queue has waited.",
            GAUGE,
            |sk, _| Some(sk.oldest_wait.as_secs_f64()),
        ),
        per_socket(
            s,
            "observer_listen_socket_drops_total",
            "Connections this one listening socket dropped since observer started (TCP).",
            COUNTER,
            |sk, drops_known| drops_known.then_some(sk.drops as f64),
        ),
    ];
    families.extend(socket_holder_families(s));
    families
}

fn per_worker(
    s: &Snapshot,
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&WorkerView) -> Option<f64>,
) -> MetricFamily {
    let make = if kind == MetricType::COUNTER {
        counter
    } else {
        gauge
    };
    let value = &value;
    let metrics = s
        .pools
        .pools
        .iter()
        .flat_map(|pool| {
            pool.workers
                .iter()
                .filter_map(move |w| Some(make(worker_labels(pool, w, &s.containers), value(w)?)))
        })
        .collect();
    family(name, help, kind, metrics)
}

/// Worker pool families: per pool busy/idle counts, and per worker figures.
/// A gauge per pool's listener (TCP listeners only: Unix connections have
/// no read counter to tell unread ones).
fn per_pool(
    s: &Snapshot,
    name: &str,
    help: &str,
    value: impl Fn(&PoolView) -> f64,
) -> MetricFamily {
    family(
        name,
        help,
        MetricType::GAUGE,
        s.pools
            .pools
            .iter()
            .filter(|pool| !pool.listener.is_unix())
            .map(|pool| gauge(id_labels(&pool.listener, &s.containers), value(pool)))
            .collect(),
    )
}

pub fn worker_families(s: &Snapshot) -> Vec<MetricFamily> {
    let p = &s.pools;
    use MetricType::{COUNTER, GAUGE};
    // Without a sampler (or before it saw a pool) there is no state to tell.
    let pool_states = p
        .pools
        .iter()
        .filter(|pool| pool.workers.iter().any(|w| w.busy.is_some()))
        .flat_map(|pool| {
            [("busy", pool.busy()), ("idle", pool.idle())].map(|(state, n)| {
                let mut labels = id_labels(&pool.listener, &s.containers);
                labels.push(label("state", state));
                gauge(labels, n as f64)
            })
        })
        .collect();
    vec![
        family(
            "observer_workers",
            "Worker processes of the listener's pool by state at the scrape: idle (a thread waits for new work: on the listener, its epoll, or the pool's accept lock) or busy.",
            GAUGE,
            pool_states,
        ),
        per_worker(
            s,
            "observer_worker_busy",
            "1 while the worker is busy (no thread of it waits for new work), 0 while idle, at the scrape.",
            GAUGE,
            |w| w.busy.map(|b| b as u8 as f64),
        ),
        per_worker(
            s,
            "observer_worker_busy_seconds_total",
            "Time the worker spent busy since observer first saw it, from the thread sampler (--collector.workers.sample-rate); rate() of it is utilisation.",
            COUNTER,
            |w| w.busy.map(|_| w.busy_seconds),
        ),
        per_worker(
            s,
            "observer_worker_accepts_total",
            "Connections the worker accepted from this listener since observer started.",
            COUNTER,
            |w| Some(w.accepts as f64),
        ),
        per_worker(
            s,
            "observer_worker_active_connections",
            "Connections the worker accepted from this listener that are still open.",
            GAUGE,
            |w| Some(w.active_connections as f64),
        ),
        per_worker(
            s,
            "observer_worker_connections_unread",
            "Of the worker's open connections, those whose client has sent bytes it has not started to read (TCP).",
            GAUGE,
            |w| Some(w.unread_connections as f64),
        ),
        per_pool(
            s,
            "observer_connections_unread",
            "Accepted connections of the listener whose client has sent bytes that no process has started to read: the queue after accept (TCP).",
            |pool| pool.unread.connections as f64,
        ),
        per_pool(
            s,
            "observer_connections_unread_oldest_seconds",
            "How long the oldest unread accepted connection has waited since it entered the accept queue (its accept-queue wait included); 0 when none (TCP).",
            |pool| pool.unread.oldest.as_secs_f64(),
        ),
        family(
            "observer_dispatcher_accepts_total",
            "Connections a dispatcher accepted from this listener since observer started and handed to its fed workers (Node's cluster primary, a fork-per-connection server); a dispatcher is not one of the pool's workers.",
            COUNTER,
            p.pools
                .iter()
                .flat_map(|pool| {
                    pool.dispatchers.iter().map(|d| {
                        let mut labels = id_labels(&pool.listener, &s.containers);
                        labels.push(label("comm", d.comm.clone()));
                        labels.push(label("pid", d.pid.to_string()));
                        counter(labels, d.accepts as f64)
                    })
                })
                .collect(),
        ),
        family(
            "observer_workers_over_limit",
            "Worker processes left out of this scrape because of --collector.max-workers.",
            GAUGE,
            vec![gauge(vec![], p.workers_over_cap as f64)],
        ),
    ]
}

/// The daemon's own health and build information.
pub fn daemon_families(snapshot: &Snapshot, d: &DaemonHealth) -> Vec<MetricFamily> {
    let c = &snapshot.listeners;
    use MetricType::{COUNTER, GAUGE};
    let build = gauge(
        vec![
            label("accept_source", d.accept_source.clone()),
            label("lockdown", d.lockdown.clone()),
            label("version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );
    let program_errors = d
        .program_errors
        .iter()
        .map(|(program, _)| counter(vec![label("program", program.clone())], 1.0))
        .collect();
    let lost = d
        .kernel_events_lost
        .iter()
        .map(|(reason, n)| counter(vec![label("reason", *reason)], *n as f64))
        .collect();
    vec![
        family(
            "observer_build_info",
            "Build and probe information: the accept source in use and the kernel lockdown mode.",
            GAUGE,
            vec![build],
        ),
        family(
            "observer_program_errors_total",
            "eBPF programs or attach points that failed to load or attach (non-fatal ones).",
            COUNTER,
            program_errors,
        ),
        family(
            "observer_kernel_events_lost_total",
            "Kernel events the eBPF programs could not count, by reason (e.g. a full map).",
            COUNTER,
            lost,
        ),
        family(
            "observer_listeners_over_limit",
            "Listening addresses left out of this scrape because of --collector.max-listeners.",
            GAUGE,
            vec![gauge(vec![], c.listeners_over_cap as f64)],
        ),
        family(
            "observer_worker_sample_passes_total",
            "Passes of the thread sampler over the watched workers' threads (between and at scrapes).",
            COUNTER,
            d.sampler
                .iter()
                .map(|c| counter(vec![], c.passes as f64))
                .collect(),
        ),
        family(
            "observer_worker_sample_interval_seconds",
            "Interval between the thread sampler's passes in effect: 1 / --collector.workers.sample-rate, or longer where passes would take more than 0.5% of a core.",
            GAUGE,
            d.sampler
                .iter()
                .map(|c| gauge(vec![], c.interval_seconds))
                .collect(),
        ),
        family(
            "observer_worker_sample_seconds_total",
            "Time the thread sampler spent in its passes (kernel iterator and classification).",
            COUNTER,
            d.sampler
                .iter()
                .map(|c| counter(vec![], c.seconds))
                .collect(),
        ),
        family(
            "observer_worker_sample_threads_total",
            "Threads of watched workers read by the thread sampler, summed over its passes.",
            COUNTER,
            d.sampler
                .iter()
                .map(|c| counter(vec![], c.threads_sampled as f64))
                .collect(),
        ),
        family(
            "observer_collect_errors_total",
            "Scrapes whose collection from the kernel failed.",
            COUNTER,
            vec![counter(vec![], d.collect_errors as f64)],
        ),
        family(
            "observer_collect_duration_seconds",
            "Time the last collection from the kernel took.",
            GAUGE,
            vec![gauge(vec![], d.last_collect_seconds)],
        ),
    ]
}

/// Encodes metric families in the Prometheus text format.
pub fn encode(families: &[MetricFamily]) -> Result<String> {
    // The text format has no way to say "a family with no series": leave them out.
    let present: Vec<MetricFamily> = families
        .iter()
        .filter(|f| !f.get_metric().is_empty())
        .cloned()
        .collect();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&present, &mut out)
        .context("encoding metrics")?;
    String::from_utf8(out).context("metrics text is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Accepts, Collection};
    use crate::workers::Pools;
    use observer_common::AF_INET;

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
        let text = encode(&listener_families(&one_listener())).unwrap();
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
        let text = encode(&listener_families(&snapshot)).unwrap();
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
            busy: None, // the thread sampler could not run on this kernel
            busy_seconds: 0.0,
        };
        snapshot.pools.pools.push(PoolView {
            listener: snapshot.listeners.listeners[0].id,
            workers: vec![worker],
            dispatchers: vec![],
            unread: Default::default(),
        });
        let text = encode(&worker_families(&snapshot)).unwrap();
        assert!(!text.contains("observer_workers{"), "{text}");
        assert!(!text.contains("observer_worker_busy"), "{text}");
        assert!(text.contains("observer_worker_accepts_total{"), "{text}");
        snapshot.pools.pools[0].workers[0].busy = Some(true);
        let text = encode(&worker_families(&snapshot)).unwrap();
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
        });
        let text = encode(&worker_families(&snapshot)).unwrap();
        assert!(text.contains(
            "observer_dispatcher_accepts_total{addr=\"127.0.0.1\",netns=\"4026531840\",port=\"8080\",comm=\"node\",pid=\"10\"} 12"
        ), "{text}");
        assert!(!text.contains("observer_worker_accepts_total{"), "{text}");
    }

    #[test]
    fn wait_histogram_is_cumulative_in_seconds_with_inf() {
        let text = encode(&listener_families(&one_listener())).unwrap();
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
