//! Parser verdicts for the twelve messages of RFC 5118, "Session Initiation Protocol (SIP)
//! Torture Test Messages for Internet Protocol Version 6 (IPv6)" (V. Gurbani, C. Boulton,
//! R. Sparks; February 2008). It is the IPv6 companion of RFC 4475: its section 4 (4.1 to
//! 4.10) gives SIP requests built to trip parsers that guess where an IPv6 reference ends —
//! brackets missing (4.2), a port inside or outside the `]` (4.3, 4.4), `received=` with and
//! without brackets (4.5), IPv6 addresses in SDP (4.6, 4.8), Via lists mixing IPv4 and IPv6
//! (4.7), IPv4-mapped addresses (4.9) and the extra colon that RFC 3261's ABNF allows before
//! an embedded IPv4 address (4.10). Only 4.2's `ipv6-bad` is invalid; every other message
//! must be accepted.
//!
//! The files in `tests/rfc5118/` are transcribed from the RFC: the indentation of the RFC
//! text removed, the `<allOneLine>` lines of 4.5 joined, CRLF line ends, each named by the
//! RFC's own tag for it. `tests/rfc5118/VERDICTS.tsv` holds the RFC's verdict and reason for
//! each. Two departures from the printed text keep the RFC's intent (a complete message)
//! rather than its slips:
//! - the three messages with SDP carry the real byte count of their CRLF body as
//!   Content-Length: `ipv6-in-sdp` 251 (the RFC prints 268), `mult-ip-in-sdp` 189 (181),
//!   `ipv4-mapped-ipv6` 245 (236). The printed values match neither LF nor CRLF counting,
//!   except 236, which counts LF line ends;
//! - the two 4.10 messages end their header section with the empty line the RFC leaves out.
//!
//! Each message goes through the whole parser stage: `parse_datagram`, `CoreHeaders::extract`
//! (every Via's sent-by, the From and To URIs), the Request-URI through
//! `Uri::parse_request_uri` and every Contact through `ContactList::parse`. The crate has no
//! typed parser for a Via's `received` or `maddr` (they are kept as strings), so the addresses
//! they name are checked with `std::net` in the per-section tests.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use pbx_sip_msg::{
    parse_datagram, Contact, ContactList, CoreHeaders, HeaderName, Limits, SipError, SipMessage,
    Uri,
};

/// The last line of the SDP bodies of 4.6, 4.8 and 4.9: seeing it means the body arrived whole.
const LAST_SDP_LINE: &str = "a=rtpmap:107 H263-1998/90000\r\n";

/// `tests/rfc5118/`, next to this file.
fn corpus_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.join("tests/rfc5118")
}

/// The bytes of one message, by the RFC's name for it.
fn load(name: &str) -> Vec<u8> {
    let path = corpus_dir().join(format!("{name}.dat"));
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// `(name, verdict)` rows of VERDICTS.tsv (columns: name, verdict, reason).
fn verdicts() -> Vec<(String, String)> {
    let path = corpus_dir().join("VERDICTS.tsv");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "VERDICTS.tsv row {line:?}");
        rows.push((cols[0].to_string(), cols[1].to_string()));
    }
    rows
}

/// The header section (with the CRLF of its last line) and the body of a CRLF message.
fn head_and_body(bytes: &[u8]) -> (&[u8], &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header section ended by an empty line");
    (&bytes[..end + 2], &bytes[end + 4..])
}

/// The step of the parser stage that refused a message.
enum Refused {
    /// `parse_datagram`: framing, the request line (the Request-URI is checked there too),
    /// the header lines, Content-Length.
    Datagram(SipError),
    /// `CoreHeaders::extract`: Via (sent-by and parameters), From, To, Call-ID, CSeq,
    /// Max-Forwards.
    CoreHeaders(SipError),
    /// `Uri::parse_request_uri` on the Request-URI.
    RequestUri(String),
    /// `ContactList::parse` on every Contact line.
    Contact(String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Datagram(e) => write!(f, "parse_datagram: {e}"),
            Refused::CoreHeaders(e) => write!(f, "CoreHeaders::extract: {e}"),
            Refused::RequestUri(e) => write!(f, "Uri::parse_request_uri: {e}"),
            Refused::Contact(e) => write!(f, "ContactList::parse: {e}"),
        }
    }
}

