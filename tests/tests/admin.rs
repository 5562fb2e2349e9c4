//! The admin API through `pbxctl`: bearer token, endpoint fallback, JSON output parsed
//! back, exit codes, and dialplan changes that land on every node or on none.

use std::time::Duration;

use pbx_tests::{wait_for, LocalCluster, Sipp, Users};

#[test]
fn admin_api_round_trips_with_token_fallback_and_exit_codes() {
    let users = Users { count: 5 };
    let c = LocalCluster::up(45, 3, &users, "").unwrap();

    // A dead endpoint first: the next one answers; JSON parses back.
    let dead = format!("{}.99:7002", c.prefix);
    let token = std::fs::read_to_string(c.run_dir().join("admin.token")).unwrap();
    let out = std::process::Command::new(pbx_tests::bin("pbxctl"))
        .args(["--endpoint", &dead, "--endpoint", &c.admin_addr(2)])
        .args(["cluster", "status", "--output", "json"])
        .env("PBX_ADMIN_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node_id"], 2);
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
    assert_eq!(v["users"], 5);
    // The leader knows every member's replication lag (all caught up when idle).
    let leader = v["leader_id"].as_u64().unwrap() as usize;
    wait_for(
        "every member caught up, as the leader sees it",
        Duration::from_secs(10),
        || {
            let (code, text) = c
                .admin(&[leader], &["cluster", "status", "--output", "json"])
                .ok()?;
            let s: serde_json::Value = serde_json::from_str(&text).ok()?;
            (code == 0
                && s["role"] == "leader"
                && s["members"]
                    .as_array()?
                    .iter()
                    .all(|m| m["lag"].as_u64() == Some(0)))
            .then_some(())
        },
    )
    .unwrap();

    // The BIND zone for operators who keep their own DNS: the cluster's domain, every
    // member (node 3 as backup), accepted by BIND's own checker.
    pbx_tests::require_tool("named-checkzone", "bind9-utils");
    let (code, zone) = c
        .admin(
            &[2],
            &["dns", "zone", "--backup", "3", "--tls-port", "5061"],
        )
        .unwrap();
    assert_eq!(code, 0, "{zone}");
    for line in [
        "pbx.test. 30 IN NAPTR 10 50 \"s\" \"SIP+D2U\" \"\" _sip._udp.pbx.test.".to_string(),
        "pbx.test. 30 IN NAPTR 30 50 \"s\" \"SIPS+D2T\" \"\" _sips._tcp.pbx.test.".to_string(),
        "_sip._udp.pbx.test. 30 IN SRV 10 50 5060 node1.pbx.test.".to_string(),
        "_sip._tcp.pbx.test. 30 IN SRV 20 50 5060 node3.pbx.test.".to_string(),
        "_sips._tcp.pbx.test. 30 IN SRV 10 50 5061 node2.pbx.test.".to_string(),
        format!("node3.pbx.test. 30 IN A {}", c.node_addr(3).ip()),
    ] {
        assert!(zone.lines().any(|l| l == line), "{line}\n{zone}");
    }
    let zone_file = c.dir.path().join("pbx.test.zone");
    std::fs::write(&zone_file, &zone).unwrap();
    let check = std::process::Command::new("named-checkzone")
        .arg("pbx.test")
        .arg(&zone_file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        zone
    );

    // Wrong token: 4, and nothing about the token in the node's log.
    let out = std::process::Command::new(pbx_tests::bin("pbxctl"))
        .args([
            "--endpoint",
            &c.admin_addr(1),
            "--token",
            "not-the-right-token-at-all",
        ])
        .args(["dialplan", "show"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !c.log(1).contains(token.trim()),
        "the token never appears in logs"
    );
    // No endpoint answers: 3.
    let out = std::process::Command::new(pbx_tests::bin("pbxctl"))
        .args([
            "--endpoint",
            &dead,
            "--token",
            token.trim(),
            "cluster",
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));

    // An invalid dialplan: refused with FILE:LINE, exit 1, version unchanged everywhere.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.conf");
    std::fs::write(
        &bad,
        "[default]\nexten => 1,1,Answer()\n same => n,Frob()\n",
    )
    .unwrap();
    let (code, text) = c
        .admin(&[3], &["dialplan", "apply", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("bad.conf:3: unknown application \"Frob\""),
        "{text}"
    );
    let (_, shown) = c
        .admin(&[1], &["dialplan", "show", "--output", "json"])
        .unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["version"], 1);

    // Applied through a follower: version 2 on all three nodes; history; rollback = 3.
    let good = dir.path().join("good.conf");
    std::fs::write(
        &good,
        "[default]\nexten => 600,1,Answer()\n same => n,Echo()\n",
    )
    .unwrap();
    // --dry-run: the difference from version 1 and the verdict, nothing committed.
    let (code, text) = c
        .admin(
            &[3],
            &["dialplan", "apply", "--dry-run", good.to_str().unwrap()],
        )
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("--- version 1 (in force)"), "{text}");
    assert!(text.contains("+exten => 600,1,Answer()"), "{text}");
    assert!(text.contains("-include => features"), "{text}");
    assert!(!text.contains("committed"), "{text}");
    let (code, text) = c
        .admin(&[3], &["dialplan", "apply", good.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("+exten => 600,1,Answer()"),
        "the diff first: {text}"
    );
    assert!(text.contains("committed as version 2"), "{text}");
    // The same text again: nothing to commit.
    let (code, text) = c
        .admin(&[2], &["dialplan", "apply", good.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("identical to version 2"), "{text}");
    wait_for("dialplan 2 on every node", Duration::from_secs(10), || {
        (1..=3)
            .all(|n| c.status(n).and_then(|s| s.get("dialplan").cloned()) == Some("2".into()))
            .then_some(())
    })
    .unwrap();
    let (_, h) = c
        .admin(&[2], &["dialplan", "history", "--output", "json"])
        .unwrap();
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 2);
    let (code, text) = c.admin(&[1], &["dialplan", "rollback", "1"]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("committed as version 3"), "{text}");
    let (code, _) = c.admin(&[1], &["dialplan", "rollback", "42"]).unwrap();
    assert_eq!(code, 6, "no such version: not found");
}

