//! The handle a node uses for replicated state: propose commands (group commit through
//! Raft, forwarded to the leader from followers), read the applied state locally, form
//! the cluster, change membership, report status, relay SIP messages and reach the
//! calls another node runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError as OpenraftError};
use openraft::{RaftMetrics, ServerState, SnapshotPolicy};
use pbx_proto::peer::forward_reply::Result as ForwardResult;
use pbx_raft::store::{Applied, LogStorage, StateMachineStore, StorageHealth};
use pbx_raft::{unix_ms, CommitStats, Raft};
use pbx_state::{Command, Response, State};
use pbx_storage::{BlobId, LogStore};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::hooks::{CallControl, CallMedia, SipRelay};
use crate::manage::ManageOp;
use crate::network::{Identity, PeerPool};
use crate::service::PeerService;
use crate::{LinkFaults, Member, NodeId, NodeStatus, PeerError};

/// How a node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// Shared by all members; a peer with another id is refused.
    pub cluster_id: String,
    /// This node's addresses as other members reach them.
    pub member: Member,
    /// The members of a brand-new cluster. The lowest id among them initialises it, once
    /// it has seen that a majority of them are reachable and none has Raft state.
    pub initial_members: BTreeMap<NodeId, Member>,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// Most commands in one log entry (group commit).
    pub max_batch: usize,
    /// Batches a node has in flight at once.
    pub max_inflight: usize,
    /// Log entries kept behind a snapshot.
    pub log_kept_after_snapshot: u64,
    /// How long a write may wait for a leader and a majority before it is refused.
    pub write_timeout: Duration,
    pub connect_timeout: Duration,
    /// Faults injected into this node's outgoing peer RPCs (tests; default: none).
    pub faults: LinkFaults,
    /// How the other members are probed, and when one counts as dead.
    pub liveness: crate::LivenessConfig,
}

pub(crate) enum LeaderCommitError {
    NotLeader(Option<NodeId>),
    Unavailable(String),
}

