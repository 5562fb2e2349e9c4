//! Calls through the B2BUA with real SIP tools: SIPp registers a callee through one node
//! and answers (or not) as a UAS; SIPp calls it through another node with digest auth.
//! Media is checked with a small RTP sender on the test's own socket and SIPp's RTP
//! echo.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pbx_tests::{
    assert_all_ok, free_udp_port, require_tool, sipp_logs, wait_for, Baresip, LocalCluster, Phones,
    SippRun, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]";

fn ok(run: SippRun, what: &str) {
    assert_all_ok(&run, 1, what);
}

fn calls_listed(c: &LocalCluster, node: usize) -> Option<String> {
    c.status(node)?.get("calls").cloned()
}

#[test]
fn calls_across_nodes_both_ways_and_with_the_callees_node_dead() {
    let users = Users { count: 4 };
    let c = LocalCluster::up(40, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();

    // u2 registers through node 2; u1 calls it through node 1.
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    p.register(2, 2, &bob_ip, bob_port);
    let uas = p.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_call.xml", 1, 1, &Users::name(2), nowhere, 3000);
    // While it is up, the answered call is in the replicated list, on every node.
    wait_for("the call listed on node 3", Duration::from_secs(10), || {
        (calls_listed(&c, 3).as_deref() == Some("1")).then_some(())
    })
    .unwrap();
    let (code, text) = c
        .admin(&[3], &["calls", "list", "--output", "json"])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list[0]["owner_node"], 1, "{text}");
    assert_eq!(list[0]["caller"], "u000001");
    assert_eq!(list[0]["callee"], "u000002");
    assert_eq!(list[0]["leg_call_ids"].as_array().unwrap().len(), 2);
    ok(uac.wait().unwrap(), "u1 -> u2 via node 1");
    ok(uas.wait().unwrap(), "u2 answers");
    wait_for(
        "the ended call gone from node 3",
        Duration::from_secs(10),
        || (calls_listed(&c, 3).as_deref() == Some("0")).then_some(()),
    )
    .unwrap();
    assert!(c
        .log(1)
        .contains("call started caller=u000001 exten=u000002"));

    // The other way: u1 registers through node 1, u2 calls it through node 2.
    let alice_ip = c.client_ip(51);
    let alice_port = free_udp_port(&alice_ip);
    p.register(1, 1, &alice_ip, alice_port);
    let uas = p.callee("uas_answer.xml", &alice_ip, alice_port, &[]);
    let uac = p.call("uac_call.xml", 2, 2, &Users::name(1), nowhere, 500);
    ok(uac.wait().unwrap(), "u2 -> u1 via node 2");
    ok(uas.wait().unwrap(), "u1 answers");

    // u2's registering node dies; its binding lives on: u3 reaches it through node 3.
    c.kill(2).unwrap();
    let uas = p.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_call.xml", 3, 3, &Users::name(2), nowhere, 500);
    ok(uac.wait().unwrap(), "u3 -> u2 via node 3 with node 2 dead");
    ok(uas.wait().unwrap(), "u2 answers with its registrar dead");
}

const OUTCOMES_PLAN: &str = "\
[default]
exten => 600,1,Answer()
 same => n,Echo()
