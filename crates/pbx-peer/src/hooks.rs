//! What the node plugs into the peer link: the receiver of relayed SIP messages and the
//! calls it runs (media counters, hang-up).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

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

pub use pbx_media_core::MediaCounters;

/// A call this node runs, as the admin API sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallMedia {
    pub call_id: String,
    pub streams: Vec<MediaCounters>,
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