/// What the parser stage read from a message it accepted.
struct Parsed {
    msg: SipMessage,
    core: CoreHeaders,
    request_uri: Uri,
    contacts: Vec<Contact>,
}

/// The whole parser stage, in the order a request handler runs it.
fn parse_all(bytes: &[u8]) -> Result<Parsed, Refused> {
    let limits = Limits::default();
    let msg = parse_datagram(bytes, &limits).map_err(Refused::Datagram)?;
    let core = CoreHeaders::extract(&msg).map_err(Refused::CoreHeaders)?;
    let raw_uri = msg.request_uri().unwrap_or_default();
    let request_uri = Uri::parse_request_uri(raw_uri);
    let request_uri = request_uri.map_err(Refused::RequestUri)?;
    let lines = msg.header_values(&HeaderName::Contact);
    let contacts = match ContactList::parse(lines).map_err(Refused::Contact)? {
        ContactList::Contacts(contacts) => contacts,
        ContactList::Star => Vec::new(),
    };
    Ok(Parsed {
        msg,
        core,
        request_uri,
        contacts,
    })
}

/// Parses a message the RFC calls valid; a refusal fails the test, naming the step.
fn accepted(name: &str) -> Parsed {
    match parse_all(&load(name)) {
        Ok(parsed) => parsed,
        Err(refused) => panic!("{name} (RFC 5118: valid) refused by {refused}"),
    }
}

/// The IP address a host names: an IPv6 reference without its brackets, or a bare IPv4
/// or IPv6 address; `None` for a host name or anything `std::net` does not read.
fn ip_of(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => host.parse().ok(),
    }
}

/// An IPv6 literal of this test, as the `Some` that `ip_of` returns for it.
fn v6(s: &str) -> Option<IpAddr> {
    let addr: Ipv6Addr = s.parse().expect("a valid IPv6 literal");
    Some(IpAddr::V6(addr))
}

/// The corpus is what the module comment says: twelve CRLF messages, each listed in
/// VERDICTS.tsv, each with a Content-Length equal to its body.
#[test]
fn corpus_files_are_crlf_and_their_lengths_are_right() {
    let mut listed: Vec<String> = verdicts().into_iter().map(|(name, _)| name).collect();
    let mut on_disk = Vec::new();
    let entries = std::fs::read_dir(corpus_dir()).expect("the corpus directory");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "dat") {
            let stem = path.file_stem().unwrap_or_default();
            on_disk.push(stem.to_string_lossy().into_owned());
        }
    }
    listed.sort();
    on_disk.sort();
    assert_eq!(listed, on_disk, "VERDICTS.tsv and the .dat files");
    assert_eq!(listed.len(), 12);

    for name in &listed {
        let bytes = load(name);
        for (i, &b) in bytes.iter().enumerate() {
            let crlf = match b {
                b'\r' => bytes.get(i + 1) == Some(&b'\n'),
                b'\n' => i > 0 && bytes[i - 1] == b'\r',
                _ => true,
            };
            assert!(crlf, "{name}: bare CR or LF at byte {i}");
        }
        let (head, body) = head_and_body(&bytes);
        let head = std::str::from_utf8(head).expect("an ASCII header section");
        let declared: Vec<usize> = head
            .lines()
            .filter_map(|l| l.strip_prefix("Content-Length:"))
            .map(|v| v.trim().parse().expect("a decimal Content-Length"))
            .collect();
        assert_eq!(declared, [body.len()], "{name}: Content-Length");
    }
}

