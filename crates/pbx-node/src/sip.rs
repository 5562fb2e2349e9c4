//! The driver of the node's SIP endpoint: feeds it what the transports read, carries out
//! its events (send, commit then answer, start a call, hand to a call, relay to the node
//! running a call), and runs its timers. The SIP decisions are the endpoint's
//! ([`pbx_endpoint`]); the sockets are [`crate::transport`]'s.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pbx_endpoint::{Dest, Endpoint, EndpointConfig, Event, Link, Refused};
use pbx_peer::Cluster;
use pbx_sip_core::Timers;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::calls::{start_call, CallControlHook, CallInput, CallLayer, SipEndpoint};
use crate::config::Config;
use crate::tls::SipTls;
use crate::transport::{Inbox, Io};
use crate::{unix_ms, NodeError};

/// What the transports, the peer link and the timer share.
struct Sip {
    endpoint: Arc<SipEndpoint>,
    io: Arc<Io>,
    cluster: Cluster,
    calls: Arc<CallLayer>,
    /// Wakes the timer when a response started a timer sooner than it sleeps for.
    wake: Arc<Notify>,
    node_id: u64,
    /// Calls refused at the limit, logged once a second.
    shed_log: EverySecond,
    counts: Arc<crate::metrics::NodeCounts>,
}

/// What the metrics read from the SIP side of a node.
pub(crate) struct SipParts {
    pub(crate) endpoint: Arc<SipEndpoint>,
    pub(crate) io: Arc<Io>,
    pub(crate) calls: Arc<CallLayer>,
}

/// Counts an event that can happen thousands of times a second and says, at most once
/// a second, how many happened since it last said.
#[derive(Default)]
struct EverySecond {
    count: std::sync::atomic::AtomicU64,
    last_ms: std::sync::atomic::AtomicU64,
}

impl EverySecond {
    /// Counts one; the count to log when a second has passed since the last log.
    fn tick(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        let now = unix_ms();
        let last = self.last_ms.load(Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return None;
        }
        Some(self.count.swap(0, Relaxed))
    }
}

/// Starts SIP on the bound sockets of [`Listeners`] (`tls`: the certificate, when TLS
/// is on).
pub(crate) fn serve(
    (udp, tcp, tls_listener): (UdpSocket, TcpListener, Option<TcpListener>),
    tls: Option<SipTls>,
    tls_client: Option<tokio_rustls::TlsConnector>,
    handler: pbx_registrar::HandlerConfig,
    cluster: Cluster,
    config: &Config,
    counts: Arc<crate::metrics::NodeCounts>,
) -> Result<(Vec<tokio::task::JoinHandle<()>>, SipParts), NodeError> {
    let tls = match (tls, tls_listener) {
        (Some(tls), Some(listener)) => Some((listener, tls)),
        (None, _) => None,
        (Some(_), None) => {
            return Err(NodeError::Config {
                path: config.base_dir.clone(),
                reason: "tls: a certificate is configured but no TLS listener was bound".into(),
            })
        }
    };
    let tls_addr = tls.as_ref().and_then(|(l, _)| l.local_addr().ok());
    let io = Arc::new(Io::new(
        udp,
        tls_addr,
        tls_client,
        cluster.clone(),
        config,
        counts.clone(),
    ));
    let fd_limit = crate::process::raise_fd_limit();
    let (max_calls, fewer) = config.calls.capacity(fd_limit);
    match fewer {
        Some(why) => tracing::warn!(
            max_calls,
            configured = config.calls.max_calls,
            "fewer calls admitted at once than calls.max_calls: {why}"
        ),
        None => tracing::info!(max_calls, fd_limit, "call capacity"),
    }
    let endpoint = Arc::new(Endpoint::new(EndpointConfig {
        node_id: config.node.id,
        local_addr: io.local_addr,
        limits: crate::transport::limits(config),
        timers: Timers::default(),
        retry_after: config.cluster.retry_after,
        overload: config.overload.endpoint_config(),
        max_calls,
        relayed_call_idle: EndpointConfig::DEFAULT_RELAYED_CALL_IDLE,
        handler,
        nat: config.registrar.nat,
        tls_addr: io.tls_addr,
        unsolicited_mwi: config.calls.unsolicited_mwi,
        seed: rand::random(),
    })?);
    let wake = Arc::new(Notify::new());
    let calls = Arc::new(CallLayer::new(
        config,
        endpoint.clone(),
        io.clone(),
        cluster.clone(),
        wake.clone(),
        counts.clone(),
    )?);
    let sip = Arc::new(Sip {
        endpoint: endpoint.clone(),
        io: io.clone(),
        cluster: cluster.clone(),
        calls: calls.clone(),
        wake: wake.clone(),
        node_id: config.node.id,
        shed_log: EverySecond::default(),
        counts,
    });
    cluster.set_sip_relay(Arc::new(RelayHook(Arc::downgrade(&sip))));
    cluster.set_call_control(Arc::new(CallControlHook(Arc::downgrade(&calls))));
    let mut tasks = io.serve(sip, tcp, tls, config.transport.udp_workers);
    tasks.push(tokio::spawn(shed_report(endpoint.clone())));
    tasks.push(tokio::spawn(mailbox_watch(
        endpoint.clone(),
        cluster.clone(),
        wake.clone(),
    )));
    tasks.push(tokio::spawn(timer(endpoint.clone(), io.clone(), wake)));
    tasks.push(tokio::spawn(crate::survival::run(
        calls.clone(),
        cluster.clone(),
        std::time::Duration::from_millis(config.cluster.fence_after_ms),
    )));
    Ok((
        tasks,
        SipParts {
            endpoint,
            io,
            calls,
        },
    ))
}

