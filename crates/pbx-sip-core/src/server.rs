//! Server transactions (RFC 3261 §17.2, RFC 6026 §7.1).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{CoreError, TimerOutcome, Timers, TxTimers};

/// Non-INVITE server transaction (§17.2.2, figure 8).
#[derive(Debug, Clone)]
pub struct ServerNonInvite {
    state: NonInviteState,
    reliable: bool,
    timers: Timers,
    last_response: Option<Bytes>,
    /// Timer J.
    tx_timers: TxTimers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonInviteState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

impl ServerNonInvite {
    pub fn new(reliable: bool, timers: Timers) -> Self {
        ServerNonInvite {
            state: NonInviteState::Trying,
            reliable,
            timers,
            last_response: None,
            tx_timers: TxTimers::default(),
        }
    }

    pub fn state(&self) -> NonInviteState {
        self.state
    }

    /// A retransmission of the request arrived: what to send back, if anything.
    /// Trying discards it; Proceeding and Completed resend the last response.
    pub fn on_retransmission(&self) -> Option<Bytes> {
        match self.state {
            NonInviteState::Proceeding | NonInviteState::Completed => self.last_response.clone(),
            NonInviteState::Trying | NonInviteState::Terminated => None,
        }
    }

    /// The transaction user sends a response; returns the bytes to transmit.
    pub fn send_response(
        &mut self,
        now: Instant,
        status: u16,
        bytes: Bytes,
    ) -> Result<Bytes, CoreError> {
        match self.state {
            NonInviteState::Trying | NonInviteState::Proceeding => {}
            NonInviteState::Completed => return Err(CoreError::WrongState("Completed")),
            NonInviteState::Terminated => return Err(CoreError::WrongState("Terminated")),
        }
        self.last_response = Some(bytes.clone());
        if status < 200 {
            self.state = NonInviteState::Proceeding;
        } else {
            self.state = NonInviteState::Completed;
            // Timer J: 64*T1 on unreliable transports, zero on reliable ones.
            let j = if self.reliable {
                Duration::ZERO
            } else {
                self.timers.t1x64()
            };
            self.tx_timers.end_at(now + j);
        }
        Ok(bytes)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tx_timers.next()
    }

    pub fn handle_timeout(&mut self, now: Instant) -> TimerOutcome {
        if self.tx_timers.end_due(now) {
            self.state = NonInviteState::Terminated;
            self.last_response = None;
            return TimerOutcome::Terminated;
        }
        TimerOutcome::Idle
    }

    /// The transport failed (§17.2.4): the transaction ends at once.
    pub fn on_transport_error(&mut self) {
        self.state = NonInviteState::Terminated;
        self.tx_timers.stop_all();
    }
}

/// INVITE server transaction (§17.2.1 with RFC 6026's Accepted state).
#[derive(Debug, Clone)]
pub struct ServerInvite {
    state: InviteState,
    reliable: bool,
    timers: Timers,
    last_response: Option<Bytes>,
    /// Timer G (retransmit the final response); Timer H, I or L depending on state.
    tx_timers: TxTimers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteState {
    Proceeding,
    Accepted,
    Completed,
    Confirmed,
    Terminated,
}

/// What an ACK meant to an INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// ACK for our non-2xx final: absorbed, the transaction moves to Confirmed.
    Confirmed,
    /// ACK for a 2xx: it belongs to the transaction user (the dialog).
    PassToUser,
    /// A retransmitted ACK: absorbed.
    Absorbed,
}

impl ServerInvite {
    pub fn new(reliable: bool, timers: Timers) -> Self {
        ServerInvite {
            state: InviteState::Proceeding,
            reliable,
            timers,
            last_response: None,
            tx_timers: TxTimers::default(),
        }
    }

    pub fn state(&self) -> InviteState {
        self.state
    }

    /// A retransmitted INVITE: Proceeding resends the last provisional, Completed the
    /// final; Accepted and Confirmed absorb it (the TU retransmits its own 2xx).
    pub fn on_retransmission(&self) -> Option<Bytes> {
        match self.state {
            InviteState::Proceeding | InviteState::Completed => self.last_response.clone(),
            _ => None,
        }
    }

    pub fn send_response(
        &mut self,
        now: Instant,
        status: u16,
        bytes: Bytes,
    ) -> Result<Bytes, CoreError> {
        match (self.state, status) {
            (InviteState::Proceeding, 100..=199) => {
                self.last_response = Some(bytes.clone());
            }
            (InviteState::Proceeding, 200..=299) | (InviteState::Accepted, 200..=299) => {
                // RFC 6026: wait in Accepted for 64*T1 so retransmitted INVITEs are
                // absorbed instead of starting a new transaction.
                if self.state == InviteState::Proceeding {
                    self.tx_timers.end_at(now + self.timers.t1x64());
                }
                self.state = InviteState::Accepted;
                self.last_response = None;
            }
            (InviteState::Proceeding, _) => {
                self.state = InviteState::Completed;
                self.last_response = Some(bytes.clone());
                if !self.reliable {
                    self.tx_timers.retransmit_after(now, self.timers.t1);
                }
                self.tx_timers.end_at(now + self.timers.t1x64()); // Timer H
            }
            (InviteState::Accepted, _) => return Err(CoreError::WrongState("Accepted")),
            (InviteState::Completed, _) => return Err(CoreError::WrongState("Completed")),
            (InviteState::Confirmed, _) => return Err(CoreError::WrongState("Confirmed")),
            (InviteState::Terminated, _) => return Err(CoreError::WrongState("Terminated")),
        }
        Ok(bytes)
    }