#[test]
fn users_and_registrations_through_pbxctl() {
    let users = Users { count: 2 };
    let c = LocalCluster::up(46, 3, &users, "").unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let (code, text) = c.admin(&[1, 2, 3], &a).unwrap();
        assert_eq!(code, 0, "{args:?}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    };
    let u = json(&[
        "user",
        "add",
        "carol",
        "--password",
        "carol-secret",
        "--context",
        "sales",
    ]);
    assert_eq!(u["context"], "sales");
    let (code, text) = c
        .admin(&[2], &["user", "add", "carol", "--password", "x"])
        .unwrap();
    assert_eq!(code, 1, "already exists: {text}");
    // carol registers with her new password through node 3.
    let (ok, out) = pbx_tests::pbxctl(&[
        "register",
        &c.node_addr(3).to_string(),
        "--user",
        "carol",
        "--password",
        "carol-secret",
    ])
    .unwrap();
    assert!(ok, "{out}");
    let regs = json(&["registrations", "list", "--user", "carol"]);
    assert_eq!(regs.as_array().unwrap().len(), 1);
    assert_eq!(regs[0]["node_id"], 3);
    assert_eq!(regs[0]["transport"], "UDP");
    let gone = json(&["registrations", "remove", "carol"]);
    assert_eq!(gone["removed"], 1);
    assert!(json(&["registrations", "list", "--user", "carol"])
        .as_array()
        .unwrap()
        .is_empty());
    // A new password: the old one is refused, the new one works.
    json(&["user", "update", "carol", "--password", "carol-new-secret"]);
    let (ok, _) = pbx_tests::pbxctl(&[
        "register",
        &c.node_addr(1).to_string(),
        "--user",
        "carol",
        "--password",
        "carol-secret",
    ])
    .unwrap();
    assert!(!ok, "the old password is refused");

    // Import: a malformed file changes nothing; a good one adds and updates.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "user,password\ndave,pw1\nerin\n").unwrap();
    let (code, text) = c
        .admin(&[1], &["user", "import", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("bad.csv:3:"), "{text}");
    let names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(!names(json(&["user", "list"])).contains(&"dave".to_string()));
    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        "user,password\ndave,pw-dave,default,Dave D\ncarol,pw-carol\n",
    )
    .unwrap();
    let r = json(&["user", "import", good.to_str().unwrap()]);
    assert_eq!(
        (r["added"].as_u64(), r["updated"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, export) = c.admin(&[2], &["user", "export"]).unwrap();
    assert!(export.contains("dave,default,Dave D"), "{export}");
    let r = json(&["user", "remove", "dave"]);
    assert_eq!(r["removed"], "dave");
    let (code, _) = c.admin(&[1], &["user", "remove", "dave"]).unwrap();
    assert_eq!(code, 6, "unknown user: not found");
    assert_eq!(
        names(json(&["user", "list"])).len(),
        3,
        "u000001, u000002, carol"
    );

    // Every change is in the replicated audit trail, read from any node, secrets never.
    let (code, text) = c.admin(&[3], &["audit", "--output", "json"]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("secret") && !text.contains("pw-"), "{text}");
    let audit: serde_json::Value = serde_json::from_str(&text).unwrap();
    let actions: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "user add carol (password, context)",
        "registrations remove carol",
        "user update carol (password)",
        "user add dave (password, context, caller id name)",
        "user remove dave",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want}: {actions:?}");
    }
    let first = &audit[0];
    assert!(first["at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(
        first["actor"].as_str().unwrap().contains(" from "),
        "{first}"
    );
    let (_, last) = c.admin(&[1], &["audit", "--limit", "1"]).unwrap();
    assert!(last.contains("user remove dave"), "{last}");

    // No quorum: node 1 alone refuses every change (exit 5, a clear reason), and once
    // the others are back none of them happened.
    let version = json(&["dialplan", "show"])["version"].clone();
    let audited = json(&["audit"]).as_array().unwrap().len();
    c.kill(2).unwrap();
    c.kill(3).unwrap();
    wait_for("node 1 sees no majority", Duration::from_secs(15), || {
        c.status(1)
            .filter(|s| s.get("serving_writes").map(String::as_str) == Some("false"))
    })
    .unwrap();
    let plan = c.dir.path().join("nq.conf");
    std::fs::write(&plan, "[default]\nexten => 1,1,Hangup()\n").unwrap();
    for args in [
        &["user", "add", "erin", "--password", "pw-erin"][..],
        &["user", "update", "carol", "--context", "nq"],
        &["dialplan", "apply", plan.to_str().unwrap()],
        &["node", "drain", "--node", "1"],
        &["registrations", "remove", "carol"],
    ] {
        let (code, text) = c.admin(&[1], args).unwrap();
        assert_eq!(code, 5, "{args:?}: {text}");
        assert!(
            text.contains("no quorum, not committed"),
            "{args:?}: {text}"
        );
    }
    // Reads still answer.
    let (code, text) = c.admin(&[1], &["user", "list"]).unwrap();
    assert_eq!(code, 0, "{text}");
    c.start(2).unwrap();
    c.start(3).unwrap();
    let users = json(&["user", "list"]);
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"erin"), "{names:?}");
    let carol = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "carol")
        .unwrap();
    assert_ne!(carol["context"], "nq");
    assert_eq!(json(&["dialplan", "show"])["version"], version);
    assert_eq!(
        json(&["cluster", "status"])["draining"],
        serde_json::json!([])
    );
    assert_eq!(json(&["audit"]).as_array().unwrap().len(), audited);
}

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n";

