//! SIP over UDP, TCP and TLS: sockets, connections, the server transaction table and
//! its timers. Everything protocol-shaped is delegated to the sans-IO crates; this module
//! only moves bytes and owns time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pbx_registrar::{Inbound, Outcome, RequestHandler};
use pbx_sip_core::{RequestDisposition, ServerTable, TableEvent, Timers, TransactionKey};
use pbx_sip_msg::{
    frame_stream, parse_datagram, parse_stream_message, reply_to_unparseable, response_target,
    CoreHeaders, Limits, Method, SipError, SipMessage, StreamFrame,
};
use pbx_state::Transport;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use crate::calls::{start_call, CallInput, CallLayer};
use crate::config::{Config, TransportSection};
use crate::{unix_ms, NodeError};
use pbx_peer::Cluster;

/// Where a transaction's responses go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dest {
    Udp(SocketAddr),
    /// A connection (TCP or TLS) by id, and the peer address: the connection now held
    /// to that address if the id is gone, or (TCP only) a new one.
    Conn(u64, SocketAddr, Transport),
    /// A phone whose connection another node holds: through that node's Relay RPC.
    Peer(u64, SocketAddr, Transport),
}

/// How a message reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    Udp,
    /// On one of our connections (TCP or TLS).
    Conn(u64, Transport),
    /// Relayed by another node from a phone whose connection it holds.
    Peer(u64),
}

pub(crate) struct Shared {
    pub(crate) node_id: u64,
    /// The SIP address (UDP and TCP) of this node.
    pub(crate) local_addr: SocketAddr,
    /// Where SIP over TLS listens, if it does.
    pub(crate) tls_addr: Option<SocketAddr>,
    /// Connects to servers this node calls over TLS (None: no CA roots).
    pub(crate) tls_client: Option<tokio_rustls::TlsConnector>,
    /// The SIP domain each TLS server located by RFC 3263 must prove (RFC 5922).
    pub(crate) tls_names: Mutex<HashMap<SocketAddr, String>>,
    handler: Arc<RequestHandler>,
    pub(crate) state: Cluster,
    pub(crate) calls: CallLayer,
    udp: Arc<UdpSocket>,
    pub(crate) table: Mutex<ServerTable<Dest>>,
    pub(crate) timer_wake: Notify,
    conns: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    conn_by_peer: Mutex<HashMap<SocketAddr, u64>>,
    open_conns: AtomicUsize,
    next_conn: AtomicU64,
    limits: Limits,
    tcp_idle: Duration,
    max_conns: usize,
    /// Retry-After on a 503 for a write that could not be committed.
    pub(crate) retry_after: u32,
    /// Calls run by other nodes with phones connected here: Call-ID -> (node, last
    /// use). The phones' messages of those calls are relayed to that node.
    relayed: Mutex<HashMap<String, (u64, Instant)>>,
}

/// How long a relayed call is remembered without traffic (a long call with no
/// re-INVITE or refresh keeps working for that long).
const RELAYED_CALL_IDLE: Duration = Duration::from_secs(12 * 3600);

/// The node's side of the Relay RPC.
struct TransportRelay(std::sync::Weak<Shared>);

