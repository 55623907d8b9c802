//! Making what sled wrote survive a power loss.
//!
//! sled 0.34's `flush` writes its log with `pwrite` + `sync_file_range`,
//! which pushes data pages towards the device but persists neither the
//! file's metadata (its size, when the log grew) nor the device's write
//! cache. Items larger than a quarter segment (128 KiB), among them any leaf
//! node of 16 chunks of ~16 KiB, go to files of their own under `blobs/`
//! that sled never fsyncs, and new directory entries (blobs, snapshots, the
//! database files themselves) are never made durable either. sled's recovery
//! reads every blob the log points at: a blob that did not survive is
//! skipped (a page version silently lost), a torn one ends recovery there.
//!
//! [`DiskSync`] closes those gaps. Called after a sled flush, it fsyncs, in
//! this order, every blob file sled finished writing since the last call,
//! the directories whose entries changed, then the log file itself, so a
//! log that points at a blob is never durable before the blob. It learns
//! which files changed from inotify instead of listing `blobs/` (which holds
//! a file per large node, thousands in a big database) on every commit.
//!
//! What remains: sled's own `sync_file_range` can push log bytes to the
//! device before this runs; if the power fails in that window and those
//! bytes point at a blob this has not fsynced yet, the blob may be lost.
//! The window is the time between sled writing the log and this call
//! (microseconds to milliseconds); nothing acknowledged depends on it, since
//! no acknowledgement is sent before this call returns.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// fsyncs what sled wrote; see the module documentation.
pub struct DiskSync {
    /// sled's folder (`data_dir/db`).
    dir: PathBuf,
    /// sled's log file, opened once: sled never replaces it.
    log: File,
    inotify: Inotify,
    dir_watch: WatchDescriptor,
    blobs_watch: WatchDescriptor,
    /// Blob files written since the last sync.
    blobs: BTreeSet<OsString>,
    /// Whether `dir` / `dir/blobs` gained or lost entries since the last sync.
    dir_changed: bool,
    blobs_changed: bool,
    /// The event queue overflowed: sync everything once.
    rescan: bool,
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// fsyncs `path` if it exists.
fn sync_file(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_data(),
        // Removed by sled meanwhile (a blob it no longer needs).
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl DiskSync {
    /// Starts watching the sled database in `dir` (as opened with
    /// `sled::Config::path(dir)`) and makes what is there now durable:
    /// every file, `dir` itself and its two parents (the data folder and
    /// the folder holding it, which may have been created just now).
    pub fn open(dir: &Path) -> io::Result<DiskSync> {
        let inotify = Inotify::init()?;
        let changes = WatchMask::CREATE
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE;
        let dir_watch = inotify.watches().add(dir, changes)?;
        let blobs_watch = inotify.watches().add(dir.join("blobs"), changes)?;
        let mut sync = DiskSync {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            inotify,
            dir_watch,
            blobs_watch,
            blobs: BTreeSet::new(),
            dir_changed: false,
            blobs_changed: false,
            rescan: true,
        };
        sync.sync()?;
        let mut up = dir.parent();
        for _ in 0..2 {
            let Some(parent) = up.filter(|p| !p.as_os_str().is_empty()) else {
                break;
            };
            sync_dir(parent)?;
            up = parent.parent();
        }
        Ok(sync)
    }

    /// Collects the changes inotify reported since the last call.
    fn collect(&mut self) -> io::Result<()> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let events = match self.inotify.read_events(&mut buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut any = false;
            for e in events {
                any = true;
                if e.mask.contains(EventMask::Q_OVERFLOW) {
                    self.rescan = true;
                    continue;
                }
                let entry_changed = e.mask.intersects(
                    EventMask::CREATE
                        | EventMask::MOVED_TO
                        | EventMask::MOVED_FROM
                        | EventMask::DELETE,
                );
                if e.wd == self.blobs_watch {
                    self.blobs_changed |= entry_changed;
                    if e.mask.contains(EventMask::CLOSE_WRITE) {
                        if let Some(name) = e.name {
                            self.blobs.insert(name.to_os_string());
                        }
                    }
                } else if e.wd == self.dir_watch {
                    self.dir_changed |= entry_changed;
                }
            }
            if !any {
                return Ok(());
            }
        }
    }

    /// Makes everything sled wrote before the last completed flush durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.collect()?;
        let blobs_dir = self.dir.join("blobs");
        if std::mem::take(&mut self.rescan) {
            for entry in std::fs::read_dir(&blobs_dir)? {
                self.blobs.insert(entry?.file_name());
            }
            // Files of the database folder itself (conf, snapshots).
            for entry in std::fs::read_dir(&self.dir)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    sync_file(&entry.path())?;
                }
            }
            self.blobs_changed = true;
            self.dir_changed = true;
        }
        for name in std::mem::take(&mut self.blobs) {
            sync_file(&blobs_dir.join(name))?;
        }
        if std::mem::take(&mut self.blobs_changed) {
            sync_dir(&blobs_dir)?;
        }
        if std::mem::take(&mut self.dir_changed) {
            sync_dir(&self.dir)?;
        }
        // Last: a log pointing at a blob never becomes durable before it.
        self.log.sync_data()
    }
}
