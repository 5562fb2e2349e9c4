//! Calls outlive the node running them. A SIPp caller places N answered calls through one
//! node to a SIPp callee (both stream RTP: the caller plays G.711, the callee echoes);
//! that node is SIGKILLed (or cut off from the others on the peer link); a survivor adopts
//! each call and re-INVITEs both phones (new Contact and relay), and the calls go on to
//! the caller's BYE ~30 s after the answer.
//!
//! The invariant: every call completes on both phones (SIPp: 0 failed), each phone leg
//! got exactly one re-INVITE, from a survivor, the BYE reached the callee from a survivor,
//! every call record names a survivor as its owner, whose relay carries the call's media
//! both ways, and the records go once the calls end.
//!
//! Scenarios: `tests/sipp/uac_call_survive.xml`, `tests/sipp/uas_answer_survive.xml`
//! (their `-trace_logs` lines are how re-INVITEs are counted, per Call-ID).
//! Environment: PBX_SURVIVAL_CALLS (200), PBX_SURVIVAL_RATE (calls/s, 50),
//! PBX_SURVIVAL_HOLD_SECS (30; raised so that every call is up before the fault).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pbx_tests::{
    assert_all_ok, free_tcp_port, free_udp_port, repo_root, require_tool, wait_for, Baresip,
    LocalCluster, PeerPartition, Phones, RtpRates, Sipp, SippRun, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    Leader,
    Follower,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// SIGKILL (the launcher's `kill`).
    Kill,
    /// nftables drops the owner's peer-link traffic; it keeps running and phones still
    /// reach it. Healed once the calls are re-owned, while they are still up.
    Partition,
    /// A planned move: `pbxctl node drain --migrate` (make before break).
    Migrate,
}

/// One answered call's replicated record (`pbxctl calls list --no-media --output json`).
#[derive(Clone, Debug)]
struct Record {
    id: String,
    owner: u64,
    /// The caller's dialog's Call-ID (what the SIPp caller logs).
    a_leg: String,
    /// The callee's dialog's Call-ID (what the SIPp callee logs).
    b_leg: String,
}

/// The call records as the first of `nodes` that answers sees them.
fn records(c: &LocalCluster, nodes: &[usize]) -> Option<Vec<Record>> {
    let (code, text) = c
        .admin(nodes, &["calls", "list", "--no-media", "--output", "json"])
        .ok()?;
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.as_array()?
        .iter()
        .map(|r| {
            let legs = r["leg_call_ids"].as_array()?;
            Some(Record {
                id: r["id"].as_str()?.to_string(),
                owner: r["owner_node"].as_u64()?,
                a_leg: legs.first()?.as_str()?.to_string(),
                b_leg: legs.last()?.as_str()?.to_string(),
            })
        })
        .collect()
}

fn owners(list: &[Record]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for r in list {
        *m.entry(r.owner).or_insert(0) += 1;
    }
    m
}

/// What one SIPp side logged (`-trace_logs -log_file`): Call-IDs answered / ACKed, and per
/// Call-ID the sources (`IP:PORT`, the request's Via) of its re-INVITEs and of its BYE.
#[derive(Debug, Default)]
struct PhoneLog {
    answered: BTreeSet<String>,
    acked: BTreeSet<String>,
    reinvites: BTreeMap<String, Vec<String>>,
    byes: BTreeMap<String, String>,
}

impl PhoneLog {
    fn read(path: &Path) -> PhoneLog {
        let mut log = PhoneLog::default();
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["answered", id, ..] => {
                    log.answered.insert(id.to_string());
                }
                ["acked", id, ..] => {
                    log.acked.insert(id.to_string());
                }
                ["reinvite", id, "from", src, ..] => {
                    log.reinvites
                        .entry(id.to_string())
                        .or_default()
                        .push(src.to_string());
                }
                ["bye", id, "from", src, ..] => {
                    log.byes.insert(id.to_string(), src.to_string());
                }
                _ => {}
            }
        }
        log
    }

    fn reinvite_count(&self) -> usize {
        self.reinvites.values().map(Vec::len).sum()
    }
}

