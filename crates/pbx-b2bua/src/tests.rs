//! The call state machine driven with messages and a clock, no sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_dialplan::{CallerId, DialTarget, Dialplan, Execution, DEMO_DIALPLAN};
use pbx_media_core::{Mode, Side};
use pbx_sip_core::{Timers, TransactionKey};
use pbx_sip_msg::{parse_datagram, CoreHeaders, HeaderName, Limits, Method, SipMessage};
use pbx_state::Transport;

use crate::{Call, CallParams, Contact, Destination, MediaNotice, MediaOp, MediaPorts, Output};

mod transfer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Udp(SocketAddr);

impl Destination for Udp {
    fn transport(&self) -> Transport {
        Transport::Udp
    }
    fn describe(&self) -> String {
        self.0.to_string()
    }
}

const ALICE: &str = "127.0.0.1:5061";
const BOB1: &str = "127.0.0.2:5062";
const BOB2: &str = "127.0.0.3:5063";
const SDP_A: &str = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
const SDP_B: &str = "v=0\r\no=bob 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn parse(b: &[u8]) -> (SipMessage, CoreHeaders) {
    let m = parse_datagram(b, &Limits::default()).unwrap();
    let c = CoreHeaders::extract(&m).unwrap();
    (m, c)
}

fn key(m: &SipMessage, c: &CoreHeaders) -> TransactionKey {
    TransactionKey::for_request(m.method().unwrap(), m.request_uri().unwrap(), c)
}

