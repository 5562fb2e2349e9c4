//! STUN Binding answers on the SIP UDP port (RFC 5389), the keep-alive of RFC 5626
//! §4.4.2: a phone with an outbound flow over UDP sends Binding requests to its
//! registrar's SIP port and learns from the answer (XOR-MAPPED-ADDRESS) whether its NAT
//! binding changed; no answer tells it the flow is dead and it registers again
//! elsewhere. Demultiplexed from SIP by the first byte and the magic cookie (RFC 5626
//! §8; RFC 7983).

use std::net::{IpAddr, SocketAddr};

const MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Whether a datagram is a STUN message (two zero bits, then the magic cookie).
pub(crate) fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20
        && data[0] & 0xc0 == 0
        && u32::from_be_bytes([data[4], data[5], data[6], data[7]]) == MAGIC
}

/// The success response to a well-formed Binding request from `source`, with a
/// FINGERPRINT when the request had one; `None` for anything else (dropped silently:
/// STUN indications and responses are not ours to answer).
pub(crate) fn binding_response(request: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    if !is_stun(request) {
        return None;
    }
    let kind = u16::from_be_bytes([request[0], request[1]]);
    let len = usize::from(u16::from_be_bytes([request[2], request[3]]));
    if kind != BINDING_REQUEST || len % 4 != 0 || request.len() != 20 + len {
        return None;
    }
    let mut fingerprinted = false;
    let mut at = 20;
    while at + 4 <= request.len() {
        let attr = u16::from_be_bytes([request[at], request[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([request[at + 2], request[at + 3]]));
        fingerprinted |= attr == FINGERPRINT;
        at += 4 + alen.div_ceil(4) * 4;
    }
    if at != request.len() {
        return None; // an attribute runs past the end
    }
    let txid = &request[8..20];
    let mut value = Vec::with_capacity(20);
    let port = source.port() ^ (MAGIC >> 16) as u16;
    match source.ip() {
        IpAddr::V4(ip) => {
            value.extend_from_slice(&[0, 0x01]);
            value.extend_from_slice(&port.to_be_bytes());
            let x = u32::from(ip) ^ MAGIC;
            value.extend_from_slice(&x.to_be_bytes());
        }
        IpAddr::V6(ip) => {
            value.extend_from_slice(&[0, 0x02]);
            value.extend_from_slice(&port.to_be_bytes());
            let mut key = MAGIC.to_be_bytes().to_vec();
            key.extend_from_slice(txid);
            value.extend(ip.octets().iter().zip(key).map(|(o, k)| o ^ k));
        }
    }
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&[0, 0]); // length, set below
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(txid);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    let body = out.len() - 20 + if fingerprinted { 8 } else { 0 };
    out[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    if fingerprinted {
        // RFC 5389 §15.5: CRC-32 of everything before it (the length already counting
        // it), XORed with 0x5354554e.
        let crc = crc32(&out) ^ FINGERPRINT_XOR;
        out.extend_from_slice(&FINGERPRINT.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&crc.to_be_bytes());
    }
    Some(out)
}

/// CRC-32 (ISO 3309 / IEEE 802.3, reflected, as STUN's FINGERPRINT uses).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fingerprint: bool) -> Vec<u8> {
        let mut r = vec![0x00, 0x01, 0, 0];
        r.extend_from_slice(&MAGIC.to_be_bytes());
        r.extend_from_slice(b"0123456789ab");
        if fingerprint {
            r[3] = 8;
            let crc = crc32(&r) ^ FINGERPRINT_XOR;
            r.extend_from_slice(&FINGERPRINT.to_be_bytes());
            r.extend_from_slice(&4u16.to_be_bytes());
            r.extend_from_slice(&crc.to_be_bytes());
        }
        r
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_binding_request_gets_its_address_back_xored() {
        let source: SocketAddr = "192.0.2.7:40123".parse().unwrap();
        let r = binding_response(&request(false), source).unwrap();
        assert_eq!(&r[0..2], &[0x01, 0x01], "Binding success");
        assert_eq!(&r[8..20], b"0123456789ab", "same transaction");
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) as usize, r.len() - 20);
        assert_eq!(&r[20..22], &XOR_MAPPED_ADDRESS.to_be_bytes());
        let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
        let ip = u32::from_be_bytes([r[28], r[29], r[30], r[31]]) ^ MAGIC;
        assert_eq!(
            SocketAddr::from((std::net::Ipv4Addr::from(ip), port)),
            source
        );
    }

    #[test]
    fn a_fingerprinted_request_gets_a_fingerprinted_answer_and_junk_gets_none() {
        let source: SocketAddr = "[2001:db8::5]:5062".parse().unwrap();
        let r = binding_response(&request(true), source).unwrap();
        let n = r.len();
        assert_eq!(&r[n - 8..n - 6], &FINGERPRINT.to_be_bytes());
        let crc = u32::from_be_bytes([r[n - 4], r[n - 3], r[n - 2], r[n - 1]]);
        assert_eq!(crc, crc32(&r[..n - 8]) ^ FINGERPRINT_XOR);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) as usize, n - 20);

        assert!(!is_stun(b"OPTIONS sip:x SIP/2.0\r\n\r\n"));
        let mut indication = request(false);
        indication[1] = 0x11; // Binding indication: nothing to answer
        assert!(binding_response(&indication, source).is_none());
        let mut truncated = request(true);
        truncated.pop();
        assert!(binding_response(&truncated, source).is_none());
    }
}
