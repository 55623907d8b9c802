//! Bounded reads behind the lane gauges. The gauges themselves are kept up
//! to date in memory as events arrive and leave lanes (see `metrics.rs`);
//! these only seed a gauge when a lane starts and look up, per scrape, one
//! timestamp per lane, so a scrape costs the same however much is queued.

use super::SledStore;
use crate::domain::delivery::LaneFilter;
use crate::error::Result;
use crate::store::types::LaneKey;

impl SledStore {
    /// Events after `after_seq` up to `until_seq` that the lane takes,
    /// counting at most `scan_limit` log records; true when it stopped there.
    pub fn lane_backlog_between(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        after_seq: u64,
        until_seq: u64,
        scan_limit: usize,
    ) -> Result<(u64, bool)> {
        self.count_for_lane(key.account_id, after_seq, until_seq, filter, scan_limit)
    }

    /// Ingest time of the next event the lane will take, looking at most
    /// `scan_limit` records past its cursor; beyond that, of the first record
    /// after the cursor (an event at least as old as the one it will take).
    pub fn lane_next_ingest_ms(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        let cursor = self.lane_cursor(key)?;
        let read = self.read_for_lane(key.account_id, cursor, u64::MAX, filter, 1, scan_limit)?;
        match read.events.first() {
            Some(e) => Ok(Some(e.ingest_time_ms)),
            None => self.first_ingest_after(key.account_id, cursor),
        }
    }
}
