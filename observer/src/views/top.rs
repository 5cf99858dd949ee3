//! `observer top`: a live view of listeners and their workers, refreshed
//! every interval, sorted by queue-wait p99 or queue depth. Keys: `s` sort,
//! up/down select a listener (its workers show below), `q` quit. Fits 80
//! columns.
use std::{
    collections::{HashMap, VecDeque},
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use crossterm::{
    cursor, event,
    event::{Event, KeyCode, KeyEvent, KeyModifiers},
    execute, queue, terminal,
};

use crate::{
    pipeline::{KernelOptions, Pipeline, Snapshot},
    quantile::human_seconds,
    views::{
        explain::{Explained, count_samples, explain},
        rows::{ListenerFilter, ListenerRow, rows},
    },
};

/// How far back the selected listener's verdict looks.
const VERDICT_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, clap::Args)]
pub struct TopOptions {
    /// Time between refreshes, e.g. 500ms, 2s (a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = super::duration::window_seconds)]
    pub interval: f64,
    /// Sort order at start: `wait` (p99 queue wait) or `queue` (depth).
    #[arg(long, value_enum, default_value = "wait")]
    pub sort: SortBy,
    #[command(flatten)]
    pub filter: ListenerFilter,
    #[command(flatten)]
    pub kernel: KernelOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Wait,
    Queue,
}

fn sort(rows: &mut [ListenerRow], by: SortBy) {
    match by {
        SortBy::Wait => rows.sort_by(|a, b| {
            b.wait_p99_seconds
                .unwrap_or(0.0)
                .total_cmp(&a.wait_p99_seconds.unwrap_or(0.0))
                .then(b.queue_length.cmp(&a.queue_length))
        }),
        SortBy::Queue => rows.sort_by(|a, b| {
            b.queue_length
                .cmp(&a.queue_length)
                .then(b.accepts_per_second.total_cmp(&a.accepts_per_second))
        }),
    }
}

fn short(v: Option<f64>) -> String {
    v.map(human_seconds).unwrap_or_else(|| "-".into())
}

fn clip(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

/// The screen as lines of at most `width` characters.
pub fn render(
    rows: &[ListenerRow],
    selected: usize,
    verdicts: &[Explained],
    by: SortBy,
    width: usize,
    height: usize,
) -> Vec<String> {
    let sort_name = if by == SortBy::Wait {
        "wait p99"
    } else {
        "queue"
    };
    let mut lines = vec![
        format!(
            "observer top — {} listeners — sorted by {sort_name} — s: sort  ↑↓: select  q: quit",
            rows.len()
        ),
        format!(
            "{:<24} {:>11} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "LISTEN",
            "QUEUE/MAX",
            "OLDEST",
            "UNREAD",
            "ACC/s",
            "WAIT-p50",
            "WAIT-p99",
            "BUSY/W",
            "DROPS"
        ),
    ];
    let list_rows = height.saturating_sub(8).max(3);
    for (i, r) in rows.iter().enumerate().take(list_rows) {
        let mark = if i == selected { ">" } else { " " };
        let workers = if r.workers == 0 {
            "-".into()
        } else {
            format!("{}/{}", r.workers_busy, r.workers)
        };
        lines.push(format!(
            "{mark}{:<23} {:>11} {:>8} {:>6} {:>8.1} {:>8} {:>8} {:>8} {:>6}",
            clip(&r.listen, 23),
            format!("{}/{}", r.queue_length, r.queue_max),
            short((r.oldest_wait_seconds > 0.0).then_some(r.oldest_wait_seconds)),
            r.unread_connections
                .map_or_else(|| "-".into(), |n| n.to_string()),
            r.accepts_per_second,
            short(r.wait_p50_seconds),
            short(r.wait_p99_seconds),
            workers,
            r.drops.map_or_else(|| "-".into(), |d| d.to_string())
        ));
    }
    if let Some(r) = rows.get(selected) {
        lines.push(String::new());
        if let Some(e) = verdicts
            .iter()
            .find(|e| e.listen == r.listen && e.netns == r.netns)
        {
            let why = e.verdict.evidence.get(1).map(String::as_str).unwrap_or("");
            lines.push(format!(
                "verdict ({:.0} s): {} — {why}",
                e.window.seconds,
                e.verdict.kind.name().to_uppercase()
            ));
            lines.push(format!("fix: {}", e.verdict.fix));
        }
        lines.push(format!("workers of {} (netns {})", r.listen, r.netns));
        lines.push(format!(
            "{:>8} {:<16} {:>5} {:>6} {:>8} {:>6} {:>6}",
            "PID", "COMM", "BUSY", "UTIL%", "ACC/s", "OPEN", "UNREAD"
        ));
        for w in r
            .worker_list
            .iter()
            .take(height.saturating_sub(lines.len() + 1))
        {
            let busy = match w.busy {
                Some(true) => "busy",
                Some(false) => "idle",
                None => "?",
            };
            lines.push(format!(
                "{:>8} {:<16} {:>5} {:>6.0} {:>8.1} {:>6} {:>6}",
                w.pid,
                clip(&w.comm, 16),
                busy,
                w.utilisation * 100.0,
                w.accepts_per_second,
                w.active_connections,
                w.unread_connections
            ));
        }
        for d in r
            .dispatchers
            .iter()
            .take(height.saturating_sub(lines.len() + 1))
        {
            // A dispatcher accepts and hands connections on: not a worker.
            lines.push(format!(
                "{:>8} {:<16} {:>5} {:>6} {:>8.1} {:>6} {:>6}",
                d.pid,
                clip(&d.comm, 16),
                "disp",
                "-",
                d.accepts_per_second,
                "-",
                "-"
            ));
        }
    }
    lines.into_iter().map(|l| clip(&l, width)).collect()
}

/// Restores the terminal however `run` ends.
struct Screen;

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
        let _ = terminal::disable_raw_mode();
    }
}