/// Every message gets the RFC's verdict: a valid one passes every step of the parser
/// stage, the invalid one is refused at some step.
#[test]
fn every_message_gets_the_rfc_verdict() {
    let rows = verdicts();
    assert_eq!(rows.len(), 12, "RFC 5118 section 4 has twelve messages");
    let mut failures = Vec::new();
    for (name, verdict) in &rows {
        let outcome = parse_all(&load(name));
        match (verdict.as_str(), outcome) {
            ("valid", Ok(_)) | ("invalid", Err(_)) => {}
            ("valid", Err(refused)) => {
                failures.push(format!("{name}: valid, refused by {refused}"));
            }
            ("invalid", Ok(_)) => failures.push(format!("{name}: invalid, accepted")),
            (other, _) => panic!("unknown verdict {other:?} for {name}"),
        }
    }
    assert!(
        failures.is_empty(),
        "verdicts not met:\n{}",
        failures.join("\n")
    );
}

/// 4.1: an IPv6 reference in the Request-URI, the Via and the Contact.
#[test]
fn ipv6_good_reads_every_reference() {
    let p = accepted("ipv6-good");
    assert_eq!(p.request_uri.host, "[2001:db8::10]");
    assert_eq!(p.request_uri.port, None);
    assert_eq!(ip_of(&p.request_uri.host), v6("2001:db8::10"));
    let via = &p.core.vias[0];
    assert_eq!(via.host, "[2001:db8::9:1]");
    assert_eq!(via.port, None);
    assert_eq!(ip_of(&via.host), v6("2001:db8::9:1"));
    assert_eq!(p.contacts.len(), 1);
    assert_eq!(p.contacts[0].display.as_deref(), Some("Caller"));
    assert_eq!(p.contacts[0].uri.host, "[2001:db8::1]");
    assert_eq!(ip_of(&p.contacts[0].uri.host), v6("2001:db8::1"));
}

