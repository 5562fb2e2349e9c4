//! Composition root of a PBX node: configuration, storage, the state service, the SIP
//! transports and the request handler, wired together by [`Node::start`].

pub mod config;
pub mod state_service;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pbx_registrar::digest::{ha1, Algorithm};
use pbx_registrar::RequestHandler;
use pbx_state::{ClusterSettings, Command, User};
use pbx_storage::SledStore;
use rand::RngCore;

pub use config::Config;
pub use state_service::StateHandle;

/// Errors of a node. Converted to SIP answers (503) at the transport boundary.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("storage: {0}")]
    Storage(#[from] pbx_storage::StorageError),
    #[error("state: {0}")]
    State(#[from] pbx_state::StateError),
    #[error("{0}")]
    Registrar(#[from] pbx_registrar::RegistrarError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("unavailable: {0}")]
    Unavailable(String),
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running node.
pub struct Node {
    pub sip_addr: SocketAddr,
    pub state: StateHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens storage, recovers state, seeds settings and users, binds the listeners and
    /// starts serving. Returns once SIP is being served.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let data_dir = config.resolve(&config.node.data_dir);
        let store = Arc::new(SledStore::open(
            &data_dir.join("state"),
            config.storage.cache_mb << 20,
        )?);
        let state = StateHandle::open(
            store,
            config.storage.max_batch,
            config.storage.snapshot_every,
        )?;
        bootstrap(&config, &state).await?;

        let (udp, tcp) = transport::bind(config.node.sip_addr, &config.transport)?;
        let sip_addr = udp.local_addr().map_err(|source| NodeError::Bind {
            addr: config.node.sip_addr,
            source,
        })?;
        let mut local_hosts = vec![sip_addr.ip().to_string(), sip_addr.to_string()];
        local_hosts.extend(config.node.aliases.iter().cloned());
        let handler = Arc::new(RequestHandler::new(config.handler_config(local_hosts))?);
        let mut tasks = transport::serve(udp, tcp, handler, state.clone(), &config);
        tasks.push(tokio::spawn(sweeper(
            state.clone(),
            config.registrar.sweep_interval,
        )));
        tasks.push(tokio::spawn(commit_reporter(state.clone())));
        tracing::info!(node = config.node.id, %sip_addr, domain = %config.cluster.domain, "serving SIP on UDP and TCP");
        Ok(Node {
            sip_addr,
            state,
            tasks,
        })
    }

    /// Stops every task of the node.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// First start of a cluster: settings with a fresh nonce secret. Every start: users from
/// the users file that do not exist yet.
async fn bootstrap(config: &Config, state: &StateHandle) -> Result<(), NodeError> {
    let realm = config.realm();
    if state.read().settings.is_none() {
        let mut secret = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        state
            .propose(Command::Initialize(ClusterSettings {
                domain: config.cluster.domain.clone(),
                realm: realm.clone(),
                nonce_secret: secret,
            }))
            .await?;
    }
    if let Some(path) = &config.cluster.users_file {
        let entries = config::load_users(&config.resolve(path))?;
        // Only users the cluster does not know yet: a restart proposes nothing.
        let entries: Vec<_> = {
            let st = state.read();
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
                context: "default".into(),
                caller_id_name: None,
            })
            .collect();
        let n = users.len();
        // Small commands: a log entry per 500 users rather than one of tens of MB (large
        // entries are costly for the store and, with Raft, for replication).
        for chunk in users.chunks(500) {
            state.propose(Command::SeedUsers(chunk.to_vec())).await?;
        }
        tracing::info!(users = n, "users file seeded");
    }
    Ok(())
}

/// Purges expired bindings now and then (they are already invisible on read).
async fn sweeper(state: StateHandle, every_secs: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(every_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_ms = unix_ms();
        let due = {
            let st = state.read();
            st.bindings
                .values()
                .flatten()
                .any(|b| b.expires_at_ms <= now_ms)
        };
        if due {
            match state.propose(Command::SweepExpired { now_ms }).await {
                Ok(r) => tracing::debug!(?r, "swept expired bindings"),
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        }
    }
}

/// Logs what the commit path did every 10 s (batches, commands, durable latency), when it
/// did anything: the figures the benchmarks and operators need.
async fn commit_reporter(state: StateHandle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let r = state.stats.take();
        if r.batches > 0 {
            tracing::info!(
                batches = r.batches,
                commands = r.commands,
                avg_batch = r.commands / r.batches,
                durable_p50_us = r.durable_p50_us,
                durable_p99_us = r.durable_p99_us,
                "commits in the last 10 s"
            );
        }
    }
}

/// Installs the tracing subscriber for a binary.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PBX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a node until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    node.stop();
    Ok(())
}
