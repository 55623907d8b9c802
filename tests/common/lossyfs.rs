//! A FUSE filesystem for power-cut tests: it keeps everything in memory and
//! remembers, for every file and directory, what was made durable by the
//! last fsync. [`LossyMount::power_cut`] unmounts it, throws away every write
//! that was not made durable (file contents back to their last fsync, file
//! sizes too, directory entries back to their last fsync of the directory),
//! and mounts it again, which also empties the kernel's page cache of it.
//!
//! The model is POSIX's: `fsync`/`fdatasync` of a file makes its data and
//! size durable, and nothing else; a new, removed or renamed directory entry
//! is durable once the directory itself is fsynced. `sync_file_range`, which
//! never reaches a FUSE filesystem, makes nothing durable. [`Semantics::Journal`]
//! is the more forgiving model of a journaling filesystem such as ext4, where
//! every fsync also commits all pending directory changes.
//!
//! Writes go straight through to this process (FUSE's default, no writeback
//! cache), so what a program wrote is here as soon as its write() returns.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow,
};

/// What a power cut keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// POSIX: directory entries are durable only after an fsync of their directory.
    Strict,
    /// Like a journaling filesystem: any fsync also commits every directory change.
    Journal,
}

/// Bytes per page of the undo log.
const PAGE: u64 = 4096;
const ROOT: u64 = fuser::FUSE_ROOT_ID;
const TTL: Duration = Duration::from_secs(1);

struct FileNode {
    /// Current contents.
    data: Vec<u8>,
    /// Size at the last fsync.
    durable_len: u64,
    /// Page number → that page's durable bytes, for pages below
    /// `durable_len` written since the last fsync.
    undo: HashMap<u64, Vec<u8>>,
}

impl FileNode {
    /// Saves the durable bytes of the pages in `[from, to)` before they change.
    fn save_pages(&mut self, from: u64, to: u64) {
        let end = to.min(self.durable_len);
        if from >= end {
            return;
        }
        for page in from / PAGE..=(end - 1) / PAGE {
            if self.undo.contains_key(&page) {
                continue;
            }
            let start = (page * PAGE) as usize;
            let stop = ((page + 1) * PAGE).min(self.durable_len) as usize;
            let bytes = self
                .data
                .get(start..stop.min(self.data.len()))
                .unwrap_or(&[]);
            self.undo.insert(page, bytes.to_vec());
        }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        self.save_pages(offset, end);
        if self.data.len() < end as usize {
            self.data.resize(end as usize, 0);
        }
        self.data[offset as usize..end as usize].copy_from_slice(bytes);
    }

    fn set_len(&mut self, len: u64) {
        let cur = self.data.len() as u64;
        if len < cur {
            self.save_pages(len, cur);
        }
        self.data.resize(len as usize, 0);
    }

    fn sync(&mut self) -> u64 {
        let dirty = self.undo.len() as u64;
        self.undo.clear();
        self.durable_len = self.data.len() as u64;
        dirty
    }

    /// Back to the last fsync; returns the bytes of writes forgotten.
    fn revert(&mut self) -> u64 {
        let mut lost = self.data.len().abs_diff(self.durable_len as usize) as u64;
        self.data.resize(self.durable_len as usize, 0);
        for (page, bytes) in self.undo.drain() {
            let start = (page * PAGE) as usize;
            let stop = start + bytes.len();
            if self.data[start..stop] != bytes[..] {
                lost += bytes.len() as u64;
            }
            self.data[start..stop].copy_from_slice(&bytes);
        }
        lost
    }
}

