//! Serialization: a small writer for requests and responses.

use std::io::Write;

use crate::Method;

/// The reason phrase we send for a status code. The codes this stack sends use RFC
/// 3261's phrases; any other code falls back to rsip's table of registered codes, with its
/// variant names split into words.
pub fn reason_phrase(code: u16) -> String {
    let known = match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    match rsip::StatusCode::from(code) {
        rsip::StatusCode::Other(..) => "Unknown".to_string(),
        sc => {
            // Display is "<code> <VariantName>": split the CamelCase name into words.
            let name = sc.to_string();
            let name = name.split_once(' ').map(|(_, n)| n).unwrap_or("Unknown");
            let mut out = String::with_capacity(name.len() + 4);
            for (i, c) in name.char_indices() {
                if i > 0 && c.is_ascii_uppercase() && !name[..i].ends_with(char::is_uppercase) {
                    out.push(' ');
                }
                out.push(c);
            }
            out
        }
    }
}

/// Writes a message line by line; `finish` adds Content-Length and the body.
#[derive(Debug, Clone)]
pub struct MessageWriter {
    buf: Vec<u8>,
}

impl MessageWriter {
    pub fn response(code: u16) -> Self {
        Self::response_with_reason(code, &reason_phrase(code))
    }

    pub fn response_with_reason(code: u16, reason: &str) -> Self {
        let mut buf = Vec::with_capacity(512);
        let _ = write!(buf, "SIP/2.0 {code} {reason}\r\n");
        MessageWriter { buf }
    }

    pub fn request(method: &Method, uri: &str) -> Self {
        let mut buf = Vec::with_capacity(512);
        let _ = write!(buf, "{} {} SIP/2.0\r\n", method.as_str(), uri);
        MessageWriter { buf }
    }

    pub fn header(&mut self, name: &str, value: &str) -> &mut Self {
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    pub fn header_fmt(&mut self, name: &str, value: std::fmt::Arguments<'_>) -> &mut Self {
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        let _ = self.buf.write_fmt(value);
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    pub fn finish(mut self, body: &[u8]) -> Vec<u8> {
        let _ = write!(self.buf, "Content-Length: {}\r\n\r\n", body.len());
        self.buf.extend_from_slice(body);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(423), "Interval Too Brief");
        assert_eq!(reason_phrase(603), "Decline");
        assert_eq!(reason_phrase(488), "Not Acceptable Here");
        assert_eq!(reason_phrase(299), "Unknown");
    }

    #[test]
    fn writer_adds_length() {
        let mut w = MessageWriter::response(200);
        w.header("Call-ID", "x");
        let out = w.finish(b"");
        assert_eq!(
            out,
            b"SIP/2.0 200 OK\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
