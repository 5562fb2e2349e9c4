//! Call admission (which INVITE starts a call, and which gets a 503 or a 404) and the
//! contacts a Dial rings (which bindings, skipping loops and non-TLS contacts of a
//! `sips:` call, and 404 or 480 when there are none).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pbx_b2bua::Contact;
use pbx_dialplan::{CallerId, DialTarget, Dialplan, Execution};
use pbx_sip_msg::{CoreHeaders, SipMessage, Uri};
use pbx_state::{Binding, LegRecord, State, Transport};

use crate::Dest;

/// Why an INVITE was refused before a call started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The node runs as many calls as it may.
    CallLimit { limit: usize },
    /// No dialplan has been committed yet.
    NoDialplan,
    /// The dialplan has no route for the extension.
    NoRoute {
        caller: String,
        exten: String,
        context: String,
        error: String,
    },
    /// The media relay has no ports free.
    NoMediaPorts,
    /// A `Replaces` header that does not parse (RFC 3891 §6.1).
    BadReplaces,
}

impl Refused {
    pub fn status(&self) -> u16 {
        match self {
            Refused::NoRoute { .. } => 404,
            Refused::BadReplaces => 400,
            Refused::CallLimit { .. } | Refused::NoDialplan | Refused::NoMediaPorts => 503,
        }
    }

    /// The text of the response's Warning header.
    pub fn warning(&self) -> &'static str {
        match self {
            Refused::CallLimit { .. } => "call limit reached on this node",
            Refused::NoDialplan => "no dialplan yet",
            Refused::NoRoute { .. } => "no such extension",
            Refused::NoMediaPorts => "no media ports free",
            Refused::BadReplaces => "bad Replaces header",
        }
    }
}

/// The compiled dialplan of the version last used.
#[derive(Debug, Default)]
pub(crate) struct PlanCache(Option<(u64, Arc<Dialplan>)>);

impl PlanCache {
    pub(crate) fn get(&mut self, state: &State) -> Option<Arc<Dialplan>> {
        let stored = state.dialplan.as_ref()?;
        if let Some((v, plan)) = &self.0 {
            if *v == stored.version {
                return Some(plan.clone());
            }
        }
        // Validated before it was committed; a failure here is a bug, not input.
        let plan = Arc::new(Dialplan::parse(&stored.source).ok()?);
        self.0 = Some((stored.version, plan.clone()));
        Some(plan)
    }
}

/// What the dialplan makes of an authenticated INVITE.
pub(crate) struct Routed {
    pub exec: Execution,
    pub exten: String,
    pub secure: bool,
    pub domain: String,
    /// An INVITE with Replaces (RFC 3891): no dialplan runs, see [`replacing`].
    pub replaces: Option<pbx_b2bua::Replaces>,
}

/// The extension an INVITE dials, whether it is a `sips:` call (RFC 5630: only put
/// through over TLS), and the cluster's domain.
fn dialled(state: &State, msg: &SipMessage) -> (String, bool, String) {
    let uri = msg.request_uri().and_then(|u| Uri::parse(u).ok());
    let secure = uri.as_ref().is_some_and(|u| u.scheme == "sips");
    let exten = uri.and_then(|u| u.user_unescaped()).unwrap_or_default();
    let domain = state
        .settings
        .as_ref()
        .map(|s| s.domain.clone())
        .unwrap_or_default();
    (exten, secure, domain)
}

/// An INVITE with a `Replaces` header (`value`): the caller takes the place of a party
/// of another call, with no dialplan; a header that does not parse is refused (400).
pub(crate) fn replacing(
    state: &State,
    caller: &str,
    msg: &SipMessage,
    core: &CoreHeaders,
    value: &str,
) -> Result<Routed, Refused> {
    let replaces = pbx_b2bua::Replaces::parse(value).ok_or(Refused::BadReplaces)?;
    let (exten, secure, domain) = dialled(state, msg);
    let caller_id = caller_id(state, caller, core.from.display.as_deref());
    Ok(Routed {
        exec: Execution::finished(caller_id),
        exten,
        secure,
        domain,
        replaces: Some(replaces),
    })
}