impl pbx_peer::SipRelay for TransportRelay {
    fn deliver(
        &self,
        from_node: u64,
        phone: SocketAddr,
        message: Vec<u8>,
        from_phone: bool,
    ) -> bool {
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        tracing::debug!(from_node, %phone, from_phone, len = message.len(), "relayed message");
        if from_phone {
            on_bytes(&shared, &message, phone, Link::Peer(from_node));
            return true;
        }
        let tx = {
            let Some(id) = lock(&shared.conn_by_peer).get(&phone).copied() else {
                return false;
            };
            lock(&shared.conns).get(&id).cloned()
        };
        let Some(tx) = tx else { return false };
        // The phone answers on this connection: its messages of this call go back.
        if let Ok(msg) = parse_stream_message(&message, &shared.limits) {
            if let Some(call_id) = msg.header(&pbx_sip_msg::HeaderName::CallId) {
                lock(&shared.relayed).insert(call_id.to_string(), (from_node, Instant::now()));
            }
        }
        tx.try_send(Bytes::from(message)).is_ok()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds UDP and TCP on the same address. Port 0 picks a port free for both.
pub(crate) fn bind(
    addr: SocketAddr,
    cfg: &TransportSection,
) -> Result<(UdpSocket, TcpListener), NodeError> {
    let err = |source| NodeError::Bind { addr, source };
    for _ in 0..20 {
        let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        udp.set_reuse_address(true).map_err(err)?;
        // Bigger buffers absorb bursts; the kernel caps them at rmem_max/wmem_max.
        let _ = udp.set_recv_buffer_size(cfg.udp_buffer_bytes);
        let _ = udp.set_send_buffer_size(cfg.udp_buffer_bytes);
        udp.set_nonblocking(true).map_err(err)?;
        udp.bind(&addr.into()).map_err(err)?;
        let bound = udp.local_addr().map_err(err)?.as_socket().unwrap_or(addr);
        let tcp = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        tcp.set_reuse_address(true).map_err(err)?;
        tcp.set_nonblocking(true).map_err(err)?;
        match tcp.bind(&bound.into()) {
            Ok(()) => {}
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(err(e)),
        }
        tcp.listen(1024).map_err(err)?;
        let udp = UdpSocket::from_std(udp.into()).map_err(err)?;
        let tcp = TcpListener::from_std(tcp.into()).map_err(err)?;
        return Ok((udp, tcp));
    }
    Err(err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free for both UDP and TCP",
    )))
}

/// The TLS listener and its certificate, when TLS is on.
pub(crate) struct TlsListener {
    pub listener: TcpListener,
    pub tls: crate::tls::SipTls,
}

/// Binds the TLS listener (TCP) on `addr`.
pub(crate) fn bind_tls(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    let err = |source| NodeError::Bind { addr, source };
    let tcp =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    tcp.set_reuse_address(true).map_err(err)?;
    tcp.set_nonblocking(true).map_err(err)?;
    tcp.bind(&addr.into()).map_err(err)?;
    tcp.listen(1024).map_err(err)?;
    TcpListener::from_std(tcp.into()).map_err(err)
}

/// The node's SIP sockets, bound before anything else starts.
pub(crate) struct Listeners {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    pub tls: Option<TlsListener>,
    /// For connecting to servers over TLS.
    pub tls_client: Option<tokio_rustls::TlsConnector>,
}

pub(crate) fn serve(
    Listeners {
        udp,
        tcp,
        tls,
        tls_client,
    }: Listeners,
    handler: Arc<RequestHandler>,
    state: Cluster,
    calls: CallLayer,
    config: &Config,
) -> Vec<tokio::task::JoinHandle<()>> {
    let local_addr = udp.local_addr().unwrap_or(config.node.sip_addr);
    let shared = Arc::new(Shared {
        node_id: config.node.id,
        local_addr,
        tls_addr: tls.as_ref().and_then(|t| t.listener.local_addr().ok()),
        tls_client,
        tls_names: Mutex::new(HashMap::new()),
        handler,
        state,
        calls,
        udp: Arc::new(udp),
        table: Mutex::new(ServerTable::new(Timers::default())),
        timer_wake: Notify::new(),
        conns: Mutex::new(HashMap::new()),
        conn_by_peer: Mutex::new(HashMap::new()),
        open_conns: AtomicUsize::new(0),
        next_conn: AtomicU64::new(1),
        limits: Limits {
            max_message_len: config.transport.max_message_size,
            ..Limits::default()
        },
        tcp_idle: Duration::from_secs(config.transport.tcp_idle_timeout),
        max_conns: config.transport.max_tcp_connections,
        retry_after: config.cluster.retry_after,
        relayed: Mutex::new(HashMap::new()),
    });
    shared
        .state
        .set_sip_relay(Arc::new(TransportRelay(Arc::downgrade(&shared))));
    shared
        .state
        .set_call_control(Arc::new(crate::calls::CallControlHook(Arc::downgrade(
            &shared,
        ))));
    let mut tasks = Vec::new();
    for _ in 0..config.transport.udp_workers {
        tasks.push(tokio::spawn(udp_worker(shared.clone())));
    }
    tasks.push(tokio::spawn(tcp_acceptor(shared.clone(), tcp)));
    if let Some(TlsListener { listener, tls }) = tls {
        tasks.push(tokio::spawn(crate::tls::SipTls::watch(
            tls.store.clone(),
            tls.cert_path.clone(),
            tls.key_path.clone(),
            tls.reload_every,
        )));
        tasks.push(tokio::spawn(tls_acceptor(shared.clone(), listener, tls)));
    }
    tasks.push(tokio::spawn(timer_task(shared)));
    tasks
}

