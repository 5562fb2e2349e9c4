//! Voicemail end to end with real SIPp phones on a three-node cluster: an unanswered
//! call reaches VoiceMail and leaves a recording (a pcap of G.711 A-law played by SIPp);
//! `pbxctl voicemail` lists it and fetches it as a WAV holding exactly what was sent;
//! the owner's phone, subscribed on another node, sees its lamp light and go out
//! (RFC 3842); the node that recorded the message is killed, and VoiceMailMain on
//! another node plays the message back, byte for byte.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pbx_tests::{assert_all_ok, repo_root, require_tool, wait_for, LocalCluster, Phones, Users};

const G711A_PCAP: &str = "/usr/share/sip-tester/g711a.pcap";

const PLAN: &str = "[default]\n\
exten => _u.,1,Dial(SIP/${EXTEN},5)\n \
 same => n,VoiceMail(${EXTEN},u)\n \
 same => n,Log(NOTICE,vm status ${VMSTATUS} ${CALLERID(num)})\n \
 same => n,Hangup()\n\
exten => 8500,1,VoiceMailMain(${CALLERID(num)})\n \
 same => n,Log(NOTICE,vm main done ${CALLERID(num)})\n \
 same => n,Hangup()\n";

/// The RTP payloads of `pt` in a pcap (Ethernet or Linux cooked capture, IPv4, UDP),
/// in capture order.
fn pcap_payloads(path: &str, pt: u8) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    let link = u32::from_le_bytes(data[20..24].try_into().unwrap());
    let l2 = match link {
        1 => 14,
        113 => 16,
        other => panic!("{path}: link type {other}"),
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &data[at + 16..at + 16 + len];
        at += 16 + len;
        let ip = &frame[l2..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 {
            continue;
        }
        let rtp = &ip[ihl + 8..];
        if rtp.len() < 12 || rtp[0] >> 6 != 2 || rtp[1] & 0x7f != pt {
            continue;
        }
        let header = 12 + usize::from(rtp[0] & 0x0f) * 4;
        out.push(rtp[header..].to_vec());
    }
    out
}

/// The audio of a G.711 WAV file (its `data` chunk).
fn wav_data(wav: &[u8]) -> Vec<u8> {
    assert_eq!(&wav[..4], b"RIFF");
    assert_eq!(&wav[8..12], b"WAVE");
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = &wav[at..at + 4];
        let len = u32::from_le_bytes(wav[at + 4..at + 8].try_into().unwrap()) as usize;
        if id == b"fmt " {
            let format = u16::from_le_bytes([wav[at + 8], wav[at + 9]]);
            assert_eq!(format, 6, "A-law, as recorded");
        }
        if id == b"data" {
            return wav[at + 8..at + 8 + len].to_vec();
        }
        at += 8 + len + (len & 1);
    }
    panic!("no data chunk");
}

/// The blob files of a node's voicemail store (`dir/ab/abcdef…`).
fn blob_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none())
        .collect();
    out.sort();
    out
}

/// The PIN 4242 and `#`, keyed by INFO with CSeqs 3 to 7.
fn pin_keys() -> String {
    [
        info(3, '4'),
        info(4, '2'),
        info(5, '4'),
        info(6, '2'),
        info(7, '#'),
    ]
    .concat()
}

/// The A-law payloads a test socket received, in capture order (loopback keeps the
/// order: capture order is play order).
fn alaw_heard(packets: &[Vec<u8>]) -> Vec<u8> {
    packets
        .iter()
        .filter(|p| p.len() > 12 && p[1] & 0x7f == 8)
        .flat_map(|p| p[12..].to_vec())
        .collect()
}

fn info(cseq: u32, key: char) -> String {
    format!(
        "  <send retrans=\"500\">\n    <![CDATA[\n\n      INFO [next_url] SIP/2.0\n      \
         Via: SIP/2.0/[transport] [local_ip]:[local_port];rport;branch=[branch]\n      [routes]\n      \
         Max-Forwards: 70\n      From: <sip:[field0]@[field1]>;tag=[pid]SIPpTag00[call_number]\n      \
         [last_To:]\n      Call-ID: [call_id]\n      CSeq: {cseq} INFO\n      \
         Content-Type: application/dtmf-relay\n      Content-Length: [len]\n\n      \
         Signal={key}\n      Duration=160\n\n    ]]>\n  </send>\n  <recv response=\"200\"/>\n"
    )
}

