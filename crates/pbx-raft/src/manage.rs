//! Cluster administration: membership changes (add a learner, promote it, remove a
//! node), leadership transfer and snapshots, each carried out by the node it concerns
//! (the leader, or the node whose snapshot is wanted) and reached over the peer link
//! from whichever node the operator asked. Also the hook through which the admin API
//! reaches the calls a node runs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError as OpenraftError};
use openraft::{ChangeMembers, ServerState};

use crate::cluster::{role_name, NodeStatus, Shared};
use crate::proto::manage_request::Op;
use crate::proto::{ManageRequest, Matched, StatusReply};
use crate::{Member, NodeId, RaftError};

/// An administrative cluster operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManageOp {
    /// The leader's status (with each member's replication progress).
    Status,
    /// Adds a node as a learner: it receives the log (or a snapshot) but does not vote.
    AddLearner { id: NodeId, member: Member },
    /// Makes a caught-up learner a voter.
    Promote { id: NodeId },
    /// Removes a learner or a voter (the leader hands over first if it is the one).
    Remove { id: NodeId },
    /// Hands leadership to `to` (None: the voter furthest ahead).
    TransferLeader { to: Option<NodeId> },
    /// Builds a snapshot of the node's state now (and lets it purge its log).
    Snapshot,
    /// Starts an election on the receiving node (the last step of a transfer).
    Campaign,
}

impl ManageOp {
    /// Whether only the leader can carry it out.
    fn needs_leader(&self) -> bool {
        !matches!(self, ManageOp::Snapshot | ManageOp::Campaign)
    }

    fn to_proto(&self) -> ManageRequest {
        let op = match self {
            ManageOp::Status => Op::Status(true),
            ManageOp::AddLearner { id, member } => Op::AddLearner(crate::proto::Member {
                id: *id,
                peer_addr: member.peer_addr.clone(),
                sip_addr: member.sip_addr.clone(),
                voter: false,
            }),
            ManageOp::Promote { id } => Op::Promote(*id),
            ManageOp::Remove { id } => Op::Remove(*id),
            ManageOp::TransferLeader { to } => Op::TransferLeader(to.unwrap_or(0)),
            ManageOp::Snapshot => Op::Snapshot(true),
            ManageOp::Campaign => Op::Campaign(true),
        };
        ManageRequest { op: Some(op) }
    }

    pub(crate) fn from_proto(r: ManageRequest) -> Option<ManageOp> {
        Some(match r.op? {
            Op::Status(_) => ManageOp::Status,
            Op::AddLearner(m) => ManageOp::AddLearner {
                id: m.id,
                member: Member {
                    peer_addr: m.peer_addr,
                    sip_addr: m.sip_addr,
                },
            },
            Op::Promote(id) => ManageOp::Promote { id },
            Op::Remove(id) => ManageOp::Remove { id },
            Op::TransferLeader(to) => ManageOp::TransferLeader {
                to: (to != 0).then_some(to),
            },
            Op::Snapshot(_) => ManageOp::Snapshot,
            Op::Campaign(_) => ManageOp::Campaign,
        })
    }
}

/// Why a management operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManageError {
    /// Sent to a node that is not the leader (the leader it knows, if any).
    NotLeader(Option<NodeId>),
    /// The change makes no sense in the current membership (nothing was changed).
    Refused(String),
    UnknownNode(NodeId),
    /// No leader, no quorum, or the node concerned is unreachable.
    Unavailable(String),
}

impl std::fmt::Display for ManageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManageError::NotLeader(Some(l)) => write!(f, "not the leader (node {l} is)"),
            ManageError::NotLeader(None) => write!(f, "not the leader (no leader known)"),
            ManageError::Refused(m) => write!(f, "{m}"),
            ManageError::UnknownNode(id) => write!(f, "node {id} is not a member"),
            ManageError::Unavailable(m) => write!(f, "{m}"),
        }
    }
}

impl From<ManageError> for tonic::Status {
    fn from(e: ManageError) -> tonic::Status {
        let m = e.to_string();
        match e {
            // The leader id travels in the message: "…(node N is)".
            ManageError::NotLeader(l) => {
                let mut s = tonic::Status::aborted(m);
                if let Some(l) = l.and_then(|l| l.to_string().parse().ok()) {
                    s.metadata_mut().insert("x-pbx-leader", l);
                }
                s
            }
            ManageError::Refused(_) => tonic::Status::failed_precondition(m),
            ManageError::UnknownNode(id) => {
                let mut s = tonic::Status::not_found(m);
                s.metadata_mut().insert("x-pbx-node", id.into());
                s
            }
            ManageError::Unavailable(_) => tonic::Status::unavailable(m),
        }
    }
}