pub fn run(opts: TopOptions) -> Result<()> {
    let mut pipeline = Pipeline::start_unbounded(&opts.kernel)?;
    let mut before = pipeline.collect()?;
    let mut taken = Instant::now();
    terminal::enable_raw_mode()
        .context("observer top needs a terminal (use `observer listeners` in scripts)")?;
    let _screen = Screen;
    execute!(
        std::io::stdout(),
        terminal::EnterAlternateScreen,
        cursor::Hide
    )?;
    let (mut by, mut selected) = (opts.sort, 0usize);
    let mut table: Vec<ListenerRow> = Vec::new();
    let mut verdicts: Vec<Explained> = Vec::new();
    let interval = Duration::from_secs_f64(opts.interval);
    let mut next_refresh = Instant::now();
    // The snapshots of the last VERDICT_WINDOW, oldest first.
    let mut history: VecDeque<(Instant, Snapshot)> = VecDeque::new();
    loop {
        if Instant::now() >= next_refresh {
            let after = pipeline.collect()?;
            table = rows(&before, &after, taken.elapsed().as_secs_f64(), &opts.filter);
            history.push_back((taken, before));
            while history.len() > 2
                && history
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > VERDICT_WINDOW)
            {
                history.pop_front();
            }
            verdicts = window_verdicts(&history, &after, &opts.filter);
            before = after;
            taken = Instant::now();
            next_refresh = taken + interval;
        }
        sort(&mut table, by);
        selected = selected.min(table.len().saturating_sub(1));
        let (width, height) = terminal::size()?;
        draw(&render(
            &table,
            selected,
            &verdicts,
            by,
            width as usize,
            height as usize,
        ))?;
        if event::poll(next_refresh.saturating_duration_since(Instant::now()))?
            && let Event::Key(KeyEvent {
                code, modifiers, ..
            }) = event::read()?
        {
            match code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                KeyCode::Char('s') => {
                    by = if by == SortBy::Wait {
                        SortBy::Queue
                    } else {
                        SortBy::Wait
                    }
                }
                KeyCode::Down | KeyCode::Char('j') => selected += 1,
                KeyCode::Up | KeyCode::Char('k') => selected = selected.saturating_sub(1),
                _ => {}
            }
        }
    }
}

/// `observer explain`'s verdicts over the snapshots kept (from the oldest
/// to `last`).
fn window_verdicts(
    history: &VecDeque<(Instant, Snapshot)>,
    last: &Snapshot,
    filter: &ListenerFilter,
) -> Vec<Explained> {
    let Some((since, first)) = history.front() else {
        return vec![];
    };
    let mut seen = HashMap::new();
    for (_, snapshot) in history.iter().skip(1) {
        count_samples(snapshot, filter, &mut seen);
    }
    count_samples(last, filter, &mut seen);
    explain(first, last, since.elapsed().as_secs_f64(), &seen, filter)
}

