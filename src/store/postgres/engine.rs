//! Lanes on PostgreSQL: the sled store's model (`store/sled/deliveries.rs`)
//! for lanes shared among routers by leases.
//!
//! A lane's state is its cursor (the last log position taken into a
//! delivery or passed over) and the recorded deliveries it resumes: the
//! `head`, and for a lane with several payloads in flight the `parallel`
//! ones. The router holding the lane's lease keeps that state in memory,
//! in the lane's [`LaneSlot`] behind a `tokio` mutex taken by every
//! operation on the lane (its own, the janitor's, a redelivery's); the
//! stored state (`lanes.cursor_seq`, `lanes.state`) may lag behind it:
//! - nothing is written before a new payload is sent: its id is derived
//!   from the lane and its event range ([`delivery_id`]), so a payload
//!   rebuilt from the same events keeps its `webhook-id`;
//! - a payload that fails is recorded with its events, and the lane state
//!   naming it, in one statement, before its retry wait;
//! - delivered ones wait in the slot (`unsaved`) and are written for all
//!   lanes at once by [`PgStore::save_lanes_all`] (every
//!   `delivery.log_flush_ms`, at shutdown, and when a lane has
//!   [`MAX_UNSAVED`]); until then the stored cursor stays before them
//!   ([`LaneSlot::stored_state`]), so a router that dies repeats those
//!   deliveries under the same ids on the lane's next owner and never
//!   skips one.
//!
//! Every lane write is one statement ([`PgStore::write_lanes`]) that
//! updates the lane row only where `epoch` and `lease_owner` are still
//! this router's lease, and writes the delivery records only of the lanes
//! whose update passed. A write refused by that fence changes nothing; the
//! lane is dropped from memory at once and counted in
//! [`PgStore::fenced_writes`], and the caller is answered Ok: the new
//! owner redoes what was not written (a duplicate, never a skip).
//!
//! The slot remembers the lease epoch its contents belong to: when the
//! lease task finds the lease lost (or it changes hands and comes back),
//! the next operation sees the epoch differ and starts over from the state
//! stored when the lease was (re)acquired.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::deliveries::state_code;
use super::webhooks::lane_mode_code;
use super::{map_db, to_i64, PgStore};
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter, ModeTag};
use crate::domain::event::StoredEvent;
use crate::error::{Error, Result};
use crate::store::types::*;

/// Most delivered records a lane keeps unwritten; one more writes them.
pub(super) const MAX_UNSAVED: usize = 256;
/// Most event ids in one EXPIRED record; more make several records.
pub(super) const MAX_IDS_PER_EXPIRED: usize = 1000;
/// Most delivery records in one statement of [`PgStore::write_lanes`]; a
/// larger write is several statements in one transaction.
const RECORDS_PER_STATEMENT: usize = 5000;

/// The stored state of a lane besides its cursor (`lanes.state`, JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LaneState {
    /// Last log sequence number taken into a delivery or passed over
    /// (`lanes.cursor_seq`).
    #[serde(skip)]
    pub cursor: u64,
    /// The delivery at the head: being attempted, or (as stored) possibly
    /// finished already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// A lane with several payloads in flight: its recorded unfinished
    /// deliveries besides `head`, each keeping its events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parallel: Vec<String>,
}

impl LaneState {
    /// The state stored as `cursor_seq` and `state`.
    pub fn from_row(cursor: u64, raw: &[u8]) -> LaneState {
        let mut s: LaneState = if raw.is_empty() {
            LaneState::default()
        } else {
            serde_json::from_slice(raw).unwrap_or_else(|e| {
                tracing::error!(error = %e, "postgres: unreadable lane state; resuming from its cursor only");
                LaneState::default()
            })
        };
        s.cursor = cursor;
        s
    }

    fn encode(&self) -> Result<Vec<u8>> {
        if self.head.is_none() && self.parallel.is_empty() {
            return Ok(Vec::new());
        }
        Ok(serde_json::to_vec(self)?)
    }

    /// Drops `id` from the recorded deliveries it names.
    fn forget(&mut self, id: &str) {
        if self.head.as_deref() == Some(id) {
            self.head = None;
        }
        self.parallel.retain(|p| p != id);
    }
}

/// A new delivery handed out: its id and how many events it carries.
struct Handed {
    id: String,
    events: u64,
}

/// A lane's state in memory, under the lane's lock (see the module doc).
#[derive(Default)]
pub(super) struct LaneSlot {
    /// The lease epoch the contents belong to; 0: not held.
    epoch: u64,
    /// The cached state (ahead of the stored one).
    state: Option<LaneState>,
    /// New deliveries handed out and not written yet, by the cursor from
    /// before each was taken: the stored cursor stays at the first of them.
    fresh: BTreeMap<u64, Handed>,
    /// Recorded deliveries (`head`, `parallel`) handed out and not finished,
    /// with their event counts.
    handed: HashMap<String, u64>,
    /// Delivered records not written yet, oldest first.
    unsaved: Vec<DeliveryRecord>,
    /// The cached state is ahead of the stored one.
    dirty: bool,
}

impl LaneSlot {
    fn in_flight(&self) -> usize {
        self.fresh.len() + self.handed.len()
    }

    /// The cursor before the new delivery `id`, if it is one handed out.
    fn fresh_cursor(&self, id: &str) -> Option<(u64, u64)> {
        self.fresh
            .iter()
            .find(|(_, h)| h.id == id)
            .map(|(c, h)| (*c, h.events))
    }

    /// The state as it may be stored: with new deliveries not written yet
    /// (but the one at `except`), the cursor from before the first of them.
    fn stored_state(&self, state: &LaneState, except: Option<u64>) -> LaneState {
        let mut stored = state.clone();
        if let Some(c) = self.fresh.keys().find(|c| Some(**c) != except) {
            stored.cursor = *c;
        }
        stored
    }
}

/// The lease of a lane as this router holds it.
#[derive(Default)]
struct HeldLease {
    /// 0: not held.
    epoch: u64,
    /// The state stored when it was acquired (the slot starts from it).
    state: LaneState,
}

