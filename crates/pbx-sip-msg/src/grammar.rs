//! Typed grammars of the headers the stack acts on (RFC 3261 §25.1). Values arrive
//! unfolded, so LWS here is plain SP/HT.

use crate::uri::{parse_host_port, Uri};
use crate::Method;

/// token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
pub fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&c)
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// A decimal number that fits in u32 (leading zeros allowed, no sign, no overflow).
pub fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits = s.trim_start_matches('0');
    if digits.len() > 10 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// A delta-seconds value that saturates instead of wrapping (RFC 4475 §3.1.2.4: an
/// overlarge Expires must never become a tiny one).
pub fn parse_delta_seconds(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

/// A generic parameter: `name` or `name=value`; the value is kept as sent (quotes
/// included), see [`Param::unquoted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub value: Option<String>,
}

impl Param {
    pub fn unquoted(&self) -> Option<String> {
        self.value.as_deref().map(unquote)
    }
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut esc = false;
            for c in inner.chars() {
                if esc {
                    out.push(c);
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => v.to_string(),
    }
}

fn find_param<'a>(params: &'a [Param], name: &str) -> Option<&'a Param> {
    params.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor { s, pos: 0 }
    }
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }
    fn ws(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos > start
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8, what: &str) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected {what}"))
        }
    }
    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }
    fn token(&mut self, what: &str) -> Result<&'a str, String> {
        let t = self.take_while(is_token_char);
        if t.is_empty() {
            Err(format!("expected {what}"))
        } else {
            Ok(t)
        }
    }
    /// quoted-string, returned with its quotes; the escapes are checked.
    fn quoted(&mut self) -> Result<&'a str, String> {
        let start = self.pos;
        self.expect(b'"', "'\"'")?;
        let b = self.s.as_bytes();
        while self.pos < b.len() {
            match b[self.pos] {
                b'\\' => {
                    if self.pos + 1 >= b.len() {
                        break;
                    }
                    self.pos += 2;
                }
                b'"' => {
                    self.pos += 1;
                    return Ok(&self.s[start..self.pos]);
                }
                _ => self.pos += 1,
            }
        }
        Err("unterminated quoted string".into())
    }
    /// `*( SEMI generic-param )` with LWS allowed around ';' and '='.
    fn params(&mut self) -> Result<Vec<Param>, String> {
        let mut params = Vec::new();
        loop {
            self.ws();
            if !self.eat(b';') {
                return Ok(params);
            }
            self.ws();
            let name = self.token("parameter name")?;
            self.ws();
            let value = if self.eat(b'=') {
                self.ws();
                let v = match self.peek() {
                    Some(b'"') => self.quoted()?,
                    Some(b'[') => {
                        let start = self.pos;
                        self.take_while(|c| c != b']');
                        self.expect(b']', "']'")?;
                        &self.s[start..self.pos]
                    }
                    // `received` is an IPv4 or IPv6 address and `maddr` a host (RFC
                    // 3261 §25.1): an IPv6 one without brackets has colons, which are
                    // not token characters (RFC 5118 §4.5).
                    _ if name.eq_ignore_ascii_case("received")
                        || name.eq_ignore_ascii_case("maddr") =>
                    {
                        let start = self.pos;
                        self.take_while(|c| is_token_char(c) || c == b':');
                        if self.pos == start {
                            return Err("expected parameter value".into());
                        }
                        &self.s[start..self.pos]
                    }
                    _ => self.token("parameter value")?,
                };
                Some(v.to_string())
            } else {
                None
            };
            params.push(Param {
                name: name.to_string(),
                value,
            });
        }
    }
}

/// One Via value: `SIP/2.0/UDP host:port;branch=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Upper-cased transport token (UDP, TCP, TLS, SCTP, WS… or anything else).
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Vec<Param>,
    /// The value as sent, for echoing in responses.
    pub raw: String,
}

