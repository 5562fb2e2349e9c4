//! The node's Prometheus metrics and health endpoints, on an HTTP listener of their own
//! (`[metrics] listen`): `/metrics` (Prometheus text format 0.0.4), `/healthz` (the
//! process answers) and `/readyz` (it serves: in the quorum, started, not draining,
//! caught up), both with JSON detail.
//!
//! Hot paths only bump atomics ([`SipCounts`], [`CallCounts`], [`DnsCounts`], and the
//! counters the endpoint, the relay and the peer link keep); everything else is read
//! from its owner when Prometheus scrapes ([`NodeCollector`]). Names and units:
//! `docs/operations.md` ("Metrics").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use pbx_peer::Cluster;
use pbx_sip_msg::MessageKind;
use pbx_state::Transport;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::calls::{CallLayer, SipEndpoint};
use crate::transport::Io;
use crate::unix_ms;

/// SIP messages received and sent, by method (requests) and status class (responses).
#[derive(Debug)]
pub(crate) struct SipCounts {
    /// [received, sent] × method.
    requests: [[AtomicU64; 15]; 2],
    /// [received, sent] × class 1xx..6xx.
    responses: [[AtomicU64; 6]; 2],
    /// Received datagrams or stream messages that are not SIP at all.
    garbage: AtomicU64,
}

impl Default for SipCounts {
    fn default() -> Self {
        fn zero<const N: usize>() -> [AtomicU64; N] {
            std::array::from_fn(|_| AtomicU64::new(0))
        }
        SipCounts {
            requests: [zero(), zero()],
            responses: [zero(), zero()],
            garbage: AtomicU64::new(0),
        }
    }
}

impl SipCounts {
    pub(crate) fn received(&self, bytes: &[u8]) {
        self.count(0, bytes);
    }

    pub(crate) fn sent(&self, bytes: &[u8]) {
        self.count(1, bytes);
    }