fn invite(exten: &str, body: &str) -> Vec<u8> {
    format!(
        "INVITE sip:{exten}@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {ALICE};branch=z9hG4bKa1;rport\r\n\
         Max-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@pbx.test>;tag=at\r\nTo: <sip:{exten}@pbx.test>\r\n\
         Call-ID: a-call\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{ALICE}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A response to a request we captured, as its recipient would send it.
fn response_to(req: &[u8], status: u16, to_tag: &str, contact: &str, body: &str) -> Vec<u8> {
    let (m, _) = parse(req);
    let mut out = format!("SIP/2.0 {status} X\r\n");
    for n in [HeaderName::Via, HeaderName::From] {
        for v in m.header_values(&n) {
            out.push_str(&format!("{}: {v}\r\n", n.as_str()));
        }
    }
    let to = m.header(&HeaderName::To).unwrap();
    if status > 100 && !to.contains("tag=") {
        out.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    } else {
        out.push_str(&format!("To: {to}\r\n"));
    }
    for n in [HeaderName::CallId, HeaderName::CSeq] {
        out.push_str(&format!("{}: {}\r\n", n.as_str(), m.header(&n).unwrap()));
    }
    out.push_str(&format!("Contact: <sip:x@{contact}>\r\n"));
    if !body.is_empty() {
        out.push_str("Content-Type: application/sdp\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

struct Harness {
    call: Call<Udp>,
    now: Instant,
    out: Vec<Output<Udp>>,
}

impl Harness {
    fn start(exten: &str, body: &str) -> Harness {
        Self::start_with(exten, body, DEMO_DIALPLAN)
    }

    fn start_with(exten: &str, body: &str, plan: &str) -> Harness {
        Self::start_relayed(exten, body, plan, true)
    }

    /// `relay`: false for a node configured without the media relay.
    fn start_relayed(exten: &str, body: &str, plan: &str, relay: bool) -> Harness {
        Self::start_as("a-call", exten, body, plan, relay)
    }

    /// A call whose INVITE has the Call-ID `call_id`.
    fn start_as(call_id: &str, exten: &str, body: &str, plan: &str, relay: bool) -> Harness {
        Self::start_full(call_id, exten, body, plan, relay, None)
    }

    /// `replaces`: an INVITE with Replaces ([`Call::replacing`]).
    fn start_full(
        call_id: &str,
        exten: &str,
        body: &str,
        plan: &str,
        relay: bool,
        replaces: Option<crate::Replaces>,
    ) -> Harness {
        let now = Instant::now();
        let plan = Arc::new(Dialplan::parse(plan).unwrap());
        let exec = Execution::start(
            plan,
            "default",
            exten,
            CallerId {
                num: "alice".into(),
                name: "Alice".into(),
            },
        )
        .unwrap();
        let bytes = String::from_utf8(invite(exten, body))
            .unwrap()
            .replace("Call-ID: a-call\r\n", &format!("Call-ID: {call_id}\r\n"));
        let (m, c) = parse(bytes.as_bytes());
        let params = CallParams {
            node_id: 1,
            local: addr("127.0.0.11:5060"),
            tls_local: Some(addr("127.0.0.11:5061")),
            domain: "pbx.test".into(),
            server_name: "pbxd".into(),
            timers: Timers::default(),
            // Another call gets other Call-IDs and tags, as on a node.
            seed: if call_id == "a-call" { 0xabc } else { 0xdef },
            media: relay.then(|| MediaPorts {
                ip: "127.0.0.11".parse().unwrap(),
                streams: vec![(40000, 40002)],
            }),
            caller_user: "alice".into(),
            now_ms: 1_000,
            timezone: "UTC".into(),
        };
        let call = match replaces {
            Some(r) => Call::replacing(
                now,
                params,
                &m,
                &c,
                key(&m, &c),
                addr(ALICE),
                Udp(addr(ALICE)),
                exec,
                r,
            ),
            None => Call::new(
                now,
                params,
                &m,
                &c,
                key(&m, &c),
                addr(ALICE),
                Udp(addr(ALICE)),
                exec,
            ),
        };
        let mut h = Harness {
            call,
            now,
            out: Vec::new(),
        };
        h.drain();
        h
    }

    fn drain(&mut self) {
        while let Some(o) = self.call.poll_output() {
            self.out.push(o);
        }
    }

    fn take(&mut self) -> Vec<Output<Udp>> {
        self.drain();
        std::mem::take(&mut self.out)
    }

    /// Statuses answered to server transactions, in order.
    fn responses(out: &[Output<Udp>]) -> Vec<u16> {
        out.iter()
            .filter_map(|o| match o {
                Output::Respond { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }

    /// Requests sent to `to`, by method.
    fn sent(out: &[Output<Udp>], to: &str) -> Vec<(Method, Bytes)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { dest, bytes } if dest.0 == addr(to) => {
                    let m = parse_datagram(bytes, &Limits::default()).ok()?;
                    Some((m.method()?.clone(), bytes.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether a `method` request was sent to `to`.
    fn sends(out: &[Output<Udp>], to: &str, method: Method) -> bool {
        Self::sent(out, to).iter().any(|(m, _)| *m == method)
    }

    fn resolve(&mut self, contacts: &[&str]) {
        let list = contacts
            .iter()
            .map(|a| Contact {
                uri: format!("sip:bob@{a}"),
                dest: Udp(addr(a)),
                route: vec![],
                user: "bob".into(),
                alternates: vec![],
                domain: None,
            })
            .collect();
        self.call.on_resolved(self.now, list, 480);
        self.drain();
    }

    fn response(&mut self, bytes: &[u8]) {
        let (m, c) = parse(bytes);
        self.call.on_response(self.now, &m, &c);
        self.drain();
    }

    fn request(&mut self, bytes: &[u8], from: &str) {
        let (m, c) = parse(bytes);
        let k = key(&m, &c);
        self.call.on_request(self.now, &m, &c, k, addr(from));
        self.drain();
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.call.poll_timeout() {
            if t > end {
                break;
            }
            self.now = t.max(self.now);
            self.call.handle_timeout(self.now);
            self.drain();
        }
        self.now = end;
    }
}

fn in_dialog(method: &str, cseq: u32, from_a_to_pbx: &str, call_id: &str, body: &str) -> Vec<u8> {
    let ct = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/sdp\r\n".into()
    };
    format!(
        "{method} sip:pbx@127.0.0.11:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {ALICE};branch=z9hG4bK{method}{cseq};rport\r\n\
         Max-Forwards: 70\r\n{from_a_to_pbx}Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// From/To of a request alice sends in her dialog with the node, given the To tag the
/// node put on its 2xx.
fn alice_headers(pbx_tag: &str) -> String {
    format!(
        "From: \"Alice\" <sip:alice@pbx.test>;tag=at\r\nTo: <sip:bob@pbx.test>;tag={pbx_tag}\r\n"
    )
}

fn to_tag_of(bytes: &Bytes) -> String {
    let (_, c) = parse(bytes);
    c.to.tag().unwrap().to_string()
}

fn final_to_a(out: &[Output<Udp>]) -> Option<(u16, Bytes)> {
    out.iter().find_map(|o| match o {
        Output::Respond { status, bytes, .. } if *status >= 200 => Some((*status, bytes.clone())),
        _ => None,
    })
}

#[test]
fn parallel_fork_first_answer_wins_and_the_other_is_cancelled() {
    let mut h = Harness::start("bob", SDP_A);
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![100]);
    assert!(out.contains(&Output::Resolve(vec![DialTarget::User("bob".into())])));
    h.resolve(&[BOB1, BOB2]);
    let out = h.take();
    let inv1 = Harness::sent(&out, BOB1);
    let inv2 = Harness::sent(&out, BOB2);
    assert_eq!(inv1.len(), 1);
    assert_eq!(inv2.len(), 1);
    let (m1, c1) = parse(&inv1[0].1);
    assert_eq!(m1.request_uri(), Some("sip:bob@127.0.0.2:5062"));
    assert_eq!(
        c1.max_forwards,
        Some(69),
        "Max-Forwards decremented across the B2BUA"
    );
    assert_ne!(c1.call_id, "a-call", "a B-leg is a dialog of its own");
    let body = String::from_utf8_lossy(&m1.body);
    assert!(
        body.contains("c=IN IP4 127.0.0.11"),
        "offer anchored: {body}"
    );
    assert!(body.contains("m=audio 40002 "), "B side port: {body}");

    // bob1 rings: the caller hears it once.
    h.response(&response_to(&inv1[0].1, 180, "b1", BOB1, ""));
    assert_eq!(Harness::responses(&h.take()), vec![180]);
    h.response(&response_to(&inv2[0].1, 180, "b2", BOB2, ""));
    assert_eq!(Harness::responses(&h.take()), Vec::<u16>::new());

    // bob2 answers.
    h.response(&response_to(&inv2[0].1, 200, "b2", BOB2, SDP_B));
    let out = h.take();
    let to_b2 = Harness::sent(&out, BOB2);
    assert_eq!(to_b2.len(), 1);
    assert_eq!(to_b2[0].0, Method::Ack);
    let to_b1 = Harness::sent(&out, BOB1);
    assert_eq!(to_b1.len(), 1);
    assert_eq!(to_b1[0].0, Method::Cancel, "the losing leg is cancelled");
    let (status, ok) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    let (okm, _) = parse(&ok);
    let body = String::from_utf8_lossy(&okm.body);
    assert!(body.contains("m=audio 40000 "), "A side port: {body}");
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.2:7000"))
    })));
    assert!(out.contains(&Output::Media(MediaOp::Mode(Mode::Bridge))));
    let record = out.iter().find_map(|o| match o {
        Output::Record(r) => Some(r.clone()),
        _ => None,
    });
    let record = record.expect("answered call recorded");
    assert_eq!(record.owner, 1);
    assert_eq!(record.legs.len(), 2);
    assert_eq!(record.legs[1].remote_target, "sip:x@127.0.0.3:5063");

    // The cancelled leg ends with 487, which gets its ACK.
    let (cm, _) = parse(&to_b1[0].1);
    assert_eq!(cm.header(&HeaderName::CSeq), Some("1 CANCEL"));
    h.response(&response_to(&to_b1[0].1, 200, "b1", BOB1, ""));
    h.response(&response_to(&inv1[0].1, 487, "b1", BOB1, ""));
    let acks = Harness::sent(&h.take(), BOB1);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].0, Method::Ack);

    // No ACK from alice yet: the 2xx is retransmitted after T1.
    h.advance(Duration::from_millis(600));
    let out = h.take();
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Send { dest, .. } if dest.0 == addr(ALICE))),
        "2xx retransmitted"
    );
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.advance(Duration::from_secs(2));
    assert!(h.take().is_empty(), "ACK stops the retransmissions");

    // alice hangs up: 200 to her, BYE to bob2.
    h.request(
        &in_dialog("BYE", 2, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    let bye = Harness::sent(&out, BOB2);
    assert_eq!(bye[0].0, Method::Bye);
    let (bm, bc) = parse(&bye[0].1);
    assert_eq!(
        bm.request_uri(),
        Some("sip:x@127.0.0.3:5063"),
        "to bob2's Contact"
    );
    assert_eq!(bc.to.tag(), Some("b2"));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Ended {
            cause: 16,
            answered: true
        }
    )));
    h.response(&response_to(&bye[0].1, 200, "b2", BOB2, ""));
    h.advance(Duration::from_secs(40));
    assert!(h.call.is_done());
}

#[test]
fn busy_callee_sets_dialstatus_and_the_plan_answers_486() {
    let plan = "[default]\nexten => bob,1,Dial(SIP/bob)\n \
                same => n,GotoIf($[\"${DIALSTATUS}\" = \"BUSY\"]?busy)\n \
                same => n,Congestion()\n same => n(busy),Busy()\n";
    let mut h = Harness::start_with("bob", SDP_A, plan);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 486, "b1", BOB1, ""));
    let out = h.take();
    assert_eq!(Harness::sent(&out, BOB1)[0].0, Method::Ack);
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(486));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Ended {
            cause: 17,
            answered: false
        }
    )));
    assert!(
        h.call.caller_done(),
        "a phone retrying with the same Call-ID starts a new call"
    );
}