impl Via {
    /// Parses a Via header line, which may hold several comma-separated values.
    pub fn parse_list(line: &str) -> Result<Vec<Via>, String> {
        let mut c = Cursor::new(line);
        let mut out = Vec::new();
        loop {
            c.ws();
            let start = c.pos;
            let name = c.token("protocol name")?;
            c.ws();
            c.expect(b'/', "'/'")?;
            c.ws();
            let version = c.token("protocol version")?;
            c.ws();
            c.expect(b'/', "'/'")?;
            c.ws();
            let transport = c.token("transport")?;
            if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
                return Err("unsupported protocol in Via".into());
            }
            if !c.ws() {
                return Err("expected whitespace before sent-by".into());
            }
            let hp_start = c.pos;
            if c.peek() == Some(b'[') {
                c.take_while(|b| b != b']');
                c.expect(b']', "']'")?;
            } else {
                c.take_while(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            }
            let host_end = c.pos;
            c.ws();
            let mut hostport = c.s[hp_start..host_end].to_string();
            if c.eat(b':') {
                c.ws();
                hostport.push(':');
                hostport.push_str(c.take_while(|b| b.is_ascii_digit()));
            }
            let (host, port) = parse_host_port(&hostport)?;
            let params = c.params()?;
            let raw = c.s[start..c.pos].trim_end().to_string();
            out.push(Via {
                transport: transport.to_ascii_uppercase(),
                host,
                port,
                params,
                raw,
            });
            c.ws();
            if c.at_end() {
                return Ok(out);
            }
            c.expect(b',', "',' or end of Via")?;
        }
    }

    pub fn branch(&self) -> Option<&str> {
        find_param(&self.params, "branch").and_then(|p| p.value.as_deref())
    }

    /// `Some(None)` for a bare `rport`, `Some(Some(port))` when filled in.
    pub fn rport(&self) -> Option<Option<&str>> {
        find_param(&self.params, "rport").map(|p| p.value.as_deref())
    }

    pub fn received(&self) -> Option<&str> {
        find_param(&self.params, "received").and_then(|p| p.value.as_deref())
    }

    pub fn maddr(&self) -> Option<&str> {
        find_param(&self.params, "maddr").and_then(|p| p.value.as_deref())
    }

    /// True when the branch carries the RFC 3261 magic cookie and something after it.
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch()
            .and_then(|b| b.strip_prefix("z9hG4bK"))
            .is_some_and(|rest| !rest.is_empty())
    }

    /// The Via as sent, with `received` and a filled-in `rport` (RFC 3581) for a request
    /// that came from `src_ip:src_port`.
    pub fn stamped(&self, src_ip: &str, src_port: u16) -> String {
        let mut out = String::with_capacity(self.raw.len() + 40);
        // Rebuild from parts so an existing bare rport is filled in rather than repeated.
        out.push_str("SIP/2.0/");
        out.push_str(&self.transport);
        out.push(' ');
        out.push_str(&self.host);
        if let Some(p) = self.port {
            out.push(':');
            out.push_str(&p.to_string());
        }
        let mut has_rport = false;
        for p in &self.params {
            if p.name.eq_ignore_ascii_case("received") {
                continue;
            }
            out.push(';');
            out.push_str(&p.name);
            if p.name.eq_ignore_ascii_case("rport") {
                has_rport = true;
                out.push('=');
                out.push_str(&src_port.to_string());
                continue;
            }
            if let Some(v) = &p.value {
                out.push('=');
                out.push_str(v);
            }
        }
        let host_is_src = self.host.trim_matches(['[', ']']) == src_ip;
        if has_rport || !host_is_src {
            out.push_str(";received=");
            out.push_str(src_ip);
        }
        out
    }
}

/// `[display-name] <URI> *(;param)` or `addr-spec *(;param)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    /// The URI exactly as sent (without the angle brackets).
    pub uri_raw: String,
    pub uri: Uri,
    /// Header parameters (outside the brackets), e.g. tag, expires, q.
    pub params: Vec<Param>,
    /// This value's text exactly as sent.
    pub raw: String,
}

