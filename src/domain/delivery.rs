//! Delivery records: one payload for one webhook, and every attempt made.

use serde::{Deserialize, Serialize};

use std::collections::HashSet;
use std::sync::Arc;

use super::catalog::{Catalog, Mode};
use super::filter::CompiledFilter;
use super::webhook::Webhook;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Not attempted yet (or first attempt running).
    Pending,
    /// Failed at least once, another attempt scheduled.
    Retrying,
    /// Answered 2xx.
    Delivered,
    /// Given up.
    Dead,
    /// Its events waited longer than `delivery.retention_ms` without being
    /// delivered (the webhook was retired, disabled or failing) and left the
    /// lane unsent; the record lists them.
    Expired,
}

impl DeliveryState {
    /// Delivered, dead or expired: no attempt will follow.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryState::Delivered | DeliveryState::Dead | DeliveryState::Expired
        )
    }
}

/// One HTTP attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Start, epoch ms.
    pub time_ms: i64,
    /// HTTP status; 0 when none arrived.
    pub status_code: u16,
    /// Duration.
    pub latency_ms: u32,
    /// Empty on success.
    pub error: String,
}

/// One payload to one webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// `msg_…`, also the `webhook-id` header.
    pub id: String,
    /// Owning account.
    pub account_id: u64,
    /// Target webhook.
    pub webhook_id: String,
    /// Lane it belongs to.
    pub mode: ModeTag,
    /// Log positions of the events, oldest first.
    pub seqs: Vec<u64>,
    /// Their event ids, same order.
    pub event_ids: Vec<String>,
    /// State.
    pub state: DeliveryState,
    /// Attempts so far (the most recent ones when there were very many).
    pub attempts: Vec<Attempt>,
    /// Total attempts made, including any dropped from `attempts`.
    pub attempt_count: u32,
    /// First attempt, epoch ms; 0 before any (the retry age counts from it).
    #[serde(default)]
    pub first_attempt_ms: i64,
    /// Next attempt, epoch ms; 0 when none is scheduled.
    pub next_attempt_ms: i64,
    /// Creation, epoch ms.
    pub create_time_ms: i64,
    /// Whether this is a redelivery requested by an operator (not a lane head).
    pub redelivery: bool,
    /// When it became DELIVERED, DEAD or EXPIRED, epoch ms; 0 before. Its
    /// retention counts from here.
    #[serde(default)]
    pub finish_time_ms: i64,
    /// A DEAD delivery that a RedeliverEvents without ids requeued already,
    /// so the next such call does not requeue it again.
    #[serde(default)]
    pub redelivered: bool,
    /// Whether its events are stored with the record, independent of the
    /// event log (from its first failed attempt on, for dead letters and for
    /// requeued copies), so trimming the log never takes them.
    #[serde(default)]
    pub events_kept: bool,
}

/// Most attempts kept on a record; older ones are summarised by `attempt_count`.
pub const MAX_ATTEMPTS_KEPT: usize = 50;

impl DeliveryRecord {
    /// A new PENDING delivery of `events` (seq, event id) on a lane.
    pub fn new(
        account_id: u64,
        webhook_id: &str,
        mode: ModeTag,
        events: impl Iterator<Item = (u64, String)>,
        now_ms: i64,
    ) -> DeliveryRecord {
        let (seqs, event_ids) = events.unzip();
        DeliveryRecord {
            id: super::ids::new_id(super::ids::DELIVERY_PREFIX),
            account_id,
            webhook_id: webhook_id.to_string(),
            mode,
            seqs,
            event_ids,
            state: DeliveryState::Pending,
            attempts: Vec::new(),
            attempt_count: 0,
            first_attempt_ms: 0,
            next_attempt_ms: 0,
            create_time_ms: now_ms,
            redelivery: false,
            finish_time_ms: 0,
            redelivered: false,
            events_kept: false,
        }
    }

    /// Ends the delivery in `state` (final) at `now_ms`.
    pub fn finish(&mut self, state: DeliveryState, now_ms: i64) {
        debug_assert!(state.is_final());
        self.state = state;
        self.next_attempt_ms = 0;
        self.finish_time_ms = now_ms;
    }

    /// Appends an attempt, keeping the list bounded.
    pub fn push_attempt(&mut self, a: Attempt) {
        if self.attempt_count == 0 {
            self.first_attempt_ms = a.time_ms;
        }
        self.attempt_count += 1;
        if self.attempts.len() >= MAX_ATTEMPTS_KEPT {
            self.attempts.remove(0);
        }
        self.attempts.push(a);
    }
}

/// Serialisable lane mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModeTag {
    /// Real-time lane.
    Realtime,
    /// Batch lane.
    Batch,
}

