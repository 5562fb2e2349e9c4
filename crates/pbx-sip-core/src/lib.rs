//! RFC 3261 §17 transactions (with RFC 6026's Accepted state), sans-IO.
//!
//! Each transaction is a plain state machine: inputs come with `now`, outputs are the
//! bytes to (re)transmit and what to tell the transaction user; `poll_timeout` says when
//! to call `handle_timeout` next. The driver owns sockets and clocks. [`ServerTable`]
//! keeps the server transactions of a node with a timer heap so a driver needs one sleep.

mod client;
mod key;
mod server;
mod table;

pub use client::{ClientInvite, ClientNonInvite, ResponseAction};
pub use key::TransactionKey;
pub use server::{ServerInvite, ServerNonInvite};
pub use table::{RequestDisposition, ServerTable, TableEvent};

use std::time::{Duration, Instant};

/// RFC 3261 timer values (§17.1.1.1, table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate, default 500 ms.
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses, 4 s.
    pub t2: Duration,
    /// Maximum duration a message stays in the network, 5 s.
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl Timers {
    /// Timers B, F, H, J, L, M: 64*T1.
    pub fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// A transaction's two timers: the one that retransmits (A, E or G; deadline and current
/// interval) and the one that ends the transaction (B, D, F, H, I, J, K, L or M). What
/// firing means is each state machine's business; the bookkeeping is shared.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TxTimers {
    retransmit: Option<(Instant, Duration)>,
    end: Option<Instant>,
}

impl TxTimers {
    pub(crate) fn next(&self) -> Option<Instant> {
        match (self.retransmit.map(|(at, _)| at), self.end) {
            (Some(r), Some(e)) => Some(r.min(e)),
            (r, e) => r.or(e),
        }
    }

    pub(crate) fn retransmit_after(&mut self, now: Instant, interval: Duration) {
        self.retransmit = Some((now + interval, interval));
    }

    pub(crate) fn stop_retransmit(&mut self) {
        self.retransmit = None;
    }

    pub(crate) fn end_at(&mut self, at: Instant) {
        self.end = Some(at);
    }

    pub(crate) fn stop_all(&mut self) {
        *self = TxTimers::default();
    }

    /// True when the end timer is due; both timers are then stopped.
    pub(crate) fn end_due(&mut self, now: Instant) -> bool {
        if self.end.is_some_and(|e| now >= e) {
            self.stop_all();
            return true;
        }
        false
    }

    /// True when the retransmission timer is due; it is re-armed with `next(interval)`.
    pub(crate) fn retransmit_due(
        &mut self,
        now: Instant,
        next: impl FnOnce(Duration) -> Duration,
    ) -> bool {
        match self.retransmit {
            Some((at, interval)) if now >= at => {
                self.retransmit_after(now, next(interval));
                true
            }
            _ => false,
        }
    }
}

/// What happened when a timer fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerOutcome {
    /// Nothing due yet.
    Idle,
    /// Send these bytes again (Timers A, E, G).
    Retransmit(bytes::Bytes),
    /// The transaction gave up (Timers B, F, H): tell the transaction user.
    TimedOut,
    /// The transaction ended normally (Timers D, I, J, K, L, M).
    Terminated,
}

/// Errors of the transaction layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("the transaction is in state {0} and cannot do that")]
    WrongState(&'static str),
    #[error("invalid request for a client transaction: {0}")]
    InvalidRequest(String),
}
