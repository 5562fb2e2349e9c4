//! Test support for real-process tests: a [`LocalCluster`] driven through the launcher
//! (`deploy/local/cluster`), SIPp runs with parsed results, and small helpers to wait on
//! state instead of sleeping.
//!
//! Every test takes its own loopback /24 (`127.0.<slot>.0`) and run directory, so tests
//! run side by side without sharing addresses or ports.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pbx_registrar::digest::{Algorithm, ClientAuth};
use pbx_sip_msg::{parse_datagram, AuthHeader, HeaderName, Limits};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repo")
        .to_path_buf()
}

/// The build profile the launcher uses for tests (the benchmarks share it).
pub fn profile() -> String {
    std::env::var("PBX_PROFILE").unwrap_or_else(|_| "release".into())
}

pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    target.join(profile()).join(name)
}

/// Fails loudly when a real tool the tests need is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: apt-get install -y {package} (the CI script does this)"
    );
}

/// Polls `f` until it returns Some or the timeout passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Demo-style users u000001…, password pw000001…
pub struct Users {
    pub count: usize,
}

impl Users {
    pub fn name(i: usize) -> String {
        format!("u{i:06}")
    }
    pub fn password(i: usize) -> String {
        format!("pw{i:06}")
    }
    /// The node's users file (`user,password`).
    pub fn write_users_file(&self, path: &Path) -> anyhow::Result<()> {
        let mut s = String::from("user,password\n");
        for i in 1..=self.count {
            s.push_str(&format!("{},{}\n", Self::name(i), Self::password(i)));
        }
        std::fs::write(path, s)?;
        Ok(())
    }
    /// SIPp injection file: user;domain;password;contact_hostport;expires
    pub fn write_sipp_csv(
        &self,
        path: &Path,
        domain: &str,
        contact: &str,
        expires: u32,
    ) -> anyhow::Result<()> {
        Self::write_sipp_csv_for(path, domain, contact, expires, 1..=self.count)
    }

    /// SIPp injection file for the given user numbers.
    pub fn write_sipp_csv_for(
        path: &Path,
        domain: &str,
        contact: &str,
        expires: u32,
        users: impl IntoIterator<Item = usize>,
    ) -> anyhow::Result<()> {
        let mut s = String::from("SEQUENTIAL\n");
        for i in users {
            s.push_str(&format!(
                "{};{domain};{};{contact};{expires}\n",
                Self::name(i),
                Self::password(i)
            ));
        }
        std::fs::write(path, s)?;
        Ok(())
    }
}

/// A cluster started through `deploy/local/cluster` in its own run directory and /24.
pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub port: u16,
    pub nodes: usize,
    extra_config: String,
    /// `PBX_DIALPLAN_FILE` for the launcher: the dialplan a new cluster starts with.
    dialplan: Option<PathBuf>,
    /// More environment for the launcher (e.g. `PBX_ADMIN_TLS_DIR`).
    env: Vec<(String, String)>,
}

impl LocalCluster {
    /// `slot` (1..=250) picks the loopback /24 `127.0.<slot>.0`; give every test its own.
    pub fn up(
        slot: u8,
        nodes: usize,
        users: &Users,
        extra_config: &str,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_cluster(slot, nodes, users, extra_config, None, &[])
    }

