//! The registrar's binding rules (RFC 3261 §10.3, RFC 5626 flows, RFC 3327 Path), in
//! one place: what a Contact becomes as a binding and for how long, which stored binding
//! it is, when a REGISTER is refused as out of order or over the contact limit, and how
//! an AOR's list is kept. The registrar runs the request's checks
//! ([`BindingLimits::register_op`]) before it commits;
//! [`State::apply`](crate::State::apply) runs the rest against the stored list (this
//! module's `register`), deterministically.

use pbx_sip_msg::grammar::{parse_delta_seconds, parse_u32};
use pbx_sip_msg::{Contact, Uri};
use serde::{Deserialize, Serialize};

use crate::{Response, Transport};

/// One registered contact of an address-of-record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The Contact URI exactly as sent (inside the brackets, if any).
    pub uri: String,
    /// Comparison key of the URI (RFC 3261 §19.1.4, simplified).
    pub uri_key: String,
    /// Contact header parameters as sent, without `expires` (e.g. `;q=0.5;+sip.instance=…`).
    pub params: String,
    /// q-value in thousandths (1000 = 1.0); None when absent.
    pub q: Option<u16>,
    /// Absolute expiry, Unix milliseconds, stamped by the proposer.
    pub expires_at_ms: u64,
    pub call_id: String,
    pub cseq: u32,
    /// RFC 5626 `+sip.instance` and `reg-id`.
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
    /// Path header values (RFC 3327), in order.
    pub path: Vec<String>,
    /// Where the REGISTER came from (after rport/received) and over what.
    pub source: String,
    pub transport: Transport,
    /// The node that received the REGISTER and, for TCP/TLS, holds the connection.
    pub node_id: u64,
    pub user_agent: Option<String>,
    pub registered_at_ms: u64,
}

impl Binding {
    pub fn remaining_secs(&self, now_ms: u64) -> u64 {
        remaining_secs(self.expires_at_ms, now_ms)
    }

    /// Expired bindings are invisible at once, before any sweep removes them.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms
    }
}

/// What a 200 OK to a REGISTER lists of a binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactView {
    pub uri: String,
    pub params: String,
    pub expires_at_ms: u64,
}

impl ContactView {
    pub fn remaining_secs(&self, now_ms: u64) -> u64 {
        remaining_secs(self.expires_at_ms, now_ms)
    }
}

impl From<&Binding> for ContactView {
    fn from(b: &Binding) -> Self {
        ContactView {
            uri: b.uri.clone(),
            params: b.params.clone(),
            expires_at_ms: b.expires_at_ms,
        }
    }
}

/// Whole seconds left, rounded up, so a live binding never shows `expires=0`.
fn remaining_secs(expires_at_ms: u64, now_ms: u64) -> u64 {
    expires_at_ms.saturating_sub(now_ms).div_ceil(1000)
}

/// A contact to add, refresh or remove (expires == 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactUpdate {
    pub binding: Binding,
    pub expires_secs: u32,
}

impl ContactUpdate {
    /// Registration time and absolute expiry from the proposer's clock.
    pub fn stamp(&mut self, now_ms: u64) {
        self.binding.registered_at_ms = now_ms;
        self.binding.expires_at_ms = now_ms + u64::from(self.expires_secs) * 1000;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterOp {
    /// `Contact: *` with `Expires: 0`.
    RemoveAll,
    Update(Vec<ContactUpdate>),
}

/// Why a REGISTER's contacts cannot become bindings (before anything is committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `Contact: *` without `Expires: 0` (§10.3 step 6).
    StarWithoutExpiresZero,
    /// A Contact URI that is neither SIP nor tel.
    UnsupportedContactScheme,
    /// A non-zero expiry below the minimum (§10.3 step 7: 423 with Min-Expires).
    IntervalTooBrief { min_secs: u32 },
}

/// The registrar's configured limits on bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingLimits {
    pub min_expires: u32,
    pub default_expires: u32,
    pub max_expires: u32,
    /// Bindings per AOR.
    pub max_contacts: u32,
}