impl NameAddr {
    fn parse_one(c: &mut Cursor<'_>) -> Result<NameAddr, String> {
        c.ws();
        let start = c.pos;
        let mut display = None;
        let bracketed;
        if c.peek() == Some(b'"') {
            let q = c.quoted()?;
            display = Some(unquote(q));
            c.ws();
            if c.peek() != Some(b'<') {
                return Err("expected '<' after display name".into());
            }
            bracketed = true;
        } else if c.peek() == Some(b'<') {
            bracketed = true;
        } else {
            // Either `token LWS token … <uri>` or a bare addr-spec: look at what follows
            // the first run of tokens.
            let save = c.pos;
            let mut words = Vec::new();
            loop {
                let w = c.take_while(is_token_char);
                if w.is_empty() {
                    break;
                }
                words.push(w);
                c.ws();
            }
            match c.peek() {
                Some(b'<') => {
                    display = Some(words.join(" "));
                    bracketed = true;
                }
                Some(b':') if words.len() == 1 => {
                    c.pos = save;
                    bracketed = false;
                }
                _ => return Err("invalid display name or URI".into()),
            }
        }
        let uri_raw = if bracketed {
            c.expect(b'<', "'<'")?;
            let u = c.take_while(|b| b != b'>');
            c.expect(b'>', "'>'")?;
            u
        } else {
            let u = c.take_while(|b| !matches!(b, b';' | b',' | b' ' | b'\t'));
            if u.contains('?') {
                return Err("a URI with headers must be enclosed in <>".into());
            }
            u
        };
        let uri = Uri::parse(uri_raw)?;
        let params = c.params()?;
        let raw = c.s[start..c.pos].trim_end().to_string();
        Ok(NameAddr {
            display,
            uri_raw: uri_raw.to_string(),
            uri,
            params,
            raw,
        })
    }

    /// A single-valued header (From, To).
    pub fn parse_single(s: &str) -> Result<NameAddr, String> {
        let mut c = Cursor::new(s);
        let na = NameAddr::parse_one(&mut c)?;
        c.ws();
        if !c.at_end() {
            return Err(format!("unexpected '{}'", c.rest()));
        }
        Ok(na)
    }

    pub fn tag(&self) -> Option<&str> {
        find_param(&self.params, "tag").and_then(|p| p.value.as_deref())
    }

    pub fn param(&self, name: &str) -> Option<&Param> {
        find_param(&self.params, name)
    }
}

/// One Contact value.
pub type Contact = NameAddr;

/// A Contact header: `*` or a list of addresses (several lines and comma lists merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactList {
    Star,
    Contacts(Vec<Contact>),
}

impl ContactList {
    /// Parses every Contact line of a message. `*` must stand alone.
    pub fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Result<ContactList, String> {
        let mut contacts = Vec::new();
        let mut star = false;
        for line in lines {
            if line.trim() == "*" {
                star = true;
                continue;
            }
            let mut c = Cursor::new(line);
            loop {
                contacts.push(NameAddr::parse_one(&mut c)?);
                c.ws();
                if c.at_end() {
                    break;
                }
                c.expect(b',', "',' between Contact values")?;
            }
        }
        match (star, contacts.is_empty()) {
            (true, true) => Ok(ContactList::Star),
            (true, false) => Err("'*' mixed with other Contact values".into()),
            (false, _) => Ok(ContactList::Contacts(contacts)),
        }
    }
}

/// `CSeq: 1*DIGIT LWS Method`; the number must fit in 32 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(s: &str) -> Result<CSeq, String> {
        let mut c = Cursor::new(s);
        c.ws();
        let num = c.take_while(|b| b.is_ascii_digit());
        let seq = parse_u32(num).ok_or("sequence number is not a 32-bit number")?;
        if !c.ws() {
            return Err("expected whitespace after the sequence number".into());
        }
        let m = c.token("method")?;
        c.ws();
        if !c.at_end() {
            return Err("garbage after method".into());
        }
        Ok(CSeq {
            seq,
            method: Method::parse(m),
        })
    }
}

