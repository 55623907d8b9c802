//! Operational events (see `domain::operational`): how they are emitted,
//! and the internal webhook that delivers them.
//!
//! Every event goes to the watchers of WatchOperationalEvents (this
//! router's, in memory) and, when `[operational] target_url` is set, is
//! appended durably to the log of the reserved account
//! [`OPERATIONAL_ACCOUNT`]. That account has one internal webhook,
//! [`internal_webhook_id`], kept in step with the config at every start
//! ([`sync_internal_webhook`]), subscribed to the six types and signed
//! with `[operational] secret`: its lanes deliver the events like any
//! others (durable, in order, retried with the usual backoff, outcomes
//! recorded). One event per payload, so each payload's `accountId` is the
//! account its event concerns.
//!
//! The hooks are the free functions here, one call per place: the API
//! ([`webhook_created`], [`webhook_updated`], [`webhook_deleted`]) and the
//! lanes ([`attempt_failed`], [`delivery_finished`], [`webhook_disabled`]).
//! Deliveries of the internal webhook emit nothing (no loops), and it is
//! never disabled by the router: a dead operational delivery is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;

use super::Dispatcher;
use crate::config::Config;
use crate::domain::catalog::Mode;
use crate::domain::delivery::{DeliveryRecord, DeliveryState};
use crate::domain::event::NewEvent;
use crate::domain::ids::{derived_id, WEBHOOK_PREFIX};
use crate::domain::now_ms;
use crate::domain::operational::{self as op, OperationalEvent, OPERATIONAL_ACCOUNT};
use crate::domain::webhook::{Auth, SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::{ConfigStore, EventLog, LaneKey, Store};

/// Operational events buffered per watch channel; a watcher further behind
/// is told how many it missed.
const WATCH_BUFFER: usize = 1024;

/// The operational part of the dispatcher's state.
pub(super) struct Ops {
    /// Whether events go to the log (an operator endpoint is configured).
    to_log: bool,
    /// Watch channels by account; key [`OPERATIONAL_ACCOUNT`] (0) gets
    /// every account's events.
    watchers: Mutex<HashMap<u64, broadcast::Sender<Arc<OperationalEvent>>>>,
    /// What each webhook's deliveries did lately, for `delivery.recovered`.
    health: Mutex<HashMap<String, Health>>,
}

/// A webhook's recent deliveries as this router saw them.
enum Health {
    /// Its last finished delivery succeeded.
    Healthy,
    /// Failures since its last success.
    Failing(Streak),
}

#[derive(Default)]
struct Streak {
    failed_attempts: u64,
    dead_deliveries: u64,
    since_ms: i64,
}

impl Ops {
    pub(super) fn new(config: &Config) -> Ops {
        Ops {
            to_log: !config.operational.target_url.is_empty(),
            watchers: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
        }
    }

    fn failing(&self, webhook_id: &str, f: impl FnOnce(&mut Streak)) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let entry = health
            .entry(webhook_id.to_string())
            .or_insert(Health::Healthy);
        if let Health::Healthy = entry {
            *entry = Health::Failing(Streak {
                since_ms: now_ms(),
                ..Streak::default()
            });
        }
        if let Health::Failing(s) = entry {
            f(s);
        }
    }
}

/// The id of the internal webhook (the same on every router sharing a store).
pub fn internal_webhook_id() -> String {
    derived_id(WEBHOOK_PREFIX, 0, &[b"operational-events"])
}

/// Whether `account_id` is the reserved operational account.
pub fn is_internal(account_id: u64) -> bool {
    account_id == OPERATIONAL_ACCOUNT
}