fn draw(lines: &[String]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    for (i, line) in lines.iter().enumerate() {
        queue!(out, cursor::MoveTo(0, i as u16))?;
        write!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(port: u16, queue: u64, p99: Option<f64>) -> ListenerRow {
        ListenerRow {
            netns: 1,
            listen: format!("[2001:db8:ffff:ffff:ffff:ffff:ffff:1]:{port}"),
            addr: "2001:db8:ffff:ffff:ffff:ffff:ffff:1".into(),
            port,
            path: None,
            oldest_wait_seconds: 12.5,
            unread_connections: Some(7),
            unread_oldest_seconds: Some(0.25),
            queue_length: queue,
            queue_max: 4096,
            syn_queue_length: 0,
            accepts_per_second: 12345.6,
            wait_p50_seconds: Some(0.0123),
            wait_p99_seconds: p99,
            workers_busy: 16,
            workers: 16,
            drops: Some(12345),
            container_id: None,
            pod: None,
            worker_list: vec![],
            dispatchers: vec![],
        }
    }

    #[test]
    fn every_line_fits_80_columns() {
        let rows = vec![row(65535, 4096, Some(12.5)), row(80, 0, None)];
        for line in render(&rows, 0, &[], SortBy::Wait, 80, 24) {
            assert!(
                line.chars().count() <= 80,
                "{} chars: {line}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn a_dispatcher_is_listed_under_the_workers_as_disp() {
        let mut r = row(80, 0, None);
        r.dispatchers.push(crate::views::rows::DispatcherRow {
            pid: 4242,
            comm: "node".into(),
            accepts_per_second: 11.5,
        });
        let lines = render(&[r], 0, &[], SortBy::Wait, 80, 24);
        let line = lines
            .iter()
            .find(|l| l.contains("4242"))
            .expect("the dispatcher's line");
        assert!(line.contains("disp") && line.contains("11.5"), "{line}");
    }

    #[test]
    fn the_selected_listeners_verdict_and_fix_show_above_its_workers() {
        use crate::verdict::{Kind, Verdict, Window};
        let r = row(8000, 6, Some(1.2));
        let window = Window {
            seconds: 10.0,
            samples: 10,
            samples_all_busy: 10,
            samples_queued: 10,
            arrivals: 66,
            accepts: 66,
            drops: Some(0),
            queue_len: 6,
            queue_max: 4096,
            oldest_first: 0.5,
            oldest_last: 0.8,
            wait_mean: Some(0.6),
            wait_p50: Some(0.7),
            wait_p99: Some(1.2),
            workers: vec![],
            dispatchers: 0,
            somaxconn: None,
            orphaned_socket: false,
            sockets: 1,
        };
        let explained = Explained {
            listen: r.listen.clone(),
            netns: r.netns,
            comm: None,
            verdict: Verdict {
                kind: Kind::Saturated,
                evidence: vec![
                    "waits".into(),
                    "2 workers, all busy in 10 of 10 samples".into(),
                ],
                fix: "run at least 3 workers (there are 2)".into(),
                workers_needed: Some(3),
            },
            window,
        };
        let lines = render(&[r], 0, &[explained], SortBy::Wait, 80, 24);
        let at = lines
            .iter()
            .position(|l| l.starts_with("verdict (10 s): SATURATED — 2 workers, all busy"))
            .unwrap_or_else(|| panic!("no verdict line: {lines:#?}"));
        assert!(
            lines[at + 1].starts_with("fix: run at least 3 workers"),
            "{lines:#?}"
        );
        assert!(lines[at + 2].starts_with("workers of"), "{lines:#?}");
    }

    #[test]
    fn sorting_by_wait_then_by_queue() {
        let mut rows = vec![row(1, 5, Some(0.1)), row(2, 1, Some(2.0))];
        sort(&mut rows, SortBy::Wait);
        assert_eq!(rows[0].port, 2);
        sort(&mut rows, SortBy::Queue);
        assert_eq!(rows[0].port, 1);
    }
}
