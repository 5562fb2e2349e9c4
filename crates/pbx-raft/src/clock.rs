//! The node's wall clock, made safe against steps.
//!
//! Everything time-based in the cluster reads [`unix_ms`]: the leader's stamp on
//! commands (binding expiry, call records), nonce lifetimes, bans. A wall clock that
//! steps by minutes (a bad NTP source, an operator's `date -s`, a VM resumed) would
//! expire every binding at once or bring expired ones back, and make every other node's
//! nonces look stale. So the wall clock is read through the monotonic clock: it is
//! followed while it moves within [`STEP_TOLERANCE_MS`] of where the monotonic clock
//! says it should be (NTP's slewing and small corrections), and a larger step is not
//! followed — the node keeps its time, logs the step and counts it
//! (`pbx_clock_steps_total`); a restart takes the new time. Raft's timers and every
//! timeout run on the monotonic clock and never see a step.
//!
//! The elapsed time is `CLOCK_BOOTTIME` (monotonic, and counting a suspended VM's
//! sleep), so a host resumed from suspend, whose wall clock is right, is followed. A
//! node must start with a synchronised clock (the systemd unit orders pbxd after
//! `time-sync.target`): one started on a wrong clock keeps it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The largest disagreement between the wall clock and the monotonic clock that is
/// still followed; anything larger is a step.
pub const STEP_TOLERANCE_MS: i64 = 2_000;

struct Clock {
    /// `CLOCK_BOOTTIME` at start (ms).
    start: i64,
    /// Unix ms at `start`, as last trusted: the time is `start_ms + elapsed`.
    start_ms: AtomicI64,
    steps: AtomicU64,
    /// The wall clock's disagreement last logged (to log a step once, not per read).
    logged_off_ms: AtomicI64,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| Clock {
        start: boot_ms(),
        start_ms: AtomicI64::new(wall_ms()),
        steps: AtomicU64::new(0),
        logged_off_ms: AtomicI64::new(0),
    })
}

/// Milliseconds since boot, suspend included; the process's monotonic clock if the
/// kernel has no `CLOCK_BOOTTIME` (it always has since Linux 2.6.39).
fn boot_ms() -> i64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(t) => t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000,
        Err(_) => {
            static FALLBACK: OnceLock<Instant> = OnceLock::new();
            FALLBACK.get_or_init(Instant::now).elapsed().as_millis() as i64
        }
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix time in milliseconds, steps of the wall clock left out (see the module doc):
/// what the leader stamps into commands and what bindings and nonces are checked with.
pub fn unix_ms() -> u64 {
    let c = clock();
    let elapsed = boot_ms() - c.start;
    match reading(c.start_ms.load(Relaxed), elapsed, wall_ms()) {
        Reading::Followed { now, start_ms } => {
            c.start_ms.store(start_ms, Relaxed);
            // Back in step: the next step is a new one, logged and counted.
            c.logged_off_ms.store(0, Relaxed);
            now.max(0) as u64
        }
        Reading::Step { now, off } => {
            // Logged once per distinct step (a second step, or the clock coming back,
            // is logged again).
            let last = c.logged_off_ms.swap(off, Relaxed);
            if (last - off).abs() > STEP_TOLERANCE_MS {
                c.steps.fetch_add(1, Relaxed);
                tracing::warn!(
                    step_ms = off,
                    "the wall clock stepped; this node keeps its time (monotonic) until it is restarted"
                );
            }
            now.max(0) as u64
        }
    }
}

/// One reading of the clock, given its base (unix ms at the monotonic start), the
/// monotonic time since then and the wall clock.
#[derive(Debug, PartialEq, Eq)]
enum Reading {
    /// The wall clock, with the base moved along its small corrections.
    Followed { now: i64, start_ms: i64 },
    /// A step of `off` ms, not followed: the time the base gives.
    Step { now: i64, off: i64 },
}

fn reading(start_ms: i64, elapsed: i64, wall: i64) -> Reading {
    let expected = start_ms + elapsed;
    let off = wall - expected;
    if off.abs() <= STEP_TOLERANCE_MS {
        Reading::Followed {
            now: wall,
            start_ms: wall - elapsed,
        }
    } else {
        Reading::Step { now: expected, off }
    }
}

/// What the clock has seen: steps not followed since start, and how far the wall
/// clock is from the time the node uses now (ms; 0 when it is followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReport {
    pub steps: u64,
    pub wall_off_ms: i64,
}

pub fn clock_report() -> ClockReport {
    let used = unix_ms() as i64;
    ClockReport {
        steps: clock().steps.load(Relaxed),
        wall_off_ms: wall_ms() - used,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_wall_clock_when_it_does_not_step() {
        let a = unix_ms();
        let wall = wall_ms() as u64;
        assert!(wall.abs_diff(a) < 100, "{a} vs {wall}");
        let r = clock_report();
        assert!(r.wall_off_ms.abs() < 100, "{r:?}");
    }

    #[test]
    fn small_corrections_are_followed_and_steps_are_not() {
        let base = 1_800_000_000_000;
        // NTP slews by a few ms: followed, and the base moves with it.
        assert_eq!(
            reading(base, 10_000, base + 10_005),
            Reading::Followed {
                now: base + 10_005,
                start_ms: base + 5
            }
        );
        // A step forward of ten minutes, and one back: the monotonic time is kept.
        assert_eq!(
            reading(base, 10_000, base + 610_000),
            Reading::Step {
                now: base + 10_000,
                off: 600_000
            }
        );
        assert_eq!(
            reading(base, 10_000, base - 590_000),
            Reading::Step {
                now: base + 10_000,
                off: -600_000
            }
        );
        // The clock put right again: followed from where it is.
        assert_eq!(
            reading(base, 20_000, base + 20_001),
            Reading::Followed {
                now: base + 20_001,
                start_ms: base + 1
            }
        );
    }
}