/// The demo plan: a busy user takes a message after its busy greeting.
#[test]
fn the_demo_plan_sends_a_busy_callee_to_voicemail() {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 486, "b1", BOB1, ""));
    let out = h.take();
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(200));
    assert!(out.contains(&Output::Voicemail(crate::VmRequest::Open {
        mailbox: "bob".into()
    })));
    h.call
        .on_voicemail(h.now, crate::VmReply::Mailbox(Some(Box::default())));
    assert!(h.take().iter().any(|o| matches!(o,
        Output::Media(MediaOp::Play { prompts, .. }) if prompts.contains(&"vm-isonphone".to_string())
    )));
}

#[test]
fn no_answer_times_out_cancels_and_the_plan_hangs_up_480() {
    let plan = "[default]\nexten => bob,1,Dial(SIP/bob,5)\n same => n,Hangup(${IF($[\"${DIALSTATUS}\" = \"NOANSWER\"]?19:34)})\n";
    let mut h = Harness::start_with("bob", SDP_A, plan);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 180, "b1", BOB1, ""));
    h.take();
    h.advance(Duration::from_secs(6));
    let out = h.take();
    assert_eq!(Harness::sent(&out, BOB1).last().unwrap().0, Method::Cancel);
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(480));
}

#[test]
fn unregistered_or_unknown_user_gets_the_plans_answer() {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.call.on_resolved(h.now, vec![], 404);
    let out = h.take();
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(404));
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.resolve(&[]);
    assert_eq!(final_to_a(&h.take()).map(|f| f.0), Some(480));
}

#[test]
fn caller_cancel_ends_the_call_and_cancels_ringing_legs() {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.resolve(&[BOB1, BOB2]);
    let out = h.take();
    let inv1 = Harness::sent(&out, BOB1);
    let inv2 = Harness::sent(&out, BOB2);
    h.response(&response_to(&inv1[0].1, 180, "b1", BOB1, ""));
    h.take();
    let cancel = format!(
        "CANCEL sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {ALICE};branch=z9hG4bKa1;rport\r\n\
         Max-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@pbx.test>;tag=at\r\nTo: <sip:bob@pbx.test>\r\n\
         Call-ID: a-call\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    );
    h.request(cancel.as_bytes(), ALICE);
    let out = h.take();
    let out_cancel = out.clone();
    assert_eq!(Harness::responses(&out), vec![200, 487]);
    assert_eq!(Harness::sent(&out, BOB1)[0].0, Method::Cancel);
    assert!(
        Harness::sent(&out, BOB2).is_empty(),
        "a leg without a provisional is cancelled only once it answers (§9.1)"
    );
    // bob2 now rings: the CANCEL goes out at once.
    h.response(&response_to(&inv2[0].1, 180, "b2", BOB2, ""));
    let out = h.take();
    assert_eq!(Harness::sent(&out, BOB2)[0].0, Method::Cancel);
    assert_eq!(
        Harness::responses(&out),
        Vec::<u16>::new(),
        "nothing more to alice"
    );
    assert!(h.call.is_ended());
    // The CANCEL is answered; the call stays until the INVITE's 487 got its ACK.
    let cancel1 = Harness::sent(&out_cancel, BOB1);
    h.response(&response_to(&cancel1[0].1, 200, "b1", BOB1, ""));
    assert!(
        !h.call.is_done(),
        "the 487 is still to come and to be ACKed"
    );
    h.response(&response_to(&inv1[0].1, 487, "b1", BOB1, ""));
    assert_eq!(Harness::sent(&h.take(), BOB1)[0].0, Method::Ack);
}

#[test]
fn echo_test_answers_itself_plays_then_echoes() {
    let mut h = Harness::start("600", SDP_A);
    let out = h.take();
    let (status, ok) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    let (m, _) = parse(&ok);
    let body = String::from_utf8_lossy(&m.body);
    assert!(body.contains("m=audio 40000 RTP/AVP 0"), "{body}");
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::A,
        addr: Some(addr("127.0.0.1:6000"))
    })));
    assert!(out.contains(&Output::Media(MediaOp::Play {
        stream: 0,
        prompts: vec!["beep".into()],
        payload_type: 0
    })));
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    assert!(h.take().contains(&Output::Media(MediaOp::Mode(Mode::Echo))));
    // A dead phone is hung up.
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.call.on_media(h.now, MediaNotice::NoMedia);
    let out = h.take();
    assert_eq!(Harness::sent(&out, ALICE)[0].0, Method::Bye);
}

/// alice calls bob, bob1 answers: the harness and the node's tag in alice's dialog.
fn bridged_with_bob1() -> (Harness, String) {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 200, "b1", BOB1, SDP_B));
    let (_, ok) = final_to_a(&h.take()).unwrap();
    let tag = to_tag_of(&ok);
    (h, tag)
}

#[test]
fn reinvite_is_relayed_with_sdp_anchored_both_ways() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();

    // alice moves (a new port): relayed. (A hold is answered by the node itself.)
    let moved = SDP_A.replace("m=audio 6000 ", "m=audio 6002 ");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &moved),
        ALICE,
    );
    let out = h.take();
    let reinv = Harness::sent(&out, BOB1);
    assert_eq!(reinv[0].0, Method::Invite);
    let (rm, rc) = parse(&reinv[0].1);
    assert_eq!(rc.cseq.seq, 2);
    assert_eq!(rc.to.tag(), Some("b1"));
    let body = String::from_utf8_lossy(&rm.body);
    assert!(
        body.contains("a=sendrecv") && body.contains("m=audio 40002 "),
        "{body}"
    );
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::A,
        addr: Some(addr("127.0.0.1:6002"))
    })));
    assert!(
        body.contains("o=pbxd 2748 2 "),
        "version grows on a changed offer: {body}"
    );

    let answer = SDP_B.replace("m=audio 7000 ", "m=audio 7002 ");
    h.response(&response_to(&reinv[0].1, 200, "b1", BOB1, &answer));
    let out = h.take();
    assert_eq!(Harness::sent(&out, BOB1)[0].0, Method::Ack);
    let (status, resp) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    let (m, c) = parse(&resp);
    assert_eq!(c.cseq.seq, 2);
    let body = String::from_utf8_lossy(&m.body);
    assert!(
        body.contains("a=sendrecv") && body.contains("m=audio 40000 "),
        "{body}"
    );
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.2:7002"))
    })));

    // bob hangs up: BYE to alice.
    let bob_bye = format!(
        "BYE sip:pbx@127.0.0.11:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {BOB1};branch=z9hG4bKbb;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:bob@pbx.test>;tag=b1\r\nTo: {};\r\nCall-ID: {}\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
        rc.from.raw, rc.call_id
    )
    .replace(";\r\nCall-ID", "\r\nCall-ID");
    h.request(bob_bye.as_bytes(), BOB1);
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    let bye = Harness::sent(&out, ALICE);
    assert_eq!(bye[0].0, Method::Bye);
    let (bm, bc) = parse(&bye[0].1);
    assert_eq!(bm.request_uri(), Some("sip:alice@127.0.0.1:5061"));
    assert_eq!(bc.from.tag(), Some(tag.as_str()));
    assert_eq!(bc.to.tag(), Some("at"));
}

