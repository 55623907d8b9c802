//! The janitor's rounds on PostgreSQL, one bounded round at a time.
//!
//! Every router runs rounds (the dispatcher's janitor task); what a round
//! does depends on what the router holds:
//! - expiry, by the lane's owner: each router expires the lanes it holds
//!   (under the lane's lock, fenced like every lane write): the lane's
//!   events older than `delivery.retention_ms` that it has not taken leave
//!   it in EXPIRED records and its cursor moves past them. A lane held by
//!   another router is that router's to expire; a lane nobody holds (no
//!   router alive) is expired by whoever takes it, at its next round;
//! - the rest, only by the router holding the `janitor` chore lease
//!   ([`PgStore::acquire_job`]); the others report nothing but their own
//!   expiries:
//!   - purge finished deliveries by finish time, in two classes: delivered
//!     ones after `retention_ms`, dead and expired ones after
//!     `dead_retention_ms` (at most [`PURGE_PER_ROUND`] rows);
//!   - trim each account's log of events older than `retention_ms` that
//!     every lane of the account has passed (the lowest stored cursor; a
//!     delivery that needs its events after that keeps them with it), at
//!     most [`TRIM_PER_ROUND`] events per account;
//!   - remove what deleted webhooks left (delivery records, requeued
//!     deliveries), at most [`CLEAN_PER_ROUND`] rows;
//!   - forget routers whose heartbeat is older than an hour.
//!
//! `more` is set when a bound was reached. Unlike the sled store, whose
//! trimming is by age alone, the log here is trimmed only as far as every
//! lane's stored cursor: a lane that did not expire its old events yet
//! (its router's round comes later) holds the trim back until it has.

use std::collections::HashMap;
use std::sync::Arc;

use super::{map_db, to_i64, to_u64, PgStore};
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::LaneFilter;
use crate::error::Result;
use crate::store::types::JanitorReport;

/// Finished records purged per round.
const PURGE_PER_ROUND: usize = 1000;
/// Rows of deleted webhooks removed per round.
const CLEAN_PER_ROUND: usize = 1000;
/// Events examined for trimming per account and round.
const TRIM_PER_ROUND: u64 = 10_000;
/// The chore lease's name.
const JANITOR_JOB: &str = "janitor";

impl PgStore {
    /// [`crate::store::LaneStore::janitor_round`] (see the module doc).
    pub(super) async fn janitor_round_impl(
        &self,
        catalog: Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> Result<JanitorReport> {
        let mut report = JanitorReport::default();
        let before_ms = now_ms.saturating_sub(retention_ms);
        let held = self.inner.lanes.held();
        let janitor = self
            .acquire_job(JANITOR_JOB, &self.inner.owner, self.inner.lease_ttl)
            .await?
            .is_some();
        if held.is_empty() && !janitor {
            return Ok(report);
        }
        let accounts: Vec<(u64, u64)> = {
            let client = self.client().await?;
            client
                .query(
                    "SELECT account_id, trimmed_seq FROM accounts WHERE head_seq > trimmed_seq \
                     ORDER BY account_id",
                    &[],
                )
                .await
                .map_err(map_db)?
                .iter()
                .map(|r| (to_u64(r.get(0)), to_u64(r.get(1))))
                .collect()
        };
        let webhooks: HashMap<String, crate::domain::webhook::Webhook> = if held.is_empty() {
            HashMap::new()
        } else {
            self.all_webhooks()
                .await?
                .into_iter()
                .map(|w| (w.id.clone(), w))
                .collect()
        };
        for (account, trimmed) in accounts {
            let lanes: Vec<_> = held
                .iter()
                .filter(|(h, _)| h.key.account_id == account)
                .collect();
            if lanes.is_empty() && !janitor {
                continue;
            }
            let Some(horizon) = self
                .trim_horizon(account, trimmed, before_ms, TRIM_PER_ROUND)
                .await?
            else {
                continue;
            };
            for (h, _) in lanes {
                let Some(w) = webhooks.get(&h.key.webhook_id) else {
                    continue;
                };
                let filter = LaneFilter::new(w, Mode::from(h.key.mode), catalog.clone());
                let n = self.expire_lane(h, &filter, horizon, now_ms).await?;
                if n > 0 {
                    report.expired.push((h.key.clone(), n));
                }
            }
            if janitor {
                let trimmed_now = self.trim_through(account, trimmed, horizon).await?;
                report.more |= trimmed_now >= TRIM_PER_ROUND;
                report.trimmed += trimmed_now;
            }
        }
        if janitor {
            report.purged = self
                .purge_finished(now_ms, retention_ms, dead_retention_ms, PURGE_PER_ROUND)
                .await?;
            report.cleaned = self.clean_deleted(CLEAN_PER_ROUND).await?;
            report.more |= report.purged >= PURGE_PER_ROUND || report.cleaned >= CLEAN_PER_ROUND;
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM routers WHERE alive_until < now() - interval '1 hour'",
                    &[],
                )
                .await
                .map_err(map_db)?;
        }
        Ok(report)
    }

