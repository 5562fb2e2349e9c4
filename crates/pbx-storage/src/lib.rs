//! Durable storage behind a small trait. This is the only crate that knows sled.
//!
//! The shape is a command log plus a snapshot, which is what the Raft log store and
//! state-machine store (pbx-raft) sit on: entries are appended in index order and are durable
//! (flushed *and* fsynced) when `append` returns; a snapshot covers every entry up to its
//! index, after which those entries can be purged. [`SledStore`] is the store on disk,
//! [`MemStore`] the one in memory for tests.
//!
//! Durable means durable on power loss, not only across a process crash: sled's own flush
//! ends in `sync_file_range` and never fsyncs the blob files it writes for large values,
//! so the store fsyncs the database file and every new blob itself, and keeps the Raft
//! snapshot out of sled, in a checksummed file written, fsynced and renamed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

mod blobs;
mod identity;
mod mem;

pub use blobs::{BlobId, BlobStore, FileBlobs, MemBlobs};
pub use identity::{claim, DataIdentity, DATA_FORMAT};
pub use mem::MemStore;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The directory cannot be used by this node: another cluster's or node's data, a
    /// newer format, or a store that does not open (torn or truncated files).
    #[error("{path}: {reason}")]
    Foreign { path: PathBuf, reason: String },
    /// The store hit an I/O error (a full disk, a failing device) and is closed until
    /// [`LogStore::recover`] reopens it; nothing acknowledged was lost.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The closed database cannot be reopened in this process: sled still holds its
    /// file lock because its own close waits on the write that failed (a value it keeps
    /// in a blob file). Only a restart of the process clears it.
    #[error("storage stuck until pbxd restarts: {0}")]
    Stuck(String),
    /// Refused before anything was written: the write would leave less free space
    /// than the store keeps (see [`SledStore::keep_free`]). The store stays open.
    #[error("disk full: {path} has {free_mib} MiB free, and writes stop below {floor_mib} MiB (storage.min_free_mb) so the store never runs out of space mid-write")]
    DiskFull {
        path: PathBuf,
        free_mib: u64,
        floor_mib: u64,
    },
}

impl StorageError {
    /// Whether retrying after [`LogStore::recover`] can succeed: the disk was full (it
    /// frees up). Any other I/O error is not retried: after a failed fsync the kernel
    /// may have dropped the dirty pages and a retry would "succeed" on data that never
    /// reached the disk (as PostgreSQL learned), so the node stops writing for good.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Sled(sled::Error::Io(e)) | StorageError::Io { source: e, .. } => {
                out_of_space(e)
            }
            StorageError::Unavailable(_)
            | StorageError::Stuck(_)
            | StorageError::DiskFull { .. } => true,
            _ => false,
        }
    }
}

/// The free space a [`SledStore`] keeps by default (see [`SledStore::keep_free`]).
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