    /// [`LocalCluster::up`] with more environment for the launcher.
    pub fn up_with_env(
        slot: u8,
        nodes: usize,
        users: &Users,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<LocalCluster> {
        Self::start_cluster(slot, nodes, users, extra_config, None, env)
    }

    /// [`LocalCluster::up`] with the dialplan file the cluster starts with.
    pub fn up_with_dialplan(
        slot: u8,
        nodes: usize,
        users: &Users,
        extra_config: &str,
        dialplan: &Path,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_cluster(
            slot,
            nodes,
            users,
            extra_config,
            Some(dialplan.to_path_buf()),
            &[],
        )
    }

    fn start_cluster(
        slot: u8,
        nodes: usize,
        users: &Users,
        extra_config: &str,
        dialplan: Option<PathBuf>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<LocalCluster> {
        let mut c = Self::configured(slot, nodes, users, extra_config)?;
        c.dialplan = dialplan;
        c.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        c.bring_up()?;
        Ok(c)
    }

    /// A cluster configured but not started: the test prepares the nodes' directories
    /// (a small tmpfs, a power-cut filesystem) under [`LocalCluster::run_dir`], then
    /// calls [`LocalCluster::bring_up`].
    pub fn configured(
        slot: u8,
        nodes: usize,
        users: &Users,
        extra_config: &str,
    ) -> anyhow::Result<LocalCluster> {
        // PBX_TEST_KEEP=1 keeps the directory (logs, phones' output) for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("pbx-test-")
            .disable_cleanup(std::env::var_os("PBX_TEST_KEEP").is_some())
            .tempdir()?;
        users.write_users_file(&dir.path().join("users.csv"))?;
        Ok(LocalCluster {
            prefix: format!("127.0.{slot}"),
            port: 5060,
            nodes,
            extra_config: extra_config.to_string(),
            dialplan: None,
            env: Vec::new(),
            dir,
        })
    }

    /// Starts every node (`up`) and waits until each is ready.
    pub fn bring_up(&self) -> anyhow::Result<()> {
        let users_file = self.dir.path().join("users.csv");
        self.launcher(&[
            "up",
            "--nodes",
            &self.nodes.to_string(),
            "--users",
            users_file.to_str().unwrap_or_default(),
        ])
        .map(drop)
    }

    /// Of `users`, those bound as node `node` sees them: SIPp's `query_auth.xml`
    /// through it from `client_ip(client)` (the 200 must list a Contact; the users
    /// found are logged). `tag` names the run's directory.
    pub fn bound_users(
        &self,
        node: usize,
        users: &std::collections::BTreeSet<usize>,
        tag: &str,
        client: u8,
    ) -> anyhow::Result<std::collections::BTreeSet<usize>> {
        if users.is_empty() {
            return Ok(Default::default());
        }
        let dir = self.dir.path().join(format!("query-{tag}-n{node}"));
        std::fs::create_dir_all(&dir)?;
        let inf = dir.join("users.csv");
        let contact = format!("{}:5099", self.client_ip(99));
        Users::write_sipp_csv_for(&inf, "pbx.test", &contact, 3600, users.iter().copied())?;
        Sipp {
            scenario: "query_auth.xml",
            target: self.node_addr(node),
            local_ip: self.client_ip(client),
            inf: &inf,
            calls: users.len(),
            rate: 1000,
            transport: "u1",
        }
        .spawn(&["-trace_logs"])?
        .wait()?;
        Ok(sipp_logged_users(&dir))
    }

    /// `pbxctl register` of user `u` (digest, its password) through node `node`, with
    /// `extra` options (e.g. `--query`): (exit success, output).
    pub fn pbxctl_register(&self, node: usize, u: usize, extra: &[&str]) -> (bool, String) {
        let target = self.node_addr(node).to_string();
        let (name, password) = (Users::name(u), Users::password(u));
        let mut args = vec![
            "register",
            &target,
            "--user",
            &name,
            "--password",
            &password,
        ];
        args.extend_from_slice(extra);
        pbxctl(&args).unwrap()
    }

    /// Node n's data directory (the launcher's `data_dir`).
    pub fn data_dir(&self, n: usize) -> PathBuf {
        self.run_dir().join(format!("node{n}"))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn node_addr(&self, n: usize) -> SocketAddr {
        format!("{}.{}:{}", self.prefix, 10 + n, self.port)
            .parse()
            .expect("valid address")
    }

    /// An address in this test's /24 for clients (SIPp, raw sockets).
    pub fn client_ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.run_dir().join(format!("node{n}.log"))).unwrap_or_default()
    }

    pub fn launcher(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.launcher_with(args, &[])
    }

    /// [`LocalCluster::launcher`] with more environment for this call only (what the
    /// node it starts inherits: e.g. libfaketime for one node).
    pub fn launcher_with(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
        let out = Command::new(repo_root().join("deploy/local/cluster"))
            .args(args)
            .env("PBX_RUN_DIR", self.run_dir())
            .env("PBX_IP_PREFIX", &self.prefix)
            .env("PBX_FIRST_HOST", "11")
            .env("PBX_SIP_PORT", self.port.to_string())
            .env("PBX_PROFILE", profile())
            .env("PBX_EXTRA_CONFIG", &self.extra_config)
            .env(
                "PBX_DIALPLAN_FILE",
                self.dialplan.as_deref().unwrap_or(Path::new("")),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .output()
            .with_context(|| format!("running the launcher {args:?}"))?;
        if !out.status.success() {
            bail!(
                "launcher {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Node n's peer-link address.
    /// The admin API of node n.
    pub fn admin_addr(&self, n: usize) -> String {
        format!("{}.{}:7002", self.prefix, 10 + n)
    }

    /// Runs pbxctl against the admin API of the given nodes (tried in turn) with the
    /// cluster's token; returns (exit code, stdout + stderr).
    pub fn admin(&self, nodes: &[usize], args: &[&str]) -> anyhow::Result<(i32, String)> {
        let token = std::fs::read_to_string(self.run_dir().join("admin.token"))?;
        let mut cmd = Command::new(bin("pbxctl"));
        for n in nodes {
            cmd.args(["--endpoint", &self.admin_addr(*n)]);
        }
        let out = cmd
            .args(args)
            .env("PBX_ADMIN_TOKEN", token.trim())
            .output()
            .context("running pbxctl")?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// Node n's cluster DNS address, from the config the launcher wrote (None: off).
    pub fn dns_addr(&self, n: usize) -> Option<SocketAddr> {
        let text = std::fs::read_to_string(self.run_dir().join(format!("node{n}.toml"))).ok()?;
        let dns = text.split("[dns]").nth(1)?;
        let listen = dns
            .lines()
            .find_map(|l| l.trim().strip_prefix("listen = "))?;
        listen.trim_matches('"').parse().ok()
    }

    /// Node n's metrics and health listener, from the config the launcher wrote.
    pub fn metrics_addr(&self, n: usize) -> Option<SocketAddr> {
        let text = std::fs::read_to_string(self.run_dir().join(format!("node{n}.toml"))).ok()?;
        let section = text.split("[metrics]").nth(1)?;
        let listen = section
            .lines()
            .find_map(|l| l.trim().strip_prefix("listen = "))?;
        listen.trim_matches('"').parse().ok()
    }

    /// GET `path` from node n's metrics listener: (status, body); None when it does not
    /// answer.
    pub fn http(&self, n: usize, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_addr(n)?, path)
    }

    /// Node n's /metrics, parsed.
    pub fn scrape(&self, n: usize) -> Option<Scrape> {
        match self.http(n, "/metrics")? {
            (200, body) => Some(Scrape::parse(&body)),
            _ => None,
        }
    }

    pub fn peer_addr(&self, n: usize) -> String {
        format!("{}.{}:7001", self.prefix, 10 + n)
    }

    /// Node n's Raft status as `pbxctl status` prints it (key=value), or None when it
    /// does not answer.
    pub fn status(&self, n: usize) -> Option<std::collections::HashMap<String, String>> {
        let (ok, out) = pbxctl(&["status", &self.peer_addr(n)]).ok()?;
        if !ok {
            return None;
        }
        Some(
            out.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The node among `nodes` that leads them: all of them name it, it says it is the
    /// leader, and all serve writes (None until then).
    pub fn leader_among(&self, nodes: &[usize]) -> Option<usize> {
        let mut leader = None;
        for &n in nodes {
            let s = self.status(n)?;
            if s.get("serving_writes").map(String::as_str) != Some("true") {
                return None;
            }
            let l: usize = s.get("leader")?.parse().ok()?;
            if l == 0 || leader.is_some_and(|x| x != l) || !nodes.contains(&l) {
                return None;
            }
            if l == n && s.get("role").map(String::as_str) != Some("leader") {
                return None;
            }
            leader = Some(l);
        }
        leader
    }

    /// Stops every node (SIGTERM) and starts them all again with their data, waiting
    /// until each is ready.
    pub fn restart_all(&self) -> anyhow::Result<()> {
        self.launcher(&["down"])?;
        self.bring_up()
    }

    /// Deletes node n's data (it must be stopped).
    pub fn wipe(&self, n: usize) -> anyhow::Result<()> {
        let dir = self.data_dir(n);
        std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))
    }

    pub fn kill(&self, n: usize) -> anyhow::Result<()> {
        self.launcher(&["kill", &n.to_string()]).map(|_| ())
    }

    pub fn start(&self, n: usize) -> anyhow::Result<()> {
        self.launcher(&["start", &n.to_string()]).map(|_| ())
    }

    /// Starts node `n` without waiting until it is ready (for when no majority is up).
    pub fn start_no_wait(&self, n: usize) -> anyhow::Result<()> {
        self.launcher(&["start", &n.to_string(), "--no-wait"])
            .map(|_| ())
    }

    /// The nodes holding `user`'s bindings, as the first of `nodes` that answers sees
    /// them (admin API), sorted; empty when none answers.
    pub fn bound_via(&self, nodes: &[usize], user: &str) -> Vec<u64> {
        let Ok((0, text)) = self.admin(
            nodes,
            &["registrations", "list", "--user", user, "--output", "json"],
        ) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut bound: Vec<u64> = v
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["node_id"].as_u64()).collect())
            .unwrap_or_default();
        bound.sort_unstable();
        bound.dedup();
        bound
    }

    /// CPU time (user + system) node n's process has used so far, in ms.
    pub fn cpu_ms(&self, n: usize) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid(n)?)).ok()?;
        // After "pid (comm) ": state is field 3; utime and stime are 14 and 15, in
        // USER_HZ (100 per second on Linux).
        let rest = stat.rsplit_once(") ")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(ticks * 10)
    }

