use std::fmt;

/// A SIP method. Method names are case-sensitive (RFC 3261 §7.1); anything that is a
/// valid token but not a method we know is kept as `Other` so it can be answered 501.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    Other(String),
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }

    pub fn is_known(&self) -> bool {
        !matches!(self, Method::Other(_))
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a message's start line says, read without parsing the message: for counting
/// every message a node sends and receives (metrics), parseable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A request: the index of its method in [`MessageKind::METHODS`] (the last one,
    /// `OTHER`, for a method this stack does not know).
    Request(usize),
    /// A response: its status code.
    Response(u16),
    /// Neither (garbage, a keep-alive, STUN).
    Unknown,
}

impl MessageKind {
    /// The request methods counted by name; `OTHER` is every other one.
    pub const METHODS: [&'static str; 15] = [
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "REGISTER",
        "OPTIONS",
        "INFO",
        "UPDATE",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "REFER",
        "MESSAGE",
        "PUBLISH",
        "OTHER",
    ];

    /// Reads the start line of `bytes` (leading CRLFs skipped, RFC 3261 §7.5).
    pub fn of(bytes: &[u8]) -> MessageKind {
        let start = bytes
            .iter()
            .position(|b| !matches!(b, b'\r' | b'\n'))
            .unwrap_or(bytes.len());
        let line = &bytes[start..];
        let token_end = line.iter().position(|&b| b == b' ').unwrap_or(0);
        if token_end == 0 {
            return MessageKind::Unknown;
        }
        let token = &line[..token_end];
        if token == b"SIP/2.0" {
            let code = line.get(token_end + 1..token_end + 4);
            return match code {
                Some(d) if d.iter().all(u8::is_ascii_digit) => {
                    MessageKind::Response(d.iter().fold(0u16, |n, &c| n * 10 + u16::from(c - b'0')))
                }
                _ => MessageKind::Unknown,
            };
        }
        if !token.iter().all(|b| b.is_ascii_alphabetic() || *b == b'-') {
            return MessageKind::Unknown;
        }
        let other = Self::METHODS.len() - 1;
        MessageKind::Request(
            Self::METHODS[..other]
                .iter()
                .position(|m| m.as_bytes() == token)
                .unwrap_or(other),
        )
    }
}

#[cfg(test)]
mod message_kind_tests {
    use super::MessageKind;

    #[test]
    fn reads_requests_responses_and_garbage() {
        assert_eq!(
            MessageKind::of(b"REGISTER sip:pbx.test SIP/2.0\r\n"),
            MessageKind::Request(4)
        );
        assert_eq!(
            MessageKind::of(b"\r\nINVITE sip:a@b SIP/2.0\r\n"),
            MessageKind::Request(0)
        );
        assert_eq!(
            MessageKind::of(b"FOO sip:a@b SIP/2.0\r\n"),
            MessageKind::Request(14)
        );
        assert_eq!(
            MessageKind::of(b"SIP/2.0 486 Busy Here\r\n"),
            MessageKind::Response(486)
        );
        assert_eq!(
            MessageKind::of(b"SIP/2.0 4x6 Bad\r\n"),
            MessageKind::Unknown
        );
        assert_eq!(MessageKind::of(b"\r\n\r\n"), MessageKind::Unknown);
        assert_eq!(MessageKind::of(b"\x00\x01\x02 x"), MessageKind::Unknown);
        assert_eq!(MessageKind::of(b""), MessageKind::Unknown);
    }
}