impl Inbox for Sip {
    fn on_message(&self, data: &[u8], source: SocketAddr, link: Link) -> bool {
        self.counts.sip.received(data);
        let event = self
            .endpoint
            .handle(Instant::now(), unix_ms(), source, link, data, || {
                self.cluster.read()
            });
        let answerable = !matches!(event, Some(Event::Unanswerable));
        if let Some(event) = event {
            self.carry_out(event);
        }
        if self.endpoint.take_timers_moved() {
            self.wake.notify_one();
        }
        answerable
    }

    fn on_udp_queue(&self, waiting: bool) {
        self.endpoint.udp_queue(Instant::now(), waiting);
    }

    fn on_send_failed(&self, dest: Dest, bytes: &[u8]) {
        // A request of a call: like a 503, the call tries the next server at once
        // (RFC 3263 §4.3).
        if let Some(call) = self.endpoint.call_of_unsent(bytes) {
            let _ = call.send(CallInput::TransportError(dest));
        }
    }
}

impl Sip {
    fn carry_out(&self, event: Event<crate::calls::CallTx>) {
        match event {
            Event::Transmit(t) => self.io.send(t.dest, t.bytes),
            Event::Unanswerable => tracing::debug!("unanswerable message"),
            Event::Commit { command, token } => {
                let endpoint = self.endpoint.clone();
                let io = self.io.clone();
                let cluster = self.cluster.clone();
                let span =
                    tracing::debug_span!("sip", node = self.node_id, call_id = %token.call_id());
                tokio::spawn(
                    async move {
                        let aor = match &*command {
                            pbx_state::Command::Register { aor, .. } => Some(aor.clone()),
                            _ => None,
                        };
                        let result = cluster.propose(*command).await;
                        if let Err(e) = &result {
                            tracing::warn!(error = %e, "not committed: 503");
                        }
                        let committed = result.is_ok();
                        if let Some(t) =
                            endpoint.commit_done(Instant::now(), unix_ms(), token, result)
                        {
                            io.send(t.dest, t.bytes);
                        }
                        // Message waiting for a phone that just registered here.
                        if let (Some(aor), true) = (aor, committed) {
                            let sends =
                                endpoint
                                    .registered(Instant::now(), &aor, unix_ms(), || cluster.read());
                            for t in sends {
                                io.send(t.dest, t.bytes);
                            }
                        }
                    }
                    .instrument(span),
                );
            }
            Event::StartCall(call) => {
                let span =
                    tracing::info_span!("call", node = self.node_id, call_id = %call.core.call_id);
                let _g = span.enter();
                start_call(&self.calls, *call);
            }
            Event::CallRefused { transmit, reason } => {
                match &reason {
                    Refused::CallLimit { limit } => {
                        // Under overload this is every new call: once a second, counted.
                        if let Some(refused) = self.shed_log.tick() {
                            tracing::warn!(limit, refused, "call limit reached: 503");
                        }
                    }
                    Refused::NoDialplan => tracing::warn!("no dialplan yet: 503"),
                    Refused::NoRoute {
                        caller,
                        exten,
                        context,
                        error,
                    } => tracing::info!(%caller, %exten, context, %error, "no route: 404"),
                    Refused::NoMediaPorts => tracing::warn!("no RTP ports: 503"),
                    Refused::BadReplaces => tracing::info!("bad Replaces header: 400"),
                }
                if let Some(t) = transmit {
                    self.io.send(t.dest, t.bytes);
                }
            }
            Event::ToCall(call, message) => {
                let _ = call.send(CallInput::Sip(message));
            }
            Event::Relay {
                node,
                source,
                bytes,
            } => {
                let cluster = self.cluster.clone();
                tokio::spawn(async move {
                    match cluster.relay(node, source, bytes, true).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!(node, %source, "call owner did not take the relayed message")
                        }
                        Err(e) => {
                            tracing::warn!(node, %source, error = %e, "cannot relay to the call's node")
                        }
                    }
                });
            }
        }
    }
}

