//! The cluster's own DNS (hickory-server): authoritative for the SIP domain, answering
//! from `pbx_dns::zone` with the members that are alive (probed over the peer
//! link), in the quorum and not draining. A node that cannot reach a majority answers
//! SERVFAIL, so resolvers ask another member instead of learning a stale list.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, NAPTR, NS, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use pbx_dns::zone::{Lookup, QueryType, RecordData, ZoneMember, ZoneSpec};
use pbx_peer::Cluster;

use crate::config::DnsSection;
use crate::NodeError;

/// What the DNS answers from: the members last found alive (None: not known yet, see
/// [`probe_members`]).
struct ClusterDns {
    cluster: Cluster,
    config: DnsSection,
    domain: String,
    /// This node's SIP-over-TLS port, published for every member (they share it).
    tls_port: Option<u16>,
    alive: Arc<RwLock<Option<BTreeSet<u64>>>>,
    /// Answers by response code (metrics).
    counts: Arc<crate::metrics::NodeCounts>,
}

impl ClusterDns {
    /// The zone as this node sees it now; None when it is cut off from the majority.
    fn zone(&self) -> Option<ZoneSpec> {
        let status = self.cluster.status();
        if !status.serving_writes {
            return None;
        }
        let alive = self.alive.read().unwrap_or_else(|e| e.into_inner()).clone();
        let draining = self.cluster.read().draining.clone();
        let members = status
            .members
            .iter()
            .filter(|(id, _, _)| {
                (*id == status.node_id || alive.as_ref().is_none_or(|a| a.contains(id)))
                    && !draining.contains(id)
            })
            .filter_map(|(id, m, _)| {
                let sip: SocketAddr = m.sip_addr.parse().ok()?;
                Some(ZoneMember {
                    id: *id,
                    addr: sip.ip(),
                    sip_port: sip.port(),
                    priority: if self.config.backup.contains(id) {
                        20
                    } else {
                        10
                    },
                    weight: self.config.weight,
                })
            })
            .collect();
        Some(ZoneSpec {
            domain: self.domain.clone(),
            ttl: self.config.ttl,
            members,
            tls_port: self.tls_port,
        })
    }
}

fn name(s: &str) -> Option<Name> {
    Name::from_ascii(s).ok()
}

/// A zone record as hickory writes it (None: a name that does not parse, which the
/// zone never makes).
fn to_hickory(r: &pbx_dns::zone::Record) -> Option<Record> {
    let owner = name(&r.name)?;
    let data = match &r.data {
        RecordData::Naptr(n) => RData::NAPTR(NAPTR::new(
            n.order,
            n.preference,
            n.flags.as_bytes().into(),
            n.service.as_bytes().into(),
            Box::default(),
            name(&n.replacement)?,
        )),
        RecordData::Srv(s) => RData::SRV(SRV::new(s.priority, s.weight, s.port, name(&s.target)?)),
        RecordData::Addr(std::net::IpAddr::V4(a)) => RData::A(A(*a)),
        RecordData::Addr(std::net::IpAddr::V6(a)) => RData::AAAA(AAAA(*a)),
        RecordData::Ns(n) => RData::NS(NS(name(n)?)),
        RecordData::Soa {
            mname,
            rname,
            serial,
            minimum,
        } => RData::SOA(SOA::new(
            name(mname)?,
            name(rname)?,
            *serial,
            3600,
            600,
            86400,
            *minimum,
        )),
    };
    Some(Record::from_rdata(owner, r.ttl, data))
}

fn query_type(t: RecordType) -> QueryType {
    match t {
        RecordType::NAPTR => QueryType::Naptr,
        RecordType::SRV => QueryType::Srv,
        RecordType::A => QueryType::A,
        RecordType::AAAA => QueryType::Aaaa,
        RecordType::NS => QueryType::Ns,
        RecordType::SOA => QueryType::Soa,
        RecordType::ANY => QueryType::Any,
        _ => QueryType::Other,
    }
}

#[tonic::async_trait]
impl RequestHandler for ClusterDns {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let info = self.answer(request, response_handle).await;
        let rcode = match info.response_code {
            ResponseCode::NoError => "noerror",
            ResponseCode::NXDomain => "nxdomain",
            ResponseCode::Refused => "refused",
            ResponseCode::ServFail => "servfail",
            ResponseCode::FormErr => "formerr",
            _ => "other",
        };
        self.counts.dns.answered(rcode);
        info
    }
}