/// One lane as this router knows it, held or not.
pub(super) struct LaneHandle {
    pub key: LaneKey,
    lease: Mutex<HeldLease>,
    pub tally: Arc<LaneTally>,
    /// The cached cursor (for [`PgStore::lane_next_ingest_ms_cached`]).
    cursor_hint: AtomicU64,
    /// Ingest time of the next event after the cursor named, when known.
    next_ingest: Mutex<Option<(u64, i64)>>,
    /// A look-up of `next_ingest` is running.
    refreshing: AtomicBool,
    /// The `requeued` table may have something for the lane: look.
    pub requeue_check: AtomicBool,
    slot: tokio::sync::Mutex<LaneSlot>,
}

impl LaneHandle {
    fn new(key: LaneKey) -> LaneHandle {
        LaneHandle {
            key,
            lease: Mutex::new(HeldLease::default()),
            tally: Arc::new(LaneTally::default()),
            cursor_hint: AtomicU64::new(0),
            next_ingest: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            requeue_check: AtomicBool::new(true),
            slot: tokio::sync::Mutex::new(LaneSlot::default()),
        }
    }

    /// The epoch this router holds the lane with; 0: not held.
    pub fn epoch(&self) -> u64 {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).epoch
    }

    /// Takes the lease acquired with `epoch` and stored state `state`;
    /// false when it was held with that epoch already.
    pub fn adopt(&self, epoch: u64, state: LaneState) -> bool {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.epoch == epoch {
            return false;
        }
        lease.epoch = epoch;
        lease.state = state;
        self.requeue_check.store(true, Ordering::Release);
        true
    }

    /// The lease (if still `epoch`, or any with None) is no longer held.
    pub fn lose(&self, epoch: Option<u64>) -> bool {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.epoch == 0 || epoch.is_some_and(|e| e != lease.epoch) {
            return false;
        }
        lease.epoch = 0;
        true
    }

    /// Brings the slot in line with the lease: when the epoch differs, what
    /// the slot held is dropped and it starts over from the stored state.
    /// True when the lane is held.
    fn sync(&self, slot: &mut LaneSlot) -> bool {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if slot.epoch != lease.epoch {
            *slot = LaneSlot {
                epoch: lease.epoch,
                state: (lease.epoch != 0).then(|| lease.state.clone()),
                ..LaneSlot::default()
            };
            self.reset_tally();
            *self.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.cursor_hint
                .store(lease.state.cursor, Ordering::Release);
        }
        lease.epoch != 0
    }

    /// Unseeds the tally: it is seeded again when the lane next runs.
    fn reset_tally(&self) {
        let t = &self.tally;
        let mut filter = t.filter.lock().unwrap_or_else(|p| p.into_inner());
        *filter = None;
        t.counted_through.store(u64::MAX, Ordering::Release);
        t.pending.store(0, Ordering::Release);
        t.capped.store(false, Ordering::Release);
        t.requeued.store(0, Ordering::Release);
        t.head_events.store(0, Ordering::Release);
        t.head_ingest_ms.store(0, Ordering::Release);
    }

    fn note_cursor(&self, slot: &LaneSlot) {
        if let Some(s) = &slot.state {
            self.cursor_hint.store(s.cursor, Ordering::Release);
        }
    }

    /// Whether nothing of the lane is in flight or unwritten (it can be
    /// given up without a duplicate); None when the lane is busy now.
    pub fn idle(&self) -> Option<tokio::sync::MutexGuard<'_, LaneSlot>> {
        let mut slot = self.slot.try_lock().ok()?;
        self.sync(&mut slot);
        (slot.in_flight() == 0 && slot.unsaved.is_empty() && !slot.dirty).then_some(slot)
    }

    /// The lane's lock (for a redelivery's tally update).
    pub async fn slot_lock(&self) -> tokio::sync::MutexGuard<'_, LaneSlot> {
        self.slot.lock().await
    }

    /// Drops the slot's contents if the lease is gone (without waiting).
    pub fn sync_now(&self) {
        if let Ok(mut slot) = self.slot.try_lock() {
            self.sync(&mut slot);
        }
    }

    /// Drops the slot's contents, waiting for an operation in progress.
    pub async fn sync_locked(&self) {
        let mut slot = self.slot.lock().await;
        self.sync(&mut slot);
    }

    /// Clears a slot obtained from [`LaneHandle::idle`] after its lease was released.
    pub fn released(&self, slot: &mut LaneSlot) {
        self.lose(None);
        self.sync(slot);
    }
}

/// Sort key of a lane, for taking several lanes' locks in one order.
fn lane_order(k: &LaneKey) -> (String, i16) {
    (k.webhook_id.clone(), lane_mode_code(k.mode))
}

/// The lanes this router knows.
#[derive(Default)]
pub(super) struct Registry {
    lanes: Mutex<HashMap<(String, ModeTag), Arc<LaneHandle>>>,
}

impl Registry {
    /// The lane's handle, made if new.
    pub fn handle(&self, key: &LaneKey) -> Arc<LaneHandle> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes
            .entry((key.webhook_id.clone(), key.mode))
            .or_insert_with(|| Arc::new(LaneHandle::new(key.clone())))
            .clone()
    }

    pub fn get(&self, webhook_id: &str, mode: ModeTag) -> Option<Arc<LaneHandle>> {
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(webhook_id.to_string(), mode))
            .cloned()
    }

    /// Every lane, in lock order.
    pub fn all(&self) -> Vec<Arc<LaneHandle>> {
        let mut all: Vec<Arc<LaneHandle>> = self
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|h| lane_order(&h.key));
        all
    }

    /// The lanes held, with their epochs, in lock order.
    pub fn held(&self) -> Vec<(Arc<LaneHandle>, u64)> {
        self.all()
            .into_iter()
            .filter_map(|h| {
                let e = h.epoch();
                (e != 0).then_some((h, e))
            })
            .collect()
    }

    /// Removes a webhook's lanes.
    pub fn remove_webhook(&self, webhook_id: &str) -> Vec<Arc<LaneHandle>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        [ModeTag::Realtime, ModeTag::Batch]
            .into_iter()
            .filter_map(|m| lanes.remove(&(webhook_id.to_string(), m)))
            .collect()
    }
}

