//! SDP (RFC 4566) as the B2BUA needs it: read the media a party offers or answers
//! (where it wants RTP, which codecs, which direction), and rewrite a session
//! description so that every stream goes through the node's relay (RFC 3264
//! offer/answer: same media lines in the same order, only addresses, ports and the
//! origin change). Unknown lines pass through untouched, except ICE attributes, which
//! would lead the other party around the relay.

use std::fmt::Write as _;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("SDP line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("SDP is missing {0}")]
    Missing(&'static str),
}

/// Media direction attribute (RFC 3264 §5.1); `sendrecv` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn attr(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub kind: String,
    pub port: u16,
    pub proto: String,
    pub formats: Vec<String>,
    /// `c=` of the section, else of the session.
    pub connection: Option<IpAddr>,
    pub direction: Direction,
    /// The other lines of the section (attributes, bandwidth, ...), in order.
    lines: Vec<String>,
}

impl Media {
    /// Where the party wants to receive RTP; `None` when the stream is disabled
    /// (port 0) or on hold by the old `c=0.0.0.0` convention.
    pub fn rtp_target(&self) -> Option<std::net::SocketAddr> {
        let ip = self.connection?;
        (self.port != 0 && !ip.is_unspecified()).then(|| (ip, self.port).into())
    }

    /// The payload type of RFC 4733 telephone-events at 8 kHz, when offered.
    pub fn telephone_event(&self) -> Option<u8> {
        self.lines.iter().find_map(|l| {
            let rest = l.strip_prefix("a=rtpmap:")?;
            let (num, enc) = rest.split_once(' ')?;
            let pt = num.trim().parse::<u8>().ok()?;
            (enc.to_ascii_lowercase().starts_with("telephone-event/8000") && self.has_payload(pt))
                .then_some(pt)
        })
    }

    /// The static payload type number of a codec named in `a=rtpmap` or by RFC 3551.
    pub fn has_payload(&self, pt: u8) -> bool {
        self.formats.iter().any(|f| f == &pt.to_string())
    }
}

/// A parsed session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    pub origin_user: String,
    pub session_id: String,
    pub session_version: u64,
    pub session_name: String,
    pub connection: Option<IpAddr>,
    /// Session-level lines other than v, o, s, c (t=, a=, b=...), in order.
    session_lines: Vec<String>,
    pub media: Vec<Media>,
}

fn connection_addr(value: &str, line: usize) -> Result<Option<IpAddr>, SdpError> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    match parts.as_slice() {
        ["IN", "IP4" | "IP6", addr] => {
            // Multicast TTL suffix (`/127`) is not for us.
            let addr = addr.split('/').next().unwrap_or("");
            addr.parse::<IpAddr>()
                .map(Some)
                .map_err(|_| SdpError::Malformed {
                    line,
                    reason: format!("connection address {addr:?} is not an IP address"),
                })
        }
        _ => Err(SdpError::Malformed {
            line,
            reason: format!("c={value}: expected 'IN IP4|IP6 address'"),
        }),
    }
}

