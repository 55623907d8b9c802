//! Lanes and the delivery log.
//!
//! A lane's state is its cursor (the last log position taken into a
//! delivery or passed over) and the delivery at its head while that one is
//! unfinished. Every change to a lane's state happens under that lane's lock
//! ([`LaneSlot`]), taken by the lane's own operations and by the janitor, so
//! the janitor can expire what a lane has not sent without racing it. The
//! slot also caches the state: lanes do not rewrite it when a delivery
//! finishes (one write less per payload), so the stored head may name a
//! finished delivery; the cache knows better, and after a restart the lane
//! just clears it.
//!
//! Nothing is written before a new payload is sent: its id is derived from
//! the lane and its events (see [`delivery_id`]), so a payload rebuilt from
//! the same events after a crash keeps its `webhook-id`. A payload that
//! fails is recorded (record, then the lane state naming it) before its
//! retry wait. Delivered ones wait in the slot and are written in batches
//! by [`SledStore::save_lanes`] (every `delivery.log_flush_ms`, at shutdown, and
//! whenever a lane has [`MAX_UNSAVED`]); until then the stored cursor stays
//! before them, so a crash repeats those deliveries and never skips one.
//!
//! Keys of the `lanes` tree (`wh` is the webhook id, `m` the mode byte):
//! - `L` wh `/` m → [`LaneState`] (JSON).
//! - `D` wh `/` id → [`DeliveryRecord`] (JSON).
//! - `P` wh `/` id → the events of a delivery whose events are kept with it
//!   (`events_kept`): from its first failed attempt on, dead letters,
//!   requeued copies. Trimming the event log never touches them.
//! - `Q` wh `/` m id → () : requeued deliveries, taken oldest first.
//! - `F` class finish_ms(8) wh `/` id → () : finished deliveries by finish
//!   time, so the janitor purges the due ones without reading the rest;
//!   class `d` (delivered, kept `delivery.retention_ms`) or `x` (dead or
//!   expired, kept `delivery.dead_letter_retention_ms`).
//! - `Z` wh `/` id → () : dead deliveries no RedeliverEvents without ids
//!   has requeued yet.
//! - `X` wh → () : a deleted webhook whose records the janitor still removes.
//!
//! A lane's delivered records and its state are written in one batch.
//! Other writes that belong together but are not one batch are ordered so a crash
//! in between leaves nothing pointing at what is missing: a payload before
//! the record that says it is kept, index entries before the finished
//! record (the janitor drops index entries whose record is not finished).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::SledStore;
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter, ModeTag};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::error::{Error, Result};
use crate::store::types::*;

const LANE: u8 = b'L';
const DELIVERY: u8 = b'D';
const PAYLOAD: u8 = b'P';
const REQUEUED: u8 = b'Q';
const FINISHED: u8 = b'F';
const DEAD_INDEX: u8 = b'Z';
const DELETED: u8 = b'X';

/// Most event ids in one EXPIRED record; more make several records.
const MAX_IDS_PER_EXPIRED: usize = 1000;

/// Persistent state of one lane (webhook × mode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneState {
    /// Last log sequence number taken into a delivery or passed over.
    pub cursor: u64,
    /// The delivery at the head: being attempted, or (as stored) possibly
    /// already finished, since the state is not rewritten when one ends.
    pub head: Option<String>,
    /// A lane with several payloads in flight (`max_in_flight` > 1): its
    /// recorded unfinished deliveries besides `head`, each keeping its
    /// events, so the cursor can move past them. As stored, possibly
    /// finished already, like `head`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parallel: Vec<String>,
}

impl LaneState {
    /// Drops `id` from the recorded deliveries it names.
    fn forget(&mut self, id: &str) {
        if self.head.as_deref() == Some(id) {
            self.head = None;
        }
        self.parallel.retain(|p| p != id);
    }
}

/// A lane's lock and its cached state (see the module doc).
#[derive(Default)]
pub(super) struct LaneSlot {
    state: Option<LaneState>,
    tally: Arc<LaneTally>,
    /// New deliveries handed out and not written yet, by the cursor from
    /// before each was taken: the stored cursor stays at the first of them
    /// until it is recorded or delivered and saved.
    fresh: BTreeMap<u64, Handed>,
    /// Recorded deliveries (`head`, `parallel`) handed out and not finished,
    /// with their event counts.
    handed: HashMap<String, u64>,
    /// Delivered records not written yet, oldest first.
    unsaved: Vec<DeliveryRecord>,
    /// The cached state is ahead of the stored one.
    dirty: bool,
}

/// A new delivery handed out: its id and how many events it carries.
struct Handed {
    id: String,
    events: u64,
}

impl LaneSlot {
    /// Removes the new delivery `id` from those handed out.
    fn take_fresh(&mut self, id: &str) -> Option<Handed> {
        let cursor = *self.fresh.iter().find(|(_, h)| h.id == id)?.0;
        self.fresh.remove(&cursor)
    }

    fn in_flight(&self) -> usize {
        self.fresh.len() + self.handed.len()
    }

    /// The state as it may be stored: with new deliveries not written yet,
    /// the cursor from before the first of them.
    fn stored_state(&self) -> LaneState {
        let mut state = self.state.clone().unwrap_or_default();
        if let Some((&cursor, _)) = self.fresh.first_key_value() {
            state.cursor = cursor;
        }
        state
    }
}

/// Most delivered records a lane keeps unwritten; one more writes them.
const MAX_UNSAVED: usize = 256;

/// A lane's slot, shared by whoever works on the lane.
type SharedSlot = Arc<Mutex<LaneSlot>>;
/// An account's lanes and their tallies.
type AccountTallies = Vec<(LaneKey, Arc<LaneTally>)>;

/// Lane slots and deleted webhooks, in memory.
#[derive(Default)]
pub(super) struct LaneRegistry {
    slots: Mutex<HashMap<(String, ModeTag), SharedSlot>>,
    /// Each account's lane tallies, for counting arrivals. Its lock is also
    /// taken when a tally's seed point is chosen, so an arrival is counted
    /// either by the seed or as it arrives, never both or neither.
    tallies: Mutex<HashMap<u64, AccountTallies>>,
    /// Webhooks deleted (tombstoned): their lanes can never run again.
    deleted: Mutex<HashSet<String>>,
}

