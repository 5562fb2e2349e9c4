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

// The one conversion of a relayed stream's counters to and from the shape both APIs carry.
impl From<&pbx_media_core::MediaCounters> for common::MediaStream {
    fn from(c: &pbx_media_core::MediaCounters) -> Self {
        common::MediaStream {
            a_packets: c.a_packets,
            a_bytes: c.a_bytes,
            a_lost: c.a_lost,
            a_jitter_ms: c.a_jitter_ms,
            b_packets: c.b_packets,
            b_bytes: c.b_bytes,
            b_lost: c.b_lost,
            b_jitter_ms: c.b_jitter_ms,
            a_first_ms: c.a_first_ms,
            b_first_ms: c.b_first_ms,
        }
    }
}

impl From<common::MediaStream> for pbx_media_core::MediaCounters {
    fn from(c: common::MediaStream) -> Self {
        pbx_media_core::MediaCounters {
            a_packets: c.a_packets,
            a_bytes: c.a_bytes,
            a_lost: c.a_lost,
            a_jitter_ms: c.a_jitter_ms,
            b_packets: c.b_packets,
            b_bytes: c.b_bytes,
            b_lost: c.b_lost,
            b_jitter_ms: c.b_jitter_ms,
            a_first_ms: c.a_first_ms,
            b_first_ms: c.b_first_ms,
        }
    }
}