    /// The last sequence number of the account's oldest events stored
    /// before `before_ms`, looking at most `max_events` past `trimmed`;
    /// None when none is that old.
    async fn trim_horizon(
        &self,
        account_id: u64,
        trimmed: u64,
        before_ms: i64,
        max_events: u64,
    ) -> Result<Option<u64>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT min(CASE WHEN ingest_ms >= $4 THEN seq END), max(seq) FROM \
                 (SELECT seq, ingest_ms FROM events WHERE account_id = $1 AND seq > $2 \
                  ORDER BY seq LIMIT $3) AS s",
            )
            .await
            .map_err(map_db)?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &to_i64(account_id),
                    &to_i64(trimmed),
                    &i64::try_from(max_events).unwrap_or(i64::MAX),
                    &before_ms,
                ],
            )
            .await
            .map_err(map_db)?;
        let young: Option<i64> = row.get(0);
        let last: Option<i64> = row.get(1);
        let horizon = match (young, last) {
            (Some(y), _) => to_u64(y).saturating_sub(1),
            (None, Some(l)) => to_u64(l),
            (None, None) => return Ok(None),
        };
        Ok((horizon > trimmed).then_some(horizon))
    }

    /// Removes the account's events after `trimmed` up to `horizon`, but
    /// not past any of its lanes' stored cursors; returns how many.
    async fn trim_through(&self, account_id: u64, trimmed: u64, horizon: u64) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        let lowest: Option<i64> = tx
            .query_one(
                "SELECT min(cursor_seq) FROM lanes WHERE account_id = $1",
                &[&to_i64(account_id)],
            )
            .await
            .map_err(map_db)?
            .get(0);
        let through = lowest.map_or(horizon, |c| horizon.min(to_u64(c)));
        if through <= trimmed {
            return Ok(0);
        }
        let removed = tx
            .execute(
                "DELETE FROM events WHERE account_id = $1 AND seq > $2 AND seq <= $3",
                &[&to_i64(account_id), &to_i64(trimmed), &to_i64(through)],
            )
            .await
            .map_err(map_db)?;
        tx.execute(
            "UPDATE accounts SET trimmed_seq = $2 WHERE account_id = $1 AND trimmed_seq < $2",
            &[&to_i64(account_id), &to_i64(through)],
        )
        .await
        .map_err(map_db)?;
        tx.commit().await.map_err(map_db)?;
        Ok(removed)
    }

    /// Removes finished records whose retention has passed (delivered after
    /// `delivered_keep_ms`, dead or expired after `dead_keep_ms`), oldest
    /// first, at most `limit`; returns how many.
    async fn purge_finished(
        &self,
        now_ms: i64,
        delivered_keep_ms: i64,
        dead_keep_ms: i64,
        limit: usize,
    ) -> Result<usize> {
        use super::deliveries::state_code;
        use crate::domain::delivery::DeliveryState;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM deliveries WHERE (webhook_id, delivery_id) IN \
                 (SELECT webhook_id, delivery_id FROM deliveries \
                  WHERE state = $1 AND finish_ms IS NOT NULL AND finish_ms <= $2 \
                  ORDER BY finish_ms LIMIT $3)",
            )
            .await
            .map_err(map_db)?;
        let mut handled = 0usize;
        for (state, keep) in [
            (DeliveryState::Delivered, delivered_keep_ms),
            (DeliveryState::Dead, dead_keep_ms),
            (DeliveryState::Expired, dead_keep_ms),
        ] {
            if handled >= limit {
                break;
            }
            let cutoff = now_ms.saturating_sub(keep);
            let n = client
                .execute(
                    &stmt,
                    &[
                        &state_code(state),
                        &cutoff,
                        &i64::try_from(limit - handled).unwrap_or(i64::MAX),
                    ],
                )
                .await
                .map_err(map_db)?;
            handled += n as usize;
        }
        Ok(handled)
    }

    /// Removes up to `limit` rows deleted webhooks left; a tombstone is
    /// marked cleaned once nothing of its webhook is left (it stays, so the
    /// id is never used again). Returns how many rows were removed.
    async fn clean_deleted(&self, limit: usize) -> Result<usize> {
        let client = self.client().await?;
        let tombs: Vec<String> = client
            .query(
                "SELECT webhook_id FROM deleted_webhooks WHERE NOT cleaned \
                 ORDER BY webhook_id LIMIT 100",
                &[],
            )
            .await
            .map_err(map_db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut removed = 0usize;
        for id in tombs {
            let mut left = false;
            for sql in [
                "DELETE FROM deliveries WHERE (webhook_id, delivery_id) IN \
                 (SELECT webhook_id, delivery_id FROM deliveries WHERE webhook_id = $1 LIMIT $2)",
                "DELETE FROM requeued WHERE (webhook_id, mode, delivery_id) IN \
                 (SELECT webhook_id, mode, delivery_id FROM requeued WHERE webhook_id = $1 LIMIT $2)",
                "DELETE FROM lanes WHERE (webhook_id, mode) IN \
                 (SELECT webhook_id, mode FROM lanes WHERE webhook_id = $1 LIMIT $2)",
            ] {
                let budget = limit.saturating_sub(removed);
                if budget == 0 {
                    left = true;
                    break;
                }
                let n = client
                    .execute(sql, &[&id, &i64::try_from(budget).unwrap_or(i64::MAX)])
                    .await
                    .map_err(map_db)? as usize;
                removed += n;
                if n >= budget {
                    left = true;
                    break;
                }
            }
            if left {
                return Ok(removed);
            }
            client
                .execute(
                    "UPDATE deleted_webhooks SET cleaned = true WHERE webhook_id = $1",
                    &[&id],
                )
                .await
                .map_err(map_db)?;
        }
        Ok(removed)
    }
}