impl LaneRegistry {
    fn slot_of(&self, key: &LaneKey) -> Arc<Mutex<LaneSlot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&(key.webhook_id.clone(), key.mode)) {
            return s.clone();
        }
        let slot = Arc::new(Mutex::new(LaneSlot::default()));
        let tally = slot.lock().unwrap_or_else(|p| p.into_inner()).tally.clone();
        self.tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.account_id)
            .or_default()
            .push((key.clone(), tally));
        slots.insert((key.webhook_id.clone(), key.mode), slot.clone());
        slot
    }

    fn slot(&self, webhook_id: &str, mode: ModeTag) -> Option<Arc<Mutex<LaneSlot>>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(webhook_id.to_string(), mode))
            .cloned()
    }

    fn is_deleted(&self, webhook_id: &str) -> bool {
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(webhook_id)
    }

    /// Marks `webhook_id` deleted and drops its slots. Callers hold the
    /// slots' locks, so no lane operation is halfway through.
    fn mark_deleted(&self, webhook_id: &str) {
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(webhook_id.to_string());
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for mode in [ModeTag::Realtime, ModeTag::Batch] {
            slots.remove(&(webhook_id.to_string(), mode));
        }
        for lanes in self
            .tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            lanes.retain(|(k, _)| k.webhook_id != webhook_id);
        }
    }
}

/// The id of a new delivery of `events` on lane `key`: the first event's
/// ingest time (so ids still sort roughly by time) and a hash of the lane
/// and the event range. Sequence numbers are never reused, so the id is
/// unique; the same events on the same lane give the same id.
fn delivery_id(key: &LaneKey, events: &[StoredEvent]) -> String {
    let first = events.first().map_or(0, |e| e.seq);
    let last = events.last().map_or(0, |e| e.seq);
    let time = events.first().map_or(0, |e| e.ingest_time_ms);
    crate::domain::ids::derived_id(
        crate::domain::ids::DELIVERY_PREFIX,
        time,
        &[
            key.webhook_id.as_bytes(),
            &[mode_byte(key.mode)],
            &first.to_be_bytes(),
            &last.to_be_bytes(),
        ],
    )
}

fn mode_byte(m: ModeTag) -> u8 {
    match m {
        ModeTag::Realtime => b'r',
        ModeTag::Batch => b'b',
    }
}

fn webhook_prefix(kind: u8, webhook_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(webhook_id.len() + 40);
    k.push(kind);
    k.extend_from_slice(webhook_id.as_bytes());
    k.push(b'/');
    k
}

fn keyed(kind: u8, webhook_id: &str, delivery_id: &str) -> Vec<u8> {
    let mut k = webhook_prefix(kind, webhook_id);
    k.extend_from_slice(delivery_id.as_bytes());
    k
}

pub(super) fn lane_key(webhook_id: &str, mode: ModeTag) -> Vec<u8> {
    let mut k = webhook_prefix(LANE, webhook_id);
    k.push(mode_byte(mode));
    k
}

pub(super) fn requeued_key(webhook_id: &str, mode: ModeTag, delivery_id: &str) -> Vec<u8> {
    let mut k = webhook_prefix(REQUEUED, webhook_id);
    k.push(mode_byte(mode));
    k.extend_from_slice(delivery_id.as_bytes());
    k
}

fn deleted_key(webhook_id: &str) -> Vec<u8> {
    let mut k = vec![DELETED];
    k.extend_from_slice(webhook_id.as_bytes());
    k
}

/// Finished-index class of a final state.
fn finished_class(state: DeliveryState) -> u8 {
    match state {
        DeliveryState::Delivered => b'd',
        _ => b'x',
    }
}

fn finished_key(class: u8, finish_ms: i64, webhook_id: &str, delivery_id: &str) -> Vec<u8> {
    let mut k = vec![FINISHED, class];
    k.extend_from_slice(&(finish_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(webhook_id.as_bytes());
    k.push(b'/');
    k.extend_from_slice(delivery_id.as_bytes());
    k
}

/// (webhook id, delivery id) of a finished-index key.
/// The finish-time index key of a finished record.
fn finished_key_of(r: &DeliveryRecord) -> Vec<u8> {
    finished_key(
        finished_class(r.state),
        r.finish_time_ms,
        &r.webhook_id,
        &r.id,
    )
}

fn parse_finished_key(k: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(k.get(10..)?).ok()?;
    let (w, d) = rest.split_once('/')?;
    Some((w.to_string(), d.to_string()))
}

/// A kept payload: count(4) ‖ count × [seq(8) ‖ ingest_ms(8) ‖ mode(1:
/// `r`, `b` or 0) ‖ name_len(1) ‖ name ‖ id_len(1) ‖ id ‖ json_len(4) ‖ json].
fn encode_payload(events: &[StoredEvent]) -> Vec<u8> {
    let size: usize = events
        .iter()
        .map(|e| 23 + e.event_name.len() + e.event_id.len() + e.json.len())
        .sum();
    let mut v = Vec::with_capacity(4 + size);
    v.extend_from_slice(&(events.len() as u32).to_be_bytes());
    for e in events {
        v.extend_from_slice(&e.seq.to_be_bytes());
        v.extend_from_slice(&e.ingest_time_ms.to_be_bytes());
        v.push(match e.mode {
            Some(Mode::Realtime) => b'r',
            Some(Mode::Batch) => b'b',
            None => 0,
        });
        v.push(e.event_name.len() as u8);
        v.extend_from_slice(e.event_name.as_bytes());
        v.push(e.event_id.len() as u8);
        v.extend_from_slice(e.event_id.as_bytes());
        v.extend_from_slice(&(e.json.len() as u32).to_be_bytes());
        v.extend_from_slice(&e.json);
    }
    v
}

fn decode_payload(v: &[u8]) -> Result<Vec<StoredEvent>> {
    let bad = || Error::Internal("corrupt kept payload".into());
    let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
        let s = v.get(*at..*at + n).ok_or_else(bad)?;
        *at += n;
        Ok(s)
    };
    let be8 = |b: &[u8]| -> Result<[u8; 8]> { b.try_into().map_err(|_| bad()) };
    let text = |b: &[u8]| -> Result<String> {
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| bad())
    };
    let mut at = 0;
    let count = u32::from_be_bytes(take(&mut at, 4)?.try_into().map_err(|_| bad())?);
    let mut out = Vec::with_capacity(count.min(100_000) as usize);
    for _ in 0..count {
        let seq = u64::from_be_bytes(be8(take(&mut at, 8)?)?);
        let ingest = i64::from_be_bytes(be8(take(&mut at, 8)?)?);
        let mode = match take(&mut at, 1)?[0] {
            b'r' => Some(Mode::Realtime),
            b'b' => Some(Mode::Batch),
            _ => None,
        };
        let nl = take(&mut at, 1)?[0] as usize;
        let name = text(take(&mut at, nl)?)?;
        let il = take(&mut at, 1)?[0] as usize;
        let id = text(take(&mut at, il)?)?;
        let jl = u32::from_be_bytes(take(&mut at, 4)?.try_into().map_err(|_| bad())?) as usize;
        let json = take(&mut at, jl)?;
        std::str::from_utf8(json).map_err(|_| bad())?;
        let json = bytes::Bytes::copy_from_slice(json);
        out.push(StoredEvent {
            seq,
            event_id: id,
            event_name: name,
            ingest_time_ms: ingest,
            mode,
            json,
        });
    }
    Ok(out)
}