/// Creates, updates or deactivates the internal webhook to match
/// `[operational]` (called at start, before the lanes start).
pub async fn sync_internal_webhook(store: &Store, config: &Config) -> Result<()> {
    let id = internal_webhook_id();
    let o = &config.operational;
    let existing = store.get_webhook(OPERATIONAL_ACCOUNT, &id).await?;
    if o.target_url.is_empty() {
        if existing.is_some_and(|w| w.active) {
            store
                .update_webhook(OPERATIONAL_ACCOUNT, &id, |w, _| {
                    w.active = false;
                    w.update_time_ms = now_ms();
                    Ok(None)
                })
                .await?;
            tracing::info!(
                "operational.target_url is not set: the operator endpoint is off \
                 (events still queued for it wait until it is set again)"
            );
        }
        return Ok(());
    }
    let url = crate::delivery::guard::check_target_url(
        o.target_url.trim(),
        config.delivery.allow_private_targets,
    )
    .map_err(|why| Error::invalid("operational.target_url", why))?
    .to_string();
    let now = now_ms();
    let wanted = Webhook {
        id: id.clone(),
        account_id: OPERATIONAL_ACCOUNT,
        name: "operational events".into(),
        description: "The router's own events, sent to [operational] target_url; \
                      managed from the config"
            .into(),
        target_url: url,
        auth: Auth::HMAC,
        event_types: op::TYPES.iter().map(|(n, _)| n.to_string()).collect(),
        active: true,
        create_time_ms: now,
        update_time_ms: now,
        disabled_reason: String::new(),
        max_in_flight: 0,
        filter: None,
    };
    let secret = SecretRecord {
        current: o.secret.clone(),
        create_time_ms: now,
        previous: None,
        previous_expire_ms: 0,
    };
    if existing.is_none() {
        let created = store
            .create_webhook(wanted.clone(), Some(secret.clone()), u32::MAX)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(target_url = %crate::delivery::guard::redact_url(&wanted.target_url),
                    "operator endpoint for operational events set up");
                return Ok(());
            }
            // Another router sharing the store created it first: update it.
            Err(e) if store.get_webhook(OPERATIONAL_ACCOUNT, &id).await?.is_none() => {
                return Err(e)
            }
            Err(_) => {}
        }
    }
    store
        .update_webhook(OPERATIONAL_ACCOUNT, &id, move |w, old| {
            let create_time_ms = w.create_time_ms;
            *w = Webhook {
                create_time_ms,
                ..wanted
            };
            let same = old.is_some_and(|s| s.current == secret.current && s.previous.is_none());
            Ok((!same).then_some(secret))
        })
        .await?;
    Ok(())
}

/// Sends `event` to the watchers and, with an operator endpoint, appends it
/// to the operational log (durable when this returns) and wakes its lane.
/// Failures are logged: an operational event never fails the call that
/// caused it.
pub async fn emit(d: &Dispatcher, event: OperationalEvent) {
    let ops = &d.inner.ops;
    let event = Arc::new(event);
    {
        let watchers = ops.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let mut accounts = vec![OPERATIONAL_ACCOUNT];
        if event.account_id != OPERATIONAL_ACCOUNT {
            accounts.push(event.account_id);
        }
        for account in accounts {
            if let Some(tx) = watchers.get(&account) {
                let _ = tx.send(event.clone());
            }
        }
    }
    if !ops.to_log {
        return;
    }
    let new = NewEvent {
        event_id: event.event_id.clone(),
        event_name: event.event_name.clone(),
        timestamp_ms: event.time_ms,
        mode: Mode::Realtime,
        json: event.to_json(),
    };
    match d
        .inner
        .store
        .append_events(OPERATIONAL_ACCOUNT, vec![new], now_ms())
        .await
    {
        Ok(appended) => d.events_appended(OPERATIONAL_ACCOUNT, appended.last_seq),
        Err(e) => tracing::error!(
            event_name = %event.event_name,
            event_id = %event.event_id,
            error = %e,
            "cannot store an operational event; it is not sent to the operator endpoint"
        ),
    }
}

/// A receiver of the operational events of `account_id` (0: every
/// account) that this router emits from now on.
pub fn subscribe(d: &Dispatcher, account_id: u64) -> broadcast::Receiver<Arc<OperationalEvent>> {
    let mut watchers = d
        .inner
        .ops
        .watchers
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    watchers.retain(|_, tx| tx.receiver_count() > 0);
    watchers
        .entry(account_id)
        .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
        .subscribe()
}