async fn udp_worker(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match shared.udp.recv_from(&mut buf).await {
            Ok((n, src)) => {
                on_bytes(&shared, &buf[..n], src, Link::Udp);
            }
            // ICMP port unreachable from an earlier send shows up here on Linux: ignore.
            Err(e) => tracing::trace!(error = %e, "udp recv"),
        }
    }
}

/// Sends bytes toward a destination without blocking the caller.
pub(crate) fn send(shared: &Arc<Shared>, dest: Dest, bytes: Bytes) {
    match dest {
        Dest::Udp(addr) => match shared.udp.try_send_to(&bytes, addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let udp = shared.udp.clone();
                tokio::spawn(async move {
                    let _ = udp.send_to(&bytes, addr).await;
                });
            }
            Err(e) => tracing::debug!(%addr, error = %e, "udp send failed"),
        },
        Dest::Peer(node, phone, _) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                let failed = match shared.state.relay(node, phone, bytes.to_vec(), false).await {
                    Ok(true) => return,
                    Ok(false) => {
                        tracing::warn!(node, %phone, "the phone's connection is gone from its node");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(node, %phone, error = %e, "cannot relay through the phone's node");
                        true
                    }
                };
                if failed {
                    transport_error(&shared, dest, &bytes);
                }
            });
        }
        Dest::Conn(id, peer, transport) => {
            // The connection by id, else the one held to the peer now. Each lock in its
            // own statement: a guard living on into the fallback would lock `conns`
            // twice on one thread (deadlock).
            let by_id = lock(&shared.conns).get(&id).cloned();
            let tx = by_id.or_else(|| {
                let id = lock(&shared.conn_by_peer).get(&peer).copied()?;
                lock(&shared.conns).get(&id).cloned()
            });
            match tx {
                Some(tx) => {
                    if tx.try_send(bytes).is_err() {
                        tracing::debug!(%peer, "connection backlog full or closed: dropped");
                    }
                }
                // §18.2.2 / RFC 3263 §4.3: no connection to the peer; open one (a phone's
                // TLS connection excepted, see `connect`).
                None => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match connect(&shared, peer, transport).await {
                            Ok(tx) => {
                                let _ = tx.try_send(bytes);
                            }
                            Err(reason) => {
                                tracing::info!(%peer, transport = transport.as_str(), %reason, "cannot connect");
                                transport_error(&shared, dest, &bytes);
                            }
                        }
                    });
                }
            }
        }
    }
}

/// How long opening a connection (and its TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a connection to `peer`. Over TLS only to servers located by RFC 3263 (their
/// SIP domain, which the certificate must name, was recorded then): a phone's TLS
/// connection cannot be reopened from here (no name to check, usually behind NAT); the
/// phone reconnects when it next registers.
async fn connect(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    transport: Transport,
) -> Result<mpsc::Sender<Bytes>, String> {
    let server_name = match transport {
        Transport::Tls => {
            let name = lock(&shared.tls_names).get(&peer).cloned();
            let (Some(name), Some(_)) = (name, &shared.tls_client) else {
                return Err("a phone's TLS connection is gone".into());
            };
            Some(
                rustls_pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| format!("{name}: {e}"))?,
            )
        }
        _ => None,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    match (server_name, &shared.tls_client) {
        (Some(name), Some(client)) => {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, client.connect(name, stream))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS: {e}"))?;
            tracing::debug!(%peer, "tls connection opened");
            Ok(start_connection(shared, stream, peer, Transport::Tls))
        }
        _ => Ok(start_connection(shared, stream, peer, Transport::Tcp)),
    }
}

