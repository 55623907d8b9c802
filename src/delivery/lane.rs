//! One lane: the ordered delivery of one webhook's real-time or batch events.
//! Its state lives in the store (a cursor into the account's log plus the
//! delivery at its head, see `store/deliveries.rs`); only the head can be
//! failing, so one bad payload holds back only its own lane. A real-time
//! lane whose webhook allows `max_in_flight` > 1 keeps up to that many
//! payloads in flight instead, each retried on its own (see
//! [`Lane::run_concurrent`]). Every store call runs on a blocking thread:
//! the lane's task only waits and sends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};
use tracing::Instrument;

use super::stack::{AttemptObserver, RetryRequest, Settings, Verdict};
use super::Dispatcher;
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState};
use crate::domain::event::{render_payload, StoredEvent};
use crate::domain::now_ms;
use crate::error::Result;
use crate::store::{LaneKey, LaneStore, StoreHealth, Take, TakeArgs};

/// Most log records examined per read; a lane behind many events of types it
/// does not want catches up in steps of this size.
const SCAN_LIMIT: usize = 20_000;

/// How often a lane that takes none of the new events moves its cursor past them.
const UNSUBSCRIBED_CATCH_UP: Duration = Duration::from_secs(1);

/// A one-at-a-time real-time lane with a backlog takes up to this many
/// payloads per store call and sends them one after another, in order...
const TAKE_AHEAD_PAYLOADS: usize = 16;
/// ...as long as they carry no more than this many events in all.
const TAKE_AHEAD_EVENTS: usize = 100;

pub(super) struct Lane {
    pub dispatcher: Dispatcher,
    pub key: LaneKey,
    pub mode: Mode,
    /// Current webhook settings; None once deleted.
    pub settings: Settings,
    /// The account log's durable end, to wake up on new events.
    pub log: watch::Receiver<u64>,
    /// retry ▶ rate limit ▶ auth ▶ timeout ▶ client.
    pub stack: BoxCloneSyncService<RetryRequest, Verdict, BoxError>,
    /// This lane's metric handles.
    pub metrics: crate::metrics::LaneMetrics,
    /// Payloads taken and not sent yet, in order (see [`TAKE_AHEAD_PAYLOADS`]).
    pub ahead: std::collections::VecDeque<(DeliveryRecord, Vec<StoredEvent>)>,
}

pub(super) enum Flow {
    Continue,
    Exit,
}

/// What sending one payload needs; each payload in flight has its own.
#[derive(Clone)]
struct Sender {
    dispatcher: Dispatcher,
    key: LaneKey,
    settings: Settings,
    stack: BoxCloneSyncService<RetryRequest, Verdict, BoxError>,
    metrics: crate::metrics::LaneMetrics,
}

