//! Node configuration: one TOML file per node, validated at start. Unknown keys and bad
//! values are refused with the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pbx_registrar::digest::Algorithm;
use pbx_registrar::throttle::BanPolicy;
use pbx_registrar::HandlerConfig;
use pbx_state::users_csv::{self, UserRow};
use pbx_state::StateError;
use serde::Deserialize;

use crate::NodeError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub registrar: RegistrarSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub transport: TransportSection,
    #[serde(default)]
    pub calls: CallsSection,
    #[serde(default)]
    pub overload: OverloadSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub dns: DnsSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub cdr: CdrSection,
    /// Directory relative paths are resolved against (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Unique, never reused, > 0.
    pub id: u64,
    pub data_dir: PathBuf,
    /// Address SIP listens on, UDP and TCP (port 0: pick a free port, for tests).
    pub sip_addr: SocketAddr,
    /// Address the peer link (gRPC: Raft, forwarded writes) listens on; default: the
    /// SIP address's IP, port 7001 (port 0 when the SIP port is 0).
    pub peer_addr: Option<SocketAddr>,
    /// Other names or addresses phones may use for this node in a Request-URI.
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Shared by every member; peers with another id are refused.
    #[serde(default = "default_cluster_id")]
    pub id: String,
    /// The members a brand-new cluster starts with (this node alone when empty). Only
    /// read when a node has no Raft state yet; later changes go through membership
    /// commands.
    #[serde(default)]
    pub members: Vec<MemberEntry>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// How long a REGISTER may wait for a leader and a majority before it gets 503.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Liveness probes of the other members (ADR 0010): how often; a member whose
    /// connection is refused this long is dead (its process is gone), one that is
    /// silent this long is dead (or cut off) too. Their calls are then adopted.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    #[serde(default = "default_dead_after_refused_ms")]
    pub dead_after_refused_ms: u64,
    #[serde(default = "default_dead_after_silence_ms")]
    pub dead_after_silence_ms: u64,
    /// A node without a majority this long stops its answered calls (no signalling, no
    /// media) so that they run nowhere twice once adopted; less than
    /// `dead_after_silence_ms`.
    #[serde(default = "default_fence_after_ms")]
    pub fence_after_ms: u64,
    /// Retry-After (seconds) on a 503 for a write that could not be committed.
    #[serde(default = "default_retry_after")]
    pub retry_after: u32,
    pub domain: String,
    /// Digest realm; the domain when absent.
    pub realm: Option<String>,
    /// `user,password` CSV seeded into the replicated state at start (existing users
    /// are left alone).
    pub users_file: Option<PathBuf>,
    /// Asterisk `extensions.conf` committed when the cluster has no dialplan yet (the
    /// built-in demo dialplan when absent). Later changes go through the cluster, not
    /// this file.
    pub dialplan_file: Option<PathBuf>,
}

/// One initial member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub id: u64,
    /// Its peer-link address.
    pub peer: SocketAddr,
    /// Its SIP address.
    pub sip: SocketAddr,
}

fn default_cluster_id() -> String {
    "pbx".into()
}
fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_timeout_min_ms() -> u64 {
    500
}
fn default_election_timeout_max_ms() -> u64 {
    1000
}
fn default_write_timeout_ms() -> u64 {
    3000
}
fn default_probe_interval_ms() -> u64 {
    100
}
fn default_dead_after_refused_ms() -> u64 {
    200
}
fn default_dead_after_silence_ms() -> u64 {
    3000
}
fn default_fence_after_ms() -> u64 {
    1500
}
fn default_retry_after() -> u32 {
    5
}

