//! Framing and the lexical stage of parsing.

use bytes::Bytes;

use crate::grammar::is_token;
use crate::{Header, HeaderName, Method, PartialHead, SipError, SipMessage, StartLine};

/// Size bounds. Anything larger is refused (513 or a closed stream), never buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Whole message (header section + body).
    pub max_message_len: usize,
    /// Header lines after unfolding.
    pub max_headers: usize,
    /// One unfolded header line.
    pub max_line_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_len: 65_535,
            max_headers: 128,
            max_line_len: 8_192,
        }
    }
}

/// What the front of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFrame {
    /// More bytes are needed.
    Incomplete,
    /// An RFC 5626 §4.4.1 keep-alive ping (CRLFCRLF) of this many bytes: answer CRLF.
    Ping(usize),
    /// Stray CRLF before a message (RFC 3261 §7.5): skip this many bytes.
    Skip(usize),
    /// A whole message of this many bytes.
    Message(usize),
}

/// Finds the end of the header section: index just past the empty line, and the index
/// where the header section (without the empty line) ends.
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(off) = memchr_lf(&buf[i..]) {
        let lf = i + off;
        // An empty line is LF directly after the previous line's LF (optionally with CR).
        if lf + 1 < buf.len() && buf[lf + 1] == b'\n' {
            return Some((lf, lf + 2));
        }
        if lf + 2 < buf.len() && buf[lf + 1] == b'\r' && buf[lf + 2] == b'\n' {
            return Some((lf, lf + 3));
        }
        i = lf + 1;
    }
    None
}

fn memchr_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Frames the next message on a stream transport (RFC 3261 §18.3): header section up to
/// the empty line, then exactly Content-Length bytes of body. An unusable Content-Length
/// is a framing error: the connection cannot be resynchronised and must be closed.
pub fn frame_stream(buf: &[u8], limits: &Limits) -> Result<StreamFrame, SipError> {
    if buf.starts_with(b"\r\n\r\n") {
        return Ok(StreamFrame::Ping(4));
    }
    if buf.starts_with(b"\r\n") {
        if buf.len() < 4 && b"\r\n\r\n".starts_with(buf) {
            return Ok(StreamFrame::Incomplete);
        }
        return Ok(StreamFrame::Skip(2));
    }
    if buf == b"\r" {
        return Ok(StreamFrame::Incomplete);
    }
    let Some((_, body_start)) = find_head_end(buf) else {
        if buf.len() > limits.max_message_len {
            return Err(SipError::Framing("header section too large".into()));
        }
        return Ok(StreamFrame::Incomplete);
    };
    let content_length = content_length_of(&buf[..body_start])?.unwrap_or(0);
    let total = body_start
        .checked_add(content_length)
        .filter(|t| *t <= limits.max_message_len)
        .ok_or_else(|| SipError::Framing("message too large".into()))?;
    if buf.len() < total {
        return Ok(StreamFrame::Incomplete);
    }
    Ok(StreamFrame::Message(total))
}

/// Reads Content-Length (or `l`) from a raw header section. Several differing values,
/// a negative or non-numeric one are framing errors (RFC 4475 ncl, mcl01).
fn content_length_of(head: &[u8]) -> Result<Option<usize>, SipError> {
    let mut found: Option<usize> = None;
    for line in logical_lines(head) {
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        let name = trim(&line[..colon]);
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let value = trim(&line[colon + 1..]);
        if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
            return Err(SipError::Framing("invalid Content-Length".into()));
        }
        let n: usize = std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SipError::Framing("invalid Content-Length".into()))?;
        match found {
            Some(prev) if prev != n => {
                return Err(SipError::Framing(
                    "conflicting Content-Length values".into(),
                ))
            }
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// Splits a header section into logical lines; continuation lines (starting with SP or
/// HT) are joined to the previous one. Lines are returned raw, with fold bytes inside.
fn logical_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = head;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 0;
        loop {
            match memchr_lf(&rest[end..]) {
                None => {
                    end = rest.len();
                    break;
                }
                Some(off) => {
                    let lf = end + off;
                    if lf + 1 < rest.len() && (rest[lf + 1] == b' ' || rest[lf + 1] == b'\t') {
                        end = lf + 1;
                        continue;
                    }
                    end = lf + 1;
                    break;
                }
            }
        }
        let line = &rest[..end];
        rest = &rest[end..];
        Some(strip_eol(line))
    })
}