/// State shared by the handle, the proposer and the peer service.
pub(crate) struct Shared {
    pub(crate) config: ClusterConfig,
    pub(crate) raft: Raft,
    applied: Arc<RwLock<Applied>>,
    pub(crate) pool: PeerPool,
    store: Arc<dyn LogStore>,
    /// Whether the store works (a full disk closes it until there is room again).
    storage: Arc<StorageHealth>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last accepted append from a leader (+1; 0 =
    /// never).
    leader_contact: AtomicU64,
    /// Milliseconds since `epoch` when this node stopped serving writes (+1; 0 = it is
    /// serving).
    not_serving_since: AtomicU64,
    /// Milliseconds since `epoch` when this node last became leader (+1; 0 = never):
    /// the others refuse votes for a lease after it (see `hand_over`).
    pub(crate) leading_since: AtomicU64,
    stats: Arc<CommitStats>,
    /// The peer-link RPCs served, by method and status.
    pub(crate) rpcs: crate::RpcCounts,
    /// Elections this node saw start (its term rose) and leaders it saw take over.
    pub(crate) elections: AtomicU64,
    pub(crate) leader_changes: AtomicU64,
    /// Set by the node once its own start-up writes (settings, users) are committed.
    ready: AtomicBool,
    /// This node started with no Raft state and has not applied anything from a leader
    /// yet: it may be a wiped member, so it grants no vote to a candidate of a formed
    /// cluster (see [`Shared::may_vote`]).
    started_empty: AtomicBool,
    /// Where relayed SIP messages go (the node's transport), once it is running.
    pub(crate) sip_relay: std::sync::OnceLock<Arc<dyn SipRelay>>,
    /// The calls this node runs, for the admin API on any node.
    pub(crate) call_control: std::sync::OnceLock<Arc<dyn CallControl>>,
    /// Where this node keeps blobs (voicemail audio, ADR 0014), once the node opened it.
    pub(crate) blobs: std::sync::OnceLock<Arc<dyn pbx_storage::BlobStore>>,
    /// Held shared by every commit on the leader, exclusively while it hands leadership
    /// over (writes wait, then go to the new leader).
    pub(crate) write_gate: tokio::sync::RwLock<()>,
    /// What the probes of the other members found.
    pub(crate) probes: Arc<std::sync::Mutex<crate::liveness::Probes>>,
    /// Set once at shutdown: the peer-link server and the probes stop.
    pub(crate) stopped: tokio::sync::watch::Sender<bool>,
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// How long a blob may take to reach a member and its disk (a few MB on a LAN).
const BLOB_TIMEOUT: Duration = Duration::from_secs(10);

impl Shared {
    /// This node's blob store, once the node opened it.
    pub(crate) fn local_blobs(&self) -> Result<Arc<dyn pbx_storage::BlobStore>, PeerError> {
        self.blobs
            .get()
            .cloned()
            .ok_or_else(|| PeerError::Blob("this node keeps no blobs yet".into()))
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this node may take part in the election of `candidate_last_log`.
    ///
    /// A node whose data was wiped forgot its log and its vote. Were it to vote, a stale
    /// candidate could win with its help and lose entries the old majority committed
    /// (or it could vote twice in a term). So a node that started empty abstains until
    /// it has applied a snapshot or entries from a leader. A candidate whose log holds
    /// only the initial membership (index 0) belongs to a cluster being formed, where
    /// every member starts empty: that election needs our vote.
    pub(crate) fn may_vote(&self, candidate_last_log: Option<u64>) -> bool {
        if !self.started_empty.load(Ordering::Relaxed) {
            return true;
        }
        if self.raft.metrics().borrow().last_applied.is_some() {
            self.started_empty.store(false, Ordering::Relaxed);
            return true;
        }
        candidate_last_log.unwrap_or(0) == 0
    }

    /// The index of the last entry in this node's log (0: none).
    pub(crate) fn last_log_index(&self) -> u64 {
        self.raft.metrics().borrow().last_log_index.unwrap_or(0)
    }

    /// Time since the last append accepted from a leader (since start when none).
    pub(crate) fn since_leader_contact(&self) -> Duration {
        let last = self.leader_contact.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    pub(crate) fn heard_from_leader(&self) {
        self.leader_contact.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) async fn has_raft_state(&self) -> bool {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || LogStorage::has_raft_state(&*store))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(true)
    }

    /// The peer-link client of a member.
    pub(crate) fn peer_client(
        &self,
        node: NodeId,
    ) -> Result<crate::network::PeerClient, PeerError> {
        let addr = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.peer_addr.clone())
            .ok_or(PeerError::UnknownNode(node))?;
        self.pool.client(node, &addr)
    }

    fn metrics(&self) -> RaftMetrics<NodeId, Member> {
        self.raft.metrics().borrow().clone()
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The leader lease: how long after the last sign of a majority a node still counts
    /// itself as able to commit.
    fn lease_ms(&self) -> u64 {
        self.config.election_timeout_max.as_millis() as u64
    }

    fn serving_writes_in(&self, m: &RaftMetrics<NodeId, Member>) -> bool {
        match m.state {
            ServerState::Leader => m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= self.lease_ms()),
            ServerState::Follower | ServerState::Learner => {
                let last = self.leader_contact.load(Ordering::Relaxed);
                m.current_leader.is_some()
                    && last > 0
                    && self.now_ms().saturating_sub(last) <= self.lease_ms()
            }
            ServerState::Candidate | ServerState::Shutdown => false,
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let m = self.metrics();
        let (users, bindings, dialplan_version, calls, draining, domain) = {
            let a = self.applied.read().unwrap_or_else(|e| e.into_inner());
            (
                a.state.users.len() as u64,
                a.state.binding_count() as u64,
                a.state.dialplan.as_ref().map_or(0, |d| d.version),
                a.state.calls.len() as u64,
                a.state.draining.iter().copied().collect(),
                a.state
                    .settings
                    .as_ref()
                    .map(|s| s.domain.clone())
                    .unwrap_or_default(),
            )
        };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let serving_writes = self.serving_writes_in(&m);
        NodeStatus {
            node_id: self.config.node_id,
            role: role(m.state),
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            serving_writes,
            ready: serving_writes && self.ready.load(Ordering::Relaxed),
            members: membership
                .nodes()
                .map(|(id, n)| (*id, n.clone(), voters.contains(id)))
                .collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            users,
            bindings,
            dialplan_version,
            calls,
            draining,
            domain,
        }
    }

    /// Commits a command on this node as leader, stamping the leader's clock into it.
    pub(crate) async fn commit_as_leader(
        &self,
        mut command: Command,
    ) -> Result<Response, LeaderCommitError> {
        let commit = async {
            // Held while leadership is handed over: then this node is no longer leader.
            let _gate = self.write_gate.read().await;
            let (leader, quorum_ack_ms) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.millis_since_quorum_ack)
            };
            if leader != Some(self.config.node_id) {
                return Err(LeaderCommitError::NotLeader(leader));
            }
            // A leader that has not heard from a majority for a lease would only append
            // the entry where it may commit long after the client was told 503: refuse
            // it unwritten. (None: just elected, its first acks are on their way.)
            if let Some(ms) = quorum_ack_ms.filter(|ms| *ms > self.lease_ms()) {
                return Err(LeaderCommitError::Unavailable(format!(
                    "no majority heard from for {ms} ms: not written"
                )));
            }
            command.stamp(unix_ms());
            match self.raft.client_write(command).await {
                Ok(resp) => Ok(resp.data),
                Err(OpenraftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Err(LeaderCommitError::NotLeader(f.leader_id))
                }
                Err(e) => Err(LeaderCommitError::Unavailable(e.to_string())),
            }
        };
        match tokio::time::timeout(self.config.write_timeout, commit).await {
            Ok(r) => r,
            Err(_) => Err(LeaderCommitError::Unavailable(format!(
                "not committed within {} ms: no majority reachable",
                self.config.write_timeout.as_millis()
            ))),
        }
    }

    /// Commits a command wherever the leader is: here, or forwarded over the peer link.
    /// Retries only where the command certainly was not applied (no leader yet, "not
    /// the leader", leader unreachable), until the write timeout.
    async fn commit(&self, command: Command) -> Result<Response, String> {
        let deadline = Instant::now() + self.config.write_timeout;
        // A node that has known for a while that it cannot commit answers at once.
        let since = self.not_serving_since.load(Ordering::Relaxed);
        if since > 0 && self.now_ms().saturating_sub(since) > 2 * self.lease_ms() {
            return Err("this node is cut off from the cluster majority".into());
        }
        let mut metrics = self.raft.metrics();
        let mut encoded: Option<Vec<u8>> = None;
        let mut last_error = String::from("no leader elected");
        loop {
            // Only the leader and its address, not a copy of all metrics per batch.
            let (leader, leader_addr) = {
                let m = metrics.borrow_and_update();
                let addr = m.current_leader.and_then(|id| {
                    m.membership_config
                        .membership()
                        .get_node(&id)
                        .map(|n| n.peer_addr.clone())
                });
                (m.current_leader, addr)
            };
            match leader {
                Some(id) if id == self.config.node_id => {
                    match self.commit_as_leader(command.clone()).await {
                        Ok(r) => return Ok(r),
                        Err(LeaderCommitError::Unavailable(e)) => return Err(e),
                        Err(LeaderCommitError::NotLeader(_)) => {
                            last_error = "leadership moved".into();
                        }
                    }
                }
                Some(id) => {
                    let Some(leader_addr) = leader_addr else {
                        return Err(format!("leader {id} is not in the membership"));
                    };
                    let bytes = match &encoded {
                        Some(b) => b.clone(),
                        None => {
                            let b = bincode::serialize(&command).map_err(|e| e.to_string())?;
                            encoded = Some(b.clone());
                            b
                        }
                    };
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let forwarded = self.pool.forward(
                        id,
                        &leader_addr,
                        bytes,
                        remaining.max(Duration::from_millis(1)),
                    );
                    let outcome = tokio::select! {
                        r = forwarded => r,
                        () = self.replaced_while_silent(id) => {
                            return Err(format!(
                                "leader {id} was replaced while the write was in flight \
                                 (not known to be committed)"
                            ));
                        }
                    };
                    match outcome {
                        Ok(reply) => match reply.result {
                            Some(ForwardResult::Response(b)) => {
                                return bincode::deserialize(&b).map_err(|e| e.to_string());
                            }
                            Some(ForwardResult::Unavailable(e)) => return Err(e),
                            Some(ForwardResult::NotLeader(_)) | None => {
                                last_error = format!("node {id} is no longer the leader");
                            }
                        },
                        Err(PeerError::Unreachable(m)) => {
                            // The leader is gone or unreachable; nothing was delivered.
                            last_error = format!("leader unreachable: {m}");
                        }
                        Err(e) => return Err(format!("leader {id}: {e}")),
                    }
                }
                None => {}
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last_error);
            }
            // Wait for the leader to change (or poll again shortly).
            let _ =
                tokio::time::timeout(remaining.min(Duration::from_millis(100)), metrics.changed())
                    .await;
        }
    }

