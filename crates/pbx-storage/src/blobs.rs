//! Immutable blobs named by the SHA-256 of their content, beside the Raft store:
//! voicemail messages and greetings (ADR 0014). Audio never goes through the Raft log;
//! only its name does.
//!
//! A blob is written as the snapshot file is: to a temporary name, fsynced, renamed,
//! its directory fsynced — durable on return, whole or absent after a crash — and it
//! is checked against its name when read, so a torn or rotten file is never played.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::{io_error, lock, sync_dir, StorageError};

/// A blob's name: the SHA-256 of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

impl BlobId {
    /// The name of `data`.
    pub fn of(data: &[u8]) -> BlobId {
        BlobId(Sha256::digest(data).into())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<BlobId, StorageError> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id)
            .map_err(|e| StorageError::Corrupt(format!("blob name {s:?}: {e}")))?;
        Ok(BlobId(id))
    }
}

/// Where a node keeps blobs.
pub trait BlobStore: Send + Sync {
    /// Stores `data`, durable on return; its name. Storing a blob already held is a
    /// no-op (same name, same content).
    fn put(&self, data: &[u8]) -> Result<BlobId, StorageError>;
    /// The blob, checked against its name; `None` when this node does not hold it.
    fn get(&self, id: &BlobId) -> Result<Option<Vec<u8>>, StorageError>;
    /// Whether this node holds the blob (not read).
    fn contains(&self, id: &BlobId) -> bool;
    /// Removes the blob (durable on return); removing one not held is not an error.
    fn remove(&self, id: &BlobId) -> Result<(), StorageError>;
    /// Every blob held, in name order.
    fn list(&self) -> Result<Vec<BlobId>, StorageError>;
}

/// Blobs as files: `dir/ab/abcdef…` (the first byte of the name as a subdirectory, so
/// no directory grows past a few thousand entries).
pub struct FileBlobs {
    dir: PathBuf,
    /// Free space a write must leave (see [`crate::SledStore::keep_free`]).
    min_free: u64,
    /// Serialises the temporary file's name per store (puts of one blob race otherwise).
    writing: Mutex<()>,
}

const TMP_SUFFIX: &str = ".tmp";

