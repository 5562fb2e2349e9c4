//! Raft replication of the PBX state.
//!
//! Every change to shared state is a [`pbx_state::Command`] committed through openraft
//! on a majority of the cluster and applied in log order by every node
//! ([`store::StateMachineStore`]). Reads are local reads of the applied state.
//!
//! - [`store`]: openraft's log store and state-machine store on [`pbx_storage`] (flushed
//!   and fsynced before anything is reported saved);
//! - [`network`]: the gRPC peer link, client side: one pooled channel per peer;
//! - [`service`]: the peer link, server side: Raft RPCs, forwarded writes, status;
//! - [`cluster`]: the handle the node uses: propose (group commit, forwarding to the
//!   leader, 503 when there is no quorum), read, formation, membership changes.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod cluster;
pub mod manage;
pub mod network;
pub mod service;
mod stats;
pub mod store;

pub use cluster::{Cluster, ClusterConfig, NodeStatus, SipRelay, StateGuard};
pub use manage::{CallControl, CallMedia, ManageOp, MediaCounters};
pub use stats::{CommitReport, CommitStats};

/// Generated from `proto/pbx/cluster/v1/peer.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("pbx.cluster.v1");
}

/// Version of the peer-link protocol: the proto messages and the bincode shape of the
/// openraft types and state commands inside them. Nodes refuse peers that speak another
/// version. 2: call records in the commands, the Relay RPC. 3: Manage and CallControl.
pub const PROTOCOL_VERSION: u32 = 3;

pub type NodeId = u64;

/// A cluster member as recorded in the Raft membership: where its peer link and its SIP
/// transport listen.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Member {
    pub peer_addr: String,
    pub sip_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} sip={}", self.peer_addr, self.sip_addr)
    }
}

openraft::declare_raft_types!(
    /// openraft's types for the PBX: commands and responses of `pbx-state`.
    pub TypeConfig:
        D = pbx_state::Command,
        R = pbx_state::Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// The write cannot be committed now (no leader, no quorum, leader unreachable,
    /// shutting down): answered 503 with Retry-After.
    #[error("writes unavailable: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(#[from] pbx_storage::StorageError),
    #[error("state: {0}")]
    State(#[from] pbx_state::StateError),
    #[error("codec: {0}")]
    Codec(#[from] bincode::Error),
    #[error("raft: {0}")]
    Raft(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("peer link: {0}")]
    Transport(String),
    /// A cluster change refused as it stands (nothing was changed).
    #[error("{0}")]
    Refused(String),
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
}

/// Unix time in milliseconds: what the leader stamps into commands.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
