//! The delivery engine: one task per lane (webhook × real-time/batch), each
//! a cursor into its account's event log; the tower stack that sends; the
//! janitor that purges, expires and trims by retention.

pub mod breaker;
pub mod client;
pub mod guard;
mod lane;
pub mod ops;
pub mod retry;
pub mod signing;
pub mod stack;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::config::Config;
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::DeliveryRecord;
use crate::domain::event::{render_event_json, render_payload};
use crate::domain::ids::{new_id, DELIVERY_PREFIX};
use crate::domain::now_ms;
use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::{Change, ConfigStore, EventLog, LaneKey, LaneStore, Store, StoreHealth};
use breaker::{Breaker, BreakerSettings, BreakerView, CircuitState};
use client::{ClientSettings, HttpClient};
use retry::RetryPolicy;
use stack::{AttemptStack, DeliveryRequest, Pacer, WebhookSnapshot};

/// Result of TestWebhook.
#[derive(Debug, Clone, Default)]
pub struct TestOutcome {
    /// 2xx received.
    pub success: bool,
    /// HTTP status; 0 when none.
    pub status_code: u16,
    /// Duration.
    pub latency_ms: u32,
    /// Failure reason.
    pub error: String,
    /// First KiB of the body.
    pub response_body: String,
}

/// Outcomes buffered per account for WatchDeliveries; a watcher further
/// behind is told how many it missed.
const WATCH_BUFFER: usize = 1024;

/// Changes of circuit-breaker state buffered for WatchDeliveries (all
/// accounts); a watcher further behind misses some, and learns the state
/// again from the next delivery message.
const CIRCUIT_BUFFER: usize = 256;

/// A webhook's circuit breaker changed state (see [`breaker`]).
#[derive(Debug, Clone)]
pub struct CircuitChange {
    /// Owning account.
    pub account_id: u64,
    /// The webhook.
    pub webhook_id: String,
    /// Its breaker's new state.
    pub state: CircuitState,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    /// Auth ▶ timeout ▶ client; lanes wrap it with pacing and retry.
    attempt: AttemptStack,
    policy: RetryPolicy,
    /// Running lanes, and webhooks being or having been deleted. The one
    /// lock every start of a lane takes: a deleted webhook's lanes can never
    /// be started again, whatever call races the deletion.
    lanes: Mutex<Lanes>,
    /// Serialises refreshes, so a slower one never installs older settings.
    refresh_lock: tokio::sync::Mutex<()>,
    /// Durable end of each account's log, watched by that account's lanes.
    accounts: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// Delivery outcomes per account, for WatchDeliveries.
    watchers: Mutex<HashMap<u64, broadcast::Sender<Arc<DeliveryRecord>>>>,
    /// Changes of the webhooks' circuit breakers, for WatchDeliveries.
    circuits: broadcast::Sender<CircuitChange>,
    /// True once shutdown began.
    stop: watch::Sender<bool>,
    /// Prometheus metrics; each lane caches its own handles.
    metrics: Arc<crate::metrics::Metrics>,
    /// OTLP traces (empty when off): ingest's publish spans, the lanes' attempts.
    traces: crate::telemetry::otlp::Traces,
    /// Operational events: their watchers and the failing streaks.
    ops: ops::Ops,
}

#[derive(Default)]
struct Lanes {
    sets: HashMap<String, LaneSet>,
    /// Deleted (or being deleted) in this process.
    deleted: HashSet<String>,
}

/// The two lanes of one webhook and what they share.
struct LaneSet {
    settings: watch::Sender<Option<Arc<WebhookSnapshot>>>,
    /// The webhook's circuit breaker, shared by both lanes.
    breaker: Arc<Breaker>,
    tasks: Vec<JoinHandle<()>>,
}

impl Dispatcher {
    /// Builds the engine and starts a lane pair for every stored webhook.
    pub async fn start(
        store: Store,
        config: Arc<Config>,
        catalog: Arc<Catalog>,
    ) -> Result<Dispatcher> {
        Self::start_with_metrics(store, config, catalog, Arc::default()).await
    }

