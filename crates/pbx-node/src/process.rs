//! What the process may hold: its open-descriptor limit.

/// Raises this process's soft limit on open descriptors to its hard limit and returns
/// the limit in force. Each relayed call holds four sockets, and a common default soft
/// limit of 1,024 would admit about 190 calls; the hard limit is what the operator
/// allowed (`LimitNOFILE=` in the systemd unit, `ulimit -Hn`).
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024)
}