    /// Returns once another node leads and `old` has not answered a probe lately: a
    /// hung leader would hold a write forwarded to it until the write timeout; the
    /// answer is then "not known to be committed" at once (the old leader may have
    /// replicated it before it hung, so it is not sent again). A leader that answers
    /// (a planned hand-over) finishes its forwards itself: held writes come back "not
    /// the leader" and go to the new one.
    async fn replaced_while_silent(&self, old: NodeId) {
        // Checked on a timer, not on every metrics change: forwards normally finish
        // long before the first tick.
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let other = self
                .raft
                .metrics()
                .borrow()
                .current_leader
                .is_some_and(|l| l != old);
            let silent = !crate::lock(&self.probes).answered_within(
                old,
                Instant::now(),
                self.config.election_timeout_min,
            );
            if other && silent {
                return;
            }
        }
    }
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Response, PeerError>>,
}

/// Replicated state of one node: propose, read, status, membership.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Proposal>,
    /// The peer link's bound address.
    pub peer_addr: SocketAddr,
    _runtime: Arc<PeerRuntime>,
}

/// Raft, the peer link (server and client connections), the probes and the proposal
/// batcher run on a runtime of their own: SIP work that saturates the node's main
/// runtime must not delay heartbeats and probe answers, or a busy node would look dead
/// to the others (and cut off to itself) and its calls would move under load. The OS
/// shares the cores between both runtimes' threads. Stopped with the last `Cluster`.
struct PeerRuntime(Option<tokio::runtime::Runtime>);

