//! Why a listener's connections wait: one verdict per listener from what
//! `observer explain` saw of it over a window, with the evidence and the
//! fix. Pure logic: the window comes in, the verdict goes out.
use serde::Serialize;

/// One worker over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerWindow {
    pub pid: u32,
    pub comm: String,
    /// Connections it accepted in the window.
    pub accepts: u64,
    /// Seconds it was busy in the window (the thread sampler's).
    pub busy_seconds: f64,
    /// Its scheduler state at the end (`R`, `S`, `D`, `T`, …; `?` unknown).
    pub state: char,
}

/// What was seen of one listener over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Window {
    pub seconds: f64,
    /// Collections made during the window, and in how many of them every
    /// worker was busy, and the queue was not empty.
    pub samples: u32,
    pub samples_all_busy: u32,
    pub samples_queued: u32,
    /// Connections that entered the accept queue, and that were accepted.
    pub arrivals: u64,
    pub accepts: u64,
    /// Dropped in the window (`None` for Unix listeners: not counted).
    pub drops: Option<u64>,
    pub queue_len: u64,
    pub queue_max: u64,
    /// The oldest queued connection's wait at the first and last sample.
    pub oldest_first: f64,
    pub oldest_last: f64,
    /// Mean accept-queue wait (exact: the kernel sums the waits), and the
    /// histogram's p50 and p99 (interpolated within its buckets).
    pub wait_mean: Option<f64>,
    pub wait_p50: Option<f64>,
    pub wait_p99: Option<f64>,
    pub workers: Vec<WorkerWindow>,
    /// Processes that accept and hand connections to the workers.
    pub dispatchers: usize,
    /// `net.core.somaxconn` of the listener's namespace, where known.
    pub somaxconn: Option<u64>,
    /// A socket of the listener's reuseport group that no process holds
    /// has connections queued.
    pub orphaned_socket: bool,
    /// Listening sockets behind the address (more than 1: a reuseport group).
    pub sockets: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Saturated,
    NotAccepting,
    Overflowing,
    Uneven,
    Healthy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Saturated => "saturated",
            Kind::NotAccepting => "not accepting",
            Kind::Overflowing => "overflowing",
            Kind::Uneven => "uneven",
            Kind::Healthy => "healthy",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub kind: Kind,
    /// The evidence, a line each.
    pub evidence: Vec<String>,
    /// What to do about it.
    pub fix: String,
    /// Saturated: workers needed to keep up (Little's law).
    pub workers_needed: Option<u64>,
}

impl Window {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.seconds.max(1e-3)
    }

    fn most(&self, n: u32) -> bool {
        self.samples > 0 && n * 2 > self.samples
    }

    /// Connections waited: the queue was non-empty most of the window, or
    /// its head waited over a second at the end.
    fn waited(&self) -> bool {
        self.most(self.samples_queued) || self.oldest_last >= 1.0
    }

    /// The head's wait grew with the clock: nobody took it.
    fn head_aged(&self) -> bool {
        self.oldest_last > 0.0 && self.oldest_last - self.oldest_first >= 0.8 * self.seconds
    }

    fn busy_seconds(&self) -> f64 {
        self.workers.iter().map(|w| w.busy_seconds).sum()
    }

    /// Mean seconds a connection holds a worker.
    fn service_seconds(&self) -> Option<f64> {
        (self.accepts > 0 && self.busy_seconds() > 0.0)
            .then(|| self.busy_seconds() / self.accepts as f64)
    }
}