impl FileBlobs {
    /// Opens (creates) the store in `dir`; temporary files a crash left are removed.
    pub fn open(dir: &Path) -> Result<FileBlobs, StorageError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        let blobs = FileBlobs {
            dir: dir.to_path_buf(),
            min_free: crate::DEFAULT_MIN_FREE,
            writing: Mutex::new(()),
        };
        for sub in blobs.subdirs()? {
            for entry in std::fs::read_dir(&sub).map_err(io_error(&sub))?.flatten() {
                if entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(blobs)
    }

    /// Keeps `bytes` of the file system free: a put that would leave less is refused
    /// with [`StorageError::DiskFull`] before anything is written.
    pub fn keep_free(mut self, bytes: u64) -> FileBlobs {
        self.min_free = bytes;
        self
    }

    fn path(&self, id: &BlobId) -> PathBuf {
        let name = id.to_string();
        self.dir.join(&name[..2]).join(name)
    }

    fn subdirs(&self) -> Result<Vec<PathBuf>, StorageError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .map_err(io_error(&self.dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

impl BlobStore for FileBlobs {
    fn put(&self, data: &[u8]) -> Result<BlobId, StorageError> {
        let id = BlobId::of(data);
        let path = self.path(&id);
        if path.exists() {
            return Ok(id);
        }
        crate::check_room(&self.dir, self.min_free, data.len() as u64)?;
        let _writing = lock(&self.writing);
        let sub = path.parent().unwrap_or(&self.dir).to_path_buf();
        // A new subdirectory's name made durable in the store's directory first.
        let new_sub = !sub.exists();
        std::fs::create_dir_all(&sub).map_err(io_error(&sub))?;
        if new_sub {
            sync_dir(&self.dir)?;
        }
        let tmp = sub.join(format!("{id}{TMP_SUFFIX}"));
        crate::write_aside(&tmp, &path, |f| f.write_all(data))?;
        Ok(id)
    }

    fn get(&self, id: &BlobId) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.path(id);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data).map_err(io_error(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        }
        if BlobId::of(&data) != *id {
            return Err(StorageError::Corrupt(format!(
                "{}: its content does not match its name",
                path.display()
            )));
        }
        Ok(Some(data))
    }

    fn contains(&self, id: &BlobId) -> bool {
        self.path(id).exists()
    }

    fn remove(&self, id: &BlobId) -> Result<(), StorageError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<BlobId>, StorageError> {
        let mut out = Vec::new();
        for sub in self.subdirs()? {
            for entry in std::fs::read_dir(&sub).map_err(io_error(&sub))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Ok(id) = name.parse::<BlobId>() {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Blobs in memory, for tests of what uses a [`BlobStore`].
#[derive(Default)]
pub struct MemBlobs(Mutex<std::collections::BTreeMap<BlobId, Vec<u8>>>);

impl BlobStore for MemBlobs {
    fn put(&self, data: &[u8]) -> Result<BlobId, StorageError> {
        let id = BlobId::of(data);
        lock(&self.0).entry(id).or_insert_with(|| data.to_vec());
        Ok(id)
    }

    fn get(&self, id: &BlobId) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(lock(&self.0).get(id).cloned())
    }

    fn contains(&self, id: &BlobId) -> bool {
        lock(&self.0).contains_key(id)
    }

    fn remove(&self, id: &BlobId) -> Result<(), StorageError> {
        lock(&self.0).remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<BlobId>, StorageError> {
        Ok(lock(&self.0).keys().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audio(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn a_blob_is_kept_under_its_hash_and_read_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(dir.path()).unwrap().keep_free(0);
        let data = audio(160_000, 7);
        let id = blobs.put(&data).unwrap();
        assert_eq!(id, BlobId::of(&data));
        assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
        assert!(blobs.contains(&id));
        assert_eq!(blobs.get(&id).unwrap(), Some(data.clone()));
        // Again: the same name, nothing rewritten.
        assert_eq!(blobs.put(&data).unwrap(), id);
        let other = blobs.put(&audio(800, 9)).unwrap();
        let mut both = vec![id, other];
        both.sort();
        assert_eq!(blobs.list().unwrap(), both);
        // Reopened (a restart): still there; a temporary file a crash left is gone.
        let sub = dir.path().join(&id.to_string()[..2]);
        std::fs::write(sub.join(format!("{id}{TMP_SUFFIX}")), b"half").unwrap();
        drop(blobs);
        let blobs = FileBlobs::open(dir.path()).unwrap();
        assert_eq!(blobs.get(&id).unwrap(), Some(data));
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 1);
        blobs.remove(&id).unwrap();
        blobs.remove(&id).unwrap();
        assert_eq!(blobs.get(&id).unwrap(), None);
        assert_eq!(blobs.list().unwrap(), vec![other]);
    }

    #[test]
    fn a_blob_that_does_not_match_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(dir.path()).unwrap().keep_free(0);
        let id = blobs.put(&audio(4000, 1)).unwrap();
        let name = id.to_string();
        let path = dir.path().join(&name[..2]).join(&name);
        let mut rotten = std::fs::read(&path).unwrap();
        rotten[100] ^= 0xff;
        std::fs::write(&path, rotten).unwrap();
        let err = blobs.get(&id).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!("xyz".parse::<BlobId>().is_err());
    }

    #[test]
    fn a_put_below_the_free_space_floor_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(dir.path()).unwrap().keep_free(u64::MAX / 2);
        let err = blobs.put(&audio(1000, 3)).unwrap_err();
        assert!(matches!(err, StorageError::DiskFull { .. }), "{err}");
        assert!(err.is_transient());
        assert!(blobs.list().unwrap().is_empty());
    }

    #[test]
    fn memory_blobs_behave_alike() {
        let blobs = MemBlobs::default();
        let data = audio(320, 5);
        let id = blobs.put(&data).unwrap();
        assert_eq!(blobs.get(&id).unwrap(), Some(data));
        assert_eq!(blobs.list().unwrap(), vec![id]);
        blobs.remove(&id).unwrap();
        assert!(!blobs.contains(&id));
    }
}
