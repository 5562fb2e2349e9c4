//! Responses to requests, for every part of the node that answers one (registrar,
//! calls, the transport): the headers a response copies from its request (RFC 3261
//! §8.2.6.2), an answer to a request that did not parse, and where a response goes
//! (§18.2.2, RFC 3581).

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use crate::{CoreHeaders, Header, HeaderName, MessageWriter, Via};

/// Methods the node implements (registrar and calls), for Allow headers.
pub const ALLOW: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, REFER, NOTIFY, SUBSCRIBE";

/// Via (the top one stamped with received/rport), From, To, Call-ID and CSeq of a request,
/// ready to be written into any response to it.
#[derive(Debug, Clone)]
pub struct ReplyHead {
    vias: Vec<String>,
    from: String,
    to: String,
    to_has_tag: bool,
    to_tag: String,
    call_id: String,
    cseq: String,
    server: String,
}

/// A To tag that is the same for every retransmission of a request, so stateless
/// answers stay consistent (§8.2.7).
fn stable_tag(parts: &[&str]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl ReplyHead {
    /// The request's Call-ID (for log spans).
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The head for responses to the request with these core headers, received from
    /// `source`; `server` is the Server header's value.
    pub fn new(core: &CoreHeaders, source: SocketAddr, server: &str) -> Self {
        let src_ip = source.ip().to_string();
        let mut vias = Vec::with_capacity(core.vias.len());
        for (i, v) in core.vias.iter().enumerate() {
            if i == 0 {
                vias.push(v.stamped(&src_ip, source.port()));
            } else {
                vias.push(v.raw.clone());
            }
        }
        ReplyHead {
            vias,
            from: core.from.raw.clone(),
            to: core.to.raw.clone(),
            to_has_tag: core.to.tag().is_some(),
            to_tag: match core.to.tag() {
                Some(t) => t.to_string(),
                None => stable_tag(&[
                    &core.call_id,
                    core.from.tag().unwrap_or_default(),
                    core.vias[0].branch().unwrap_or_default(),
                ]),
            },
            call_id: core.call_id.clone(),
            cseq: format!("{} {}", core.cseq.seq, core.cseq.method),
            server: server.to_string(),
        }
    }

    /// The To tag this head puts on responses: the request's own, or the one it made up
    /// (the UAS's tag of a dialog the request creates).
    pub fn to_tag(&self) -> &str {
        &self.to_tag
    }

    /// The To value responses carry (with the tag).
    pub fn to_with_tag(&self) -> String {
        if self.to_has_tag {
            self.to.clone()
        } else {
            format!("{};tag={}", self.to, self.to_tag)
        }
    }

    pub fn write(&self, w: &mut MessageWriter, status: u16) {
        for v in &self.vias {
            w.header("Via", v);
        }
        w.header("From", &self.from);
        if self.to_has_tag || status == 100 {
            w.header("To", &self.to);
        } else {
            w.header_fmt("To", format_args!("{};tag={}", self.to, self.to_tag));
        }
        w.header("Call-ID", &self.call_id);
        w.header("CSeq", &self.cseq);
        w.header("Server", &self.server);
    }
}

/// An error response to a request whose parse failed, from whatever headers were
/// readable. None when there is not enough to address a response (no Via).
pub fn reply_to_unparseable(
    headers: &[Header],
    status: u16,
    reason: &str,
    source: SocketAddr,
    server: &str,
) -> Option<Vec<u8>> {
    let vias: Vec<&Header> = headers
        .iter()
        .filter(|h| h.name == HeaderName::Via)
        .collect();
    if vias.is_empty() {
        return None;
    }
    // Keep the reason to one safe line.
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    let mut w = MessageWriter::response_with_reason(status, &reason);
    for (i, h) in vias.iter().enumerate() {
        let stamped = (i == 0)
            .then(|| Via::parse_list(&h.value).ok())
            .flatten()
            .and_then(|v| v.into_iter().next())
            .map(|v| v.stamped(&source.ip().to_string(), source.port()));
        w.header("Via", stamped.as_deref().unwrap_or(&h.value));
    }
    for name in [
        HeaderName::From,
        HeaderName::To,
        HeaderName::CallId,
        HeaderName::CSeq,
    ] {
        if let Some(h) = headers.iter().find(|h| h.name == name) {
            w.header(name.as_str(), &h.value);
        }
    }
    w.header("Server", server);
    Some(w.finish(b""))
}

/// Where a response to a request from `source` goes (§18.2.2 with RFC 3581): on a
/// connection, back on it; over UDP, to the source address when `rport` was asked for
/// (or the sent-by cannot be used), otherwise to the source IP at the sent-by port.
pub fn response_target(top_via: &Via, source: SocketAddr, reliable: bool) -> SocketAddr {
    if reliable || top_via.rport().is_some() {
        return source;
    }
    let port = top_via.port.unwrap_or(5060);
    // The sent-by host may be a name we would have to resolve; `received` semantics say
    // the source IP is where the request really came from.
    let ip: IpAddr = source.ip();
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_target_uses_rport_or_sent_by_port() {
        let src: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let v = &Via::parse_list("SIP/2.0/UDP host:5070;rport;branch=z9hG4bKa").unwrap()[0];
        assert_eq!(response_target(v, src, false), src);
        let v = &Via::parse_list("SIP/2.0/UDP host:5070;branch=z9hG4bKa").unwrap()[0];
        assert_eq!(
            response_target(v, src, false),
            "192.0.2.1:5070".parse().unwrap()
        );
        let v = &Via::parse_list("SIP/2.0/UDP host;branch=z9hG4bKa").unwrap()[0];
        assert_eq!(
            response_target(v, src, false),
            "192.0.2.1:5060".parse().unwrap()
        );
        assert_eq!(response_target(v, src, true), src);
    }
}
