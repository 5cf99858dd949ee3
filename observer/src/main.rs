//! The `observer` command: parse flags, run the command, print one error
//! line on failure.
use clap::Parser as _;
use observer::{cli, serve, views};

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // The daemon logs what it attached; the ad-hoc commands keep their
    // output to what was asked for.
    let level = match (&cli.command, cli.verbose) {
        (_, true) => "info,observer=debug",
        (cli::Command::Serve(_), false) => "warn,observer=info",
        (_, false) => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    let result = match cli.command {
        cli::Command::Serve(opts) => serve::run(opts),
        cli::Command::Listeners(opts) => views::listeners::run(opts),
        cli::Command::Trace(opts) => views::trace::run(opts),
        cli::Command::Top(opts) => views::top::run(opts),
        cli::Command::Doctor(opts) => views::doctor::run(opts),
        cli::Command::Explain(opts) => views::explain::run(opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `observer listeners --json | head`: the reader left; not an error.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}
