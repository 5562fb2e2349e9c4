//! The admin API server (`proto/pbx/admin/v1`): bearer-token authentication, then each
//! call read from the applied state or proposed as a Raft command (a follower forwards it
//! to the leader). Errors become `tonic::Status` here and nowhere else.
//!
//! The node starts it with [`serve`], handing in its listener, the token, the TLS
//! material and the [`Cluster`] handle (which also reaches the calls each node runs).

use std::net::SocketAddr;
use std::sync::Arc;

use pbx_dialplan::{Dialplan, DialplanError};
use pbx_peer::{Cluster, ManageOp, NodeStatus, PeerError};
use pbx_proto::admin::admin_server::{Admin, AdminServer};
use pbx_proto::admin::{
    AuditEntry, AuditListReply, AuditListRequest, Call, CallHangupReply, CallHangupRequest,
    CallListReply, CallListRequest, CdrListReply, CdrListRequest, ClusterAddNodeRequest,
    ClusterNodeRequest, ClusterStatusRequest, DialplanHistoryReply, DialplanHistoryRequest,
    DialplanRollbackRequest, DialplanShowRequest, DialplanText, DialplanVerdict, LineError,
    NodeDrainReply, NodeDrainRequest, Registration, RegistrationListReply, RegistrationListRequest,
    RegistrationRemoveReply, RegistrationRemoveRequest, StoredDialplan, User, UserAddRequest,
    UserListReply, UserListRequest, UserRemoveReply, UserRemoveRequest, UserUpdateRequest,
    VoicemailDeleteReply, VoicemailFetchReply, VoicemailListReply, VoicemailListRequest,
    VoicemailMessageRequest, VoicemailSetPinRequest,
};
use pbx_proto::common::{MediaStream, NodeStatus as StatusReply};
use pbx_registrar::digest::{constant_time_eq, ha1, Algorithm};
use pbx_state::{Command, Response};
use tonic::{Request, Status};

/// The admin API's TLS material (PEM).
pub struct AdminTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Client certificates must be signed by this CA (mutual TLS), when set.
    pub client_ca: Option<Vec<u8>>,
}

/// Errors of this crate: why the server could not start, or why a call failed (before
/// it becomes a `tonic::Status`).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin listener: {0}")]
    Listener(std::io::Error),
    #[error("admin TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotFound(String),
    /// No leader or no majority: nothing was changed.
    #[error("no quorum, not committed: {0}")]
    NoQuorum(String),
    /// A cluster change that does not fit the membership as it stands.
    #[error("{0}")]
    Refused(String),
    /// A node the operation needs could not be reached.
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<PeerError> for AdminError {
    fn from(e: PeerError) -> AdminError {
        match e {
            PeerError::Refused(m) => AdminError::Refused(m),
            PeerError::UnknownNode(id) => {
                AdminError::NotFound(format!("node {id} is not a member"))
            }
            PeerError::Transport(m) | PeerError::Unreachable(m) => AdminError::Unreachable(m),
            other => AdminError::NoQuorum(other.to_string()),
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let m = e.to_string();
        match e {
            AdminError::Invalid(_) => Status::invalid_argument(m),
            AdminError::Exists(_) => Status::already_exists(m),
            AdminError::NotFound(_) => Status::not_found(m),
            AdminError::NoQuorum(_) | AdminError::Unreachable(_) => Status::unavailable(m),
            AdminError::Refused(_) => Status::failed_precondition(m),
            AdminError::Internal(_) | AdminError::Listener(_) | AdminError::Tls(_) => {
                Status::internal(m)
            }
        }
    }
}

/// Checks `authorization: Bearer <token>`. The token is never logged.
#[derive(Clone)]
struct TokenCheck(Arc<str>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), self.0.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong admin token (authorization: Bearer …)",
            ))
        }
    }
}

struct AdminService {
    cluster: Cluster,
}

