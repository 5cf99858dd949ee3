//! Command-line interface: one binary, a daemon and ad-hoc commands.
use clap::{Parser, Subcommand};

use crate::serve::ServeOptions;

const EXAMPLES: &str = "\
Examples:
  observer serve                                  # metrics on http://127.0.0.1:9688/metrics
  observer serve --web.listen-address 0.0.0.0:9688
  curl -s localhost:9688/metrics | grep observer_listen_queue_length";

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
    #[command(after_help = EXAMPLES)]
    Serve(ServeOptions),
}
