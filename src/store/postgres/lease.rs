//! The lease task: how routers share the lanes.
//!
//! Every `lease_ttl / 3` (and soon after a webhook is created here or
//! elsewhere) a round:
//! 1. writes this router's heartbeat (`routers.alive_until = now() + ttl`);
//! 2. renews every lease it holds (one statement); a lease that did not
//!    renew was taken over (or its webhook deleted): the lane is dropped
//!    from memory at once (its next operation starts over, see `engine.rs`);
//! 3. counts the lanes and the live routers (heartbeat not expired) and
//!    takes lanes nobody holds, or whose lease expired, up to its fair
//!    share `ceil(lanes / live routers)`; or, holding more than that (a
//!    router joined), gives up the excess among its idle lanes (nothing in
//!    flight or unwritten), so the newcomer takes them next round.
//!
//! Each lane acquired is announced as [`Change::LaneAcquired`]. A router
//! that died stops renewing: its leases expire after the TTL and the others
//! take them in their next round, so within TTL + one round; its heartbeat
//! expires at the same time, so the fair share grows. The database's clock
//! decides expiry; this router stops taking new work on its lanes (not
//! writing: writes are fenced anyway) once its last successful renewal is
//! older than the TTL by its own clock (see [`PgStore::leases_valid`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::engine::LaneState;
use super::{map_db, Inner, LeaseRef, PgStore};
use crate::error::Result;
use crate::store::types::{Change, LaneKey};

/// The least time between two rounds a wake-up asks for.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(50);

/// Runs lease rounds until the store is dropped or stopped.
pub(super) async fn lease_task(
    weak: Weak<Inner>,
    mut stop: watch::Receiver<bool>,
    wake: Arc<Notify>,
    ttl: Duration,
) {
    let period = ttl / 3;
    loop {
        // 0: the period passed, 1: woken, 2: stop.
        let why = tokio::select! {
            _ = tokio::time::sleep(period) => 0,
            _ = wake.notified() => 1,
            _ = stop.wait_for(|s| *s) => 2,
        };
        match why {
            2 => return,
            1 => tokio::time::sleep(WAKE_DEBOUNCE).await,
            _ => {}
        }
        let Some(store) = PgStore::upgrade(&weak) else {
            return;
        };
        if store.inner.leases_paused.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(e) = store.lease_round().await {
            store.note_error(&e);
            tracing::warn!(error = %e, "postgres: lease round failed");
        }
    }
}