impl SledStore {
    fn put_record(&self, r: &DeliveryRecord) -> Result<()> {
        self.inner.lanes.insert(
            keyed(DELIVERY, &r.webhook_id, &r.id),
            serde_json::to_vec(r)?,
        )?;
        Ok(())
    }

    fn put_lane(&self, key: &LaneKey, state: &LaneState) -> Result<()> {
        self.inner.lanes.insert(
            lane_key(&key.webhook_id, key.mode),
            serde_json::to_vec(state)?,
        )?;
        Ok(())
    }

    /// Stores `events` as `record`'s kept payload (if not yet) and marks it.
    fn keep_events(&self, record: &mut DeliveryRecord, events: &[StoredEvent]) -> Result<()> {
        if !record.events_kept {
            self.inner.lanes.insert(
                keyed(PAYLOAD, &record.webhook_id, &record.id),
                encode_payload(events),
            )?;
            record.events_kept = true;
        }
        Ok(())
    }

    /// The events of a delivery: its kept payload, or else from the log
    /// (those still stored).
    fn events_of(&self, r: &DeliveryRecord) -> Result<Vec<StoredEvent>> {
        if r.events_kept {
            match self.inner.lanes.get(keyed(PAYLOAD, &r.webhook_id, &r.id))? {
                Some(v) => decode_payload(&v),
                None => Ok(Vec::new()),
            }
        } else {
            self.events_at(r.account_id, &r.seqs)
        }
    }

    /// The lane's state: cached, stored, or (a lane never used) new at the
    /// end of the durable log.
    fn lane_state(&self, slot: &mut LaneSlot, key: &LaneKey) -> Result<LaneState> {
        if let Some(s) = &slot.state {
            return Ok(s.clone());
        }
        let state = match self.inner.lanes.get(lane_key(&key.webhook_id, key.mode))? {
            Some(v) => serde_json::from_slice(&v)?,
            None => {
                let s = LaneState {
                    cursor: self.durable_seq(),
                    ..Default::default()
                };
                self.put_lane(key, &s)?;
                s
            }
        };
        slot.state = Some(state.clone());
        Ok(state)
    }

