//! Blind transfer by REFER, driven with messages and a clock.

use super::*;
use pbx_sip_msg::NameAddr;

const CAROL: &str = "127.0.0.4:5064";
const SDP_C: &str = "v=0\r\no=carol 1 1 IN IP4 127.0.0.4\r\ns=-\r\nc=IN IP4 127.0.0.4\r\nt=0 0\r\nm=audio 8000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

/// alice calls bob (bob1 answers); returns the harness, the tag of alice's dialog
/// and the INVITE bob got.
fn connected() -> (Harness, String, Bytes) {
    let mut h = Harness::start("bob", SDP_A);
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
    (h, tag, inv[0].1.clone())
}

/// From/To and Call-ID of a request bob sends in his dialog with the node.
fn bob_dialog(invite_to_bob: &[u8]) -> (String, String) {
    let (m, c) = parse(invite_to_bob);
    let ours = m.header(&HeaderName::From).unwrap();
    let to = m.header(&HeaderName::To).unwrap();
    (
        format!("From: {to};tag=b1\r\nTo: {ours}\r\n"),
        c.call_id.clone(),
    )
}

fn refer(cseq: u32, dialog: &str, call_id: &str, refer_to: &str, extra: &str) -> Vec<u8> {
    let req = in_dialog("REFER", cseq, dialog, call_id, "");
    let text = String::from_utf8(req).unwrap();
    text.replacen(
        "Content-Length: 0",
        &format!("Refer-To: {refer_to}\r\n{extra}Content-Length: 0"),
        1,
    )
    .into_bytes()
}

/// The dialplan at `exten` in [default], as the driver would answer Output::Route.
fn route_to(h: &mut Harness, exten: &str, caller: &str) {
    let out = h.take();
    let routed = out.iter().find_map(|o| match o {
        Output::Route {
            user,
            exten,
            caller,
        } => Some((user.clone(), exten.clone(), caller.clone())),
        _ => None,
    });
    let (_, asked, who) = routed.expect("the call asks for the target's route");
    assert_eq!(asked, exten);
    assert_eq!(who.num, caller);
    let plan = Arc::new(Dialplan::parse(DEMO_DIALPLAN).unwrap());
    let exec = Execution::start(plan, "default", exten, who).map_err(|e| e.to_string());
    h.out = out;
    h.call.on_route(h.now, exec);
    h.drain();
}

fn carol_contact() -> Vec<Contact<Udp>> {
    vec![Contact {
        uri: format!("sip:carol@{CAROL}"),
        dest: Udp(addr(CAROL)),
        route: vec![],
        user: "carol".into(),
        alternates: vec![],
        domain: None,
    }]
}