/// The id of a new delivery of `events` on lane `key` (the sled store's
/// derivation, so both name a payload alike): the first event's ingest
/// time and a hash of the lane and the event range.
pub(super) fn delivery_id(key: &LaneKey, events: &[StoredEvent]) -> String {
    let first = events.first().map_or(0, |e| e.seq);
    let last = events.last().map_or(0, |e| e.seq);
    let time = events.first().map_or(0, |e| e.ingest_time_ms);
    crate::domain::ids::derived_id(
        crate::domain::ids::DELIVERY_PREFIX,
        time,
        &[
            key.webhook_id.as_bytes(),
            &[match key.mode {
                ModeTag::Realtime => b'r',
                ModeTag::Batch => b'b',
            }],
            &first.to_be_bytes(),
            &last.to_be_bytes(),
        ],
    )
}

/// A kept payload (the sled store's format): count(4) ‖ count × [seq(8) ‖
/// ingest_ms(8) ‖ mode(1: `r`, `b` or 0) ‖ name_len(1) ‖ name ‖ id_len(1)
/// ‖ id ‖ json_len(4) ‖ json].
pub(super) fn encode_payload(events: &[StoredEvent]) -> Vec<u8> {
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

pub(super) fn decode_payload(v: &[u8]) -> Result<Vec<StoredEvent>> {
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
        out.push(StoredEvent {
            seq,
            event_id: id,
            event_name: name,
            ingest_time_ms: ingest,
            mode,
            json: bytes::Bytes::copy_from_slice(json),
        });
    }
    Ok(out)
}

/// A delivery record to write with a lane's state.
pub(super) struct RecordWrite {
    pub record: DeliveryRecord,
    /// Its events, when it starts keeping them with this write.
    pub payload: Option<Vec<u8>>,
    /// A lane's outcome (passed to WatchDeliveries on other routers).
    pub outcome: bool,
}

impl RecordWrite {
    fn outcome(record: DeliveryRecord) -> RecordWrite {
        RecordWrite {
            record,
            payload: None,
            outcome: true,
        }
    }
}

/// One lane's part of a [`PgStore::write_lanes`].
pub(super) struct LaneRow {
    pub key: LaneKey,
    pub epoch: u64,
    pub state: LaneState,
}

/// The fenced lane write: lane rows where this router still holds the
/// lease, then the records and requeue removals of the lanes that passed;
/// returns the lanes that passed.
const WRITE_LANES: &str = "WITH u AS ( \
       SELECT * FROM unnest($2::text[], $3::smallint[], $4::bigint[], $5::bigint[], \
                            $6::bytea[]) AS u(w, m, e, c, s) \
     ), passed AS ( \
       UPDATE lanes AS l SET cursor_seq = u.c, state = u.s FROM u \
       WHERE l.webhook_id = u.w AND l.mode = u.m AND l.epoch = u.e AND l.lease_owner = $1 \
       RETURNING l.webhook_id, l.mode \
     ), ins AS ( \
       INSERT INTO deliveries (webhook_id, delivery_id, finish_ms, state, body, payload, \
                               redelivered, outcome, writer, change_seq) \
       SELECT r.w, r.i, r.f, r.st, r.b, r.p, r.rd, r.o, $1, nextval('delivery_changes') \
       FROM unnest($7::text[], $8::smallint[], $9::text[], $10::bigint[], $11::smallint[], \
                   $12::bytea[], $13::bytea[], $14::boolean[], $15::boolean[]) \
            AS r(w, m, i, f, st, b, p, rd, o) \
       WHERE EXISTS (SELECT 1 FROM passed p WHERE p.webhook_id = r.w AND p.mode = r.m) \
       ON CONFLICT (webhook_id, delivery_id) DO UPDATE SET \
         finish_ms = excluded.finish_ms, state = excluded.state, body = excluded.body, \
         payload = COALESCE(excluded.payload, deliveries.payload), \
         redelivered = excluded.redelivered, outcome = excluded.outcome, \
         writer = excluded.writer, change_seq = excluded.change_seq \
       RETURNING 1 \
     ), dq AS ( \
       DELETE FROM requeued AS q USING unnest($16::text[], $17::smallint[], $18::text[]) \
              AS d(w, m, i) \
       WHERE q.webhook_id = d.w AND q.mode = d.m AND q.delivery_id = d.i \
         AND EXISTS (SELECT 1 FROM passed p WHERE p.webhook_id = d.w AND p.mode = d.m) \
       RETURNING 1 \
     ) \
     SELECT webhook_id, mode FROM passed";

/// What one lane read found, handed out payload by payload within one
/// [`PgStore::lane_take_many_impl`] call.
struct ReadAhead {
    events: VecDeque<StoredEvent>,
    scanned_to: u64,
    capped: bool,
    /// The read stopped at its event limit: more may follow at once.
    limited: bool,
    /// Events the payload filter left out, not yet passed by the cursor.
    skipped: VecDeque<u64>,
}

impl ReadAhead {
    /// How many left-out events the cursor passes moving to `cursor`.
    fn pass_skipped(&mut self, cursor: u64) -> u64 {
        let mut n = 0;
        while self.skipped.front().is_some_and(|s| *s <= cursor) {
            self.skipped.pop_front();
            n += 1;
        }
        n
    }
}

/// What is left of one take call's bounds.
#[derive(Clone, Copy)]
struct Budget {
    payloads: usize,
    events: usize,
}

impl PgStore {
    pub(super) fn is_deleted_mem(&self, webhook_id: &str) -> bool {
        self.inner
            .deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(webhook_id)
    }