/// `Authorization` / `Proxy-Authorization` / `WWW-Authenticate`: a scheme and its
/// comma-separated auth-params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader {
    pub scheme: String,
    /// Parameter names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl AuthHeader {
    pub fn parse(s: &str) -> Result<AuthHeader, String> {
        let mut c = Cursor::new(s);
        c.ws();
        let scheme = c.token("auth scheme")?.to_string();
        let mut params = Vec::new();
        if !c.ws() {
            return if c.at_end() {
                Ok(AuthHeader { scheme, params })
            } else {
                Err("expected whitespace after the auth scheme".into())
            };
        }
        loop {
            c.ws();
            if c.at_end() {
                break;
            }
            let name = c.token("auth parameter")?.to_ascii_lowercase();
            c.ws();
            c.expect(b'=', "'='")?;
            c.ws();
            let v = if c.peek() == Some(b'"') {
                unquote(c.quoted()?)
            } else {
                c.token("auth parameter value")?.to_string()
            };
            params.push((name, v));
            c.ws();
            if c.at_end() {
                break;
            }
            c.expect(b',', "','")?;
        }
        Ok(AuthHeader { scheme, params })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_with_spaces_and_lists() {
        let v = Via::parse_list("SIP  / 2.0  / TCP     spindle.example.com   ;  branch  =   z9hG4bK9ikj8  , SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].transport, "TCP");
        assert_eq!(v[0].branch(), Some("z9hG4bK9ikj8"));
        assert_eq!(v[1].host, "192.168.255.111");
        assert!(Via::parse_list("SIP/2.0/UDP 192.0.2.15;;,;,,").is_err());
    }

    #[test]
    fn via_stamping_fills_rport() {
        let v = &Via::parse_list("SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bKx").unwrap()[0];
        assert_eq!(
            v.stamped("192.0.2.9", 4000),
            "SIP/2.0/UDP 10.0.0.1:5060;rport=4000;branch=z9hG4bKx;received=192.0.2.9"
        );
        let v = &Via::parse_list("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx").unwrap()[0];
        assert_eq!(
            v.stamped("10.0.0.1", 5060),
            "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx"
        );
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse_single(
            r#""J Rosenberg \\\""       <sip:jdrosen@example.com> ; tag = 98asjd8"#,
        )
        .unwrap();
        assert_eq!(n.display.as_deref(), Some("J Rosenberg \\\""));
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse_single("sip:watson@example.com ;   tag    = 1918181833n").unwrap();
        assert_eq!(n.uri_raw, "sip:watson@example.com");
        assert_eq!(n.tag(), Some("1918181833n"));
        let n = NameAddr::parse_single("caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(n.display.as_deref(), Some("caller"));
        assert!(NameAddr::parse_single("Bell, Alexander <sip:a@b>").is_err());
        assert!(NameAddr::parse_single("< sip:t.watson@example.org >").is_err());
        assert!(NameAddr::parse_single("\"Mr J. User <sip:j.user@example.com>").is_err());
    }

    #[test]
    fn contact_params_stay_apart_from_uri_params() {
        let ContactList::Contacts(c) =
            ContactList::parse(["sip:+19725552222@gw1.example.net;unknownparam"].into_iter())
                .unwrap()
        else {
            panic!("expected contacts")
        };
        assert_eq!(c[0].uri_raw, "sip:+19725552222@gw1.example.net");
        assert_eq!(c[0].params[0].name, "unknownparam");
        let ContactList::Contacts(c) =
            ContactList::parse(["<sip:+19725552222@gw1.example.net;unknownparam>"].into_iter())
                .unwrap()
        else {
            panic!("expected contacts")
        };
        assert_eq!(
            c[0].uri_raw,
            "sip:+19725552222@gw1.example.net;unknownparam"
        );
        assert!(c[0].params.is_empty());
        assert!(ContactList::parse(
            ["sip:user@example.com?Route=%3Csip:sip.example.com%3E"].into_iter()
        )
        .is_err());
        assert_eq!(ContactList::parse(["*"].into_iter()), Ok(ContactList::Star));
        assert!(ContactList::parse(["*", "<sip:a@b>"].into_iter()).is_err());
    }

    #[test]
    fn cseq_and_numbers() {
        assert_eq!(CSeq::parse("0009 INVITE").unwrap().seq, 9);
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert_eq!(parse_u32("4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32("4294967296"), None);
        assert_eq!(
            parse_delta_seconds("99999999999999999999999"),
            Some(u64::MAX)
        );
    }

    #[test]
    fn digest_authorization() {
        let a = AuthHeader::parse(r#"Digest username="alice", realm="pbx.test", nonce="abc", uri="sip:pbx.test", response="0123", algorithm=SHA-256, qop=auth, nc=00000001, cnonce="xyz""#).unwrap();
        assert_eq!(a.scheme, "Digest");
        assert_eq!(a.get("username"), Some("alice"));
        assert_eq!(a.get("algorithm"), Some("SHA-256"));
        assert_eq!(a.get("nc"), Some("00000001"));
    }
}
