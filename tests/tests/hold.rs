//! Hold and music on hold with real SIPp phones: the caller puts the callee on hold
//! (re-INVITE `sendonly`), the node answers it itself (`recvonly`) and the callee's
//! media socket receives the music of class `default`, packet for packet; the resume
//! (`sendrecv`) stops it. The callee never sees a re-INVITE (its scenario would fail).

use std::net::{SocketAddr, UdpSocket};

use pbx_tests::{
    assert_all_ok, free_udp_port, repo_root, require_tool, sipp_logs, LocalCluster, Phones, Users,
};

#[test]
fn a_held_party_hears_the_music_until_the_call_is_resumed() {
    require_tool("sipp", "sip-tester");
    let users = Users { count: 3 };
    let c = LocalCluster::up(81, 1, &users, &pbx_tests::md5_with_sounds()).unwrap();
    let p = Phones::new(&c);
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    let bob_media = UdpSocket::bind((bob_ip.as_str(), 0)).unwrap();
    p.register(1, 2, &bob_ip, bob_port);
    let uas = p.callee_with_media(
        "uas_answer.xml",
        &bob_ip,
        bob_port,
        &bob_media.local_addr().unwrap().to_string(),
        &[],
    );
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    // Held for 3 s (SIPp's -d), then resumed, then 1.5 s more before the BYE.
    let uac = p.call("uac_hold.xml", 1, 1, &Users::name(2), nowhere, 3000);
    let (run, packets) = pbx_tests::received_during(&bob_media, || uac.wait().unwrap());
    // RTP payloads with their payload type.
    let got: Vec<(u8, Vec<u8>)> = packets
        .iter()
        .filter(|p| p.len() >= 12)
        .map(|p| (p[1] & 0x7f, p[12..].to_vec()))
        .collect();
    assert_all_ok(&run, 1, "hold and resume");
    assert_all_ok(&uas.wait().unwrap(), 1, "the callee saw no re-INVITE");
    let logs = sipp_logs(&c);
    assert!(logs.contains("sendonly answered a=recvonly"), "{logs}");
    assert!(logs.contains("sendrecv answered a=sendrecv"), "{logs}");

    // Everything bob received is the music, from its start, in order (PCMU).
    let music = std::fs::read(repo_root().join("deploy/sounds/moh/default/arpeggio.ulaw")).unwrap();
    assert!(!got.is_empty(), "bob heard nothing on hold");
    for (i, (pt, payload)) in got.iter().enumerate() {
        assert_eq!(*pt, 0, "packet {i}: PCMU");
        let at = i * 160 % music.len();
        assert_eq!(payload[..], music[at..at + payload.len()], "packet {i}");
    }
    // About the 3 s on hold (50 packets a second); had the resume not stopped it,
    // the 1.5 s after it would add 75 more.
    assert!(
        (100..=190).contains(&got.len()),
        "{} music packets for a 3 s hold",
        got.len()
    );
    assert!(c.log(1).contains("A put the call on hold"));
    assert!(c.log(1).contains("music on hold (default) to B"));
    assert!(c.log(1).contains("resumed the call"));
}
