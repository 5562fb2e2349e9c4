//! The dialplan as operators handle it: validated with file:line before anything is
//! committed, the demo dialplan committed once for the whole cluster.

use std::time::Duration;

use pbx_tests::{bin, pbxctl, wait_for, LocalCluster, Users};

const BAD: &str = "[default]\nexten => 100,1,Answer()\n same => n,Frobnicate()\nexten => 200,1,Goto(nowhere,1,1)\n";

#[test]
fn pbxctl_checks_a_dialplan_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("extensions.conf");
    std::fs::write(&bad, BAD).unwrap();
    let (ok, out) = pbxctl(&["dialplan", "check", bad.to_str().unwrap()]).unwrap();
    assert!(!ok, "an invalid dialplan must fail the check: {out}");
    assert!(
        out.contains("extensions.conf:3: unknown application \"Frobnicate\""),
        "{out}"
    );
    assert!(out.contains("extensions.conf:4: Goto"), "{out}");

    let good = dir.path().join("good.conf");
    std::fs::write(&good, "[default]\nexten => _X.,1,Dial(SIP/${EXTEN},20)\n").unwrap();
    let (ok, out) = pbxctl(&["dialplan", "check", good.to_str().unwrap()]).unwrap();
    assert!(
        ok && out.contains("valid: 1 contexts, 1 extensions"),
        "{out}"
    );
}

#[test]
fn pbxd_refuses_a_bad_dialplan_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("extensions.conf"), BAD).unwrap();
    let cfg = dir.path().join("pbxd.toml");
    std::fs::write(
        &cfg,
        "[node]\nid = 1\ndata_dir = \"data\"\nsip_addr = \"127.0.0.1:0\"\n\n[cluster]\ndomain = \"pbx.test\"\ndialplan_file = \"extensions.conf\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("pbxd"))
        .args(["--check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pbxd must refuse it");
    assert!(
        err.contains("extensions.conf: line 3: unknown application"),
        "{err}"
    );
}

#[test]
fn demo_dialplan_committed_once_on_every_node() {
    let users = Users { count: 10 };
    let c = LocalCluster::up(38, 3, &users, "").unwrap();
    wait_for(
        "dialplan version 1 on all nodes",
        Duration::from_secs(20),
        || {
            (1..=3)
                .all(|n| c.status(n).and_then(|s| s.get("dialplan").cloned()) == Some("1".into()))
                .then_some(())
        },
    )
    .unwrap();
}
