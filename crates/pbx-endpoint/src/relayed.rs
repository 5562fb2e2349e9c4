//! Calls run by other nodes whose phones are connected here: the phones' messages of
//! those calls go to the node that runs the call, not to this node's pipeline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often entries past their idle time are swept out.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct RelayedCalls {
    /// Call-ID -> (node running the call, last use).
    calls: HashMap<String, (u64, Instant)>,
    /// How long a call is remembered without traffic.
    idle: Duration,
    pruned: Option<Instant>,
}

impl RelayedCalls {
    pub(crate) fn new(idle: Duration) -> Self {
        RelayedCalls {
            calls: HashMap::new(),
            idle,
            pruned: None,
        }
    }

    /// `node` sent a message of `call_id` to a phone connected here.
    pub(crate) fn note(&mut self, now: Instant, call_id: &str, node: u64) {
        match self.calls.get_mut(call_id) {
            Some(entry) => *entry = (node, now),
            None => {
                self.calls.insert(call_id.to_string(), (node, now));
            }
        }
        self.pruned.get_or_insert(now);
    }

    /// The node running `call_id`, if it is remembered; the call's idle time restarts.
    pub(crate) fn lookup(&mut self, now: Instant, call_id: &str) -> Option<u64> {
        let entry = self.calls.get_mut(call_id)?;
        if now.saturating_duration_since(entry.1) >= self.idle {
            self.calls.remove(call_id);
            return None;
        }
        entry.1 = now;
        Some(entry.0)
    }

    /// When the next sweep is due (none while nothing is remembered).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.calls.is_empty() {
            return None;
        }
        self.pruned.map(|p| p + PRUNE_EVERY)
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|due| now >= due) {
            self.pruned = Some(now);
            let idle = self.idle;
            self.calls
                .retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.calls.len()
    }
}
