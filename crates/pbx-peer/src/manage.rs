//! Cluster administration: membership changes (add a learner, promote it, remove a
//! node), leadership transfer and snapshots, each carried out by the node it concerns
//! (the leader, or the node whose snapshot is wanted) and reached over the peer link
//! from whichever node the operator asked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError as OpenraftError};
use openraft::{ChangeMembers, ServerState};

use pbx_proto::peer::manage_request::Op;
use pbx_proto::peer::ManageRequest;

use crate::cluster::Shared;
use crate::status::{member_from_proto, member_proto};
use crate::{Member, NodeId, NodeStatus, PeerError};

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
            ManageOp::AddLearner { id, member } => {
                Op::AddLearner(member_proto(*id, member.clone(), false))
            }
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
            Op::AddLearner(m) => {
                let (id, member, _) = member_from_proto(m);
                ManageOp::AddLearner { id, member }
            }
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

/// A learner this far behind the leader's log is not promoted (it would slow every
/// commit while it catches up).
const PROMOTE_MAX_LAG: u64 = 1000;

/// How a leadership transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// The target won its first campaign: writes were held for about a round trip.
    OneRound,
    /// The followers' leases had to run out first (more voters than the target and
    /// this node make a majority): writes were held for about a lease.
    AfterLease,
    /// This node was the target.
    Stayed,
}

/// Campaigns of a transfer's target once the followers' leases have run out.
const LATE_ROUNDS: usize = 3;

/// Slack on a lease measured from our own metrics watcher (it sees leadership a little
/// after openraft stamped it).
const LEASE_MARGIN_MS: u64 = 20;

fn change_error(e: OpenraftError<NodeId, ClientWriteError<NodeId, Member>>) -> PeerError {
    match e {
        OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            PeerError::NotLeader(f.leader_id)
        }
        OpenraftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
            ChangeMembershipError::LearnerNotFound(l) => PeerError::UnknownNode(l.node_id),
            other => PeerError::Refused(other.to_string()),
        },
        other => PeerError::Unavailable(other.to_string()),
    }
}

impl Shared {
    /// Where `op` must run: the leader, or `on` (default: here) for per-node operations.
    fn manage_target(&self, op: &ManageOp, on: Option<NodeId>) -> Result<NodeId, PeerError> {
        if op.needs_leader() {
            self.raft
                .metrics()
                .borrow()
                .current_leader
                .ok_or_else(|| PeerError::Unavailable("no leader elected".into()))
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
    ) -> Result<NodeStatus, PeerError> {
        let mut target = self.manage_target(&op, on)?;
        for _ in 0..4 {
            let result = if target == self.config.node_id {
                self.manage_here(op.clone()).await
            } else {
                self.manage_remote(target, &op).await
            };
            match result {
                Err(PeerError::NotLeader(Some(l))) if op.needs_leader() && l != target => {
                    target = l;
                }
                // Leadership moved (the leader removed itself): ask the new one.
                Err(PeerError::NotLeader(_)) if op.needs_leader() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    target = self.manage_target(&op, on)?;
                }
                other => return other,
            }
        }
        Err(PeerError::Unavailable("the leader kept changing".into()))
    }

    async fn manage_remote(&self, id: NodeId, op: &ManageOp) -> Result<NodeStatus, PeerError> {
        let mut client = self.peer_client(id).map_err(|e| match e {
            PeerError::UnknownNode(id) => PeerError::UnknownNode(id),
            other => PeerError::Unavailable(other.to_string()),
        })?;
        let mut req = tonic::Request::new(op.to_proto());
        // Long enough for a learner's first snapshot or a leadership transfer.
        req.set_timeout(Duration::from_secs(30));
        let reply = client
            .manage(req)
            .await
            .map_err(|s| PeerError::from_status(id, s))?;
        Ok(reply.into_inner().into())
    }