fn pids(workers: &[&WorkerWindow]) -> String {
    workers
        .iter()
        .map(|w| format!("{} ({})", w.pid, w.comm))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(s: f64) -> String {
    crate::quantile::human_seconds(s)
}

/// The verdict for one listener: the first that the evidence supports of
/// not accepting, saturated, overflowing, uneven; healthy otherwise.
pub fn judge(w: &Window) -> Verdict {
    not_accepting(w)
        .or_else(|| saturated(w))
        .or_else(|| overflowing(w))
        .or_else(|| uneven(w))
        .unwrap_or_else(|| healthy(w))
}

/// The waits line every verdict starts its evidence with.
fn waits_line(w: &Window) -> String {
    let p = |q: Option<f64>| q.map_or_else(|| "-".into(), secs);
    format!(
        "wait mean {}, p50 {}, p99 {} over {:.0} s; queue {}/{}, oldest {}",
        p(w.wait_mean),
        p(w.wait_p50),
        p(w.wait_p99),
        w.seconds,
        w.queue_len,
        w.queue_max,
        if w.oldest_last > 0.0 {
            secs(w.oldest_last)
        } else {
            "-".into()
        }
    )
}

fn not_accepting(w: &Window) -> Option<Verdict> {
    if w.accepts > 0 || !(w.waited() || w.head_aged()) {
        return None;
    }
    let mut evidence = vec![
        waits_line(w),
        if w.arrivals > 0 {
            format!(
                "{} connection(s) queued in {:.0} s and none accepted",
                w.arrivals, w.seconds
            )
        } else {
            format!(
                "{} connection(s) waiting, none accepted in {:.0} s",
                w.queue_len, w.seconds
            )
        },
    ];
    let stopped: Vec<&WorkerWindow> = w.workers.iter().filter(|x| x.state == 'T').collect();
    let idle: Vec<&WorkerWindow> = w.workers.iter().filter(|x| x.busy_seconds == 0.0).collect();
    let fix = if w.workers.is_empty() && w.dispatchers == 0 {
        evidence.push("no process holds the listener".into());
        "no process holds this socket: start its server, or find who left it open \
         (an fd passed away, or a kernel socket)"
            .to_owned()
    } else if !stopped.is_empty() {
        evidence.push(format!(
            "stopped (state T): {} of {} holders: {}",
            stopped.len(),
            w.workers.len(),
            pids(&stopped)
        ));
        format!(
            "its holders are stopped: `kill -CONT {}`, and find what stopped them \
             (a debugger, a job-control signal)",
            stopped
                .iter()
                .map(|x| x.pid.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
    } else if w.orphaned_socket {
        evidence.push("a socket of its SO_REUSEPORT group has connections and no holder".into());
        "an orphaned reuseport socket: the kernel still hashes connections to it; restart \
         the server so that every socket of the group has an acceptor"
            .to_owned()
    } else if !idle.is_empty() && idle.len() == w.workers.len() {
        evidence.push(format!(
            "its {} worker(s) were idle (waiting for work) the whole window",
            idle.len()
        ));
        "workers wait but nothing is accepted: they likely wait on an accept lock that is \
         not being passed, or watch another socket; look at the lock's holder"
            .to_owned()
    } else {
        let all: Vec<&WorkerWindow> = w.workers.iter().collect();
        evidence.push(format!(
            "its holders never called accept() in the window: {}",
            pids(&all)
        ));
        "no acceptor: the processes holding the socket do not accept from it (still \
         starting, blocked, or not serving it); see what they are doing (`cat \
         /proc/PID/stack`, py-spy, gdb)"
            .to_owned()
    };
    Some(Verdict {
        kind: Kind::NotAccepting,
        evidence,
        fix,
        workers_needed: None,
    })
}

fn saturated(w: &Window) -> Option<Verdict> {
    if w.workers.is_empty() || w.accepts == 0 || !w.most(w.samples_all_busy) || !w.waited() {
        return None;
    }
    let arrive = w.rate(w.arrivals.max(w.accepts));
    let complete = w.rate(w.accepts);
    let mut evidence = vec![
        waits_line(w),
        format!(
            "{} workers, all busy in {} of {} samples",
            w.workers.len(),
            w.samples_all_busy,
            w.samples
        ),
    ];
    let workers = w.workers.len() as u64;
    let needed = w.service_seconds().map(|service| {
        let busy = arrive * service;
        let needed = (busy.ceil() as u64).max(1);
        let headroom = match needed.cmp(&workers) {
            std::cmp::Ordering::Greater => format!(": {} short", needed - workers),
            std::cmp::Ordering::Equal => ": no headroom".to_owned(),
            std::cmp::Ordering::Less => String::new(),
        };
        evidence.push(format!(
            "{arrive:.1} conn/s arrive, {complete:.1} conn/s are accepted; each holds a worker \
             {}: {arrive:.1} × {service:.3} s = {busy:.1} workers busy on average → needs ≥ \
             {needed}, has {workers}{headroom}",
            secs(service)
        ));
        needed
    });
    if w.queue_len > 0 {
        evidence.push(format!(
            "now {} connections are in the pool or its queue ({workers} served, {} waiting): \
             {} workers would serve them all at once",
            workers + w.queue_len,
            w.queue_len,
            workers + w.queue_len
        ));
    }
    if let Some(drops) = w.drops.filter(|d| *d > 0) {
        evidence.push(format!(
            "{drops} connection(s) dropped: the queue ({}) is full",
            w.queue_max
        ));
    }
    // A pool busy all the time has no headroom: one more at least.
    let more = match needed {
        Some(n) => format!(
            "at least {} workers (there are {workers})",
            n.max(workers + 1)
        ),
        None => format!("more than {workers} workers"),
    };
    Some(Verdict {
        kind: Kind::Saturated,
        evidence,
        fix: format!(
            "run {more}, or make each connection faster; until then connections wait in \
             the queue, and are dropped when it is full"
        ),
        workers_needed: needed,
    })
}

fn overflowing(w: &Window) -> Option<Verdict> {
    let drops = w.drops.filter(|d| *d > 0)?;
    let mut evidence = vec![
        waits_line(w),
        format!(
            "{drops} connection(s) dropped in {:.0} s; the backlog in effect is {}",
            w.seconds, w.queue_max
        ),
    ];
    match w.somaxconn {
        Some(max) if w.queue_max >= max => evidence.push(format!(
            "net.core.somaxconn is {max}: it capped the app's backlog, or the app asked for \
             exactly {max} (the kernel keeps only the smaller of the two, so which cannot be \
             known)"
        )),
        Some(max) => evidence.push(format!(
            "net.core.somaxconn is {max}: not the cap; the app asked for {}",
            w.queue_max
        )),
        None => evidence.push(
            "net.core.somaxconn of this namespace is not known here: whether it capped the \
             backlog cannot be told"
                .into(),
        ),
    }
    evidence.push(
        "clients whose SYN was dropped retry after 1 s, then 3 s, 7 s, 15 s (doubling): each \
         drop adds a second or more to a request"
            .into(),
    );
    Some(Verdict {
        kind: Kind::Overflowing,
        evidence,
        fix: "raise the app's listen backlog (and net.core.somaxconn if it caps it) to absorb \
              bursts, or accept faster (more workers)"
            .into(),
        workers_needed: None,
    })
}

fn uneven(w: &Window) -> Option<Verdict> {
    let n = w.workers.len();
    let total: u64 = w.workers.iter().map(|x| x.accepts).sum();
    if n < 2 || total < 20 {
        return None;
    }
    let top = w.workers.iter().max_by_key(|x| x.accepts)?;
    let share = top.accepts as f64 / total as f64;
    let fair = 1.0 / n as f64;
    let idle: Vec<&WorkerWindow> = w
        .workers
        .iter()
        .filter(|x| x.pid != top.pid && x.busy_seconds < 0.5 * w.seconds)
        .collect();
    if share < 0.5 || share < 2.0 * fair || idle.is_empty() {
        return None;
    }
    Some(Verdict {
        kind: Kind::Uneven,
        evidence: vec![
            waits_line(w),
            format!(
                "worker {} ({}) took {:.0}% of {total} accepts ({:.0}% would be even) while {} \
                 other(s) were mostly idle",
                top.pid,
                top.comm,
                share * 100.0,
                fair * 100.0,
                idle.len()
            ),
        ],
        fix: if w.sockets > 1 {
            format!(
                "the kernel steers most connections to one of the {} sockets of the \
                 SO_REUSEPORT group: check the group's steering program \
                 (SO_ATTACH_REUSEPORT_CBPF/EBPF) or what all clients share (one source \
                 address and port hash to one socket)",
                w.sockets
            )
        } else {
            "spread accepts across workers: SO_REUSEPORT (nginx `reuseport`, gunicorn \
             `--reuse-port`), or nginx's `accept_mutex on`; or run fewer workers"
                .into()
        },
        workers_needed: None,
    })
}

fn healthy(w: &Window) -> Verdict {
    let busy = if w.workers.is_empty() {
        "no workers seen".to_owned()
    } else {
        format!(
            "{:.1} of {} workers busy on average",
            w.busy_seconds() / w.seconds.max(1e-3),
            w.workers.len()
        )
    };
    Verdict {
        kind: Kind::Healthy,
        evidence: vec![
            waits_line(w),
            format!("{:.1} conn/s accepted; {busy}", w.rate(w.accepts)),
        ],
        fix: "nothing to do".into(),
        workers_needed: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: u32, accepts: u64, busy_seconds: f64) -> WorkerWindow {
        WorkerWindow {
            pid,
            comm: "gunicorn".into(),
            accepts,
            busy_seconds,
            state: 'S',
        }
    }

    fn window() -> Window {
        Window {
            seconds: 10.0,
            samples: 20,
            samples_all_busy: 0,
            samples_queued: 0,
            arrivals: 50,
            accepts: 50,
            drops: Some(0),
            queue_len: 0,
            queue_max: 128,
            oldest_first: 0.0,
            oldest_last: 0.0,
            wait_mean: Some(0.0001),
            wait_p50: Some(0.0001),
            wait_p99: Some(0.001),
            workers: vec![worker(1, 25, 2.0), worker(2, 25, 2.0)],
            dispatchers: 0,
            somaxconn: Some(4096),
            orphaned_socket: false,
            sockets: 1,
        }
    }

    #[test]
    fn a_pool_busy_all_window_with_a_queue_is_saturated_and_littles_law_sizes_it() {
        // 2 workers, 0.3 s a request (19.8 busy seconds for 66 accepts).
        let w = Window {
            samples_all_busy: 20,
            samples_queued: 20,
            arrivals: 70,
            accepts: 66,
            queue_len: 6,
            workers: vec![worker(1, 33, 9.9), worker(2, 33, 9.9)],
            ..window()
        };
        let v = judge(&w);
        assert_eq!(v.kind, Kind::Saturated);
        // 7.0/s arrive × 0.3 s = 2.1 → 3.
        assert_eq!(v.workers_needed, Some(3));
        // At exactly the pool's capacity: needs what it has, and the fix
        // asks for one more.
        let at_capacity = Window {
            arrivals: 66,
            ..w.clone()
        };
        let v2 = judge(&at_capacity);
        assert_eq!(v2.workers_needed, Some(2));
        assert!(
            v2.evidence[2].ends_with("→ needs ≥ 2, has 2: no headroom"),
            "{:?}",
            v2.evidence
        );
        assert!(
            v2.fix.contains("at least 3 workers (there are 2)"),
            "{}",
            v2.fix
        );
        assert!(
            v.fix.contains("at least 3 workers (there are 2)"),
            "{}",
            v.fix
        );
        assert!(v.evidence[1].contains("all busy in 20 of 20 samples"));
        assert!(
            v.evidence[2].contains(
                "7.0 × 0.300 s = 2.1 workers busy on average → needs ≥ 3, has 2: 1 short"
            ),
            "{:?}",
            v.evidence
        );
        assert!(
            v.evidence[3]
                .contains("now 8 connections are in the pool or its queue (2 served, 6 waiting)"),
            "{:?}",
            v.evidence
        );
    }

    #[test]
    fn a_queue_nobody_takes_is_not_accepting_with_the_cause_the_evidence_shows() {
        let stuck = Window {
            samples_queued: 20,
            arrivals: 3,
            accepts: 0,
            queue_len: 3,
            oldest_first: 1.0,
            oldest_last: 11.0,
            ..window()
        };
        let stopped = Window {
            workers: vec![
                WorkerWindow {
                    state: 'T',
                    ..worker(7, 0, 0.0)
                },
                WorkerWindow {
                    state: 'T',
                    ..worker(8, 0, 0.0)
                },
            ],
            ..stuck.clone()
        };
        let v = judge(&stopped);
        assert_eq!(v.kind, Kind::NotAccepting);
        assert_eq!(
            v.evidence[1],
            "3 connection(s) queued in 10 s and none accepted"
        );
        let before = Window {
            arrivals: 0,
            ..stopped.clone()
        };
        assert_eq!(
            judge(&before).evidence[1],
            "3 connection(s) waiting, none accepted in 10 s"
        );
        assert!(
            v.evidence[2].contains("stopped (state T): 2 of 2"),
            "{:?}",
            v.evidence
        );
        assert!(v.fix.contains("kill -CONT 7 8"), "{}", v.fix);

        let nobody = Window {
            workers: vec![],
            ..stuck.clone()
        };
        assert!(judge(&nobody).evidence[2].contains("no process holds"));

        let never = Window {
            workers: vec![worker(9, 0, 10.0)],
            ..stuck.clone()
        };
        let v = judge(&never);
        assert!(
            v.evidence[2].contains("never called accept()"),
            "{:?}",
            v.evidence
        );
        assert!(v.fix.starts_with("no acceptor"));

        let lock = Window {
            workers: vec![worker(9, 0, 0.0), worker(10, 0, 0.0)],
            ..stuck
        };
        assert!(judge(&lock).fix.contains("accept lock"));
    }

    #[test]
    fn drops_without_saturation_are_overflowing_and_name_somaxconn() {
        let w = Window {
            drops: Some(12),
            queue_max: 8,
            somaxconn: Some(4096),
            ..window()
        };
        let v = judge(&w);
        assert_eq!(v.kind, Kind::Overflowing);
        assert!(
            v.evidence[1].contains("12 connection(s) dropped"),
            "{:?}",
            v.evidence
        );
        assert!(v.evidence[2].contains("the app asked for 8"));
        assert!(v.evidence[3].contains("retry after 1 s"));
        let capped = Window {
            somaxconn: Some(8),
            ..w.clone()
        };
        assert!(judge(&capped).evidence[2].contains("capped"));
        let unknown = Window {
            somaxconn: None,
            ..w
        };
        assert!(judge(&unknown).evidence[2].contains("cannot be told"));
    }

    #[test]
    fn one_worker_taking_most_accepts_while_others_idle_is_uneven() {
        let w = Window {
            accepts: 100,
            arrivals: 100,
            workers: vec![
                worker(1, 85, 6.0),
                worker(2, 5, 0.4),
                worker(3, 5, 0.4),
                worker(4, 5, 0.4),
            ],
            ..window()
        };
        let v = judge(&w);
        assert_eq!(v.kind, Kind::Uneven);
        assert!(v.evidence[1].contains("took 85% of 100 accepts (25% would be even)"));
        assert!(v.fix.contains("SO_REUSEPORT (nginx"), "{}", v.fix);
        let group = Window { sockets: 4, ..w };
        assert!(
            judge(&group).fix.contains("one of the 4 sockets"),
            "{}",
            judge(&group).fix
        );
        // An even spread is healthy.
        assert_eq!(judge(&window()).kind, Kind::Healthy);
    }

    #[test]
    fn a_light_load_is_healthy() {
        let v = judge(&window());
        assert_eq!(v.kind, Kind::Healthy);
        assert!(
            v.evidence[1].contains("5.0 conn/s accepted; 0.4 of 2 workers busy"),
            "{:?}",
            v.evidence
        );
    }
}