/// SIPp's unexpected-message and failure notes (`-trace_err`) in `dir`, for failures.
fn sipp_errors(dir: &Path) -> String {
    let mut out = String::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if f.file_name().to_string_lossy().ends_with("_errors.log") {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            out.extend(text.lines().take(60).map(|l| format!("{l}\n")));
        }
    }
    out
}

fn ip_of(c: &LocalCluster, n: usize) -> String {
    c.node_addr(n).ip().to_string()
}

/// Checks one phone side's re-INVITEs: exactly one per call in `legs`, none for anything
/// else, each from one of `from` (the survivors' IPs).
fn assert_one_reinvite_each(side: &str, log: &PhoneLog, legs: &BTreeSet<String>, from: &[String]) {
    let twice: Vec<_> = log.reinvites.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{side}: calls re-INVITEd more than once: {twice:?}"
    );
    let missing: Vec<_> = legs
        .iter()
        .filter(|l| !log.reinvites.contains_key(*l))
        .collect();
    assert!(
        missing.is_empty(),
        "{side}: {} of {} calls never re-INVITEd: {:?}",
        missing.len(),
        legs.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let strays: Vec<_> = log
        .reinvites
        .keys()
        .filter(|k| !legs.contains(*k))
        .collect();
    assert!(
        strays.is_empty(),
        "{side}: re-INVITEs for unknown calls: {strays:?}"
    );
    assert_eq!(
        log.reinvite_count(),
        legs.len(),
        "{side}: re-INVITEs in total"
    );
    for (id, srcs) in &log.reinvites {
        for s in srcs {
            let ip = s.rsplit_once(':').map_or(s.as_str(), |(ip, _)| ip);
            assert!(
                from.iter().any(|f| f == ip),
                "{side}: call {id} re-INVITEd from {s}, not a survivor {from:?}"
            );
        }
    }
}

