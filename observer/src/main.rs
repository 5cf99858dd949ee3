//! observer: why requests wait before any worker sees them.
//!
//! The data path, one module per stage:
//! kernel programs (observer-ebpf) → `kernel` (load, attach, read maps) →
//! `aggregate` (per-listener figures) and `workers` (per-pool figures) →
//! `metrics` / `serve` (Prometheus).
mod aggregate;
mod cli;
mod containers;
mod kernel;
mod metrics;
mod pipeline;
mod serve;
mod workers;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let level = if cli.verbose {
        "info,observer=debug"
    } else {
        "warn,observer=info"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    let result = match cli.command {
        cli::Command::Serve(opts) => serve::run(opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
