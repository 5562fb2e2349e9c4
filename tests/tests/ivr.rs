//! An auto-attendant (Background, WaitExten, Read, SayDigits, Gosub, `i` and `t`) driven by real SIPp
//! callers: keys sent as RFC 4733 telephone-events (the `dtmf_2833_*.pcap` recordings
//! Debian's sip-tester ships, played into the call) and as SIP INFO.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pbx_tests::{assert_all_ok, repo_root, require_tool, wait_for, LocalCluster, Phones, Users};

const MD5_ONLY: &str = "[auth]\nchallenge_algorithms = [\"MD5\"]\n";

/// The menu: 1 sales (through a Gosub), 2 support, 3 reads a two-digit code and says
/// it back, anything else `i`, silence
/// `t`. TIMEOUT(digit) is short so a lone key is taken quickly.
const PLAN: &str = "[default]\n\
exten => 800,1,Answer()\n \
 same => n,Set(TIMEOUT(digit)=2)\n \
 same => n,Background(hello-world&silence-1)\n \
 same => n,WaitExten(5)\n\
exten => 1,1,Gosub(sub-log,s,1(sales))\n \
 same => n,Hangup()\n\
exten => 2,1,Log(NOTICE,ivr support ${CALLERID(num)})\n \
 same => n,Hangup()\n\
exten => 3,1,Read(CODE,beep,2)\n \
 same => n,SayDigits(${CODE})\n \
 same => n,Log(NOTICE,ivr code ${CODE} ${READSTATUS} ${CALLERID(num)})\n \
 same => n,Hangup()\n\
exten => i,1,Log(NOTICE,ivr invalid ${INVALID_EXTEN} ${CALLERID(num)})\n \
 same => n,Hangup()\n\
exten => t,1,Log(NOTICE,ivr timeout ${CALLERID(num)})\n \
 same => n,Hangup()\n\
exten => h,1,Log(NOTICE,ivr hangup ${CALLERID(num)} in ${EXTEN})\n\
[sub-log]\n\
exten => s,1,Log(NOTICE,ivr ${ARG1} ${CALLERID(num)})\n \
 same => n,Return()\n";

fn pcap(key: &str) -> String {
    let p = format!("/usr/share/sip-tester/dtmf_2833_{key}.pcap");
    assert!(Path::new(&p).exists(), "{p}: install sip-tester");
    format!(
        "  <nop><action><exec play_pcap_audio=\"{p}\"/></action></nop>\n  <pause milliseconds=\"600\"/>\n"
    )
}

fn info(cseq: u32, content_type: &str, body: &str) -> String {
    format!(
        "  <send retrans=\"500\">\n    <![CDATA[\n\n      INFO [next_url] SIP/2.0\n      \
         Via: SIP/2.0/[transport] [local_ip]:[local_port];rport;branch=[branch]\n      [routes]\n      \
         Max-Forwards: 70\n      From: <sip:[field0]@[field1]>;tag=[pid]SIPpTag00[call_number]\n      \
         [last_To:]\n      Call-ID: [call_id]\n      CSeq: {cseq} INFO\n      \
         Content-Type: {content_type}\n      Content-Length: [len]\n\n      {body}\n\n    ]]>\n  </send>\n  \
         <recv response=\"200\"/>\n"
    )
}

