//! The event log: one append-only range per account, read by lane cursors.
//!
//! One sled key per chunk of a request (about 16 KiB of events), not per
//! event: sled's cost is per key (measured: the per-event layout spent most
//! of ingest in sled inserts), so a request of 100 typical events costs 2-3
//! log inserts. Events in a chunk have consecutive sequence numbers starting
//! at the key's.
//!
//! Chunk: ingest_ms(8) ‖ count(4) ‖ count × [name_len(1) ‖ name ‖ id_len(1)
//! ‖ id ‖ json_len(4) ‖ json], integers big-endian.

use std::collections::HashSet;

use super::{account_key, be_u64, Store};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::error::{Error, Result};

const EVENT: u8 = b'e';
const INDEX: u8 = b'i';
const HIGH_WATER: &[u8] = b"m";
/// Bytes before a chunk's first event.
const CHUNK_HEADER: usize = 12;

/// In-memory state guarded by the append lock.
pub(super) struct AppendState {
    /// Highest sequence number used.
    last_seq: u64,
}

impl AppendState {
    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq
    }

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

/// Key of the chunk whose first event has sequence number `seq`.
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

/// Chunks stay near this size: large values make sled write whole pages
/// out of line (blobs), and a lane that needs one event decodes its chunk.
const CHUNK_TARGET_BYTES: usize = 16 * 1024;

/// Splits a request's new events into chunks of about [`CHUNK_TARGET_BYTES`]
/// (an event larger than that is a chunk of its own).
fn chunks_of<'a>(events: &'a [&'a NewEvent]) -> impl Iterator<Item = &'a [&'a NewEvent]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut size = 0;
        let mut n = 0;
        for e in rest {
            size += 6 + e.event_name.len() + e.event_id.len() + e.json.len();
            if n > 0 && size > CHUNK_TARGET_BYTES {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Builds a chunk of `events` (names and ids are at most 255 bytes: validated at ingest).
pub(super) fn encode_chunk<'a>(
    ingest_ms: i64,
    events: impl ExactSizeIterator<Item = &'a NewEvent> + Clone,
) -> Vec<u8> {
    let size: usize = events
        .clone()
        .map(|e| 6 + e.event_name.len() + e.event_id.len() + e.json.len())
        .sum();
    let mut v = Vec::with_capacity(CHUNK_HEADER + size);
    v.extend_from_slice(&ingest_ms.to_be_bytes());
    v.extend_from_slice(&(events.len() as u32).to_be_bytes());
    for e in events {
        v.push(e.event_name.len() as u8);
        v.extend_from_slice(e.event_name.as_bytes());
        v.push(e.event_id.len() as u8);
        v.extend_from_slice(e.event_id.as_bytes());
        v.extend_from_slice(&(e.json.len() as u32).to_be_bytes());
        v.extend_from_slice(e.json.as_bytes());
    }
    v
}

/// One event inside a chunk, borrowed from it.
pub(super) struct EventRef<'a> {
    pub ingest_ms: i64,
    pub name: &'a str,
    pub id: &'a str,
    pub json: &'a str,
}

impl EventRef<'_> {
    fn to_stored(&self, seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            event_id: self.id.to_string(),
            event_name: self.name.to_string(),
            ingest_time_ms: self.ingest_ms,
            json: self.json.to_string(),
        }
    }
}

fn corrupt() -> Error {
    Error::Internal("corrupt event log chunk".into())
}