impl PeerRuntime {
    fn new(node: NodeId) -> Result<PeerRuntime, PeerError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("raft-{node}"))
            .enable_all()
            .build()
            .map(|rt| PeerRuntime(Some(rt)))
            .map_err(|e| PeerError::Transport(format!("peer link runtime: {e}")))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for PeerRuntime {
    fn drop(&mut self) {
        // Dropped from async code: a blocking shutdown would panic there.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Read access to the applied state.
pub struct StateGuard<'a>(RwLockReadGuard<'a, Applied>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0.state
    }
}

impl Cluster {
    /// Opens the stores, starts Raft and the peer link on `listener` (bound already, so
    /// tests can bind port 0 and name the address to the other members first), and forms
    /// the cluster if this node is the one to initialise it.
    pub async fn start_on(
        config: ClusterConfig,
        store: Arc<dyn LogStore>,
        listener: std::net::TcpListener,
    ) -> Result<Cluster, PeerError> {
        let runtime = PeerRuntime::new(config.node_id)?;
        let (shared, tx, peer_addr) = runtime
            .handle()
            .spawn(Self::start_here(config, store, listener))
            .await
            .map_err(|e| PeerError::Transport(format!("peer link runtime: {e}")))??;
        Ok(Cluster {
            shared,
            tx,
            peer_addr,
            _runtime: Arc::new(runtime),
        })
    }

