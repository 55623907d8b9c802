//! The janitor's work on the store, one bounded round at a time: purge the
//! finished records whose retention has passed (read through the finish-time
//! index, never the whole delivery log), remove what deleted webhooks left,
//! and trim each account's log of events older than `delivery.retention_ms`
//! after moving whatever a lane still owes from that part of the log into
//! EXPIRED records. Trimming is by age alone: a retired, disabled or failing
//! webhook never holds it back for the account's other webhooks.

use std::sync::Arc;

use super::SledStore;
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::LaneFilter;
use crate::error::Result;
use crate::store::types::{JanitorReport, LaneKey};

/// Index entries of finished records handled per round.
const PURGE_PER_ROUND: usize = 1000;
/// Keys of deleted webhooks removed per round.
const CLEAN_PER_ROUND: usize = 1000;
/// Events trimmed per account and round (whole chunks, so a little more).
const TRIM_PER_ROUND: u64 = 10_000;

impl SledStore {
    /// One janitor round at `now_ms`. Blocking: call it from a blocking thread.
    pub fn janitor_round(
        &self,
        catalog: &Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> Result<JanitorReport> {
        let mut report = JanitorReport {
            purged: self.purge_finished(
                now_ms,
                retention_ms,
                dead_retention_ms,
                PURGE_PER_ROUND,
            )?,
            cleaned: self.clean_deleted(CLEAN_PER_ROUND)?,
            ..Default::default()
        };
        report.more = report.purged >= PURGE_PER_ROUND || report.cleaned >= CLEAN_PER_ROUND;
        let webhooks = self.all_webhooks()?;
        let before_ms = now_ms.saturating_sub(retention_ms);
        for account in self.accounts_with_events()? {
            let Some(horizon) = self.trim_horizon(account, before_ms, TRIM_PER_ROUND)? else {
                continue;
            };
            for w in webhooks.iter().filter(|w| w.account_id == account) {
                for mode in [Mode::Realtime, Mode::Batch] {
                    let key = LaneKey {
                        account_id: account,
                        webhook_id: w.id.clone(),
                        mode: mode.into(),
                    };
                    let filter = LaneFilter::new(w, mode, catalog.clone());
                    let n = self.expire_lane(&key, &filter, horizon, now_ms)?;
                    if n > 0 {
                        report.expired.push((key, n));
                    }
                }
            }
            let trimmed = self.trim_through(account, horizon)?;
            report.more |= trimmed >= TRIM_PER_ROUND;
            report.trimmed += trimmed;
        }
        Ok(report)
    }
}