    /// True while node n's process is alive.
    pub fn is_running(&self, n: usize) -> bool {
        // A zombie (exited, not yet reaped) is not running.
        self.pid(n).is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
                .unwrap_or(false)
        })
    }

    /// Node n's process id, as the launcher recorded it.
    pub fn pid(&self, n: usize) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join(format!("node{n}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.launcher(&["down"]);
    }
}

/// The outcome of one SIPp run.
#[derive(Debug)]
pub struct SippRun {
    pub successful: u64,
    pub failed: u64,
    pub exit_ok: bool,
    pub output: String,
}

pub struct Sipp<'a> {
    pub scenario: &'a str,
    pub target: SocketAddr,
    pub local_ip: String,
    pub inf: &'a Path,
    pub calls: usize,
    pub rate: usize,
    /// "u1" (UDP) or "t1" (one TCP connection).
    pub transport: &'a str,
}

impl SippRun {
    fn from_output(out: std::process::Output) -> SippRun {
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let count = |label: &str| -> u64 {
            output
                .lines()
                .rfind(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split('|').nth(2))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        SippRun {
            successful: count("Successful call"),
            failed: count("Failed call"),
            exit_ok: out.status.success(),
            output,
        }
    }

    /// The last lines of SIPp's output, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Sipp<'_> {
    pub fn run(&self) -> anyhow::Result<SippRun> {
        let out = self.command(&[]).output().context("running sipp")?;
        Ok(SippRun::from_output(out))
    }

    /// Starts SIPp in the background with extra arguments (e.g. `-trace_logs`).
    pub fn spawn(&self, extra: &[&str]) -> anyhow::Result<RunningSipp> {
        let child = self
            .command(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting sipp")?;
        Ok(RunningSipp { child })
    }

    fn command(&self, extra: &[&str]) -> Command {
        let scenario = repo_root().join("tests/sipp").join(self.scenario);
        let mut cmd = Command::new("sipp");
        cmd.arg(self.target.to_string())
            .arg("-sf")
            .arg(&scenario)
            .arg("-inf")
            .arg(self.inf)
            .args(["-m", &self.calls.to_string()])
            .args(["-r", &self.rate.to_string()])
            .args(["-l", "100000"])
            .args(["-i", &self.local_ip, "-p", "0"])
            .args(["-t", self.transport])
            .args(["-timeout", "120s", "-timeout_error"])
            .args(["-buff_size", "4194304"])
            .args(["-default_behaviors", "all,-abortunexp"])
            .arg("-nostdin")
            .args(extra)
            .current_dir(self.inf.parent().unwrap_or(Path::new(".")));
        cmd
    }
}

/// A SIPp run in the background.
pub struct RunningSipp {
    child: std::process::Child,
}

impl RunningSipp {
    pub fn wait(self) -> anyhow::Result<SippRun> {
        let out = self.child.wait_with_output().context("waiting for sipp")?;
        Ok(SippRun::from_output(out))
    }
}

/// What the test's SIPp runs logged (`<log>` actions, with `-trace_logs`).
pub fn sipp_logs(c: &LocalCluster) -> String {
    let mut out = String::new();
    for d in std::fs::read_dir(c.dir.path()).unwrap().flatten() {
        if let Ok(files) = std::fs::read_dir(d.path()) {
            for f in files.flatten() {
                if f.file_name().to_string_lossy().ends_with("_logs.log") {
                    out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
                }
            }
        }
    }
    out
}

/// Asserts SIPp exited cleanly with exactly `n` successful calls and no failed one.
/// Users SIPp logged (`<log>` actions, `-trace_logs` files in `dir`): "registered
/// uNNN" by reg_auth.xml, "bound uNNN" by query_auth.xml.
pub fn sipp_logged_users(dir: &Path) -> std::collections::BTreeSet<usize> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with("_logs.log") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for w in text.split_whitespace() {
            if let Some(n) = w.strip_prefix('u').and_then(|d| d.parse::<usize>().ok()) {
                out.insert(n);
            }
        }
    }
    out
}

