//! A webhook's health (GetWebhookHealth): figures over the attempts of the
//! last hour, read from the delivery log newest first, judged together with
//! the webhook's circuit breaker. No I/O: the admin service reads the log
//! and feeds each record to a [`HealthTally`].

use super::delivery::DeliveryRecord;
use super::webhook::Webhook;

/// The window the figures cover: attempts that started this recently.
pub const WINDOW_MS: i64 = 3_600_000;

/// Most deliveries one GetWebhookHealth reads; past this it says `truncated`.
pub const MAX_DELIVERIES_READ: usize = 10_000;

/// Below this success rate over the window a webhook is DEGRADED.
pub const DEGRADED_BELOW: f64 = 0.95;

/// Consecutive failures that make a webhook FAILING when the circuit
/// breaker is off (`delivery.breaker_failure_threshold = 0`).
pub const FAILING_WITHOUT_BREAKER: u32 = 10;

/// Where a webhook's circuit breaker stands (see `delivery/breaker.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Attempts go through.
    Closed,
    /// No attempt goes through until the open period ends.
    Open,
    /// One probe attempt goes through; the rest wait for its outcome.
    HalfOpen,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Nothing wrong lately.
    Healthy,
    /// Some failures, or a low success rate.
    Degraded,
    /// The breaker holds attempts back, or many failures in a row.
    Failing,
    /// Not active: retired, or disabled by the router.
    Disabled,
}

/// What the breaker of this router says about the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitFigures {
    /// The state.
    pub state: CircuitState,
    /// While OPEN, when the probe may go, epoch ms; 0 otherwise.
    pub open_until_ms: i64,
}

/// A webhook's health.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookHealth {
    /// The webhook.
    pub webhook_id: String,
    /// The verdict.
    pub state: HealthState,
    /// Successful attempts / attempts in the window; 1.0 with no attempts.
    pub success_rate: f64,
    /// Attempts that started in the window.
    pub attempts: u32,
    /// Attempt duration percentiles (nearest rank), ms; 0 with no attempts.
    pub latency_p50_ms: u32,
    /// 90th percentile.
    pub latency_p90_ms: u32,
    /// 99th percentile.
    pub latency_p99_ms: u32,
    /// Failed attempts in the window after the latest successful one.
    pub consecutive_failures: u32,
    /// The latest failed attempt read: (start, epoch ms; error).
    pub last_error: Option<(i64, String)>,
    /// When the next attempt may start, epoch ms; None when nothing waits.
    pub next_attempt_ms: Option<i64>,
    /// This router's breaker; None when no lane of the webhook runs here.
    pub circuit: Option<CircuitFigures>,
    /// More deliveries than [`MAX_DELIVERIES_READ`] were there to read.
    pub truncated: bool,
}

/// Accumulates the figures over delivery records, newest first.
#[derive(Debug)]
pub struct HealthTally {
    cutoff_ms: i64,
    read: usize,
    latencies: Vec<u32>,
    successes: u32,
    /// Newest successful attempt in the window.
    last_success_ms: i64,
    /// Start times of the failed attempts in the window.
    failures: Vec<i64>,
    last_error: Option<(i64, String)>,
    next_retry_ms: Option<i64>,
    truncated: bool,
}

impl HealthTally {
    /// An empty tally for a call at `now_ms`.
    pub fn new(now_ms: i64) -> HealthTally {
        HealthTally {
            cutoff_ms: now_ms - WINDOW_MS,
            read: 0,
            latencies: Vec::new(),
            successes: 0,
            last_success_ms: i64::MIN,
            failures: Vec::new(),
            last_error: None,
            next_retry_ms: None,
            truncated: false,
        }
    }

