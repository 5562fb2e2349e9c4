//! The endpoint on virtual time: REGISTER commits, call admission, routing by Call-ID,
//! relayed calls.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pbx_dialplan::DialTarget;
use pbx_registrar::digest::{ha1, Algorithm, ClientAuth};
use pbx_registrar::HandlerConfig;
use pbx_sip_core::Timers;
use pbx_sip_msg::{parse_datagram, AuthHeader, HeaderName, Limits, SipMessage};
use pbx_state::{Binding, ClusterSettings, Command, State, Transport, User};

use crate::{
    CallMessage, Dest, Endpoint, EndpointConfig, Event, Link, Refused, SkipReason, Transmit,
};

const PHONE: &str = "192.0.2.50:5062";
const LOCAL: &str = "198.51.100.1:5060";
const NOW_MS: u64 = 1_700_000_000_000;

/// A call's handle in these tests: its number.
type CallId = u32;

struct Harness {
    ep: Endpoint<CallId>,
    state: State,
    t0: Instant,
}

fn config(max_calls: usize) -> EndpointConfig {
    EndpointConfig {
        node_id: 1,
        local_addr: LOCAL.parse().unwrap(),
        limits: Limits::default(),
        timers: Timers::default(),
        retry_after: 7,
        max_calls,
        relayed_call_idle: EndpointConfig::DEFAULT_RELAYED_CALL_IDLE,
        handler: HandlerConfig::default(),
        overload: overload_without_flood_limit(),
        nat: crate::NatPolicy::Auto,
        tls_addr: None,
        unsolicited_mwi: true,
        seed: 7,
    }
}

/// Tests send everything from one address: no flood limit.
fn overload_without_flood_limit() -> crate::OverloadConfig {
    crate::OverloadConfig {
        per_source_rate: 0,
        ..crate::OverloadConfig::default()
    }
}

impl Harness {
    fn new(max_calls: usize) -> Self {
        Self::with(config(max_calls))
    }

