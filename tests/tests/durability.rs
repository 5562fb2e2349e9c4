//! Below the process: a full disk and a wall clock that steps. Real pbxd processes
//! through the launcher, a small tmpfs as data directory, libfaketime for one node's
//! clock. (Power cuts, on the `cutfs` filesystem, are in the fault matrix of
//! `cluster.rs`.)
//!
//! The invariant is the cluster's promise: a write answered 200 is on a majority's
//! disks, whatever happens below the process; a write that cannot be made durable is
//! answered 503 with Retry-After, never 200.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use pbx_tests::{
    assert_all_ok, free_udp_port, require_tool, wait_for, LocalCluster, Phones, RegisterClient,
    SippRun, Tmpfs, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n";
/// A floor small enough for a 48 MB data disk.
const SMALL_DISK: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n[storage]\nmin_free_mb = 4\n";

fn one_ok(run: SippRun, what: &str) {
    assert_all_ok(&run, 1, what);
}

/// `pbxctl register` of user `u` through `node` (exit success, output).
fn register(c: &LocalCluster, node: usize, u: usize, extra: &[&str]) -> (bool, String) {
    c.pbxctl_register(node, u, extra)
}

/// Whether `u` has a binding as `node` sees it (a query REGISTER).
fn bound_at(c: &LocalCluster, node: usize, u: usize) -> bool {
    let (ok, out) = register(c, node, u, &["--query"]);
    ok && out.starts_with("200") && out.contains("sip:")
}

fn metric(c: &LocalCluster, node: usize, series: &str) -> Option<f64> {
    Some(c.scrape(node)?.get(series))
}

