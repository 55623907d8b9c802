//! The event log: one append-only range per account, read by lane cursors.
//! Record layout: ingest_ms(8) ‖ name_len(1) ‖ name ‖ id_len(1) ‖ id ‖ json.

use std::collections::HashSet;

use super::{account_key, be_u64, Store};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::error::{Error, Result};

const EVENT: u8 = b'e';
const INDEX: u8 = b'i';
const HIGH_WATER: &[u8] = b"m";

/// In-memory state guarded by the append lock.
pub(super) struct AppendState {
    /// Highest sequence number used.
    last_seq: u64,
}

impl AppendState {
    pub(super) fn load(log: &sled::Tree) -> Result<AppendState> {
        let last_seq = match log.get(HIGH_WATER)? {
            Some(v) => be_u64(&v)?,
            None => 0,
        };
        Ok(AppendState { last_seq })
    }
}

/// What happened to one appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The event's id.
    pub event_id: String,
    /// Already in the log (or earlier in the same request): not stored again.
    pub duplicate: bool,
}

pub(super) fn event_key(account_id: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = EVENT;
    k[1..9].copy_from_slice(&account_key(account_id));
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(account_id: u64, event_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + event_id.len());
    k.push(INDEX);
    k.extend_from_slice(&account_key(account_id));
    k.extend_from_slice(event_id.as_bytes());
    k
}

fn encode_record(ingest_ms: i64, e: &NewEvent) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + e.event_name.len() + e.event_id.len() + e.json.len());
    v.extend_from_slice(&ingest_ms.to_be_bytes());
    v.push(e.event_name.len() as u8);
    v.extend_from_slice(e.event_name.as_bytes());
    v.push(e.event_id.len() as u8);
    v.extend_from_slice(e.event_id.as_bytes());
    v.extend_from_slice(e.json.as_bytes());
    v
}

/// Splits a record into (ingest_ms, name, id, json) without copying.
pub(super) fn split_record(v: &[u8]) -> Result<(i64, &str, &str, &str)> {
    let corrupt = || Error::Internal("corrupt event record".into());
    let ingest = i64::from_be_bytes(
        v.get(..8)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    let nl = *v.get(8).ok_or_else(corrupt)? as usize;
    let name = v.get(9..9 + nl).ok_or_else(corrupt)?;
    let il = *v.get(9 + nl).ok_or_else(corrupt)? as usize;
    let id = v.get(10 + nl..10 + nl + il).ok_or_else(corrupt)?;
    let json = v.get(10 + nl + il..).ok_or_else(corrupt)?;
    let s = |b| std::str::from_utf8(b).map_err(|_| corrupt());
    Ok((ingest, s(name)?, s(id)?, s(json)?))
}

impl Store {
    /// Appends events to the account's log, all or none, skipping ids already
    /// present. Durable when it returns Ok (group commit). Returns one outcome
    /// per event and the highest sequence number now in the log.
    pub async fn append_events(
        &self,
        account_id: u64,
        events: &[NewEvent],
        ingest_ms: i64,
    ) -> Result<(Vec<AppendOutcome>, u64)> {
        let (outcomes, last_seq, ticket) = {
            let mut state = self
                .inner
                .append_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut batch = sled::Batch::default();
            let mut seq = state.last_seq;
            let mut seen_here = HashSet::with_capacity(events.len());
            let mut outcomes = Vec::with_capacity(events.len());
            for e in events {
                let ikey = index_key(account_id, &e.event_id);
                let duplicate =
                    !seen_here.insert(e.event_id.as_str()) || self.inner.log.contains_key(&ikey)?;
                if !duplicate {
                    seq += 1;
                    batch.insert(&event_key(account_id, seq), encode_record(ingest_ms, e));
                    batch.insert(ikey, &seq.to_be_bytes());
                }
                outcomes.push(AppendOutcome {
                    event_id: e.event_id.clone(),
                    duplicate,
                });
            }
            if seq != state.last_seq {
                batch.insert(HIGH_WATER, &seq.to_be_bytes());
                self.inner
                    .log
                    .apply_batch(batch)
                    .inspect_err(|e| self.inner.commit.note_error(e))?;
                state.last_seq = seq;
            }
            (outcomes, seq, self.inner.commit.ticket())
        };
        self.inner.commit.durable(ticket).await?;
        Ok((outcomes, last_seq))
    }

    /// Highest sequence number in the log.
    pub fn last_seq(&self) -> u64 {
        self.inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq
    }

    /// Reads up to `limit` events of `account_id` after `after_seq` whose name
    /// is in `types`, examining at most `scan_limit` records. Returns them and
    /// the last sequence number examined (a cursor may move past it).
    pub fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        types: &HashSet<String>,
        limit: usize,
        scan_limit: usize,
    ) -> Result<(Vec<StoredEvent>, u64)> {
        let start = event_key(account_id, after_seq.saturating_add(1));
        let end = event_key(account_id, u64::MAX);
        let mut out = Vec::new();
        let mut scanned_to = after_seq;
        for (n, item) in self.inner.log.range(start..=end).enumerate() {
            if n >= scan_limit || out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let seq = be_u64(&k[9..])?;
            scanned_to = seq;
            let (ingest, name, id, json) = split_record(&v)?;
            if types.contains(name) {
                out.push(StoredEvent {
                    seq,
                    event_id: id.to_string(),
                    event_name: name.to_string(),
                    ingest_time_ms: ingest,
                    json: json.to_string(),
                });
            }
        }
        Ok((out, scanned_to))
    }

    /// The events at the given positions (missing ones, already purged, skipped).
    pub fn events_at(&self, account_id: u64, seqs: &[u64]) -> Result<Vec<StoredEvent>> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(v) = self.inner.log.get(event_key(account_id, seq))? {
                let (ingest, name, id, json) = split_record(&v)?;
                out.push(StoredEvent {
                    seq,
                    event_id: id.to_string(),
                    event_name: name.to_string(),
                    ingest_time_ms: ingest,
                    json: json.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Removes events of `account_id` stored before `before_ms` with a
    /// sequence number at most `max_seq` (every lane is past them), oldest
    /// first, at most `limit`. Returns how many were removed.
    pub fn trim_events(
        &self,
        account_id: u64,
        before_ms: i64,
        max_seq: u64,
        limit: usize,
    ) -> Result<usize> {
        let start = event_key(account_id, 0);
        let end = event_key(account_id, max_seq);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.inner.log.range(start..=end).take(limit) {
            let (k, v) = item?;
            let (ingest, _, id, _) = split_record(&v)?;
            if ingest >= before_ms {
                break;
            }
            batch.remove(k);
            batch.remove(index_key(account_id, id));
            n += 1;
        }
        if n > 0 {
            self.inner.log.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// Accounts that have events in the log.
    pub fn accounts_with_events(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut next = vec![EVENT];
        while let Some(item) = self.inner.log.range(next.clone()..vec![EVENT + 1]).next() {
            let (k, _) = item?;
            let account = be_u64(&k[1..9])?;
            out.push(account);
            match account.checked_add(1) {
                Some(a) => {
                    next = vec![EVENT];
                    next.extend_from_slice(&a.to_be_bytes());
                }
                None => break,
            }
        }
        Ok(out)
    }
}