/// Serves the admin API on `listener` until the task is aborted (over TLS, and with
/// client certificates checked, when configured). Every call must carry
/// `authorization: Bearer <token>`.
pub fn serve(
    listener: std::net::TcpListener,
    token: String,
    tls: Option<AdminTls>,
    cluster: Cluster,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    listener
        .set_nonblocking(true)
        .map_err(AdminError::Listener)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(AdminError::Listener)?;
    let service = AdminServer::with_interceptor(AdminService { cluster }, TokenCheck(token.into()));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key));
        if let Some(ca) = tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| AdminError::Tls(e.to_string()))?;
    }
    Ok(tokio::spawn(async move {
        let server = builder.add_service(service);
        if let Err(e) = server.serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}

fn stored(d: &pbx_state::StoredDialplan) -> StoredDialplan {
    StoredDialplan {
        version: d.version,
        source: d.source.clone(),
        committed_at_ms: d.committed_at_ms,
    }
}

/// The verdict of the cluster's own validation (`version` 0: not committed).
fn verdict(source: &str) -> DialplanVerdict {
    match Dialplan::parse(source) {
        Ok(plan) => DialplanVerdict {
            errors: Vec::new(),
            version: 0,
            contexts: plan.contexts.len() as u32,
            extensions: plan.extension_count() as u32,
        },
        Err(DialplanError::Invalid(list)) => DialplanVerdict {
            errors: list
                .into_iter()
                .map(|e| LineError {
                    line: e.line as u32,
                    reason: e.reason,
                })
                .collect(),
            ..Default::default()
        },
        Err(other) => DialplanVerdict {
            errors: vec![LineError {
                line: 0,
                reason: other.to_string(),
            }],
            ..Default::default()
        },
    }
}

/// Who makes an admin call: the operator the client names (`x-pbx-actor`, printable,
/// at most 64 characters) and the address the call came from.
fn actor_of<T>(req: &Request<T>) -> String {
    let named: String = req
        .metadata()
        .get("x-pbx-actor")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unnamed")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    match req.remote_addr() {
        Some(a) => format!("{named} from {a}"),
        None => named,
    }
}

fn user_reply(u: &pbx_state::User) -> User {
    User {
        name: u.name.clone(),
        context: u.context.clone(),
        caller_id_name: u.caller_id_name.clone().unwrap_or_default(),
    }
}

/// A node's status as the API answers it: the peer link's status, which carries the
/// members' lags where it is the leader's, the drained nodes and the domain.
fn status_reply(s: NodeStatus) -> tonic::Response<StatusReply> {
    tonic::Response::new(s.into())
}

impl AdminService {
    /// Runs a cluster change and records it in the audit trail.
    async fn manage(
        &self,
        actor: &str,
        action: String,
        op: ManageOp,
        on: Option<u64>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let s = self
            .cluster
            .manage(op, on)
            .await
            .map_err(AdminError::from)?;
        self.record_done(actor, action).await;
        Ok(status_reply(s))
    }

    /// The audit entry of a change (the leader stamps the time).
    fn audit_entry(&self, actor: &str, action: String) -> Command {
        Command::Audit(pbx_state::AuditEntry {
            at_ms: 0,
            actor: actor.to_string(),
            node: self.cluster.node_id(),
            action,
        })
    }

    /// Audits a change that is not itself a command (membership, a hangup): done
    /// already, so a failure to record it is logged, not returned.
    async fn record_done(&self, actor: &str, action: String) {
        if let Err(e) = self
            .cluster
            .propose(self.audit_entry(actor, action.clone()))
            .await
        {
            tracing::warn!(%action, error = %e, "done but not audited");
        }
    }

    /// Asks each node running some of `calls` for their media counters (in parallel).
    async fn add_media(&self, calls: &mut [Call]) {
        let mut by_owner: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for c in calls.iter() {
            by_owner.entry(c.owner_node).or_default().push(c.id.clone());
        }
        let mut asks = tokio::task::JoinSet::new();
        for (owner, ids) in by_owner {
            let cluster = self.cluster.clone();
            asks.spawn(async move { (owner, cluster.call_control(owner, ids, false).await) });
        }
        while let Some(Ok((owner, answer))) = asks.join_next().await {
            match answer {
                Ok(list) => {
                    let mut by_id: std::collections::HashMap<String, Vec<MediaStream>> = list
                        .into_iter()
                        .map(|c| (c.call_id, c.streams.iter().map(Into::into).collect()))
                        .collect();
                    for c in calls.iter_mut().filter(|c| c.owner_node == owner) {
                        match by_id.remove(&c.id) {
                            Some(m) => c.media = m,
                            None => c.media_error = format!("node {owner} no longer runs it"),
                        }
                    }
                }
                Err(e) => {
                    for c in calls.iter_mut().filter(|c| c.owner_node == owner) {
                        c.media_error = e.to_string();
                    }
                }
            }
        }
    }

    fn realm(&self) -> Result<String, AdminError> {
        self.cluster
            .read()
            .settings
            .as_ref()
            .map(|s| s.realm.clone())
            .ok_or_else(|| AdminError::NoQuorum("the cluster is not initialised yet".into()))
    }

    /// Commits a change together with its audit entry (one log entry: both or none).
    async fn propose(
        &self,
        actor: &str,
        action: String,
        cmd: Command,
    ) -> Result<Response, AdminError> {
        let audit = self.audit_entry(actor, action);
        match self
            .cluster
            .propose(Command::Batch(vec![cmd, audit]))
            .await
            .map_err(|e| AdminError::NoQuorum(e.to_string()))?
        {
            Response::Batch(mut list) if !list.is_empty() => Ok(list.swap_remove(0)),
            other => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Validates, then commits a dialplan; an invalid one is answered with its errors
    /// and changes nothing.
    async fn commit_dialplan(
        &self,
        actor: &str,
        action: String,
        source: String,
    ) -> Result<DialplanVerdict, AdminError> {
        let mut v = verdict(&source);
        if !v.errors.is_empty() {
            return Ok(v);
        }
        let resp = self
            .propose(actor, action, Command::SetDialplan { source, now_ms: 0 })
            .await?;
        match resp {
            Response::DialplanVersion(version) => {
                tracing::info!(version, "dialplan committed through the admin API");
                v.version = version;
                Ok(v)
            }
            // Validated again inside apply; the same code, so this does not happen.
            Response::InvalidDialplan(list) => Ok(DialplanVerdict {
                errors: list
                    .into_iter()
                    .map(|reason| LineError { line: 0, reason })
                    .collect(),
                ..Default::default()
            }),
            other => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let s = if request.into_inner().from_leader {
            self.cluster
                .manage(ManageOp::Status, None)
                .await
                .map_err(AdminError::from)?
        } else {
            self.cluster.status()
        };
        Ok(status_reply(s))
    }

    async fn cluster_add_node(
        &self,
        request: Request<ClusterAddNodeRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let check_addr = |what: &str, a: &str| {
            a.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|_| AdminError::Invalid(format!("{what} address {a:?}: want IP:PORT")))
        };
        check_addr("peer", &r.peer_addr)?;
        check_addr("SIP", &r.sip_addr)?;
        let member = pbx_peer::Member {
            peer_addr: r.peer_addr,
            sip_addr: r.sip_addr,
        };
        let action = format!("cluster add-node {} ({member})", r.id);
        self.manage(
            &actor,
            action,
            ManageOp::AddLearner { id: r.id, member },
            None,
        )
        .await
    }

    async fn cluster_promote_node(
        &self,
        request: Request<ClusterNodeRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let actor = actor_of(&request);
        let id = request.into_inner().id;
        self.manage(
            &actor,
            format!("cluster promote {id}"),
            ManageOp::Promote { id },
            None,
        )
        .await
    }

    async fn cluster_remove_node(
        &self,
        request: Request<ClusterNodeRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let actor = actor_of(&request);
        let id = request.into_inner().id;
        let reply = self
            .manage(
                &actor,
                format!("cluster remove-node {id}"),
                ManageOp::Remove { id },
                None,
            )
            .await?;
        // Its call records and drain flag go with it (best effort: the membership
        // change is done).
        let cleanup = Command::Batch(vec![
            Command::CallsOfOwnerEnded { owner: id },
            Command::SetDraining {
                node: id,
                draining: false,
            },
        ]);
        if let Err(e) = self.cluster.propose(cleanup).await {
            tracing::warn!(node = id, error = %e, "removed node's call records not cleared");
        }
        Ok(reply)
    }

    async fn cluster_transfer_leader(
        &self,
        request: Request<ClusterNodeRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let actor = actor_of(&request);
        let id = request.into_inner().id;
        let to = (id != 0).then_some(id);
        let action = match to {
            Some(t) => format!("cluster transfer-leader to {t}"),
            None => "cluster transfer-leader".to_string(),
        };
        self.manage(&actor, action, ManageOp::TransferLeader { to }, None)
            .await
    }

    async fn cluster_snapshot(
        &self,
        request: Request<ClusterNodeRequest>,
    ) -> Result<tonic::Response<StatusReply>, Status> {
        let id = request.into_inner().id;
        let on = (id != 0).then_some(id);
        // Changes no replicated state: not audited.
        let s = self
            .cluster
            .manage(ManageOp::Snapshot, on)
            .await
            .map_err(AdminError::from)?;
        Ok(status_reply(s))
    }

    async fn dialplan_show(
        &self,
        _: Request<DialplanShowRequest>,
    ) -> Result<tonic::Response<StoredDialplan>, Status> {
        let state = self.cluster.read();
        let d = state
            .dialplan
            .as_ref()
            .ok_or_else(|| AdminError::NotFound("no dialplan committed yet".into()))?;
        Ok(tonic::Response::new(stored(d)))
    }

    async fn dialplan_validate(
        &self,
        request: Request<DialplanText>,
    ) -> Result<tonic::Response<DialplanVerdict>, Status> {
        Ok(tonic::Response::new(verdict(&request.into_inner().source)))
    }

    async fn dialplan_apply(
        &self,
        request: Request<DialplanText>,
    ) -> Result<tonic::Response<DialplanVerdict>, Status> {
        let actor = actor_of(&request);
        let source = request.into_inner().source;
        let action = format!("dialplan apply ({} lines)", source.lines().count());
        let v = self.commit_dialplan(&actor, action, source).await?;
        Ok(tonic::Response::new(v))
    }

    async fn dialplan_history(
        &self,
        _: Request<DialplanHistoryRequest>,
    ) -> Result<tonic::Response<DialplanHistoryReply>, Status> {
        let state = self.cluster.read();
        let dialplans = state
            .dialplan_history
            .iter()
            .chain(state.dialplan.as_ref())
            .map(stored)
            .collect();
        Ok(tonic::Response::new(DialplanHistoryReply { dialplans }))
    }

    async fn user_list(
        &self,
        _: Request<UserListRequest>,
    ) -> Result<tonic::Response<UserListReply>, Status> {
        let users = self.cluster.read().users.values().map(user_reply).collect();
        Ok(tonic::Response::new(UserListReply { users }))
    }

    async fn user_add(
        &self,
        request: Request<UserAddRequest>,
    ) -> Result<tonic::Response<User>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let u = self
            .upsert_user(
                &actor,
                r.name,
                Some(r.password),
                Some(r.context),
                Some(r.caller_id_name),
                false,
            )
            .await?;
        Ok(tonic::Response::new(u))
    }

    async fn user_update(
        &self,
        request: Request<UserUpdateRequest>,
    ) -> Result<tonic::Response<User>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let u = self
            .upsert_user(
                &actor,
                r.name,
                r.password,
                r.context,
                r.caller_id_name,
                true,
            )
            .await?;
        Ok(tonic::Response::new(u))
    }

    async fn user_remove(
        &self,
        request: Request<UserRemoveRequest>,
    ) -> Result<tonic::Response<UserRemoveReply>, Status> {
        let actor = actor_of(&request);
        let name = request.into_inner().name;
        if !self.cluster.read().users.contains_key(&name) {
            // Nothing to change, nothing to audit.
            return Err(AdminError::NotFound(format!("no user {name}")).into());
        }
        let registrations = self.cluster.read().bindings.get(&name).map_or(0, Vec::len) as u64;
        match self
            .propose(
                &actor,
                format!("user remove {name}"),
                Command::RemoveUser { name: name.clone() },
            )
            .await?
        {
            Response::NoSuchUser => Err(AdminError::NotFound(format!("no user {name}")).into()),
            _ => {
                tracing::info!(user = %name, "user removed through the admin API");
                Ok(tonic::Response::new(UserRemoveReply {
                    registrations_removed: registrations,
                }))
            }
        }
    }

    async fn registration_list(
        &self,
        request: Request<RegistrationListRequest>,
    ) -> Result<tonic::Response<RegistrationListReply>, Status> {
        let filter = request.into_inner().user;
        let now_ms = pbx_peer::unix_ms();
        let state = self.cluster.read();
        let mut registrations = Vec::new();
        let mut aors: Vec<&String> = state
            .bindings
            .keys()
            .filter(|a| filter.is_empty() || **a == filter)
            .collect();
        aors.sort();
        for aor in aors {
            for b in state.bindings_of(aor, now_ms) {
                registrations.push(Registration {
                    user: aor.clone(),
                    contact: b.uri.clone(),
                    expires_in_secs: b.remaining_secs(now_ms),
                    source: b.source.clone(),
                    transport: b.transport.as_str().to_string(),
                    node_id: b.node_id,
                    user_agent: b.user_agent.clone().unwrap_or_default(),
                });
            }
        }
        Ok(tonic::Response::new(RegistrationListReply {
            registrations,
        }))
    }

    async fn registration_remove(
        &self,
        request: Request<RegistrationRemoveRequest>,
    ) -> Result<tonic::Response<RegistrationRemoveReply>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        if !self.cluster.read().users.contains_key(&r.user) {
            return Err(AdminError::NotFound(format!("no user {}", r.user)).into());
        }
        let uri = (!r.contact.is_empty()).then_some(r.contact);
        let action = match &uri {
            Some(u) => format!("registrations remove {} {u}", r.user),
            None => format!("registrations remove {}", r.user),
        };
        let removed = match self
            .propose(&actor, action, Command::RemoveBindings { aor: r.user, uri })
            .await?
        {
            Response::Swept(n) => n as u64,
            _ => 0,
        };
        Ok(tonic::Response::new(RegistrationRemoveReply { removed }))
    }

    async fn call_list(
        &self,
        request: Request<CallListRequest>,
    ) -> Result<tonic::Response<CallListReply>, Status> {
        let no_media = request.into_inner().no_media;
        let now_ms = pbx_peer::unix_ms();
        let mut calls: Vec<Call> = self
            .cluster
            .read()
            .calls
            .values()
            .map(|c| Call {
                id: c.id.clone(),
                owner_node: c.owner,
                caller: c.caller.clone(),
                callee: c.callee.clone(),
                answered_at_ms: c.answered_at_ms,
                leg_call_ids: c.legs.iter().map(|l| l.call_id.clone()).collect(),
                duration_secs: now_ms.saturating_sub(c.answered_at_ms) / 1000,
                media: Vec::new(),
                media_error: String::new(),
            })
            .collect();
        calls.sort_by_key(|c| c.answered_at_ms);
        if !no_media {
            self.add_media(&mut calls).await;
        }
        Ok(tonic::Response::new(CallListReply { calls }))
    }

    async fn call_hangup(
        &self,
        request: Request<CallHangupRequest>,
    ) -> Result<tonic::Response<CallHangupReply>, Status> {
        let actor = actor_of(&request);
        let id = request.into_inner().id;
        let owner = self
            .cluster
            .read()
            .calls
            .get(&id)
            .map(|c| c.owner)
            .ok_or_else(|| AdminError::NotFound(format!("no answered call {id}")))?;
        let done = self
            .cluster
            .call_control(owner, vec![id.clone()], true)
            .await
            .map_err(AdminError::from)?;
        if done.is_empty() {
            return Err(
                AdminError::NotFound(format!("node {owner} no longer runs call {id}")).into(),
            );
        }
        tracing::info!(call = %id, owner, "call hung up through the admin API");
        self.record_done(&actor, format!("calls hangup {id} (on node {owner})"))
            .await;
        Ok(tonic::Response::new(CallHangupReply { owner_node: owner }))
    }

    async fn node_drain(
        &self,
        request: Request<NodeDrainRequest>,
    ) -> Result<tonic::Response<NodeDrainReply>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let node = if r.node_id == 0 {
            self.cluster.node_id()
        } else {
            r.node_id
        };
        let is_member = self
            .cluster
            .status()
            .members
            .iter()
            .any(|(id, _, _)| *id == node);
        if !is_member {
            return Err(AdminError::NotFound(format!("node {node} is not a member")).into());
        }
        if !r.query {
            let action = format!("node {} {node}", if r.drain { "drain" } else { "undrain" });
            self.propose(
                &actor,
                action,
                Command::SetDraining {
                    node,
                    draining: r.drain,
                },
            )
            .await?;
            tracing::info!(node, drain = r.drain, "drain changed through the admin API");
            if r.drain && r.migrate {
                // The calls go to the live members that are not drained (ADR 0010).
                let to = {
                    let state = self.cluster.read();
                    state.call_takers(node, &self.cluster.voters(), |n| {
                        self.cluster.peer_state(n) != pbx_peer::PeerState::Dead
                    })
                };
                if to.is_empty() {
                    return Err(AdminError::Invalid(format!(
                        "node {node}: no other live member to take its calls"
                    ))
                    .into());
                }
                let action = format!("node drain {node} --migrate (calls to {to:?})");
                self.propose(
                    &actor,
                    action,
                    Command::AdoptCalls {
                        from: node,
                        to,
                        only: None,
                        now_ms: pbx_peer::unix_ms(),
                    },
                )
                .await?;
                tracing::info!(node, "calls migrating through the admin API");
            }
        }
        let state = self.cluster.read();
        Ok(tonic::Response::new(NodeDrainReply {
            node_id: node,
            // Committed, but this node (a follower) may not have applied it yet.
            draining: if r.query {
                state.draining.contains(&node)
            } else {
                r.drain
            },
            calls: state.calls.values().filter(|c| c.owner == node).count() as u64,
        }))
    }

    async fn dialplan_rollback(
        &self,
        request: Request<DialplanRollbackRequest>,
    ) -> Result<tonic::Response<DialplanVerdict>, Status> {
        let actor = actor_of(&request);
        let version = request.into_inner().version;
        let source = {
            let state = self.cluster.read();
            state
                .dialplan_history
                .iter()
                .chain(state.dialplan.as_ref())
                .find(|d| d.version == version)
                .map(|d| d.source.clone())
                .ok_or_else(|| {
                    AdminError::NotFound(format!(
                        "dialplan version {version} is not in the history"
                    ))
                })?
        };
        let v = self
            .commit_dialplan(
                &actor,
                format!("dialplan rollback to version {version}"),
                source,
            )
            .await?;
        Ok(tonic::Response::new(v))
    }

    async fn audit_list(
        &self,
        request: Request<AuditListRequest>,
    ) -> Result<tonic::Response<AuditListReply>, Status> {
        let limit = request.into_inner().limit as usize;
        let state = self.cluster.read();
        let skip = if limit == 0 {
            0
        } else {
            state.audit.len().saturating_sub(limit)
        };
        let entries = state
            .audit
            .iter()
            .skip(skip)
            .map(|e| AuditEntry {
                at_ms: e.at_ms,
                actor: e.actor.clone(),
                node_id: e.node,
                action: e.action.clone(),
            })
            .collect();
        Ok(tonic::Response::new(AuditListReply { entries }))
    }

    async fn voicemail_list(
        &self,
        request: Request<VoicemailListRequest>,
    ) -> Result<tonic::Response<VoicemailListReply>, Status> {
        use pbx_state::voicemail::{Codec, Folder, Greeting};
        let want = request.into_inner().mailbox;
        let state = self.cluster.read();
        let keys: Vec<String> = if want.is_empty() {
            state.voicemail.boxes.keys().cloned().collect()
        } else {
            vec![want]
        };
        let mut mailboxes = Vec::new();
        for key in keys {
            let Some(m) = state.mailbox(&key) else {
                return Err(AdminError::NotFound(format!("no mailbox {key}")).into());
            };
            let (new, old) = state.voicemail.counts(&key);
            mailboxes.push(pbx_proto::admin::Mailbox {
                mailbox: key,
                has_pin: m.pin_hash.is_some(),
                new_messages: new as u32,
                old_messages: old as u32,
                messages: m
                    .messages
                    .values()
                    .map(|v| pbx_proto::admin::VoicemailMessage {
                        id: v.id,
                        folder: match v.folder {
                            Folder::Inbox => "INBOX",
                            Folder::Old => "Old",
                        }
                        .into(),
                        caller_id: v.caller_id.clone(),
                        received_ms: v.received_ms,
                        duration_ms: v.duration_ms,
                        size: v.size,
                        codec: match v.codec {
                            Codec::Pcmu => "PCMU",
                            Codec::Pcma => "PCMA",
                        }
                        .into(),
                        holders: v.holders.clone(),
                    })
                    .collect(),
                greetings: m
                    .greetings
                    .keys()
                    .map(|g| {
                        match g {
                            Greeting::Unavailable => "unavailable",
                            Greeting::Busy => "busy",
                            Greeting::Name => "name",
                        }
                        .to_string()
                    })
                    .collect(),
            });
        }
        Ok(tonic::Response::new(VoicemailListReply { mailboxes }))
    }

    async fn voicemail_fetch(
        &self,
        request: Request<VoicemailMessageRequest>,
    ) -> Result<tonic::Response<VoicemailFetchReply>, Status> {
        let r = request.into_inner();
        let message = self
            .cluster
            .read()
            .mailbox(&r.mailbox)
            .and_then(|m| m.messages.get(&r.id).cloned())
            .ok_or_else(|| AdminError::NotFound(format!("no message {} in {}", r.id, r.mailbox)))?;
        let audio = self
            .cluster
            .fetch_blob(&message.blob, &message.holders)
            .await
            .ok_or_else(|| {
                AdminError::Unreachable(format!(
                    "no member gave the audio of message {} (held by nodes {:?})",
                    r.id, message.holders
                ))
            })?;
        let pt = match message.codec {
            pbx_state::voicemail::Codec::Pcmu => 0,
            pbx_state::voicemail::Codec::Pcma => 8,
        };
        Ok(tonic::Response::new(VoicemailFetchReply {
            wav: pbx_media_core::g711::wav(&audio, pt),
        }))
    }

    async fn voicemail_delete(
        &self,
        request: Request<VoicemailMessageRequest>,
    ) -> Result<tonic::Response<VoicemailDeleteReply>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let op = pbx_state::VoicemailOp::Delete {
            mailbox: r.mailbox.clone(),
            id: r.id,
        };
        let cmd = Command::Voicemail { op, now_ms: 0 };
        let action = format!("voicemail delete {} {}", r.mailbox, r.id);
        match self.propose(&actor, action, cmd).await? {
            Response::Voicemail(pbx_state::VoicemailOutcome::Changed) => {
                Ok(tonic::Response::new(VoicemailDeleteReply {}))
            }
            _ => Err(AdminError::NotFound(format!("no message {} in {}", r.id, r.mailbox)).into()),
        }
    }

    async fn voicemail_set_pin(
        &self,
        request: Request<VoicemailSetPinRequest>,
    ) -> Result<tonic::Response<VoicemailDeleteReply>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        pbx_dialplan::mailbox_spec(&r.mailbox).map_err(AdminError::Invalid)?;
        if !pbx_state::voicemail::valid_pin(&r.pin) {
            return Err(AdminError::Invalid("a PIN is 1 to 16 digits".into()).into());
        }
        let salt = format!("{:016x}", rand::random::<u64>());
        let op = pbx_state::VoicemailOp::SetPin {
            mailbox: r.mailbox.clone(),
            pin_hash: pbx_state::voicemail::hash_pin(&salt, &r.pin),
        };
        // The PIN itself stays out of the audit log.
        let action = format!("voicemail pin {}", r.mailbox);
        self.propose(&actor, action, Command::Voicemail { op, now_ms: 0 })
            .await?;
        Ok(tonic::Response::new(VoicemailDeleteReply {}))
    }

    async fn cdr_list(
        &self,
        request: Request<CdrListRequest>,
    ) -> Result<tonic::Response<CdrListReply>, Status> {
        let r = request.into_inner();
        let until = if r.until_ms == 0 {
            u64::MAX
        } else {
            r.until_ms
        };
        let state = self.cluster.read();
        let log = &state.cdrs;
        let mut records: Vec<pbx_proto::admin::Cdr> = log
            .between(r.since_ms, until)
            .map(|c| pbx_proto::admin::Cdr {
                uniqueid: c.uniqueid.clone(),
                start_ms: c.start_ms,
                answer_ms: c.answer_ms.unwrap_or(0),
                end_ms: c.end_ms,
                src: c.src.clone(),
                clid: c.clid.clone(),
                dst: c.dst.clone(),
                dcontext: c.dcontext.clone(),
                disposition: c.disposition.clone(),
                hangup_cause: u32::from(c.hangup_cause),
                nodes: c.nodes.clone(),
                seq: c.seq,
                duration: c.duration_secs(),
                billsec: c.billsec(),
            })
            .collect();
        if r.limit > 0 {
            let skip = records.len().saturating_sub(r.limit as usize);
            records.drain(..skip);
        }
        Ok(tonic::Response::new(CdrListReply {
            records,
            shipped_through: log.shipped_through,
            dropped_unshipped: log.dropped_unshipped,
        }))
    }
}