#[test]
fn in_dialog_requests_with_a_wrong_tag_or_old_cseq_are_refused() {
    let mut h = Harness::start("600", SDP_A);
    let (_, ok) = final_to_a(&h.take()).unwrap();
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("INFO", 2, &alice_headers("nope"), "a-call", ""),
        ALICE,
    );
    assert_eq!(Harness::responses(&h.take()), vec![481]);
    h.request(
        &in_dialog("INFO", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    assert_eq!(Harness::responses(&h.take()), vec![500]);
    h.request(
        &in_dialog("OPTIONS", 3, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    assert_eq!(Harness::responses(&h.take()), vec![200]);
}

#[test]
fn info_is_relayed_to_the_bridged_leg_and_its_answer_comes_back() {
    let (mut h, tag) = bridged_with_bob1();
    let info = String::from_utf8(in_dialog("INFO", 2, &alice_headers(&tag), "a-call", ""))
        .unwrap()
        .replace(
            "Content-Length: 0\r\n\r\n",
            "Content-Type: application/dtmf-relay\r\nContent-Length: 24\r\n\r\nSignal=5\r\nDuration=160\r\n",
        );
    h.request(info.as_bytes(), ALICE);
    let out = h.take();
    assert!(
        Harness::responses(&out).is_empty(),
        "answered when bob answers"
    );
    let relayed = Harness::sent(&out, BOB1);
    assert_eq!(relayed[0].0, Method::Info);
    let (m, c) = parse(&relayed[0].1);
    assert_eq!(
        m.header(&HeaderName::ContentType),
        Some("application/dtmf-relay")
    );
    assert_eq!(&m.body[..], b"Signal=5\r\nDuration=160\r\n");
    assert_eq!(c.to.tag(), Some("b1"));
    h.response(&response_to(&relayed[0].1, 200, "b1", BOB1, ""));
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    let (status, resp) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    let (_, rc) = parse(&resp);
    assert_eq!(rc.cseq.method, Method::Info);
    assert_eq!(rc.cseq.seq, 2);
}

#[test]
fn an_operator_hangup_sends_bye_both_ways_and_ends_the_answered_call() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    h.call.hangup_now(h.now, 16);
    let out = h.take();
    let to_alice = Harness::sent(&out, ALICE);
    let to_bob = Harness::sent(&out, BOB1);
    assert_eq!(to_alice[0].0, Method::Bye);
    assert_eq!(to_bob[0].0, Method::Bye);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Ended {
                cause: 16,
                answered: true
            }
        )),
        "ended, answered, with the operator's cause"
    );
    assert!(!h.call.is_done(), "the BYE transactions run on");
    for (peer, bye) in [(ALICE, &to_alice), (BOB1, &to_bob)] {
        let (_, c) = parse(&bye[0].1);
        let tag = c.to.tag().unwrap_or_default().to_string();
        h.response(&response_to(&bye[0].1, 200, &tag, peer, ""));
    }
    h.advance(Duration::from_secs(40));
    assert!(h.call.is_done());
}

/// A call to bob@provider.test, resolved to `first` with `next` as alternate.
fn dial_provider(first: &str, next: &str) -> Harness {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.call.on_resolved(
        h.now,
        vec![Contact {
            uri: "sip:bob@provider.test".into(),
            dest: Udp(addr(first)),
            route: vec![],
            user: "bob".into(),
            alternates: vec![Udp(addr(next))],
            domain: Some("provider.test".into()),
        }],
        480,
    );
    h
}

#[test]
fn a_silent_or_503_target_fails_over_to_the_next_alternate() {
    // Dial(SIP/bob@provider.test): resolved to two servers (RFC 3263 order).
    const P1: &str = "127.0.0.21:5060";
    const P2: &str = "127.0.0.22:5060";
    let mut h = dial_provider(P1, P2);
    let out = h.take();
    let first = Harness::sent(&out, P1);
    assert_eq!(first[0].0, Method::Invite);
    let (m, c) = parse(&first[0].1);
    assert_eq!(m.request_uri(), Some("sip:bob@provider.test"));
    assert!(c.to.raw.contains("sip:bob@provider.test"), "{}", c.to.raw);
    // P1 stays silent: after FAILOVER_SILENCE the same request goes to P2, and P1 is
    // reported (dead-target memory) and no longer retransmitted to.
    h.advance(crate::FAILOVER_SILENCE + Duration::from_millis(1));
    let out = h.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::TargetFailed(d) if d.0 == addr(P1))));
    let second = Harness::sent(&out, P2);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].0, Method::Invite);
    h.advance(Duration::from_secs(2));
    assert!(Harness::sent(&h.take(), P1).is_empty(), "P1 given up");
    // P2 answers: the caller gets the answer.
    h.response(&response_to(&second[0].1, 200, "p2", P2, SDP_B));
    let (status, _) = final_to_a(&h.take()).unwrap();
    assert_eq!(status, 200);

    // A 503 moves on at once.
    let mut h = dial_provider(P1, P2);
    let first = Harness::sent(&h.take(), P1);
    h.response(&response_to(&first[0].1, 503, "p1", P1, ""));
    let out = h.take();
    assert_eq!(Harness::sent(&out, P2)[0].0, Method::Invite);
    // The last one failing too ends the Dial like any failure (503 → CONGESTION).
    let second = Harness::sent(&out, P2);
    h.response(&response_to(&second[0].1, 503, "p2", P2, ""));
    let out = h.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::TargetFailed(d) if d.0 == addr(P2))));
}

#[test]
fn a_transport_error_fails_over_at_once_and_only_for_a_leg_still_trying() {
    const P1: &str = "127.0.0.21:5060";
    const P2: &str = "127.0.0.22:5060";
    let mut h = dial_provider(P1, P2);
    assert_eq!(Harness::sent(&h.take(), P1)[0].0, Method::Invite);
    // Connection refused to P1: P2 gets the INVITE now, not after FAILOVER_SILENCE.
    h.call.on_transport_error(h.now, &Udp(addr(P1)));
    let out = h.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::TargetFailed(d) if d.0 == addr(P1))));
    let second = Harness::sent(&out, P2);
    assert_eq!(second[0].0, Method::Invite);
    // P2 rings: a late error about P1 (or one about P2 once it answered) changes nothing.
    h.response(&response_to(&second[0].1, 180, "p2", P2, ""));
    h.take();
    h.call.on_transport_error(h.now, &Udp(addr(P1)));
    h.call.on_transport_error(h.now, &Udp(addr(P2)));
    let out = h.take();
    assert!(
        !out.iter().any(|o| matches!(o, Output::TargetFailed(_))),
        "{out:?}"
    );
    h.response(&response_to(&second[0].1, 200, "p2", P2, SDP_B));
    assert_eq!(final_to_a(&h.take()).unwrap().0, 200);
}