    /// Like [`Dispatcher::start`], recording into `metrics`.
    pub async fn start_with_metrics(
        store: Store,
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Dispatcher> {
        let d = &config.delivery;
        let client = HttpClient::new(ClientSettings {
            connect_timeout: Duration::from_millis(d.connect_timeout_ms),
            allow_private: d.allow_private_targets,
            max_body: d.max_response_body_bytes as usize,
        })
        .map_err(Error::Internal)?;
        let attempt = stack::attempt_stack(client, Duration::from_millis(d.request_timeout_ms));
        let policy = RetryPolicy {
            initial: Duration::from_millis(d.retry_initial_ms),
            max_interval: Duration::from_millis(d.retry_max_interval_ms),
            max_age: Duration::from_millis(d.retry_max_age_ms),
        };
        let traces =
            crate::telemetry::otlp::Traces::start(&config.telemetry).map_err(Error::Startup)?;
        let (stop, _) = watch::channel(false);
        let ops = ops::Ops::new(&config);
        let dispatcher = Dispatcher {
            inner: Arc::new(Inner {
                store: store.clone(),
                config,
                catalog,
                attempt,
                policy,
                lanes: Mutex::new(Lanes::default()),
                refresh_lock: tokio::sync::Mutex::new(()),
                accounts: Mutex::new(HashMap::new()),
                watchers: Mutex::new(HashMap::new()),
                circuits: broadcast::channel(CIRCUIT_BUFFER).0,
                stop,
                metrics,
                traces,
                ops,
            }),
        };
        ops::sync_internal_webhook(&store, &dispatcher.inner.config).await?;
        for w in store.all_webhooks().await? {
            dispatcher.refresh(w.account_id, &w.id).await;
        }
        tokio::spawn(janitor(dispatcher.clone()));
        tokio::spawn(log_writer(dispatcher.clone()));
        tokio::spawn(follow_changes(dispatcher.clone(), store.changes()));
        Ok(dispatcher)
    }

    /// Reloads a webhook from the store and hands it to its lanes (starting
    /// them if needed). Call after every change to a webhook or its secret.
    /// (Boxed: a lane that disables its webhook refreshes it, and the
    /// compiler cannot prove that cycle `Send` otherwise.)
    pub fn refresh<'a>(
        &'a self,
        account_id: u64,
        webhook_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.reload(account_id, webhook_id))
    }

    async fn reload(&self, account_id: u64, webhook_id: &str) {
        let _serial = self.inner.refresh_lock.lock().await;
        let id = webhook_id.to_string();
        let loaded = self.inner.store.get_webhook(account_id, &id).await;
        let loaded = match loaded {
            Ok(Some(w)) => self
                .inner
                .store
                .get_secret(&id)
                .await
                .map(|secret| Some((secret, w))),
            other => other.map(|_| None),
        };
        let (secret, webhook) = match loaded {
            Ok(Some(found)) => found,
            // Gone: deleted, here or by another router sharing the store
            // (which only says so through the change feed). Its lanes stop
            // at once, attempts and retry waits included.
            Ok(None) => {
                self.stop_lanes(webhook_id).await;
                return;
            }
            Err(e) => {
                tracing::error!(webhook_id, error = %e, "cannot load webhook for delivery");
                return;
            }
        };
        if *self.inner.stop.borrow() {
            return;
        }
        let snapshot = Arc::new(WebhookSnapshot::new(
            webhook,
            secret.as_ref(),
            &self.inner.catalog,
        ));
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.deleted.contains(webhook_id) || self.inner.store.is_deleted(webhook_id) {
            return;
        }
        let active = snapshot.webhook.active;
        if let Some(set) = lanes.sets.get(webhook_id) {
            set.settings.send_replace(Some(snapshot));
            if !active {
                // Retired or disabled: its breaker no longer matters, and
                // activation starts from CLOSED.
                set.breaker.reset();
            }
            return;
        }
        let (tx, _) = watch::channel(Some(snapshot));
        let pacer = Arc::new(Pacer::new(self.inner.config.delivery.rate_limit_per_second));
        let breaker = self.new_breaker(account_id, webhook_id);
        let log = self.account_watch(account_id);
        let tasks = [Mode::Realtime, Mode::Batch]
            .into_iter()
            .map(|mode| {
                let lane = lane::Lane {
                    dispatcher: self.clone(),
                    key: LaneKey {
                        account_id,
                        webhook_id: webhook_id.to_string(),
                        mode: mode.into(),
                    },
                    mode,
                    settings: tx.subscribe(),
                    log: log.clone(),
                    metrics: self.inner.metrics.lane(webhook_id),
                    ahead: Default::default(),
                    stack: stack::lane_stack(
                        self.inner.attempt.clone(),
                        pacer.clone(),
                        breaker.clone(),
                        self.inner.policy,
                        self.inner.stop.subscribe(),
                    ),
                };
                tokio::spawn(lane.run())
            })
            .collect();
        lanes.sets.insert(
            webhook_id.to_string(),
            LaneSet {
                settings: tx,
                breaker,
                tasks,
            },
        );
    }

    /// A CLOSED breaker for a webhook whose lanes start, reporting to
    /// [`Inner::circuit_changed`].
    fn new_breaker(&self, account_id: u64, webhook_id: &str) -> Arc<Breaker> {
        let d = &self.inner.config.delivery;
        let settings = BreakerSettings {
            threshold: d.breaker_failure_threshold,
            open: Duration::from_millis(d.breaker_open_ms),
            max_open: Duration::from_millis(d.breaker_max_open_ms),
        };
        // Weak: the breaker lives inside `Inner`.
        let inner = Arc::downgrade(&self.inner);
        let id = webhook_id.to_string();
        Breaker::new(
            settings,
            Box::new(move |from, to| {
                if let Some(inner) = inner.upgrade() {
                    inner.circuit_changed(account_id, &id, from, to);
                }
            }),
        )
    }

    /// The state of a webhook's circuit breaker in this router; None when
    /// none of its lanes runs here (deleted, or the router is stopping).
    pub fn circuit(&self, webhook_id: &str) -> Option<BreakerView> {
        let lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.sets.get(webhook_id).map(|set| set.breaker.view())
    }

    /// Closes a webhook's circuit breaker (ActivateWebhook).
    pub fn reset_circuit(&self, webhook_id: &str) {
        let lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = lanes.sets.get(webhook_id) {
            set.breaker.reset();
        }
    }

    /// A receiver of every change of circuit-breaker state (all accounts).
    pub fn subscribe_circuits(&self) -> broadcast::Receiver<CircuitChange> {
        self.inner.circuits.subscribe()
    }

    /// First step of a deletion: from now on no lane of the webhook starts
    /// (a racing refresh finds it marked), and its running lanes are stopped
    /// and awaited, so nothing more is sent to it.
    pub async fn begin_delete(&self, webhook_id: &str) {
        let set = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.deleted.insert(webhook_id.to_string());
            lanes.sets.remove(webhook_id)
        };
        if let Some(set) = set {
            set.settings.send_replace(None);
            for t in set.tasks {
                t.abort();
                let _ = t.await;
            }
            set.breaker.reset();
        }
    }

    /// Ends the lanes of a webhook that no longer exists (no-op without any).
    async fn stop_lanes(&self, webhook_id: &str) {
        let set = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.sets.remove(webhook_id)
        };
        if let Some(set) = set {
            set.settings.send_replace(None);
            for t in set.tasks {
                t.abort();
                let _ = t.await;
            }
            set.breaker.reset();
            self.inner.metrics.forget_webhook(webhook_id);
        }
    }

    /// Last step of a deletion: `deleted` false (the store refused, e.g.
    /// NOT_FOUND or UNAVAILABLE) lets the lanes run again.
    pub async fn end_delete(&self, account_id: u64, webhook_id: &str, deleted: bool) {
        if deleted {
            self.inner.metrics.forget_webhook(webhook_id);
            return;
        }
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deleted
            .remove(webhook_id);
        self.refresh(account_id, webhook_id).await;
    }

    /// Wakes a webhook's lanes (requeued work waits for them).
    pub fn wake(&self, webhook_id: &str) {
        let lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = lanes.sets.get(webhook_id) {
            set.settings.send_modify(|_| {});
        }
    }

    /// Wakes the lanes of `account_id`: the durable log now ends at `last_seq`.
    pub fn events_appended(&self, account_id: u64, last_seq: u64) {
        let mut accounts = self
            .inner
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        accounts
            .entry(account_id)
            .or_insert_with(|| watch::channel(last_seq).0)
            .send_if_modified(|v| {
                if last_seq > *v {
                    *v = last_seq;
                    true
                } else {
                    false
                }
            });
    }

    fn account_watch(&self, account_id: u64) -> watch::Receiver<u64> {
        let mut accounts = self
            .inner
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        accounts
            .entry(account_id)
            .or_insert_with(|| watch::channel(self.inner.store.durable_head(account_id)).0)
            .subscribe()
    }

    /// A receiver of the delivery outcomes of `account_id` (each finished
    /// attempt); it lags, and says so, after [`WATCH_BUFFER`] unread ones.
    pub fn subscribe_outcomes(&self, account_id: u64) -> broadcast::Receiver<Arc<DeliveryRecord>> {
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Accounts nobody watches any more.
        watchers.retain(|_, tx| tx.receiver_count() > 0);
        watchers
            .entry(account_id)
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe()
    }

    /// Hands an outcome to the watchers of its account, if any.
    fn publish_outcome(&self, record: DeliveryRecord) {
        let watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watchers.get(&record.account_id) {
            let _ = tx.send(Arc::new(record));
        }
    }

    /// Sends one sample payload to `webhook` (saved or not) through the
    /// attempt stack; nothing is stored.
    pub async fn test_webhook(
        &self,
        webhook: &Webhook,
        secret: Option<&SecretRecord>,
        event_name: &str,
    ) -> TestOutcome {
        let now = now_ms();
        let event = render_event_json(
            &uuid::Uuid::new_v4().to_string(),
            event_name,
            now,
            "test event sent by TestWebhook",
            r#"{"test":true}"#,
        );
        let body = render_payload(webhook.account_id, [event.as_str()]);
        let req = DeliveryRequest {
            webhook: Arc::new(WebhookSnapshot::new(
                webhook.clone(),
                secret,
                &self.inner.catalog,
            )),
            msg_id: new_id(DELIVERY_PREFIX).into(),
            body: Bytes::from(body),
            headers: HeaderMap::new(),
        };
        let started = Instant::now();
        let result = self.inner.attempt.clone().oneshot(req).await;
        let outcome = stack::classify(now, started.elapsed(), result);
        TestOutcome {
            success: outcome.success,
            status_code: outcome.attempt.status_code,
            latency_ms: outcome.attempt.latency_ms,
            error: outcome.attempt.error,
            response_body: outcome.response_body,
        }
    }

    /// Stops every lane: no new attempt starts; attempts in flight get up to
    /// `shutdown_grace_ms` to finish, then are dropped (their delivery stays
    /// at the lane's head and is sent again after restart). Then sends the
    /// last spans, when traces are on.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let grace = Duration::from_millis(self.inner.config.shutdown_grace_ms);
        // Keep each set's settings sender alive until its lanes have ended:
        // dropping it reads as "webhook deleted" and would cut the attempts
        // in flight at once instead of letting them finish.
        let mut sets: Vec<LaneSet> = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.sets.drain().map(|(_, set)| set).collect()
        };
        let deadline = tokio::time::Instant::now() + grace;
        for t in sets.iter_mut().flat_map(|set| set.tasks.iter_mut()) {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        drop(sets);
        // What the lanes delivered and did not write yet.
        if let Err(e) = self.inner.store.save_lanes().await {
            tracing::error!(error = %e, "cannot write the last delivery outcomes");
        }
        // The last attempt spans have ended: send them (bounded wait).
        self.inner.traces.shutdown().await;
    }

    /// The OTLP traces handle (empty when traces are off).
    pub fn traces(&self) -> &crate::telemetry::otlp::Traces {
        &self.inner.traces
    }

    /// Marks a webhook disabled by the service and pauses its lanes.
    async fn disable(&self, account_id: u64, webhook_id: &str, reason: String) {
        if ops::is_internal(account_id) {
            // The operator endpoint follows the config alone.
            tracing::error!(
                webhook_id,
                reason = %reason,
                "the operator endpoint would be disabled now; it stays enabled (see [operational])"
            );
            return;
        }
        let why = reason.clone();
        let result = self
            .inner
            .store
            .update_webhook(account_id, webhook_id, move |w, _| {
                w.active = false;
                w.disabled_reason = why;
                w.update_time_ms = now_ms();
                Ok(None)
            })
            .await;
        match result {
            Ok(_) => {
                tracing::warn!(account_id, webhook_id, reason = %reason, "webhook disabled");
                self.refresh(account_id, webhook_id).await;
                ops::webhook_disabled(self, account_id, webhook_id, &reason).await;
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => tracing::error!(webhook_id, error = %e, "cannot disable webhook"),
        }
    }
}

