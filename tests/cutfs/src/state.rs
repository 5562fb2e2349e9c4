//! The filesystem's state: live data and namespace, what of them is durable, and the
//! power cut. No FUSE here: every operation returns an errno on failure.
//!
//! Invariants the cheap `fsync`/`cut` rely on:
//! - A file's `cur` (live) and `dur` (durable) blocks are identical at every block index
//!   not in its `dirty` set; bytes past a file's size inside its last block are zero.
//! - The committed namespace (`committed_entries`, `committed_meta`) equals the live one
//!   except at the entries in `dirty_entries` and the inodes in `dirty_nodes`.
//! - An inode in `committed_meta` is never freed (a cut may bring it back).
//! - Inode numbers are never reused, not even across cuts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use fuser::{FileAttr, FileType, TimeOrNow};
use nix::libc;

pub const BLOCK: usize = 4096;
const BLOCK_U64: u64 = BLOCK as u64;
pub const ROOT: u64 = fuser::FUSE_ROOT_ID;
/// Largest file size accepted (writes past it fail with EFBIG).
const MAX_SIZE: u64 = 1 << 50;
const NAME_MAX: usize = 255;

pub type Errno = libc::c_int;

/// Metadata journaled as part of the namespace.
#[derive(Clone, Debug)]
pub struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    /// Directories: the directory holding this one (the root: itself).
    pub parent: u64,
}

/// Sparse file contents in 4 KiB blocks; missing blocks read as zeros.
#[derive(Default)]
struct Blocks {
    size: u64,
    map: BTreeMap<u64, Box<[u8]>>,
}

fn blocks_for(len: u64) -> u64 {
    len.div_ceil(BLOCK_U64)
}

impl Blocks {
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        let mut pos = off;
        while pos < end {
            let idx = pos / BLOCK_U64;
            let in_block = (pos % BLOCK_U64) as usize;
            let n = (BLOCK - in_block).min((end - pos) as usize);
            if let Some(b) = self.map.get(&idx) {
                let at = (pos - off) as usize;
                out[at..at + n].copy_from_slice(&b[in_block..in_block + n]);
            }
            pos += n as u64;
        }
        out
    }

    fn write(&mut self, off: u64, data: &[u8], dirty: &mut BTreeSet<u64>) {
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = pos / BLOCK_U64;
            let in_block = (pos % BLOCK_U64) as usize;
            let n = (BLOCK - in_block).min(rest.len());
            let b = self
                .map
                .entry(idx)
                .or_insert_with(|| vec![0u8; BLOCK].into_boxed_slice());
            b[in_block..in_block + n].copy_from_slice(&rest[..n]);
            dirty.insert(idx);
            pos += n as u64;
            rest = &rest[n..];
        }
        self.size = self.size.max(off + data.len() as u64);
    }

    /// Sets the size; on shrinking, drops whole blocks past it and zeroes the tail of the
    /// last one, marking every block it touches in `dirty` (when given).
    fn set_len(&mut self, len: u64, mut dirty: Option<&mut BTreeSet<u64>>) {
        if len < self.size {
            let gone = self.map.split_off(&blocks_for(len));
            if let Some(d) = dirty.as_deref_mut() {
                d.extend(gone.keys().copied());
            }
            let tail = (len % BLOCK_U64) as usize;
            if tail != 0 {
                let idx = len / BLOCK_U64;
                if let Some(b) = self.map.get_mut(&idx) {
                    b[tail..].fill(0);
                    if let Some(d) = dirty {
                        d.insert(idx);
                    }
                }
            }
        }
        self.size = len;
    }
}

#[derive(Default)]
struct FileData {
    cur: Blocks,
    dur: Blocks,
    /// Blocks where `cur` may differ from `dur`.
    dirty: BTreeSet<u64>,
    /// Size changes (truncate, fallocate) not yet committed: (smallest size the durable
    /// data must be cut to, final size).
    pending: Option<(u64, u64)>,
}

impl FileData {
    fn resize(&mut self, len: u64) {
        let low = self.cur.size.min(len);
        self.pending = Some(match self.pending {
            Some((m, _)) => (m.min(low), len),
            None => (low, len),
        });
        self.cur.set_len(len, Some(&mut self.dirty));
    }

    fn changed(&self) -> bool {
        !self.dirty.is_empty() || self.pending.is_some() || self.cur.size != self.dur.size
    }

