//! Read-only figures about lanes for metrics, computed from what is stored:
//! how many events a lane still owes its webhook and how old the oldest is.

use std::collections::HashSet;

use super::deliveries::requeued_key;
use super::Store;
use crate::domain::delivery::ModeTag;
use crate::error::Result;

/// What one lane still has to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneBacklog {
    /// Events of the lane's types after its cursor, plus those of the
    /// payload at its head (in flight or waiting for a retry).
    pub events: u64,
    /// True when counting stopped at the scan limit (there are more).
    pub capped: bool,
    /// Ingest time of the oldest of those events, epoch ms.
    pub oldest_ingest_ms: Option<i64>,
    /// Deliveries requeued by RedeliverEvents not yet taken by the lane.
    pub requeued: u64,
}

impl Store {
    /// Counts a lane's backlog, examining at most `scan_limit` events
    /// after its cursor. Reads only; copies no event bodies.
    pub fn lane_backlog(
        &self,
        account_id: u64,
        webhook_id: &str,
        mode: ModeTag,
        types: &HashSet<String>,
        scan_limit: usize,
    ) -> Result<LaneBacklog> {
        let mut out = LaneBacklog::default();
        let Some(state) = self.lane(webhook_id, mode)? else {
            return Ok(out);
        };
        if let Some(record) = self.unfinished_head(webhook_id, &state)? {
            out.events += record.seqs.len() as u64;
            if let Some(first) = record.seqs.first() {
                out.oldest_ingest_ms = self.event_ingest_ms(account_id, *first)?;
            }
        }
        let mut examined = 0;
        self.visit_events(account_id, state.cursor, |_, e| {
            if examined >= scan_limit {
                out.capped = true;
                return Ok(false);
            }
            examined += 1;
            if types.contains(e.name) {
                out.events += 1;
                out.oldest_ingest_ms.get_or_insert(e.ingest_ms);
            }
            Ok(true)
        })?;
        let prefix = requeued_key(webhook_id, mode, "");
        out.requeued = self.inner.lanes.scan_prefix(&prefix).count() as u64;
        Ok(out)
    }
}
