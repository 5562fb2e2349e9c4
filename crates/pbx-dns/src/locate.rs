//! RFC 3263 server location, sans-IO: which DNS records to ask for (NAPTR → SRV →
//! A/AAAA) and, from the answers, the ordered list of (address, port, transport) to try;
//! RFC 2782 priority and weighted order with a seeded RNG; dead targets remembered for a
//! while; which failures move on to the next target.
//!
//! The driver asks [`Resolution::poll_query`] for queries (they may be sent at once),
//! feeds each answer to [`Resolution::on_answer`], and once [`Resolution::is_done`]
//! takes [`Resolution::targets`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A SIP transport as RFC 3263 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SipTransport {
    Udp,
    Tcp,
    Tls,
}

impl SipTransport {
    /// The NAPTR service field (RFC 3263 §4.1).
    pub fn naptr_service(self) -> &'static str {
        match self {
            SipTransport::Udp => "SIP+D2U",
            SipTransport::Tcp => "SIP+D2T",
            SipTransport::Tls => "SIPS+D2T",
        }
    }

    /// The SRV owner name prefix (RFC 3263 §4.1).
    pub fn srv_prefix(self) -> &'static str {
        match self {
            SipTransport::Udp => "_sip._udp.",
            SipTransport::Tcp => "_sip._tcp.",
            SipTransport::Tls => "_sips._tcp.",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            SipTransport::Tls => 5061,
            _ => 5060,
        }
    }

    /// From a URI's `transport` parameter.
    pub fn from_param(p: &str) -> Option<SipTransport> {
        match p.to_ascii_lowercase().as_str() {
            "udp" => Some(SipTransport::Udp),
            "tcp" => Some(SipTransport::Tcp),
            "tls" => Some(SipTransport::Tls),
            _ => None,
        }
    }

    fn from_naptr_service(s: &str) -> Option<SipTransport> {
        [SipTransport::Udp, SipTransport::Tcp, SipTransport::Tls]
            .into_iter()
            .find(|t| t.naptr_service().eq_ignore_ascii_case(s))
    }
}

/// What the request is to be sent to: the parts of a SIP URI that RFC 3263 uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: String,
    pub port: Option<u16>,
    pub transport: Option<SipTransport>,
    /// A `sips:` URI: TLS only.
    pub sips: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    pub flags: String,
    pub service: String,
    pub replacement: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// A DNS question the driver should ask.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    Naptr(String),
    Srv(String),
    /// A and AAAA of a host name.
    Addr(String),
}

/// The answer to a [`Query`]; `None` for NXDOMAIN, no data, or a failed lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Naptr(Vec<Naptr>),
    Srv(Vec<Srv>),
    Addr(Vec<IpAddr>),
    None,
}

/// One place to send the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
    pub transport: SipTransport,
}

/// Lower-case without the trailing dot: how names are compared.
fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// SplitMix64: a small, seeded, deterministic generator (tests draw thousands of
/// orders; the driver seeds it per request).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..=max.
    fn upto(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        self.next_u64() % (max + 1)
    }
}

/// RFC 2782 order: lower priority first; within a priority, weighted random (zero
/// weights first in the running sum, so they are chosen rarely but not never).
pub fn order_srv(records: &[Srv], rng: &mut SplitMix) -> Vec<Srv> {
    let mut by_priority: Vec<u16> = records.iter().map(|r| r.priority).collect();
    by_priority.sort_unstable();
    by_priority.dedup();
    let mut out = Vec::with_capacity(records.len());
    for p in by_priority {
        let mut group: Vec<&Srv> = records.iter().filter(|r| r.priority == p).collect();
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            if total == 0 {
                // All zero: RFC 2782 gives no order; share evenly rather than always
                // the first one listed.
                let i = rng.upto(group.len() as u64 - 1) as usize;
                out.push(group.remove(i).clone());
                continue;
            }
            let pick = rng.upto(total);
            let mut running = 0;
            let i = group
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= pick
                })
                .unwrap_or(0);
            out.push(group.remove(i).clone());
        }
    }
    out
}