#[test]
fn a_tls_leg_names_the_tls_listener_in_via_and_contact() {
    let l = crate::dialog::Local {
        addr: addr("127.0.0.11:5060"),
        tls_addr: Some(addr("127.0.0.11:5061")),
    };
    assert!(l
        .via(Transport::Tls, "z9hG4bKx")
        .starts_with("SIP/2.0/TLS 127.0.0.11:5061;"));
    assert_eq!(
        l.contact(Transport::Tls),
        "<sip:pbx@127.0.0.11:5061;transport=tls>"
    );
    assert!(l
        .via(Transport::Tcp, "z9hG4bKx")
        .starts_with("SIP/2.0/TCP 127.0.0.11:5060;"));
    assert_eq!(l.contact(Transport::Udp), "<sip:pbx@127.0.0.11:5060>");
}

/// The record a bridged call replicates, taken from its outputs.
fn record_of(out: &[Output<Udp>]) -> pbx_state::CallRecord {
    out.iter()
        .rev()
        .find_map(|o| match o {
            Output::Record(r) => Some((**r).clone()),
            _ => None,
        })
        .expect("a record")
}

fn resumed_on_node_2(record: &pbx_state::CallRecord) -> Harness {
    let mut record = record.clone();
    record.owner = 2;
    record.epoch = 1;
    record.history.push((1, 5_000));
    let params = CallParams {
        node_id: 2,
        local: addr("127.0.0.12:5060"),
        tls_local: None,
        domain: "pbx.test".into(),
        server_name: "pbxd".into(),
        timers: Timers::default(),
        seed: 0xdef0000,
        media: Some(MediaPorts {
            ip: "127.0.0.12".parse().unwrap(),
            streams: vec![(41000, 41002)],
        }),
        caller_user: record.caller.clone(),
        now_ms: 9_000,
        timezone: "UTC".into(),
    };
    let dests = record
        .legs
        .iter()
        .map(|l| Udp(l.peer.parse().unwrap()))
        .collect();
    let now = Instant::now();
    let call = Call::resume(now, params, &record, dests).unwrap();
    let mut h = Harness {
        call,
        now,
        out: Vec::new(),
    };
    h.drain();
    h
}

#[test]
fn a_bridged_call_is_resumed_on_another_node_by_one_reinvite_per_leg() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    // alice puts bob on hold (answered by the node, music to bob): what the record
    // says of alice's leg changes, so it is recorded again.
    let hold = SDP_A.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let record = record_of(&h.take());
    assert_eq!((record.owner, record.epoch), (1, 0));
    assert_eq!(record.activity, pbx_state::Activity::Bridged);
    assert_eq!(record.legs.len(), 2);
    let (a, b) = (&record.legs[0], &record.legs[1]);
    assert!(a.sdp_sent.contains("a=recvonly") && a.sdp_sent.contains("o=pbxd 2748 2 "));
    assert!(b.sdp_sent.contains("a=sendrecv") && b.sdp_sent.contains("o=pbxd 2748 1 "));
    assert_eq!(a.media_targets, vec![Some(addr("127.0.0.1:6000"))]);
    assert_eq!(b.media_targets, vec![Some(addr("127.0.0.2:7000"))]);
    assert_eq!(a.contact, "<sip:pbx@127.0.0.11:5060>");

    // Node 2 takes the call over.
    let mut n2 = resumed_on_node_2(&record);
    let out = n2.take();
    let claims: Vec<&String> = out
        .iter()
        .filter_map(|o| match o {
            Output::ClaimCallId(id) => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(claims, [&b.call_id], "the caller's is routed by the driver");
    let remotes: Vec<(Side, Option<SocketAddr>)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Media(MediaOp::Remote { side, addr, .. }) => Some((*side, *addr)),
            _ => None,
        })
        .collect();
    assert_eq!(
        remotes,
        [
            (Side::A, Some(addr("127.0.0.1:6000"))),
            (Side::B, Some(addr("127.0.0.2:7000")))
        ],
        "media flows at once where each side was"
    );
    assert!(out.contains(&Output::Media(MediaOp::Mode(Mode::Bridge))));
    assert!(
        out.contains(&Output::Media(MediaOp::Music {
            stream: 0,
            side: Side::B,
            class: "default".into(),
            payload_type: 0
        })),
        "still on hold: bob hears music from the adopter"
    );
    let to_alice = Harness::sent(&out, ALICE);
    let to_bob = Harness::sent(&out, BOB1);
    assert_eq!(
        (to_alice.len(), to_bob.len()),
        (1, 1),
        "one re-INVITE per leg"
    );
    let (am, ac) = parse(&to_alice[0].1);
    assert_eq!(am.method(), Some(&Method::Invite));
    assert_eq!(am.request_uri(), Some("sip:alice@127.0.0.1:5061"));
    assert_eq!(
        (ac.from.tag(), ac.to.tag()),
        (Some(tag.as_str()), Some("at"))
    );
    assert_eq!(ac.call_id, "a-call");
    assert_eq!(ac.cseq.seq, a.local_cseq + pbx_state::CSEQ_HEADROOM + 1);
    assert_eq!(
        am.header(&HeaderName::Contact),
        Some("<sip:pbx@127.0.0.12:5060>"),
        "target refresh to the adopter"
    );
    let body = String::from_utf8_lossy(&am.body);
    assert!(
        body.contains("o=pbxd 2748 3 IN IP4 127.0.0.12")
            && body.contains("m=audio 41000 ")
            && body.contains("a=recvonly"),
        "same session, next version, the adopter's relay, the direction kept: {body}"
    );
    let (bm, bc) = parse(&to_bob[0].1);
    assert_eq!(
        (bc.to.tag(), bc.call_id.as_str()),
        (Some("b1"), b.call_id.as_str())
    );
    assert!(bc.cseq.seq > b.local_cseq + pbx_state::CSEQ_HEADROOM);
    let body = String::from_utf8_lossy(&bm.body);
    assert!(
        body.contains("m=audio 41002 ") && body.contains("a=sendrecv"),
        "{body}"
    );
    // Recorded at once with the new contact and descriptions.
    let r2 = record_of(&out);
    assert_eq!((r2.owner, r2.epoch), (2, 1));
    assert_eq!(r2.legs[0].contact, "<sip:pbx@127.0.0.12:5060>");
    assert!(r2.legs[0].local_cseq > a.local_cseq + pbx_state::CSEQ_HEADROOM);

    // Both answer (alice from a new port): ACKed, the relay learns.
    let alice_moved = SDP_A.replace("6000", "6100");
    n2.response(&response_to(&to_alice[0].1, 200, "at", ALICE, &alice_moved));
    n2.response(&response_to(&to_bob[0].1, 200, "b1", BOB1, SDP_B));
    let out = n2.take();
    assert_eq!(Harness::sent(&out, ALICE)[0].0, Method::Ack);
    assert_eq!(Harness::sent(&out, BOB1)[0].0, Method::Ack);
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::A,
        addr: Some(addr("127.0.0.1:6100")),
    })));

    // alice hangs up on node 2: bob gets a BYE above the re-INVITE's CSeq.
    n2.request(
        &in_dialog("BYE", 3, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = n2.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    let bye = Harness::sent(&out, BOB1);
    assert_eq!(bye[0].0, Method::Bye);
    assert_eq!(parse(&bye[0].1).1.cseq.seq, bc.cseq.seq + 1);
    assert!(out.contains(&Output::Ended {
        cause: 16,
        answered: true
    }));
}

#[test]
fn a_leg_refusing_the_move_ends_the_call_cleanly() {
    let mut h = Harness::start("bob", SDP_A);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 200, "b1", BOB1, SDP_B));
    let record = record_of(&h.take());
    let mut n2 = resumed_on_node_2(&record);
    let out = n2.take();
    let to_bob = Harness::sent(&out, BOB1);
    let to_alice = Harness::sent(&out, ALICE);
    n2.response(&response_to(&to_alice[0].1, 200, "at", ALICE, SDP_A));
    n2.take();
    n2.response(&response_to(&to_bob[0].1, 488, "b1", BOB1, ""));
    let out = n2.take();
    assert_eq!(Harness::sent(&out, ALICE)[0].0, Method::Bye);
    assert!(Harness::sent(&out, BOB1)
        .iter()
        .any(|(m, _)| *m == Method::Bye));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Ended { answered: true, .. })));

    // Glare: 491 is tried again later, not the end of the call.
    let mut n2 = resumed_on_node_2(&record);
    let out = n2.take();
    let to_alice = Harness::sent(&out, ALICE);
    n2.response(&response_to(&to_alice[0].1, 491, "at", ALICE, ""));
    assert!(Harness::sent(&n2.take(), ALICE)
        .iter()
        .all(|(m, _)| *m == Method::Ack));
    n2.advance(Duration::from_millis(1200));
    let again = Harness::sent(&n2.take(), ALICE);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, Method::Invite);

    // Silence from a leg: Timer B, then the call ends.
    let mut n2 = resumed_on_node_2(&record);
    n2.take();
    n2.advance(Duration::from_secs(40));
    let out = n2.take();
    assert!(Harness::sent(&out, ALICE)
        .iter()
        .any(|(m, _)| *m == Method::Bye));
}

