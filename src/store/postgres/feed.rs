//! The poller: what other routers wrote, as [`Change`]s, and the figures
//! this router caches (account heads, lane tallies, stored events, size).
//!
//! Rows another router must hear about take a value of a sequence when
//! written (`change_seq`: `account_changes` for `accounts`,
//! `webhook_changes` for `webhooks` and `deleted_webhooks`,
//! `delivery_changes` for `deliveries` and `requeued`), indexed, so a poll
//! reads only what changed since the last one: `change_seq > $last`, at
//! most [`ROWS_PER_POLL`] rows a feed. Sequence values are taken before
//! their transaction commits, so a value below the highest seen may still
//! appear: the values skipped are kept as gaps and asked for again by
//! value for [`GAP_WAIT`] (most are values of transactions that rolled
//! back, or rows rewritten since). No LISTEN/NOTIFY.
//!
//! A poll every [`FAST`] while something changes, slowing down to [`SLOW`]
//! when quiet:
//! - an account whose head advanced: the cached head moves (lanes read up
//!   to it) and [`Change::Events`] goes out; the appended events are
//!   counted in the tallies of this router's lanes of the account (one
//!   grouped count for all accounts of the poll);
//! - a webhook created, changed or deleted by another router:
//!   [`Change::Webhook`] (a deletion also enters the deleted set and stops
//!   this router's lanes of it, woken with [`Change::LaneAcquired`] so their
//!   tasks see it); any webhook change asks the lease task for a round (new
//!   lanes);
//! - a delivery outcome written by another router's lane:
//!   [`Change::Outcome`]; a delivery requeued by another router on a lane
//!   held here: the lane looks at its requeued deliveries again
//!   ([`Change::LaneAcquired`] wakes it);
//! - every [`STATS_EVERY`]: stored events (`sum(head_seq - trimmed_seq)`
//!   over `accounts`: the log is gap-free and trimmed by prefix, so that is
//!   exact without counting rows) and `pg_database_size`;
//! - every [`RESYNC_EVERY`]: every webhook's version, compared with the last
//!   look, in case a change was missed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::webhooks::lane_mode_of;
use super::{map_db, to_i64, to_u64, Inner, PgStore};
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, ModeTag};
use crate::error::Result;
use crate::store::types::{Change, LaneKey};

/// Poll interval while something changes.
const FAST: Duration = Duration::from_millis(200);
/// Poll interval when quiet.
const SLOW: Duration = Duration::from_secs(1);
/// Most rows one feed reads per poll.
const ROWS_PER_POLL: i64 = 1000;
/// How long a skipped sequence value is asked for again (a transaction
/// that commits later than this after taking its value is missed).
const GAP_WAIT: Duration = Duration::from_secs(3);
/// Most gaps a feed remembers.
const MAX_GAPS: usize = 10_000;
/// Stored events and database size, this often.
const STATS_EVERY: Duration = Duration::from_secs(5);
/// Every webhook's version, this often.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// Most appended events counted per account and poll.
const COUNT_PER_POLL: u64 = 100_000;

/// What the store reads at connect: caches and where the feeds start.
#[derive(Clone)]
pub(super) struct Loaded {
    pub heads: HashMap<u64, u64>,
    pub deleted: HashSet<String>,
    pub stored_events: u64,
    pub size_on_disk: u64,
    accounts_seq: i64,
    webhooks_seq: i64,
    deliveries_seq: i64,
}

