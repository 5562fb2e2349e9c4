//! One node's Raft role and progress ([`NodeStatus`]), and its one conversion to and
//! from `pbx.common.v1.NodeStatus`, the message both the peer link's Status and the
//! admin API's ClusterStatus answer with.

use pbx_proto::common;

use crate::{Member, NodeId};

/// One node's Raft role and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub role: &'static str,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub serving_writes: bool,
    /// (id, member, voter)
    pub members: Vec<(NodeId, Member, bool)>,
    /// On the leader: the last log index known to be on each member (None: nothing
    /// matched yet). Empty on other nodes.
    pub matched: Vec<(NodeId, Option<u64>)>,
    pub users: u64,
    pub bindings: u64,
    pub dialplan_version: u64,
    /// Answered calls in the replicated list.
    pub calls: u64,
    /// Nodes being drained, in the node's applied state.
    pub draining: Vec<NodeId>,
    /// The SIP domain the cluster serves (empty before the cluster settings are in).
    pub domain: String,
    /// The node finished its start-up writes and serves writes.
    pub ready: bool,
}

/// The role names of [`NodeStatus::role`], from their text (a peer's status).
fn role_name(s: &str) -> &'static str {
    ["leader", "follower", "candidate", "learner", "shutdown"]
        .into_iter()
        .find(|r| *r == s)
        .unwrap_or("unknown")
}

impl NodeStatus {
    /// How far `id` is behind this (leader's) log: None when nothing is known.
    pub fn lag_of(&self, id: NodeId) -> Option<u64> {
        if self.role == "leader" && id == self.node_id {
            return Some(0);
        }
        self.matched
            .iter()
            .find(|(m, _)| *m == id)
            .and_then(|(_, i)| *i)
            .map(|i| self.last_log_index.saturating_sub(i))
    }
}

/// A member as the proto carries it (lag and draining unset: only a status has them).
pub(crate) fn member_proto(id: NodeId, m: Member, voter: bool) -> common::Member {
    common::Member {
        id,
        peer_addr: m.peer_addr,
        sip_addr: m.sip_addr,
        voter,
        lag: None,
        draining: false,
    }
}

/// A member from the proto: (id, member, voter).
pub(crate) fn member_from_proto(m: common::Member) -> (NodeId, Member, bool) {
    (
        m.id,
        Member {
            peer_addr: m.peer_addr,
            sip_addr: m.sip_addr,
        },
        m.voter,
    )
}

impl From<NodeStatus> for common::NodeStatus {
    fn from(s: NodeStatus) -> Self {
        let members = s
            .members
            .iter()
            .map(|(id, m, voter)| common::Member {
                lag: s.lag_of(*id),
                draining: s.draining.contains(id),
                ..member_proto(*id, m.clone(), *voter)
            })
            .collect();
        common::NodeStatus {
            node_id: s.node_id,
            role: s.role.into(),
            leader_id: s.leader_id.unwrap_or(0),
            term: s.term,
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            serving_writes: s.serving_writes,
            members,
            users: s.users,
            bindings: s.bindings,
            dialplan_version: s.dialplan_version,
            calls: s.calls,
            draining: s.draining,
            domain: s.domain,
            ready: s.ready,
            matched: s
                .matched
                .into_iter()
                .map(|(node_id, index)| common::Matched { node_id, index })
                .collect(),
        }
    }
}

impl From<common::NodeStatus> for NodeStatus {
    fn from(r: common::NodeStatus) -> Self {
        NodeStatus {
            node_id: r.node_id,
            role: role_name(&r.role),
            leader_id: (r.leader_id != 0).then_some(r.leader_id),
            term: r.term,
            last_log_index: r.last_log_index,
            applied_index: r.applied_index,
            snapshot_index: r.snapshot_index,
            serving_writes: r.serving_writes,
            members: r.members.into_iter().map(member_from_proto).collect(),
            matched: r
                .matched
                .into_iter()
                .map(|m| (m.node_id, m.index))
                .collect(),
            users: r.users,
            bindings: r.bindings,
            dialplan_version: r.dialplan_version,
            calls: r.calls,
            draining: r.draining,
            domain: r.domain,
            ready: r.ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_and_lags() {
        let m = |p: &str| Member {
            peer_addr: p.into(),
            sip_addr: format!("{p}0"),
        };
        let s = NodeStatus {
            node_id: 1,
            role: "leader",
            leader_id: Some(1),
            term: 3,
            last_log_index: 40,
            applied_index: 40,
            snapshot_index: 10,
            serving_writes: true,
            members: vec![(1, m("a"), true), (2, m("b"), true), (3, m("c"), false)],
            matched: vec![(1, Some(40)), (2, Some(35)), (3, None)],
            users: 5,
            bindings: 6,
            dialplan_version: 2,
            calls: 1,
            draining: vec![2],
            domain: "pbx.test".into(),
            ready: true,
        };
        let p = common::NodeStatus::from(s.clone());
        let lags: Vec<_> = p.members.iter().map(|m| (m.lag, m.draining)).collect();
        assert_eq!(lags, [(Some(0), false), (Some(5), true), (None, false)]);
        assert_eq!(NodeStatus::from(p), s);
    }
}
