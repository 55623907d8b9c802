//! The per-webhook circuit breaker, shared by the webhook's two lanes and
//! every payload they have in flight.
//!
//! ```text
//! CLOSED --threshold consecutive failures--> OPEN --open period ends--> HALF_OPEN
//!    ^                                        ^                            |
//!    +-------------- probe succeeds ----------|---------------------------+
//!                                             +--- probe fails (period ×2, capped)
//! ```
//!
//! CLOSED lets every attempt through and counts consecutive failures (any
//! attempt the retry layer counts as failed: non-2xx, connection error,
//! timeout). At `threshold` it OPENS: no attempt starts until the open
//! period ends; the lanes wait in [`Breaker::admit`] without using retry
//! attempts. Then HALF_OPEN: exactly one attempt, the next real one, is the
//! probe; the others wait for its outcome. Success closes the breaker (and
//! resets the period), failure re-opens it with the period doubled up to
//! the maximum. An attempt admitted before the state last changed (one in
//! flight when the breaker opened, say) does not move it.
//!
//! The breaker lives in this router's memory: several routers sharing a
//! PostgreSQL store each keep their own, fed by the attempts they make. A
//! restart starts CLOSED. One small struct per webhook; a webhook that is
//! retired, disabled or deleted has its breaker reset (closed), and
//! activation starts from CLOSED.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::now_ms;

pub use crate::domain::health::CircuitState;

/// Thresholds and periods (from `[delivery]`).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker; 0: never opens.
    pub threshold: u32,
    /// First open period.
    pub open: Duration,
    /// Longest open period.
    pub max_open: Duration,
}

/// A breaker's state as reported (GetWebhookHealth, WatchDeliveries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerView {
    /// The state; an OPEN breaker whose period has ended reads HALF_OPEN
    /// (the next attempt is the probe).
    pub state: CircuitState,
    /// Failed attempts since the last success, as this breaker saw them.
    pub consecutive_failures: u32,
    /// While OPEN, when the probe may go, epoch ms; 0 otherwise.
    pub open_until_ms: i64,
}

/// Called on every change of state with (before, after), with the
/// breaker's lock held: it must not call back into the breaker.
pub type ChangeHook = Box<dyn Fn(CircuitState, CircuitState) + Send + Sync>;

struct State {
    state: CircuitState,
    consecutive: u32,
    /// The current (or next) open period.
    period: Duration,
    open_until: Instant,
    open_until_ms: i64,
    /// HALF_OPEN: the probe has been handed out and has not reported.
    probing: bool,
    /// Bumped at every change of state: permits of an older generation
    /// report nothing.
    generation: u64,
}

/// One webhook's breaker.
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
    /// Bumped at every change, to wake waiters.
    changed: watch::Sender<u64>,
    on_change: ChangeHook,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("view", &self.view())
            .finish()
    }
}

