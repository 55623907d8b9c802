//! Group commit: writers apply their batch, take a ticket, and wait; one
//! flusher task makes every batch applied so far durable with a single sled
//! flush, so concurrent publishes share the cost of one fsync.

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
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
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
                if target <= shared.done.borrow().0 {
                    // A notify_one before this point left a permit: no lost wake-up.
                    shared.wake.notified().await;
                    continue;
                }
                let result = db.flush_async().await;
                shared.done.send_modify(|d| match &result {
                    Ok(_) => d.0 = d.0.max(target),
                    Err(_) => d.1 = d.1.max(target),
                });
                if let Err(e) = result {
                    tracing::error!(error = %e, "flushing the store failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        });
        GroupCommit { shared }
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
                return Err(Error::Unavailable("flushing to disk failed".into()));
            }
            if rx.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }
}
