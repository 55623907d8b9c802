//! The types the store interfaces speak besides the domain's: lane keys,
//! what a lane takes and hands back, pages, reports, the lanes' live figures.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::domain::delivery::{DeliveryRecord, LaneFilter, ModeTag};
use crate::domain::event::{NewEvent, StoredEvent};

/// What a lane asks [`LaneStore::lane_take_many`](super::LaneStore::lane_take_many) for.
#[derive(Debug, Clone, Copy)]
pub struct TakeArgs {
    /// Most events in a new payload.
    pub max_events: usize,
    /// A batch lane's interval has passed: send what it has.
    pub batch_due: bool,
    /// Most log records examined.
    pub scan_limit: usize,
    /// How many of the lane's deliveries the caller has in flight; 0 means
    /// whatever was handed out before and not finished was abandoned.
    pub in_flight: usize,
    /// The lane sends several payloads at once (`max_in_flight` > 1).
    pub concurrent: bool,
    /// Now, ms.
    pub now_ms: i64,
}

/// One lane: its account, webhook and mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LaneKey {
    /// The webhook's account.
    pub account_id: u64,
    /// The webhook.
    pub webhook_id: String,
    /// Real-time or batch.
    pub mode: ModeTag,
}

/// What [`LaneStore::lane_take_many`](super::LaneStore::lane_take_many) found for a lane to do.
#[derive(Debug)]
pub enum Take {
    /// Send this delivery with these events.
    Send {
        /// The delivery (PENDING or RETRYING).
        record: Box<DeliveryRecord>,
        /// Its events, oldest first.
        events: Vec<StoredEvent>,
        /// Events the lane's cursor moved past into this delivery (0 for a
        /// head resumed after a restart or a requeued delivery).
        taken: u64,
        /// Whether it came from the requeued queue.
        requeued: bool,
    },
    /// Nothing to send now. `more`: the read stopped at its scan limit, so
    /// read again at once instead of waiting for new events.
    Idle {
        /// Read again at once.
        more: bool,
    },
    /// A batch lane has events waiting, fewer than a full payload, and its
    /// batch interval has not passed.
    NotDue,
    /// The webhook was deleted: the lane must stop.
    Gone,
}

/// One page of a delivery listing.
#[derive(Debug, Clone)]
pub struct DeliveryPage {
    /// Records, newest first.
    pub deliveries: Vec<DeliveryRecord>,
    /// Id of the last record returned, when more may follow.
    pub next_after: Option<String>,
}

/// Most log records counted when a lane's backlog tally is seeded; a lane
/// further behind reports this many and sets `capped`.
pub const BACKLOG_SEED_LIMIT: usize = 1_000_000;

/// A lane's figures for the metrics, kept up to date as events arrive and
/// leave the lane instead of being counted at scrape time. Seeded by one
/// bounded count when the lane first runs (and again when its filter
/// changes); every change that depends on the cursor happens under the
/// lane's lock, arrivals are counted by sequence number past the seed point.
#[derive(Debug)]
pub struct LaneTally {
    /// Events after the cursor that the lane will take.
    pub(crate) pending: AtomicI64,
    /// Arrivals above this sequence number are counted as they are
    /// appended; `u64::MAX` until the tally is seeded.
    pub(crate) counted_through: AtomicU64,
    /// The seed count stopped at its limit: the lane is further behind.
    pub(crate) capped: AtomicBool,
    /// Requeued deliveries waiting.
    pub(crate) requeued: AtomicI64,
    /// Events of the delivery at the head (in flight or retrying).
    pub(crate) head_events: AtomicU64,
    /// Ingest time of the head's first event; 0 without a head.
    pub(crate) head_ingest_ms: AtomicI64,
    /// The filter the tally was seeded for; a different one reseeds.
    pub(crate) filter: Mutex<Option<LaneFilter>>,
}

impl Default for LaneTally {
    fn default() -> Self {
        LaneTally {
            pending: AtomicI64::new(0),
            counted_through: AtomicU64::new(u64::MAX),
            capped: AtomicBool::new(false),
            requeued: AtomicI64::new(0),
            head_events: AtomicU64::new(0),
            head_ingest_ms: AtomicI64::new(0),
            filter: Mutex::new(None),
        }
    }
}

impl LaneTally {
    pub(crate) fn seeded(&self) -> bool {
        self.counted_through.load(Ordering::Acquire) != u64::MAX
    }