#[test]
fn callers_choose_from_the_menu_with_rfc4733_keys_and_sip_info() {
    require_tool("sipp", "sip-tester");
    let users = Users { count: 6 };
    let (_dir, plan) = pbx_tests::plan_file(PLAN);
    let extra = pbx_tests::md5_with_sounds();
    let c = LocalCluster::up_with_dialplan(80, 1, &users, &extra, &plan).unwrap();
    let p = Phones::new(&c);
    let template = std::fs::read_to_string(repo_root().join("tests/sipp/uac_ivr.xml")).unwrap();
    // Each caller: (user, pause before the keys, the keys, what the node logs).
    let cases = [
        // A key while the greeting plays interrupts it.
        (1, 300, pcap("1"), "ivr sales u000001".to_string()),
        // INFO (application/dtmf-relay) once the prompts are over, in WaitExten.
        (
            2,
            4000,
            info(3, "application/dtmf-relay", "Signal=2\n      Duration=160"),
            "ivr support u000002".into(),
        ),
        (3, 300, pcap("9"), "ivr invalid 9 u000003".into()),
        (4, 0, String::new(), "ivr timeout u000004".into()),
        // Read: 3 chooses it, then two keys (4 as RTP, 7 as application/dtmf INFO).
        (
            5,
            300,
            format!(
                "{}  <pause milliseconds=\"1500\"/>\n{}{}",
                pcap("3"),
                pcap("4"),
                info(3, "application/dtmf", "7")
            ),
            "ivr code 47 OK u000005".into(),
        ),
    ];
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    for (user, pause, keys, expect) in cases {
        let started = std::time::Instant::now();
        let scenario = p.file(
            "uac_ivr.xml",
            &template
                .replace("PAUSE_MS", &pause.to_string())
                .replace("KEYS\n", &keys),
        );
        let run = p
            .call(scenario.to_str().unwrap(), 1, user, "800", nowhere, 0)
            .wait()
            .unwrap();
        assert_all_ok(&run, 1, &expect);
        eprintln!("{expect}: sipp done after {:?}", started.elapsed());
        wait_for(&expect, Duration::from_secs(10), || {
            c.log(1).contains(&expect).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log(1)));
    }
    // The h extension ran after each call.
    for user in 1..=5 {
        let line = format!("ivr hangup {} in h", Users::name(user));
        assert!(c.log(1).contains(&line), "{line}");
    }
}

/// Keys between two phones are relayed as they came: the callee's media socket gets
/// the caller's RFC 4733 packets of one key press (start, updates, end packets), one
/// event, once — the node neither drops nor duplicates them.
#[test]
fn keys_between_two_phones_arrive_once_per_key() {
    require_tool("sipp", "sip-tester");
    let users = Users { count: 3 };
    let c = LocalCluster::up(82, 1, &users, MD5_ONLY).unwrap();
    let p = Phones::new(&c);
    let bob_ip = c.client_ip(50);
    let bob_port = pbx_tests::free_udp_port(&bob_ip);
    let bob_media = std::net::UdpSocket::bind((bob_ip.as_str(), 0)).unwrap();
    p.register(1, 2, &bob_ip, bob_port);
    let uas = p.callee_with_media(
        "uas_answer.xml",
        &bob_ip,
        bob_port,
        &bob_media.local_addr().unwrap().to_string(),
        &[],
    );
    // uac_call.xml offering telephone-event and playing key 5 once answered.
    let scenario = std::fs::read_to_string(repo_root().join("tests/sipp/uac_call.xml"))
        .unwrap()
        .replace(
            "m=audio [field5] RTP/AVP 0\n      a=rtpmap:0 PCMU/8000\n",
            "m=audio [field5] RTP/AVP 0 101\n      a=rtpmap:0 PCMU/8000\n      a=rtpmap:101 telephone-event/8000\n",
        )
        .replacen("  <pause/>\n", &format!("{}  <pause/>\n", pcap("5")), 1);
    assert!(
        scenario.contains("dtmf_2833_5"),
        "the scenario changed shape"
    );
    let scenario = p.file("uac_key.xml", &scenario);
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let uac = p.call(
        scenario.to_str().unwrap(),
        1,
        1,
        &Users::name(2),
        nowhere,
        1500,
    );
    let ((caller, callee), packets) =
        pbx_tests::received_during(&bob_media, || (uac.wait().unwrap(), uas.wait().unwrap()));
    assert_all_ok(&caller, 1, "the caller");
    assert_all_ok(&callee, 1, "the callee");
    let events: Vec<(u32, u8, bool)> = packets
        .iter()
        .filter(|p| p.len() >= 16 && p[1] & 0x7f == 101)
        .map(|p| {
            let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
            (ts, p[12], p[13] & 0x80 != 0)
        })
        .collect();
    // The recording: 10 packets of one event (key 5), the last ones with the end bit.
    assert_eq!(events.len(), 10, "{events:?}");
    assert!(
        events.iter().all(|e| e.0 == events[0].0 && e.1 == 5),
        "{events:?}"
    );
    assert!(
        events.last().unwrap().2,
        "the end packets arrive: {events:?}"
    );
}