/// The data directories of a majority fill up: writes are answered 503 with
/// Retry-After (never 200), lookups and calls go on, `/readyz` says why, and when
/// there is room again the nodes recover by themselves — same processes, nothing lost.
#[test]
fn a_full_disk_answers_writes_503_keeps_calls_up_and_recovers_by_itself() {
    require_tool("sipp", "sip-tester");
    let users = Users { count: 50 };
    let c = LocalCluster::configured(73, 3, &users, SMALL_DISK).unwrap();
    let disks: Vec<Tmpfs> = [1, 2]
        .iter()
        .map(|&n| Tmpfs::mount(&c.data_dir(n), "48m").unwrap())
        .collect();
    c.bring_up().unwrap();
    // The leader keeps its disk: the others are the ones that fill.
    let (code, out) = c
        .admin(&[3], &["cluster", "transfer-leader", "--to", "3"])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let pids: Vec<Option<u32>> = (1..=3).map(|n| c.pid(n)).collect();

    // A callee registered while the disks have room, and a few more users.
    let p = Phones::new(&c);
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    p.register(1, 2, &bob_ip, bob_port);
    let mut acked: BTreeSet<usize> = BTreeSet::from([2]);
    for u in 10..20 {
        let (ok, out) = register(&c, 3, u, &[]);
        assert!(ok, "{out}");
        acked.insert(u);
    }

    for d in &disks {
        d.fill().unwrap();
    }
    // A write that needs new space on every node: a dialplan of ~700 KB (sled would keep
    // a value that large in a file of its own). The full nodes refuse to write it below
    // their free-space floor (and what sled had buffered meets ENOSPC, which closes the
    // store); it is not committed, and the client is told so.
    let mut big = String::from("[big]\n");
    for i in 0..8000 {
        big.push_str(&format!(
            "exten => 9{i:05},1,NoOp(padding to make this dialplan larger than a sled blob)\n"
        ));
    }
    let big_file = c.dir.path().join("big.conf");
    std::fs::write(&big_file, &big).unwrap();
    let (code, out) = c
        .admin(&[3], &["dialplan", "apply", big_file.to_str().unwrap()])
        .unwrap();
    assert_ne!(code, 0, "committed with a majority's disks full: {out}");
    let unavailable = |n: usize| metric(&c, n, "pbx_storage_unavailable") == Some(1.0);
    wait_for(
        "both full nodes' stores closed",
        Duration::from_secs(30),
        || (unavailable(1) && unavailable(2)).then_some(()),
    )
    .unwrap();
    // Writes are refused, and still refused a moment later: 503 with Retry-After.
    let refused = 30;
    for _ in 0..2 {
        let (ok, out) = register(&c, 3, refused, &[]);
        assert!(!ok && out.contains("503"), "{out}");
        assert!(
            out.contains("Retry-After"),
            "503 without Retry-After: {out}"
        );
    }
    let full = 1;
    let (code, body) = c.http(full, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("disk full") || body.contains("No space left on device"),
        "{body}"
    );
    assert!(
        c.log(full).contains("storage unavailable"),
        "the node must log why it stopped writing"
    );

    // Lookups and calls do not need the disk.
    assert!(bound_at(&c, full, 2), "lookup through the full node");
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let uas = p.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_call.xml", full, 1, &Users::name(2), nowhere, 500);
    one_ok(uac.wait().unwrap(), "a call through the full node");
    one_ok(uas.wait().unwrap(), "the callee answers");

    // Room again: the nodes reopen their stores in place; one whose sled cannot close
    // the failed database (a failed blob write) exits for a restart, and the test
    // restarts it as systemd's Restart=on-failure would.
    for d in &disks {
        d.free().unwrap();
    }
    let mut restarted = Vec::new();
    wait_for("writes accepted again", Duration::from_secs(90), || {
        for n in [1, 2] {
            if !c.is_running(n) && !restarted.contains(&n) {
                assert!(c.log(n).contains("exiting for a restart"), "node {n} died");
                c.start_no_wait(n).unwrap();
                restarted.push(n);
            }
        }
        let (ok, out) = register(&c, 3, refused, &[]);
        (ok && out.starts_with("200")).then_some(())
    })
    .unwrap();
    acked.insert(refused);
    for n in [1, 2] {
        wait_for(
            &format!("node {n}'s store back"),
            Duration::from_secs(30),
            || (metric(&c, n, "pbx_storage_unavailable") == Some(0.0)).then_some(()),
        )
        .unwrap();
    }
    for n in [1, 2] {
        if !restarted.contains(&n) {
            assert!(metric(&c, n, "pbx_storage_outages_total").unwrap_or(0.0) >= 1.0);
            assert!(c.log(n).contains("storage recovered"));
        }
    }
    assert_eq!(pids[2], c.pid(3), "the healthy node kept running");
    eprintln!("full disk: restarted for a stuck store: {restarted:?}");
    for n in 1..=3 {
        wait_for(&format!("node {n} ready"), Duration::from_secs(30), || {
            (c.http(n, "/readyz")?.0 == 200).then_some(())
        })
        .unwrap();
        // A node that was stalled catches up from the leader: wait for it.
        let mut attempt = 0;
        let mut missing = Vec::new();
        let all = wait_for(
            &format!("node {n} to hold every acknowledged registration"),
            Duration::from_secs(30),
            || {
                attempt += 1;
                let found = c
                    .bound_users(n, &acked, &format!("after-{attempt}"), 150 + n as u8)
                    .ok()?;
                missing = acked.difference(&found).copied().collect();
                missing.is_empty().then_some(())
            },
        );
        assert!(
            all.is_ok(),
            "acknowledged, missing on node {n}: {missing:?}"
        );
    }
    // The dialplan whose write was refused: its outcome was unknown to the client (as
    // for any write that timed out); it stayed in the leader's log and is committed once
    // the followers can write again.
    let (_, shown) = c.admin(&[1], &["dialplan", "show"]).unwrap();
    eprintln!(
        "full disk: {} registrations kept; the refused 700 KB dialplan {} after recovery",
        acked.len(),
        if shown.contains("exten => 907999") {
            "was committed"
        } else {
            "was not committed"
        }
    );
    // Stopped, unmounted, then the run directory removed (it holds the mount points).
    c.launcher(&["down"]).unwrap();
    drop(disks);
    drop(c);
}