    /// Carries out `op` on this node.
    pub(crate) async fn manage_here(&self, op: ManageOp) -> Result<NodeStatus, PeerError> {
        let me = self.config.node_id;
        if op.needs_leader() {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader != Some(me) {
                return Err(PeerError::NotLeader(leader));
            }
        }
        let status = self.status();
        let is_member = |id: NodeId| status.members.iter().find(|(m, _, _)| *m == id);
        match op {
            ManageOp::Status => {}
            ManageOp::AddLearner { id, member } => {
                if id == 0 {
                    return Err(PeerError::Refused("node id 0 is not valid".into()));
                }
                match is_member(id) {
                    Some((_, m, false)) if *m == member => return Ok(status),
                    Some((_, m, voter)) => {
                        return Err(PeerError::Refused(format!(
                            "node {id} is a member already ({}, {m})",
                            if *voter { "voter" } else { "learner" }
                        )))
                    }
                    None => {}
                }
                if let Some((other, _, _)) = status.members.iter().find(|(_, m, _)| {
                    m.peer_addr == member.peer_addr || m.sip_addr == member.sip_addr
                }) {
                    return Err(PeerError::Refused(format!(
                        "node {other} already uses one of those addresses"
                    )));
                }
                let hello = self
                    .pool
                    .handshake(id, &member.peer_addr)
                    .await
                    .map_err(|e| PeerError::Unavailable(e.to_string()))?;
                if hello.initialized {
                    return Err(PeerError::Refused(format!(
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
                    None => return Err(PeerError::UnknownNode(id)),
                    Some((_, _, true)) => return Ok(status),
                    Some(_) => {}
                }
                match status.lag_of(id) {
                    Some(lag) if lag <= PROMOTE_MAX_LAG => {}
                    lag => {
                        return Err(PeerError::Refused(format!(
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
                    return Err(PeerError::UnknownNode(id));
                };
                if *voter {
                    let voters = status.members.iter().filter(|(_, _, v)| *v).count();
                    if voters <= 1 {
                        return Err(PeerError::Refused(format!("node {id} is the last voter")));
                    }
                    if id == me {
                        // Hand over first; the new leader removes this node.
                        self.transfer_leadership(None).await?;
                        return Err(PeerError::NotLeader(None));
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
            ManageOp::Campaign if self.raft.metrics().borrow().state == ServerState::Leader => {
                tracing::info!("asked to take over leadership: leading already");
            }
            ManageOp::Campaign => {
                tracing::info!("asked to take over leadership: starting an election");
                self.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|e| PeerError::Unavailable(e.to_string()))?;
            }
        }
        Ok(self.status())
    }

    /// Builds a snapshot now and waits (a while) until it is in place.
    async fn snapshot_now(&self) -> Result<(), PeerError> {
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
            .map_err(|e| PeerError::Unavailable(e.to_string()))?;
        let built = self
            .wait_metrics(Duration::from_secs(30), |m| {
                m.snapshot.map_or(0, |l| l.index) >= want
            })
            .await;
        if !built {
            return Err(PeerError::Unavailable(format!(
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
    /// openraft 0.9 has no transfer message. The leader holds new writes (they wait,
    /// then go to the new leader), lets the target catch up and asks it to campaign at
    /// once: the old leader grants that vote (its own vote was last refreshed when it was
    /// elected, so no lease holds it back) and steps down, which is a majority of three.
    /// The other followers refuse while their leader's lease (election_timeout_max since
    /// the last append) runs; where their votes are needed (more voters, or a leader
    /// elected less than a lease ago), the leader stops its heartbeats until the lease
    /// has run out everywhere and the target campaigns again.
    pub(crate) async fn transfer_leadership(
        &self,
        to: Option<NodeId>,
    ) -> Result<HandOver, PeerError> {
        let me = self.config.node_id;
        let status = self.status();
        let voters: BTreeMap<NodeId, Option<u64>> = status
            .members
            .iter()
            .filter(|(id, _, voter)| *voter && *id != me)
            .map(|(id, _, _)| (*id, status.lag_of(*id)))
            .collect();
        let target = match to {
            Some(t) if t == me => return Ok(HandOver::Stayed),
            Some(t) => {
                if !voters.contains_key(&t) {
                    return Err(if status.members.iter().any(|(id, _, _)| *id == t) {
                        PeerError::Refused(format!("node {t} is a learner: promote it first"))
                    } else {
                        PeerError::UnknownNode(t)
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
                    PeerError::Refused("no other voter is caught up to take over".into())
                })?,
        };
        tracing::info!(to = target, "handing leadership over: holding writes");
        let gate = self.write_gate.write().await;
        self.raft.runtime_config().heartbeat(false);
        let result = self.hand_over(target).await;
        self.raft.runtime_config().heartbeat(true);
        drop(gate);
        match &result {
            Ok(how) => tracing::info!(to = target, ?how, "leadership handed over"),
            Err(e) => tracing::warn!(to = target, error = %e, "leadership transfer failed"),
        }
        result
    }

    async fn hand_over(&self, target: NodeId) -> Result<HandOver, PeerError> {
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
            return Err(PeerError::Unavailable(format!(
                "node {target} did not catch up within 2 s"
            )));
        }
        // This node's vote was refreshed when it was elected: it grants nothing for a
        // lease after that.
        let since = self
            .leading_since
            .load(std::sync::atomic::Ordering::Relaxed);
        let lease_ms = self.config.election_timeout_max.as_millis() as u64;
        let young = (since + lease_ms + LEASE_MARGIN_MS).saturating_sub(self.now_ms());
        if since > 0 && young > 0 {
            tokio::time::sleep(Duration::from_millis(young)).await;
        }
        self.manage_remote(target, &ManageOp::Campaign).await?;
        if self
            .handed_to(target, self.config.election_timeout_min)
            .await
        {
            return Ok(HandOver::OneRound);
        }
        tracing::info!(
            to = target,
            "the first campaign did not win: waiting for the followers' leases"
        );
        // The followers' leases run from the last append they got.
        let lease = self.config.election_timeout_max + self.config.heartbeat;
        tokio::time::sleep(lease).await;
        if self.handed_to(target, Duration::ZERO).await {
            return Ok(HandOver::AfterLease);
        }
        // A campaign can still lose to a follower whose own election timer fired under
        // load (split vote): a few more rounds before giving up.
        for _ in 0..LATE_ROUNDS {
            self.manage_remote(target, &ManageOp::Campaign).await?;
            if self
                .handed_to(target, self.config.election_timeout_max)
                .await
            {
                return Ok(HandOver::AfterLease);
            }
        }
        Err(PeerError::Unavailable(format!(
            "node {target} did not win the election"
        )))
    }

    /// Waits (up to `limit`) until another node leads: this node heard from it, or the
    /// target says it leads (a busy new leader's first append can take a while).
    async fn handed_to(&self, target: NodeId, limit: Duration) -> bool {
        let me = self.config.node_id;
        let deadline = Instant::now() + limit;
        loop {
            let led_by_other = {
                let m = self.raft.metrics();
                let m = m.borrow();
                m.current_leader.is_some_and(|l| l != me) && m.state != ServerState::Leader
            };
            if led_by_other
                || matches!(
                    self.manage_remote(target, &ManageOp::Status).await,
                    Ok(s) if s.role == "leader"
                )
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