/// (ingest_ms, number of events) of a chunk.
pub(super) fn chunk_header(v: &[u8]) -> Result<(i64, u64)> {
    let ingest = i64::from_be_bytes(
        v.get(..8)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    let count = u32::from_be_bytes(
        v.get(8..12)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    Ok((ingest, u64::from(count)))
}

/// Calls `f(index, event)` for each event of a chunk, from the first with
/// index `skip`, until `f` returns false. Skipped events are stepped over
/// by their lengths, without UTF-8 checks.
pub(super) fn for_each_in_chunk(
    v: &[u8],
    skip: u64,
    mut f: impl FnMut(u64, EventRef<'_>) -> Result<bool>,
) -> Result<()> {
    let (ingest_ms, count) = chunk_header(v)?;
    let mut at = CHUNK_HEADER;
    for i in 0..count {
        let nl = *v.get(at).ok_or_else(corrupt)? as usize;
        let name = v.get(at + 1..at + 1 + nl).ok_or_else(corrupt)?;
        at += 1 + nl;
        let il = *v.get(at).ok_or_else(corrupt)? as usize;
        let id = v.get(at + 1..at + 1 + il).ok_or_else(corrupt)?;
        at += 1 + il;
        let jl = u32::from_be_bytes(
            v.get(at..at + 4)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?,
        ) as usize;
        let json = v.get(at + 4..at + 4 + jl).ok_or_else(corrupt)?;
        at += 4 + jl;
        if i < skip {
            continue;
        }
        let utf8 = |b| std::str::from_utf8(b).map_err(|_| corrupt());
        let event = EventRef {
            ingest_ms,
            name: utf8(name)?,
            id: utf8(id)?,
            json: utf8(json)?,
        };
        if !f(i, event)? {
            break;
        }
    }
    Ok(())
}

/// Records how far [`migrate_v1`] got, in the same batches as the records it
/// converts, so a crash during the conversion resumes instead of reading
/// converted chunks as version-1 records.
const MIGRATE_PROGRESS: &[u8] = b"migrate_v1_done_through";

/// Converts a log written by schema version 1 (one key per event:
/// ingest_ms ‖ name_len ‖ name ‖ id_len ‖ id ‖ json) to chunks of one event.
/// Resumable; call [`migration_finished`] once the new version is stored.
pub(super) fn migrate_v1(log: &sled::Tree) -> Result<u64> {
    let start = match log.get(MIGRATE_PROGRESS)? {
        // The smallest key after the last one converted.
        Some(last) => [last.as_ref(), &[0]].concat(),
        None => vec![EVENT],
    };
    let mut n = 0;
    let mut batch = sled::Batch::default();
    for item in log.range(start..vec![EVENT + 1]) {
        let (k, v) = item?;
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
        let utf8 = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| corrupt())
        };
        let e = NewEvent {
            event_id: utf8(id)?,
            event_name: utf8(name)?,
            timestamp_ms: 0,
            json: utf8(json)?,
        };
        batch.insert(k.clone(), encode_chunk(ingest, std::iter::once(&e)));
        batch.insert(MIGRATE_PROGRESS, k);
        n += 1;
        if n % 1000 == 0 {
            log.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    log.apply_batch(batch)?;
    Ok(n)
}

/// Drops the conversion's progress marker (after the new version is stored).
pub(super) fn migration_finished(log: &sled::Tree) -> Result<()> {
    log.remove(MIGRATE_PROGRESS)?;
    Ok(())
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
            let first = state.last_seq + 1;
            let mut seen_here = HashSet::with_capacity(events.len());
            let mut outcomes = Vec::with_capacity(events.len());
            let mut fresh = Vec::with_capacity(events.len());
            for e in events {
                let ikey = index_key(account_id, &e.event_id);
                let duplicate =
                    !seen_here.insert(e.event_id.as_str()) || self.inner.log.contains_key(&ikey)?;
                if !duplicate {
                    let seq = first + fresh.len() as u64;
                    batch.insert(ikey, &seq.to_be_bytes());
                    fresh.push(e);
                }
                outcomes.push(AppendOutcome {
                    event_id: e.event_id.clone(),
                    duplicate,
                });
            }
            let mut seq = state.last_seq;
            if !fresh.is_empty() {
                let mut chunk_first = first;
                for chunk in chunks_of(&fresh) {
                    batch.insert(
                        &event_key(account_id, chunk_first),
                        encode_chunk(ingest_ms, chunk.iter().copied()),
                    );
                    chunk_first += chunk.len() as u64;
                }
                seq += fresh.len() as u64;
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
        // Tickets and sequence numbers are handed out in the same order under
        // the append lock, so everything up to `last_seq` is durable now.
        self.inner
            .durable_seq
            .fetch_max(last_seq, std::sync::atomic::Ordering::AcqRel);
        Ok((outcomes, last_seq))
    }

    /// Highest sequence number known durable. A lane delivers nothing past
    /// it, so no listener receives an event a power loss could still take back.
    pub fn durable_seq(&self) -> u64 {
        self.inner
            .durable_seq
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Highest sequence number in the log.
    pub fn last_seq(&self) -> u64 {
        self.inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq
    }

    /// Calls `f(seq, event)` for each event of `account_id` after
    /// `after_seq`, in order, until `f` returns false.
    pub(super) fn visit_events(
        &self,
        account_id: u64,
        after_seq: u64,
        mut f: impl FnMut(u64, EventRef<'_>) -> Result<bool>,
    ) -> Result<()> {
        let want = after_seq.saturating_add(1);
        // The chunk holding `want` may start before it.
        let start = match self.chunk_at(account_id, want)? {
            Some((first, _)) => first,
            None => want,
        };
        let end = event_key(account_id, u64::MAX);
        for item in self.inner.log.range(event_key(account_id, start)..=end) {
            let (k, v) = item?;
            let first = be_u64(&k[9..])?;
            let mut go_on = true;
            for_each_in_chunk(&v, want.saturating_sub(first), |i, e| {
                go_on = f(first + i, e)?;
                Ok(go_on)
            })?;
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    /// The chunk holding event `seq`: (its first seq, its bytes).
    fn chunk_at(&self, account_id: u64, seq: u64) -> Result<Option<(u64, sled::IVec)>> {
        let found = self
            .inner
            .log
            .range(event_key(account_id, 0)..=event_key(account_id, seq))
            .next_back();
        match found {
            Some(item) => {
                let (k, v) = item?;
                let first = be_u64(&k[9..])?;
                let (_, count) = chunk_header(&v)?;
                Ok((seq < first + count).then_some((first, v)))
            }
            None => Ok(None),
        }
    }

    /// Reads up to `limit` durable events of `account_id` after `after_seq`
    /// whose name is in `types`, examining at most `scan_limit` events.
    /// Returns them and the last sequence number examined (a cursor may move
    /// past it).
    pub fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        types: &HashSet<String>,
        limit: usize,
        scan_limit: usize,
    ) -> Result<(Vec<StoredEvent>, u64)> {
        let durable = self.durable_seq();
        let mut out = Vec::new();
        let mut scanned_to = after_seq;
        let mut examined = 0;
        self.visit_events(account_id, after_seq, |seq, e| {
            if examined >= scan_limit || out.len() >= limit || seq > durable {
                return Ok(false);
            }
            examined += 1;
            scanned_to = seq;
            if types.contains(e.name) {
                out.push(e.to_stored(seq));
            }
            Ok(true)
        })?;
        Ok((out, scanned_to))
    }

    /// The events at the given positions (missing ones, already purged, skipped).
    pub fn events_at(&self, account_id: u64, seqs: &[u64]) -> Result<Vec<StoredEvent>> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut chunk: Option<(u64, u64, sled::IVec)> = None;
        for &seq in seqs {
            let cached = chunk
                .as_ref()
                .is_some_and(|(first, count, _)| seq >= *first && seq < first + count);
            if !cached {
                chunk = match self.chunk_at(account_id, seq)? {
                    Some((first, v)) => Some((first, chunk_header(&v)?.1, v)),
                    None => None,
                };
            }
            if let Some((first, _, v)) = &chunk {
                for_each_in_chunk(v, seq - first, |_, e| {
                    out.push(e.to_stored(seq));
                    Ok(false)
                })?;
            }
        }
        Ok(out)
    }

    /// Ingest time of event `seq`, if stored.
    pub(super) fn event_ingest_ms(&self, account_id: u64, seq: u64) -> Result<Option<i64>> {
        match self.chunk_at(account_id, seq)? {
            Some((_, v)) => Ok(Some(chunk_header(&v)?.0)),
            None => Ok(None),
        }
    }

    /// Removes whole chunks of `account_id` stored before `before_ms` whose
    /// events all have a sequence number at most `max_seq` (every lane is
    /// past them), oldest first, until at least `limit` events are removed.
    /// Returns how many events were removed.
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
        for item in self.inner.log.range(start..=end) {
            if n >= limit {
                break;
            }
            let (k, v) = item?;
            let first = be_u64(&k[9..])?;
            let (ingest, count) = chunk_header(&v)?;
            if ingest >= before_ms || (first + count).saturating_sub(1) > max_seq {
                break;
            }
            for_each_in_chunk(&v, 0, |_, e| {
                batch.remove(index_key(account_id, e.id));
                Ok(true)
            })?;
            batch.remove(k);
            n += count as usize;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> NewEvent {
        NewEvent {
            event_id: id.into(),
            event_name: "COURSE_ENROLLMENT".into(),
            timestamp_ms: 0,
            json: format!("{{\"eventId\":\"{id}\"}}"),
        }
    }

    #[test]
    fn chunk_round_trip_and_skip() {
        let events = [event("a"), event("bb"), event("ccc")];
        let v = encode_chunk(42, events.iter());
        assert_eq!(chunk_header(&v).unwrap(), (42, 3));
        let mut seen = Vec::new();
        for_each_in_chunk(&v, 1, |i, e| {
            seen.push((i, e.id.to_string(), e.json.to_string()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (1, "bb".to_string(), "{\"eventId\":\"bb\"}".to_string()),
                (2, "ccc".to_string(), "{\"eventId\":\"ccc\"}".to_string()),
            ]
        );
        // A truncated chunk is an error, not a panic.
        assert!(for_each_in_chunk(&v[..v.len() - 1], 0, |_, _| Ok(true)).is_err());
    }

    #[test]
    fn schema_1_records_become_one_event_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = db.open_tree("log").unwrap();
        for (seq, id) in [(1u64, "x1"), (2, "x2")] {
            // The version-1 layout: ingest_ms ‖ name_len ‖ name ‖ id_len ‖ id ‖ json.
            let mut v = 7i64.to_be_bytes().to_vec();
            v.push(4);
            v.extend_from_slice(b"NAME");
            v.push(2);
            v.extend_from_slice(id.as_bytes());
            v.extend_from_slice(b"{}");
            log.insert(event_key(9, seq), v).unwrap();
        }
        // A crash after the first record: the marker says where to resume.
        let first = log.get(event_key(9, 1)).unwrap().unwrap();
        let converted = encode_chunk(
            7,
            std::iter::once(&NewEvent {
                event_id: "x1".into(),
                event_name: "NAME".into(),
                timestamp_ms: 0,
                json: "{}".into(),
            }),
        );
        assert_ne!(first.as_ref(), converted.as_slice());
        log.insert(event_key(9, 1), converted.clone()).unwrap();
        log.insert(MIGRATE_PROGRESS, &event_key(9, 1)).unwrap();
        assert_eq!(migrate_v1(&log).unwrap(), 1, "only the rest is converted");
        assert_eq!(
            log.get(event_key(9, 1)).unwrap().unwrap().as_ref(),
            converted.as_slice()
        );
        migration_finished(&log).unwrap();
        assert!(log.get(MIGRATE_PROGRESS).unwrap().is_none());
        let v = log.get(event_key(9, 2)).unwrap().unwrap();
        assert_eq!(chunk_header(&v).unwrap(), (7, 1));
        for_each_in_chunk(&v, 0, |_, e| {
            assert_eq!((e.name, e.id, e.json), ("NAME", "x2", "{}"));
            Ok(true)
        })
        .unwrap();
    }
}