/// A request that could not be sent tells its call (RFC 3263 §4.3: like a 503, the
/// next server is tried at once).
fn transport_error(shared: &Arc<Shared>, dest: Dest, bytes: &[u8]) {
    let Ok(msg) = parse_stream_message(bytes, &shared.limits) else {
        return;
    };
    if !msg.is_request() {
        return;
    }
    let call = msg
        .header(&pbx_sip_msg::HeaderName::CallId)
        .and_then(|id| shared.calls.route(id));
    if let Some(call) = call {
        let _ = call.send(CallInput::TransportError(dest));
    }
}

fn reply_destination(source: SocketAddr, link: Link, via_transport: Option<&str>) -> Dest {
    match link {
        Link::Conn(id, transport) => Dest::Conn(id, source, transport),
        Link::Peer(node) => Dest::Peer(
            node,
            source,
            match via_transport {
                Some(t) if t.eq_ignore_ascii_case("TLS") => Transport::Tls,
                _ => Transport::Tcp,
            },
        ),
        Link::Udp => Dest::Udp(source),
    }
}

/// Handles one message: a whole datagram, or one framed message of a stream. Returns
/// false when a stream delivered something so broken it cannot be answered: the stream is
/// out of step and the connection should be closed.
fn on_bytes(shared: &Arc<Shared>, data: &[u8], source: SocketAddr, link: Link) -> bool {
    if link == Link::Udp && data.iter().all(|b| b.is_ascii_whitespace()) {
        return true; // UDP keep-alive (CRLF), nothing to answer
    }
    let parsed = if link != Link::Udp {
        parse_stream_message(data, &shared.limits)
    } else {
        parse_datagram(data, &shared.limits)
    };
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => return answer_unparseable(shared, &e, source, link),
    };
    if let Link::Conn(..) = link {
        if relay_to_call_owner(shared, &msg, data, source) {
            return true;
        }
    }
    if !msg.is_request() {
        // Responses belong to a call's client transactions, found by Call-ID.
        let routed = CoreHeaders::extract(&msg)
            .ok()
            .and_then(|core| Some((shared.calls.route(&core.call_id)?, core)));
        match routed {
            Some((call, core)) => {
                let _ = call.send(CallInput::Response { msg, core });
            }
            None => {
                tracing::trace!(%source, status = ?msg.status(), "response without transaction dropped")
            }
        }
        return true;
    }
    let core = match CoreHeaders::extract(&msg) {
        Ok(c) => c,
        Err(e) => {
            let status = e.status().unwrap_or(400);
            if let Some(b) = reply_to_unparseable(&msg.headers, status, e.reason(), source, "pbxd")
            {
                send(
                    shared,
                    reply_destination(source, link, None),
                    Bytes::from(b),
                );
            }
            return true;
        }
    };
    let span = tracing::debug_span!("sip", node = shared.node_id, call_id = %core.call_id);
    let _g = span.enter();
    on_request(shared, msg, core, source, link);
    true
}

/// A phone's message of a call another node runs: handed to that node.
fn relay_to_call_owner(
    shared: &Arc<Shared>,
    msg: &SipMessage,
    data: &[u8],
    source: SocketAddr,
) -> bool {
    let Some(call_id) = msg.header(&pbx_sip_msg::HeaderName::CallId) else {
        return false;
    };
    let node = {
        let mut relayed = lock(&shared.relayed);
        let Some(entry) = relayed.get_mut(call_id) else {
            return false;
        };
        entry.1 = Instant::now();
        entry.0
    };
    let cluster = shared.state.clone();
    let bytes = data.to_vec();
    tokio::spawn(async move {
        match cluster.relay(node, source, bytes, true).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(node, %source, "call owner did not take the relayed message")
            }
            Err(e) => tracing::warn!(node, %source, error = %e, "cannot relay to the call's node"),
        }
    });
    true
}