fn notify_frags(out: &[Output<Udp>], to: &str) -> Vec<(String, String)> {
    Harness::sent(out, to)
        .into_iter()
        .filter(|(m, _)| *m == Method::Notify)
        .map(|(_, b)| {
            let (m, _) = parse(&b);
            assert_eq!(m.header(&HeaderName::Event).unwrap(), "refer;id=2");
            assert!(
                m.header(&HeaderName::Contact).is_some(),
                "NOTIFY has a Contact"
            );
            assert_eq!(
                m.header(&HeaderName::ContentType).unwrap(),
                "message/sipfrag;version=2.0"
            );
            (
                String::from_utf8_lossy(&m.body).trim().to_string(),
                m.header(&HeaderName::SubscriptionState)
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

fn ok_to(req: &Bytes, from: &str) -> Vec<u8> {
    response_to(req, 200, "x", from, "")
}

#[test]
fn the_callee_transfers_the_caller_blind_and_leaves() {
    let (mut h, _, inv) = connected();
    let (bob, bob_call) = bob_dialog(&inv);
    h.request(&refer(2, &bob, &bob_call, "<sip:carol@pbx.test>", ""), BOB1);
    route_to(&mut h, "carol", "alice");
    let out = h.take();
    assert!(Harness::responses(&out).contains(&202));
    assert_eq!(
        notify_frags(&out, BOB1),
        vec![(
            "SIP/2.0 100 Trying".to_string(),
            "active;expires=300".to_string()
        )]
    );
    // alice hears music while carol rings.
    assert!(out.contains(&Output::Media(MediaOp::Music {
        stream: 0,
        side: Side::A,
        class: "default".into(),
        payload_type: 0
    })));
    assert!(out.contains(&Output::Resolve(vec![DialTarget::User("carol".into())])));
    h.call.on_resolved(h.now, carol_contact(), 480);
    let inv_c = Harness::sent(&h.take(), CAROL);
    assert_eq!(inv_c[0].0, Method::Invite);
    let (m, _) = parse(&inv_c[0].1);
    let offer = String::from_utf8_lossy(&m.body).into_owned();
    assert!(
        offer.contains("m=audio 40002 ") && offer.contains("a=sendrecv"),
        "{offer}"
    );
    assert!(m.header(&HeaderName::From).unwrap().contains("sip:alice@"));
    // Nothing is sent to alice: no new description for her.
    h.response(&response_to(&inv_c[0].1, 200, "c1", CAROL, SDP_C));
    let out = h.take();
    assert!(Harness::sent(&out, ALICE).is_empty(), "{out:?}");
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.4:8000")),
    })));
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    let notify = Harness::sent(&out, BOB1);
    assert_eq!(
        notify_frags(&out, BOB1),
        vec![(
            "SIP/2.0 200 OK".to_string(),
            "terminated;reason=noresource".to_string()
        )]
    );
    let rec = record_of(&out);
    assert_eq!(rec.id, "a-call");
    assert_eq!(rec.legs.len(), 2);
    assert_eq!(rec.legs[1].remote_target, format!("sip:x@{CAROL}"));
    assert_eq!(rec.callee, "carol");
    // bob answers the NOTIFY and does not hang up himself: the node does, a little
    // later.
    h.response(&ok_to(&notify[0].1, BOB1));
    assert!(Harness::sent(&h.take(), BOB1).is_empty());
    h.advance(Duration::from_millis(2100));
    let byes: Vec<_> = Harness::sent(&h.take(), BOB1)
        .into_iter()
        .filter(|(m, _)| *m == Method::Bye)
        .collect();
    assert_eq!(byes.len(), 1);
}

#[test]
fn a_failed_transfer_puts_the_parties_back_together() {
    let (mut h, tag, inv) = connected();
    let (bob, bob_call) = bob_dialog(&inv);
    h.request(&refer(2, &bob, &bob_call, "sip:carol@pbx.test", ""), BOB1);
    route_to(&mut h, "carol", "alice");
    h.take();
    h.call.on_resolved(h.now, carol_contact(), 480);
    let inv_c = Harness::sent(&h.take(), CAROL);
    h.response(&response_to(&inv_c[0].1, 486, "c1", CAROL, ""));
    let out = h.take();
    assert_eq!(
        notify_frags(&out, BOB1).last().unwrap(),
        &(
            "SIP/2.0 486 Busy Here".to_string(),
            "terminated;reason=noresource".to_string()
        )
    );
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.2:7000")),
    })));
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert!(
        !Harness::sends(&out, BOB1, Method::Bye),
        "bob keeps the call"
    );
    assert!(hung_up_with(&out).is_none());
    // Bridged again: alice's BYE reaches bob.
    h.request(
        &in_dialog("BYE", 2, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = h.take();
    assert!(Harness::sends(&out, BOB1, Method::Bye));
}

#[test]
fn the_caller_transfers_the_callee_who_becomes_the_first_party() {
    let (mut h, tag, inv) = connected();
    h.request(
        &refer(
            2,
            &alice_headers(&tag),
            "a-call",
            "<sip:carol@pbx.test>",
            "Refer-Sub: false\r\n",
        ),
        ALICE,
    );
    route_to(&mut h, "carol", "bob");
    let out = h.take();
    let accepted = out.iter().find_map(|o| match o {
        Output::Respond {
            status: 202, bytes, ..
        } => Some(bytes.clone()),
        _ => None,
    });
    let (m, _) = parse(&accepted.expect("202"));
    assert_eq!(m.header(&HeaderName::ReferSub), Some("false"));
    assert!(out.contains(&Output::Media(MediaOp::SwapSides)));
    assert!(Harness::sent(&out, ALICE).is_empty(), "no NOTIFY asked for");
    h.call.on_resolved(h.now, carol_contact(), 480);
    let inv_c = Harness::sent(&h.take(), CAROL);
    let (m, _) = parse(&inv_c[0].1);
    assert!(m.header(&HeaderName::From).unwrap().contains("sip:bob@"));
    // The offer is at the port alice's side had: bob is side A now.
    assert!(String::from_utf8_lossy(&m.body).contains("m=audio 40000 "));
    h.response(&response_to(&inv_c[0].1, 200, "c1", CAROL, SDP_C));
    let out = h.take();
    h.advance(Duration::from_millis(2100));
    let bye = Harness::sent(&h.take(), ALICE);
    assert_eq!(bye.len(), 1, "alice, told nothing, is hung up");
    assert_eq!(bye[0].0, Method::Bye);
    let rec = record_of(&out);
    assert_eq!(rec.id, "a-call", "the call keeps its id");
    assert_eq!(rec.caller, "bob");
    assert_eq!(rec.legs[0].call_id, bob_dialog(&inv).1);
    assert_eq!(h.call.id(), "a-call");
    // bob's BYE ends the call: carol gets one.
    let (bob, bob_call) = bob_dialog(&inv);
    h.request(&in_dialog("BYE", 3, &bob, &bob_call, ""), BOB1);
    let out = h.take();
    assert!(Harness::sends(&out, CAROL, Method::Bye));
    assert_eq!(hung_up_with(&out), Some(16));
}

#[test]
fn a_transfer_to_an_application_completes_when_it_takes_the_call() {
    let (mut h, _, inv) = connected();
    let (bob, bob_call) = bob_dialog(&inv);
    h.request(&refer(2, &bob, &bob_call, "<sip:700@pbx.test>", ""), BOB1);
    route_to(&mut h, "700", "alice");
    let out = h.take();
    let frags: Vec<String> = notify_frags(&out, BOB1).into_iter().map(|f| f.0).collect();
    assert_eq!(frags, vec!["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Media(MediaOp::Play { prompts, payload_type: 0, .. }) if prompts == &["hello-world".to_string()]
    )));
}

