//! The administration API's messages, client and server (generated from
//! `proto/pbx/admin/v1/admin.proto`), shared by `pbxd` (server) and `pbxctl` (client).
#![allow(clippy::all, missing_docs, unreachable_pub)]

tonic::include_proto!("pbx.admin.v1");

impl From<&pbx_media_core::MediaCounters> for MediaStream {
    fn from(c: &pbx_media_core::MediaCounters) -> Self {
        MediaStream {
            a_packets: c.a_packets,
            a_bytes: c.a_bytes,
            a_lost: c.a_lost,
            a_jitter_ms: c.a_jitter_ms,
            b_packets: c.b_packets,
            b_bytes: c.b_bytes,
            b_lost: c.b_lost,
            b_jitter_ms: c.b_jitter_ms,
        }
    }
}
