//! openraft's log store and state-machine store on [`pbx_storage`].
//!
//! Both share one [`LogStore`]: sled on disk in a node, in memory in tests. The log
//! store answers openraft only after the write is flushed *and* fsynced (the storage
//! crate's `append`, `truncate_from` and durable `put_meta` do both), so an acknowledged
//! vote or append survives a power cut.
//!
//! The state machine lives in memory ([`Applied`]: the `pbx-state` [`State`] plus the
//! Raft position it reflects) behind one lock, so a snapshot always pairs a state with
//! exactly the log id it covers. At start it is rebuilt from the last snapshot; openraft
//! re-applies the committed log after it.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use pbx_state::{Response, State};
use pbx_storage::LogStore;
use serde::{Deserialize, Serialize};

use crate::{Member, NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const META_VOTE: &str = "raft-vote";
const META_COMMITTED: &str = "raft-committed";
const META_PURGED: &str = "raft-last-purged";

/// Whether the store is usable: a full or failing disk closes it (see
/// [`pbx_storage::SledStore`]) and every storage call waits — and so does Raft on this
/// node — until it is back, instead of failing openraft, which would stop for good.
/// Shared with the node for `/readyz` and metrics.
#[derive(Debug, Default)]
pub struct StorageHealth {
    /// Unix ms when the current outage began; 0 while the store works.
    down_since_ms: std::sync::atomic::AtomicU64,
    outages: std::sync::atomic::AtomicU64,
    reason: std::sync::Mutex<String>,
    /// A snapshot from the leader is being received or installed: set by the state
    /// machine until the snapshot is on disk, read by the log's purge (which must not
    /// record a purge behind a snapshot that is not stored yet).
    installing_snapshot: std::sync::atomic::AtomicBool,
    /// Since when (unix ms; 0: not) the store cannot be reopened in this process
    /// ([`pbx_storage::StorageError::Stuck`]): the node should restart.
    stuck_since_ms: std::sync::atomic::AtomicU64,
}

impl StorageHealth {
    /// Why the store is unavailable and since when (unix ms), or None when it works.
    pub fn unavailable(&self) -> Option<(String, u64)> {
        let since = self
            .down_since_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (since != 0).then(|| {
            let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            (reason.clone(), since)
        })
    }

    /// Since when (unix ms) the store cannot be reopened without a restart.
    pub fn stuck_since(&self) -> Option<u64> {
        let since = self
            .stuck_since_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (since != 0).then_some(since)
    }

    /// Outages since start.
    pub fn outages(&self) -> u64 {
        self.outages.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn down(&self, e: &pbx_storage::StorageError) {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self
            .down_since_ms
            .compare_exchange(0, crate::unix_ms().max(1), Relaxed, Relaxed)
            .is_ok();
        if first {
            self.outages.fetch_add(1, Relaxed);
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
            tracing::error!(error = %e, "storage unavailable: Raft writes on this node wait until it is back (writes through it are answered 503 meanwhile)");
        }
    }

    fn up(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Every storage call ends here: a load, and a write only after an outage.
        if self.down_since_ms.load(Relaxed) == 0 {
            return;
        }
        let since = self.down_since_ms.swap(0, Relaxed);
        if since != 0 {
            tracing::warn!(
                down_ms = crate::unix_ms().saturating_sub(since),
                "storage recovered: every write it had accepted is kept"
            );
        }
    }
}

/// Runs storage calls off the async threads, and waits out a transient failure (a full
/// disk): retried after [`LogStore::recover`] with a growing pause, as long as it takes.
#[derive(Clone)]
struct Durable {
    store: Store,
    health: Arc<StorageHealth>,
}

impl Durable {
    async fn run<T, F>(&self, f: F) -> Result<T, AnyError>
    where
        F: Fn(&dyn LogStore) -> Result<T, pbx_storage::StorageError> + Send + Sync + 'static,
        T: Send + 'static,
    {
        let f = Arc::new(f);
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            let (store, op) = (self.store.clone(), f.clone());
            match tokio::task::spawn_blocking(move || op(&*store)).await {
                Ok(Ok(v)) => {
                    self.health.up();
                    return Ok(v);
                }
                Ok(Err(e)) if e.is_transient() => self.wait_out(&e, &mut pause).await?,
                Ok(Err(e)) => return Err(AnyError::new(&e)),
                Err(e) => return Err(AnyError::new(&e)),
            }
        }
    }

    /// One pause and one attempt to bring the store back; an error only when it cannot
    /// come back (what it found is not a store).
    async fn wait_out(
        &self,
        e: &pbx_storage::StorageError,
        pause: &mut std::time::Duration,
    ) -> Result<(), AnyError> {
        self.health.down(e);
        tokio::time::sleep(*pause).await;
        *pause = (*pause * 2).min(std::time::Duration::from_secs(1));
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.recover()).await {
            Ok(Err(pbx_storage::StorageError::Stuck(_))) => {
                let _ = self.health.stuck_since_ms.compare_exchange(
                    0,
                    crate::unix_ms().max(1),
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                );
                Ok(())
            }
            Ok(Err(e)) if !e.is_transient() => Err(AnyError::new(&e)),
            Err(e) => Err(AnyError::new(&e)),
            _ => Ok(()),
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, AnyError> {
    bincode::deserialize(bytes).map_err(|e| AnyError::new(&*e))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    bincode::serialize(v).map_err(|e| AnyError::new(&*e))
}

/// The store both Raft stores sit on.
pub type Store = Arc<dyn LogStore>;

/// The Raft log on a [`LogStore`].
#[derive(Clone)]
pub struct LogStorage {
    durable: Durable,
    /// Appends waiting for an fsync (see [`flusher`]).
    flusher: tokio::sync::mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

/// Makes appends durable in groups: every append written while one fsync runs shares
/// the next, and openraft hears "flushed" only after it. Meanwhile openraft goes on
/// replicating, so the leader's fsync overlaps the followers' (Raft allows this: an entry
/// counts for the leader's vote only once flushed).
///
/// A sync that fails for want of disk space is retried until it succeeds (see
/// [`Durable`]): the appends wait, unacknowledged, and nothing is lost.
async fn flusher(
    durable: Durable,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(cb) = rx.try_recv() {
            waiting.push(cb);
        }
        let res = durable
            .run(|store| store.sync())
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::error!(error = %e, "log fsync failed");
        }
        for cb in waiting {
            cb.log_io_completed(res.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStorage {
    /// Must be called inside a tokio runtime (it starts the flusher task).
    pub fn new(store: Store, health: Arc<StorageHealth>) -> Self {
        let (flusher_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let durable = Durable { store, health };
        tokio::spawn(flusher(durable.clone(), rx));
        LogStorage {
            durable,
            flusher: flusher_tx,
        }
    }

    async fn meta<T: for<'de> Deserialize<'de> + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, AnyError> {
        match self.durable.run(move |store| store.get_meta(key)).await? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
    ) -> Result<(), AnyError> {
        let bytes = encode(value)?;
        self.durable
            .run(move |store| store.put_meta(key, &bytes, durable))
            .await
    }

    /// Whether this node has any Raft state (a vote or a log): it has been part of a
    /// cluster and must never initialise a new one.
    pub fn has_raft_state(store: &dyn LogStore) -> Result<bool, pbx_storage::StorageError> {
        Ok(store.get_meta(META_VOTE)?.is_some()
            || store.get_meta(META_PURGED)?.is_some()
            || store.last_index()?.is_some())
    }
}

impl RaftLogReader<TypeConfig> for LogStorage {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let from = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self
            .durable
            .run(move |store| store.entries_range(from, to))
            .await
            .map_err(StorageIOError::read_logs)?;
        raw.iter()
            .map(|(_, bytes)| decode(bytes))
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStorage {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeId>> = self
            .meta(META_PURGED)
            .await
            .map_err(StorageIOError::read_logs)?;
        let last = self
            .durable
            .run(|store| match store.last_index()? {
                Some(i) => store.entries_range(i, i + 1),
                None => Ok(Vec::new()),
            })
            .await
            .map_err(StorageIOError::read_logs)?;
        let last = match last.first() {
            Some((_, bytes)) => {
                let e: Entry<TypeConfig> = decode(bytes).map_err(StorageIOError::read_logs)?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(META_VOTE, vote, true)
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta(META_VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    /// The commit index is a hint for faster recovery (re-apply up to it at start); it
    /// need not be durable on its own: it rides on the next fsync.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta(META_COMMITTED, &committed, false)
            .await
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let c: Option<Option<LogId<NodeId>>> = self
            .meta(META_COMMITTED)
            .await
            .map_err(StorageIOError::read)?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut raw = Vec::new();
        for e in entries {
            raw.push((
                e.log_id.index,
                encode(&e).map_err(StorageIOError::write_logs)?,
            ));
        }
        // Written now (readable at once), acknowledged by the flusher after the fsync
        // that covers it. Inline while the store works; a full disk makes Raft wait here.
        // (During an outage straight to the waiting path: the store's lock may be
        // held by a reopen, which must not block a runtime thread.)
        let inline = if self.durable.health.unavailable().is_none() {
            self.durable.store.append_buffered(&raw)
        } else {
            Err(pbx_storage::StorageError::Unavailable(
                "storage outage".into(),
            ))
        };
        match inline {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                let raw = Arc::new(raw);
                self.durable
                    .run(move |store| store.append_buffered(&raw))
                    .await
                    .map_err(StorageIOError::write_logs)?;
            }
            Err(e) => return Err(StorageIOError::write_logs(AnyError::new(&e)).into()),
        }
        if let Err(e) = self.flusher.send(callback) {
            e.0.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.durable
            .run(move |store| store.truncate_from(log_id.index))
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Only behind a snapshot that is on disk: openraft asks for the purge as soon as
        // it hands a snapshot received from the leader to the state machine, and a crash
        // between the purge record and the snapshot file would leave a log purged behind
        // nothing. (Purges behind the node's own snapshots come after it is stored.)
        let mut waited = std::time::Duration::ZERO;
        let acquire = std::sync::atomic::Ordering::Acquire;
        while self.durable.health.installing_snapshot.load(acquire) {
            let saved = self
                .durable
                .run(|store| store.snapshot_index())
                .await
                .map_err(StorageIOError::write_logs)?;
            if saved.is_some_and(|i| i >= log_id.index) {
                break;
            }
            if waited == std::time::Duration::from_secs(10) {
                tracing::warn!(
                    purge = log_id.index,
                    snapshot = ?saved,
                    "log purge waiting for the snapshot that covers it"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            waited += std::time::Duration::from_millis(10);
        }
        // Record the purge point first: a crash in between leaves extra entries behind
        // it, which is harmless; the other order could lose the last log id.
        self.put_meta(META_PURGED, &log_id, true)
            .await
            .map_err(StorageIOError::write_logs)?;
        self.durable
            .run(move |store| store.purge_through(log_id.index))
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// Checks that the log was not purged beyond the snapshot: entries purged behind a
/// snapshot that is missing or older would leave a state silently short of them.
/// The reason, when it is so.
pub fn check_snapshot_covers_purged_log(store: &dyn LogStore) -> Result<(), String> {
    let fail = |e: pbx_storage::StorageError| e.to_string();
    let Some(bytes) = store.get_meta(META_PURGED).map_err(fail)? else {
        return Ok(());
    };
    let purged: LogId<NodeId> = decode(&bytes).map_err(|e| e.to_string())?;
    let snapshot = store.load_snapshot().map_err(fail)?.map(|(index, _)| index);
    if snapshot.is_some_and(|s| s >= purged.index) {
        return Ok(());
    }
    Err(format!(
        "the Raft log was purged through index {} but the snapshot {}: the snapshot \
         file (raft-snapshot) is missing or older than its log; restore it, or wipe the \
         directory and let the node catch up from the others",
        purged.index,
        snapshot.map_or("is missing".to_string(), |s| format!("covers only {s}"))
    ))
}

/// The applied state and the Raft position it reflects, under one lock.
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
    /// The snapshot this node holds (built here or installed from the leader).
    pub snapshot: Option<SnapshotInfo>,
}

/// The last snapshot a node holds: its index, encoded size and when it was built (by
/// whichever node built it; unix ms, 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub index: u64,
    pub bytes: u64,
    pub built_ms: u64,
}

impl SnapshotInfo {
    fn of(meta: &SnapshotMeta<NodeId, Member>, bytes: usize) -> SnapshotInfo {
        SnapshotInfo {
            index: meta.last_log_id.map_or(0, |l| l.index),
            bytes: bytes as u64,
            // The builder names a snapshot `…-<unix ms>` (see `build_snapshot`).
            built_ms: meta
                .snapshot_id
                .rsplit('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// What is stored for a snapshot: openraft's meta and the encoded [`State`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    state: Vec<u8>,
}

/// The state machine: applies committed entries to the shared [`Applied`].
#[derive(Clone)]
pub struct StateMachineStore {
    durable: Durable,
    applied: Arc<RwLock<Applied>>,
}

impl StateMachineStore {
    /// Rebuilds the applied state from the stored snapshot, if any.
    pub fn open(
        store: Store,
        health: Arc<StorageHealth>,
    ) -> Result<StateMachineStore, crate::RaftError> {
        let mut applied = Applied::default();
        if let Some((_, bytes)) = store.load_snapshot()? {
            let snap: StoredSnapshot = bincode::deserialize(&bytes)?;
            applied.state = State::decode(&snap.state)?;
            applied.last_applied = snap.meta.last_log_id;
            applied.snapshot = Some(SnapshotInfo::of(&snap.meta, snap.state.len()));
            applied.membership = snap.meta.last_membership;
        }
        Ok(StateMachineStore {
            durable: Durable { store, health },
            applied: Arc::new(RwLock::new(applied)),
        })
    }

    /// The applied state, shared with readers.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }

    async fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, AnyError> {
        match self.durable.run(|store| store.load_snapshot()).await? {
            Some((_, bytes)) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn save(&self, snap: &StoredSnapshot) -> Result<(), AnyError> {
        let index = snap.meta.last_log_id.map_or(0, |l| l.index);
        let bytes = encode(snap)?;
        self.durable
            .run(move |store| store.save_snapshot(index, &bytes))
            .await?;
        self.write().snapshot = Some(SnapshotInfo::of(&snap.meta, snap.state.len()));
        Ok(())
    }
}

/// Builds a snapshot of the state as of the moment it is created.
pub struct SnapshotBuilder {
    sm: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        // State and position are read under one lock: the snapshot covers exactly
        // `last_applied`, even while later entries are being applied.
        let (state, meta) = {
            let a = self.sm.read();
            let state = a
                .state
                .encode()
                .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
            let last = a.last_applied;
            let id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, crate::unix_ms()),
                None => format!("empty-{}", crate::unix_ms()),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: a.membership.clone(),
                snapshot_id: id,
            };
            (state, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state,
        };
        self.sm
            .save(&stored)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            bytes = stored.state.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.state)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        let a = self.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut a = self.write();
        for e in entries {
            a.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Normal(cmd) => a.state.apply(cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(e.log_id), m);
                    Response::Done
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        self.durable
            .health
            .installing_snapshot
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let state = State::decode(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state: bytes,
        };
        // Durable first, then visible: a crash right after still restarts from it.
        self.durable
            .health
            .installing_snapshot
            .store(true, std::sync::atomic::Ordering::Release);
        let saved = self.save(&stored).await;
        self.durable
            .health
            .installing_snapshot
            .store(false, std::sync::atomic::Ordering::Release);
        saved.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        let mut a = self.write();
        a.state = state;
        a.last_applied = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            users = a.state.users.len(),
            bindings = a.state.binding_count(),
            "snapshot installed"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let snap = self
            .stored_snapshot()
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(snap.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.state)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};
    use pbx_storage::{MemStore, SledStore};

    fn stores(store: Store) -> (LogStorage, StateMachineStore) {
        let health = Arc::new(StorageHealth::default());
        let sm =
            StateMachineStore::open(store.clone(), health.clone()).expect("an empty store opens");
        (LogStorage::new(store, health), sm)
    }

    #[tokio::test]
    async fn a_failing_store_is_waited_out_and_the_outage_recorded() {
        let mem = Arc::new(MemStore::new());
        let store: Store = mem.clone();
        let health = Arc::new(StorageHealth::default());
        let durable = Durable {
            store: store.clone(),
            health: health.clone(),
        };
        store.put_meta("k", b"v", true).unwrap();
        mem.fail(Some("No space left on device"));
        let call = tokio::spawn({
            let d = durable.clone();
            async move { d.run(|s| s.get_meta("k")).await }
        });
        // Seen as an outage, and the call waits (it is neither failed nor answered).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while health.unavailable().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "outage not seen");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (reason, _) = health.unavailable().unwrap();
        assert!(reason.contains("No space left on device"), "{reason}");
        assert!(!call.is_finished());
        mem.fail(None);
        assert_eq!(call.await.unwrap().unwrap(), Some(b"v".to_vec()));
        assert!(health.unavailable().is_none());
        assert_eq!(health.outages(), 1);
    }

    #[tokio::test]
    async fn a_log_purged_behind_a_missing_snapshot_is_refused() {
        let store: Store = Arc::new(MemStore::new());
        assert_eq!(check_snapshot_covers_purged_log(&*store), Ok(()));
        let (mut log, _sm) = stores(store.clone());
        let id = LogId::new(openraft::CommittedLeaderId::new(1, 1), 40);
        log.purge(id).await.unwrap();
        let e = check_snapshot_covers_purged_log(&*store).unwrap_err();
        assert!(
            e.contains("purged through index 40") && e.contains("is missing"),
            "{e}"
        );
        store.save_snapshot(30, b"old").unwrap();
        let e = check_snapshot_covers_purged_log(&*store).unwrap_err();
        assert!(e.contains("covers only 30"), "{e}");
        store.save_snapshot(40, b"covers").unwrap();
        assert_eq!(check_snapshot_covers_purged_log(&*store), Ok(()));
    }

    struct Sled;

    impl StoreBuilder<TypeConfig, LogStorage, StateMachineStore, tempfile::TempDir> for Sled {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStorage, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
            let store = SledStore::open(dir.path(), 8 << 20)
                .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
            let (log, sm) = stores(Arc::new(store));
            Ok((dir, log, sm))
        }
    }

    struct Mem;

    impl StoreBuilder<TypeConfig, LogStorage, StateMachineStore, ()> for Mem {
        async fn build(&self) -> StorageResult<((), LogStorage, StateMachineStore)> {
            let (log, sm) = stores(Arc::new(MemStore::new()));
            Ok(((), log, sm))
        }
    }

    /// openraft's storage conformance suite against the stores on sled.
    #[test]
    fn openraft_storage_suite_on_sled() {
        // The suite runs each case on a runtime of its own.
        Suite::test_all(Sled).unwrap();
    }

    /// The same suite against the stores in memory (what in-process cluster tests use).
    #[test]
    fn openraft_storage_suite_in_memory() {
        Suite::test_all(Mem).unwrap();
    }

    // Durability: what openraft was told is stored must survive a power loss (the
    // MemStore keeps what a disk would hold after the last sync).

    /// A single voter needs no peers: every entry it commits was flushed first.
    struct NoPeers;

    fn unreachable<E: std::error::Error>() -> openraft::error::RPCError<NodeId, Member, E> {
        openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(&AnyError::error(
            "a single voter has no peers",
        )))
    }

    impl openraft::network::RaftNetworkFactory<TypeConfig> for NoPeers {
        type Network = NoPeers;
        async fn new_client(&mut self, _target: NodeId, _node: &Member) -> NoPeers {
            NoPeers
        }
    }

    impl openraft::network::RaftNetwork<TypeConfig> for NoPeers {
        async fn append_entries(
            &mut self,
            _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
            _option: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::AppendEntriesResponse<NodeId>,
            openraft::error::RPCError<NodeId, Member, openraft::error::RaftError<NodeId>>,
        > {
            Err(unreachable())
        }

        async fn install_snapshot(
            &mut self,
            _rpc: openraft::raft::InstallSnapshotRequest<TypeConfig>,
            _option: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RPCError<
                NodeId,
                Member,
                openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
            >,
        > {
            Err(unreachable())
        }

        async fn vote(
            &mut self,
            _rpc: openraft::raft::VoteRequest<NodeId>,
            _option: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::VoteResponse<NodeId>,
            openraft::error::RPCError<NodeId, Member, openraft::error::RaftError<NodeId>>,
        > {
            Err(unreachable())
        }
    }

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    /// Every entry a client write was acknowledged for (committed: flushed on the
    /// single voter), and the vote that elected it, are on the disk after a power loss.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_writes_and_the_vote_survive_a_power_loss() {
        let mem = Arc::new(MemStore::new());
        let (log, sm) = stores(mem.clone());
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raft = crate::Raft::new(1, Arc::new(config), NoPeers, log, sm)
            .await
            .unwrap();
        raft.initialize(std::collections::BTreeMap::from([(1, Member::default())]))
            .await
            .unwrap();
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .state(openraft::ServerState::Leader, "a single voter leads")
            .await
            .unwrap();
        for i in 0..50 {
            raft.client_write(pbx_state::Command::SweepExpired { now_ms: i })
                .await
                .unwrap();
        }
        let (acked, vote) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.last_log_index.unwrap(), m.vote)
        };
        raft.shutdown().await.unwrap();
        mem.power_loss();
        let (mut log, _) = stores(mem.clone());
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let on_disk = log.get_log_state().await.unwrap().last_log_id.unwrap();
        assert!(on_disk.index >= acked, "{on_disk} < {acked}");
        assert_eq!(
            log.try_get_log_entries(1..=acked).await.unwrap().len() as u64,
            acked
        );
    }

    /// A vote is durable when `save_vote` returns; a truncation when `truncate` does;
    /// a purge's point when `purge` does (the entries behind it may come back: harmless,
    /// nothing reads them).
    #[tokio::test]
    async fn vote_truncate_and_purge_are_durable_when_they_return() {
        let mem = Arc::new(MemStore::new());
        let (mut log, _sm) = stores(mem.clone());
        log.save_vote(&Vote::new(7, 2)).await.unwrap();
        mem.power_loss();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(7, 2)));

        let entries: Vec<(u64, Vec<u8>)> = (1..=5)
            .map(|i| {
                let e = Entry::<TypeConfig> {
                    log_id: log_id(1, i),
                    payload: EntryPayload::Blank,
                };
                (i, encode(&e).unwrap())
            })
            .collect();
        mem.append(&entries).unwrap();
        log.truncate(log_id(1, 4)).await.unwrap();
        mem.power_loss();
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 3)),
            "truncated entries must not come back"
        );

        log.purge(log_id(1, 2)).await.unwrap();
        mem.power_loss();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(1, 3)));
        let after: Vec<u64> = log
            .try_get_log_entries(3..4)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(after, vec![3]);
    }
}