    fn with(config: EndpointConfig) -> Self {
        let mut state = State::default();
        state.apply(Command::Initialize(ClusterSettings {
            domain: "pbx.test".into(),
            realm: "pbx.test".into(),
            nonce_secret: b"test-secret".to_vec(),
        }));
        for (name, password) in [("alice", "pw"), ("bob", "pw2"), ("carol", "pw3")] {
            state.apply(Command::UpsertUser(User {
                name: name.into(),
                ha1_md5: ha1(Algorithm::Md5, name, "pbx.test", password),
                ha1_sha256: ha1(Algorithm::Sha256, name, "pbx.test", password),
                realm: "pbx.test".into(),
                context: "default".into(),
                caller_id_name: None,
            }));
        }
        state.apply(Command::SetDialplan {
            source: "[default]\nexten => _[a-z].,1,Dial(SIP/${EXTEN})\n".into(),
            now_ms: NOW_MS,
        });
        Harness {
            ep: Endpoint::new(config).unwrap(),
            state,
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn feed(&self, ms: u64, link: Link, bytes: &[u8]) -> Option<Event<CallId>> {
        self.ep.handle(
            self.at(ms),
            NOW_MS + ms,
            PHONE.parse().unwrap(),
            link,
            bytes,
            || &self.state,
        )
    }

    fn udp(&self, ms: u64, bytes: &[u8]) -> Option<Event<CallId>> {
        self.feed(ms, Link::Udp, bytes)
    }

    /// Sends `bytes`, expects a 401/407 challenge, answers it with the user's
    /// credentials and returns what the authenticated request led to.
    fn authenticated(&self, ms: u64, bytes: &[u8], user: &str, pw: &str) -> Option<Event<u32>> {
        let challenge = transmitted(self.udp(ms, bytes));
        let msg = parse(&challenge.bytes);
        let (hdr_in, hdr_out) = match msg.status() {
            Some(401) => (HeaderName::WwwAuthenticate, "Authorization"),
            Some(407) => (HeaderName::ProxyAuthenticate, "Proxy-Authorization"),
            other => panic!("expected a challenge, got {other:?}"),
        };
        let ch = AuthHeader::parse(msg.header(&hdr_in).unwrap()).unwrap();
        let req = parse(bytes);
        let auth = ClientAuth {
            algorithm: Algorithm::parse(ch.get("algorithm")).unwrap(),
            user,
            password: pw,
            realm: ch.get("realm").unwrap(),
            nonce: ch.get("nonce").unwrap(),
            method: req.method().unwrap().as_str(),
            uri: req.request_uri().unwrap(),
            nc: 1,
            cnonce: "0a4f113b",
        }
        .header_value();
        // The authenticated request is a new transaction: a new branch.
        let again = with_header(bytes, hdr_out, &auth);
        let again = String::from_utf8(again)
            .unwrap()
            .replace("branch=z9hG4bK", "branch=z9hG4bKauth");
        self.udp(ms, again.as_bytes())
    }
}

fn parse(b: &[u8]) -> SipMessage {
    parse_datagram(b, &Limits::default()).expect("parses")
}

fn with_header(bytes: &[u8], name: &str, value: &str) -> Vec<u8> {
    let eol = bytes.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let mut out = bytes[..eol].to_vec();
    out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    out.extend_from_slice(&bytes[eol..]);
    out
}

fn transmitted(e: Option<Event<CallId>>) -> Transmit {
    match e {
        Some(Event::Transmit(t)) => t,
        other => panic!("expected a transmit, got {other:?}"),
    }
}

fn status(t: &Transmit) -> u16 {
    parse(&t.bytes).status().unwrap()
}

fn register(call_id: &str, cseq: u32) -> Vec<u8> {
    format!(
        "REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5062;rport;branch=z9hG4bK{call_id}{cseq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=f{call_id}\r\nTo: <sip:alice@pbx.test>\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:alice@192.0.2.50:5062>\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn invite(to: &str, call_id: &str) -> Vec<u8> {
    format!(
        "INVITE sip:{to}@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5062;rport;branch=z9hG4bK{call_id}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=f{call_id}\r\nTo: <sip:{to}@pbx.test>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.50:5062>\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// REGISTER → 401 → REGISTER with credentials: the command to commit and its token.
fn register_to_commit(h: &Harness) -> (Box<Command>, crate::CommitToken) {
    match h.authenticated(0, &register("reg1", 1), "alice", "pw") {
        Some(Event::Commit { command, token }) => (command, token),
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn a_committed_register_is_answered_200_through_its_transaction() {
    let mut h = Harness::new(10);
    let (command, token) = register_to_commit(&h);
    assert!(matches!(*command, Command::Register { ref aor, .. } if aor == "alice"));
    let authed = String::from_utf8(register("reg1", 1))
        .unwrap()
        .replace("branch=z9hG4bK", "branch=z9hG4bKauth");
    // The transaction exists while the command commits: a retransmission is absorbed,
    // no second commit.
    assert!(h.udp(100, authed.as_bytes()).is_none());
    let response = h.state.apply(*command);
    let sent =
        h.ep.commit_done(h.at(200), NOW_MS + 200, token, Ok::<_, ()>(response))
            .expect("a 200 to send");
    assert_eq!(sent.dest, Dest::Udp(PHONE.parse().unwrap()));
    let ok = parse(&sent.bytes);
    assert_eq!(ok.status(), Some(200));
    assert!(ok
        .header(&HeaderName::Contact)
        .unwrap()
        .starts_with("<sip:alice@192.0.2.50:5062>;expires="));
    assert!(!h.ep.take_timers_moved(), "a REGISTER starts no Timer G");
    // After the 200, a retransmission gets the same 200 again.
    let again = transmitted(h.udp(300, authed.as_bytes()));
    assert_eq!(again, sent);
    // Timer J (64*T1 over UDP) ends the transaction: the request is new again.
    let end = h.ep.poll_timeout().unwrap();
    assert_eq!(end, h.at(200) + Timers::default().t1x64());
    h.ep.handle_timeout(end);
    assert!(h.ep.poll_transmit().is_none());
    assert!(matches!(
        h.udp(40_000, authed.as_bytes()),
        Some(Event::Transmit(_))
    ));
}

#[test]
fn a_register_that_cannot_be_committed_gets_503_with_retry_after() {
    let h = Harness::new(10);
    let (_, token) = register_to_commit(&h);
    let sent =
        h.ep.commit_done(h.at(50), NOW_MS + 50, token, Err("no leader"))
            .expect("a 503 to send");
    let msg = parse(&sent.bytes);
    assert_eq!(msg.status(), Some(503));
    assert_eq!(msg.header(&HeaderName::RetryAfter), Some("7"));
    assert_eq!(msg.header(&HeaderName::CallId), Some("reg1"));
}

#[test]
fn an_admitted_invite_starts_a_call_whose_messages_are_routed_by_call_id() {
    let h = Harness::new(10);
    let call = match h.authenticated(0, &invite("bob", "c1"), "alice", "pw") {
        Some(Event::StartCall(call)) => call,
        other => panic!("expected a call, got {other:?}"),
    };
    assert_eq!(
        (call.caller.as_str(), call.exten.as_str(), call.secure),
        ("alice", "bob", false)
    );
    assert_eq!(call.domain, "pbx.test");
    h.ep.start_call(&call.core.call_id, 7);
    assert_eq!(h.ep.active_calls(), 1);
    // The challenged INVITE's retransmission gets its 407 again, from the table.
    let again = transmitted(h.udp(100, &invite("bob", "c1")));
    assert_eq!(status(&again), 407);
    // A new request with the call's Call-ID goes to the call, its transaction open.
    let cancel = String::from_utf8(invite("bob", "c1"))
        .unwrap()
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL")
        .replace("branch=z9hG4bKc1", "branch=z9hG4bKauthc1");
    match h.udp(150, cancel.as_bytes()) {
        Some(Event::ToCall(7, CallMessage::Request { key, .. })) => {
            let t = h.ep.respond(h.at(160), &key, 200, "200".into()).unwrap();
            assert_eq!(t.dest, Dest::Udp(PHONE.parse().unwrap()));
        }
        other => panic!("expected the CANCEL for the call, got {other:?}"),
    }
    let response = format!(
        "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP {LOCAL};branch=z9hG4bKb1\r\nFrom: <sip:alice@pbx.test>;tag=x\r\n\
         To: <sip:bob@pbx.test>;tag=y\r\nCall-ID: c1-b\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    assert!(
        h.udp(200, response.as_bytes()).is_none(),
        "unknown Call-ID: dropped"
    );
    h.ep.claim_call_id("c1-b", 7);
    assert!(matches!(
        h.udp(300, response.as_bytes()),
        Some(Event::ToCall(7, CallMessage::Response { .. }))
    ));
    h.ep.call_ended();
    assert_eq!(h.ep.active_calls(), 0);
    h.ep.release_call_ids(&["c1".to_string(), "c1-b".to_string()]);
    assert!(h.ep.call("c1-b").is_none());
}

#[test]
fn the_call_limit_refuses_with_503_retry_after_and_a_warning() {
    let h = Harness::new(1);
    h.ep.start_call("running", 1);
    let refused = h.authenticated(0, &invite("bob", "c2"), "alice", "pw");
    let Some(Event::CallRefused {
        transmit: Some(t),
        reason,
    }) = refused
    else {
        panic!("expected a refusal, got {refused:?}");
    };
    assert_eq!(reason, Refused::CallLimit { limit: 1 });
    let msg = parse(&t.bytes);
    assert_eq!(msg.status(), Some(503));
    assert_eq!(msg.header(&HeaderName::RetryAfter), Some("7"));
    assert_eq!(
        msg.header(&HeaderName::Warning),
        Some("399 pbxd \"call limit reached on this node\"")
    );
    // An INVITE's final over UDP is retransmitted (Timer G) until the ACK.
    assert!(h.ep.take_timers_moved());
    assert!(!h.ep.take_timers_moved(), "taken once");
    // (The 407 challenge before it, an INVITE final too, is retransmitted as well.)
    let due = h.ep.poll_timeout().unwrap();
    assert_eq!(due, h.at(0) + Timers::default().t1);
    h.ep.handle_timeout(due);
    let again: Vec<Transmit> = std::iter::from_fn(|| h.ep.poll_transmit()).collect();
    assert_eq!(again.len(), 2);
    assert!(again.contains(&t));
}

#[test]
fn a_draining_node_refuses_calls_with_503() {
    let mut h = Harness::new(10);
    h.state.apply(Command::SetDraining {
        node: 1,
        draining: true,
    });
    let t = transmitted(h.udp(0, &invite("bob", "c3")));
    let msg = parse(&t.bytes);
    assert_eq!(msg.status(), Some(503));
    assert_eq!(msg.header(&HeaderName::RetryAfter), Some("30"));
}

#[test]
fn no_route_is_404_and_no_dialplan_is_503() {
    let mut h = Harness::new(10);
    // The test dialplan routes letters only.
    match h.authenticated(0, &invite("123", "c4"), "alice", "pw") {
        Some(Event::CallRefused {
            transmit: Some(t),
            reason: Refused::NoRoute { exten, .. },
        }) => {
            assert_eq!(exten, "123");
            assert_eq!(status(&t), 404);
            assert!(parse(&t.bytes).header(&HeaderName::RetryAfter).is_none());
        }
        other => panic!("expected 404, got {other:?}"),
    }
    h.state.dialplan = None;
    match h.authenticated(0, &invite("bob", "c5"), "alice", "pw") {
        Some(Event::CallRefused {
            transmit: Some(t),
            reason: Refused::NoDialplan,
        }) => assert_eq!(status(&t), 503),
        other => panic!("expected 503, got {other:?}"),
    }
}

#[test]
fn a_call_the_driver_cannot_start_is_refused_through_its_transaction() {
    let h = Harness::new(10);
    let Some(Event::StartCall(call)) = h.authenticated(0, &invite("bob", "c6"), "alice", "pw")
    else {
        panic!("expected a call");
    };
    let t =
        h.ep.refuse(h.at(10), &call, &Refused::NoMediaPorts)
            .unwrap();
    let msg = parse(&t.bytes);
    assert_eq!(msg.status(), Some(503));
    assert_eq!(
        msg.header(&HeaderName::Warning),
        Some("399 pbxd \"no media ports free\"")
    );
    assert_eq!(h.ep.active_calls(), 0);
}

fn binding(uri: &str, source: &str, transport: Transport, node_id: u64) -> Binding {
    Binding {
        uri: uri.into(),
        uri_key: uri.into(),
        params: String::new(),
        q: None,
        expires_at_ms: NOW_MS + 60_000,
        call_id: format!("reg-{uri}"),
        cseq: 1,
        instance: None,
        reg_id: None,
        path: Vec::new(),
        source: source.into(),
        transport,
        node_id,
        user_agent: None,
        registered_at_ms: NOW_MS,
    }
}

#[test]
fn contacts_skip_loops_and_non_tls_for_sips_and_say_404_or_480() {
    let mut h = Harness::new(10);
    let user = |u: &str| vec![DialTarget::User(u.into())];
    let c = h.ep.contacts(&h.state, &user("nobody"), false, NOW_MS);
    assert!(c.contacts.is_empty());
    assert_eq!(c.unreachable, 404, "no such user");
    let c = h.ep.contacts(&h.state, &user("bob"), false, NOW_MS);
    assert!(c.contacts.is_empty());
    assert_eq!(c.unreachable, 480, "known, not registered");

    h.state.bindings.insert(
        "bob".into(),
        vec![
            binding("sip:bob@udp", "192.0.2.10:5060", Transport::Udp, 1),
            binding("sip:bob@loop", LOCAL, Transport::Udp, 1),
            binding("sip:bob@tcp-here", "192.0.2.11:40000", Transport::Tcp, 1),
            binding("sip:bob@tls-there", "192.0.2.12:40001", Transport::Tls, 2),
        ],
    );
    let c = h.ep.contacts(&h.state, &user("bob"), false, NOW_MS);
    let dests: Vec<Dest> = c.contacts.iter().map(|c| c.dest).collect();
    assert_eq!(
        dests,
        vec![
            Dest::Udp("192.0.2.10:5060".parse().unwrap()),
            Dest::Conn(0, "192.0.2.11:40000".parse().unwrap(), Transport::Tcp),
            Dest::Peer(2, "192.0.2.12:40001".parse().unwrap(), Transport::Tls),
        ]
    );
    assert_eq!(c.skipped.len(), 1);
    assert_eq!(c.skipped[0].reason, SkipReason::Loop);
    assert_eq!(c.skipped[0].uri, "sip:bob@loop");

    let c = h.ep.contacts(&h.state, &user("bob"), true, NOW_MS);
    assert_eq!(c.contacts.len(), 1, "sips: only the TLS contact");
    assert_eq!(c.contacts[0].uri, "sip:bob@tls-there");
    assert_eq!(
        c.skipped
            .iter()
            .filter(|s| s.reason == SkipReason::NotTls)
            .count(),
        2
    );
    // Expired bindings are not rung.
    let later =
        h.ep.contacts(&h.state, &user("bob"), false, NOW_MS + 61_000);
    assert!(later.contacts.is_empty());
    assert_eq!(later.unreachable, 480);
    // A URI target is located by the driver; it is known.
    let uri = vec![DialTarget::Uri {
        user: "x".into(),
        host: "example.com".into(),
    }];
    assert_eq!(
        h.ep.contacts(&h.state, &uri, false, NOW_MS).unreachable,
        480
    );
}

#[test]
fn a_relayed_call_is_remembered_until_idle_on_virtual_time() {
    let h = Harness::new(10);
    let conn = Link::Conn(3, Transport::Tcp);
    let bye = |call_id: &str| {
        format!(
            "BYE sip:x@pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.50:5062;branch=z9hG4bK{call_id}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:bob@pbx.test>;tag=a\r\nTo: <sip:x@pbx.test>;tag=b\r\n\
             Call-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    };
    // Node 2 sent the phone an INVITE of call r1 over our connection.
    h.ep.note_relayed(h.at(0), 2, &invite("bob", "r1"));
    assert_eq!(h.ep.relayed_calls(), 1);
    match h.feed(1_000, conn, &bye("r1")) {
        Some(Event::Relay {
            node: 2,
            source,
            bytes,
        }) => {
            assert_eq!(source, PHONE.parse::<SocketAddr>().unwrap());
            assert_eq!(bytes, bye("r1"));
        }
        other => panic!("expected a relay, got {other:?}"),
    }
    // Only connections relay (a UDP phone is reached directly).
    assert!(matches!(h.udp(1_500, &bye("r1")), Some(Event::Transmit(_))));
    // Each use restarts the idle time; past it, the call is forgotten.
    let idle = EndpointConfig::DEFAULT_RELAYED_CALL_IDLE.as_millis() as u64;
    assert!(matches!(
        h.feed(1_000 + idle - 1, conn, &bye("r1")),
        Some(Event::Relay { .. })
    ));
    assert!(
        matches!(
            h.feed(1_000 + 2 * idle, conn, &bye("r1")),
            Some(Event::Transmit(_))
        ),
        "forgotten: answered here (481)"
    );
    // Sweeps on the timer forget idle calls nobody asks for.
    h.ep.note_relayed(h.at(0), 2, &invite("bob", "r2"));
    let sweep = h.ep.poll_timeout().expect("a sweep is due");
    assert!(sweep <= h.at(60_000));
    h.ep.handle_timeout(h.at(idle + 60_000));
    assert_eq!(h.ep.relayed_calls(), 0);
}

#[test]
fn unparseable_messages_are_answered_when_they_can_be() {
    let h = Harness::new(10);
    // A request without a Call-ID: 400 from the headers that were readable.
    let t = transmitted(h.udp(
        0,
        b"OPTIONS sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5062;branch=z9hG4bKx\r\n\
          From: <sip:a@pbx.test>;tag=1\r\nTo: <sip:a@pbx.test>\r\nCSeq: 1 OPTIONS\r\n\r\n",
    ));
    assert_eq!(status(&t), 400);
    // Garbage on a stream with no Via: nothing to answer, the stream is out of step.
    assert!(matches!(
        h.feed(0, Link::Conn(1, Transport::Tcp), b"HELLO\r\n\r\n"),
        Some(Event::Unanswerable)
    ));
    // A keep-alive is nothing.
    assert!(h.udp(0, b"\r\n\r\n").is_none());
    // A STUN Binding request (RFC 5626 keep-alive) gets its Binding success.
    let mut stun = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    stun.extend_from_slice(b"txid-0123456");
    let t = transmitted(h.udp(0, &stun));
    assert_eq!(&t.bytes[0..2], &[0x01, 0x01]);
    assert_eq!(&t.bytes[8..20], b"txid-0123456");
}

#[test]
fn a_failed_send_of_a_calls_request_finds_the_call() {
    let h = Harness::new(10);
    h.ep.start_call("c7", 9);
    assert_eq!(h.ep.call_of_unsent(&invite("bob", "c7")), Some(9));
    assert_eq!(h.ep.call_of_unsent(&invite("bob", "other")), None);
}

fn leg(remote_target: &str, peer: &str, transport: Transport) -> pbx_state::LegRecord {
    pbx_state::LegRecord {
        call_id: "c1".into(),
        local: "<sip:bob@pbx.test>;tag=n".into(),
        remote: "<sip:alice@pbx.test>;tag=a".into(),
        remote_target: remote_target.into(),
        route_set: Vec::new(),
        local_cseq: 3,
        remote_cseq: 2,
        peer: peer.into(),
        transport,
        contact: "<sip:pbx@192.0.2.1:5060>".into(),
        sdp_sent: String::new(),
        media_targets: Vec::new(),
        instance: None,
    }
}

#[test]
fn a_resumed_leg_is_reached_where_its_phone_is_connected_now() {
    let mut st = State::default();
    let udp = leg(
        "sip:alice@192.0.2.10:5060",
        "192.0.2.10:5060",
        Transport::Udp,
    );
    let tcp = leg(
        "sip:bob@tcp",
        "192.0.2.11:40000 (TCP) via node 2",
        Transport::Tcp,
    );
    assert_eq!(
        crate::resume_dest(&st, &udp, 3, NOW_MS),
        Some(Dest::Udp("192.0.2.10:5060".parse().unwrap()))
    );
    // bob's connection was held by node 2, which died: not reachable until he registers
    // again through a live node.
    st.bindings.insert(
        "bob".into(),
        vec![binding(
            "sip:bob@tcp",
            "192.0.2.11:40000",
            Transport::Tcp,
            2,
        )],
    );
    let alive = |n: u64| n != 2;
    let legs = [udp.clone(), tcp.clone()];
    assert!(!crate::legs_reachable(&st, &legs, NOW_MS, alive));
    assert!(
        crate::legs_reachable(&st, &legs[..1], NOW_MS, alive),
        "UDP: always"
    );
    // He registered again through node 3 (a new connection, a new port).
    let mut again = binding("sip:bob@tcp", "192.0.2.11:40999", Transport::Tcp, 3);
    again.registered_at_ms = NOW_MS + 1;
    st.bindings.get_mut("bob").unwrap().push(again);
    assert!(crate::legs_reachable(&st, &legs, NOW_MS, alive));
    assert_eq!(
        crate::resume_dest(&st, &tcp, 3, NOW_MS),
        Some(Dest::Conn(
            0,
            "192.0.2.11:40999".parse().unwrap(),
            Transport::Tcp
        )),
        "node 3 holds the new flow"
    );
    assert_eq!(
        crate::resume_dest(&st, &tcp, 1, NOW_MS),
        Some(Dest::Peer(
            3,
            "192.0.2.11:40999".parse().unwrap(),
            Transport::Tcp
        ))
    );
}

#[test]
fn a_resumed_leg_finds_an_outbound_phone_by_its_instance_on_a_new_flow() {
    let mut st = State::default();
    const INSTANCE: &str = "<urn:uuid:00000000-0000-0000-0000-00000000b0b0>";
    let tcp = leg(
        "sip:bob-x@192.0.2.11:40000;transport=tcp;ob",
        "192.0.2.11:40000 (TCP) via node 2",
        Transport::Tcp,
    );
    let mut old = binding(
        "sip:bob-x@192.0.2.11:40000;transport=tcp;ob",
        "192.0.2.11:40000",
        Transport::Tcp,
        2,
    );
    old.instance = Some(INSTANCE.into());
    old.reg_id = Some(1);
    st.bindings.insert("bob".into(), vec![old]);
    // When the call is recorded, its leg is named by the binding's instance.
    let named = pbx_state::LegRecord {
        instance: crate::leg_instance(&st, &tcp, None, NOW_MS),
        ..tcp.clone()
    };
    assert_eq!(named.instance.as_deref(), Some(INSTANCE));
    assert_eq!(
        crate::leg_instance(&State::default(), &tcp, Some(&named), NOW_MS).as_deref(),
        Some(INSTANCE),
        "a later record keeps it when the binding is gone"
    );
    let alive = |n: u64| n != 2;
    assert!(!crate::legs_reachable(
        &st,
        std::slice::from_ref(&named),
        NOW_MS,
        alive
    ));
    // Node 2 died; the phone registers again through node 3 from a new port, with a new
    // Contact: the same instance and reg-id replace the old flow's binding.
    let mut again = binding(
        "sip:bob-x@192.0.2.11:40999;transport=tcp;ob",
        "192.0.2.11:40999",
        Transport::Tcp,
        3,
    );
    again.instance = Some(INSTANCE.into());
    again.reg_id = Some(1);
    st.bindings.insert("bob".into(), vec![again]);
    assert!(crate::legs_reachable(
        &st,
        std::slice::from_ref(&named),
        NOW_MS,
        alive
    ));
    assert_eq!(
        crate::resume_dest(&st, &named, 1, NOW_MS),
        Some(Dest::Peer(
            3,
            "192.0.2.11:40999".parse().unwrap(),
            Transport::Tcp
        ))
    );
    assert!(
        !crate::legs_reachable(&st, &[tcp], NOW_MS, alive),
        "without its instance the leg cannot be matched"
    );
}

#[test]
fn a_standing_commit_queue_sheds_new_work_and_still_serves_running_calls() {
    let h = Harness::with(EndpointConfig {
        overload: crate::OverloadConfig {
            commit_delay_target: Duration::from_millis(50),
            interval: Duration::from_millis(100),
            min_pending: 2,
            ..overload_without_flood_limit()
        },
        ..config(10)
    });
    h.ep.start_call("running", 7);
    // Three REGISTERs wait for their commits, none finishes.
    let tokens: Vec<_> = (1..=3)
        .map(
            |i| match h.authenticated(0, &register(&format!("q{i}"), 1), "alice", "pw") {
                Some(Event::Commit { token, .. }) => token,
                other => panic!("expected a commit, got {other:?}"),
            },
        )
        .collect();
    assert_eq!(h.ep.pending_commits(), 3);
    // An interval later the queue stands: new REGISTERs and INVITEs get 503 at once.
    for (bytes, what) in [
        (register("new", 1), "REGISTER"),
        (invite("bob", "c9"), "INVITE"),
    ] {
        let shed = transmitted(h.udp(150, &bytes));
        let msg = parse(&shed.bytes);
        assert_eq!(msg.status(), Some(503), "{what}");
        assert_eq!(msg.header(&HeaderName::RetryAfter), Some("7"));
        assert!(msg.header(&HeaderName::To).unwrap().contains("tag="));
        assert!(msg
            .header(&HeaderName::parse("Warning"))
            .unwrap()
            .contains("overloaded"));
    }
    // The running call's requests are served.
    let bye = String::from_utf8(invite("bob", "running"))
        .unwrap()
        .replace("INVITE sip:", "BYE sip:")
        .replace("1 INVITE", "2 BYE")
        .replace("To: <sip:bob@pbx.test>", "To: <sip:bob@pbx.test>;tag=t1");
    assert!(matches!(
        h.udp(160, bye.as_bytes()),
        Some(Event::ToCall(7, CallMessage::Request { .. }))
    ));
    // The queue drains: new work is admitted again from the next interval.
    for t in tokens {
        h.ep.commit_done(h.at(170), NOW_MS + 170, t, Err("slow"));
    }
    assert_eq!(h.ep.pending_commits(), 0);
    assert_eq!(status(&transmitted(h.udp(300, &register("new2", 1)))), 401);
    let shed = h.ep.shed_counts();
    assert_eq!((shed.registers, shed.invites), (1, 1));
}

#[test]
fn a_source_flooding_new_requests_is_dropped_and_its_calls_are_not() {
    let h = Harness::with(EndpointConfig {
        overload: crate::OverloadConfig {
            per_source_rate: 2,
            ..crate::OverloadConfig::default()
        },
        ..config(10)
    });
    h.ep.start_call("running", 7);
    // A burst of twice the rate is answered; the rest of the same moment is dropped.
    let answered = (0..10)
        .filter(|i| h.udp(0, &register(&format!("f{i}"), 1)).is_some())
        .count();
    assert_eq!(answered, 4);
    assert_eq!(h.ep.shed_counts().flood_dropped, 6);
    // Tokens come back at the rate.
    assert!(h.udp(100, &register("f10", 1)).is_none());
    assert_eq!(status(&transmitted(h.udp(500, &register("f11", 1)))), 401);
    // A request of a running call from the same source is served.
    let bye = String::from_utf8(invite("bob", "running"))
        .unwrap()
        .replace("INVITE sip:", "BYE sip:")
        .replace("1 INVITE", "2 BYE");
    assert!(matches!(
        h.udp(2, bye.as_bytes()),
        Some(Event::ToCall(7, CallMessage::Request { .. }))
    ));
}

/// An INVITE with Replaces (RFC 3891) starts a call that takes over another call's
/// party, whatever the dialplan says of its extension; a malformed one gets 400.
#[test]
fn an_invite_with_replaces_skips_the_dialplan() {
    let h = Harness::new(10);
    let with = |value: &str, call_id: &str| {
        String::from_utf8(invite("123", call_id))
            .unwrap()
            .replacen(
                "Content-Length: 0",
                &format!("Replaces: {value}\r\nRequire: replaces\r\nContent-Length: 0"),
                1,
            )
            .into_bytes()
    };
    match h.authenticated(
        0,
        &with("abc@host;to-tag=1;from-tag=2", "r1"),
        "alice",
        "pw",
    ) {
        Some(Event::StartCall(new)) => {
            assert_eq!(
                new.replaces,
                Some(pbx_b2bua::Replaces {
                    call_id: "abc@host".into(),
                    to_tag: "1".into(),
                    from_tag: "2".into()
                })
            );
            assert_eq!(new.caller, "alice");
        }
        other => panic!("expected a call, got {other:?}"),
    }
    match h.authenticated(0, &with("abc@host;to-tag=1", "r2"), "alice", "pw") {
        Some(Event::CallRefused {
            transmit: Some(t),
            reason: Refused::BadReplaces,
        }) => assert_eq!(status(&t), 400),
        other => panic!("expected 400, got {other:?}"),
    }
}

fn subscribe(
    mailbox: &str,
    event: &str,
    call_id: &str,
    to_tag: Option<&str>,
    cseq: u32,
    expires: u32,
) -> Vec<u8> {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    format!(
        "SUBSCRIBE sip:{mailbox}@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5062;rport;branch=z9hG4bKs{call_id}{cseq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=f{call_id}\r\nTo: <sip:{mailbox}@pbx.test>{to_tag}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} SUBSCRIBE\r\nContact: <sip:alice@192.0.2.50:5062>\r\n\
         Event: {event}\r\nAccept: application/simple-message-summary\r\nExpires: {expires}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn save_message(h: &mut Harness, mailbox: &str) {
    h.state.apply(Command::Voicemail {
        op: pbx_state::VoicemailOp::Save {
            mailbox: mailbox.into(),
            blob: "ab".into(),
            codec: pbx_state::voicemail::Codec::Pcmu,
            size: 8000,
            duration_ms: 1000,
            caller_id: "bob".into(),
            holders: vec![1, 2],
        },
        now_ms: NOW_MS,
    });
}

/// The NOTIFYs the endpoint queued.
fn notifies(h: &Harness) -> Vec<SipMessage> {
    std::iter::from_fn(|| h.ep.poll_transmit())
        .map(|t| parse(&t.bytes))
        .filter(|m| m.method() == Some(&pbx_sip_msg::Method::Notify))
        .collect()
}

fn answer(h: &Harness, ms: u64, notify: &SipMessage, status: u16) {
    let via = notify.header(&HeaderName::Via).unwrap();
    let response = format!(
        "SIP/2.0 {status} OK\r\nVia: {via}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
        notify.header(&HeaderName::From).unwrap(),
        notify.header(&HeaderName::To).unwrap(),
        notify.header(&HeaderName::CallId).unwrap(),
        notify.header(&HeaderName::CSeq).unwrap(),
    );
    assert!(
        h.udp(ms, response.as_bytes()).is_none(),
        "absorbed by message waiting"
    );
}

fn body(m: &SipMessage) -> String {
    String::from_utf8(m.body.to_vec()).unwrap()
}

/// RFC 3842: the owner subscribes (after a challenge), gets 200 and a NOTIFY with its
/// counts at once, another when a message arrives, and a final one when it
/// unsubscribes; a refresh that is not one of ours is 481.
#[test]
fn a_phone_subscribes_to_its_mailbox_and_its_lamp_follows_the_messages() {
    let mut h = Harness::new(10);
    let ok = transmitted(h.authenticated(
        0,
        &subscribe("alice", "message-summary", "mwi1", None, 1, 600),
        "alice",
        "pw",
    ));
    let ok_msg = parse(&ok.bytes);
    assert_eq!(ok_msg.status(), Some(200));
    assert_eq!(ok_msg.header(&HeaderName::Expires), Some("600"));
    let to_tag = pbx_sip_msg::CoreHeaders::extract(&ok_msg)
        .unwrap()
        .to
        .tag()
        .unwrap()
        .to_string();
    let first = notifies(&h);
    assert_eq!(first.len(), 1);
    let n = &first[0];
    assert_eq!(n.header(&HeaderName::Event), Some("message-summary"));
    assert!(n
        .header(&HeaderName::SubscriptionState)
        .unwrap()
        .starts_with("active;expires="));
    assert_eq!(
        n.header(&HeaderName::ContentType),
        Some("application/simple-message-summary")
    );
    assert!(body(n).contains("Messages-Waiting: no\r\n"));
    assert!(body(n).contains("Message-Account: sip:alice@pbx.test\r\n"));
    assert!(body(n).contains("Voice-Message: 0/0 (0/0)"));
    assert_eq!(n.request_uri(), Some("sip:alice@192.0.2.50:5062"));
    answer(&h, 10, n, 200);

    // A message for alice, taken on whatever node: the lamp lights.
    h.ep.mailboxes_changed(h.at(20), &h.state, NOW_MS);
    assert!(notifies(&h).is_empty(), "nothing changed yet");
    save_message(&mut h, "alice");
    h.ep.mailboxes_changed(h.at(30), &h.state, NOW_MS);
    let lit = notifies(&h);
    assert_eq!(
        lit.len(),
        1,
        "the subscriber only: no unsolicited NOTIFY beside it"
    );
    assert!(body(&lit[0]).contains("Messages-Waiting: yes\r\n"));
    assert!(body(&lit[0]).contains("Voice-Message: 1/0 (0/0)"));
    // Listened to: 0 new, 1 old. The NOTIFY waits for the one in flight.
    h.state.apply(Command::Voicemail {
        op: pbx_state::VoicemailOp::Move {
            mailbox: "alice".into(),
            id: 1,
            folder: pbx_state::voicemail::Folder::Old,
        },
        now_ms: NOW_MS,
    });
    h.ep.mailboxes_changed(h.at(40), &h.state, NOW_MS);
    assert!(notifies(&h).is_empty(), "one NOTIFY at a time");
    answer(&h, 50, &lit[0], 200);
    let off = notifies(&h);
    assert_eq!(off.len(), 1);
    assert!(body(&off[0]).contains(
        "Messages-Waiting: no\r\nMessage-Account: sip:alice@pbx.test\r\nVoice-Message: 0/1 (0/0)"
    ));
    answer(&h, 60, &off[0], 200);

    // Unsubscribe: 200, a final NOTIFY.
    let bye = transmitted(h.udp(
        70,
        &subscribe("alice", "message-summary", "mwi1", Some(&to_tag), 2, 0),
    ));
    assert_eq!(status(&bye), 200);
    let last = notifies(&h);
    assert!(last[0]
        .header(&HeaderName::SubscriptionState)
        .unwrap()
        .starts_with("terminated"));
    answer(&h, 80, &last[0], 200);
    assert_eq!(h.ep.subscriptions(), 0);
    let gone = transmitted(h.udp(
        90,
        &subscribe("alice", "message-summary", "mwi1", Some(&to_tag), 3, 600),
    ));
    assert_eq!(status(&gone), 481);
}

#[test]
fn other_packages_and_other_peoples_mailboxes_are_refused() {
    let h = Harness::new(10);
    let bad = transmitted(h.udp(0, &subscribe("alice", "presence", "p1", None, 1, 600)));
    assert_eq!(status(&bad), 489);
    assert_eq!(
        parse(&bad.bytes).header(&HeaderName::parse("Allow-Events")),
        Some("message-summary")
    );
    let theirs = transmitted(h.authenticated(
        0,
        &subscribe("bob", "message-summary", "p2", None, 1, 600),
        "alice",
        "pw",
    ));
    assert_eq!(status(&theirs), 403);
    assert_eq!(h.ep.subscriptions(), 0);
    // The voicemail number a phone was given means its own mailbox.
    let own = transmitted(h.authenticated(
        0,
        &subscribe("*97", "message-summary", "p3", None, 1, 600),
        "alice",
        "pw",
    ));
    assert_eq!(status(&own), 200);
    assert!(body(&notifies(&h)[0]).contains("Message-Account: sip:alice@pbx.test"));
}

/// A phone registered on this node that does not subscribe gets the NOTIFY
/// unsolicited when its mailbox changes; one registered on another node gets it from
/// there.
#[test]
fn registered_phones_get_unsolicited_notifies() {
    let mut h = Harness::new(10);
    for (user, node) in [("bob", 1), ("carol", 2)] {
        h.state.bindings.insert(
            user.into(),
            vec![Binding {
                uri: format!("sip:{user}@192.0.2.60:5060"),
                uri_key: format!("sip:{user}@192.0.2.60:5060"),
                params: String::new(),
                q: None,
                expires_at_ms: NOW_MS + 3_600_000,
                call_id: format!("r{user}"),
                cseq: 1,
                instance: None,
                reg_id: None,
                path: Vec::new(),
                source: "192.0.2.60:5060".into(),
                transport: Transport::Udp,
                node_id: node,
                user_agent: None,
                registered_at_ms: NOW_MS,
            }],
        );
    }
    h.ep.mailboxes_changed(h.at(0), &h.state, NOW_MS);
    save_message(&mut h, "bob");
    save_message(&mut h, "carol");
    h.ep.mailboxes_changed(h.at(10), &h.state, NOW_MS);
    let sent = notifies(&h);
    assert_eq!(sent.len(), 1, "carol's phone is node 2's to tell");
    assert_eq!(sent[0].request_uri(), Some("sip:bob@192.0.2.60:5060"));
    assert!(body(&sent[0]).contains("Voice-Message: 1/0 (0/0)"));
    answer(&h, 20, &sent[0], 200);
    // bob's phone registers again (it rebooted): told at once; carol's is node 2's.
    let again = h.ep.registered(h.at(30), "bob", NOW_MS, || &h.state);
    assert_eq!(again.len(), 1);
    assert!(String::from_utf8_lossy(&again[0].bytes).contains("Messages-Waiting: yes"));
    assert!(h
        .ep
        .registered(h.at(30), "carol", NOW_MS, || &h.state)
        .is_empty());
    // alice has no message: a REGISTER sends nothing.
    assert!(h
        .ep
        .registered(h.at(30), "alice", NOW_MS, || &h.state)
        .is_empty());
}