pub fn assert_all_ok(run: &SippRun, n: usize, what: &str) {
    assert!(
        run.exit_ok && run.successful == n as u64 && run.failed == 0,
        "{what}: {} ok, {} failed of {n}\n{}",
        run.successful,
        run.failed,
        run.tail(40)
    );
}

/// Runs pbxctl and returns (exit success, stdout).
pub fn pbxctl(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(bin("pbxctl"))
        .args(args)
        .output()
        .context("running pbxctl")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Every datagram `sock` receives while `during` runs (a SIPp call until it exits, say),
/// and what `during` returned: no fixed listening window.
pub fn received_during<T>(
    sock: &std::net::UdpSocket,
    during: impl FnOnce() -> T,
) -> (T, Vec<Vec<u8>>) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let mut out = Vec::new();
            let mut buf = [0u8; 2048];
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("read timeout");
            loop {
                let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
                match sock.recv(&mut buf) {
                    Ok(n) => out.push(buf[..n].to_vec()),
                    // Nothing queued once `during` is over: all of it was read.
                    Err(_) if stopping => break,
                    Err(_) => {}
                }
            }
            out
        });
        let t = during();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (t, collector.join().expect("collector"))
    })
}

/// A headless baresip (`baresip-core`) run from its own config directory, killed when
/// dropped however the test ends.
pub struct Baresip(std::process::Child);

impl Baresip {
    /// Writes `dir/config` (SIP on `ip:port`, G.711, a 440 Hz tone as microphone, what
    /// it hears to `heard.wav`, loopback only; `dns` servers if any) and
    /// `dir/accounts` (one line), and starts it with its output in `dir/out.log`.
    pub fn start(dir: &Path, ip: &str, port: u16, dns: &[SocketAddr], account: &str) -> Baresip {
        Self::start_with(dir, ip, port, dns, account, "")
    }

    /// [`Baresip::start`] with more config lines (e.g. `sip_cafile` for TLS).
    pub fn start_with(
        dir: &Path,
        ip: &str,
        port: u16,
        dns: &[SocketAddr],
        account: &str,
        extra_config: &str,
    ) -> Baresip {
        std::fs::create_dir_all(dir).expect("baresip dir");
        let dns: String = dns.iter().map(|d| format!("dns_server {d}\n")).collect();
        // dns_server lines before net_interface: baresip binds its resolver by it.
        std::fs::write(
            dir.join("config"),
            format!(
                "sip_listen {ip}:{port}\n{dns}net_interface {ip}\nmodule_path /usr/lib/baresip/modules\n\
                 module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule_app account.so\nmodule_app menu.so\n\
                 audio_player aufile,{}\naudio_source ausine,440\nausrc_srate 48000\nauplay_srate 48000\n\
                 ausrc_channels 2\nauplay_channels 2\nrtp_timeout 0\n{extra_config}",
                dir.join("heard.wav").display()
            ),
        )
        .expect("baresip config");
        std::fs::write(dir.join("accounts"), format!("{account}\n")).expect("baresip accounts");
        let log = std::fs::File::create(dir.join("out.log")).expect("baresip log");
        Baresip(
            Command::new("baresip")
                .arg("-f")
                .arg(dir)
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("starting baresip"),
        )
    }
}

impl Baresip {
    /// Config lines for baresip's `ctrl_tcp` module listening on `addr` (for
    /// [`Baresip::command`]): the test's keyboard, since baresip runs without a terminal.
    pub fn control_config(addr: SocketAddr) -> String {
        format!("module ctrl_tcp.so\nctrl_tcp_listen {addr}\n")
    }