#[test]
fn refers_the_node_cannot_carry_out_are_refused() {
    let (mut h, tag, inv) = connected();
    let (bob, bob_call) = bob_dialog(&inv);
    // A Replaces without its tags.
    h.request(
        &refer(
            2,
            &bob,
            &bob_call,
            "<sip:carol@pbx.test?Replaces=x%3Bto-tag%3D1>",
            "",
        ),
        BOB1,
    );
    assert_eq!(Harness::responses(&h.take()), vec![400]);
    // No Refer-To.
    h.request(&in_dialog("REFER", 3, &bob, &bob_call, ""), BOB1);
    assert_eq!(Harness::responses(&h.take()), vec![400]);
    // No such extension: the route lookup fails.
    h.request(
        &refer(4, &bob, &bob_call, "<sip:nobody@pbx.test>", ""),
        BOB1,
    );
    h.take();
    h.call.on_route(h.now, Err("no extension".into()));
    assert_eq!(Harness::responses(&h.take()), vec![404]);
    // A stray NOTIFY: no subscription of ours.
    h.request(
        &in_dialog("NOTIFY", 2, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    assert_eq!(Harness::responses(&h.take()), vec![481]);
}

#[test]
fn a_refer_outside_a_bridge_is_forbidden() {
    let (mut h, tag) = in_ivr();
    h.request(
        &refer(
            5,
            &format!("From: \"Alice\" <sip:alice@pbx.test>;tag=at\r\nTo: <sip:800@pbx.test>;tag={tag}\r\n"),
            "a-call",
            "<sip:carol@pbx.test>",
            "",
        ),
        ALICE,
    );
    assert_eq!(Harness::responses(&h.take()), vec![403]);
}

/// alice, in a call with bob, calls carol (a second call), then transfers bob to carol
/// with REFER + Replaces naming her dialog with the node in the call to carol.
#[test]
fn an_attended_transfer_joins_the_other_parties_of_two_calls() {
    let (mut one, tag1, inv_bob) = connected();
    let mut two = Harness::start_as("a-call-2", "carol", SDP_A, DEMO_DIALPLAN, true);
    two.take();
    two.call.on_resolved(two.now, carol_contact(), 480);
    let inv_c = Harness::sent(&two.take(), CAROL);
    two.response(&response_to(&inv_c[0].1, 200, "c1", CAROL, SDP_C));
    let (_, ok) = final_to_a(&two.take()).unwrap();
    let tag2 = to_tag_of(&ok);

    let replaces = format!("a-call-2%3Bto-tag%3D{tag2}%3Bfrom-tag%3Dat");
    one.request(
        &refer(
            2,
            &alice_headers(&tag1),
            "a-call",
            &format!("<sip:carol@pbx.test?Replaces={replaces}>"),
            "",
        ),
        ALICE,
    );
    let out = one.take();
    let asked = out.iter().find_map(|o| match o {
        Output::Replace(r) => Some(r.clone()),
        _ => None,
    });
    let asked = asked.expect("the call asks for the replaced dialog's party");
    assert_eq!(
        asked,
        crate::Replaces {
            call_id: "a-call-2".into(),
            to_tag: tag2.clone(),
            from_tag: "at".into()
        }
    );
    // The other call hands carol over and hangs alice up there, not carol.
    let handed = two.call.hand_over(two.now, &asked).expect("handed over");
    let out2 = two.take();
    assert!(
        Harness::sent(&out2, CAROL).is_empty(),
        "carol is not hung up"
    );
    assert!(Harness::sends(&out2, ALICE, Method::Bye));
    assert_eq!(hung_up_with(&out2), Some(16));

    one.call.on_handover(one.now, Ok(handed));
    let out = one.take();
    assert!(Harness::responses(&out).contains(&202));
    assert!(out.contains(&Output::Media(MediaOp::SwapSides)));
    let (m, c) = parse(&inv_c[0].1);
    assert!(out.contains(&Output::ClaimCallId(c.call_id.clone())));
    let _ = m;
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.4:8000")),
    })));
    // carol is moved to this call's relay by a re-INVITE in her dialog.
    let reinvite = Harness::sent(&out, CAROL);
    assert_eq!(reinvite.len(), 1);
    assert_eq!(reinvite[0].0, Method::Invite);
    let (m, c) = parse(&reinvite[0].1);
    assert_eq!(c.cseq.seq, 2, "carol's dialog goes on");
    let body = String::from_utf8_lossy(&m.body).into_owned();
    assert!(body.contains("m=audio 40000 "), "bob's old side: {body}");
    assert_eq!(
        notify_frags(&out, ALICE),
        vec![(
            "SIP/2.0 200 OK".to_string(),
            "terminated;reason=noresource".to_string()
        )]
    );
    let rec = record_of(&out);
    assert_eq!(rec.legs.len(), 2);
    assert_eq!(rec.legs[0].call_id, bob_dialog(&inv_bob).1);
    assert_eq!(rec.legs[1].call_id, parse(&inv_c[0].1).1.call_id);
    one.response(&response_to(&reinvite[0].1, 200, "c1", CAROL, SDP_C));
    assert!(Harness::sends(&one.take(), CAROL, Method::Ack));
    // carol's BYE ends the call: bob gets one.
    let carol_bye = format!(
        "BYE sip:pbx@127.0.0.11:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {CAROL};branch=z9hG4bKcb\r\n\
         Max-Forwards: 70\r\nFrom: {};tag=c1\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
        c.to.raw.split(';').next().unwrap(),
        c.from.raw,
        c.call_id
    );
    one.request(carol_bye.as_bytes(), CAROL);
    let out = one.take();
    assert!(Harness::responses(&out).contains(&200));
    assert!(Harness::sends(&out, BOB1, Method::Bye));
}