fn pause(ms: u64) -> String {
    format!("  <pause milliseconds=\"{ms}\"/>\n")
}

/// uac_ivr.xml offering PCMA (the pcap's codec) with these keys after `pause_ms`;
/// media at SIPp's own socket (whose pcaps it plays), or with `media_from_csv` at the
/// CSV's address (a socket of the test).
fn caller_scenario(pause_ms: u64, keys: &str, media_from_csv: bool) -> String {
    let mut template = std::fs::read_to_string(repo_root().join("tests/sipp/uac_ivr.xml")).unwrap();
    if media_from_csv {
        template = template
            .replace("c=IN IP4 [media_ip]", "c=IN IP4 [field4]")
            .replace("m=audio [media_port]", "m=audio [field5]");
    }
    let pcma = template
        .replace("RTP/AVP 0 101", "RTP/AVP 8 101")
        .replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000");
    assert_eq!(
        pcma.matches("RTP/AVP 8 101").count(),
        2,
        "the template changed"
    );
    pcma.replace("PAUSE_MS", &pause_ms.to_string())
        .replace("KEYS\n", keys)
}

fn notify_expecting(counts: &str, cseq_note: &str) -> String {
    format!(
        "  <recv request=\"NOTIFY\" timeout=\"180000\">\n    <action>\n      \
         <ereg regexp=\"Voice-Message: {counts} \" search_in=\"body\" check_it=\"true\" assign_to=\"3\"/>\n      \
         <log message=\"lamp {cseq_note}\"/>\n    </action>\n  </recv>\n  \
         <send>\n    <![CDATA[\n\n      SIP/2.0 200 OK\n      [last_Via:]\n      [last_From:]\n      \
         [last_To:]\n      [last_Call-ID:]\n      [last_CSeq:]\n      Content-Length: 0\n\n    ]]>\n  </send>\n"
    )
}

