//! What a node does with a SIP request, sans-IO: the validation order of RFC 3261 §8.2,
//! digest authentication, REGISTER (§10.3, on the binding rules of
//! [`pbx_state::bindings`]) and the answers to everything else. Inputs are a parsed request, its source, `now` and a read view of the
//! replicated [`State`]; outputs are a response to send or a [`Command`] to commit first.

pub mod digest;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use pbx_sip_msg::{
    AuthHeader, ContactList, CoreHeaders, HeaderName, MessageWriter, Method, ReplyHead, SipMessage,
    Uri, ALLOW,
};
use pbx_state::bindings::{self, BindingLimits, Refusal, RegisterRequest};
use pbx_state::{ClusterSettings, Command, ContactView, Response, State};

pub use pbx_state::Transport;

use digest::{Algorithm, DigestCredentials, NonceCheck, NonceCounts, NonceKey};
use throttle::{BanPolicy, FailureThrottle};

/// Errors of this crate (configuration that cannot work).
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    #[error("invalid registrar configuration: {0}")]
    Config(String),
}

/// RFC 5626 §5.4: how often (seconds) a phone with an outbound flow must send a
/// keep-alive (CRLFCRLF on a stream, a STUN Binding request over UDP; both answered).
/// Short, so that a phone whose node died silently notices within ~40 s (no pong within
/// 10 s, §4.4.1) and registers again through another node, rather than after the
/// 120 s default.
pub const FLOW_TIMER_SECS: u32 = 30;

/// Option tags we support (RFC 3327 Path, RFC 5626 outbound).
pub const SUPPORTED: &str = "path, outbound, replaces";
const SUPPORTED_TAGS: &[&str] = &["path", "outbound", "replaces"];

#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub node_id: u64,
    /// Hosts besides the SIP domain that name this cluster in a Request-URI or AOR
    /// (node addresses, for phones configured by IP).
    pub local_hosts: Vec<String>,
    pub min_expires: u32,
    pub default_expires: u32,
    pub max_expires: u32,
    pub max_contacts: u32,
    pub nonce_ttl_secs: u64,
    /// Algorithms offered in challenges, in order of preference.
    pub challenge_algorithms: Vec<Algorithm>,
    pub ban: BanPolicy,
    pub server_name: String,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            node_id: 1,
            local_hosts: Vec::new(),
            min_expires: 60,
            default_expires: 3600,
            max_expires: 7200,
            max_contacts: 10,
            nonce_ttl_secs: 60,
            challenge_algorithms: vec![Algorithm::Md5],
            ban: BanPolicy::default(),
            server_name: concat!("pbxd/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl HandlerConfig {
    /// The limits the binding rules apply.
    pub fn binding_limits(&self) -> BindingLimits {
        BindingLimits {
            min_expires: self.min_expires,
            default_expires: self.default_expires,
            max_expires: self.max_expires,
            max_contacts: self.max_contacts,
        }
    }

    pub fn validate(&self) -> Result<(), RegistrarError> {
        let bad = |m: &str| Err(RegistrarError::Config(m.to_string()));
        self.binding_limits().check().or_else(bad)?;
        if self.challenge_algorithms.is_empty() {
            return bad("at least one challenge algorithm is needed");
        }
        if self.nonce_ttl_secs == 0 {
            return bad("nonce_ttl must be > 0");
        }
        Ok(())
    }
}

/// A request as the handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub msg: &'a SipMessage,
    pub core: &'a CoreHeaders,
    pub source: SocketAddr,
    pub transport: Transport,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send nothing (ACK, a banned source).
    Drop,
    /// Send this response. `stateful` responses go through a server transaction
    /// (INVITE finals must be retransmitted until ACKed).
    Reply {
        status: u16,
        bytes: Vec<u8>,
        stateful: bool,
    },
    /// Commit this command, then call [`RequestHandler::finish_register`].
    Commit {
        command: Box<Command>,
        pending: PendingRegister,
    },
    /// An authenticated INVITE that starts a call: hand it to the call layer.
    Call {
        /// The authenticated user.
        caller: String,
    },
    /// An authenticated SUBSCRIBE to the `message-summary` of the subscriber's own
    /// `mailbox` (RFC 3842): the endpoint keeps the subscription.
    Subscribe { mailbox: String },
}

