//! Group commit: writers apply their batch, take a ticket, and wait; one
//! committer thread makes every batch applied so far durable with a single
//! sled flush followed by a real fsync ([`DiskSync`]), so concurrent
//! publishes share the cost of one fsync. The committer also flushes every
//! [`BACKGROUND_SYNC`] on its own (sled's periodic flusher is off: its
//! `sync_all` of the log ran without fsyncing the blobs the log points at),
//! so writes nobody waits for (lane cursors, delivery records) reach the
//! disk within that time too.
//!
//! The committer also watches the store's health. sled 0.34 treats any I/O
//! error while writing its log (disk full, read-only remount, failing disk)
//! as fatal for the open database: every later write fails with the same
//! error until the database is opened again. The first such error (or a
//! failed fsync) is kept as the store's failure, so the service can report
//! it (health, logs) and lanes stop sending what they could not record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::durable::DiskSync;
use crate::error::{Error, Result};

/// Shared by every writer of one database.
pub struct GroupCommit {
    shared: Arc<Shared>,
}

struct Shared {
    /// Last ticket handed out; a ticket is taken after its batch was applied.
    issued: AtomicU64,
    /// Wakes the committer: (a ticket is waiting, the store was dropped).
    wake: Mutex<(bool, bool)>,
    wake_cv: Condvar,
    /// (highest ticket known durable, highest ticket whose commit failed).
    done: watch::Sender<(u64, u64)>,
    /// The first write error of the open database; None while healthy.
    failure: watch::Sender<Option<String>>,
}

/// How often an idle committer checks that the database still takes writes
/// (a backstop: the write paths report their own errors at once).
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the committer makes writes nobody waited for durable.
pub const BACKGROUND_SYNC: Duration = Duration::from_millis(500);
/// Key in sled's default tree rewritten by the probe.
const PROBE_KEY: &[u8] = b"health_probe";

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.wake.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.shared.wake_cv.notify_one();
    }
}

impl Shared {
    /// Keeps the first write error and says once, clearly, what it means.
    fn fail(&self, e: &dyn std::fmt::Display) {
        let first = self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(e.to_string());
                true
            } else {
                false
            }
        });
        if first {
            tracing::error!(
                error = %e,
                "the store cannot write to disk: writes are refused (UNAVAILABLE) and deliveries \
                 paused; acknowledged events are safe on disk; the service reopens the store \
                 once the data folder takes writes again"
            );
        }
    }

    fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Waits until a ticket is waiting, the store is dropped, or `timeout`.
    /// Returns (a ticket is waiting, the store was dropped).
    fn wait(&self, timeout: Duration) -> (bool, bool) {
        let mut w = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        if !w.0 && !w.1 {
            w = self
                .wake_cv
                .wait_timeout(w, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let state = *w;
        w.0 = false;
        state
    }

    /// One commit: flush, then fsync. Tickets up to `target` were applied
    /// before it started, so they are durable when it succeeds.
    fn commit(&self, db: &sled::Db, disk: &mut DiskSync, target: u64) {
        if self.failed() {
            // sled refuses writes after its first I/O error, and a flush then
            // can wait forever for a log position that will never be
            // written: fail the waiters instead.
            self.done.send_modify(|d| d.1 = d.1.max(target));
            return;
        }
        let result = db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| disk.sync().map_err(|e| format!("fsync: {e}")));
        // The reason first: a waiter woken by the failed ticket reads it.
        if let Err(e) = &result {
            self.fail(e);
        }
        self.done.send_modify(|d| match &result {
            Ok(_) => d.0 = d.0.max(target),
            Err(_) => d.1 = d.1.max(target),
        });
    }
}

impl GroupCommit {
    /// Starts the committer thread for `db`, which fsyncs through `disk`.
    pub fn start(db: sled::Db, mut disk: DiskSync) -> GroupCommit {
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Mutex::new((false, false)),
            wake_cv: Condvar::new(),
            done: watch::channel((0, 0)).0,
            failure: watch::channel(None).0,
        });
        let committer = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || {
                let shared = committer;
                let mut last_probe = Instant::now();
                loop {
                    let (_, closed) = shared.wait(BACKGROUND_SYNC);
                    if closed {
                        // Releases the database (the thread holds a handle).
                        return;
                    }
                    let target = shared.issued.load(Ordering::Acquire);
                    let (ok, failed) = *shared.done.borrow();
                    if target > ok.max(failed) {
                        shared.commit(&db, &mut disk, target);
                        continue;
                    }
                    if shared.failed() {
                        continue;
                    }
                    // Idle: make untracked writes durable, and now and then
                    // check with a tiny write that sled still takes writes.
                    if last_probe.elapsed() >= PROBE_INTERVAL {
                        last_probe = Instant::now();
                        if let Err(e) = db.insert(PROBE_KEY, &[][..]) {
                            shared.fail(&e);
                            continue;
                        }
                    }
                    shared.commit(&db, &mut disk, target);
                }
            });
        if let Err(e) = spawned {
            shared.fail(&format!("cannot start the group-commit thread: {e}"));
        }
        GroupCommit { shared }
    }

    /// The first write error of the open database, if any (see the module doc).
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.borrow().clone()
    }

    /// Changes when the store fails.
    pub fn watch_failure(&self) -> watch::Receiver<Option<String>> {
        self.shared.failure.subscribe()
    }

    /// Checks with a tiny write that the database still takes writes;
    /// records the failure if not.
    pub fn probe(&self, db: &sled::Db) -> Result<()> {
        if let Some(f) = self.failure() {
            return Err(Error::Unavailable(f));
        }
        db.insert(PROBE_KEY, &[][..]).map_err(|e| {
            self.note_error(&e);
            Error::from(e)
        })?;
        Ok(())
    }

    /// Records `e` as the store's failure when it is a write error.
    pub fn note_error(&self, e: &sled::Error) {
        if matches!(e, sled::Error::Io(_)) {
            self.shared.fail(e);
        }
    }

    /// A ticket for everything applied so far.
    pub fn ticket(&self) -> u64 {
        self.shared.issued.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Resolves once the batch behind `ticket` is on disk.
    pub async fn durable(&self, ticket: u64) -> Result<()> {
        let mut rx = self.shared.done.subscribe();
        {
            self.shared.wake.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
            self.shared.wake_cv.notify_one();
        }
        loop {
            let (ok, failed) = *rx.borrow_and_update();
            if ok >= ticket {
                return Ok(());
            }
            if failed >= ticket {
                let why = self.failure().unwrap_or_default();
                return Err(Error::Unavailable(format!(
                    "flushing to disk failed: {why}"
                )));
            }
            if rx.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }
}