#[test]
fn a_message_is_left_fetched_signalled_and_heard_after_its_node_died() {
    require_tool("sipp", "sip-tester");
    assert!(
        Path::new(G711A_PCAP).exists(),
        "{G711A_PCAP}: install sip-tester"
    );
    let sent: Vec<u8> = pcap_payloads(G711A_PCAP, 8).concat();
    assert!(sent.len() > 20_000, "the pcap holds seconds of audio");

    let started = std::time::Instant::now();
    let users = Users { count: 3 };
    let (dir, plan) = pbx_tests::plan_file(PLAN);
    // The audio keeper runs every second here (30 s by default).
    let extra = format!(
        "{}\n[storage]\nvoicemail_repair_secs = 1\n",
        pbx_tests::md5_with_sounds()
    );
    let c = LocalCluster::up_with_dialplan(88, 3, &users, &extra, &plan).unwrap();
    let p = Phones::new(&c);
    let owner = Users::name(2);
    let (code, out) = c
        .admin(&[1, 2, 3], &["voicemail", "pin", &owner, "4242"])
        .unwrap();
    assert_eq!(code, 0, "{out}");

    // The owner's phone subscribes to its lamp through node 2.
    let subscriber_ip = c.client_ip(40);
    let mwi = std::fs::read_to_string(repo_root().join("tests/sipp/uac_mwi.xml"))
        .unwrap()
        .replace(
            "NOTIFIES\n",
            &format!(
                "{}{}",
                notify_expecting("1/0", "on: 1 new"),
                notify_expecting("0/1", "off: 0 new, 1 old")
            ),
        );
    let mwi = p.file("uac_mwi.xml", &mwi);
    let inf = p.file(
        "mwi.csv",
        &format!("SEQUENTIAL\n{owner};pbx.test;{}\n", Users::password(2)),
    );
    let port = pbx_tests::free_udp_port(&subscriber_ip).to_string();
    let subscriber = p.sipp(
        mwi.to_str().unwrap(),
        2,
        &subscriber_ip,
        &inf,
        // It waits through the whole test: longer than SIPp's usual 120 s.
        &["-p", &port, "-trace_msg", "-timeout", "400s"],
    );
    // SIPp's message trace (beside the scenario or where it runs): the first NOTIFY.
    let traces = [mwi.parent().unwrap(), inf.parent().unwrap()];
    wait_for("the first NOTIFY", Duration::from_secs(20), || {
        traces
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("_messages.log"))
            .any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("Messages-Waiting: no"))
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log(2)));

    // A caller on node 1: the owner is not registered, so Dial fails and VoiceMail takes
    // the call. `#` skips the greeting, the pcap is the message, `#` ends it; the node
    // says it is saved (only once it is), and hangs up.
    let keys = format!(
        "{}{}  <nop><action><exec play_pcap_audio=\"{G711A_PCAP}\"/></action></nop>\n{}{}",
        info(3, '#'),
        pause(1500),
        pause(8000),
        info(4, '#')
    );
    let scenario = p.file("uac_leave.xml", &caller_scenario(1000, &keys, false));
    let nowhere: SocketAddr = format!("{}:9", c.client_ip(99)).parse().unwrap();
    let run = p
        .call(scenario.to_str().unwrap(), 1, 1, &owner, nowhere, 0)
        .wait()
        .unwrap();
    assert_all_ok(&run, 1, "the caller leaving a message");
    let status_line = format!("vm status SUCCESS {}", Users::name(1));
    wait_for(&status_line, Duration::from_secs(10), || {
        c.log(1).contains(&status_line).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log(1)));

    // Listed, on a majority, and fetched as a WAV holding exactly what was sent.
    let (code, out) = c
        .admin(&[3], &["--output", "json", "voicemail", "list", &owner])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let message = &list[0]["messages"][0];
    assert_eq!(list[0]["new"], 1, "{out}");
    assert_eq!(message["folder"], "INBOX", "{out}");
    assert_eq!(message["codec"], "PCMA", "{out}");
    assert!(message["holders"].as_array().unwrap().len() >= 2, "{out}");
    let id = message["id"].as_u64().unwrap().to_string();
    let wav_path = dir.path().join("message.wav");
    let (code, out) = c
        .admin(
            &[3],
            &[
                "voicemail",
                "fetch",
                &owner,
                &id,
                wav_path.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let recorded = wav_data(&std::fs::read(&wav_path).unwrap());
    assert_eq!(
        recorded.len(),
        sent.len(),
        "the recording is the pcap's audio, no more, no less"
    );
    assert!(recorded == sent, "the recording's bytes are those sent");

    // Every voter ends up holding the audio (the keeper copies it where the save's
    // majority left it out, and records the holder), and a voter that lost the file gets
    // it back from another.
    let holders = |c: &LocalCluster| -> Option<usize> {
        let (code, out) = c
            .admin(&[3], &["--output", "json", "voicemail", "list", &owner])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == 0).then(|| {
            v[0]["messages"][0]["holders"]
                .as_array()
                .map_or(0, Vec::len)
        })
    };
    wait_for(
        "every voter holding the message",
        Duration::from_secs(30),
        || (holders(&c) == Some(3)).then_some(()),
    )
    .unwrap();
    let audio_dir = c.data_dir(3).join("voicemail");
    let held = blob_files(&audio_dir);
    assert_eq!(held.len(), 1, "{held:?}");
    std::fs::remove_file(&held[0]).unwrap();
    wait_for(
        "the lost audio copied back",
        Duration::from_secs(30),
        || blob_files(&audio_dir).contains(&held[0]).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log(3)));
    assert_eq!(std::fs::read(&held[0]).unwrap().len(), recorded.len());

    eprintln!("repaired after {:?}", started.elapsed());
    // The node that recorded it dies; the owner listens through node 2.
    c.kill(1).unwrap();
    let listener_ip = c.client_ip(41);
    let media = std::net::UdpSocket::bind((listener_ip.as_str(), 0)).unwrap();
    let keys = [
        pin_keys(),
        pause(800),
        info(8, '1'),
        pause(12_000),
        info(9, '#'),
    ]
    .concat();
    let scenario = p.file("uac_listen.xml", &caller_scenario(1500, &keys, true));
    let media_addr = media.local_addr().unwrap();
    let (run, packets) = pbx_tests::received_during(&media, || {
        p.call(scenario.to_str().unwrap(), 2, 2, "8500", media_addr, 0)
            .wait()
            .unwrap()
    });
    assert_all_ok(&run, 1, "the owner listening");
    eprintln!("listened after {:?}", started.elapsed());
    let heard = alaw_heard(&packets);
    assert!(
        !heard.is_empty(),
        "the node played A-law to the listener: {} packets, payload types {:?}\n{}",
        packets.len(),
        packets
            .iter()
            .map(|p| p.get(1).map(|b| b & 0x7f))
            .collect::<std::collections::BTreeSet<_>>(),
        c.log(2)
    );
    assert!(
        heard
            .windows(recorded.len())
            .any(|w| w == recorded.as_slice()),
        "the message played back is the recording, byte for byte ({} bytes heard)",
        heard.len()
    );

    // The owner records an unavailable greeting (options 0, then 1: the pcap again);
    // a caller reaching the mailbox through node 3 hears it, then the instructions and
    // the tone, and leaves nothing (`#` at once: under a second, not kept).
    // The prompt after `1` and the tone take 4.5 s: the pcap starts 5.5 s after it.
    let keys = [
        pin_keys(),
        pause(800),
        info(8, '0'),
        pause(500),
        info(9, '1'),
        pause(5500),
        format!("  <nop><action><exec play_pcap_audio=\"{G711A_PCAP}\"/></action></nop>\n"),
        pause(8000),
        info(10, '#'),
        pause(2500),
        info(11, '#'),
    ]
    .concat();
    let scenario = p.file("uac_greeting.xml", &caller_scenario(1500, &keys, false));
    let run = p
        .call(scenario.to_str().unwrap(), 2, 2, "8500", nowhere, 0)
        .wait()
        .unwrap();
    assert_all_ok(&run, 1, "the owner recording a greeting");
    let (code, out) = c
        .admin(&[2, 3], &["--output", "json", "voicemail", "list", &owner])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["greetings"][0], "unavailable", "{out}");
    let caller_ip = c.client_ip(42);
    let media = std::net::UdpSocket::bind((caller_ip.as_str(), 0)).unwrap();
    let media_addr = media.local_addr().unwrap();
    let keys = format!("{}{}", pause(16_000), info(3, '#'));
    let scenario = p.file("uac_greeted.xml", &caller_scenario(0, &keys, true));
    let (run, packets) = pbx_tests::received_during(&media, || {
        p.call(scenario.to_str().unwrap(), 3, 3, &owner, media_addr, 0)
            .wait()
            .unwrap()
    });
    assert_all_ok(&run, 1, "a caller hearing the greeting");
    let heard = alaw_heard(&packets);
    // The greeting's recording began after its prompt: its last two seconds at least
    // are the pcap's.
    let tail = &sent[sent.len() - 16_000..];
    assert!(
        heard.windows(tail.len()).any(|w| w == tail),
        "the caller hears the owner's greeting ({} bytes heard)",
        heard.len()
    );
    let nothing = format!("vm status USEREXIT {}", Users::name(3));
    wait_for(&nothing, Duration::from_secs(10), || {
        c.log(3).contains(&nothing).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log(3)));

    // The lamp: on when the message came, off once it was heard (node 2 told it).
    let lamp = subscriber.wait().unwrap();
    assert_all_ok(&lamp, 1, "the subscriber's NOTIFYs");
    let (code, out) = c
        .admin(&[2, 3], &["--output", "json", "voicemail", "list", &owner])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (list[0]["new"].clone(), list[0]["old"].clone()),
        (0.into(), 1.into()),
        "{out}"
    );
}
