//! What the node plugs into the peer link: the receiver of relayed SIP messages and the
//! calls it runs (media counters, hang-up), and the one conversion of media counters to
//! and from the proto shared with the admin API.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use pbx_proto::common::MediaStream;

use crate::NodeId;

/// The node's side of the peer link's `Relay` RPC: SIP messages for phones whose
/// connection this node holds, and their messages back to the node running the call.
pub trait SipRelay: Send + Sync {
    /// Returns whether the message could be handed on (false: no such connection).
    fn deliver(
        &self,
        from_node: NodeId,
        phone: SocketAddr,
        message: Vec<u8>,
        from_phone: bool,
    ) -> bool;
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The node's side of the `CallControl` RPC: the calls it runs.
pub trait CallControl: Send + Sync {
    /// Media counters of those of `call_ids` this node runs; with `hangup`, hangs them
    /// up too (BYE both ways).
    fn calls(&self, call_ids: Vec<String>, hangup: bool) -> BoxFuture<Vec<CallMedia>>;
}

/// Media counters of one relayed stream (side a: the caller's, b: the callee's).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MediaCounters {
    pub a_packets: u64,
    pub a_bytes: u64,
    pub a_lost: u64,
    pub a_jitter_ms: f64,
    pub b_packets: u64,
    pub b_bytes: u64,
    pub b_lost: u64,
    pub b_jitter_ms: f64,
}

/// A call this node runs, as the admin API sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallMedia {
    pub call_id: String,
    pub streams: Vec<MediaCounters>,
}

impl From<&MediaCounters> for MediaStream {
    fn from(c: &MediaCounters) -> Self {
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

impl From<MediaStream> for MediaCounters {
    fn from(c: MediaStream) -> Self {
        MediaCounters {
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

impl From<&CallMedia> for pbx_proto::peer::CallMedia {
    fn from(c: &CallMedia) -> Self {
        pbx_proto::peer::CallMedia {
            call_id: c.call_id.clone(),
            streams: c.streams.iter().map(Into::into).collect(),
        }
    }
}

impl From<pbx_proto::peer::CallMedia> for CallMedia {
    fn from(c: pbx_proto::peer::CallMedia) -> Self {
        CallMedia {
            call_id: c.call_id,
            streams: c.streams.into_iter().map(Into::into).collect(),
        }
    }
}