impl ClusterDns {
    async fn answer<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| send_failed(request));
        };
        let qname = info.query.name().to_string();
        let qtype = query_type(info.query.query_type());
        let Some(zone) = self.zone() else {
            let resp = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| send_failed(request));
        };
        let soa: Vec<Record> = to_hickory(&zone.soa()).into_iter().collect();
        let (code, answers, negative) = match zone.lookup(&qname, qtype) {
            Lookup::NotOurs => {
                let resp = builder.error_msg(&request.metadata, ResponseCode::Refused);
                return response_handle
                    .send_response(resp)
                    .await
                    .unwrap_or_else(|_| send_failed(request));
            }
            Lookup::NoName => (ResponseCode::NXDomain, Vec::new(), true),
            Lookup::Records(list) => {
                let empty = list.is_empty();
                (
                    ResponseCode::NoError,
                    list.iter().filter_map(to_hickory).collect::<Vec<_>>(),
                    empty,
                )
            }
        };
        // Addresses of SRV targets and name servers travel along (no second query).
        let mut additionals: Vec<Record> = Vec::new();
        for a in &answers {
            let target = match &a.data {
                RData::SRV(s) => Some(s.target.to_string()),
                RData::NS(n) => Some(n.0.to_string()),
                _ => None,
            };
            if let Some(t) = target {
                for qt in [QueryType::A, QueryType::Aaaa] {
                    if let Lookup::Records(list) = zone.lookup(&t, qt) {
                        additionals.extend(list.iter().filter_map(to_hickory));
                    }
                }
            }
        }
        additionals.dedup();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = false;
        meta.response_code = code;
        let no_soa: Vec<Record> = Vec::new();
        let resp = builder.build(
            meta,
            answers.iter(),
            no_soa.iter(),
            if negative { soa.iter() } else { no_soa.iter() },
            additionals.iter(),
        );
        response_handle
            .send_response(resp)
            .await
            .unwrap_or_else(|_| send_failed(request))
    }
}

/// What the server records when a response could not be sent.
fn send_failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// Probes every other member's peer link each interval; a member is alive when it
/// answers within half the interval and serves writes. A round that began before this
/// node served writes itself says nothing (the others may be starting with it): until a
/// round of its own as a serving node, the answers list every member it knows from the
/// Raft membership (`None`) rather than itself alone, which resolvers would cache for
/// the TTL and send every phone to this node.
async fn probe_members(
    cluster: Cluster,
    interval: Duration,
    alive: Arc<RwLock<Option<BTreeSet<u64>>>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = cluster.node_id();
        let serving = cluster.serving_writes();
        let ids: Vec<u64> = cluster
            .status()
            .members
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| *id != me)
            .collect();
        let mut probes = tokio::task::JoinSet::new();
        for id in ids {
            let cluster = cluster.clone();
            probes.spawn(async move {
                let ok = cluster
                    .peer_status(id, interval / 2)
                    .await
                    .is_ok_and(|s| s.serving_writes);
                (id, ok)
            });
        }
        let mut now_alive = BTreeSet::new();
        while let Some(Ok((id, ok))) = probes.join_next().await {
            if ok {
                now_alive.insert(id);
            }
        }
        let now_alive = serving.then_some(now_alive);
        let mut current = alive.write().unwrap_or_else(|e| e.into_inner());
        if *current != now_alive {
            if let Some(a) = &now_alive {
                tracing::info!(alive = ?a, "cluster DNS: members answering changed");
            }
            *current = now_alive;
        }
    }
}

/// Serves the cluster DNS on UDP and TCP `addr` until the node stops.
pub(crate) async fn serve(
    addr: SocketAddr,
    config: DnsSection,
    domain: String,
    tls_port: Option<u16>,
    cluster: Cluster,
    counts: Arc<crate::metrics::NodeCounts>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, NodeError> {
    let bind = |source| NodeError::Bind { addr, source };
    let udp = tokio::net::UdpSocket::bind(addr).await.map_err(bind)?;
    let tcp = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let alive = Arc::new(RwLock::new(None));
    let interval = Duration::from_millis(config.probe_interval_ms);
    let prober = tokio::spawn(probe_members(cluster.clone(), interval, alive.clone()));
    let handler = ClusterDns {
        cluster,
        config,
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        tls_port,
        alive,
        counts,
    };
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    tracing::info!(%addr, %domain, "cluster DNS listening (UDP, TCP)");
    let runner = tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            tracing::error!(error = %e, "cluster DNS stopped");
        }
    });
    Ok(vec![prober, runner])
}
