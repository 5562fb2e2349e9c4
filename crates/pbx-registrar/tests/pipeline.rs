//! The whole request pipeline without sockets: parse → core headers → handler → commit
//! → response, as a node runs it. Covers every RFC 4475 application verdict and the
//! registrar's rules (§10.3), digest authentication and throttling.

use std::net::SocketAddr;
use std::path::PathBuf;

use pbx_registrar::digest::{ha1, Algorithm, ClientAuth};
use pbx_registrar::throttle::BanPolicy;
use pbx_registrar::{HandlerConfig, Inbound, Outcome, RequestHandler};
use pbx_sip_msg::{
    parse_datagram, reply_to_unparseable, AuthHeader, CoreHeaders, HeaderName, Limits, SipError,
    SipMessage,
};
use pbx_state::{ClusterSettings, Command, State, Transport, User};

const SRC: &str = "192.0.2.50:5062";

struct Harness {
    handler: RequestHandler,
    state: State,
    now_ms: u64,
}

#[derive(Debug, PartialEq)]
enum Answer {
    Dropped,
    Status(u16, Box<SipMessage>),
    /// An authenticated INVITE handed to the call layer, for this caller.
    Call(String),
    /// An authenticated SUBSCRIBE to this mailbox's message summary.
    Subscribed(String),
}

impl Answer {
    fn status(&self) -> Option<u16> {
        match self {
            Answer::Dropped | Answer::Call(_) | Answer::Subscribed(_) => None,
            Answer::Status(s, _) => Some(*s),
        }
    }
    fn msg(&self) -> &SipMessage {
        match self {
            Answer::Status(_, m) => m,
            Answer::Dropped | Answer::Call(_) | Answer::Subscribed(_) => panic!("no response"),
        }
    }
}

impl Harness {
    fn new(domain: &str, config: HandlerConfig) -> Self {
        let mut state = State::default();
        state.apply(Command::Initialize(ClusterSettings {
            domain: domain.into(),
            realm: domain.into(),
            nonce_secret: b"test-secret".to_vec(),
        }));
        Harness {
            handler: RequestHandler::new(config).unwrap(),
            state,
            now_ms: 1_700_000_000_000,
        }
    }

    fn add_user(&mut self, name: &str, password: &str) {
        let realm = self.state.settings.as_ref().unwrap().realm.clone();
        self.state.apply(Command::UpsertUser(User {
            name: name.into(),
            ha1_md5: ha1(Algorithm::Md5, name, &realm, password),
            ha1_sha256: ha1(Algorithm::Sha256, name, &realm, password),
            realm,
            context: "default".into(),
            caller_id_name: None,
        }));
    }