/// The event packages this node serves to subscribers.
pub const ALLOW_EVENTS: &str = "message-summary";

/// A REGISTER waiting for its command to commit.
#[derive(Debug)]
pub struct PendingRegister {
    head: ReplyHead,
    now_ms: u64,
    path: Vec<String>,
    outbound: bool,
}

impl PendingRegister {
    /// The REGISTER's Call-ID.
    pub fn call_id(&self) -> &str {
        self.head.call_id()
    }
}

enum AuthResult {
    Authenticated,
    Challenge { stale: bool },
    Forbidden,
}

/// The per-node request handler. Shared state that is not replicated (nonce counts,
/// failure counts) lives behind mutexes so several driver tasks can share one handler;
/// a poisoned one is still used (counters stay valid after a panic elsewhere).
pub struct RequestHandler {
    config: HandlerConfig,
    nonce_counts: Mutex<NonceCounts>,
    throttle: Mutex<FailureThrottle>,
    /// Salt for nonces: node id in the top bits, so nodes never collide.
    nonce_salt: AtomicU64,
}

impl RequestHandler {
    pub fn new(config: HandlerConfig) -> Result<Self, RegistrarError> {
        config.validate()?;
        Ok(RequestHandler {
            throttle: Mutex::new(FailureThrottle::new(config.ban)),
            nonce_counts: Mutex::new(NonceCounts::default()),
            nonce_salt: AtomicU64::new(config.node_id << 48),
            config,
        })
    }

    pub fn config(&self) -> &HandlerConfig {
        &self.config
    }

    /// (sources banned now for failed authentication, bans started since start).
    pub fn bans(&self, now_ms: u64) -> (usize, u64) {
        self.throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bans(now_ms / 1000)
    }

    /// True when requests from this source are dropped for now.
    pub fn is_banned(&self, source: SocketAddr, now_ms: u64) -> bool {
        self.throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_banned(source.ip(), now_ms / 1000)
    }

