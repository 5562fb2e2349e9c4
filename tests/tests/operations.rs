//! What operators watch: each node's Prometheus metrics move by what was done to it
//! (REGISTERs, a call), pass `promtool check metrics`, cover what the Grafana dashboard
//! queries, and `/readyz` follows the node's state (drained, cut off from the majority).

use std::net::SocketAddr;
use std::time::Duration;

use pbx_tests::{
    assert_all_ok, free_udp_port, repo_root, require_tool, wait_for, LocalCluster, PeerPartition,
    Phones, Scrape, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]";

/// Waits until node `n`'s metrics satisfy `ok` (counters of work done through another
/// node, or replicated state, arrive a little later).
fn scrape_until(c: &LocalCluster, n: usize, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    wait_for(what, Duration::from_secs(20), || {
        c.scrape(n).filter(|s| ok(s))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", c.scrape(n).map(|s| s.text).unwrap_or_default()))
}

#[test]
fn metrics_count_registrations_and_calls_and_cover_the_dashboard() {
    let users = Users { count: 3 };
    // JSON logs on: the call's lines are checked for its Call-ID and node below.
    let c =
        LocalCluster::up_with_env(67, 3, &users, MD5_ONLY, &[("PBX_LOG_FORMAT", "json")]).unwrap();
    let p = Phones::new(&c);
    let before = c.scrape(1).expect("node 1 serves /metrics");
    let reg = |code: &str| format!("pbx_register_requests_total{{code=\"{code}\"}}");
    let sip_in = |m: &str| format!("pbx_sip_requests_total{{direction=\"in\",method=\"{m}\"}}");

    // One registration through node 1: a challenge, then the authenticated REGISTER.
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    p.register(1, 2, &bob_ip, bob_port);
    let after = scrape_until(&c, 1, "the REGISTER counted", |s| {
        s.get(&reg("200")) == before.get(&reg("200")) + 1.0
    });
    assert_eq!(after.get(&reg("401")), before.get(&reg("401")) + 1.0);
    assert_eq!(
        after.get(&sip_in("REGISTER")),
        before.get(&sip_in("REGISTER")) + 2.0
    );
    assert!(
        after.get("pbx_sip_responses_total{direction=\"out\",class=\"2xx\"}")
            >= before.get("pbx_sip_responses_total{direction=\"out\",class=\"2xx\"}") + 1.0
    );
    // The binding is replicated state: node 3 counts it as well.
    scrape_until(&c, 3, "the binding on node 3", |s| {
        s.get("pbx_registrar_bindings") == 1.0 && s.get("pbx_registrar_registered_users") == 1.0
    });
    assert_eq!(after.get("pbx_users"), 3.0);
    let here = "pbx_registrar_bindings_here{transport=\"udp\"}";
    assert_eq!(after.get(here), 1.0, "bob registered through node 1");
    assert_eq!(c.scrape(3).unwrap().get(here), 0.0, "not through node 3");

    // One answered call through node 1 to bob.
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let uas = p.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_call.xml", 1, 1, &Users::name(2), nowhere, 200);
    assert_all_ok(&uac.wait().unwrap(), 1, "u1 -> u2 via node 1");
    assert_all_ok(&uas.wait().unwrap(), 1, "u2 answers");
    let calls = scrape_until(&c, 1, "the call ended", |s| {
        s.get("pbx_calls_ended_total{disposition=\"answered\"}")
            == before.get("pbx_calls_ended_total{disposition=\"answered\"}") + 1.0
    });
    let d = |k: &str| calls.get(k) - before.get(k);
    assert_eq!(d("pbx_calls_started_total"), 1.0);
    assert_eq!(d("pbx_calls_answered_total"), 1.0);
    assert_eq!(d("pbx_call_setup_seconds_count"), 1.0);
    assert_eq!(
        d(&sip_in("INVITE")),
        2.0,
        "the challenged INVITE and its retry"
    );
    assert_eq!(d(&sip_in("BYE")), 1.0);
    assert!(
        d("pbx_relay_streams_total") >= 1.0,
        "the call's media went through the relay"
    );
    assert_eq!(calls.get("pbx_calls_active"), 0.0);
    assert!(calls.get("pbx_raft_commit_seconds_count") > 0.0);
    assert_eq!(calls.get("pbx_raft_members"), 3.0);
    assert!(calls.get("process_resident_memory_bytes") > 0.0);
    // Every log line is one JSON object; the call's carry its Call-ID and node.
    let log = c.log(1);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "call started")
        .expect("a call started line");
    let span = &started["spans"][0];
    assert_eq!(span["node"], 1, "{started}");
    assert!(
        span["call_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{started}"
    );
    let call_id = span["call_id"].clone();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "call ended" && l["spans"][0]["call_id"] == call_id),
        "the call's end carries its Call-ID too"
    );
    // Node 2 ran no call: its call counters did not move.
    let two = c.scrape(2).unwrap();
    assert_eq!(two.get("pbx_calls_started_total"), 0.0);

    // The exposition is valid for Prometheus's own checker.
    if which("promtool") {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(calls.text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        require_tool("promtool", "prometheus");
    }

    // Every metric the Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(repo_root().join("deploy/grafana/pbx-cluster.json"))
        .expect("the dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard queries: {exprs:?}");
    let mut missing = Vec::new();
    for name in exprs.iter().flat_map(|e| metric_names(e)) {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| calls.has_family(base))
            .unwrap_or(&name);
        if !calls.has_family(family) {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");

    // Health: alive, and ready on every node of a healthy cluster.
    let (code, body) = c.http(2, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["node"],
        2
    );
    for n in 1..=3 {
        let (code, body) = c.http(n, "/readyz").unwrap();
        assert_eq!(code, 200, "node {n}: {body}");
    }
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: identifiers of ours (`pbx_…`, `process_…`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        if word(b[i]) && (i == 0 || !word(b[i - 1])) {
            let end = (i..b.len()).find(|&j| !word(b[j])).unwrap_or(b.len());
            let w = &expr[i..end];
            if w.starts_with("pbx_") || w.starts_with("process_") {
                out.push(w.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn readyz_turns_unready_on_a_drained_node_and_on_one_cut_off_from_the_majority() {
    require_tool("nft", "nftables");
    let users = Users { count: 1 };
    let c = LocalCluster::up(68, 3, &users, MD5_ONLY).unwrap();
    let ready = |n: usize| c.http(n, "/readyz").map(|(code, body)| (code == 200, body));
    for n in 1..=3 {
        assert!(ready(n).unwrap().0, "node {n} ready after up");
    }

    // Drained: unready (load balancers move away), alive, back when undrained.
    let (code, text) = c.admin(&[1], &["node", "drain", "--node", "3"]).unwrap();
    assert_eq!(code, 0, "{text}");
    let body = wait_for(
        "node 3 unready while drained",
        Duration::from_secs(10),
        || ready(3).filter(|(ok, _)| !ok).map(|(_, b)| b),
    )
    .unwrap();
    let why: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(why["draining"], true, "{body}");
    assert_eq!(why["ready"], false, "{body}");
    assert_eq!(c.http(3, "/healthz").unwrap().0, 200, "still alive");
    assert!(ready(1).unwrap().0, "the others stay ready");
    let (code, text) = c.admin(&[1], &["node", "undrain", "--node", "3"]).unwrap();
    assert_eq!(code, 0, "{text}");
    wait_for("node 3 ready again", Duration::from_secs(10), || {
        ready(3).filter(|(ok, _)| *ok)
    })
    .unwrap();

    // Cut off from the majority: unready with the reason; ready again once healed.
    let cut = 2;
    let partition = PeerPartition::isolate(&c, cut);
    let body = wait_for(
        "node 2 unready while cut off",
        Duration::from_secs(30),
        || ready(cut).filter(|(ok, _)| !ok).map(|(_, b)| b),
    )
    .unwrap();
    let why: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(why["serving_writes"], false, "{body}");
    assert!(
        body.contains("not in contact with a majority"),
        "the reason is given: {body}"
    );
    let majority_ready = wait_for("the majority ready", Duration::from_secs(30), || {
        (ready(1)?.0 && ready(3)?.0).then_some(())
    });
    assert!(majority_ready.is_ok(), "the majority serves on");
    drop(partition);
    wait_for(
        "node 2 ready after healing",
        Duration::from_secs(30),
        || ready(cut).filter(|(ok, _)| *ok),
    )
    .unwrap();
}
