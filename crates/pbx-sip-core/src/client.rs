//! Client transactions (RFC 3261 §17.1, RFC 6026 §7.2).

use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_sip_msg::{parse_datagram, HeaderName, Limits, MessageWriter, Method};

use crate::{CoreError, TimerOutcome, Timers, TxTimers};

/// What the transaction user should do with a response the transaction received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseAction {
    /// Hand it to the transaction user.
    Deliver,
    /// Hand it to the user and send these bytes (the ACK for a non-2xx final).
    DeliverAndAck(Bytes),
    /// A retransmission: absorbed, but resend this ACK.
    ResendAck(Bytes),
    /// Absorbed silently.
    Absorb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Calling,
    Trying,
    Proceeding,
    Accepted,
    Completed,
    Terminated,
}

/// Non-INVITE client transaction (§17.1.2, figure 6).
#[derive(Debug, Clone)]
pub struct ClientNonInvite {
    state: ClientState,
    reliable: bool,
    timers: Timers,
    request: Bytes,
    /// Timer E; Timer F or K.
    tx_timers: TxTimers,
}

impl ClientNonInvite {
    /// Starts the transaction; the caller transmits `request` once now.
    pub fn new(now: Instant, request: Bytes, reliable: bool, timers: Timers) -> Self {
        let mut tx_timers = TxTimers::default();
        if !reliable {
            tx_timers.retransmit_after(now, timers.t1);
        }
        tx_timers.end_at(now + timers.t1x64());
        ClientNonInvite {
            state: ClientState::Trying,
            reliable,
            timers,
            request,
            tx_timers,
        }
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    pub fn on_response(&mut self, now: Instant, status: u16) -> ResponseAction {
        match (self.state, status) {
            (ClientState::Trying | ClientState::Proceeding, 100..=199) => {
                self.state = ClientState::Proceeding;
                ResponseAction::Deliver
            }
            (ClientState::Trying | ClientState::Proceeding, _) => {
                self.state = ClientState::Completed;
                self.tx_timers.stop_retransmit();
                // Timer K: T4 on unreliable transports to absorb response retransmissions.
                let k = if self.reliable {
                    Duration::ZERO
                } else {
                    self.timers.t4
                };
                self.tx_timers.end_at(now + k);
                ResponseAction::Deliver
            }
            _ => ResponseAction::Absorb,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tx_timers.next()
    }

    pub fn handle_timeout(&mut self, now: Instant) -> TimerOutcome {
        if self.tx_timers.end_due(now) {
            let was = std::mem::replace(&mut self.state, ClientState::Terminated);
            return if was == ClientState::Completed {
                TimerOutcome::Terminated
            } else {
                TimerOutcome::TimedOut // Timer F
            };
        }
        // Trying doubles up to T2; Proceeding retransmits every T2.
        let (state, t2) = (self.state, self.timers.t2);
        let due = self.tx_timers.retransmit_due(now, |interval| match state {
            ClientState::Proceeding => t2,
            _ => (interval * 2).min(t2),
        });
        if due {
            return TimerOutcome::Retransmit(self.request.clone());
        }
        TimerOutcome::Idle
    }

    /// The transport reported an error (§17.1.4): the transaction fails at once.
    pub fn on_transport_error(&mut self) -> TimerOutcome {
        self.state = ClientState::Terminated;
        self.tx_timers.stop_all();
        TimerOutcome::TimedOut
    }
}

/// The parts of an INVITE an ACK for a non-2xx response copies (§17.1.1.3).
#[derive(Debug, Clone)]
struct AckTemplate {
    request_uri: String,
    top_via: String,
    from: String,
    call_id: String,
    cseq: u32,
    routes: Vec<String>,
}

/// INVITE client transaction (§17.1.1 with RFC 6026's Accepted state).
#[derive(Debug, Clone)]
pub struct ClientInvite {
    state: ClientState,
    reliable: bool,
    timers: Timers,
    request: Bytes,
    template: AckTemplate,
    ack: Option<Bytes>,
    /// Timer A; Timer B, D or M.
    tx_timers: TxTimers,
}

impl ClientInvite {
    /// Starts the transaction for an INVITE we built; the caller transmits it once now.
    pub fn new(
        now: Instant,
        request: Bytes,
        reliable: bool,
        timers: Timers,
    ) -> Result<Self, CoreError> {
        let msg = parse_datagram(&request, &Limits::default())
            .map_err(|e| CoreError::InvalidRequest(e.to_string()))?;
        if msg.method() != Some(&Method::Invite) {
            return Err(CoreError::InvalidRequest("not an INVITE".into()));
        }
        let need = |h: HeaderName| {
            msg.header(&h)
                .map(str::to_string)
                .ok_or_else(|| CoreError::InvalidRequest(format!("missing {}", h.as_str())))
        };
        let cseq = pbx_sip_msg::CSeq::parse(&need(HeaderName::CSeq)?)
            .map_err(CoreError::InvalidRequest)?
            .seq;
        let template = AckTemplate {
            request_uri: msg.request_uri().unwrap_or_default().to_string(),
            top_via: need(HeaderName::Via)?,
            from: need(HeaderName::From)?,
            call_id: need(HeaderName::CallId)?,
            cseq,
            routes: msg
                .header_values(&HeaderName::Route)
                .map(str::to_string)
                .collect(),
        };
        let mut tx_timers = TxTimers::default();
        if !reliable {
            tx_timers.retransmit_after(now, timers.t1);
        }
        tx_timers.end_at(now + timers.t1x64());
        Ok(ClientInvite {
            state: ClientState::Calling,
            reliable,
            timers,
            request,
            template,
            ack: None,
            tx_timers,
        })
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    /// The ACK for a non-2xx final response: same Request-URI, top Via, From, Call-ID,
    /// CSeq number and Route as the INVITE; To from the response (with its tag).
    fn build_ack(&self, response_to: &str) -> Bytes {
        let t = &self.template;
        let mut w = MessageWriter::request(&Method::Ack, &t.request_uri);
        w.header("Via", &t.top_via)
            .header("Max-Forwards", "70")
            .header("From", &t.from)
            .header("To", response_to)
            .header("Call-ID", &t.call_id)
            .header_fmt("CSeq", format_args!("{} ACK", t.cseq));
        for r in &t.routes {
            w.header("Route", r);
        }
        Bytes::from(w.finish(b""))
    }

    /// A response matched this transaction. `response_to` is its To header value.
    pub fn on_response(&mut self, now: Instant, status: u16, response_to: &str) -> ResponseAction {
        match (self.state, status) {
            (ClientState::Calling | ClientState::Proceeding, 100..=199) => {
                self.state = ClientState::Proceeding;
                // Timer B only guards the Calling state.
                self.tx_timers.stop_all();
                ResponseAction::Deliver
            }
            (ClientState::Calling | ClientState::Proceeding, 200..=299) => {
                self.state = ClientState::Accepted;
                self.tx_timers.stop_retransmit();
                self.tx_timers.end_at(now + self.timers.t1x64()); // Timer M
                ResponseAction::Deliver
            }
            (ClientState::Accepted, 200..=299) => ResponseAction::Deliver,
            (ClientState::Calling | ClientState::Proceeding, _) => {
                self.state = ClientState::Completed;
                self.tx_timers.stop_retransmit();
                let d = if self.reliable {
                    Duration::ZERO
                } else {
                    Duration::from_secs(32).max(self.timers.t1x64())
                };
                self.tx_timers.end_at(now + d); // Timer D
                let ack = self.build_ack(response_to);
                self.ack = Some(ack.clone());
                ResponseAction::DeliverAndAck(ack)
            }
            (ClientState::Completed, 300..=699) => match &self.ack {
                Some(ack) => ResponseAction::ResendAck(ack.clone()),
                None => ResponseAction::Absorb,
            },
            _ => ResponseAction::Absorb,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tx_timers.next()
    }

    pub fn handle_timeout(&mut self, now: Instant) -> TimerOutcome {
        if self.tx_timers.end_due(now) {
            let was = std::mem::replace(&mut self.state, ClientState::Terminated);
            return if was == ClientState::Calling {
                TimerOutcome::TimedOut // Timer B
            } else {
                TimerOutcome::Terminated // Timer D or M
            };
        }
        // Timer A doubles without a cap (§17.1.1.2).
        if self.tx_timers.retransmit_due(now, |interval| interval * 2) {
            return TimerOutcome::Retransmit(self.request.clone());
        }
        TimerOutcome::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_invite_timer_e_doubles_to_t2_then_f_fires_at_32s() {
        let t0 = Instant::now();
        let mut tx = ClientNonInvite::new(t0, Bytes::from_static(b"REQ"), false, Timers::default());
        let mut retransmits = Vec::new();
        let outcome = loop {
            let t = tx.poll_timeout().unwrap();
            match tx.handle_timeout(t) {
                TimerOutcome::Retransmit(_) => retransmits.push((t - t0).as_millis()),
                TimerOutcome::Idle => {}
                other => break (other, t - t0),
            }
        };
        assert_eq!(outcome, (TimerOutcome::TimedOut, Duration::from_secs(32)));
        assert_eq!(
            &retransmits[..6],
            &[500, 1500, 3500, 7500, 11500, 15500],
            "E: 0.5, 1, 2, 4, 4, 4 s apart"
        );
    }

    #[test]
    fn non_invite_proceeding_retransmits_every_t2_and_final_waits_timer_k() {
        let t0 = Instant::now();
        let mut tx = ClientNonInvite::new(t0, Bytes::from_static(b"REQ"), false, Timers::default());
        assert_eq!(tx.on_response(t0, 100), ResponseAction::Deliver);
        let t = tx.poll_timeout().unwrap();
        assert!(matches!(tx.handle_timeout(t), TimerOutcome::Retransmit(_)));
        assert_eq!(tx.poll_timeout(), Some(t + Duration::from_secs(4)));
        assert_eq!(tx.on_response(t, 200), ResponseAction::Deliver);
        assert_eq!(
            tx.on_response(t, 200),
            ResponseAction::Absorb,
            "retransmission"
        );
        assert_eq!(
            tx.poll_timeout(),
            Some(t + Duration::from_secs(5)),
            "Timer K = T4"
        );
        assert_eq!(
            tx.handle_timeout(t + Duration::from_secs(5)),
            TimerOutcome::Terminated
        );
    }

    #[test]
    fn non_invite_reliable_has_no_retransmissions() {
        let t0 = Instant::now();
        let tx = ClientNonInvite::new(t0, Bytes::from_static(b"REQ"), true, Timers::default());
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    }

    const INVITE: &[u8] = b"INVITE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKabc\r\nRoute: <sip:proxy;lr>\r\nFrom: <sip:alice@pbx.test>;tag=a\r\nTo: <sip:bob@pbx.test>\r\nCall-ID: c1\r\nCSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn invite_timer_a_doubles_and_b_fires_in_calling() {
        let t0 = Instant::now();
        let mut tx =
            ClientInvite::new(t0, Bytes::from_static(INVITE), false, Timers::default()).unwrap();
        let mut retransmits = Vec::new();
        let outcome = loop {
            let t = tx.poll_timeout().unwrap();
            match tx.handle_timeout(t) {
                TimerOutcome::Retransmit(_) => retransmits.push((t - t0).as_millis()),
                TimerOutcome::Idle => {}
                other => break (other, t - t0),
            }
        };
        assert_eq!(retransmits, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(outcome, (TimerOutcome::TimedOut, Duration::from_secs(32)));
    }

    #[test]
    fn invite_non_2xx_is_acked_and_retransmissions_reacked() {
        let t0 = Instant::now();
        let mut tx =
            ClientInvite::new(t0, Bytes::from_static(INVITE), false, Timers::default()).unwrap();
        assert_eq!(
            tx.on_response(t0, 180, "<sip:bob@pbx.test>;tag=b"),
            ResponseAction::Deliver
        );
        assert_eq!(tx.poll_timeout(), None, "no Timer B once Proceeding");
        let ResponseAction::DeliverAndAck(ack) =
            tx.on_response(t0, 486, "<sip:bob@pbx.test>;tag=b")
        else {
            panic!("expected ACK")
        };
        let ack = parse_datagram(&ack, &Limits::default()).unwrap();
        assert_eq!(ack.method(), Some(&Method::Ack));
        assert_eq!(ack.request_uri(), Some("sip:bob@10.0.0.2"));
        assert_eq!(ack.header(&HeaderName::CSeq), Some("7 ACK"));
        assert_eq!(
            ack.header(&HeaderName::To),
            Some("<sip:bob@pbx.test>;tag=b")
        );
        assert_eq!(ack.header(&HeaderName::Route), Some("<sip:proxy;lr>"));
        assert_eq!(
            ack.header(&HeaderName::Via),
            Some("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKabc")
        );
        assert!(matches!(
            tx.on_response(t0, 486, "<sip:bob@pbx.test>;tag=b"),
            ResponseAction::ResendAck(_)
        ));
        assert_eq!(
            tx.poll_timeout(),
            Some(t0 + Duration::from_secs(32)),
            "Timer D"
        );
        assert_eq!(
            tx.handle_timeout(t0 + Duration::from_secs(32)),
            TimerOutcome::Terminated
        );
    }

    #[test]
    fn invite_2xx_goes_to_accepted_and_passes_every_2xx() {
        let t0 = Instant::now();
        let mut tx =
            ClientInvite::new(t0, Bytes::from_static(INVITE), true, Timers::default()).unwrap();
        assert_eq!(tx.on_response(t0, 200, "x"), ResponseAction::Deliver);
        assert_eq!(tx.state(), ClientState::Accepted);
        assert_eq!(
            tx.on_response(t0, 200, "x"),
            ResponseAction::Deliver,
            "RFC 6026"
        );
        assert_eq!(
            tx.poll_timeout(),
            Some(t0 + Duration::from_secs(32)),
            "Timer M"
        );
    }
}