#[test]
fn a_call_inside_an_application_is_ended_not_replayed() {
    let mut h = Harness::start("600", SDP_A);
    h.take();
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    let record = record_of(&h.take());
    assert_eq!(
        record.activity,
        pbx_state::Activity::Application("Echo".into())
    );
    assert_eq!(record.legs.len(), 1);
    // Echo is stateless: moved by one re-INVITE to the caller, echoing on node 2.
    let mut n2 = resumed_on_node_2(&record);
    let out = n2.take();
    assert!(out.contains(&Output::Media(MediaOp::Mode(Mode::Echo))));
    assert_eq!(Harness::sent(&out, ALICE)[0].0, Method::Invite);

    let mut playing = record.clone();
    playing.activity = pbx_state::Activity::Application("Playback".into());
    let mut n2 = resumed_on_node_2(&playing);
    let out = n2.take();
    assert_eq!(Harness::sent(&out, ALICE)[0].0, Method::Bye);
    assert!(out.contains(&Output::Ended {
        cause: 41,
        answered: true
    }));
}

const IVR_PLAN: &str = "[default]\n\
    exten => 800,1,Background(hello-world)\n \
     same => n,WaitExten(4)\n\
    exten => 1,1,Playback(beep)\n \
     same => n,Hangup(17)\n\
    exten => 2,1,Read(CODE,beep,3)\n \
     same => n,Hangup(${CODE})\n\
    exten => i,1,Hangup(1)\n\
    exten => t,1,Hangup(18)\n";

const SDP_A_DTMF: &str = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 96\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 telephone-event/8000\r\na=fmtp:96 0-16\r\n";

/// The caller reaches the IVR: answered, its keys asked for at the payload type of its
/// offer, the welcome prompt playing. The harness and the node's tag.
fn in_ivr() -> (Harness, String) {
    let mut h = Harness::start_with("800", SDP_A_DTMF, IVR_PLAN);
    let out = h.take();
    let (status, ok) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&parse(&ok).0.body).to_string();
    assert!(body.contains("a=rtpmap:96 telephone-event/8000"), "{body}");
    assert!(out.contains(&Output::Media(MediaOp::DetectDtmf {
        stream: 0,
        side: Side::A,
        payload_type: 96
    })));
    assert!(out.contains(&Output::Media(MediaOp::Play {
        stream: 0,
        prompts: vec!["hello-world".into()],
        payload_type: 0
    })));
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    (h, tag)
}

/// The BYE the node sends the caller when the plan hangs up, with its Reason cause.
fn hung_up_with(out: &[Output<Udp>]) -> Option<u16> {
    out.iter().find_map(|o| match o {
        Output::Ended { cause, .. } => Some(*cause),
        _ => None,
    })
}

#[test]
fn a_key_interrupts_the_ivr_prompt_and_chooses_the_extension() {
    let (mut h, _) = in_ivr();
    h.call.on_media(h.now, MediaNotice::Digit(Side::A, '1'));
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert!(out.contains(&Output::Media(MediaOp::Play {
        stream: 0,
        prompts: vec!["beep".into()],
        payload_type: 0
    })));
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    assert_eq!(hung_up_with(&h.take()), Some(17));
}

#[test]
fn silence_reaches_t_and_a_wrong_key_reaches_i() {
    let (mut h, _) = in_ivr();
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    assert_eq!(hung_up_with(&h.take()), None, "WaitExten waits");
    h.advance(Duration::from_secs(3));
    assert_eq!(hung_up_with(&h.take()), None);
    h.advance(Duration::from_secs(2));
    assert_eq!(hung_up_with(&h.take()), Some(18));

    let (mut h, _) = in_ivr();
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    h.call.on_media(h.now, MediaNotice::Digit(Side::A, '7'));
    assert_eq!(hung_up_with(&h.take()), Some(1));
}

