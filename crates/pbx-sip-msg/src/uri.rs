//! URIs (RFC 3261 §19.1, §25.1). SIP/SIPS URIs are parsed into parts; any other scheme
//! is kept opaque so it can be answered (416) rather than refused as unparseable.

use crate::grammar::Param;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// Lower-cased scheme.
    pub scheme: String,
    /// User part as sent (still %-escaped); SIP/SIPS only.
    pub user: Option<String>,
    /// Lower-cased host (IPv6 references keep their brackets); empty for other schemes.
    pub host: String,
    pub port: Option<u16>,
    pub params: Vec<Param>,
    /// Everything after `?`, as sent.
    pub headers: Option<String>,
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&c)
}

fn check_escapes(s: &str, extra: &[u8]) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if i + 2 >= b.len() || !b[i + 1].is_ascii_hexdigit() || !b[i + 2].is_ascii_hexdigit() {
                return Err("invalid %-escape".into());
            }
            i += 3;
            continue;
        }
        if !(is_unreserved(c) || extra.contains(&c)) {
            return Err(format!("invalid character {:?}", c as char));
        }
        i += 1;
    }
    Ok(())
}

/// Decodes %HH escapes (once; never recursively). Invalid escapes are kept literally.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, rest) = if let Some(r) = s.strip_prefix('[') {
        let end = r.find(']').ok_or("unterminated IPv6 reference")?;
        let v6 = &r[..end];
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return Err("invalid IPv6 reference".into());
        }
        (format!("[{}]", v6.to_ascii_lowercase()), &r[end + 1..])
    } else {
        let end = s.find(':').unwrap_or(s.len());
        let h = &s[..end];
        if h.is_empty()
            || !h
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
        {
            return Err(format!("invalid host '{h}'"));
        }
        (h.to_ascii_lowercase(), &s[end..])
    };
    let port = match rest.strip_prefix(':') {
        None if rest.is_empty() => None,
        None => return Err("garbage after host".into()),
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return Err("invalid port".into());
            }
            Some(p.parse::<u16>().map_err(|_| "port out of range")?)
        }
    };
    Ok((host, port))
}

impl Uri {
    /// Parses any URI. SIP and SIPS are checked against the grammar; other schemes only
    /// need a scheme and printable characters.
    pub fn parse(s: &str) -> Result<Uri, String> {
        if s.is_empty() {
            return Err("empty URI".into());
        }
        if s.bytes()
            .any(|c| !c.is_ascii_graphic() || c == b'<' || c == b'>' || c == b'"')
        {
            return Err("URI contains whitespace or a forbidden character".into());
        }
        let colon = s.find(':').ok_or("URI without scheme")?;
        let scheme = &s[..colon];
        if scheme.is_empty()
            || !scheme.as_bytes()[0].is_ascii_alphabetic()
            || !scheme
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
        {
            return Err("invalid URI scheme".into());
        }
        let scheme = scheme.to_ascii_lowercase();
        let rest = &s[colon + 1..];
        if scheme != "sip" && scheme != "sips" {
            if rest.is_empty() {
                return Err("empty URI body".into());
            }
            return Ok(Uri {
                scheme,
                user: None,
                host: String::new(),
                port: None,
                params: Vec::new(),
                headers: None,
            });
        }
        // userinfo may hold '?' and ';' (RFC 4475 intmeth, semiuri) but never an unescaped
        // '@', and neither may parameters or headers: the first '@' ends the userinfo.
        let (user, after_user) = match rest.split_once('@') {
            Some((u, h)) => {
                if u.is_empty() {
                    return Err("empty user part".into());
                }
                check_escapes(u, b"&=+$,;?/:")?;
                (Some(u.to_string()), h)
            }
            None => (None, rest),
        };
        let (hostpart, headers) = match after_user.split_once('?') {
            Some((m, h)) => {
                check_escapes(h, b"[]/?:+$=&")?;
                (m, Some(h.to_string()))
            }
            None => (after_user, None),
        };
        let mut segs = hostpart.split(';');
        let (host, port) = parse_host_port(segs.next().unwrap_or_default())?;
        let mut params = Vec::new();
        for seg in segs {
            let (name, value) = match seg.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (seg, None),
            };
            if name.is_empty() {
                return Err("empty URI parameter".into());
            }
            check_escapes(name, b"[]/:&+$")?;
            if let Some(v) = value {
                check_escapes(v, b"[]/:&+$")?;
            }
            params.push(Param {
                name: name.to_string(),
                value: value.map(str::to_string),
            });
        }
        Ok(Uri {
            scheme,
            user,
            host,
            port,
            params,
            headers,
        })
    }

    /// A Request-URI: a URI without escaped headers (RFC 4475 §3.1.2.11: they must never
    /// be acted on, and refusing them is the clear answer).
    pub fn parse_request_uri(s: &str) -> Result<Uri, String> {
        let u = Uri::parse(s)?;
        if u.headers.is_some() {
            return Err("escaped headers are not allowed in a Request-URI".into());
        }
        Ok(u)
    }

    pub fn is_sip(&self) -> bool {
        self.scheme == "sip" || self.scheme == "sips"
    }

    /// The user part with %-escapes decoded once.
    pub fn user_unescaped(&self) -> Option<String> {
        self.user.as_deref().map(unescape)
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .map(|p| p.value.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uri_parts() {
        let u = Uri::parse("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        assert_eq!(u.host, "example.com");
        let u = Uri::parse("sips:[2001:db8::10]:5061;transport=tcp?Route=%3Csip:x%3E").unwrap();
        assert_eq!(u.host, "[2001:db8::10]");
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.param("transport"), Some(Some("tcp")));
        assert!(u.headers.is_some());
        assert!(Uri::parse_request_uri("sip:a@b?Route=x").is_err());
    }

    #[test]
    fn unescape_is_not_recursive_and_keeps_nul() {
        assert_eq!(unescape("value%2541"), "value%41");
        assert_eq!(unescape("null-%00-null"), "null-\0-null");
        assert_eq!(unescape("bad%zz"), "bad%zz");
        assert_eq!(unescape("end%4"), "end%4");
    }

    #[test]
    fn other_schemes_are_opaque() {
        let u = Uri::parse("nobodyKnowsThisScheme:totallyopaquecontent").unwrap();
        assert_eq!(u.scheme, "nobodyknowsthisscheme");
        assert!(!u.is_sip());
        assert!(Uri::parse("<sip:a@b>").is_err());
        assert!(Uri::parse("sip:a b@c").is_err());
    }
}
