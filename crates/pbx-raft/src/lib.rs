//! openraft's side of the PBX state: its type config, its stores and commit counters.
//!
//! Every change to shared state is a [`pbx_state::Command`] committed through openraft
//! on a majority of the cluster and applied in log order by every node
//! ([`store::StateMachineStore`]). This crate knows the Raft log and the state machine
//! only; the peer link that carries Raft between nodes (and the handle the node uses)
//! is `pbx-peer`.
//!
//! - [`store`]: openraft's log store and state-machine store on any
//!   [`pbx_storage::LogStore`] (sled on disk, or in memory for tests), flushed and
//!   fsynced before anything is reported saved; snapshots;
//! - [`CommitStats`]: counters of the commit path for logs and benchmarks.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

mod clock;
mod stats;
pub mod store;

pub use stats::{CommitHistogram, CommitReport, CommitStats};

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

/// Errors of this crate: opening the stores.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("storage: {0}")]
    Storage(#[from] pbx_storage::StorageError),
    #[error("state: {0}")]
    State(#[from] pbx_state::StateError),
    #[error("codec: {0}")]
    Codec(#[from] bincode::Error),
}

pub use clock::{clock_report, unix_ms, ClockReport};
