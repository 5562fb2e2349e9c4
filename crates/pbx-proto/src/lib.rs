//! Generated messages, clients and servers of `proto/`: the peer link between nodes
//! ([`peer`], `pbx.cluster.v1`), the administration API ([`admin`], `pbx.admin.v1`) and
//! the messages both carry ([`common`], `pbx.common.v1`: node status, members, media
//! counters). Used by `pbx-peer` and `pbx-admin` (servers) and `pbxctl` (client); it
//! holds no logic, so `pbxctl` links neither the Raft stores nor sled.

/// The generated modules, nested as their packages are (prost refers from one package
/// to another by relative paths).
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod pbx {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("pbx.common.v1");
        }
    }
    pub mod cluster {
        pub mod v1 {
            tonic::include_proto!("pbx.cluster.v1");
        }
    }
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("pbx.admin.v1");
        }
    }
}

pub use pbx::admin::v1 as admin;
pub use pbx::cluster::v1 as peer;
pub use pbx::common::v1 as common;
