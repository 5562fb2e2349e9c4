//! The real `cutfs` binary on a fresh mount point per test: what survives a cut.
//!
//! Skipped (with the reason printed) when not root or /dev/fuse is missing.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A running `cutfs` on its own temporary mount point.
struct CutFs {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Polls `f` until it holds or the timeout passes.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

impl CutFs {
    /// None (with the reason printed) when FUSE cannot be used here.
    fn start() -> Option<CutFs> {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            eprintln!("skipped: cutfs tests mount FUSE and need root");
            return None;
        }
        if !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: /dev/fuse is missing");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cutfs"))
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting cutfs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fs = CutFs {
            stdin: child.stdin.take(),
            child,
            lines,
            path,
            _dir: dir,
        };
        assert_eq!(fs.line(), "ready");
        Some(fs)
    }

    fn line(&mut self) -> String {
        self.lines.recv_timeout(TIMEOUT).expect("a line from cutfs")
    }

    fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.line()
    }

    fn cut(&mut self) -> String {
        let reply = self.command("cut");
        assert!(reply.starts_with("ok cut "), "{reply}");
        reply
    }

    fn p(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn fsynced_file_survives_with_data() {
    let Some(mut fs) = CutFs::start() else { return };
    write_synced(&fs.p("a"), b"durable");
    let mut f = File::create(fs.p("b")).unwrap();
    f.write_all(b"synced by fdatasync").unwrap();
    f.sync_data().unwrap();
    drop(f);
    assert_eq!(fs.cut(), "ok cut files=0 bytes=0");
    assert_eq!(std::fs::read(fs.p("a")).unwrap(), b"durable");
    assert_eq!(std::fs::read(fs.p("b")).unwrap(), b"synced by fdatasync");
}

#[test]
fn o_dsync_writes_are_durable() {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(mut fs) = CutFs::start() else { return };
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::libc::O_DSYNC)
        .open(fs.p("wal"))
        .unwrap();
    f.write_all_at(b"synced by O_DSYNC", 0).unwrap();
    drop(f);
    assert_eq!(fs.cut(), "ok cut files=0 bytes=0");
    assert_eq!(std::fs::read(fs.p("wal")).unwrap(), b"synced by O_DSYNC");
}

#[test]
fn unsynced_appends_are_lost() {
    let Some(mut fs) = CutFs::start() else { return };
    write_synced(&fs.p("log"), b"base");
    let mut f = OpenOptions::new().append(true).open(fs.p("log")).unwrap();
    f.write_all(b"+tail").unwrap();
    drop(f);
    assert_eq!(std::fs::read(fs.p("log")).unwrap(), b"base+tail");
    assert_eq!(fs.command("stats"), "ok files=1 bytes=9 dirty=9");
    assert_eq!(fs.cut(), "ok cut files=1 bytes=9");
    assert_eq!(std::fs::read(fs.p("log")).unwrap(), b"base");
    assert_eq!(fs.command("stats"), "ok files=1 bytes=4 dirty=0");
    // Appending still works after the cut, at the durable end.
    let mut f = OpenOptions::new().append(true).open(fs.p("log")).unwrap();
    f.write_all(b"!").unwrap();
    assert_eq!(std::fs::read(fs.p("log")).unwrap(), b"base!");
}

#[test]
fn never_fsynced_new_file_vanishes() {
    let Some(mut fs) = CutFs::start() else { return };
    std::fs::write(fs.p("new"), b"gone").unwrap();
    assert!(fs.p("new").exists());
    assert_eq!(fs.cut(), "ok cut files=1 bytes=4");
    assert!(!fs.p("new").exists());
    assert_eq!(std::fs::read_dir(&fs.path).unwrap().count(), 0);
}

#[test]
fn creation_committed_by_another_fsync_comes_back_empty() {
    let Some(mut fs) = CutFs::start() else { return };
    std::fs::write(fs.p("a"), b"never synced").unwrap();
    write_synced(&fs.p("b"), b"synced");
    fs.cut();
    assert_eq!(std::fs::read(fs.p("a")).unwrap(), b"");
    assert_eq!(std::fs::read(fs.p("b")).unwrap(), b"synced");
}

#[test]
fn rename_survives_only_with_an_fsync_after_it() {
    let Some(mut fs) = CutFs::start() else { return };
    write_synced(&fs.p("a"), b"data");
    write_synced(&fs.p("other"), b"");
    std::fs::rename(fs.p("a"), fs.p("b")).unwrap();
    // An fsync of any file commits the rename.
    File::open(fs.p("other")).unwrap().sync_all().unwrap();
    fs.cut();
    assert!(!fs.p("a").exists());
    assert_eq!(std::fs::read(fs.p("b")).unwrap(), b"data");

    std::fs::rename(fs.p("b"), fs.p("c")).unwrap();
    fs.cut();
    assert!(!fs.p("c").exists());
    assert_eq!(std::fs::read(fs.p("b")).unwrap(), b"data");

    // Over an existing name: the replaced file comes back with its data.
    write_synced(&fs.p("d"), b"old d");
    std::fs::rename(fs.p("b"), fs.p("d")).unwrap();
    assert_eq!(std::fs::read(fs.p("d")).unwrap(), b"data");
    fs.cut();
    assert_eq!(std::fs::read(fs.p("d")).unwrap(), b"old d");
    assert_eq!(std::fs::read(fs.p("b")).unwrap(), b"data");
}