/// The facts of one REGISTER request that every binding it makes carries.
#[derive(Debug, Clone)]
pub struct RegisterRequest<'a> {
    pub call_id: &'a str,
    pub cseq: u32,
    /// The Expires header, if any (the default for contacts without `expires`).
    pub expires_header: Option<u64>,
    pub path: &'a [String],
    pub source: String,
    pub transport: Transport,
    pub node_id: u64,
    pub user_agent: Option<&'a str>,
    pub now_ms: u64,
}

impl BindingLimits {
    /// Limits that cannot work, named by their configuration key.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.min_expires == 0 || self.min_expires > self.max_expires {
            return Err("min_expires must be > 0 and <= max_expires");
        }
        if !(self.min_expires..=self.max_expires).contains(&self.default_expires) {
            return Err("default_expires must lie between min_expires and max_expires");
        }
        if self.max_contacts == 0 {
            return Err("max_contacts must be at least 1");
        }
        Ok(())
    }

    /// §10.3 step 7: the contact's `expires`, else the Expires header, else the default;
    /// 0 removes; below the minimum is refused; above the maximum is cut to it.
    pub fn granted_expires(
        &self,
        contact: &Contact,
        expires_header: Option<u64>,
    ) -> Result<u32, Refusal> {
        let requested = contact
            .param("expires")
            .and_then(|p| p.value.as_deref())
            .and_then(parse_delta_seconds)
            .or(expires_header)
            .unwrap_or(u64::from(self.default_expires));
        if requested != 0 && requested < u64::from(self.min_expires) {
            return Err(Refusal::IntervalTooBrief {
                min_secs: self.min_expires,
            });
        }
        Ok(requested.min(u64::from(self.max_expires)) as u32)
    }

    /// What a REGISTER with these (non-empty) contacts asks the state to do; the
    /// contacts are checked in order and the first refusal wins.
    pub fn register_op(
        &self,
        contacts: &pbx_sip_msg::ContactList,
        req: &RegisterRequest<'_>,
    ) -> Result<RegisterOp, Refusal> {
        let list = match contacts {
            pbx_sip_msg::ContactList::Star => {
                return if req.expires_header == Some(0) {
                    Ok(RegisterOp::RemoveAll)
                } else {
                    Err(Refusal::StarWithoutExpiresZero)
                };
            }
            pbx_sip_msg::ContactList::Contacts(list) => list,
        };
        let mut updates = Vec::with_capacity(list.len());
        for c in list {
            if !c.uri.is_sip() && c.uri.scheme != "tel" {
                return Err(Refusal::UnsupportedContactScheme);
            }
            let expires_secs = self.granted_expires(c, req.expires_header)?;
            let mut update = ContactUpdate {
                binding: Binding {
                    uri: c.uri_raw.clone(),
                    uri_key: uri_key(&c.uri, &c.uri_raw),
                    params: params_without_expires(c),
                    q: c.param("q")
                        .and_then(|p| p.value.as_deref())
                        .and_then(parse_q),
                    expires_at_ms: 0,
                    call_id: req.call_id.to_string(),
                    cseq: req.cseq,
                    instance: c.param("+sip.instance").and_then(|p| p.value.clone()),
                    reg_id: c
                        .param("reg-id")
                        .and_then(|p| p.value.as_deref())
                        .and_then(parse_u32),
                    path: req.path.to_vec(),
                    source: req.source.clone(),
                    transport: req.transport,
                    node_id: req.node_id,
                    user_agent: req.user_agent.map(str::to_string),
                    registered_at_ms: 0,
                },
                expires_secs,
            };
            update.stamp(req.now_ms);
            updates.push(update);
        }
        Ok(RegisterOp::Update(updates))
    }
}

/// True when a REGISTER's bindings use RFC 5626 outbound (a `reg-id`): the 200 OK then
/// says `Require: outbound`.
pub fn is_outbound(op: &RegisterOp) -> bool {
    match op {
        RegisterOp::RemoveAll => false,
        RegisterOp::Update(updates) => updates.iter().any(|u| u.binding.reg_id.is_some()),
    }
}

/// Contact header parameters as sent, minus `expires` (which the registrar owns).
fn params_without_expires(c: &Contact) -> String {
    let mut out = String::new();
    for p in &c.params {
        if p.name.eq_ignore_ascii_case("expires") {
            continue;
        }
        out.push(';');
        out.push_str(&p.name);
        if let Some(v) = &p.value {
            out.push('=');
            out.push_str(v);
        }
    }
    out
}