    /// Starts Raft, the peer-link server and the background tasks on the current
    /// runtime (the peer link's own).
    async fn start_here(
        config: ClusterConfig,
        store: Arc<dyn LogStore>,
        listener: std::net::TcpListener,
    ) -> Result<(Arc<Shared>, mpsc::Sender<Proposal>, SocketAddr), PeerError> {
        let started = Instant::now();
        let peer_addr = listener
            .local_addr()
            .and_then(|a| listener.set_nonblocking(true).map(|()| a))
            .map_err(|e| PeerError::Transport(format!("peer link listener: {e}")))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| PeerError::Transport(format!("peer link on {peer_addr}: {e}")))?;
        let has_state = LogStorage::has_raft_state(&*store).map_err(pbx_raft::RaftError::from)?;
        let storage = Arc::new(StorageHealth::default());
        let sm = StateMachineStore::open(store.clone(), storage.clone())?;
        let applied = sm.applied();
        let log = LogStorage::new(store.clone(), storage.clone());
        let raft_config = openraft::Config {
            cluster_name: config.cluster_id.clone(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.election_timeout_max.as_millis() as u64,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            snapshot_max_chunk_size: 4 << 20,
            max_in_snapshot_log_to_keep: config.log_kept_after_snapshot,
            // Entries are batches of up to max_batch commands: keep messages bounded.
            max_payload_entries: 32,
            ..Default::default()
        }
        .validate()
        .map_err(|e| PeerError::Config(e.to_string()))?;
        let pool = PeerPool::new(
            Identity {
                cluster_id: config.cluster_id.clone(),
                node_id: config.node_id,
            },
            (!peer_addr.ip().is_unspecified()).then_some(peer_addr.ip()),
            config.connect_timeout,
            config.write_timeout,
            config.faults.clone(),
        )?;
        let config_liveness = config.liveness;
        let raft = Raft::new(config.node_id, Arc::new(raft_config), pool.clone(), log, sm)
            .await
            .map_err(|e| PeerError::Raft(e.to_string()))?;
        let shared = Arc::new(Shared {
            config,
            raft,
            applied,
            pool,
            store,
            storage,
            epoch: Instant::now(),
            leader_contact: AtomicU64::new(0),
            not_serving_since: AtomicU64::new(1),
            leading_since: AtomicU64::new(0),
            stats: Arc::new(CommitStats::default()),
            rpcs: crate::RpcCounts::default(),
            elections: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            started_empty: AtomicBool::new(!has_state),
            sip_relay: std::sync::OnceLock::new(),
            call_control: std::sync::OnceLock::new(),
            blobs: std::sync::OnceLock::new(),
            write_gate: tokio::sync::RwLock::new(()),
            probes: Arc::new(std::sync::Mutex::new(crate::liveness::Probes::new(
                config_liveness,
                Instant::now(),
            ))),
            stopped: tokio::sync::watch::channel(false).0,
        });
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Probes that time out reset their streams; h2's default allows 20 pending
            // such resets before it drops the connection (rapid-reset protection),
            // which a member's burst of late probes must not reach.
            .http2_max_pending_accept_reset_streams(Some(1024))
            .add_service(PeerService::server(shared.clone()));
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stopped = shared.stopped.subscribe();
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::spawn(async move {
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "peer link server stopped");
            }
        });
        {
            let a = shared.applied.read().unwrap_or_else(|e| e.into_inner());
            tracing::info!(
                node = shared.config.node_id,
                %peer_addr,
                applied_index = a.last_applied.map_or(0, |l| l.index),
                users = a.state.users.len(),
                bindings = a.state.binding_count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "raft started"
            );
        }
        tokio::spawn(form(shared.clone()));
        tokio::spawn(watch_serving(shared.clone()));
        tokio::spawn(crate::liveness::run(shared.clone(), shared.probes.clone()));
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(batcher(shared.clone(), rx));
        Ok((shared, tx, peer_addr))
    }

    /// Commits a command through Raft; the response comes once it is committed on a
    /// majority and applied here. `Unavailable` means it could not be committed now
    /// (answer 503): it was not acknowledged, though it may still commit.
    pub async fn propose(&self, command: Command) -> Result<Response, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { command, reply })
            .await
            .map_err(|_| PeerError::Unavailable("proposer stopped".into()))?;
        rx.await
            .map_err(|_| PeerError::Unavailable("proposer stopped".into()))?
    }

    /// What this node's probes say of member `node` (ADR 0010).
    pub fn peer_state(&self, node: NodeId) -> crate::PeerState {
        if node == self.shared.config.node_id {
            return crate::PeerState::Alive;
        }
        crate::lock(&self.shared.probes).state(node, Instant::now())
    }

    /// The voting members, by id.
    pub fn voters(&self) -> Vec<NodeId> {
        self.shared
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// How long no majority of the voters (this node included) has answered this
    /// node's probes: past `fence_after` its calls may be adopted by the others, so it
    /// stops acting on them (fencing, ADR 0010). Zero while a majority answers.
    pub fn cut_off_for(&self) -> Duration {
        crate::lock(&self.shared.probes).cut_off_for(Instant::now())
    }

    /// The applied state (local read: every node answers for every user).
    pub fn read(&self) -> StateGuard<'_> {
        StateGuard(
            self.shared
                .applied
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    pub fn stats(&self) -> &Arc<CommitStats> {
        &self.shared.stats
    }

    /// The snapshot this node holds, if any.
    pub fn snapshot_info(&self) -> Option<pbx_raft::store::SnapshotInfo> {
        self.shared
            .applied
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot
    }

    /// The peer-link RPCs this node served, by method and status.
    pub fn rpc_counts(&self) -> &crate::RpcCounts {
        &self.shared.rpcs
    }

    /// (elections seen, leader changes seen) since this node started.
    pub fn elections_seen(&self) -> (u64, u64) {
        (
            self.shared.elections.load(Ordering::Relaxed),
            self.shared.leader_changes.load(Ordering::Relaxed),
        )
    }

    /// Whether this node's store works: why not and since when (unix ms) during an
    /// outage (a full disk), and the outages since start.
    pub fn storage_health(&self) -> &StorageHealth {
        &self.shared.storage
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.config.node_id
    }

    pub fn is_leader(&self) -> bool {
        self.shared.current_leader() == Some(self.shared.config.node_id)
    }

    /// Before a planned stop (SIGTERM): a leader hands leadership to the most caught-up
    /// other voter, so writes wait about one lease and go to the new leader, instead of
    /// failing until an election after the process is gone. False when this node does
    /// not lead or no other voter answers its probes (a cluster going down as a whole).
    pub async fn hand_over_leadership(&self) -> Result<bool, PeerError> {
        let me = self.shared.config.node_id;
        if !self.is_leader()
            || !self
                .voters()
                .into_iter()
                .any(|v| v != me && self.peer_state(v) == crate::PeerState::Alive)
        {
            return Ok(false);
        }
        self.shared.transfer_leadership(None).await.map(|_| true)
    }

    /// Hands leadership to `to` (or the most caught-up other voter); this node must
    /// lead (`pbxctl cluster transfer-leader` reaches it through the Manage RPC).
    pub async fn transfer_leadership(
        &self,
        to: Option<NodeId>,
    ) -> Result<crate::HandOver, PeerError> {
        if !self.is_leader() {
            return Err(PeerError::NotLeader(self.shared.current_leader()));
        }
        self.shared.transfer_leadership(to).await
    }

    /// Whether a write sent here now would be committed (leader with a recent majority,
    /// or follower in recent contact with one).
    pub fn serving_writes(&self) -> bool {
        let m = self.shared.metrics();
        self.shared.serving_writes_in(&m)
    }

    pub fn status(&self) -> NodeStatus {
        self.shared.status()
    }

    /// openraft's metrics of this node, to wait on (role, leader, log and applied
    /// indexes change through it).
    pub fn metrics(&self) -> tokio::sync::watch::Receiver<RaftMetrics<NodeId, Member>> {
        self.shared.raft.metrics()
    }

    /// Installs the receiver of relayed SIP messages (once).
    pub fn set_sip_relay(&self, relay: Arc<dyn SipRelay>) {
        let _ = self.shared.sip_relay.set(relay);
    }

    /// Sends a SIP message to a phone through `node`, which holds its connection (or,
    /// `from_phone`, a phone's message to the node running its call). Ok(false): the
    /// node has no such connection.
    pub async fn relay(
        &self,
        node: NodeId,
        phone: SocketAddr,
        message: Vec<u8>,
        from_phone: bool,
    ) -> Result<bool, PeerError> {
        let mut client = self.shared.peer_client(node)?;
        let mut req = tonic::Request::new(pbx_proto::peer::RelayRequest {
            phone: phone.to_string(),
            message,
            from_phone,
        });
        req.set_timeout(Duration::from_secs(2));
        let reply = client
            .relay(req)
            .await
            .map_err(|s| PeerError::from_status(node, s))?;
        Ok(reply.into_inner().delivered)
    }

    /// Whether the node's start-up writes are done ([`Cluster::set_ready`]).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// Marks the node's start-up writes as done (see [`NodeStatus::ready`]).
    pub fn set_ready(&self) {
        self.shared.ready.store(true, Ordering::Relaxed);
    }

    /// Carries out a cluster operation on the node it concerns (the leader, or `on` /
    /// this node for a snapshot), reached over the peer link if need be; answers with
    /// that node's status afterwards.
    /// Errors: `Refused`, `UnknownNode`, or else `Unavailable` (nothing was changed).
    pub async fn manage(&self, op: ManageOp, on: Option<NodeId>) -> Result<NodeStatus, PeerError> {
        self.shared.manage(op, on).await.map_err(|e| match e {
            PeerError::Refused(_) | PeerError::UnknownNode(_) | PeerError::Unavailable(_) => e,
            PeerError::Unreachable(m) | PeerError::Transport(m) => PeerError::Unavailable(m),
            other => PeerError::Unavailable(other.to_string()),
        })
    }

    /// Asks a member for its status over the peer link (a liveness probe): Err when it
    /// does not answer within `timeout`.
    pub async fn peer_status(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<NodeStatus, PeerError> {
        if node == self.shared.config.node_id {
            return Ok(self.status());
        }
        let mut client = self.shared.peer_client(node)?;
        let mut req = tonic::Request::new(pbx_proto::peer::StatusRequest {});
        req.set_timeout(timeout);
        let reply = client
            .status(req)
            .await
            .map_err(|s| PeerError::from_status(node, s))?;
        Ok(reply.into_inner().into())
    }

    /// A read barrier: waits (up to `limit`) until this node has applied everything the
    /// leader had applied when asked, so that decisions taken on the local state (which
    /// calls are this node's) are not taken on a state a restart left behind. True once
    /// caught up; false without a leader or in time.
    pub async fn catch_up(&self, limit: Duration) -> bool {
        let Some(leader) = self.shared.current_leader() else {
            return false;
        };
        let target = if leader == self.shared.config.node_id {
            return true; // the leader applies what it commits before anyone else
        } else {
            match self.peer_status(leader, limit).await {
                Ok(s) => s.applied_index,
                Err(_) => return false,
            }
        };
        let mut metrics = self.metrics();
        tokio::time::timeout(
            limit,
            metrics.wait_for(|m| m.last_applied.is_some_and(|l| l.index >= target)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Installs the node's call control (once).
    pub fn set_call_control(&self, control: Arc<dyn CallControl>) {
        let _ = self.shared.call_control.set(control);
    }

    /// Media counters of the calls `node` runs among `call_ids` (hung up with `hangup`).
    pub async fn call_control(
        &self,
        node: NodeId,
        call_ids: Vec<String>,
        hangup: bool,
    ) -> Result<Vec<CallMedia>, PeerError> {
        if node == self.shared.config.node_id {
            return Ok(match self.shared.call_control.get() {
                Some(c) => c.calls(call_ids, hangup).await,
                None => Vec::new(),
            });
        }
        let mut client = self.shared.peer_client(node)?;
        let mut req = tonic::Request::new(pbx_proto::peer::CallControlRequest { call_ids, hangup });
        req.set_timeout(Duration::from_secs(2));
        let reply = client
            .call_control(req)
            .await
            .map_err(|s| PeerError::from_status(node, s))?;
        Ok(reply
            .into_inner()
            .calls
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Where this node keeps blobs: served to the other members ([`Cluster::put_blob`],
    /// [`Cluster::get_blob`]).
    pub fn serve_blobs(&self, blobs: Arc<dyn pbx_storage::BlobStore>) {
        let _ = self.shared.blobs.set(blobs);
    }

    /// Stores a blob on `node` (this node included): Ok once it is on that node's disk.
    pub async fn put_blob(&self, node: NodeId, data: Arc<[u8]>) -> Result<BlobId, PeerError> {
        let id = BlobId::of(&data);
        if node == self.shared.config.node_id {
            let blobs = self.shared.local_blobs()?;
            return tokio::task::spawn_blocking(move || blobs.put(&data))
                .await
                .map_err(|e| PeerError::Blob(e.to_string()))?
                .map_err(|e| PeerError::Blob(e.to_string()));
        }
        let mut client = self.shared.peer_client(node)?;
        let mut req = tonic::Request::new(pbx_proto::peer::PutBlobRequest {
            id: id.to_string(),
            data: data.to_vec(),
        });
        req.set_timeout(BLOB_TIMEOUT);
        client
            .put_blob(req)
            .await
            .map_err(|s| PeerError::from_status(node, s))?;
        Ok(id)
    }

    /// Stores a blob on this node and every other voter at once, and answers when a
    /// majority of the voters hold it on disk (ADR 0014: only then may a voicemail be
    /// called saved): its name and the voters that hold it so far. The copies still
    /// under way carry on in the background. A majority not reached: why.
    pub async fn put_blob_on_majority(
        &self,
        data: Arc<[u8]>,
    ) -> Result<(BlobId, Vec<NodeId>), PeerError> {
        let voters = self.voters();
        let need = voters.len() / 2 + 1;
        let (tx, mut rx) = mpsc::unbounded_channel();
        for node in voters.iter().copied() {
            let (me, data, tx) = (self.clone(), data.clone(), tx.clone());
            tokio::spawn(async move {
                let r = me.put_blob(node, data).await;
                let _ = tx.send((node, r));
            });
        }
        drop(tx);
        let mut holders = Vec::new();
        let mut failures = Vec::new();
        while let Some((node, r)) = rx.recv().await {
            match r {
                Ok(_) => holders.push(node),
                Err(e) => failures.push(format!("node {node}: {e}")),
            }
            if holders.len() >= need {
                holders.sort_unstable();
                return Ok((BlobId::of(&data), holders));
            }
            if failures.len() > voters.len() - need {
                break;
            }
        }
        Err(PeerError::Unavailable(format!(
            "a blob reached {} of the {} voters it needs: {}",
            holders.len(),
            need,
            failures.join("; ")
        )))
    }

    /// The blob named `blob` from this node if it holds it, else from `holders`, else
    /// from any other voter (a holder list can trail a copy); `None` when no member gave
    /// it (or the name is not a blob's).
    pub async fn fetch_blob(&self, blob: &str, holders: &[NodeId]) -> Option<Vec<u8>> {
        let Ok(id) = blob.parse::<BlobId>() else {
            tracing::warn!(blob, "not a blob name");
            return None;
        };
        let me = self.node_id();
        let mut order = vec![me];
        order.extend(holders.iter().copied().filter(|n| *n != me));
        order.extend(
            self.voters()
                .into_iter()
                .filter(|n| *n != me && !holders.contains(n)),
        );
        for node in order {
            match self.get_blob(node, id).await {
                Ok(Some(data)) => return Some(data),
                Ok(None) => {}
                Err(e) => tracing::warn!(node, blob = %id, error = %e, "blob not fetched"),
            }
        }
        tracing::error!(blob = %id, "no member gave the blob");
        None
    }

    /// The blob `id` from `node` (this node included), checked against its name;
    /// `None` when that node does not hold it.
    pub async fn get_blob(&self, node: NodeId, id: BlobId) -> Result<Option<Vec<u8>>, PeerError> {
        if node == self.shared.config.node_id {
            let blobs = self.shared.local_blobs()?;
            return tokio::task::spawn_blocking(move || blobs.get(&id))
                .await
                .map_err(|e| PeerError::Blob(e.to_string()))?
                .map_err(|e| PeerError::Blob(e.to_string()));
        }
        let mut client = self.shared.peer_client(node)?;
        let mut req = tonic::Request::new(pbx_proto::peer::GetBlobRequest { id: id.to_string() });
        req.set_timeout(BLOB_TIMEOUT);
        let reply = client
            .get_blob(req)
            .await
            .map_err(|s| PeerError::from_status(node, s))?
            .into_inner();
        if !reply.found {
            return Ok(None);
        }
        if BlobId::of(&reply.data) != id {
            return Err(PeerError::Blob(format!(
                "node {node} sent blob {id} with other content"
            )));
        }
        Ok(Some(reply.data))
    }

    pub async fn shutdown(&self) {
        let _ = self.shared.raft.shutdown().await;
        self.shared.stopped.send_replace(true);
    }
}

/// Collects proposals into batches, one log entry each: while a batch is being
/// committed the next one fills up (group commit, so throughput follows load).
async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Proposal>) {
    let inflight = Arc::new(Semaphore::new(shared.config.max_inflight.max(1)));
    loop {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < shared.config.max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            submit(&shared, batch).await;
            drop(permit);
        });
    }
}

async fn submit(shared: &Shared, batch: Vec<Proposal>) {
    let n = batch.len();
    let (mut commands, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let command = if n == 1 {
        commands.pop().expect("one command")
    } else {
        Command::Batch(commands)
    };
    let started = Instant::now();
    match shared.commit(command).await {
        Ok(resp) => {
            shared.stats.record(n as u64, started.elapsed());
            match resp {
                Response::Batch(list) if n > 1 && list.len() == n => {
                    for (r, reply) in list.into_iter().zip(replies) {
                        let _ = reply.send(Ok(r));
                    }
                }
                r if n == 1 => {
                    if let Some(reply) = replies.into_iter().next() {
                        let _ = reply.send(Ok(r));
                    }
                }
                other => {
                    tracing::error!(?other, n, "batch answered with a mismatched response");
                    for reply in replies {
                        let _ =
                            reply.send(Err(PeerError::Raft("mismatched batch response".into())));
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, n, "batch not committed");
            for reply in replies {
                let _ = reply.send(Err(PeerError::Unavailable(e.clone())));
            }
        }
    }
}

/// Forms a brand-new cluster: only the lowest-id initial member initialises it, and only
/// after a majority of the initial members answered the handshake and none of them (nor
/// itself) has Raft state. A restarted or wiped node never initialises a formed cluster:
/// its peers report state, and the leader brings it up to date.
async fn form(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let members = &cfg.initial_members;
    if members.keys().next() != Some(&cfg.node_id) {
        return;
    }
    let majority = members.len() / 2 + 1;
    let mut logged = false;
    loop {
        if shared.has_raft_state().await {
            return;
        }
        let mut fresh = 1; // this node
        let mut formed = false;
        for (id, m) in members.iter().filter(|(id, _)| **id != cfg.node_id) {
            match shared.pool.handshake(*id, &m.peer_addr).await {
                Ok(reply) if reply.initialized => formed = true,
                Ok(_) => fresh += 1,
                Err(e) => {
                    if !logged {
                        tracing::info!(peer = id, error = %e, "waiting for initial members");
                    }
                }
            }
        }
        logged = true;
        if formed {
            tracing::info!("a member already has cluster state: joining, not initialising");
            return;
        }
        if fresh >= majority {
            match shared.raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!(
                    members = ?members.keys().collect::<Vec<_>>(),
                    "cluster initialised"
                ),
                Err(e) => tracing::info!(error = %e, "cluster already initialised"),
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Watches whether this node can commit writes and logs each change, so an operator sees
/// "not serving writes" the moment a node loses the majority.
async fn watch_serving(shared: Arc<Shared>) {
    let mut metrics = shared.raft.metrics();
    let mut was: Option<bool> = None;
    let mut last_role = "";
    // The first look sets the baseline: what happened before this process is not seen.
    let mut last_term: Option<u64> = None;
    let mut last_leader: Option<NodeId> = None;
    loop {
        let m = metrics.borrow_and_update().clone();
        if matches!(m.state, ServerState::Shutdown) {
            return;
        }
        if let Some(t) = last_term {
            shared
                .elections
                .fetch_add(m.current_term.saturating_sub(t), Ordering::Relaxed);
        }
        last_term = Some(last_term.unwrap_or(0).max(m.current_term));
        if let Some(leader) = m.current_leader {
            if last_leader.is_some_and(|l| l != leader) {
                shared.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            last_leader = Some(leader);
        }
        let serving = shared.serving_writes_in(&m);
        if was != Some(serving) {
            if serving {
                shared.not_serving_since.store(0, Ordering::Relaxed);
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "serving writes");
            } else {
                shared
                    .not_serving_since
                    .store(shared.now_ms(), Ordering::Relaxed);
                if was.is_some() {
                    tracing::warn!(
                        leader = ?m.current_leader,
                        term = m.current_term,
                        role = role(m.state),
                        "not serving writes: no contact with a majority; REGISTER gets 503"
                    );
                }
            }
            was = Some(serving);
        }
        let r = role(m.state);
        if r != last_role {
            if m.state == ServerState::Leader {
                shared
                    .leading_since
                    .store(shared.now_ms(), Ordering::Relaxed);
            }
            tracing::info!(role = r, term = m.current_term, leader = ?m.current_leader, "raft role");
            last_role = r;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
    }
}