impl Loaded {
    pub async fn load(client: &deadpool_postgres::Object) -> Result<Loaded> {
        let mut heads = HashMap::new();
        let mut stored = 0u64;
        for row in client
            .query(
                "SELECT account_id, head_seq, trimmed_seq FROM accounts",
                &[],
            )
            .await
            .map_err(map_db)?
        {
            let head = to_u64(row.get(1));
            heads.insert(to_u64(row.get(0)), head);
            stored += head.saturating_sub(to_u64(row.get(2)));
        }
        let deleted = client
            .query("SELECT webhook_id FROM deleted_webhooks", &[])
            .await
            .map_err(map_db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let row = client
            .query_one(
                "SELECT (SELECT COALESCE(max(change_seq), 0) FROM accounts), \
                        GREATEST((SELECT COALESCE(max(change_seq), 0) FROM webhooks), \
                                 (SELECT COALESCE(max(change_seq), 0) FROM deleted_webhooks)), \
                        GREATEST((SELECT COALESCE(max(change_seq), 0) FROM deliveries), \
                                 (SELECT COALESCE(max(change_seq), 0) FROM requeued))",
                &[],
            )
            .await
            .map_err(map_db)?;
        Ok(Loaded {
            heads,
            deleted,
            stored_events: stored,
            size_on_disk: database_size(client).await,
            accounts_seq: row.get(0),
            webhooks_seq: row.get(1),
            deliveries_seq: row.get(2),
        })
    }
}

/// Where one feed is: the highest value seen, and values skipped below it.
pub(super) struct Follower {
    last: i64,
    gaps: BTreeMap<i64, Instant>,
}

impl Follower {
    fn new(last: i64) -> Follower {
        Follower {
            last,
            gaps: BTreeMap::new(),
        }
    }

    /// The query's parameters: values above `last`, and the gaps.
    fn params(&mut self, now: Instant) -> (i64, Vec<i64>) {
        self.gaps.retain(|_, t| now.duration_since(*t) < GAP_WAIT);
        (self.last, self.gaps.keys().copied().collect())
    }

