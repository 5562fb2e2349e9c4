//! The peer link, client side: one pooled gRPC channel per peer (created lazily,
//! reconnected by tonic), every request stamped with our identity and a deadline and
//! passed through the cluster's [`LinkFaults`]; openraft's `RaftNetwork` on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError as OpenraftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;

use pbx_proto::peer::peer_link_client::PeerLinkClient;
use pbx_proto::peer::{
    ForwardReply, ForwardRequest, HandshakeReply, HandshakeRequest, PingRequest, RaftPayload,
};
use pbx_raft::TypeConfig;

use crate::faults::{FaultyChannel, LinkFaults};
use crate::{Member, NodeId, PeerError, PROTOCOL_VERSION};

/// Metadata keys carrying the sender's identity on every peer request.
pub const MD_CLUSTER: &str = "x-pbx-cluster";
pub const MD_PROTOCOL: &str = "x-pbx-protocol";
pub const MD_NODE: &str = "x-pbx-node";

/// Largest peer-link message (a batch of log entries or a snapshot chunk).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Who we are on the peer link.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: NodeId,
}

/// Adds our identity to every outgoing request.
#[derive(Clone)]
pub struct IdentityInterceptor {
    cluster: MetadataValue<tonic::metadata::Ascii>,
    node: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(MD_CLUSTER, self.cluster.clone());
        md.insert(MD_PROTOCOL, MetadataValue::from(PROTOCOL_VERSION));
        md.insert(MD_NODE, self.node.clone());
        Ok(req)
    }
}

pub type PeerClient = PeerLinkClient<InterceptedService<FaultyChannel, IdentityInterceptor>>;

/// One channel per peer, shared by Raft replication and write forwarding.
#[derive(Clone)]
pub struct PeerPool {
    identity: Identity,
    /// Source address of outgoing peer connections: the node's own peer IP, so peers
    /// (and firewalls) see where a connection really comes from.
    local_ip: Option<std::net::IpAddr>,
    interceptor: IdentityInterceptor,
    connect_timeout: Duration,
    request_timeout: Duration,
    faults: LinkFaults,
    channels: Arc<Mutex<HashMap<NodeId, (String, PeerClient)>>>,
    /// The runtime the channels' connection tasks run on: the peer link's own (see
    /// `Cluster::start_on`), whichever runtime first asks for a client.
    runtime: tokio::runtime::Handle,
}