impl Lane {
    pub async fn run(mut self) {
        let span = tracing::info_span!(
            "lane",
            account_id = self.key.account_id,
            webhook_id = %self.key.webhook_id,
            mode = ?self.mode
        );
        async move {
            let interval =
                Duration::from_millis(self.dispatcher.inner.config.delivery.batch_interval_ms);
            let mut next_batch = Instant::now() + interval;
            loop {
                match self.step(&mut next_batch, interval).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Exit) => return,
                    Err(e) => {
                        // The next take hands out again what was taken ahead.
                        self.ahead.clear();
                        // Storage trouble: keep the lane, try again shortly.
                        // If the store can no longer write, say so now, so
                        // no lane sends what it could not record.
                        let store = self.dispatcher.inner.store.clone();
                        let _ = store.probe().await;
                        tracing::error!(error = %e, "lane step failed; retrying in 1 s");
                        if self.pause(Duration::from_secs(1)).await {
                            return;
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
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

    /// Waits for new events (if `watch_log`), a settings change, `until`, or
    /// shutdown.
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
            r = self.settings.changed() => if r.is_err() { Flow::Exit } else { Flow::Continue },
            _ = stop.wait_for(|s| *s) => Flow::Exit,
        }
    }

    async fn step(&mut self, next_batch: &mut Instant, interval: Duration) -> Result<Flow> {
        if self.stopping() {
            return Ok(Flow::Exit);
        }
        let inner = self.dispatcher.inner.clone();
        if inner.store.failure().is_some() {
            // The store takes no writes: a delivery now could not be recorded
            // and would be sent again and again. Wait until it is reopened.
            return Ok(if self.pause(Duration::from_secs(1)).await {
                Flow::Exit
            } else {
                Flow::Continue
            });
        }
        if self.settings.has_changed().unwrap_or(true) {
            // What was taken ahead is taken again with the new settings.
            self.ahead.clear();
        }
        let Some(snap) = self.settings.borrow_and_update().clone() else {
            return Ok(Flow::Exit);
        };
        if !snap.webhook.active {
            // Retired or disabled: queued events wait here until activation.
            self.ahead.clear();
            return Ok(self.wait(None, false).await);
        }
        if self.mode == Mode::Realtime && snap.webhook.concurrency() > 1 {
            self.ahead.clear();
            return self.run_concurrent().await;
        }
        if let Some((record, events)) = self.ahead.pop_front() {
            return self.sender().send(record, Arc::new(events)).await;
        }
        let filter = snap.filter(self.mode).clone();
        let subscribes = filter.subscribes();
        let batch_due = self.mode == Mode::Batch && Instant::now() >= *next_batch;
        // Mark the log as seen before reading it, so no append is missed.
        self.log.borrow_and_update();
        let key = self.key.clone();
        let args = TakeArgs {
            max_events: super::ops::max_events_per_payload(
                &self.key,
                inner.config.delivery.max_events_per_payload as usize,
            ),
            batch_due,
            scan_limit: SCAN_LIMIT,
            in_flight: 0,
            concurrent: false,
            now_ms: now_ms(),
        };
        let (n, max_events) = match self.mode {
            Mode::Realtime => (TAKE_AHEAD_PAYLOADS, TAKE_AHEAD_EVENTS),
            Mode::Batch => (1, usize::MAX),
        };
        let mut takes = inner
            .store
            .lane_take_many(key, filter, args, n, max_events)
            .await?
            .into_iter();
        let Some(take) = takes.next() else {
            return Ok(Flow::Continue);
        };
        for t in takes {
            if let Take::Send { record, events, .. } = t {
                self.ahead.push_back((*record, events));
            }
        }
        match take {
            Take::Gone => Ok(Flow::Exit),
            Take::Idle { more: true } => Ok(Flow::Continue),
            Take::Idle { more: false } => Ok(self.idle(subscribes).await),
            Take::NotDue => {
                let due = *next_batch;
                Ok(self.wait(Some(due), true).await)
            }
            Take::Send { record, events, .. } => {
                if batch_due {
                    *next_batch = Instant::now() + interval;
                }
                self.sender().send(*record, Arc::new(events)).await
            }
        }
    }

    /// Waits with nothing to send. A lane none of whose webhook's types goes
    /// to its mode (`subscribes` false: a batch lane of a webhook of
    /// real-time types, say) gets none of the new events, so it does not
    /// wake for each append; it moves its cursor past them once a second.
    async fn idle(&mut self, subscribes: bool) -> Flow {
        if subscribes {
            self.wait(None, true).await
        } else {
            self.wait(Some(Instant::now() + UNSUBSCRIBED_CATCH_UP), false)
                .await
        }
    }

    fn sender(&self) -> Sender {
        Sender {
            dispatcher: self.dispatcher.clone(),
            key: self.key.clone(),
            settings: self.settings.clone(),
            stack: self.stack.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// A real-time lane with `max_in_flight` > 1: keeps up to that many
    /// payloads in flight, taking a new one whenever one finishes. The store
    /// keeps the lane's cursor at its oldest payload not yet recorded, and a
    /// payload that fails is recorded with its events, so it retries on its
    /// own while the others go on. Returns to [`Lane::step`] once nothing is
    /// in flight and there is nothing to send, or when the webhook is no
    /// longer active, allows one at a time, is deleted, or the router stops
    /// (after what is in flight has finished or paused).
    async fn run_concurrent(&mut self) -> Result<Flow> {
        let inner = self.dispatcher.inner.clone();
        let mut in_flight = tokio::task::JoinSet::new();
        // The last take found nothing to send: wait for new events.
        let mut drained = false;
        // Take as soon as there is room (at the start and on new events).
        let mut eager = true;
        let mut gone = false;
        let mut settings_gone = false;
        let mut failure = None;
        let mut stop = inner.stop.subscribe();
        loop {
            let snap = self.settings.borrow_and_update().clone();
            let limit = match &snap {
                Some(s)
                    if s.webhook.active
                        && !gone
                        && failure.is_none()
                        && !self.stopping()
                        && inner.store.failure().is_none() =>
                {
                    s.webhook.concurrency()
                }
                _ => 0,
            };
            // With a backlog, refill in steps, so one store call takes
            // several payloads; new events are taken at once.
            let step = (limit / 4).max(1);
            while !drained && in_flight.len() < limit && (eager || limit - in_flight.len() >= step)
            {
                let Some(snap) = &snap else { break };
                let filter = snap.filter(Mode::Realtime).clone();
                // Mark the log as seen before reading it, so no append is missed.
                self.log.borrow_and_update();
                let key = self.key.clone();
                let args = TakeArgs {
                    max_events: inner.config.delivery.max_events_per_payload as usize,
                    batch_due: false,
                    scan_limit: SCAN_LIMIT,
                    in_flight: in_flight.len(),
                    concurrent: true,
                    now_ms: now_ms(),
                };
                let room = limit - in_flight.len();
                let takes = match inner
                    .store
                    .lane_take_many(key, filter, args, room, usize::MAX)
                    .await
                {
                    Ok(takes) => takes,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                let mut again = false;
                for take in takes {
                    match take {
                        Take::Gone => gone = true,
                        Take::Idle { more } => {
                            again = more;
                            drained = !more;
                        }
                        Take::NotDue => drained = true,
                        Take::Send { record, events, .. } => {
                            let sender = self.sender();
                            in_flight.spawn(sender.send(*record, Arc::new(events)));
                            again = true;
                        }
                    }
                }
                if gone || !again {
                    break;
                }
            }
            if in_flight.is_empty() {
                if let Some(e) = failure {
                    return Err(e);
                }
                if gone {
                    return Ok(Flow::Exit);
                }
                if limit > 1 && drained {
                    // Nothing to send and nothing in flight: wait as a
                    // one-at-a-time lane would.
                    let subscribes = snap.is_some_and(|s| s.filter(Mode::Realtime).subscribes());
                    return Ok(self.idle(subscribes).await);
                }
                return Ok(Flow::Continue);
            }
            eager = false;
            let stopping = self.stopping();
            let room = drained && in_flight.len() < limit;
            tokio::select! {
                done = in_flight.join_next() => {
                    let mut done = done;
                    while let Some(d) = done {
                        match d {
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "delivery failed to record");
                                failure = Some(e);
                            }
                            Err(e) => tracing::error!(error = %e, "delivery task failed"),
                            Ok(Ok(_)) => {}
                        }
                        done = in_flight.try_join_next();
                    }
                }
                _ = self.log.changed(), if room => {
                    drained = false;
                    eager = true;
                }
                r = self.settings.changed(), if !settings_gone => {
                    settings_gone = r.is_err();
                    drained = false;
                    eager = true;
                }
                _ = stop.wait_for(|s| *s), if !stopping => {}
            }
        }
    }
}

impl Sender {
    /// Attempts a delivery (after its scheduled time) and records the outcome.
    async fn send(mut self, record: DeliveryRecord, events: Arc<Vec<StoredEvent>>) -> Result<Flow> {
        let inner = self.dispatcher.inner.clone();
        // A scheduled retry (possibly from before a restart): wait for it. A
        // settings change ends the wait only to stop when the webhook was
        // retired or deleted.
        let until = Instant::now()
            + Duration::from_millis((record.next_attempt_ms - now_ms()).max(0) as u64);
        while Instant::now() < until {
            let mut stop = inner.stop.subscribe();
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = stop.wait_for(|s| *s) => return Ok(Flow::Exit),
                r = self.settings.changed() => {
                    let active = r.is_ok()
                        && self.settings.borrow_and_update().as_ref().is_some_and(|s| s.webhook.active);
                    if !active {
                        return Ok(Flow::Continue);
                    }
                }
            }
        }
        let account = super::ops::envelope_account(&self.key, events.first().map(|e| &e.json[..]));
        let body = render_payload(account, events.iter().map(|e| &e.json));
        let shared = Arc::new(Mutex::new(record.clone()));
        let observer: AttemptObserver = {
            let shared = shared.clone();
            let dispatcher = self.dispatcher.clone();
            let metrics = self.metrics.clone();
            let key = self.key.clone();
            let events = events.clone();
            Arc::new(move |attempt, next| {
                let shared = shared.clone();
                let dispatcher = dispatcher.clone();
                let metrics = metrics.clone();
                let key = key.clone();
                let events = events.clone();
                Box::pin(async move {
                    metrics.attempt_failed(attempt.latency_ms, next.is_some());
                    super::ops::attempt_failed(&dispatcher, &key);
                    let r = {
                        let mut r = shared.lock().unwrap_or_else(|p| p.into_inner());
                        r.push_attempt(attempt.clone());
                        if let Some(at) = next {
                            r.state = DeliveryState::Retrying;
                            r.next_attempt_ms = at;
                        }
                        r.clone()
                    };
                    tracing::info!(
                        delivery_id = %r.id,
                        status = attempt.status_code,
                        error = %attempt.error,
                        attempt = r.attempt_count,
                        "delivery attempt failed"
                    );
                    let store = dispatcher.inner.store.clone();
                    // On disk before the retry wait: a crash then resumes
                    // this schedule, under the same id, with its attempts.
                    let saved = store.lane_attempt_failed(key, r, events).await;
                    match saved {
                        Ok(r) => {
                            shared.lock().unwrap_or_else(|p| p.into_inner()).events_kept =
                                r.events_kept;
                            if next.is_some() {
                                dispatcher.publish_outcome(r);
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot persist delivery attempt"),
                    }
                })
            })
        };
        let req = RetryRequest {
            msg_id: record.id.as_str().into(),
            body: Bytes::from(body),
            settings: self.settings.clone(),
            failures: record.attempt_count,
            first_attempt_ms: (record.first_attempt_ms > 0).then_some(record.first_attempt_ms),
            observer,
            trace: self
                .dispatcher
                .inner
                .traces
                .payload(crate::telemetry::otlp::PayloadTrace {
                    account_id: self.key.account_id,
                    webhook_id: &self.key.webhook_id,
                    delivery_id: &record.id,
                    lane: match self.key.mode {
                        crate::domain::delivery::ModeTag::Realtime => "realtime",
                        crate::domain::delivery::ModeTag::Batch => "batch",
                    },
                    event_ids: &record.event_ids,
                }),
        };
        // Every attempt of this payload, and its log lines, in one span.
        let attempt_span = tracing::info_span!(
            "delivery",
            delivery_id = %record.id,
            first_event_id = record.event_ids.first().map(String::as_str),
            last_event_id = record.event_ids.last().map(String::as_str),
            events = record.event_ids.len()
        );
        let verdict = self
            .stack
            .clone()
            .oneshot(req)
            .instrument(attempt_span)
            .await;
        self.metrics.verdict(&verdict);
        let mut r = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = now_ms();
        let disable_reason = match verdict {
            Ok(Verdict::Delivered(attempt)) => {
                r.push_attempt(attempt);
                r.finish(DeliveryState::Delivered, now);
                None
            }
            Ok(Verdict::Gone(_)) => {
                r.finish(DeliveryState::Dead, now);
                Some("listener answered 410 Gone".to_string())
            }
            Ok(Verdict::Dead(last)) => {
                r.finish(DeliveryState::Dead, now);
                Some(format!(
                    "retries exhausted: {} attempts over {} s, last error: {}",
                    r.attempt_count,
                    (now - r.first_attempt_ms).max(0) / 1000,
                    last.error
                ))
            }
            Ok(Verdict::Stopped) => return Ok(Flow::Exit),
            // Retired, disabled or deleted between attempts: the record as
            // persisted by the observer resumes on activation.
            Ok(Verdict::Paused) => return Ok(Flow::Continue),
            Err(e) => {
                tracing::error!(error = %e, "delivery stack failed");
                return Ok(Flow::Continue);
            }
        };
        let key = self.key.clone();
        let r = if inner.store.lane_finish_quick(&key, &r) {
            r
        } else {
            inner.store.lane_finish(key, r, events).await?
        };
        tracing::debug!(delivery_id = %r.id, events = r.event_ids.len(), state = ?r.state, "delivery finished");
        super::ops::delivery_finished(&self.dispatcher, &self.key, &r).await;
        self.dispatcher.publish_outcome(r);
        if let Some(reason) = disable_reason {
            self.dispatcher
                .disable(self.key.account_id, &self.key.webhook_id, reason)
                .await;
        }
        Ok(Flow::Continue)
    }
}
