//! Quantiles of the wait histogram, the way Prometheus' `histogram_quantile`
//! computes them: find the bucket, interpolate linearly inside it.
use observer_common::WAIT_BUCKET_BOUNDS_US;

use crate::aggregate::Waits;

/// The `q` quantile (0..1) in seconds of waits counted per bucket; `None`
/// without samples. Waits in the +Inf bucket report the last finite bound.
pub fn wait_quantile(waits: &Waits, q: f64) -> Option<f64> {
    let total = waits.count();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    let mut lower_us = 0.0;
    for (bound_us, n) in WAIT_BUCKET_BOUNDS_US.iter().zip(waits.buckets.iter()) {
        let upper_us = *bound_us as f64;
        if *n > 0 && (below + n) as f64 >= rank {
            let within = (rank - below as f64) / *n as f64;
            return Some((lower_us + (upper_us - lower_us) * within) / 1e6);
        }
        below += n;
        lower_us = upper_us;
    }
    Some(lower_us / 1e6)
}

/// Per-bucket difference of two readings of the same histogram.
pub fn waits_between(before: &Waits, after: &Waits) -> Waits {
    let mut d = Waits::default();
    for (i, slot) in d.buckets.iter_mut().enumerate() {
        *slot = after.buckets[i].saturating_sub(before.buckets[i]);
    }
    d.sum_ns = after.sum_ns.saturating_sub(before.sum_ns);
    d
}

/// A duration for people: 850µs, 12.3ms, 1.50s.
pub fn human_seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(pairs: &[(usize, u64)]) -> Waits {
        let mut w = Waits::default();
        for (bucket, n) in pairs {
            w.buckets[*bucket] = *n;
        }
        w
    }

    #[test]
    fn median_interpolates_inside_its_bucket() {
        // 10 waits in (0.5 s, 1 s]: the median is half way, 0.75 s.
        assert_eq!(wait_quantile(&waits(&[(12, 10)]), 0.5), Some(0.75));
    }

    #[test]
    fn p99_finds_the_tail_bucket() {
        // 99 fast (<= 100 µs) and 1 slow in (1 s, 2.5 s].
        let w = waits(&[(0, 99), (13, 1)]);
        assert!(wait_quantile(&w, 0.5).unwrap() <= 100e-6);
        assert_eq!(wait_quantile(&w, 0.995), Some(1.75));
    }

    #[test]
    fn no_samples_no_quantile_and_overflow_reports_the_last_bound() {
        assert_eq!(wait_quantile(&Waits::default(), 0.5), None);
        assert_eq!(wait_quantile(&waits(&[(18, 3)]), 0.99), Some(60.0));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_seconds(0.00085), "850µs");
        assert_eq!(human_seconds(0.0123), "12.3ms");
        assert_eq!(human_seconds(1.5), "1.50s");
    }
}
