//! Delivery records: one payload for one webhook, and every attempt made.

use serde::{Deserialize, Serialize};

use super::catalog::Mode;

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
}

impl DeliveryState {
    /// Delivered or dead: no attempt will follow.
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryState::Delivered | DeliveryState::Dead)
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
}

/// Most attempts kept on a record; older ones are summarised by `attempt_count`.
pub const MAX_ATTEMPTS_KEPT: usize = 50;

impl DeliveryRecord {
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