    /// Bytes not yet durable, counted in whole dirty blocks (clipped at end of file).
    fn dirty_bytes(&self) -> u64 {
        let end = self.cur.size.max(self.dur.size);
        self.dirty
            .iter()
            .map(|&i| end.saturating_sub(i * BLOCK_U64).min(BLOCK_U64))
            .sum()
    }

    fn sync(&mut self) {
        for &i in &self.dirty {
            match self.cur.map.get(&i) {
                Some(b) => {
                    self.dur.map.insert(i, b.clone());
                }
                None => {
                    self.dur.map.remove(&i);
                }
            }
        }
        self.dur.size = self.cur.size;
        self.dirty.clear();
        self.pending = None;
    }

    fn revert(&mut self) {
        for &i in &self.dirty {
            match self.dur.map.get(&i) {
                Some(b) => {
                    self.cur.map.insert(i, b.clone());
                }
                None => {
                    self.cur.map.remove(&i);
                }
            }
        }
        self.cur.size = self.dur.size;
        self.dirty.clear();
        self.pending = None;
    }
}

enum Body {
    File(Box<FileData>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(OsString),
}

struct Node {
    meta: Meta,
    body: Body,
    /// Open file handles (runtime state: not journaled, not reverted).
    opens: u32,
}

impl Node {
    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
        }
    }
}

/// What a new node is.
pub enum NewKind<'a> {
    File,
    Dir,
    Symlink(&'a OsStr),
}

/// One directory listing entry.
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: OsString,
}

/// Attribute changes of a setattr.
#[derive(Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// What `cut` threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub dirty: u64,
}