    /// Values read, in increasing order.
    fn observe(&mut self, seqs: &[i64], now: Instant) {
        for &s in seqs {
            if s > self.last {
                let from = (self.last + 1).max(s - MAX_GAPS as i64);
                for g in from..s {
                    self.gaps.insert(g, now);
                }
                self.last = s;
            } else {
                self.gaps.remove(&s);
            }
        }
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }
}

/// The poller's own state.
pub(super) struct Feeds {
    accounts: Follower,
    webhooks: Follower,
    deliveries: Follower,
    stats_at: Instant,
    resync_at: Instant,
    versions: Option<HashMap<String, (u64, i64)>>,
}

impl Feeds {
    pub fn new(loaded: &Loaded) -> Feeds {
        let now = Instant::now();
        Feeds {
            accounts: Follower::new(loaded.accounts_seq),
            webhooks: Follower::new(loaded.webhooks_seq),
            deliveries: Follower::new(loaded.deliveries_seq),
            stats_at: now,
            resync_at: now,
            versions: None,
        }
    }
}

/// Polls until the store is dropped or stopped.
pub(super) async fn poll_task(
    weak: Weak<Inner>,
    mut stop: watch::Receiver<bool>,
    mut feeds: Feeds,
) {
    let mut wait = FAST;
    loop {
        let stopped = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopped {
            return;
        }
        let Some(store) = PgStore::upgrade(&weak) else {
            return;
        };
        match store.poll(&mut feeds).await {
            // A feed hit its row bound: read on at once.
            Ok(Polled { more: true, .. }) => wait = Duration::from_millis(5),
            Ok(Polled { changed: true, .. }) => wait = FAST,
            Ok(Polled { .. }) => wait = (wait * 2).min(SLOW),
            Err(e) => {
                store.note_error(&e);
                tracing::debug!(error = %e, "postgres: poll failed");
                wait = SLOW;
            }
        }
    }
}

const ACCOUNT_CHANGES: &str = "SELECT change_seq, account_id, head_seq FROM accounts \
     WHERE change_seq > $1 OR change_seq = ANY($2) ORDER BY change_seq LIMIT $3";

const WEBHOOK_CHANGES: &str = "SELECT * FROM ( \
       SELECT change_seq, account_id, webhook_id, writer, false AS deleted FROM webhooks \
       WHERE change_seq > $1 OR change_seq = ANY($2) \
       UNION ALL \
       SELECT change_seq, COALESCE(account_id, 0), webhook_id, writer, true FROM deleted_webhooks \
       WHERE change_seq > $1 OR change_seq = ANY($2) \
     ) AS c ORDER BY change_seq LIMIT $3";

/// Delivery records (their body only when another router's lane wrote an
/// outcome) and requeued deliveries.
const DELIVERY_CHANGES: &str = "SELECT * FROM ( \
       SELECT change_seq, webhook_id, 0::smallint AS mode, \
              CASE WHEN outcome AND writer IS DISTINCT FROM $4 THEN body END AS body, \
              false AS requeue, writer FROM deliveries \
       WHERE change_seq > $1 OR change_seq = ANY($2) \
       UNION ALL \
       SELECT change_seq, webhook_id, mode, NULL, true, writer FROM requeued \
       WHERE change_seq > $1 OR change_seq = ANY($2) \
     ) AS c ORDER BY change_seq LIMIT $3";

/// Appended events per account, name and mode, in the given ranges.
const COUNT_APPENDED: &str = "SELECT e.account_id, e.event_name, e.mode, count(*) \
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(a, lo, hi) \
     JOIN events e ON e.account_id = r.a AND e.seq > r.lo AND e.seq <= r.hi \
     GROUP BY e.account_id, e.event_name, e.mode";

/// `pg_database_size` of the current database; 0 where the engine has no
/// such function (CockroachDB) or it fails.
async fn database_size(client: &deadpool_postgres::Object) -> u64 {
    match client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
    {
        Ok(row) => row.get::<_, i64>(0).max(0) as u64,
        Err(_) => 0,
    }
}

/// Whether another router's record is an outcome its lane published: a
/// final one, or a failed attempt with a retry scheduled after it (not the
/// last failed attempt before the delivery dies, which the lane does not
/// publish on its own).
fn is_published_outcome(r: &DeliveryRecord) -> bool {
    r.state.is_final()
        || (r.state == DeliveryState::Retrying
            && r.attempts
                .last()
                .is_some_and(|a| r.next_attempt_ms > a.time_ms))
}

/// What one poll found.
struct Polled {
    /// Something changed.
    changed: bool,
    /// A feed read as many rows as a poll reads: more are waiting.
    more: bool,
}

impl PgStore {
    /// One poll.
    async fn poll(&self, feeds: &mut Feeds) -> Result<Polled> {
        let now = Instant::now();
        let (a_last, a_gaps) = feeds.accounts.params(now);
        let (w_last, w_gaps) = feeds.webhooks.params(now);
        let (d_last, d_gaps) = feeds.deliveries.params(now);
        let client = self.client().await?;
        let (sa, sw, sd) = futures::try_join!(
            client.prepare_cached(ACCOUNT_CHANGES),
            client.prepare_cached(WEBHOOK_CHANGES),
            client.prepare_cached(DELIVERY_CHANGES),
        )
        .map_err(map_db)?;
        let owner = self.inner.owner.as_str();
        let pa: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&a_last, &a_gaps, &ROWS_PER_POLL];
        let pw: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&w_last, &w_gaps, &ROWS_PER_POLL];
        let pd: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&d_last, &d_gaps, &ROWS_PER_POLL, &owner];
        let (accounts, webhooks, deliveries) = futures::try_join!(
            client.query(&sa, &pa),
            client.query(&sw, &pw),
            client.query(&sd, &pd),
        )
        .map_err(map_db)?;
        drop(client);
        let changed = !accounts.is_empty() || !webhooks.is_empty() || !deliveries.is_empty();
        let more = [accounts.len(), webhooks.len(), deliveries.len()]
            .iter()
            .any(|n| *n as i64 >= ROWS_PER_POLL);

        let seqs: Vec<i64> = accounts.iter().map(|r| r.get(0)).collect();
        feeds.accounts.observe(&seqs, now);
        for row in &accounts {
            let account_id = to_u64(row.get(1));
            let head_seq = to_u64(row.get(2));
            if self.note_head(account_id, head_seq) {
                self.send_change(Change::Events {
                    account_id,
                    head_seq,
                });
            }
        }
        self.count_appended().await?;

        let seqs: Vec<i64> = webhooks.iter().map(|r| r.get(0)).collect();
        feeds.webhooks.observe(&seqs, now);
        if !webhooks.is_empty() {
            self.inner.wake_leases.notify_one();
        }
        for row in &webhooks {
            let account_id = to_u64(row.get(1));
            let webhook_id: String = row.get(2);
            let writer: Option<String> = row.get(3);
            let deleted: bool = row.get(4);
            if deleted {
                if self.is_deleted_mem(&webhook_id) {
                    continue;
                }
                let keys: Vec<LaneKey> = [ModeTag::Realtime, ModeTag::Batch]
                    .into_iter()
                    .filter_map(|m| self.inner.lanes.get(&webhook_id, m))
                    .map(|h| h.key.clone())
                    .collect();
                self.forget_webhook(&webhook_id).await;
                self.send_change(Change::Webhook {
                    account_id,
                    webhook_id,
                });
                for k in keys {
                    self.send_change(Change::LaneAcquired(k));
                }
            } else if writer.as_deref() != Some(owner) {
                self.send_change(Change::Webhook {
                    account_id,
                    webhook_id,
                });
            }
        }

        let seqs: Vec<i64> = deliveries.iter().map(|r| r.get(0)).collect();
        feeds.deliveries.observe(&seqs, now);
        for row in &deliveries {
            let webhook_id: String = row.get(1);
            let requeue: bool = row.get(4);
            let writer: Option<String> = row.get(5);
            if requeue {
                if writer.as_deref() == Some(owner) {
                    continue;
                }
                let mode = lane_mode_of(row.get(2))?;
                if let Some(h) = self.inner.lanes.get(&webhook_id, mode) {
                    h.requeue_check.store(true, Ordering::Release);
                    if h.epoch() != 0 {
                        if h.tally.seeded() {
                            h.tally.requeued.fetch_add(1, Ordering::AcqRel);
                        }
                        self.send_change(Change::LaneAcquired(h.key.clone()));
                    }
                }
                continue;
            }
            let body: Option<Vec<u8>> = row.get(3);
            if let Some(body) = body {
                match serde_json::from_slice::<DeliveryRecord>(&body) {
                    Ok(r) if is_published_outcome(&r) => {
                        self.send_change(Change::Outcome(Arc::new(r)));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "postgres: unreadable delivery record"),
                }
            }
        }

        if now.duration_since(feeds.stats_at) >= STATS_EVERY {
            feeds.stats_at = now;
            self.refresh_stats().await?;
        }
        if now.duration_since(feeds.resync_at) >= RESYNC_EVERY {
            feeds.resync_at = now;
            self.resync_webhooks(feeds).await?;
        }
        Ok(Polled { changed, more })
    }

    /// Counts the events appended since the last count (by any router) in
    /// the tallies of this router's seeded lanes (see `LaneTally`): per
    /// account, the range after its counting point up to the known head.
    async fn count_appended(&self) -> Result<()> {
        let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
        {
            let heads = self.inner.heads.lock().unwrap_or_else(|p| p.into_inner());
            let mut counted = self.inner.counted.lock().unwrap_or_else(|p| p.into_inner());
            // Under the counting lock, as seeds choose their point under it.
            let held = self.inner.lanes.held();
            for (account, lo) in counted.iter_mut() {
                let head = heads.get(account).copied().unwrap_or(*lo);
                if head <= *lo {
                    continue;
                }
                let counting = held
                    .iter()
                    .any(|(h, _)| h.key.account_id == *account && h.tally.seeded());
                if counting {
                    ranges.push((*account, *lo, head.min(*lo + COUNT_PER_POLL)));
                } else {
                    // Nobody to count for: a lane seeded later starts here.
                    *lo = head;
                }
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let a: Vec<i64> = ranges.iter().map(|r| to_i64(r.0)).collect();
        let lo: Vec<i64> = ranges.iter().map(|r| to_i64(r.1)).collect();
        let hi: Vec<i64> = ranges.iter().map(|r| to_i64(r.2)).collect();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(COUNT_APPENDED)
            .await
            .map_err(map_db)?;
        let rows = client.query(&stmt, &[&a, &lo, &hi]).await.map_err(map_db)?;
        drop(client);
        let mut by_account: HashMap<u64, Vec<(String, Option<Mode>, u64)>> = HashMap::new();
        for row in rows {
            let mode: Option<i16> = row.get(2);
            let mode = match mode {
                Some(m) => Some(super::log::mode_of(m)?),
                None => None,
            };
            by_account.entry(to_u64(row.get(0))).or_default().push((
                row.get(1),
                mode,
                row.get::<_, i64>(3).max(0) as u64,
            ));
        }
        // Under the counting lock: a lane seeded meanwhile counted up to
        // `lo` itself (its seed point is the counting point).
        let mut counted = self.inner.counted.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.inner.lanes.held();
        for (account, lo, hi) in ranges {
            if counted.get(&account) != Some(&lo) {
                continue;
            }
            let names = by_account.remove(&account).unwrap_or_default();
            for (h, _) in held.iter().filter(|(h, _)| h.key.account_id == account) {
                let t = &h.tally;
                let through = t.counted_through.load(Ordering::Acquire);
                if through == u64::MAX || through > lo {
                    continue;
                }
                let filter = t.filter.lock().unwrap_or_else(|p| p.into_inner());
                let Some(filter) = filter.as_ref() else {
                    continue;
                };
                let n: u64 = names
                    .iter()
                    .filter(|(name, mode, _)| filter.accepts(name, *mode))
                    .map(|(_, _, n)| *n)
                    .sum();
                t.pending.fetch_add(n as i64, Ordering::AcqRel);
            }
            counted.insert(account, hi);
        }
        Ok(())
    }

    /// Stored events and database size.
    async fn refresh_stats(&self) -> Result<()> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT COALESCE(sum(head_seq - trimmed_seq), 0)::bigint FROM accounts")
            .await
            .map_err(map_db)?;
        let row = client.query_one(&stmt, &[]).await.map_err(map_db)?;
        self.inner
            .stored_events
            .store(row.get::<_, i64>(0).max(0) as u64, Ordering::Relaxed);
        let size = database_size(&client).await;
        self.inner.size_on_disk.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Every webhook's version against the last look: a change the feed
    /// missed is reported now.
    async fn resync_webhooks(&self, feeds: &mut Feeds) -> Result<()> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT webhook_id, account_id, version FROM webhooks", &[])
            .await
            .map_err(map_db)?;
        drop(client);
        let now: HashMap<String, (u64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (to_u64(r.get(1)), r.get(2))))
            .collect();
        if let Some(before) = &feeds.versions {
            for (id, (account_id, version)) in &now {
                if before.get(id).map(|b| b.1) != Some(*version) {
                    self.send_change(Change::Webhook {
                        account_id: *account_id,
                        webhook_id: id.clone(),
                    });
                }
            }
        }
        feeds.versions = Some(now);
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn a_follower_asks_again_for_skipped_values() {
        let now = Instant::now();
        let mut f = Follower::new(10);
        f.observe(&[11, 14], now);
        assert_eq!(f.params(now), (14, vec![12, 13]));
        f.observe(&[13, 15], now);
        assert_eq!(f.params(now), (15, vec![12]));
        // Gone after a while.
        assert_eq!(f.params(now + GAP_WAIT), (15, vec![]));
    }
}
