//! Blind transfer with a real softphone: u1 (SIPp) calls u2 (baresip) through node 1,
//! u2 transfers the call to u3 (a SIPp phone registered through node 2) with REFER.
//! The node sends u1 through the dialplan to u3; u2 sees the NOTIFY progress and hangs
//! up; u1 and u3 talk (RTP both ways through the relay) and u1's BYE reaches u3.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pbx_tests::{
    assert_all_ok, free_tcp_port, free_udp_port, require_tool, sipp_logs, wait_for, Baresip,
    LocalCluster, Phones, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n";

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// Sends RTP from `from` to `to` until `at` receives one; returns where it came from.
fn reaches(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, what: &str) -> SocketAddr {
    at.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut seq = 0u16;
    let mut buf = [0u8; 2048];
    wait_for(what, Duration::from_secs(10), || {
        seq += 1;
        from.send_to(&rtp(seq), to).ok()?;
        let (n, src) = at.recv_from(&mut buf).ok()?;
        (n >= 12).then_some(src)
    })
    .unwrap()
}

/// u2 as baresip on its own loopback address, through node 1 (its outbound proxy),
/// driven through `ctrl_tcp`, answering calls by itself when `answers`; returns once it
/// is registered: the process, its directory (`out.log`) and its control address.
fn baresip_u2(c: &LocalCluster, answers: bool) -> (Baresip, PathBuf, SocketAddr) {
    let ip = c.client_ip(51);
    let control: SocketAddr = format!("{ip}:{}", free_tcp_port(&ip)).parse().unwrap();
    let dir = c.dir.path().join("baresip-u2");
    let answer = if answers { "answermode=auto;" } else { "" };
    let phone = Baresip::start_with(
        &dir,
        &ip,
        free_udp_port(&ip),
        &[],
        &format!(
            "<sip:{}@pbx.test>;auth_pass={};outbound=\"sip:{}\";regint=600;{answer}audio_codecs=PCMU",
            Users::name(2),
            Users::password(2),
            c.node_addr(1)
        ),
        &Baresip::control_config(control),
    );
    wait_for("u2 registered", Duration::from_secs(20), || {
        (!c.bound_via(&[1], &Users::name(2)).is_empty()).then_some(())
    })
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
        panic!("{e}:\n{log}")
    });
    (phone, dir, control)
}