fn is_ice(line: &str) -> bool {
    [
        "a=candidate",
        "a=ice-",
        "a=remote-candidates",
        "a=end-of-candidates",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

impl Sdp {
    pub fn parse(body: &[u8]) -> Result<Sdp, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| SdpError::Malformed {
            line: 0,
            reason: "not UTF-8".into(),
        })?;
        let mut sdp = Sdp {
            origin_user: String::new(),
            session_id: String::new(),
            session_version: 0,
            session_name: "-".into(),
            connection: None,
            session_lines: Vec::new(),
            media: Vec::new(),
        };
        let mut session_dir = Direction::SendRecv;
        let mut seen_v = false;
        let mut seen_o = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(SdpError::Malformed {
                    line: n,
                    reason: format!("{line:?} is not type=value"),
                });
            };
            match (k, sdp.media.last_mut()) {
                ("v", _) => {
                    if v != "0" {
                        return Err(SdpError::Malformed {
                            line: n,
                            reason: format!("version {v} (only 0 exists)"),
                        });
                    }
                    seen_v = true;
                }
                ("o", _) => {
                    let f: Vec<&str> = v.split_whitespace().collect();
                    if f.len() != 6 {
                        return Err(SdpError::Malformed {
                            line: n,
                            reason: "o= needs 6 fields".into(),
                        });
                    }
                    sdp.origin_user = f[0].to_string();
                    sdp.session_id = f[1].to_string();
                    sdp.session_version = f[2].parse().unwrap_or(0);
                    seen_o = true;
                }
                ("s", None) => sdp.session_name = v.to_string(),
                ("c", None) => sdp.connection = connection_addr(v, n)?,
                ("c", Some(m)) => m.connection = connection_addr(v, n)?,
                ("m", _) => {
                    let f: Vec<&str> = v.split_whitespace().collect();
                    if f.len() < 3 {
                        return Err(SdpError::Malformed {
                            line: n,
                            reason: "m= needs media, port, proto".into(),
                        });
                    }
                    let port = f[1]
                        .split('/')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .ok_or_else(|| SdpError::Malformed {
                            line: n,
                            reason: format!("bad port {:?}", f[1]),
                        })?;
                    sdp.media.push(Media {
                        kind: f[0].to_string(),
                        port,
                        proto: f[2].to_string(),
                        formats: f[3..].iter().map(|s| s.to_string()).collect(),
                        connection: None,
                        // Session-level attributes precede the first m= line.
                        direction: session_dir,
                        lines: Vec::new(),
                    });
                }
                ("a", target) => {
                    let dir = match v {
                        "sendrecv" => Some(Direction::SendRecv),
                        "sendonly" => Some(Direction::SendOnly),
                        "recvonly" => Some(Direction::RecvOnly),
                        "inactive" => Some(Direction::Inactive),
                        _ => None,
                    };
                    match (target, dir) {
                        (Some(m), Some(d)) => m.direction = d,
                        (Some(m), None) => m.lines.push(line.to_string()),
                        // A session-level direction is the default of every stream;
                        // each stream emits its own.
                        (None, Some(d)) => session_dir = d,
                        (None, None) => sdp.session_lines.push(line.to_string()),
                    }
                }
                (_, Some(m)) => m.lines.push(line.to_string()),
                (_, None) => sdp.session_lines.push(line.to_string()),
            }
        }
        if !seen_v {
            return Err(SdpError::Missing("v="));
        }
        if !seen_o {
            return Err(SdpError::Missing("o="));
        }
        for m in &mut sdp.media {
            if m.connection.is_none() {
                m.connection = sdp.connection;
            }
        }
        if sdp
            .media
            .iter()
            .any(|m| m.port != 0 && m.connection.is_none())
        {
            return Err(SdpError::Missing("c= (for a media stream)"));
        }
        Ok(sdp)
    }

    /// The description as this node sends it: every active stream at `relay_ip` and
    /// the port in `ports` (same order as `media`; disabled streams stay at port 0),
    /// RTCP at port+1, ICE removed, and our own origin (`session_id`, `version`: the
    /// version must grow each time a leg's description changes, RFC 3264 §8).
    pub fn anchored(
        &self,
        relay_ip: IpAddr,
        ports: &[u16],
        session_id: u64,
        version: u64,
    ) -> String {
        let ip_kind = if relay_ip.is_ipv4() { "IP4" } else { "IP6" };
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "v=0\r\no=pbxd {session_id} {version} IN {ip_kind} {relay_ip}\r\ns={}\r\nc=IN {ip_kind} {relay_ip}\r\n",
            self.session_name
        );
        for l in &self.session_lines {
            if !is_ice(l) {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        for (i, m) in self.media.iter().enumerate() {
            let port = if m.port == 0 {
                0
            } else {
                ports.get(i).copied().unwrap_or(0)
            };
            let _ = write!(out, "m={} {port} {}", m.kind, m.proto);
            for f in &m.formats {
                out.push(' ');
                out.push_str(f);
            }
            out.push_str("\r\n");
            for l in &m.lines {
                if is_ice(l) || l.starts_with("a=rtcp:") || l.starts_with("a=rtcp-mux") {
                    continue;
                }
                out.push_str(l);
                out.push_str("\r\n");
            }
            if port != 0 {
                let _ = write!(out, "a=rtcp:{}\r\n", port + 1);
            }
            let _ = write!(out, "a={}\r\n", m.direction.attr());
        }
        out
    }

    /// Keeps, in each stream, only the formats `other`'s matching stream lists (with
    /// their `rtpmap`/`fmtp` lines): an offer limited to the codecs a party already
    /// uses. A stream `other` lacks, or shares no format with, is left as it is.
    pub fn keep_formats_of(&mut self, other: &Sdp) {
        for (m, o) in self.media.iter_mut().zip(&other.media) {
            let kept: Vec<String> = m
                .formats
                .iter()
                .filter(|f| o.formats.contains(f))
                .cloned()
                .collect();
            if kept.is_empty() || kept.len() == m.formats.len() {
                continue;
            }
            m.lines.retain(|l| {
                let pt = l
                    .strip_prefix("a=rtpmap:")
                    .or_else(|| l.strip_prefix("a=fmtp:"))
                    .and_then(|r| r.split_whitespace().next());
                pt.is_none_or(|pt| kept.iter().any(|k| k == pt))
            });
            m.formats = kept;
        }
    }

    /// Whether this offer puts the call on hold (RFC 3264 §8.4: the first active audio
    /// stream `sendonly` or `inactive`, or the older `c=0.0.0.0`), and if so the
    /// direction to answer with: `recvonly` to `sendonly`, `inactive` otherwise.
    pub fn hold(&self) -> Option<Direction> {
        let m = self
            .media
            .iter()
            .find(|m| m.kind == "audio" && m.port != 0)?;
        match m.direction {
            Direction::SendOnly => Some(Direction::RecvOnly),
            Direction::Inactive => Some(Direction::Inactive),
            _ if m.connection.is_some_and(|c| c.is_unspecified()) => Some(Direction::Inactive),
            _ => None,
        }
    }

    /// The first active audio stream and its first G.711 payload type (0 or 8) in the
    /// order listed: what this party receives music in.
    pub fn g711_receive(&self) -> Option<(usize, u8)> {
        self.media.iter().enumerate().find_map(|(i, m)| {
            if m.kind != "audio" || m.port == 0 {
                return None;
            }
            m.formats
                .iter()
                .find_map(|f| match f.as_str() {
                    "0" => Some(0),
                    "8" => Some(8),
                    _ => None,
                })
                .map(|pt| (i, pt))
        })
    }

    /// The stream the node's own applications use: the first active audio stream that
    /// offers PCMU or PCMA.
    pub fn g711_stream(&self) -> Option<usize> {
        self.media.iter().position(|m| {
            m.kind == "audio" && m.port != 0 && (m.has_payload(0) || m.has_payload(8))
        })
    }

    /// An answer from this node itself (Echo, Playback): the first audio stream with
    /// PCMU or PCMA (and telephone-event if offered) at `relay_ip:port`, in the
    /// direction that answers the offer's (RFC 3264 §6.1: `recvonly` to `sendonly`,
    /// `inactive` to a hold); other streams refused with port 0. `version`: the
    /// origin's session version. `None` when no G.711 audio is offered.
    pub fn answer_g711(
        &self,
        relay_ip: IpAddr,
        port: u16,
        session_id: u64,
        version: u64,
    ) -> Option<(String, u8)> {
        let ip_kind = if relay_ip.is_ipv4() { "IP4" } else { "IP6" };
        let chosen = self.g711_stream()?;
        let pt = if self.media[chosen].has_payload(0) {
            0
        } else {
            8
        };
        let mut out = format!(
            "v=0\r\no=pbxd {session_id} {version} IN {ip_kind} {relay_ip}\r\ns=pbxd\r\nc=IN {ip_kind} {relay_ip}\r\nt=0 0\r\n"
        );
        for (i, m) in self.media.iter().enumerate() {
            if i != chosen {
                let _ = write!(
                    out,
                    "m={} 0 {} {}\r\n",
                    m.kind,
                    m.proto,
                    m.formats.first().map_or("0", |s| s)
                );
                continue;
            }
            let te = m.telephone_event();
            let name = if pt == 0 { "PCMU" } else { "PCMA" };
            let _ = write!(out, "m=audio {port} {} {pt}", m.proto);
            if let Some(te) = &te {
                let _ = write!(out, " {te}");
            }
            let _ = write!(out, "\r\na=rtpmap:{pt} {name}/8000\r\n");
            if let Some(te) = &te {
                let _ = write!(
                    out,
                    "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"
                );
            }
            let direction = match m.direction {
                Direction::SendOnly => Direction::RecvOnly,
                Direction::RecvOnly => Direction::SendOnly,
                Direction::Inactive => Direction::Inactive,
                Direction::SendRecv if m.connection.is_some_and(|c| c.is_unspecified()) => {
                    Direction::Inactive
                }
                Direction::SendRecv => Direction::SendRecv,
            };
            let _ = write!(
                out,
                "a=ptime:20\r\na=rtcp:{}\r\na={}\r\n",
                port + 1,
                direction.attr()
            );
        }
        Some((out, pt))
    }
}