/// The dialplan context of a user's calls (`default` for one not in the table).
pub(crate) fn context_of<'a>(state: &'a State, user: &str) -> &'a str {
    state
        .users
        .get(user)
        .map_or("default", |u| u.context.as_str())
}

/// A user's caller id: the name configured for it, else the one its phone sent.
pub(crate) fn caller_id(state: &State, user: &str, display: Option<&str>) -> CallerId {
    let name = state
        .users
        .get(user)
        .and_then(|u| u.caller_id_name.clone())
        .or_else(|| display.map(str::to_string))
        .unwrap_or_default();
    CallerId {
        num: user.to_string(),
        name: name.trim_matches('"').to_string(),
    }
}

/// Starts the dialplan at the extension `msg` dials, in the caller's context.
pub(crate) fn route(
    plan: Arc<Dialplan>,
    state: &State,
    caller: &str,
    msg: &SipMessage,
    core: &CoreHeaders,
) -> Result<Routed, Refused> {
    let (exten, secure, domain) = dialled(state, msg);
    let caller_id = caller_id(state, caller, core.from.display.as_deref());
    let context = context_of(state, caller);
    match Execution::start(plan, context, &exten, caller_id) {
        Ok(exec) => Ok(Routed {
            exec,
            exten,
            secure,
            domain,
            replaces: None,
        }),
        Err(e) => Err(Refused::NoRoute {
            caller: caller.to_string(),
            exten,
            context: context.to_string(),
            error: e.to_string(),
        }),
    }
}

/// The contacts of a Dial's targets.
#[derive(Debug, Clone)]
pub struct Contacts {
    pub contacts: Vec<Contact<Dest>>,
    /// The status when no contact answers: 404 when no target is a known user (or a
    /// URI), 480 when they are known but nobody is registered.
    pub unreachable: u16,
    /// Bindings left out, and why.
    pub skipped: Vec<Skipped>,
}

/// A binding a Dial does not ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub user: String,
    pub uri: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The contact points at this node: calling it would loop.
    Loop,
    /// A `sips:` call and a contact not registered over TLS.
    NotTls,
}

/// How a UDP phone is reached (`[registrar] nat`: "auto", "force", "no").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatPolicy {
    /// At its Contact, unless it looks NATed (see [`udp_target`]).
    #[default]
    Auto,
    /// Always where its REGISTER came from (Asterisk's `force_rport` + `rewrite_contact`).
    Force,
    /// Always at its Contact (a LAN where provisioning systems register phones at their
    /// private addresses).
    No,
}

/// Where a UDP binding is reached. At its Contact (RFC 3261 §10.2: a REGISTER may bind
/// an address it was not sent from — a third-party registration, a phone that sends from
/// one port and listens on another), except where the Contact cannot be what reaches the
/// phone: an RFC 5626 flow (the flow is the way back), a Contact that names a host
/// rather than an address, or one whose address is private or unroutable and differs
/// from the REGISTER's source (a phone behind NAT writing its LAN address): then the
/// source. `policy` forces one or the other.
pub fn udp_target(b: &Binding, policy: NatPolicy) -> Option<SocketAddr> {
    let source: SocketAddr = b.source.parse().ok()?;
    if policy == NatPolicy::Force || b.reg_id.is_some() {
        return Some(source);
    }
    let Some(contact) = Uri::parse(&b.uri).ok().and_then(|u| {
        let ip: IpAddr = u.host.trim_matches(['[', ']']).parse().ok()?;
        Some(SocketAddr::new(ip, u.port.unwrap_or(5060)))
    }) else {
        return Some(source);
    };
    let behind_nat = contact.ip() != source.ip()
        && unroutable(contact.ip())
        // A phone on this very host is not behind NAT.
        && !(contact.ip().is_loopback() && source.ip().is_loopback());
    if policy == NatPolicy::Auto && behind_nat {
        Some(source)
    } else {
        Some(contact)
    }
}

/// An address another network cannot reach the phone at: private (RFC 1918, RFC 4193),
/// shared (RFC 6598, carrier NAT), link-local, loopback, unspecified.
fn unroutable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_link_local()
                || v4.is_loopback()
                || v4.is_unspecified()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| unroutable(IpAddr::V4(v4)))
        }
    }
}

