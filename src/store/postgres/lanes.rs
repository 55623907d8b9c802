//! Lane leases: the primitives a delivery engine shares lanes among
//! routers with.
//!
//! A lane (webhook × mode) is one `lanes` row. A router leases lanes in
//! bulk for a while ([`PgStore::acquire_lanes`]), renews them
//! ([`PgStore::renew`]), writes their progress ([`PgStore::advance`]) and
//! lets them go ([`PgStore::release`]). No lock is held between calls:
//! each is one short statement.
//!
//! Fencing: the lane's `epoch` increases whenever its lease changes hands
//! (a lease taken over after expiry, or taken after a release), and every
//! write names the epoch and the owner it was leased with. A router that
//! lost its lease (it was paused, partitioned or slow past the TTL and
//! another took over) matches no row and is told so (`false`): it must
//! drop the lane. The worst case is a payload sent twice, never a skip.
//! A write whose lease expired but was not taken over still succeeds: no
//! one else can have written in between, since taking over bumps the epoch.
//! Times (`lease_until`) are the database's clock, so routers' clocks need
//! not agree.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::webhooks::{lane_mode_code, lane_mode_of};
use super::{map_db, to_i64, to_u64, PgStore};
use crate::domain::delivery::ModeTag;
use crate::error::Result;

/// A leased lane, as [`PgStore::acquire_lanes`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The webhook's account.
    pub account_id: u64,
    /// The webhook.
    pub webhook_id: String,
    /// Real-time or batch lane.
    pub mode: ModeTag,
    /// Last log sequence number the lane took or passed over.
    pub cursor_seq: u64,
    /// The engine's state of the lane (opaque here; empty for a new lane).
    pub state: Vec<u8>,
    /// When the lane wants to run next, epoch ms (0: now).
    pub next_at_ms: i64,
    /// The lease's fencing token: name it in every write.
    pub epoch: u64,
}

/// Names a held lease in [`PgStore::renew`] and [`PgStore::release`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The webhook.
    pub webhook_id: String,
    /// Real-time or batch lane.
    pub mode: ModeTag,
    /// The epoch it was leased with.
    pub epoch: u64,
}

impl From<&Lease> for LeaseRef {
    fn from(l: &Lease) -> Self {
        LeaseRef {
            webhook_id: l.webhook_id.clone(),
            mode: l.mode,
            epoch: l.epoch,
        }
    }
}

/// New progress of a leased lane, for [`PgStore::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneWrite {
    /// The webhook.
    pub webhook_id: String,
    /// Real-time or batch lane.
    pub mode: ModeTag,
    /// The epoch it was leased with.
    pub epoch: u64,
    /// The new cursor.
    pub cursor_seq: u64,
    /// The engine's new state of the lane.
    pub state: Vec<u8>,
    /// When the lane wants to run next, epoch ms (0: now).
    pub next_at_ms: i64,
}

/// A duration in whole milliseconds, at least 1.
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

const ACQUIRE: &str = "UPDATE lanes AS l SET \
       lease_owner = $1, \
       lease_until = now() + $2::bigint * interval '1 millisecond', \
       epoch = CASE WHEN l.lease_owner IS DISTINCT FROM $1 THEN l.epoch + 1 ELSE l.epoch END \
     FROM (SELECT webhook_id, mode FROM lanes \
           WHERE lease_owner IS NULL OR lease_until IS NULL OR lease_until < now() \
              OR lease_owner = $1 \
           ORDER BY CASE WHEN lease_owner = $1 THEN 0 ELSE 1 END \
           LIMIT $3 FOR UPDATE SKIP LOCKED) AS c \
     WHERE l.webhook_id = c.webhook_id AND l.mode = c.mode \
     RETURNING l.account_id, l.webhook_id, l.mode, l.cursor_seq, l.state, l.next_at_ms, l.epoch";

const RENEW: &str = "UPDATE lanes AS l SET \
       lease_until = now() + $2::bigint * interval '1 millisecond' \
     FROM unnest($3::text[], $4::smallint[], $5::bigint[]) AS u(w, m, e) \
     WHERE l.webhook_id = u.w AND l.mode = u.m AND l.epoch = u.e AND l.lease_owner = $1 \
     RETURNING l.webhook_id, l.mode, l.epoch";

const ADVANCE: &str = "UPDATE lanes AS l SET \
       cursor_seq = u.c, state = u.s, next_at_ms = u.n \
     FROM unnest($2::text[], $3::smallint[], $4::bigint[], $5::bigint[], $6::bytea[], \
                 $7::bigint[]) AS u(w, m, e, c, s, n) \
     WHERE l.webhook_id = u.w AND l.mode = u.m AND l.epoch = u.e AND l.lease_owner = $1 \
     RETURNING l.webhook_id, l.mode, l.epoch";

