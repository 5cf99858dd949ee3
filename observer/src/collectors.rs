//! What the daemon collects and exports, in node_exporter's style: a flag
//! per collector that can be turned off (`--no-collector.workers`), and a
//! listener filter (`--collector.listeners.include` / `.exclude`) that
//! keeps an operator's pools and drops the rest before any work is done
//! for them (an excluded listener's accepts are not even counted in the
//! kernel: its key never reaches `LISTEN_PORTS`).
use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::sockets::ListenerId;

/// The collector flags of `observer serve`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CollectorOptions {
    #[arg(long = "collector.workers", overrides_with = "no_workers", hide = true)]
    workers: bool,
    /// Leave out the worker pools (collected by default: busy/idle from the
    /// thread sampler, per-worker accepts, busy time, open and unread
    /// connections, dispatchers); also stops the thread sampler and the
    /// /proc reads that find workers' event loops. A later
    /// --collector.workers turns them back on (likewise for each collector).
    #[arg(long = "no-collector.workers", overrides_with = "workers")]
    no_workers: bool,
    #[arg(
        long = "collector.workers.per-worker",
        overrides_with = "no_per_worker",
        hide = true
    )]
    per_worker: bool,
    /// Leave out the per-worker series (observer_worker_*), keeping the
    /// pools' own: workers busy and idle, free threads, requests in
    /// service, busy time (observer_workers_busy_seconds_total) and the
    /// busiest worker's share of accepts (observer_workers_accepts_max_share),
    /// on which every verdict and alert rests.
    #[arg(
        long = "no-collector.workers.per-worker",
        overrides_with = "per_worker"
    )]
    no_per_worker: bool,
    /// Add a pid label to every per-worker series: a series per process,
    /// which grows with every worker restart (for debugging).
    /// Without it, a worker's series are its slot's (label worker): stable
    /// across restarts.
    #[arg(long = "collector.workers.pid")]
    worker_pids: bool,
    #[arg(
        long = "collector.wait-histogram",
        overrides_with = "no_wait_histogram",
        hide = true
    )]
    wait_histogram: bool,
    /// Leave out the accept-queue wait histogram,
    /// observer_accept_queue_wait_seconds (23 series per listener with
    /// traffic).
    #[arg(
        long = "no-collector.wait-histogram",
        overrides_with = "wait_histogram"
    )]
    no_wait_histogram: bool,
    #[arg(long = "collector.sockets", overrides_with = "no_sockets", hide = true)]
    sockets: bool,
    /// Leave out the series of each socket of an SO_REUSEPORT group on its
    /// own, observer_listen_socket_*.
    #[arg(long = "no-collector.sockets", overrides_with = "sockets")]
    no_sockets: bool,
    /// Export what observer's own eBPF programs cost:
    /// observer_program_runs_total and observer_program_run_seconds_total,
    /// from the kernel's per-program counters. Off by default: it turns the
    /// kernel's BPF run-time statistics on while the daemon runs
    /// (BPF_ENABLE_STATS), which adds two clock reads to every run of every
    /// BPF program on the host. Where they are on already
    /// (kernel.bpf_stats_enabled=1) the series are exported without it.
    #[arg(long = "collector.program-stats", overrides_with = "no_program_stats")]
    program_stats: bool,
    #[arg(
        long = "no-collector.program-stats",
        overrides_with = "program_stats",
        hide = true
    )]
    no_program_stats: bool,
    /// Keep only listeners matching one of these selectors (comma-separated
    /// or repeated): port:8000, port:8000-8099, addr:127.0.0.1,
    /// path:/run/php/*.sock (a glob over the path as ss -lx prints it;
    /// @name for abstract sockets), netns:4026531840.
    #[arg(
        long = "collector.listeners.include",
        value_name = "SELECTOR",
        value_delimiter = ',',
        value_parser = Selector::parse
    )]
    include: Vec<Selector>,
    /// Drop listeners matching any of these selectors (same forms as
    /// --collector.listeners.include); applied after it.
    #[arg(
        long = "collector.listeners.exclude",
        value_name = "SELECTOR",
        value_delimiter = ',',
        value_parser = Selector::parse
    )]
    exclude: Vec<Selector>,
}

