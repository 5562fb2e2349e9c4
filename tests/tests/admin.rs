//! The admin API through `pbxctl`: bearer token, endpoint fallback, JSON output parsed
//! back, exit codes, and dialplan changes that land on every node or on none.

use std::time::Duration;

use pbx_tests::{wait_for, LocalCluster, Users};

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
    let (code, text) = c
        .admin(&[3], &["dialplan", "apply", good.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("committed as version 2"), "{text}");
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
}
