//! The delivery log: one `deliveries` row per [`DeliveryRecord`] (its serde
//! JSON in `body`, its events in `payload` when it keeps them), keyed by
//! webhook and delivery id. Delivery ids are time-ordered and compared
//! bytewise (`COLLATE "C"`), so id order is creation order, as in the sled
//! store. Requeued deliveries (RedeliverEvents) are copies under new ids,
//! with their events, named in `requeued` until their lane takes them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use super::engine::encode_payload;
use super::webhooks::lane_mode_code;
use super::{map_db, PgStore};
use crate::domain::delivery::{DeliveryRecord, DeliveryState, ModeTag};
use crate::domain::event::StoredEvent;
use crate::error::{Error, Result};
use crate::store::types::DeliveryPage;

/// Requeued copies written per transaction.
const REQUEUE_CHUNK: usize = 1000;

/// `deliveries.state` of a state.
pub(super) fn state_code(s: DeliveryState) -> i16 {
    match s {
        DeliveryState::Pending => 0,
        DeliveryState::Retrying => 1,
        DeliveryState::Delivered => 2,
        DeliveryState::Dead => 3,
        DeliveryState::Expired => 4,
    }
}

/// `deliveries.finish_ms` of a record: its finish time once final.
fn finish_ms(r: &DeliveryRecord) -> Option<i64> {
    r.state.is_final().then_some(r.finish_time_ms)
}

impl PgStore {
    /// Stores delivery records, replacing those with the same webhook and
    /// id, in one statement (when several have the same key, the last one
    /// is stored). Records of a webhook that does not exist (deleted, even
    /// by a delete racing this call) are dropped. Returns how many were
    /// stored.
    pub async fn insert_deliveries(&self, records: &[DeliveryRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut last: HashMap<(&str, &str), usize> = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            last.insert((r.webhook_id.as_str(), r.id.as_str()), i);
        }
        let mut chosen: Vec<usize> = last.into_values().collect();
        chosen.sort_unstable();
        let mut cw = Vec::with_capacity(chosen.len());
        let mut ci = Vec::with_capacity(chosen.len());
        let mut cf = Vec::with_capacity(chosen.len());
        let mut cs = Vec::with_capacity(chosen.len());
        let mut cb = Vec::with_capacity(chosen.len());
        for r in chosen.iter().filter_map(|&i| records.get(i)) {
            cw.push(r.webhook_id.as_str());
            ci.push(r.id.as_str());
            cf.push(finish_ms(r));
            cs.push(state_code(r.state));
            cb.push(serde_json::to_vec(r)?);
        }
        let client = self.client().await?;
        // The share lock on each webhook row orders this with a delete: the
        // delete either waits for this statement's transaction (and then
        // removes these rows too) or has removed the webhook already.
        let stmt = client
            .prepare_cached(
                "WITH live AS (SELECT webhook_id FROM webhooks \
                               WHERE webhook_id = ANY($1) FOR SHARE) \
                 INSERT INTO deliveries (webhook_id, delivery_id, finish_ms, state, body, \
                                         writer, change_seq) \
                 SELECT u.w, u.i, u.f, u.s, u.b, $6, nextval('delivery_changes') \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[], $5::bytea[]) \
                      AS u(w, i, f, s, b) \
                 WHERE u.w IN (SELECT webhook_id FROM live) \
                 ON CONFLICT (webhook_id, delivery_id) DO UPDATE SET \
                   finish_ms = excluded.finish_ms, state = excluded.state, body = excluded.body, \
                   writer = excluded.writer, change_seq = excluded.change_seq",
            )
            .await
            .map_err(map_db)?;
        client
            .execute(&stmt, &[&cw, &ci, &cf, &cs, &cb, &self.inner.owner])
            .await
            .map_err(map_db)
    }