impl ClusterSection {
    /// A probe without an answer by then counts as silence.
    pub fn probe_timeout_ms(&self) -> u64 {
        (self.probe_interval_ms * 5).min(1000)
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            id: default_cluster_id(),
            members: Vec::new(),
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_min_ms: default_election_timeout_min_ms(),
            election_timeout_max_ms: default_election_timeout_max_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            probe_interval_ms: default_probe_interval_ms(),
            dead_after_refused_ms: default_dead_after_refused_ms(),
            dead_after_silence_ms: default_dead_after_silence_ms(),
            fence_after_ms: default_fence_after_ms(),
            retry_after: default_retry_after(),
            domain: "pbx.test".into(),
            realm: None,
            users_file: None,
            dialplan_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarSection {
    pub min_expires: u32,
    pub default_expires: u32,
    pub max_expires: u32,
    pub max_contacts: u32,
    /// Seconds between sweeps of expired bindings.
    pub sweep_interval: u64,
    /// How a UDP phone is reached: `auto` (at its Contact unless that is a private
    /// address other than the REGISTER's source: then the source), `force` (always the
    /// source), `no` (always the Contact).
    pub nat: pbx_endpoint::NatPolicy,
}

impl Default for RegistrarSection {
    fn default() -> Self {
        let h = HandlerConfig::default();
        RegistrarSection {
            min_expires: h.min_expires,
            default_expires: h.default_expires,
            max_expires: h.max_expires,
            max_contacts: h.max_contacts,
            sweep_interval: 30,
            nat: pbx_endpoint::NatPolicy::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Seconds a nonce stays valid; older ones get `stale=true`.
    pub nonce_ttl: u64,
    /// Offered in this order: "SHA-256", "MD5".
    pub challenge_algorithms: Vec<String>,
    /// Failed authentications from one address within `ban_window` seconds that ban it
    /// for `ban_duration` seconds; 0 disables.
    pub ban_after_failures: u32,
    pub ban_window: u64,
    pub ban_duration: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        let b = BanPolicy::default();
        AuthSection {
            nonce_ttl: 60,
            challenge_algorithms: vec!["MD5".into()],
            ban_after_failures: b.max_failures,
            ban_window: b.window_secs,
            ban_duration: b.ban_secs,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// Seconds a TCP connection may stay silent before it is closed.
    pub tcp_idle_timeout: u64,
    pub max_message_size: usize,
    pub max_tcp_connections: usize,
    /// Socket buffer sizes for the UDP socket, bytes.
    pub udp_buffer_bytes: usize,
    /// Tasks receiving on the UDP socket.
    pub udp_workers: usize,
}

impl Default for TransportSection {
    fn default() -> Self {
        TransportSection {
            tcp_idle_timeout: 600,
            max_message_size: 65_535,
            max_tcp_connections: 10_000,
            udp_buffer_bytes: 8 << 20,
            udp_workers: 2,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Address of the admin API (gRPC); default: the SIP address's IP, port 7002 (port 0
    /// when the SIP port is 0).
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token admin calls must carry (the `PBX_ADMIN_TOKEN`
    /// environment variable overrides it). Without a token the admin API is not served.
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain and key: the admin API speaks TLS (the token is still
    /// required).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
}

/// The cluster's own DNS: the node answers authoritatively for the SIP domain with the
/// NAPTR, SRV and A/AAAA records of the members that are alive, in the quorum and not
/// draining (see `pbx_dns::zone`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// UDP and TCP address to serve DNS on; absent: no DNS.
    pub listen: Option<SocketAddr>,
    /// TTL of every record, seconds: how long a dead node may stay in phones' caches.
    pub ttl: u32,
    /// Members published as backups (SRV priority 20; the others get 10).
    pub backup: Vec<u64>,
    /// SRV weight of every member.
    pub weight: u16,
    /// How often the other members are probed (peer-link status), milliseconds; a
    /// member that does not answer within half of it is left out.
    pub probe_interval_ms: u64,
    /// Name servers the node asks when it calls into another domain (RFC 3263:
    /// `Dial(SIP/x@provider.example)`); empty: the system's (`/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    /// Seconds a server that timed out or answered 503 is tried last.
    pub dead_target_secs: u64,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            listen: None,
            ttl: 10,
            backup: Vec::new(),
            weight: 50,
            probe_interval_ms: 1000,
            resolvers: Vec::new(),
            dead_target_secs: 60,
        }
    }
}

/// SIP over TLS (`sips:`, `_sips._tcp`, port 5061): on when a certificate and its key
/// are given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first. Phones check it against the SIP domain
    /// (RFC 5922), so its names should include the domain and the node's host name.
    pub cert: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Address to listen on; default: the SIP address's IP, port 5061 (port 0 when the
    /// SIP port is 0). Every member should use the same port: the cluster's DNS
    /// publishes one.
    pub listen: Option<SocketAddr>,
    /// Seconds between checks of the two files; a changed pair that loads is used for
    /// new connections.
    pub reload_check_secs: u64,
    /// Seconds a TLS handshake may take before the connection is dropped.
    pub handshake_timeout_secs: u64,
    /// PEM CA certificates that servers this node calls over TLS (trunks, other
    /// domains) must chain to; absent: the system's bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`). Their certificate must name the SIP
    /// domain called (RFC 5922).
    pub ca_file: Option<PathBuf>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            listen: None,
            reload_check_secs: 10,
            handshake_timeout_secs: 10,
            ca_file: None,
        }
    }
}

/// The admin API's TLS material, read from the files the config names.
pub use pbx_admin::AdminTls;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsSection {
    /// Calls this node runs at once; one more is answered 503 so the phone tries the
    /// next server.
    pub max_calls: usize,
    /// Anchor media in the node's RTP relay (false: SDP passes through untouched and
    /// media flows phone to phone; Echo and Playback then have no media).
    pub relay_media: bool,
    /// The address phones send media to; the SIP address's IP when absent.
    pub rtp_ip: Option<std::net::IpAddr>,
    /// RTP port range (even start; RTCP uses the odd port above each RTP port).
    pub rtp_port_min: u16,
    pub rtp_port_max: u16,
    /// Seconds without RTP before an answered call is ended (0: never).
    pub no_media_timeout: u64,
    /// RTP relay threads, each one poll loop for its share of the calls (0: half the
    /// cores, at least one).
    pub relay_threads: usize,
    /// While media flows, each relay thread wakes at most once per this many µs and
    /// forwards what arrived meanwhile (0: per packet; more CPU, no added delay).
    pub relay_batch_us: u64,
    /// G.711 prompts for Playback: NAME.ulaw and NAME.alaw.
    pub sounds_dir: PathBuf,
    /// IANA time zone of the dialplan's time conditions that name none (GotoIfTime);
    /// empty: the system's (`/etc/timezone`, `/etc/localtime`), else UTC. Give it
    /// explicitly on clusters whose nodes are in different zones.
    pub timezone: String,
    /// Message-waiting NOTIFYs (RFC 3842) also to registered phones that do not
    /// subscribe to their mailbox, as Asterisk's unsolicited MWI (each phone's lamp
    /// from the node it registered on).
    pub unsolicited_mwi: bool,
}

impl CallsSection {
    /// The zone of time conditions: `timezone`, else the system's, else UTC.
    pub fn time_zone(&self) -> String {
        if !self.timezone.is_empty() {
            return self.timezone.clone();
        }
        let from_file = std::fs::read_to_string("/etc/timezone")
            .ok()
            .map(|s| s.trim().to_string());
        let from_link = std::fs::read_link("/etc/localtime").ok().and_then(|p| {
            let p = p.to_string_lossy().into_owned();
            p.split_once("zoneinfo/").map(|(_, z)| z.to_string())
        });
        [from_file, from_link]
            .into_iter()
            .flatten()
            .find(|z| pbx_dialplan::valid_timezone(z))
            .unwrap_or_else(|| "UTC".into())
    }
}

/// Sockets a relayed call holds: RTP and RTCP on each side of its stream.
pub const SOCKETS_PER_CALL: u64 = 4;

impl CallsSection {
    /// The calls this node admits at once: `max_calls`, or fewer where the RTP port
    /// range or the process's descriptor limit (`fd_limit`) cannot hold that many
    /// single-stream calls — with the reason then. Past it a call is answered 503 at
    /// once; without it, an overload would run the process out of descriptors, and
    /// then storage writes fail with the calls (issue 15's overload runs).
    pub fn capacity(&self, fd_limit: u64) -> (usize, Option<String>) {
        if !self.relay_media {
            return (self.max_calls, None);
        }
        // One port per socket.
        let ports =
            u64::from(self.rtp_port_max.saturating_sub(self.rtp_port_min)) / SOCKETS_PER_CALL;
        // Kept for SIP connections, peer links, storage and the rest.
        let reserve = (fd_limit / 4).clamp(256, 16_384);
        let descriptors = fd_limit.saturating_sub(reserve) / SOCKETS_PER_CALL;
        let max = self.max_calls as u64;
        let limit = max.min(ports).min(descriptors);
        let reason = (limit < max).then(|| {
            if limit == ports {
                format!(
                    "the RTP port range {}-{} holds {ports} relayed calls",
                    self.rtp_port_min, self.rtp_port_max
                )
            } else {
                format!(
                    "{fd_limit} open files allowed (ulimit -n / LimitNOFILE), {reserve} kept \
                     for connections and storage, {SOCKETS_PER_CALL} sockets per relayed call"
                )
            }
        });
        (limit as usize, reason)
    }
}

/// Overload control (`pbx_endpoint::overload`): new work shed when the commit queue
/// stands, floods from one address dropped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadSection {
    /// Shed new REGISTERs and calls while even the quickest commit of an interval takes
    /// longer than this.
    pub commit_delay_target_ms: u64,
    pub interval_ms: u64,
    /// No shedding below this many commits in flight (an election stalls a few).
    pub min_pending_commits: usize,
    /// Shed whatever the delay beyond this many commits in flight.
    pub max_pending_commits: usize,
    /// Shed new REGISTERs and calls while the UDP socket has not been found empty for
    /// this long (datagrams queue in the kernel's buffer).
    pub backlog_target_ms: u64,
    /// New requests per second one source IP may send (bursts of twice that); beyond,
    /// they are dropped unanswered. 0: no limit (a lab driving load from one address).
    pub per_source_rate: u32,
}

impl Default for OverloadSection {
    fn default() -> Self {
        let d = pbx_endpoint::OverloadConfig::default();
        OverloadSection {
            commit_delay_target_ms: d.commit_delay_target.as_millis() as u64,
            interval_ms: d.interval.as_millis() as u64,
            min_pending_commits: d.min_pending,
            max_pending_commits: d.max_pending,
            backlog_target_ms: d.backlog_target.as_millis() as u64,
            per_source_rate: d.per_source_rate,
        }
    }
}

impl OverloadSection {
    pub fn endpoint_config(&self) -> pbx_endpoint::OverloadConfig {
        pbx_endpoint::OverloadConfig {
            commit_delay_target: std::time::Duration::from_millis(self.commit_delay_target_ms),
            interval: std::time::Duration::from_millis(self.interval_ms),
            min_pending: self.min_pending_commits,
            max_pending: self.max_pending_commits,
            backlog_target: std::time::Duration::from_millis(self.backlog_target_ms),
            per_source_rate: self.per_source_rate,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("overload.interval_ms: must be > 0".into());
        }
        if self.max_pending_commits == 0 || self.min_pending_commits > self.max_pending_commits {
            return Err(
                "overload.max_pending_commits: must be > 0 and at least min_pending_commits".into(),
            );
        }
        Ok(())
    }
}

impl Default for CallsSection {
    fn default() -> Self {
        CallsSection {
            // What the default port range holds (four ports per relayed call).
            max_calls: 2500,
            relay_media: true,
            rtp_ip: None,
            rtp_port_min: 20_000,
            rtp_port_max: 30_000,
            no_media_timeout: 60,
            relay_threads: 0,
            relay_batch_us: 1000,
            sounds_dir: PathBuf::from("/usr/share/pbxd/sounds"),
            timezone: String::new(),
            unsolicited_mwi: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub cache_mb: u64,
    /// Free space (MiB) the data directory's file system keeps: below it Raft appends
    /// and snapshots wait (writes are answered 503) instead of filling the disk; 0 turns
    /// the floor off.
    pub min_free_mb: u64,
    /// Raft log entries between snapshots (the log is purged behind them).
    pub snapshot_every: u64,
    /// Most commands in one Raft log entry (group commit).
    pub max_batch: usize,
    /// Batches one node has in flight at once. One: openraft 0.9 sends a follower one
    /// append request at a time, so a second batch in flight only waits in the leader's
    /// queue and adds its wait to the commit time (4 measured 2–4x the commit time of 1
    /// at the same throughput, `docs/benchmarks.md`).
    pub max_inflight: usize,
    /// Log entries kept behind a snapshot, so a briefly absent node catches up from the
    /// log instead of a whole snapshot.
    pub log_kept_after_snapshot: u64,
    /// Seconds between two passes of the voicemail audio keeper (ADR 0014): each voter
    /// copies the messages' audio it lacks from a holder, and removes audio no message
    /// refers to any more.
    pub voicemail_repair_secs: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            cache_mb: 64,
            min_free_mb: pbx_storage::DEFAULT_MIN_FREE >> 20,
            snapshot_every: 10_000,
            max_batch: 512,
            max_inflight: 1,
            log_kept_after_snapshot: 1000,
            voicemail_repair_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter, e.g. "info" or "pbx_node=debug".
    pub level: String,
    /// `text` (default) or `json`: one JSON object a line for log shippers, with the
    /// fields of the line's spans (call_id, node) in it.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Call detail records: how long the cluster keeps them, and the PostgreSQL database
/// the leader ships them to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdrSection {
    /// Hours a record is kept after its call ended (longer while it is not in
    /// PostgreSQL yet, up to `keep_max`).
    pub keep_hours: u64,
    /// Records kept at most (the oldest go first): they live in every node's memory
    /// and snapshots.
    pub keep_max: u64,
    /// A PostgreSQL connection string (`host=… user=… dbname=…` or
    /// `postgresql://…`); None: records stay in the cluster only. Set it on every
    /// node alike: the leader ships.
    pub postgres: Option<String>,
    /// The table records go to (created if missing).
    pub table: String,
    /// Records per INSERT.
    pub batch: usize,
}

impl Default for CdrSection {
    fn default() -> Self {
        CdrSection {
            keep_hours: 7 * 24,
            keep_max: 200_000,
            postgres: None,
            table: "cdr".into(),
            batch: 500,
        }
    }
}

impl CdrSection {
    pub fn keep(&self) -> pbx_state::CdrKeep {
        pbx_state::CdrKeep {
            max_age_ms: self.keep_hours.saturating_mul(3_600_000),
            max_count: self.keep_max.max(1),
            hold_unshipped: self.postgres.is_some(),
        }
    }
}

/// Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Where the HTTP listener binds (None: off).
    pub listen: Option<SocketAddr>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, path, base)
    }

    pub fn parse(text: &str, path: &Path, base_dir: PathBuf) -> Result<Config, NodeError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            // toml reports the key and the reason; add the line for editors.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            NodeError::Config {
                path: path.to_path_buf(),
                reason: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        cfg.base_dir = base_dir;
        cfg.validate().map_err(|reason| NodeError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.node.id == 0 {
            return Err("node.id: must be greater than 0".into());
        }
        self.overload.validate()?;
        let t = &self.cdr.table;
        // The table name goes into SQL text: a plain identifier only.
        if t.is_empty()
            || t.len() > 63
            || !t
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || t.as_bytes()[0].is_ascii_digit()
        {
            return Err(format!(
                "cdr.table: '{t}' must be a lowercase SQL identifier (a-z, 0-9, _)"
            ));
        }
        if self.cdr.batch == 0 {
            return Err("cdr.batch: must be > 0".into());
        }
        let d = &self.cluster.domain;
        if d.is_empty()
            || !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(format!("cluster.domain: '{d}' is not a host name"));
        }
        if self
            .cluster
            .realm
            .as_deref()
            .is_some_and(|r| r.is_empty() || r.contains('"'))
        {
            return Err("cluster.realm: must be non-empty and contain no quote".into());
        }
        self.algorithms()?;
        self.handler_config(Vec::new()).validate().map_err(|e| {
            e.to_string()
                .replace("invalid registrar configuration: ", "registrar.")
        })?;
        if self.registrar.sweep_interval == 0 {
            return Err("registrar.sweep_interval: must be > 0".into());
        }
        if self.transport.max_message_size < 1024 || self.transport.max_message_size > 1 << 20 {
            return Err("transport.max_message_size: must be between 1024 and 1048576".into());
        }
        if self.transport.udp_workers == 0 || self.transport.udp_workers > 64 {
            return Err("transport.udp_workers: must be between 1 and 64".into());
        }
        if self.transport.tcp_idle_timeout == 0 {
            return Err("transport.tcp_idle_timeout: must be > 0".into());
        }
        if self.dns.probe_interval_ms < 100 {
            return Err("dns.probe_interval_ms: must be >= 100".into());
        }
        if self.dns.ttl == 0 {
            return Err("dns.ttl: must be > 0".into());
        }
        let a = &self.admin;
        if a.tls_cert.is_some() != a.tls_key.is_some() {
            return Err("admin.tls_cert and admin.tls_key go together".into());
        }
        if a.tls_client_ca.is_some() && a.tls_cert.is_none() {
            return Err("admin.tls_client_ca needs admin.tls_cert and admin.tls_key".into());
        }
        let t = &self.tls;
        if t.cert.is_some() != t.key.is_some() {
            return Err("tls.cert and tls.key go together".into());
        }
        if t.reload_check_secs == 0 || t.handshake_timeout_secs == 0 {
            return Err("tls.reload_check_secs and tls.handshake_timeout_secs: must be > 0".into());
        }
        if t.cert.is_some()
            && self.tls_addr() == self.node.sip_addr
            && self.node.sip_addr.port() != 0
        {
            return Err("tls.listen: must differ from node.sip_addr (TCP is served there)".into());
        }
        let c = &self.calls;
        if !c.rtp_port_min.is_multiple_of(2)
            || c.rtp_port_min < 1024
            || c.rtp_port_max <= c.rtp_port_min + 2
        {
            return Err(
                "calls.rtp_port_min/rtp_port_max: need an even start >= 1024 and room for two port pairs"
                    .into(),
            );
        }
        if c.max_calls == 0 {
            return Err("calls.max_calls: must be > 0".into());
        }
        if c.relay_threads > 64 {
            return Err("calls.relay_threads: at most 64 (0: half the cores)".into());
        }
        if c.relay_batch_us > 10_000 {
            return Err(
                "calls.relay_batch_us: at most 10000 (half a 20 ms packet interval of delay)"
                    .into(),
            );
        }
        if !c.timezone.is_empty() && !pbx_dialplan::valid_timezone(&c.timezone) {
            return Err(format!(
                "calls.timezone: {:?} is not an IANA time zone (e.g. Europe/Berlin, UTC)",
                c.timezone
            ));
        }
        if self.storage.max_batch == 0 || self.storage.max_batch > 16_384 {
            return Err("storage.max_batch: must be between 1 and 16384".into());
        }
        if self.storage.max_inflight == 0 {
            return Err("storage.max_inflight: must be > 0".into());
        }
        self.validate_cluster()?;
        if self.storage.snapshot_every < 100 {
            return Err("storage.snapshot_every: must be at least 100".into());
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(format!(
                "log.level: '{}' is not a valid filter",
                self.log.level
            ));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), String> {
        let c = &self.cluster;
        if c.id.is_empty() || !c.id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "cluster.id: '{}' must be printable ASCII without spaces",
                c.id
            ));
        }
        if c.heartbeat_ms == 0 {
            return Err("cluster.heartbeat_ms: must be > 0".into());
        }
        if c.election_timeout_min_ms <= c.heartbeat_ms * 2 {
            return Err(
                "cluster.election_timeout_min_ms: must be more than twice heartbeat_ms".into(),
            );
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(
                "cluster.election_timeout_max_ms: must be greater than election_timeout_min_ms"
                    .into(),
            );
        }
        if c.write_timeout_ms < 100 {
            return Err("cluster.write_timeout_ms: must be at least 100".into());
        }
        if c.probe_interval_ms < 20 || c.dead_after_refused_ms < c.probe_interval_ms {
            return Err("cluster.probe_interval_ms: must be at least 20, and \
                 dead_after_refused_ms at least one probe interval"
                .into());
        }
        // A cut-off node notices after a probe timeout and interval, then waits
        // fence_after: it must have stopped its calls before the others adopt them.
        if c.fence_after_ms + c.probe_timeout_ms() + c.probe_interval_ms >= c.dead_after_silence_ms
        {
            return Err(
                "cluster.fence_after_ms: must be less than dead_after_silence_ms \
                 by more than a probe timeout and interval (a cut-off node stops its \
                 calls before they are adopted)"
                    .into(),
            );
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut peers = std::collections::BTreeSet::new();
        for m in &c.members {
            if m.id == 0 {
                return Err("cluster.members: ids must be greater than 0".into());
            }
            if !ids.insert(m.id) {
                return Err(format!("cluster.members: id {} is listed twice", m.id));
            }
            if !peers.insert(m.peer) {
                return Err(format!(
                    "cluster.members: peer address {} is listed twice",
                    m.peer
                ));
            }
        }
        if let Some(me) = c.members.iter().find(|m| m.id == self.node.id) {
            if me.peer != self.peer_addr() {
                return Err(format!(
                    "cluster.members: node {} is listed with peer {} but node.peer_addr is {}",
                    me.id,
                    me.peer,
                    self.peer_addr()
                ));
            }
        }
        Ok(())
    }

    /// Where the peer link listens.
    pub fn peer_addr(&self) -> SocketAddr {
        self.node.peer_addr.unwrap_or_else(|| {
            let port = if self.node.sip_addr.port() == 0 {
                0
            } else {
                7001
            };
            SocketAddr::new(self.node.sip_addr.ip(), port)
        })
    }

    /// Where SIP over TLS listens (when [`TlsSection::cert`] is set).
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls.listen.unwrap_or_else(|| {
            let port = if self.node.sip_addr.port() == 0 {
                0
            } else {
                5061
            };
            SocketAddr::new(self.node.sip_addr.ip(), port)
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.listen.unwrap_or_else(|| {
            let port = if self.node.sip_addr.port() == 0 {
                0
            } else {
                7002
            };
            SocketAddr::new(self.node.sip_addr.ip(), port)
        })
    }

    /// The admin token: `PBX_ADMIN_TOKEN`, else the token file; `None`: no admin API.
    /// A token shorter than 16 characters is refused.
    pub fn admin_token(&self) -> Result<Option<String>, NodeError> {
        let bad = |path: PathBuf, reason: String| NodeError::Config { path, reason };
        let token = match std::env::var("PBX_ADMIN_TOKEN") {
            Ok(t) if !t.is_empty() => t,
            _ => match &self.admin.token_file {
                None => return Ok(None),
                Some(p) => {
                    let path = self.resolve(p);
                    std::fs::read_to_string(&path)
                        .map_err(|e| bad(path.clone(), format!("admin.token_file: {e}")))?
                        .trim()
                        .to_string()
                }
            },
        };
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                self.admin.token_file.clone().unwrap_or_default(),
                "admin token: needs at least 16 printable characters".into(),
            ));
        }
        Ok(Some(token))
    }

    /// The admin API's TLS material (None: plain HTTP/2), read now so a missing or
    /// unreadable file stops the node at start with its path.
    pub fn admin_tls(&self) -> Result<Option<AdminTls>, NodeError> {
        let a = &self.admin;
        let read = |p: &PathBuf, what: &str| {
            let path = self.resolve(p);
            std::fs::read(&path).map_err(|e| NodeError::Config {
                path: path.clone(),
                reason: format!("admin.{what}: {e}"),
            })
        };
        // Pairing checked in validate().
        let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
            return Ok(None);
        };
        Ok(Some(AdminTls {
            cert: read(cert, "tls_cert")?,
            key: read(key, "tls_key")?,
            client_ca: a
                .tls_client_ca
                .as_ref()
                .map(|p| read(p, "tls_client_ca"))
                .transpose()?,
        }))
    }

    /// The Raft side of this configuration.
    pub fn cluster_config(&self, sip_addr: SocketAddr) -> pbx_peer::ClusterConfig {
        use std::time::Duration;
        let c = &self.cluster;
        let member = |peer: SocketAddr, sip: SocketAddr| pbx_peer::Member {
            peer_addr: peer.to_string(),
            sip_addr: sip.to_string(),
        };
        let listen = self.peer_addr();
        let mut initial: std::collections::BTreeMap<u64, pbx_peer::Member> = c
            .members
            .iter()
            .map(|m| (m.id, member(m.peer, m.sip)))
            .collect();
        if initial.is_empty() {
            initial.insert(self.node.id, member(listen, sip_addr));
        }
        pbx_peer::ClusterConfig {
            node_id: self.node.id,
            cluster_id: c.id.clone(),
            member: member(listen, sip_addr),
            initial_members: initial,
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            election_timeout_min: Duration::from_millis(c.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(c.election_timeout_max_ms),
            snapshot_every: self.storage.snapshot_every,
            max_batch: self.storage.max_batch,
            max_inflight: self.storage.max_inflight,
            log_kept_after_snapshot: self.storage.log_kept_after_snapshot,
            write_timeout: Duration::from_millis(c.write_timeout_ms),
            connect_timeout: Duration::from_millis(c.heartbeat_ms.max(500)),
            faults: pbx_peer::LinkFaults::default(),
            liveness: pbx_peer::LivenessConfig {
                probe_every: Duration::from_millis(c.probe_interval_ms),
                probe_timeout: Duration::from_millis(c.probe_timeout_ms()),
                dead_after_refused: Duration::from_millis(c.dead_after_refused_ms),
                dead_after_silence: Duration::from_millis(c.dead_after_silence_ms),
            },
        }
    }

    fn algorithms(&self) -> Result<Vec<Algorithm>, String> {
        self.auth
            .challenge_algorithms
            .iter()
            .map(|a| {
                Algorithm::parse(Some(a)).ok_or_else(|| {
                    format!("auth.challenge_algorithms: unknown algorithm '{a}' (SHA-256, MD5)")
                })
            })
            .collect()
    }

    pub fn realm(&self) -> String {
        self.cluster
            .realm
            .clone()
            .unwrap_or_else(|| self.cluster.domain.clone())
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn handler_config(&self, local_hosts: Vec<String>) -> HandlerConfig {
        HandlerConfig {
            node_id: self.node.id,
            local_hosts,
            min_expires: self.registrar.min_expires,
            default_expires: self.registrar.default_expires,
            max_expires: self.registrar.max_expires,
            max_contacts: self.registrar.max_contacts,
            nonce_ttl_secs: self.auth.nonce_ttl,
            challenge_algorithms: self.algorithms().unwrap_or_default(),
            ban: BanPolicy {
                max_failures: self.auth.ban_after_failures,
                window_secs: self.auth.ban_window,
                ban_secs: self.auth.ban_duration,
            },
            ..HandlerConfig::default()
        }
    }
}

/// Reads and validates a dialplan file; every error as `path: line N: reason`.
pub fn load_dialplan(path: &Path) -> Result<String, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    match pbx_dialplan::Dialplan::parse(&text) {
        Ok(_) => Ok(text),
        Err(pbx_dialplan::DialplanError::Invalid(errors)) => Err(NodeError::Config {
            path: path.to_path_buf(),
            reason: errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(&format!("\n{}: ", path.display())),
        }),
        Err(e) => Err(NodeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Reads the users file, a users CSV ([`pbx_state::users_csv`]). Errors carry
/// file:line and the reason, every bad line listed.
pub fn load_users(path: &Path) -> Result<Vec<UserRow>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    users_csv::parse(&text).map_err(|e| NodeError::Config {
        path: path.to_path_buf(),
        reason: match e {
            StateError::UsersCsv(lines) => lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(&format!("\n{}: ", path.display())),
            other => other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[node]\nid = 1\ndata_dir = \"d\"\nsip_addr = \"127.0.0.1:5060\"\n";

    fn parse(t: &str) -> Result<Config, String> {
        Config::parse(t, Path::new("n.toml"), PathBuf::from(".")).map_err(|e| e.to_string())
    }

    #[test]
    fn calls_admitted_fit_the_port_range_and_the_descriptors() {
        let calls = CallsSection::default();
        // 20000-30000: 5,000 RTP pairs, two per call.
        assert_eq!(calls.capacity(1 << 20).0, 2500);
        let (n, why) = calls.capacity(1024);
        assert_eq!(n, (1024 - 256) / 4, "Debian's default soft limit");
        assert!(why.unwrap().contains("1024 open files"));
        let wide = CallsSection {
            rtp_port_max: 60_000,
            max_calls: 10_000,
            ..CallsSection::default()
        };
        assert_eq!(wide.capacity(20_000).0, 3750, "20,000 fds: 5,000 kept");
        let (n, why) = wide.capacity(1 << 20);
        assert_eq!((n, why), (10_000, None));
        let direct = CallsSection {
            relay_media: false,
            ..CallsSection::default()
        };
        assert_eq!(direct.capacity(1024), (2500, None), "no relay, no sockets");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.cluster.domain, "pbx.test");
        assert_eq!(c.realm(), "pbx.test");
        assert_eq!(c.registrar.max_expires, 7200);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse(&format!("{MIN}[registrar]\nmax_expire = 5\n")).unwrap_err();
        assert!(e.contains("max_expire") && e.contains("line 6"), "{e}");
        let e = parse(&format!("{MIN}[registrar]\nmin_expires = 0\n")).unwrap_err();
        assert!(e.contains("min_expires"), "{e}");
        let e = parse(&format!(
            "{MIN}[auth]\nchallenge_algorithms = [\"SHA-1\"]\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("auth.challenge_algorithms") && e.contains("SHA-1"),
            "{e}"
        );
        let e = parse(&MIN.replace("id = 1", "id = 0")).unwrap_err();
        assert!(e.contains("node.id"), "{e}");
        let e = parse(&MIN.replace("127.0.0.1:5060", "nowhere")).unwrap_err();
        assert!(e.contains("sip_addr") || e.contains("line 4"), "{e}");
        let e = parse(&format!("{MIN}[cluster]\ndomain = \"bad domain\"\n")).unwrap_err();
        assert!(e.contains("cluster.domain"), "{e}");
    }

    #[test]
    fn admin_tls_files_come_in_pairs_and_missing_ones_are_named() {
        let e = parse(&format!("{MIN}[admin]\ntls_cert = \"a.crt\"\n")).unwrap_err();
        assert!(e.contains("tls_cert and admin.tls_key go together"), "{e}");
        let e = parse(&format!("{MIN}[admin]\ntls_client_ca = \"ca.crt\"\n")).unwrap_err();
        assert!(e.contains("tls_client_ca needs"), "{e}");
        let c = parse(&format!(
            "{MIN}[admin]\ntls_cert = \"/nonexistent/a.crt\"\ntls_key = \"/nonexistent/a.key\"\n"
        ))
        .unwrap();
        let e = c.admin_tls().err().expect("unreadable file").to_string();
        assert!(
            e.contains("/nonexistent/a.crt") && e.contains("admin.tls_cert"),
            "{e}"
        );
        assert!(parse(MIN).unwrap().admin_tls().unwrap().is_none());
    }

    #[test]
    fn dns_settings_are_checked() {
        let c = parse(&format!(
            "{MIN}[dns]\nlisten = \"127.0.0.1:5353\"\nbackup = [3]\n"
        ))
        .unwrap();
        assert_eq!(c.dns.listen, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(
            (c.dns.ttl, c.dns.weight, c.dns.backup.clone()),
            (10, 50, vec![3])
        );
        let e = parse(&format!("{MIN}[dns]\nprobe_interval_ms = 10\n")).unwrap_err();
        assert!(e.contains("dns.probe_interval_ms"), "{e}");
        let e = parse(&format!("{MIN}[dns]\nttl = 0\n")).unwrap_err();
        assert!(e.contains("dns.ttl"), "{e}");
    }

    #[test]
    fn relay_settings_are_checked() {
        let c = parse(&format!(
            "{MIN}[calls]\nrelay_threads = 3\nrelay_batch_us = 0\n"
        ))
        .unwrap();
        assert_eq!((c.calls.relay_threads, c.calls.relay_batch_us), (3, 0));
        let c = parse(MIN).unwrap();
        assert_eq!((c.calls.relay_threads, c.calls.relay_batch_us), (0, 1000));
        let e = parse(&format!("{MIN}[calls]\nrelay_batch_us = 20000\n")).unwrap_err();
        assert!(e.contains("calls.relay_batch_us"), "{e}");
        let e = parse(&format!("{MIN}[calls]\nrelay_threads = 1000\n")).unwrap_err();
        assert!(e.contains("calls.relay_threads"), "{e}");
    }

    #[test]
    fn the_three_node_examples_parse_and_agree() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
        let nodes: Vec<Config> = (1..=3)
            .map(|n| Config::load(&dir.join(format!("node{n}.toml"))).unwrap())
            .collect();
        for (i, c) in nodes.iter().enumerate() {
            assert_eq!(c.node.id, i as u64 + 1);
            assert_eq!(c.cluster.domain, "pbx.example.com");
            assert_eq!(c.cluster.members.len(), 3);
            assert_eq!(
                c.cluster.members, nodes[0].cluster.members,
                "same members everywhere"
            );
            assert_eq!(c.dns.listen.map(|a| a.ip()), Some(c.node.sip_addr.ip()));
        }
    }

    #[test]
    fn tls_is_checked_and_listens_on_5061_of_the_sip_ip() {
        let e = parse(&format!("{MIN}[tls]\ncert = \"a.crt\"\n")).unwrap_err();
        assert!(e.contains("tls.cert and tls.key go together"), "{e}");
        let c = parse(&format!("{MIN}[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n")).unwrap();
        assert_eq!(
            c.tls_addr(),
            std::net::SocketAddr::new(
                c.node.sip_addr.ip(),
                if c.node.sip_addr.port() == 0 { 0 } else { 5061 }
            )
        );
        let e = parse(&format!(
            "{MIN}[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\nreload_check_secs = 0\n"
        ))
        .unwrap_err();
        assert!(e.contains("tls.reload_check_secs"), "{e}");
        let e = parse(&format!("{MIN}[tls]\ncertificate = \"a.crt\"\n")).unwrap_err();
        assert!(e.contains("line") && e.contains("certificate"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/pbxd.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.cluster.domain, "pbx.example.com");
        assert_eq!(c.node.aliases, vec!["pbx1.example.com".to_string()]);
        let raft = c.cluster_config(c.node.sip_addr);
        assert_eq!(raft.initial_members.len(), 3);
        assert_eq!(raft.member.peer_addr, "192.0.2.11:7001");
        assert_eq!(raft.cluster_id, "pbx-example");
    }

    #[test]
    fn cluster_members_are_checked() {
        let m = |id: u64, host: u8| {
            format!(
                "{{ id = {id}, peer = \"127.0.0.{host}:7001\", sip = \"127.0.0.{host}:5060\" }}"
            )
        };
        let cfg = |members: Vec<String>| {
            format!(
                "{MIN}[cluster]\ndomain = \"pbx.test\"\nmembers = [{}]\n",
                members.join(", ")
            )
        };
        // This node (id 1, SIP on 127.0.0.1) listed with its default peer address.
        let c = parse(&cfg(vec![m(1, 1), m(2, 2), m(3, 3)])).unwrap();
        assert_eq!(c.peer_addr(), "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.cluster_config(c.node.sip_addr).initial_members.len(), 3);
        let e = parse(&cfg(vec![m(1, 1), m(1, 2)])).unwrap_err();
        assert!(e.contains("id 1 is listed twice"), "{e}");
        let e = parse(&cfg(vec![m(1, 1), m(2, 1)])).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = parse(&cfg(vec![m(1, 9), m(2, 2)])).unwrap_err();
        assert!(e.contains("node.peer_addr"), "{e}");
        let e = parse(&format!(
            "{MIN}[cluster]\ndomain = \"d\"\nelection_timeout_min_ms = 150\n"
        ))
        .unwrap_err();
        assert!(e.contains("cluster.election_timeout_min_ms"), "{e}");
        let e = parse(&format!("{MIN}[cluster]\ndomain = \"d\"\nid = \"a b\"\n")).unwrap_err();
        assert!(e.contains("cluster.id"), "{e}");
        // Alone: the node is its own initial member.
        let c = parse(MIN).unwrap();
        let raft = c.cluster_config(c.node.sip_addr);
        assert_eq!(
            raft.initial_members.keys().copied().collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn users_file_errors_carry_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.csv");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            load_users(&path).map_err(|e| e.to_string())
        };
        let ok = load("user,password\n# demo\nalice,secret\n\n1001 , pw\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].name, "1001");
        let at = |line: usize| format!("{}: line {line}: ", path.display());
        let e = load("alice,x\nbob\n").unwrap_err();
        assert!(e.contains(&at(2)), "{e}");
        let e = load("alice,x\nalice,y\n").unwrap_err();
        assert!(e.contains(&at(2)), "{e}");
        let e = load("al ice,x\n").unwrap_err();
        assert!(e.contains(&at(1)), "{e}");
        let e = load("alice,\nbob\n").unwrap_err();
        assert!(e.contains(&at(1)) && e.contains(&at(2)), "{e}");
    }
}