/// Leave to make one attempt; report its outcome with [`Permit::record`].
/// Dropped without a report (the router stopped, the webhook was retired),
/// a probe is handed to the next attempt instead.
pub struct Permit {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl Breaker {
    /// A CLOSED breaker; `on_change` hears every change of state.
    pub fn new(settings: BreakerSettings, on_change: ChangeHook) -> Arc<Breaker> {
        Arc::new(Breaker {
            settings,
            state: Mutex::new(State {
                state: CircuitState::Closed,
                consecutive: 0,
                period: settings.open,
                open_until: Instant::now(),
                open_until_ms: 0,
                probing: false,
                generation: 0,
            }),
            changed: watch::channel(0).0,
            on_change,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `to` (the lock held, so the hook hears changes in order),
    /// then tells the hook and the waiters.
    fn set(&self, s: &mut State, to: CircuitState) {
        let from = s.state;
        s.state = to;
        s.generation += 1;
        s.probing = false;
        if to != CircuitState::Open {
            s.open_until_ms = 0;
        }
        if from != to {
            (self.on_change)(from, to);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// The state now.
    pub fn view(&self) -> BreakerView {
        let s = self.lock();
        let state = match s.state {
            CircuitState::Open if Instant::now() >= s.open_until => CircuitState::HalfOpen,
            other => other,
        };
        BreakerView {
            state,
            consecutive_failures: s.consecutive,
            open_until_ms: if state == CircuitState::Open {
                s.open_until_ms
            } else {
                0
            },
        }
    }

    /// Waits until an attempt may start: at once while CLOSED; while OPEN,
    /// until the period ends (the first to ask then gets the probe); while
    /// HALF_OPEN, until the probe reported. Cancel by dropping the future.
    pub async fn admit(self: &Arc<Self>) -> Permit {
        let mut changed = self.changed.subscribe();
        loop {
            let until = {
                let mut s = self.lock();
                changed.borrow_and_update();
                match s.state {
                    CircuitState::Closed => return self.permit(s.generation, false),
                    CircuitState::Open if Instant::now() >= s.open_until => {
                        self.set(&mut s, CircuitState::HalfOpen);
                        s.probing = true;
                        return self.permit(s.generation, true);
                    }
                    CircuitState::Open => Some(s.open_until),
                    CircuitState::HalfOpen if !s.probing => {
                        s.probing = true;
                        return self.permit(s.generation, true);
                    }
                    CircuitState::HalfOpen => None,
                }
            };
            let deadline = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = deadline => {}
                r = changed.changed() => {
                    if r.is_err() {
                        // Cannot happen: the sender lives in `self`.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn permit(self: &Arc<Self>, generation: u64, probe: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            generation,
            probe,
            reported: false,
        }
    }

    /// Back to CLOSED with no failures counted (the webhook was retired,
    /// disabled, activated or deleted). Permits handed out before report nothing.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.consecutive = 0;
        s.period = self.settings.open;
        self.set(&mut s, CircuitState::Closed);
    }

    fn record(&self, generation: u64, success: bool) {
        {
            let mut s = self.lock();
            if generation != s.generation {
                // Admitted before the last change: its outcome says
                // nothing about the state since.
                return;
            }
            if success {
                s.consecutive = 0;
                if s.state == CircuitState::Closed {
                    return;
                }
                s.period = self.settings.open;
                self.set(&mut s, CircuitState::Closed)
            } else {
                s.consecutive = s.consecutive.saturating_add(1);
                let t = self.settings.threshold;
                let reopen = s.state == CircuitState::HalfOpen;
                if !reopen && (t == 0 || s.consecutive < t) {
                    return;
                }
                if reopen {
                    s.period = s.period.saturating_mul(2).min(self.settings.max_open);
                } else {
                    s.period = self.settings.open;
                }
                s.open_until = Instant::now() + s.period;
                s.open_until_ms = now_ms() + s.period.as_millis() as i64;
                self.set(&mut s, CircuitState::Open)
            }
        }
    }

    fn release_probe(&self, generation: u64) {
        let mut s = self.lock();
        if s.generation == generation && s.state == CircuitState::HalfOpen && s.probing {
            s.probing = false;
            self.changed.send_modify(|g| *g += 1);
        }
    }
}

impl Permit {
    /// Reports the attempt's outcome (true: 2xx).
    pub fn record(mut self, success: bool) {
        self.reported = true;
        self.breaker.record(self.generation, success);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.release_probe(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn breaker(threshold: u32) -> (Arc<Breaker>, Arc<AtomicUsize>) {
        let opened = Arc::new(AtomicUsize::new(0));
        let o = opened.clone();
        let b = Breaker::new(
            BreakerSettings {
                threshold,
                open: Duration::from_millis(100),
                max_open: Duration::from_millis(250),
            },
            Box::new(move |_, to| {
                if to == CircuitState::Open {
                    o.fetch_add(1, Ordering::SeqCst);
                }
            }),
        );
        (b, opened)
    }

    #[tokio::test]
    async fn opens_probes_once_and_doubles_the_period_up_to_the_maximum() {
        let (b, opened) = breaker(3);
        for _ in 0..2 {
            b.admit().await.record(false);
        }
        assert_eq!(b.view().state, CircuitState::Closed);
        b.admit().await.record(false);
        let v = b.view();
        assert_eq!(v.state, CircuitState::Open);
        assert_eq!(v.consecutive_failures, 3);
        assert!(v.open_until_ms > now_ms());
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // The probe waits for the period; a second caller waits for the probe.
        let start = Instant::now();
        let probe = b.admit().await;
        assert!(start.elapsed() >= Duration::from_millis(95));
        assert_eq!(b.view().state, CircuitState::HalfOpen);
        let second = tokio::time::timeout(Duration::from_millis(150), b.admit()).await;
        assert!(
            second.is_err(),
            "a second attempt got through while half-open"
        );
        // The probe fails: open again for 200 ms, then 250 ms (the maximum).
        probe.record(false);
        assert_eq!(b.view().state, CircuitState::Open);
        let start = Instant::now();
        b.admit().await.record(false);
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let probe = b.admit().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(240), "{waited:?}");
        assert!(waited < Duration::from_millis(400), "{waited:?}");
        probe.record(true);
        let v = b.view();
        assert_eq!(v.state, CircuitState::Closed);
        assert_eq!(v.consecutive_failures, 0);
        assert_eq!(opened.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_dropped_probe_hands_over_and_stale_outcomes_are_ignored() {
        let (b, _) = breaker(2);
        let stale = b.admit().await;
        b.admit().await.record(false);
        b.admit().await.record(false);
        assert_eq!(b.view().state, CircuitState::Open);
        // In flight before the breaker opened: its success changes nothing.
        stale.record(true);
        assert_eq!(b.view().state, CircuitState::Open);
        let probe = b.admit().await;
        drop(probe);
        let next = tokio::time::timeout(Duration::from_millis(100), b.admit()).await;
        assert!(next.is_ok(), "the released probe was not handed on");
        b.reset();
        assert_eq!(b.view().state, CircuitState::Closed);
    }

    #[tokio::test]
    async fn threshold_zero_never_opens() {
        let (b, opened) = breaker(0);
        for _ in 0..50 {
            b.admit().await.record(false);
        }
        assert_eq!(b.view().state, CircuitState::Closed);
        assert_eq!(b.view().consecutive_failures, 50);
        assert_eq!(opened.load(Ordering::SeqCst), 0);
    }
}