fn strip_eol(mut l: &[u8]) -> &[u8] {
    if l.ends_with(b"\n") {
        l = &l[..l.len() - 1];
    }
    if l.ends_with(b"\r") {
        l = &l[..l.len() - 1];
    }
    l
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Replaces each run of whitespace containing a line fold by one SP, trims the ends.
fn unfold(raw: &[u8]) -> Result<String, ()> {
    let trimmed = trim(raw);
    let s = std::str::from_utf8(trimmed).map_err(|_| ())?;
    if !s.contains('\n') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c == '\r' || c == '\n' {
            // swallow the fold and the whitespace around it; keep one SP
            while out.ends_with([' ', '\t']) {
                out.pop();
            }
            while let Some((_, n)) = chars.peek() {
                if matches!(n, ' ' | '\t' | '\r' | '\n') {
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses one datagram (RFC 3261 §18.3): one message; Content-Length bounds the body and
/// trailing octets are ignored; a Content-Length larger than what arrived is a 400.
pub fn parse_datagram(buf: &[u8], limits: &Limits) -> Result<SipMessage, SipError> {
    if buf.len() > limits.max_message_len {
        let mut err = lexical(&buf[..limits.max_message_len], limits, true)
            .err()
            .unwrap_or_else(|| SipError::malformed(None, "message too large"));
        if let SipError::Malformed { status, reason, .. } = &mut err {
            if status.is_some() {
                *status = Some(513);
                *reason = "message too large".into();
            }
        }
        return Err(err);
    }
    lexical(buf, limits, true)
}

/// Parses a message already delimited by [`frame_stream`].
pub fn parse_stream_message(buf: &[u8], limits: &Limits) -> Result<SipMessage, SipError> {
    lexical(buf, limits, false)
}

fn lexical(buf: &[u8], limits: &Limits, datagram: bool) -> Result<SipMessage, SipError> {
    let (head_end, body_start, complete) = match find_head_end(buf) {
        Some((h, b)) => (h, b, true),
        // A datagram that ends inside the header section: read what is there so the
        // request can still be answered with a 400.
        None => (buf.len(), buf.len(), false),
    };
    let head = &buf[..head_end];
    let mut lines = logical_lines(head);
    let first = lines.next().unwrap_or_default();

    let start = parse_start_line(first);
    let is_response = first.starts_with(b"SIP/");

    let mut headers = Vec::new();
    let mut error: Option<(u16, String)> = match &start {
        Ok(_) => None,
        Err((status, reason)) => Some((*status, reason.clone())),
    };
    for line in lines {
        if headers.len() >= limits.max_headers {
            error.get_or_insert((513, "too many header fields".into()));
            break;
        }
        if line.len() > limits.max_line_len {
            error.get_or_insert((513, "header line too long".into()));
            continue;
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            error.get_or_insert((400, "header line without a colon".into()));
            continue;
        };
        let raw_name = trim(&line[..colon]);
        let Ok(name) = std::str::from_utf8(raw_name) else {
            error.get_or_insert((400, "invalid header name".into()));
            continue;
        };
        if !is_token(name) {
            error.get_or_insert((
                400,
                format!("invalid header name '{}'", name.escape_debug()),
            ));
            continue;
        }
        let Ok(value) = unfold(&line[colon + 1..]) else {
            error.get_or_insert((400, "header value is not UTF-8".into()));
            continue;
        };
        headers.push(Header {
            name: HeaderName::parse(name),
            value,
        });
    }
    if error.is_none() && !complete {
        error = Some((
            400,
            "header section is not terminated by an empty line".into(),
        ));
    }

    let body = if error.is_none() {
        match body_of(&buf[body_start..], &headers, datagram) {
            Ok(b) => Some(b),
            Err(reason) => {
                error = Some((400, reason));
                None
            }
        }
    } else {
        None
    };

    match (error, start, body) {
        (None, Ok(start), Some(body)) => Ok(SipMessage {
            start,
            headers,
            body,
        }),
        (err, _, _) => {
            let (status, reason) = err.unwrap_or((400, "malformed message".into()));
            let keep = |h: &Header| {
                matches!(
                    h.name,
                    HeaderName::Via
                        | HeaderName::From
                        | HeaderName::To
                        | HeaderName::CallId
                        | HeaderName::CSeq
                )
            };
            Err(SipError::Malformed {
                // A broken response is never answered: drop it.
                status: (!is_response).then_some(status),
                reason,
                partial: Some(Box::new(PartialHead {
                    headers: headers.into_iter().filter(keep).collect(),
                })),
            })
        }
    }
}

fn body_of(rest: &[u8], headers: &[Header], datagram: bool) -> Result<Bytes, String> {
    let mut cl: Option<usize> = None;
    for h in headers
        .iter()
        .filter(|h| h.name == HeaderName::ContentLength)
    {
        let v = h.value.as_str();
        let n = (!v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse::<usize>().ok())
            .flatten()
            .ok_or_else(|| "invalid Content-Length".to_string())?;
        if cl.is_some_and(|p| p != n) {
            return Err("conflicting Content-Length values".into());
        }
        cl = Some(n);
    }
    match cl {
        Some(n) if n > rest.len() => Err("Content-Length larger than the message".into()),
        Some(n) => Ok(Bytes::copy_from_slice(&rest[..n])),
        // Without Content-Length a datagram's body runs to its end (§18.3); on a stream the
        // framer already treated it as 0.
        None if datagram => Ok(Bytes::copy_from_slice(rest)),
        None => Ok(Bytes::new()),
    }
}

type StartResult = Result<StartLine, (u16, String)>;

fn parse_start_line(line: &[u8]) -> StartResult {
    let bad = |r: &str| Err((400, r.to_string()));
    let Ok(line) = std::str::from_utf8(line) else {
        return bad("start line is not UTF-8");
    };
    if let Some(rest) = line.strip_prefix("SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let mut parts = rest.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        let reason = parts.next().unwrap_or_default();
        if version != "2.0" {
            return bad("unsupported SIP version in response");
        }
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return bad("invalid status code");
        }
        let code: u16 = code
            .parse()
            .map_err(|_| (400, "invalid status code".into()))?;
        if !(100..=699).contains(&code) {
            return bad("status code out of range");
        }
        return Ok(StartLine::Response {
            code,
            reason: reason.to_string(),
        });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version: exactly single spaces.
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return bad("malformed request line");
    }
    let (method, uri, version) = (parts[0], parts[1], parts[2]);
    if !is_token(method) {
        return bad("invalid method");
    }
    if version != "SIP/2.0" {
        let looks_like_version = version
            .strip_prefix("SIP/")
            .and_then(|v| v.split_once('.'))
            .is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            });
        return if looks_like_version {
            Err((505, "SIP version not supported".into()))
        } else {
            bad("invalid SIP version")
        };
    }
    crate::Uri::parse_request_uri(uri).map_err(|e| (400, format!("Request-URI: {e}")))?;
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri: uri.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: &[u8] = b"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\nFrom: <sip:alice@pbx.test>;tag=1\r\nTo: <sip:alice@pbx.test>\r\nCall-ID: a\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn stream_frames_back_to_back_messages() {
        let mut buf = REG.to_vec();
        buf.extend_from_slice(REG);
        let l = Limits::default();
        assert_eq!(frame_stream(&buf, &l), Ok(StreamFrame::Message(REG.len())));
        assert_eq!(
            frame_stream(&buf[..REG.len() - 1], &l),
            Ok(StreamFrame::Incomplete)
        );
        assert_eq!(frame_stream(b"\r\n\r\n", &l), Ok(StreamFrame::Ping(4)));
        assert_eq!(frame_stream(b"\r\n", &l), Ok(StreamFrame::Incomplete));
        assert_eq!(frame_stream(b"\r\nREG", &l), Ok(StreamFrame::Skip(2)));
    }

    #[test]
    fn stream_body_is_bounded_by_content_length() {
        let msg = b"MESSAGE sip:a@b SIP/2.0\r\nl: 5\r\n\r\nhelloINVITE";
        assert_eq!(
            frame_stream(msg, &Limits::default()),
            Ok(StreamFrame::Message(msg.len() - 6))
        );
        let bad = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: -1\r\n\r\n";
        assert!(frame_stream(bad, &Limits::default()).is_err());
        let two = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nxx";
        assert!(frame_stream(two, &Limits::default()).is_err());
    }

    #[test]
    fn folding_is_unfolded_to_one_space() {
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nSubject: one\r\n  two\r\n\tthree\r\nl:0\r\n\r\n";
        let msg = parse_datagram(m, &Limits::default()).unwrap();
        assert_eq!(
            msg.header(&HeaderName::Other("Subject".into())),
            Some("one two three")
        );
    }

    #[test]
    fn oversize_header_count_is_513() {
        let mut m = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n".to_vec();
        for i in 0..200 {
            m.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        m.extend_from_slice(b"\r\n");
        let e = parse_datagram(&m, &Limits::default()).unwrap_err();
        assert_eq!(e.status(), Some(513));
    }
}
