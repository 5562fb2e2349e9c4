//! Temporary bans for sources that keep failing authentication (a password guesser),
//! sans-IO: time comes in as seconds.

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanPolicy {
    /// Failures within `window_secs` that trigger a ban; 0 disables banning.
    pub max_failures: u32,
    pub window_secs: u64,
    pub ban_secs: u64,
}

impl Default for BanPolicy {
    fn default() -> Self {
        BanPolicy {
            max_failures: 20,
            window_secs: 60,
            ban_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: u64,
    failures: u32,
    banned_until: u64,
}

#[derive(Debug, Default)]
pub struct FailureThrottle {
    policy: BanPolicy,
    sources: HashMap<IpAddr, Record>,
    last_prune: u64,
    /// Bans started since start.
    bans: u64,
}

impl FailureThrottle {
    pub fn new(policy: BanPolicy) -> Self {
        FailureThrottle {
            policy,
            sources: HashMap::new(),
            last_prune: 0,
            bans: 0,
        }
    }

    /// (sources banned at `now_secs`, bans started since start).
    pub fn bans(&self, now_secs: u64) -> (usize, u64) {
        let now = self
            .sources
            .values()
            .filter(|r| r.banned_until > now_secs)
            .count();
        (now, self.bans)
    }

    pub fn is_banned(&self, ip: IpAddr, now_secs: u64) -> bool {
        self.sources
            .get(&ip)
            .is_some_and(|r| r.banned_until > now_secs)
    }

    /// Counts a failed authentication; returns true when this failure starts a ban.
    pub fn record_failure(&mut self, ip: IpAddr, now_secs: u64) -> bool {
        if self.policy.max_failures == 0 {
            return false;
        }
        self.prune(now_secs);
        let p = self.policy;
        let r = self.sources.entry(ip).or_insert(Record {
            window_start: now_secs,
            failures: 0,
            banned_until: 0,
        });
        if now_secs >= r.window_start + p.window_secs {
            r.window_start = now_secs;
            r.failures = 0;
        }
        r.failures += 1;
        if r.failures >= p.max_failures && r.banned_until <= now_secs {
            r.banned_until = now_secs + p.ban_secs;
            r.failures = 0;
            self.bans += 1;
            return true;
        }
        false
    }

    fn prune(&mut self, now_secs: u64) {
        if now_secs < self.last_prune + self.policy.window_secs.max(1) {
            return;
        }
        self.last_prune = now_secs;
        let w = self.policy.window_secs;
        self.sources
            .retain(|_, r| r.banned_until > now_secs || now_secs < r.window_start + w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_after_repeated_failures_then_forgives() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut t = FailureThrottle::new(BanPolicy {
            max_failures: 3,
            window_secs: 10,
            ban_secs: 100,
        });
        assert!(!t.record_failure(ip, 0));
        assert!(!t.record_failure(ip, 1));
        assert!(!t.is_banned(ip, 1));
        assert!(t.record_failure(ip, 2));
        assert!(t.is_banned(ip, 50));
        assert!(!t.is_banned("192.0.2.8".parse().unwrap(), 50));
        assert!(!t.is_banned(ip, 102));
        // failures spread wider than the window never ban
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        for i in 0..10 {
            assert!(!t.record_failure(other, 200 + i * 6));
        }
    }
}