#[test]
fn an_attended_transfer_the_other_call_refuses_is_answered_403() {
    let (mut one, tag1, _) = connected();
    one.request(
        &refer(
            2,
            &alice_headers(&tag1),
            "a-call",
            "<sip:carol@pbx.test?Replaces=elsewhere%3Bto-tag%3D1%3Bfrom-tag%3D2>",
            "",
        ),
        ALICE,
    );
    one.take();
    one.call
        .on_handover(one.now, Err("no such call on this node".into()));
    let out = one.take();
    assert_eq!(Harness::responses(&out), vec![403]);
    // Still connected to bob.
    assert!(Harness::sent(&out, BOB1).is_empty());
    // And the other side of a hand-over checks the tags.
    let (mut two, tag2, _) = connected();
    let wrong = crate::Replaces {
        call_id: "a-call".into(),
        to_tag: tag2,
        from_tag: "not-alice".into(),
    };
    assert!(two.call.hand_over(two.now, &wrong).is_err());
    assert!(Harness::sent(&two.take(), ALICE).is_empty());
}

const TRANSFER_PLAN: &str = "[default]\n\
    exten => 850,1,Transfer(SIP/carol)\n\
    exten => 851,1,Answer()\n same => n,Transfer(carol)\n \
    same => n,Log(NOTICE,transfer ${TRANSFERSTATUS} ${TRANSFERSTATUSPROTOCOL})\n same => n,Hangup()\n";

