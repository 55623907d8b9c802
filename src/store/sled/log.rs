//! The event log: one append-only range per account, read by lane cursors.
//!
//! One sled key per chunk of a request (about 16 KiB of events), not per
//! event: sled's cost is per key (measured: the per-event layout spent most
//! of ingest in sled inserts), so a request of 100 typical events costs 2-3
//! log inserts. Events in a chunk have consecutive sequence numbers starting
//! at the key's.
//!
//! Chunk: ingest_ms(8) ‖ count(4) ‖ count × [name_len(1) ‖ name ‖ mode(1)
//! ‖ id_len(1) ‖ id ‖ json_len(4) ‖ json], integers big-endian. `mode` is
//! the delivery mode the event was published with (`r` or `b`); it is
//! present when the top bit of `count` is set (schema 3). Chunks written by
//! schema 2 have no mode bytes; their events fall back to the catalog.

use std::collections::HashSet;

use bytes::Bytes;

use super::{account_key, be_u64, SledStore};
use crate::domain::catalog::Mode;
use crate::domain::delivery::LaneFilter;
use crate::domain::event::{NewEvent, StoredEvent};
use crate::error::{Error, Result};
use crate::store::types::*;

const EVENT: u8 = b'e';
const INDEX: u8 = b'i';
const HIGH_WATER: &[u8] = b"m";
/// Events stored in the log (all accounts), kept in the same batches that
/// add and remove them.
const STORED: &[u8] = b"n";
/// Bytes before a chunk's first event.
const CHUNK_HEADER: usize = 12;
/// Set in a chunk's count when each event carries its mode byte.
const MODES: u32 = 0x8000_0000;

/// In-memory state guarded by the append lock.
pub(super) struct AppendState {
    /// Highest sequence number used.
    last_seq: u64,
    /// Events in the log.
    stored: u64,
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
        let stored = match log.get(STORED)? {
            Some(v) => be_u64(&v)?,
            None => {
                // A folder from before the count was kept: count once.
                let mut n = 0;
                for item in log.range(vec![EVENT]..vec![EVENT + 1]) {
                    n += chunk_header(&item?.1)?.1;
                }
                log.insert(STORED, &n.to_be_bytes())?;
                n
            }
        };
        Ok(AppendState { last_seq, stored })
    }
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

/// Chunks stay near this size: a lane that needs one event decodes its chunk.
const CHUNK_TARGET_BYTES: usize = 16 * 1024;

/// Bytes an event takes in a chunk.
fn chunk_bytes(e: &NewEvent) -> usize {
    7 + e.event_name.len() + e.event_id.len() + e.json.len()
}

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
            size += chunk_bytes(e);
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

fn mode_byte(m: Mode) -> u8 {
    match m {
        Mode::Realtime => b'r',
        Mode::Batch => b'b',
    }
}

/// Builds a chunk of `events`, each with its mode (names and ids are at
/// most 255 bytes: validated at ingest).
pub(super) fn encode_chunk<'a>(
    ingest_ms: i64,
    events: impl ExactSizeIterator<Item = &'a NewEvent> + Clone,
) -> Vec<u8> {
    let size: usize = events.clone().map(chunk_bytes).sum();
    let mut v = Vec::with_capacity(CHUNK_HEADER + size);
    v.extend_from_slice(&ingest_ms.to_be_bytes());
    v.extend_from_slice(&(events.len() as u32 | MODES).to_be_bytes());
    for e in events {
        v.push(e.event_name.len() as u8);
        v.extend_from_slice(e.event_name.as_bytes());
        v.push(mode_byte(e.mode));
        v.push(e.event_id.len() as u8);
        v.extend_from_slice(e.event_id.as_bytes());
        v.extend_from_slice(&(e.json.len() as u32).to_be_bytes());
        v.extend_from_slice(e.json.as_bytes());
    }
    v
}

/// Builds a schema-2 chunk (no modes) of (name, id, json); for the
/// conversion from schema 1, which knew no modes either.
fn encode_chunk_without_modes(ingest_ms: i64, events: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&ingest_ms.to_be_bytes());
    v.extend_from_slice(&(events.len() as u32).to_be_bytes());
    for (name, id, json) in events {
        v.push(name.len() as u8);
        v.extend_from_slice(name.as_bytes());
        v.push(id.len() as u8);
        v.extend_from_slice(id.as_bytes());
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json.as_bytes());
    }
    v
}