#[test]
fn keys_sent_as_sip_info_work_like_rtp_events() {
    let (mut h, tag) = in_ivr();
    let info = |cseq: u32, ct: &str, body: &str| {
        format!(
            "INFO sip:pbx@127.0.0.11:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {ALICE};branch=z9hG4bKinfo{cseq};rport\r\n\
             Max-Forwards: 70\r\n{}Call-ID: a-call\r\nCSeq: {cseq} INFO\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            alice_headers(&tag),
            body.len()
        )
        .into_bytes()
    };
    h.request(
        &info(2, "application/dtmf-relay", "Signal=2\r\nDuration=160\r\n"),
        ALICE,
    );
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    // Read(CODE,beep,3): the prompt, then three keys (one as application/dtmf).
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    h.request(&info(3, "application/dtmf-relay", "Signal= 4\r\n"), ALICE);
    h.request(&info(4, "application/dtmf", "8"), ALICE);
    h.call.on_media(h.now, MediaNotice::Digit(Side::A, '6'));
    assert_eq!(hung_up_with(&h.take()), Some(486));
}

#[test]
fn sip_info_keys_are_parsed_as_phones_send_them() {
    use crate::call::info_digit;
    assert_eq!(
        info_digit("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n"),
        Some('5')
    );
    assert_eq!(
        info_digit("Application/DTMF-Relay; x=y", b"signal = #\r\n"),
        Some('#')
    );
    assert_eq!(
        info_digit("application/dtmf-relay", b"Signal=11\r\n"),
        Some('#')
    );
    assert_eq!(info_digit("application/dtmf", b"*"), Some('*'));
    assert_eq!(info_digit("application/dtmf", b"x"), None);
    assert_eq!(info_digit("text/plain", b"Signal=5"), None);
    assert_eq!(info_digit("application/dtmf-relay", b"Duration=160"), None);
}

/// A 200 to alice for a re-INVITE, its body.
fn answer_to_a(out: &[Output<Udp>]) -> String {
    let (status, resp) = final_to_a(out).expect("an answer to alice");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&parse(&resp).0.body).into_owned()
}

#[test]
fn hold_is_answered_here_with_music_to_the_other_party_and_resume_bridges_again() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    let hold = SDP_A.replace(
        "a=rtpmap:0 PCMU/8000\r\n",
        "a=rtpmap:0 PCMU/8000\r\na=sendonly\r\n",
    );
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let out = h.take();
    assert!(
        Harness::sent(&out, BOB1).is_empty(),
        "bob never sees the hold"
    );
    let body = answer_to_a(&out);
    assert!(
        body.contains("a=recvonly") && body.contains("m=audio 40000 "),
        "{body}"
    );
    assert!(body.contains("o=pbxd 2748 2 "), "a new version: {body}");
    assert!(out.contains(&Output::Media(MediaOp::Music {
        stream: 0,
        side: Side::B,
        class: "default".into(),
        payload_type: 0
    })));
    // A refresh while held: still on hold, no second music.
    h.request(
        &in_dialog("INVITE", 3, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let out = h.take();
    assert!(answer_to_a(&out).contains("a=recvonly"));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { .. }))));
    // Resume: answered here again, music stopped, bob still sees nothing.
    h.request(
        &in_dialog("INVITE", 4, &alice_headers(&tag), "a-call", SDP_A),
        ALICE,
    );
    let out = h.take();
    assert!(Harness::sent(&out, BOB1).is_empty());
    let body = answer_to_a(&out);
    assert!(
        body.contains("a=sendrecv") && !body.contains("recvonly"),
        "{body}"
    );
    assert!(
        body.contains("o=pbxd 2748 3 "),
        "the refresh kept version 2: {body}"
    );
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    // Inactive (and the old c=0.0.0.0) hold too, answered inactive.
    let old_hold = SDP_A.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
    h.request(
        &in_dialog("INVITE", 5, &alice_headers(&tag), "a-call", &old_hold),
        ALICE,
    );
    let out = h.take();
    assert!(answer_to_a(&out).contains("a=inactive"));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::B, .. }))));
}

#[test]
fn music_on_hold_plays_to_the_caller_for_its_duration() {
    let plan = "[default]\nexten => 900,1,MusicOnHold(,3)\n same => n,Hangup(17)\n";
    let mut h = Harness::start_with("900", SDP_A, plan);
    let out = h.take();
    assert_eq!(final_to_a(&out).unwrap().0, 200);
    assert!(out.contains(&Output::Media(MediaOp::Music {
        stream: 0,
        side: Side::A,
        class: "default".into(),
        payload_type: 0
    })));
    h.advance(Duration::from_secs(2));
    assert_eq!(hung_up_with(&h.take()), None);
    h.advance(Duration::from_secs(2));
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert_eq!(hung_up_with(&out), Some(17));
}

#[test]
fn a_held_call_moved_to_another_node_is_resumed_there() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    let hold = SDP_A.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let record = record_of(&h.take());
    let mut n2 = resumed_on_node_2(&record);
    let out = n2.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::B, .. }))));
    // The moving re-INVITEs answered; then alice takes the call back from hold.
    for (to, who) in [(ALICE, "at"), (BOB1, "b1")] {
        let reinv = Harness::sent(&out, to);
        n2.response(&response_to(
            &reinv[0].1,
            200,
            who,
            to,
            if to == ALICE { &hold } else { SDP_B },
        ));
    }
    n2.take();
    let a_cseq = record.legs[0].remote_cseq + 1;
    n2.request(
        &in_dialog("INVITE", a_cseq, &alice_headers(&tag), "a-call", SDP_A),
        ALICE,
    );
    let out = n2.take();
    assert!(Harness::sent(&out, BOB1).is_empty());
    let body = answer_to_a(&out);
    assert!(
        body.contains("a=sendrecv") && body.contains("m=audio 41000 "),
        "{body}"
    );
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
}

#[test]
fn waitexten_m_plays_music_until_the_first_key() {
    let plan = IVR_PLAN.replace("WaitExten(4)", "WaitExten(4,m(jazz))");
    let mut h = Harness::start_with("800", SDP_A_DTMF, &plan);
    h.take();
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::Music {
        stream: 0,
        side: Side::A,
        class: "jazz".into(),
        payload_type: 0
    })));
    h.call.on_media(h.now, MediaNotice::Digit(Side::A, '1'));
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert!(out.contains(&Output::Media(MediaOp::Play {
        stream: 0,
        prompts: vec!["beep".into()],
        payload_type: 0
    })));
    // Silence instead: the music stops when t is taken.
    let mut h = Harness::start_with("800", SDP_A_DTMF, &plan);
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    h.take();
    h.advance(Duration::from_secs(5));
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert_eq!(hung_up_with(&out), Some(18));
    assert!(pbx_dialplan::Dialplan::parse("[a]\nexten => s,1,WaitExten(3,x)\n").is_err());
}