const RELEASE: &str = "UPDATE lanes AS l SET lease_owner = NULL, lease_until = NULL \
     FROM unnest($2::text[], $3::smallint[], $4::bigint[]) AS u(w, m, e) \
     WHERE l.webhook_id = u.w AND l.mode = u.m AND l.epoch = u.e AND l.lease_owner = $1 \
     RETURNING l.webhook_id, l.mode, l.epoch";

/// Which of `keys` (webhook, mode, epoch) are among the `rows` an UPDATE
/// returned (its epoch is unchanged by the update).
fn matched(keys: &[(&str, ModeTag, u64)], rows: &[tokio_postgres::Row]) -> Result<Vec<bool>> {
    let mut hit: HashSet<(String, ModeTag, u64)> = HashSet::with_capacity(rows.len());
    for r in rows {
        hit.insert((r.get(0), lane_mode_of(r.get(1))?, to_u64(r.get(2))));
    }
    Ok(keys
        .iter()
        .map(|(w, m, e)| hit.contains(&((*w).to_string(), *m, *e)))
        .collect())
}

impl PgStore {
    /// Creates the lane `webhook_id` × `mode` at `start_cursor` if it does
    /// not exist. False when the webhook does not exist (or was deleted):
    /// no lane is created for it.
    pub async fn ensure_lane(
        &self,
        account_id: u64,
        webhook_id: &str,
        mode: ModeTag,
        start_cursor: u64,
    ) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        // A share lock on the webhook: a delete waits for this transaction
        // (and then removes the lane) or has already removed the webhook.
        let live = tx
            .query_opt(
                "SELECT 1 FROM webhooks WHERE webhook_id = $1 FOR SHARE",
                &[&webhook_id],
            )
            .await
            .map_err(map_db)?
            .is_some();
        if !live {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO lanes (account_id, webhook_id, mode, cursor_seq) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (webhook_id, mode) DO NOTHING",
            &[
                &to_i64(account_id),
                &webhook_id,
                &lane_mode_code(mode),
                &to_i64(start_cursor),
            ],
        )
        .await
        .map_err(map_db)?;
        tx.commit().await.map_err(map_db)?;
        Ok(true)
    }

    /// Leases up to `max` lanes to `owner` for `ttl`: first the lanes
    /// `owner` holds already (renewed, their epoch kept), then lanes nobody
    /// holds or whose lease expired. A lane changing hands gets a new
    /// epoch. Lanes another router is leasing at this moment are skipped,
    /// not waited for. With `max` at least the number of lanes `owner`
    /// holds, the result is every lane it holds after the call.
    /// `owner` must be unique per router process (e.g. host, pid and a
    /// random part).
    pub async fn acquire_lanes(
        &self,
        owner: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client.prepare_cached(ACQUIRE).await.map_err(map_db)?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        client
            .query(&stmt, &[&owner, &ttl_ms(ttl), &max])
            .await
            .map_err(map_db)?
            .iter()
            .map(|r| {
                Ok(Lease {
                    account_id: to_u64(r.get(0)),
                    webhook_id: r.get(1),
                    mode: lane_mode_of(r.get(2))?,
                    cursor_seq: to_u64(r.get(3)),
                    state: r.get(4),
                    next_at_ms: r.get(5),
                    epoch: to_u64(r.get(6)),
                })
            })
            .collect()
    }

    /// Extends `owner`'s leases by `ttl` from now, in one statement; one
    /// bool per lease, false for a lease no longer held (taken over or
    /// released: stop working the lane).
    pub async fn renew(
        &self,
        owner: &str,
        leases: &[LeaseRef],
        ttl: Duration,
    ) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (w, m, e) = columns(leases);
        let client = self.client().await?;
        let stmt = client.prepare_cached(RENEW).await.map_err(map_db)?;
        let rows = client
            .query(&stmt, &[&owner, &ttl_ms(ttl), &w, &m, &e])
            .await
            .map_err(map_db)?;
        matched(&keys(leases), &rows)
    }

    /// Writes the progress of `owner`'s lanes, all in one statement, each
    /// only if `owner` still holds it with the epoch named; one bool per
    /// write, false for a refused (fenced) one, counted in
    /// [`PgStore::fenced_writes`]. When one lane appears several times, the
    /// last write of it is the one applied and all its entries get its
    /// result.
    pub async fn advance(&self, owner: &str, writes: &[LaneWrite]) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        // One row per lane (an UPDATE … FROM takes one arbitrary match).
        let mut last: HashMap<(&str, ModeTag), usize> = HashMap::with_capacity(writes.len());
        for (i, w) in writes.iter().enumerate() {
            last.insert((w.webhook_id.as_str(), w.mode), i);
        }
        let mut chosen: Vec<usize> = last.values().copied().collect();
        chosen.sort_unstable();
        let mut cw = Vec::with_capacity(chosen.len());
        let mut cm = Vec::with_capacity(chosen.len());
        let mut ce = Vec::with_capacity(chosen.len());
        let mut cc = Vec::with_capacity(chosen.len());
        let mut cs: Vec<&[u8]> = Vec::with_capacity(chosen.len());
        let mut cn = Vec::with_capacity(chosen.len());
        for w in chosen.iter().filter_map(|&i| writes.get(i)) {
            cw.push(w.webhook_id.as_str());
            cm.push(lane_mode_code(w.mode));
            ce.push(to_i64(w.epoch));
            cc.push(to_i64(w.cursor_seq));
            cs.push(w.state.as_slice());
            cn.push(w.next_at_ms);
        }
        let client = self.client().await?;
        let stmt = client.prepare_cached(ADVANCE).await.map_err(map_db)?;
        let rows = client
            .query(&stmt, &[&owner, &cw, &cm, &ce, &cc, &cs, &cn])
            .await
            .map_err(map_db)?;
        // Every entry of a lane gets the result of its last write.
        let keys: Vec<(&str, ModeTag, u64)> = writes
            .iter()
            .map(|w| {
                let epoch = last
                    .get(&(w.webhook_id.as_str(), w.mode))
                    .and_then(|&i| writes.get(i))
                    .map_or(w.epoch, |x| x.epoch);
                (w.webhook_id.as_str(), w.mode, epoch)
            })
            .collect();
        let result = matched(&keys, &rows)?;
        let refused = result.iter().filter(|ok| !**ok).count() as u64;
        if refused > 0 {
            self.inner
                .stats
                .fenced_writes
                .fetch_add(refused, Ordering::Relaxed);
        }
        Ok(result)
    }

    /// Gives up `owner`'s leases (those it still holds with the epochs
    /// named), so another router may take them at once; returns how many
    /// were released.
    pub async fn release(&self, owner: &str, leases: &[LeaseRef]) -> Result<usize> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (w, m, e) = columns(leases);
        let client = self.client().await?;
        let stmt = client.prepare_cached(RELEASE).await.map_err(map_db)?;
        let rows = client
            .query(&stmt, &[&owner, &w, &m, &e])
            .await
            .map_err(map_db)?;
        Ok(rows.len())
    }

    /// Leases the cluster-wide chore `name` (e.g. the janitor) to `owner`
    /// for `ttl`, if nobody else holds it: Some(epoch) when `owner` holds
    /// it now (the epoch grows when it changes hands), None when another
    /// router does.
    pub async fn acquire_job(&self, name: &str, owner: &str, ttl: Duration) -> Result<Option<u64>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO jobs (name, owner, lease_until, epoch) \
                 VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond', 1) \
                 ON CONFLICT (name) DO UPDATE SET \
                   owner = excluded.owner, lease_until = excluded.lease_until, \
                   epoch = CASE WHEN jobs.owner IS DISTINCT FROM excluded.owner \
                           THEN jobs.epoch + 1 ELSE jobs.epoch END \
                 WHERE jobs.owner IS NULL OR jobs.lease_until IS NULL \
                   OR jobs.lease_until < now() OR jobs.owner = excluded.owner \
                 RETURNING epoch",
            )
            .await
            .map_err(map_db)?;
        Ok(client
            .query_opt(&stmt, &[&name, &owner, &ttl_ms(ttl)])
            .await
            .map_err(map_db)?
            .map(|r| to_u64(r.get(0))))
    }
}

fn columns(leases: &[LeaseRef]) -> (Vec<&str>, Vec<i16>, Vec<i64>) {
    let mut w = Vec::with_capacity(leases.len());
    let mut m = Vec::with_capacity(leases.len());
    let mut e = Vec::with_capacity(leases.len());
    for l in leases {
        w.push(l.webhook_id.as_str());
        m.push(lane_mode_code(l.mode));
        e.push(to_i64(l.epoch));
    }
    (w, m, e)
}

fn keys(leases: &[LeaseRef]) -> Vec<(&str, ModeTag, u64)> {
    leases
        .iter()
        .map(|l| (l.webhook_id.as_str(), l.mode, l.epoch))
        .collect()
}
