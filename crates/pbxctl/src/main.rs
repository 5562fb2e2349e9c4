//! pbxctl: administration CLI. The admin API (gRPC, bearer token) for the cluster's
//! state; SIP for health probes and registration checks, the way monitoring does; the
//! peer link's read-only status.

mod admin;

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use pbx_registrar::digest::{ha1, Algorithm, ClientAuth};
use pbx_sip_core::{ClientNonInvite, ResponseAction, TimerOutcome, Timers};
use pbx_sip_msg::{
    parse_datagram, AuthHeader, HeaderName, Limits, MessageWriter, Method, SipMessage,
};
use rand::Rng;

#[derive(Parser, Debug)]
#[command(
    name = "pbxctl",
    version,
    about = "Administer and probe the PBX cluster",
    after_help = "Admin API calls (cluster, dialplan show/validate/apply/history/rollback) need an \
endpoint (--endpoint, repeatable, or PBX_ADMIN_ENDPOINT=a,b,c: tried in turn) and the token \
(--token or PBX_ADMIN_TOKEN). Exit codes: 0 ok, 1 invalid input (nothing changed), 2 usage or \
other error, 3 no endpoint reachable, 4 unauthorized, 5 unavailable: no quorum, or a node the operation needs is unreachable, or a wait ran out (nothing changed), 6 not found. Shell completions: pbxctl completions bash|zsh|fish."
)]
struct Cli {
    /// Admin API address (host:port); give it several times to fall back on the next.
    #[arg(long, global = true)]
    endpoint: Vec<String>,
    /// Admin bearer token (default: PBX_ADMIN_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: admin::Output,
    /// CA certificate (PEM) of an admin API served over TLS (default: PBX_ADMIN_TLS_CA);
    /// without it the API is spoken in plain HTTP/2.
    #[arg(long, global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS (default: PBX_ADMIN_TLS_CERT,
    /// PBX_ADMIN_TLS_KEY).
    #[arg(long, global = true)]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// Name to verify the node's certificate against (default: the endpoint's host).
    #[arg(long, global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send OPTIONS to a node (SIP over UDP) and print status and round-trip time.
    /// Exits 0 when the node answers 200.
    Options {
        /// Node address, e.g. 127.0.0.11:5060.
        target: SocketAddr,
        /// Give up after this many seconds (retransmitting per RFC 3261 Timer E).
        #[arg(long, default_value_t = 4.0)]
        timeout: f64,
    },
    /// Register a user (digest auth) and print the bindings the registrar returns.
    /// With --expires 0 the contact is removed; with --query nothing changes.
    Register {
        target: SocketAddr,
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "pbx.test")]
        domain: String,
        /// Contact URI to register; default: this socket's address.
        #[arg(long)]
        contact: Option<String>,
        #[arg(long, default_value_t = 3600)]
        expires: u32,
        /// Only fetch the current bindings (REGISTER without Contact).
        #[arg(long)]
        query: bool,
    },
    /// Ask nodes (their peer-link address, e.g. 127.0.0.11:7001) for their Raft role
    /// and progress: one `key=value` line per node. Exits 1 if a node does not answer
    /// (or, with --wait-ready, is not ready in time).
    Status {
        #[arg(required = true)]
        peers: Vec<String>,
        /// Wait up to this many seconds for each node to be ready (start-up writes
        /// committed, serving writes).
        #[arg(long)]
        wait_ready: Option<f64>,
    },
    /// The dialplan: offline check, or the cluster's (admin API).
    Dialplan {
        #[command(subcommand)]
        command: DialplanCmd,
    },
    /// The cluster as the answering node sees it (admin API).
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Users and their credentials (admin API).
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
    /// Current registrations (admin API).
    Registrations {
        #[command(subcommand)]
        command: RegistrationsCmd,
    },
    /// Drain a node for maintenance, or take it back (admin API).
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// Call detail records the cluster keeps (admin API): every call, answered or not.
    Cdr {
        #[command(subcommand)]
        command: CdrCmd,
    },
    /// Mailboxes and voicemail messages (admin API): list, fetch as WAV, delete, PIN.
    Voicemail {
        #[command(subcommand)]
        command: VoicemailCmd,
    },
    /// Who changed what and when through the admin API, newest last.
    Audit {
        /// Only the last N entries (0: all kept).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Answered calls in progress on every node (admin API).
    Calls {
        #[command(subcommand)]
        command: CallsCmd,
    },
    /// Print the HA1 hashes of a credential (what the cluster stores instead of it).
    Ha1 {
        user: String,
        realm: String,
        password: String,
    },
    /// DNS records through which phones find the cluster (RFC 3263).
    Dns {
        #[command(subcommand)]
        command: DnsCmd,
    },
    /// Print a shell completion script, e.g.
    /// `pbxctl completions bash > /etc/bash_completion.d/pbxctl`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum DialplanCmd {
    /// Validate an extensions.conf here, the way the cluster will before committing it:
    /// every error as FILE:LINE: reason. Exits 1 when it is invalid. Needs no cluster.
    Check { file: std::path::PathBuf },
    /// Print the dialplan in force.
    Show,
    /// Have the cluster validate a file (nothing is committed).
    Validate { file: std::path::PathBuf },
    /// Show the difference from the dialplan in force, then validate and commit the file
    /// on every node; refused with FILE:LINE: reason (exit 1) when invalid, and the
    /// dialplan in force keeps working.
    Apply {
        file: std::path::PathBuf,
        /// Only show the difference and validate; commit nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The versions kept, oldest first.
    History,
    /// Commit an earlier version's text again, as a new version.
    Rollback { version: u64 },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    List,
    Add {
        name: String,
        #[arg(long)]
        password: String,
        /// Dialplan context of the user's calls (default: default).
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        caller_id_name: Option<String>,
    },
    /// Change a user's password, context or caller id name.
    Update {
        name: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        caller_id_name: Option<String>,
    },
    /// Remove a user and its registrations.
    Remove {
        name: String,
    },
    /// Add (or update) the users of a `user,password[,context[,caller_id_name]]` file;
    /// a malformed file is refused whole with FILE:LINE.
    Import {
        file: std::path::PathBuf,
    },
    /// Print every user as `user,context,caller_id_name`.
    Export,
}

#[derive(Subcommand, Debug)]
enum RegistrationsCmd {
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Remove a user's registrations (all, or one --contact URI).
    Remove {
        user: String,
        #[arg(long)]
        contact: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Stop taking new calls and registrations (503: phones move to the next server);
    /// running calls finish, or with --migrate move to the other members at once
    /// (re-INVITEs, no gap). --wait follows the progress until none is left.
    Drain {
        /// The node (default: the one answering).
        #[arg(long, default_value_t = 0)]
        node: u64,
        #[arg(long)]
        wait: Option<f64>,
        #[arg(long)]
        migrate: bool,
    },
    /// Take calls and registrations again.
    Undrain {
        #[arg(long, default_value_t = 0)]
        node: u64,
    },
    /// Whether a node is draining, and the calls it still runs.
    Status {
        #[arg(long, default_value_t = 0)]
        node: u64,
    },
}

#[derive(Subcommand, Debug)]
enum DnsCmd {
    /// Resolve DOMAIN as a phone does (NAPTR → SRV → A/AAAA), probe every target
    /// (OPTIONS over UDP, a connect over TCP) and print priority, weight, share of
    /// traffic, reachability and latency, with warnings. Exit 0 all reachable, 5 some
    /// target unreachable, 6 nothing found. Needs no admin API.
    Check {
        domain: String,
        /// Name server to ask (IP:PORT, repeatable; default: the system's).
        #[arg(long)]
        server: Vec<SocketAddr>,
        /// Seconds to wait for each probe.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Print a BIND zone for the SIP domain from the current members (admin API):
    /// NAPTR per transport, SRV per transport and member, A/AAAA per member; draining
    /// members are left out. For operators who keep their own DNS.
    Zone {
        /// The SIP domain (default: the cluster's).
        #[arg(long)]
        domain: Option<String>,
        #[arg(long, default_value_t = 30)]
        ttl: u32,
        /// A member that only takes traffic when the others fail (SRV priority 20).
        #[arg(long)]
        backup: Vec<u64>,
        /// SRV weight of every member.
        #[arg(long, default_value_t = 50)]
        weight: u16,
        /// Publish SIP over TLS on this port (SIPS+D2T, _sips._tcp).
        #[arg(long)]
        tls_port: Option<u16>,
        /// Name servers for the NS records (default: the members' host names).
        #[arg(long)]
        ns: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CallsCmd {
    /// Caller, callee, node running it, duration, media counters.
    List {
        /// From the replicated records only (do not ask the nodes for media counters).
        #[arg(long)]
        no_media: bool,
    },
    /// Hang up a call (BYE both ways) on the node running it.
    Hangup { id: String },
}

#[derive(Subcommand, Debug)]
enum VoicemailCmd {
    /// Mailboxes with their messages: one mailbox (every user has one by its name), or
    /// every mailbox with messages, greetings or a PIN.
    List { mailbox: Option<String> },
    /// A message as a WAV file (G.711 as recorded), from any node holding it.
    Fetch {
        mailbox: String,
        id: u64,
        /// Where to write it (`-`: standard output).
        file: String,
    },
    /// Delete a message.
    Delete { mailbox: String, id: u64 },
    /// Set a mailbox's PIN (1 to 16 digits), for VoiceMailMain.
    Pin { mailbox: String, pin: String },
}

#[derive(Subcommand, Debug)]
enum CdrCmd {
    /// A table of the records of calls that ended in a time range (newest last).
    List {
        #[command(flatten)]
        range: CdrRange,
        /// Only the newest N.
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Every record of a time range as CSV (with a header line) or JSON, for billing.
    Export {
        #[command(flatten)]
        range: CdrRange,
        #[arg(long, value_enum, default_value_t = CdrFormat::Csv)]
        format: CdrFormat,
    },
}

/// Which calls: those that ended in [since, until). A time is a UTC date
/// (`2026-12-01`, `2026-12-01T08:00:00Z`), unix seconds, or an age (`90s`, `30m`,
/// `12h`, `7d`: that long ago).
#[derive(clap::Args, Debug)]
struct CdrRange {
    #[arg(long, value_parser = parse_when)]
    since: Option<u64>,
    #[arg(long, value_parser = parse_when)]
    until: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CdrFormat {
    Csv,
    Json,
}

/// Unix ms of a `--since`/`--until` value.
fn parse_when(s: &str) -> Result<u64, String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let unit = |c: char| match c {
        's' => Some(1_000u64),
        'm' => Some(60_000),
        'h' => Some(3_600_000),
        'd' => Some(86_400_000),
        _ => None,
    };
    if let Some(last) = s.chars().last().filter(|c| unit(*c).is_some()) {
        if let Ok(n) = s[..s.len() - 1].parse::<u64>() {
            return Ok(now_ms.saturating_sub(n.saturating_mul(unit(last).unwrap_or(0))));
        }
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(|secs| secs.saturating_mul(1000))
            .map_err(|e| e.to_string());
    }
    pbx_state::parse_utc(s).ok_or_else(|| {
        format!(
            "'{s}': want a UTC date (2026-12-01T08:00:00Z), unix seconds or an age (30m, 12h, 7d)"
        )
    })
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, roles, leader, term, indexes, counts.
    Status {
        /// Ask the leader (through the answering node): each member's replication lag.
        #[arg(long)]
        leader: bool,
    },
    /// Add a running node (with this cluster's id and an empty data directory): first as
    /// a learner, showing its catch-up, then as a voter.
    AddNode {
        id: u64,
        /// Its peer-link address (IP:PORT).
        #[arg(long)]
        peer: String,
        /// Its SIP address (IP:PORT).
        #[arg(long)]
        sip: String,
        /// Leave it a learner (promote it later).
        #[arg(long)]
        learner: bool,
        /// Give up waiting for the catch-up after this many seconds (exit 5).
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a node from the cluster (the leader hands over first if it is the one).
    /// Stop the node afterwards.
    RemoveNode { id: u64 },
    /// Hand leadership to another voter (default: the one furthest ahead).
    TransferLeader {
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
    /// Build a snapshot of a node's state now, so it can purge its log.
    Snapshot {
        /// The node (default: the one answering).
        #[arg(long, default_value_t = 0)]
        node: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pbxctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs an admin API call and maps its failure to an exit code.
fn admin_call<'a, F>(
    cli_target: &'a admin::Target,
    f: impl FnOnce(&'a admin::Target) -> F,
) -> anyhow::Result<ExitCode>
where
    F: std::future::Future<Output = Result<ExitCode, admin::Failure>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(f(cli_target)) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("pbxctl: {}", e.message);
            Ok(ExitCode::from(e.code))
        }
    }
}

fn admin_target(cli: &Cli) -> anyhow::Result<admin::Target> {
    let mut endpoints = cli.endpoint.clone();
    if endpoints.is_empty() {
        endpoints = std::env::var("PBX_ADMIN_ENDPOINT")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
    }
    if endpoints.is_empty() {
        bail!("no admin endpoint: --endpoint HOST:PORT or PBX_ADMIN_ENDPOINT");
    }
    let token = match &cli.token {
        Some(t) => t.clone(),
        None => std::env::var("PBX_ADMIN_TOKEN")
            .map_err(|_| anyhow!("no admin token: --token or PBX_ADMIN_TOKEN"))?,
    };
    let path = |arg: &Option<std::path::PathBuf>, var: &str| {
        arg.clone()
            .or_else(|| std::env::var_os(var).map(std::path::PathBuf::from))
    };
    let read = |p: std::path::PathBuf| {
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = match path(&cli.tls_ca, "PBX_ADMIN_TLS_CA") {
        None => None,
        Some(ca) => {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            match (
                path(&cli.tls_cert, "PBX_ADMIN_TLS_CERT"),
                path(&cli.tls_key, "PBX_ADMIN_TLS_KEY"),
            ) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => bail!("--tls-cert and --tls-key go together"),
            }
            if let Some(d) = &cli.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            Some(tls)
        }
    };
    Ok(admin::Target {
        endpoints,
        token,
        output: cli.output,
        tls,
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Cmd::Cluster { command } => {
            let t = admin_target(&cli)?;
            let change = match command {
                ClusterCmd::Status { leader } => {
                    return admin_call(&t, |t| admin::cluster_status(t, *leader))
                }
                ClusterCmd::AddNode {
                    id,
                    peer,
                    sip,
                    learner,
                    timeout,
                } => admin::ClusterChange::Add {
                    id: *id,
                    peer: peer.clone(),
                    sip: sip.clone(),
                    learner_only: *learner,
                    timeout: *timeout,
                },
                ClusterCmd::Promote { id } => admin::ClusterChange::Promote(*id),
                ClusterCmd::RemoveNode { id } => admin::ClusterChange::Remove(*id),
                ClusterCmd::TransferLeader { to } => admin::ClusterChange::TransferLeader(*to),
                ClusterCmd::Snapshot { node } => admin::ClusterChange::Snapshot(*node),
            };
            admin_call(&t, |t| admin::cluster_change(t, change))
        }
        Cmd::Dialplan {
            command: DialplanCmd::Show,
        } => admin_call(&admin_target(&cli)?, admin::dialplan_show),
        Cmd::Dialplan {
            command: DialplanCmd::History,
        } => admin_call(&admin_target(&cli)?, admin::dialplan_history),
        Cmd::Dialplan {
            command: DialplanCmd::Validate { file },
        } => admin_call(&admin_target(&cli)?, |t| {
            admin::dialplan_change(t, admin::DialplanChange::Validate(file))
        }),
        Cmd::Dialplan {
            command: DialplanCmd::Apply { file, dry_run },
        } => admin_call(&admin_target(&cli)?, |t| {
            admin::dialplan_change(
                t,
                admin::DialplanChange::Apply {
                    file,
                    dry_run: *dry_run,
                },
            )
        }),
        Cmd::Dialplan {
            command: DialplanCmd::Rollback { version },
        } => admin_call(&admin_target(&cli)?, |t| {
            admin::dialplan_change(t, admin::DialplanChange::Rollback(*version))
        }),
        Cmd::User { command } => {
            let t = admin_target(&cli)?;
            match command {
                UserCmd::List => admin_call(&t, admin::user_list),
                UserCmd::Export => admin_call(&t, admin::user_export),
                UserCmd::Import { file } => admin_call(&t, |t| admin::user_import(t, file)),
                UserCmd::Add {
                    name,
                    password,
                    context,
                    caller_id_name,
                } => admin_call(&t, |t| {
                    admin::user_change(
                        t,
                        admin::UserChange::Add {
                            name: name.clone(),
                            password: password.clone(),
                            context: context.clone(),
                            caller_id_name: caller_id_name.clone(),
                        },
                    )
                }),
                UserCmd::Update {
                    name,
                    password,
                    context,
                    caller_id_name,
                } => admin_call(&t, |t| {
                    admin::user_change(
                        t,
                        admin::UserChange::Update {
                            name: name.clone(),
                            password: password.clone(),
                            context: context.clone(),
                            caller_id_name: caller_id_name.clone(),
                        },
                    )
                }),
                UserCmd::Remove { name } => admin_call(&t, |t| {
                    admin::user_change(t, admin::UserChange::Remove(name.clone()))
                }),
            }
        }
        Cmd::Registrations { command } => {
            let t = admin_target(&cli)?;
            match command {
                RegistrationsCmd::List { user } => {
                    admin_call(&t, |t| admin::registration_list(t, user.clone()))
                }
                RegistrationsCmd::Remove { user, contact } => admin_call(&t, |t| {
                    admin::registration_remove(t, user.clone(), contact.clone())
                }),
            }
        }
        Cmd::Dns {
            command:
                DnsCmd::Zone {
                    domain,
                    ttl,
                    backup,
                    weight,
                    tls_port,
                    ns,
                },
        } => admin_call(&admin_target(&cli)?, |t| {
            admin::dns_zone(
                t,
                admin::ZoneOptions {
                    domain: domain.clone(),
                    ttl: *ttl,
                    backup: backup.clone(),
                    weight: *weight,
                    tls_port: *tls_port,
                    ns: ns.clone(),
                },
            )
        }),
        Cmd::Calls { command } => {
            let t = admin_target(&cli)?;
            match command {
                CallsCmd::List { no_media } => admin_call(&t, |t| admin::call_list(t, *no_media)),
                CallsCmd::Hangup { id } => admin_call(&t, |t| admin::call_hangup(t, id.clone())),
            }
        }
        Cmd::Audit { limit } => admin_call(&admin_target(&cli)?, |t| admin::audit_list(t, *limit)),
        Cmd::Voicemail { command } => {
            let t = admin_target(&cli)?;
            match command {
                VoicemailCmd::List { mailbox } => {
                    admin_call(&t, |t| admin::voicemail_list(t, mailbox.clone()))
                }
                VoicemailCmd::Fetch { mailbox, id, file } => admin_call(&t, |t| {
                    admin::voicemail_fetch(t, mailbox.clone(), *id, file.clone())
                }),
                VoicemailCmd::Delete { mailbox, id } => {
                    admin_call(&t, |t| admin::voicemail_delete(t, mailbox.clone(), *id))
                }
                VoicemailCmd::Pin { mailbox, pin } => admin_call(&t, |t| {
                    admin::voicemail_pin(t, mailbox.clone(), pin.clone())
                }),
            }
        }
        Cmd::Cdr { command } => {
            let t = admin_target(&cli)?;
            match command {
                CdrCmd::List { range, limit } => admin_call(&t, |t| {
                    admin::cdr_list(t, range.since, range.until, *limit, None)
                }),
                CdrCmd::Export { range, format } => {
                    let csv = matches!(format, CdrFormat::Csv);
                    admin_call(&t, |t| {
                        admin::cdr_list(t, range.since, range.until, 0, Some(csv))
                    })
                }
            }
        }
        Cmd::Node { command } => {
            let t = admin_target(&cli)?;
            match command {
                NodeCmd::Drain {
                    node,
                    wait,
                    migrate,
                } => admin_call(&t, |t| {
                    admin::node_drain(t, *node, true, false, *wait, *migrate)
                }),
                NodeCmd::Undrain { node } => admin_call(&t, |t| {
                    admin::node_drain(t, *node, false, false, None, false)
                }),
                NodeCmd::Status { node } => admin_call(&t, |t| {
                    admin::node_drain(t, *node, false, true, None, false)
                }),
            }
        }
        _ => run_local(cli),
    }
}

/// Commands that need no admin API.
fn run_local(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "pbxctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { peers, wait_ready } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(status(peers, wait_ready))
        }
        Cmd::Dialplan {
            command: DialplanCmd::Check { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match pbx_dialplan::Dialplan::parse(&text) {
                Ok(plan) => {
                    println!(
                        "{}: valid: {} contexts, {} extensions",
                        file.display(),
                        plan.contexts.len(),
                        plan.extension_count()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(pbx_dialplan::DialplanError::Invalid(errors)) => {
                    for e in errors {
                        eprintln!("{}:{}: {}", file.display(), e.line, e.reason);
                    }
                    Ok(ExitCode::from(1))
                }
                Err(e) => bail!("{}: {e}", file.display()),
            }
        }
        Cmd::Options { target, timeout } => {
            let (status, rtt) = options_probe(target, Duration::from_secs_f64(timeout))?;
            println!("{target}: {status} in {:.1} ms", rtt.as_secs_f64() * 1000.0);
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Dns {
            command:
                DnsCmd::Check {
                    domain,
                    server,
                    timeout,
                },
        } => dns_check(&domain, &server, timeout, cli.output),
        Cmd::Register {
            target,
            user,
            password,
            domain,
            contact,
            expires,
            query,
        } => {
            let mut ua = Ua::new(target)?;
            let contact = contact.unwrap_or_else(|| format!("sip:{user}@{}", ua.local));
            let mut extra: Vec<(String, String)> = Vec::new();
            if !query {
                extra.push(("Contact".into(), format!("<{contact}>")));
                extra.push(("Expires".into(), expires.to_string()));
            }
            let ruri = format!("sip:{domain}");
            let first = ua.request(Method::Register, &ruri, &user, &domain, &extra);
            let resp = ua.transact(first, Duration::from_secs(4))?;
            let resp = if resp.status() == Some(401) {
                let challenge = resp
                    .header_values(&HeaderName::WwwAuthenticate)
                    .filter_map(|v| AuthHeader::parse(v).ok())
                    .find(|h| Algorithm::parse(h.get("algorithm")).is_some())
                    .ok_or_else(|| anyhow!("no usable digest challenge"))?;
                let auth = ClientAuth {
                    algorithm: Algorithm::parse(challenge.get("algorithm"))
                        .unwrap_or(Algorithm::Md5),
                    user: &user,
                    password: &password,
                    realm: challenge.get("realm").unwrap_or(&domain),
                    nonce: challenge.get("nonce").unwrap_or_default(),
                    method: "REGISTER",
                    uri: &ruri,
                    nc: 1,
                    cnonce: &format!("{:08x}", rand::thread_rng().gen::<u32>()),
                }
                .header_value();
                extra.push(("Authorization".into(), auth));
                let second = ua.request(Method::Register, &ruri, &user, &domain, &extra);
                ua.transact(second, Duration::from_secs(4))?
            } else {
                resp
            };
            let status = resp.status().unwrap_or(0);
            println!("{status}");
            for c in resp.header_values(&HeaderName::Contact) {
                println!("Contact: {c}");
            }
            if let Some(r) = resp.header(&HeaderName::RetryAfter) {
                println!("Retry-After: {r}");
            }
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Ha1 {
            user,
            realm,
            password,
        } => {
            println!("MD5     {}", ha1(Algorithm::Md5, &user, &realm, &password));
            println!(
                "SHA-256 {}",
                ha1(Algorithm::Sha256, &user, &realm, &password)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster { .. }
        | Cmd::Dialplan { .. }
        | Cmd::User { .. }
        | Cmd::Registrations { .. }
        | Cmd::Node { .. }
        | Cmd::Audit { .. }
        | Cmd::Cdr { .. }
        | Cmd::Voicemail { .. }
        | Cmd::Calls { .. }
        | Cmd::Dns {
            command: DnsCmd::Zone { .. },
        } => {
            unreachable!("admin API commands are run above")
        }
    }
}

/// A minimal UDP user agent driving the sans-IO client transaction.
struct Ua {
    sock: UdpSocket,
    target: SocketAddr,
    local: SocketAddr,
    call_id: String,
    cseq: u32,
}

/// OPTIONS to a node over UDP: (status, round trip).
fn options_probe(target: SocketAddr, timeout: Duration) -> anyhow::Result<(u16, Duration)> {
    let mut ua = Ua::new(target)?;
    let started = Instant::now();
    let req = ua.request(
        Method::Options,
        &format!("sip:{target}"),
        "ping",
        "pbx.test",
        &[],
    );
    let resp = ua.transact(req, timeout)?;
    Ok((resp.status().unwrap_or(0), started.elapsed()))
}

/// `pbxctl dns check`: the domain resolved like a phone does (RFC 3263), every target
/// probed (OPTIONS over UDP, a connect over TCP/TLS), with warnings.
fn dns_check(
    domain: &str,
    servers: &[SocketAddr],
    timeout: f64,
    output: admin::Output,
) -> anyhow::Result<ExitCode> {
    use pbx_dns::locate::{Destination, SipTransport};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resolver = if servers.is_empty() {
        pbx_resolver::SipResolver::system()?
    } else {
        pbx_resolver::SipResolver::with_servers(servers)?
    };
    let all = [SipTransport::Udp, SipTransport::Tcp, SipTransport::Tls];
    let r = rt.block_on(resolver.resolve(
        Destination {
            host: domain.to_string(),
            port: None,
            transport: None,
            sips: false,
        },
        &all,
    ));
    let mut warnings = Vec::new();
    if !r.naptr_found() {
        warnings.push(format!(
            "no NAPTR for {domain}: phones guess the transport (SRV per transport)"
        ));
    }
    let srv = r.srv_records();
    if srv.is_empty() {
        warnings.push(format!(
            "no SRV records for {domain}: phones use its A record on port 5060, with no failover"
        ));
    }
    let timeout = Duration::from_secs_f64(timeout);
    let mut rows = Vec::new();
    let mut unreachable = 0;
    for (t, rec) in &srv {
        let same_prio: Vec<_> = srv
            .iter()
            .filter(|(t2, r2)| t2 == t && r2.priority == rec.priority)
            .collect();
        let total: u32 = same_prio.iter().map(|(_, r)| u32::from(r.weight)).sum();
        let share = if total == 0 {
            1.0 / same_prio.len() as f64
        } else {
            f64::from(rec.weight) / f64::from(total)
        };
        let addrs = r.addresses(&rec.target);
        if addrs.is_empty() {
            warnings.push(format!("{} has no A/AAAA record", rec.target));
        }
        for ip in addrs {
            let addr = SocketAddr::new(*ip, rec.port);
            let probe = match t {
                SipTransport::Udp => options_probe(addr, timeout)
                    .map(|(status, rtt)| (status == 200, format!("OPTIONS {status}"), rtt)),
                _ => {
                    let started = Instant::now();
                    std::net::TcpStream::connect_timeout(&addr, timeout)
                        .map(|_| (true, "connect".to_string(), started.elapsed()))
                        .map_err(anyhow::Error::from)
                }
            };
            let (ok, how, rtt) =
                probe.unwrap_or_else(|e| (false, format!("{e:#}"), Duration::ZERO));
            if !ok {
                unreachable += 1;
            }
            rows.push((*t, rec.clone(), share, addr, ok, how, rtt));
        }
    }
    for t in all {
        let of_t: Vec<_> = rows.iter().filter(|row| row.0 == t).collect();
        let hosts: std::collections::BTreeSet<_> = of_t.iter().map(|row| row.3.ip()).collect();
        if of_t.len() > 1 && hosts.len() == 1 {
            warnings.push(format!(
                "every {t:?} target is on one host ({}): no failover",
                hosts
                    .iter()
                    .next()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ));
        }
    }
    if rows.len() == 1 {
        warnings.push("a single server: no failover".into());
    }
    match output {
        admin::Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "domain": domain,
                "naptr": r.naptr_found(),
                "targets": rows.iter().map(|(t, rec, share, addr, ok, how, rtt)| serde_json::json!({
                    "transport": format!("{t:?}"), "priority": rec.priority, "weight": rec.weight,
                    "share": share, "target": rec.target, "address": addr.to_string(),
                    "reachable": ok, "probe": how, "latency_ms": rtt.as_secs_f64() * 1000.0,
                })).collect::<Vec<_>>(),
                "warnings": warnings,
            }))?
        ),
        admin::Output::Table => {
            println!(
                "{:<5} {:>4} {:>6} {:>6} {:<24} {:<22} {:<9} {:>9}",
                "TP", "PRIO", "WEIGHT", "SHARE", "TARGET", "ADDRESS", "REACHABLE", "LATENCY"
            );
            for (t, rec, share, addr, ok, how, rtt) in &rows {
                println!(
                    "{:<5} {:>4} {:>6} {:>5.0}% {:<24} {:<22} {:<9} {:>7.1}ms  {how}",
                    format!("{t:?}").to_uppercase(),
                    rec.priority,
                    rec.weight,
                    share * 100.0,
                    rec.target,
                    addr.to_string(),
                    if *ok { "yes" } else { "NO" },
                    rtt.as_secs_f64() * 1000.0
                );
            }
            for w in &warnings {
                println!("warning: {w}");
            }
        }
    }
    Ok(if rows.is_empty() {
        ExitCode::from(admin::EXIT_NOT_FOUND)
    } else if unreachable > 0 {
        ExitCode::from(admin::EXIT_NO_QUORUM)
    } else {
        ExitCode::SUCCESS
    })
}

impl Ua {
    fn new(target: SocketAddr) -> anyhow::Result<Ua> {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let sock = UdpSocket::bind(bind).context("bind UDP")?;
        sock.connect(target).context("connect UDP")?;
        let local = sock.local_addr()?;
        Ok(Ua {
            sock,
            target,
            local,
            call_id: format!("{:016x}@pbxctl", rand::thread_rng().gen::<u64>()),
            cseq: 0,
        })
    }

    fn request(
        &mut self,
        method: Method,
        ruri: &str,
        user: &str,
        domain: &str,
        extra: &[(String, String)],
    ) -> Bytes {
        self.cseq += 1;
        let branch: u64 = rand::thread_rng().gen();
        let mut w = MessageWriter::request(&method, ruri);
        w.header_fmt(
            "Via",
            format_args!("SIP/2.0/UDP {};rport;branch=z9hG4bK{branch:x}", self.local),
        )
        .header("Max-Forwards", "70")
        .header_fmt(
            "From",
            format_args!("<sip:{user}@{domain}>;tag={:x}", self.cseq as u64 ^ branch),
        )
        .header_fmt("To", format_args!("<sip:{user}@{domain}>"))
        .header("Call-ID", &self.call_id)
        .header_fmt("CSeq", format_args!("{} {}", self.cseq, method))
        .header("User-Agent", concat!("pbxctl/", env!("CARGO_PKG_VERSION")));
        for (n, v) in extra {
            w.header(n, v);
        }
        Bytes::from(w.finish(b""))
    }

    /// Sends a request and waits for its final response, retransmitting per Timer E.
    fn transact(&mut self, req: Bytes, timeout: Duration) -> anyhow::Result<SipMessage> {
        let start = Instant::now();
        let mut tx = ClientNonInvite::new(start, req.clone(), false, Timers::default());
        self.sock.send(&req)?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let now = Instant::now();
            if now >= start + timeout {
                bail!(
                    "{}: no answer within {:.1} s",
                    self.target,
                    timeout.as_secs_f64()
                );
            }
            let wait = tx
                .poll_timeout()
                .unwrap_or(now + timeout)
                .min(start + timeout);
            self.sock.set_read_timeout(Some(
                wait.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let Ok(msg) = parse_datagram(&buf[..n], &Limits::default()) else {
                        continue;
                    };
                    let Some(status) = msg.status() else { continue };
                    if msg.header(&HeaderName::CallId) != Some(self.call_id.as_str()) {
                        continue;
                    }
                    if let ResponseAction::Deliver = tx.on_response(Instant::now(), status) {
                        if status >= 200 {
                            return Ok(msg);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    match tx.handle_timeout(Instant::now()) {
                        TimerOutcome::Retransmit(b) => {
                            self.sock.send(&b)?;
                        }
                        TimerOutcome::TimedOut => {
                            bail!("{}: request timed out (Timer F)", self.target)
                        }
                        _ => {}
                    }
                }
                Err(e) => bail!("{}: {e}", self.target),
            }
        }
    }
}

async fn status(peers: Vec<String>, wait_ready: Option<f64>) -> anyhow::Result<ExitCode> {
    use pbx_proto::peer::peer_link_client::PeerLinkClient;
    let mut code = ExitCode::SUCCESS;
    for peer in peers {
        let deadline = Instant::now() + Duration::from_secs_f64(wait_ready.unwrap_or(0.0));
        let last = loop {
            let reply = async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(2))
                    .connect()
                    .await?;
                let r = PeerLinkClient::new(channel)
                    .status(pbx_proto::peer::StatusRequest {})
                    .await?;
                anyhow::Ok(r.into_inner())
            }
            .await;
            let done = match &reply {
                Ok(r) => wait_ready.is_none() || r.ready,
                Err(_) => wait_ready.is_none(),
            };
            if done || Instant::now() >= deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match last {
            Ok(r) => {
                let members: Vec<String> = r
                    .members
                    .iter()
                    .map(|m| {
                        format!(
                            "{}@{}{}",
                            m.id,
                            m.peer_addr,
                            if m.voter { "" } else { "(learner)" }
                        )
                    })
                    .collect();
                println!(
                    "peer={peer} node={} role={} leader={} term={} last_log={} applied={} snapshot={} serving_writes={} ready={} users={} bindings={} dialplan={} calls={} members={}",
                    r.node_id,
                    r.role,
                    r.leader_id,
                    r.term,
                    r.last_log_index,
                    r.applied_index,
                    r.snapshot_index,
                    r.serving_writes,
                    r.ready,
                    r.users,
                    r.bindings,
                    r.dialplan_version,
                    r.calls,
                    members.join(",")
                );
                if wait_ready.is_some() && !r.ready {
                    code = ExitCode::from(1);
                }
            }
            Err(e) => {
                println!("peer={peer} unreachable error={:?}", format!("{e:#}"));
                code = ExitCode::from(1);
            }
        }
    }
    Ok(code)
}