#[test]
fn a_resume_without_sdp_gets_our_offer_and_stops_the_music() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let hold = SDP_A.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    h.take();
    h.request(
        &in_dialog("INVITE", 3, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = h.take();
    assert!(Harness::sent(&out, BOB1).is_empty());
    let body = answer_to_a(&out);
    assert!(
        body.contains("a=sendrecv") && body.contains("o=pbxd 2748 3 "),
        "{body}"
    );
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
}

#[test]
fn without_the_relay_a_hold_is_relayed_to_the_other_party() {
    let mut h = Harness::start_relayed("bob", SDP_A, DEMO_DIALPLAN, false);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 200, "b1", BOB1, SDP_B));
    let (_, ok) = final_to_a(&h.take()).unwrap();
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    let hold = SDP_A.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let out = h.take();
    let reinv = Harness::sent(&out, BOB1);
    assert_eq!(reinv.len(), 1, "relayed: the node has no media to play");
    assert!(String::from_utf8_lossy(&parse(&reinv[0].1).0.body).contains("a=sendonly"));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { .. }))));
}

#[test]
fn the_nodes_own_answer_follows_a_hold_and_keeps_its_version_when_nothing_changes() {
    let (mut h, tag) = in_ivr();
    let first = "o=pbxd 2748 1 ";
    let hold = SDP_A_DTMF.replace("a=fmtp:96 0-16\r\n", "a=fmtp:96 0-16\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let body = answer_to_a(&h.take());
    assert!(
        body.contains("a=recvonly") && body.contains("o=pbxd 2748 2 "),
        "{body}"
    );
    // The same offer again (a session refresh): the same answer, the same version.
    h.request(
        &in_dialog("INVITE", 3, &alice_headers(&tag), "a-call", &hold),
        ALICE,
    );
    let again = answer_to_a(&h.take());
    assert_eq!(again, body);
    assert!(!again.contains(first));
    // Taken back: sendrecv, the next version.
    h.request(
        &in_dialog("INVITE", 4, &alice_headers(&tag), "a-call", SDP_A_DTMF),
        ALICE,
    );
    let body = answer_to_a(&h.take());
    assert!(
        body.contains("a=sendrecv") && body.contains("o=pbxd 2748 3 "),
        "{body}"
    );
}

#[test]
fn both_parties_holding_hear_no_music_and_one_resume_gives_the_other_music() {
    let (mut h, tag) = bridged_with_bob1();
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.take();
    // alice holds: music to bob.
    let hold_a = SDP_A.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(
        &in_dialog("INVITE", 2, &alice_headers(&tag), "a-call", &hold_a),
        ALICE,
    );
    let out = h.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::B, .. }))));
    // bob holds too: nobody wants media, the music stops.
    let inv = Harness::sent(&out, BOB1);
    assert!(inv.is_empty());
    let b = record_of(&out).legs[1].clone();
    let bob_req = |cseq: u32, body: &str| {
        format!(
            "INVITE sip:pbx@127.0.0.11:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {BOB1};branch=z9hG4bKbh{cseq};rport\r\n\
             Max-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\n\
             Call-ID: {}\r\nCSeq: {cseq} INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            b.remote,
            b.local,
            b.call_id,
            body.len()
        )
        .into_bytes()
    };
    let hold_b = SDP_B.replace("PCMU/8000\r\n", "PCMU/8000\r\na=sendonly\r\n");
    h.request(&bob_req(10, &hold_b), BOB1);
    let out = h.take();
    assert!(
        out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })),
        "{out:?}"
    );
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { .. }))));
    // alice resumes while bob still holds: now alice hears the music.
    h.request(
        &in_dialog("INVITE", 3, &alice_headers(&tag), "a-call", SDP_A),
        ALICE,
    );
    let out = h.take();
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::A, .. }))));
    // bob resumes: bridged, music stopped.
    h.request(&bob_req(11, SDP_B), BOB1);
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { .. }))));
}

const VM_PLAN: &str = "[default]\nexten => 500,1,VoiceMail(1002,s)\n same => n,Log(NOTICE,vm ${VMSTATUS})\n same => n,Hangup()\n";

/// The call side of VoiceMail: answered, the mailbox asked of the driver, the greeting
/// played, the recording asked of the relay after the tone; a caller hanging up while
/// recording leaves its message to be stored before the call's end (the driver takes
/// the recording from the relay before the end stops it).
#[test]
fn voicemail_records_after_the_tone_and_a_hang_up_stores_the_message() {
    use crate::{Recorded, VmReply, VmRequest};
    let mut h = Harness::start_with("500", SDP_A, VM_PLAN);
    let out = h.take();
    let (status, ok) = final_to_a(&out).unwrap();
    assert_eq!(status, 200);
    assert!(out.contains(&Output::Voicemail(VmRequest::Open {
        mailbox: "1002".into()
    })));
    let tag = to_tag_of(&ok);
    h.request(
        &in_dialog("ACK", 1, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    h.call.on_voicemail(
        h.now,
        VmReply::Mailbox(Some(Box::new(pbx_state::voicemail::Mailbox::default()))),
    );
    let greeting = h.take();
    assert!(greeting.iter().any(|o| matches!(o,
        Output::Media(MediaOp::Play { prompts, payload_type: 0, .. })
            if prompts.first().map(String::as_str) == Some("vm-theperson")
                && !prompts.contains(&"vm-intro".to_string())
    )));
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    assert!(h.take().contains(&Output::Media(MediaOp::Play {
        stream: 0,
        prompts: vec!["beep".into()],
        payload_type: 0
    })));
    h.call.on_media(h.now, MediaNotice::PlaybackDone);
    assert!(h.take().contains(&Output::Media(MediaOp::Record {
        stream: 0,
        side: Side::A,
        payload_type: 0,
        max_bytes: 300 * 8000
    })));
    h.request(
        &in_dialog("BYE", 2, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = h.take();
    let store = out
        .iter()
        .position(|o| {
            matches!(
                o,
                Output::Voicemail(VmRequest::Store {
                    what: Recorded::Message { .. },
                    ..
                })
            )
        })
        .expect("the message is stored");
    let ended = out
        .iter()
        .position(|o| matches!(o, Output::Ended { .. }))
        .expect("the call ends");
    assert!(store < ended, "stored before the end stops the relay");
}

/// A mailbox that does not exist: VMSTATUS=FAILED, the plan goes on (as Asterisk).
#[test]
fn voicemail_to_no_such_mailbox_fails_and_the_plan_goes_on() {
    use crate::VmReply;
    let mut h = Harness::start_with("500", SDP_A, VM_PLAN);
    h.take();
    h.call.on_voicemail(h.now, VmReply::Mailbox(None));
    let out = h.take();
    assert!(out.iter().any(|o| matches!(o,
        Output::Log { message, .. } if message == "vm FAILED")));
    assert!(hung_up_with(&out).is_some());
}
