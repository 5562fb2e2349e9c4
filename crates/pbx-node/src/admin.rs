//! The admin API server (`proto/pbx/admin/v1`): bearer-token authentication, then each
//! call read from the applied state or proposed as a Raft command (a follower forwards it
//! to the leader). Errors become `tonic::Status` here and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;

use pbx_admin_proto::admin_server::{Admin, AdminServer};
use pbx_admin_proto::{
    ClusterStatusReply, ClusterStatusRequest, DialplanHistoryReply, DialplanHistoryRequest,
    DialplanRollbackRequest, DialplanShowRequest, DialplanText, DialplanVerdict, LineError, Member,
    StoredDialplan,
};
use pbx_dialplan::{Dialplan, DialplanError};
use pbx_raft::Cluster;
use pbx_state::{Command, Response};
use tonic::{Request, Status};

use crate::NodeError;

/// Why an admin call failed, before it becomes a `tonic::Status`.
#[derive(Debug)]
enum AdminError {
    NotFound(String),
    /// No leader or no majority: nothing was changed.
    NoQuorum(String),
    Internal(String),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match e {
            AdminError::NotFound(m) => Status::not_found(m),
            AdminError::NoQuorum(m) => {
                Status::unavailable(format!("no quorum, nothing changed: {m}"))
            }
            AdminError::Internal(m) => Status::internal(m),
        }
    }
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

/// Serves the admin API on `listener` until the node stops.
pub(crate) fn serve(
    listener: std::net::TcpListener,
    token: String,
    cluster: Cluster,
) -> Result<tokio::task::JoinHandle<()>, NodeError> {
    let addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| NodeError::Bind { addr, source })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| NodeError::Bind { addr, source })?;
    let service = AdminServer::with_interceptor(AdminService { cluster }, TokenCheck(token.into()));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    Ok(tokio::spawn(async move {
        let server = tonic::transport::Server::builder().add_service(service);
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
            extensions: plan
                .contexts
                .values()
                .map(|c| c.extensions.len())
                .sum::<usize>() as u32,
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

impl AdminService {
    /// Validates, then commits a dialplan; an invalid one is answered with its errors
    /// and changes nothing.
    async fn commit_dialplan(&self, source: String) -> Result<DialplanVerdict, AdminError> {
        let mut v = verdict(&source);
        if !v.errors.is_empty() {
            return Ok(v);
        }
        let resp = self
            .cluster
            .propose(Command::SetDialplan { source, now_ms: 0 })
            .await
            .map_err(|e| AdminError::NoQuorum(e.to_string()))?;
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
        _: Request<ClusterStatusRequest>,
    ) -> Result<tonic::Response<ClusterStatusReply>, Status> {
        let s = self.cluster.status();
        Ok(tonic::Response::new(ClusterStatusReply {
            node_id: s.node_id,
            role: s.role.to_string(),
            leader_id: s.leader_id.unwrap_or(0),
            term: s.term,
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            serving_writes: s.serving_writes,
            members: s
                .members
                .into_iter()
                .map(|(id, m, voter)| Member {
                    id,
                    peer_addr: m.peer_addr,
                    sip_addr: m.sip_addr,
                    voter,
                })
                .collect(),
            users: s.users,
            bindings: s.bindings,
            dialplan_version: s.dialplan_version,
            calls: s.calls,
        }))
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
        let v = self.commit_dialplan(request.into_inner().source).await?;
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

    async fn dialplan_rollback(
        &self,
        request: Request<DialplanRollbackRequest>,
    ) -> Result<tonic::Response<DialplanVerdict>, Status> {
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
        let v = self.commit_dialplan(source).await?;
        Ok(tonic::Response::new(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }

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