#[test]
fn the_callee_transfers_the_call_with_refer_and_the_caller_reaches_the_target() {
    require_tool("baresip", "baresip-core");
    let users = Users { count: 3 };
    let c = LocalCluster::up(83, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let out_log = |dir: &Path| std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();

    // u3: a SIPp phone registered through node 2, answering with our media socket.
    let carol_ip = c.client_ip(52);
    let carol_port = free_udp_port(&carol_ip);
    let carol_media = UdpSocket::bind((carol_ip.as_str(), 0)).unwrap();
    p.register(2, 3, &carol_ip, carol_port);
    let carol = p.callee_with_media(
        "uas_answer.xml",
        &carol_ip,
        carol_port,
        &carol_media.local_addr().unwrap().to_string(),
        &[],
    );

    // u2: baresip on node 1, answering by itself, driven through ctrl_tcp.
    let (_bob, bob_dir, control) = baresip_u2(&c, true);

    // u1 calls u2 through node 1 and stays 8 s on the line before hanging up.
    let alice_media = UdpSocket::bind((c.client_ip(60).as_str(), 0)).unwrap();
    let alice = p.call(
        "uac_call.xml",
        1,
        1,
        &Users::name(2),
        alice_media.local_addr().unwrap(),
        8000,
    );
    wait_for("u2 answered", Duration::from_secs(10), || {
        out_log(&bob_dir).contains("Call established").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", out_log(&bob_dir), c.log(1)));

    let answer = Baresip::command(
        control,
        "transfer",
        &format!("sip:{}@pbx.test", Users::name(3)),
    )
    .unwrap();
    assert!(!answer.contains("error"), "{answer}");
    wait_for("the transfer completed", Duration::from_secs(10), || {
        c.log(1)
            .contains(&format!("transfer to {} completed", Users::name(3)))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", c.log(1), out_log(&bob_dir)));
    assert!(
        c.log(1).contains(&format!(
            "{} transfers the call to {}",
            Users::name(2),
            Users::name(3)
        )),
        "{}",
        c.log(1)
    );

    // Media: what u1 sends to its relay port reaches u3's socket, and u3's answer
    // (sent back where the relay's packets come from) reaches u1.
    let relay_port: u16 = wait_for("u1's relay port", Duration::from_secs(5), || {
        let logs = sipp_logs(&c);
        let at = logs.find("relay ")?;
        logs[at + 6..]
            .split_whitespace()
            .next()?
            .trim()
            .parse()
            .ok()
    })
    .unwrap();
    let relay_a = SocketAddr::new(c.node_addr(1).ip(), relay_port);
    let relay_c = reaches(&alice_media, relay_a, &carol_media, "u1's RTP at u3");
    assert_ne!(relay_c, relay_a, "u3 is on the other side of the relay");
    let back = reaches(&carol_media, relay_c, &alice_media, "u3's RTP at u1");
    assert_eq!(back, relay_a, "u1 hears u3 from the port it knows");

    // u2 hung up after the NOTIFY 200 (or was hung up); u1's BYE reaches u3.
    assert_all_ok(&alice.wait().unwrap(), 1, "u1's call through the transfer");
    assert_all_ok(&carol.wait().unwrap(), 1, "u3 answered and got u1's BYE");
}

/// The value after `key` in the SIPp logs (`<log>` lines), once there.
fn logged(c: &LocalCluster, key: &str) -> String {
    wait_for(key, Duration::from_secs(10), || {
        let logs = sipp_logs(c);
        let at = logs.find(key)?;
        let v = logs[at + key.len()..].split_whitespace().next()?;
        (!v.is_empty()).then(|| v.to_string())
    })
    .unwrap()
}

/// Attended transfer with SIPp phones: u1 calls u3 (the consultation call), then u2,
/// and sends REFER in its call with u2 naming its dialog with the node in the call to
/// u3 (Refer-To `?Replaces=`). The node hangs the consultation call up for u1, moves
/// u3 to u2's call with a re-INVITE (its RTP now reaches u2 through that call's
/// relay), tells u1 `200 OK` in a NOTIFY, and u1 hangs up: u2 and u3 talk.
#[test]
fn an_attended_transfer_joins_the_transferee_and_the_target() {
    let users = Users { count: 3 };
    let c = LocalCluster::up(84, 1, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let phone = |user: usize, host: u8, scenario: &str| {
        let ip = c.client_ip(host);
        let port = free_udp_port(&ip);
        let media = UdpSocket::bind((ip.as_str(), 0)).unwrap();
        p.register(1, user, &ip, port);
        let sipp = p.callee_with_media(
            scenario,
            &ip,
            port,
            &media.local_addr().unwrap().to_string(),
            &["-trace_logs"],
        );
        (sipp, media)
    };
    let (bob, bob_media) = phone(2, 51, "uas_answer.xml");
    let (carol, carol_media) = phone(3, 52, "uas_moved.xml");
    let csv = |callee: usize, rest: &str| {
        format!(
            "SEQUENTIAL\n{};pbx.test;{};{};{};9{rest}\n",
            Users::name(1),
            Users::password(1),
            Users::name(callee),
            c.client_ip(99)
        )
    };

    // The consultation call: Call-ID att2-1, From tag at2-1, the node's tag logged.
    let inf = p.file("consult.csv", &csv(3, ""));
    let consult = p.sipp(
        "uac_replaced.xml",
        1,
        &c.client_ip(61),
        &inf,
        &["-cid_str", "att2-%u", "-trace_logs"],
    );
    let node_tag = logged(&c, "node tag ");

    // The call to the transferee, and the REFER.
    let replaces = format!("att2-1%3Bto-tag%3D{node_tag}%3Bfrom-tag%3Dat2-1");
    let inf = p.file(
        "refer.csv",
        &csv(2, &format!(";{replaces};{}", Users::name(3))),
    );
    let transferor = p.sipp("uac_refer.xml", 1, &c.client_ip(62), &inf, &["-trace_logs"]);
    assert_all_ok(&transferor.wait().unwrap(), 1, "u1: REFER, NOTIFY, BYE");
    assert_all_ok(
        &consult.wait().unwrap(),
        1,
        "u1's consultation call hung up by the node",
    );
    assert!(
        sipp_logs(&c).contains("transfer notify 200"),
        "{}",
        sipp_logs(&c)
    );
    let log = c.log(1);
    assert!(
        log.contains(&format!("{} handed over to another call", Users::name(3))),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "attended transfer: {} takes the transferor's place",
            Users::name(3)
        )),
        "{log}"
    );

    // u3 was moved to the call's relay: its RTP reaches u2 there, and back.
    let port: u16 = logged(&c, "moved to relay ").parse().unwrap();
    let relay_c = SocketAddr::new(c.node_addr(1).ip(), port);
    let relay_b = reaches(&carol_media, relay_c, &bob_media, "u3's RTP at u2");
    let back = reaches(&bob_media, relay_b, &carol_media, "u2's RTP at u3");
    assert_eq!(back, relay_c, "u3 hears u2 from the port it was given");

    // One call left, between u2 and u3; hung up by an operator, both get a BYE.
    let id = wait_for("the transferred call", Duration::from_secs(10), || {
        let (_, text) = c
            .admin(&[1], &["calls", "list", "--no-media", "--output", "json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let calls = v.as_array()?;
        (calls.len() == 1 && calls[0]["callee"] == Users::name(3))
            .then(|| calls[0]["id"].as_str().map(str::to_string))
            .flatten()
    })
    .unwrap();
    let (code, text) = c.admin(&[1], &["calls", "hangup", &id]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert_all_ok(&bob.wait().unwrap(), 1, "u2 never saw the transfer");
    assert_all_ok(&carol.wait().unwrap(), 1, "u3: answered, moved, hung up");
}

/// `Transfer()` with a real phone as the one sent away: baresip (u2) calls 852, whose
/// plan answers and transfers it to u3 with a REFER; baresip calls u3 itself (through
/// the node, with its credentials) and reports the outcome in NOTIFYs; the plan goes on
/// with `${TRANSFERSTATUS}` and hangs up the first call. u2 and u3 are then connected.
#[test]
fn the_transfer_application_sends_the_callers_phone_elsewhere() {
    require_tool("baresip", "baresip-core");
    let users = Users { count: 3 };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("extensions.conf");
    std::fs::write(
        &plan,
        format!(
            "[default]\nexten => 852,1,Answer()\n same => n,Transfer(SIP/{})\n \
             same => n,Log(NOTICE,transfer app ${{TRANSFERSTATUS}} ${{TRANSFERSTATUSPROTOCOL}})\n \
             same => n,Hangup()\n\
             exten => _u.,1,Dial(SIP/${{EXTEN}},20)\n",
            Users::name(3)
        ),
    )
    .unwrap();
    let c = LocalCluster::up_with_dialplan(85, 1, &users, MD5_ONLY, &plan).unwrap();
    let p = Phones::new(&c);
    let carol_ip = c.client_ip(52);
    let carol_port = free_udp_port(&carol_ip);
    p.register(1, 3, &carol_ip, carol_port);
    let carol = p.callee("uas_answer.xml", &carol_ip, carol_port, &[]);

    let (_bob, bob_dir, control) = baresip_u2(&c, false);
    let out_log = || std::fs::read_to_string(bob_dir.join("out.log")).unwrap_or_default();
    Baresip::command(control, "dial", "sip:852@pbx.test").unwrap();
    wait_for(
        "the plan saw the transfer through",
        Duration::from_secs(20),
        || c.log(1).contains("transfer app SUCCESS 200").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", c.log(1), out_log()));
    // The call baresip placed to u3 is up; an operator ends it.
    let id = wait_for("u2's call to u3", Duration::from_secs(10), || {
        let (_, text) = c
            .admin(&[1], &["calls", "list", "--no-media", "--output", "json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let calls = v.as_array()?;
        (calls.len() == 1 && calls[0]["callee"] == Users::name(3))
            .then(|| calls[0]["id"].as_str().map(str::to_string))
            .flatten()
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", c.log(1), out_log()));
    let (code, text) = c.admin(&[1], &["calls", "hangup", &id]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert_all_ok(&carol.wait().unwrap(), 1, "u3 answered u2's new call");
    assert!(c.log(1).contains(&format!(
        "Transfer: REFER to sip:{}@pbx.test",
        Users::name(3)
    )));
}

/// An INVITE with Replaces from a SIPp phone: u1 calls u2; u3 sends an INVITE with
/// `Replaces` naming u1's dialog with the node. u1 is hung up, u2 gets u3's offer in a
/// re-INVITE (and never a new call), u3 is answered with u2's answer and, later, hangs
/// up: u2 gets the BYE.
#[test]
fn an_invite_with_replaces_takes_over_a_party_of_another_call() {
    let users = Users { count: 3 };
    let c = LocalCluster::up(86, 1, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let bob_ip = c.client_ip(51);
    let bob_port = free_udp_port(&bob_ip);
    p.register(1, 2, &bob_ip, bob_port);
    let bob = p.callee("uas_moved.xml", &bob_ip, bob_port, &["-trace_logs"]);
    let csv = |caller: usize, callee: usize, rest: &str| {
        format!(
            "SEQUENTIAL\n{};pbx.test;{};{};{};9{rest}\n",
            Users::name(caller),
            Users::password(caller),
            Users::name(callee),
            c.client_ip(99)
        )
    };
    let inf = p.file("first.csv", &csv(1, 2, ""));
    let first = p.sipp(
        "uac_replaced.xml",
        1,
        &c.client_ip(61),
        &inf,
        &["-cid_str", "att2-%u", "-trace_logs"],
    );
    let node_tag = logged(&c, "node tag ");
    let inf = p.file(
        "replacing.csv",
        &csv(3, 2, &format!(";att2-1;{node_tag};at2-1")),
    );
    let replacing = p.sipp(
        "uac_replaces.xml",
        1,
        &c.client_ip(62),
        &inf,
        &["-d", "1000", "-trace_logs"],
    );
    let run = replacing.wait().unwrap();
    assert!(
        run.successful == 1 && run.failed == 0,
        "u3 replaced u1 and hung up: {}\n{}",
        run.tail(30),
        c.log(1)
    );
    assert_all_ok(&first.wait().unwrap(), 1, "u1 hung up by the node");
    assert_all_ok(&bob.wait().unwrap(), 1, "u2: one call, a re-INVITE, a BYE");
    let log = c.log(1);
    assert!(
        log.contains(&format!(
            "{} is taken over by the INVITE with Replaces",
            Users::name(2)
        )),
        "{log}"
    );
}

/// Dial's `t`: u1 calls u2 through `Dial(…,t)`; u2 keys `#1`, `34`, `#` as RFC 4733
/// events (Debian's recordings, played by SIPp) and is hung up; u1 is sent to 34, which
/// rings u3; u1's BYE reaches u3.
#[test]
fn the_callee_transfers_with_the_keys_dial_t_allows() {
    let users = Users { count: 3 };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("extensions.conf");
    std::fs::write(
        &plan,
        format!(
            "[default]\nexten => 400,1,Dial(SIP/{},20,t)\nexten => 34,1,Dial(SIP/{},20)\n",
            Users::name(2),
            Users::name(3)
        ),
    )
    .unwrap();
    let c = LocalCluster::up_with_dialplan(87, 1, &users, MD5_ONLY, &plan).unwrap();
    let p = Phones::new(&c);
    let carol_ip = c.client_ip(52);
    let carol_port = free_udp_port(&carol_ip);
    p.register(1, 3, &carol_ip, carol_port);
    let carol = p.callee("uas_answer.xml", &carol_ip, carol_port, &[]);

    // The recordings' timestamps grow from 1 to 3, 4 and #; the first # is older than
    // 1 (a stream started over, as the relay takes it).
    let keys: String = ["pound", "1", "3", "4", "pound"]
        .iter()
        .map(|k| {
            let pcap = format!("/usr/share/sip-tester/dtmf_2833_{k}.pcap");
            assert!(Path::new(&pcap).exists(), "{pcap}: install sip-tester");
            format!(
                "  <nop><action><exec play_pcap_audio=\"{pcap}\"/></action></nop>\n  <pause milliseconds=\"600\"/>\n"
            )
        })
        .collect();
    let template = std::fs::read_to_string(pbx_tests::repo_root().join("tests/sipp/uas_keys.xml"))
        .unwrap()
        .replace("KEYS\n", &keys);
    let scenario = p.file("uas_keys.xml", &template);
    let bob_ip = c.client_ip(51);
    let bob_port = free_udp_port(&bob_ip);
    p.register(1, 2, &bob_ip, bob_port);
    let bob_media = free_udp_port(&bob_ip).to_string();
    let bob = p.callee(
        scenario.to_str().unwrap(),
        &bob_ip,
        bob_port,
        &["-mi", &bob_ip, "-mp", &bob_media],
    );
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let alice = p.call("uac_call.xml", 1, 1, "400", nowhere, 8000);
    let run = bob.wait().unwrap();
    let log = c.log(1);
    assert!(
        run.successful == 1 && run.failed == 0,
        "u2 keyed the transfer and was hung up: {}\n{log}",
        run.tail(30)
    );
    assert!(log.contains("B keyed a transfer"), "{log}");
    assert!(log.contains("transfer to 34 completed"), "{log}");
    assert_all_ok(&alice.wait().unwrap(), 1, "u1's call, transferred");
    assert_all_ok(&carol.wait().unwrap(), 1, "u3 answered and got u1's BYE");
}