impl Inner {
    /// The one place a change of a webhook's breaker state is handled:
    /// metrics, the log, WatchDeliveries. Called with the breaker's lock
    /// held (changes arrive in order): keep it short, never call back into
    /// the breaker.
    fn circuit_changed(
        &self,
        account_id: u64,
        webhook_id: &str,
        from: CircuitState,
        to: CircuitState,
    ) {
        self.metrics.circuit_changed(webhook_id, from, to);
        match to {
            CircuitState::Open => {
                tracing::warn!(account_id, webhook_id, from = ?from, "circuit breaker open")
            }
            _ => tracing::info!(account_id, webhook_id, from = ?from, to = ?to, "circuit breaker"),
        }
        let _ = self.circuits.send(CircuitChange {
            account_id,
            webhook_id: webhook_id.to_string(),
            state: to,
        });
    }
}

/// Applies what other routers sharing the store did (see [`Change`]): wakes
/// lanes for their events, reloads webhooks they changed, passes their
/// delivery outcomes to this router's watchers.
async fn follow_changes(d: Dispatcher, mut changes: tokio::sync::broadcast::Receiver<Change>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut stop = d.inner.stop.subscribe();
    loop {
        let change = tokio::select! {
            c = changes.recv() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        match change {
            Ok(Change::Events {
                account_id,
                head_seq,
            }) => d.events_appended(account_id, head_seq),
            Ok(Change::Webhook {
                account_id,
                webhook_id,
            }) => d.refresh(account_id, &webhook_id).await,
            Ok(Change::Outcome(record)) => d.publish_outcome((*record).clone()),
            Ok(Change::LaneAcquired(key)) => d.wake(&key.webhook_id),
            // Hints only: the lanes poll on their own as well.
            Err(RecvError::Lagged(n)) => tracing::debug!(missed = n, "store change hints dropped"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Writes the lanes' delivered records and cursors every
/// `delivery.log_flush_ms` (see `store/deliveries.rs`), on a blocking thread.
async fn log_writer(d: Dispatcher) {
    let period = Duration::from_millis(d.inner.config.delivery.log_flush_ms);
    let mut stop = d.inner.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = d.inner.store.save_lanes().await {
            tracing::error!(error = %e, "cannot write delivery outcomes; retrying");
        }
    }
}

/// Runs the store's janitor rounds (purge by finish time, expiry and
/// trimming by age, cleanup after deletions) on a blocking thread: every
/// `retention_ms / 10` (0.2 s to 60 s), and again at once while a round
/// reports more work than its bounds allowed.
async fn janitor(d: Dispatcher) {
    let delivery = &d.inner.config.delivery;
    let retention = delivery.retention_ms as i64;
    let dead_retention = delivery.dead_letter_retention_ms as i64;
    let period = Duration::from_millis((delivery.retention_ms / 10).clamp(200, 60_000));
    let mut stop = d.inner.stop.subscribe();
    let mut wait = period;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let catalog = d.inner.catalog.clone();
        let round = d
            .inner
            .store
            .janitor_round(catalog, now_ms(), retention, dead_retention)
            .await;
        wait = period;
        match round {
            Ok(report) => {
                for (key, n) in &report.expired {
                    d.inner.metrics.events_expired(&key.webhook_id, *n);
                }
                if report.trimmed > 0 || report.purged > 0 || report.cleaned > 0 {
                    tracing::debug!(
                        trimmed = report.trimmed,
                        purged = report.purged,
                        cleaned = report.cleaned,
                        "janitor round"
                    );
                }
                if report.more {
                    wait = Duration::from_millis(10);
                }
            }
            Err(e) => tracing::error!(error = %e, "janitor round failed"),
        }
    }
}
