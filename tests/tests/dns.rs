//! The cluster's own DNS with `dig` (BIND's client): NAPTR → SRV → A for the members
//! that are alive, in the quorum and not draining; a killed node leaves the answers and
//! comes back when restarted; a node without a majority answers SERVFAIL.

use std::time::Duration;

use pbx_tests::{require_tool, wait_for, Baresip, LocalCluster, Named, RtpRates, Users};

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

/// `pbxctl dns check pbx.test --server DNS --output json` → (exit code, parsed output).
fn dns_check(server: std::net::SocketAddr) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(pbx_tests::bin("pbxctl"))
        .args(["dns", "check", "pbx.test", "--server", &server.to_string()])
        .args(["--timeout", "1", "--output", "json"])
        .output()
        .expect("running pbxctl");
    let text = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
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
            // The launcher turns TLS on (local CA): SIPS+D2T to port 5061 of each node.
            "pbx.test. 10 IN NAPTR 30 50 \"s\" \"SIPS+D2T\" \"\" _sips._tcp.pbx.test.",
        ]
    );
    let (_, tcp) = dig(&c, 3, "SRV", "_sip._tcp.pbx.test");
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    let (_, tls) = dig(&c, 3, "SRV", "_sips._tcp.pbx.test");
    assert_eq!(tls.len(), 3, "{tls:?}");
    assert!(tls.iter().all(|r| r.contains(" 5061 node")), "{tls:?}");
    let (_, a) = dig(&c, 1, "A", "node2.pbx.test");
    assert_eq!(
        a,
        vec![format!("node2.pbx.test. 10 IN A {}", c.node_addr(2).ip())]
    );
    let (status, _) = dig(&c, 1, "A", "nobody.pbx.test");
    assert_eq!(status, "NXDOMAIN");
    let (status, _) = dig(&c, 1, "A", "example.com");
    assert_eq!(status, "REFUSED", "not a recursive server");
    // pbxctl resolves it as a phone does and probes every target.
    let (code, check) = dns_check(c.dns_addr(1).unwrap());
    assert_eq!(code, 0, "{check}");
    assert_eq!(check["naptr"], true);
    let targets = check["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 9, "3 nodes x UDP, TCP, TLS: {check}");
    assert!(targets.iter().all(|t| t["reachable"] == true), "{check}");
    assert!(
        targets
            .iter()
            .all(|t| (t["share"].as_f64().unwrap() - 1.0 / 3.0).abs() < 0.01),
        "equal weights: a third each: {check}"
    );
    assert_eq!(check["warnings"], serde_json::json!([]));

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
    // Ready, it answers at once with every member it knows, not with itself alone until
    // its first probe round (resolvers would cache that for the TTL).
    assert_eq!(
        udp_targets(&c, 2),
        all_three(),
        "a restarted node's first answer"
    );
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

/// Where the softphone's DNS comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dns {
    /// The nodes themselves (records follow the live members).
    Cluster,
    /// BIND serving the zone `pbxctl dns zone` printed (static records).
    Bind,
}

/// A real softphone that knows only `sip:u000001@pbx.test` and a DNS server: it
/// registers through NAPTR/SRV; its node is killed; a call to it through a surviving
/// node connects at once (its binding was replicated), and it re-registers through
/// another node. Prints both times.
/// One SIPp call from user 2 to user 1 (the softphone) through `node`.
fn call_user_1(c: &LocalCluster, node: usize) -> pbx_tests::SippRun {
    let inf = c.dir.path().join("call.csv");
    std::fs::write(
        &inf,
        format!(
            "SEQUENTIAL\n{};pbx.test;{};{};{}.99;9\n",
            Users::name(2),
            Users::password(2),
            Users::name(1),
            c.prefix
        ),
    )
    .unwrap();
    pbx_tests::Sipp {
        scenario: "uac_call.xml",
        target: c.node_addr(node),
        local_ip: c.client_ip(60),
        inf: &inf,
        calls: 1,
        rate: 1,
        transport: "u1",
    }
    .run()
    .unwrap()
}