/// REGISTER load through nodes 1 and 2 while a fourth node is added (learner, catch-up,
/// voter), leadership is handed to it, node 3 is removed and node 4 snapshots: every
/// REGISTER succeeds, and node 4 then holds every binding and serves REGISTERs.
#[test]
fn membership_changes_under_register_load() {
    pbx_tests::require_tool("sipp", "sip-tester");
    let per_node = 2000;
    let users = Users {
        count: per_node * 2 + 1,
    };
    let c = LocalCluster::up(48, 3, &users, MD5_ONLY).unwrap();
    let dir = c.dir.path().to_path_buf();
    let csv = |name: &str, range: std::ops::Range<usize>| {
        let p = dir.join(name);
        Users::write_sipp_csv_for(
            &p,
            "pbx.test",
            &format!("{}:5099", c.client_ip(99)),
            3600,
            range,
        )
        .unwrap();
        p
    };
    let inf1 = csv("load1.csv", 1..per_node + 1);
    let inf2 = csv("load2.csv", per_node + 1..2 * per_node + 1);
    let load = |node: usize, inf: &std::path::Path| {
        Sipp {
            scenario: "reg_auth.xml",
            target: c.node_addr(node),
            local_ip: c.client_ip(200 + node as u8),
            inf,
            calls: per_node,
            rate: 80,
            transport: "u1",
        }
        .spawn(&[])
        .unwrap()
    };
    let running = [load(1, &inf1), load(2, &inf2)];

    // Bad input first, while the load runs: nothing changes.
    let (code, text) = c
        .admin(
            &[1],
            &[
                "cluster",
                "add-node",
                "3",
                "--peer",
                &c.peer_addr(3),
                "--sip",
                &c.node_addr(3).to_string(),
            ],
        )
        .unwrap();
    assert_eq!(code, 1, "node 3 is a member already: {text}");
    let (code, text) = c.admin(&[1], &["cluster", "remove-node", "9"]).unwrap();
    assert_eq!(code, 6, "{text}");
    let (code, text) = c.admin(&[2], &["cluster", "promote", "9"]).unwrap();
    assert_eq!(code, 6, "{text}");
    let (code, text) = c
        .admin(
            &[2],
            &[
                "cluster",
                "add-node",
                "7",
                "--peer",
                &c.peer_addr(7),
                "--sip",
                &c.node_addr(7).to_string(),
            ],
        )
        .unwrap();
    assert_eq!(code, 5, "nobody runs node 7: {text}");
    let (code, text) = c
        .admin(&[2], &["cluster", "transfer-leader", "--to", "9"])
        .unwrap();
    assert_eq!(code, 6, "{text}");

    // Node 4: started empty, added through node 2 (a learner catching up, shown), then
    // promoted.
    c.launcher(&["add", "4", "--no-join"]).unwrap();
    let (code, text) = c
        .admin(
            &[2],
            &[
                "cluster",
                "add-node",
                "4",
                "--peer",
                &c.peer_addr(4),
                "--sip",
                &c.node_addr(4).to_string(),
            ],
        )
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("node 4 added as a learner"), "{text}");
    assert!(
        text.contains("behind the leader") || text.contains("nothing replicated yet"),
        "progress shown: {text}"
    );
    let voters = |c: &LocalCluster| -> Option<Vec<u64>> {
        let (code, text) = c
            .admin(
                &[1, 2],
                &["cluster", "status", "--leader", "--output", "json"],
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (code == 0).then_some(())?;
        Some(
            v["members"]
                .as_array()?
                .iter()
                .filter(|m| m["voter"] == true)
                .filter_map(|m| m["id"].as_u64())
                .collect(),
        )
    };
    assert_eq!(voters(&c), Some(vec![1, 2, 3, 4]));

    // Leadership to node 4.
    let (code, text) = c
        .admin(&[1], &["cluster", "transfer-leader", "--to", "4"])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    let leader = wait_for("node 4 leads", Duration::from_secs(15), || {
        c.leader_among(&[1, 2, 3, 4])
    })
    .unwrap();
    assert_eq!(leader, 4);

    // Node 3 out (through node 3 itself), then stopped.
    let (code, text) = c.admin(&[3], &["cluster", "remove-node", "3"]).unwrap();
    assert_eq!(code, 0, "{text}");
    c.launcher(&["stop", "3"]).unwrap();
    assert_eq!(voters(&c), Some(vec![1, 2, 4]));

    // A snapshot on node 4, asked through node 1.
    let (code, text) = c
        .admin(
            &[1],
            &["cluster", "snapshot", "--node", "4", "--output", "json"],
        )
        .unwrap();
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["node_id"], 4);
    assert!(v["snapshot_index"].as_u64().unwrap() > 0, "{text}");

    // The load never failed.
    for (i, r) in running.into_iter().enumerate() {
        let run = r.wait().unwrap();
        pbx_tests::assert_all_ok(
            &run,
            per_node,
            &format!("REGISTER load through node {}", i + 1),
        );
    }
    // Every binding is on node 4, and it takes REGISTERs itself.
    let all = csv("all.csv", 1..2 * per_node + 1);
    let run = Sipp {
        scenario: "query_auth.xml",
        target: c.node_addr(4),
        local_ip: c.client_ip(154),
        inf: &all,
        calls: 2 * per_node,
        rate: 1000,
        transport: "u1",
    }
    .run()
    .unwrap();
    pbx_tests::assert_all_ok(&run, 2 * per_node, "every binding queried through node 4");
    let one = csv("one.csv", 2 * per_node + 1..2 * per_node + 2);
    let run = Sipp {
        scenario: "reg_auth.xml",
        target: c.node_addr(4),
        local_ip: c.client_ip(155),
        inf: &one,
        calls: 1,
        rate: 10,
        transport: "u1",
    }
    .run()
    .unwrap();
    pbx_tests::assert_all_ok(&run, 1, "REGISTER through node 4");

    // Every change is in the audit trail.
    let (_, audit) = c.admin(&[4], &["audit"]).unwrap();
    for action in [
        "cluster add-node 4",
        "cluster transfer-leader to 4",
        "cluster remove-node 3",
    ] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }
}