/// The node's side of the Relay RPC.
struct RelayHook(Weak<Sip>);

impl pbx_peer::SipRelay for RelayHook {
    fn deliver(
        &self,
        from_node: u64,
        phone: SocketAddr,
        message: Vec<u8>,
        from_phone: bool,
    ) -> bool {
        let Some(sip) = self.0.upgrade() else {
            return false;
        };
        tracing::debug!(from_node, %phone, from_phone, len = message.len(), "relayed message");
        if from_phone {
            sip.on_message(&message, phone, Link::Peer(from_node));
            return true;
        }
        let Some(conn) = sip.io.connection_to(phone) else {
            return false;
        };
        // The phone answers on this connection: its messages of this call go back.
        sip.endpoint
            .note_relayed(Instant::now(), from_node, &message);
        sip.io.queue_on(&conn, phone, bytes::Bytes::from(message))
    }
}

/// Message waiting: whenever a voicemail change is applied (whichever node made it),
/// the endpoint tells the phones whose mailbox's counts moved.
async fn mailbox_watch(endpoint: Arc<SipEndpoint>, cluster: Cluster, wake: Arc<Notify>) {
    let mut applied = cluster.metrics();
    let mut seen = None;
    loop {
        let version = cluster.read().voicemail.version;
        if seen != Some(version) {
            seen = Some(version);
            let state = cluster.read();
            endpoint.mailboxes_changed(Instant::now(), &state, unix_ms());
            drop(state);
            wake.notify_one();
        }
        // Applies come thousands a second under registration load: look at most ten
        // times a second (a lamp a tenth of a second late is still on time).
        tokio::time::sleep(MAILBOX_LOOK_EVERY).await;
        if applied.changed().await.is_err() {
            return;
        }
    }
}

/// How often at most [`mailbox_watch`] looks at the applied state.
const MAILBOX_LOOK_EVERY: Duration = Duration::from_millis(100);

/// Fires the endpoint's timers and sends its retransmissions.
async fn timer(endpoint: Arc<SipEndpoint>, io: Arc<Io>, wake: Arc<Notify>) {
    loop {
        let now = Instant::now();
        // J/L timers are long; a one-second cap keeps the table tidy without being woken
        // by every response. INVITE finals wake us for Timer G.
        let deadline = endpoint
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1))
            .min(now + Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            // A sooner timer, or requests queued to send (a NOTIFY).
            _ = wake.notified() => {}
        }
        endpoint.handle_timeout(Instant::now());
        while let Some(t) = endpoint.poll_transmit() {
            io.send(t.dest, t.bytes);
        }
    }
}

/// What overload control shed, logged once a second while it sheds (counters since
/// start, and the commits in flight).
async fn shed_report(endpoint: Arc<SipEndpoint>) {
    let mut last = pbx_endpoint::ShedCounts::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = endpoint.shed_counts();
        if now != last {
            tracing::warn!(
                registers_503 = now.registers - last.registers,
                invites_503 = now.invites - last.invites,
                flood_dropped = now.flood_dropped - last.flood_dropped,
                total_registers_503 = now.registers,
                total_invites_503 = now.invites,
                total_flood_dropped = now.flood_dropped,
                pending_commits = endpoint.pending_commits(),
                "overload: new work shed in the last second"
            );
            last = now;
        }
    }
}