/// The NAPTR records RFC 3263 uses, best first: flag "s", a SIP service this client
/// supports (only SIPS+D2T for a sips: URI), by order then preference.
pub fn usable_naptr(
    records: &[Naptr],
    supported: &[SipTransport],
    sips: bool,
) -> Vec<(SipTransport, Naptr)> {
    let mut v: Vec<(SipTransport, Naptr)> = records
        .iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s"))
        .filter_map(|r| Some((SipTransport::from_naptr_service(&r.service)?, r.clone())))
        .filter(|(t, _)| supported.contains(t) && (!sips || *t == SipTransport::Tls))
        .collect();
    v.sort_by_key(|(_, r)| (r.order, r.preference));
    v
}

/// Whether a failed attempt moves on to the next target (RFC 3263 §4.3): a timeout or a
/// transport error (`None`), or a 503.
pub fn should_fail_over(status: Option<u16>) -> bool {
    matches!(status, None | Some(503))
}

/// Targets that failed recently, skipped for `ttl` (as phones' "dirty host" memory).
#[derive(Debug, Clone)]
pub struct DeadTargets {
    ttl: Duration,
    dead: HashMap<Target, Instant>,
}

impl DeadTargets {
    pub fn new(ttl: Duration) -> DeadTargets {
        DeadTargets {
            ttl,
            dead: HashMap::new(),
        }
    }

    pub fn mark_dead(&mut self, t: Target, now: Instant) {
        self.dead.insert(t, now);
    }

    /// A target that answered: usable again at once.
    pub fn mark_alive(&mut self, t: &Target) {
        self.dead.remove(t);
    }

    pub fn is_dead(&self, t: &Target, now: Instant) -> bool {
        self.dead
            .get(t)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Forgets targets whose time is up.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.dead
            .retain(|_, at| now.saturating_duration_since(*at) < ttl);
    }

    /// `targets` with the dead ones moved to the end (still tried when all else failed).
    pub fn arrange(&self, targets: Vec<Target>, now: Instant) -> Vec<Target> {
        let (dead, alive): (Vec<Target>, Vec<Target>) =
            targets.into_iter().partition(|t| self.is_dead(t, now));
        alive.into_iter().chain(dead).collect()
    }
}

/// One SRV name to look up, for one transport, in the order the targets come out.
#[derive(Debug, Clone)]
struct SrvSet {
    transport: SipTransport,
    name: String,
    answered: bool,
    records: Vec<Srv>,
}

/// The resolution of one destination.
#[derive(Debug, Clone)]
pub struct Resolution {
    dest: Destination,
    supported: Vec<SipTransport>,
    queue: VecDeque<Query>,
    outstanding: HashSet<Query>,
    asked: HashSet<Query>,
    srv_sets: Vec<SrvSet>,
    addrs: HashMap<String, Vec<IpAddr>>,
    /// No SRV records: A/AAAA of the host itself, with this transport and port.
    fallback: Option<(SipTransport, u16)>,
    /// A numeric host: nothing to look up.
    numeric: Option<Target>,
    /// Usable NAPTR records were found (not the SRV-per-transport fallback).
    naptr_found: bool,
}

