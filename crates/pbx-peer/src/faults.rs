//! Fault injection on the peer link, for in-process cluster tests.
//!
//! Every outgoing peer RPC (Raft, forwarding, handshake, relay, call control,
//! management, status) goes through a [`FaultyChannel`], which asks the cluster's
//! [`LinkFaults`] about its link (from, to) before sending: a dropped link fails the RPC
//! at once as unreachable (`UNAVAILABLE`, as a refused connection does, so openraft backs
//! off and a forwarded write is retried), a delayed one sends it late. Clusters sharing
//! one handle share one table, so a test cuts links in both directions by naming both.
//! A node runs with [`LinkFaults::default`]: no table, nothing to look up.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::transport::Channel;
use tower_service::Service;

use crate::NodeId;

/// What happens to the RPCs of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails at once as unreachable; nothing is sent.
    Drop,
    /// Sent after this delay.
    Delay(Duration),
}

#[derive(Debug, Default)]
struct Table {
    links: HashMap<(NodeId, NodeId), Fault>,
    /// Nodes every link to and from is dropped.
    isolated: BTreeSet<NodeId>,
}

/// The faults of the peer links, shared by every cluster given a clone.
/// `LinkFaults::default()`: none, and never consulted; [`LinkFaults::new`]: a table
/// tests change while the clusters run.
#[derive(Debug, Clone, Default)]
pub struct LinkFaults(Option<Arc<Mutex<Table>>>);

impl LinkFaults {
    /// A table with every link healthy.
    pub fn new() -> LinkFaults {
        LinkFaults(Some(Arc::default()))
    }

    fn table(&self) -> Option<MutexGuard<'_, Table>> {
        self.0
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sets the fault of the link from `from` to `to` (one direction).
    pub fn set(&self, from: NodeId, to: NodeId, fault: Fault) {
        if let Some(mut t) = self.table() {
            t.links.insert((from, to), fault);
        }
    }

    /// Makes the link from `from` to `to` healthy again (one direction).
    pub fn clear(&self, from: NodeId, to: NodeId) {
        if let Some(mut t) = self.table() {
            t.links.remove(&(from, to));
        }
    }

    /// Drops every link between a node of `a` and a node of `b`, both ways.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        for x in a {
            for y in b {
                self.set(*x, *y, Fault::Drop);
                self.set(*y, *x, Fault::Drop);
            }
        }
    }

    /// Drops every link to and from `node`.
    pub fn isolate(&self, node: NodeId) {
        if let Some(mut t) = self.table() {
            t.isolated.insert(node);
        }
    }

    /// Makes every link healthy again.
    pub fn heal(&self) {
        if let Some(mut t) = self.table() {
            *t = Table::default();
        }
    }

    /// The fault of the link from `from` to `to`, if any.
    pub fn fault(&self, from: NodeId, to: NodeId) -> Option<Fault> {
        let t = self.table()?;
        if t.isolated.contains(&from) || t.isolated.contains(&to) {
            return Some(Fault::Drop);
        }
        t.links.get(&(from, to)).copied()
    }
}

/// A peer channel that consults [`LinkFaults`] on every request.
#[derive(Debug, Clone)]
pub struct FaultyChannel {
    inner: Channel,
    faults: LinkFaults,
    from: NodeId,
    to: NodeId,
}

impl FaultyChannel {
    pub(crate) fn new(inner: Channel, faults: LinkFaults, from: NodeId, to: NodeId) -> Self {
        FaultyChannel {
            inner,
            faults,
            from,
            to,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Request<Body>> for FaultyChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The channel made ready goes with the request (tower's rule for cloned services).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        // Without a table this is one branch: nothing is locked or looked up.
        let fault = self.faults.fault(self.from, self.to);
        let (from, to) = (self.from, self.to);
        Box::pin(async move {
            match fault {
                None => {}
                Some(Fault::Drop) => {
                    // tonic hands a Status error back as it is: UNAVAILABLE here.
                    let dropped = crate::PeerError::Unreachable(format!(
                        "link {from}->{to} dropped (fault injection)"
                    ));
                    return Err(Box::new(tonic::Status::from(dropped)) as BoxError);
                }
                Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            }
            inner.call(req).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_partitions_and_isolation() {
        let none = LinkFaults::default();
        none.isolate(1);
        assert_eq!(none.fault(1, 2), None, "no table: nothing recorded");

        let f = LinkFaults::new();
        f.set(1, 2, Fault::Delay(Duration::from_millis(5)));
        assert_eq!(f.fault(1, 2), Some(Fault::Delay(Duration::from_millis(5))));
        assert_eq!(f.fault(2, 1), None, "one direction");
        f.partition(&[1], &[2, 3]);
        assert_eq!(f.fault(3, 1), Some(Fault::Drop));
        assert_eq!(f.fault(2, 3), None);
        f.heal();
        assert_eq!(f.fault(1, 2), None);
        f.isolate(2);
        assert_eq!(
            (f.fault(2, 3), f.fault(1, 2)),
            (Some(Fault::Drop), Some(Fault::Drop))
        );
        f.clone().heal();
        assert_eq!(f.fault(1, 2), None, "clones share the table");
    }
}