/// 4.2: the Request-URI's IPv6 address has no brackets. The step that refuses it is
/// `parse_datagram`, which checks the Request-URI on the request line, and the answer is
/// the 400 the RFC asks for. Nothing else is wrong with the message: with the brackets
/// put back it is 4.1's `ipv6-good` byte for byte.
#[test]
fn ipv6_bad_is_refused_at_the_request_line_with_400() {
    let bytes = load("ipv6-bad");
    let err = match parse_datagram(&bytes, &Limits::default()) {
        Ok(_) => panic!("ipv6-bad (RFC 5118: invalid) was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.status(), Some(400));
    assert!(err.reason().contains("Request-URI"), "{}", err.reason());

    let text = String::from_utf8(bytes).expect("an ASCII message");
    let (bare, bracketed) = ("sip:2001:db8::10 ", "sip:[2001:db8::10] ");
    let fixed = text.replacen(bare, bracketed, 1);
    assert_eq!(fixed.as_bytes(), load("ipv6-good").as_slice());
}

/// 4.3: `sip:[2001:db8::10:5070]`. The sender meant port 5070, but inside the brackets it
/// is the last group of the address. The message is well-formed, so it is accepted, and the
/// URI names the IPv6 address 2001:db8::10:5070 with no port (the default applies).
#[test]
fn port_ambiguous_names_an_address_and_no_port() {
    let p = accepted("port-ambiguous");
    assert_eq!(p.request_uri.host, "[2001:db8::10:5070]");
    assert_eq!(p.request_uri.port, None);
    assert_eq!(ip_of(&p.request_uri.host), v6("2001:db8::10:5070"));
}

/// 4.4: `sip:[2001:db8::10]:5070`: the port is outside the brackets.
#[test]
fn port_unambiguous_names_the_address_and_port_5070() {
    let p = accepted("port-unambiguous");
    assert_eq!(p.request_uri.host, "[2001:db8::10]");
    assert_eq!(p.request_uri.port, Some(5070));
    assert_eq!(ip_of(&p.request_uri.host), v6("2001:db8::10"));
}

/// 4.5: `received=[2001:db8::9:255]`: brackets a strict reading of RFC 3261 does not allow
/// there, but the RFC requires the top Via to be parsed and the request processed.
#[test]
fn via_received_with_brackets_is_read() {
    let p = accepted("via-received-param-with-delim");
    let via = &p.core.vias[0];
    assert_eq!(via.host, "[2001:db8::9:1]");
    assert_eq!(via.received(), Some("[2001:db8::9:255]"));
    assert_eq!(via.branch(), Some("z9hG4bKas3-111"));
    let received = via.received().and_then(ip_of);
    assert_eq!(received, v6("2001:db8::9:255"));
}

/// 4.5: `received=2001:db8::9:255`: the form RFC 3261 itself gives
/// (`via-received = "received" EQUAL (IPv4address / IPv6address)`), so it must be accepted.
#[test]
fn via_received_without_brackets_is_read() {
    let p = accepted("via-received-param-no-delim");
    let via = &p.core.vias[0];
    assert_eq!(via.host, "[2001:db8::9:1]");
    assert_eq!(via.received(), Some("2001:db8::9:255"));
    assert_eq!(via.branch(), Some("z9hG4bKas3"));
    let received = via.received().and_then(ip_of);
    assert_eq!(received, v6("2001:db8::9:255"));
    assert_eq!(p.contacts[0].uri.host, "[2001:db8::9:1]");
}

/// 4.6: IPv6 addresses in the SDP body, which has no brackets; the body arrives whole.
#[test]
fn ipv6_in_sdp_body_arrives_whole() {
    let p = accepted("ipv6-in-sdp");
    assert_eq!(p.request_uri.user.as_deref(), Some("user"));
    assert_eq!(p.request_uri.host, "[2001:db8::10]");
    assert_eq!(p.core.to.uri.host, "[2001:db8::10]");
    assert_eq!(p.core.vias[0].host, "[2001:db8::20]");
    assert_eq!(p.contacts[0].uri.host, "[2001:db8::20]");
    let body = std::str::from_utf8(&p.msg.body).expect("an ASCII SDP body");
    assert_eq!(body.len(), 251);
    assert!(body.contains("\r\nc=IN IP6 2001:db8::20\r\n"), "{body}");
    assert!(body.ends_with(LAST_SDP_LINE), "{body}");
}

/// 4.7: a Via list mixing IPv6 references (one with a port) and IPv4 addresses, and an
/// IPv4 `received` on an IPv6 hop.
#[test]
fn mult_ip_in_header_reads_each_via() {
    let p = accepted("mult-ip-in-header");
    assert_eq!(p.request_uri.host, "host.example.net");
    let vias = &p.core.vias;
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[0].transport, "UDP");
    assert_eq!(vias[0].host, "[2001:db8::9:1]");
    assert_eq!(vias[0].port, Some(6050));
    assert_eq!(vias[1].transport, "UDP");
    assert_eq!(vias[1].host, "192.0.2.1");
    assert_eq!(vias[1].port, None);
    assert_eq!(vias[2].transport, "TCP");
    assert_eq!(vias[2].host, "[2001:db8::9:255]");
    assert_eq!(vias[2].received(), Some("192.0.2.200"));
    let received = vias[2].received().and_then(ip_of);
    let expected = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
    assert_eq!(received, Some(expected));
    assert!(p.contacts.is_empty());
}

/// 4.8: one media line on IPv4, one on IPv6; the body arrives whole.
#[test]
fn mult_ip_in_sdp_body_arrives_whole() {
    let p = accepted("mult-ip-in-sdp");
    assert_eq!(p.request_uri.host, "[2001:db8::10]");
    assert_eq!(p.contacts[0].uri.host, "[2001:db8::9:1]");
    let body = std::str::from_utf8(&p.msg.body).expect("an ASCII SDP body");
    assert_eq!(body.len(), 189);
    assert!(body.contains("\r\nc=IN IP4 192.0.2.1\r\n"), "{body}");
    assert!(body.contains("\r\nc=IN IP6 2001:db8::1\r\n"), "{body}");
    assert!(body.ends_with(LAST_SDP_LINE), "{body}");
}

/// 4.9: IPv4-mapped IPv6 addresses in both Vias (the top one with a port after the `]`),
/// the Contact and the SDP.
#[test]
fn ipv4_mapped_addresses_are_read() {
    let p = accepted("ipv4-mapped-ipv6");
    let vias = &p.core.vias;
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[0].host, "[::ffff:192.0.2.10]");
    assert_eq!(vias[0].port, Some(19823));
    assert_eq!(vias[1].host, "[::ffff:192.0.2.2]");
    assert_eq!(vias[1].port, None);
    let contact = &p.contacts[0];
    assert_eq!(contact.display.as_deref(), Some("T. desk phone"));
    assert_eq!(contact.uri.host, "[::ffff:192.0.2.2]");
    let mapped = match ip_of(&contact.uri.host) {
        Some(IpAddr::V6(addr)) => addr.to_ipv4_mapped(),
        other => panic!("not an IPv6 address: {other:?}"),
    };
    assert_eq!(mapped, Some(Ipv4Addr::new(192, 0, 2, 2)));
    let body = std::str::from_utf8(&p.msg.body).expect("an ASCII SDP body");
    assert_eq!(body.len(), 245);
    assert!(body.contains("\r\nc=IN IP6 ::ffff:192.0.2.2\r\n"), "{body}");
    assert!(body.ends_with(LAST_SDP_LINE), "{body}");
}

