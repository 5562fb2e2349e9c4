//! SIP over UDP, TCP and TLS: sockets, connections and TLS, nothing else. Every message
//! read is handed to the [`Inbox`] (the driver of the node's SIP endpoint), and [`Io`]
//! sends what it is given; what the messages mean is not this module's business.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pbx_endpoint::{Dest, Link};
use pbx_peer::Cluster;
use pbx_sip_msg::{frame_stream, Limits, StreamFrame};
use pbx_state::Transport;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::config::{Config, TransportSection};
use crate::NodeError;
use pbx_endpoint::lock;

/// Where the messages read go.
pub(crate) trait Inbox: Send + Sync {
    /// One message: a whole datagram, or one framed message of a stream. False when a
    /// stream delivered something so broken it cannot be answered: the stream is out
    /// of step and the connection is closed.
    fn on_message(&self, data: &[u8], source: SocketAddr, link: Link) -> bool;
    /// `bytes` could not be sent to `dest` (no connection, TLS failed, the phone's node
    /// could not relay them).
    fn on_send_failed(&self, dest: Dest, bytes: &[u8]);
    /// Whether the UDP socket had a datagram waiting (`true`) or was found empty: how
    /// long it stays non-empty is the node's receive backlog (overload control).
    fn on_udp_queue(&self, waiting: bool);
}

/// The node's SIP sockets, bound before anything else starts.
pub struct Listeners {
    /// SIP over UDP; TCP listens on the same address.
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    /// SIP over TLS; needed when `[tls]` names a certificate, unused otherwise.
    pub tls: Option<TcpListener>,
    /// The admin API (gRPC); the API is served when a token is configured and this is
    /// bound.
    pub admin: Option<std::net::TcpListener>,
    /// The peer link (Raft and the other node-to-node RPCs).
    pub peer: std::net::TcpListener,
    /// Metrics and health endpoints (HTTP), when `[metrics] listen` is set.
    pub metrics: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds what `config` asks for: UDP and TCP on the SIP address (port 0: a port
    /// free for both), TLS when a certificate is configured, the admin API when a token
    /// is. Inside a Tokio runtime.
    pub fn bind(config: &Config) -> Result<Listeners, NodeError> {
        let (udp, tcp) = bind(config.node.sip_addr, &config.transport)?;
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(_), Some(_)) => Some(bind_tls(config.tls_addr())?),
            _ => None,
        };
        let admin = match config.admin_token()? {
            Some(_) => {
                let want = config.admin_addr();
                let listener = std::net::TcpListener::bind(want)
                    .map_err(|source| NodeError::Bind { addr: want, source })?;
                Some(listener)
            }
            None => None,
        };
        let want = config.peer_addr();
        let peer = std::net::TcpListener::bind(want)
            .map_err(|source| NodeError::Bind { addr: want, source })?;
        let metrics = match config.metrics.listen {
            Some(want) => Some(
                std::net::TcpListener::bind(want)
                    .map_err(|source| NodeError::Bind { addr: want, source })?,
            ),
            None => None,
        };
        Ok(Listeners {
            udp,
            tcp,
            tls,
            admin,
            peer,
            metrics,
        })
    }
}

