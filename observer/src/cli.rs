//! Command-line interface: one binary, a daemon and ad-hoc commands.
use clap::{Parser, Subcommand};

use crate::{
    serve::ServeOptions,
    views::{
        doctor::DoctorOptions, explain::ExplainOptions, listeners::ListenersOptions,
        top::TopOptions, trace::TraceOptions,
    },
};

const EXAMPLES: &str = "\
Examples:
  observer serve                                  # metrics on http://127.0.0.1:9688/metrics
  observer explain                                # why connections wait, per listener, and the fix
  observer listeners                              # every listener: queue, waits, workers
  observer trace --port 8000 --min-wait 10ms      # each accepted connection that waited
  observer top                                    # live view; s: sort, q: quit
  observer doctor                                 # can observer run here, and with what";

const SERVE_EXAMPLES: &str = "\
Examples:
  observer serve
  observer serve --web.listen-address 0.0.0.0:9688 --web.telemetry-path /metrics
  curl -s localhost:9688/metrics | grep observer_listen_queue_length";

const LISTENERS_EXAMPLES: &str = "\
Examples:
  observer listeners                      # a table, measured over 1 s
  observer listeners --port 8000 --interval 5
  observer listeners --json | jq '.[] | select(.queue_length > 0)'";

const TRACE_EXAMPLES: &str = "\
Examples:
  observer trace                                  # every accepted TCP connection
  observer trace --port 8000 --min-wait 100ms     # the ones that waited
  observer trace --comm gunicorn --json | jq .wait_seconds
  observer trace --count 100 --duration 10";

const DOCTOR_EXAMPLES: &str = "\
Examples:
  observer doctor                   # exit status 0: `observer serve` can run here
  observer doctor --kernel.btf /path/to/vmlinux.btf";

const EXPLAIN_EXAMPLES: &str = "\
Examples:
  observer explain                        # every listener with traffic, watched for 10 s
  observer explain --port 8000 --interval 30
  observer explain --json | jq '.[] | select(.verdict.kind != \"healthy\")'";

const TOP_EXAMPLES: &str = "\
Examples:
  observer top
  observer top --sort queue --interval 2 --port 8000";

/// Why requests wait before any worker sees them: an eBPF observer of TCP
/// listen (accept) queues and the processes that accept from them.
#[derive(Debug, Parser)]
#[command(name = "observer", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Log debug details (e.g. the eBPF verifier log when a program is refused).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load the eBPF programs and serve Prometheus metrics.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeOptions),
    /// Print every listening socket once: queue depth and limit, accept rate,
    /// queue-wait p50/p99, busy/total workers, drops, container.
    #[command(after_help = LISTENERS_EXAMPLES)]
    Listeners(ListenersOptions),
    /// Stream one line per accepted connection: listener, peer, accepting
    /// process, time waited in the accept queue. Ctrl-C stops.
    #[command(after_help = TRACE_EXAMPLES)]
    Trace(TraceOptions),
    /// Live view of listeners and their workers.
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopOptions),
    /// Watch every listener for a while, then say for each one with traffic
    /// or a queue why its connections wait: saturated, not accepting,
    /// overflowing, uneven or healthy, with the evidence and the fix.
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainOptions),
    /// Check this host: kernel, BTF, lockdown, privileges, tracefs, which
    /// programs load; exit status 0 when `observer serve` can run.
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorOptions),
}