exten => _u.,1,Dial(SIP/${EXTEN},3)
 same => n,Log(NOTICE,dial ${EXTEN} status ${DIALSTATUS} cause ${HANGUPCAUSE})
 same => n,GotoIf($[\"${DIALSTATUS}\" = \"BUSY\"]?busy)
 same => n,GotoIf($[\"${DIALSTATUS}\" = \"NOANSWER\"]?noanswer)
 same => n,Congestion()
 ; 603 for a busy callee: shows the dialplan's next step ran (a relayed 486 would not)
 same => n(busy),Hangup(21)
 same => n(noanswer),Hangup(19)
";

#[test]
fn busy_cancel_no_answer_and_the_call_limit() {
    let users = Users { count: 3 };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("extensions.conf");
    std::fs::write(&plan, OUTCOMES_PLAN).unwrap();
    let sounds = pbx_tests::repo_root().join("deploy/sounds");
    let extra = format!(
        "{MD5_ONLY}\n[calls]\nmax_calls = 1\nsounds_dir = \"{}\"\n",
        sounds.display()
    );
    let c = LocalCluster::up_with_dialplan(41, 3, &users, &extra, &plan).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    p.register(2, 2, &bob_ip, bob_port);
    let bob = Users::name(2);

    // Busy: DIALSTATUS=BUSY, and the plan's busy branch answers 603.
    let uas = p.callee("uas_busy.xml", &bob_ip, bob_port, &[]);
    let uac = p.call(&p.expecting(603), 1, 1, &bob, nowhere, 0);
    ok(uac.wait().unwrap(), "busy callee -> 603 from the dialplan");
    ok(uas.wait().unwrap(), "busy callee got its ACK");
    assert!(
        c.log(1).contains("dial u000002 status BUSY cause 17"),
        "{}",
        c.log(1)
    );

    // No answer within Dial's 3 s: the callee gets CANCEL, the caller 480.
    let started = Instant::now();
    let uas = p.callee("uas_ring.xml", &bob_ip, bob_port, &[]);
    let uac = p.call(&p.expecting(480), 1, 1, &bob, nowhere, 0);
    ok(uac.wait().unwrap(), "no answer -> 480");
    ok(uas.wait().unwrap(), "ringing callee cancelled");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(c.log(1).contains("dial u000002 status NOANSWER cause 19"));

    // The caller gives up while it rings: 200 for the CANCEL, 487, callee cancelled.
    let uas = p.callee("uas_ring.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_cancel.xml", 1, 1, &bob, nowhere, 0);
    ok(uac.wait().unwrap(), "caller cancels");
    ok(uas.wait().unwrap(), "callee cancelled with the caller");

    // One call per node here: a second one on node 1 gets 503, node 3 takes it.
    let first = p.call("uac_call.xml", 1, 1, "600", nowhere, 4000);
    wait_for("the first call answered", Duration::from_secs(10), || {
        (calls_listed(&c, 1).as_deref() == Some("1")).then_some(())
    })
    .unwrap();
    let refused = p.call(&p.expecting(503), 1, 3, "600", nowhere, 0);
    ok(refused.wait().unwrap(), "call limit -> 503");
    let elsewhere = p.call("uac_call.xml", 3, 3, "600", nowhere, 200);
    ok(elsewhere.wait().unwrap(), "another node takes the call");
    ok(first.wait().unwrap(), "the first call completes");
}

/// A 20 ms PCMU packet.
fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160).map(|i| (i as u8) ^ (seq as u8)));
    p
}

fn ssrc_of(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[8], p[9], p[10], p[11]])
}

fn seq_of(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[2], p[3]])
}

/// Sends `count` packets to `to` every 20 ms and collects what comes back with our SSRC.
fn send_and_collect(sock: &UdpSocket, to: SocketAddr, count: u16) -> Vec<Vec<u8>> {
    const SSRC: u32 = 0xfeed_beef;
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 2048];
    let mut next = Instant::now();
    for seq in 1..=count {
        sock.send_to(&rtp(seq, SSRC), to).unwrap();
        next += Duration::from_millis(20);
        while Instant::now() < next {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n >= 12 && ssrc_of(&buf[..n]) == SSRC {
                    back.push(buf[..n].to_vec());
                }
            }
        }
    }
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 12 && ssrc_of(&buf[..n]) == SSRC {
                back.push(buf[..n].to_vec());
            }
        }
    }
    back
}

