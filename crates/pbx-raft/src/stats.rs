//! Commit counters for logs and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for logs and benchmarks: batches, commands, and how long making a batch
/// committed (through Raft, from the proposer's view) took, as a log2 histogram in microseconds.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    commit_us: [AtomicU64; 32],
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

impl CommitStats {
    /// Counts one committed batch of `commands` that took `took` to commit.
    pub fn record(&self, commands: u64, took: std::time::Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands, Ordering::Relaxed);
        let us = took.as_micros().max(1) as u64;
        let bucket = (63 - us.leading_zeros() as usize).min(31);
        self.commit_us[bucket].fetch_add(1, Ordering::Relaxed);
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
                    return 1u64 << (i + 1);
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
        assert_eq!(r.commit_p50_us, 64, "50 µs falls in the 32..64 bucket");
        assert_eq!(r.commit_p99_us, 4096, "3 ms falls in the 2048..4096 bucket");
        assert_eq!(s.take().batches, 0, "take resets");
    }
}