/// Runs openssl (the test's certificate authority), failing the test on error.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate it signs for `name` (with `ip` as subject alt name if given).
fn issue(dir: &std::path::Path, name: &str, ca: &str, ip: Option<&str>) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        match ip {
            Some(ip) => format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".to_string(),
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &ext,
        ],
    );
}

fn make_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// The admin API over mutual TLS: pbxctl with the CA and a client certificate gets
/// through; without a client certificate, with one from another CA, or in plain text it
/// does not, and the token is still needed.
#[test]
fn admin_api_over_mutual_tls() {
    pbx_tests::require_tool("openssl", "openssl");
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    make_ca(d, "ca");
    issue(d, "node1", "ca", Some("127.0.49.11"));
    issue(d, "ops", "ca", None);
    make_ca(d, "rogue-ca");
    issue(d, "rogue", "rogue-ca", None);
    let users = Users { count: 2 };
    let c = LocalCluster::up_with_env(
        49,
        1,
        &users,
        "",
        &[("PBX_ADMIN_TLS_DIR", d.to_str().unwrap())],
    )
    .unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let tls = |cert: Option<(&str, &str)>| -> Vec<String> {
        let mut a = vec!["--tls-ca".to_string(), p("ca.crt")];
        if let Some((crt, key)) = cert {
            a.extend(["--tls-cert".into(), p(crt), "--tls-key".into(), p(key)]);
        }
        a
    };
    let run = |extra: Vec<String>, token: Option<&str>| -> (i32, String) {
        let mut args: Vec<String> = extra;
        args.extend(["cluster", "status", "--output", "json"].map(String::from));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match token {
            Some(t) => {
                let mut r = vec!["--token", t];
                r.extend(&refs);
                c.admin(&[1], &r).unwrap()
            }
            None => c.admin(&[1], &refs).unwrap(),
        }
    };
    let (code, text) = run(tls(Some(("ops.crt", "ops.key"))), None);
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["node_id"], 1);
    let (code, text) = run(
        tls(Some(("ops.crt", "ops.key"))),
        Some("a-wrong-token-of-some-length"),
    );
    assert_eq!(code, 4, "the token is still checked: {text}");
    let (code, text) = run(tls(None), None);
    assert_eq!(code, 3, "no client certificate: {text}");
    let (code, text) = run(tls(Some(("rogue.crt", "rogue.key"))), None);
    assert_eq!(code, 3, "a client certificate from another CA: {text}");
    let (code, text) = run(Vec::new(), None);
    assert_eq!(code, 3, "plain text to a TLS port: {text}");
    assert!(c.log(1).contains("mutual_tls=true"), "{}", c.log(1));
}
