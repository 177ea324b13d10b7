//! The write latency histogram shared by the device thread, which counts,
//! and the tools, which read percentiles from it.

/// Number of buckets of the write latency histogram (powers of two of µs).
pub const LATENCY_BUCKETS: usize = 32;

/// The latency at or below which a fraction `q` (0–1) of the writes counted
/// in `buckets` finished, as the upper bound of its bucket in microseconds;
/// `None` when no write was counted.
pub fn latency_percentile_us(buckets: &[u64; LATENCY_BUCKETS], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(1u64 << (i + 1));
        }
    }
    Some(1u64 << LATENCY_BUCKETS)
}

/// Histogram bucket of a latency in microseconds.
#[cfg(feature = "runtime")]
pub(crate) fn latency_bucket(us: u64) -> usize {
    (63 - us.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}