fn softphone_failover(slot: u8, source: Dns) {
    require_tool("dig", "bind9-dnsutils");
    require_tool("baresip", "baresip-core");
    require_tool("sipp", "sip-tester");
    let users = Users { count: 2 };
    // baresip 1.0 answers the first digest challenge only, and knows only MD5.
    let c = LocalCluster::up(
        slot,
        3,
        &users,
        "[auth]\nchallenge_algorithms = [\"MD5\"]\n",
    )
    .unwrap();
    let mut _named = None;
    let dns: Vec<std::net::SocketAddr> = match source {
        Dns::Cluster => (1..=3).map(|n| c.dns_addr(n).unwrap()).collect(),
        Dns::Bind => {
            require_tool("named", "bind9");
            let (code, zone) = c.admin(&[1], &["dns", "zone"]).unwrap();
            assert_eq!(code, 0, "{zone}");
            let ip = c.client_ip(53);
            _named = Some(Named::start(
                &c.dir.path().join("named"),
                &ip,
                "pbx.test",
                &zone,
            ));
            let server: std::net::SocketAddr = format!("{ip}:53").parse().unwrap();
            wait_for("named serving the zone", Duration::from_secs(15), || {
                let out = std::process::Command::new("dig")
                    .args([
                        &format!("@{ip}"),
                        "+short",
                        "+time=1",
                        "+tries=1",
                        "SRV",
                        "_sip._udp.pbx.test",
                    ])
                    .output()
                    .ok()?;
                (String::from_utf8_lossy(&out.stdout).lines().count() == 3).then_some(())
            })
            .unwrap();
            vec![server]
        }
    };
    // Only the domain: no outbound proxy, no server address. regint 60 (the cluster's
    // minimum): a refresh every 54 s.
    let _phone = Baresip::start(
        &c.dir.path().join("baresip"),
        &c.client_ip(50),
        5070,
        &dns,
        &format!(
            "<sip:{}@pbx.test>;auth_pass={};regint=60;answermode=auto;audio_codecs=PCMU",
            Users::name(1),
            Users::password(1)
        ),
    );
    let home = wait_for(
        "the softphone registered through DNS",
        Duration::from_secs(15),
        || c.bound_via(&[1, 2, 3], &Users::name(1)).first().copied(),
    )
    .unwrap() as usize;
    let killed_at = std::time::Instant::now();
    c.kill(home).unwrap();
    let survivor = (1..=3).find(|&n| n != home).unwrap();
    if source == Dns::Bind {
        // The static zone still lists the dead node: dns check says which target is down.
        let (code, check) = dns_check(dns[0]);
        assert_eq!(code, 5, "{check}");
        for t in check["targets"].as_array().unwrap() {
            let dead = t["target"] == format!("node{home}.pbx.test.");
            assert_eq!(t["reachable"], !dead, "{t}");
        }
    }

    // A call from u2 through a surviving node: the replicated binding reaches the phone.
    let call = call_user_1(&c, survivor);
    let call_after = killed_at.elapsed();
    pbx_tests::assert_all_ok(&call, 1, "call to the softphone through a surviving node");

    // Cluster DNS: the next refresh (≤ 54 s) goes to a live node. Static BIND records
    // still list the dead node: the phone may first wait out a transaction timeout.
    let limit = match source {
        Dns::Cluster => Duration::from_secs(75),
        Dns::Bind => Duration::from_secs(180),
    };
    let moved = wait_for("re-registered through another node", limit, || {
        let nodes = c.bound_via(&[1, 2, 3], &Users::name(1));
        nodes.iter().any(|&n| n as usize != home).then_some(nodes)
    })
    .unwrap();
    let rereg_after = killed_at.elapsed();
    eprintln!(
        "softphone (UDP, regint 60, DNS: {source:?}) registered via node {home}; node killed; call through node {survivor} \
         connected {:.1} s after the kill; re-registered via {moved:?} {:.1} s after the kill",
        call_after.as_secs_f64(),
        rereg_after.as_secs_f64()
    );
}

#[test]
fn a_softphone_finds_the_cluster_by_its_domain_and_survives_its_node() {
    softphone_failover(51, Dns::Cluster);
}

#[test]
fn a_softphone_finds_the_cluster_through_bind_serving_the_printed_zone() {
    softphone_failover(52, Dns::Bind);
}

