//! The DNS records through which phones find the cluster (RFC 3263): NAPTR per
//! transport, SRV per transport and member (priority and weight), A/AAAA per member;
//! and their text as a BIND zone. Pure: the same records serve `pbxctl dns zone` and
//! the cluster's own DNS.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::locate::{Naptr, SipTransport, Srv};

/// A member as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneMember {
    pub id: u64,
    pub addr: IpAddr,
    pub sip_port: u16,
    /// SRV priority (lower first: 10 for active members, higher for backups).
    pub priority: u16,
    pub weight: u16,
}

/// What to publish for one SIP domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSpec {
    /// The SIP domain, without the trailing dot.
    pub domain: String,
    pub ttl: u32,
    /// Members that take traffic (alive, not draining).
    pub members: Vec<ZoneMember>,
    /// SIP over TLS on this port (SIPS+D2T, `_sips._tcp`), if served.
    pub tls_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    Naptr(Naptr),
    Srv(Srv),
    Addr(IpAddr),
    /// Name server of the zone (a member's host name).
    Ns(String),
    Soa {
        mname: String,
        rname: String,
        serial: u32,
        /// Negative-caching TTL (RFC 2308).
        minimum: u32,
    },
}

/// The record types the cluster's DNS answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    Naptr,
    Srv,
    A,
    Aaaa,
    Ns,
    Soa,
    Any,
    Other,
}

/// How a query is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The records asked for (NOERROR); empty: the name exists, not that type (NODATA,
    /// with the SOA for negative caching).
    Records(Vec<Record>),
    /// No such name in the zone (NXDOMAIN, with the SOA).
    NoName,
    /// Not our zone (REFUSED: we are not a recursive server).
    NotOurs,
}

/// One resource record: owner name (absolute, with the trailing dot), TTL, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: RecordData,
}

impl ZoneSpec {
    fn fqdn(&self, label: &str) -> String {
        if label.is_empty() {
            format!("{}.", self.domain)
        } else {
            format!("{label}.{}.", self.domain)
        }
    }

    /// The host name of a member: `node<ID>.<domain>.`.
    pub fn host_of(&self, id: u64) -> String {
        self.fqdn(&format!("node{id}"))
    }

    /// The transports published, in NAPTR order (UDP, TCP, then TLS when served).
    pub fn transports(&self) -> Vec<SipTransport> {
        let mut t = vec![SipTransport::Udp, SipTransport::Tcp];
        if self.tls_port.is_some() {
            t.push(SipTransport::Tls);
        }
        t
    }