/// Binds UDP and TCP on the same address. Port 0 picks a port free for both.
fn bind(addr: SocketAddr, cfg: &TransportSection) -> Result<(UdpSocket, TcpListener), NodeError> {
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

/// Binds the TLS listener (TCP) on `addr`.
fn bind_tls(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    let err = |source| NodeError::Bind { addr, source };
    let tcp =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    tcp.set_reuse_address(true).map_err(err)?;
    tcp.set_nonblocking(true).map_err(err)?;
    tcp.bind(&addr.into()).map_err(err)?;
    tcp.listen(1024).map_err(err)?;
    TcpListener::from_std(tcp.into()).map_err(err)
}

/// The node's SIP sockets and connections, and what sends on them.
pub(crate) struct Io {
    udp: Arc<UdpSocket>,
    /// The SIP address (UDP and TCP) of this node.
    pub(crate) local_addr: SocketAddr,
    /// Where SIP over TLS listens, if it does.
    pub(crate) tls_addr: Option<SocketAddr>,
    /// Connects to servers this node calls over TLS (None: no CA roots).
    tls_client: Option<tokio_rustls::TlsConnector>,
    /// The SIP domain each TLS server located by RFC 3263 must prove (RFC 5922).
    tls_names: Mutex<HashMap<SocketAddr, String>>,
    /// For phones whose connection another node holds (Relay RPC).
    cluster: Cluster,
    /// Where the messages of connections this node opens go (set once, at start).
    inbox: OnceLock<Weak<dyn Inbox>>,
    conns: Mutex<HashMap<u64, Conn>>,
    conn_by_peer: Mutex<HashMap<SocketAddr, u64>>,
    open_conns: AtomicUsize,
    /// Open connections by transport: TCP, TLS (metrics).
    open_by_transport: [AtomicUsize; 2],
    next_conn: AtomicU64,
    limits: Limits,
    tcp_idle: Duration,
    max_conns: usize,
    /// What was sent, counted (metrics).
    counts: Arc<crate::metrics::NodeCounts>,
    /// Connections closed because their peer stopped reading (metrics).
    overflowed: AtomicU64,
}

/// Messages a connection may have waiting to be written. A peer that leaves this many
/// unread has stopped reading: the connection is closed (see [`Io::queue_on`]).
const CONN_QUEUE: usize = 1024;

/// What sends on one connection: its queue, and the switch that closes it.
#[derive(Clone)]
pub(crate) struct Conn {
    tx: mpsc::Sender<Bytes>,
    close: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Io {
    pub(crate) fn new(
        udp: UdpSocket,
        tls_addr: Option<SocketAddr>,
        tls_client: Option<tokio_rustls::TlsConnector>,
        cluster: Cluster,
        config: &Config,
        counts: Arc<crate::metrics::NodeCounts>,
    ) -> Io {
        Io {
            local_addr: udp.local_addr().unwrap_or(config.node.sip_addr),
            udp: Arc::new(udp),
            tls_addr,
            tls_client,
            tls_names: Mutex::new(HashMap::new()),
            cluster,
            inbox: OnceLock::new(),
            conns: Mutex::new(HashMap::new()),
            conn_by_peer: Mutex::new(HashMap::new()),
            open_conns: AtomicUsize::new(0),
            open_by_transport: [AtomicUsize::new(0), AtomicUsize::new(0)],
            next_conn: AtomicU64::new(1),
            limits: limits(config),
            tcp_idle: Duration::from_secs(config.transport.tcp_idle_timeout),
            max_conns: config.transport.max_tcp_connections,
            counts,
            overflowed: AtomicU64::new(0),
        }
    }

    /// Starts reading: `workers` UDP readers, the TCP and TLS acceptors. Messages go
    /// to `inbox`.
    pub(crate) fn serve(
        self: &Arc<Self>,
        inbox: Arc<dyn Inbox>,
        tcp: TcpListener,
        tls: Option<(TcpListener, crate::tls::SipTls)>,
        workers: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.inbox.set(Arc::downgrade(&inbox));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            tasks.push(tokio::spawn(udp_worker(self.udp.clone(), inbox.clone())));
        }
        tasks.push(tokio::spawn(tcp_acceptor(self.clone(), inbox.clone(), tcp)));
        if let Some((listener, tls)) = tls {
            tasks.push(tokio::spawn(crate::tls::SipTls::watch(
                tls.store.clone(),
                tls.cert_path.clone(),
                tls.key_path.clone(),
                tls.reload_every,
            )));
            tasks.push(tokio::spawn(tls_acceptor(
                self.clone(),
                inbox,
                listener,
                tls,
            )));
        }
        tasks
    }

    /// Open SIP connections: (TCP, TLS).
    pub(crate) fn open_connections(&self) -> (usize, usize) {
        (
            self.open_by_transport[0].load(Ordering::Relaxed),
            self.open_by_transport[1].load(Ordering::Relaxed),
        )
    }

    /// Whether this node can call servers over TLS (it has CA roots).
    pub(crate) fn tls_client(&self) -> bool {
        self.tls_client.is_some()
    }

    /// A TLS server at `addr` must prove the SIP domain `name` (RFC 5922 §4.1).
    pub(crate) fn expect_tls_name(&self, addr: SocketAddr, name: &str) {
        lock(&self.tls_names).insert(addr, name.to_string());
    }

    /// The connection held to `peer`, if any.
    pub(crate) fn connection_to(&self, peer: SocketAddr) -> Option<Conn> {
        let id = lock(&self.conn_by_peer).get(&peer).copied()?;
        lock(&self.conns).get(&id).cloned()
    }

    /// Queues `bytes` on `conn`; false when they will not be written. Over a reliable
    /// transport nothing retransmits a dropped message (a response to a non-INVITE is
    /// sent once), so a peer that has left [`CONN_QUEUE`] messages unread is not sent
    /// less but disconnected: its connection is closed and counted, and a phone
    /// reconnects and registers again (RFC 5626 §4.4). The caller reports the failure.
    pub(crate) fn queue_on(&self, conn: &Conn, peer: SocketAddr, bytes: Bytes) -> bool {
        match conn.tx.try_send(bytes) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !conn.close.send_replace(true) {
                    self.overflowed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, queued = CONN_QUEUE, "connection not read by its peer: closed");
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Connections closed because their peer stopped reading (see [`Io::queue_on`]).
    pub(crate) fn overflowed_connections(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    fn send_failed(&self, dest: Dest, bytes: &[u8]) {
        if let Some(inbox) = self.inbox.get().and_then(Weak::upgrade) {
            inbox.on_send_failed(dest, bytes);
        }
    }

    /// Sends bytes toward a destination without blocking the caller.
    pub(crate) fn send(self: &Arc<Self>, dest: Dest, bytes: Bytes) {
        self.counts.sip.sent(&bytes);
        match dest {
            Dest::Udp(addr) => match self.udp.try_send_to(&bytes, addr) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let udp = self.udp.clone();
                    tokio::spawn(async move {
                        let _ = udp.send_to(&bytes, addr).await;
                    });
                }
                Err(e) => tracing::debug!(%addr, error = %e, "udp send failed"),
            },
            Dest::Peer(node, phone, _) => {
                let io = self.clone();
                tokio::spawn(async move {
                    match io.cluster.relay(node, phone, bytes.to_vec(), false).await {
                        Ok(true) => return,
                        Ok(false) => {
                            tracing::warn!(node, %phone, "the phone's connection is gone from its node");
                        }
                        Err(e) => {
                            tracing::warn!(node, %phone, error = %e, "cannot relay through the phone's node");
                        }
                    }
                    io.send_failed(dest, &bytes);
                });
            }
            Dest::Conn(id, peer, transport) => {
                // The connection by id, else the one held to the peer now. Each lock in
                // its own statement: a guard living on into the fallback would lock
                // `conns` twice on one thread (deadlock).
                let by_id = lock(&self.conns).get(&id).cloned();
                match by_id.or_else(|| self.connection_to(peer)) {
                    Some(conn) => {
                        if !self.queue_on(&conn, peer, bytes.clone()) {
                            self.send_failed(dest, &bytes);
                        }
                    }
                    // §18.2.2 / RFC 3263 §4.3: no connection to the peer; open one (a
                    // phone's TLS connection excepted, see `connect`).
                    None => {
                        let io = self.clone();
                        tokio::spawn(async move {
                            match io.connect(peer, transport).await {
                                Ok(conn) => {
                                    if !io.queue_on(&conn, peer, bytes.clone()) {
                                        io.send_failed(dest, &bytes);
                                    }
                                }
                                Err(reason) => {
                                    tracing::info!(%peer, transport = transport.as_str(), %reason, "cannot connect");
                                    io.send_failed(dest, &bytes);
                                }
                            }
                        });
                    }
                }
            }
        }
    }

    /// Opens a connection to `peer`. Over TLS only to servers located by RFC 3263 (their
    /// SIP domain, which the certificate must name, was recorded then): a phone's TLS
    /// connection cannot be reopened from here (no name to check, usually behind NAT);
    /// the phone reconnects when it next registers.
    async fn connect(
        self: &Arc<Self>,
        peer: SocketAddr,
        transport: Transport,
    ) -> Result<Conn, String> {
        let inbox = self
            .inbox
            .get()
            .and_then(Weak::upgrade)
            .ok_or("the node is stopping")?;
        let server_name = match transport {
            Transport::Tls => {
                let name = lock(&self.tls_names).get(&peer).cloned();
                let (Some(name), Some(_)) = (name, &self.tls_client) else {
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
        match (server_name, &self.tls_client) {
            (Some(name), Some(client)) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, client.connect(name, stream))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS: {e}"))?;
                tracing::debug!(%peer, "tls connection opened");
                Ok(start_connection(self, inbox, stream, peer, Transport::Tls))
            }
            _ => Ok(start_connection(self, inbox, stream, peer, Transport::Tcp)),
        }
    }
}

/// How long opening a connection (and its TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn udp_worker(udp: Arc<UdpSocket>, inbox: Arc<dyn Inbox>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match udp.try_recv_from(&mut buf) {
            Ok((n, src)) => {
                inbox.on_udp_queue(true);
                inbox.on_message(&buf[..n], src, Link::Udp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                inbox.on_udp_queue(false);
                if let Err(e) = udp.readable().await {
                    tracing::warn!(error = %e, "udp socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // ICMP port unreachable from an earlier send shows up here on Linux: ignore.
            Err(e) => tracing::trace!(error = %e, "udp recv"),
        }
    }
}

/// Accepts connections on `listener` while the node is under its connection limit and
/// hands each (no delay set) to `start`.
async fn accept_loop(
    io: Arc<Io>,
    listener: TcpListener,
    transport: Transport,
    start: impl Fn(&Arc<Io>, TcpStream, SocketAddr),
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if io.open_conns.load(Ordering::Relaxed) >= io.max_conns {
                    tracing::warn!(%peer, transport = transport.as_str(), "too many connections: refused");
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                start(&io, stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn tcp_acceptor(io: Arc<Io>, inbox: Arc<dyn Inbox>, listener: TcpListener) {
    accept_loop(io, listener, Transport::Tcp, |io, stream, peer| {
        start_connection(io, inbox.clone(), stream, peer, Transport::Tcp);
    })
    .await
}

/// TLS connections: the handshake runs in the connection's own task, so a slow or
/// silent client holds up nobody else.
async fn tls_acceptor(
    io: Arc<Io>,
    inbox: Arc<dyn Inbox>,
    listener: TcpListener,
    tls: crate::tls::SipTls,
) {
    accept_loop(io, listener, Transport::Tls, move |io, stream, peer| {
        let acceptor = tls.acceptor.clone();
        let timeout = tls.handshake_timeout;
        let io = io.clone();
        let inbox = inbox.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let (_, conn) = stream.get_ref();
                    tracing::debug!(%peer, version = ?conn.protocol_version(), "tls connection");
                    start_connection(&io, inbox, stream, peer, Transport::Tls);
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
    io: &Arc<Io>,
    inbox: Arc<dyn Inbox>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
) -> Conn
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let id = io.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(CONN_QUEUE);
    let (close, mut closed_w) = tokio::sync::watch::channel(false);
    let mut closed_r = close.subscribe();
    let conn = Conn {
        tx: tx.clone(),
        close: Arc::new(close),
    };
    lock(&io.conns).insert(id, conn.clone());
    lock(&io.conn_by_peer).insert(peer, id);
    io.open_conns.fetch_add(1, Ordering::Relaxed);
    let by_transport = usize::from(transport == Transport::Tls);
    io.open_by_transport[by_transport].fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    tokio::spawn(async move {
        let writes = async {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        // A close asked for (`Io::queue_on`) ends the writes at once, even one the peer
        // does not take; the switch merely dropped (the reader ended) leaves what is
        // queued, such as the answer before a framing error, to be written.
        tokio::select! {
            () = writes => {}
            Ok(_) = closed_w.wait_for(|c| *c) => {}
        }
    });
    let io = io.clone();
    let pong_tx = tx.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8192);
        'conn: loop {
            let read = tokio::select! {
                r = tokio::time::timeout(io.tcp_idle, rd.read_buf(&mut buf)) => r,
                Ok(_) = closed_r.wait_for(|c| *c) => break,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::debug!(%peer, "tcp idle timeout");
                    break;
                }
                Ok(Ok(_)) => {}
            }
            loop {
                match frame_stream(&buf, &io.limits) {
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
                        if !inbox.on_message(&msg, peer, Link::Conn(id, transport)) {
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
        lock(&io.conns).remove(&id);
        {
            let mut by_peer = lock(&io.conn_by_peer);
            if by_peer.get(&peer) == Some(&id) {
                by_peer.remove(&peer);
            }
        }
        io.open_conns.fetch_sub(1, Ordering::Relaxed);
        io.open_by_transport[by_transport].fetch_sub(1, Ordering::Relaxed);
    });
    conn
}

/// The parser's limits for this node's messages.
pub(crate) fn limits(config: &Config) -> Limits {
    Limits {
        max_message_len: config.transport.max_message_size,
        ..Limits::default()
    }
}