    /// Up to `limit` delivery records of a webhook, newest first, in
    /// `state` if given, older than the one with id `after` if given; and
    /// the id of the last one returned when more follow (pass it as
    /// `after` for the next page). The sled store's order and paging.
    pub async fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeliveryRecord>, Option<String>)> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT body FROM deliveries WHERE webhook_id = $1 \
                 AND ($2::smallint IS NULL OR state = $2) \
                 AND ($3::text IS NULL OR delivery_id < $3) \
                 ORDER BY delivery_id DESC LIMIT $4",
            )
            .await
            .map_err(map_db)?;
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let rows = client
            .query(
                &stmt,
                &[&webhook_id, &state.map(state_code), &after, &fetch],
            )
            .await
            .map_err(map_db)?;
        let more = rows.len() > limit;
        let records = rows
            .iter()
            .take(limit)
            .map(|r| Ok(serde_json::from_slice::<DeliveryRecord>(r.get(0))?))
            .collect::<Result<Vec<_>>>()?;
        let next = if more {
            records.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok((records, next))
    }

    /// Removes up to `limit` finished (delivered, dead or expired) records
    /// that finished before `before_ms`, oldest first; returns how many.
    pub async fn prune_finished_before(&self, before_ms: i64, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM deliveries WHERE (webhook_id, delivery_id) IN \
                 (SELECT webhook_id, delivery_id FROM deliveries \
                  WHERE finish_ms IS NOT NULL AND finish_ms < $1 \
                  ORDER BY finish_ms LIMIT $2)",
            )
            .await
            .map_err(map_db)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        client
            .execute(&stmt, &[&before_ms, &limit])
            .await
            .map_err(map_db)
    }
}