impl Resolution {
    /// `supported`: the transports this client can use, in its order of preference
    /// (used when there is no NAPTR).
    pub fn new(dest: Destination, supported: &[SipTransport]) -> Resolution {
        let mut r = Resolution {
            supported: supported
                .iter()
                .copied()
                .filter(|t| !dest.sips || *t == SipTransport::Tls)
                .collect(),
            queue: VecDeque::new(),
            outstanding: HashSet::new(),
            asked: HashSet::new(),
            srv_sets: Vec::new(),
            addrs: HashMap::new(),
            fallback: None,
            numeric: None,
            naptr_found: false,
            dest,
        };
        let default_transport = r.dest.transport.unwrap_or(if r.dest.sips {
            SipTransport::Tls
        } else {
            SipTransport::Udp
        });
        let host = r.dest.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            // §4.1/4.2: a numeric host is used as it is.
            r.numeric = Some(Target {
                addr: ip,
                port: r.dest.port.unwrap_or(default_transport.default_port()),
                transport: default_transport,
            });
            return r;
        }
        let host = norm(&r.dest.host);
        if let Some(port) = r.dest.port {
            // §4.2: an explicit port means A/AAAA only.
            r.fallback = Some((default_transport, port));
            r.ask(Query::Addr(host));
        } else if let Some(t) = r.dest.transport {
            // §4.2: a transport but no port: SRV for that transport.
            r.srv_sets.push(SrvSet {
                transport: t,
                name: format!("{}{host}", t.srv_prefix()),
                answered: false,
                records: Vec::new(),
            });
            r.ask(Query::Srv(format!("{}{host}", t.srv_prefix())));
        } else {
            r.ask(Query::Naptr(host));
        }
        r
    }

    fn ask(&mut self, q: Query) {
        if self.asked.insert(q.clone()) {
            self.outstanding.insert(q.clone());
            self.queue.push_back(q);
        }
    }

    /// The next query to send (all pending ones may be in flight at once).
    pub fn poll_query(&mut self) -> Option<Query> {
        self.queue.pop_front()
    }

    pub fn is_done(&self) -> bool {
        self.outstanding.is_empty()
    }

    pub fn on_answer(&mut self, q: &Query, answer: Answer) {
        if !self.outstanding.remove(q) {
            return;
        }
        match (q, answer) {
            (Query::Naptr(_), Answer::Naptr(records)) => {
                let usable = usable_naptr(&records, &self.supported, self.dest.sips);
                self.naptr_found = !usable.is_empty();
                if usable.is_empty() {
                    self.srv_for_supported();
                }
                for (t, r) in usable {
                    let name = norm(&r.replacement);
                    if self.srv_sets.iter().any(|s| s.name == name) {
                        continue;
                    }
                    self.srv_sets.push(SrvSet {
                        transport: t,
                        name: name.clone(),
                        answered: false,
                        records: Vec::new(),
                    });
                    self.ask(Query::Srv(name));
                }
            }
            (Query::Naptr(_), _) => self.srv_for_supported(),
            (Query::Srv(name), answer) => {
                let records = match answer {
                    // "." as target: the service is decidedly not offered there.
                    Answer::Srv(r) => r
                        .into_iter()
                        .filter(|r| !norm(&r.target).is_empty())
                        .collect(),
                    _ => Vec::new(),
                };
                let mut hosts = Vec::new();
                for s in self.srv_sets.iter_mut().filter(|s| s.name == *name) {
                    s.answered = true;
                    hosts.extend(records.iter().map(|r| norm(&r.target)));
                    s.records = records.clone();
                }
                for h in hosts {
                    self.ask(Query::Addr(h));
                }
                let all_answered = self.srv_sets.iter().all(|s| s.answered);
                if all_answered && self.srv_sets.iter().all(|s| s.records.is_empty()) {
                    // §4.2: no SRV records: the host's own A/AAAA, default port.
                    let t = self.dest.transport.unwrap_or(if self.dest.sips {
                        SipTransport::Tls
                    } else {
                        SipTransport::Udp
                    });
                    self.fallback = Some((t, t.default_port()));
                    self.ask(Query::Addr(norm(&self.dest.host)));
                }
            }
            (Query::Addr(name), Answer::Addr(list)) => {
                self.addrs.insert(name.clone(), list);
            }
            (Query::Addr(_), _) => {}
        }
    }

    /// §4.1 without NAPTR: SRV for each supported transport, in the client's order.
    fn srv_for_supported(&mut self) {
        let host = norm(&self.dest.host);
        for t in self.supported.clone() {
            let name = format!("{}{host}", t.srv_prefix());
            self.srv_sets.push(SrvSet {
                transport: t,
                name: name.clone(),
                answered: false,
                records: Vec::new(),
            });
            self.ask(Query::Srv(name));
        }
    }

    /// Whether usable NAPTR records were found.
    pub fn naptr_found(&self) -> bool {
        self.naptr_found
    }

    /// The SRV records found, per transport, in resolution order.
    pub fn srv_records(&self) -> Vec<(SipTransport, Srv)> {
        self.srv_sets
            .iter()
            .flat_map(|s| s.records.iter().map(move |r| (s.transport, r.clone())))
            .collect()
    }

    /// The addresses found for a host name.
    pub fn addresses(&self, host: &str) -> &[IpAddr] {
        self.addrs
            .get(&norm(host))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The targets in the order to try them (SRV order drawn with `rng`), duplicates
    /// removed, dead ones last. Empty: the destination cannot be reached.
    pub fn targets(&self, rng: &mut SplitMix, dead: &DeadTargets, now: Instant) -> Vec<Target> {
        if let Some(t) = self.numeric {
            return vec![t];
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut push = |t: Target, out: &mut Vec<Target>| {
            if seen.insert(t) {
                out.push(t);
            }
        };
        let addrs = |name: &str| self.addrs.get(name).map(Vec::as_slice).unwrap_or(&[]);
        if let Some((transport, port)) = self.fallback {
            for a in addrs(&norm(&self.dest.host)) {
                push(
                    Target {
                        addr: *a,
                        port,
                        transport,
                    },
                    &mut out,
                );
            }
        } else {
            for set in &self.srv_sets {
                for srv in order_srv(&set.records, rng) {
                    for a in addrs(&norm(&srv.target)) {
                        push(
                            Target {
                                addr: *a,
                                port: srv.port,
                                transport: set.transport,
                            },
                            &mut out,
                        );
                    }
                }
            }
        }
        dead.arrange(out, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [SipTransport; 3] = [SipTransport::Udp, SipTransport::Tcp, SipTransport::Tls];

    fn naptr(order: u16, service: &str, replacement: &str) -> Naptr {
        Naptr {
            order,
            preference: 50,
            flags: "s".into(),
            service: service.into(),
            replacement: replacement.into(),
        }
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    fn dest(host: &str) -> Destination {
        Destination {
            host: host.into(),
            port: None,
            transport: None,
            sips: false,
        }
    }

    /// A recorded zone: answers every query the resolution asks until it is done.
    fn resolve(mut r: Resolution, zone: &HashMap<Query, Answer>) -> (Resolution, Vec<Query>) {
        let mut asked = Vec::new();
        while let Some(q) = r.poll_query() {
            asked.push(q.clone());
            let a = zone.get(&q).cloned().unwrap_or(Answer::None);
            r.on_answer(&q, a);
        }
        assert!(r.is_done());
        (r, asked)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The targets with a fixed seed and no dead ones.
    fn targets(r: &Resolution) -> Vec<Target> {
        r.targets(
            &mut SplitMix::new(1),
            &DeadTargets::new(Duration::ZERO),
            Instant::now(),
        )
    }

    /// The seeds' example: UDP preferred by NAPTR, pbx1/pbx2 share priority 10, pbx3 is
    /// the backup.
    fn example_zone() -> HashMap<Query, Answer> {
        HashMap::from([
            (
                Query::Naptr("example.com".into()),
                Answer::Naptr(vec![
                    naptr(20, "SIP+D2T", "_sip._tcp.example.com."),
                    naptr(10, "SIP+D2U", "_sip._udp.example.com."),
                    naptr(5, "E2U+sip", "!^.*$!sip:info@example.com!"),
                ]),
            ),
            (
                Query::Srv("_sip._udp.example.com".into()),
                Answer::Srv(vec![
                    srv(10, 50, 5060, "pbx1.example.com."),
                    srv(10, 50, 5060, "pbx2.example.com."),
                    srv(20, 0, 5060, "pbx3.example.com."),
                ]),
            ),
            (
                Query::Srv("_sip._tcp.example.com".into()),
                Answer::Srv(vec![srv(10, 0, 5060, "pbx1.example.com.")]),
            ),
            (
                Query::Addr("pbx1.example.com".into()),
                Answer::Addr(vec![ip("192.0.2.11")]),
            ),
            (
                Query::Addr("pbx2.example.com".into()),
                Answer::Addr(vec![ip("192.0.2.12")]),
            ),
            (
                Query::Addr("pbx3.example.com".into()),
                Answer::Addr(vec![ip("192.0.2.13")]),
            ),
        ])
    }

    #[test]
    fn naptr_srv_a_chain_orders_by_naptr_then_priority() {
        let (r, asked) = resolve(Resolution::new(dest("example.com"), &ALL), &example_zone());
        assert_eq!(asked[0], Query::Naptr("example.com".into()));
        assert!(asked.contains(&Query::Srv("_sip._udp.example.com".into())));
        let t = r.targets(
            &mut SplitMix::new(1),
            &DeadTargets::new(Duration::from_secs(30)),
            Instant::now(),
        );
        let udp: Vec<IpAddr> = t
            .iter()
            .filter(|t| t.transport == SipTransport::Udp)
            .map(|t| t.addr)
            .collect();
        assert_eq!(udp.len(), 3);
        assert_eq!(udp[2], ip("192.0.2.13"), "the backup last");
        assert!(
            t[..3].iter().all(|t| t.transport == SipTransport::Udp),
            "UDP first (NAPTR order 10)"
        );
        assert_eq!(
            t[3],
            Target {
                addr: ip("192.0.2.11"),
                port: 5060,
                transport: SipTransport::Tcp
            }
        );
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn equal_weights_share_the_first_place_evenly() {
        let (r, _) = resolve(
            Resolution::new(dest("example.com"), &[SipTransport::Udp]),
            &example_zone(),
        );
        let dead = DeadTargets::new(Duration::from_secs(30));
        let now = Instant::now();
        let mut rng = SplitMix::new(7);
        let draws = 10_000;
        let first_pbx1 = (0..draws)
            .filter(|_| r.targets(&mut rng, &dead, now)[0].addr == ip("192.0.2.11"))
            .count();
        let share = first_pbx1 as f64 / draws as f64;
        assert!((0.47..0.53).contains(&share), "{share}");
    }

    #[test]
    fn weights_set_the_share_and_zero_weight_is_rare() {
        let records = vec![
            srv(10, 90, 5060, "a"),
            srv(10, 10, 5060, "b"),
            srv(10, 0, 5060, "z"),
            srv(20, 100, 5060, "backup"),
        ];
        let mut rng = SplitMix::new(42);
        let mut first: HashMap<String, usize> = HashMap::new();
        let draws = 20_000;
        for _ in 0..draws {
            let o = order_srv(&records, &mut rng);
            assert_eq!(
                o[3].target, "backup",
                "priority 20 always after priority 10"
            );
            *first.entry(o[0].target.clone()).or_default() += 1;
        }
        let share = |n: &str| first.get(n).copied().unwrap_or(0) as f64 / draws as f64;
        assert!((0.87..0.92).contains(&share("a")), "a {}", share("a"));
        assert!((0.08..0.12).contains(&share("b")), "b {}", share("b"));
        assert!(
            share("z") < 0.02,
            "zero weight first only rarely: {}",
            share("z")
        );
        // All-zero weights: every one gets its turn.
        let zeros = vec![srv(1, 0, 1, "x"), srv(1, 0, 1, "y")];
        let x_first = (0..1000)
            .filter(|_| order_srv(&zeros, &mut rng)[0].target == "x")
            .count();
        assert!((400..600).contains(&x_first), "{x_first}");
    }

    #[test]
    fn without_naptr_srv_for_each_supported_transport_then_a_with_the_default_port() {
        let zone = HashMap::from([
            (
                Query::Srv("_sip._tcp.other.test".into()),
                Answer::Srv(vec![srv(1, 1, 5080, "sip.other.test")]),
            ),
            (
                Query::Addr("sip.other.test".into()),
                Answer::Addr(vec![ip("198.51.100.1")]),
            ),
        ]);
        let (r, asked) = resolve(
            Resolution::new(dest("other.test"), &[SipTransport::Udp, SipTransport::Tcp]),
            &zone,
        );
        assert!(asked.contains(&Query::Srv("_sip._udp.other.test".into())));
        let t = targets(&r);
        assert_eq!(
            t,
            vec![Target {
                addr: ip("198.51.100.1"),
                port: 5080,
                transport: SipTransport::Tcp
            }]
        );

        // Nothing but an A record: UDP to 5060.
        let zone = HashMap::from([(
            Query::Addr("plain.test".into()),
            Answer::Addr(vec![ip("198.51.100.2")]),
        )]);
        let (r, asked) = resolve(Resolution::new(dest("plain.test"), &ALL), &zone);
        assert_eq!(asked.last(), Some(&Query::Addr("plain.test".into())));
        let t = targets(&r);
        assert_eq!(
            t,
            vec![Target {
                addr: ip("198.51.100.2"),
                port: 5060,
                transport: SipTransport::Udp
            }]
        );
    }

    #[test]
    fn numeric_hosts_explicit_ports_and_transports_follow_section_4_2() {
        let mut r = Resolution::new(
            Destination {
                host: "192.0.2.5".into(),
                port: None,
                transport: Some(SipTransport::Tcp),
                sips: false,
            },
            &ALL,
        );
        assert_eq!(r.poll_query(), None);
        assert!(r.is_done());
        let t = targets(&r);
        assert_eq!(
            t,
            vec![Target {
                addr: ip("192.0.2.5"),
                port: 5060,
                transport: SipTransport::Tcp
            }]
        );
        let r = Resolution::new(
            Destination {
                host: "[2001:db8::1]".into(),
                port: Some(5070),
                transport: None,
                sips: true,
            },
            &ALL,
        );
        let t = targets(&r);
        assert_eq!(t[0].transport, SipTransport::Tls);
        assert_eq!(t[0].port, 5070);

        // A port: A/AAAA only, no SRV.
        let zone = HashMap::from([(
            Query::Addr("example.com".into()),
            Answer::Addr(vec![ip("192.0.2.9")]),
        )]);
        let (r, asked) = resolve(
            Resolution::new(
                Destination {
                    host: "example.com".into(),
                    port: Some(5080),
                    transport: None,
                    sips: false,
                },
                &ALL,
            ),
            &zone,
        );
        assert_eq!(asked, vec![Query::Addr("example.com".into())]);
        assert_eq!(targets(&r)[0].port, 5080);

        // A transport, no port: SRV of that transport only.
        let (_, asked) = resolve(
            Resolution::new(
                Destination {
                    host: "example.com".into(),
                    port: None,
                    transport: Some(SipTransport::Tcp),
                    sips: false,
                },
                &ALL,
            ),
            &example_zone(),
        );
        assert_eq!(asked[0], Query::Srv("_sip._tcp.example.com".into()));
        assert!(!asked.iter().any(|q| matches!(q, Query::Naptr(_))));
    }

    #[test]
    fn sips_uses_only_tls_and_a_dot_target_means_no_service() {
        let zone = HashMap::from([
            (
                Query::Naptr("secure.test".into()),
                Answer::Naptr(vec![
                    naptr(10, "SIP+D2U", "_sip._udp.secure.test"),
                    naptr(20, "SIPS+D2T", "_sips._tcp.secure.test"),
                ]),
            ),
            (
                Query::Srv("_sips._tcp.secure.test".into()),
                Answer::Srv(vec![srv(0, 0, 5061, "tls.secure.test")]),
            ),
            (
                Query::Srv("_sip._udp.secure.test".into()),
                Answer::Srv(vec![srv(0, 0, 5060, "udp.secure.test")]),
            ),
            (
                Query::Addr("tls.secure.test".into()),
                Answer::Addr(vec![ip("203.0.113.1")]),
            ),
            (
                Query::Addr("udp.secure.test".into()),
                Answer::Addr(vec![ip("203.0.113.2")]),
            ),
        ]);
        let (r, asked) = resolve(
            Resolution::new(
                Destination {
                    host: "secure.test".into(),
                    port: None,
                    transport: None,
                    sips: true,
                },
                &ALL,
            ),
            &zone,
        );
        assert!(!asked.contains(&Query::Srv("_sip._udp.secure.test".into())));
        let t = targets(&r);
        assert_eq!(
            t,
            vec![Target {
                addr: ip("203.0.113.1"),
                port: 5061,
                transport: SipTransport::Tls
            }]
        );

        let zone = HashMap::from([(
            Query::Srv("_sip._udp.none.test".into()),
            Answer::Srv(vec![srv(0, 0, 0, ".")]),
        )]);
        let (r, _) = resolve(
            Resolution::new(dest("none.test"), &[SipTransport::Udp]),
            &zone,
        );
        assert!(r
            .targets(
                &mut SplitMix::new(1),
                &DeadTargets::new(Duration::ZERO),
                Instant::now()
            )
            .is_empty());
    }

    #[test]
    fn dead_targets_go_last_until_their_time_is_up_and_failover_rules() {
        let (r, _) = resolve(
            Resolution::new(dest("example.com"), &[SipTransport::Udp]),
            &example_zone(),
        );
        let mut dead = DeadTargets::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let pbx1 = Target {
            addr: ip("192.0.2.11"),
            port: 5060,
            transport: SipTransport::Udp,
        };
        dead.mark_dead(pbx1, t0);
        for seed in 0..50 {
            let t = r.targets(
                &mut SplitMix::new(seed),
                &dead,
                t0 + Duration::from_secs(10),
            );
            assert_eq!(t.last(), Some(&pbx1), "a dead target is tried last");
            assert_eq!(t.len(), 3);
        }
        let later = t0 + Duration::from_secs(31);
        assert!(!dead.is_dead(&pbx1, later));
        dead.expire(later);
        dead.mark_dead(pbx1, later);
        dead.mark_alive(&pbx1);
        assert!(!dead.is_dead(&pbx1, later));

        assert!(should_fail_over(None), "timeout or transport error");
        assert!(should_fail_over(Some(503)));
        for s in [200, 404, 486, 500, 603] {
            assert!(!should_fail_over(Some(s)), "{s} is an answer");
        }
    }
}
