//! Call admission (which INVITE starts a call, and which gets a 503 or a 404) and the
//! contacts a Dial rings (which bindings, skipping loops and non-TLS contacts of a
//! `sips:` call, and 404 or 480 when there are none).

use std::net::SocketAddr;
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
}

impl Refused {
    pub fn status(&self) -> u16 {
        match self {
            Refused::NoRoute { .. } => 404,
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
}

/// Starts the dialplan at the extension `msg` dials, in the caller's context.
pub(crate) fn route(
    plan: Arc<Dialplan>,
    state: &State,
    caller: &str,
    msg: &SipMessage,
    core: &CoreHeaders,
) -> Result<Routed, Refused> {
    let uri = msg.request_uri().and_then(|u| Uri::parse(u).ok());
    // RFC 5630: a `sips:` call is only put through over TLS.
    let secure = uri.as_ref().is_some_and(|u| u.scheme == "sips");
    let exten = uri.and_then(|u| u.user_unescaped()).unwrap_or_default();
    let user = state.users.get(caller);
    let context = user.map_or("default", |u| u.context.as_str());
    let name = user
        .and_then(|u| u.caller_id_name.clone())
        .or_else(|| core.from.display.clone())
        .unwrap_or_default();
    let caller_id = CallerId {
        num: caller.to_string(),
        name: name.trim_matches('"').to_string(),
    };
    let domain = state
        .settings
        .as_ref()
        .map(|s| s.domain.clone())
        .unwrap_or_default();
    match Execution::start(plan, context, &exten, caller_id) {
        Ok(exec) => Ok(Routed {
            exec,
            exten,
            secure,
            domain,
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

/// The contacts of the users among `targets` (URI targets are located by the driver,
/// RFC 3263). Phones on connections another node holds are reached through that node.
pub(crate) fn contacts(
    node_id: u64,
    local_addr: SocketAddr,
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
                    let Ok(addr) = b.source.parse::<SocketAddr>() else {
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