/// One REGISTER challenged by `from` and authenticated at `to`: the status.
fn register_across(c: &LocalCluster, u: usize, from: usize, to: usize) -> u16 {
    let sock = UdpSocket::bind((c.client_ip(60).as_str(), 0)).unwrap();
    let mut client =
        RegisterClient::new(sock, c.node_addr(from), "pbx.test", Duration::from_secs(5)).unwrap();
    client.register_across(&Users::name(u), &Users::password(u), 1, c.node_addr(to))
}

/// One node's wall clock steps two hours ahead, then back behind real time (NTP gone
/// wrong, `date -s`): its bindings neither expire nor come back, nonces it issues are
/// good on the others and theirs on it, Raft does not notice, and the step is counted.
#[test]
fn a_clock_step_on_one_node_expires_nothing_and_breaks_no_nonce() {
    require_tool("faketime", "faketime");
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(std::path::Path::new(lib).exists(), "{lib} missing");
    let users = Users { count: 20 };
    let c = LocalCluster::up(75, 3, &users, MD5_ONLY).unwrap();
    // Node 3 runs under libfaketime, its offset read from a file (re-read every second);
    // the monotonic clock stays real, as in a real step.
    let spec = c.dir.path().join("node3.faketime");
    std::fs::write(&spec, "+0\n").unwrap();
    c.launcher(&["stop", "3"]).unwrap();
    c.launcher_with(
        &["start", "3"],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", spec.to_str().unwrap()),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .unwrap();
    // Bindings of an hour, registered through node 1.
    for u in 1..=5 {
        let (ok, out) = register(&c, 1, u, &[]);
        assert!(ok, "{out}");
    }
    for u in 1..=5 {
        wait_for("binding on node 3", Duration::from_secs(10), || {
            bound_at(&c, 3, u).then_some(())
        })
        .unwrap();
    }
    let term = |n: usize| metric(&c, n, "pbx_raft_term");
    let term_before = term(1).unwrap();

    for (step, label) in [
        ("+7200", "two hours ahead"),
        ("-1800", "half an hour behind"),
    ] {
        std::fs::write(&spec, format!("{step}\n")).unwrap();
        let offset: f64 = step.parse().unwrap();
        wait_for(
            &format!("node 3 sees its clock {label}"),
            Duration::from_secs(10),
            || {
                let off = metric(&c, 3, "pbx_clock_wall_offset_seconds")?;
                ((off - offset).abs() < 5.0).then_some(())
            },
        )
        .unwrap();
        // Nothing expired, on node 3 as everywhere.
        for u in 1..=5 {
            assert!(
                bound_at(&c, 3, u),
                "{label}: user {u}'s binding gone on node 3"
            );
        }
        // Nonces cross the step both ways, and node 3 takes writes.
        assert_eq!(
            register_across(&c, 6, 3, 1),
            200,
            "{label}: node 3's nonce at node 1"
        );
        assert_eq!(
            register_across(&c, 7, 1, 3),
            200,
            "{label}: node 1's nonce at node 3"
        );
        let (ok, out) = register(&c, 3, 8, &[]);
        assert!(ok, "{label}: REGISTER through node 3: {out}");
    }
    let steps = metric(&c, 3, "pbx_clock_steps_total").unwrap();
    assert!(steps >= 2.0, "both steps counted ({steps})");
    assert!(c.log(3).contains("the wall clock stepped"));
    // Raft's timers run on the monotonic clock: no election came of it.
    for n in 1..=3 {
        assert_eq!(term(n), Some(term_before), "node {n}'s term moved");
    }
    // What node 3 wrote while stepped is on the others.
    assert!(bound_at(&c, 1, 8));
}