    /// Every record, NAPTR first, then SRV, then addresses. No members: no records
    /// (phones then see the domain as unserved rather than being sent nowhere).
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        if self.members.is_empty() {
            return out;
        }
        let apex = self.fqdn("");
        for (i, t) in self.transports().into_iter().enumerate() {
            out.push(Record {
                name: apex.clone(),
                ttl: self.ttl,
                data: RecordData::Naptr(Naptr {
                    order: 10 * (i as u16 + 1),
                    preference: 50,
                    flags: "s".into(),
                    service: t.naptr_service().into(),
                    replacement: format!("{}{apex}", t.srv_prefix()),
                }),
            });
        }
        for t in self.transports() {
            for m in &self.members {
                let port = match t {
                    SipTransport::Tls => self.tls_port.unwrap_or(5061),
                    _ => m.sip_port,
                };
                out.push(Record {
                    name: format!("{}{apex}", t.srv_prefix()),
                    ttl: self.ttl,
                    data: RecordData::Srv(Srv {
                        priority: m.priority,
                        weight: m.weight,
                        port,
                        target: self.host_of(m.id),
                    }),
                });
            }
        }
        for m in &self.members {
            out.push(Record {
                name: self.host_of(m.id),
                ttl: self.ttl,
                data: RecordData::Addr(m.addr),
            });
        }
        out
    }

    /// SOA of the zone, with a serial that changes whenever the published records do.
    pub fn soa(&self) -> Record {
        let mut h: u32 = 0x811c_9dc5;
        for r in self.records() {
            for b in format!("{r:?}").bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
        }
        let mname = self
            .members
            .first()
            .map_or_else(|| self.fqdn("ns1"), |m| self.host_of(m.id));
        Record {
            name: self.fqdn(""),
            ttl: self.ttl,
            data: RecordData::Soa {
                mname,
                rname: format!("hostmaster.{}", self.fqdn("")),
                serial: h,
                minimum: self.ttl,
            },
        }
    }

    /// Answers a query for `name` (any case, with or without the trailing dot) as the
    /// zone's authoritative server: the apex carries SOA, NS (the members) and NAPTR.
    pub fn lookup(&self, name: &str, qtype: QueryType) -> Lookup {
        let name = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        let apex = self.fqdn("").to_ascii_lowercase();
        if name != apex && !name.ends_with(&format!(".{apex}")) {
            return Lookup::NotOurs;
        }
        let mut all = self.records();
        if name == apex {
            all.push(self.soa());
            all.extend(self.members.iter().map(|m| Record {
                name: apex.clone(),
                ttl: self.ttl,
                data: RecordData::Ns(self.host_of(m.id)),
            }));
        }
        let at_name: Vec<Record> = all
            .into_iter()
            .filter(|r| r.name.eq_ignore_ascii_case(&name))
            .collect();
        if at_name.is_empty() {
            return Lookup::NoName;
        }
        let wanted = |r: &Record| {
            matches!(
                (&r.data, qtype),
                (_, QueryType::Any)
                    | (RecordData::Naptr(_), QueryType::Naptr)
                    | (RecordData::Srv(_), QueryType::Srv)
                    | (RecordData::Addr(IpAddr::V4(_)), QueryType::A)
                    | (RecordData::Addr(IpAddr::V6(_)), QueryType::Aaaa)
                    | (RecordData::Ns(_), QueryType::Ns)
                    | (RecordData::Soa { .. }, QueryType::Soa)
            )
        };
        Lookup::Records(at_name.into_iter().filter(wanted).collect())
    }

    /// A BIND zone file for the domain: SOA and NS (`ns`: absolute names; empty: the
    /// members' own host names, as when the nodes serve the zone), then [`records`].
    ///
    /// [`records`]: ZoneSpec::records
    pub fn bind_zone(&self, serial: u32, ns: &[String]) -> String {
        let apex = self.fqdn("");
        let ns: Vec<String> = if ns.is_empty() {
            self.members.iter().map(|m| self.host_of(m.id)).collect()
        } else {
            ns.iter()
                .map(|n| {
                    if n.ends_with('.') {
                        n.clone()
                    } else {
                        format!("{n}.")
                    }
                })
                .collect()
        };
        let mut z = String::new();
        let _ = writeln!(
            z,
            "; SIP service records of {} (RFC 3263), from the cluster's membership.",
            self.domain
        );
        let _ = writeln!(z, "$ORIGIN {apex}");
        let _ = writeln!(z, "$TTL {}", self.ttl);
        let primary = ns.first().cloned().unwrap_or_else(|| self.fqdn("ns1"));
        let _ = writeln!(
            z,
            "@ IN SOA {primary} hostmaster.{apex} ( {serial} 3600 600 86400 {} )",
            self.ttl
        );
        for n in &ns {
            let _ = writeln!(z, "@ IN NS {n}");
        }
        for r in self.records() {
            let _ = match &r.data {
                RecordData::Naptr(n) => writeln!(
                    z,
                    "{} {} IN NAPTR {} {} \"{}\" \"{}\" \"\" {}",
                    r.name, r.ttl, n.order, n.preference, n.flags, n.service, n.replacement
                ),
                RecordData::Srv(s) => writeln!(
                    z,
                    "{} {} IN SRV {} {} {} {}",
                    r.name, r.ttl, s.priority, s.weight, s.port, s.target
                ),
                RecordData::Addr(IpAddr::V4(a)) => writeln!(z, "{} {} IN A {a}", r.name, r.ttl),
                RecordData::Addr(IpAddr::V6(a)) => writeln!(z, "{} {} IN AAAA {a}", r.name, r.ttl),
                // The zone's own SOA and NS are written above.
                RecordData::Ns(_) | RecordData::Soa { .. } => Ok(()),
            };
        }
        z
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locate::{Answer, DeadTargets, Destination, Query, Resolution, SplitMix};
    use std::time::{Duration, Instant};

    fn spec(members: &[(u64, &str, u16)], tls: bool) -> ZoneSpec {
        ZoneSpec {
            domain: "pbx.test".into(),
            ttl: 30,
            members: members
                .iter()
                .map(|(id, ip, prio)| ZoneMember {
                    id: *id,
                    addr: ip.parse().unwrap(),
                    sip_port: 5060,
                    priority: *prio,
                    weight: 50,
                })
                .collect(),
            tls_port: tls.then_some(5061),
        }
    }

    /// The records answer the queries of our own RFC 3263 client: a phone configured
    /// with the domain only reaches every member, the backup last.
    #[test]
    fn published_records_resolve_to_the_members_through_naptr_and_srv() {
        let z = spec(
            &[
                (1, "192.0.2.11", 10),
                (2, "192.0.2.12", 10),
                (3, "192.0.2.13", 20),
            ],
            true,
        );
        let records = z.records();
        let mut r = Resolution::new(
            Destination {
                host: "pbx.test".into(),
                port: None,
                transport: None,
                sips: false,
            },
            &[SipTransport::Udp, SipTransport::Tcp, SipTransport::Tls],
        );
        while let Some(q) = r.poll_query() {
            let name = |n: &str| format!("{n}.");
            let answer = match &q {
                Query::Naptr(n) => Answer::Naptr(
                    records
                        .iter()
                        .filter(|x| x.name == name(n))
                        .filter_map(|x| match &x.data {
                            RecordData::Naptr(v) => Some(v.clone()),
                            _ => None,
                        })
                        .collect(),
                ),
                Query::Srv(n) => Answer::Srv(
                    records
                        .iter()
                        .filter(|x| x.name == name(n))
                        .filter_map(|x| match &x.data {
                            RecordData::Srv(v) => Some(v.clone()),
                            _ => None,
                        })
                        .collect(),
                ),
                Query::Addr(n) => Answer::Addr(
                    records
                        .iter()
                        .filter(|x| x.name == name(n))
                        .filter_map(|x| match &x.data {
                            RecordData::Addr(a) => Some(*a),
                            _ => None,
                        })
                        .collect(),
                ),
            };
            r.on_answer(&q, answer);
        }
        let t = r.targets(
            &mut SplitMix::new(3),
            &DeadTargets::new(Duration::ZERO),
            Instant::now(),
        );
        assert_eq!(t.len(), 9, "3 members x UDP, TCP, TLS");
        assert!(t[..3].iter().all(|t| t.transport == SipTransport::Udp));
        assert_eq!(t[2].addr.to_string(), "192.0.2.13", "the backup last");
        assert!(t[6..]
            .iter()
            .all(|t| t.transport == SipTransport::Tls && t.port == 5061));
    }

    #[test]
    fn lookups_answer_as_an_authoritative_server() {
        let z = spec(&[(1, "192.0.2.11", 10), (2, "2001:db8::2", 10)], false);
        let names = |l: Lookup| match l {
            Lookup::Records(r) => r.len(),
            other => panic!("{other:?}"),
        };
        assert_eq!(names(z.lookup("PBX.test.", QueryType::Naptr)), 2);
        assert_eq!(names(z.lookup("_sip._udp.pbx.test", QueryType::Srv)), 2);
        assert_eq!(names(z.lookup("node1.pbx.test", QueryType::A)), 1);
        assert_eq!(
            names(z.lookup("node1.pbx.test", QueryType::Aaaa)),
            0,
            "NODATA"
        );
        assert_eq!(names(z.lookup("node2.pbx.test", QueryType::Aaaa)), 1);
        assert_eq!(names(z.lookup("pbx.test", QueryType::Ns)), 2);
        assert_eq!(names(z.lookup("pbx.test", QueryType::Soa)), 1);
        assert_eq!(z.lookup("node3.pbx.test", QueryType::A), Lookup::NoName);
        assert_eq!(z.lookup("example.com", QueryType::A), Lookup::NotOurs);
        assert_eq!(z.lookup("xpbx.test", QueryType::A), Lookup::NotOurs);
        // The serial follows the records.
        let fewer = spec(&[(1, "192.0.2.11", 10)], false);
        let serial = |z: &ZoneSpec| match z.soa().data {
            RecordData::Soa { serial, .. } => serial,
            _ => unreachable!(),
        };
        assert_ne!(serial(&z), serial(&fewer));
        assert_eq!(serial(&z), serial(&z.clone()));
    }

    #[test]
    fn bind_zone_text_and_an_empty_cluster() {
        let z = spec(&[(1, "192.0.2.11", 10), (2, "2001:db8::2", 10)], false);
        let text = z.bind_zone(7, &[]);
        for line in [
            "$ORIGIN pbx.test.",
            "@ IN SOA node1.pbx.test. hostmaster.pbx.test. ( 7 3600 600 86400 30 )",
            "@ IN NS node2.pbx.test.",
            "pbx.test. 30 IN NAPTR 10 50 \"s\" \"SIP+D2U\" \"\" _sip._udp.pbx.test.",
            "pbx.test. 30 IN NAPTR 20 50 \"s\" \"SIP+D2T\" \"\" _sip._tcp.pbx.test.",
            "_sip._udp.pbx.test. 30 IN SRV 10 50 5060 node1.pbx.test.",
            "node2.pbx.test. 30 IN AAAA 2001:db8::2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(!text.contains("SIPS+D2T"), "no TLS, no SIPS records");
        assert!(z
            .bind_zone(1, &["ns.example.net".into()])
            .contains("@ IN NS ns.example.net."));
        assert!(spec(&[], false).records().is_empty());
    }
}
