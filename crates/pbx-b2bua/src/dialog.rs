//! One leg's dialog (RFC 3261 §12): identifiers, route set, CSeq, and the requests and
//! 2xx retransmissions the B2BUA sends in it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_sip_core::Timers;
use pbx_sip_msg::{ContactList, HeaderName, MessageWriter, Method, SipMessage};
use pbx_state::Transport;

/// Where a leg's messages go. The driver's own type (a UDP address, a connection);
/// the call only needs to know the transport, for Via and for retransmissions.
pub trait Destination: Clone + PartialEq + std::fmt::Debug {
    fn transport(&self) -> Transport;
    /// The peer's address as text, for the replicated call record.
    fn describe(&self) -> String;
}

/// This node's SIP identity on a leg.
#[derive(Debug, Clone)]
pub struct Local {
    pub addr: SocketAddr,
    /// The TLS listener, if any: what Via and Contact name on TLS legs.
    pub tls_addr: Option<SocketAddr>,
}

impl Local {
    fn addr_for(&self, transport: Transport) -> SocketAddr {
        match (transport, self.tls_addr) {
            (Transport::Tls, Some(a)) => a,
            _ => self.addr,
        }
    }

    pub fn via(&self, transport: Transport, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            transport.as_str(),
            self.addr_for(transport)
        )
    }

    /// `transport=tls` rather than a `sips:` Contact: phones registered with a `sip:`
    /// account over TLS take it, and in-dialog requests stay on TLS either way.
    pub fn contact(&self, transport: Transport) -> String {
        match transport {
            Transport::Udp => format!("<sip:pbx@{}>", self.addr),
            t => format!(
                "<sip:pbx@{};transport={}>",
                self.addr_for(t),
                t.as_str().to_ascii_lowercase()
            ),
        }
    }
}

/// A 2xx to an INVITE we sent as UAS, resent until its ACK (§13.3.1.4).
#[derive(Debug, Clone)]
pub struct Retransmit2xx {
    pub cseq: u32,
    pub bytes: Bytes,
    next: Instant,
    interval: Duration,
    give_up: Instant,
}

impl Retransmit2xx {
    pub fn new(now: Instant, cseq: u32, bytes: Bytes, timers: &Timers) -> Self {
        Retransmit2xx {
            cseq,
            bytes,
            next: now + timers.t1,
            interval: timers.t1,
            give_up: now + timers.t1x64(),
        }
    }

    pub fn deadline(&self) -> Instant {
        self.next.min(self.give_up)
    }
}

/// What a due 2xx retransmission timer means.
pub(crate) enum RetransmitDue {
    Idle,
    Resend(Bytes),
    /// No ACK within 64*T1: the dialog must be ended with a BYE.
    GaveUp,
}

/// A dialog as one side of the B2BUA sees it.
#[derive(Debug, Clone)]
pub struct Dialog<D> {
    pub call_id: String,
    /// Our From/To value (with our tag) in requests we send.
    pub local: String,
    pub local_tag: String,
    /// The peer's value; with its tag once known.
    pub remote: String,
    pub remote_tag: Option<String>,
    /// Request-URI of requests in the dialog: the peer's Contact.
    pub remote_target: String,
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: u32,
    pub dest: D,
    pub retransmit: Option<Retransmit2xx>,
    /// The last ACK we sent for a 2xx (resent when the 2xx is retransmitted).
    pub last_ack: Option<(u32, Bytes)>,
}

impl<D: Destination> Dialog<D> {
    /// The dialog a UAS makes by answering `msg` (an INVITE, a SUBSCRIBE): our side is
    /// `head`'s To with its tag, the far side's target its Contact, the route set its
    /// Record-Route.
    pub fn uas(
        msg: &SipMessage,
        core: &pbx_sip_msg::CoreHeaders,
        head: &pbx_sip_msg::ReplyHead,
        dest: D,
    ) -> Dialog<D> {
        Dialog {
            call_id: core.call_id.clone(),
            local: head.to_with_tag(),
            local_tag: head.to_tag().to_string(),
            remote: core.from.raw.clone(),
            remote_tag: core.from.tag().map(str::to_string),
            remote_target: contact_uri(msg).unwrap_or_else(|| core.from.uri_raw.clone()),
            route_set: record_routes(msg),
            local_cseq: 0,
            remote_cseq: core.cseq.seq,
            dest,
            retransmit: None,
            last_ack: None,
        }
    }

