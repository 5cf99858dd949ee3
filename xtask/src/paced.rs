//! The pieces of the CPU-per-connection figure (`cargo xtask bench`): a
//! client that opens connections at a fixed rate, the host's CPU clock, and
//! a median with its 95% interval.
//!
//! At a fixed rate the work is the same in every condition, so the CPU
//! all tasks on the host used, divided by the connections served, moves
//! only with what the condition adds (a program per accept, a daemon's
//! passes) and with noise. Unlike a throughput ratio, it does not depend on
//! how the scheduler shares two cores between the server and the client.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// CPU time every task on the host has used so far, in ns: the root
/// cgroup's (cgroup v1 `cpuacct.usage`, or v2 `cpu.stat` `usage_usec`),
/// else /proc/stat's busy ticks (10 ms each).
pub(crate) fn host_cpu_ns() -> Result<u64> {
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpuacct/cpuacct.usage") {
        return text.trim().parse().context("cpuacct.usage");
    }
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpu.stat") {
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("no usage_usec in /sys/fs/cgroup/cpu.stat")?
            .trim()
            .parse()?;
        return Ok(usec * 1000);
    }
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, t)| t)
        .sum();
    Ok(busy * 10_000_000)
}

/// Opens `rate` connections a second to `port` for `seconds`, each one
/// HTTP/1.0 request read to its end, from two threads on a fixed schedule
/// (a late connection does not make the next ones come sooner than their
/// slots). Returns how many got a reply.
pub(crate) fn load(port: u16, rate: u32, seconds: u64) -> Result<u64> {
    const THREADS: u32 = 2;
    let interval = Duration::from_secs_f64(THREADS as f64 / rate as f64);
    let slots = (rate as u64 * seconds) / THREADS as u64;
    let start = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let offset = interval / THREADS * t;
                let mut served = 0u64;
                for slot in 0..slots {
                    let due = start + offset + interval * slot as u32;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    served += one_request(port) as u64;
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for t in threads {
        served += t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    Ok(served)
}

fn one_request(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = Vec::with_capacity(256);
    s.read_to_end(&mut reply).is_ok() && reply.starts_with(b"HTTP/1.1 200")
}

/// The median of `values` and a 95% interval for it: the order statistics
/// that bracket the median with at least 95% confidence (binomial, no
/// assumption on the distribution). Needs at least 6 values.
pub(crate) fn median_interval(values: &[f64]) -> Result<(f64, f64, f64)> {
    let n = values.len();
    if n < 6 {
        bail!("a 95% interval for a median needs at least 6 rounds (got {n})");
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    // The largest k with P(Binomial(n, 1/2) < k) <= 2.5%: [x(k), x(n+1-k)].
    let mut k = 0;
    let mut below = 0.0;
    for i in 0..n {
        below += binomial_half(n, i);
        if below > 0.025 {
            break;
        }
        k = i + 1;
    }
    let k = k.max(1);
    Ok((median, sorted[k - 1], sorted[n - k]))
}

/// P(Binomial(n, 1/2) = i).
fn binomial_half(n: usize, i: usize) -> f64 {
    let mut c = 1.0f64;
    for j in 0..i {
        c = c * (n - j) as f64 / (j + 1) as f64;
    }
    c * 0.5f64.powi(n as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_of_a_median_brackets_it_with_order_statistics() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        // n = 10: P(X <= 1) = 1.1%, P(X <= 2) = 5.5%: the 2nd and 9th values.
        assert_eq!(median_interval(&values).unwrap(), (5.5, 2.0, 9.0));
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        // n = 20: P(X <= 5) = 2.1%, P(X <= 6) = 5.8%: the 6th and 15th.
        assert_eq!(median_interval(&values).unwrap(), (10.5, 6.0, 15.0));
        assert!(median_interval(&[1.0; 5]).is_err());
    }

    #[test]
    fn the_host_cpu_clock_moves_forward() {
        let before = host_cpu_ns().unwrap();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(host_cpu_ns().unwrap() > before);
    }
}