    /// Whether the leases renewed last are still safe to start work on.
    pub(super) fn leases_valid(&self) -> bool {
        self.inner
            .leases_valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| tokio::time::Instant::now() < t)
    }

    /// The durable head of `account_id`: cached, or read (and cached).
    pub(super) async fn known_head(&self, account_id: u64) -> Result<u64> {
        let cached = self
            .inner
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&account_id)
            .copied();
        match cached {
            Some(h) => Ok(h),
            None => {
                let h = self.head_seq(account_id).await?;
                self.note_head(account_id, h);
                Ok(h)
            }
        }
    }

    /// Records that `account_id`'s durable log reaches `head`; true when
    /// that is further than known.
    pub(super) fn note_head(&self, account_id: u64, head: u64) -> bool {
        let mut heads = self.inner.heads.lock().unwrap_or_else(|p| p.into_inner());
        match heads.get_mut(&account_id) {
            Some(h) if *h >= head => false,
            Some(h) => {
                *h = head;
                true
            }
            None => {
                heads.insert(account_id, head);
                true
            }
        }
    }

    /// Writes lane rows and records as one transaction, fenced (see
    /// [`WRITE_LANES`]); returns the lanes that passed.
    pub(super) async fn write_lanes(
        &self,
        lanes: &[LaneRow],
        records: &[RecordWrite],
        dequeue: &[(String, ModeTag, String)],
    ) -> Result<HashSet<(String, ModeTag)>> {
        let mut client = self.client().await?;
        // Chunks of lanes with their records (a lane's records stay with it).
        let mut by_lane: HashMap<(&str, ModeTag), Vec<&RecordWrite>> = HashMap::new();
        for r in records {
            by_lane
                .entry((r.record.webhook_id.as_str(), r.record.mode))
                .or_default()
                .push(r);
        }
        let mut chunks: Vec<(Vec<&LaneRow>, Vec<&RecordWrite>)> = vec![(Vec::new(), Vec::new())];
        for lane in lanes {
            let recs = by_lane
                .remove(&(lane.key.webhook_id.as_str(), lane.key.mode))
                .unwrap_or_default();
            let last = chunks.last_mut().expect("one chunk");
            if !last.0.is_empty() && last.1.len() + recs.len() > RECORDS_PER_STATEMENT {
                chunks.push((Vec::new(), Vec::new()));
            }
            let last = chunks.last_mut().expect("one chunk");
            last.0.push(lane);
            last.1.extend(recs);
        }
        let stmt = client.prepare_cached(WRITE_LANES).await.map_err(map_db)?;
        let mut passed = HashSet::new();
        if chunks.len() == 1 {
            let (l, r) = &chunks[0];
            run_write(
                &client,
                &stmt,
                &self.inner.owner,
                l,
                r,
                dequeue,
                &mut passed,
            )
            .await?;
        } else {
            let tx = client.transaction().await.map_err(map_db)?;
            for (i, (l, r)) in chunks.iter().enumerate() {
                let dq: &[(String, ModeTag, String)] = if i == 0 { dequeue } else { &[] };
                run_write(&tx, &stmt, &self.inner.owner, l, r, dq, &mut passed).await?;
            }
            tx.commit().await.map_err(map_db)?;
        }
        Ok(passed)
    }

    /// Writes the lane's stored state, computed from `state` (the cached
    /// state to adopt) and the new deliveries handed out but the one at
    /// `fresh_done`, with its unwritten delivered records and `extra`, and
    /// removes `dequeue` from its requeued deliveries: one fenced
    /// statement. On success the slot adopts `state`, drops `fresh_done`
    /// and its unwritten records; fenced, the lane is dropped (false); on an
    /// error the slot is as it was.
    async fn write_slot(
        &self,
        h: &LaneHandle,
        slot: &mut LaneSlot,
        state: LaneState,
        fresh_done: Option<u64>,
        extra: Vec<RecordWrite>,
        dequeue: Option<String>,
    ) -> Result<bool> {
        let row = LaneRow {
            key: h.key.clone(),
            epoch: slot.epoch,
            state: slot.stored_state(&state, fresh_done),
        };
        let mut records: Vec<RecordWrite> = slot
            .unsaved
            .iter()
            .cloned()
            .map(RecordWrite::outcome)
            .collect();
        records.extend(extra);
        let dq: Vec<(String, ModeTag, String)> = dequeue
            .into_iter()
            .map(|id| (h.key.webhook_id.clone(), h.key.mode, id))
            .collect();
        let passed = self.write_lanes(&[row], &records, &dq).await?;
        if !passed.contains(&(h.key.webhook_id.clone(), h.key.mode)) {
            self.fence(h, slot);
            return Ok(false);
        }
        slot.state = Some(state);
        if let Some(c) = fresh_done {
            slot.fresh.remove(&c);
        }
        slot.unsaved.clear();
        slot.dirty = false;
        h.note_cursor(slot);
        Ok(true)
    }

    /// A write of the lane was refused: this router no longer holds it.
    fn fence(&self, h: &LaneHandle, slot: &mut LaneSlot) {
        h.lose(Some(slot.epoch));
        h.sync(slot);
        if !self.is_deleted_mem(&h.key.webhook_id) {
            self.count_fenced(1);
            tracing::warn!(
                webhook_id = %h.key.webhook_id,
                mode = ?h.key.mode,
                "postgres: lane write refused, another router holds the lane now; dropped"
            );
        }
    }

    /// A lane write on a lane this router does not hold (any more).
    fn refused_unheld(&self, key: &LaneKey) {
        if !self.is_deleted_mem(&key.webhook_id) {
            self.count_fenced(1);
        }
    }

    /// One delivery record and its kept payload.
    pub(super) async fn delivery_with_payload(
        &self,
        webhook_id: &str,
        id: &str,
    ) -> Result<Option<(DeliveryRecord, Option<Vec<u8>>)>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT body, payload FROM deliveries WHERE webhook_id = $1 AND delivery_id = $2",
            )
            .await
            .map_err(map_db)?;
        match client
            .query_opt(&stmt, &[&webhook_id, &id])
            .await
            .map_err(map_db)?
        {
            Some(row) => Ok(Some((serde_json::from_slice(row.get(0))?, row.get(1)))),
            None => Ok(None),
        }
    }

    /// The events of a delivery: its kept payload, or else from the log
    /// (those still stored).
    pub(super) async fn events_of(
        &self,
        r: &DeliveryRecord,
        payload: Option<Vec<u8>>,
    ) -> Result<Vec<StoredEvent>> {
        if r.events_kept {
            match payload {
                Some(p) => decode_payload(&p),
                None => Ok(Vec::new()),
            }
        } else {
            self.events_at(r.account_id, &r.seqs).await
        }
    }

    /// Seeds the lane's tally (its lock held) when it has never been seeded
    /// or `filter` changed: events after the cursor through the account's
    /// counting point are counted now, later ones by the poller.
    async fn seed_tally(&self, h: &LaneHandle, slot: &LaneSlot, filter: &LaneFilter) -> Result<()> {
        let tally = &h.tally;
        {
            let mut current = tally.filter.lock().unwrap_or_else(|p| p.into_inner());
            let same = current.as_ref().is_some_and(|f| f.same_as(filter));
            if same && tally.seeded() {
                return Ok(());
            }
            *current = Some(filter.clone());
        }
        let account = h.key.account_id;
        let head = self.known_head(account).await?;
        let through = {
            let mut counted = self.inner.counted.lock().unwrap_or_else(|p| p.into_inner());
            let through = *counted.entry(account).or_insert(head);
            tally.pending.store(0, Ordering::Release);
            tally.counted_through.store(through, Ordering::Release);
            through
        };
        let cursor = slot.state.as_ref().map_or(0, |s| s.cursor);
        let (n, capped) = if cursor <= through {
            self.count_for_lane(account, cursor, through, filter, BACKLOG_SEED_LIMIT)
                .await?
        } else {
            let (n, capped) = self
                .count_for_lane(account, through, cursor, filter, BACKLOG_SEED_LIMIT)
                .await?;
            tally.pending.fetch_sub(n as i64, Ordering::AcqRel);
            (0, capped)
        };
        tally.pending.fetch_add(n as i64, Ordering::AcqRel);
        tally.capped.store(capped, Ordering::Release);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT count(*) FROM requeued WHERE webhook_id = $1 AND mode = $2")
            .await
            .map_err(map_db)?;
        let q: i64 = client
            .query_one(&stmt, &[&h.key.webhook_id, &lane_mode_code(h.key.mode)])
            .await
            .map_err(map_db)?
            .get(0);
        tally.requeued.store(q, Ordering::Release);
        Ok(())
    }

    /// [`crate::store::LaneStore::lane_take_many`]: what the lane does next,
    /// under its lock (the sled store's `lane_take_many`); a lane this
    /// router does not hold (or whose leases were not renewed in time) is
    /// idle, a deleted webhook's lane gone.
    pub(super) async fn lane_take_many_impl(
        &self,
        key: LaneKey,
        filter: LaneFilter,
        mut args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> Result<Vec<Take>> {
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(vec![Take::Gone]);
        }
        let h = self.inner.lanes.handle(&key);
        let mut slot = h.slot.lock().await;
        // Under the lane's lock: a deletion that got here first wins.
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(vec![Take::Gone]);
        }
        if !h.sync(&mut slot) || !self.leases_valid() {
            return Ok(vec![Take::Idle { more: false }]);
        }
        self.seed_tally(&h, &slot, &filter).await?;
        let mut takes = Vec::new();
        let mut events = 0;
        let mut ahead = None;
        while takes.len() < n && events < max_events_total {
            let budget = Budget {
                payloads: n - takes.len(),
                events: max_events_total - events,
            };
            let take = self
                .take_locked(&h, &mut slot, &filter, args, &mut ahead, budget)
                .await;
            let take = match take {
                Ok(t) => t,
                Err(e) if takes.is_empty() => return Err(e),
                // What was handed out is the caller's; the next call retries.
                Err(e) => {
                    tracing::warn!(error = %e, "postgres: lane take failed after some payloads");
                    break;
                }
            };
            let Take::Send { events: e, .. } = &take else {
                takes.push(take);
                break;
            };
            events += e.len();
            takes.push(take);
            args.in_flight += 1;
        }
        h.note_cursor(&slot);
        Ok(takes)
    }

    async fn take_locked(
        &self,
        h: &LaneHandle,
        slot: &mut LaneSlot,
        filter: &LaneFilter,
        args: TakeArgs,
        ahead: &mut Option<ReadAhead>,
        budget: Budget,
    ) -> Result<Take> {
        let key = &h.key;
        let tally = h.tally.clone();
        let mut state = slot.state.clone().unwrap_or_default();
        if args.in_flight == 0 && slot.in_flight() > 0 {
            // What was handed out and not finished was abandoned: new
            // payloads are taken again from the first one's cursor, under
            // the same ids, and recorded ones resume below.
            if let Some((&cursor, _)) = slot.fresh.first_key_value() {
                state.cursor = cursor;
                slot.state = Some(state.clone());
            }
            let returned = slot.fresh.values().map(|x| x.events).sum();
            slot.fresh.clear();
            slot.handed.clear();
            tally.heads_dropped(returned);
            *ahead = None;
            if filter.has_payload_filter() {
                // What the payload filter skipped after the rewound cursor
                // was subtracted already and is read again: count afresh.
                tally.counted_through.store(u64::MAX, Ordering::Release);
                self.seed_tally(h, slot, filter).await?;
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
            if let Some((mut r, payload)) = self.delivery_with_payload(&key.webhook_id, &id).await?
            {
                if !r.state.is_final() {
                    let events = self.events_of(&r, payload).await?;
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
                    // Its events are gone: record that instead of sending part.
                    r.finish(DeliveryState::Expired, args.now_ms);
                    state.forget(&id);
                    let write = RecordWrite {
                        record: r,
                        payload: None,
                        outcome: false,
                    };
                    if !self
                        .write_slot(h, slot, state.clone(), None, vec![write], None)
                        .await?
                    {
                        return Ok(Take::Idle { more: false });
                    }
                    tracing::warn!(delivery_id = %id, "events of the delivery are no longer stored; expired");
                    continue;
                }
            }
            // Finished (the stored state is not rewritten when one ends).
            state.forget(&id);
            slot.state = Some(state.clone());
            slot.dirty = true;
        }
        if h.requeue_check.swap(false, Ordering::AcqRel) {
            let found = self.first_requeued(key).await;
            let found = match found {
                Ok(f) => f,
                Err(e) => {
                    h.requeue_check.store(true, Ordering::Release);
                    return Err(e);
                }
            };
            if let Some((id, record)) = found {
                // There may be more after it.
                h.requeue_check.store(true, Ordering::Release);
                if args.concurrent || state.head.is_some() {
                    state.parallel.push(id.clone());
                } else {
                    state.head = Some(id.clone());
                }
                if !self
                    .write_slot(h, slot, state, None, Vec::new(), Some(id.clone()))
                    .await?
                {
                    return Ok(Take::Idle { more: false });
                }
                tally.requeued.fetch_sub(1, Ordering::AcqRel);
                if let Some((record, payload)) = record {
                    let events = self.events_of(&record, payload).await?;
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
        }
        let per = args.max_events.max(1);
        let needs_read = ahead
            .as_ref()
            .is_none_or(|a| a.events.is_empty() && a.limited);
        if needs_read {
            let head = self.known_head(key.account_id).await?;
            let payloads = budget.payloads.min(budget.events.div_ceil(per)).max(1);
            let limit = per.saturating_mul(payloads);
            let read = self
                .read_for_lane_at(
                    key.account_id,
                    head,
                    state.cursor,
                    u64::MAX,
                    filter,
                    limit,
                    args.scan_limit,
                )
                .await?;
            *ahead = Some(ReadAhead {
                limited: read.events.len() >= limit,
                events: read.events.into(),
                scanned_to: read.scanned_to,
                capped: read.capped,
                skipped: read.skipped.into(),
            });
        }
        let buf = ahead.as_mut().expect("read above");
        if buf.events.is_empty() {
            if buf.scanned_to > state.cursor {
                tally.sub_pending(buf.pass_skipped(buf.scanned_to));
                state.cursor = buf.scanned_to;
                slot.state = Some(state);
                // Written with the next save: an idle lane does not write.
                slot.dirty = true;
            }
            *h.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(Take::Idle { more: buf.capped });
        }
        let count = buf.events.len().min(per);
        if key.mode == ModeTag::Batch && count < per && !args.batch_due {
            *h.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((state.cursor, buf.events[0].ingest_time_ms));
            return Ok(Take::NotDue);
        }
        let events: Vec<StoredEvent> = buf.events.drain(..count).collect();
        let new_cursor = if !buf.events.is_empty() || buf.limited {
            events.last().map_or(state.cursor, |e| e.seq)
        } else {
            buf.scanned_to
        };
        if let Some(next) = buf.events.front() {
            *h.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((new_cursor, next.ingest_time_ms));
        }
        let mut record = DeliveryRecord::new(
            key.account_id,
            &key.webhook_id,
            key.mode,
            events.iter().map(|e| (e.seq, e.event_id.clone())),
            args.now_ms,
        );
        record.id = delivery_id(key, &events);
        // Written only if it fails (or after it is delivered).
        let taken = events.len() as u64;
        slot.fresh.insert(
            state.cursor,
            Handed {
                id: record.id.clone(),
                events: taken,
            },
        );
        slot.dirty = true;
        state.cursor = new_cursor;
        slot.state = Some(state);
        tally.sub_pending(taken + buf.pass_skipped(new_cursor));
        tally.head_taken(&events, first);
        Ok(Take::Send {
            record: Box::new(record),
            events,
            taken,
            requeued: false,
        })
    }

    /// The oldest requeued delivery of a lane, with its record and payload
    /// if the record is still there.
    #[allow(clippy::type_complexity)]
    async fn first_requeued(
        &self,
        key: &LaneKey,
    ) -> Result<Option<(String, Option<(DeliveryRecord, Option<Vec<u8>>)>)>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT q.delivery_id, d.body, d.payload FROM requeued q \
                 LEFT JOIN deliveries d \
                   ON d.webhook_id = q.webhook_id AND d.delivery_id = q.delivery_id \
                 WHERE q.webhook_id = $1 AND q.mode = $2 \
                 ORDER BY q.delivery_id LIMIT 1",
            )
            .await
            .map_err(map_db)?;
        let Some(row) = client
            .query_opt(&stmt, &[&key.webhook_id, &lane_mode_code(key.mode)])
            .await
            .map_err(map_db)?
        else {
            return Ok(None);
        };
        let id: String = row.get(0);
        let body: Option<Vec<u8>> = row.get(1);
        let record = match body {
            Some(b) => Some((serde_json::from_slice(&b)?, row.get(2))),
            None => None,
        };
        Ok(Some((id, record)))
    }

    /// [`crate::store::LaneStore::lane_attempt_failed`]: records the failed
    /// attempt with its events and the lane state naming it, fenced, in one
    /// statement (durable on return). Refused by the fence: nothing is
    /// written, the lane is dropped, and `record` comes back as it was.
    pub(super) async fn lane_attempt_failed_impl(
        &self,
        key: LaneKey,
        mut record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(record);
        }
        let h = self.inner.lanes.handle(&key);
        let mut slot = h.slot.lock().await;
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(record);
        }
        if !h.sync(&mut slot) {
            self.refused_unheld(&key);
            return Ok(record);
        }
        let original = record.clone();
        let payload = (!record.events_kept).then(|| encode_payload(&events));
        record.events_kept = true;
        let mut state = slot.state.clone().unwrap_or_default();
        let fresh = slot.fresh_cursor(&record.id);
        if fresh.is_some() {
            // Now recorded: the stored state may name it.
            if slot.fresh.len() == 1 && slot.handed.is_empty() && state.head.is_none() {
                state.head = Some(record.id.clone());
            } else {
                state.parallel.push(record.id.clone());
            }
        }
        let write = RecordWrite {
            record: record.clone(),
            payload,
            outcome: true,
        };
        if !self
            .write_slot(&h, &mut slot, state, fresh.map(|f| f.0), vec![write], None)
            .await?
        {
            return Ok(original);
        }
        if let Some((_, n)) = fresh {
            slot.handed.insert(record.id.clone(), n);
        }
        Ok(record)
    }

    /// [`crate::store::LaneStore::lane_finish`]: a new delivery that went
    /// through waits for the next save; anything else is written now with
    /// the lane state, fenced, in one statement (a dead letter keeps its
    /// events).
    pub(super) async fn lane_finish_impl(
        &self,
        key: LaneKey,
        mut record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(record);
        }
        let h = self.inner.lanes.handle(&key);
        let mut slot = h.slot.lock().await;
        if self.is_deleted_mem(&key.webhook_id) {
            return Ok(record);
        }
        if !h.sync(&mut slot) {
            self.refused_unheld(&key);
            return Ok(record);
        }
        let fresh = slot.fresh_cursor(&record.id);
        if let (Some((cursor, n)), DeliveryState::Delivered) = (fresh, record.state) {
            slot.unsaved.push(record.clone());
            slot.fresh.remove(&cursor);
            if let Some(s) = &mut slot.state {
                s.forget(&record.id);
            }
            slot.dirty = true;
            h.tally.head_finished(n, slot.in_flight() == 0);
            if slot.unsaved.len() >= MAX_UNSAVED {
                let state = slot.state.clone().unwrap_or_default();
                self.write_slot(&h, &mut slot, state, None, Vec::new(), None)
                    .await?;
            }
            return Ok(record);
        }
        let original = record.clone();
        let payload = if record.state == DeliveryState::Dead && !record.events_kept {
            record.events_kept = true;
            Some(encode_payload(&events))
        } else {
            None
        };
        let mut state = slot.state.clone().unwrap_or_default();
        state.forget(&record.id);
        let write = RecordWrite {
            record: record.clone(),
            payload,
            outcome: true,
        };
        if !self
            .write_slot(&h, &mut slot, state, fresh.map(|f| f.0), vec![write], None)
            .await?
        {
            return Ok(original);
        }
        let n = fresh.map_or(0, |f| f.1) + slot.handed.remove(&record.id).unwrap_or(0);
        h.tally.head_finished(n, slot.in_flight() == 0);
        Ok(record)
    }

    /// [`crate::store::LaneStore::lane_finish_quick`]: takes a delivered new
    /// payload into memory when the lane's lock is free at once.
    pub(super) fn lane_finish_quick_impl(&self, key: &LaneKey, record: &DeliveryRecord) -> bool {
        if record.state != DeliveryState::Delivered || self.is_deleted_mem(&key.webhook_id) {
            return false;
        }
        let Some(h) = self.inner.lanes.get(&key.webhook_id, key.mode) else {
            return false;
        };
        let Ok(mut slot) = h.slot.try_lock() else {
            return false;
        };
        if !h.sync(&mut slot) || slot.unsaved.len() + 1 >= MAX_UNSAVED {
            return false;
        }
        let Some((cursor, n)) = slot.fresh_cursor(&record.id) else {
            return false;
        };
        slot.fresh.remove(&cursor);
        slot.unsaved.push(record.clone());
        slot.dirty = true;
        let last = slot.in_flight() == 0;
        h.tally.head_finished(n, last);
        true
    }

    /// [`crate::store::LaneStore::save_lanes`]: one transaction for every
    /// held lane with unwritten outcomes or state: the records and the
    /// fenced lane rows together; a fenced lane's records are not written
    /// and the lane is dropped. Lanes busy at that moment (their lock taken
    /// by one of their own calls) are not waited for while the others are
    /// held: they are written right after, in a second transaction. Returns
    /// how many records were written.
    pub(super) async fn save_lanes_all(&self) -> Result<usize> {
        let handles: Vec<Arc<LaneHandle>> = self
            .inner
            .lanes
            .held()
            .into_iter()
            .map(|(h, _)| h)
            .filter(|h| !self.is_deleted_mem(&h.key.webhook_id))
            .collect();
        let mut busy = Vec::new();
        let mut locked = Vec::new();
        for h in &handles {
            match h.slot.try_lock() {
                Ok(mut slot) => {
                    if h.sync(&mut slot) && slot.dirty {
                        locked.push((h, slot));
                    }
                }
                Err(_) => busy.push(h),
            }
        }
        let mut written = self.save_locked(&mut locked).await?;
        drop(locked);
        if !busy.is_empty() {
            let mut locked = Vec::new();
            for h in busy {
                let mut slot = h.slot.lock().await;
                if h.sync(&mut slot) && slot.dirty {
                    locked.push((h, slot));
                }
            }
            written += self.save_locked(&mut locked).await?;
        }
        Ok(written)
    }

    /// One transaction of [`PgStore::save_lanes_all`] for lanes whose locks are held.
    async fn save_locked(
        &self,
        locked: &mut [(&Arc<LaneHandle>, tokio::sync::MutexGuard<'_, LaneSlot>)],
    ) -> Result<usize> {
        if locked.is_empty() {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(locked.len());
        let mut records = Vec::new();
        for (h, slot) in locked.iter() {
            let state = slot.state.clone().unwrap_or_default();
            rows.push(LaneRow {
                key: h.key.clone(),
                epoch: slot.epoch,
                state: slot.stored_state(&state, None),
            });
            records.extend(slot.unsaved.iter().cloned().map(RecordWrite::outcome));
        }
        let passed = self.write_lanes(&rows, &records, &[]).await?;
        let mut written = 0;
        for (h, slot) in locked.iter_mut() {
            if passed.contains(&(h.key.webhook_id.clone(), h.key.mode)) {
                written += slot.unsaved.len();
                slot.unsaved.clear();
                slot.dirty = false;
            } else {
                self.fence(h, slot);
            }
        }
        Ok(written)
    }

    /// The held lanes and their tallies (no I/O).
    pub(super) fn held_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)> {
        self.inner
            .lanes
            .held()
            .into_iter()
            .map(|(h, _)| (h.key.clone(), h.tally.clone()))
            .collect()
    }

    /// [`crate::store::LaneStore::lane_next_ingest_ms`] from what the lane
    /// knows: the ingest time of the next event after its cursor when a
    /// take saw it, else looked up in the background for the next call
    /// (None now).
    pub(super) fn lane_next_ingest_ms_cached(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        let Some(h) = self.inner.lanes.get(&key.webhook_id, key.mode) else {
            return Ok(None);
        };
        if h.epoch() == 0 {
            return Ok(None);
        }
        let cursor = h.cursor_hint.load(Ordering::Acquire);
        if let Some((c, ms)) = *h.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) {
            if c == cursor {
                return Ok(Some(ms));
            }
        }
        if h.refreshing.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let store = self.clone();
                let filter = filter.clone();
                let account = key.account_id;
                rt.spawn(async move {
                    let found = store
                        .next_ingest_ms(account, cursor, &filter, scan_limit)
                        .await;
                    if let Ok(Some(ms)) = found {
                        *h.next_ingest.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((cursor, ms));
                    }
                    h.refreshing.store(false, Ordering::Release);
                });
            }
            Err(_) => h.refreshing.store(false, Ordering::Release),
        }
        Ok(None)
    }

    /// The janitor's expiry of one held lane (its lock taken): the lane's
    /// events after its cursor up to `horizon` leave it in EXPIRED records,
    /// written with the lane state, fenced. Returns how many expired.
    pub(super) async fn expire_lane(
        &self,
        h: &LaneHandle,
        filter: &LaneFilter,
        horizon: u64,
        now_ms: i64,
    ) -> Result<u64> {
        let key = &h.key;
        let mut slot = h.slot.lock().await;
        if self.is_deleted_mem(&key.webhook_id) || !h.sync(&mut slot) {
            return Ok(0);
        }
        let mut state = slot.state.clone().unwrap_or_default();
        if state.cursor >= horizon {
            return Ok(0);
        }
        let head = self.head_seq(key.account_id).await?;
        let read = self
            .read_for_lane_at(
                key.account_id,
                head,
                state.cursor,
                horizon,
                filter,
                usize::MAX,
                usize::MAX,
            )
            .await?;
        let expired = read.events.len() as u64;
        let records = read
            .events
            .chunks(MAX_IDS_PER_EXPIRED)
            .map(|group| {
                let mut r = DeliveryRecord::new(
                    key.account_id,
                    &key.webhook_id,
                    key.mode,
                    group.iter().map(|e| (e.seq, e.event_id.clone())),
                    now_ms,
                );
                r.finish(DeliveryState::Expired, now_ms);
                RecordWrite {
                    record: r,
                    payload: None,
                    outcome: false,
                }
            })
            .collect();
        state.cursor = horizon.min(head).max(state.cursor);
        if !self
            .write_slot(h, &mut slot, state, None, records, None)
            .await?
        {
            return Ok(0);
        }
        h.tally.sub_pending(expired + read.skipped.len() as u64);
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

    /// After a webhook's deletion (here or seen from another router): no
    /// lane of it runs again. Takes each lane's lock, so an operation in
    /// progress finishes first.
    pub(super) async fn forget_webhook(&self, webhook_id: &str) {
        self.inner
            .deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(webhook_id.to_string());
        for h in self.inner.lanes.remove_webhook(webhook_id) {
            h.lose(None);
            h.sync_locked().await;
        }
    }
}