    /// Runs a menu command (`dial`, `hangup`, …) through `ctrl_tcp` at `addr` (a JSON
    /// netstring); returns baresip's answer.
    pub fn command(addr: SocketAddr, command: &str, params: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let body =
            serde_json::json!({"command": command, "params": params, "token": "t"}).to_string();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{}:{},", body.len(), body).as_bytes())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // One netstring back: "len:{...},".
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.ends_with(b",") {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

/// A phone's RTP counters as baresip prints them on its status line while a call is up
/// (`[0:00:05] audio=TX/RX (bit/s)`, a few times a second, over the last second).
pub struct RtpRates {
    /// (sent, received) bits per second, oldest first.
    pub rates: Vec<(u64, u64)>,
}

impl RtpRates {
    /// G.711 at 50 packets/s is 64 kbit/s: below this the phone hears gaps.
    pub const FULL: u64 = 60_000;

    /// Parses the status lines in `log` from byte `from` on.
    pub fn parse(log: &str, from: usize) -> RtpRates {
        let rates = log
            .get(from..)
            .unwrap_or_default()
            .split("audio=")
            .skip(1)
            .filter_map(|s| {
                let (tx, rest) = s.split_once('/')?;
                let rx: String = rest.chars().take_while(char::is_ascii_digit).collect();
                Some((tx.parse().ok()?, rx.parse().ok()?))
            })
            .collect();
        RtpRates { rates }
    }

    /// Received at the full rate in the last status line.
    pub fn receiving(&self) -> bool {
        self.rates.last().is_some_and(|&(_, rx)| rx >= Self::FULL)
    }

    /// Received less than the full rate at some point (a gap).
    pub fn dipped(&self) -> bool {
        self.rates.iter().any(|&(_, rx)| rx < Self::FULL)
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An nftables table of a test's own, loaded from `rules` and deleted on drop. Needs
/// root and `nft`.
pub struct NftTable {
    name: String,
}

impl NftTable {
    /// Loads `rules` (which define `table inet NAME`); panics when nft refuses them.
    pub fn load(name: &str, rules: &str) -> NftTable {
        use std::io::Write;
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(rules.as_bytes())
            .expect("writing the nft rules");
        assert!(
            child.wait().map(|s| s.success()).unwrap_or(false),
            "nft refused the rules of table {name} (root needed):\n{rules}"
        );
        NftTable {
            name: name.to_string(),
        }
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}

/// Node `n` cut off from the other nodes on the peer link only (TCP to and from their peer
/// port, both ways): SIP, RTP and the admin API still reach every node. An nftables table
/// of this test's own (named after its /24), removed on drop.
pub struct PeerPartition {
    _table: NftTable,
}

impl PeerPartition {
    pub fn isolate(c: &LocalCluster, n: usize) -> PeerPartition {
        let slot = c.prefix.rsplit('.').next().unwrap_or("0");
        let table = format!("pbx_peer_{slot}");
        let split = |m: usize| -> (String, String) {
            let addr = c.peer_addr(m);
            let (ip, port) = addr.rsplit_once(':').expect("ip:port");
            (ip.to_string(), port.to_string())
        };
        let (me, port) = split(n);
        let others: Vec<String> = (1..=c.nodes)
            .filter(|&m| m != n)
            .map(|m| split(m).0)
            .collect();
        let set = others.join(", ");
        // Peer connections come from the node's own IP (pbx-peer binds it).
        let rules = format!(
            "table inet {table} {{\n chain output {{\n  type filter hook output priority 0; policy accept;\n  \
             ip saddr {me} ip daddr {{ {set} }} tcp dport {port} drop\n  \
             ip saddr {me} ip daddr {{ {set} }} tcp sport {port} drop\n  \
             ip saddr {{ {set} }} ip daddr {me} tcp dport {port} drop\n  \
             ip saddr {{ {set} }} ip daddr {me} tcp sport {port} drop\n }}\n}}\n"
        );
        PeerPartition {
            _table: NftTable::load(&table, &rules),
        }
    }
}

/// A port free on `ip` right now (bound, then released) for a SIPp that must be reached
/// at a known address.
pub fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// A TCP port free on `ip` right now (bound, then released).
pub fn free_tcp_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

/// Node configuration for SIPp callers of the applications: digest MD5 only (SIPp
/// answers no other), the repository's prompts as `sounds_dir`.
pub fn md5_with_sounds() -> String {
    format!(
        "[auth]\nchallenge_algorithms = [\"MD5\"]\n\n[calls]\nsounds_dir = \"{}\"\n",
        repo_root().join("deploy/sounds").display()
    )
}

/// A dialplan file holding `text`, in a directory kept as long as the guard.
pub fn plan_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let plan = dir.path().join("extensions.conf");
    std::fs::write(&plan, text).expect("the dialplan written");
    (dir, plan)
}

/// SIPp phones of one test: registrations, callees and callers, each run from its own
/// directory under the cluster's.
pub struct Phones<'a> {
    c: &'a LocalCluster,
    n: std::cell::Cell<usize>,
    /// Where SIPp sends (None: the node asked for) and over what ("u1", "t1").
    via: Option<(SocketAddr, &'static str)>,
}

impl<'a> Phones<'a> {
    pub fn new(c: &'a LocalCluster) -> Self {
        require_tool("sipp", "sip-tester");
        Phones {
            c,
            n: std::cell::Cell::new(0),
            via: None,
        }
    }

    /// Phones whose SIPp sends everything to `target` over `transport` (e.g. a TLS
    /// tunnel in front of a node) instead of to the node asked for.
    pub fn through(c: &'a LocalCluster, target: SocketAddr, transport: &'static str) -> Self {
        Phones {
            via: Some((target, transport)),
            ..Phones::new(c)
        }
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        self.n.set(self.n.get() + 1);
        let dir = self.c.dir.path().join(format!("sipp{}", self.n.get()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// User `user` registers `ip:port` through `node`, from that very address (as a
    /// phone does: the node reaches UDP phones where their REGISTER came from).
    pub fn register(&self, node: usize, user: usize, ip: &str, port: u16) {
        let inf = self.file(
            "reg.csv",
            &format!(
                "SEQUENTIAL\n{};pbx.test;{};{ip}:{port};3600\n",
                Users::name(user),
                Users::password(user)
            ),
        );
        let port = port.to_string();
        let run = self
            .sipp("reg_auth.xml", node, ip, &inf, &["-p", &port])
            .wait()
            .unwrap();
        assert_all_ok(&run, 1, "register");
    }

    pub fn sipp(
        &self,
        scenario: &str,
        node: usize,
        ip: &str,
        inf: &Path,
        extra: &[&str],
    ) -> RunningSipp {
        let (target, transport) = self.via.unwrap_or((self.c.node_addr(node), "u1"));
        Sipp {
            scenario,
            target,
            local_ip: ip.to_string(),
            inf,
            calls: 1,
            rate: 1,
            transport,
        }
        .spawn(extra)
        .unwrap()
    }

    /// A SIPp callee on `ip:port` running `scenario` once; its answer names `media`
    /// (the discard port unless the test looks at media).
    pub fn callee(&self, scenario: &str, ip: &str, port: u16, extra: &[&str]) -> RunningSipp {
        self.callee_with_media(scenario, ip, port, &format!("{ip}:9"), extra)
    }

    pub fn callee_with_media(
        &self,
        scenario: &str,
        ip: &str,
        port: u16,
        media: &str,
        extra: &[&str],
    ) -> RunningSipp {
        let (mip, mport) = media.rsplit_once(':').expect("ip:port");
        let inf = self.file("uas.csv", &format!("SEQUENTIAL\n{mip};{mport}\n"));
        let port = port.to_string();
        let mut args = vec!["-p", port.as_str()];
        args.extend_from_slice(extra);
        self.sipp(scenario, 1, ip, &inf, &args)
    }

    /// `caller` calls `callee` (an extension) through `node` with `scenario`, offering
    /// media at `media`, holding an answered call for `hold_ms`.
    pub fn call(
        &self,
        scenario: &str,
        node: usize,
        caller: usize,
        callee: &str,
        media: SocketAddr,
        hold_ms: u64,
    ) -> RunningSipp {
        let inf = self.file(
            "uac.csv",
            &format!(
                "SEQUENTIAL\n{};pbx.test;{};{callee};{};{}\n",
                Users::name(caller),
                Users::password(caller),
                media.ip(),
                media.port()
            ),
        );
        let ip = self.c.client_ip(60 + (self.n.get() % 100) as u8);
        let hold = hold_ms.to_string();
        self.sipp(scenario, node, &ip, &inf, &["-d", &hold, "-trace_logs"])
    }

    /// A copy of uac_status.xml expecting `status`.
    pub fn expecting(&self, status: u16) -> String {
        let text = std::fs::read_to_string(repo_root().join("tests/sipp/uac_status.xml"))
            .unwrap()
            .replace("STATUS", &status.to_string());
        self.file(&format!("uac_{status}.xml"), &text)
            .to_string_lossy()
            .into_owned()
    }
}

/// BIND's named serving a zone on its own loopback address (added to `lo`, as BIND
/// listens only on configured addresses); stopped and the address removed on drop.
pub struct Named {
    child: std::process::Child,
    ip: String,
}

impl Named {
    pub fn start(dir: &std::path::Path, ip: &str, domain: &str, zone: &str) -> Named {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{domain}.zone")), zone).unwrap();
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "options {{ directory \"{d}\"; pid-file \"{d}/named.pid\"; listen-on port 53 {{ {ip}; }};\n\
                 listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; }};\n\
                 zone \"{domain}\" {{ type primary; file \"{d}/{domain}.zone\"; }};\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let added = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            added,
            "adding {ip} to lo (BIND listens only on configured addresses) needs root"
        );
        let log = std::fs::File::create(dir.join("named.log")).unwrap();
        let child = std::process::Command::new("named")
            .args(["-g", "-c"])
            .arg(dir.join("named.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting named");
        Named {
            child,
            ip: ip.to_string(),
        }
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .status();
    }
}

/// A one-node cluster on `127.0.<slot>.0/24` calling into `provider.test`: its dialplan
/// sends `9X` to `Dial(SIP/X@provider.test,20)`, its resolver is BIND on
/// `127.0.<slot>.53` serving `records` (relative to `provider.test.`, after the SOA and
/// NS), and `uac_inf` has user 1 dialling `9555`.
pub struct ProviderDomain {
    pub cluster: LocalCluster,
    pub uac_inf: PathBuf,
    pub dir: tempfile::TempDir,
    _named: Named,
}

impl ProviderDomain {
    pub fn start(slot: u8, records: &str) -> ProviderDomain {
        require_tool("named", "bind9");
        require_tool("sipp", "sip-tester");
        let prefix = format!("127.0.{slot}");
        let zone = format!(
            "$ORIGIN provider.test.\n$TTL 30\n@ IN SOA ns hostmaster ( 1 3600 600 86400 30 )\n\
             @ IN NS ns\nns IN A {prefix}.53\n{records}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = dir.path().join("extensions.conf");
        std::fs::write(
            &plan,
            "[default]\nexten => _9.,1,Dial(SIP/${EXTEN:1}@provider.test,20)\n same => n,Hangup()\n",
        )
        .expect("dialplan");
        let named = Named::start(
            &dir.path().join("named"),
            &format!("{prefix}.53"),
            "provider.test",
            &zone,
        );
        let cluster = LocalCluster::up_with_dialplan(
            slot,
            1,
            &Users { count: 2 },
            &format!(
                "[auth]\nchallenge_algorithms = [\"MD5\"]\n[dns]\nresolvers = [\"{prefix}.53:53\"]\ndead_target_secs = 60\n"
            ),
            &plan,
        )
        .expect("cluster up");
        let uac_inf = dir.path().join("uac.csv");
        std::fs::write(
            &uac_inf,
            format!(
                "SEQUENTIAL\n{};pbx.test;{};9555;{prefix}.99;9\n",
                Users::name(1),
                Users::password(1)
            ),
        )
        .expect("uac.csv");
        ProviderDomain {
            cluster,
            uac_inf,
            dir,
            _named: named,
        }
    }
}

/// A plain HTTP/1.0 GET (the metrics and health endpoints): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A Prometheus text exposition, as series (`name{labels}` as printed) to values.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub text: String,
    series: std::collections::HashMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        Scrape {
            text: text.to_string(),
            series,
        }
    }

    /// The value of one series, e.g. `pbx_register_requests_total{code="200"}` (0 when
    /// it is not there).
    pub fn get(&self, series: &str) -> f64 {
        self.series.get(series).copied().unwrap_or(0.0)
    }

    /// Whether a metric family of this name is exposed (histograms by their base name).
    pub fn has_family(&self, name: &str) -> bool {
        self.text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|t| t.split_whitespace().next())
                == Some(name)
        })
    }
}

/// A PostgreSQL server of a test's own on `ip:5432` (Debian's `postgresql` binaries),
/// with trust authentication; stopped and removed on drop. As root it runs as the
/// `postgres` user (the server refuses root).
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub ip: String,
    pub port: u16,
}

impl Postgres {
    pub fn start(ip: &str) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .unwrap_or_else(|| {
                panic!("PostgreSQL server binaries not found: apt-get install -y postgresql")
            });
        let dir = tempfile::Builder::new()
            .prefix("pbx-pg-")
            .tempdir()
            .expect("a temp dir");
        // The server's user must reach its data and socket directories.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let pg = Postgres {
            dir,
            bin,
            ip: ip.to_string(),
            port: 5432,
        };
        let data = pg.data();
        let out = pg
            .as_server_user(&pg.bin.join("initdb"))
            .args(["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_server_user(&self, program: &Path) -> Command {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// The connection string for pbxd's `[cdr] postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.ip, self.port
        )
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-c listen_addresses={} -p {} -k {} -c fsync=off",
            self.ip,
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let out = self
            .as_server_user(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-o", &opts, "-l"])
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server at once (connections are cut).
    pub fn stop_server(&self) {
        let _ = self
            .as_server_user(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "fast", "-w", "stop"])
            .output();
    }

    /// Runs `sql` with psql: its rows, one a line, fields split by `|`; None when the
    /// server does not answer or the query fails.
    pub fn query(&self, sql: &str) -> Option<String> {
        let out = Command::new("psql")
            .args(["-h", &self.ip, "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-At", "-c", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_server_user(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A SIP client that registers users with digest authentication over UDP (MD5),
/// retransmitting as RFC 3261's timer E does: the failover benchmark's stream and the
/// tests that need a REGISTER answered by one node and authenticated at another.
pub struct RegisterClient {
    sock: UdpSocket,
    target: SocketAddr,
    local: SocketAddr,
    domain: String,
    timeout: Duration,
    seq: u64,
}

impl RegisterClient {
    pub fn new(
        sock: UdpSocket,
        target: SocketAddr,
        domain: &str,
        timeout: Duration,
    ) -> std::io::Result<RegisterClient> {
        Ok(RegisterClient {
            local: sock.local_addr()?,
            sock,
            target,
            domain: domain.to_string(),
            timeout,
            seq: 0,
        })
    }

    fn request(&mut self, user: &str, call_id: &str, cseq: u32, auth: Option<&str>) -> String {
        self.seq += 1;
        let ruri = format!("sip:{}", self.domain);
        let mut r = format!(
            "REGISTER {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {};branch=z9hG4bK-rs{}-{}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{d}>;tag=rs{user}\r\n\
             To: <sip:{user}@{d}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{}>\r\n\
             Expires: 3600\r\n",
            self.local,
            self.local.port(),
            self.seq,
            self.local,
            d = self.domain
        );
        if let Some(a) = auth {
            r.push_str(&format!("Authorization: {a}\r\n"));
        }
        r.push_str("Content-Length: 0\r\n\r\n");
        r
    }

    /// Sends `req` until a final response or the timeout; returns the response bytes.
    fn transact(&self, req: &str, branch_marker: &str) -> Option<Vec<u8>> {
        self.transact_with(self.target, req, branch_marker)
    }

    fn transact_with(&self, target: SocketAddr, req: &str, branch_marker: &str) -> Option<Vec<u8>> {
        let started = Instant::now();
        let mut interval = Duration::from_millis(500);
        let mut next_send = started;
        let mut buf = vec![0u8; 65_535];
        loop {
            let now = Instant::now();
            let left = self.timeout.checked_sub(now - started)?;
            if now >= next_send {
                let _ = self.sock.send_to(req.as_bytes(), target);
                next_send = now + interval;
                interval = (interval * 2).min(Duration::from_secs(4));
            }
            let wait = left
                .min(next_send.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1));
            let _ = self.sock.set_read_timeout(Some(wait));
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let text = &buf[..n];
            // A provisional or a stale answer to an earlier transaction: keep waiting.
            if !String::from_utf8_lossy(text).contains(branch_marker) {
                continue;
            }
            let status = std::str::from_utf8(&text[8..text.len().min(12)])
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok())
                .unwrap_or(0);
            if status >= 200 {
                return Some(text.to_vec());
            }
        }
    }

    /// One REGISTER with its challenge: the final status (0 = no answer in time).
    pub fn register(&mut self, user: &str, password: &str, n: u64) -> u16 {
        self.register_across(user, password, n, self.target)
    }

    /// [`RegisterClient::register`] with the challenge taken from the client's target
    /// and the authenticated REGISTER sent to `auth_target` (another node: its nonces
    /// must be good anywhere in the cluster).
    pub fn register_across(
        &mut self,
        user: &str,
        password: &str,
        n: u64,
        auth_target: SocketAddr,
    ) -> u16 {
        let call_id = format!("rs-{user}-{}", self.local.port());
        let first = self.request(user, &call_id, (2 * n + 1) as u32, None);
        let marker = format!("rs{}-{}", self.local.port(), self.seq);
        let Some(resp) = self.transact(&first, &marker) else {
            return 0;
        };
        let Ok(msg) = parse_datagram(&resp, &Limits::default()) else {
            return 0;
        };
        let status = msg.status().unwrap_or(0);
        if status != 401 {
            return status;
        }
        let Some(challenge) = msg
            .header_values(&HeaderName::WwwAuthenticate)
            .filter_map(|v| AuthHeader::parse(v).ok())
            .find(|h| Algorithm::parse(h.get("algorithm")) == Some(Algorithm::Md5))
        else {
            return 401;
        };
        let ruri = format!("sip:{}", self.domain);
        let auth = ClientAuth {
            algorithm: Algorithm::Md5,
            user,
            password,
            realm: challenge.get("realm").unwrap_or(&self.domain),
            nonce: challenge.get("nonce").unwrap_or_default(),
            method: "REGISTER",
            uri: &ruri,
            nc: 1,
            cnonce: &format!("{:08x}", n),
        }
        .header_value();
        let second = self.request(user, &call_id, (2 * n + 2) as u32, Some(&auth));
        let marker = format!("rs{}-{}", self.local.port(), self.seq);
        match self.transact_with(auth_target, &second, &marker) {
            Some(resp) => parse_datagram(&resp, &Limits::default())
                .ok()
                .and_then(|m| m.status())
                .unwrap_or(0),
            None => 0,
        }
    }
}

/// A small tmpfs mounted on a directory (a node's data directory that can fill up);
/// unmounted on drop. Needs root, as the partition tests do.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .context("running mount")?
            .success();
        if !ok {
            bail!(
                "mounting a tmpfs on {} failed (the test needs root)",
                path.display()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    fn ballast(&self) -> PathBuf {
        self.path.join("ballast")
    }

    /// Fills the filesystem: a file grown until the disk is full.
    pub fn fill(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ballast())?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => return Ok(()), // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Gives the space back.
    pub fn free(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.ballast())?)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The `cutfs` power-cut filesystem (tests/cutfs) mounted on a directory: what was
/// fsynced survives [`CutFs::cut`], the rest is thrown away. Dropped: its stdin closed
/// (it unmounts and exits), killed if it lingers, the mount detached if still there.
pub struct CutFs {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    path: PathBuf,
}

impl CutFs {
    /// Mounts on `path` (created if missing; it must be empty) and waits until it is live.
    pub fn mount(path: &Path) -> anyhow::Result<CutFs> {
        use std::io::BufRead;
        use std::process::Stdio;
        std::fs::create_dir_all(path)?;
        // As /proc/self/mountinfo names it.
        let path = path.canonicalize()?;
        let mut child = Command::new(bin("cutfs"))
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin("cutfs").display()))?;
        let stdout = child.stdout.take().context("cutfs stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fs = CutFs {
            stdin: child.stdin.take(),
            child,
            lines,
            path,
        };
        let line = fs.reply("cutfs ready")?;
        if line != "ready" {
            bail!("cutfs on {}: {line}", fs.path.display());
        }
        Ok(fs)
    }

    fn reply(&mut self, what: &str) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("waiting for {what} (see its stderr)"))
    }

    /// Power loss: returns the reply (`ok cut files=<n> bytes=<n>`).
    pub fn cut(&mut self) -> anyhow::Result<String> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().context("cutfs stdin closed")?;
        stdin.write_all(b"cut\n")?;
        stdin.flush()?;
        let line = self.reply("cutfs to cut")?;
        if !line.starts_with("ok cut") {
            bail!("cutfs cut: {line}");
        }
        Ok(line)
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let child = &mut self.child;
        if wait_for("cutfs to exit", Duration::from_secs(10), || {
            child.try_wait().ok().flatten()
        })
        .is_err()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*self.path.to_string_lossy()));
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
