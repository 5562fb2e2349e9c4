//! [`MemStore`]: the [`LogStore`] in memory, for tests (in-process clusters, openraft's
//! storage suite). Nothing survives the process; "durable" means "stored".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::{LogStore, StorageError};

#[derive(Default)]
struct Inner {
    log: BTreeMap<u64, Vec<u8>>,
    snapshot: Option<(u64, Vec<u8>)>,
    meta: HashMap<String, Vec<u8>>,
}

/// A [`LogStore`] in memory.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves the maps consistent: every change is one call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for MemStore {
    fn append_buffered(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        let mut inner = self.inner();
        for (i, bytes) in entries {
            inner.log.insert(*i, bytes.clone());
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn entries_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .inner()
            .log
            .range(from..to)
            .map(|(i, b)| (*i, b.clone()))
            .collect())
    }

    fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        self.inner().log.split_off(&from);
        Ok(())
    }

    fn last_index(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.inner().log.keys().next_back().copied())
    }

    fn save_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StorageError> {
        self.inner().snapshot = Some((index, data.to_vec()));
        Ok(())
    }

    fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        Ok(self.inner().snapshot.clone())
    }

    fn purge_through(&self, index: u64) -> Result<(), StorageError> {
        let mut inner = self.inner();
        inner.log = inner.log.split_off(&index.saturating_add(1));
        Ok(())
    }

    fn put_meta(&self, key: &str, value: &[u8], _durable: bool) -> Result<(), StorageError> {
        self.inner().meta.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner().meta.get(key).cloned())
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
}