    fn count(&self, dir: usize, bytes: &[u8]) {
        match MessageKind::of(bytes) {
            MessageKind::Request(m) => {
                self.requests[dir][m].fetch_add(1, Ordering::Relaxed);
            }
            MessageKind::Response(code) if (100..700).contains(&code) => {
                self.responses[dir][usize::from(code / 100 - 1)].fetch_add(1, Ordering::Relaxed);
            }
            // Our own keep-alives and STUN answers are not SIP messages either.
            MessageKind::Response(_) | MessageKind::Unknown => {
                if dir == 0 {
                    self.garbage.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Calls this node started, answered and ended, and how long answering took.
#[derive(Debug)]
pub(crate) struct CallCounts {
    pub(crate) started: AtomicU64,
    pub(crate) answered: AtomicU64,
    /// By [`pbx_dialplan::Disposition::ALL`] order.
    ended: [AtomicU64; 5],
    /// From the INVITE to the answer sent to the caller.
    pub(crate) setup: Histogram,
}

impl Default for CallCounts {
    fn default() -> Self {
        CallCounts {
            started: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            ended: std::array::from_fn(|_| AtomicU64::new(0)),
            setup: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        }
    }
}

impl CallCounts {
    pub(crate) fn ended(&self, d: pbx_dialplan::Disposition) {
        let i = pbx_dialplan::Disposition::ALL
            .iter()
            .position(|x| *x == d)
            .unwrap_or(4);
        self.ended[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// DNS queries the cluster DNS answered, by response code.
#[derive(Debug, Default)]
pub(crate) struct DnsCounts {
    counts: [AtomicU64; 6],
}

impl DnsCounts {
    const RCODES: [&'static str; 6] = [
        "noerror", "nxdomain", "refused", "servfail", "formerr", "other",
    ];

    pub(crate) fn answered(&self, rcode: &str) {
        let i = Self::RCODES
            .iter()
            .position(|r| *r == rcode)
            .unwrap_or(Self::RCODES.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What this node (as leader) shipped to PostgreSQL.
#[derive(Debug, Default)]
pub(crate) struct CdrCounts {
    pub(crate) shipped: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// The counters the node's drivers bump.
#[derive(Debug, Default)]
pub(crate) struct NodeCounts {
    pub(crate) sip: SipCounts,
    pub(crate) calls: CallCounts,
    pub(crate) dns: DnsCounts,
    pub(crate) cdr: CdrCounts,
}

/// Reads everything else at scrape time.
pub(crate) struct NodeCollector {
    pub(crate) counts: Arc<NodeCounts>,
    pub(crate) cluster: Cluster,
    pub(crate) endpoint: Arc<SipEndpoint>,
    pub(crate) io: Arc<Io>,
    pub(crate) calls: Arc<CallLayer>,
    pub(crate) started_ms: u64,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// Writes one metric family at a time.
struct Out<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
}

impl Out<'_, '_> {
    fn counter<N>(&mut self, name: &str, help: &str, v: N) -> std::fmt::Result
    where
        ConstCounter<N>: EncodeMetric,
    {
        let c = ConstCounter::new(v);
        c.encode(
            self.enc
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        let g = ConstGauge::new(v);
        g.encode(
            self.enc
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A counter family: one sample per label set.
    fn counters<L: prometheus_client::encoding::EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges<L: prometheus_client::encoding::EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        (sum, count, buckets): (f64, u64, Vec<(f64, u64)>),
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        // The encoder takes per-bucket counts and adds them up itself.
        let mut prev = 0;
        let mut per_bucket: Vec<(f64, u64)> = buckets
            .into_iter()
            .map(|(le, cum)| {
                let n = cum.saturating_sub(prev);
                prev = cum;
                (le, n)
            })
            .collect();
        per_bucket.push((f64::INFINITY, count.saturating_sub(prev)));
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &per_bucket, None)
    }
}

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];

fn l1(k: &'static str, v: impl ToString) -> L1 {
    [(k, v.to_string())]
}

fn l2(k1: &'static str, v1: impl ToString, k2: &'static str, v2: impl ToString) -> L2 {
    [(k1, v1.to_string()), (k2, v2.to_string())]
}

const DIRECTIONS: [&str; 2] = ["in", "out"];

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut o = Out { enc: &mut enc };
        self.sip(&mut o)?;
        self.registrar(&mut o)?;
        self.calls(&mut o)?;
        self.relay(&mut o)?;
        self.raft(&mut o)?;
        self.peer_link(&mut o)?;
        self.dns_and_overload(&mut o)?;
        self.cdrs(&mut o)?;
        process(&mut o, self.started_ms)
    }
}

impl NodeCollector {
    fn sip(&self, o: &mut Out) -> std::fmt::Result {
        let s = &self.counts.sip;
        o.counters(
            "pbx_sip_requests",
            "SIP requests received (direction=in) and sent (out), by method.",
            (0..2).flat_map(|d| {
                MessageKind::METHODS
                    .iter()
                    .enumerate()
                    .map(move |(m, name)| {
                        (
                            l2("direction", DIRECTIONS[d], "method", name),
                            s.requests[d][m].load(Ordering::Relaxed),
                        )
                    })
            }),
        )?;
        o.counters(
            "pbx_sip_responses",
            "SIP responses received (direction=in) and sent (out), by status class.",
            (0..2).flat_map(|d| {
                (0..6).map(move |c| {
                    (
                        l2("direction", DIRECTIONS[d], "class", format!("{}xx", c + 1)),
                        s.responses[d][c].load(Ordering::Relaxed),
                    )
                })
            }),
        )?;
        o.counter(
            "pbx_sip_unparseable_received",
            "Datagrams and stream messages received that are not SIP at all.",
            s.garbage.load(Ordering::Relaxed),
        )?;
        o.gauge(
            "pbx_sip_transactions",
            "Server transactions in flight or absorbing retransmissions.",
            self.endpoint.transactions() as f64,
        )?;
        o.counter(
            "pbx_sip_connections_overflowed",
            "Connections closed because their peer stopped reading what the node sent \
             (nothing is dropped silently on a reliable transport).",
            self.io.overflowed_connections(),
        )?;
        let (tcp, tls) = self.io.open_connections();
        o.gauges(
            "pbx_sip_connections",
            "Open SIP connections (phones and servers) on this node, by transport.",
            [
                (l1("transport", "tcp"), tcp as f64),
                (l1("transport", "tls"), tls as f64),
            ],
        )
    }

    fn registrar(&self, o: &mut Out) -> std::fmt::Result {
        o.counters(
            "pbx_register_requests",
            "REGISTERs taken by this node, by the status answered (dropped: answered nothing).",
            self.endpoint
                .register_outcomes()
                .counts()
                .map(|(code, n)| (l1("code", code), n)),
        )?;
        let now = unix_ms();
        let me = self.cluster.node_id();
        const TRANSPORTS: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];
        let mut here = [0u64; 3];
        let (bindings, users, aors) = {
            let st = self.cluster.read();
            let mut live = 0u64;
            let mut aors = 0u64;
            for list in st.bindings.values() {
                let mut n = 0;
                for b in list.iter().filter(|b| b.is_live(now)) {
                    n += 1;
                    if b.node_id == me {
                        if let Some(i) = TRANSPORTS.iter().position(|t| *t == b.transport) {
                            here[i] += 1;
                        }
                    }
                }
                live += n;
                aors += u64::from(n > 0);
            }
            (live, st.users.len() as u64, aors)
        };
        o.gauges(
            "pbx_registrar_bindings_here",
            "Live bindings registered through this node (the phones it serves), by transport.",
            TRANSPORTS
                .iter()
                .zip(here)
                .map(|(t, n)| (l1("transport", t.as_str().to_ascii_lowercase()), n as f64)),
        )?;
        o.gauge(
            "pbx_registrar_bindings",
            "Live contact bindings in the replicated registrar (all nodes).",
            bindings as f64,
        )?;
        o.gauge(
            "pbx_registrar_registered_users",
            "Users (AORs) with at least one live binding (all nodes).",
            aors as f64,
        )?;
        o.gauge(
            "pbx_users",
            "Users configured in the cluster.",
            users as f64,
        )
    }

    fn calls(&self, o: &mut Out) -> std::fmt::Result {
        let c = &self.counts.calls;
        o.gauge(
            "pbx_calls_active",
            "Calls this node runs now, set-up ones included (they count against max_calls).",
            self.endpoint.active_calls() as f64,
        )?;
        let by_owner: std::collections::BTreeMap<u64, u64> = {
            let st = self.cluster.read();
            let mut m = std::collections::BTreeMap::new();
            for r in st.calls.values() {
                *m.entry(r.owner).or_insert(0) += 1;
            }
            m
        };
        o.gauges(
            "pbx_calls_answered_active",
            "Answered calls in the replicated call list, by the node that runs them.",
            by_owner
                .into_iter()
                .map(|(owner, n)| (l1("owner", owner), n as f64)),
        )?;
        o.counter(
            "pbx_calls_started",
            "Calls this node admitted and started.",
            c.started.load(Ordering::Relaxed),
        )?;
        o.counter(
            "pbx_calls_answered",
            "Calls this node started that were answered.",
            c.answered.load(Ordering::Relaxed),
        )?;
        o.counters(
            "pbx_calls_ended",
            "Calls this node ended, by disposition (as Asterisk's CDR names it).",
            pbx_dialplan::Disposition::ALL
                .iter()
                .zip(c.ended.iter())
                .map(|(d, n)| (l1("disposition", d.label()), n.load(Ordering::Relaxed))),
        )?;
        c.setup.encode(o.enc.encode_descriptor(
            "pbx_call_setup_seconds",
            "Time from a call's INVITE to its answer.",
            None,
            MetricType::Histogram,
        )?)
    }

    fn relay(&self, o: &mut Out) -> std::fmt::Result {
        let Some(relay) = self.calls.relay() else {
            return Ok(());
        };
        let t = relay.totals();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        o.counter(
            "pbx_relay_packets",
            "RTP packets received by the media relay.",
            get(&t.packets),
        )?;
        o.counter(
            "pbx_relay_bytes",
            "RTP bytes received by the media relay.",
            get(&t.bytes),
        )?;
        o.counter(
            "pbx_relay_packets_lost",
            "RTP packets missing by sequence number on the way to the relay.",
            get(&t.lost),
        )?;
        o.counter(
            "pbx_relay_packets_dropped",
            "Datagrams the relay dropped (not RTP, or from an unexpected source).",
            get(&t.dropped),
        )?;
        o.counter(
            "pbx_relay_streams",
            "Relay streams (one per media line of a call) opened.",
            get(&t.streams),
        )?;
        o.histogram(
            "pbx_relay_jitter_seconds",
            "Interarrival jitter of each relayed stream side, sampled once a second.",
            t.jitter(),
        )?;
        let (free, all) = relay.port_pairs();
        o.gauge(
            "pbx_relay_ports_free",
            "RTP and RTCP ports free in the relay's range.",
            (free * 2) as f64,
        )?;
        o.gauge(
            "pbx_relay_ports_in_use",
            "RTP and RTCP ports held by relay streams (four a stream).",
            (all.saturating_sub(free) * 2) as f64,
        )
    }

    fn raft(&self, o: &mut Out) -> std::fmt::Result {
        let st = self.cluster.status();
        o.gauge("pbx_raft_term", "The current Raft term.", st.term as f64)?;
        o.gauges(
            "pbx_raft_role",
            "This node's Raft role (1 for the role it has).",
            ["leader", "follower", "candidate", "learner"]
                .into_iter()
                .map(|r| (l1("role", r), f64::from(u8::from(st.role == r)))),
        )?;
        o.gauge(
            "pbx_raft_leader_id",
            "The node this node knows as leader (0: none).",
            st.leader_id.unwrap_or(0) as f64,
        )?;
        o.gauge(
            "pbx_raft_serving_writes",
            "1 when a write sent here now would be committed (in contact with a majority).",
            f64::from(u8::from(st.serving_writes)),
        )?;
        let storage = self.cluster.storage_health();
        o.gauge(
            "pbx_storage_unavailable",
            "1 while this node's store is closed by an I/O error (a full disk): its Raft \
             writes wait, and it recovers by itself when there is room.",
            f64::from(u8::from(storage.unavailable().is_some())),
        )?;
        o.counter(
            "pbx_storage_outages",
            "Times this node's store was closed by an I/O error since start.",
            storage.outages(),
        )?;
        o.gauge(
            "pbx_raft_last_log_index",
            "The last index in this node's Raft log.",
            st.last_log_index as f64,
        )?;
        o.gauge(
            "pbx_raft_applied_index",
            "The last log index applied to the state machine.",
            st.applied_index as f64,
        )?;
        let purged = self
            .cluster
            .metrics()
            .borrow()
            .purged
            .map_or(0, |l| l.index);
        o.gauge(
            "pbx_raft_purged_index",
            "The last log index purged from this node's log (covered by its snapshot).",
            purged as f64,
        )?;
        o.gauges(
            "pbx_raft_member_lag_entries",
            "On the leader: log entries each member is behind the leader's log.",
            st.members
                .iter()
                .filter_map(|(id, _, _)| Some((l1("member", id), st.lag_of(*id)? as f64))),
        )?;
        o.gauge(
            "pbx_raft_members",
            "Members of the cluster (voters and learners).",
            st.members.len() as f64,
        )?;
        o.histogram(
            "pbx_raft_commit_seconds",
            "Time from proposing a batch of commands on this node to its commit.",
            {
                let h = self.cluster.stats().histogram();
                (h.sum_seconds, h.count, h.buckets)
            },
        )?;
        o.counter(
            "pbx_raft_commands",
            "Commands this node proposed that were committed.",
            self.cluster.stats().commands_since_start(),
        )?;
        let snap = self.cluster.snapshot_info();
        o.gauge(
            "pbx_raft_snapshot_bytes",
            "Size of the snapshot this node holds (0: none).",
            snap.map_or(0.0, |s| s.bytes as f64),
        )?;
        o.gauge(
            "pbx_raft_snapshot_index",
            "The last log index the snapshot covers.",
            snap.map_or(0.0, |s| s.index as f64),
        )?;
        o.gauge(
            "pbx_raft_snapshot_timestamp_seconds",
            "When the snapshot this node holds was built (unix time; 0: none).",
            snap.map_or(0.0, |s| s.built_ms as f64 / 1000.0),
        )?;
        let (elections, leader_changes) = self.cluster.elections_seen();
        o.counter(
            "pbx_raft_elections",
            "Raft terms started since this node started (each is an election round).",
            elections,
        )?;
        o.counter(
            "pbx_raft_leader_changes",
            "Leader changes this node saw since it started.",
            leader_changes,
        )
    }

    fn peer_link(&self, o: &mut Out) -> std::fmt::Result {
        o.counters(
            "pbx_peer_rpcs_served",
            "Peer-link RPCs this node served, by method and gRPC status code.",
            self.cluster
                .rpc_counts()
                .counts()
                .into_iter()
                .map(|(m, c, n)| (l2("method", m, "code", c), n)),
        )
    }

    fn cdrs(&self, o: &mut Out) -> std::fmt::Result {
        let (kept, unshipped, dropped) = {
            let st = self.cluster.read();
            let log = &st.cdrs;
            let unshipped = log
                .records
                .iter()
                .rev()
                .take_while(|c| c.seq > log.shipped_through)
                .count();
            (log.records.len(), unshipped, log.dropped_unshipped)
        };
        o.gauge(
            "pbx_cdr_records",
            "Call detail records the cluster keeps (replicated).",
            kept as f64,
        )?;
        o.gauge(
            "pbx_cdr_records_unshipped",
            "Kept records not yet in PostgreSQL (when it is configured).",
            unshipped as f64,
        )?;
        o.counter(
            "pbx_cdr_records_dropped_unshipped",
            "Records the keep window dropped before they reached PostgreSQL.",
            dropped,
        )?;
        let c = &self.counts.cdr;
        o.counter(
            "pbx_cdr_shipped",
            "Records this node, as leader, stored in PostgreSQL.",
            c.shipped.load(Ordering::Relaxed),
        )?;
        o.counter(
            "pbx_cdr_ship_errors",
            "Failed attempts of this node to store records in PostgreSQL.",
            c.errors.load(Ordering::Relaxed),
        )
    }

    fn dns_and_overload(&self, o: &mut Out) -> std::fmt::Result {
        o.counters(
            "pbx_dns_responses",
            "DNS queries the cluster DNS answered, by response code.",
            DnsCounts::RCODES
                .iter()
                .zip(self.counts.dns.counts.iter())
                .map(|(r, n)| (l1("rcode", r), n.load(Ordering::Relaxed))),
        )?;
        let shed = self.endpoint.shed_counts();
        o.counters(
            "pbx_overload_shed",
            "New requests shed by overload control (503 or dropped), by kind.",
            [
                (l1("kind", "register_503"), shed.registers),
                (l1("kind", "invite_503"), shed.invites),
                (l1("kind", "flood_dropped"), shed.flood_dropped),
            ],
        )?;
        o.gauge(
            "pbx_overload_pending_commits",
            "REGISTER commits handed to the cluster and not finished.",
            self.endpoint.pending_commits() as f64,
        )?;
        let (banned, bans) = self.endpoint.bans(unix_ms());
        o.gauge(
            "pbx_auth_banned_sources",
            "Source addresses banned now for failed authentication.",
            banned as f64,
        )?;
        o.counter(
            "pbx_auth_bans",
            "Bans of a source address for failed authentication since start.",
            bans,
        )
    }
}

/// The process metrics every Prometheus client exports, from /proc, and the clock.
fn process(o: &mut Out, started_ms: u64) -> std::fmt::Result {
    let clock = pbx_peer::clock_report();
    o.counter(
        "pbx_clock_steps",
        "Steps of the wall clock larger than 2 s that this node did not follow (it keeps \
         its monotonic time until restarted).",
        clock.steps,
    )?;
    o.gauge(
        "pbx_clock_wall_offset_seconds",
        "How far the wall clock is from the time this node uses (0 unless it stepped).",
        clock.wall_off_ms as f64 / 1000.0,
    )?;
    let p = crate::process::ProcessStats::read();
    if let Some(cpu) = p.cpu_seconds {
        o.counter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            cpu,
        )?;
    }
    if let Some(rss) = p.resident_bytes {
        o.gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            rss as f64,
        )?;
    }
    if let Some(fds) = p.open_fds {
        o.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            fds as f64,
        )?;
    }
    if let Some(max) = p.max_fds {
        o.gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max as f64,
        )?;
    }
    o.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        started_ms as f64 / 1000.0,
    )
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub(crate) struct Http {
    registry: Arc<Registry>,
    cluster: Cluster,
}

impl Http {
    pub(crate) fn new(collector: NodeCollector) -> Http {
        let cluster = collector.cluster.clone();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        Http {
            registry: Arc::new(registry),
            cluster,
        }
    }

    fn metrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Whether this node should be sent phones and requests, and why not.
    pub(crate) fn readiness(&self) -> Readiness {
        let st = self.cluster.status();
        let draining = st.draining.contains(&st.node_id);
        let behind = st.last_log_index.saturating_sub(st.applied_index);
        let started = self.cluster.is_ready();
        let mut reasons = Vec::new();
        if !st.serving_writes {
            reasons.push("not in contact with a majority of the cluster");
        }
        if !started {
            reasons.push("start-up writes (settings, users) not committed yet");
        }
        if draining {
            reasons.push("draining");
        }
        if behind > READY_LAG {
            reasons.push("applied state behind its log");
        }
        let storage_error = self.cluster.storage_health().unavailable().map(|(e, _)| e);
        if storage_error.is_some() {
            reasons.push("storage unavailable (see storage_error)");
        }
        Readiness {
            ready: reasons.is_empty(),
            node: st.node_id,
            role: st.role,
            leader: st.leader_id,
            term: st.term,
            serving_writes: st.serving_writes,
            started,
            draining,
            applied_index: st.applied_index,
            last_log_index: st.last_log_index,
            storage_error,
            reasons,
        }
    }
}

/// How far the applied state may trail the node's log for `/readyz` (a node replaying
/// a long log after a restart is not ready).
const READY_LAG: u64 = 1000;

/// `/readyz`'s answer.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Readiness {
    pub(crate) ready: bool,
    node: u64,
    role: &'static str,
    leader: Option<u64>,
    term: u64,
    serving_writes: bool,
    started: bool,
    draining: bool,
    applied_index: u64,
    last_log_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage_error: Option<String>,
    reasons: Vec<&'static str>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener`.
pub(crate) fn serve(
    listener: std::net::TcpListener,
    http: Http,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(get_metrics))
        .route("/healthz", axum::routing::get(get_healthz))
        .route("/readyz", axum::routing::get(get_readyz))
        .with_state(http);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    }))
}

async fn get_metrics(axum::extract::State(http): axum::extract::State<Http>) -> impl IntoResponse {
    match http.metrics() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics could not be encoded\n".to_string(),
        ),
    }
}

async fn get_healthz(axum::extract::State(http): axum::extract::State<Http>) -> impl IntoResponse {
    let body = serde_json::json!({
        "status": "alive",
        "node": http.cluster.node_id(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn get_readyz(axum::extract::State(http): axum::extract::State<Http>) -> impl IntoResponse {
    let r = http.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&r).unwrap_or_else(|_| "{}".into()),
    )
}