/// One statement of [`PgStore::write_lanes`].
async fn run_write<C: deadpool_postgres::GenericClient>(
    client: &C,
    stmt: &tokio_postgres::Statement,
    owner: &str,
    lanes: &[&LaneRow],
    records: &[&RecordWrite],
    dequeue: &[(String, ModeTag, String)],
    passed: &mut HashSet<(String, ModeTag)>,
) -> Result<()> {
    let mut lw = Vec::with_capacity(lanes.len());
    let mut lm = Vec::with_capacity(lanes.len());
    let mut le = Vec::with_capacity(lanes.len());
    let mut lc = Vec::with_capacity(lanes.len());
    let mut ls = Vec::with_capacity(lanes.len());
    for l in lanes {
        lw.push(l.key.webhook_id.as_str());
        lm.push(lane_mode_code(l.key.mode));
        le.push(to_i64(l.epoch));
        lc.push(to_i64(l.state.cursor));
        ls.push(l.state.encode()?);
    }
    // One row per delivery id: the last write of it wins.
    let mut last: HashMap<(&str, &str), usize> = HashMap::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        last.insert((r.record.webhook_id.as_str(), r.record.id.as_str()), i);
    }
    let mut chosen: Vec<usize> = last.into_values().collect();
    chosen.sort_unstable();
    let n = chosen.len();
    let mut rw = Vec::with_capacity(n);
    let mut rm = Vec::with_capacity(n);
    let mut ri = Vec::with_capacity(n);
    let mut rf: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut rs = Vec::with_capacity(n);
    let mut rb = Vec::with_capacity(n);
    let mut rp: Vec<Option<&[u8]>> = Vec::with_capacity(n);
    let mut rd = Vec::with_capacity(n);
    let mut ro = Vec::with_capacity(n);
    for r in chosen.iter().filter_map(|&i| records.get(i)) {
        let rec = &r.record;
        rw.push(rec.webhook_id.as_str());
        rm.push(lane_mode_code(rec.mode));
        ri.push(rec.id.as_str());
        rf.push(rec.state.is_final().then_some(rec.finish_time_ms));
        rs.push(state_code(rec.state));
        rb.push(serde_json::to_vec(rec)?);
        rp.push(r.payload.as_deref());
        rd.push(rec.redelivered);
        ro.push(r.outcome);
    }
    let mut qw = Vec::with_capacity(dequeue.len());
    let mut qm = Vec::with_capacity(dequeue.len());
    let mut qi = Vec::with_capacity(dequeue.len());
    for (w, m, i) in dequeue {
        qw.push(w.as_str());
        qm.push(lane_mode_code(*m));
        qi.push(i.as_str());
    }
    let rows = client
        .query(
            stmt,
            &[
                &owner, &lw, &lm, &le, &lc, &ls, &rw, &rm, &ri, &rf, &rs, &rb, &rp, &rd, &ro, &qw,
                &qm, &qi,
            ],
        )
        .await
        .map_err(map_db)?;
    for row in rows {
        let w: String = row.get(0);
        let m = super::webhooks::lane_mode_of(row.get(1))?;
        passed.insert((w, m));
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

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
    fn lane_state_stores_only_what_it_names() {
        let s = LaneState {
            cursor: 5,
            head: None,
            parallel: Vec::new(),
        };
        assert!(s.encode().unwrap().is_empty());
        let s = LaneState {
            cursor: 5,
            head: Some("msg_a".into()),
            parallel: vec!["msg_b".into()],
        };
        let back = LaneState::from_row(9, &s.encode().unwrap());
        assert_eq!(back.cursor, 9);
        assert_eq!(back.head.as_deref(), Some("msg_a"));
        assert_eq!(back.parallel, ["msg_b"]);
    }
}