pub struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    committed_entries: HashMap<(u64, OsString), u64>,
    committed_meta: HashMap<u64, Meta>,
    dirty_entries: HashSet<(u64, OsString)>,
    dirty_nodes: HashSet<u64>,
    /// Files whose data may differ from their durable data.
    dirty_files: HashSet<u64>,
    /// Files with an uncommitted size change.
    pending_sizes: HashSet<u64>,
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl State {
    /// An empty filesystem whose root has the given owner and permissions.
    pub fn new(uid: u32, gid: u32, perm: u16) -> State {
        let t = now();
        let meta = Meta {
            perm,
            uid,
            gid,
            nlink: 2,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            parent: ROOT,
        };
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                meta: meta.clone(),
                body: Body::Dir(BTreeMap::new()),
                opens: 0,
            },
        );
        State {
            nodes,
            next_ino: ROOT + 1,
            committed_entries: HashMap::new(),
            committed_meta: HashMap::from([(ROOT, meta)]),
            dirty_entries: HashSet::new(),
            dirty_nodes: HashSet::new(),
            dirty_files: HashSet::new(),
            pending_sizes: HashSet::new(),
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::EINVAL),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<Option<u64>, Errno> {
        Ok(self.dir(parent)?.get(name).copied())
    }

    /// Sets or removes a directory entry (the directory must exist).
    fn set_entry(&mut self, dir: u64, name: &OsStr, ino: Option<u64>) {
        if let Some(Node {
            body: Body::Dir(d), ..
        }) = self.nodes.get_mut(&dir)
        {
            match ino {
                Some(i) => {
                    d.insert(name.to_os_string(), i);
                }
                None => {
                    d.remove(name);
                }
            }
            self.dirty_entries.insert((dir, name.to_os_string()));
        }
    }

    /// Applies `f` to an inode's metadata and journals the change.
    fn meta(&mut self, ino: u64, f: impl FnOnce(&mut Meta)) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            f(&mut n.meta);
            self.dirty_nodes.insert(ino);
        }
    }

    fn touch(&mut self, ino: u64) {
        let t = now();
        self.meta(ino, |m| {
            m.mtime = t;
            m.ctime = t;
        });
    }

    /// Frees an inode nothing refers to any more (no name, no open handle, not in the
    /// committed namespace).
    fn maybe_free(&mut self, ino: u64) {
        let unused = self
            .nodes
            .get(&ino)
            .is_some_and(|n| n.meta.nlink == 0 && n.opens == 0);
        if ino != ROOT && unused && !self.committed_meta.contains_key(&ino) {
            self.nodes.remove(&ino);
            self.dirty_files.remove(&ino);
            self.pending_sizes.remove(&ino);
        }
    }

    pub fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        let (size, blocks) = match &n.body {
            Body::File(f) => (f.cur.size, f.cur.map.len() as u64 * (BLOCK_U64 / 512)),
            Body::Dir(d) => (d.len() as u64 * 32, 0),
            Body::Symlink(t) => (t.len() as u64, 0),
        };
        Ok(FileAttr {
            ino,
            size,
            blocks,
            atime: n.meta.atime,
            mtime: n.meta.mtime,
            ctime: n.meta.ctime,
            crtime: n.meta.crtime,
            kind: n.kind(),
            perm: n.meta.perm,
            nlink: n.meta.nlink,
            uid: n.meta.uid,
            gid: n.meta.gid,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        check_name(name)?;
        let ino = self.child(parent, name)?.ok_or(libc::ENOENT)?;
        self.attr(ino)
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: NewKind<'_>,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        check_name(name)?;
        if self.child(parent, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let t = now();
        let (body, nlink) = match kind {
            NewKind::File => (Body::File(Box::default()), 1),
            NewKind::Dir => (Body::Dir(BTreeMap::new()), 2),
            NewKind::Symlink(target) => (Body::Symlink(target.to_os_string()), 1),
        };
        let is_dir = nlink == 2;
        let meta = Meta {
            perm: perm & 0o7777,
            uid,
            gid,
            nlink,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            parent,
        };
        self.nodes.insert(
            ino,
            Node {
                meta,
                body,
                opens: 0,
            },
        );
        self.dirty_nodes.insert(ino);
        self.set_entry(parent, name, Some(ino));
        self.touch(parent);
        if is_dir {
            self.meta(parent, |m| m.nlink += 1);
        }
        self.attr(ino)
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString, Errno> {
        match &self.node(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        check_name(name)?;
        let ino = self.child(parent, name)?.ok_or(libc::ENOENT)?;
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(libc::EISDIR);
        }
        self.set_entry(parent, name, None);
        self.touch(parent);
        let t = now();
        self.meta(ino, |m| {
            m.nlink = m.nlink.saturating_sub(1);
            m.ctime = t;
        });
        self.maybe_free(ino);
        Ok(())
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        check_name(name)?;
        if name == "." {
            return Err(libc::EINVAL);
        }
        if name == ".." {
            return Err(libc::ENOTEMPTY);
        }
        let ino = self.child(parent, name)?.ok_or(libc::ENOENT)?;
        if !self.dir(ino)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.set_entry(parent, name, None);
        self.touch(parent);
        self.meta(parent, |m| m.nlink = m.nlink.saturating_sub(1));
        self.meta(ino, |m| m.nlink = 0);
        self.maybe_free(ino);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            // RENAME_EXCHANGE, RENAME_WHITEOUT.
            return Err(libc::EINVAL);
        }
        check_name(name)?;
        check_name(newname)?;
        let src = self.child(parent, name)?.ok_or(libc::ENOENT)?;
        let target = self.child(newparent, newname)?;
        if target.is_some() && flags & libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EEXIST);
        }
        if target == Some(src) {
            return Ok(());
        }
        let src_is_dir = matches!(self.node(src)?.body, Body::Dir(_));
        if src_is_dir {
            // Not into itself nor below itself.
            let mut p = newparent;
            for _ in 0..100_000 {
                if p == src {
                    return Err(libc::EINVAL);
                }
                if p == ROOT {
                    break;
                }
                p = self.node(p)?.meta.parent;
            }
        }
        if let Some(t) = target {
            match (&self.node(t)?.body, src_is_dir) {
                (Body::Dir(d), true) if !d.is_empty() => return Err(libc::ENOTEMPTY),
                (Body::Dir(_), true) => {}
                (Body::Dir(_), false) => return Err(libc::EISDIR),
                (_, true) => return Err(libc::ENOTDIR),
                (_, false) => {}
            }
        }
        let t = now();
        if let Some(old) = target {
            if src_is_dir {
                self.meta(old, |m| m.nlink = 0);
                self.meta(newparent, |m| m.nlink = m.nlink.saturating_sub(1));
            } else {
                self.meta(old, |m| {
                    m.nlink = m.nlink.saturating_sub(1);
                    m.ctime = t;
                });
            }
        }
        self.set_entry(parent, name, None);
        self.set_entry(newparent, newname, Some(src));
        self.touch(parent);
        self.touch(newparent);
        self.meta(src, |m| {
            m.ctime = t;
            m.parent = if src_is_dir { newparent } else { m.parent };
        });
        if src_is_dir && parent != newparent {
            self.meta(parent, |m| m.nlink = m.nlink.saturating_sub(1));
            self.meta(newparent, |m| m.nlink += 1);
        }
        if let Some(old) = target {
            self.maybe_free(old);
        }
        Ok(())
    }

    pub fn link(&mut self, ino: u64, newparent: u64, newname: &OsStr) -> Result<FileAttr, Errno> {
        check_name(newname)?;
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(libc::EPERM);
        }
        if self.child(newparent, newname)?.is_some() {
            return Err(libc::EEXIST);
        }
        self.set_entry(newparent, newname, Some(ino));
        self.touch(newparent);
        let t = now();
        self.meta(ino, |m| {
            m.nlink += 1;
            m.ctime = t;
        });
        self.attr(ino)
    }

    pub fn setattr(&mut self, ino: u64, s: SetAttr) -> Result<FileAttr, Errno> {
        self.node(ino)?;
        let t = now();
        if let Some(size) = s.size {
            if size > MAX_SIZE {
                return Err(libc::EFBIG);
            }
            let f = self.file_mut(ino)?;
            if size != f.cur.size {
                f.resize(size);
                self.dirty_files.insert(ino);
                self.pending_sizes.insert(ino);
            }
            self.meta(ino, |m| m.mtime = t);
        }
        let when = |x: TimeOrNow| match x {
            TimeOrNow::SpecificTime(st) => st,
            TimeOrNow::Now => t,
        };
        self.meta(ino, |m| {
            if let Some(mode) = s.mode {
                m.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = s.uid {
                m.uid = uid;
            }
            if let Some(gid) = s.gid {
                m.gid = gid;
            }
            if let Some(a) = s.atime {
                m.atime = when(a);
            }
            if let Some(x) = s.mtime {
                m.mtime = when(x);
            }
            m.ctime = t;
        });
        self.attr(ino)
    }

    pub fn open(&mut self, ino: u64) -> Result<(), Errno> {
        self.node_mut(ino)?.opens += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.opens = n.opens.saturating_sub(1);
            self.maybe_free(ino);
        }
    }

    pub fn read(&mut self, ino: u64, off: i64, len: u32) -> Result<Vec<u8>, Errno> {
        let off = u64::try_from(off).map_err(|_| libc::EINVAL)?;
        Ok(self.file_mut(ino)?.cur.read(off, u64::from(len)))
    }

    /// Writes at `off` (at the end of the file when `append`); returns the bytes written.
    pub fn write(&mut self, ino: u64, off: i64, data: &[u8], append: bool) -> Result<u32, Errno> {
        let off = u64::try_from(off).map_err(|_| libc::EINVAL)?;
        let len = u32::try_from(data.len()).map_err(|_| libc::EINVAL)?;
        let f = self.file_mut(ino)?;
        let off = if append { f.cur.size } else { off };
        if off.saturating_add(data.len() as u64) > MAX_SIZE {
            return Err(libc::EFBIG);
        }
        if !data.is_empty() {
            f.cur.write(off, data, &mut f.dirty);
            self.dirty_files.insert(ino);
            self.touch(ino);
        }
        Ok(len)
    }

    pub fn fallocate(&mut self, ino: u64, off: i64, len: i64, mode: i32) -> Result<(), Errno> {
        if mode != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let (Ok(off), Ok(len)) = (u64::try_from(off), u64::try_from(len)) else {
            return Err(libc::EINVAL);
        };
        if len == 0 {
            return Err(libc::EINVAL);
        }
        let end = off.checked_add(len).ok_or(libc::EFBIG)?;
        if end > MAX_SIZE {
            return Err(libc::EFBIG);
        }
        let f = self.file_mut(ino)?;
        if end > f.cur.size {
            f.resize(end);
            self.dirty_files.insert(ino);
            self.pending_sizes.insert(ino);
            self.touch(ino);
        }
        Ok(())
    }

    /// fsync/fdatasync of a file: one journal commit, then the file's data is durable.
    pub fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        self.node(ino)?;
        self.commit();
        if let Ok(f) = self.file_mut(ino) {
            f.sync();
            self.dirty_files.remove(&ino);
        }
        Ok(())
    }

    /// fsyncdir: one journal commit.
    pub fn fsyncdir(&mut self, ino: u64) -> Result<(), Errno> {
        self.dir(ino)?;
        self.commit();
        Ok(())
    }

    /// A journal commit: every namespace change so far becomes durable.
    pub fn commit(&mut self) {
        for (dir, name) in std::mem::take(&mut self.dirty_entries) {
            let live = match self.nodes.get(&dir) {
                Some(Node {
                    body: Body::Dir(d), ..
                }) => d.get(&name).copied(),
                _ => None,
            };
            match live {
                Some(ino) => {
                    self.committed_entries.insert((dir, name), ino);
                }
                None => {
                    self.committed_entries.remove(&(dir, name));
                }
            }
        }
        for ino in std::mem::take(&mut self.pending_sizes) {
            if let Some(Node {
                body: Body::File(f),
                ..
            }) = self.nodes.get_mut(&ino)
            {
                if let Some((low, len)) = f.pending.take() {
                    f.dur.set_len(low, None);
                    f.dur.set_len(len, None);
                }
            }
        }
        let mut unlinked = Vec::new();
        for ino in std::mem::take(&mut self.dirty_nodes) {
            match self.nodes.get(&ino) {
                Some(n) if n.meta.nlink > 0 || ino == ROOT => {
                    self.committed_meta.insert(ino, n.meta.clone());
                }
                _ => {
                    self.committed_meta.remove(&ino);
                    unlinked.push(ino);
                }
            }
        }
        for ino in unlinked {
            self.maybe_free(ino);
        }
    }

    /// Power loss: data back to each file's last fsync, namespace back to the last commit.
    pub fn cut(&mut self) -> CutReport {
        let mut report = CutReport { files: 0, bytes: 0 };
        for ino in &self.dirty_files {
            if let Some(Node {
                body: Body::File(f),
                ..
            }) = self.nodes.get(ino)
            {
                if f.changed() {
                    report.files += 1;
                    report.bytes += f.dirty_bytes();
                }
            }
        }
        for (dir, name) in std::mem::take(&mut self.dirty_entries) {
            let committed = self.committed_entries.get(&(dir, name.clone())).copied();
            if let Some(Node {
                body: Body::Dir(d), ..
            }) = self.nodes.get_mut(&dir)
            {
                match committed {
                    Some(ino) => {
                        d.insert(name, ino);
                    }
                    None => {
                        d.remove(&name);
                    }
                }
            }
        }
        for ino in std::mem::take(&mut self.dirty_nodes) {
            match self.committed_meta.get(&ino) {
                Some(m) => {
                    if let Some(n) = self.nodes.get_mut(&ino) {
                        n.meta = m.clone();
                    }
                }
                None => {
                    self.nodes.remove(&ino);
                }
            }
        }
        for ino in std::mem::take(&mut self.dirty_files) {
            if let Some(Node {
                body: Body::File(f),
                ..
            }) = self.nodes.get_mut(&ino)
            {
                f.revert();
            }
        }
        self.pending_sizes.clear();
        report
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            files: 0,
            bytes: 0,
            dirty: 0,
        };
        for n in self.nodes.values() {
            if let Body::File(f) = &n.body {
                s.files += 1;
                s.bytes += f.cur.size;
            }
        }
        for ino in &self.dirty_files {
            if let Some(Node {
                body: Body::File(f),
                ..
            }) = self.nodes.get(ino)
            {
                s.dirty += f.dirty_bytes();
            }
        }
        s
    }

    /// A directory's listing, "." and ".." first.
    pub fn list(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let d = self.dir(ino)?;
        let parent = self.node(ino)?.meta.parent;
        let mut out = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for (name, &child) in d {
            if let Some(n) = self.nodes.get(&child) {
                out.push(DirEntry {
                    ino: child,
                    kind: n.kind(),
                    name: name.clone(),
                });
            }
        }
        Ok(out)
    }

    pub fn exists(&self, ino: u64) -> bool {
        self.nodes.contains_key(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs() -> State {
        State::new(0, 0, 0o755)
    }

    fn file(s: &mut State, parent: u64, name: &str) -> u64 {
        s.create(parent, OsStr::new(name), NewKind::File, 0o644, 0, 0)
            .unwrap()
            .ino
    }

    fn read_all(s: &mut State, ino: u64) -> Vec<u8> {
        s.read(ino, 0, u32::MAX).unwrap()
    }

    #[test]
    fn fsynced_data_survives_unsynced_is_lost() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"hello", false).unwrap();
        s.fsync(a).unwrap();
        s.write(a, 5, b" world", false).unwrap();
        assert_eq!(s.stats().dirty, 11);
        let r = s.cut();
        assert_eq!(
            r,
            CutReport {
                files: 1,
                bytes: 11
            }
        );
        assert_eq!(read_all(&mut s, a), b"hello");
        assert_eq!(s.stats().dirty, 0);
    }

    #[test]
    fn creation_committed_by_another_fsync_comes_back_empty() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"data", false).unwrap();
        let b = file(&mut s, ROOT, "b");
        s.fsync(b).unwrap();
        let c = file(&mut s, ROOT, "c");
        s.cut();
        assert_eq!(s.lookup(ROOT, OsStr::new("a")).unwrap().size, 0);
        assert!(s.lookup(ROOT, OsStr::new("b")).is_ok());
        assert_eq!(s.lookup(ROOT, OsStr::new("c")), Err(libc::ENOENT));
        assert!(!s.exists(c));
    }

    #[test]
    fn truncate_reverts_unless_committed() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, &[7u8; 10_000], false).unwrap();
        s.fsync(a).unwrap();
        let size = |a| SetAttr {
            size: Some(a),
            ..Default::default()
        };
        s.setattr(a, size(100)).unwrap();
        s.cut();
        assert_eq!(read_all(&mut s, a), vec![7u8; 10_000]);
        // Committed by a directory fsync: the size sticks, the cut-off bytes stay gone
        // even when the file grows again without an fsync of its own.
        s.setattr(a, size(100)).unwrap();
        s.setattr(a, size(5000)).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.cut();
        let mut want = vec![7u8; 100];
        want.resize(5000, 0);
        assert_eq!(read_all(&mut s, a), want);
    }

    #[test]
    fn rename_needs_a_commit() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.fsync(a).unwrap();
        s.rename(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), 0)
            .unwrap();
        s.cut();
        assert!(s.lookup(ROOT, OsStr::new("a")).is_ok());
        s.rename(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), 0)
            .unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.cut();
        assert_eq!(s.lookup(ROOT, OsStr::new("b")).unwrap().ino, a);
        assert_eq!(s.lookup(ROOT, OsStr::new("a")), Err(libc::ENOENT));
    }

    #[test]
    fn rename_errors() {
        let mut s = fs();
        let d = s
            .create(ROOT, OsStr::new("d"), NewKind::Dir, 0o755, 0, 0)
            .unwrap()
            .ino;
        file(&mut s, d, "x");
        file(&mut s, ROOT, "f");
        let n = OsStr::new;
        assert_eq!(s.rename(ROOT, n("f"), ROOT, n("d"), 0), Err(libc::EISDIR));
        assert_eq!(s.rename(ROOT, n("d"), ROOT, n("f"), 0), Err(libc::ENOTDIR));
        assert_eq!(s.rename(ROOT, n("d"), d, n("e"), 0), Err(libc::EINVAL));
        assert_eq!(
            s.rename(ROOT, n("f"), d, n("x"), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST)
        );
        assert_eq!(
            s.rename(ROOT, n("f"), d, n("x"), libc::RENAME_EXCHANGE),
            Err(libc::EINVAL)
        );
        assert_eq!(s.rmdir(ROOT, n("d")), Err(libc::ENOTEMPTY));
        assert_eq!(s.unlink(ROOT, n("d")), Err(libc::EISDIR));
        assert_eq!(s.rmdir(ROOT, n("f")), Err(libc::ENOTDIR));
        s.rename(ROOT, n("f"), d, n("x"), 0).unwrap();
        assert_eq!(s.list(d).unwrap().len(), 3);
        assert_eq!(s.stats().files, 1);
    }

    #[test]
    fn unlinked_open_file_stays_until_release_and_cut_restores_committed_names() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"abc", false).unwrap();
        s.fsync(a).unwrap();
        s.open(a).unwrap();
        s.unlink(ROOT, OsStr::new("a")).unwrap();
        assert_eq!(read_all(&mut s, a), b"abc");
        s.release(a);
        // Still in the committed namespace: a cut brings it back.
        s.cut();
        assert_eq!(s.lookup(ROOT, OsStr::new("a")).unwrap().nlink, 1);
        s.unlink(ROOT, OsStr::new("a")).unwrap();
        s.fsyncdir(ROOT).unwrap();
        assert!(!s.exists(a));
    }

    #[test]
    fn holes_and_big_offsets() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 1 << 33, b"x", false).unwrap();
        assert_eq!(s.attr(a).unwrap().size, (1 << 33) + 1);
        assert_eq!(s.read(a, 4095, 3).unwrap(), vec![0, 0, 0]);
        s.fsync(a).unwrap();
        assert_eq!(s.read(a, (1 << 33) - 1, 10).unwrap(), vec![0, b'x']);
        s.fallocate(a, 0, 1 << 34, 0).unwrap();
        s.cut();
        assert_eq!(s.attr(a).unwrap().size, (1 << 33) + 1);
    }
}
