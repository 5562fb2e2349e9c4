//! How the REGISTERs this node took were answered, counted for metrics (an operator's
//! first question about a registrar: how many were accepted, challenged, refused,
//! shed).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of REGISTER outcomes since the node started, by status (see
/// [`RegisterOutcomes::LABELS`]).
#[derive(Debug, Default)]
pub struct RegisterOutcomes {
    counts: [AtomicU64; 9],
}

impl RegisterOutcomes {
    /// The outcome labels: the statuses a registrar answers with, `other` for any other
    /// status, `dropped` for a REGISTER answered nothing (a banned or flooding source).
    pub const LABELS: [&'static str; 9] = [
        "200", "401", "403", "423", "503", "400", "404", "other", "dropped",
    ];

    /// The statuses counted by name, in [`RegisterOutcomes::LABELS`] order.
    const STATUSES: [u16; 7] = [200, 401, 403, 423, 503, 400, 404];

    /// Counts a REGISTER answered `status`.
    pub(crate) fn answered(&self, status: u16) {
        let i = Self::STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(Self::STATUSES.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a REGISTER answered nothing.
    pub(crate) fn dropped(&self) {
        self.counts[8].fetch_add(1, Ordering::Relaxed);
    }

    /// (label, count) of each outcome.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::LABELS
            .iter()
            .zip(self.counts.iter())
            .map(|(l, c)| (*l, c.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_land_in_their_label() {
        for (status, label) in RegisterOutcomes::STATUSES
            .iter()
            .zip(RegisterOutcomes::LABELS)
        {
            assert_eq!(status.to_string(), label, "labels name the statuses");
        }
        let o = RegisterOutcomes::default();
        o.answered(200);
        o.answered(200);
        o.answered(401);
        o.answered(482);
        o.dropped();
        let got: Vec<_> = o.counts().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            got,
            vec![("200", 2), ("401", 1), ("other", 1), ("dropped", 1)]
        );
    }
}
