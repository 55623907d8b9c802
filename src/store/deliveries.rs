//! Lane state and delivery records. A lane's state is its cursor (the last
//! log position taken into a delivery) and the delivery at its head while
//! that one is unfinished; deliveries an operator requeued wait in a queue
//! of their own.

use serde::{Deserialize, Serialize};

use super::Store;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, ModeTag};
use crate::error::Result;

const LANE: u8 = b'L';
const DELIVERY: u8 = b'D';
/// `Q` ‖ webhook id ‖ `/` ‖ mode ‖ delivery id: deliveries an operator
/// requeued, taken by the lane (oldest first) before new events. Kept apart
/// from LaneState so the API can add to it while the lane runs.
const REQUEUED: u8 = b'Q';

/// Persistent state of one lane (webhook × mode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneState {
    /// Last log sequence number taken into a delivery or skipped.
    pub cursor: u64,
    /// The delivery at the head: being attempted, or (as stored) possibly
    /// already finished, since the state is not rewritten when one ends.
    /// See [`Store::unfinished_head`].
    pub head: Option<String>,
}

/// One page of a delivery listing.
#[derive(Debug, Clone)]
pub struct DeliveryPage {
    /// Records, newest first.
    pub deliveries: Vec<DeliveryRecord>,
    /// Id of the last record returned, when more may follow.
    pub next_after: Option<String>,
}

fn mode_byte(m: ModeTag) -> u8 {
    match m {
        ModeTag::Realtime => b'r',
        ModeTag::Batch => b'b',
    }
}

fn lane_key(webhook_id: &str, mode: ModeTag) -> Vec<u8> {
    let mut k = Vec::with_capacity(webhook_id.len() + 3);
    k.push(LANE);
    k.extend_from_slice(webhook_id.as_bytes());
    k.push(b'/');
    k.push(mode_byte(mode));
    k
}

pub(super) fn requeued_key(webhook_id: &str, mode: ModeTag, delivery_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(webhook_id.len() + delivery_id.len() + 3);
    k.push(REQUEUED);
    k.extend_from_slice(webhook_id.as_bytes());
    k.push(b'/');
    k.push(mode_byte(mode));
    k.extend_from_slice(delivery_id.as_bytes());
    k
}

fn delivery_prefix(webhook_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(webhook_id.len() + 40);
    k.push(DELIVERY);
    k.extend_from_slice(webhook_id.as_bytes());
    k.push(b'/');
    k
}

fn delivery_key(webhook_id: &str, delivery_id: &str) -> Vec<u8> {
    let mut k = delivery_prefix(webhook_id);
    k.extend_from_slice(delivery_id.as_bytes());
    k
}