/// The contacts of the users among `targets` (URI targets are located by the driver,
/// RFC 3263). Phones on connections another node holds are reached through that node.
#[allow(clippy::too_many_arguments)]
pub(crate) fn contacts(
    node_id: u64,
    local_addr: SocketAddr,
    nat: NatPolicy,
    state: &State,
    targets: &[DialTarget],
    secure: bool,
    now_ms: u64,
) -> Contacts {
    let mut out = Contacts {
        contacts: Vec::new(),
        unreachable: 404,
        skipped: Vec::new(),
    };
    let mut known = false;
    for t in targets {
        match t {
            DialTarget::User(user) => {
                if !state.users.contains_key(user) {
                    continue;
                }
                known = true;
                for b in state.bindings_of(user, now_ms) {
                    // A UDP phone at its Contact or its source; a connection's phone
                    // where its connection comes from.
                    let addr = match b.transport {
                        Transport::Udp => udp_target(&b, nat),
                        _ => b.source.parse::<SocketAddr>().ok(),
                    };
                    let Some(addr) = addr else {
                        continue;
                    };
                    let skip = if addr == local_addr {
                        Some(SkipReason::Loop)
                    } else if secure && b.transport != Transport::Tls {
                        Some(SkipReason::NotTls)
                    } else {
                        None
                    };
                    if let Some(reason) = skip {
                        out.skipped.push(Skipped {
                            user: user.clone(),
                            uri: b.uri,
                            reason,
                        });
                        continue;
                    }
                    let dest = match b.transport {
                        Transport::Udp => Dest::Udp(addr),
                        t if b.node_id == node_id => Dest::Conn(0, addr, t),
                        // Only the home node holds the phone's connection.
                        t => Dest::Peer(b.node_id, addr, t),
                    };
                    out.contacts.push(Contact {
                        uri: b.uri,
                        dest,
                        route: b.path,
                        user: user.clone(),
                        alternates: Vec::new(),
                        domain: None,
                    });
                }
            }
            // Located by the driver (RFC 3263).
            DialTarget::Uri { .. } => known = true,
        }
    }
    if known {
        out.unreachable = 480;
    }
    out
}

/// The live binding a resumed call's connection-bound leg is reached through now: the
/// newest one of the same transport with the leg's Contact or address.
fn leg_binding<'a>(
    state: &'a State,
    leg: &LegRecord,
    addr: SocketAddr,
    now_ms: u64,
) -> Option<&'a Binding> {
    state
        .bindings
        .values()
        .flatten()
        .filter(|b| b.is_live(now_ms) && b.transport == leg.transport)
        .filter(|b| {
            b.uri == leg.remote_target
                || b.source == addr.to_string()
                || (leg.instance.is_some() && b.instance == leg.instance)
        })
        .max_by_key(|b| b.registered_at_ms)
}

/// The `+sip.instance` of the phone a connection-bound leg reaches, from its binding
/// (by Contact or source address); for a leg without one now, the instance the call's
/// previous record knew. What lets an adopter find the phone's new flow (ADR 0010).
pub fn leg_instance(
    state: &State,
    leg: &LegRecord,
    previous: Option<&LegRecord>,
    now_ms: u64,
) -> Option<String> {
    if !leg.transport.is_connection_bound() {
        return None;
    }
    leg.instance
        .clone()
        .or_else(|| {
            leg_addr(leg)
                .and_then(|addr| leg_binding(state, leg, addr, now_ms))
                .and_then(|b| b.instance.clone())
        })
        .or_else(|| previous.and_then(|p| p.instance.clone()))
}

/// The address a leg's record names (`peer` as the owner's destination described it).
fn leg_addr(leg: &LegRecord) -> Option<SocketAddr> {
    leg.peer.split_whitespace().next()?.parse().ok()
}

