//! Commit counters for logs and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two: quantiles are reported to within a quarter octave
/// (4.1–5 ms is one bucket, not 4.1–8.2).
const SUB: usize = 4;
const BUCKETS: usize = 32 * SUB;

/// Counters for logs and benchmarks: batches, commands, and how long making a batch
/// committed (through Raft, from the proposer's view) took, as a log-linear histogram
/// in microseconds (each power of two split in [`SUB`]).
#[derive(Debug)]
pub struct CommitStats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    commit_us: [AtomicU64; BUCKETS],
    /// The same buckets since start, never taken (the metrics histogram).
    since_start_us: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
    commands_since_start: AtomicU64,
}

/// The commit latency histogram since start: cumulative counts at power-of-two
/// microsecond bounds, as Prometheus histograms are.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitHistogram {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound in seconds, batches that took at most that long)
    pub buckets: Vec<(f64, u64)>,
}

/// One reporting interval of [`CommitStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitReport {
    pub batches: u64,
    pub commands: u64,
    /// Upper bounds (µs) of the buckets holding the 50th and 99th percentile batch.
    pub commit_p50_us: u64,
    pub commit_p99_us: u64,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            batches: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            commit_us: std::array::from_fn(|_| AtomicU64::new(0)),
            since_start_us: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            commands_since_start: AtomicU64::new(0),
        }
    }
}

/// The bucket of `us` microseconds: its power of two and the next two bits below it.
fn bucket(us: u64) -> usize {
    let us = us.max(SUB as u64);
    let octave = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (octave - 2)) & (SUB as u64 - 1)) as usize;
    (octave * SUB + sub).min(BUCKETS - 1)
}

/// The upper bound (µs, exclusive) of bucket `i`.
fn upper_bound(i: usize) -> u64 {
    let (octave, sub) = (i / SUB, i % SUB);
    ((SUB + sub + 1) as u64) << (octave - 2)
}

impl CommitStats {
    /// Counts one committed batch of `commands` that took `took` to commit.
    pub fn record(&self, commands: u64, took: std::time::Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands, Ordering::Relaxed);
        let us = took.as_micros().max(1) as u64;
        let b = bucket(us);
        self.commit_us[b].fetch_add(1, Ordering::Relaxed);
        self.since_start_us[b].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.commands_since_start
            .fetch_add(commands, Ordering::Relaxed);
    }

    /// Commands committed since start (never taken).
    pub fn commands_since_start(&self) -> u64 {
        self.commands_since_start.load(Ordering::Relaxed)
    }

    /// Buckets at powers of two from 256 µs to 8.4 s: a faster batch counts in the
    /// first, a slower one only in +Inf.
    pub fn histogram(&self) -> CommitHistogram {
        const FIRST: usize = 7; // octave 7 holds [128, 256) µs
        const LAST: usize = 22; // up to 2^23 µs
        let mut seen = 0;
        let mut buckets = Vec::with_capacity(LAST - FIRST + 1);
        for (i, c) in self.since_start_us.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            // The last sub-bucket of an octave ends at the next power of two.
            let octave = i / SUB;
            if i % SUB == SUB - 1 && (FIRST..=LAST).contains(&octave) {
                buckets.push(((1u64 << (octave + 1)) as f64 / 1e6, seen));
            }
        }
        CommitHistogram {
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: seen,
            buckets,
        }
    }

    /// Takes the counts since the last call.
    pub fn take(&self) -> CommitReport {
        let counts: Vec<u64> = self
            .commit_us
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            let want = (total as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want.max(1) {
                    return upper_bound(i);
                }
            }
            0
        };
        CommitReport {
            batches: self.batches.swap(0, Ordering::Relaxed),
            commands: self.commands.swap(0, Ordering::Relaxed),
            commit_p50_us: quantile(0.5),
            commit_p99_us: quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn commit_histogram_quantiles() {
        let s = CommitStats::default();
        for _ in 0..98 {
            s.record(10, Duration::from_micros(50));
        }
        s.record(10, Duration::from_millis(3));
        s.record(10, Duration::from_millis(3));
        let r = s.take();
        assert_eq!((r.batches, r.commands), (100, 1000));
        assert_eq!(r.commit_p50_us, 56, "50 µs falls in the 48..56 bucket");
        assert_eq!(r.commit_p99_us, 3072, "3 ms falls in the 2560..3072 bucket");
        assert_eq!(s.take().batches, 0, "take resets");
        let h = s.histogram();
        assert_eq!(h.count, 100, "the histogram is not reset by take");
        assert!((h.sum_seconds - (98.0 * 50e-6 + 2.0 * 3e-3)).abs() < 1e-9);
        assert_eq!(
            h.buckets[0],
            (256e-6, 98),
            "faster batches count in the first"
        );
        let le_4ms = h.buckets.iter().find(|(le, _)| *le == 4096e-6).unwrap();
        assert_eq!(le_4ms.1, 100);
        assert!(h.buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
    }

    #[test]
    fn buckets_are_quarter_octaves_that_hold_their_values() {
        for us in [
            1,
            4,
            5,
            7,
            8,
            50,
            64,
            4095,
            4096,
            4097,
            5000,
            5120,
            5121,
            1 << 40,
        ] {
            let b = bucket(us);
            let hi = upper_bound(b);
            let lo = if b == bucket(1) {
                0
            } else {
                upper_bound(b - 1)
            };
            assert!(
                b == BUCKETS - 1 || (lo <= us && us < hi),
                "{us} µs in [{lo}, {hi})"
            );
        }
        assert_eq!(
            upper_bound(bucket(4097)),
            5120,
            "4.1 ms: the [4,096, 5,120) µs bucket"
        );
        assert_eq!(upper_bound(bucket(5121)), 6144);
        assert_eq!(
            upper_bound(bucket(8192)),
            10240,
            "a power of two opens a bucket"
        );
    }
}