impl From<tonic::Status> for ManageError {
    fn from(s: tonic::Status) -> ManageError {
        let m = s.message().to_string();
        match s.code() {
            tonic::Code::Aborted => ManageError::NotLeader(
                s.metadata()
                    .get("x-pbx-leader")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            ),
            tonic::Code::FailedPrecondition => ManageError::Refused(m),
            tonic::Code::NotFound => ManageError::UnknownNode(
                s.metadata()
                    .get("x-pbx-node")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            _ => ManageError::Unavailable(m),
        }
    }
}

impl From<ManageError> for RaftError {
    fn from(e: ManageError) -> RaftError {
        match e {
            ManageError::Refused(m) => RaftError::Refused(m),
            ManageError::UnknownNode(id) => RaftError::UnknownNode(id),
            other => RaftError::Unavailable(other.to_string()),
        }
    }
}

pub use pbx_media_core::MediaCounters;

/// A call this node runs, as the admin API sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallMedia {
    pub call_id: String,
    pub streams: Vec<MediaCounters>,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The node's side of the `CallControl` RPC: the calls it runs.
pub trait CallControl: Send + Sync {
    /// Media counters of those of `call_ids` this node runs; with `hangup`, hangs them
    /// up too (BYE both ways).
    fn calls(&self, call_ids: Vec<String>, hangup: bool) -> BoxFuture<Vec<CallMedia>>;
}

impl From<&MediaCounters> for crate::proto::MediaStream {
    fn from(c: &MediaCounters) -> Self {
        crate::proto::MediaStream {
            a_packets: c.a_packets,
            a_bytes: c.a_bytes,
            a_lost: c.a_lost,
            a_jitter_ms: c.a_jitter_ms,
            b_packets: c.b_packets,
            b_bytes: c.b_bytes,
            b_lost: c.b_lost,
            b_jitter_ms: c.b_jitter_ms,
        }
    }
}

impl From<crate::proto::MediaStream> for MediaCounters {
    fn from(c: crate::proto::MediaStream) -> Self {
        MediaCounters {
            a_packets: c.a_packets,
            a_bytes: c.a_bytes,
            a_lost: c.a_lost,
            a_jitter_ms: c.a_jitter_ms,
            b_packets: c.b_packets,
            b_bytes: c.b_bytes,
            b_lost: c.b_lost,
            b_jitter_ms: c.b_jitter_ms,
        }
    }
}

/// A learner this far behind the leader's log is not promoted (it would slow every
/// commit while it catches up).
const PROMOTE_MAX_LAG: u64 = 1000;

impl NodeStatus {
    pub(crate) fn from_reply(r: StatusReply) -> NodeStatus {
        NodeStatus {
            node_id: r.node_id,
            role: role_name(&r.role),
            leader_id: (r.leader_id != 0).then_some(r.leader_id),
            term: r.term,
            last_log_index: r.last_log_index,
            applied_index: r.applied_index,
            snapshot_index: r.snapshot_index,
            serving_writes: r.serving_writes,
            members: r
                .members
                .into_iter()
                .map(|m| {
                    (
                        m.id,
                        Member {
                            peer_addr: m.peer_addr,
                            sip_addr: m.sip_addr,
                        },
                        m.voter,
                    )
                })
                .collect(),
            matched: r
                .matched
                .into_iter()
                .map(|m| (m.node_id, m.index))
                .collect(),
            users: r.users,
            bindings: r.bindings,
            dialplan_version: r.dialplan_version,
            calls: r.calls,
            ready: r.ready,
        }
    }

    pub(crate) fn matched_proto(&self) -> Vec<Matched> {
        self.matched
            .iter()
            .map(|(id, index)| Matched {
                node_id: *id,
                index: *index,
            })
            .collect()
    }

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

fn change_error(e: OpenraftError<NodeId, ClientWriteError<NodeId, Member>>) -> ManageError {
    match e {
        OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ManageError::NotLeader(f.leader_id)
        }
        OpenraftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
            ChangeMembershipError::LearnerNotFound(l) => ManageError::UnknownNode(l.node_id),
            other => ManageError::Refused(other.to_string()),
        },
        other => ManageError::Unavailable(other.to_string()),
    }
}

impl Shared {
    /// Where `op` must run: the leader, or `on` (default: here) for per-node operations.
    fn manage_target(&self, op: &ManageOp, on: Option<NodeId>) -> Result<NodeId, ManageError> {
        if op.needs_leader() {
            self.raft
                .metrics()
                .borrow()
                .current_leader
                .ok_or_else(|| ManageError::Unavailable("no leader elected".into()))
        } else {
            Ok(on.unwrap_or(self.config.node_id))
        }
    }

