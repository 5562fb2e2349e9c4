//! Nothing panics on any input: corrupted variants of real messages through every entry
//! point of the wire layer.

use pbx_sip_msg::{
    frame_stream, parse_datagram, AuthHeader, ContactList, CoreHeaders, HeaderName, Limits,
    NameAddr, Uri, Via,
};
use proptest::prelude::*;

const SEEDS: &[&[u8]] = &[
    b"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK776asdhds\r\nMax-Forwards: 70\r\nTo: \"Alice\" <sip:alice@pbx.test>\r\nFrom: <sip:alice@pbx.test>;tag=1928301774\r\nCall-ID: a84b4c76e66710@pc33\r\nCSeq: 314159 REGISTER\r\nContact: <sip:alice@10.0.0.1:5060>;expires=3600;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1, sip:alice@10.0.0.2;q=0.5\r\nAuthorization: Digest username=\"alice\", realm=\"pbx.test\", nonce=\"abc\", uri=\"sip:pbx.test\", response=\"00\", qop=auth, nc=00000001, cnonce=\"x\"\r\nExpires: 7200\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:bob@pbx.test SIP/2.0\r\nv: SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bKnashds8\r\nf: Alice <sip:alice@pbx.test>;tag=88\r\nt: sip:bob@pbx.test\r\ni: 12345@host\r\nCSeq: 1 INVITE\r\nm: <sip:alice@[2001:db8::1]>\r\nc: application/sdp\r\nl: 19\r\n\r\nv=0\r\ns=-\r\nt=0 0\r\n",
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;received=1.2.3.4\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n",
];

fn exercise(bytes: &[u8]) {
    let limits = Limits::default();
    let _ = frame_stream(bytes, &limits);
    if let Ok(msg) = parse_datagram(bytes, &limits) {
        let _ = CoreHeaders::extract(&msg);
        let _ = ContactList::parse(msg.header_values(&HeaderName::Contact));
        for h in &msg.headers {
            let _ = Via::parse_list(&h.value);
            let _ = NameAddr::parse_single(&h.value);
            let _ = AuthHeader::parse(&h.value);
            let _ = Uri::parse(&h.value);
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for m in muts {
        let len = v.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !v.is_empty() {
                    let i = i % len;
                    v[i] ^= b;
                }
            }
            Mutation::Delete(i, n) => {
                let i = i % len;
                let end = (i + n).min(v.len());
                if i < end {
                    v.drain(i..end);
                }
            }
            Mutation::Insert(i, bytes) => {
                let i = i % (v.len() + 1);
                v.splice(i..i, bytes.iter().copied());
            }
            Mutation::Truncate(i) => v.truncate(i % len),
            Mutation::Duplicate(i, n) => {
                let i = i % len;
                let end = (i + n).min(v.len());
                let chunk = v[i..end].to_vec();
                v.splice(end..end, chunk);
            }
        }
    }
    v
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let special = prop::sample::select(vec![
        b":".to_vec(),
        b";".to_vec(),
        b",".to_vec(),
        b"\"".to_vec(),
        b"<".to_vec(),
        b">".to_vec(),
        b"\r\n".to_vec(),
        b"\r\n ".to_vec(),
        b"%".to_vec(),
        b"\0".to_vec(),
        b"\xff\xfe".to_vec(),
        b"Content-Length: 99999999999\r\n".to_vec(),
        b"l: -1\r\n".to_vec(),
        b"[".to_vec(),
        b"\\".to_vec(),
    ]);
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), special).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..200).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_messages_never_panic(
        seed in 0usize..SEEDS.len(),
        muts in prop::collection::vec(mutation(), 1..6),
    ) {
        exercise(&apply(SEEDS[seed], &muts));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise(&bytes);
    }
}

/// Corrupted variants of the RFC 4475 corpus itself, deterministically.
#[test]
fn corpus_truncations_and_flips_never_panic() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata/rfc4475");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("!!!!!!!! RFC 4475 corpus absent: corpus mutation test SKIPPED !!!!!!!!");
        return;
    };
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "dat") {
            let b = std::fs::read(e.path()).unwrap();
            for cut in 0..b.len() {
                exercise(&b[..cut]);
                let mut f = b.clone();
                f[cut] ^= 0x20;
                exercise(&f);
            }
        }
    }
}
