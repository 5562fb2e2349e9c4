//! The FUSE side: requests to [`State`] operations, replies with no caching.
//!
//! Entry and attribute replies carry TTL 0 and every open replies FOPEN_DIRECT_IO, so
//! after a cut the kernel serves nothing stale: each path walk asks again, each read and
//! write comes here. No writeback cache is asked for (fuser does not request it), so each
//! write reaches the state at once. Locks are not claimed in FUSE_INIT, so the kernel
//! keeps flock(2) and POSIX locks locally, which is all one machine needs.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::consts::FOPEN_DIRECT_IO;
use fuser::{
    Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use nix::libc;

use crate::state::{DirEntry, NewKind, SetAttr, State, BLOCK};

const TTL: Duration = Duration::ZERO;

pub struct CutFs {
    state: Arc<Mutex<State>>,
    /// Directory listings taken at opendir, by handle.
    dirs: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
}

impl CutFs {
    pub fn new(state: Arc<Mutex<State>>) -> CutFs {
        CutFs {
            state,
            dirs: HashMap::new(),
            next_fh: 1,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// Locks the state; a panic elsewhere does not poison it for good.
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn entry(reply: ReplyEntry, r: Result<fuser::FileAttr, libc::c_int>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, 0),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), libc::c_int>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for CutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.state().lookup(parent, name));
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.state().setattr(ino, s) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self.state().readlink(ino) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let fmt = mode & libc::S_IFMT;
        if fmt != libc::S_IFREG && fmt != 0 {
            // Devices, FIFOs and sockets are not needed.
            reply.error(libc::EPERM);
            return;
        }
        let r = self.state().create(
            parent,
            name,
            NewKind::File,
            mode as u16,
            req.uid(),
            req.gid(),
        );
        entry(reply, r);
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.state().create(
            parent,
            name,
            NewKind::Dir,
            mode as u16,
            req.uid(),
            req.gid(),
        );
        entry(reply, r);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().unlink(parent, name));
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().rmdir(parent, name));
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.state().create(
            parent,
            link_name,
            NewKind::Symlink(target.as_os_str()),
            0o777,
            req.uid(),
            req.gid(),
        );
        entry(reply, r);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.state().rename(parent, name, newparent, newname, flags),
        );
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(reply, self.state().link(ino, newparent, newname));
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.state().open(ino) {
            Ok(()) => reply.opened(0, FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        match self.state().read(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        // O_APPEND: at the end as this side knows it (the kernel's idea of the size may be
        // stale after a cut).
        let append = flags & libc::O_APPEND != 0;
        // O_SYNC/O_DSYNC (or RWF_DSYNC): the kernel's direct-I/O path sends no fsync after
        // the write, so the write is its own fsync here (O_SYNC includes O_DSYNC's bit).
        let sync = flags & libc::O_DSYNC != 0;
        let mut st = self.state();
        let r = st.write(ino, offset, data, append).and_then(|n| {
            if sync {
                st.fsync(ino).map(|()| n)
            } else {
                Ok(n)
            }
        });
        drop(st);
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().release(ino);
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().fsync(ino));
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let listing = self.state().list(ino);
        match listing {
            Ok(l) => {
                let fh = self.next_fh;
                self.next_fh += 1;
                self.dirs.insert(fh, l);
                reply.opened(fh, 0);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if !self.dirs.contains_key(&fh) {
            let listing = self.state().list(ino);
            match listing {
                Ok(l) => {
                    self.dirs.insert(fh, l);
                }
                Err(e) => return reply.error(e),
            }
        }
        let Some(listing) = self.dirs.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let start = usize::try_from(offset).unwrap_or(0);
        for (i, e) in listing.iter().enumerate().skip(start) {
            if reply.add(e.ino, (i + 1) as i64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(&fh);
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().fsyncdir(ino));
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        // 4 TiB, nearly all free; plenty of inodes.
        let blocks = 1u64 << 30;
        let used = self.state().stats().bytes.div_ceil(BLOCK as u64);
        let free = blocks.saturating_sub(used);
        reply.statfs(
            blocks,
            free,
            free,
            1 << 30,
            1 << 30,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        if self.state().exists(ino) {
            reply.ok();
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.state();
        let r = st
            .create(
                parent,
                name,
                NewKind::File,
                mode as u16,
                req.uid(),
                req.gid(),
            )
            .and_then(|attr| st.open(attr.ino).map(|()| attr));
        drop(st);
        match r {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().fallocate(ino, offset, length, mode));
    }
}