#[test]
fn rename_flags() {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    let Some(fs) = CutFs::start() else { return };
    std::fs::write(fs.p("a"), b"a").unwrap();
    std::fs::write(fs.p("b"), b"b").unwrap();
    let (a, b, c) = (fs.p("a"), fs.p("b"), fs.p("c"));
    assert_eq!(
        renameat2(None, &a, None, &b, RenameFlags::RENAME_NOREPLACE),
        Err(Errno::EEXIST)
    );
    assert_eq!(
        renameat2(None, &a, None, &b, RenameFlags::RENAME_EXCHANGE),
        Err(Errno::EINVAL)
    );
    renameat2(None, &a, None, &c, RenameFlags::RENAME_NOREPLACE).unwrap();
    assert_eq!(std::fs::read(&c).unwrap(), b"a");
    assert_eq!(std::fs::read(&b).unwrap(), b"b");
}

#[test]
fn mkdir_survives_with_fsyncdir() {
    let Some(mut fs) = CutFs::start() else { return };
    std::fs::create_dir_all(fs.p("d/e/f")).unwrap();
    fsync_dir(&fs.p("d/e"));
    std::fs::create_dir(fs.p("unsynced")).unwrap();
    fs.cut();
    assert!(fs.p("d/e/f").is_dir());
    assert!(!fs.p("unsynced").exists());
    // rmdir and unlink revert too.
    std::fs::remove_dir(fs.p("d/e/f")).unwrap();
    fs.cut();
    assert!(fs.p("d/e/f").is_dir());
    assert_eq!(
        std::fs::remove_dir(fs.p("d")).unwrap_err().raw_os_error(),
        Some(nix::libc::ENOTEMPTY)
    );
}

#[test]
fn unsynced_truncate_reverts() {
    let Some(mut fs) = CutFs::start() else { return };
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    write_synced(&fs.p("t"), &data);
    OpenOptions::new()
        .write(true)
        .open(fs.p("t"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(std::fs::metadata(fs.p("t")).unwrap().len(), 10);
    fs.cut();
    assert_eq!(std::fs::read(fs.p("t")).unwrap(), data);
}

#[test]
fn holes_read_as_zeros_and_large_offsets_work() {
    let Some(mut fs) = CutFs::start() else { return };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.p("sparse"))
        .unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"mid", 1_000_003).unwrap();
    let far = 5 << 30; // 5 GiB
    f.write_all_at(b"far", far).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), far + 3);
    let mut buf = vec![1u8; 8192];
    f.read_exact_at(&mut buf, 4).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 1_000_002).unwrap();
    assert_eq!(&buf, b"\0mid\0");
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, far - 1).unwrap();
    assert_eq!(&buf, b"\0far");
    drop(f);
    fs.cut();
    let f = File::open(fs.p("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), far + 3);
    let mut buf = [0u8; 3];
    f.read_exact_at(&mut buf, far).unwrap();
    assert_eq!(&buf, b"far");
}

#[test]
fn flock_is_exclusive_across_processes() {
    use fs2::FileExt as _;
    let Some(fs) = CutFs::start() else { return };
    let db = fs.p("db");
    write_synced(&db, b"");
    let mut holder = Command::new("flock")
        .arg(&db)
        .args(["-c", "echo locked; cat >/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    // sled's lock: fs2's try_lock_exclusive on its own open file.
    let mine = OpenOptions::new().read(true).write(true).open(&db).unwrap();
    assert!(mine.try_lock_exclusive().is_err(), "the holder has it");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    wait_until("the lock to be free", || mine.try_lock_exclusive().is_ok());
    // And now the other way round: a second process cannot take it.
    let status = Command::new("flock")
        .args(["-n"])
        .arg(&db)
        .arg("true")
        .status()
        .unwrap();
    assert!(!status.success(), "flock -n got a lock we hold");
    mine.unlock().unwrap();
    let status = Command::new("flock")
        .args(["-n"])
        .arg(&db)
        .arg("true")
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn no_stale_kernel_cache_after_cut() {
    let Some(mut fs) = CutFs::start() else { return };
    write_synced(&fs.p("f"), b"AAAA");
    let held = File::open(fs.p("f")).unwrap();
    let mut buf = Vec::new();
    (&held).read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"AAAA");
    std::fs::write(fs.p("f"), b"BBBBBBBB").unwrap();
    std::fs::write(fs.p("new"), b"new").unwrap();
    assert_eq!(std::fs::read(fs.p("f")).unwrap(), b"BBBBBBBB");
    assert_eq!(std::fs::metadata(fs.p("f")).unwrap().len(), 8);
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&fs.path), ["f", "new"]);
    fs.cut();
    // A fresh open, a stat, a listing, and the descriptor held across the cut.
    assert_eq!(std::fs::read(fs.p("f")).unwrap(), b"AAAA");
    assert_eq!(std::fs::metadata(fs.p("f")).unwrap().len(), 4);
    assert_eq!(held.metadata().unwrap().len(), 4);
    let mut buf = [0u8; 16];
    assert_eq!(held.read_at(&mut buf, 0).unwrap(), 4);
    assert_eq!(&buf[..4], b"AAAA");
    assert!(!fs.p("new").exists());
    assert_eq!(names(&fs.path), ["f"]);
}

#[test]
fn unlinked_open_file_stays_readable() {
    let Some(mut fs) = CutFs::start() else { return };
    write_synced(&fs.p("f"), b"still here");
    let f = File::open(fs.p("f")).unwrap();
    std::fs::remove_file(fs.p("f")).unwrap();
    fsync_dir(&fs.path);
    assert!(!fs.p("f").exists());
    let mut buf = String::new();
    (&f).read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "still here");
    drop(f);
    fs.cut();
    assert!(!fs.p("f").exists());
}