    fn send_from(&mut self, bytes: &[u8], src: &str) -> Answer {
        let source: SocketAddr = src.parse().unwrap();
        let reply_err = |e: SipError| -> Answer {
            let (
                Some(status),
                SipError::Malformed {
                    partial, reason, ..
                },
            ) = (e.status(), &e)
            else {
                return Answer::Dropped;
            };
            let headers = partial
                .as_ref()
                .map(|p| p.headers.clone())
                .unwrap_or_default();
            match reply_to_unparseable(&headers, status, reason, source, "test") {
                Some(b) => Answer::Status(status, Box::new(parse(&b))),
                None => Answer::Dropped,
            }
        };
        let msg = match parse_datagram(bytes, &Limits::default()) {
            Ok(m) => m,
            Err(e) => return reply_err(e),
        };
        let core = match CoreHeaders::extract(&msg) {
            Ok(c) => c,
            Err(_) if !msg.is_request() => return Answer::Dropped,
            Err(e) => {
                let status = e.status().unwrap_or(400);
                return match reply_to_unparseable(&msg.headers, status, e.reason(), source, "t") {
                    Some(b) => Answer::Status(status, Box::new(parse(&b))),
                    None => Answer::Dropped,
                };
            }
        };
        if !msg.is_request() {
            return Answer::Dropped; // no client transactions here: stray responses go
        }
        let inbound = Inbound {
            msg: &msg,
            core: &core,
            source,
            transport: Transport::Udp,
        };
        match self.handler.handle(inbound, &self.state, self.now_ms) {
            Outcome::Drop => Answer::Dropped,
            Outcome::Reply { status, bytes, .. } => Answer::Status(status, Box::new(parse(&bytes))),
            Outcome::Call { caller } => Answer::Call(caller),
            Outcome::Subscribe { mailbox } => Answer::Subscribed(mailbox),
            Outcome::Commit { command, pending } => {
                let resp = self.state.apply(*command);
                let (status, bytes) = self.handler.finish_register(pending, resp, self.now_ms);
                Answer::Status(status, Box::new(parse(&bytes)))
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Answer {
        self.send_from(bytes, SRC)
    }

    /// Sends, answers a 401/407 challenge with the given credentials, returns the final.
    fn send_authenticated(&mut self, bytes: &[u8], user: &str, password: &str) -> Answer {
        let first = self.send(bytes);
        let (hdr_in, hdr_out) = match first.status() {
            Some(401) => (HeaderName::WwwAuthenticate, "Authorization"),
            Some(407) => (HeaderName::ProxyAuthenticate, "Proxy-Authorization"),
            _ => return first,
        };
        let challenge = AuthHeader::parse(first.msg().header(&hdr_in).unwrap()).unwrap();
        let msg = parse_datagram(bytes, &Limits::default()).unwrap();
        let auth = ClientAuth {
            algorithm: Algorithm::parse(challenge.get("algorithm")).unwrap(),
            user,
            password,
            realm: challenge.get("realm").unwrap(),
            nonce: challenge.get("nonce").unwrap(),
            method: msg.method().unwrap().as_str(),
            uri: msg.request_uri().unwrap(),
            nc: 1,
            cnonce: "0a4f113b",
        }
        .header_value();
        self.send(&with_header(bytes, hdr_out, &auth))
    }
}

fn parse(b: &[u8]) -> SipMessage {
    parse_datagram(b, &Limits::default()).expect("our own response parses")
}

/// Inserts a header line after the request line.
fn with_header(bytes: &[u8], name: &str, value: &str) -> Vec<u8> {
    let eol = bytes.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let mut out = bytes[..eol].to_vec();
    out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    out.extend_from_slice(&bytes[eol..]);
    out
}

fn corpus() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/rfc4475");
    if dir.join("INDEX.tsv").exists() {
        Some(dir)
    } else {
        eprintln!(
            "\n!!!!!!!! RFC 4475 corpus not found at {} — SKIPPED !!!!!!!!\n",
            dir.display()
        );
        None
    }
}

/// What this node answers to each torture message, derived from INDEX.tsv's verdicts
/// for an authenticating registrar/UAS (None: dropped).
const EXPECTED: &[(&str, Option<u16>)] = &[
    // 3.1.1 valid: parsed, then answered as any request of that method.
    // wsinv carries a To tag: an in-dialog request for a dialog we do not have.
    ("wsinv.dat", Some(481)),
    ("intmeth.dat", Some(501)),
    ("esc01.dat", Some(407)),
    ("escnull.dat", Some(401)),
    ("esc02.dat", Some(501)),
    ("lwsdisp.dat", Some(200)),
    ("longreq.dat", Some(407)),
    ("dblreq.dat", Some(401)),
    ("semiuri.dat", Some(200)),
    ("transports.dat", Some(200)),
    ("mpart01.dat", Some(405)),
    ("unreason.dat", None),
    ("noreason.dat", None),
    // 3.1.2 invalid
    ("badinv01.dat", Some(400)),
    ("clerr.dat", Some(400)),
    ("ncl.dat", Some(400)),
    ("scalar02.dat", Some(400)),
    ("scalarlg.dat", None),
    ("quotbal.dat", Some(400)),
    ("ltgtruri.dat", Some(400)),
    ("lwsruri.dat", Some(400)),
    ("lwsstart.dat", Some(400)),
    ("trws.dat", Some(400)),
    ("escruri.dat", Some(400)),
    ("baddate.dat", Some(407)),
    ("regbadct.dat", Some(400)),
    ("badaspec.dat", Some(400)),
    ("baddn.dat", Some(400)),
    ("badvers.dat", Some(505)),
    ("mismatch01.dat", Some(400)),
    ("mismatch02.dat", Some(501)),
    ("bigcode.dat", None),
    // 3.2
    ("badbranch.dat", Some(200)),
    // 3.3 application
    ("insuf.dat", Some(400)),
    ("unkscm.dat", Some(416)),
    ("novelsc.dat", Some(416)),
    ("unksm2.dat", Some(400)),
    ("bext01.dat", Some(420)),
    ("invut.dat", Some(415)),
    ("regaut01.dat", Some(401)),
    ("multi01.dat", Some(400)),
    ("mcl01.dat", Some(400)),
    ("bcast.dat", None),
    ("zeromf.dat", Some(200)),
    ("cparam01.dat", Some(401)),
    ("cparam02.dat", Some(401)),
    ("regescrt.dat", Some(401)),
    ("sdp01.dat", Some(406)),
    // 3.4
    ("inv2543.dat", Some(407)),
    // test.dat has no Via: nothing to address a response to.
    ("test.dat", None),
];

#[test]
fn every_torture_message_gets_its_answer() {
    let Some(dir) = corpus() else { return };
    let index = std::fs::read_to_string(dir.join("INDEX.tsv")).unwrap();
    assert_eq!(
        index.lines().count() - 1,
        EXPECTED.len(),
        "one expectation per file"
    );
    let mut h = Harness::new("example.com", HandlerConfig::default());
    let mut wrong = Vec::new();
    for (file, expected) in EXPECTED {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let got = h.send(&bytes).status();
        if got != *expected {
            wrong.push(format!("{file}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn bext01_lists_the_unsupported_require_tags() {
    let Some(dir) = corpus() else { return };
    let mut h = Harness::new("example.com", HandlerConfig::default());
    let a = h.send(&std::fs::read(dir.join("bext01.dat")).unwrap());
    assert_eq!(a.status(), Some(420));
    let unsupported = a.msg().header(&HeaderName::Unsupported).unwrap();
    assert!(unsupported.contains("nothingSupportsThis"), "{unsupported}");
    assert!(
        !unsupported.contains("noProxiesSupportThis"),
        "Proxy-Require is for proxies"
    );
}

#[test]
fn regaut01_gets_a_fresh_digest_challenge() {
    let Some(dir) = corpus() else { return };
    let mut h = Harness::new("example.com", HandlerConfig::default());
    let a = h.send(&std::fs::read(dir.join("regaut01.dat")).unwrap());
    let challenges: Vec<&str> = a
        .msg()
        .header_values(&HeaderName::WwwAuthenticate)
        .collect();
    // MD5 only by default: most phones know only MD5, and some (baresip 1.0) give up
    // on the whole challenge when one of several offers SHA-256.
    assert_eq!(challenges.len(), 1);
    assert!(challenges[0].contains("algorithm=MD5"), "{challenges:?}");
}

/// cparam01/cparam02/regescrt: registered (with credentials), and the Contact comes
/// back exactly: header params outside the brackets, URI params and escaped headers in.
#[test]
fn contact_uris_are_stored_and_returned_exactly() {
    let Some(dir) = corpus() else { return };
    let mut h = Harness::new("example.com", HandlerConfig::default());
    h.add_user("watson", "secret");
    h.add_user("user", "secret");
    let cases = [
        (
            "cparam01.dat",
            "watson",
            "<sip:+19725552222@gw1.example.net>;unknownparam;expires=",
        ),
        (
            "cparam02.dat",
            "watson",
            "<sip:+19725552222@gw1.example.net;unknownparam>;expires=",
        ),
        (
            "regescrt.dat",
            "user",
            "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>;expires=",
        ),
    ];
    for (file, user, contact) in cases {
        let a = h.send_authenticated(&std::fs::read(dir.join(file)).unwrap(), user, "secret");
        assert_eq!(a.status(), Some(200), "{file}");
        let contacts: Vec<&str> = a.msg().header_values(&HeaderName::Contact).collect();
        assert!(
            contacts.iter().any(|c| c.starts_with(contact)),
            "{file}: {contacts:?}"
        );
    }
    // A later fetch (REGISTER without Contact) returns the stored form. cparam01's and
    // cparam02's URIs are equal under RFC 3261 §19.1.4 (a parameter present on one side
    // only is ignored), so cparam02 (another Call-ID) replaced cparam01's binding.
    let query = register("watson", "example.com", "q1", 1, &[], None);
    let a = h.send_authenticated(&query, "watson", "secret");
    let contacts: Vec<&str> = a.msg().header_values(&HeaderName::Contact).collect();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert!(contacts[0].starts_with("<sip:+19725552222@gw1.example.net;unknownparam>;expires="));
    let query = register("user", "example.com", "q2", 1, &[], None);
    let a = h.send_authenticated(&query, "user", "secret");
    assert!(a
        .msg()
        .header(&HeaderName::Contact)
        .unwrap()
        .starts_with("<sip:user@example.com?Route=%3Csip:sip.example.com%3E>;expires="));
}

fn register(
    user: &str,
    domain: &str,
    call_id: &str,
    cseq: u32,
    contacts: &[&str],
    expires: Option<&str>,
) -> Vec<u8> {
    let mut m = format!(
        "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5062;rport;branch=z9hG4bK{call_id}{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@{domain}>;tag=f{call_id}\r\nTo: <sip:{user}@{domain}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
    );
    for c in contacts {
        m.push_str(&format!("Contact: {c}\r\n"));
    }
    if let Some(e) = expires {
        m.push_str(&format!("Expires: {e}\r\n"));
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m.into_bytes()
}

fn contact_expiries(a: &Answer) -> Vec<(String, u64)> {
    a.msg()
        .header_values(&HeaderName::Contact)
        .map(|c| {
            let (uri, exp) = c.rsplit_once(";expires=").unwrap();
            (uri.to_string(), exp.parse().unwrap())
        })
        .collect()
}

#[test]
fn registrar_rules() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "pw");
    // Two contacts, Expires header and parameter.
    let r = register(
        "alice",
        "pbx.test",
        "c1",
        1,
        &[
            "<sip:alice@192.0.2.50:5062>;expires=120",
            "<sip:alice@192.0.2.51>;q=0.5",
        ],
        Some("600"),
    );
    let a = h.send_authenticated(&r, "alice", "pw");
    assert_eq!(a.status(), Some(200));
    let mut c = contact_expiries(&a);
    c.sort();
    assert_eq!(
        c,
        vec![
            ("<sip:alice@192.0.2.50:5062>".to_string(), 120),
            ("<sip:alice@192.0.2.51>;q=0.5".to_string(), 600)
        ]
    );
    // Too brief: 423 with Min-Expires, nothing changed.
    let r = register(
        "alice",
        "pbx.test",
        "c1",
        2,
        &["<sip:alice@192.0.2.52>"],
        Some("10"),
    );
    let a = h.send_authenticated(&r, "alice", "pw");
    assert_eq!(a.status(), Some(423));
    assert_eq!(a.msg().header(&HeaderName::MinExpires), Some("60"));
    // Too long: clamped to max_expires.
    let r = register(
        "alice",
        "pbx.test",
        "c1",
        3,
        &["<sip:alice@192.0.2.53>"],
        Some("99999999999999999999"),
    );
    let a = h.send_authenticated(&r, "alice", "pw");
    assert!(contact_expiries(&a).contains(&("<sip:alice@192.0.2.53>".to_string(), 7200)));
    // A stale refresh (same Call-ID, CSeq not higher) is refused and not applied.
    let r = register(
        "alice",
        "pbx.test",
        "c1",
        3,
        &["<sip:alice@192.0.2.53>"],
        Some("60"),
    );
    assert_eq!(h.send_authenticated(&r, "alice", "pw").status(), Some(500));
    assert_eq!(h.state.bindings_of("alice", h.now_ms).len(), 3);
    // Time passes: the 120 s binding expires and disappears from answers.
    h.now_ms += 121_000;
    let q = register("alice", "pbx.test", "c1", 4, &[], None);
    let a = h.send_authenticated(&q, "alice", "pw");
    let c = contact_expiries(&a);
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c
        .iter()
        .all(|(u, e)| !u.contains("5062") && *e <= 600 - 121 + 7200));
    // Contact: * without Expires: 0 is a 400; with it everything goes.
    let r = register("alice", "pbx.test", "c1", 5, &["*"], None);
    assert_eq!(h.send_authenticated(&r, "alice", "pw").status(), Some(400));
    let r = register("alice", "pbx.test", "c1", 6, &["*"], Some("0"));
    let a = h.send_authenticated(&r, "alice", "pw");
    assert_eq!(a.status(), Some(200));
    assert!(contact_expiries(&a).is_empty());
    assert!(h.state.bindings_of("alice", h.now_ms).is_empty());
}

#[test]
fn contact_limit_per_aor() {
    let cfg = HandlerConfig {
        max_contacts: 2,
        ..HandlerConfig::default()
    };
    let mut h = Harness::new("pbx.test", cfg);
    h.add_user("bob", "pw");
    let r = register(
        "bob",
        "pbx.test",
        "x",
        1,
        &["<sip:b@1>", "<sip:b@2>", "<sip:b@3>"],
        None,
    );
    assert_eq!(h.send_authenticated(&r, "bob", "pw").status(), Some(403));
    for (i, host) in ["1", "2", "3"].iter().enumerate() {
        let r = register(
            "bob",
            "pbx.test",
            &format!("y{i}"),
            1,
            &[&format!("<sip:b@{host}>")],
            None,
        );
        assert_eq!(h.send_authenticated(&r, "bob", "pw").status(), Some(200));
        h.now_ms += 1000;
    }
    let left: Vec<String> = h
        .state
        .bindings_of("bob", h.now_ms)
        .into_iter()
        .map(|b| b.uri)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(
        !left.contains(&"sip:b@1".to_string()),
        "the oldest made room: {left:?}"
    );
}

#[test]
fn binding_records_source_transport_node_instance_and_path() {
    let mut h = Harness::new(
        "pbx.test",
        HandlerConfig {
            node_id: 7,
            ..HandlerConfig::default()
        },
    );
    h.add_user("carol", "pw");
    let mut r = String::from_utf8(register(
        "carol",
        "pbx.test",
        "o1",
        1,
        &["<sip:carol@10.1.1.1:5070;transport=tcp>;+sip.instance=\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\";reg-id=1"],
        None,
    ))
    .unwrap();
    r = r.replace(
        "Content-Length",
        "Path: <sip:edge.example.com;lr>\r\nContent-Length",
    );
    let a = h.send_authenticated(r.as_bytes(), "carol", "pw");
    assert_eq!(a.status(), Some(200));
    assert_eq!(
        a.msg().header(&HeaderName::Path),
        Some("<sip:edge.example.com;lr>")
    );
    assert_eq!(a.msg().header(&HeaderName::Require), Some("outbound"));
    assert_eq!(
        a.msg().header(&HeaderName::Other("Flow-Timer".into())),
        Some("30"),
        "RFC 5626 §5.4: how often the phone keeps its flow alive"
    );
    let b = &h.state.bindings_of("carol", h.now_ms)[0];
    assert_eq!(b.uri, "sip:carol@10.1.1.1:5070;transport=tcp");
    assert_eq!(
        b.instance.as_deref(),
        Some("\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\"")
    );
    assert_eq!(b.reg_id, Some(1));
    assert_eq!(b.path, vec!["<sip:edge.example.com;lr>".to_string()]);
    assert_eq!(b.source, SRC);
    assert_eq!(b.node_id, 7);
}

#[test]
fn response_via_gets_received_and_rport() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    let r = b"OPTIONS sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;rport;branch=z9hG4bKo1\r\nFrom: <sip:mon@pbx.test>;tag=1\r\nTo: <sip:pbx.test>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    let a = h.send_from(r, "203.0.113.5:31000");
    assert_eq!(a.status(), Some(200));
    assert_eq!(
        a.msg().header(&HeaderName::Via),
        Some("SIP/2.0/UDP 10.0.0.9:5060;rport=31000;branch=z9hG4bKo1;received=203.0.113.5")
    );
    assert!(a
        .msg()
        .header(&HeaderName::Allow)
        .unwrap()
        .contains("REGISTER"));
    assert!(a.msg().header(&HeaderName::To).unwrap().contains(";tag="));
}

/// Unknown user and wrong password: the same status, the same headers but for the
/// values, so a scanner learns nothing.
#[test]
fn no_user_enumeration() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "right");
    let known = h.send_authenticated(
        &register("alice", "pbx.test", "e1", 1, &["<sip:a@1>"], None),
        "alice",
        "wrong",
    );
    let unknown = h.send_authenticated(
        &register("mallory", "pbx.test", "e2", 1, &["<sip:m@1>"], None),
        "mallory",
        "wrong",
    );
    assert_eq!(known.status(), Some(403));
    assert_eq!(unknown.status(), Some(403));
    let names = |a: &Answer| -> Vec<String> {
        a.msg()
            .headers
            .iter()
            .map(|h| h.name.as_str().to_string())
            .collect()
    };
    assert_eq!(names(&known), names(&unknown));
    // Without credentials, both are challenged identically.
    let k = h.send(&register(
        "alice",
        "pbx.test",
        "e3",
        1,
        &["<sip:a@1>"],
        None,
    ));
    let u = h.send(&register(
        "nobody",
        "pbx.test",
        "e4",
        1,
        &["<sip:n@1>"],
        None,
    ));
    assert_eq!((k.status(), u.status()), (Some(401), Some(401)));
    assert_eq!(names(&k), names(&u));
}

#[test]
fn password_guessing_is_banned() {
    let mut h = Harness::new(
        "pbx.test",
        HandlerConfig {
            ban: BanPolicy {
                max_failures: 5,
                window_secs: 60,
                ban_secs: 300,
            },
            ..HandlerConfig::default()
        },
    );
    h.add_user("alice", "right");
    for i in 0..5 {
        let r = register(
            "alice",
            "pbx.test",
            &format!("g{i}"),
            1,
            &["<sip:a@1>"],
            None,
        );
        assert_eq!(
            h.send_authenticated(&r, "alice", &format!("guess{i}"))
                .status(),
            Some(403)
        );
    }
    // Banned: even the right password gets no answer now.
    let r = register("alice", "pbx.test", "g9", 1, &["<sip:a@1>"], None);
    assert_eq!(h.send(&r), Answer::Dropped);
    // Other sources are unaffected.
    let a = h.send_from(&r, "198.51.100.1:5060");
    assert_eq!(a.status(), Some(401));
    h.now_ms += 301_000;
    assert_eq!(
        h.send_authenticated(&r, "alice", "right").status(),
        Some(200)
    );
}

#[test]
fn stale_nonce_and_replayed_nonce_count() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "pw");
    let r = register("alice", "pbx.test", "s1", 1, &["<sip:a@1>"], None);
    let challenge = h.send(&r);
    let ch = AuthHeader::parse(
        challenge
            .msg()
            .header(&HeaderName::WwwAuthenticate)
            .unwrap(),
    )
    .unwrap();
    let auth = |nc: u32| {
        ClientAuth {
            algorithm: Algorithm::Sha256,
            user: "alice",
            password: "pw",
            realm: "pbx.test",
            nonce: ch.get("nonce").unwrap(),
            method: "REGISTER",
            uri: "sip:pbx.test",
            nc,
            cnonce: "abc",
        }
        .header_value()
    };
    assert_eq!(
        h.send(&with_header(&r, "Authorization", &auth(1))).status(),
        Some(200)
    );
    // Same nonce, same nc: a replay.
    let r2 = register("alice", "pbx.test", "s1", 2, &["<sip:a@1>"], None);
    assert_eq!(
        h.send(&with_header(&r2, "Authorization", &auth(1)))
            .status(),
        Some(401)
    );
    assert_eq!(
        h.send(&with_header(&r2, "Authorization", &auth(2)))
            .status(),
        Some(200)
    );
    // After the nonce lifetime: 401 with stale=true.
    h.now_ms += 61_000;
    let r3 = register("alice", "pbx.test", "s1", 3, &["<sip:a@1>"], None);
    let a = h.send(&with_header(&r3, "Authorization", &auth(3)));
    assert_eq!(a.status(), Some(401));
    assert!(a
        .msg()
        .header(&HeaderName::WwwAuthenticate)
        .unwrap()
        .contains("stale=true"));
}