    fn is_local_host(&self, host: &str, settings: &ClusterSettings) -> bool {
        host.eq_ignore_ascii_case(&settings.domain)
            || self
                .config
                .local_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host.trim_matches(['[', ']'])))
    }

    fn head(&self, req: &Inbound<'_>) -> ReplyHead {
        ReplyHead::new(req.core, req.source, &self.config.server_name)
    }

    fn reply(&self, req: &Inbound<'_>, status: u16, extra: &[(&str, &str)]) -> Outcome {
        self.reply_with_reason(req, status, None, extra)
    }

    fn reply_with_reason(
        &self,
        req: &Inbound<'_>,
        status: u16,
        reason: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Outcome {
        let head = self.head(req);
        let mut w = match reason {
            Some(r) => MessageWriter::response_with_reason(status, r),
            None => MessageWriter::response(status),
        };
        head.write(&mut w, status);
        for (n, v) in extra {
            w.header(n, v);
        }
        Outcome::Reply {
            status,
            bytes: w.finish(b""),
            stateful: is_invite(req),
        }
    }

    /// Handles a request that no transaction matched.
    pub fn handle(&self, req: Inbound<'_>, state: &State, now_ms: u64) -> Outcome {
        let Some(method) = req.msg.method() else {
            return Outcome::Drop;
        };
        if *method == Method::Ack {
            // An ACK is never answered; a 2xx ACK belongs to a dialog (calls issue).
            return Outcome::Drop;
        }
        if self.is_banned(req.source, now_ms) {
            return Outcome::Drop;
        }
        let Some(settings) = state.settings.as_ref() else {
            // Not initialised yet: nothing can be served.
            return self.reply(&req, 503, &[("Retry-After", "5")]);
        };

        // A draining node takes no new registrations or calls: 503 sends phones to the
        // next SRV target, and monitoring's OPTIONS sees it too. Requests of running
        // calls never get here (the endpoint routes them to their call first).
        if state.draining.contains(&self.config.node_id)
            && (matches!(method, Method::Register | Method::Options)
                || (*method == Method::Invite && req.core.to.tag().is_none()))
        {
            return self.reply_with_reason(
                &req,
                503,
                Some("Draining"),
                &[
                    ("Retry-After", "30"),
                    ("Warning", "399 pbxd \"this node is draining; use another\""),
                ],
            );
        }

        // §8.2.1 method inspection.
        if !method.is_known() {
            return self.reply(&req, 501, &[("Allow", ALLOW)]);
        }
        if matches!(
            method,
            Method::Notify | Method::Refer | Method::Message | Method::Publish | Method::Prack
        ) {
            return self.reply(&req, 405, &[("Allow", ALLOW)]);
        }
        // §8.2.2.1: Request-URI scheme.
        let ruri = req.msg.request_uri().and_then(|u| Uri::parse(u).ok());
        let Some(ruri) = ruri.filter(Uri::is_sip) else {
            return self.reply(&req, 416, &[]);
        };
        // §8.2.2.3: Require (Proxy-Require is for proxies; we are the UAS).
        let unsupported: Vec<&str> = req
            .msg
            .header_tokens(&HeaderName::Require)
            .filter(|t| !SUPPORTED_TAGS.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .collect();
        if !unsupported.is_empty() && *method != Method::Cancel {
            let list = unsupported.join(", ");
            return self.reply(&req, 420, &[("Unsupported", &list)]);
        }

        match method {
            Method::Options => self.reply(
                &req,
                200,
                &[
                    ("Allow", ALLOW),
                    ("Accept", "application/sdp"),
                    ("Supported", SUPPORTED),
                ],
            ),
            Method::Register => self.register(&req, &ruri, state, settings, now_ms),
            Method::Invite => self.invite(&req, state, settings, now_ms),
            Method::Subscribe => self.subscribe(&req, &ruri, state, settings, now_ms),
            // In-dialog requests and CANCEL without a matching dialog or transaction.
            _ => self.reply(&req, 481, &[]),
        }
    }

    fn invite(
        &self,
        req: &Inbound<'_>,
        state: &State,
        settings: &ClusterSettings,
        now_ms: u64,
    ) -> Outcome {
        if req.core.to.tag().is_some() {
            return self.reply(req, 481, &[]); // no such dialog
        }
        if req.core.max_forwards == Some(0) {
            return self.reply(req, 483, &[]);
        }
        // §8.2.3 content processing: we understand SDP only.
        if !req.msg.body.is_empty() {
            let ct = req.msg.header(&HeaderName::ContentType).unwrap_or("");
            let mime = ct.split(';').next().unwrap_or("").trim();
            if !mime.eq_ignore_ascii_case("application/sdp") {
                return self.reply(req, 415, &[("Accept", "application/sdp")]);
            }
        }
        let accepts: Vec<&str> = req.msg.header_tokens(&HeaderName::Accept).collect();
        if !accepts.is_empty()
            && !accepts.iter().any(|a| {
                let m = a.split(';').next().unwrap_or("").trim();
                m.eq_ignore_ascii_case("application/sdp")
                    || m == "*/*"
                    || m.eq_ignore_ascii_case("application/*")
            })
        {
            return self.reply(
                req,
                406,
                &[("Warning", "399 pbxd \"only application/sdp is supported\"")],
            );
        }
        match self.authenticate(req, state, settings, now_ms, HeaderName::ProxyAuthorization) {
            AuthResult::Challenge { stale } => {
                self.challenge(req, settings, now_ms, 407, "Proxy-Authenticate", stale)
            }
            AuthResult::Forbidden => self.reply(req, 403, &[]),
            AuthResult::Authenticated => Outcome::Call {
                caller: req.core.from.uri.user_unescaped().unwrap_or_default(),
            },
        }
    }

    /// A new subscription (a refresh of one this node keeps never gets here): the
    /// `message-summary` of the subscriber's own mailbox.
    fn subscribe(
        &self,
        req: &Inbound<'_>,
        ruri: &Uri,
        state: &State,
        settings: &ClusterSettings,
        now_ms: u64,
    ) -> Outcome {
        if req.core.to.tag().is_some() {
            // A subscription this node does not keep (it expired, or another node
            // took it): the phone subscribes anew.
            return self.reply(req, 481, &[]);
        }
        let event = req.msg.header(&HeaderName::Event).unwrap_or("");
        let package = event.split(';').next().unwrap_or("").trim();
        if !package.eq_ignore_ascii_case("message-summary") {
            return self.reply(req, 489, &[("Allow-Events", ALLOW_EVENTS)]);
        }
        match self.authenticate(req, state, settings, now_ms, HeaderName::Authorization) {
            AuthResult::Challenge { stale } => {
                self.challenge(req, settings, now_ms, 401, "WWW-Authenticate", stale)
            }
            AuthResult::Forbidden => self.reply(req, 403, &[]),
            AuthResult::Authenticated => {
                let user = req.core.from.uri.user_unescaped().unwrap_or_default();
                let asked = ruri.user_unescaped().unwrap_or_default();
                // Phones subscribe at their own address, or at the voicemail number
                // they were given (`*97`): either means their own mailbox. Someone
                // else's lamp is not the subscriber's business.
                if asked != user && state.mailbox(&asked).is_some() {
                    return self.reply(req, 403, &[]);
                }
                if state.mailbox(&user).is_none() {
                    return self.reply(req, 404, &[]);
                }
                Outcome::Subscribe { mailbox: user }
            }
        }
    }

    fn challenge(
        &self,
        req: &Inbound<'_>,
        settings: &ClusterSettings,
        now_ms: u64,
        status: u16,
        header: &str,
        stale: bool,
    ) -> Outcome {
        let salt = self.nonce_salt.fetch_add(1, Ordering::Relaxed);
        let nonce =
            NonceKey::new(&settings.nonce_secret).issue(now_ms / 1000, salt, &settings.realm);
        let head = self.head(req);
        let mut w = MessageWriter::response(status);
        head.write(&mut w, status);
        for alg in &self.config.challenge_algorithms {
            w.header_fmt(
                header,
                format_args!(
                    "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
                    settings.realm,
                    alg.as_str(),
                    if stale { ", stale=true" } else { "" }
                ),
            );
        }
        Outcome::Reply {
            status,
            bytes: w.finish(b""),
            stateful: is_invite(req),
        }
    }

    /// Digest verification. An unknown user and a wrong password take the same path
    /// (a dummy HA1 is checked) and get the same answer, so users cannot be enumerated.
    fn authenticate(
        &self,
        req: &Inbound<'_>,
        state: &State,
        settings: &ClusterSettings,
        now_ms: u64,
        header: HeaderName,
    ) -> AuthResult {
        let creds = req
            .msg
            .header_values(&header)
            .filter_map(|v| AuthHeader::parse(v).ok())
            .filter_map(|h| DigestCredentials::from_header(&h))
            .find(|c| c.realm == settings.realm);
        let Some(creds) = creds else {
            return AuthResult::Challenge { stale: false };
        };
        let now_secs = now_ms / 1000;
        let ttl = self.config.nonce_ttl_secs;
        let nonce = NonceKey::new(&settings.nonce_secret).check(
            &creds.nonce,
            &settings.realm,
            now_secs,
            ttl,
        );
        if nonce == NonceCheck::Invalid {
            return AuthResult::Challenge { stale: false };
        }
        let user = state.users.get(&creds.username);
        let ha1 = match (user, creds.algorithm) {
            (Some(u), Algorithm::Md5) if u.realm == settings.realm => u.ha1_md5.as_str(),
            (Some(u), Algorithm::Sha256) if u.realm == settings.realm => u.ha1_sha256.as_str(),
            // Same work for a user that does not exist.
            _ => "0000000000000000000000000000000000000000000000000000000000000000",
        };
        let method = req.msg.method().map(Method::as_str).unwrap_or_default();
        let ok = creds.verify(ha1, method) && user.is_some();
        if !ok {
            self.throttle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record_failure(req.source.ip(), now_secs);
            return AuthResult::Forbidden;
        }
        if nonce == NonceCheck::Stale {
            return AuthResult::Challenge { stale: true };
        }
        if let Some((_, nc, _)) = &creds.qop {
            if !self
                .nonce_counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .accept(&creds.nonce, *nc, now_secs, ttl)
            {
                return AuthResult::Challenge { stale: false };
            }
        }
        // Authorization (§10.3 step 4 / INVITE From): the credentials must be the user's
        // own.
        let claimed = match req.msg.method() {
            Some(Method::Register) => &req.core.to,
            _ => &req.core.from,
        };
        if claimed.uri.user_unescaped().as_deref() != Some(creds.username.as_str()) {
            return AuthResult::Forbidden;
        }
        AuthResult::Authenticated
    }

    fn register(
        &self,
        req: &Inbound<'_>,
        ruri: &Uri,
        state: &State,
        settings: &ClusterSettings,
        now_ms: u64,
    ) -> Outcome {
        // Step 1: a domain we serve.
        if !self.is_local_host(&ruri.host, settings) {
            return self.reply_with_reason(req, 404, Some("Domain Not Served"), &[]);
        }
        // Step 5 before authentication: an AOR that is not a SIP URI cannot name a user
        // (RFC 4475 §3.3.4).
        let to = &req.core.to;
        if !to.uri.is_sip() || to.uri.user.is_none() {
            return self.reply_with_reason(req, 400, Some("Invalid AOR"), &[]);
        }
        if !self.is_local_host(&to.uri.host, settings) {
            return self.reply_with_reason(req, 404, Some("Domain Not Served"), &[]);
        }
        let contacts = match ContactList::parse(req.msg.header_values(&HeaderName::Contact)) {
            Ok(c) => c,
            Err(e) => {
                return self.reply_with_reason(req, 400, Some(&format!("Bad Contact: {e}")), &[])
            }
        };
        let expires_header = match req.msg.header(&HeaderName::Expires) {
            None => None,
            Some(v) => match pbx_sip_msg::grammar::parse_delta_seconds(v) {
                Some(n) => Some(n),
                None => return self.reply_with_reason(req, 400, Some("Bad Expires"), &[]),
            },
        };
        // Steps 3–4, after the syntax checks so a malformed request gets its 400.
        match self.authenticate(req, state, settings, now_ms, HeaderName::Authorization) {
            AuthResult::Challenge { stale } => {
                return self.challenge(req, settings, now_ms, 401, "WWW-Authenticate", stale)
            }
            AuthResult::Forbidden => return self.reply(req, 403, &[]),
            AuthResult::Authenticated => {}
        }
        let aor = to.uri.user_unescaped().unwrap_or_default();
        let path: Vec<String> = req
            .msg
            .header_values(&HeaderName::Path)
            .map(str::to_string)
            .collect();
        let head = self.head(req);
        if matches!(&contacts, ContactList::Contacts(list) if list.is_empty()) {
            // A query (§10.3 step 6 with no Contact): the current bindings.
            let views: Vec<ContactView> = state
                .bindings_of(&aor, now_ms)
                .iter()
                .map(ContactView::from)
                .collect();
            let (status, bytes) = ok_with_bindings(&head, &views, now_ms, &path, false);
            return Outcome::Reply {
                status,
                bytes,
                stateful: false,
            };
        }
        let request = RegisterRequest {
            call_id: &req.core.call_id,
            cseq: req.core.cseq.seq,
            expires_header,
            path: &path,
            source: req.source.to_string(),
            transport: req.transport,
            node_id: self.config.node_id,
            user_agent: req.msg.header(&HeaderName::UserAgent),
            now_ms,
        };
        let cmd_op = match self
            .config
            .binding_limits()
            .register_op(&contacts, &request)
        {
            Ok(op) => op,
            Err(Refusal::StarWithoutExpiresZero) => {
                return self.reply_with_reason(req, 400, Some("Contact * requires Expires: 0"), &[])
            }
            Err(Refusal::UnsupportedContactScheme) => {
                return self.reply_with_reason(
                    req,
                    400,
                    Some("Unsupported Contact URI scheme"),
                    &[],
                )
            }
            Err(Refusal::IntervalTooBrief { min_secs }) => {
                let min = min_secs.to_string();
                return self.reply(req, 423, &[("Min-Expires", &min)]);
            }
        };
        let outbound = bindings::is_outbound(&cmd_op);
        Outcome::Commit {
            command: Box::new(Command::Register {
                aor,
                now_ms,
                call_id: req.core.call_id.clone(),
                cseq: req.core.cseq.seq,
                op: cmd_op,
                max_contacts: self.config.max_contacts,
            }),
            pending: PendingRegister {
                head,
                now_ms,
                path,
                outbound,
            },
        }
    }

    /// The answer when the command could not be committed: 503 with Retry-After, never a
    /// 200 the cluster cannot keep.
    pub fn unavailable(&self, pending: PendingRegister, retry_after_secs: u32) -> (u16, Vec<u8>) {
        let mut w = MessageWriter::response(503);
        pending.head.write(&mut w, 503);
        w.header_fmt("Retry-After", format_args!("{retry_after_secs}"));
        (503, w.finish(b""))
    }

    /// The response to a committed REGISTER. `now_ms` is the time of answering: expiry
    /// was stamped by the leader when it committed, so the remaining time is counted
    /// from now, not from when the request arrived.
    pub fn finish_register(
        &self,
        pending: PendingRegister,
        response: Response,
        now_ms: u64,
    ) -> (u16, Vec<u8>) {
        let reply = |status: u16, reason: &str| {
            let mut w = MessageWriter::response_with_reason(status, reason);
            pending.head.write(&mut w, status);
            (status, w.finish(b""))
        };
        match response {
            Response::Bindings(b) => ok_with_bindings(
                &pending.head,
                &b,
                now_ms.max(pending.now_ms),
                &pending.path,
                pending.outbound,
            ),
            // RFC 3261 answers an out-of-order request with 500, as it does in dialogs.
            Response::OutOfOrder => reply(500, "Out of Order Request"),
            Response::TooManyContacts => reply(403, "Too Many Contacts"),
            _ => reply(500, "Server Internal Error"),
        }
    }
}

/// INVITE answers go through a server transaction: finals are retransmitted until ACKed.
fn is_invite(req: &Inbound<'_>) -> bool {
    req.msg.method() == Some(&Method::Invite)
}

/// 200 OK listing every current binding with its remaining time (§10.3 step 8).
fn ok_with_bindings(
    head: &ReplyHead,
    bindings: &[ContactView],
    now_ms: u64,
    path: &[String],
    outbound: bool,
) -> (u16, Vec<u8>) {
    let mut w = MessageWriter::response(200);
    head.write(&mut w, 200);
    for b in bindings {
        w.header_fmt(
            "Contact",
            format_args!(
                "<{}>{};expires={}",
                b.uri,
                b.params,
                b.remaining_secs(now_ms)
            ),
        );
    }
    // RFC 3327: a registrar that supports Path echoes it.
    for p in path {
        w.header("Path", p);
    }
    if outbound {
        w.header("Require", "outbound");
        w.header_fmt("Flow-Timer", format_args!("{FLOW_TIMER_SECS}"));
    }
    w.header("Supported", SUPPORTED);
    (200, w.finish(b""))
}
