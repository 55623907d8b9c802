//! The delivery engine: one task per lane (webhook × real-time/batch), each
//! a cursor into its account's event log; the tower stack that sends; the
//! janitor that purges old records.

pub mod client;
pub mod guard;
mod lane;
pub mod retry;
pub mod signing;
pub mod stack;

use std::collections::HashMap;
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
use crate::store::Store;
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
    /// Running lanes by webhook id.
    lanes: Mutex<HashMap<String, LaneSet>>,
    /// Highest log sequence per account, watched by that account's lanes.
    accounts: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// Every finished attempt, for WatchDeliveries.
    outcomes: broadcast::Sender<DeliveryRecord>,
    /// True once shutdown began.
    stop: watch::Sender<bool>,
    /// Prometheus metrics; each lane caches its own handles.
    metrics: Arc<crate::metrics::Metrics>,
}

/// The two lanes of one webhook and what they share.
struct LaneSet {
    snapshot: watch::Sender<Option<Arc<WebhookSnapshot>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Dispatcher {
    /// Builds the engine and starts a lane pair for every stored webhook.
    pub fn start(store: Store, config: Arc<Config>, catalog: Arc<Catalog>) -> Result<Dispatcher> {
        Self::start_with_metrics(store, config, catalog, Arc::default())
    }

    /// Like [`Dispatcher::start`], recording into `metrics`.
    pub fn start_with_metrics(
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
        let (outcomes, _) = broadcast::channel(1024);
        let (stop, _) = watch::channel(false);
        let dispatcher = Dispatcher {
            inner: Arc::new(Inner {
                store: store.clone(),
                config,
                catalog,
                attempt,
                policy,
                lanes: Mutex::new(HashMap::new()),
                accounts: Mutex::new(HashMap::new()),
                outcomes,
                stop,
                metrics,
            }),
        };
        for w in store.all_webhooks()? {
            dispatcher.refresh(w.account_id, &w.id);
        }
        tokio::spawn(janitor(dispatcher.clone()));
        Ok(dispatcher)
    }

    /// Reloads a webhook from the store and hands it to its lanes (starting
    /// them if needed). Call after every change to a webhook or its secret.
    pub fn refresh(&self, account_id: u64, webhook_id: &str) {
        let loaded = self
            .inner
            .store
            .get_webhook(account_id, webhook_id)
            .and_then(|w| {
                w.map(|w| Ok((self.inner.store.get_secret(webhook_id)?, w)))
                    .transpose()
            });
        let (secret, webhook) = match loaded {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(webhook_id, error = %e, "cannot load webhook for delivery");
                return;
            }
        };
        if *self.inner.stop.borrow() {
            return;
        }
        let snapshot = Arc::new(WebhookSnapshot::new(webhook, secret.as_ref()));
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
        match lanes.get(webhook_id) {
            Some(set) => {
                set.snapshot.send_replace(Some(snapshot));
            }
            None => {
                let (tx, _) = watch::channel(Some(snapshot));
                let pacer = Arc::new(Pacer::new(self.inner.config.delivery.rate_limit_per_second));
                let log = self.account_watch(account_id);
                let tasks = [Mode::Realtime, Mode::Batch]
                    .into_iter()
                    .map(|mode| {
                        let lane = lane::Lane {
                            dispatcher: self.clone(),
                            account_id,
                            webhook_id: webhook_id.to_string(),
                            mode,
                            snapshot: tx.subscribe(),
                            log: log.clone(),
                            metrics: self.inner.metrics.lane(webhook_id),
                            stack: stack::lane_stack(
                                self.inner.attempt.clone(),
                                pacer.clone(),
                                self.inner.policy,
                                self.inner.stop.subscribe(),
                            ),
                        };
                        tokio::spawn(lane.run())
                    })
                    .collect();
                lanes.insert(
                    webhook_id.to_string(),
                    LaneSet {
                        snapshot: tx,
                        tasks,
                    },
                );
            }
        }
    }

    /// Stops a webhook's lanes and waits until they have ended, so nothing
    /// more is sent to it.
    pub async fn remove(&self, webhook_id: &str) {
        let set = self
            .inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(webhook_id);
        self.inner.metrics.forget_webhook(webhook_id);
        if let Some(set) = set {
            set.snapshot.send_replace(None);
            for t in set.tasks {
                t.abort();
                let _ = t.await;
            }
        }
    }

    /// Wakes the lanes of `account_id`: the log now ends at `last_seq`.
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
            .or_insert_with(|| watch::channel(self.inner.store.last_seq()).0)
            .subscribe()
    }

    /// A receiver of every delivery outcome.
    pub fn subscribe_outcomes(&self) -> broadcast::Receiver<DeliveryRecord> {
        self.inner.outcomes.subscribe()
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
            webhook: Arc::new(WebhookSnapshot::new(webhook.clone(), secret)),
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
    /// at the lane's head and is sent again after restart).
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let grace = Duration::from_millis(self.inner.config.shutdown_grace_ms);
        // Keep each set's snapshot sender alive until its lanes have ended:
        // dropping it reads as "webhook deleted" and would cut the attempts
        // in flight at once instead of letting them finish.
        let mut sets: Vec<LaneSet> = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.drain().map(|(_, set)| set).collect()
        };
        let deadline = tokio::time::Instant::now() + grace;
        for t in sets.iter_mut().flat_map(|set| set.tasks.iter_mut()) {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        drop(sets);
    }

    /// Marks a webhook disabled by the service and pauses its lanes.
    async fn disable(&self, account_id: u64, webhook_id: &str, reason: String) {
        let result = self
            .inner
            .store
            .update_webhook(account_id, webhook_id, |w, _| {
                w.active = false;
                w.disabled_reason = reason.clone();
                w.update_time_ms = now_ms();
                Ok(None)
            })
            .await;
        match result {
            Ok(_) => {
                tracing::warn!(account_id, webhook_id, reason = %reason, "webhook disabled");
                self.refresh(account_id, webhook_id);
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => tracing::error!(webhook_id, error = %e, "cannot disable webhook"),
        }
    }
}

/// Purges delivery records and events older than the retention period.
async fn janitor(d: Dispatcher) {
    let retention = d.inner.config.delivery.retention_ms as i64;
    let period = Duration::from_millis((retention as u64 / 10).clamp(1_000, 60_000));
    let mut stop = d.inner.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = purge_once(&d, now_ms() - retention) {
            tracing::error!(error = %e, "purging old records failed");
        }
    }
}

fn purge_once(d: &Dispatcher, before_ms: i64) -> Result<()> {
    let store = &d.inner.store;
    while store.purge_deliveries(before_ms, 10_000)? == 10_000 {}
    let webhooks = store.all_webhooks()?;
    for account in store.accounts_with_events()? {
        let ids: Vec<String> = webhooks
            .iter()
            .filter(|w| w.account_id == account)
            .map(|w| w.id.clone())
            .collect();
        // Without webhooks nothing can need the events; otherwise keep what a
        // lane has not passed yet.
        let max_seq = store.min_cursor(&ids)?.unwrap_or(u64::MAX);
        // Whole chunks go, so a full round removes at least the limit.
        while store.trim_events(account, before_ms, max_seq, 10_000)? >= 10_000 {}
    }
    Ok(())
}
