//! The write path of the replicated state on one node: commands are appended to the
//! durable log in batches (one fsync for every command waiting: group commit), then
//! applied to the in-memory [`State`] in log order, then answered. This is the place
//! Raft sits in front of: "durable in the log" becomes "committed on a majority".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use pbx_state::{Command, Response, State};
use pbx_storage::{LogStore, SledStore};
use tokio::sync::{mpsc, oneshot};

use crate::NodeError;

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Response, NodeError>>,
}

/// Counters for logs and benchmarks: batches, commands, and how long making a batch
/// durable (append + flush + fsync) took, as a log2 histogram in microseconds.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    durable_us: [AtomicU64; 32],
}

/// One reporting interval of [`CommitStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitReport {
    pub batches: u64,
    pub commands: u64,
    /// Upper bounds (µs) of the buckets holding the 50th and 99th percentile batch.
    pub durable_p50_us: u64,
    pub durable_p99_us: u64,
}

impl CommitStats {
    fn record(&self, commands: u64, durable: std::time::Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands, Ordering::Relaxed);
        let us = durable.as_micros().max(1) as u64;
        let bucket = (63 - us.leading_zeros() as usize).min(31);
        self.durable_us[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the counts since the last call.
    pub fn take(&self) -> CommitReport {
        let counts: Vec<u64> = self
            .durable_us
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            let want = (total as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want.max(1) {
                    return 1u64 << (i + 1);
                }
            }
            0
        };
        CommitReport {
            batches: self.batches.swap(0, Ordering::Relaxed),
            commands: self.commands.swap(0, Ordering::Relaxed),
            durable_p50_us: quantile(0.5),
            durable_p99_us: quantile(0.99),
        }
    }
}

/// Handle to propose commands and read the applied state.
#[derive(Clone)]
pub struct StateHandle {
    state: Arc<RwLock<State>>,
    tx: mpsc::Sender<Proposal>,
    pub stats: Arc<CommitStats>,
}

impl StateHandle {
    /// Opens the store, rebuilds the state from snapshot + log, starts the writer.
    pub fn open(
        store: Arc<SledStore>,
        max_batch: usize,
        snapshot_every: u64,
    ) -> Result<StateHandle, NodeError> {
        let started = Instant::now();
        let (mut state, snap_index) = match store.load_snapshot()? {
            Some((idx, bytes)) => (State::decode(&bytes)?, idx),
            None => (State::default(), 0),
        };
        let mut last = snap_index;
        let entries = store.entries_from(snap_index + 1)?;
        let replayed = entries.len();
        for (idx, bytes) in entries {
            state.apply(Command::decode(&bytes)?);
            last = idx;
        }
        tracing::info!(
            snapshot_index = snap_index,
            replayed,
            last_index = last,
            users = state.users.len(),
            bindings = state.binding_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state recovered"
        );
        let state = Arc::new(RwLock::new(state));
        let (tx, rx) = mpsc::channel(65_536);
        let stats = Arc::new(CommitStats::default());
        let writer = Writer {
            store,
            state: state.clone(),
            rx,
            next_index: last + 1,
            max_batch,
            snapshot_every,
            stats: stats.clone(),
            snapshot_done: Arc::new(AtomicU64::new(snap_index)),
            snapshot_busy: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(writer.run());
        Ok(StateHandle { state, tx, stats })
    }

    /// Commits a command; the response comes after it is durable and applied.
    pub async fn propose(&self, command: Command) -> Result<Response, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { command, reply })
            .await
            .map_err(|_| NodeError::Unavailable("state writer stopped".into()))?;
        rx.await
            .map_err(|_| NodeError::Unavailable("state writer stopped".into()))?
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

struct Writer {
    store: Arc<SledStore>,
    state: Arc<RwLock<State>>,
    rx: mpsc::Receiver<Proposal>,
    next_index: u64,
    max_batch: usize,
    snapshot_every: u64,
    stats: Arc<CommitStats>,
    /// Index of the last durable snapshot, and whether one is being written.
    snapshot_done: Arc<AtomicU64>,
    snapshot_busy: Arc<AtomicBool>,
}

impl Writer {
    async fn run(mut self) {
        let mut batch: Vec<Proposal> = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.rx.recv().await {
            batch.push(first);
            // Everything that queued while the previous fsync ran shares this one.
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch).await;
        }
    }

