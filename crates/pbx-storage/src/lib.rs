//! Durable storage behind a small trait. This is the only crate that knows sled.
//!
//! The shape is a command log plus a snapshot, which is what the Raft log store and
//! state-machine store (pbx-raft) sit on: entries are appended in index order and are durable
//! (flushed *and* fsynced) when `append` returns; a snapshot covers every entry up to its
//! index, after which those entries can be purged. [`SledStore`] is the store on disk,
//! [`MemStore`] the one in memory for tests.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod identity;
mod mem;

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
    /// Removes entries with index <= `index` (they are covered by a snapshot).
    fn purge_through(&self, index: u64) -> Result<(), StorageError>;
    /// Stores a small value; durable on return when `durable` (a vote), otherwise with
    /// the next durable write (a commit index hint that may lag after a crash).
    fn put_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StorageError>;
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
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

/// [`LogStore`] on sled.
pub struct SledStore {
    db: sled::Db,
    segments: Mutex<Vec<Segment>>,
    meta: sled::Tree,
    /// The snapshot lives alone in its tree (see LARGE_ENTRY).
    snapshot: sled::Tree,
    /// The database file, for fsync: sled's flush ends in sync_file_range, which does
    /// not make the data durable on its own (sled issue 1452).
    db_file: Mutex<File>,
    db_path: PathBuf,
}

const SNAPSHOT_KEY: &[u8] = b"snapshot";

impl SledStore {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
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
        let snapshot = db.open_tree("snapshot")?;
        let db_path = dir.join("db");
        let db_file = File::open(&db_path).map_err(|source| StorageError::Io {
            path: db_path.clone(),
            source,
        })?;
        Ok(SledStore {
            db,
            segments: Mutex::new(segments),
            meta,
            snapshot,
            db_file: Mutex::new(db_file),
            db_path,
        })
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl SledStore {
    fn segments(&self) -> std::sync::MutexGuard<'_, Vec<Segment>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for SledStore {
    fn sync(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        let f = self.db_file.lock().unwrap_or_else(|e| e.into_inner());
        f.sync_data().map_err(|source| StorageError::Io {
            path: self.db_path.clone(),
            source,
        })
    }

    fn append_buffered(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let Some((first, _)) = entries.first() else {
            return Ok(());
        };
        {
            let mut segs = self.segments();
            let large = entries.iter().any(|(_, b)| b.len() >= LARGE_ENTRY);
            if large || segs.last().is_none_or(|s| s.count >= SEGMENT_ENTRIES) {
                let tree = self.db.open_tree(segment_name(*first))?;
                segs.push(Segment {
                    first: *first,
                    tree,
                    count: 0,
                });
            }
            let seg = segs.last_mut().expect("a segment was just ensured");
            let mut batch = sled::Batch::default();
            for (i, bytes) in entries {
                batch.insert(&i.to_be_bytes(), bytes.as_slice());
            }
            seg.tree.apply_batch(batch)?;
            seg.count += entries.len() as u64;
            if large {
                // Close it: what follows goes to a fresh segment.
                seg.count = seg.count.max(SEGMENT_ENTRIES);
            }
        }
        Ok(())
    }

    fn entries_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let segs = self.segments();
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
    }

    fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        {
            let mut segs = self.segments();
            while segs.last().is_some_and(|s| s.first >= from) {
                let seg = segs.pop().expect("checked non-empty");
                self.db.drop_tree(segment_name(seg.first))?;
            }
            if let Some(seg) = segs.last_mut() {
                remove_range(&seg.tree, from.to_be_bytes()..)?;
            }
        }
        self.sync()
    }

    fn last_index(&self) -> Result<Option<u64>, StorageError> {
        for seg in self.segments().iter().rev() {
            if let Some((k, _)) = seg.tree.last()? {
                return Ok(Some(index_of(&k)?));
            }
        }
        Ok(None)
    }

    fn save_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut v = Vec::with_capacity(8 + data.len());
        v.extend_from_slice(&index.to_be_bytes());
        v.extend_from_slice(data);
        self.snapshot.insert(SNAPSHOT_KEY, v)?;
        self.sync()
    }

    fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some(v) = self.snapshot.get(SNAPSHOT_KEY)? else {
            return Ok(None);
        };
        if v.len() < 8 {
            return Err(StorageError::Corrupt("snapshot record too short".into()));
        }
        let mut idx = [0u8; 8];
        idx.copy_from_slice(&v[..8]);
        Ok(Some((u64::from_be_bytes(idx), v[8..].to_vec())))
    }

    fn purge_through(&self, index: u64) -> Result<(), StorageError> {
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
        // Purging is not an acknowledgement: no fsync needed, the next append makes it
        // durable along with its own entries.
        Ok(())
    }

    fn put_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StorageError> {
        self.meta.insert(key.as_bytes(), value)?;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.meta.get(key.as_bytes())?.map(|v| v.to_vec()))
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
            assert!(s.segments().len() >= 3);
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
        let firsts: Vec<u64> = s.segments().iter().map(|g| g.first).collect();
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
}

#[cfg(test)]
mod open_tests {
    use super::*;

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
}