#[test]
fn rtp_is_relayed_both_ways_and_echo_returns_what_was_sent() {
    let users = Users { count: 3 };
    let c = LocalCluster::up(42, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);

    // 600: a beep, then our own packets back.
    let phone = UdpSocket::bind((c.client_ip(52).as_str(), 0)).unwrap();
    let uac = p.call(
        "uac_call.xml",
        1,
        1,
        "600",
        phone.local_addr().unwrap(),
        6000,
    );
    phone
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, relay) = phone.recv_from(&mut buf).expect("the beep prompt");
    assert_eq!(buf[1] & 0x7f, 0, "PCMU prompt");
    assert_eq!(n, 172, "20 ms of G.711 per packet");
    assert_eq!(relay.ip().to_string(), c.node_addr(1).ip().to_string());
    let back = send_and_collect(&phone, relay, 150);
    assert!(back.len() >= 100, "echoed {} of 150", back.len());
    let first = seq_of(&back[0]);
    for (i, pkt) in back.iter().enumerate() {
        let seq = first + i as u16;
        assert_eq!(
            pkt,
            &rtp(seq, 0xfeed_beef),
            "every packet after the prompt, unchanged"
        );
    }
    assert_eq!(seq_of(back.last().unwrap()), 150);
    ok(uac.wait().unwrap(), "echo call");

    // A bridged call: the callee (SIPp) echoes RTP; our packets go through the relay to
    // it and back.
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    let bob_media = free_udp_port(&bob_ip).to_string();
    p.register(2, 2, &bob_ip, bob_port);
    let uas = p.callee_with_media(
        "uas_answer.xml",
        &bob_ip,
        bob_port,
        &format!("{bob_ip}:{bob_media}"),
        &["-mi", &bob_ip, "-mp", &bob_media, "-rtp_echo"],
    );
    let phone = UdpSocket::bind((c.client_ip(53).as_str(), 0)).unwrap();
    let uac = p.call(
        "uac_call.xml",
        1,
        1,
        &Users::name(2),
        phone.local_addr().unwrap(),
        8000,
    );
    let port = wait_for("the answer's relay port", Duration::from_secs(10), || {
        sipp_logs(&c)
            .lines()
            .find_map(|l| l.strip_prefix("answered u000002 relay "))
            .and_then(|p| p.trim().parse::<u16>().ok())
    })
    .unwrap();
    let relay: SocketAddr = (c.node_addr(1).ip(), port).into();
    let back = send_and_collect(&phone, relay, 100);
    assert_eq!(back.len(), 100, "all relayed to the callee and back");
    for (i, pkt) in back.iter().enumerate() {
        assert_eq!(pkt, &rtp(i as u16 + 1, 0xfeed_beef));
    }
    // While it runs, node 3's admin API lists it with node 1's media counters (the
    // relay publishes them every second).
    let text = wait_for("the call's media counters", Duration::from_secs(4), || {
        let (code, text) = c.admin(&[3], &["calls", "list", "--output", "json"]).ok()?;
        let calls: serde_json::Value = serde_json::from_str(&text).ok()?;
        let m = &calls[0]["media"][0];
        (code == 0 && m["a_packets"] == 100 && m["b_packets"] == 100).then_some(text)
    })
    .unwrap();
    let calls: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(calls[0]["owner_node"], 1, "{text}");
    assert_eq!(calls[0]["callee"], Users::name(2), "{text}");
    assert_eq!(calls[0]["media"][0]["a_lost"], 0, "{text}");
    ok(uac.wait().unwrap(), "bridged call");
    ok(uas.wait().unwrap(), "callee with RTP echo");
    // Counted both ways by the relay (logged when the stream closes).
    let line = wait_for("the stream's counters", Duration::from_secs(10), || {
        c.log(1)
            .lines()
            .find(|l| l.contains("media stream closed") && l.contains(&format!("port_a={port}")))
            .map(str::to_string)
    })
    .unwrap();
    assert!(
        line.contains("a_packets=100")
            && line.contains("b_packets=100")
            && line.contains("a_lost=0"),
        "{line}"
    );

    // An operator hangs a call up through node 2: node 1 sends BYE both ways.
    let uas = p.callee_with_media(
        "uas_answer.xml",
        &bob_ip,
        bob_port,
        &format!("{bob_ip}:{bob_media}"),
        &["-mi", &bob_ip, "-mp", &bob_media],
    );
    // uac_call.xml that waits for the BYE instead of sending one.
    let text =
        std::fs::read_to_string(pbx_tests::repo_root().join("tests/sipp/uac_call.xml")).unwrap();
    let (head, tail) = text.split_once("  <pause/>").unwrap();
    let (_, rest) = tail
        .split_once("<recv response=\"200\" crlf=\"true\"/>")
        .unwrap();
    let hungup = p.file(
        "uac_hungup.xml",
        &format!(
            "{head}  <recv request=\"BYE\" timeout=\"60000\"/>\n  <send>\n    <![CDATA[\n\n      \
             SIP/2.0 200 OK\n      [last_Via:]\n      [last_From:]\n      [last_To:]\n      \
             [last_Call-ID:]\n      [last_CSeq:]\n      Content-Length: 0\n\n    ]]>\n  </send>{rest}"
        ),
    );
    let uac = p.call(
        hungup.to_str().unwrap(),
        1,
        1,
        &Users::name(2),
        phone.local_addr().unwrap(),
        0,
    );
    let id = wait_for("the call listed", Duration::from_secs(10), || {
        let (_, text) = c
            .admin(&[2], &["calls", "list", "--no-media", "--output", "json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v[0]["id"].as_str().map(str::to_string)
    })
    .unwrap();
    let (code, text) = c.admin(&[2], &["calls", "hangup", &id]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("hung up on node 1"), "{text}");
    ok(uac.wait().unwrap(), "caller got the operator's BYE");
    ok(uas.wait().unwrap(), "callee got the operator's BYE");
    wait_for(
        "the call gone from the list",
        Duration::from_secs(10),
        || {
            let (_, text) = c.admin(&[3], &["calls", "list", "--output", "json"]).ok()?;
            (text.trim() == "[]").then_some(())
        },
    )
    .unwrap();
    let (code, text) = c.admin(&[3], &["calls", "hangup", &id]).unwrap();
    assert_eq!(code, 6, "no such call any more: {text}");
    let (_, audit) = c.admin(&[1], &["audit"]).unwrap();
    assert!(audit.contains(&format!("calls hangup {id}")), "{audit}");
}

#[test]
fn a_tcp_callee_is_reached_through_the_node_holding_its_connection() {
    require_tool("baresip", "baresip-core");
    let users = Users { count: 3 };
    let c = LocalCluster::up(43, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    // u2 is a softphone on TCP, registered (connected) through node 2 only.
    let dir = c.dir.path().join("baresip");
    let ip = c.client_ip(50);
    // SIP over TCP through node 2 as outbound proxy, auto-answer.
    let _phone = Baresip::start(
        &dir,
        &ip,
        free_udp_port(&ip),
        &[],
        &format!(
            "<sip:{}@pbx.test;transport=tcp>;auth_pass={};outbound=\"sip:{};transport=tcp\";regint=600;answermode=auto;audio_codecs=PCMU",
            Users::name(2),
            Users::password(2),
            c.node_addr(2)
        ),
    );
    wait_for("u2 registered over TCP", Duration::from_secs(15), || {
        c.status(1)
            .filter(|s| s.get("bindings").map(String::as_str) == Some("1"))
            .map(|_| ())
    })
    .unwrap();
    // Called through node 1: the INVITE and the rest of the dialog go over node 2's
    // connection (Relay RPC), the media through node 1's relay.
    let uac = p.call("uac_call.xml", 1, 1, &Users::name(2), nowhere, 2000);
    ok(uac.wait().unwrap(), "u1 -> TCP u2 via node 1");
    assert!(c.log(1).contains("u000002 answered"), "{}", c.log(1));
    let phone_log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
    assert!(phone_log.contains("Call established"), "{phone_log}");
    let line = wait_for("the stream's counters", Duration::from_secs(10), || {
        c.log(1)
            .lines()
            .find(|l| l.contains("media stream closed"))
            .map(str::to_string)
    })
    .unwrap();
    let b_packets: u64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("b_packets="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        b_packets >= 50,
        "the softphone's RTP reached the relay: {line}"
    );
    // Called through node 2 itself, which holds the connection: the INVITE goes
    // straight onto it (found by the phone's address; this once deadlocked the node).
    let uac = p.call("uac_call.xml", 2, 3, &Users::name(2), nowhere, 500);
    ok(uac.wait().unwrap(), "u3 -> TCP u2 via its own node 2");
}

#[test]
fn a_new_dialplan_routes_calls_on_every_node_and_a_bad_one_changes_nothing() {
    let users = Users { count: 3 };
    let c = LocalCluster::up(44, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    // The demo plan: 850 is taken for a user name, and there is no such user.
    ok(
        p.call(&p.expecting(404), 3, 1, "850", nowhere, 0)
            .wait()
            .unwrap(),
        "850 before",
    );
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("extensions.conf");
    std::fs::write(
        &plan,
        "[default]\nexten => 850,1,Answer()\n same => n,Echo()\ninclude => users\n\n[users]\nexten => _u.,1,Dial(SIP/${EXTEN},20)\n",
    )
    .unwrap();
    let (code, text) = c
        .admin(&[1], &["dialplan", "apply", plan.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    wait_for(
        "the new dialplan on every node",
        Duration::from_secs(10),
        || {
            (1..=3)
                .all(|n| c.status(n).and_then(|s| s.get("dialplan").cloned()) == Some("2".into()))
                .then_some(())
        },
    )
    .unwrap();
    for node in [2, 3] {
        ok(
            p.call("uac_call.xml", node, 1, "850", nowhere, 200)
                .wait()
                .unwrap(),
            "850 after, on another node",
        );
    }
    // A broken one is refused; 850 keeps working.
    std::fs::write(&plan, "[default]\nexten => 850,1,Answr()\n").unwrap();
    let (code, text) = c
        .admin(&[2], &["dialplan", "apply", plan.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("extensions.conf:2:"), "{text}");
    ok(
        p.call("uac_call.xml", 1, 2, "850", nowhere, 200)
            .wait()
            .unwrap(),
        "850 after a refused change",
    );
}

#[test]
fn a_drained_node_refuses_new_work_while_its_running_call_completes() {
    let users = Users { count: 3 };
    let c = LocalCluster::up(47, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let running = p.call("uac_call.xml", 1, 1, "600", nowhere, 4000);
    wait_for(
        "the call answered on node 1",
        Duration::from_secs(10),
        || (calls_listed(&c, 1).as_deref() == Some("1")).then_some(()),
    )
    .unwrap();
    let (code, text) = c.admin(&[2], &["node", "drain", "--node", "1"]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("node 1: draining, 1 calls running"), "{text}");
    // New work on node 1 is refused with 503 (phones go to the next SRV target)...
    let probe = |n: usize| {
        pbx_tests::pbxctl(&["options", &c.node_addr(n).to_string(), "--timeout", "2"])
            .unwrap()
            .1
    };
    wait_for("node 1 answers 503", Duration::from_secs(5), || {
        probe(1).contains(" 503 ").then_some(())
    })
    .unwrap();
    let (registered, out) = pbx_tests::pbxctl(&[
        "register",
        &c.node_addr(1).to_string(),
        "--user",
        &Users::name(2),
        "--password",
        &Users::password(2),
    ])
    .unwrap();
    assert!(!registered && out.contains("503"), "{out}");
    assert!(probe(2).contains(" 200 "), "the others still serve");
    // ... while the running call completes, and the drain reports it done.
    let (code, text) = c
        .admin(&[3], &["node", "drain", "--node", "1", "--wait", "20"])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("node 1: draining, 0 calls running"), "{text}");
    ok(
        running.wait().unwrap(),
        "the call running on the drained node",
    );
    let (code, _) = c.admin(&[1], &["node", "undrain"]).unwrap();
    assert_eq!(code, 0);
    wait_for("node 1 serves again", Duration::from_secs(5), || {
        probe(1).contains(" 200 ").then_some(())
    })
    .unwrap();
}

/// A third-party registration (RFC 3261 §10.2): the REGISTER comes from one address and
/// binds a Contact at another (a provisioning system; a phone that sends from one port
/// and listens on another). A call reaches the Contact, not the REGISTER's source.
#[test]
fn a_contact_registered_from_another_address_is_reached_at_the_contact() {
    let users = Users { count: 2 };
    let c = LocalCluster::up(71, 3, &users, "").unwrap();
    let p = Phones::new(&c);
    let registrar_ip = c.client_ip(40);
    let registrar_port = free_udp_port(&registrar_ip);
    let phone_ip = c.client_ip(41);
    let phone_port = free_udp_port(&phone_ip);
    let inf = p.file(
        "reg.csv",
        &format!(
            "SEQUENTIAL\n{};pbx.test;{};{phone_ip}:{phone_port};3600\n",
            Users::name(2),
            Users::password(2)
        ),
    );
    let port = registrar_port.to_string();
    let reg = p
        .sipp("reg_auth.xml", 2, &registrar_ip, &inf, &["-p", &port])
        .wait()
        .unwrap();
    assert_all_ok(&reg, 1, "third-party registration");
    let uas = p.callee("uas_answer.xml", &phone_ip, phone_port, &[]);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let uac = p.call("uac_call.xml", 1, 1, &Users::name(2), nowhere, 200);
    ok(uac.wait().unwrap(), "u1 -> u2 at its registered Contact");
    ok(uas.wait().unwrap(), "the phone at the Contact answers");
}