/// Where a resumed call's recorded leg is reached from node `node_id` (ADR 0010): a UDP
/// phone at its address; a phone on TCP or TLS through the node that holds its
/// connection now (its newest binding with the same Contact or source), or over a new
/// connection from here when none does.
pub fn resume_dest(state: &State, leg: &LegRecord, node_id: u64, now_ms: u64) -> Option<Dest> {
    let addr = leg_addr(leg)?;
    if leg.transport == Transport::Udp {
        return Some(Dest::Udp(addr));
    }
    Some(match leg_binding(state, leg, addr, now_ms) {
        Some(b) => {
            let at = b.source.parse().unwrap_or(addr);
            if b.node_id == node_id {
                Dest::Conn(0, at, b.transport)
            } else {
                Dest::Peer(b.node_id, at, b.transport)
            }
        }
        None => Dest::Conn(0, addr, leg.transport),
    })
}

/// Whether every leg of a call to resume can be reached now: UDP legs always; a TCP or
/// TLS phone once a live node holds its connection (`alive`), i.e. once a phone whose
/// connection died with the old owner has registered again through a survivor (RFC 5626
/// flow recovery). Until then the adopter waits rather than fail the call.
pub fn legs_reachable(
    state: &State,
    legs: &[LegRecord],
    now_ms: u64,
    alive: impl Fn(u64) -> bool,
) -> bool {
    legs.iter()
        .filter(|l| l.transport.is_connection_bound())
        .all(|l| {
            leg_addr(l)
                .and_then(|addr| leg_binding(state, l, addr, now_ms))
                .is_some_and(|b| alive(b.node_id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(uri: &str, source: &str, reg_id: Option<u32>) -> Binding {
        Binding {
            uri: uri.into(),
            uri_key: uri.into(),
            params: String::new(),
            q: None,
            expires_at_ms: u64::MAX,
            call_id: "c".into(),
            cseq: 1,
            instance: None,
            reg_id,
            path: Vec::new(),
            source: source.into(),
            transport: Transport::Udp,
            node_id: 1,
            user_agent: None,
            registered_at_ms: 0,
        }
    }

    fn at(uri: &str, source: &str, nat: NatPolicy) -> String {
        udp_target(&binding(uri, source, None), nat)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_udp_phone_is_reached_at_its_contact_unless_it_looks_natted() {
        use NatPolicy::*;
        // Third-party registration, or a phone listening on another port: its Contact.
        assert_eq!(
            at("sip:a@198.51.100.7:5070", "203.0.113.9:5060", Auto),
            "198.51.100.7:5070"
        );
        assert_eq!(
            at("sip:a@203.0.113.9:5080", "203.0.113.9:5060", Auto),
            "203.0.113.9:5080"
        );
        assert_eq!(
            at("sip:a@203.0.113.9", "203.0.113.9:5062", Auto),
            "203.0.113.9:5060"
        );
        // Behind NAT: a private (or CGNAT, link-local) Contact from a public source.
        for contact in [
            "sip:a@192.168.1.20:5060",
            "sip:a@10.1.2.3",
            "sip:a@100.64.0.9:5060",
            "sip:a@169.254.3.4",
        ] {
            assert_eq!(
                at(contact, "203.0.113.9:40123", Auto),
                "203.0.113.9:40123",
                "{contact}"
            );
        }
        assert_eq!(
            at("sip:a@[fd00::5]:5060", "[2001:db8::1]:5060", Auto),
            "[2001:db8::1]:5060"
        );
        // A host name is not resolved here: the source.
        assert_eq!(
            at("sip:a@phone.example.com", "203.0.113.9:5060", Auto),
            "203.0.113.9:5060"
        );
        // Phones on this host (tests, loopback): the Contact.
        assert_eq!(
            at("sip:a@127.0.70.51:5090", "127.0.70.50:5060", Auto),
            "127.0.70.51:5090"
        );
        // Forced either way.
        assert_eq!(
            at("sip:a@198.51.100.7:5070", "203.0.113.9:5060", Force),
            "203.0.113.9:5060"
        );
        assert_eq!(
            at("sip:a@192.168.1.20:5060", "203.0.113.9:5060", No),
            "192.168.1.20:5060"
        );
        // An RFC 5626 flow: back the way it came.
        let flow = binding("sip:a@198.51.100.7:5070;ob", "203.0.113.9:5060", Some(1));
        assert_eq!(
            udp_target(&flow, Auto),
            Some("203.0.113.9:5060".parse().unwrap())
        );
    }
}