/// What a webhook looks like in an event's data: no secret, no password,
/// the URL without credentials, query or fragment.
fn describe(w: &Webhook) -> Vec<(&'static str, Value)> {
    let auth = match w.auth {
        Auth::None => "none",
        Auth::Basic { .. } => "basic",
        Auth::Signature { .. } => "signature",
    };
    vec![
        ("name", Value::from(w.name.as_str())),
        (
            "target_url",
            Value::from(crate::delivery::guard::redact_url(&w.target_url)),
        ),
        ("auth", Value::from(auth)),
        ("event_types", Value::from(w.event_types.clone())),
        ("active", Value::from(w.active)),
    ]
}

/// `webhook.created`
pub async fn webhook_created(d: &Dispatcher, w: &Webhook) {
    let info = format!("webhook {} created", w.id);
    let e = OperationalEvent::new(op::WEBHOOK_CREATED, w.account_id, &w.id, info, describe(w));
    emit(d, e).await;
}

/// How a webhook was changed, for `webhook.updated`'s `change`.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// UpdateWebhook.
    Updated,
    /// RetireWebhook.
    Retired,
    /// ActivateWebhook.
    Activated,
    /// RotateWebhookSecret (the secrets themselves are never in the event).
    SecretRotated,
}

/// `webhook.updated`: the webhook as it is now, how it changed and, for an
/// update, which fields differ from `before`.
pub async fn webhook_updated(
    d: &Dispatcher,
    change: Change,
    before: Option<&Webhook>,
    w: &Webhook,
) {
    let (name, info) = match change {
        Change::Updated => ("update", format!("webhook {} updated", w.id)),
        Change::Retired => ("retire", format!("webhook {} retired", w.id)),
        Change::Activated => ("activate", format!("webhook {} activated", w.id)),
        Change::SecretRotated => ("rotate_secret", format!("webhook {} secret rotated", w.id)),
    };
    let mut fields = vec![("change", Value::from(name))];
    if let Some(b) = before {
        let mut changed = Vec::new();
        for (field, differs) in [
            ("name", b.name != w.name),
            ("description", b.description != w.description),
            ("target_url", b.target_url != w.target_url),
            ("auth", b.auth != w.auth),
            ("event_types", b.event_types != w.event_types),
            ("max_in_flight", b.max_in_flight != w.max_in_flight),
            ("active", b.active != w.active),
        ] {
            if differs {
                changed.push(field);
            }
        }
        fields.push(("changed_fields", Value::from(changed)));
    }
    fields.extend(describe(w));
    let e = OperationalEvent::new(op::WEBHOOK_UPDATED, w.account_id, &w.id, info, fields);
    emit(d, e).await;
}

/// `webhook.deleted`
pub async fn webhook_deleted(d: &Dispatcher, account_id: u64, webhook_id: &str) {
    d.inner
        .ops
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(webhook_id);
    let info = format!("webhook {webhook_id} deleted");
    let e = OperationalEvent::new(op::WEBHOOK_DELETED, account_id, webhook_id, info, []);
    emit(d, e).await;
}

/// `webhook.disabled`: the router disabled the webhook itself.
pub(super) async fn webhook_disabled(
    d: &Dispatcher,
    account_id: u64,
    webhook_id: &str,
    reason: &str,
) {
    let info = format!("webhook {webhook_id} disabled: {reason}");
    let e = OperationalEvent::new(
        op::WEBHOOK_DISABLED,
        account_id,
        webhook_id,
        info,
        [("reason", Value::from(reason))],
    );
    emit(d, e).await;
}

/// A delivery attempt of the lane `key` failed (another may follow).
pub(super) fn attempt_failed(d: &Dispatcher, key: &LaneKey) {
    if is_internal(key.account_id) {
        return;
    }
    d.inner
        .ops
        .failing(&key.webhook_id, |s| s.failed_attempts += 1);
}

