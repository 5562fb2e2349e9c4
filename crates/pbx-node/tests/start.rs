//! One node in this process on port-0 listeners: `Node::start` serves SIP on sockets bound
//! by the caller, and a REGISTER goes through the endpoint, the commit and back.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

mod support;

use pbx_node::{Config, Listeners, Node};
use pbx_sip_msg::{parse_datagram, HeaderName, Limits};
use support::{answer_challenge, exchange, register_request};
use tokio::net::UdpSocket;

fn invite(phone: SocketAddr, branch: &str, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
    format!(
        "INVITE sip:nobody@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {phone};rport;branch=z9hG4bK{branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=a2\r\nTo: <sip:nobody@pbx.test>\r\n\
         Call-ID: start-inv-{branch}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{phone}>\r\n{auth}\
         Content-Length: 0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_port_zero_listeners_registers_a_phone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.csv"), "alice,secret\n").unwrap();
    let config = Config::parse(
        "[node]\nid = 1\ndata_dir = \"data\"\nsip_addr = \"127.0.0.1:0\"\n\
         [cluster]\ndomain = \"pbx.test\"\nusers_file = \"users.csv\"\n",
        Path::new("node.toml"),
        dir.path().to_path_buf(),
    )
    .unwrap();
    let listeners = Listeners::bind(&config).unwrap();
    let node = Node::start(config, listeners).await.unwrap();
    assert_ne!(node.sip_addr.port(), 0);
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = phone.local_addr().unwrap();

    // Until the cluster has committed its settings and users, REGISTER gets 503.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut cseq = 0;
    let challenge = loop {
        cseq += 1;
        let r = exchange(
            &phone,
            node.sip_addr,
            &register_request(me, "alice", &format!("c{cseq}"), cseq, None),
        )
        .await;
        if r.status() == Some(401) && node.cluster.read().users.contains_key("alice") {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let auth = answer_challenge(&challenge, "REGISTER", "sip:pbx.test", "alice", "secret");
    cseq += 1;
    let ok = exchange(
        &phone,
        node.sip_addr,
        &register_request(me, "alice", "auth", cseq, Some(&auth)),
    )
    .await;
    assert_eq!(ok.status(), Some(200));
    assert!(ok
        .header(&HeaderName::Contact)
        .unwrap()
        .starts_with(&format!("<sip:alice@{me}>;expires=")));
    assert_eq!(
        node.cluster
            .read()
            .bindings_of("alice", pbx_node::unix_ms())
            .len(),
        1
    );

    // A call to a user that does not exist: admitted, the dialplan dials, the call answers
    // 404 through the INVITE's transaction.
    let challenge = exchange(&phone, node.sip_addr, &invite(me, "i1", None)).await;
    assert_eq!(challenge.status(), Some(407));
    let auth = answer_challenge(
        &challenge,
        "INVITE",
        "sip:nobody@pbx.test",
        "alice",
        "secret",
    );
    let mut answer = exchange(&phone, node.sip_addr, &invite(me, "i2", Some(&auth))).await;
    while answer.status().is_some_and(|s| s < 200) {
        let mut buf = vec![0u8; 65_536];
        let n = tokio::time::timeout(Duration::from_secs(5), phone.recv(&mut buf))
            .await
            .expect("a final answer within 5 s")
            .unwrap();
        answer = parse_datagram(&buf[..n], &Limits::default()).unwrap();
    }
    assert_eq!(answer.status(), Some(404));
    assert_ne!(
        answer.header(&HeaderName::Warning),
        Some("399 pbxd \"no such extension\""),
        "answered by the call's Dial, not refused at admission"
    );
    node.stop().await;
}
