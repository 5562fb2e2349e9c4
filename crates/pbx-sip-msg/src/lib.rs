//! SIP wire format (RFC 3261 §7, §18.3, §25), sans-IO.
//!
//! Parsing happens in two stages so that a broken request can still be answered:
//! 1. [`parse_datagram`] / [`frame_stream`] + [`parse_stream_message`]: framing, start line,
//!    header lines (unfolded, compact forms expanded) and body. A failure here carries
//!    whatever core headers were readable so the caller can send a 400/505.
//! 2. [`CoreHeaders::extract`]: the typed grammar of the headers every request needs
//!    (Via, From, To, Call-ID, CSeq, Max-Forwards). Failures are 400s.
//!
//! Other headers are parsed on demand by the functions in [`grammar`].

pub mod build;
pub mod grammar;
mod header;
mod method;
mod parse;
mod reply;
pub mod uri;

pub use build::{reason_phrase, MessageWriter};
pub use grammar::{AuthHeader, CSeq, Contact, ContactList, NameAddr, Param, Via};
pub use header::{Header, HeaderName};
pub use method::{MessageKind, Method};
pub use parse::{frame_stream, parse_datagram, parse_stream_message, Limits, StreamFrame};
pub use reply::{reply_to_unparseable, response_target, ReplyHead, ALLOW};
pub use uri::Uri;

use bytes::Bytes;

/// Errors of this crate. Every parse failure says which SIP status (if any) answers it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SipError {
    /// The bytes are not a SIP message we accept. `status` is `None` when the input must be
    /// dropped silently (a broken response, or nothing recognisable as a request).
    #[error("malformed message ({status:?}): {reason}")]
    Malformed {
        status: Option<u16>,
        reason: String,
        /// Core headers that could be read, for building the error response.
        partial: Option<Box<PartialHead>>,
    },
    /// A stream's framing cannot be recovered (bad or conflicting Content-Length,
    /// oversized header section): the connection must be closed.
    #[error("framing error: {0}")]
    Framing(String),
}

impl SipError {
    pub(crate) fn malformed(status: Option<u16>, reason: impl Into<String>) -> Self {
        SipError::Malformed {
            status,
            reason: reason.into(),
            partial: None,
        }
    }

    /// The status a request with this error is answered with (None: drop).
    pub fn status(&self) -> Option<u16> {
        match self {
            SipError::Malformed { status, .. } => *status,
            SipError::Framing(_) => Some(400),
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            SipError::Malformed { reason, .. } => reason,
            SipError::Framing(r) => r,
        }
    }
}

/// The readable part of a request that failed to parse: enough to address a response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartialHead {
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: String },
    Response { code: u16, reason: String },
}

/// A lexically parsed SIP message: start line, unfolded headers in order, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipMessage {
    pub start: StartLine,
    pub headers: Vec<Header>,
    pub body: Bytes,
}

impl SipMessage {
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// First value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| &h.name == name)
            .map(|h| h.value.as_str())
    }

    /// All values (header lines) of a header, in order.
    pub fn header_values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.clone();
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .map(|h| h.value.as_str())
    }

    /// Comma-separated option tags / tokens of every line of a header (Require, Supported…).
    pub fn header_tokens<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
        self.header_values(name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }
}

/// The typed headers every request and response must carry (RFC 3261 §8.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreHeaders {
    pub vias: Vec<Via>,
    pub from: NameAddr,
    pub to: NameAddr,
    pub call_id: String,
    pub cseq: CSeq,
    pub max_forwards: Option<u32>,
}

impl CoreHeaders {
    /// Reads and checks the core headers. Every failure is a 400 for a request.
    pub fn extract(msg: &SipMessage) -> Result<CoreHeaders, SipError> {
        let bad = |reason: String| SipError::malformed(Some(400), reason);
        let single = |name: HeaderName| -> Result<&str, SipError> {
            let mut it = msg.header_values(&name);
            let first = it
                .next()
                .ok_or_else(|| bad(format!("missing {} header", name.as_str())))?;
            if it.next().is_some() {
                return Err(bad(format!("more than one {} header", name.as_str())));
            }
            Ok(first)
        };

        let mut vias = Vec::new();
        for line in msg.header_values(&HeaderName::Via) {
            vias.extend(Via::parse_list(line).map_err(|e| bad(format!("Via: {e}")))?);
        }
        if vias.is_empty() {
            return Err(bad("missing Via header".into()));
        }
        let from = NameAddr::parse_single(single(HeaderName::From)?)
            .map_err(|e| bad(format!("From: {e}")))?;
        let to =
            NameAddr::parse_single(single(HeaderName::To)?).map_err(|e| bad(format!("To: {e}")))?;
        let call_id = single(HeaderName::CallId)?;
        if call_id.is_empty() || call_id.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad("invalid Call-ID".into()));
        }
        let cseq = CSeq::parse(single(HeaderName::CSeq)?).map_err(|e| bad(format!("CSeq: {e}")))?;
        let max_forwards = match msg.header_values(&HeaderName::MaxForwards).count() {
            0 => None,
            1 => {
                let v = msg.header(&HeaderName::MaxForwards).unwrap_or_default();
                Some(
                    grammar::parse_u32(v)
                        .filter(|n| *n <= 255)
                        .ok_or_else(|| bad("invalid Max-Forwards".into()))?,
                )
            }
            _ => return Err(bad("more than one Max-Forwards header".into())),
        };
        if let StartLine::Request { method, .. } = &msg.start {
            if method != &cseq.method {
                // RFC 4475 §3.1.2.17/18: a known method answers 400, an unknown one 501.
                let status = if method.is_known() { 400 } else { 501 };
                return Err(SipError::malformed(
                    Some(status),
                    "CSeq method does not match the request method",
                ));
            }
        }
        Ok(CoreHeaders {
            vias,
            from,
            to,
            call_id: call_id.to_string(),
            cseq,
            max_forwards,
        })
    }
}
