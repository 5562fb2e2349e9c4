//! The peer link, server side: Raft RPCs into openraft, forwarded writes into the
//! leader's commit path, relay, call control, management, status. Every request must
//! carry our cluster id and protocol version; others are refused with
//! `FAILED_PRECONDITION` and a log line. Errors become a `tonic::Status` only through
//! [`PeerError`]'s conversion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rpc_counts::Rpc;
use pbx_state::Command;
use tonic::{Request, Response, Status};

use pbx_proto::common::NodeStatus;
use pbx_proto::peer::forward_reply::Result as ForwardResult;
use pbx_proto::peer::peer_link_server::{PeerLink, PeerLinkServer};
use pbx_proto::peer::{
    CallControlReply, CallControlRequest, ForwardReply, ForwardRequest, GetBlobReply,
    GetBlobRequest, HandshakeReply, HandshakeRequest, ManageRequest, NotLeader, PingReply,
    PingRequest, PutBlobReply, PutBlobRequest, RaftPayload, RelayReply, RelayRequest,
    StatusRequest,
};
use pbx_storage::BlobId;

use crate::cluster::{LeaderCommitError, Shared};
use crate::manage::ManageOp;
use crate::network::{MD_CLUSTER, MD_NODE, MD_PROTOCOL};
use crate::{PeerError, PROTOCOL_VERSION};

/// Logs at most once every few seconds, so a misbehaving peer cannot flood the log.
#[derive(Clone, Default)]
struct RateLimitedLog {
    last: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl RateLimitedLog {
    fn log(&self, emit: impl FnOnce()) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            emit();
        }
    }
}

/// Refuses requests from another cluster or protocol version.
#[derive(Clone)]
pub struct IdentityCheck {
    cluster_id: Arc<str>,
    refused_log: RateLimitedLog,
}

impl IdentityCheck {
    pub fn new(cluster_id: &str) -> Self {
        IdentityCheck {
            cluster_id: cluster_id.into(),
            refused_log: RateLimitedLog::default(),
        }
    }

    fn refuse(&self, reason: String) -> Status {
        self.refused_log
            .log(|| tracing::error!(%reason, "refused a peer-link request"));
        PeerError::Refused(reason).into()
    }

    /// Checks the identity a peer claims.
    pub fn check(&self, cluster: &str, protocol: u32, node: &str) -> Result<(), Status> {
        if cluster != &*self.cluster_id {
            return Err(self.refuse(format!(
                "node {node} belongs to cluster {cluster:?}, this node to {:?}",
                &*self.cluster_id
            )));
        }
        if protocol != PROTOCOL_VERSION {
            return Err(self.refuse(format!(
                "node {node} speaks peer protocol {protocol}, this node {PROTOCOL_VERSION}"
            )));
        }
        Ok(())
    }
}

impl IdentityCheck {
    /// Checks the identity in a request's metadata.
    fn request<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let md = req.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let protocol = get(MD_PROTOCOL).parse::<u32>().unwrap_or(0);
        self.check(get(MD_CLUSTER), protocol, get(MD_NODE))
    }
}

/// The PeerLink service of one node.
pub struct PeerService {
    shared: Arc<Shared>,
    check: IdentityCheck,
    abstain_log: RateLimitedLog,
}