#[derive(Default)]
struct DirNode {
    entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

enum Body {
    File(FileNode),
    Dir(DirNode),
}

struct Node {
    body: Body,
    perm: u16,
    mtime: SystemTime,
}

/// Counters of what the filesystem saw and what cuts threw away.
#[derive(Debug, Default, Clone)]
pub struct FsStats {
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub cuts: u64,
    /// Bytes of file writes forgotten by cuts.
    pub bytes_lost: u64,
    /// Directory entries forgotten (added, removed or renamed, never synced).
    pub entries_lost: u64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    semantics: Semantics,
    stats: FsStats,
}

impl State {
    fn new(semantics: Semantics) -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                body: Body::Dir(DirNode::default()),
                perm: 0o755,
                mtime: SystemTime::now(),
            },
        );
        State {
            nodes,
            next_ino: ROOT + 1,
            semantics,
            stats: FsStats::default(),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let (kind, size) = match &n.body {
            Body::File(f) => (FileType::RegularFile, f.data.len() as u64),
            Body::Dir(_) => (FileType::Directory, 0),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: n.perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut DirNode, i32> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir(d)) => Ok(d),
            Some(Body::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileNode, i32> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(f)) => Ok(f),
            Some(Body::Dir(_)) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16) -> Result<u64, i32> {
        let ino = self.next_ino;
        let dir = self.dir(parent)?;
        if dir.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        dir.entries.insert(name.to_owned(), ino);
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                body,
                perm,
                mtime: SystemTime::now(),
            },
        );
        Ok(ino)
    }

    fn commit_all_dirs(&mut self) {
        for n in self.nodes.values_mut() {
            if let Body::Dir(d) = &mut n.body {
                d.durable = d.entries.clone();
            }
        }
    }

    /// Forgets everything not durable; drops what is no longer reachable.
    fn power_cut(&mut self) {
        self.stats.cuts += 1;
        let mut reachable = vec![ROOT];
        let mut keep = std::collections::HashSet::new();
        while let Some(ino) = reachable.pop() {
            if !keep.insert(ino) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            match &mut node.body {
                Body::Dir(d) => {
                    let changed = d
                        .entries
                        .iter()
                        .filter(|(k, v)| d.durable.get(*k) != Some(v))
                        .count()
                        + d.durable
                            .keys()
                            .filter(|k| !d.entries.contains_key(*k))
                            .count();
                    self.stats.entries_lost += changed as u64;
                    d.entries = d.durable.clone();
                    reachable.extend(d.entries.values().copied());
                }
                Body::File(f) => self.stats.bytes_lost += f.revert(),
            }
        }
        let stats = &mut self.stats;
        self.nodes.retain(|ino, node| {
            let kept = keep.contains(ino);
            if let (false, Body::File(f)) = (kept, &node.body) {
                stats.bytes_lost += f.data.len() as u64;
            }
            kept
        });
    }
}

struct LossyFs {
    state: Arc<Mutex<State>>,
}