impl PgStore {
    /// Writes this router's heartbeat.
    pub(super) async fn heartbeat(&self) -> Result<()> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO routers (owner, alive_until) \
                 VALUES ($1, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (owner) DO UPDATE SET alive_until = excluded.alive_until",
            )
            .await
            .map_err(map_db)?;
        client
            .execute(&stmt, &[&self.inner.owner, &ttl_ms(self.inner.lease_ttl)])
            .await
            .map_err(map_db)?;
        Ok(())
    }

    /// One lease round (see the module doc).
    pub(super) async fn lease_round(&self) -> Result<()> {
        let started = tokio::time::Instant::now();
        let ttl = self.inner.lease_ttl;
        let owner = self.inner.owner.clone();
        self.heartbeat().await?;
        let held = self.inner.lanes.held();
        let refs: Vec<LeaseRef> = held
            .iter()
            .map(|(h, e)| LeaseRef {
                webhook_id: h.key.webhook_id.clone(),
                mode: h.key.mode,
                epoch: *e,
            })
            .collect();
        let renewed = self.renew(&owner, &refs, ttl).await?;
        let mut kept = 0usize;
        for ((h, epoch), ok) in held.iter().zip(&renewed) {
            if *ok {
                kept += 1;
            } else if h.lose(Some(*epoch)) {
                // The renewal is a lane write conditional on the epoch too:
                // refused, it counts as fenced like any other.
                self.count_fenced(1);
                h.sync_now();
                tracing::warn!(
                    webhook_id = %h.key.webhook_id,
                    mode = ?h.key.mode,
                    "postgres: lease lost (taken over or webhook deleted); lane dropped"
                );
            }
        }
        let lapsed = {
            let mut until = self
                .inner
                .leases_valid_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let lapsed = until.is_some_and(|t| t <= tokio::time::Instant::now());
            *until = Some(started + ttl);
            lapsed
        };
        if lapsed {
            // Lanes that stopped taking work while the leases were not
            // renewed: look at them again.
            for (h, _) in held
                .iter()
                .zip(&renewed)
                .filter(|(_, ok)| **ok)
                .map(|(h, _)| h)
            {
                self.send_change(Change::LaneAcquired(h.key.clone()));
            }
        }
        let (lanes, routers) = {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT (SELECT count(*) FROM lanes), \
                            (SELECT count(*) FROM routers WHERE alive_until > now())",
                )
                .await
                .map_err(map_db)?;
            let row = client.query_one(&stmt, &[]).await.map_err(map_db)?;
            (
                row.get::<_, i64>(0).max(0) as usize,
                row.get::<_, i64>(1).max(1) as usize,
            )
        };
        let share = lanes.div_ceil(routers);
        if kept < share {
            for lease in self.acquire_lanes(&owner, share, ttl).await? {
                let key = LaneKey {
                    account_id: lease.account_id,
                    webhook_id: lease.webhook_id.clone(),
                    mode: lease.mode,
                };
                if self.is_deleted_mem(&key.webhook_id) {
                    continue;
                }
                let h = self.inner.lanes.handle(&key);
                if h.adopt(
                    lease.epoch,
                    LaneState::from_row(lease.cursor_seq, &lease.state),
                ) {
                    h.sync_now();
                    tracing::debug!(webhook_id = %key.webhook_id, mode = ?key.mode, epoch = lease.epoch, "postgres: lane acquired");
                    self.send_change(Change::LaneAcquired(key));
                }
            }
        } else if kept > share {
            self.release_idle(kept - share).await?;
        }
        Ok(())
    }

    /// Gives up to `n` held lanes that are idle (see the module doc).
    async fn release_idle(&self, n: usize) -> Result<()> {
        let held = self.inner.lanes.held();
        let mut idle = Vec::new();
        for (h, epoch) in &held {
            if idle.len() >= n {
                break;
            }
            if let Some(slot) = h.idle() {
                if h.epoch() == *epoch {
                    idle.push((h.clone(), *epoch, slot));
                }
            }
        }
        if idle.is_empty() {
            return Ok(());
        }
        let refs: Vec<LeaseRef> = idle
            .iter()
            .map(|(h, e, _)| LeaseRef {
                webhook_id: h.key.webhook_id.clone(),
                mode: h.key.mode,
                epoch: *e,
            })
            .collect();
        let released = self.release(&self.inner.owner, &refs).await?;
        for (h, _, mut slot) in idle {
            h.released(&mut slot);
        }
        tracing::debug!(
            released,
            "postgres: lanes over this router's fair share given up"
        );
        Ok(())
    }

    /// Gives up every lease and the heartbeat (at shutdown).
    pub(super) async fn release_all(&self) -> Result<()> {
        let held = self.inner.lanes.held();
        let refs: Vec<LeaseRef> = held
            .iter()
            .map(|(h, e)| LeaseRef {
                webhook_id: h.key.webhook_id.clone(),
                mode: h.key.mode,
                epoch: *e,
            })
            .collect();
        for (h, e) in &held {
            h.lose(Some(*e));
            h.sync_locked().await;
        }
        self.release(&self.inner.owner, &refs).await?;
        let client = self.client().await?;
        client
            .execute("DELETE FROM routers WHERE owner = $1", &[&self.inner.owner])
            .await
            .map_err(map_db)?;
        Ok(())
    }
}

/// A duration in whole milliseconds, at least 1.
pub(super) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}