/// 4.10: `[2001:db8:::192.0.2.1]`, the extra colon that RFC 3261's ABNF (taken from the
/// obsoleted RFC 2373) allows before an embedded IPv4 address. It must be tolerated. The
/// crate keeps an IPv6 reference as sent (it checks only which characters are inside the
/// brackets), so the host it reads is the literal; with the extra colon ignored, as the RFC
/// suggests, it is the address of the correct two-colon form.
#[test]
fn abnf_bug_three_colons_is_tolerated() {
    let p = accepted("ipv6-bug-abnf-3-colons");
    assert_eq!(p.request_uri.user.as_deref(), Some("user"));
    assert_eq!(p.request_uri.host, "[2001:db8:::192.0.2.1]");
    assert_eq!(p.core.to.uri.host, "[2001:db8:::192.0.2.1]");
    let repaired = p.request_uri.host.replacen(":::", "::", 1);
    assert_eq!(ip_of(&repaired), v6("2001:db8::192.0.2.1"));
}

/// 4.10: the same request with the correct two-colon reference.
#[test]
fn abnf_correct_two_colons_is_read() {
    let p = accepted("ipv6-correct-abnf-2-colons");
    assert_eq!(p.request_uri.host, "[2001:db8::192.0.2.1]");
    assert_eq!(p.core.to.uri.host, "[2001:db8::192.0.2.1]");
    assert_eq!(ip_of(&p.request_uri.host), v6("2001:db8::c000:201"));
    assert_eq!(p.core.vias[0].host, "lab1.east.example.com");
}

/// Bare LF line ends, which widely used stacks (Kamailio, PJSIP, sofia-sip) accept: 4.1's
/// message with every CRLF turned into LF parses, to the same message as with CRLF. It has
/// no body and Content-Length 0, so no length needs adjusting.
#[test]
fn bare_lf_line_endings_are_accepted() {
    let crlf = load("ipv6-good");
    let (_, body) = head_and_body(&crlf);
    assert!(body.is_empty(), "no body to re-count");
    let text = String::from_utf8(crlf).expect("an ASCII message");
    let lf = text.replace("\r\n", "\n");
    assert!(!lf.contains('\r'));
    let p = match parse_all(lf.as_bytes()) {
        Ok(p) => p,
        Err(refused) => panic!("ipv6-good with bare LF refused by {refused}"),
    };
    assert_eq!(p.msg, accepted("ipv6-good").msg);
    assert_eq!(p.request_uri.host, "[2001:db8::10]");
    assert_eq!(p.core.vias[0].host, "[2001:db8::9:1]");
    assert_eq!(p.contacts[0].uri.host, "[2001:db8::1]");
}
