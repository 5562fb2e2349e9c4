//! `cutfs`: a power-cut filesystem for tests. An in-memory FUSE mount that keeps what
//! was fsynced and throws away everything else on command.
//!
//! `cutfs MOUNTPOINT` mounts an in-memory filesystem at MOUNTPOINT (which must exist and
//! be empty; the root takes its owner and mode), prints `ready` on stdout once the mount
//! is live, and then reads commands line by line from stdin:
//!
//! - `cut`: power loss. Every file's data reverts to what it held at its last fsync or
//!   fdatasync (a never-fsynced file's data is empty), and the namespace (which names
//!   exist in which directories, inode metadata, file sizes set by truncate or
//!   fallocate; mkdir, unlink, rename, rmdir, create, link, symlink) reverts to its
//!   last commit. Replies `ok cut files=<n files whose data changed> bytes=<bytes
//!   discarded>`.
//! - `stats`: replies `ok files=<n> bytes=<total current bytes> dirty=<bytes not yet
//!   durable>`.
//! - EOF on stdin, SIGTERM or SIGINT: unmount (lazily when busy) and exit 0.
//!
//! Anything else is answered `err ...`. Byte counts of `cut` and `dirty` are in whole
//! dirty 4 KiB blocks, clipped at the end of the file.
//!
//! Durability model (ext4-like):
//! - File data becomes durable per file at fsync or fdatasync of that file (both alike);
//!   a write through an O_SYNC or O_DSYNC descriptor (or with RWF_DSYNC) counts as the
//!   write and an fsync.
//! - Namespace changes become durable at the next fsync of ANY file or fsyncdir of ANY
//!   directory: one journal commit covers every metadata change before it, as ext4's
//!   journal does.
//!
//! So a file created, written and fsynced survives with its data; a file created with
//! no fsync of anything after it disappears; a rename followed by an fsync of anything
//! survives; unsynced appends to an fsynced file are lost; a file whose creation was
//! committed by another file's fsync but whose own data never was comes back empty (as
//! on ext4). Inodes unlinked but still open stay readable until released; inodes a cut
//! removes are dropped (their open handles get ENOENT).
//!
//! The kernel sends FUSE nothing for sync_file_range(2), syncfs(2) or sync(2), so those
//! make nothing durable here (sled 0.34 on Linux makes its log writes durable with
//! sync_file_range alone: pair its `flush()` with an fsync/fdatasync of its `db` file).
//!
//! The kernel caches nothing that a cut could make stale: entry and attribute replies
//! have TTL 0 and files are opened with FOPEN_DIRECT_IO (no page cache); no writeback
//! cache, so every write reaches this process at once. flock(2) and POSIX locks are
//! handled by the kernel locally (the filesystem does not claim lock support). MAP_SHARED
//! mmap is refused by the kernel on direct-I/O files (ENODEV); MAP_PRIVATE works.
//!
//! Data lives in 4 KiB blocks with a per-file dirty-block set, so fsync and cut cost
//! O(dirty bytes), and the namespace journal records only what changed since the last
//! commit.

mod fuse;
mod state;

use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use fuser::{MountOption, Session};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};

use state::State;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cutfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [mountpoint] = args.as_slice() else {
        bail!("usage: cutfs MOUNTPOINT");
    };
    let mountpoint = PathBuf::from(mountpoint);
    let md = std::fs::metadata(&mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if std::fs::read_dir(&mountpoint)?.next().is_some() {
        bail!("mount point {} is not empty", mountpoint.display());
    }

    // Before any thread starts (they inherit the mask): SIGTERM and SIGINT only reach
    // the thread that waits for them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking signals")?;

    let perm = (md.permissions().mode() & 0o7777) as u16;
    let state = Arc::new(Mutex::new(State::new(md.uid(), md.gid(), perm)));
    let options = [
        MountOption::FSName("cutfs".into()),
        MountOption::Subtype("cutfs".into()),
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    let session = Session::new(fuse::CutFs::new(state.clone()), &mountpoint, &options)
        .with_context(|| format!("mounting on {}", mountpoint.display()))?;
    // Dropping it would unmount: it lives until the process exits.
    let _session = session.spawn().context("starting the FUSE session")?;

    // Answered by the session once FUSE_INIT is done: the mount is live.
    let root = std::fs::metadata(&mountpoint).context("stat of the mounted root")?;
    if root.ino() != state::ROOT {
        unmount(&mountpoint);
        bail!("{} is not served by cutfs", mountpoint.display());
    }
    say("ready");

    {
        let mountpoint = mountpoint.clone();
        std::thread::spawn(move || {
            if signals.wait().is_ok() {
                exit(&mountpoint);
            }
        });
    }

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "" => continue,
            "cut" => {
                let r = fuse::lock(&state).cut();
                format!("ok cut files={} bytes={}", r.files, r.bytes)
            }
            "stats" => {
                let s = fuse::lock(&state).stats();
                format!("ok files={} bytes={} dirty={}", s.files, s.bytes, s.dirty)
            }
            other => format!("err unknown command {other:?} (cut, stats)"),
        };
        if !say(&reply) {
            break;
        }
    }
    exit(&mountpoint)
}

/// One line on stdout, flushed; false when stdout is gone.
fn say(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

fn unmount(mountpoint: &Path) {
    if umount2(mountpoint, MntFlags::empty()).is_err() {
        // Busy (open files, a shell inside): detach now, gone once unused.
        let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
    }
}

/// Unmounts and exits 0; the first caller (stdin EOF or a signal) wins.
fn exit(mountpoint: &Path) -> ! {
    static EXITING: Mutex<()> = Mutex::new(());
    let _guard = EXITING.lock();
    unmount(mountpoint);
    std::process::exit(0)
}
