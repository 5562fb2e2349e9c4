//! Whose data a directory holds: written on a node's first start, checked on every
//! start, so a node never runs on another cluster's or another node's data, nor on data
//! a newer pbxd wrote in a format it does not know.

use std::path::Path;

use crate::{LogStore, StorageError};

/// The data format this pbxd writes and reads. 2: the Raft snapshot is a checksummed
/// file beside the database (format 1 kept it in sled, where it was not fsynced); a
/// format 1 directory is read and upgraded, and a format 1 pbxd refuses a format 2 one.
pub const DATA_FORMAT: u32 = 2;

const KEY: &str = "identity";

/// The cluster and node a data directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIdentity {
    pub cluster_id: String,
    pub node_id: u64,
}

impl DataIdentity {
    fn encode(&self) -> String {
        format!(
            "format={DATA_FORMAT}\ncluster={}\nnode={}\n",
            self.cluster_id, self.node_id
        )
    }

    fn decode(text: &str) -> Option<(u32, DataIdentity)> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        };
        Some((
            field("format")?.parse().ok()?,
            DataIdentity {
                cluster_id: field("cluster")?.to_string(),
                node_id: field("node")?.parse().ok()?,
            },
        ))
    }
}

/// Checks that the store at `path` is `want`'s, or makes it so when it is new (or was
/// written before identities were recorded): durable before the node goes on.
pub fn claim(store: &dyn LogStore, path: &Path, want: &DataIdentity) -> Result<(), StorageError> {
    let refuse = |reason: String| StorageError::Foreign {
        path: path.to_path_buf(),
        reason,
    };
    match store.get_meta(KEY)? {
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let Some((format, have)) = DataIdentity::decode(&text) else {
                return Err(refuse(format!("unreadable identity record {text:?}")));
            };
            if format > DATA_FORMAT {
                return Err(refuse(format!(
                    "written by a newer pbxd (data format {format}; this one reads format \
                     {DATA_FORMAT}): run that version, or wipe the directory to rejoin"
                )));
            }
            if have.cluster_id != want.cluster_id {
                return Err(refuse(format!(
                    "holds the data of cluster '{}', and this node is configured for cluster \
                     '{}' (cluster.id)",
                    have.cluster_id, want.cluster_id
                )));
            }
            if have.node_id != want.node_id {
                return Err(refuse(format!(
                    "holds the data of node {} of cluster '{}', and this is node {} (node.id)",
                    have.node_id, have.cluster_id, want.node_id
                )));
            }
            if format < DATA_FORMAT {
                // Upgraded: an older pbxd must not run on what this one writes.
                store.put_meta(KEY, want.encode().as_bytes(), true)?;
            }
            Ok(())
        }
        None => store.put_meta(KEY, want.encode().as_bytes(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn id(cluster: &str, node: u64) -> DataIdentity {
        DataIdentity {
            cluster_id: cluster.into(),
            node_id: node,
        }
    }

    #[test]
    fn a_directory_is_claimed_once_and_refused_to_others() {
        let store = MemStore::default();
        let path = Path::new("/var/lib/pbxd/node1/state");
        claim(&store, path, &id("pbx-a", 1)).unwrap();
        claim(&store, path, &id("pbx-a", 1)).unwrap();
        let e = claim(&store, path, &id("pbx-b", 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/var/lib/pbxd/node1/state")
                && e.contains("'pbx-a'")
                && e.contains("'pbx-b'"),
            "{e}"
        );
        let e = claim(&store, path, &id("pbx-a", 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("node 1") && e.contains("node 2"), "{e}");
        store
            .put_meta(KEY, b"format=7\ncluster=pbx-a\nnode=1\n", true)
            .unwrap();
        let e = claim(&store, path, &id("pbx-a", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("newer pbxd") && e.contains("format 7"), "{e}");
        // A directory of format 1 is claimed and upgraded.
        store
            .put_meta(KEY, b"format=1\ncluster=pbx-a\nnode=1\n", true)
            .unwrap();
        claim(&store, path, &id("pbx-a", 1)).unwrap();
        let text = String::from_utf8(store.get_meta(KEY).unwrap().unwrap()).unwrap();
        assert!(
            text.starts_with(&format!("format={DATA_FORMAT}\n")),
            "{text}"
        );
        store.put_meta(KEY, b"\xff garbage", true).unwrap();
        assert!(claim(&store, path, &id("pbx-a", 1)).is_err());
    }
}
