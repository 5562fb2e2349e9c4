//! [`MemStore`]: the [`LogStore`] in memory, for tests (in-process clusters, openraft's
//! storage suite, durability tests). It keeps two copies: what reads see, and what a
//! disk would hold after the last sync. [`MemStore::power_loss`] throws away everything
//! not synced, so a test can check that what was acknowledged was durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::{LogStore, StorageError};

#[derive(Default, Clone)]
struct Inner {
    log: BTreeMap<u64, Vec<u8>>,
    snapshot: Option<(u64, Vec<u8>)>,
    meta: HashMap<String, Vec<u8>>,
}

/// One write, as the journal of what is not synced yet holds it.
enum Write {
    Entry(u64, Vec<u8>),
    TruncateFrom(u64),
    PurgeThrough(u64),
    Snapshot(u64, Vec<u8>),
    Meta(String, Vec<u8>),
}

impl Inner {
    fn apply(&mut self, w: &Write) {
        match w {
            Write::Entry(i, bytes) => {
                self.log.insert(*i, bytes.clone());
            }
            Write::TruncateFrom(from) => {
                self.log.split_off(from);
            }
            Write::PurgeThrough(index) => {
                self.log = self.log.split_off(&index.saturating_add(1));
            }
            Write::Snapshot(index, data) => self.snapshot = Some((*index, data.clone())),
            Write::Meta(key, value) => {
                self.meta.insert(key.clone(), value.clone());
            }
        }
    }
}

#[derive(Default)]
struct Disk {
    /// What reads see.
    visible: Inner,
    /// What survives a power loss.
    durable: Inner,
    /// Writes since the last sync, in order.
    unsynced: Vec<Write>,
    /// Set while the disk fails (see [`MemStore::fail`]).
    failing: Option<String>,
}

impl Disk {
    fn write(&mut self, w: Write) {
        self.visible.apply(&w);
        self.unsynced.push(w);
    }

    fn sync(&mut self) {
        for w in self.unsynced.drain(..) {
            self.durable.apply(&w);
        }
    }
}

/// A [`LogStore`] in memory.
#[derive(Default)]
pub struct MemStore {
    disk: Mutex<Disk>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A panic elsewhere leaves the maps consistent: every change is one call.
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power fails: every write since the last sync is lost, as the page cache
    /// would be.
    pub fn power_loss(&self) {
        let mut disk = self.disk();
        disk.unsynced.clear();
        disk.visible = disk.durable.clone();
    }

    /// The disk fails (`Some(reason)`: every operation is refused as
    /// [`StorageError::Unavailable`], as a closed [`crate::SledStore`] refuses them after
    /// an I/O error) or works again (`None`). What was written before stays.
    pub fn fail(&self, reason: Option<&str>) {
        self.disk().failing = reason.map(str::to_string);
    }

    fn usable(&self) -> Result<MutexGuard<'_, Disk>, StorageError> {
        let disk = self.disk();
        match &disk.failing {
            Some(reason) => Err(StorageError::Unavailable(reason.clone())),
            None => Ok(disk),
        }
    }

    /// Writes not made durable yet.
    #[cfg(test)]
    fn unsynced_writes(&self) -> usize {
        self.disk().unsynced.len()
    }
}

impl LogStore for MemStore {
    fn append_buffered(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let mut disk = self.usable()?;
        for (i, bytes) in entries {
            disk.write(Write::Entry(*i, bytes.clone()));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.usable()?.sync();
        Ok(())
    }

    fn entries_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .disk()
            .visible
            .log
            .range(from..to)
            .map(|(i, b)| (*i, b.clone()))
            .collect())
    }

    fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        let mut disk = self.usable()?;
        disk.write(Write::TruncateFrom(from));
        disk.sync();
        Ok(())
    }

    fn last_index(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.usable()?.visible.log.keys().next_back().copied())
    }

    fn save_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut disk = self.usable()?;
        disk.write(Write::Snapshot(index, data.to_vec()));
        disk.sync();
        Ok(())
    }

    fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        Ok(self.usable()?.visible.snapshot.clone())
    }

    /// Not synced, as on sled: purging acknowledges nothing (the purge point is
    /// recorded durably first, see pbx-raft).
    fn purge_through(&self, index: u64) -> Result<(), StorageError> {
        self.usable()?.write(Write::PurgeThrough(index));
        Ok(())
    }

    fn put_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StorageError> {
        let mut disk = self.usable()?;
        disk.write(Write::Meta(key.to_string(), value.to_vec()));
        if durable {
            disk.sync();
        }
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.usable()?.visible.meta.get(key).cloned())
    }

    fn recover(&self) -> Result<(), StorageError> {
        self.usable().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_truncate_snapshot_purge_and_meta() {
        let s = MemStore::new();
        assert_eq!(s.last_index().unwrap(), None);
        s.append(&[(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())])
            .unwrap();
        assert_eq!(s.entries_range(2, 3).unwrap(), vec![(2, b"b".to_vec())]);
        assert_eq!(s.entries_range(3, 1).unwrap(), Vec::new());
        s.truncate_from(3).unwrap();
        assert_eq!(s.last_index().unwrap(), Some(2));
        s.save_snapshot(1, b"state@1").unwrap();
        s.purge_through(1).unwrap();
        assert_eq!(s.entries_from(0).unwrap(), vec![(2, b"b".to_vec())]);
        assert_eq!(s.load_snapshot().unwrap(), Some((1, b"state@1".to_vec())));
        s.purge_through(u64::MAX).unwrap();
        assert_eq!(s.last_index().unwrap(), None);
        s.put_meta("vote", b"1", true).unwrap();
        assert_eq!(s.get_meta("vote").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get_meta("none").unwrap(), None);
    }

    #[test]
    fn a_power_loss_keeps_what_was_synced_only() {
        let s = MemStore::new();
        s.append(&[(1, b"a".to_vec()), (2, b"b".to_vec())]).unwrap();
        // A durable write syncs everything before it, as an fsync does.
        s.put_meta("vote", b"1", true).unwrap();
        s.append_buffered(&[(3, b"c".to_vec())]).unwrap();
        s.put_meta("committed", b"2", false).unwrap();
        s.purge_through(1).unwrap();
        assert_eq!(s.unsynced_writes(), 3);
        s.power_loss();
        assert_eq!(s.last_index().unwrap(), Some(2), "entry 3 was never synced");
        assert_eq!(
            s.entries_from(0).unwrap().len(),
            2,
            "the purge was not synced"
        );
        assert_eq!(s.get_meta("vote").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get_meta("committed").unwrap(), None);
        s.truncate_from(2).unwrap();
        s.save_snapshot(1, b"state@1").unwrap();
        s.power_loss();
        assert_eq!(s.last_index().unwrap(), Some(1));
        assert_eq!(s.load_snapshot().unwrap(), Some((1, b"state@1".to_vec())));
    }
}
