//! Composition root of a PBX node: configuration, storage, the replicated state
//! (Raft), the SIP sockets and the SIP endpoint's driver, wired together by
//! [`Node::start`] on listeners bound beforehand ([`Listeners`]).

mod calls;
mod cdr_postgres;
pub mod config;
mod dns;
mod metrics;
mod process;
mod sip;
mod survival;
mod tls;
mod transport;
mod voicemail;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pbx_peer::Cluster;
use pbx_registrar::digest::{ha1, Algorithm};
use pbx_state::{ClusterSettings, Command, Response, User};
use pbx_storage::SledStore;
use rand::RngCore;

pub use config::Config;
pub use pbx_peer::unix_ms;
pub use transport::Listeners;

/// Errors of a node: configuration, storage and start-up. (A request that cannot be
/// served gets its SIP answer from the endpoint, never one of these.)
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("storage: {0}")]
    Storage(#[from] pbx_storage::StorageError),
    #[error("state: {0}")]
    State(#[from] pbx_state::StateError),
    #[error("{0}")]
    Endpoint(#[from] pbx_endpoint::EndpointError),
    #[error("cluster: {0}")]
    Cluster(#[from] pbx_peer::PeerError),
    #[error("media relay: {0}")]
    Media(String),
    #[error("{0}")]
    Admin(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    pub sip_addr: SocketAddr,
    /// Where SIP over TLS is served (None: no certificate configured).
    pub tls_addr: Option<SocketAddr>,
    pub peer_addr: SocketAddr,
    /// The admin API's address (None: no token configured, not served).
    pub admin_addr: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: off).
    pub metrics_addr: Option<SocketAddr>,
    pub cluster: Cluster,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens storage, starts Raft and the peer link and serves SIP (and the admin API)
    /// on `listeners` ([`Listeners::bind`], or sockets a test bound on port 0). Settings
    /// and users are committed in the background once the cluster has a leader;
    /// [`Cluster::is_ready`] tells when that is done.
    pub async fn start(config: Config, listeners: Listeners) -> Result<Node, NodeError> {
        Node::start_on_network(config, listeners, pbx_peer::LinkFaults::default()).await
    }

    /// [`Node::start`] with the peer links going through `network`: a fault table that
    /// in-process tests share between their nodes to drop, delay or partition links.
    pub async fn start_on_network(
        config: Config,
        listeners: Listeners,
        network: pbx_peer::LinkFaults,
    ) -> Result<Node, NodeError> {
        // A bad dialplan file stops the node here, with file:line, not later.
        let initial_dialplan = match &config.cluster.dialplan_file {
            Some(path) => config::load_dialplan(&config.resolve(path))?,
            None => pbx_dialplan::DEMO_DIALPLAN.to_string(),
        };
        let admin_token = config.admin_token()?;
        let admin_tls = config.admin_tls()?;
        let sip_tls = tls::SipTls::from_config(&config)?;
        let tls_client = tls::client(&config)?;
        let data_dir = config.resolve(&config.node.data_dir);
        let state_dir = data_dir.join("state");
        let store = Arc::new(
            SledStore::open(&state_dir, config.storage.cache_mb << 20)?
                .keep_free(config.storage.min_free_mb << 20),
        );
        // Never run on another cluster's or node's data, or on a newer format.
        pbx_storage::claim(
            &*store,
            &state_dir,
            &pbx_storage::DataIdentity {
                cluster_id: config.cluster.id.clone(),
                node_id: config.node.id,
            },
        )?;
        // Nor on a log purged behind a snapshot that is not there (a deleted or
        // restored-from-elsewhere snapshot file): that would be a silently wrong state.
        pbx_peer::check_snapshot_covers_purged_log(&*store).map_err(|reason| {
            pbx_storage::StorageError::Foreign {
                path: state_dir.clone(),
                reason,
            }
        })?;
        let sip_addr = listeners
            .udp
            .local_addr()
            .map_err(|source| NodeError::Bind {
                addr: config.node.sip_addr,
                source,
            })?;
        let tls_addr = match &sip_tls {
            Some(_) => listeners.tls.as_ref().and_then(|l| l.local_addr().ok()),
            None => None,
        };
        let Listeners {
            udp,
            tcp,
            tls,
            admin: admin_listener,
            peer,
            metrics: metrics_listener,
        } = listeners;
        let started_ms = unix_ms();
        let counts = Arc::new(metrics::NodeCounts::default());
        let mut cluster_config = config.cluster_config(sip_addr);
        cluster_config.faults = network;
        // Voicemail audio beside the Raft store, under the same free-space floor
        // (ADR 0014); served to the other members from the start.
        let blobs = pbx_storage::FileBlobs::open(&data_dir.join("voicemail"))?
            .keep_free(config.storage.min_free_mb << 20);
        let blobs: Arc<dyn pbx_storage::BlobStore> = Arc::new(blobs);
        let cluster = Cluster::start_on(cluster_config, store, peer).await?;
        cluster.serve_blobs(blobs.clone());
        let peer_addr = cluster.peer_addr;

        let mut local_hosts = vec![sip_addr.ip().to_string(), sip_addr.to_string()];
        local_hosts.extend(tls_addr.map(|a| a.to_string()));
        local_hosts.extend(config.node.aliases.iter().cloned());
        let (mut tasks, parts) = sip::serve(
            (udp, tcp, tls),
            sip_tls,
            tls_client,
            config.handler_config(local_hosts),
            cluster.clone(),
            &config,
            counts.clone(),
        )?;
        let metrics_addr = match metrics_listener {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                let http = metrics::Http::new(metrics::NodeCollector {
                    counts: counts.clone(),
                    cluster: cluster.clone(),
                    endpoint: parts.endpoint,
                    io: parts.io,
                    calls: parts.calls,
                    started_ms,
                });
                tasks.push(
                    metrics::serve(listener, http).map_err(|source| NodeError::Bind {
                        addr: config.metrics.listen.unwrap_or(sip_addr),
                        source,
                    })?,
                );
                tracing::info!(addr = ?addr, "metrics and health endpoints listening (HTTP)");
                addr
            }
            None => None,
        };
        tasks.push(tokio::spawn(bootstrap(
            config.clone(),
            initial_dialplan,
            cluster.clone(),
        )));
        tasks.push(tokio::spawn(sweeper(
            cluster.clone(),
            config.registrar.sweep_interval,
        )));
        tasks.push(tokio::spawn(voicemail::keep_blobs(
            cluster.clone(),
            blobs,
            Duration::from_secs(config.storage.voicemail_repair_secs.max(1)),
        )));
        tasks.push(tokio::spawn(commit_reporter(cluster.clone())));
        tasks.push(tokio::spawn(stuck_storage_exit(cluster.clone())));
        tasks.push(tokio::spawn(cdr_postgres::run(
            cluster.clone(),
            config.cdr.clone(),
            counts.clone(),
        )));
        let admin_addr = match (admin_token, admin_listener) {
            (Some(token), Some(listener)) => {
                let addr = listener.local_addr().map_err(|source| NodeError::Bind {
                    addr: config.admin_addr(),
                    source,
                })?;
                let tls = admin_tls.is_some();
                let mutual = admin_tls.as_ref().is_some_and(|t| t.client_ca.is_some());
                tasks.push(
                    pbx_admin::serve(listener, token, admin_tls, cluster.clone())
                        .map_err(|e| NodeError::Admin(e.to_string()))?,
                );
                tracing::info!(%addr, tls, mutual_tls = mutual, "admin API (bearer token) listening");
                Some(addr)
            }
            (Some(_), None) => {
                tracing::warn!("an admin token but no admin listener: admin API off");
                None
            }
            (None, _) => {
                tracing::warn!(
                    "no admin token (admin.token_file or PBX_ADMIN_TOKEN): admin API off"
                );
                None
            }
        };
        if let Some(addr) = config.dns.listen {
            tasks.extend(
                dns::serve(
                    addr,
                    config.dns.clone(),
                    config.cluster.domain.clone(),
                    tls_addr.map(|a| a.port()),
                    cluster.clone(),
                    counts.clone(),
                )
                .await?,
            );
        }
        match tls_addr {
            Some(tls) => {
                tracing::info!(node = config.node.id, %sip_addr, %tls, %peer_addr, domain = %config.cluster.domain, "serving SIP on UDP, TCP and TLS")
            }
            None => {
                tracing::info!(node = config.node.id, %sip_addr, %peer_addr, domain = %config.cluster.domain, "serving SIP on UDP and TCP")
            }
        }
        Ok(Node {
            sip_addr,
            tls_addr,
            peer_addr,
            admin_addr,
            metrics_addr,
            cluster,
            tasks,
        })
    }

    /// A planned stop (SIGTERM): a leader hands leadership over first (bounded by
    /// [`HAND_OVER_LIMIT`]), then the node stops.
    pub async fn shut_down(self) {
        match tokio::time::timeout(HAND_OVER_LIMIT, self.cluster.hand_over_leadership()).await {
            Ok(Ok(true)) => tracing::info!("leadership handed over before stopping"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not hand leadership over"),
            Err(_) => tracing::warn!("leadership hand-over timed out"),
        }
        self.stop().await;
    }

    /// Stops every task of the node.
    pub async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        self.cluster.shutdown().await;
    }
}

/// Commits the cluster settings (first start of a cluster: a fresh nonce secret; a
/// command the state machine ignores once settings exist) and the users of the users
/// file that the cluster does not know yet. Retried until the cluster takes writes.
async fn bootstrap(config: Config, initial_dialplan: String, cluster: Cluster) {
    let mut attempt = 0u32;
    loop {
        match bootstrap_once(&config, &initial_dialplan, &cluster).await {
            Ok(()) => {
                cluster.set_ready();
                tracing::info!("node ready: settings and users committed");
                return;
            }
            Err(e) => {
                if attempt.is_multiple_of(20) {
                    tracing::info!(error = %e, "bootstrap waiting for the cluster");
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn bootstrap_once(
    config: &Config,
    initial_dialplan: &str,
    cluster: &Cluster,
) -> Result<(), NodeError> {
    let realm = config.realm();
    if cluster.read().settings.is_none() {
        let mut secret = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        cluster
            .propose(Command::Initialize(ClusterSettings {
                domain: config.cluster.domain.clone(),
                realm: realm.clone(),
                nonce_secret: secret,
            }))
            .await?;
    }
    if cluster.read().dialplan.is_none() {
        let source = initial_dialplan.to_string();
        match cluster
            .propose(Command::SetDialplan { source, now_ms: 0 })
            .await?
        {
            Response::DialplanVersion(v) => {
                tracing::info!(version = v, "initial dialplan committed")
            }
            other => tracing::error!(?other, "initial dialplan refused"),
        }
    }
    // Calls this node ran before it (re)started lost their process here: the others
    // resume them (ADR 0010); nobody else: they are dropped. Proposed on every start,
    // before this node takes calls of its own: any call recorded as this node's
    // afterwards was given to it in this life.
    let me = config.node.id;
    let to = cluster.read().call_takers(me, &cluster.voters(), |_| true);
    cluster
        .propose(Command::AdoptCalls {
            from: me,
            to,
            only: None,
            now_ms: unix_ms(),
        })
        .await?;
    if let Some(path) = &config.cluster.users_file {
        let entries = config::load_users(&config.resolve(path))?;
        // Only users the cluster does not know yet: a restart proposes nothing.
        let entries: Vec<_> = {
            let st = cluster.read();
            entries
                .into_iter()
                .filter(|u| !st.users.contains_key(&u.name))
                .collect()
        };
        if entries.is_empty() {
            return Ok(());
        }
        let users: Vec<User> = entries
            .iter()
            .map(|u| User {
                name: u.name.clone(),
                ha1_md5: ha1(Algorithm::Md5, &u.name, &realm, &u.password),
                ha1_sha256: ha1(Algorithm::Sha256, &u.name, &realm, &u.password),
                realm: realm.clone(),
                context: u.context.clone().unwrap_or_else(|| "default".into()),
                caller_id_name: u.caller_id_name.clone(),
            })
            .collect();
        let n = users.len();
        // Small commands: a log entry per 500 users rather than one of tens of MB (large
        // entries are costly for the store and for replication).
        for chunk in users.chunks(500) {
            cluster.propose(Command::SeedUsers(chunk.to_vec())).await?;
        }
        tracing::info!(users = n, "users file seeded");
    }
    Ok(())
}

/// Purges expired bindings now and then (they are already invisible on read). A
/// leader-only job: followers skip their turn.
async fn sweeper(cluster: Cluster, every_secs: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(every_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !cluster.is_leader() {
            continue;
        }
        let now_ms = unix_ms();
        let due = cluster.read().has_expired_bindings(now_ms);
        if due {
            match cluster.propose(Command::SweepExpired { now_ms }).await {
                Ok(r) => tracing::debug!(?r, "swept expired bindings"),
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        }
    }
}

/// Logs what the commit path did every 10 s (batches, commands, commit latency), when it
/// did anything: the figures the benchmarks and operators need.
/// After a full disk made sled fail a write it keeps in a blob file, sled cannot close
/// the failed database and holds its file lock: the store cannot be reopened in this
/// process. After 30 s of that the process exits with 75 (EX_TEMPFAIL) so its
/// supervisor (systemd `Restart=on-failure`) starts it again on the same data; nothing
/// acknowledged is lost (if the disk is still full it stops at its next write again).
async fn stuck_storage_exit(cluster: Cluster) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(since) = cluster.storage_health().stuck_since() else {
            continue;
        };
        if unix_ms().saturating_sub(since) >= 30_000 {
            tracing::error!(
                "the store cannot be reopened in this process (sled holds the failed database's lock): exiting for a restart"
            );
            std::process::exit(75);
        }
    }
}

async fn commit_reporter(cluster: Cluster) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let r = cluster.stats().take();
        if r.batches > 0 {
            tracing::info!(
                batches = r.batches,
                commands = r.commands,
                avg_batch = r.commands / r.batches,
                commit_p50_us = r.commit_p50_us,
                commit_p99_us = r.commit_p99_us,
                "commits in the last 10 s"
            );
        }
    }
}

/// Installs the tracing subscriber for a binary: `[log] level` (or `PBX_LOG`) as the
/// filter, text or one JSON object a line (`[log] format`), each line with the fields
/// of its spans (a call's lines carry its `call_id` and `node`).
pub fn init_tracing(log: &config::LogSection) {
    // openraft logs routine events (elections, unreachable peers) at INFO..ERROR; our
    // own log lines say what matters (role changes, serving writes or not).
    let filter = std::env::var("PBX_LOG").unwrap_or_else(|_| log.level.clone());
    let filter = if filter.contains("openraft") {
        filter
    } else {
        format!("{filter},openraft=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match log.format {
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// How long a stopping leader tries to hand leadership over (a transfer takes one
/// lease, 1.1 s by default; the launcher and systemd wait longer before SIGKILL).
const HAND_OVER_LIMIT: Duration = Duration::from_secs(4);

/// Runs a node until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let listeners = Listeners::bind(&config)?;
    let node = Node::start(config, listeners).await?;
    shutdown.await;
    tracing::info!("shutting down");
    node.shut_down().await;
    Ok(())
}