/// The telephone-event payload type of this node's own offers.
pub const OFFERED_TELEPHONE_EVENT: u8 = 101;

/// An offer from this node (a caller that sent no SDP): PCMU, PCMA and
/// telephone-event at `relay_ip:port`.
pub fn offer_g711(relay_ip: IpAddr, port: u16, session_id: u64, version: u64) -> String {
    let ip_kind = if relay_ip.is_ipv4() { "IP4" } else { "IP6" };
    format!(
        "v=0\r\no=pbxd {session_id} {version} IN {ip_kind} {relay_ip}\r\ns=pbxd\r\nc=IN {ip_kind} {relay_ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0 8 {te}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\na=ptime:20\r\na=rtcp:{}\r\na=sendrecv\r\n",
        port + 1,
        te = OFFERED_TELEPHONE_EVENT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=rtcp:49171\r\na=candidate:1 1 UDP 2130706431 192.0.2.10 49170 typ host\r\na=sendrecv\r\nm=video 0 RTP/AVP 31\r\n";

    #[test]
    fn our_offer_parses_with_both_g711_codecs() {
        let o = offer_g711("192.0.2.1".parse().unwrap(), 40000, 7, 1);
        let sdp = Sdp::parse(o.as_bytes()).unwrap();
        let m = &sdp.media[0];
        assert_eq!(m.rtp_target(), Some("192.0.2.1:40000".parse().unwrap()));
        assert!(m.has_payload(0) && m.has_payload(8));
        assert!(o.contains("a=rtcp:40001\r\n"));
    }

    #[test]
    fn reads_what_the_party_wants() {
        let s = Sdp::parse(OFFER.as_bytes()).unwrap();
        assert_eq!(s.media.len(), 2);
        assert_eq!(
            s.media[0].rtp_target(),
            Some("192.0.2.10:49170".parse().unwrap())
        );
        assert_eq!(s.media[0].formats, ["0", "8", "101"]);
        assert_eq!(s.media[1].rtp_target(), None, "port 0: disabled");
    }

    #[test]
    fn anchoring_rewrites_address_ports_origin_and_drops_ice() {
        let s = Sdp::parse(OFFER.as_bytes()).unwrap();
        let out = s.anchored("127.0.0.11".parse().unwrap(), &[20000, 20002], 77, 3);
        assert!(out.contains("o=pbxd 77 3 IN IP4 127.0.0.11\r\n"), "{out}");
        assert!(out.contains("c=IN IP4 127.0.0.11\r\n"));
        assert!(out.contains("m=audio 20000 RTP/AVP 0 8 101\r\n"));
        assert!(out.contains("a=rtcp:20001\r\n"));
        assert!(!out.contains("49171"));
        assert!(!out.contains("candidate"));
        assert!(
            out.contains("m=video 0 RTP/AVP 31\r\n"),
            "disabled stays disabled"
        );
        assert!(out.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        let again = Sdp::parse(out.as_bytes()).unwrap();
        assert_eq!(
            again.media[0].rtp_target(),
            Some("127.0.0.11:20000".parse().unwrap())
        );
    }

    #[test]
    fn hold_directions() {
        let hold = OFFER.replace("a=sendrecv", "a=sendonly");
        let s = Sdp::parse(hold.as_bytes()).unwrap();
        assert_eq!(s.media[0].direction, Direction::SendOnly);
        let out = s.anchored("127.0.0.11".parse().unwrap(), &[20000, 0], 1, 2);
        assert!(out.contains("a=sendonly"));
        let old_hold = OFFER.replace("c=IN IP4 192.0.2.10", "c=IN IP4 0.0.0.0");
        let s = Sdp::parse(old_hold.as_bytes()).unwrap();
        assert_eq!(s.media[0].rtp_target(), None);
        let session_level = "v=0\r\no=a 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\na=inactive\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert_eq!(
            Sdp::parse(session_level.as_bytes()).unwrap().media[0].direction,
            Direction::Inactive
        );
    }

    #[test]
    fn g711_answer() {
        let s = Sdp::parse(OFFER.as_bytes()).unwrap();
        let (a, pt) = s
            .answer_g711("127.0.0.11".parse().unwrap(), 30000, 5, 1)
            .unwrap();
        assert_eq!(pt, 0);
        assert!(
            a.contains("o=pbxd 5 1 ") && a.contains("a=sendrecv\r\n"),
            "{a}"
        );
        let held = Sdp::parse(OFFER.replace("a=sendrecv", "a=sendonly").as_bytes()).unwrap();
        let (a, _) = held
            .answer_g711("127.0.0.11".parse().unwrap(), 30000, 5, 2)
            .unwrap();
        assert!(
            a.contains("o=pbxd 5 2 ") && a.contains("a=recvonly\r\n"),
            "{a}"
        );
        assert!(a.contains("m=audio 30000 RTP/AVP 0 101\r\n"), "{a}");
        assert!(a.contains("m=video 0 RTP/AVP 31\r\n"));
        let no = OFFER.replace("RTP/AVP 0 8 101", "RTP/AVP 18");
        assert!(Sdp::parse(no.as_bytes())
            .unwrap()
            .answer_g711("127.0.0.1".parse().unwrap(), 1, 1, 1)
            .is_none());
    }

    #[test]
    fn malformed_is_refused() {
        assert!(Sdp::parse(b"o=a 1 1 IN IP4 1.2.3.4\r\n").is_err(), "no v=");
        assert!(Sdp::parse(b"v=0\r\no=a 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 nope\r\n").is_err());
        assert!(Sdp::parse(b"v=0\r\no=a 1 1 IN IP4 1.2.3.4\r\nm=audio x RTP/AVP 0\r\n").is_err());
        assert!(
            Sdp::parse(b"v=0\r\no=a 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n").is_err(),
            "no c="
        );
        assert!(Sdp::parse(b"v=0\r\ngarbage\r\n").is_err());
    }

    #[test]
    fn keep_formats_of_limits_an_offer_to_the_codecs_in_use() {
        let offer = Sdp::parse(
            b"v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
              m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
              a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n",
        )
        .unwrap();
        let answer = Sdp::parse(
            b"v=0\r\no=b 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n\
              m=audio 5000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        )
        .unwrap();
        let mut limited = offer.clone();
        limited.keep_formats_of(&answer);
        assert_eq!(limited.media[0].formats, vec!["8", "101"]);
        let text = limited.anchored("10.0.0.9".parse().unwrap(), &[6000], 7, 2);
        assert!(!text.contains("PCMU"), "{text}");
        assert!(text.contains("a=rtpmap:8 PCMA/8000"), "{text}");
        assert!(text.contains("a=fmtp:101 0-16"), "{text}");
        // Nothing in common: unchanged.
        let mut other = offer.clone();
        let g722 = Sdp::parse(
            b"v=0\r\no=b 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 5000 RTP/AVP 9\r\n",
        )
        .unwrap();
        other.keep_formats_of(&g722);
        assert_eq!(other, offer);
    }
}
