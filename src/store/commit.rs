//! Group commit: writers apply their batch, take a ticket, and wait; one
//! flusher task makes every batch applied so far durable with a single sled
//! flush, so concurrent publishes share the cost of one fsync.
//!
//! The flusher also watches the store's health. sled 0.34 treats any I/O
//! error while writing its log (disk full, read-only remount, failing disk)
//! as fatal for the open database: every later write fails with the same
//! error until the database is opened again. The first such error is kept
//! as the store's failure, so the service can report it (health, logs) and
//! lanes stop sending what they could not record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::error::{Error, Result};

/// Shared by every writer of one database.
pub struct GroupCommit {
    shared: Arc<Shared>,
}

struct Shared {
    /// Last ticket handed out; a ticket is taken after its batch was applied.
    issued: AtomicU64,
    /// Wakes the flusher.
    wake: Notify,
    /// (highest ticket known durable, highest ticket whose flush failed).
    done: watch::Sender<(u64, u64)>,
    /// Set when the store is dropped: the flusher ends and releases the database.
    closed: AtomicBool,
    /// The first write error of the open database; None while healthy.
    failure: watch::Sender<Option<String>>,
}

/// How often an idle flusher checks that the database still takes writes (a
/// backstop: the write paths report their own errors at once).
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Key in sled's default tree rewritten by the probe.
const PROBE_KEY: &[u8] = b"health_probe";

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// Keeps the first write error and says once, clearly, what it means.
    fn fail(&self, e: &sled::Error) {
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
}

impl GroupCommit {
    /// Starts the flusher task for `db`. Needs a tokio runtime.
    pub fn start(db: sled::Db) -> GroupCommit {
        let (done, _) = watch::channel((0, 0));
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Notify::new(),
            done,
            closed: AtomicBool::new(false),
            failure: watch::channel(None).0,
        });
        let flusher = shared.clone();
        tokio::spawn(async move {
            let shared = flusher;
            loop {
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                // Tickets up to `target` belong to batches already applied.
                let target = shared.issued.load(Ordering::Acquire);
                let (ok, failed) = *shared.done.borrow();
                if target <= ok.max(failed) {
                    // Nothing new to flush (after a failure, only new writes
                    // are worth another try). A notify_one before this point
                    // left a permit: no lost wake-up.
                    if tokio::time::timeout(PROBE_INTERVAL, shared.wake.notified())
                        .await
                        .is_err()
                        && shared.failure.borrow().is_none()
                    {
                        // Idle: a tiny write tells whether sled still takes writes.
                        if let Err(e) = db.insert(PROBE_KEY, &[][..]) {
                            shared.fail(&e);
                        }
                    }
                    continue;
                }
                if shared.failure.borrow().is_some() {
                    // sled refuses writes after its first I/O error, and a
                    // flush then can wait forever for a log position that
                    // will never be written: fail the waiters instead.
                    shared.done.send_modify(|d| d.1 = d.1.max(target));
                    continue;
                }
                let result = db.flush_async().await;
                // The reason first: a waiter woken by the failed ticket reads it.
                if let Err(e) = &result {
                    shared.fail(e);
                }
                shared.done.send_modify(|d| match &result {
                    Ok(_) => d.0 = d.0.max(target),
                    Err(_) => d.1 = d.1.max(target),
                });
            }
        });
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
        self.shared.wake.notify_one();
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
