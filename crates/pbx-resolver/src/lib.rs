//! RFC 3263 over real DNS: drives `pbx_dns::locate::Resolution` (the sans-IO
//! NAPTR → SRV → A/AAAA logic) with hickory-resolver, every pending query at once.

use std::net::SocketAddr;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use pbx_dns::locate::{Answer, Destination, Naptr, Query, Resolution, SipTransport, Srv};

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("DNS resolver: {0}")]
    Setup(String),
}

/// A DNS client for SIP server location.
pub struct SipResolver {
    inner: TokioResolver,
}

impl SipResolver {
    /// The system's name servers (`/etc/resolv.conf`).
    pub fn system() -> Result<SipResolver, ResolverError> {
        let inner = TokioResolver::builder_tokio()
            .map_err(|e| ResolverError::Setup(e.to_string()))?
            .build()
            .map_err(|e| ResolverError::Setup(e.to_string()))?;
        Ok(SipResolver { inner })
    }

    /// These name servers (UDP, then TCP), no caching across calls beyond TTLs.
    pub fn with_servers(servers: &[SocketAddr]) -> Result<SipResolver, ResolverError> {
        let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
        for s in servers {
            let mut ns = NameServerConfig::udp_and_tcp(s.ip());
            for c in ns.connections.iter_mut() {
                c.port = s.port();
            }
            config.add_name_server(ns);
        }
        let mut opts = ResolverOpts::default();
        opts.attempts = 1;
        opts.timeout = std::time::Duration::from_secs(2);
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| ResolverError::Setup(e.to_string()))?;
        Ok(SipResolver { inner })
    }

    /// Answers one query of the resolution ("no records" and failures: `Answer::None`).
    pub async fn answer(&self, q: &Query) -> Answer {
        answer(&self.inner, q).await
    }

    /// Runs the whole resolution of `dest`, each round's queries concurrently.
    pub async fn resolve(&self, dest: Destination, supported: &[SipTransport]) -> Resolution {
        let mut r = Resolution::new(dest, supported);
        loop {
            let mut round = tokio::task::JoinSet::new();
            while let Some(q) = r.poll_query() {
                let inner = self.inner.clone();
                round.spawn(async move {
                    let a = answer(&inner, &q).await;
                    (q, a)
                });
            }
            if round.is_empty() {
                return r;
            }
            while let Some(done) = round.join_next().await {
                if let Ok((q, a)) = done {
                    r.on_answer(&q, a);
                }
            }
        }
    }
}

async fn answer(inner: &TokioResolver, q: &Query) -> Answer {
    let fqdn = |n: &str| format!("{}.", n.trim_end_matches('.'));
    match q {
        Query::Naptr(name) => match inner.lookup(fqdn(name), RecordType::NAPTR).await {
            Ok(l) => Answer::Naptr(
                l.answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::NAPTR(n) => Some(Naptr {
                            order: n.order,
                            preference: n.preference,
                            flags: String::from_utf8_lossy(&n.flags).into_owned(),
                            service: String::from_utf8_lossy(&n.services).into_owned(),
                            replacement: n.replacement.to_string(),
                        }),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(_) => Answer::None,
        },
        Query::Srv(name) => match inner.lookup(fqdn(name), RecordType::SRV).await {
            Ok(l) => Answer::Srv(
                l.answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(s) => Some(Srv {
                            priority: s.priority,
                            weight: s.weight,
                            port: s.port,
                            target: s.target.to_string(),
                        }),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(_) => Answer::None,
        },
        Query::Addr(name) => match inner.lookup_ip(fqdn(name)).await {
            Ok(ips) => Answer::Addr(ips.iter().collect()),
            Err(_) => Answer::None,
        },
    }
}
