/// Header names the stack acts on; everything else is kept as `Other` with its original
/// spelling so it can be passed on unchanged. Compact forms (RFC 3261 §7.3.3 and the
/// extensions' own) map to the long form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Accept,
    Allow,
    Authorization,
    CallId,
    Contact,
    ContentLength,
    ContentType,
    CSeq,
    Event,
    Expires,
    From,
    MaxForwards,
    MinExpires,
    Path,
    ProxyAuthenticate,
    ProxyAuthorization,
    ProxyRequire,
    RecordRoute,
    ReferSub,
    ReferTo,
    ReferredBy,
    Replaces,
    Require,
    RetryAfter,
    Route,
    Server,
    SubscriptionState,
    Supported,
    To,
    Unsupported,
    UserAgent,
    Via,
    Warning,
    WwwAuthenticate,
    Other(String),
}

impl HeaderName {
    pub fn parse(name: &str) -> HeaderName {
        if name.len() == 1 {
            return match name.as_bytes()[0].to_ascii_lowercase() {
                b'i' => HeaderName::CallId,
                b'm' => HeaderName::Contact,
                b'l' => HeaderName::ContentLength,
                b'c' => HeaderName::ContentType,
                b'f' => HeaderName::From,
                b'k' => HeaderName::Supported,
                b'o' => HeaderName::Event,
                b'r' => HeaderName::ReferTo,
                b'b' => HeaderName::ReferredBy,
                b't' => HeaderName::To,
                b'v' => HeaderName::Via,
                _ => HeaderName::Other(name.to_string()),
            };
        }
        const KNOWN: &[(&str, HeaderName)] = &[
            ("via", HeaderName::Via),
            ("from", HeaderName::From),
            ("to", HeaderName::To),
            ("call-id", HeaderName::CallId),
            ("cseq", HeaderName::CSeq),
            ("contact", HeaderName::Contact),
            ("max-forwards", HeaderName::MaxForwards),
            ("content-length", HeaderName::ContentLength),
            ("expires", HeaderName::Expires),
            ("authorization", HeaderName::Authorization),
            ("content-type", HeaderName::ContentType),
            ("user-agent", HeaderName::UserAgent),
            ("accept", HeaderName::Accept),
            ("allow", HeaderName::Allow),
            ("supported", HeaderName::Supported),
            ("require", HeaderName::Require),
            ("proxy-require", HeaderName::ProxyRequire),
            ("route", HeaderName::Route),
            ("record-route", HeaderName::RecordRoute),
            ("path", HeaderName::Path),
            ("min-expires", HeaderName::MinExpires),
            ("proxy-authorization", HeaderName::ProxyAuthorization),
            ("proxy-authenticate", HeaderName::ProxyAuthenticate),
            ("www-authenticate", HeaderName::WwwAuthenticate),
            ("retry-after", HeaderName::RetryAfter),
            ("server", HeaderName::Server),
            ("unsupported", HeaderName::Unsupported),
            ("warning", HeaderName::Warning),
            ("event", HeaderName::Event),
            ("refer-to", HeaderName::ReferTo),
            ("referred-by", HeaderName::ReferredBy),
            ("refer-sub", HeaderName::ReferSub),
            ("replaces", HeaderName::Replaces),
            ("subscription-state", HeaderName::SubscriptionState),
        ];
        KNOWN
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| HeaderName::Other(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            HeaderName::Accept => "Accept",
            HeaderName::Allow => "Allow",
            HeaderName::Authorization => "Authorization",
            HeaderName::CallId => "Call-ID",
            HeaderName::Contact => "Contact",
            HeaderName::ContentLength => "Content-Length",
            HeaderName::ContentType => "Content-Type",
            HeaderName::CSeq => "CSeq",
            HeaderName::Event => "Event",
            HeaderName::Expires => "Expires",
            HeaderName::From => "From",
            HeaderName::MaxForwards => "Max-Forwards",
            HeaderName::MinExpires => "Min-Expires",
            HeaderName::Path => "Path",
            HeaderName::ProxyAuthenticate => "Proxy-Authenticate",
            HeaderName::ProxyAuthorization => "Proxy-Authorization",
            HeaderName::ProxyRequire => "Proxy-Require",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::ReferSub => "Refer-Sub",
            HeaderName::ReferTo => "Refer-To",
            HeaderName::ReferredBy => "Referred-By",
            HeaderName::Replaces => "Replaces",
            HeaderName::Require => "Require",
            HeaderName::RetryAfter => "Retry-After",
            HeaderName::Route => "Route",
            HeaderName::Server => "Server",
            HeaderName::SubscriptionState => "Subscription-State",
            HeaderName::Supported => "Supported",
            HeaderName::To => "To",
            HeaderName::Unsupported => "Unsupported",
            HeaderName::UserAgent => "User-Agent",
            HeaderName::Via => "Via",
            HeaderName::Warning => "Warning",
            HeaderName::WwwAuthenticate => "WWW-Authenticate",
            HeaderName::Other(s) => s,
        }
    }
}

/// One header line, unfolded (each run of folding whitespace is one SP) and trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: String,
}