fn logs(out: &[Output<Udp>]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Log { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// A NOTIFY alice's phone sends about the REFER it got (its sipfrag `status`).
fn alice_notify(cseq: u32, pbx_tag: &str, status: &str, state: &str) -> Vec<u8> {
    let frag = format!("SIP/2.0 {status}\r\n");
    let req = String::from_utf8(in_dialog(
        "NOTIFY",
        cseq,
        &alice_headers(pbx_tag),
        "a-call",
        &frag,
    ))
    .unwrap();
    req.replacen(
        "Content-Type: application/sdp\r\n",
        &format!("Event: refer\r\nSubscription-State: {state}\r\nContent-Type: message/sipfrag;version=2.0\r\n"),
        1,
    )
    .into_bytes()
}

#[test]
fn transfer_before_the_answer_redirects_with_302() {
    let mut h = Harness::start_with("850", SDP_A, TRANSFER_PLAN);
    let out = h.take();
    let (status, bytes) = final_to_a(&out).unwrap();
    assert_eq!(status, 302);
    let (m, _) = parse(&bytes);
    assert_eq!(m.header(&HeaderName::Contact), Some("<sip:carol@pbx.test>"));
    assert!(hung_up_with(&out).is_some());
}

#[test]
fn transfer_after_the_answer_refers_the_caller_and_reports_the_outcome() {
    let mut h = Harness::start_with("851", SDP_A, TRANSFER_PLAN);
    let out = h.take();
    let (_, ok) = final_to_a(&out).unwrap();
    let tag = to_tag_of(&ok);
    let refer = Harness::sent(&out, ALICE)
        .into_iter()
        .find(|(m, _)| *m == Method::Refer)
        .expect("a REFER to the caller");
    let (m, _) = parse(&refer.1);
    assert_eq!(m.header(&HeaderName::ReferTo), Some("<sip:carol@pbx.test>"));
    assert!(m.header(&HeaderName::Contact).is_some());
    h.response(&response_to(&refer.1, 202, "at", ALICE, ""));
    assert!(hung_up_with(&h.take()).is_none(), "waits for the NOTIFYs");
    h.request(
        &alice_notify(2, &tag, "100 Trying", "active;expires=60"),
        ALICE,
    );
    let out = h.take();
    assert_eq!(Harness::responses(&out), vec![200]);
    assert!(hung_up_with(&out).is_none());
    h.request(
        &alice_notify(3, &tag, "200 OK", "terminated;reason=noresource"),
        ALICE,
    );
    let out = h.take();
    assert!(
        logs(&out).contains(&"transfer SUCCESS 200".to_string()),
        "{:?}",
        logs(&out)
    );
    assert!(Harness::sends(&out, ALICE, Method::Bye));
}

#[test]
fn a_refer_the_phone_refuses_is_unsupported_and_silence_fails() {
    let mut h = Harness::start_with("851", SDP_A, TRANSFER_PLAN);
    let out = h.take();
    let refer = Harness::sent(&out, ALICE)
        .into_iter()
        .find(|(m, _)| *m == Method::Refer)
        .unwrap();
    h.response(&response_to(&refer.1, 501, "at", ALICE, ""));
    assert!(logs(&h.take()).contains(&"transfer UNSUPPORTED 501".to_string()));

    let mut h = Harness::start_with("851", SDP_A, TRANSFER_PLAN);
    let out = h.take();
    let refer = Harness::sent(&out, ALICE)
        .into_iter()
        .find(|(m, _)| *m == Method::Refer)
        .unwrap();
    h.response(&response_to(&refer.1, 202, "at", ALICE, ""));
    h.take();
    h.advance(Duration::from_secs(31));
    assert!(logs(&h.take()).contains(&"transfer FAILURE 0".to_string()));
}

/// A new INVITE with Replaces naming alice's dialog of a call with bob: the new caller
/// takes alice's place; bob gets its offer in a re-INVITE, and its answer answers the
/// new caller; alice is hung up.
#[test]
fn an_invite_with_replaces_takes_the_place_of_the_named_party() {
    let (mut one, tag1, inv_bob) = connected();
    let r = crate::Replaces {
        call_id: "a-call".into(),
        to_tag: tag1.clone(),
        from_tag: "at".into(),
    };
    let mut two = Harness::start_full(
        "a-call-2",
        "bob",
        SDP_C,
        DEMO_DIALPLAN,
        true,
        Some(r.clone()),
    );
    let out = two.take();
    assert_eq!(Harness::responses(&out), vec![100]);
    assert!(out.contains(&Output::Replace(r.clone())));
    let handed = one
        .call
        .hand_over(one.now, &r)
        .expect("alice's dialog is found");
    let out1 = one.take();
    assert!(Harness::sends(&out1, ALICE, Method::Bye));
    assert!(Harness::sent(&out1, BOB1).is_empty());

    two.call.on_handover(two.now, Ok(handed));
    let out = two.take();
    let reinvite = Harness::sent(&out, BOB1);
    assert_eq!(reinvite.len(), 1);
    let (m, c) = parse(&reinvite[0].1);
    assert_eq!(c.call_id, bob_dialog(&inv_bob).1, "in bob's dialog");
    assert_eq!(c.cseq.seq, 2);
    let offer = String::from_utf8_lossy(&m.body).into_owned();
    assert!(offer.contains("m=audio 40002 "), "{offer}");
    assert!(
        final_to_a(&out).is_none(),
        "the caller waits for bob's answer"
    );
    two.response(&response_to(&reinvite[0].1, 200, "b1", BOB1, SDP_B));
    let out = two.take();
    let (status, ok) = final_to_a(&out).expect("the new caller is answered");
    assert_eq!(status, 200);
    let answer = String::from_utf8_lossy(&parse(&ok).0.body).into_owned();
    assert!(answer.contains("m=audio 40000 "), "{answer}");
    assert!(Harness::sends(&out, BOB1, Method::Ack));
    let rec = record_of(&out);
    assert_eq!(rec.legs.len(), 2);
    assert_eq!(rec.legs[1].call_id, bob_dialog(&inv_bob).1);
}

#[test]
fn an_invite_replacing_an_unknown_dialog_gets_481() {
    let r = crate::Replaces {
        call_id: "nowhere".into(),
        to_tag: "1".into(),
        from_tag: "2".into(),
    };
    let mut two = Harness::start_full("a-call-2", "bob", SDP_C, DEMO_DIALPLAN, true, Some(r));
    two.take();
    two.call
        .on_handover(two.now, Err("the replaced call is not on this node".into()));
    let out = two.take();
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(481));
    assert!(hung_up_with(&out).is_some());
}

const SDP_B_DTMF: &str = "v=0\r\no=bob 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0 97\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:97 telephone-event/8000\r\n";

/// alice calls bob with Dial options `options`, both offering telephone-events.
fn connected_with(options: &str) -> Harness {
    let plan = format!("[default]\nexten => bob,1,Dial(SIP/bob,30,{options})\n");
    let mut h = Harness::start_with("bob", super::SDP_A_DTMF, &plan);
    h.take();
    h.resolve(&[BOB1]);
    let inv = Harness::sent(&h.take(), BOB1);
    h.response(&response_to(&inv[0].1, 200, "b1", BOB1, SDP_B_DTMF));
    h
}

#[test]
fn the_callee_keys_a_blind_transfer_with_dial_t() {
    let mut h = connected_with("t");
    let out = h.take();
    // Only the callee's keys are watched (t), at the payload type of its answer.
    assert!(out.contains(&Output::Media(MediaOp::DetectDtmf {
        stream: 0,
        side: Side::B,
        payload_type: 97
    })));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::DetectDtmf { side: Side::A, .. }))));
    // The caller's #1 does nothing.
    for k in ['#', '1'] {
        h.call.on_media(h.now, MediaNotice::Digit(Side::A, k));
    }
    assert!(h.take().is_empty());
    for k in ['#', '1'] {
        h.call.on_media(h.now, MediaNotice::Digit(Side::B, k));
    }
    let out = h.take();
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::A, .. }))),
        "the caller waits with music: {out:?}"
    );
    for k in ['7', '0', '0', '#'] {
        h.call.on_media(h.now, MediaNotice::Digit(Side::B, k));
    }
    route_to(&mut h, "700", "alice");
    let out = h.take();
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Media(MediaOp::Play { prompts, .. }) if prompts == &["hello-world".to_string()]
    )));
    assert!(Harness::sent(&out, BOB1).is_empty(), "no NOTIFY for keys");
    h.advance(Duration::from_millis(2100));
    assert!(Harness::sends(&h.take(), BOB1, Method::Bye));
}