/// The zone and named.conf snippet shipped in deploy/dns pass BIND's own checkers.
#[test]
fn deploy_dns_files_pass_bind_checks() {
    require_tool("named-checkzone", "bind9-utils");
    let dns = pbx_tests::repo_root().join("deploy/dns");
    let zone = dns.join("pbx.example.com.zone");
    let out = std::process::Command::new("named-checkzone")
        .arg("pbx.example.com")
        .arg(&zone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let snippet = std::fs::read_to_string(dns.join("named.conf.snippet"))
        .unwrap()
        .replace("/etc/bind/pbx.example.com.zone", zone.to_str().unwrap());
    let conf = dir.path().join("named.conf");
    std::fs::write(
        &conf,
        format!(
            "options {{ directory \"{}\"; }};\n{snippet}",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("named-checkconf")
        .arg("-z")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `Dial(SIP/555@provider.test)`: the node finds the provider by NAPTR/SRV (BIND), its
/// first server is dead (silent): after a few seconds the same INVITE goes to the next
/// one, which answers; the next call goes to the live server first (dead-target memory).
#[test]
fn dial_to_another_domain_fails_over_to_the_next_srv_target() {
    let slot = 53u8;
    let prefix = format!("127.0.{slot}");
    let p = pbx_tests::ProviderDomain::start(
        slot,
        &format!(
            "@ IN NAPTR 10 50 \"s\" \"SIP+D2U\" \"\" _sip._udp.provider.test.\n\
             _sip._udp IN SRV 10 50 5060 dead.provider.test.\n\
             _sip._udp IN SRV 20 50 5060 live.provider.test.\n\
             dead IN A {prefix}.21\nlive IN A {prefix}.22\n"
        ),
    );
    let (c, dir, uac_inf) = (&p.cluster, p.dir.path(), &p.uac_inf);
    let uas_inf = dir.join("uas.csv");
    std::fs::write(&uas_inf, format!("SEQUENTIAL\n{prefix}.22;9\n")).unwrap();
    let call = || {
        let provider = pbx_tests::Sipp {
            scenario: "uas_answer.xml",
            target: c.node_addr(1),
            local_ip: format!("{prefix}.22"),
            inf: &uas_inf,
            calls: 1,
            rate: 1,
            transport: "u1",
        }
        .spawn(&["-p", "5060"])
        .unwrap();
        let started = std::time::Instant::now();
        let run = pbx_tests::Sipp {
            scenario: "uac_call.xml",
            target: c.node_addr(1),
            local_ip: c.client_ip(60),
            inf: uac_inf,
            calls: 1,
            rate: 1,
            transport: "u1",
        }
        .run()
        .unwrap();
        let took = started.elapsed();
        pbx_tests::assert_all_ok(&run, 1, "call to 555@provider.test");
        pbx_tests::assert_all_ok(&provider.wait().unwrap(), 1, "the provider's live server");
        took
    };
    let first = call();
    // The dead server was given up and the same INVITE went to the next one (that this
    // happens after 4 s of silence, not Timer B, is tested on virtual time in pbx-b2bua).
    let failovers = |c: &LocalCluster| {
        c.log(1)
            .matches("did not answer for sip:555@provider.test")
            .count()
    };
    assert_eq!(failovers(c), 1, "{}", c.log(1));
    let second = call();
    assert_eq!(
        failovers(c),
        1,
        "the dead server remembered: the live one tried first\n{}",
        c.log(1)
    );
    eprintln!(
        "Dial to provider.test: first call {:.1} s (dead first target, failover), second {:.1} s",
        first.as_secs_f64(),
        second.as_secs_f64()
    );
}

/// RFC 5626 flow recovery: baresip over TCP with `sipnat=outbound` and only the domain as
/// its outbound proxy registers through the cluster DNS and is called (SIPp over UDP,
/// RTP both ways) through the node holding its flow; that node is SIGKILLed with the
/// call up. The phone sees its connection close and registers again through a survivor
/// long before its 600 s refresh; the adopted call waits for that new flow, is
/// re-INVITEd over it and carries media again; the caller's BYE ends it there; and a new
/// call reaches the phone. Prints the times from the kill.
#[test]
fn a_tcp_softphone_with_outbound_keeps_its_call_through_a_survivor() {
    require_tool("dig", "bind9-dnsutils");
    require_tool("baresip", "baresip-core");
    require_tool("sipp", "sip-tester");
    let users = Users { count: 2 };
    let c = LocalCluster::up(56, 3, &users, "[auth]\nchallenge_algorithms = [\"MD5\"]\n").unwrap();
    let dns: Vec<std::net::SocketAddr> = (1..=3).map(|n| c.dns_addr(n).unwrap()).collect();
    // Outbound needs the phone's instance id (+sip.instance): baresip's uuid module
    // makes one (in `uuid` in its directory).
    let phone_dir = c.dir.path().join("baresip");
    let out_log = || std::fs::read_to_string(phone_dir.join("out.log")).unwrap_or_default();
    let _phone = Baresip::start_with(
        &phone_dir,
        &c.client_ip(50),
        5070,
        &dns,
        &format!(
            "<sip:{}@pbx.test;transport=tcp>;auth_pass={};outbound=\"sip:pbx.test;transport=tcp\";\
             sipnat=outbound;regint=600;answermode=auto;audio_codecs=PCMU",
            Users::name(1),
            Users::password(1)
        ),
        "module_tmp uuid.so\n",
    );
    let home = wait_for(
        "the softphone registered over TCP through DNS",
        Duration::from_secs(20),
        || c.bound_via(&[1, 2, 3], &Users::name(1)).first().copied(),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", out_log())) as usize;

    // u2 calls the phone through its home node and plays audio for 100 s.
    let sipp_dir = c.dir.path().join("caller");
    std::fs::create_dir_all(&sipp_dir).unwrap();
    std::fs::copy(
        pbx_tests::repo_root().join("deploy/sounds/hello-world.ulaw"),
        sipp_dir.join("survive.ulaw"),
    )
    .unwrap();
    let inf = sipp_dir.join("caller.csv");
    std::fs::write(
        &inf,
        format!(
            "SEQUENTIAL\n{};pbx.test;{};{}\n",
            Users::name(2),
            Users::password(2),
            Users::name(1)
        ),
    )
    .unwrap();
    let caller = pbx_tests::Sipp {
        scenario: "uac_call_survive.xml",
        target: c.node_addr(home),
        local_ip: c.client_ip(61),
        inf: &inf,
        calls: 1,
        rate: 1,
        transport: "u1",
    }
    .spawn(&["-d", "100000", "-timeout", "200s", "-trace_err"])
    .unwrap();
    let rates = |from: usize| RtpRates::parse(&out_log(), from);
    wait_for(
        "the call answered, audio at the phone",
        Duration::from_secs(20),
        || rates(0).receiving().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", out_log()));

    let at_kill = out_log().len();
    let killed_at = std::time::Instant::now();
    c.kill(home).unwrap();
    let survivor = (1..=3).find(|&n| n != home).unwrap();
    let again = wait_for(
        "the softphone registered again through a survivor",
        Duration::from_secs(120),
        || {
            c.bound_via(&[1, 2, 3], &Users::name(1))
                .iter()
                .any(|&n| n as usize != home)
                .then(|| killed_at.elapsed())
        },
    )
    .unwrap();
    // The adopted call waited for the new flow: re-INVITEd over it, audio again.
    let media_back = wait_for(
        "the call re-anchored over the new flow, audio at the phone again",
        Duration::from_secs(100),
        || {
            let r = rates(at_kill);
            (r.dipped() && r.receiving()).then(|| killed_at.elapsed())
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", out_log(), c.log(survivor)));
    eprintln!(
        "TCP phone with outbound, called through its node, which is killed: registered again \
         through a survivor after {} ms, its call re-anchored over the new flow with audio \
         after {} ms",
        again.as_millis(),
        media_back.as_millis()
    );
    // The caller's BYE (after its 100 s) reaches the phone over the new flow.
    let run = caller.wait().unwrap();
    pbx_tests::assert_all_ok(&run, 1, "the caller's call across the kill");
    wait_for(
        "the phone's call ended by the BYE",
        Duration::from_secs(10),
        || out_log()[at_kill..].contains("terminated").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", out_log()));

    // Reachable there: a new call from u2 through the survivor rings it over the new flow.
    let call = call_user_1(&c, survivor);
    pbx_tests::assert_all_ok(&call, 1, "call to the TCP softphone on its new flow");
}