/// A delivery of the lane `key` finished: `delivery.dead`, or
/// `delivery.recovered` for the first success after failures.
pub(super) async fn delivery_finished(d: &Dispatcher, key: &LaneKey, r: &DeliveryRecord) {
    if is_internal(key.account_id) {
        if r.state == DeliveryState::Dead {
            tracing::error!(
                delivery_id = %r.id,
                attempts = r.attempt_count,
                last_error = r.attempts.last().map(|a| a.error.as_str()).unwrap_or(""),
                "the operator endpoint did not take an operational event before its retries \
                 ran out; the event is DEAD, the endpoint stays enabled and takes the next ones"
            );
        }
        return;
    }
    let ops = &d.inner.ops;
    match r.state {
        DeliveryState::Delivered => {
            let streak = {
                let mut health = ops.health.lock().unwrap_or_else(|p| p.into_inner());
                match health.insert(key.webhook_id.clone(), Health::Healthy) {
                    Some(Health::Failing(s)) => Some(s),
                    // Not seen since this router started: the failed
                    // attempts the record carries (from before a restart).
                    None if r.attempt_count > 1 => Some(Streak {
                        failed_attempts: u64::from(r.attempt_count - 1),
                        dead_deliveries: 0,
                        since_ms: r.first_attempt_ms,
                    }),
                    _ => None,
                }
            };
            let Some(s) = streak else { return };
            let info = format!(
                "webhook {} delivered again after {} failed attempts and {} dead deliveries",
                key.webhook_id, s.failed_attempts, s.dead_deliveries
            );
            let e = OperationalEvent::new(
                op::DELIVERY_RECOVERED,
                key.account_id,
                &key.webhook_id,
                info,
                [
                    ("delivery_id", Value::from(r.id.as_str())),
                    ("failed_attempts", Value::from(s.failed_attempts)),
                    ("dead_deliveries", Value::from(s.dead_deliveries)),
                    ("failing_since", Value::from(s.since_ms)),
                ],
            );
            emit(d, e).await;
        }
        DeliveryState::Dead => {
            ops.failing(&key.webhook_id, |s| s.dead_deliveries += 1);
            let last = r.attempts.last();
            let info = format!(
                "delivery {} to webhook {} is dead after {} attempts",
                r.id, key.webhook_id, r.attempt_count
            );
            let e = OperationalEvent::new(
                op::DELIVERY_DEAD,
                key.account_id,
                &key.webhook_id,
                info,
                [
                    ("delivery_id", Value::from(r.id.as_str())),
                    ("attempts", Value::from(r.attempt_count)),
                    ("event_count", Value::from(r.event_ids.len())),
                    (
                        "first_event_id",
                        Value::from(r.event_ids.first().cloned().unwrap_or_default()),
                    ),
                    (
                        "last_event_id",
                        Value::from(r.event_ids.last().cloned().unwrap_or_default()),
                    ),
                    (
                        "last_status_code",
                        Value::from(last.map(|a| a.status_code).unwrap_or(0)),
                    ),
                    (
                        "last_error",
                        Value::from(last.map(|a| a.error.clone()).unwrap_or_default()),
                    ),
                ],
            );
            emit(d, e).await;
        }
        _ => {}
    }
}

/// Most events in one payload of the lane `key`: one for the operational
/// lane (each payload's `accountId` is its event's account), else `max`.
pub(super) fn max_events_per_payload(key: &LaneKey, max: usize) -> usize {
    if is_internal(key.account_id) {
        1
    } else {
        max
    }
}

/// The `accountId` of a payload of the lane `key`: its account, or for the
/// operational lane the account its event concerns.
pub(super) fn envelope_account(key: &LaneKey, first_event_json: Option<&[u8]>) -> u64 {
    if !is_internal(key.account_id) {
        return key.account_id;
    }
    first_event_json
        .and_then(op::concerned_account)
        .unwrap_or(key.account_id)
}