/// Answers what can be answered; false when nothing could be (no Via to reply to).
fn answer_unparseable(shared: &Arc<Shared>, e: &SipError, source: SocketAddr, link: Link) -> bool {
    tracing::debug!(%source, error = %e, "unparseable message");
    let (
        Some(status),
        SipError::Malformed {
            partial, reason, ..
        },
    ) = (e.status(), e)
    else {
        return false;
    };
    let headers = partial
        .as_ref()
        .map(|p| p.headers.as_slice())
        .unwrap_or(&[]);
    match reply_to_unparseable(headers, status, reason, source, "pbxd") {
        Some(b) => {
            send(
                shared,
                reply_destination(source, link, None),
                Bytes::from(b),
            );
            true
        }
        None => false,
    }
}

fn on_request(
    shared: &Arc<Shared>,
    msg: SipMessage,
    core: CoreHeaders,
    source: SocketAddr,
    link: Link,
) {
    let reliable = link != Link::Udp;
    let method = msg.method().cloned().unwrap_or(Method::Ack);
    let dest = match link {
        Link::Udp => Dest::Udp(response_target(&core.vias[0], source, false)),
        other => reply_destination(source, other, Some(&core.vias[0].transport)),
    };
    let key = TransactionKey::for_request(&method, msg.request_uri().unwrap_or(""), &core);
    let now = Instant::now();
    match lock(&shared.table).on_request(now, &key, &method) {
        RequestDisposition::New => {}
        RequestDisposition::Retransmission(Some(b)) => return send(shared, dest, b),
        RequestDisposition::Retransmission(None) | RequestDisposition::AckAbsorbed => return,
    }
    if let Some(call) = shared.calls.route(&core.call_id) {
        // A request of a call's dialogs (or a CANCEL of its INVITE).
        if method != Method::Ack {
            lock(&shared.table).create(key.clone(), &method, reliable, dest);
        }
        let _ = call.send(CallInput::Request {
            msg,
            core,
            key,
            source,
        });
        return;
    }
    let transport = match dest {
        Dest::Udp(_) => Transport::Udp,
        Dest::Conn(_, _, t) | Dest::Peer(_, _, t) => t,
    };
    let now_ms = unix_ms();
    let outcome = {
        let state = shared.state.read();
        shared.handler.handle(
            Inbound {
                msg: &msg,
                core: &core,
                source,
                transport,
            },
            &state,
            now_ms,
        )
    };
    match outcome {
        Outcome::Drop => {}
        Outcome::Call { caller } => {
            lock(&shared.table).create(key.clone(), &method, reliable, dest);
            start_call(shared, msg, core, key, source, dest, caller);
        }
        Outcome::Reply {
            bytes,
            stateful: false,
            ..
        } => send(shared, dest, Bytes::from(bytes)),
        Outcome::Reply {
            status,
            bytes,
            stateful: true,
        } => {
            let out = {
                let mut table = lock(&shared.table);
                table.create(key.clone(), &method, reliable, dest);
                table.respond(now, &key, status, Bytes::from(bytes))
            };
            if let Ok(b) = out {
                send(shared, dest, b);
            }
            shared.timer_wake.notify_one();
        }
        Outcome::Commit { command, pending } => {
            // The transaction absorbs retransmissions while the command commits.
            lock(&shared.table).create(key.clone(), &method, reliable, dest);
            let shared = shared.clone();
            let span = tracing::Span::current();
            tokio::spawn(
                async move {
                    let (status, bytes) = match shared.state.propose(*command).await {
                        Ok(resp) => shared.handler.finish_register(pending, resp, unix_ms()),
                        Err(e) => {
                            tracing::warn!(error = %e, "not committed: 503");
                            shared.handler.unavailable(pending, shared.retry_after)
                        }
                    };
                    let out = lock(&shared.table).respond(
                        Instant::now(),
                        &key,
                        status,
                        Bytes::from(bytes),
                    );
                    if let Ok(b) = out {
                        send(&shared, dest, b);
                    }
                }
                .instrument(span),
            );
        }
    }
}

