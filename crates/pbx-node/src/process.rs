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

/// The process's CPU time, memory and descriptors, read from /proc (Linux); a field
/// that cannot be read is None and its metric is left out.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessStats {
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) resident_bytes: Option<u64>,
    pub(crate) open_fds: Option<u64>,
    pub(crate) max_fds: Option<u64>,
}

/// Clock ticks per second of /proc/<pid>/stat's times: USER_HZ, 100 on every Linux
/// architecture this runs on (reading sysconf would need libc).
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    pub(crate) fn read() -> ProcessStats {
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the command name, which is in parentheses and may hold
                // spaces: utime and stime are the 14th and 15th fields of the line.
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = f.get(11)?.parse().ok()?;
                let stime: f64 = f.get(12)?.parse().ok()?;
                Some((utime + stime) / USER_HZ)
            });
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb * 1024)
            });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        ProcessStats {
            cpu_seconds,
            resident_bytes,
            open_fds,
            max_fds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes.unwrap() > 0);
        assert!(p.open_fds.unwrap() >= 3, "stdin, stdout, stderr at least");
        assert!(p.max_fds.unwrap() >= p.open_fds.unwrap());
        assert!(p.cpu_seconds.unwrap() >= 0.0);
    }
}