impl PgStore {
    /// [`crate::store::DeliveryLog::list_deliveries`].
    pub(super) async fn list_deliveries_page(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeliveryPage> {
        let (deliveries, next_after) = self
            .list_deliveries(webhook_id, state, after, limit)
            .await?;
        Ok(DeliveryPage {
            deliveries,
            next_after,
        })
    }

    /// [`crate::store::DeliveryLog::redeliver`], as the sled store does it:
    /// queues copies of the named deliveries (any state), or with `ids`
    /// None of every DEAD delivery no such call requeued yet (each at most
    /// once), on their lanes; the copies keep their events with them. All
    /// or none for named deliveries: one that is unknown, or whose events
    /// are no longer stored, fails the call before anything is queued.
    /// Durable on return (each chunk of [`REQUEUE_CHUNK`] commits before
    /// `progress(done, total)` is called). The lanes take requeued
    /// deliveries before new events; lanes held by other routers hear of
    /// them through those routers' pollers.
    pub(super) async fn redeliver_impl<P>(
        &self,
        webhook_id: &str,
        ids: Option<Vec<String>>,
        now_ms: i64,
        mut progress: P,
    ) -> Result<usize>
    where
        P: FnMut(usize, usize) + Send + 'static,
    {
        match ids {
            Some(ids) => {
                let mut originals = Vec::with_capacity(ids.len());
                for id in &ids {
                    let (r, payload) = self
                        .delivery_with_payload(webhook_id, id)
                        .await?
                        .ok_or_else(|| Error::NotFound(format!("delivery {id}")))?;
                    let events = self.events_of(&r, payload).await?;
                    if events.len() < r.seqs.len() || events.is_empty() {
                        return Err(Error::FailedPrecondition(format!(
                            "delivery {id}: its events are no longer stored (older than \
                             delivery.retention_ms, or expired)"
                        )));
                    }
                    originals.push((r, events));
                }
                let total = originals.len();
                let mut done = 0;
                for chunk in originals.chunks(REQUEUE_CHUNK) {
                    done += self.requeue_chunk(webhook_id, chunk, false, now_ms).await?;
                    progress(done, total);
                }
                Ok(total)
            }
            None => {
                let client = self.client().await?;
                let total: i64 = client
                    .query_one(
                        "SELECT count(*) FROM deliveries \
                         WHERE webhook_id = $1 AND state = $2 AND NOT redelivered",
                        &[&webhook_id, &state_code(DeliveryState::Dead)],
                    )
                    .await
                    .map_err(map_db)?
                    .get(0);
                drop(client);
                let total = total.max(0) as usize;
                let mut done = 0;
                let mut after = String::new();
                loop {
                    let client = self.client().await?;
                    let rows = client
                        .query(
                            "SELECT delivery_id, body, payload FROM deliveries \
                             WHERE webhook_id = $1 AND state = $2 AND NOT redelivered \
                               AND delivery_id > $3 \
                             ORDER BY delivery_id LIMIT $4",
                            &[
                                &webhook_id,
                                &state_code(DeliveryState::Dead),
                                &after,
                                &(REQUEUE_CHUNK as i64),
                            ],
                        )
                        .await
                        .map_err(map_db)?;
                    drop(client);
                    let Some(last) = rows.last() else { break };
                    after = last.get(0);
                    let mut chunk = Vec::with_capacity(rows.len());
                    let mut empty = Vec::new();
                    for row in &rows {
                        let r: DeliveryRecord = serde_json::from_slice(row.get(1))?;
                        let events = self.events_of(&r, row.get(2)).await?;
                        if r.redelivered || events.is_empty() {
                            // Nothing to send again: not looked at again.
                            empty.push(r.id);
                            continue;
                        }
                        chunk.push((r, events));
                    }
                    if !empty.is_empty() {
                        let client = self.client().await?;
                        client
                            .execute(
                                "UPDATE deliveries SET redelivered = true \
                                 WHERE webhook_id = $1 AND delivery_id = ANY($2)",
                                &[&webhook_id, &empty],
                            )
                            .await
                            .map_err(map_db)?;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    done += self.requeue_chunk(webhook_id, &chunk, true, now_ms).await?;
                    progress(done, total.max(done));
                }
                Ok(done)
            }
        }
    }

    /// [`crate::store::DeliveryLog::recover_deliveries`].
    pub(super) async fn recover_impl(
        &self,
        webhook_id: &str,
        ids: Vec<String>,
        states: Vec<DeliveryState>,
        now_ms: i64,
    ) -> Result<usize> {
        let mut originals = Vec::with_capacity(ids.len());
        for id in &ids {
            let Some((r, payload)) = self.delivery_with_payload(webhook_id, id).await? else {
                continue;
            };
            if !states.contains(&r.state) || r.redelivered {
                continue;
            }
            let events = self.events_of(&r, payload).await?;
            if events.is_empty() || events.len() < r.seqs.len() {
                continue;
            }
            originals.push((r, events));
        }
        let mut done = 0;
        for chunk in originals.chunks(REQUEUE_CHUNK) {
            done += self.requeue_chunk(webhook_id, chunk, true, now_ms).await?;
        }
        Ok(done)
    }

    /// One transaction of a redelivery: the copies (with their events),
    /// their `requeued` rows, and with `bulk` the originals marked
    /// requeued. Under the webhook's lanes' locks, so their tallies count
    /// each copy exactly once.
    async fn requeue_chunk(
        &self,
        webhook_id: &str,
        chunk: &[(DeliveryRecord, Vec<StoredEvent>)],
        bulk: bool,
        now_ms: i64,
    ) -> Result<usize> {
        let mut copies = Vec::with_capacity(chunk.len());
        for (original, events) in chunk {
            let mut copy = DeliveryRecord::new(
                original.account_id,
                webhook_id,
                original.mode,
                original
                    .seqs
                    .iter()
                    .copied()
                    .zip(original.event_ids.iter().cloned()),
                now_ms,
            );
            copy.redelivery = true;
            copy.events_kept = true;
            copies.push((copy, encode_payload(events), original.id.as_str()));
        }
        let mut oi = Vec::new();
        let mut ob = Vec::new();
        if bulk {
            for (o, _) in chunk {
                let mut o = o.clone();
                o.redelivered = true;
                oi.push(o.id.clone());
                ob.push(serde_json::to_vec(&o)?);
            }
        }
        // The lanes' locks first (in lock order), then a connection.
        let handles: Vec<_> = [ModeTag::Realtime, ModeTag::Batch]
            .into_iter()
            .filter_map(|m| self.inner.lanes.get(webhook_id, m))
            .collect();
        let mut guards = Vec::with_capacity(handles.len());
        for h in &handles {
            guards.push(h.slot_lock().await);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        // A delete waits for this transaction, or has removed the webhook.
        let live = tx
            .query_opt(
                "SELECT 1 FROM webhooks WHERE webhook_id = $1 FOR SHARE",
                &[&webhook_id],
            )
            .await
            .map_err(map_db)?
            .is_some();
        if !live {
            return Err(Error::NotFound(format!("webhook {webhook_id}")));
        }
        if bulk {
            // Marked first, and only where no other call marked them: of two
            // redeliveries racing for one dead delivery, one requeues it.
            // Not a lane's outcome: the feed does not pass it on.
            let marked: HashSet<String> = tx
                .query(
                    "UPDATE deliveries AS d SET redelivered = true, body = u.b, outcome = false \
                     FROM unnest($2::text[], $3::bytea[]) AS u(i, b) \
                     WHERE d.webhook_id = $1 AND d.delivery_id = u.i AND NOT d.redelivered \
                     RETURNING d.delivery_id",
                    &[&webhook_id, &oi, &ob],
                )
                .await
                .map_err(map_db)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            copies.retain(|(_, _, original)| marked.contains(*original));
        }
        let mut ci = Vec::with_capacity(copies.len());
        let mut cm = Vec::with_capacity(copies.len());
        let mut cs = Vec::with_capacity(copies.len());
        let mut cb = Vec::with_capacity(copies.len());
        let mut cp: Vec<&[u8]> = Vec::with_capacity(copies.len());
        for (c, p, _) in &copies {
            ci.push(c.id.as_str());
            cm.push(lane_mode_code(c.mode));
            cs.push(state_code(c.state));
            cb.push(serde_json::to_vec(c)?);
            cp.push(p.as_slice());
        }
        tx.execute(
            "INSERT INTO deliveries (webhook_id, delivery_id, finish_ms, state, body, payload, \
                                     writer, change_seq) \
             SELECT $1, u.i, NULL, u.s, u.b, u.p, $2, nextval('delivery_changes') \
             FROM unnest($3::text[], $4::smallint[], $5::bytea[], $6::bytea[]) AS u(i, s, b, p) \
             ON CONFLICT (webhook_id, delivery_id) DO NOTHING",
            &[&webhook_id, &self.inner.owner, &ci, &cs, &cb, &cp],
        )
        .await
        .map_err(map_db)?;
        tx.execute(
            "INSERT INTO requeued (webhook_id, mode, delivery_id, writer, change_seq) \
             SELECT $1, u.m, u.i, $2, nextval('delivery_changes') \
             FROM unnest($3::text[], $4::smallint[]) AS u(i, m) \
             ON CONFLICT DO NOTHING",
            &[&webhook_id, &self.inner.owner, &ci, &cm],
        )
        .await
        .map_err(map_db)?;
        tx.commit().await.map_err(map_db)?;
        for h in &handles {
            let n = copies
                .iter()
                .filter(|(c, _, _)| c.mode == h.key.mode)
                .count();
            if n > 0 && h.epoch() != 0 && h.tally.seeded() {
                h.tally.requeued.fetch_add(n as i64, Ordering::AcqRel);
            }
            h.requeue_check.store(true, Ordering::Release);
        }
        drop(guards);
        Ok(copies.len())
    }
}