impl PeerPool {
    pub fn new(
        identity: Identity,
        local_ip: Option<std::net::IpAddr>,
        connect_timeout: Duration,
        request_timeout: Duration,
        faults: LinkFaults,
    ) -> Result<PeerPool, PeerError> {
        let ascii = |s: String| {
            s.parse::<MetadataValue<tonic::metadata::Ascii>>()
                .map_err(|_| PeerError::Config(format!("cluster id {s:?} is not ASCII")))
        };
        let interceptor = IdentityInterceptor {
            cluster: ascii(identity.cluster_id.clone())?,
            node: ascii(identity.node_id.to_string())?,
        };
        Ok(PeerPool {
            identity,
            local_ip,
            interceptor,
            connect_timeout,
            request_timeout,
            faults,
            channels: Arc::new(Mutex::new(HashMap::new())),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The client for a peer at `addr`; the channel is created on first use and kept
    /// (tonic reconnects it), replaced only when the peer's address changes.
    pub fn client(&self, id: NodeId, addr: &str) -> Result<PeerClient, PeerError> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = map.get(&id) {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PeerError::Config(format!("peer address {addr:?}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .local_address(self.local_ip)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = FaultyChannel::new(
            {
                let _on = self.runtime.enter();
                endpoint.connect_lazy()
            },
            self.faults.clone(),
            self.identity.node_id,
            id,
        );
        let client = PeerLinkClient::with_interceptor(channel, self.interceptor.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        map.insert(id, (addr.to_string(), client.clone()));
        Ok(client)
    }

    /// Asks a peer who it is; refuses (with a clear error) a peer of another cluster or
    /// protocol version.
    pub async fn handshake(&self, id: NodeId, addr: &str) -> Result<HandshakeReply, PeerError> {
        let mut client = self.client(id, addr)?;
        let mut req = tonic::Request::new(HandshakeRequest {
            cluster_id: self.identity.cluster_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            node_id: self.identity.node_id,
        });
        req.set_timeout(self.request_timeout);
        let reply = client
            .handshake(req)
            .await
            .map_err(|s| PeerError::from_status(id, s))?
            .into_inner();
        if reply.cluster_id != self.identity.cluster_id {
            return Err(PeerError::Transport(format!(
                "node at {addr} belongs to cluster {:?}, not ours ({:?})",
                reply.cluster_id, self.identity.cluster_id
            )));
        }
        if reply.protocol_version != PROTOCOL_VERSION {
            return Err(PeerError::Transport(format!(
                "node at {addr} speaks peer protocol {}, we speak {PROTOCOL_VERSION}",
                reply.protocol_version
            )));
        }
        if reply.node_id != id {
            return Err(PeerError::Transport(format!(
                "node at {addr} is node {}, expected node {id}",
                reply.node_id
            )));
        }
        Ok(reply)
    }

    /// The liveness probe ([`crate::liveness`]): the node's last log index.
    pub async fn ping(&self, id: NodeId, addr: &str, timeout: Duration) -> Result<u64, PeerError> {
        let mut client = self
            .client(id, addr)
            .map_err(|e| PeerError::Unreachable(e.to_string()))?;
        let mut req = tonic::Request::new(PingRequest {});
        req.set_timeout(timeout);
        let reply = client
            .ping(req)
            .await
            .map_err(|s| PeerError::from_status(id, s))?;
        let reply = reply.into_inner();
        if reply.node_id != id {
            // Something lives there, just not that node: not "gone" (a fast Transport
            // error would count as a refusal).
            return Err(PeerError::Refused(format!("another node answers for {id}")));
        }
        Ok(reply.last_log_index)
    }

    /// Hands an encoded command to the leader. [`PeerError::Unreachable`] means the
    /// request never reached it (connection refused or lost before sending); any other
    /// failure leaves the outcome unknown.
    pub async fn forward(
        &self,
        id: NodeId,
        addr: &str,
        command: Vec<u8>,
        timeout: Duration,
    ) -> Result<ForwardReply, PeerError> {
        let mut client = self
            .client(id, addr)
            .map_err(|e| PeerError::Unreachable(e.to_string()))?;
        let mut req = tonic::Request::new(ForwardRequest { command });
        req.set_timeout(timeout);
        client
            .forward(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| PeerError::from_status(id, s))
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerPool {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConnection {
        PeerConnection {
            target,
            client: self.client(target, &node.peer_addr),
        }
    }
}

/// openraft's view of the link to one peer.
pub struct PeerConnection {
    target: NodeId,
    client: Result<PeerClient, PeerError>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, Member, OpenraftError<NodeId, E>>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        rpc: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.to_string())))),
        };
        let payload =
            bincode::serialize(rpc).map_err(|e| RPCError::Network(NetworkError::new(&*e)))?;
        let mut req = tonic::Request::new(RaftPayload { payload });
        req.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(req).await,
            RpcKind::Vote => client.vote(req).await,
            RpcKind::Snapshot => client.install_snapshot(req).await,
        };
        let reply = reply.map_err(|s| status_to_rpc_error(self.target, s))?;
        let res: Result<Resp, OpenraftError<NodeId, E>> =
            bincode::deserialize(&reply.into_inner().payload)
                .map_err(|e| RPCError::Network(NetworkError::new(&*e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

/// A plain error message as an `std::error::Error`.
#[derive(Debug)]
struct Msg(String);

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Msg {}

/// A peer that cannot be reached (or refuses us) makes openraft back off; any other
/// failure is retried.
fn status_to_rpc_error<E: std::error::Error>(
    target: NodeId,
    s: tonic::Status,
) -> RPCError<NodeId, Member, OpenraftError<NodeId, E>> {
    let e = PeerError::from_status(target, s);
    let msg = Msg(e.to_string());
    match e {
        PeerError::Refused(reason) => {
            tracing::error!(target_node = target, %reason, "peer refused us");
            RPCError::Unreachable(Unreachable::new(&msg))
        }
        PeerError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&msg)),
        _ => RPCError::Network(NetworkError::new(&msg)),
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}
