//! The admin API client: endpoints tried in turn until one answers, the bearer token on
//! every call, table or JSON output, and exit codes a script can act on.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use pbx_proto::admin::admin_client::AdminClient;
use pbx_proto::admin::{
    ClusterStatusRequest, DialplanHistoryRequest, DialplanRollbackRequest, DialplanShowRequest,
    DialplanText, DialplanVerdict,
};
use pbx_proto::common::NodeStatus;
use pbx_state::users_csv::{self, UserRow};
use pbx_state::StateError;
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
    /// Speak TLS (and present a client certificate, if it holds one).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

#[derive(Clone)]
struct Bearer {
    token: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    actor: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("authorization", self.token.clone());
        req.metadata_mut().insert("x-pbx-actor", self.actor.clone());
        Ok(req)
    }
}

/// `user@host` for the audit trail (the node trims and filters it).
fn actor() -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{user}@{}", host.trim())
        .parse()
        .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("unknown"))
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
        // A call that failed below gRPC (TLS refused, connection reset): the endpoint
        // could not be talked to; say why, with the whole cause chain.
        if let Some(mut cause) = std::error::Error::source(&s) {
            let mut message = format!("{}: {cause}", s.message());
            while let Some(next) = cause.source() {
                message.push_str(&format!(": {next}"));
                cause = next;
            }
            return Failure {
                code: EXIT_UNREACHABLE,
                message,
            };
        }
        let code = match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => EXIT_UNAUTHORIZED,
            tonic::Code::Unavailable => EXIT_NO_QUORUM,
            tonic::Code::NotFound => EXIT_NOT_FOUND,
            tonic::Code::InvalidArgument
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition => EXIT_INVALID,
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
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{ep}"))
                .map(|e| {
                    e.connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(10))
                })
                .and_then(|e| match &self.tls {
                    Some(tls) => e.tls_config(tls.clone()),
                    None => Ok(e),
                });
            let endpoint = match endpoint {
                Ok(e) => e,
                Err(e) => {
                    errors.push(format!("{ep}: {e}"));
                    continue;
                }
            };
            match endpoint.connect().await {
                Ok(ch) => {
                    return Ok(AdminClient::with_interceptor(
                        ch,
                        Bearer {
                            token: bearer,
                            actor: actor(),
                        },
                    ))
                }
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

fn status_json(r: &NodeStatus) -> serde_json::Value {
    json!({
        "node_id": r.node_id, "role": r.role, "leader_id": r.leader_id, "term": r.term,
        "last_log_index": r.last_log_index, "applied_index": r.applied_index,
        "snapshot_index": r.snapshot_index, "serving_writes": r.serving_writes,
        "users": r.users, "bindings": r.bindings, "dialplan_version": r.dialplan_version,
        "calls": r.calls, "draining": r.draining, "domain": r.domain,
        "members": r.members.iter().map(|m| json!({
            "id": m.id, "peer_addr": m.peer_addr, "sip_addr": m.sip_addr, "voter": m.voter,
            "lag": m.lag, "draining": m.draining,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(t: &Target, r: &NodeStatus) {
    match t.output {
        Output::Json => print_json(status_json(r)),
        Output::Table => {
            println!(
                "answered by node {} ({}), leader {}, term {}, applied {}/{}, snapshot {}, serving writes: {}",
                r.node_id,
                r.role,
                r.leader_id,
                r.term,
                r.applied_index,
                r.last_log_index,
                r.snapshot_index,
                r.serving_writes
            );
            println!(
                "users {}  bindings {}  dialplan v{}  calls {}  draining {:?}",
                r.users, r.bindings, r.dialplan_version, r.calls, r.draining
            );
            println!(
                "{:<4} {:<22} {:<22} {:<8} {:>6} DRAINING",
                "ID", "PEER", "SIP", "ROLE", "LAG"
            );
            for m in &r.members {
                println!(
                    "{:<4} {:<22} {:<22} {:<8} {:>6} {}",
                    m.id,
                    m.peer_addr,
                    m.sip_addr,
                    if m.voter { "voter" } else { "learner" },
                    m.lag.map_or("-".to_string(), |l| l.to_string()),
                    m.draining
                );
            }
        }
    }
}

pub async fn cluster_status(t: &Target, from_leader: bool) -> Result<ExitCode, Failure> {
    let r = t
        .connect()
        .await?
        .cluster_status(ClusterStatusRequest { from_leader })
        .await?
        .into_inner();
    print_status(t, &r);
    Ok(ExitCode::SUCCESS)
}

/// A membership or leadership change.
pub enum ClusterChange {
    /// Add as learner, follow the catch-up, then promote (unless `learner_only`).
    Add {
        id: u64,
        peer: String,
        sip: String,
        learner_only: bool,
        timeout: f64,
    },
    Promote(u64),
    Remove(u64),
    TransferLeader(u64),
    Snapshot(u64),
}

/// A learner this close to the leader's log is promoted (the node refuses beyond 1000).
const PROMOTE_AT_LAG: u64 = 100;

pub async fn cluster_change(t: &Target, change: ClusterChange) -> Result<ExitCode, Failure> {
    use pbx_proto::admin::{ClusterAddNodeRequest, ClusterNodeRequest};
    let mut client = t.connect().await?;
    let r = match change {
        ClusterChange::Add {
            id,
            peer,
            sip,
            learner_only,
            timeout,
        } => {
            client
                .cluster_add_node(ClusterAddNodeRequest {
                    id,
                    peer_addr: peer,
                    sip_addr: sip,
                })
                .await?;
            if t.output == Output::Table {
                eprintln!("node {id} added as a learner; catching up");
            }
            follow_catch_up(t, &mut client, id, timeout).await?;
            if learner_only {
                client
                    .cluster_status(ClusterStatusRequest { from_leader: true })
                    .await?
                    .into_inner()
            } else {
                client
                    .cluster_promote_node(ClusterNodeRequest { id })
                    .await?
                    .into_inner()
            }
        }
        ClusterChange::Promote(id) => client
            .cluster_promote_node(ClusterNodeRequest { id })
            .await?
            .into_inner(),
        ClusterChange::Remove(id) => client
            .cluster_remove_node(ClusterNodeRequest { id })
            .await?
            .into_inner(),
        ClusterChange::TransferLeader(id) => client
            .cluster_transfer_leader(ClusterNodeRequest { id })
            .await?
            .into_inner(),
        ClusterChange::Snapshot(id) => client
            .cluster_snapshot(ClusterNodeRequest { id })
            .await?
            .into_inner(),
    };
    print_status(t, &r);
    Ok(ExitCode::SUCCESS)
}

/// Polls the leader until the learner is within [`PROMOTE_AT_LAG`] entries, showing
/// the progress; exit 5 when the time is up.
async fn follow_catch_up(
    t: &Target,
    client: &mut Client,
    id: u64,
    timeout: f64,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs_f64(timeout);
    let mut shown = None;
    loop {
        let r = client
            .cluster_status(ClusterStatusRequest { from_leader: true })
            .await?
            .into_inner();
        let lag = r.members.iter().find(|m| m.id == id).and_then(|m| m.lag);
        if t.output == Output::Table && shown != Some(lag) {
            match lag {
                Some(l) => eprintln!(
                    "node {id}: {l} entries behind the leader (index {}), {:.1} s",
                    r.last_log_index,
                    started.elapsed().as_secs_f64()
                ),
                None => eprintln!(
                    "node {id}: nothing replicated yet, {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
            }
            shown = Some(lag);
        }
        if lag.is_some_and(|l| l <= PROMOTE_AT_LAG) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Failure {
                code: EXIT_NO_QUORUM,
                message: format!(
                    "node {id} did not catch up within {timeout} s (it stays a learner; \
                     is it running and reachable from the leader?)"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
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
    /// Shows the difference from the dialplan in force, then commits (`dry_run`: only
    /// shows it and validates).
    Apply {
        file: &'a std::path::Path,
        dry_run: bool,
    },
    Rollback(u64),
}

/// A unified diff of the dialplan in force (version `v`) and the new text; None when
/// they are the same.
fn dialplan_diff(v: u64, old: &str, new: &str, label: &str) -> Option<String> {
    if old == new {
        return None;
    }
    let old_name = if v == 0 {
        "(no dialplan)".to_string()
    } else {
        format!("version {v} (in force)")
    };
    Some(
        similar::TextDiff::from_lines(old, new)
            .unified_diff()
            .context_radius(3)
            .header(&old_name, label)
            .to_string(),
    )
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
    let (label, v, diff) = match change {
        DialplanChange::Validate(file) => {
            let source = read(file)?;
            let v = client.dialplan_validate(DialplanText { source }).await?;
            (file.display().to_string(), v.into_inner(), None)
        }
        DialplanChange::Apply { file, dry_run } => {
            let source = read(file)?;
            let label = file.display().to_string();
            let current = match client.dialplan_show(DialplanShowRequest {}).await {
                Ok(d) => d.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => Default::default(),
                Err(s) => return Err(s.into()),
            };
            let Some(diff) = dialplan_diff(current.version, &current.source, &source, &label)
            else {
                match t.output {
                    Output::Json => print_json(json!({
                        "valid": true, "version": current.version, "changed": false,
                    })),
                    Output::Table => println!(
                        "{label}: identical to version {} in force, nothing to commit",
                        current.version
                    ),
                }
                return Ok(ExitCode::SUCCESS);
            };
            if t.output == Output::Table {
                print!("{diff}");
            }
            let v = if dry_run {
                client.dialplan_validate(DialplanText { source }).await?
            } else {
                client.dialplan_apply(DialplanText { source }).await?
            };
            (label, v.into_inner(), Some(diff))
        }
        DialplanChange::Rollback(version) => {
            let v = client
                .dialplan_rollback(DialplanRollbackRequest { version })
                .await?;
            (format!("version {version}"), v.into_inner(), None)
        }
    };
    Ok(report(t, &label, &v, diff))
}

fn report(t: &Target, label: &str, v: &DialplanVerdict, diff: Option<String>) -> ExitCode {
    match t.output {
        Output::Json => print_json(json!({
            "valid": v.errors.is_empty(), "version": v.version,
            "contexts": v.contexts, "extensions": v.extensions,
            "errors": v.errors.iter().map(|e| json!({"line": e.line, "reason": e.reason})).collect::<Vec<_>>(),
            "diff": diff,
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

/// What to do with users.
pub enum UserChange {
    Add {
        name: String,
        password: String,
        context: Option<String>,
        caller_id_name: Option<String>,
    },
    Update {
        name: String,
        password: Option<String>,
        context: Option<String>,
        caller_id_name: Option<String>,
    },
    Remove(String),
}

/// Every user of the cluster.
async fn users(t: &Target) -> Result<Vec<pbx_proto::admin::User>, Failure> {
    Ok(t.connect()
        .await?
        .user_list(pbx_proto::admin::UserListRequest {})
        .await?
        .into_inner()
        .users)
}

fn user_json(u: &pbx_proto::admin::User) -> serde_json::Value {
    json!({"name": u.name, "context": u.context, "caller_id_name": u.caller_id_name})
}

fn print_user(t: &Target, u: &pbx_proto::admin::User) {
    match t.output {
        Output::Json => print_json(user_json(u)),
        Output::Table => println!("{:<20} {:<16} {}", u.name, u.context, u.caller_id_name),
    }
}

pub async fn user_change(t: &Target, change: UserChange) -> Result<ExitCode, Failure> {
    use pbx_proto::admin::{UserAddRequest, UserRemoveRequest, UserUpdateRequest};
    let mut client = t.connect().await?;
    match change {
        UserChange::Add {
            name,
            password,
            context,
            caller_id_name,
        } => {
            let u = client
                .user_add(UserAddRequest {
                    name,
                    password,
                    context: context.unwrap_or_default(),
                    caller_id_name: caller_id_name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_user(t, &u);
        }
        UserChange::Update {
            name,
            password,
            context,
            caller_id_name,
        } => {
            let u = client
                .user_update(UserUpdateRequest {
                    name,
                    password,
                    context,
                    caller_id_name,
                })
                .await?
                .into_inner();
            print_user(t, &u);
        }
        UserChange::Remove(name) => {
            let r = client
                .user_remove(UserRemoveRequest { name: name.clone() })
                .await?
                .into_inner();
            match t.output {
                Output::Json => print_json(
                    json!({"removed": name, "registrations_removed": r.registrations_removed}),
                ),
                Output::Table => println!(
                    "{name} removed ({} registrations with it)",
                    r.registrations_removed
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn user_list(t: &Target) -> Result<ExitCode, Failure> {
    let users = users(t).await?;
    match t.output {
        Output::Json => print_json(json!(users.iter().map(user_json).collect::<Vec<_>>())),
        Output::Table => {
            println!("{:<20} {:<16} CALLER_ID_NAME", "NAME", "CONTEXT");
            for u in &users {
                print_user(t, u);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The users of an import file ([`pbx_state::users_csv`]); every bad line is reported
/// as `file:line: reason` and nothing is imported.
pub fn parse_users_csv(text: &str, file: &str) -> Result<Vec<UserRow>, Failure> {
    users_csv::parse(text).map_err(|e| {
        let lines = match e {
            StateError::UsersCsv(lines) => lines
                .iter()
                .map(|l| format!("{file}:{}: {}", l.line, l.reason))
                .collect::<Vec<_>>()
                .join("\n"),
            other => format!("{file}: {other}"),
        };
        Failure {
            code: EXIT_INVALID,
            message: format!("{lines}\nnothing imported"),
        }
    })
}

/// Adds the users of a CSV file, updating those that exist.
pub async fn user_import(t: &Target, file: &std::path::Path) -> Result<ExitCode, Failure> {
    use pbx_proto::admin::{UserAddRequest, UserUpdateRequest};
    let text = std::fs::read_to_string(file).map_err(|e| Failure {
        code: EXIT_INVALID,
        message: format!("reading {}: {e}", file.display()),
    })?;
    let rows = parse_users_csv(&text, &file.display().to_string())?;
    let mut client = t.connect().await?;
    let (mut added, mut updated) = (0, 0);
    for row in rows {
        let add = client
            .user_add(UserAddRequest {
                name: row.name.clone(),
                password: row.password.clone(),
                context: row.context.clone().unwrap_or_default(),
                caller_id_name: row.caller_id_name.clone().unwrap_or_default(),
            })
            .await;
        match add {
            Ok(_) => added += 1,
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                client
                    .user_update(UserUpdateRequest {
                        name: row.name,
                        password: Some(row.password),
                        context: row.context,
                        caller_id_name: row.caller_id_name,
                    })
                    .await?;
                updated += 1;
            }
            Err(s) => return Err(s.into()),
        }
    }
    match t.output {
        Output::Json => print_json(json!({"added": added, "updated": updated})),
        Output::Table => println!("{added} users added, {updated} updated"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `user,context,caller_id_name` of every user (passwords are not kept by the cluster).
pub async fn user_export(t: &Target) -> Result<ExitCode, Failure> {
    let users = users(t).await?;
    println!("user,context,caller_id_name");
    for u in users {
        println!("{},{},{}", u.name, u.context, u.caller_id_name);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn registration_list(t: &Target, user: Option<String>) -> Result<ExitCode, Failure> {
    let regs = t
        .connect()
        .await?
        .registration_list(pbx_proto::admin::RegistrationListRequest {
            user: user.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .registrations;
    match t.output {
        Output::Json => print_json(json!(regs
            .iter()
            .map(|r| json!({
                "user": r.user, "contact": r.contact, "expires_in_secs": r.expires_in_secs,
                "source": r.source, "transport": r.transport, "node_id": r.node_id,
                "user_agent": r.user_agent,
            }))
            .collect::<Vec<_>>())),
        Output::Table => {
            println!(
                "{:<16} {:<40} {:>7} {:<22} {:<4} NODE",
                "USER", "CONTACT", "EXPIRES", "SOURCE", "TP"
            );
            for r in &regs {
                println!(
                    "{:<16} {:<40} {:>7} {:<22} {:<4} {}",
                    r.user, r.contact, r.expires_in_secs, r.source, r.transport, r.node_id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn registration_remove(
    t: &Target,
    user: String,
    contact: Option<String>,
) -> Result<ExitCode, Failure> {
    let r = t
        .connect()
        .await?
        .registration_remove(pbx_proto::admin::RegistrationRemoveRequest {
            user: user.clone(),
            contact: contact.unwrap_or_default(),
        })
        .await?
        .into_inner();
    match t.output {
        Output::Json => print_json(json!({"user": user, "removed": r.removed})),
        Output::Table => println!("{} registrations of {user} removed", r.removed),
    }
    Ok(ExitCode::SUCCESS)
}

fn media_json(m: &pbx_proto::common::MediaStream) -> serde_json::Value {
    json!({
        "a_packets": m.a_packets, "a_bytes": m.a_bytes, "a_lost": m.a_lost,
        "a_jitter_ms": m.a_jitter_ms, "b_packets": m.b_packets, "b_bytes": m.b_bytes,
        "b_lost": m.b_lost, "b_jitter_ms": m.b_jitter_ms,
        "a_first_ms": m.a_first_ms, "b_first_ms": m.b_first_ms,
    })
}

/// `a 1234/0/1.2 b 1230/1/0.8` (packets/lost/jitter ms from each side), per stream.
fn media_summary(c: &pbx_proto::admin::Call) -> String {
    if !c.media_error.is_empty() {
        return format!("? ({})", c.media_error);
    }
    if c.media.is_empty() {
        return "-".into();
    }
    c.media
        .iter()
        .map(|m| {
            format!(
                "a {}/{}/{:.1} b {}/{}/{:.1}",
                m.a_packets, m.a_lost, m.a_jitter_ms, m.b_packets, m.b_lost, m.b_jitter_ms
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn call_list(t: &Target, no_media: bool) -> Result<ExitCode, Failure> {
    let calls = t
        .connect()
        .await?
        .call_list(pbx_proto::admin::CallListRequest { no_media })
        .await?
        .into_inner()
        .calls;
    match t.output {
        Output::Json => print_json(json!(calls
            .iter()
            .map(|c| json!({
                "id": c.id, "owner_node": c.owner_node, "caller": c.caller, "callee": c.callee,
                "answered_at_ms": c.answered_at_ms, "duration_secs": c.duration_secs,
                "leg_call_ids": c.leg_call_ids,
                "media": c.media.iter().map(media_json).collect::<Vec<_>>(),
                "media_error": c.media_error,
            }))
            .collect::<Vec<_>>())),
        Output::Table => {
            println!(
                "{:<40} {:<5} {:<16} {:<16} {:>8} MEDIA (pkts/lost/jitter ms from a, b)",
                "CALL", "NODE", "CALLER", "CALLEE", "DURATION"
            );
            for c in &calls {
                println!(
                    "{:<40} {:<5} {:<16} {:<16} {:>8} {}",
                    c.id,
                    c.owner_node,
                    c.caller,
                    c.callee,
                    format!("{}s", c.duration_secs),
                    media_summary(c)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn call_hangup(t: &Target, id: String) -> Result<ExitCode, Failure> {
    let r = t
        .connect()
        .await?
        .call_hangup(pbx_proto::admin::CallHangupRequest { id: id.clone() })
        .await?
        .into_inner();
    match t.output {
        Output::Json => print_json(json!({"id": id, "owner_node": r.owner_node})),
        Output::Table => println!("call {id} hung up on node {}", r.owner_node),
    }
    Ok(ExitCode::SUCCESS)
}

/// How `dns zone` publishes the members.
pub struct ZoneOptions {
    pub domain: Option<String>,
    pub ttl: u32,
    pub backup: Vec<u64>,
    pub weight: u16,
    pub tls_port: Option<u16>,
    pub ns: Vec<String>,
}

pub async fn dns_zone(t: &Target, o: ZoneOptions) -> Result<ExitCode, Failure> {
    use pbx_dns::zone::{ZoneMember, ZoneSpec};
    let r = t
        .connect()
        .await?
        .cluster_status(ClusterStatusRequest { from_leader: false })
        .await?
        .into_inner();
    let domain = o.domain.unwrap_or_else(|| r.domain.clone());
    let mut notes = Vec::new();
    let mut members = Vec::new();
    for m in &r.members {
        if r.draining.contains(&m.id) {
            notes.push(format!("; node {} is draining: left out", m.id));
            continue;
        }
        let Ok(sip) = m.sip_addr.parse::<std::net::SocketAddr>() else {
            notes.push(format!(
                "; node {}: SIP address {:?} is not IP:PORT: left out",
                m.id, m.sip_addr
            ));
            continue;
        };
        members.push(ZoneMember {
            id: m.id,
            addr: sip.ip(),
            sip_port: sip.port(),
            priority: if o.backup.contains(&m.id) { 20 } else { 10 },
            weight: o.weight,
        });
    }
    if members.is_empty() {
        return Err(Failure {
            code: EXIT_INVALID,
            message: "no member to publish".into(),
        });
    }
    let spec = ZoneSpec {
        domain: domain.trim_end_matches('.').to_string(),
        ttl: o.ttl,
        members,
        tls_port: o.tls_port,
    };
    let serial = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32);
    for n in notes {
        println!("{n}");
    }
    print!("{}", spec.bind_zone(serial, &o.ns));
    Ok(ExitCode::SUCCESS)
}

pub async fn audit_list(t: &Target, limit: u32) -> Result<ExitCode, Failure> {
    let entries = t
        .connect()
        .await?
        .audit_list(pbx_proto::admin::AuditListRequest { limit })
        .await?
        .into_inner()
        .entries;
    match t.output {
        Output::Json => print_json(json!(entries
            .iter()
            .map(|e| json!({"at_ms": e.at_ms, "actor": e.actor, "node_id": e.node_id, "action": e.action}))
            .collect::<Vec<_>>())),
        Output::Table => {
            println!("{:<15} {:<5} {:<40} ACTION", "AT_MS", "NODE", "ACTOR");
            for e in &entries {
                println!("{:<15} {:<5} {:<40} {}", e.at_ms, e.node_id, e.actor, e.action);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The call detail records of calls that ended in [since, until): a table (`export`
/// None), or every record as CSV (`Some(true)`) or JSON (`Some(false)`).
pub async fn voicemail_list(t: &Target, mailbox: Option<String>) -> Result<ExitCode, Failure> {
    let reply = t
        .connect()
        .await?
        .voicemail_list(pbx_proto::admin::VoicemailListRequest {
            mailbox: mailbox.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if t.output == Output::Json {
        let boxes: Vec<_> = reply
            .mailboxes
            .iter()
            .map(|m| {
                json!({
                    "mailbox": m.mailbox, "has_pin": m.has_pin, "new": m.new_messages,
                    "old": m.old_messages, "greetings": m.greetings,
                    "messages": m.messages.iter().map(|v| json!({
                        "id": v.id, "folder": v.folder, "caller_id": v.caller_id,
                        "received": pbx_state::utc_datetime(v.received_ms),
                        "received_ms": v.received_ms, "duration_ms": v.duration_ms,
                        "size": v.size, "codec": v.codec, "holders": v.holders,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(json!(boxes));
        return Ok(ExitCode::SUCCESS);
    }
    for m in &reply.mailboxes {
        println!(
            "mailbox {}: {} new, {} old, PIN {}, greetings: {}",
            m.mailbox,
            m.new_messages,
            m.old_messages,
            if m.has_pin { "set" } else { "not set" },
            if m.greetings.is_empty() {
                "none".to_string()
            } else {
                m.greetings.join(" ")
            }
        );
        if m.messages.is_empty() {
            continue;
        }
        println!(
            "  {:>4} {:<6} {:<19} {:>6} {:<5} {:<8} FROM",
            "ID", "FOLDER", "RECEIVED (UTC)", "SECS", "CODEC", "HOLDERS"
        );
        for v in &m.messages {
            let holders: Vec<String> = v.holders.iter().map(u64::to_string).collect();
            println!(
                "  {:>4} {:<6} {:<19} {:>6.1} {:<5} {:<8} {}",
                v.id,
                v.folder,
                pbx_state::utc_datetime(v.received_ms),
                v.duration_ms as f64 / 1000.0,
                v.codec,
                holders.join(","),
                v.caller_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn voicemail_fetch(
    t: &Target,
    mailbox: String,
    id: u64,
    output: String,
) -> Result<ExitCode, Failure> {
    let wav = t
        .connect()
        .await?
        .voicemail_fetch(pbx_proto::admin::VoicemailMessageRequest { mailbox, id })
        .await?
        .into_inner()
        .wav;
    if output == "-" {
        use std::io::Write;
        std::io::stdout().write_all(&wav).map_err(|e| Failure {
            code: 2,
            message: format!("standard output: {e}"),
        })?;
    } else {
        std::fs::write(&output, &wav).map_err(|e| Failure {
            code: 2,
            message: format!("{output}: {e}"),
        })?;
        eprintln!("message {id}: {} bytes written to {output}", wav.len());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn voicemail_delete(t: &Target, mailbox: String, id: u64) -> Result<ExitCode, Failure> {
    t.connect()
        .await?
        .voicemail_delete(pbx_proto::admin::VoicemailMessageRequest {
            mailbox: mailbox.clone(),
            id,
        })
        .await?;
    println!("message {id} of {mailbox} deleted");
    Ok(ExitCode::SUCCESS)
}

pub async fn voicemail_pin(t: &Target, mailbox: String, pin: String) -> Result<ExitCode, Failure> {
    t.connect()
        .await?
        .voicemail_set_pin(pbx_proto::admin::VoicemailSetPinRequest {
            mailbox: mailbox.clone(),
            pin,
        })
        .await?;
    println!("PIN of {mailbox} set");
    Ok(ExitCode::SUCCESS)
}

pub async fn cdr_list(
    t: &Target,
    since: Option<u64>,
    until: Option<u64>,
    limit: u32,
    export: Option<bool>,
) -> Result<ExitCode, Failure> {
    let reply = t
        .connect()
        .await?
        .cdr_list(pbx_proto::admin::CdrListRequest {
            since_ms: since.unwrap_or(0),
            until_ms: until.unwrap_or(0),
            limit,
        })
        .await?
        .into_inner();
    let when = |ms: u64| {
        if ms == 0 {
            String::new()
        } else {
            pbx_state::utc_datetime(ms)
        }
    };
    let nodes = |c: &pbx_proto::admin::Cdr| {
        c.nodes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let as_json = |c: &pbx_proto::admin::Cdr| {
        json!({
            "uniqueid": c.uniqueid, "start": when(c.start_ms), "answer": when(c.answer_ms),
            "end": when(c.end_ms), "start_ms": c.start_ms, "answer_ms": c.answer_ms,
            "end_ms": c.end_ms, "duration": c.duration, "billsec": c.billsec,
            "disposition": c.disposition, "src": c.src, "clid": c.clid, "dst": c.dst,
            "dcontext": c.dcontext, "hangupcause": c.hangup_cause, "nodes": c.nodes,
            "sequence": c.seq,
        })
    };
    match (export, t.output) {
        (Some(false), _) | (None, Output::Json) => {
            print_json(json!(reply.records.iter().map(as_json).collect::<Vec<_>>()))
        }
        (Some(true), _) => {
            println!("uniqueid,start,answer,end,duration,billsec,disposition,src,clid,dst,dcontext,hangupcause,nodes,sequence");
            for c in &reply.records {
                let fields = [
                    c.uniqueid.clone(),
                    when(c.start_ms),
                    when(c.answer_ms),
                    when(c.end_ms),
                    c.duration.to_string(),
                    c.billsec.to_string(),
                    c.disposition.clone(),
                    c.src.clone(),
                    c.clid.clone(),
                    c.dst.clone(),
                    c.dcontext.clone(),
                    c.hangup_cause.to_string(),
                    nodes(c),
                    c.seq.to_string(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                println!("{}", line.join(","));
            }
        }
        (None, Output::Table) => {
            println!(
                "{:<19} {:>6} {:>7} {:<10} {:<12} {:<12} {:<6} CALL-ID",
                "END (UTC)", "DUR", "BILLSEC", "DISPOSITION", "SRC", "DST", "NODES"
            );
            for c in &reply.records {
                println!(
                    "{:<19} {:>6} {:>7} {:<10} {:<12} {:<12} {:<6} {}",
                    when(c.end_ms),
                    c.duration,
                    c.billsec,
                    c.disposition,
                    c.src,
                    c.dst,
                    nodes(c),
                    c.uniqueid
                );
            }
            if reply.dropped_unshipped > 0 {
                eprintln!(
                    "warning: {} records were dropped by the keep window before reaching PostgreSQL",
                    reply.dropped_unshipped
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Drains (or undrains, or only reports on) a node; with `wait`, follows the drain until
/// the node runs no call or the time is up (exit 5 then: still busy).
pub async fn node_drain(
    t: &Target,
    node: u64,
    drain: bool,
    query: bool,
    wait: Option<f64>,
    migrate: bool,
) -> Result<ExitCode, Failure> {
    use pbx_proto::admin::NodeDrainRequest;
    let mut client = t.connect().await?;
    let mut r = client
        .node_drain(NodeDrainRequest {
            node_id: node,
            drain,
            query,
            migrate,
        })
        .await?
        .into_inner();
    let deadline = wait.map(|w| std::time::Instant::now() + Duration::from_secs_f64(w));
    if let Some(deadline) = deadline {
        let mut last = u64::MAX;
        while r.calls > 0 && std::time::Instant::now() < deadline {
            if r.calls != last && t.output == Output::Table {
                eprintln!(
                    "node {}: draining, {} calls still running",
                    r.node_id, r.calls
                );
                last = r.calls;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            r = client
                .node_drain(NodeDrainRequest {
                    node_id: r.node_id,
                    drain: false,
                    query: true,
                    migrate: false,
                })
                .await?
                .into_inner();
        }
    }
    match t.output {
        Output::Json => {
            print_json(json!({"node_id": r.node_id, "draining": r.draining, "calls": r.calls}))
        }
        Output::Table => println!(
            "node {}: {}, {} calls running",
            r.node_id,
            if r.draining {
                "draining"
            } else {
                "taking calls"
            },
            r.calls
        ),
    }
    if deadline.is_some() && r.calls > 0 {
        return Ok(ExitCode::from(EXIT_NO_QUORUM));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialplan_diff_shows_changed_lines_with_context() {
        let old = "[default]\nexten => 1,1,Answer()\n same => n,Hangup()\n";
        let new =
            "[default]\nexten => 1,1,Answer()\n same => n,Playback(beep)\n same => n,Hangup()\n";
        let d = dialplan_diff(4, old, new, "new.conf").unwrap();
        assert!(d.contains("--- version 4 (in force)"), "{d}");
        assert!(d.contains("+++ new.conf"), "{d}");
        assert!(d.contains("+ same => n,Playback(beep)"), "{d}");
        assert!(d.contains(" exten => 1,1,Answer()"), "{d}");
        assert!(!d.contains("-exten"), "{d}");
        assert_eq!(dialplan_diff(4, old, old, "new.conf"), None);
        assert!(dialplan_diff(0, "", new, "n")
            .unwrap()
            .contains("--- (no dialplan)"));
    }

    #[test]
    fn users_csv_reports_every_bad_line_and_imports_nothing() {
        let ok = parse_users_csv("user,password\nann,pw\nbob,pw2,sales,Bob B\n", "u.csv").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok[1],
            UserRow {
                name: "bob".into(),
                password: "pw2".into(),
                context: Some("sales".into()),
                caller_id_name: Some("Bob B".into()),
            }
        );
        let e = parse_users_csv("ann,pw\nbob\n,x\ncarol,pw\n", "u.csv").unwrap_err();
        assert_eq!(e.code, EXIT_INVALID);
        assert!(e.message.contains("u.csv:2:") && e.message.contains("u.csv:3:"));
        assert!(!e.message.contains("u.csv:4:"));
    }
}