    pub(crate) fn sub_pending(&self, n: u64) {
        if self.seeded() {
            self.pending.fetch_sub(n as i64, Ordering::AcqRel);
        }
    }

    /// Nothing is in flight any more; `returned` events of new payloads
    /// that were never finished go back after the cursor (taken again).
    pub(crate) fn heads_dropped(&self, returned: u64) {
        self.head_events.store(0, Ordering::Release);
        if self.seeded() {
            self.pending.fetch_add(returned as i64, Ordering::AcqRel);
        }
        self.head_ingest_ms.store(0, Ordering::Release);
    }

    /// A payload of `events` goes out; `first` when nothing else is in flight.
    pub(crate) fn head_taken(&self, events: &[StoredEvent], first: bool) {
        self.head_events
            .fetch_add(events.len() as u64, Ordering::AcqRel);
        if first {
            self.head_ingest_ms.store(
                events.first().map_or(0, |e| e.ingest_time_ms),
                Ordering::Release,
            );
        }
    }

    /// A payload of `n` events finished; `last` when nothing else is in flight.
    pub(crate) fn head_finished(&self, n: u64, last: bool) {
        let _ = self
            .head_events
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(h.saturating_sub(n))
            });
        if last {
            self.head_events.store(0, Ordering::Release);
            self.head_ingest_ms.store(0, Ordering::Release);
        }
    }

    /// Events the lane still owes: after its cursor, plus its head's.
    pub fn backlog(&self) -> u64 {
        let pending = self.pending.load(Ordering::Acquire).max(0) as u64;
        pending + self.head_events.load(Ordering::Acquire)
    }

    /// Whether the seed count stopped at [`BACKLOG_SEED_LIMIT`].
    pub fn capped(&self) -> bool {
        self.capped.load(Ordering::Acquire)
    }

    /// Requeued deliveries waiting.
    pub fn requeued(&self) -> u64 {
        self.requeued.load(Ordering::Acquire).max(0) as u64
    }

    /// Events after the cursor (without the head's).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire).max(0) as u64
    }

    /// Ingest time of the head's first event, if there is a head.
    pub fn head_ingest_ms(&self) -> Option<i64> {
        (self.head_events.load(Ordering::Acquire) > 0)
            .then(|| self.head_ingest_ms.load(Ordering::Acquire))
    }

    /// The filter the lane last ran with.
    pub fn filter(&self) -> Option<LaneFilter> {
        self.filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

/// The result of [`EventLog::append_events`](super::EventLog::append_events).
#[derive(Debug)]
pub struct Appended {
    /// One per event, in request order.
    pub outcomes: Vec<AppendOutcome>,
    /// Sequence number of the first event stored (the others follow it in
    /// order, duplicates skipped); meaningless when none was stored.
    pub first_seq: u64,
    /// Highest sequence number in the log after the append.
    pub last_seq: u64,
    /// The request's events, handed back.
    pub events: Vec<NewEvent>,
}

/// What one round did.
#[derive(Debug, Default)]
pub struct JanitorReport {
    /// Events each lane lost to expiry.
    pub expired: Vec<(LaneKey, u64)>,
    /// Finished-record index entries handled.
    pub purged: usize,
    /// Keys of deleted webhooks removed.
    pub cleaned: usize,
    /// Events trimmed from the log.
    pub trimmed: u64,
    /// A limit was reached: run again soon.
    pub more: bool,
}

/// What another router sharing the store did, as far as this one must know
/// (see [`StoreHealth::changes`](super::StoreHealth::changes)). Hints: a
/// missed one is made up for by the lanes' own polling.
#[derive(Debug, Clone)]
pub enum Change {
    /// Events were appended elsewhere: the account's durable log now ends at `head_seq`.
    Events {
        /// The account.
        account_id: u64,
        /// Its durable head.
        head_seq: u64,
    },
    /// A webhook was created, changed or deleted elsewhere.
    Webhook {
        /// Its account.
        account_id: u64,
        /// The webhook.
        webhook_id: String,
    },
    /// A delivery outcome recorded elsewhere (for WatchDeliveries).
    Outcome(std::sync::Arc<DeliveryRecord>),
    /// This router now holds the lane: look at it at once.
    LaneAcquired(LaneKey),
}
