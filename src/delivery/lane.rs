//! One lane: the ordered delivery of one webhook's real-time or batch events.
//! Its state is a cursor into the account's log plus the delivery at its
//! head; only the head can be failing, so one bad payload holds back only
//! its own lane. The stored head may name a delivery that has finished (the
//! state is not rewritten when one ends); a lane loading it clears it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};
use tracing::Instrument;

use super::stack::{AttemptObserver, DeliveryRequest, RetryRequest, Verdict, WebhookSnapshot};
use super::Dispatcher;
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, ModeTag};
use crate::domain::event::render_payload;
use crate::domain::ids::{new_id, DELIVERY_PREFIX};
use crate::domain::now_ms;
use crate::error::Result;
use crate::store::LaneState;

/// Most log records examined per read; a lane behind many events of types it
/// does not want catches up in steps of this size.
const SCAN_LIMIT: usize = 20_000;

pub(super) struct Lane {
    pub dispatcher: Dispatcher,
    pub account_id: u64,
    pub webhook_id: String,
    pub mode: Mode,
    /// Current webhook settings; None once deleted.
    pub snapshot: watch::Receiver<Option<Arc<WebhookSnapshot>>>,
    /// The account log's highest sequence number.
    pub log: watch::Receiver<u64>,
    /// retry ▶ rate limit ▶ auth ▶ timeout ▶ client.
    pub stack: BoxCloneSyncService<RetryRequest, Verdict, BoxError>,
    /// This lane's metric handles.
    pub metrics: crate::metrics::LaneMetrics,
}

enum Flow {
    Continue,
    Exit,
}

impl Lane {
    pub async fn run(mut self) {
        let span = tracing::info_span!(
            "lane",
            account_id = self.account_id,
            webhook_id = %self.webhook_id,
            mode = ?self.mode
        );
        async move {
            let mut state = match self.load_state() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot load lane state; lane not started");
                    return;
                }
            };
            let interval =
                Duration::from_millis(self.dispatcher.inner.config.delivery.batch_interval_ms);
            let mut next_batch = Instant::now() + interval;
            loop {
                match self.step(&mut state, &mut next_batch, interval).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Exit) => return,
                    Err(e) => {
                        // Storage trouble: keep the lane, try again shortly.
                        // If the store can no longer write, say so now, so
                        // no lane sends what it could not record.
                        let _ = self.dispatcher.inner.store.probe();
                        tracing::error!(error = %e, "lane step failed; retrying in 1 s");
                        if self.pause(Duration::from_secs(1)).await {
                            return;
                        }
                        match self.load_state() {
                            Ok(s) => state = s,
                            Err(_) => continue,
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn tag(&self) -> ModeTag {
        self.mode.into()
    }

    fn load_state(&self) -> Result<LaneState> {
        let store = &self.dispatcher.inner.store;
        match store.lane(&self.webhook_id, self.tag())? {
            Some(s) => Ok(s),
            None => {
                let s = LaneState {
                    cursor: store.last_seq(),
                    ..Default::default()
                };
                store.save_lane(&self.webhook_id, self.tag(), &s, &[])?;
                Ok(s)
            }
        }
    }

    fn stopping(&self) -> bool {
        *self.dispatcher.inner.stop.borrow()
    }

    /// Sleeps `d`; true when the router is stopping.
    async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.dispatcher.inner.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.wait_for(|s| *s) => true,
        }
    }

