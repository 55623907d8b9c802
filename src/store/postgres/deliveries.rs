//! The delivery log: one `deliveries` row per [`DeliveryRecord`] (its serde
//! JSON in `body`), keyed by webhook and delivery id. Delivery ids are
//! time-ordered and compared bytewise (`COLLATE "C"`), so id order is
//! creation order, as in the sled store.

use std::collections::HashMap;

use super::{map_db, PgStore};
use crate::domain::delivery::{DeliveryRecord, DeliveryState};
use crate::error::Result;

/// `deliveries.state` of a state.
fn state_code(s: DeliveryState) -> i16 {
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
                 INSERT INTO deliveries (webhook_id, delivery_id, finish_ms, state, body) \
                 SELECT u.w, u.i, u.f, u.s, u.b \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[], $5::bytea[]) \
                      AS u(w, i, f, s, b) \
                 WHERE u.w IN (SELECT webhook_id FROM live) \
                 ON CONFLICT (webhook_id, delivery_id) DO UPDATE SET \
                   finish_ms = excluded.finish_ms, state = excluded.state, body = excluded.body",
            )
            .await
            .map_err(map_db)?;
        client
            .execute(&stmt, &[&cw, &ci, &cf, &cs, &cb])
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