    pub fn reliable(&self) -> bool {
        self.dest.transport().is_connection_bound()
    }

    /// A request in the dialog with the next CSeq; returns it with its CSeq number.
    pub fn request(
        &mut self,
        local: &Local,
        method: &Method,
        branch: &str,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> (u32, Bytes) {
        self.local_cseq += 1;
        let cseq = self.local_cseq;
        (cseq, self.build(local, method, cseq, branch, extra, body))
    }

    /// The ACK for a 2xx to our INVITE with CSeq `cseq`: a transaction of its own.
    pub(crate) fn ack(&mut self, local: &Local, cseq: u32, branch: &str) -> Bytes {
        let b = self.build(local, &Method::Ack, cseq, branch, &[], None);
        self.last_ack = Some((cseq, b.clone()));
        b
    }

    fn build(
        &self,
        local: &Local,
        method: &Method,
        cseq: u32,
        branch: &str,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Bytes {
        let t = self.dest.transport();
        let mut w = MessageWriter::request(method, &self.remote_target);
        w.header("Via", &local.via(t, branch))
            .header("Max-Forwards", "70")
            .header("From", &self.local)
            .header("To", &self.remote)
            .header("Call-ID", &self.call_id)
            .header_fmt("CSeq", format_args!("{cseq} {}", method.as_str()));
        for r in &self.route_set {
            w.header("Route", r);
        }
        // Target-refresh requests, and those of a subscription (RFC 6665 §4.1.2.1).
        if matches!(
            method,
            Method::Invite | Method::Update | Method::Notify | Method::Refer
        ) {
            w.header("Contact", &local.contact(t));
        }
        for (n, v) in extra {
            w.header(n, v);
        }
        let bytes = match body {
            Some((ct, b)) => {
                w.header("Content-Type", ct);
                w.finish(b)
            }
            None => w.finish(b""),
        };
        Bytes::from(bytes)
    }

    /// Takes the peer's Contact and Record-Route (reversed for a UAC) from a
    /// dialog-forming message. The route set is fixed by the first one that has any.
    pub fn learn_target(&mut self, msg: &SipMessage, uac: bool) {
        if let Some(t) = contact_uri(msg) {
            self.remote_target = t;
        }
        if self.route_set.is_empty() {
            let mut routes = record_routes(msg);
            if uac {
                routes.reverse();
            }
            self.route_set = routes;
        }
    }

    /// Checks the 2xx retransmission timer.
    pub(crate) fn retransmit_due(&mut self, now: Instant, timers: &Timers) -> RetransmitDue {
        let Some(r) = &mut self.retransmit else {
            return RetransmitDue::Idle;
        };
        if now >= r.give_up {
            self.retransmit = None;
            return RetransmitDue::GaveUp;
        }
        if now >= r.next {
            r.interval = (r.interval * 2).min(timers.t2);
            r.next = now + r.interval;
            return RetransmitDue::Resend(r.bytes.clone());
        }
        RetransmitDue::Idle
    }
}

/// The URI of the first Contact of a message.
pub(crate) fn contact_uri(msg: &SipMessage) -> Option<String> {
    match ContactList::parse(msg.header_values(&HeaderName::Contact)) {
        Ok(ContactList::Contacts(list)) => list.into_iter().next().map(|c| c.uri_raw),
        _ => None,
    }
}

/// Every Record-Route value, in order (comma lists split).
pub(crate) fn record_routes(msg: &SipMessage) -> Vec<String> {
    match ContactList::parse(msg.header_values(&HeaderName::RecordRoute)) {
        Ok(ContactList::Contacts(list)) => list.into_iter().map(|c| c.raw).collect(),
        _ => Vec::new(),
    }
}