/// RFC 3261 §19.1.4, the parts that decide equality here: scheme, user (case-sensitive),
/// host (case-insensitive), port and transport.
fn uri_key(uri: &Uri, raw: &str) -> String {
    if !uri.is_sip() {
        return raw.to_string();
    }
    format!(
        "{}:{}@{}:{}:{}",
        uri.scheme,
        uri.user_unescaped().unwrap_or_default(),
        uri.host,
        uri.port.unwrap_or(0),
        uri.param("transport")
            .flatten()
            .unwrap_or("")
            .to_ascii_lowercase()
    )
}

/// q-value "0.5" → 500 (thousandths), 0..=1000.
fn parse_q(s: &str) -> Option<u16> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u16 = int.parse().ok()?;
    let mut f = frac.to_string();
    while f.len() < 3 {
        f.push('0');
    }
    let v = int.checked_mul(1000)? + f.parse::<u16>().ok()?;
    (v <= 1000).then_some(v)
}

/// RFC 5626: the same instance and reg-id is the same flow whatever its URI; otherwise
/// bindings are the same when their URIs compare equal.
fn same_binding(a: &Binding, b: &Binding) -> bool {
    match (&a.instance, &b.instance) {
        (Some(ia), Some(ib)) if a.reg_id.is_some() || b.reg_id.is_some() => {
            ia == ib && a.reg_id == b.reg_id
        }
        _ => a.uri_key == b.uri_key,
    }
}

/// RFC 3261 §10.3 steps 6–8 on an AOR's stored list, as one atomic update: the request
/// is checked against the stored bindings first and refused as a whole, or applied as a
/// whole. Expired bindings leave the list either way (they were invisible).
pub(crate) fn register(
    list: &mut Vec<Binding>,
    now_ms: u64,
    call_id: &str,
    cseq: u32,
    op: RegisterOp,
    max_contacts: u32,
) -> Response {
    list.retain(|b| b.is_live(now_ms));
    let stale = |b: &Binding| b.call_id == call_id && cseq <= b.cseq;
    let refusal = match &op {
        RegisterOp::RemoveAll => list.iter().any(stale).then_some(Response::OutOfOrder),
        RegisterOp::Update(updates) => {
            if updates
                .iter()
                .any(|u| list.iter().any(|b| same_binding(b, &u.binding) && stale(b)))
            {
                Some(Response::OutOfOrder)
            } else {
                let added = updates
                    .iter()
                    .enumerate()
                    .filter(|(i, u)| {
                        u.expires_secs > 0
                            && !list.iter().any(|b| same_binding(b, &u.binding))
                            && !updates[..*i]
                                .iter()
                                .any(|p| same_binding(&p.binding, &u.binding))
                    })
                    .count();
                (added > max_contacts as usize).then_some(Response::TooManyContacts)
            }
        }
    };
    if let Some(refusal) = refusal {
        return refusal;
    }
    match op {
        RegisterOp::RemoveAll => list.clear(),
        RegisterOp::Update(updates) => {
            for u in updates {
                match list.iter().position(|b| same_binding(b, &u.binding)) {
                    Some(i) if u.expires_secs == 0 => {
                        list.remove(i);
                    }
                    Some(i) => list[i] = u.binding,
                    None if u.expires_secs > 0 => list.push(u.binding),
                    None => {}
                }
            }
            // Over the limit: the bindings closest to expiry make room (a phone that
            // changed address is not locked out by its own old binding).
            while list.len() > max_contacts as usize {
                let oldest = list
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| (b.expires_at_ms, b.registered_at_ms))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                list.remove(oldest);
            }
        }
    }
    // Highest q first, then most recent.
    list.sort_by(|a, b| {
        b.q.unwrap_or(1000)
            .cmp(&a.q.unwrap_or(1000))
            .then(b.registered_at_ms.cmp(&a.registered_at_ms))
    });
    Response::Bindings(list.iter().map(ContactView::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.333"), Some(333));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.3333"), None);
    }
}