    async fn commit(&mut self, batch: &mut Vec<Proposal>) {
        let first_index = self.next_index;
        let mut entries = Vec::with_capacity(batch.len());
        let mut ok = Vec::with_capacity(batch.len());
        for (i, p) in batch.drain(..).enumerate() {
            match p.command.encode() {
                Ok(bytes) => {
                    entries.push((first_index + i as u64, bytes));
                    ok.push(p);
                }
                Err(e) => {
                    let _ = p.reply.send(Err(e.into()));
                }
            }
        }
        // Re-number densely in case an encode failed.
        for (i, e) in entries.iter_mut().enumerate() {
            e.0 = first_index + i as u64;
        }
        let store = self.store.clone();
        let started = Instant::now();
        let appended =
            tokio::task::spawn_blocking(move || store.append(&entries).map(|_| entries.len()))
                .await
                .map_err(|e| NodeError::Unavailable(format!("storage task failed: {e}")))
                .and_then(|r| r.map_err(NodeError::from));
        let n = match appended {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "log append failed: answering 503");
                for p in ok {
                    let _ = p
                        .reply
                        .send(Err(NodeError::Unavailable("storage failure".into())));
                }
                return;
            }
        };
        self.next_index += n as u64;
        self.stats.record(n as u64, started.elapsed());
        {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            for p in ok {
                let resp = st.apply(p.command);
                let _ = p.reply.send(Ok(resp));
            }
        }
        let last = self.next_index - 1;
        self.maybe_snapshot(last);
    }

    /// Snapshots are encoded here, at a consistent point of the log, but written and
    /// fsynced in the background so commits do not wait for them.
    fn maybe_snapshot(&mut self, last: u64) {
        if self.snapshot_busy.load(Ordering::Acquire) {
            return;
        }
        if last - self.snapshot_done.load(Ordering::Acquire) < self.snapshot_every {
            return;
        }
        let started = Instant::now();
        let bytes = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            st.encode()
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "snapshot encode failed");
                return;
            }
        };
        let encode_ms = started.elapsed().as_millis() as u64;
        let (store, done, busy) = (
            self.store.clone(),
            self.snapshot_done.clone(),
            self.snapshot_busy.clone(),
        );
        busy.store(true, Ordering::Release);
        tokio::task::spawn_blocking(move || {
            let size = bytes.len();
            match store
                .save_snapshot(last, &bytes)
                .and_then(|_| store.purge_through(last))
            {
                Ok(()) => {
                    done.store(last, Ordering::Release);
                    tracing::info!(
                        index = last,
                        bytes = size,
                        encode_ms,
                        "snapshot saved, log purged"
                    );
                }
                Err(e) => tracing::error!(error = %e, "snapshot failed"),
            }
            busy.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbx_state::{Binding, ContactUpdate, RegisterOp, Transport};

    fn register(aor: &str, now_ms: u64) -> Command {
        let uri = format!("sip:{aor}@192.0.2.1");
        Command::Register {
            aor: aor.into(),
            now_ms,
            call_id: format!("c-{aor}"),
            cseq: (now_ms % 1_000_000) as u32 + 1,
            op: RegisterOp::Update(vec![ContactUpdate {
                binding: Binding {
                    uri: uri.clone(),
                    uri_key: uri,
                    params: String::new(),
                    q: None,
                    expires_at_ms: now_ms + 3_600_000,
                    call_id: format!("c-{aor}"),
                    cseq: (now_ms % 1_000_000) as u32 + 1,
                    instance: None,
                    reg_id: None,
                    path: vec![],
                    source: "192.0.2.1:5060".into(),
                    transport: Transport::Udp,
                    node_id: 1,
                    user_agent: None,
                    registered_at_ms: now_ms,
                },
                expires_secs: 3600,
            }]),
            max_contacts: 10,
        }
    }

    /// Snapshot written in the background, log purged behind it, more commands after it:
    /// a restart recovers exactly the state that was acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_from_snapshot_plus_log() {
        let dir = tempfile::tempdir().unwrap();
        let expected = {
            let store = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
            let h = StateHandle::open(store.clone(), 64, 100).unwrap();
            let mut pending = Vec::new();
            for i in 0..250u64 {
                let h = h.clone();
                pending.push(tokio::spawn(async move {
                    h.propose(register(&format!("u{i}"), 1_000 + i)).await
                }));
            }
            for p in pending {
                assert!(matches!(p.await.unwrap().unwrap(), Response::Bindings(_)));
            }
            // Wait on state: a snapshot became durable and the log behind it is gone.
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let snap = store.load_snapshot().unwrap().map(|s| s.0).unwrap_or(0);
                let first = store.entries_from(0).unwrap().first().map(|e| e.0);
                if snap >= 100 && first.is_none_or(|f| f > snap) {
                    break;
                }
                assert!(Instant::now() < deadline, "no snapshot: {snap} {first:?}");
                tokio::task::yield_now().await;
            }
            for i in 250..260u64 {
                h.propose(register(&format!("u{i}"), 1_000 + i))
                    .await
                    .unwrap();
            }
            let st = h.read().clone();
            st
        };
        // The old writer task releases the database when it sees the handles gone.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path(), 8 << 20) {
                Ok(s) => break Arc::new(s),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("store still locked: {e}"),
            }
        };
        let h = StateHandle::open(store, 64, 100).unwrap();
        assert_eq!(h.read().binding_count(), 260);
        assert_eq!(*h.read(), expected);
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn commit_histogram_quantiles() {
        let s = CommitStats::default();
        for _ in 0..98 {
            s.record(10, Duration::from_micros(50));
        }
        s.record(10, Duration::from_millis(3));
        s.record(10, Duration::from_millis(3));
        let r = s.take();
        assert_eq!((r.batches, r.commands), (100, 1000));
        assert_eq!(r.durable_p50_us, 64, "50 µs falls in the 32..64 bucket");
        assert_eq!(
            r.durable_p99_us, 4096,
            "3 ms falls in the 2048..4096 bucket"
        );
        assert_eq!(s.take().batches, 0, "take resets");
    }
}