#[test]
fn transfer_keys_without_a_number_time_out_and_the_call_goes_on() {
    let mut h = connected_with("T");
    h.take();
    for k in ['#', '1'] {
        h.call.on_media(h.now, MediaNotice::Digit(Side::A, k));
    }
    assert!(h
        .take()
        .iter()
        .any(|o| matches!(o, Output::Media(MediaOp::Music { side: Side::B, .. }))));
    h.advance(Duration::from_millis(3100));
    let out = h.take();
    assert!(out.contains(&Output::Media(MediaOp::StopPlay { stream: 0 })));
    assert!(!out.iter().any(|o| matches!(o, Output::Route { .. })));
    assert!(hung_up_with(&out).is_none());
}

/// An INVITE with Replaces naming bob's dialog (a call pulled away from bob): the party
/// handed over is the caller, whose dialog with the node has seen no request from it
/// yet — the re-INVITE goes out as CSeq 1 and its answer must still be taken.
#[test]
fn an_invite_with_replaces_can_take_over_a_caller() {
    let (mut one, tag1, inv_bob) = connected();
    let (m, c) = parse(&inv_bob);
    let our_tag = NameAddr::parse_single(m.header(&HeaderName::From).unwrap())
        .unwrap()
        .tag()
        .unwrap()
        .to_string();
    let r = crate::Replaces {
        call_id: c.call_id.clone(),
        to_tag: our_tag,
        from_tag: "b1".into(),
    };
    let mut two = Harness::start_full(
        "a-call-2",
        "alice",
        SDP_C,
        DEMO_DIALPLAN,
        true,
        Some(r.clone()),
    );
    two.take();
    let handed = one
        .call
        .hand_over(one.now, &r)
        .expect("bob's dialog is found");
    let out1 = one.take();
    assert!(Harness::sends(&out1, BOB1, Method::Bye));
    assert!(Harness::sent(&out1, ALICE).is_empty());
    two.call.on_handover(two.now, Ok(handed));
    let reinvite = Harness::sent(&two.take(), ALICE);
    assert_eq!(reinvite.len(), 1);
    let (m, c) = parse(&reinvite[0].1);
    assert_eq!(c.cseq.seq, 1, "the node's first request in alice's dialog");
    assert_eq!(c.call_id, "a-call");
    assert!(m.header(&HeaderName::To).unwrap().contains("tag=at"));
    assert!(m.header(&HeaderName::From).unwrap().contains(&tag1));
    two.response(&response_to(&reinvite[0].1, 200, "at", ALICE, SDP_A));
    let out = two.take();
    assert_eq!(final_to_a(&out).map(|f| f.0), Some(200));
    assert!(Harness::sends(&out, ALICE, Method::Ack));
}

