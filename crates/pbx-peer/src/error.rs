//! Errors of the peer link, and the one place they become a `tonic::Status` (server
//! side) and come back from one (client side).

use tonic::{Code, Status};

use crate::NodeId;

/// Metadata carrying the leader a node knows, on a "not the leader" answer.
const MD_LEADER: &str = "x-pbx-leader";
/// Metadata carrying the node that is not a member, on a "not found" answer.
const MD_UNKNOWN_NODE: &str = "x-pbx-node";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The write or operation cannot be carried out now (no leader, no quorum, shutting
    /// down): answered 503 with Retry-After.
    #[error("writes unavailable: {0}")]
    Unavailable(String),
    /// Sent to a node that is not the leader (the leader it knows, if any).
    #[error("not the leader ({})", match .0 { Some(l) => format!("node {l} is"), None => "no leader known".into() })]
    NotLeader(Option<NodeId>),
    /// A change refused as the cluster stands (nothing was changed), or a peer that
    /// refused us (another cluster or protocol version).
    #[error("{0}")]
    Refused(String),
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    /// The request never reached the peer (connection refused or lost before sending).
    #[error("peer link: {0}")]
    Unreachable(String),
    /// The peer failed or did not answer in time: the outcome is unknown.
    #[error("peer link: {0}")]
    Transport(String),
    /// A malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] pbx_raft::RaftError),
    #[error("codec: {0}")]
    Codec(#[from] bincode::Error),
    /// A blob could not be stored or read here (a full disk, no blob store yet, a
    /// blob whose content does not match its name).
    #[error("blob store: {0}")]
    Blob(String),
}

impl From<PeerError> for Status {
    fn from(e: PeerError) -> Status {
        match e {
            PeerError::NotLeader(leader) => {
                let mut s = Status::aborted(e.to_string());
                if let Some(l) = leader.and_then(|l| l.to_string().parse().ok()) {
                    s.metadata_mut().insert(MD_LEADER, l);
                }
                s
            }
            PeerError::UnknownNode(id) => {
                let mut s = Status::not_found(e.to_string());
                s.metadata_mut().insert(MD_UNKNOWN_NODE, id.into());
                s
            }
            PeerError::Refused(m) => Status::failed_precondition(m),
            PeerError::Unavailable(m)
            | PeerError::Unreachable(m)
            | PeerError::Transport(m)
            | PeerError::Blob(m) => Status::unavailable(m),
            PeerError::Invalid(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        }
    }
}

impl PeerError {
    /// What a `Status` from (or on the way to) `node` means.
    pub fn from_status(node: NodeId, s: Status) -> PeerError {
        let md = |key: &str| {
            s.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        match s.code() {
            Code::Aborted => PeerError::NotLeader(md(MD_LEADER)),
            Code::FailedPrecondition => PeerError::Refused(s.message().to_string()),
            Code::NotFound => PeerError::UnknownNode(md(MD_UNKNOWN_NODE).unwrap_or(node)),
            Code::Unavailable => PeerError::Unreachable(format!("node {node}: {}", s.message())),
            _ => PeerError::Transport(format!("node {node}: {}", s.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server side answers comes back as the same error on the client side.
    #[test]
    fn status_round_trip() {
        let back = |e: PeerError| PeerError::from_status(7, Status::from(e));
        assert!(matches!(
            back(PeerError::NotLeader(Some(3))),
            PeerError::NotLeader(Some(3))
        ));
        assert!(matches!(
            back(PeerError::NotLeader(None)),
            PeerError::NotLeader(None)
        ));
        assert!(matches!(
            back(PeerError::UnknownNode(9)),
            PeerError::UnknownNode(9)
        ));
        assert!(
            matches!(back(PeerError::Refused("no".into())), PeerError::Refused(m) if m == "no")
        );
        assert!(
            matches!(back(PeerError::Unavailable("no quorum".into())), PeerError::Unreachable(m) if m == "node 7: no quorum")
        );
        assert!(matches!(
            back(PeerError::Invalid("x".into())),
            PeerError::Transport(_)
        ));
        assert_eq!(
            PeerError::NotLeader(Some(3)).to_string(),
            "not the leader (node 3 is)"
        );
    }
}
