//! What the in-process node tests share: a UDP phone that registers with digest
//! authentication, and waiting on a condition instead of sleeping a fixed time.

#![allow(dead_code)] // each test binary uses its own part

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use pbx_registrar::digest::{Algorithm, ClientAuth};
use pbx_sip_msg::{parse_datagram, AuthHeader, HeaderName, Limits, SipMessage};
use tokio::net::UdpSocket;

/// Polls `probe` every 20 ms until it yields a value; panics with `what` after `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request` to `to` and returns the first answer (within 5 s).
pub async fn exchange(phone: &UdpSocket, to: SocketAddr, request: &str) -> SipMessage {
    phone.send_to(request.as_bytes(), to).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(Duration::from_secs(5), phone.recv(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    parse_datagram(&buf[..n], &Limits::default()).expect("the node's answer parses")
}

/// A REGISTER of `user` for a contact at `phone` (Call-ID per user and phone).
pub fn register_request(
    phone: SocketAddr,
    user: &str,
    branch: &str,
    cseq: u32,
    auth: Option<&str>,
) -> String {
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    format!(
        "REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {phone};rport;branch=z9hG4bK{branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:{user}@pbx.test>;tag=a1\r\nTo: <sip:{user}@pbx.test>\r\n\
         Call-ID: reg-{user}-{port}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{phone}>\r\n{auth}\
         Content-Length: 0\r\n\r\n",
        port = phone.port()
    )
}

/// The credentials answering the digest challenge in `challenge` (a 401's
/// WWW-Authenticate or a 407's Proxy-Authenticate) for `method` on `uri`.
pub fn answer_challenge(
    challenge: &SipMessage,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
) -> String {
    let header = if challenge.status() == Some(407) {
        HeaderName::ProxyAuthenticate
    } else {
        HeaderName::WwwAuthenticate
    };
    let ch = AuthHeader::parse(challenge.header(&header).unwrap()).unwrap();
    ClientAuth {
        algorithm: Algorithm::parse(ch.get("algorithm")).unwrap(),
        user,
        password,
        realm: ch.get("realm").unwrap(),
        nonce: ch.get("nonce").unwrap(),
        method,
        uri,
        nc: 1,
        cnonce: "0a4f113b",
    }
    .header_value()
}

/// A phone on its own UDP port that registers one user.
pub struct Phone {
    pub socket: UdpSocket,
    pub addr: SocketAddr,
    user: String,
    password: String,
    cseq: u32,
}

impl Phone {
    pub async fn new(user: &str, password: &str) -> Phone {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        Phone {
            socket,
            addr,
            user: user.into(),
            password: password.into(),
            cseq: 0,
        }
    }

    /// REGISTER → 401 → REGISTER with credentials; returns the final answer (the 401
    /// itself when the node did not challenge with a digest, e.g. a 503).
    pub async fn register(&mut self, node: SocketAddr) -> SipMessage {
        self.cseq += 1;
        let first = register_request(
            self.addr,
            &self.user,
            &format!("r{}", self.cseq),
            self.cseq,
            None,
        );
        let challenge = exchange(&self.socket, node, &first).await;
        if challenge.status() != Some(401) {
            return challenge;
        }
        let auth = answer_challenge(
            &challenge,
            "REGISTER",
            "sip:pbx.test",
            &self.user,
            &self.password,
        );
        self.cseq += 1;
        let second = register_request(
            self.addr,
            &self.user,
            &format!("r{}", self.cseq),
            self.cseq,
            Some(&auth),
        );
        exchange(&self.socket, node, &second).await
    }
}

/// What a phone receives: the message and where it came from.
pub async fn recv_from(phone: &UdpSocket, limit: Duration) -> Option<(SipMessage, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(limit, phone.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some((parse_datagram(&buf[..n], &Limits::default()).ok()?, from))
}

/// Receives until a message satisfying `want` arrives (others are skipped: provisional
/// responses, retransmissions); panics after `limit`.
pub async fn recv_until(
    phone: &UdpSocket,
    what: &str,
    limit: Duration,
    want: impl Fn(&SipMessage) -> bool,
) -> (SipMessage, SocketAddr) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match recv_from(phone, left).await {
            Some((m, from)) if want(&m) => return (m, from),
            Some(_) => {}
            None => panic!("{what}: nothing within {limit:?}"),
        }
    }
}

/// A response to `request` as a phone sends it: its Via, From, Call-ID and CSeq, the To
/// with `to_tag` added when it has none, a Contact at `contact`, and `sdp` as body.
pub fn response_to(
    request: &SipMessage,
    status: u16,
    to_tag: &str,
    contact: SocketAddr,
    sdp: &str,
) -> String {
    let mut out = format!("SIP/2.0 {status} X\r\n");
    for v in request.header_values(&HeaderName::Via) {
        out.push_str(&format!("Via: {v}\r\n"));
    }
    let to = request.header(&HeaderName::To).unwrap_or("");
    let to = if to.contains("tag=") {
        to.to_string()
    } else {
        format!("{to};tag={to_tag}")
    };
    out.push_str(&format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\nContact: <sip:phone@{contact}>\r\n",
        request.header(&HeaderName::From).unwrap_or(""),
        request.header(&HeaderName::CallId).unwrap_or(""),
        request.header(&HeaderName::CSeq).unwrap_or(""),
    ));
    if !sdp.is_empty() {
        out.push_str("Content-Type: application/sdp\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{sdp}", sdp.len()));
    out
}

/// An audio offer or answer of a phone at `addr`, PCMU on `port`.
pub fn phone_sdp(addr: SocketAddr, port: u16, version: u32) -> String {
    let ip = addr.ip();
    format!(
        "v=0\r\no=phone 7 {version} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
}