/// A transfer by the caller that fails: the parties stay swapped inside the call but
/// are connected again; the caller's BYE (now on the second leg) reaches the callee.
#[test]
fn a_failed_transfer_by_the_caller_connects_them_again() {
    let (mut h, tag, _) = connected();
    h.request(
        &refer(
            2,
            &alice_headers(&tag),
            "a-call",
            "<sip:carol@pbx.test>",
            "",
        ),
        ALICE,
    );
    route_to(&mut h, "carol", "bob");
    h.take();
    h.call.on_resolved(h.now, carol_contact(), 480);
    let inv_c = Harness::sent(&h.take(), CAROL);
    h.response(&response_to(&inv_c[0].1, 480, "c1", CAROL, ""));
    let out = h.take();
    assert_eq!(
        notify_frags(&out, ALICE).last().map(|f| f.0.clone()),
        Some("SIP/2.0 480 Temporarily Unavailable".to_string())
    );
    assert!(out.contains(&Output::Media(MediaOp::Remote {
        stream: 0,
        side: Side::B,
        addr: Some(addr("127.0.0.1:6000")),
    })));
    h.request(
        &in_dialog("BYE", 3, &alice_headers(&tag), "a-call", ""),
        ALICE,
    );
    let out = h.take();
    assert!(Harness::responses(&out).contains(&200));
    assert!(Harness::sends(&out, BOB1, Method::Bye));
}
