//! The write path of the replicated state on one node: commands are appended to the
//! durable log in batches (one fsync for every command waiting: group commit), then
//! applied to the in-memory [`State`] in log order, then answered. This is the place
//! Raft sits in front of: "durable in the log" becomes "committed on a majority".

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

/// Counters for logs and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub commands: std::sync::atomic::AtomicU64,
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
            last_snapshot: snap_index,
            max_batch,
            snapshot_every,
            stats: stats.clone(),
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
    last_snapshot: u64,
    max_batch: usize,
    snapshot_every: u64,
    stats: Arc<CommitStats>,
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
        self.stats
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .commands
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            for p in ok {
                let resp = st.apply(p.command);
                let _ = p.reply.send(Ok(resp));
            }
        }
        let last = self.next_index - 1;
        if last - self.last_snapshot >= self.snapshot_every {
            self.snapshot(last).await;
        }
    }

    async fn snapshot(&mut self, index: u64) {
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
        let store = self.store.clone();
        let size = bytes.len();
        let res = tokio::task::spawn_blocking(move || {
            store.save_snapshot(index, &bytes)?;
            store.purge_through(index)
        })
        .await;
        match res {
            Ok(Ok(())) => {
                self.last_snapshot = index;
                tracing::info!(index, bytes = size, "snapshot saved, log purged");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "snapshot failed"),
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
    }
}