    /// Adds the next record (newest first). False once reading can stop: the
    /// record was created and finished before the window (so, as records
    /// come newest first, older ones are unlikely to hold attempts in it),
    /// or [`MAX_DELIVERIES_READ`] records were read.
    pub fn add(&mut self, r: &DeliveryRecord) -> bool {
        if self.read == MAX_DELIVERIES_READ {
            self.truncated = true;
            return false;
        }
        self.read += 1;
        for a in &r.attempts {
            let ok = a.error.is_empty() && (200..300).contains(&a.status_code);
            if !ok && self.last_error.as_ref().is_none_or(|(t, _)| a.time_ms > *t) {
                self.last_error = Some((a.time_ms, a.error.clone()));
            }
            if a.time_ms < self.cutoff_ms {
                continue;
            }
            self.latencies.push(a.latency_ms);
            if ok {
                self.successes += 1;
                self.last_success_ms = self.last_success_ms.max(a.time_ms);
            } else {
                self.failures.push(a.time_ms);
            }
        }
        if r.state == super::delivery::DeliveryState::Retrying && r.next_attempt_ms > 0 {
            let t = self
                .next_retry_ms
                .map_or(r.next_attempt_ms, |t| t.min(r.next_attempt_ms));
            self.next_retry_ms = Some(t);
        }
        !(r.create_time_ms < self.cutoff_ms
            && r.state.is_final()
            && r.finish_time_ms < self.cutoff_ms)
    }