async fn timer_task(shared: Arc<Shared>) {
    let mut events = Vec::new();
    let mut pruned = Instant::now();
    loop {
        let now = Instant::now();
        if now.duration_since(pruned) > Duration::from_secs(60) {
            pruned = now;
            lock(&shared.relayed)
                .retain(|_, (_, used)| now.duration_since(*used) < RELAYED_CALL_IDLE);
        }
        // J/L timers are long; a one-second cap keeps the table tidy without being woken
        // by every response. INVITE responses wake us for Timer G.
        let deadline = lock(&shared.table)
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1))
            .min(now + Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shared.timer_wake.notified() => continue,
        }
        lock(&shared.table).handle_timeout(Instant::now(), &mut events);
        for e in events.drain(..) {
            match e {
                TableEvent::Retransmit(dest, b) => send(&shared, dest, b),
                TableEvent::TimedOut(key) => {
                    tracing::debug!(key = key.as_str(), "no ACK for final response (Timer H)")
                }
            }
        }
    }
}

/// Accepts connections on `listener` while the node is under its connection limit and
/// hands each (no delay set) to `start`.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    transport: Transport,
    start: impl Fn(&Arc<Shared>, TcpStream, SocketAddr),
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if shared.open_conns.load(Ordering::Relaxed) >= shared.max_conns {
                    tracing::warn!(%peer, transport = transport.as_str(), "too many connections: refused");
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                start(&shared, stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn tcp_acceptor(shared: Arc<Shared>, listener: TcpListener) {
    accept_loop(shared, listener, Transport::Tcp, |shared, stream, peer| {
        start_connection(shared, stream, peer, Transport::Tcp);
    })
    .await
}

/// TLS connections: the handshake runs in the connection's own task, so a slow or
/// silent client holds up nobody else.
async fn tls_acceptor(shared: Arc<Shared>, listener: TcpListener, tls: crate::tls::SipTls) {
    accept_loop(shared, listener, Transport::Tls, move |shared, stream, peer| {
        let acceptor = tls.acceptor.clone();
        let timeout = tls.handshake_timeout;
        let shared = shared.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let (_, conn) = stream.get_ref();
                    tracing::debug!(%peer, version = ?conn.protocol_version(), "tls connection");
                    start_connection(&shared, stream, peer, Transport::Tls);
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "tls handshake failed"),
                Err(_) => tracing::info!(%peer, "tls handshake timed out"),
            }
        });
    })
    .await
}

/// Registers a connection (TCP or TLS) and starts its reader and writer; returns its
/// send queue.
fn start_connection<S>(
    shared: &Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
) -> mpsc::Sender<Bytes>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    lock(&shared.conns).insert(id, tx.clone());
    lock(&shared.conn_by_peer).insert(peer, id);
    shared.open_conns.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let shared = shared.clone();
    let pong_tx = tx.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8192);
        'conn: loop {
            let read = tokio::time::timeout(shared.tcp_idle, rd.read_buf(&mut buf)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::debug!(%peer, "tcp idle timeout");
                    break;
                }
                Ok(Ok(_)) => {}
            }
            loop {
                match frame_stream(&buf, &shared.limits) {
                    Ok(StreamFrame::Incomplete) => break,
                    Ok(StreamFrame::Ping(n)) => {
                        let _ = buf.split_to(n);
                        // RFC 5626 §4.4.1: CRLFCRLF ping, CRLF pong.
                        let _ = pong_tx.try_send(Bytes::from_static(b"\r\n"));
                    }
                    Ok(StreamFrame::Skip(n)) => {
                        let _ = buf.split_to(n);
                    }
                    Ok(StreamFrame::Message(n)) => {
                        let msg = buf.split_to(n);
                        if !on_bytes(&shared, &msg, peer, Link::Conn(id, transport)) {
                            tracing::debug!(%peer, "unanswerable message on a stream: closing");
                            break 'conn;
                        }
                    }
                    Err(e) => {
                        // Content-Length cannot be trusted: the stream cannot be
                        // resynchronised (RFC 4475 ncl/mcl01). Close it.
                        tracing::debug!(%peer, error = %e, "tcp framing error: closing");
                        break 'conn;
                    }
                }
            }
        }
        lock(&shared.conns).remove(&id);
        {
            let mut by_peer = lock(&shared.conn_by_peer);
            if by_peer.get(&peer) == Some(&id) {
                by_peer.remove(&peer);
            }
        }
        shared.open_conns.fetch_sub(1, Ordering::Relaxed);
    });
    tx
}
