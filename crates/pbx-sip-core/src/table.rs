//! The server transactions of a node, with one timer heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use bytes::Bytes;
use pbx_sip_msg::Method;

use crate::server::{AckOutcome, ServerInvite, ServerNonInvite};
use crate::{CoreError, TimerOutcome, Timers, TransactionKey};

#[derive(Debug, Clone)]
enum ServerTx {
    NonInvite(ServerNonInvite),
    Invite(ServerInvite),
}

impl ServerTx {
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            ServerTx::NonInvite(t) => t.poll_timeout(),
            ServerTx::Invite(t) => t.poll_timeout(),
        }
    }
    fn handle_timeout(&mut self, now: Instant) -> TimerOutcome {
        match self {
            ServerTx::NonInvite(t) => t.handle_timeout(now),
            ServerTx::Invite(t) => t.handle_timeout(now),
        }
    }
}

/// What a request means to the transaction layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDisposition {
    /// No transaction matches: the transaction user handles it.
    New,
    /// A retransmission: send these bytes back (or nothing), do not process again.
    Retransmission(Option<Bytes>),
    /// The ACK for a non-2xx final response we sent: absorbed.
    AckAbsorbed,
}

/// What the timers produced; `D` is where the transaction's responses go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableEvent<D> {
    Retransmit(D, Bytes),
    /// Timer H fired: the ACK for our final response never came.
    TimedOut(TransactionKey),
}

/// Server transactions keyed by [`TransactionKey`], generic over the destination `D` the
/// driver uses to send a transaction's responses.
#[derive(Debug)]
pub struct ServerTable<D> {
    timers: Timers,
    txs: HashMap<TransactionKey, (ServerTx, D)>,
    heap: BinaryHeap<Reverse<(Instant, TransactionKey)>>,
}

