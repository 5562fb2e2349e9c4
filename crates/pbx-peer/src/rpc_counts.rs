//! The peer-link RPCs this node served, by method and gRPC status: what an operator
//! looks at when replication or forwarding misbehaves.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Code, Status};

/// The RPCs of the peer link, in [`RpcCounts::METHODS`] order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rpc {
    Handshake,
    Ping,
    AppendEntries,
    Vote,
    InstallSnapshot,
    Forward,
    Relay,
    Status,
    Manage,
    CallControl,
    PutBlob,
    GetBlob,
}

/// The gRPC status codes, by their number (tonic's `Code` as i32).
const CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// Counts of served RPCs: method × status code.
#[derive(Debug)]
pub struct RpcCounts {
    counts: [[AtomicU64; 17]; 12],
}

impl Default for RpcCounts {
    fn default() -> Self {
        RpcCounts {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl RpcCounts {
    pub const METHODS: [&'static str; 12] = [
        "handshake",
        "ping",
        "append_entries",
        "vote",
        "install_snapshot",
        "forward",
        "relay",
        "status",
        "manage",
        "call_control",
        "put_blob",
        "get_blob",
    ];

    /// Counts one answer of `rpc`.
    pub(crate) fn tally<T>(&self, rpc: Rpc, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let c = (code as usize).min(CODES.len() - 1);
        self.counts[rpc as usize][c].fetch_add(1, Ordering::Relaxed);
    }

    /// (method, code, count) of every pair seen at least once.
    pub fn counts(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (m, row) in self.counts.iter().enumerate() {
            for (c, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((Self::METHODS[m], CODES[c], n));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_method_and_code() {
        let c = RpcCounts::default();
        c.tally(Rpc::Vote, &Ok::<(), Status>(()));
        c.tally(Rpc::Vote, &Ok::<(), Status>(()));
        c.tally(Rpc::Forward, &Err::<(), _>(Status::unavailable("no")));
        assert_eq!(
            c.counts(),
            vec![("vote", "ok", 2), ("forward", "unavailable", 1)]
        );
    }
}