    pub fn on_ack(&mut self, now: Instant) -> AckOutcome {
        match self.state {
            InviteState::Completed => {
                self.state = InviteState::Confirmed;
                self.tx_timers.stop_retransmit();
                // Timer I: T4 on unreliable transports to absorb ACK retransmissions.
                let i = if self.reliable {
                    Duration::ZERO
                } else {
                    self.timers.t4
                };
                self.tx_timers.end_at(now + i);
                AckOutcome::Confirmed
            }
            InviteState::Accepted => AckOutcome::PassToUser,
            _ => AckOutcome::Absorbed,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tx_timers.next()
    }

    pub fn handle_timeout(&mut self, now: Instant) -> TimerOutcome {
        if self.tx_timers.end_due(now) {
            let was = std::mem::replace(&mut self.state, InviteState::Terminated);
            self.last_response = None;
            // Timer H firing means the ACK never came.
            return if was == InviteState::Completed {
                TimerOutcome::TimedOut
            } else {
                TimerOutcome::Terminated
            };
        }
        let t2 = self.timers.t2;
        if self
            .tx_timers
            .retransmit_due(now, |interval| (interval * 2).min(t2))
        {
            if let Some(b) = &self.last_response {
                return TimerOutcome::Retransmit(b.clone());
            }
        }
        TimerOutcome::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn non_invite_udp_absorbs_and_lingers_for_timer_j() {
        let t0 = Instant::now();
        let timers = Timers::default();
        let mut tx = ServerNonInvite::new(false, timers);
        assert_eq!(
            tx.on_retransmission(),
            None,
            "Trying discards retransmissions"
        );
        tx.send_response(t0, 100, b("100")).unwrap();
        assert_eq!(tx.on_retransmission(), Some(b("100")));
        tx.send_response(t0, 200, b("200")).unwrap();
        assert_eq!(tx.state(), NonInviteState::Completed);
        assert_eq!(tx.on_retransmission(), Some(b("200")));
        assert!(tx.send_response(t0, 200, b("again")).is_err());
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        assert_eq!(
            tx.handle_timeout(t0 + Duration::from_secs(31)),
            TimerOutcome::Idle
        );
        assert_eq!(
            tx.handle_timeout(t0 + Duration::from_secs(32)),
            TimerOutcome::Terminated
        );
        assert_eq!(tx.state(), NonInviteState::Terminated);
    }

    #[test]
    fn non_invite_tcp_terminates_at_once() {
        let t0 = Instant::now();
        let mut tx = ServerNonInvite::new(true, Timers::default());
        tx.send_response(t0, 200, b("200")).unwrap();
        assert_eq!(tx.poll_timeout(), Some(t0));
        assert_eq!(tx.handle_timeout(t0), TimerOutcome::Terminated);
    }

    #[test]
    fn invite_error_retransmits_with_timer_g_until_ack() {
        let t0 = Instant::now();
        let timers = Timers::default();
        let mut tx = ServerInvite::new(false, timers);
        tx.send_response(t0, 100, b("100")).unwrap();
        assert_eq!(tx.on_retransmission(), Some(b("100")));
        tx.send_response(t0, 486, b("486")).unwrap();
        assert_eq!(tx.state(), InviteState::Completed);
        // G fires at 0.5, 1.5 (0.5+1), 3.5 (+2), 7.5 (+4), 11.5 (+4: capped at T2)
        let mut now = t0;
        let mut fired = Vec::new();
        while let Some(t) = tx.poll_timeout() {
            if t > t0 + Duration::from_secs(12) {
                break;
            }
            now = t;
            if let TimerOutcome::Retransmit(_) = tx.handle_timeout(now) {
                fired.push((now - t0).as_millis());
            }
        }
        assert_eq!(fired, vec![500, 1500, 3500, 7500, 11500]);
        assert_eq!(tx.on_ack(now), AckOutcome::Confirmed);
        assert_eq!(tx.on_ack(now), AckOutcome::Absorbed);
        assert_eq!(
            tx.poll_timeout(),
            Some(now + Duration::from_secs(5)),
            "Timer I = T4"
        );
        assert_eq!(
            tx.handle_timeout(now + Duration::from_secs(5)),
            TimerOutcome::Terminated
        );
    }

    #[test]
    fn invite_error_without_ack_times_out_by_timer_h() {
        let t0 = Instant::now();
        let mut tx = ServerInvite::new(false, Timers::default());
        tx.send_response(t0, 404, b("404")).unwrap();
        let mut outcome = TimerOutcome::Idle;
        while let Some(t) = tx.poll_timeout() {
            outcome = tx.handle_timeout(t);
            if outcome == TimerOutcome::TimedOut {
                assert_eq!(t - t0, Duration::from_secs(32));
                break;
            }
        }
        assert_eq!(outcome, TimerOutcome::TimedOut);
    }

    #[test]
    fn invite_2xx_enters_accepted_per_rfc6026() {
        let t0 = Instant::now();
        let mut tx = ServerInvite::new(false, Timers::default());
        tx.send_response(t0, 200, b("200")).unwrap();
        assert_eq!(tx.state(), InviteState::Accepted);
        assert_eq!(
            tx.on_retransmission(),
            None,
            "INVITE retransmissions absorbed"
        );
        // The TU may retransmit its 2xx through the transaction.
        assert!(tx.send_response(t0, 200, b("200")).is_ok());
        assert_eq!(tx.on_ack(t0), AckOutcome::PassToUser);
        assert_eq!(
            tx.poll_timeout(),
            Some(t0 + Duration::from_secs(32)),
            "Timer L"
        );
        assert_eq!(
            tx.handle_timeout(t0 + Duration::from_secs(32)),
            TimerOutcome::Terminated
        );
    }
}