impl CollectorOptions {
    /// Everything on, no filter: the CLI views.
    pub fn all() -> Collectors {
        CollectorOptions::default().resolve()
    }

    pub fn resolve(&self) -> Collectors {
        Collectors {
            workers: !self.no_workers,
            per_worker: !self.no_per_worker,
            worker_pids: self.worker_pids,
            wait_histogram: !self.no_wait_histogram,
            sockets: !self.no_sockets,
            program_stats: self.program_stats,
            filter: ListenerFilter {
                include: self.include.clone(),
                exclude: self.exclude.clone(),
            },
        }
    }
}

/// What one daemon collects and exports.
#[derive(Clone, Debug)]
pub struct Collectors {
    pub workers: bool,
    /// The per-worker series (`--no-collector.workers.per-worker`).
    pub per_worker: bool,
    /// A pid label on per-worker series (`--collector.workers.pid`).
    pub worker_pids: bool,
    pub wait_histogram: bool,
    pub sockets: bool,
    /// Turn the kernel's BPF run-time statistics on (see
    /// `--collector.program-stats`).
    pub program_stats: bool,
    pub filter: ListenerFilter,
}

/// Which listeners are collected.
#[derive(Clone, Debug, Default)]
pub struct ListenerFilter {
    include: Vec<Selector>,
    exclude: Vec<Selector>,
}

impl ListenerFilter {
    pub fn keeps(&self, id: &ListenerId) -> bool {
        (self.include.is_empty() || self.include.iter().any(|s| s.matches(id)))
            && !self.exclude.iter().any(|s| s.matches(id))
    }
}

/// One listener selector of `--collector.listeners.include`/`exclude`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// TCP ports from..=to.
    Port { from: u16, to: u16 },
    /// A TCP listening address (`0.0.0.0` and `::` name the wildcard).
    Addr(IpAddr),
    /// A glob (`*`, `?`) over a Unix listener's path as `ss -lx` prints it.
    Path(String),
    /// A network namespace, by inode (the `netns` label).
    Netns(u32),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector> {
        let Some((kind, value)) = text.split_once(':') else {
            bail!(
                "listener selector {text:?} has no kind: use port:N, port:N-M, addr:IP, path:GLOB or netns:INODE"
            );
        };
        let number = |v: &str| -> Result<u16> {
            match v.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{v:?} in listener selector {text:?} is not a port (1-65535)"),
            }
        };
        Ok(match kind {
            "port" => match value.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (number(from)?, number(to)?);
                    if from > to {
                        bail!("port range {value:?} in listener selector {text:?} runs backwards");
                    }
                    Selector::Port { from, to }
                }
                None => {
                    let port = number(value)?;
                    Selector::Port {
                        from: port,
                        to: port,
                    }
                }
            },
            "addr" => match value.trim_matches(['[', ']']).parse() {
                Ok(ip) => Selector::Addr(ip),
                Err(_) => {
                    bail!("{value:?} in listener selector {text:?} is not an IPv4 or IPv6 address")
                }
            },
            "path" if !value.is_empty() => Selector::Path(value.to_owned()),
            "path" => bail!("listener selector {text:?} has an empty path glob"),
            "netns" => match value.parse() {
                Ok(inode) => Selector::Netns(inode),
                Err(_) => bail!(
                    "{value:?} in listener selector {text:?} is not a network namespace inode (the netns label, e.g. 4026531840)"
                ),
            },
            other => bail!(
                "unknown listener selector kind {other:?} in {text:?}: use port, addr, path or netns"
            ),
        })
    }

    pub fn matches(&self, id: &ListenerId) -> bool {
        match self {
            Selector::Port { from, to } => !id.is_unix() && (*from..=*to).contains(&id.port),
            Selector::Addr(ip) => !id.is_unix() && id.ip() == *ip,
            Selector::Path(glob) => id.is_unix() && glob_matches(glob, &id.path.display()),
            Selector::Netns(inode) => id.netns == *inode,
        }
    }
}