/// Writes a file so that a crash or power cut leaves the old one or the new one,
/// never a mix: to `tmp`, fsynced, renamed over `path`, the directory fsynced. A
/// failure (a full disk) removes what the partial file took.
fn write_aside(
    tmp: &Path,
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StorageError> {
    let written = (|| {
        let mut f = File::create(tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(io_error(tmp)(e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Refuses a write of `bytes` in `dir` that would leave less than `min_free` free (0:
/// no floor).
fn check_room(dir: &Path, min_free: u64, bytes: u64) -> Result<(), StorageError> {
    if min_free == 0 {
        return Ok(());
    }
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| StorageError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    if free < min_free.saturating_add(bytes) {
        return Err(StorageError::DiskFull {
            path: dir.to_path_buf(),
            free_mib: free >> 20,
            floor_mib: min_free.div_ceil(1 << 20),
        });
    }
    Ok(())
}

/// ENOSPC or EDQUOT: a write that found no room. (sled hands later callers a copy of
/// its first error that keeps the kind, not the OS code.)
fn out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded)
}

/// An append-only log of opaque entries with a snapshot and small metadata values.
pub trait LogStore: Send + Sync {
    /// Appends entries (index, bytes). Durable on return.
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        self.append_buffered(entries)?;
        self.sync()
    }
    /// Appends entries without waiting for the disk: visible to reads at once, durable
    /// after the next [`LogStore::sync`] (one sync covers every write before it, which
    /// is how appends share an fsync).
    fn append_buffered(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError>;
    /// Makes every write so far durable (flush + fsync).
    fn sync(&self) -> Result<(), StorageError>;
    /// Entries with `from <= index < to`, in order.
    fn entries_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;
    /// Entries with index >= `from`, in order.
    fn entries_from(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.entries_range(from, u64::MAX)
    }
    /// Removes entries with index >= `from` (a new leader overwrote them). Durable on
    /// return.
    fn truncate_from(&self, from: u64) -> Result<(), StorageError>;
    /// Highest stored index, if any.
    fn last_index(&self) -> Result<Option<u64>, StorageError>;
    /// Stores a snapshot covering entries up to `index`. Durable on return.
    fn save_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StorageError>;
    fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError>;
    /// The index the stored snapshot covers, without reading it all.
    fn snapshot_index(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.load_snapshot()?.map(|(index, _)| index))
    }
    /// Removes entries with index <= `index` (they are covered by a snapshot).
    fn purge_through(&self, index: u64) -> Result<(), StorageError>;
    /// Stores a small value; durable on return when `durable` (a vote), otherwise with
    /// the next durable write (a commit index hint that may lag after a crash).
    fn put_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StorageError>;
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// After a transient error ([`StorageError::is_transient`]): one attempt to bring the
    /// store back, with every write it had accepted. Ok when it is usable again; the
    /// caller retries the operation that failed.
    fn recover(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Log entries per sled tree. The log is a chain of trees ("segments") so purging
/// behind a snapshot drops whole trees instead of writing a tombstone per entry.
const SEGMENT_ENTRIES: u64 = 16_384;

/// An entry this large gets a segment of its own. sled rewrites a whole leaf on every
/// change to it, so a large value sharing a leaf with the log's tail would be copied
/// again by every later append (measured: a 20 MB entry made the next appends 100 ms).
const LARGE_ENTRY: usize = 256 * 1024;

/// One tree of the log: the index of its first entry, the tree, how many entries it got.
struct Segment {
    first: u64,
    tree: sled::Tree,
    count: u64,
}

fn segment_name(first: u64) -> String {
    format!("log-{first:020}")
}

/// Removes the keys of `tree` in `range` in one batch.
fn remove_range(
    tree: &sled::Tree,
    range: impl std::ops::RangeBounds<[u8; 8]>,
) -> Result<(), StorageError> {
    let keys: Vec<sled::IVec> = tree.range(range).keys().collect::<Result<_, _>>()?;
    let mut batch = sled::Batch::default();
    for k in keys {
        batch.remove(k);
    }
    Ok(tree.apply_batch(batch)?)
}

fn index_of(key: &[u8]) -> Result<u64, StorageError> {
    let k: [u8; 8] = key
        .try_into()
        .map_err(|_| StorageError::Corrupt("log key is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(k))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// fsyncs a directory, so the names created, renamed or removed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// A write the store accepted, kept until a sync makes it durable so that a reopened
/// database (after an I/O error) can be given it again.
enum Op {
    Append(Vec<(u64, Vec<u8>)>),
    Truncate(u64),
    Purge(u64),
    Meta(String, Vec<u8>),
}

/// The open sled database.
struct Sled {
    db: sled::Db,
    segments: Mutex<Vec<Segment>>,
    meta: sled::Tree,
    /// Where snapshots were kept before they became a file (data format 1); read when
    /// there is no snapshot file, emptied by the first snapshot saved as a file.
    legacy_snapshot: sled::Tree,
    /// The database file, for fsync: sled's flush ends in sync_file_range, which does
    /// not make the data durable on its own (sled issue 1452).
    db_file: File,
    db_path: PathBuf,
}

const LEGACY_SNAPSHOT_KEY: &[u8] = b"snapshot";

impl Sled {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Sled, StorageError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // We flush (and fsync) exactly when something must be durable; sled's own
            // periodic flusher would only compete with those flushes and stall them.
            .flush_every_ms(None);
        // A torn or truncated store is refused with its path, whether sled reports it or
        // panics on it.
        let unusable = |reason: String| {
            StorageError::Foreign {
            path: dir.to_path_buf(),
            reason: format!("the store does not open ({reason}): restore it, or wipe the directory and let the node catch up from the others"),
        }
        };
        let db = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
            Ok(Ok(db)) => db,
            // An I/O error (a full disk, the lock still held by a closing handle) is
            // worth retrying; anything else means the files are not a store.
            Ok(Err(e @ sled::Error::Io(_))) => return Err(StorageError::Sled(e)),
            Ok(Err(e)) => return Err(unusable(e.to_string())),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled panicked".into());
                return Err(unusable(what));
            }
        };
        let mut segments = Vec::new();
        for name in db.tree_names() {
            let Some(first) = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.strip_prefix("log-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let tree = db.open_tree(&name)?;
            let count = tree.len() as u64;
            segments.push(Segment { first, tree, count });
        }
        segments.sort_by_key(|s| s.first);
        let meta = db.open_tree("meta")?;
        let legacy_snapshot = db.open_tree("snapshot")?;
        let db_path = dir.join("db");
        let db_file = File::open(&db_path).map_err(io_error(&db_path))?;
        Ok(Sled {
            db,
            segments: Mutex::new(segments),
            meta,
            legacy_snapshot,
            db_file,
            db_path,
        })
    }

    fn segments(&self) -> MutexGuard<'_, Vec<Segment>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flush + fsync of the database file.
    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.db_file.sync_data().map_err(io_error(&self.db_path))
    }

    fn exec(&self, op: &Op) -> Result<(), StorageError> {
        match op {
            Op::Append(entries) => self.append(entries),
            Op::Truncate(from) => self.truncate(*from),
            Op::Purge(index) => self.purge(*index),
            Op::Meta(key, value) => Ok(self
                .meta
                .insert(key.as_bytes(), value.as_slice())
                .map(drop)?),
        }
    }

    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let Some((first, _)) = entries.first() else {
            return Ok(());
        };
        let mut segs = self.segments();
        let large = entries.iter().any(|(_, b)| b.len() >= LARGE_ENTRY);
        let full = segs.last().is_none_or(|s| s.count >= SEGMENT_ENTRIES);
        // Never a second segment of the same name (its tree is the same tree).
        let same = segs.last().is_some_and(|s| s.first == *first);
        if (large || full) && !same {
            let tree = self.db.open_tree(segment_name(*first))?;
            segs.push(Segment {
                first: *first,
                tree,
                count: 0,
            });
        }
        let seg = segs.last_mut().expect("a segment was just ensured");
        // Plain inserts, not a `sled::Batch`: an append needs no atomicity (it is
        // acknowledged only after the sync; a crash before it may keep a prefix of the
        // entries, which sled's recovery in log order gives and Raft allows), and each
        // batch made sled seal and write its I/O buffer twice on its thread pool, which
        // wakes all seven idle pool threads each time (~20 µs a wake-up on this VM).
        for (i, bytes) in entries {
            seg.tree.insert(i.to_be_bytes(), bytes.as_slice())?;
        }
        seg.count += entries.len() as u64;
        if large {
            // Close it: what follows goes to a fresh segment.
            seg.count = seg.count.max(SEGMENT_ENTRIES);
        }
        Ok(())
    }

    fn truncate(&self, from: u64) -> Result<(), StorageError> {
        let mut segs = self.segments();
        while segs.last().is_some_and(|s| s.first >= from) {
            let seg = segs.pop().expect("checked non-empty");
            self.db.drop_tree(segment_name(seg.first))?;
        }
        if let Some(seg) = segs.last_mut() {
            remove_range(&seg.tree, from.to_be_bytes()..)?;
        }
        Ok(())
    }

    fn purge(&self, index: u64) -> Result<(), StorageError> {
        let mut segs = self.segments();
        // Whole segments covered by the snapshot (the next one starts at or before
        // index + 1) are dropped; the segment being appended to is always kept.
        while segs.len() > 1 && segs[1].first <= index + 1 {
            let seg = segs.remove(0);
            self.db.drop_tree(segment_name(seg.first))?;
        }
        // The rest of a partly covered segment is removed key by key (at most one
        // segment's worth).
        if let Some(seg) = segs.first() {
            if seg.first <= index {
                remove_range(&seg.tree, ..=index.to_be_bytes())?;
            }
        }
        Ok(())
    }
}

/// The Raft snapshot's file in the data directory, and the one it is written as first.
const SNAPSHOT_FILE: &str = "raft-snapshot";
const SNAPSHOT_TMP: &str = "raft-snapshot.tmp";
/// Magic, then index, length and CRC-32 of the data (big-endian), then the data.
const SNAPSHOT_MAGIC: &[u8; 8] = b"PBXSNAP1";
const SNAPSHOT_HEADER: usize = 8 + 8 + 8 + 4;

/// [`LogStore`] on sled.
///
/// An I/O error (a full disk) closes the database: sled refuses every later operation
/// once one write failed. The writes accepted since the last sync are kept in memory
/// ([`Op`]), so [`LogStore::recover`] can reopen the database and give them to it again
/// when the disk has room: the node goes on without a restart and without losing what it
/// had accepted.
pub struct SledStore {
    dir: PathBuf,
    cache_bytes: u64,
    /// The open database, or why it is closed.
    live: RwLock<Result<Sled, String>>,
    /// Writes accepted since the last sync that succeeded, in order.
    unsynced: Mutex<Vec<Op>>,
    /// Blob files (sled's values over ~128 KiB, one file each) already fsynced.
    blobs_synced: Mutex<HashSet<OsString>>,
    /// One sync at a time: a sync counts the journal's writes it covers and drops
    /// exactly those when it is done.
    syncing: Mutex<()>,
    /// Bytes of free space below which appends and snapshots are refused.
    min_free: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SledStore {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore, StorageError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        // A snapshot cut short by a crash before its rename is garbage.
        let _ = std::fs::remove_file(dir.join(SNAPSHOT_TMP));
        let sled = Sled::open(dir, cache_bytes)?;
        // The directory's and sled's files' names durable from the first start on.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        let store = SledStore {
            dir: dir.to_path_buf(),
            cache_bytes,
            live: RwLock::new(Ok(sled)),
            unsynced: Mutex::new(Vec::new()),
            blobs_synced: Mutex::new(HashSet::new()),
            syncing: Mutex::new(()),
            min_free: DEFAULT_MIN_FREE,
        };
        // Blobs written before a crash may never have been fsynced.
        store.sync_blobs(store.blob_names())?;
        Ok(store)
    }

    /// Keeps `bytes` of the file system free: an append or snapshot that would leave
    /// less is refused with [`StorageError::DiskFull`] before anything is written. sled
    /// cannot be trusted to run out of space: a value it keeps in a blob file whose
    /// write fails wedges it (its close waits forever on the failed write, holding the
    /// database lock), so the store stops writing before the disk is full, as etcd
    /// stops at its quota. A disk filled by someone else still reaches sled: small
    /// writes close the store until there is room ([`LogStore::recover`]), a failed
    /// blob write is reported [`StorageError::Stuck`] (the node restarts).
    pub fn keep_free(mut self, bytes: u64) -> SledStore {
        self.min_free = bytes;
        self
    }

    /// Refuses a write of `bytes` that would leave less than the floor free.
    fn check_room(&self, bytes: u64) -> Result<(), StorageError> {
        check_room(&self.dir, self.min_free, bytes)
    }

    /// Bytes sled reports on disk, plus the snapshot file.
    pub fn size_on_disk(&self) -> u64 {
        let snapshot = std::fs::metadata(self.dir.join(SNAPSHOT_FILE)).map_or(0, |m| m.len());
        let sled = self.live().ok();
        let sled = sled.as_ref().and_then(|l| l.as_ref().ok());
        sled.map_or(0, |s| s.db.size_on_disk().unwrap_or(0)) + snapshot
    }

    #[cfg(test)]
    fn segment_firsts(&self) -> Vec<u64> {
        self.with(|sled| Ok(sled.segments().iter().map(|g| g.first).collect()))
            .unwrap()
    }

    fn live(&self) -> Result<RwLockReadGuard<'_, Result<Sled, String>>, StorageError> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        match &*live {
            Ok(_) => Ok(live),
            Err(reason) => Err(StorageError::Unavailable(reason.clone())),
        }
    }

    /// Runs `f` on the open database; an I/O error closes it (see [`SledStore`]).
    fn with<T>(&self, f: impl FnOnce(&Sled) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let res = {
            let live = self.live()?;
            f(live.as_ref().expect("checked open"))
        };
        res.map_err(|e| self.failed(e))
    }

    /// A write: done and remembered until synced, under one lock so a sync that
    /// counts the remembered writes counts only writes that are done.
    fn write(&self, op: Op) -> Result<(), StorageError> {
        let res = {
            let live = self.live()?;
            let mut unsynced = lock(&self.unsynced);
            let res = live.as_ref().expect("checked open").exec(&op);
            if res.is_ok() {
                unsynced.push(op);
            }
            res
        };
        res.map_err(|e| self.failed(e))
    }

    /// Closes the database after an I/O error, so nothing more is written to it.
    fn failed(&self, e: StorageError) -> StorageError {
        if !e.is_transient()
            || matches!(
                e,
                StorageError::Unavailable(_) | StorageError::DiskFull { .. }
            )
        {
            return e;
        }
        let reason = e.to_string();
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if live.is_ok() {
            let closed = std::mem::replace(&mut *live, Err(reason.clone()));
            // sled's drop flushes, and after a failed write that flush can wait for a
            // write that never completes: drop it aside, never under our lock. Until it
            // lets go of its file lock, `recover` cannot reopen (and says so).
            let _ = std::thread::Builder::new()
                .name("sled-close".into())
                .spawn(move || drop(closed));
        }
        StorageError::Unavailable(reason)
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    fn blob_names(&self) -> Vec<OsString> {
        std::fs::read_dir(self.blobs_dir())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
            .unwrap_or_default()
    }

    /// fsyncs the blob files in `names` not fsynced yet, then their directory. sled
    /// writes a blob completely before the log record that points at it, so a blob
    /// listed before a flush is whole once the flush returns.
    fn sync_blobs(&self, names: Vec<OsString>) -> Result<(), StorageError> {
        let mut synced = lock(&self.blobs_synced);
        let dir = self.blobs_dir();
        let mut new = false;
        for name in &names {
            if synced.contains(name) {
                continue;
            }
            let path = dir.join(name);
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(io_error(&path))?,
                // Removed by sled since the listing: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&path)(e)),
            }
            synced.insert(name.clone());
            new = true;
        }
        if new {
            sync_dir(&dir)?;
        }
        let listed: HashSet<&OsString> = names.iter().collect();
        synced.retain(|n| listed.contains(n));
        Ok(())
    }

    fn read_snapshot_file(&self, path: &Path) -> Result<(u64, Vec<u8>), StorageError> {
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        let torn = |why: &str| {
            StorageError::Foreign {
            path: path.to_path_buf(),
            reason: format!(
                "the Raft snapshot is unreadable ({why}): wipe the directory and let the node catch up from the others"
            ),
        }
        };
        if bytes.len() < SNAPSHOT_HEADER || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(torn("no snapshot header"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let index = u64_at(8);
        let len = u64_at(16);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[24..28]);
        let data = &bytes[SNAPSHOT_HEADER..];
        if data.len() as u64 != len {
            return Err(torn(&format!(
                "{} bytes of data, the header says {len}",
                data.len()
            )));
        }
        if crc32fast::hash(data) != u32::from_be_bytes(crc) {
            return Err(torn("checksum mismatch"));
        }
        Ok((index, data.to_vec()))
    }
}

impl LogStore for SledStore {
    fn sync(&self) -> Result<(), StorageError> {
        let _one = lock(&self.syncing);
        let res = {
            let live = self.live()?;
            let sled = live.as_ref().expect("checked open");
            let done = lock(&self.unsynced).len();
            // Listed before the flush: see sync_blobs.
            let blobs = self.blob_names();
            sled.flush()
                .and_then(|()| self.sync_blobs(blobs))
                .map(|()| drop(lock(&self.unsynced).drain(..done)))
        };
        res.map_err(|e| self.failed(e))
    }

    fn append_buffered(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.check_room(entries.iter().map(|(_, b)| b.len() as u64).sum())?;
        self.write(Op::Append(entries.to_vec()))
    }

    fn entries_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.with(|sled| {
            let segs = sled.segments();
            let mut out = Vec::new();
            if from >= to {
                return Ok(out);
            }
            for (i, seg) in segs.iter().enumerate() {
                // Skip segments that end before `from` or start at or after `to`.
                if segs.get(i + 1).is_some_and(|next| next.first <= from) {
                    continue;
                }
                if seg.first >= to {
                    break;
                }
                for r in seg.tree.range(from.to_be_bytes()..to.to_be_bytes()) {
                    let (k, v) = r?;
                    out.push((index_of(&k)?, v.to_vec()));
                }
            }
            Ok(out)
        })
    }

    fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        self.write(Op::Truncate(from))?;
        self.sync()
    }

    fn last_index(&self) -> Result<Option<u64>, StorageError> {
        self.with(|sled| {
            for seg in sled.segments().iter().rev() {
                if let Some((k, _)) = seg.tree.last()? {
                    return Ok(Some(index_of(&k)?));
                }
            }
            Ok(None)
        })
    }

    fn save_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StorageError> {
        // Written aside, fsynced, renamed over the old one, directory fsynced: a crash
        // or power cut leaves the old snapshot or the new one, never a mix.
        self.check_room(data.len() as u64)?;
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let path = self.dir.join(SNAPSHOT_FILE);
        write_aside(&tmp, &path, |f| {
            f.write_all(SNAPSHOT_MAGIC)?;
            f.write_all(&index.to_be_bytes())?;
            f.write_all(&(data.len() as u64).to_be_bytes())?;
            f.write_all(&crc32fast::hash(data).to_be_bytes())?;
            f.write_all(data)
        })?;
        // The snapshot no longer lives in sled (data format 1 kept it there).
        self.with(|sled| Ok(sled.legacy_snapshot.remove(LEGACY_SNAPSHOT_KEY).map(drop)?))
    }

    fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        if path.exists() {
            return self.read_snapshot_file(&path).map(Some);
        }
        self.with(|sled| {
            let Some(v) = sled.legacy_snapshot.get(LEGACY_SNAPSHOT_KEY)? else {
                return Ok(None);
            };
            if v.len() < 8 {
                return Err(StorageError::Corrupt("snapshot record too short".into()));
            }
            let mut idx = [0u8; 8];
            idx.copy_from_slice(&v[..8]);
            Ok(Some((u64::from_be_bytes(idx), v[8..].to_vec())))
        })
    }

    fn snapshot_index(&self) -> Result<Option<u64>, StorageError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let mut head = [0u8; 16];
        match File::open(&path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)) {
            Ok(()) if &head[..8] == SNAPSHOT_MAGIC => {
                let mut index = [0u8; 8];
                index.copy_from_slice(&head[8..16]);
                Ok(Some(u64::from_be_bytes(index)))
            }
            // Missing (a format-1 store, or none yet) or unreadable: the full read says
            // which, with the path.
            _ => Ok(self.load_snapshot()?.map(|(index, _)| index)),
        }
    }

    fn purge_through(&self, index: u64) -> Result<(), StorageError> {
        // Purging is not an acknowledgement: no fsync needed, the next sync makes it
        // durable along with its own writes.
        self.write(Op::Purge(index))
    }

    fn put_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StorageError> {
        self.write(Op::Meta(key.to_string(), value.to_vec()))?;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.with(|sled| Ok(sled.meta.get(key.as_bytes())?.map(|v| v.to_vec())))
    }

    fn recover(&self) -> Result<(), StorageError> {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if live.is_ok() {
            return Ok(());
        }
        // The closed database was dropped when it failed (`failed`), which releases its
        // file lock once sled's threads let go: until then opening fails and is retried.
        let sled = match Sled::open(&self.dir, self.cache_bytes) {
            Ok(sled) => sled,
            // The closed database's lock not released (see `Stuck`).
            Err(StorageError::Sled(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                return Err(StorageError::Stuck(format!("reopening: {e}")))
            }
            // Still no room.
            Err(StorageError::Sled(sled::Error::Io(e))) => {
                return Err(StorageError::Unavailable(format!("reopening: {e}")))
            }
            Err(e) => return Err(e),
        };
        let mut unsynced = lock(&self.unsynced);
        let replayed = (|| {
            // What the closed database flushed of these writes on its way out may sit
            // in other segments than a replay would choose: clear from the first
            // appended index, then write them again in order. (An append at i means
            // nothing at or after i was kept: Raft appends after its last entry or
            // after a truncation.)
            if let Some(first) = unsynced
                .iter()
                .filter_map(|op| match op {
                    Op::Append(entries) => entries.first().map(|e| e.0),
                    _ => None,
                })
                .min()
            {
                sled.truncate(first)?;
            }
            for op in unsynced.iter() {
                sled.exec(op)?;
            }
            sled.flush()?;
            self.sync_blobs(self.blob_names())
        })();
        if let Err(e) = replayed {
            return Err(if e.is_transient() {
                StorageError::Unavailable(e.to_string())
            } else {
                e
            });
        }
        unsynced.clear();
        *live = Ok(sled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indexes of a list of entries.
    fn idx(v: Vec<(u64, Vec<u8>)>) -> Vec<u64> {
        v.into_iter().map(|e| e.0).collect()
    }

    /// Reopens a store in the same process: sled's I/O threads release the file lock a
    /// moment after the last handle is dropped, so wait for it (bounded).
    fn reopen(dir: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir, 8 << 20) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("store still locked: {e}"),
            }
        }
    }

    #[test]
    fn log_snapshot_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(s.last_index().unwrap(), None);
            s.append(&[(1, b"a".to_vec()), (2, b"b".to_vec())]).unwrap();
            s.append(&[(3, b"c".to_vec())]).unwrap();
            assert_eq!(s.last_index().unwrap(), Some(3));
            s.save_snapshot(2, b"state@2").unwrap();
            s.purge_through(2).unwrap();
            s.put_meta("node", b"1", true).unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.entries_from(0).unwrap(), vec![(3, b"c".to_vec())]);
        assert_eq!(s.load_snapshot().unwrap(), Some((2, b"state@2".to_vec())));
        assert_eq!(s.get_meta("node").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get_meta("none").unwrap(), None);
    }

    #[test]
    fn segments_roll_over_and_purge_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let n = SEGMENT_ENTRIES * 3 + 10;
        let purge = SEGMENT_ENTRIES * 2 + 500;
        {
            let s = SledStore::open(dir.path(), 8 << 20).unwrap();
            let mut i = 1;
            while i <= n {
                let batch: Vec<(u64, Vec<u8>)> = (i..(i + 1000).min(n + 1))
                    .map(|k| (k, k.to_be_bytes().to_vec()))
                    .collect();
                i += batch.len() as u64;
                s.append(&batch).unwrap();
            }
            assert!(s.segment_firsts().len() >= 3);
            assert_eq!(s.last_index().unwrap(), Some(n));
            s.purge_through(purge).unwrap();
            let left = s.entries_from(0).unwrap();
            assert_eq!(left.first().map(|e| e.0), Some(purge + 1));
            assert_eq!(left.len() as u64, n - purge);
            assert_eq!(s.entries_from(n - 5).unwrap().len(), 6);
        }
        // Reopened: the same log, and appends continue.
        let s = reopen(dir.path());
        assert_eq!(s.last_index().unwrap(), Some(n));
        assert_eq!(s.entries_from(0).unwrap().len() as u64, n - purge);
        s.append(&[(n + 1, vec![1])]).unwrap();
        assert_eq!(s.last_index().unwrap(), Some(n + 1));
    }

    #[test]
    fn large_entries_get_a_segment_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8 << 20).unwrap();
        s.append(&[(1, vec![1]), (2, vec![2])]).unwrap();
        s.append(&[(3, vec![0; LARGE_ENTRY * 4])]).unwrap();
        s.append(&[(4, vec![4])]).unwrap();
        s.append(&[(5, vec![5])]).unwrap();
        let firsts = s.segment_firsts();
        assert_eq!(firsts, vec![1, 3, 4], "the large entry stands alone");
        assert_eq!(idx(s.entries_from(2).unwrap()), vec![2, 3, 4, 5]);
        s.purge_through(3).unwrap();
        assert_eq!(idx(s.entries_from(0).unwrap()), vec![4, 5]);
    }

    #[test]
    fn truncate_and_ranges_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8 << 20).unwrap();
        s.append(&[(1, vec![1]), (2, vec![2])]).unwrap();
        s.append(&[(3, vec![0; LARGE_ENTRY])]).unwrap();
        s.append(&[(4, vec![4]), (5, vec![5]), (6, vec![6])])
            .unwrap();
        assert_eq!(idx(s.entries_range(2, 5).unwrap()), vec![2, 3, 4]);
        assert_eq!(idx(s.entries_range(5, 5).unwrap()), Vec::<u64>::new());
        s.truncate_from(5).unwrap();
        assert_eq!(s.last_index().unwrap(), Some(4));
        s.truncate_from(3).unwrap();
        assert_eq!(idx(s.entries_from(0).unwrap()), vec![1, 2]);
        // Appending after a truncation continues the log, overwriting nothing stale.
        s.append(&[(3, vec![33])]).unwrap();
        assert_eq!(s.entries_range(3, 4).unwrap(), vec![(3, vec![33])]);
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(idx(s.entries_from(0).unwrap()), vec![1, 2, 3]);
    }

    #[test]
    fn entries_are_ordered_numerically() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8 << 20).unwrap();
        s.append(&[(256, vec![2]), (1, vec![1]), (65536, vec![3])])
            .unwrap();
        assert_eq!(idx(s.entries_from(0).unwrap()), vec![1, 256, 65536]);
    }

    #[test]
    fn a_store_that_does_not_open_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        {
            let s = SledStore::open(&path, 1 << 20).unwrap();
            s.append(&[(1, vec![7; 100]), (2, vec![8; 100])]).unwrap();
        }
        // Garbage where sled's configuration and data were.
        std::fs::write(path.join("conf"), b"\x00\x01garbage").unwrap();
        std::fs::write(path.join("db"), vec![0xa5u8; 4096]).unwrap();
        let e = match SledStore::open(&path, 1 << 20) {
            Ok(_) => panic!("a torn store opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn the_snapshot_is_a_checksummed_file_and_a_torn_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SNAPSHOT_FILE);
        {
            let s = SledStore::open(dir.path(), 1 << 20).unwrap();
            s.save_snapshot(7, &vec![3u8; 300_000]).unwrap();
            s.save_snapshot(9, b"state@9").unwrap();
            assert_eq!(s.load_snapshot().unwrap(), Some((9, b"state@9".to_vec())));
            assert!(!dir.path().join(SNAPSHOT_TMP).exists());
        }
        assert_eq!(
            reopen(dir.path()).load_snapshot().unwrap(),
            Some((9, b"state@9".to_vec()))
        );
        let good = std::fs::read(&file).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        for (bytes, why) in [
            (flipped, "checksum mismatch"),
            (good[..good.len() - 2].to_vec(), "the header says 7"),
            (b"PBXS".to_vec(), "no snapshot header"),
        ] {
            std::fs::write(&file, bytes).unwrap();
            let e = reopen(dir.path()).load_snapshot().unwrap_err().to_string();
            assert!(
                e.contains(&file.display().to_string()) && e.contains(why),
                "{e}"
            );
        }
        // A temporary file left by a crash before the rename is thrown away.
        std::fs::write(&file, &good).unwrap();
        std::fs::write(dir.path().join(SNAPSHOT_TMP), b"half").unwrap();
        let s = reopen(dir.path());
        assert!(!dir.path().join(SNAPSHOT_TMP).exists());
        assert_eq!(s.load_snapshot().unwrap().unwrap().0, 9);
    }

    #[test]
    fn a_snapshot_kept_in_sled_by_format_1_is_read_and_moved_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 1 << 20).unwrap();
        let mut old = 4u64.to_be_bytes().to_vec();
        old.extend_from_slice(b"state@4");
        s.with(|sled| {
            Ok(sled
                .legacy_snapshot
                .insert(LEGACY_SNAPSHOT_KEY, old)
                .map(drop)?)
        })
        .unwrap();
        assert_eq!(s.load_snapshot().unwrap(), Some((4, b"state@4".to_vec())));
        s.save_snapshot(6, b"state@6").unwrap();
        let legacy = s
            .with(|sled| Ok(sled.legacy_snapshot.get(LEGACY_SNAPSHOT_KEY)?))
            .unwrap();
        assert!(legacy.is_none());
        assert_eq!(s.load_snapshot().unwrap(), Some((6, b"state@6".to_vec())));
    }

    #[test]
    fn values_sled_keeps_as_blob_files_are_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 1 << 20).unwrap();
        // Large enough for sled to write it to a file of its own.
        s.append(&[(1, vec![9u8; 400_000])]).unwrap();
        let blobs = s.blob_names();
        assert!(!blobs.is_empty(), "sled wrote no blob file");
        let synced = lock(&s.blobs_synced);
        for b in &blobs {
            assert!(synced.contains(b), "{b:?} was not fsynced");
        }
    }

    /// A small tmpfs, unmounted when dropped; None (the test skipped) without root.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount(size: &str) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                eprintln!("skipped: mounting a tmpfs needs root");
                return None;
            }
            Some(SmallDisk(dir))
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// A full disk (a small tmpfs): the store closes on the I/O error, and once there
    /// is room again it reopens with every write it had accepted, synced or not.
    #[test]
    fn a_full_disk_closes_the_store_and_it_comes_back_with_what_it_accepted() {
        let Some(disk) = SmallDisk::mount("6m") else {
            return;
        };
        let dir = &disk.0;
        let ballast = dir.path().join("ballast");
        std::fs::write(&ballast, vec![0u8; 3 << 20]).unwrap();
        let path = dir.path().join("state");
        // No floor: sled itself runs out of space (small values, no blob files).
        let s = SledStore::open(&path, 1 << 20).unwrap().keep_free(0);
        let entry = |i: u64| (i, vec![(i % 251) as u8; 2000]);
        // Every entry the store takes is accepted (a sync that fails afterwards does not
        // take it back: it is written again on recovery); every fourth is synced.
        let mut accepted = 0u64;
        let err = loop {
            let i = accepted + 1;
            let res = s.append_buffered(&[entry(i)]).and_then(|()| {
                accepted = i;
                if i.is_multiple_of(4) {
                    s.sync()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                break e;
            }
            assert!(accepted < 100_000, "the disk never filled");
        };
        assert!(err.is_transient(), "{err}");
        let e = s.last_index().unwrap_err();
        assert!(matches!(e, StorageError::Unavailable(_)), "{e}");
        assert!(s.recover().is_err(), "recovered with the disk still full");
        std::fs::remove_file(&ballast).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(e) = s.recover() {
            assert!(std::time::Instant::now() < deadline, "no recovery: {e}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let want: Vec<u64> = (1..=accepted).collect();
        assert_eq!(idx(s.entries_from(0).unwrap()), want);
        s.append(&[entry(accepted + 1)]).unwrap();
        drop(s);
        let s = reopen(&path);
        assert_eq!(s.last_index().unwrap(), Some(accepted + 1));
        assert_eq!(s.entries_range(3, 4).unwrap(), vec![entry(3)]);
    }

    /// The floor: a disk that gets full is noticed before sled writes anything (a
    /// value large enough for a blob file of its own would wedge sled on ENOSPC). The
    /// write is refused, the store stays open for reads and small writes, and takes
    /// the write once there is room again.
    #[test]
    fn writes_stop_at_the_free_space_floor_and_resume_when_there_is_room() {
        let Some(disk) = SmallDisk::mount("8m") else {
            return;
        };
        let path = disk.0.path().join("state");
        let s = SledStore::open(&path, 1 << 20).unwrap().keep_free(2 << 20);
        s.append(&[(1, vec![1u8; 100])]).unwrap();
        // Room for the floor but not for the floor and this entry.
        let big = (2, vec![7u8; 400_000]);
        let free = |s: &SledStore| {
            let st = nix::sys::statvfs::statvfs(&s.dir).unwrap();
            st.blocks_available() as u64 * st.fragment_size() as u64
        };
        let ballast = disk.0.path().join("ballast");
        let leave = (2 << 20) + 200_000;
        std::fs::write(&ballast, vec![0u8; (free(&s) - leave) as usize]).unwrap();
        let err = s.append_buffered(std::slice::from_ref(&big)).unwrap_err();
        assert!(
            matches!(err, StorageError::DiskFull { .. }) && err.is_transient(),
            "{err}"
        );
        assert!(err.to_string().contains("storage.min_free_mb"), "{err}");
        // Nothing written, nothing closed.
        assert_eq!(s.last_index().unwrap(), Some(1));
        s.put_meta("vote", b"v", true).unwrap();
        assert!(matches!(
            s.save_snapshot(1, &[0u8; 300_000]),
            Err(StorageError::DiskFull { .. })
        ));
        std::fs::remove_file(&ballast).unwrap();
        s.recover().unwrap();
        s.append(std::slice::from_ref(&big)).unwrap();
        assert_eq!(s.entries_from(2).unwrap(), vec![big]);
        drop(s);
        let s = reopen(&path);
        assert_eq!(s.last_index().unwrap(), Some(2));
        assert_eq!(s.get_meta("vote").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
