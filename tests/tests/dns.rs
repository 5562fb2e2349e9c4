//! The cluster's own DNS with `dig` (BIND's client): NAPTR → SRV → A for the members
//! that are alive, in the quorum and not draining; a killed node leaves the answers and
//! comes back when restarted; a node without a majority answers SERVFAIL.

use std::time::Duration;

use pbx_tests::{require_tool, wait_for, LocalCluster, Users};

/// `dig @node -p port TYPE name` → (status, answer lines).
fn dig(c: &LocalCluster, node: usize, rtype: &str, name: &str) -> (String, Vec<String>) {
    let addr = c
        .dns_addr(node)
        .expect("the launcher turns the cluster DNS on");
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .args([
            "+norec",
            "+time=1",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
        ])
        .args([rtype, name])
        .output()
        .expect("running dig");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (status, answers)
}

/// The SRV targets `node` publishes for UDP, sorted.
fn udp_targets(c: &LocalCluster, node: usize) -> Vec<String> {
    let (_, answers) = dig(c, node, "SRV", "_sip._udp.pbx.test");
    let mut t: Vec<String> = answers
        .iter()
        .filter_map(|l| l.split(' ').nth(7).map(str::to_string))
        .collect();
    t.sort();
    t
}

fn all_three() -> Vec<String> {
    (1..=3).map(|n| format!("node{n}.pbx.test.")).collect()
}

#[test]
fn cluster_dns_follows_the_live_members() {
    require_tool("dig", "bind9-dnsutils");
    let users = Users { count: 2 };
    let c = LocalCluster::up(50, 3, &users, "").unwrap();

    // Every node answers the whole chain, authoritatively.
    wait_for(
        "all three published by every node",
        Duration::from_secs(10),
        || {
            (1..=3)
                .all(|n| udp_targets(&c, n) == all_three())
                .then_some(())
        },
    )
    .unwrap();
    let (status, naptr) = dig(&c, 2, "NAPTR", "pbx.test");
    assert_eq!(status, "NOERROR");
    assert_eq!(
        naptr,
        vec![
            "pbx.test. 10 IN NAPTR 10 50 \"s\" \"SIP+D2U\" \"\" _sip._udp.pbx.test.",
            "pbx.test. 10 IN NAPTR 20 50 \"s\" \"SIP+D2T\" \"\" _sip._tcp.pbx.test.",
        ]
    );
    let (_, tcp) = dig(&c, 3, "SRV", "_sip._tcp.pbx.test");
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    let (_, a) = dig(&c, 1, "A", "node2.pbx.test");
    assert_eq!(
        a,
        vec![format!("node2.pbx.test. 10 IN A {}", c.node_addr(2).ip())]
    );
    let (status, _) = dig(&c, 1, "A", "nobody.pbx.test");
    assert_eq!(status, "NXDOMAIN");
    let (status, _) = dig(&c, 1, "A", "example.com");
    assert_eq!(status, "REFUSED", "not a recursive server");

    // Node 2 killed: gone from the others' answers within a probe; back once restarted.
    c.kill(2).unwrap();
    let without_2 = vec!["node1.pbx.test.".to_string(), "node3.pbx.test.".to_string()];
    wait_for("node 2 left out", Duration::from_secs(5), || {
        (udp_targets(&c, 1) == without_2 && udp_targets(&c, 3) == without_2).then_some(())
    })
    .unwrap();
    let (status, _) = dig(&c, 1, "A", "node2.pbx.test");
    assert_eq!(status, "NXDOMAIN");
    c.start(2).unwrap();
    wait_for("node 2 back", Duration::from_secs(10), || {
        (1..=3)
            .all(|n| udp_targets(&c, n) == all_three())
            .then_some(())
    })
    .unwrap();

    // A drained node disappears at once (replicated flag), and returns when undrained.
    let (code, text) = c.admin(&[1], &["node", "drain", "--node", "3"]).unwrap();
    assert_eq!(code, 0, "{text}");
    wait_for("node 3 drained out", Duration::from_secs(5), || {
        (udp_targets(&c, 1) == vec!["node1.pbx.test.".to_string(), "node2.pbx.test.".to_string()])
            .then_some(())
    })
    .unwrap();
    let (code, text) = c.admin(&[1], &["node", "undrain", "--node", "3"]).unwrap();
    assert_eq!(code, 0, "{text}");
    wait_for("node 3 back in", Duration::from_secs(5), || {
        (udp_targets(&c, 2) == all_three()).then_some(())
    })
    .unwrap();

    // Node 1 alone: it cannot know who is alive with the majority: SERVFAIL, so a
    // resolver asks another name server.
    c.kill(2).unwrap();
    c.kill(3).unwrap();
    wait_for(
        "SERVFAIL from the minority",
        Duration::from_secs(10),
        || (dig(&c, 1, "SRV", "_sip._udp.pbx.test").0 == "SERVFAIL").then_some(()),
    )
    .unwrap();
}