fn survive(slot: u8, victim: Victim, fault: Fault) {
    require_tool("sipp", "sip-tester");
    if fault == Fault::Partition {
        require_tool("nft", "nftables");
    }
    let calls = env_or("PBX_SURVIVAL_CALLS", 200) as usize;
    let rate = env_or("PBX_SURVIVAL_RATE", 50) as usize;
    // Every call is up when the fault comes: the hold outlasts placing them all.
    let hold = Duration::from_secs(
        env_or("PBX_SURVIVAL_HOLD_SECS", 30).max(calls.div_ceil(rate) as u64 + 15),
    );
    let sipp_timeout = format!("{}s", calls.div_ceil(rate) as u64 + hold.as_secs() + 120);

    let users = Users { count: 2 };
    let c = LocalCluster::up(slot, 3, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        c.leader_among(&[1, 2, 3])
    })
    .unwrap();
    let owner = match victim {
        Victim::Leader => leader,
        Victim::Follower => (1..=3).find(|&n| n != leader).unwrap(),
    };
    let survivors: Vec<usize> = (1..=3).filter(|&n| n != owner).collect();
    let survivor_ips: Vec<String> = survivors.iter().map(|&n| ip_of(&c, n)).collect();

    // The callee (u2) registers through a survivor and answers with SIPp's RTP echo.
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip).to_string();
    let bob_media = free_udp_port(&bob_ip).to_string();
    p.register(survivors[0], 2, &bob_ip, bob_port.parse().unwrap());
    let uas_inf = p.file("uas.csv", &format!("SEQUENTIAL\n{bob_ip};{bob_media}\n"));
    let uas_dir = uas_inf.parent().unwrap().to_path_buf();
    let uas_log = uas_dir.join("uas_logs.log");
    let uas = Sipp {
        scenario: "uas_answer_survive.xml",
        target: c.node_addr(survivors[0]),
        local_ip: bob_ip.clone(),
        inf: &uas_inf,
        calls,
        rate,
        transport: "u1",
    }
    .spawn(&[
        "-p",
        &bob_port,
        "-mi",
        &bob_ip,
        "-mp",
        &bob_media,
        "-rtp_echo",
        "-default_behaviors",
        "all",
        "-trace_logs",
        "-log_file",
        uas_log.to_str().unwrap(),
        "-trace_err",
        "-timeout",
        &sipp_timeout,
    ])
    .unwrap();

    // The caller (u1) calls u2 N times through the owner; SIPp picks its media port.
    let uac_inf = p.file(
        "uac.csv",
        &format!(
            "SEQUENTIAL\n{};pbx.test;{};{}\n",
            Users::name(1),
            Users::password(1),
            Users::name(2)
        ),
    );
    let uac_dir: PathBuf = uac_inf.parent().unwrap().to_path_buf();
    std::fs::copy(
        repo_root().join("deploy/sounds/hello-world.ulaw"),
        uac_dir.join("survive.ulaw"),
    )
    .unwrap();
    let uac_log = uac_dir.join("uac_logs.log");
    let hold_ms = hold.as_millis().to_string();
    let placed = Instant::now();
    let uac = Sipp {
        scenario: "uac_call_survive.xml",
        target: c.node_addr(owner),
        local_ip: c.client_ip(61),
        inf: &uac_inf,
        calls,
        rate,
        transport: "u1",
    }
    .spawn(&[
        "-d",
        &hold_ms,
        "-default_behaviors",
        "all",
        "-trace_logs",
        "-log_file",
        uac_log.to_str().unwrap(),
        "-trace_err",
        "-timeout",
        &sipp_timeout,
    ])
    .unwrap();

    // All N answered and ACKed on both phones, all N records owned by the owner.
    let setup = Duration::from_secs(calls.div_ceil(rate) as u64 + 30);
    let before = wait_for(
        &format!("{calls} answered calls owned by node {owner}"),
        setup,
        || {
            let (a, b) = (PhoneLog::read(&uac_log), PhoneLog::read(&uas_log));
            if a.answered.len() < calls || b.acked.len() < calls {
                return None;
            }
            let list = records(&c, &survivors)?;
            (list.len() == calls && list.iter().all(|r| r.owner == owner as u64)).then_some(list)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: caller answered {}, callee acked {}, records {:?}\n{}{}",
            PhoneLog::read(&uac_log).answered.len(),
            PhoneLog::read(&uas_log).acked.len(),
            records(&c, &survivors).map(|l| owners(&l)),
            sipp_errors(&uac_dir),
            sipp_errors(&uas_dir)
        )
    });
    let ids: BTreeSet<String> = before.iter().map(|r| r.id.clone()).collect();
    let a_legs: BTreeSet<String> = before.iter().map(|r| r.a_leg.clone()).collect();
    let b_legs: BTreeSet<String> = before.iter().map(|r| r.b_leg.clone()).collect();
    assert_eq!(
        a_legs,
        PhoneLog::read(&uac_log).answered,
        "the records' caller legs"
    );
    assert_eq!(
        b_legs,
        PhoneLog::read(&uas_log).acked,
        "the records' callee legs"
    );
    assert!(
        PhoneLog::read(&uac_log).reinvites.is_empty()
            && PhoneLog::read(&uas_log).reinvites.is_empty(),
        "re-INVITEs before any fault"
    );

    // The fault. The first calls hang up `hold` after `placed`: adoption must be done by then.
    let survivors_cpu = || survivors.iter().filter_map(|&n| c.cpu_ms(n)).sum::<u64>();
    let cpu_before = survivors_cpu();
    let faulted = Instant::now();
    let faulted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let partition = match fault {
        Fault::Kill => {
            c.kill(owner).unwrap();
            None
        }
        Fault::Partition => Some(PeerPartition::isolate(&c, owner)),
        Fault::Migrate => {
            let node = owner.to_string();
            let (code, text) = c
                .admin(&[owner], &["node", "drain", "--node", &node, "--migrate"])
                .unwrap();
            assert_eq!(code, 0, "drain --migrate: {text}");
            None
        }
    };
    let budget = (placed + hold).saturating_duration_since(faulted);
    let after = wait_for(
        &format!("every call re-owned by a survivor of node {owner}"),
        hold + Duration::from_secs(30),
        || {
            let list = records(&c, &survivors)?;
            let now: BTreeSet<String> = list.iter().map(|r| r.id.clone()).collect();
            (now == ids && list.iter().all(|r| survivors.contains(&(r.owner as usize))))
                .then_some(list)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: records now {:?} (before: {calls} on node {owner})",
            records(&c, &survivors).map(|l| (l.len(), owners(&l)))
        )
    });
    let adoption = faulted.elapsed();
    eprintln!(
        "{fault:?} of {victim:?} node {owner} ({calls} calls): all re-owned after {} ms \
         (first hang-ups due after {} ms); adopters {:?}",
        adoption.as_millis(),
        budget.as_millis(),
        owners(&after)
    );
    assert!(
        adoption < budget,
        "adoption took {adoption:?}, the first calls hung up {budget:?} after the fault"
    );

    // The adopters' relays carry every call both ways (counters published each second).
    let media = wait_for(
        "media both ways through the adopters' relays",
        Duration::from_secs(15),
        || {
            let (code, text) = c
                .admin(&survivors, &["calls", "list", "--output", "json"])
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            let list = v.as_array()?;
            (code == 0
                && list.len() == calls
                && list.iter().all(|r| {
                    r["media_error"].as_str() == Some("")
                        && r["media"].as_array().is_some_and(|m| {
                            !m.is_empty()
                                && m.iter().all(|s| {
                                    s["a_packets"].as_u64().is_some_and(|n| n > 0)
                                        && s["b_packets"].as_u64().is_some_and(|n| n > 0)
                                })
                        })
                }))
            .then_some(list.clone())
        },
    )
    .unwrap_or_else(|e| {
        let (_, text) = c.admin(&survivors, &["calls", "list"]).unwrap_or_default();
        panic!(
            "{e}:\n{}",
            text.lines().take(20).collect::<Vec<_>>().join("\n")
        )
    });

    // What adopting cost: the survivors' CPU from the fault until media flowed on every
    // call (adoption, re-INVITEs, relaying since, and this test's polling of calls list).
    let cpu = survivors_cpu().saturating_sub(cpu_before);
    eprintln!(
        "survivors' CPU from the fault to media on every call: {cpu} ms in {} ms ({} µs per call)",
        faulted.elapsed().as_millis(),
        cpu * 1000 / calls as u64
    );

    // The media gap of each call: from the fault to the first packet from both sides on
    // its new owner's relay (printed, not asserted: speed is the benchmark's business).
    let mut gaps: Vec<u64> = media
        .iter()
        .map(|r| {
            r["media"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let a = s["a_first_ms"].as_u64().unwrap_or(0);
                    let b = s["b_first_ms"].as_u64().unwrap_or(0);
                    a.max(b).saturating_sub(faulted_ms)
                })
                .max()
                .unwrap_or(0)
        })
        .collect();
    gaps.sort_unstable();
    let pct = |p: usize| gaps[(gaps.len() * p / 100).min(gaps.len() - 1)];
    eprintln!(
        "media gap per call (fault to media both ways on the adopter): p50 {} ms, p99 {} ms, max {} ms",
        pct(50),
        pct(99),
        gaps[gaps.len() - 1]
    );

    if let Some(partition) = partition {
        // Healed while the calls are up: the old owner learns it lost them and must not
        // take them back (re-INVITE), hang them up (BYE) or keep their records.
        drop(partition);
        wait_for(
            &format!("node {owner} to see its calls re-owned"),
            Duration::from_secs(30),
            || {
                let list = records(&c, &[owner])?;
                (list.len() == calls && list.iter().all(|r| r.owner != owner as u64)).then_some(())
            },
        )
        .unwrap();
    }

    let uac_run: SippRun = uac.wait().unwrap();
    let uas_run: SippRun = uas.wait().unwrap();
    let (a, b) = (PhoneLog::read(&uac_log), PhoneLog::read(&uas_log));
    eprintln!(
        "caller: {} ok, {} failed, {} re-INVITEs; callee: {} ok, {} failed, {} re-INVITEs",
        uac_run.successful,
        uac_run.failed,
        a.reinvite_count(),
        uas_run.successful,
        uas_run.failed,
        b.reinvite_count()
    );
    if uac_run.failed > 0 || uas_run.failed > 0 {
        eprintln!("{}{}", sipp_errors(&uac_dir), sipp_errors(&uas_dir));
    }
    assert_all_ok(&uac_run, calls, "caller: every call through the fault");
    assert_all_ok(&uas_run, calls, "callee: every call through the fault");
    assert_one_reinvite_each("caller", &a, &a_legs, &survivor_ips);
    assert_one_reinvite_each("callee", &b, &b_legs, &survivor_ips);
    // The BYE (the caller's, relayed) reached the callee from a survivor.
    for id in &b_legs {
        let from = b.byes.get(id).map(String::as_str).unwrap_or("nowhere");
        let ip = from.rsplit_once(':').map_or(from, |(ip, _)| ip);
        assert!(
            survivor_ips.iter().any(|s| s == ip),
            "callee leg {id}: BYE from {from}, not a survivor {survivor_ips:?}"
        );
    }

    // The ended calls' records go, on every node running.
    let running: Vec<usize> = match fault {
        Fault::Kill => survivors.clone(),
        Fault::Partition | Fault::Migrate => vec![1, 2, 3],
    };
    wait_for(
        "the ended calls' records gone",
        Duration::from_secs(15),
        || {
            running
                .iter()
                .all(|&n| c.status(n).and_then(|s| s.get("calls").cloned()).as_deref() == Some("0"))
                .then_some(())
        },
    )
    .unwrap();
    // Each call is one detail record: answered, run first by its owner, then by the
    // node that adopted it, with the start the owner saw (ADR 0010, issue 18).
    let (code, text) = c
        .admin(&running, &["cdr", "export", "--format", "json"])
        .unwrap();
    assert_eq!(code, 0, "{text}");
    let cdrs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cdrs.len(), calls, "one record a call: {text}");
    for r in &cdrs {
        assert_eq!(r["disposition"], "ANSWERED", "{r}");
        let nodes: Vec<u64> = r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_u64())
            .collect();
        assert_eq!(nodes.first(), Some(&(owner as u64)), "{r}");
        assert!(nodes.len() >= 2, "the adopter is named too: {r}");
        assert!(
            r["start_ms"].as_u64() <= r["answer_ms"].as_u64() && r["start_ms"].as_u64() > Some(0),
            "the start as its first node saw it: {r}"
        );
    }
    if fault == Fault::Kill {
        // The killed node comes back with its log (the adoption commands in it) and runs
        // none of the calls it lost.
        c.start(owner).unwrap();
        wait_for(
            &format!("node {owner} restarted with no calls"),
            Duration::from_secs(30),
            || (c.status(owner)?.get("calls")? == "0").then_some(()),
        )
        .unwrap_or_else(|e| {
            let log = c.log(owner);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{e}: {:?}\n{}",
                c.status(owner),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
    }
}

#[test]
fn calls_survive_their_node_being_killed() {
    survive(60, Victim::Follower, Fault::Kill);
}

#[test]
fn calls_survive_their_node_being_killed_leader_killed() {
    survive(61, Victim::Leader, Fault::Kill);
}

#[test]
fn calls_survive_a_partitioned_owner() {
    survive(62, Victim::Follower, Fault::Partition);
}

#[test]
fn calls_move_off_a_drained_node_without_ending() {
    survive(63, Victim::Follower, Fault::Migrate);
}

/// Two real softphones (baresip, UDP) that know only `sip:USER@pbx.test` and the cluster's
/// DNS: u1 calls u2, both send a tone; the node running the call is SIGKILLed. The call
/// stays up on both phones, each hears the other again after a gap (what each heard is
/// in a WAV baresip writes in real time), and u2's hang-up goes to the adopter, which
/// ends u1's leg and the record. Prints the gap each phone heard.
#[test]
fn a_call_between_softphones_survives_its_node() {
    require_tool("baresip", "baresip-core");
    require_tool("dig", "bind9-dnsutils");
    let users = Users { count: 2 };
    let c = LocalCluster::up(64, 3, &users, MD5_ONLY).unwrap();
    let dns: Vec<std::net::SocketAddr> = (1..=3).map(|n| c.dns_addr(n).unwrap()).collect();
    let phone = |user: usize, host: u8| {
        let ip = c.client_ip(host);
        let control: std::net::SocketAddr = format!("{ip}:{}", free_tcp_port(&ip)).parse().unwrap();
        let dir = c.dir.path().join(format!("baresip-u{user}"));
        let b = Baresip::start_with(
            &dir,
            &ip,
            5070,
            &dns,
            &format!(
                "<sip:{}@pbx.test>;auth_pass={};regint=600;answermode=auto;audio_codecs=PCMU",
                Users::name(user),
                Users::password(user)
            ),
            &Baresip::control_config(control),
        );
        (b, dir, control)
    };
    let out_log = |dir: &Path| std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
    let (_alice, a_dir, a_control) = phone(1, 50);
    let (_bob, b_dir, b_control) = phone(2, 51);
    for (user, dir) in [(1, &a_dir), (2, &b_dir)] {
        wait_for(
            &format!("u{user} registered through DNS"),
            Duration::from_secs(20),
            || (!c.bound_via(&[1, 2, 3], &Users::name(user)).is_empty()).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}:\n{}", out_log(dir)));
    }

    Baresip::command(
        a_control,
        "dial",
        &format!("sip:{}@pbx.test", Users::name(2)),
    )
    .unwrap();
    let call = wait_for("the call answered", Duration::from_secs(20), || {
        records(&c, &[1, 2, 3]).and_then(|l| l.into_iter().next())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", out_log(&a_dir), out_log(&b_dir)));
    let owner = call.owner as usize;
    let survivors: Vec<usize> = (1..=3).filter(|&n| n != owner).collect();
    let rates = |dir: &Path, from: usize| RtpRates::parse(&out_log(dir), from);
    wait_for("both phones receive RTP", Duration::from_secs(20), || {
        (rates(&a_dir, 0).receiving() && rates(&b_dir, 0).receiving()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", out_log(&a_dir), out_log(&b_dir)));

    let at_kill = [&a_dir, &b_dir].map(|d| out_log(d).len());
    let leader = c.leader_among(&[1, 2, 3]);
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    c.kill(owner).unwrap();
    let adopter = wait_for(
        "the call adopted by a survivor",
        Duration::from_secs(30),
        || {
            let l = records(&c, &survivors)?;
            l.iter()
                .find(|r| r.id == call.id && r.owner as usize != owner)
                .map(|r| r.owner as usize)
        },
    )
    .unwrap();
    // The adopter's relay gets both phones' RTP: the gap is from the kill to the later
    // of their first packets there.
    let gap = wait_for(
        "media both ways through the adopter's relay",
        Duration::from_secs(15),
        || {
            let (code, text) = c
                .admin(&[adopter], &["calls", "list", "--output", "json"])
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            let s = v.as_array()?.first()?["media"].as_array()?.first()?.clone();
            let (a, b) = (s["a_first_ms"].as_u64()?, s["b_first_ms"].as_u64()?);
            (code == 0 && a > 0 && b > 0).then(|| a.max(b).saturating_sub(killed_ms))
        },
    )
    .unwrap();
    // Both phones' counters: a dip after the kill, then the full rate again.
    wait_for(
        "both phones receive RTP again",
        Duration::from_secs(20),
        || {
            let (a, b) = (rates(&a_dir, at_kill[0]), rates(&b_dir, at_kill[1]));
            (a.dipped() && b.dipped() && a.receiving() && b.receiving()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}\n{}", out_log(&a_dir), out_log(&b_dir)));
    eprintln!(
        "baresip <-> baresip (UDP): node {owner} (the leader: {}) killed; call adopted by node \
         {adopter}; media both ways on its relay {gap} ms after the kill; both phones \
         receive 64 kbit/s again",
        leader == Some(owner),
    );

    // The callee hangs up: its BYE goes to the adopter (the Contact of the re-INVITE),
    // which ends the caller's leg and the call's record.
    Baresip::command(b_control, "hangup", "").unwrap();
    wait_for("the record ended", Duration::from_secs(15), || {
        records(&c, &survivors)?.is_empty().then_some(())
    })
    .unwrap();
    let ended = wait_for("the caller's leg ended", Duration::from_secs(15), || {
        out_log(&a_dir)
            .lines()
            .find(|l| l.contains("terminated"))
            .map(str::to_string)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", out_log(&a_dir)));
    eprintln!("the caller: {ended}");
}
