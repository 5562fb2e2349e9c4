//! Parser-stage verdicts for every RFC 4475 torture message (INDEX.tsv). The application
//! verdicts (416, 420, 401, 200 …) are checked against the whole request pipeline in
//! `pbx-registrar`'s tests.

use std::path::PathBuf;

use pbx_sip_msg::{
    frame_stream, parse_datagram, ContactList, CoreHeaders, HeaderName, Limits, StreamFrame,
};

fn corpus_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PBX_RFC4475_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/rfc4475")
        });
    if dir.join("INDEX.tsv").exists() {
        Some(dir)
    } else {
        eprintln!(
            "\n!!!!!!!! RFC 4475 corpus not found at {} — torture tests SKIPPED !!!!!!!!\n",
            dir.display()
        );
        None
    }
}

/// (file, verdict) rows of INDEX.tsv.
fn index(dir: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join("INDEX.tsv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[0].to_string(), cols[4].to_string())
        })
        .collect()
}

/// The whole parser stage: lexical parse, then the core headers of a request.
fn parse_stage(bytes: &[u8]) -> Result<(), Option<u16>> {
    let msg = parse_datagram(bytes, &Limits::default()).map_err(|e| e.status())?;
    let request = msg.is_request();
    CoreHeaders::extract(&msg).map_err(|e| if request { e.status() } else { None })?;
    // Contact is parsed by every request handler that uses it (REGISTER, INVITE).
    ContactList::parse(msg.header_values(&HeaderName::Contact)).map_err(|_| {
        if request {
            Some(400)
        } else {
            None
        }
    })?;
    Ok(())
}

#[test]
fn every_torture_message_gets_its_parser_verdict() {
    let Some(dir) = corpus_dir() else { return };
    let rows = index(&dir);
    assert_eq!(rows.len(), 50, "INDEX.tsv rows");
    let mut failures = Vec::new();
    for (file, verdict) in &rows {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let lexical = parse_datagram(&bytes, &Limits::default());
        let full = parse_stage(&bytes);
        let ok = match verdict.as_str() {
            "ACCEPT" | "ACCEPT first message" => full.is_ok(),
            // Application-layer cases must get past the lexical stage; what the element
            // answers then is the pipeline's business.
            v if v.starts_with("PARSE") => lexical.is_ok(),
            "ACCEPT (parse)" => lexical.is_ok(),
            "REJECT 400" | "REJECT 400 (UDP)" => full == Err(Some(400)),
            "REJECT 505" => full == Err(Some(505)),
            "REJECT 501 (or 400)" => matches!(full, Err(Some(501 | 400))),
            // Framing errors: over UDP, answer 400 (or drop).
            "REJECT (framing)" => matches!(full, Err(Some(400) | None)),
            "DROP (response)" => full == Err(None),
            // A liberal element may accept; we must only not panic.
            "MAY REJECT" | "MAY REJECT 400" => true,
            "(none; expect REJECT)" => full.is_err(),
            other => panic!("unknown verdict {other} for {file}"),
        };
        if !ok {
            failures.push(format!("{file}: expected {verdict}, got {full:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "verdicts not met:\n{}",
        failures.join("\n")
    );
}

#[test]
fn dblreq_handles_the_first_message_only() {
    let Some(dir) = corpus_dir() else { return };
    let bytes = std::fs::read(dir.join("dblreq.dat")).unwrap();
    let msg = parse_datagram(&bytes, &Limits::default()).unwrap();
    assert_eq!(msg.method().map(|m| m.as_str()), Some("REGISTER"));
    assert!(msg.body.is_empty());
}

#[test]
fn mpart01_body_is_framed_by_content_length_including_nul_bytes() {
    let Some(dir) = corpus_dir() else { return };
    let bytes = std::fs::read(dir.join("mpart01.dat")).unwrap();
    let msg = parse_datagram(&bytes, &Limits::default()).unwrap();
    assert_eq!(msg.body.len(), 553);
    assert!(msg.body.contains(&0u8));
}

#[test]
fn esc02_unknown_header_is_not_a_contact() {
    let Some(dir) = corpus_dir() else { return };
    let bytes = std::fs::read(dir.join("esc02.dat")).unwrap();
    let msg = parse_datagram(&bytes, &Limits::default()).unwrap();
    let contacts =
        pbx_sip_msg::ContactList::parse(msg.header_values(&pbx_sip_msg::HeaderName::Contact))
            .unwrap();
    let pbx_sip_msg::ContactList::Contacts(c) = contacts else {
        panic!("expected contacts")
    };
    assert_eq!(c.len(), 2);
    assert!(!msg.method().unwrap().is_known());
}

#[test]
fn baddn_variant_with_terminating_crlf_is_400_for_the_display_name() {
    let Some(dir) = corpus_dir() else { return };
    let bytes = std::fs::read(dir.join("variants/baddn.ersip-with-terminating-crlf.dat")).unwrap();
    let msg = parse_datagram(&bytes, &Limits::default()).unwrap();
    let err = CoreHeaders::extract(&msg).unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.reason().contains("From"), "{}", err.reason());
}

/// Over a stream, the framing cases are unrecoverable: the framer must refuse them.
#[test]
fn stream_framing_errors_close_the_connection() {
    let Some(dir) = corpus_dir() else { return };
    for file in ["ncl.dat", "mcl01.dat"] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert!(frame_stream(&bytes, &Limits::default()).is_err(), "{file}");
    }
    // clerr: Content-Length larger than what arrived: wait for more.
    let bytes = std::fs::read(dir.join("clerr.dat")).unwrap();
    assert_eq!(
        frame_stream(&bytes, &Limits::default()),
        Ok(StreamFrame::Incomplete)
    );
}

/// Every valid message survives the stream framer byte for byte, and a body never
/// swallows the next message.
#[test]
fn valid_messages_frame_on_streams_back_to_back() {
    let Some(dir) = corpus_dir() else { return };
    for (file, verdict) in index(&dir) {
        if verdict != "ACCEPT" {
            continue;
        }
        let one = std::fs::read(dir.join(&file)).unwrap();
        let Ok(StreamFrame::Message(n)) = frame_stream(&one, &Limits::default()) else {
            panic!("{file} does not frame");
        };
        let mut two = one[..n].to_vec();
        two.extend_from_slice(&one[..n]);
        assert_eq!(
            frame_stream(&two, &Limits::default()),
            Ok(StreamFrame::Message(n)),
            "{file}"
        );
    }
}
