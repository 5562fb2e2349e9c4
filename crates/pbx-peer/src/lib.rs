//! The peer link between the nodes of a cluster, and the [`Cluster`] handle a node uses.
//!
//! - [`cluster`]: the handle: propose (group commit, forwarding to the leader, 503 when
//!   there is no quorum), read, formation, status, relay and call control;
//! - [`manage`]: membership changes, leadership transfer and snapshots, carried out by
//!   the node they concern;
//! - [`network`]: the client side: one pooled gRPC channel per peer, openraft's
//!   `RaftNetwork`;
//! - [`service`]: the server side: Raft RPCs, forwarded writes, relay, call control,
//!   management, status;
//! - [`liveness`]: probes of the other members: which are alive, which are dead;
//! - [`faults`]: drop, delay or partition chosen links, for in-process cluster tests;
//! - [`hooks`]: what the node plugs in (SIP relay, call control);
//! - [`status`]: one node's status and its one conversion to and from the proto;
//! - [`error`]: [`PeerError`] and its one conversion to and from `tonic::Status`.
//!
//! openraft's types and stores are `pbx-raft`'s; the generated gRPC code is
//! `pbx-proto`'s.

pub mod cluster;
pub mod error;
pub mod faults;
pub mod hooks;
pub mod liveness;
pub mod manage;
pub mod network;
pub mod rpc_counts;
pub mod service;
pub mod status;

pub use cluster::{Cluster, ClusterConfig, StateGuard};
pub use error::PeerError;
pub use faults::{Fault, LinkFaults};
pub use hooks::{BoxFuture, CallControl, CallMedia, MediaCounters, SipRelay};
pub use liveness::{LivenessConfig, PeerState};
pub use manage::{HandOver, ManageOp};
pub use pbx_raft::store::check_snapshot_covers_purged_log;
pub use pbx_raft::{
    clock_report, unix_ms, CommitHistogram, CommitReport, CommitStats, Member, NodeId,
};
pub use pbx_storage::{LogStore, MemStore};
pub use rpc_counts::RpcCounts;
pub use status::NodeStatus;

/// Locks a mutex, also after a panic elsewhere (the data stays usable here).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Version of the peer-link protocol: the proto messages and the bincode shape of the
/// openraft types and state commands inside them. Nodes refuse peers that speak another
/// version. 2: call records in the commands, the Relay RPC. 3: Manage and CallControl.
/// 4: status, members and media counters as the messages shared with the admin API
/// (`pbx.common.v1`). 5: the Ping probe; call records that can be resumed elsewhere
/// (epoch, activity, each leg's contact and media) and `AdoptCalls`.
pub const PROTOCOL_VERSION: u32 = 7;