#[test]
fn register_for_another_users_aor_is_forbidden() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "pw");
    h.add_user("bob", "pw2");
    let r = register("bob", "pbx.test", "x1", 1, &["<sip:evil@1>"], None);
    assert_eq!(h.send_authenticated(&r, "alice", "pw").status(), Some(403));
    assert!(h.state.bindings_of("bob", h.now_ms).is_empty());
}

#[test]
fn foreign_domain_is_not_served() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    let r = register("alice", "elsewhere.example", "d1", 1, &["<sip:a@1>"], None);
    assert_eq!(h.send(&r).status(), Some(404));
}

fn invite(from: &str, to: &str, max_forwards: u32) -> Vec<u8> {
    format!(
        "INVITE sip:{to}@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKinv{max_forwards}\r\n\
         Max-Forwards: {max_forwards}\r\nFrom: <sip:{from}@pbx.test>;tag=f\r\nTo: <sip:{to}@pbx.test>\r\n\
         Call-ID: inv-{from}\r\nCSeq: 1 INVITE\r\nContact: <sip:{from}@192.0.2.1>\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn an_invite_is_challenged_then_handed_to_the_call_layer_as_its_caller() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "pw");
    h.add_user("bob", "pw2");
    let r = invite("alice", "bob", 70);
    let first = h.send(&r);
    assert_eq!(first.status(), Some(407));
    assert!(first.msg().header(&HeaderName::ProxyAuthenticate).is_some());
    match h.send_authenticated(&r, "alice", "pw") {
        Answer::Call(caller) => assert_eq!(caller, "alice"),
        other => panic!("expected a call, got {:?}", other.status()),
    }
    assert_eq!(
        h.send_authenticated(&r, "alice", "wrong").status(),
        Some(403)
    );
    // Someone else's credentials for alice's From: refused.
    assert_eq!(h.send_authenticated(&r, "bob", "pw2").status(), Some(403));
    assert_eq!(h.send(&invite("alice", "bob", 0)).status(), Some(483));
}

#[test]
fn a_draining_node_refuses_new_registrations_calls_and_probes_with_503() {
    let mut h = Harness::new("pbx.test", HandlerConfig::default());
    h.add_user("alice", "pw");
    h.state.apply(Command::SetDraining {
        node: 1,
        draining: true,
    });
    let r = register("alice", "pbx.test", "x", 1, &["<sip:a@192.0.2.1>"], None);
    let a = h.send(&r);
    assert_eq!(a.status(), Some(503));
    assert!(a.msg().header(&HeaderName::RetryAfter).is_some());
    assert_eq!(h.send(&invite("alice", "bob", 70)).status(), Some(503));
    // Another node draining changes nothing here.
    h.state.apply(Command::SetDraining {
        node: 1,
        draining: false,
    });
    h.state.apply(Command::SetDraining {
        node: 2,
        draining: true,
    });
    assert_eq!(h.send(&invite("alice", "bob", 70)).status(), Some(407));
}
