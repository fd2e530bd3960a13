//! The fixed-size log-linear latency histogram each client thread records
//! into.

use std::fmt;

/// Number of mantissa bits kept per power of two: 2^7 = 128 sub-buckets, so a
/// recorded value is known to within 1/128 (0.78 %).
const PRECISION_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << PRECISION_BITS;
const BUCKET_COUNT: usize = (64 - PRECISION_BITS as usize + 1) * SUB_BUCKETS as usize;

/// Fixed-size log-linear latency histogram (HDR-like) over `u64` values,
/// used with nanoseconds.
///
/// Values below 128 are counted exactly; above that each power of two is
/// split into 128 equal buckets. Memory is constant (7,424 counters) whatever
/// the number of samples, and two histograms merge by adding counters.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min())
            .field("max", &self.max())
            .finish()
    }
}

fn bucket_index(v: u64) -> usize {
    if v < SUB_BUCKETS {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - PRECISION_BITS;
    let top = v >> shift; // in [SUB_BUCKETS, 2 * SUB_BUCKETS)
    ((u64::from(shift) + 1) * SUB_BUCKETS + (top - SUB_BUCKETS)) as usize
}

/// Lowest value and width of bucket `idx`.
fn bucket_bounds(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < SUB_BUCKETS {
        return (idx, 1);
    }
    let shift = idx / SUB_BUCKETS - 1;
    let top = SUB_BUCKETS + idx % SUB_BUCKETS;
    (top << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKET_COUNT],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded samples.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Smallest recorded value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest recorded value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Exact arithmetic mean of the recorded values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The `q`-quantile (`q` in [0, 1]): the value at rank `ceil(q * n)`,
    /// reported as the middle of its bucket and clamped to [min, max].
    /// Returns 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_bounds(idx);
                let mid = low + (width - 1) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 0..128 {
            h.record(v);
        }
        assert_eq!(h.len(), 128);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 127);
        assert_eq!(h.quantile(0.5), 63);
        assert_eq!(h.quantile(1.0), 127);
        assert_eq!(h.quantile(0.0), 0);
    }

    #[test]
    fn histogram_bucket_index_roundtrips() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            1000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let idx = bucket_index(v);
            assert!(idx < BUCKET_COUNT, "{v} -> {idx}");
            let (low, width) = bucket_bounds(idx);
            assert!(low <= v && v - low < width, "{v} in [{low}, +{width})");
            if v >= SUB_BUCKETS {
                // Relative resolution is 1/128.
                assert!(width <= low / SUB_BUCKETS + 1);
            }
        }
        // Buckets are contiguous and increasing.
        let mut next = 0u64;
        for idx in 0..BUCKET_COUNT - 1 {
            let (low, width) = bucket_bounds(idx);
            assert_eq!(low, next, "bucket {idx}");
            next = low + width;
        }
    }

    #[test]
    fn histogram_quantiles_are_within_resolution() {
        let mut h = Histogram::new();
        // 1..=100_000 ns uniformly: p50 ~ 50_000, p99 ~ 99_000.
        for v in 1..=100_000u64 {
            h.record(v);
        }
        let within = |got: u64, want: f64| ((got as f64 - want) / want).abs() < 0.01;
        assert!(within(h.quantile(0.5), 50_000.0), "{}", h.quantile(0.5));
        assert!(within(h.quantile(0.99), 99_000.0), "{}", h.quantile(0.99));
        assert!((h.mean() - 50_000.5).abs() < 1e-6);
    }

    #[test]
    fn histogram_merge_adds_samples() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        b.record(20);
        a.merge(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a.min(), 10);
        assert_eq!(a.max(), 1_000_000);
        assert_eq!(a.quantile(0.5), 20);
        assert!(Histogram::new().is_empty());
        assert_eq!(Histogram::new().quantile(0.99), 0);
    }
}
