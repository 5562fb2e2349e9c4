//! The admin API client: endpoints tried in turn until one answers, the bearer token on
//! every call, table or JSON output, and exit codes a script can act on.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use pbx_admin_proto::admin_client::AdminClient;
use pbx_admin_proto::{
    ClusterStatusRequest, DialplanHistoryRequest, DialplanRollbackRequest, DialplanShowRequest,
    DialplanText, DialplanVerdict,
};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Exit codes (documented in `pbxctl --help`).
pub const EXIT_INVALID: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_UNAUTHORIZED: u8 = 4;
pub const EXIT_NO_QUORUM: u8 = 5;
pub const EXIT_NOT_FOUND: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Where and how to reach the admin API.
pub struct Target {
    pub endpoints: Vec<String>,
    pub token: String,
    pub output: Output,
}

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = AdminClient<InterceptedService<Channel, Bearer>>;

/// A failed call, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        let code = match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => EXIT_UNAUTHORIZED,
            tonic::Code::Unavailable => EXIT_NO_QUORUM,
            tonic::Code::NotFound => EXIT_NOT_FOUND,
            tonic::Code::InvalidArgument => EXIT_INVALID,
            _ => 2,
        };
        Failure {
            code,
            message: s.message().to_string(),
        }
    }
}

impl Target {
    /// Connects to the first endpoint that accepts a connection.
    async fn connect(&self) -> Result<Client, Failure> {
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| Failure {
                code: 2,
                message: "the token has characters a header cannot carry".into(),
            })?;
        let mut errors = Vec::new();
        for ep in &self.endpoints {
            let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{ep}")) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10)),
                Err(e) => {
                    errors.push(format!("{ep}: {e}"));
                    continue;
                }
            };
            match endpoint.connect().await {
                Ok(ch) => return Ok(AdminClient::with_interceptor(ch, Bearer(bearer))),
                Err(e) => errors.push(format!("{ep}: {e}")),
            }
        }
        Err(Failure {
            code: EXIT_UNREACHABLE,
            message: format!("no admin endpoint answers ({})", errors.join("; ")),
        })
    }
}

fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

pub async fn cluster_status(t: &Target) -> Result<ExitCode, Failure> {
    let r = t
        .connect()
        .await?
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    match t.output {
        Output::Json => print_json(json!({
            "node_id": r.node_id, "role": r.role, "leader_id": r.leader_id, "term": r.term,
            "last_log_index": r.last_log_index, "applied_index": r.applied_index,
            "snapshot_index": r.snapshot_index, "serving_writes": r.serving_writes,
            "users": r.users, "bindings": r.bindings, "dialplan_version": r.dialplan_version,
            "calls": r.calls,
            "members": r.members.iter().map(|m| json!({
                "id": m.id, "peer_addr": m.peer_addr, "sip_addr": m.sip_addr, "voter": m.voter,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!(
                "answered by node {} ({}), leader {}, term {}, applied {}/{}, serving writes: {}",
                r.node_id,
                r.role,
                r.leader_id,
                r.term,
                r.applied_index,
                r.last_log_index,
                r.serving_writes
            );
            println!(
                "users {}  bindings {}  dialplan v{}  calls {}",
                r.users, r.bindings, r.dialplan_version, r.calls
            );
            println!("{:<4} {:<22} {:<22} VOTER", "ID", "PEER", "SIP");
            for m in &r.members {
                println!(
                    "{:<4} {:<22} {:<22} {}",
                    m.id, m.peer_addr, m.sip_addr, m.voter
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn dialplan_show(t: &Target) -> Result<ExitCode, Failure> {
    let d = t
        .connect()
        .await?
        .dialplan_show(DialplanShowRequest {})
        .await?
        .into_inner();
    match t.output {
        Output::Json => print_json(json!({
            "version": d.version, "committed_at_ms": d.committed_at_ms, "source": d.source,
        })),
        Output::Table => {
            println!(
                "; version {} (committed at {} ms)",
                d.version, d.committed_at_ms
            );
            print!("{}", d.source);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn dialplan_history(t: &Target) -> Result<ExitCode, Failure> {
    let h = t
        .connect()
        .await?
        .dialplan_history(DialplanHistoryRequest {})
        .await?
        .into_inner();
    match t.output {
        Output::Json => print_json(json!(h
            .dialplans
            .iter()
            .map(|d| json!({"version": d.version, "committed_at_ms": d.committed_at_ms, "lines": d.source.lines().count()}))
            .collect::<Vec<_>>())),
        Output::Table => {
            println!("{:<8} {:<16} LINES", "VERSION", "COMMITTED_MS");
            for d in &h.dialplans {
                println!(
                    "{:<8} {:<16} {}",
                    d.version,
                    d.committed_at_ms,
                    d.source.lines().count()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What to do with a dialplan file.
pub enum DialplanChange<'a> {
    Validate(&'a std::path::Path),
    Apply(&'a std::path::Path),
    Rollback(u64),
}

pub async fn dialplan_change(t: &Target, change: DialplanChange<'_>) -> Result<ExitCode, Failure> {
    let read = |file: &std::path::Path| {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))
            .map_err(|e| Failure {
                code: EXIT_INVALID,
                message: format!("{e:#}"),
            })
    };
    let mut client = t.connect().await?;
    let (label, v) = match change {
        DialplanChange::Validate(file) => {
            let source = read(file)?;
            let v = client.dialplan_validate(DialplanText { source }).await?;
            (file.display().to_string(), v.into_inner())
        }
        DialplanChange::Apply(file) => {
            let source = read(file)?;
            let v = client.dialplan_apply(DialplanText { source }).await?;
            (file.display().to_string(), v.into_inner())
        }
        DialplanChange::Rollback(version) => {
            let v = client
                .dialplan_rollback(DialplanRollbackRequest { version })
                .await?;
            (format!("version {version}"), v.into_inner())
        }
    };
    Ok(report(t, &label, &v))
}

fn report(t: &Target, label: &str, v: &DialplanVerdict) -> ExitCode {
    match t.output {
        Output::Json => print_json(json!({
            "valid": v.errors.is_empty(), "version": v.version,
            "contexts": v.contexts, "extensions": v.extensions,
            "errors": v.errors.iter().map(|e| json!({"line": e.line, "reason": e.reason})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            for e in &v.errors {
                eprintln!("{label}:{}: {}", e.line, e.reason);
            }
            if v.errors.is_empty() {
                let committed = if v.version > 0 {
                    format!(", committed as version {}", v.version)
                } else {
                    String::new()
                };
                println!(
                    "{label}: valid: {} contexts, {} extensions{committed}",
                    v.contexts, v.extensions
                );
            } else {
                eprintln!("{label}: refused, nothing changed");
            }
        }
    }
    if v.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}
