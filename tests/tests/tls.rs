//! SIP over TLS with real peers: baresip (OpenSSL) registering over TLS found through the
//! cluster's `_sips._tcp` records and called through another node; SIPp registering and
//! calling a UDP phone through a TLS tunnel (socat, checking the node's certificate
//! against the local CA); the node's certificate replaced on disk and picked up
//! without a restart.
//!
//! Debian 12's SIPp is built without TLS ("To use a TLS transport you must compile SIPp
//! with OpenSSL"), so `-t l1` is not available: SIPp speaks TCP to a local socat that
//! opens a verified TLS connection per SIPp connection to the node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pbx_tests::{
    assert_all_ok, free_udp_port, require_tool, wait_for, Baresip, LocalCluster, Phones, Users,
};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]";

/// The registrations of `user` as (transport, node) pairs.
fn bindings_of(c: &LocalCluster, user: &str) -> Vec<(String, u64)> {
    let Ok((0, text)) = c.admin(
        &[1, 2, 3],
        &["registrations", "list", "--user", user, "--output", "json"],
    ) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    Some((r["transport"].as_str()?.to_string(), r["node_id"].as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// socat relaying connections accepted by `accept` (a socat address listening on
/// `listen`) to `connect`; killed when dropped. As a TLS client tunnel: plain TCP in,
/// each connection carried over its own verified TLS connection to a node. As a TLS
/// server: TLS in, plain TCP out to a SIPp.
struct Socat(Child);

impl Socat {
    fn start(listen: SocketAddr, accept: String, connect: String) -> Socat {
        require_tool("socat", "socat");
        let child = Command::new("socat")
            .arg(accept)
            .arg(connect)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting socat");
        wait_for("socat listening", Duration::from_secs(5), || {
            std::net::TcpStream::connect(listen).ok().map(|_| ())
        })
        .unwrap();
        Socat(child)
    }

    /// TCP on `listen` → TLS to `node`, whose certificate must chain to `ca` and name
    /// `pbx.test`.
    fn tls_client(listen: SocketAddr, node: SocketAddr, ca: &Path) -> Socat {
        Socat::start(
            listen,
            format!(
                "TCP-LISTEN:{},bind={},reuseaddr,fork",
                listen.port(),
                listen.ip()
            ),
            format!(
                "OPENSSL:{node},cafile={},commonname=pbx.test,verify=1",
                ca.display()
            ),
        )
    }

    /// TLS on `listen` with `cert`/`key` → TCP to `backend`.
    fn tls_server(listen: SocketAddr, cert: &Path, key: &Path, backend: SocketAddr) -> Socat {
        Socat::start(
            listen,
            format!(
                "OPENSSL-LISTEN:{},bind={},reuseaddr,fork,cert={},key={},verify=0",
                listen.port(),
                listen.ip(),
                cert.display(),
                key.display()
            ),
            format!("TCP:{backend}"),
        )
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SHA-256 fingerprint (lower-case hex, no colons) of the certificate a TLS server
/// presents, as `openssl s_client` sees it.
fn presented_fingerprint(server: SocketAddr) -> Option<String> {
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &server.to_string(),
            "-servername",
            "pbx.test",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pem = s_client.stdout.take()?;
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(pem)
        .output()
        .ok()?;
    let _ = s_client.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.trim().split_once('=')?.1.replace(':', "");
    (!hex.is_empty()).then(|| hex.to_ascii_lowercase())
}

/// The TLS phone: baresip with only `sip:u1@pbx.test;transport=tls` and the cluster's
/// DNS finds a node through `_sips._tcp.pbx.test`, registers over TLS; SIPp calls it over
/// UDP through a node that does not hold its connection: the call goes through the
/// phone's node (Relay RPC) and over its TLS connection.
#[test]
fn a_tls_softphone_registers_through_sips_srv_and_is_called_through_another_node() {
    require_tool("baresip", "baresip-core");
    require_tool("openssl", "openssl");
    let users = Users { count: 2 };
    let c = LocalCluster::up(54, 3, &users, MD5_ONLY).unwrap();
    let ca = c.run_dir().join("tls/ca.crt");
    assert!(ca.exists(), "the launcher made a local CA");
    // The cluster DNS publishes TLS: SIPS+D2T and _sips._tcp to port 5061 of each node.
    let dns: Vec<SocketAddr> = (1..=3).map(|n| c.dns_addr(n).unwrap()).collect();
    let srv = || {
        let out = Command::new("dig")
            .args([
                &format!("@{}", dns[0].ip()),
                "-p",
                &dns[0].port().to_string(),
                "+short",
                "SRV",
                "_sips._tcp.pbx.test",
            ])
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).to_string())
    };
    wait_for(
        "_sips._tcp lists the three nodes",
        Duration::from_secs(10),
        || srv().filter(|s| s.lines().filter(|l| l.contains(" 5061 node")).count() == 3),
    )
    .unwrap();

    let dir = c.dir.path().join("baresip");
    let ip = c.client_ip(50);
    let _phone = Baresip::start_with(
        &dir,
        &ip,
        free_udp_port(&ip),
        &dns,
        &format!(
            "<sip:{}@pbx.test;transport=tls>;auth_pass={};regint=600;answermode=auto;audio_codecs=PCMU",
            Users::name(1),
            Users::password(1)
        ),
        &format!("sip_cafile {}\n", ca.display()),
    );
    let home = wait_for(
        "the softphone registered over TLS",
        Duration::from_secs(20),
        || {
            bindings_of(&c, &Users::name(1))
                .into_iter()
                .find(|(t, _)| t == "TLS")
                .map(|(_, n)| n as usize)
        },
    )
    .unwrap();
    // A UDP caller through another node.
    let other = (1..=3).find(|&n| n != home).unwrap();
    let p = Phones::new(&c);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let run = p
        .call("uac_call.xml", other, 2, &Users::name(1), nowhere, 2000)
        .wait()
        .unwrap();
    assert_all_ok(&run, 1, "UDP u2 -> TLS u1 through another node");
    let phone_log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
    assert!(phone_log.contains("Call established"), "{phone_log}");
    assert!(
        c.log(other).contains("u000001 answered"),
        "{}",
        c.log(other)
    );
}

/// SIPp over TLS (through the tunnel): 20 registrations, then a TLS caller calls a UDP
/// phone; the bindings are recorded as TLS. Then node 1's certificate is replaced on
/// disk: new handshakes get the new one without a restart, and SIPp registers again.
#[test]
fn sipp_registers_and_calls_a_udp_phone_over_tls_and_the_certificate_is_reloaded() {
    require_tool("openssl", "openssl");
    let users = Users { count: 22 };
    let c = LocalCluster::up(55, 3, &users, &format!("{MD5_ONLY}\n")).unwrap();
    let run = c.run_dir();
    let tunnel_addr: SocketAddr = format!("{}:5062", c.client_ip(5)).parse().unwrap();
    let tls_node: SocketAddr = format!("{}:5061", c.node_addr(1).ip()).parse().unwrap();
    let _tunnel = Socat::tls_client(tunnel_addr, tls_node, &run.join("tls/ca.crt"));
    let tls = Phones::through(&c, tunnel_addr, "t1");

    // 20 registrations over TLS, one connection.
    let inf = tls.file("reg.csv", &{
        let mut s = String::from("SEQUENTIAL\n");
        for i in 3..=22 {
            s.push_str(&format!(
                "{};pbx.test;{};{}:5099;3600\n",
                Users::name(i),
                Users::password(i),
                c.client_ip(7)
            ));
        }
        s
    });
    let reg = pbx_tests::Sipp {
        scenario: "reg_auth.xml",
        target: tunnel_addr,
        local_ip: c.client_ip(6),
        inf: &inf,
        calls: 20,
        rate: 20,
        transport: "t1",
    }
    .run()
    .unwrap();
    assert_all_ok(&reg, 20, "registrations over TLS");
    assert_eq!(
        bindings_of(&c, &Users::name(3)),
        vec![("TLS".to_string(), 1)],
        "recorded as a TLS binding held by node 1"
    );

    // u2 is a UDP phone registered through node 2; u1 calls it over TLS via node 1.
    let udp = Phones::new(&c);
    let bob_ip = c.client_ip(50);
    let bob_port = free_udp_port(&bob_ip);
    udp.register(2, 2, &bob_ip, bob_port);
    let uas = udp.callee("uas_answer.xml", &bob_ip, bob_port, &[]);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let uac = tls.call("uac_call.xml", 1, 1, &Users::name(2), nowhere, 1000);
    assert_all_ok(&uac.wait().unwrap(), 1, "TLS u1 -> UDP u2");
    assert_all_ok(&uas.wait().unwrap(), 1, "u2 answers");

    // Certificate renewal: a new key and certificate for node 1 from the same CA,
    // written over the old files.
    let before = presented_fingerprint(tls_node).expect("node 1 presents a certificate");
    let tls_dir = run.join("tls");
    let (key, crt) = issue(
        &tls_dir,
        "renewed",
        &format!("DNS:pbx.test,DNS:node1.pbx.test,IP:{}", tls_node.ip()),
    );
    // Key first, then certificate (each an atomic rename): the node never takes a
    // mismatched pair, whatever moment it looks.
    std::fs::rename(&key, tls_dir.join("node1.key")).unwrap();
    std::fs::rename(&crt, tls_dir.join("node1.crt")).unwrap();
    let after = wait_for(
        "node 1 presenting the renewed certificate",
        Duration::from_secs(40),
        || presented_fingerprint(tls_node).filter(|f| *f != before),
    )
    .unwrap();
    assert!(
        c.log(1)
            .contains(&format!("TLS certificate reloaded sha256={after}")),
        "{}",
        c.log(1)
    );
    // New TLS connections (SIPp through a new tunnel connection) work with it.
    let again = pbx_tests::Sipp {
        scenario: "reg_auth.xml",
        target: tunnel_addr,
        local_ip: c.client_ip(8),
        inf: &inf,
        calls: 20,
        rate: 20,
        transport: "t1",
    }
    .run()
    .unwrap();
    assert_all_ok(
        &again,
        20,
        "registrations over TLS with the renewed certificate",
    );
}

/// A key and a certificate for `san` (an openssl subjectAltName value), signed by the
/// cluster's local CA, as `tls_dir/stem.{key,crt}`.
fn issue(tls_dir: &Path, stem: &str, san: &str) -> (PathBuf, PathBuf) {
    let (key, csr, crt, ext) = (
        tls_dir.join(format!("{stem}.key")),
        tls_dir.join(format!("{stem}.csr")),
        tls_dir.join(format!("{stem}.crt")),
        tls_dir.join(format!("{stem}.ext")),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
        "-subj",
        &format!("/CN={stem}"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&tls_dir.join("ca.crt")),
        "-CAkey",
        &p(&tls_dir.join("ca.key")),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&crt),
    ]);
    (key, crt)
}

/// `Dial(SIP/555@provider.test)` over TLS: BIND publishes only SIPS+D2T for the
/// provider, with two `_sips._tcp` servers. The first presents a certificate for
/// another domain: the node refuses it (RFC 5922) and, as for any transport error,
/// moves to the next server at once; the second proves `provider.test` and the call
/// goes through over TLS.
#[test]
fn dial_over_tls_checks_the_providers_certificate_and_fails_over_on_a_bad_one() {
    require_tool("openssl", "openssl");
    let slot = 56u8;
    let prefix = format!("127.0.{slot}");
    let p = pbx_tests::ProviderDomain::start(
        slot,
        &format!(
            "@ IN NAPTR 10 50 \"s\" \"SIPS+D2T\" \"\" _sips._tcp.provider.test.\n\
             _sips._tcp IN SRV 10 50 5061 impostor.provider.test.\n\
             _sips._tcp IN SRV 20 50 5061 live.provider.test.\n\
             impostor IN A {prefix}.21\nlive IN A {prefix}.22\n"
        ),
    );
    let (c, dir, uac_inf) = (&p.cluster, p.dir.path(), &p.uac_inf);
    // The provider's servers, with certificates from the CA the node trusts.
    let tls_dir = c.run_dir().join("tls");
    let (good_key, good_crt) = issue(&tls_dir, "provider", "DNS:provider.test");
    let (bad_key, bad_crt) = issue(&tls_dir, "impostor", "DNS:impostor.example");
    let backend: SocketAddr = format!("{prefix}.23:5070").parse().unwrap();
    let uas_inf = dir.join("uas.csv");
    std::fs::write(&uas_inf, format!("SEQUENTIAL\n{prefix}.23;9\n")).unwrap();
    let provider = pbx_tests::Sipp {
        scenario: "uas_answer.xml",
        target: c.node_addr(1),
        local_ip: backend.ip().to_string(),
        inf: &uas_inf,
        calls: 1,
        rate: 1,
        transport: "t1",
    }
    .spawn(&["-p", &backend.port().to_string()])
    .unwrap();
    wait_for(
        "the provider's SIPp listening",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(backend).ok().map(|_| ()),
    )
    .unwrap();
    let live: SocketAddr = format!("{prefix}.22:5061").parse().unwrap();
    let impostor: SocketAddr = format!("{prefix}.21:5061").parse().unwrap();
    let _live = Socat::tls_server(live, &good_crt, &good_key, backend);
    let _impostor = Socat::tls_server(impostor, &bad_crt, &bad_key, backend);

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
    assert_all_ok(&run, 1, "call to 555@provider.test over TLS");
    assert_all_ok(&provider.wait().unwrap(), 1, "the provider's live server");
    let log = c.log(1);
    assert!(
        log.contains(&format!("{impostor} (TLS): transport error")),
        "the impostor's certificate refused:\n{log}"
    );
    assert!(
        log.contains(&format!("trying {live} (TLS)")),
        "failover to the live server:\n{log}"
    );
}