    /// The health of `webhook` from what was read and this router's breaker
    /// (`threshold`: `delivery.breaker_failure_threshold`).
    pub fn finish(
        mut self,
        webhook: &Webhook,
        circuit: Option<CircuitFigures>,
        threshold: u32,
    ) -> WebhookHealth {
        self.latencies.sort_unstable();
        let attempts = self.latencies.len() as u32;
        let pct = |p: usize| -> u32 {
            let n = self.latencies.len();
            if n == 0 {
                return 0;
            }
            let rank = (p * n).div_ceil(100).max(1);
            self.latencies[rank - 1]
        };
        let success_rate = if attempts == 0 {
            1.0
        } else {
            f64::from(self.successes) / f64::from(attempts)
        };
        let last_success = self.last_success_ms;
        let consecutive_failures =
            self.failures.iter().filter(|t| **t > last_success).count() as u32;
        let failing_at = if threshold == 0 {
            FAILING_WITHOUT_BREAKER
        } else {
            threshold
        };
        let breaker_holds = circuit.is_some_and(|c| c.state != CircuitState::Closed);
        let state = if !webhook.active {
            HealthState::Disabled
        } else if breaker_holds || consecutive_failures >= failing_at {
            HealthState::Failing
        } else if consecutive_failures > 0 || success_rate < DEGRADED_BELOW {
            HealthState::Degraded
        } else {
            HealthState::Healthy
        };
        let next_attempt_ms = match circuit {
            Some(c) if c.state == CircuitState::Open && c.open_until_ms > 0 => {
                Some(c.open_until_ms)
            }
            _ => self.next_retry_ms,
        };
        WebhookHealth {
            webhook_id: webhook.id.clone(),
            state,
            success_rate,
            attempts,
            latency_p50_ms: pct(50),
            latency_p90_ms: pct(90),
            latency_p99_ms: pct(99),
            consecutive_failures,
            last_error: self.last_error,
            next_attempt_ms: next_attempt_ms.filter(|_| webhook.active),
            circuit,
            truncated: self.truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::delivery::{Attempt, DeliveryState, ModeTag};

    fn record(now: i64, attempts: &[(i64, u16, u32)], state: DeliveryState) -> DeliveryRecord {
        let mut r = DeliveryRecord::new(1, "wh_x", ModeTag::Realtime, std::iter::empty(), now);
        for &(t, status, latency) in attempts {
            r.push_attempt(Attempt {
                time_ms: t,
                status_code: status,
                latency_ms: latency,
                error: if status == 200 {
                    String::new()
                } else {
                    format!("HTTP {status}")
                },
            });
        }
        r.state = state;
        if state.is_final() {
            r.finish_time_ms = attempts.last().map_or(now, |a| a.0);
        }
        r
    }

    fn webhook(active: bool) -> Webhook {
        Webhook {
            id: "wh_x".into(),
            account_id: 1,
            name: "n".into(),
            description: String::new(),
            target_url: "https://example.com".into(),
            auth: crate::domain::webhook::Auth::None,
            event_types: vec![],
            active,
            create_time_ms: 0,
            update_time_ms: 0,
            disabled_reason: String::new(),
            max_in_flight: 0,
            filter: None,
        }
    }

    #[test]
    fn percentiles_rates_and_rules() {
        let now = 10 * WINDOW_MS;
        let mut t = HealthTally::new(now);
        // 100 successes with latencies 1..=100 ms.
        for i in 1..=100u32 {
            let r = record(
                now - 1000,
                &[(now - 1000 - i64::from(i), 200, i)],
                DeliveryState::Delivered,
            );
            assert!(t.add(&r));
        }
        let h = t.finish(&webhook(true), None, 3);
        assert_eq!(h.attempts, 100);
        assert_eq!(
            (h.latency_p50_ms, h.latency_p90_ms, h.latency_p99_ms),
            (50, 90, 99)
        );
        assert_eq!(h.success_rate, 1.0);
        assert_eq!(h.state, HealthState::Healthy);
        assert_eq!(h.last_error, None);

        // The latest two attempts failed: DEGRADED below the threshold,
        // FAILING at it; a retry due is the next attempt.
        let mut t = HealthTally::new(now);
        let mut r = record(
            now - 50,
            &[(now - 200, 500, 5), (now - 100, 500, 7)],
            DeliveryState::Retrying,
        );
        r.next_attempt_ms = now + 400;
        t.add(&r);
        t.add(&record(
            now - 500,
            &[(now - 500, 200, 3)],
            DeliveryState::Delivered,
        ));
        let h = t.finish(&webhook(true), None, 3);
        assert_eq!(h.consecutive_failures, 2);
        assert_eq!(h.state, HealthState::Degraded);
        assert_eq!(h.last_error, Some((now - 100, "HTTP 500".to_string())));
        assert_eq!(h.next_attempt_ms, Some(now + 400));
        assert!((h.success_rate - 1.0 / 3.0).abs() < 1e-9);

        // An open breaker: FAILING, next attempt at the end of its period.
        let mut t = HealthTally::new(now);
        t.add(&r);
        let open = CircuitFigures {
            state: CircuitState::Open,
            open_until_ms: now + 900,
        };
        let h = t.finish(&webhook(true), Some(open), 3);
        assert_eq!(h.state, HealthState::Failing);
        assert_eq!(h.next_attempt_ms, Some(now + 900));
        // Retired: DISABLED, nothing waits.
        let mut t = HealthTally::new(now);
        t.add(&r);
        let h = t.finish(&webhook(false), Some(open), 3);
        assert_eq!(h.state, HealthState::Disabled);
        assert_eq!(h.next_attempt_ms, None);
    }

    #[test]
    fn no_attempts_is_healthy_and_old_records_stop_the_reading() {
        let now = 10 * WINDOW_MS;
        let mut t = HealthTally::new(now);
        let old = record(
            now - 2 * WINDOW_MS,
            &[(now - 2 * WINDOW_MS, 500, 1)],
            DeliveryState::Dead,
        );
        assert!(
            !t.add(&old),
            "a record finished before the window ends the reading"
        );
        let h = t.finish(&webhook(true), None, 0);
        assert_eq!(h.attempts, 0);
        assert_eq!(h.success_rate, 1.0);
        assert_eq!(h.state, HealthState::Healthy);
        // Its error is still the latest one read.
        assert!(h.last_error.is_some());
        // The read is bounded.
        let mut t = HealthTally::new(now);
        let r = record(now, &[], DeliveryState::Pending);
        for _ in 0..MAX_DELIVERIES_READ {
            assert!(t.add(&r));
        }
        assert!(!t.add(&r));
        assert!(t.finish(&webhook(true), None, 3).truncated);
    }
}