impl AdminService {
    async fn upsert_user(
        &self,
        actor: &str,
        name: String,
        password: Option<String>,
        context: Option<String>,
        caller_id_name: Option<String>,
        must_exist: bool,
    ) -> Result<User, AdminError> {
        pbx_state::validate_user_name(&name).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let realm = self.realm()?;
        let existing = self.cluster.read().users.get(&name).cloned();
        let mut user = match (existing, must_exist) {
            (Some(_), false) => {
                return Err(AdminError::Exists(format!("user {name} exists")));
            }
            (None, true) => return Err(AdminError::NotFound(format!("no user {name}"))),
            (Some(u), true) => u,
            (None, false) => pbx_state::User {
                name: name.clone(),
                ha1_md5: String::new(),
                ha1_sha256: String::new(),
                realm: realm.clone(),
                context: "default".into(),
                caller_id_name: None,
            },
        };
        let mut changed = Vec::new();
        if let Some(p) = password {
            changed.push("password");
            if p.is_empty() {
                return Err(AdminError::Invalid("empty password".into()));
            }
            user.ha1_md5 = ha1(Algorithm::Md5, &name, &realm, &p);
            user.ha1_sha256 = ha1(Algorithm::Sha256, &name, &realm, &p);
            user.realm = realm;
        } else if !must_exist {
            return Err(AdminError::Invalid("a new user needs a password".into()));
        }
        if let Some(c) = context.filter(|c| !c.is_empty()) {
            pbx_state::validate_context(&c).map_err(|e| AdminError::Invalid(e.to_string()))?;
            changed.push("context");
            user.context = c;
        }
        if let Some(n) = caller_id_name.filter(|n| must_exist || !n.is_empty()) {
            changed.push("caller id name");
            user.caller_id_name = (!n.is_empty()).then_some(n);
        }
        // The audit names what changed, never a secret.
        let action = format!(
            "user {} {name} ({})",
            if must_exist { "update" } else { "add" },
            changed.join(", ")
        );
        self.propose(actor, action, Command::UpsertUser(user.clone()))
            .await?;
        tracing::info!(user = %name, "user written through the admin API");
        Ok(user_reply(&user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_carries_lines_or_counts() {
        let v = verdict("[default]\nexten => 1,1,Answer()\n same => n,Frob()\n");
        assert_eq!(v.errors.len(), 1);
        assert_eq!(v.errors[0].line, 3);
        let v = verdict("[default]\nexten => 1,1,Answer()\n");
        assert!(v.errors.is_empty());
        assert_eq!((v.contexts, v.extensions), (1, 1));
    }
}