    /// Runs `op` on the node it concerns: here, or over the peer link. A leader that
    /// changed on the way is followed (a few times).
    pub(crate) async fn manage(
        &self,
        op: ManageOp,
        on: Option<NodeId>,
    ) -> Result<NodeStatus, ManageError> {
        let mut target = self.manage_target(&op, on)?;
        for _ in 0..4 {
            let result = if target == self.config.node_id {
                self.manage_here(op.clone()).await
            } else {
                self.manage_remote(target, &op).await
            };
            match result {
                Err(ManageError::NotLeader(Some(l))) if op.needs_leader() && l != target => {
                    target = l;
                }
                // Leadership moved (the leader removed itself): ask the new one.
                Err(ManageError::NotLeader(_)) if op.needs_leader() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    target = self.manage_target(&op, on)?;
                }
                other => return other,
            }
        }
        Err(ManageError::Unavailable("the leader kept changing".into()))
    }

    async fn manage_remote(&self, id: NodeId, op: &ManageOp) -> Result<NodeStatus, ManageError> {
        let mut client = self.peer_client(id).map_err(|e| match e {
            RaftError::UnknownNode(id) => ManageError::UnknownNode(id),
            other => ManageError::Unavailable(other.to_string()),
        })?;
        let mut req = tonic::Request::new(op.to_proto());
        // Long enough for a learner's first snapshot or a leadership transfer.
        req.set_timeout(Duration::from_secs(30));
        let reply = client.manage(req).await.map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                ManageError::Unavailable(format!("node {id}: {}", s.message()))
            }
            _ => ManageError::from(s),
        })?;
        Ok(NodeStatus::from_reply(reply.into_inner()))
    }

    /// Carries out `op` on this node.
    pub(crate) async fn manage_here(&self, op: ManageOp) -> Result<NodeStatus, ManageError> {
        let me = self.config.node_id;
        if op.needs_leader() {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader != Some(me) {
                return Err(ManageError::NotLeader(leader));
            }
        }
        let status = self.status();
        let is_member = |id: NodeId| status.members.iter().find(|(m, _, _)| *m == id);
        match op {
            ManageOp::Status => {}
            ManageOp::AddLearner { id, member } => {
                if id == 0 {
                    return Err(ManageError::Refused("node id 0 is not valid".into()));
                }
                match is_member(id) {
                    Some((_, m, false)) if *m == member => return Ok(status),
                    Some((_, m, voter)) => {
                        return Err(ManageError::Refused(format!(
                            "node {id} is a member already ({}, {m})",
                            if *voter { "voter" } else { "learner" }
                        )))
                    }
                    None => {}
                }
                if let Some((other, _, _)) = status.members.iter().find(|(_, m, _)| {
                    m.peer_addr == member.peer_addr || m.sip_addr == member.sip_addr
                }) {
                    return Err(ManageError::Refused(format!(
                        "node {other} already uses one of those addresses"
                    )));
                }
                let hello = self
                    .pool
                    .handshake(id, &member.peer_addr)
                    .await
                    .map_err(|e| ManageError::Unavailable(e.to_string()))?;
                if hello.initialized {
                    return Err(ManageError::Refused(format!(
                        "node {id} at {} has Raft state of its own: wipe its data directory \
                         (or it is a member of another cluster)",
                        member.peer_addr
                    )));
                }
                self.raft
                    .add_learner(id, member.clone(), false)
                    .await
                    .map_err(change_error)?;
                tracing::info!(node = id, %member, "learner added; it catches up from the log");
            }
            ManageOp::Promote { id } => {
                match is_member(id) {
                    None => return Err(ManageError::UnknownNode(id)),
                    Some((_, _, true)) => return Ok(status),
                    Some(_) => {}
                }
                match status.lag_of(id) {
                    Some(lag) if lag <= PROMOTE_MAX_LAG => {}
                    lag => {
                        return Err(ManageError::Refused(format!(
                            "node {id} is still catching up ({}): promote it once it has",
                            lag.map_or("nothing replicated yet".to_string(), |l| format!(
                                "{l} entries behind"
                            ))
                        )))
                    }
                }
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(change_error)?;
                tracing::info!(node = id, "promoted to voter");
            }
            ManageOp::Remove { id } => {
                let Some((_, _, voter)) = is_member(id) else {
                    return Err(ManageError::UnknownNode(id));
                };
                if *voter {
                    let voters = status.members.iter().filter(|(_, _, v)| *v).count();
                    if voters <= 1 {
                        return Err(ManageError::Refused(format!("node {id} is the last voter")));
                    }
                    if id == me {
                        // Hand over first; the new leader removes this node.
                        self.transfer_leadership(None).await?;
                        return Err(ManageError::NotLeader(None));
                    }
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map_err(change_error)?;
                } else {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(change_error)?;
                }
                tracing::info!(node = id, "node removed from the cluster");
            }
            ManageOp::TransferLeader { to } => {
                self.transfer_leadership(to).await?;
            }
            ManageOp::Snapshot => {
                self.snapshot_now().await?;
            }
            ManageOp::Campaign => {
                tracing::info!("asked to take over leadership: starting an election");
                self.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|e| ManageError::Unavailable(e.to_string()))?;
            }
        }
        Ok(self.status())
    }

    /// Builds a snapshot now and waits (a while) until it is in place.
    async fn snapshot_now(&self) -> Result<(), ManageError> {
        let want = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ManageError::Unavailable(e.to_string()))?;
        let built = self
            .wait_metrics(Duration::from_secs(30), |m| {
                m.snapshot.map_or(0, |l| l.index) >= want
            })
            .await;
        if !built {
            return Err(ManageError::Unavailable(format!(
                "snapshot up to index {want} not built within 30 s"
            )));
        }
        tracing::info!(index = want, "snapshot built on request");
        Ok(())
    }

    /// Waits until `done` holds for this node's Raft metrics; false when `limit` passed
    /// first.
    async fn wait_metrics(
        &self,
        limit: Duration,
        mut done: impl FnMut(&openraft::RaftMetrics<NodeId, Member>) -> bool,
    ) -> bool {
        let mut metrics = self.raft.metrics();
        let deadline = Instant::now() + limit;
        loop {
            if done(&metrics.borrow_and_update()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left, metrics.changed()).await;
        }
    }

    /// Hands leadership to `to` (or to the voter furthest ahead).
    ///
    /// openraft 0.9 has no transfer message, and a follower refuses to vote while its
    /// leader's lease (election_timeout_max since the last append) runs. So the leader
    /// holds new writes (they wait, then go to the new leader), lets the target catch
    /// up, stops its heartbeats until the lease has run out everywhere, and asks the
    /// target to campaign. The other followers' own election timers run lease + a
    /// random timeout, so the target is first. Writes wait about one lease; none fails.
    pub(crate) async fn transfer_leadership(&self, to: Option<NodeId>) -> Result<(), ManageError> {
        let me = self.config.node_id;
        let status = self.status();
        let voters: BTreeMap<NodeId, Option<u64>> = status
            .members
            .iter()
            .filter(|(id, _, voter)| *voter && *id != me)
            .map(|(id, _, _)| (*id, status.lag_of(*id)))
            .collect();
        let target = match to {
            Some(t) if t == me => return Ok(()),
            Some(t) => {
                if !voters.contains_key(&t) {
                    return Err(if status.members.iter().any(|(id, _, _)| *id == t) {
                        ManageError::Refused(format!("node {t} is a learner: promote it first"))
                    } else {
                        ManageError::UnknownNode(t)
                    });
                }
                t
            }
            None => voters
                .iter()
                .filter_map(|(id, lag)| lag.map(|l| (l, *id)))
                .min()
                .map(|(_, id)| id)
                .ok_or_else(|| {
                    ManageError::Refused("no other voter is caught up to take over".into())
                })?,
        };
        tracing::info!(to = target, "handing leadership over: holding writes");
        let gate = self.write_gate.write().await;
        self.raft.runtime_config().heartbeat(false);
        let result = self.hand_over(target).await;
        self.raft.runtime_config().heartbeat(true);
        drop(gate);
        match &result {
            Ok(()) => tracing::info!(to = target, "leadership handed over"),
            Err(e) => tracing::warn!(to = target, error = %e, "leadership transfer failed"),
        }
        result
    }

    async fn hand_over(&self, target: NodeId) -> Result<(), ManageError> {
        let me = self.config.node_id;
        // Every entry on the target first, so its vote request wins.
        let caught_up = self
            .wait_metrics(Duration::from_secs(2), |m| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten())
                    .map(|l| l.index);
                matched.is_some() && matched == m.last_log_index
            })
            .await;
        if !caught_up {
            return Err(ManageError::Unavailable(format!(
                "node {target} did not catch up within 2 s"
            )));
        }
        // The followers' leases run from the last append they got.
        let lease = self.config.election_timeout_max + self.config.heartbeat;
        tokio::time::sleep(lease).await;
        self.manage_remote(target, &ManageOp::Campaign).await?;
        // Leadership moved when another node leads (normally the target).
        let moved = self
            .wait_metrics(self.config.election_timeout_max, |m| {
                m.current_leader.is_some_and(|l| l != me) && m.state != ServerState::Leader
            })
            .await;
        if moved {
            Ok(())
        } else {
            Err(ManageError::Unavailable(format!(
                "node {target} did not win the election"
            )))
        }
    }
}