    /// A lane's cursor (for the metrics).
    pub fn lane_cursor(&self, key: &LaneKey) -> Result<u64> {
        let slot = self.inner.lane_registry.slot_of(key);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.lane_state(&mut slot, key)?.cursor)
    }

    /// The lanes known to this process, with their tallies (for the metrics).
    pub fn lane_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)> {
        self.inner
            .lane_registry
            .tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|v| v.iter().cloned())
            .collect()
    }

    /// Counts freshly appended events (the first with sequence number
    /// `first_seq`, the others following) in the tallies of the account's lanes.
    pub(super) fn tally_appended(&self, account_id: u64, first_seq: u64, events: &[&NewEvent]) {
        let tallies = self
            .inner
            .lane_registry
            .tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(lanes) = tallies.get(&account_id) else {
            return;
        };
        for (_, tally) in lanes {
            let through = tally.counted_through.load(Ordering::Acquire);
            if through == u64::MAX {
                continue;
            }
            let filter = tally.filter.lock().unwrap_or_else(|p| p.into_inner());
            let Some(filter) = filter.as_ref() else {
                continue;
            };
            let n = events
                .iter()
                .enumerate()
                .filter(|(i, e)| {
                    first_seq + *i as u64 > through && filter.accepts(&e.event_name, Some(e.mode))
                })
                .count();
            tally.pending.fetch_add(n as i64, Ordering::AcqRel);
        }
    }

    /// Seeds the lane's tally (under its lock, `slot` held) when it has never
    /// been seeded or `filter` changed: the seed point is the durable log
    /// end, chosen under the account's tally lock.
    fn seed_tally(&self, slot: &mut LaneSlot, key: &LaneKey, filter: &LaneFilter) -> Result<()> {
        let tally = slot.tally.clone();
        {
            let mut current = tally.filter.lock().unwrap_or_else(|p| p.into_inner());
            let same = current.as_ref().is_some_and(|f| f.same_as(filter));
            if same && tally.seeded() {
                return Ok(());
            }
            *current = Some(filter.clone());
        }
        let through = {
            let _arrivals = self
                .inner
                .lane_registry
                .tallies
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let through = self.durable_seq();
            tally.pending.store(0, Ordering::Release);
            tally.counted_through.store(through, Ordering::Release);
            through
        };
        let cursor = self.lane_state(slot, key)?.cursor;
        let (n, capped) = if cursor <= through {
            self.count_for_lane(key.account_id, cursor, through, filter, BACKLOG_SEED_LIMIT)?
        } else {
            // The lane is past the seed point: those arrivals were counted
            // but are taken already.
            let (n, capped) =
                self.count_for_lane(key.account_id, through, cursor, filter, BACKLOG_SEED_LIMIT)?;
            tally.pending.fetch_sub(n as i64, Ordering::AcqRel);
            (0, capped)
        };
        tally.pending.fetch_add(n as i64, Ordering::AcqRel);
        tally.capped.store(capped, Ordering::Release);
        tally.requeued.store(
            self.requeued_count(&key.webhook_id, key.mode) as i64,
            Ordering::Release,
        );
        Ok(())
    }

    /// Decides what the lane does next, under the lane's lock: resume a
    /// recorded unfinished delivery, take the oldest requeued one, or take
    /// up to `max_events` new durable events (a batch lane only when it has
    /// a full payload or `batch_due`) into a new delivery, written only once
    /// it fails or with the next batch of outcomes (see the module doc); up
    /// to `n` deliveries at once, under one lock, for a lane with several in
    /// flight or one that sends them one after another in this order.
    /// Stops after the first take that is not a [`Take::Send`], after `n`
    /// sends, or once the sends carry `max_events_total` events. Blocking.
    pub fn lane_take_many(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        mut args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> Result<Vec<Take>> {
        let takes = self.with_lane(key, |slot| {
            let mut takes = Vec::new();
            let mut events = 0;
            while takes.len() < n && events < max_events_total {
                let take = self.take_locked(slot, key, filter, args)?;
                let Take::Send { events: e, .. } = &take else {
                    takes.push(take);
                    break;
                };
                events += e.len();
                takes.push(take);
                args.in_flight += 1;
            }
            Ok(takes)
        })?;
        Ok(takes.unwrap_or_else(|| vec![Take::Gone]))
    }

    /// Runs `f` under the lane's lock, unless its webhook was deleted (None).
    fn with_lane<T>(
        &self,
        key: &LaneKey,
        f: impl FnOnce(&mut LaneSlot) -> Result<T>,
    ) -> Result<Option<T>> {
        let registry = &self.inner.lane_registry;
        if registry.is_deleted(&key.webhook_id) {
            return Ok(None);
        }
        let slot = registry.slot_of(key);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        // Under the slot's lock: a deletion that got here first wins.
        if registry.is_deleted(&key.webhook_id) {
            return Ok(None);
        }
        f(&mut slot).map(Some)
    }

    fn take_locked(
        &self,
        slot: &mut LaneSlot,
        key: &LaneKey,
        filter: &LaneFilter,
        args: TakeArgs,
    ) -> Result<Take> {
        self.seed_tally(slot, key, filter)?;
        let tally = slot.tally.clone();
        let mut state = self.lane_state(slot, key)?;
        if args.in_flight == 0 && slot.in_flight() > 0 {
            // What was handed out and not finished was abandoned (the lane
            // stopped, paused or failed first): new payloads are taken again
            // from the first one's cursor, under the same ids, and recorded
            // ones resume below.
            if let Some((&cursor, _)) = slot.fresh.first_key_value() {
                state.cursor = cursor;
                slot.state = Some(state.clone());
            }
            let returned = slot.fresh.values().map(|h| h.events).sum();
            slot.fresh.clear();
            slot.handed.clear();
            tally.heads_dropped(returned);
            if filter.has_payload_filter() {
                // What the payload filter skipped after the rewound cursor
                // was subtracted already and is read again: count afresh.
                tally.counted_through.store(u64::MAX, Ordering::Release);
                self.seed_tally(slot, key, filter)?;
            }
        }
        let first = args.in_flight == 0;
        let recorded: Vec<String> = state
            .head
            .iter()
            .chain(&state.parallel)
            .filter(|id| !slot.handed.contains_key(*id))
            .cloned()
            .collect();
        for id in recorded {
            match self.delivery(&key.webhook_id, &id)? {
                Some(mut r) if !r.state.is_final() => {
                    let events = self.events_of(&r)?;
                    if events.len() == r.seqs.len() {
                        tally.head_taken(&events, first);
                        slot.handed.insert(id, events.len() as u64);
                        return Ok(Take::Send {
                            record: Box::new(r),
                            events,
                            taken: 0,
                            requeued: false,
                        });
                    }
                    // Its events are gone from the log (trimmed while the
                    // router was down): record that instead of sending part.
                    r.finish(DeliveryState::Expired, args.now_ms);
                    self.record_finished(&mut r, &[])?;
                    tracing::warn!(delivery_id = %r.id, "events of the delivery are no longer stored; expired");
                }
                _ => {}
            }
            // Finished (the stored state is not rewritten when one ends).
            state.forget(&id);
            slot.state = Some(state.clone());
        }
        let prefix = requeued_key(&key.webhook_id, key.mode, "");
        if let Some(item) = self.inner.lanes.scan_prefix(&prefix).next() {
            let (qkey, _) = item?;
            // The batch below stores the cached cursor: what it covers first.
            if slot.dirty {
                slot.state = Some(state.clone());
                self.save_lane(slot, &key.webhook_id, key.mode)?;
            }
            let id = String::from_utf8_lossy(&qkey[prefix.len()..]).into_owned();
            if args.concurrent || state.head.is_some() {
                state.parallel.push(id.clone());
            } else {
                state.head = Some(id.clone());
            }
            slot.state = Some(state);
            let mut batch = sled::Batch::default();
            batch.insert(
                lane_key(&key.webhook_id, key.mode),
                serde_json::to_vec(&slot.stored_state())?,
            );
            batch.remove(qkey);
            self.inner.lanes.apply_batch(batch)?;
            tally.requeued.fetch_sub(1, Ordering::AcqRel);
            if let Some(record) = self.delivery(&key.webhook_id, &id)? {
                let events = self.events_of(&record)?;
                tally.head_taken(&events, first);
                slot.handed.insert(id, events.len() as u64);
                return Ok(Take::Send {
                    record: Box::new(record),
                    events,
                    taken: 0,
                    requeued: true,
                });
            }
            return Ok(Take::Idle { more: true });
        }
        let read = self.read_for_lane(
            key.account_id,
            state.cursor,
            u64::MAX,
            filter,
            args.max_events,
            args.scan_limit,
        )?;
        if read.events.is_empty() {
            if read.scanned_to > state.cursor {
                state.cursor = read.scanned_to;
                slot.state = Some(state);
                slot.dirty = true;
                tally.sub_pending(read.skipped);
            }
            if slot.dirty {
                self.save_lane(slot, &key.webhook_id, key.mode)?;
            }
            return Ok(Take::Idle { more: read.capped });
        }
        if key.mode == ModeTag::Batch && read.events.len() < args.max_events && !args.batch_due {
            return Ok(Take::NotDue);
        }
        let mut record = DeliveryRecord::new(
            key.account_id,
            &key.webhook_id,
            key.mode,
            read.events.iter().map(|e| (e.seq, e.event_id.clone())),
            args.now_ms,
        );
        record.id = delivery_id(key, &read.events);
        // Written only if it fails (or after it is delivered): see the module doc.
        let taken = read.events.len() as u64;
        slot.fresh.insert(
            state.cursor,
            Handed {
                id: record.id.clone(),
                events: taken,
            },
        );
        slot.dirty = true;
        state.cursor = read.scanned_to;
        slot.state = Some(state);
        tally.sub_pending(taken + read.skipped);
        tally.head_taken(&read.events, first);
        Ok(Take::Send {
            record: Box::new(record),
            events: read.events,
            taken,
            requeued: false,
        })
    }

    /// Records a failed attempt of a delivery the lane has in flight
    /// (RETRYING, or the last one before it dies), keeping its events with
    /// it from now on so the retries and a dead letter never depend on the
    /// log. Blocking.
    pub fn lane_attempt_failed(
        &self,
        key: &LaneKey,
        record: &mut DeliveryRecord,
        events: &[StoredEvent],
    ) -> Result<()> {
        self.with_lane(key, |slot| {
            self.keep_events(record, events)?;
            self.put_record(record)?;
            if let Some(h) = slot.take_fresh(&record.id) {
                // Now recorded: the stored state may name it (a concurrent
                // lane's cursor moves past it, its events are kept).
                let state = slot.state.get_or_insert_with(LaneState::default);
                if slot.fresh.is_empty() && slot.handed.is_empty() && state.head.is_none() {
                    state.head = Some(record.id.clone());
                } else {
                    state.parallel.push(record.id.clone());
                }
                slot.handed.insert(record.id.clone(), h.events);
                self.save_lane(slot, &key.webhook_id, key.mode)?;
            }
            Ok(())
        })
        .map(drop)
    }

    /// Records a delivery the lane had in flight as finished (DELIVERED or
    /// DEAD), with its index entries; a dead letter keeps its events. A new
    /// delivery that went through waits for the next batch. Blocking.
    pub fn lane_finish(
        &self,
        key: &LaneKey,
        record: &mut DeliveryRecord,
        events: &[StoredEvent],
    ) -> Result<()> {
        self.with_lane(key, |slot| {
            let fresh = slot.fresh.values().any(|h| h.id == record.id);
            if fresh && record.state == DeliveryState::Delivered {
                // Written with the next batch (see the module doc).
                slot.unsaved.push(record.clone());
            } else {
                // Still handed out until written: a failed write leaves the
                // stored cursor before it.
                self.record_finished(record, events)?;
            }
            let n = slot.take_fresh(&record.id).map_or(0, |h| h.events);
            let n = n + slot.handed.remove(&record.id).unwrap_or(0);
            if let Some(s) = &mut slot.state {
                s.forget(&record.id);
            }
            slot.dirty = true;
            slot.tally.head_finished(n, slot.in_flight() == 0);
            if slot.unsaved.len() >= MAX_UNSAVED {
                self.save_lane(slot, &key.webhook_id, key.mode)?;
            }
            Ok(())
        })
        .map(drop)
    }

    /// [`SledStore::lane_finish`] for a new delivery that went through, when that
    /// needs no write and the lane's lock is free at once: only memory
    /// changes, so it may run on an async thread. False: call `lane_finish`.
    pub fn lane_finish_quick(&self, key: &LaneKey, record: &DeliveryRecord) -> bool {
        if record.state != DeliveryState::Delivered {
            return false;
        }
        let registry = &self.inner.lane_registry;
        let Some(slot) = registry.slot(&key.webhook_id, key.mode) else {
            return false;
        };
        let Ok(mut slot) = slot.try_lock() else {
            return false;
        };
        if registry.is_deleted(&key.webhook_id) || slot.unsaved.len() + 1 >= MAX_UNSAVED {
            return false;
        }
        let Some(h) = slot.take_fresh(&record.id) else {
            return false;
        };
        slot.unsaved.push(record.clone());
        slot.dirty = true;
        let last = slot.in_flight() == 0;
        slot.tally.head_finished(h.events, last);
        true
    }

    /// Writes a lane's delivered records and then its state as far as it is
    /// recorded (see [`LaneSlot::stored_state`]). Under the lane's lock.
    fn save_lane(&self, slot: &mut LaneSlot, webhook_id: &str, mode: ModeTag) -> Result<()> {
        let state = serde_json::to_vec(&slot.stored_state())?;
        if slot.unsaved.is_empty() {
            self.inner.lanes.insert(lane_key(webhook_id, mode), state)?;
        } else {
            // One batch: sled writes out its buffer around each batch, which
            // costs little spread over a few hundred records, and the state
            // can never be stored without the records it moved past.
            let mut batch = sled::Batch::default();
            for r in &slot.unsaved {
                batch.insert(finished_key_of(r), &[]);
                batch.insert(
                    keyed(DELIVERY, &r.webhook_id, &r.id),
                    serde_json::to_vec(r)?,
                );
            }
            batch.insert(lane_key(webhook_id, mode), state);
            self.inner.lanes.apply_batch(batch)?;
            slot.unsaved.clear();
        }
        slot.dirty = false;
        Ok(())
    }

    /// Writes what every lane has not written yet (see the module doc);
    /// returns how many lanes wrote. Blocking.
    pub fn save_lanes(&self) -> Result<usize> {
        let registry = &self.inner.lane_registry;
        let slots: Vec<((String, ModeTag), SharedSlot)> = registry
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut saved = 0;
        for ((webhook_id, mode), slot) in slots {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.dirty && !registry.is_deleted(&webhook_id) {
                self.save_lane(&mut slot, &webhook_id, mode)?;
                saved += 1;
            }
        }
        Ok(saved)
    }

    /// Writes a finished record and its index entries (see the module doc
    /// for the order).
    fn record_finished(&self, record: &mut DeliveryRecord, events: &[StoredEvent]) -> Result<()> {
        if record.state == DeliveryState::Dead {
            self.keep_events(record, events)?;
            self.inner
                .lanes
                .insert(keyed(DEAD_INDEX, &record.webhook_id, &record.id), &[])?;
        }
        self.inner.lanes.insert(finished_key_of(record), &[])?;
        self.put_record(record)
    }

    /// One delivery record.
    pub fn delivery(&self, webhook_id: &str, delivery_id: &str) -> Result<Option<DeliveryRecord>> {
        match self
            .inner
            .lanes
            .get(keyed(DELIVERY, webhook_id, delivery_id))?
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
        let prefix = webhook_prefix(DELIVERY, webhook_id);
        let end = match after {
            Some(id) => keyed(DELIVERY, webhook_id, id),
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

    /// Queues copies of the named deliveries (any state) on their lanes, or,
    /// with `ids` None, of every DEAD delivery no such call requeued yet
    /// (each at most once). The copies keep their events with them. All or
    /// none for named deliveries: one that is unknown, or whose events are
    /// no longer stored, fails the call before anything is queued. Returns
    /// how many were queued; `progress(done, total)` is called after each 1000.
    pub fn redeliver(
        &self,
        webhook_id: &str,
        ids: Option<&[String]>,
        now_ms: i64,
        progress: impl FnMut(usize, usize),
    ) -> Result<usize> {
        let _serial = self
            .inner
            .redeliver_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut originals = Vec::new();
        match ids {
            Some(ids) => {
                for id in ids {
                    let r = self
                        .delivery(webhook_id, id)?
                        .ok_or_else(|| Error::NotFound(format!("delivery {id}")))?;
                    let events = self.events_of(&r)?;
                    if events.len() < r.seqs.len() || events.is_empty() {
                        return Err(Error::FailedPrecondition(format!(
                            "delivery {id}: its events are no longer stored (older than \
                             delivery.retention_ms, or expired)"
                        )));
                    }
                    originals.push((r, events));
                }
            }
            None => {
                for item in self
                    .inner
                    .lanes
                    .scan_prefix(webhook_prefix(DEAD_INDEX, webhook_id))
                {
                    let (k, _) = item?;
                    let id = String::from_utf8_lossy(&k[webhook_id.len() + 2..]).into_owned();
                    match self.delivery(webhook_id, &id)? {
                        Some(r) if r.state == DeliveryState::Dead && !r.redelivered => {
                            let events = self.events_of(&r)?;
                            if !events.is_empty() {
                                originals.push((r, events));
                                continue;
                            }
                            self.inner.lanes.remove(k)?;
                        }
                        // Not dead (a crash between index and record) or
                        // requeued already: drop the stale entry.
                        _ => {
                            self.inner.lanes.remove(k)?;
                        }
                    }
                }
            }
        }
        self.requeue(webhook_id, &originals, ids.is_none(), now_ms, progress)?;
        Ok(originals.len())
    }

    /// Requeues those of `ids` that are in one of `states`, were not
    /// requeued in bulk yet and still have their events, marking them
    /// requeued (see [`crate::store::DeliveryLog::recover_deliveries`]).
    pub fn recover(
        &self,
        webhook_id: &str,
        ids: &[String],
        states: &[DeliveryState],
        now_ms: i64,
    ) -> Result<usize> {
        let _serial = self
            .inner
            .redeliver_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut originals = Vec::new();
        for id in ids {
            let Some(r) = self.delivery(webhook_id, id)? else {
                continue;
            };
            if !states.contains(&r.state) || r.redelivered {
                continue;
            }
            let events = self.events_of(&r)?;
            if events.is_empty() || events.len() < r.seqs.len() {
                continue;
            }
            originals.push((r, events));
        }
        self.requeue(webhook_id, &originals, true, now_ms, |_, _| {})?;
        Ok(originals.len())
    }

    /// Queues a copy of each of `originals` on its lane, in batches of
    /// 1000; with `bulk` the originals are marked requeued (and leave the
    /// dead index). `progress(done, total)` after each batch.
    fn requeue(
        &self,
        webhook_id: &str,
        originals: &[(DeliveryRecord, Vec<StoredEvent>)],
        bulk: bool,
        now_ms: i64,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<()> {
        for (n, chunk) in originals.chunks(1000).enumerate() {
            let mut batch = sled::Batch::default();
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
                batch.insert(keyed(PAYLOAD, webhook_id, &copy.id), encode_payload(events));
                batch.insert(
                    keyed(DELIVERY, webhook_id, &copy.id),
                    serde_json::to_vec(&copy)?,
                );
                batch.insert(requeued_key(webhook_id, copy.mode, &copy.id), &[]);
                if bulk {
                    let mut o = original.clone();
                    o.redelivered = true;
                    batch.insert(keyed(DELIVERY, webhook_id, &o.id), serde_json::to_vec(&o)?);
                    batch.remove(keyed(DEAD_INDEX, webhook_id, &o.id));
                }
            }
            // Under the lanes' locks, so their tallies count each exactly once.
            let slots: Vec<_> = [ModeTag::Realtime, ModeTag::Batch]
                .into_iter()
                .filter_map(|m| self.inner.lane_registry.slot(webhook_id, m).map(|s| (m, s)))
                .collect();
            let held: Vec<_> = slots
                .iter()
                .map(|(m, s)| (*m, s.lock().unwrap_or_else(|p| p.into_inner())))
                .collect();
            self.inner.lanes.apply_batch(batch)?;
            for (m, slot) in &held {
                let n = chunk.iter().filter(|(o, _)| o.mode == *m).count();
                if slot.tally.seeded() {
                    slot.tally.requeued.fetch_add(n as i64, Ordering::AcqRel);
                }
            }
            drop(held);
            progress(n * 1000 + chunk.len(), originals.len());
        }
        Ok(())
    }

    /// Requeued deliveries waiting in a lane.
    pub fn requeued_count(&self, webhook_id: &str, mode: ModeTag) -> u64 {
        self.inner
            .lanes
            .scan_prefix(requeued_key(webhook_id, mode, ""))
            .count() as u64
    }

    /// Makes sure nothing older than `horizon` in the log is still needed by
    /// the lane, under its lock: a head that depends on the log keeps its
    /// events from now on, and the lane's events after its cursor up to
    /// `horizon` leave it in EXPIRED records. Returns how many expired.
    pub(super) fn expire_lane(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        horizon: u64,
        now_ms: i64,
    ) -> Result<u64> {
        let expired = self.with_lane(key, |slot| {
            self.expire_locked(slot, key, filter, horizon, now_ms)
        })?;
        Ok(expired.unwrap_or(0))
    }

    fn expire_locked(
        &self,
        slot: &mut LaneSlot,
        key: &LaneKey,
        filter: &LaneFilter,
        horizon: u64,
        now_ms: i64,
    ) -> Result<u64> {
        let mut state = self.lane_state(slot, key)?;
        if let Some(head) = &state.head {
            if let Some(mut r) = self.delivery(&key.webhook_id, head)? {
                let needs_log = !r.state.is_final()
                    && !r.events_kept
                    && r.seqs.first().is_some_and(|s| *s <= horizon);
                if needs_log {
                    let events = self.events_at(key.account_id, &r.seqs)?;
                    self.keep_events(&mut r, &events)?;
                    self.put_record(&r)?;
                }
            }
        }
        if state.cursor >= horizon {
            return Ok(0);
        }
        let read = self.read_for_lane(
            key.account_id,
            state.cursor,
            horizon,
            filter,
            usize::MAX,
            usize::MAX,
        )?;
        let expired = read.events.len() as u64;
        for group in read.events.chunks(MAX_IDS_PER_EXPIRED) {
            let mut r = DeliveryRecord::new(
                key.account_id,
                &key.webhook_id,
                key.mode,
                group.iter().map(|e| (e.seq, e.event_id.clone())),
                now_ms,
            );
            r.finish(DeliveryState::Expired, now_ms);
            self.record_finished(&mut r, &[])?;
        }
        state.cursor = horizon;
        slot.state = Some(state);
        self.save_lane(slot, &key.webhook_id, key.mode)?;
        slot.tally.sub_pending(expired + read.skipped);
        if expired > 0 {
            tracing::warn!(
                account_id = key.account_id,
                webhook_id = %key.webhook_id,
                mode = ?key.mode,
                expired,
                "undelivered events older than delivery.retention_ms left the lane as EXPIRED"
            );
        }
        Ok(expired)
    }

    /// Removes finished records whose retention has passed (delivered after
    /// `delivered_keep_ms`, dead or expired after `dead_keep_ms`), at most
    /// `limit` index entries; returns how many were handled.
    pub(super) fn purge_finished(
        &self,
        now_ms: i64,
        delivered_keep_ms: i64,
        dead_keep_ms: i64,
        limit: usize,
    ) -> Result<usize> {
        let mut handled = 0;
        for (class, keep) in [(b'd', delivered_keep_ms), (b'x', dead_keep_ms)] {
            let cutoff = now_ms.saturating_sub(keep);
            let start = vec![FINISHED, class];
            let end = finished_key(class, cutoff, "", "");
            for item in self.inner.lanes.range(start..end) {
                if handled >= limit {
                    return Ok(handled);
                }
                let (k, _) = item?;
                handled += 1;
                if let Some((webhook_id, id)) = parse_finished_key(&k) {
                    if let Some(r) = self.delivery(&webhook_id, &id)? {
                        if r.state.is_final() && r.finish_time_ms <= cutoff {
                            self.inner.lanes.remove(keyed(PAYLOAD, &webhook_id, &id))?;
                            self.inner
                                .lanes
                                .remove(keyed(DEAD_INDEX, &webhook_id, &id))?;
                            self.inner.lanes.remove(keyed(DELIVERY, &webhook_id, &id))?;
                        }
                    }
                }
                self.inner.lanes.remove(k)?;
            }
        }
        Ok(handled)
    }

    /// Removes up to `limit` leftover keys of deleted webhooks; a webhook's
    /// tombstone goes with its last key. Returns how many were removed.
    pub(super) fn clean_deleted(&self, limit: usize) -> Result<usize> {
        let mut removed = 0;
        for item in self.inner.lanes.scan_prefix([DELETED]) {
            let (tomb, _) = item?;
            let webhook_id = String::from_utf8_lossy(&tomb[1..]).into_owned();
            let mut left = false;
            for kind in [DELIVERY, PAYLOAD, REQUEUED, DEAD_INDEX, LANE] {
                for k in self
                    .inner
                    .lanes
                    .scan_prefix(webhook_prefix(kind, &webhook_id))
                    .keys()
                {
                    if removed >= limit {
                        left = true;
                        break;
                    }
                    self.inner.lanes.remove(k?)?;
                    removed += 1;
                }
            }
            if left {
                return Ok(removed);
            }
            self.inner.lanes.remove(tomb)?;
        }
        Ok(removed)
    }

    /// Loads the tombstones of deleted webhooks (at open).
    pub(super) fn load_deleted(&self) -> Result<()> {
        let mut deleted = self
            .inner
            .lane_registry
            .deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for item in self.inner.lanes.scan_prefix([DELETED]).keys() {
            deleted.insert(String::from_utf8_lossy(&item?[1..]).into_owned());
        }
        Ok(())
    }

    /// The lanes-tree part of deleting a webhook, inside the deletion's
    /// transaction: its lane states go, the tombstone comes.
    pub(super) fn delete_lanes_in(
        lanes: &sled::transaction::TransactionalTree,
        webhook_id: &str,
    ) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
        for mode in [ModeTag::Realtime, ModeTag::Batch] {
            lanes.remove(lane_key(webhook_id, mode))?;
        }
        lanes.insert(deleted_key(webhook_id), &[])?;
        Ok(())
    }

    /// After the deletion's transaction: no lane of `webhook_id` runs again.
    /// Takes each lane's lock, so an operation in progress finishes first.
    pub(super) fn forget_lanes(&self, webhook_id: &str) {
        let registry = &self.inner.lane_registry;
        let slots: Vec<_> = [ModeTag::Realtime, ModeTag::Batch]
            .into_iter()
            .filter_map(|m| registry.slot(webhook_id, m))
            .collect();
        let _held: Vec<_> = slots
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        registry.mark_deleted(webhook_id);
    }

    /// Whether `webhook_id` was deleted.
    pub fn is_deleted(&self, webhook_id: &str) -> bool {
        self.inner.lane_registry.is_deleted(webhook_id)
    }

    /// Schema 3: indexes finished records of older folders by finish time
    /// (their creation time, the best known) and dead ones for redelivery.
    pub(super) fn index_old_records(lanes: &sled::Tree) -> Result<u64> {
        let mut n = 0;
        for item in lanes.range(vec![DELIVERY]..vec![DELIVERY + 1]) {
            let (_, v) = item?;
            let mut r: DeliveryRecord = serde_json::from_slice(&v)?;
            if !r.state.is_final() {
                continue;
            }
            if r.finish_time_ms == 0 {
                r.finish_time_ms = r.create_time_ms;
            }
            let mut batch = sled::Batch::default();
            batch.insert(finished_key_of(&r), &[]);
            if r.state == DeliveryState::Dead {
                batch.insert(keyed(DEAD_INDEX, &r.webhook_id, &r.id), &[]);
            }
            batch.insert(
                keyed(DELIVERY, &r.webhook_id, &r.id),
                serde_json::to_vec(&r)?,
            );
            lanes.apply_batch(batch)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane with several payloads in flight: what is stored after each
    /// outcome is what a crash at that point resumes from.
    #[tokio::test]
    async fn a_concurrent_lane_stores_its_cursor_at_its_oldest_unrecorded_payload() {
        use crate::domain::catalog::Catalog;
        use crate::domain::delivery::Attempt;
        use crate::domain::webhook::{Auth, Webhook};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let webhook = Webhook {
            id: "wh_t".into(),
            account_id: 1,
            name: "t".into(),
            description: String::new(),
            target_url: "https://example.com/".into(),
            auth: Auth::None,
            event_types: vec!["COURSE_ENROLLMENT".into()],
            active: true,
            create_time_ms: 0,
            update_time_ms: 0,
            disabled_reason: String::new(),
            max_in_flight: 4,
            filter: None,
        };
        let filter = LaneFilter::new(&webhook, Mode::Realtime, Arc::new(Catalog::new(&[])));
        let key = LaneKey {
            account_id: 1,
            webhook_id: "wh_t".into(),
            mode: ModeTag::Realtime,
        };
        let args = |in_flight| TakeArgs {
            max_events: 1,
            batch_due: false,
            scan_limit: 100,
            in_flight,
            concurrent: true,
            now_ms: 1,
        };
        let take = |args: TakeArgs| -> Take {
            let mut takes = store
                .lane_take_many(&key, &filter, args, 1, usize::MAX)
                .unwrap();
            assert_eq!(takes.len(), 1);
            takes.pop().unwrap()
        };
        let stored = || -> LaneState {
            let v = store.inner.lanes.get(lane_key("wh_t", ModeTag::Realtime));
            serde_json::from_slice(&v.unwrap().unwrap()).unwrap()
        };
        // A new lane starts at the log's end.
        let idle = take(args(0));
        assert!(matches!(idle, Take::Idle { more: false }), "{idle:?}");
        let events = (1..=3)
            .map(|i| NewEvent {
                event_id: format!("e{i}"),
                event_name: "COURSE_ENROLLMENT".into(),
                timestamp_ms: 1,
                mode: Mode::Realtime,
                json: format!("{{\"eventId\":\"e{i}\"}}"),
            })
            .collect();
        store.append_events(1, events, 1).await.unwrap();
        let mut sent: Vec<(DeliveryRecord, Vec<StoredEvent>)> = store
            .lane_take_many(&key, &filter, args(0), 3, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|t| match t {
                Take::Send { record, events, .. } => (*record, events),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent.len(), 3);
        let (mut third, third_events) = sent.pop().unwrap();
        let (mut second, _) = sent.pop().unwrap();
        let (mut first, first_events) = sent.pop().unwrap();
        assert_eq!(first.seqs, [1]);
        assert_eq!(third.seqs, [3]);

        // The second goes through: logged with the next save, but the
        // cursor stays before the first, still in flight.
        second.push_attempt(Attempt {
            time_ms: 1,
            status_code: 200,
            latency_ms: 1,
            error: String::new(),
        });
        second.finish(DeliveryState::Delivered, 2);
        assert!(store.lane_finish_quick(&key, &second));
        store.save_lanes().unwrap();
        assert_eq!(stored(), LaneState::default(), "cursor 0, nothing recorded");
        assert!(store.delivery("wh_t", &second.id).unwrap().is_some());

        // The first fails: recorded with its events, so the cursor moves to
        // the third (still in flight, not recorded).
        first.push_attempt(Attempt {
            time_ms: 1,
            status_code: 503,
            latency_ms: 1,
            error: "HTTP 503".into(),
        });
        first.state = DeliveryState::Retrying;
        store
            .lane_attempt_failed(&key, &mut first, &first_events)
            .unwrap();
        let s = stored();
        assert_eq!(s.cursor, 2, "{s:?}");
        assert_eq!(s.parallel, [first.id.clone()], "{s:?}");

        // The third fails once and then goes through the slow way.
        third.state = DeliveryState::Retrying;
        store
            .lane_attempt_failed(&key, &mut third, &third_events)
            .unwrap();
        third.finish(DeliveryState::Delivered, 3);
        assert!(!store.lane_finish_quick(&key, &third), "a recorded one");
        store.lane_finish(&key, &mut third, &third_events).unwrap();
        store.save_lanes().unwrap();
        let s = stored();
        assert_eq!((s.cursor, &s.parallel), (3, &vec![first.id.clone()]));

        // Starting over (nothing in flight, as after a restart): the first
        // resumes under its id, then nothing is left.
        match take(args(0)) {
            Take::Send { record, .. } => assert_eq!(record.id, first.id),
            other => panic!("{other:?}"),
        }
        let idle = take(args(1));
        assert!(matches!(idle, Take::Idle { more: false }), "{idle:?}");
    }

    #[test]
    fn kept_payloads_round_trip() {
        let events = vec![
            StoredEvent {
                seq: 7,
                event_id: "e7".into(),
                event_name: "COURSE_ENROLLMENT".into(),
                ingest_time_ms: 99,
                mode: Some(Mode::Batch),
                json: "{\"a\":1}".into(),
            },
            StoredEvent {
                seq: 9,
                event_id: "e9".into(),
                event_name: "X".into(),
                ingest_time_ms: -1,
                mode: None,
                json: bytes::Bytes::new(),
            },
        ];
        let v = encode_payload(&events);
        assert_eq!(decode_payload(&v).unwrap(), events);
        assert!(decode_payload(&v[..v.len() - 1]).is_err());
    }

    #[test]
    fn finished_keys_parse_back() {
        let k = finished_key(b'd', 1234, "wh_a", "msg_b");
        assert_eq!(
            parse_finished_key(&k),
            Some(("wh_a".to_string(), "msg_b".to_string()))
        );
        // Keys sort by finish time within a class.
        assert!(finished_key(b'd', 5, "wh_z", "m") < finished_key(b'd', 6, "wh_a", "m"));
    }
}
