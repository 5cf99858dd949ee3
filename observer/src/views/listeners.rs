//! `observer listeners`: a one-shot table of every listening socket, like
//! `ss -ltn`, with what ss lacks: accept rate, queue-wait p50/p99, busy and
//! total workers, drops and container, measured over a short interval.
use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    pipeline::{KernelOptions, Pipeline},
    quantile::human_seconds,
    views::rows::{ListenerFilter, ListenerRow, rows},
};

#[derive(Clone, Debug, clap::Args)]
pub struct ListenersOptions {
    /// How long to measure rates and waits over, e.g. 500ms, 5s, 1m (a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = super::duration::window_seconds)]
    pub interval: f64,
    /// One JSON document (an array of listeners, with their workers).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: ListenerFilter,
    #[command(flatten)]
    pub kernel: KernelOptions,
}

pub fn run(opts: ListenersOptions) -> Result<()> {
    let mut pipeline = Pipeline::start_unbounded(&opts.kernel)?;
    let before = pipeline.collect()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(opts.interval));
    let after = pipeline.collect()?;
    let mut table = rows(
        &before,
        &after,
        started.elapsed().as_secs_f64(),
        &opts.filter,
    );
    table.sort_by(|a, b| {
        b.queue_length
            .cmp(&a.queue_length)
            .then(a.port.cmp(&b.port))
            .then(a.netns.cmp(&b.netns))
    });
    let mut out = std::io::stdout().lock();
    if opts.json {
        serde_json::to_writer_pretty(&mut out, &table).context("writing JSON")?;
        writeln!(out)?;
    } else {
        write!(out, "{}", format_table(&table))?;
    }
    Ok(())
}

/// The oldest queued connection's wait; "-" when nothing waits.
pub fn oldest(seconds: f64) -> String {
    if seconds > 0.0 {
        human_seconds(seconds)
    } else {
        "-".into()
    }
}

fn or_dash(v: Option<f64>) -> String {
    v.map(human_seconds).unwrap_or_else(|| "-".into())
}

/// The table, one listener a line, widths fitted to the content.
pub fn format_table(rows: &[ListenerRow]) -> String {
    let header = [
        "NETNS",
        "LISTEN",
        "QUEUE",
        "MAX",
        "OLDEST",
        "UNREAD",
        "SYNQ",
        "ACCEPT/s",
        "WAIT-p50",
        "WAIT-p99",
        "BUSY/WORKERS",
        "DROPS",
        "CONTAINER",
    ];
    let cells: Vec<[String; 13]> = rows
        .iter()
        .map(|r| {
            [
                r.netns.to_string(),
                r.listen.clone(),
                r.queue_length.to_string(),
                r.queue_max.to_string(),
                oldest(r.oldest_wait_seconds),
                r.unread_connections
                    .map_or_else(|| "-".into(), |n| n.to_string()),
                r.syn_queue_length.to_string(),
                format!("{:.1}", r.accepts_per_second),
                or_dash(r.wait_p50_seconds),
                or_dash(r.wait_p99_seconds),
                if r.workers == 0 {
                    "-".into()
                } else {
                    format!("{}/{}", r.workers_busy, r.workers)
                },
                r.drops.map_or_else(|| "-".into(), |d| d.to_string()),
                r.pod
                    .clone()
                    .or_else(|| {
                        r.container_id
                            .as_ref()
                            .map(|c| c[..12.min(c.len())].to_owned())
                    })
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths.iter()).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if i == 1 || i == 11 {
                s += &format!("{cell:<w$}  ")
            } else {
                s += &format!("{cell:>w$}  ")
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut text = line(&header.map(String::from));
    for row in &cells {
        text += &line(row);
    }
    text
}