impl<D: Clone> ServerTable<D> {
    pub fn new(timers: Timers) -> Self {
        ServerTable {
            timers,
            txs: HashMap::new(),
            heap: BinaryHeap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Matches a request against existing transactions (§17.2.3).
    pub fn on_request(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        method: &Method,
    ) -> RequestDisposition {
        let Some((tx, _)) = self.txs.get_mut(key) else {
            return RequestDisposition::New;
        };
        match (tx, method) {
            (ServerTx::Invite(t), Method::Ack) => {
                let outcome = t.on_ack(now);
                let next = t.poll_timeout();
                if let Some(at) = next {
                    self.heap.push(Reverse((at, key.clone())));
                }
                match outcome {
                    AckOutcome::Confirmed | AckOutcome::Absorbed => RequestDisposition::AckAbsorbed,
                    // A 2xx ACK carries a new branch and never matches; be safe anyway.
                    AckOutcome::PassToUser => RequestDisposition::New,
                }
            }
            (ServerTx::Invite(t), _) => RequestDisposition::Retransmission(t.on_retransmission()),
            (ServerTx::NonInvite(t), _) => {
                RequestDisposition::Retransmission(t.on_retransmission())
            }
        }
    }

    /// Opens a transaction for a request the transaction user will answer.
    pub fn create(&mut self, key: TransactionKey, method: &Method, reliable: bool, dest: D) {
        let tx = if *method == Method::Invite {
            ServerTx::Invite(ServerInvite::new(reliable, self.timers))
        } else {
            ServerTx::NonInvite(ServerNonInvite::new(reliable, self.timers))
        };
        self.txs.insert(key, (tx, dest));
    }

    /// The transaction user answers; returns the bytes to send to the transaction's
    /// destination.
    pub fn respond(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        status: u16,
        bytes: Bytes,
    ) -> Result<Bytes, CoreError> {
        let (tx, _) = self
            .txs
            .get_mut(key)
            .ok_or(CoreError::WrongState("no such transaction"))?;
        let out = match tx {
            ServerTx::NonInvite(t) => t.send_response(now, status, bytes)?,
            ServerTx::Invite(t) => t.send_response(now, status, bytes)?,
        };
        if let Some(at) = tx.poll_timeout() {
            self.heap.push(Reverse((at, key.clone())));
        }
        Ok(out)
    }

    /// Where a transaction's responses go.
    pub fn dest(&self, key: &TransactionKey) -> Option<D> {
        self.txs.get(key).map(|(_, d)| d.clone())
    }

    /// Forgets a transaction whose transport failed (§17.2.4).
    pub fn remove(&mut self, key: &TransactionKey) {
        self.txs.remove(key);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, events: &mut Vec<TableEvent<D>>) {
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.heap.pop() else {
                break;
            };
            let Some((tx, dest)) = self.txs.get_mut(&key) else {
                continue; // stale heap entry
            };
            // A stale entry for a transaction whose deadline moved later.
            if tx.poll_timeout().is_none_or(|t| t > now) {
                continue;
            }
            match tx.handle_timeout(now) {
                TimerOutcome::Idle => {}
                TimerOutcome::Retransmit(b) => events.push(TableEvent::Retransmit(dest.clone(), b)),
                TimerOutcome::TimedOut => {
                    self.txs.remove(&key);
                    events.push(TableEvent::TimedOut(key));
                    continue;
                }
                TimerOutcome::Terminated => {
                    self.txs.remove(&key);
                    continue;
                }
            }
            if let Some((tx, _)) = self.txs.get(&key) {
                if let Some(next) = tx.poll_timeout() {
                    self.heap.push(Reverse((next, key)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(s: &str) -> TransactionKey {
        let msg = pbx_sip_msg::parse_datagram(
            format!("OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK{s}\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n").as_bytes(),
            &Default::default(),
        )
        .unwrap();
        let core = pbx_sip_msg::CoreHeaders::extract(&msg).unwrap();
        TransactionKey::for_request(&Method::Options, "sip:a@b", &core)
    }

    #[test]
    fn retransmissions_are_answered_from_the_table_until_timer_j() {
        let t0 = Instant::now();
        let mut table: ServerTable<u8> = ServerTable::new(Timers::default());
        let k = key("1");
        assert_eq!(
            table.on_request(t0, &k, &Method::Options),
            RequestDisposition::New
        );
        table.create(k.clone(), &Method::Options, false, 7);
        assert_eq!(
            table.on_request(t0, &k, &Method::Options),
            RequestDisposition::Retransmission(None),
            "Trying absorbs"
        );
        table
            .respond(t0, &k, 200, Bytes::from_static(b"200"))
            .unwrap();
        assert_eq!(
            table.on_request(t0, &k, &Method::Options),
            RequestDisposition::Retransmission(Some(Bytes::from_static(b"200")))
        );
        let mut ev = Vec::new();
        table.handle_timeout(t0 + Duration::from_secs(31), &mut ev);
        assert_eq!(table.len(), 1);
        table.handle_timeout(table.poll_timeout().unwrap(), &mut ev);
        assert!(table.is_empty());
        assert!(ev.is_empty());
        assert_eq!(
            table.on_request(t0, &k, &Method::Options),
            RequestDisposition::New
        );
    }

    #[test]
    fn invite_error_is_retransmitted_to_its_destination_and_acked() {
        let t0 = Instant::now();
        let mut table: ServerTable<&'static str> = ServerTable::new(Timers::default());
        let k = key("2");
        table.create(k.clone(), &Method::Invite, false, "10.0.0.1:5060");
        table
            .respond(t0, &k, 486, Bytes::from_static(b"486"))
            .unwrap();
        let mut ev = Vec::new();
        table.handle_timeout(t0 + Duration::from_millis(500), &mut ev);
        assert_eq!(
            ev,
            vec![TableEvent::Retransmit(
                "10.0.0.1:5060",
                Bytes::from_static(b"486")
            )]
        );
        assert_eq!(
            table.on_request(t0, &k, &Method::Ack),
            RequestDisposition::AckAbsorbed
        );
        ev.clear();
        table.handle_timeout(t0 + Duration::from_secs(6), &mut ev);
        assert!(ev.is_empty(), "no retransmission after ACK: {ev:?}");
        assert!(table.is_empty(), "Timer I ended it");
    }
}