    /// Waits for new events, a settings change, `until`, or shutdown.
    async fn wait(&mut self, until: Option<Instant>, watch_log: bool) -> Flow {
        let mut stop = self.dispatcher.inner.stop.subscribe();
        let deadline = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let log_changed = async {
            if watch_log {
                let _ = self.log.changed().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = deadline => Flow::Continue,
            _ = log_changed => Flow::Continue,
            r = self.snapshot.changed() => if r.is_err() { Flow::Exit } else { Flow::Continue },
            _ = stop.wait_for(|s| *s) => Flow::Exit,
        }
    }

    async fn step(
        &mut self,
        state: &mut LaneState,
        next_batch: &mut Instant,
        interval: Duration,
    ) -> Result<Flow> {
        if self.stopping() {
            return Ok(Flow::Exit);
        }
        if self.dispatcher.inner.store.failure().is_some() {
            // The store takes no writes: a delivery now could not be recorded
            // and would be sent again and again. Wait until it is reopened.
            return Ok(if self.pause(Duration::from_secs(1)).await {
                Flow::Exit
            } else {
                Flow::Continue
            });
        }
        let Some(snap) = self.snapshot.borrow_and_update().clone() else {
            return Ok(Flow::Exit);
        };
        if !snap.webhook.active {
            // Retired or disabled: queued events wait here until activation.
            return Ok(self.wait(None, false).await);
        }
        if let Some(head) = state.head.clone() {
            return self.deliver_head(&snap, state, &head).await;
        }
        let store = self.dispatcher.inner.store.clone();
        if let Some(id) = store.next_requeued(&self.webhook_id, self.tag())? {
            state.head = Some(id.clone());
            store.take_requeued(&self.webhook_id, self.tag(), state, &id)?;
            return Ok(Flow::Continue);
        }
        let catalog = &self.dispatcher.inner.catalog;
        let types: HashSet<String> = snap
            .webhook
            .event_types
            .iter()
            .filter(|t| catalog.mode(t) == Some(self.mode))
            .cloned()
            .collect();
        // Mark the log as seen before reading it, so no append is missed.
        let log_end = *self.log.borrow_and_update();
        if types.is_empty() {
            if log_end > state.cursor {
                state.cursor = log_end;
                store.save_lane(&self.webhook_id, self.tag(), state, &[])?;
            }
            return Ok(self.wait(None, true).await);
        }
        let max = self.dispatcher.inner.config.delivery.max_events_per_payload as usize;
        let (events, scanned_to) =
            store.read_events(self.account_id, state.cursor, &types, max, SCAN_LIMIT)?;
        if events.is_empty() {
            if scanned_to > state.cursor {
                state.cursor = scanned_to;
                store.save_lane(&self.webhook_id, self.tag(), state, &[])?;
                return Ok(Flow::Continue);
            }
            return Ok(self.wait(None, true).await);
        }
        if self.mode == Mode::Batch && events.len() < max && Instant::now() < *next_batch {
            let due = *next_batch;
            return Ok(self.wait(Some(due), true).await);
        }
        if self.mode == Mode::Batch && Instant::now() >= *next_batch {
            *next_batch = Instant::now() + interval;
        }
        let record = DeliveryRecord {
            id: new_id(DELIVERY_PREFIX),
            account_id: self.account_id,
            webhook_id: self.webhook_id.clone(),
            mode: self.tag(),
            seqs: events.iter().map(|e| e.seq).collect(),
            event_ids: events.iter().map(|e| e.event_id.clone()).collect(),
            state: DeliveryState::Pending,
            attempts: Vec::new(),
            attempt_count: 0,
            first_attempt_ms: 0,
            next_attempt_ms: 0,
            create_time_ms: now_ms(),
            redelivery: false,
        };
        state.cursor = scanned_to;
        state.head = Some(record.id.clone());
        store.save_lane(&self.webhook_id, self.tag(), state, &[&record])?;
        // Send at once with what is in hand; reading it back is for restarts.
        self.send_head(&snap, state, record, &events).await
    }

    async fn deliver_head(
        &mut self,
        snap: &Arc<WebhookSnapshot>,
        state: &mut LaneState,
        head: &str,
    ) -> Result<Flow> {
        let inner = self.dispatcher.inner.clone();
        let store = &inner.store;
        let Some(mut record) = store.delivery(&self.webhook_id, head)? else {
            state.head = None;
            store.save_lane(&self.webhook_id, self.tag(), state, &[])?;
            return Ok(Flow::Continue);
        };
        if record.state.is_final() {
            state.head = None;
            store.save_lane(&self.webhook_id, self.tag(), state, &[])?;
            return Ok(Flow::Continue);
        }
        let events = store.events_at(self.account_id, &record.seqs)?;
        if events.is_empty() {
            record.state = DeliveryState::Dead;
            record.next_attempt_ms = 0;
            state.head = None;
            store.save_lane(&self.webhook_id, self.tag(), state, &[&record])?;
            tracing::warn!(delivery_id = %record.id, "events of the delivery are no longer stored; dropped");
            return Ok(Flow::Continue);
        }
        self.send_head(snap, state, record, &events).await
    }

    /// Attempts the head delivery (after its scheduled time) and records the outcome.
    async fn send_head(
        &mut self,
        snap: &Arc<WebhookSnapshot>,
        state: &mut LaneState,
        record: DeliveryRecord,
        events: &[crate::domain::event::StoredEvent],
    ) -> Result<Flow> {
        let inner = self.dispatcher.inner.clone();
        let store = &inner.store;
        let wait_ms = record.next_attempt_ms - now_ms();
        if wait_ms > 0 {
            // A scheduled retry (possibly from before a restart).
            let until = Instant::now() + Duration::from_millis(wait_ms as u64);
            if let Flow::Exit = self.wait(Some(until), false).await {
                return Ok(Flow::Exit);
            }
            return Ok(Flow::Continue);
        }
        let body = render_payload(self.account_id, events.iter().map(|e| e.json.as_str()));
        let shared = Arc::new(Mutex::new(record.clone()));
        let observer: AttemptObserver = {
            let shared = shared.clone();
            let store = store.clone();
            let outcomes = inner.outcomes.clone();
            let metrics = self.metrics.clone();
            Arc::new(move |attempt, next| {
                metrics.attempt_failed(attempt.latency_ms, next.is_some());
                let mut r = shared.lock().unwrap_or_else(|p| p.into_inner());
                r.push_attempt(attempt.clone());
                tracing::info!(
                    delivery_id = %r.id,
                    status = attempt.status_code,
                    error = %attempt.error,
                    attempt = r.attempt_count,
                    "delivery attempt failed"
                );
                if let Some(at) = next {
                    r.state = DeliveryState::Retrying;
                    r.next_attempt_ms = at;
                    let _ = outcomes.send(r.clone());
                }
                if let Err(e) = store.save_delivery(&r) {
                    tracing::error!(error = %e, "cannot persist delivery attempt");
                }
            })
        };
        let req = RetryRequest {
            request: DeliveryRequest {
                webhook: snap.clone(),
                msg_id: record.id.as_str().into(),
                body: Bytes::from(body),
                headers: HeaderMap::new(),
            },
            failures: record.attempt_count,
            first_attempt_ms: (record.first_attempt_ms > 0).then_some(record.first_attempt_ms),
            observer,
        };
        let stack = self.stack.clone();
        // Every attempt of this payload, and its log lines, in one span.
        let attempt_span = tracing::info_span!(
            "delivery",
            delivery_id = %record.id,
            first_event_id = record.event_ids.first().map(String::as_str),
            last_event_id = record.event_ids.last().map(String::as_str),
            events = record.event_ids.len()
        );
        let verdict = tokio::select! {
            v = stack.oneshot(req).instrument(attempt_span) => v,
            // New settings (URL, auth, retired, deleted): start over with them.
            // The attempts so far are persisted by the observer.
            _ = self.snapshot.changed() => return Ok(Flow::Continue),
        };
        self.metrics.verdict(&verdict);
        let mut r = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let disable_reason = match verdict {
            Ok(Verdict::Delivered(attempt)) => {
                r.push_attempt(attempt);
                r.state = DeliveryState::Delivered;
                None
            }
            Ok(Verdict::Gone(_)) => {
                r.state = DeliveryState::Dead;
                Some("listener answered 410 Gone".to_string())
            }
            Ok(Verdict::Dead(last)) => {
                r.state = DeliveryState::Dead;
                Some(format!(
                    "retries exhausted: {} attempts over {} s, last error: {}",
                    r.attempt_count,
                    (now_ms() - r.first_attempt_ms).max(0) / 1000,
                    last.error
                ))
            }
            Ok(Verdict::Stopped) => return Ok(Flow::Exit),
            Err(e) => {
                tracing::error!(error = %e, "delivery stack failed");
                return Ok(Flow::Continue);
            }
        };
        r.next_attempt_ms = 0;
        // Only the record is written: the stored lane state keeps pointing
        // at this (now finished) delivery until the next one replaces it,
        // which saves a write per payload. A lane that loads a finished head
        // after a restart just clears it (see `deliver_head`).
        state.head = None;
        store.save_delivery(&r)?;
        tracing::debug!(delivery_id = %r.id, events = r.event_ids.len(), state = ?r.state, "delivery finished");
        let _ = inner.outcomes.send(r);
        if let Some(reason) = disable_reason {
            self.dispatcher
                .disable(self.account_id, &self.webhook_id, reason)
                .await;
        }
        Ok(Flow::Continue)
    }
}