impl Filesystem for LossyFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state.lock().unwrap();
        let found = s.dir(parent).map(|d| d.entries.get(name).copied());
        match found {
            Ok(Some(ino)) => match s.attr(ino) {
                Some(a) => reply.entry(&TTL, &a, 0),
                None => reply.error(libc::ENOENT),
            },
            Ok(None) => reply.error(libc::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state.lock().unwrap().attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state.lock().unwrap();
        if let Some(len) = size {
            match s.file(ino) {
                Ok(f) => f.set_len(len),
                Err(e) => return reply.error(e),
            }
        }
        if let Some(n) = s.nodes.get_mut(&ino) {
            if let Some(m) = mode {
                n.perm = (m & 0o7777) as u16;
            }
            n.mtime = SystemTime::now();
        }
        match s.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state.lock().unwrap();
        let added = s.add(
            parent,
            name,
            Body::Dir(DirNode::default()),
            (mode & 0o7777) as u16,
        );
        match added {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).unwrap(), 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state.lock().unwrap();
        let file = FileNode {
            data: Vec::new(),
            durable_len: 0,
            undo: HashMap::new(),
        };
        match s.add(parent, name, Body::File(file), (mode & 0o7777) as u16) {
            Ok(ino) => reply.created(&TTL, &s.attr(ino).unwrap(), 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state.lock().unwrap();
        match s.dir(parent).map(|d| d.entries.remove(name)) {
            Ok(Some(_)) => reply.ok(),
            Ok(None) => reply.error(libc::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state.lock().unwrap();
        let ino = match s.dir(parent).map(|d| d.entries.get(name).copied()) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(libc::ENOENT),
            Err(e) => return reply.error(e),
        };
        match s.dir(ino) {
            Ok(d) if !d.entries.is_empty() => return reply.error(libc::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        s.dir(parent).unwrap().entries.remove(name);
        reply.ok();
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state.lock().unwrap();
        let ino = match s.dir(parent).map(|d| d.entries.remove(name)) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(libc::ENOENT),
            Err(e) => return reply.error(e),
        };
        match s.dir(newparent) {
            Ok(d) => {
                d.entries.insert(newname.to_owned(), ino);
                reply.ok();
            }
            Err(e) => {
                s.dir(parent).unwrap().entries.insert(name.to_owned(), ino);
                reply.error(e);
            }
        }
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
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
        let mut s = self.state.lock().unwrap();
        match s.file(ino) {
            Ok(f) => {
                let start = (offset.max(0) as usize).min(f.data.len());
                let end = (start + size as usize).min(f.data.len());
                reply.data(&f.data[start..end]);
            }
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
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state.lock().unwrap();
        s.stats.writes += 1;
        match s.file(ino) {
            Ok(f) => {
                f.write(offset.max(0) as u64, data);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
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
        let mut s = self.state.lock().unwrap();
        s.stats.fsyncs += 1;
        if s.semantics == Semantics::Journal {
            s.commit_all_dirs();
        }
        match s.file(ino) {
            Ok(f) => {
                f.sync();
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state.lock().unwrap();
        let entries: Vec<(OsString, u64)> = match s.dir(ino) {
            Ok(d) => d.entries.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (OsString::from("."), ino, FileType::Directory),
            (OsString::from(".."), ROOT, FileType::Directory),
        ];
        for (name, child) in entries {
            let kind = match s.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, (i + 1) as i64, kind, &name) {
                break;
            }
        }
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
        let mut s = self.state.lock().unwrap();
        s.stats.dir_fsyncs += 1;
        if s.semantics == Semantics::Journal {
            s.commit_all_dirs();
            return reply.ok();
        }
        match s.dir(ino) {
            Ok(d) => {
                d.durable = d.entries.clone();
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = 64 * 1024 * 1024 * 1024 / PAGE;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
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
        if mode != 0 {
            return reply.error(libc::EOPNOTSUPP);
        }
        let mut s = self.state.lock().unwrap();
        match s.file(ino) {
            Ok(f) => {
                let end = (offset + length).max(0) as u64;
                if end > f.data.len() as u64 {
                    f.set_len(end);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`LossyFs`]; unmounted on drop.
pub struct LossyMount {
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

/// Why this machine cannot run the power-cut test, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or create the \
             device (mknod /dev/fuse c 10 229); .ci/run does this"
                .into(),
        );
    }
    // SAFETY-free check of the effective user: mounting without fusermount needs root.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some(format!(
            "mounting the test filesystem needs root (effective uid {uid}); run the tests as \
             root, as .ci/run does in CI"
        ));
    }
    None
}

impl LossyMount {
    /// Mounts an empty filesystem on `mountpoint` (an existing, empty folder).
    pub fn mount(mountpoint: &Path, semantics: Semantics) -> std::io::Result<LossyMount> {
        let mut m = LossyMount {
            mountpoint: mountpoint.to_path_buf(),
            state: Arc::new(Mutex::new(State::new(semantics))),
            session: None,
        };
        m.attach()?;
        Ok(m)
    }

    fn attach(&mut self) -> std::io::Result<()> {
        let fs = LossyFs {
            state: self.state.clone(),
        };
        let options = [
            MountOption::FSName("lossyfs".into()),
            MountOption::DefaultPermissions,
        ];
        self.session = Some(fuser::spawn_mount2(fs, &self.mountpoint, &options)?);
        // The mount is in place once the root answers through it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(&self.mountpoint).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "lossyfs did not come up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The mounted folder.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Cuts the power: unmounts, forgets every write not made durable, mounts
    /// again. Every process using the filesystem must have been killed first.
    pub fn power_cut(&mut self) -> std::io::Result<()> {
        if let Some(session) = self.session.take() {
            session.join();
        }
        self.state.lock().unwrap().power_cut();
        self.attach()
    }

    /// What the filesystem saw so far.
    pub fn stats(&self) -> FsStats {
        self.state.lock().unwrap().stats.clone()
    }
}

impl Drop for LossyMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.join();
        }
    }
}