/// Shell-style wildcard match: `*` any run of characters (`/` included),
/// `?` one character; everything else literal.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let (glob, text): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    // Iterative match with backtracking to the last `*`: linear in practice.
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some('*') => {
                star = Some((g, t));
                g += 1;
            }
            Some(c) if *c == '?' || *c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match star {
                Some((sg, st)) => {
                    g = sg + 1;
                    t = st + 1;
                    star = Some((sg, st + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::UnixPath;
    use observer_common::{AF_INET, AF_INET6};

    fn tcp(addr: [u8; 4], port: u16) -> ListenerId {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&addr);
        ListenerId::tcp(7, AF_INET, a, port)
    }

    fn filter(include: &[&str], exclude: &[&str]) -> ListenerFilter {
        let parse = |v: &[&str]| v.iter().map(|s| Selector::parse(s).unwrap()).collect();
        ListenerFilter {
            include: parse(include),
            exclude: parse(exclude),
        }
    }

    #[test]
    fn selectors_parse_each_kind_and_reject_the_rest_with_the_forms() {
        assert_eq!(
            Selector::parse("port:8000-8099").unwrap(),
            Selector::Port {
                from: 8000,
                to: 8099
            }
        );
        assert_eq!(
            Selector::parse("addr:[::1]").unwrap(),
            Selector::Addr("::1".parse().unwrap())
        );
        assert_eq!(
            Selector::parse("netns:4026531840").unwrap(),
            Selector::Netns(4026531840)
        );
        for bad in [
            "8000",
            "port:0",
            "port:9-1",
            "port:x",
            "addr:host",
            "path:",
            "pid:1",
            "netns:-1",
        ] {
            let e = Selector::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) || e.contains("port"), "{bad}: {e}");
        }
        assert!(
            Selector::parse("pid:1")
                .unwrap_err()
                .to_string()
                .contains("port, addr, path or netns")
        );
    }

    #[test]
    fn include_keeps_only_matches_and_exclude_wins() {
        let f = filter(&["port:8000-8010", "path:/run/php/*.sock"], &["port:8005"]);
        assert!(f.keeps(&tcp([0, 0, 0, 0], 8000)));
        assert!(!f.keeps(&tcp([0, 0, 0, 0], 8005)));
        assert!(!f.keeps(&tcp([0, 0, 0, 0], 9000)));
        let php = ListenerId::unix(7, UnixPath::new(b"/run/php/fpm.sock"));
        let other = ListenerId::unix(7, UnixPath::new(b"/run/app.sock"));
        assert!(f.keeps(&php));
        assert!(!f.keeps(&other));
        // A port selector never matches a Unix listener, nor a path a TCP one.
        assert!(filter(&[], &["port:1-65535"]).keeps(&php));
        assert!(filter(&[], &["path:*"]).keeps(&tcp([127, 0, 0, 1], 80)));
    }

    #[test]
    fn addr_and_netns_select_what_the_labels_say() {
        let wildcard6 = ListenerId::tcp(9, AF_INET6, [0; 16], 80);
        assert!(!filter(&["addr:::"], &[]).keeps(&tcp([0, 0, 0, 0], 80)));
        assert!(filter(&["addr:::"], &[]).keeps(&wildcard6));
        assert!(filter(&["addr:127.0.0.1"], &[]).keeps(&tcp([127, 0, 0, 1], 80)));
        assert!(filter(&["netns:9"], &[]).keeps(&wildcard6));
        assert!(!filter(&["netns:9"], &[]).keeps(&tcp([127, 0, 0, 1], 80)));
        assert!(filter(&[], &[]).keeps(&wildcard6));
    }

    #[test]
    fn globs_match_like_a_shell_across_slashes() {
        assert!(glob_matches("/run/*.sock", "/run/php/fpm.sock"));
        assert!(glob_matches("@app-?", "@app-1"));
        assert!(!glob_matches("@app-?", "@app-12"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
        assert!(glob_matches("/exact", "/exact"));
        assert!(!glob_matches("/exact", "/exact2"));
    }
}
