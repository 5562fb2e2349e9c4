//! Call detail records: answered, busy, unanswered and cancelled calls each end as one
//! record with Asterisk's disposition; `pbxctl cdr export` gives them as CSV and JSON
//! from any node, also after the node that ran them died; a real PostgreSQL server gets
//! them, also those made while it was stopped.

use std::net::SocketAddr;
use std::time::Duration;

use pbx_tests::{
    assert_all_ok, free_udp_port, require_tool, wait_for, LocalCluster, Phones, Postgres, Users,
};

const PLAN: &str = "\
[default]
exten => _u.,1,Dial(SIP/${EXTEN},3)
 same => n,GotoIf($[\"${DIALSTATUS}\" = \"BUSY\"]?busy)
 same => n,Hangup(19)
 same => n(busy),Busy()
";

/// The records `pbxctl cdr export --format json` gives through `node`.
fn exported(c: &LocalCluster, node: usize) -> Vec<serde_json::Value> {
    let (code, text) = c
        .admin(&[node], &["cdr", "export", "--format", "json"])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn every_call_is_one_record_in_the_cluster_and_in_postgresql() {
    require_tool("psql", "postgresql-client");
    let users = Users { count: 3 };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("extensions.conf");
    std::fs::write(&plan, PLAN).unwrap();
    let pg = Postgres::start("127.0.69.200");
    let extra = format!(
        "[auth]\nchallenge_algorithms = [\"MD5\"]\n[cdr]\npostgres = \"{}\"\ntable = \"pbx_cdr\"\n",
        pg.conninfo()
    );
    let c = LocalCluster::up_with_dialplan(69, 3, &users, &extra, &plan).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    p.register(2, 2, &bob_ip, bob_port);
    let bob = Users::name(2);
    let rows = |sql: &str| pg.query(sql).unwrap_or_default();

    // Answered, through node 1: in the cluster, then in PostgreSQL.
    let uas = p.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_call.xml", 1, 1, &bob, nowhere, 1200);
    assert_all_ok(&uac.wait().unwrap(), 1, "answered call");
    assert_all_ok(&uas.wait().unwrap(), 1, "callee answers");
    wait_for(
        "the answered call in PostgreSQL",
        Duration::from_secs(20),
        || (rows("SELECT count(*) FROM pbx_cdr").trim() == "1").then_some(()),
    )
    .unwrap();

    // The database goes away; calls and their records go on.
    pg.stop_server();
    let uas = p.callee("uas_busy.xml", &bob_ip, bob_port, &[]);
    let uac = p.call(&p.expecting(486), 1, 1, &bob, nowhere, 0);
    assert_all_ok(&uac.wait().unwrap(), 1, "busy callee -> 486");
    assert_all_ok(&uas.wait().unwrap(), 1, "busy callee");
    let uas = p.callee("uas_ring.xml", &bob_ip, bob_port, &[]);
    let uac = p.call(&p.expecting(480), 1, 1, &bob, nowhere, 0);
    assert_all_ok(&uac.wait().unwrap(), 1, "no answer -> 480");
    assert_all_ok(&uas.wait().unwrap(), 1, "ringing callee cancelled");
    let uas = p.callee("uas_ring.xml", &bob_ip, bob_port, &[]);
    let uac = p.call("uac_cancel.xml", 1, 1, &bob, nowhere, 0);
    assert_all_ok(&uac.wait().unwrap(), 1, "caller cancels");
    assert_all_ok(&uas.wait().unwrap(), 1, "callee cancelled with the caller");
    let records = wait_for(
        "four records in the cluster",
        Duration::from_secs(20),
        || Some(exported(&c, 3)).filter(|r| r.len() == 4),
    )
    .unwrap();
    let dispositions: Vec<&str> = records
        .iter()
        .map(|r| r["disposition"].as_str().unwrap())
        .collect();
    assert_eq!(
        dispositions,
        ["ANSWERED", "BUSY", "NO ANSWER", "NO ANSWER"],
        "{records:#?}"
    );
    let answered = &records[0];
    assert_eq!(answered["src"], Users::name(1));
    assert_eq!(answered["dst"], bob);
    assert_eq!(answered["dcontext"], "default");
    assert_eq!(answered["nodes"], serde_json::json!([1]));
    assert!(answered["answer_ms"].as_u64().unwrap() >= answered["start_ms"].as_u64().unwrap());
    assert!(
        answered["billsec"].as_u64().unwrap() >= 1,
        "held 1.2 s: {answered}"
    );
    assert!(answered["duration"].as_u64() >= answered["billsec"].as_u64());
    assert_eq!(records[1]["billsec"], 0);
    assert_eq!(records[1]["answer"], "", "not answered");
    assert_eq!(records[2]["hangupcause"], 19);
    assert!(
        records[2]["duration"].as_u64().unwrap() >= 3,
        "rang for Dial's 3 s"
    );
    let ids: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r["uniqueid"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "one record a call");

    // CSV: a header and a line a call, the clid quoted as RFC 4180 says.
    let (code, csv) = c
        .admin(&[2], &["cdr", "export", "--format", "csv", "--since", "1h"])
        .unwrap();
    assert_eq!(code, 0, "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("uniqueid,start,answer,end,duration,billsec,disposition"));
    assert!(
        lines[1].contains(",ANSWERED,") && lines[1].contains("\"\"\""),
        "{csv}"
    );
    assert!(lines[3].contains(",NO ANSWER,"), "{csv}");
    let (code, none) = c
        .admin(
            &[2],
            &[
                "cdr",
                "export",
                "--since",
                "2000-01-01",
                "--until",
                "2000-01-02",
            ],
        )
        .unwrap();
    assert_eq!(
        (code, none.lines().count()),
        (0, 1),
        "only the header: {none}"
    );

    // The database is back: the records made meanwhile arrive, each once.
    pg.start_server();
    wait_for("all four in PostgreSQL", Duration::from_secs(60), || {
        (rows("SELECT count(*) FROM pbx_cdr").trim() == "4").then_some(())
    })
    .unwrap();
    let in_db = rows(
        "SELECT disposition, billsec > 0, answer IS NULL, src, dst FROM pbx_cdr ORDER BY sequence",
    );
    let want = format!(
        "ANSWERED|t|f|{u1}|{bob}\nBUSY|f|t|{u1}|{bob}\nNO ANSWER|f|t|{u1}|{bob}\nNO ANSWER|f|t|{u1}|{bob}\n",
        u1 = Users::name(1)
    );
    assert_eq!(in_db, want);
    let db_ids = rows("SELECT uniqueid FROM pbx_cdr ORDER BY sequence");
    for r in &records {
        assert!(db_ids.contains(r["uniqueid"].as_str().unwrap()));
    }

    // The node that ran the calls dies: the others still have every record.
    c.kill(1).unwrap();
    assert_eq!(exported(&c, 2).len(), 4);
}