/// One event inside a chunk, borrowed from it.
pub(super) struct EventRef<'a> {
    pub ingest_ms: i64,
    pub name: &'a str,
    pub mode: Option<Mode>,
    pub id: &'a str,
    pub json: &'a str,
}

impl EventRef<'_> {
    /// The event as owned data; `chunk` is the chunk it was read from, whose
    /// bytes it borrows (its JSON is a slice of them, not a copy).
    pub(super) fn to_stored(&self, seq: u64, chunk: &Bytes) -> StoredEvent {
        StoredEvent {
            seq,
            event_id: self.id.to_string(),
            event_name: self.name.to_string(),
            ingest_time_ms: self.ingest_ms,
            mode: self.mode,
            json: chunk.slice_ref(self.json.as_bytes()),
        }
    }
}

fn corrupt() -> Error {
    Error::Internal("corrupt event log chunk".into())
}

/// (ingest_ms, number of events, whether events carry their mode) of a chunk.
fn chunk_layout(v: &[u8]) -> Result<(i64, u64, bool)> {
    let ingest = i64::from_be_bytes(
        v.get(..8)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    let raw = u32::from_be_bytes(
        v.get(8..12)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    Ok((ingest, u64::from(raw & !MODES), raw & MODES != 0))
}

/// (ingest_ms, number of events) of a chunk.
pub(super) fn chunk_header(v: &[u8]) -> Result<(i64, u64)> {
    chunk_layout(v).map(|(ingest, count, _)| (ingest, count))
}

/// Calls `f(index, event)` for each event of a chunk, from the first with
/// index `skip`, until `f` returns false. Skipped events are stepped over
/// by their lengths, without UTF-8 checks.
pub(super) fn for_each_in_chunk(
    v: &[u8],
    skip: u64,
    mut f: impl FnMut(u64, EventRef<'_>) -> Result<bool>,
) -> Result<()> {
    let (ingest_ms, count, modes) = chunk_layout(v)?;
    let mut at = CHUNK_HEADER;
    for i in 0..count {
        let nl = *v.get(at).ok_or_else(corrupt)? as usize;
        let name = v.get(at + 1..at + 1 + nl).ok_or_else(corrupt)?;
        at += 1 + nl;
        let mode = if modes {
            let m = match v.get(at) {
                Some(b'r') => Mode::Realtime,
                Some(b'b') => Mode::Batch,
                _ => return Err(corrupt()),
            };
            at += 1;
            Some(m)
        } else {
            None
        };
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
            mode,
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
        let utf8 = |b| std::str::from_utf8(b).map_err(|_| corrupt());
        let chunk = encode_chunk_without_modes(ingest, &[(utf8(name)?, utf8(id)?, utf8(json)?)]);
        batch.insert(k.clone(), chunk);
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

/// What a lane read found: see [`SledStore::read_for_lane`].
pub(super) struct LaneRead {
    /// The events the lane takes, oldest first.
    pub events: Vec<StoredEvent>,
    /// The last sequence number examined; the cursor may move there.
    pub scanned_to: u64,
    /// The read stopped at its scan limit: there may be more to read now.
    pub capped: bool,
    /// Events of the lane's types examined and left out by its payload
    /// filter (the cursor moves past them like past other types).
    pub skipped: u64,
}

/// One publish call waiting for the log writer.
pub(super) struct AppendJob {
    account_id: u64,
    events: Vec<NewEvent>,
    ingest_ms: i64,
    reply: tokio::sync::oneshot::Sender<Result<Written>>,
}

/// What the writer hands back to a job: outcomes, first sequence number,
/// last sequence number of the log after the round, group-commit ticket,
/// and the job's events.
type Written = (Vec<AppendOutcome>, u64, u64, u64, Vec<NewEvent>);

/// Publish calls waiting to be written, and whether a writer is running.
#[derive(Default)]
pub(super) struct AppendQueue {
    jobs: std::collections::VecDeque<AppendJob>,
    writing: bool,
}

/// Most event bytes one writer round puts in one sled batch; a round takes
/// at least one call, whatever its size.
const ROUND_BYTES: usize = 8 << 20;

impl SledStore {
    /// Appends events to the account's log, all or none, skipping ids already
    /// present. Durable when it returns Ok (group commit).
    ///
    /// Concurrent calls are merged: each call queues its events, and one
    /// writer on a blocking thread takes every call queued so far into one
    /// sled batch (sled seals and writes out its I/O buffer on every batch,
    /// so one batch per call made many small concurrent calls wait on
    /// sled's write-out threads). Each call still succeeds or fails as a
    /// whole, and its events keep consecutive sequence numbers.
    pub async fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        ingest_ms: i64,
    ) -> Result<Appended> {
        let (reply, written) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut q = self
                .inner
                .append_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.jobs.push_back(AppendJob {
                account_id,
                events,
                ingest_ms,
                reply,
            });
            !std::mem::replace(&mut q.writing, true)
        };
        if start_writer {
            let store = self.clone();
            tokio::task::spawn_blocking(move || store.write_queued());
        }
        let (outcomes, first_seq, last_seq, ticket, events) = written
            .await
            .map_err(|_| Error::Internal("the log writer stopped".into()))??;
        self.inner.commit.durable(ticket).await?;
        // Tickets and sequence numbers are handed out in the same order under
        // the append lock, so everything up to `last_seq` is durable now.
        self.inner
            .durable_seq
            .fetch_max(last_seq, std::sync::atomic::Ordering::AcqRel);
        let fresh: Vec<&NewEvent> = events
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| !o.duplicate)
            .map(|(e, _)| e)
            .collect();
        if !fresh.is_empty() {
            self.tally_appended(account_id, first_seq, &fresh);
        }
        Ok(Appended {
            outcomes,
            first_seq,
            last_seq,
            events,
        })
    }

    /// The log writer: writes queued calls in rounds until the queue is
    /// empty. Blocking.
    fn write_queued(&self) {
        loop {
            let round = {
                let mut q = self
                    .inner
                    .append_queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let mut round = Vec::new();
                let mut bytes = 0;
                while let Some(job) = q.jobs.front() {
                    let size: usize = job.events.iter().map(chunk_bytes).sum();
                    if !round.is_empty() && bytes + size > ROUND_BYTES {
                        break;
                    }
                    bytes += size;
                    round.extend(q.jobs.pop_front());
                }
                if round.is_empty() {
                    q.writing = false;
                    return;
                }
                round
            };
            self.write_round(round);
        }
    }

    /// One round of the writer: duplicates, sequence numbers and one sled
    /// batch for every call in `round`, under the append lock.
    fn write_round(&self, round: Vec<AppendJob>) {
        let mut state = self
            .inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        let mut seq = state.last_seq;
        // Ids stored by this round, per account: a later call's repeat of
        // one is a duplicate, as it would be one call later.
        let mut seen: HashSet<(u64, &str)> = HashSet::new();
        let mut placed = Vec::with_capacity(round.len());
        let mut failed = None;
        for job in &round {
            let first = seq + 1;
            let mut outcomes = Vec::with_capacity(job.events.len());
            let mut fresh = Vec::with_capacity(job.events.len());
            for e in &job.events {
                let ikey = index_key(job.account_id, &e.event_id);
                let duplicate = if !seen.insert((job.account_id, e.event_id.as_str())) {
                    true
                } else {
                    match self.inner.log.contains_key(&ikey) {
                        Ok(d) => d,
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    }
                };
                if !duplicate {
                    batch.insert(ikey, &(first + fresh.len() as u64).to_be_bytes());
                    fresh.push(e);
                }
                outcomes.push(AppendOutcome {
                    event_id: e.event_id.clone(),
                    duplicate,
                });
            }
            let mut chunk_first = first;
            for chunk in chunks_of(&fresh) {
                batch.insert(
                    &event_key(job.account_id, chunk_first),
                    encode_chunk(job.ingest_ms, chunk.iter().copied()),
                );
                chunk_first += chunk.len() as u64;
            }
            seq += fresh.len() as u64;
            placed.push((outcomes, first));
        }
        let stored = state.stored + (seq - state.last_seq);
        let applied = match failed {
            Some(e) => Err(e),
            None if seq == state.last_seq => Ok(()),
            None => {
                batch.insert(HIGH_WATER, &seq.to_be_bytes());
                batch.insert(STORED, &stored.to_be_bytes());
                self.inner.log.apply_batch(batch)
            }
        };
        let ticket = match applied {
            Ok(()) => {
                state.last_seq = seq;
                state.stored = stored;
                Ok(self.inner.commit.ticket())
            }
            Err(e) => {
                self.inner.commit.note_error(&e);
                Err(e)
            }
        };
        drop(state);
        for (job, (outcomes, first)) in round.into_iter().zip(placed) {
            let result = match &ticket {
                Ok(t) => Ok((outcomes, first, seq, *t, job.events)),
                Err(e) => Err(Error::from(e.clone())),
            };
            // A caller that went away no longer needs its answer.
            let _ = job.reply.send(result);
        }
    }

    /// Events stored in the log, all accounts together.
    pub fn stored_events(&self) -> u64 {
        self.inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stored
    }

    /// Highest sequence number known durable. A lane delivers nothing past
    /// it, so no listener receives an event a power loss could still take back.
    pub fn durable_seq(&self) -> u64 {
        self.inner
            .durable_seq
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Calls `f(seq, event, chunk)` for each event of `account_id` after
    /// `after_seq`, in order, until `f` returns false; `chunk` holds the
    /// event's bytes (see [`EventRef::to_stored`]).
    pub(super) fn visit_events(
        &self,
        account_id: u64,
        after_seq: u64,
        mut f: impl FnMut(u64, EventRef<'_>, &Bytes) -> Result<bool>,
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
            // sled's value, shared rather than copied.
            let chunk = Bytes::from_owner(v);
            let mut go_on = true;
            for_each_in_chunk(&chunk, want.saturating_sub(first), |i, e| {
                go_on = f(first + i, e, &chunk)?;
                Ok(go_on)
            })?;
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` durable events of `account_id` after `after_seq`, in order.
    pub fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        let until = self.durable_seq();
        let mut events = Vec::new();
        self.visit_events(account_id, after_seq, |seq, e, chunk| {
            if seq > until || events.len() >= limit {
                return Ok(false);
            }
            events.push(e.to_stored(seq, chunk));
            Ok(true)
        })?;
        Ok(events)
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

    /// Reads, for a lane, up to `limit` durable events of `account_id` after
    /// `after_seq` that `filter` accepts and no further than `until_seq`,
    /// examining at most `scan_limit` events.
    pub(super) fn read_for_lane(
        &self,
        account_id: u64,
        after_seq: u64,
        until_seq: u64,
        filter: &LaneFilter,
        limit: usize,
        scan_limit: usize,
    ) -> Result<LaneRead> {
        let until = until_seq.min(self.durable_seq());
        let mut events = Vec::new();
        let mut scanned_to = after_seq;
        let mut examined = 0;
        let mut capped = false;
        let mut skipped = 0;
        self.visit_events(account_id, after_seq, |seq, e, chunk| {
            if seq > until || events.len() >= limit {
                return Ok(false);
            }
            if examined >= scan_limit {
                capped = true;
                return Ok(false);
            }
            examined += 1;
            scanned_to = seq;
            if filter.accepts(e.name, e.mode) {
                if filter.matches_payload(e.json.as_bytes()) {
                    events.push(e.to_stored(seq, chunk));
                } else {
                    skipped += 1;
                }
            }
            Ok(true)
        })?;
        Ok(LaneRead {
            events,
            scanned_to,
            capped,
            skipped,
        })
    }

    /// Counts the events after `after_seq` up to `until_seq` that `filter`
    /// accepts, examining at most `scan_limit`; true when it stopped there.
    pub(super) fn count_for_lane(
        &self,
        account_id: u64,
        after_seq: u64,
        until_seq: u64,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<(u64, bool)> {
        let mut n = 0;
        let mut examined = 0;
        let mut capped = false;
        self.visit_events(account_id, after_seq, |seq, e, _| {
            if seq > until_seq {
                return Ok(false);
            }
            if examined >= scan_limit {
                capped = true;
                return Ok(false);
            }
            examined += 1;
            if filter.accepts(e.name, e.mode) {
                n += 1;
            }
            Ok(true)
        })?;
        Ok((n, capped))
    }

    /// The events at the given positions (missing ones, already trimmed, skipped).
    pub(super) fn events_at(&self, account_id: u64, seqs: &[u64]) -> Result<Vec<StoredEvent>> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut chunk: Option<(u64, u64, Bytes)> = None;
        for &seq in seqs {
            let cached = chunk
                .as_ref()
                .is_some_and(|(first, count, _)| seq >= *first && seq < first + count);
            if !cached {
                chunk = match self.chunk_at(account_id, seq)? {
                    Some((first, v)) => Some((first, chunk_header(&v)?.1, Bytes::from_owner(v))),
                    None => None,
                };
            }
            if let Some((first, _, v)) = &chunk {
                for_each_in_chunk(v, seq - first, |_, e| {
                    out.push(e.to_stored(seq, v));
                    Ok(false)
                })?;
            }
        }
        Ok(out)
    }

    /// The last sequence number of the chunks of `account_id` stored before
    /// `before_ms`, taking whole chunks oldest first until at least
    /// `max_events` events are covered; None when no chunk is that old.
    pub(super) fn trim_horizon(
        &self,
        account_id: u64,
        before_ms: i64,
        max_events: u64,
    ) -> Result<Option<u64>> {
        let mut horizon = None;
        let mut covered = 0;
        let range = event_key(account_id, 0)..=event_key(account_id, u64::MAX);
        for item in self.inner.log.range(range) {
            if covered >= max_events {
                break;
            }
            let (k, v) = item?;
            let first = be_u64(&k[9..])?;
            let (ingest, count) = chunk_header(&v)?;
            if ingest >= before_ms {
                break;
            }
            covered += count;
            horizon = Some(first + count.saturating_sub(1));
        }
        Ok(horizon)
    }

    /// Removes the chunks of `account_id` whose events all have a sequence
    /// number at most `horizon`, with their idempotency keys: one small
    /// batch per chunk, so sled's write lock is never held for long. Returns
    /// how many events were removed.
    pub(super) fn trim_through(&self, account_id: u64, horizon: u64) -> Result<u64> {
        let range = event_key(account_id, 0)..=event_key(account_id, horizon);
        let mut removed = 0;
        for item in self.inner.log.range(range) {
            let (k, v) = item?;
            let first = be_u64(&k[9..])?;
            let (_, count) = chunk_header(&v)?;
            if (first + count).saturating_sub(1) > horizon {
                break;
            }
            let mut batch = sled::Batch::default();
            for_each_in_chunk(&v, 0, |_, e| {
                batch.remove(index_key(account_id, e.id));
                Ok(true)
            })?;
            batch.remove(k);
            // Briefly under the append lock: the count is shared with appends.
            let mut state = self
                .inner
                .append_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let stored = state.stored.saturating_sub(count);
            batch.insert(STORED, &stored.to_be_bytes());
            self.inner.log.apply_batch(batch)?;
            state.stored = stored;
            drop(state);
            removed += count;
        }
        Ok(removed)
    }

    /// Ingest time of the first chunk after `after_seq`, if any.
    pub(super) fn first_ingest_after(
        &self,
        account_id: u64,
        after_seq: u64,
    ) -> Result<Option<i64>> {
        let mut found = None;
        self.visit_events(account_id, after_seq, |_, e, _| {
            found = Some(e.ingest_ms);
            Ok(false)
        })?;
        Ok(found)
    }

    /// Accounts that have events in the log.
    pub(super) fn accounts_with_events(&self) -> Result<Vec<u64>> {
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

    fn event(id: &str, mode: Mode) -> NewEvent {
        NewEvent {
            event_id: id.into(),
            event_name: "COURSE_ENROLLMENT".into(),
            timestamp_ms: 0,
            mode,
            json: format!("{{\"eventId\":\"{id}\"}}"),
        }
    }

    #[test]
    fn chunk_round_trip_and_skip() {
        let events = [
            event("a", Mode::Realtime),
            event("bb", Mode::Batch),
            event("ccc", Mode::Realtime),
        ];
        let v = encode_chunk(42, events.iter());
        assert_eq!(chunk_header(&v).unwrap(), (42, 3));
        let mut seen = Vec::new();
        for_each_in_chunk(&v, 1, |i, e| {
            seen.push((i, e.id.to_string(), e.mode, e.json.to_string()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    1,
                    "bb".to_string(),
                    Some(Mode::Batch),
                    "{\"eventId\":\"bb\"}".to_string()
                ),
                (
                    2,
                    "ccc".to_string(),
                    Some(Mode::Realtime),
                    "{\"eventId\":\"ccc\"}".to_string()
                ),
            ]
        );
        // A truncated chunk is an error, not a panic.
        assert!(for_each_in_chunk(&v[..v.len() - 1], 0, |_, _| Ok(true)).is_err());
    }

    #[test]
    fn schema_2_chunks_read_without_modes() {
        let v = encode_chunk_without_modes(5, &[("NAME", "x", "{}")]);
        assert_eq!(chunk_header(&v).unwrap(), (5, 1));
        for_each_in_chunk(&v, 0, |_, e| {
            assert_eq!((e.name, e.mode, e.id, e.json), ("NAME", None, "x", "{}"));
            Ok(true)
        })
        .unwrap();
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
        let converted = encode_chunk_without_modes(7, &[("NAME", "x1", "{}")]);
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