impl From<Mode> for ModeTag {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Realtime => ModeTag::Realtime,
            Mode::Batch => ModeTag::Batch,
        }
    }
}

impl From<ModeTag> for Mode {
    fn from(m: ModeTag) -> Self {
        match m {
            ModeTag::Realtime => Mode::Realtime,
            ModeTag::Batch => Mode::Batch,
        }
    }
}

/// Which events a lane takes: those of the webhook's event types published
/// in the lane's mode. The mode is the one stored with the event at publish
/// time, so moving a type between modes or removing it from config later
/// neither skips nor repeats what was queued; events stored before modes
/// were recorded (schema 2) fall back to the catalog in force. A webhook
/// with a payload filter also needs the event's `data` to match
/// ([`LaneFilter::accepts_event`]); events that do not are skipped like
/// those of other types.
#[derive(Debug, Clone)]
pub struct LaneFilter {
    /// The lane's mode.
    pub mode: Mode,
    /// The webhook's event types.
    pub types: HashSet<String>,
    /// For events stored without their mode.
    catalog: Arc<Catalog>,
    /// The webhook's payload filter, compiled; None: every event of its types.
    payload: Option<Arc<CompiledFilter>>,
}

impl LaneFilter {
    /// The filter of `webhook`'s `mode` lane.
    pub fn new(webhook: &Webhook, mode: Mode, catalog: Arc<Catalog>) -> LaneFilter {
        LaneFilter {
            mode,
            types: webhook.event_types.iter().cloned().collect(),
            catalog,
            payload: webhook
                .filter
                .as_ref()
                .map(|f| Arc::new(CompiledFilter::new(f))),
        }
    }

    /// Whether events must also pass a payload filter.
    pub fn has_payload_filter(&self) -> bool {
        self.payload.is_some()
    }

    /// Whether the event with rendered JSON `json` passes the payload
    /// filter (always, without one: then nothing is decoded).
    pub fn matches_payload(&self, json: &[u8]) -> bool {
        self.payload
            .as_ref()
            .is_none_or(|p| p.matches_event_json(json))
    }

    /// [`LaneFilter::accepts`] and [`LaneFilter::matches_payload`]: whether
    /// the lane takes this event.
    pub fn accepts_event(&self, name: &str, stored: Option<Mode>, json: &[u8]) -> bool {
        self.accepts(name, stored) && self.matches_payload(json)
    }

    /// Whether the webhook subscribes to a type the catalog puts in this
    /// lane's mode (whether new events will come its way).
    pub fn subscribes(&self) -> bool {
        self.types
            .iter()
            .any(|t| self.catalog.lane_mode(t) == Some(self.mode))
    }

    /// Whether `other` takes the same events.
    pub fn same_as(&self, other: &LaneFilter) -> bool {
        self.mode == other.mode && self.types == other.types && self.payload == other.payload
    }

    /// Whether an event named `name`, published in `stored` mode (None:
    /// not recorded), is of a type this lane takes (the payload filter
    /// aside).
    pub fn accepts(&self, name: &str, stored: Option<Mode>) -> bool {
        self.types.contains(name)
            && stored.or_else(|| self.catalog.lane_mode(name)) == Some(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EventTypeConfig, ModeConfig};

    #[test]
    fn the_stored_mode_decides_and_old_events_use_the_catalog() {
        let catalog = Arc::new(Catalog::new(&[EventTypeConfig {
            name: "BADGE".into(),
            mode: ModeConfig::Batch,
            description: String::new(),
        }]));
        let w = Webhook {
            id: "wh_x".into(),
            account_id: 1,
            name: "n".into(),
            description: String::new(),
            target_url: "https://example.com/".into(),
            auth: super::super::webhook::Auth::None,
            event_types: vec!["BADGE".into(), "COURSE_ENROLLMENT".into()],
            active: true,
            create_time_ms: 0,
            update_time_ms: 0,
            disabled_reason: String::new(),
            max_in_flight: 0,
            filter: None,
        };
        let realtime = LaneFilter::new(&w, Mode::Realtime, catalog.clone());
        let batch = LaneFilter::new(&w, Mode::Batch, catalog);
        // Published as real-time before the type moved to batch.
        assert!(realtime.accepts("BADGE", Some(Mode::Realtime)));
        assert!(!batch.accepts("BADGE", Some(Mode::Realtime)));
        // No stored mode: the catalog's.
        assert!(batch.accepts("BADGE", None));
        assert!(realtime.accepts("COURSE_ENROLLMENT", None));
        // Not subscribed.
        assert!(!realtime.accepts("COURSE_COMPLETED", Some(Mode::Realtime)));
    }
}