impl PeerService {
    pub(crate) fn server(shared: Arc<Shared>) -> PeerLinkServer<PeerService> {
        let check = IdentityCheck::new(&shared.config.cluster_id);
        PeerLinkServer::new(PeerService {
            shared,
            check,
            abstain_log: RateLimitedLog::default(),
        })
        .max_decoding_message_size(crate::network::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::network::MAX_MESSAGE_BYTES)
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    bincode::deserialize(bytes).map_err(|e| PeerError::Invalid(format!("payload: {e}")).into())
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    bincode::serialize(v)
        .map(|payload| Response::new(RaftPayload { payload }))
        .map_err(|e| PeerError::Codec(e).into())
}

#[tonic::async_trait]
impl PeerLink for PeerService {
    async fn handshake(
        &self,
        request: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeReply>, Status> {
        let r: Result<Response<HandshakeReply>, Status> = async {
            let r = request.into_inner();
            self.check
                .check(&r.cluster_id, r.protocol_version, &r.node_id.to_string())?;
            tracing::debug!(peer = r.node_id, "handshake");
            Ok(Response::new(HandshakeReply {
                cluster_id: self.shared.config.cluster_id.clone(),
                protocol_version: PROTOCOL_VERSION,
                node_id: self.shared.config.node_id,
                initialized: self.shared.has_raft_state().await,
            }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::Handshake, &r);
        r
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let r: Result<Response<PingReply>, Status> = async {
            self.check.request(&request)?;
            Ok(Response::new(PingReply {
                node_id: self.shared.config.node_id,
                last_log_index: self.shared.last_log_index(),
            }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::Ping, &r);
        r
    }

    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let r: Result<Response<RaftPayload>, Status> = async {
            self.check.request(&request)?;
            let rpc = decode(&request.into_inner().payload)?;
            let res = self.shared.raft.append_entries(rpc).await;
            if res.is_ok() {
                self.shared.heard_from_leader();
            }
            encode(&res)
        }
        .await;
        self.shared.rpcs.tally(Rpc::AppendEntries, &r);
        r
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r: Result<Response<RaftPayload>, Status> = async {
            self.check.request(&request)?;
            let rpc: openraft::raft::VoteRequest<crate::NodeId> =
                decode(&request.into_inner().payload)?;
            if !self.shared.may_vote(rpc.last_log_id.map(|l| l.index)) {
                self.abstain_log.log(|| {
                    tracing::warn!(
                        candidate = rpc.vote.leader_id.node_id,
                        term = rpc.vote.leader_id.term,
                        "started without data: not voting until caught up from the leader"
                    )
                });
                let vote = self.shared.raft.metrics().borrow().vote;
                let refused: Result<
                    openraft::raft::VoteResponse<crate::NodeId>,
                    openraft::error::RaftError<crate::NodeId>,
                > = Ok(openraft::raft::VoteResponse::new(vote, None, false));
                return encode(&refused);
            }
            encode(&self.shared.raft.vote(rpc).await)
        }
        .await;
        self.shared.rpcs.tally(Rpc::Vote, &r);
        r
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let r: Result<Response<RaftPayload>, Status> = async {
            self.check.request(&request)?;
            let rpc = decode(&request.into_inner().payload)?;
            let res = self.shared.raft.install_snapshot(rpc).await;
            if res.is_ok() {
                self.shared.heard_from_leader();
            }
            encode(&res)
        }
        .await;
        self.shared.rpcs.tally(Rpc::InstallSnapshot, &r);
        r
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        let r: Result<Response<ForwardReply>, Status> = async {
            self.check.request(&request)?;
            let command: Command = decode(&request.into_inner().command)?;
            let result = match self.shared.commit_as_leader(command).await {
                Ok(resp) => {
                    ForwardResult::Response(bincode::serialize(&resp).map_err(PeerError::from)?)
                }
                Err(LeaderCommitError::NotLeader(leader)) => ForwardResult::NotLeader(NotLeader {
                    leader_id: leader.unwrap_or(0),
                }),
                Err(LeaderCommitError::Unavailable(reason)) => ForwardResult::Unavailable(reason),
            };
            Ok(Response::new(ForwardReply {
                result: Some(result),
            }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::Forward, &r);
        r
    }

    async fn relay(&self, request: Request<RelayRequest>) -> Result<Response<RelayReply>, Status> {
        let r: Result<Response<RelayReply>, Status> = async {
            self.check.request(&request)?;
            let from_node = request
                .metadata()
                .get(MD_NODE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<crate::NodeId>().ok())
                .ok_or_else(|| PeerError::Invalid("no sender node id".into()))?;
            let r = request.into_inner();
            let phone = r
                .phone
                .parse()
                .map_err(|_| PeerError::Invalid(format!("phone address {:?}", r.phone)))?;
            let delivered = match self.shared.sip_relay.get() {
                Some(h) => h.deliver(from_node, phone, r.message, r.from_phone),
                None => false,
            };
            Ok(Response::new(RelayReply { delivered }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::Relay, &r);
        r
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        let r: Result<Response<NodeStatus>, Status> =
            async { Ok(Response::new(self.shared.status().into())) }.await;
        self.shared.rpcs.tally(Rpc::Status, &r);
        r
    }

    async fn manage(
        &self,
        request: Request<ManageRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let r: Result<Response<NodeStatus>, Status> = async {
            self.check.request(&request)?;
            let op = ManageOp::from_proto(request.into_inner())
                .ok_or_else(|| PeerError::Invalid("no operation".into()))?;
            let status = self.shared.manage_here(op).await?;
            Ok(Response::new(status.into()))
        }
        .await;
        self.shared.rpcs.tally(Rpc::Manage, &r);
        r
    }

    async fn call_control(
        &self,
        request: Request<CallControlRequest>,
    ) -> Result<Response<CallControlReply>, Status> {
        let r: Result<Response<CallControlReply>, Status> = async {
            self.check.request(&request)?;
            let r = request.into_inner();
            let calls = match self.shared.call_control.get() {
                Some(c) => c.calls(r.call_ids, r.hangup).await,
                None => Vec::new(),
            };
            Ok(Response::new(CallControlReply {
                calls: calls.iter().map(Into::into).collect(),
            }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::CallControl, &r);
        r
    }

    async fn put_blob(
        &self,
        request: Request<PutBlobRequest>,
    ) -> Result<Response<PutBlobReply>, Status> {
        let r: Result<Response<PutBlobReply>, Status> = async {
            self.check.request(&request)?;
            let r = request.into_inner();
            let named: BlobId =
                r.id.parse()
                    .map_err(|e| PeerError::Invalid(format!("{e}")))?;
            if BlobId::of(&r.data) != named {
                return Err(
                    PeerError::Invalid(format!("blob {named}: the data has another hash")).into(),
                );
            }
            let blobs = self.shared.local_blobs()?;
            // File I/O and fsyncs: off the peer link's reactor threads.
            tokio::task::spawn_blocking(move || blobs.put(&r.data))
                .await
                .map_err(|e| PeerError::Blob(e.to_string()))?
                .map_err(|e| PeerError::Blob(e.to_string()))?;
            Ok(Response::new(PutBlobReply {}))
        }
        .await;
        self.shared.rpcs.tally(Rpc::PutBlob, &r);
        r
    }

    async fn get_blob(
        &self,
        request: Request<GetBlobRequest>,
    ) -> Result<Response<GetBlobReply>, Status> {
        let r: Result<Response<GetBlobReply>, Status> = async {
            self.check.request(&request)?;
            let id: BlobId = request
                .into_inner()
                .id
                .parse()
                .map_err(|e| PeerError::Invalid(format!("{e}")))?;
            let blobs = self.shared.local_blobs()?;
            let data = tokio::task::spawn_blocking(move || blobs.get(&id))
                .await
                .map_err(|e| PeerError::Blob(e.to_string()))?
                .map_err(|e| PeerError::Blob(e.to_string()))?;
            Ok(Response::new(GetBlobReply {
                found: data.is_some(),
                data: data.unwrap_or_default(),
            }))
        }
        .await;
        self.shared.rpcs.tally(Rpc::GetBlob, &r);
        r
    }
}