#[test]
fn sled_like_pwrites_then_unsynced_overwrite() {
    let Some(mut fs) = CutFs::start() else { return };
    let pattern = |i: usize| (i % 251) as u8;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(fs.p("db"))
        .unwrap();
    for off in (0..1 << 20).step_by(4096) {
        let chunk: Vec<u8> = (off..off + 4096).map(pattern).collect();
        f.write_all_at(&chunk, off as u64).unwrap();
    }
    f.sync_all().unwrap();
    f.write_all_at(&[0xEE; 65536], 500_000).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, 500_000).unwrap();
    assert_eq!(buf, [0xEE; 4]);
    // 65536 bytes from 500000 touch 17 blocks.
    assert_eq!(fs.cut(), format!("ok cut files=1 bytes={}", 17 * 4096));
    let want: Vec<u8> = (0..1 << 20).map(pattern).collect();
    assert_eq!(std::fs::read(fs.p("db")).unwrap(), want);
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 499_712).unwrap();
    assert_eq!(buf, want[499_712..503_808]);
}

#[test]
fn ordinary_tools_work() {
    let Some(mut fs) = CutFs::start() else { return };
    let script = "set -e
        mkdir -p a/b/c
        echo one > a/b/c/x
        dd if=/dev/zero of=a/z bs=4096 count=64 status=none
        cp a/b/c/x a/y
        mv a/y a/w
        ln a/w a/hard
        ln -s w a/soft
        test \"$(cat a/soft)\" = one
        echo two | tee -a a/w > /dev/null
        test \"$(cat a/hard)\" = \"one
two\"
        ls -la a > /dev/null
        test $(stat -c %s a/z) = 262144
        rm -rf a/b
        test ! -e a/b
        sync -f .";
    let status = Command::new("sh")
        .args(["-c", script])
        .current_dir(&fs.path)
        .status()
        .unwrap();
    assert!(status.success());
    fs.cut();
    // The syncfs of `sync -f` reaches no file: the namespace and data are as last
    // committed, which here is nothing.
    let mut left: Vec<_> = std::fs::read_dir(&fs.path).unwrap().collect();
    left.retain(|e| e.is_ok());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn eof_unmounts_and_exits_zero() {
    let Some(mut fs) = CutFs::start() else { return };
    std::fs::write(fs.p("busy"), b"x").unwrap();
    // An open file keeps it busy: the unmount is then lazy.
    let _open = File::open(fs.p("busy")).unwrap();
    drop(fs.stdin.take());
    let mut status = None;
    wait_until("cutfs to exit", || {
        status = fs.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(!is_mounted(&fs.path));
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let Some(mut fs) = CutFs::start() else { return };
    assert!(is_mounted(&fs.path));
    let pid = fs.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    wait_until("cutfs to exit", || {
        status = fs.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(!is_mounted(&fs.path));
}

/// 10,000 4 KiB writes with an fsync every 10 (the timing is printed, not checked).
#[test]
fn write_and_fsync_cost() {
    let Some(mut fs) = CutFs::start() else { return };
    let f = File::create(fs.p("bench")).unwrap();
    let chunk = [0x5Au8; 4096];
    let start = Instant::now();
    for i in 0..10_000u64 {
        f.write_all_at(&chunk, (i % 2_560) * 4096).unwrap();
        if i % 10 == 9 {
            f.sync_data().unwrap();
        }
    }
    let took = start.elapsed();
    eprintln!(
        "cutfs: 10000 4 KiB writes + 1000 fdatasyncs over a 10 MiB file: {took:?} ({:.1} us/write)",
        took.as_secs_f64() * 1e6 / 10_000.0
    );
    assert_eq!(fs.command("stats"), "ok files=1 bytes=10485760 dirty=0");
}