impl Store {
    /// A lane's state, or None for a lane never used.
    pub fn lane(&self, webhook_id: &str, mode: ModeTag) -> Result<Option<LaneState>> {
        match self.inner.lanes.get(lane_key(webhook_id, mode))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Writes delivery records, then the lane's state. Not flushed: a crash
    /// may repeat a delivery (at-least-once), never lose one.
    ///
    /// Plain inserts, not one sled `Batch`: sled writes its I/O buffer out
    /// (pwrite + sync_file_range) before and after every batch, which made
    /// batches the largest cost of a delivery. The order is what keeps a
    /// crash safe: sled recovers a prefix of its log, so the lane never
    /// points at a record that is missing (records go first); a finished
    /// record with the lane still pointing at it is cleared by the lane
    /// on restart. A crash between the two writes of a new delivery can leave
    /// one PENDING record no lane points at; its events are sent again
    /// under a new delivery.
    pub fn save_lane(
        &self,
        webhook_id: &str,
        mode: ModeTag,
        lane: &LaneState,
        records: &[&DeliveryRecord],
    ) -> Result<()> {
        for r in records {
            self.inner
                .lanes
                .insert(delivery_key(&r.webhook_id, &r.id), serde_json::to_vec(r)?)?;
        }
        self.inner
            .lanes
            .insert(lane_key(webhook_id, mode), serde_json::to_vec(lane)?)?;
        Ok(())
    }

    /// Writes one delivery record.
    pub fn save_delivery(&self, r: &DeliveryRecord) -> Result<()> {
        self.inner
            .lanes
            .insert(delivery_key(&r.webhook_id, &r.id), serde_json::to_vec(r)?)?;
        Ok(())
    }

    /// One delivery record.
    pub fn delivery(&self, webhook_id: &str, delivery_id: &str) -> Result<Option<DeliveryRecord>> {
        match self
            .inner
            .lanes
            .get(delivery_key(webhook_id, delivery_id))?
        {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Deliveries of a webhook, newest first, optionally in one state, after
    /// (older than) `after`.
    pub fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeliveryPage> {
        let prefix = delivery_prefix(webhook_id);
        let end = match after {
            Some(id) => delivery_key(webhook_id, id),
            None => {
                let mut e = prefix.clone();
                e.push(0xff);
                e
            }
        };
        let mut deliveries = Vec::new();
        let mut next_after = None;
        for item in self.inner.lanes.range(prefix.clone()..end).rev() {
            let (_, v) = item?;
            let r: DeliveryRecord = serde_json::from_slice(&v)?;
            if state.is_some_and(|s| s != r.state) {
                continue;
            }
            if deliveries.len() == limit {
                next_after = deliveries.last().map(|d: &DeliveryRecord| d.id.clone());
                break;
            }
            deliveries.push(r);
        }
        Ok(DeliveryPage {
            deliveries,
            next_after,
        })
    }

    /// Queues copies of past deliveries on their lanes. Returns the new records.
    pub fn requeue(
        &self,
        webhook_id: &str,
        originals: &[DeliveryRecord],
        now_ms: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let mut batch = sled::Batch::default();
        let mut created = Vec::with_capacity(originals.len());
        for o in originals {
            let copy = DeliveryRecord {
                id: crate::domain::ids::new_id(crate::domain::ids::DELIVERY_PREFIX),
                state: DeliveryState::Pending,
                attempts: Vec::new(),
                attempt_count: 0,
                first_attempt_ms: 0,
                next_attempt_ms: 0,
                create_time_ms: now_ms,
                redelivery: true,
                ..o.clone()
            };
            batch.insert(
                delivery_key(webhook_id, &copy.id),
                serde_json::to_vec(&copy)?,
            );
            batch.insert(requeued_key(webhook_id, o.mode, &copy.id), &[]);
            created.push(copy);
        }
        self.inner.lanes.apply_batch(batch)?;
        Ok(created)
    }

    /// The oldest requeued delivery of a lane, if any.
    pub fn next_requeued(&self, webhook_id: &str, mode: ModeTag) -> Result<Option<String>> {
        let prefix = requeued_key(webhook_id, mode, "");
        match self.inner.lanes.scan_prefix(&prefix).next() {
            Some(item) => {
                let (k, _) = item?;
                Ok(Some(
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                ))
            }
            None => Ok(None),
        }
    }

    /// Makes a requeued delivery the lane's head, atomically.
    pub fn take_requeued(
        &self,
        webhook_id: &str,
        mode: ModeTag,
        lane: &LaneState,
        delivery_id: &str,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(lane_key(webhook_id, mode), serde_json::to_vec(lane)?);
        batch.remove(requeued_key(webhook_id, mode, delivery_id));
        self.inner.lanes.apply_batch(batch)?;
        Ok(())
    }

    /// Removes finished delivery records created before `before_ms`, at most
    /// `limit`. Returns how many were removed.
    pub fn purge_deliveries(&self, before_ms: i64, limit: usize) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.inner.lanes.range(vec![DELIVERY]..vec![DELIVERY + 1]) {
            let (k, v) = item?;
            let r: DeliveryRecord = serde_json::from_slice(&v)?;
            if r.create_time_ms < before_ms && r.state.is_final() {
                batch.remove(k);
                n += 1;
                if n >= limit {
                    break;
                }
            }
        }
        if n > 0 {
            self.inner.lanes.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// The lane's head delivery if it is not finished yet.
    pub fn unfinished_head(
        &self,
        webhook_id: &str,
        lane: &LaneState,
    ) -> Result<Option<DeliveryRecord>> {
        match &lane.head {
            Some(h) => Ok(self
                .delivery(webhook_id, h)?
                .filter(|r| !r.state.is_final())),
            None => Ok(None),
        }
    }

    /// Lowest cursor among the lanes of the given webhooks (None: no lanes).
    pub fn min_cursor(&self, webhook_ids: &[String]) -> Result<Option<u64>> {
        let mut min: Option<u64> = None;
        for id in webhook_ids {
            for mode in [ModeTag::Realtime, ModeTag::Batch] {
                if let Some(l) = self.lane(id, mode)? {
                    // A lane with an unfinished head or requeued work may
                    // still need older events. (A stored head may be a
                    // finished delivery: lanes do not rewrite their state
                    // when a delivery ends.)
                    let unfinished_head = self.unfinished_head(id, &l)?.is_some();
                    let c = if unfinished_head || self.next_requeued(id, mode)?.is_some() {
                        0
                    } else {
                        l.cursor
                    };
                    min = Some(min.map_or(c, |m| m.min(c)));
                }
            }
        }
        Ok(min)
    }

    pub(super) fn remove_lanes_and_deliveries(&self, webhook_id: &str) -> Result<()> {
        let mut batch = sled::Batch::default();
        for mode in [ModeTag::Realtime, ModeTag::Batch] {
            batch.remove(lane_key(webhook_id, mode));
        }
        for item in self.inner.lanes.scan_prefix(delivery_prefix(webhook_id)) {
            batch.remove(item?.0);
        }
        for mode in [ModeTag::Realtime, ModeTag::Batch] {
            for item in self
                .inner
                .lanes
                .scan_prefix(requeued_key(webhook_id, mode, ""))
            {
                batch.remove(item?.0);
            }
        }
        self.inner.lanes.apply_batch(batch)?;
        Ok(())
    }
}
